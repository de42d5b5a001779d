//! Message framing of protocol v3: which message types each side sends, plausible lengths, body
//! layouts, and the evidence used to find message boundaries in a stream joined mid-way.

use std::sync::Arc;

use super::{MAX_ERROR, MAX_NAME, MAX_QUERY, MAX_TAG, PgError};

/// Which end of the protocol a direction carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    /// The client: startup, queries, Parse/Bind/Execute.
    Frontend,
    /// The server: authentication, results, errors.
    Backend,
}

/// Largest message PostgreSQL accepts or sends (1 GiB, its own limit).
pub(super) const MAX_MESSAGE: u32 = 0x4000_0000;
/// Largest startup-phase message PostgreSQL accepts.
pub(super) const MAX_STARTUP: u32 = 10_000;
/// Request code of SSLRequest.
pub(super) const SSL_REQUEST: u32 = 80_877_103;
/// Request code of GSSENCRequest.
pub(super) const GSSENC_REQUEST: u32 = 80_877_104;
/// Request code of CancelRequest.
pub(super) const CANCEL_REQUEST: u32 = 80_877_102;
/// Candidate positions tried per feed while resynchronising, so hostile input stays linear.
const MAX_CANDIDATES: usize = 1024;

/// A startup-phase message: the only messages without a type byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Untyped {
    /// SSLRequest: the server answers one byte, `S` (TLS follows) or `N`.
    Ssl,
    /// GSSENCRequest: the server answers `G` (GSSAPI encryption follows) or `N`.
    Gss,
    /// CancelRequest, sent alone on its own connection.
    Cancel,
    /// StartupMessage for protocol 3.x.
    Startup,
}

/// Classifies an untyped header: total length `len` (itself included) and request code.
pub(super) fn untyped(len: u32, code: u32) -> Option<Untyped> {
    match code {
        SSL_REQUEST if len == 8 => Some(Untyped::Ssl),
        GSSENC_REQUEST if len == 8 => Some(Untyped::Gss),
        // Protocol 3.2 allows secret keys of up to 256 bytes.
        CANCEL_REQUEST if (16..=12 + 256).contains(&len) => Some(Untyped::Cancel),
        _ if code >> 16 == 3 && code & 0xffff < 16 && (9..=MAX_STARTUP).contains(&len) => {
            Some(Untyped::Startup)
        }
        _ => None,
    }
}

/// Whether `data` (shorter than an untyped header) can still begin one.
pub(super) fn untyped_prefix(data: &[u8]) -> bool {
    // Lengths stay below 64 KiB, so the first two bytes are zero; the code starts 04 d2 or 00 03.
    data.iter().take(2).all(|&b| b == 0)
        && match data.get(4..) {
            Some([0x04, rest @ ..]) => rest.first().is_none_or(|&b| b == 0xd2),
            Some([0x00, rest @ ..]) => rest.first().is_none_or(|&b| b == 0x03),
            Some([]) | None => true,
            Some(_) => false,
        }
}

/// The header of an untyped message at the start of `data`, when complete and plausible.
pub(super) fn untyped_header(data: &[u8]) -> Option<(u32, Untyped)> {
    let len = be32(data, 0)?;
    let code = be32(data, 4)?;
    untyped(len, code).map(|u| (len, u))
}

/// Startup parameters that the exchanges carry.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct StartupParams {
    pub user: Option<Arc<str>>,
    pub database: Option<Arc<str>>,
    pub application_name: Option<Arc<str>>,
}

/// Parses the parameters of a StartupMessage body (after the protocol code). `None` when the
/// layout is broken; a body cut short keeps the parameters read so far.
pub(super) fn startup_params(body: &[u8]) -> Option<StartupParams> {
    let mut params = StartupParams::default();
    let mut rest = body;
    while let Some((key, after)) = cstr(rest) {
        if key.is_empty() {
            return Some(params);
        }
        let (value, after) = cstr(after)?;
        let value = Some(Arc::from(text(value, MAX_NAME)));
        match key {
            b"user" => params.user = value,
            b"database" => params.database = value,
            b"application_name" => params.application_name = value,
            _ => {}
        }
        rest = after;
    }
    Some(params)
}

