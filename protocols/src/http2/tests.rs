//! Parser behaviour: framing, streams, HPACK state, captures joined mid-way, gaps and garbage.

use std::collections::VecDeque;

use super::frame::{
    ACK, CONTINUATION, DATA, END_HEADERS, END_STREAM, GOAWAY, HEADERS, PADDED, PING, PRIORITY,
    PRIORITY_FLAG, PUSH_PROMISE, RST_STREAM, SETTINGS, WINDOW_UPDATE,
};
use super::*;

const SEND: Direction = Direction::Send;
const RECV: Direction = Direction::Recv;

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

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.push(kind);
    f.push(flags);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

fn settings(entries: &[(u16, u32)]) -> Vec<u8> {
    let payload: Vec<u8> = entries
        .iter()
        .flat_map(|(id, v)| id.to_be_bytes().into_iter().chain(v.to_be_bytes()))
        .collect();
    frame(SETTINGS, 0, 0, &payload)
}

/// An HPACK encoder that behaves like real ones: exact matches in the static or dynamic table are
/// indexed, anything else is a literal with incremental indexing (name indexed when possible).
struct Enc {
    table: VecDeque<(String, String)>,
    size: usize,
    capacity: usize,
    huffman: bool,
    /// A size update to emit at the start of the next block.
    update: Option<usize>,
}

impl Enc {
    fn new() -> Self {
        Enc {
            table: VecDeque::new(),
            size: 0,
            capacity: 4096,
            huffman: true,
            update: None,
        }
    }

    fn int(out: &mut Vec<u8>, prefix: u32, flags: u8, mut value: usize) {
        let max = (1usize << prefix) - 1;
        if value < max {
            out.push(flags | value as u8);
            return;
        }
        out.push(flags | max as u8);
        value -= max;
        while value >= 128 {
            out.push((value % 128) as u8 | 0x80);
            value /= 128;
        }
        out.push(value as u8);
    }

    fn string(&self, out: &mut Vec<u8>, s: &str) {
        if self.huffman {
            let coded = huffman::encode(s.as_bytes());
            Self::int(out, 7, 0x80, coded.len());
            out.extend(coded);
        } else {
            Self::int(out, 7, 0, s.len());
            out.extend(s.as_bytes());
        }
    }

    fn resize(&mut self, capacity: usize) {
        self.capacity = capacity;
        self.update = Some(capacity);
        self.evict(0);
    }

    fn evict(&mut self, room: usize) {
        while self.size + room > self.capacity {
            match self.table.pop_back() {
                Some((n, v)) => self.size -= n.len() + v.len() + 32,
                None => break,
            }
        }
    }

    fn encode(&mut self, fields: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(size) = self.update.take() {
            Self::int(&mut out, 5, 0x20, size);
        }
        for &(name, value) in fields {
            let stat = hpack::STATIC_TABLE.iter().position(|&e| e == (name, value));
            let dyn_ = self.table.iter().position(|(n, v)| n == name && v == value);
            if let Some(i) = stat {
                Self::int(&mut out, 7, 0x80, i + 1);
                continue;
            }
            if let Some(i) = dyn_ {
                Self::int(&mut out, 7, 0x80, 62 + i);
                continue;
            }
            let name_index = hpack::STATIC_TABLE
                .iter()
                .position(|&(n, _)| n == name)
                .map(|i| i + 1)
                .or_else(|| {
                    self.table
                        .iter()
                        .position(|(n, _)| n == name)
                        .map(|i| 62 + i)
                });
            match name_index {
                Some(i) => Self::int(&mut out, 6, 0x40, i),
                None => {
                    out.push(0x40);
                    self.string(&mut out, name);
                }
            }
            self.string(&mut out, value);
            let size = name.len() + value.len() + 32;
            if size > self.capacity {
                self.table.clear();
                self.size = 0;
            } else {
                self.evict(size);
                self.size += size;
                self.table.push_front((name.to_owned(), value.to_owned()));
            }
        }
        out
    }

    /// A literal that is never indexed: independent of any table.
    fn never_indexed(&self, name: &str, value: &str) -> Vec<u8> {
        let mut out = vec![0x10];
        self.string(&mut out, name);
        self.string(&mut out, value);
        out
    }
}

fn get(enc: &mut Enc, stream: u32, path: &str) -> Vec<u8> {
    let block = enc.encode(&[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "example.com:8080"),
        ("user-agent", "test/1.0"),
        ("accept", "*/*"),
    ]);
    frame(HEADERS, END_HEADERS | END_STREAM, stream, &block)
}

fn ok(enc: &mut Enc, stream: u32, body: &[u8]) -> Vec<u8> {
    let block = enc.encode(&[
        (":status", "200"),
        ("content-type", "text/plain"),
        ("server", "test"),
    ]);
    let mut f = frame(HEADERS, END_HEADERS, stream, &block);
    f.extend(frame(DATA, END_STREAM, stream, body));
    f
}

/// Drives one parser; the n-th event gets timing start 100n, end 100n + 50.
struct Conn {
    parser: Http2Parser,
    out: Vec<Output>,
    clock: u64,
}

