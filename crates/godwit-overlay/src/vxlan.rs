//! VXLAN encapsulation (RFC 7348 §5): the plain, unencrypted overlay mode
//! that lets a Linux kernel `vxlan` device be a peer site.
//!
//! This module owns the 8-byte header and the virtual network identifier
//! ([`Vni`]), which also names a virtual network in the encrypted (QUIC
//! datagram) mode and in the location registry. The outer Ethernet/IP/UDP
//! headers belong to the kernel's UDP socket.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | flags `R R R R I R R R`: I (0x08) = VNI valid |
//! | 1 | 3 | reserved |
//! | 4 | 3 | VNI, big-endian |
//! | 7 | 1 | reserved |
//! | 8 | … | inner Ethernet frame, no FCS |
//!
//! Reserved bits follow the RFC: zero on send, ignored on receipt. (Linux's
//! `vxlan_rcv()` is stricter and drops packets with any of them set, which is
//! why we must send exactly 0x08 and zeros.) A packet whose I flag is clear
//! carries no valid VNI and is dropped. Use UDP port [`VXLAN_UDP_PORT`]
//! explicitly: Linux defaults to 8472.

use crate::frame::ETH_HEADER_LEN;
use bytes::{BufMut, BytesMut};
use std::fmt;

/// Length of the VXLAN header.
pub const VXLAN_HEADER_LEN: usize = 8;
/// IANA-assigned VXLAN UDP destination port (RFC 7348 §5). Linux's default
/// is 8472, so the kernel peer must be created with `dstport 4789`.
pub const VXLAN_UDP_PORT: u16 = 4789;
/// The I flag: the VNI field is valid.
pub const VXLAN_FLAG_I: u8 = 0x08;
/// Largest VNI: the field is 24 bits wide.
pub const MAX_VNI: u32 = 0x00ff_ffff;
/// Bytes VXLAN adds to a frame over an IPv4 underlay (outer Ethernet 14, IPv4
/// 20, UDP 8, VXLAN 8): the guest MTU must be this much below the underlay's,
/// since VTEPs must not fragment (RFC 7348 §4.3).
pub const VXLAN_OVERHEAD_IPV4: usize = 50;
/// Bytes VXLAN adds over an IPv6 underlay (IPv6 header is 40).
pub const VXLAN_OVERHEAD_IPV6: usize = 70;
/// Lowest UDP source port RFC 7348 §5 recommends (dynamic/private range).
pub const SOURCE_PORT_MIN: u16 = 49152;

/// Errors from decoding a VXLAN packet or naming a network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VxlanError {
    /// The datagram is shorter than the header.
    #[error("VXLAN datagram of {len} bytes is shorter than its 8-byte header")]
    TooShort {
        /// Datagram length.
        len: usize,
    },
    /// The I flag is clear, so the VNI is not valid (RFC 7348 §5).
    #[error("VXLAN flags {flags:#04x} lack the I flag")]
    NoVni {
        /// The flags byte.
        flags: u8,
    },
    /// The inner frame cannot hold an Ethernet header.
    #[error("inner frame of {len} bytes is shorter than an Ethernet header")]
    InnerTooShort {
        /// Inner length.
        len: usize,
    },
    /// A VNI above 2^24 − 1.
    #[error("VNI {0} does not fit in 24 bits")]
    VniOutOfRange(u32),
}

/// A 24-bit virtual network identifier.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "u32", into = "u32")]
pub struct Vni(u32);

impl Vni {
    /// A VNI, if `v` fits in 24 bits.
    pub const fn new(v: u32) -> Result<Self, VxlanError> {
        if v > MAX_VNI {
            return Err(VxlanError::VniOutOfRange(v));
        }
        Ok(Self(v))
    }

    /// The numeric value.
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<u32> for Vni {
    type Error = VxlanError;

    fn try_from(v: u32) -> Result<Self, Self::Error> {
        Self::new(v)
    }
}

impl From<Vni> for u32 {
    fn from(v: Vni) -> u32 {
        v.0
    }
}

impl fmt::Display for Vni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Debug for Vni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Vni({})", self.0)
    }
}

/// A decoded VXLAN packet: the network and the inner frame (borrowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanPacket<'a> {
    /// Virtual network.
    pub vni: Vni,
    /// Inner Ethernet frame.
    pub inner: &'a [u8],
}

