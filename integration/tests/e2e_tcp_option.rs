//! End-to-end test of the trace-context TCP option: two "hosts" (network namespaces joined by a
//! veth pair), each with its own agent that only traces its own processes, so the agents share
//! nothing but what travels in the TCP segments between them.
//!
//! Namespace A runs a python client and a python backend server; namespace B a python "middle"
//! server that calls the backend for each request. A request therefore crosses the boundary
//! twice: client (A) → middle (B) → backend (A). Each agent logs the trace context of every event
//! (`TRACER_LOG=tracer::trace_context=debug`); the test joins the two logs by the connections'
//! addresses and checks that the trace id each sending kernel wrote is the one the receiving
//! kernel read in band, that the middle's onward call carries its request's trace, that requests
//! get different trace ids, and that nothing arrives in band when the sender's option is off.
//! It also checks that each agent attaches one sock_ops program to the cgroup v2 root while it
//! runs and detaches it on shutdown, and that between two ends on one host the ids pass without
//! the option, handed over in the kernel's memory (`trace_ids_pass_between_ends_on_one_host`).

mod common;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use integration::{OtlpReceiver, ReceivedSpan, SpanKind};

const ADDR_A: &str = "10.199.0.1";
const ADDR_B: &str = "10.199.0.2";
const BACKEND_PORT: u16 = 8081;
const MIDDLE_PORT: u16 = 8080;
const REQUESTS: usize = 5;

/// `serve_tls(server, cert, key)`, shared by [`BACKEND_PY`] and [`MIDDLE_PY`] (see [`service`]).
const SERVE_TLS_PY: &str = r#"
def serve_tls(server, cert, key):
    """Serves TLS 1.2 (the request never arrives during the handshake, which another thread
    runs: see docs/linking.md)."""
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)

"#;

/// A service script: `body` after the definitions it shares with the other services.
fn service(body: &str) -> String {
    format!("{SERVE_TLS_PY}{body}")
}

/// `backend.py HOST PORT [CERT KEY]`: answers GET with `backend <path>`, over TLS when given a
/// certificate.
const BACKEND_PY: &str = r#"
import http.server, sys

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("backend " + self.path).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Handler)
if len(sys.argv) > 4:
    serve_tls(server, sys.argv[3], sys.argv[4])
print("listening", flush=True)
server.serve_forever()
"#;

/// `middle.py HOST PORT BACKEND_HOST BACKEND_PORT [CERT KEY]`: for each GET, GETs the same path
/// from the backend on a new connection and answers `middle <backend's body>`; with a certificate,
/// both sides over TLS.
const MIDDLE_PY: &str = r#"
import http.client, http.server, ssl, sys

host, port, backend_host, backend_port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
tls = len(sys.argv) > 6

