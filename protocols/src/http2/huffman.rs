//! The HPACK Huffman code (RFC 7541 Appendix B) and a decoder for it.
//!
//! The code is canonical: codes of one length are consecutive in symbol order, and the first code
//! of a length follows the last code of the shorter lengths. The appendix is therefore fully given
//! by each symbol's code length, which [`SYMBOLS_BY_LENGTH`] lists; the codes are derived from it.
//! Decoding runs a table-driven state machine four bits at a time: states are the inner nodes of
//! the code tree, so no symbol needs more than a few table reads.

use std::sync::OnceLock;

/// The end-of-string symbol; it must never appear in a decoded string.
const EOS: u16 = 256;

/// Symbols (byte values, 256 = EOS) grouped by code length, per RFC 7541 Appendix B.
const SYMBOLS_BY_LENGTH: &[(u8, &[u16])] = &[
    (5, &[48, 49, 50, 97, 99, 101, 105, 111, 115, 116]),
    (
        6,
        &[
            32, 37, 45, 46, 47, 51, 52, 53, 54, 55, 56, 57, 61, 65, 95, 98, 100, 102, 103, 104,
            108, 109, 110, 112, 114, 117,
        ],
    ),
    (
        7,
        &[
            58, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 83, 84, 85, 86,
            87, 89, 106, 107, 113, 118, 119, 120, 121, 122,
        ],
    ),
    (8, &[38, 42, 44, 59, 88, 90]),
    (10, &[33, 34, 40, 41, 63]),
    (11, &[39, 43, 124]),
    (12, &[35, 62]),
    (13, &[0, 36, 64, 91, 93, 126]),
    (14, &[94, 125]),
    (15, &[60, 96, 123]),
    (19, &[92, 195, 208]),
    (20, &[128, 130, 131, 162, 184, 194, 224, 226]),
    (
        21,
        &[
            153, 161, 167, 172, 176, 177, 179, 209, 216, 217, 227, 229, 230,
        ],
    ),
    (
        22,
        &[
            129, 132, 133, 134, 136, 146, 154, 156, 160, 163, 164, 169, 170, 173, 178, 181, 185,
            186, 187, 189, 190, 196, 198, 228, 232, 233,
        ],
    ),
    (
        23,
        &[
            1, 135, 137, 138, 139, 140, 141, 143, 147, 149, 150, 151, 152, 155, 157, 158, 165, 166,
            168, 174, 175, 180, 182, 183, 188, 191, 197, 231, 239,
        ],
    ),
    (
        24,
        &[9, 142, 144, 145, 148, 159, 171, 206, 215, 225, 236, 237],
    ),
    (25, &[199, 207, 234, 235]),
    (
        26,
        &[
            192, 193, 200, 201, 202, 205, 210, 213, 218, 219, 238, 240, 242, 243, 255,
        ],
    ),
    (
        27,
        &[
            203, 204, 211, 212, 214, 221, 222, 223, 241, 244, 245, 246, 247, 248, 250, 251, 252,
            253, 254,
        ],
    ),
    (
        28,
        &[
            2, 3, 4, 5, 6, 7, 8, 11, 12, 14, 15, 16, 17, 18, 19, 20, 21, 23, 24, 25, 26, 27, 28,
            29, 30, 31, 127, 220, 249,
        ],
    ),
    (30, &[10, 13, 22, 256]),
];

/// `(code, length in bits)` of every symbol, code right-aligned, indexed by symbol.
pub(crate) const CODES: [(u32, u8); 257] = canonical_codes();

/// Assigns canonical codes from [`SYMBOLS_BY_LENGTH`] (lengths ascending, symbols ascending).
const fn canonical_codes() -> [(u32, u8); 257] {
    let mut codes = [(0u32, 0u8); 257];
    let mut code = 0u32;
    let mut prev_len = 0u8;
    let mut first = true;
    let mut g = 0;
    while g < SYMBOLS_BY_LENGTH.len() {
        let (len, symbols) = SYMBOLS_BY_LENGTH[g];
        let mut i = 0;
        while i < symbols.len() {
            if first {
                first = false;
            } else {
                code = (code + 1) << (len - prev_len);
            }
            prev_len = len;
            codes[symbols[i] as usize] = (code, len);
            i += 1;
        }
        g += 1;
    }
    codes
}

