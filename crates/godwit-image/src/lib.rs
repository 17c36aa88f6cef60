//! godwit-image: builds the bootable test guest (kernel + initramfs) from
//! Debian packages, and caches it.
//!
//! The guest is a stock Debian kernel plus an uncompressed `newc`
//! initramfs holding busybox, the virtio modules, an `/init` script, the
//! static `godwit-guest` instrument and a `/corpus` of real files for the
//! realistic memory load. No disk image is needed.
//!
//! # Layout
//!
//! * this file: [`ImageConfig`], [`GuestImage`], [`build`], [`cached`] and
//!   the cache (key, lock, atomic publish);
//! * [`apt`]: package resolution, download and extraction;
//! * [`kmod`]: module lookup and dependency order from `.modinfo`;
//! * [`cpio`]: the `newc` archive writer.
//!
//! # Cache
//!
//! ```text
//! <cache_dir>/.lock                 flock(2): one builder at a time
//! <cache_dir>/debs/*.deb            downloaded packages, reused
//! <cache_dir>/tmp/build-*/          work dirs (removed; stale ones swept)
//! <cache_dir>/images/<key>/         vmlinuz, initrd.img, manifest.json
//! ```
//!
//! The key is a SHA-256 over everything that determines the image:
//! [`FORMAT_VERSION`], the exact package versions, the guest binary's
//! bytes, the init script, the module lists, the corpus size and the base
//! command line. An image is built in a work dir and published with one
//! `rename(2)`, so `images/<key>` either is complete or does not exist.

#![warn(missing_docs)]

pub mod apt;
pub mod cpio;
pub mod kmod;
pub mod ramimage;

use std::fs::{self, File};
use std::io::BufWriter;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::apt::{AptError, PackageRef};
use crate::cpio::{CpioError, CpioWriter};
use crate::kmod::{KmodError, ModuleTree};

/// Default cache directory.
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/godwit/image";

/// Default kernel package: the flavour metapackage, resolved to the real
/// `linux-image-<version>-amd64` at build time.
pub const DEFAULT_KERNEL_PACKAGE: &str = "linux-image-amd64";

/// Default corpus size: enough real data for meaningful dedup/compression
/// figures while leaving a 256 MiB guest most of its memory.
pub const DEFAULT_CORPUS_MIB: u64 = 48;

/// Package providing a statically linked busybox.
pub const BUSYBOX_PACKAGE: &str = "busybox-static";

/// Modules the guest cannot work without (dependencies are added).
pub const REQUIRED_MODULES: &[&str] = &[
    "virtio",
    "virtio_ring",
    "virtio_pci",
    "virtio_console",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
];

/// Modules loaded when the kernel has them.
pub const OPTIONAL_MODULES: &[&str] = &["virtio_rng"];

/// Base kernel command line. `panic=-1` plus QEMU's `-no-reboot` turns a
/// dead init into a QEMU exit instead of a hang; `quiet` matters under TCG
/// where every console byte costs.
pub const BASE_CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

/// The `/init` script (busybox sh).
pub const INIT_SCRIPT: &str = include_str!("init.sh");

/// Version of the image layout; bump when the build changes in ways the
/// other key inputs do not capture.
pub const FORMAT_VERSION: u32 = 2;

/// Where the guest binary lives in the image.
pub const GUEST_BIN_PATH: &str = "bin/godwit-guest";

