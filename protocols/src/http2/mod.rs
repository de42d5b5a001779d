//! HTTP/2 (RFC 9113) with HPACK (RFC 7541), and gRPC on top of it.
//!
//! [`Http2Parser`] sees both directions of one connection. Each direction has a frame reader and an
//! HPACK decoder; streams share one table keyed by stream id, and each stream becomes one exchange:
//! the request is the client's HEADERS (+CONTINUATION) and DATA, the response the server's HEADERS,
//! DATA and trailers. A stream is reported when both sides ended it, when it is reset, when a GOAWAY
//! says it was not processed, or when the connection closes. Header blocks are buffered (at most
//! [`MAX_HEADER_BLOCK`] bytes per direction); DATA is counted, never stored.
//!
//! The client is the side that sent the preface or, when the capture joined mid-connection, the side
//! whose header block carries request pseudo-headers. A direction whose first bytes are not the
//! preface looks for a plausible frame header first. A gap inside a frame's payload keeps the
//! framing; any other gap loses it, and the direction looks for frames again. HPACK state that was
//! not seen (mid-connection join, gap, unreadable block) makes the direction's dynamic table
//! unknown: fields that refer to it are left out and the exchange is marked `degraded`, so a method
//! or path may be missing but is never wrong.

mod frame;
mod hpack;
mod huffman;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::mem;

use crate::{
    ConnectionParser, Detail, Detection, Direction, Exchange, Origin, Outcome, Output, Protocol,
    Role, SkipReason, Timing,
};
use frame::FrameHeader;

/// One HTTP/2 stream's request and response (a gRPC call when the content type says so).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Http2Exchange {
    /// Stream id.
    pub stream_id: u32,
    /// `:method`, when decoded.
    pub method: Option<String>,
    /// `:scheme`, when decoded.
    pub scheme: Option<String>,
    /// `:path`, when decoded (at most [`MAX_PATH`] bytes; longer paths are left out).
    pub path: Option<String>,
    /// `:authority`, when decoded.
    pub authority: Option<String>,
    /// `:status` of the final response.
    pub status: Option<u16>,
    /// Request headers (regular, not pseudo-headers), bounded.
    pub request_headers: Vec<(String, String)>,
    /// Response headers, bounded.
    pub response_headers: Vec<(String, String)>,
    /// Trailers, bounded.
    pub trailers: Vec<(String, String)>,
    /// Request DATA bytes (padding excluded).
    pub request_body_size: u64,
    /// Response DATA bytes (padding excluded).
    pub response_body_size: u64,
    /// The request or response content type is `application/grpc*`.
    pub grpc: bool,
    /// `grpc-status` from the trailers, or from a trailers-only response.
    pub grpc_status: Option<u32>,
    /// `grpc-message`, percent-decoded.
    pub grpc_message: Option<String>,
    /// RST_STREAM error code, when the stream was reset.
    pub reset: Option<u32>,
    /// Some header fields could not be decoded (HPACK state unknown or lost): a `None` above may
    /// be a field that was sent.
    pub degraded: bool,
}

impl Http2Exchange {
    /// First request header named `name` (case-insensitive).
    pub fn request_header(&self, name: &str) -> Option<&str> {
        find(&self.request_headers, name)
    }
    /// First response header named `name` (case-insensitive).
    pub fn response_header(&self, name: &str) -> Option<&str> {
        find(&self.response_headers, name)
    }
}

fn find<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Most streams tracked per connection; beyond it the oldest is dropped.
pub const MAX_STREAMS: usize = 1024;
/// Largest header block (HEADERS and its CONTINUATIONs) buffered; larger blocks are skipped.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// Most regular headers kept per header list.
pub const MAX_HEADERS: usize = 64;
/// Longest header name or value kept, in bytes (longer ones are cut).
pub const MAX_HEADER_VALUE: usize = 1024;
/// Most bytes of names and values kept per header list; later headers are dropped.
pub const MAX_HEADER_BYTES: usize = 4096;
/// Longest `:path` kept; a longer one is left out (and the exchange marked degraded).
pub const MAX_PATH: usize = 4096;

/// The client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A block buffer that grew beyond this is released after use, so idle connections do not keep
/// the worst case.
const KEEP_BLOCK_CAPACITY: usize = 4096;
/// Longest `:method` kept.
const MAX_METHOD: usize = 64;

/// Whether the bytes start an HTTP/2 connection (client preface, in either direction: the traced
/// process may be either end) or look like HTTP/2 frames of a connection joined mid-way.
pub fn probe(_dir: Direction, data: &[u8]) -> Detection {
    let n = data.len().min(PREFACE.len());
    if data[..n] == PREFACE[..n] {
        return if n == PREFACE.len() {
            Detection::Found(Protocol::Http2)
        } else {
            Detection::NeedMore
        };
    }
    if frame::looks_like_frames(data) {
        Detection::Found(Protocol::Http2)
    } else {
        Detection::Unknown
    }
}

