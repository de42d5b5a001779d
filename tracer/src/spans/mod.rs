//! Span building: parsed exchanges become spans following the stable OpenTelemetry HTTP semantic
//! conventions, children of the W3C or B3 trace context the request carries.
//!
//! `error.type` values: the status code (`"500"`) when it marks an error; `no_response` when the
//! connection closed before any response status; `response_incomplete` when it closed after the
//! status but before the response ended. An exchange with part of its bytes missing from the capture
//! (`Outcome::Partial`) is judged by its status code alone.
//!
//! `url.scheme` is what the request says (absolute-form target, `Forwarded` / `X-Forwarded-Proto`
//! on the server side), else `https` when the exchange was read from TLS plaintext, else `http`.

pub mod db;
pub mod grpc;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use protocols::http1::HttpExchange;
use protocols::{Exchange, Outcome, Role};

use crate::metrics;
use crate::span::{Attributes, Resource, Span, SpanKind, Status};

/// How often the monotonic-to-wall-clock offset is measured again, so wall-clock steps are followed.
const CLOCK_RESYNC_NS: u64 = 60_000_000_000;
/// `error.type` when no response status was seen before the connection closed.
pub(crate) const ERROR_NO_RESPONSE: &str = "no_response";
/// `error.type` when the connection closed after the response status but before the response ended.
pub(crate) const ERROR_RESPONSE_INCOMPLETE: &str = "response_incomplete";
/// Methods known by default (RFC 9110 and PATCH), case-sensitive.
const DEFAULT_KNOWN_METHODS: &[&str] = &[
    "CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE",
];
/// Query parameters whose values are replaced by `REDACTED`, as the conventions recommend.
const REDACTED_QUERY_KEYS: &[&str] = &["AWSAccessKeyId", "Signature", "sig", "X-Goog-Signature"];
/// Longest W3C `tracestate` propagated, in bytes.
const MAX_TRACESTATE: usize = 512;
/// Most `tracestate` list members (W3C limit).
const MAX_TRACESTATE_MEMBERS: usize = 32;

/// Converts `CLOCK_MONOTONIC` nanoseconds (what `bpf_ktime_get_ns` returns) to Unix epoch nanoseconds.
pub struct Clock {
    /// Unix time minus monotonic time, ns.
    offset_ns: AtomicI64,
    /// Monotonic time of the last measurement, ns.
    synced_at_ns: AtomicU64,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    /// A clock measured now; it measures itself again every minute of converted time.
    pub fn new() -> Self {
        let (offset, at) = measure_offset();
        Clock {
            offset_ns: AtomicI64::new(offset),
            synced_at_ns: AtomicU64::new(at),
        }
    }

    /// Unix epoch ns of the monotonic instant `mono_ns`.
    pub fn to_unix_ns(&self, mono_ns: u64) -> u64 {
        let synced = self.synced_at_ns.load(Ordering::Relaxed);
        if mono_ns.saturating_sub(synced) > CLOCK_RESYNC_NS
            && self
                .synced_at_ns
                .compare_exchange(synced, mono_ns, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let (offset, at) = measure_offset();
            self.offset_ns.store(offset, Ordering::Relaxed);
            self.synced_at_ns.store(at, Ordering::Relaxed);
        }
        let unix = i128::from(mono_ns) + i128::from(self.offset_ns.load(Ordering::Relaxed));
        u64::try_from(unix.max(0)).unwrap_or(u64::MAX)
    }
}

/// (Unix minus monotonic ns, monotonic ns of the measurement), from the tightest of a few samples.
fn measure_offset() -> (i64, u64) {
    let mut best: Option<(u64, i64, u64)> = None;
    for _ in 0..5 {
        let before = clock_ns(libc::CLOCK_MONOTONIC);
        let real = clock_ns(libc::CLOCK_REALTIME);
        let after = clock_ns(libc::CLOCK_MONOTONIC);
        let width = after.saturating_sub(before);
        let mid = before + width / 2;
        let offset = i64::try_from(i128::from(real) - i128::from(mid)).unwrap_or(0);
        if best.is_none_or(|(w, _, _)| width < w) {
            best = Some((width, offset, mid));
        }
    }
    best.map(|(_, offset, mid)| (offset, mid)).unwrap_or((0, 0))
}

fn clock_ns(id: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec. clock_gettime cannot fail for the clock ids used
    // here; if it did, `ts` would stay zero.
    unsafe { libc::clock_gettime(id, &mut ts) };
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

/// Both ends of a TCP connection, seen from the traced process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnAddrs {
    /// The traced process's end.
    pub local: SocketAddr,
    /// The peer's end.
    pub remote: SocketAddr,
    /// The exchange was read from the connection's TLS plaintext.
    pub tls: bool,
}

/// The HTTP/1 request header fields span building and linking read; the parser keeps only
/// these (copying every field of every request and response was ~4 % of the agent's CPU).
/// A new attribute that reads a header must add its name here.
pub(crate) fn http1_header_used(name: &str) -> bool {
    // Asked for every field of every message (nginx sends 8 per response, none of them used):
    // a field whose length no used name has is turned away by one bit test.
    const USED_LENGTHS: u64 = {
        let mut mask = 0u64;
        let mut i = 0;
        while i < USED.len() {
            mask |= 1 << USED[i].len();
            i += 1;
        }
        mask
    };
    if name.len() >= 64 || USED_LENGTHS & (1 << name.len()) == 0 {
        return false;
    }
    USED.iter().any(|u| u.eq_ignore_ascii_case(name))
}

/// The names [`http1_header_used`] accepts (lowercase, each shorter than 64 bytes).
const USED: &[&str] = &[
    "host",
    "user-agent",
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "forwarded",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-for",
    "x-request-id",
];

/// Trace context received from a remote caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteContext {
    /// Trace id (never all zero).
    pub trace_id: [u8; 16],
    /// The caller's span id, parent of the span being built (never all zero).
    pub span_id: [u8; 8],
    /// W3C `tracestate` to carry along (empty when none or invalid).
    pub trace_state: String,
}

/// The trace context in request headers: W3C `traceparent` (with `tracestate`), else B3 single
/// (`b3`), else B3 multi (`X-B3-TraceId` / `X-B3-SpanId`). `headers` looks a header up by name,
/// case-insensitively.
pub fn extract_context<'a>(headers: impl Fn(&str) -> Option<&'a str>) -> Option<RemoteContext> {
    if let Some((trace_id, span_id)) = headers("traceparent").and_then(parse_traceparent) {
        let trace_state = headers("tracestate")
            .map(str::trim)
            .filter(|s| valid_tracestate(s))
            .unwrap_or("");
        return Some(RemoteContext {
            trace_id,
            span_id,
            trace_state: trace_state.to_owned(),
        });
    }
    let (trace_id, span_id) = headers("b3").and_then(parse_b3_single).or_else(|| {
        let trace_id = b3_trace_id(headers("x-b3-traceid")?.trim())?;
        let span_id = hex_id::<8>(headers("x-b3-spanid")?.trim())?;
        Some((trace_id, span_id))
    })?;
    Some(RemoteContext {
        trace_id,
        span_id,
        trace_state: String::new(),
    })
}

/// `version-traceid-parentid-flags`, lower-case hex. Versions above 00 may append `-fields`.
fn parse_traceparent(value: &str) -> Option<([u8; 16], [u8; 8])> {
    let v = value.trim();
    if v.len() < 55 || !v.is_ascii() {
        return None;
    }
    let b = v.as_bytes();
    let version = &v[0..2];
    if !is_lower_hex(version) || version == "ff" || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    if !is_lower_hex(&v[53..55]) {
        return None;
    }
    // Version 00 has exactly four fields; later versions may add fields after another dash.
    if (version == "00" && v.len() != 55) || (v.len() > 55 && b[55] != b'-') {
        return None;
    }
    Some((hex_id::<16>(&v[3..35])?, hex_id::<8>(&v[36..52])?))
}

