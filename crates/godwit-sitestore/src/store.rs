//! [`SiteStore`]: the segment log, its in-memory index, verified reads,
//! pins and eviction.
//!
//! # Log
//! Pages are appended to the *active* segment `seg/<n>.seg` through a write
//! buffer of [`WRITE_BUFFER_BYTES`]; nothing is synced per page, because a
//! page lost or torn in a crash is only a miss: every read is verified, and
//! on open the active segment is scanned and a torn tail truncated. When the
//! next record would take the active segment past
//! [`StoreConfig::segment_bytes`], it is *sealed*: flushed, synced, and given
//! a sidecar index `seg/<n>.idx` (written to a temporary, synced, renamed),
//! so that opening the store reads only indexes, not sealed data. A missing
//! or unusable index makes `open` rescan that segment and rewrite it.
//!
//! # Index
//! `HashMap<PageHash, Loc>`: 32 B of fingerprint and 12 B of location
//! (segment, offset, length and the second-chance bit) per page, plus the
//! table's control byte and slack: about 50–100 B per page stored, so a
//! 100 GiB store (≈ 25 M pages) costs 1.3–2.5 GiB of RAM. A page is stored
//! once: putting a fingerprint already held costs nothing.
//!
//! # Bound and eviction
//! [`StoreConfig::max_bytes`] bounds the segment files' total size *between*
//! migrations. [`SiteStore::evict_to_bound`] drops whole segments, oldest
//! first, with a second chance: entries read (or put again) since they were
//! written are copied to the active segment, with their bit cleared, before
//! their old segment is deleted. While any [`Pin`] is alive nothing is
//! evicted: a migration in flight relies on the pages it was told exist and
//! on its own pages as reference and delta bases, so the store may then
//! exceed its bound by what migrations put.

use std::collections::{hash_map, BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use godwit_migstream::bloom::Bloom;
use godwit_migstream::{PageHash, PageStore};
use tracing::{debug, info, warn};

use crate::disk::{DiskIndex, DiskRead};
use crate::error::StoreError;
use crate::format::{
    decode_idx, encode_header, encode_idx, parse_header, scan_records, IdxEntry, MAX_RECORD_DATA,
    RECORD_HEADER_LEN,
};
use crate::image;

/// Default segment size: large enough that sealing (one sync and one index
/// write) is rare, small enough that eviction frees space in fine steps.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
/// Smallest segment size accepted (tests use segments of a few pages).
pub const MIN_SEGMENT_BYTES: u64 = 4096;
/// Largest segment size accepted: record offsets are stored as `u32`.
pub const MAX_SEGMENT_BYTES: u64 = 1 << 30;
/// Default bound on the store's size.
pub const DEFAULT_MAX_BYTES: u64 = 16 << 30;
/// Bytes buffered before they are written to the active segment: amortises
/// the write syscall over ~250 pages; a crash loses at most this much.
pub const WRITE_BUFFER_BYTES: usize = 1 << 20;
/// Sealed segments kept open for reads. Far below the usual 1024-descriptor
/// limit even with many segments; a miss in this cache costs one `open`.
pub const MAX_OPEN_SEGMENTS: usize = 64;

/// Sizing of a [`SiteStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreConfig {
    /// Bound on the segment files' total size between migrations.
    pub max_bytes: u64,
    /// Size at which the active segment is sealed
    /// ([`MIN_SEGMENT_BYTES`]..=[`MAX_SEGMENT_BYTES`]).
    pub segment_bytes: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_bytes: DEFAULT_MAX_BYTES,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
        }
    }
}

impl StoreConfig {
    /// The default configuration bounded at `max_bytes`.
    pub fn with_max_bytes(max_bytes: u64) -> Self {
        StoreConfig {
            max_bytes,
            ..StoreConfig::default()
        }
    }

    fn validate(&self) -> Result<(), StoreError> {
        if !(MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES).contains(&self.segment_bytes) {
            return Err(StoreError::Config(format!(
                "segment_bytes {} is outside {MIN_SEGMENT_BYTES}..={MAX_SEGMENT_BYTES}",
                self.segment_bytes
            )));
        }
        Ok(())
    }
}

/// Counters and sizes of a [`SiteStore`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Pages in the segment log's index.
    pub pages: u64,
    /// Total size of the segment files (what `max_bytes` bounds).
    pub bytes: u64,
    /// Segment files, the active one included.
    pub segments: u64,
    /// Disk chunks indexed.
    pub disk_chunks: u64,
    /// Reads that returned a verified page (store or disk).
    pub hits: u64,
    /// Reads that returned nothing.
    pub misses: u64,
    /// Store entries dropped because their bytes failed verification or
    /// could not be read.
    pub corrupt: u64,
    /// Disk-chunk entries dropped because the file changed since indexing
    /// (expected: guests write their disks; not corruption).
    pub disk_stale: u64,
    /// Pages dropped by eviction.
    pub evicted_pages: u64,
    /// Record bytes (header included) of the pages dropped by eviction.
    pub evicted_bytes: u64,
}

/// Second-chance bit, kept in the top bit of [`Loc::len`] (lengths are at
/// most [`MAX_RECORD_DATA`], far below it).
const HIT_BIT: u32 = 1 << 31;

/// Where a page's record lives.
#[derive(Debug, Clone, Copy)]
struct Loc {
    seg: u32,
    /// Offset of the record's header in the segment.
    off: u32,
    /// Data length, with [`HIT_BIT`].
    len: u32,
}

impl Loc {
    fn new(seg: u32, off: u32, len: u32) -> Self {
        Loc { seg, off, len }
    }
    fn len(self) -> u32 {
        self.len & !HIT_BIT
    }
    fn hit(self) -> bool {
        self.len & HIT_BIT != 0
    }
    fn record_bytes(self) -> u64 {
        RECORD_HEADER_LEN as u64 + u64::from(self.len())
    }
}

