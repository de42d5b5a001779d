//! HPACK header block decoding (RFC 7541) for a passive observer.
//!
//! One [`Decoder`] per direction mirrors the dynamic table of the encoder that sends in that
//! direction. A decoder is *synchronised* when its table is known to equal the encoder's: from the
//! start of the connection, or after a dynamic table size update to 0 (which empties the encoder's
//! table). Otherwise (capture joined mid-connection, lost bytes, a block that could not be read)
//! references into the dynamic table cannot be resolved: such fields are reported as
//! [`Field::Unknown`] and the table is not maintained, because after an unseen insertion every
//! index is shifted. Static-table references and literals are always exact, so a decoded field is
//! never wrong, only missing.
//!
//! Keeping more entries than the encoder does never changes what an index refers to (new entries
//! take the lowest index, eviction drops the highest). The table is therefore grown as soon as the
//! decoding side advertises a larger size, and capped at [`MAX_TABLE_SIZE`]: a reference beyond what
//! is kept is detected, reported unknown and desynchronises the decoder.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::mem;

use super::huffman;

/// Initial dynamic table size of every HTTP/2 endpoint (SETTINGS_HEADER_TABLE_SIZE default).
pub(crate) const DEFAULT_TABLE_SIZE: usize = 4096;
/// Largest dynamic table kept per direction, in HPACK size units (bytes plus 32 per entry).
pub(crate) const MAX_TABLE_SIZE: usize = 64 * 1024;
/// Per-entry overhead in the HPACK size of a table entry.
const ENTRY_OVERHEAD: usize = 32;
/// Integers beyond this are not plausible in a header block (lengths, indices, table sizes).
const MAX_INTEGER: u64 = 1 << 32;

/// The static table (RFC 7541 Appendix A), index 1 first.
pub(crate) const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// Why a header block could not be decoded. The decoder is desynchronised by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Error {
    /// The block ends inside a representation.
    #[error("header block truncated")]
    Truncated,
    /// An integer too large to be meaningful.
    #[error("integer overflow")]
    Overflow,
    /// Index 0 does not exist.
    #[error("index 0")]
    ZeroIndex,
    /// A Huffman-coded string is invalid.
    #[error(transparent)]
    Huffman(#[from] huffman::HuffmanError),
    /// A dynamic table size update after the first field of a block.
    #[error("table size update after a field")]
    LateSizeUpdate,
}

/// One decoded header field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Field<'a> {
    /// Name and value, exactly as sent.
    Known(&'a [u8], &'a [u8]),
    /// A field whose name (and maybe value) is in the unknown part of the dynamic table.
    Unknown,
}

/// A field's name and value.
type NameValue<'a> = (&'a [u8], &'a [u8]);

/// One dynamic table entry: name and value in one allocation.
#[derive(Debug)]
struct Entry {
    bytes: Box<[u8]>,
    name_len: usize,
}

impl Entry {
    fn name(&self) -> &[u8] {
        &self.bytes[..self.name_len]
    }
    fn value(&self) -> &[u8] {
        &self.bytes[self.name_len..]
    }
    fn size(&self) -> usize {
        self.bytes.len() + ENTRY_OVERHEAD
    }
}

/// The decoding state of one direction.
#[derive(Debug)]
pub(crate) struct Decoder {
    /// Newest first: index 62 is `entries[0]`.
    entries: VecDeque<Entry>,
    /// HPACK size of the entries.
    size: usize,
    /// Size the table is evicted down to.
    capacity: usize,
    synced: bool,
}

impl Default for Decoder {
    /// An unsynchronised decoder: nothing is known about the encoder's table yet.
    fn default() -> Self {
        Decoder {
            entries: VecDeque::new(),
            size: 0,
            capacity: DEFAULT_TABLE_SIZE,
            synced: false,
        }
    }
}

/// A field name: a literal or a table index.
enum Name<'a> {
    Literal(Cow<'a, [u8]>),
    Index(u64),
}

impl Decoder {
    /// A decoder at the start of a connection: the encoder's table is empty.
    #[cfg(test)]
    pub(crate) fn synced() -> Self {
        let mut d = Decoder::default();
        d.resync();
        d
    }

    /// Whether dynamic table references can be resolved.
    #[cfg(test)]
    pub(crate) fn is_synced(&self) -> bool {
        self.synced
    }