/// `b3: traceid-spanid[-sampled[-parentspanid]]`; a bare sampling decision carries no context.
fn parse_b3_single(value: &str) -> Option<([u8; 16], [u8; 8])> {
    let mut parts = value.trim().split('-');
    let trace_id = b3_trace_id(parts.next()?)?;
    let span_id = hex_id::<8>(parts.next()?)?;
    if let Some(sampled) = parts.next()
        && !matches!(sampled, "0" | "1" | "d")
    {
        return None;
    }
    if let Some(parent) = parts.next() {
        hex_id::<8>(parent)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some((trace_id, span_id))
}

/// A B3 trace id: 32 hex digits, or 16 left-padded with zeros.
fn b3_trace_id(s: &str) -> Option<[u8; 16]> {
    if s.len() == 16 {
        let low = hex_id::<8>(s)?;
        let mut id = [0u8; 16];
        id[8..].copy_from_slice(&low);
        Some(id)
    } else {
        hex_id::<16>(s)
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

/// `N` bytes from exactly `2N` lower-case hex digits, rejecting the all-zero (invalid) id.
fn hex_id<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !is_lower_hex(s) {
        return None;
    }
    let mut id = [0u8; N];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    id.iter().any(|&b| b != 0).then_some(id)
}

/// W3C `tracestate` syntax: at most 32 `key=value` members with unique keys.
fn valid_tracestate(s: &str) -> bool {
    if s.is_empty() || s.len() > MAX_TRACESTATE {
        return false;
    }
    let mut keys: Vec<&str> = Vec::new();
    for member in s.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        let Some((key, value)) = member.split_once('=') else {
            return false;
        };
        let key_ok = key.len() <= 256
            && key
                .bytes()
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            && key.bytes().all(|c| {
                c.is_ascii_lowercase()
                    || c.is_ascii_digit()
                    || matches!(c, b'_' | b'-' | b'*' | b'/' | b'@')
            });
        let value_ok = !value.is_empty()
            && value.len() <= 256
            && !value.ends_with(' ')
            && value
                .bytes()
                .all(|c| (0x20..=0x7e).contains(&c) && c != b',' && c != b'=');
        if !key_ok || !value_ok || keys.contains(&key) || keys.len() == MAX_TRACESTATE_MEMBERS {
            return false;
        }
        keys.push(key);
    }
    !keys.is_empty()
}

/// A random id that is not all zero.
///
/// Ids need to be unique and unpredictable enough not to collide across hosts, not secret: a
/// per-thread wyrand generator seeded from the OS is several times cheaper per id than the
/// ChaCha generator behind `rand::random` (~2 % of the agent's CPU at 10k req/s).
pub(crate) fn random_id<const N: usize>() -> [u8; N] {
    thread_local! {
        static STATE: std::cell::Cell<u64> = std::cell::Cell::new(rand::random());
    }
    STATE.with(|state| {
        let mut id = [0u8; N];
        loop {
            for chunk in id.chunks_mut(8) {
                let s = state.get().wrapping_add(0xa076_1d64_78bd_642f);
                state.set(s);
                let t = u128::from(s) * u128::from(s ^ 0xe703_7ed1_a0b4_28db);
                let word = ((t >> 64) as u64) ^ (t as u64);
                chunk.copy_from_slice(&word.to_le_bytes()[..chunk.len()]);
            }
            if id.iter().any(|&b| b != 0) {
                return id;
            }
        }
    })
}

/// The known HTTP methods: `OTEL_INSTRUMENTATION_HTTP_KNOWN_METHODS` of the agent's environment
/// (comma-separated, a full override), else the defaults.
pub(crate) fn known_methods() -> &'static [String] {
    static KNOWN: OnceLock<Vec<String>> = OnceLock::new();
    KNOWN.get_or_init(|| {
        parse_known_methods(
            std::env::var("OTEL_INSTRUMENTATION_HTTP_KNOWN_METHODS")
                .ok()
                .as_deref(),
        )
    })
}

fn parse_known_methods(var: Option<&str>) -> Vec<String> {
    let from_env: Vec<String> = var
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(str::to_owned)
        .collect();
    if from_env.is_empty() {
        DEFAULT_KNOWN_METHODS
            .iter()
            .map(|m| (*m).to_owned())
            .collect()
    } else {
        from_env
    }
}

/// Host and optional port of an authority (`host`, `host:port`, `[v6]:port`); IPv6 without brackets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Authority<'a> {
    pub(crate) host: &'a str,
    pub(crate) port: Option<u16>,
}

pub(crate) fn parse_authority(s: &str) -> Option<Authority<'_>> {
    let s = s.trim();
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':')?.parse().ok()?)),
        }
    } else {
        match s.rsplit_once(':') {
            // More than one colon without brackets: a bare IPv6 address.
            Some((h, _)) if h.contains(':') => (s, None),
            Some((h, p)) => (h, Some(p.parse().ok()?)),
            None => (s, None),
        }
    };
    let bad = |c: char| {
        c.is_whitespace() || c.is_control() || matches!(c, '/' | '@' | '?' | '#' | '[' | ']')
    };
    (!host.is_empty() && !host.contains(bad)).then_some(Authority { host, port })
}

/// The request target split up (RFC 9112 §3.2 forms).
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Target<'a> {
    /// Scheme of an absolute-form target, lower-cased.
    pub(crate) scheme: Option<String>,
    /// Authority of an absolute- or authority-form target.
    pub(crate) authority: Option<Authority<'a>>,
    /// An absolute-form target carried credentials; `Some(true)` when with a password.
    pub(crate) credentials: Option<bool>,
    /// Path; `None` for asterisk- and authority-form.
    pub(crate) path: Option<&'a str>,
    /// Query, without `?`.
    pub(crate) query: Option<&'a str>,
}

fn parse_target<'a>(target: &'a str, method: &str) -> Target<'a> {
    let without_fragment = target.split('#').next().unwrap_or(target);
    let split_query = |s: &'a str| match s.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (s, None),
    };
    if target == "*" {
        return Target::default();
    }
    if method == "CONNECT" {
        return Target {
            authority: parse_authority(target),
            ..Target::default()
        };
    }
    if let Some((scheme, rest)) = without_fragment.split_once("://")
        && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    {
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (path, query) = split_query(tail);
        return Target {
            scheme: Some(scheme.to_ascii_lowercase()),
            authority: parse_authority(hostport),
            credentials: userinfo.map(|u| u.contains(':')),
            path: Some(if path.is_empty() { "/" } else { path }),
            query,
        };
    }
    let (path, query) = split_query(without_fragment);
    Target {
        path: Some(path),
        query,
        ..Target::default()
    }
}

/// The query with the values of [`REDACTED_QUERY_KEYS`] replaced by `REDACTED`.
fn redact_query(query: &str) -> String {
    let mut out = String::with_capacity(query.len());
    push_redacted_query(&mut out, query);
    out
}

/// Appends the query with the values of [`REDACTED_QUERY_KEYS`] replaced by `REDACTED`.
fn push_redacted_query(out: &mut String, query: &str) {
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((k, _)) if REDACTED_QUERY_KEYS.contains(&k) => {
                out.push_str(k);
                out.push_str("=REDACTED");
            }
            _ => out.push_str(pair),
        }
    }
}

/// `tls.protocol.name` and `tls.protocol.version` of a span read from TLS plaintext whose
/// handshake was seen.
pub fn tls_attributes(version: protocols::tls::TlsVersion, attrs: &mut Attributes) {
    attrs.push_str("tls.protocol.name", version.protocol_name());
    attrs.push_str("tls.protocol.version", version.protocol_version());
}

