//! Throughput of the PostgreSQL parser: the recorded pgbench run (prepared statements, one feed
//! per recorded chunk) and a large result set read in 8 KiB pieces, as the server writes it.

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use protocols::postgres::PgParser;
use protocols::{ConnectionParser, Direction, Output, Timing};

/// One captured syscall.
struct Feed {
    dir: Direction,
    data: Vec<u8>,
}

/// The pgbench capture from the client's side (`testdata/pg_pgbench_prepared/conn-1`).
fn pgbench_stream() -> Vec<Feed> {
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/pg_pgbench_prepared");
    let index = std::fs::read_to_string(base.join("conn-1.json")).expect("index");
    let bytes = std::fs::read(base.join("conn-1.bin")).expect("bytes");
    let mut feeds = Vec::new();
    let mut pos = 0;
    for line in index.lines().filter(|l| l.contains("\"dir\"")) {
        let len: usize = line
            .split("\"len\":")
            .nth(1)
            .and_then(|s| s.trim().trim_end_matches([',', '}']).trim().parse().ok())
            .expect("len");
        let dir = if line.contains("\"client\"") {
            Direction::Send
        } else {
            Direction::Recv
        };
        feeds.push(Feed {
            dir,
            data: bytes[pos..pos + len].to_vec(),
        });
        pos += len;
    }
    feeds
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend(((body.len() + 4) as u32).to_be_bytes());
    m.extend(body);
    m
}

/// A startup, then `SELECT * FROM items` answered by `rows` four-column rows, read 8 KiB at a time.
fn result_set_stream(rows: usize) -> Vec<Feed> {
    let mut startup = 196_608u32.to_be_bytes().to_vec();
    startup.extend(b"user\0app\0database\0shop\0\0");
    let mut first = ((startup.len() + 4) as u32).to_be_bytes().to_vec();
    first.extend(startup);
    let mut feeds = vec![
        Feed {
            dir: Direction::Send,
            data: first,
        },
        Feed {
            dir: Direction::Recv,
            data: [message(b'R', &[0, 0, 0, 0]), message(b'Z', b"I")].concat(),
        },
        Feed {
            dir: Direction::Send,
            data: message(b'Q', b"SELECT id, name, price, description FROM items\0"),
        },
    ];
    let mut answer = message(b'T', &[0, 4]);
    for i in 0..rows {
        let id = i.to_string();
        let name = format!("item number {i}");
        let price = format!("{}.{:02}", i % 1000, i % 100);
        let desc = "a moderately long description of the item, as tables often have";
        let mut row = 4u16.to_be_bytes().to_vec();
        for col in [id.as_str(), &name, &price, desc] {
            row.extend((col.len() as u32).to_be_bytes());
            row.extend(col.as_bytes());
        }
        answer.extend(message(b'D', &row));
    }
    answer.extend(message(b'C', format!("SELECT {rows}\0").as_bytes()));
    answer.extend(message(b'Z', b"I"));
    feeds.extend(answer.chunks(8192).map(|c| Feed {
        dir: Direction::Recv,
        data: c.to_vec(),
    }));
    feeds
}

fn run(feeds: &[Feed]) -> usize {
    let mut parser = PgParser::new();
    let mut out = Vec::new();
    let mut exchanges = 0;
    for (i, feed) in feeds.iter().enumerate() {
        let t = i as u64 * 1000;
        parser.feed(
            feed.dir,
            &feed.data,
            Timing {
                start_ns: t,
                end_ns: t + 500,
                thread: 1,
            },
            &mut out,
        );
        exchanges += out
            .drain(..)
            .filter(|o| matches!(o, Output::Exchange(_)))
            .count();
    }
    parser.close(u64::MAX, &mut out);
    exchanges + out.len()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("postgres");
    for (name, feeds, expected) in [
        ("pgbench_prepared_capture", pgbench_stream(), 140),
        ("result_set_100k_rows", result_set_stream(100_000), 1),
    ] {
        assert_eq!(run(&feeds), expected, "{name}: parser output changed");
        let bytes: usize = feeds.iter().map(|f| f.data.len()).sum();
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function(name, |b| b.iter(|| run(black_box(&feeds))));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