class Handler(http.server.BaseHTTPRequestHandler):
    # Keeps a client's connection open for its next request (every answer has a length).
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if tls:
            upstream = http.client.HTTPSConnection(
                backend_host, backend_port, timeout=10, context=ssl._create_unverified_context())
        else:
            upstream = http.client.HTTPConnection(backend_host, backend_port, timeout=10)
        upstream.request("GET", self.path)
        answer = upstream.getresponse()
        body = b"middle " + answer.read()
        upstream.close()
        self.send_response(answer.status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer((host, port), Handler)
if tls:
    serve_tls(server, sys.argv[5], sys.argv[6])
print("listening", flush=True)
server.serve_forever()
"#;

/// `client.py HOST PORT N [tls]`: prints `waiting`, waits for a line on stdin, then GETs
/// `/req/0..N`, each on a new connection, printing `port <local port>` per request and `done` at
/// the end.
const CLIENT_PY: &str = r#"
import http.client, ssl, sys

host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tls = len(sys.argv) > 4
print("waiting", flush=True)
sys.stdin.readline()
for i in range(n):
    path = "/req/%d" % i
    if tls:
        conn = http.client.HTTPSConnection(
            host, port, timeout=10, context=ssl._create_unverified_context())
    else:
        conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", path)
    local_port = conn.sock.getsockname()[1]
    answer = conn.getresponse()
    body = answer.read()
    if answer.status != 200 or body != ("middle backend " + path).encode():
        sys.exit("unexpected answer to %s: %d %r" % (path, answer.status, body))
    print("port %d" % local_port, flush=True)
    conn.close()
print("done", flush=True)
"#;

/// Runs `ip <args>`, failing the test if it fails.
fn ip(args: &[&str]) {
    let out = Command::new(which("ip"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run ip {args:?}: {e}"));
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two network namespaces joined by a veth pair (A: 10.199.0.1, B: 10.199.0.2); deleted on drop,
/// also when the test fails half-way through setting them up.
struct Namespaces {
    a: String,
    b: String,
}

impl Namespaces {
    /// `tag` (a few letters) keeps the namespaces of different tests apart.
    fn create(tag: &str) -> Namespaces {
        let id = std::process::id();
        let ns = Namespaces {
            a: format!("{tag}-a-{id}"),
            b: format!("{tag}-b-{id}"),
        };
        let (veth_a, veth_b) = (format!("{tag}a{id}"), format!("{tag}b{id}"));
        ip(&["netns", "add", &ns.a]);
        ip(&["netns", "add", &ns.b]);
        ip(&[
            "link", "add", &veth_a, "netns", &ns.a, "type", "veth", "peer", "name", &veth_b,
            "netns", &ns.b,
        ]);
        for (name, veth, addr) in [(&ns.a, &veth_a, ADDR_A), (&ns.b, &veth_b, ADDR_B)] {
            ip(&[
                "-n",
                name,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                veth,
            ]);
            ip(&["-n", name, "link", "set", veth, "up"]);
            ip(&["-n", name, "link", "set", "lo", "up"]);
        }
        ns
    }

    /// `command args` run inside namespace `name` (`ip netns exec` execs it: same pid).
    fn command(name: &str, program: &std::path::Path, args: &[String]) -> Command {
        let mut cmd = Command::new(which("ip"));
        cmd.args(["netns", "exec", name]).arg(program).args(args);
        cmd
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        // Deleting a namespace removes its end of the veth pair, and with it the other end.
        for name in [&self.a, &self.b] {
            let _ = Command::new(which("ip"))
                .args(["netns", "del", name])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A python script from `dir` run in namespace `ns` (`None`: this one), stdout piped (and stdin
/// when `stdin`).
fn spawn_python(
    dir: &TempDir,
    ns: Option<&str>,
    name: &str,
    script: &str,
    args: &[String],
    stdin: bool,
) -> (Proc, Lines) {
    let path = dir.write(name, script);
    let mut all = vec![path.display().to_string()];
    all.extend_from_slice(args);
    let mut cmd = match ns {
        Some(ns) => Namespaces::command(ns, python(), &all),
        None => {
            let mut cmd = Command::new(python());
            cmd.args(&all);
            cmd
        }
    };
    cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut proc = Proc::spawn(name, cmd);
    let lines = Lines::new(proc.take_stdout());
    (proc, lines)
}

/// The backend in namespace A and the middle in B (over TLS with `cert`, a certificate and key
/// path), once both listen.
fn start_services(dir: &TempDir, ns: &Namespaces, cert: &[String]) -> (Proc, Proc) {
    let mut backend_args = vec![ADDR_A.to_owned(), BACKEND_PORT.to_string()];
    backend_args.extend_from_slice(cert);
    let (backend, backend_out) = spawn_python(
        dir,
        Some(&ns.a),
        "backend.py",
        &service(BACKEND_PY),
        &backend_args,
        false,
    );
    let mut middle_args = vec![
        ADDR_B.to_owned(),
        MIDDLE_PORT.to_string(),
        ADDR_A.to_owned(),
        BACKEND_PORT.to_string(),
    ];
    middle_args.extend_from_slice(cert);
    let (middle, middle_out) = spawn_python(
        dir,
        Some(&ns.b),
        "middle.py",
        &service(MIDDLE_PY),
        &middle_args,
        false,
    );
    assert_eq!(backend_out.next("backend"), "listening");
    assert_eq!(middle_out.next("middle"), "listening");
    (backend, middle)
}

/// `client_keepalive.py HOST PORT N`: as [`CLIENT_PY`], but all `N` requests on one connection.
const CLIENT_KEEPALIVE_PY: &str = r#"
import http.client, sys

host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
print("waiting", flush=True)
sys.stdin.readline()
conn = http.client.HTTPConnection(host, port, timeout=10)
for i in range(n):
    path = "/req/%d" % i
    conn.request("GET", path)
    local_port = conn.sock.getsockname()[1]
    answer = conn.getresponse()
    body = answer.read()
    if answer.status != 200 or body != ("middle backend " + path).encode():
        sys.exit("unexpected answer to %s: %d %r" % (path, answer.status, body))
    print("port %d" % local_port, flush=True)
conn.close()
print("done", flush=True)
"#;

/// The events of `pid` with this role and direction.
fn pick<'a>(
    events: &'a [TraceEvent],
    pid: u32,
    role: &str,
    direction: &str,
) -> Vec<&'a TraceEvent> {
    events
        .iter()
        .filter(|e| e.pid == pid && e.role == role && e.direction == direction)
        .collect()
}

/// The one event whose connection is `local` → `remote`; fails listing `all` otherwise.
fn on_connection<'a>(
    events: &[&'a TraceEvent],
    local: &str,
    remote: &str,
    all: &str,
) -> &'a TraceEvent {
    let found: Vec<&&TraceEvent> = events
        .iter()
        .filter(|e| e.local == local && e.remote == remote)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one event on {local} -> {remote}; agent logs:\n{all}"
    );
    found[0]
}

/// The cgroup v2 root the agents attach to (as the agent finds it: the cgroup2 mount of `/`).
fn cgroup2_root() -> PathBuf {
    let text = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    text.lines()
        .filter_map(|l| {
            let (before, after) = l.split_once(" - ")?;
            let mut f = before.split_whitespace().skip(3);
            let (root, point) = (f.next()?, f.next()?);
            (after.starts_with("cgroup2 ") && root == "/").then(|| PathBuf::from(point))
        })
        .next()
        .expect("a cgroup2 mount (the agent mounts one if none: run `tracer check` first)")
}

/// How many sock_ops programs are attached to the cgroup at `path` itself (BPF_PROG_QUERY).
fn sock_ops_programs(path: &std::path::Path) -> u32 {
    #[repr(C)]
    struct QueryAttr {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
    }
    const BPF_PROG_QUERY: libc::c_long = 16;
    const BPF_CGROUP_SOCK_OPS: u32 = 3;
    let dir = std::fs::File::open(path).expect("open the cgroup");
    let mut attr = QueryAttr {
        target_fd: u32::try_from(dir.as_raw_fd()).expect("fd"),
        attach_type: BPF_CGROUP_SOCK_OPS,
        query_flags: 0,
        attach_flags: 0,
        prog_ids: 0,
        prog_cnt: 0,
        _pad: 0,
    };
    // SAFETY: `attr` is a valid BPF_PROG_QUERY attribute block of the size passed; with no id
    // buffer the kernel only writes the count into it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            std::ptr::from_mut(&mut attr),
            std::mem::size_of::<QueryAttr>(),
        )
    };
    assert_eq!(
        rc,
        0,
        "BPF_PROG_QUERY failed: {}",
        std::io::Error::last_os_error()
    );
    attr.prog_cnt
}

/// Both agents, started together: A traces `pids_a` (with `extra_a` flags), B traces `pid_b`.
fn start_agents(
    dir_a: &TempDir,
    dir_b: &TempDir,
    pids_a: &[u32],
    pid_b: u32,
    extra_a: &[&str],
) -> (Agent, Agent) {
    start_agents_with(dir_a, dir_b, pids_a, pid_b, extra_a, &[])
}

/// [`start_agents`] with `env` added to both agents' environment.
fn start_agents_with(
    dir_a: &TempDir,
    dir_b: &TempDir,
    pids_a: &[u32],
    pid_b: u32,
    extra_a: &[&str],
    extra_env: &[(&str, &str)],
) -> (Agent, Agent) {
    let mut env = vec![("TRACER_LOG", "info,tracer::trace_context=debug")];
    env.extend_from_slice(extra_env);
    let mut args_a: Vec<String> = pids_a
        .iter()
        .flat_map(|p| ["--pid".to_owned(), p.to_string()])
        .collect();
    args_a.extend(extra_a.iter().map(|s| (*s).to_owned()));
    let a = Agent::start_with_env(dir_a, &args_a, &env);
    let b = Agent::start_with_env(dir_b, &["--pid".to_owned(), pid_b.to_string()], &env);
    (a, b)
}

/// Lets `client` run its requests; returns the local port of each.
fn run_client(client: &mut Proc, lines: &Lines) -> Vec<u16> {
    client.stdin().write_all(b"go\n").expect("start the client");
    let mut ports = Vec::new();
    loop {
        let line = lines.next("client");
        if line == "done" {
            break;
        }
        let port = line
            .strip_prefix("port ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected client output {line:?}"));
        ports.push(port);
    }
    assert!(client.wait(WAIT).success(), "client failed");
    assert_eq!(ports.len(), REQUESTS);
    ports
}

#[test]
fn trace_ids_cross_hosts_in_tcp_options() {
    require_root();
    let cgroup = cgroup2_root();
    let attached_before = sock_ops_programs(&cgroup);
    let dir = TempDir::new("tcpopt");
    let ns = Namespaces::create("to");

    let (mut backend, mut middle) = start_services(&dir, &ns, &[]);
    let client_args = [
        ADDR_B.to_owned(),
        MIDDLE_PORT.to_string(),
        REQUESTS.to_string(),
    ];
    // The client in namespace A, once it waits for its go.
    let spawn_client = || {
        let (client, out) = spawn_python(
            &dir,
            Some(&ns.a),
            "client.py",
            CLIENT_PY,
            &client_args,
            true,
        );
        assert_eq!(out.next("client"), "waiting");
        (client, out)
    };

    // Phase 1: both agents carry trace ids.
    let (mut client, client_out) = spawn_client();
    let (dir_a, dir_b) = (
        TempDir::new("tcpopt-agent-a"),
        TempDir::new("tcpopt-agent-b"),
    );
    let (mut agent_a, mut agent_b) = start_agents(
        &dir_a,
        &dir_b,
        &[client.pid(), backend.pid()],
        middle.pid(),
        &[],
    );
    for agent in [&agent_a, &agent_b] {
        assert!(
            agent.stderr().contains("tcp_option=true"),
            "the option should run on this kernel:\n{}",
            agent.stderr()
        );
    }
    assert_eq!(
        sock_ops_programs(&cgroup),
        attached_before + 2,
        "each agent attaches one sock_ops program to {}",
        cgroup.display()
    );
    let ports = run_client(&mut client, &client_out);
    agent_a.stop();
    agent_b.stop();
    assert_eq!(
        sock_ops_programs(&cgroup),
        attached_before,
        "the agents detach their sock_ops programs on shutdown"
    );
    backend.assert_running();
    middle.assert_running();

    let (log_a, log_b) = (agent_a.stderr(), agent_b.stderr());
    let all = format!("== agent A\n{log_a}\n== agent B\n{log_b}");
    let (events_a, events_b) = (trace_events(&log_a), trace_events(&log_b));
    let client_writes = pick(&events_a, client.pid(), "client", "send");
    let middle_reads = pick(&events_b, middle.pid(), "server", "recv");
    let middle_calls = pick(&events_b, middle.pid(), "client", "send");
    let backend_reads = pick(&events_a, backend.pid(), "server", "recv");
    for (what, events) in [
        ("client writes", &client_writes),
        ("middle reads", &middle_reads),
        ("middle calls", &middle_calls),
        ("backend reads", &backend_reads),
    ] {
        assert_eq!(events.len(), REQUESTS, "{what}; agent logs:\n{all}");
    }
    let middle_addr = format!("{ADDR_B}:{MIDDLE_PORT}");
    let backend_addr = format!("{ADDR_A}:{BACKEND_PORT}");
    let mut traces = BTreeSet::new();
    for port in ports {
        let client_end = format!("{ADDR_A}:{port}");
        // The client starts the trace: its kernel generated the id it wrote.
        let sent = on_connection(&client_writes, &client_end, &middle_addr, &all);
        assert!(sent.generated && !sent.in_band, "{sent:?}");
        // The middle's kernel read exactly that id, in band, on the other end of the connection.
        let read = on_connection(&middle_reads, &middle_addr, &client_end, &all);
        assert_eq!(read.trace_id, sent.trace_id, "client → middle\n{all}");
        assert!(read.in_band && !read.generated, "{read:?}");
        // The middle's call to the backend, made while serving that request, carries its trace...
        let call = middle_calls
            .iter()
            .find(|e| e.trace_id == sent.trace_id)
            .unwrap_or_else(|| panic!("no middle call with trace {}\n{all}", sent.trace_id));
        assert_eq!(call.remote, backend_addr);
        assert!(call.in_band && !call.generated, "{call:?}");
        // ...and the backend's kernel read it in band on that connection.
        let served = on_connection(&backend_reads, &backend_addr, &call.local, &all);
        assert_eq!(served.trace_id, sent.trace_id, "middle → backend\n{all}");
        assert!(served.in_band && !served.generated, "{served:?}");
        traces.insert(sent.trace_id.clone());
    }
    assert_eq!(traces.len(), REQUESTS, "each request has its own trace");

    // Phase 2: the sender's option is off: nothing arrives in band at the middle.
    let (mut client, client_out) = spawn_client();
    let (dir_a, dir_b) = (
        TempDir::new("tcpopt-agent-a"),
        TempDir::new("tcpopt-agent-b"),
    );
    let (mut agent_a, mut agent_b) = start_agents(
        &dir_a,
        &dir_b,
        &[client.pid(), backend.pid()],
        middle.pid(),
        &["--no-tcp-option"],
    );
    assert!(agent_a.stderr().contains("tcp_option=false"));
    assert_eq!(sock_ops_programs(&cgroup), attached_before + 1);
    run_client(&mut client, &client_out);
    agent_a.stop();
    agent_b.stop();
    let (log_a, log_b) = (agent_a.stderr(), agent_b.stderr());
    let all = format!("== agent A\n{log_a}\n== agent B\n{log_b}");
    assert!(
        trace_events(&log_a).is_empty(),
        "an agent without the option reports no trace context:\n{all}"
    );
    let events_b = trace_events(&log_b);
    let middle_reads = pick(&events_b, middle.pid(), "server", "recv");
    assert_eq!(middle_reads.len(), REQUESTS, "{all}");
    for read in &middle_reads {
        assert!(
            read.generated && !read.in_band,
            "received in band from a sender without the option: {read:?}\n{all}"
        );
        assert!(
            !traces.contains(&read.trace_id),
            "a trace id of phase 1 came back: {read:?}"
        );
    }
    let ids: BTreeSet<&String> = middle_reads.iter().map(|e| &e.trace_id).collect();
    assert_eq!(ids.len(), REQUESTS, "each request has its own trace");
    // The middle (option on) still starts its calls with the trace it generated.
    let calls = pick(&events_b, middle.pid(), "client", "send");
    let call_ids: BTreeSet<&String> = calls.iter().map(|e| &e.trace_id).collect();
    assert_eq!(call_ids, ids, "{all}");
}

/// Requests that follow one another on one kept-alive connection each carry their own trace id,
/// and the receiving kernel attributes each read to the id that came with its bytes (its entry
/// for the connection is rewritten in place per request, not replaced).
#[test]
fn trace_ids_follow_requests_on_a_kept_alive_connection() {
    kept_alive_connection(&[]);
}

/// The same with socket reads and writes taken by the syscall programs, as kernels before 6.3
/// take them (this kernel's socket-layer tracepoints turned off).
#[test]
fn trace_ids_follow_requests_on_a_kept_alive_connection_at_syscalls() {
    kept_alive_connection(&[("TRACER_SOCKET_HOOKS", "0")]);
}

/// The same with socket writes started at their syscall's entry, which chooses the TCP option's
/// trace id, and ended at the socket layer, as kernels from 6.3 without `tcp_sendmsg_locked`
/// (6.12) take them.
#[test]
fn trace_ids_follow_requests_on_a_kept_alive_connection_with_write_exits() {
    kept_alive_connection(&[("TRACER_SOCKET_HOOKS", "exits")]);
}

/// The same with the socket-layer programs as raw tracepoints (see `local_ends`).
#[test]
fn trace_ids_follow_requests_on_a_kept_alive_connection_with_raw_tracepoints() {
    kept_alive_connection(&[("TRACER_SOCKET_BTF", "0")]);
}

/// [`trace_ids_follow_requests_on_a_kept_alive_connection`], the agents run with `env`.
fn kept_alive_connection(env: &[(&str, &str)]) {
    require_root();
    let dir = TempDir::new("tcpopt-ka");
    let ns = Namespaces::create("tk");
    let (mut backend, mut middle) = start_services(&dir, &ns, &[]);
    let (mut client, client_out) = spawn_python(
        &dir,
        Some(&ns.a),
        "client_keepalive.py",
        CLIENT_KEEPALIVE_PY,
        &[
            ADDR_B.to_owned(),
            MIDDLE_PORT.to_string(),
            REQUESTS.to_string(),
        ],
        true,
    );
    assert_eq!(client_out.next("client"), "waiting");
    let (dir_a, dir_b) = (
        TempDir::new("tcpopt-ka-agent-a"),
        TempDir::new("tcpopt-ka-agent-b"),
    );
    let (mut agent_a, mut agent_b) = start_agents_with(
        &dir_a,
        &dir_b,
        &[client.pid(), backend.pid()],
        middle.pid(),
        &[],
        env,
    );
    let ports = run_client(&mut client, &client_out);
    agent_a.stop();
    agent_b.stop();
    backend.assert_running();
    middle.assert_running();
    assert!(
        ports.iter().all(|&p| p == ports[0]),
        "one connection: {ports:?}"
    );

    let (log_a, log_b) = (agent_a.stderr(), agent_b.stderr());
    let all = format!("== agent A\n{log_a}\n== agent B\n{log_b}");
    let taken_at = if env.contains(&("TRACER_SOCKET_HOOKS", "0")) {
        r#"reads="syscalls" writes="syscalls""#
    } else if env.contains(&("TRACER_SOCKET_HOOKS", "exits")) {
        r#"reads="socket layer" writes="syscall entries, socket-layer exits""#
    } else {
        r#"reads="socket layer" writes="socket layer""#
    };
    let programs = socket_programs(env);
    assert!(
        [taken_at, programs]
            .iter()
            .all(|s| log_a.contains(s) && log_b.contains(s)),
        "expected {taken_at} {programs}:\n{all}"
    );
    let (events_a, events_b) = (trace_events(&log_a), trace_events(&log_b));
    let sent = pick(&events_a, client.pid(), "client", "send");
    let read = pick(&events_b, middle.pid(), "server", "recv");
    assert_eq!(sent.len(), REQUESTS, "client writes; agent logs:\n{all}");
    assert_eq!(read.len(), REQUESTS, "middle reads; agent logs:\n{all}");
    for (s, r) in sent.iter().zip(&read) {
        assert!(s.generated && !s.in_band, "{s:?}");
        assert!(r.in_band && !r.generated, "{r:?}\n{all}");
    }
    let sent_ids: Vec<&String> = sent.iter().map(|e| &e.trace_id).collect();
    let read_ids: Vec<&String> = read.iter().map(|e| &e.trace_id).collect();
    assert_eq!(read_ids, sent_ids, "request by request\n{all}");
    let distinct: BTreeSet<&String> = sent_ids.iter().copied().collect();
    assert_eq!(distinct.len(), REQUESTS, "each request has its own trace");
}

/// The whole point of the option: the two agents' spans form one trace per request, in order,
/// across both host boundaries (client in A → middle in B → backend in A), although each agent
/// sees only its own host's processes and the agents never talk to each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_link_across_hosts() {
    link_across_hosts(false, false).await;
}

