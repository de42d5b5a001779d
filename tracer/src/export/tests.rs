//! Exporter tests against real collectors on 127.0.0.1: a minimal scripted HTTP/1.1 server and a tonic
//! gRPC server.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::header::{HeaderMap, HeaderValue};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::config::Endpoint;
use super::otlp::tests::{resource, span};
use super::*;

fn config(endpoint: Option<String>, protocol: Protocol) -> ExportConfig {
    ExportConfig {
        endpoint: endpoint.map(|e| Endpoint::base("test", &e).unwrap()),
        protocol,
        headers: HeaderMap::new(),
        timeout: Duration::from_secs(5),
        schedule_delay: Duration::from_secs(3600),
        max_export_batch_size: 512,
        max_queue_size: 2048,
    }
}

fn spans_in(req: &ExportTraceServiceRequest) -> usize {
    req.resource_spans
        .iter()
        .flat_map(|rs| &rs.scope_spans)
        .map(|ss| ss.spans.len())
        .sum()
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One request as the HTTP collector saw it.
struct HttpRequest {
    request_line: String,
    headers: Vec<(String, String)>,
    body: ExportTraceServiceRequest,
}

impl HttpRequest {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A scripted answer: status line code, extra header lines, body.
struct Reply(u16, &'static str, Vec<u8>);

/// An OTLP/HTTP collector answering from a script, then 200 with an empty body.
struct HttpCollector {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<HttpRequest>>>,
}

impl HttpCollector {
    async fn start(script: Vec<Reply>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let (seen2, script2) = (Arc::clone(&seen), Arc::clone(&script));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_http(stream, Arc::clone(&seen2), Arc::clone(&script2)));
            }
        });
        HttpCollector { addr, seen }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

async fn serve_http(
    stream: TcpStream,
    seen: Arc<Mutex<Vec<HttpRequest>>>,
    script: Arc<Mutex<VecDeque<Reply>>>,
) {
    let mut stream = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if stream.read_line(&mut request_line).await.unwrap_or(0) == 0 {
            return;
        }
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            stream.read_line(&mut line).await.unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (k, v) = line.split_once(':').unwrap();
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .map(|(_, v)| v.parse().unwrap())
            .unwrap_or(0);
        let mut body = vec![0; len];
        stream.read_exact(&mut body).await.unwrap();
        let body = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
        seen.lock().unwrap().push(HttpRequest {
            request_line: request_line.trim_end().to_string(),
            headers,
            body,
        });
        let Reply(code, extra, body) =
            script
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or(Reply(200, "", Vec::new()));
        let head = format!(
            "HTTP/1.1 {code} X\r\ncontent-length: {}\r\n{extra}\r\n",
            body.len()
        );
        stream.get_mut().write_all(head.as_bytes()).await.unwrap();
        stream.get_mut().write_all(&body).await.unwrap();
    }
}

#[derive(Default)]
struct GrpcState {
    script: Mutex<VecDeque<Result<ExportTraceServiceResponse, tonic::Status>>>,
    seen: Mutex<Vec<(tonic::metadata::MetadataMap, ExportTraceServiceRequest)>>,
}

#[derive(Clone, Default)]
struct GrpcCollector(Arc<GrpcState>);

#[tonic::async_trait]
impl TraceService for GrpcCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let (metadata, _, body) = request.into_parts();
        self.0.seen.lock().unwrap().push((metadata, body));
        let next = self.0.script.lock().unwrap().pop_front();
        next.unwrap_or_else(|| Ok(ExportTraceServiceResponse::default()))
            .map(tonic::Response::new)
    }
}

impl GrpcCollector {
    fn serve(&self, listener: TcpListener) {
        let svc = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .serve_with_incoming(svc, tonic::transport::server::TcpIncoming::from(listener)),
        );
    }
}

