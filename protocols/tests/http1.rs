//! Behaviour of the HTTP/1.x parser, through the public sans-IO interface.

use protocols::http1::{Http1Parser, HttpExchange, MAX_HEADER_VALUE, MAX_HEADERS, MAX_PENDING};
use protocols::{
    ConnectionParser, Detail, Direction, Exchange, Outcome, Output, Role, SkipReason, Timing,
};

const SEND: Direction = Direction::Send;
const RECV: Direction = Direction::Recv;

/// Drives one parser with consecutive timings: the n-th event gets start 100n, end 100n + 50.
struct Conn {
    parser: Http1Parser,
    out: Vec<Output>,
    clock: u64,
}

impl Conn {
    fn new() -> Self {
        Conn {
            parser: Http1Parser::new(),
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

    /// Feeds `data` and returns the timing used.
    fn feed(&mut self, dir: Direction, data: &[u8]) -> Timing {
        let t = self.tick();
        self.parser.feed(dir, data, t, &mut self.out);
        t
    }

    fn gap(&mut self, dir: Direction, len: u64) -> Timing {
        let t = self.tick();
        self.parser.gap(dir, len, t, &mut self.out);
        t
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

fn http(e: &Exchange) -> &HttpExchange {
    match &e.detail {
        Detail::Http(h) => h,
        other => panic!("not an HTTP/1 exchange: {other:?}"),
    }
}

fn get(target: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: example.com\r\nUser-Agent: test\r\n\r\n").into_bytes()
}

fn ok(status: u16, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// `body` in chunked coding with chunks of `size` bytes, and an optional trailer section.
fn chunked(body: &[u8], size: usize, trailer: &str) -> Vec<u8> {
    let mut v = Vec::new();
    for c in body.chunks(size) {
        v.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        v.extend_from_slice(c);
        v.extend_from_slice(b"\r\n");
    }
    v.extend_from_slice(b"0\r\n");
    v.extend_from_slice(trailer.as_bytes());
    v.extend_from_slice(b"\r\n");
    v
}

fn chunked_response(body: &[u8], size: usize) -> Vec<u8> {
    let mut v =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Kind: chunked\r\n\r\n".to_vec();
    v.extend(chunked(body, size, "X-Checksum: abc\r\n"));
    v
}

#[test]
fn keep_alive_sequence_as_client() {
    let mut c = Conn::new();
    for (i, body) in ["hello", "", "a longer body with more bytes"]
        .iter()
        .enumerate()
    {
        c.feed(SEND, &get(&format!("/item/{i}")));
        c.feed(RECV, &ok(200 + i as u16, body));
    }
    c.close();
    let ex = c.exchanges();
    assert_eq!(ex.len(), 3);
    for (i, (e, body)) in ex
        .iter()
        .zip(["hello", "", "a longer body with more bytes"])
        .enumerate()
    {
        let h = http(e);
        assert_eq!(e.role, Role::Client);
        assert_eq!(e.outcome, Outcome::Complete);
        assert_eq!(h.method, "GET");
        assert_eq!(h.target, format!("/item/{i}"));
        assert_eq!(h.version, 1);
        assert_eq!(h.request_header("host"), Some("example.com"));
        assert_eq!(h.status, Some(200 + i as u16));
        assert_eq!(h.response_header("CONTENT-TYPE"), Some("text/plain"));
        assert_eq!(h.response_body_size, body.len() as u64);
        assert_eq!(h.request_body_size, 0);
    }
    assert!(c.skips().is_empty(), "{:?}", c.skips());
}

#[test]
fn requests_received_make_the_process_the_server() {
    let mut c = Conn::new();
    c.feed(
        RECV,
        b"POST /submit HTTP/1.1\r\nContent-Length: 11\r\n\r\nhello world",
    );
    c.feed(SEND, &ok(201, "created"));
    let ex = c.exchanges();
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].role, Role::Server);
    assert_eq!(http(ex[0]).request_body_size, 11);
    assert_eq!(http(ex[0]).status, Some(201));
}

#[test]
fn exchange_timing_spans_first_request_byte_to_last_response_byte() {
    let mut c = Conn::new();
    let req = b"POST /t HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody";
    let first = c.feed(SEND, &req[..7]);
    c.feed(SEND, &req[7..]);
    let resp = ok(200, "0123456789");
    c.feed(RECV, &resp[..20]);
    c.feed(RECV, &resp[20..resp.len() - 3]);
    assert!(
        c.exchanges().is_empty(),
        "emitted before the last response byte"
    );
    let last = c.feed(RECV, &resp[resp.len() - 3..]);
    let ex = c.exchanges();
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].start_ns, first.start_ns);
    assert_eq!(ex[0].end_ns, last.end_ns);
}

#[test]
fn pipelined_requests_pair_in_order() {
    let mut c = Conn::new();
    let mut reqs = Vec::new();
    for t in ["/a", "/b", "/c"] {
        reqs.extend(get(t));
    }
    let sent = c.feed(SEND, &reqs);
    let mut resps = Vec::new();
    for (status, body) in [(200, "A"), (404, "BB"), (500, "CCC")] {
        resps.extend(ok(status, body));
    }
    // Responses split at arbitrary places, not at message boundaries.
    let (x, y) = resps.split_at(70);
    c.feed(RECV, x);
    let last = c.feed(RECV, y);
    let ex = c.exchanges();
    let got: Vec<_> = ex
        .iter()
        .map(|e| {
            (
                http(e).target.as_str(),
                http(e).status,
                http(e).response_body_size,
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("/a", Some(200), 1),
            ("/b", Some(404), 2),
            ("/c", Some(500), 3)
        ]
    );
    assert!(
        ex.iter()
            .all(|e| e.start_ns == sent.start_ns && e.outcome == Outcome::Complete)
    );
    assert_eq!(ex[2].end_ns, last.end_ns);
}

#[test]
fn pending_queue_is_bounded() {
    let mut c = Conn::new();
    let extra = 6;
    for i in 0..MAX_PENDING + extra {
        c.feed(SEND, &get(&format!("/{i}")));
    }
    assert_eq!(c.skips(), vec![SkipReason::TooManyPending; extra]);
    c.feed(RECV, &ok(200, "x"));
    let ex = c.exchanges();
    assert_eq!(ex.len(), 1);
    assert_eq!(
        http(ex[0]).target,
        format!("/{extra}"),
        "the oldest requests were dropped"
    );
    c.close();
    let ex = c.exchanges();
    assert_eq!(ex.len(), MAX_PENDING);
    assert!(
        ex[1..]
            .iter()
            .all(|e| e.outcome == Outcome::NoResponse && http(e).status.is_none())
    );
}

#[test]
fn chunked_body_is_decoded_at_every_split_position() {
    let body: Vec<u8> = (0..300u32).map(|i| b'a' + (i % 26) as u8).collect();
    let resp = chunked_response(&body, 70);
    for cut in 0..=resp.len() {
        let mut c = Conn::new();
        c.feed(SEND, &get("/chunked"));
        c.feed(RECV, &resp[..cut]);
        c.feed(RECV, &resp[cut..]);
        c.feed(SEND, &get("/next"));
        c.feed(RECV, &ok(200, "next"));
        let ex = c.exchanges();
        assert_eq!(ex.len(), 2, "cut at {cut}: {:?}", c.out);
        assert_eq!(
            http(ex[0]).response_body_size,
            body.len() as u64,
            "cut at {cut}"
        );
        assert_eq!(http(ex[0]).response_header("x-kind"), Some("chunked"));
        assert_eq!(ex[0].outcome, Outcome::Complete);
        assert_eq!(http(ex[1]).target, "/next");
        assert!(c.skips().is_empty(), "cut at {cut}: {:?}", c.skips());
    }
}

#[test]
fn chunked_body_fed_byte_by_byte() {
    let body = vec![b'z'; 1000];
    let resp = chunked_response(&body, 333);
    let mut c = Conn::new();
    c.feed(SEND, &get("/"));
    for b in &resp {
        c.feed(RECV, std::slice::from_ref(b));
    }
    let ex = c.exchanges();
    assert_eq!(ex.len(), 1);
    assert_eq!(http(ex[0]).response_body_size, 1000);
}

#[test]
fn chunked_request_body_with_extensions() {
    let mut c = Conn::new();
    let mut req = b"PUT /up HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n".to_vec();
    req.extend_from_slice(b"5;name=value\r\nhello\r\nA\r\n0123456789\r\n0\r\n\r\n");
    c.feed(RECV, &req);
    c.feed(SEND, &ok(204, ""));
    let ex = c.exchanges();
    assert_eq!(ex.len(), 1);
    assert_eq!(http(ex[0]).request_body_size, 15);
    assert_eq!(ex[0].role, Role::Server);
}

#[test]
fn content_length_split_at_every_position() {
    let req = b"POST /form HTTP/1.1\r\nContent-Length: 13\r\n\r\nname=a&age=42".to_vec();
    let resp = ok(200, "thanks, received");
    let stream: Vec<(Direction, &[u8])> = vec![(SEND, &req), (RECV, &resp)];
    for (which, (dir, msg)) in stream.iter().enumerate() {
        for cut in 0..=msg.len() {
            let mut c = Conn::new();
            for (i, (d, m)) in stream.iter().enumerate() {
                if i == which {
                    c.feed(*dir, &msg[..cut]);
                    c.feed(*dir, &msg[cut..]);
                } else {
                    c.feed(*d, m);
                }
            }
            let ex = c.exchanges();
            assert_eq!(ex.len(), 1, "message {which} cut at {cut}");
            assert_eq!(http(ex[0]).request_body_size, 13);
            assert_eq!(http(ex[0]).response_body_size, 16);
            assert!(c.skips().is_empty());
        }
    }
}

#[test]
fn gap_inside_known_length_body_stays_in_sync() {
    let mut c = Conn::new();
    let total: u64 = 1 << 20;
    c.feed(SEND, &get("/big"));
    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n");
    let mut first = head.clone().into_bytes();
    first.extend(vec![b'x'; 4096 - head.len()]);
    c.feed(RECV, &first);
    let captured = (4096 - head.len()) as u64;
    // Several syscalls, each with 4 KiB captured and the rest as a gap.
    let mut left = total - captured;
    let mut last = Timing::default();
    while left > 0 {
        let n = left.min(64 * 1024);
        let cap = n.min(4096);
        c.feed(RECV, &vec![b'y'; cap as usize]);
        if n > cap {
            last = c.gap(RECV, n - cap);
        } else {
            last = Timing {
                start_ns: c.clock,
                end_ns: c.clock + 50,
                thread: (c.clock / 100) as u32,
            };
        }
        left -= n;
    }
    c.feed(SEND, &get("/after"));
    c.feed(RECV, &ok(200, "small"));
    let ex = c.exchanges();
    assert_eq!(ex.len(), 2, "{:?}", c.out);
    assert_eq!(ex[0].outcome, Outcome::Partial);
    assert_eq!(http(ex[0]).response_body_size, total);
    assert_eq!(ex[0].end_ns, last.end_ns);
    assert_eq!(ex[1].outcome, Outcome::Complete);
    assert_eq!(http(ex[1]).target, "/after");
    assert!(c.skips().is_empty(), "{:?}", c.skips());
}

#[test]
fn gap_ending_a_request_body_keeps_the_next_request() {
    let mut c = Conn::new();
    let mut req = b"POST /upload HTTP/1.1\r\nContent-Length: 10000\r\n\r\n".to_vec();
    req.extend(vec![b'u'; 1000]);
    c.feed(RECV, &req);
    c.gap(RECV, 9000);
    c.feed(SEND, &ok(200, "stored"));
    c.feed(RECV, &get("/next"));
    c.feed(SEND, &ok(200, "x"));
    let ex = c.exchanges();
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[0].outcome, Outcome::Partial);
    assert_eq!(http(ex[0]).request_body_size, 10000);
    assert_eq!(http(ex[1]).target, "/next");
    assert_eq!(ex[1].outcome, Outcome::Complete);
}

#[test]
fn gap_inside_chunk_data_stays_in_sync() {
    let mut c = Conn::new();
    c.feed(SEND, &get("/stream"));
    c.feed(
        RECV,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n8000\r\n",
    );
    c.feed(RECV, &[b'd'; 4096]);
    c.gap(RECV, 0x8000 - 4096);
    c.feed(RECV, b"\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n");
    c.feed(SEND, &get("/next"));
    c.feed(RECV, &ok(200, "n"));
    let ex = c.exchanges();
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[0].outcome, Outcome::Partial);
    assert_eq!(http(ex[0]).response_body_size, 0x8000 + 16);
    assert_eq!(ex[1].outcome, Outcome::Complete);
    assert!(c.skips().is_empty());
}

