//! End-to-end tests of TLS plaintext capture: real TLS servers (nginx and python's client on the
//! system's dynamic libssl.so.3; node, which links OpenSSL into its executable; a Go program on
//! Go's own crypto/tls) and real clients, traced by the agent binary through its SSL and Go TLS
//! uprobes, with the exact spans checked at an OTLP receiver.
//!
//! Every test runs the agent with `--port <its server's port>`, so every span received belongs to
//! the test's requests. The ciphertext on the same connections must produce no span: the tests
//! count exactly one span per request and side.

mod common;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use integration::{OtlpReceiver, ReceivedSpan, SpanKind, StatusCode};

/// `client.py PORT PREFIX N`: N GETs of `PREFIX/<i>` on one keep-alive HTTPS connection (no
/// certificate check), each answer checked; then prints `port <local port>`.
const TLS_CLIENT_PY: &str = r#"
import http.client, ssl, sys

port, prefix, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
conn = http.client.HTTPSConnection("127.0.0.1", port, context=ssl._create_unverified_context())
for i in range(n):
    path = "%s/%d" % (prefix, i)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    if resp.status != 200 or body != ("body %d\n" % i).encode():
        sys.exit("unexpected answer to %s: %d %r" % (path, resp.status, body))
print("port %d" % conn.sock.getsockname()[1], flush=True)
conn.close()
"#;

/// `server.js PORT KEY CERT`: an HTTPS server; GET answers `path=<url>` (404 under `/missing`),
/// POST echoes the body. Prints `listening` once bound.
const TLS_SERVER_JS: &str = r#"
const https = require('https');
const fs = require('fs');
const [port, key, cert] = process.argv.slice(2);
const options = { key: fs.readFileSync(key), cert: fs.readFileSync(cert) };
https.createServer(options, (req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    const out = req.method === 'POST' ? Buffer.concat(chunks) : Buffer.from('path=' + req.url);
    const status = req.url.startsWith('/missing') ? 404 : 200;
    res.writeHead(status, { 'Content-Type': 'text/plain', 'Content-Length': out.length });
    res.end(out);
  });
}).listen(Number(port), '127.0.0.1', () => console.log('listening'));
"#;

/// `client.js PORT N`: N GETs of `/k/<i>` on one keep-alive HTTPS connection (no certificate
/// check), each answer checked; then prints `port <local port>`.
const TLS_CLIENT_JS: &str = r#"
const https = require('https');
const [port, n] = process.argv.slice(2).map(Number);
const agent = new https.Agent({ keepAlive: true, maxSockets: 1 });
let localPort = 0;
function get(i) {
  if (i === n) {
    console.log('port ' + localPort);
    agent.destroy();
    return;
  }
  const path = '/k/' + i;
  https.get({ host: '127.0.0.1', port, path, agent, rejectUnauthorized: false }, (res) => {
    const chunks = [];
    localPort = res.socket.localPort;
    res.on('data', (c) => chunks.push(c));
    res.on('end', () => {
      const body = Buffer.concat(chunks).toString();
      if (res.statusCode !== 200 || body !== 'body ' + i + '\n') {
        console.error('unexpected answer to ' + path + ': ' + res.statusCode + ' ' + body);
        process.exit(1);
      }
      get(i + 1);
    });
  }).on('error', (e) => { console.error(e); process.exit(1); });
}
get(0);
"#;

/// nginx serving `<dir>/www` over TLS on 127.0.0.1:`port`; `/unavailable` answers 503.
/// nginx 1.22's default protocols stop at TLS 1.2.
fn start_nginx_tls(dir: &TempDir, port: u16) -> Proc {
    start_nginx_tls_protocols(dir, port, "TLSv1 TLSv1.1 TLSv1.2")
}

/// As [`start_nginx_tls`], with `ssl_protocols` set to `protocols`.
fn start_nginx_tls_protocols(dir: &TempDir, port: u16, protocols: &str) -> Proc {
    let (cert, key) = tls_material(dir);
    let prefix = dir.path().display().to_string();
    start_nginx(
        dir,
        port,
        1,
        &format!(
            "    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols {protocols};
        root {prefix}/www;
        location = /unavailable {{ return 503; }}
    }}",
            cert = cert.display(),
            key = key.display(),
        ),
    )
}

async fn receiver() -> OtlpReceiver {
    OtlpReceiver::start_grpc()
        .await
        .expect("start the OTLP receiver")
}

/// The server pid of the SERVER spans (all the same), which must be a child of `parent`.
fn worker_pid(spans: &[ReceivedSpan], parent: u32) -> u32 {
    let pids: BTreeSet<i64> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Server)
        .filter_map(|s| s.resource_int("process.pid"))
        .collect();
    let [pid] = pids.iter().copied().collect::<Vec<_>>()[..] else {
        panic!("server spans from pids {pids:?}:\n{}", describe_all(spans));
    };
    let pid = u32::try_from(pid).expect("pid fits u32");
    assert_eq!(parent_pid(pid), parent, "server spans come from a worker");
    pid
}

/// One curl request over TLS as the test expects the agent to report it.
struct TlsRequest<'a> {
    run: CurlRun,
    method: &'a str,
    path: &'a str,
    request_body: i64,
}