impl Conn {
    fn new() -> Self {
        Conn {
            parser: Http2Parser::new(),
            out: Vec::new(),
            clock: 0,
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

    fn feed(&mut self, dir: Direction, data: &[u8]) -> Timing {
        let t = self.tick();
        self.parser.feed(dir, data, t, &mut self.out);
        t
    }

    fn gap(&mut self, dir: Direction, len: u64) {
        let t = self.tick();
        self.parser.gap(dir, len, t, &mut self.out);
    }

    fn close(&mut self) {
        let t = self.tick();
        self.parser.close(t.end_ns, &mut self.out);
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

    fn h2(&self) -> Vec<&Http2Exchange> {
        self.exchanges().into_iter().map(h2).collect()
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

fn h2(e: &Exchange) -> &Http2Exchange {
    match &e.detail {
        Detail::Http2(h) => h,
        other => panic!("not an HTTP/2 exchange: {other:?}"),
    }
}

/// A client's first bytes: preface, SETTINGS, WINDOW_UPDATE.
fn client_start() -> Vec<u8> {
    let mut b = PREFACE.to_vec();
    b.extend(settings(&[(0x2, 0), (0x4, 1 << 20)]));
    b.extend(frame(WINDOW_UPDATE, 0, 0, &[0, 0x0f, 0, 1]));
    b
}

/// A server's first bytes: SETTINGS and the ACK of the client's.
fn server_start() -> Vec<u8> {
    let mut b = settings(&[(0x3, 100), (0x5, 1 << 14)]);
    b.extend(frame(SETTINGS, ACK, 0, &[]));
    b
}

#[test]
fn get_and_response_on_a_fresh_connection() {
    for (client_dir, role) in [(SEND, Role::Client), (RECV, Role::Server)] {
        let server_dir = other(client_dir);
        let (mut ce, mut se) = (Enc::new(), Enc::new());
        let mut c = Conn::new();
        let mut req = client_start();
        req.extend(get(&mut ce, 1, "/items?id=7"));
        let t_req = c.feed(client_dir, &req);
        c.feed(server_dir, &server_start());
        assert!(c.exchanges().is_empty());
        let t_resp = c.feed(server_dir, &ok(&mut se, 1, b"hello world"));
        let ex = c.exchanges();
        assert_eq!(ex.len(), 1, "{:?}", c.out);
        let e = ex[0];
        assert_eq!(e.role, role);
        assert_eq!(e.outcome, Outcome::Complete);
        assert_eq!((e.start_ns, e.end_ns), (t_req.start_ns, t_resp.end_ns));
        let h = h2(e);
        assert_eq!(h.stream_id, 1);
        assert_eq!(h.method.as_deref(), Some("GET"));
        assert_eq!(h.scheme.as_deref(), Some("http"));
        assert_eq!(h.path.as_deref(), Some("/items?id=7"));
        assert_eq!(h.authority.as_deref(), Some("example.com:8080"));
        assert_eq!(h.status, Some(200));
        assert_eq!(h.request_header("User-Agent"), Some("test/1.0"));
        assert_eq!(h.response_header("content-type"), Some("text/plain"));
        assert_eq!((h.request_body_size, h.response_body_size), (0, 11));
        assert!(!h.grpc && !h.degraded && h.reset.is_none());
        assert!(c.skips().is_empty(), "{:?}", c.skips());
    }
}

/// Three requests sharing a warm dynamic table, answered out of order.
fn conversation() -> (Vec<u8>, Vec<u8>) {
    let (mut ce, mut se) = (Enc::new(), Enc::new());
    let mut client = client_start();
    for (id, path) in [(1, "/a"), (3, "/b/c"), (5, "/a")] {
        client.extend(get(&mut ce, id, path));
    }
    let mut server = server_start();
    for (id, body) in [(3, &b"bee"[..]), (1, b"a"), (5, b"again")] {
        server.extend(ok(&mut se, id, body));
    }
    (client, server)
}

/// Stream id, path, status, response body size, outcome, degraded.
type Summary = (u32, Option<String>, Option<u16>, u64, Outcome, bool);

fn summary(c: &Conn) -> Vec<Summary> {
    let mut v: Vec<_> = c
        .exchanges()
        .iter()
        .map(|e| {
            let h = h2(e);
            (
                h.stream_id,
                h.path.clone(),
                h.status,
                h.response_body_size,
                e.outcome,
                h.degraded,
            )
        })
        .collect();
    v.sort_by_key(|s| s.0);
    v
}

#[test]
fn frames_split_at_every_byte_boundary() {
    let (client, server) = conversation();
    let expected = vec![
        (
            1,
            Some("/a".to_owned()),
            Some(200),
            1,
            Outcome::Complete,
            false,
        ),
        (
            3,
            Some("/b/c".to_owned()),
            Some(200),
            3,
            Outcome::Complete,
            false,
        ),
        (
            5,
            Some("/a".to_owned()),
            Some(200),
            5,
            Outcome::Complete,
            false,
        ),
    ];
    let mut whole = Conn::new();
    whole.feed(SEND, &client);
    whole.feed(RECV, &server);
    assert_eq!(summary(&whole), expected);
    for (which, bytes) in [(0, &client), (1, &server)] {
        for k in 0..=bytes.len() {
            let mut c = Conn::new();
            if which == 0 {
                c.feed(SEND, &client[..k]);
                c.feed(SEND, &client[k..]);
                c.feed(RECV, &server);
            } else {
                c.feed(SEND, &client);
                c.feed(RECV, &server[..k]);
                c.feed(RECV, &server[k..]);
            }
            assert_eq!(summary(&c), expected, "split {which} at {k}");
            assert!(
                c.skips().is_empty(),
                "split {which} at {k}: {:?}",
                c.skips()
            );
        }
    }
    let mut bytewise = Conn::new();
    for b in &client {
        bytewise.feed(SEND, &[*b]);
    }
    for b in &server {
        bytewise.feed(RECV, &[*b]);
    }
    assert_eq!(summary(&bytewise), expected);
}

#[test]
fn header_block_continued_in_continuation_frames() {
    let mut enc = Enc::new();
    let block = enc.encode(&[
        (":method", "POST"),
        (":scheme", "https"),
        (":path", "/upload"),
        (":authority", "files"),
        ("x-long", &"v".repeat(300)),
    ]);
    let mut c = Conn::new();
    let mut bytes = client_start();
    bytes.extend(frame(HEADERS, 0, 1, &block[..10]));
    bytes.extend(frame(CONTINUATION, 0, 1, &block[10..200]));
    bytes.extend(frame(CONTINUATION, END_HEADERS, 1, &block[200..]));
    bytes.extend(frame(DATA, 0, 1, &[1; 100]));
    bytes.extend(frame(DATA, END_STREAM, 1, &[2; 50]));
    c.feed(SEND, &bytes);
    c.feed(RECV, &ok(&mut Enc::new(), 1, b""));
    let h = c.h2();
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].method.as_deref(), Some("POST"));
    assert_eq!(h[0].path.as_deref(), Some("/upload"));
    assert_eq!(h[0].request_header("x-long").map(str::len), Some(300));
    assert_eq!(h[0].request_body_size, 150);
    assert!(!h[0].degraded);
}

#[test]
fn interrupted_continuation_loses_the_block_not_the_connection() {
    let mut enc = Enc::new();
    let mut c = Conn::new();
    let mut bytes = client_start();
    let block = enc.encode(&[(":method", "GET"), (":path", "/x"), (":scheme", "http")]);
    bytes.extend(frame(HEADERS, END_STREAM, 1, &block[..2]));
    // A PING where a CONTINUATION must come.
    bytes.extend(frame(PING, 0, 0, &[0; 8]));
    bytes.extend(frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        3,
        &enc.never_indexed(":path", "/y"),
    ));
    c.feed(SEND, &bytes);
    let mut se = Enc::new();
    let mut resp = server_start();
    resp.extend(ok(&mut se, 1, b"1"));
    resp.extend(ok(&mut se, 3, b"3"));
    c.feed(RECV, &resp);
    let h = c.h2();
    assert_eq!(h.len(), 2, "{:?}", c.out);
    assert_eq!((h[0].stream_id, h[0].path.as_deref()), (1, None));
    assert!(h[0].degraded);
    assert_eq!((h[1].stream_id, h[1].path.as_deref()), (3, Some("/y")));
    assert!(
        !h[1].degraded,
        "a block of literals is exact after a desync"
    );
    assert!(c.skips().contains(&SkipReason::Garbage));
    assert!(c.skips().contains(&SkipReason::HpackDesync));
}

#[test]
fn many_interleaved_streams() {
    let (mut ce, mut se) = (Enc::new(), Enc::new());
    let mut c = Conn::new();
    c.feed(SEND, &client_start());
    c.feed(RECV, &server_start());
    let ids: Vec<u32> = (0..300).map(|i| 2 * i + 1).collect();
    for &id in &ids {
        let block = ce.encode(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", &format!("/svc/{}", id % 7)),
            (":authority", "svc"),
            ("x-id", &id.to_string()),
        ]);
        c.feed(SEND, &frame(HEADERS, END_HEADERS, id, &block));
    }
    // Request bodies and responses interleave across streams, in reverse order.
    for &id in ids.iter().rev() {
        c.feed(
            SEND,
            &frame(DATA, END_STREAM, id, &vec![0; id as usize % 13]),
        );
        let block = se.encode(&[(":status", if id % 5 == 0 { "404" } else { "200" })]);
        c.feed(RECV, &frame(HEADERS, END_HEADERS, id, &block));
    }
    for &id in &ids {
        c.feed(RECV, &frame(DATA, 0, id, &vec![1; id as usize % 11]));
    }
    for &id in &ids {
        c.feed(RECV, &frame(DATA, END_STREAM, id, b"."));
    }
    let h = c.h2();
    assert_eq!(h.len(), ids.len());
    for x in h {
        let id = x.stream_id;
        assert_eq!(x.path, Some(format!("/svc/{}", id % 7)));
        assert_eq!(x.request_header("x-id"), Some(id.to_string().as_str()));
        assert_eq!(x.status, Some(if id % 5 == 0 { 404 } else { 200 }));
        assert_eq!(x.request_body_size, u64::from(id % 13));
        assert_eq!(x.response_body_size, u64::from(id % 11) + 1);
    }
    assert!(c.parser.streams.is_empty());
}

#[test]
fn reset_streams() {
    let (mut ce, mut se) = (Enc::new(), Enc::new());
    let mut c = Conn::new();
    let mut start = client_start();
    start.extend(get(&mut ce, 1, "/slow"));
    start.extend(get(&mut ce, 3, "/half"));
    start.extend(get(&mut ce, 5, "/early"));
    c.feed(SEND, &start);
    c.feed(RECV, &server_start());
    // Client cancels stream 1 before any response.
    c.feed(SEND, &frame(RST_STREAM, 0, 1, &8u32.to_be_bytes()));
    // Server resets stream 3 after the response head.
    let block = se.encode(&[(":status", "200")]);
    c.feed(RECV, &frame(HEADERS, END_HEADERS, 3, &block));
    c.feed(RECV, &frame(RST_STREAM, 0, 3, &2u32.to_be_bytes()));
    // A late response frame on a reset stream is ignored.
    c.feed(RECV, &frame(DATA, END_STREAM, 1, b"late"));
    let ex = c.exchanges();
    assert_eq!(ex.len(), 2);
    assert_eq!(
        (h2(ex[0]).stream_id, ex[0].outcome, h2(ex[0]).reset),
        (1, Outcome::NoResponse, Some(8))
    );
    assert_eq!(
        (h2(ex[1]).stream_id, ex[1].outcome, h2(ex[1]).status),
        (3, Outcome::NoResponse, Some(200))
    );
    // A response that ended, then RST_STREAM(NO_ERROR) for the unfinished request, is complete.
    let mut c = Conn::new();
    let mut start = client_start();
    let block = Enc::new().encode(&[(":method", "POST"), (":path", "/up"), (":scheme", "http")]);
    start.extend(frame(HEADERS, END_HEADERS, 1, &block));
    c.feed(SEND, &start);
    c.feed(RECV, &ok(&mut Enc::new(), 1, b"done"));
    assert!(c.exchanges().is_empty());
    c.feed(RECV, &frame(RST_STREAM, 0, 1, &[0; 4]));
    let ex = c.exchanges();
    assert_eq!(ex.len(), 1);
    assert_eq!(
        (ex[0].outcome, h2(ex[0]).reset),
        (Outcome::Complete, Some(0))
    );
}

#[test]
fn goaway_ends_streams_the_server_did_not_process() {
    let (mut ce, mut se) = (Enc::new(), Enc::new());
    let mut c = Conn::new();
    let mut start = client_start();
    for id in [1, 3, 5, 7] {
        start.extend(get(&mut ce, id, "/g"));
    }
    c.feed(SEND, &start);
    let mut goaway = 3u32.to_be_bytes().to_vec();
    goaway.extend(0u32.to_be_bytes());
    goaway.extend(b"bye");
    let t = c.feed(RECV, &frame(GOAWAY, 0, 0, &goaway));
    let ex = c.exchanges();
    assert_eq!(ex.len(), 2);
    for (e, id) in ex.iter().zip([5, 7]) {
        assert_eq!((h2(e).stream_id, e.outcome), (id, Outcome::NoResponse));
        assert_eq!(e.end_ns, t.end_ns);
    }
    c.feed(RECV, &ok(&mut se, 1, b"1"));
    c.feed(RECV, &ok(&mut se, 3, b"3"));
    let done: Vec<u32> = c.h2().iter().map(|h| h.stream_id).collect();
    assert_eq!(done, [5, 7, 1, 3]);
    assert!(
        c.exchanges()
            .iter()
            .skip(2)
            .all(|e| e.outcome == Outcome::Complete)
    );
}

fn grpc_request(enc: &mut Enc, id: u32, method: &str, message: &[u8]) -> Vec<u8> {
    let block = enc.encode(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", method),
        (":authority", "localhost:50051"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("grpc-timeout", "1S"),
    ]);
    let mut f = frame(HEADERS, END_HEADERS, id, &block);
    let mut msg = vec![0];
    msg.extend((message.len() as u32).to_be_bytes());
    msg.extend(message);
    f.extend(frame(DATA, END_STREAM, id, &msg));
    f
}

#[test]
fn grpc_unary_streaming_and_trailers_only() {
    let (mut ce, mut se) = (Enc::new(), Enc::new());
    let mut c = Conn::new();
    let mut req = client_start();
    req.extend(grpc_request(
        &mut ce,
        1,
        "/helloworld.Greeter/SayHello",
        b"\x0a\x03bob",
    ));
    req.extend(grpc_request(&mut ce, 3, "/helloworld.Greeter/Missing", b""));
    req.extend(grpc_request(
        &mut ce,
        5,
        "/helloworld.Greeter/Stream",
        b"\x08\x03",
    ));
    c.feed(SEND, &req);
    c.feed(RECV, &server_start());
    // Unary OK: head, one message, trailers.
    let head = se.encode(&[(":status", "200"), ("content-type", "application/grpc")]);
    c.feed(RECV, &frame(HEADERS, END_HEADERS, 1, &head));
    c.feed(
        RECV,
        &frame(DATA, 0, 1, &[0, 0, 0, 0, 5, 0x0a, 3, b'h', b'i', b'!']),
    );
    let trailers = se.encode(&[("grpc-status", "0"), ("grpc-message", "")]);
    c.feed(
        RECV,
        &frame(HEADERS, END_HEADERS | END_STREAM, 1, &trailers),
    );
    // Trailers-only error with a percent-encoded message.
    let only = se.encode(&[
        (":status", "200"),
        ("content-type", "application/grpc"),
        ("grpc-status", "5"),
        ("grpc-message", "no%20such%20user%3A%20%E2%9C%93"),
    ]);
    c.feed(RECV, &frame(HEADERS, END_HEADERS | END_STREAM, 3, &only));
    // Server streaming: three messages in separate frames, one exchange.
    let head = se.encode(&[
        (":status", "200"),
        ("content-type", "application/grpc+proto"),
    ]);
    c.feed(RECV, &frame(HEADERS, END_HEADERS, 5, &head));
    for i in 0..3u8 {
        c.feed(RECV, &frame(DATA, 0, 5, &[0, 0, 0, 0, 2, 0x08, i]));
    }
    let trailers = se.encode(&[("grpc-status", "0")]);
    c.feed(
        RECV,
        &frame(HEADERS, END_HEADERS | END_STREAM, 5, &trailers),
    );

    let h = c.h2();
    assert_eq!(h.len(), 3);
    assert!(
        h.iter()
            .all(|x| x.grpc && x.status == Some(200) && !x.degraded)
    );
    assert_eq!(h[0].path.as_deref(), Some("/helloworld.Greeter/SayHello"));
    assert_eq!(
        (h[0].grpc_status, h[0].grpc_message.as_deref()),
        (Some(0), Some(""))
    );
    assert_eq!(h[0].trailers.len(), 2);
    assert_eq!((h[0].request_body_size, h[0].response_body_size), (10, 10));
    assert_eq!(h[1].grpc_status, Some(5));
    assert_eq!(h[1].grpc_message.as_deref(), Some("no such user: \u{2713}"));
    assert!(h[1].trailers.is_empty());
    assert_eq!((h[2].grpc_status, h[2].response_body_size), (Some(0), 21));
    assert!(c.exchanges().iter().all(|e| e.outcome == Outcome::Complete));
}

#[test]
fn padding_and_priority_are_not_content() {
    let mut enc = Enc::new();
    let block = enc.encode(&[(":method", "PUT"), (":path", "/p"), (":scheme", "http")]);
    let mut payload = vec![7u8];
    payload.extend([0x80, 0, 0, 3, 200]);
    payload.extend(&block);
    payload.extend([0; 7]);
    let mut bytes = client_start();
    bytes.extend(frame(
        HEADERS,
        END_HEADERS | PADDED | PRIORITY_FLAG,
        1,
        &payload,
    ));
    let mut data = vec![200u8];
    data.extend([9; 20]);
    data.extend([0; 200]);
    bytes.extend(frame(DATA, PADDED | END_STREAM, 1, &data));
    bytes.extend(frame(PRIORITY, 0, 1, &[0, 0, 0, 0, 16]));
    let mut c = Conn::new();
    c.feed(SEND, &bytes);
    let resp = frame(DATA, PADDED, 1, &[0]);
    let head = Enc::new().encode(&[(":status", "201")]);
    c.feed(RECV, &frame(HEADERS, END_HEADERS, 1, &head));
    c.feed(RECV, &resp);
    c.feed(
        RECV,
        &frame(DATA, PADDED | END_STREAM, 1, &[3, b'o', b'k', 0, 0, 0]),
    );
    let h = c.h2();
    assert_eq!(h.len(), 1, "{:?}", c.out);
    assert_eq!(h[0].method.as_deref(), Some("PUT"));
    assert_eq!(h[0].path.as_deref(), Some("/p"));
    assert_eq!((h[0].request_body_size, h[0].response_body_size), (20, 2));
    // Padding longer than the frame is malformed: the block is lost, the stream still tracked.
    let mut c = Conn::new();
    let mut bytes = client_start();
    bytes.extend(frame(
        HEADERS,
        END_HEADERS | PADDED | END_STREAM,
        1,
        &[9, 0x82],
    ));
    c.feed(SEND, &bytes);
    c.close();
    let h = c.h2();
    assert_eq!(
        (h.len(), h[0].method.as_deref(), h[0].degraded),
        (1, None, true)
    );
}

/// Requests of a client with a warm table; the capture starts after `skip` of them.
#[test]
fn mid_connection_join_never_reports_a_wrong_method_or_path() {
    let mut rng = Rng(3);
    let paths = [
        "/",
        "/index.html",
        "/api/users",
        "/api/orders",
        "/static/app.js",
    ];
    let methods = ["GET", "POST", "DELETE"];
    for round in 0..50 {
        let (mut ce, mut se) = (Enc::new(), Enc::new());
        ce.huffman = round % 2 == 0;
        let mut truth = Vec::new();
        let mut frames = Vec::new();
        for i in 0..40u32 {
            let id = 2 * i + 1;
            let path = paths[rng.below(paths.len() as u64) as usize];
            let method = methods[rng.below(methods.len() as u64) as usize];
            let block = if rng.below(4) == 0 {
                let mut b = ce.encode(&[(":method", method)]);
                b.extend(ce.never_indexed(":path", path));
                b
            } else {
                ce.encode(&[(":method", method), (":path", path), (":scheme", "http")])
            };
            truth.push((id, method, path));
            frames.push((
                frame(HEADERS, END_HEADERS | END_STREAM, id, &block),
                ok(&mut se, id, b"r"),
            ));
        }
        let skip = rng.below(20) as usize;
        let mut c = Conn::new();
        for (req, resp) in &frames[skip..] {
            c.feed(SEND, req);
            c.feed(RECV, resp);
        }
        let h = c.h2();
        assert_eq!(h.len(), frames.len() - skip, "round {round}");
        for x in &h {
            let &(_, method, path) = truth
                .iter()
                .find(|t| t.0 == x.stream_id)
                .expect("known stream");
            assert!(x.method.is_none() || x.method.as_deref() == Some(method));
            assert!(x.path.is_none() || x.path.as_deref() == Some(path));
            assert_eq!(x.status, Some(200), "static :status 200");
            if x.path.is_none() || x.method.is_none() {
                assert!(x.degraded);
            }
        }
        assert!(
            c.exchanges().iter().all(|e| e.role == Role::Client),
            "the side sending :method is the client"
        );
        if skip > 0 {
            assert!(h.iter().any(|x| x.degraded), "round {round}: warm table");
            assert!(c.skips().contains(&SkipReason::HpackDesync));
        }
        assert!(h.iter().any(|x| x.path.is_some()), "literal paths decode");
    }
}

#[test]
fn role_from_pseudo_headers_when_joining_mid_way() {
    // The first block seen is a request read by the traced process: it is the server.
    let mut c = Conn::new();
    c.feed(RECV, &get(&mut Enc::new(), 9, "/x"));
    c.feed(SEND, &ok(&mut Enc::new(), 9, b"y"));
    assert_eq!(c.exchanges()[0].role, Role::Server);
    // The first block seen is a response read by the process: it is the client, and the response
    // without a seen request is only counted.
    let mut c = Conn::new();
    c.feed(RECV, &ok(&mut Enc::new(), 9, b"y"));
    c.feed(SEND, &get(&mut Enc::new(), 11, "/z"));
    c.feed(RECV, &ok(&mut Enc::new(), 11, b"z"));
    let ex = c.exchanges();
    assert_eq!(ex.len(), 1);
    assert_eq!((ex[0].role, h2(ex[0]).stream_id), (Role::Client, 11));
    assert_eq!(c.skips(), [SkipReason::UnpairedResponse]);
}

#[test]
fn gap_inside_data_keeps_framing() {
    let (mut ce, mut se) = (Enc::new(), Enc::new());
    let mut c = Conn::new();
    let mut req = client_start();
    req.extend(get(&mut ce, 1, "/big"));
    c.feed(SEND, &req);
    let head = se.encode(&[(":status", "200")]);
    let mut resp = frame(HEADERS, END_HEADERS, 1, &head);
    let data = frame(DATA, END_STREAM, 1, &[5; 1000]);
    resp.extend(&data[..100]);
    c.feed(RECV, &resp);
    c.gap(RECV, 800);
    c.feed(RECV, &data[900..]);
    c.feed(SEND, &get(&mut ce, 3, "/big"));
    c.feed(RECV, &ok(&mut se, 3, b"ok"));
    let ex = c.exchanges();
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[0].outcome, Outcome::Partial);
    assert_eq!(h2(ex[0]).response_body_size, 1000);
    assert_eq!(ex[1].outcome, Outcome::Complete);
    assert!(!h2(ex[1]).degraded, "HPACK untouched by a gap in DATA");
    assert!(c.skips().is_empty());
}