/// Decodes a UDP payload received on the VXLAN port.
pub fn decode(datagram: &[u8]) -> Result<VxlanPacket<'_>, VxlanError> {
    let Some((h, inner)) = datagram.split_first_chunk::<VXLAN_HEADER_LEN>() else {
        return Err(VxlanError::TooShort {
            len: datagram.len(),
        });
    };
    // Only the I bit is interpreted; the other flag bits and the reserved
    // fields are ignored on receipt (RFC 7348 §5).
    if h[0] & VXLAN_FLAG_I == 0 {
        return Err(VxlanError::NoVni { flags: h[0] });
    }
    if inner.len() < ETH_HEADER_LEN {
        return Err(VxlanError::InnerTooShort { len: inner.len() });
    }
    let vni = Vni(u32::from_be_bytes([0, h[4], h[5], h[6]]));
    Ok(VxlanPacket { vni, inner })
}

/// The header for `vni`: flags exactly 0x08, reserved fields zero.
pub fn encode_header(vni: Vni) -> [u8; VXLAN_HEADER_LEN] {
    let v = vni.0.to_be_bytes();
    [VXLAN_FLAG_I, 0, 0, 0, v[1], v[2], v[3], 0]
}

/// Appends header and inner frame to `dst` (the UDP payload to send).
pub fn encode(vni: Vni, inner: &[u8], dst: &mut BytesMut) {
    dst.reserve(VXLAN_HEADER_LEN + inner.len());
    dst.put_slice(&encode_header(vni));
    dst.put_slice(inner);
}

/// A UDP source port for `inner` in 49152..=65535, derived from the inner
/// MAC addresses and EtherType so one flow keeps one underlay path while
/// different flows spread over ECMP links (RFC 7348 §5).
pub fn source_port(inner: &[u8]) -> u16 {
    // FNV-1a over the first 14 bytes: cheap, stable across runs and agents.
    let mut h: u32 = 0x811c_9dc5;
    for &b in inner.iter().take(ETH_HEADER_LEN) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let span = u32::from(u16::MAX - SOURCE_PORT_MIN) + 1;
    // `h % span` < 16384, so the sum stays within u16.
    SOURCE_PORT_MIN + (h % span) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_is_exactly_what_linux_accepts() {
        let vni = Vni::new(0x12_3456).unwrap();
        assert_eq!(encode_header(vni), [0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0]);
        let mut out = BytesMut::new();
        encode(vni, &[1; 14], &mut out);
        let p = decode(&out).unwrap();
        assert_eq!((p.vni, p.inner), (vni, &[1u8; 14][..]));
    }

    #[test]
    fn reserved_bits_are_ignored_on_receive() {
        let mut d = vec![0xff, 0xff, 0xff, 0xff, 0, 0, 42, 0xff];
        d.extend_from_slice(&[0; 14]);
        assert_eq!(decode(&d).unwrap().vni, Vni::new(42).unwrap());
        d[0] = 0xf7; // everything but I
        assert_eq!(decode(&d), Err(VxlanError::NoVni { flags: 0xf7 }));
    }

    #[test]
    fn rejects_short_input() {
        assert_eq!(decode(&[8, 0, 0]), Err(VxlanError::TooShort { len: 3 }));
        assert_eq!(
            decode(&[8, 0, 0, 0, 0, 0, 1, 0, 1]),
            Err(VxlanError::InnerTooShort { len: 1 })
        );
    }

    #[test]
    fn vni_range_and_serde() {
        assert!(Vni::new(MAX_VNI).is_ok());
        assert_eq!(
            Vni::new(MAX_VNI + 1),
            Err(VxlanError::VniOutOfRange(MAX_VNI + 1))
        );
        let v = Vni::new(100).unwrap();
        assert_eq!(serde_json::to_string(&v).unwrap(), "100");
        assert!(serde_json::from_str::<Vni>("16777216").is_err());
    }

    proptest! {
        #[test]
        fn roundtrip(v in 0..=MAX_VNI, inner in proptest::collection::vec(any::<u8>(), 14..200)) {
            let vni = Vni::new(v).unwrap();
            let mut out = BytesMut::new();
            encode(vni, &inner, &mut out);
            let p = decode(&out).unwrap();
            prop_assert_eq!(p.vni, vni);
            prop_assert_eq!(p.inner, &inner[..]);
            let sp = source_port(&inner);
            prop_assert!(sp >= SOURCE_PORT_MIN);
        }

        #[test]
        fn decode_never_panics(d in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(p) = decode(&d) {
                prop_assert!(p.vni.get() <= MAX_VNI);
                prop_assert_eq!(p.inner.len() + VXLAN_HEADER_LEN, d.len());
            }
        }
    }
}