/// `https` for an exchange read from TLS plaintext, else `http`.
fn transport_scheme(addrs: Option<&ConnAddrs>) -> &'static str {
    if addrs.is_some_and(|a| a.tls) {
        "https"
    } else {
        "http"
    }
}

fn default_port(scheme: &str) -> u16 {
    if scheme == "https" { 443 } else { 80 }
}

/// A host as written in a URL: IPv6 in brackets.
fn push_url_host(out: &mut String, host: &str) {
    if host.contains(':') {
        out.push('[');
        out.push_str(host);
        out.push(']');
    } else {
        out.push_str(host);
    }
}

/// Appends a port in decimal, without the formatting machinery (one per client span).
fn push_port(out: &mut String, port: u16) {
    let mut buf = [0u8; 5];
    let mut at = buf.len();
    let mut n = port;
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    out.push_str(std::str::from_utf8(&buf[at..]).unwrap_or_default());
}

/// Slots of [`push_endpoints`]' per-thread cache.
const ENDPOINT_SLOTS: usize = 256;

/// A connection's endpoint attributes, encoded.
struct EndpointAttributes {
    local: SocketAddr,
    remote: SocketAddr,
    /// `network.peer.*` and `network.local.*`, shared by the spans ([`Attributes::share`]).
    network: Arc<[u8]>,
    /// The same followed by `client.address` and `client.port` of the remote end (a server's
    /// client).
    with_client: Arc<[u8]>,
}

thread_local! {
    /// Endpoint attributes by connection, direct-mapped: every span of a connection carries the
    /// same ones, and formatting two addresses and encoding six attributes per span was ~5 % of
    /// the agent's CPU at 10k req/s. A slot holds the last connection that hashed to it.
    static ENDPOINTS: std::cell::RefCell<Vec<Option<EndpointAttributes>>> =
        std::cell::RefCell::new((0..ENDPOINT_SLOTS).map(|_| None).collect());
}

/// Adds `network.peer.*` and `network.local.*` of the connection and, with `client`, the
/// remote end as `client.address` and `client.port`, after the span's own attributes, as a
/// block the connection's spans share.
pub(crate) fn push_endpoints(attrs: &mut Attributes, a: &ConnAddrs, client: bool) {
    use std::hash::BuildHasher as _;
    let slot =
        crate::fxhash::FxBuild::default().hash_one((a.local, a.remote)) as usize % ENDPOINT_SLOTS;
    ENDPOINTS.with_borrow_mut(|slots| {
        let hit = slots[slot]
            .as_ref()
            .is_some_and(|e| e.local == a.local && e.remote == a.remote);
        if !hit {
            let remote_ip = ip_string(a.remote.ip());
            let mut network = Attributes::with_capacity(176);
            network.push_str("network.peer.address", &remote_ip);
            network.push_int("network.peer.port", i64::from(a.remote.port()));
            network.push_str("network.local.address", &ip_string(a.local.ip()));
            network.push_int("network.local.port", i64::from(a.local.port()));
            let shared = network.shared_wire();
            network.push_str("client.address", &remote_ip);
            network.push_int("client.port", i64::from(a.remote.port()));
            slots[slot] = Some(EndpointAttributes {
                local: a.local,
                remote: a.remote,
                network: shared,
                with_client: network.shared_wire(),
            });
        }
        if let Some(e) = &slots[slot] {
            attrs.share(if client { &e.with_client } else { &e.network });
        }
    });
}

/// An IP in its usual text form (IPv4-mapped IPv6 shown as IPv4).
pub(crate) fn ip_string(ip: IpAddr) -> compact_str::CompactString {
    use compact_str::ToCompactString as _;
    match ip.to_canonical() {
        // Every span formats one or two addresses: IPv4 digits are written straight into a
        // stack buffer, without the formatting machinery (at most 15 characters: inline).
        IpAddr::V4(v4) => {
            let mut buf = [0u8; 15];
            let mut len = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[len] = b'.';
                    len += 1;
                }
                if octet >= 100 {
                    buf[len] = b'0' + octet / 100;
                    len += 1;
                }
                if octet >= 10 {
                    buf[len] = b'0' + octet / 10 % 10;
                    len += 1;
                }
                buf[len] = b'0' + octet % 10;
                len += 1;
            }
            // Only ASCII digits and dots were written.
            compact_str::CompactString::from_utf8(&buf[..len]).unwrap_or_default()
        }
        // At most 39 characters, usually inline: no allocation.
        v6 => v6.to_compact_string(),
    }
}

/// The first element of a comma-separated header value.
fn first_element(value: &str) -> &str {
    value.split(',').next().unwrap_or(value).trim()
}

/// Parameter `name` of the first element of a `Forwarded` header (RFC 7239), unquoted.
fn forwarded_param<'a>(forwarded: &'a str, name: &str) -> Option<&'a str> {
    first_element(forwarded).split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().trim_matches('"'))
    })
}

/// An address in a forwarding header (`ip`, `ip:port`, `[v6]:port`); obfuscated names give `None`.
fn forwarded_ip(value: &str) -> Option<(IpAddr, Option<u16>)> {
    let a = parse_authority(value)?;
    Some((a.host.parse().ok()?, a.port))
}

/// The span of one HTTP/1.x exchange; `addrs` when the connection's endpoints are known.
pub fn http_span(
    ex: &Exchange,
    http: &HttpExchange,
    addrs: Option<&ConnAddrs>,
    resource: Arc<Resource>,
    clock: &Clock,
) -> Span {
    let kind = match ex.role {
        Role::Server => SpanKind::Server,
        Role::Client => SpanKind::Client,
    };
    let mut attributes = Attributes::scratch();

    let known = known_methods().contains(&http.method);
    // Inline (no allocation): method names are short.
    let name = compact_str::CompactString::from(if known { http.method.as_str() } else { "HTTP" });
    if known {
        attributes.push_str("http.request.method", &http.method);
    } else {
        attributes.push_str("http.request.method", "_OTHER");
        attributes.push_str("http.request.method_original", &http.method);
    }

    let target = parse_target(&http.target, &http.method);
    let client_is_peer = match kind {
        SpanKind::Server => server_attributes(http, &target, addrs, &mut attributes),
        SpanKind::Client => {
            client_attributes(http, &target, addrs, &mut attributes);
            false
        }
    };

    attributes.push_str("network.protocol.name", "http");
    let version: compact_str::CompactString = match http.version {
        0 => "1.0".into(),
        1 => "1.1".into(),
        v => compact_str::format_compact!("1.{v}"),
    };
    attributes.push_str("network.protocol.version", &version);
    if let Some(a) = addrs {
        push_endpoints(&mut attributes, a, client_is_peer);
    }
    let status = exchange_attributes(
        &mut attributes,
        kind,
        ex.outcome,
        http.request_header("user-agent"),
        http.status,
        (http.request_body_size, http.response_body_size),
    );

    let remote = extract_context(|h| http.request_header(h));
    let (trace_id, parent_span_id, trace_state) = match remote {
        Some(ctx) => {
            metrics::add("spans_with_remote_parent_total", "", 1);
            (ctx.trace_id, Some(ctx.span_id), ctx.trace_state)
        }
        None => (random_id(), None, String::new()),
    };
    let start_unix_ns = clock.to_unix_ns(ex.start_ns);
    Span {
        trace_id,
        span_id: random_id(),
        parent_span_id,
        trace_state,
        name,
        kind,
        start_unix_ns,
        end_unix_ns: clock.to_unix_ns(ex.end_ns).max(start_unix_ns),
        attributes: attributes.finish(),
        status,
        resource,
    }
}