/// Whether a complete StartupMessage body (after the protocol code) is well formed: key/value
/// pairs ending with an empty key, `user` among them (the protocol requires it).
fn startup_body_ok(body: &[u8]) -> bool {
    let mut rest = body;
    let mut user = false;
    loop {
        let Some((key, after)) = cstr(rest) else {
            return false;
        };
        if key.is_empty() {
            return user && after.is_empty();
        }
        let Some((_, after)) = cstr(after) else {
            return false;
        };
        if !key.iter().all(|b| b.is_ascii_graphic()) {
            return false;
        }
        user |= key == b"user";
        rest = after;
    }
}

/// Whether a body prefix of a StartupMessage (after the code) could be the start of a valid one.
fn startup_prefix_ok(body: &[u8]) -> bool {
    let key_end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    key_end > 0 && body[..key_end].iter().all(|b| b.is_ascii_graphic())
}

/// Inclusive body-length bounds of a typed message sent by `side`, or `None` when `side` never
/// sends `tag`.
fn body_bounds(side: Side, tag: u8) -> Option<(u32, u32)> {
    const ANY: u32 = MAX_MESSAGE - 4;
    // A short name plus fixed fields; names are at most 63 bytes in PostgreSQL.
    const NAMED: u32 = 1024;
    let bounds = match (side, tag) {
        (Side::Frontend, b'Q') => (1, ANY),
        (Side::Frontend, b'P') => (4, ANY),
        (Side::Frontend, b'B') => (8, ANY),
        (Side::Frontend, b'E') => (5, NAMED),
        (Side::Frontend, b'D' | b'C') => (2, NAMED),
        (Side::Frontend, b'S' | b'H' | b'X' | b'c') => (0, 0),
        (Side::Frontend, b'd' | b'p') => (0, ANY),
        (Side::Frontend, b'f') => (1, ANY),
        (Side::Frontend, b'F') => (10, ANY),
        (Side::Backend, b'R') => (4, ANY),
        (Side::Backend, b'S') => (2, ANY),
        (Side::Backend, b'K') => (8, 4 + 256),
        (Side::Backend, b'Z') => (1, 1),
        (Side::Backend, b'T' | b'D' | b't') => (2, ANY),
        (Side::Backend, b'C') => (1, NAMED),
        (Side::Backend, b'E' | b'N') => (1, ANY),
        (Side::Backend, b'I' | b'1' | b'2' | b'3' | b'n' | b's' | b'c') => (0, 0),
        (Side::Backend, b'G' | b'H' | b'W') => (3, ANY),
        (Side::Backend, b'd') => (0, ANY),
        (Side::Backend, b'A') => (6, ANY),
        (Side::Backend, b'V') => (4, ANY),
        (Side::Backend, b'v') => (8, ANY),
        _ => return None,
    };
    Some(bounds)
}

/// Whether a typed header (tag, total length including itself) is plausible for `side`
/// (either side when unknown).
pub(super) fn header_ok(side: Option<Side>, tag: u8, len: u32) -> bool {
    let fits = |s| {
        body_bounds(s, tag).is_some_and(|(lo, hi)| {
            len.checked_sub(4)
                .is_some_and(|body| (lo..=hi).contains(&body))
        })
    };
    match side {
        Some(s) => fits(s),
        None => fits(Side::Frontend) || fits(Side::Backend),
    }
}

/// Whether `side` sends messages of type `tag` that no other side sends: such a message tells
/// which direction is which in a stream joined mid-way.
pub(super) fn only_sent_by(tag: u8) -> Option<Side> {
    let front = body_bounds(Side::Frontend, tag).is_some();
    let back = body_bounds(Side::Backend, tag).is_some();
    match (front, back) {
        (true, false) => Some(Side::Frontend),
        (false, true) => Some(Side::Backend),
        _ => None,
    }
}

