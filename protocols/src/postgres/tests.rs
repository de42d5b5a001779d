use super::*;
use crate::{Detail, Exchange, Outcome, Role};

const SEND: Direction = Direction::Send;
const RECV: Direction = Direction::Recv;

// ---- message builders ----

fn typed(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend(((body.len() + 4) as u32).to_be_bytes());
    m.extend(body);
    m
}

fn cstrs(parts: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    for p in parts {
        v.extend(p.as_bytes());
        v.push(0);
    }
    v
}

fn untyped_msg(code: u32, body: &[u8]) -> Vec<u8> {
    let mut m = ((body.len() + 8) as u32).to_be_bytes().to_vec();
    m.extend(code.to_be_bytes());
    m.extend(body);
    m
}

fn startup(user: &str, database: &str) -> Vec<u8> {
    let mut body = cstrs(&[
        "user",
        user,
        "database",
        database,
        "application_name",
        "tests",
    ]);
    body.push(0);
    untyped_msg(196_608, &body)
}

fn ssl_request() -> Vec<u8> {
    untyped_msg(wire::SSL_REQUEST, &[])
}

fn query(sql: &str) -> Vec<u8> {
    typed(b'Q', &cstrs(&[sql]))
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut body = cstrs(&[name, sql]);
    body.extend([0, 1, 0, 0, 0, 23]);
    typed(b'P', &body)
}

fn bind(portal: &str, statement: &str, params: &[&[u8]]) -> Vec<u8> {
    let mut body = cstrs(&[portal, statement]);
    body.extend([0, 0]);
    body.extend((params.len() as u16).to_be_bytes());
    for p in params {
        body.extend((p.len() as u32).to_be_bytes());
        body.extend(*p);
    }
    body.extend([0, 0]);
    typed(b'B', &body)
}

fn describe(kind: u8, name: &str) -> Vec<u8> {
    let mut body = vec![kind];
    body.extend(cstrs(&[name]));
    typed(b'D', &body)
}

fn execute(portal: &str, limit: u32) -> Vec<u8> {
    let mut body = cstrs(&[portal]);
    body.extend(limit.to_be_bytes());
    typed(b'E', &body)
}

fn close_msg(kind: u8, name: &str) -> Vec<u8> {
    let mut body = vec![kind];
    body.extend(cstrs(&[name]));
    typed(b'C', &body)
}

fn sync() -> Vec<u8> {
    typed(b'S', &[])
}

fn flush() -> Vec<u8> {
    typed(b'H', &[])
}

fn copy_data(data: &[u8]) -> Vec<u8> {
    typed(b'd', data)
}

fn copy_done() -> Vec<u8> {
    typed(b'c', &[])
}

fn auth_ok() -> Vec<u8> {
    typed(b'R', &[0, 0, 0, 0])
}

fn parameter_status(name: &str, value: &str) -> Vec<u8> {
    typed(b'S', &cstrs(&[name, value]))
}

fn backend_key() -> Vec<u8> {
    typed(b'K', &[0, 0, 0x30, 0x39, 1, 2, 3, 4])
}

fn ready(status: u8) -> Vec<u8> {
    typed(b'Z', &[status])
}

fn row_description(columns: &[&str]) -> Vec<u8> {
    let mut body = (columns.len() as u16).to_be_bytes().to_vec();
    for c in columns {
        body.extend(cstrs(&[c]));
        body.extend([0u8; 18]);
    }
    typed(b'T', &body)
}

fn data_row(values: &[Option<&str>]) -> Vec<u8> {
    let mut body = (values.len() as u16).to_be_bytes().to_vec();
    for v in values {
        match v {
            Some(v) => {
                body.extend((v.len() as u32).to_be_bytes());
                body.extend(v.as_bytes());
            }
            None => body.extend(u32::MAX.to_be_bytes()),
        }
    }
    typed(b'D', &body)
}

fn complete(tag: &str) -> Vec<u8> {
    typed(b'C', &cstrs(&[tag]))
}

fn error(code: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (f, v) in [
        (b'S', "ERROR"),
        (b'V', "ERROR"),
        (b'C', code),
        (b'M', message),
        (b'F', "scan.l"),
    ] {
        body.push(f);
        body.extend(cstrs(&[v]));
    }
    body.push(0);
    typed(b'E', &body)
}

fn empty(tag: u8) -> Vec<u8> {
    typed(tag, &[])
}

fn parameter_description(n: u16) -> Vec<u8> {
    let mut body = n.to_be_bytes().to_vec();
    for _ in 0..n {
        body.extend(23u32.to_be_bytes());
    }
    typed(b't', &body)
}