/// The same over TLS (OpenSSL through python's `ssl`): the SSL probes report the trace id the
/// kernel chose for the ciphertext underneath, and both ends derive the client span's id from the
/// request's plaintext offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_link_across_hosts_over_tls() {
    link_across_hosts(true, false).await;
}

/// A chain whose first hop stays on one host: the client runs beside the middle in B and calls it
/// at B's own address, so that connection carries no option (the client's kernel hands the
/// trace id to the middle's socket in memory, `trace_ids_pass_between_ends_on_one_host`); the
/// middle's call to A carries the option. Each request is still one trace of four spans.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_link_across_a_local_hop_and_hosts() {
    link_across_hosts(false, true).await;
}

/// Client → middle (B) → backend (A), over TLS with `tls`; the client in A, or with `local_hop`
/// in B.
async fn link_across_hosts(tls: bool, local_hop: bool) {
    require_root();
    let dir = TempDir::new(if tls { "xhost-tls" } else { "xhost" });
    let ns = Namespaces::create(match (tls, local_hop) {
        (true, _) => "xt",
        (false, false) => "xh",
        (false, true) => "xl",
    });
    let cert_args = if tls {
        let (cert, key) = tls_material(&dir);
        vec![cert.display().to_string(), key.display().to_string()]
    } else {
        Vec::new()
    };
    let (backend, middle) = start_services(&dir, &ns, &cert_args);
    let mut client_args = vec![
        ADDR_B.to_owned(),
        MIDDLE_PORT.to_string(),
        REQUESTS.to_string(),
    ];
    if tls {
        client_args.push("tls".to_owned());
    }
    let client_ns = if local_hop { &ns.b } else { &ns.a };
    let (mut client, client_out) = spawn_python(
        &dir,
        Some(client_ns),
        "client.py",
        CLIENT_PY,
        &client_args,
        true,
    );
    assert_eq!(client_out.next("client"), "waiting");

    let receiver = OtlpReceiver::start_grpc().await.expect("OTLP receiver");
    let export = |pids: &[u32]| {
        let mut args = Agent::otlp_args(&receiver);
        args.extend(
            pids.iter()
                .flat_map(|p| ["--pid".to_owned(), p.to_string()]),
        );
        args
    };
    let (dir_a, dir_b) = (TempDir::new("xhost-agent-a"), TempDir::new("xhost-agent-b"));
    let (pids_a, pids_b) = if local_hop {
        (vec![backend.pid()], vec![client.pid(), middle.pid()])
    } else {
        (vec![client.pid(), backend.pid()], vec![middle.pid()])
    };
    let mut agent_a = Agent::start(&dir_a, &export(&pids_a));
    let mut agent_b = Agent::start(&dir_b, &export(&pids_b));
    run_client(&mut client, &client_out);

    let want = 2 * REQUESTS;
    let waited = receiver
        .wait_for(
            |s| count(s, SpanKind::Server) >= want && count(s, SpanKind::Client) >= want,
            WAIT,
        )
        .await;
    agent_a.stop();
    agent_b.stop();
    let logs = format!(
        "== agent A\n{}\n== agent B\n{}",
        agent_a.stderr(),
        agent_b.stderr()
    );
    let spans = waited.unwrap_or_else(|spans| {
        panic!(
            "expected {want} SERVER and {want} CLIENT spans; got:\n{}\n{logs}",
            describe_all(&spans)
        )
    });
    assert_eq!(spans.len(), 2 * want, "{}", describe_all(&spans));

    let pid = |s: &ReceivedSpan| s.resource_int("process.pid").unwrap_or(0) as u32;
    // SERVER spans carry url.path, CLIENT spans url.full.
    let path_of = |s: &ReceivedSpan| -> Option<String> {
        s.attr_str("url.path").map(str::to_owned).or_else(|| {
            let full = s.attr_str("url.full")?;
            let rest = full.split_once("://")?.1;
            Some(rest[rest.find('/')?..].to_owned())
        })
    };
    let hop = |kind: SpanKind, who: u32, path: &str| -> &ReceivedSpan {
        let path = Some(path.to_owned());
        let path = &path;
        let found: Vec<&ReceivedSpan> = spans
            .iter()
            .filter(|s| s.kind == kind && pid(s) == who && &path_of(s) == path)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{kind:?} of pid {who} for {path:?}:\n{}",
            describe_all(&spans)
        );
        found[0]
    };
    let mut traces = BTreeSet::new();
    for i in 0..REQUESTS {
        let path = format!("/req/{i}");
        let first = hop(SpanKind::Client, client.pid(), &path);
        let at_middle = hop(SpanKind::Server, middle.pid(), &path);
        let onward = hop(SpanKind::Client, middle.pid(), &path);
        let at_backend = spans
            .iter()
            .find(|s| {
                s.kind == SpanKind::Server
                    && s.attr_str("url.path") == Some(path.as_str())
                    && pid(s) != middle.pid()
            })
            .unwrap_or_else(|| panic!("backend SERVER span for {path}"));
        let chain = [first, at_middle, onward, at_backend];
        let ctx = || {
            format!(
                "{path}:\n{}\n{logs}",
                describe_all(&chain.iter().map(|s| (*s).clone()).collect::<Vec<_>>())
            )
        };
        assert!(
            chain.iter().all(|s| s.trace_id == first.trace_id),
            "one trace across both hosts: {}",
            ctx()
        );
        assert_eq!(first.parent_span_id, None, "{}", ctx());
        assert_eq!(
            at_middle.parent_span_id.as_deref(),
            Some(first.span_id.as_str()),
            "host A → host B: {}",
            ctx()
        );
        assert_eq!(
            onward.parent_span_id.as_deref(),
            Some(at_middle.span_id.as_str()),
            "inside the middle: {}",
            ctx()
        );
        assert_eq!(
            at_backend.parent_span_id.as_deref(),
            Some(onward.span_id.as_str()),
            "host B → host A: {}",
            ctx()
        );
        traces.insert(first.trace_id.clone());
    }
    assert_eq!(traces.len(), REQUESTS, "one trace per request");
}

