//! What the messages mean: startup parameters, prepared statements and portals, and the queue of
//! frontend messages waiting for the backend's answers, which pairs results with statements.
//!
//! The backend answers frontend messages strictly in order, so every message that gets an answer
//! is queued as an [`Item`]. Statements are grouped into runs: the Parse, Bind and Describe that
//! lead up to an Execute (or a simple Query on its own) form one run, reported as one exchange.
//! An answer that does not fit the oldest item proves that the answers to the items before it were
//! lost in a gap; those items are dropped and their runs reported as partial.

use std::collections::{HashMap, VecDeque};
use std::mem;
use std::sync::Arc;

use super::wire::{self, Side, StartupParams, Untyped, be32, cstr_or_rest, text};
use super::{
    MAX_NAME, MAX_PENDING_RUNS, MAX_PENDING_TEXT, MAX_PORTALS, MAX_QUERY, MAX_QUEUE,
    MAX_STATEMENT_BYTES, MAX_STATEMENTS, MAX_TAG, PgError, PgExchange,
};
use crate::{Detail, Direction, Exchange, Origin, Outcome, Output, Role, SkipReason};

/// Queue entries searched for one answer before it is declared unpaired.
const SEEK_LIMIT: usize = 256;

/// One framed message handed up from the framing layer.
#[derive(Debug)]
pub(super) struct Msg<'a> {
    /// Type byte; 0 for untyped startup-phase messages.
    pub tag: u8,
    /// Kind of an untyped message.
    pub untyped: Option<Untyped>,
    /// Kept body bytes (a prefix when the body was longer than the parser keeps).
    pub body: &'a [u8],
    /// Full body length.
    pub len: u32,
    /// Where the first byte was.
    pub start: Origin,
    /// End of the chunk that carried the last byte.
    pub end_ns: u64,
    /// Part of the message was lost in a gap: `body` stops where the gap began.
    pub partial: bool,
}

/// What the framing layer must do after a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    None,
    /// The connection stops being parseable plaintext (TLS, GSSAPI encryption, cancel request).
    Stop,
    /// An SSLRequest or GSSENCRequest went out: the backend answers with one byte.
    ExpectAnswer,
    /// The StartupMessage went out: frontend messages are typed from now on.
    StartupDone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ItemKind {
    Parse,
    Bind,
    Describe,
    Execute,
    Close,
    Sync,
    Query,
    Function,
}

/// A frontend message waiting for its answer.
#[derive(Debug, Clone, Copy)]
struct Item {
    kind: ItemKind,
    /// The run the message belongs to.
    run: Option<u64>,
    /// Where the message began.
    start: Origin,
}

/// A statement being executed: the messages leading to one Execute, or one simple Query.
#[derive(Debug)]
struct Run {
    id: u64,
    /// First byte of the run's first message.
    start: Origin,
    end_ns: u64,
    text: Option<Arc<str>>,
    truncated: bool,
    statement_name: Option<String>,
    parse_seen: bool,
    /// An Execute or Query belongs to it: it is reported. Runs that only prepare or describe
    /// are reported only when they fail.
    reported: bool,
    /// Queue items of this run not yet answered.
    pending: u32,
    partial: bool,
    responded: bool,
    result_set: bool,
    rows: u64,
    command_tag: Option<String>,
    completions: u32,
    empty_query: bool,
    suspended: bool,
    row_limit: u32,
    copy_bytes: u64,
    error: Option<PgError>,
}

impl Run {
    fn new(id: u64, start: Origin) -> Run {
        Run {
            id,
            start,
            end_ns: start.ns,
            text: None,
            truncated: false,
            statement_name: None,
            parse_seen: false,
            reported: false,
            pending: 0,
            partial: false,
            responded: false,
            result_set: false,
            rows: 0,
            command_tag: None,
            completions: 0,
            empty_query: false,
            suspended: false,
            row_limit: 0,
            copy_bytes: 0,
            error: None,
        }
    }

    fn text_len(&self) -> usize {
        self.text.as_ref().map_or(0, |t| t.len())
    }
}

/// A prepared statement's text, as far as it was captured.
#[derive(Debug, Clone)]
struct Prepared {
    text: Arc<str>,
    truncated: bool,
    used: u64,
}

/// Prepared statements by name, bounded in count and bytes; the least recently used goes first.
#[derive(Debug, Default)]
struct Statements {
    map: HashMap<String, Prepared>,
    bytes: usize,
    clock: u64,
}

