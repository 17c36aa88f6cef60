//! The overlay header of a guest frame carried between agents as a QUIC
//! datagram (encrypted and authenticated by the peer connection's TLS).
//!
//! Unlike VXLAN this header carries what [`crate::dedup`] needs: how the
//! frame crossed the overlay ([`Delivery`]) and how many of the receiver's
//! registry updates the sender had applied when it sent it (`ack`).
//!
//! | offset | size | field                                           |
//! |--------|------|-------------------------------------------------|
//! | 0      | 1    | version, [`DATAGRAM_VERSION`]                   |
//! | 1      | 1    | delivery: 1 unicast, 2 flood, 3 relayed         |
//! | 2      | 4    | VNI, little-endian, below 2^24                  |
//! | 6      | 8    | ack, little-endian                              |
//! | 14     | rest | the Ethernet frame (no FCS), at least 14 bytes  |
//!
//! Version 0 is reserved as invalid. A receiver drops datagrams of another
//! version: both agents of a connection negotiated the same control
//! protocol, so a mismatch is a bug or an attack, never a rollout.

use crate::switch::Delivery;
use crate::vxlan::Vni;
use bytes::{BufMut, BytesMut};

/// Header version this code writes and accepts.
pub const DATAGRAM_VERSION: u8 = 1;
/// Bytes of the header before the frame.
pub const DATAGRAM_HEADER_LEN: usize = 14;
/// Shortest frame accepted: an Ethernet header (dst, src, EtherType).
pub const MIN_FRAME_LEN: usize = 14;

/// Why a datagram was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    /// Shorter than a header plus an Ethernet header.
    #[error("overlay datagram of {len} bytes is too short")]
    TooShort {
        /// Datagram length.
        len: usize,
    },
    /// Unknown header version.
    #[error("overlay datagram version {0} is not {DATAGRAM_VERSION}")]
    Version(u8),
    /// Unknown delivery value.
    #[error("overlay datagram delivery {0} is unknown")]
    Delivery(u8),
    /// The VNI does not fit in 24 bits.
    #[error("overlay datagram VNI {0} is out of range")]
    Vni(u32),
}

/// The decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatagramHeader {
    /// Network.
    pub vni: Vni,
    /// How the frame crossed the overlay.
    pub delivery: Delivery,
    /// Registry updates from the receiver the sender had applied.
    pub ack: u64,
}

/// Appends the header and `frame` to `dst`.
pub fn encode(h: &DatagramHeader, frame: &[u8], dst: &mut BytesMut) {
    dst.reserve(DATAGRAM_HEADER_LEN + frame.len());
    dst.put_u8(DATAGRAM_VERSION);
    dst.put_u8(h.delivery.as_u8());
    dst.put_u32_le(h.vni.get());
    dst.put_u64_le(h.ack);
    dst.put_slice(frame);
}

/// Splits a datagram into its header and frame.
pub fn decode(src: &[u8]) -> Result<(DatagramHeader, &[u8]), DatagramError> {
    if src.len() < DATAGRAM_HEADER_LEN + MIN_FRAME_LEN {
        return Err(DatagramError::TooShort { len: src.len() });
    }
    let (head, frame) = src.split_at(DATAGRAM_HEADER_LEN);
    if head[0] != DATAGRAM_VERSION {
        return Err(DatagramError::Version(head[0]));
    }
    let delivery = Delivery::from_u8(head[1]).ok_or(DatagramError::Delivery(head[1]))?;
    let vni = u32::from_le_bytes([head[2], head[3], head[4], head[5]]);
    let vni = Vni::new(vni).map_err(|_| DatagramError::Vni(vni))?;
    let mut ack = [0u8; 8];
    ack.copy_from_slice(&head[6..14]);
    Ok((
        DatagramHeader {
            vni,
            delivery,
            ack: u64::from_le_bytes(ack),
        },
        frame,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame() -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 1, 0x08, 0x00]);
        f.extend_from_slice(b"payload");
        f
    }

    #[test]
    fn roundtrip() {
        let h = DatagramHeader {
            vni: Vni::new(0x00ab_cdef).unwrap(),
            delivery: Delivery::Relayed,
            ack: 0x0102_0304_0506_0708,
        };
        let mut b = BytesMut::new();
        encode(&h, &frame(), &mut b);
        assert_eq!(b.len(), DATAGRAM_HEADER_LEN + frame().len());
        assert_eq!(&b[..6], &[1, 3, 0xef, 0xcd, 0xab, 0]);
        let (g, f) = decode(&b).unwrap();
        assert_eq!(g, h);
        assert_eq!(f, &frame()[..]);
    }

    #[test]
    fn rejects_bad_headers() {
        let h = DatagramHeader {
            vni: Vni::new(1).unwrap(),
            delivery: Delivery::Flood,
            ack: 0,
        };
        let mut b = BytesMut::new();
        encode(&h, &frame(), &mut b);
        let mut v = b.to_vec();
        v[0] = 0;
        assert_eq!(decode(&v), Err(DatagramError::Version(0)));
        let mut v = b.to_vec();
        v[1] = 9;
        assert_eq!(decode(&v), Err(DatagramError::Delivery(9)));
        let mut v = b.to_vec();
        v[5] = 1;
        assert_eq!(decode(&v), Err(DatagramError::Vni(1 << 24 | 1)));
        assert_eq!(
            decode(&b[..DATAGRAM_HEADER_LEN + 13]),
            Err(DatagramError::TooShort {
                len: DATAGRAM_HEADER_LEN + 13
            })
        );
    }
}
