//! The PostgreSQL parser on traffic recorded from PostgreSQL 15 by `testdata/pg_capture.py`:
//! psql, pgbench (simple and prepared protocol) and a hand-written pipelining client.

use std::path::PathBuf;

use protocols::postgres::{PgExchange, PgParser};
use protocols::{
    ConnectionParser, Detail, Detection, Direction, Exchange, Outcome, Output, Protocol, Role,
    SkipReason, Timing,
};

/// One recorded chunk: sent by the client (else the server) and its bytes.
struct Chunk {
    client: bool,
    data: Vec<u8>,
}

/// Loads `testdata/<name>.json` (one `{"dir": .., "len": ..}` per line) and its `.bin`.
fn load(name: &str) -> Vec<Chunk> {
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let index = std::fs::read_to_string(base.join(format!("{name}.json"))).expect("index");
    let bytes = std::fs::read(base.join(format!("{name}.bin"))).expect("bytes");
    let mut chunks = Vec::new();
    let mut pos = 0;
    for line in index.lines().filter(|l| l.contains("\"dir\"")) {
        let client = line.contains("\"client\"");
        assert!(client || line.contains("\"server\""), "{line}");
        let len: usize = line
            .split("\"len\":")
            .nth(1)
            .and_then(|s| s.trim().trim_end_matches([',', '}']).trim().parse().ok())
            .expect("len");
        chunks.push(Chunk {
            client,
            data: bytes[pos..pos + len].to_vec(),
        });
        pos += len;
    }
    assert_eq!(pos, bytes.len(), "{name}: index and bytes disagree");
    chunks
}

/// What a replay produced.
struct Replay {
    exchanges: Vec<Exchange>,
    skips: Vec<SkipReason>,
}

impl Replay {
    fn pgs(&self) -> Vec<&PgExchange> {
        self.exchanges
            .iter()
            .map(|e| match &e.detail {
                Detail::Postgres(p) => p,
                other => panic!("not PostgreSQL: {other:?}"),
            })
            .collect()
    }
}

/// Feeds `chunks` as the client (`as_client`) or the server process saw them, one feed per chunk;
/// chunks listed in `lost` are reported as gaps instead.
fn replay(chunks: &[Chunk], as_client: bool, lost: &[usize]) -> Replay {
    let mut parser = PgParser::new();
    let mut out = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let dir = if c.client == as_client {
            Direction::Send
        } else {
            Direction::Recv
        };
        let t = 1000 * (i as u64 + 1);
        let timing = Timing {
            start_ns: t,
            end_ns: t + 500,
            thread: i as u32,
        };
        if lost.contains(&i) {
            parser.gap(dir, c.data.len() as u64, timing, &mut out);
        } else {
            parser.feed(dir, &c.data, timing, &mut out);
        }
        assert!(
            parser.held_bytes() < 1 << 20,
            "held {}",
            parser.held_bytes()
        );
    }
    parser.close(u64::MAX, &mut out);
    let mut r = Replay {
        exchanges: Vec::new(),
        skips: Vec::new(),
    };
    for o in out {
        match o {
            Output::Exchange(e) => {
                assert!(e.start_ns <= e.end_ns);
                r.exchanges.push(e);
            }
            Output::Skipped(s) => r.skips.push(s),
        }
    }
    r
}

/// The fields a golden exchange is checked on.
#[derive(Debug, Clone, PartialEq)]
struct Expect {
    query: Option<String>,
    tag: Option<String>,
    rows: Option<u64>,
    sqlstate: Option<String>,
    statement: Option<String>,
    aborted: bool,
    completions: u32,
    copy_bytes: u64,
}

fn expect(query: &str, tag: &str, rows: Option<u64>) -> Expect {
    Expect {
        query: Some(query.to_owned()),
        tag: (!tag.is_empty()).then(|| tag.to_owned()),
        rows,
        sqlstate: None,
        statement: None,
        aborted: false,
        completions: u32::from(!tag.is_empty()),
        copy_bytes: 0,
    }
}

