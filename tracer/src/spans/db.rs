//! Spans for database statements, following the stable OpenTelemetry database semantic
//! conventions for PostgreSQL.
//!
//! - `db.query.text`: the SQL as captured, with string, numeric and boolean literals replaced by
//!   `?` and `IN (?, ?, ?)` lists collapsed to `IN (?)` ([`sanitize_sql`]), unless it holds `$n`
//!   parameters: the conventions say parameterized text is kept as is. `--raw-query-text` (config
//!   `sanitize_query_text = false`) turns sanitising off.
//! - `db.query.summary` (and the span name): operations and their targets in the order written
//!   (`SELECT users`, `INSERT orders SELECT carts`), read by a small lexer, not a SQL parser,
//!   and cut to 255 characters between words. A simple query string with several statements is a
//!   batch: `BATCH <summary>` when all statements share one summary, else `BATCH`, with
//!   `db.operation.batch.size`.
//! - `db.operation.name`: the first operation of the summary when the text is known (so the two
//!   agree, as the conventions ask), else the command of the CommandComplete tag (`INSERT 0 1` →
//!   `INSERT`).
//! - `db.collection.name` and `db.stored_procedure.name`: only when the statement names exactly
//!   one operation and one table (`SELECT * FROM users WHERE ...`), or `CALL proc`. The
//!   PostgreSQL conventions discourage reading them from the text because a statement may touch
//!   several tables; with a single table there is no ambiguity.
//! - `db.namespace`: the database of the startup message (PostgreSQL defaults it to the user
//!   name, so the user stands in when the database was not given); the schema is not known
//!   without another query. Absent when the connection's start was not captured.
//! - `db.response.status_code` and `error.type`: the SQLSTATE of an ErrorResponse (classes 02
//!   and above are errors, status description = the server's message). `error.type` is
//!   `no_response` when the connection closed before the answer, and `pipeline_aborted` when
//!   the server skipped the statement because an earlier one of its batch failed.
//! - `db.response.returned_rows`: the DataRow messages seen (the command tag's count when part
//!   of the answer was lost in a capture gap).
//! - A statement prepared before the capture started has no text: `db.query.text` is absent,
//!   `tracer.db.query_text_unknown` is true and `db.postgresql.statement_name` names the
//!   prepared statement.
//!
//! Span kind is CLIENT for the process that sent the statement and SERVER for the PostgreSQL
//! server process itself; `server.*` is the server end of the connection either way.

use std::sync::Arc;

use protocols::postgres::PgExchange;
use protocols::{Exchange, Outcome, Role};

use super::{Clock, ConnAddrs, ERROR_NO_RESPONSE, ip_string, random_id};
use crate::span::{Attributes, KeyValue, Resource, Span, SpanKind, Status, Value};

/// `db.system.name`, also the span name when nothing better is known.
const SYSTEM: &str = "postgresql";
/// Longest `db.query.summary`, in characters (from the conventions).
const MAX_SUMMARY: usize = 255;
/// `error.type` of a statement the server skipped after an earlier error of its batch.
const ERROR_PIPELINE_ABORTED: &str = "pipeline_aborted";
/// `error.type` of an ErrorResponse without a readable SQLSTATE.
const ERROR_OTHER: &str = "_OTHER";

/// The span for one PostgreSQL statement, by the database semantic conventions; `sanitize`
/// replaces literals in non-parameterized query text by `?`.
pub fn postgres_span(
    ex: &Exchange,
    pg: &PgExchange,
    addrs: Option<&ConnAddrs>,
    resource: Arc<Resource>,
    clock: &Clock,
    sanitize: bool,
) -> Span {
    let kind = match ex.role {
        Role::Client => SpanKind::Client,
        Role::Server => SpanKind::Server,
    };
    let mut attributes = Attributes::scratch();
    attributes.push_str("db.system.name", SYSTEM);
    if let Some(ns) = pg.database.as_deref().or(pg.user.as_deref()) {
        attributes.push_str("db.namespace", ns);
    }

    let described = pg.query.as_deref().map(describe);
    let tag_operation = pg.command_tag.as_deref().map(tag_command);
    let operation = described
        .as_ref()
        .and_then(|d| d.operation.clone())
        .or(tag_operation);
    if let Some(sql) = &pg.query {
        let parameterized = described.as_ref().is_some_and(|d| d.parameterized);
        let text = if sanitize && !parameterized {
            sanitize_sql(sql)
        } else {
            sql.clone()
        };
        attributes.push_str("db.query.text", &text);
    }
    let summary = described.as_ref().and_then(|d| d.summary.clone());
    if let Some(s) = &summary {
        attributes.push_str("db.query.summary", s);
    }
    if let Some(op) = &operation {
        attributes.push_str("db.operation.name", op);
    }
    if let Some(d) = &described {
        if let Some(c) = &d.collection {
            attributes.push_str("db.collection.name", c);
        }
        if let Some(p) = &d.procedure {
            attributes.push_str("db.stored_procedure.name", p);
        }
        if d.statements > 1 {
            attributes.push_int(
                "db.operation.batch.size",
                i64::try_from(d.statements).unwrap_or(i64::MAX),
            );
        }
    }
    if pg.query.is_none() {
        attributes.push(KeyValue {
            key: "tracer.db.query_text_unknown",
            value: Value::Bool(true),
        });
        if let Some(name) = pg.statement_name.as_deref().filter(|n| !n.is_empty()) {
            attributes.push_str("db.postgresql.statement_name", name);
        }
    } else if pg.query_truncated {
        attributes.push(KeyValue {
            key: "tracer.db.query_text_truncated",
            value: Value::Bool(true),
        });
    }
    if let Some(rows) = returned_rows(pg, ex.outcome) {
        attributes.push_int(
            "db.response.returned_rows",
            i64::try_from(rows).unwrap_or(i64::MAX),
        );
    }

    if let Some(a) = addrs {
        let (server, peer) = match kind {
            SpanKind::Client => (a.remote, a.remote),
            SpanKind::Server => (a.local, a.remote),
        };
        attributes.push_str("server.address", &ip_string(server.ip()));
        attributes.push_int("server.port", i64::from(server.port()));
        if kind == SpanKind::Server {
            attributes.push_str("client.address", &ip_string(peer.ip()));
            attributes.push_int("client.port", i64::from(peer.port()));
        }
        attributes.push_str("network.peer.address", &ip_string(peer.ip()));
        attributes.push_int("network.peer.port", i64::from(peer.port()));
    }

    let status = classify(pg, ex.outcome, &mut attributes);
    let name = summary.or(operation).unwrap_or_else(|| SYSTEM.to_owned());
    let start_unix_ns = clock.to_unix_ns(ex.start_ns);
    Span {
        trace_id: random_id(),
        span_id: random_id(),
        parent_span_id: None,
        trace_state: String::new(),
        name: name.into(),
        kind,
        start_unix_ns,
        end_unix_ns: clock.to_unix_ns(ex.end_ns).max(start_unix_ns),
        attributes: attributes.finish(),
        status,
        resource,
    }
}

