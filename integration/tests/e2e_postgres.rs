//! End-to-end tests of the PostgreSQL slice: a real PostgreSQL 15 server on 127.0.0.1 queried by
//! psql (simple protocol), pgbench (simple protocol for `-i`, extended protocol with
//! `-M prepared`) and a hand-written pipelining frontend, traced by the agent binary with the
//! exact spans of both ends (the client process and the server's backend process) checked at an
//! OTLP receiver.
//!
//! Every test runs the agent with `--port <its server's port>` so other traffic on the host does
//! not reach its receiver; all spans received must therefore belong to the test's statements.

mod common;

use std::ffi::CString;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::*;
use integration::{OtlpReceiver, ReceivedSpan, SpanKind, StatusCode};

/// Where Debian installs the PostgreSQL 15 programs.
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The database the statements run in.
const DB: &str = "testdb";

/// `pipeline.py PORT`: startup without TLS (trust authentication) to [`DB`], then three
/// extended-protocol statements (Parse/Bind/Describe/Execute each) and one Sync in a single
/// write; prints `done` when the server answered everything.
const PIPELINE_PY: &str = r#"
import socket, struct, sys

def message(tag, body):
    return tag + struct.pack("!I", len(body) + 4) + body

def cstr(s):
    return s.encode() + b"\0"

sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
buf = b""

def read_message():
    global buf
    while len(buf) < 5 or len(buf) < 1 + struct.unpack("!I", buf[1:5])[0]:
        data = sock.recv(65536)
        if not data:
            sys.exit("server closed the connection")
        buf += data
    length = struct.unpack("!I", buf[1:5])[0]
    tag, body = buf[:1], buf[5 : 1 + length]
    buf = buf[1 + length :]
    return tag, body

def until_ready():
    tags = []
    while True:
        tag, body = read_message()
        if tag == b"E":
            sys.exit("error from the server: %r" % body)
        tags.append(tag)
        if tag == b"Z":
            return tags

params = cstr("user") + cstr("postgres") + cstr("database") + cstr(sys.argv[2]) + b"\0"
body = struct.pack("!I", 196608) + params
sock.sendall(struct.pack("!I", len(body) + 4) + body)
until_ready()
batch = b""
for i in range(3):
    batch += message(b"P", cstr("") + cstr("SELECT %d AS col%d" % (i, i)) + struct.pack("!H", 0))
    batch += message(b"B", cstr("") + cstr("") + struct.pack("!HHH", 0, 0, 0))
    batch += message(b"D", b"P" + cstr(""))
    batch += message(b"E", cstr("") + struct.pack("!I", 0))
sock.sendall(batch + message(b"S", b""))
tags = until_ready()
if tags.count(b"C") != 3 or tags.count(b"D") != 3:
    sys.exit("unexpected answer %r" % tags)
sock.sendall(message(b"X", b""))
sock.close()
print("done", flush=True)
"#;

/// A PostgreSQL program from [`PG_BIN`].
fn pg_bin(name: &str) -> PathBuf {
    let path = PathBuf::from(PG_BIN).join(name);
    assert!(
        path.is_file(),
        "{} not found; run scripts/setup-test-peers.sh",
        path.display()
    );
    path
}

/// uid and gid of the `postgres` account (the server refuses to run as root).
fn postgres_ids() -> (u32, u32) {
    let name = CString::new("postgres").expect("no NUL in a literal");
    // SAFETY: getpwnam reads a NUL-terminated name; the result is copied out at once, before any
    // other passwd call could reuse its static buffer.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(
        !pw.is_null(),
        "no postgres user; run scripts/setup-test-peers.sh"
    );
    // SAFETY: non-null pointer returned by getpwnam just above.
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

/// A PostgreSQL server run from a fresh cluster in a temp dir on 127.0.0.1:`port`, stopped
/// (fast shutdown) on drop so no shared memory or backend outlives the test.
struct Postgres {
    proc: Proc,
    port: u16,
}

