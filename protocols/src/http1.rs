//! HTTP/1.0 and HTTP/1.1.
//!
//! [`Http1Parser`] sees both directions of one connection. Each direction has its own framing state
//! (head, body, or resynchronising); a request seen in either direction waits in a bounded FIFO until
//! a response arrives in the other direction. Heads are parsed with `httparse` and buffered only while
//! incomplete (at most [`MAX_HEAD`] bytes per direction); bodies are counted, never stored.
//!
//! Captures are lossy: the tracer reports uncaptured bytes with [`ConnectionParser::gap`]. A gap inside
//! a body of known length only advances the body counter. A gap anywhere else loses the framing: the
//! direction then skips bytes until a plausible message start, either at the beginning of a later
//! chunk or right after a line break inside one.

use std::collections::VecDeque;
use std::mem;

use crate::headers::Headers;
use crate::{
    ConnectionParser, Detail, Direction, Exchange, Origin, Outcome, Output, Protocol, Role,
    SkipReason, Timing,
};

/// An HTTP/1.x request and its response.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HttpExchange {
    /// Request method as sent (`GET`, `POST`, ...).
    pub method: String,
    /// Request target as sent (origin form `/p?q`, absolute form, `*` or authority form).
    pub target: String,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// Request headers in order (at most [`MAX_HEADERS`], values cut at [`MAX_HEADER_VALUE`]).
    pub request_headers: Headers,
    /// Request body bytes (decoded size for chunked bodies).
    pub request_body_size: u64,
    /// Final (non-1xx) response status, when a response was seen.
    pub status: Option<u16>,
    /// Response headers of the final response.
    pub response_headers: Headers,
    /// Response body bytes.
    pub response_body_size: u64,
}

/// Most headers kept per message.
pub const MAX_HEADERS: usize = 64;
/// Longest header value kept, in bytes.
pub const MAX_HEADER_VALUE: usize = 1024;
/// Largest message head (start line and headers) the parser buffers; larger heads are skipped.
pub const MAX_HEAD: usize = 16 * 1024;
/// Most requests waiting for a response on one connection; beyond it the oldest is dropped.
pub const MAX_PENDING: usize = 64;

/// Headers httparse may see in one head; more is reported as [`SkipReason::HeadTooLarge`].
/// At most 256: `build_head` keeps field indices in bytes.
const PARSE_HEADERS: usize = 128;
const _: () = assert!(PARSE_HEADERS <= 256);
/// Longest chunk-size line (size and extensions) accepted before the framing is declared lost.
const MAX_CHUNK_LINE: usize = 1024;
/// A head buffer that grew beyond this is released once its head is parsed, so idle
/// connections do not keep the worst case.
const KEEP_HEAD_CAPACITY: usize = 4096;
/// Methods accepted as a message start when the parser is not in sync (mid-connection captures).
/// In sync, any token httparse accepts is a method.
const METHODS: &[&[u8]] = &[
    b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE",
];

impl HttpExchange {
    /// First request header named `name` (case-insensitive).
    pub fn request_header(&self, name: &str) -> Option<&str> {
        self.request_headers.get(name)
    }
    /// First response header named `name` (case-insensitive).
    pub fn response_header(&self, name: &str) -> Option<&str> {
        self.response_headers.get(name)
    }
}

/// Whether bytes look like the start of an HTTP/1.x message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    /// A known method, a space and a target, or `HTTP/1.x `.
    Yes,
    /// Too short to tell, but a prefix of a message start.
    Maybe,
    /// Not a message start.
    No,
}

/// Classifies `data` as the start of an HTTP/1.x request or response.
pub(crate) fn message_start(data: &[u8]) -> Start {
    let mut best = Start::No;
    for method in METHODS {
        let need = method.len() + 2;
        let fits = data
            .iter()
            .take(need)
            .enumerate()
            .all(|(i, &b)| match i.cmp(&method.len()) {
                std::cmp::Ordering::Less => b == method[i],
                std::cmp::Ordering::Equal => b == b' ',
                std::cmp::Ordering::Greater => b == b'/' || b == b'*' || b.is_ascii_alphanumeric(),
            });
        if fits {
            if data.len() >= need {
                return Start::Yes;
            }
            best = Start::Maybe;
        }
    }
    const STATUS: &[u8] = b"HTTP/1.";
    let need = STATUS.len() + 2;
    let fits = data
        .iter()
        .take(need)
        .enumerate()
        .all(|(i, &b)| match i.cmp(&STATUS.len()) {
            std::cmp::Ordering::Less => b == STATUS[i],
            std::cmp::Ordering::Equal => b == b'0' || b == b'1',
            std::cmp::Ordering::Greater => b == b' ',
        });
    if fits {
        if data.len() >= need {
            return Start::Yes;
        }
        best = Start::Maybe;
    }
    best
}

/// Which header fields a parser keeps, by name (as sent, any case): a consumer that reads a few
/// fields need not pay for copying every field of every message.
pub type HeaderFilter = fn(&str) -> bool;

/// HTTP/1.x parser for one connection (both directions).
#[derive(Debug, Default)]
pub struct Http1Parser {
    /// Header fields kept in the exchanges; `None`: all (up to [`MAX_HEADERS`]).
    keep: Option<HeaderFilter>,
    /// Framing state per direction, indexed by [`slot`].
    halves: [Half; 2],
    /// Requests waiting for (or receiving) their response, oldest first.
    pending: VecDeque<Pending>,
    next_id: u64,
    /// Set after an upgrade (101, successful CONNECT) or close: all further input is ignored.
    stopped: bool,
}

/// Framing state of one direction.
#[derive(Debug, Default)]
struct Half {
    state: State,
    /// Bytes of an incomplete head (never more than `MAX_HEAD + 1`).
    head: Vec<u8>,
    /// Where the first byte of `head` (or of the head being parsed) was.
    head_start: Origin,
    /// Bytes given in this direction so far, fed or lost in gaps: the stream position of the
    /// next byte.
    seen: u64,
    /// The current run of skipped bytes has already been counted.
    skip_counted: bool,
    /// Kind of the last message parsed in this direction.
    last_kind: Option<Kind>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Request,
    Response,
}

