//! The agent's span model: what span building produces and exporters consume.

use std::sync::Arc;

use compact_str::CompactString;
use prost::encoding::{decode_varint, encoded_len_varint};

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

/// An attribute value, borrowed from where it is held.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueRef<'a> {
    /// A string.
    Str(&'a str),
    /// A signed integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
}

impl ValueRef<'_> {
    /// Length of the value as an OTLP `AnyValue` message (a oneof member is written even when it
    /// is the default): what both [`Attributes::push_ref`] and the exporter frame it with.
    pub(crate) fn encoded_len(self) -> usize {
        match self {
            ValueRef::Str(s) => 1 + encoded_len_varint(s.len() as u64) + s.len(),
            ValueRef::Int(i) => 1 + encoded_len_varint(i as u64),
            ValueRef::Bool(_) => 2,
        }
    }
}

impl<'a> From<&'a Value> for ValueRef<'a> {
    fn from(value: &'a Value) -> Self {
        match value {
            Value::Str(s) => ValueRef::Str(s),
            Value::Int(i) => ValueRef::Int(*i),
            Value::Bool(b) => ValueRef::Bool(*b),
        }
    }
}

/// A span's attributes, held in their OTLP wire form: one `Span.attributes` field (a `KeyValue`
/// message) after another. Span building writes each attribute once, straight into this buffer;
/// export copies the buffer whole. Before, each attribute was a key and a string value of its
/// own, encoded again at export: building, encoding and freeing them was ~15 % of the agent's
/// CPU at 10k req/s (docs/performance.md).
///
/// Attributes every span of a connection carries (its endpoints) are one allocation the spans
/// share ([`Attributes::share`]), after the span's own: each span held in the linking window
/// was ~180 bytes larger with its own copy (peak RSS at saturated nginx 107 → 87 MiB).
#[derive(Clone, Default)]
pub struct Attributes {
    wire: Vec<u8>,
    shared: Option<Arc<[u8]>>,
}

impl PartialEq for Attributes {
    /// The same attributes in the same order, however they are held.
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (self.parts(), other.parts());
        a[0].len() + a[1].len() == b[0].len() + b[1].len()
            && a.iter()
                .flat_map(|p| p.iter())
                .eq(b.iter().flat_map(|p| p.iter()))
    }
}

impl Eq for Attributes {}

/// Wire keys (field number << 3 | wire type) of the messages an attribute is made of.
pub(crate) mod wire {
    /// `Span.attributes`, length-delimited.
    pub const SPAN_ATTRIBUTE: u8 = (9 << 3) | 2;
    /// `KeyValue.key`.
    pub const KEY: u8 = (1 << 3) | 2;
    /// `KeyValue.value`.
    pub const VALUE: u8 = (2 << 3) | 2;
    /// `AnyValue.string_value`.
    pub const STRING: u8 = (1 << 3) | 2;
    /// `AnyValue.bool_value`, varint.
    pub const BOOL: u8 = 2 << 3;
    /// `AnyValue.int_value`, varint.
    pub const INT: u8 = 3 << 3;
}

/// Appends `v` as a protobuf varint.
#[inline]
fn put_varint(w: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        w.push(v as u8 | 0x80);
        v >>= 7;
    }
    w.push(v as u8);
}

fn read_varint(mut buf: &[u8]) -> Option<(u64, &[u8])> {
    let v = decode_varint(&mut buf).ok()?;
    Some((v, buf))
}

/// The body of the length-delimited field `key` at the start of `buf`, and what follows it.
fn read_delimited(buf: &[u8], key: u8) -> Option<(&[u8], &[u8])> {
    let (&k, rest) = buf.split_first()?;
    if k != key {
        return None;
    }
    let (len, rest) = read_varint(rest)?;
    let len = usize::try_from(len).ok()?;
    (rest.len() >= len).then(|| rest.split_at(len))
}

