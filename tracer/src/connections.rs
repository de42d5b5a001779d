//! The connection table: per traced connection, stream assembly, protocol detection and the
//! protocol parser; completed exchanges become spans.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use protocols::tls::{HelloWatcher, TlsError, TlsVersion};
use protocols::{ConnectionParser, Detail, Detection, Direction, Exchange, Output, Role, Timing};
use tracer_ebpf::abi;

use crate::capture::events::{Event, TraceContext};
use crate::fxhash::{FastMap, FxBuild};
use crate::linking::{ConnPosition, Evidence, Finished, LinkInfo};
use crate::metrics;
use crate::process::ProcessTable;
use crate::span::Resource;
use crate::spans::{self, Clock, ConnAddrs, http_span};
use crate::streams::{Assembler, Piece};

/// Identity of one traced connection end: the process, the kernel socket and the kernel's
/// first-seen time (which keeps a reused socket address apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Process.
    pub tgid: u32,
    /// Kernel `struct sock` address.
    pub sock: u64,
    /// Kernel connection id.
    pub conn_id: u64,
}

/// Bytes kept while detection needs more of the first message.
const DETECT_STASH: usize = 64;
/// Chunks without a recognisable protocol before the connection is given up on.
const DETECT_ATTEMPTS: u32 = 16;

enum ProtoState {
    /// Looking at first bytes; `stash` holds a too-short first chunk per direction.
    Detecting { stash: [Vec<u8>; 2], attempts: u32 },
    /// A parser owns the connection.
    Parsing(Box<dyn ConnectionParser>),
    /// TLS records on the syscall path: read, per direction, until a ServerHello names the
    /// version (a direction that cannot give one is `None`), then ignored.
    Handshake([Option<Box<HelloWatcher>>; 2]),
    /// Nothing to parse here (filtered out, TLS ciphertext, unknown protocol).
    Ignored,
}

struct Connection {
    state: ProtoState,
    streams: [Assembler; 2],
    /// The TLS plaintext from the SSL library and Go crypto/tls probes: streams of their own,
    /// parsed apart from the ciphertext the syscalls carry.
    tls_state: ProtoState,
    tls_streams: [Assembler; 2],
    /// The TLS version the syscall path saw negotiated, for the plaintext's spans.
    tls_version: Option<TlsVersion>,
    addrs: ConnAddrs,
    /// Where request positions are measured from: see [`LinkCtx`].
    link: LinkCtx,
    last_seen_ns: u64,
    /// The process, resolved when the connection is first seen: a short-lived client may have
    /// exited by the time its response completes.
    resource: Arc<Resource>,
}

/// What a connection knows for placing its requests in the stream both ends share.
#[derive(Debug, Clone, Copy, Default)]
struct LinkCtx {
    tgid: u32,
    /// Per stream set (0: syscall bytes, 1: TLS plaintext) and direction: the stream offset of
    /// the parser's position 0, set when its parser first takes bytes in that direction.
    base: [[Option<u64>; 2]; 2],
    /// Per direction: TCP sequence number minus stream offset (wrapping), from the kernel.
    seq_delta: [Option<u32>; 2],
    /// The kernel saw the connection open: plaintext offsets at both ends count from its start.
    role_known: bool,
    /// Per stream set (as `base`) and direction, the kernel's trace contexts (TCP option) of the
    /// last events that carried one: (first stream offset, end offset, context); slot
    /// `traces_next[set][d]` is written next.
    traces: [[[Option<TracedRange>; TRACE_HISTORY]; 2]; 2],
    traces_next: [[usize; 2]; 2],
}

/// A stream range (first offset, end offset) moved by one event, and the trace context the kernel
/// gave that event.
type TracedRange = (u64, u64, TraceContext);

/// Events with a trace context remembered per direction of a connection: enough for the requests
/// a parser may still hold unanswered when the next ones are read.
const TRACE_HISTORY: usize = 4;

impl LinkCtx {
    fn note_trace(&mut self, set: usize, d: usize, offset: u64, bytes: u64, trace: TraceContext) {
        let slot = self.traces_next[set][d];
        self.traces[set][d][slot] = Some((offset, offset.saturating_add(bytes), trace));
        self.traces_next[set][d] = (slot + 1) % TRACE_HISTORY;
    }

