//! Fuzzes the HTTP/1.x parser with arbitrary bytes, feed boundaries, directions, gaps and closes.
//!
//! Input is a sequence of operations. Each starts with an op byte: bit 0 picks the direction,
//! bits 1-2 the kind (0-2 feed, 3 gap), bits 3-7 a parameter. A feed takes `1 + next byte` bytes of
//! payload; a gap's length is the next two bytes, shifted by the parameter; a gap op whose parameter
//! is 31 closes the connection instead and starts a new one.

#![no_main]

use libfuzzer_sys::fuzz_target;
use protocols::http1::{Http1Parser, MAX_HEAD, MAX_PENDING};
use protocols::{ConnectionParser, Direction, Output, Timing};

/// Generous bound on what one connection may hold (two head buffers, a full pending queue).
const HELD_LIMIT: usize = 4 * (MAX_HEAD + 1) + MAX_PENDING * (3 * MAX_HEAD + 1024);

fn check(parser: &Http1Parser, out: &mut Vec<Output>) {
    assert!(
        parser.held_bytes() <= HELD_LIMIT,
        "held {} bytes",
        parser.held_bytes()
    );
    for o in out.drain(..) {
        if let Output::Exchange(e) = o {
            assert!(e.start_ns <= e.end_ns, "{e:?}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut parser = Http1Parser::new();
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
                parser = Http1Parser::new();
            }
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