#[test]
fn gap_across_frames_resynchronises_and_degrades() {
    let (mut ce, mut se) = (Enc::new(), Enc::new());
    let mut c = Conn::new();
    let mut req = client_start();
    req.extend(get(&mut ce, 1, "/one"));
    c.feed(SEND, &req);
    c.feed(RECV, &server_start());
    // Stream 3's request is lost entirely, with its table insertions.
    let lost = get(&mut ce, 3, "/two");
    c.gap(SEND, lost.len() as u64 + 5);
    assert_eq!(c.skips(), [SkipReason::Gap]);
    // The next chunk starts at a frame: the path is a fresh literal, the rest refers to the table.
    c.feed(SEND, &get(&mut ce, 5, "/three"));
    // Garbage where a frame must start (a frame larger than allowed) loses the framing again;
    // the next frame inside the chunk is found.
    let mut noisy = vec![0xde, 0xad, 0xbe, 0xef];
    noisy.extend(get(&mut ce, 7, "/three"));
    noisy.extend(frame(PING, 0, 0, &[0; 8]));
    c.feed(SEND, &noisy);
    for id in [1, 5, 7] {
        c.feed(RECV, &ok(&mut se, id, b"."));
    }
    c.close();
    let h = c.h2();
    assert_eq!(
        h.iter().map(|x| x.stream_id).collect::<Vec<_>>(),
        [1, 5, 7],
        "{:?}",
        c.out
    );
    assert_eq!(h[0].path.as_deref(), Some("/one"));
    assert_eq!(h[1].path.as_deref(), Some("/three"));
    assert_eq!(h[1].method.as_deref(), Some("GET"));
    assert_eq!(
        h[1].authority, None,
        "indexed in the lost part of the table"
    );
    assert!(h[1].degraded);
    assert_eq!(h[2].path, None, "dynamic reference after desync");
    assert!(c.skips().contains(&SkipReason::Garbage));
    assert!(c.exchanges()[0].outcome == Outcome::Partial);
}