thread_local! {
    /// The buffer [`Attributes::scratch`] lends out: reused span after span, so it stays in the
    /// cache.
    static SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Attribute buffers of exported spans, for new spans to reuse: at 10k req/s, allocating each
/// span's buffer and freeing it after export, a second later, was ~7 % of the agent's samples,
/// half of it page faults (the allocator returned the freed pages to the kernel, and the next
/// spans faulted them in again). Bounded: [`POOL_MAX`] buffers of at most [`REUSE_MAX`] bytes.
static POOL: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
/// Most buffers the shared pool holds (~2.5 MiB of HTTP spans' attributes).
const POOL_MAX: usize = 4096;
/// Buffers a thread takes from the shared pool at once (one lock per this many spans).
const POOL_TAKE: usize = 256;
/// Larger buffers (a long SQL text) are freed, not kept.
const REUSE_MAX: usize = 1024;

thread_local! {
    /// The buffers this thread took from [`POOL`].
    static REUSE: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A buffer of an exported span, emptied, if any is waiting.
fn reused_buffer() -> Option<Vec<u8>> {
    REUSE.with_borrow_mut(|mine| {
        if mine.is_empty()
            && let Ok(mut pool) = POOL.lock()
        {
            let keep = pool.len().saturating_sub(POOL_TAKE);
            mine.extend(pool.drain(keep..));
        }
        let mut wire = mine.pop()?;
        wire.clear();
        Some(wire)
    })
}

/// Hands the attribute buffers of exported spans back for new spans ([`Attributes::finish`]).
/// The spans are dropped outside the pool's lock, which the event loop takes too.
pub fn recycle(spans: impl Iterator<Item = Span>) {
    let room = POOL
        .lock()
        .map_or(0, |pool| POOL_MAX.saturating_sub(pool.len()));
    let mut free = Vec::with_capacity(room.min(spans.size_hint().0));
    for span in spans {
        let wire = span.attributes.wire;
        if free.len() < room && (1..=REUSE_MAX).contains(&wire.capacity()) {
            free.push(wire);
        }
    }
    if let Ok(mut pool) = POOL.lock() {
        let fits = POOL_MAX.saturating_sub(pool.len()).min(free.len());
        pool.extend(free.drain(..fits));
    }
}

/// Room left after [`Attributes::finish`] for attributes added later (TLS version, ...).
const FINISH_SPARE: usize = 64;
/// A scratch buffer grown past this by a span with huge attributes is not kept.
const SCRATCH_MAX: usize = 64 << 10;

impl Attributes {
    /// Empty attributes written into this thread's reused buffer; [`Attributes::finish`] copies
    /// them out. A span's attributes are built in a dozen small writes and then held for the
    /// linking window: written straight into a fresh allocation, each write lands in memory
    /// that went cold while earlier spans held it (those copies were ~7 % of the agent's
    /// samples at 10k req/s). Copied out in one piece, the cold lines are written once, in
    /// sequence; the agent's CPU moved within the noise (docs/performance.md, item 32).
    pub fn scratch() -> Self {
        let mut wire = SCRATCH.take();
        wire.clear();
        Attributes { wire, shared: None }
    }

    /// The attributes built in [`Attributes::scratch`], in a buffer of an exported span
    /// ([`recycle`]) or else an allocation of their size (plus a little room); the scratch
    /// buffer goes back for the next span.
    pub fn finish(self) -> Self {
        let mut wire = reused_buffer().unwrap_or_default();
        wire.reserve_exact(self.wire.len() + FINISH_SPARE);
        wire.extend_from_slice(&self.wire);
        if self.wire.capacity() <= SCRATCH_MAX {
            SCRATCH.set(self.wire);
        }
        Attributes {
            wire,
            shared: self.shared,
        }
    }

    /// Room for `bytes` bytes of encoded attributes.
    pub fn with_capacity(bytes: usize) -> Self {
        Attributes {
            wire: Vec::with_capacity(bytes),
            shared: None,
        }
    }

    /// Encoded attributes (from [`Attributes::shared_wire`]) that other spans hold too, after
    /// this span's own: kept by reference, not copied. A span has one such block; a second one
    /// is copied.
    pub fn share(&mut self, shared: &Arc<[u8]>) {
        if self.shared.is_none() {
            self.shared = Some(Arc::clone(shared));
        } else {
            self.wire.extend_from_slice(shared);
        }
    }

    /// These attributes as one block for [`Attributes::share`].
    pub fn shared_wire(&self) -> Arc<[u8]> {
        let [own, shared] = self.parts();
        [own, shared].concat().into()
    }

    /// Appends an attribute.
    pub fn push(&mut self, kv: KeyValue) {
        self.push_ref(kv.key, ValueRef::from(&kv.value));
    }

    /// Appends a string attribute.
    pub fn push_str(&mut self, key: &str, value: &str) {
        self.push_ref(key, ValueRef::Str(value));
    }

    /// Appends an integer attribute.
    pub fn push_int(&mut self, key: &str, value: i64) {
        self.push_ref(key, ValueRef::Int(value));
    }

    /// Appends an attribute, encoded as the OTLP exporter writes it: an empty key is left out
    /// (proto3), a string value is written even when empty (a oneof member).
    pub fn push_ref(&mut self, key: &str, value: ValueRef<'_>) {
        let any_len = value.encoded_len();
        let key_len = if key.is_empty() {
            0
        } else {
            1 + encoded_len_varint(key.len() as u64) + key.len()
        };
        let kv_len = key_len + 1 + encoded_len_varint(any_len as u64) + any_len;
        // Written byte by byte into the reserved room: tags and varints as pushes, key and value
        // as one copy each (~2x faster than assembling tags and lengths in a stack buffer and
        // copying four pieces, in a loop timed in release mode).
        let w = &mut self.wire;
        w.reserve(1 + encoded_len_varint(kv_len as u64) + kv_len);
        w.push(wire::SPAN_ATTRIBUTE);
        put_varint(w, kv_len as u64);
        if !key.is_empty() {
            w.push(wire::KEY);
            put_varint(w, key.len() as u64);
            w.extend_from_slice(key.as_bytes());
        }
        w.push(wire::VALUE);
        put_varint(w, any_len as u64);
        match value {
            ValueRef::Str(s) => {
                w.push(wire::STRING);
                put_varint(w, s.len() as u64);
                w.extend_from_slice(s.as_bytes());
            }
            ValueRef::Int(i) => {
                w.push(wire::INT);
                put_varint(w, i as u64);
            }
            ValueRef::Bool(b) => {
                w.push(wire::BOOL);
                w.push(u8::from(b));
            }
        }
    }

    /// The attributes as `Span.attributes` fields, in two blocks (the span's own and the shared
    /// ones), ready to be copied into a `Span` message one after the other.
    pub fn parts(&self) -> [&[u8]; 2] {
        [&self.wire, self.shared.as_deref().unwrap_or_default()]
    }

    /// Encoded length of [`Attributes::parts`] together.
    pub fn encoded_len(&self) -> usize {
        self.wire.len() + self.shared.as_ref().map_or(0, |s| s.len())
    }

    /// The attributes in order, as (key, value).
    pub fn iter(&self) -> AttributesIter<'_> {
        let [rest, next] = self.parts();
        AttributesIter { rest, next }
    }

    /// The value of the first attribute named `key`.
    pub fn get(&self, key: &str) -> Option<ValueRef<'_>> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// Number of attributes.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// No attributes.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.encoded_len() == 0
    }

    /// Removes every attribute named `key`.
    pub fn remove(&mut self, key: &str) {
        if self.get(key).is_none() {
            return;
        }
        let mut kept = Attributes::with_capacity(self.encoded_len());
        for (k, v) in self.iter().filter(|(k, _)| *k != key) {
            kept.push_ref(k, v);
        }
        *self = kept;
    }
}

