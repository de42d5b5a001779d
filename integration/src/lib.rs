//! End-to-end test support: an in-process OTLP trace receiver (gRPC or HTTP/protobuf) on 127.0.0.1
//! that records every export request and offers a flattened view of the spans in them.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use std::time::Duration;
//! let receiver = integration::OtlpReceiver::start_http().await?;
//! // Point the agent at receiver.endpoint() with OTEL_EXPORTER_OTLP_PROTOCOL=receiver.protocol().
//! let spans = receiver
//!     .wait_for(|s| s.iter().any(|s| s.attr_str("url.path") == Some("/x")), Duration::from_secs(10))
//!     .await
//!     .expect("span for /x");
//! println!("{} spans so far", spans.len());
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderMap};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode as HttpStatus};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message as _;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

pub use opentelemetry_proto;
pub use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
pub use opentelemetry_proto::tonic::trace::v1::status::StatusCode;

/// Largest request body the receiver reads.
const MAX_BODY_BYTES: usize = 64 << 20;
/// How often [`OtlpReceiver::wait_for`] looks at the received spans.
const POLL_EVERY: Duration = Duration::from_millis(20);

/// One export request as received.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedRequest {
    /// HTTP headers or gRPC metadata, names lowercase (a repeated name keeps its last value).
    pub headers: BTreeMap<String, String>,
    /// The decoded request.
    pub body: ExportTraceServiceRequest,
}

/// An attribute value, decoded from OTLP `AnyValue`.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    /// `string_value`.
    Str(String),
    /// `int_value`.
    Int(i64),
    /// `bool_value`.
    Bool(bool),
    /// `double_value`.
    Double(f64),
    /// `bytes_value`.
    Bytes(Vec<u8>),
    /// `array_value`.
    Array(Vec<AttrValue>),
    /// `kvlist_value`.
    Map(BTreeMap<String, AttrValue>),
    /// No value set.
    Empty,
}

impl AttrValue {
    fn from_any(v: Option<&AnyValue>) -> Self {
        match v.and_then(|v| v.value.as_ref()) {
            Some(any_value::Value::StringValue(s)) => AttrValue::Str(s.clone()),
            Some(any_value::Value::IntValue(i)) => AttrValue::Int(*i),
            Some(any_value::Value::BoolValue(b)) => AttrValue::Bool(*b),
            Some(any_value::Value::DoubleValue(d)) => AttrValue::Double(*d),
            Some(any_value::Value::BytesValue(b)) => AttrValue::Bytes(b.clone()),
            Some(any_value::Value::ArrayValue(a)) => AttrValue::Array(
                a.values
                    .iter()
                    .map(|v| AttrValue::from_any(Some(v)))
                    .collect(),
            ),
            Some(any_value::Value::KvlistValue(l)) => AttrValue::Map(attr_map(&l.values)),
            Some(any_value::Value::StringValueStrindex(_)) | None => AttrValue::Empty,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            AttrValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, if this is one.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            AttrValue::Int(i) => Some(*i),
            _ => None,
        }
    }
}

fn attr_map(kvs: &[KeyValue]) -> BTreeMap<String, AttrValue> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), AttrValue::from_any(kv.value.as_ref())))
        .collect()
}

/// One span with its resource and scope, flattened out of the request nesting.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSpan {
    /// Resource attributes (`service.name`, `process.pid`, ...).
    pub resource: BTreeMap<String, AttrValue>,
    /// Instrumentation scope name.
    pub scope_name: String,
    /// Instrumentation scope version.
    pub scope_version: String,
    /// Trace id, lowercase hex.
    pub trace_id: String,
    /// Span id, lowercase hex.
    pub span_id: String,
    /// Parent span id, lowercase hex; `None` for a root span.
    pub parent_span_id: Option<String>,
    /// W3C tracestate.
    pub trace_state: String,
    /// Span name.
    pub name: String,
    /// Span kind (`Unspecified` for values this proto version does not know).
    pub kind: SpanKind,
    /// Start, Unix epoch ns.
    pub start_unix_ns: u64,
    /// End, Unix epoch ns.
    pub end_unix_ns: u64,
    /// Span attributes.
    pub attributes: BTreeMap<String, AttrValue>,
    /// Status code (`Unset` when no status was sent).
    pub status_code: StatusCode,
    /// Status message.
    pub status_message: String,
}