#[test]
fn gap_across_chunk_framing_resumes_at_a_chunk_line() {
    let mut c = Conn::new();
    c.feed(SEND, &get("/stream"));
    c.feed(
        RECV,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n100\r\n",
    );
    c.feed(RECV, &[b'd'; 100]);
    // The gap covers the end of this chunk and the next chunk's size line.
    c.gap(RECV, 156 + 2 + 5 + 20);
    c.feed(RECV, &[b'e'; 300]);
    // A later write starts at a chunk boundary.
    let end = c.feed(RECV, b"\r\n0\r\n\r\n");
    assert!(
        c.exchanges().is_empty(),
        "emitted before the data after the gap was classified"
    );
    c.feed(RECV, b"4\r\ntail\r\n0\r\n\r\n");
    let ex = c.exchanges();
    assert_eq!(ex.len(), 1, "{:?}", c.out);
    assert_eq!(ex[0].outcome, Outcome::Partial);
    assert!(ex[0].end_ns > end.end_ns);
    assert_eq!(c.skips(), vec![SkipReason::Gap]);
    c.feed(SEND, &get("/next"));
    c.feed(RECV, &ok(200, "n"));
    assert_eq!(c.exchanges().len(), 2);
    assert_eq!(c.exchanges()[1].outcome, Outcome::Complete);
}