/// Checks the SERVER span (from `server_pid`) and the CLIENT span (from curl) of one request.
fn check_tls_request(spans: &[ReceivedSpan], port: u16, server_pid: u32, req: &TlsRequest<'_>) {
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
    for span in [s, c] {
        assert_eq!(span.name, req.method, "name of {}", describe(span));
        expect_str(span, "http.request.method", req.method);
        expect_str(span, "url.scheme", "https");
        expect_int(span, "http.response.status_code", i64::from(run.status));
        expect_str(span, "network.protocol.name", "http");
        expect_str(span, "network.protocol.version", "1.1");
        expect_str(span, "server.address", "127.0.0.1");
        expect_int(span, "server.port", i64::from(port));
        expect_str(span, "network.peer.address", "127.0.0.1");
        expect_str(span, "user_agent.original", &curl_user_agent());
        expect_int(span, "http.request.body.size", req.request_body);
        expect_int(span, "http.response.body.size", run.body_bytes);
        assert_within(span, run.started_ns, run.ended_ns);
        // 4xx is an error on the client side only.
        let error = run.status >= 500 || (span.kind == SpanKind::Client && run.status >= 400);
        let want = if error {
            StatusCode::Error
        } else {
            StatusCode::Unset
        };
        assert_eq!(span.status_code, want, "status of {}", describe(span));
    }
    expect_str(s, "url.path", req.path);
    expect_int(s, "network.peer.port", i64::from(run.local_port));
    expect_int(s, "network.local.port", i64::from(port));
    assert_eq!(
        s.resource_int("process.pid"),
        Some(i64::from(server_pid)),
        "server pid of {}",
        describe(s)
    );
    expect_str(
        c,
        "url.full",
        &format!("https://127.0.0.1:{port}{}", req.path),
    );
    expect_int(c, "network.peer.port", i64::from(port));
    expect_int(c, "network.local.port", i64::from(run.local_port));
    assert!(
        c.start_unix_ns <= s.start_unix_ns,
        "client span starts after the server span:\n{}\n{}",
        describe(c),
        describe(s)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_to_nginx_over_tls() {
    require_root();
    let dir = TempDir::new("tls-nginx");
    let content = "static content served over TLS\n";
    dir.write("www/static.txt", content);
    let port = free_port();
    let receiver = receiver().await;
    let nginx = start_nginx_tls_protocols(&dir, port, TLS_1_2_AND_1_3);
    let mut agent = Agent::start_otlp(&dir, &receiver, port);

    let base = format!("https://127.0.0.1:{port}");
    let ok = curl(&["-k", &format!("{base}/static.txt")]);
    let unavailable = curl(&["-k", &format!("{base}/unavailable")]);
    assert_eq!((ok.status, unavailable.status), (200, 503));
    assert_eq!(ok.body_bytes, i64::try_from(content.len()).expect("len"));

    let spans = collect_exact(&receiver, &mut agent, 2, 2).await;
    assert_servers_linked_to_clients(&spans);
    expect_tls_version(&spans, "1.3");
    let worker = worker_pid(&spans, nginx.pid());
    for (run, path) in [(ok, "/static.txt"), (unavailable, "/unavailable")] {
        let req = TlsRequest {
            run,
            method: "GET",
            path,
            request_body: 0,
        };
        check_tls_request(&spans, port, worker, &req);
    }
}

/// Runs a keep-alive client (`cmd(dir, port, n)`, which prints `port <local port>` when done)
/// against an nginx over TLS that serves `/k/<i>`, and checks the n SERVER and n CLIENT spans.
/// With `go_ahead`, the client is that executable and first prints `ready` and waits for a line on
/// stdin, which it gets once the agent has probed it.
async fn keep_alive_client_to_nginx(
    tag: &str,
    n: usize,
    go_ahead: Option<&Path>,
    cmd: impl FnOnce(&TempDir, u16, usize) -> Command,
) {
    require_root();
    let dir = TempDir::new(tag);
    for i in 0..n {
        dir.write(&format!("www/k/{i}"), &format!("body {i}\n"));
    }
    let port = free_port();
    let receiver = receiver().await;
    let nginx = start_nginx_tls_protocols(&dir, port, TLS_1_2_AND_1_3);
    let mut agent = Agent::start_otlp(&dir, &receiver, port);

    let mut cmd = cmd(&dir, port, n);
    let stdin = match go_ahead {
        Some(_) => Stdio::piped(),
        None => Stdio::null(),
    };
    cmd.stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let started_ns = now_unix_ns();
    // Started after the agent: found when it executes.
    let mut client = Proc::spawn(tag, cmd);
    let lines = Lines::new(client.take_stdout());
    if let Some(exe) = go_ahead {
        go_ahead_when_probed(&agent, &mut client, &lines, exe);
    }
    let port_line = lines.next(tag);
    let status = client.wait(WAIT);
    let ended_ns = now_unix_ns();
    assert!(status.success(), "client failed: {status}");
    let local_port: i64 = port_line
        .strip_prefix("port ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected client output {port_line:?}"));

    let spans = collect_exact(&receiver, &mut agent, n, n).await;
    assert_servers_linked_to_clients(&spans);
    expect_tls_version(&spans, "1.3");
    let worker = worker_pid(&spans, nginx.pid());
    for i in 0..n {
        let path = format!("/k/{i}");
        let s = one(&spans, SpanKind::Server, &path, |s| {
            s.attr_str("url.path") == Some(path.as_str())
        });
        let c = one(&spans, SpanKind::Client, &path, |s| {
            s.attr_str("url.full") == Some(format!("https://127.0.0.1:{port}{path}").as_str())
        });
        for span in [s, c] {
            expect_str(span, "http.request.method", "GET");
            expect_str(span, "url.scheme", "https");
            expect_int(span, "http.response.status_code", 200);
            expect_int(span, "http.response.body.size", 7);
            assert_within(span, started_ns, ended_ns);
        }
        // All requests on the one connection the client reported.
        expect_int(s, "client.port", local_port);
        expect_int(c, "network.local.port", local_port);
        assert_eq!(s.resource_int("process.pid"), Some(i64::from(worker)));
        assert_eq!(
            c.resource_int("process.pid"),
            Some(i64::from(client.pid())),
            "client pid of {}",
            describe(c)
        );
        assert!(
            c.start_unix_ns <= s.start_unix_ns,
            "client span starts after the server span:\n{}\n{}",
            describe(c),
            describe(s)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_keep_alive_client_to_nginx_over_tls() {
    keep_alive_client_to_nginx("tls-python", 5, None, |dir, port, n| {
        let script = dir.write("e2e_tls_client.py", TLS_CLIENT_PY);
        let mut cmd = Command::new(python());
        cmd.arg(&script)
            .args([port.to_string(), "/k".to_owned(), n.to_string()]);
        cmd
    })
    .await;
}

/// node links OpenSSL into its executable and feeds it through memory buffers, not the socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_keep_alive_client_to_nginx_over_tls() {
    keep_alive_client_to_nginx("tls-node-client", 3, None, |dir, port, n| {
        let script = dir.write("e2e_tls_client.js", TLS_CLIENT_JS);
        let mut cmd = Command::new(which("node"));
        cmd.arg(&script).args([port.to_string(), n.to_string()]);
        cmd
    })
    .await;
}

/// Waits until the agent logs that it attached its probes to `exe`.
fn wait_for_attach(agent: &Agent, exe: &Path) {
    let shown = format!("path=\"{}\"", exe.display());
    let deadline = Instant::now() + WAIT;
    while !agent
        .stderr()
        .lines()
        .any(|l| l.contains("TLS probes attached") && l.contains(&shown))
    {
        assert!(
            Instant::now() < deadline,
            "no TLS probes attached to {} within {WAIT:?}; agent stderr:\n{}",
            exe.display(),
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// node's `https` server (`TLS_SERVER_JS`) on 127.0.0.1:`port`, with a fresh key pair in `dir`.
fn start_node_server(dir: &TempDir, node: &Path, port: u16) -> Proc {
    let (cert, key) = tls_material(dir);
    let script = dir.write("e2e_tls_server.js", TLS_SERVER_JS);
    let mut cmd = Command::new(node);
    cmd.arg(&script)
        .arg(port.to_string())
        .arg(&key)
        .arg(&cert)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let mut server = Proc::spawn("node e2e_tls_server.js", cmd);
    wait_for_port(&mut server, port);
    server
}

/// node's `https` server (OpenSSL linked in, memory BIOs), started after the agent: GET, POST and
/// a 404 on three connections. node allocates each connection's `SSL` at the address the previous
/// one freed; the `SSL_free` probe keeps the new object from inheriting the old socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_https_server_started_after_the_agent() {
    require_root();
    let node = std::fs::canonicalize(which("node")).expect("resolve node");
    let dir = TempDir::new("tls-node");
    let port = free_port();
    let receiver = receiver().await;
    let _libssl = hold_libssl();
    let mut agent = Agent::start_otlp(&dir, &receiver, port);

    // Started after the agent: found by its periodic look at new processes.
    let server = start_node_server(&dir, &node, port);
    wait_for_attach(&agent, &node);

    let base = format!("https://127.0.0.1:{port}");
    let get = curl(&["-k", &format!("{base}/node/hello")]);
    let body = "name=tracer&n=42";
    let post = curl(&["-k", "--data", body, &format!("{base}/submit")]);
    let missing = curl(&["-k", &format!("{base}/missing/x")]);
    assert_eq!((get.status, post.status, missing.status), (200, 200, 404));
    assert_eq!(get.body_bytes, "path=/node/hello".len() as i64);
    assert_eq!(post.body_bytes, body.len() as i64);

    let spans = collect_exact(&receiver, &mut agent, 3, 3).await;
    assert_servers_linked_to_clients(&spans);
    let requests = [
        (get, "GET", "/node/hello", 0),
        (post, "POST", "/submit", body.len() as i64),
        (missing, "GET", "/missing/x", 0),
    ];
    for (run, method, path, request_body) in requests {
        let req = TlsRequest {
            run,
            method,
            path,
            request_body,
        };
        check_tls_request(&spans, port, server.pid(), &req);
    }
}

/// node's `https` server under 8 concurrent keep-alive HTTPS connections (h2load over HTTP/1.1,
/// OpenSSL's libssl on the client side): every request gives exactly one SERVER span from node,
/// on the right connection, under the CLIENT span that sent it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_https_server_under_concurrent_load() {
    require_root();
    const REQUESTS: usize = 400;
    const CONNECTIONS: usize = 8;
    let node = std::fs::canonicalize(which("node")).expect("resolve node");
    let dir = TempDir::new("tls-node-load");
    let port = free_port();
    let server = start_node_server(&dir, &node, port);
    let _libssl = hold_libssl();
    let receiver = receiver().await;
    let mut agent = Agent::start_otlp(&dir, &receiver, port);
    wait_for_attach(&agent, &node);

    let url = format!("https://127.0.0.1:{port}/load");
    let load = run_h2load(REQUESTS, &["--h1", "-c", &CONNECTIONS.to_string(), &url]);

    let spans = collect_exact(&receiver, &mut agent, REQUESTS, REQUESTS).await;
    assert_servers_linked_to_clients(&spans);
    let mut server_ports = BTreeSet::new();
    for span in &spans {
        assert_eq!(span.name, "GET", "{}", describe(span));
        expect_int(span, "http.response.status_code", 200);
        expect_int(span, "http.response.body.size", "path=/load".len() as i64);
        assert_within(span, load.started_ns, load.ended_ns);
        match span.kind {
            SpanKind::Server => {
                assert_eq!(
                    span.resource_int("process.pid"),
                    Some(i64::from(server.pid())),
                    "{}",
                    describe(span)
                );
                expect_str(span, "url.path", "/load");
                expect_str(span, "tls.protocol.version", "1.3");
                server_ports.insert(span.attr_int("client.port").expect("client.port"));
            }
            SpanKind::Client => {
                assert_eq!(
                    span.resource_int("process.pid"),
                    Some(i64::from(load.pid)),
                    "{}",
                    describe(span)
                );
            }
            other => panic!("unexpected {other:?} span: {}", describe(span)),
        }
    }
    assert_eq!(
        server_ports.len(),
        CONNECTIONS,
        "one client port per connection"
    );
}

/// `bpf(2)` commands that open a program or link by id.
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;

/// Whether the kernel still has the BPF object `id` (a program or link, per `cmd`).
fn bpf_object_exists(cmd: libc::c_long, id: u32) -> bool {
    // The attr is a union; both commands read the id from its first field.
    let attr = [id, 0, 0, 0];
    // SAFETY: `attr` is a valid, large enough bpf_attr for these commands.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd >= 0 {
        // SAFETY: the fd was just returned to us.
        unsafe { libc::close(fd as libc::c_int) };
        return true;
    }
    let err = std::io::Error::last_os_error();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOENT),
        "bpf({cmd}, {id}) failed unexpectedly: {err}"
    );
    false
}

/// The agent process: the test's child running the tracer binary.
fn agent_pid() -> u32 {
    let me = std::process::id();
    let tracer = std::fs::canonicalize(tracer_bin()).expect("resolve tracer binary");
    let found: Vec<u32> = std::fs::read_dir("/proc")
        .expect("list /proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e == tracer))
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok() && parent_pid(pid) == me
        })
        .collect();
    let [pid] = found[..] else {
        panic!("expected one agent child of this test, found {found:?}");
    };
    pid
}

