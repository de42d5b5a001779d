//! Harness shared by the end-to-end tests: the agent binary, real servers and clients run as child
//! processes that are killed even when a test panics, and helpers to pick and show received spans.

// Each test binary includes this module and uses a different subset of it.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use integration::{OtlpReceiver, ReceivedSpan, SpanKind};

/// How long to wait for spans, a server to listen or a client to finish.
pub const WAIT: Duration = Duration::from_secs(20);
/// How long the agent may take to load and attach its programs.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the agent may take to flush and exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Tolerance when comparing span times with the test's wall clock: the agent converts kernel
/// monotonic stamps with an offset it measured itself.
pub const CLOCK_SLACK_NS: u64 = 5_000_000;
/// The log line that says the probes are attached.
const READY_LINE: &str = "tracer ready";
/// The agent's batch delay in ms, so spans arrive quickly.
const SCHEDULE_DELAY_MS: &str = "200";

/// Serves GET (body `path=<path>`) and POST (echoes the body) on HTTP/1.1 with keep-alive.
pub const SERVER_PY: &str = r#"
import http.server, sys

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def reply(self, body):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.reply(("path=" + self.path).encode())

    def do_POST(self):
        self.reply(self.rfile.read(int(self.headers.get("Content-Length", "0"))))

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"#;

/// `client.py PORT PREFIX BEFORE AFTER`: on one keep-alive connection, GETs `PREFIX/0..BEFORE`,
/// prints `port <local port>`, then (when AFTER > 0) waits for a line on stdin and GETs the next
/// AFTER paths; prints `done` at the end.
pub const CLIENT_PY: &str = r#"
import http.client, sys

port, prefix, before, after = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
conn = http.client.HTTPConnection("127.0.0.1", port)

def get(i):
    path = "%s/%d" % (prefix, i)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    if resp.status != 200 or body != ("path=" + path).encode():
        sys.exit("unexpected answer to %s: %d %r" % (path, resp.status, body))

for i in range(before):
    get(i)
print("port %d" % conn.sock.getsockname()[1], flush=True)
if after:
    sys.stdin.readline()
    for i in range(before, before + after):
        get(i)
print("done", flush=True)
conn.close()
"#;

/// Fails the test unless it runs as root: the agent needs to load eBPF programs.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the end-to-end tests load eBPF programs and must run as root (euid is {euid})"
    );
}

/// The agent binary: `$TRACER_BIN`, else `<workspace>/target/debug/tracer`.
pub fn tracer_bin() -> PathBuf {
    let path = std::env::var_os("TRACER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
                .join("debug")
                .join("tracer")
        });
    assert!(
        path.is_file(),
        "tracer binary not found at {}: build it with `cargo build -p tracer` or set TRACER_BIN",
        path.display()
    );
    path
}

/// Unix time now, ns.
pub fn now_unix_ns() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    u64::try_from(since.as_nanos()).expect("time fits in u64")
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// This host's name, as the agent reports it in `host.name`.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("read /proc/sys/kernel/hostname")
        .trim()
        .to_owned()
}

/// `program` looked up in `PATH`, then in the sbin directories a non-login `PATH` may lack.
pub fn which(program: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{program} not found in PATH; run scripts/setup-test-peers.sh"))
}

/// File name of the executable `path` finally resolves to (what `/proc/<pid>/exe` shows).
pub fn exe_name(path: &Path) -> String {
    let real = std::fs::canonicalize(path)
        .unwrap_or_else(|e| panic!("cannot resolve {}: {e}", path.display()));
    real.file_name()
        .and_then(OsStr::to_str)
        .expect("executable file name")
        .to_owned()
}

/// The real Python interpreter (not a wrapper script such as a pyenv shim, whose `exec` would
/// change the process's executable after spawn).
pub fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("run python3; run scripts/setup-test-peers.sh");
        assert!(out.status.success(), "python3 failed: {out:?}");
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        assert!(path.is_file(), "python3 reports sys.executable {path:?}");
        path
    })
}