#[tokio::test]
async fn http_retries_transient_statuses_then_succeeds() {
    let collector = HttpCollector::start(vec![
        Reply(503, "", Vec::new()),
        Reply(429, "retry-after: 0\r\n", Vec::new()),
        Reply(502, "", Vec::new()),
    ])
    .await;
    let mut cfg = config(Some(collector.url()), Protocol::HttpProtobuf);
    cfg.headers
        .insert("x-api-key", HeaderValue::from_static("secret"));
    let retries_before = metrics::counter("export_retries_total", "");
    let (exporter, handle) = Exporter::start(cfg).unwrap();
    let res = resource("svc", 1);
    exporter.submit(span(1, &res));
    exporter.submit(span(2, &res));
    let stats = exporter.shutdown().await.unwrap();
    handle.await.unwrap();

    assert_eq!(stats.exported, 2);
    assert_eq!(stats.failed_batches, 0);
    let seen = collector.seen.lock().unwrap();
    assert_eq!(seen.len(), 4);
    for req in seen.iter() {
        assert_eq!(req.request_line, "POST /v1/traces HTTP/1.1");
        assert_eq!(req.header("content-type"), Some("application/x-protobuf"));
        assert_eq!(req.header("x-api-key"), Some("secret"));
        assert_eq!(spans_in(&req.body), 2);
    }
    assert!(metrics::counter("export_retries_total", "") >= retries_before + 3);
}

#[tokio::test]
async fn retry_after_beyond_the_deadline_gives_up_at_once() {
    let collector = HttpCollector::start(vec![Reply(
        503,
        "retry-after: 18446744073709551615\r\n",
        Vec::new(),
    )])
    .await;
    let cfg = config(Some(collector.url()), Protocol::HttpProtobuf);
    let (exporter, _handle) = Exporter::start(cfg).unwrap();
    exporter.submit(span(1, &resource("svc", 1)));
    let started = Instant::now();
    let stats = exporter.shutdown().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(collector.count(), 1);
    assert_eq!(stats.dropped_export_failed, 1);
}

#[tokio::test]
async fn http_permanent_error_is_not_retried() {
    let collector = HttpCollector::start(vec![Reply(400, "", Vec::new())]).await;
    let cfg = config(Some(collector.url()), Protocol::HttpProtobuf);
    let failed_before = metrics::counter("spans_dropped_total", "reason=\"export_failed\"");
    let (exporter, _handle) = Exporter::start(cfg).unwrap();
    let res = resource("svc", 1);
    for n in 0..3 {
        exporter.submit(span(n, &res));
    }
    let stats = exporter.shutdown().await.unwrap();
    assert_eq!(collector.count(), 1);
    assert_eq!(stats.exported, 0);
    assert_eq!(stats.failed_batches, 1);
    assert_eq!(stats.dropped_export_failed, 3);
    assert!(
        metrics::counter("spans_dropped_total", "reason=\"export_failed\"") >= failed_before + 3
    );
    assert!(metrics::counter("export_failures_total", "reason=\"http_status\"") >= 1);
}

#[tokio::test]
async fn partial_success_counts_rejected_spans() {
    let resp = ExportTraceServiceResponse {
        partial_success: Some(ExportTracePartialSuccess {
            rejected_spans: 1,
            error_message: "too old".into(),
        }),
    };
    let collector = HttpCollector::start(vec![Reply(200, "", resp.encode_to_vec())]).await;
    let cfg = config(Some(collector.url()), Protocol::HttpProtobuf);
    let (exporter, _handle) = Exporter::start(cfg).unwrap();
    let res = resource("svc", 1);
    exporter.submit(span(1, &res));
    exporter.submit(span(2, &res));
    let stats = exporter.shutdown().await.unwrap();
    assert_eq!((stats.exported, stats.rejected), (1, 1));
}

#[tokio::test]
async fn unreachable_collector_fails_within_timeout() {
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let mut cfg = config(Some(format!("http://{addr}")), Protocol::HttpProtobuf);
    cfg.timeout = Duration::from_millis(700);
    let (exporter, _handle) = Exporter::start(cfg).unwrap();
    exporter.submit(span(1, &resource("svc", 1)));
    let started = Instant::now();
    let stats = exporter.shutdown().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(stats.dropped_export_failed, 1);
    assert_eq!(stats.exported, 0);
}

#[tokio::test]
async fn batches_split_at_max_size_and_flush_on_shutdown() {
    let collector = HttpCollector::start(Vec::new()).await;
    let mut cfg = config(Some(collector.url()), Protocol::HttpProtobuf);
    cfg.max_export_batch_size = 3;
    let (exporter, _handle) = Exporter::start(cfg).unwrap();
    let res = resource("svc", 1);
    for n in 0..7 {
        exporter.submit(span(n, &res));
    }
    eventually("two full batches", || collector.count() == 2).await;
    // The seventh span waits for the schedule delay (an hour) or shutdown.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(collector.count(), 2);
    let stats = exporter.shutdown().await.unwrap();
    assert_eq!(stats.exported, 7);
    let sizes: Vec<usize> = collector
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|r| spans_in(&r.body))
        .collect();
    assert_eq!(sizes, vec![3, 3, 1]);
}