    /// The encoder's table is known to be empty now (connection start).
    pub(crate) fn resync(&mut self) {
        self.entries.clear();
        self.size = 0;
        self.synced = true;
    }

    /// The encoder's table is unknown from now on.
    pub(crate) fn desync(&mut self) {
        self.entries = VecDeque::new();
        self.size = 0;
        self.synced = false;
    }

    /// The decoding side advertised SETTINGS_HEADER_TABLE_SIZE `limit`. An encoder may use a larger
    /// limit without signalling it, so the table grows now; a smaller one takes effect through the
    /// size update the encoder must send.
    pub(crate) fn set_limit(&mut self, limit: u32) {
        let limit = (limit as usize).min(MAX_TABLE_SIZE);
        if limit > self.capacity {
            self.capacity = limit;
        }
    }

    /// Approximate heap bytes held by the table.
    pub(crate) fn held_bytes(&self) -> usize {
        self.entries.capacity() * mem::size_of::<Entry>()
            + self.entries.iter().map(|e| e.bytes.len()).sum::<usize>()
    }

    /// Decodes one complete header block, handing each field to `emit` in order. On error the
    /// fields already emitted are exact but the rest of the block is lost; the caller then
    /// desynchronises the decoder.
    pub(crate) fn decode(
        &mut self,
        block: &[u8],
        mut emit: impl FnMut(Field<'_>),
    ) -> Result<(), Error> {
        let mut r = Reader { buf: block, pos: 0 };
        let mut first = true;
        while let Some(b) = r.peek() {
            if b & 0x80 != 0 {
                first = false;
                let index = r.integer(7)?;
                match self.lookup(index)? {
                    Some(e) => emit(Field::Known(e.0, e.1)),
                    None => {
                        emit(Field::Unknown);
                        self.lost_reference();
                    }
                }
            } else if b & 0xe0 == 0x20 {
                let size = r.integer(5)?;
                if !first {
                    return Err(Error::LateSizeUpdate);
                }
                self.size_update(size);
            } else {
                first = false;
                let (prefix, indexed) = if b & 0x40 != 0 { (6, true) } else { (4, false) };
                let index = r.integer(prefix)?;
                let name = if index == 0 {
                    Name::Literal(r.string()?)
                } else {
                    Name::Index(index)
                };
                let value = r.string()?;
                let resolved: Option<&[u8]> = match &name {
                    Name::Literal(n) => Some(n),
                    Name::Index(i) => self.lookup(*i)?.map(|(n, _)| n),
                };
                let (missing, entry) = match resolved {
                    Some(n) => {
                        emit(Field::Known(n, &value));
                        let entry = (indexed && self.synced).then(|| Entry {
                            bytes: [n, &value[..]].concat().into_boxed_slice(),
                            name_len: n.len(),
                        });
                        (false, entry)
                    }
                    None => {
                        emit(Field::Unknown);
                        (true, None)
                    }
                };
                if missing {
                    self.lost_reference();
                }
                if let Some(entry) = entry {
                    self.insert(entry);
                }
            }
        }
        Ok(())
    }

    /// Name and value at `index`; `None` when it is in the unknown part of the dynamic table.
    fn lookup(&self, index: u64) -> Result<Option<NameValue<'_>>, Error> {
        if index == 0 {
            return Err(Error::ZeroIndex);
        }
        if let Some(&(n, v)) = STATIC_TABLE.get((index - 1) as usize) {
            return Ok(Some((n.as_bytes(), v.as_bytes())));
        }
        if !self.synced {
            return Ok(None);
        }
        let dynamic = (index - 1) as usize - STATIC_TABLE.len();
        Ok(self.entries.get(dynamic).map(|e| (e.name(), e.value())))
    }

    /// A reference could not be resolved: if the table was believed known, it is not.
    fn lost_reference(&mut self) {
        if self.synced {
            self.desync();
        }
    }

    fn size_update(&mut self, size: u64) {
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        if size == 0 {
            // The encoder's table is empty now, whatever it held before.
            self.resync();
        }
        self.capacity = size.min(MAX_TABLE_SIZE);
        self.evict(0);
    }

    fn insert(&mut self, entry: Entry) {
        let size = entry.size();
        if size > self.capacity {
            // An entry larger than the table empties it (RFC 7541 section 4.4).
            self.entries.clear();
            self.size = 0;
            return;
        }
        self.evict(size);
        self.size += size;
        self.entries.push_front(entry);
    }

