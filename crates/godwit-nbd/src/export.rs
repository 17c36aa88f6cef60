//! Block backends: what a request does to the data.
//!
//! [`Backend`] is the synchronous interface the server runs requests against
//! (the tokio shell calls it from `spawn_blocking`). [`FileExport`] serves a
//! raw image file and keeps it sparse: TRIM and WRITE_ZEROES punch holes,
//! reads report holes as `OFFSET_HOLE`, BLOCK_STATUS comes from
//! `SEEK_DATA`/`SEEK_HOLE`. [`MemExport`] keeps the disk in memory, for tests
//! and fuzzing. [`execute`] maps one [`Command`] onto a backend.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};
use tracing::{debug, warn};

use crate::proto::{
    Command, ExportInfo, Extent, NbdErrno, ReadChunk, Reply, STATE_HOLE, STATE_ZERO,
};

/// Zeros written per `pwrite` when hole punching is unavailable.
const ZERO_WRITE_CHUNK: usize = 1024 * 1024;

/// Backend failures, mapped onto NBD error values by [`ExportError::errno`].
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The image could not be opened.
    #[error("open image {path}")]
    Open {
        /// Image path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// An I/O operation on the image failed.
    #[error("{op} at offset {offset}")]
    Io {
        /// Operation (`pread`, `pwrite`, `fdatasync`, ...).
        op: &'static str,
        /// Offset of the request.
        offset: u64,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// A write on a read-only export.
    #[error("export is read-only")]
    ReadOnly,
    /// FAST_ZERO asked for, but zeroing would be as slow as writing.
    #[error("fast zeroing is not supported")]
    NotFast,
    /// The range is outside the export (the protocol core filters these).
    #[error("range {offset}+{length} is outside the export")]
    OutOfRange {
        /// Start offset.
        offset: u64,
        /// Length.
        length: u64,
    },
}

impl ExportError {
    /// The NBD error value sent to the client.
    pub fn errno(&self) -> NbdErrno {
        match self {
            ExportError::ReadOnly => NbdErrno::Perm,
            ExportError::NotFast => NbdErrno::NotSup,
            ExportError::OutOfRange { .. } => NbdErrno::Inval,
            ExportError::Open { source, .. } | ExportError::Io { source, .. } => {
                match source.raw_os_error() {
                    Some(libc::ENOSPC) | Some(libc::EDQUOT) => NbdErrno::NoSpc,
                    Some(libc::ENOMEM) => NbdErrno::NoMem,
                    Some(libc::EPERM) | Some(libc::EROFS) => NbdErrno::Perm,
                    _ => NbdErrno::Io,
                }
            }
        }
    }
}

/// A block device served over NBD. Implementations must be safe to call
/// from several connections at once (multi-conn): FLUSH on any connection
/// makes every completed write durable.
pub trait Backend: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// Whether WRITE_ZEROES is cheaper than writing zeros (FAST_ZERO).
    fn fast_zero(&self) -> bool {
        false
    }
    /// Read `length` bytes at `offset` as data and hole chunks covering the
    /// range exactly.
    fn read(&self, offset: u64, length: u32) -> Result<Vec<ReadChunk>, ExportError>;
    /// Write `data` at `offset`; durable before returning if `fua`.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ExportError>;
    /// Make every completed write durable.
    fn flush(&self) -> Result<(), ExportError>;
    /// Discard a range (it reads as zeros afterwards).
    fn trim(&self, offset: u64, length: u32, fua: bool) -> Result<(), ExportError>;
    /// Zero a range; `no_hole`: keep it allocated; `fast`: fail with
    /// [`ExportError::NotFast`] rather than write zeros.
    fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        fua: bool,
        no_hole: bool,
        fast: bool,
    ) -> Result<(), ExportError>;
    /// `base:allocation` extents from `offset`, covering at most `length`
    /// bytes and at most `max_extents` extents.
    fn block_status(
        &self,
        offset: u64,
        length: u32,
        max_extents: usize,
    ) -> Result<Vec<Extent>, ExportError>;

    /// What the protocol core advertises for this backend under `name`.
    fn export_info(&self, name: &str) -> ExportInfo {
        ExportInfo {
            name: name.to_owned(),
            description: None,
            size: self.size(),
            read_only: self.read_only(),
            fast_zero: self.fast_zero(),
        }
    }
}