/// The BPF links and programs a process holds open, from its fdinfo: (uprobe link ids with the
/// file each probes, every program id).
fn bpf_objects(pid: u32) -> (Vec<(u32, String)>, BTreeSet<u32>) {
    let mut uprobe_links = Vec::new();
    let mut programs = BTreeSet::new();
    let dir = format!("/proc/{pid}/fdinfo");
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("list {dir}: {e}")) {
        let Ok(text) = std::fs::read_to_string(entry.expect("fdinfo entry").path()) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(|v| v.trim().to_owned())
        };
        if let Some(id) = field("prog_id").and_then(|v| v.parse().ok()) {
            programs.insert(id);
        }
        if field("event_type").as_deref() == Some("uprobe")
            && let Some(link) = field("link_id").and_then(|v| v.parse().ok())
        {
            uprobe_links.push((link, field("name").unwrap_or_default()));
        }
    }
    (uprobe_links, programs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uprobes_are_gone_after_sigterm_and_the_traced_server_keeps_working() {
    require_root();
    let dir = TempDir::new("tls-detach");
    dir.write("www/a.txt", "a\n");
    let port = free_port();
    let receiver = receiver().await;
    let mut nginx = start_nginx_tls(&dir, port);
    let uprobe_events = Path::new("/sys/kernel/tracing/uprobe_events");
    let events_before = std::fs::read_to_string(uprobe_events).ok();
    let mut agent = Agent::start_otlp(&dir, &receiver, port);

    let run = curl(&["-k", &format!("https://127.0.0.1:{port}/a.txt")]);
    assert_eq!(run.status, 200);
    let waited = receiver
        .wait_for(
            |s| count(s, SpanKind::Server) >= 1 && count(s, SpanKind::Client) >= 1,
            WAIT,
        )
        .await;
    assert!(
        waited.is_ok(),
        "no spans; agent stderr:\n{}",
        agent.stderr()
    );

    let (links, programs) = bpf_objects(agent_pid());
    assert!(
        links.iter().any(|(_, file)| file.contains("libssl")),
        "no uprobe link on libssl among {links:?}"
    );
    agent.stop();
    wait_until_gone(&links, &programs);
    // aya attaches through perf_event_open, never through the tracefs probe list.
    assert_eq!(
        std::fs::read_to_string(uprobe_events).ok(),
        events_before,
        "uprobe_events changed"
    );
    // The probed server still serves TLS.
    let after = curl(&["-k", &format!("https://127.0.0.1:{port}/a.txt")]);
    assert_eq!((after.status, after.body_bytes), (200, 2));
    nginx.assert_running();
}

/// Waits until the kernel has freed every one of `links` and `programs` (ids the stopped agent
/// held). A program stays loaded while any link or fd holds it, so once all are gone nothing of
/// the agent is attached anywhere. Freeing is deferred.
fn wait_until_gone(links: &[(u32, String)], programs: &BTreeSet<u32>) {
    let deadline = Instant::now() + STOP_TIMEOUT;
    loop {
        let left_links: Vec<u32> = links
            .iter()
            .map(|(id, _)| *id)
            .filter(|&id| bpf_object_exists(BPF_LINK_GET_FD_BY_ID, id))
            .collect();
        let left_programs: Vec<u32> = programs
            .iter()
            .copied()
            .filter(|&id| bpf_object_exists(BPF_PROG_GET_FD_BY_ID, id))
            .collect();
        if left_links.is_empty() && left_programs.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after the agent exited, links {left_links:?} and programs {left_programs:?} remain"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How the Go test peer is built.
#[derive(Clone, Copy)]
enum GoBuild {
    /// Dynamically linked, with its symbol table (cgo, as `go build` makes it on a Debian host).
    Symbols,
    /// Static, without symbol table or DWARF (`CGO_ENABLED=0 -ldflags=-s -w`, as container
    /// images ship Go programs): its functions are found through `.gopclntab`.
    Stripped,
    /// Position-independent (`-buildmode=pie`): loaded at another address in every process.
    Pie,
}

/// The Go test peer `integration/go/gotls` (HTTPS server and clients on Go's crypto/tls), built
/// once per test run with the system's `go`.
fn go_program(build: GoBuild) -> &'static Path {
    static BUILT: OnceLock<[PathBuf; 3]> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = root.join("..").join("target").join("gotls");
        std::fs::create_dir_all(&out).expect("create target/gotls");
        let go = which("go");
        let version = Command::new(&go)
            .arg("version")
            .output()
            .expect("run go version");
        eprintln!(
            "building the Go peer with {}",
            String::from_utf8_lossy(&version.stdout).trim()
        );
        let build = |name: &str, cgo: &str, flags: &[&str]| {
            let exe = out.join(name);
            let status = Command::new(&go)
                .current_dir(root.join("go"))
                .env("CGO_ENABLED", cgo)
                .env("GOCACHE", out.join("cache"))
                .env("GOPATH", out.join("gopath"))
                .arg("build")
                .args(flags)
                .arg("-o")
                .arg(&exe)
                .arg("./gotls")
                .stdin(Stdio::null())
                .status()
                .expect("run go build; run scripts/setup-test-peers.sh");
            assert!(status.success(), "go build of {name} failed: {status}");
            std::fs::canonicalize(&exe).expect("resolve the Go peer")
        };
        [
            build("gotls", "1", &[]),
            build("gotls-stripped", "0", &["-ldflags", "-s -w"]),
            build("gotls-pie", "1", &["-buildmode=pie"]),
        ]
    });
    &built[build as usize]
}

