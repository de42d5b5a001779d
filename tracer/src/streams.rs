//! Byte-stream assembly: turns one direction's data events into contiguous bytes plus marked gaps.
//!
//! The kernel numbers every event with its offset in the connection's stream, so lost events
//! (ring buffer full) and truncated copies both become explicit gaps that the parser resynchronises
//! after, instead of gluing unrelated bytes together.

/// What the assembler hands on for one event, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece<'a> {
    /// Bytes contiguous with what came before.
    Data(&'a [u8]),
    /// This many bytes were transferred but are not available.
    Gap(u64),
}

/// The pieces of one event: at most a gap, data and a gap, held without an allocation.
#[derive(Debug)]
pub struct Pieces<'a> {
    items: [Piece<'a>; 3],
    len: usize,
}

impl<'a> Pieces<'a> {
    fn new() -> Self {
        Pieces {
            items: [Piece::Gap(0); 3],
            len: 0,
        }
    }

    fn push(&mut self, p: Piece<'a>) {
        self.items[self.len] = p;
        self.len += 1;
    }
}

impl<'a> IntoIterator for Pieces<'a> {
    type Item = Piece<'a>;
    type IntoIter = std::iter::Take<std::array::IntoIter<Piece<'a>, 3>>;

    fn into_iter(self) -> Self::IntoIter {
        self.items.into_iter().take(self.len)
    }
}

/// Why an event was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stale {
    /// The event starts before bytes already handed on (duplicate or reordered).
    Overlap,
}

/// Assembly state of one direction of one connection.
#[derive(Debug, Default, Clone)]
pub struct Assembler {
    /// Stream offset of the next byte expected.
    next: Option<u64>,
}

impl Assembler {
    /// Stream offset of the next byte expected, once an event was accepted.
    pub fn expected(&self) -> Option<u64> {
        self.next
    }

    /// Accepts an event that transferred `bytes` starting at `offset`, of which `payload` (a prefix)
    /// was captured, and yields the pieces to feed in order.
    pub fn accept<'a>(
        &mut self,
        offset: u64,
        bytes: u64,
        payload: &'a [u8],
    ) -> Result<Pieces<'a>, Stale> {
        let mut out = Pieces::new();
        let expected = self.next.unwrap_or(offset);
        if offset < expected {
            return Err(Stale::Overlap);
        }
        if offset > expected {
            out.push(Piece::Gap(offset - expected));
        }
        let captured = payload.len().min(bytes as usize);
        if captured > 0 {
            out.push(Piece::Data(&payload[..captured]));
        }
        if bytes > captured as u64 {
            out.push(Piece::Gap(bytes - captured as u64));
        }
        self.next = Some(offset + bytes);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(
        a: &mut Assembler,
        offset: u64,
        bytes: u64,
        payload: &[u8],
    ) -> Result<Vec<String>, Stale> {
        let out = a.accept(offset, bytes, payload)?;
        Ok(out
            .into_iter()
            .map(|p| match p {
                Piece::Data(d) => format!("data:{}", String::from_utf8_lossy(d)),
                Piece::Gap(n) => format!("gap:{n}"),
            })
            .collect())
    }

    #[test]
    fn contiguous_events_pass_through() {
        let mut a = Assembler::default();
        assert_eq!(run(&mut a, 0, 3, b"abc"), Ok(vec!["data:abc".to_string()]));
        assert_eq!(run(&mut a, 3, 2, b"de"), Ok(vec!["data:de".to_string()]));
    }

    #[test]
    fn truncated_copy_becomes_gap_after_data() {
        let mut a = Assembler::default();
        assert_eq!(
            run(&mut a, 0, 10, b"abcd"),
            Ok(vec!["data:abcd".into(), "gap:6".into()])
        );
        assert_eq!(run(&mut a, 10, 1, b"z"), Ok(vec!["data:z".into()]));
    }

    #[test]
    fn lost_event_becomes_gap_before_data() {
        let mut a = Assembler::default();
        run(&mut a, 0, 3, b"abc").expect("first");
        assert_eq!(
            run(&mut a, 8, 2, b"xy"),
            Ok(vec!["gap:5".into(), "data:xy".into()])
        );
    }

    #[test]
    fn first_event_mid_stream_starts_there_and_overlap_is_rejected() {
        let mut a = Assembler::default();
        assert_eq!(run(&mut a, 100, 2, b"ab"), Ok(vec!["data:ab".into()]));
        assert_eq!(run(&mut a, 50, 2, b"zz"), Err(Stale::Overlap));
        assert_eq!(run(&mut a, 102, 0, b""), Ok(vec![]));
    }
}
