//! Linking spans into traces. Finished spans wait in a bounded window so parents and children
//! meet; each span then leaves with the trace id of the top of its chain and its parent's span id.
//!
//! Rules, in the order they are tried (docs/linking.md explains each and its limits):
//! - **connection**: the SERVER span of a request and the CLIENT span that sent it share the
//!   request's position in the TCP stream (the sequence number of its first byte, read in the
//!   kernel, with the client's address and port; for TLS plaintext, the plaintext offset on a
//!   connection seen from its start with the server's address too). The server span becomes the
//!   client span's child.
//! - **thread**: a CLIENT span sent by thread T while T's process was serving exactly one request
//!   that T had read (that SERVER span started before and ended after the client span) becomes
//!   that SERVER span's child: thread-per-request servers.
//! - **evidence**: where several served requests on the thread (event loops), or only requests of
//!   other threads, enclose the client span, it becomes the child of the one request that carries
//!   the same `X-Request-ID`, the same incoming trace context, or the same request target
//!   (a proxy forwarding the path); when none or several match, the span stays a root and the case
//!   is counted as ambiguous.
//! - A W3C or B3 context the request carried (set when the span was built) stays the parent when
//!   no rule applies, and a rule never moves a span into another trace than its header names.
//!
//! Timeline of a span: arrival; at arrival + window/2 the thread and evidence rules run for a
//! CLIENT span (the SERVER span that encloses it ends after it, so it must have arrived); at
//! arrival + window it is exported; at arrival + 2 x window it is forgotten (until then a late
//! child still finds its trace). At most `max_spans` are held: beyond that the oldest go early.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use crate::capture::events::TraceContext;
use crate::fxhash::{FastMap, FxBuild};
use crate::metrics;
use crate::span::{Span, SpanKind};

/// Served requests looked at, nearest start first, when placing one client span.
const MAX_CANDIDATES: usize = 32;
/// Parent steps followed to find a chain's top; longer chains are cut (and counted).
const MAX_DEPTH: usize = 64;

/// Where a request sits in its connection, the same at both ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnPosition {
    /// TCP sequence number of the request's first byte, with the client's end: sequence numbers
    /// are random per connection, so the pair survives address translation of the server's end.
    TcpSeq {
        /// The client's address and port.
        client: SocketAddr,
        /// Sequence number.
        seq: u32,
    },
    /// Offset of the request in the TLS plaintext of a connection both ends saw from its start.
    TlsOffset {
        /// The client's address and port.
        client: SocketAddr,
        /// The server's address and port.
        server: SocketAddr,
        /// Plaintext byte offset.
        offset: u64,
    },
}

/// A request target or request id, for the evidence rule, which only asks whether two are the
/// same: a 64-bit digest instead of the text, so a span's linking facts need no formatting and
/// no allocation. The text comes from traffic, so the digest is keyed (SipHash with this
/// process's random keys): nobody can choose two requests that collide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evidence(u64);

impl Evidence {
    /// The digest of `parts` in order (`["GET", "/a"]` for a method and target).
    pub fn of(parts: &[&str]) -> Self {
        static KEYS: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
        let mut h = KEYS.get_or_init(Default::default).build_hasher();
        for part in parts {
            h.write(part.as_bytes());
            // A byte no UTF-8 text has ends each part: ("ab", "c") and ("a", "bc") differ.
            h.write_u8(0xff);
        }
        Evidence(h.finish())
    }
}

/// What linking needs to know of a span besides the span itself.
#[derive(Debug, Clone, Default)]
pub struct LinkInfo {
    /// Process.
    pub tgid: u32,
    /// Thread that moved the request's first byte (wrote it for CLIENT, read it for SERVER).
    pub thread: u32,
    /// The request's position in its connection, when known.
    pub position: Option<ConnPosition>,
    /// First byte of the request, monotonic ns.
    pub start_ns: u64,
    /// Last byte of the exchange, monotonic ns.
    pub end_ns: u64,
    /// Method and target (`GET`, `/a?b`), for HTTP.
    pub target: Option<Evidence>,
    /// `X-Request-ID` of the request.
    pub request_id: Option<Evidence>,
    /// The trace id the kernel sent with the request in a TCP option (CLIENT), or read with it
    /// (SERVER): see [`Linker::submit`].
    pub kernel_trace: Option<TraceContext>,
}

/// A finished span and what linking needs to know of it.
#[derive(Debug, Clone)]
pub struct Finished {
    /// The span as built from its exchange (trace id and parent from request headers, if any).
    pub span: Span,
    /// Linking facts.
    pub link: LinkInfo,
}

/// Linking settings.
#[derive(Debug, Clone, Copy)]
pub struct LinkConfig {
    /// Off: spans leave at once with only header contexts.
    pub enabled: bool,
    /// How long a span waits for its relatives before export.
    pub window: Duration,
    /// Most spans held at once.
    pub max_spans: usize,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            enabled: true,
            window: Duration::from_secs(1),
            max_spans: 50_000,
        }
    }
}

impl Entry {
    /// Its trace id can no longer change.
    fn fixed(&self) -> bool {
        self.from_header || self.pinned || self.committed
    }
}