/// Iterator over [`Attributes`].
pub struct AttributesIter<'a> {
    rest: &'a [u8],
    /// The shared block, once `rest` is done.
    next: &'a [u8],
}

impl<'a> Iterator for AttributesIter<'a> {
    type Item = (&'a str, ValueRef<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            self.rest = std::mem::take(&mut self.next);
        }
        let (kv, rest) = read_delimited(self.rest, wire::SPAN_ATTRIBUTE)?;
        self.rest = rest;
        let (key, kv) = match read_delimited(kv, wire::KEY) {
            Some(found) => found,
            None => (&[][..], kv),
        };
        let key = std::str::from_utf8(key).ok()?;
        let (any, _) = read_delimited(kv, wire::VALUE)?;
        let value = match any.split_first()? {
            (&wire::STRING, _) => {
                ValueRef::Str(std::str::from_utf8(read_delimited(any, wire::STRING)?.0).ok()?)
            }
            (&wire::INT, rest) => ValueRef::Int(read_varint(rest)?.0 as i64),
            (&wire::BOOL, rest) => ValueRef::Bool(*rest.first()? != 0),
            _ => return None,
        };
        Some((key, value))
    }
}

impl std::fmt::Debug for Attributes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl FromIterator<KeyValue> for Attributes {
    fn from_iter<I: IntoIterator<Item = KeyValue>>(iter: I) -> Self {
        let mut a = Attributes::default();
        for kv in iter {
            a.push(kv);
        }
        a
    }
}

