//! A fast hasher for maps keyed by small plain values the agent makes itself (kernel socket
//! addresses, positions, thread ids, metric names): no protection from chosen keys is needed,
//! because the keys never come from the traced traffic's content.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

/// Builds [`Fx`] hashers.
pub type FxBuild = BuildHasherDefault<Fx>;

/// A hash map with [`Fx`] hashing.
pub type FastMap<K, V> = HashMap<K, V, FxBuild>;

/// The FxHash mixing function (as in rustc): a multiply per word.
#[derive(Default)]
pub struct Fx(u64);

impl std::hash::Hasher for Fx {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }
    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }
    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}
