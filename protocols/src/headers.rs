//! Header fields of one message head, held in one string: a head of twenty fields costs two
//! allocations instead of forty.

/// Header fields in order, names and values back to back in one string.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Headers {
    text: String,
    /// For each field, where its name ends and where its value ends in `text`.
    ends: Vec<(u32, u32)>,
}

impl Headers {
    /// Room for `fields` fields of `bytes` bytes of names and values in all.
    pub fn with_capacity(fields: usize, bytes: usize) -> Self {
        Headers {
            text: String::with_capacity(bytes),
            ends: Vec::with_capacity(fields),
        }
    }

    /// Appends a field.
    ///
    /// # Panics
    /// When the fields pass 4 GiB in all (heads are bounded far below that).
    pub fn push(&mut self, name: &str, value: &str) {
        self.text.push_str(name);
        let name_end = self.end();
        self.text.push_str(value);
        let value_end = self.end();
        self.ends.push((name_end, value_end));
    }

    /// Appends a field whose value is raw bytes: lossy UTF-8, cut to at most `max` bytes on a
    /// character boundary.
    pub fn push_lossy(&mut self, name: &str, value: &[u8], max: usize) {
        self.text.push_str(name);
        let name_end = self.end();
        let value = &value[..value.len().min(max)];
        match std::str::from_utf8(value) {
            Ok(v) => self.text.push_str(v),
            Err(_) => {
                let start = self.text.len();
                self.text.push_str(&String::from_utf8_lossy(value));
                // Replacement characters are longer than the bytes they replace.
                let mut cut = (start + max).min(self.text.len());
                while !self.text.is_char_boundary(cut) {
                    cut -= 1;
                }
                self.text.truncate(cut);
            }
        }
        let value_end = self.end();
        self.ends.push((name_end, value_end));
    }

    fn end(&self) -> u32 {
        u32::try_from(self.text.len()).expect("header fields pass 4 GiB")
    }

    /// Releases spare capacity, when there is any.
    pub fn shrink_to_fit(&mut self) {
        if self.text.capacity() > self.text.len() {
            self.text.shrink_to_fit();
        }
    }

    /// The value of the first field named `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The fields in order, as (name, value).
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &str)> + '_ {
        let mut start = 0;
        self.ends.iter().map(move |&(name_end, value_end)| {
            let (n, v) = (name_end as usize, value_end as usize);
            let field = (&self.text[start..n], &self.text[n..v]);
            start = v;
            field
        })
    }

    /// Number of fields.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// No fields.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.text.capacity() + self.ends.capacity() * std::mem::size_of::<(u32, u32)>()
    }
}

impl<K: AsRef<str>, V: AsRef<str>> FromIterator<(K, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut h = Headers::default();
        for (k, v) in iter {
            h.push(k.as_ref(), v.as_ref());
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_come_back_in_order_and_lookup_ignores_case() {
        let h: Headers = [
            ("Host", "a"),
            ("X-Empty", ""),
            ("host", "b"),
            ("Accept", "*/*"),
        ]
        .into_iter()
        .collect();
        assert_eq!(h.len(), 4);
        assert_eq!(
            h.iter().collect::<Vec<_>>(),
            [
                ("Host", "a"),
                ("X-Empty", ""),
                ("host", "b"),
                ("Accept", "*/*")
            ]
        );
        assert_eq!(h.get("HOST"), Some("a"));
        assert_eq!(h.get("x-empty"), Some(""));
        assert_eq!(h.get("missing"), None);
        assert!(Headers::default().is_empty());
    }

    #[test]
    fn lossy_values_are_cut_on_a_character_boundary() {
        let mut h = Headers::default();
        h.push_lossy("a", b"abcdef", 4);
        h.push_lossy("b", b"\xffxyz", 4);
        // "é" is two bytes: a cut after its first byte moves back before it.
        h.push_lossy("c", "xé".as_bytes(), 2);
        h.push_lossy("d", b"\xff\xfe", 4);
        let v: Vec<_> = h.iter().collect();
        assert_eq!(v[0], ("a", "abcd"));
        // One replacement character (3 bytes) and "x" fit in 4 bytes.
        assert_eq!(v[1], ("b", "\u{fffd}x"));
        assert_eq!(v[2], ("c", "x"));
        assert_eq!(v[3], ("d", "\u{fffd}"));
        assert!(v.iter().all(|(_, v)| v.len() <= 4));
    }
}