/// HTTP/2 connection parser (both directions).
#[derive(Debug, Default)]
pub struct Http2Parser {
    /// Per direction, indexed by [`slot`].
    halves: [Half; 2],
    streams: BTreeMap<u32, Stream>,
    /// The direction the client's frames travel in, once known.
    client: Option<Direction>,
    /// Highest stream id the client opened, so late frames of reported streams are recognised.
    last_opened: u32,
    /// Set by close: further input is ignored.
    stopped: bool,
}

/// State of one direction.
#[derive(Debug)]
struct Half {
    read: Read,
    /// Largest frame payload the receiver accepts (its SETTINGS_MAX_FRAME_SIZE); a larger frame
    /// means the framing was not what it seemed.
    max_frame: u32,
    hpack: hpack::Decoder,
    /// The header block being assembled.
    block: Option<Block>,
    /// Bytes of that block (kept across blocks to reuse the allocation).
    block_buf: Vec<u8>,
    /// Bytes (or a gap) were seen in this direction.
    started: bool,
    /// A header block started in this direction.
    had_block: bool,
    /// The current run of skipped bytes has been counted.
    skip_counted: bool,
    /// Bytes given in this direction so far, fed or lost in gaps: the stream position of the
    /// next byte.
    seen: u64,
}

#[derive(Debug, Default)]
enum Read {
    /// Matching the client preface; `matched` bytes so far.
    Preface { matched: usize },
    /// Reading a frame header.
    Header(PartialHeader),
    /// Inside a frame's payload.
    Payload(Frame),
    /// Framing unknown: looking for a plausible frame header.
    #[default]
    Resync,
}

impl Read {
    fn header() -> Read {
        Read::Header(PartialHeader {
            buf: [0; frame::HEADER_LEN],
            have: 0,
            start: Origin::default(),
        })
    }
}

impl Default for Half {
    /// A direction of a connection joined mid-way: no limit is known.
    fn default() -> Self {
        Half {
            read: Read::default(),
            max_frame: frame::MAX_FRAME_SIZE,
            hpack: hpack::Decoder::default(),
            block: None,
            block_buf: Vec::new(),
            started: false,
            had_block: false,
            skip_counted: false,
            seen: 0,
        }
    }
}

/// The bytes of a frame header read so far.
#[derive(Debug)]
struct PartialHeader {
    buf: [u8; frame::HEADER_LEN],
    have: usize,
    /// Where the first byte was.
    start: Origin,
}

/// A frame whose payload is being read.
#[derive(Debug)]
struct Frame {
    hdr: FrameHeader,
    /// Payload bytes consumed (or lost to gaps).
    done: u32,
    /// Pad length, once read.
    pad: u32,
    /// First payload bytes after the pad length (control frame fields, promised stream id), or
    /// the SETTINGS entry being read.
    small: [u8; 8],
    small_len: usize,
    /// SETTINGS_HEADER_TABLE_SIZE carried by this SETTINGS frame.
    table_size: Option<u32>,
    /// SETTINGS_MAX_FRAME_SIZE carried by this SETTINGS frame.
    max_frame: Option<u32>,
    /// Some payload bytes were not captured.
    lost: bool,
    /// The padding does not fit in the frame.
    bad: bool,
    /// A CONTINUATION with no header block to continue.
    orphan: bool,
}

impl Frame {
    fn new(hdr: FrameHeader, orphan: bool) -> Self {
        Frame {
            hdr,
            done: 0,
            pad: 0,
            small: [0; 8],
            small_len: 0,
            table_size: None,
            max_frame: None,
            lost: false,
            bad: false,
            orphan,
        }
    }

    fn keep(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.small.len() - self.small_len);
        self.small[self.small_len..self.small_len + n].copy_from_slice(&bytes[..n]);
        self.small_len += n;
    }

    /// The first 31-bit word kept (stream ids, error codes).
    fn word(&self, at: usize) -> Option<u32> {
        (self.small_len >= at + 4).then(|| {
            u32::from_be_bytes([
                self.small[at],
                self.small[at + 1],
                self.small[at + 2],
                self.small[at + 3],
            ])
        })
    }

    /// Consumes the next payload bytes `piece` and returns the part that is frame content: after
    /// the pad length and fixed fields, before the padding.
    fn content<'d>(&mut self, piece: &'d [u8]) -> &'d [u8] {
        let start = self.done;
        let end = start + piece.len() as u32;
        self.done = end;
        let prefix = self.hdr.prefix_len();
        for off in start..end.min(prefix) {
            let b = piece[(off - start) as usize];
            if self.hdr.padded() && off == 0 {
                self.pad = u32::from(b);
                self.bad = prefix + self.pad > self.hdr.len;
            } else {
                self.keep(&[b]);
            }
        }
        if self.bad {
            return &[];
        }
        let lo = start.max(prefix);
        let hi = end.min(self.hdr.len - self.pad);
        if lo < hi {
            &piece[(lo - start) as usize..(hi - start) as usize]
        } else {
            &[]
        }
    }

    /// Reads SETTINGS entries from content bytes, remembering the header table size.
    fn settings(&mut self, content: &[u8]) {
        for &b in content {
            self.small[self.small_len] = b;
            self.small_len += 1;
            if self.small_len == 6 {
                self.small_len = 0;
                let id = u16::from_be_bytes([self.small[0], self.small[1]]);
                let value = u32::from_be_bytes([
                    self.small[2],
                    self.small[3],
                    self.small[4],
                    self.small[5],
                ]);
                match id {
                    frame::SETTINGS_HEADER_TABLE_SIZE => self.table_size = Some(value),
                    frame::SETTINGS_MAX_FRAME_SIZE => {
                        self.max_frame =
                            Some(value.clamp(frame::DEFAULT_MAX_FRAME_SIZE, frame::MAX_FRAME_SIZE));
                    }
                    _ => {}
                }
            }
        }
    }
}