struct Entry {
    /// The span, until it is exported; boxed, so an exported entry, kept for another window, is
    /// small.
    span: Option<Box<Span>>,
    kind: SpanKind,
    span_id: [u8; 8],
    /// The trace this span is in as far as known: its header's, or its chain top's once exported.
    trace_id: [u8; 16],
    /// The request carried a trace context (the span's trace id came from it).
    from_header: bool,
    /// The trace id travelled to or came from another process in a TCP option: it can no longer
    /// change.
    pinned: bool,
    /// The sender's CLIENT span id, known from the TCP option and the request's position, used
    /// when no local CLIENT span is found (the sender is on another host).
    remote_parent: Option<[u8; 8]>,
    /// Some exported span used this entry's trace id: it can no longer change.
    committed: bool,
    /// Parent found by a rule.
    parent: Option<u64>,
    link: Held,
}

/// The linking facts an entry keeps after arrival: [`LinkInfo`] without what only arrival uses
/// (the position, 88 bytes, and the kernel's trace context), so the window's entries stay small.
#[derive(Debug, Clone, Copy)]
struct Held {
    tgid: u32,
    thread: u32,
    start_ns: u64,
    end_ns: u64,
    target: Option<Evidence>,
    request_id: Option<Evidence>,
    /// The request position's key in [`Linker::by_position`].
    position_key: Option<u64>,
}

/// The entries of one request position still waiting for their other end.
struct PositionSlot {
    /// The position's second digest ([`position_check`]): with the map's key, 128 bits tell
    /// two positions apart. The position itself (88 bytes) made the map three times larger
    /// where requests wait for an end that never comes (a traced server whose clients are not
    /// traced: ~13 MiB at saturated nginx).
    check: u64,
    /// Client and server entry, [`NO_ENTRY`] for none.
    ids: [u64; 2],
}

/// The held entries by id. Ids are given in arrival order and forgotten in arrival order (every
/// step queue is FIFO), so they form a window over a ring: no hashing, no per-entry allocation.
#[derive(Default)]
struct Slab {
    /// Id of `slots[0]`.
    base: u64,
    slots: VecDeque<Option<Entry>>,
    len: usize,
}

impl Slab {
    fn slot(&self, id: u64) -> Option<usize> {
        let i = usize::try_from(id.checked_sub(self.base)?).ok()?;
        (i < self.slots.len()).then_some(i)
    }
    fn get(&self, id: &u64) -> Option<&Entry> {
        self.slot(*id).and_then(|i| self.slots[i].as_ref())
    }
    fn get_mut(&mut self, id: &u64) -> Option<&mut Entry> {
        self.slot(*id).and_then(|i| self.slots[i].as_mut())
    }
    fn contains_key(&self, id: &u64) -> bool {
        self.get(id).is_some()
    }
    /// Adds the entry of the next id (ids only grow).
    fn insert(&mut self, id: u64, e: Entry) {
        if self.slots.is_empty() {
            self.base = id;
        }
        let Some(gap) = id.checked_sub(self.base + self.slots.len() as u64) else {
            return;
        };
        for _ in 0..gap {
            self.slots.push_back(None);
        }
        self.slots.push_back(Some(e));
        self.len += 1;
    }
    fn remove(&mut self, id: &u64) -> Option<Entry> {
        let i = self.slot(*id)?;
        let e = self.slots[i].take();
        if e.is_some() {
            self.len -= 1;
        }
        while matches!(self.slots.front(), Some(None)) {
            self.slots.pop_front();
            self.base += 1;
        }
        e
    }
    fn len(&self) -> usize {
        self.len
    }
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The linking window.
pub struct Linker {
    cfg: LinkConfig,
    entries: Slab,
    next_id: u64,
    /// (due time, entry) in arrival order, one queue per step.
    to_decide: VecDeque<(u64, u64)>,
    to_export: VecDeque<(u64, u64)>,
    to_forget: VecDeque<(u64, u64)>,
    /// Request positions whose other end has not arrived, by the position's digest
    /// ([`position_key`]). A position leaves when both ends have met (a request's position is
    /// unique, so nothing else can use it) or when its entries are forgotten: on a host where
    /// both ends are traced the map stays small enough for its probes to stay in cache.
    by_position: FastMap<u64, PositionSlot>,
    /// Served requests per (process, thread) and per process, by request start.
    served_by_thread: FastMap<(u32, u32), Served>,
    served_by_process: FastMap<u32, Served>,
}

/// No entry on this side of a position (ids count up from 0 and never reach it).
const NO_ENTRY: u64 = u64::MAX;

/// The key of a position in [`Linker::by_position`]. Positions come from the kernel (addresses,
/// sequence numbers, offsets), not from traffic content.
fn position_key(pos: &ConnPosition) -> u64 {
    FxBuild::default().hash_one(pos)
}

/// A second digest of a position, independent of [`position_key`] (SipHash with this process's
/// random keys), that [`PositionSlot`] keeps instead of the position.
fn position_check(pos: &ConnPosition) -> u64 {
    static KEYS: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    KEYS.get_or_init(Default::default).hash_one(pos)
}

fn count_link(rule: &'static str) {
    // The per-span rules found once: no lookup per span.
    static CONNECTION: metrics::Counter =
        metrics::Counter::new("spans_linked_total", "rule=\"connection\"");
    static THREAD: metrics::Counter =
        metrics::Counter::new("spans_linked_total", "rule=\"thread\"");
    static TCP_OPTION: metrics::Counter =
        metrics::Counter::new("spans_linked_total", "rule=\"tcp_option\"");
    match rule {
        "connection" => CONNECTION.add(1),
        "thread" => THREAD.add(1),
        "tcp_option" => TCP_OPTION.add(1),
        _ => metrics::add("spans_linked_total", metrics::labels(&[("rule", rule)]), 1),
    }
}

fn count_unlinked(reason: &'static str) {
    metrics::add(
        "spans_unlinked_total",
        metrics::labels(&[("reason", reason)]),
        1,
    );
}

impl Linker {
    /// An empty window.
    pub fn new(cfg: LinkConfig) -> Self {
        Linker {
            cfg,
            entries: Slab::default(),
            next_id: 0,
            to_decide: VecDeque::new(),
            to_export: VecDeque::new(),
            to_forget: VecDeque::new(),
            by_position: FastMap::default(),
            served_by_thread: FastMap::default(),
            served_by_process: FastMap::default(),
        }
    }