fn copy_response(tag: u8, columns: u16) -> Vec<u8> {
    let mut body = vec![0];
    body.extend(columns.to_be_bytes());
    body.extend(std::iter::repeat_n(0u8, 2 * usize::from(columns)));
    typed(tag, &body)
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

/// What the backend sends from authentication to the first ReadyForQuery.
fn backend_ready() -> Vec<u8> {
    cat(&[
        auth_ok(),
        parameter_status("server_version", "15.18"),
        parameter_status("client_encoding", "UTF8"),
        backend_key(),
        ready(b'I'),
    ])
}

// ---- driver ----

/// Drives one parser with consecutive timings: the n-th event gets start 100n, end 100n + 50.
/// `client` false swaps directions so the traced process is the server.
struct Conn {
    parser: PgParser,
    out: Vec<Output>,
    clock: u64,
    client: bool,
}

impl Conn {
    fn new() -> Self {
        Conn {
            parser: PgParser::new(),
            out: Vec::new(),
            clock: 0,
            client: true,
        }
    }

    fn server() -> Self {
        Conn {
            client: false,
            ..Conn::new()
        }
    }

    fn tick(&mut self) -> Timing {
        self.clock += 100;
        Timing {
            start_ns: self.clock,
            end_ns: self.clock + 50,
            thread: (self.clock / 100) as u32,
        }
    }

    fn dir(&self, frontend: bool) -> Direction {
        if frontend == self.client { SEND } else { RECV }
    }

    /// Bytes from the frontend.
    fn front(&mut self, data: &[u8]) -> Timing {
        let t = self.tick();
        let dir = self.dir(true);
        self.parser.feed(dir, data, t, &mut self.out);
        check_bounds(&self.parser);
        t
    }

    /// Bytes from the backend.
    fn back(&mut self, data: &[u8]) -> Timing {
        let t = self.tick();
        let dir = self.dir(false);
        self.parser.feed(dir, data, t, &mut self.out);
        check_bounds(&self.parser);
        t
    }

    fn gap(&mut self, frontend: bool, len: u64) -> Timing {
        let t = self.tick();
        let dir = self.dir(frontend);
        self.parser.gap(dir, len, t, &mut self.out);
        t
    }

    fn close(&mut self) {
        let t = self.tick();
        self.parser.close(t.end_ns, &mut self.out);
    }

    /// A connection past startup.
    fn started() -> Self {
        let mut c = Conn::new();
        c.front(&startup("alice", "shop"));
        c.back(&backend_ready());
        c
    }

    fn exchanges(&self) -> Vec<&Exchange> {
        self.out
            .iter()
            .filter_map(|o| match o {
                Output::Exchange(e) => Some(e),
                Output::Skipped(_) => None,
            })
            .collect()
    }

    fn pgs(&self) -> Vec<&PgExchange> {
        self.exchanges().into_iter().map(pg).collect()
    }

    fn skips(&self) -> Vec<SkipReason> {
        self.out
            .iter()
            .filter_map(|o| match o {
                Output::Skipped(r) => Some(*r),
                Output::Exchange(_) => None,
            })
            .collect()
    }
}

fn pg(e: &Exchange) -> &PgExchange {
    match &e.detail {
        Detail::Postgres(p) => p,
        other => panic!("not a PostgreSQL exchange: {other:?}"),
    }
}

/// Heap a connection may hold at worst: two body buffers, the statement and portal tables, the
/// waiting statements with their texts (lossy UTF-8 at most triples bytes) and the queue.
const HELD_BOUND: usize = 2 * 2 * (MAX_NAME + 2 + MAX_QUERY)
    + MAX_STATEMENT_BYTES
    + MAX_STATEMENTS * (MAX_NAME + 128)
    + MAX_PORTALS * (2 * MAX_NAME + 3 * MAX_QUERY + 128)
    + 3 * MAX_PENDING_TEXT
    + MAX_PENDING_RUNS * (3 * MAX_QUERY + 1024 + 3 * MAX_ERROR)
    + MAX_QUEUE * 32;

fn check_bounds(p: &PgParser) {
    assert!(p.held_bytes() <= HELD_BOUND, "held {}", p.held_bytes());
    for h in &p.halves {
        assert!(
            h.body.len() <= MAX_NAME + 2 + MAX_QUERY,
            "body {}",
            h.body.len()
        );
    }
}

fn check_outputs(out: &[Output]) {
    for o in out {
        if let Output::Exchange(e) = o {
            assert!(e.start_ns <= e.end_ns, "{e:?}");
            let p = pg(e);
            assert!(p.query.as_ref().is_none_or(|q| q.len() <= MAX_QUERY));
        }
    }
}

// ---- startup and simple queries ----

#[test]
fn startup_then_simple_query_as_client() {
    let mut c = Conn::new();
    c.front(&ssl_request());
    c.back(b"N");
    c.front(&startup("alice", "shop"));
    c.back(&backend_ready());
    assert!(c.out.is_empty(), "{:?}", c.out);
    let q = c.front(&query("SELECT id FROM users WHERE name = 'x'"));
    c.back(&cat(&[row_description(&["id"]), data_row(&[Some("1")])]));
    c.back(&cat(&[data_row(&[Some("2")]), data_row(&[None])]));
    let z = c.back(&cat(&[complete("SELECT 3"), ready(b'I')]));
    let ex = c.exchanges();
    assert_eq!(ex.len(), 1);
    let e = ex[0];
    assert_eq!(e.role, Role::Client);
    assert_eq!(e.outcome, Outcome::Complete);
    assert_eq!((e.start_ns, e.end_ns), (q.start_ns, z.end_ns));
    let p = pg(e);
    assert_eq!(
        p.query.as_deref(),
        Some("SELECT id FROM users WHERE name = 'x'")
    );
    assert!(p.parse_seen && !p.query_truncated);
    assert_eq!(p.database.as_deref(), Some("shop"));
    assert_eq!(p.user.as_deref(), Some("alice"));
    assert_eq!(p.application_name.as_deref(), Some("tests"));
    assert_eq!(p.command_tag.as_deref(), Some("SELECT 3"));
    assert_eq!(p.rows, Some(3));
    assert_eq!(p.completions, 1);
    assert_eq!(p.statement_name, None);
    assert!(c.skips().is_empty(), "{:?}", c.skips());
}

#[test]
fn the_traced_server_gets_server_exchanges() {
    let mut c = Conn::server();
    c.front(&startup("bob", "db"));
    c.back(&backend_ready());
    c.front(&query("INSERT INTO t VALUES (1)"));
    c.back(&cat(&[complete("INSERT 0 1"), ready(b'I')]));
    let ex = c.exchanges();
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].role, Role::Server);
    assert_eq!(pg(ex[0]).command_tag.as_deref(), Some("INSERT 0 1"));
    assert_eq!(pg(ex[0]).rows, None, "no result set");
}

#[test]
fn multi_statement_query_is_one_exchange() {
    let mut c = Conn::started();
    c.front(&query("BEGIN; UPDATE a SET x = 1; SELECT 1; COMMIT"));
    c.back(&cat(&[
        complete("BEGIN"),
        complete("UPDATE 5"),
        row_description(&["?column?"]),
        data_row(&[Some("1")]),
        complete("SELECT 1"),
        complete("COMMIT"),
    ]));
    assert!(c.exchanges().is_empty(), "ends at ReadyForQuery");
    c.back(&ready(b'I'));
    let p = c.pgs();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].completions, 4);
    assert_eq!(p[0].command_tag.as_deref(), Some("COMMIT"));
    assert_eq!(p[0].rows, Some(1));
}

#[test]
fn simple_query_errors_and_empty_queries() {
    let mut c = Conn::started();
    c.front(&query("SELECT * FROM missing"));
    c.back(&cat(&[
        error("42P01", "relation \"missing\" does not exist"),
        ready(b'I'),
    ]));
    c.front(&query(""));
    c.back(&cat(&[empty(b'I'), ready(b'I')]));
    let ex = c.exchanges();
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[0].outcome, Outcome::Complete);
    let e = pg(ex[0]);
    assert_eq!(e.sqlstate(), Some("42P01"));
    assert_eq!(
        e.error.as_ref().and_then(|x| x.severity.as_deref()),
        Some("ERROR")
    );
    assert_eq!(
        e.error.as_ref().and_then(|x| x.message.as_deref()),
        Some("relation \"missing\" does not exist")
    );
    assert_eq!(e.command_tag, None);
    let empty_q = pg(ex[1]);
    assert!(empty_q.empty_query);
    assert_eq!(empty_q.query.as_deref(), Some(""));
    assert_eq!(empty_q.completions, 1);
}

#[test]
fn long_queries_are_cut() {
    let mut c = Conn::started();
    let sql = format!("SELECT '{}'", "é".repeat(MAX_QUERY));
    let msg = query(&sql);
    for piece in msg.chunks(1000) {
        c.front(piece);
    }
    c.back(&cat(&[complete("SELECT 1"), ready(b'I')]));
    let p = c.pgs();
    assert_eq!(p.len(), 1);
    let q = p[0].query.as_deref().expect("text");
    assert!(p[0].query_truncated);
    assert!(
        q.len() <= MAX_QUERY && q.len() > MAX_QUERY - 4,
        "{}",
        q.len()
    );
    assert!(sql.starts_with(q));
}

// ---- extended protocol ----

#[test]
fn unnamed_statement_ends_at_command_complete() {
    let mut c = Conn::started();
    let first = c.front(&parse("", "SELECT name FROM users WHERE id = $1"));
    c.front(&cat(&[
        bind("", "", &[b"7"]),
        describe(b'P', ""),
        execute("", 0),
        sync(),
    ]));
    c.back(&cat(&[
        empty(b'1'),
        empty(b'2'),
        row_description(&["name"]),
    ]));
    let last = c.back(&cat(&[data_row(&[Some("ann")]), complete("SELECT 1")]));
    assert_eq!(c.exchanges().len(), 1, "reported before ReadyForQuery");
    c.back(&ready(b'I'));
    let ex = c.exchanges();
    assert_eq!(ex.len(), 1);
    assert_eq!(
        (ex[0].start_ns, ex[0].end_ns),
        (first.start_ns, last.end_ns)
    );
    assert_eq!(ex[0].outcome, Outcome::Complete);
    let p = pg(ex[0]);
    assert_eq!(
        p.query.as_deref(),
        Some("SELECT name FROM users WHERE id = $1")
    );
    assert_eq!(p.statement_name.as_deref(), Some(""));
    assert!(p.parse_seen);
    assert_eq!(p.rows, Some(1));
    assert_eq!(p.command_tag.as_deref(), Some("SELECT 1"));
    assert!(c.skips().is_empty(), "{:?}", c.skips());
}