/// `local.py N`: two HTTP servers on this host in threads of the script, one on 127.0.0.1 and one
/// dual-stack on `::` (its accepted sockets are IPv6 with IPv4-mapped addresses); prints
/// `waiting`, waits for a line on stdin, then GETs `/ka/0..N` from the first on one kept-alive
/// connection and `/ds/0..N` from the second, from an IPv4 socket, on a new connection each, and
/// prints `done`.
const LOCAL_PY: &str = r#"
import http.client, http.server, socket, socketserver, sys, threading

n = int(sys.argv[1])

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = ("local " + self.path).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

class Server(http.server.ThreadingHTTPServer):
    def server_bind(self):
        # No name lookup of the address (HTTPServer's own server_bind does one).
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "local", self.server_address[1]

class DualStack(Server):
    address_family = socket.AF_INET6

servers = [Server(("127.0.0.1", 0), Handler), DualStack(("::", 0), Handler)]
for server in servers:
    threading.Thread(target=server.serve_forever, daemon=True).start()
print("waiting", flush=True)
sys.stdin.readline()

def get(conn, path):
    conn.request("GET", path)
    answer = conn.getresponse()
    body = answer.read()
    if answer.status != 200 or body != ("local " + path).encode():
        sys.exit("unexpected answer to %s: %d %r" % (path, answer.status, body))