impl Statements {
    fn insert(&mut self, name: String, text: Arc<str>, truncated: bool) {
        self.clock += 1;
        self.bytes += name.len() + text.len();
        let entry = Prepared {
            text,
            truncated,
            used: self.clock,
        };
        if let Some(old) = self.map.insert(name.clone(), entry) {
            self.bytes -= name.len() + old.text.len();
        }
        while self.map.len() > MAX_STATEMENTS || self.bytes > MAX_STATEMENT_BYTES {
            let Some(oldest) = self
                .map
                .iter()
                .min_by_key(|(_, p)| p.used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.remove(&oldest);
        }
    }

    fn get(&mut self, name: &str) -> Option<(Arc<str>, bool)> {
        self.clock += 1;
        let p = self.map.get_mut(name)?;
        p.used = self.clock;
        Some((p.text.clone(), p.truncated))
    }

    fn remove(&mut self, name: &str) {
        if let Some(old) = self.map.remove(name) {
            self.bytes -= name.len() + old.text.len();
        }
    }
}

/// A portal: the statement it was bound to and that statement's text, when known.
#[derive(Debug, Clone)]
struct Binding {
    statement: String,
    text: Option<(Arc<str>, bool)>,
    used: u64,
}

/// Portals by name, bounded; the least recently used goes first. The unnamed portal, which
/// almost every Bind uses, has a slot of its own.
#[derive(Debug, Default)]
struct Portals {
    unnamed: Option<Binding>,
    named: HashMap<String, Binding>,
    clock: u64,
}

impl Portals {
    fn insert(&mut self, name: String, statement: String, text: Option<(Arc<str>, bool)>) {
        self.clock += 1;
        let binding = Binding {
            statement,
            text,
            used: self.clock,
        };
        if name.is_empty() {
            self.unnamed = Some(binding);
            return;
        }
        self.named.insert(name, binding);
        while self.named.len() > MAX_PORTALS {
            let Some(oldest) = self
                .named
                .iter()
                .min_by_key(|(_, b)| b.used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.named.remove(&oldest);
        }
    }

    fn get(&mut self, name: &str) -> Option<Binding> {
        self.clock += 1;
        let b = if name.is_empty() {
            self.unnamed.as_mut()?
        } else {
            self.named.get_mut(name)?
        };
        b.used = self.clock;
        Some(b.clone())
    }

    fn remove(&mut self, name: &str) {
        if name.is_empty() {
            self.unnamed = None;
        } else {
            self.named.remove(name);
        }
    }

    fn iter(&self) -> impl Iterator<Item = (&str, &Binding)> {
        let unnamed = self.unnamed.iter().map(|b| ("", b));
        unnamed.chain(self.named.iter().map(|(k, b)| (k.as_str(), b)))
    }
}

/// Protocol state of one connection above the framing.
#[derive(Debug, Default)]
pub(super) struct Session {
    /// The direction frontend messages travel in, once known.
    frontend: Option<Direction>,
    /// The StartupMessage was seen: both directions are framed from their first byte.
    pub startup_seen: bool,
    /// An SSLRequest or GSSENCRequest waits for its one-byte answer.
    pub awaiting_answer: bool,
    /// A ReadyForQuery was seen: startup is over.
    ready: bool,
    params: StartupParams,
    statements: Statements,
    portals: Portals,
    items: VecDeque<Item>,
    /// Runs not yet reported, by ascending id.
    runs: VecDeque<Run>,
    /// Text bytes held by `runs` (shared texts counted once per run).
    run_text: usize,
    /// The run that the next Parse, Bind, Describe or Execute joins.
    open: Option<u64>,
    next_id: u64,
    /// Backend bytes were lost since pairing was last confirmed by a command tag that fits its
    /// statement's text.
    suspect: bool,
    /// An error made the backend skip messages until the next Sync.
    skip_until_sync: bool,
    /// The statement that failed was still being sent (its name is kept): its Execute,
    /// discarded by the backend, is already reported with the error.
    swallow_execute: Option<String>,
    copy_in: Option<u64>,
    copy_out: Option<u64>,
}

impl Session {
    /// The side `dir` carries, once known.
    pub fn side(&self, dir: Direction) -> Option<Side> {
        self.frontend.map(|f| {
            if f == dir {
                Side::Frontend
            } else {
                Side::Backend
            }
        })
    }

    /// Records that `dir` carries `side`.
    pub fn learn(&mut self, dir: Direction, side: Side) {
        self.frontend = Some(match side {
            Side::Frontend => dir,
            Side::Backend => other(dir),
        });
    }

