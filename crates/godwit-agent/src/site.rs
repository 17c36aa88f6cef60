//! This site's page store as the agent uses it: opened from `[store]`,
//! shared by every migration into or out of this host.
//!
//! - **Destination:** a migration pins the store (nothing is evicted while
//!   a source may reference what it was told exists), indexes the VM's boot
//!   media as disk content ([`godwit_image::ramimage`]), sends the source
//!   Bloom summaries of the store, the VM's earlier image and the disk
//!   content before QEMU starts, and decodes through the store, which keeps
//!   every page that arrives.
//! - **Source:** pages leaving this host are put into the store and listed
//!   as the VM's image here ([`ImageRecorder`]), so the VM finds them when
//!   it comes back, and other VMs migrating in find them too.
//!
//! Store I/O is synchronous and short (buffered appends, verified reads of
//! one page); it runs on the relay's task like the codec itself.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use godwit_migstream::bloom::Bloom;
use godwit_migstream::{Message, PageHash, PageStore, SummaryKind};
use godwit_sitestore::{Pin, SiteStore, StoreConfig, StoreError};
use tracing::{info, warn};

/// Largest piece of a summary per frame (frames carry at most 1 MiB).
const SUMMARY_CHUNK: usize = 512 << 10;
/// Hashes gathered before they are appended to an image manifest.
const MANIFEST_BATCH: usize = 4096;

/// The site store and what the agent knows about it.
pub struct Site {
    store: Mutex<SiteStore>,
    /// Boot media already indexed: (path, size, mtime).
    indexed: Mutex<HashSet<(PathBuf, u64, u128)>>,
    work_dir: PathBuf,
}

impl std::fmt::Debug for Site {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Site")
            .field("work_dir", &self.work_dir)
            .finish()
    }
}

impl Site {
    /// Opens (or creates) the store in `dir`, bounded to `max_bytes`.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Arc<Site>, StoreError> {
        let mut store =
            SiteStore::open(&dir.join("pages"), StoreConfig::with_max_bytes(max_bytes))?;
        let freed = store.evict_to_bound()?;
        let st = store.stats();
        info!(
            dir = %dir.display(),
            pages = st.pages,
            bytes = st.bytes,
            freed,
            "site store open"
        );
        Ok(Arc::new(Site {
            store: Mutex::new(store),
            indexed: Mutex::new(HashSet::new()),
            work_dir: dir.join("derived"),
        }))
    }

    /// The store, locked. A panic while it was held cannot leave a wrong
    /// page behind (every read is verified), so poisoning is ignored.
    pub fn lock(&self) -> MutexGuard<'_, SiteStore> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Indexes a VM's kernel and initramfs as disk content (once per file
    /// version). Failures only cost hits: they are logged.
    pub fn index_boot_media(&self, kernel: Option<&Path>, initrd: Option<&Path>) {
        let Some(kernel) = kernel else { return };
        let key = |p: &Path| {
            let md = std::fs::metadata(p).ok()?;
            let mtime = md
                .modified()
                .ok()?
                .duration_since(std::time::UNIX_EPOCH)
                .ok()?;
            Some((p.to_path_buf(), md.len(), mtime.as_nanos()))
        };
        let keys: Vec<_> = [Some(kernel), initrd]
            .into_iter()
            .flatten()
            .filter_map(key)
            .collect();
        {
            let done = self.indexed.lock().unwrap_or_else(|p| p.into_inner());
            if !keys.is_empty() && keys.iter().all(|k| done.contains(k)) {
                return;
            }
        }
        let t = std::time::Instant::now();
        let extents =
            match godwit_image::ramimage::boot_media_extents(kernel, initrd, &self.work_dir) {
                Ok(e) => e,
                Err(e) => {
                    warn!(cause = %e, "boot media not indexed");
                    return;
                }
            };
        let mut chunks = 0;
        {
            let mut store = self.lock();
            for e in &extents {
                match store.index_disk_chunks(&e.path, &e.chunks) {
                    Ok(n) => chunks += n,
                    Err(err) => warn!(cause = %err, file = %e.path.display(), "indexing failed"),
                }
            }
        }
        self.indexed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(keys);
        info!(
            chunks,
            ms = t.elapsed().as_millis() as u64,
            "boot media indexed"
        );
    }

    /// The summaries a destination sends for `vm`, as codec messages.
    pub fn summary_messages(&self, vm: &str) -> Vec<Bytes> {
        let store = self.lock();
        let mut out = Vec::new();
        if let Some(b) = store.image_summary(vm) {
            out.extend(summary_chunks(SummaryKind::Image, &b));
        }
        if store.stats().disk_chunks > 0 {
            out.extend(summary_chunks(SummaryKind::Disk, &store.disk_summary()));
        }
        if store.stats().pages > 0 {
            out.extend(summary_chunks(SummaryKind::Store, &store.summary()));
        }
        out
    }

    /// A page store for one incoming migration, pinned until dropped.
    pub fn incoming(self: &Arc<Self>) -> SitePages {
        let pin = self.lock().pin();
        SitePages {
            site: self.clone(),
            _pin: pin,
        }
    }

    /// Records the pages a VM sends out of this site.
    pub fn recorder(self: &Arc<Self>, vm: &str) -> Option<ImageRecorder> {
        let mut store = self.lock();
        if let Err(e) = store.begin_image(vm) {
            warn!(cause = %e, vm, "cannot record the VM's image here");
            return None;
        }
        Some(ImageRecorder {
            site: self.clone(),
            vm: vm.into(),
            pending: Vec::new(),
            _pin: store.pin(),
            failed: false,
        })
    }

    /// After a migration: write buffered pages and shrink to the bound.
    pub fn settle(&self) {
        let mut store = self.lock();
        if let Err(e) = store.flush() {
            warn!(cause = %e, "site store flush failed");
        }
        match store.evict_to_bound() {
            Ok(0) => {}
            Ok(freed) => info!(freed, "site store evicted to its bound"),
            Err(e) => warn!(cause = %e, "site store eviction failed"),
        }
    }
}

