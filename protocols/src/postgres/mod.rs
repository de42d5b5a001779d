//! PostgreSQL frontend/backend protocol v3.
//!
//! [`PgParser`] sees both directions of one connection. Each direction is framed on its own
//! (type byte, length, body; untyped messages before the StartupMessage); the frontend's messages
//! that get answers wait in a bounded queue that pairs the backend's answers in order.
//!
//! Exchanges:
//! - One per Execute of the extended protocol. It starts at the first byte of the first message
//!   of the statement (Parse, Bind, Describe or the Execute itself, whichever came first since
//!   the previous Execute or Sync) and ends at the last byte of the answer that ends the
//!   Execute: CommandComplete, EmptyQueryResponse, PortalSuspended or ErrorResponse. Several
//!   Executes per Sync and pipelined batches give one exchange each.
//! - One per simple Query message, even when its string holds several statements: the backend
//!   answers the message as a whole, and splitting SQL needs a lexer the parser does not carry.
//!   It ends at the last byte of ReadyForQuery; [`PgExchange::completions`] counts the statements
//!   that completed, [`PgExchange::command_tag`] is the last tag, and rows add up.
//! - An ErrorResponse to a Parse, Bind or Describe is reported on that statement, even when its
//!   Execute was never sent. The backend then discards messages until Sync: the Executes it
//!   skipped are reported with [`PgExchange::aborted`] set and [`Outcome::NoResponse`](crate::Outcome::NoResponse), never
//!   as successes. An error answering a Sync (commit of the implicit transaction) is reported
//!   without text.
//! - A COPY is one exchange ending at its CommandComplete; CopyData bytes are counted.
//!
//! Prepared statements are remembered by name (at most [`MAX_STATEMENTS`], least recently used
//! evicted) so that Executes of statements prepared earlier carry their text. When the Parse was
//! not captured, the exchange has no text and says so ([`PgExchange::parse_seen`] false).
//!
//! SSLRequest answered `S` and GSSENCRequest answered `G` switch the connection to encryption:
//! the parser stops and ignores everything after (plaintext comes from TLS library hooks).
//! A CancelRequest connection carries no statement and stops the parser too.
//!
//! Captures may start mid-connection or lose bytes. A gap inside a message of known length only
//! shortens what is kept of it; elsewhere the direction resynchronises at the next offset where a
//! well-formed message either ends exactly at the end of the captured chunk or is followed by
//! another plausible header. Which direction is the frontend is then learnt from the first
//! message type only one side sends. Answers lost in a backend gap leave nothing that says
//! which statement the next answer belongs to; until a CommandComplete tag fits its statement's
//! text again, a tag that contradicts the text (`UPDATE 1` for a `SELECT`) moves the pairing to
//! the first waiting statement it fits, reporting the ones before it as partial.

mod session;
mod wire;

use std::sync::Arc;

use crate::{ConnectionParser, Detection, Direction, Origin, Output, Protocol, SkipReason, Timing};
use session::{Action, Msg, Session};
use wire::{Probe, Side, Untyped};

/// One executed statement and its result.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PgExchange {
    /// SQL text, when known (at most [`MAX_QUERY`] bytes).
    pub query: Option<String>,
    /// The SQL text was cut: longer than [`MAX_QUERY`], or partly lost in a gap.
    pub query_truncated: bool,
    /// Prepared statement executed (extended protocol; empty for the unnamed statement), when its
    /// Bind was seen.
    pub statement_name: Option<String>,
    /// The message carrying the SQL text (Query or Parse) was captured; false when a statement
    /// prepared before the capture started was executed.
    pub parse_seen: bool,
    /// Database from the startup message, when seen.
    pub database: Option<Arc<str>>,
    /// User from the startup message, when seen.
    pub user: Option<Arc<str>>,
    /// `application_name` from the startup message, when seen.
    pub application_name: Option<Arc<str>>,
    /// CommandComplete tag (`SELECT 3`, `INSERT 0 1`), the last one for a multi-statement query.
    pub command_tag: Option<String>,
    /// Statements that completed (CommandComplete or EmptyQueryResponse).
    pub completions: u32,
    /// DataRow messages received, when the statement returned a result set.
    pub rows: Option<u64>,
    /// The ErrorResponse that ended the statement.
    pub error: Option<Box<PgError>>,
    /// The query string was empty (EmptyQueryResponse).
    pub empty_query: bool,
    /// The Execute stopped at its row limit (PortalSuspended); the client fetches the rest with
    /// another Execute.
    pub suspended: bool,
    /// Row limit of the Execute (0: all rows).
    pub row_limit: u32,
    /// CopyData payload bytes, both directions.
    pub copy_bytes: u64,
    /// Not executed: an earlier message of the same batch failed and the backend skipped this one.
    pub aborted: bool,
}

