//! Block I/O load with verifiable content.
//!
//! Every block holds [`crate::pagegen`] content for its block number and
//! generation (the header records both plus a checksum), so a block that a
//! storage migration lost, misplaced or shipped stale is detected. The job
//! remembers the generation it last wrote to each block; a verify with that
//! state is exact, one without it (after a guest restart) checks that every
//! block is self-consistent.
//!
//! I/O goes through `O_DIRECT` where the device supports it so the numbers
//! are disk numbers, not page-cache numbers.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::memdirty::VerifyOutcome;
use crate::pagegen::{self, HEADER_LEN};
use crate::proto::{DiskMode, DiskioStats, Report};
use crate::sys::{self, AnonMap, Rng};

/// Throughput sample period.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// Smallest block: one page, the O_DIRECT alignment unit.
pub const MIN_BLOCK_KIB: u32 = 4;

/// Largest block: bigger buys nothing and costs memory per job.
pub const MAX_BLOCK_KIB: u32 = 4096;

/// Block size used by a stateless verify when block 0 is unreadable.
pub const DEFAULT_BLOCK_KIB: u32 = 64;

/// `BLKGETSIZE64` ioctl number (`_IOR(0x12, 114, size_t)`).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Errors of the disk job.
#[derive(Debug, thiserror::Error)]
pub enum DiskioError {
    /// Block size out of range or not a multiple of 4 KiB.
    #[error("block size {kib} KiB must be a multiple of 4 in {MIN_BLOCK_KIB}..={MAX_BLOCK_KIB}")]
    BadBlockSize {
        /// Requested size.
        kib: u32,
    },
    /// Opening or sizing the device failed.
    #[error("cannot open {device}")]
    Open {
        /// Device path.
        device: String,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// The region is smaller than one block.
    #[error("{device} region of {bytes} bytes holds no {block} byte block")]
    TooSmall {
        /// Device path.
        device: String,
        /// Region bytes.
        bytes: u64,
        /// Block bytes.
        block: usize,
    },
    /// A read or write failed.
    #[error("I/O error on {device} block {block}")]
    Io {
        /// Device path.
        device: String,
        /// Block number.
        block: u64,
        /// OS error.
        #[source]
        source: io::Error,
    },
}

/// An open device region with an aligned block buffer.
struct Disk {
    file: File,
    device: String,
    block: usize,
    blocks: u64,
    buf: AnonMap,
}

fn open_device(device: &str) -> Result<File, DiskioError> {
    let open = |direct: bool| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(if direct { libc::O_DIRECT } else { 0 })
            .open(device)
    };
    // tmpfs and some test files refuse O_DIRECT with EINVAL: fall back to
    // buffered I/O rather than failing.
    match open(true) {
        Ok(f) => Ok(f),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => open(false),
        Err(e) => Err(e),
    }
    .map_err(|source| DiskioError::Open {
        device: device.to_string(),
        source,
    })
}