/// `exe server PORT CERT KEY` on 127.0.0.1:`port` with a fresh key pair: the Go HTTPS server
/// (`integration/go/gotls`) or the gRPC server (`integration/go/gogrpc`).
fn start_go_server(dir: &TempDir, exe: &Path, port: u16) -> Proc {
    let (cert, key) = tls_material(dir);
    let mut cmd = Command::new(exe);
    cmd.arg("server")
        .arg(port.to_string())
        .arg(&cert)
        .arg(&key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let mut server = Proc::spawn("Go server", cmd);
    wait_for_port(&mut server, port);
    server
}

/// Lets a Go client that printed `ready` start its requests once the agent has probed `exe`:
/// a Go program makes its first request within milliseconds of exec, sooner than the agent
/// attaches probes to a program it just saw executed.
fn go_ahead_when_probed(agent: &Agent, client: &mut Proc, lines: &Lines, exe: &Path) {
    assert_eq!(lines.next("Go client"), "ready");
    wait_for_attach(agent, exe);
    writeln!(client.stdin(), "go").expect("write to the Go client");
}

/// A process that maps libssl for the whole test, so the agent probes libssl before it is ready
/// and curl, which lives a few milliseconds, is traced from its first request.
fn hold_libssl() -> Proc {
    let mut cmd = Command::new(python());
    cmd.args([
        "-c",
        "import ssl, sys; print('ready', flush=True); sys.stdin.read()",
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    let mut holder = Proc::spawn("python3 holding libssl", cmd);
    assert_eq!(
        Lines::new(holder.take_stdout()).next("libssl holder"),
        "ready"
    );
    holder
}

/// curl against a Go server that was running before the agent (found by its first scan, through
/// the symbol table): GET, POST and a 404, with exact SERVER spans from the Go server and CLIENT
/// spans from curl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_to_go_server_over_tls() {
    require_root();
    let exe = go_program(GoBuild::Symbols);
    let dir = TempDir::new("tls-go-server");
    let port = free_port();
    let receiver = receiver().await;
    let _libssl = hold_libssl();
    let mut server = start_go_server(&dir, exe, port);
    let mut agent = Agent::start_otlp(&dir, &receiver, port);
    wait_for_attach(&agent, exe);

    let base = format!("https://127.0.0.1:{port}");
    let get = curl(&["-k", &format!("{base}/go/hello")]);
    let body = "name=tracer&n=42";
    let post = curl(&["-k", "--data", body, &format!("{base}/submit")]);
    let missing = curl(&["-k", &format!("{base}/missing/x")]);
    assert_eq!((get.status, post.status, missing.status), (200, 200, 404));
    assert_eq!(get.body_bytes, "path=/go/hello".len() as i64);
    assert_eq!(post.body_bytes, body.len() as i64);

    let spans = collect_exact(&receiver, &mut agent, 3, 3).await;
    assert_servers_linked_to_clients(&spans);
    let requests = [
        (get, "GET", "/go/hello", 0),
        (post, "POST", "/submit", body.len() as i64),
        (missing, "GET", "/missing/x", 0),
    ];
    for (run, method, path, request_body) in requests {
        let req = TlsRequest {
            run,
            method,
            path,
            request_body,
        };
        check_tls_request(&spans, port, server.pid(), &req);
    }
    // Detached, the server goes on serving.
    let after = curl(&["-k", &format!("{base}/after")]);
    assert_eq!(after.status, 200);
    server.assert_running();
}

/// The gRPC peer `integration/go/gogrpc` (grpc-go over crypto/tls), built once per test run in
/// GOPATH mode against Debian's golang-google-grpc-dev.
fn go_grpc_program() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = root.join("..").join("target").join("gogrpc");
        std::fs::create_dir_all(&out).expect("create target/gogrpc");
        let grpc = Path::new("/usr/share/gocode/src/google.golang.org/grpc");
        assert!(
            grpc.is_dir(),
            "{} is missing: run scripts/setup-test-peers.sh (golang-google-grpc-dev)",
            grpc.display()
        );
        let exe = out.join("gogrpc");
        let mut gopath = std::ffi::OsString::from(out.join("gopath"));
        gopath.push(":/usr/share/gocode");
        let status = Command::new(which("go"))
            .current_dir(root.join("go"))
            .env("GO111MODULE", "off")
            .env("GOPATH", gopath)
            .env("GOCACHE", out.join("cache"))
            .args(["build", "-o"])
            .arg(&exe)
            .arg("./gogrpc")
            .stdin(Stdio::null())
            .status()
            .expect("run go build");
        assert!(status.success(), "go build of gogrpc failed: {status}");
        std::fs::canonicalize(&exe).expect("resolve the gRPC peer")
    })
}

