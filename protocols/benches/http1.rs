//! Throughput of the HTTP/1.x parser on captured-looking input: one feed per syscall.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use protocols::http1::Http1Parser;
use protocols::{ConnectionParser, Direction, Output, Timing};

/// One captured syscall.
struct Feed {
    dir: Direction,
    data: Vec<u8>,
}

/// A keep-alive connection: `n` GET requests with browser-like headers, each answered with a small
/// JSON body; every message is one syscall.
fn keep_alive_stream(n: usize) -> Vec<Feed> {
    let mut feeds = Vec::with_capacity(2 * n);
    for i in 0..n {
        let request = format!(
            "GET /api/v1/items/{i}?expand=owner&limit=20 HTTP/1.1\r\n\
             Host: api.example.com\r\n\
             User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)\r\n\
             Accept: application/json\r\n\
             Accept-Encoding: gzip, deflate, br\r\n\
             Accept-Language: en-US,en;q=0.9\r\n\
             Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJl\r\n\
             Cookie: session=0123456789abcdef; theme=dark\r\n\
             traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\
             Connection: keep-alive\r\n\r\n"
        );
        let body = format!(
            r#"{{"id":{i},"name":"item {i}","owner":{{"id":7,"name":"someone"}},"tags":["a","b","c"]}}"#
        );
        let response = format!(
            "HTTP/1.1 200 OK\r\n\
             Date: Sun, 06 Nov 1994 08:49:37 GMT\r\n\
             Content-Type: application/json; charset=utf-8\r\n\
             Content-Length: {}\r\n\
             Cache-Control: no-cache\r\n\
             X-Request-Id: 5f0c6c3e-7d2a-4f8e-9a61-{i:012}\r\n\r\n{body}",
            body.len()
        );
        feeds.push(Feed {
            dir: Direction::Send,
            data: request.into_bytes(),
        });
        feeds.push(Feed {
            dir: Direction::Recv,
            data: response.into_bytes(),
        });
    }
    feeds
}

/// One request answered by a `size`-byte chunked body in 16 KiB chunks, read 4 KiB per syscall.
fn chunked_stream(size: usize) -> Vec<Feed> {
    let mut response = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    let body: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    for chunk in body.chunks(16 * 1024) {
        response.extend(format!("{:x}\r\n", chunk.len()).bytes());
        response.extend(chunk);
        response.extend(b"\r\n");
    }
    response.extend(b"0\r\n\r\n");
    let mut feeds = vec![Feed {
        dir: Direction::Send,
        data: b"GET /download HTTP/1.1\r\nHost: files\r\n\r\n".to_vec(),
    }];
    feeds.extend(response.chunks(4096).map(|c| Feed {
        dir: Direction::Recv,
        data: c.to_vec(),
    }));
    feeds
}

fn run(feeds: &[Feed]) -> usize {
    let mut parser = Http1Parser::new();
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
    let mut group = c.benchmark_group("http1");
    for (name, feeds, expected) in [
        ("keep_alive_get_1000", keep_alive_stream(1000), 1000),
        ("chunked_response_4mib", chunked_stream(4 << 20), 1),
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