/// The attributes HTTP/1 and HTTP/2 spans share once the addresses are in: user agent, body sizes,
/// status code and `error.type`; returns the span status.
pub(crate) fn exchange_attributes(
    attributes: &mut Attributes,
    kind: SpanKind,
    outcome: Outcome,
    user_agent: Option<&str>,
    status_code: Option<u16>,
    (request_body, response_body): (u64, u64),
) -> Status {
    if let Some(ua) = user_agent {
        attributes.push_str("user_agent.original", ua);
    }
    attributes.push_int(
        "http.request.body.size",
        i64::try_from(request_body).unwrap_or(i64::MAX),
    );
    if let Some(code) = status_code {
        attributes.push_int("http.response.status_code", i64::from(code));
        attributes.push_int(
            "http.response.body.size",
            i64::try_from(response_body).unwrap_or(i64::MAX),
        );
    }
    let (status, error_type) = classify(kind, status_code, outcome);
    if let Some(error_type) = error_type {
        attributes.push_str("error.type", &error_type);
    }
    status
}

/// Server side: URL parts, the server name the client asked for, and the original client.
/// Returns true when the client is the connection's remote end, whose `client.*` attributes
/// [`push_endpoints`] adds.
pub(crate) fn server_attributes(
    http: &HttpExchange,
    target: &Target<'_>,
    addrs: Option<&ConnAddrs>,
    attrs: &mut Attributes,
) -> bool {
    let forwarded = http.request_header("forwarded");
    let forwarded_proto = forwarded
        .and_then(|f| forwarded_param(f, "proto"))
        .or_else(|| http.request_header("x-forwarded-proto").map(first_element))
        .map(str::to_ascii_lowercase)
        .filter(|p| p == "http" || p == "https");
    let scheme: &str = target
        .scheme
        .as_deref()
        .or(forwarded_proto.as_deref())
        .unwrap_or_else(|| transport_scheme(addrs));

    // Per the conventions: the original host from a proxy, then the target's authority, then Host.
    let forwarded_host = forwarded
        .and_then(|f| forwarded_param(f, "host"))
        .or_else(|| http.request_header("x-forwarded-host").map(first_element))
        .and_then(parse_authority);
    let server = if let Some(a) = forwarded_host.or(target.authority) {
        Some((
            compact_str::CompactString::from(a.host),
            a.port.unwrap_or_else(|| default_port(scheme)),
        ))
    } else if let Some(a) = http.request_header("host").and_then(parse_authority) {
        // Without a port in Host, the port the request arrived on is the one the client used.
        let port = a
            .port
            .or(addrs.map(|c| c.local.port()))
            .unwrap_or_else(|| default_port(scheme));
        Some((a.host.into(), port))
    } else {
        addrs.map(|c| (ip_string(c.local.ip()), c.local.port()))
    };

    attrs.push_str("url.scheme", scheme);
    if let Some(path) = target.path {
        attrs.push_str("url.path", path);
    }
    if let Some(query) = target.query.filter(|q| !q.is_empty()) {
        attrs.push_str("url.query", &redact_query(query));
    }
    if let Some((host, port)) = server {
        attrs.push_str("server.address", &host);
        attrs.push_int("server.port", i64::from(port));
    }

    let original_client = forwarded
        .and_then(|f| forwarded_param(f, "for"))
        .or_else(|| http.request_header("x-forwarded-for").map(first_element))
        .and_then(forwarded_ip);
    match (original_client, addrs) {
        (Some((ip, port)), _) => {
            attrs.push_str("client.address", &ip_string(ip));
            if let Some(port) = port {
                attrs.push_int("client.port", i64::from(port));
            }
        }
        // The connection's remote end, added with the other endpoint attributes.
        (None, Some(_)) => return true,
        (None, None) => {}
    }
    false
}

/// Client side: the server asked for and the full URL.
pub(crate) fn client_attributes(
    http: &HttpExchange,
    target: &Target<'_>,
    addrs: Option<&ConnAddrs>,
    attrs: &mut Attributes,
) {
    let scheme = target
        .scheme
        .as_deref()
        .unwrap_or_else(|| transport_scheme(addrs));
    // (server.address, server.port, whether url.full names the port)
    let server = if let Some(a) = target.authority {
        Some((
            compact_str::CompactString::from(a.host),
            a.port.unwrap_or_else(|| default_port(scheme)),
            a.port.is_some(),
        ))
    } else if let Some(a) = http.request_header("host").and_then(parse_authority) {
        let port = a
            .port
            .or(addrs.map(|c| c.remote.port()))
            .unwrap_or_else(|| default_port(scheme));
        Some((a.host.into(), port, a.port.is_some()))
    } else {
        addrs.map(|c| {
            let port = c.remote.port();
            (ip_string(c.remote.ip()), port, port != default_port(scheme))
        })
    };

    attrs.push_str("url.scheme", scheme);
    if let Some((host, port, port_in_url)) = server {
        let credentials = match target.credentials {
            Some(true) => "REDACTED:REDACTED@",
            Some(false) => "REDACTED@",
            None => "",
        };
        let path = target.path.unwrap_or("");
        let query = target.query.unwrap_or("");
        // Built by appending (one allocation, no formatting machinery): every client span has one.
        let mut url = String::with_capacity(
            scheme.len() + 3 + credentials.len() + host.len() + 8 + path.len() + query.len() + 1,
        );
        url.push_str(scheme);
        url.push_str("://");
        url.push_str(credentials);
        push_url_host(&mut url, &host);
        if port_in_url {
            url.push(':');
            push_port(&mut url, port);
        }
        url.push_str(path);
        if let Some(query) = target.query {
            url.push('?');
            push_redacted_query(&mut url, query);
        }
        attrs.push_str("url.full", &url);
        attrs.push_str("server.address", &host);
        attrs.push_int("server.port", i64::from(port));
    }
}

