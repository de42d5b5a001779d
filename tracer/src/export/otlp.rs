//! Direct protobuf encoding of the agent's spans as one OTLP `ExportTraceServiceRequest` per batch.
//!
//! The encoder writes the bytes prost would produce for the message the `opentelemetry-proto`
//! structs describe (fields in tag order, proto3 defaults left out), straight from the spans: a size
//! pass computes the length of every nested message, then one write pass fills a buffer reserved to
//! the exact size. Its scratch space is kept between batches, so the steady state allocates nothing
//! per span or attribute.
//!
//! Fields written (opentelemetry-proto `v1` field numbers; every tag is below 16, so every key is one
//! byte):
//!
//! ```text
//! ExportTraceServiceRequest { 1: repeated ResourceSpans }
//! ResourceSpans             { 1: Resource, 2: repeated ScopeSpans }
//! Resource                  { 1: repeated KeyValue }
//! ScopeSpans                { 1: InstrumentationScope, 2: repeated Span }
//! InstrumentationScope      { 1: string name, 2: string version }
//! Span                      { 1: bytes trace_id, 2: bytes span_id, 3: string trace_state,
//!                             4: bytes parent_span_id, 5: string name, 6: SpanKind kind,
//!                             7: fixed64 start_time_unix_nano, 8: fixed64 end_time_unix_nano,
//!                             9: repeated KeyValue attributes, 15: Status status }
//! Status                    { 2: string message, 3: StatusCode code }
//! KeyValue                  { 1: string key, 2: AnyValue value }
//! AnyValue                  { oneof value: 1: string, 2: bool, 3: int64 }
//! ```

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use prost::encoding::{encode_varint, encoded_len_varint};

use crate::span::{Resource, Span, SpanKind, Status, ValueRef, wire};

/// Instrumentation scope name on every exported span.
const SCOPE_NAME: &str = "tracer";
/// Instrumentation scope version on every exported span.
const SCOPE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Wire type of varint fields (integers, booleans, enums).
const VARINT: u8 = 0;
/// Wire type of 64-bit fixed-width fields.
const FIXED64: u8 = 1;
/// Wire type of length-delimited fields (strings, bytes, messages).
const LEN: u8 = 2;

/// The one-byte key of field `tag` (below 16) with `wire_type`.
const fn key(tag: u8, wire_type: u8) -> u8 {
    (tag << 3) | wire_type
}

/// `ExportTraceServiceRequest.resource_spans`.
const REQUEST_RESOURCE_SPANS: u8 = key(1, LEN);
/// `ResourceSpans.resource`.
const RESOURCE_SPANS_RESOURCE: u8 = key(1, LEN);
/// `ResourceSpans.scope_spans`.
const RESOURCE_SPANS_SCOPE_SPANS: u8 = key(2, LEN);
/// `Resource.attributes`.
const RESOURCE_ATTRIBUTES: u8 = key(1, LEN);
/// `ScopeSpans.scope`.
const SCOPE_SPANS_SCOPE: u8 = key(1, LEN);
/// `ScopeSpans.spans`.
const SCOPE_SPANS_SPANS: u8 = key(2, LEN);
/// `InstrumentationScope.name`.
const SCOPE_NAME_FIELD: u8 = key(1, LEN);
/// `InstrumentationScope.version`.
const SCOPE_VERSION_FIELD: u8 = key(2, LEN);
/// `Span.trace_id`.
const SPAN_TRACE_ID: u8 = key(1, LEN);
/// `Span.span_id`.
const SPAN_SPAN_ID: u8 = key(2, LEN);
/// `Span.trace_state`.
const SPAN_TRACE_STATE: u8 = key(3, LEN);
/// `Span.parent_span_id`.
const SPAN_PARENT_SPAN_ID: u8 = key(4, LEN);
/// `Span.name`.
const SPAN_NAME: u8 = key(5, LEN);
/// `Span.kind`.
const SPAN_KIND: u8 = key(6, VARINT);
/// `Span.start_time_unix_nano`.
const SPAN_START: u8 = key(7, FIXED64);
/// `Span.end_time_unix_nano`.
const SPAN_END: u8 = key(8, FIXED64);
/// `Span.status`.
const SPAN_STATUS: u8 = key(15, LEN);
/// `Status.message`.
const STATUS_MESSAGE: u8 = key(2, LEN);
/// `Status.code`.
const STATUS_CODE: u8 = key(3, VARINT);

