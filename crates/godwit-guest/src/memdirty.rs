//! The memory dirtier: a buffer of verifiable pages rewritten at a set rate.
//!
//! Every page holds [`crate::pagegen`] content for its index and its current
//! generation; the expected generation of every page is kept on the side.
//! After a live migration, [`Memdirty::verify`] must find zero bad pages:
//! any page the migration lost, shipped stale, or corrupted shows up.
//!
//! Verification and dirtying share one lock over the region: the dirtier
//! takes it for one small batch at a time ([`TICK`] worth of pages), the
//! verifier for the whole pass, so a verify pauses the dirtier instead of
//! racing with it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::pagegen::{self, PAGE_SIZE};
use crate::proto::{DirtyPattern, MemdirtyStats};
use crate::sys::{AnonMap, Rng};

/// Dirtier scheduling period: pages owed are written in batches this often.
/// Short enough that a 1 s window sees a steady rate, long enough that the
/// lock/unlock and sleep overheads stay negligible.
pub const TICK: Duration = Duration::from_millis(10);

/// Largest backlog the dirtier carries when it falls behind, as a fraction
/// of one second of the target rate: under TCG the guest often cannot keep
/// up, and an unbounded backlog would turn into a burst later.
pub const MAX_BACKLOG_S: f64 = 0.1;

/// Share of writes that go to the hot set in [`DirtyPattern::Hotspot`].
pub const HOTSPOT_HOT_WRITES_PCT: u64 = 90;

/// Share of pages in the hot set in [`DirtyPattern::Hotspot`].
pub const HOTSPOT_HOT_PAGES_PCT: u64 = 10;

/// Largest buffer accepted: far above any test guest, low enough that a
/// typo (MiB vs bytes) fails cleanly instead of OOM-killing the guest.
pub const MAX_MIB: u64 = 64 * 1024;