#[test]
fn gap_inside_response_head_resynchronises() {
    let mut c = Conn::new();
    c.feed(SEND, &get("/a"));
    let mut resp = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 100\r\n".to_vec();
    resp.extend(b"X-Long: ".iter().chain(&[b'v'; 6000]).copied());
    c.feed(RECV, &resp[..4096]);
    c.gap(RECV, 6000);
    c.feed(SEND, &get("/b"));
    c.feed(RECV, &ok(200, "fine"));
    let ex = c.exchanges();
    assert_eq!(ex.len(), 2, "{:?}", c.out);
    assert_eq!(http(ex[0]).target, "/a");
    assert_eq!(
        http(ex[0]).status,
        Some(502),
        "status line was captured before the gap"
    );
    assert_eq!(ex[0].outcome, Outcome::Partial);
    assert_eq!(http(ex[1]).target, "/b");
    assert_eq!(http(ex[1]).status, Some(200));
    assert_eq!(ex[1].outcome, Outcome::Complete);
    assert_eq!(c.skips(), vec![SkipReason::Gap]);
}

#[test]
fn gap_inside_request_head_keeps_the_start_line() {
    let mut c = Conn::new();
    let mut req = b"GET /huge-cookie HTTP/1.1\r\nCookie: ".to_vec();
    req.extend(vec![b'c'; 4000]);
    c.feed(RECV, &req);
    c.gap(RECV, 5000);
    c.feed(SEND, &ok(200, "ok"));
    let ex = c.exchanges();
    assert_eq!(ex.len(), 1, "{:?}", c.out);
    assert_eq!(http(ex[0]).method, "GET");
    assert_eq!(http(ex[0]).target, "/huge-cookie");
    assert_eq!(http(ex[0]).status, Some(200));
    assert_eq!(ex[0].outcome, Outcome::Partial);
    assert_eq!(ex[0].role, Role::Server);
}