/// Holds off eviction while alive (one per migration in flight).
///
/// Not `Clone`: each migration takes its own. Dropping it releases it.
#[derive(Debug)]
pub struct Pin {
    count: Arc<AtomicUsize>,
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The segment being appended to.
#[derive(Debug)]
struct Active {
    id: u32,
    file: File,
    /// Bytes already written to the file.
    flushed: u64,
    /// Bytes appended after `flushed`, not yet written.
    pending: Vec<u8>,
    /// Every record in the segment, for its sidecar index when sealed.
    entries: Vec<IdxEntry>,
}

impl Active {
    fn create(seg_dir: &Path, id: u32) -> Result<Self, StoreError> {
        let path = seg_path(seg_dir, id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(StoreError::io("create segment", &path))?;
        Ok(Active {
            id,
            file,
            flushed: 0,
            pending: Vec::new(),
            entries: Vec::new(),
        })
    }

    fn len(&self) -> u64 {
        self.flushed + self.pending.len() as u64
    }
}

/// The site's persistent, bounded, content-addressed page store.
pub struct SiteStore {
    seg_dir: PathBuf,
    img_dir: PathBuf,
    cfg: StoreConfig,
    index: HashMap<PageHash, Loc>,
    /// Sealed segments and their lengths, oldest first.
    sealed: BTreeMap<u32, u64>,
    sealed_bytes: u64,
    active: Active,
    readers: HashMap<u32, File>,
    disk: DiskIndex,
    pins: Arc<AtomicUsize>,
    /// Counters (the size fields are filled in by [`SiteStore::stats`]).
    counters: StoreStats,
}

impl std::fmt::Debug for SiteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteStore")
            .field("seg_dir", &self.seg_dir)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl SiteStore {
    /// Opens (or creates) the store in `dir`: reads the sealed segments'
    /// indexes (rescanning any segment whose index is missing or unusable),
    /// scans the active segment and truncates a torn tail.
    pub fn open(dir: &Path, cfg: StoreConfig) -> Result<SiteStore, StoreError> {
        cfg.validate()?;
        let seg_dir = dir.join("seg");
        let img_dir = dir.join("img");
        for d in [&seg_dir, &img_dir] {
            fs::create_dir_all(d).map_err(StoreError::io("create directory", d))?;
        }

        let (ids, idx_ids) = list_segments(&seg_dir)?;
        let mut index = HashMap::new();
        let mut sealed = BTreeMap::new();
        let mut sealed_bytes = 0;
        let mut active = None;
        let last = ids.last().copied();
        for &id in &ids {
            let path = seg_path(&seg_dir, id);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(StoreError::io("open segment", &path))?;
            let len = file
                .metadata()
                .map_err(StoreError::io("stat segment", &path))?
                .len();
            let ipath = idx_path(&seg_dir, id);
            let from_idx = match fs::read(&ipath) {
                Ok(b) => {
                    let e = decode_idx(&b, len);
                    if e.is_none() {
                        warn!(path = %ipath.display(), "sidecar index unusable; rescanning its segment");
                    }
                    e
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    if Some(id) != last {
                        warn!(path = %ipath.display(), "sidecar index missing; rescanning its segment");
                    }
                    None
                }
                Err(e) => {
                    warn!(path = %ipath.display(), cause = %e, "sidecar index unreadable; rescanning its segment");
                    None
                }
            };
            let entries = match from_idx {
                Some(entries) => {
                    sealed.insert(id, len);
                    sealed_bytes += len;
                    entries
                }
                None => {
                    let (entries, valid) =
                        scan_records(&file, len).map_err(StoreError::io("scan segment", &path))?;
                    if valid < len {
                        warn!(path = %path.display(), valid, len, "truncating torn segment tail");
                        file.set_len(valid)
                            .map_err(StoreError::io("truncate segment", &path))?;
                    }
                    if Some(id) == last {
                        active = Some(Active {
                            id,
                            file,
                            flushed: valid,
                            pending: Vec::new(),
                            entries: entries.clone(),
                        });
                    } else if valid == 0 {
                        remove_if_exists(&path)?;
                        remove_if_exists(&ipath)?;
                        continue;
                    } else {
                        file.sync_data()
                            .map_err(StoreError::io("sync segment", &path))?;
                        write_idx(&seg_dir, id, valid, &entries)?;
                        sealed.insert(id, valid);
                        sealed_bytes += valid;
                    }
                    entries
                }
            };
            // Oldest first, so where a page is held twice (a second-chance
            // copy whose old segment outlived a crash) the newest copy wins.
            for e in entries {
                index.insert(e.hash, Loc::new(id, e.off, e.len));
            }
        }
        for id in idx_ids.difference(&ids.iter().copied().collect()) {
            remove_if_exists(&idx_path(&seg_dir, *id))?;
        }
        let active = match active {
            Some(a) => a,
            None => {
                let id = match last {
                    None => 0,
                    Some(l) => l.checked_add(1).ok_or_else(|| {
                        StoreError::Config("segment numbers exhausted".to_owned())
                    })?,
                };
                let a = Active::create(&seg_dir, id)?;
                sync_dir(&seg_dir)?;
                a
            }
        };
        let store = SiteStore {
            seg_dir,
            img_dir,
            cfg,
            index,
            sealed,
            sealed_bytes,
            active,
            readers: HashMap::new(),
            disk: DiskIndex::default(),
            pins: Arc::new(AtomicUsize::new(0)),
            counters: StoreStats::default(),
        };
        info!(
            dir = %dir.display(),
            pages = store.index.len(),
            bytes = store.bytes(),
            segments = store.sealed.len() + 1,
            "site store opened"
        );
        Ok(store)
    }

    /// The page with fingerprint `h`, verified; `None` if not held or if the
    /// bytes read do not hash to `h` (the entry is then dropped and counted
    /// in [`StoreStats::corrupt`] or [`StoreStats::disk_stale`]).
    pub fn get(&mut self, h: &PageHash) -> Option<Bytes> {
        if let Some(loc) = self.index.get(h).copied() {
            match self.read_verified(h, loc) {
                Ok(Some(page)) => {
                    if let Some(l) = self.index.get_mut(h) {
                        l.len |= HIT_BIT;
                    }
                    self.counters.hits += 1;
                    return Some(page);
                }
                Ok(None) => {
                    warn!(hash = ?h, seg = loc.seg, off = loc.off, "stored page failed verification; dropped");
                }
                Err(e) => {
                    warn!(hash = ?h, seg = loc.seg, off = loc.off, cause = %e, "stored page unreadable; dropped");
                }
            }
            self.index.remove(h);
            self.counters.corrupt += 1;
        }
        match self.disk.get(h) {
            DiskRead::Page(p) => {
                self.counters.hits += 1;
                Some(p)
            }
            DiskRead::Stale => {
                self.counters.disk_stale += 1;
                self.counters.misses += 1;
                None
            }
            DiskRead::Absent => {
                self.counters.misses += 1;
                None
            }
        }
    }

    /// Keeps `page` under fingerprint `h`. A fingerprint already stored
    /// costs nothing (it only earns its entry a second chance). The
    /// fingerprint is checked in debug builds only: the decoder has already
    /// checked it, and every read verifies it again.
    pub fn put(&mut self, h: &PageHash, page: &[u8]) -> Result<(), StoreError> {
        if page.len() > MAX_RECORD_DATA {
            return Err(StoreError::PageTooLarge {
                len: page.len(),
                max: MAX_RECORD_DATA,
            });
        }
        if cfg!(debug_assertions) && PageHash::of(page) != *h {
            return Err(StoreError::HashMismatch {
                hash: format!("{h:?}"),
            });
        }
        if let Some(l) = self.index.get_mut(h) {
            l.len |= HIT_BIT;
            return Ok(());
        }
        let loc = self.append(h, page)?;
        self.index.insert(*h, loc);
        Ok(())
    }

    /// Writes buffered records and syncs the active segment.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        self.flush_pending()?;
        self.active.file.sync_data().map_err(StoreError::io(
            "sync segment",
            seg_path(&self.seg_dir, self.active.id),
        ))
    }

