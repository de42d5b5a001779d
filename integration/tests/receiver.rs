//! The test receiver, driven by a plain tonic client and hand-written HTTP/1.1 requests.

use std::time::Duration;

use integration::{AttrValue, OtlpReceiver, SpanKind, StatusCode};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, InstrumentationScope, KeyValue, any_value,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind as Kind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode as Code;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn str_kv(key: &str, value: &str) -> KeyValue {
    kv(key, any_value::Value::StringValue(value.into()))
}

fn resource_spans(service: &str, spans: Vec<Span>) -> ResourceSpans {
    ResourceSpans {
        resource: Some(Resource {
            attributes: vec![
                str_kv("service.name", service),
                kv("process.pid", any_value::Value::IntValue(42)),
            ],
            ..Default::default()
        }),
        scope_spans: vec![ScopeSpans {
            scope: Some(InstrumentationScope {
                name: "tracer".into(),
                version: "9.9".into(),
                ..Default::default()
            }),
            spans,
            schema_url: String::new(),
        }],
        schema_url: String::new(),
    }
}

/// Two resources: a SERVER root span with an error, and a CLIENT child with typed attributes.
fn sample_request() -> ExportTraceServiceRequest {
    let server = Span {
        trace_id: vec![0xab; 16],
        span_id: vec![0x01; 8],
        name: "GET /users/{id}".into(),
        kind: Kind::Server as i32,
        start_time_unix_nano: 1_000,
        end_time_unix_nano: 5_000,
        attributes: vec![
            str_kv("url.path", "/users/7"),
            kv("http.response.status_code", any_value::Value::IntValue(500)),
        ],
        status: Some(Status {
            code: Code::Error as i32,
            message: "boom".into(),
        }),
        ..Default::default()
    };
    let client = Span {
        trace_id: vec![0xab; 16],
        span_id: vec![0x02; 8],
        parent_span_id: vec![0x01; 8],
        trace_state: "k=v".into(),
        name: "SELECT".into(),
        kind: Kind::Client as i32,
        start_time_unix_nano: 2_000,
        end_time_unix_nano: 3_000,
        attributes: vec![
            kv("ok", any_value::Value::BoolValue(true)),
            kv("ratio", any_value::Value::DoubleValue(0.25)),
            kv(
                "list",
                any_value::Value::ArrayValue(ArrayValue {
                    values: vec![AnyValue {
                        value: Some(any_value::Value::IntValue(1)),
                    }],
                }),
            ),
        ],
        ..Default::default()
    };
    ExportTraceServiceRequest {
        resource_spans: vec![
            resource_spans("frontend", vec![server]),
            resource_spans("db-client", vec![client]),
        ],
    }
}

fn check_sample_spans(receiver: &OtlpReceiver) {
    let spans = receiver.spans();
    assert_eq!(spans.len(), 2);
    let server = &spans[0];
    assert_eq!(server.resource_str("service.name"), Some("frontend"));
    assert_eq!(server.resource_int("process.pid"), Some(42));
    assert_eq!(
        (server.scope_name.as_str(), server.scope_version.as_str()),
        ("tracer", "9.9")
    );
    assert_eq!(server.trace_id, "abababababababababababababababab");
    assert_eq!(server.span_id, "0101010101010101");
    assert_eq!(server.parent_span_id, None);
    assert_eq!(server.kind, SpanKind::Server);
    assert_eq!(server.name, "GET /users/{id}");
    assert_eq!(server.attr_str("url.path"), Some("/users/7"));
    assert_eq!(server.attr_int("http.response.status_code"), Some(500));
    assert_eq!(server.status_code, StatusCode::Error);
    assert_eq!(server.status_message, "boom");
    assert_eq!(server.duration_ns(), 4_000);

    let client = &spans[1];
    assert_eq!(client.resource_str("service.name"), Some("db-client"));
    assert_eq!(client.parent_span_id.as_deref(), Some("0101010101010101"));
    assert_eq!(client.trace_state, "k=v");
    assert_eq!(client.kind, SpanKind::Client);
    assert_eq!(client.status_code, StatusCode::Unset);
    assert_eq!(client.attr("ok"), Some(&AttrValue::Bool(true)));
    assert_eq!(client.attr("ratio"), Some(&AttrValue::Double(0.25)));
    assert_eq!(
        client.attr("list"),
        Some(&AttrValue::Array(vec![AttrValue::Int(1)]))
    );
    assert_eq!(client.attr_str("ok"), None, "a bool is not a string");
}

/// Sends a raw HTTP/1.1 POST and returns the response status code.
async fn post(endpoint: &str, path: &str, content_type: &str, body: &[u8]) -> u16 {
    let addr = endpoint.strip_prefix("http://").expect("http endpoint");
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         X-Api-Key: secret\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write head");
    stream.write_all(body).await.expect("write body");
    let mut resp = Vec::new();
    stream.read_to_end(&mut resp).await.expect("read response");
    let text = String::from_utf8_lossy(&resp);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad response: {text}"))
}