/// gRPC over TLS: a grpc-go client calls grpc.health.v1.Health/Check four times on one
/// connection to a grpc-go server (HTTP/2 over Go's crypto/tls); the odd calls ask for an unknown
/// service and get NOT_FOUND. Each call is one SERVER span under its CLIENT span, with the rpc.*
/// attributes and the TLS version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_go_tls() {
    require_root();
    const CALLS: usize = 4;
    const SERVICE: &str = "grpc.health.v1.Health";
    let exe = go_grpc_program();
    let dir = TempDir::new("tls-go-grpc");
    let port = free_port();
    let server = start_go_server(&dir, exe, port);
    let receiver = receiver().await;
    let mut agent = Agent::start_otlp(&dir, &receiver, port);
    // The client runs the same file, which is then probed already.
    wait_for_attach(&agent, exe);

    let mut cmd = Command::new(exe);
    cmd.args(["client", &port.to_string(), &CALLS.to_string()]);
    let call = run("gogrpc client", cmd);
    let client_port: i64 = call
        .stdout
        .trim()
        .strip_prefix("port ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected gogrpc client output {:?}", call.stdout));

    let spans = collect_exact(&receiver, &mut agent, CALLS, CALLS).await;
    assert_servers_linked_to_clients(&spans);
    let name = format!("{SERVICE}/Check");
    let mut codes = Vec::new();
    for span in &spans {
        assert_eq!(span.name, name, "{}", describe(span));
        expect_str(span, "rpc.system", "grpc");
        expect_str(span, "rpc.service", SERVICE);
        expect_str(span, "rpc.method", "Check");
        expect_str(span, "network.protocol.name", "http");
        expect_str(span, "network.protocol.version", "2");
        expect_str(span, "tls.protocol.version", "1.3");
        expect_int(span, "server.port", i64::from(port));
        assert_within(span, call.started_ns, call.ended_ns);
        let code = span
            .attr_int("rpc.grpc.status_code")
            .unwrap_or_else(|| panic!("no rpc.grpc.status_code in {}", describe(span)));
        match span.kind {
            SpanKind::Server => {
                let pid = span.resource_int("process.pid");
                assert_eq!(pid, Some(i64::from(server.pid())), "{}", describe(span));
                expect_int(span, "client.port", client_port);
                // NOT_FOUND is the caller's problem, not the server's.
                assert_eq!(span.status_code, StatusCode::Unset, "{}", describe(span));
            }
            SpanKind::Client => {
                assert_eq!(span.resource_int("process.pid"), Some(i64::from(call.pid)));
                expect_int(span, "network.local.port", client_port);
                let want = if code == 0 {
                    StatusCode::Unset
                } else {
                    StatusCode::Error
                };
                assert_eq!(span.status_code, want, "{}", describe(span));
                codes.push((span.start_unix_ns, code));
            }
            other => panic!("unexpected {other:?} span: {}", describe(span)),
        }
    }
    codes.sort_unstable();
    let codes: Vec<i64> = codes.into_iter().map(|(_, c)| c).collect();
    assert_eq!(codes, [0, 5, 0, 5], "OK and NOT_FOUND in the order called");
}

/// A Go keep-alive client started after the agent (found when it executes) against nginx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_keep_alive_client_to_nginx_over_tls() {
    let exe = go_program(GoBuild::Symbols);
    keep_alive_client_to_nginx("tls-go-client", 5, Some(exe), |_, port, n| {
        let mut cmd = Command::new(exe);
        cmd.args([
            "get".to_owned(),
            format!("https://127.0.0.1:{port}"),
            "/k".to_owned(),
            n.to_string(),
        ]);
        cmd
    })
    .await;
}