/// `Span.SpanKind.SPAN_KIND_SERVER`.
const KIND_SERVER: u8 = 2;
/// `Span.SpanKind.SPAN_KIND_CLIENT`.
const KIND_CLIENT: u8 = 3;
/// `Status.StatusCode.STATUS_CODE_ERROR`.
const STATUS_CODE_ERROR: u8 = 2;

/// Marks the end of a group's chain of spans.
const NO_SPAN: usize = usize::MAX;

/// Encodes batches of spans as OTLP `ExportTraceServiceRequest` protobuf bytes, keeping its scratch
/// space between batches.
#[derive(Debug, Default)]
pub(crate) struct RequestEncoder {
    /// The ResourceSpans of the batch, one per distinct (service.name, pid), in order of first
    /// appearance.
    groups: Vec<Group>,
    /// Per span of the batch, in batch order: its encoded length and the next span of its group.
    spans: Vec<SpanEntry>,
}

/// One ResourceSpans of the batch being encoded.
#[derive(Debug)]
struct Group {
    /// Index of its first span, whose resource it carries.
    first: usize,
    /// Index of its last span so far.
    last: usize,
    /// Length of its spans, as `ScopeSpans.spans` fields.
    spans_len: usize,
    /// Length of its `Resource` message.
    resource_len: usize,
    /// Length of its `ScopeSpans` message.
    scope_spans_len: usize,
    /// Length of its `ResourceSpans` message.
    len: usize,
}

/// Size-pass result for one span.
#[derive(Debug, Clone, Copy)]
struct SpanEntry {
    /// Length of its `Span` message.
    len: usize,
    /// Index of the next span of its group, or [`NO_SPAN`].
    next: usize,
}

impl RequestEncoder {
    /// Appends the `ExportTraceServiceRequest` of `spans` to `buf`: one ResourceSpans per distinct
    /// (service.name, pid), in order of first appearance, each with one ScopeSpans holding its spans
    /// in batch order. An empty batch appends nothing (the empty request).
    pub(crate) fn encode(&mut self, spans: &[Span], buf: &mut BytesMut) {
        self.group(spans);
        let mut total = 0;
        for group in &mut self.groups {
            let resource = &spans[group.first].resource;
            group.resource_len = resource_attributes(resource)
                .map(|(k, v)| delimited_len(key_value_len(k, v)))
                .sum();
            group.scope_spans_len = delimited_len(scope_len()) + group.spans_len;
            group.len = delimited_len(group.resource_len) + delimited_len(group.scope_spans_len);
            total += delimited_len(group.len);
        }

        buf.reserve(total);
        let start = buf.len();
        for group in &self.groups {
            let resource = &spans[group.first].resource;
            put_header(buf, REQUEST_RESOURCE_SPANS, group.len);
            put_header(buf, RESOURCE_SPANS_RESOURCE, group.resource_len);
            for (k, v) in resource_attributes(resource) {
                put_key_value(buf, RESOURCE_ATTRIBUTES, k, v);
            }
            put_header(buf, RESOURCE_SPANS_SCOPE_SPANS, group.scope_spans_len);
            put_header(buf, SCOPE_SPANS_SCOPE, scope_len());
            put_str(buf, SCOPE_NAME_FIELD, SCOPE_NAME);
            put_str(buf, SCOPE_VERSION_FIELD, SCOPE_VERSION);
            let mut i = group.first;
            while i != NO_SPAN {
                let entry = self.spans[i];
                put_span(buf, &spans[i], entry.len);
                i = entry.next;
            }
        }
        debug_assert_eq!(
            buf.len() - start,
            total,
            "size pass and write pass disagree"
        );
    }

