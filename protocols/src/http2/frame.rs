//! HTTP/2 frame headers (RFC 9113 section 4.1) and the plausibility checks used to find frames in
//! bytes whose framing is not known (mid-connection captures, after gaps).

use super::hpack;

/// Frame header length.
pub(crate) const HEADER_LEN: usize = 9;

pub(crate) const DATA: u8 = 0x0;
pub(crate) const HEADERS: u8 = 0x1;
pub(crate) const PRIORITY: u8 = 0x2;
pub(crate) const RST_STREAM: u8 = 0x3;
pub(crate) const SETTINGS: u8 = 0x4;
pub(crate) const PUSH_PROMISE: u8 = 0x5;
pub(crate) const PING: u8 = 0x6;
pub(crate) const GOAWAY: u8 = 0x7;
pub(crate) const WINDOW_UPDATE: u8 = 0x8;
pub(crate) const CONTINUATION: u8 = 0x9;

/// END_STREAM (DATA, HEADERS) and ACK (SETTINGS, PING) share a bit.
pub(crate) const END_STREAM: u8 = 0x1;
pub(crate) const ACK: u8 = 0x1;
pub(crate) const END_HEADERS: u8 = 0x4;
pub(crate) const PADDED: u8 = 0x8;
pub(crate) const PRIORITY_FLAG: u8 = 0x20;

/// SETTINGS_HEADER_TABLE_SIZE.
pub(crate) const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
/// SETTINGS_MAX_FRAME_SIZE.
pub(crate) const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
/// Frame payload limit until the receiver allows more.
pub(crate) const DEFAULT_MAX_FRAME_SIZE: u32 = 16_384;
/// Largest frame payload any receiver may allow.
pub(crate) const MAX_FRAME_SIZE: u32 = (1 << 24) - 1;

/// Highest error code RFC 9113 defines (HTTP_1_1_REQUIRED).
const MAX_ERROR_CODE: u32 = 0xd;
/// Frames followed when probing a chunk; enough to be sure, bounded for long chunks.
const PROBE_FRAMES: usize = 8;

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameHeader {
    /// Payload length.
    pub len: u32,
    pub kind: u8,
    pub flags: u8,
    /// Stream id without the reserved bit.
    pub stream: u32,
    /// The reserved bit was set (senders must not set it).
    pub reserved: bool,
}

impl FrameHeader {
    pub(crate) fn parse(b: &[u8; HEADER_LEN]) -> Self {
        let id = u32::from_be_bytes([b[5], b[6], b[7], b[8]]);
        FrameHeader {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]),
            kind: b[3],
            flags: b[4],
            stream: id & 0x7fff_ffff,
            reserved: id & 0x8000_0000 != 0,
        }
    }

    /// The header at the start of `data`, when 9 bytes are there.
    pub(crate) fn at(data: &[u8]) -> Option<Self> {
        data.first_chunk::<HEADER_LEN>().map(Self::parse)
    }

    pub(crate) fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// Whether the frame carries a pad length byte.
    pub(crate) fn padded(&self) -> bool {
        matches!(self.kind, DATA | HEADERS | PUSH_PROMISE) && self.has(PADDED)
    }

    /// Payload bytes before the content: pad length, HEADERS priority fields, promised stream id.
    pub(crate) fn prefix_len(&self) -> u32 {
        let pad = u32::from(self.padded());
        match self.kind {
            HEADERS if self.has(PRIORITY_FLAG) => pad + 5,
            PUSH_PROMISE => pad + 4,
            _ => pad,
        }
    }

    /// Stream-id and length rules of the known frame types: what a connection in sync must obey.
    /// Unknown types pass (they are skipped).
    pub(crate) fn sane(&self) -> bool {
        let on_stream = self.stream != 0;
        match self.kind {
            DATA | HEADERS | CONTINUATION | PUSH_PROMISE => {
                on_stream && self.len >= self.prefix_len()
            }
            PRIORITY => on_stream && self.len == 5,
            RST_STREAM => on_stream && self.len == 4,
            SETTINGS => {
                !on_stream && self.len.is_multiple_of(6) && !(self.has(ACK) && self.len != 0)
            }
            PING => !on_stream && self.len == 8,
            GOAWAY => !on_stream && self.len >= 8,
            WINDOW_UPDATE => self.len == 4,
            _ => true,
        }
    }

    /// A header as a conforming sender writes it: known type, only defined flags, reserved bit
    /// clear, and the rules of [`FrameHeader::sane`].
    pub(crate) fn strict(&self) -> bool {
        let defined = match self.kind {
            DATA => END_STREAM | PADDED,
            HEADERS => END_STREAM | END_HEADERS | PADDED | PRIORITY_FLAG,
            PUSH_PROMISE => END_HEADERS | PADDED,
            CONTINUATION => END_HEADERS,
            SETTINGS | PING => ACK,
            PRIORITY | RST_STREAM | GOAWAY | WINDOW_UPDATE => 0,
            _ => return false,
        };
        !self.reserved && self.flags & !defined == 0 && self.sane()
    }
}