    /// Approximate heap bytes held.
    pub fn held_bytes(&self) -> usize {
        let statements: usize = self
            .statements
            .map
            .iter()
            .map(|(k, p)| k.len() + p.text.len() + mem::size_of::<Prepared>())
            .sum();
        let portals: usize = self
            .portals
            .iter()
            .map(|(k, b)| {
                k.len()
                    + b.statement.len()
                    + b.text.as_ref().map_or(0, |(t, _)| t.len())
                    + mem::size_of::<Binding>()
            })
            .sum();
        let runs: usize = self
            .runs
            .iter()
            .map(|r| {
                mem::size_of::<Run>()
                    + r.text_len()
                    + r.statement_name.as_ref().map_or(0, String::len)
                    + r.command_tag.as_ref().map_or(0, String::len)
                    + r.error.as_ref().map_or(0, |e| {
                        [&e.severity, &e.sqlstate, &e.message]
                            .iter()
                            .map(|s| s.as_ref().map_or(0, String::len))
                            .sum()
                    })
            })
            .sum();
        let params = [
            &self.params.user,
            &self.params.database,
            &self.params.application_name,
        ]
        .iter()
        .map(|s| s.as_ref().map_or(0, |s| s.len()))
        .sum::<usize>();

        statements + portals + runs + params + self.items.len() * mem::size_of::<Item>()
    }

    /// Bytes were lost on `side`: what they belonged to is partial.
    pub fn gap(&mut self, side: Side) {
        let id = match side {
            Side::Frontend => self.open,
            Side::Backend => {
                self.suspect = true;
                self.items.front().and_then(|i| i.run)
            }
        };
        if let Some(r) = id.and_then(|id| self.run(id)) {
            r.partial = true;
        }
    }

    /// The connection closed: runs still waiting are reported with what is known.
    pub fn close(&mut self, out: &mut Vec<Output>) {
        let role = self.role();

        while let Some(item) = self.items.pop_front() {
            if matches!(item.kind, ItemKind::Execute | ItemKind::Query)
                && let Some(id) = item.run
                && let Some(run) = self.take_run(id)
            {
                let outcome = if run.responded {
                    Outcome::Partial
                } else {
                    Outcome::NoResponse
                };
                let end = run.end_ns;
                self.emit(run, role, outcome, end, out);
            }
        }
        self.clear();
    }

    /// Forgets everything (the parser stopped).
    pub fn clear(&mut self) {
        self.items = VecDeque::new();
        self.runs = VecDeque::new();
        self.run_text = 0;
        self.statements = Statements::default();
        self.portals = Portals::default();
        self.open = None;
    }

    fn role(&self) -> Option<Role> {
        self.frontend.map(Role::of_request_direction)
    }

    fn run(&mut self, id: u64) -> Option<&mut Run> {
        let i = self.runs.binary_search_by_key(&id, |r| r.id).ok()?;
        self.runs.get_mut(i)
    }

    fn take_run(&mut self, id: u64) -> Option<Run> {
        let i = self.runs.binary_search_by_key(&id, |r| r.id).ok()?;
        let run = self.runs.remove(i)?;
        self.run_text -= run.text_len();
        if self.open == Some(id) {
            self.open = None;
        }
        Some(run)
    }

    /// The open run, created at `start` when there is none.
    fn open_run(&mut self, start: Origin, out: &mut Vec<Output>) -> u64 {
        if let Some(id) = self.open
            && self.run(id).is_some()
        {
            return id;
        }
        let id = self.new_run(start, out);
        self.open = Some(id);
        id
    }

    /// No run is open any more; one that only prepared and has no answers to wait for is done.
    fn close_open(&mut self) {
        if let Some(id) = self.open.take()
            && self.run(id).is_some_and(|r| r.pending == 0 && !r.reported)
        {
            self.take_run(id);
        }
    }

    /// The open run for frontend message `m`, which makes it partial when `m` lost bytes.
    fn open_run_for(&mut self, m: &Msg<'_>, out: &mut Vec<Output>) -> u64 {
        let id = self.open_run(m.start, out);
        if m.partial
            && let Some(r) = self.run(id)
        {
            r.partial = true;
        }
        id
    }