    /// Size pass: assigns every span to its group, chains each group's spans and measures them.
    fn group(&mut self, spans: &[Span]) {
        self.groups.clear();
        self.spans.clear();
        self.spans.reserve(spans.len());
        // Group of the previous span: consecutive spans mostly come from one process.
        let mut current = 0;
        for (i, span) in spans.iter().enumerate() {
            let len = span_len(span);
            self.spans.push(SpanEntry { len, next: NO_SPAN });
            let res = &span.resource;
            let same = |group: &Group| {
                let other = &spans[group.first].resource;
                Arc::ptr_eq(other, res)
                    || (other.pid == res.pid && other.service_name == res.service_name)
            };
            let g = if self.groups.get(current).is_some_and(same) {
                current
            } else if let Some(g) = self.groups.iter().position(same) {
                g
            } else {
                self.groups.push(Group {
                    first: i,
                    last: i,
                    spans_len: 0,
                    resource_len: 0,
                    scope_spans_len: 0,
                    len: 0,
                });
                self.groups.len() - 1
            };
            let group = &mut self.groups[g];
            if group.last != i {
                self.spans[group.last].next = i;
                group.last = i;
            }
            group.spans_len += delimited_len(len);
            current = g;
        }
    }
}

/// The resource attributes as exported: the resource's own, then `service.name` and `process.pid`
/// when it lacks them (the grouping key must be visible to the backend).
fn resource_attributes(res: &Resource) -> impl Iterator<Item = (&str, ValueRef<'_>)> {
    let has = |key: &str| res.attributes.iter().any(|kv| kv.key == key);
    let name = (!has("service.name")).then_some(("service.name", ValueRef::Str(&res.service_name)));
    let pid = (!has("process.pid")).then_some(("process.pid", ValueRef::Int(i64::from(res.pid))));
    res.attributes
        .iter()
        .map(|kv| (kv.key, ValueRef::from(&kv.value)))
        .chain(name)
        .chain(pid)
}

/// Length of a length-delimited field with a `body`-byte payload (one-byte key).
fn delimited_len(body: usize) -> usize {
    1 + encoded_len_varint(body as u64) + body
}

/// Length of a proto3 string or bytes field: nothing when empty.
fn str_len(s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        delimited_len(s.len())
    }
}

/// Length of the `InstrumentationScope` message.
fn scope_len() -> usize {
    str_len(SCOPE_NAME) + str_len(SCOPE_VERSION)
}

/// Length of a `KeyValue` message.
fn key_value_len(key: &str, value: ValueRef<'_>) -> usize {
    str_len(key) + delimited_len(value.encoded_len())
}

/// Length of an error `Status` message.
fn status_len(message: &str) -> usize {
    str_len(message) + 2
}

/// Length of a `Span` message.
fn span_len(span: &Span) -> usize {
    let mut len = delimited_len(span.trace_id.len()) + delimited_len(span.span_id.len());
    len += str_len(&span.trace_state);
    if let Some(parent) = &span.parent_span_id {
        len += delimited_len(parent.len());
    }
    len += str_len(&span.name);
    len += 2; // kind: SERVER or CLIENT, never the default
    if span.start_unix_ns != 0 {
        len += 9;
    }
    if span.end_unix_ns != 0 {
        len += 9;
    }
    // Already in wire form (`Span.attributes` fields).
    len += span.attributes.encoded_len();
    if let Status::Error(message) = &span.status {
        len += delimited_len(status_len(message.as_deref().unwrap_or_default()));
    }
    len
}

/// Writes the key and length prefix of a length-delimited field.
fn put_header(buf: &mut BytesMut, key: u8, len: usize) {
    buf.put_u8(key);
    encode_varint(len as u64, buf);
}

/// Writes a bytes field, empty or not.
fn put_bytes(buf: &mut BytesMut, key: u8, bytes: &[u8]) {
    put_header(buf, key, bytes.len());
    buf.put_slice(bytes);
}

/// Writes a proto3 string field: nothing when empty.
fn put_str(buf: &mut BytesMut, key: u8, s: &str) {
    if !s.is_empty() {
        put_bytes(buf, key, s.as_bytes());
    }
}

/// Writes a `KeyValue` as field `field_key` of the enclosing message.
fn put_key_value(buf: &mut BytesMut, field_key: u8, key: &str, value: ValueRef<'_>) {
    let any_len = value.encoded_len();
    put_header(buf, field_key, str_len(key) + delimited_len(any_len));
    put_str(buf, wire::KEY, key);
    put_header(buf, wire::VALUE, any_len);
    match value {
        ValueRef::Str(s) => put_bytes(buf, wire::STRING, s.as_bytes()),
        ValueRef::Int(i) => {
            buf.put_u8(wire::INT);
            encode_varint(i as u64, buf);
        }
        ValueRef::Bool(b) => {
            buf.put_u8(wire::BOOL);
            buf.put_u8(u8::from(b));
        }
    }
}