    /// Spans held, exported or not.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Nothing held.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn window_ns(&self) -> u64 {
        u64::try_from(self.cfg.window.as_nanos()).unwrap_or(u64::MAX)
    }

    /// Takes a finished span at monotonic time `now_ns`; spans due for export go to `emit`.
    ///
    /// Without a trace context from headers, a span whose request carried the kernel's TCP option
    /// takes that option's trace id, fixed from then on: a CLIENT span also takes the span id
    /// both ends derive from the request's position ([`wire_span_id`]), and a SERVER span whose
    /// request brought the option from elsewhere gets that id as its parent unless a local
    /// CLIENT span is found.
    pub fn submit(&mut self, f: Finished, now_ns: u64, emit: &mut dyn FnMut(Span)) {
        if !self.cfg.enabled {
            count_root(&f.span);
            emit(f.span);
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let Finished { mut span, link } = f;
        let kind = span.kind;
        let from_header = span.parent_span_id.is_some();
        let (mut pinned, mut remote_parent) = (false, None);
        if let Some(kt) = link.kernel_trace.filter(|_| !from_header) {
            let wire_id = link.position.and_then(wire_span_id);
            match kind {
                SpanKind::Client => {
                    span.trace_id = kt.trace_id;
                    pinned = true;
                    if let Some(w) = wire_id {
                        span.span_id = w;
                    }
                }
                SpanKind::Server => {
                    span.trace_id = kt.trace_id;
                    pinned = kt.in_band;
                    remote_parent = wire_id.filter(|_| kt.in_band);
                }
            }
        }
        let position_key = link.position.as_ref().map(position_key);
        let (start, end, tgid, thread) = (link.start_ns, link.end_ns, link.tgid, link.thread);
        let entry = Entry {
            kind,
            span_id: span.span_id,
            trace_id: span.trace_id,
            from_header,
            pinned,
            remote_parent,
            committed: false,
            parent: None,
            link: Held {
                tgid,
                thread,
                start_ns: start,
                end_ns: end,
                target: link.target,
                request_id: link.request_id,
                position_key,
            },
            span: Some(Box::new(span)),
        };
        self.entries.insert(id, entry);
        if let (Some(pos), Some(key)) = (link.position, position_key) {
            let side = usize::from(kind == SpanKind::Server);
            let check = position_check(&pos);
            let met = match self.by_position.entry(key) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    let mut ids = [NO_ENTRY; 2];
                    ids[side] = id;
                    v.insert(PositionSlot { check, ids });
                    None
                }
                std::collections::hash_map::Entry::Occupied(mut o) => {
                    let slot = o.get_mut();
                    let other = slot.ids[1 - side];
                    if slot.check == check && other != NO_ENTRY {
                        o.remove();
                        Some(other)
                    } else {
                        // This side again, or another position with the same digest: the
                        // newest takes the slot.
                        slot.check = check;
                        slot.ids = [NO_ENTRY; 2];
                        slot.ids[side] = id;
                        None
                    }
                }
            };
            if let Some(other) = met {
                let (child, parent) = if kind == SpanKind::Server {
                    (id, other)
                } else {
                    (other, id)
                };
                // The option's trace id went from one traced process of this host to another:
                // no other host depends on it, and the linker sees both ends.
                for end in [child, parent] {
                    if let Some(e) = self.entries.get_mut(&end) {
                        e.pinned = false;
                    }
                }
                if self.link(child, parent) {
                    count_link("connection");
                }
            }
        }
        let half = self.window_ns() / 2;
        if kind == SpanKind::Server {
            let took = end.saturating_sub(start);
            self.served_by_thread
                .entry((tgid, thread))
                .or_default()
                .insert(start, id, took);
            self.served_by_process
                .entry(tgid)
                .or_default()
                .insert(start, id, took);
        } else {
            self.to_decide.push_back((now_ns.saturating_add(half), id));
        }
        self.to_export
            .push_back((now_ns.saturating_add(2 * half), id));
        self.to_forget
            .push_back((now_ns.saturating_add(4 * half), id));
        if self.entries.len() > self.cfg.max_spans {
            metrics::add("linking_window_overflow_total", "", 1);
            self.evict_oldest(emit);
        }
    }

    /// Runs every remaining step of the oldest span now. Every queue is in arrival order, so
    /// the oldest span's steps, if still pending, are at their fronts.
    fn evict_oldest(&mut self, emit: &mut dyn FnMut(Span)) {
        let Some((_, id)) = self.to_forget.pop_front() else {
            return;
        };
        if self.to_decide.front().is_some_and(|&(_, d)| d == id) {
            self.to_decide.pop_front();
            self.decide(id);
        }
        if self.to_export.front().is_some_and(|&(_, e)| e == id) {
            self.to_export.pop_front();
            self.export(id, emit);
        }
        self.forget(id);
    }

    /// Runs every step due at monotonic time `now_ns`.
    pub fn advance(&mut self, now_ns: u64, emit: &mut dyn FnMut(Span)) {
        while let Some(&(due, id)) = self.to_decide.front() {
            if due > now_ns {
                break;
            }
            self.to_decide.pop_front();
            self.decide(id);
        }
        while let Some(&(due, id)) = self.to_export.front() {
            if due > now_ns {
                break;
            }
            self.to_export.pop_front();
            self.export(id, emit);
        }
        while let Some(&(due, id)) = self.to_forget.front() {
            if due > now_ns {
                break;
            }
            self.to_forget.pop_front();
            self.forget(id);
        }
        metrics::set_gauge("linking_window_spans", "", self.entries.len() as u64);
    }

    /// Decides and exports everything held (shutdown).
    pub fn flush(&mut self, emit: &mut dyn FnMut(Span)) {
        self.advance(u64::MAX, emit);
    }

    /// The top of `id`'s chain.
    fn top(&self, mut id: u64) -> u64 {
        for _ in 0..MAX_DEPTH {
            match self.entries.get(&id).and_then(|e| e.parent) {
                Some(p) if self.entries.contains_key(&p) => id = p,
                _ => return id,
            }
        }
        metrics::add("linking_chain_cut_total", "", 1);
        id
    }

    /// Makes `parent` the parent of `child` when that keeps every span in one trace and makes
    /// no cycle; says whether it did.
    fn link(&mut self, child: u64, parent: u64) -> bool {
        if child == parent {
            return false;
        }
        let top = self.top(parent);
        if top == child {
            count_unlinked("cycle");
            return false;
        }
        let (Some(c), Some(t)) = (self.entries.get(&child), self.entries.get(&top)) else {
            return false;
        };
        if c.parent.is_some() {
            return false;
        }
        let (child_trace, child_fixed) = (c.trace_id, c.fixed());
        let (top_trace, top_fixed) = (t.trace_id, t.fixed());
        if child_trace != top_trace && child_fixed {
            if top_fixed {
                count_unlinked("conflicting_trace");
                return false;
            }
            // The chain above takes the trace its lower part already has (from a header, or
            // because part of it left already).
            if let Some(t) = self.entries.get_mut(&top) {
                t.trace_id = child_trace;
            }
        }
        if let Some(c) = self.entries.get_mut(&child) {
            c.parent = Some(parent);
        }
        true
    }

    /// The thread and evidence rules for a CLIENT span.
    fn decide(&mut self, id: u64) {
        let Some(c) = self.entries.get(&id) else {
            return;
        };
        if c.parent.is_some() {
            return;
        }
        let link = &c.link;
        // The served requests of `served` that started before the client span and ended after.
        let enclosing = |served: Option<&Served>| -> Vec<u64> {
            Served::enclosing(served, link.start_ns)
                .filter(|s| {
                    self.entries.get(s).is_some_and(|e| {
                        e.link.start_ns <= link.start_ns && link.end_ns <= e.link.end_ns
                    })
                })
                .collect()
        };
        let on_thread = enclosing(self.served_by_thread.get(&(link.tgid, link.thread)));
        let chosen = match on_thread.as_slice() {
            [] => {
                let in_process = enclosing(self.served_by_process.get(&link.tgid));
                if in_process.is_empty() {
                    None
                } else {
                    match self.by_evidence(c, &in_process) {
                        Some(s) => Some((s, "process_evidence")),
                        None => {
                            count_unlinked("ambiguous");
                            None
                        }
                    }
                }
            }
            [one] => Some((*one, "thread")),
            many => match self.by_evidence(c, many) {
                Some(s) => Some((s, "thread_evidence")),
                None => {
                    count_unlinked("ambiguous");
                    None
                }
            },
        };
        if let Some((parent, rule)) = chosen
            && self.link(id, parent)
        {
            count_link(rule);
        }
    }

    /// The one candidate that shares a request id, an incoming trace context or a target with
    /// client span `c`, trying those in that order.
    fn by_evidence(&self, c: &Entry, candidates: &[u64]) -> Option<u64> {
        type Same = fn(&Entry, &Entry) -> bool;
        let tests: [Same; 3] = [
            |c, s| c.link.request_id.is_some() && c.link.request_id == s.link.request_id,
            |c, s| c.from_header && s.from_header && c.trace_id == s.trace_id,
            |c, s| c.link.target.is_some() && c.link.target == s.link.target,
        ];
        for same in tests {
            let mut found = candidates
                .iter()
                .filter(|s| self.entries.get(s).is_some_and(|s| same(c, s)));
            if let (Some(&one), None) = (found.next(), found.next()) {
                return Some(one);
            }
        }
        None
    }

    fn export(&mut self, id: u64, emit: &mut dyn FnMut(Span)) {
        let top = self.top(id);
        let trace_id = match self.entries.get_mut(&top) {
            Some(t) => {
                t.committed = true;
                t.trace_id
            }
            None => return,
        };
        let local_parent = self
            .entries
            .get(&id)
            .and_then(|e| e.parent)
            .and_then(|p| self.entries.get(&p))
            .map(|p| p.span_id);
        let remote_parent = self.entries.get(&id).and_then(|e| e.remote_parent);
        if local_parent.is_none() && remote_parent.is_some() {
            count_link("tcp_option");
        }
        let parent_span_id = local_parent.or(remote_parent);
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        e.trace_id = trace_id;
        e.committed = true;
        let Some(mut span) = e.span.take() else {
            return;
        };
        span.trace_id = trace_id;
        if parent_span_id.is_some() {
            span.parent_span_id = parent_span_id;
        }
        count_root(&span);
        emit(*span);
    }

    fn forget(&mut self, id: u64) {
        let Some(e) = self.entries.remove(&id) else {
            return;
        };
        if let Some(key) = e.link.position_key
            && let Some(slot) = self.by_position.get_mut(&key)
        {
            for side in slot.ids.iter_mut() {
                if *side == id {
                    *side = NO_ENTRY;
                }
            }
            if slot.ids.iter().all(|&side| side == NO_ENTRY) {
                self.by_position.remove(&key);
            }
        }
        if e.kind == SpanKind::Server {
            let key = (e.link.start_ns, id);
            remove_served(
                &mut self.served_by_thread,
                (e.link.tgid, e.link.thread),
                key,
            );
            remove_served(&mut self.served_by_process, e.link.tgid, key);
        }
    }
}