    fn new_run(&mut self, start: Origin, out: &mut Vec<Output>) -> u64 {
        if self.runs.len() >= MAX_PENDING_RUNS {
            self.drop_oldest_run(out);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.runs.push_back(Run::new(id, start));
        id
    }

    fn drop_oldest_run(&mut self, out: &mut Vec<Output>) {
        if let Some(old) = self.runs.pop_front() {
            self.run_text -= old.text_len();
            if self.open == Some(old.id) {
                self.open = None;
            }
            out.push(Output::Skipped(SkipReason::TooManyPending));
        }
    }

    /// Sets the text of run `id`, keeping the text held by waiting runs bounded.
    fn set_text(
        &mut self,
        id: u64,
        text: Option<(Arc<str>, bool)>,
        statement: Option<String>,
        out: &mut Vec<Output>,
    ) {
        let Some(run) = self.run(id) else { return };
        let old = run.text_len();
        run.parse_seen = text.is_some();
        (run.text, run.truncated) = match text {
            Some((t, truncated)) => (Some(t), truncated),
            None => (None, false),
        };
        run.statement_name = statement;
        let new = run.text_len();
        self.run_text = self.run_text - old + new;
        while self.run_text > MAX_PENDING_TEXT && self.runs.front().is_some_and(|r| r.id != id) {
            self.drop_oldest_run(out);
        }
    }

    /// Queues frontend message `kind`, which began at `start`, for its answer.
    fn push(&mut self, kind: ItemKind, run: Option<u64>, start: Origin, out: &mut Vec<Output>) {
        if self.items.len() >= MAX_QUEUE
            && let Some(old) = self.items.pop_front()
        {
            out.push(Output::Skipped(SkipReason::TooManyPending));
            self.release(old);
        }
        if let Some(r) = run.and_then(|id| self.run(id)) {
            r.pending += 1;
        }
        self.items.push_back(Item { kind, run, start });
    }

    /// An item left the queue: a run that only prepared and has nothing left to wait for is done.
    fn release(&mut self, item: Item) {
        let Some(id) = item.run else { return };
        let Some(run) = self.run(id) else { return };
        run.pending = run.pending.saturating_sub(1);
        if run.pending == 0 && !run.reported && self.open != Some(id) {
            self.take_run(id);
        }
    }

    fn emit(
        &mut self,
        run: Run,
        role: Option<Role>,
        outcome: Outcome,
        end_ns: u64,
        out: &mut Vec<Output>,
    ) {
        let outcome = if run.partial && outcome == Outcome::Complete {
            Outcome::Partial
        } else {
            outcome
        };
        let pg = PgExchange {
            query: run.text.map(|t| t.to_string()),
            query_truncated: run.truncated,
            statement_name: run.statement_name,
            parse_seen: run.parse_seen,
            database: self.params.database.clone(),
            user: self.params.user.clone(),
            application_name: self.params.application_name.clone(),
            command_tag: run.command_tag,
            completions: run.completions,
            rows: (run.result_set || run.rows > 0).then_some(run.rows),
            error: run.error.map(Box::new),
            empty_query: run.empty_query,
            suspended: run.suspended,
            row_limit: run.row_limit,
            copy_bytes: run.copy_bytes,
            aborted: false,
        };
        out.push(Output::Exchange(Exchange {
            role: role.unwrap_or(Role::Client),
            start_ns: run.start.ns,
            end_ns: end_ns.max(run.start.ns),
            request_offset: run.start.offset,
            request_thread: run.start.thread,
            outcome,
            detail: Detail::Postgres(pg),
        }));
    }

    /// Reports run `id` as never executed: an earlier message of its batch failed.
    fn emit_aborted(&mut self, id: u64, end_ns: u64, out: &mut Vec<Output>) {
        let Some(run) = self.take_run(id) else { return };
        let role = self.role();
        self.emit(run, role, Outcome::NoResponse, end_ns, out);
        if let Some(Output::Exchange(Exchange {
            detail: Detail::Postgres(pg),
            ..
        })) = out.last_mut()
        {
            pg.aborted = true;
        }
    }

    fn finish(&mut self, id: u64, end_ns: u64, out: &mut Vec<Output>) {
        if let Some(run) = self.take_run(id) {
            let role = self.role();
            self.emit(run, role, Outcome::Complete, end_ns, out);
        }
    }

    // ---- frontend ----

    /// A message from the frontend.
    pub fn frontend(&mut self, m: &Msg<'_>, out: &mut Vec<Output>) -> Action {
        if m.tag == 0 {
            return self.untyped(m);
        }
        if self.skip_until_sync {
            return self.skipped_by_backend(m, out);
        }
        match m.tag {
            b'Q' => self.query(m, out),
            b'P' => self.parse(m, out),
            b'B' => self.bind(m, out),
            b'D' => {
                let id = self.open_run_for(m, out);
                self.push(ItemKind::Describe, Some(id), m.start, out);
            }
            b'E' => self.execute(m, out),
            b'S' => {
                self.close_open();
                self.push(ItemKind::Sync, None, m.start, out);
            }
            b'C' => {
                let (name, _) = cstr_or_rest(m.body.get(1..).unwrap_or_default());
                let name = text(name, MAX_NAME);
                match m.body.first() {
                    Some(b'S') => self.statements.remove(&name),
                    Some(b'P') => self.portals.remove(&name),
                    _ => {}
                }
                self.push(ItemKind::Close, None, m.start, out);
            }
            b'F' => self.push(ItemKind::Function, None, m.start, out),
            b'd' => {
                if let Some(r) = self.copy_in.and_then(|id| self.run(id)) {
                    r.copy_bytes += u64::from(m.len);
                }
            }
            b'c' | b'f' => self.copy_in = None,
            // Flush, Terminate and authentication responses get no answer to pair.
            _ => {}
        }
        Action::None
    }

    fn untyped(&mut self, m: &Msg<'_>) -> Action {
        match m.untyped {
            Some(Untyped::Ssl | Untyped::Gss) => {
                self.awaiting_answer = true;
                Action::ExpectAnswer
            }
            Some(Untyped::Startup) => {
                // The body starts with the protocol code's remainder already consumed.
                if let Some(p) = wire::startup_params(m.body) {
                    self.params = p;
                }
                self.startup_seen = true;
                Action::StartupDone
            }
            Some(Untyped::Cancel) | None => Action::Stop,
        }
    }

    /// After an error the backend discards everything up to Sync; an Execute (or Query) sent
    /// in that window is reported as not executed, with the text the client meant to run.
    fn skipped_by_backend(&mut self, m: &Msg<'_>, out: &mut Vec<Output>) -> Action {
        match m.tag {
            b'S' => {
                self.skip_until_sync = false;
                self.swallow_execute = None;
                self.close_open();
                self.push(ItemKind::Sync, None, m.start, out);
            }
            b'P' => {
                self.swallow_execute = None;
                let (name, sql) = parse_body(m);
                let id = self.open_run(m.start, out);
                self.set_text(id, Some(sql), Some(name), out);
            }
            b'B' => {
                let (_, statement) = bind_body(m.body);
                if self.swallow_execute.as_ref() != Some(&statement) {
                    self.swallow_execute = None;
                }
                let id = self.open_run(m.start, out);
                // A Parse discarded in this window named the statement: its text is the one
                // meant, not what the statement table holds from before.
                let parsed_here = self.run(id).is_some_and(|r| {
                    r.parse_seen && r.statement_name.as_deref() == Some(&statement)
                });
                if !parsed_here {
                    let known = self.statements.get(&statement);
                    self.set_text(id, known, Some(statement), out);
                }
            }
            b'E' if self.swallow_execute.is_some() => self.swallow_execute = None,
            b'E' => {
                let id = self.open_run(m.start, out);
                self.emit_aborted(id, m.end_ns, out);
            }
            b'Q' => {
                self.close_open();
                let id = self.new_run(m.start, out);
                self.set_text(id, Some(query_body(m)), None, out);
                self.emit_aborted(id, m.end_ns, out);
            }

            _ => {}
        }
        Action::None
    }

    fn query(&mut self, m: &Msg<'_>, out: &mut Vec<Output>) {
        self.close_open();
        let id = self.new_run(m.start, out);
        let sql = query_body(m);
        self.set_text(id, Some(sql), None, out);
        if let Some(r) = self.run(id) {
            r.reported = true;
            r.partial |= m.partial;
        }
        self.push(ItemKind::Query, Some(id), m.start, out);
    }

    fn parse(&mut self, m: &Msg<'_>, out: &mut Vec<Output>) {
        let (name, sql) = parse_body(m);
        self.statements.insert(name.clone(), sql.0.clone(), sql.1);
        let id = self.open_run_for(m, out);
        self.set_text(id, Some(sql), Some(name), out);
        self.push(ItemKind::Parse, Some(id), m.start, out);
    }

    fn bind(&mut self, m: &Msg<'_>, out: &mut Vec<Output>) {
        let (portal, statement) = bind_body(m.body);
        let known = self.statements.get(&statement);
        self.portals
            .insert(portal, statement.clone(), known.clone());
        let id = self.open_run_for(m, out);
        self.set_text(id, known, Some(statement), out);
        self.push(ItemKind::Bind, Some(id), m.start, out);
    }

    fn execute(&mut self, m: &Msg<'_>, out: &mut Vec<Output>) {
        let (portal, named) = cstr_or_rest(m.body);
        let row_limit = if named {
            be32(&m.body[portal.len() + 1..], 0).unwrap_or(0)
        } else {
            0
        };
        let portal = text(portal, MAX_NAME);
        let binding = self.portals.get(&portal);
        let id = self.open_run_for(m, out);
        match binding {
            Some(b) => self.set_text(id, b.text, Some(b.statement), out),
            None => self.set_text(id, None, None, out),
        }
        if let Some(r) = self.run(id) {
            r.reported = true;
            r.row_limit = row_limit;
        }
        self.push(ItemKind::Execute, Some(id), m.start, out);
        self.open = None;
    }

    // ---- backend ----

    /// A message from the backend.
    pub fn backend(&mut self, m: &Msg<'_>, out: &mut Vec<Output>) {
        use ItemKind::*;
        match m.tag {
            b'Z' => {
                self.ready = true;
                self.copy_in = None;
                self.copy_out = None;
                if let Some(item) = self.seek(m, &[Sync, Query, Function], out) {
                    self.items.pop_front();
                    if item.kind == Query
                        && let Some(id) = item.run
                    {
                        self.finish(id, m.end_ns, out);
                    } else {
                        self.release(item);
                    }
                }
            }
            b'1' => self.answer(m, &[Parse], out),
            b'2' => self.answer(m, &[Bind], out),
            b'3' => self.answer(m, &[Close], out),
            b'n' => self.answer(m, &[Describe], out),
            b't' => {
                self.seek(m, &[Describe], out);
            }
            b'T' => {
                if let Some(item) = self.seek(m, &[Describe, Query], out) {
                    self.touch(item, m, |r| r.result_set = true);
                    if item.kind == Describe {
                        self.items.pop_front();
                        self.release(item);
                    }
                }
            }
            b'D' => {
                if let Some(item) = self.seek(m, &[Execute, Query], out) {
                    self.touch(item, m, |r| r.rows += 1);
                }
            }
            b'C' | b'I' | b's' => self.completion(m, out),
            b'G' | b'H' | b'W' => {
                if let Some(item) = self.seek(m, &[Execute, Query], out) {
                    self.touch(item, m, |_| {});
                    if m.tag != b'H' {
                        self.copy_in = item.run;
                    }
                    if m.tag != b'G' {
                        self.copy_out = item.run;
                    }
                }
            }
            b'd' => {
                if let Some(r) = self.copy_out.and_then(|id| self.run(id)) {
                    r.copy_bytes += u64::from(m.len);
                    r.end_ns = r.end_ns.max(m.end_ns);
                }
            }
            b'E' => self.error(m, out),
            // Authentication, parameters, key data, notices, notifications, copy done,
            // function results: nothing to pair.
            _ => {}
        }
    }

    /// The oldest item that can take the answer `m`, after dropping the items before it whose
    /// answers were lost. `None` when no waiting item can take it.
    fn seek(&mut self, m: &Msg<'_>, kinds: &[ItemKind], out: &mut Vec<Output>) -> Option<Item> {
        let at = self
            .items
            .iter()
            .take(SEEK_LIMIT)
            .position(|i| kinds.contains(&i.kind));
        let Some(at) = at else {
            if matches!(m.tag, b'C' | b'I' | b's') {
                out.push(Output::Skipped(SkipReason::UnpairedResponse));
            }
            return None;
        };
        for _ in 0..at {
            let Some(lost) = self.items.pop_front() else {
                break;
            };
            self.lost(lost, m.start.ns, out);
        }
        self.items.front().copied()
    }

    /// The answer to `item` never arrived (a gap took it).
    fn lost(&mut self, item: Item, end_ns: u64, out: &mut Vec<Output>) {
        let Some(id) = item.run else { return };
        if matches!(item.kind, ItemKind::Execute | ItemKind::Query) {
            if let Some(mut run) = self.take_run(id) {
                run.partial = true;
                let role = self.role();
                self.emit(run, role, Outcome::Partial, end_ns, out);
            }
            return;
        }
        if let Some(r) = self.run(id) {
            r.partial = true;
        }
        self.release(item);
    }

    /// Applies `f` to the run of `item` and notes that it got an answer at `m`.
    fn touch(&mut self, item: Item, m: &Msg<'_>, f: impl FnOnce(&mut Run)) {
        if let Some(r) = item.run.and_then(|id| self.run(id)) {
            r.responded = true;
            r.end_ns = r.end_ns.max(m.end_ns);
            r.partial |= m.partial;
            f(r);
        }
    }

    /// A one-message answer to an item of one of `kinds`.
    fn answer(&mut self, m: &Msg<'_>, kinds: &[ItemKind], out: &mut Vec<Output>) {
        if let Some(item) = self.seek(m, kinds, out) {
            self.items.pop_front();
            self.touch(item, m, |_| {});
            self.release(item);
        }
    }

    /// CommandComplete, EmptyQueryResponse or PortalSuspended.
    fn completion(&mut self, m: &Msg<'_>, out: &mut Vec<Output>) {
        let kinds: &[ItemKind] = if m.tag == b's' {
            &[ItemKind::Execute]
        } else {
            &[ItemKind::Execute, ItemKind::Query]
        };
        let Some(mut item) = self.seek(m, kinds, out) else {
            return;
        };
        let tag = (m.tag == b'C').then(|| text(cstr_or_rest(m.body).0, MAX_TAG));
        if let Some(tag) = &tag
            && self.suspect
        {
            item = self.realign(item, tag, m.start.ns, out);
        }
        self.touch(item, m, |r| match tag {
            Some(tag) => {
                // Row-returning commands return a result set even when it has no rows.
                r.result_set |= tag.starts_with("SELECT ") || tag.starts_with("FETCH ");
                r.command_tag = Some(tag);
                r.completions += 1;
            }
            None if m.tag == b'I' => {
                r.empty_query = true;
                r.completions += 1;
            }
            _ => r.suspended = true,
        });
        if item.kind == ItemKind::Execute {
            self.items.pop_front();
            if let Some(id) = item.run {
                self.finish(id, m.end_ns, out);
            }
        }
    }

    /// Answers were lost in a gap, so the oldest statement may not be the one that completed with
    /// `tag`. When the statement's text contradicts the tag (an `UPDATE` answered `SELECT 1`),
    /// the first later statement whose text fits the tag is taken as the one answered and the
    /// statements before it as having lost their answers. Returns the item now answered.
    fn realign(&mut self, item: Item, tag: &str, lost_at: u64, out: &mut Vec<Output>) -> Item {
        let fits = |s: &Session, i: &Item| -> Option<bool> {
            let id = i.run?;
            let run = s
                .runs
                .get(s.runs.binary_search_by_key(&id, |r| r.id).ok()?)?;
            if i.kind == ItemKind::Query && run.completions > 0 {
                return None;
            }
            tag_fits(run.text.as_deref()?, tag)
        };
        match fits(self, &item) {
            Some(true) => {
                self.suspect = false;
                item
            }
            None => item,
            Some(false) => {
                let at = self.items.iter().take(SEEK_LIMIT).position(|i| {
                    matches!(i.kind, ItemKind::Execute | ItemKind::Query)
                        && fits(self, i) == Some(true)
                });
                let Some(at) = at else { return item };
                for _ in 0..at {
                    if let Some(lost) = self.items.pop_front() {
                        self.lost(lost, lost_at, out);
                    }
                }
                self.suspect = false;
                self.items.front().copied().unwrap_or(item)
            }
        }
    }

    fn error(&mut self, m: &Msg<'_>, out: &mut Vec<Output>) {
        let fields = wire::error_fields(m.body);
        let Some(item) = self.items.front().copied() else {
            // Startup failures and FATAL shutdowns belong to no statement.
            if self.ready {
                out.push(Output::Skipped(SkipReason::UnpairedResponse));
            }
            return;
        };
        match item.kind {
            ItemKind::Query | ItemKind::Function => {
                // A simple query stops at its first error; ReadyForQuery still ends it.
                self.touch(item, m, |r| r.error = Some(fields));
            }
            ItemKind::Sync => {
                // A failure at Sync (commit of the implicit transaction) has no statement of
                // its own: report it without text, at the Sync that it answers.
                let start = Origin {
                    ns: m.start.ns,
                    ..item.start
                };
                let id = self.new_run(start, out);
                if let Some(r) = self.run(id) {
                    r.error = Some(fields);
                    r.responded = true;
                }
                self.finish(id, m.end_ns, out);
            }
            _ => {
                self.items.pop_front();
                self.swallow_execute = item
                    .run
                    .filter(|&id| self.open == Some(id))
                    .and_then(|id| self.runs.iter().find(|r| r.id == id))
                    .map(|r| r.statement_name.clone().unwrap_or_default());
                if let Some(id) = item.run {
                    self.touch(item, m, |r| r.error = Some(fields));
                    if let Some(r) = self.run(id) {
                        r.pending = r.pending.saturating_sub(1);
                    }
                    self.finish(id, m.end_ns, out);
                }
                self.skip_batch(m.end_ns, out);
            }
        }
    }

    /// After an error in the extended protocol the backend discards messages until Sync: the
    /// runs queued before the next Sync are reported as not executed.
    fn skip_batch(&mut self, end_ns: u64, out: &mut Vec<Output>) {
        while let Some(&item) = self.items.front() {
            if item.kind == ItemKind::Sync {
                return;
            }
            self.items.pop_front();
            match (item.kind, item.run) {
                (ItemKind::Execute | ItemKind::Query, Some(id)) => {
                    self.emit_aborted(id, end_ns, out)
                }
                _ => self.release(item),
            }
        }
        // The Sync has not been sent yet: what the frontend sends until then is discarded too.
        self.skip_until_sync = true;
    }
}

/// Whether command tag `tag` can answer `sql`: `None` when the statement's first keyword does
/// not determine the tag (`WITH`, `EXECUTE`, DDL...).
fn tag_fits(sql: &str, tag: &str) -> Option<bool> {
    let keyword = first_keyword(sql)?;
    let allowed: &[&str] = match keyword.to_ascii_uppercase().as_str() {
        "SELECT" => &["SELECT"],
        "INSERT" => &["INSERT"],
        "UPDATE" => &["UPDATE"],
        "DELETE" => &["DELETE"],
        "MERGE" => &["MERGE"],
        "BEGIN" => &["BEGIN"],
        "START" => &["START"],
        // COMMIT of a failed transaction answers ROLLBACK.
        "COMMIT" | "END" => &["COMMIT", "ROLLBACK"],
        "ROLLBACK" | "ABORT" => &["ROLLBACK"],
        _ => return None,
    };
    let word = tag.split(' ').next().unwrap_or(tag);
    Some(allowed.contains(&word))
}

/// The first word of `sql` after blanks and comments.
fn first_keyword(sql: &str) -> Option<&str> {
    let mut rest = sql.trim_start();
    loop {
        if let Some(r) = rest.strip_prefix("--") {
            rest = r
                .split_once('\n')
                .map_or("", |(_, after)| after)
                .trim_start();
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r
                .split_once("*/")
                .map_or("", |(_, after)| after)
                .trim_start();
        } else {
            break;
        }
    }
    let end = rest
        .find(|c: char| !c.is_ascii_alphabetic())
        .unwrap_or(rest.len());
    (end > 0).then(|| &rest[..end])
}

fn other(dir: Direction) -> Direction {
    match dir {
        Direction::Send => Direction::Recv,
        Direction::Recv => Direction::Send,
    }
}

/// The SQL of a Query message and whether it was cut.
fn query_body(m: &Msg<'_>) -> (Arc<str>, bool) {
    let (sql, complete) = cstr_or_rest(m.body);
    let truncated = !complete || m.partial || sql.len() > MAX_QUERY;
    (Arc::from(text(sql, MAX_QUERY)), truncated)
}

/// Statement name, and SQL with whether it was cut, of a Parse message.
fn parse_body(m: &Msg<'_>) -> (String, (Arc<str>, bool)) {
    let (name, named) = cstr_or_rest(m.body);
    let rest = if named {
        &m.body[name.len() + 1..]
    } else {
        &[][..]
    };
    let (sql, complete) = cstr_or_rest(rest);
    let truncated = !complete || m.partial || sql.len() > MAX_QUERY;
    (
        text(name, MAX_NAME),
        (Arc::from(text(sql, MAX_QUERY)), truncated),
    )
}

/// Portal and statement names of a Bind message.
fn bind_body(body: &[u8]) -> (String, String) {
    let (portal, named) = cstr_or_rest(body);
    let rest = if named {
        &body[portal.len() + 1..]
    } else {
        &[][..]
    };
    let (statement, _) = cstr_or_rest(rest);
    (text(portal, MAX_NAME), text(statement, MAX_NAME))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_tags_fit_statements() {
        assert_eq!(tag_fits("SELECT 1", "SELECT 1"), Some(true));
        assert_eq!(
            tag_fits("  -- c\n/* x */ update t set a = 1", "UPDATE 3"),
            Some(true)
        );
        assert_eq!(tag_fits("UPDATE t SET a = 1", "SELECT 1"), Some(false));
        assert_eq!(tag_fits("END;", "COMMIT"), Some(true));
        assert_eq!(
            tag_fits("COMMIT", "ROLLBACK"),
            Some(true),
            "commit of a failed transaction"
        );
        assert_eq!(tag_fits("BEGIN;", "COMMIT"), Some(false));
        assert_eq!(
            tag_fits("WITH x AS (SELECT 1) DELETE FROM t", "DELETE 1"),
            None
        );
        assert_eq!(tag_fits("EXECUTE p", "INSERT 0 1"), None);
        assert_eq!(tag_fits("", "SELECT 1"), None);
        assert_eq!(first_keyword("/* unterminated"), None);
    }
}