/// Many goroutines of a position-independent Go client send 200 requests over 8 keep-alive
/// connections to a stripped Go server (functions found through `.gopclntab`) started after the
/// agent, whose handlers grow their goroutine stacks: both programs keep working while probed,
/// every request gives exactly one SERVER and one CLIENT span on the same connection, and after
/// the agent stops its probes are gone and the server still serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_client_to_stripped_go_server_under_load() {
    require_root();
    let (client_exe, server_exe) = (go_program(GoBuild::Pie), go_program(GoBuild::Stripped));
    let dir = TempDir::new("tls-go-load");
    let port = free_port();
    let receiver = receiver().await;
    let mut agent = Agent::start_otlp(&dir, &receiver, port);
    let mut server = start_go_server(&dir, server_exe, port);
    wait_for_attach(&agent, server_exe);
    let (links, programs) = bpf_objects(agent_pid());
    let shown = server_exe.display().to_string();
    assert!(
        links.iter().any(|(_, file)| file.contains(&shown)),
        "no uprobe link on {shown} among {links:?}"
    );

    let (n, workers) = (200usize, 8usize);
    let base = format!("https://127.0.0.1:{port}");
    let mut cmd = Command::new(client_exe);
    cmd.args([
        "load".to_owned(),
        base.clone(),
        n.to_string(),
        workers.to_string(),
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    let started_ns = now_unix_ns();
    let mut client = Proc::spawn("gotls load", cmd);
    let lines = Lines::new(client.take_stdout());
    go_ahead_when_probed(&agent, &mut client, &lines, client_exe);
    assert_eq!(lines.next("Go client"), format!("done {n}"));
    let status = client.wait(WAIT);
    let ended_ns = now_unix_ns();
    assert!(status.success(), "Go client failed: {status}");
    server.assert_running();

    let spans = collect_exact(&receiver, &mut agent, n, n).await;
    assert_servers_linked_to_clients(&spans);
    let mut client_ports = BTreeSet::new();
    for i in 0..n {
        let (method, path, request_body, response_body) = if i % 2 == 0 {
            let path = format!("/load/{i}");
            let len = format!("path={path}").len();
            ("GET", path, 0, len)
        } else {
            let len = format!("payload {i}").len();
            ("POST", format!("/echo/{i}"), len, len)
        };
        let s = one(&spans, SpanKind::Server, &path, |s| {
            s.attr_str("url.path") == Some(path.as_str())
        });
        let c = one(&spans, SpanKind::Client, &path, |s| {
            s.attr_str("url.full") == Some(format!("{base}{path}").as_str())
        });
        for span in [s, c] {
            assert_eq!(span.name, method, "name of {}", describe(span));
            expect_str(span, "http.request.method", method);
            expect_str(span, "url.scheme", "https");
            expect_int(span, "http.response.status_code", 200);
            expect_str(span, "server.address", "127.0.0.1");
            expect_int(span, "server.port", i64::from(port));
            expect_int(span, "http.request.body.size", request_body as i64);
            expect_int(span, "http.response.body.size", response_body as i64);
            assert_within(span, started_ns, ended_ns);
        }
        // Both ends of the same connection.
        let local = c.attr_int("network.local.port");
        assert!(local.is_some(), "no local port on {}", describe(c));
        assert_eq!(
            s.attr_int("client.port"),
            local,
            "{}\n{}",
            describe(s),
            describe(c)
        );
        client_ports.insert(local);
        assert_eq!(s.resource_int("process.pid"), Some(i64::from(server.pid())));
        assert_eq!(c.resource_int("process.pid"), Some(i64::from(client.pid())));
    }
    assert!(
        client_ports.len() <= workers,
        "{} connections for {workers} keep-alive workers",
        client_ports.len()
    );

    wait_until_gone(&links, &programs);
    let after = curl(&["-k", &format!("{base}/after")]);
    assert_eq!(after.status, 200);
    server.assert_running();
}

/// `ssl_protocols` that let nginx negotiate TLS 1.3. With TLS 1.3 a keep-alive client's first
/// request can reach nginx in the read that ends the handshake, so nginx's first `SSL_read` makes
/// no socket call: the socket is known from the `SSL_do_handshake` probe.
const TLS_1_2_AND_1_3: &str = "TLSv1.2 TLSv1.3";

/// Every span carries the TLS version its connection's handshake negotiated.
fn expect_tls_version(spans: &[ReceivedSpan], version: &str) {
    for span in spans {
        expect_str(span, "tls.protocol.name", "tls");
        expect_str(span, "tls.protocol.version", version);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_limited_to_tls_1_2_to_nginx() {
    require_root();
    let dir = TempDir::new("tls-nginx-12");
    dir.write("www/v12.txt", "negotiated down\n");
    let port = free_port();
    let receiver = receiver().await;
    // nginx would choose TLS 1.3: the version is the one negotiated, not the server's best.
    let nginx = start_nginx_tls_protocols(&dir, port, TLS_1_2_AND_1_3);
    let mut agent = Agent::start_otlp(&dir, &receiver, port);

    let run = curl(&[
        "-k",
        "--tls-max",
        "1.2",
        &format!("https://127.0.0.1:{port}/v12.txt"),
    ]);
    assert_eq!(run.status, 200);

    let spans = collect_exact(&receiver, &mut agent, 1, 1).await;
    assert_servers_linked_to_clients(&spans);
    expect_tls_version(&spans, "1.2");
    let worker = worker_pid(&spans, nginx.pid());
    let req = TlsRequest {
        run,
        method: "GET",
        path: "/v12.txt",
        request_body: 0,
    };
    check_tls_request(&spans, port, worker, &req);
}

/// PostgreSQL 15's programs.
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// uid and gid of the `postgres` account (the server refuses to run as root).
fn postgres_ids() -> (u32, u32) {
    let name = std::ffi::CString::new("postgres").expect("no NUL in a literal");
    // SAFETY: getpwnam reads a NUL-terminated name; the result is copied out at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(
        !pw.is_null(),
        "no postgres user; run scripts/setup-test-peers.sh"
    );
    // SAFETY: non-null pointer returned by getpwnam just above.
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

/// A PostgreSQL server with `ssl=on` (a self-signed certificate) from a fresh cluster under
/// `dir` on 127.0.0.1:`port`; stopped with SIGINT (fast shutdown) by the caller.
fn start_postgres_tls(dir: &TempDir, port: u16) -> Proc {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let (uid, gid) = postgres_ids();
    let data = dir.path().join("pgdata");
    std::fs::create_dir_all(&data).expect("create pgdata");
    std::os::unix::fs::chown(&data, Some(uid), Some(gid)).expect("chown pgdata");
    let out = Command::new(Path::new(PG_BIN).join("initdb"))
        .arg("-D")
        .arg(&data)
        .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
        .uid(uid)
        .gid(gid)
        .stdin(Stdio::null())
        .output()
        .expect("run initdb");
    assert!(out.status.success(), "initdb failed: {out:?}");
    let (cert, key) = tls_material(dir);
    for (from, name) in [(&cert, "server.crt"), (&key, "server.key")] {
        let to = data.join(name);
        std::fs::copy(from, &to).expect("copy TLS material");
        std::os::unix::fs::chown(&to, Some(uid), Some(gid)).expect("chown TLS material");
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600))
            .expect("chmod TLS material");
    }
    let log = std::fs::File::create(dir.path().join("postgres.log")).expect("create log");
    let mut cmd = Command::new(Path::new(PG_BIN).join("postgres"));
    cmd.arg("-D")
        .arg(&data)
        .args(["-p", &port.to_string(), "-k"])
        .arg(&data)
        .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
        .args(["-c", "ssl=on"])
        .uid(uid)
        .gid(gid)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone log handle"))
        .stderr(log);
    let mut proc = Proc::spawn("postgres", cmd);
    wait_for_port(&mut proc, port);
    proc
}

/// psycopg2-binary's directory (installed by scripts/setup-test-peers.sh) and its libssl, which
/// is OpenSSL 1.1.1.
fn psycopg2_peer() -> (PathBuf, PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("test-peers")
        .join("openssl11");
    let libs = root.join("psycopg2_binary.libs");
    let find = |prefix: &str| {
        std::fs::read_dir(&libs)
            .unwrap_or_else(|e| panic!("{}: {e}; run scripts/setup-test-peers.sh", libs.display()))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                let name = p.file_name().unwrap_or_default().to_string_lossy();
                name.starts_with(prefix) && name.ends_with(".so.1.1")
            })
            .unwrap_or_else(|| panic!("no {prefix}*.so.1.1 in {}", libs.display()))
    };
    let crypto = std::fs::read(find("libcrypto-")).expect("read libcrypto");
    assert!(
        crypto.windows(13).any(|w| w == b"OpenSSL 1.1.1"),
        "psycopg2-binary's libcrypto is not OpenSSL 1.1.1"
    );
    let libssl = std::fs::canonicalize(find("libssl-")).expect("resolve libssl");
    (std::fs::canonicalize(&root).expect("resolve"), libssl)
}

/// OpenSSL 1.1.1 (as psycopg2-binary bundles it with libpq) on the client side, OpenSSL 3 on the
/// PostgreSQL server: two statements with `sslmode=require`, each a CLIENT span from python and a
/// SERVER span from the backend, linked, over TLS 1.3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg2_with_openssl_1_1() {
    require_root();
    let (pydir, libssl) = psycopg2_peer();
    let dir = TempDir::new("tls-openssl11");
    let port = free_port();
    let mut pg = start_postgres_tls(&dir, port);
    let receiver = receiver().await;
    let mut agent = Agent::start_otlp(&dir, &receiver, port);

    let script = format!(
        r#"
import sys
import psycopg2
print("ready", flush=True)
sys.stdin.readline()
conn = psycopg2.connect("host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=require gssencmode=disable")
conn.autocommit = True
cur = conn.cursor()
cur.execute("select 1")
cur.fetchall()
cur.execute("select relname from pg_class where relname = 'pg_type'")
print(cur.fetchall()[0][0], flush=True)
conn.close()
"#
    );
    let mut cmd = Command::new(python());
    cmd.args(["-c", &script])
        .env("PYTHONPATH", &pydir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut client = Proc::spawn("python3 psycopg2", cmd);
    let lines = Lines::new(client.take_stdout());
    assert_eq!(lines.next("psycopg2 client"), "ready");
    // Loaded on import, so probed before the connection starts.
    wait_for_attach(&agent, &libssl);
    let started_ns = now_unix_ns();
    writeln!(client.stdin(), "go").expect("write to the client");
    assert_eq!(lines.next("psycopg2 client"), "pg_type");
    let status = client.wait(WAIT);
    let ended_ns = now_unix_ns();
    assert!(status.success(), "psycopg2 client failed: {status}");

    let spans = collect_exact(&receiver, &mut agent, 2, 2).await;
    pg.signal(libc::SIGINT);
    pg.wait(WAIT);
    assert_servers_linked_to_clients(&spans);
    expect_tls_version(&spans, "1.3");
    let wants = [
        ("select ?", "select", None),
        (
            "select relname from pg_class where relname = ?",
            "select pg_class",
            Some("pg_class"),
        ),
    ];
    for kind in [SpanKind::Client, SpanKind::Server] {
        let mut of_kind: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.kind == kind).collect();
        of_kind.sort_by_key(|s| s.start_unix_ns);
        for (span, (text, summary, collection)) in of_kind.into_iter().zip(wants) {
            let ctx = describe(span);
            assert_eq!(span.name, summary, "{ctx}");
            expect_str(span, "db.system.name", "postgresql");
            expect_str(span, "db.query.text", text);
            expect_int(span, "db.response.returned_rows", 1);
            match collection {
                Some(c) => expect_str(span, "db.collection.name", c),
                None => expect_absent(span, "db.collection.name"),
            }
            assert_within(span, started_ns, ended_ns);
            if kind == SpanKind::Client {
                let pid = span.resource_int("process.pid");
                assert_eq!(pid, Some(i64::from(client.pid())), "{ctx}");
            }
        }
    }
}