/// Body bytes worth keeping for a message, by type; the rest is skipped by length.
pub(super) fn keep_limit(side: Option<Side>, tag: u8) -> usize {
    let front = match tag {
        b'Q' => MAX_QUERY + 1,
        b'P' => MAX_NAME + 1 + MAX_QUERY + 1,
        b'B' => 2 * (MAX_NAME + 1),
        b'E' => MAX_NAME + 1 + 4,
        b'D' | b'C' => MAX_NAME + 2,
        _ => 0,
    };
    let back = match tag {
        b'C' => MAX_TAG + 1,
        b'E' => MAX_ERROR,
        b'Z' => 1,
        _ => 0,
    };
    match side {
        Some(Side::Frontend) => front,
        Some(Side::Backend) => back,
        None => front.max(back),
    }
}

/// Big-endian u32 at `at`.
pub(super) fn be32(data: &[u8], at: usize) -> Option<u32> {
    let b = data.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Big-endian u16 at `at`.
fn be16(data: &[u8], at: usize) -> Option<u16> {
    let b = data.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

/// A NUL-terminated string at the start of `data` and what follows it.
pub(super) fn cstr(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = data.iter().position(|&b| b == 0)?;
    Some((&data[..end], &data[end + 1..]))
}

/// The string at the start of `data` up to its NUL or the end of `data` (a kept prefix may have
/// lost the NUL), and whether the NUL was there.
pub(super) fn cstr_or_rest(data: &[u8]) -> (&[u8], bool) {
    match data.iter().position(|&b| b == 0) {
        Some(end) => (&data[..end], true),
        None => (data, false),
    }
}

/// Lossy UTF-8, cut to at most `max` bytes on a character boundary.
pub(super) fn text(raw: &[u8], max: usize) -> String {
    let raw = &raw[..raw.len().min(max)];
    let mut s = String::from_utf8_lossy(raw).into_owned();
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Whether the complete body of a message of type `tag` has the layout `side` gives it.
/// Costs at most a scan of the body; used only to judge boundaries found while resynchronising.
fn body_ok(side: Side, tag: u8, body: &[u8]) -> bool {
    match (side, tag) {
        (Side::Frontend, b'Q') => {
            cstr(body).is_some_and(|(q, rest)| rest.is_empty() && !q.is_empty())
        }
        (Side::Frontend, b'P') => parse_layout(body),
        (Side::Frontend, b'B') => bind_layout(body),
        (Side::Frontend, b'E') => cstr(body).is_some_and(|(_, rest)| rest.len() == 4),
        (Side::Frontend, b'D' | b'C') => match body.split_first() {
            Some((b'S' | b'P', name)) => cstr(name).is_some_and(|(_, rest)| rest.is_empty()),
            _ => false,
        },
        (Side::Frontend, b'f') => cstr(body).is_some_and(|(_, rest)| rest.is_empty()),
        (Side::Backend, b'Z') => matches!(body, [b'I' | b'T' | b'E']),
        (Side::Backend, b'T') => row_description_layout(body),
        (Side::Backend, b'D') => data_row_layout(body),
        (Side::Backend, b'C') => cstr(body).is_some_and(|(tag, rest)| {
            rest.is_empty() && tag.first().is_some_and(u8::is_ascii_uppercase)
        }),
        (Side::Backend, b'E' | b'N') => error_layout(body),
        (Side::Backend, b'S') => cstr(body)
            .and_then(|(name, rest)| Some((name, cstr(rest)?.1)))
            .is_some_and(|(name, rest)| !name.is_empty() && rest.is_empty()),
        (Side::Backend, b'R') => be32(body, 0).is_some_and(|code| code <= 12),
        (Side::Backend, b't') => {
            be16(body, 0).is_some_and(|n| body.len() == 2 + 4 * usize::from(n))
        }
        (Side::Backend, b'G' | b'H' | b'W') => match body.split_first() {
            Some((0 | 1, rest)) => {
                be16(rest, 0).is_some_and(|n| rest.len() == 2 + 2 * usize::from(n))
            }
            _ => false,
        },
        // Fixed-size or opaque bodies: the length check is all there is.
        _ => true,
    }
}

fn parse_layout(body: &[u8]) -> bool {
    let Some((_, rest)) = cstr(body) else {
        return false;
    };
    let Some((query, rest)) = cstr(rest) else {
        return false;
    };
    !query.is_empty() && be16(rest, 0).is_some_and(|n| rest.len() == 2 + 4 * usize::from(n))
}

fn bind_layout(body: &[u8]) -> bool {
    let Some((_, rest)) = cstr(body) else {
        return false;
    };
    let Some((_, rest)) = cstr(rest) else {
        return false;
    };
    let Some(formats) = be16(rest, 0) else {
        return false;
    };
    let mut at = 2 + 2 * usize::from(formats);
    let Some(params) = be16(rest, at) else {
        return false;
    };
    at += 2;
    for _ in 0..params {
        let Some(len) = be32(rest, at) else {
            return false;
        };
        at += 4;
        if len != u32::MAX {
            at += len as usize;
        }
        if at > rest.len() {
            return false;
        }
    }
    be16(rest, at).is_some_and(|n| rest.len() == at + 2 + 2 * usize::from(n))
}

fn row_description_layout(body: &[u8]) -> bool {
    let Some(fields) = be16(body, 0) else {
        return false;
    };
    let mut rest = &body[2..];
    for _ in 0..fields {
        let Some((name, after)) = cstr(rest) else {
            return false;
        };
        if name.is_empty() || after.len() < 18 {
            return false;
        }
        rest = &after[18..];
    }
    rest.is_empty()
}

fn data_row_layout(body: &[u8]) -> bool {
    let Some(columns) = be16(body, 0) else {
        return false;
    };
    let mut at = 2usize;
    for _ in 0..columns {
        let Some(len) = be32(body, at) else {
            return false;
        };
        at += 4;
        if len != u32::MAX {
            at += len as usize;
        }
        if at > body.len() {
            return false;
        }
    }
    at == body.len()
}

/// ErrorResponse/NoticeResponse: fields of a code byte and a string, then a zero byte; the
/// severity (`S`) field comes first in every PostgreSQL version.
fn error_layout(body: &[u8]) -> bool {
    let mut rest = body;
    let mut first = true;
    loop {
        match rest.split_first() {
            Some((0, after)) => return !first && after.is_empty(),
            Some((&code, after)) => {
                if !code.is_ascii_alphabetic() || (first && code != b'S') {
                    return false;
                }
                let Some((_, after)) = cstr(after) else {
                    return false;
                };
                rest = after;
                first = false;
            }
            None => return false,
        }
    }
}

/// Reads what it can of an ErrorResponse body (possibly a kept prefix).
pub(super) fn error_fields(body: &[u8]) -> PgError {
    let mut fields = PgError::default();
    let mut rest = body;
    while let Some((&code, after)) = rest.split_first() {
        if code == 0 {
            break;
        }
        let (value, complete) = cstr_or_rest(after);
        match code {
            // `V` is the non-localised severity (9.6+); prefer it over `S`.
            b'V' => fields.severity = Some(text(value, 16)),
            b'S' if fields.severity.is_none() => fields.severity = Some(text(value, 16)),
            b'C' if complete && value.len() == 5 => fields.sqlstate = Some(text(value, 5)),
            b'M' => fields.message = Some(text(value, MAX_ERROR)),
            _ => {}
        }
        if !complete {
            break;
        }
        rest = &after[value.len() + 1..];
    }
    fields
}

/// Whether a complete message sent by `side` starts `data`, with a plausible header and body.
/// Returns its total length (type byte included).
fn whole_message(side: Side, data: &[u8]) -> Option<usize> {
    let (&tag, _) = data.split_first()?;
    let len = be32(data, 1)?;
    if !header_ok(Some(side), tag, len) {
        return None;
    }
    let end = 1 + len as usize;
    let body = data.get(5..end)?;
    body_ok(side, tag, body).then_some(end)
}

/// Whether `data` (fewer than five bytes, or more) begins a plausible typed header for `side`.
fn header_prefix_ok(side: Side, data: &[u8]) -> bool {
    match data {
        [] => true,
        [tag, ..] if body_bounds(side, *tag).is_none() => false,
        // Lengths stay below 1 GiB: the top length byte is small.
        [_, hi, ..] if *hi > 0x40 => false,
        _ => match be32(data, 1) {
            Some(len) => header_ok(Some(side), data[0], len),
            None => true,
        },
    }
}

/// Evidence that a message boundary of `side` is at the start of `data`: a complete, well-formed
/// message that either ends exactly at the end of `data` or is followed by a plausible header.
fn boundary_for(side: Side, data: &[u8]) -> bool {
    match whole_message(side, data) {
        Some(end) => header_prefix_ok(side, &data[end..]),
        None => false,
    }
}

/// Offset of the first plausible message boundary in `data` for `side` (either side when
/// unknown), and the side it was judged for.
pub(super) fn find_boundary(side: Option<Side>, data: &[u8]) -> Option<(usize, Side)> {
    let sides: &[Side] = match side {
        Some(Side::Frontend) => &[Side::Frontend],
        Some(Side::Backend) => &[Side::Backend],
        None => &[Side::Frontend, Side::Backend],
    };
    let mut tried = 0;
    for (at, &tag) in data.iter().enumerate() {
        if !sides.iter().any(|&s| body_bounds(s, tag).is_some()) {
            continue;
        }
        tried += 1;
        if tried > MAX_CANDIDATES {
            return None;
        }
        if let Some(&s) = sides.iter().find(|&&s| boundary_for(s, &data[at..])) {
            return Some((at, s));
        }
    }
    None
}

/// What the first bytes of a direction say about PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Probe {
    Yes,
    Maybe,
    No,
}

/// Whether `data` starts a PostgreSQL connection (an untyped startup-phase message) or is a run
/// of typed messages of one side. Conservative: typed runs need two complete messages, or one
/// with a checked body ending exactly at the end of `data`.
pub(super) fn probe(data: &[u8]) -> Probe {
    if data.first() == Some(&0) {
        return probe_untyped(data);
    }
    let mut maybe = false;
    for side in [Side::Frontend, Side::Backend] {
        match probe_typed(side, data) {
            Probe::Yes => return Probe::Yes,
            Probe::Maybe => maybe = true,
            Probe::No => {}
        }
    }
    if maybe { Probe::Maybe } else { Probe::No }
}

fn probe_untyped(data: &[u8]) -> Probe {
    if data.len() < 8 {
        return if untyped_prefix(data) {
            Probe::Maybe
        } else {
            Probe::No
        };
    }
    let Some((len, kind)) = untyped_header(data) else {
        return Probe::No;
    };
    if kind != Untyped::Startup {
        return Probe::Yes;
    }
    let len = len as usize;
    match data.get(8..len) {
        Some(body) if startup_body_ok(body) => Probe::Yes,
        Some(_) => Probe::No,
        None if startup_prefix_ok(&data[8..]) => {
            // The detector keeps short first chunks and asks again with more bytes.
            if data.len() < 64 {
                Probe::Maybe
            } else {
                Probe::Yes
            }
        }
        None if data.len() == 8 => Probe::Maybe,
        None => Probe::No,
    }
}

fn probe_typed(side: Side, data: &[u8]) -> Probe {
    let mut at = 0;
    let mut complete = 0;
    let mut checked_body = false;
    while let Some(end) = whole_message(side, &data[at..]) {
        checked_body |= end > 5;
        complete += 1;
        at += end;
    }
    let rest = &data[at..];
    if rest.is_empty() && (complete >= 2 || (complete == 1 && checked_body)) {
        return Probe::Yes;
    }
    if complete >= 2 && rest.len() >= 5 && header_prefix_ok(side, rest) {
        return Probe::Yes;
    }
    // A short chunk that could grow into evidence: the detector asks again with more bytes.
    if data.len() < 64 && header_prefix_ok(side, rest) && (complete > 0 || rest.len() < 5) {
        return Probe::Maybe;
    }
    if data.len() < 64
        && complete == 0
        && be32(data, 1).is_some_and(|len| header_ok(Some(side), data[0], len))
    {
        return Probe::Maybe;
    }
    Probe::No
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend(((body.len() + 4) as u32).to_be_bytes());
        m.extend(body);
        m
    }

    #[test]
    fn untyped_codes() {
        assert_eq!(untyped(8, SSL_REQUEST), Some(Untyped::Ssl));
        assert_eq!(untyped(8, GSSENC_REQUEST), Some(Untyped::Gss));
        assert_eq!(untyped(16, CANCEL_REQUEST), Some(Untyped::Cancel));
        assert_eq!(untyped(40, 196_608), Some(Untyped::Startup));
        assert_eq!(untyped(40, 196_610), Some(Untyped::Startup));
        assert_eq!(untyped(9, SSL_REQUEST), None);
        assert_eq!(untyped(8, 196_608), None);
        assert_eq!(untyped(20_000, 196_608), None);
        assert_eq!(untyped(40, 131_072), None, "protocol 2 is not supported");
    }

    #[test]
    fn layouts() {
        assert!(body_ok(Side::Frontend, b'Q', b"select 1\0"));
        assert!(!body_ok(Side::Frontend, b'Q', b"select\x001\0"));
        assert!(body_ok(
            Side::Frontend,
            b'P',
            b"s1\0select $1\0\0\x01\0\0\0\x17"
        ));
        assert!(!body_ok(Side::Frontend, b'P', b"s1\0select $1\0\0\x01"));
        let bind = b"\0s1\0\0\x01\0\x01\0\x01\0\0\0\x021x\0\0";
        assert!(body_ok(Side::Frontend, b'B', bind));
        assert!(!body_ok(Side::Frontend, b'B', &bind[..bind.len() - 1]));
        assert!(body_ok(
            Side::Backend,
            b'D',
            b"\0\x02\0\0\0\x011\xff\xff\xff\xff"
        ));
        assert!(!body_ok(Side::Backend, b'D', b"\0\x02\0\0\0\x011"));
        assert!(body_ok(Side::Backend, b'E', b"SERROR\0C42601\0Mbad\0\0"));
        assert!(!body_ok(Side::Backend, b'E', b"C42601\0\0"));
        assert!(body_ok(Side::Backend, b'C', b"SELECT 1\0"));
        assert!(!body_ok(Side::Backend, b'C', b"select 1\0"));
    }

    #[test]
    fn boundaries_need_evidence() {
        let mut stream = b"garbage".to_vec();
        let q = msg(b'Q', b"select 1\0");
        stream.extend(&q);
        assert_eq!(find_boundary(None, &stream), Some((7, Side::Frontend)));
        // A message cut by the end of the data is not evidence on its own.
        assert_eq!(find_boundary(None, &stream[..stream.len() - 1]), None);
        let mut two = msg(b'C', b"SELECT 1\0");
        two.extend(msg(b'Z', b"I"));
        two.extend(&msg(b'T', b"\0\x01")[..3]);
        assert_eq!(
            find_boundary(Some(Side::Backend), &two),
            Some((0, Side::Backend))
        );
        assert_eq!(find_boundary(Some(Side::Frontend), &two), None);
    }

    #[test]
    fn errors_are_read_from_prefixes() {
        let f = error_fields(b"SERROR\0VERROR\0C23505\0Mduplicate key\0");
        assert_eq!(f.severity.as_deref(), Some("ERROR"));
        assert_eq!(f.sqlstate.as_deref(), Some("23505"));
        assert_eq!(f.message.as_deref(), Some("duplicate key"));
        let cut = error_fields(b"SFATAL\0C5");
        assert_eq!(cut.severity.as_deref(), Some("FATAL"));
        assert_eq!(cut.sqlstate, None);
    }

    #[test]
    fn startup_parameters() {
        let body = b"user\0alice\0database\0shop\0application_name\0psql\0\0";
        assert!(startup_body_ok(body));
        let p = startup_params(body).expect("valid");
        assert_eq!(p.user.as_deref(), Some("alice"));
        assert_eq!(p.database.as_deref(), Some("shop"));
        assert_eq!(p.application_name.as_deref(), Some("psql"));
        assert!(!startup_body_ok(b"database\0shop\0\0"), "user is required");
        assert!(!startup_body_ok(b"user\0alice\0"), "terminator missing");
    }
}
