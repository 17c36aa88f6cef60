//! Transmission-phase requests: framing (`check`, then `parse`) and
//! validation against the negotiated export, so that the shell only ever
//! sees typed, in-range [`Command`]s.

use bytes::{Buf, Bytes, BytesMut};

use super::conn::ProtoError;
use super::{
    NbdErrno, CMD_BLOCK_STATUS, CMD_DISC, CMD_FLAG_DF, CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
    FLAG_SEND_DF, FLAG_SEND_FAST_ZERO, MAX_PAYLOAD_LEN, REQUEST_HEADER_LEN, REQUEST_MAGIC,
};

/// One validated request from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Opaque client cookie (handle), echoed in the reply.
    pub cookie: u64,
    /// What to do.
    pub command: Command,
}

/// A validated command: offsets and lengths are inside the export, flags are
/// ones this server advertised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Read `length` bytes at `offset`. `df`: reply in one data chunk.
    Read {
        /// Start offset.
        offset: u64,
        /// Bytes to read (at most [`MAX_PAYLOAD_LEN`]).
        length: u32,
        /// Don't fragment: no hole chunks in the reply.
        df: bool,
    },
    /// Write `data` at `offset`.
    Write {
        /// Start offset.
        offset: u64,
        /// Payload (at most [`MAX_PAYLOAD_LEN`]).
        data: Bytes,
        /// Persist before replying.
        fua: bool,
    },
    /// Make every completed write durable.
    Flush,
    /// Discard a range (content becomes undefined; we make it read zeros).
    Trim {
        /// Start offset.
        offset: u64,
        /// Length in bytes.
        length: u32,
        /// Persist before replying.
        fua: bool,
    },
    /// Make a range read as zeros.
    WriteZeroes {
        /// Start offset.
        offset: u64,
        /// Length in bytes.
        length: u32,
        /// Persist before replying.
        fua: bool,
        /// Do not punch a hole (allocate zeros instead).
        no_hole: bool,
        /// Fail with ENOTSUP unless it is faster than writing zeros.
        fast: bool,
    },
    /// Report `base:allocation` status for a range.
    BlockStatus {
        /// Start offset.
        offset: u64,
        /// Length of the range of interest.
        length: u32,
        /// Exactly one extent in the reply.
        req_one: bool,
    },
}

impl Command {
    /// Short name for logs and error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Read { .. } => "read",
            Command::Write { .. } => "write",
            Command::Flush => "flush",
            Command::Trim { .. } => "trim",
            Command::WriteZeroes { .. } => "write-zeroes",
            Command::BlockStatus { .. } => "block-status",
        }
    }
}

/// A framed request header, not yet validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawHeader {
    pub(crate) flags: u16,
    pub(crate) kind: u16,
    pub(crate) cookie: u64,
    pub(crate) offset: u64,
    pub(crate) length: u32,
}

/// Length of the next complete message in `buf` (header plus WRITE payload),
/// `Ok(None)` if more bytes are needed. Errors are fatal: the stream cannot
/// be resynchronised.
pub(crate) fn check(buf: &[u8]) -> Result<Option<usize>, ProtoError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadRequestMagic { magic });
    }
    if buf.len() < REQUEST_HEADER_LEN {
        return Ok(None);
    }
    let kind = u16::from_be_bytes([buf[6], buf[7]]);
    let length = u32::from_be_bytes([buf[24], buf[25], buf[26], buf[27]]);
    let payload = if kind == CMD_WRITE {
        if length > MAX_PAYLOAD_LEN {
            // Skipping 4 GiB to stay in sync is not worth it; the spec lets
            // the server disconnect on oversized writes.
            return Err(ProtoError::PayloadTooLarge { length });
        }
        length as usize
    } else {
        0
    };
    let total = REQUEST_HEADER_LEN + payload;
    Ok((buf.len() >= total).then_some(total))
}

/// Split one complete message (as measured by [`check`]) off `buf`.
pub(crate) fn parse(buf: &mut BytesMut, total: usize) -> (RawHeader, Bytes) {
    let mut msg = buf.split_to(total);
    msg.advance(4); // magic, checked by `check`
    let flags = msg.get_u16();
    let kind = msg.get_u16();
    let cookie = msg.get_u64();
    let offset = msg.get_u64();
    let length = msg.get_u32();
    (
        RawHeader {
            flags,
            kind,
            cookie,
            offset,
            length,
        },
        msg.freeze(),
    )
}

/// What a framed request turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Validated {
    Command(Command),
    Disconnect,
    /// Answer with this error; the stream stays in sync.
    Refused(NbdErrno, &'static str),
}