/// psql with `sslmode=require`: the SSLRequest, the `S` answer and the TLS handshake go through
/// the syscalls; the statements only through the SSL probes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_with_sslmode_require() {
    require_root();
    let dir = TempDir::new("tls-pg");
    let port = free_port();
    let mut pg = start_postgres_tls(&dir, port);
    let receiver = receiver().await;
    let mut agent = Agent::start_otlp(&dir, &receiver, port);

    let statements = [
        "select 1",
        "create table tls_items (id int, name text)",
        "insert into tls_items values (1, 'a'), (2, 'b')",
        "select name from tls_items where id > 0",
    ];
    let mut cmd = Command::new(Path::new(PG_BIN).join("psql"));
    cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(format!(
            "host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=require gssencmode=disable"
        ));
    for s in statements {
        cmd.args(["-c", s]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let started_ns = now_unix_ns();
    let mut psql = Proc::spawn("psql", cmd);
    let status = psql.wait(WAIT);
    let ended_ns = now_unix_ns();
    assert!(status.success(), "psql failed: {status}");

    let spans = collect_exact(&receiver, &mut agent, 4, 4).await;
    // SIGINT is the fast shutdown: backends end, shared memory is released.
    pg.signal(libc::SIGINT);
    pg.wait(WAIT);
    assert_servers_linked_to_clients(&spans);
    expect_tls_version(&spans, "1.3");
    // (text, summary, collection, returned rows) in the order psql sent them.
    let wants = [
        ("select ?", "select", None, Some(1)),
        (
            "create table tls_items (id int, name text)",
            "create table tls_items",
            Some("tls_items"),
            None,
        ),
        (
            "insert into tls_items values (?, ?), (?, ?)",
            "insert tls_items",
            Some("tls_items"),
            None,
        ),
        (
            "select name from tls_items where id > ?",
            "select tls_items",
            Some("tls_items"),
            Some(2),
        ),
    ];
    let mut server_peers = BTreeSet::new();
    let mut server_pids = BTreeSet::new();
    for kind in [SpanKind::Client, SpanKind::Server] {
        let mut of_kind: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.kind == kind).collect();
        of_kind.sort_by_key(|s| s.start_unix_ns);
        for (span, (text, summary, collection, rows)) in of_kind.into_iter().zip(wants) {
            let ctx = describe(span);
            assert_eq!(span.name, summary, "{ctx}");
            expect_str(span, "db.system.name", "postgresql");
            expect_str(span, "db.namespace", "postgres");
            expect_str(span, "db.query.text", text);
            expect_str(span, "db.query.summary", summary);
            expect_str(span, "server.address", "127.0.0.1");
            expect_int(span, "server.port", i64::from(port));
            match collection {
                Some(c) => expect_str(span, "db.collection.name", c),
                None => expect_absent(span, "db.collection.name"),
            }
            match rows {
                Some(n) => expect_int(span, "db.response.returned_rows", n),
                None => expect_absent(span, "db.response.returned_rows"),
            }
            assert_eq!(span.status_code, StatusCode::Unset, "{ctx}");
            assert_within(span, started_ns, ended_ns);
            if kind == SpanKind::Client {
                assert_eq!(
                    span.resource_int("process.pid"),
                    Some(i64::from(psql.pid())),
                    "{ctx}"
                );
            } else {
                server_peers.insert(span.attr_int("network.peer.port"));
                server_pids.insert(span.resource_int("process.pid"));
            }
        }
    }
    // One connection, one backend: the SSLRequest did not split the connection's identity.
    assert_eq!(server_peers.len(), 1, "{}", describe_all(&spans));
    assert_eq!(server_pids.len(), 1, "{}", describe_all(&spans));
    assert_ne!(
        server_pids.first().copied().flatten(),
        Some(i64::from(pg.pid())),
        "a backend serves, not the postmaster"
    );
}

/// `dlopen_client.py PORT`: starts without ssl; prints `plain`, waits for a line, imports ssl
/// (which loads libssl.so), prints `imported`, waits for a line, makes one HTTPS GET of
/// `/dl.txt` and prints `port <local port> <status>`.
const DLOPEN_CLIENT_PY: &str = r#"
import sys
port = int(sys.argv[1])
print("plain", flush=True)
sys.stdin.readline()
import ssl, http.client
print("imported", flush=True)
sys.stdin.readline()
conn = http.client.HTTPSConnection("127.0.0.1", port, context=ssl._create_unverified_context())
conn.request("GET", "/dl.txt")
resp = conn.getresponse()
resp.read()
print("port %d %d" % (conn.sock.getsockname()[1], resp.status), flush=True)
conn.close()
"#;

/// Whether process `pid` maps a file whose name contains `name`.
fn maps_file(pid: u32, name: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .expect("read maps")
        .lines()
        .any(|l| l.contains(name))
}

/// A libssl loaded with dlopen after the agent started, from a copy no other process maps (so
/// its probes cannot come from an earlier attach to the same file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_loads_libssl_with_dlopen_after_the_agent_started() {
    python_loads_private_libssl("tls-dlopen", false).await;
}

/// A process in another mount namespace: python loads a libssl that exists only inside its own
/// namespace (a tmpfs mounted there, empty seen from the host), so the agent must reach the file
/// through `/proc/<pid>/root`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_in_another_mount_namespace() {
    python_loads_private_libssl("tls-mntns", true).await;
}