/// `curl -V`'s version as curl puts it in `User-Agent`, e.g. `curl/7.88.1`.
pub fn curl_user_agent() -> String {
    let out = Command::new(which("curl"))
        .arg("--version")
        .output()
        .expect("run curl --version");
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("unexpected curl --version output: {text}"));
    format!("curl/{version}")
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `tracer-e2e-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("tracer-e2e-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `contents` to `name` inside the directory and returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create parent dir");
        }
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes inherited `OTEL_*` and `TRACER_*` variables so neither the agent's configuration nor a
/// traced process's service name depends on the environment the tests run in.
fn clean_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("OTEL_") || k.starts_with("TRACER_") {
            cmd.env_remove(&key);
        }
    }
}

/// Polls until `child` exits or `timeout` passes.
fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => return None,
            Err(e) => panic!("wait for child {}: {e}", child.id()),
        }
    }
}

/// A child process in its own process group; the whole group is killed on drop.
pub struct Proc {
    name: String,
    child: Child,
    reaped: bool,
}

impl Proc {
    /// Spawns `cmd` (with `OTEL_*`/`TRACER_*` removed from its inherited environment).
    pub fn spawn(name: &str, cmd: Command) -> Proc {
        Proc::spawn_with_env(name, cmd, &[])
    }

    /// Spawns `cmd` with a clean environment (see [`Proc::spawn`]) plus `env`.
    pub fn spawn_with_env(name: &str, mut cmd: Command, env: &[(&str, &str)]) -> Proc {
        clean_env(&mut cmd);
        cmd.envs(env.iter().copied());
        cmd.process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({cmd:?}): {e}"));
        Proc {
            name: name.to_owned(),
            child,
            reaped: false,
        }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child's piped stdin.
    pub fn stdin(&mut self) -> &mut std::process::ChildStdin {
        self.child.stdin.as_mut().expect("stdin is piped")
    }

    /// Takes the child's piped stdout.
    pub fn take_stdout(&mut self) -> std::process::ChildStdout {
        self.child.stdout.take().expect("stdout is piped")
    }

    /// Exit status if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let status = self
            .child
            .try_wait()
            .unwrap_or_else(|e| panic!("wait for {}: {e}", self.name));
        self.reaped |= status.is_some();
        status
    }

    /// Waits for the exit, failing the test after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let status = wait_timeout(&mut self.child, timeout)
            .unwrap_or_else(|| panic!("{} did not exit within {timeout:?}", self.name));
        self.reaped = true;
        status
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.pid()).expect("pid fits pid_t");
        // SAFETY: plain syscall; the child is not reaped yet, so the pid still names it.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
    }

    /// Fails the test if the process has already exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.try_wait() {
            panic!("{} exited early: {status}", self.name);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        if let Ok(pgid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: plain syscall; the group leader is not reaped yet, so its id is still ours.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
        let _ = self.child.wait();
    }
}

/// Waits until something accepts connections on 127.0.0.1:`port`, failing if `server` exits.
pub fn wait_for_port(server: &mut Proc, port: u16) {
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        server.assert_running();
        assert!(
            Instant::now() < deadline,
            "{} is not listening on port {port} after {WAIT:?}",
            server.name
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The stock `python3 -m http.server` serving `root` on 127.0.0.1:`port`, with `env` added to its
/// environment.
pub fn start_http_server(root: &Path, port: u16, env: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(python());
    cmd.args([
        "-m",
        "http.server",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
    ])
    .arg("--directory")
    .arg(root)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let mut proc = Proc::spawn_with_env("python3 -m http.server", cmd, env);
    wait_for_port(&mut proc, port);
    proc
}

/// [`SERVER_PY`] run from `dir` as `e2e_server.py` on 127.0.0.1:`port`.
pub fn start_script_server(dir: &TempDir, port: u16) -> Proc {
    let script = dir.write("e2e_server.py", SERVER_PY);
    let mut cmd = Command::new(python());
    cmd.arg(script)
        .arg(port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut proc = Proc::spawn("e2e_server.py", cmd);
    wait_for_port(&mut proc, port);
    proc
}

/// [`CLIENT_PY`] run from `dir` as `e2e_client.py`, stdin and stdout piped.
pub fn spawn_script_client(
    dir: &TempDir,
    port: u16,
    prefix: &str,
    before: u32,
    after: u32,
) -> (Proc, Lines) {
    let script = dir.write("e2e_client.py", CLIENT_PY);
    let mut cmd = Command::new(python());
    cmd.arg(script)
        .args([
            port.to_string(),
            prefix.to_owned(),
            before.to_string(),
            after.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut proc = Proc::spawn("e2e_client.py", cmd);
    let lines = Lines::new(proc.take_stdout());
    (proc, lines)
}

/// Lines read from a child's output on a background thread, so reads can time out.
pub struct Lines(mpsc::Receiver<String>);

impl Lines {
    /// Starts reading `out`.
    pub fn new(out: impl Read + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines(rx)
    }

    /// The next line, failing the test after [`WAIT`] or at end of output.
    pub fn next(&self, what: &str) -> String {
        self.0
            .recv_timeout(WAIT)
            .unwrap_or_else(|e| panic!("no line from {what}: {e}"))
    }
}

/// A finished command: pid, wall-clock window and stdout.
pub struct Run {
    /// Process id.
    pub pid: u32,
    /// Unix ns just before the command was spawned.
    pub started_ns: u64,
    /// Unix ns just after it exited.
    pub ended_ns: u64,
    /// Everything it printed on stdout.
    pub stdout: String,
}

/// Runs `cmd` to completion, failing the test if it fails.
pub fn run(name: &str, mut cmd: Command) -> Run {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let started_ns = now_unix_ns();
    let mut proc = Proc::spawn(name, cmd);
    let mut stdout = String::new();
    proc.take_stdout()
        .read_to_string(&mut stdout)
        .unwrap_or_else(|e| panic!("read the output of {name}: {e}"));
    let status = proc.wait(WAIT);
    let ended_ns = now_unix_ns();
    assert!(
        status.success(),
        "{name} failed: {status}; output:\n{stdout}"
    );
    Run {
        pid: proc.pid(),
        started_ns,
        ended_ns,
        stdout,
    }
}

/// Runs h2load for `requests` requests with `args` (URL last), failing the test unless every
/// request completed with a 2xx status.
pub fn run_h2load(requests: usize, args: &[&str]) -> Run {
    let mut cmd = Command::new(which("h2load"));
    cmd.args(["-n", &requests.to_string()]).args(args);
    let load = run("h2load", cmd);
    let summary = format!("{requests} succeeded, 0 failed, 0 errored");
    assert!(
        load.stdout.contains(&summary) && load.stdout.contains(&format!("{requests} 2xx")),
        "h2load did not complete every request with 2xx:\n{}",
        load.stdout
    );
    load
}

/// One finished curl run.
#[derive(Debug, Clone, Copy)]
pub struct CurlRun {
    /// curl's process id.
    pub pid: u32,
    /// Unix ns just before curl was spawned.
    pub started_ns: u64,
    /// Unix ns just after curl exited.
    pub ended_ns: u64,
    /// `%{http_code}`.
    pub status: u16,
    /// `%{local_port}`: curl's ephemeral port.
    pub local_port: u16,
    /// `%{size_download}`: response body bytes.
    pub body_bytes: i64,
}

/// Runs curl with `args` (one request) and reports what it did; fails if curl fails.
pub fn curl(args: &[&str]) -> CurlRun {
    let mut cmd = Command::new(which("curl"));
    cmd.args([
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{local_port} %{size_download}",
    ])
    .args(args)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    let started_ns = now_unix_ns();
    let mut proc = Proc::spawn("curl", cmd);
    let status = proc.wait(WAIT);
    let ended_ns = now_unix_ns();
    let mut out = String::new();
    proc.take_stdout()
        .read_to_string(&mut out)
        .expect("read curl output");
    assert!(status.success(), "curl {args:?} failed: {status}");
    let fields: Vec<&str> = out.split_whitespace().collect();
    let [code, port, size] = fields[..] else {
        panic!("unexpected curl -w output {out:?}");
    };
    CurlRun {
        pid: proc.pid(),
        started_ns,
        ended_ns,
        status: code.parse().expect("http_code"),
        local_port: port.parse().expect("local_port"),
        body_bytes: size.parse().expect("size_download"),
    }
}

/// The agent under test, stopped with SIGTERM by [`Agent::stop`] and killed on drop otherwise.
pub struct Agent {
    proc: Proc,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Agent {
    /// Starts `tracer run <args>` (batch delay shortened) and waits until its probes are attached.
    pub fn start(dir: &TempDir, args: &[String]) -> Agent {
        Agent::start_with_env(dir, args, &[])
    }

    /// As [`Agent::start`], with `env` added to the agent's environment (e.g. `TRACER_LOG`).
    pub fn start_with_env(dir: &TempDir, args: &[String], env: &[(&str, &str)]) -> Agent {
        let stdout = dir.path().join("agent.stdout");
        let stderr = dir.path().join("agent.stderr");
        let mut cmd = Command::new(tracer_bin());
        cmd.arg("run")
            .args(args)
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).expect("create agent stdout file"))
            .stderr(File::create(&stderr).expect("create agent stderr file"));
        let mut vars = vec![("OTEL_BSP_SCHEDULE_DELAY", SCHEDULE_DELAY_MS)];
        vars.extend_from_slice(env);
        let proc = Proc::spawn_with_env("tracer", cmd, &vars);
        let mut agent = Agent {
            proc,
            stdout,
            stderr,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        while !agent.stderr().contains(READY_LINE) {
            if let Some(status) = agent.proc.try_wait() {
                panic!(
                    "tracer exited before it was ready ({status}); stderr:\n{}",
                    agent.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "tracer not ready after {READY_TIMEOUT:?}; stderr:\n{}",
                agent.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        agent
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The flags that make the agent export to `receiver`.
    pub fn otlp_args(receiver: &OtlpReceiver) -> Vec<String> {
        vec![
            "--otlp-endpoint".to_owned(),
            receiver.endpoint(),
            "--otlp-protocol".to_owned(),
            receiver.protocol().to_owned(),
        ]
    }

    /// Starts the agent exporting to `receiver`, tracing only connections on `port`.
    pub fn start_otlp(dir: &TempDir, receiver: &OtlpReceiver, port: u16) -> Agent {
        Agent::start_otlp_with(dir, receiver, port, &[])
    }

    /// As [`Agent::start_otlp`], with the flags `extra` added.
    pub fn start_otlp_with(
        dir: &TempDir,
        receiver: &OtlpReceiver,
        port: u16,
        extra: &[&str],
    ) -> Agent {
        let mut args = Agent::otlp_args(receiver);
        args.extend(["--port".to_owned(), port.to_string()]);
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        Agent::start(dir, &args)
    }

    /// Everything the agent logged so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Everything the agent printed on stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Sends SIGTERM and asserts a clean exit (status 0) within [`STOP_TIMEOUT`].
    pub fn stop(&mut self) {
        self.proc.assert_running();
        self.proc.signal(libc::SIGTERM);
        let status = wait_timeout(&mut self.proc.child, STOP_TIMEOUT);
        self.proc.reaped |= status.is_some();
        match status {
            Some(s) if s.success() => {}
            Some(s) => panic!(
                "tracer exited with {s} after SIGTERM; stderr:\n{}",
                self.stderr()
            ),
            None => panic!(
                "tracer still running {STOP_TIMEOUT:?} after SIGTERM; stderr:\n{}",
                self.stderr()
            ),
        }
    }
}

/// A short description of `span` for failure messages.
pub fn describe(span: &ReceivedSpan) -> String {
    let mut s = format!(
        "{:?} {:?} service={} pid={:?}",
        span.kind,
        span.name,
        span.resource_str("service.name").unwrap_or("?"),
        span.resource_int("process.pid"),
    );
    for key in [
        "url.path",
        "url.full",
        "http.response.status_code",
        "client.port",
        "network.peer.port",
        "network.local.port",
    ] {
        if let Some(v) = span.attr(key) {
            let _ = write!(s, " {key}={v:?}");
        }
    }
    let _ = write!(
        s,
        " status={:?} start={} end={}",
        span.status_code, span.start_unix_ns, span.end_unix_ns
    );
    s
}

/// One description per line.
pub fn describe_all(spans: &[ReceivedSpan]) -> String {
    spans.iter().map(describe).collect::<Vec<_>>().join("\n")
}

/// The single span of `kind` matching `pred`; fails listing every span otherwise.
pub fn one<'a>(
    spans: &'a [ReceivedSpan],
    kind: SpanKind,
    what: &str,
    pred: impl Fn(&ReceivedSpan) -> bool,
) -> &'a ReceivedSpan {
    let found: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.kind == kind && pred(s)).collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {kind:?} span for {what}, got {}; all spans:\n{}",
        found.len(),
        describe_all(spans)
    );
    found[0]
}

/// Number of spans of `kind`.
pub fn count(spans: &[ReceivedSpan], kind: SpanKind) -> usize {
    spans.iter().filter(|s| s.kind == kind).count()
}

/// Asserts that `span` lies within the wall-clock window [`started_ns`, `ended_ns`].
pub fn assert_within(span: &ReceivedSpan, started_ns: u64, ended_ns: u64) {
    assert!(
        span.start_unix_ns <= span.end_unix_ns,
        "span ends before it starts: {}",
        describe(span)
    );
    assert!(
        span.start_unix_ns + CLOCK_SLACK_NS >= started_ns
            && span.end_unix_ns <= ended_ns + CLOCK_SLACK_NS,
        "span outside the window [{started_ns}, {ended_ns}] in which the request ran: {}",
        describe(span)
    );
}

/// Asserts the resource of a span from process `pid`.
pub fn assert_resource(span: &ReceivedSpan, service: &str, pid: u32, exe: &str) {
    let ctx = describe(span);
    assert_eq!(
        span.resource_str("service.name"),
        Some(service),
        "service.name: {ctx}"
    );
    assert_eq!(
        span.resource_int("process.pid"),
        Some(i64::from(pid)),
        "process.pid: {ctx}"
    );
    assert_eq!(
        span.resource_str("process.executable.name"),
        Some(exe),
        "process.executable.name: {ctx}"
    );
    assert_eq!(
        span.resource_str("host.name"),
        Some(host_name().as_str()),
        "host.name: {ctx}"
    );
    assert_eq!(
        span.resource_str("telemetry.sdk.name"),
        Some("tracer"),
        "telemetry.sdk.name: {ctx}"
    );
}

/// Asserts a string span attribute.
pub fn expect_str(span: &ReceivedSpan, key: &str, want: &str) {
    assert_eq!(
        span.attr_str(key),
        Some(want),
        "{key} of {}",
        describe(span)
    );
}

/// Asserts an integer span attribute.
pub fn expect_int(span: &ReceivedSpan, key: &str, want: i64) {
    assert_eq!(
        span.attr_int(key),
        Some(want),
        "{key} of {}",
        describe(span)
    );
}

/// Asserts that a span attribute is not set.
pub fn expect_absent(span: &ReceivedSpan, key: &str) {
    assert_eq!(span.attr(key), None, "{key} of {}", describe(span));
}

/// What a finished `tracer` command did.
pub struct TracerRun {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything on stdout.
    pub stdout: String,
    /// Everything on stderr.
    pub stderr: String,
}

/// Runs `tracer <args>` to completion (failing after [`READY_TIMEOUT`]) with `env` added.
pub fn run_tracer(dir: &TempDir, args: &[&str], env: &[(&str, &str)]) -> TracerRun {
    let stdout = dir.path().join("tracer.stdout");
    let stderr = dir.path().join("tracer.stderr");
    let mut cmd = Command::new(tracer_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(File::create(&stdout).expect("create stdout file"))
        .stderr(File::create(&stderr).expect("create stderr file"));
    let mut proc = Proc::spawn_with_env("tracer", cmd, env);
    let status = proc.wait(READY_TIMEOUT);
    TracerRun {
        status,
        stdout: std::fs::read_to_string(&stdout).unwrap_or_default(),
        stderr: std::fs::read_to_string(&stderr).unwrap_or_default(),
    }
}

/// Parent pid of a live process, from `/proc/<pid>/stat`.
pub fn parent_pid(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/stat: {e}"));
    // The command name is in parentheses and may contain spaces.
    let after = &stat[stat.rfind(')').expect("comm in stat") + 1..];
    after
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no ppid in {stat:?}"))
}

/// Waits up to [`WAIT`] until `pred` holds for the spans received. Otherwise stops the agent
/// first, so its log ends with its counters (drops, parser skips), and fails with `missing` (told
/// the spans received), the spans and the agent's log.
pub async fn wait_or_fail(
    receiver: &OtlpReceiver,
    agent: &mut Agent,
    pred: impl Fn(&[ReceivedSpan]) -> bool,
    missing: impl FnOnce(&[ReceivedSpan]) -> String,
) {
    if let Err(spans) = receiver.wait_for(pred, WAIT).await {
        agent.stop();
        panic!(
            "{}:\n{}\nagent stderr:\n{}",
            missing(&spans),
            describe_all(&spans),
            agent.stderr()
        );
    }
}

/// The value of counter `series` (name and labels, as `tracer_x_total{what="y"}`) in the agent's
/// last metrics line; 0 when the line leaves it out (it lists only counters above zero).
pub fn logged_metric(stderr: &str, series: &str) -> u64 {
    let key = format!("{series}=");
    let line = stderr
        .lines()
        .rfind(|l| l.contains("agent metrics"))
        .unwrap_or_else(|| panic!("no metrics line in the agent's log:\n{stderr}"));
    line.split_whitespace()
        .find_map(|field| field.strip_prefix(key.as_str()))
        .map_or(0, |v| v.parse().expect("counter value"))
}

/// Waits for `servers` SERVER and `clients` CLIENT spans, stops the agent (which flushes), and
/// returns everything received after asserting that nothing more arrived.
pub async fn collect_exact(
    receiver: &OtlpReceiver,
    agent: &mut Agent,
    servers: usize,
    clients: usize,
) -> Vec<ReceivedSpan> {
    wait_or_fail(
        receiver,
        agent,
        |s| count(s, SpanKind::Server) >= servers && count(s, SpanKind::Client) >= clients,
        |s| {
            format!(
                "expected {servers} SERVER and {clients} CLIENT spans within {WAIT:?}; got {} and {}",
                count(s, SpanKind::Server),
                count(s, SpanKind::Client),
            )
        },
    )
    .await;
    agent.stop();
    let spans = receiver.spans();
    assert_eq!(
        (
            count(&spans, SpanKind::Server),
            count(&spans, SpanKind::Client),
            spans.len()
        ),
        (servers, clients, servers + clients),
        "exactly one span per request and side; got:\n{}\nagent stderr:\n{}",
        describe_all(&spans),
        agent.stderr()
    );
    spans
}

/// The one pid all SERVER spans come from, asserted to be a child of `parent` (a worker of a
/// pre-forking server such as nginx).
pub fn server_worker_pid(spans: &[ReceivedSpan], parent: u32) -> u32 {
    let mut pids: Vec<i64> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Server)
        .filter_map(|s| s.resource_int("process.pid"))
        .collect();
    pids.sort_unstable();
    pids.dedup();
    let [pid] = pids[..] else {
        panic!("server spans from pids {pids:?}:\n{}", describe_all(spans));
    };
    let pid = u32::try_from(pid).expect("pid fits u32");
    assert_eq!(parent_pid(pid), parent, "server spans come from a worker");
    pid
}

/// Both ends traced on this host, no trace context sent: every CLIENT span is a root, and every
/// SERVER span is the child of a CLIENT span of the same name, in that span's trace, one SERVER
/// span per CLIENT span (the agent links them by the TCP sequence number of the request).
pub fn assert_servers_linked_to_clients(spans: &[ReceivedSpan]) {
    let clients: std::collections::HashMap<&str, &ReceivedSpan> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Client)
        .map(|s| (s.span_id.as_str(), s))
        .collect();
    let mut parents = std::collections::HashSet::new();
    for s in spans {
        let ctx = || format!("{}\nall spans:\n{}", describe(s), describe_all(spans));
        match s.kind {
            SpanKind::Client => {
                assert_eq!(s.parent_span_id, None, "a CLIENT span is a root: {}", ctx());
            }
            SpanKind::Server => {
                let parent = s.parent_span_id.as_deref();
                let client = parent.and_then(|p| clients.get(p));
                let Some(client) = client else {
                    panic!("SERVER span not linked to a CLIENT span: {}", ctx());
                };
                assert_eq!(client.trace_id, s.trace_id, "one trace: {}", ctx());
                assert_eq!(client.name, s.name, "parent sent this request: {}", ctx());
                assert!(
                    parents.insert(parent),
                    "two SERVER spans under one CLIENT span: {}",
                    ctx()
                );
            }
            _ => {}
        }
    }
}

/// A self-signed certificate and its key for `localhost`, made by `openssl req`.
pub fn tls_material(dir: &TempDir) -> (PathBuf, PathBuf) {
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let out = Command::new(which("openssl"))
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl req");
    assert!(out.status.success(), "openssl req failed: {out:?}");
    (cert, key)
}

/// Starts nginx from a config written into `dir` (also its prefix, logs and temp paths), with
/// `workers` worker processes running as root (so they can read the test's private temp dir) and
/// `http_blocks` (server and upstream blocks) inside `http { }`; returns once `port` accepts.
pub fn start_nginx(dir: &TempDir, port: u16, workers: u32, http_blocks: &str) -> Proc {
    let prefix = dir.path().display().to_string();
    let conf = dir.write(
        "nginx.conf",
        &format!(
            "user root;
worker_processes {workers};
error_log {prefix}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{http_blocks}
}}
"
        ),
    );
    let mut cmd = Command::new(which("nginx"));
    cmd.arg("-c")
        .arg(&conf)
        .args(["-p", &prefix, "-e", &format!("{prefix}/error.log")])
        .args(["-g", &format!("daemon off; pid {prefix}/nginx.pid;")])
        .stdin(Stdio::null());
    let mut nginx = Proc::spawn("nginx", cmd);
    wait_for_port(&mut nginx, port);
    nginx
}

/// Whether the running kernel's version is at least `major.minor`.
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("kernel release");
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    found >= (major, minor)
}

/// One `trace context` debug line of an agent.
#[derive(Debug, Clone)]
pub struct TraceEvent {
    pub pid: u32,
    pub role: String,
    pub direction: String,
    pub local: String,
    pub remote: String,
    pub trace_id: String,
    pub in_band: bool,
    pub generated: bool,
}

/// The `trace context` lines of an agent's log (`TRACER_LOG=tracer::trace_context=debug`).
pub fn trace_events(stderr: &str) -> Vec<TraceEvent> {
    stderr
        .lines()
        .filter(|l| l.contains("tracer::trace_context: trace context "))
        .map(|line| {
            let fields: std::collections::BTreeMap<&str, &str> = line
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k, v.trim_matches('"')))
                .collect();
            let get = |k: &str| {
                fields
                    .get(k)
                    .unwrap_or_else(|| panic!("no {k} in {line:?}"))
                    .to_string()
            };
            TraceEvent {
                pid: get("pid").parse().expect("pid"),
                role: get("role"),
                direction: get("direction"),
                local: get("local"),
                remote: get("remote"),
                trace_id: get("trace_id"),
                in_band: get("in_band") == "true",
                generated: get("generated") == "true",
            }
        })
        .collect()
}

/// One line of the agent's stdout mode.
#[derive(Debug)]
pub struct StdoutLine {
    pub timestamp: String,
    pub service: String,
    pub kind: String,
    pub name: String,
    pub status: String,
    pub duration_ms: f64,
    pub fields: Vec<(String, String)>,
}

impl StdoutLine {
    /// `<time> <service> <KIND> "<name>" <OK|ERROR> <n.nnn>ms key=value...`; the values of the lines
    /// parsed contain no spaces.
    pub fn parse(line: &str) -> StdoutLine {
        let tokens: Vec<&str> = line.split_whitespace().collect();
        let [timestamp, service, kind, name, status, duration, rest @ ..] = &tokens[..] else {
            panic!("short stdout line {line:?}");
        };
        let duration_ms = duration
            .strip_suffix("ms")
            .and_then(|d| d.parse().ok())
            .unwrap_or_else(|| panic!("bad duration in {line:?}"));
        let fields = rest
            .iter()
            .map(|t| {
                let (k, v) = t
                    .split_once('=')
                    .unwrap_or_else(|| panic!("bad field {t:?} in {line:?}"));
                (k.to_owned(), v.to_owned())
            })
            .collect();
        StdoutLine {
            timestamp: (*timestamp).to_owned(),
            service: (*service).to_owned(),
            kind: (*kind).to_owned(),
            name: name.trim_matches('"').to_owned(),
            status: (*status).to_owned(),
            duration_ms,
            fields,
        }
    }

    pub fn field(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}