impl ReceivedSpan {
    /// A span attribute.
    pub fn attr(&self, key: &str) -> Option<&AttrValue> {
        self.attributes.get(key)
    }

    /// A string span attribute.
    pub fn attr_str(&self, key: &str) -> Option<&str> {
        self.attr(key).and_then(AttrValue::as_str)
    }

    /// An integer span attribute.
    pub fn attr_int(&self, key: &str) -> Option<i64> {
        self.attr(key).and_then(AttrValue::as_int)
    }

    /// A string resource attribute.
    pub fn resource_str(&self, key: &str) -> Option<&str> {
        self.resource.get(key).and_then(AttrValue::as_str)
    }

    /// An integer resource attribute.
    pub fn resource_int(&self, key: &str) -> Option<i64> {
        self.resource.get(key).and_then(AttrValue::as_int)
    }

    /// End minus start, in ns (0 if the span ends before it starts).
    pub fn duration_ns(&self) -> u64 {
        self.end_unix_ns.saturating_sub(self.start_unix_ns)
    }
}

/// Flattens requests into spans, in arrival order.
pub fn flatten(requests: &[ExportTraceServiceRequest]) -> Vec<ReceivedSpan> {
    let mut out = Vec::new();
    for rs in requests.iter().flat_map(|r| &r.resource_spans) {
        let resource = rs
            .resource
            .as_ref()
            .map(|r| attr_map(&r.attributes))
            .unwrap_or_default();
        for ss in &rs.scope_spans {
            let (scope_name, scope_version) = ss
                .scope
                .as_ref()
                .map(|s| (s.name.clone(), s.version.clone()))
                .unwrap_or_default();
            for s in &ss.spans {
                let status = s.status.as_ref();
                out.push(ReceivedSpan {
                    resource: resource.clone(),
                    scope_name: scope_name.clone(),
                    scope_version: scope_version.clone(),
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: (!s.parent_span_id.is_empty()).then(|| hex(&s.parent_span_id)),
                    trace_state: s.trace_state.clone(),
                    name: s.name.clone(),
                    kind: SpanKind::try_from(s.kind).unwrap_or(SpanKind::Unspecified),
                    start_unix_ns: s.start_time_unix_nano,
                    end_unix_ns: s.end_time_unix_nano,
                    attributes: attr_map(&s.attributes),
                    status_code: status
                        .and_then(|st| StatusCode::try_from(st.code).ok())
                        .unwrap_or(StatusCode::Unset),
                    status_message: status.map(|st| st.message.clone()).unwrap_or_default(),
                });
            }
        }
    }
    out
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

#[derive(Default)]
struct State {
    requests: Mutex<Vec<ReceivedRequest>>,
    fail_next: Mutex<usize>,
    /// OTLP/HTTP answers left that close their connection (`Connection: close`).
    close_next: Mutex<usize>,
}

impl State {
    fn requests(&self) -> MutexGuard<'_, Vec<ReceivedRequest>> {
        // A test that panicked while holding the lock must not hide what was received.
        self.requests.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `req` unless a failure is pending; `false` means answer with a retryable error.
    fn accept(&self, headers: &HeaderMap, body: ExportTraceServiceRequest) -> bool {
        {
            let mut fail = self.fail_next.lock().unwrap_or_else(|e| e.into_inner());
            if *fail > 0 {
                *fail -= 1;
                return false;
            }
        }
        let headers = headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        self.requests().push(ReceivedRequest { headers, body });
        true
    }
}

/// A local OTLP trace receiver; stops serving when dropped.
pub struct OtlpReceiver {
    addr: SocketAddr,
    protocol: &'static str,
    state: Arc<State>,
    server: JoinHandle<()>,
}

impl OtlpReceiver {
    /// Starts an OTLP/gRPC receiver on 127.0.0.1 (must run inside a tokio runtime).
    pub async fn start_grpc() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let svc = TraceServiceServer::new(GrpcService(Arc::clone(&state)))
            .max_decoding_message_size(MAX_BODY_BYTES);
        let server = tokio::spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            // Serving ends only when the task is aborted; an error here would show as missing spans.
            let _ = tonic::transport::Server::builder()
                .serve_with_incoming(svc, incoming)
                .await;
        });
        Ok(OtlpReceiver {
            addr,
            protocol: "grpc",
            state,
            server,
        })
    }

    /// Starts an OTLP/HTTP (protobuf) receiver on 127.0.0.1 serving `POST /v1/traces`.
    pub async fn start_http() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let accept_state = Arc::clone(&state);
        let server = tokio::spawn(async move {
            // Owned here so aborting the accept loop also ends every connection.
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let state = Arc::clone(&accept_state);
                let svc = service_fn(move |req| handle_http(Arc::clone(&state), req));
                connections.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(OtlpReceiver {
            addr,
            protocol: "http/protobuf",
            state,
            server,
        })
    }

    /// Base endpoint for `OTEL_EXPORTER_OTLP_ENDPOINT`, e.g. `http://127.0.0.1:41234`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Value for `OTEL_EXPORTER_OTLP_PROTOCOL`: `grpc` or `http/protobuf`.
    pub fn protocol(&self) -> &'static str {
        self.protocol
    }

    /// Every accepted export request so far.
    pub fn requests(&self) -> Vec<ReceivedRequest> {
        self.state.requests().clone()
    }

    /// Number of accepted export requests.
    pub fn requests_count(&self) -> usize {
        self.state.requests().len()
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        let bodies: Vec<ExportTraceServiceRequest> = self
            .state
            .requests()
            .iter()
            .map(|r| r.body.clone())
            .collect();
        flatten(&bodies)
    }

    /// Answers the next `n` export requests with a retryable error (gRPC UNAVAILABLE, HTTP 503)
    /// without recording them.
    pub fn fail_next(&self, n: usize) {
        *self
            .state
            .fail_next
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = n;
    }

    /// OTLP/HTTP only: answers the next `n` accepted export requests with `Connection: close`, so
    /// the exporter's connection ends after each.
    pub fn close_next(&self, n: usize) {
        *self
            .state
            .close_next
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = n;
    }

    /// Polls until `pred` holds for the spans received so far: `Ok(spans)`, or `Err(spans)` at timeout.
    pub async fn wait_for(
        &self,
        pred: impl Fn(&[ReceivedSpan]) -> bool,
        timeout: Duration,
    ) -> Result<Vec<ReceivedSpan>, Vec<ReceivedSpan>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if pred(&spans) {
                return Ok(spans);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(spans);
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

struct GrpcService(Arc<State>);

#[tonic::async_trait]
impl TraceService for GrpcService {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let (metadata, _, body) = request.into_parts();
        if self.0.accept(&metadata.into_headers(), body) {
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        } else {
            Err(tonic::Status::unavailable(
                "failure injected by the test receiver",
            ))
        }
    }
}