/// python (`DLOPEN_CLIENT_PY`) imports `ssl` after the agent is ready, from a libssl.so.3 copied
/// into a directory of its own: on the host, or with `in_namespace` inside a tmpfs that only its
/// own mount namespace sees. One HTTPS GET to nginx must give a CLIENT span from python.
async fn python_loads_private_libssl(name: &str, in_namespace: bool) {
    use std::io::Write as _;
    require_root();
    let dir = TempDir::new(name);
    dir.write("www/dl.txt", "loaded late\n");
    let lib = dir.path().join("lib");
    std::fs::create_dir_all(&lib).expect("create lib dir");
    let system = Path::new("/lib/x86_64-linux-gnu");
    if !in_namespace {
        for name in ["libssl.so.3", "libcrypto.so.3"] {
            std::fs::copy(system.join(name), lib.join(name)).expect("copy the system libssl");
        }
    }
    let port = free_port();
    let receiver = receiver().await;
    let _nginx = start_nginx_tls(&dir, port);
    let mut agent = Agent::start_otlp(&dir, &receiver, port);

    let script = dir.write("dlopen_client.py", DLOPEN_CLIENT_PY);
    let mut cmd = if in_namespace {
        // unshare and sh exec in place: the pid is python's.
        let setup = r#"mount -t tmpfs tmpfs "$1" && cp "$2/libssl.so.3" "$2/libcrypto.so.3" "$1"/ && shift 2 && exec "$@""#;
        let mut cmd = Command::new(which("unshare"));
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            setup,
            "sh",
        ])
        .arg(&lib)
        .arg(system)
        .arg(python());
        cmd
    } else {
        Command::new(python())
    };
    cmd.arg(&script)
        .arg(port.to_string())
        .env("LD_LIBRARY_PATH", &lib)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let started_ns = now_unix_ns();
    let mut client = Proc::spawn("python client", cmd);
    let lines = Lines::new(client.take_stdout());
    assert_eq!(lines.next("python client"), "plain");
    assert!(
        !maps_file(client.pid(), "libssl"),
        "python mapped libssl before importing ssl"
    );
    writeln!(client.stdin(), "go").expect("release the client");
    assert_eq!(lines.next("python client"), "imported");
    let copy = lib.join("libssl.so.3");
    assert!(
        maps_file(client.pid(), &copy.display().to_string()),
        "python did not load the copied libssl"
    );
    assert_eq!(
        copy.exists(),
        !in_namespace,
        "{} seen from the host's mount namespace",
        copy.display()
    );
    // The agent finds the new mapping by its periodic scan, not at exec.
    wait_for_attach(&agent, &copy);
    writeln!(client.stdin(), "go").expect("release the client");
    let line = lines.next("python client");
    let status = client.wait(WAIT);
    let ended_ns = now_unix_ns();
    assert!(status.success(), "client failed: {status}");
    let local_port: i64 = line
        .strip_prefix("port ")
        .and_then(|rest| rest.strip_suffix(" 200"))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected client output {line:?}"));

    let spans = collect_exact(&receiver, &mut agent, 1, 1).await;
    assert_servers_linked_to_clients(&spans);
    let c = one(&spans, SpanKind::Client, "python client", |s| {
        s.resource_int("process.pid") == Some(i64::from(client.pid()))
    });
    expect_str(c, "url.scheme", "https");
    expect_str(c, "url.full", &format!("https://127.0.0.1:{port}/dl.txt"));
    expect_int(c, "http.response.status_code", 200);
    expect_int(c, "network.local.port", local_port);
    expect_str(c, "tls.protocol.version", "1.2");
    assert_within(c, started_ns, ended_ns);
}

/// BoringSSL from Debian's `android-libboringssl` (its headers in `/usr/include/android`).
const BORINGSSL_DIR: &str = "/usr/lib/x86_64-linux-gnu/android";

/// A C client on BoringSSL's `libssl.so.0`: several requests on one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boringssl_keep_alive_client_to_nginx() {
    let dir = TempDir::new("tls-boringssl-build");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("c/boringssl_client.c");
    let exe = dir.path().join("boringssl_client");
    assert!(
        Path::new(BORINGSSL_DIR).join("libssl.so").is_file(),
        "no BoringSSL; run scripts/setup-test-peers.sh"
    );
    let out = Command::new(which("gcc"))
        .arg("-O1")
        .arg("-o")
        .arg(&exe)
        .arg(&source)
        .args([
            "-I/usr/include/android",
            &format!("-L{BORINGSSL_DIR}"),
            "-lssl",
        ])
        .arg(format!("-Wl,-rpath,{BORINGSSL_DIR}"))
        .output()
        .expect("run gcc");
    assert!(out.status.success(), "gcc failed: {out:?}");
    assert!(
        maps_needed(&exe, "libssl.so.0"),
        "the client does not link BoringSSL"
    );
    // The client lives a few milliseconds, less than discovery needs to find a library no
    // running process maps yet (the exec event comes before the loader maps libraries). A
    // process already holding BoringSSL when the agent starts gets its file probed, which then
    // traces every process that maps it.
    let mut hold = Command::new(&exe);
    hold.arg("--hold")
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    let holder = Proc::spawn("boringssl_client --hold", hold);
    let deadline = Instant::now() + WAIT;
    while !maps_file(holder.pid(), &format!("{BORINGSSL_DIR}/libssl.so.0")) {
        assert!(
            Instant::now() < deadline,
            "the holder never mapped BoringSSL"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    keep_alive_client_to_nginx("tls-boringssl", 4, None, move |_, port, n| {
        let mut cmd = Command::new(&exe);
        cmd.args([port.to_string(), n.to_string()]);
        cmd
    })
    .await;
    drop(holder);
}

/// Whether `exe`'s dynamic section needs `lib` (per `ldd`, resolved to BoringSSL's directory).
fn maps_needed(exe: &Path, lib: &str) -> bool {
    let out = Command::new(which("ldd"))
        .arg(exe)
        .output()
        .expect("run ldd");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.contains(lib) && l.contains(BORINGSSL_DIR))
}

/// HTTP/2 over TLS (ALPN h2): curl fetches two files over one connection from nginx; the
/// plaintext from the SSL probes is parsed as HTTP/2, one span per stream on each side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_http2_to_nginx_over_tls() {
    require_root();
    let dir = TempDir::new("tls-h2");
    dir.write("www/a.txt", "first file over h2\n");
    dir.write("www/b.txt", "second\n");
    let port = free_port();
    let receiver = receiver().await;
    let (cert, key) = tls_material(&dir);
    let prefix = dir.path().display().to_string();
    let _nginx = start_nginx(
        &dir,
        port,
        1,
        &format!(
            "    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols {TLS_1_2_AND_1_3};
        root {prefix}/www;
    }}",
            cert = cert.display(),
            key = key.display(),
        ),
    );
    let mut agent = Agent::start_otlp(&dir, &receiver, port);

    let base = format!("https://127.0.0.1:{port}");
    let out = Command::new(which("curl"))
        .args(["-sk", "--http2", "-o", "/dev/null", "-o", "/dev/null"])
        .args(["-w", "%{http_version} %{http_code}\n"])
        .arg(format!("{base}/a.txt"))
        .arg(format!("{base}/b.txt"))
        .stdin(Stdio::null())
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "curl failed: {out:?}");
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        ["2 200", "2 200"],
        "both files over HTTP/2"
    );

    let spans = collect_exact(&receiver, &mut agent, 2, 2).await;
    assert_servers_linked_to_clients(&spans);
    expect_tls_version(&spans, "1.3");
    for path in ["/a.txt", "/b.txt"] {
        let s = one(&spans, SpanKind::Server, path, |s| {
            s.attr_str("url.path") == Some(path)
        });
        let c = one(&spans, SpanKind::Client, path, |s| {
            s.attr_str("url.full") == Some(format!("{base}{path}").as_str())
        });
        for span in [s, c] {
            expect_str(span, "http.request.method", "GET");
            expect_str(span, "network.protocol.version", "2");
            expect_str(span, "url.scheme", "https");
            expect_int(span, "http.response.status_code", 200);
        }
    }
}