#[tokio::test]
async fn schedule_delay_sends_partial_batch() {
    let collector = HttpCollector::start(Vec::new()).await;
    let mut cfg = config(Some(collector.url()), Protocol::HttpProtobuf);
    cfg.schedule_delay = Duration::from_millis(50);
    let (exporter, _handle) = Exporter::start(cfg).unwrap();
    exporter.submit(span(1, &resource("svc", 1)));
    eventually("the delayed batch", || collector.count() == 1).await;
    exporter.submit(span(2, &resource("svc", 1)));
    eventually("a second delayed batch", || collector.count() == 2).await;
    assert_eq!(exporter.shutdown().await.unwrap().exported, 2);
}

#[tokio::test]
async fn dropping_every_handle_still_flushes() {
    let collector = HttpCollector::start(Vec::new()).await;
    let cfg = config(Some(collector.url()), Protocol::HttpProtobuf);
    let (exporter, handle) = Exporter::start(cfg).unwrap();
    let second = exporter.clone();
    exporter.submit(span(1, &resource("svc", 1)));
    second.submit(span(2, &resource("svc", 1)));
    drop((exporter, second));
    handle.await.unwrap();
    assert_eq!(
        collector
            .seen
            .lock()
            .unwrap()
            .iter()
            .map(|r| spans_in(&r.body))
            .sum::<usize>(),
        2
    );
}