    /// The trace context of the event that moved stream offset `at` of stream set `set` in
    /// direction `d`.
    fn trace_at(&self, set: usize, d: usize, at: u64) -> Option<TraceContext> {
        self.traces[set][d]
            .iter()
            .flatten()
            .find(|(start, end, _)| *start <= at && at < *end)
            .map(|(_, _, t)| *t)
    }
}

/// What the table should do to the kernel's view of connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopPayload {
    /// Kernel socket.
    pub sock: u64,
    /// Kernel connection id.
    pub conn_id: u64,
    /// `abi::CONN_F_*` flags to set.
    pub flags: u8,
}

/// Which connections are of interest.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    /// Local or remote port must be one of these (empty: any).
    pub ports: Vec<u16>,
    /// Executable name must be one of these (empty: any).
    pub exes: Vec<String>,
}

/// The connection table and everything downstream of it up to finished spans.
pub struct Connections {
    table: DashMap<ConnKey, Connection, FxBuild>,
    max: usize,
    idle: Duration,
    filters: Filters,
    processes: Arc<ProcessTable>,
    clock: Clock,
    stop_payload: Vec<StopPayload>,
    outputs: Vec<Output>,
    /// The connections of each process, so an exiting process's connections are found at once.
    by_tgid: FastMap<u32, Vec<ConnKey>>,
    /// Replace literals in database query text by `?`.
    sanitize_query_text: bool,
}

/// The direction in which the process moved the requests of exchanges where it plays `role`.
fn request_direction(role: Role) -> Direction {
    match role {
        Role::Client => Direction::Send,
        Role::Server => Direction::Recv,
    }
}

fn dir_index(dir: Direction) -> usize {
    match dir {
        Direction::Send => 0,
        Direction::Recv => 1,
    }
}

impl Connections {
    /// An empty table.
    pub fn new(
        max: usize,
        idle: Duration,
        filters: Filters,
        processes: Arc<ProcessTable>,
        clock: Clock,
        sanitize_query_text: bool,
    ) -> Self {
        Connections {
            sanitize_query_text,
            table: DashMap::default(),
            max,
            idle,
            filters,
            processes,
            clock,
            stop_payload: Vec::new(),
            outputs: Vec::new(),
            by_tgid: FastMap::default(),
        }
    }

    /// A process exec'd a new program (the event's payload is its file name).
    pub fn exec(&self, ev: &Event<'_>) {
        let path = String::from_utf8_lossy(ev.payload);
        self.processes
            .exec(ev.header.tgid, path.trim_end_matches('\0'));
    }

    /// Forgets a connection, flushing what its parser holds into spans.
    fn remove(
        &mut self,
        key: &ConnKey,
        ts_ns: u64,
        why: &'static str,
        emit: &mut dyn FnMut(Finished),
    ) {
        let Some((_, mut conn)) = self.table.remove(key) else {
            return;
        };
        if let Some(keys) = self.by_tgid.get_mut(&key.tgid) {
            keys.retain(|k| k != key);
            if keys.is_empty() {
                self.by_tgid.remove(&key.tgid);
            }
        }
        if let ProtoState::Parsing(parser) = &mut conn.tls_state {
            parser.close(ts_ns, &mut self.outputs);
        }
        let tls_addrs = ConnAddrs {
            tls: true,
            ..conn.addrs
        };
        self.flush(
            &conn.resource,
            &tls_addrs,
            &conn.link,
            conn.tls_version,
            emit,
        );
        if let ProtoState::Parsing(parser) = &mut conn.state {
            parser.close(ts_ns, &mut self.outputs);
        }
        self.flush(&conn.resource, &conn.addrs, &conn.link, None, emit);
        metrics::add(
            "connections_closed_total",
            metrics::labels(&[("reason", why)]),
            1,
        );
    }

    /// Connections whose payload the kernel should stop copying, collected since the last call.
    pub fn take_stop_payload(&mut self) -> Vec<StopPayload> {
        std::mem::take(&mut self.stop_payload)
    }