impl PgExchange {
    /// SQLSTATE of the ErrorResponse, when one ended the statement and carried it.
    pub fn sqlstate(&self) -> Option<&str> {
        self.error.as_ref().and_then(|e| e.sqlstate.as_deref())
    }
}

/// Fields of an ErrorResponse.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PgError {
    /// Severity (`ERROR`, `FATAL`, `PANIC`), non-localised when the server sent it so.
    pub severity: Option<String>,
    /// SQLSTATE code (`42P01`).
    pub sqlstate: Option<String>,
    /// Primary message.
    pub message: Option<String>,
}

/// Longest SQL text kept, in bytes; longer texts are cut.
pub const MAX_QUERY: usize = 64 * 1024;
/// Longest statement or portal name kept, in bytes.
pub const MAX_NAME: usize = 256;
/// Prepared statements remembered per connection.
pub const MAX_STATEMENTS: usize = 256;
/// Bytes of prepared statement text remembered per connection.
pub const MAX_STATEMENT_BYTES: usize = 1024 * 1024;
/// Portals remembered per connection.
pub const MAX_PORTALS: usize = 64;
/// Frontend messages waiting for an answer; beyond it the oldest is dropped.
pub const MAX_QUEUE: usize = 4096;
/// Statements waiting for their results; beyond it the oldest is dropped.
pub const MAX_PENDING_RUNS: usize = 128;
/// Bytes of SQL text held by statements waiting for their results.
pub const MAX_PENDING_TEXT: usize = 1024 * 1024;
/// Longest command tag kept, in bytes.
const MAX_TAG: usize = 64;
/// ErrorResponse bytes kept.
const MAX_ERROR: usize = 4096;
/// A body buffer that grew beyond this is released after its message, so idle connections do
/// not keep the worst case.
const KEEP_BODY_CAPACITY: usize = 4096;

/// Whether the bytes start a PostgreSQL connection or look like its message framing.
pub fn probe(_dir: Direction, data: &[u8]) -> Detection {
    match wire::probe(data) {
        Probe::Yes => Detection::Found(Protocol::Postgres),
        Probe::Maybe => Detection::NeedMore,
        Probe::No => Detection::Unknown,
    }
}

/// PostgreSQL connection parser.
#[derive(Debug, Default)]
pub struct PgParser {
    /// Framing per direction, indexed by [`slot`].
    halves: [Half; 2],
    session: Session,
    /// Encryption started, a cancel request, or closed: all input is ignored.
    stopped: bool,
    /// Stopped because the server accepted an SSLRequest: TLS records follow.
    tls_follows: bool,
}

/// Framing state of one direction.
#[derive(Debug, Default)]
struct Half {
    frame: Frame,
    /// Bytes of a header split across feeds (5 typed, 8 untyped).
    header: [u8; 8],
    header_len: usize,
    /// Where the first header byte was.
    header_start: Origin,
    /// Kept bytes of a body split across feeds.
    body: Vec<u8>,
    /// The current run of skipped bytes was counted already.
    skip_counted: bool,
    /// Bytes given in this direction so far, fed or lost in gaps: the stream position of the
    /// next byte.
    seen: u64,
}

#[derive(Debug, Clone, Copy, Default)]
enum Frame {
    /// Nothing seen yet: the first bytes decide.
    #[default]
    Fresh,
    /// At a typed message boundary (maybe inside a split header).
    Typed,
    /// At an untyped boundary: the frontend before its StartupMessage.
    Untyped,
    /// One byte answering SSLRequest or GSSENCRequest.
    Answer,
    /// Inside a body.
    Body(Body),
    /// Framing lost: looking for a message boundary.
    Resync,
}

