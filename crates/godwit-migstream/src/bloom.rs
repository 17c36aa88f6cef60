//! Bloom filters over page fingerprints: how the destination tells the
//! source, in one message at the start, which pages it already holds.
//!
//! Fingerprints are uniform (BLAKE3), so the k probe positions come from
//! double hashing two 64-bit words of the fingerprint. A false positive
//! makes the source send a reference the destination cannot resolve; the
//! destination then asks for the page ([`crate::ops`] NEED/FILL), so a
//! false positive costs a round trip, never correctness. The filters are
//! sized for a 1-in-100 000 false-positive rate (≈ 24 bits per page).
//!
//! Why so low: every false positive stalls the destination's output for
//! one round trip (the stream is in order), and the source checks every
//! non-zero page of every pass against the filters. At 1 in 1000 a
//! memdirty migration at 260 ms one-way made 96 misses, 50 s of stalls;
//! the lower rate costs 1.7 times the summary bytes (3 MiB for a 1 Mi-page
//! store), sent once.

use crate::hash::PageHash;
use crate::CodecError;

/// Bits per entry for a 0.001 % false-positive rate (−ln(1e-5)/ln²2).
pub const BITS_PER_ENTRY: f64 = 23.96;
/// Probes per lookup for that rate (bits per entry × ln 2).
pub const PROBES: u8 = 17;
/// Largest filter accepted from a peer: 64 MiB (a 22-million-page store).
pub const MAX_BYTES: u64 = 64 << 20;

/// A Bloom filter.
#[derive(Clone, PartialEq, Eq)]
pub struct Bloom {
    bits: Vec<u64>,
    nbits: u64,
    k: u8,
}

impl std::fmt::Debug for Bloom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bloom")
            .field("nbits", &self.nbits)
            .field("k", &self.k)
            .finish()
    }
}

impl Bloom {
    /// An empty filter sized for `entries` pages.
    pub fn with_capacity(entries: usize) -> Self {
        let nbits = ((entries.max(64) as f64) * BITS_PER_ENTRY).ceil() as u64;
        let words = nbits.div_ceil(64);
        Bloom {
            bits: vec![0; words as usize],
            nbits: words * 64,
            k: PROBES,
        }
    }

    /// Rebuilds a filter from its parts, as sent by a peer.
    pub fn from_parts(k: u8, bytes: &[u8]) -> Result<Self, CodecError> {
        if k == 0 || k > 32 {
            return Err(CodecError::Malformed("bloom probe count"));
        }
        if bytes.is_empty() || bytes.len() % 8 != 0 || bytes.len() as u64 > MAX_BYTES {
            return Err(CodecError::Malformed("bloom size"));
        }
        let bits: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                u64::from_le_bytes(a)
            })
            .collect();
        Ok(Bloom {
            nbits: bits.len() as u64 * 64,
            bits,
            k,
        })
    }

    /// Probe count.
    pub fn probes(&self) -> u8 {
        self.k
    }

    /// The filter's bytes (little-endian words).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.bits.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    fn positions(&self, h: &PageHash) -> impl Iterator<Item = u64> + '_ {
        let a = h.prefix64();
        let b = h.second64() | 1;
        (0..self.k as u64).map(move |i| a.wrapping_add(i.wrapping_mul(b)) % self.nbits)
    }

    /// Adds a fingerprint.
    pub fn insert(&mut self, h: &PageHash) {
        let pos: Vec<u64> = self.positions(h).collect();
        for p in pos {
            self.bits[(p / 64) as usize] |= 1 << (p % 64);
        }
    }

    /// Whether the fingerprint may be present.
    pub fn contains(&self, h: &PageHash) -> bool {
        self.positions(h)
            .all(|p| self.bits[(p / 64) as usize] & (1 << (p % 64)) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_false_negatives_and_few_false_positives() {
        let n = 20_000u32;
        let mut b = Bloom::with_capacity(n as usize);
        for i in 0..n {
            b.insert(&PageHash::of(&i.to_le_bytes()));
        }
        for i in 0..n {
            assert!(b.contains(&PageHash::of(&i.to_le_bytes())));
        }
        let fp = (n..n + 100_000)
            .filter(|i| b.contains(&PageHash::of(&i.to_le_bytes())))
            .count();
        assert!(fp < 10, "{fp} false positives in 100000");
        let back = Bloom::from_parts(b.probes(), &b.to_bytes()).unwrap();
        assert_eq!(back, b);
    }

    #[test]
    fn rejects_bad_parts() {
        assert!(Bloom::from_parts(0, &[0; 8]).is_err());
        assert!(Bloom::from_parts(3, &[0; 7]).is_err());
        assert!(Bloom::from_parts(3, &[]).is_err());
    }
}
