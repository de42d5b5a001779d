//! `otlp-count`: an OTLP/HTTP (protobuf) trace receiver for benchmarks that only counts spans, per
//! `service.name` and span kind, without decoding whole messages or keeping them.
//!
//! ```text
//! otlp-count [--listen 127.0.0.1:PORT]
//! ```
//!
//! Prints `listening on ADDR` once it accepts connections. `POST /v1/traces` takes exports;
//! `GET /counts` answers the totals so far as JSON:
//! `{"requests":N,"spans":N,"rejected":N,"services":{"nginx":{"server":N,"client":N,"other":N}}}`.
//! SIGTERM or SIGINT print the same JSON on stdout and exit.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

/// Largest export body read.
const MAX_BODY_BYTES: usize = 64 << 20;
/// OTLP `SpanKind` values counted on their own.
const KIND_SERVER: u64 = 2;
const KIND_CLIENT: u64 = 3;

/// Spans of one service by kind: server, client, everything else.
type KindCounts = [u64; 3];

/// Totals over every accepted export.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Totals {
    requests: u64,
    spans: u64,
    rejected: u64,
    services: BTreeMap<String, KindCounts>,
}

impl Totals {
    fn to_json(&self) -> String {
        let mut s = format!(
            "{{\"requests\":{},\"spans\":{},\"rejected\":{},\"services\":{{",
            self.requests, self.spans, self.rejected
        );
        for (i, (name, [server, client, other])) in self.services.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            let _ = write!(
                s,
                "{sep}\"{}\":{{\"server\":{server},\"client\":{client},\"other\":{other}}}",
                json_escape(name)
            );
        }
        s.push_str("}}");
        s
    }
}

fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

/// Why an export body could not be walked.
#[derive(Debug, PartialEq, Eq)]
enum WireError {
    Truncated,
    BadWireType(u64),
}

/// One protobuf field: number and value (only the shapes OTLP traces use).
enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// Iterates over the fields of one protobuf message.
struct Fields<'a> {
    buf: &'a [u8],
}

fn varint(buf: &mut &[u8]) -> Result<u64, WireError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first().ok_or(WireError::Truncated)?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(WireError::Truncated)
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], WireError> {
    if buf.len() < n {
        return Err(WireError::Truncated);
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Value<'a>), WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        let field = (|| {
            let key = varint(&mut self.buf)?;
            let value = match key & 7 {
                0 => Value::Varint(varint(&mut self.buf)?),
                1 => {
                    take(&mut self.buf, 8)?;
                    Value::Fixed
                }
                2 => {
                    let len = usize::try_from(varint(&mut self.buf)?)
                        .map_err(|_| WireError::Truncated)?;
                    Value::Bytes(take(&mut self.buf, len)?)
                }
                5 => {
                    take(&mut self.buf, 4)?;
                    Value::Fixed
                }
                t => return Err(WireError::BadWireType(t)),
            };
            Ok((key >> 3, value))
        })();
        if field.is_err() {
            // Stop after the first error rather than reading garbage as fields.
            self.buf = &[];
        }
        Some(field)
    }
}

fn fields(buf: &[u8]) -> Fields<'_> {
    Fields { buf }
}

/// The `service.name` string in an encoded `Resource`, if any.
fn service_name(resource: &[u8]) -> Result<Option<String>, WireError> {
    for f in fields(resource) {
        let (1, Value::Bytes(kv)) = f? else { continue };
        let mut key: &[u8] = &[];
        let mut value: &[u8] = &[];
        for f in fields(kv) {
            match f? {
                (1, Value::Bytes(k)) => key = k,
                (2, Value::Bytes(v)) => value = v,
                _ => {}
            }
        }
        if key != b"service.name" {
            continue;
        }
        for f in fields(value) {
            if let (1, Value::Bytes(s)) = f? {
                return Ok(Some(String::from_utf8_lossy(s).into_owned()));
            }
        }
    }
    Ok(None)
}

/// Counts the spans of an encoded `ExportTraceServiceRequest` by service and kind.
fn count_spans(body: &[u8]) -> Result<BTreeMap<String, KindCounts>, WireError> {
    let mut out: BTreeMap<String, KindCounts> = BTreeMap::new();
    for f in fields(body) {
        let (1, Value::Bytes(resource_spans)) = f? else {
            continue;
        };
        let mut service = None;
        let mut counts = KindCounts::default();
        for f in fields(resource_spans) {
            match f? {
                (1, Value::Bytes(resource)) => service = service_name(resource)?,
                (2, Value::Bytes(scope_spans)) => {
                    for f in fields(scope_spans) {
                        let (2, Value::Bytes(span)) = f? else {
                            continue;
                        };
                        let mut kind = 0;
                        for f in fields(span) {
                            if let (6, Value::Varint(k)) = f? {
                                kind = k;
                            }
                        }
                        let slot = match kind {
                            KIND_SERVER => 0,
                            KIND_CLIENT => 1,
                            _ => 2,
                        };
                        counts[slot] += 1;
                    }
                }
                _ => {}
            }
        }
        let entry = out
            .entry(service.unwrap_or_else(|| "?".to_owned()))
            .or_default();
        for (total, n) in entry.iter_mut().zip(counts) {
            *total += n;
        }
    }
    Ok(out)
}