/// A body being read across feeds.
#[derive(Debug, Clone, Copy)]
struct Body {
    tag: u8,
    untyped: Option<Untyped>,
    len: u32,
    left: u32,
    keep: usize,
    start: Origin,
    partial: bool,
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

impl PgParser {
    /// A parser for a new connection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Approximate heap bytes held for this connection (body buffers, statements, queue).
    pub fn held_bytes(&self) -> usize {
        let bodies: usize = self.halves.iter().map(|h| h.body.capacity()).sum();
        bodies + self.session.held_bytes()
    }

    fn half(&mut self, dir: Direction) -> &mut Half {
        &mut self.halves[slot(dir)]
    }

    fn stop(&mut self) {
        self.stopped = true;
        self.halves = Default::default();
        self.session.clear();
    }

    /// Framing of `dir` is lost for `reason`; the skipped run is counted once.
    fn lose(&mut self, dir: Direction, reason: SkipReason, out: &mut Vec<Output>) {
        let half = self.half(dir);
        half.header_len = 0;
        half.body = Vec::new();
        half.frame = Frame::Resync;
        if !half.skip_counted {
            half.skip_counted = true;
            out.push(Output::Skipped(reason));
        }
    }

    /// How a direction's first bytes are framed.
    fn first_frame(&mut self, dir: Direction, data: &[u8]) -> Frame {
        match self.session.side(dir) {
            Some(Side::Backend) if self.session.awaiting_answer => Frame::Answer,
            Some(Side::Backend) if self.session.startup_seen => Frame::Typed,
            None if looks_untyped(data) => {
                self.session.learn(dir, Side::Frontend);
                Frame::Untyped
            }
            _ => Frame::Resync,
        }
    }

    /// A complete message (or all that is left of it) in `dir`.
    fn dispatch(&mut self, dir: Direction, m: &Msg<'_>, out: &mut Vec<Output>) {
        let side = match self.session.side(dir) {
            Some(side) => side,
            None => match wire::only_sent_by(m.tag) {
                Some(side) => {
                    self.session.learn(dir, side);
                    side
                }
                // Until a message only one side sends shows up, messages cannot be read.
                None => return,
            },
        };
        self.half(dir).skip_counted = false;
        match side {
            Side::Frontend => match self.session.frontend(m, out) {
                Action::None => {}
                Action::Stop => self.stop(),
                Action::StartupDone => self.half(dir).frame = Frame::Typed,
                Action::ExpectAnswer => {
                    let backend = self.half(other(dir));
                    if matches!(backend.frame, Frame::Typed) && backend.header_len == 0 {
                        backend.frame = Frame::Answer;
                    }
                }
            },
            Side::Backend => self.session.backend(m, out),
        }
    }

    /// Reads a header of `size` bytes (5 typed, 8 untyped) at the start of `data` (stream
    /// position `at`), or completes one split across feeds. Returns the header, where it began
    /// and the bytes of `data` used; `None` header while still incomplete.
    fn header(
        &mut self,
        dir: Direction,
        data: &[u8],
        at: u64,
        size: usize,
        timing: Timing,
    ) -> (Option<([u8; 8], Origin)>, usize) {
        let half = self.half(dir);
        if half.header_len == 0 && data.len() >= size {
            let mut h = [0u8; 8];
            h[..size].copy_from_slice(&data[..size]);
            return (Some((h, Origin::new(timing, at))), size);
        }
        if half.header_len == 0 {
            half.header_start = Origin::new(timing, at);
        }
        let take = (size - half.header_len).min(data.len());
        half.header[half.header_len..half.header_len + take].copy_from_slice(&data[..take]);
        half.header_len += take;
        if half.header_len < size {
            return (None, take);
        }
        half.header_len = 0;
        (Some((half.header, half.header_start)), take)
    }

