//! Deltas of a re-sent page against the version sent before.
//!
//! The two versions are XORed; the result is mostly zero when a guest
//! changed a few words, so it is written as alternating runs: `varint
//! skip` (unchanged bytes), `varint len`, `len` XORed bytes, until the page
//! is covered. Like QEMU's XBZRLE, but the base is the version *the
//! destination agent* holds, so QEMU's own xbzrle cache stays off and the
//! batch compressor squeezes the delta further.

use bytes::BufMut;

use crate::qemu::PAGE_SIZE;
use crate::varint::{self, Reader};
use crate::CodecError;

/// Unchanged bytes shorter than this inside a changed stretch are carried
/// as literal bytes: a new run costs two varints.
const MIN_SKIP: usize = 3;

/// Encodes `new` against `old` into `out`; returns the bytes written, or
/// `None` (nothing written) when the delta would exceed `limit` bytes.
pub fn encode(old: &[u8], new: &[u8], limit: usize, out: &mut Vec<u8>) -> Option<usize> {
    debug_assert_eq!(old.len(), PAGE_SIZE);
    debug_assert_eq!(new.len(), PAGE_SIZE);
    let start = out.len();
    let mut i = 0;
    while i < PAGE_SIZE {
        // Skip equal bytes, a word at a time where possible.
        let skip_from = i;
        while i + 8 <= PAGE_SIZE && old[i..i + 8] == new[i..i + 8] {
            i += 8;
        }
        while i < PAGE_SIZE && old[i] == new[i] {
            i += 1;
        }
        if i == PAGE_SIZE {
            break;
        }
        let skip = i - skip_from;
        // Extend the changed stretch until MIN_SKIP equal bytes follow.
        let lit_from = i;
        let mut equal = 0;
        let mut j = i;
        while j < PAGE_SIZE && equal < MIN_SKIP {
            if old[j] == new[j] {
                equal += 1;
            } else {
                equal = 0;
            }
            j += 1;
        }
        let lit_to = if equal >= MIN_SKIP { j - equal } else { j };
        varint::put(out, skip as u64);
        varint::put(out, (lit_to - lit_from) as u64);
        for k in lit_from..lit_to {
            out.put_u8(old[k] ^ new[k]);
        }
        if out.len() - start > limit {
            out.truncate(start);
            return None;
        }
        i = lit_to;
    }
    Some(out.len() - start)
}

/// Applies a delta to `page` (the base), in place.
pub fn apply(page: &mut [u8], delta: &[u8]) -> Result<(), CodecError> {
    let mut r = Reader::new(delta);
    let mut at = 0usize;
    while r.remaining() > 0 {
        let skip = r.varint_max(PAGE_SIZE as u64, "delta skip beyond the page")? as usize;
        let len = r.varint_max(PAGE_SIZE as u64, "delta run beyond the page")? as usize;
        at += skip;
        if at + len > page.len() {
            return Err(CodecError::Malformed("delta beyond the page"));
        }
        for (p, x) in page[at..at + len].iter_mut().zip(r.bytes(len)?) {
            *p ^= x;
        }
        at += len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn page(seed: u8) -> Vec<u8> {
        (0..PAGE_SIZE)
            .map(|i| (i as u8).wrapping_mul(seed))
            .collect()
    }

    #[test]
    fn small_change_is_small() {
        let old = page(7);
        let mut new = old.clone();
        for k in 0..64 {
            new[1000 + k * 16] ^= 0x5a;
        }
        let mut d = Vec::new();
        let n = encode(&old, &new, PAGE_SIZE, &mut d).unwrap();
        assert!(n < 200, "{n}");
        let mut got = old.clone();
        apply(&mut got, &d).unwrap();
        assert_eq!(got, new);
    }

    #[test]
    fn identical_is_empty_and_limit_holds() {
        let old = page(3);
        let mut d = Vec::new();
        assert_eq!(encode(&old, &old, 10, &mut d), Some(0));
        assert_eq!(encode(&old, &page(5), 100, &mut d), None);
        assert!(d.is_empty());
    }

    proptest! {
        #[test]
        fn roundtrip(changes in proptest::collection::vec((0usize..PAGE_SIZE, any::<u8>()), 0..300)) {
            let old = page(11);
            let mut new = old.clone();
            for (at, v) in changes { new[at] = v; }
            let mut d = Vec::new();
            encode(&old, &new, usize::MAX, &mut d).unwrap();
            let mut got = old.clone();
            apply(&mut got, &d).unwrap();
            prop_assert_eq!(got, new);
        }

        #[test]
        fn apply_never_panics(delta: Vec<u8>) {
            let mut p = page(1);
            let _ = apply(&mut p, &delta);
        }
    }
}