/// Span status, and `db.response.status_code` / `error.type` pushed onto `attrs`.
fn classify(pg: &PgExchange, outcome: Outcome, attrs: &mut Attributes) -> Status {
    if pg.aborted {
        attrs.push_str("error.type", ERROR_PIPELINE_ABORTED);
        return Status::Error(Some(
            "not executed: an earlier statement of its batch failed".to_owned(),
        ));
    }
    if let Some(err) = &pg.error {
        let code = err.sqlstate.as_deref();
        if let Some(code) = code {
            attrs.push_str("db.response.status_code", code);
        }
        // Class 00 (success) and 01 (warning) are not errors; ErrorResponse never carries them.
        if code.is_none_or(|c| !(c.starts_with("00") || c.starts_with("01"))) {
            attrs.push_str("error.type", code.unwrap_or(ERROR_OTHER));
            return Status::Error(err.message.clone());
        }
    }
    if outcome == Outcome::NoResponse {
        attrs.push_str("error.type", ERROR_NO_RESPONSE);
        return Status::Error(Some("connection closed before the answer".to_owned()));
    }
    Status::Unset
}

/// Rows returned: DataRows counted, or the tag's count for row-returning commands when part of
/// the answer was lost.
fn returned_rows(pg: &PgExchange, outcome: Outcome) -> Option<u64> {
    let tagged = pg.command_tag.as_deref().and_then(|t| {
        let (command, count) = t.rsplit_once(' ')?;
        matches!(command, "SELECT" | "FETCH")
            .then(|| count.parse::<u64>().ok())
            .flatten()
    });
    match (pg.rows, tagged) {
        (Some(rows), Some(n)) if outcome == Outcome::Partial => Some(rows.max(n)),
        (rows, _) => rows,
    }
}

/// The command of a CommandComplete tag: the tag without its counts (`INSERT 0 1` → `INSERT`).
fn tag_command(tag: &str) -> String {
    let words: Vec<&str> = tag.split(' ').filter(|w| !w.is_empty()).collect();
    let keep = words
        .iter()
        .rposition(|w| !w.bytes().all(|b| b.is_ascii_digit()))
        .map_or(0, |i| i + 1);
    words[..keep].join(" ")
}

// ---- lexer ----

/// Kinds of SQL tokens, as far as sanitising and summarising need them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Space,
    Comment,
    /// Unquoted identifier or keyword.
    Word,
    /// `"quoted identifier"`.
    Quoted,
    /// String literal of any form: `'..'`, `E'..'`, `B'..'`, `X'..'`, `U&'..'`, `$tag$..$tag$`.
    Str,
    Number,
    /// `$1`.
    Param,
    /// Any other character.
    Punct,
}

#[derive(Debug, Clone, Copy)]
struct Token<'a> {
    kind: Kind,
    text: &'a str,
}

impl Token<'_> {
    fn is_word(&self, w: &str) -> bool {
        self.kind == Kind::Word && self.text.eq_ignore_ascii_case(w)
    }
    fn is_punct(&self, c: &str) -> bool {
        self.kind == Kind::Punct && self.text == c
    }
    fn significant(&self) -> bool {
        !matches!(self.kind, Kind::Space | Kind::Comment)
    }
    fn literal(&self) -> bool {
        matches!(self.kind, Kind::Str | Kind::Number)
            || self.is_word("TRUE")
            || self.is_word("FALSE")
    }
}

fn is_word_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || !c.is_ascii()
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '$' || !c.is_ascii()
}

/// Splits SQL into tokens; never fails (unterminated constructs run to the end).
fn tokenize(sql: &str) -> Vec<Token<'_>> {
    let mut tokens = Vec::new();
    let b = sql.as_bytes();
    let mut i = 0;
    while i < sql.len() {
        let rest = &sql[i..];
        let c = rest.chars().next().unwrap_or(' ');
        let (kind, len) = if c.is_whitespace() {
            let n = rest
                .find(|c: char| !c.is_whitespace())
                .unwrap_or(rest.len());
            (Kind::Space, n)
        } else if rest.starts_with("--") {
            (Kind::Comment, rest.find('\n').unwrap_or(rest.len()))
        } else if rest.starts_with("/*") {
            (Kind::Comment, block_comment(rest))
        } else if c == '\'' {
            (Kind::Str, quoted(rest, 0, b'\'', false))
        } else if c == '"' {
            (Kind::Quoted, quoted(rest, 0, b'"', false))
        } else if c == '$' {
            dollar(rest)
        } else if c.is_ascii_digit() || (c == '.' && b.get(i + 1).is_some_and(u8::is_ascii_digit)) {
            (Kind::Number, number(rest))
        } else if is_word_start(c) {
            word_or_prefixed_string(rest)
        } else {
            (Kind::Punct, c.len_utf8())
        };
        let len = len.max(1).min(rest.len());
        // Token ends always fall on character boundaries: every scanner stops at ASCII bytes or
        // at the end; guard anyway so odd input cannot panic.
        let mut end = i + len;
        while !sql.is_char_boundary(end) {
            end += 1;
        }
        tokens.push(Token {
            kind,
            text: &sql[i..end],
        });
        i = end;
    }
    tokens
}