/// Writes `span` as a `ScopeSpans.spans` field; `len` is its [`span_len`].
fn put_span(buf: &mut BytesMut, span: &Span, len: usize) {
    put_header(buf, SCOPE_SPANS_SPANS, len);
    put_bytes(buf, SPAN_TRACE_ID, &span.trace_id);
    put_bytes(buf, SPAN_SPAN_ID, &span.span_id);
    put_str(buf, SPAN_TRACE_STATE, &span.trace_state);
    if let Some(parent) = &span.parent_span_id {
        put_bytes(buf, SPAN_PARENT_SPAN_ID, parent);
    }
    put_str(buf, SPAN_NAME, &span.name);
    buf.put_u8(SPAN_KIND);
    buf.put_u8(match span.kind {
        SpanKind::Server => KIND_SERVER,
        SpanKind::Client => KIND_CLIENT,
    });
    if span.start_unix_ns != 0 {
        buf.put_u8(SPAN_START);
        buf.put_u64_le(span.start_unix_ns);
    }
    if span.end_unix_ns != 0 {
        buf.put_u8(SPAN_END);
        buf.put_u64_le(span.end_unix_ns);
    }
    for part in span.attributes.parts() {
        buf.put_slice(part);
    }
    if let Status::Error(message) = &span.status {
        let message = message.as_deref().unwrap_or_default();
        put_header(buf, SPAN_STATUS, status_len(message));
        put_str(buf, STATUS_MESSAGE, message);
        buf.put_u8(STATUS_CODE);
        buf.put_u8(STATUS_CODE_ERROR);
    }
}

