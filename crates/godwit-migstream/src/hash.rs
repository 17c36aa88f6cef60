//! Page fingerprints.
//!
//! Every non-zero page is named by its BLAKE3-256 digest. The choice is
//! deliberate: a reference the destination resolves to the wrong page is
//! silent guest corruption, and the site store is shared by every VM that
//! migrates into a site, so a guest could try to plant a page colliding
//! with another VM's. A non-cryptographic 128-bit hash (xxh3, ~10× faster)
//! offers no defence against a crafted collision; BLAKE3 does, at about
//! 0.4 CPU-seconds per GiB of non-zero pages on one core, within the
//! sender's CPU budget. Zero pages are never hashed.

/// A page fingerprint.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageHash(pub [u8; 32]);

impl PageHash {
    /// The fingerprint of `page`.
    pub fn of(page: &[u8]) -> Self {
        PageHash(*blake3::hash(page).as_bytes())
    }

    /// The first 8 bytes as an integer (uniform: for filters and maps).
    pub fn prefix64(&self) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&self.0[..8]);
        u64::from_le_bytes(a)
    }

    /// Bytes 8..16 as an integer (independent of [`Self::prefix64`]).
    pub fn second64(&self) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&self.0[8..16]);
        u64::from_le_bytes(a)
    }
}

impl std::fmt::Debug for PageHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…")
    }
}

/// Whether every byte of `page` is zero.
pub fn is_zero(page: &[u8]) -> bool {
    let (pre, words, post) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only splits the
        // slice at alignment boundaries.
        unsafe { page.align_to::<u64>() }
    };
    pre.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}
