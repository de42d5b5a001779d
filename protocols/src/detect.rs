//! Protocol detection from the first bytes of a connection.
//!
//! Each protocol contributes one probe; [`detect`] asks them in order and the first definite answer
//! wins. Adding a protocol means adding a probe to [`PROBES`] (before any probe whose patterns could
//! also match its bytes) and an arm to [`new_parser`].

use crate::http1::{self, Http1Parser, Start};
use crate::http2::{self, Http2Parser};
use crate::postgres::{self, PgParser};
use crate::{ConnectionParser, Direction, Protocol};

/// What the first bytes of a connection say about its protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detection {
    /// The bytes start a message of this protocol.
    Found(Protocol),
    /// TLS records: encrypted, so no parser may see them (plaintext comes from TLS library hooks).
    Tls,
    /// Too few bytes to decide; ask again with more.
    NeedMore,
    /// No known protocol.
    Unknown,
}

/// One protocol's test: `Found`/`Tls` when the bytes are its own, `NeedMore` when they could be.
type Probe = fn(Direction, &[u8]) -> Detection;

/// Probes in the order they are asked.
const PROBES: &[Probe] = &[probe_tls, http2::probe, probe_http1, postgres::probe];

/// Detects the protocol of a connection from the first bytes seen in direction `dir`.
pub fn detect(dir: Direction, data: &[u8]) -> Detection {
    let mut need_more = false;
    for probe in PROBES {
        match probe(dir, data) {
            Detection::NeedMore => need_more = true,
            Detection::Unknown => {}
            found => return found,
        }
    }
    if need_more {
        Detection::NeedMore
    } else {
        Detection::Unknown
    }
}

/// A fresh parser for a connection of protocol `p`.
pub fn new_parser(p: Protocol) -> Box<dyn ConnectionParser> {
    new_parser_with(p, &ParserOptions::default())
}

/// What a consumer needs of the parsers' output, so they can skip the rest.
#[derive(Debug, Clone, Copy, Default)]
pub struct ParserOptions {
    /// HTTP/1.x header fields to keep in exchanges; `None`: all.
    pub http1_headers: Option<http1::HeaderFilter>,
}

/// A fresh parser for a connection of protocol `p`, with `opts`.
pub fn new_parser_with(p: Protocol, opts: &ParserOptions) -> Box<dyn ConnectionParser> {
    match p {
        Protocol::Http1 => Box::new(match opts.http1_headers {
            Some(keep) => Http1Parser::keeping(keep),
            None => Http1Parser::new(),
        }),
        Protocol::Http2 => Box::<Http2Parser>::default(),
        Protocol::Postgres => Box::<PgParser>::default(),
    }
}

/// A TLS record header: content type (change_cipher_spec, alert, handshake, application_data), then
/// protocol version 3.0 to 3.4. Non-handshake types matter for captures that start mid-connection.
fn probe_tls(_dir: Direction, data: &[u8]) -> Detection {
    const CONTENT_TYPES: std::ops::RangeInclusive<u8> = 0x14..=0x17;
    match data {
        [] => Detection::NeedMore,
        [t, ..] if !CONTENT_TYPES.contains(t) => Detection::Unknown,
        [_] => Detection::NeedMore,
        [_, 0x03] => Detection::NeedMore,
        [_, 0x03, 0x00..=0x04, ..] => Detection::Tls,
        _ => Detection::Unknown,
    }
}

/// An HTTP/1.x request line (known method, space, target) or status line (`HTTP/1.x `). Either
/// direction may carry requests: the traced process may be the client or the server.
fn probe_http1(_dir: Direction, data: &[u8]) -> Detection {
    match http1::message_start(data) {
        Start::Yes => Detection::Found(Protocol::Http1),
        Start::Maybe => Detection::NeedMore,
        Start::No => Detection::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOTH: [Direction; 2] = [Direction::Send, Direction::Recv];

    #[test]
    fn http1_requests_and_responses_in_either_direction() {
        for dir in BOTH {
            for start in [
                &b"GET / HTTP/1.1\r\n"[..],
                b"POST /api/v1 HTTP/1.1\r\n",
                b"OPTIONS * HTTP/1.1\r\n",
                b"CONNECT example.com:443 HTTP/1.1\r\n",
                b"HTTP/1.1 200 OK\r\n",
                b"HTTP/1.0 404 Not Found\r\n",
            ] {
                assert_eq!(
                    detect(dir, start),
                    Detection::Found(Protocol::Http1),
                    "{:?}",
                    String::from_utf8_lossy(start)
                );
            }
        }
    }

    #[test]
    fn prefixes_need_more_bytes() {
        let line = b"DELETE /x HTTP/1.1\r\n";
        for n in 0..b"DELETE /".len() {
            assert_eq!(
                detect(Direction::Send, &line[..n]),
                Detection::NeedMore,
                "{n} bytes"
            );
        }
        let status = b"HTTP/1.1 200 OK\r\n";
        for n in 0..b"HTTP/1.1 ".len() {
            assert_eq!(
                detect(Direction::Recv, &status[..n]),
                Detection::NeedMore,
                "{n} bytes"
            );
        }
    }

    #[test]
    fn http2_preface_is_not_http1() {
        assert_eq!(
            detect(Direction::Send, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Detection::Found(Protocol::Http2)
        );
    }

    #[test]
    fn non_http_is_unknown() {
        for data in [
            &b"GETX / HTTP/1.1\r\n"[..],
            b"GET  / HTTP/1.1\r\n",
            b"get / HTTP/1.1\r\n",
            b"HTTP/2 200\r\n",
            b"HTTP/1.1200 OK",
            b"SSH-2.0-OpenSSH_9.6\r\n",
        ] {
            assert_eq!(
                detect(Direction::Send, data),
                Detection::Unknown,
                "{:?}",
                String::from_utf8_lossy(data)
            );
        }
    }

    #[test]
    fn tls_records_are_never_a_parser_protocol() {
        let client_hello = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01];
        let app_data = [0x17, 0x03, 0x03, 0x40, 0x00];
        for dir in BOTH {
            assert_eq!(detect(dir, &client_hello), Detection::Tls);
            assert_eq!(detect(dir, &client_hello[..3]), Detection::Tls);
            assert_eq!(detect(dir, &app_data), Detection::Tls);
            assert_eq!(detect(dir, &client_hello[..1]), Detection::NeedMore);
            assert_eq!(detect(dir, &client_hello[..2]), Detection::NeedMore);
        }
        assert_eq!(
            detect(Direction::Send, &[0x16, 0x03, 0x05]),
            Detection::Unknown
        );
        assert_eq!(
            detect(Direction::Send, &[0x16, 0x02, 0x01]),
            Detection::Unknown
        );
    }

    #[test]
    fn new_parser_builds_the_detected_protocol() {
        let Detection::Found(p) = detect(Direction::Send, b"GET / HTTP/1.1\r\n") else {
            panic!("HTTP/1 not detected");
        };
        assert_eq!(new_parser(p).protocol(), Protocol::Http1);
    }
}
