//! Disk chunks: guest pages equal to disk blocks the destination already
//! holds.
//!
//! A guest's page cache is full of pages equal to blocks of its disk, and
//! after storage relocation (or with a shared base image) the destination
//! has that disk. This module indexes chunks of such files by the
//! fingerprint of the chunk zero-padded to a page, without copying them;
//! a read goes back to the file and is verified like any other, so a file
//! that changed since it was indexed (the guest writes its disk) turns the
//! entry into a miss, never a wrong page.
//!
//! The index is not persisted: disks change while the agent is down, so the
//! agent re-indexes them at start.
//!
//! Memory: 32 B fingerprint + 16 B location per entry, plus the hash
//! table's control byte and slack (about 55–100 B per chunk in all).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use godwit_migstream::hash::is_zero;
use godwit_migstream::PageHash;

use crate::error::StoreError;

/// A guest page, and the largest disk chunk indexed.
pub const PAGE_BYTES: usize = 4096;
/// Bytes read at once when indexing a whole file: large reads keep
/// indexing at disk bandwidth; the buffer is freed when indexing ends.
pub const INDEX_READ_BYTES: usize = 1 << 20;

/// Where a disk chunk lives.
#[derive(Debug, Clone, Copy)]
struct DiskLoc {
    /// Index into [`DiskIndex::files`].
    file: u32,
    /// Chunk length (≤ [`PAGE_BYTES`]); the rest of the page is zeros.
    len: u16,
    /// Offset in the file.
    off: u64,
}

/// An indexed file, kept open for reads.
#[derive(Debug)]
struct DiskFile {
    path: PathBuf,
    file: File,
}

/// The outcome of a disk read.
#[derive(Debug)]
pub(crate) enum DiskRead {
    /// The chunk, verified and zero-padded to a page.
    Page(Bytes),
    /// The chunk was indexed but no longer matches (entry dropped).
    Stale,
    /// Not indexed.
    Absent,
}

/// The disk-chunk index.
#[derive(Debug, Default)]
pub(crate) struct DiskIndex {
    files: Vec<DiskFile>,
    map: HashMap<PageHash, DiskLoc>,
}

impl DiskIndex {
    /// Indexes the given chunks of `path`; returns how many were indexed
    /// (all-zero chunks are skipped: zero pages never need the store).
    pub(crate) fn index_chunks(
        &mut self,
        path: &Path,
        chunks: &[(u64, u32)],
    ) -> Result<usize, StoreError> {
        let fid = self.file_id(path)?;
        let f = &self.files[fid as usize].file;
        let mut page = vec![0u8; PAGE_BYTES];
        let mut n = 0;
        for &(off, len) in chunks {
            if len as usize > PAGE_BYTES {
                return Err(StoreError::BadChunk {
                    path: path.to_owned(),
                    offset: off,
                    len,
                    why: "longer than a page",
                });
            }
            page.fill(0);
            f.read_exact_at(&mut page[..len as usize], off)
                .map_err(StoreError::io("read disk chunk of", path))?;
            // len ≤ PAGE_BYTES was checked above, so it fits a u16.
            if insert(&mut self.map, fid, off, len as u16, &page) {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Indexes every page-aligned chunk of the whole file (the last one may
    /// be short); returns how many non-zero chunks were indexed.
    pub(crate) fn index_file(&mut self, path: &Path) -> Result<usize, StoreError> {
        let fid = self.file_id(path)?;
        let f = &self.files[fid as usize].file;
        let size = f
            .metadata()
            .map_err(StoreError::io("stat disk file", path))?
            .len();
        let mut buf = vec![0u8; INDEX_READ_BYTES];
        let mut page = vec![0u8; PAGE_BYTES];
        let mut n = 0;
        let mut pos = 0u64;
        while pos < size {
            let want = (size - pos).min(INDEX_READ_BYTES as u64) as usize;
            f.read_exact_at(&mut buf[..want], pos)
                .map_err(StoreError::io("read disk file", path))?;
            for (i, c) in buf[..want].chunks(PAGE_BYTES).enumerate() {
                page.fill(0);
                page[..c.len()].copy_from_slice(c);
                let off = pos + (i * PAGE_BYTES) as u64;
                // Chunks of PAGE_BYTES at most: the length fits a u16.
                if insert(&mut self.map, fid, off, c.len() as u16, &page) {
                    n += 1;
                }
            }
            pos += want as u64;
        }
        Ok(n)
    }

    /// Reads and verifies the chunk with fingerprint `h`.
    pub(crate) fn get(&mut self, h: &PageHash) -> DiskRead {
        let Some(loc) = self.map.get(h).copied() else {
            return DiskRead::Absent;
        };
        let df = &self.files[loc.file as usize];
        let mut page = vec![0u8; PAGE_BYTES];
        let ok = match df
            .file
            .read_exact_at(&mut page[..loc.len as usize], loc.off)
        {
            Ok(()) => PageHash::of(&page) == *h,
            Err(e) => {
                tracing::debug!(path = %df.path.display(), off = loc.off, cause = %e, "disk chunk unreadable");
                false
            }
        };
        if ok {
            DiskRead::Page(Bytes::from(page))
        } else {
            tracing::debug!(path = %df.path.display(), off = loc.off, "disk chunk changed since indexed");
            self.map.remove(h);
            DiskRead::Stale
        }
    }

    /// Whether `h` is indexed.
    pub(crate) fn contains(&self, h: &PageHash) -> bool {
        self.map.contains_key(h)
    }

    /// Indexed chunks.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// The indexed fingerprints.
    pub(crate) fn hashes(&self) -> impl Iterator<Item = &PageHash> {
        self.map.keys()
    }

    /// The id of `path`, opening it on first use. Re-indexing a path reuses
    /// its id but reopens it, so a replaced file is read afresh.
    fn file_id(&mut self, path: &Path) -> Result<u32, StoreError> {
        let file = File::open(path).map_err(StoreError::io("open disk file", path))?;
        if let Some(i) = self.files.iter().position(|f| f.path == path) {
            self.files[i].file = file;
            return Ok(i as u32);
        }
        self.files.push(DiskFile {
            path: path.to_owned(),
            file,
        });
        Ok((self.files.len() - 1) as u32)
    }
}

/// Records a zero-padded chunk under its fingerprint unless it is all
/// zeros; whether it was recorded.
fn insert(
    map: &mut HashMap<PageHash, DiskLoc>,
    file: u32,
    off: u64,
    len: u16,
    page: &[u8],
) -> bool {
    if is_zero(page) {
        return false;
    }
    map.insert(PageHash::of(page), DiskLoc { file, len, off });
    true
}