/// The Huffman string is not valid: EOS inside, a code that is no symbol, or bad padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid Huffman-coded string")]
pub(crate) struct HuffmanError;

/// A child in the code tree while it is built.
#[derive(Clone, Copy)]
enum Child {
    None,
    Node(u8),
    Leaf(u16),
}

/// One transition: four input bits from a state.
#[derive(Clone, Copy, Default)]
struct Step {
    next: u8,
    symbol: u8,
    flags: u8,
}

const EMIT: u8 = 1;
const FAIL: u8 = 2;

/// The decoding state machine: 256 states (inner nodes of the code tree, root = 0).
struct Machine {
    steps: Vec<[Step; 16]>,
    /// Whether the input may end in this state: at the root, or after at most seven 1-bits of
    /// padding (a prefix of EOS).
    accept: Vec<bool>,
}

fn machine() -> &'static Machine {
    static MACHINE: OnceLock<Machine> = OnceLock::new();
    MACHINE.get_or_init(build_machine)
}

fn build_machine() -> Machine {
    // Inner nodes: children, depth, and whether the path to the node is all 1-bits.
    let mut tree: Vec<([Child; 2], u8, bool)> = vec![([Child::None; 2], 0, true)];
    for (symbol, &(code, len)) in CODES.iter().enumerate() {
        let mut node = 0usize;
        for i in (0..len).rev() {
            let bit = ((code >> i) & 1) as usize;
            if i == 0 {
                tree[node].0[bit] = Child::Leaf(symbol as u16);
                break;
            }
            node = match tree[node].0[bit] {
                Child::Node(n) => usize::from(n),
                // A leaf on the path cannot happen: the code is prefix-free (tested).
                Child::Leaf(_) => break,
                Child::None => {
                    let depth = tree[node].1 + 1;
                    let ones = tree[node].2 && bit == 1;
                    tree.push(([Child::None; 2], depth, ones));
                    let id = (tree.len() - 1) as u8;
                    tree[node].0[bit] = Child::Node(id);
                    usize::from(id)
                }
            };
        }
    }
    let mut steps = vec![[Step::default(); 16]; tree.len()];
    for (state, row) in steps.iter_mut().enumerate() {
        for (nibble, step) in row.iter_mut().enumerate() {
            let mut node = state;
            for i in (0..4).rev() {
                let bit = (nibble >> i) & 1;
                match tree[node].0[bit] {
                    Child::Node(n) => node = usize::from(n),
                    Child::Leaf(s) if s != EOS => {
                        step.symbol = s as u8;
                        step.flags |= EMIT;
                        node = 0;
                    }
                    Child::Leaf(_) | Child::None => {
                        step.flags |= FAIL;
                        break;
                    }
                }
            }
            step.next = node as u8;
        }
    }
    let accept = tree
        .iter()
        .enumerate()
        .map(|(i, &(_, depth, ones))| i == 0 || (ones && depth <= 7))
        .collect();
    Machine { steps, accept }
}

/// Appends the decoding of `input` to `out`.
pub(crate) fn decode(input: &[u8], out: &mut Vec<u8>) -> Result<(), HuffmanError> {
    let m = machine();
    out.reserve(input.len() * 8 / 5);
    let mut state = 0usize;
    for &byte in input {
        for nibble in [byte >> 4, byte & 0x0f] {
            let step = m.steps[state][usize::from(nibble)];
            if step.flags & FAIL != 0 {
                return Err(HuffmanError);
            }
            if step.flags & EMIT != 0 {
                out.push(step.symbol);
            }
            state = usize::from(step.next);
        }
    }
    if m.accept[state] {
        Ok(())
    } else {
        Err(HuffmanError)
    }
}