/// Errors of the image builder.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Package resolution, download or extraction failed.
    #[error("package step failed")]
    Apt(#[from] AptError),
    /// Module resolution failed.
    #[error("kernel module step failed")]
    Kmod(#[from] KmodError),
    /// Writing the initramfs failed.
    #[error("cannot write the initramfs")]
    Cpio(#[from] CpioError),
    /// A filesystem operation failed.
    #[error("cannot access {path}")]
    Io {
        /// Path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The guest binary is missing or unreadable.
    #[error("cannot read the guest binary {path} (build it with scripts/build-guest.sh)")]
    GuestBin {
        /// Path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// An extracted package does not look as expected.
    #[error("unexpected package layout: {0}")]
    Layout(String),
    /// The cached manifest is unreadable.
    #[error("bad manifest {path}")]
    Manifest {
        /// Path.
        path: PathBuf,
        /// Parse error.
        #[source]
        source: serde_json::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// Cache directory.
    pub cache_dir: PathBuf,
    /// The static `godwit-guest` binary to ship.
    pub guest_bin: PathBuf,
    /// Kernel package (a metapackage is resolved to the real image).
    pub kernel_package: String,
    /// Corpus size in MiB.
    pub corpus_mib: u64,
}

impl ImageConfig {
    /// Defaults with the given guest binary.
    pub fn new(guest_bin: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: PathBuf::from(DEFAULT_CACHE_DIR),
            guest_bin: guest_bin.into(),
            kernel_package: DEFAULT_KERNEL_PACKAGE.to_string(),
            corpus_mib: DEFAULT_CORPUS_MIB,
        }
    }
}

/// A built guest image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestImage {
    /// Kernel (`-kernel`).
    pub kernel: PathBuf,
    /// Initramfs (`-initrd`).
    pub initrd: PathBuf,
    /// Base command line (`-append`); see [`GuestImage::cmdline_with_net`].
    pub cmdline: String,
    /// Kernel release, e.g. `6.1.0-56-amd64`.
    pub kernel_version: String,
    /// Cache key (hex SHA-256).
    pub key: String,
}

impl GuestImage {
    /// The command line with the guest's eth0 address (`ADDR/PREFIX`) and
    /// optional default gateway, as the init script expects them.
    pub fn cmdline_with_net(&self, addr: &str, gw: Option<&str>) -> String {
        let mut s = format!("{} godwit.ip={addr}", self.cmdline);
        if let Some(gw) = gw {
            s.push_str(&format!(" godwit.gw={gw}"));
        }
        s
    }
}

/// What the manifest records besides the image paths.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    cmdline: String,
    kernel_version: String,
    key: String,
    kernel_package: String,
    kernel_package_version: String,
    busybox_version: String,
    modules: Vec<String>,
    corpus_files: u64,
    corpus_bytes: u64,
    initrd_bytes: u64,
}

const KERNEL_FILE: &str = "vmlinuz";
const INITRD_FILE: &str = "initrd.img";
const MANIFEST_FILE: &str = "manifest.json";

/// Resolved inputs of a build.
struct Plan {
    kernel: PackageRef,
    busybox: PackageRef,
    guest: Vec<u8>,
    key: String,
}

fn plan(cfg: &ImageConfig) -> Result<Plan, ImageError> {
    let guest = fs::read(&cfg.guest_bin).map_err(|source| ImageError::GuestBin {
        path: cfg.guest_bin.clone(),
        source,
    })?;
    let kernel = apt::resolve_kernel(&cfg.kernel_package)?;
    let busybox = apt::candidate(BUSYBOX_PACKAGE)?;
    let key = cache_key(cfg, &kernel, &busybox, &guest);
    Ok(Plan {
        kernel,
        busybox,
        guest,
        key,
    })
}

fn cache_key(cfg: &ImageConfig, kernel: &PackageRef, busybox: &PackageRef, guest: &[u8]) -> String {
    let mut h = Sha256::new();
    let mut field = |name: &str, value: &[u8]| {
        // Length-prefixed fields: no two different inputs hash the same.
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((value.len() as u64).to_le_bytes());
        h.update(value);
    };
    field("format", &FORMAT_VERSION.to_le_bytes());
    field(
        "kernel",
        format!("{}={}", kernel.name, kernel.version).as_bytes(),
    );
    field(
        "busybox",
        format!("{}={}", busybox.name, busybox.version).as_bytes(),
    );
    field("guest", guest);
    field("init", INIT_SCRIPT.as_bytes());
    field("modules", REQUIRED_MODULES.join(",").as_bytes());
    field("optional", OPTIONAL_MODULES.join(",").as_bytes());
    field("corpus_mib", &cfg.corpus_mib.to_le_bytes());
    field("cmdline", BASE_CMDLINE.as_bytes());
    hex::encode(h.finalize())
}

fn images_dir(cfg: &ImageConfig) -> PathBuf {
    cfg.cache_dir.join("images")
}

fn load(dir: &Path) -> Result<Option<GuestImage>, ImageError> {
    let mpath = dir.join(MANIFEST_FILE);
    let text = match fs::read_to_string(&mpath) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ImageError::Io {
                path: mpath,
                source,
            })
        }
    };
    let m: Manifest = serde_json::from_str(&text).map_err(|source| ImageError::Manifest {
        path: mpath.clone(),
        source,
    })?;
    Ok(Some(GuestImage {
        kernel: dir.join(KERNEL_FILE),
        initrd: dir.join(INITRD_FILE),
        cmdline: m.cmdline,
        kernel_version: m.kernel_version,
        key: m.key,
    }))
}

