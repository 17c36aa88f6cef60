//! Verifiable block content: the generator and checker shared by the memory
//! dirtier (4 KiB pages) and the disk job (blocks of any multiple of 8 bytes).
//!
//! # Block layout (little-endian)
//!
//! | offset | size | field                                        |
//! |--------|------|----------------------------------------------|
//! | 0      | 4    | magic `GWPG`                                 |
//! | 4      | 4    | block length in bytes                        |
//! | 8      | 8    | block index (page number / block number)     |
//! | 16     | 8    | generation (1 = first write; 0 = never)      |
//! | 24     | 8    | checksum of the payload                      |
//! | 32     | ..   | payload: PRNG stream seeded by (index, gen)  |
//!
//! The payload is a splitmix64 stream, so every block differs from every
//! other block and from its own earlier generations, and it does not
//! compress: a migration that ships stale, zeroed, swapped or deduplicated
//! pages is caught. Because the payload is a pure function of the header,
//! a block can be checked without any outside state (self-consistency),
//! and with the expected generation it is checked exactly.

/// Bytes of the block header.
pub const HEADER_LEN: usize = 32;

/// Size of a guest page; the memory dirtier's unit.
pub const PAGE_SIZE: usize = 4096;

/// `GWPG` in little-endian: marks a block written by this module.
pub const MAGIC: u32 = u32::from_le_bytes(*b"GWPG");

/// Why a block failed verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockFault {
    /// The buffer is shorter than a header or not a multiple of 8 bytes.
    #[error("block length {len} is not a multiple of 8 of at least {HEADER_LEN}")]
    BadLength {
        /// Buffer length.
        len: usize,
    },
    /// No magic: never written, zeroed, or overwritten by something else.
    #[error("bad magic {found:#010x}")]
    BadMagic {
        /// Magic found.
        found: u32,
    },
    /// The recorded block length differs from the buffer length.
    #[error("block records length {found}, expected {expected}")]
    WrongLength {
        /// Recorded length.
        found: u32,
        /// Buffer length.
        expected: usize,
    },
    /// The block belongs elsewhere (misplaced page or block).
    #[error("block records index {found}, expected {expected}")]
    WrongIndex {
        /// Index found.
        found: u64,
        /// Index expected.
        expected: u64,
    },
    /// The block is intact but stale (or from the future).
    #[error("block has generation {found}, expected {expected}")]
    WrongGeneration {
        /// Generation found.
        found: u64,
        /// Generation expected.
        expected: u64,
    },
    /// The recorded checksum does not match the payload.
    #[error("payload checksum mismatch")]
    BadChecksum,
    /// The payload differs from what the header says it should be.
    #[error("payload differs at byte {offset}")]
    BadPayload {
        /// First differing byte offset within the block.
        offset: usize,
    },
}

/// splitmix64 step: a fast, well-mixed 64-bit generator.
#[inline]
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Seed of the payload stream of block `index` at `generation`.
#[inline]
fn seed(index: u64, generation: u64) -> u64 {
    let mut s = index ^ generation.rotate_left(32) ^ u64::from(MAGIC);
    splitmix(&mut s) ^ generation
}

/// Running payload checksum (order-sensitive).
#[inline]
fn sum_step(acc: u64, word: u64) -> u64 {
    (acc ^ word)
        .wrapping_mul(0x0000_0100_0000_01B3)
        .rotate_left(5)
}

fn read_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn read_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

fn check_len(len: usize) -> Result<(), BlockFault> {
    if len < HEADER_LEN || len % 8 != 0 || u32::try_from(len).is_err() {
        return Err(BlockFault::BadLength { len });
    }
    Ok(())
}

