//! `godwit image`: the test guest (Debian kernel + initramfs with the
//! `godwit-guest` tool), built once and cached outside the repository.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use crate::output::Out;

/// Image subcommands.
#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Build (or reuse) the guest image and print its paths.
    Build {
        /// The static godwit-guest binary (default: found next to godwit).
        #[arg(long, env = "GODWIT_GUEST_BIN")]
        guest_bin: Option<PathBuf>,
        /// Cache directory.
        #[arg(long, default_value = "/var/cache/godwit/image")]
        cache_dir: PathBuf,
    },
}

/// Finds the static guest tool: flag/env, then the cargo target layout
/// that `scripts/build-guest.sh` produces, then next to this binary. A
/// dynamically linked build (for instance the workspace's own debug build)
/// cannot run in the guest's busybox userland and is skipped.
pub fn find_guest_bin(explicit: Option<PathBuf>) -> Result<PathBuf> {
    let explicit = explicit.or_else(|| std::env::var_os("GODWIT_GUEST_BIN").map(PathBuf::from));
    if let Some(p) = explicit {
        if !p.is_file() {
            bail!("guest tool {} does not exist", p.display());
        }
        if !is_static_elf(&p)? {
            bail!(
                "guest tool {} is dynamically linked; build it with scripts/build-guest.sh",
                p.display()
            );
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("locating the godwit binary")?;
    let dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    let candidates = [
        dir.join("../x86_64-unknown-linux-gnu/release/godwit-guest"),
        dir.join("../../x86_64-unknown-linux-gnu/release/godwit-guest"),
        dir.join("../../target/x86_64-unknown-linux-gnu/release/godwit-guest"),
        dir.join("godwit-guest"),
    ];
    for c in candidates {
        if c.is_file() && is_static_elf(&c).unwrap_or(false) {
            return Ok(c);
        }
    }
    bail!("cannot find a statically linked godwit-guest; build it with scripts/build-guest.sh or pass --guest-bin")
}

/// Whether an ELF executable has no program interpreter (`PT_INTERP`),
/// i.e. runs without a dynamic loader.
pub fn is_static_elf(path: &std::path::Path) -> Result<bool> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let bad = || anyhow::anyhow!("{} is not a 64-bit little-endian ELF file", path.display());
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 || data[5] != 1 {
        return Err(bad());
    }
    let u16_at = |o: usize| {
        data.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(|b: [u8; 8]| u64::from_le_bytes(b) as usize)
    };
    let phoff = u64_at(0x20).ok_or_else(bad)?;
    let phentsize = u16_at(0x36).ok_or_else(bad)?;
    let phnum = u16_at(0x38).ok_or_else(bad)?;
    const PT_INTERP: u32 = 3;
    for i in 0..phnum {
        let off = phoff + i * phentsize;
        let ty = data.get(off..off + 4).ok_or_else(bad)?;
        if u32::from_le_bytes([ty[0], ty[1], ty[2], ty[3]]) == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The image config for a cache dir and guest tool.
pub fn config(cache_dir: PathBuf, guest_bin: PathBuf) -> godwit_image::ImageConfig {
    godwit_image::ImageConfig {
        cache_dir,
        ..godwit_image::ImageConfig::new(guest_bin)
    }
}

/// Builds the image unless a matching one is cached.
pub async fn ensure(
    out: Out,
    guest_bin: Option<PathBuf>,
    cache_dir: PathBuf,
) -> Result<godwit_image::GuestImage> {
    let cfg = config(cache_dir, find_guest_bin(guest_bin)?);
    if let Some(img) = godwit_image::cached(&cfg)? {
        return Ok(img);
    }
    out.note("building the guest image from Debian packages (first use only)...");
    let img = tokio::task::spawn_blocking(move || godwit_image::build(&cfg))
        .await
        .context("image builder panicked")?
        .context("building the guest image")?;
    Ok(img)
}

/// Runs an image subcommand.
pub async fn run(c: ImageCmd, out: Out) -> Result<()> {
    match c {
        ImageCmd::Build {
            guest_bin,
            cache_dir,
        } => {
            let img = ensure(out, guest_bin, cache_dir).await?;
            out.result("image", &img, || {
                format!(
                    "kernel  {}\ninitrd  {}\ncmdline {}\nversion {}",
                    img.kernel.display(),
                    img.initrd.display(),
                    img.cmdline,
                    img.kernel_version
                )
            });
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_dynamic_executables() {
        // This test binary is dynamically linked (cargo's default).
        let me = std::env::current_exe().unwrap();
        assert!(!is_static_elf(&me).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x");
        std::fs::write(&f, b"#!/bin/sh\n").unwrap();
        assert!(is_static_elf(&f).is_err());
    }
}