fn device_size(file: &File, device: &str) -> Result<u64, DiskioError> {
    let meta = file.metadata().map_err(|source| DiskioError::Open {
        device: device.to_string(),
        source,
    })?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points
    // at a live local.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if rc != 0 {
        return Err(DiskioError::Open {
            device: device.to_string(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(size)
}

impl Disk {
    fn open(device: &str, mib: u64, block_kib: u32) -> Result<Self, DiskioError> {
        if !(MIN_BLOCK_KIB..=MAX_BLOCK_KIB).contains(&block_kib) || block_kib % 4 != 0 {
            return Err(DiskioError::BadBlockSize { kib: block_kib });
        }
        let file = open_device(device)?;
        let size = device_size(&file, device)?;
        let region = if mib == 0 { size } else { size.min(mib << 20) };
        let block = block_kib as usize * 1024;
        let blocks = region / block as u64;
        if blocks == 0 {
            return Err(DiskioError::TooSmall {
                device: device.to_string(),
                bytes: region,
                block,
            });
        }
        let buf = AnonMap::new(block).map_err(|source| DiskioError::Open {
            device: device.to_string(),
            source,
        })?;
        Ok(Self {
            file,
            device: device.to_string(),
            block,
            blocks,
            buf,
        })
    }

    fn io_err(&self, block: u64, source: io::Error) -> DiskioError {
        DiskioError::Io {
            device: self.device.clone(),
            block,
            source,
        }
    }

    fn write_block(&mut self, b: u64, generation: u64) -> Result<(), DiskioError> {
        pagegen::fill(self.buf.as_mut_slice(), b, generation);
        self.file
            .write_all_at(self.buf.as_slice(), b * self.block as u64)
            .map_err(|e| self.io_err(b, e))
    }

    /// Read block `b`; returns whether it checks out.
    fn read_check(&mut self, b: u64, expected: Option<u64>) -> Result<bool, DiskioError> {
        let off = b * self.block as u64;
        let res = self.file.read_exact_at(self.buf.as_mut_slice(), off);
        res.map_err(|e| self.io_err(b, e))?;
        Ok(pagegen::check(self.buf.as_slice(), b, expected).is_ok())
    }
}

struct Shared {
    /// Expected generation per block (0 = never written by this job). The
    /// worker holds the lock for one block operation at a time, verify for
    /// the whole pass, so verify pauses the worker.
    generations: Mutex<Vec<u64>>,
    stats: Mutex<DiskioStats>,
    stop: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Poisoning only means a worker panicked; the data is plain counters.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A block I/O job.
pub struct DiskJob {
    device: String,
    mib: u64,
    block_kib: u32,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl DiskJob {
    /// Open the device and start the worker. Samples go to `sink` under
    /// `id` every [`SAMPLE_INTERVAL`].
    pub fn start(
        id: u64,
        device: &str,
        mib: u64,
        mode: DiskMode,
        block_kib: u32,
        sink: Sender<Report>,
    ) -> Result<Self, DiskioError> {
        let disk = Disk::open(device, mib, block_kib)?;
        let shared = Arc::new(Shared {
            // Fits: blocks <= device bytes / 4096, far below usize::MAX.
            generations: Mutex::new(vec![0; disk.blocks as usize]),
            stats: Mutex::new(DiskioStats {
                device: device.to_string(),
                mode: Some(mode),
                running: true,
                ..Default::default()
            }),
            stop: AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("diskio".into())
            .spawn(move || {
                let err = run(id, disk, mode, &s, &sink).err();
                let mut st = lock(&s.stats);
                st.running = false;
                if let Some(e) = err {
                    let _ = sink.send(Report::Error {
                        id,
                        message: crate::realistic::error_chain(&e),
                    });
                }
            })
            .map_err(|source| DiskioError::Open {
                device: device.to_string(),
                source,
            })?;
        Ok(Self {
            device: device.to_string(),
            mib,
            block_kib,
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The device this job runs on.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Stop the worker (its generation table stays for verify).
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
        lock(&self.shared.stats).running = false;
    }

    /// Counters.
    pub fn stats(&self) -> DiskioStats {
        lock(&self.shared.stats).clone()
    }

    /// Verify every block against what this job wrote. Blocks it never
    /// wrote (possible in `randrw`) hold someone else's data and are not
    /// judged. Pauses the worker.
    pub fn verify(&self) -> Result<VerifyOutcome, DiskioError> {
        let gens = lock(&self.shared.generations);
        let mut disk = Disk::open(&self.device, self.mib, self.block_kib)?;
        let mut out = VerifyOutcome {
            pages: disk.blocks,
            errors: 0,
            first_bad: None,
        };
        for b in 0..disk.blocks {
            let expected = gens.get(b as usize).copied().unwrap_or(0);
            if expected != 0 && !disk.read_check(b, Some(expected))? {
                out.errors += 1;
                out.first_bad.get_or_insert(b);
            }
        }
        Ok(out)
    }
}

impl Drop for DiskJob {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Verify a device without job state: learn the block size from block 0's
/// header, then check every block of the whole device is self-consistent.
/// Expects the whole device to have been written (a job with `mib = 0`).
pub fn verify_stateless(device: &str) -> Result<VerifyOutcome, DiskioError> {
    let mut probe = Disk::open(device, 0, MIN_BLOCK_KIB)?;
    probe.read_check(0, None).ok();
    let hdr = &probe.buf.as_slice()[..HEADER_LEN];
    let len = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
    let kib = if hdr[..4] == pagegen::MAGIC.to_le_bytes()
        && len % 4096 == 0
        && (MIN_BLOCK_KIB..=MAX_BLOCK_KIB).contains(&(len / 1024))
    {
        len / 1024
    } else {
        DEFAULT_BLOCK_KIB
    };
    let mut disk = Disk::open(device, 0, kib)?;
    let mut out = VerifyOutcome {
        pages: disk.blocks,
        errors: 0,
        first_bad: None,
    };
    for b in 0..disk.blocks {
        if !disk.read_check(b, None)? {
            out.errors += 1;
            out.first_bad.get_or_insert(b);
        }
    }
    Ok(out)
}

/// Throughput sampler state.
struct Sampler {
    id: u64,
    start: Instant,
    read: u64,
    written: u64,
    errors: u64,
}

impl Sampler {
    fn maybe_emit(&mut self, shared: &Shared, sink: &Sender<Report>, force: bool) {
        let elapsed = self.start.elapsed();
        if !force && elapsed < SAMPLE_INTERVAL {
            return;
        }
        let total = {
            let mut st = lock(&shared.stats);
            st.read_bytes += self.read;
            st.write_bytes += self.written;
            st.errors += self.errors;
            st.clone()
        };
        // A closed sink means nobody listens any more; the job still runs.
        let _ = sink.send(Report::Diskio {
            id: self.id,
            uptime_ms: sys::uptime_ms(),
            interval_ms: elapsed.as_millis() as u64,
            read_bytes: self.read,
            write_bytes: self.written,
            errors: self.errors,
            total,
        });
        self.start = Instant::now();
        self.read = 0;
        self.written = 0;
        self.errors = 0;
    }
}

fn run(
    id: u64,
    mut disk: Disk,
    mode: DiskMode,
    shared: &Shared,
    sink: &Sender<Report>,
) -> Result<(), DiskioError> {
    let mut sampler = Sampler {
        id,
        start: Instant::now(),
        read: 0,
        written: 0,
        errors: 0,
    };
    let mut rng = Rng::from_clock();
    let block = disk.block as u64;
    let stopped = || shared.stop.load(Ordering::Relaxed);
    let write = |disk: &mut Disk, b: u64, sampler: &mut Sampler| {
        let mut gens = lock(&shared.generations);
        let g = gens[b as usize] + 1;
        disk.write_block(b, g)?;
        gens[b as usize] = g;
        sampler.written += block;
        Ok::<(), DiskioError>(())
    };
    let read = |disk: &mut Disk, b: u64, sampler: &mut Sampler| {
        let gens = lock(&shared.generations);
        let expected = gens[b as usize];
        let ok = disk.read_check(b, Some(expected))?;
        // Blocks never written by us carry someone else's data: only
        // content we wrote can be judged.
        if expected != 0 && !ok {
            sampler.errors += 1;
        }
        sampler.read += block;
        Ok::<(), DiskioError>(())
    };
    'outer: while !stopped() {
        match mode {
            DiskMode::WriteThenVerify => {
                for b in 0..disk.blocks {
                    if stopped() {
                        break 'outer;
                    }
                    write(&mut disk, b, &mut sampler)?;
                    sampler.maybe_emit(shared, sink, false);
                }
                for b in 0..disk.blocks {
                    if stopped() {
                        break 'outer;
                    }
                    read(&mut disk, b, &mut sampler)?;
                    sampler.maybe_emit(shared, sink, false);
                }
                lock(&shared.stats).passes += 1;
            }
            DiskMode::ReadLoop => {
                for b in 0..disk.blocks {
                    if stopped() {
                        break 'outer;
                    }
                    read(&mut disk, b, &mut sampler)?;
                    sampler.maybe_emit(shared, sink, false);
                }
                lock(&shared.stats).passes += 1;
            }
            DiskMode::Randrw => {
                let b = rng.below(disk.blocks);
                if rng.below(2) == 0 {
                    read(&mut disk, b, &mut sampler)?;
                } else {
                    write(&mut disk, b, &mut sampler)?;
                }
                sampler.maybe_emit(shared, sink, false);
            }
        }
    }
    sampler.maybe_emit(shared, sink, true);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn scratch(name: &str, mib: u64) -> String {
        // Under the target dir rather than /tmp: /tmp may be tmpfs, and we
        // want the O_DIRECT path exercised where possible.
        let dir = std::env::var("CARGO_TARGET_TMPDIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|_| std::env::temp_dir());
        let path = dir.join(format!("godwit-disk-{name}-{}", std::process::id()));
        let f = File::create(&path).unwrap();
        f.set_len(mib << 20).unwrap();
        path.to_string_lossy().into_owned()
    }

    #[test]
    fn write_then_verify_and_detect_corruption() {
        let dev = scratch("wtv", 4);
        let (tx, rx) = mpsc::channel();
        let job = DiskJob::start(7, &dev, 0, DiskMode::WriteThenVerify, 64, tx).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while job.stats().passes == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        job.stop();
        let st = job.stats();
        assert!(st.passes > 0 && st.errors == 0, "{st:?}");
        let samples: Vec<Report> = rx.try_iter().collect();
        assert!(samples
            .iter()
            .all(|r| matches!(r, Report::Diskio { id: 7, .. })));
        assert!(!samples.is_empty());
        let v = job.verify().unwrap();
        assert_eq!((v.pages, v.errors), (64, 0));
        let v = verify_stateless(&dev).unwrap();
        assert_eq!((v.pages, v.errors), (64, 0));
        // Corrupt block 3 behind the job's back.
        let f = OpenOptions::new().write(true).open(&dev).unwrap();
        f.write_all_at(&[0xff; 16], 3 * 65536 + 100).unwrap();
        let v = job.verify().unwrap();
        assert_eq!((v.errors, v.first_bad), (1, Some(3)));
        assert_eq!(verify_stateless(&dev).unwrap().first_bad, Some(3));
        std::fs::remove_file(&dev).unwrap();
    }

    #[test]
    fn randrw_and_bad_args() {
        let dev = scratch("rand", 1);
        let (tx, _rx) = mpsc::channel();
        assert!(matches!(
            DiskJob::start(1, &dev, 0, DiskMode::Randrw, 3, tx.clone()),
            Err(DiskioError::BadBlockSize { kib: 3 })
        ));
        assert!(matches!(
            DiskJob::start(1, "/nonexistent/dev", 0, DiskMode::Randrw, 4, tx.clone()),
            Err(DiskioError::Open { .. })
        ));
        let job = DiskJob::start(1, &dev, 0, DiskMode::Randrw, 4, tx).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        job.stop();
        assert_eq!(job.stats().errors, 0);
        // Randrw leaves unwritten blocks; only written ones are judged.
        let v = job.verify().unwrap();
        assert_eq!((v.pages, v.errors), (256, 0));
        std::fs::remove_file(&dev).unwrap();
    }
}