#[test]
fn close_reports_open_streams() {
    let (mut ce, mut se) = (Enc::new(), Enc::new());
    let mut c = Conn::new();
    let mut req = client_start();
    req.extend(get(&mut ce, 1, "/never"));
    let block = ce.encode(&[
        (":method", "POST"),
        (":path", "/stream"),
        (":scheme", "http"),
    ]);
    req.extend(frame(HEADERS, END_HEADERS, 3, &block));
    c.feed(SEND, &req);
    let t = c.feed(RECV, &ok(&mut se, 3, b"all"));
    let head = se.encode(&[(":status", "200")]);
    c.feed(SEND, &get(&mut ce, 5, "/half"));
    c.feed(RECV, &frame(HEADERS, END_HEADERS, 5, &head));
    c.close();
    let ex = c.exchanges();
    let got: Vec<_> = ex
        .iter()
        .map(|e| (h2(e).stream_id, e.outcome, h2(e).status))
        .collect();
    assert_eq!(
        got,
        [
            (1, Outcome::NoResponse, None),
            (3, Outcome::Complete, Some(200)),
            (5, Outcome::NoResponse, Some(200)),
        ]
    );
    assert_eq!(ex[1].end_ns, t.end_ns);
    c.feed(SEND, &get(&mut ce, 7, "/after-close"));
    assert_eq!(c.exchanges().len(), 3);
    assert_eq!(c.parser.held_bytes(), 0);
}