fn got(p: &PgExchange) -> Expect {
    Expect {
        query: p.query.clone(),
        tag: p.command_tag.clone(),
        rows: p.rows,
        sqlstate: p.sqlstate().map(str::to_owned),
        statement: p.statement_name.clone(),
        aborted: p.aborted,
        completions: p.completions,
        copy_bytes: p.copy_bytes,
    }
}

fn check_both_roles(chunks: &[Chunk], expected: &[Expect]) -> Replay {
    for as_client in [true, false] {
        let r = replay(chunks, as_client, &[]);
        assert!(r.skips.is_empty(), "{:?}", r.skips);
        let got: Vec<Expect> = r.pgs().into_iter().map(got).collect();
        assert_eq!(got, expected, "as client: {as_client}");
        let role = if as_client {
            Role::Client
        } else {
            Role::Server
        };
        assert!(r.exchanges.iter().all(|e| e.role == role));
    }
    replay(chunks, true, &[])
}

#[test]
fn psql_simple_queries() {
    let chunks = load("pg_simple/conn-0");
    let mut failing = expect("select * from missing_table", "", None);
    failing.sqlstate = Some("42P01".to_owned());
    let r = check_both_roles(&chunks, &[expect("select 1", "SELECT 1", Some(1)), failing]);
    let p = r.pgs();
    for e in &p {
        assert_eq!(e.database.as_deref(), Some("postgres"));
        assert_eq!(e.user.as_deref(), Some("postgres"));
        assert_eq!(e.application_name.as_deref(), Some("psql"));
        assert!(e.parse_seen);
    }
    assert_eq!(
        p[1].error.as_ref().and_then(|x| x.message.as_deref()),
        Some("relation \"missing_table\" does not exist")
    );
    assert_eq!(
        p[1].error.as_ref().and_then(|x| x.severity.as_deref()),
        Some("ERROR")
    );
    // Each query ends with the ReadyForQuery chunk that answers it.
    assert_eq!(r.exchanges[0].start_ns, 5000);
    assert_eq!(r.exchanges[0].end_ns, 6500);
    assert_eq!(r.exchanges[1].end_ns, 9500, "the Z came in its own chunk");
    assert!(r.exchanges.iter().all(|e| e.outcome == Outcome::Complete));
}

#[test]
fn pgbench_initialisation() {
    let chunks = load("pg_pgbench_init/conn-0");
    let r = check_both_roles(
        &chunks,
        &[
            expect(
                "drop table if exists pgbench_accounts, pgbench_branches, pgbench_history, pgbench_tellers",
                "DROP TABLE",
                None,
            ),
            expect(
                "create table pgbench_history(tid int,bid int,aid    int,delta int,mtime timestamp,filler char(22))",
                "CREATE TABLE",
                None,
            ),
            expect(
                "create table pgbench_tellers(tid int not null,bid int,tbalance int,filler char(84)) with (fillfactor=100)",
                "CREATE TABLE",
                None,
            ),
            expect(
                "create table pgbench_accounts(aid    int not null,bid int,abalance int,filler char(84)) with (fillfactor=100)",
                "CREATE TABLE",
                None,
            ),
            expect(
                "create table pgbench_branches(bid int not null,bbalance int,filler char(88)) with (fillfactor=100)",
                "CREATE TABLE",
                None,
            ),
            expect("begin", "BEGIN", None),
            expect(
                "truncate table pgbench_accounts, pgbench_branches, pgbench_history, pgbench_tellers",
                "TRUNCATE TABLE",
                None,
            ),
            expect(
                "insert into pgbench_branches(bid,bbalance) select bid, 0 from generate_series(1, 1) as bid",
                "INSERT 0 1",
                None,
            ),
            expect(
                "insert into pgbench_tellers(tid,bid,tbalance) select tid, (tid - 1) / 10 + 1, 0 from generate_series(1, 10) as tid",
                "INSERT 0 10",
                None,
            ),
            expect(
                "insert into pgbench_accounts(aid,bid,abalance,filler) select aid, (aid - 1) / 100000 + 1, 0, '' from generate_series(1, 100000) as aid",
                "INSERT 0 100000",
                None,
            ),
            expect("commit", "COMMIT", None),
            expect("vacuum analyze pgbench_branches", "VACUUM", None),
            expect("vacuum analyze pgbench_tellers", "VACUUM", None),
            expect("vacuum analyze pgbench_accounts", "VACUUM", None),
            expect("vacuum analyze pgbench_history", "VACUUM", None),
            expect(
                "alter table pgbench_branches add primary key (bid)",
                "ALTER TABLE",
                None,
            ),
            expect(
                "alter table pgbench_tellers add primary key (tid)",
                "ALTER TABLE",
                None,
            ),
            expect(
                "alter table pgbench_accounts add primary key (aid)",
                "ALTER TABLE",
                None,
            ),
        ],
    );
    assert_eq!(r.pgs()[0].application_name.as_deref(), Some("pgbench"));
}