impl Postgres {
    /// Creates a cluster (trust authentication) under `dir`, starts it and creates [`DB`].
    fn start(dir: &TempDir, port: u16) -> Postgres {
        let (uid, gid) = postgres_ids();
        let data = dir.path().join("pgdata");
        std::fs::create_dir_all(&data).expect("create pgdata");
        std::os::unix::fs::chown(&data, Some(uid), Some(gid)).expect("chown pgdata");
        let out = Command::new(pg_bin("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .uid(uid)
            .gid(gid)
            .stdin(Stdio::null())
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let log = File::create(dir.path().join("postgres.log")).expect("create postgres.log");
        let mut cmd = Command::new(pg_bin("postgres"));
        cmd.arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(&data)
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .uid(uid)
            .gid(gid)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log);
        let mut proc = Proc::spawn("postgres", cmd);
        wait_for_port(&mut proc, port);
        let pg = Postgres { proc, port };
        // The port accepts connections a moment before the server does ("the database system is
        // starting up"): retry for a while.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let run = pg.psql(&["-d", "postgres", "-c", &format!("CREATE DATABASE {DB}")]);
            if run.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "CREATE DATABASE failed: {}",
                run.status
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        pg
    }

    /// Runs psql (no psqlrc) against the server as user postgres with `args`.
    fn psql(&self, args: &[&str]) -> Run {
        let mut cmd = Command::new(pg_bin("psql"));
        cmd.args(["-X", "-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Run::to_end("psql", cmd)
    }

    /// Runs pgbench against [`DB`] as user postgres with `args`.
    fn pgbench(&self, args: &[&str]) -> Run {
        let mut cmd = Command::new(pg_bin("pgbench"));
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
        ])
        .args(args)
        .arg(DB)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        let run = Run::to_end("pgbench", cmd);
        assert!(
            run.status.success(),
            "pgbench {args:?} failed: {}",
            run.status
        );
        run
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGINT is the fast shutdown: backends end, shared memory is released.
        if self.proc.try_wait().is_some() {
            return;
        }
        self.proc.signal(libc::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.proc.try_wait().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One finished client run.
struct Run {
    pid: u32,
    status: ExitStatus,
    started_ns: u64,
    ended_ns: u64,
}

impl Run {
    /// Spawns `cmd` and waits for it.
    fn to_end(name: &str, cmd: Command) -> Run {
        let started_ns = now_unix_ns();
        let mut proc = Proc::spawn(name, cmd);
        let status = proc.wait(Duration::from_secs(60));
        Run {
            pid: proc.pid(),
            status,
            started_ns,
            ended_ns: now_unix_ns(),
        }
    }
}

/// Spans of `kind` from process `pid`, in start order.
fn spans_of(spans: &[ReceivedSpan], kind: SpanKind, pid: u32) -> Vec<&ReceivedSpan> {
    let mut found: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.kind == kind && s.resource_int("process.pid") == Some(i64::from(pid)))
        .collect();
    found.sort_by_key(|s| s.start_unix_ns);
    found
}

/// Server spans in start order.
fn server_spans(spans: &[ReceivedSpan]) -> Vec<&ReceivedSpan> {
    let mut found: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Server)
        .collect();
    found.sort_by_key(|s| s.start_unix_ns);
    found
}

/// Every span is a PostgreSQL span of [`DB`] on 127.0.0.1:`port`, server spans from a
/// `postgres` backend process (not the postmaster `postmaster`), client spans from
/// `client_exe`.
fn expect_common(spans: &[ReceivedSpan], port: u16, postmaster: u32, client_exe: &str) {
    assert_servers_linked_to_clients(spans);
    for s in spans {
        let ctx = describe(s);
        expect_str(s, "db.system.name", "postgresql");
        expect_str(s, "db.namespace", DB);
        expect_str(s, "server.address", "127.0.0.1");
        expect_int(s, "server.port", i64::from(port));
        match s.kind {
            SpanKind::Server => {
                assert_eq!(s.resource_str("service.name"), Some("postgres"), "{ctx}");
                // Backends exit with their connection, so their parent cannot be read back.
                assert_ne!(
                    s.resource_int("process.pid"),
                    Some(i64::from(postmaster)),
                    "a backend serves, not the postmaster: {ctx}"
                );
                // A backend is forked without exec: once it has exited, only its comm is known.
                if let Some(exe) = s.resource_str("process.executable.name") {
                    assert_eq!(exe, "postgres", "{ctx}");
                }
            }
            SpanKind::Client => {
                assert_eq!(s.resource_str("service.name"), Some(client_exe), "{ctx}");
            }
            kind => panic!("unexpected kind {kind:?}: {ctx}"),
        }
    }
}

/// Query text, summary (= span name), operation, collection and returned rows of one statement.
fn expect_statement(
    span: &ReceivedSpan,
    text: &str,
    summary: &str,
    collection: Option<&str>,
    rows: Option<i64>,
) {
    expect_str(span, "db.query.text", text);
    expect_str(span, "db.query.summary", summary);
    assert_eq!(span.name, summary, "name of {}", describe(span));
    let operation = match collection {
        Some(c) => summary
            .strip_suffix(c)
            .map(str::trim_end)
            .unwrap_or(summary),
        None => summary,
    };
    expect_str(span, "db.operation.name", operation);
    match collection {
        Some(c) => expect_str(span, "db.collection.name", c),
        None => expect_absent(span, "db.collection.name"),
    }
    match rows {
        Some(n) => expect_int(span, "db.response.returned_rows", n),
        None => expect_absent(span, "db.response.returned_rows"),
    }
}

/// Success, or the SQLSTATE of a failure, in status and attributes.
fn expect_outcome(span: &ReceivedSpan, sqlstate: Option<&str>) {
    match sqlstate {
        Some(code) => {
            assert_eq!(span.status_code, StatusCode::Error, "{}", describe(span));
            expect_str(span, "db.response.status_code", code);
            expect_str(span, "error.type", code);
        }
        None => {
            assert_eq!(span.status_code, StatusCode::Unset, "{}", describe(span));
            expect_absent(span, "db.response.status_code");
            expect_absent(span, "error.type");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_simple_queries_and_an_error() {
    require_root();
    let dir = TempDir::new("pg-psql");
    let port = free_port();
    let pg = Postgres::start(&dir, port);
    let receiver = OtlpReceiver::start_grpc()
        .await
        .expect("start the OTLP receiver");
    let mut agent = Agent::start_otlp(&dir, &receiver, port);

    let one_select = pg.psql(&["-d", DB, "-c", "select 1"]);
    assert!(one_select.status.success(), "psql select 1 failed");
    let table = pg.psql(&[
        "-d",
        DB,
        "-c",
        "create table items (id int, name text)",
        "-c",
        "insert into items values (1, 'a'), (2, 'b')",
        "-c",
        "select name from items where id > 0",
    ]);
    assert!(table.status.success(), "psql table statements failed");
    let failing = pg.psql(&["-d", DB, "-c", "select * from missing_table"]);
    assert_eq!(failing.status.code(), Some(1), "psql reports the failure");

    let spans = collect_exact(&receiver, &mut agent, 5, 5).await;
    expect_common(&spans, port, pg.proc.pid(), "psql");

    // (text, summary, collection, rows, sqlstate) per psql run, in order.
    type Want<'a> = (
        &'a str,
        &'a str,
        Option<&'a str>,
        Option<i64>,
        Option<&'a str>,
    );
    let runs: [(&Run, Vec<Want<'_>>); 3] = [
        (
            &one_select,
            vec![("select ?", "select", None, Some(1), None)],
        ),
        (
            &table,
            vec![
                (
                    "create table items (id int, name text)",
                    "create table items",
                    Some("items"),
                    None,
                    None,
                ),
                (
                    "insert into items values (?, ?), (?, ?)",
                    "insert items",
                    Some("items"),
                    None,
                    None,
                ),
                (
                    "select name from items where id > ?",
                    "select items",
                    Some("items"),
                    Some(2),
                    None,
                ),
            ],
        ),
        (
            &failing,
            vec![(
                "select * from missing_table",
                "select missing_table",
                Some("missing_table"),
                None,
                Some("42P01"),
            )],
        ),
    ];
    let servers = server_spans(&spans);
    let mut server_at = 0;
    for (run, wants) in &runs {
        let clients = spans_of(&spans, SpanKind::Client, run.pid);
        assert_eq!(
            clients.len(),
            wants.len(),
            "client spans of psql pid {}:\n{}",
            run.pid,
            describe_all(&spans)
        );
        for (c, &(text, summary, collection, rows, sqlstate)) in clients.iter().zip(wants) {
            // The server answers in the order the statements were sent, one backend per run.
            let s = servers[server_at];
            server_at += 1;
            for span in [*c, s] {
                expect_statement(span, text, summary, collection, rows);
                expect_outcome(span, sqlstate);
                assert_within(span, run.started_ns, run.ended_ns);
            }
            assert_eq!(
                c.resource_int("process.pid"),
                Some(i64::from(run.pid)),
                "{}",
                describe(c)
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_init_then_prepared_transactions() {
    require_root();
    let dir = TempDir::new("pg-bench");
    let port = free_port();
    let pg = Postgres::start(&dir, port);

    // Initialisation: many simple-protocol statements, among them a COPY.
    let receiver = OtlpReceiver::start_grpc()
        .await
        .expect("start the OTLP receiver");
    let mut agent = Agent::start_otlp(&dir, &receiver, port);
    let init = pg.pgbench(&["-i", "-s", "1", "-q"]);
    let settled = receiver
        .wait_for(
            |s| count(s, SpanKind::Client) >= 20 && count(s, SpanKind::Server) >= 20,
            WAIT,
        )
        .await;
    // Let the last spans of the run arrive before counting.
    std::thread::sleep(Duration::from_secs(2));
    agent.stop();
    let spans = receiver.spans();
    assert!(settled.is_ok(), "too few spans:\n{}", describe_all(&spans));
    let clients = count(&spans, SpanKind::Client);
    assert_eq!(
        clients,
        count(&spans, SpanKind::Server),
        "one span per statement on each side:\n{}",
        describe_all(&spans)
    );
    assert_eq!(clients, spans.len() / 2, "only CLIENT and SERVER spans");
    expect_common(&spans, port, pg.proc.pid(), "pgbench");
    for s in &spans {
        expect_outcome(s, None);
        assert_within(s, init.started_ns, init.ended_ns);
        assert!(s.attr_str("db.query.text").is_some(), "{}", describe(s));
    }
    let copy = |kind| {
        one(&spans, kind, "the COPY of pgbench_accounts", |s| {
            s.attr_str("db.query.summary") == Some("copy pgbench_accounts")
        })
    };
    copy(SpanKind::Client);
    copy(SpanKind::Server);

    // Transactions over the extended protocol with named prepared statements.
    const TRANSACTIONS: usize = 20;
    const STATEMENTS: usize = 7;
    let receiver = OtlpReceiver::start_http()
        .await
        .expect("start the OTLP receiver");
    let mut agent = Agent::start_otlp(&dir, &receiver, port);
    let bench = pg.pgbench(&["-n", "-M", "prepared", "-t", "20", "-c", "1"]);
    let expected = TRANSACTIONS * STATEMENTS + PGBENCH_STARTUP.len();
    let spans = collect_exact(&receiver, &mut agent, expected, expected).await;
    expect_common(&spans, port, pg.proc.pid(), "pgbench");
    let summaries = [
        "BEGIN",
        "UPDATE pgbench_accounts",
        "SELECT pgbench_accounts",
        "UPDATE pgbench_tellers",
        "UPDATE pgbench_branches",
        "INSERT pgbench_history",
        "END",
    ];
    for kind in [SpanKind::Client, SpanKind::Server] {
        let mut side: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.kind == kind).collect();
        side.sort_by_key(|s| s.start_unix_ns);
        let (startup, statements) = side.split_at(PGBENCH_STARTUP.len());
        for (s, want) in startup.iter().zip(PGBENCH_STARTUP) {
            expect_str(s, "db.query.summary", want);
            expect_outcome(s, None);
        }
        for (i, s) in statements.iter().enumerate() {
            assert_within(s, bench.started_ns, bench.ended_ns);
            expect_outcome(s, None);
            expect_str(s, "db.query.summary", summaries[i % STATEMENTS]);
            let text = s.attr_str("db.query.text");
            assert!(text.is_some(), "the Parse was seen: {}", describe(s));
            // Parameterized text is kept as sent.
            if summaries[i % STATEMENTS].starts_with("UPDATE") {
                assert!(text.is_some_and(|t| t.contains("$1")), "{}", describe(s));
            }
            let rows = (summaries[i % STATEMENTS] == "SELECT pgbench_accounts").then_some(1);
            match rows {
                Some(n) => expect_int(s, "db.response.returned_rows", n),
                None => expect_absent(s, "db.response.returned_rows"),
            }
        }
    }
}

/// Summaries of the statements pgbench runs before its transactions (it reads the scale and
/// the partitioning of pgbench_accounts).
const PGBENCH_STARTUP: [&str; 2] = [
    "select pgbench_branches",
    "select pg_catalog.pg_class pg_catalog.pg_namespace select pg_catalog.pg_partitioned_table \
     pg_catalog.pg_inherits",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_extended_protocol_batch() {
    require_root();
    let dir = TempDir::new("pg-pipeline");
    let port = free_port();
    let pg = Postgres::start(&dir, port);
    let receiver = OtlpReceiver::start_grpc()
        .await
        .expect("start the OTLP receiver");
    let mut agent = Agent::start_otlp(&dir, &receiver, port);

    let script = dir.write("pipeline.py", PIPELINE_PY);
    let mut cmd = Command::new(python());
    cmd.arg(script)
        .args([port.to_string(), DB.to_owned()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let run = Run::to_end("pipeline.py", cmd);
    assert!(run.status.success(), "pipeline.py failed: {}", run.status);

    let spans = collect_exact(&receiver, &mut agent, 3, 3).await;
    // The agent names a python process after its script.
    expect_common(&spans, port, pg.proc.pid(), "pipeline");
    let clients = spans_of(&spans, SpanKind::Client, run.pid);
    let servers = server_spans(&spans);
    assert_eq!(clients.len(), 3, "{}", describe_all(&spans));
    for (i, (c, s)) in clients.iter().zip(&servers).enumerate() {
        for span in [*c, *s] {
            expect_statement(
                span,
                &format!("SELECT ? AS col{i}"),
                "SELECT",
                None,
                Some(1),
            );
            expect_outcome(span, None);
            assert_within(span, run.started_ns, run.ended_ns);
            expect_absent(span, "db.postgresql.statement_name");
        }
    }
    for side in [&clients, &servers] {
        assert!(
            side.windows(2)
                .all(|w| w[0].end_unix_ns <= w[1].end_unix_ns),
            "answers end in order:\n{}",
            describe_all(&spans)
        );
    }
}