/// Huffman-codes `input`, padded with 1-bits (tests build inputs with it).
#[cfg(test)]
pub(crate) fn encode(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut acc: u64 = 0;
    let mut bits = 0u32;
    for &b in input {
        let (code, len) = CODES[usize::from(b)];
        acc = (acc << len) | u64::from(code);
        bits += u32::from(len);
        while bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    if bits > 0 {
        let pad = 8 - bits;
        out.push(((acc << pad) as u8) | ((1u8 << pad) - 1));
    }
    out
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

    fn dec(input: &[u8]) -> Result<Vec<u8>, HuffmanError> {
        let mut out = Vec::new();
        decode(input, &mut out).map(|()| out)
    }

    #[test]
    fn codes_match_rfc_rows() {
        // A sample of rows of RFC 7541 Appendix B, spread over all lengths.
        let rows: &[(u16, u32, u8)] = &[
            (0, 0x1ff8, 13),
            (1, 0x7fffd8, 23),
            (9, 0xffffea, 24),
            (10, 0x3ffffffc, 30),
            (32, 0x14, 6),
            (33, 0x3f8, 10),
            (48, 0x0, 5),
            (58, 0x5c, 7),
            (65, 0x21, 6),
            (92, 0x7fff0, 19),
            (97, 0x3, 5),
            (116, 0x9, 5),
            (122, 0x7b, 7),
            (124, 0x7fc, 11),
            (126, 0x1ffd, 13),
            (127, 0xffffffc, 28),
            (128, 0xfffe6, 20),
            (200, 0x3ffffe2, 26),
            (255, 0x3ffffee, 26),
            (256, 0x3fffffff, 30),
        ];
        for &(sym, code, len) in rows {
            assert_eq!(CODES[usize::from(sym)], (code, len), "symbol {sym}");
        }
    }

    #[test]
    fn code_is_complete_and_prefix_free() {
        assert!(CODES.iter().all(|&(_, len)| (5..=30).contains(&len)));
        // Kraft sum of exactly 1: every bit string is covered, no code is a prefix of another.
        let kraft: u64 = CODES.iter().map(|&(_, len)| 1u64 << (30 - len)).sum();
        assert_eq!(kraft, 1 << 30);
        let mut sorted: Vec<(u32, u8)> = CODES.to_vec();
        sorted.sort_by_key(|&(c, l)| (u64::from(c) << (32 - l), l));
        for w in sorted.windows(2) {
            let (a, la) = w[0];
            let (b, lb) = w[1];
            assert!(
                la > lb || (b >> (lb - la)) != a,
                "{a:x}/{la} prefixes {b:x}/{lb}"
            );
        }
    }

    #[test]
    fn rfc_examples_decode() {
        for (h, text) in [
            ("f1e3 c2e5 f23a 6ba0 ab90 f4ff", "www.example.com"),
            ("a8eb 1064 9cbf", "no-cache"),
            ("25a8 49e9 5ba9 7d7f", "custom-key"),
            ("25a8 49e9 5bb8 e8b4 bf", "custom-value"),
            ("6402", "302"),
            ("aec3 771a 4b", "private"),
            (
                "d07a be94 1054 d444 a820 0595 040b 8166 e082 a62d 1bff",
                "Mon, 21 Oct 2013 20:13:21 GMT",
            ),
            (
                "9d29 ad17 1863 c78f 0b97 c8e9 ae82 ae43 d3",
                "https://www.example.com",
            ),
            (
                "94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f 9587 3160 65c0 03ed 4ee5 b106 3d50 07",
                "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1",
            ),
        ] {
            assert_eq!(dec(&hex(h)).expect(text), text.as_bytes());
            assert_eq!(encode(text.as_bytes()), hex(h), "{text}");
        }
    }

    #[test]
    fn every_byte_round_trips() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(dec(&encode(&all)).expect("all bytes"), all);
        for b in 0..=255u8 {
            let s = [b, b'a', b, b];
            assert_eq!(dec(&encode(&s)).expect("byte"), s);
        }
        assert_eq!(dec(&[]).expect("empty"), b"");
    }

    #[test]
    fn invalid_strings_are_rejected() {
        // EOS coded explicitly (30 ones), then padding.
        assert!(dec(&[0xff, 0xff, 0xff, 0xff]).is_err());
        // Eight bits of padding is too much.
        let mut s = encode(b"a");
        s.push(0xff);
        assert!(dec(&s).is_err());
        // Padding that is not all ones: '0' is 00000, padded with 000.
        assert!(dec(&[0x00]).is_err());
        // A truncated code that is longer than seven bits.
        assert!(dec(&[0xff, 0xfe]).is_err());
    }
}
