//! Fuzzes the PostgreSQL parser with arbitrary bytes, feed boundaries, directions, gaps and closes.
//!
//! Input is a sequence of operations. Each starts with an op byte: bit 0 picks the direction,
//! bits 1-2 the kind (0-2 feed, 3 gap), bits 3-7 a parameter. A feed takes `1 + next byte` bytes of
//! payload, or, when the parameter is 31, a framed message: a type byte from the next byte, then
//! `1 + next byte` body bytes behind a correct length (so the fuzzer reaches deep states fast).
//! A gap's length is the next two bytes, shifted by the parameter; a gap op whose parameter is 31
//! closes the connection instead and starts a new one.

#![no_main]

use libfuzzer_sys::fuzz_target;
use protocols::postgres::{
    MAX_NAME, MAX_PENDING_RUNS, MAX_PENDING_TEXT, MAX_PORTALS, MAX_QUERY, MAX_QUEUE,
    MAX_STATEMENT_BYTES, MAX_STATEMENTS, PgParser,
};
use protocols::{ConnectionParser, Detail, Direction, Output, Timing};

/// Generous bound on what one connection may hold: body buffers, statement and portal tables,
/// waiting statements and the queue.
const HELD_LIMIT: usize = 4 * (MAX_NAME + MAX_QUERY + 2)
    + MAX_STATEMENT_BYTES
    + MAX_STATEMENTS * 1024
    + MAX_PORTALS * (MAX_QUERY + 2 * MAX_NAME + 1024)
    + MAX_PENDING_TEXT
    + MAX_QUERY
    + MAX_PENDING_RUNS * 8192
    + MAX_QUEUE * 64;

fn check(parser: &PgParser, out: &mut Vec<Output>) {
    assert!(
        parser.held_bytes() <= HELD_LIMIT,
        "held {} bytes",
        parser.held_bytes()
    );
    for o in out.drain(..) {
        if let Output::Exchange(e) = o {
            assert!(e.start_ns <= e.end_ns, "{e:?}");
            let Detail::Postgres(p) = &e.detail else {
                panic!("not PostgreSQL: {e:?}");
            };
            assert!(p.query.as_ref().is_none_or(|q| q.len() <= MAX_QUERY));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut parser = PgParser::new();
    let mut out = Vec::new();
    let mut clock = 0u64;
    let mut input = data;
    let mut framed = Vec::new();
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
                parser = PgParser::new();
            }
            3 => {
                let (len, tail) = match input {
                    [a, b, tail @ ..] => (u64::from(u16::from_le_bytes([*a, *b])), tail),
                    _ => (1, &[][..]),
                };
                input = tail;
                parser.gap(dir, len << (param % 24), timing, &mut out);
            }
            _ if param == 31 => {
                let [tag, n, tail @ ..] = input else {
                    break;
                };
                let (body, tail) = tail.split_at((usize::from(*n) + 1).min(tail.len()));
                input = tail;
                framed.clear();
                framed.push(*tag);
                framed.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
                framed.extend_from_slice(body);
                parser.feed(dir, &framed, timing, &mut out);
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