#[test]
fn interim_responses_unknown_frames_and_control_frames() {
    let (mut ce, mut se) = (Enc::new(), Enc::new());
    let mut c = Conn::new();
    let block = ce.encode(&[
        (":method", "POST"),
        (":path", "/c"),
        (":scheme", "http"),
        ("expect", "100-continue"),
    ]);
    let mut req = client_start();
    req.extend(frame(HEADERS, END_HEADERS, 1, &block));
    req.extend(frame(0x42, 0xff, 1, b"unknown extension frame"));
    req.extend(frame(WINDOW_UPDATE, 0, 1, &[0, 0, 1, 0]));
    c.feed(SEND, &req);
    c.feed(
        RECV,
        &frame(HEADERS, END_HEADERS, 1, &se.encode(&[(":status", "100")])),
    );
    c.feed(RECV, &frame(PING, ACK, 0, &[1; 8]));
    c.feed(SEND, &frame(DATA, END_STREAM, 1, b"body"));
    c.feed(RECV, &ok(&mut se, 1, b""));
    let h = c.h2();
    assert_eq!(h.len(), 1);
    assert_eq!((h[0].status, h[0].request_body_size), (Some(200), 4));
    assert!(c.skips().is_empty());
}

#[test]
fn server_push() {
    let (mut ce, mut se) = (Enc::new(), Enc::new());
    let mut c = Conn::new();
    let mut req = client_start();
    req.extend(get(&mut ce, 1, "/page"));
    c.feed(SEND, &req);
    let mut promise = 2u32.to_be_bytes().to_vec();
    promise.extend(se.encode(&[
        (":method", "GET"),
        (":path", "/style.css"),
        (":scheme", "http"),
        (":authority", "example.com:8080"),
    ]));
    c.feed(RECV, &frame(PUSH_PROMISE, END_HEADERS, 1, &promise));
    c.feed(RECV, &ok(&mut se, 1, b"<html>"));
    c.feed(RECV, &ok(&mut se, 2, b"body{}"));
    let ex = c.exchanges();
    assert_eq!(ex.len(), 2);
    let pushed = h2(ex[1]);
    assert_eq!(
        (pushed.stream_id, pushed.path.as_deref()),
        (2, Some("/style.css"))
    );
    assert_eq!((ex[1].role, pushed.response_body_size), (Role::Client, 6));
}

