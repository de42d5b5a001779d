//! Golden tests: real HTTP/2 traffic recorded with `testdata/capture.py` (curl and nghttp against
//! nginx h2c, a grpcio client and server from `testdata/grpc_peer.py`), replayed through detection
//! and the parser as the tracer would feed it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use protocols::http2::Http2Exchange;
use protocols::{
    ConnectionParser, Detail, Detection, Direction, Exchange, Outcome, Output, Protocol, Role,
    SkipReason, Timing, detect, new_parser,
};

/// One recorded chunk: what one recv() returned in the proxy.
struct Chunk {
    conn: usize,
    /// Client to server.
    c2s: bool,
    data: Vec<u8>,
    t_ns: u64,
}

fn load(name: &str) -> Vec<Chunk> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name);
    let index = std::fs::read_to_string(dir.join("chunks.txt")).expect("chunks.txt");
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut chunks = Vec::new();
    for line in index
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f.len(), 5, "bad line {line:?}");
        let num = |s: &str| s.parse::<usize>().expect("number");
        let (conn, dir_name, offset, len) = (num(f[0]), f[1], num(f[2]), num(f[3]));
        let file = format!("conn{conn}.{dir_name}.bin");
        let bytes = files
            .entry(file.clone())
            .or_insert_with(|| std::fs::read(dir.join(&file)).expect("capture file"));
        chunks.push(Chunk {
            conn,
            c2s: dir_name == "c2s",
            data: bytes[offset..offset + len].to_vec(),
            t_ns: f[4].parse().expect("t_ns"),
        });
    }
    chunks
}

/// Where the traced process sits, and how chunks are cut before feeding.
#[derive(Clone, Copy)]
struct Replay {
    process: Role,
    /// Feed each chunk in pieces of at most this many bytes.
    piece: usize,
    /// Skip this many chunks first (a capture that starts mid-connection).
    skip: usize,
}

/// Exchanges and skip reasons per connection, detection as the tracer does it: the first chunk
/// that a probe recognises starts the parser.
fn replay(chunks: &[Chunk], r: Replay) -> BTreeMap<usize, (Vec<Exchange>, Vec<SkipReason>)> {
    let mut parsers: BTreeMap<usize, Option<Box<dyn ConnectionParser>>> = BTreeMap::new();
    let mut out = Vec::new();
    let mut results: BTreeMap<usize, (Vec<Exchange>, Vec<SkipReason>)> = BTreeMap::new();
    let mut collect = |conn: usize, out: &mut Vec<Output>| {
        let entry = results.entry(conn).or_default();
        for o in out.drain(..) {
            match o {
                Output::Exchange(e) => entry.0.push(e),
                Output::Skipped(s) => entry.1.push(s),
            }
        }
    };
    let mut last_t = 0;
    for c in &chunks[r.skip..] {
        let dir = match (c.c2s, r.process) {
            (true, Role::Client) | (false, Role::Server) => Direction::Send,
            _ => Direction::Recv,
        };
        let timing = Timing {
            start_ns: c.t_ns,
            end_ns: c.t_ns + 1000,
            thread: u32::from(c.c2s),
        };
        last_t = timing.end_ns;
        let slot = parsers.entry(c.conn).or_default();
        if slot.is_none() {
            match detect(dir, &c.data) {
                Detection::Found(Protocol::Http2) => *slot = Some(new_parser(Protocol::Http2)),
                Detection::Found(p) => panic!("detected as {p:?}"),
                _ => continue,
            }
        }
        let Some(parser) = slot.as_mut() else {
            continue;
        };
        for piece in c.data.chunks(r.piece) {
            parser.feed(dir, piece, timing, &mut out);
        }
        collect(c.conn, &mut out);
    }
    for (conn, parser) in &mut parsers {
        if let Some(p) = parser {
            p.close(last_t, &mut out);
            collect(*conn, &mut out);
        }
    }
    results
}

fn h2(e: &Exchange) -> &Http2Exchange {
    match &e.detail {
        Detail::Http2(h) => h,
        other => panic!("not HTTP/2: {other:?}"),
    }
}

const ROLES: [Role; 2] = [Role::Client, Role::Server];

fn whole(process: Role) -> Replay {
    Replay {
        process,
        piece: usize::MAX,
        skip: 0,
    }
}

/// A comparable digest of an exchange (timings left out).
fn digest(e: &Exchange) -> String {
    let h = h2(e);
    format!(
        "{:?} {:?} {} {:?} {:?} {:?} {:?} req={} resp={} grpc={:?}/{:?} degraded={}",
        e.role,
        e.outcome,
        h.stream_id,
        h.method,
        h.path,
        h.authority,
        h.status,
        h.request_body_size,
        h.response_body_size,
        h.grpc_status,
        h.grpc_message,
        h.degraded
    )
}