conn = http.client.HTTPConnection("127.0.0.1", servers[0].server_port, timeout=10)
for i in range(n):
    get(conn, "/ka/%d" % i)
conn.close()
for i in range(n):
    conn = http.client.HTTPConnection("127.0.0.1", servers[1].server_port, timeout=10)
    get(conn, "/ds/%d" % i)
    conn.close()
print("done", flush=True)
"#;

/// The port of an event's `address:port` end.
fn port_of(end: &str) -> &str {
    end.rsplit(':').next().unwrap_or(end)
}

/// When both ends of a connection are on one host the agent sees both, and the client's write
/// hands its trace id to the receiving socket in the kernel's memory: the server's read gets it
/// in band, request by request, on a kept-alive connection and on new ones (to a dual-stack
/// server too, whose side of the tuple is IPv6), and no TCP option is written. With
/// `TRACER_TCP_OPTION_LOCAL=1` the same ids travel in the option instead.
#[test]
fn trace_ids_pass_between_ends_on_one_host() {
    require_root();
    local_ends(&[], false);
    // Writes started at their syscall's entry, as kernels before 6.3 (and 6.12) take them.
    local_ends(&[("TRACER_SOCKET_HOOKS", "0")], false);
    // The socket-layer programs as raw tracepoints, which read the socket through a helper,
    // where a kernel refuses the BTF ones.
    local_ends(&[("TRACER_SOCKET_BTF", "0")], false);
    local_ends(&[("TRACER_TCP_OPTION_LOCAL", "1")], true);
}