#[test]
fn advertised_table_size_governs_the_other_direction() {
    // The server's encoder keeps a 16 KiB table once the client allows it; entries older than
    // 4 KiB worth are still referenced.
    for advertise in [true, false] {
        let mut se = Enc::new();
        se.capacity = 16_384;
        let mut c = Conn::new();
        let mut start = PREFACE.to_vec();
        if advertise {
            start.extend(settings(&[(0x1, 16_384)]));
        }
        let mut ce = Enc::new();
        for id in 0..20u32 {
            start.extend(get(&mut ce, 2 * id + 1, "/"));
        }
        c.feed(SEND, &start);
        for id in 0..20u32 {
            let value = format!("{id}-{}", "x".repeat(300));
            let block = se.encode(&[(":status", "200"), ("x-big", &value)]);
            c.feed(
                RECV,
                &frame(HEADERS, END_HEADERS | END_STREAM, 2 * id + 1, &block),
            );
        }
        // The first value again: an index far back in the table.
        let block = se.encode(&[
            (":status", "200"),
            ("x-big", &format!("0-{}", "x".repeat(300))),
        ]);
        c.feed(SEND, &get(&mut ce, 41, "/"));
        c.feed(RECV, &frame(HEADERS, END_HEADERS | END_STREAM, 41, &block));
        let h = c.h2();
        let last = h.last().expect("exchange");
        assert_eq!(last.stream_id, 41);
        if advertise {
            assert!(!last.degraded);
            assert!(
                last.response_header("x-big")
                    .is_some_and(|v| v.starts_with("0-"))
            );
        } else {
            assert!(last.degraded, "a 4 KiB table cannot hold it");
            assert_eq!(last.response_header("x-big"), None);
        }
    }
}

#[test]
fn stream_table_is_bounded() {
    let mut ce = Enc::new();
    let mut c = Conn::new();
    c.feed(SEND, &client_start());
    let n = MAX_STREAMS as u32 + 10;
    for i in 0..n {
        c.feed(SEND, &get(&mut ce, 2 * i + 1, "/open"));
    }
    assert_eq!(c.parser.streams.len(), MAX_STREAMS);
    assert_eq!(
        c.skips()
            .iter()
            .filter(|r| **r == SkipReason::TooManyPending)
            .count(),
        10
    );
    c.close();
    assert_eq!(c.exchanges().len(), MAX_STREAMS);
    assert_eq!(
        h2(c.exchanges()[0]).stream_id,
        21,
        "the oldest were dropped"
    );
}

#[test]
fn oversized_header_block_is_skipped() {
    let mut c = Conn::new();
    let mut ce = Enc::new();
    ce.huffman = false;
    let mut bytes = client_start();
    let big = "v".repeat(MAX_HEADER_BLOCK);
    let block = ce.encode(&[(":method", "GET"), (":path", "/huge"), ("x-big", &big)]);
    bytes.extend(frame(HEADERS, END_STREAM, 1, &block[..16_000]));
    for part in block[16_000..].chunks(16_000) {
        bytes.extend(frame(CONTINUATION, 0, 1, part));
    }
    bytes.extend(frame(CONTINUATION, END_HEADERS, 1, &[]));
    c.feed(SEND, &bytes);
    c.feed(SEND, &get(&mut ce, 3, "/next"));
    c.feed(RECV, &ok(&mut Enc::new(), 1, b""));
    c.feed(RECV, &ok(&mut Enc::new(), 3, b""));
    let h = c.h2();
    assert_eq!(h.len(), 2);
    assert!(h[0].degraded && h[0].path.is_none());
    assert_eq!(h[1].path.as_deref(), Some("/next"), "a new literal path");
    assert_eq!(h[1].method.as_deref(), Some("GET"));
    assert!(c.skips().contains(&SkipReason::HeadTooLarge));
    assert!(c.parser.held_bytes() < 64 * 1024);
}

#[test]
fn long_paths_are_left_out() {
    let mut c = Conn::new();
    let mut bytes = client_start();
    let path = format!("/{}", "p".repeat(MAX_PATH));
    bytes.extend(get(&mut Enc::new(), 1, &path));
    c.feed(SEND, &bytes);
    c.feed(RECV, &ok(&mut Enc::new(), 1, b""));
    let h = c.h2();
    assert_eq!((h[0].path.as_deref(), h[0].degraded), (None, true));
    assert_eq!(h[0].method.as_deref(), Some("GET"));
    assert!(
        c.skips().is_empty(),
        "HPACK state is intact: {:?}",
        c.skips()
    );
}

#[test]
fn probe_finds_prefaces_and_frames() {
    for dir in [SEND, RECV] {
        assert_eq!(probe(dir, PREFACE), Detection::Found(Protocol::Http2));
        assert_eq!(
            probe(dir, &client_start()),
            Detection::Found(Protocol::Http2)
        );
        for n in 0..PREFACE.len() {
            assert_eq!(probe(dir, &PREFACE[..n]), Detection::NeedMore, "{n}");
        }
        assert_eq!(
            probe(dir, &server_start()),
            Detection::Found(Protocol::Http2)
        );
        // A lone request of a warm connection: static :method, dynamic references.
        let mut warm = Enc::new();
        get(&mut warm, 1, "/a");
        assert_eq!(
            probe(dir, &get(&mut warm, 3, "/a")),
            Detection::Found(Protocol::Http2)
        );
        let (_, server) = conversation();
        assert_eq!(
            probe(dir, &server[server_start().len()..]),
            Detection::Found(Protocol::Http2)
        );
        assert_eq!(probe(dir, b"PRI * HTTP/1.1\r\n"), Detection::Unknown);
        assert_eq!(probe(dir, b"GET / HTTP/1.1\r\n\r\n"), Detection::Unknown);
        assert_eq!(
            probe(dir, b"Q\x00\x00\x00\x0dSELECT 1\x00"),
            Detection::Unknown
        );
    }
}

/// Heap a connection may hold at worst: two block buffers (Vec growth may double them), two
/// HPACK tables (entries are at least 32 units each) and a full stream table.
const HELD_BOUND: usize = 2 * 2 * MAX_HEADER_BLOCK
    + 2 * 2 * (hpack::MAX_TABLE_SIZE + hpack::MAX_TABLE_SIZE / 32 * 64)
    + MAX_STREAMS
        * (mem::size_of::<Stream>()
            + 3 * (MAX_HEADER_BYTES + MAX_HEADERS * mem::size_of::<(String, String)>())
            + MAX_PATH
            + 4 * MAX_HEADER_VALUE);

