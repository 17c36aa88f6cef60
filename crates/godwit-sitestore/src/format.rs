//! The store's on-disk formats, as pure functions over bytes and readers.
//!
//! # Segment record (`<n>.seg`, appended back to back)
//! | offset | size | field                                   |
//! |-------:|-----:|-----------------------------------------|
//! | 0      | 4    | [`RECORD_MAGIC`], little-endian         |
//! | 4      | 32   | BLAKE3-256 of the data (`PageHash`)     |
//! | 36     | 4    | data length, little-endian, ≤ [`MAX_RECORD_DATA`] |
//! | 40     | len  | data                                    |
//!
//! Records carry no checksum of their own: the fingerprint *is* the
//! checksum, checked on every read. A scan ([`scan_records`]) stops at the
//! first header that is short, has the wrong magic or an impossible length,
//! or whose data runs past the end of the file: that is where a crash tore
//! the tail, and the caller truncates there.
//!
//! # Sidecar index (`<n>.idx`, one per sealed segment)
//! | size      | field                                            |
//! |----------:|--------------------------------------------------|
//! | 4         | [`IDX_MAGIC`]                                    |
//! | 4         | [`IDX_VERSION`]                                  |
//! | 8         | length of the segment it describes               |
//! | 4         | entry count `n`                                  |
//! | 40 × n    | entries: hash 32 B, record offset u32, data len u32 |
//! | 32        | BLAKE3 of everything above                       |
//!
//! All integers little-endian. An index whose checksum, version or segment
//! length does not match is ignored and the segment rescanned: the index is
//! only a shortcut past reading sealed data on open.
//!
//! # Image manifest (`<vm>.img`)
//! Back-to-back 32-byte fingerprints; a torn trailing partial fingerprint
//! is ignored.

use std::io::{self, BufReader, Read, Seek, SeekFrom};

use godwit_migstream::PageHash;

/// First word of every record ("GWPG" read little-endian as bytes `g w p g`).
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"gwpg");
/// Bytes before a record's data: magic, fingerprint, length.
pub const RECORD_HEADER_LEN: usize = 40;
/// Largest data a record holds. Guest pages are 4 KiB; the limit leaves room
/// for huge-page-sized chunks later while keeping a garbage length found by
/// a scan from being trusted.
pub const MAX_RECORD_DATA: usize = 64 * 1024;
/// First word of a sidecar index ("gwix").
pub const IDX_MAGIC: u32 = u32::from_le_bytes(*b"gwix");
/// Version of the sidecar index format; any other is rescanned.
pub const IDX_VERSION: u32 = 1;
/// Sidecar index header: magic, version, segment length, count.
const IDX_HEADER_LEN: usize = 20;
/// One sidecar index entry: hash, offset, length.
const IDX_ENTRY_LEN: usize = 40;
/// The sidecar index trailer: its BLAKE3.
const IDX_TRAILER_LEN: usize = 32;
/// Read buffer of a segment scan: large reads keep a scan of a full segment
/// at disk bandwidth.
const SCAN_BUFFER_BYTES: usize = 1 << 20;

/// One record of a segment, as indexed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdxEntry {
    /// The record's fingerprint.
    pub hash: PageHash,
    /// The record's offset in its segment (its header's first byte).
    pub off: u32,
    /// The record's data length.
    pub len: u32,
}

/// A record header.
pub fn encode_header(hash: &PageHash, len: u32) -> [u8; RECORD_HEADER_LEN] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    h[4..36].copy_from_slice(&hash.0);
    h[36..40].copy_from_slice(&len.to_le_bytes());
    h
}

/// Parses a record header: `None` if the magic is wrong or the length is
/// over [`MAX_RECORD_DATA`].
pub fn parse_header(b: &[u8; RECORD_HEADER_LEN]) -> Option<(PageHash, u32)> {
    if le32(&b[..4]) != RECORD_MAGIC {
        return None;
    }
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&b[4..36]);
    let len = le32(&b[36..40]);
    if len as usize > MAX_RECORD_DATA {
        return None;
    }
    Some((PageHash(hash), len))
}

/// Scans the records of a segment of `file_len` bytes from its start.
/// Returns the complete records and the length of the valid prefix (where a
/// torn tail, if any, begins). Offsets past `u32::MAX` end the scan: the
/// store never writes them (segments are capped well below).
pub fn scan_records<R: Read + Seek>(reader: R, file_len: u64) -> io::Result<(Vec<IdxEntry>, u64)> {
    let mut r = BufReader::with_capacity(SCAN_BUFFER_BYTES, reader);
    r.seek(SeekFrom::Start(0))?;
    let mut out = Vec::new();
    let mut pos = 0u64;
    let mut hdr = [0u8; RECORD_HEADER_LEN];
    loop {
        if file_len - pos < RECORD_HEADER_LEN as u64 {
            break;
        }
        r.read_exact(&mut hdr)?;
        let Some((hash, len)) = parse_header(&hdr) else {
            break;
        };
        let end = pos + RECORD_HEADER_LEN as u64 + u64::from(len);
        if end > file_len {
            break;
        }
        let Ok(off) = u32::try_from(pos) else {
            break;
        };
        out.push(IdxEntry { hash, off, len });
        r.seek_relative(i64::from(len))?;
        pos = end;
    }
    Ok((out, pos))
}