    /// Processes one kernel event; finished spans go to `emit`.
    pub fn handle(&mut self, ev: &Event<'_>, emit: &mut dyn FnMut(Finished)) {
        let h = &ev.header;
        let key = ConnKey {
            tgid: h.tgid,
            sock: h.sock,
            conn_id: h.conn_id,
        };
        match h.kind {
            abi::KIND_CLOSE if h.source == abi::SRC_CLOSE => {
                return self.remove(&key, h.exit_ns, "close", emit);
            }
            abi::KIND_CLOSE => return self.remove(&key, h.exit_ns, "end_of_stream", emit),
            abi::KIND_EXIT => {
                for key in self.by_tgid.remove(&h.tgid).unwrap_or_default() {
                    self.remove(&key, h.exit_ns, "process_exit", emit);
                }
                return;
            }
            _ => {}
        }
        if !self.table.contains_key(&key) {
            if self.table.len() >= self.max {
                metrics::add(
                    "events_dropped_total",
                    metrics::labels(&[("reason", "connection_table_full")]),
                    1,
                );
                return;
            }
            let addrs = ConnAddrs {
                local: ev.local(),
                remote: ev.remote(),
                tls: false,
            };
            let wanted = self.wanted(h.tgid, &addrs, h.conn_id);
            let initial = || {
                if wanted {
                    ProtoState::Detecting {
                        stash: [Vec::new(), Vec::new()],
                        attempts: 0,
                    }
                } else {
                    ProtoState::Ignored
                }
            };
            if !wanted {
                self.stop_payload.push(StopPayload {
                    sock: h.sock,
                    conn_id: h.conn_id,
                    flags: abi::CONN_F_NO_PAYLOAD | abi::CONN_F_NO_TLS_PAYLOAD,
                });
            }
            let conn = Connection {
                state: initial(),
                streams: Default::default(),
                tls_state: initial(),
                tls_streams: Default::default(),
                tls_version: None,
                addrs,
                link: LinkCtx {
                    tgid: h.tgid,
                    ..LinkCtx::default()
                },
                last_seen_ns: h.exit_ns,
                resource: self.processes.resource(h.tgid, comm(&h.comm)),
            };
            self.table.insert(key, conn);
            self.by_tgid.entry(key.tgid).or_default().push(key);

            metrics::add("connections_opened_total", "", 1);
        }
        let Some(mut guard) = self.table.get_mut(&key) else {
            return;
        };
        let conn = &mut *guard;
        conn.last_seen_ns = h.exit_ns;
        let tls = matches!(
            h.source,
            abi::SRC_SSL_READ | abi::SRC_SSL_WRITE | abi::SRC_GO_TLS_READ | abi::SRC_GO_TLS_WRITE
        );
        let dir = if h.direction == abi::DIR_SEND {
            Direction::Send
        } else {
            Direction::Recv
        };
        let d = dir_index(dir);
        conn.link.role_known |= h.role != abi::ROLE_UNKNOWN;
        if !tls && h.flags & abi::EV_F_TCP_SEQ != 0 {
            conn.link.seq_delta[d] = Some(h.tcp_seq.wrapping_sub(h.stream_offset as u32));
        }
        if let Some(trace) = ev.trace() {
            conn.link
                .note_trace(usize::from(tls), d, h.stream_offset, h.bytes, trace);
        }
        let (state, streams, flags) = if tls {
            (
                &mut conn.tls_state,
                &mut conn.tls_streams,
                abi::CONN_F_NO_TLS_PAYLOAD,
            )
        } else {
            (&mut conn.state, &mut conn.streams, abi::CONN_F_NO_PAYLOAD)
        };
        if matches!(state, ProtoState::Ignored) {
            return;
        }
        // Addresses can be unset on the first event of a connection that was still connecting.
        if conn.addrs.remote.port() == 0 {
            conn.addrs = ConnAddrs {
                local: ev.local(),
                remote: ev.remote(),
                tls: false,
            };
        }
        let timing = match dir {
            Direction::Send => Timing {
                start_ns: h.enter_ns,
                end_ns: h.exit_ns,
                thread: h.tid,
            },
            Direction::Recv => Timing {
                start_ns: h.exit_ns,
                end_ns: h.exit_ns,
                thread: h.tid,
            },
        };
        let mut at = streams[d].expected().unwrap_or(h.stream_offset);
        let Ok(pieces) = streams[d].accept(h.stream_offset, h.bytes, ev.payload) else {
            metrics::add(
                "events_dropped_total",
                metrics::labels(&[("reason", "stream_overlap")]),
                1,
            );
            return;
        };
        let base = &mut conn.link.base[usize::from(tls)][d];
        for piece in pieces {
            let stop_as = StopPayload {
                sock: key.sock,
                conn_id: key.conn_id,
                flags,
            };
            let len = match piece {
                Piece::Data(data) => data.len() as u64,
                Piece::Gap(n) => n,
            };
            if let Some(version) = feed(
                stop_as,
                state,
                dir,
                (piece, at, &mut *base),
                timing,
                &mut self.outputs,
                &mut self.stop_payload,
            ) {
                conn.tls_version = Some(version);
            }
            at += len;
        }
        // Most events finish no exchange.
        if self.outputs.is_empty() {
            return;
        }
        let addrs = ConnAddrs { tls, ..conn.addrs };
        let resource = Arc::clone(&conn.resource);
        let link = conn.link;
        let tls_version = conn.tls_version.filter(|_| tls);
        drop(guard);
        self.flush(&resource, &addrs, &link, tls_version, emit);
    }

