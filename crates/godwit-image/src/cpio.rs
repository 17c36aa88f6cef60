//! A streaming writer for `newc` cpio archives, the format the kernel
//! unpacks as an initramfs (Documentation/driver-api/early-userspace/
//! buffer-format.rst).
//!
//! # Entry layout
//!
//! `070701`, then 13 fields of 8 hex digits (ino, mode, uid, gid, nlink,
//! mtime, filesize, devmajor, devminor, rdevmajor, rdevminor, namesize
//! including the NUL, check = 0), the NUL-terminated name padded to 4
//! bytes, then the data padded to 4 bytes. The archive ends with an entry
//! named `TRAILER!!!`.
//!
//! Entries are written with uid/gid 0 and mtime 0 so the archive is a pure
//! function of its contents (reproducible images, stable cache keys).

use std::io::{self, Write};

/// Magic of the `newc` format (no checksums).
const NEWC_MAGIC: &[u8; 6] = b"070701";

/// File type bits.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Largest file the format can describe (filesize is 32 bits).
pub const MAX_FILE_SIZE: u64 = u32::MAX as u64;

/// Errors writing an archive.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    /// The underlying writer failed.
    #[error("cannot write cpio archive")]
    Io(#[from] io::Error),
    /// The entry cannot be represented in `newc`.
    #[error("entry {name} is too large for newc ({size} bytes)")]
    TooLarge {
        /// Entry name.
        name: String,
        /// Size.
        size: u64,
    },
    /// Names must be relative paths without `..`.
    #[error("bad entry name {name:?}")]
    BadName {
        /// Entry name.
        name: String,
    },
}

/// Writes a `newc` archive to `W`.
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    /// Start an archive.
    pub fn new(out: W) -> Self {
        Self {
            out,
            next_ino: 1,
            written: 0,
        }
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    fn put(&mut self, b: &[u8]) -> Result<(), CpioError> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<(), CpioError> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }

    fn header(
        &mut self,
        name: &str,
        mode: u32,
        size: u64,
        rdev: (u32, u32),
    ) -> Result<(), CpioError> {
        if name != "TRAILER!!!"
            && (name.is_empty() || name.starts_with('/') || name.split('/').any(|c| c == ".."))
        {
            return Err(CpioError::BadName {
                name: name.to_string(),
            });
        }
        let filesize = u32::try_from(size).map_err(|_| CpioError::TooLarge {
            name: name.to_string(),
            size,
        })?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let namesize = name.len() + 1;
        let fields: [u32; 13] = [
            ino,
            mode,
            0,
            0,
            nlink,
            0,
            filesize,
            0,
            0,
            rdev.0,
            rdev.1,
            u32::try_from(namesize).map_err(|_| CpioError::BadName {
                name: name.to_string(),
            })?,
            0,
        ];
        let mut h = Vec::with_capacity(110 + namesize);
        h.extend_from_slice(NEWC_MAGIC);
        for f in fields {
            h.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        h.extend_from_slice(name.as_bytes());
        h.push(0);
        self.put(&h)?;
        self.pad()
    }

    /// Add a directory.
    pub fn dir(&mut self, name: &str, perm: u32) -> Result<(), CpioError> {
        self.header(name, S_IFDIR | (perm & 0o7777), 0, (0, 0))
    }

    /// Add a regular file with `data`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<(), CpioError> {
        self.header(name, S_IFREG | (perm & 0o7777), data.len() as u64, (0, 0))?;
        self.put(data)?;
        self.pad()
    }

    /// Add a symlink `name` -> `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> Result<(), CpioError> {
        self.header(name, S_IFLNK | 0o777, target.len() as u64, (0, 0))?;
        self.put(target.as_bytes())?;
        self.pad()
    }

    /// Add a character device node (no privileges needed to write one).
    pub fn char_dev(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        self.header(name, S_IFCHR | (perm & 0o7777), 0, (major, minor))
    }

    /// Write the trailer and return the writer.
    pub fn finish(mut self) -> Result<W, CpioError> {
        self.header("TRAILER!!!", 0, 0, (0, 0))?;
        // Pad to 512 like cpio(1); the kernel does not care, tools might.
        let n = (512 - (self.written % 512) as usize) % 512;
        self.put(&vec![0u8; n])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_format() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin", 0o755).unwrap();
        w.file("bin/hello", 0o755, b"hello!").unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.char_dev("dev/console", 0o600, 5, 1).unwrap();
        let out = w.finish().unwrap();
        assert_eq!(out.len() % 512, 0);
        // First header: magic, ino 1, mode 040755, nlink 2, name "bin".
        assert_eq!(&out[..6], b"070701");
        assert_eq!(&out[6..14], b"00000001");
        assert_eq!(&out[14..22], b"000041ed");
        assert_eq!(&out[94..102], b"00000004"); // namesize "bin\0"
        assert_eq!(&out[110..114], b"bin\0");
        // Second entry starts 4-aligned right after (110 + 4 = 114 -> 116).
        assert_eq!(&out[116..122], b"070701");
        let s = String::from_utf8_lossy(&out);
        assert!(s.contains("bin/hello\0"));
        assert!(s.contains("hello!"));
        assert!(s.contains("TRAILER!!!"));
        assert!(CpioWriter::new(Vec::new())
            .file("/abs", 0o644, b"")
            .is_err());
        assert!(CpioWriter::new(Vec::new())
            .file("a/../b", 0o644, b"")
            .is_err());
    }

    #[test]
    fn cpio_tool_reads_it() {
        // Cross-check with GNU cpio when it is installed.
        if std::process::Command::new("cpio")
            .arg("--version")
            .output()
            .is_err()
        {
            return;
        }
        let mut w = CpioWriter::new(Vec::new());
        w.dir("d", 0o755).unwrap();
        w.file("d/f", 0o644, b"abc").unwrap();
        w.symlink("d/l", "f").unwrap();
        let data = w.finish().unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&data).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "d\nd/f\nd/l\n");
    }
}