#[test]
fn gap_swallowing_whole_heads_keeps_pairing() {
    let mut c = Conn::new();
    c.feed(SEND, &get("/1"));
    c.feed(RECV, &ok(200, "1"));
    // A whole request was lost: its response still comes, and must not be paired with "/3".
    c.gap(SEND, 500);
    c.feed(RECV, &ok(202, "lost request's answer"));
    c.feed(SEND, &get("/3"));
    // And a whole response was lost.
    c.gap(RECV, 700);
    c.feed(SEND, &get("/4"));
    c.feed(RECV, &ok(204, ""));
    let ex = c.exchanges();
    let got: Vec<_> = ex
        .iter()
        .map(|e| (http(e).target.as_str(), http(e).status, e.outcome))
        .collect();
    assert_eq!(
        got,
        [
            ("/1", Some(200), Outcome::Complete),
            ("", Some(202), Outcome::Partial),
            ("/3", None, Outcome::Partial),
            ("/4", Some(204), Outcome::Complete),
        ]
    );
    assert_eq!(c.skips(), vec![SkipReason::Gap; 2]);
}

#[test]
fn capture_starting_mid_body_skips_to_the_next_message() {
    let mut c = Conn::new();
    // The tail of a request body, then (same chunk) a pipelined request after a CRLF.
    let mut first = b"lue&more=form%20data\r\n".to_vec();
    first.extend(get("/inside"));
    c.feed(RECV, b"ody of an earlier POST whose head we never saw");
    c.feed(RECV, &first);
    c.feed(SEND, b"TTP/1.1 200 OK\r\n\r\nresponse body tail");
    c.feed(SEND, &ok(200, "inside"));
    let ex = c.exchanges();
    assert_eq!(ex.len(), 1, "{:?}", c.out);
    assert_eq!(http(ex[0]).target, "/inside");
    assert_eq!(ex[0].role, Role::Server);
    assert_eq!(ex[0].outcome, Outcome::Complete);
    assert_eq!(
        c.skips(),
        vec![SkipReason::Garbage, SkipReason::Garbage],
        "one count per skipped run per direction"
    );
}

#[test]
fn response_without_request_is_unpaired_and_skipped_in_sync() {
    let mut c = Conn::new();
    c.feed(RECV, &ok(200, "the answer to a request we missed"));
    c.feed(SEND, &get("/x"));
    c.feed(RECV, &ok(201, "x"));
    let ex = c.exchanges();
    assert_eq!(ex.len(), 1);
    assert_eq!(http(ex[0]).status, Some(201));
    assert_eq!(c.skips(), vec![SkipReason::UnpairedResponse]);
}