#[cfg(test)]
mod reference;

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{KeyValue as ProtoKeyValue, any_value};
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind as ProtoKind;
    use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
    use prost::Message as _;
    use rand::rngs::StdRng;
    use rand::{Rng as _, SeedableRng as _};

    use super::*;
    use crate::span::{KeyValue, Value};

    /// Encodes `spans` directly and decodes the bytes back.
    fn build_request(spans: &[Span]) -> ExportTraceServiceRequest {
        let mut buf = BytesMut::new();
        RequestEncoder::default().encode(spans, &mut buf);
        ExportTraceServiceRequest::decode(buf.freeze()).expect("the encoded request decodes")
    }

    /// Checks that `encoder` writes exactly what prost writes for the struct-based conversion.
    fn assert_matches_reference(encoder: &mut RequestEncoder, spans: &[Span]) {
        let expected = reference::build_request(spans.to_vec());
        let mut buf = BytesMut::new();
        encoder.encode(spans, &mut buf);
        let decoded =
            ExportTraceServiceRequest::decode(&buf[..]).expect("the encoded request decodes");
        assert_eq!(decoded, expected);
        assert!(
            buf[..] == expected.encode_to_vec()[..],
            "same message, different bytes"
        );
    }

    /// A resource with the attributes the resource builder would set.
    pub(crate) fn resource(service: &str, pid: u32) -> Arc<Resource> {
        Arc::new(Resource {
            service_name: service.to_string(),
            pid,
            attributes: vec![
                KeyValue::str("service.name", service),
                KeyValue::int("process.pid", i64::from(pid)),
            ],
        })
    }

    /// A server span with distinct ids derived from `n`.
    pub(crate) fn span(n: u8, resource: &Arc<Resource>) -> Span {
        Span {
            trace_id: [n; 16],
            span_id: [n.wrapping_add(1); 8],
            parent_span_id: None,
            trace_state: String::new(),
            name: format!("GET /item/{n}").into(),
            kind: SpanKind::Server,
            start_unix_ns: 1_700_000_000_000_000_000 + u64::from(n),
            end_unix_ns: 1_700_000_000_012_345_678 + u64::from(n),
            attributes: vec![
                KeyValue::str("http.request.method", "GET"),
                KeyValue::int("http.response.status_code", 200),
            ]
            .into(),
            status: Status::Unset,
            resource: Arc::clone(resource),
        }
    }

    fn value_of<'a>(attrs: &'a [ProtoKeyValue], key: &str) -> Option<&'a any_value::Value> {
        attrs
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| v.value.as_ref())
    }

    #[test]
    fn span_fields_convert() {
        let res = resource("checkout", 42);
        let mut s = span(7, &res);
        s.kind = SpanKind::Client;
        s.parent_span_id = Some([9; 8]);
        s.trace_state = "vendor=abc".to_string();
        s.status = Status::Error(Some("connection reset".to_string()));
        s.attributes.push(KeyValue {
            key: "flag",
            value: Value::Bool(true),
        });
        let req = build_request(std::slice::from_ref(&s));
        let out = &req.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(out.trace_id, s.trace_id.to_vec());
        assert_eq!(out.span_id, s.span_id.to_vec());
        assert_eq!(out.parent_span_id, vec![9; 8]);
        assert_eq!(out.trace_state, "vendor=abc");
        assert_eq!(out.name, "GET /item/7");
        assert_eq!(out.kind, ProtoKind::Client as i32);
        assert_eq!(out.start_time_unix_nano, s.start_unix_ns);
        assert_eq!(out.end_time_unix_nano, s.end_unix_ns);
        let status = out.status.as_ref().unwrap();
        assert_eq!(status.code, StatusCode::Error as i32);
        assert_eq!(status.message, "connection reset");
        assert_eq!(
            value_of(&out.attributes, "http.request.method"),
            Some(&any_value::Value::StringValue("GET".into()))
        );
        assert_eq!(
            value_of(&out.attributes, "http.response.status_code"),
            Some(&any_value::Value::IntValue(200))
        );
        assert_eq!(
            value_of(&out.attributes, "flag"),
            Some(&any_value::Value::BoolValue(true))
        );
    }

    #[test]
    fn unset_status_and_root_span() {
        let res = resource("a", 1);
        let req = build_request(&[span(1, &res)]);
        let out = &req.resource_spans[0].scope_spans[0].spans[0];
        assert!(out.parent_span_id.is_empty());
        assert_eq!(out.status, None);
        assert_eq!(out.kind, ProtoKind::Server as i32);
    }

    #[test]
    fn spans_group_per_resource() {
        let a = resource("a", 1);
        let a_other_pid = resource("a", 2);
        let b = resource("b", 3);
        let spans = vec![
            span(1, &a),
            span(2, &b),
            span(3, &a_other_pid),
            span(4, &a),
            span(5, &b),
            span(6, &a),
        ];
        let req = build_request(&spans);
        assert_eq!(req.resource_spans.len(), 3);
        let summary: Vec<(i64, Vec<String>)> = req
            .resource_spans
            .iter()
            .map(|rs| {
                let attrs = &rs.resource.as_ref().unwrap().attributes;
                let Some(any_value::Value::IntValue(pid)) = value_of(attrs, "process.pid") else {
                    panic!("no pid")
                };
                assert_eq!(rs.scope_spans.len(), 1);
                let scope = rs.scope_spans[0].scope.as_ref().unwrap();
                assert_eq!(scope.name, "tracer");
                assert_eq!(scope.version, env!("CARGO_PKG_VERSION"));
                (
                    *pid,
                    rs.scope_spans[0]
                        .spans
                        .iter()
                        .map(|s| s.name.clone())
                        .collect(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    1,
                    vec![
                        "GET /item/1".into(),
                        "GET /item/4".into(),
                        "GET /item/6".into()
                    ]
                ),
                (3, vec!["GET /item/2".into(), "GET /item/5".into()]),
                (2, vec!["GET /item/3".into()]),
            ]
        );
    }

    #[test]
    fn missing_grouping_attributes_are_added() {
        let bare = Arc::new(Resource {
            service_name: "svc".into(),
            pid: 77,
            attributes: Vec::new(),
        });
        let req = build_request(&[span(1, &bare)]);
        let attrs = &req.resource_spans[0].resource.as_ref().unwrap().attributes;
        assert_eq!(
            value_of(attrs, "service.name"),
            Some(&any_value::Value::StringValue("svc".into()))
        );
        assert_eq!(
            value_of(attrs, "process.pid"),
            Some(&any_value::Value::IntValue(77))
        );
    }

    #[test]
    fn empty_batch_is_the_empty_request() {
        let mut buf = BytesMut::new();
        RequestEncoder::default().encode(&[], &mut buf);
        assert!(buf.is_empty());
        assert_matches_reference(&mut RequestEncoder::default(), &[]);
    }

    /// A string of `len` bytes.
    fn long(len: usize) -> String {
        "0123456789abcdef".repeat(len / 16 + 1)[..len].to_string()
    }

    #[test]
    fn direct_encoding_matches_struct_conversion() {
        let full = Arc::new(Resource {
            service_name: "checkout".into(),
            pid: 42,
            attributes: vec![
                KeyValue::str("service.name", "checkout"),
                KeyValue::int("process.pid", 42),
                KeyValue::str("host.name", long(300)),
                KeyValue::str("process.command_line", "/usr/bin/ünïcødé --flag ✓"),
                KeyValue {
                    key: "container.privileged",
                    value: Value::Bool(false),
                },
            ],
        });
        // Same (service.name, pid) in another allocation, other attributes: joins `full`'s group.
        let full_again = Arc::new(Resource {
            service_name: "checkout".into(),
            pid: 42,
            attributes: vec![KeyValue::str("other", "ignored")],
        });
        let bare = Arc::new(Resource {
            service_name: "日本語-svc 🚀".into(),
            pid: u32::MAX,
            attributes: Vec::new(),
        });
        let name_only = Arc::new(Resource {
            service_name: "named".into(),
            pid: 0,
            attributes: vec![KeyValue::str("service.name", "")],
        });
        let big = Arc::new(Resource {
            service_name: long(200),
            pid: 1,
            attributes: vec![KeyValue::str("k8s.pod.name", long(20_000))],
        });

        let mut spans = Vec::new();
        let mut s = span(1, &full);
        s.attributes.push(KeyValue {
            key: "flag",
            value: Value::Bool(true),
        });
        spans.push(s);

        let mut s = span(2, &bare);
        s.kind = SpanKind::Client;
        s.parent_span_id = Some([0xab; 8]);
        s.trace_state = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7".into();
        s.status = Status::Error(Some("connection reset".into()));
        s.name = "GET /café/日本/🚀".into();
        spans.push(s);

        let mut s = span(3, &full_again);
        s.status = Status::Error(None);
        s.parent_span_id = Some([0; 8]);
        spans.push(s);

        let mut s = span(4, &name_only);
        s.name = Default::default();
        s.status = Status::Error(Some(String::new()));
        s.attributes = vec![
            KeyValue::str("empty", ""),
            KeyValue::str("", "empty key"),
            KeyValue::int("min", i64::MIN),
            KeyValue::int("max", i64::MAX),
            KeyValue::int("zero", 0),
            KeyValue::int("minus_one", -1),
            KeyValue::int("two_bytes", 300),
            KeyValue {
                key: "off",
                value: Value::Bool(false),
            },
            KeyValue::str("url.full", long(128)),
            KeyValue::str("http.request.header.cookie", long(20_000)),
            KeyValue::str("unicode", "ünïcødé ✓ 日本語 🚀"),
        ]
        .into();
        spans.push(s);

        let mut s = span(5, &full);
        s.start_unix_ns = 0;
        s.end_unix_ns = u64::MAX;
        s.trace_id = [0; 16];
        s.status = Status::Error(Some(long(200)));
        spans.push(s);

        let mut s = span(6, &big);
        s.kind = SpanKind::Client;
        s.trace_state = long(130);
        s.name = long(127).into();
        spans.push(s);

        // Enough spans in one group for its lengths to need three-byte varints.
        for n in 7..200 {
            spans.push(span(n, if n % 3 == 0 { &bare } else { &full }));
        }
        spans.push(span(200, &full_again));

        let mut encoder = RequestEncoder::default();
        assert_matches_reference(&mut encoder, &spans);
        let req = build_request(&spans);
        assert_eq!(req.resource_spans.len(), 4);
        // The encoder's scratch space is reused: a second, different batch comes out right too.
        assert_matches_reference(&mut encoder, &spans[3..5]);
        assert_matches_reference(&mut encoder, &spans);
    }

    /// A random string: empty, short, unicode, or long enough for multi-byte length prefixes.
    fn random_string(rng: &mut StdRng) -> String {
        match rng.random_range(0..6) {
            0 => String::new(),
            1 => "GET".into(),
            2 => "ünïcødé ✓ 日本語 🚀".into(),
            3 => long(rng.random_range(100..200)),
            4 => long(rng.random_range(16_000..17_000)),
            _ => long(rng.random_range(0..140)),
        }
    }

    /// A random attribute.
    fn random_attribute(rng: &mut StdRng) -> KeyValue {
        const KEYS: [&str; 6] = [
            "",
            "a",
            "http.request.method",
            "service.name",
            "process.pid",
            "ключ",
        ];
        let key = KEYS[rng.random_range(0..KEYS.len())];
        let value = match rng.random_range(0..3) {
            0 => Value::Str(random_string(rng).into()),
            1 => Value::Int(match rng.random_range(0..3) {
                0 => rng.random(),
                1 => rng.random_range(-200..200),
                _ => i64::from(rng.random::<u32>()),
            }),
            _ => Value::Bool(rng.random()),
        };
        KeyValue { key, value }
    }

    #[test]
    fn random_batches_match_struct_conversion() {
        let mut rng = StdRng::seed_from_u64(0x07e1);
        let mut encoder = RequestEncoder::default();
        for _ in 0..300 {
            let resources: Vec<Arc<Resource>> = (0..rng.random_range(1..5))
                .map(|_| {
                    Arc::new(Resource {
                        service_name: ["a", "b", "ünï"][rng.random_range(0..3)].into(),
                        pid: rng.random_range(0..3),
                        attributes: (0..rng.random_range(0..4))
                            .map(|_| random_attribute(&mut rng))
                            .collect(),
                    })
                })
                .collect();
            let spans: Vec<Span> = (0..rng.random_range(0..40))
                .map(|_| Span {
                    trace_id: rng.random(),
                    span_id: rng.random(),
                    parent_span_id: rng.random::<bool>().then(|| rng.random()),
                    trace_state: if rng.random() {
                        String::new()
                    } else {
                        random_string(&mut rng)
                    },
                    name: random_string(&mut rng).into(),
                    kind: if rng.random() {
                        SpanKind::Server
                    } else {
                        SpanKind::Client
                    },
                    start_unix_ns: if rng.random_ratio(1, 10) {
                        0
                    } else {
                        rng.random()
                    },
                    end_unix_ns: if rng.random_ratio(1, 10) {
                        0
                    } else {
                        rng.random()
                    },
                    attributes: (0..rng.random_range(0..20))
                        .map(|_| random_attribute(&mut rng))
                        .collect(),
                    status: match rng.random_range(0..3) {
                        0 => Status::Unset,
                        1 => Status::Error(None),
                        _ => Status::Error(Some(random_string(&mut rng))),
                    },
                    resource: Arc::clone(&resources[rng.random_range(0..resources.len())]),
                })
                .collect();
            assert_matches_reference(&mut encoder, &spans);
        }
    }

    /// A resource as the process table builds it.
    fn typical_resource(n: u32) -> Arc<Resource> {
        let service = format!("service-{n}");
        Arc::new(Resource {
            service_name: service.clone(),
            pid: 1000 + n,
            attributes: vec![
                KeyValue::str("service.name", service),
                KeyValue::int("process.pid", i64::from(1000 + n)),
                KeyValue::str("process.executable.name", "python3"),
                KeyValue::str("process.executable.path", "/usr/bin/python3.12"),
                KeyValue::str("process.command_line", "python3 -m gunicorn app:app -w 4"),
                KeyValue::str("host.name", "ip-10-0-3-17.eu-west-1.compute.internal"),
                KeyValue::str("telemetry.sdk.name", "tracer"),
                KeyValue::str("telemetry.sdk.language", "python"),
            ],
        })
    }

    /// An HTTP server span with the usual 15 attributes.
    fn typical_span(n: usize, resource: &Arc<Resource>) -> Span {
        let id = n as u64;
        let mut trace_id = [0; 16];
        trace_id[..8].copy_from_slice(&id.to_le_bytes());
        trace_id[8..].copy_from_slice(&(!id).to_le_bytes());
        Span {
            trace_id,
            span_id: (id * 7919).to_le_bytes(),
            parent_span_id: n.is_multiple_of(2).then_some((id * 104_729).to_le_bytes()),
            trace_state: String::new(),
            name: "GET /api/v1/orders/{id}".into(),
            kind: SpanKind::Server,
            start_unix_ns: 1_700_000_000_000_000_000 + id * 1_000_000,
            end_unix_ns: 1_700_000_000_012_345_678 + id * 1_000_000,
            attributes: vec![
                KeyValue::str("http.request.method", "GET"),
                KeyValue::str("url.path", format!("/api/v1/orders/{n}")),
                KeyValue::str("url.scheme", "http"),
                KeyValue::str("url.query", "expand=items&currency=EUR"),
                KeyValue::str("http.route", "/api/v1/orders/{id}"),
                KeyValue::int("http.response.status_code", 200),
                KeyValue::str("server.address", "orders.internal"),
                KeyValue::int("server.port", 8080),
                KeyValue::str("client.address", "10.0.3.41"),
                KeyValue::int("client.port", 40_000 + (n % 20_000) as i64),
                KeyValue::str("network.peer.address", "10.0.3.41"),
                KeyValue::int("network.peer.port", 40_000 + (n % 20_000) as i64),
                KeyValue::str("network.protocol.name", "http"),
                KeyValue::str("network.protocol.version", "1.1"),
                KeyValue::str(
                    "user_agent.original",
                    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)",
                ),
            ]
            .into(),
            status: Status::Unset,
            resource: Arc::clone(resource),
        }
    }

    /// Median and minimum of `rounds` runs of `f`, after a warm-up.
    fn time(label: &str, rounds: usize, mut f: impl FnMut()) -> std::time::Duration {
        for _ in 0..3 {
            f();
        }
        let mut samples: Vec<std::time::Duration> = (0..rounds)
            .map(|_| {
                let started = std::time::Instant::now();
                f();
                started.elapsed()
            })
            .collect();
        samples.sort();
        let median = samples[rounds / 2];
        println!(
            "{label:<58} median {median:>10.3?}  min {:>10.3?}",
            samples[0]
        );
        median
    }

    /// Encoding time of a 4096-span batch, struct conversion against direct encoding. Asserts
    /// nothing about time; run with `cargo test --release -p tracer -- --ignored encode_speed
    /// --nocapture`.
    #[test]
    #[ignore = "timing report, run on demand in release mode"]
    fn encode_speed() {
        use std::hint::black_box;

        const SPANS: usize = 4096;
        const ROUNDS: usize = 60;
        let resources: Vec<Arc<Resource>> = (0..4).map(typical_resource).collect();
        let batch: Vec<Span> = (0..SPANS)
            .map(|n| typical_span(n, &resources[n % resources.len()]))
            .collect();
        let mut encoder = RequestEncoder::default();
        let mut buf = BytesMut::new();
        encoder.encode(&batch, &mut buf);
        let expected = reference::build_request(batch.clone()).encode_to_vec();
        assert!(buf[..] == expected[..]);
        println!(
            "{SPANS} spans, {} attributes each, {} bytes encoded",
            batch[0].attributes.len(),
            buf.len()
        );

        let clone = time("baseline: clone + drop the batch", ROUNDS, || {
            drop(black_box(batch.clone()))
        });
        let old = time(
            "before: clone, build structs, encode_to_vec, drop",
            ROUNDS,
            || {
                let req = reference::build_request(black_box(batch.clone()));
                black_box(req.encode_to_vec());
            },
        );
        let old_grpc = time(
            "before, gRPC: clone, build structs, clone request, encode",
            ROUNDS,
            || {
                let req = reference::build_request(black_box(batch.clone()));
                let sent = req.clone();
                let mut out = BytesMut::with_capacity(sent.encoded_len());
                black_box(sent.encode(&mut out).is_ok());
            },
        );
        let new = time("after: clone, direct encode, drop", ROUNDS, || {
            let spans = black_box(batch.clone());
            buf.clear();
            encoder.encode(&spans, &mut buf);
            black_box(&buf);
        });
        let direct = time("after: direct encode only (reused buffer)", ROUNDS, || {
            buf.clear();
            encoder.encode(black_box(&batch), &mut buf);
            black_box(&buf);
        });
        println!(
            "net of the baseline: before {:.3?} (gRPC {:.3?}), after {:.3?}; direct encode alone {direct:.3?}",
            old.saturating_sub(clone),
            old_grpc.saturating_sub(clone),
            new.saturating_sub(clone),
        );
    }
}
