//! Sans-IO protocol parsers.
//!
//! The tracer hands each connection's captured bytes to one [`ConnectionParser`], in the order the
//! traced process transferred them, tagged with the [`Direction`] seen from that process. The parser
//! owns no I/O, no clock and no runtime: it keeps per-connection state and emits [`Output`] records
//! (completed exchanges, and skipped input with a counted [`SkipReason`]).
//!
//! Every protocol fits the same shape:
//! - request/response protocols pair in order (HTTP/1.x);
//! - multiplexed protocols keep a table of streams and emit one exchange per stream (HTTP/2, gRPC);
//! - message-framed binary protocols keep a queue of pending statements (PostgreSQL).
//!
//! [`detect`] picks the protocol from the first bytes seen in either direction.

pub mod detect;
pub mod headers;
pub mod http1;
pub mod http2;
pub mod postgres;
pub mod tls;

pub use detect::{Detection, ParserOptions, detect, new_parser, new_parser_with};

/// Which way bytes went, seen from the traced process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// The process wrote these bytes (write, send, SSL_write).
    Send,
    /// The process read these bytes (read, recv, SSL_read).
    Recv,
}

/// Which end of an exchange the traced process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The process sent the request.
    Client,
    /// The process received the request.
    Server,
}

impl Role {
    /// The role of the process that moved a request in direction `dir`.
    pub fn of_request_direction(dir: Direction) -> Role {
        match dir {
            Direction::Send => Role::Client,
            Direction::Recv => Role::Server,
        }
    }
}

/// When and by which thread one captured chunk moved: monotonic time (ns since boot) of the
/// syscall's start and end, and the thread that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timing {
    /// When the first byte of this chunk was transferred, as far as the capture knows.
    pub start_ns: u64,
    /// When the last byte of this chunk was transferred.
    pub end_ns: u64,
    /// Opaque id of the thread that moved this chunk's bytes (the tracer passes the kernel tid).
    /// Parsers copy it into [`Exchange::request_thread`] and never interpret it.
    pub thread: u32,
}

/// Where a message began: its first byte's chunk timing and thread, and its position in its
/// direction's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Origin {
    /// Start of the chunk that carried the first byte.
    pub ns: u64,
    /// Bytes given to the parser in the message's direction before its first byte.
    pub offset: u64,
    /// Thread of the chunk that carried the first byte.
    pub thread: u32,
}

impl Origin {
    /// The byte at stream position `offset`, carried by a chunk with `timing`.
    pub(crate) fn new(timing: Timing, offset: u64) -> Origin {
        Origin {
            ns: timing.start_ns,
            offset,
            thread: timing.thread,
        }
    }
}

/// Protocols the parsers know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// HTTP/1.0 and HTTP/1.1.
    Http1,
    /// HTTP/2 (and gRPC over it).
    Http2,
    /// PostgreSQL frontend/backend protocol v3.
    Postgres,
}

impl Protocol {
    /// Stable lower-case name, used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Postgres => "postgresql",
        }
    }
}

/// One request and its response (or what was seen of them).
#[derive(Debug, Clone, PartialEq)]
pub struct Exchange {
    /// Which end the traced process is.
    pub role: Role,
    /// First byte of the request.
    pub start_ns: u64,
    /// Last byte of the response (or of the request when no response came).
    pub end_ns: u64,
    /// Position of the request's first byte in the request direction's stream: how many bytes
    /// this parser was given in that direction before it, counting every byte passed to
    /// [`ConnectionParser::feed`] and every `len` passed to [`ConnectionParser::gap`] since the
    /// parser was created. Both ends of a TCP connection count the same bytes, so a client's and
    /// a server's exchange for one request carry the same position when both captures started
    /// with the connection. The first byte is the request line (HTTP/1), the frame header of the
    /// HEADERS frame that opened the stream (HTTP/2; for a pushed stream, of the PUSH_PROMISE in
    /// the server's direction), or the first frontend message of the statement (PostgreSQL).
    /// When that byte was lost in a gap, the best position known.
    pub request_offset: u64,
    /// [`Timing::thread`] of the chunk that carried the request's first byte.
    pub request_thread: u32,
    /// How the exchange ended.
    pub outcome: Outcome,
    /// Protocol-specific content.
    pub detail: Detail,
}

/// How an exchange ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Request and response complete.
    Complete,
    /// The connection closed (or the parser gave up) before the response finished.
    NoResponse,
    /// Part of the exchange was not captured (gap); what is known is reported.
    Partial,
}

/// Protocol-specific content of an exchange.
#[derive(Debug, Clone, PartialEq)]
pub enum Detail {
    /// An HTTP/1.x request and response.
    Http(http1::HttpExchange),
    /// One HTTP/2 stream (a gRPC call when its content type is `application/grpc*`).
    Http2(http2::Http2Exchange),
    /// One PostgreSQL statement execution.
    Postgres(postgres::PgExchange),
}

/// Why input was skipped. Each reason is counted by the tracer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// Bytes that do not parse as the connection's protocol; the parser looks for the next message.
    Garbage,
    /// A message head larger than the parser keeps.
    HeadTooLarge,
    /// Bytes lost to a truncated capture; the parser resynchronised after them.
    Gap,
    /// A response with no request to pair it with (capture started mid-connection).
    UnpairedResponse,
    /// Too many requests waiting for responses on one connection; the oldest was dropped.
    TooManyPending,
    /// Header fields that could not be decoded because the HPACK dynamic table was not seen
    /// (capture joined mid-connection, or bytes were lost); the exchange is marked degraded.
    HpackDesync,
}

impl SkipReason {
    /// Stable snake_case name, used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Garbage => "garbage",
            SkipReason::HeadTooLarge => "head_too_large",
            SkipReason::Gap => "gap",
            SkipReason::UnpairedResponse => "unpaired_response",
            SkipReason::TooManyPending => "too_many_pending",
            SkipReason::HpackDesync => "hpack_desync",
        }
    }
}

/// What a parser hands back.
#[derive(Debug, Clone, PartialEq)]
// Exchanges dominate the size, and every output is one exchange or one small skip record moved
// into a Vec once per request: boxing would cost an allocation per request for no gain.
#[allow(clippy::large_enum_variant)]
pub enum Output {
    /// A completed (or abandoned) exchange.
    Exchange(Exchange),
    /// Input that was skipped, and why.
    Skipped(SkipReason),
}

/// Per-connection protocol state machine. Both directions of one connection go to one parser.
pub trait ConnectionParser: Send {
    /// The protocol this parser decodes.
    fn protocol(&self) -> Protocol;
    /// Bytes transferred in `dir`, contiguous with what was fed before in that direction.
    fn feed(&mut self, dir: Direction, data: &[u8], timing: Timing, out: &mut Vec<Output>);
    /// `len` bytes were transferred in `dir` but not captured.
    fn gap(&mut self, dir: Direction, len: u64, timing: Timing, out: &mut Vec<Output>);
    /// The connection closed: flush what is pending.
    fn close(&mut self, ts_ns: u64, out: &mut Vec<Output>);
    /// The protocol switched the connection to TLS (PostgreSQL's SSLRequest answered `S`): the
    /// bytes that follow are TLS records, which the parser ignores.
    fn tls_follows(&self) -> bool {
        false
    }
}