/// Length of a `/* */` comment (they nest in PostgreSQL).
fn block_comment(s: &str) -> usize {
    let b = s.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i + 1 < b.len() {
        match (b[i], b[i + 1]) {
            (b'/', b'*') => {
                depth += 1;
                i += 2;
            }
            (b'*', b'/') => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return i;
                }
            }
            _ => i += 1,
        }
    }
    s.len()
}

/// Length of a literal or identifier quoted by `q` starting at byte `at` of `s`; a doubled quote
/// stands for itself, and with `backslash` a backslash escapes the next byte.
fn quoted(s: &str, at: usize, q: u8, backslash: bool) -> usize {
    let b = s.as_bytes();
    let mut i = at + 1;
    while i < b.len() {
        if backslash && b[i] == b'\\' {
            i += 2;
        } else if b[i] == q {
            if b.get(i + 1) == Some(&q) {
                i += 2;
            } else {
                return i + 1;
            }
        } else {
            i += 1;
        }
    }
    s.len()
}

/// `$1` parameter, `$tag$...$tag$` string, or a lone `$`.
fn dollar(s: &str) -> (Kind, usize) {
    let b = s.as_bytes();
    let digits = b[1..].iter().take_while(|c| c.is_ascii_digit()).count();
    if digits > 0 {
        return (Kind::Param, 1 + digits);
    }
    let tag_len = s[1..]
        .char_indices()
        .take_while(|&(j, c)| {
            if j == 0 {
                is_word_start(c)
            } else {
                c.is_ascii_alphanumeric() || c == '_' || !c.is_ascii()
            }
        })
        .map(|(j, c)| j + c.len_utf8())
        .last()
        .unwrap_or(0);
    if b.get(1 + tag_len) != Some(&b'$') {
        return (Kind::Punct, 1);
    }
    let delimiter = &s[..tag_len + 2];
    let body = &s[delimiter.len()..];
    let len = body
        .find(delimiter)
        .map_or(s.len(), |end| delimiter.len() + end + delimiter.len());
    (Kind::Str, len)
}

