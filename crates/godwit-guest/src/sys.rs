//! Small Linux helpers: clocks, boot id, memory figures, and an owned
//! anonymous mapping. Everything that calls `libc` directly lives here so
//! the `unsafe` surface is in one place.

use std::io;

use crate::proto::MemInfo;

/// Milliseconds since boot (`CLOCK_BOOTTIME`): continues across a live
/// migration, and counts time the guest was paused by the host, so a host
/// can see a jump across a switchover.
pub fn uptime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000
}

/// Monotonic nanoseconds (`CLOCK_MONOTONIC`), for timestamps in packets.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// The kernel's random boot id (changes at every boot, kept by migration).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Parse `/proc/meminfo`-style text (values in kB).
pub fn parse_meminfo(text: &str) -> MemInfo {
    let mut m = MemInfo::default();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(key), Some(val)) = (it.next(), it.next()) else {
            continue;
        };
        let Ok(v) = val.parse::<u64>() else { continue };
        match key {
            "MemTotal:" => m.total_kib = v,
            "MemFree:" => m.free_kib = v,
            "MemAvailable:" => m.available_kib = v,
            "Cached:" => m.cached_kib = v,
            "Shmem:" => m.shmem_kib = v,
            "AnonPages:" => m.anon_kib = v,
            _ => {}
        }
    }
    m
}

/// Current `/proc/meminfo` figures (zeros if unreadable).
pub fn meminfo() -> MemInfo {
    std::fs::read_to_string("/proc/meminfo")
        .map(|t| parse_meminfo(&t))
        .unwrap_or_default()
}

/// This process's resident anonymous memory (`RssAnon`), in bytes.
pub fn rss_anon_bytes() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/self/status") else {
        return 0;
    };
    text.lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// An owned, page-aligned, private anonymous mapping.
///
/// Used instead of a `Vec` for two reasons: the memory dirtier wants real
/// page-granular memory it can reason about, and O_DIRECT block I/O needs
/// page-aligned buffers.
pub struct AnonMap {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is exclusively owned by this value; access goes
// through `&self`/`&mut self` so Rust's aliasing rules apply as for a Vec.
unsafe impl Send for AnonMap {}
// SAFETY: shared access only hands out `&[u8]`, which is fine across threads.
unsafe impl Sync for AnonMap {}

impl AnonMap {
    /// Map `len` bytes of zeroed memory (not yet touched).
    pub fn new(len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "zero-length mapping",
            ));
        }
        // SAFETY: anonymous private mapping with no address hint; the
        // result is checked for MAP_FAILED before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false (zero-length maps are refused); for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole mapping.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr/len describe a live mapping owned by self; anonymous
        // memory is always initialised (zero-filled).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The whole mapping, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AnonMap {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; nothing borrows
        // the mapping once we are being dropped.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// A small, fast PRNG (xorshift64*) for choosing pages, blocks and sizes.
/// Not for anything security related.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seed from `seed` (0 is remapped, xorshift cannot leave 0).
    pub fn new(seed: u64) -> Self {
        Self(if seed == 0 {
            0x2545_F491_4F6C_DD1D
        } else {
            seed
        })
    }

    /// Seed from the clock.
    pub fn from_clock() -> Self {
        Self::new(monotonic_ns() ^ u64::from(std::process::id()).rotate_left(40))
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish value in `0..n` (`n` > 0; modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_parses() {
        let m = parse_meminfo(
            "MemTotal:  250000 kB\nMemFree: 1000 kB\nMemAvailable: 2000 kB\n\
             Cached: 300 kB\nShmem: 40 kB\nAnonPages: 50 kB\nbogus\n",
        );
        assert_eq!(m.total_kib, 250000);
        assert_eq!(m.free_kib, 1000);
        assert_eq!(m.available_kib, 2000);
        assert_eq!(m.cached_kib, 300);
        assert_eq!(m.shmem_kib, 40);
        assert_eq!(m.anon_kib, 50);
    }

    #[test]
    fn anon_map_is_usable() {
        let mut m = AnonMap::new(8192).unwrap();
        assert_eq!(m.as_slice().as_ptr() as usize % 4096, 0);
        m.as_mut_slice()[8191] = 7;
        assert_eq!(m.as_slice()[8191], 7);
        assert!(uptime_ms() > 0);
    }
}