#[derive(Default)]
struct State(Mutex<Totals>);

impl State {
    fn totals(&self) -> MutexGuard<'_, Totals> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/counts") => {
            let json = state.totals().to_json();
            let mut resp = reply(StatusCode::OK, Bytes::from(json));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            Ok(resp)
        }
        (&Method::POST, "/v1/traces") => {
            let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    state.totals().rejected += 1;
                    return Ok(reply(StatusCode::BAD_REQUEST, Bytes::new()));
                }
            };
            match count_spans(&body) {
                Ok(counts) => {
                    let mut totals = state.totals();
                    totals.requests += 1;
                    for (service, c) in counts {
                        totals.spans += c.iter().sum::<u64>();
                        let entry = totals.services.entry(service).or_default();
                        for (total, n) in entry.iter_mut().zip(c) {
                            *total += n;
                        }
                    }
                    drop(totals);
                    // An empty body is a valid, empty ExportTraceServiceResponse.
                    let mut resp = reply(StatusCode::OK, Bytes::new());
                    resp.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("application/x-protobuf"),
                    );
                    Ok(resp)
                }
                Err(_) => {
                    state.totals().rejected += 1;
                    Ok(reply(StatusCode::BAD_REQUEST, Bytes::new()))
                }
            }
        }
        _ => Ok(reply(StatusCode::NOT_FOUND, Bytes::new())),
    }
}

fn reply(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp
}

fn listen_addr() -> Result<SocketAddr, String> {
    let mut args = std::env::args().skip(1);
    let mut addr: SocketAddr = ([127, 0, 0, 1], 0).into();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                let v = args.next().ok_or("--listen needs ADDR")?;
                addr = v.parse().map_err(|e| format!("--listen {v}: {e}"))?;
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    // Benchmarks only ever talk to this machine.
    if !addr.ip().is_loopback() {
        return Err(format!("{addr} is not a loopback address"));
    }
    Ok(addr)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = listen_addr()?;
    // One thread: the receiver shares the benchmark machine's cores with what it measures.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(addr).await?;
        println!("listening on {}", listener.local_addr()?);
        let state = Arc::new(State::default());
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let state = Arc::clone(&state);
                    let svc = service_fn(move |req| handle(Arc::clone(&state), req));
                    tokio::spawn(async move {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
            }
        }
        println!("{}", state.totals().to_json());
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use integration::opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use integration::opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
    use integration::opentelemetry_proto::tonic::resource::v1::Resource;
    use integration::opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    use prost::Message as _;

    fn resource_spans(service: Option<&str>, kinds: &[i32]) -> ResourceSpans {
        let attributes = service
            .map(|s| {
                vec![
                    KeyValue {
                        key: "process.pid".into(),
                        value: Some(AnyValue {
                            value: Some(any_value::Value::IntValue(7)),
                        }),
                        ..Default::default()
                    },
                    KeyValue {
                        key: "service.name".into(),
                        value: Some(AnyValue {
                            value: Some(any_value::Value::StringValue(s.into())),
                        }),
                        ..Default::default()
                    },
                ]
            })
            .unwrap_or_default();
        ResourceSpans {
            resource: Some(Resource {
                attributes,
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans: kinds
                    .iter()
                    .map(|&kind| Span {
                        name: "GET /".into(),
                        kind,
                        trace_id: vec![1; 16],
                        span_id: vec![2; 8],
                        start_time_unix_nano: 1,
                        end_time_unix_nano: 2,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn counts_spans_by_service_and_kind() {
        let req = ExportTraceServiceRequest {
            resource_spans: vec![
                resource_spans(Some("nginx"), &[2, 2, 3]),
                resource_spans(Some("wrk"), &[3, 1]),
                resource_spans(Some("nginx"), &[2]),
                resource_spans(None, &[5]),
            ],
        };
        let counts = count_spans(&req.encode_to_vec()).expect("valid request");
        assert_eq!(counts.get("nginx"), Some(&[3, 1, 0]));
        assert_eq!(counts.get("wrk"), Some(&[0, 1, 1]));
        assert_eq!(counts.get("?"), Some(&[0, 0, 1]));
        assert_eq!(counts.len(), 3);
    }

    #[test]
    fn truncated_body_is_an_error() {
        let req = ExportTraceServiceRequest {
            resource_spans: vec![resource_spans(Some("nginx"), &[2, 2])],
        };
        let bytes = req.encode_to_vec();
        for cut in 1..bytes.len() {
            assert!(
                count_spans(&bytes[..cut]).is_err(),
                "a body cut at {cut} of {} bytes was accepted",
                bytes.len()
            );
        }
    }

    #[test]
    fn bad_wire_type_is_an_error() {
        // Field 1 with wire type 7, which does not exist.
        assert_eq!(count_spans(&[0x0f]), Err(WireError::BadWireType(7)));
    }

    #[test]
    fn json_lists_services() {
        let mut totals = Totals {
            requests: 2,
            spans: 3,
            ..Default::default()
        };
        totals.services.insert("a\"b".into(), [1, 2, 0]);
        assert_eq!(
            totals.to_json(),
            r#"{"requests":2,"spans":3,"rejected":0,"services":{"a\"b":{"server":1,"client":2,"other":0}}}"#
        );
    }
}