#[test]
fn several_executes_per_sync() {
    let mut c = Conn::started();
    let t = c.front(&cat(&[
        parse("ins", "INSERT INTO t VALUES ($1)"),
        bind("", "ins", &[b"1"]),
        execute("", 0),
        bind("", "ins", &[b"2"]),
        execute("", 0),
        bind("", "ins", &[b"3"]),
        execute("", 0),
        sync(),
    ]));
    c.back(&cat(&[
        empty(b'1'),
        empty(b'2'),
        complete("INSERT 0 1"),
        empty(b'2'),
        complete("INSERT 0 1"),
    ]));
    let last = c.back(&cat(&[empty(b'2'), complete("INSERT 0 1"), ready(b'I')]));
    let ex = c.exchanges();
    assert_eq!(ex.len(), 3);
    for e in &ex {
        assert_eq!(e.outcome, Outcome::Complete);
        assert_eq!(e.start_ns, t.start_ns);
        let p = pg(e);
        assert_eq!(p.query.as_deref(), Some("INSERT INTO t VALUES ($1)"));
        assert_eq!(p.statement_name.as_deref(), Some("ins"));
        assert_eq!(p.command_tag.as_deref(), Some("INSERT 0 1"));
    }
    assert_eq!(ex[2].end_ns, last.end_ns);
}

#[test]
fn pipelined_batches_pair_in_order() {
    let mut c = Conn::started();
    let mut front = Vec::new();
    let mut back = Vec::new();
    for i in 0..5 {
        front.extend(cat(&[
            parse("", &format!("SELECT {i}")),
            bind("", "", &[]),
            describe(b'P', ""),
            execute("", 0),
            sync(),
        ]));
        let mut rows = vec![empty(b'1'), empty(b'2'), row_description(&["x"])];
        for _ in 0..i {
            rows.push(data_row(&[Some("v")]));
        }
        rows.push(complete(&format!("SELECT {i}")));
        rows.push(ready(b'I'));
        back.extend(cat(&rows));
    }
    c.front(&front);
    // Answers split at arbitrary places.
    for piece in back.chunks(7) {
        c.back(piece);
    }
    let p = c.pgs();
    assert_eq!(p.len(), 5);
    for (i, e) in p.iter().enumerate() {
        assert_eq!(e.query.as_deref(), Some(format!("SELECT {i}").as_str()));
        assert_eq!(e.rows, Some(i as u64));
        assert_eq!(
            e.command_tag.as_deref(),
            Some(format!("SELECT {i}").as_str())
        );
    }
    assert!(c.skips().is_empty(), "{:?}", c.skips());
}

#[test]
fn error_in_the_middle_of_a_batch_aborts_the_rest() {
    for at_parse in [true, false] {
        let mut c = Conn::started();
        c.front(&cat(&[
            parse("", "SELECT 1"),
            bind("", "", &[]),
            execute("", 0),
            parse("", "SELECT 1/0"),
            bind("", "", &[]),
            execute("", 0),
            parse("", "SELECT 3"),
            bind("", "", &[]),
            execute("", 0),
            sync(),
        ]));
        let mut back = vec![empty(b'1'), empty(b'2'), complete("SELECT 1")];
        if at_parse {
            back.push(error("42601", "syntax error"));
        } else {
            back.extend([empty(b'1'), empty(b'2'), error("22012", "division by zero")]);
        }
        let err = c.back(&cat(&back));
        c.back(&ready(b'I'));
        // The connection goes on normally after the Sync.
        c.front(&query("SELECT 4"));
        c.back(&cat(&[complete("SELECT 1"), ready(b'I')]));
        let ex = c.exchanges();
        assert_eq!(ex.len(), 4, "{at_parse}");
        assert_eq!(pg(ex[0]).command_tag.as_deref(), Some("SELECT 1"));
        assert_eq!(pg(ex[0]).sqlstate(), None);
        let failed = pg(ex[1]);
        assert_eq!(failed.query.as_deref(), Some("SELECT 1/0"));
        let code = if at_parse { "42601" } else { "22012" };
        assert_eq!(failed.sqlstate(), Some(code));
        assert!(!failed.aborted);
        assert_eq!(ex[1].end_ns, err.end_ns);
        let skipped = pg(ex[2]);
        assert_eq!(skipped.query.as_deref(), Some("SELECT 3"));
        assert!(skipped.aborted, "never reported as a success");
        assert_eq!(skipped.command_tag, None);
        assert_eq!(ex[2].outcome, Outcome::NoResponse);
        assert_eq!(pg(ex[3]).query.as_deref(), Some("SELECT 4"));
        assert!(c.skips().is_empty(), "{:?}", c.skips());
    }
}

#[test]
fn executes_sent_after_an_error_before_sync_are_aborted() {
    let mut c = Conn::started();
    c.front(&cat(&[
        parse("", "SELECT bad"),
        bind("", "", &[]),
        execute("", 0),
        flush(),
    ]));
    c.back(&error("42703", "column \"bad\" does not exist"));
    c.front(&cat(&[
        parse("", "SELECT 2"),
        bind("", "", &[]),
        execute("", 0),
        sync(),
    ]));
    c.back(&ready(b'I'));
    let p = c.pgs();
    assert_eq!(p.len(), 2);
    assert_eq!(p[0].sqlstate(), Some("42703"));
    assert_eq!(p[1].query.as_deref(), Some("SELECT 2"));
    assert!(p[1].aborted);
}

#[test]
fn the_failing_statement_is_reported_once_even_if_its_execute_follows_the_error() {
    let mut c = Conn::started();
    c.front(&cat(&[parse("", "SELEC 1"), flush()]));
    c.back(&error("42601", "syntax error"));
    c.front(&cat(&[bind("", "", &[]), execute("", 0), sync()]));
    c.back(&ready(b'I'));
    let p = c.pgs();
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].query.as_deref(), Some("SELEC 1"));
    assert_eq!(p[0].sqlstate(), Some("42601"));
}

#[test]
fn named_statements_are_reused() {
    let mut c = Conn::started();
    c.front(&cat(&[
        parse("get_user", "SELECT * FROM users WHERE id = $1"),
        sync(),
    ]));
    c.back(&cat(&[empty(b'1'), ready(b'I')]));
    assert!(c.exchanges().is_empty(), "preparing is not an execution");
    for i in 0..3 {
        let id = i.to_string();
        let start = c.front(&cat(&[
            bind("", "get_user", &[id.as_bytes()]),
            execute("", 0),
            sync(),
        ]));
        c.back(&cat(&[
            empty(b'2'),
            data_row(&[Some("x")]),
            complete("SELECT 1"),
            ready(b'I'),
        ]));
        assert_eq!(c.exchanges()[i].start_ns, start.start_ns);
    }
    let p = c.pgs();
    assert_eq!(p.len(), 3);
    for e in p {
        assert_eq!(
            e.query.as_deref(),
            Some("SELECT * FROM users WHERE id = $1")
        );
        assert_eq!(e.statement_name.as_deref(), Some("get_user"));
        assert!(e.parse_seen);
        assert_eq!(e.rows, Some(1));
    }
    // After Close, the name is unknown again.
    c.front(&cat(&[close_msg(b'S', "get_user"), sync()]));
    c.back(&cat(&[empty(b'3'), ready(b'I')]));
    c.front(&cat(&[bind("", "get_user", &[]), execute("", 0), sync()]));
    c.back(&cat(&[
        error("26000", "prepared statement \"get_user\" does not exist"),
        ready(b'I'),
    ]));
    let p = c.pgs();
    assert_eq!(p.len(), 4);
    assert_eq!(p[3].query, None);
    assert!(!p[3].parse_seen);
}