/// The seven statements of pgbench's TPC-B-like transaction: (statement, text, tag, rows).
const TPCB: [(&str, &str, &str, Option<u64>); 7] = [
    ("P_0", "BEGIN;", "BEGIN", None),
    (
        "P_1",
        "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;",
        "UPDATE 1",
        None,
    ),
    (
        "P_2",
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1;",
        "SELECT 1",
        Some(1),
    ),
    (
        "P_3",
        "UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2;",
        "UPDATE 1",
        None,
    ),
    (
        "P_4",
        "UPDATE pgbench_branches SET bbalance = bbalance + $1 WHERE bid = $2;",
        "UPDATE 1",
        None,
    ),
    (
        "P_5",
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP);",
        "INSERT 0 1",
        None,
    ),
    ("P_6", "END;", "COMMIT", None),
];

fn tpcb_expected(transactions: usize) -> Vec<Expect> {
    (0..transactions)
        .flat_map(|_| TPCB.iter())
        .map(|(name, sql, tag, rows)| Expect {
            statement: Some((*name).to_owned()),
            ..expect(sql, tag, *rows)
        })
        .collect()
}

#[test]
fn pgbench_prepared_statements() {
    // pgbench first checks the tables on a connection of its own, with simple queries.
    let check = load("pg_pgbench_prepared/conn-0");
    let r = replay(&check, true, &[]);
    let p = r.pgs();
    assert_eq!(p.len(), 2);
    assert_eq!(
        got(p[0]),
        expect("select count(*) from pgbench_branches", "SELECT 1", Some(1))
    );
    let catalog = p[1].query.as_deref().expect("text");
    assert!(
        catalog.starts_with("select o.n, p.partstrat") && catalog.ends_with("limit 1"),
        "{catalog}"
    );
    assert_eq!(p[1].rows, Some(1));

    let chunks = load("pg_pgbench_prepared/conn-1");
    let r = check_both_roles(&chunks, &tpcb_expected(20));
    let p = r.pgs();
    assert!(
        p.iter()
            .all(|e| e.parse_seen && e.database.as_deref() == Some("postgres"))
    );
    // Each Execute ends at its CommandComplete and starts at its first message: the Bind of
    // the chunk that carried Bind/Describe/Execute/Sync.
    for e in &r.exchanges {
        assert_eq!(e.end_ns - e.start_ns, 1500, "request chunk to answer chunk");
    }
}