/// Check a request against the export (`size`, `read_only`, advertised
/// `tflags`) and the negotiated features.
pub(crate) fn validate(
    h: &RawHeader,
    payload: Bytes,
    size: u64,
    read_only: bool,
    tflags: u16,
    base_allocation: bool,
) -> Validated {
    use Validated::Refused;
    // FUA is valid on every command once advertised (spec, "Command flags").
    let mut allowed = CMD_FLAG_FUA;
    match h.kind {
        CMD_READ if tflags & FLAG_SEND_DF != 0 => allowed |= CMD_FLAG_DF,
        CMD_WRITE_ZEROES => {
            allowed |= CMD_FLAG_NO_HOLE;
            if tflags & FLAG_SEND_FAST_ZERO != 0 {
                allowed |= CMD_FLAG_FAST_ZERO;
            }
        }
        CMD_BLOCK_STATUS => allowed |= CMD_FLAG_REQ_ONE,
        _ => {}
    }
    if h.kind == CMD_DISC {
        return Validated::Disconnect;
    }
    if h.flags & !allowed != 0 {
        return Refused(NbdErrno::Inval, "unsupported command flags");
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let in_range = h
        .offset
        .checked_add(u64::from(h.length))
        .is_some_and(|end| end <= size);
    let writes = matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && read_only {
        return Refused(NbdErrno::Perm, "export is read-only");
    }
    if matches!(h.kind, CMD_READ | CMD_WRITE) && h.length > MAX_PAYLOAD_LEN {
        // Only reachable for READ: WRITE was cut off by `check`.
        return if h.flags & CMD_FLAG_DF != 0 {
            Refused(NbdErrno::Overflow, "read larger than the maximum payload")
        } else {
            Refused(NbdErrno::Inval, "read larger than the maximum payload")
        };
    }
    if h.kind != CMD_FLUSH && !in_range {
        return if matches!(h.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
            Refused(NbdErrno::NoSpc, "write beyond the end of the export")
        } else {
            Refused(NbdErrno::Inval, "request beyond the end of the export")
        };
    }
    let (offset, length) = (h.offset, h.length);
    let command = match h.kind {
        CMD_READ => Command::Read {
            offset,
            length,
            df: h.flags & CMD_FLAG_DF != 0,
        },
        CMD_WRITE => Command::Write {
            offset,
            data: payload,
            fua,
        },
        CMD_FLUSH => Command::Flush,
        CMD_TRIM => Command::Trim {
            offset,
            length,
            fua,
        },
        CMD_WRITE_ZEROES => Command::WriteZeroes {
            offset,
            length,
            fua,
            no_hole: h.flags & CMD_FLAG_NO_HOLE != 0,
            fast: h.flags & CMD_FLAG_FAST_ZERO != 0,
        },
        CMD_BLOCK_STATUS => {
            if !base_allocation {
                return Refused(NbdErrno::Inval, "no metadata context negotiated");
            }
            if length == 0 {
                // Unspecified by the spec; a reply needs a non-empty extent.
                return Refused(NbdErrno::Inval, "zero-length block status");
            }
            Command::BlockStatus {
                offset,
                length,
                req_one: h.flags & CMD_FLAG_REQ_ONE != 0,
            }
        }
        // CACHE (not advertised), RESIZE and anything unknown.
        _ => return Refused(NbdErrno::Inval, "unsupported command"),
    };
    Validated::Command(command)
}

/// Encode a request header (used by tests, the fuzz seeds and clients).
pub fn encode_request(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) -> [u8; 28] {
    let mut b = [0u8; REQUEST_HEADER_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&length.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{FLAG_HAS_FLAGS, FLAG_SEND_FUA};

    fn raw(flags: u16, kind: u16, offset: u64, length: u32) -> RawHeader {
        RawHeader {
            flags,
            kind,
            cookie: 7,
            offset,
            length,
        }
    }

    const TF: u16 = FLAG_HAS_FLAGS | FLAG_SEND_FUA;

    #[test]
    fn check_waits_for_header_and_payload() {
        let h = encode_request(0, CMD_WRITE, 1, 0, 10);
        assert_eq!(check(&h[..3]), Ok(None));
        assert_eq!(check(&h), Ok(None));
        let mut full = h.to_vec();
        full.extend_from_slice(&[0; 10]);
        assert_eq!(check(&full), Ok(Some(38)));
        let r = encode_request(0, CMD_READ, 1, 0, u32::MAX);
        assert_eq!(check(&r), Ok(Some(28)));
    }

    #[test]
    fn check_rejects_bad_magic_and_huge_writes() {
        assert!(matches!(
            check(&[0x21, 0xe4, 0x1c, 0x71]),
            Err(ProtoError::BadRequestMagic { .. })
        ));
        let w = encode_request(0, CMD_WRITE, 1, 0, MAX_PAYLOAD_LEN + 1);
        assert!(matches!(check(&w), Err(ProtoError::PayloadTooLarge { .. })));
    }

    #[test]
    fn validate_bounds_flags_and_read_only() {
        let v = |h: RawHeader, ro: bool| validate(&h, Bytes::new(), 1000, ro, TF, false);
        assert!(matches!(
            v(raw(0, CMD_READ, 0, 1000), false),
            Validated::Command(Command::Read { .. })
        ));
        assert_eq!(
            v(raw(0, CMD_READ, 1, 1000), false),
            Validated::Refused(NbdErrno::Inval, "request beyond the end of the export")
        );
        assert!(matches!(
            v(raw(0, CMD_WRITE_ZEROES, u64::MAX, 2), false),
            Validated::Refused(NbdErrno::NoSpc, _)
        ));
        assert!(matches!(
            v(raw(0, CMD_TRIM, 0, 1), true),
            Validated::Refused(NbdErrno::Perm, _)
        ));
        // DF was not advertised (no structured replies).
        assert!(matches!(
            v(raw(CMD_FLAG_DF, CMD_READ, 0, 1), false),
            Validated::Refused(NbdErrno::Inval, _)
        ));
        // FUA on a read is accepted (spec: valid on all commands).
        assert!(matches!(
            v(raw(CMD_FLAG_FUA, CMD_READ, 0, 1), false),
            Validated::Command(_)
        ));
        assert!(matches!(
            v(raw(0, CMD_BLOCK_STATUS, 0, 1), false),
            Validated::Refused(NbdErrno::Inval, _)
        ));
        assert!(matches!(
            v(raw(0, 99, 0, 0), false),
            Validated::Refused(NbdErrno::Inval, _)
        ));
        assert_eq!(v(raw(0, CMD_DISC, 0, 0), false), Validated::Disconnect);
        assert!(matches!(
            v(raw(0, CMD_FLUSH, 5000, 5), false),
            Validated::Command(Command::Flush)
        ));
    }
}
