//! Where a guest's boot media show up in its RAM, page by page.
//!
//! A booted Linux guest holds much of its kernel and initramfs verbatim in
//! 4 KiB pages: QEMU loads the `-kernel` and `-initrd` files at page-aligned
//! addresses (the copies stay in freed memory until reused), the kernel
//! unpacks every initramfs member into tmpfs pages aligned to the member's
//! start, and the decompressed kernel's loadable segments sit page-aligned
//! in memory. A migration destination that has the same files can find
//! those pages locally instead of over the WAN. This module lists the file
//! extents (offset, length ≤ 4 KiB; a short tail is zero-padded to a page)
//! whose contents may appear as guest pages; the site store hashes them.
//! Nothing here is trusted for correctness: a page is used only if its
//! fingerprint matches, so a wrong guess costs a hash, never a wrong page.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Guest page size the extents are cut to.
pub const PAGE: u64 = 4096;
/// Largest decompressed kernel or initramfs accepted (guards memory
/// against a hostile or corrupt file).
pub const MAX_DECOMPRESSED: u64 = 1 << 30;
/// `newc` cpio magic.
const NEWC: &[u8; 6] = b"070701";
/// `newc` header length.
const NEWC_HEADER: usize = 110;

/// Errors reading boot media.
#[derive(Debug, thiserror::Error)]
pub enum RamImageError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not in a format this module understands.
    #[error("{path}: {what}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

/// Page-sized extents of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extents {
    /// The file.
    pub path: PathBuf,
    /// (offset, length ≤ [`PAGE`]) pairs.
    pub chunks: Vec<(u64, u32)>,
}

/// Every extent of a kernel and initramfs that may be a guest page.
/// Decompressed forms are written to `work_dir` (named by the source's
/// size and modification time, so they are reused). Parts that cannot be
/// understood are skipped with a log line: the whole-file extents still
/// count.
pub fn boot_media_extents(
    kernel: &Path,
    initrd: Option<&Path>,
    work_dir: &Path,
) -> Result<Vec<Extents>, RamImageError> {
    let mut out = vec![file_pages(kernel)?];
    match vmlinux(kernel, work_dir).and_then(|p| elf_load_pages(&p)) {
        Ok(e) => out.push(e),
        Err(e) => tracing::info!(cause = %e, "kernel segments not indexed"),
    }
    if let Some(initrd) = initrd {
        out.push(file_pages(initrd)?);
        match initramfs_archive(initrd, work_dir).and_then(|p| cpio_member_pages(&p)) {
            Ok(e) => out.push(e),
            Err(e) => tracing::info!(cause = %e, "initramfs members not indexed"),
        }
    }
    Ok(out)
}

/// The whole file in page-aligned pieces.
pub fn file_pages(path: &Path) -> Result<Extents, RamImageError> {
    let len = fs::metadata(path).map_err(io(path))?.len();
    Ok(Extents {
        path: path.into(),
        chunks: pieces(0, len),
    })
}

fn pieces(start: u64, len: u64) -> Vec<(u64, u32)> {
    (0..len.div_ceil(PAGE))
        .map(|i| (start + i * PAGE, (len - i * PAGE).min(PAGE) as u32))
        .collect()
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> RamImageError + '_ {
    move |source| RamImageError::Io {
        path: path.into(),
        source,
    }
}

fn format(path: &Path, what: impl Into<String>) -> RamImageError {
    RamImageError::Format {
        path: path.into(),
        what: what.into(),
    }
}

/// The data of every regular member of a `newc` archive (or several
/// concatenated), page by page from the member's start: how tmpfs holds
/// the unpacked files.
pub fn cpio_member_pages(path: &Path) -> Result<Extents, RamImageError> {
    let data = fs::read(path).map_err(io(path))?;
    Ok(Extents {
        path: path.into(),
        chunks: cpio_members(&data).map_err(|what| format(path, what))?,
    })
}