/// Run one request against a backend.
pub fn execute(backend: &dyn Backend, command: &Command) -> Reply {
    let result = match command {
        Command::Read { offset, length, .. } => backend.read(*offset, *length).map(Reply::Read),
        Command::Write { offset, data, fua } => {
            backend.write(*offset, data, *fua).map(|()| Reply::Ok)
        }
        Command::Flush => backend.flush().map(|()| Reply::Ok),
        Command::Trim {
            offset,
            length,
            fua,
        } => backend.trim(*offset, *length, *fua).map(|()| Reply::Ok),
        Command::WriteZeroes {
            offset,
            length,
            fua,
            no_hole,
            fast,
        } => backend
            .write_zeroes(*offset, *length, *fua, *no_hole, *fast)
            .map(|()| Reply::Ok),
        Command::BlockStatus {
            offset,
            length,
            req_one,
        } => {
            let max = if *req_one {
                1
            } else {
                crate::proto::MAX_EXTENTS
            };
            backend
                .block_status(*offset, *length, max)
                .map(Reply::BlockStatus)
        }
    };
    result.unwrap_or_else(|e| {
        debug!(command = command.name(), error = %e, "NBD request failed");
        Reply::Error(e.errno())
    })
}

/// A raw image file, kept sparse.
#[derive(Debug)]
pub struct FileExport {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
    /// Cleared the first time `fallocate` says the filesystem cannot punch
    /// holes, so later requests go straight to writing zeros.
    punch_hole: AtomicBool,
    /// Cleared if `lseek(SEEK_DATA)` is unsupported: everything is data.
    seek_data: AtomicBool,
}

/// Where the next data or hole starts, via `lseek(SEEK_DATA/SEEK_HOLE)`.
/// `Ok(None)`: no data at or after `pos` (ENXIO).
fn seek(file: &File, pos: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let Ok(pos) = libc::off_t::try_from(pos) else {
        return Ok(None);
    };
    // SAFETY: lseek on a valid, open fd owned by `file`; it only moves the
    // file position, which this module never uses (all I/O is pread/pwrite).
    let r = unsafe { libc::lseek(file.as_raw_fd(), pos, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    // r >= 0 was checked above.
    Ok(Some(r as u64))
}

/// A data (`true`) or hole (`false`) run inside `[offset, end)`.
type Run = (u64, u64, bool);

impl FileExport {
    /// Open `path` read-write (or read-only) as an export of its current
    /// size.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> Result<Self, ExportError> {
        let path = path.as_ref().to_path_buf();
        let open_err = |source| ExportError::Open {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .map_err(open_err)?;
        let size = file.metadata().map_err(open_err)?.len();
        Ok(Self {
            file,
            path,
            size,
            read_only,
            punch_hole: AtomicBool::new(true),
            seek_data: AtomicBool::new(true),
        })
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<(), ExportError> {
        match offset.checked_add(length) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(ExportError::OutOfRange { offset, length }),
        }
    }

    fn io(op: &'static str, offset: u64) -> impl FnOnce(io::Error) -> ExportError {
        move |source| ExportError::Io { op, offset, source }
    }

    /// Data and hole runs covering `[offset, end)`, at most `max` runs (the
    /// last one is cut short then).
    fn runs(&self, offset: u64, end: u64, max: usize) -> Result<Vec<Run>, ExportError> {
        if !self.seek_data.load(Ordering::Relaxed) {
            return Ok(vec![(offset, end, true)]);
        }
        let mut runs = Vec::new();
        let mut pos = offset;
        while pos < end && runs.len() < max {
            let data = match seek(&self.file, pos, libc::SEEK_DATA) {
                Ok(d) => d,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    warn!(path = %self.path.display(), "SEEK_DATA unsupported; reporting all data");
                    self.seek_data.store(false, Ordering::Relaxed);
                    return Ok(vec![(offset, end, true)]);
                }
                Err(e) => return Err(Self::io("lseek(SEEK_DATA)", pos)(e)),
            };
            match data {
                None => {
                    runs.push((pos, end, false));
                    pos = end;
                }
                Some(d) if d > pos => {
                    let stop = d.min(end);
                    runs.push((pos, stop, false));
                    pos = stop;
                }
                Some(_) => {
                    let hole = seek(&self.file, pos, libc::SEEK_HOLE)
                        .map_err(Self::io("lseek(SEEK_HOLE)", pos))?
                        .unwrap_or(end);
                    // A hole before `pos` would be a kernel bug; never loop.
                    let stop = hole.clamp(pos + 1, end);
                    runs.push((pos, stop, true));
                    pos = stop;
                }
            }
        }
        Ok(runs)
    }

    fn pread(&self, offset: u64, len: usize) -> Result<Bytes, ExportError> {
        let mut buf = BytesMut::zeroed(len);
        let mut done = 0;
        while done < len {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                // EOF: the file shrank under us; the rest reads as zeros.
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Self::io("pread", offset)(e)),
            }
        }
        Ok(buf.freeze())
    }

    fn write_zeros(&self, offset: u64, length: u64) -> Result<(), ExportError> {
        let zeros = vec![0u8; ZERO_WRITE_CHUNK.min(length as usize)];
        let mut pos = offset;
        let end = offset + length;
        while pos < end {
            // Bounded by ZERO_WRITE_CHUNK.
            let n = (end - pos).min(zeros.len() as u64) as usize;
            self.file
                .write_all_at(&zeros[..n], pos)
                .map_err(Self::io("pwrite", pos))?;
            pos += n as u64;
        }
        Ok(())
    }

    /// `fallocate(mode | KEEP_SIZE)`; `Ok(false)` if the filesystem does not
    /// support the mode.
    fn fallocate(&self, mode: libc::c_int, offset: u64, length: u64) -> Result<bool, ExportError> {
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(length))
        else {
            return Err(ExportError::OutOfRange { offset, length });
        };
        loop {
            // SAFETY: fallocate on a valid, open fd owned by `self.file`, with
            // in-range offsets; KEEP_SIZE keeps the export size fixed.
            let r = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    mode | libc::FALLOC_FL_KEEP_SIZE,
                    off,
                    len,
                )
            };
            if r == 0 {
                return Ok(true);
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => return Ok(false),
                _ => return Err(Self::io("fallocate", offset)(e)),
            }
        }
    }

    /// Zero a range by punching a hole, else by writing zeros (unless
    /// `fast`).
    fn zero(&self, offset: u64, length: u64, no_hole: bool, fast: bool) -> Result<(), ExportError> {
        if length == 0 {
            return Ok(());
        }
        if no_hole {
            if self.fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, length)? {
                return Ok(());
            }
        } else if self.punch_hole.load(Ordering::Relaxed) {
            if self.fallocate(libc::FALLOC_FL_PUNCH_HOLE, offset, length)? {
                return Ok(());
            }
            warn!(path = %self.path.display(), "hole punching unsupported; writing zeros");
            self.punch_hole.store(false, Ordering::Relaxed);
        }
        if fast {
            return Err(ExportError::NotFast);
        }
        self.write_zeros(offset, length)
    }

    fn sync(&self, offset: u64) -> Result<(), ExportError> {
        self.file.sync_data().map_err(Self::io("fdatasync", offset))
    }
}