    /// Reads a message from `data`, which starts at stream position `at`.
    fn on_typed(
        &mut self,
        dir: Direction,
        data: &[u8],
        at: u64,
        timing: Timing,
        out: &mut Vec<Output>,
    ) -> usize {
        let (header, used) = self.header(dir, data, at, 5, timing);
        let Some((h, start)) = header else {
            return used;
        };
        let tag = h[0];
        let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
        let side = self.session.side(dir);
        if !wire::header_ok(side, tag, len) {
            self.lose(dir, SkipReason::Garbage, out);
            // A header read in place is rescanned after its first byte; a split one is dropped.
            return if used == 5 { 0 } else { used };
        }
        let body = Body {
            tag,
            untyped: None,
            len: len - 4,
            left: len - 4,
            keep: wire::keep_limit(side, tag),
            start,
            partial: false,
        };
        used + self.start_body(dir, &data[used..], body, timing, out)
    }

    /// Reads a message from `data`, which starts at stream position `at`.
    fn on_untyped(
        &mut self,
        dir: Direction,
        data: &[u8],
        at: u64,
        timing: Timing,
        out: &mut Vec<Output>,
    ) -> usize {
        let (header, used) = self.header(dir, data, at, 8, timing);
        let Some((h, start)) = header else {
            let half = self.half(dir);
            if !wire::untyped_prefix(&half.header[..half.header_len]) {
                self.lose(dir, SkipReason::Garbage, out);
            }
            return used;
        };
        let Some((len, kind)) = wire::untyped_header(&h) else {
            self.lose(dir, SkipReason::Garbage, out);
            return used;
        };
        let body = Body {
            tag: 0,
            untyped: Some(kind),
            len: len - 8,
            left: len - 8,
            keep: if kind == Untyped::Startup {
                wire::MAX_STARTUP as usize
            } else {
                0
            },
            start,
            partial: false,
        };
        used + self.start_body(dir, &data[used..], body, timing, out)
    }

    /// A body begins at `data`: dispatched in place when complete, else kept up to its limit.
    fn start_body(
        &mut self,
        dir: Direction,
        data: &[u8],
        body: Body,
        timing: Timing,
        out: &mut Vec<Output>,
    ) -> usize {
        let len = body.len as usize;
        let half = self.half(dir);
        half.frame = if body.untyped.is_some() {
            Frame::Untyped
        } else {
            Frame::Typed
        };
        if data.len() >= len {
            let m = Msg {
                tag: body.tag,
                untyped: body.untyped,
                body: &data[..len],
                len: body.len,
                start: body.start,
                end_ns: timing.end_ns,
                partial: false,
            };
            self.dispatch(dir, &m, out);
            return len;
        }
        let kept = body.keep.min(data.len());
        half.body.clear();
        half.body.extend_from_slice(&data[..kept]);
        half.frame = Frame::Body(Body {
            left: body.len - data.len() as u32,
            ..body
        });
        data.len()
    }

    fn on_body(
        &mut self,
        dir: Direction,
        data: &[u8],
        mut body: Body,
        timing: Timing,
        out: &mut Vec<Output>,
    ) -> usize {
        let n = (body.left as usize).min(data.len());
        let half = self.half(dir);
        if !body.partial {
            let room = body.keep.saturating_sub(half.body.len());
            half.body.extend_from_slice(&data[..n.min(room)]);
        }
        body.left -= n as u32;
        if body.left > 0 {
            half.frame = Frame::Body(body);
            return n;
        }
        self.end_body(dir, body, timing.end_ns, out);
        n
    }

    /// The last byte of `body` went by at `end_ns`.
    fn end_body(&mut self, dir: Direction, body: Body, end_ns: u64, out: &mut Vec<Output>) {
        let half = self.half(dir);
        half.frame = if body.untyped.is_some() {
            Frame::Untyped
        } else {
            Frame::Typed
        };
        let kept = std::mem::take(&mut half.body);
        let m = Msg {
            tag: body.tag,
            untyped: body.untyped,
            body: &kept,
            len: body.len,
            start: body.start,
            end_ns,
            partial: body.partial,
        };
        self.dispatch(dir, &m, out);
        if kept.capacity() <= KEEP_BODY_CAPACITY && !self.stopped {
            let mut kept = kept;
            kept.clear();
            self.half(dir).body = kept;
        }
    }