#[test]
fn pgbench_joined_mid_run_knows_statements_only_by_name() {
    let chunks = load("pg_pgbench_prepared/conn-1");
    // Skip the startup and the first two transactions, which prepared every statement.
    let skip = 2 * 7 * 2 + 7 * 2 + 4;
    let r = replay(&chunks[skip..], true, &[]);
    let expected = tpcb_expected(20);
    let p = r.pgs();
    assert!(p.len() >= 17 * 7, "{}", p.len());
    let tail = &expected[expected.len() - p.len()..];
    for (e, want) in p.iter().zip(tail) {
        assert_eq!(e.query, None, "Parse was not seen");
        assert!(!e.parse_seen);
        assert_eq!(e.statement_name, want.statement);
        assert_eq!(e.command_tag, want.tag);
        assert_eq!(e.rows, want.rows);
        assert_eq!(e.database, None);
    }
    assert!(r.exchanges.iter().all(|e| e.role == Role::Client));
}

/// Replays the pgbench run with chunk `lost` reported as a gap; checks that the last 70
/// statements pair exactly again and returns the replay.
fn pgbench_losing(lost: usize) -> Replay {
    let chunks = load("pg_pgbench_prepared/conn-1");
    assert!(
        chunks.len() > 2 * lost,
        "the last 70 statements come after the loss"
    );
    let expected = tpcb_expected(20);
    let r = replay(&chunks, true, &[lost]);
    let got: Vec<Expect> = r.pgs().into_iter().map(got).collect();
    assert!(got.len() >= expected.len() - 1, "{}", got.len());
    let n = 70;
    assert_eq!(got[got.len() - n..], expected[expected.len() - n..]);
    assert!(r.skips.contains(&SkipReason::Gap), "{:?}", r.skips);
    r
}

#[test]
fn pgbench_realigns_after_a_lost_answer() {
    let chunks = load("pg_pgbench_prepared/conn-1");
    // A whole answer to Bind/Describe/Execute/Sync: every later answer has the same shape, so
    // only the command tags tell which statement an answer belongs to.
    let lost = (40..)
        .find(|&i| !chunks[i].client && chunks[i].data[0] == b'2')
        .expect("server chunk");
    let r = pgbench_losing(lost);
    assert!(
        r.exchanges.iter().any(|e| e.outcome == Outcome::Partial),
        "the statement that lost its answer is partial"
    );
}

#[test]
fn pgbench_survives_a_lost_request() {
    let chunks = load("pg_pgbench_prepared/conn-1");
    let lost = (40..)
        .find(|&i| chunks[i].client && chunks[i].data[0] == b'B')
        .expect("client chunk");
    let r = pgbench_losing(lost);
    assert_eq!(r.exchanges.len(), 139, "the lost statement is not reported");
    assert!(
        r.skips.contains(&SkipReason::UnpairedResponse),
        "{:?}",
        r.skips
    );
}

#[test]
fn pipelined_batches_errors_and_copy() {
    let chunks = load("pg_pipeline/conn-0");
    let named = |tag: &str| Expect {
        statement: Some("ins".to_owned()),
        ..expect("INSERT INTO pipeline_t VALUES ($1)", tag, None)
    };
    let unnamed = |sql: &str, rows| Expect {
        statement: Some(String::new()),
        ..expect(sql, "SELECT 1", rows)
    };
    let mut failed = unnamed("SELECT 1/0", None);
    failed.tag = None;
    failed.completions = 0;
    failed.sqlstate = Some("22012".to_owned());
    let mut skipped = unnamed("SELECT 3", None);
    skipped.tag = None;
    skipped.completions = 0;
    skipped.aborted = true;
    let mut multi = expect(
        "BEGIN; SELECT count(*) FROM pipeline_t; COMMIT",
        "COMMIT",
        Some(1),
    );
    multi.completions = 3;
    let mut copy_in = expect("COPY pipeline_t FROM STDIN", "COPY 3", None);
    copy_in.copy_bytes = 6;
    let mut copy_out = expect("COPY pipeline_t TO STDOUT", "COPY 5", None);
    copy_out.copy_bytes = 10;
    let r = check_both_roles(
        &chunks,
        &[
            unnamed("SELECT 0 AS n, repeat('x', 0)", Some(1)),
            unnamed("SELECT 1 AS n, repeat('x', 1)", Some(1)),
            unnamed("SELECT 2 AS n, repeat('x', 2)", Some(1)),
            unnamed("SELECT 1", Some(1)),
            failed,
            skipped,
            expect(
                "CREATE TEMP TABLE pipeline_t (v text)",
                "CREATE TABLE",
                None,
            ),
            named("INSERT 0 1"),
            named("INSERT 0 1"),
            multi,
            copy_in,
            copy_out,
        ],
    );
    assert_eq!(r.exchanges[5].outcome, Outcome::NoResponse);
    assert_eq!(
        r.pgs()[4].error.as_ref().and_then(|x| x.message.as_deref()),
        Some("division by zero")
    );
    // The three pipelined statements left in one write and were answered in one read.
    let t: Vec<(u64, u64)> = r.exchanges[..3]
        .iter()
        .map(|e| (e.start_ns, e.end_ns))
        .collect();
    assert_eq!(t, vec![(3000, 4500); 3]);
}