    fn wanted(&self, tgid: u32, addrs: &ConnAddrs, first_seen_ns: u64) -> bool {
        if crate::export::own::is_own(addrs.remote, first_seen_ns) {
            // The receiving end of the agent's own export (a collector on this host).
            metrics::add("connections_ignored_total", "reason=\"agent_export\"", 1);
            return false;
        }
        let ports = &self.filters.ports;
        if !ports.is_empty()
            && !ports.contains(&addrs.local.port())
            && !ports.contains(&addrs.remote.port())
        {
            return false;
        }
        let exes = &self.filters.exes;
        if !exes.is_empty() {
            return self
                .processes
                .exe_name(tgid)
                .is_some_and(|exe| exes.contains(&exe));
        }
        true
    }

    /// Turns the parser outputs collected so far into spans; `tls_version` is the negotiated
    /// version of the TLS plaintext they were read from.
    fn flush(
        &mut self,
        resource: &Arc<Resource>,
        addrs: &ConnAddrs,
        link: &LinkCtx,
        tls_version: Option<TlsVersion>,
        emit: &mut dyn FnMut(Finished),
    ) {
        for out in self.outputs.drain(..) {
            match out {
                Output::Skipped(reason) => {
                    metrics::add(
                        "parser_skipped_total",
                        metrics::labels(&[("reason", reason.as_str())]),
                        1,
                    );
                }
                Output::Exchange(ex) => {
                    if let Detail::Http(http) = &ex.detail
                        && http.method.is_empty()
                    {
                        // The request head was lost in a gap: nothing to name the span after.
                        metrics::add(
                            "exchanges_dropped_total",
                            metrics::labels(&[("reason", "request_head_lost")]),
                            1,
                        );
                        continue;
                    }
                    let resource = Arc::clone(resource);
                    let mut span = match &ex.detail {
                        Detail::Http(http) => {
                            http_span(&ex, http, Some(addrs), resource, &self.clock)
                        }
                        Detail::Http2(h2) => {
                            spans::grpc::http2_span(&ex, h2, Some(addrs), resource, &self.clock)
                        }
                        Detail::Postgres(pg) => spans::db::postgres_span(
                            &ex,
                            pg,
                            Some(addrs),
                            resource,
                            &self.clock,
                            self.sanitize_query_text,
                        ),
                    };
                    if let Some(version) = tls_version {
                        spans::tls_attributes(version, &mut span.attributes);
                    }
                    static SERVER: metrics::Counter =
                        metrics::Counter::new("spans_created_total", "kind=\"server\"");
                    static CLIENT: metrics::Counter =
                        metrics::Counter::new("spans_created_total", "kind=\"client\"");
                    match span.kind {
                        crate::span::SpanKind::Server => &SERVER,
                        crate::span::SpanKind::Client => &CLIENT,
                    }
                    .add(1);
                    let link = link_info(&ex, link, addrs);
                    emit(Finished { span, link });
                }
            }
        }
    }

    /// Forgets connections idle for longer than the idle timeout at monotonic time `now_ns`,
    /// flushing what their parsers hold.
    pub fn sweep(&mut self, now_ns: u64, emit: &mut dyn FnMut(Finished)) {
        let idle_ns = self.idle.as_nanos() as u64;
        let stale: Vec<ConnKey> = self
            .table
            .iter()
            .filter(|e| now_ns.saturating_sub(e.value().last_seen_ns) > idle_ns)
            .map(|e| *e.key())
            .collect();
        for key in stale {
            self.remove(&key, now_ns, "idle", emit);
        }
        metrics::set_gauge("connections", "", self.table.len() as u64);
    }
}