impl Backend for FileExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn fast_zero(&self) -> bool {
        !self.read_only && self.punch_hole.load(Ordering::Relaxed)
    }

    fn read(&self, offset: u64, length: u32) -> Result<Vec<ReadChunk>, ExportError> {
        self.check_range(offset, u64::from(length))?;
        let end = offset + u64::from(length);
        let mut chunks = Vec::new();
        for (start, stop, data) in self.runs(offset, end, usize::MAX)? {
            // Runs lie inside [offset, offset + length): they fit in u32.
            let len = (stop - start) as u32;
            chunks.push(if data {
                ReadChunk::Data(self.pread(start, len as usize)?)
            } else {
                ReadChunk::Hole(len)
            });
        }
        Ok(chunks)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ExportError> {
        if self.read_only {
            return Err(ExportError::ReadOnly);
        }
        self.check_range(offset, data.len() as u64)?;
        self.file
            .write_all_at(data, offset)
            .map_err(Self::io("pwrite", offset))?;
        if fua {
            self.sync(offset)?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), ExportError> {
        if self.read_only {
            return Ok(());
        }
        self.sync(0)
    }

    fn trim(&self, offset: u64, length: u32, fua: bool) -> Result<(), ExportError> {
        // A trimmed range reads as zeros here: the same hole punch as a
        // WRITE_ZEROES that may leave a hole.
        self.write_zeroes(offset, length, fua, false, false)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        fua: bool,
        no_hole: bool,
        fast: bool,
    ) -> Result<(), ExportError> {
        if self.read_only {
            return Err(ExportError::ReadOnly);
        }
        self.check_range(offset, u64::from(length))?;
        self.zero(offset, u64::from(length), no_hole, fast)?;
        if fua {
            self.sync(offset)?;
        }
        Ok(())
    }

    fn block_status(
        &self,
        offset: u64,
        length: u32,
        max_extents: usize,
    ) -> Result<Vec<Extent>, ExportError> {
        self.check_range(offset, u64::from(length))?;
        let end = offset + u64::from(length);
        Ok(self
            .runs(offset, end, max_extents.max(1))?
            .into_iter()
            .map(|(start, stop, data)| Extent {
                // Inside the u32-long request.
                length: (stop - start) as u32,
                flags: if data { 0 } else { STATE_HOLE | STATE_ZERO },
            })
            .collect())
    }
}

/// Granularity at which [`MemExport`] reports all-zero blocks as holes.
pub const MEM_BLOCK_SIZE: usize = 4096;

/// An in-memory disk, for tests and fuzzing. All-zero
/// [`MEM_BLOCK_SIZE`] blocks are reported as holes.
#[derive(Debug)]
pub struct MemExport {
    data: Mutex<Vec<u8>>,
    read_only: bool,
}

impl MemExport {
    /// A zeroed disk of `size` bytes.
    pub fn new(size: usize, read_only: bool) -> Self {
        Self {
            data: Mutex::new(vec![0; size]),
            read_only,
        }
    }

    /// A copy of the whole disk.
    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // A poisoned lock only means another request panicked mid-copy; the
        // bytes are still a valid disk image.
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn range(&self, len: usize, offset: u64, length: u64) -> Result<(usize, usize), ExportError> {
        let err = ExportError::OutOfRange { offset, length };
        let start =
            usize::try_from(offset).map_err(|_| ExportError::OutOfRange { offset, length })?;
        let n = usize::try_from(length).map_err(|_| ExportError::OutOfRange { offset, length })?;
        match start.checked_add(n) {
            Some(end) if end <= len => Ok((start, end)),
            _ => Err(err),
        }
    }

    /// Runs of (start, end, is_data) over `[start, end)`, split at block
    /// boundaries where zero-ness changes.
    fn runs(data: &[u8], start: usize, end: usize) -> Vec<(usize, usize, bool)> {
        let mut runs: Vec<(usize, usize, bool)> = Vec::new();
        let mut pos = start;
        while pos < end {
            let block_end = ((pos / MEM_BLOCK_SIZE + 1) * MEM_BLOCK_SIZE).min(end);
            let block_start = pos - pos % MEM_BLOCK_SIZE;
            let block_stop = (block_start + MEM_BLOCK_SIZE).min(data.len());
            let is_data = data[block_start..block_stop].iter().any(|&b| b != 0);
            match runs.last_mut() {
                Some(last) if last.2 == is_data => last.1 = block_end,
                _ => runs.push((pos, block_end, is_data)),
            }
            pos = block_end;
        }
        runs
    }
}

impl Backend for MemExport {
    fn size(&self) -> u64 {
        self.lock().len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn fast_zero(&self) -> bool {
        !self.read_only
    }

    fn read(&self, offset: u64, length: u32) -> Result<Vec<ReadChunk>, ExportError> {
        let data = self.lock();
        let (start, end) = self.range(data.len(), offset, u64::from(length))?;
        Ok(Self::runs(&data, start, end)
            .into_iter()
            .map(|(s, e, d)| {
                if d {
                    ReadChunk::Data(Bytes::copy_from_slice(&data[s..e]))
                } else {
                    // Inside a u32-long request.
                    ReadChunk::Hole((e - s) as u32)
                }
            })
            .collect())
    }

    fn write(&self, offset: u64, buf: &[u8], _fua: bool) -> Result<(), ExportError> {
        if self.read_only {
            return Err(ExportError::ReadOnly);
        }
        let mut data = self.lock();
        let (start, end) = self.range(data.len(), offset, buf.len() as u64)?;
        data[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> Result<(), ExportError> {
        Ok(())
    }

    fn trim(&self, offset: u64, length: u32, fua: bool) -> Result<(), ExportError> {
        self.write_zeroes(offset, length, fua, false, false)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        _fua: bool,
        _no_hole: bool,
        _fast: bool,
    ) -> Result<(), ExportError> {
        if self.read_only {
            return Err(ExportError::ReadOnly);
        }
        let mut data = self.lock();
        let (start, end) = self.range(data.len(), offset, u64::from(length))?;
        data[start..end].fill(0);
        Ok(())
    }

    fn block_status(
        &self,
        offset: u64,
        length: u32,
        max_extents: usize,
    ) -> Result<Vec<Extent>, ExportError> {
        let data = self.lock();
        let (start, end) = self.range(data.len(), offset, u64::from(length))?;
        Ok(Self::runs(&data, start, end)
            .into_iter()
            .take(max_extents.max(1))
            .map(|(s, e, d)| Extent {
                length: (e - s) as u32,
                flags: if d { 0 } else { STATE_HOLE | STATE_ZERO },
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn image(size: u64) -> (tempfile::TempDir, FileExport) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img.raw");
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        let e = FileExport::open(&path, false).unwrap();
        (dir, e)
    }

    fn flatten(chunks: &[ReadChunk]) -> Vec<u8> {
        let mut v = Vec::new();
        for c in chunks {
            match c {
                ReadChunk::Data(d) => v.extend_from_slice(d),
                ReadChunk::Hole(n) => v.resize(v.len() + *n as usize, 0),
            }
        }
        v
    }

    #[test]
    fn sparse_read_block_status_and_trim() {
        let (_d, e) = image(4 * MIB);
        e.write(MIB, &vec![7u8; MIB as usize], true).unwrap();
        let chunks = e.read(MIB - 4096, 8192).unwrap();
        assert_eq!(chunks[0], ReadChunk::Hole(4096));
        assert!(matches!(&chunks[1], ReadChunk::Data(d) if d.len() == 4096 && d[0] == 7));
        let ext = e.block_status(0, 4 * MIB as u32, 100).unwrap();
        assert_eq!(
            ext,
            vec![
                Extent {
                    length: MIB as u32,
                    flags: STATE_HOLE | STATE_ZERO
                },
                Extent {
                    length: MIB as u32,
                    flags: 0
                },
                Extent {
                    length: 2 * MIB as u32,
                    flags: STATE_HOLE | STATE_ZERO
                },
            ]
        );
        assert_eq!(e.block_status(0, 4 * MIB as u32, 1).unwrap().len(), 1);
        e.trim(MIB, 65536, false).unwrap();
        e.write_zeroes(MIB + 65536, 4096, true, false, true)
            .unwrap();
        let data = flatten(&e.read(MIB, 2 * 65536).unwrap());
        assert!(data[..65536 + 4096].iter().all(|&b| b == 0));
        assert!(data[65536 + 4096..].iter().all(|&b| b == 7));
        let ext = e.block_status(MIB, 2 * 65536, 100).unwrap();
        assert_eq!(ext[0].flags, STATE_HOLE | STATE_ZERO);
        assert_eq!(ext[0].length, 65536 + 4096);
        // NO_HOLE zeroing reads back as zeros too.
        e.write_zeroes(MIB + 100_000, 1000, false, true, false)
            .unwrap();
        assert!(flatten(&e.read(MIB + 100_000, 1000).unwrap())
            .iter()
            .all(|&b| b == 0));
        e.flush().unwrap();
        assert!(matches!(
            e.read(4 * MIB - 1, 2),
            Err(ExportError::OutOfRange { .. })
        ));
    }

    #[test]
    fn read_only_refuses_writes_with_eperm() {
        let (d, _) = image(MIB);
        let e = FileExport::open(d.path().join("img.raw"), true).unwrap();
        let cmd = Command::Write {
            offset: 0,
            data: Bytes::from_static(b"x"),
            fua: false,
        };
        assert_eq!(execute(&e, &cmd), Reply::Error(NbdErrno::Perm));
        let cmd = Command::Trim {
            offset: 0,
            length: 1,
            fua: false,
        };
        assert_eq!(execute(&e, &cmd), Reply::Error(NbdErrno::Perm));
        assert!(!e.fast_zero());
    }

    #[test]
    fn mem_export_reports_zero_blocks_as_holes() {
        let m = MemExport::new(3 * MEM_BLOCK_SIZE, false);
        m.write(MEM_BLOCK_SIZE as u64 + 10, b"hi", false).unwrap();
        let c = m.read(0, 3 * MEM_BLOCK_SIZE as u32).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(flatten(&c), m.snapshot());
        let ext = m.block_status(100, 2 * MEM_BLOCK_SIZE as u32, 10).unwrap();
        assert_eq!(ext[0].length as usize, MEM_BLOCK_SIZE - 100);
        assert_eq!(
            ext[1],
            Extent {
                length: MEM_BLOCK_SIZE as u32,
                flags: 0
            }
        );
        assert!(m.read(u64::MAX, 2).is_err());
    }
}