    fn on_answer(&mut self, dir: Direction, data: &[u8], out: &mut Vec<Output>) -> usize {
        match data.first() {
            // TLS or GSSAPI encryption follows: nothing more to read here.
            Some(&answer @ (b'S' | b'G')) => {
                self.stop();
                self.tls_follows = answer == b'S';
                1
            }
            Some(b'N') => {
                self.session.awaiting_answer = false;
                self.half(dir).frame = Frame::Typed;
                1
            }
            // Servers that cannot handle the request answer with an ErrorResponse.
            Some(b'E') => {
                self.session.awaiting_answer = false;
                self.half(dir).frame = Frame::Typed;
                0
            }
            _ => {
                self.session.awaiting_answer = false;
                self.lose(dir, SkipReason::Garbage, out);
                0
            }
        }
    }

    fn on_resync(&mut self, dir: Direction, data: &[u8], out: &mut Vec<Output>) -> usize {
        let side = self.session.side(dir);
        match wire::find_boundary(side, data) {
            Some((at, _)) => {
                if at > 0 && !self.half(dir).skip_counted {
                    self.half(dir).skip_counted = true;
                    out.push(Output::Skipped(SkipReason::Garbage));
                }
                self.half(dir).frame = Frame::Typed;
                at
            }
            None => {
                let half = self.half(dir);
                if !half.skip_counted {
                    half.skip_counted = true;
                    out.push(Output::Skipped(SkipReason::Garbage));
                }
                data.len()
            }
        }
    }
}

/// Whether a direction's first bytes are an untyped startup-phase message (or its beginning).
fn looks_untyped(data: &[u8]) -> bool {
    if data.len() >= 8 {
        wire::untyped_header(data).is_some()
    } else {
        !data.is_empty() && wire::untyped_prefix(data)
    }
}

impl ConnectionParser for PgParser {
    fn protocol(&self) -> Protocol {
        Protocol::Postgres
    }

    fn feed(&mut self, dir: Direction, data: &[u8], timing: Timing, out: &mut Vec<Output>) {
        let half = self.half(dir);
        let base = half.seen;
        half.seen = base.saturating_add(data.len() as u64);
        let mut pos = 0;
        while pos < data.len() && !self.stopped {
            let rest = &data[pos..];
            let at = base.saturating_add(pos as u64);
            pos += match self.halves[slot(dir)].frame {
                Frame::Fresh => {
                    let frame = self.first_frame(dir, rest);
                    self.half(dir).frame = frame;
                    0
                }
                Frame::Typed => self.on_typed(dir, rest, at, timing, out),
                Frame::Untyped => self.on_untyped(dir, rest, at, timing, out),
                Frame::Answer => self.on_answer(dir, rest, out),
                Frame::Body(body) => self.on_body(dir, rest, body, timing, out),
                Frame::Resync => self.on_resync(dir, rest, out),
            };
        }
    }

    fn gap(&mut self, dir: Direction, len: u64, timing: Timing, out: &mut Vec<Output>) {
        let half = self.half(dir);
        half.seen = half.seen.saturating_add(len);
        if self.stopped || len == 0 {
            return;
        }
        if let Some(side) = self.session.side(dir) {
            self.session.gap(side);
        }
        match self.halves[slot(dir)].frame {
            Frame::Body(mut body) => {
                body.partial = true;
                if len < u64::from(body.left) {
                    body.left -= len as u32;
                    self.half(dir).frame = Frame::Body(body);
                } else {
                    let over = len - u64::from(body.left);
                    self.end_body(dir, body, timing.end_ns, out);
                    if over > 0 && !self.stopped {
                        self.half(dir).skip_counted = false;
                        self.lose(dir, SkipReason::Gap, out);
                    }
                }
            }
            Frame::Resync => {}
            Frame::Fresh | Frame::Typed | Frame::Untyped | Frame::Answer => {
                self.half(dir).skip_counted = false;
                self.lose(dir, SkipReason::Gap, out);
            }
        }
    }

    fn close(&mut self, _ts_ns: u64, out: &mut Vec<Output>) {
        if !self.stopped {
            self.session.close(out);
        }
        self.stop();
    }

    fn tls_follows(&self) -> bool {
        self.tls_follows
    }
}

#[cfg(test)]
mod tests;