/// Whether `payload` is well-formed for the frame `h` (whose header passed [`FrameHeader::strict`]).
fn payload_valid(h: &FrameHeader, payload: &[u8]) -> bool {
    let word = |at: usize| {
        payload
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    if h.padded() {
        let pad = payload.first().map_or(0, |&p| u32::from(p));
        if h.prefix_len() + pad > h.len {
            return false;
        }
    }
    match h.kind {
        RST_STREAM => word(0).is_some_and(|code| code <= MAX_ERROR_CODE),
        GOAWAY => {
            word(0).is_some_and(|last| last & 0x8000_0000 == 0)
                && word(4).is_some_and(|code| code <= MAX_ERROR_CODE)
        }
        WINDOW_UPDATE => word(0).is_some_and(|inc| inc != 0 && inc & 0x8000_0000 == 0),
        SETTINGS => payload.chunks_exact(6).all(|s| {
            let id = u16::from_be_bytes([s[0], s[1]]);
            let value = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
            match id {
                0x2 | 0x8 | 0x9 => value <= 1,
                0x4 => value <= 0x7fff_ffff,
                0x5 => (DEFAULT_MAX_FRAME_SIZE..=MAX_FRAME_SIZE).contains(&value),
                0x1 | 0x3 | 0x6 => true,
                _ => false,
            }
        }),
        _ => true,
    }
}

/// A frame that alone says "HTTP/2": SETTINGS with known entries, PING, WINDOW_UPDATE, or HEADERS
/// whose block reads as HPACK with a pseudo-header.
fn telling_alone(h: &FrameHeader, payload: &[u8]) -> bool {
    match h.kind {
        SETTINGS => !h.has(ACK) && h.len > 0,
        PING | WINDOW_UPDATE => true,
        HEADERS if h.has(END_HEADERS) => {
            let pad = if h.padded() {
                payload.first().map_or(0, |&p| usize::from(p))
            } else {
                0
            };
            let start = h.prefix_len() as usize;
            let Some(block) = payload.get(start..payload.len().saturating_sub(pad)) else {
                return false;
            };
            let mut pseudo = false;
            let decoded = hpack::Decoder::default().decode(block, |f| {
                if let hpack::Field::Known(name, _) = f {
                    pseudo |= matches!(name, b":method" | b":path" | b":status" | b":scheme");
                }
            });
            decoded.is_ok() && pseudo
        }
        _ => false,
    }
}

/// Whether a chunk that does not start with the client preface looks like HTTP/2 frames: two
/// well-formed frames in a row (the second may continue past the chunk), or a single well-formed
/// frame filling the chunk whose type says HTTP/2 alone.
pub(crate) fn looks_like_frames(data: &[u8]) -> bool {
    let mut pos = 0;
    let mut complete = 0;
    let mut first_telling = false;
    while complete < PROBE_FRAMES {
        let Some(h) = FrameHeader::at(&data[pos..]) else {
            // Fewer than 9 bytes left: only a run of frames may end in a partial header.
            return complete >= 2 || (pos == data.len() && complete == 1 && first_telling);
        };
        if !h.strict() {
            return false;
        }
        let start = pos + HEADER_LEN;
        let end = start + h.len as usize;
        let Some(payload) = data.get(start..end) else {
            return complete >= 1;
        };
        if !payload_valid(&h, payload) {
            return false;
        }
        if complete == 0 {
            first_telling = telling_alone(&h, payload);
        }
        complete += 1;
        pos = end;
    }
    true
}

/// Whether a frame plausibly starts at `data[at..]` while looking for lost framing. At a chunk
/// boundary (`boundary`), a well-formed header whose frame runs past the chunk, or a well-formed
/// frame ending the chunk, is enough; inside a chunk the frame must also be followed by another
/// well-formed header.
pub(crate) fn frame_starts_at(data: &[u8], at: usize, boundary: bool) -> bool {
    let Some(h) = data.get(at..).and_then(FrameHeader::at) else {
        return false;
    };
    if !h.strict() {
        return false;
    }
    let start = at + HEADER_LEN;
    let end = start + h.len as usize;
    let Some(payload) = data.get(start..end) else {
        return boundary;
    };
    if !payload_valid(&h, payload) {
        return false;
    }
    match FrameHeader::at(&data[end..]) {
        Some(next) => next.strict(),
        None => boundary,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.push(kind);
        f.push(flags);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    #[test]
    fn header_fields() {
        let h = FrameHeader::parse(&[0x01, 0x02, 0x03, HEADERS, 0x2d, 0x80, 0, 0, 5]);
        assert_eq!(h.len, 0x010203);
        assert_eq!(h.stream, 5);
        assert!(h.reserved);
        assert!(h.padded());
        assert_eq!(h.prefix_len(), 6);
        assert!(h.sane());
        assert!(!h.strict(), "reserved bit");
    }

    #[test]
    fn sanity_rules() {
        let h = |kind, flags, len, stream| FrameHeader {
            len,
            kind,
            flags,
            stream,
            reserved: false,
        };
        assert!(h(SETTINGS, 0, 12, 0).strict());
        assert!(!h(SETTINGS, 0, 7, 0).sane());
        assert!(!h(SETTINGS, ACK, 6, 0).sane());
        assert!(!h(SETTINGS, 0, 6, 1).sane());
        assert!(!h(HEADERS, 0, 4, 0).sane());
        assert!(!h(DATA, PADDED, 0, 1).sane(), "no room for the pad length");
        assert!(!h(PING, 0, 7, 0).sane());
        assert!(!h(RST_STREAM, 0, 4, 0).sane());
        assert!(
            h(0x42, 0xff, 100, 0).sane(),
            "unknown types are skipped in sync"
        );
        assert!(!h(0x42, 0, 100, 0).strict());
        assert!(!h(DATA, 0x2, 1, 1).strict(), "undefined flag");
    }

    #[test]
    fn single_frames_that_tell() {
        let settings = frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100, 0, 4, 0, 1, 0, 0]);
        assert!(looks_like_frames(&settings));
        assert!(!looks_like_frames(&frame(SETTINGS, ACK, 0, &[])));
        assert!(!looks_like_frames(&frame(
            SETTINGS,
            0,
            0,
            &[0, 0x77, 0, 0, 0, 1]
        )));
        assert!(looks_like_frames(&frame(PING, 0, 0, &[7; 8])));
        assert!(looks_like_frames(&frame(
            WINDOW_UPDATE,
            0,
            0,
            &[0, 0, 1, 0]
        )));
        assert!(!looks_like_frames(&frame(WINDOW_UPDATE, 0, 0, &[0; 4])));
        // HEADERS: :method GET, :path / (static) reads as HPACK; random bytes do not.
        let get = frame(HEADERS, END_HEADERS | END_STREAM, 1, &[0x82, 0x84]);
        assert!(looks_like_frames(&get));
        assert!(!looks_like_frames(&frame(HEADERS, END_HEADERS, 1, &[0x80])));
        assert!(!looks_like_frames(&frame(DATA, 0, 1, b"hello")));
        // Followed by more bytes than one frame, a lone frame must be followed by another.
        let mut two = frame(DATA, 0, 1, b"hello");
        two.extend(frame(DATA, END_STREAM, 1, b"!"));
        assert!(looks_like_frames(&two));
        let mut trailing = get.clone();
        trailing.extend(b"GET /");
        assert!(!looks_like_frames(&trailing));
    }

    #[test]
    fn a_frame_running_past_the_chunk_needs_a_frame_before_it() {
        let mut data = frame(HEADERS, END_HEADERS, 1, &[0x82, 0x84]);
        data.extend(&frame(DATA, 0, 1, &[0; 100])[..40]);
        assert!(looks_like_frames(&data));
        assert!(!looks_like_frames(&data[data.len() - 40..]));
    }

    #[test]
    fn other_protocols_are_not_frames() {
        for data in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\n\r\n",
            // PostgreSQL: SSLRequest, StartupMessage, Query, AuthenticationOk + ReadyForQuery.
            b"\x00\x00\x00\x08\x04\xd2\x16\x2f",
            b"\x00\x00\x00\x21\x00\x03\x00\x00user\x00postgres\x00database\x00db\x00\x00",
            b"Q\x00\x00\x00\x0dSELECT 1\x00",
            b"R\x00\x00\x00\x08\x00\x00\x00\x00Z\x00\x00\x00\x05I",
            // TLS records.
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"\x17\x03\x03\x00\x20",
            b"",
            b"\x00\x00",
        ] {
            assert!(!looks_like_frames(data), "{data:?}");
        }
    }

    #[test]
    fn resync_candidates() {
        let mut data = vec![0xaa; 5];
        let at = data.len();
        data.extend(frame(PING, 0, 0, &[1; 8]));
        data.extend(frame(DATA, 0, 1, &[0; 20]));
        assert!(frame_starts_at(&data, at, false));
        assert!(!frame_starts_at(&data, 0, true));
        // Inside a chunk, a frame that merely ends the chunk is not enough.
        let end = data.len() - 29;
        assert!(!frame_starts_at(&data, end, false));
        assert!(frame_starts_at(&data, end, true));
        // At a chunk boundary a frame may run past the chunk.
        assert!(frame_starts_at(&data[end..end + 12], 0, true));
        assert!(!frame_starts_at(&data[end..end + 12], 0, false));
    }
}
