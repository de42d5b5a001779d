//! The TLS protocol version from a handshake seen in the clear.
//!
//! A TLS connection's ciphertext is useless to the parsers, but its first records are not: the
//! ServerHello names the version the two ends agreed on. [`HelloWatcher`] reads one direction's
//! records until a ServerHello completes (RFC 8446 §4.1.3, RFC 5246 §7.4.1.3) and reports its
//! version: the `supported_versions` extension (43) when present (TLS 1.3 negotiates only
//! there), else the legacy version field. It keeps at most [`WATCH_LIMIT`] bytes and never
//! panics on malformed input.

use thiserror::Error;

/// Bytes one direction may carry before the watcher gives up on finding a ServerHello.
pub const WATCH_LIMIT: usize = 16 * 1024;

/// Record content type of handshake messages.
const HANDSHAKE: u8 = 22;
/// Handshake message type of ServerHello.
const SERVER_HELLO: u8 = 2;
/// Extension `supported_versions`.
const SUPPORTED_VERSIONS: u16 = 43;
/// Largest record body TLS allows (2^14 plus expansion).
const MAX_RECORD: usize = (1 << 14) + 2048;

/// A negotiated protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsVersion {
    /// SSL 3.0.
    Ssl3,
    /// TLS 1.0.
    Tls10,
    /// TLS 1.1.
    Tls11,
    /// TLS 1.2.
    Tls12,
    /// TLS 1.3.
    Tls13,
}

impl TlsVersion {
    /// The version from its wire value (`0x0303` is TLS 1.2).
    pub fn from_wire(v: u16) -> Option<TlsVersion> {
        Some(match v {
            0x0300 => TlsVersion::Ssl3,
            0x0301 => TlsVersion::Tls10,
            0x0302 => TlsVersion::Tls11,
            0x0303 => TlsVersion::Tls12,
            0x0304 => TlsVersion::Tls13,
            _ => return None,
        })
    }

    /// `tls.protocol.name` in the OpenTelemetry semantic conventions.
    pub fn protocol_name(self) -> &'static str {
        match self {
            TlsVersion::Ssl3 => "ssl",
            _ => "tls",
        }
    }

    /// `tls.protocol.version` in the OpenTelemetry semantic conventions.
    pub fn protocol_version(self) -> &'static str {
        match self {
            TlsVersion::Ssl3 => "3",
            TlsVersion::Tls10 => "1.0",
            TlsVersion::Tls11 => "1.1",
            TlsVersion::Tls12 => "1.2",
            TlsVersion::Tls13 => "1.3",
        }
    }
}

/// Why a direction gave no version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum TlsError {
    /// The bytes are not TLS records.
    #[error("not a TLS record")]
    NotRecord,
    /// A ServerHello that does not parse.
    #[error("malformed ServerHello")]
    BadServerHello,
    /// More than [`WATCH_LIMIT`] bytes without a ServerHello.
    #[error("no ServerHello within the watch limit")]
    TooLong,
    /// Bytes were lost: records can no longer be followed.
    #[error("bytes lost before the ServerHello")]
    Gap,
}

impl TlsError {
    /// Stable snake_case name, used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsError::NotRecord => "not_record",
            TlsError::BadServerHello => "bad_server_hello",
            TlsError::TooLong => "too_long",
            TlsError::Gap => "gap",
        }
    }
}

/// Follows the records of one direction until a ServerHello is complete.
#[derive(Debug, Default)]
pub struct HelloWatcher {
    /// Record bytes not consumed yet.
    records: Vec<u8>,
    /// Handshake bytes (record bodies of type handshake) not consumed yet.
    handshake: Vec<u8>,
    /// Bytes fed so far.
    seen: usize,
}

impl HelloWatcher {
    /// Takes the next bytes of the direction: `Ok(Some)` once a ServerHello is complete,
    /// `Ok(None)` while more bytes are needed. After an error the watcher is of no further use.
    pub fn feed(&mut self, data: &[u8]) -> Result<Option<TlsVersion>, TlsError> {
        self.seen = self.seen.saturating_add(data.len());
        if self.seen > WATCH_LIMIT {
            return Err(TlsError::TooLong);
        }
        self.records.extend_from_slice(data);
        let mut at = 0;
        let found = loop {
            let Some(header) = self.records.get(at..at + 5) else {
                break None;
            };
            let (kind, major, len) = (
                header[0],
                header[1],
                u16::from_be_bytes([header[3], header[4]]),
            );
            if !(20..=24).contains(&kind) || major != 3 || usize::from(len) > MAX_RECORD {
                return Err(TlsError::NotRecord);
            }
            let Some(body) = self.records.get(at + 5..at + 5 + usize::from(len)) else {
                break None;
            };
            at += 5 + usize::from(len);
            if kind != HANDSHAKE {
                continue;
            }
            self.handshake.extend_from_slice(body);
            if let Some(v) = next_server_hello(&mut self.handshake)? {
                break Some(v);
            }
        };
        self.records.drain(..at);
        Ok(found)
    }
}

/// Consumes the complete handshake messages at the front of `buf`; the version of the first
/// ServerHello among them.
fn next_server_hello(buf: &mut Vec<u8>) -> Result<Option<TlsVersion>, TlsError> {
    let mut at = 0;
    let mut found = None;
    while let Some(&[kind, a, b, c]) = buf.get(at..at + 4) {
        let len = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
        let Some(body) = buf.get(at + 4..at + 4 + len) else {
            break;
        };
        at += 4 + len;
        if kind == SERVER_HELLO {
            found = Some(server_hello_version(body)?);
            break;
        }
    }
    buf.drain(..at);
    Ok(found)
}