/// [`cpio_member_pages`] of an archive in memory.
pub fn cpio_members(data: &[u8]) -> Result<Vec<(u64, u32)>, String> {
    let mut chunks = Vec::new();
    let mut off = 0usize;
    loop {
        // Archives may be concatenated with zero padding between them.
        while off < data.len() && data[off] == 0 {
            off += 1;
        }
        if off >= data.len() {
            break;
        }
        let hdr = data
            .get(off..off + NEWC_HEADER)
            .ok_or_else(|| format!("truncated cpio header at {off}"))?;
        if &hdr[..6] != NEWC {
            return Err(format!("no newc header at {off}"));
        }
        let field = |i: usize| {
            std::str::from_utf8(&hdr[6 + i * 8..14 + i * 8])
                .ok()
                .and_then(|s| u32::from_str_radix(s, 16).ok())
                .ok_or_else(|| format!("bad cpio field {i} at {off}"))
        };
        let mode = field(1)?;
        let size = field(6)? as usize;
        let namesize = field(11)? as usize;
        let name_end = off + NEWC_HEADER + namesize;
        let data_start = (name_end + 3) & !3;
        let name = data
            .get(off + NEWC_HEADER..name_end.saturating_sub(1).max(off + NEWC_HEADER))
            .ok_or_else(|| "truncated cpio name".to_string())?;
        if data_start.saturating_add(size) > data.len() {
            return Err(format!("cpio member at {off} runs past the end"));
        }
        if name == b"TRAILER!!!" {
            off = data_start + size;
            continue;
        }
        if mode & 0o170_000 == 0o100_000 && size > 0 {
            chunks.extend(pieces(data_start as u64, size as u64));
        }
        off = (data_start + size + 3) & !3;
    }
    Ok(chunks)
}

/// The loadable segments of an ELF64 kernel, page by page.
pub fn elf_load_pages(path: &Path) -> Result<Extents, RamImageError> {
    let elf = fs::read(path).map_err(io(path))?;
    Ok(Extents {
        path: path.into(),
        chunks: elf_segments(&elf).map_err(|what| format(path, what))?,
    })
}