/// Fill `buf` with the content of block `index` at `generation`.
///
/// # Panics
/// If `buf` is shorter than [`HEADER_LEN`] or not a multiple of 8 bytes:
/// callers use fixed page or block sizes, so this is a programming error.
pub fn fill(buf: &mut [u8], index: u64, generation: u64) {
    // Invariant: callers pass page- or block-sized buffers (checked by
    // DiskJob/MemRegion constructors).
    assert!(
        check_len(buf.len()).is_ok(),
        "bad block length {}",
        buf.len()
    );
    let mut state = seed(index, generation);
    let mut sum = 0u64;
    for chunk in buf[HEADER_LEN..].chunks_exact_mut(8) {
        let w = splitmix(&mut state);
        sum = sum_step(sum, w);
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    buf[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    // Fits: check_len verified the length fits in u32.
    let len = buf.len() as u32;
    buf[4..8].copy_from_slice(&len.to_le_bytes());
    buf[8..16].copy_from_slice(&index.to_le_bytes());
    buf[16..24].copy_from_slice(&generation.to_le_bytes());
    buf[24..32].copy_from_slice(&sum.to_le_bytes());
}

/// Check that `buf` holds block `index`; with `expected_generation`, also
/// that it is exactly that generation. Returns the generation found.
pub fn check(buf: &[u8], index: u64, expected_generation: Option<u64>) -> Result<u64, BlockFault> {
    check_len(buf.len())?;
    let magic = read_u32(buf, 0);
    if magic != MAGIC {
        return Err(BlockFault::BadMagic { found: magic });
    }
    let len = read_u32(buf, 4);
    if len as usize != buf.len() {
        return Err(BlockFault::WrongLength {
            found: len,
            expected: buf.len(),
        });
    }
    let found_index = read_u64(buf, 8);
    if found_index != index {
        return Err(BlockFault::WrongIndex {
            found: found_index,
            expected: index,
        });
    }
    let generation = read_u64(buf, 16);
    if let Some(expected) = expected_generation {
        if generation != expected {
            return Err(BlockFault::WrongGeneration {
                found: generation,
                expected,
            });
        }
    }
    let mut state = seed(index, generation);
    let mut sum = 0u64;
    for (i, chunk) in buf[HEADER_LEN..].chunks_exact(8).enumerate() {
        let w = splitmix(&mut state);
        sum = sum_step(sum, w);
        if read_u64(chunk, 0) != w {
            return Err(BlockFault::BadPayload {
                offset: HEADER_LEN + i * 8,
            });
        }
    }
    if read_u64(buf, 24) != sum {
        return Err(BlockFault::BadChecksum);
    }
    Ok(generation)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(index: u64, generation: u64) -> Vec<u8> {
        let mut b = vec![0u8; PAGE_SIZE];
        fill(&mut b, index, generation);
        b
    }

    #[test]
    fn fill_then_check() {
        for (i, g) in [(0, 1), (1, 1), (7, 99), (u64::MAX, u64::MAX)] {
            let b = page(i, g);
            assert_eq!(check(&b, i, Some(g)), Ok(g));
            assert_eq!(check(&b, i, None), Ok(g));
        }
        let mut small = vec![0u8; 64];
        fill(&mut small, 3, 4);
        assert_eq!(check(&small, 3, Some(4)), Ok(4));
        let mut big = vec![0u8; 1 << 20];
        fill(&mut big, 3, 4);
        assert_eq!(check(&big, 3, Some(4)), Ok(4));
    }

    #[test]
    fn detects_every_fault() {
        let b = page(5, 2);
        assert_eq!(
            check(&b, 6, Some(2)),
            Err(BlockFault::WrongIndex {
                found: 5,
                expected: 6
            })
        );
        assert_eq!(
            check(&b, 5, Some(3)),
            Err(BlockFault::WrongGeneration {
                found: 2,
                expected: 3
            })
        );
        assert_eq!(
            check(&vec![0u8; PAGE_SIZE], 0, None),
            Err(BlockFault::BadMagic { found: 0 })
        );
        assert!(matches!(
            check(&b[..64], 5, None),
            Err(BlockFault::WrongLength { .. })
        ));
        assert!(matches!(
            check(&b[..30], 5, None),
            Err(BlockFault::BadLength { .. })
        ));
        // A single flipped bit anywhere in the payload is caught.
        for off in [HEADER_LEN, 100, PAGE_SIZE - 1] {
            let mut c = b.clone();
            c[off] ^= 1;
            assert_eq!(
                check(&c, 5, Some(2)),
                Err(BlockFault::BadPayload { offset: off & !7 })
            );
        }
        let mut c = b.clone();
        c[24] ^= 1;
        assert_eq!(check(&c, 5, Some(2)), Err(BlockFault::BadChecksum));
    }

    #[test]
    fn pages_differ_and_do_not_repeat() {
        let a = page(1, 1);
        let b = page(2, 1);
        let c = page(1, 2);
        assert_ne!(a[HEADER_LEN..], b[HEADER_LEN..]);
        assert_ne!(a[HEADER_LEN..], c[HEADER_LEN..]);
        // No repeated 8-byte words within a page: nothing for a
        // compressor or a dedup pass to latch on to.
        let mut words: Vec<u64> = a[HEADER_LEN..]
            .chunks_exact(8)
            .map(|w| read_u64(w, 0))
            .collect();
        let n = words.len();
        words.sort_unstable();
        words.dedup();
        assert_eq!(words.len(), n);
        // Roughly uniform bytes.
        let ones: u32 = a[HEADER_LEN..].iter().map(|b| b.count_ones()).sum();
        let bits = ((PAGE_SIZE - HEADER_LEN) * 8) as f64;
        assert!((f64::from(ones) / bits - 0.5).abs() < 0.02);
    }
}