#[test]
fn interim_responses_precede_the_final_one() {
    let mut c = Conn::new();
    c.feed(
        SEND,
        b"PUT /f HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
    );
    c.feed(RECV, b"HTTP/1.1 100 Continue\r\n\r\n");
    c.feed(SEND, b"abc");
    c.feed(RECV, b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n");
    c.feed(
        RECV,
        b"HTTP/1.1 201 Created\r\nLocation: /f\r\nContent-Length: 0\r\n\r\n",
    );
    let ex = c.exchanges();
    assert_eq!(ex.len(), 1);
    let h = http(ex[0]);
    assert_eq!(h.status, Some(201));
    assert_eq!(h.response_header("location"), Some("/f"));
    assert_eq!(h.response_header("link"), None);
    assert_eq!(h.request_body_size, 3);
}

#[test]
fn switching_protocols_stops_parsing() {
    let mut c = Conn::new();
    c.feed(
        SEND,
        b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    );
    let mut resp = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n".to_vec();
    resp.extend_from_slice(b"\x81\x05hello");
    let t = c.feed(RECV, &resp);
    c.feed(SEND, b"\x81\x85abcdGET / HTTP/1.1\r\n\r\n");
    c.feed(RECV, &ok(200, "looks like HTTP but is websocket payload"));
    c.gap(RECV, 100);
    c.close();
    let ex = c.exchanges();
    assert_eq!(ex.len(), 1, "{:?}", c.out);
    assert_eq!(http(ex[0]).status, Some(101));
    assert_eq!(http(ex[0]).response_header("upgrade"), Some("websocket"));
    assert_eq!(ex[0].outcome, Outcome::Complete);
    assert_eq!(ex[0].end_ns, t.end_ns);
    assert!(c.skips().is_empty());
    assert_eq!(c.parser.held_bytes(), 0);
}

#[test]
fn successful_connect_becomes_a_tunnel() {
    let mut c = Conn::new();
    c.feed(
        SEND,
        b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n",
    );
    c.feed(RECV, b"HTTP/1.1 200 Connection established\r\n\r\n");
    c.feed(SEND, b"\x16\x03\x01\x00\x10garbage-tls");
    c.close();
    let ex = c.exchanges();
    assert_eq!(ex.len(), 1);
    assert_eq!(http(ex[0]).method, "CONNECT");
    assert_eq!(http(ex[0]).target, "db.internal:5432");
    assert!(c.skips().is_empty());
}

#[test]
fn head_204_and_304_have_no_body() {
    let mut c = Conn::new();
    c.feed(SEND, b"HEAD /file HTTP/1.1\r\n\r\n");
    c.feed(RECV, b"HTTP/1.1 200 OK\r\nContent-Length: 123456\r\n\r\n");
    c.feed(SEND, b"DELETE /file HTTP/1.1\r\n\r\n");
    c.feed(
        RECV,
        b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n",
    );
    c.feed(SEND, b"GET /file HTTP/1.1\r\nIf-None-Match: \"x\"\r\n\r\n");
    c.feed(
        RECV,
        b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    c.feed(SEND, &get("/last"));
    c.feed(RECV, &ok(200, "last"));
    let ex = c.exchanges();
    let got: Vec<_> = ex
        .iter()
        .map(|e| {
            (
                http(e).method.as_str(),
                http(e).status,
                http(e).response_body_size,
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("HEAD", Some(200), 0),
            ("DELETE", Some(204), 0),
            ("GET", Some(304), 0),
            ("GET", Some(200), 4)
        ]
    );
    assert!(ex.iter().all(|e| e.outcome == Outcome::Complete));
}

#[test]
fn response_without_length_is_read_until_close() {
    let mut c = Conn::new();
    c.feed(SEND, b"GET /old HTTP/1.0\r\n\r\n");
    c.feed(
        RECV,
        b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n<html>",
    );
    c.feed(RECV, &[b'.'; 1000]);
    let last = c.feed(RECV, b"</html>");
    assert!(c.exchanges().is_empty());
    c.close();
    let ex = c.exchanges();
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].outcome, Outcome::Complete);
    assert_eq!(http(ex[0]).version, 0);
    assert_eq!(http(ex[0]).response_body_size, 6 + 1000 + 7);
    assert_eq!(ex[0].end_ns, last.end_ns);
}

#[test]
fn connection_close_with_length_completes_at_the_last_byte() {
    let mut c = Conn::new();
    c.feed(SEND, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
    c.feed(
        RECV,
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi",
    );
    assert_eq!(c.exchanges().len(), 1);
    c.close();
    assert_eq!(c.exchanges().len(), 1);
    assert_eq!(c.exchanges()[0].outcome, Outcome::Complete);
}

#[test]
fn close_reports_unanswered_requests() {
    let mut c = Conn::new();
    let t = c.feed(SEND, b"POST /slow HTTP/1.1\r\nContent-Length: 2\r\n\r\nab");
    c.feed(SEND, &get("/queued"));
    c.close();
    let ex = c.exchanges();
    assert_eq!(ex.len(), 2);
    assert!(
        ex.iter()
            .all(|e| e.outcome == Outcome::NoResponse && http(e).status.is_none())
    );
    assert_eq!(ex[0].end_ns, t.end_ns, "end is the request's last byte");
    assert_eq!(http(ex[0]).request_body_size, 2);
}

#[test]
fn close_during_a_sized_response_is_no_response() {
    let mut c = Conn::new();
    c.feed(SEND, &get("/cut"));
    c.feed(
        RECV,
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this",
    );
    c.close();
    let ex = c.exchanges();
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].outcome, Outcome::NoResponse);
    assert_eq!(http(ex[0]).status, Some(200));
    assert_eq!(http(ex[0]).response_body_size, 9);
}

#[test]
fn oversized_head_is_skipped_and_counted() {
    let mut c = Conn::new();
    let mut req = b"GET /too-big HTTP/1.1\r\n".to_vec();
    for i in 0..400 {
        req.extend(format!("X-Header-{i}: {}\r\n", "v".repeat(50)).bytes());
    }
    req.extend(b"\r\n");
    for piece in req.chunks(1000) {
        c.feed(SEND, piece);
    }
    c.feed(RECV, &ok(431, ""));
    c.feed(SEND, &get("/fine"));
    c.feed(RECV, &ok(200, "ok"));
    let ex = c.exchanges();
    let got: Vec<_> = ex
        .iter()
        .map(|e| (http(e).target.as_str(), http(e).status, e.outcome))
        .collect();
    assert_eq!(
        got,
        [
            ("/too-big", Some(431), Outcome::Partial),
            ("/fine", Some(200), Outcome::Complete)
        ]
    );
    assert!(
        c.skips().contains(&SkipReason::HeadTooLarge),
        "{:?}",
        c.skips()
    );
}

#[test]
fn headers_are_bounded() {
    let mut c = Conn::new();
    let mut req = b"GET / HTTP/1.1\r\n".to_vec();
    req.extend(format!("Long: {}\r\n", "\u{e9}".repeat(MAX_HEADER_VALUE)).bytes());
    for i in 0..MAX_HEADERS + 10 {
        req.extend(format!("H{i}: {i}\r\n").bytes());
    }
    req.extend(b"Bad: \xff\xfe\r\n\r\n");
    c.feed(SEND, &req);
    c.feed(RECV, &ok(200, ""));
    let h = http(c.exchanges()[0]).clone();
    assert_eq!(h.request_headers.len(), MAX_HEADERS);
    let long = h.request_header("long").unwrap_or_default();
    assert_eq!(
        long.len(),
        MAX_HEADER_VALUE,
        "cut on a character boundary at the limit"
    );
    assert!(long.chars().all(|ch| ch == '\u{e9}'));
}

