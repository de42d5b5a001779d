//! OTLP/gRPC and OTLP/HTTP clients, with retries inside the per-batch deadline.

use std::time::Duration;

use bytes::{BufMut as _, Bytes};
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER, USER_AGENT};
use hyper::{Method, Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message as _;
use tokio::time::Instant;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::{Code, GrpcMethod, Status};

use super::config::ConfigError;
use crate::metrics;

/// First retry delay; doubled per attempt up to [`MAX_BACKOFF`], with ±50% jitter.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Attempts per batch, the first included; the batch deadline usually ends retries earlier.
const MAX_ATTEMPTS: u32 = 6;
/// Collector responses are small; anything bigger is not read (it comes from the network).
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
const AGENT: &str = concat!("tracer/", env!("CARGO_PKG_VERSION"));
/// The OTLP trace service.
const GRPC_SERVICE: &str = "opentelemetry.proto.collector.trace.v1.TraceService";
/// Its one method.
const GRPC_METHOD: &str = "Export";
/// The method's HTTP/2 path.
const GRPC_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// gRPC message header: compression flag and length.
const GRPC_HEADER_BYTES: usize = 5;

/// Why a batch could not be delivered.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExportError {
    #[error("timed out")]
    Timeout,
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("HTTP request failed: {0}")]
    Http(String),
    #[error("collector answered HTTP {0}")]
    HttpStatus(u16),
    #[error("collector answered gRPC {code:?}: {message}")]
    Grpc { code: Code, message: String },
    #[error("cannot write spans: {0}")]
    Io(#[from] std::io::Error),
}

impl ExportError {
    /// Label set of `export_failures_total`.
    pub(crate) fn reason_label(&self) -> &'static str {
        match self {
            ExportError::Timeout => "reason=\"timeout\"",
            ExportError::Connect(_) => "reason=\"connect\"",
            ExportError::Http(_) => "reason=\"http_error\"",
            ExportError::HttpStatus(_) => "reason=\"http_status\"",
            ExportError::Grpc {
                code: Code::Unavailable,
                ..
            } => "reason=\"grpc_unavailable\"",
            ExportError::Grpc { .. } => "reason=\"grpc_status\"",
            ExportError::Io(_) => "reason=\"io\"",
        }
    }
}

/// What the collector accepted.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Accepted {
    /// Spans it reported as rejected (OTLP partial success).
    pub(crate) rejected: u64,
    /// Its explanation, when it rejected any.
    pub(crate) message: String,
}

impl Accepted {
    fn from_response(resp: &ExportTraceServiceResponse) -> Self {
        match &resp.partial_success {
            Some(p) => Accepted {
                rejected: u64::try_from(p.rejected_spans).unwrap_or(0),
                message: p.error_message.clone(),
            },
            None => Accepted::default(),
        }
    }
}

/// A failed attempt and whether to try again (with the server's requested delay, if any).
struct Failure {
    error: ExportError,
    retry: Option<Option<Duration>>,
}

impl Failure {
    fn permanent(error: ExportError) -> Self {
        Failure { error, retry: None }
    }
    fn transient(error: ExportError, after: Option<Duration>) -> Self {
        Failure {
            error,
            retry: Some(after),
        }
    }
}

/// One protocol's single request, carrying an encoded `ExportTraceServiceRequest`.
trait Attempt {
    async fn attempt(&mut self, payload: &Bytes, remaining: Duration) -> Result<Accepted, Failure>;
}

/// A connected (lazily) OTLP client. Clones share the connection (pool).
#[derive(Clone)]
pub(crate) enum Transport {
    Grpc(Box<GrpcClient>),
    Http(Box<HttpClient>),
}