#[test]
fn statement_prepared_before_the_capture_has_no_text() {
    let mut c = Conn::started();
    c.front(&cat(&[
        bind("", "stmt_7", &[b"1"]),
        describe(b'P', ""),
        execute("", 0),
        sync(),
    ]));
    c.back(&cat(&[
        empty(b'2'),
        row_description(&["a"]),
        data_row(&[Some("1")]),
        complete("SELECT 1"),
        ready(b'I'),
    ]));
    let p = c.pgs();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].query, None);
    assert_eq!(p[0].statement_name.as_deref(), Some("stmt_7"));
    assert!(!p[0].parse_seen);
    assert_eq!(p[0].command_tag.as_deref(), Some("SELECT 1"));
    // Bind not seen either: nothing names the statement.
    let mut c = Conn::started();
    c.front(&cat(&[execute("", 0), sync()]));
    c.back(&cat(&[complete("UPDATE 2"), ready(b'I')]));
    let p = c.pgs();
    assert_eq!(p.len(), 1);
    assert_eq!(
        (p[0].query.as_deref(), p[0].statement_name.as_deref()),
        (None, None)
    );
    assert!(!p[0].parse_seen);
}

#[test]
fn statement_table_is_bounded() {
    let mut c = Conn::started();
    for i in 0..MAX_STATEMENTS + 50 {
        c.front(&cat(&[
            parse(&format!("s{i}"), &format!("SELECT {i}")),
            sync(),
        ]));
        c.back(&cat(&[empty(b'1'), ready(b'I')]));
    }
    assert!(c.parser.session.held_bytes() < MAX_STATEMENT_BYTES);
    // The oldest were evicted, recent ones are known.
    c.front(&cat(&[bind("", "s0", &[]), execute("", 0), sync()]));
    c.back(&cat(&[empty(b'2'), complete("SELECT 1"), ready(b'I')]));
    let recent = format!("s{}", MAX_STATEMENTS + 40);
    c.front(&cat(&[bind("", &recent, &[]), execute("", 0), sync()]));
    c.back(&cat(&[empty(b'2'), complete("SELECT 1"), ready(b'I')]));
    let p = c.pgs();
    assert_eq!(p.len(), 2);
    assert_eq!(p[0].query, None);
    assert_eq!(
        p[1].query.as_deref(),
        Some(format!("SELECT {}", MAX_STATEMENTS + 40).as_str())
    );
}

#[test]
fn row_limits_suspend_portals() {
    let mut c = Conn::started();
    c.front(&cat(&[
        parse("", "SELECT * FROM big"),
        bind("cur", "", &[]),
        execute("cur", 2),
        flush(),
    ]));
    c.back(&cat(&[
        empty(b'1'),
        empty(b'2'),
        data_row(&[Some("1")]),
        data_row(&[Some("2")]),
        empty(b's'),
    ]));
    c.front(&cat(&[execute("cur", 2), sync()]));
    c.back(&cat(&[
        data_row(&[Some("3")]),
        complete("SELECT 1"),
        ready(b'T'),
    ]));
    let p = c.pgs();
    assert_eq!(p.len(), 2);
    assert!(p[0].suspended && !p[1].suspended);
    assert_eq!((p[0].rows, p[1].rows), (Some(2), Some(1)));
    assert_eq!(p[0].row_limit, 2);
    assert_eq!(p[1].query.as_deref(), Some("SELECT * FROM big"));
    assert_eq!(p[1].statement_name.as_deref(), Some(""));
}

#[test]
fn describe_statement_and_parameter_description() {
    let mut c = Conn::started();
    c.front(&cat(&[
        parse("q", "SELECT $1::int"),
        describe(b'S', "q"),
        sync(),
    ]));
    c.back(&cat(&[
        empty(b'1'),
        parameter_description(1),
        row_description(&["int4"]),
        ready(b'I'),
    ]));
    c.front(&cat(&[bind("", "q", &[b"5"]), execute("", 0), sync()]));
    c.back(&cat(&[
        empty(b'2'),
        data_row(&[Some("5")]),
        complete("SELECT 1"),
        ready(b'I'),
    ]));
    let p = c.pgs();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].query.as_deref(), Some("SELECT $1::int"));
    assert!(c.skips().is_empty(), "{:?}", c.skips());
}

#[test]
fn error_answering_sync_is_reported_without_text() {
    let mut c = Conn::started();
    c.front(&cat(&[
        parse("", "INSERT INTO t VALUES (1)"),
        bind("", "", &[]),
        execute("", 0),
        sync(),
    ]));
    c.back(&cat(&[
        empty(b'1'),
        empty(b'2'),
        complete("INSERT 0 1"),
        error("23503", "deferred constraint violated"),
        ready(b'I'),
    ]));
    let p = c.pgs();
    assert_eq!(p.len(), 2);
    assert_eq!(p[0].command_tag.as_deref(), Some("INSERT 0 1"));
    assert_eq!(p[1].sqlstate(), Some("23503"));
    assert_eq!(p[1].query, None);
}

// ---- COPY ----

#[test]
fn copy_in_and_out_are_one_exchange_each() {
    let mut c = Conn::started();
    c.front(&query("COPY t FROM STDIN"));
    c.back(&copy_response(b'G', 2));
    c.front(&cat(&[copy_data(b"1\ta\n"), copy_data(b"2\tb\n")]));
    c.front(&copy_done());
    c.back(&cat(&[complete("COPY 2"), ready(b'I')]));
    c.front(&query("COPY t TO STDOUT"));
    c.back(&cat(&[
        copy_response(b'H', 2),
        copy_data(b"1\ta\n"),
        copy_data(b"2\tb\n"),
        copy_data(b"3\tc\n"),
        copy_done(),
        complete("COPY 3"),
        ready(b'I'),
    ]));
    let p = c.pgs();
    assert_eq!(p.len(), 2);
    assert_eq!(p[0].command_tag.as_deref(), Some("COPY 2"));
    assert_eq!(p[0].copy_bytes, 8);
    assert_eq!(p[1].command_tag.as_deref(), Some("COPY 3"));
    assert_eq!(p[1].copy_bytes, 12);
    assert!(c.skips().is_empty(), "{:?}", c.skips());
}

// ---- encryption, cancel, terminate ----

#[test]
fn ssl_accepted_stops_parsing() {
    let mut c = Conn::new();
    c.front(&ssl_request());
    assert!(!c.parser.tls_follows());
    c.back(b"S");
    assert!(c.parser.tls_follows());
    c.front(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc]);
    c.back(&[0x16, 0x03, 0x03, 0x00, 0x7a, 0x02]);
    c.front(&query("SELECT 1"));
    c.back(&cat(&[complete("SELECT 1"), ready(b'I')]));
    c.close();
    assert!(c.out.is_empty(), "{:?}", c.out);
    assert_eq!(c.parser.held_bytes(), 0);
}