    /// Evicts whole segments, oldest first, until the store is within
    /// [`StoreConfig::max_bytes`]; entries read or put again since they
    /// were written are copied forward once (second chance). Does nothing
    /// while a [`Pin`] is alive. Returns the bytes freed on disk (net of the
    /// copies).
    pub fn evict_to_bound(&mut self) -> Result<u64, StoreError> {
        if self.pinned() {
            debug!(
                pins = self.pins.load(Ordering::SeqCst),
                "eviction deferred: store pinned"
            );
            return Ok(0);
        }
        let before = self.bytes();
        // Terminates: a round either frees a victim's bytes outright or
        // copies its second-chance entries with the bit cleared, so each
        // round lowers the number of marked entries or the total size.
        while self.bytes() > self.cfg.max_bytes {
            if self.sealed.is_empty() {
                if self.active.len() == 0 {
                    break;
                }
                self.seal_active()?;
            }
            let excess = self.bytes() - self.cfg.max_bytes;
            let mut victims = Vec::new();
            let mut freed = 0;
            for (&id, &len) in &self.sealed {
                if freed >= excess {
                    break;
                }
                victims.push(id);
                freed += len;
            }
            self.evict_segments(&victims)?;
        }
        let freed = before.saturating_sub(self.bytes());
        if freed > 0 {
            info!(freed, bytes = self.bytes(), "site store evicted to bound");
        }
        Ok(freed)
    }

    /// Starts a new manifest for `vm`'s image, replacing any earlier one
    /// (call when the VM starts migrating out of this site).
    pub fn begin_image(&mut self, vm: &str) -> Result<(), StoreError> {
        image::begin(&self.img_dir, vm)
    }

    /// Appends fingerprints to `vm`'s image manifest, creating it if
    /// needed (call [`SiteStore::begin_image`] first to replace an earlier
    /// image). Not synced: a manifest lost in a crash only costs bandwidth.
    pub fn record_image(&mut self, vm: &str, hashes: &[PageHash]) -> Result<(), StoreError> {
        image::append(&self.img_dir, vm, hashes)
    }

    /// Indexes chunks `(file offset, length ≤ 4096)` of the disk file
    /// `path`, zero-padded to a page, without copying them. Returns how many
    /// were indexed: all-zero chunks are skipped (zero pages never need the
    /// store). Not persisted: the agent re-indexes at start.
    pub fn index_disk_chunks(
        &mut self,
        path: &Path,
        chunks: &[(u64, u32)],
    ) -> Result<usize, StoreError> {
        self.disk.index_chunks(path, chunks)
    }

    /// Indexes every 4096-aligned chunk of the disk file `path` (a short
    /// last chunk is zero-padded; all-zero chunks are skipped). Returns how
    /// many were indexed.
    pub fn index_disk_file(&mut self, path: &Path) -> Result<usize, StoreError> {
        self.disk.index_file(path)
    }

    /// Takes a pin: nothing is evicted while it lives.
    pub fn pin(&self) -> Pin {
        self.pins.fetch_add(1, Ordering::SeqCst);
        Pin {
            count: Arc::clone(&self.pins),
        }
    }

    /// Whether any [`Pin`] is alive.
    pub fn pinned(&self) -> bool {
        self.pins.load(Ordering::SeqCst) > 0
    }

    /// Whether the page `h` is held (in the log or as an indexed disk
    /// chunk). Not verified: a `get` may still miss.
    pub fn contains(&self, h: &PageHash) -> bool {
        self.index.contains_key(h) || self.disk.contains(h)
    }

    /// A Bloom filter of every page in the log (summary kind `Store`).
    pub fn summary(&self) -> Bloom {
        bloom_of(self.index.len(), self.index.keys())
    }

    /// A Bloom filter of the fingerprints in `vm`'s image manifest that the
    /// store still holds (summary kind `Image`); `None` if `vm` has no
    /// manifest (or its name is invalid, or it cannot be read: logged).
    pub fn image_summary(&self, vm: &str) -> Option<Bloom> {
        let hashes = match image::read(&self.img_dir, vm) {
            Ok(h) => h?,
            Err(e) => {
                warn!(vm, cause = %e, "no image summary");
                return None;
            }
        };
        let held: HashSet<&PageHash> = hashes.iter().filter(|h| self.contains(h)).collect();
        Some(bloom_of(held.len(), held.into_iter()))
    }

    /// A Bloom filter of the indexed disk chunks (summary kind `Disk`).
    pub fn disk_summary(&self) -> Bloom {
        bloom_of(self.disk.len(), self.disk.hashes())
    }