impl Transport {
    /// gRPC client for `origin` (`http://host:port`).
    pub(crate) fn grpc(
        origin: &str,
        headers: &HeaderMap,
        timeout: Duration,
    ) -> Result<Self, ConfigError> {
        let invalid = |e: tonic::transport::Error| ConfigError::Invalid {
            var: "OTLP endpoint".into(),
            value: origin.into(),
            reason: e.to_string(),
        };
        let endpoint = tonic::transport::Endpoint::from_shared(origin.to_string())
            .map_err(invalid)?
            .user_agent(AGENT)
            .map_err(invalid)?
            .connect_timeout(timeout)
            .tcp_nodelay(true);
        // The endpoint's own connector with these settings, recording each connection (`own`).
        let mut connector = HttpConnector::new();
        connector.enforce_http(false);
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        let channel = endpoint.connect_with_connector_lazy(super::own::Recording::new(connector));
        let client = tonic::client::Grpc::new(channel);
        Ok(Transport::Grpc(Box::new(GrpcClient {
            client,
            metadata: MetadataMap::from_headers(headers.clone()),
        })))
    }

    /// HTTP/protobuf client posting to `url`.
    pub(crate) fn http(
        url: &str,
        headers: &HeaderMap,
        timeout: Duration,
    ) -> Result<Self, ConfigError> {
        let uri: Uri =
            url.parse()
                .map_err(|e: hyper::http::uri::InvalidUri| ConfigError::Invalid {
                    var: "OTLP endpoint".into(),
                    value: url.into(),
                    reason: e.to_string(),
                })?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        let client =
            Client::builder(TokioExecutor::new()).build(super::own::Recording::new(connector));
        Ok(Transport::Http(Box::new(HttpClient {
            client,
            uri,
            headers: headers.clone(),
        })))
    }

    /// Sends `payload`, a protobuf-encoded `ExportTraceServiceRequest`, retrying transient failures
    /// until `deadline`.
    pub(crate) async fn export(
        &mut self,
        payload: &Bytes,
        deadline: Instant,
    ) -> Result<Accepted, ExportError> {
        match self {
            Transport::Grpc(c) => with_retry(c.as_mut(), payload, deadline).await,
            Transport::Http(c) => with_retry(c.as_mut(), payload, deadline).await,
        }
    }
}

async fn with_retry<T: Attempt>(
    client: &mut T,
    payload: &Bytes,
    deadline: Instant,
) -> Result<Accepted, ExportError> {
    let mut backoff = INITIAL_BACKOFF;
    let mut attempt = 1;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(ExportError::Timeout);
        }
        let failure =
            match tokio::time::timeout(remaining, client.attempt(payload, remaining)).await {
                Err(_) => return Err(ExportError::Timeout),
                Ok(Ok(accepted)) => return Ok(accepted),
                Ok(Err(failure)) => failure,
            };
        let Some(hint) = failure.retry else {
            return Err(failure.error);
        };
        if attempt >= MAX_ATTEMPTS {
            return Err(failure.error);
        }
        let wait = hint.unwrap_or_else(|| backoff.mul_f64(rand::random_range(0.5..1.5)));
        // Compared as durations: a server-sent Retry-After can be large enough to overflow an Instant.
        if wait >= deadline.saturating_duration_since(Instant::now()) {
            return Err(failure.error);
        }
        tracing::debug!(error = %failure.error, attempt, wait_ms = wait.as_millis() as u64, "retrying span export");
        metrics::add("export_retries_total", "", 1);
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
        attempt += 1;
    }
}

/// OTLP/gRPC over a lazily connected tonic channel.
#[derive(Clone)]
pub(crate) struct GrpcClient {
    client: tonic::client::Grpc<Channel>,
    metadata: MetadataMap,
}