#[test]
fn detection_on_recorded_first_chunks() {
    let found = Detection::Found(Protocol::Postgres);
    let simple = load("pg_simple/conn-0");
    assert_eq!(
        protocols::detect(Direction::Send, &simple[0].data),
        found,
        "SSLRequest"
    );
    assert_eq!(
        protocols::detect(Direction::Recv, &simple[2].data),
        found,
        "startup"
    );
    let pipeline = load("pg_pipeline/conn-0");
    assert_eq!(protocols::detect(Direction::Send, &pipeline[0].data), found);
    // Mid-connection: any later chunk of either side.
    let pgbench = load("pg_pgbench_prepared/conn-1");
    for (i, c) in pgbench.iter().enumerate().skip(10).take(40) {
        assert_eq!(
            protocols::detect(Direction::Send, &c.data),
            found,
            "chunk {i}"
        );
    }
}

/// (offset, thread) of each exchange of a replay.
fn origins(r: &Replay) -> Vec<(u64, u32)> {
    r.exchanges
        .iter()
        .map(|e| (e.request_offset, e.request_thread))
        .collect()
}

/// Every statement's position is the first byte of a frontend message that starts a statement
/// in the recorded client bytes, and its thread is the chunk that carried that byte (the replay
/// gives chunk `i` thread `i`), whichever end is traced. Losing a client chunk moves no
/// position: the statements still reported keep theirs.
#[test]
fn request_offsets_point_at_the_statements_first_message() {
    for name in [
        "pg_simple/conn-0",
        "pg_pgbench_init/conn-0",
        "pg_pgbench_prepared/conn-0",
        "pg_pgbench_prepared/conn-1",
        "pg_pipeline/conn-0",
    ] {
        let chunks = load(name);
        // Client bytes, and where each client chunk starts in them.
        let mut client = Vec::new();
        let mut starts = Vec::new();
        for (i, c) in chunks.iter().enumerate().filter(|(_, c)| c.client) {
            starts.push((client.len() as u64, i as u32));
            client.extend(&c.data);
        }
        let reference = origins(&replay(&chunks, true, &[]));
        assert!(!reference.is_empty(), "{name}");
        for &(at, thread) in &reference {
            let tag = client[at as usize];
            assert!(
                b"QPBDES".contains(&tag),
                "{name}: {:?} at {at}",
                tag as char
            );
            let carrier = starts.iter().rev().find(|(s, _)| *s <= at).map(|c| c.1);
            assert_eq!(carrier, Some(thread), "{name} at {at}");
        }
        assert_eq!(origins(&replay(&chunks, false, &[])), reference, "{name}");
        if let Some(lost) =
            (1..chunks.len()).find(|&i| chunks[i].client && chunks[i].data[0] == b'B')
        {
            let damaged = origins(&replay(&chunks, true, &[lost]));
            assert!(!damaged.is_empty(), "{name}");
            for o in &damaged {
                assert!(
                    reference.contains(o),
                    "{name}: {o:?} after losing chunk {lost}"
                );
            }
        }
    }
}