    /// Counters and sizes.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            pages: self.index.len() as u64,
            bytes: self.bytes(),
            segments: self.sealed.len() as u64 + 1,
            disk_chunks: self.disk.len() as u64,
            ..self.counters.clone()
        }
    }

    /// The configuration.
    pub fn config(&self) -> StoreConfig {
        self.cfg
    }

    /// Total size of the segment files, buffered bytes included.
    fn bytes(&self) -> u64 {
        self.sealed_bytes + self.active.len()
    }

    /// Appends a record to the active segment, sealing it first if the
    /// record would take it past the segment size.
    fn append(&mut self, h: &PageHash, data: &[u8]) -> Result<Loc, StoreError> {
        let rec = RECORD_HEADER_LEN as u64 + data.len() as u64;
        if self.active.len() > 0 && self.active.len() + rec > self.cfg.segment_bytes {
            self.seal_active()?;
        }
        // The active segment stays below segment_bytes ≤ MAX_SEGMENT_BYTES
        // (1 GiB) before an append, so the offset fits; data.len() was
        // checked against MAX_RECORD_DATA by the callers.
        let off = self.active.len() as u32;
        let len = data.len() as u32;
        self.active
            .pending
            .extend_from_slice(&encode_header(h, len));
        self.active.pending.extend_from_slice(data);
        self.active.entries.push(IdxEntry { hash: *h, off, len });
        if self.active.pending.len() >= WRITE_BUFFER_BYTES {
            self.flush_pending()?;
        }
        Ok(Loc::new(self.active.id, off, len))
    }

    /// Writes the buffered records. On failure they stay buffered: the
    /// write is positional, so a retry rewrites the same bytes in place.
    fn flush_pending(&mut self) -> Result<(), StoreError> {
        let a = &mut self.active;
        if a.pending.is_empty() {
            return Ok(());
        }
        a.file
            .write_all_at(&a.pending, a.flushed)
            .map_err(StoreError::io(
                "write segment",
                seg_path(&self.seg_dir, a.id),
            ))?;
        a.flushed += a.pending.len() as u64;
        a.pending.clear();
        Ok(())
    }

    /// Seals the active segment (flush, sync, sidecar index) and starts the
    /// next one.
    fn seal_active(&mut self) -> Result<(), StoreError> {
        self.flush_pending()?;
        let id = self.active.id;
        let path = seg_path(&self.seg_dir, id);
        self.active
            .file
            .sync_data()
            .map_err(StoreError::io("sync segment", &path))?;
        let len = self.active.flushed;
        write_idx(&self.seg_dir, id, len, &self.active.entries)?;
        let next = id
            .checked_add(1)
            .ok_or_else(|| StoreError::Config("segment numbers exhausted".to_owned()))?;
        self.active = Active::create(&self.seg_dir, next)?;
        sync_dir(&self.seg_dir)?;
        self.sealed.insert(id, len);
        self.sealed_bytes += len;
        debug!(seg = id, bytes = len, "segment sealed");
        Ok(())
    }

    /// Drops the sealed segments `victims`, copying their second-chance
    /// entries forward first.
    fn evict_segments(&mut self, victims: &[u32]) -> Result<(), StoreError> {
        let set: HashSet<u32> = victims.iter().copied().collect();
        let mut copy = Vec::new();
        let mut dropped = 0u64;
        let counters = &mut self.counters;
        self.index.retain(|h, loc| {
            if !set.contains(&loc.seg) {
                return true;
            }
            if loc.hit() {
                copy.push((*h, *loc));
                return true;
            }
            counters.evicted_pages += 1;
            counters.evicted_bytes += loc.record_bytes();
            dropped += 1;
            false
        });
        let copied = copy.len();
        for (h, loc) in copy {
            match self.read_verified(&h, loc) {
                Ok(Some(page)) => {
                    // A fresh Loc: the copy starts without the bit.
                    let new = self.append(&h, &page)?;
                    self.index.insert(h, new);
                }
                Ok(None) | Err(_) => {
                    warn!(hash = ?h, seg = loc.seg, "page failed verification while copied forward; dropped");
                    self.index.remove(&h);
                    self.counters.corrupt += 1;
                }
            }
        }
        // The copies must be on disk before their old segments go.
        self.flush()?;
        for &id in victims {
            self.readers.remove(&id);
            remove_if_exists(&idx_path(&self.seg_dir, id))?;
            remove_if_exists(&seg_path(&self.seg_dir, id))?;
            if let Some(len) = self.sealed.remove(&id) {
                self.sealed_bytes -= len;
            }
        }
        sync_dir(&self.seg_dir)?;
        debug!(segments = ?victims, dropped, copied, "segments evicted");
        Ok(())
    }

    /// Reads the record at `loc` and checks it is the page `h`: header
    /// magic, fingerprint and length, and BLAKE3 of the data. `Ok(None)`
    /// when it is not.
    fn read_verified(&mut self, h: &PageHash, loc: Loc) -> io::Result<Option<Bytes>> {
        let rec = self.read_record(loc)?;
        let mut hdr = [0u8; RECORD_HEADER_LEN];
        hdr.copy_from_slice(&rec[..RECORD_HEADER_LEN]);
        let ok = match parse_header(&hdr) {
            Some((hh, len)) => {
                hh == *h && len == loc.len() && PageHash::of(&rec[RECORD_HEADER_LEN..]) == *h
            }
            None => false,
        };
        Ok(ok.then(|| Bytes::from(rec).slice(RECORD_HEADER_LEN..)))
    }

    /// The raw bytes (header included) of the record at `loc`.
    fn read_record(&mut self, loc: Loc) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; loc.record_bytes() as usize];
        let off = u64::from(loc.off);
        if loc.seg == self.active.id {
            let a = &self.active;
            if off >= a.flushed {
                let start = (off - a.flushed) as usize;
                let src = a.pending.get(start..start + buf.len()).ok_or_else(|| {
                    io::Error::new(ErrorKind::UnexpectedEof, "record past the write buffer")
                })?;
                buf.copy_from_slice(src);
            } else {
                a.file.read_exact_at(&mut buf, off)?;
            }
        } else {
            self.reader(loc.seg)?.read_exact_at(&mut buf, off)?;
        }
        Ok(buf)
    }

    /// A read handle on sealed segment `seg`, from the bounded cache.
    fn reader(&mut self, seg: u32) -> io::Result<&File> {
        if !self.readers.contains_key(&seg) && self.readers.len() >= MAX_OPEN_SEGMENTS {
            // Any victim will do: the cache only saves an open().
            if let Some(&k) = self.readers.keys().next() {
                self.readers.remove(&k);
            }
        }
        Ok(match self.readers.entry(seg) {
            hash_map::Entry::Occupied(o) => o.into_mut(),
            hash_map::Entry::Vacant(v) => v.insert(File::open(seg_path(&self.seg_dir, seg))?),
        })
    }
}

impl Drop for SiteStore {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            warn!(cause = %e, "site store: final flush failed");
        }
    }
}

impl PageStore for SiteStore {
    fn get(&mut self, h: &PageHash) -> Option<Bytes> {
        SiteStore::get(self, h)
    }
    fn put(&mut self, h: &PageHash, page: &Bytes) -> Result<(), String> {
        SiteStore::put(self, h, page).map_err(|e| e.to_string())
    }
}

fn bloom_of<'a>(n: usize, hashes: impl Iterator<Item = &'a PageHash>) -> Bloom {
    let mut b = Bloom::with_capacity(n);
    for h in hashes {
        b.insert(h);
    }
    b
}

fn seg_path(seg_dir: &Path, id: u32) -> PathBuf {
    seg_dir.join(format!("{id}.seg"))
}

fn idx_path(seg_dir: &Path, id: u32) -> PathBuf {
    seg_dir.join(format!("{id}.idx"))
}