/// The sidecar index of a sealed segment of `seg_len` bytes.
pub fn encode_idx(seg_len: u64, entries: &[IdxEntry]) -> Vec<u8> {
    let mut b = Vec::with_capacity(IDX_HEADER_LEN + entries.len() * IDX_ENTRY_LEN + 32);
    b.extend_from_slice(&IDX_MAGIC.to_le_bytes());
    b.extend_from_slice(&IDX_VERSION.to_le_bytes());
    b.extend_from_slice(&seg_len.to_le_bytes());
    // A sealed segment holds at most segment_bytes / 40 records, far below
    // u32::MAX with the segment size capped at 1 GiB.
    b.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        b.extend_from_slice(&e.hash.0);
        b.extend_from_slice(&e.off.to_le_bytes());
        b.extend_from_slice(&e.len.to_le_bytes());
    }
    let sum = *blake3::hash(&b).as_bytes();
    b.extend_from_slice(&sum);
    b
}

/// Decodes a sidecar index, checking it against the segment's actual
/// length. `None` for anything unexpected: the caller rescans.
pub fn decode_idx(b: &[u8], seg_len: u64) -> Option<Vec<IdxEntry>> {
    if b.len() < IDX_HEADER_LEN + IDX_TRAILER_LEN {
        return None;
    }
    let (body, sum) = b.split_at(b.len() - IDX_TRAILER_LEN);
    if blake3::hash(body).as_bytes() != sum {
        return None;
    }
    if le32(&body[0..4]) != IDX_MAGIC || le32(&body[4..8]) != IDX_VERSION {
        return None;
    }
    if le64(&body[8..16]) != seg_len {
        return None;
    }
    let n = le32(&body[16..20]) as usize;
    let entries = &body[IDX_HEADER_LEN..];
    if entries.len() != n.checked_mul(IDX_ENTRY_LEN)? {
        return None;
    }
    let mut out = Vec::with_capacity(n);
    for e in entries.chunks_exact(IDX_ENTRY_LEN) {
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&e[..32]);
        let off = le32(&e[32..36]);
        let len = le32(&e[36..40]);
        let end = u64::from(off) + RECORD_HEADER_LEN as u64 + u64::from(len);
        if len as usize > MAX_RECORD_DATA || end > seg_len {
            return None;
        }
        out.push(IdxEntry {
            hash: PageHash(hash),
            off,
            len,
        });
    }
    Some(out)
}

/// The fingerprints of a manifest's bytes (a torn trailing partial
/// fingerprint is ignored).
pub fn decode_manifest(b: &[u8]) -> impl Iterator<Item = PageHash> + '_ {
    b.chunks_exact(32).map(|c| {
        let mut h = [0u8; 32];
        h.copy_from_slice(c);
        PageHash(h)
    })
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Cursor;

    fn record(data: &[u8]) -> Vec<u8> {
        let mut v = encode_header(&PageHash::of(data), data.len() as u32).to_vec();
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn header_roundtrip_and_rejects() {
        let h = PageHash::of(b"x");
        let b = encode_header(&h, 4096);
        assert_eq!(parse_header(&b), Some((h, 4096)));
        let mut bad = b;
        bad[0] ^= 1;
        assert_eq!(parse_header(&bad), None);
        let too_long = encode_header(&h, MAX_RECORD_DATA as u32 + 1);
        assert_eq!(parse_header(&too_long), None);
    }

    #[test]
    fn idx_rejects_tampering_and_wrong_length() {
        let e = vec![IdxEntry {
            hash: PageHash::of(b"a"),
            off: 0,
            len: 1,
        }];
        let b = encode_idx(41, &e);
        assert_eq!(decode_idx(&b, 41), Some(e));
        assert_eq!(decode_idx(&b, 42), None, "segment length differs");
        for i in [0, 5, 12, 20, 60, b.len() - 1] {
            let mut t = b.clone();
            t[i] ^= 0x40;
            assert_eq!(decode_idx(&t, 41), None, "flip at {i}");
        }
        assert_eq!(decode_idx(&b[..b.len() - 1], 41), None);
        assert_eq!(decode_idx(&[], 41), None);
        // An entry pointing past the segment is refused even if checksummed.
        let past = encode_idx(
            10,
            &[IdxEntry {
                hash: PageHash::of(b"a"),
                off: 0,
                len: 1,
            }],
        );
        assert_eq!(decode_idx(&past, 10), None);
    }

    proptest! {
        /// Scanning any prefix of a log finds exactly the records that are
        /// complete in it, and the valid length is where they end.
        #[test]
        fn scan_finds_complete_records_of_any_prefix(
            pages in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..12),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut log = Vec::new();
            let mut ends = Vec::new();
            for p in &pages {
                log.extend_from_slice(&record(p));
                ends.push(log.len() as u64);
            }
            let cut = cut.index(log.len() + 1) as u64;
            let prefix = &log[..cut as usize];
            let (found, valid) = scan_records(Cursor::new(prefix), cut).unwrap();
            let complete = ends.iter().filter(|&&e| e <= cut).count();
            prop_assert_eq!(found.len(), complete);
            prop_assert_eq!(valid, if complete == 0 { 0 } else { ends[complete - 1] });
            for (e, p) in found.iter().zip(&pages) {
                prop_assert_eq!(e.hash, PageHash::of(p));
                prop_assert_eq!(e.len as usize, p.len());
            }
            let idx = encode_idx(valid, &found);
            prop_assert_eq!(decode_idx(&idx, valid), Some(found));
        }
    }
}
