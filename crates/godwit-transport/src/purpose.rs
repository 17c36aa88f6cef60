//! Stream purposes and the 1-byte stream header (sans-IO).
//!
//! Every bidirectional stream starts with one byte naming its purpose, written
//! by the opener. Besides routing, writing it immediately makes quinn announce
//! the stream to the peer (quinn only sends a STREAM frame once data exists).
//!
//! | byte | purpose               | send priority |
//! |------|-----------------------|---------------|
//! | 0    | invalid (reserved)    | —             |
//! | 1    | control               | 100           |
//! | 2    | memory                | 40            |
//! | 3    | storage, on demand    | 80            |
//! | 4    | storage, background   | 0             |
//! | 5    | overlay registry link | 60            |
//!
//! Priorities feed [`quinn::SendStream::set_priority`]: higher goes first.
//! Control must never wait behind bulk data; on-demand storage reads block a
//! running guest, so they beat memory pre-copy; background storage copy
//! only uses what is left.

/// Application error code used to reset a stream whose header byte is not a
/// known purpose.
pub const STREAM_ERROR_UNKNOWN_PURPOSE: u32 = 1;
/// Application error code used to reset a stream whose header did not arrive
/// in time (or at all).
pub const STREAM_ERROR_NO_HEADER: u32 = 2;

/// What a stream carries; its wire value is the 1-byte stream header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum StreamPurpose {
    /// Agent control messages (migration commands, acks).
    Control = 1,
    /// Guest RAM pages.
    Memory = 2,
    /// Disk blocks the destination needs right now (post-copy faults).
    StorageOnDemand = 3,
    /// Bulk disk relocation.
    StorageBackground = 4,
    /// The overlay's registry link: location updates, in order (the guest
    /// frames themselves travel as QUIC datagrams).
    NetworkFrames = 5,
}

/// A header byte that names no purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown stream purpose byte {0:#04x}")]
pub struct UnknownPurpose(pub u8);

impl StreamPurpose {
    /// Every purpose, in wire order.
    pub const ALL: [StreamPurpose; 5] = [
        StreamPurpose::Control,
        StreamPurpose::Memory,
        StreamPurpose::StorageOnDemand,
        StreamPurpose::StorageBackground,
        StreamPurpose::NetworkFrames,
    ];

    /// The header byte.
    pub const fn to_byte(self) -> u8 {
        self as u8
    }

    /// Parses a header byte.
    pub const fn from_byte(byte: u8) -> Result<StreamPurpose, UnknownPurpose> {
        Ok(match byte {
            1 => StreamPurpose::Control,
            2 => StreamPurpose::Memory,
            3 => StreamPurpose::StorageOnDemand,
            4 => StreamPurpose::StorageBackground,
            5 => StreamPurpose::NetworkFrames,
            other => return Err(UnknownPurpose(other)),
        })
    }

    /// Send priority for quinn (higher is sent first); see the module table.
    pub const fn priority(self) -> i32 {
        match self {
            StreamPurpose::Control => 100,
            StreamPurpose::StorageOnDemand => 80,
            StreamPurpose::NetworkFrames => 60,
            StreamPurpose::Memory => 40,
            StreamPurpose::StorageBackground => 0,
        }
    }
}

impl TryFrom<u8> for StreamPurpose {
    type Error = UnknownPurpose;

    fn try_from(byte: u8) -> Result<Self, Self::Error> {
        StreamPurpose::from_byte(byte)
    }
}

impl std::fmt::Display for StreamPurpose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StreamPurpose::Control => "control",
            StreamPurpose::Memory => "memory",
            StreamPurpose::StorageOnDemand => "storage-on-demand",
            StreamPurpose::StorageBackground => "storage-background",
            StreamPurpose::NetworkFrames => "network-frames",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_roundtrips_or_is_rejected() {
        for byte in 0..=u8::MAX {
            match StreamPurpose::from_byte(byte) {
                Ok(p) => assert_eq!(p.to_byte(), byte),
                Err(e) => {
                    assert_eq!(e, UnknownPurpose(byte));
                    assert!(byte == 0 || byte > 5);
                }
            }
        }
    }

    #[test]
    fn priorities_follow_the_documented_order() {
        use StreamPurpose::*;
        let order = [
            Control,
            StorageOnDemand,
            NetworkFrames,
            Memory,
            StorageBackground,
        ];
        for pair in order.windows(2) {
            assert!(pair[0].priority() > pair[1].priority(), "{pair:?}");
        }
    }
}