#[test]
fn gssapi_encryption_stops_parsing_and_refusal_continues() {
    let mut c = Conn::new();
    c.front(&untyped_msg(wire::GSSENC_REQUEST, &[]));
    c.back(b"G");
    assert!(!c.parser.tls_follows());
    c.front(&query("SELECT 1"));
    c.back(&cat(&[complete("SELECT 1"), ready(b'I')]));
    assert!(c.out.is_empty());
    // Refused GSSAPI, then refused SSL, then a plain session.
    let mut c = Conn::new();
    c.front(&untyped_msg(wire::GSSENC_REQUEST, &[]));
    c.back(b"N");
    c.front(&ssl_request());
    c.back(b"N");
    c.front(&startup("u", "d"));
    c.back(&backend_ready());
    c.front(&query("SELECT 1"));
    c.back(&cat(&[complete("SELECT 1"), ready(b'I')]));
    assert_eq!(c.pgs().len(), 1);
    assert_eq!(c.pgs()[0].database.as_deref(), Some("d"));
}

#[test]
fn cancel_requests_carry_no_statement() {
    let mut c = Conn::new();
    let mut body = 1234u32.to_be_bytes().to_vec();
    body.extend(5678u32.to_be_bytes());
    c.front(&untyped_msg(wire::CANCEL_REQUEST, &body));
    c.close();
    assert!(c.out.is_empty(), "{:?}", c.out);
}

#[test]
fn pending_statements_are_reported_at_close() {
    let mut c = Conn::started();
    c.front(&cat(&[
        parse("", "SELECT 1"),
        bind("", "", &[]),
        execute("", 0),
        sync(),
    ]));
    c.front(&cat(&[
        parse("", "SELECT pg_sleep(10)"),
        bind("", "", &[]),
        execute("", 0),
        sync(),
    ]));
    c.back(&cat(&[empty(b'1'), empty(b'2'), data_row(&[Some("1")])]));
    c.close();
    let ex = c.exchanges();
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[0].outcome, Outcome::Partial, "answer begun");
    assert_eq!(pg(ex[0]).rows, Some(1));
    assert_eq!(ex[1].outcome, Outcome::NoResponse);
    // Terminate needs no answer.
    let mut c = Conn::started();
    c.front(&empty(b'X'));
    c.close();
    assert!(c.out.is_empty());
}

#[test]
fn startup_failure_is_no_exchange() {
    let mut c = Conn::new();
    c.front(&startup("nobody", "nowhere"));
    c.back(&error("28000", "role \"nobody\" does not exist"));
    c.close();
    assert!(c.out.is_empty(), "{:?}", c.out);
}

// ---- framing ----

/// A conversation that uses every message type, as (frontend?, bytes).
fn conversation() -> Vec<(bool, Vec<u8>)> {
    vec![
        (true, ssl_request()),
        (false, b"N".to_vec()),
        (true, startup("alice", "shop")),
        (false, typed(b'R', &[0, 0, 0, 5, 1, 2, 3, 4])),
        (true, typed(b'p', b"md5abcdef\0")),
        (false, backend_ready()),
        (
            false,
            typed(
                b'N',
                &cat(&[b"SNOTICE\0".to_vec(), b"C00000\0Mhi\0\0".to_vec()]),
            ),
        ),
        (true, query("SELECT 1; SELECT 2")),
        (
            false,
            cat(&[
                row_description(&["a"]),
                data_row(&[Some("1")]),
                complete("SELECT 1"),
                row_description(&["b"]),
                data_row(&[Some("2")]),
                complete("SELECT 1"),
                ready(b'I'),
            ]),
        ),
        (
            true,
            cat(&[
                parse("s", "SELECT $1"),
                describe(b'S', "s"),
                bind("p", "s", &[b"x"]),
                describe(b'P', "p"),
                execute("p", 1),
                execute("p", 0),
                close_msg(b'P', "p"),
                close_msg(b'S', "s"),
                sync(),
            ]),
        ),
        (
            false,
            cat(&[
                empty(b'1'),
                parameter_description(1),
                row_description(&["c"]),
                empty(b'2'),
                row_description(&["c"]),
                data_row(&[Some("x")]),
                empty(b's'),
                complete("SELECT 0"),
                empty(b'3'),
                empty(b'3'),
                ready(b'I'),
            ]),
        ),
        (
            true,
            cat(&[
                parse("", "UPDATE t SET a = 1"),
                bind("", "", &[]),
                describe(b'P', ""),
                execute("", 0),
                sync(),
            ]),
        ),
        (
            false,
            cat(&[
                empty(b'1'),
                empty(b'2'),
                empty(b'n'),
                complete("UPDATE 4"),
                ready(b'T'),
            ]),
        ),
        (true, query("COPY t FROM STDIN")),
        (false, copy_response(b'G', 1)),
        (true, cat(&[copy_data(b"abc\n"), copy_done()])),
        (false, cat(&[complete("COPY 1"), ready(b'I')])),
        (true, query("COPY t TO STDOUT")),
        (
            false,
            cat(&[
                copy_response(b'H', 1),
                copy_data(b"abc\n"),
                copy_done(),
                complete("COPY 1"),
                ready(b'I'),
            ]),
        ),
        (true, query("")),
        (false, cat(&[empty(b'I'), ready(b'I')])),
        (true, query("LISTEN x")),
        (
            false,
            cat(&[
                complete("LISTEN"),
                typed(b'A', &[0, 0, 0, 1, b'x', 0, 0]),
                ready(b'I'),
            ]),
        ),
        (true, typed(b'F', &[0, 0, 0x04, 0xd2, 0, 0, 0, 0, 0, 0])),
        (
            false,
            cat(&[typed(b'V', &u32::MAX.to_be_bytes()), ready(b'I')]),
        ),
        (true, query("SELECT nope")),
        (false, cat(&[error("42703", "no"), ready(b'I')])),
        (true, empty(b'X')),
    ]
}

/// (query, tag, rows, sqlstate) of each exchange.
type Summary = (Option<String>, Option<String>, Option<u64>, Option<String>);

fn summarize(out: &[Output]) -> Vec<Summary> {
    out.iter()
        .filter_map(|o| match o {
            Output::Exchange(e) => {
                let p = pg(e);
                Some((
                    p.query.clone(),
                    p.command_tag.clone(),
                    p.rows,
                    p.sqlstate().map(str::to_owned),
                ))
            }
            Output::Skipped(_) => None,
        })
        .collect()
}

#[test]
fn every_message_type_in_one_conversation() {
    let mut c = Conn::new();
    for (front, bytes) in conversation() {
        if front {
            c.front(&bytes);
        } else {
            c.back(&bytes);
        }
    }
    c.close();
    assert!(c.skips().is_empty(), "{:?}", c.skips());
    let s = |q: &str, t: Option<&str>, r: Option<u64>, e: Option<&str>| {
        (
            Some(q.to_owned()),
            t.map(str::to_owned),
            r,
            e.map(str::to_owned),
        )
    };
    assert_eq!(
        summarize(&c.out),
        vec![
            s("SELECT 1; SELECT 2", Some("SELECT 1"), Some(2), None),
            s("SELECT $1", None, Some(1), None),
            s("SELECT $1", Some("SELECT 0"), Some(0), None),
            s("UPDATE t SET a = 1", Some("UPDATE 4"), None, None),
            s("COPY t FROM STDIN", Some("COPY 1"), None, None),
            s("COPY t TO STDOUT", Some("COPY 1"), None, None),
            s("", None, None, None),
            s("LISTEN x", Some("LISTEN"), None, None),
            s("SELECT nope", None, None, Some("42703")),
        ]
    );
}

