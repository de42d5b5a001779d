//! Throughput of the HTTP/2 parser: synthetic gRPC and download connections fed one syscall at a
//! time, and the captured golden connections.

use std::collections::VecDeque;
use std::hint::black_box;
use std::path::PathBuf;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use protocols::http2::Http2Parser;
use protocols::{ConnectionParser, Direction, Output, Timing};

/// One captured syscall.
struct Feed {
    dir: Direction,
    data: Vec<u8>,
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Static table entries this encoder indexes (RFC 7541 Appendix A).
const STATIC: &[(usize, &str, &str)] = &[
    (2, ":method", "GET"),
    (3, ":method", "POST"),
    (6, ":scheme", "http"),
    (8, ":status", "200"),
];

/// An encoder like real ones: known fields indexed, others literal with incremental indexing
/// (plain strings, no Huffman: the decoder's work is then all table and copy).
struct Enc {
    table: VecDeque<(String, String)>,
    size: usize,
}

impl Enc {
    fn new() -> Self {
        Enc {
            table: VecDeque::new(),
            size: 0,
        }
    }

    fn int(out: &mut Vec<u8>, prefix: u32, flags: u8, mut v: usize) {
        let max = (1usize << prefix) - 1;
        if v < max {
            out.push(flags | v as u8);
            return;
        }
        out.push(flags | max as u8);
        v -= max;
        while v >= 128 {
            out.push((v % 128) as u8 | 0x80);
            v /= 128;
        }
        out.push(v as u8);
    }

    fn encode(&mut self, fields: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for &(name, value) in fields {
            if let Some(&(i, _, _)) = STATIC.iter().find(|&&(_, n, v)| n == name && v == value) {
                Self::int(&mut out, 7, 0x80, i);
                continue;
            }
            if let Some(i) = self.table.iter().position(|(n, v)| n == name && v == value) {
                Self::int(&mut out, 7, 0x80, 62 + i);
                continue;
            }
            out.push(0x40);
            for s in [name, value] {
                Self::int(&mut out, 7, 0, s.len());
                out.extend(s.as_bytes());
            }
            let size = name.len() + value.len() + 32;
            while self.size + size > 4096 {
                match self.table.pop_back() {
                    Some((n, v)) => self.size -= n.len() + v.len() + 32,
                    None => break,
                }
            }
            self.size += size;
            self.table.push_front((name.to_owned(), value.to_owned()));
        }
        out
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

/// `n` unary gRPC calls on one connection, with the metadata real clients send; each side writes
/// one syscall per message.
fn grpc_unary(n: u32) -> Vec<Feed> {
    let (mut client, mut server) = (Enc::new(), Enc::new());
    let mut start = PREFACE.to_vec();
    start.extend(frame(0x4, 0, 0, &[0, 2, 0, 0, 0, 0]));
    let mut feeds = vec![Feed {
        dir: Direction::Send,
        data: start,
    }];
    for i in 0..n {
        let id = 2 * i + 1;
        let block = client.encode(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/shop.v1.Orders/GetOrder"),
            (":authority", "orders.internal:50051"),
            ("content-type", "application/grpc"),
            ("user-agent", "grpc-go/1.64.0"),
            ("te", "trailers"),
            ("grpc-timeout", "999m"),
            (
                "traceparent",
                &format!("00-4bf92f3577b34da6a3ce929d0e0e{i:04x}-00f067aa0ba902b7-01"),
            ),
        ]);
        let mut req = frame(0x1, 0x4, id, &block);
        let msg: Vec<u8> = [0, 0, 0, 0, 12]
            .into_iter()
            .chain(*b"order-123456")
            .collect();
        req.extend(frame(0x0, 0x1, id, &msg));
        feeds.push(Feed {
            dir: Direction::Send,
            data: req,
        });
        let head = server.encode(&[(":status", "200"), ("content-type", "application/grpc")]);
        let mut resp = frame(0x1, 0x4, id, &head);
        let body: Vec<u8> = [0, 0, 0, 0, 200].into_iter().chain([7; 200]).collect();
        resp.extend(frame(0x0, 0, id, &body));
        let trailers = server.encode(&[("grpc-status", "0"), ("grpc-message", "")]);
        resp.extend(frame(0x1, 0x5, id, &trailers));
        feeds.push(Feed {
            dir: Direction::Recv,
            data: resp,
        });
    }
    feeds
}

/// One GET answered by `size` bytes in 16 KiB DATA frames, read 4 KiB per syscall.
fn download(size: usize) -> Vec<Feed> {
    let mut enc = Enc::new();
    let mut req = PREFACE.to_vec();
    let block = enc.encode(&[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/files/blob.bin"),
        (":authority", "files"),
    ]);
    req.extend(frame(0x1, 0x5, 1, &block));
    let mut resp = frame(0x1, 0x4, 1, &Enc::new().encode(&[(":status", "200")]));
    let body: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let chunks: Vec<&[u8]> = body.chunks(16 * 1024).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let flags = if i + 1 == chunks.len() { 0x1 } else { 0 };
        resp.extend(frame(0x0, flags, 1, chunk));
    }
    let mut feeds = vec![Feed {
        dir: Direction::Send,
        data: req,
    }];
    feeds.extend(resp.chunks(4096).map(|c| Feed {
        dir: Direction::Recv,
        data: c.to_vec(),
    }));
    feeds
}

/// A connection recorded by `testdata/capture.py`, seen from the client.
fn captured(name: &str) -> Vec<Feed> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name);
    let index = std::fs::read_to_string(dir.join("chunks.txt")).expect("chunks.txt");
    let mut feeds = Vec::new();
    for line in index
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f[0] != "0" {
            continue;
        }
        let bytes = std::fs::read(dir.join(format!("conn0.{}.bin", f[1]))).expect("capture");
        let (offset, len): (usize, usize) =
            (f[2].parse().expect("offset"), f[3].parse().expect("len"));
        feeds.push(Feed {
            dir: if f[1] == "c2s" {
                Direction::Send
            } else {
                Direction::Recv
            },
            data: bytes[offset..offset + len].to_vec(),
        });
    }
    feeds
}

fn run(feeds: &[Feed]) -> usize {
    let mut parser = Http2Parser::new();
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
    let mut group = c.benchmark_group("http2");
    for (name, feeds, expected) in [
        ("grpc_unary_1000", grpc_unary(1000), 1000),
        ("download_4mib", download(4 << 20), 1),
        ("captured_grpc_greeter", captured("grpc_greeter"), 3),
        ("captured_nginx_nghttp", captured("nginx_nghttp"), 5),
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