/// A header block being assembled from HEADERS or PUSH_PROMISE and CONTINUATION frames.
#[derive(Debug)]
struct Block {
    stream: u32,
    /// PUSH_PROMISE: the promised stream, once read.
    push: Option<u32>,
    is_push: bool,
    end_stream: bool,
    /// Where the first byte of its first frame's header was.
    start: Origin,
    /// Bytes of the block were not captured, or its frames were malformed.
    lost: bool,
    /// The block outgrew [`MAX_HEADER_BLOCK`].
    oversized: bool,
}

/// One stream's exchange being assembled.
#[derive(Debug)]
struct Stream {
    ex: Http2Exchange,
    /// First byte of the request HEADERS (or PUSH_PROMISE) frame.
    start: Origin,
    /// Last byte of any frame of this stream.
    last_ns: u64,
    /// Last byte of the response's END_STREAM frame.
    response_end_ns: u64,
    request_seen: bool,
    request_ended: bool,
    response_head: bool,
    response_ended: bool,
    /// Opened by the server with PUSH_PROMISE.
    pushed: bool,
    /// Bytes of this stream may have been lost.
    partial: bool,
}

impl Stream {
    fn new(id: u32, start: Origin, end_ns: u64) -> Self {
        Stream {
            ex: Http2Exchange {
                stream_id: id,
                ..Http2Exchange::default()
            },
            start,
            last_ns: end_ns,
            response_end_ns: end_ns,
            request_seen: false,
            request_ended: false,
            response_head: false,
            response_ended: false,
            pushed: false,
            partial: false,
        }
    }

    fn set_request(&mut self, f: Fields, start: Origin) {
        self.request_seen = true;
        self.start = start;
        self.ex.method = f.method;
        self.ex.scheme = f.scheme;
        self.ex.path = f.path;
        self.ex.authority = f.authority;
        self.ex.request_headers = f.headers;
        self.ex.grpc |= f.grpc;
    }

    fn set_response(&mut self, f: Fields) {
        self.response_head = true;
        self.ex.status = f.status;
        self.ex.response_headers = f.headers;
        self.ex.grpc |= f.grpc;
        self.set_grpc_status(f.grpc_status, f.grpc_message);
    }

    fn set_trailers(&mut self, f: Fields) {
        self.ex.trailers = f.headers;
        self.set_grpc_status(f.grpc_status, f.grpc_message);
    }

    fn set_grpc_status(&mut self, status: Option<u32>, message: Option<String>) {
        if status.is_some() {
            self.ex.grpc_status = status;
            self.ex.grpc_message = message;
        }
    }

    /// How the exchange ended, if it ends now.
    fn outcome(&self) -> Outcome {
        if self.response_ended {
            if self.partial {
                Outcome::Partial
            } else {
                Outcome::Complete
            }
        } else if self.partial && self.response_head {
            Outcome::Partial
        } else {
            Outcome::NoResponse
        }
    }

    fn held_bytes(&self) -> usize {
        let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        let list = |l: &[(String, String)]| {
            mem::size_of_val(l) + l.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
        };
        let e = &self.ex;
        mem::size_of::<Stream>()
            + opt(&e.method)
            + opt(&e.scheme)
            + opt(&e.path)
            + opt(&e.authority)
            + opt(&e.grpc_message)
            + list(&e.request_headers)
            + list(&e.response_headers)
            + list(&e.trailers)
    }
}

/// What a header block says, as far as it could be decoded.
#[derive(Debug, Default)]
struct Fields {
    method: Option<String>,
    scheme: Option<String>,
    path: Option<String>,
    authority: Option<String>,
    status: Option<u16>,
    /// A `:status` field was present (even if unparsable).
    has_status: bool,
    /// A request pseudo-header was present.
    request_pseudo: bool,
    headers: Vec<(String, String)>,
    /// Bytes of names and values in `headers`.
    kept: usize,
    grpc: bool,
    grpc_status: Option<u32>,
    grpc_message: Option<String>,
    /// Some field could not be decoded (HPACK state unknown or lost).
    unknown: bool,
    /// A pseudo-header was too long to keep.
    cut: bool,
}