impl From<Vec<KeyValue>> for Attributes {
    fn from(v: Vec<KeyValue>) -> Self {
        v.into_iter().collect()
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
    pub name: compact_str::CompactString,
    /// Kind.
    pub kind: SpanKind,
    /// Start, Unix epoch ns.
    pub start_unix_ns: u64,
    /// End, Unix epoch ns.
    pub end_unix_ns: u64,
    /// Span attributes.
    pub attributes: Attributes,
    /// Status.
    pub status: Status,
    /// The process that produced it.
    pub resource: Arc<Resource>,
}

#[cfg(test)]
impl Span {
    /// The value of a string attribute, when present.
    pub fn attr_str(&self, key: &str) -> Option<&str> {
        match self.attributes.get(key) {
            Some(ValueRef::Str(s)) => Some(s),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_attributes_follow_the_spans_own() {
        let mut endpoints = Attributes::default();
        endpoints.push_str("network.peer.address", "10.0.0.9");
        endpoints.push_int("network.peer.port", 51000);
        let block = endpoints.shared_wire();

        let mut built = Attributes::scratch();
        built.push_str("http.request.method", "GET");
        built.share(&block);
        built.push_int("http.response.status_code", 200);
        // The block survives finishing, and is referenced, not copied.
        let built = built.finish();
        assert_eq!(built.parts()[1].as_ptr(), block.as_ptr());

        let mut flat = Attributes::default();
        flat.push_str("http.request.method", "GET");
        flat.push_int("http.response.status_code", 200);
        flat.push_str("network.peer.address", "10.0.0.9");
        flat.push_int("network.peer.port", 51000);
        assert_eq!(built, flat);
        assert_eq!(built.encoded_len(), flat.parts()[0].len());
        let keys: Vec<_> = built.iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "http.request.method",
                "http.response.status_code",
                "network.peer.address",
                "network.peer.port"
            ]
        );
        assert_eq!(built.get("network.peer.port"), Some(ValueRef::Int(51000)));

        // A second block is copied after the span's own attributes.
        let mut twice = built.clone();
        twice.share(&block);
        assert_eq!(twice.iter().count(), 6);
        // Removing an attribute keeps the rest, shared ones included.
        twice.remove("http.request.method");
        assert_eq!(twice.iter().count(), 5);
        assert_eq!(
            twice.get("network.peer.address"),
            Some(ValueRef::Str("10.0.0.9"))
        );
    }