#[test]
fn every_split_point_gives_the_same_exchanges() {
    let conv = conversation();
    let mut whole = Conn::new();
    for (front, bytes) in &conv {
        if *front {
            whole.front(bytes);
        } else {
            whole.back(bytes);
        }
    }
    whole.close();
    let expected = summarize(&whole.out);
    for (i, (_, bytes)) in conv.iter().enumerate() {
        for cut in 1..bytes.len() {
            let mut c = Conn::new();
            for (j, (front, b)) in conv.iter().enumerate() {
                let pieces: Vec<&[u8]> = if i == j {
                    vec![&b[..cut], &b[cut..]]
                } else {
                    vec![b]
                };
                for p in pieces {
                    if *front {
                        c.front(p);
                    } else {
                        c.back(p);
                    }
                }
            }
            c.close();
            assert_eq!(summarize(&c.out), expected, "event {i} cut at {cut}");
            assert!(
                c.skips().is_empty(),
                "event {i} cut at {cut}: {:?}",
                c.skips()
            );
        }
    }
    // One byte per feed everywhere.
    let mut c = Conn::new();
    for (front, b) in &conv {
        for byte in b.chunks(1) {
            if *front {
                c.front(byte);
            } else {
                c.back(byte);
            }
        }
    }
    c.close();
    assert_eq!(summarize(&c.out), expected);
}

#[test]
fn joining_mid_connection() {
    // The capture starts after startup, in the middle of a backend message.
    let mut c = Conn::new();
    let tail = data_row(&[Some("a long value that was cut")]);
    c.back(&cat(&[
        tail[9..].to_vec(),
        complete("SELECT 9"),
        ready(b'I'),
    ]));
    assert!(c.exchanges().is_empty());
    c.front(&cat(&[
        parse("", "SELECT * FROM t WHERE a = $1"),
        bind("", "", &[b"1"]),
        execute("", 0),
        sync(),
    ]));
    c.back(&cat(&[
        empty(b'1'),
        empty(b'2'),
        data_row(&[Some("1")]),
        complete("SELECT 1"),
        ready(b'I'),
    ]));
    let ex = c.exchanges();
    assert_eq!(ex.len(), 1, "{:?}", c.out);
    assert_eq!(ex[0].role, Role::Client);
    let p = pg(ex[0]);
    assert_eq!(p.query.as_deref(), Some("SELECT * FROM t WHERE a = $1"));
    assert_eq!(p.database, None);
    // The CommandComplete before the ReadyForQuery was framed but could not be read: only
    // the backend sends `Z`, and until then `C` could be a Close.
    assert_eq!(c.skips(), vec![SkipReason::Garbage]);

    // Server side, joined at a query.
    let mut c = Conn::server();
    c.front(&query("DELETE FROM t"));
    c.back(&cat(&[complete("DELETE 3"), ready(b'I')]));
    let ex = c.exchanges();
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].role, Role::Server);
}

#[test]
fn gap_inside_a_message_of_known_length_only_skips() {
    let mut c = Conn::started();
    c.front(&query("SELECT * FROM t"));
    let big = data_row(&[Some(&"v".repeat(1000))]);
    c.back(&cat(&[row_description(&["v"]), big[..100].to_vec()]));
    c.gap(false, 800);
    c.back(&cat(&[
        big[900..].to_vec(),
        data_row(&[Some("w")]),
        complete("SELECT 2"),
        ready(b'I'),
    ]));
    let ex = c.exchanges();
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].outcome, Outcome::Partial);
    assert_eq!(pg(ex[0]).rows, Some(2));
    assert!(c.skips().is_empty(), "{:?}", c.skips());

    // A gap inside the query text cuts it.
    let mut c = Conn::started();
    let sql = format!("SELECT '{}'", "x".repeat(500));
    let q = query(&sql);
    c.front(&q[..50]);
    c.gap(true, 100);
    c.front(&q[150..]);
    c.back(&cat(&[complete("SELECT 1"), ready(b'I')]));
    let ex = c.exchanges();
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].outcome, Outcome::Partial);
    let p = pg(ex[0]);
    assert!(p.query_truncated);
    assert_eq!(p.query.as_deref(), Some(&sql[..45]));
}

#[test]
fn gap_at_a_boundary_resynchronises() {
    let mut c = Conn::started();
    c.front(&query("SELECT 1"));
    c.gap(false, 30);
    c.back(&cat(&[
        data_row(&[Some("1")]),
        complete("SELECT 1"),
        ready(b'I'),
    ]));
    c.front(&query("SELECT 2"));
    c.back(&cat(&[complete("SELECT 1"), ready(b'I')]));
    let ex = c.exchanges();
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[0].outcome, Outcome::Partial);
    assert_eq!(ex[1].outcome, Outcome::Complete);
    assert_eq!(pg(ex[1]).query.as_deref(), Some("SELECT 2"));
    assert_eq!(c.skips(), vec![SkipReason::Gap]);

    // After a gap the next answer pairs with the oldest waiting statement, reported partial:
    // nothing tells whether the gap held its whole answer.
    let mut c = Conn::started();
    c.front(&query("SELECT 1"));
    c.front(&query("SELECT 2"));
    c.gap(false, 20);
    // Resync needs evidence: these chunks end at message boundaries.
    c.back(&cat(&[complete("SELECT 1"), ready(b'I')]));
    c.close();
    let ex = c.exchanges();
    assert_eq!(ex.len(), 2, "{:?}", c.out);
    assert_eq!(pg(ex[0]).query.as_deref(), Some("SELECT 1"));
    assert_eq!(ex[0].outcome, Outcome::Partial);
    assert_eq!(pg(ex[1]).query.as_deref(), Some("SELECT 2"));
    assert_eq!(ex[1].outcome, Outcome::NoResponse);

    // An answer of another kind than the oldest item expects proves the items before it lost.
    let mut c = Conn::started();
    let batch = |sql: &str| {
        cat(&[
            parse("", sql),
            bind("", "", &[]),
            describe(b'P', ""),
            execute("", 0),
            sync(),
        ])
    };
    c.front(&cat(&[batch("SELECT 1"), batch("SELECT 2")]));
    c.back(&empty(b'1'));
    c.gap(false, 30);
    c.back(&cat(&[
        data_row(&[Some("1")]),
        complete("SELECT 1"),
        ready(b'I'),
    ]));
    c.back(&cat(&[
        empty(b'1'),
        empty(b'2'),
        row_description(&["x"]),
        complete("SELECT 0"),
        ready(b'I'),
    ]));
    let ex = c.exchanges();
    assert_eq!(ex.len(), 2, "{:?}", c.out);
    assert_eq!(ex[0].outcome, Outcome::Partial);
    assert_eq!(pg(ex[0]).rows, Some(1));
    assert_eq!(ex[1].outcome, Outcome::Complete);
    assert_eq!(pg(ex[1]).query.as_deref(), Some("SELECT 2"));
    assert_eq!(pg(ex[1]).rows, Some(0));
    assert_eq!(c.skips(), vec![SkipReason::Gap]);
}