fn check_bounds(p: &Http2Parser, out: &[Output]) {
    assert!(p.streams.len() <= MAX_STREAMS);
    assert!(p.held_bytes() <= HELD_BOUND, "held {}", p.held_bytes());
    for h in &p.halves {
        assert!(h.block_buf.len() <= MAX_HEADER_BLOCK);
    }
    for o in out {
        if let Output::Exchange(e) = o {
            assert!(e.start_ns <= e.end_ns, "{e:?}");
            let h = h2(e);
            for list in [&h.request_headers, &h.response_headers, &h.trailers] {
                assert!(list.len() <= MAX_HEADERS);
                assert!(
                    list.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() <= MAX_HEADER_BYTES
                );
            }
        }
    }
}

/// Checks `p` and its outputs, `given` bytes having been fed or lost per direction, and counts
/// the outputs as (exchanges, skips).
fn settle(p: &Http2Parser, given: [u64; 2], out: &mut Vec<Output>, counts: &mut (usize, usize)) {
    check_bounds(p, out);
    for o in out.drain(..) {
        match o {
            Output::Exchange(e) => {
                // A pushed stream's request is in the server's direction, and garbage may promise
                // any stream id: only the bound common to both directions holds for every stream.
                assert!(e.request_offset < given[0].max(given[1]), "{e:?}");
                counts.0 += 1;
            }
            Output::Skipped(_) => counts.1 += 1,
        }
    }
}

/// Feeds `stream` to fresh parsers in random pieces, directions, gaps and closes.
fn drive(rng: &mut Rng, stream: &[u8], max_piece: u64) -> (usize, usize) {
    let mut p = Http2Parser::new();
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
            0..=2 => {
                let len = rng.below(100_000);
                given[slot(dir)] += len;
                p.gap(dir, len, timing, &mut out);
            }
            3 => {
                p.close(clock, &mut out);
                settle(&p, given, &mut out, &mut counts);
                p = Http2Parser::new();
                given = [0; 2];
            }
            _ => {
                let n = (1 + rng.below(max_piece) as usize).min(stream.len() - pos);
                given[slot(dir)] += n as u64;
                p.feed(dir, &stream[pos..pos + n], timing, &mut out);
                pos += n;
            }
        }
        settle(&p, given, &mut out, &mut counts);
    }
    p.close(clock, &mut out);
    settle(&p, given, &mut out, &mut counts);
    counts
}

#[test]
fn ten_megabytes_of_random_bytes_never_panic_and_stay_bounded() {
    let mut rng = Rng(42);
    let stream: Vec<u8> = (0..10 << 20).map(|_| rng.next() as u8).collect();
    let (exchanges, skips) = drive(&mut rng, &stream, 8192);
    assert_eq!(exchanges, 0, "random bytes are not HTTP/2");
    assert!(skips > 0, "random bytes must be counted as skipped");
}

#[test]
fn frame_soup_never_panics_and_stays_bounded() {
    // Frames that reach deep states: blocks with and without END_HEADERS, CONTINUATIONs of
    // other streams, padding, resets, GOAWAYs, pushes and table size updates.
    let mut enc = Enc::new();
    let mut tokens: Vec<Vec<u8>> = vec![PREFACE.to_vec(), server_start(), client_start()];
    for id in [1u32, 3, 5, 2] {
        tokens.push(get(&mut enc, id, "/t"));
        tokens.push(ok(&mut enc, id, b"body"));
        tokens.push(frame(HEADERS, 0, id, &enc.encode(&[(":status", "200")])));
        tokens.push(frame(CONTINUATION, END_HEADERS, id, &[0x82]));
        tokens.push(frame(DATA, PADDED, id, &[3, 1, 0, 0, 0]));
        tokens.push(frame(DATA, END_STREAM | PADDED, id, &[9, 1]));
        tokens.push(frame(RST_STREAM, 0, id, &[0, 0, 0, 8]));
        tokens.push(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            id,
            &enc.encode(&[("grpc-status", "13")]),
        ));
        let mut promise = (id + 1).to_be_bytes().to_vec();
        promise.push(0x82);
        tokens.push(frame(PUSH_PROMISE, END_HEADERS, id, &promise));
    }
    enc.resize(0);
    tokens.push(frame(
        HEADERS,
        END_HEADERS,
        7,
        &enc.encode(&[(":method", "GET")]),
    ));
    tokens.push(frame(GOAWAY, 0, 0, &[0, 0, 0, 1, 0, 0, 0, 0]));
    tokens.push(frame(
        HEADERS,
        END_HEADERS,
        9,
        &[0xff, 0xff, 0xff, 0xff, 0x0f],
    ));
    tokens.push(frame(SETTINGS, 0, 0, &[0, 1, 0, 1, 0, 0]));
    tokens.push(vec![0xff; 40]);
    let mut rng = Rng(7);
    let mut exchanges = 0;
    for round in 0..60 {
        let mut stream = Vec::new();
        while stream.len() < 64 * 1024 {
            stream.extend_from_slice(&tokens[rng.below(tokens.len() as u64) as usize]);
        }
        let max_piece = [1, 16, 4096][round % 3];
        exchanges += drive(&mut rng, &stream, max_piece).0;
    }
    assert!(exchanges > 0, "the soup must reach complete exchanges");
}

// ---- stream positions and threads ----

/// (stream id, request offset, request thread) of each exchange, by stream id.
fn origins(c: &Conn) -> Vec<(u32, u64, u32)> {
    let mut v: Vec<_> = c
        .exchanges()
        .iter()
        .map(|e| (h2(e).stream_id, e.request_offset, e.request_thread))
        .collect();
    v.sort_unstable();
    v
}

/// A POST whose header block is split into HEADERS and CONTINUATION, with one DATA frame.
fn post_continued(enc: &mut Enc, stream: u32) -> Vec<u8> {
    let block = enc.encode(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/upload"),
        (":authority", "example.com:8080"),
    ]);
    let mut f = frame(HEADERS, 0, stream, &block[..5]);
    f.extend(frame(CONTINUATION, END_HEADERS, stream, &block[5..]));
    f.extend(frame(DATA, END_STREAM, stream, &[7; 40]));
    f
}

#[test]
fn streams_opened_after_the_preface_and_in_one_chunk() {
    for client_dir in [SEND, RECV] {
        let server_dir = other(client_dir);
        let (mut ce, mut se) = (Enc::new(), Enc::new());
        let mut c = Conn::new();
        // The preface alone, then SETTINGS and WINDOW_UPDATE with the first stream.
        let start = client_start();
        c.feed(client_dir, &start[..PREFACE.len()]);
        let mut first = start[PREFACE.len()..].to_vec();
        first.extend(get(&mut ce, 1, "/one"));
        let t1 = c.feed(client_dir, &first);
        c.feed(server_dir, &server_start());
        // Two streams opened in one chunk, the first with CONTINUATION and DATA frames.
        let s3 = post_continued(&mut ce, 3);
        let mut both = s3.clone();
        both.extend(get(&mut ce, 5, "/five"));
        let t35 = c.feed(client_dir, &both);
        for id in [1, 3, 5] {
            c.feed(server_dir, &ok(&mut se, id, b"."));
        }
        let at1 = start.len() as u64;
        let at3 = at1 + get(&mut Enc::new(), 1, "/one").len() as u64;
        let at5 = at3 + s3.len() as u64;
        assert_eq!(
            origins(&c),
            [
                (1, at1, t1.thread),
                (3, at3, t35.thread),
                (5, at5, t35.thread)
            ],
            "client in {client_dir:?}"
        );
        assert!(c.exchanges().iter().all(|e| e.outcome == Outcome::Complete));
        assert_eq!(c.exchanges()[2].start_ns, t35.start_ns);
    }
}