async fn handle_http(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::POST || req.uri().path() != "/v1/traces" {
        return Ok(reply(
            HttpStatus::NOT_FOUND,
            Bytes::from_static(b"only POST /v1/traces"),
        ));
    }
    let protobuf = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-protobuf"));
    if !protobuf {
        return Ok(reply(
            HttpStatus::UNSUPPORTED_MEDIA_TYPE,
            Bytes::from_static(b"expected application/x-protobuf"),
        ));
    }
    let (parts, body) = req.into_parts();
    let bytes = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(reply(
                HttpStatus::BAD_REQUEST,
                Bytes::from(format!("cannot read body: {e}")),
            ));
        }
    };
    let decoded = match ExportTraceServiceRequest::decode(bytes) {
        Ok(d) => d,
        Err(e) => {
            return Ok(reply(
                HttpStatus::BAD_REQUEST,
                Bytes::from(format!("not an ExportTraceServiceRequest: {e}")),
            ));
        }
    };
    if !state.accept(&parts.headers, decoded) {
        return Ok(reply(
            HttpStatus::SERVICE_UNAVAILABLE,
            Bytes::from_static(b"failure injected by the test receiver"),
        ));
    }
    let mut ok = reply(
        HttpStatus::OK,
        Bytes::from(ExportTraceServiceResponse::default().encode_to_vec()),
    );
    let mut close = state.close_next.lock().unwrap_or_else(|e| e.into_inner());
    if *close > 0 {
        *close -= 1;
        ok.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
    }
    Ok(ok)
}

fn reply(status: HttpStatus, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    if status == HttpStatus::OK {
        resp.headers_mut().insert(
            CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/x-protobuf"),
        );
    }
    resp
}