/// [`elf_load_pages`] of an ELF64 image in memory.
pub fn elf_segments(elf: &[u8]) -> Result<Vec<(u64, u32)>, String> {
    if elf.get(..5) != Some(b"\x7fELF\x02") {
        return Err("not an ELF64 file".into());
    }
    // Offsets come from the file: never let them overflow.
    let field = |o: usize, n: usize| elf.get(o..o.checked_add(n)?);
    let u16_at = |o: usize| field(o, 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| field(o, 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at = |o: usize| {
        field(o, 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let bad = || "truncated ELF header".to_string();
    let phoff = usize::try_from(u64_at(0x20).ok_or_else(bad)?).map_err(|_| bad())?;
    let phentsize = u16_at(0x36).ok_or_else(bad)? as usize;
    let phnum = u16_at(0x38).ok_or_else(bad)? as usize;
    let mut chunks = Vec::new();
    for i in 0..phnum {
        let ph = i
            .checked_mul(phentsize)
            .and_then(|x| x.checked_add(phoff))
            .ok_or_else(bad)?;
        if u32_at(ph).ok_or_else(bad)? != 1 {
            continue; // not PT_LOAD
        }
        let offset = u64_at(ph.saturating_add(8)).ok_or_else(bad)?;
        let filesz = u64_at(ph.saturating_add(32)).ok_or_else(bad)?;
        if offset.saturating_add(filesz) > elf.len() as u64 {
            return Err("segment beyond the file".into());
        }
        chunks.extend(pieces(offset, filesz));
    }
    Ok(chunks)
}

/// A derived file's name in `work_dir`: the source's name, size and
/// modification time, so a changed source gets a new one.
fn derived_path(src: &Path, work_dir: &Path, what: &str) -> Result<PathBuf, RamImageError> {
    let md = fs::metadata(src).map_err(io(src))?;
    let mtime = md
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let base = src
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    Ok(work_dir.join(format!("{base}-{}-{mtime}.{what}", md.len())))
}

/// Writes `data` to `path` atomically.
fn write_atomic(path: &Path, data: &[u8]) -> Result<(), RamImageError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, data).map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

/// The decompressed kernel of a bzImage, cached in `work_dir`.
pub fn vmlinux(bzimage: &Path, work_dir: &Path) -> Result<PathBuf, RamImageError> {
    let out = derived_path(bzimage, work_dir, "vmlinux")?;
    if out.exists() {
        return Ok(out);
    }
    let bz = fs::read(bzimage).map_err(io(bzimage))?;
    let payload = bzimage_payload(&bz).map_err(|what| format(bzimage, what))?;
    // The kernel build appends the decompressed size (le32) to an xz
    // payload, which liblzma reads as a corrupt stream end: try without.
    let data = decompress(payload)
        .or_else(|e| match payload.len().checked_sub(4) {
            Some(n) if payload.starts_with(b"\xfd7zXZ\x00") => decompress(&payload[..n]),
            _ => Err(e),
        })
        .map_err(|what| format(bzimage, what))?;
    write_atomic(&out, &data)?;
    Ok(out)
}

/// The compressed kernel inside a bzImage.
pub fn bzimage_payload(bz: &[u8]) -> Result<&[u8], String> {
    // Boot protocol ≥ 2.08: setup_sects at 0x1f1, "HdrS" at 0x202,
    // payload_offset/length at 0x248/0x24c, relative to the protected-mode
    // code after (setup_sects + 1) sectors.
    if bz.get(0x202..0x206) != Some(b"HdrS") {
        return Err("not a bzImage".into());
    }
    let u32_at = |o: usize| {
        bz.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let setup_sects = match bz.get(0x1f1) {
        Some(0) => 4,
        Some(&n) => n as usize,
        None => return Err("truncated header".into()),
    };
    let (Some(poff), Some(plen)) = (u32_at(0x248), u32_at(0x24c)) else {
        return Err("truncated header".into());
    };
    let start = (setup_sects + 1) * 512 + poff;
    bz.get(start..start.saturating_add(plen))
        .ok_or_else(|| "payload beyond the file".into())
}

/// The initramfs as an uncompressed archive: the file itself when it is
/// one, else its decompressed form cached in `work_dir`.
pub fn initramfs_archive(initrd: &Path, work_dir: &Path) -> Result<PathBuf, RamImageError> {
    let mut head = [0u8; 6];
    fs::File::open(initrd)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(io(initrd))?;
    if &head == NEWC {
        return Ok(initrd.into());
    }
    let out = derived_path(initrd, work_dir, "cpio")?;
    if !out.exists() {
        let raw = fs::read(initrd).map_err(io(initrd))?;
        let data = decompress(&raw).map_err(|what| format(initrd, what))?;
        write_atomic(&out, &data)?;
    }
    Ok(out)
}

/// Decompresses xz, gzip or zstd, bounded by [`MAX_DECOMPRESSED`].
fn decompress(data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let limit = MAX_DECOMPRESSED + 1;
    let r = if data.starts_with(b"\xfd7zXZ\x00") {
        xz2::read::XzDecoder::new(data)
            .take(limit)
            .read_to_end(&mut out)
    } else if data.starts_with(b"\x1f\x8b") {
        flate2::read::GzDecoder::new(data)
            .take(limit)
            .read_to_end(&mut out)
    } else if data.starts_with(b"\x28\xb5\x2f\xfd") {
        zstd::stream::read::Decoder::new(data).and_then(|d| d.take(limit).read_to_end(&mut out))
    } else {
        return Err("compressed with a method we do not read (xz, gzip, zstd)".into());
    };
    r.map_err(|e| format!("decompressing: {e}"))?;
    if out.len() as u64 > MAX_DECOMPRESSED {
        return Err(format!(
            "decompresses to more than {MAX_DECOMPRESSED} bytes"
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio::CpioWriter;

    #[test]
    fn member_pages_start_at_each_members_data() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = CpioWriter::new(Vec::new());
        w.dir("d", 0o755).unwrap();
        w.file("d/a", 0o644, &vec![1u8; 5000]).unwrap();
        w.symlink("d/l", "a").unwrap();
        w.file("d/b", 0o644, &[2u8; 10]).unwrap();
        let mut bytes = w.finish().unwrap();
        // A second archive after zero padding, as concatenated initrds are.
        bytes.resize(bytes.len().next_multiple_of(512), 0);
        let mut w2 = CpioWriter::new(Vec::new());
        w2.file("c", 0o644, &[3u8; 4096]).unwrap();
        bytes.extend(w2.finish().unwrap());
        let p = dir.path().join("initrd");
        fs::write(&p, &bytes).unwrap();
        let e = cpio_member_pages(&p).unwrap();
        let got: Vec<Vec<u8>> = e
            .chunks
            .iter()
            .map(|&(o, l)| bytes[o as usize..o as usize + l as usize].to_vec())
            .collect();
        assert_eq!(
            got,
            vec![
                vec![1u8; 4096],
                vec![1u8; 904],
                vec![2u8; 10],
                vec![3u8; 4096]
            ]
        );
        // Truncation is an error, not a panic.
        fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        assert!(cpio_member_pages(&p).is_err());
    }

    #[test]
    fn compressed_initramfs_is_unpacked_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = CpioWriter::new(Vec::new());
        w.file("x", 0o644, &[7u8; 9000]).unwrap();
        let cpio = w.finish().unwrap();
        let z = zstd::encode_all(&cpio[..], 3).unwrap();
        let p = dir.path().join("initrd.zst");
        fs::write(&p, z).unwrap();
        let a = initramfs_archive(&p, dir.path()).unwrap();
        assert_ne!(a, p);
        assert_eq!(fs::read(&a).unwrap(), cpio);
        assert_eq!(cpio_member_pages(&a).unwrap().chunks.len(), 3);
        fs::write(&p, b"not compressed at all").unwrap();
        assert!(initramfs_archive(&p, dir.path()).is_err());
    }

    /// A minimal ELF64 with one PT_LOAD segment of `seg` at file offset
    /// 4096.
    fn elf_with(seg: &[u8]) -> Vec<u8> {
        let mut e = vec![0u8; 4096];
        e[..5].copy_from_slice(b"\x7fELF\x02");
        e[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // phoff
        e[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // phentsize
        e[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes()); // phnum
        let ph = 64;
        e[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        e[ph + 8..ph + 16].copy_from_slice(&4096u64.to_le_bytes());
        e[ph + 32..ph + 40].copy_from_slice(&(seg.len() as u64).to_le_bytes());
        e.extend_from_slice(seg);
        e
    }

    #[test]
    fn kernel_segments_from_an_xz_bzimage_with_its_size_suffix() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let seg: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let elf = elf_with(&seg);
        let mut xz = xz2::write::XzEncoder::new(Vec::new(), 6);
        xz.write_all(&elf).unwrap();
        let mut payload = xz.finish().unwrap();
        payload.extend_from_slice(&(elf.len() as u32).to_le_bytes());
        let mut bz = vec![0u8; 1024 + 16];
        bz[0x1f1] = 1; // setup sectors: protected-mode code at 1024
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        bz[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        bz.extend_from_slice(&payload);
        let p = dir.path().join("vmlinuz");
        fs::write(&p, &bz).unwrap();
        let v = vmlinux(&p, dir.path()).unwrap();
        assert_eq!(fs::read(&v).unwrap(), elf);
        let e = elf_load_pages(&v).unwrap();
        assert_eq!(e.chunks, vec![(4096, 4096), (8192, 4096), (12288, 1808)]);
        // Not a bzImage.
        fs::write(&p, b"plain").unwrap();
        assert!(vmlinux(&p, &dir.path().join("other")).is_err());
    }

    #[test]
    fn file_pages_cover_the_file() {
        assert_eq!(pieces(0, 0), vec![]);
        assert_eq!(pieces(10, 4097), vec![(10, 4096), (4106, 1)]);
        assert!(elf_load_pages(Path::new("/nonexistent")).is_err());
    }
}