/// The cached image for `cfg`, if one with the current key exists.
/// Resolves package versions with `apt-cache` (local, no network unless
/// the lists are missing).
pub fn cached(cfg: &ImageConfig) -> Result<Option<GuestImage>, ImageError> {
    let p = plan(cfg)?;
    load(&images_dir(cfg).join(&p.key))
}

/// Exclusive lock on the cache, released on drop.
struct CacheLock(File);

impl CacheLock {
    fn acquire(dir: &Path) -> Result<Self, ImageError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let path = dir.join(".lock");
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        loop {
            // SAFETY: flock on an fd we own; no memory is involved.
            let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(Self(f));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(ImageError::Io { path, source: e });
            }
        }
    }
}

impl Drop for CacheLock {
    fn drop(&mut self) {
        // SAFETY: as above; closing the fd would release it anyway.
        unsafe {
            libc::flock(self.0.as_raw_fd(), libc::LOCK_UN);
        }
    }
}

/// Build the image for `cfg`, or return the cached one if its key
/// matches. Safe to call concurrently from several processes.
pub fn build(cfg: &ImageConfig) -> Result<GuestImage, ImageError> {
    let p = plan(cfg)?;
    let target = images_dir(cfg).join(&p.key);
    if let Some(img) = load(&target)? {
        return Ok(img);
    }
    let _lock = CacheLock::acquire(&cfg.cache_dir)?;
    // Another builder may have finished while we waited.
    if let Some(img) = load(&target)? {
        return Ok(img);
    }
    // Holding the lock, anything in tmp/ is left over from a crash.
    let tmp_root = cfg.cache_dir.join("tmp");
    if tmp_root.exists() {
        fs::remove_dir_all(&tmp_root).map_err(io_err(&tmp_root))?;
    }
    let work = tmp_root.join(format!("build-{}", std::process::id()));
    fs::create_dir_all(&work).map_err(io_err(&work))?;
    let res = build_in(cfg, &p, &work).and_then(|out| {
        fs::create_dir_all(images_dir(cfg)).map_err(io_err(&images_dir(cfg)))?;
        fs::rename(&out, &target).map_err(io_err(&target))
    });
    let _ = fs::remove_dir_all(&work);
    res?;
    tracing::info!(key = %p.key, dir = %target.display(), "guest image built");
    load(&target)?.ok_or_else(|| ImageError::Layout("published image has no manifest".into()))
}