#[test]
fn lossy_header_bytes_and_invalid_framing() {
    let mut c = Conn::new();
    c.feed(SEND, b"GET /x HTTP/1.1\r\nX-Bin: a\xffb\r\n\r\n");
    c.feed(RECV, &ok(200, ""));
    assert_eq!(
        http(c.exchanges()[0]).request_header("x-bin"),
        Some("a\u{fffd}b")
    );
    // Conflicting lengths make the framing unusable: skipped, then the next message is found.
    c.feed(
        SEND,
        b"POST /y HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    );
    c.feed(SEND, &get("/z"));
    c.feed(RECV, &ok(400, ""));
    c.feed(RECV, &ok(200, "z"));
    let got: Vec<_> = c
        .exchanges()
        .iter()
        .map(|e| (http(e).target.clone(), e.outcome))
        .collect();
    assert_eq!(
        got,
        [
            ("/x".into(), Outcome::Complete),
            ("/y".into(), Outcome::Partial),
            ("/z".into(), Outcome::Complete)
        ]
    );
    assert_eq!(c.skips(), vec![SkipReason::Garbage]);
}

#[test]
fn malformed_chunk_framing_is_garbage_then_resync() {
    let mut c = Conn::new();
    c.feed(SEND, &get("/bad"));
    c.feed(
        RECV,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXYZ\r\n",
    );
    c.feed(SEND, &get("/good"));
    c.feed(RECV, &ok(200, "good"));
    let ex = c.exchanges();
    let got: Vec<_> = ex
        .iter()
        .map(|e| (http(e).target.as_str(), e.outcome))
        .collect();
    assert_eq!(
        got,
        [("/bad", Outcome::Partial), ("/good", Outcome::Complete)]
    );
    assert_eq!(c.skips(), vec![SkipReason::Garbage]);
}

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

/// One generated exchange: the bytes of both messages and what the parser must report.
struct Case {
    request: Vec<u8>,
    response: Vec<u8>,
    method: &'static str,
    target: String,
    status: u16,
    request_body: u64,
    response_body: u64,
}

fn random_case(rng: &mut Rng, i: usize) -> Case {
    let methods = ["GET", "POST", "PUT", "HEAD", "DELETE", "PATCH", "OPTIONS"];
    let method = methods[rng.below(methods.len() as u64) as usize];
    let target = format!("/r/{i}?q={}", rng.below(1000));
    let request_body = if matches!(method, "POST" | "PUT" | "PATCH") {
        rng.below(3000)
    } else {
        0
    };
    let body: Vec<u8> = (0..request_body).map(|k| b'A' + (k % 26) as u8).collect();
    let mut request = format!("{method} {target} HTTP/1.1\r\nHost: h\r\n").into_bytes();
    if request_body > 0 && rng.below(2) == 0 {
        request.extend(b"Transfer-Encoding: chunked\r\n\r\n");
        request.extend(chunked(&body, 1 + rng.below(700) as usize, ""));
    } else {
        if request_body > 0 {
            request.extend(format!("Content-Length: {request_body}\r\n").bytes());
        }
        request.extend(b"\r\n");
        request.extend(&body);
    }
    let statuses = [200, 201, 204, 301, 304, 404, 500];
    let status = statuses[rng.below(statuses.len() as u64) as usize];
    let no_body = method == "HEAD" || status == 204 || status == 304;
    let size = rng.below(5000);
    let response_body = if no_body { 0 } else { size };
    let body: Vec<u8> = (0..size).map(|k| b'a' + (k % 26) as u8).collect();
    let mut response = format!("HTTP/1.1 {status} X\r\nServer: s\r\n").into_bytes();
    if rng.below(3) == 0 && !no_body {
        response.extend(b"Transfer-Encoding: chunked\r\n\r\n");
        response.extend(chunked(&body, 1 + rng.below(2000) as usize, "T: v\r\n"));
    } else {
        response.extend(format!("Content-Length: {size}\r\n\r\n").bytes());
        if !no_body {
            response.extend(&body);
        }
    }
    if rng.below(4) == 0 {
        response.splice(0..0, b"HTTP/1.1 100 Continue\r\n\r\n".iter().copied());
    }
    Case {
        request,
        response,
        method,
        target,
        status,
        request_body,
        response_body,
    }
}

/// Feeds `data` in random pieces (sometimes one byte, sometimes all of it).
fn feed_split(c: &mut Conn, rng: &mut Rng, dir: Direction, data: &[u8]) {
    let mut pos = 0;
    while pos < data.len() {
        let max = match rng.below(3) {
            0 => 3,
            1 => 64,
            _ => 8192,
        };
        let n = (1 + rng.below(max) as usize).min(data.len() - pos);
        c.feed(dir, &data[pos..pos + n]);
        pos += n;
    }
}

#[test]
fn property_random_conversations_with_arbitrary_splits() {
    let mut rng = Rng(0x5eed);
    for round in 0..150 {
        let mut c = Conn::new();
        let cases: Vec<Case> = (0..1 + rng.below(8) as usize)
            .map(|i| random_case(&mut rng, i))
            .collect();
        let client = if rng.below(2) == 0 { SEND } else { RECV };
        let server = if client == SEND { RECV } else { SEND };
        // Pipeline a random number of requests ahead of the responses.
        let depth = 1 + rng.below(4) as usize;
        let mut sent = 0;
        for answered in 0..cases.len() {
            while sent < cases.len() && sent < answered + depth {
                feed_split(&mut c, &mut rng, client, &cases[sent].request);
                sent += 1;
            }
            feed_split(&mut c, &mut rng, server, &cases[answered].response);
        }
        c.close();
        assert!(c.skips().is_empty(), "round {round}: {:?}", c.skips());
        let ex = c.exchanges();
        assert_eq!(ex.len(), cases.len(), "round {round}");
        for (e, case) in ex.iter().zip(&cases) {
            let h = http(e);
            let what = format!("round {round} {} {}", case.method, case.target);
            assert_eq!(e.outcome, Outcome::Complete, "{what}");
            assert_eq!(e.role, Role::of_request_direction(client), "{what}");
            assert_eq!(h.method, case.method, "{what}");
            assert_eq!(h.target, case.target, "{what}");
            assert_eq!(h.status, Some(case.status), "{what}");
            assert_eq!(h.request_body_size, case.request_body, "{what}");
            assert_eq!(h.response_body_size, case.response_body, "{what}");
            assert!(e.start_ns <= e.end_ns, "{what}");
        }
    }
}

#[test]
fn property_truncated_captures_recover() {
    // Each message is captured only up to a per-syscall limit, the rest reported as a gap. Whatever
    // is lost, the parser must report every exchange whose bytes were seen, never panic, and be in
    // sync again for a final fully captured exchange.
    let mut rng = Rng(0xfeed);
    for round in 0..150 {
        let mut c = Conn::new();
        let limit = 16 + rng.below(3000) as usize;
        let cases: Vec<Case> = (0..1 + rng.below(6) as usize)
            .map(|i| random_case(&mut rng, i))
            .collect();
        for case in &cases {
            for (dir, msg) in [(SEND, &case.request), (RECV, &case.response)] {
                let cap = msg.len().min(limit);
                c.feed(dir, &msg[..cap]);
                if msg.len() > cap {
                    c.gap(dir, (msg.len() - cap) as u64);
                }
            }
        }
        c.feed(SEND, &get("/final"));
        c.feed(RECV, &ok(200, "final"));
        let ex = c.exchanges();
        let last = ex.last().map(|e| (http(e).target.as_str(), e.outcome));
        assert_eq!(
            last,
            Some(("/final", Outcome::Complete)),
            "round {round} limit {limit}: {:?}",
            c.out
        );
        assert!(ex.len() <= cases.len() + 1);
        c.close();
    }
}

// ---- stream positions and threads ----

/// Where each exchange's request began: (stream offset, thread).
fn origins(c: &Conn) -> Vec<(u64, u32)> {
    c.exchanges()
        .iter()
        .map(|e| (e.request_offset, e.request_thread))
        .collect()
}

fn post(target: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {target} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn pipelined_requests_in_one_chunk_get_their_own_offsets() {
    let mut c = Conn::new();
    let first = get("/first");
    let t_first = c.feed(SEND, &first);
    c.feed(RECV, &ok(200, "1"));
    let p = post("/p", "hello");
    let mut chunked_put = b"PUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    chunked_put.extend(chunked(b"0123456789", 4, ""));
    let last = get("/last");
    // A stray CRLF after the previous message, three requests, and the start of a fourth.
    let mut chunk = b"\r\n".to_vec();
    chunk.extend(&p);
    chunk.extend(&chunked_put);
    chunk.extend(&last[..10]);
    let t_pipe = c.feed(SEND, &chunk);
    let t_rest = c.feed(SEND, &last[10..]);
    for _ in 0..3 {
        c.feed(RECV, &ok(200, "r"));
    }
    let ex = c.exchanges();
    let targets: Vec<_> = ex.iter().map(|e| http(e).target.as_str()).collect();
    assert_eq!(targets, ["/first", "/p", "/c", "/last"]);
    let p_at = first.len() as u64 + 2;
    let c_at = p_at + p.len() as u64;
    let last_at = c_at + chunked_put.len() as u64;
    assert_eq!(
        origins(&c),
        [
            (0, t_first.thread),
            (p_at, t_pipe.thread),
            (c_at, t_pipe.thread),
            (last_at, t_pipe.thread),
        ]
    );
    assert_ne!(t_pipe.thread, t_rest.thread);
    assert!(ex[1..].iter().all(|e| e.start_ns == t_pipe.start_ns));
}

#[test]
fn offsets_and_threads_hold_at_every_split_position() {
    let a = get("/a");
    let b = post("/b", "body of b");
    let d = get("/d");
    let stream: Vec<u8> = [&a[..], &b, &d].concat();
    let starts = [0, a.len(), a.len() + b.len()];
    for cut in 0..=stream.len() {
        let mut c = Conn::new();
        let t1 = c.feed(SEND, &stream[..cut]);
        let t2 = c.feed(SEND, &stream[cut..]);
        for _ in 0..3 {
            c.feed(RECV, &ok(200, "x"));
        }
        let want: Vec<_> = starts
            .iter()
            .map(|&s| (s as u64, if s < cut { t1.thread } else { t2.thread }))
            .collect();
        assert_eq!(origins(&c), want, "cut at {cut}");
    }
}

#[test]
fn request_split_across_many_feeds_as_server() {
    let mut c = Conn::new();
    let warmup = get("/warmup");
    c.feed(RECV, &warmup);
    // Response bytes go the other way and do not move the request stream.
    c.feed(SEND, &ok(200, "a response body"));
    let p = post("/x", "abcd");
    let g = get("/y");
    let t_p = c.feed(RECV, &p[..1]);
    c.feed(RECV, &p[1..20]);
    c.feed(RECV, &p[20..p.len() - 2]);
    // The body's last bytes and the first byte of the next request share a chunk.
    let mut tail = p[p.len() - 2..].to_vec();
    tail.push(g[0]);
    let t_g = c.feed(RECV, &tail);
    for piece in g[1..].chunks(3) {
        c.feed(RECV, piece);
    }
    c.feed(SEND, &ok(201, ""));
    c.feed(SEND, &ok(200, ""));
    let ex = c.exchanges();
    assert_eq!(ex.len(), 3, "{:?}", c.out);
    assert!(ex.iter().all(|e| e.role == Role::Server));
    let p_at = warmup.len() as u64;
    assert_eq!(
        origins(&c)[1..],
        [(p_at, t_p.thread), (p_at + p.len() as u64, t_g.thread)]
    );
    assert_eq!(ex[1].start_ns, t_p.start_ns);
    assert_eq!(ex[2].start_ns, t_g.start_ns);
}

#[test]
fn gap_before_the_first_request_counts_as_stream_bytes() {
    let mut c = Conn::new();
    // The capture joined mid-connection: earlier bytes are reported as a gap.
    c.gap(SEND, 1000);
    let t = c.feed(SEND, &get("/a"));
    c.feed(RECV, &ok(200, "a"));
    assert_eq!(origins(&c), [(1000, t.thread)]);
    assert_eq!(c.exchanges()[0].outcome, Outcome::Complete);
}

#[test]
fn gap_inside_a_body_keeps_exact_offsets() {
    let mut c = Conn::new();
    let head = b"POST /big HTTP/1.1\r\nContent-Length: 100\r\n\r\n";
    let mut first = head.to_vec();
    first.extend([b'b'; 10]);
    let t_big = c.feed(SEND, &first);
    c.gap(SEND, 90);
    let t_next = c.feed(SEND, &get("/next"));
    c.feed(RECV, &ok(200, ""));
    c.feed(RECV, &ok(200, ""));
    let next_at = head.len() as u64 + 100;
    assert_eq!(origins(&c), [(0, t_big.thread), (next_at, t_next.thread)]);
}

#[test]
fn head_lost_in_a_gap_is_placed_where_the_gap_met_the_boundary() {
    let mut c = Conn::new();
    let first = get("/1");
    c.feed(SEND, &first);
    c.feed(RECV, &ok(200, "1"));
    // A whole request is lost at a message boundary: the best known start is the gap's start.
    let t_gap = c.gap(SEND, 500);
    c.feed(RECV, &ok(202, "lost request's answer"));
    let t_3 = c.feed(SEND, &get("/3"));
    // A gap covering the end of a body and the next head: the head follows the body.
    let head = b"POST /4 HTTP/1.1\r\nContent-Length: 50\r\n\r\n";
    let t_4 = c.feed(SEND, head);
    let t_gap2 = c.gap(SEND, 50 + 300);
    c.close();
    let four_at = first.len() as u64 + 500 + get("/3").len() as u64;
    let got: Vec<_> = c
        .exchanges()
        .iter()
        .map(|e| (http(e).target.clone(), e.request_offset, e.request_thread))
        .collect();
    assert_eq!(
        got,
        [
            ("/1".to_owned(), 0, got[0].2),
            (String::new(), first.len() as u64, t_gap.thread),
            ("/3".to_owned(), first.len() as u64 + 500, t_3.thread),
            ("/4".to_owned(), four_at, t_4.thread),
            (
                String::new(),
                four_at + head.len() as u64 + 50,
                t_gap2.thread
            ),
        ]
    );
}

#[test]
fn a_header_filter_keeps_only_its_fields_and_framing_still_works() {
    let mut c = Conn::new();
    c.parser = Http1Parser::keeping(|name| name.eq_ignore_ascii_case("user-agent"));
    c.feed(RECV, &get("/a"));
    // Split head: the filter applies to heads parsed from the buffer too.
    let response = chunked_response(b"0123456789", 4);
    c.feed(SEND, &response[..20]);
    c.feed(SEND, &response[20..]);
    c.feed(
        RECV,
        b"POST /b HTTP/1.1\r\nContent-Length: 3\r\nX-Other: 1\r\n\r\nabc",
    );
    c.feed(SEND, &ok(201, "done"));
    let ex = c.exchanges();
    assert_eq!(ex.len(), 2, "{:?}", c.out);
    let (a, b) = (http(ex[0]), http(ex[1]));
    assert_eq!(
        a.request_headers.iter().collect::<Vec<_>>(),
        [("User-Agent", "test")]
    );
    assert!(a.response_headers.is_empty());
    assert_eq!((a.status, a.response_body_size), (Some(200), 10));
    assert!(b.request_headers.is_empty());
    assert_eq!((b.target.as_str(), b.request_body_size), ("/b", 3));
    assert_eq!((b.status, b.response_body_size), (Some(201), 4));
    assert!(c.skips().is_empty());
}