#[test]
fn unpaired_answers_are_counted() {
    let mut c = Conn::started();
    c.back(&cat(&[complete("SELECT 1"), ready(b'I')]));
    assert_eq!(c.skips(), vec![SkipReason::UnpairedResponse]);
    assert!(c.exchanges().is_empty());
}

#[test]
fn pending_statements_are_bounded() {
    let mut c = Conn::started();
    for i in 0..MAX_PENDING_RUNS + 10 {
        c.front(&query(&format!("SELECT {i}")));
    }
    assert!(c.skips().contains(&SkipReason::TooManyPending));
    assert!(c.parser.session.held_bytes() < MAX_PENDING_RUNS * 1024);
    // Big texts: bounded by bytes as well.
    let mut c = Conn::started();
    let big = "x".repeat(MAX_QUERY);
    for _ in 0..40 {
        c.front(&query(&big));
    }
    assert!(c.parser.held_bytes() < MAX_PENDING_TEXT + 2 * MAX_QUERY + 64 * 1024);
}

#[test]
fn garbage_in_a_synced_stream_is_skipped() {
    let mut c = Conn::started();
    c.front(b"\xff\xfe this is not postgres");
    c.front(&query("SELECT 1"));
    c.back(&cat(&[complete("SELECT 1"), ready(b'I')]));
    assert_eq!(c.pgs().len(), 1);
    assert_eq!(c.skips(), vec![SkipReason::Garbage]);
}

// ---- robustness ----

/// Deterministic pseudo-random numbers (SplitMix64), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Checks the outputs, `given` bytes having been fed or lost per direction, and counts them as
/// (exchanges, skips).
fn settle(given: [u64; 2], out: &mut Vec<Output>, counts: &mut (usize, usize)) {
    check_outputs(out);
    for o in out.drain(..) {
        match o {
            Output::Exchange(e) => {
                let frontend = match e.role {
                    Role::Client => SEND,
                    Role::Server => RECV,
                };
                assert!(e.request_offset < given[slot(frontend)], "{e:?}");
                counts.0 += 1;
            }
            Output::Skipped(_) => counts.1 += 1,
        }
    }
}

/// Feeds `stream` to fresh parsers in random pieces, directions, gaps and closes.
fn drive(rng: &mut Rng, stream: &[u8], max_piece: u64) -> (usize, usize) {
    let mut p = PgParser::new();
    let mut out = Vec::new();
    let mut counts = (0, 0);
    let mut given = [0u64; 2];
    let mut clock = 0;
    let mut pos = 0;
    while pos < stream.len() {
        clock += 10;
        let timing = Timing {
            start_ns: clock,
            end_ns: clock + 5,
            thread: (clock % 7) as u32,
        };
        let dir = if rng.below(2) == 0 { SEND } else { RECV };
        match rng.below(100) {
            0..=3 => {
                let len = rng.below(100_000);
                given[slot(dir)] += len;
                p.gap(dir, len, timing, &mut out);
            }
            4 => {
                p.close(clock, &mut out);
                settle(given, &mut out, &mut counts);
                p = PgParser::new();
                given = [0; 2];
            }
            _ => {
                let n = (1 + rng.below(max_piece) as usize).min(stream.len() - pos);
                given[slot(dir)] += n as u64;
                p.feed(dir, &stream[pos..pos + n], timing, &mut out);
                pos += n;
            }
        }
        check_bounds(&p);
        settle(given, &mut out, &mut counts);
    }
    p.close(clock, &mut out);
    settle(given, &mut out, &mut counts);
    counts
}

#[test]
fn random_bytes_never_panic_and_stay_bounded() {
    let mut rng = Rng(42);
    let stream: Vec<u8> = (0..4 << 20).map(|_| rng.next() as u8).collect();
    let (_, skips) = drive(&mut rng, &stream, 8192);
    assert!(skips > 0, "random bytes must be counted as skipped");
}

#[test]
fn message_soup_never_panics_and_stays_bounded() {
    let mut tokens: Vec<Vec<u8>> = conversation().into_iter().map(|(_, b)| b).collect();
    tokens.extend([
        typed(b'D', &[0xff, 0xff]),
        typed(b'E', b"\0"),
        typed(b'B', &[0; 3]),
        typed(b'P', b"x"),
        query(&"y".repeat(70_000)),
        vec![b'Q', 0x7f, 0xff, 0xff, 0xff],
        vec![0, 0, 0, 8],
        startup("u", "d"),
    ]);
    let mut rng = Rng(7);
    let mut exchanges = 0;
    for round in 0..30 {
        let mut stream = Vec::new();
        while stream.len() < 256 * 1024 {
            stream.extend_from_slice(&tokens[rng.below(tokens.len() as u64) as usize]);
        }
        let max_piece = [1, 64, 8192][round % 3];
        exchanges += drive(&mut rng, &stream, max_piece).0;
    }
    assert!(exchanges > 0, "the soup must reach exchanges");
}

// ---- detection ----

#[test]
fn probe_startup_phase_messages() {
    for msg in [
        startup("alice", "shop"),
        ssl_request(),
        untyped_msg(wire::GSSENC_REQUEST, &[]),
        untyped_msg(wire::CANCEL_REQUEST, &[0, 0, 0, 1, 0, 0, 0, 2]),
    ] {
        for dir in [SEND, RECV] {
            assert_eq!(probe(dir, &msg), Detection::Found(Protocol::Postgres));
        }
        for n in 0..8 {
            assert_eq!(probe(SEND, &msg[..n]), Detection::NeedMore, "{n} bytes");
        }
    }
    // A startup message needs its user parameter.
    let mut body = cstrs(&["database", "x"]);
    body.push(0);
    assert_eq!(
        probe(SEND, &untyped_msg(196_608, &body)),
        Detection::Unknown
    );
}

#[test]
fn probe_typed_runs_need_evidence() {
    let found = Detection::Found(Protocol::Postgres);
    assert_eq!(probe(SEND, &query("SELECT 1")), found);
    assert_eq!(
        probe(
            SEND,
            &cat(&[bind("", "s", &[b"1"]), execute("", 0), sync()])
        ),
        found
    );
    assert_eq!(
        probe(
            RECV,
            &cat(&[data_row(&[Some("1")]), complete("SELECT 1"), ready(b'I')])
        ),
        found
    );
    let mut long = cat(&[row_description(&["a"]), data_row(&[Some("1")])]);
    long.extend(&data_row(&[Some(&"z".repeat(200))])[..50]);
    assert_eq!(probe(RECV, &long), found);
    // A lone message without a body to check is not enough.
    assert_ne!(probe(SEND, &sync()), found);
    assert_ne!(probe(RECV, &ready(b'I')[..5]), found);
    // A message cut at the end, alone, is not enough.
    let q = query(&"SELECT 1 ".repeat(20));
    assert_eq!(probe(SEND, &q[..q.len() - 1]), Detection::Unknown);
}

#[test]
fn probe_rejects_other_protocols() {
    for data in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"*1\r\n$4\r\nPING\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"\x00\x00\x00\x2a\x00\x03\x00\x00\x00\x00\x00\x01\x00\x04test",
        b"Query: D 12 S 00 not binary at all, just text that is long enough to decide",
    ] {
        assert_eq!(probe(SEND, data), Detection::Unknown, "{data:?}");
    }
}

// ---- stream positions and threads ----