/// The segment and sidecar-index numbers in `seg_dir`, after removing
/// leftover temporaries. Names that are not canonical numbers are ignored.
fn list_segments(seg_dir: &Path) -> Result<(Vec<u32>, HashSet<u32>), StoreError> {
    let mut segs = Vec::new();
    let mut idxs = HashSet::new();
    let rd = fs::read_dir(seg_dir).map_err(StoreError::io("list", seg_dir))?;
    for ent in rd {
        let ent = ent.map_err(StoreError::io("list", seg_dir))?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(".tmp") {
            remove_if_exists(&ent.path())?;
            continue;
        }
        let (stem, is_seg) = if let Some(s) = name.strip_suffix(".seg") {
            (s, true)
        } else if let Some(s) = name.strip_suffix(".idx") {
            (s, false)
        } else {
            continue;
        };
        match stem.parse::<u32>() {
            Ok(n) if n.to_string() == stem => {
                if is_seg {
                    segs.push(n);
                } else {
                    idxs.insert(n);
                }
            }
            _ => warn!(name, "ignoring unexpected file in segment directory"),
        }
    }
    segs.sort_unstable();
    Ok((segs, idxs))
}

/// Writes a sidecar index atomically: temporary, sync, rename, sync dir.
fn write_idx(
    seg_dir: &Path,
    id: u32,
    seg_len: u64,
    entries: &[IdxEntry],
) -> Result<(), StoreError> {
    let tmp = seg_dir.join(format!("{id}.idx.tmp"));
    let path = idx_path(seg_dir, id);
    let mut f = File::create(&tmp).map_err(StoreError::io("create index", &tmp))?;
    f.write_all(&encode_idx(seg_len, entries))
        .map_err(StoreError::io("write index", &tmp))?;
    f.sync_all().map_err(StoreError::io("sync index", &tmp))?;
    fs::rename(&tmp, &path).map_err(StoreError::io("rename index into", &path))?;
    sync_dir(seg_dir)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io("sync directory", dir))
}