/// Which message a header block starts, from its pseudo-headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Request,
    Response,
    Unknown,
}

impl Fields {
    fn lost() -> Self {
        Fields {
            unknown: true,
            ..Fields::default()
        }
    }

    /// Some field that was sent is missing from what was kept.
    fn incomplete(&self) -> bool {
        self.unknown || self.cut
    }

    fn kind(&self) -> Kind {
        match (self.request_pseudo, self.has_status) {
            (true, false) => Kind::Request,
            (false, true) => Kind::Response,
            _ => Kind::Unknown,
        }
    }

    fn add(&mut self, field: hpack::Field<'_>) {
        let hpack::Field::Known(name, value) = field else {
            self.unknown = true;
            return;
        };
        match name {
            b":method" => {
                self.request_pseudo = true;
                set_once(&mut self.method, value, MAX_METHOD, &mut self.cut);
            }
            b":scheme" => {
                self.request_pseudo = true;
                set_once(&mut self.scheme, value, MAX_HEADER_VALUE, &mut self.cut);
            }
            b":path" => {
                self.request_pseudo = true;
                set_once(&mut self.path, value, MAX_PATH, &mut self.cut);
            }
            b":authority" => {
                self.request_pseudo = true;
                set_once(&mut self.authority, value, MAX_HEADER_VALUE, &mut self.cut);
            }
            b":protocol" => self.request_pseudo = true,
            b":status" => {
                self.has_status = true;
                if self.status.is_none() {
                    self.status = parse_digits(value, 3).and_then(|c| u16::try_from(c).ok());
                }
            }
            _ if name.starts_with(b":") => {}
            _ => self.regular(name, value),
        }
    }

    fn regular(&mut self, name: &[u8], value: &[u8]) {
        match name {
            b"content-type" => self.grpc |= value.starts_with(b"application/grpc"),
            b"grpc-status" => self.grpc_status = parse_digits(value, 9),
            b"grpc-message" => self.grpc_message = Some(text(&percent_decode(value))),
            _ => {}
        }
        let (name, value) = (text(name), text(value));
        let size = name.len() + value.len();
        if self.headers.len() < MAX_HEADERS && self.kept + size <= MAX_HEADER_BYTES {
            self.kept += size;
            self.headers.push((name, value));
        }
    }
}

/// Sets a pseudo-header the first time it appears; a value too long to keep is left out.
fn set_once(slot: &mut Option<String>, value: &[u8], max: usize, cut: &mut bool) {
    if slot.is_some() {
        return;
    }
    if value.len() > max {
        *cut = true;
        return;
    }
    *slot = Some(String::from_utf8_lossy(value).into_owned());
}

/// A decimal number of 1 to `max_digits` ASCII digits.
fn parse_digits(value: &[u8], max_digits: usize) -> Option<u32> {
    if value.is_empty() || value.len() > max_digits || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        value
            .iter()
            .fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0')),
    )
}

/// `%XX` sequences decoded (gRPC percent-encodes `grpc-message`); anything else kept as is.
fn percent_decode(value: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        if value[i] == b'%'
            && let (Some(h), Some(l)) = (
                value.get(i + 1).and_then(|&b| hex(b)),
                value.get(i + 2).and_then(|&b| hex(b)),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(value[i]);
            i += 1;
        }
    }
    out
}