#[tokio::test]
async fn queue_overflow_drops_and_counts() {
    let (w, mut r) = tokio::io::duplex(1 << 20);
    let mut cfg = config(None, Protocol::HttpProtobuf);
    cfg.max_queue_size = 4;
    let before = metrics::counter("spans_dropped_total", "reason=\"queue_full\"");
    let (exporter, _handle) = Exporter::spawn(&cfg, Sink::Stdout(LineWriter::new(Box::new(w))));
    let res = resource("svc", 1);
    // The current-thread runtime does not run the export task before the next await.
    for n in 0..10 {
        exporter.submit(span(n, &res));
    }
    let stats = exporter.shutdown().await.unwrap();
    assert_eq!(stats.dropped_queue_full, 6);
    assert_eq!(stats.exported, 4);
    assert!(metrics::counter("spans_dropped_total", "reason=\"queue_full\"") >= before + 6);
    let mut buf = vec![0; 1 << 20];
    let n = r.read(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    let names: Vec<&str> = text.lines().map(|l| l.split('"').nth(1).unwrap()).collect();
    assert_eq!(
        names,
        ["GET /item/0", "GET /item/1", "GET /item/2", "GET /item/3"]
    );
}

#[tokio::test]
async fn a_batch_larger_than_the_room_keeps_its_first_spans() {
    let (w, mut r) = tokio::io::duplex(1 << 20);
    let mut cfg = config(None, Protocol::HttpProtobuf);
    cfg.max_queue_size = 4;
    let (exporter, _handle) = Exporter::spawn(&cfg, Sink::Stdout(LineWriter::new(Box::new(w))));
    let res = resource("svc", 1);
    exporter.submit(span(0, &res));
    let mut batch: Vec<Span> = (1..6).map(|n| span(n, &res)).collect();
    exporter.submit_all(&mut batch);
    assert!(batch.is_empty());
    // At shutdown the bound does not apply.
    exporter.submit_unbounded((6..12).map(|n| span(n, &res)).collect());
    let stats = exporter.shutdown().await.unwrap();
    assert_eq!((stats.exported, stats.dropped_queue_full), (10, 2));
    let mut buf = vec![0; 1 << 20];
    let n = r.read(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    let ids: Vec<&str> = text
        .lines()
        .map(|l| {
            l.split('"')
                .nth(1)
                .unwrap()
                .trim_start_matches("GET /item/")
        })
        .collect();
    assert_eq!(ids, ["0", "1", "2", "3", "6", "7", "8", "9", "10", "11"]);
}

#[tokio::test]
async fn submit_after_shutdown_is_counted() {
    let (w, _r) = tokio::io::duplex(1 << 16);
    let cfg = config(None, Protocol::HttpProtobuf);
    let (exporter, handle) = Exporter::spawn(&cfg, Sink::Stdout(LineWriter::new(Box::new(w))));
    assert!(exporter.shutdown().await.is_some());
    handle.await.unwrap();
    let before = metrics::counter("spans_dropped_total", "reason=\"shutdown\"");
    exporter.submit(span(1, &resource("svc", 1)));
    assert!(metrics::counter("spans_dropped_total", "reason=\"shutdown\"") > before);
    assert_eq!(exporter.shutdown().await, None);
}

#[tokio::test]
async fn grpc_retries_unavailable_sends_metadata_and_groups() {
    let collector = GrpcCollector::default();
    collector.0.script.lock().unwrap().extend([
        Err(tonic::Status::unavailable("warming up")),
        Ok(ExportTraceServiceResponse {
            partial_success: Some(ExportTracePartialSuccess {
                rejected_spans: 1,
                error_message: "bad span".into(),
            }),
        }),
    ]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    collector.serve(listener);

    let mut cfg = config(Some(format!("http://{addr}/ignored/path")), Protocol::Grpc);
    cfg.headers
        .insert("x-api-key", HeaderValue::from_static("secret"));
    let (exporter, _handle) = Exporter::start(cfg).unwrap();
    let (a, b) = (resource("a", 1), resource("b", 2));
    exporter.submit(span(1, &a));
    exporter.submit(span(2, &b));
    exporter.submit(span(3, &a));
    let stats = exporter.shutdown().await.unwrap();

    assert_eq!(
        (stats.exported, stats.rejected, stats.failed_batches),
        (2, 1, 0)
    );
    let seen = collector.0.seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    for (metadata, req) in seen.iter() {
        assert_eq!(metadata.get("x-api-key").unwrap(), "secret");
        assert_eq!(req.resource_spans.len(), 2);
        assert_eq!(spans_in(req), 3);
    }
}

#[tokio::test]
async fn grpc_permanent_status_is_not_retried() {
    let collector = GrpcCollector::default();
    collector
        .0
        .script
        .lock()
        .unwrap()
        .push_back(Err(tonic::Status::invalid_argument("nope")));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    collector.serve(listener);
    let cfg = config(Some(format!("http://{addr}")), Protocol::Grpc);
    let (exporter, _handle) = Exporter::start(cfg).unwrap();
    exporter.submit(span(1, &resource("a", 1)));
    let stats = exporter.shutdown().await.unwrap();
    assert_eq!((stats.exported, stats.dropped_export_failed), (0, 1));
    assert_eq!(collector.0.seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn grpc_connects_lazily_and_retries_refused_connections() {
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let cfg = config(Some(format!("http://{addr}")), Protocol::Grpc);
    let (exporter, _handle) = Exporter::start(cfg).unwrap();
    exporter.submit(span(1, &resource("a", 1)));
    let collector = GrpcCollector::default();
    let late = collector.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        late.serve(TcpListener::bind(addr).await.unwrap());
    });
    let stats = exporter.shutdown().await.unwrap();
    assert_eq!(stats.exported, 1, "{stats:?}");
    assert_eq!(collector.0.seen.lock().unwrap().len(), 1);
}

#[test]
fn sent_payload_buffers_are_reclaimed() {
    let mut buf = bytes::BytesMut::new();
    otlp::RequestEncoder::default().encode(&[span(1, &resource("svc", 1))], &mut buf);
    let (ptr, len) = (buf.as_ptr(), buf.len());
    let payload = buf.freeze();
    let still_sending = payload.clone();
    assert!(reclaim(payload).is_none());
    let buf = reclaim(still_sending).expect("last handle");
    assert!(buf.is_empty());
    assert!(buf.capacity() >= len);
    assert_eq!(buf.as_ptr(), ptr, "same allocation");
}

#[test]
fn warnings_are_rate_limited() {
    let mut limiter = WarnLimiter::default();
    let mut logged = Vec::new();
    limiter.note(5, |s| logged.push(s));
    limiter.note(7, |s| logged.push(s));
    limiter.note(1, |s| logged.push(s));
    assert_eq!(logged, vec![0]);
    assert_eq!(limiter.suppressed_spans, 8);
}
