//! Fuzzes the HTTP/2 parser with arbitrary bytes, feed boundaries, directions, gaps and closes.
//!
//! Input is a sequence of operations. Each starts with an op byte: bit 0 picks the direction,
//! bits 1-2 the kind (0-2 feed, 3 gap), bits 3-7 a parameter. A feed takes `1 + next byte` bytes of
//! payload; a gap's length is the next two bytes, shifted by the parameter. A gap op whose
//! parameter is 31 closes the connection and starts a new one; parameter 30 feeds the client
//! preface instead, so the fuzzer reaches connections whose HPACK state is known.

#![no_main]

use libfuzzer_sys::fuzz_target;
use protocols::http2::{
    Http2Parser, MAX_HEADER_BLOCK, MAX_HEADER_BYTES, MAX_HEADER_VALUE, MAX_HEADERS, MAX_PATH,
    MAX_STREAMS,
};
use protocols::{ConnectionParser, Detail, Direction, Output, Timing};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Generous bound on what one connection may hold: two header block buffers, two HPACK tables
/// (64 KiB of entries, with allocation overhead) and a full stream table.
const HELD_LIMIT: usize = 4 * MAX_HEADER_BLOCK
    + 4 * 3 * 64 * 1024
    + MAX_STREAMS
        * (3 * (MAX_HEADER_BYTES + MAX_HEADERS * 48) + MAX_PATH + 4 * MAX_HEADER_VALUE + 1024);

fn check(parser: &Http2Parser, out: &mut Vec<Output>) {
    assert!(
        parser.held_bytes() <= HELD_LIMIT,
        "held {} bytes",
        parser.held_bytes()
    );
    for o in out.drain(..) {
        if let Output::Exchange(e) = o {
            assert!(e.start_ns <= e.end_ns, "{e:?}");
            let Detail::Http2(h) = &e.detail else {
                panic!("not an HTTP/2 exchange: {e:?}");
            };
            assert!(h.path.as_ref().is_none_or(|p| p.len() <= MAX_PATH));
            for list in [&h.request_headers, &h.response_headers, &h.trailers] {
                assert!(list.len() <= MAX_HEADERS);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut parser = Http2Parser::new();
    let mut out = Vec::new();
    let mut clock = 0u64;
    let mut input = data;
    while let [op, rest @ ..] = input {
        clock += 10;
        let timing = Timing {
            start_ns: clock,
            end_ns: clock + 5,
            thread: u32::from(*op),
        };
        let dir = if op & 1 == 0 {
            Direction::Send
        } else {
            Direction::Recv
        };
        let param = op >> 3;
        input = rest;
        match (op >> 1) & 3 {
            3 if param == 31 => {
                parser.close(clock, &mut out);
                check(&parser, &mut out);
                parser = Http2Parser::new();
            }
            3 if param == 30 => parser.feed(dir, PREFACE, timing, &mut out),
            3 => {
                let (len, tail) = match input {
                    [a, b, tail @ ..] => (u64::from(u16::from_le_bytes([*a, *b])), tail),
                    _ => (1, &[][..]),
                };
                input = tail;
                parser.gap(dir, len << (param % 24), timing, &mut out);
            }
            _ => {
                let Some((&n, tail)) = input.split_first() else {
                    break;
                };
                let (payload, tail) = tail.split_at((usize::from(n) + 1).min(tail.len()));
                input = tail;
                parser.feed(dir, payload, timing, &mut out);
            }
        }
        check(&parser, &mut out);
    }
    parser.close(clock, &mut out);
    check(&parser, &mut out);
});
