//! End-to-end tests of the HTTP/2 and gRPC slice: nginx serving cleartext HTTP/2 (prior
//! knowledge) to curl and to h2load (many concurrent streams per connection), and a python grpcio
//! server called by a python grpcio client, traced by the agent binary with the exact spans of
//! both ends of every connection checked at an OTLP receiver.
//!
//! Every test runs the agent with `--port <its server's port>` so other traffic on the host does
//! not reach its receiver; all spans received must therefore belong to the test's requests.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use integration::{OtlpReceiver, ReceivedSpan, SpanKind, StatusCode};

/// nginx serving `<dir>/www` over cleartext HTTP/2 (prior knowledge) on 127.0.0.1:`port`;
/// `/unavailable` answers 503.
fn start_nginx_h2c(dir: &TempDir, port: u16) -> Proc {
    let prefix = dir.path().display().to_string();
    start_nginx(
        dir,
        port,
        1,
        &format!(
            "    server {{
        listen 127.0.0.1:{port} http2;
        root {prefix}/www;
        location = /unavailable {{ return 503; }}
    }}"
        ),
    )
}

/// The span status, and `error.type` when it is an error.
fn expect_status(span: &ReceivedSpan, error_type: Option<&str>) {
    let want = if error_type.is_some() {
        StatusCode::Error
    } else {
        StatusCode::Unset
    };
    assert_eq!(span.status_code, want, "status of {}", describe(span));
    match error_type {
        Some(t) => expect_str(span, "error.type", t),
        None => expect_absent(span, "error.type"),
    }
}

/// Attributes every HTTP/2 span (not gRPC) of a GET to 127.0.0.1:`port` carries.
fn expect_h2_get(span: &ReceivedSpan, port: u16, status: i64) {
    assert_eq!(span.name, "GET", "name of {}", describe(span));
    expect_str(span, "http.request.method", "GET");
    expect_str(span, "url.scheme", "http");
    expect_int(span, "http.response.status_code", status);
    expect_str(span, "network.protocol.name", "http");
    expect_str(span, "network.protocol.version", "2");
    expect_str(span, "server.address", "127.0.0.1");
    expect_int(span, "server.port", i64::from(port));
    expect_str(span, "network.peer.address", "127.0.0.1");
    expect_int(span, "http.request.body.size", 0);
    expect_absent(span, "rpc.system");
}

/// Server-side connection attributes of a span for a connection from `client_port`.
fn expect_server_conn(span: &ReceivedSpan, port: u16, client_port: u16) {
    expect_str(span, "client.address", "127.0.0.1");
    expect_int(span, "client.port", i64::from(client_port));
    expect_int(span, "network.peer.port", i64::from(client_port));
    expect_int(span, "network.local.port", i64::from(port));
}

/// Client-side connection attributes of a span for a connection from `client_port`.
fn expect_client_conn(span: &ReceivedSpan, port: u16, client_port: u16) {
    expect_int(span, "network.peer.port", i64::from(port));
    expect_int(span, "network.local.port", i64::from(client_port));
    expect_absent(span, "client.address");
}

/// One curl request over h2c and what the agent must report for it.
struct H2Request<'a> {
    run: CurlRun,
    path: &'a str,
    /// `error.type` of the server span, if an error.
    server_error: Option<&'a str>,
    /// `error.type` of the client span, if an error.
    client_error: Option<&'a str>,
}