/// Splits a filter into SUMMARY messages.
fn summary_chunks(kind: SummaryKind, b: &Bloom) -> Vec<Bytes> {
    let bytes = b.to_bytes();
    let total = bytes.len() as u64;
    bytes
        .chunks(SUMMARY_CHUNK)
        .enumerate()
        .map(|(i, c)| {
            Message::Summary {
                kind,
                probes: b.probes(),
                total,
                offset: (i * SUMMARY_CHUNK) as u64,
                bytes: Bytes::copy_from_slice(c),
            }
            .encode()
        })
        .collect()
}

/// The decoder's view of the site store for one migration.
pub struct SitePages {
    site: Arc<Site>,
    _pin: Pin,
}

impl PageStore for SitePages {
    fn get(&mut self, h: &PageHash) -> Option<Bytes> {
        self.site.lock().get(h)
    }
    fn put(&mut self, h: &PageHash, page: &Bytes) -> Result<(), String> {
        self.site.lock().put(h, page).map_err(|e| e.to_string())
    }
}

/// Puts the pages a VM sends into this site's store and lists them as
/// its image here. Best effort: a store failure stops recording, never
/// the migration.
pub struct ImageRecorder {
    site: Arc<Site>,
    vm: String,
    pending: Vec<PageHash>,
    _pin: Pin,
    failed: bool,
}

impl ImageRecorder {
    /// Records pages sent for the first time.
    pub fn record(&mut self, pages: Vec<(PageHash, Bytes)>) {
        if self.failed || pages.is_empty() {
            return;
        }
        {
            let mut store = self.site.lock();
            for (h, p) in &pages {
                if let Err(e) = store.put(h, p) {
                    warn!(cause = %e, vm = self.vm, "recording the VM's image stopped");
                    self.failed = true;
                    return;
                }
            }
        }
        self.pending.extend(pages.into_iter().map(|(h, _)| h));
        if self.pending.len() >= MANIFEST_BATCH {
            self.write_manifest();
        }
    }

    fn write_manifest(&mut self) {
        if self.pending.is_empty() || self.failed {
            return;
        }
        if let Err(e) = self.site.lock().record_image(&self.vm, &self.pending) {
            warn!(cause = %e, vm = self.vm, "recording the VM's image stopped");
            self.failed = true;
        }
        self.pending.clear();
    }
}

impl Drop for ImageRecorder {
    fn drop(&mut self) {
        self.write_manifest();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use godwit_migstream::{Encoder, EncoderConfig, QemuFormat};

    fn page(b: u8) -> Bytes {
        Bytes::from(vec![b; 4096])
    }

    #[test]
    fn pages_recorded_at_departure_come_back_as_image_and_store_summaries() {
        let dir = tempfile::tempdir().unwrap();
        let site = Site::open(dir.path(), 1 << 30).unwrap();
        assert!(
            site.summary_messages("vm1").is_empty(),
            "an empty site says nothing"
        );
        {
            let mut rec = site.recorder("vm1").unwrap();
            rec.record((1..=3).map(|b| (PageHash::of(&page(b)), page(b))).collect());
        }
        site.settle();
        let msgs = site.summary_messages("vm1");
        let mut enc = Encoder::new(QemuFormat::default(), EncoderConfig::default()).unwrap();
        for m in &msgs {
            enc.handle_message(m).unwrap();
        }
        assert!(enc.has_summary(SummaryKind::Image));
        assert!(enc.has_summary(SummaryKind::Store));
        assert!(!enc.has_summary(SummaryKind::Disk));
        // Another VM's summaries hold the store but not vm1's image.
        let other = site.summary_messages("vm2");
        assert_eq!(other.len(), msgs.len() - 1);
        // The decoder's view finds the pages, verified.
        let mut pages = site.incoming();
        assert_eq!(pages.get(&PageHash::of(&page(2))), Some(page(2)));
        assert_eq!(pages.get(&PageHash::of(&page(9))), None);
    }

    #[test]
    fn boot_media_become_disk_content() {
        let dir = tempfile::tempdir().unwrap();
        let site = Site::open(&dir.path().join("store"), 1 << 30).unwrap();
        // Not a bzImage: the file itself is still indexed page by page.
        let kernel = dir.path().join("kernel");
        let mut k = vec![5u8; 4096];
        k.extend(vec![6u8; 100]);
        std::fs::write(&kernel, &k).unwrap();
        site.index_boot_media(Some(&kernel), None);
        let mut tail = vec![6u8; 100];
        tail.resize(4096, 0);
        let mut pages = site.incoming();
        assert_eq!(pages.get(&PageHash::of(&tail)), Some(Bytes::from(tail)));
        assert_eq!(site.summary_messages("x").len(), 1, "a disk summary only");
    }
}