/// The kind of the socket-layer programs an agent run with `env` attaches, as it logs them.
fn socket_programs(env: &[(&str, &str)]) -> &'static str {
    if env.contains(&("TRACER_SOCKET_HOOKS", "0")) {
        r#"read_tracepoints="none" write_tracepoints="none""#
    } else if env.contains(&("TRACER_SOCKET_BTF", "0")) {
        r#"read_tracepoints="raw" write_tracepoints="raw""#
    } else {
        r#"read_tracepoints="BTF" write_tracepoints="BTF""#
    }
}

/// [`trace_ids_pass_between_ends_on_one_host`] with the agent run with `env`; `on_the_wire`:
/// whether the ids travel in the TCP option.
fn local_ends(env: &[(&str, &str)], on_the_wire: bool) {
    let dir = TempDir::new("tcpopt-local");
    let (mut script, out) = spawn_python(
        &dir,
        None,
        "local.py",
        LOCAL_PY,
        &[REQUESTS.to_string()],
        true,
    );
    assert_eq!(out.next("local.py"), "waiting");
    let mut all_env = vec![("TRACER_LOG", "info,tracer::trace_context=debug")];
    all_env.extend_from_slice(env);
    let agent_dir = TempDir::new("tcpopt-local-agent");
    let mut agent = Agent::start_with_env(
        &agent_dir,
        &["--pid".to_owned(), script.pid().to_string()],
        &all_env,
    );
    script.stdin().write_all(b"go\n").expect("start the client");
    assert_eq!(out.next("local.py"), "done");
    assert!(script.wait(WAIT).success(), "local.py failed");
    agent.stop();

    let log = agent.stderr();
    let programs = socket_programs(env);
    assert!(log.contains(programs), "expected {programs}:\n{log}");
    let events = trace_events(&log);
    let sent = pick(&events, script.pid(), "client", "send");
    let read = pick(&events, script.pid(), "server", "recv");
    assert_eq!(sent.len(), 2 * REQUESTS, "client writes; agent log:\n{log}");
    assert_eq!(read.len(), 2 * REQUESTS, "server reads; agent log:\n{log}");
    // One request at a time: the reads come in the order of the writes.
    for (s, r) in sent.iter().zip(&read) {
        assert_eq!(port_of(&r.remote), port_of(&s.local), "{s:?} {r:?}\n{log}");
        assert!(s.generated && !s.in_band, "{s:?}");
        assert!(r.in_band && !r.generated, "{r:?}\n{log}");
        assert_eq!(r.trace_id, s.trace_id, "request by request\n{log}");
    }
    let distinct: BTreeSet<&String> = sent.iter().map(|e| &e.trace_id).collect();
    assert_eq!(
        distinct.len(),
        2 * REQUESTS,
        "each request has its own trace"
    );
    let written = kernel_counter(&log, "tcp_option_written");
    let received = kernel_counter(&log, "tcp_option_read");
    if on_the_wire {
        assert!(
            written >= 2 * REQUESTS as u64 && received >= 2 * REQUESTS as u64,
            "options written {written}, read {received}:\n{log}"
        );
    } else {
        assert_eq!((written, received), (0, 0), "options on the wire:\n{log}");
    }
}