/// Errors of the memory dirtier.
#[derive(Debug, thiserror::Error)]
pub enum MemdirtyError {
    /// Size out of range.
    #[error("buffer size {mib} MiB is out of range 1..={MAX_MIB}")]
    BadSize {
        /// Requested size.
        mib: u64,
    },
    /// mmap failed.
    #[error("cannot map {mib} MiB")]
    Map {
        /// Requested size.
        mib: u64,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Result of a verification pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyOutcome {
    /// Units checked.
    pub pages: u64,
    /// Units with wrong content.
    pub errors: u64,
    /// First bad unit.
    pub first_bad: Option<u64>,
}

/// The page buffer plus the expected generation of every page.
pub struct MemRegion {
    map: AnonMap,
    generations: Vec<u64>,
}

impl MemRegion {
    /// Map `mib` MiB and write generation 1 into every page (which also
    /// faults every page in).
    pub fn new(mib: u64) -> Result<Self, MemdirtyError> {
        if mib == 0 || mib > MAX_MIB {
            return Err(MemdirtyError::BadSize { mib });
        }
        // Fits: mib <= MAX_MIB, so the product is < 2^36.
        let len = (mib as usize) << 20;
        let map = AnonMap::new(len).map_err(|source| MemdirtyError::Map { mib, source })?;
        let pages = len / PAGE_SIZE;
        let mut region = Self {
            map,
            generations: vec![0; pages],
        };
        for p in 0..pages {
            region.dirty(p);
        }
        Ok(region)
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.generations.len()
    }

    /// Rewrite page `p` with its next generation.
    pub fn dirty(&mut self, p: usize) {
        let generation = self.generations[p] + 1;
        self.generations[p] = generation;
        let page = &mut self.map.as_mut_slice()[p * PAGE_SIZE..(p + 1) * PAGE_SIZE];
        pagegen::fill(page, p as u64, generation);
    }

    /// Check every page against its expected generation.
    pub fn verify(&self) -> VerifyOutcome {
        let mut out = VerifyOutcome {
            pages: self.pages() as u64,
            errors: 0,
            first_bad: None,
        };
        for (p, page) in self.map.as_slice().chunks_exact(PAGE_SIZE).enumerate() {
            if pagegen::check(page, p as u64, Some(self.generations[p])).is_err() {
                out.errors += 1;
                out.first_bad.get_or_insert(p as u64);
            }
        }
        out
    }

    /// Raw page bytes, for tests that corrupt memory on purpose.
    #[cfg(test)]
    fn page_mut(&mut self, p: usize) -> &mut [u8] {
        &mut self.map.as_mut_slice()[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
    }
}

/// Picks the next page to dirty according to a [`DirtyPattern`].
#[derive(Debug, Clone)]
pub struct PagePicker {
    pattern: DirtyPattern,
    pages: u64,
    cursor: u64,
    rng: Rng,
}

impl PagePicker {
    /// A picker over `pages` pages (> 0).
    pub fn new(pattern: DirtyPattern, pages: u64, rng: Rng) -> Self {
        Self {
            pattern,
            pages: pages.max(1),
            cursor: 0,
            rng,
        }
    }

    /// Next page index.
    pub fn next_page(&mut self) -> u64 {
        match self.pattern {
            DirtyPattern::Sequential => {
                let p = self.cursor;
                self.cursor = (self.cursor + 1) % self.pages;
                p
            }
            DirtyPattern::Random => self.rng.below(self.pages),
            DirtyPattern::Hotspot => {
                let hot = (self.pages * HOTSPOT_HOT_PAGES_PCT / 100).max(1);
                if self.rng.below(100) < HOTSPOT_HOT_WRITES_PCT || hot >= self.pages {
                    self.rng.below(hot)
                } else {
                    hot + self.rng.below(self.pages - hot)
                }
            }
        }
    }
}

struct Shared {
    region: Mutex<MemRegion>,
    stats: Mutex<MemdirtyStats>,
    stop: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind
    // (counters, pages); carrying on is better than taking the guest
    // instrument down.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running (or stopped) dirtier and its region.
pub struct Memdirty {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Memdirty {
    /// Allocate and fill the region, then start rewriting it.
    pub fn start(
        mib: u64,
        rate_pages_per_s: u64,
        pattern: DirtyPattern,
    ) -> Result<Self, MemdirtyError> {
        let region = MemRegion::new(mib)?;
        let pages = region.pages() as u64;
        let shared = Arc::new(Shared {
            region: Mutex::new(region),
            stats: Mutex::new(MemdirtyStats {
                mib,
                pages,
                rate_pages_per_s,
                pattern: Some(pattern),
                running: rate_pages_per_s > 0,
                ..Default::default()
            }),
            stop: AtomicBool::new(false),
        });
        let thread = if rate_pages_per_s > 0 {
            let s = Arc::clone(&shared);
            Some(
                std::thread::Builder::new()
                    .name("memdirty".into())
                    .spawn(move || dirty_loop(&s, rate_pages_per_s, pattern))
                    .map_err(|source| MemdirtyError::Map { mib, source })?,
            )
        } else {
            None
        };
        Ok(Self {
            shared,
            thread: Mutex::new(thread),
        })
    }

    /// Stop rewriting; the region stays for [`Memdirty::verify`].
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = lock(&self.thread).take() {
            // A panicked dirtier already stopped; nothing more to do.
            let _ = t.join();
        }
        let mut st = lock(&self.shared.stats);
        st.running = false;
        st.achieved_pages_per_s = 0;
    }

    /// Check every page (pauses the dirtier for the duration).
    pub fn verify(&self) -> VerifyOutcome {
        let out = lock(&self.shared.region).verify();
        let mut st = lock(&self.shared.stats);
        st.verifies += 1;
        st.verify_errors += out.errors;
        out
    }

    /// Current counters.
    pub fn stats(&self) -> MemdirtyStats {
        lock(&self.shared.stats).clone()
    }
}

impl Drop for Memdirty {
    fn drop(&mut self) {
        self.stop();
    }
}

fn dirty_loop(shared: &Shared, rate: u64, pattern: DirtyPattern) {
    let pages = lock(&shared.region).pages() as u64;
    let mut picker = PagePicker::new(pattern, pages, Rng::from_clock());
    let max_backlog = (rate as f64 * MAX_BACKLOG_S).max(1.0);
    let mut owed = 0.0f64;
    let mut last = Instant::now();
    let mut window_start = last;
    let mut window_pages = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        owed = (owed + now.duration_since(last).as_secs_f64() * rate as f64).min(max_backlog);
        last = now;
        let batch = owed as u64;
        if batch > 0 {
            owed -= batch as f64;
            let mut region = lock(&shared.region);
            for _ in 0..batch {
                // Fits: next_page() < pages, which came from a usize.
                region.dirty(picker.next_page() as usize);
            }
            drop(region);
            window_pages += batch;
            lock(&shared.stats).pages_dirtied += batch;
        }
        let since = now.duration_since(window_start);
        if since >= Duration::from_secs(1) {
            let achieved = (window_pages as f64 / since.as_secs_f64()) as u64;
            lock(&shared.stats).achieved_pages_per_s = achieved;
            window_start = now;
            window_pages = 0;
        }
        std::thread::sleep(TICK.saturating_sub(now.elapsed()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_verifies_and_detects_corruption() {
        let mut r = MemRegion::new(1).unwrap();
        assert_eq!(r.pages(), 256);
        assert_eq!(
            r.verify(),
            VerifyOutcome {
                pages: 256,
                errors: 0,
                first_bad: None
            }
        );
        r.dirty(3);
        r.dirty(3);
        assert_eq!(r.verify().errors, 0);
        // A stale page (what a migration that missed a dirty page leaves).
        let stale = r.page_mut(5).to_vec();
        r.dirty(5);
        r.page_mut(5).copy_from_slice(&stale);
        // A zeroed page and a swapped page.
        r.page_mut(9).fill(0);
        let p10 = r.page_mut(10).to_vec();
        r.page_mut(11).copy_from_slice(&p10);
        let v = r.verify();
        assert_eq!(v.errors, 3);
        assert_eq!(v.first_bad, Some(5));
    }

    #[test]
    fn pickers_stay_in_range_and_follow_pattern() {
        let mut seq = PagePicker::new(DirtyPattern::Sequential, 3, Rng::new(1));
        let v: Vec<u64> = (0..7).map(|_| seq.next_page()).collect();
        assert_eq!(v, [0, 1, 2, 0, 1, 2, 0]);
        let mut hot = PagePicker::new(DirtyPattern::Hotspot, 1000, Rng::new(7));
        let mut in_hot = 0;
        for _ in 0..10_000 {
            let p = hot.next_page();
            assert!(p < 1000);
            if p < 100 {
                in_hot += 1;
            }
        }
        assert!((8500..9500).contains(&in_hot), "{in_hot}");
        let mut rnd = PagePicker::new(DirtyPattern::Random, 10, Rng::new(3));
        let mut seen = [false; 10];
        for _ in 0..1000 {
            seen[rnd.next_page() as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
        let mut one = PagePicker::new(DirtyPattern::Hotspot, 1, Rng::new(3));
        assert_eq!(one.next_page(), 0);
    }

    #[test]
    fn dirtier_runs_and_verify_is_clean() {
        let m = Memdirty::start(2, 20_000, DirtyPattern::Random).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let v = m.verify();
        assert_eq!((v.pages, v.errors), (512, 0));
        std::thread::sleep(Duration::from_millis(1100));
        m.stop();
        let st = m.stats();
        assert!(st.pages_dirtied > 1000, "{st:?}");
        assert!(!st.running);
        assert_eq!(m.verify().errors, 0);
        assert!(matches!(
            Memdirty::start(0, 1, DirtyPattern::Random),
            Err(MemdirtyError::BadSize { .. })
        ));
    }
}