#[test]
fn offsets_and_threads_hold_at_every_split_position() {
    let (mut ce, mut se) = (Enc::new(), Enc::new());
    let mut stream = client_start();
    let mut starts = Vec::new();
    for (id, msg) in [
        (1, get(&mut ce, 1, "/a")),
        (3, post_continued(&mut ce, 3)),
        (5, get(&mut ce, 5, "/c")),
    ] {
        starts.push((id, stream.len()));
        stream.extend(msg);
    }
    let mut answers = server_start();
    for id in [1, 3, 5] {
        answers.extend(ok(&mut se, id, b"x"));
    }
    for cut in 0..=stream.len() {
        let mut c = Conn::new();
        let t1 = c.feed(SEND, &stream[..cut]);
        let t2 = c.feed(SEND, &stream[cut..]);
        c.feed(RECV, &answers);
        let want: Vec<_> = starts
            .iter()
            .map(|&(id, at)| (id, at as u64, if at < cut { t1.thread } else { t2.thread }))
            .collect();
        assert_eq!(origins(&c), want, "cut at {cut}");
    }
}

#[test]
fn frame_header_split_over_three_feeds_takes_the_first_thread() {
    let (mut ce, mut se) = (Enc::new(), Enc::new());
    let mut c = Conn::new();
    let mut start = client_start();
    start.extend(get(&mut ce, 1, "/a"));
    c.feed(SEND, &start);
    c.feed(RECV, &server_start());
    c.feed(RECV, &ok(&mut se, 1, b"a"));
    let next = get(&mut ce, 3, "/b");
    let t_first = c.feed(SEND, &next[..2]);
    c.feed(SEND, &next[2..7]);
    c.feed(SEND, &next[7..]);
    c.feed(RECV, &ok(&mut se, 3, b"b"));
    assert_eq!(
        origins(&c)[1],
        (3, start.len() as u64, t_first.thread),
        "{:?}",
        c.out
    );
}

#[test]
fn gaps_before_streams_advance_the_offset() {
    let (mut ce, mut se) = (Enc::new(), Enc::new());
    let mut c = Conn::new();
    // The capture joined mid-connection; the server's table is fresh enough to decode `ok`.
    c.gap(SEND, 5000);
    let big = post_continued(&mut ce, 1);
    // The DATA payload's middle is lost: the framing survives.
    let (head, tail) = big.split_at(big.len() - 30);
    let t1 = c.feed(SEND, head);
    c.gap(SEND, 20);
    c.feed(SEND, &tail[20..]);
    let s3 = get(&mut ce, 3, "/three");
    let t3 = c.feed(SEND, &s3);
    // The server's SETTINGS bound the client's frames, so garbage is told from a frame below.
    c.feed(RECV, &server_start());
    // A gap across frame boundaries: the next frame is found at the start of the next chunk,
    // and after garbage inside the chunk after that.
    c.gap(SEND, 777);
    let s5 = get(&mut ce, 5, "/five");
    let t5 = c.feed(SEND, &s5);
    let mut noisy = vec![0xde, 0xad, 0xbe, 0xef];
    let garbage = noisy.len() as u64;
    noisy.extend(get(&mut ce, 7, "/seven"));
    noisy.extend(frame(PING, 0, 0, &[0; 8]));
    let t7 = c.feed(SEND, &noisy);
    for id in [1, 3, 5, 7] {
        c.feed(RECV, &ok(&mut se, id, b"."));
    }
    c.close();
    let at1 = 5000;
    let at3 = at1 + big.len() as u64;
    let at5 = at3 + s3.len() as u64 + 777;
    let at7 = at5 + s5.len() as u64 + garbage;
    assert_eq!(
        origins(&c),
        [
            (1, at1, t1.thread),
            (3, at3, t3.thread),
            (5, at5, t5.thread),
            (7, at7, t7.thread)
        ],
        "{:?}",
        c.out
    );
}

#[test]
fn pushed_stream_is_placed_at_its_push_promise() {
    let (mut ce, mut se) = (Enc::new(), Enc::new());
    let mut c = Conn::new();
    let mut req = client_start();
    req.extend(get(&mut ce, 1, "/page"));
    let t1 = c.feed(SEND, &req);
    let start = server_start();
    c.feed(RECV, &start);
    let mut promise = 2u32.to_be_bytes().to_vec();
    promise.extend(se.encode(&[
        (":method", "GET"),
        (":path", "/style.css"),
        (":scheme", "http"),
        (":authority", "example.com:8080"),
    ]));
    let t2 = c.feed(RECV, &frame(PUSH_PROMISE, END_HEADERS, 1, &promise));
    c.feed(RECV, &ok(&mut se, 1, b"<html>"));
    c.feed(RECV, &ok(&mut se, 2, b"body{}"));
    // The promise travels in the server's direction: its position counts the server's bytes.
    assert_eq!(
        origins(&c),
        [
            (1, client_start().len() as u64, t1.thread),
            (2, start.len() as u64, t2.thread)
        ]
    );
}

/// gRPC-Go's server writes its SETTINGS as soon as it accepts, before it reads the client's
/// preface; its responses then use the dynamic table from the first one on.
#[test]
fn server_settings_before_the_client_preface() {
    for (client_dir, role) in [(SEND, Role::Client), (RECV, Role::Server)] {
        let server_dir = other(client_dir);
        let (mut ce, mut se) = (Enc::new(), Enc::new());
        let mut c = Conn::new();
        c.feed(server_dir, &settings(&[(0x5, 1 << 14)]));
        let mut req = client_start();
        req.extend(get(&mut ce, 1, "/a"));
        c.feed(client_dir, &req);
        c.feed(server_dir, &frame(SETTINGS, ACK, 0, &[]));
        c.feed(server_dir, &ok(&mut se, 1, b"one"));
        c.feed(client_dir, &get(&mut ce, 3, "/b"));
        c.feed(server_dir, &ok(&mut se, 3, b"three"));
        assert!(c.skips().is_empty(), "{:?}", c.skips());
        let got: Vec<_> = c
            .exchanges()
            .iter()
            .map(|e| {
                let h = h2(e);
                assert_eq!(e.role, role);
                let ct = h.response_header("content-type").map(str::to_owned);
                (h.stream_id, h.status, ct, h.response_body_size)
            })
            .collect();
        let text = Some("text/plain".to_owned());
        assert_eq!(
            got,
            [(1, Some(200), text.clone(), 3), (3, Some(200), text, 5)]
        );
    }
}