/// The command name from a NUL-padded kernel `comm`.
fn comm(raw: &[u8; 16]) -> &str {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    std::str::from_utf8(&raw[..end]).unwrap_or("")
}

/// Feeds one piece of one stream to `state`; `stop_as` is what stops this stream's payload copies
/// in the kernel when the stream turns out to be of no interest.
/// `at` is the piece's offset in its stream; `base` the stream offset of the parser's first byte
/// in this direction, set when the parser first takes bytes in it.
/// Returns the TLS version once a handshake on the stream names it.
fn feed(
    stop_as: StopPayload,
    state: &mut ProtoState,
    dir: Direction,
    (piece, at, base): (Piece<'_>, u64, &mut Option<u64>),
    timing: Timing,
    outputs: &mut Vec<Output>,
    stop: &mut Vec<StopPayload>,
) -> Option<TlsVersion> {
    if matches!(state, ProtoState::Parsing(_)) {
        base.get_or_insert(at);
    }
    match (&mut *state, piece) {
        (ProtoState::Parsing(parser), Piece::Data(data)) => {
            parser.feed(dir, data, timing, outputs);
            if parser.tls_follows() {
                // What follows is a TLS handshake (PostgreSQL's SSLRequest): its ServerHello
                // gives the version, then the ciphertext is of no use.
                metrics::add(
                    "connections_detected_total",
                    metrics::labels(&[("protocol", "tls")]),
                    1,
                );
                *state = ProtoState::Handshake(new_watchers());
            }
        }
        (ProtoState::Parsing(parser), Piece::Gap(n)) => parser.gap(dir, n, timing, outputs),
        (ProtoState::Handshake(watchers), piece) => {
            let watched = watch(watchers, dir, piece);
            return settle(watched, state, stop_as, stop);
        }
        (ProtoState::Ignored, _) => {}
        (ProtoState::Detecting { stash, .. }, Piece::Gap(_)) => stash[dir_index(dir)].clear(),
        (ProtoState::Detecting { stash, attempts }, Piece::Data(data)) => {
            let stash = &mut stash[dir_index(dir)];
            let joined;
            let bytes: &[u8] = if stash.is_empty() {
                data
            } else {
                joined = [stash.as_slice(), data].concat();
                &joined
            };
            match protocols::detect(dir, bytes) {
                Detection::Found(proto) => {
                    metrics::add(
                        "connections_detected_total",
                        metrics::labels(&[("protocol", proto.as_str())]),
                        1,
                    );
                    let opts = protocols::ParserOptions {
                        http1_headers: Some(crate::spans::http1_header_used),
                    };
                    let mut parser = protocols::new_parser_with(proto, &opts);
                    // The stash holds the bytes just before this piece.
                    *base = Some(at.saturating_sub((bytes.len() - data.len()) as u64));
                    parser.feed(dir, bytes, timing, outputs);
                    *state = ProtoState::Parsing(parser);
                }
                Detection::NeedMore if bytes.len() < DETECT_STASH => *stash = bytes.to_vec(),
                Detection::Tls => {
                    metrics::add(
                        "connections_detected_total",
                        metrics::labels(&[("protocol", "tls")]),
                        1,
                    );
                    let mut watchers = new_watchers();
                    let watched = watch(&mut watchers, dir, Piece::Data(bytes));
                    *state = ProtoState::Handshake(watchers);
                    return settle(watched, state, stop_as, stop);
                }
                Detection::NeedMore | Detection::Unknown => {
                    stash.clear();
                    *attempts += 1;
                    if *attempts >= DETECT_ATTEMPTS {
                        metrics::add(
                            "connections_detected_total",
                            metrics::labels(&[("protocol", "unknown")]),
                            1,
                        );
                        ignore(state, stop_as, stop);
                    }
                }
            }
        }
    }
    None
}

fn new_watchers() -> [Option<Box<HelloWatcher>>; 2] {
    [Some(Box::default()), Some(Box::default())]
}

/// What the ServerHello watchers of a connection know after a piece.
enum Watched {
    /// Still reading.
    More,
    /// The ServerHello named this version.
    Version(TlsVersion),
    /// Neither direction can give a version.
    GaveUp,
}

/// Gives one piece of TLS records to its direction's ServerHello watcher.
fn watch(
    watchers: &mut [Option<Box<HelloWatcher>>; 2],
    dir: Direction,
    piece: Piece<'_>,
) -> Watched {
    let slot = &mut watchers[dir_index(dir)];
    let Some(watcher) = slot else {
        return Watched::More;
    };
    let result = match piece {
        Piece::Data(data) => watcher.feed(data),
        Piece::Gap(_) => Err(TlsError::Gap),
    };
    match result {
        Ok(None) => Watched::More,
        Ok(Some(version)) => {
            metrics::add(
                "tls_handshakes_total",
                metrics::labels(&[("result", "version_seen")]),
                1,
            );
            Watched::Version(version)
        }
        Err(e) => {
            // Counted per direction: the other one may still carry the ServerHello.
            metrics::add(
                "tls_handshakes_total",
                metrics::labels(&[("result", e.as_str())]),
                1,
            );
            *slot = None;
            if watchers.iter().all(Option::is_none) {
                Watched::GaveUp
            } else {
                Watched::More
            }
        }
    }
}

/// Acts on what the watchers know: once the version is known or cannot be, the connection's
/// ciphertext stops being copied.
fn settle(
    watched: Watched,
    state: &mut ProtoState,
    stop_as: StopPayload,
    stop: &mut Vec<StopPayload>,
) -> Option<TlsVersion> {
    // The kernel keeps choosing trace ids for a TLS connection's client writes: the SSL probes
    // report them with the plaintext.
    let stop_as = StopPayload {
        flags: stop_as.flags | abi::CONN_F_TLS,
        ..stop_as
    };
    match watched {
        Watched::More => None,
        Watched::Version(version) => {
            ignore(state, stop_as, stop);
            Some(version)
        }
        Watched::GaveUp => {
            ignore(state, stop_as, stop);
            None
        }
    }
}

fn ignore(state: &mut ProtoState, stop_as: StopPayload, stop: &mut Vec<StopPayload>) {
    *state = ProtoState::Ignored;
    stop.push(stop_as);
}

/// Linking facts of one exchange: its thread, times, position in the connection, and the
/// request identifiers an event-loop proxy passes on.
fn link_info(ex: &Exchange, ctx: &LinkCtx, addrs: &ConnAddrs) -> LinkInfo {
    let (target, request_id) = match &ex.detail {
        Detail::Http(http) => (
            Some(Evidence::of(&[&http.method, &http.target])),
            http.request_header("x-request-id")
                .map(|id| Evidence::of(&[id])),
        ),
        Detail::Http2(h2) => (
            h2.method
                .as_deref()
                .zip(h2.path.as_deref())
                .map(|(m, p)| Evidence::of(&[m, p])),
            h2.request_headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("x-request-id"))
                .map(|(_, v)| Evidence::of(&[v])),
        ),
        Detail::Postgres(_) => (None, None),
    };
    let d = dir_index(request_direction(ex.role));
    let set = usize::from(addrs.tls);
    let kernel_trace = ctx.base[set][d]
        .and_then(|base| base.checked_add(ex.request_offset))
        .and_then(|at| ctx.trace_at(set, d, at));
    LinkInfo {
        tgid: ctx.tgid,
        thread: ex.request_thread,
        position: position(ex, ctx, addrs),
        kernel_trace,
        start_ns: ex.start_ns,
        end_ns: ex.end_ns,
        target,
        request_id,
    }
}

/// Where the exchange's request starts in the stream both ends share: the TCP sequence number
/// of its first byte, or for TLS plaintext its offset when both ends saw the connection open.
fn position(ex: &Exchange, ctx: &LinkCtx, addrs: &ConnAddrs) -> Option<ConnPosition> {
    let d = dir_index(request_direction(ex.role));
    let (client, server) = match ex.role {
        Role::Client => (addrs.local, addrs.remote),
        Role::Server => (addrs.remote, addrs.local),
    };
    if client.port() == 0 || server.port() == 0 {
        return None;
    }
    let at = ctx.base[usize::from(addrs.tls)][d]?.checked_add(ex.request_offset)?;
    if addrs.tls {
        ctx.role_known.then_some(ConnPosition::TlsOffset {
            client,
            server,
            offset: at,
        })
    } else {
        let delta = ctx.seq_delta[d]?;
        Some(ConnPosition::TcpSeq {
            client,
            seq: (at as u32).wrapping_add(delta),
        })
    }
}