/// Opaque request/response rounds over one loopback connection: bytes no parser recognises, so
/// the agent gives up on the connection after its first writes.
const OPAQUE_PY: &str = r#"
import socket, sys, time

rounds = int(sys.argv[1])
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
client = socket.create_connection(srv.getsockname())
server, _ = srv.accept()
for s in (client, server):
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for i in range(rounds):
    client.sendall(b"\x01\x02\x03\x04opaque-request-%06d" % i)
    server.recv(64)
    server.sendall(b"\x05\x06\x07\x08opaque-response-%06d" % i)
    client.recv(64)
    time.sleep(0.003)
print("done", flush=True)
"#;

/// The value of `kernel_events_total{what}` in the agent's last metrics line.
fn kernel_counter(stderr: &str, what: &str) -> u64 {
    logged_metric(
        stderr,
        &format!("tracer_kernel_events_total{{what=\"{what}\"}}"),
    )
}

/// A client connection the agent ignores (no protocol detected) is given trace ids by its first
/// writes, before userspace has looked at its bytes. Once the agent gives up on it, the id is
/// forgotten and the sock_ops program stops running for the socket: the option is not written on
/// the rest of the connection's segments.
#[test]
fn ignored_connections_stop_carrying_trace_ids() {
    require_root();
    const ROUNDS: u64 = 400;
    let dir = TempDir::new("tcpopt-ignored");
    // A loopback connection: the option is on the wire only when asked for there.
    let mut agent = Agent::start_with_env(&dir, &[], &[("TRACER_TCP_OPTION_LOCAL", "1")]);
    assert!(
        agent.stderr().contains("tcp_option=true"),
        "the option should run on this kernel:\n{}",
        agent.stderr()
    );
    let path = dir.write("opaque.py", OPAQUE_PY);
    let mut cmd = Command::new(python());
    cmd.arg(&path)
        .arg(ROUNDS.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut script = Proc::spawn("opaque.py", cmd);
    let out = Lines::new(script.take_stdout());
    assert_eq!(out.next("opaque.py"), "done");
    script.wait(Duration::from_secs(10));
    agent.stop();
    let log = agent.stderr();
    let written = kernel_counter(&log, "tcp_option_written");
    let stopped = kernel_counter(&log, "tcp_option_stopped");
    assert!(
        stopped >= 1,
        "no socket stopped its option callbacks (written {written}):\n{log}"
    );
    // Each round is one client write (one segment). Detection gives up after a few of them;
    // without the stop every round would carry the option.
    assert!(
        written > 0 && written < ROUNDS / 2,
        "{written} options written over {ROUNDS} rounds"
    );
    // Every read on these sockets ran its trace-context program, which handed over to the exit
    // program each time.
    assert_eq!(kernel_counter(&log, "tail_call_failed"), 0, "{log}");
}
