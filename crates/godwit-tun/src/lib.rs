//! Creating Linux TUN and TAP devices (`/dev/net/tun`, TUNSETIFF) in the
//! calling thread's network namespace.
//!
//! A device created here is not persistent: it lives as long as the
//! returned fd, so a crashed owner leaves nothing behind (the lab's `wan0`
//! with its routes, the agent's gateway device with its addresses).
//! Configuring the device (addresses, MAC, MTU, up) is the caller's.

use std::os::fd::{FromRawFd, OwnedFd};

/// `_IOW('T', 202, int)`: attach the fd to a (new) TUN/TAP device.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// Length of an interface name buffer, including the NUL.
pub const IFNAMSIZ: usize = 16;

/// What the device carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Raw IP packets (IFF_TUN).
    Tun,
    /// Ethernet frames without FCS (IFF_TAP).
    Tap,
}

/// The part of `struct ifreq` TUNSETIFF reads: name, then flags; padded to
/// the kernel's 40-byte size.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens `/dev/net/tun` non-blocking and creates device `name` in `mode`,
/// without the packet-information header (IFF_NO_PI): one read or write is
/// one packet or frame.
pub fn open(name: &str, mode: Mode) -> std::io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= IFNAMSIZ || name.contains(['/', ' ', '\0']) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?} (1 to {} bytes)", IFNAMSIZ - 1),
        ));
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
    let kind = match mode {
        Mode::Tun => libc::IFF_TUN,
        Mode::Tap => libc::IFF_TAP,
    };
    let mut req = IfReq {
        name: [0; IFNAMSIZ],
        // Flag values fit in a c_short (0x0001/0x0002 | 0x1000).
        flags: (kind | libc::IFF_NO_PI) as libc::c_short,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_names() {
        for n in ["", "a-name-too-long-x", "a/b", "a b"] {
            let e = open(n, Mode::Tap).expect_err(n);
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{n}");
        }
    }
}