    /// Evicts until `room` more fits within the capacity.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.capacity {
            match self.entries.pop_back() {
                Some(e) => self.size -= e.size(),
                None => {
                    self.size = 0;
                    break;
                }
            }
        }
    }
}

/// A cursor over a header block.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    fn byte(&mut self) -> Result<u8, Error> {
        let b = self.peek().ok_or(Error::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    /// An integer with an `n`-bit prefix (RFC 7541 section 5.1).
    fn integer(&mut self, n: u32) -> Result<u64, Error> {
        let max = (1u64 << n) - 1;
        let mut value = u64::from(self.byte()?) & max;
        if value < max {
            return Ok(value);
        }
        let mut shift = 0u32;
        loop {
            let b = self.byte()?;
            if shift > 32 {
                return Err(Error::Overflow);
            }
            value += u64::from(b & 0x7f) << shift;
            if value > MAX_INTEGER {
                return Err(Error::Overflow);
            }
            if b & 0x80 == 0 {
                return Ok(value);
            }
            shift += 7;
        }
    }

    /// A string literal (RFC 7541 section 5.2), Huffman-decoded when flagged.
    fn string(&mut self) -> Result<Cow<'a, [u8]>, Error> {
        let huffman = self.peek().ok_or(Error::Truncated)? & 0x80 != 0;
        let len = self.integer(7)?;
        let len = usize::try_from(len).map_err(|_| Error::Overflow)?;
        let end = self.pos.checked_add(len).ok_or(Error::Overflow)?;
        let raw = self.buf.get(self.pos..end).ok_or(Error::Truncated)?;
        self.pos = end;
        if huffman {
            let mut out = Vec::new();
            huffman::decode(raw, &mut out)?;
            Ok(Cow::Owned(out))
        } else {
            Ok(Cow::Borrowed(raw))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// Decoded fields as text; `?` for unknown ones.
    fn decode(d: &mut Decoder, block: &[u8]) -> Result<Vec<(String, String)>, Error> {
        let mut out = Vec::new();
        d.decode(block, |f| {
            out.push(match f {
                Field::Known(n, v) => (
                    String::from_utf8_lossy(n).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                ),
                Field::Unknown => ("?".to_owned(), "?".to_owned()),
            })
        })?;
        Ok(out)
    }

    fn fields(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn table(d: &Decoder) -> Vec<(String, String)> {
        d.entries
            .iter()
            .map(|e| {
                (
                    String::from_utf8_lossy(e.name()).into_owned(),
                    String::from_utf8_lossy(e.value()).into_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn integers_rfc_c1() {
        let int = |bytes: &[u8], n| Reader { buf: bytes, pos: 0 }.integer(n);
        assert_eq!(int(&[0x0a], 5), Ok(10));
        assert_eq!(int(&[0x1f, 0x9a, 0x0a], 5), Ok(1337));
        assert_eq!(int(&[0x2a], 8), Ok(42));
        assert_eq!(int(&[0x1f], 5), Err(Error::Truncated));
        assert_eq!(
            int(&[0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f], 5),
            Err(Error::Overflow)
        );
        // Endless zero continuation bytes are cut off, not shifted out of range.
        let long = [&[0x7fu8][..], &[0x80; 1000], &[0x01]].concat();
        assert_eq!(int(&long, 7), Err(Error::Overflow));
    }

    #[test]
    fn literal_fields_rfc_c2() {
        // C.2.1: literal with indexing, new name.
        let mut d = Decoder::synced();
        let block = hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572");
        assert_eq!(
            decode(&mut d, &block),
            Ok(fields(&[("custom-key", "custom-header")]))
        );
        assert_eq!(table(&d), fields(&[("custom-key", "custom-header")]));
        assert_eq!(d.size, 55);
        // C.2.2: literal without indexing, indexed name.
        let mut d = Decoder::synced();
        let block = hex("040c 2f73 616d 706c 652f 7061 7468");
        assert_eq!(
            decode(&mut d, &block),
            Ok(fields(&[(":path", "/sample/path")]))
        );
        assert!(table(&d).is_empty());
        // C.2.3: never indexed.
        let block = hex("1008 7061 7373 776f 7264 0673 6563 7265 74");
        assert_eq!(
            decode(&mut d, &block),
            Ok(fields(&[("password", "secret")]))
        );
        assert!(table(&d).is_empty());
        // C.2.4: indexed.
        assert_eq!(decode(&mut d, &[0x82]), Ok(fields(&[(":method", "GET")])));
    }

    /// RFC 7541 C.3 (plain) and C.4 (Huffman): three requests on one connection.
    fn requests(blocks: [&str; 3]) {
        let mut d = Decoder::synced();
        let first = fields(&[
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            (":authority", "www.example.com"),
        ]);
        assert_eq!(decode(&mut d, &hex(blocks[0])), Ok(first));
        assert_eq!(table(&d), fields(&[(":authority", "www.example.com")]));
        assert_eq!(d.size, 57);

        let second = fields(&[
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            (":authority", "www.example.com"),
            ("cache-control", "no-cache"),
        ]);
        assert_eq!(decode(&mut d, &hex(blocks[1])), Ok(second));
        assert_eq!(
            table(&d),
            fields(&[
                ("cache-control", "no-cache"),
                (":authority", "www.example.com")
            ])
        );
        assert_eq!(d.size, 110);

        let third = fields(&[
            (":method", "GET"),
            (":scheme", "https"),
            (":path", "/index.html"),
            (":authority", "www.example.com"),
            ("custom-key", "custom-value"),
        ]);
        assert_eq!(decode(&mut d, &hex(blocks[2])), Ok(third));
        assert_eq!(
            table(&d),
            fields(&[
                ("custom-key", "custom-value"),
                ("cache-control", "no-cache"),
                (":authority", "www.example.com"),
            ])
        );
        assert_eq!(d.size, 164);
    }

    #[test]
    fn requests_rfc_c3() {
        requests([
            "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
            "8286 84be 5808 6e6f 2d63 6163 6865",
            "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
        ]);
    }

    #[test]
    fn requests_rfc_c4_huffman() {
        requests([
            "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
            "8286 84be 5886 a8eb 1064 9cbf",
            "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
        ]);
    }

    /// RFC 7541 C.5 (plain) and C.6 (Huffman): three responses with a 256-byte table, so entries
    /// are evicted.
    fn responses(blocks: [&str; 3]) {
        let mut d = Decoder::synced();
        d.size_update(256);
        let date1 = "Mon, 21 Oct 2013 20:13:21 GMT";
        let date2 = "Mon, 21 Oct 2013 20:13:22 GMT";
        let url = "https://www.example.com";
        let first = fields(&[
            (":status", "302"),
            ("cache-control", "private"),
            ("date", date1),
            ("location", url),
        ]);
        assert_eq!(decode(&mut d, &hex(blocks[0])), Ok(first));
        assert_eq!(
            table(&d),
            fields(&[
                ("location", url),
                ("date", date1),
                ("cache-control", "private"),
                (":status", "302"),
            ])
        );
        assert_eq!(d.size, 222);

        let second = fields(&[
            (":status", "307"),
            ("cache-control", "private"),
            ("date", date1),
            ("location", url),
        ]);
        assert_eq!(decode(&mut d, &hex(blocks[1])), Ok(second));
        assert_eq!(
            table(&d),
            fields(&[
                (":status", "307"),
                ("location", url),
                ("date", date1),
                ("cache-control", "private"),
            ])
        );
        assert_eq!(d.size, 222);

        let cookie = "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1";
        let third = fields(&[
            (":status", "200"),
            ("cache-control", "private"),
            ("date", date2),
            ("location", url),
            ("content-encoding", "gzip"),
            ("set-cookie", cookie),
        ]);
        assert_eq!(decode(&mut d, &hex(blocks[2])), Ok(third));
        assert_eq!(
            table(&d),
            fields(&[
                ("set-cookie", cookie),
                ("content-encoding", "gzip"),
                ("date", date2),
            ])
        );
        assert_eq!(d.size, 215);
    }

    #[test]
    fn responses_rfc_c5() {
        responses([
            "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 \
             2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 \
             6c65 2e63 6f6d",
            "4803 3330 37c1 c0bf",
            "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d \
             54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049 \
             5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e \
             3d31",
        ]);
    }

    #[test]
    fn responses_rfc_c6_huffman() {
        responses([
            "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 \
             2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
            "4883 640e ff c1 c0 bf",
            "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab 77ad \
             94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f 9587 \
             3160 65c0 03ed 4ee5 b106 3d50 07",
        ]);
    }

    #[test]
    fn unsynced_decoder_resolves_static_and_literals_only() {
        let mut d = Decoder::default();
        // :method GET (static), :path from the dynamic table (62), literal user-agent with
        // indexing (must not be inserted), then a dynamic reference that would point at it.
        let mut block = vec![0x82, 0xbe];
        block.extend(hex("7a 03 6375 72")); // user-agent: cur (indexed name 58, incremental)
        block.push(0xbe);
        assert_eq!(
            decode(&mut d, &block),
            Ok(fields(&[
                (":method", "GET"),
                ("?", "?"),
                ("user-agent", "cur"),
                ("?", "?")
            ]))
        );
        assert!(!d.is_synced());
        assert!(table(&d).is_empty());
        // A literal whose name is a dynamic reference is unknown too.
        assert_eq!(decode(&mut d, &hex("7f00 0161")), Ok(fields(&[("?", "?")])));
    }

    #[test]
    fn missing_reference_desynchronises_for_good() {
        let mut d = Decoder::synced();
        decode(
            &mut d,
            &hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572"),
        )
        .expect("insert");
        assert_eq!(
            decode(&mut d, &[0xbe, 0xbf, 0xbe]),
            Ok(fields(&[
                ("custom-key", "custom-header"),
                ("?", "?"),
                ("?", "?")
            ])),
            "index 63 does not exist: nothing from the table is trusted afterwards"
        );
        assert!(!d.is_synced());
    }

    #[test]
    fn size_update_to_zero_resynchronises() {
        let mut d = Decoder::default();
        // Size update 0, then 4096, then a literal with indexing, then a reference to it.
        let mut block = vec![0x20, 0x3f, 0xe1, 0x1f];
        block.extend(hex(
            "400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572",
        ));
        block.push(0xbe);
        assert_eq!(
            decode(&mut d, &block),
            Ok(fields(&[
                ("custom-key", "custom-header"),
                ("custom-key", "custom-header")
            ]))
        );
        assert!(d.is_synced());
        assert_eq!(d.capacity, 4096);
    }

    #[test]
    fn eviction_and_capacity() {
        let mut d = Decoder::synced();
        // Shrinking evicts; an entry larger than the table empties it.
        decode(&mut d, &hex("4001 61 0162 4001 63 0164")).expect("two inserts");
        assert_eq!(d.size, 68);
        assert_eq!(decode(&mut d, &[0x3f, 0x16, 0xbe]).map(|f| f.len()), Ok(1));
        assert_eq!(table(&d), fields(&[("c", "d")]));
        let big = [&hex("4001 61")[..], &[0x7f, 0x81, 0x01], &[b'x'; 256]].concat();
        let mut d2 = Decoder::synced();
        d2.size_update(100);
        decode(&mut d2, &hex("4001 61 0162")).expect("insert");
        decode(&mut d2, &big).expect("too big to insert");
        assert!(table(&d2).is_empty());
        assert_eq!(d2.size, 0);
        // The advertised limit grows the table; updates beyond the cap are clamped.
        let mut d3 = Decoder::synced();
        d3.set_limit(8192);
        assert_eq!(d3.capacity, 8192);
        d3.set_limit(100);
        assert_eq!(
            d3.capacity, 8192,
            "a smaller limit waits for the size update"
        );
        d3.size_update(1 << 30);
        assert_eq!(d3.capacity, MAX_TABLE_SIZE);
    }

    #[test]
    fn malformed_blocks_are_errors() {
        let mut d = Decoder::synced();
        assert_eq!(decode(&mut d, &[0x80]), Err(Error::ZeroIndex));
        assert_eq!(decode(&mut d, &[0x40, 0x05, b'a']), Err(Error::Truncated));
        assert_eq!(decode(&mut d, &[0x82, 0x20]), Err(Error::LateSizeUpdate));
        assert!(matches!(
            decode(&mut d, &[0x00, 0x81, 0xff, 0x01, 0x61]),
            Err(Error::Huffman(_))
        ));
        assert_eq!(decode(&mut d, &[]), Ok(Vec::new()));
    }
}