/// Decimal, hexadecimal (`0x`), octal (`0o`) and binary (`0b`) numbers, with `_` separators,
/// fractions and exponents.
fn number(s: &str) -> usize {
    let b = s.as_bytes();
    if b.len() > 2 && b[0] == b'0' && matches!(b[1], b'x' | b'X' | b'o' | b'O' | b'b' | b'B') {
        return 2 + b[2..]
            .iter()
            .take_while(|c| c.is_ascii_hexdigit() || **c == b'_')
            .count();
    }
    let mut i = b
        .iter()
        .take_while(|c| c.is_ascii_digit() || **c == b'_')
        .count();
    if b.get(i) == Some(&b'.') {
        i += 1;
        i += b[i..]
            .iter()
            .take_while(|c| c.is_ascii_digit() || **c == b'_')
            .count();
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let mut j = i + 1;
        if matches!(b.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        let digits = b[j.min(b.len())..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        if digits > 0 {
            i = j + digits;
        }
    }
    i
}

/// A word, or a string with a one-letter prefix (`E'..'`, `B'..'`, `X'..'`, `N'..'`, `U&'..'`).
fn word_or_prefixed_string(s: &str) -> (Kind, usize) {
    let b = s.as_bytes();
    match (b[0].to_ascii_uppercase(), b.get(1), b.get(2)) {
        (b'E', Some(b'\''), _) => return (Kind::Str, quoted(s, 1, b'\'', true)),
        (b'B' | b'X' | b'N', Some(b'\''), _) => return (Kind::Str, quoted(s, 1, b'\'', false)),
        (b'U', Some(b'&'), Some(b'\'')) => return (Kind::Str, quoted(s, 2, b'\'', false)),
        _ => {}
    }
    let len = s
        .char_indices()
        .take_while(|&(_, c)| is_word_char(c))
        .map(|(j, c)| j + c.len_utf8())
        .last()
        .unwrap_or(1);
    (Kind::Word, len)
}

// ---- sanitising ----

/// `sql` with string, numeric and boolean literals replaced by `?`, and lists of literals after
/// `IN` collapsed to `IN (?)`. Comments, identifiers and `$n` parameters are kept.
pub fn sanitize_sql(sql: &str) -> String {
    let tokens = tokenize(sql);
    let mut out = String::with_capacity(sql.len());
    let mut i = 0;
    while i < tokens.len() {
        let t = tokens[i];
        if t.is_word("IN")
            && let Some(end) = literal_list_end(&tokens, i + 1)
        {
            out.push_str(t.text);
            out.push_str(" (?)");
            i = end;
            continue;
        }
        if t.literal() {
            out.push('?');
        } else {
            out.push_str(t.text);
        }
        i += 1;
    }
    out
}

/// When `tokens[from..]` is `( literal, literal, ... )` (blanks allowed), the index after `)`.
fn literal_list_end(tokens: &[Token<'_>], from: usize) -> Option<usize> {
    let mut i = from;
    let skip = |mut i: usize| {
        while tokens.get(i).is_some_and(|t| !t.significant()) {
            i += 1;
        }
        i
    };
    i = skip(i);
    if !tokens.get(i)?.is_punct("(") {
        return None;
    }
    loop {
        i = skip(i + 1);
        let t = tokens.get(i)?;
        let negative = t.is_punct("-");
        if negative {
            i = skip(i + 1);
        }
        if !tokens.get(i)?.literal() {
            return None;
        }
        i = skip(i + 1);
        let t = tokens.get(i)?;
        if t.is_punct(")") {
            return Some(i + 1);
        }
        if !t.is_punct(",") {
            return None;
        }
    }
}

// ---- summarising ----

/// What a statement text says about itself.
#[derive(Debug, Default, PartialEq)]
struct Description {
    /// `db.query.summary`.
    summary: Option<String>,
    /// `db.operation.name` read from the text.
    operation: Option<String>,
    /// The one table of a single-operation statement.
    collection: Option<String>,
    /// The procedure of a `CALL`.
    procedure: Option<String>,
    /// Statements in the text (a batch when more than one).
    statements: usize,
    /// The text holds `$n` parameters.
    parameterized: bool,
}

/// Operations and targets of one statement.
#[derive(Debug, Default, PartialEq)]
struct Parts {
    /// In order: operations and targets.
    words: Vec<String>,
    operations: Vec<String>,
    targets: Vec<String>,
    procedure: Option<String>,
}

impl Parts {
    fn summary(&self) -> Option<String> {
        let mut s = String::new();
        for w in &self.words {
            let extra = usize::from(!s.is_empty()) + w.chars().count();
            if s.chars().count() + extra > MAX_SUMMARY {
                break;
            }
            if !s.is_empty() {
                s.push(' ');
            }
            s.push_str(w);
        }
        (!s.is_empty()).then_some(s)
    }
}

fn describe(sql: &str) -> Description {
    let tokens = tokenize(sql);
    let parameterized = tokens.iter().any(|t| t.kind == Kind::Param);
    let statements: Vec<Parts> = tokens
        .split(|t| t.is_punct(";"))
        .filter(|s| s.iter().any(Token::significant))
        .map(|s| {
            let significant: Vec<Token<'_>> =
                s.iter().copied().filter(Token::significant).collect();
            statement_parts(&significant)
        })
        .collect();
    let mut d = Description {
        statements: statements.len(),
        parameterized,
        ..Description::default()
    };
    match statements.as_slice() {
        [] => {}
        [one] => {
            d.summary = one.summary();
            d.operation = one.operations.first().cloned();
            if one.operations.len() == 1 && one.targets.len() == 1 {
                d.collection = one.targets.first().cloned();
            }
            d.procedure = one.procedure.clone();
        }
        [first, rest @ ..] => {
            let same = |f: &dyn Fn(&Parts) -> Option<String>| {
                let v = f(first);
                (v.is_some() && rest.iter().all(|p| f(p) == v))
                    .then_some(v)
                    .flatten()
            };
            d.summary = Some(match same(&|p| p.summary()) {
                Some(s) => format!("BATCH {s}"),
                None => "BATCH".to_owned(),
            });
            d.operation = Some(match same(&|p| p.operations.first().cloned()) {
                Some(op) => format!("BATCH {op}"),
                None => "BATCH".to_owned(),
            });
            d.collection = same(&|p| {
                (p.operations.len() == 1 && p.targets.len() == 1).then(|| p.targets[0].clone())
            });
        }
    }
    d
}

/// Words that end a table list or cannot be a table alias.
const RESERVED: &[&str] = &[
    "ALL",
    "AND",
    "ANY",
    "AS",
    "BY",
    "CASE",
    "CONFLICT",
    "CROSS",
    "DEFAULT",
    "DELETE",
    "DO",
    "ELSE",
    "END",
    "EXCEPT",
    "FETCH",
    "FOR",
    "FROM",
    "FULL",
    "GROUP",
    "HAVING",
    "IN",
    "INNER",
    "INSERT",
    "INTERSECT",
    "INTO",
    "IS",
    "JOIN",
    "LATERAL",
    "LEFT",
    "LIMIT",
    "MERGE",
    "NATURAL",
    "NOT",
    "NULL",
    "OFFSET",
    "ON",
    "ONLY",
    "OR",
    "ORDER",
    "OUTER",
    "OVERRIDING",
    "RETURNING",
    "RIGHT",
    "SELECT",
    "SET",
    "TABLE",
    "TABLESAMPLE",
    "THEN",
    "UNION",
    "UPDATE",
    "USING",
    "VALUES",
    "WHEN",
    "WHERE",
    "WINDOW",
    "WITH",
];

/// Object kinds after CREATE/ALTER/DROP that name a table-like collection.
const COLLECTION_KINDS: &[&str] = &["TABLE", "VIEW", "SEQUENCE"];
/// Object kinds after CREATE/ALTER/DROP, part of the operation name.
const OBJECT_KINDS: &[&str] = &[
    "TABLE",
    "VIEW",
    "SEQUENCE",
    "INDEX",
    "SCHEMA",
    "DATABASE",
    "FUNCTION",
    "PROCEDURE",
    "TRIGGER",
    "TYPE",
    "EXTENSION",
    "ROLE",
    "USER",
    "DOMAIN",
    "POLICY",
    "MATERIALIZED",
    "FOREIGN",
];
/// Words between CREATE and the object kind.
const CREATE_MODIFIERS: &[&str] = &[
    "OR",
    "REPLACE",
    "TEMP",
    "TEMPORARY",
    "UNLOGGED",
    "GLOBAL",
    "LOCAL",
    "UNIQUE",
    "RECURSIVE",
];

fn reserved(t: &Token<'_>) -> bool {
    t.kind == Kind::Word && RESERVED.iter().any(|r| t.text.eq_ignore_ascii_case(r))
}

fn one_of(t: &Token<'_>, words: &[&str]) -> bool {
    t.kind == Kind::Word && words.iter().any(|w| t.text.eq_ignore_ascii_case(w))
}

/// A possibly schema-qualified name at `toks[i..]`: its text as written and the index after it.
/// With `calls_excluded`, a name followed by `(` is a function call (`generate_series(1, 10)`
/// in a FROM list), not a table.
fn name_at(toks: &[Token<'_>], i: usize, calls_excluded: bool) -> Option<(String, usize)> {
    let first = toks.get(i)?;
    if !(first.kind == Kind::Quoted || (first.kind == Kind::Word && !reserved(first))) {
        return None;
    }
    let mut name = first.text.to_owned();
    let mut j = i + 1;
    while toks.get(j).is_some_and(|t| t.is_punct("."))
        && let Some(part) = toks
            .get(j + 1)
            .filter(|t| matches!(t.kind, Kind::Word | Kind::Quoted))
    {
        name.push('.');
        name.push_str(part.text);
        j += 2;
    }
    if calls_excluded && toks.get(j).is_some_and(|t| t.is_punct("(")) {
        return None;
    }
    Some((name, j))
}

impl Parts {
    fn operation(&mut self, s: &str) {
        self.words.push(s.to_owned());
        self.operations.push(s.to_owned());
    }

    fn target(&mut self, s: String) {
        self.words.push(s.clone());
        self.targets.push(s);
    }
}

/// Operations and targets of one statement, from its significant tokens.
fn statement_parts(toks: &[Token<'_>]) -> Parts {
    let mut p = Parts::default();
    let Some(first) = toks.first() else {
        return p;
    };
    let head = if first.kind == Kind::Word {
        first.text.to_ascii_uppercase()
    } else {
        String::new()
    };
    // Statement-level commands that the generic scan below does not know; `i` is where the
    // generic scan starts.
    let i = match head.as_str() {
        "CREATE" | "ALTER" | "DROP" => ddl(toks, &mut p),
        "TRUNCATE" | "LOCK" | "VACUUM" | "ANALYZE" | "COPY" => table_command(toks, &head, &mut p),
        "CALL" => {
            p.operation(first.text);
            if let Some((name, _)) = name_at(toks, 1, false) {
                p.words.push(name.clone());
                p.procedure = Some(name);
            }
            return p;
        }
        "" | "SELECT" | "INSERT" | "UPDATE" | "DELETE" | "MERGE" | "WITH" | "VALUES" | "TABLE" => 0,
        _ => {
            p.operation(first.text);
            1
        }
    };
    scan(toks, i, &mut p);
    p
}

/// CREATE/ALTER/DROP: the operation names the object kind (`CREATE TABLE`), and the target is
/// the table, view or sequence. Returns where the generic scan goes on.
fn ddl(toks: &[Token<'_>], p: &mut Parts) -> usize {
    let mut j = 1;
    while toks.get(j).is_some_and(|t| one_of(t, CREATE_MODIFIERS)) {
        j += 1;
    }
    let mut name = toks[0].text.to_owned();
    let mut kind = String::new();
    while let Some(t) = toks.get(j).filter(|t| one_of(t, OBJECT_KINDS)) {
        name.push(' ');
        name.push_str(t.text);
        kind = t.text.to_ascii_uppercase();
        j += 1;
    }
    p.operation(&name);
    if COLLECTION_KINDS.contains(&kind.as_str()) {
        while toks
            .get(j)
            .is_some_and(|t| one_of(t, &["IF", "NOT", "EXISTS", "CONCURRENTLY"]))
        {
            j += 1;
        }
        if let Some((n, after)) = name_at(toks, j, false) {
            p.target(n);
            j = after;
        }
    }
    j
}

/// TRUNCATE, LOCK, VACUUM, ANALYZE, COPY: a list of tables after option words. COPY names one
/// table (its FROM/TO name files), or a query in parentheses left to the generic scan.
fn table_command(toks: &[Token<'_>], head: &str, p: &mut Parts) -> usize {
    const OPTIONS: &[&str] = &["TABLE", "ONLY", "FULL", "FREEZE", "VERBOSE", "ANALYZE"];
    p.operation(toks[0].text);
    if head == "COPY" {
        return match name_at(toks, 1, false) {
            Some((n, _)) => {
                p.target(n);
                toks.len()
            }
            None => 1,
        };
    }
    let mut j = 1;
    let mut depth = 0usize;
    while let Some(t) = toks.get(j) {
        if t.is_punct("(") {
            depth += 1;
        } else if t.is_punct(")") {
            depth = depth.saturating_sub(1);
        } else if depth == 0 && !t.is_punct(",") && !one_of(t, OPTIONS) {
            let Some((n, after)) = name_at(toks, j, false) else {
                break;
            };
            p.target(n);
            j = after;
            continue;
        }
        j += 1;
    }
    j
}

/// Generic scan from `toks[i..]`: DML operations anywhere (subqueries included) and the tables
/// they name. Parentheses opened right after a name are function calls: `FROM` inside them
/// (`extract(year FROM d)`) names no table.
fn scan(toks: &[Token<'_>], mut i: usize, p: &mut Parts) {
    let mut calls: Vec<bool> = Vec::new();
    let statement_start = i;
    while i < toks.len() {
        let t = toks[i];
        let prev = i.checked_sub(1).map(|j| toks[j]);
        let after_word = |w: &[&str]| prev.is_some_and(|p| one_of(&p, w));
        if t.is_punct("(") {
            calls.push(prev.is_some_and(|p| {
                matches!(p.kind, Kind::Word | Kind::Quoted)
                    && !reserved(&p)
                    && !one_of(&p, &["COPY", "EXISTS", "ARRAY"])
            }));
            i += 1;
            continue;
        }
        if t.is_punct(")") {
            calls.pop();
            i += 1;
            continue;
        }
        if t.kind != Kind::Word {
            i += 1;
            continue;
        }
        let in_call = calls.last().copied().unwrap_or(false);
        // (a list of tables, a name followed by `(` is a call rather than a column list)
        let mut read: Option<(bool, bool)> = None;
        match t.text.to_ascii_uppercase().as_str() {
            "SELECT" => p.operation(t.text),
            "TABLE" if i == statement_start => {
                p.operation(t.text);
                read = Some((false, false));
            }
            "INSERT" if !after_word(&["THEN"]) => p.operation(t.text),
            "UPDATE" if !after_word(&["FOR", "DO", "THEN", "KEY", "ON"]) => {
                p.operation(t.text);
                read = Some((false, false));
            }
            "DELETE" if !after_word(&["THEN", "ON"]) => p.operation(t.text),
            "MERGE" => p.operation(t.text),
            "INTO" => read = Some((false, false)),
            "JOIN" => read = Some((false, true)),
            "USING"
                if p.operations.iter().any(|o| {
                    o.eq_ignore_ascii_case("MERGE") || o.eq_ignore_ascii_case("DELETE")
                }) =>
            {
                read = Some((true, true))
            }
            "FROM" if !in_call => read = Some((true, true)),
            _ => {}
        }
        i += 1;
        let Some((list, calls_excluded)) = read else {
            continue;
        };
        // One table, or a comma-separated list, each with an optional alias.
        loop {
            while toks.get(i).is_some_and(|t| one_of(t, &["ONLY", "LATERAL"])) {
                i += 1;
            }
            let Some((n, after)) = name_at(toks, i, calls_excluded) else {
                break;
            };
            p.target(n);
            i = after;
            if toks.get(i).is_some_and(|t| t.is_word("AS")) {
                i += 1;
            }
            if toks
                .get(i)
                .is_some_and(|t| t.kind == Kind::Quoted || (t.kind == Kind::Word && !reserved(t)))
            {
                i += 1;
            }
            if list && toks.get(i).is_some_and(|t| t.is_punct(",")) {
                i += 1;
                continue;
            }
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::ValueRef;
    use protocols::Detail;
    use protocols::postgres::PgError;

    use std::sync::atomic::{AtomicI64, AtomicU64};

    fn clock() -> Clock {
        Clock {
            offset_ns: AtomicI64::new(1_700_000_000_000_000_000),
            synced_at_ns: AtomicU64::new(u64::MAX),
        }
    }

    fn resource() -> Arc<Resource> {
        Arc::new(Resource {
            service_name: "svc".to_owned(),
            pid: 1,
            attributes: vec![KeyValue::str("service.name", "svc")],
        })
    }

    fn addrs() -> ConnAddrs {
        ConnAddrs {
            local: "10.0.0.5:40000".parse().expect("local"),
            remote: "10.0.0.9:5432".parse().expect("remote"),
            tls: false,
        }
    }

    fn exchange(role: Role, outcome: Outcome, pg: &PgExchange) -> Exchange {
        Exchange {
            role,
            start_ns: 1_000,
            end_ns: 4_000,
            outcome,
            request_offset: 0,
            request_thread: 0,
            detail: Detail::Postgres(pg.clone()),
        }
    }

    fn span_of(role: Role, outcome: Outcome, pg: &PgExchange, sanitize: bool) -> Span {
        let ex = exchange(role, outcome, pg);
        postgres_span(&ex, pg, Some(&addrs()), resource(), &clock(), sanitize)
    }

    fn span(pg: &PgExchange) -> Span {
        span_of(Role::Client, Outcome::Complete, pg, true)
    }

    fn attr<'a>(span: &'a Span, key: &str) -> Option<ValueRef<'a>> {
        span.attributes.get(key)
    }

    fn int(span: &Span, key: &str) -> Option<i64> {
        match attr(span, key) {
            Some(ValueRef::Int(i)) => Some(i),
            _ => None,
        }
    }

    fn query(sql: &str, tag: &str) -> PgExchange {
        PgExchange {
            query: Some(sql.to_owned()),
            parse_seen: true,
            database: Some("shop".into()),
            user: Some("alice".into()),
            command_tag: (!tag.is_empty()).then(|| tag.to_owned()),
            completions: 1,
            ..PgExchange::default()
        }
    }

    #[test]
    fn sanitizer_replaces_literals() {
        let cases = [
            (
                "SELECT * FROM users WHERE name = 'O''Brien' AND age > 42",
                "SELECT * FROM users WHERE name = ? AND age > ?",
            ),
            ("select 1.5e-3, .5, 0x1F, 1_000", "select ?, ?, ?, ?"),
            (
                "INSERT INTO t VALUES (E'it\\'s', B'0101', X'ff', U&'d\\0061t', N'x')",
                "INSERT INTO t VALUES (?, ?, ?, ?, ?)",
            ),
            ("SELECT $$a 'quoted' $$ || $tag$x$tag$", "SELECT ? || ?"),
            (
                "UPDATE t SET flag = true, off = FALSE WHERE id IN (1, 2, 3)",
                "UPDATE t SET flag = ?, off = ? WHERE id IN (?)",
            ),
            (
                "SELECT * FROM t WHERE id IN ( 'a' , -2 )",
                "SELECT * FROM t WHERE id IN (?)",
            ),
            (
                "SELECT * FROM t WHERE id IN (SELECT id FROM u WHERE x = 1)",
                "SELECT * FROM t WHERE id IN (SELECT id FROM u WHERE x = ?)",
            ),
            (
                "SELECT \"col 1\", t1.c2 FROM \"My Table\" t1 -- note 'x' 5\nWHERE a = 'b'",
                "SELECT \"col 1\", t1.c2 FROM \"My Table\" t1 -- note 'x' 5\nWHERE a = ?",
            ),
            (
                "SELECT /* outer /* nested 'x' */ 7 */ 8::int, '9'::text",
                "SELECT /* outer /* nested 'x' */ 7 */ ?::int, ?::text",
            ),
            (
                "SELECT interval '1 day', DATE '2024-01-01', a1, x2y",
                "SELECT interval ?, DATE ?, a1, x2y",
            ),
            ("SELECT 'unterminated", "SELECT ?"),
            ("SELECT 'héllo', 'ünï' FROM tëst", "SELECT ?, ? FROM tëst"),
        ];
        for (sql, want) in cases {
            assert_eq!(sanitize_sql(sql), want, "{sql}");
        }
    }

    #[test]
    fn sanitizer_never_panics_on_odd_input() {
        for sql in [
            "",
            "$",
            "$1$",
            "$a",
            "'",
            "\"",
            "/*",
            "--",
            "E'\\",
            "U&",
            "0x",
            "1e",
            "é$é$",
            "$é$x$é$",
        ] {
            let _ = sanitize_sql(sql);
            let _ = describe(sql);
        }
        let mut seed = 0x1234_5678u64;
        for _ in 0..2000 {
            let s: String = (0..40)
                .map(|_| {
                    seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    [
                        '\'', '"', '$', '-', '/', '*', 'a', '1', ' ', '(', ')', ';', 'é', 'E', '.',
                        'x',
                    ][(seed >> 60) as usize]
                })
                .collect();
            let _ = sanitize_sql(&s);
            let _ = describe(&s);
        }
    }

    fn summary(sql: &str) -> Option<String> {
        describe(sql).summary
    }

    #[test]
    fn summaries() {
        let cases = [
            (
                "SELECT * FROM wuser_table WHERE username = ?",
                "SELECT wuser_table",
            ),
            (
                "INSERT INTO shipping_details (order_id, address) SELECT order_id, address FROM orders WHERE order_id = ?",
                "INSERT shipping_details SELECT orders",
            ),
            (
                "SELECT * FROM songs, artists WHERE songs.artist_id = artists.id",
                "SELECT songs artists",
            ),
            (
                "SELECT order_date FROM (SELECT * FROM orders o JOIN customers c ON o.customer_id = c.customer_id)",
                "SELECT SELECT orders customers",
            ),
            (
                "SELECT * FROM \"song list\", public.artists a",
                "SELECT \"song list\" public.artists",
            ),
            (
                "select abalance from pgbench_accounts where aid = $1",
                "select pgbench_accounts",
            ),
            (
                "UPDATE ONLY accounts SET x = 1 WHERE id = 2",
                "UPDATE accounts",
            ),
            ("DELETE FROM t USING u WHERE t.id = u.id", "DELETE t u"),
            (
                "SELECT extract(year FROM d), trim(both FROM s) FROM t",
                "SELECT t",
            ),
            ("SELECT * FROM generate_series(1, 10) g", "SELECT"),
            ("SELECT * FROM t FOR UPDATE", "SELECT t"),
            (
                "SELECT a FROM t WHERE EXISTS (SELECT 1 FROM u) AND b = ARRAY(SELECT c FROM v)",
                "SELECT t SELECT u SELECT v",
            ),
            (
                "INSERT INTO t (a) VALUES (1) ON CONFLICT (a) DO UPDATE SET a = 2",
                "INSERT t",
            ),
            (
                "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET v = 1",
                "MERGE t s",
            ),
            (
                "WITH x AS (SELECT * FROM a) SELECT * FROM x",
                "SELECT a SELECT x",
            ),
            (
                "CREATE TABLE IF NOT EXISTS pgbench_history(tid int)",
                "CREATE TABLE pgbench_history",
            ),
            ("create unlogged table t2 (a int)", "create table t2"),
            ("DROP TABLE t", "DROP TABLE t"),
            ("CREATE INDEX i ON t (a)", "CREATE INDEX"),
            (
                "alter table pgbench_branches add primary key (bid)",
                "alter table pgbench_branches",
            ),
            (
                "CREATE MATERIALIZED VIEW mv AS SELECT * FROM t",
                "CREATE MATERIALIZED VIEW mv SELECT t",
            ),
            ("truncate table a, b", "truncate a b"),
            ("vacuum analyze pgbench_branches", "vacuum pgbench_branches"),
            ("COPY t (a, b) FROM STDIN", "COPY t"),
            ("COPY (SELECT * FROM t) TO STDOUT", "COPY SELECT t"),
            ("CALL refresh_stats(1)", "CALL refresh_stats"),
            ("BEGIN", "BEGIN"),
            ("SET search_path TO app", "SET"),
            ("TABLE t", "TABLE t"),
            ("VALUES (1), (2)", ""),
        ];
        for (sql, want) in cases {
            assert_eq!(summary(sql).unwrap_or_default(), want, "{sql}");
        }
        let long = format!(
            "SELECT * FROM {}",
            (0..100)
                .map(|i| format!("table_{i}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let s = summary(&long).expect("summary");
        assert!(
            s.len() <= MAX_SUMMARY && s.ends_with(|c: char| c.is_ascii_digit()),
            "{s}"
        );
    }

    #[test]
    fn collections_only_for_one_operation_on_one_table() {
        let d = describe("SELECT * FROM users WHERE id = $1");
        assert_eq!(d.collection.as_deref(), Some("users"));
        assert_eq!(d.operation.as_deref(), Some("SELECT"));
        assert!(d.parameterized);
        assert_eq!(
            describe("SELECT * FROM a JOIN b ON a.x = b.x").collection,
            None
        );
        assert_eq!(describe("INSERT INTO a SELECT * FROM b").collection, None);
        assert_eq!(describe("CALL p()").procedure.as_deref(), Some("p"));
        assert_eq!(describe("CALL p()").collection, None);
    }

    #[test]
    fn batches() {
        let d = describe("BEGIN; UPDATE a SET x = 1; COMMIT;");
        assert_eq!(d.statements, 3);
        assert_eq!(d.summary.as_deref(), Some("BATCH"));
        assert_eq!(d.operation.as_deref(), Some("BATCH"));
        let d = describe("INSERT INTO t VALUES (1); INSERT INTO t VALUES (2)");
        assert_eq!(d.summary.as_deref(), Some("BATCH INSERT t"));
        assert_eq!(d.operation.as_deref(), Some("BATCH INSERT"));
        assert_eq!(d.collection.as_deref(), Some("t"));
        assert_eq!(
            describe("SELECT 1;").statements,
            1,
            "a trailing ; is not a batch"
        );
        assert_eq!(describe("SELECT ';'").statements, 1);
    }

    #[test]
    fn client_span_attributes() {
        let mut pg = query(
            "SELECT name FROM users WHERE id = 7 AND tag = 'x'",
            "SELECT 2",
        );
        pg.rows = Some(2);
        let s = span(&pg);
        assert_eq!(s.kind, SpanKind::Client);
        assert_eq!(s.name, "SELECT users");
        assert_eq!(s.attr_str("db.system.name"), Some("postgresql"));
        assert_eq!(s.attr_str("db.namespace"), Some("shop"));
        assert_eq!(
            s.attr_str("db.query.text"),
            Some("SELECT name FROM users WHERE id = ? AND tag = ?")
        );
        assert_eq!(s.attr_str("db.query.summary"), Some("SELECT users"));
        assert_eq!(s.attr_str("db.operation.name"), Some("SELECT"));
        assert_eq!(s.attr_str("db.collection.name"), Some("users"));
        assert_eq!(int(&s, "db.response.returned_rows"), Some(2));
        assert_eq!(s.attr_str("server.address"), Some("10.0.0.9"));
        assert_eq!(int(&s, "server.port"), Some(5432));
        assert_eq!(s.attr_str("network.peer.address"), Some("10.0.0.9"));
        assert_eq!(int(&s, "network.peer.port"), Some(5432));
        assert_eq!(s.attr_str("client.address"), None);
        assert_eq!(s.attr_str("error.type"), None);
        assert_eq!(s.attr_str("db.response.status_code"), None);
        assert_eq!(attr(&s, "tracer.db.query_text_unknown"), None);
        assert_eq!(s.status, Status::Unset);
        assert_eq!(s.parent_span_id, None);
        assert_eq!(s.start_unix_ns, 1_700_000_000_000_001_000);
        assert_eq!(s.end_unix_ns, 1_700_000_000_000_004_000);
        // Sanitising off keeps the literals.
        let raw = span_of(Role::Client, Outcome::Complete, &pg, false);
        assert_eq!(raw.attr_str("db.query.text"), pg.query.as_deref());
    }

    #[test]
    fn server_span_uses_the_local_end() {
        let pg = query(
            "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
            "UPDATE 1",
        );
        let s = span_of(Role::Server, Outcome::Complete, &pg, true);
        assert_eq!(s.kind, SpanKind::Server);
        assert_eq!(s.name, "UPDATE pgbench_accounts");
        assert_eq!(
            s.attr_str("db.query.text"),
            pg.query.as_deref(),
            "parameterized: kept"
        );
        assert_eq!(s.attr_str("server.address"), Some("10.0.0.5"));
        assert_eq!(int(&s, "server.port"), Some(40000));
        assert_eq!(s.attr_str("client.address"), Some("10.0.0.9"));
        assert_eq!(int(&s, "client.port"), Some(5432));
        assert_eq!(int(&s, "db.response.returned_rows"), None, "no result set");
    }

    #[test]
    fn errors_carry_the_sqlstate() {
        let mut pg = query("SELECT * FROM missing", "");
        pg.error = Some(Box::new(PgError {
            severity: Some("ERROR".to_owned()),
            sqlstate: Some("42P01".to_owned()),
            message: Some("relation \"missing\" does not exist".to_owned()),
        }));
        let s = span(&pg);
        assert_eq!(s.attr_str("db.response.status_code"), Some("42P01"));
        assert_eq!(s.attr_str("error.type"), Some("42P01"));
        assert_eq!(
            s.status,
            Status::Error(Some("relation \"missing\" does not exist".to_owned()))
        );
        assert_eq!(s.name, "SELECT missing");
        // An error whose SQLSTATE was cut off.
        if let Some(e) = pg.error.as_mut() {
            e.sqlstate = None;
        }
        let s = span(&pg);
        assert_eq!(s.attr_str("error.type"), Some("_OTHER"));
        assert!(matches!(s.status, Status::Error(_)));
    }

    #[test]
    fn aborted_and_unanswered_statements_are_errors() {
        let mut pg = query("SELECT 3", "");
        pg.aborted = true;
        let s = span_of(Role::Client, Outcome::NoResponse, &pg, true);
        assert_eq!(s.attr_str("error.type"), Some("pipeline_aborted"));
        assert!(matches!(s.status, Status::Error(Some(_))));
        let pg = query("SELECT pg_sleep(100)", "");
        let s = span_of(Role::Client, Outcome::NoResponse, &pg, true);
        assert_eq!(s.attr_str("error.type"), Some("no_response"));
        let s = span_of(Role::Client, Outcome::Partial, &pg, true);
        assert_eq!(s.attr_str("error.type"), None);
        assert_eq!(s.status, Status::Unset);
    }

    #[test]
    fn statement_prepared_before_the_capture() {
        let pg = PgExchange {
            statement_name: Some("P_2".to_owned()),
            command_tag: Some("SELECT 1".to_owned()),
            rows: Some(1),
            completions: 1,
            ..PgExchange::default()
        };
        let s = span(&pg);
        assert_eq!(s.attr_str("db.query.text"), None);
        assert_eq!(s.attr_str("db.query.summary"), None);
        assert_eq!(
            attr(&s, "tracer.db.query_text_unknown"),
            Some(ValueRef::Bool(true))
        );
        assert_eq!(s.attr_str("db.postgresql.statement_name"), Some("P_2"));
        assert_eq!(s.attr_str("db.operation.name"), Some("SELECT"));
        assert_eq!(s.name, "SELECT");
        assert_eq!(s.attr_str("db.namespace"), None, "startup not seen");
        // Nothing known at all.
        let s = span(&PgExchange::default());
        assert_eq!(s.name, "postgresql");
        assert_eq!(s.attr_str("db.postgresql.statement_name"), None);
    }

    #[test]
    fn operation_from_the_tag_without_text() {
        assert_eq!(tag_command("INSERT 0 1"), "INSERT");
        assert_eq!(tag_command("SELECT 3"), "SELECT");
        assert_eq!(tag_command("CREATE TABLE"), "CREATE TABLE");
        assert_eq!(tag_command("COPY 12"), "COPY");
        assert_eq!(tag_command(""), "");
    }

    #[test]
    fn batch_span() {
        let mut pg = query("BEGIN; UPDATE a SET x = 1 WHERE id = 5; COMMIT", "COMMIT");
        pg.completions = 3;
        let s = span(&pg);
        assert_eq!(s.name, "BATCH");
        assert_eq!(int(&s, "db.operation.batch.size"), Some(3));
        assert_eq!(s.attr_str("db.operation.name"), Some("BATCH"));
        assert_eq!(
            s.attr_str("db.query.text"),
            Some("BEGIN; UPDATE a SET x = ? WHERE id = ?; COMMIT")
        );
    }

    #[test]
    fn namespace_falls_back_to_the_user() {
        let mut pg = query("SELECT 1", "SELECT 1");
        pg.database = None;
        assert_eq!(span(&pg).attr_str("db.namespace"), Some("alice"));
    }

    #[test]
    fn returned_rows_rules() {
        let mut pg = query("SELECT * FROM t", "SELECT 10");
        pg.rows = Some(4);
        assert_eq!(returned_rows(&pg, Outcome::Complete), Some(4));
        assert_eq!(
            returned_rows(&pg, Outcome::Partial),
            Some(10),
            "rows lost in a gap"
        );
        pg.rows = None;
        pg.command_tag = Some("INSERT 0 5".to_owned());
        assert_eq!(returned_rows(&pg, Outcome::Partial), None);
        pg.query_truncated = true;
        pg.query = Some("SELECT 'aaaa".to_owned());
        let s = span(&pg);
        assert_eq!(
            attr(&s, "tracer.db.query_text_truncated"),
            Some(ValueRef::Bool(true))
        );
    }
}