fn build_in(cfg: &ImageConfig, p: &Plan, work: &Path) -> Result<PathBuf, ImageError> {
    let debs = cfg.cache_dir.join("debs");
    let kroot = work.join("kernel");
    let broot = work.join("busybox");
    apt::extract(&apt::fetch(&p.kernel, &debs)?, &kroot)?;
    apt::extract(&apt::fetch(&p.busybox, &debs)?, &broot)?;

    let kver = apt::kernel_release(&p.kernel.name)
        .ok_or_else(|| {
            ImageError::Layout(format!("{} is not a linux-image package", p.kernel.name))
        })?
        .to_string();
    let vmlinuz = kroot.join("boot").join(format!("vmlinuz-{kver}"));
    let moddir = kroot.join("lib/modules").join(&kver);
    if !vmlinuz.is_file() || !moddir.is_dir() {
        return Err(ImageError::Layout(format!(
            "{} lacks boot/vmlinuz-{kver} or lib/modules/{kver}",
            p.kernel.name
        )));
    }
    let busybox = broot.join("bin/busybox");
    let busybox_bytes = fs::read(&busybox).map_err(io_err(&busybox))?;

    let tree = ModuleTree::scan(&moddir)?;
    let modules = tree.resolve(REQUIRED_MODULES, OPTIONAL_MODULES)?;
    let names: Vec<String> = modules.iter().map(|m| m.name.clone()).collect();
    tracing::info!(kernel = %kver, modules = ?names, "resolved modules");

    let out = work.join("out");
    fs::create_dir_all(&out).map_err(io_err(&out))?;
    fs::copy(&vmlinuz, out.join(KERNEL_FILE)).map_err(io_err(&vmlinuz))?;

    let initrd = out.join(INITRD_FILE);
    let file = File::create(&initrd).map_err(io_err(&initrd))?;
    let mut w = CpioWriter::new(BufWriter::new(file));
    for d in [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "run",
        "root",
        "etc",
        "etc/godwit",
        "lib",
        "lib/modules",
        "corpus",
        "var",
    ] {
        w.dir(d, 0o755)?;
    }
    // The kernel opens /dev/console for init before devtmpfs is mounted.
    w.char_dev("dev/console", 0o600, 5, 1)?;
    w.char_dev("dev/null", 0o666, 1, 3)?;
    w.file("bin/busybox", 0o755, &busybox_bytes)?;
    w.symlink("bin/sh", "busybox")?;
    w.file(GUEST_BIN_PATH, 0o755, &p.guest)?;
    w.file("init", 0o755, INIT_SCRIPT.as_bytes())?;
    for m in &modules {
        w.file(&format!("lib/modules/{}.ko", m.name), 0o644, &m.data)?;
    }
    let mut list = names.join("\n");
    list.push('\n');
    w.file("etc/godwit/modules", 0o644, list.as_bytes())?;
    let (corpus_files, corpus_bytes) =
        write_corpus(&mut w, &kroot, &broot, &moddir, cfg.corpus_mib)?;
    let initrd_bytes = w.bytes_written();
    w.finish()?;

    let manifest = Manifest {
        cmdline: BASE_CMDLINE.to_string(),
        kernel_version: kver,
        key: p.key.clone(),
        kernel_package: p.kernel.name.clone(),
        kernel_package_version: p.kernel.version.clone(),
        busybox_version: p.busybox.version.clone(),
        modules: names,
        corpus_files,
        corpus_bytes,
        initrd_bytes,
    };
    let mpath = out.join(MANIFEST_FILE);
    let text = serde_json::to_string_pretty(&manifest).map_err(|source| ImageError::Manifest {
        path: mpath.clone(),
        source,
    })?;
    fs::write(&mpath, text).map_err(io_err(&mpath))?;
    Ok(out)
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        match e.file_type() {
            Ok(t) if t.is_dir() => files_under(&e.path(), out),
            Ok(t) if t.is_file() => out.push(e.path()),
            _ => {}
        }
    }
}

/// Decompress a `.gz` with the `gzip` tool (docs ship compressed).
fn gunzip(path: &Path) -> Option<Vec<u8>> {
    let out = Command::new("gzip").arg("-dc").arg(path).output().ok()?;
    out.status.success().then_some(out.stdout)
}