#[tokio::test]
async fn grpc_receiver_records_requests_and_metadata() {
    let receiver = OtlpReceiver::start_grpc().await.expect("receiver");
    assert_eq!(receiver.protocol(), "grpc");
    let mut client = TraceServiceClient::connect(receiver.endpoint())
        .await
        .expect("connect");
    let mut req = tonic::Request::new(sample_request());
    req.metadata_mut()
        .insert("x-api-key", "secret".parse().expect("metadata"));
    client.export(req).await.expect("export");

    assert_eq!(receiver.requests_count(), 1);
    let recorded = receiver.requests();
    assert_eq!(
        recorded[0].headers.get("x-api-key").map(String::as_str),
        Some("secret")
    );
    assert_eq!(recorded[0].body, sample_request());
    check_sample_spans(&receiver);
}

#[tokio::test]
async fn grpc_failure_injection_answers_unavailable() {
    let receiver = OtlpReceiver::start_grpc().await.expect("receiver");
    receiver.fail_next(1);
    let mut client = TraceServiceClient::connect(receiver.endpoint())
        .await
        .expect("connect");
    let err = client
        .export(sample_request())
        .await
        .expect_err("injected failure");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert_eq!(receiver.requests_count(), 0);
    client
        .export(sample_request())
        .await
        .expect("second export");
    assert_eq!(receiver.requests_count(), 1);
}

#[tokio::test]
async fn http_receiver_decodes_protobuf_posts() {
    let receiver = OtlpReceiver::start_http().await.expect("receiver");
    assert_eq!(receiver.protocol(), "http/protobuf");
    let body = sample_request().encode_to_vec();
    assert_eq!(
        post(
            &receiver.endpoint(),
            "/v1/traces",
            "application/x-protobuf",
            &body
        )
        .await,
        200
    );
    assert_eq!(receiver.requests_count(), 1);
    assert_eq!(
        receiver.requests()[0]
            .headers
            .get("x-api-key")
            .map(String::as_str),
        Some("secret")
    );
    check_sample_spans(&receiver);
}

#[tokio::test]
async fn http_receiver_refuses_what_an_exporter_must_not_send() {
    let receiver = OtlpReceiver::start_http().await.expect("receiver");
    let endpoint = receiver.endpoint();
    let body = sample_request().encode_to_vec();
    assert_eq!(
        post(&endpoint, "/v1/metrics", "application/x-protobuf", &body).await,
        404
    );
    assert_eq!(
        post(&endpoint, "/v1/traces", "application/json", b"{}").await,
        415
    );
    assert_eq!(
        post(
            &endpoint,
            "/v1/traces",
            "application/x-protobuf",
            &[0xff, 0xff, 0xff]
        )
        .await,
        400
    );
    receiver.fail_next(2);
    assert_eq!(
        post(&endpoint, "/v1/traces", "application/x-protobuf", &body).await,
        503
    );
    assert_eq!(
        post(&endpoint, "/v1/traces", "application/x-protobuf", &body).await,
        503
    );
    assert_eq!(receiver.requests_count(), 0);
    assert_eq!(
        post(&endpoint, "/v1/traces", "application/x-protobuf", &body).await,
        200
    );
    assert_eq!(receiver.requests_count(), 1);
}

#[tokio::test]
async fn wait_for_returns_spans_once_the_predicate_holds() {
    let receiver = OtlpReceiver::start_http().await.expect("receiver");
    let endpoint = receiver.endpoint();
    let missing = receiver
        .wait_for(|s| !s.is_empty(), Duration::from_millis(100))
        .await;
    assert_eq!(missing, Err(Vec::new()));

    let sender = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        post(
            &endpoint,
            "/v1/traces",
            "application/x-protobuf",
            &sample_request().encode_to_vec(),
        )
        .await
    });
    let spans = receiver
        .wait_for(
            |s| s.iter().any(|s| s.name == "SELECT"),
            Duration::from_secs(5),
        )
        .await
        .expect("span arrives");
    assert_eq!(spans.len(), 2);
    assert_eq!(sender.await.expect("sender"), 200);
}

#[tokio::test]
async fn dropping_the_receiver_stops_serving() {
    let receiver = OtlpReceiver::start_http().await.expect("receiver");
    let endpoint = receiver.endpoint();
    drop(receiver);
    tokio::task::yield_now().await;
    let addr = endpoint
        .strip_prefix("http://")
        .expect("http endpoint")
        .to_string();
    let refused = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            if TcpStream::connect(&addr).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        refused.is_ok(),
        "receiver still accepts connections after drop"
    );
}
