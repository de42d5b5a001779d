//! The agent's span model: what span building produces and exporters consume.

use std::sync::Arc;

use compact_str::CompactString;

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A string: kept inline up to 24 bytes (addresses, methods, short paths), so most
    /// attributes cost no allocation of their own.
    Str(CompactString),
    /// A signed integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
}

/// One attribute.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyValue {
    /// Attribute name, by the OpenTelemetry semantic conventions.
    pub key: &'static str,
    /// Attribute value.
    pub value: Value,
}

impl KeyValue {
    /// A string attribute.
    pub fn str(key: &'static str, value: impl Into<CompactString>) -> Self {
        KeyValue {
            key,
            value: Value::Str(value.into()),
        }
    }
    /// An integer attribute.
    pub fn int(key: &'static str, value: i64) -> Self {
        KeyValue {
            key,
            value: Value::Int(value),
        }
    }
}

/// The traced process a span belongs to (an OTLP Resource).
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    /// `service.name`, also the grouping key of ResourceSpans.
    pub service_name: String,
    /// Process id, to tell two processes of one service apart.
    pub pid: u32,
    /// All resource attributes, `service.name` included.
    pub attributes: Vec<KeyValue>,
}

/// Span kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    /// The process received a request.
    Server,
    /// The process sent a request.
    Client,
}

/// Span status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Not set (success or unknown).
    Unset,
    /// Failed, with an optional description.
    Error(Option<String>),
}

/// A finished span, ready to export.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    /// W3C trace id.
    pub trace_id: [u8; 16],
    /// Span id.
    pub span_id: [u8; 8],
    /// Parent span id, when the span has a parent.
    pub parent_span_id: Option<[u8; 8]>,
    /// W3C tracestate inherited from the remote parent, when any.
    pub trace_state: String,
    /// Low-cardinality name.
    pub name: String,
    /// Kind.
    pub kind: SpanKind,
    /// Start, Unix epoch ns.
    pub start_unix_ns: u64,
    /// End, Unix epoch ns.
    pub end_unix_ns: u64,
    /// Span attributes.
    pub attributes: Vec<KeyValue>,
    /// Status.
    pub status: Status,
    /// The process that produced it.
    pub resource: Arc<Resource>,
}

#[cfg(test)]
impl Span {
    /// The value of a string attribute, when present.
    pub fn attr_str(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| match &kv.value {
                Value::Str(s) => Some(s.as_str()),
                _ => None,
            })
    }
}