/// (query, request offset, request thread) of each exchange.
fn origins(c: &Conn) -> Vec<(Option<String>, u64, u32)> {
    c.exchanges()
        .iter()
        .map(|e| (pg(e).query.clone(), e.request_offset, e.request_thread))
        .collect()
}

fn some(sql: &str) -> Option<String> {
    Some(sql.to_owned())
}

/// Parse, Bind, Execute, Sync of one unnamed statement.
fn extended(sql: &str) -> Vec<u8> {
    cat(&[parse("", sql), bind("", "", &[]), execute("", 0), sync()])
}

/// What the backend answers to [`extended`].
fn extended_answer(tag: &str) -> Vec<u8> {
    cat(&[empty(b'1'), empty(b'2'), complete(tag), ready(b'I')])
}

#[test]
fn extended_pipeline_in_one_chunk_and_a_simple_query() {
    let mut c = Conn::started();
    let at0 = startup("alice", "shop").len() as u64;
    let q = query("SELECT 0");
    let t_q = c.front(&q);
    c.back(&cat(&[complete("SELECT 1"), ready(b'I')]));
    // Two batches in one chunk; a third whose Parse header is split into the next chunk.
    let (b1, b2, b3) = (
        extended("SELECT 1"),
        extended("SELECT 2"),
        extended("SELECT 3"),
    );
    let chunk = cat(&[b1.clone(), b2.clone(), b3[..3].to_vec()]);
    let t_pipe = c.front(&chunk);
    let t_rest = c.front(&b3[3..]);
    c.back(&cat(&[
        extended_answer("SELECT 1"),
        extended_answer("SELECT 1"),
        extended_answer("SELECT 1"),
    ]));
    let at1 = at0 + q.len() as u64;
    let at2 = at1 + b1.len() as u64;
    let at3 = at2 + b2.len() as u64;
    assert_eq!(
        origins(&c),
        [
            (some("SELECT 0"), at0, t_q.thread),
            (some("SELECT 1"), at1, t_pipe.thread),
            (some("SELECT 2"), at2, t_pipe.thread),
            (some("SELECT 3"), at3, t_pipe.thread),
        ]
    );
    assert_ne!(t_pipe.thread, t_rest.thread);
    assert!(c.exchanges().iter().all(|e| e.outcome == Outcome::Complete));
}

#[test]
fn a_run_starts_at_its_first_message_whatever_it_is() {
    let mut c = Conn::started();
    let at0 = startup("alice", "shop").len() as u64;
    let prepare = cat(&[parse("s", "SELECT $1"), sync()]);
    c.front(&prepare);
    c.back(&cat(&[empty(b'1'), ready(b'I')]));
    // A run that starts at a Bind of the prepared statement, and one that starts at a Describe
    // of it, both after a Flush that belongs to no run; several Executes after one Sync.
    let by_bind = cat(&[bind("", "s", &[b"1"]), execute("", 0)]);
    let by_describe = cat(&[
        describe(b'S', "s"),
        bind("", "s", &[b"2"]),
        execute("", 0),
        sync(),
    ]);
    let chunk = cat(&[flush(), by_bind.clone(), by_describe.clone()]);
    let t = c.front(&chunk);
    c.back(&cat(&[
        empty(b'2'),
        complete("SELECT 1"),
        parameter_description(1),
        empty(b'n'),
        empty(b'2'),
        complete("SELECT 1"),
        ready(b'I'),
    ]));
    let at_bind = at0 + prepare.len() as u64 + flush().len() as u64;
    let at_describe = at_bind + by_bind.len() as u64;
    assert_eq!(
        origins(&c),
        [
            (some("SELECT $1"), at_bind, t.thread),
            (some("SELECT $1"), at_describe, t.thread),
        ],
        "{:?}",
        c.out
    );
}

#[test]
fn offsets_and_threads_hold_at_every_split_position() {
    let head = startup("alice", "shop");
    let parts = [
        (some("SELECT 1"), query("SELECT 1")),
        (some("SELECT 2"), extended("SELECT 2")),
        (some("SELECT 3"), query("SELECT 3")),
    ];
    let mut stream = head.clone();
    let mut starts = Vec::new();
    for (sql, msg) in &parts {
        starts.push((sql.clone(), stream.len()));
        stream.extend(msg);
    }
    let answers = cat(&[
        backend_ready(),
        complete("SELECT 1"),
        ready(b'I'),
        extended_answer("SELECT 1"),
        complete("SELECT 1"),
        ready(b'I'),
    ]);
    for server in [false, true] {
        for cut in 0..=stream.len() {
            let mut c = if server { Conn::server() } else { Conn::new() };
            let t1 = c.front(&stream[..cut]);
            let t2 = c.front(&stream[cut..]);
            c.back(&answers);
            let want: Vec<_> = starts
                .iter()
                .map(|(sql, at)| {
                    let thread = if *at < cut { t1.thread } else { t2.thread };
                    (sql.clone(), *at as u64, thread)
                })
                .collect();
            assert_eq!(origins(&c), want, "cut at {cut}, server {server}");
        }
    }
}

#[test]
fn gaps_before_statements_advance_the_offset() {
    // Joined mid-connection: the bytes before the capture are a gap.
    let mut c = Conn::server();
    c.gap(true, 4000);
    let q1 = query("DELETE FROM t");
    let t1 = c.front(&q1);
    c.back(&cat(&[complete("DELETE 3"), ready(b'I')]));
    // A gap at a message boundary loses the framing; the next chunk starts a message.
    c.gap(true, 123);
    let b2 = extended("SELECT 2");
    let t2 = c.front(&b2);
    c.back(&extended_answer("SELECT 1"));
    // A gap inside the query text keeps the framing and the statement's start.
    let q3 = query(&format!("SELECT '{}'", "x".repeat(300)));
    let t3 = c.front(&q3[..50]);
    c.gap(true, 100);
    c.front(&q3[150..]);
    let q4 = query("SELECT 4");
    let t4 = c.front(&q4);
    c.back(&cat(&[complete("SELECT 1"), ready(b'I')]));
    c.back(&cat(&[complete("SELECT 1"), ready(b'I')]));
    let at2 = 4000 + q1.len() as u64 + 123;
    let at3 = at2 + b2.len() as u64;
    let at4 = at3 + q3.len() as u64;
    let got: Vec<_> = c
        .exchanges()
        .iter()
        .map(|e| (e.role, e.request_offset, e.request_thread))
        .collect();
    assert_eq!(
        got,
        [
            (Role::Server, 4000, t1.thread),
            (Role::Server, at2, t2.thread),
            (Role::Server, at3, t3.thread),
            (Role::Server, at4, t4.thread),
        ],
        "{:?}",
        c.out
    );
}

#[test]
fn error_answering_sync_is_placed_at_the_sync() {
    let mut c = Conn::started();
    let at0 = startup("alice", "shop").len() as u64;
    let statement = cat(&[
        parse("", "INSERT INTO t VALUES (1)"),
        bind("", "", &[]),
        execute("", 0),
    ]);
    let t_statement = c.front(&statement);
    let t_sync = c.front(&sync());
    c.back(&cat(&[
        empty(b'1'),
        empty(b'2'),
        complete("INSERT 0 1"),
        error("23503", "deferred constraint violated"),
        ready(b'I'),
    ]));
    assert_eq!(
        origins(&c),
        [
            (some("INSERT INTO t VALUES (1)"), at0, t_statement.thread),
            (None, at0 + statement.len() as u64, t_sync.thread),
        ]
    );
}