/// Lossy UTF-8, cut to at most [`MAX_HEADER_VALUE`] bytes on a character boundary.
fn text(raw: &[u8]) -> String {
    let raw = &raw[..raw.len().min(MAX_HEADER_VALUE)];
    let mut s = String::from_utf8_lossy(raw).into_owned();
    if s.len() > MAX_HEADER_VALUE {
        let mut cut = MAX_HEADER_VALUE;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

fn slot(dir: Direction) -> usize {
    match dir {
        Direction::Send => 0,
        Direction::Recv => 1,
    }
}

fn other(dir: Direction) -> Direction {
    match dir {
        Direction::Send => Direction::Recv,
        Direction::Recv => Direction::Send,
    }
}

impl Http2Parser {
    /// A parser for a new connection; both directions start unsynchronised.
    pub fn new() -> Self {
        Self::default()
    }

    /// Approximate heap bytes held for this connection (header block buffers, HPACK tables,
    /// streams).
    pub fn held_bytes(&self) -> usize {
        let halves: usize = self
            .halves
            .iter()
            .map(|h| h.block_buf.capacity() + h.hpack.held_bytes())
            .sum();
        let streams: usize = self.streams.values().map(Stream::held_bytes).sum();
        halves + streams
    }

    fn half(&mut self, dir: Direction) -> &mut Half {
        &mut self.halves[slot(dir)]
    }

    fn on_preface(
        &mut self,
        dir: Direction,
        rest: &[u8],
        matched: usize,
        out: &mut Vec<Output>,
    ) -> (usize, Read) {
        let n = rest.len().min(PREFACE.len() - matched);
        if rest[..n] != PREFACE[matched..matched + n] {
            self.count_skip(dir, out);
            return (0, Read::Resync);
        }
        if matched + n < PREFACE.len() {
            return (
                n,
                Read::Preface {
                    matched: matched + n,
                },
            );
        }
        // The connection starts here: both HPACK tables are empty, frame sizes are at their
        // initial limit, and the server's first bytes (if not seen yet) are a frame header.
        self.client.get_or_insert(dir);
        let client = self.half(dir);
        client.hpack.resync();
        client.max_frame = frame::DEFAULT_MAX_FRAME_SIZE;
        let server = self.half(other(dir));
        if !server.started {
            server.started = true;
            server.hpack.resync();
            server.max_frame = frame::DEFAULT_MAX_FRAME_SIZE;
            server.read = Read::header();
        } else if !server.had_block {
            // The server wrote first (its SETTINGS, before reading this preface). No header block
            // can precede the client's first request, so its table is still empty.
            server.hpack.resync();
        }
        (n, Read::header())
    }

    /// Reads a frame header from `rest`, which starts at stream position `at`.
    fn on_header(
        &mut self,
        dir: Direction,
        rest: &[u8],
        at: u64,
        mut p: PartialHeader,
        timing: Timing,
        out: &mut Vec<Output>,
    ) -> (usize, Read) {
        let fresh = p.have == 0;
        if fresh {
            p.start = Origin::new(timing, at);
        }
        let n = rest.len().min(frame::HEADER_LEN - p.have);
        p.buf[p.have..p.have + n].copy_from_slice(&rest[..n]);
        p.have += n;
        if p.have < frame::HEADER_LEN {
            return (n, Read::Header(p));
        }
        let hdr = FrameHeader::parse(&p.buf);
        match self.start_frame(dir, hdr, p.start, timing.end_ns, out) {
            // Not a frame header: a frame may start at any of its bytes still in this chunk.
            Read::Resync => (usize::from(fresh), Read::Resync),
            next => (n, next),
        }
    }

    /// A frame header was read: checks it, opens or continues header blocks, and ends frames
    /// without payload right away.
    fn start_frame(
        &mut self,
        dir: Direction,
        hdr: FrameHeader,
        start: Origin,
        now_ns: u64,
        out: &mut Vec<Output>,
    ) -> Read {
        if !hdr.sane() || hdr.len > self.half(dir).max_frame {
            self.count_skip(dir, out);
            return self.lose_framing(dir, now_ns, out);
        }
        // A header block is continued by CONTINUATION frames of its stream and nothing else.
        let open = self.half(dir).block.as_ref().map(|b| b.stream);
        let continues = hdr.kind == frame::CONTINUATION && open == Some(hdr.stream);
        if open.is_some() && !continues {
            out.push(Output::Skipped(SkipReason::Garbage));
            self.abandon_block(dir, now_ns, out);
        }
        let orphan = hdr.kind == frame::CONTINUATION && !continues;
        if orphan && open.is_none() {
            out.push(Output::Skipped(SkipReason::Garbage));
        }
        if matches!(
            hdr.kind,
            frame::HEADERS | frame::PUSH_PROMISE | frame::CONTINUATION
        ) {
            self.half(dir).had_block = true;
        }
        if matches!(hdr.kind, frame::HEADERS | frame::PUSH_PROMISE) {
            let half = self.half(dir);
            half.block_buf.clear();
            half.block = Some(Block {
                stream: hdr.stream,
                push: None,
                is_push: hdr.kind == frame::PUSH_PROMISE,
                end_stream: hdr.kind == frame::HEADERS && hdr.has(frame::END_STREAM),
                start,
                lost: false,
                oversized: false,
            });
        }
        let f = Frame::new(hdr, orphan);
        if hdr.len == 0 {
            self.end_frame(dir, f, now_ns, out);
            return Read::header();
        }
        Read::Payload(f)
    }

    fn on_payload(
        &mut self,
        dir: Direction,
        rest: &[u8],
        mut f: Frame,
        timing: Timing,
        out: &mut Vec<Output>,
    ) -> (usize, Read) {
        let n = rest.len().min((f.hdr.len - f.done) as usize);
        let content = f.content(&rest[..n]);
        match f.hdr.kind {
            frame::HEADERS | frame::PUSH_PROMISE | frame::CONTINUATION if !f.orphan => {
                self.append_block(dir, content)
            }
            frame::SETTINGS => f.settings(content),
            frame::RST_STREAM | frame::GOAWAY => f.keep(content),
            _ => {}
        }
        if f.done < f.hdr.len {
            return (n, Read::Payload(f));
        }
        self.end_frame(dir, f, timing.end_ns, out);
        (n, Read::header())
    }

    fn append_block(&mut self, dir: Direction, content: &[u8]) {
        let half = self.half(dir);
        let Some(block) = half.block.as_mut() else {
            return;
        };
        if block.lost || block.oversized {
            return;
        }
        if half.block_buf.len() + content.len() > MAX_HEADER_BLOCK {
            block.oversized = true;
            half.block_buf = Vec::new();
            return;
        }
        half.block_buf.extend_from_slice(content);
    }

    /// The last payload byte of `f` was consumed (or lost) at `end_ns`.
    fn end_frame(&mut self, dir: Direction, f: Frame, end_ns: u64, out: &mut Vec<Output>) {
        let h = f.hdr;
        match h.kind {
            frame::DATA => {
                let body = if f.bad {
                    0
                } else {
                    h.len - h.prefix_len() - f.pad
                };
                self.on_data(dir, &h, u64::from(body), f.lost, end_ns, out);
            }
            frame::HEADERS | frame::PUSH_PROMISE | frame::CONTINUATION if !f.orphan => {
                let half = self.half(dir);
                let Some(block) = half.block.as_mut() else {
                    return;
                };
                block.lost |= f.lost || f.bad;
                if h.kind == frame::PUSH_PROMISE {
                    block.push = f.word(0).map(|id| id & 0x7fff_ffff);
                }
                if h.has(frame::END_HEADERS)
                    && let Some(block) = half.block.take()
                {
                    self.finish_block(dir, block, end_ns, out);
                }
            }
            frame::RST_STREAM if !f.lost => {
                if let Some(code) = f.word(0) {
                    self.on_reset(h.stream, code, end_ns, out);
                }
            }
            frame::SETTINGS if !f.lost && !h.has(frame::ACK) => {
                // The sender's limits bound what the other direction sends.
                let peer = self.half(other(dir));
                if let Some(size) = f.table_size {
                    peer.hpack.set_limit(size);
                }
                if let Some(max) = f.max_frame {
                    peer.max_frame = max;
                }
            }
            frame::GOAWAY if !f.lost => {
                if let Some(last) = f.word(0) {
                    self.on_goaway(dir, last & 0x7fff_ffff, end_ns, out);
                }
            }
            _ => {}
        }
    }

    /// Ends the open header block of `dir` as lost (interrupted by another frame or lost framing).
    fn abandon_block(&mut self, dir: Direction, end_ns: u64, out: &mut Vec<Output>) {
        if let Some(mut block) = self.half(dir).block.take() {
            block.lost = true;
            self.finish_block(dir, block, end_ns, out);
        }
    }

    /// Decodes a complete header block and applies it to its stream.
    fn finish_block(&mut self, dir: Direction, block: Block, end_ns: u64, out: &mut Vec<Output>) {
        let half = &mut self.halves[slot(dir)];
        let mut buf = mem::take(&mut half.block_buf);
        let mut fields = Fields::default();
        if block.oversized {
            out.push(Output::Skipped(SkipReason::HeadTooLarge));
        }
        if block.lost || block.oversized {
            // Its table insertions are unknown.
            half.hpack.desync();
            fields = Fields::lost();
        } else if half.hpack.decode(&buf, |f| fields.add(f)).is_err() {
            half.hpack.desync();
            fields = Fields::lost();
            out.push(Output::Skipped(SkipReason::Garbage));
        }
        buf.clear();
        if buf.capacity() <= KEEP_BLOCK_CAPACITY {
            half.block_buf = buf;
        }
        if fields.unknown {
            out.push(Output::Skipped(SkipReason::HpackDesync));
        }
        if block.is_push {
            self.on_push(dir, &block, fields, end_ns, out);
        } else {
            self.on_headers(dir, &block, fields, end_ns, out);
        }
    }

    /// A HEADERS block (`block`, decoded into `fields`) ended at `end_ns`.
    fn on_headers(
        &mut self,
        dir: Direction,
        block: &Block,
        fields: Fields,
        end_ns: u64,
        out: &mut Vec<Output>,
    ) {
        let (id, end_stream, start) = (block.stream, block.end_stream, block.start);
        let client = match (self.client, fields.kind()) {
            (Some(c), _) => c,
            (None, Kind::Request) => *self.client.insert(dir),
            (None, Kind::Response) => *self.client.insert(other(dir)),
            // Neither side can be told from this block: nothing to attach it to.
            (None, Kind::Unknown) => return,
        };
        if dir == client {
            self.request_block(id, fields, end_stream, start, end_ns, out);
        } else {
            self.response_block(id, fields, end_stream, start, end_ns, out);
        }
        self.check_done(id, out);
    }

    fn request_block(
        &mut self,
        id: u32,
        fields: Fields,
        end_stream: bool,
        start: Origin,
        end_ns: u64,
        out: &mut Vec<Output>,
    ) {
        if !self.streams.contains_key(&id) {
            if id <= self.last_opened {
                // A late block (trailers) of a stream already reported.
                return;
            }
            self.last_opened = id;
            self.make_room(out);
            self.streams.insert(id, Stream::new(id, start, end_ns));
        }
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        s.last_ns = s.last_ns.max(end_ns);
        s.ex.degraded |= fields.incomplete();
        if !s.request_seen {
            s.set_request(fields, start);
        }
        s.request_ended |= end_stream;
    }

    fn response_block(
        &mut self,
        id: u32,
        fields: Fields,
        end_stream: bool,
        start: Origin,
        end_ns: u64,
        out: &mut Vec<Output>,
    ) {
        if !self.streams.contains_key(&id) {
            if id % 2 == 1 && id <= self.last_opened {
                return;
            }
            // The request was sent before the capture started: tracked only to be counted.
            self.make_room(out);
            self.streams.insert(id, Stream::new(id, start, end_ns));
        }
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        s.last_ns = s.last_ns.max(end_ns);
        s.ex.degraded |= fields.incomplete();
        let interim = fields.status.is_some_and(|c| (100..200).contains(&c));
        if !interim {
            // A block with :status is a response head; one without, after the head, is trailers.
            if fields.has_status || !s.response_head {
                s.set_response(fields);
            } else {
                s.set_trailers(fields);
            }
        }
        if end_stream {
            s.response_ended = true;
            s.response_end_ns = end_ns;
        }
    }

    /// A PUSH_PROMISE block: the promised stream's request, sent by the server.
    fn on_push(
        &mut self,
        dir: Direction,
        block: &Block,
        fields: Fields,
        end_ns: u64,
        out: &mut Vec<Output>,
    ) {
        let (promised, start) = (block.push, block.start);
        // Only a server pushes.
        if *self.client.get_or_insert(other(dir)) == dir {
            return;
        }
        let Some(id) = promised.filter(|&id| id != 0 && !self.streams.contains_key(&id)) else {
            return;
        };
        self.make_room(out);
        let mut s = Stream::new(id, start, end_ns);
        s.pushed = true;
        s.ex.degraded = fields.incomplete();
        s.set_request(fields, start);
        s.request_ended = true;
        self.streams.insert(id, s);
    }

    /// A DATA frame `h` with `body` bytes of content ended at `end_ns`.
    fn on_data(
        &mut self,
        dir: Direction,
        h: &FrameHeader,
        body: u64,
        lost: bool,
        end_ns: u64,
        out: &mut Vec<Output>,
    ) {
        let (id, end_stream) = (h.stream, h.has(frame::END_STREAM));
        let Some(client) = self.client else {
            return;
        };
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        s.last_ns = s.last_ns.max(end_ns);
        s.partial |= lost;
        if dir == client {
            s.ex.request_body_size = s.ex.request_body_size.saturating_add(body);
            s.request_ended |= end_stream;
        } else {
            s.ex.response_body_size = s.ex.response_body_size.saturating_add(body);
            if end_stream {
                s.response_ended = true;
                s.response_end_ns = end_ns;
            }
        }
        self.check_done(id, out);
    }

    fn on_reset(&mut self, id: u32, code: u32, end_ns: u64, out: &mut Vec<Output>) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        s.ex.reset = Some(code);
        let end = if s.response_ended {
            s.response_end_ns
        } else {
            s.last_ns.max(end_ns)
        };
        let outcome = s.outcome();
        self.finish(id, outcome, end, out);
    }

    /// A GOAWAY from `dir`: streams its receiver opened above `last` were not processed.
    fn on_goaway(&mut self, dir: Direction, last: u32, end_ns: u64, out: &mut Vec<Output>) {
        let Some(client) = self.client else {
            return;
        };
        let from_server = dir != client;
        let doomed: Vec<u32> = self
            .streams
            .range(last.saturating_add(1)..)
            .filter(|(_, s)| s.pushed != from_server)
            .map(|(&id, _)| id)
            .collect();
        for id in doomed {
            if let Some(s) = self.streams.get(&id) {
                let (outcome, end) = (s.outcome(), s.last_ns.max(end_ns));
                self.finish(id, outcome, end, out);
            }
        }
    }

    /// Reports the stream when both sides have ended it.
    fn check_done(&mut self, id: u32, out: &mut Vec<Output>) {
        let Some(s) = self.streams.get(&id) else {
            return;
        };
        if s.response_ended && (s.request_ended || !s.request_seen) {
            let (outcome, end) = (s.outcome(), s.response_end_ns);
            self.finish(id, outcome, end, out);
        }
    }

    fn finish(&mut self, id: u32, outcome: Outcome, end_ns: u64, out: &mut Vec<Output>) {
        if let Some(s) = self.streams.remove(&id) {
            self.emit(s, outcome, end_ns, out);
        }
    }

    fn emit(&self, s: Stream, outcome: Outcome, end_ns: u64, out: &mut Vec<Output>) {
        match self.client {
            Some(client) if s.request_seen => out.push(Output::Exchange(Exchange {
                role: Role::of_request_direction(client),
                start_ns: s.start.ns,
                end_ns: end_ns.max(s.start.ns),
                request_offset: s.start.offset,
                request_thread: s.start.thread,
                outcome,
                detail: Detail::Http2(s.ex),
            })),
            _ => out.push(Output::Skipped(SkipReason::UnpairedResponse)),
        }
    }

    /// Drops the oldest streams while the table is full.
    fn make_room(&mut self, out: &mut Vec<Output>) {
        while self.streams.len() >= MAX_STREAMS {
            if self.streams.pop_first().is_none() {
                break;
            }
            out.push(Output::Skipped(SkipReason::TooManyPending));
        }
    }

    /// The frame boundaries of `dir` are lost: its HPACK table becomes unknown, an open header
    /// block is lost, and any open stream may have lost frames.
    fn lose_framing(&mut self, dir: Direction, now_ns: u64, out: &mut Vec<Output>) -> Read {
        self.abandon_block(dir, now_ns, out);
        self.half(dir).hpack.desync();
        for s in self.streams.values_mut() {
            s.partial = true;
        }
        Read::Resync
    }

    fn count_skip(&mut self, dir: Direction, out: &mut Vec<Output>) {
        let half = self.half(dir);
        if !half.skip_counted {
            half.skip_counted = true;
            out.push(Output::Skipped(SkipReason::Garbage));
        }
    }

    /// Looks for a frame start in `rest`; `boundary` when `rest` starts a captured chunk.
    fn on_resync(
        &mut self,
        dir: Direction,
        rest: &[u8],
        boundary: bool,
        out: &mut Vec<Output>,
    ) -> (usize, Read) {
        let found = if boundary && frame::frame_starts_at(rest, 0, true) {
            Some(0)
        } else {
            let from = usize::from(boundary);
            (from..rest.len().saturating_sub(frame::HEADER_LEN - 1))
                .find(|&i| frame::frame_starts_at(rest, i, false))
        };
        match found {
            Some(at) => {
                if at > 0 {
                    self.count_skip(dir, out);
                }
                self.half(dir).skip_counted = false;
                (at, Read::header())
            }
            None => {
                self.count_skip(dir, out);
                (rest.len(), Read::Resync)
            }
        }
    }
}

impl ConnectionParser for Http2Parser {
    fn protocol(&self) -> Protocol {
        Protocol::Http2
    }

    fn feed(&mut self, dir: Direction, data: &[u8], timing: Timing, out: &mut Vec<Output>) {
        let half = self.half(dir);
        let base = half.seen;
        half.seen = base.saturating_add(data.len() as u64);
        if self.stopped || data.is_empty() {
            return;
        }
        let half = self.half(dir);
        if !half.started {
            half.started = true;
            let n = data.len().min(PREFACE.len());
            if data[..n] == PREFACE[..n] {
                half.read = Read::Preface { matched: 0 };
            }
        }
        let mut pos = 0;
        while pos < data.len() {
            let rest = &data[pos..];
            let read = mem::take(&mut self.half(dir).read);
            let (used, next) = match read {
                Read::Preface { matched } => self.on_preface(dir, rest, matched, out),
                Read::Header(p) => {
                    let at = base.saturating_add(pos as u64);
                    self.on_header(dir, rest, at, p, timing, out)
                }
                Read::Payload(f) => self.on_payload(dir, rest, f, timing, out),
                Read::Resync => self.on_resync(dir, rest, pos == 0, out),
            };
            self.half(dir).read = next;
            pos += used;
        }
    }

    fn gap(&mut self, dir: Direction, len: u64, timing: Timing, out: &mut Vec<Output>) {
        let half = self.half(dir);
        half.seen = half.seen.saturating_add(len);
        if self.stopped || len == 0 {
            return;
        }
        let half = self.half(dir);
        half.started = true;
        let next = match mem::take(&mut half.read) {
            Read::Payload(mut f) => {
                let left = u64::from(f.hdr.len - f.done);
                f.lost = true;
                if len < left {
                    // The gap lies inside this frame's payload: the framing survives it.
                    f.done += len as u32;
                    Read::Payload(f)
                } else {
                    f.done = f.hdr.len;
                    self.end_frame(dir, f, timing.end_ns, out);
                    if len == left {
                        Read::header()
                    } else {
                        out.push(Output::Skipped(SkipReason::Gap));
                        self.lose_framing(dir, timing.end_ns, out)
                    }
                }
            }
            Read::Resync => Read::Resync,
            Read::Preface { .. } | Read::Header(_) => {
                out.push(Output::Skipped(SkipReason::Gap));
                self.lose_framing(dir, timing.end_ns, out)
            }
        };
        // Bytes skipped right after a gap are part of the damage it did, not new garbage.
        let half = self.half(dir);
        half.skip_counted = matches!(next, Read::Resync);
        half.read = next;
    }

    fn close(&mut self, _ts_ns: u64, out: &mut Vec<Output>) {
        if self.stopped {
            return;
        }
        for (_, s) in mem::take(&mut self.streams) {
            let end = if s.response_ended {
                s.response_end_ns
            } else {
                s.last_ns
            };
            let outcome = s.outcome();
            self.emit(s, outcome, end, out);
        }
        self.stopped = true;
        self.halves = Default::default();
    }
}