fn check_h2_curl_request(spans: &[ReceivedSpan], port: u16, worker: u32, req: &H2Request<'_>) {
    let run = &req.run;
    // The client's ephemeral port ties the server span to this very connection.
    let s = one(spans, SpanKind::Server, req.path, |s| {
        s.attr_int("client.port") == Some(i64::from(run.local_port))
    });
    let c = one(
        spans,
        SpanKind::Client,
        &format!("curl pid {}", run.pid),
        |s| s.resource_int("process.pid") == Some(i64::from(run.pid)),
    );
    let user_agent = curl_user_agent();
    for span in [s, c] {
        expect_h2_get(span, port, i64::from(run.status));
        expect_str(span, "user_agent.original", &user_agent);
        expect_int(span, "http.response.body.size", run.body_bytes);
        assert_within(span, run.started_ns, run.ended_ns);
    }
    expect_str(s, "url.path", req.path);
    expect_absent(s, "url.query");
    expect_server_conn(s, port, run.local_port);
    expect_status(s, req.server_error);
    assert_resource(s, "nginx", worker, &exe_name(&which("nginx")));

    expect_str(
        c,
        "url.full",
        &format!("http://127.0.0.1:{port}{}", req.path),
    );
    expect_client_conn(c, port, run.local_port);
    expect_status(c, req.client_error);
    assert_resource(c, "curl", run.pid, &exe_name(&which("curl")));

    // The server cannot read the request before the client starts sending it.
    assert!(
        c.start_unix_ns <= s.start_unix_ns && s.end_unix_ns <= c.end_unix_ns + CLOCK_SLACK_NS,
        "server span not inside the client span:\n{}\n{}",
        describe(c),
        describe(s)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_h2c_static_file_and_503_with_curl() {
    require_root();
    let dir = TempDir::new("h2c-curl");
    let content = "static content served by nginx over h2c\n";
    dir.write("www/static.txt", content);
    let port = free_port();
    let receiver = OtlpReceiver::start_grpc()
        .await
        .expect("start the OTLP receiver");
    let nginx = start_nginx_h2c(&dir, port);
    let mut agent = Agent::start_otlp(&dir, &receiver, port);

    let base = format!("http://127.0.0.1:{port}");
    let ok = curl(&["--http2-prior-knowledge", &format!("{base}/static.txt")]);
    let unavailable = curl(&["--http2-prior-knowledge", &format!("{base}/unavailable")]);
    assert_eq!((ok.status, unavailable.status), (200, 503));
    assert_eq!(ok.body_bytes, i64::try_from(content.len()).expect("len"));

    let spans = collect_exact(&receiver, &mut agent, 2, 2).await;
    assert_servers_linked_to_clients(&spans);
    let worker = server_worker_pid(&spans, nginx.pid());
    check_h2_curl_request(
        &spans,
        port,
        worker,
        &H2Request {
            run: ok,
            path: "/static.txt",
            server_error: None,
            client_error: None,
        },
    );
    check_h2_curl_request(
        &spans,
        port,
        worker,
        &H2Request {
            run: unavailable,
            path: "/unavailable",
            server_error: Some("503"),
            client_error: Some("503"),
        },
    );
}

/// Most spans of one side open at the same time, by their start and end.
fn max_open(spans: &[&ReceivedSpan]) -> usize {
    let mut edges: Vec<(u64, i32)> = spans
        .iter()
        .flat_map(|s| [(s.start_unix_ns, 1), (s.end_unix_ns, -1)])
        .collect();
    // At equal times ends sort first: touching spans do not overlap.
    edges.sort_unstable();
    let (mut open, mut max) = (0i32, 0i32);
    for (_, delta) in edges {
        open += delta;
        max = max.max(open);
    }
    usize::try_from(max).expect("non-negative")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2load_concurrent_streams_on_two_connections() {
    require_root();
    const REQUESTS: usize = 200;
    const CONNECTIONS: usize = 2;
    const STREAMS: usize = 20;
    let dir = TempDir::new("h2load");
    let content = "h2load\n";
    dir.write("www/file", content);
    let port = free_port();
    let receiver = OtlpReceiver::start_http()
        .await
        .expect("start the OTLP receiver");
    let nginx = start_nginx_h2c(&dir, port);
    let mut agent = Agent::start_otlp(&dir, &receiver, port);

    let h2load = which("h2load");
    let url = format!("http://127.0.0.1:{port}/file");
    let (connections, streams) = (CONNECTIONS.to_string(), STREAMS.to_string());
    let load = run_h2load(REQUESTS, &["-c", &connections, "-m", &streams, &url]);

    let spans = collect_exact(&receiver, &mut agent, REQUESTS, REQUESTS).await;
    assert_servers_linked_to_clients(&spans);
    let worker = server_worker_pid(&spans, nginx.pid());
    let body = i64::try_from(content.len()).expect("len");
    let h2load_exe = exe_name(&h2load);
    let nginx_exe = exe_name(&which("nginx"));
    let user_agent = h2load_user_agent(&h2load);
    let mut server_conns: BTreeMap<u16, Vec<&ReceivedSpan>> = BTreeMap::new();
    let mut client_conns: BTreeMap<u16, Vec<&ReceivedSpan>> = BTreeMap::new();
    for span in &spans {
        expect_h2_get(span, port, 200);
        expect_int(span, "http.response.body.size", body);
        expect_str(span, "user_agent.original", &user_agent);
        expect_status(span, None);
        assert_within(span, load.started_ns, load.ended_ns);
        let port_of = |key: &str| {
            span.attr_int(key)
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or_else(|| panic!("no {key} in {}", describe(span)))
        };
        match span.kind {
            SpanKind::Server => {
                expect_str(span, "url.path", "/file");
                let client_port = port_of("client.port");
                expect_server_conn(span, port, client_port);
                assert_resource(span, "nginx", worker, &nginx_exe);
                server_conns.entry(client_port).or_default().push(span);
            }
            SpanKind::Client => {
                expect_str(span, "url.full", &url);
                let client_port = port_of("network.local.port");
                expect_client_conn(span, port, client_port);
                assert_resource(span, "h2load", load.pid, &h2load_exe);
                client_conns.entry(client_port).or_default().push(span);
            }
            other => panic!("unexpected {other:?} span: {}", describe(span)),
        }
    }

    // Both ends saw the same connections, each carrying its share of the streams.
    let sizes = |conns: &BTreeMap<u16, Vec<&ReceivedSpan>>| {
        conns
            .iter()
            .map(|(port, spans)| (*port, spans.len()))
            .collect::<Vec<_>>()
    };
    assert_eq!(sizes(&server_conns), sizes(&client_conns));
    assert_eq!(
        server_conns.len(),
        CONNECTIONS,
        "connections: {:?}",
        sizes(&server_conns)
    );
    assert!(
        server_conns
            .values()
            .all(|s| s.len() == REQUESTS / CONNECTIONS),
        "h2load splits requests evenly: {:?}",
        sizes(&server_conns)
    );
    // Streams were in flight together, and each span covers its own stream only.
    for conn in client_conns.values().chain(server_conns.values()) {
        let open = max_open(conn);
        assert!(
            (2..=STREAMS).contains(&open),
            "{open} spans open at once on one connection (h2load keeps up to {STREAMS}):\n{}",
            describe_all(&conn.iter().map(|s| (*s).clone()).collect::<Vec<_>>())
        );
    }
}

/// The `User-Agent` h2load sends, which is what `h2load --version` prints.
fn h2load_user_agent(h2load: &Path) -> String {
    let out = Command::new(h2load)
        .arg("--version")
        .output()
        .expect("run h2load --version");
    let text = String::from_utf8_lossy(&out.stdout);
    let agent = text.trim();
    assert!(
        agent.starts_with("h2load nghttp2/") && !agent.contains('\n'),
        "unexpected h2load --version output: {text}"
    );
    agent.to_owned()
}

/// The gRPC peer of the protocol tests: `serve PORT`, or `call HOST:PORT` making SayHello(bob),
/// Fail(eve) (NOT_FOUND) and Count(3) (three streamed replies) on one channel.
fn grpc_peer() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("protocols")
        .join("testdata")
        .join("grpc_peer.py");
    assert!(path.is_file(), "{} is missing", path.display());
    let out = Command::new(python())
        .args(["-c", "import grpc"])
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "python3 cannot import grpc; run scripts/setup-test-peers.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

/// One gRPC call as the test expects both ends to report it.
struct GrpcCall<'a> {
    method: &'a str,
    code: i64,
    /// `error.type` and status message of the client span, if an error.
    client_error: Option<(&'a str, &'a str)>,
}

const GRPC_SERVICE: &str = "helloworld.Greeter";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_error_and_server_streaming_calls() {
    require_root();
    let dir = TempDir::new("grpc");
    let peer = grpc_peer();
    let port = free_port();
    let receiver = OtlpReceiver::start_http()
        .await
        .expect("start the OTLP receiver");
    let mut cmd = Command::new(python());
    cmd.arg(&peer)
        .args(["serve", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let mut server = Proc::spawn("grpc_peer.py serve", cmd);
    wait_for_port(&mut server, port);
    let mut agent = Agent::start_otlp(&dir, &receiver, port);

    // The client stays alive until its spans arrived, so the agent can always read its /proc
    // entry (a process already gone is named after the capturing thread, e.g. `event_engine`).
    let mut cmd = Command::new(python());
    cmd.arg(&peer)
        .args(["call", &format!("127.0.0.1:{port}"), "hold"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let started_ns = now_unix_ns();
    let mut client = Proc::spawn("grpc_peer.py call", cmd);
    let lines = Lines::new(client.take_stdout());
    let output: Vec<String> = (0..4).map(|_| lines.next("grpc_peer.py call")).collect();
    let ended_ns = now_unix_ns();
    let message = "no such greeter: eve \u{2713}";
    assert_eq!(
        output,
        [
            "b'hello bob'",
            &format!("StatusCode.NOT_FOUND {message}"),
            "[b'1', b'2', b'3']",
            "done",
        ],
        "the calls did not behave as the test expects"
    );

    let calls = [
        GrpcCall {
            method: "SayHello",
            code: 0,
            client_error: None,
        },
        GrpcCall {
            method: "Fail",
            code: 5,
            client_error: Some(("NOT_FOUND", message)),
        },
        GrpcCall {
            method: "Count",
            code: 0,
            client_error: None,
        },
    ];
    let spans = collect_exact(&receiver, &mut agent, calls.len(), calls.len()).await;
    assert_servers_linked_to_clients(&spans);
    let python_exe = exe_name(python());
    let mut client_spans = Vec::new();
    for call in &calls {
        let name = format!("{GRPC_SERVICE}/{}", call.method);
        let s = one(&spans, SpanKind::Server, &name, |s| s.name == name);
        let c = one(&spans, SpanKind::Client, &name, |s| s.name == name);
        for span in [s, c] {
            expect_str(span, "rpc.system", "grpc");
            expect_str(span, "rpc.service", GRPC_SERVICE);
            expect_str(span, "rpc.method", call.method);
            expect_int(span, "rpc.grpc.status_code", call.code);
            expect_str(span, "network.protocol.name", "http");
            expect_str(span, "network.protocol.version", "2");
            expect_str(span, "server.address", "127.0.0.1");
            expect_int(span, "server.port", i64::from(port));
            expect_str(span, "network.peer.address", "127.0.0.1");
            expect_absent(span, "http.request.method");
            expect_absent(span, "url.full");
            assert_within(span, started_ns, ended_ns);
        }
        let client_port = c
            .attr_int("network.local.port")
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or_else(|| panic!("no network.local.port in {}", describe(c)));
        expect_server_conn(s, port, client_port);
        expect_client_conn(c, port, client_port);
        // NOT_FOUND is the caller's problem, not the server's.
        expect_status(s, None);
        assert_eq!(s.status_message, "", "status message of {}", describe(s));
        match call.client_error {
            Some((error_type, description)) => {
                expect_status(c, Some(error_type));
                assert_eq!(
                    c.status_message,
                    description,
                    "status message of {}",
                    describe(c)
                );
            }
            None => expect_status(c, None),
        }
        assert_resource(s, "grpc_peer", server.pid(), &python_exe);
        assert_resource(c, "grpc_peer", client.pid(), &python_exe);
        assert!(
            c.start_unix_ns <= s.start_unix_ns && s.end_unix_ns <= c.end_unix_ns + CLOCK_SLACK_NS,
            "server span not inside the client span:\n{}\n{}",
            describe(c),
            describe(s)
        );
        client_spans.push(c);
    }
    // One channel, one connection, and the calls one after another in the order made.
    for pair in client_spans.windows(2) {
        assert_eq!(
            pair[0].attr_int("network.local.port"),
            pair[1].attr_int("network.local.port"),
            "calls on one channel share a connection:\n{}\n{}",
            describe(pair[0]),
            describe(pair[1])
        );
        assert!(
            pair[0].end_unix_ns <= pair[1].start_unix_ns,
            "calls overlap:\n{}\n{}",
            describe(pair[0]),
            describe(pair[1])
        );
    }
}