#[derive(Debug)]
enum State {
    /// At a message boundary: the next bytes are a head.
    Head,
    /// Inside the body of a message.
    Body { owner: Owner, framing: Framing },
    /// Framing lost: skipping until a plausible message start. `owner` is the message whose
    /// remaining bytes are probably being skipped; `chunked` says its body was chunked, so a
    /// chunk-size line at a chunk boundary resumes it.
    Resync { owner: Option<Owner>, chunked: bool },
}

impl Default for State {
    /// A direction starts unsynchronised: the capture may begin mid-connection.
    fn default() -> Self {
        State::Resync {
            owner: None,
            chunked: false,
        }
    }
}

/// The message a body belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// A request, by pending id.
    Request(u64),
    /// A response to the pending request with this id, or to none (unpaired).
    Response(Option<u64>),
}

impl Owner {
    fn id(self) -> Option<u64> {
        match self {
            Owner::Request(id) => Some(id),
            Owner::Response(id) => id,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Framing {
    /// This many body bytes remain.
    Length(u64),
    Chunked(Chunk),
    /// The body ends when the connection closes.
    UntilClose,
}

/// Position inside chunked transfer coding.
#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// Reading a chunk-size line.
    Size {
        value: u64,
        digits: u32,
        in_ext: bool,
        cr: bool,
        line: usize,
    },
    /// This many bytes of chunk data remain.
    Data(u64),
    /// Expecting the CRLF after chunk data.
    DataEnd { cr: bool },
    /// Reading trailer fields until an empty line.
    Trailer { line: usize, total: usize },
}

impl Chunk {
    fn size_line() -> Chunk {
        Chunk::Size {
            value: 0,
            digits: 0,
            in_ext: false,
            cr: false,
            line: 0,
        }
    }
}

/// Result of one step through chunked framing.
struct ChunkStep {
    used: usize,
    body: u64,
    end: ChunkEnd,
}

#[derive(PartialEq, Eq)]
enum ChunkEnd {
    /// Framing continues (maybe in the next feed).
    More,
    /// The last chunk and trailers ended: the message is complete.
    Done,
    /// Bytes that are not chunked framing.
    Invalid,
}

/// Outcome of feeding one byte of framing.
enum ByteStep {
    Continue,
    ToData,
    Done,
    Invalid,
}

impl Chunk {
    /// Advances over `data`, stopping at the end of the message, at invalid framing, or before
    /// chunk data (which the next call consumes in bulk).
    fn step(&mut self, data: &[u8]) -> ChunkStep {
        if let Chunk::Data(rem) = self {
            let n = (*rem).min(data.len() as u64);
            *rem -= n;
            if *rem == 0 {
                *self = Chunk::DataEnd { cr: false };
            }
            return ChunkStep {
                used: n as usize,
                body: n,
                end: ChunkEnd::More,
            };
        }
        for (i, &b) in data.iter().enumerate() {
            match self.byte(b) {
                ByteStep::Continue => {}
                ByteStep::ToData => {
                    return ChunkStep {
                        used: i + 1,
                        body: 0,
                        end: ChunkEnd::More,
                    };
                }
                ByteStep::Done => {
                    return ChunkStep {
                        used: i + 1,
                        body: 0,
                        end: ChunkEnd::Done,
                    };
                }
                ByteStep::Invalid => {
                    return ChunkStep {
                        used: i,
                        body: 0,
                        end: ChunkEnd::Invalid,
                    };
                }
            }
        }
        ChunkStep {
            used: data.len(),
            body: 0,
            end: ChunkEnd::More,
        }
    }

    fn byte(&mut self, b: u8) -> ByteStep {
        match self {
            Chunk::Size {
                value,
                digits,
                in_ext,
                cr,
                line,
            } => {
                *line += 1;
                if *line > MAX_CHUNK_LINE {
                    return ByteStep::Invalid;
                }
                if b == b'\n' {
                    if *digits == 0 {
                        return ByteStep::Invalid;
                    }
                    if *value == 0 {
                        *self = Chunk::Trailer { line: 0, total: 0 };
                        return ByteStep::Continue;
                    }
                    *self = Chunk::Data(*value);
                    return ByteStep::ToData;
                }
                if *cr {
                    return ByteStep::Invalid;
                }
                if b == b'\r' {
                    *cr = true;
                    return ByteStep::Continue;
                }
                if *in_ext {
                    return ByteStep::Continue;
                }
                if let Some(d) = (b as char).to_digit(16) {
                    match value
                        .checked_mul(16)
                        .and_then(|v| v.checked_add(u64::from(d)))
                    {
                        Some(v) => {
                            *value = v;
                            *digits += 1;
                            ByteStep::Continue
                        }
                        None => ByteStep::Invalid,
                    }
                } else if *digits > 0 && matches!(b, b';' | b' ' | b'\t') {
                    *in_ext = true;
                    ByteStep::Continue
                } else {
                    ByteStep::Invalid
                }
            }
            Chunk::DataEnd { cr } => match b {
                b'\r' if !*cr => {
                    *cr = true;
                    ByteStep::Continue
                }
                b'\n' => {
                    *self = Chunk::size_line();
                    ByteStep::Continue
                }
                _ => ByteStep::Invalid,
            },
            Chunk::Trailer { line, total } => {
                *total += 1;
                if *total > MAX_HEAD {
                    return ByteStep::Invalid;
                }
                match b {
                    b'\n' if *line == 0 => ByteStep::Done,
                    b'\n' => {
                        *line = 0;
                        ByteStep::Continue
                    }
                    b'\r' => ByteStep::Continue,
                    _ => {
                        *line += 1;
                        ByteStep::Continue
                    }
                }
            }
            // Data is consumed in bulk by `step`; reaching here means zero bytes remain.
            Chunk::Data(_) => ByteStep::Invalid,
        }
    }
}

/// A request waiting for, or receiving, its response.
#[derive(Debug)]
struct Pending {
    id: u64,
    /// Direction the request travelled in.
    dir: Direction,
    exchange: HttpExchange,
    /// First byte of the request.
    start: Origin,
    /// End of the last chunk that carried bytes of this exchange.
    end_ns: u64,
    /// A gap or lost framing hit this exchange.
    partial: bool,
    /// The request was `HEAD`: its response has no body.
    head_method: bool,
    /// The request was `CONNECT`: a 2xx response turns the connection into a tunnel.
    connect: bool,
    /// A final response head was seen for it.
    responding: bool,
}

/// What a body length header said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Length {
    Absent,
    Value(u64),
    Invalid,
}

/// A parsed start line.
#[derive(Debug)]
enum StartLine {
    Request {
        method: String,
        target: String,
        version: u8,
    },
    /// `code` 0: the head was lost before its status code.
    Response { code: u16 },
}

/// A complete head, copied out of the input.
#[derive(Debug)]
struct Head {
    start: StartLine,
    headers: Headers,
    length: Length,
    /// A Transfer-Encoding header was present.
    transfer_encoding: bool,
    /// The final transfer coding is `chunked`.
    chunked: bool,
    /// Bytes of input the head used.
    len: usize,
}

enum HeadParse {
    Complete(Head),
    Partial,
    Invalid,
    TooManyHeaders,
}

/// How a message's body is delimited.
enum BodyKind {
    None,
    Framed(Framing),
    /// The framing headers are contradictory or malformed.
    Invalid,
}

fn slot(dir: Direction) -> usize {
    match dir {
        Direction::Send => 0,
        Direction::Recv => 1,
    }
}

fn looks_like_response(buf: &[u8]) -> bool {
    const PREFIX: &[u8] = b"HTTP/";
    let n = buf.len().min(PREFIX.len());
    buf[..n] == PREFIX[..n]
}

fn parse_head(buf: &[u8], keep: Option<HeaderFilter>) -> HeadParse {
    // Left uninitialised: httparse writes the slots it fills, and zeroing 128 of them (4 KiB)
    // per head was a tenth of the parser's time.
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; PARSE_HEADERS];
    let config = httparse::ParserConfig::default();
    if looks_like_response(buf) {
        let mut resp = httparse::Response::new(&mut []);
        match config.parse_response_with_uninit_headers(&mut resp, buf, &mut slots) {
            Ok(httparse::Status::Complete(len)) => match resp.code {
                Some(code) => {
                    let start = StartLine::Response { code };
                    HeadParse::Complete(build_head(start, resp.headers, len, keep))
                }
                None => HeadParse::Invalid,
            },
            Ok(httparse::Status::Partial) => HeadParse::Partial,
            Err(httparse::Error::TooManyHeaders) => HeadParse::TooManyHeaders,
            Err(_) => HeadParse::Invalid,
        }
    } else {
        let mut req = httparse::Request::new(&mut []);
        match config.parse_request_with_uninit_headers(&mut req, buf, &mut slots) {
            Ok(httparse::Status::Complete(len)) => match (req.method, req.path, req.version) {
                (Some(method), Some(target), Some(version)) => {
                    let start = StartLine::Request {
                        method: method.to_owned(),
                        target: target.to_owned(),
                        version,
                    };
                    HeadParse::Complete(build_head(start, req.headers, len, keep))
                }
                _ => HeadParse::Invalid,
            },
            Ok(httparse::Status::Partial) => HeadParse::Partial,
            Err(httparse::Error::TooManyHeaders) => HeadParse::TooManyHeaders,
            Err(_) => HeadParse::Invalid,
        }
    }
}