/// The CLIENT span id both ends of a request derive from its position in the connection (the
/// client's address and port and the TCP sequence number of the request's first byte, or for TLS
/// its plaintext offset), so an agent on the receiving host names the sender's span without
/// asking the sender's agent. A fixed function (FNV-1a, then a 64-bit finaliser): every agent
/// version must compute the same.
pub fn wire_span_id(pos: ConnPosition) -> Option<[u8; 8]> {
    let (client, kind, at) = match pos {
        ConnPosition::TcpSeq { client, seq } => (client, 0u8, u64::from(seq)),
        ConnPosition::TlsOffset { client, offset, .. } => (client, 1u8, offset),
    };
    let ip = match client.ip() {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(v6) => v6.octets(),
    };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    // A sequence number as 4 bytes; an offset as the kind byte and 8 bytes.
    let mut at_buf = [0u8; 9];
    let at_bytes: &[u8] = if kind == 0 {
        at_buf[..4].copy_from_slice(&(at as u32).to_be_bytes());
        &at_buf[..4]
    } else {
        at_buf[0] = kind;
        at_buf[1..].copy_from_slice(&at.to_be_bytes());
        &at_buf[..]
    };
    for &b in ip
        .iter()
        .chain(&client.port().to_be_bytes())
        .chain(at_bytes)
    {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    Some(if h == 0 { 1 } else { h }.to_be_bytes())
}

fn count_root(span: &Span) {
    // Label sets as `metrics::labels` writes them, found once: no lookup per span.
    static SERVER: metrics::Counter = metrics::Counter::new("spans_root_total", "kind=\"server\"");
    static CLIENT: metrics::Counter = metrics::Counter::new("spans_root_total", "kind=\"client\"");
    if span.parent_span_id.is_none() {
        match span.kind {
            SpanKind::Server => &SERVER,
            SpanKind::Client => &CLIENT,
        }
        .add(1);
    }
}

fn remove_served<K: std::hash::Hash + Eq>(index: &mut FastMap<K, Served>, k: K, key: (u64, u64)) {
    if let Some(served) = index.get_mut(&k) {
        served.remove(key);
        if served.is_empty() {
            index.remove(&k);
        }
    }
}

/// Served requests held for one thread or process, sorted by (start, entry), with the longest
/// duration among them, which bounds how far back one that still encloses a given instant can
/// have started. A sorted ring rather than a tree: SERVER spans arrive about in start order and
/// are forgotten in arrival order, so inserts land near the back and removals near the front,
/// without an allocation per entry. A removal that is not at the front only marks its key gone
/// (the search in a ring of a second's requests, ~45k at saturation, was ~5 % of the agent's
/// samples); the key leaves when it reaches the front.
#[derive(Default)]
struct Served {
    starts: VecDeque<(u64, u64)>,
    /// Keys removed behind the front, still in `starts`; never the front itself.
    gone: FxHashSet<(u64, u64)>,
    longest: u64,
}

type FxHashSet<T> = std::collections::HashSet<T, FxBuild>;

/// How far from the back [`Served::insert`] scans before it searches.
const NEAR_BACK: usize = 16;

impl Served {
    fn insert(&mut self, start_ns: u64, id: u64, took_ns: u64) {
        let key = (start_ns, id);
        // Most arrive in start order or nearly (a drain hands over connections one after
        // another): the place is at or near the back, found by a short scan from there.
        let n = self.starts.len();
        let at = match (1..=NEAR_BACK.min(n)).find(|&back| self.starts[n - back] < key) {
            Some(back) => n - back + 1,
            None if n <= NEAR_BACK => 0,
            None => self.place_behind(key, n - NEAR_BACK),
        };
        self.starts.insert(at, key);
        self.longest = self.longest.max(took_ns);
    }

    /// Where `key` goes among `starts[..=end]`, given that `starts[end]` is not below it: a search
    /// that gallops back from `end` (a drain hands over one connection's requests after another,
    /// so the place is usually a few dozen entries back, in memory still warm) and then bisects.
    fn place_behind(&self, key: (u64, u64), end: usize) -> usize {
        // `starts[hi]` is not below `key`; find `lo` with `starts[lo]` below it, or 0.
        let mut hi = end;
        let mut step = NEAR_BACK;
        let mut lo = loop {
            if hi <= step {
                break 0;
            }
            let probe = hi - step;
            if self.starts[probe] < key {
                break probe + 1;
            }
            hi = probe;
            step *= 2;
        };
        // The place is in `lo..=hi`: entries before `lo` are below `key`, `starts[hi]` is not.
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.starts[mid] < key {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    fn remove(&mut self, key: (u64, u64)) {
        if self.starts.front() != Some(&key) {
            self.gone.insert(key);
            return;
        }
        self.starts.pop_front();
        while let Some(front) = self.starts.front()
            && self.gone.remove(front)
        {
            self.starts.pop_front();
        }
    }

    /// Whether no served request is held.
    fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// Up to [`MAX_CANDIDATES`] served requests that started at or before `start_ns` and may still
    /// have been open then, nearest first.
    fn enclosing(served: Option<&Served>, start_ns: u64) -> impl Iterator<Item = u64> + '_ {
        served
            .into_iter()
            .flat_map(move |s| {
                let end = s
                    .starts
                    .partition_point(|&(started, _)| started <= start_ns);
                s.starts
                    .range(..end)
                    .rev()
                    .take_while(move |&&(started, _)| start_ns - started <= s.longest)
                    .filter(move |k| !s.gone.contains(k))
            })
            .take(MAX_CANDIDATES)
            .map(|&(_, id)| id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::{Resource, Status};
    use std::collections::HashMap;
    use std::sync::Arc;

    const MS: u64 = 1_000_000;

    fn span(kind: SpanKind, n: u8) -> Span {
        Span {
            trace_id: [n; 16],
            span_id: [n; 8],
            parent_span_id: None,
            trace_state: String::new(),
            name: format!("span {n}").into(),
            kind,
            start_unix_ns: 0,
            end_unix_ns: 0,
            attributes: Default::default(),
            status: Status::Unset,
            resource: Arc::new(Resource {
                service_name: "test".into(),
                pid: 1,
                attributes: Vec::new(),
            }),
        }
    }

    fn finished(
        kind: SpanKind,
        n: u8,
        (tgid, thread): (u32, u32),
        (start, end): (u64, u64),
        position: Option<ConnPosition>,
    ) -> Finished {
        Finished {
            span: span(kind, n),
            link: LinkInfo {
                tgid,
                thread,
                position,
                start_ns: start * MS,
                end_ns: end * MS,
                ..LinkInfo::default()
            },
        }
    }

    fn pos(port: u16, seq: u32) -> Option<ConnPosition> {
        Some(ConnPosition::TcpSeq {
            client: SocketAddr::from(([127, 0, 0, 1], port)),
            seq,
        })
    }

    fn run(linker: &mut Linker, spans: Vec<Finished>) -> HashMap<u8, Span> {
        let mut out = HashMap::new();
        let mut emit = |s: Span| {
            out.insert(s.span_id[0], s);
        };
        for (i, f) in spans.into_iter().enumerate() {
            linker.submit(f, i as u64 * MS, &mut emit);
        }
        linker.flush(&mut emit);
        assert!(linker.is_empty(), "flush forgets everything");
        assert!(linker.by_position.is_empty(), "and every position");
        out
    }

    fn linker() -> Linker {
        Linker::new(LinkConfig::default())
    }

    /// curl (pid 1) -> proxy server/client (pid 2, thread 20) -> backend (pid 3): arrival order is
    /// innermost first, as on a real host.
    #[test]
    fn chain_across_processes_and_inside_one() {
        let spans = vec![
            finished(SpanKind::Server, 4, (3, 30), (3, 4), pos(5000, 900)),
            finished(SpanKind::Client, 3, (2, 20), (2, 5), pos(5000, 900)),
            finished(SpanKind::Server, 2, (2, 20), (1, 6), pos(4000, 100)),
            finished(SpanKind::Client, 1, (1, 10), (0, 7), pos(4000, 100)),
        ];
        let out = run(&mut linker(), spans);
        assert_eq!(out.len(), 4);
        let trace = out[&1].trace_id;
        assert!(out.values().all(|s| s.trace_id == trace));
        assert_eq!(out[&1].parent_span_id, None);
        assert_eq!(out[&2].parent_span_id, Some([1; 8]));
        assert_eq!(out[&3].parent_span_id, Some([2; 8]));
        assert_eq!(out[&4].parent_span_id, Some([3; 8]));
    }

    /// Two positions whose digests collide share a slot: the slot's own position decides, so
    /// the server span of one is not made the child of the other's client span.
    #[test]
    fn colliding_position_digests_do_not_link() {
        let mut l = linker();
        let mut out = HashMap::new();
        let mut emit = |s: Span| {
            out.insert(s.span_id[0], s);
        };
        let a = pos(4000, 100).expect("position");
        let b = pos(4001, 100).expect("position");
        l.submit(
            finished(SpanKind::Client, 1, (1, 10), (0, 7), Some(a)),
            0,
            &mut emit,
        );
        // Make b's digest find a's slot, as a collision would.
        let slot = l.by_position.remove(&position_key(&a)).expect("a waits");
        l.by_position.insert(position_key(&b), slot);
        l.submit(
            finished(SpanKind::Server, 2, (2, 20), (1, 6), Some(b)),
            MS,
            &mut emit,
        );
        l.flush(&mut emit);
        assert_eq!(out[&2].parent_span_id, None);
        assert!(l.by_position.is_empty());
    }

    #[test]
    fn other_positions_do_not_link() {
        let spans = vec![
            finished(SpanKind::Server, 2, (2, 20), (1, 6), pos(4000, 101)),
            finished(SpanKind::Client, 1, (1, 10), (0, 7), pos(4000, 100)),
            finished(SpanKind::Server, 4, (2, 20), (1, 6), pos(4001, 100)),
        ];
        let out = run(&mut linker(), spans);
        assert!(out.values().all(|s| s.parent_span_id.is_none()));
    }

    /// Evidence digests tell parts apart by where they end, and are the same within the process.
    #[test]
    fn evidence_keeps_part_boundaries() {
        assert_eq!(Evidence::of(&["GET", "/a"]), Evidence::of(&["GET", "/a"]));
        assert_ne!(Evidence::of(&["GET", "/a"]), Evidence::of(&["GET /", "a"]));
        assert_ne!(Evidence::of(&["GET", "/a"]), Evidence::of(&["GET", "/b"]));
        assert_ne!(Evidence::of(&["ab"]), Evidence::of(&["ab", ""]));
    }

    /// Two requests open at once on one event-loop thread: the target decides, and without it
    /// the client span stays a root.
    #[test]
    fn event_loop_needs_evidence() {
        let mut a = finished(SpanKind::Server, 1, (2, 20), (0, 10), None);
        let mut b = finished(SpanKind::Server, 2, (2, 20), (1, 10), None);
        let mut c = finished(SpanKind::Client, 3, (2, 20), (2, 8), None);
        let d = finished(SpanKind::Client, 4, (2, 20), (3, 8), None);
        a.link.target = Some(Evidence::of(&["GET", "/a"]));
        b.link.target = Some(Evidence::of(&["GET", "/b"]));
        c.link.target = Some(Evidence::of(&["GET", "/b"]));
        let out = run(&mut linker(), vec![c, d, a, b]);
        assert_eq!(out[&3].parent_span_id, Some([2; 8]));
        assert_eq!(out[&3].trace_id, out[&2].trace_id);
        assert_eq!(out[&4].parent_span_id, None, "ambiguous stays a root");
    }

    /// A client span outside every served request, or on another thread without evidence, stays
    /// a root.
    #[test]
    fn no_enclosing_request_no_parent() {
        let spans = vec![
            finished(SpanKind::Client, 1, (2, 20), (0, 3), None),
            finished(SpanKind::Client, 2, (2, 21), (5, 6), None),
            finished(SpanKind::Server, 3, (2, 20), (4, 9), None),
        ];
        let out = run(&mut linker(), spans);
        assert_eq!(out[&1].parent_span_id, None);
        assert_eq!(out[&2].parent_span_id, None);
    }

    /// A header context is kept; a link into another trace than the header's is refused.
    #[test]
    fn header_trace_is_never_changed() {
        let mut s = finished(SpanKind::Server, 2, (2, 20), (1, 6), pos(4000, 100));
        s.span.trace_id = [9; 16];
        s.span.parent_span_id = Some([9; 8]);
        let mut c = finished(SpanKind::Client, 1, (1, 10), (0, 7), pos(4000, 100));
        c.span.trace_id = [8; 16];
        c.span.parent_span_id = Some([8; 8]);
        let out = run(&mut linker(), vec![s, c]);
        assert_eq!(out[&2].trace_id, [9; 16]);
        assert_eq!(out[&2].parent_span_id, Some([9; 8]));
        assert_eq!(out[&1].trace_id, [8; 16]);
    }

    /// The whole chain takes the trace id of a header at its top.
    #[test]
    fn chain_joins_the_header_trace() {
        let s = finished(SpanKind::Server, 2, (2, 20), (1, 6), pos(4000, 100));
        let mut c = finished(SpanKind::Client, 1, (1, 10), (0, 7), pos(4000, 100));
        c.span.trace_id = [8; 16];
        c.span.parent_span_id = Some([7; 8]);
        let out = run(&mut linker(), vec![s, c]);
        assert_eq!(out[&2].trace_id, [8; 16]);
        assert_eq!(out[&2].parent_span_id, Some([1; 8]));
        assert_eq!(out[&1].parent_span_id, Some([7; 8]));
    }

    /// Two agents, one per host, each seeing one end: the client's agent names its span after
    /// the request's position, the server's agent names the same id as parent, both in the trace
    /// the TCP option carried.
    #[test]
    fn across_hosts_by_tcp_option() {
        let kt = |in_band| TraceContext {
            trace_id: [7; 16],
            in_band,
            generated: !in_band,
        };
        let mut c = finished(SpanKind::Client, 1, (1, 10), (0, 7), pos(4000, 100));
        c.link.kernel_trace = Some(kt(false));
        let mut s = finished(SpanKind::Server, 2, (2, 20), (1, 6), pos(4000, 100));
        s.link.kernel_trace = Some(kt(true));
        let only = |out: HashMap<u8, Span>| out.into_values().next().expect("one span");
        let sender = only(run(&mut linker(), vec![c]));
        let receiver = only(run(&mut linker(), vec![s]));
        let wire = wire_span_id(pos(4000, 100).expect("position")).expect("wire id");
        assert_eq!(sender.span_id, wire);
        assert_eq!(sender.trace_id, [7; 16]);
        assert_eq!(receiver.parent_span_id, Some(wire));
        assert_eq!(receiver.trace_id, [7; 16]);
        assert_ne!(wire_span_id(pos(4000, 101).expect("position")), Some(wire));
    }

    /// A header context wins over the kernel's trace id.
    #[test]
    fn header_context_wins_over_tcp_option() {
        let mut s = finished(SpanKind::Server, 2, (2, 20), (1, 6), pos(4000, 100));
        s.span.trace_id = [9; 16];
        s.span.parent_span_id = Some([9; 8]);
        s.link.kernel_trace = Some(TraceContext {
            trace_id: [7; 16],
            in_band: true,
            generated: false,
        });
        let out = run(&mut linker(), vec![s]);
        assert_eq!(
            (out[&2].trace_id, out[&2].parent_span_id),
            ([9; 16], Some([9; 8]))
        );
    }

    #[test]
    fn disabled_passes_spans_through() {
        let mut l = Linker::new(LinkConfig {
            enabled: false,
            ..LinkConfig::default()
        });
        let mut n = 0;
        l.submit(
            finished(SpanKind::Server, 1, (1, 1), (0, 1), pos(1, 1)),
            0,
            &mut |_| n += 1,
        );
        assert_eq!((n, l.len()), (1, 0));
    }

    #[test]
    fn served_inserts_near_and_far_from_the_back_stay_sorted() {
        let mut s = Served::default();
        let mut keys = Vec::new();
        // In order, then a few behind the back, then one behind them all, past the short scan.
        let starts = (0..40u64)
            .map(|i| 100 + 10 * i)
            .chain([495, 481, 5, 250, 499]);
        for (id, start) in starts.enumerate() {
            s.insert(start, id as u64, 1);
            keys.push((start, id as u64));
        }
        keys.sort_unstable();
        assert_eq!(Vec::from(s.starts.clone()), keys);
    }

    #[test]
    fn served_inserts_at_every_distance_from_the_back_stay_sorted() {
        let mut s = Served::default();
        let mut keys = Vec::new();
        let mut id = 0u64;
        let mut put = |s: &mut Served, start: u64| {
            s.insert(start, id, 1);
            keys.push((start, id));
            id += 1;
        };
        // Batches of 512 requests on 16 connections, handed over one connection after another
        // (places from 0 to ~480 entries back), then starts spread over all that came before.
        for batch in 0..8u64 {
            for conn in 0..16 {
                for i in (conn..512).step_by(16) {
                    put(&mut s, 1_000 * batch + 2 * i);
                }
            }
        }
        let mut x = 12_345u64;
        for _ in 0..300 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            put(&mut s, (x >> 33) % 9_000);
        }
        // Equal starts order by id: a repeat of the smallest and of the largest key's start.
        put(&mut s, 0);
        put(&mut s, 9_000);
        keys.sort_unstable();
        assert_eq!(Vec::from(s.starts.clone()), keys);
    }

    #[test]
    fn served_requests_stay_sorted_by_start() {
        let mut s = Served::default();
        // Spans arrive in end order: a long request that started first arrives last.
        for (start, id, took) in [(20, 2, 5), (30, 3, 5), (10, 1, 40), (25, 4, 1)] {
            s.insert(start, id, took);
        }
        let order: Vec<u64> = s.starts.iter().map(|&(_, id)| id).collect();
        assert_eq!(order, [1, 2, 4, 3]);
        // Nearest start first, none that started later, none further back than the longest.
        let found: Vec<u64> = Served::enclosing(Some(&s), 26).collect();
        assert_eq!(found, [4, 2, 1]);
        // Behind the front, a removal only marks its key; the key leaves with the front.
        s.remove((20, 2));
        assert_eq!(s.starts.len(), 4);
        let found: Vec<u64> = Served::enclosing(Some(&s), 26).collect();
        assert_eq!(found, [4, 1]);
        s.remove((10, 1));
        assert_eq!(Vec::from(s.starts.clone()), [(25, 4), (30, 3)]);
        assert!(s.gone.is_empty());
        s.remove((99, 9));
        let found: Vec<u64> = Served::enclosing(Some(&s), 40).collect();
        assert_eq!(found, [3, 4]);
        s.remove((25, 4));
        s.remove((30, 3));
        assert!(s.is_empty());
    }

    /// Spans leave one window after arrival and are forgotten after two; the bound is kept.
    #[test]
    fn window_timing_and_bound() {
        let mut l = Linker::new(LinkConfig {
            max_spans: 3,
            ..LinkConfig::default()
        });
        let mut out = Vec::new();
        for n in 0..3u8 {
            l.submit(
                finished(SpanKind::Client, n, (1, 1), (0, 1), None),
                0,
                &mut |s| out.push(s),
            );
        }
        let w = 1_000 * MS;
        l.advance(w - 1, &mut |s| out.push(s));
        assert!(out.is_empty());
        l.advance(w, &mut |s| out.push(s));
        assert_eq!((out.len(), l.len()), (3, 3));
        l.advance(2 * w, &mut |s| out.push(s));
        assert_eq!(l.len(), 0);
        for n in 0..5u8 {
            l.submit(
                finished(SpanKind::Client, n, (1, 1), (0, 1), None),
                3 * w,
                &mut |s| out.push(s),
            );
        }
        assert!(l.len() <= 3, "held {}", l.len());
        assert_eq!(out.len(), 3 + 2);
    }
}

#[cfg(test)]
mod wire_tests {
    use super::*;

    /// The ids other agents compute for the same positions: changing them breaks linking across
    /// hosts running different agent versions.
    #[test]
    fn wire_span_id_is_fixed() {
        let seq = ConnPosition::TcpSeq {
            client: "10.1.2.3:40000".parse().expect("addr"),
            seq: 0xdead_beef,
        };
        let tls = ConnPosition::TlsOffset {
            client: "[fd00::1]:443".parse().expect("addr"),
            server: "[fd00::2]:8443".parse().expect("addr"),
            offset: 123_456_789,
        };
        let hex = |id: Option<[u8; 8]>| {
            id.expect("id")
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        assert_eq!(hex(wire_span_id(seq)), "0ec7678841bba3d3");
        assert_eq!(hex(wire_span_id(tls)), "a179e12e9c802c56");
    }
}
