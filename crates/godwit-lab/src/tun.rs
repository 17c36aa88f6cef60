//! Creating a TUN device in the calling thread's network namespace.
//!
//! The device lives as long as the fd: when the WAN daemon exits, every
//! `wan0` (with its addresses and routes) disappears with it.

use std::os::fd::{FromRawFd, OwnedFd};

/// `_IOW('T', 202, int)`: attach the fd to a (new) TUN/TAP device.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// Length of an interface name buffer, including the NUL.
const IFNAMSIZ: usize = 16;

/// The part of `struct ifreq` TUNSETIFF reads: name, then flags; padded to
/// the kernel's 40-byte size.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens `/dev/net/tun` non-blocking and creates TUN device `name`
/// (IFF_TUN | IFF_NO_PI: raw IP packets, no extra header).
pub(crate) fn open_tun(name: &str) -> std::io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= IFNAMSIZ {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: constant NUL-terminated path; open has no other preconditions.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by open and is owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; IFNAMSIZ],
        // Flag values fit in a c_short (0x0001 | 0x1000).
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req` is
    // laid out as and sized like; it lives across the call.
    if unsafe { libc::ioctl(fd, TUNSETIFF, &mut req as *mut IfReq) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(owned)
}