/// Span status and `error.type` from the status code and how the exchange ended.
pub(crate) fn classify(
    kind: SpanKind,
    status: Option<u16>,
    outcome: Outcome,
) -> (Status, Option<String>) {
    if let Some(code) = status {
        let error = match kind {
            // Codes outside 100-599 cannot be interpreted: an error on both sides.
            _ if !(100..=599).contains(&code) => true,
            SpanKind::Server => code >= 500,
            SpanKind::Client => code >= 400,
        };
        if error {
            return (Status::Error(None), Some(code.to_string()));
        }
    }
    match (outcome, status) {
        (Outcome::NoResponse, None) => (
            Status::Error(Some("connection closed before a response".to_owned())),
            Some(ERROR_NO_RESPONSE.to_owned()),
        ),
        (Outcome::NoResponse, Some(_)) => (
            Status::Error(Some(
                "connection closed before the response ended".to_owned(),
            )),
            Some(ERROR_RESPONSE_INCOMPLETE.to_owned()),
        ),
        _ => (Status::Unset, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::{KeyValue, ValueRef};
    use protocols::Detail;
    use std::time::{SystemTime, UNIX_EPOCH};

    #[test]
    fn used_headers_are_found_in_any_case_and_others_are_not() {
        for name in USED {
            assert!(http1_header_used(name));
            assert!(http1_header_used(&name.to_ascii_uppercase()));
        }
        for name in [
            "date",
            "etag",
            "content-type",
            "connection",
            "x-b3-sampled",
            "",
        ] {
            assert!(!http1_header_used(name), "{name}");
        }
        assert!(!http1_header_used(&"x".repeat(200)));
    }

    /// The per-thread endpoint cache gives each connection its own attributes, whether its slot
    /// held it already or another connection.
    #[test]
    fn cached_endpoints_match_direct_encoding() {
        let conns: Vec<ConnAddrs> = (0..600u16)
            .map(|i| ConnAddrs {
                local: SocketAddr::from(([10, 0, 0, 1], 8080)),
                remote: SocketAddr::from(([10, 1, (i / 256) as u8, i as u8], 40000 + i)),
                tls: false,
            })
            .collect();
        for a in conns
            .iter()
            .chain(conns.iter().rev())
            .chain(conns.iter().step_by(7))
        {
            for client in [false, true] {
                let mut cached = Attributes::default();
                push_endpoints(&mut cached, a, client);
                let mut direct = Attributes::default();
                direct.push_str("network.peer.address", &a.remote.ip().to_string());
                direct.push_int("network.peer.port", i64::from(a.remote.port()));
                direct.push_str("network.local.address", &a.local.ip().to_string());
                direct.push_int("network.local.port", i64::from(a.local.port()));
                if client {
                    direct.push_str("client.address", &a.remote.ip().to_string());
                    direct.push_int("client.port", i64::from(a.remote.port()));
                }
                assert!(cached == direct, "{a:?} client={client}");
            }
        }
    }

    #[test]
    fn ports_match_the_standard_formatting() {
        for port in [0u16, 7, 10, 99, 100, 8080, 10000, 65535] {
            let mut out = String::from(":");
            push_port(&mut out, port);
            assert_eq!(out, format!(":{port}"));
        }
    }

    #[test]
    fn ip_strings_match_the_standard_formatting() {
        for v4 in [
            [0, 0, 0, 0],
            [127, 0, 0, 1],
            [10, 9, 99, 100],
            [255, 255, 255, 255],
            [1, 20, 200, 109],
        ] {
            let ip = IpAddr::from(v4);
            assert_eq!(ip_string(ip), ip.to_string());
        }
        let mapped: IpAddr = "::ffff:192.168.1.20".parse().unwrap();
        assert_eq!(ip_string(mapped), "192.168.1.20");
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(ip_string(v6), "2001:db8::1");
    }

    fn resource() -> Arc<Resource> {
        Arc::new(Resource {
            service_name: "svc".to_owned(),
            pid: 1,
            attributes: vec![KeyValue::str("service.name", "svc")],
        })
    }

    /// A clock with a fixed offset that never measures itself again.
    fn fixed_clock(offset_ns: i64) -> Clock {
        Clock {
            offset_ns: AtomicI64::new(offset_ns),
            synced_at_ns: AtomicU64::new(u64::MAX),
        }
    }

    fn request(method: &str, target: &str, headers: &[(&str, &str)]) -> HttpExchange {
        HttpExchange {
            method: method.to_owned(),
            target: target.to_owned(),
            version: 1,
            request_headers: headers.iter().copied().collect(),
            request_body_size: 0,
            status: Some(200),
            response_headers: Default::default(),
            response_body_size: 0,
        }
    }

    fn build(role: Role, outcome: Outcome, http: &HttpExchange, addrs: Option<&ConnAddrs>) -> Span {
        let ex = Exchange {
            role,
            start_ns: 1_000,
            end_ns: 5_000,
            outcome,
            request_offset: 0,
            request_thread: 0,
            detail: Detail::Http(http.clone()),
        };
        http_span(
            &ex,
            http,
            addrs,
            resource(),
            &fixed_clock(1_700_000_000_000_000_000),
        )
    }

    fn int(span: &Span, key: &str) -> Option<i64> {
        match span.attributes.get(key) {
            Some(ValueRef::Int(i)) => Some(i),
            _ => None,
        }
    }

    fn addrs(local: &str, remote: &str) -> ConnAddrs {
        ConnAddrs {
            local: local.parse().expect("local"),
            remote: remote.parse().expect("remote"),
            tls: false,
        }
    }

    /// Every header a span reads passes the parser's filter: spans built from filtered and
    /// unfiltered requests are the same. Extend these requests when an attribute reads a new
    /// header.
    #[test]
    fn the_header_filter_keeps_what_spans_read() {
        const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sets: [&[(&str, &str)]; 3] = [
            &[
                ("Host", "shop.example:8443"),
                ("User-Agent", "curl/8"),
                ("traceparent", TP),
                ("tracestate", "a=1"),
                ("Forwarded", "for=192.0.2.60;proto=https;host=front.example"),
                ("X-Request-ID", "r1"),
                ("Accept", "*/*"),
            ],
            &[
                ("host", "shop.example"),
                ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
                ("X-Forwarded-Proto", "https"),
                ("X-Forwarded-Host", "front.example"),
                ("X-Forwarded-For", "198.51.100.7, 10.0.0.1"),
                ("Cookie", "a=b"),
            ],
            &[
                ("HOST", "[2001:db8::1]:8080"),
                ("X-B3-TraceId", "463ac35c9f6413ad48485a3953bb6124"),
                ("X-B3-SpanId", "a2fb4a1d1a96d312"),
            ],
        ];
        let a = addrs("10.0.0.2:8080", "10.0.0.9:40000");
        for headers in sets {
            let kept: Vec<_> = headers
                .iter()
                .copied()
                .filter(|(name, _)| http1_header_used(name))
                .collect();
            assert!(kept.len() < headers.len() || headers.len() == 3);
            for role in [Role::Server, Role::Client] {
                let all = build(
                    role,
                    Outcome::Complete,
                    &request("GET", "/p?q=1", headers),
                    Some(&a),
                );
                let some = build(
                    role,
                    Outcome::Complete,
                    &request("GET", "/p?q=1", &kept),
                    Some(&a),
                );
                assert_eq!(all.attributes, some.attributes, "{headers:?}");
                assert_eq!(
                    (all.trace_id, all.parent_span_id, &all.trace_state),
                    (some.trace_id, some.parent_span_id, &some.trace_state)
                );
                assert!(all.parent_span_id.is_some());
            }
        }
    }

    #[test]
    fn server_span_attributes() {
        let mut http = request(
            "POST",
            "/api/orders?id=7&sig=secret#frag",
            &[("Host", "shop.example:8443"), ("User-Agent", "curl/8.5")],
        );
        http.version = 0;
        http.request_body_size = 12;
        http.response_body_size = 34;
        http.status = Some(201);
        let conn = addrs("10.0.0.1:8080", "[::ffff:10.0.0.9]:51000");
        let span = build(Role::Server, Outcome::Complete, &http, Some(&conn));
        assert_eq!(span.kind, SpanKind::Server);
        assert_eq!(span.name, "POST");
        assert_eq!(span.attr_str("http.request.method"), Some("POST"));
        assert_eq!(span.attr_str("http.request.method_original"), None);
        assert_eq!(span.attr_str("url.scheme"), Some("http"));
        assert_eq!(span.attr_str("url.path"), Some("/api/orders"));
        assert_eq!(span.attr_str("url.query"), Some("id=7&sig=REDACTED"));
        assert_eq!(span.attr_str("url.full"), None);
        assert_eq!(span.attr_str("server.address"), Some("shop.example"));
        assert_eq!(int(&span, "server.port"), Some(8443));
        assert_eq!(span.attr_str("client.address"), Some("10.0.0.9"));
        assert_eq!(int(&span, "client.port"), Some(51000));
        assert_eq!(span.attr_str("network.peer.address"), Some("10.0.0.9"));
        assert_eq!(int(&span, "network.peer.port"), Some(51000));
        assert_eq!(span.attr_str("network.local.address"), Some("10.0.0.1"));
        assert_eq!(int(&span, "network.local.port"), Some(8080));
        assert_eq!(span.attr_str("network.protocol.name"), Some("http"));
        assert_eq!(span.attr_str("network.protocol.version"), Some("1.0"));
        assert_eq!(span.attr_str("user_agent.original"), Some("curl/8.5"));
        assert_eq!(int(&span, "http.request.body.size"), Some(12));
        assert_eq!(int(&span, "http.response.body.size"), Some(34));
        assert_eq!(int(&span, "http.response.status_code"), Some(201));
        assert_eq!(span.attr_str("error.type"), None);
        assert_eq!(span.status, Status::Unset);
        assert_eq!(span.start_unix_ns, 1_700_000_000_000_001_000);
        assert_eq!(span.end_unix_ns, 1_700_000_000_000_005_000);
        assert!(Arc::ptr_eq(&span.resource, &span.resource.clone()));
        assert_eq!(span.resource.service_name, "svc");
        assert_eq!(span.parent_span_id, None);
        assert!(span.trace_id.iter().any(|&b| b != 0) && span.span_id.iter().any(|&b| b != 0));
    }

    #[test]
    fn server_address_sources() {
        let conn = addrs("192.168.1.5:8080", "192.168.1.6:40000");
        // Host without port: the port the request arrived on.
        let span = build(
            Role::Server,
            Outcome::Complete,
            &request("GET", "/", &[("Host", "api")]),
            Some(&conn),
        );
        assert_eq!(
            (span.attr_str("server.address"), int(&span, "server.port")),
            (Some("api"), Some(8080))
        );
        // No Host: the local address.
        let span = build(
            Role::Server,
            Outcome::Complete,
            &request("GET", "/", &[]),
            Some(&conn),
        );
        assert_eq!(
            (span.attr_str("server.address"), int(&span, "server.port")),
            (Some("192.168.1.5"), Some(8080))
        );
        // A proxy's forwarded host, proto and client win.
        let http = request(
            "GET",
            "/x",
            &[
                ("Host", "backend:9000"),
                ("X-Forwarded-Host", "www.example.com, proxy.local"),
                ("X-Forwarded-Proto", "https"),
                ("X-Forwarded-For", "203.0.113.7, 10.0.0.1"),
            ],
        );
        let span = build(Role::Server, Outcome::Complete, &http, Some(&conn));
        assert_eq!(span.attr_str("server.address"), Some("www.example.com"));
        assert_eq!(int(&span, "server.port"), Some(443));
        assert_eq!(span.attr_str("url.scheme"), Some("https"));
        assert_eq!(span.attr_str("client.address"), Some("203.0.113.7"));
        assert_eq!(
            int(&span, "client.port"),
            None,
            "port of the original client is unknown"
        );
        assert_eq!(span.attr_str("network.peer.address"), Some("192.168.1.6"));
        // RFC 7239 Forwarded, quoted IPv6 with port.
        let http = request(
            "GET",
            "/",
            &[(
                "Forwarded",
                "for=\"[2001:db8::1]:4711\";proto=http;host=shop:81, for=x",
            )],
        );
        let span = build(Role::Server, Outcome::Complete, &http, Some(&conn));
        assert_eq!(span.attr_str("client.address"), Some("2001:db8::1"));
        assert_eq!(int(&span, "client.port"), Some(4711));
        assert_eq!(
            (span.attr_str("server.address"), int(&span, "server.port")),
            (Some("shop"), Some(81))
        );
        // Obfuscated client identifiers fall back to the peer.
        let http = request("GET", "/", &[("Forwarded", "for=_hidden")]);
        let span = build(Role::Server, Outcome::Complete, &http, Some(&conn));
        assert_eq!(span.attr_str("client.address"), Some("192.168.1.6"));
        // Without addresses nothing is invented.
        let span = build(
            Role::Server,
            Outcome::Complete,
            &request("GET", "/", &[]),
            None,
        );
        assert_eq!(span.attr_str("server.address"), None);
        assert_eq!(span.attr_str("client.address"), None);
        assert_eq!(span.attr_str("network.peer.address"), None);
    }

    #[test]
    fn server_absolute_and_asterisk_targets() {
        let span = build(
            Role::Server,
            Outcome::Complete,
            &request("GET", "http://Example.org:8000/a/b?q=1", &[]),
            None,
        );
        assert_eq!(span.attr_str("url.path"), Some("/a/b"));
        assert_eq!(span.attr_str("url.query"), Some("q=1"));
        assert_eq!(
            (span.attr_str("server.address"), int(&span, "server.port")),
            (Some("Example.org"), Some(8000))
        );
        let span = build(
            Role::Server,
            Outcome::Complete,
            &request("OPTIONS", "*", &[("Host", "h:1")]),
            None,
        );
        assert_eq!(span.attr_str("url.path"), None);
        assert_eq!(span.attr_str("server.address"), Some("h"));
    }

    #[test]
    fn client_span_attributes() {
        let mut http = request(
            "GET",
            "/search?q=otel&X-Goog-Signature=abc",
            &[("Host", "api.example.com:8080")],
        );
        http.status = Some(200);
        http.response_body_size = 99;
        let conn = addrs("10.1.1.1:43000", "10.1.1.2:8080");
        let span = build(Role::Client, Outcome::Complete, &http, Some(&conn));
        assert_eq!(span.kind, SpanKind::Client);
        assert_eq!(span.name, "GET");
        assert_eq!(
            span.attr_str("url.full"),
            Some("http://api.example.com:8080/search?q=otel&X-Goog-Signature=REDACTED")
        );
        assert_eq!(span.attr_str("url.scheme"), Some("http"));
        assert_eq!(span.attr_str("url.path"), None);
        assert_eq!(span.attr_str("server.address"), Some("api.example.com"));
        assert_eq!(int(&span, "server.port"), Some(8080));
        assert_eq!(span.attr_str("network.peer.address"), Some("10.1.1.2"));
        assert_eq!(int(&span, "network.peer.port"), Some(8080));
        assert_eq!(span.attr_str("network.local.address"), Some("10.1.1.1"));
        assert_eq!(int(&span, "network.local.port"), Some(43000));
        assert_eq!(span.attr_str("client.address"), None);
        assert_eq!(span.attr_str("network.protocol.version"), Some("1.1"));
        assert_eq!(int(&span, "http.response.status_code"), Some(200));
        assert_eq!(int(&span, "http.response.body.size"), Some(99));
        assert_eq!(int(&span, "http.request.body.size"), Some(0));
        assert_eq!(span.status, Status::Unset);
    }

    #[test]
    fn exchanges_read_from_tls_are_https() {
        let http = request("GET", "/a?b=1", &[("Host", "api.example.com")]);
        let tls = |local, remote| ConnAddrs {
            tls: true,
            ..addrs(local, remote)
        };
        let conn = tls("10.1.1.1:43000", "10.1.1.2:443");
        let client = build(Role::Client, Outcome::Complete, &http, Some(&conn));
        assert_eq!(client.attr_str("url.scheme"), Some("https"));
        assert_eq!(
            client.attr_str("url.full"),
            Some("https://api.example.com/a?b=1")
        );
        assert_eq!(int(&client, "server.port"), Some(443));
        let conn = tls("10.1.1.2:8443", "10.1.1.1:43000");
        let server = build(Role::Server, Outcome::Complete, &http, Some(&conn));
        assert_eq!(server.attr_str("url.scheme"), Some("https"));
        assert_eq!(int(&server, "server.port"), Some(8443));
        // What the request says about the original scheme wins over the transport.
        let forwarded = request("GET", "/", &[("X-Forwarded-Proto", "http")]);
        let server = build(Role::Server, Outcome::Complete, &forwarded, Some(&conn));
        assert_eq!(server.attr_str("url.scheme"), Some("http"));
        let absolute = request("GET", "http://example.com/x", &[]);
        let client = build(Role::Client, Outcome::Complete, &absolute, Some(&conn));
        assert_eq!(client.attr_str("url.full"), Some("http://example.com/x"));
        let plain = addrs("10.1.1.1:43000", "10.1.1.2:80");
        let client = build(Role::Client, Outcome::Complete, &http, Some(&plain));
        assert_eq!(client.attr_str("url.scheme"), Some("http"));
    }

    #[test]
    fn client_url_full_construction() {
        let url = |target: &str, headers: &[(&str, &str)], conn: Option<&ConnAddrs>| {
            let span = build(
                Role::Client,
                Outcome::Complete,
                &request("GET", target, headers),
                conn,
            );
            (
                span.attr_str("url.full").map(str::to_owned),
                span.attr_str("server.address").map(str::to_owned),
                int(&span, "server.port"),
            )
        };
        let v6 = addrs("[::1]:50000", "[2001:db8::2]:80");
        assert_eq!(
            url("/p?a=1", &[], Some(&v6)),
            (
                Some("http://[2001:db8::2]/p?a=1".into()),
                Some("2001:db8::2".into()),
                Some(80)
            )
        );
        let v4 = addrs("127.0.0.1:50000", "127.0.0.1:9090");
        assert_eq!(
            url("/", &[], Some(&v4)),
            (
                Some("http://127.0.0.1:9090/".into()),
                Some("127.0.0.1".into()),
                Some(9090)
            )
        );
        // Host without port keeps the URL as the client wrote it; the port is the connected one.
        assert_eq!(
            url("/x", &[("host", "svc")], Some(&v4)),
            (Some("http://svc/x".into()), Some("svc".into()), Some(9090))
        );
        assert_eq!(
            url("/x", &[("host", "svc")], None),
            (Some("http://svc/x".into()), Some("svc".into()), Some(80))
        );
        assert_eq!(
            url("/x", &[("host", "[fe80::1]:8080")], None),
            (
                Some("http://[fe80::1]:8080/x".into()),
                Some("fe80::1".into()),
                Some(8080)
            )
        );
        // Absolute form (requests through a forward proxy), credentials redacted, fragment dropped.
        assert_eq!(
            url(
                "https://user:pw@example.com/a?sig=1#top",
                &[("host", "other")],
                Some(&v4)
            ),
            (
                Some("https://REDACTED:REDACTED@example.com/a?sig=REDACTED".into()),
                Some("example.com".into()),
                Some(443)
            )
        );
        assert_eq!(
            url("http://u@h:81", &[], None),
            (
                Some("http://REDACTED@h:81/".into()),
                Some("h".into()),
                Some(81)
            )
        );
        // Nothing names the server: no url.full.
        assert_eq!(url("/", &[], None), (None, None, None));
        // A malformed Host falls back to the peer.
        assert_eq!(
            url("/", &[("host", "bad host:x")], Some(&v4)),
            (
                Some("http://127.0.0.1:9090/".into()),
                Some("127.0.0.1".into()),
                Some(9090)
            )
        );
    }

    #[test]
    fn connect_uses_authority_form() {
        let span = build(
            Role::Client,
            Outcome::Complete,
            &request("CONNECT", "db.internal:5432", &[]),
            None,
        );
        assert_eq!(span.attr_str("url.full"), Some("http://db.internal:5432"));
        assert_eq!(
            (span.attr_str("server.address"), int(&span, "server.port")),
            (Some("db.internal"), Some(5432))
        );
    }

    #[test]
    fn unknown_methods_become_other() {
        for method in ["PROPFIND", "get"] {
            let span = build(
                Role::Server,
                Outcome::Complete,
                &request(method, "/", &[]),
                None,
            );
            assert_eq!(span.name, "HTTP");
            assert_eq!(span.attr_str("http.request.method"), Some("_OTHER"));
            assert_eq!(span.attr_str("http.request.method_original"), Some(method));
        }
        assert_eq!(
            parse_known_methods(Some(" PROPFIND ,GET,")),
            vec!["PROPFIND".to_owned(), "GET".to_owned()]
        );
        assert_eq!(
            parse_known_methods(Some("")).len(),
            DEFAULT_KNOWN_METHODS.len()
        );
        assert_eq!(parse_known_methods(None).len(), DEFAULT_KNOWN_METHODS.len());
    }

    #[test]
    fn status_rules() {
        use Outcome::*;
        let err = |t: &str| (true, Some(t.to_owned()));
        let ok = (false, None);
        type Expected = (bool, Option<String>);
        let cases: &[(Role, Option<u16>, Outcome, Expected)] = &[
            (Role::Server, Some(200), Complete, ok.clone()),
            (Role::Server, Some(302), Complete, ok.clone()),
            (Role::Server, Some(404), Complete, ok.clone()),
            (Role::Server, Some(499), Complete, ok.clone()),
            (Role::Server, Some(500), Complete, err("500")),
            (Role::Server, Some(503), Partial, err("503")),
            (Role::Client, Some(399), Complete, ok.clone()),
            (Role::Client, Some(400), Complete, err("400")),
            (Role::Client, Some(404), Complete, err("404")),
            (Role::Client, Some(502), Complete, err("502")),
            (Role::Client, Some(600), Complete, err("600")),
            (Role::Server, Some(99), Complete, err("99")),
            (Role::Server, None, NoResponse, err("no_response")),
            (Role::Client, None, NoResponse, err("no_response")),
            (
                Role::Server,
                Some(200),
                NoResponse,
                err("response_incomplete"),
            ),
            (Role::Client, Some(500), NoResponse, err("500")),
            (Role::Client, None, Partial, ok.clone()),
            (Role::Client, Some(200), Partial, ok.clone()),
        ];
        for (role, code, outcome, (is_err, error_type)) in cases {
            let mut http = request("GET", "/", &[]);
            http.status = *code;
            let span = build(*role, *outcome, &http, None);
            assert_eq!(
                matches!(span.status, Status::Error(_)),
                *is_err,
                "{role:?} {code:?} {outcome:?}"
            );
            assert_eq!(
                span.attr_str("error.type"),
                error_type.as_deref(),
                "{role:?} {code:?} {outcome:?}"
            );
            assert_eq!(int(&span, "http.response.status_code"), code.map(i64::from));
        }
        let mut http = request("GET", "/", &[]);
        http.status = None;
        let span = build(Role::Client, Outcome::NoResponse, &http, None);
        assert_eq!(
            int(&span, "http.response.body.size"),
            None,
            "no response, no response size"
        );
        assert!(matches!(span.status, Status::Error(Some(_))));
        let mut http = request("GET", "/", &[]);
        http.status = Some(500);
        assert_eq!(
            build(Role::Server, Outcome::Complete, &http, None).status,
            Status::Error(None)
        );
    }

    fn ctx(headers: &[(&str, &str)]) -> Option<RemoteContext> {
        extract_context(|name| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| *v)
        })
    }

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";

    fn trace_bytes() -> [u8; 16] {
        [
            0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e,
            0x47, 0x36,
        ]
    }

    fn parent_bytes() -> [u8; 8] {
        [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
    }

    #[test]
    fn traceparent_valid() {
        let tp = format!("00-{TRACE}-{PARENT}-01");
        let c = ctx(&[
            ("traceparent", &tp),
            ("tracestate", "congo=t61rcWkgMzE, rojo=00f067aa0ba902b7"),
        ])
        .expect("valid");
        assert_eq!(c.trace_id, trace_bytes());
        assert_eq!(c.span_id, parent_bytes());
        assert_eq!(c.trace_state, "congo=t61rcWkgMzE, rojo=00f067aa0ba902b7");
        // Future versions may carry more fields after a dash.
        let future = format!("cc-{TRACE}-{PARENT}-00-whatever");
        assert_eq!(
            ctx(&[("traceparent", &future)]).map(|c| c.trace_id),
            Some(trace_bytes())
        );
        let future_exact = format!("01-{TRACE}-{PARENT}-09");
        assert!(ctx(&[("traceparent", &future_exact)]).is_some());
    }

    #[test]
    fn traceparent_invalid() {
        let zeros32 = "0".repeat(32);
        let zeros16 = "0".repeat(16);
        let upper = TRACE.to_uppercase();
        let bad = [
            format!("00-{upper}-{PARENT}-01"),
            format!("00-{TRACE}-{}-01", PARENT.to_uppercase()),
            format!("00-{zeros32}-{PARENT}-01"),
            format!("00-{TRACE}-{zeros16}-01"),
            format!("00-{}-{PARENT}-01", &TRACE[1..]),
            format!("00-{TRACE}0-{PARENT}-01"),
            format!("00-{TRACE}-{PARENT}-01-extra"),
            format!("00-{TRACE}-{PARENT}-1"),
            format!("00-{TRACE}-{PARENT}-0g"),
            format!("ff-{TRACE}-{PARENT}-01"),
            format!("0g-{TRACE}-{PARENT}-01"),
            format!("cc-{TRACE}-{PARENT}-01x"),
            format!("00_{TRACE}-{PARENT}-01"),
            format!("00-{TRACE}-{}g-01", &PARENT[..15]),
            String::new(),
        ];
        for tp in &bad {
            assert_eq!(ctx(&[("traceparent", tp)]), None, "{tp}");
        }
    }

    #[test]
    fn invalid_tracestate_is_dropped_but_parent_kept() {
        let tp = format!("00-{TRACE}-{PARENT}-01");
        let too_many = (0..33)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        for ts in [
            "Upper=1",
            "a=1,a=2",
            "novalue",
            "a=b=c",
            "a=",
            too_many.as_str(),
        ] {
            let c =
                ctx(&[("traceparent", &tp), ("tracestate", ts)]).expect("traceparent still valid");
            assert_eq!(c.trace_state, "", "{ts}");
        }
        let c = ctx(&[
            ("traceparent", &tp),
            ("tracestate", "tenant@vendor=x,b-1*/_=y z"),
        ])
        .expect("valid");
        assert_eq!(c.trace_state, "tenant@vendor=x,b-1*/_=y z");
    }

    #[test]
    fn b3_single_and_multi() {
        let single = format!("{TRACE}-{PARENT}-1-0000000000000001");
        let c = ctx(&[("b3", &single)]).expect("b3 single");
        assert_eq!(
            (c.trace_id, c.span_id, c.trace_state.as_str()),
            (trace_bytes(), parent_bytes(), "")
        );
        let short = ctx(&[("b3", "a3ce929d0e0e4736-00f067aa0ba902b7")]).expect("64-bit trace id");
        assert_eq!(short.trace_id[..8], [0; 8]);
        assert_eq!(short.trace_id[8..], trace_bytes()[8..]);
        assert!(ctx(&[("b3", &format!("{TRACE}-{PARENT}-d"))]).is_some());
        for bad in [
            "0",
            "1",
            "d",
            "x-y",
            &format!("{TRACE}-{PARENT}-2"),
            &format!("{TRACE}-{PARENT}-1-00-1"),
        ] {
            assert_eq!(ctx(&[("b3", bad)]), None, "{bad}");
        }
        assert_eq!(
            ctx(&[("b3", &format!("{}-{PARENT}", "0".repeat(16)))]),
            None,
            "all-zero trace id"
        );

        let c = ctx(&[
            ("X-B3-TraceId", TRACE),
            ("X-B3-SpanId", PARENT),
            ("X-B3-Sampled", "1"),
        ])
        .expect("multi");
        assert_eq!((c.trace_id, c.span_id), (trace_bytes(), parent_bytes()));
        assert_eq!(ctx(&[("X-B3-TraceId", TRACE)]), None, "span id required");
        assert_eq!(
            ctx(&[("X-B3-TraceId", &TRACE[..20]), ("X-B3-SpanId", PARENT)]),
            None
        );

        // W3C wins over B3; an invalid traceparent falls back to B3.
        let other = "11111111111111111111111111111111";
        let tp = format!("00-{other}-{PARENT}-01");
        assert_eq!(
            ctx(&[("traceparent", &tp), ("b3", &single)]).map(|c| c.trace_id),
            Some([0x11; 16])
        );
        assert_eq!(
            ctx(&[("traceparent", "garbage"), ("b3", &single)]).map(|c| c.trace_id),
            Some(trace_bytes())
        );
    }

    #[test]
    fn span_joins_remote_trace() {
        let tp = format!("00-{TRACE}-{PARENT}-01");
        let before = metrics::counter("spans_with_remote_parent_total", "");
        let http = request("GET", "/", &[("traceparent", &tp), ("tracestate", "a=1")]);
        let span = build(Role::Server, Outcome::Complete, &http, None);
        assert_eq!(span.trace_id, trace_bytes());
        assert_eq!(span.parent_span_id, Some(parent_bytes()));
        assert_eq!(span.trace_state, "a=1");
        assert_ne!(span.span_id, parent_bytes());
        assert!(metrics::counter("spans_with_remote_parent_total", "") > before);
        let a = build(
            Role::Client,
            Outcome::Complete,
            &request("GET", "/", &[]),
            None,
        );
        let b = build(
            Role::Client,
            Outcome::Complete,
            &request("GET", "/", &[]),
            None,
        );
        assert_ne!(a.trace_id, b.trace_id, "fresh traces get random ids");
        assert_ne!(a.span_id, b.span_id);
    }

    #[test]
    fn random_ids_are_never_zero() {
        for _ in 0..1000 {
            assert!(random_id::<8>().iter().any(|&b| b != 0));
        }
    }

    #[test]
    fn random_ids_do_not_repeat() {
        let ids: std::collections::HashSet<[u8; 16]> = (0..100_000).map(|_| random_id()).collect();
        assert_eq!(ids.len(), 100_000);
        // Two threads seed apart.
        let other = std::thread::spawn(random_id::<8>).join().expect("thread");
        let mine: std::collections::HashSet<[u8; 8]> = (0..1000).map(|_| random_id()).collect();
        assert!(!mine.contains(&other));
    }

    #[test]
    fn clock_converts_to_wall_time() {
        let clock = Clock::new();
        let mono = clock_ns(libc::CLOCK_MONOTONIC);
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after epoch")
            .as_nanos();
        let converted = u128::from(clock.to_unix_ns(mono));
        let diff = converted.abs_diff(wall);
        assert!(diff < 50_000_000, "converted {converted} vs wall {wall}");
        // Later monotonic instants map to later wall times, one for one.
        assert_eq!(
            clock.to_unix_ns(mono + 1_000_000) - clock.to_unix_ns(mono),
            1_000_000
        );
        // Resynchronising after a long gap keeps the mapping right.
        let later = clock.to_unix_ns(mono + 2 * CLOCK_RESYNC_NS);
        let expected = wall + 2 * u128::from(CLOCK_RESYNC_NS);
        assert!(u128::from(later).abs_diff(expected) < 50_000_000);
        assert_eq!(fixed_clock(-10).to_unix_ns(5), 0, "no negative times");
    }

    #[test]
    fn end_never_precedes_start() {
        let http = request("GET", "/", &[]);
        let ex = Exchange {
            role: Role::Client,
            start_ns: 9_000,
            end_ns: 1_000,
            outcome: Outcome::Complete,
            request_offset: 0,
            request_thread: 0,
            detail: Detail::Http(http.clone()),
        };
        let span = http_span(&ex, &http, None, resource(), &fixed_clock(0));
        assert_eq!((span.start_unix_ns, span.end_unix_ns), (9_000, 9_000));
    }
}