fn remove_if_exists(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::io("remove", path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Record size of a 4 KiB page.
    const REC: u64 = RECORD_HEADER_LEN as u64 + 4096;

    /// A distinct non-zero 4 KiB page per `i`.
    fn page(i: u32) -> Vec<u8> {
        let mut out = vec![0u8; 4096];
        let mut x = blake3::Hasher::new();
        x.update(&i.to_le_bytes());
        x.finalize_xof().fill(&mut out);
        out
    }

    fn cfg(max_bytes: u64, pages_per_seg: u64) -> StoreConfig {
        StoreConfig {
            max_bytes,
            segment_bytes: pages_per_seg * REC,
        }
    }

    fn put_pages(s: &mut SiteStore, range: std::ops::Range<u32>) {
        for i in range {
            let p = page(i);
            s.put(&PageHash::of(&p), &p).unwrap();
        }
    }

    fn has(s: &mut SiteStore, i: u32) -> bool {
        let p = page(i);
        s.get(&PageHash::of(&p)).as_deref() == Some(&p[..])
    }

    fn seg_files(dir: &Path, ext: &str) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(dir.join("seg"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == ext))
            .collect();
        v.sort_by_key(|p| {
            p.file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<u32>().ok())
        });
        v
    }

    fn flip_byte(path: &Path, at: u64) {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        b[0] ^= 0x01;
        f.write_all_at(&b, at).unwrap();
    }

    #[test]
    fn roundtrip_across_reopen_and_segments() {
        let d = tempfile::tempdir().unwrap();
        let mut s = SiteStore::open(d.path(), cfg(u64::MAX, 4)).unwrap();
        put_pages(&mut s, 0..30);
        // Readable before any flush (from the write buffer) ...
        assert!((0..30).all(|i| has(&mut s, i)));
        let st = s.stats();
        assert_eq!(st.pages, 30);
        assert_eq!(st.segments, 8, "4 pages per segment: 7 sealed + active");
        assert_eq!(st.bytes, 30 * REC);
        assert_eq!(seg_files(d.path(), "idx").len(), 7);
        drop(s);
        // ... and after reopening.
        let mut s = SiteStore::open(d.path(), cfg(u64::MAX, 4)).unwrap();
        assert_eq!(s.stats().pages, 30);
        assert_eq!(s.stats().bytes, 30 * REC);
        assert!((0..30).all(|i| has(&mut s, i)));
        assert!(!has(&mut s, 30));
        let st = s.stats();
        assert_eq!((st.hits, st.misses, st.corrupt), (30, 1, 0));
        // Appending continues in the reopened active segment.
        put_pages(&mut s, 30..33);
        drop(s);
        let mut s = SiteStore::open(d.path(), cfg(u64::MAX, 4)).unwrap();
        assert!((0..33).all(|i| has(&mut s, i)));
    }

    #[test]
    fn dedup_costs_nothing() {
        let d = tempfile::tempdir().unwrap();
        let mut s = SiteStore::open(d.path(), cfg(u64::MAX, 4)).unwrap();
        put_pages(&mut s, 0..3);
        let before = s.stats();
        put_pages(&mut s, 0..3);
        put_pages(&mut s, 1..2);
        assert_eq!(s.stats(), before);
        assert_eq!(before.pages, 3);
        assert_eq!(before.bytes, 3 * REC);
    }

    #[test]
    fn odd_sizes_and_limits() {
        let d = tempfile::tempdir().unwrap();
        let mut s = SiteStore::open(d.path(), cfg(u64::MAX, 4)).unwrap();
        for data in [vec![], vec![7u8; 1], vec![9u8; MAX_RECORD_DATA]] {
            s.put(&PageHash::of(&data), &data).unwrap();
            assert_eq!(s.get(&PageHash::of(&data)).as_deref(), Some(&data[..]));
        }
        let big = vec![1u8; MAX_RECORD_DATA + 1];
        assert!(matches!(
            s.put(&PageHash::of(&big), &big),
            Err(StoreError::PageTooLarge { .. })
        ));
        assert!(matches!(
            SiteStore::open(d.path(), cfg(u64::MAX, 0)),
            Err(StoreError::Config(_))
        ));
    }

    #[cfg(debug_assertions)]
    #[test]
    fn debug_put_checks_fingerprint() {
        let d = tempfile::tempdir().unwrap();
        let mut s = SiteStore::open(d.path(), cfg(u64::MAX, 4)).unwrap();
        let err = s.put(&PageHash::of(&page(1)), &page(2)).unwrap_err();
        assert!(matches!(err, StoreError::HashMismatch { .. }));
        assert_eq!(s.stats().pages, 0);
    }

    #[test]
    fn torn_tail_is_truncated_and_complete_records_kept() {
        let d = tempfile::tempdir().unwrap();
        let mut s = SiteStore::open(d.path(), cfg(u64::MAX, 8)).unwrap();
        put_pages(&mut s, 0..11); // 8 sealed + 3 in the active segment
        drop(s);
        let active = seg_files(d.path(), "seg").pop().unwrap();
        assert_eq!(fs::metadata(&active).unwrap().len(), 3 * REC);
        // Tear the third record of the active segment in its data.
        let f = OpenOptions::new().write(true).open(&active).unwrap();
        f.set_len(2 * REC + 100).unwrap();
        drop(f);
        let mut s = SiteStore::open(d.path(), cfg(u64::MAX, 8)).unwrap();
        assert_eq!(fs::metadata(&active).unwrap().len(), 2 * REC);
        assert_eq!(s.stats().pages, 10);
        assert!((0..10).all(|i| has(&mut s, i)));
        assert!(!has(&mut s, 10));
        assert_eq!(s.stats().corrupt, 0);
        // The log continues cleanly after the cut.
        put_pages(&mut s, 10..12);
        drop(s);
        let mut s = SiteStore::open(d.path(), cfg(u64::MAX, 8)).unwrap();
        assert!((0..12).all(|i| has(&mut s, i)));
    }

    #[test]
    fn torn_header_is_truncated() {
        let d = tempfile::tempdir().unwrap();
        let mut s = SiteStore::open(d.path(), cfg(u64::MAX, 8)).unwrap();
        put_pages(&mut s, 0..2);
        drop(s);
        let active = seg_files(d.path(), "seg").pop().unwrap();
        // A crash left garbage where a third header should start.
        let f = OpenOptions::new().write(true).open(&active).unwrap();
        f.write_all_at(&[0xAB; 17], 2 * REC).unwrap();
        drop(f);
        let mut s = SiteStore::open(d.path(), cfg(u64::MAX, 8)).unwrap();
        assert_eq!(fs::metadata(&active).unwrap().len(), 2 * REC);
        assert!((0..2).all(|i| has(&mut s, i)));
    }

    #[test]
    fn corrupted_data_is_never_returned() {
        let d = tempfile::tempdir().unwrap();
        let mut s = SiteStore::open(d.path(), cfg(u64::MAX, 4)).unwrap();
        put_pages(&mut s, 0..6); // segment 0 sealed (0..4), 4..6 active
        s.flush().unwrap();
        let segs = seg_files(d.path(), "seg");
        // Page 1's data, in the sealed segment; page 5's, in the active one
        // (already flushed to the file).
        flip_byte(&segs[0], REC + RECORD_HEADER_LEN as u64 + 1000);
        flip_byte(&segs[1], REC + RECORD_HEADER_LEN as u64);
        // And page 2's header fingerprint.
        flip_byte(&segs[0], 2 * REC + 10);
        for i in [1, 5, 2] {
            let h = PageHash::of(&page(i));
            assert!(s.contains(&h));
            assert_eq!(s.get(&h), None, "page {i}");
            assert!(!s.contains(&h), "dropped after failing verification");
        }
        assert_eq!(s.stats().corrupt, 3);
        assert_eq!(s.stats().pages, 3);
        assert!([0, 3, 4].iter().all(|&i| has(&mut s, i)));
        // A page dropped as corrupt can be put again, and wins on reopen.
        put_pages(&mut s, 1..2);
        assert!(has(&mut s, 1));
        drop(s);
        let mut s = SiteStore::open(d.path(), cfg(u64::MAX, 4)).unwrap();
        assert!(has(&mut s, 1));
        assert!(!has(&mut s, 5));
    }

    #[test]
    fn missing_or_corrupt_idx_is_rescanned() {
        let d = tempfile::tempdir().unwrap();
        let mut s = SiteStore::open(d.path(), cfg(u64::MAX, 4)).unwrap();
        put_pages(&mut s, 0..14); // segments 0, 1, 2 sealed
        drop(s);
        let idx = seg_files(d.path(), "idx");
        assert_eq!(idx.len(), 3);
        let good = fs::read(&idx[2]).unwrap();
        fs::remove_file(&idx[0]).unwrap();
        flip_byte(&idx[1], 30);
        // An index describing a different length (segment changed behind it).
        let segs = seg_files(d.path(), "seg");
        let mut other = good.clone();
        other[8] ^= 1;
        fs::write(&idx[2], &other).unwrap();
        fs::write(d.path().join("seg/99.idx"), b"orphan").unwrap();
        fs::write(d.path().join("seg/1.idx.tmp"), b"leftover").unwrap();
        let mut s = SiteStore::open(d.path(), cfg(u64::MAX, 4)).unwrap();
        assert_eq!(s.stats().pages, 14);
        assert!((0..14).all(|i| has(&mut s, i)));
        // Rewritten, valid, and the leftovers gone.
        for (i, p) in idx.iter().enumerate() {
            let len = fs::metadata(&segs[i]).unwrap().len();
            let e = decode_idx(&fs::read(p).unwrap(), len).unwrap();
            assert_eq!(e.len(), 4);
        }
        assert_eq!(fs::read(&idx[2]).unwrap(), good);
        assert!(!d.path().join("seg/99.idx").exists());
        assert!(!d.path().join("seg/1.idx.tmp").exists());
    }

    #[test]
    fn eviction_respects_pins_and_bound() {
        let d = tempfile::tempdir().unwrap();
        let max = 8 * REC;
        let mut s = SiteStore::open(d.path(), cfg(max, 4)).unwrap();
        put_pages(&mut s, 0..20);
        let pin = s.pin();
        let pin2 = s.pin();
        assert!(s.pinned());
        assert_eq!(s.evict_to_bound().unwrap(), 0);
        assert_eq!(s.stats().bytes, 20 * REC, "nothing evicted while pinned");
        drop(pin);
        assert_eq!(s.evict_to_bound().unwrap(), 0, "one pin still alive");
        drop(pin2);
        assert!(!s.pinned());
        let freed = s.evict_to_bound().unwrap();
        let st = s.stats();
        assert!(st.bytes <= max, "{} > {max}", st.bytes);
        assert_eq!(freed, 20 * REC - st.bytes);
        assert_eq!(st.evicted_pages, 20 - st.pages);
        assert_eq!(st.evicted_bytes, (20 - st.pages) * REC);
        // Oldest first: what is left is the newest pages.
        assert!((20 - st.pages as u32..20).all(|i| has(&mut s, i)));
        assert!(!has(&mut s, 0));
        // Within the bound, eviction is a no-op.
        assert_eq!(s.evict_to_bound().unwrap(), 0);
        // And the result survives a reopen.
        drop(s);
        let s = SiteStore::open(d.path(), cfg(max, 4)).unwrap();
        assert_eq!(s.stats().pages, st.pages);
        assert_eq!(s.stats().bytes, st.bytes);
    }

    #[test]
    fn eviction_gives_hit_entries_a_second_chance() {
        let d = tempfile::tempdir().unwrap();
        let max = 8 * REC;
        let mut s = SiteStore::open(d.path(), cfg(max, 4)).unwrap();
        put_pages(&mut s, 0..20);
        // Pages 0 and 5 (old segments 0 and 1) are in use; 9 is put again.
        assert!(has(&mut s, 0) && has(&mut s, 5));
        put_pages(&mut s, 9..10);
        s.evict_to_bound().unwrap();
        let st = s.stats();
        assert!(st.bytes <= max, "{} > {max}", st.bytes);
        for i in [0, 5, 9] {
            assert!(has(&mut s, i), "hit page {i} kept");
        }
        assert!(!has(&mut s, 1) && !has(&mut s, 6));
        // Second chance only: not read again, they go on a later eviction.
        put_pages(&mut s, 100..120);
        s.evict_to_bound().unwrap();
        // Pages 0/5/9 were read again just above, so they survive once more…
        assert!(has(&mut s, 0));
        put_pages(&mut s, 200..240);
        // …but a page not read since its last copy does not.
        s.evict_to_bound().unwrap();
        s.evict_to_bound().unwrap();
        let p5 = PageHash::of(&page(5));
        assert!(!s.contains(&p5));
        assert!(s.stats().bytes <= max);
        assert_eq!(s.stats().corrupt, 0);
    }

    #[test]
    fn eviction_with_everything_hot_terminates_under_bound() {
        let d = tempfile::tempdir().unwrap();
        let mut s = SiteStore::open(d.path(), cfg(2 * REC, 4)).unwrap();
        put_pages(&mut s, 0..10);
        assert!((0..10).all(|i| has(&mut s, i)));
        s.evict_to_bound().unwrap();
        assert!(s.stats().bytes <= 2 * REC);
        // A bound of zero empties the store.
        let d = tempfile::tempdir().unwrap();
        let mut s = SiteStore::open(d.path(), cfg(0, 4)).unwrap();
        put_pages(&mut s, 0..3);
        assert!((0..3).all(|i| has(&mut s, i)));
        s.evict_to_bound().unwrap();
        assert_eq!(s.stats().bytes, 0);
        assert_eq!(s.stats().pages, 0);
    }

    #[test]
    fn index_entry_size_is_as_documented() {
        assert_eq!(std::mem::size_of::<(PageHash, Loc)>(), 44);
    }

    #[test]
    fn pin_is_send() {
        fn send<T: Send>(_: T) {}
        let d = tempfile::tempdir().unwrap();
        let s = SiteStore::open(d.path(), StoreConfig::default()).unwrap();
        let p = s.pin();
        assert!(s.pinned());
        std::thread::spawn(move || send(p)).join().unwrap();
        assert!(!s.pinned());
    }

    #[test]
    fn image_manifest_roundtrip_and_summary_of_held_pages() {
        let d = tempfile::tempdir().unwrap();
        let mut s = SiteStore::open(d.path(), cfg(u64::MAX, 4)).unwrap();
        put_pages(&mut s, 0..10);
        let held: Vec<PageHash> = (0..10).map(|i| PageHash::of(&page(i))).collect();
        let gone: Vec<PageHash> = (50..60).map(|i| PageHash::of(&page(i))).collect();
        assert!(s.image_summary("vm1").is_none());
        s.begin_image("vm1").unwrap();
        s.record_image("vm1", &held[..5]).unwrap();
        s.record_image("vm1", &gone).unwrap();
        drop(s);
        let mut s = SiteStore::open(d.path(), cfg(u64::MAX, 4)).unwrap();
        let b = s.image_summary("vm1").unwrap();
        assert!(held[..5].iter().all(|h| b.contains(h)));
        assert!(!held[5..].iter().any(|h| b.contains(h)), "not in manifest");
        assert!(!gone.iter().any(|h| b.contains(h)), "in manifest, not held");
        // A new image replaces the old one.
        s.begin_image("vm1").unwrap();
        s.record_image("vm1", &held[7..]).unwrap();
        let b = s.image_summary("vm1").unwrap();
        assert!(held[7..].iter().all(|h| b.contains(h)));
        assert!(!held[..5].iter().any(|h| b.contains(h)));
        // Store-wide summary.
        let all = s.summary();
        assert!(held.iter().all(|h| all.contains(h)));
        assert!(!gone.iter().any(|h| all.contains(h)));
    }

    #[test]
    fn vm_names_are_sanitised() {
        let d = tempfile::tempdir().unwrap();
        let mut s = SiteStore::open(d.path(), StoreConfig::default()).unwrap();
        for bad in ["../escape", "a/b", "", "x\0y", ".."] {
            assert!(matches!(
                s.record_image(bad, &[]),
                Err(StoreError::BadVmName { .. })
            ));
            assert!(s.begin_image(bad).is_err());
            assert!(s.image_summary(bad).is_none());
        }
        assert!(!d.path().join("escape.img").exists());
        s.record_image("ok-vm.1", &[]).unwrap();
        assert!(d.path().join("img/ok-vm.1.img").exists());
    }

    #[test]
    fn disk_chunks_are_verified_against_the_file() {
        let d = tempfile::tempdir().unwrap();
        let disk = d.path().join("disk.raw");
        // Chunks: page(1), zeros, page(2), then a 100-byte tail.
        let mut content = page(1);
        content.extend_from_slice(&[0u8; 4096]);
        content.extend_from_slice(&page(2));
        content.extend_from_slice(&page(3)[..100]);
        fs::write(&disk, &content).unwrap();
        let mut s = SiteStore::open(&d.path().join("store"), StoreConfig::default()).unwrap();
        assert_eq!(s.index_disk_file(&disk).unwrap(), 3, "zero chunk skipped");
        assert_eq!(s.stats().disk_chunks, 3);
        assert_eq!(s.stats().pages, 0, "nothing copied into the log");
        let mut tail = page(3)[..100].to_vec();
        tail.resize(4096, 0);
        let (h1, h2, ht) = (
            PageHash::of(&page(1)),
            PageHash::of(&page(2)),
            PageHash::of(&tail),
        );
        assert!(!s.contains(&PageHash::of(&[0u8; 4096])));
        assert_eq!(s.get(&h1).as_deref(), Some(&page(1)[..]));
        assert_eq!(s.get(&ht).as_deref(), Some(&tail[..]), "zero-padded");
        let sum = s.disk_summary();
        assert!([h1, h2, ht].iter().all(|h| sum.contains(h)));
        assert!(!s.summary().contains(&h1), "disk chunks are not in Store");
        // The guest writes its disk: the chunk no longer matches.
        flip_byte(&disk, 2 * 4096 + 7);
        assert_eq!(s.get(&h2), None);
        assert!(!s.contains(&h2));
        assert_eq!(s.stats().disk_stale, 1);
        assert_eq!(s.stats().corrupt, 0);
        // Truncated under the index: a miss too.
        let f = OpenOptions::new().write(true).open(&disk).unwrap();
        f.set_len(50).unwrap();
        drop(f);
        assert_eq!(s.get(&ht), None);
        assert_eq!(s.stats().disk_stale, 2);
    }

    #[test]
    fn explicit_disk_chunks() {
        let d = tempfile::tempdir().unwrap();
        let disk = d.path().join("disk.raw");
        let mut content = vec![0u8; 512];
        content.extend_from_slice(&page(4));
        fs::write(&disk, &content).unwrap();
        let mut s = SiteStore::open(&d.path().join("store"), StoreConfig::default()).unwrap();
        // An unaligned full chunk, a short one, a zero one.
        let n = s
            .index_disk_chunks(&disk, &[(512, 4096), (512, 10), (0, 512)])
            .unwrap();
        assert_eq!(n, 2);
        assert_eq!(
            s.get(&PageHash::of(&page(4))).as_deref(),
            Some(&page(4)[..])
        );
        let mut short = page(4)[..10].to_vec();
        short.resize(4096, 0);
        assert_eq!(s.get(&PageHash::of(&short)).as_deref(), Some(&short[..]));
        assert!(matches!(
            s.index_disk_chunks(&disk, &[(0, 4097)]),
            Err(StoreError::BadChunk { .. })
        ));
        assert!(matches!(
            s.index_disk_chunks(&disk, &[(content.len() as u64, 1)]),
            Err(StoreError::Io { .. })
        ));
        // A stored copy is preferred, and survives the disk changing.
        let p = page(4);
        s.put(&PageHash::of(&p), &p).unwrap();
        fs::write(&disk, b"changed").unwrap();
        assert_eq!(s.get(&PageHash::of(&p)).as_deref(), Some(&p[..]));
    }

    #[test]
    fn works_as_the_decoders_page_store() {
        let d = tempfile::tempdir().unwrap();
        let s = SiteStore::open(d.path(), StoreConfig::default()).unwrap();
        let mut ps: Box<dyn PageStore> = Box::new(s);
        let p = Bytes::from(page(7));
        let h = PageHash::of(&p);
        ps.put(&h, &p).unwrap();
        assert_eq!(ps.get(&h), Some(p));
        let err = ps.put(&h, &Bytes::from(vec![1u8; MAX_RECORD_DATA + 1]));
        assert!(err.unwrap_err().contains("exceeds"));
    }

    /// Many pages through a realistic configuration (no timing asserted):
    /// exercises the write buffer boundary and sealing at the default size.
    #[test]
    fn many_pages_through_the_write_buffer() {
        let d = tempfile::tempdir().unwrap();
        let c = StoreConfig {
            max_bytes: u64::MAX,
            segment_bytes: 4 << 20,
        };
        let mut s = SiteStore::open(d.path(), c).unwrap();
        let n = 3000;
        put_pages(&mut s, 0..n);
        assert!((0..n).step_by(7).all(|i| has(&mut s, i)));
        drop(s);
        let mut s = SiteStore::open(d.path(), c).unwrap();
        assert_eq!(s.stats().pages, u64::from(n));
        assert!((0..n).all(|i| has(&mut s, i)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Any sequence of puts (with repeats), reopened at any point,
        /// keeps every page readable, byte for byte.
        #[test]
        fn prop_roundtrip_with_reopens(
            ops in proptest::collection::vec((0u32..40, any::<bool>()), 1..80),
            per_seg in 1u64..6,
        ) {
            let d = tempfile::tempdir().unwrap();
            let c = cfg(u64::MAX, per_seg);
            let mut s = SiteStore::open(d.path(), c).unwrap();
            let mut put = std::collections::BTreeSet::new();
            for (i, reopen) in ops {
                put_pages(&mut s, i..i + 1);
                put.insert(i);
                if reopen {
                    drop(s);
                    s = SiteStore::open(d.path(), c).unwrap();
                }
            }
            prop_assert_eq!(s.stats().pages, put.len() as u64);
            prop_assert_eq!(s.stats().bytes, put.len() as u64 * REC);
            for &i in &put {
                prop_assert!(has(&mut s, i));
            }
        }

        /// Eviction always ends within the bound (unpinned), never returns
        /// a wrong page, and keeps the newest segment's pages.
        #[test]
        fn prop_eviction_bounds(
            n in 1u32..60,
            reads in proptest::collection::vec(0u32..60, 0..30),
            max_pages in 0u64..20,
            per_seg in 1u64..6,
        ) {
            let d = tempfile::tempdir().unwrap();
            let max = max_pages * REC;
            let mut s = SiteStore::open(d.path(), cfg(max, per_seg)).unwrap();
            put_pages(&mut s, 0..n);
            for r in reads {
                has(&mut s, r);
            }
            s.evict_to_bound().unwrap();
            prop_assert!(s.stats().bytes <= max);
            for i in 0..n {
                let h = PageHash::of(&page(i));
                if s.contains(&h) {
                    prop_assert!(has(&mut s, i));
                }
            }
            prop_assert_eq!(s.stats().corrupt, 0);
        }

        /// Truncating the active segment anywhere loses only the records
        /// after the cut.
        #[test]
        fn prop_torn_tail(n in 1u64..8, cut in any::<prop::sample::Index>()) {
            let d = tempfile::tempdir().unwrap();
            let c = cfg(u64::MAX, 16);
            let mut s = SiteStore::open(d.path(), c).unwrap();
            put_pages(&mut s, 0..n as u32);
            drop(s);
            let active = seg_files(d.path(), "seg").pop().unwrap();
            let cut = cut.index((n * REC) as usize + 1) as u64;
            OpenOptions::new().write(true).open(&active).unwrap().set_len(cut).unwrap();
            let mut s = SiteStore::open(d.path(), c).unwrap();
            let whole = cut / REC;
            prop_assert_eq!(s.stats().pages, whole);
            prop_assert_eq!(fs::metadata(&active).unwrap().len(), whole * REC);
            for i in 0..n {
                prop_assert_eq!(has(&mut s, i as u32), i < whole);
            }
        }
    }
}