/// Add `/corpus`: package text (decompressed docs, kernel config, module
/// lists) first, then kernel modules sampled across the whole tree (in an
/// order given by a hash of their path, so the sample spans drivers, fs,
/// net, crypto... rather than the first directories alphabetically), up
/// to `mib` MiB. Returns (files, bytes).
fn write_corpus<W: std::io::Write>(
    w: &mut CpioWriter<W>,
    kroot: &Path,
    broot: &Path,
    moddir: &Path,
    mib: u64,
) -> Result<(u64, u64), ImageError> {
    let mut c = Corpus {
        budget: mib << 20,
        used: 0,
        files: 0,
        dirs: std::collections::BTreeSet::new(),
    };

    // Text.
    let mut text = Vec::new();
    for root in [kroot, broot] {
        files_under(&root.join("usr/share/doc"), &mut text);
        files_under(&root.join("boot"), &mut text);
    }
    for f in [
        "modules.order",
        "modules.builtin",
        "modules.builtin.modinfo",
    ] {
        text.push(moddir.join(f));
    }
    text.sort();
    for path in text {
        let fname = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        if fname.starts_with("vmlinuz") {
            continue;
        }
        let (name, data) = if let Some(stem) = fname.strip_suffix(".gz") {
            (stem.to_string(), gunzip(&path))
        } else {
            (fname.clone(), fs::read(&path).ok())
        };
        let Some(data) = data else { continue };
        let parent = path
            .parent()
            .and_then(|p| p.file_name())
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        c.add(w, &format!("corpus/text/{parent}/{name}"), &data)?;
    }

    // Modules.
    let mut mods = Vec::new();
    files_under(&moddir.join("kernel"), &mut mods);
    // Hash the path relative to the tree: the work dir differs per build
    // and must not change which files are picked.
    let mut keyed: Vec<([u8; 32], PathBuf)> = mods
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(moddir).unwrap_or(&p).to_string_lossy();
            (Sha256::digest(rel.as_bytes()).into(), p)
        })
        .collect();
    keyed.sort();
    for (_, path) in keyed {
        if c.used >= c.budget {
            break;
        }
        let Ok(rel) = path.strip_prefix(moddir) else {
            continue;
        };
        let data = fs::read(&path).map_err(io_err(&path))?;
        // Skip files that would overflow; smaller ones may still fit.
        c.add(
            w,
            &format!("corpus/modules/{}", rel.to_string_lossy()),
            &data,
        )?;
    }
    Ok((c.files, c.used))
}

/// Corpus accounting while writing.
struct Corpus {
    budget: u64,
    used: u64,
    files: u64,
    dirs: std::collections::BTreeSet<String>,
}

impl Corpus {
    /// Add a file (and its parent dirs) if it fits the budget.
    fn add<W: std::io::Write>(
        &mut self,
        w: &mut CpioWriter<W>,
        name: &str,
        data: &[u8],
    ) -> Result<bool, ImageError> {
        if self.used + data.len() as u64 > self.budget {
            return Ok(false);
        }
        // Parent directories first (cpio needs them before their entries).
        let mut parents: Vec<&str> = Vec::new();
        let mut rest = name;
        while let Some((parent, _)) = rest.rsplit_once('/') {
            parents.push(parent);
            rest = parent;
        }
        for d in parents.into_iter().rev() {
            if d != "corpus" && self.dirs.insert(d.to_string()) {
                w.dir(d, 0o755)?;
            }
        }
        w.file(name, 0o644, data)?;
        self.used += data.len() as u64;
        self.files += 1;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkg(name: &str, version: &str) -> PackageRef {
        PackageRef {
            name: name.into(),
            version: version.into(),
            depends: vec![],
        }
    }

    #[test]
    fn key_depends_on_every_input() {
        let cfg = ImageConfig::new("/x");
        let k = pkg("linux-image-6.1.0-56-amd64", "6.1.192-2");
        let b = pkg("busybox-static", "1:1.35.0-4");
        let base = cache_key(&cfg, &k, &b, b"guest");
        assert_eq!(base.len(), 64);
        assert_eq!(base, cache_key(&cfg, &k, &b, b"guest"));
        assert_ne!(base, cache_key(&cfg, &k, &b, b"guest2"));
        assert_ne!(
            base,
            cache_key(&cfg, &pkg(&k.name, "6.1.192-3"), &b, b"guest")
        );
        assert_ne!(base, cache_key(&cfg, &k, &pkg(&b.name, "1:1.36"), b"guest"));
        let mut c2 = cfg.clone();
        c2.corpus_mib = 8;
        assert_ne!(base, cache_key(&c2, &k, &b, b"guest"));
    }

    #[test]
    fn cmdline_with_net() {
        let img = GuestImage {
            kernel: "k".into(),
            initrd: "i".into(),
            cmdline: BASE_CMDLINE.into(),
            kernel_version: "v".into(),
            key: "k".into(),
        };
        assert_eq!(
            img.cmdline_with_net("10.0.0.2/24", Some("10.0.0.1")),
            "console=ttyS0 panic=-1 quiet godwit.ip=10.0.0.2/24 godwit.gw=10.0.0.1"
        );
        assert!(INIT_SCRIPT.starts_with("#!/bin/busybox sh\n"));
    }
}