/// The start line of an incomplete (or oversized) head, if it got that far.
fn partial_start_line(buf: &[u8]) -> Option<StartLine> {
    let mut slots = [httparse::EMPTY_HEADER; PARSE_HEADERS];
    if looks_like_response(buf) {
        let mut resp = httparse::Response::new(&mut slots);
        // The fields parsed before the head ran out are kept whatever the result.
        let _ = resp.parse(buf);
        resp.code.map(|code| StartLine::Response { code })
    } else {
        let mut req = httparse::Request::new(&mut slots);
        let _ = req.parse(buf);
        match (req.method, req.path) {
            (Some(method), Some(target)) => Some(StartLine::Request {
                method: method.to_owned(),
                target: target.to_owned(),
                version: req.version.unwrap_or(1),
            }),
            _ => None,
        }
    }
}

fn build_head(
    start: StartLine,
    raw: &[httparse::Header<'_>],
    len: usize,
    keep: Option<HeaderFilter>,
) -> Head {
    let mut length = Length::Absent;
    let mut transfer_encoding = false;
    let mut chunked = false;
    for h in raw {
        if h.name.eq_ignore_ascii_case("content-length") {
            length = merge_length(length, h.value);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // Only the last coding of the last field decides whether the body is chunked.
            if let Some(last) = h
                .value
                .split(|&b| b == b',')
                .map(|c| c.trim_ascii())
                .rfind(|c| !c.is_empty())
            {
                transfer_encoding = true;
                chunked = last.eq_ignore_ascii_case(b"chunked");
            }
        }
    }
    // The filter runs once per field: the fields kept, then their sizes, then the copies.
    let mut kept = [0u8; PARSE_HEADERS];
    let (mut fields, mut bytes) = (0, 0);
    for (i, h) in raw.iter().enumerate() {
        if fields == MAX_HEADERS {
            break;
        }
        if keep.is_none_or(|keep| keep(h.name)) {
            // `raw` has at most PARSE_HEADERS (128) fields: an index fits a byte.
            kept[fields] = i as u8;
            fields += 1;
            bytes += h.name.len() + h.value.len().min(MAX_HEADER_VALUE);
        }
    }
    let mut headers = Headers::with_capacity(fields, bytes);
    for &i in &kept[..fields] {
        let h = &raw[usize::from(i)];
        headers.push_lossy(h.name, h.value, MAX_HEADER_VALUE);
    }
    // Invalid UTF-8 grew the text past what was reserved: hold no more than it uses.
    headers.shrink_to_fit();
    Head {
        start,
        headers,
        length,
        transfer_encoding,
        chunked,
        len,
    }
}

/// Folds one Content-Length field into what earlier fields said; differing values are invalid.
fn merge_length(acc: Length, value: &[u8]) -> Length {
    let mut acc = acc;
    for part in value.split(|&b| b == b',') {
        let part = part.trim_ascii();
        let parsed = if !part.is_empty() && part.iter().all(u8::is_ascii_digit) {
            std::str::from_utf8(part)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
        } else {
            None
        };
        acc = match (acc, parsed) {
            (_, None) | (Length::Invalid, _) => Length::Invalid,
            (Length::Absent, Some(v)) => Length::Value(v),
            (Length::Value(a), Some(v)) if a == v => Length::Value(v),
            (Length::Value(_), Some(_)) => Length::Invalid,
        };
    }
    acc
}

/// Whether `buf[from..]` holds the empty line that ends a head (`\n\n` or `\n\r\n`).
fn has_head_end(buf: &[u8], from: usize) -> bool {
    let tail = &buf[from.min(buf.len())..];
    tail.windows(2).any(|w| w == b"\n\n") || tail.windows(3).any(|w| w == b"\n\r\n")
}

/// A chunk-size line (`1a2b\r\n`, `1a;ext\r\n`) at the start of `data`.
fn chunk_line_start(data: &[u8]) -> bool {
    let digits = data.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    (1..=16).contains(&digits) && matches!(data.get(digits), Some(b'\r' | b'\n' | b';'))
}

/// Offset of the first plausible message start right after a CRLF in `data`.
fn find_message_start(data: &[u8]) -> Option<usize> {
    let mut from = 1;
    while from < data.len() {
        let nl = from + data[from..].iter().position(|&b| b == b'\n')?;
        let next = nl + 1;
        if data[nl - 1] == b'\r' && next < data.len() && message_start(&data[next..]) != Start::No {
            return Some(next);
        }
        from = next;
    }
    None
}

impl Http1Parser {
    /// A parser for a new connection; both directions start unsynchronised.
    pub fn new() -> Self {
        Self::default()
    }

    /// A parser whose exchanges keep only the header fields `keep` accepts. Framing
    /// (`Content-Length`, `Transfer-Encoding`) is read from every field either way.
    pub fn keeping(keep: HeaderFilter) -> Self {
        Http1Parser {
            keep: Some(keep),
            ..Self::default()
        }
    }

    /// Approximate heap bytes held for this connection (head buffers and pending requests).
    pub fn held_bytes(&self) -> usize {
        let heads: usize = self.halves.iter().map(|h| h.head.capacity()).sum();
        let pending: usize = self
            .pending
            .iter()
            .map(|p| {
                mem::size_of::<Pending>()
                    + p.exchange.method.len()
                    + p.exchange.target.len()
                    + p.exchange.request_headers.heap_bytes()
                    + p.exchange.response_headers.heap_bytes()
            })
            .sum();
        heads + pending
    }

    fn half(&mut self, dir: Direction) -> &mut Half {
        &mut self.halves[slot(dir)]
    }

    fn set_state(&mut self, dir: Direction, state: State) {
        self.half(dir).state = state;
    }

    fn entry(&mut self, id: u64) -> Option<&mut Pending> {
        self.pending.iter_mut().rev().find(|p| p.id == id)
    }

    /// Counts `n` body bytes (or, while resynchronising, skipped bytes) for `owner`.
    fn add_body(&mut self, owner: Owner, n: u64, end_ns: u64) {
        let Some(id) = owner.id() else { return };
        if let Some(p) = self.entry(id) {
            match owner {
                Owner::Request(_) => {
                    p.exchange.request_body_size = p.exchange.request_body_size.saturating_add(n)
                }
                Owner::Response(_) => {
                    p.exchange.response_body_size = p.exchange.response_body_size.saturating_add(n)
                }
            }
            p.end_ns = p.end_ns.max(end_ns);
        }
    }

    fn mark_partial(&mut self, owner: Owner) {
        if let Some(p) = owner.id().and_then(|id| self.entry(id)) {
            p.partial = true;
        }
    }

    /// Counts a skipped run once, however many bytes or chunks it spans.
    fn skip(&mut self, dir: Direction, reason: SkipReason, out: &mut Vec<Output>) {
        let half = self.half(dir);
        if !half.skip_counted {
            half.skip_counted = true;
            out.push(Output::Skipped(reason));
        }
    }

    /// Loses sync for a reason already counted, so the bytes skipped next are not counted again.
    fn resync(&mut self, dir: Direction, owner: Option<Owner>, chunked: bool) {
        let half = self.half(dir);
        half.skip_counted = true;
        half.head = Vec::new();
        let owner = owner.filter(|o| o.id().is_some());
        half.state = State::Resync { owner, chunked };
    }

    fn emit(&mut self, p: Pending, outcome: Outcome, out: &mut Vec<Output>) {
        out.push(Output::Exchange(Exchange {
            role: Role::of_request_direction(p.dir),
            start_ns: p.start.ns,
            end_ns: p.end_ns,
            request_offset: p.start.offset,
            request_thread: p.start.thread,
            outcome,
            detail: Detail::Http(p.exchange),
        }));
    }

    /// Emits the pending exchange `id` if it is the oldest one, with `end_ns` as its last byte.
    fn finish_response(&mut self, id: u64, end_ns: u64, out: &mut Vec<Output>) {
        if self.pending.front().is_some_and(|p| p.id == id)
            && let Some(mut p) = self.pending.pop_front()
        {
            p.end_ns = p.end_ns.max(end_ns);
            let outcome = if p.partial {
                Outcome::Partial
            } else {
                Outcome::Complete
            };
            self.emit(p, outcome, out);
        }
    }

    /// The connection stopped being HTTP/1.x (or closed): ignore everything from now on.
    fn stop(&mut self) {
        self.stopped = true;
        for half in &mut self.halves {
            half.head = Vec::new();
            half.state = State::Head;
        }
    }

    fn push_request(&mut self, mut p: Pending, out: &mut Vec<Output>) -> u64 {
        if self.pending.len() >= MAX_PENDING {
            self.pending.pop_front();
            out.push(Output::Skipped(SkipReason::TooManyPending));
        }
        p.id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let id = p.id;
        self.pending.push_back(p);
        id
    }

    /// The oldest request, sent the other way and not yet answered, that a response in `dir` answers.
    fn pair(&self, dir: Direction) -> Option<u64> {
        self.pending
            .front()
            .filter(|p| p.dir != dir && !p.responding)
            .map(|p| p.id)
    }

    fn request_entry(
        dir: Direction,
        method: String,
        target: String,
        version: u8,
        start: Origin,
        end_ns: u64,
    ) -> Pending {
        Pending {
            id: 0,
            dir,
            head_method: method == "HEAD",
            connect: method == "CONNECT",
            exchange: HttpExchange {
                method,
                target,
                version,
                ..HttpExchange::default()
            },
            start,
            end_ns,
            partial: false,
            responding: false,
        }
    }

    /// Reads a head from `data`, which starts at stream position `at`.
    fn on_head(
        &mut self,
        dir: Direction,
        data: &[u8],
        at: u64,
        timing: Timing,
        out: &mut Vec<Output>,
    ) -> usize {
        if self.half(dir).head.is_empty() {
            // Some clients send an extra CRLF after a body; it belongs to no message.
            let blank = data
                .iter()
                .take_while(|&&b| b == b'\r' || b == b'\n')
                .count();
            if blank > 0 {
                return blank;
            }
            self.half(dir).head_start = Origin::new(timing, at);
            // Most heads arrive whole: parse them in place without copying.
            match parse_head(data, self.keep) {
                HeadParse::Complete(head) => {
                    let len = head.len;
                    self.on_message(dir, head, timing, out);
                    return len;
                }
                HeadParse::Invalid => {
                    self.skip(dir, SkipReason::Garbage, out);
                    self.resync(dir, None, false);
                    return 1;
                }
                HeadParse::TooManyHeaders => {
                    out.push(Output::Skipped(SkipReason::HeadTooLarge));
                    let owner = self.head_lost(dir, data, timing, out);
                    self.resync(dir, owner, false);
                    return data.len().min(MAX_HEAD + 1);
                }
                HeadParse::Partial => {}
            }
        }
        let half = self.half(dir);
        let old = half.head.len();
        let take = data.len().min(MAX_HEAD + 1 - old);
        half.head.extend_from_slice(&data[..take]);
        let new = half.head.len();
        // Re-parsing on every small feed would be quadratic; parse when the head may be complete,
        // and at each doubling so garbage is still rejected early.
        let check = old > 0
            && (has_head_end(&half.head, old.saturating_sub(2))
                || old.leading_zeros() != new.leading_zeros());
        if check {
            let keep = self.keep;
            match parse_head(&self.half(dir).head, keep) {
                HeadParse::Complete(head) => {
                    let used = head.len.saturating_sub(old);
                    let half = self.half(dir);
                    if half.head.capacity() > KEEP_HEAD_CAPACITY {
                        half.head = Vec::new();
                    } else {
                        half.head.clear();
                    }
                    self.on_message(dir, head, timing, out);
                    return used;
                }
                HeadParse::Invalid => {
                    self.skip(dir, SkipReason::Garbage, out);
                    self.resync(dir, None, false);
                    return 0;
                }
                HeadParse::TooManyHeaders => {
                    out.push(Output::Skipped(SkipReason::HeadTooLarge));
                    let buf = mem::take(&mut self.half(dir).head);
                    let owner = self.head_lost(dir, &buf, timing, out);
                    self.resync(dir, owner, false);
                    return take;
                }
                HeadParse::Partial => {}
            }
        }
        if new > MAX_HEAD {
            out.push(Output::Skipped(SkipReason::HeadTooLarge));
            let buf = mem::take(&mut self.half(dir).head);
            let owner = self.head_lost(dir, &buf, timing, out);
            self.resync(dir, owner, false);
        } else {
            self.set_state(dir, State::Head);
        }
        take
    }

    /// A head in `dir` will never be complete; `buf` is what was seen of it (nothing when the whole
    /// head fell in a gap) and the half's `head_start` where it began. Records what is known of
    /// the message, so that requests and responses still pair in order, and returns the message
    /// whose remaining bytes follow.
    fn head_lost(
        &mut self,
        dir: Direction,
        buf: &[u8],
        timing: Timing,
        out: &mut Vec<Output>,
    ) -> Option<Owner> {
        let start = match partial_start_line(buf) {
            Some(start) => start,
            // Bytes were transferred, so a message started here: guess its kind from what this
            // direction carried before, and record it without a start line.
            None => match (buf.is_empty(), self.half(dir).last_kind) {
                (false, _) if looks_like_response(buf) => StartLine::Response { code: 0 },
                (false, _) | (true, Some(Kind::Request)) => StartLine::Request {
                    method: String::new(),
                    target: String::new(),
                    version: 1,
                },
                (true, Some(Kind::Response)) => StartLine::Response { code: 0 },
                (true, None) => return None,
            },
        };
        match start {
            StartLine::Request {
                method,
                target,
                version,
            } => {
                let start = self.half(dir).head_start;
                let mut p = Self::request_entry(dir, method, target, version, start, timing.end_ns);
                p.partial = true;
                Some(Owner::Request(self.push_request(p, out)))
            }
            StartLine::Response { code } if (100..200).contains(&code) && code != 101 => None,
            StartLine::Response { code } => {
                let Some(id) = self.pair(dir) else {
                    out.push(Output::Skipped(SkipReason::UnpairedResponse));
                    return None;
                };
                let p = self.entry(id)?;
                p.responding = true;
                p.partial = true;
                p.exchange.status = (code != 0).then_some(code);
                p.end_ns = p.end_ns.max(timing.end_ns);
                if code == 101 {
                    self.finish_response(id, timing.end_ns, out);
                    self.stop();
                    return None;
                }
                Some(Owner::Response(Some(id)))
            }
        }
    }

    fn on_message(&mut self, dir: Direction, head: Head, timing: Timing, out: &mut Vec<Output>) {
        let half = self.half(dir);
        half.skip_counted = false;
        half.last_kind = Some(match head.start {
            StartLine::Request { .. } => Kind::Request,
            StartLine::Response { .. } => Kind::Response,
        });
        match head.start {
            StartLine::Request {
                method,
                target,
                version,
            } => {
                let body = if head.transfer_encoding {
                    // A request body must be chunked when a transfer coding is applied (RFC 9112 6.3).
                    if head.chunked {
                        BodyKind::Framed(Framing::Chunked(Chunk::size_line()))
                    } else {
                        BodyKind::Invalid
                    }
                } else {
                    match head.length {
                        Length::Absent | Length::Value(0) => BodyKind::None,
                        Length::Value(n) => BodyKind::Framed(Framing::Length(n)),
                        Length::Invalid => BodyKind::Invalid,
                    }
                };
                let start = self.half(dir).head_start;
                let mut p = Self::request_entry(dir, method, target, version, start, timing.end_ns);
                p.exchange.request_headers = head.headers;
                let owner = Owner::Request(self.push_request(p, out));
                self.start_body(dir, owner, body, timing, out);
            }
            StartLine::Response { code } => self.on_response(dir, code, head, timing, out),
        }
    }

    fn on_response(
        &mut self,
        dir: Direction,
        code: u16,
        head: Head,
        timing: Timing,
        out: &mut Vec<Output>,
    ) {
        if (100..200).contains(&code) && code != 101 {
            // Interim response: the final one follows.
            self.set_state(dir, State::Head);
            return;
        }
        let Some(p) = self.pair(dir).and_then(|id| self.entry(id)) else {
            out.push(Output::Skipped(SkipReason::UnpairedResponse));
            if code == 101 {
                self.stop();
                return;
            }
            let body = response_body(&head, code, false);
            self.start_body(dir, Owner::Response(None), body, timing, out);
            return;
        };
        let id = p.id;
        let tunnel = code == 101 || (p.connect && (200..300).contains(&code));
        let body = response_body(&head, code, p.head_method);
        p.responding = true;
        p.exchange.status = Some(code);
        p.exchange.response_headers = head.headers;
        p.end_ns = p.end_ns.max(timing.end_ns);
        if tunnel {
            self.finish_response(id, timing.end_ns, out);
            self.stop();
            return;
        }
        self.start_body(dir, Owner::Response(Some(id)), body, timing, out);
    }

    fn start_body(
        &mut self,
        dir: Direction,
        owner: Owner,
        body: BodyKind,
        timing: Timing,
        out: &mut Vec<Output>,
    ) {
        match body {
            BodyKind::None => self.end_message(dir, owner, timing.end_ns, out),
            BodyKind::Framed(framing) => self.set_state(dir, State::Body { owner, framing }),
            BodyKind::Invalid => {
                out.push(Output::Skipped(SkipReason::Garbage));
                self.mark_partial(owner);
                self.resync(dir, Some(owner), false);
            }
        }
    }

    /// The message `owner` ended at a chunk ending at `end_ns`; `dir` is back at a message boundary.
    fn end_message(&mut self, dir: Direction, owner: Owner, end_ns: u64, out: &mut Vec<Output>) {
        self.set_state(dir, State::Head);
        match owner {
            Owner::Request(id) => {
                if let Some(p) = self.entry(id) {
                    p.end_ns = p.end_ns.max(end_ns);
                }
            }
            Owner::Response(Some(id)) => self.finish_response(id, end_ns, out),
            Owner::Response(None) => {}
        }
    }

    fn on_body(
        &mut self,
        dir: Direction,
        data: &[u8],
        owner: Owner,
        framing: Framing,
        timing: Timing,
        out: &mut Vec<Output>,
    ) -> usize {
        match framing {
            Framing::Length(rem) => {
                let n = rem.min(data.len() as u64);
                self.add_body(owner, n, timing.end_ns);
                if rem == n {
                    self.end_message(dir, owner, timing.end_ns, out);
                } else {
                    self.set_state(
                        dir,
                        State::Body {
                            owner,
                            framing: Framing::Length(rem - n),
                        },
                    );
                }
                n as usize
            }
            Framing::UntilClose => {
                self.add_body(owner, data.len() as u64, timing.end_ns);
                self.set_state(dir, State::Body { owner, framing });
                data.len()
            }
            Framing::Chunked(mut chunk) => {
                let mut used = 0;
                loop {
                    let step = chunk.step(&data[used..]);
                    used += step.used;
                    if step.body > 0 {
                        self.add_body(owner, step.body, timing.end_ns);
                    }
                    match step.end {
                        ChunkEnd::Done => {
                            self.end_message(dir, owner, timing.end_ns, out);
                            return used;
                        }
                        ChunkEnd::Invalid => {
                            self.skip(dir, SkipReason::Garbage, out);
                            self.mark_partial(owner);
                            self.resync(dir, Some(owner), true);
                            return used;
                        }
                        ChunkEnd::More if used == data.len() => {
                            self.set_state(
                                dir,
                                State::Body {
                                    owner,
                                    framing: Framing::Chunked(chunk),
                                },
                            );
                            return used;
                        }
                        ChunkEnd::More => {}
                    }
                }
            }
        }
    }

    /// Skips bytes until a plausible message start. `at_chunk_start`: `data` begins a captured chunk,
    /// where writes (and so messages) usually begin.
    fn on_resync(
        &mut self,
        dir: Direction,
        data: &[u8],
        at_chunk_start: bool,
        (owner, chunked): (Option<Owner>, bool),
        timing: Timing,
        out: &mut Vec<Output>,
    ) -> usize {
        if at_chunk_start {
            if let Some(owner) = owner
                && chunked
                && chunk_line_start(data)
            {
                self.set_state(
                    dir,
                    State::Body {
                        owner,
                        framing: Framing::Chunked(Chunk::size_line()),
                    },
                );
                return 0;
            }
            if message_start(data) != Start::No {
                self.resync_found(dir, owner, timing, out);
                return 0;
            }
        }
        let found = find_message_start(data);
        let skipped = found.unwrap_or(data.len());
        match owner {
            Some(owner) => self.add_body(owner, skipped as u64, timing.end_ns),
            None => self.skip(dir, SkipReason::Garbage, out),
        }
        if found.is_some() {
            self.resync_found(dir, owner, timing, out);
        } else {
            self.set_state(dir, State::Resync { owner, chunked });
        }
        skipped
    }

    /// A message starts where resynchronisation stopped: the message being skipped ended before it.
    fn resync_found(
        &mut self,
        dir: Direction,
        owner: Option<Owner>,
        timing: Timing,
        out: &mut Vec<Output>,
    ) {
        self.set_state(dir, State::Head);
        self.half(dir).head = Vec::new();
        if let Some(Owner::Response(Some(id))) = owner {
            let end_ns = self.entry(id).map_or(timing.start_ns, |p| p.end_ns);
            self.finish_response(id, end_ns, out);
        }
    }

    /// `len` bytes from stream position `at` were lost.
    fn on_gap(&mut self, dir: Direction, at: u64, len: u64, timing: Timing, out: &mut Vec<Output>) {
        let state = mem::replace(&mut self.half(dir).state, State::Head);
        match state {
            State::Head => self.head_gap(dir, at, timing, out),
            State::Resync { owner, chunked } => {
                if let Some(owner) = owner {
                    self.add_body(owner, len, timing.end_ns);
                }
                self.set_state(dir, State::Resync { owner, chunked });
            }
            State::Body { owner, framing } => {
                self.mark_partial(owner);
                match framing {
                    Framing::Length(rem) if len < rem => {
                        self.add_body(owner, len, timing.end_ns);
                        self.set_state(
                            dir,
                            State::Body {
                                owner,
                                framing: Framing::Length(rem - len),
                            },
                        );
                    }
                    Framing::Length(rem) => {
                        self.add_body(owner, rem, timing.end_ns);
                        self.end_message(dir, owner, timing.end_ns, out);
                        if len > rem {
                            self.head_gap(dir, at.saturating_add(rem), timing, out);
                        }
                    }
                    Framing::UntilClose => {
                        self.add_body(owner, len, timing.end_ns);
                        self.set_state(dir, State::Body { owner, framing });
                    }
                    Framing::Chunked(Chunk::Data(rem)) if len <= rem => {
                        self.add_body(owner, len, timing.end_ns);
                        let chunk = if len == rem {
                            Chunk::DataEnd { cr: false }
                        } else {
                            Chunk::Data(rem - len)
                        };
                        self.set_state(
                            dir,
                            State::Body {
                                owner,
                                framing: Framing::Chunked(chunk),
                            },
                        );
                    }
                    Framing::Chunked(_) => {
                        // The chunk framing inside the gap is unknown: count all of it as body, the
                        // exchange is reported partial anyway.
                        self.add_body(owner, len, timing.end_ns);
                        out.push(Output::Skipped(SkipReason::Gap));
                        self.resync(dir, Some(owner), true);
                    }
                }
            }
        }
    }

    /// A gap where a head was expected or being read: whatever it held is lost. `at` is where
    /// the gap met the message boundary, the best guess of where a head wholly lost in it began.
    fn head_gap(&mut self, dir: Direction, at: u64, timing: Timing, out: &mut Vec<Output>) {
        out.push(Output::Skipped(SkipReason::Gap));
        let half = self.half(dir);
        let buf = mem::take(&mut half.head);
        if buf.is_empty() {
            half.head_start = Origin::new(timing, at);
        }
        let owner = self.head_lost(dir, &buf, timing, out);
        if !self.stopped {
            self.resync(dir, owner, false);
        }
    }
}

/// Body framing of a response (RFC 9112 section 6.3). `no_body`: the request was HEAD.
fn response_body(head: &Head, code: u16, no_body: bool) -> BodyKind {
    if no_body || code == 204 || code == 304 || (100..200).contains(&code) {
        return BodyKind::None;
    }
    if head.transfer_encoding {
        return if head.chunked {
            BodyKind::Framed(Framing::Chunked(Chunk::size_line()))
        } else {
            BodyKind::Framed(Framing::UntilClose)
        };
    }
    match head.length {
        Length::Absent => BodyKind::Framed(Framing::UntilClose),
        Length::Value(0) => BodyKind::None,
        Length::Value(n) => BodyKind::Framed(Framing::Length(n)),
        Length::Invalid => BodyKind::Invalid,
    }
}

impl ConnectionParser for Http1Parser {
    fn protocol(&self) -> Protocol {
        Protocol::Http1
    }

    fn feed(&mut self, dir: Direction, data: &[u8], timing: Timing, out: &mut Vec<Output>) {
        let half = self.half(dir);
        let base = half.seen;
        half.seen = base.saturating_add(data.len() as u64);
        let mut pos = 0;
        // A chunk boundary is tried as a message start once per feed, so a failed attempt there
        // cannot loop.
        let mut boundary = true;
        while pos < data.len() && !self.stopped {
            let rest = &data[pos..];
            let state = mem::replace(&mut self.half(dir).state, State::Head);
            pos += match state {
                State::Head => {
                    let at = base.saturating_add(pos as u64);
                    self.on_head(dir, rest, at, timing, out)
                }
                State::Body { owner, framing } => {
                    self.on_body(dir, rest, owner, framing, timing, out)
                }
                State::Resync { owner, chunked } => {
                    let at_start = boundary && pos == 0;
                    boundary = false;
                    self.on_resync(dir, rest, at_start, (owner, chunked), timing, out)
                }
            };
        }
    }

    fn gap(&mut self, dir: Direction, len: u64, timing: Timing, out: &mut Vec<Output>) {
        let half = self.half(dir);
        let at = half.seen;
        half.seen = at.saturating_add(len);
        if self.stopped || len == 0 {
            return;
        }
        self.on_gap(dir, at, len, timing, out);
    }

    fn close(&mut self, _ts_ns: u64, out: &mut Vec<Output>) {
        // A response read until close is complete now; one skipped after lost framing is partial.
        let mut until_close = None;
        let mut lost = None;
        for half in &self.halves {
            match half.state {
                State::Body {
                    owner: Owner::Response(Some(id)),
                    framing: Framing::UntilClose,
                } => until_close = Some(id),
                State::Resync {
                    owner: Some(Owner::Response(Some(id))),
                    ..
                } => lost = Some(id),
                _ => {}
            }
        }
        while let Some(p) = self.pending.pop_front() {
            let outcome = if Some(p.id) == until_close {
                if p.partial {
                    Outcome::Partial
                } else {
                    Outcome::Complete
                }
            } else if p.responding && (p.partial || Some(p.id) == lost) {
                Outcome::Partial
            } else {
                Outcome::NoResponse
            };
            self.emit(p, outcome, out);
        }
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Heap a connection may hold at worst: two head buffers (Vec growth may double them) and a
    /// full pending queue whose strings came from a request head and a response head (lossy
    /// UTF-8 at most triples bytes), with the field positions of both.
    const HELD_BOUND: usize = 2 * 2 * (MAX_HEAD + 1)
        + MAX_PENDING * (mem::size_of::<Pending>() + 2 * 3 * MAX_HEAD + 2 * MAX_HEADERS * 8);

    fn check_bounds(p: &Http1Parser, out: &[Output]) {
        for half in &p.halves {
            assert!(
                half.head.len() <= MAX_HEAD + 1,
                "head buffer {}",
                half.head.len()
            );
        }
        assert!(p.pending.len() <= MAX_PENDING);
        assert!(p.held_bytes() <= HELD_BOUND, "held {}", p.held_bytes());
        for o in out {
            if let Output::Exchange(e) = o {
                assert!(e.start_ns <= e.end_ns, "{e:?}");
                let Detail::Http(h) = &e.detail else {
                    panic!("not an HTTP/1 exchange: {e:?}")
                };
                assert!(
                    h.request_headers.len() <= MAX_HEADERS
                        && h.response_headers.len() <= MAX_HEADERS
                );
                assert!(
                    h.request_headers
                        .iter()
                        .chain(h.response_headers.iter())
                        .all(|(_, v)| v.len() <= MAX_HEADER_VALUE)
                );
            }
        }
    }

    /// Checks `p` and its outputs, `given` bytes having been fed or lost per direction, and
    /// counts the outputs as (exchanges, skips).
    fn settle(
        p: &Http1Parser,
        given: [u64; 2],
        out: &mut Vec<Output>,
        counts: &mut (usize, usize),
    ) {
        check_bounds(p, out);
        for o in out.drain(..) {
            match o {
                Output::Exchange(e) => {
                    let dir = match e.role {
                        Role::Client => Direction::Send,
                        Role::Server => Direction::Recv,
                    };
                    assert!(e.request_offset < given[slot(dir)], "{e:?}");
                    counts.0 += 1;
                }
                Output::Skipped(_) => counts.1 += 1,
            }
        }
    }

    /// Feeds `stream` to fresh parsers in random pieces, directions, gaps and closes.
    fn drive(rng: &mut Rng, stream: &[u8], max_piece: u64) -> (usize, usize) {
        let mut p = Http1Parser::new();
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
            let dir = if rng.below(2) == 0 {
                Direction::Send
            } else {
                Direction::Recv
            };
            match rng.below(100) {
                0..=3 => {
                    let len = rng.below(100_000);
                    given[slot(dir)] += len;
                    p.gap(dir, len, timing, &mut out);
                }
                4 => {
                    p.close(clock, &mut out);
                    settle(&p, given, &mut out, &mut counts);
                    p = Http1Parser::new();
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
        assert_eq!(exchanges, 0, "random bytes are not HTTP");
        assert!(skips > 0, "random bytes must be counted as skipped");
    }

    #[test]
    fn http_token_soup_never_panics_and_stays_bounded() {
        // Fragments that reach deep parser states: heads, framing headers, chunk lines, interim
        // and upgrade responses, and long runs without line breaks.
        let tokens: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\n",
            b"POST /p HTTP/1.1\r\n",
            b"HEAD / HTTP/1.0\r\n",
            b"CONNECT h:1 HTTP/1.1\r\n",
            b"HTTP/1.1 200 OK\r\n",
            b"HTTP/1.1 100 Continue\r\n",
            b"HTTP/1.1 101 Switching\r\n",
            b"HTTP/1.0 304 NM\r\n",
            b"Content-Length: 7\r\n",
            b"Content-Length: 99999999999\r\n",
            b"Content-Length: x\r\n",
            b"Transfer-Encoding: chunked\r\n",
            b"Transfer-Encoding: gzip\r\n",
            b"X: y\r\n",
            b"\r\n",
            b"\r\n\r\n",
            b"5\r\nhello\r\n",
            b"0\r\n\r\n",
            b"ffffffffffffffffff\r\n",
            b"1;ext=1\r\n",
            b"\n",
            b"\xff\x00",
            b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        ];
        let mut rng = Rng(7);
        let mut exchanges = 0;
        for round in 0..40 {
            let mut stream = Vec::new();
            while stream.len() < 64 * 1024 {
                stream.extend_from_slice(tokens[rng.below(tokens.len() as u64) as usize]);
            }
            let max_piece = [1, 16, 4096][round % 3];
            exchanges += drive(&mut rng, &stream, max_piece).0;
        }
        assert!(
            exchanges > 0,
            "the soup must reach complete exchanges to exercise body states"
        );
    }

    #[test]
    fn long_lines_without_end_are_cut_at_the_head_limit() {
        let mut p = Http1Parser::new();
        let mut out = Vec::new();
        let t = Timing::default();
        p.feed(Direction::Send, b"GET /", t, &mut out);
        for _ in 0..100 {
            p.feed(Direction::Send, &[b'a'; 1000], t, &mut out);
            check_bounds(&p, &out);
        }
        assert!(
            out.contains(&Output::Skipped(SkipReason::HeadTooLarge)),
            "{out:?}"
        );
    }

    #[test]
    fn head_buffer_is_released_after_a_large_head() {
        let mut p = Http1Parser::new();
        let mut out = Vec::new();
        let mut req = b"GET / HTTP/1.1\r\n".to_vec();
        req.extend(format!("X: {}\r\n\r\n", "v".repeat(10_000)).bytes());
        for piece in req.chunks(100) {
            p.feed(Direction::Send, piece, Timing::default(), &mut out);
        }
        assert_eq!(p.pending.len(), 1);
        assert!(p.halves[0].head.capacity() <= KEEP_HEAD_CAPACITY);
    }

    #[test]
    fn message_start_patterns() {
        assert_eq!(message_start(b"GET /x"), Start::Yes);
        assert_eq!(message_start(b"PATCH http://h/"), Start::Yes);
        assert_eq!(message_start(b"HTTP/1.0 "), Start::Yes);
        assert_eq!(message_start(b"HTTP/1.0"), Start::Maybe);
        assert_eq!(message_start(b"GET "), Start::Maybe);
        assert_eq!(message_start(b""), Start::Maybe);
        assert_eq!(message_start(b"GET\t/"), Start::No);
        assert_eq!(message_start(b"HTTP/2 200"), Start::No);
        assert_eq!(message_start(b"FOO / HTTP/1.1"), Start::No);
    }

    #[test]
    fn chunk_lines_and_content_lengths() {
        assert!(chunk_line_start(b"1a\r\n"));
        assert!(chunk_line_start(b"0;x=y\r\n"));
        assert!(!chunk_line_start(b"\r\n"));
        assert!(!chunk_line_start(b"12345678901234567\r\n"));
        assert!(!chunk_line_start(b"zz\r\n"));
        assert_eq!(merge_length(Length::Absent, b" 42 "), Length::Value(42));
        assert_eq!(merge_length(Length::Absent, b"42, 42"), Length::Value(42));
        assert_eq!(merge_length(Length::Value(42), b"43"), Length::Invalid);
        assert_eq!(merge_length(Length::Absent, b"+42"), Length::Invalid);
        assert_eq!(
            merge_length(Length::Absent, b"99999999999999999999999"),
            Length::Invalid
        );
    }
}