impl GrpcClient {
    /// One unary `TraceService/Export` call with the already encoded request.
    async fn call(
        &mut self,
        payload: &Bytes,
        remaining: Duration,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, Status> {
        // As tonic's generated client does: a channel that cannot take requests is an Unknown status.
        self.client
            .ready()
            .await
            .map_err(|e| Status::unknown(format!("Service was not ready: {e}")))?;
        let mut req = tonic::Request::new(payload.clone());
        *req.metadata_mut() = self.metadata.clone();
        req.set_timeout(remaining);
        req.extensions_mut()
            .insert(GrpcMethod::new(GRPC_SERVICE, GRPC_METHOD));
        let codec = PreEncodedCodec { len: payload.len() };
        self.client
            .unary(req, PathAndQuery::from_static(GRPC_PATH), codec)
            .await
    }
}

impl Attempt for GrpcClient {
    async fn attempt(&mut self, payload: &Bytes, remaining: Duration) -> Result<Accepted, Failure> {
        match self.call(payload, remaining).await {
            Ok(resp) => Ok(Accepted::from_response(resp.get_ref())),
            Err(status) => {
                let error = ExportError::Grpc {
                    code: status.code(),
                    message: status.message().to_string(),
                };
                // The OTLP specification's retryable codes.
                let retryable = matches!(
                    status.code(),
                    Code::Cancelled
                        | Code::DeadlineExceeded
                        | Code::ResourceExhausted
                        | Code::Aborted
                        | Code::OutOfRange
                        | Code::Unavailable
                        | Code::DataLoss
                );
                Err(if retryable {
                    Failure::transient(error, None)
                } else {
                    Failure::permanent(error)
                })
            }
        }
    }
}

/// gRPC codec of `TraceService/Export` for a request that is already protobuf-encoded: the request
/// bytes go out as they are, the response is decoded with prost.
struct PreEncodedCodec {
    /// Length of the request, to size tonic's send buffer at once.
    len: usize,
}

impl Codec for PreEncodedCodec {
    type Encode = Bytes;
    type Decode = ExportTraceServiceResponse;
    type Encoder = PassThroughEncoder;
    type Decoder = ResponseDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        PassThroughEncoder {
            buffer_size: self.len + GRPC_HEADER_BYTES,
        }
    }

    fn decoder(&mut self) -> Self::Decoder {
        ResponseDecoder
    }
}

/// Writes encoded request bytes as they are.
struct PassThroughEncoder {
    /// Initial capacity of tonic's buffer for the message.
    buffer_size: usize,
}

impl Encoder for PassThroughEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        // The yield threshold only matters to streams; this is tonic's default.
        BufferSettings::new(self.buffer_size, 32 * 1024)
    }
}

/// Decodes the collector's `ExportTraceServiceResponse`.
struct ResponseDecoder;

impl Decoder for ResponseDecoder {
    type Item = ExportTraceServiceResponse;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        ExportTraceServiceResponse::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(format!("cannot decode the export response: {e}")))
    }
}

/// OTLP/HTTP with protobuf bodies over hyper's pooled HTTP/1.1 client.
#[derive(Clone)]
pub(crate) struct HttpClient {
    client: Client<super::own::Recording, Full<Bytes>>,
    uri: Uri,
    headers: HeaderMap,
}

impl Attempt for HttpClient {
    async fn attempt(
        &mut self,
        payload: &Bytes,
        _remaining: Duration,
    ) -> Result<Accepted, Failure> {
        let mut req = Request::new(Full::new(payload.clone()));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = self.headers.clone();
        req.headers_mut().insert(
            CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/x-protobuf"),
        );
        req.headers_mut()
            .insert(USER_AGENT, hyper::header::HeaderValue::from_static(AGENT));

        let resp = self.client.request(req).await.map_err(|e| {
            let error = if e.is_connect() {
                ExportError::Connect(error_chain(&e))
            } else {
                ExportError::Http(error_chain(&e))
            };
            Failure::transient(error, None)
        })?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // Reading the body lets the connection be reused; its content only matters on success.
        let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map(|b| b.to_bytes());
        if status.is_success() {
            let accepted = body
                .ok()
                .and_then(|b| ExportTraceServiceResponse::decode(b).ok())
                .map(|r| Accepted::from_response(&r))
                .unwrap_or_default();
            return Ok(accepted);
        }
        let error = ExportError::HttpStatus(status.as_u16());
        Err(match status.as_u16() {
            429 | 502 | 503 | 504 => Failure::transient(error, retry_after),
            _ => Failure::permanent(error),
        })
    }
}

/// The error and its causes on one line (hyper's top-level message alone says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}