/// A byte cursor whose reads fail on short input.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TlsError> {
        if self.0.len() < n {
            return Err(TlsError::BadServerHello);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, TlsError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, TlsError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
}

/// The version a ServerHello body (after the handshake header) selects.
pub fn server_hello_version(body: &[u8]) -> Result<TlsVersion, TlsError> {
    let mut r = Reader(body);
    let legacy = r.u16()?;
    r.take(32)?; // random
    let session_id = r.u8()?;
    r.take(usize::from(session_id))?;
    r.take(2)?; // cipher suite
    r.take(1)?; // compression method
    if !r.0.is_empty() {
        let len = r.u16()?;
        let mut exts = Reader(r.take(usize::from(len))?);
        while !exts.0.is_empty() {
            let kind = exts.u16()?;
            let len = exts.u16()?;
            let data = exts.take(usize::from(len))?;
            if kind == SUPPORTED_VERSIONS {
                let &[a, b] = data else {
                    return Err(TlsError::BadServerHello);
                };
                return TlsVersion::from_wire(u16::from_be_bytes([a, b]))
                    .ok_or(TlsError::BadServerHello);
            }
        }
    }
    TlsVersion::from_wire(legacy).ok_or(TlsError::BadServerHello)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/testdata/{name}/conn0.s2c.bin",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("read {path}: {e}"))
    }

    fn client_hello(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/testdata/{name}/conn0.c2s.bin",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("read {path}: {e}"))
    }

    fn watch(data: &[u8], chunk: usize) -> Result<Option<TlsVersion>, TlsError> {
        let mut w = HelloWatcher::default();
        for piece in data.chunks(chunk.max(1)) {
            if let Some(v) = w.feed(piece)? {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    #[test]
    fn captured_server_hellos_give_their_version() {
        for (name, want, label) in [
            ("tls13_curl", TlsVersion::Tls13, "1.3"),
            ("tls12_curl", TlsVersion::Tls12, "1.2"),
        ] {
            let s2c = capture(name);
            for chunk in [1, 3, 7, 100, s2c.len()] {
                assert_eq!(
                    watch(&s2c, chunk),
                    Ok(Some(want)),
                    "{name} in chunks of {chunk}"
                );
            }
            assert_eq!(want.protocol_version(), label);
            assert_eq!(want.protocol_name(), "tls");
        }
    }

    #[test]
    fn client_direction_has_no_server_hello() {
        for name in ["tls13_curl", "tls12_curl"] {
            let c2s = client_hello(name);
            assert_eq!(watch(&c2s, 50), Ok(None), "{name}");
        }
    }

    #[test]
    fn truncated_server_hello_needs_more() {
        let s2c = capture("tls13_curl");
        // Record header and handshake header say 0x7a bytes; stop one short of them.
        let hello_end = 5 + 0x7a;
        for n in 0..hello_end {
            assert_eq!(watch(&s2c[..n], 1000), Ok(None), "{n} bytes");
        }
        assert_eq!(watch(&s2c[..hello_end], 1000), Ok(Some(TlsVersion::Tls13)));
    }

    #[test]
    fn legacy_version_without_extensions() {
        let mut body = vec![0x03, 0x01];
        body.extend([0u8; 32]);
        body.extend([0, 0x00, 0x2f, 0]);
        assert_eq!(server_hello_version(&body), Ok(TlsVersion::Tls10));
        body[1] = 0x02;
        assert_eq!(server_hello_version(&body), Ok(TlsVersion::Tls11));
        body[1] = 0x00;
        assert_eq!(server_hello_version(&body), Ok(TlsVersion::Ssl3));
        assert_eq!(TlsVersion::Ssl3.protocol_name(), "ssl");
        body[1] = 0x07;
        assert_eq!(server_hello_version(&body), Err(TlsError::BadServerHello));
        // Extensions longer than the message.
        body[1] = 0x03;
        body.extend([0, 10, 0, 43]);
        assert_eq!(server_hello_version(&body), Err(TlsError::BadServerHello));
    }

    #[test]
    fn garbage_is_an_error_and_the_limit_holds() {
        assert_eq!(watch(b"GET / HTTP/1.1\r\n", 100), Err(TlsError::NotRecord));
        assert_eq!(
            watch(&[0x16, 0x03, 0x03, 0xff, 0xff], 100),
            Err(TlsError::NotRecord)
        );
        // Application data records only: given up once the limit passes.
        let record = [&[0x17, 0x03, 0x03, 0x03, 0xfb][..], &[0u8; 0x3fb]].concat();
        let many: Vec<u8> = record
            .iter()
            .copied()
            .cycle()
            .take(WATCH_LIMIT + 1)
            .collect();
        assert_eq!(watch(&many, 4096), Err(TlsError::TooLong));
    }

    #[test]
    fn random_input_never_panics() {
        // A small xorshift generator: reproducible without a dependency.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let real = capture("tls12_curl");
        for round in 0..2000 {
            let len = (next() % 600) as usize;
            let mut data: Vec<u8> = if round % 2 == 0 {
                (0..len).map(|_| next() as u8).collect()
            } else {
                real[..len.min(real.len())].to_vec()
            };
            // Keep records plausible half the time so the handshake paths run.
            if round % 4 == 1 && data.len() > 20 {
                let at = 9 + (next() as usize % (data.len() - 9));
                data[at] = next() as u8;
            }
            let _ = watch(&data, 1 + (next() % 64) as usize);
            let _ = server_hello_version(&data);
        }
    }
}