    #[test]
    fn scratch_attributes_finish_as_built_and_start_empty() {
        let mut direct = Attributes::with_capacity(64);
        direct.push_str("http.request.method", "GET");
        direct.push_int("http.response.status_code", 200);
        let mut built = Attributes::scratch();
        built.push_str("http.request.method", "GET");
        built.push_int("http.response.status_code", 200);
        let built = built.finish();
        assert_eq!(built.parts(), direct.parts());
        // The next span's buffer is the same one, emptied.
        let next = Attributes::scratch();
        assert!(next.is_empty());
        let mut later = next.finish();
        later.push_str("tls.protocol.name", "tls");
        assert_eq!(later.len(), 1);
    }

    /// Buffers of exported spans come back emptied: a new span's attributes are only its own,
    /// whatever the buffer held and however small it was.
    #[test]
    fn recycled_buffers_hold_only_the_new_attributes() {
        let resource = Arc::new(Resource {
            service_name: "svc".to_owned(),
            pid: 1,
            attributes: Vec::new(),
        });
        let exported = (0..2 * POOL_TAKE).map(|n| {
            let mut attributes = Attributes::with_capacity(n % 700 + 1);
            attributes.push_str("old", &"o".repeat(n % 600));
            Span {
                trace_id: [1; 16],
                span_id: [1; 8],
                parent_span_id: None,
                trace_state: String::new(),
                name: "old".into(),
                kind: SpanKind::Server,
                start_unix_ns: 0,
                end_unix_ns: 0,
                attributes,
                status: Status::Unset,
                resource: Arc::clone(&resource),
            }
        });
        recycle(exported);
        for n in 0..2 * POOL_TAKE {
            let mut direct = Attributes::default();
            direct.push_str("url.path", &"p".repeat(n % 900));
            direct.push_int("http.response.status_code", 200);
            let mut built = Attributes::scratch();
            built.push_str("url.path", &"p".repeat(n % 900));
            built.push_int("http.response.status_code", 200);
            assert!(built.finish() == direct, "span {n}");
        }
    }

    #[test]
    fn attributes_come_back_as_written() {
        let long = "x".repeat(300);
        let mut a = Attributes::default();
        a.push_str("url.path", "/a");
        a.push_int("http.response.status_code", 200);
        a.push_int("negative", -5);
        a.push(KeyValue {
            key: "flag",
            value: Value::Bool(true),
        });
        a.push_str("empty", "");
        a.push_str("long", &long);
        a.push_str("", "no key");
        let all: Vec<_> = a.iter().collect();
        assert_eq!(
            all,
            [
                ("url.path", ValueRef::Str("/a")),
                ("http.response.status_code", ValueRef::Int(200)),
                ("negative", ValueRef::Int(-5)),
                ("flag", ValueRef::Bool(true)),
                ("empty", ValueRef::Str("")),
                ("long", ValueRef::Str(&long)),
                ("", ValueRef::Str("no key")),
            ]
        );
        assert_eq!(a.len(), 7);
        assert!(!a.is_empty() && Attributes::default().is_empty());
        assert_eq!(a.get("negative"), Some(ValueRef::Int(-5)));
        a.remove("url.path");
        a.remove("missing");
        assert_eq!(a.len(), 6);
        assert_eq!(a.get("url.path"), None);
        assert_eq!(
            a.iter().next(),
            Some(("http.response.status_code", ValueRef::Int(200)))
        );
    }

    #[test]
    fn varints_read_back() {
        for v in [0u64, 1, 127, 128, 16_383, 16_384, u64::MAX] {
            let mut w = vec![wire::KEY];
            put_varint(&mut w, v);
            assert_eq!(w.len(), 1 + encoded_len_varint(v), "{v}");
            let mut prost = Vec::new();
            prost::encoding::encode_varint(v, &mut prost);
            assert_eq!(w[1..], prost[..], "{v}");
            assert_eq!(read_varint(&w[1..]), Some((v, &[][..])));
        }
    }
}