#[test]
fn curl_against_nginx() {
    let chunks = load("nginx_curl");
    for process in ROLES {
        let result = replay(&chunks, whole(process));
        assert_eq!(result.len(), 4, "one connection per curl run");
        let expected = [
            ("GET", "/", 200, 0, 17),
            ("GET", "/static/big.txt", 200, 0, 20_000),
            ("GET", "/static/missing.txt?x=1", 404, 0, 153),
            ("POST", "/submit", 201, 8, 8),
        ];
        for ((exchanges, skips), (method, path, status, req_body, resp_body)) in
            result.values().zip(expected)
        {
            assert!(skips.is_empty(), "{path}: {skips:?}");
            assert_eq!(exchanges.len(), 1, "{path}");
            let e = &exchanges[0];
            let h = h2(e);
            assert_eq!((e.role, e.outcome), (process, Outcome::Complete), "{path}");
            assert!(e.start_ns < e.end_ns);
            assert_eq!(h.stream_id, 1);
            assert_eq!(h.method.as_deref(), Some(method));
            assert_eq!(h.path.as_deref(), Some(path));
            assert_eq!(h.scheme.as_deref(), Some("http"));
            assert!(
                h.authority
                    .as_deref()
                    .is_some_and(|a| a.starts_with("127.0.0.1:"))
            );
            assert_eq!(h.status, Some(status), "{path}");
            assert_eq!(
                (h.request_body_size, h.response_body_size),
                (req_body, resp_body),
                "{path}"
            );
            assert!(
                h.request_header("user-agent")
                    .is_some_and(|ua| ua.starts_with("curl/"))
            );
            assert_eq!(h.response_header("server"), Some("nginx/1.22.1"));
            assert!(!h.grpc && !h.degraded && h.grpc_status.is_none());
        }
        let first = h2(&result[&0].0[0]);
        assert_eq!(
            first.request_header("traceparent"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
    }
}

#[test]
fn nghttp_multiplexed_against_nginx() {
    let chunks = load("nginx_nghttp");
    for process in ROLES {
        let result = replay(&chunks, whole(process));
        let (exchanges, skips) = &result[&0];
        assert!(skips.is_empty(), "{skips:?}");
        let mut got: Vec<(String, u16, u64)> = exchanges
            .iter()
            .map(|e| {
                assert_eq!((e.role, e.outcome), (process, Outcome::Complete));
                let h = h2(e);
                assert_eq!(h.method.as_deref(), Some("GET"));
                assert!(!h.degraded);
                (
                    h.path.clone().expect("path"),
                    h.status.expect("status"),
                    h.response_body_size,
                )
            })
            .collect();
        got.sort();
        let expected = [
            ("/", 200, 17),
            ("/?again", 200, 17),
            ("/static/big.txt?n=1", 200, 20_000),
            ("/static/big.txt?n=2", 200, 20_000),
            ("/static/missing.txt?x=1", 404, 153),
        ];
        assert_eq!(
            got,
            expected
                .iter()
                .map(|&(p, s, b)| (p.to_owned(), s, b))
                .collect::<Vec<_>>()
        );
        // nghttp opens its requests on distinct odd streams.
        let mut ids: Vec<u32> = exchanges.iter().map(|e| h2(e).stream_id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 5);
        assert!(ids.iter().all(|id| id % 2 == 1));
    }
}

#[test]
fn grpcio_greeter() {
    let chunks = load("grpc_greeter");
    for process in ROLES {
        let result = replay(&chunks, whole(process));
        assert_eq!(result.len(), 1);
        let (exchanges, skips) = &result[&0];
        assert!(skips.is_empty(), "{skips:?}");
        let calls: Vec<&Http2Exchange> = exchanges.iter().map(h2).collect();
        let paths: Vec<&str> = calls.iter().filter_map(|h| h.path.as_deref()).collect();
        assert_eq!(
            paths,
            [
                "/helloworld.Greeter/SayHello",
                "/helloworld.Greeter/Fail",
                "/helloworld.Greeter/Count"
            ]
        );
        for (e, h) in exchanges.iter().zip(&calls) {
            assert_eq!((e.role, e.outcome), (process, Outcome::Complete));
            assert!(h.grpc, "{:?}", h.path);
            assert_eq!(h.method.as_deref(), Some("POST"));
            assert_eq!(h.status, Some(200));
            assert!(!h.degraded);
            assert!(
                h.request_header("user-agent")
                    .is_some_and(|ua| ua.contains("grpc-python"))
            );
        }
        // Messages are a 5-byte prefix and the payload: "bob", "eve", "3" in; "hello bob", none,
        // and "1", "2", "3" out.
        let sizes: Vec<(u64, u64)> = calls
            .iter()
            .map(|h| (h.request_body_size, h.response_body_size))
            .collect();
        assert_eq!(sizes, [(8, 14), (8, 0), (6, 18)]);
        assert_eq!(calls[0].grpc_status, Some(0));
        assert_eq!(calls[1].grpc_status, Some(5), "NOT_FOUND");
        assert_eq!(
            calls[1].grpc_message.as_deref(),
            Some("no such greeter: eve \u{2713}")
        );
        assert!(calls[1].trailers.is_empty(), "trailers-only response");
        assert_eq!(calls[2].grpc_status, Some(0));
        assert!(
            calls[2]
                .trailers
                .iter()
                .any(|(k, v)| k == "grpc-status" && v == "0")
        );
    }
}

#[test]
fn any_chunking_gives_the_same_exchanges() {
    for name in ["nginx_curl", "nginx_nghttp", "grpc_greeter"] {
        let chunks = load(name);
        let reference: Vec<String> = replay(&chunks, whole(Role::Client))
            .values()
            .flat_map(|(e, _)| e.iter().map(digest))
            .collect();
        for piece in [1, 2, 7, 9, 10, 100, 1000, 4096] {
            let r = Replay {
                process: Role::Client,
                piece,
                skip: 0,
            };
            let got: Vec<String> = replay(&chunks, r)
                .values()
                .flat_map(|(e, _)| e.iter().map(digest))
                .collect();
            assert_eq!(got, reference, "{name} in pieces of {piece}");
        }
    }
}

/// Joining a connection at any chunk: whatever is reported is right, and what could not be
/// decoded is marked.
#[test]
fn joining_mid_connection_never_reports_wrong_fields() {
    let truth: &[(&str, &[&str])] = &[
        (
            "grpc_greeter",
            &[
                "/helloworld.Greeter/SayHello",
                "/helloworld.Greeter/Fail",
                "/helloworld.Greeter/Count",
            ],
        ),
        (
            "nginx_nghttp",
            &[
                "/",
                "/?again",
                "/static/big.txt?n=1",
                "/static/big.txt?n=2",
                "/static/missing.txt?x=1",
            ],
        ),
    ];
    for &(name, paths) in truth {
        let chunks = load(name);
        let full = replay(&chunks, whole(Role::Client));
        let statuses: BTreeMap<u32, Option<u16>> = full[&0]
            .0
            .iter()
            .map(|e| (h2(e).stream_id, h2(e).status))
            .collect();
        let (mut decoded, mut degraded) = (0, 0);
        for skip in 1..chunks.len() {
            for process in ROLES {
                let r = Replay {
                    process,
                    piece: usize::MAX,
                    skip,
                };
                for (exchanges, _) in replay(&chunks, r).values() {
                    for e in exchanges {
                        let h = h2(e);
                        assert_eq!(e.role, process, "{name} from chunk {skip}");
                        assert!(
                            h.path.as_deref().is_none_or(|p| paths.contains(&p)),
                            "{name} from chunk {skip}: {h:?}"
                        );
                        assert!(matches!(h.method.as_deref(), None | Some("GET" | "POST")));
                        if let Some(status) = h.status {
                            assert_eq!(statuses[&h.stream_id], Some(status));
                        }
                        if h.path.is_none() {
                            assert!(h.degraded, "{name} from chunk {skip}: {h:?}");
                        }
                        decoded += usize::from(h.path.is_some());
                        degraded += usize::from(h.degraded);
                    }
                }
            }
        }
        if name == "grpc_greeter" {
            assert!(decoded > 0, "new paths are literals");
            assert!(degraded > 0, "grpc indexes its headers: joins lose some");
        }
    }
}

/// Every request's position is the frame header of the HEADERS that opened its stream in the
/// recorded client-to-server bytes, whichever end is traced and however the chunks are cut.
#[test]
fn request_offsets_point_at_the_opening_headers_frame() {
    for name in ["nginx_curl", "nginx_nghttp", "grpc_greeter"] {
        let chunks = load(name);
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("testdata")
            .join(name);
        let mut reference = None;
        for process in ROLES {
            for piece in [usize::MAX, 1, 7, 1000] {
                let r = Replay {
                    process,
                    piece,
                    skip: 0,
                };
                let mut got = Vec::new();
                for (conn, (exchanges, _)) in replay(&chunks, r) {
                    let c2s = std::fs::read(dir.join(format!("conn{conn}.c2s.bin")))
                        .expect("capture file");
                    for e in &exchanges {
                        let h = h2(e);
                        let at = e.request_offset as usize;
                        let hdr = &c2s[at..at + 9];
                        let stream = u32::from_be_bytes([hdr[5], hdr[6], hdr[7], hdr[8]]);
                        assert_eq!((hdr[3], stream), (0x1, h.stream_id), "{name} conn {conn}");
                        // The replay gives client-to-server chunks thread 1.
                        assert_eq!(e.request_thread, 1, "{name} conn {conn}");
                        got.push((conn, h.stream_id, e.request_offset));
                    }
                }
                got.sort_unstable();
                assert!(!got.is_empty());
                match &reference {
                    None => reference = Some(got),
                    Some(want) => assert_eq!(&got, want, "{name} {process:?} in pieces of {piece}"),
                }
            }
        }
    }
}
