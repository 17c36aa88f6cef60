//! Ethernet frame views and the few L2/L3 packets the overlay reads or forges.
//!
//! This module owns everything the switch needs to know about a guest frame:
//! its MAC addresses, EtherType (behind at most one 802.1Q tag), ARP and RARP
//! packets, the source address of IPv4/IPv6 packets, and IPv6 Neighbour
//! Solicitations/Advertisements. It also builds the frames the agent sends on
//! a guest's behalf (gratuitous ARP, unsolicited NA) or as the distributed
//! gateway (ARP replies, solicited NA).
//!
//! Every parser takes untrusted bytes (a guest, a peer site, a kernel VXLAN
//! device) and never panics: it returns [`FrameError`] or `None`. Frames come
//! without preamble or FCS and may be shorter than 60 bytes (QEMU does not
//! pad); frames built here are padded to [`MIN_FRAME_LEN`].
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 6 | destination MAC |
//! | 6 | 6 | source MAC |
//! | 12 | 2 | EtherType, or TPID 0x8100 followed by TCI(2) and the EtherType |
//! | 14 / 18 | … | payload |

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Length of an untagged Ethernet header (no preamble, no FCS).
pub const ETH_HEADER_LEN: usize = 14;
/// Length of one 802.1Q tag (TPID + TCI).
pub const VLAN_TAG_LEN: usize = 4;
/// Frames this module builds are padded to the Ethernet minimum without FCS
/// (64 − 4), as QEMU's own RARP frames are; some bridges drop runts.
pub const MIN_FRAME_LEN: usize = 60;
/// Length of an ARP packet for Ethernet/IPv4 (RFC 826).
pub const ARP_LEN: usize = 28;
/// Length of the fixed IPv6 header (RFC 8200).
pub const IPV6_HEADER_LEN: usize = 40;
/// Length of the fixed IPv4 header without options (RFC 791).
pub const IPV4_MIN_HEADER_LEN: usize = 20;
/// Length of an ND message up to and including its target address (RFC 4861
/// §4.3/§4.4: type, code, checksum, 4 bytes of flags/reserved, target).
pub const ND_MIN_LEN: usize = 24;
/// Hop limit every ND message must carry (RFC 4861 §7.1.1): anything else was
/// routed and must be ignored.
pub const ND_HOP_LIMIT: u8 = 255;

/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// EtherType of RARP (what QEMU sends after an incoming migration).
pub const ETHERTYPE_RARP: u16 = 0x8035;
/// TPID of an 802.1Q tag.
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// EtherType of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// IPv6 next-header value of ICMPv6.
pub const IPPROTO_ICMPV6: u8 = 58;
/// ICMPv6 type of a Neighbour Solicitation.
pub const ICMPV6_NS: u8 = 135;
/// ICMPv6 type of a Neighbour Advertisement.
pub const ICMPV6_NA: u8 = 136;

/// ND option: source link-layer address.
const ND_OPT_SOURCE_LLA: u8 = 1;
/// ND option: target link-layer address.
const ND_OPT_TARGET_LLA: u8 = 2;

/// Errors from parsing a frame or one of its payloads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Fewer bytes than the header being parsed needs.
    #[error("{what} of {len} bytes is shorter than the {need} bytes required")]
    TooShort {
        /// What was being parsed.
        what: &'static str,
        /// Bytes available.
        len: usize,
        /// Bytes required.
        need: usize,
    },
    /// An ARP packet for something other than Ethernet/IPv4.
    #[error("ARP packet for htype {htype} ptype {ptype:#06x} hlen {hlen} plen {plen} is not Ethernet/IPv4")]
    ArpNotEthernetIpv4 {
        /// Hardware type.
        htype: u16,
        /// Protocol type.
        ptype: u16,
        /// Hardware address length.
        hlen: u8,
        /// Protocol address length.
        plen: u8,
    },
    /// An ICMPv6 ND message that RFC 4861 §7.1 says to discard.
    #[error("invalid neighbour discovery message: {0}")]
    InvalidNd(&'static str),
    /// A MAC address string that is not six colon-separated hex octets.
    #[error("invalid MAC address {0:?}")]
    BadMac(String),
}

/// A 48-bit IEEE 802 MAC address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);
    /// 00:00:00:00:00:00.
    pub const ZERO: MacAddr = MacAddr([0; 6]);

    /// True for group addresses (broadcast included): the I/G bit is set.
    pub fn is_multicast(self) -> bool {
        self.0[0] & 1 == 1
    }

    /// True for ff:ff:ff:ff:ff:ff.
    pub fn is_broadcast(self) -> bool {
        self == Self::BROADCAST
    }

    /// True for an individual address that is not all zeros: the only kind a
    /// guest may use as a source.
    pub fn is_unicast(self) -> bool {
        !self.is_multicast() && self != Self::ZERO
    }

    /// The Ethernet multicast address of an IPv6 multicast group
    /// (RFC 2464 §7: 33:33 followed by the last four bytes).
    pub fn ipv6_multicast(group: Ipv6Addr) -> MacAddr {
        let o = group.octets();
        MacAddr([0x33, 0x33, o[12], o[13], o[14], o[15]])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MacAddr {
    type Err = FrameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let p = parts.next().ok_or_else(|| FrameError::BadMac(s.into()))?;
            if p.len() != 2 {
                return Err(FrameError::BadMac(s.into()));
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| FrameError::BadMac(s.into()))?;
        }
        if parts.next().is_some() {
            return Err(FrameError::BadMac(s.into()));
        }
        Ok(MacAddr(out))
    }
}

impl serde::Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A checked view of an Ethernet frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EthernetFrame<'a> {
    bytes: &'a [u8],
    dst: MacAddr,
    src: MacAddr,
    vlan_tci: Option<u16>,
    ethertype: u16,
    payload_offset: usize,
}

impl<'a> EthernetFrame<'a> {
    /// Parses the header of `bytes`. At most one 802.1Q tag is understood;
    /// a second tag (QinQ) is left as the EtherType 0x8100 of the payload.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, FrameError> {
        if bytes.len() < ETH_HEADER_LEN {
            return Err(FrameError::TooShort {
                what: "Ethernet frame",
                len: bytes.len(),
                need: ETH_HEADER_LEN,
            });
        }
        let dst = mac_at(bytes, 0);
        let src = mac_at(bytes, 6);
        let mut ethertype = be16(bytes, 12);
        let mut vlan_tci = None;
        let mut payload_offset = ETH_HEADER_LEN;
        if ethertype == ETHERTYPE_VLAN {
            let need = ETH_HEADER_LEN + VLAN_TAG_LEN;
            if bytes.len() < need {
                return Err(FrameError::TooShort {
                    what: "802.1Q-tagged Ethernet frame",
                    len: bytes.len(),
                    need,
                });
            }
            vlan_tci = Some(be16(bytes, 14));
            ethertype = be16(bytes, 16);
            payload_offset = need;
        }
        Ok(Self {
            bytes,
            dst,
            src,
            vlan_tci,
            ethertype,
            payload_offset,
        })
    }

    /// Destination MAC.
    pub fn dst(&self) -> MacAddr {
        self.dst
    }

    /// Source MAC.
    pub fn src(&self) -> MacAddr {
        self.src
    }

    /// The 802.1Q tag control information, if the frame is tagged.
    pub fn vlan_tci(&self) -> Option<u16> {
        self.vlan_tci
    }

    /// The 12-bit VLAN id, if the frame is tagged.
    pub fn vlan_id(&self) -> Option<u16> {
        self.vlan_tci.map(|t| t & 0x0fff)
    }

    /// The EtherType after any 802.1Q tag.
    pub fn ethertype(&self) -> u16 {
        self.ethertype
    }

    /// Everything after the Ethernet header (and tag), padding included.
    pub fn payload(&self) -> &'a [u8] {
        // `payload_offset` ≤ len was checked in `parse`.
        &self.bytes[self.payload_offset..]
    }

    /// The whole frame.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The ARP or RARP packet, `Ok(None)` if the frame is neither.
    pub fn arp(&self) -> Result<Option<ArpPacket>, FrameError> {
        match self.ethertype {
            ETHERTYPE_ARP | ETHERTYPE_RARP => ArpPacket::parse(self.payload()).map(Some),
            _ => Ok(None),
        }
    }

    /// True for QEMU's post-migration announcement: a RARP reverse request
    /// whose sender is the frame's source.
    pub fn is_rarp_announce(&self) -> bool {
        self.ethertype == ETHERTYPE_RARP
            && matches!(self.arp(), Ok(Some(a)) if a.op == ArpOp::ReverseRequest && a.sha == self.src)
    }

    /// Source address of an IPv4 packet, `None` if this is not one or it is
    /// too short.
    pub fn ipv4_source(&self) -> Option<Ipv4Addr> {
        let p = self.payload();
        if self.ethertype != ETHERTYPE_IPV4 || p.len() < IPV4_MIN_HEADER_LEN || p[0] >> 4 != 4 {
            return None;
        }
        Some(Ipv4Addr::new(p[12], p[13], p[14], p[15]))
    }

    /// Source address of an IPv6 packet, `None` if this is not one or it is
    /// too short.
    pub fn ipv6_source(&self) -> Option<Ipv6Addr> {
        let p = self.payload();
        if self.ethertype != ETHERTYPE_IPV6 || p.len() < IPV6_HEADER_LEN || p[0] >> 4 != 6 {
            return None;
        }
        Some(ipv6_at(p, 8))
    }

    /// The Neighbour Solicitation or Advertisement carried by this frame,
    /// `Ok(None)` for anything else. Only ND directly after the fixed IPv6
    /// header is recognised (RFC 4861 messages carry no extension headers in
    /// practice, and a router alert or fragment would be suspicious).
    pub fn neighbour(&self) -> Result<Option<NdMessage>, FrameError> {
        let p = self.payload();
        if self.ethertype != ETHERTYPE_IPV6 || p.len() < IPV6_HEADER_LEN || p[0] >> 4 != 6 {
            return Ok(None);
        }
        if p[6] != IPPROTO_ICMPV6 {
            return Ok(None);
        }
        let plen = usize::from(be16(p, 4));
        let Some(icmp) = p.get(IPV6_HEADER_LEN..IPV6_HEADER_LEN + plen) else {
            return Err(FrameError::TooShort {
                what: "IPv6 payload",
                len: p.len() - IPV6_HEADER_LEN,
                need: plen,
            });
        };
        let Some(&ty) = icmp.first() else {
            return Ok(None);
        };
        if ty != ICMPV6_NS && ty != ICMPV6_NA {
            return Ok(None);
        }
        NdMessage::parse(ipv6_at(p, 8), ipv6_at(p, 24), p[7], icmp).map(Some)
    }

    /// Whether this is an ARP reply or a Neighbour Advertisement.
    pub fn is_neighbour_answer(&self) -> bool {
        if let Ok(Some(arp)) = self.arp() {
            return arp.op == ArpOp::Reply;
        }
        matches!(
            self.neighbour(),
            Ok(Some(NdMessage {
                kind: NdKind::Advertisement { .. },
                ..
            }))
        )
    }

    /// The IP address this frame proves its sender owns, as EVPN learns
    /// MAC/IP bindings: the sender of an ARP request or reply (not a probe
    /// with sender 0.0.0.0, and only if the ARP sender is the frame's source),
    /// the target of a Neighbour Advertisement or the source of a Neighbour
    /// Solicitation (not from `::`, the DAD case). Plain IP traffic is not
    /// used: a guest that routes would otherwise claim every address it
    /// forwards.
    pub fn learned_ip(&self) -> Option<IpAddr> {
        if self.ethertype == ETHERTYPE_ARP {
            let arp = self.arp().ok()??;
            let usable = matches!(arp.op, ArpOp::Request | ArpOp::Reply)
                && arp.sha == self.src
                && !arp.spa.is_unspecified()
                && !arp.spa.is_broadcast()
                && !arp.spa.is_multicast();
            return usable.then_some(IpAddr::V4(arp.spa));
        }
        let nd = self.neighbour().ok()??;
        let ip = match nd.kind {
            NdKind::Advertisement { .. } => nd.target,
            NdKind::Solicitation => nd.source,
        };
        (!ip.is_unspecified() && !ip.is_multicast()).then_some(IpAddr::V6(ip))
    }
}

/// ARP operation codes (RFC 826, RFC 903 for RARP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArpOp {
    /// 1: who-has.
    Request,
    /// 2: is-at.
    Reply,
    /// 3: RARP reverse request (QEMU's migration announcement).
    ReverseRequest,
    /// 4: RARP reverse reply.
    ReverseReply,
    /// Anything else.
    Other(u16),
}

impl ArpOp {
    fn from_u16(v: u16) -> Self {
        match v {
            1 => Self::Request,
            2 => Self::Reply,
            3 => Self::ReverseRequest,
            4 => Self::ReverseReply,
            other => Self::Other(other),
        }
    }

    fn to_u16(self) -> u16 {
        match self {
            Self::Request => 1,
            Self::Reply => 2,
            Self::ReverseRequest => 3,
            Self::ReverseReply => 4,
            Self::Other(v) => v,
        }
    }
}

/// An Ethernet/IPv4 ARP (or RARP) packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArpPacket {
    /// Operation.
    pub op: ArpOp,
    /// Sender hardware address.
    pub sha: MacAddr,
    /// Sender protocol address.
    pub spa: Ipv4Addr,
    /// Target hardware address.
    pub tha: MacAddr,
    /// Target protocol address.
    pub tpa: Ipv4Addr,
}

impl ArpPacket {
    /// Parses an ARP packet (the payload of an ARP or RARP frame; trailing
    /// padding is ignored).
    pub fn parse(p: &[u8]) -> Result<Self, FrameError> {
        if p.len() < ARP_LEN {
            return Err(FrameError::TooShort {
                what: "ARP packet",
                len: p.len(),
                need: ARP_LEN,
            });
        }
        let (htype, ptype, hlen, plen) = (be16(p, 0), be16(p, 2), p[4], p[5]);
        if htype != 1 || ptype != ETHERTYPE_IPV4 || hlen != 6 || plen != 4 {
            return Err(FrameError::ArpNotEthernetIpv4 {
                htype,
                ptype,
                hlen,
                plen,
            });
        }
        Ok(Self {
            op: ArpOp::from_u16(be16(p, 6)),
            sha: mac_at(p, 8),
            spa: Ipv4Addr::new(p[14], p[15], p[16], p[17]),
            tha: mac_at(p, 18),
            tpa: Ipv4Addr::new(p[24], p[25], p[26], p[27]),
        })
    }

    /// A gratuitous ARP announces the sender's own address: sender and target
    /// protocol addresses are equal (RFC 5227 §3).
    pub fn is_gratuitous(&self) -> bool {
        matches!(self.op, ArpOp::Request | ArpOp::Reply) && self.spa == self.tpa
    }

    /// Appends the 28-byte encoding.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        out.extend_from_slice(&[6, 4]);
        out.extend_from_slice(&self.op.to_u16().to_be_bytes());
        out.extend_from_slice(&self.sha.0);
        out.extend_from_slice(&self.spa.octets());
        out.extend_from_slice(&self.tha.0);
        out.extend_from_slice(&self.tpa.octets());
    }
}

/// Which form of gratuitous ARP to build. Send both: older Linux kernels
/// honoured only requests, some stacks only replies (reference §4 row 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GarpKind {
    /// Op 1, target hardware address zero (`arping -U`).
    Request,
    /// Op 2, target hardware address = sender (`arping -A`).
    Reply,
}

/// Builds an Ethernet frame carrying `arp` (padded to [`MIN_FRAME_LEN`]).
pub fn build_arp(dst: MacAddr, src: MacAddr, vlan_tci: Option<u16>, arp: &ArpPacket) -> Vec<u8> {
    let mut out = Vec::with_capacity(MIN_FRAME_LEN + VLAN_TAG_LEN);
    push_eth_header(&mut out, dst, src, vlan_tci, ETHERTYPE_ARP);
    arp.encode(&mut out);
    pad(&mut out);
    out
}

/// A broadcast "who-has `tpa`, tell `spa`".
pub fn arp_request(sha: MacAddr, spa: Ipv4Addr, tpa: Ipv4Addr, vlan_tci: Option<u16>) -> Vec<u8> {
    let arp = ArpPacket {
        op: ArpOp::Request,
        sha,
        spa,
        tha: MacAddr::ZERO,
        tpa,
    };
    build_arp(MacAddr::BROADCAST, sha, vlan_tci, &arp)
}

/// A unicast "`spa` is-at `sha`" sent to the asker (`tha`, `tpa`).
pub fn arp_reply(
    sha: MacAddr,
    spa: Ipv4Addr,
    tha: MacAddr,
    tpa: Ipv4Addr,
    vlan_tci: Option<u16>,
) -> Vec<u8> {
    let arp = ArpPacket {
        op: ArpOp::Reply,
        sha,
        spa,
        tha,
        tpa,
    };
    build_arp(tha, sha, vlan_tci, &arp)
}

/// A broadcast gratuitous ARP announcing that `ip` is at `mac`.
pub fn gratuitous_arp(
    mac: MacAddr,
    ip: Ipv4Addr,
    kind: GarpKind,
    vlan_tci: Option<u16>,
) -> Vec<u8> {
    let (op, tha) = match kind {
        GarpKind::Request => (ArpOp::Request, MacAddr::ZERO),
        GarpKind::Reply => (ArpOp::Reply, mac),
    };
    let arp = ArpPacket {
        op,
        sha: mac,
        spa: ip,
        tha,
        tpa: ip,
    };
    build_arp(MacAddr::BROADCAST, mac, vlan_tci, &arp)
}

/// Kind of a Neighbour Discovery message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NdKind {
    /// Neighbour Solicitation (type 135).
    Solicitation,
    /// Neighbour Advertisement (type 136) and its flags.
    Advertisement {
        /// R: the sender is a router.
        router: bool,
        /// S: sent in response to a solicitation.
        solicited: bool,
        /// O: override an existing cache entry.
        override_: bool,
    },
}

/// A parsed Neighbour Solicitation or Advertisement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NdMessage {
    /// Solicitation or advertisement.
    pub kind: NdKind,
    /// IPv6 source address.
    pub source: Ipv6Addr,
    /// IPv6 destination address.
    pub destination: Ipv6Addr,
    /// Target address.
    pub target: Ipv6Addr,
    /// Source (NS) or target (NA) link-layer address option, if present.
    pub link_layer: Option<MacAddr>,
}

impl NdMessage {
    /// Parses and validates (RFC 4861 §7.1.1/§7.1.2) an ND message. `icmp`
    /// is the ICMPv6 message exactly (the IPv6 payload length).
    fn parse(
        source: Ipv6Addr,
        destination: Ipv6Addr,
        hop_limit: u8,
        icmp: &[u8],
    ) -> Result<Self, FrameError> {
        if icmp.len() < ND_MIN_LEN {
            return Err(FrameError::TooShort {
                what: "ND message",
                len: icmp.len(),
                need: ND_MIN_LEN,
            });
        }
        if hop_limit != ND_HOP_LIMIT {
            return Err(FrameError::InvalidNd("hop limit is not 255"));
        }
        if icmp[1] != 0 {
            return Err(FrameError::InvalidNd("code is not 0"));
        }
        if icmpv6_checksum(source, destination, icmp) != 0 {
            return Err(FrameError::InvalidNd("bad ICMPv6 checksum"));
        }
        let target = ipv6_at(icmp, 8);
        if target.is_multicast() {
            return Err(FrameError::InvalidNd("multicast target"));
        }
        let (kind, lla_type) = if icmp[0] == ICMPV6_NS {
            (NdKind::Solicitation, ND_OPT_SOURCE_LLA)
        } else {
            let f = icmp[4];
            (
                NdKind::Advertisement {
                    router: f & 0x80 != 0,
                    solicited: f & 0x40 != 0,
                    override_: f & 0x20 != 0,
                },
                ND_OPT_TARGET_LLA,
            )
        };
        let mut link_layer = None;
        let mut opts = &icmp[ND_MIN_LEN..];
        while opts.len() >= 2 {
            let len = usize::from(opts[1]) * 8;
            if len == 0 {
                return Err(FrameError::InvalidNd("option of length zero"));
            }
            let Some(opt) = opts.get(..len) else {
                return Err(FrameError::InvalidNd("option runs past the message"));
            };
            if opt[0] == lla_type && len >= 8 {
                link_layer = Some(mac_at(opt, 2));
            }
            opts = &opts[len..];
        }
        Ok(Self {
            kind,
            source,
            destination,
            target,
            link_layer,
        })
    }
}

/// Flags of a Neighbour Advertisement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NaFlags {
    /// R: sender is a router.
    pub router: bool,
    /// S: answer to a solicitation.
    pub solicited: bool,
    /// O: override existing cache entries.
    pub override_: bool,
}

/// Builds a Neighbour Advertisement for `target` at `mac`, with a target
/// link-layer address option and a correct ICMPv6 checksum.
pub fn neighbour_advertisement(
    mac: MacAddr,
    src_ip: Ipv6Addr,
    dst_mac: MacAddr,
    dst_ip: Ipv6Addr,
    target: Ipv6Addr,
    flags: NaFlags,
    vlan_tci: Option<u16>,
) -> Vec<u8> {
    let mut icmp = Vec::with_capacity(32);
    icmp.extend_from_slice(&[ICMPV6_NA, 0, 0, 0]);
    let f = (u8::from(flags.router) << 7)
        | (u8::from(flags.solicited) << 6)
        | (u8::from(flags.override_) << 5);
    icmp.extend_from_slice(&[f, 0, 0, 0]);
    icmp.extend_from_slice(&target.octets());
    icmp.extend_from_slice(&[ND_OPT_TARGET_LLA, 1]);
    icmp.extend_from_slice(&mac.0);
    build_icmpv6(mac, src_ip, dst_mac, dst_ip, icmp, vlan_tci)
}

/// An unsolicited Neighbour Advertisement (RFC 4861 §7.2.6) that `mac` owns
/// `ip`: to all-nodes (ff02::1), Override set, Solicited clear, the form
/// Linux sends on `NETDEV_NOTIFY_PEERS`.
pub fn unsolicited_na(mac: MacAddr, ip: Ipv6Addr, vlan_tci: Option<u16>) -> Vec<u8> {
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let flags = NaFlags {
        router: false,
        solicited: false,
        override_: true,
    };
    neighbour_advertisement(
        mac,
        ip,
        MacAddr::ipv6_multicast(all_nodes),
        all_nodes,
        ip,
        flags,
        vlan_tci,
    )
}

/// A Neighbour Solicitation from `mac`/`src_ip` for `target`, to the
/// target's solicited-node multicast group, with a source link-layer option.
pub fn neighbour_solicitation(
    mac: MacAddr,
    src_ip: Ipv6Addr,
    target: Ipv6Addr,
    vlan_tci: Option<u16>,
) -> Vec<u8> {
    let t = target.octets();
    let group = Ipv6Addr::from([
        0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, t[13], t[14], t[15],
    ]);
    let mut icmp = Vec::with_capacity(32);
    icmp.extend_from_slice(&[ICMPV6_NS, 0, 0, 0, 0, 0, 0, 0]);
    icmp.extend_from_slice(&t);
    icmp.extend_from_slice(&[ND_OPT_SOURCE_LLA, 1]);
    icmp.extend_from_slice(&mac.0);
    build_icmpv6(
        mac,
        src_ip,
        MacAddr::ipv6_multicast(group),
        group,
        icmp,
        vlan_tci,
    )
}

/// The ICMPv6 checksum (RFC 4443 §2.3) over the IPv6 pseudo-header and
/// `icmp`. Computed over a message whose checksum field is zero it yields the
/// value to store; over a message with a correct checksum it yields 0.
pub fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, icmp: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    let mut add = |bytes: &[u8]| {
        let mut chunks = bytes.chunks_exact(2);
        for c in &mut chunks {
            sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            sum += u64::from(*last) << 8;
        }
    };
    add(&src.octets());
    add(&dst.octets());
    // The ICMP message is bounded by a frame (< 2^32 bytes); saturate anyway.
    let len = u32::try_from(icmp.len()).unwrap_or(u32::MAX);
    add(&len.to_be_bytes());
    add(&[0, 0, 0, IPPROTO_ICMPV6]);
    add(icmp);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The loop above folded `sum` into 16 bits.
    !(sum as u16)
}

fn build_icmpv6(
    src_mac: MacAddr,
    src_ip: Ipv6Addr,
    dst_mac: MacAddr,
    dst_ip: Ipv6Addr,
    mut icmp: Vec<u8>,
    vlan_tci: Option<u16>,
) -> Vec<u8> {
    let csum = icmpv6_checksum(src_ip, dst_ip, &icmp);
    icmp[2..4].copy_from_slice(&csum.to_be_bytes());
    let mut out = Vec::with_capacity(ETH_HEADER_LEN + VLAN_TAG_LEN + IPV6_HEADER_LEN + icmp.len());
    push_eth_header(&mut out, dst_mac, src_mac, vlan_tci, ETHERTYPE_IPV6);
    out.extend_from_slice(&[0x60, 0, 0, 0]);
    // ND messages built here are 32 bytes.
    let plen = u16::try_from(icmp.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&plen.to_be_bytes());
    out.extend_from_slice(&[IPPROTO_ICMPV6, ND_HOP_LIMIT]);
    out.extend_from_slice(&src_ip.octets());
    out.extend_from_slice(&dst_ip.octets());
    out.extend_from_slice(&icmp);
    pad(&mut out);
    out
}

/// Appends an Ethernet header, with an 802.1Q tag if `vlan_tci` is set.
pub fn push_eth_header(
    out: &mut Vec<u8>,
    dst: MacAddr,
    src: MacAddr,
    vlan_tci: Option<u16>,
    ethertype: u16,
) {
    out.extend_from_slice(&dst.0);
    out.extend_from_slice(&src.0);
    if let Some(tci) = vlan_tci {
        out.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
        out.extend_from_slice(&tci.to_be_bytes());
    }
    out.extend_from_slice(&ethertype.to_be_bytes());
}

fn pad(out: &mut Vec<u8>) {
    if out.len() < MIN_FRAME_LEN {
        out.resize(MIN_FRAME_LEN, 0);
    }
}

/// Callers guarantee `off + 2 <= b.len()`.
fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

/// Callers guarantee `off + 6 <= b.len()`.
fn mac_at(b: &[u8], off: usize) -> MacAddr {
    let mut m = [0u8; 6];
    m.copy_from_slice(&b[off..off + 6]);
    MacAddr(m)
}

/// Callers guarantee `off + 16 <= b.len()`.
fn ipv6_at(b: &[u8], off: usize) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[off..off + 16]);
    Ipv6Addr::from(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VM: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);

    /// QEMU's 60-byte RARP announcement (reference §1.5).
    fn qemu_rarp(mac: MacAddr) -> Vec<u8> {
        let mut f = Vec::new();
        push_eth_header(&mut f, MacAddr::BROADCAST, mac, None, ETHERTYPE_RARP);
        let arp = ArpPacket {
            op: ArpOp::ReverseRequest,
            sha: mac,
            spa: Ipv4Addr::UNSPECIFIED,
            tha: mac,
            tpa: Ipv4Addr::UNSPECIFIED,
        };
        arp.encode(&mut f);
        pad(&mut f);
        f
    }

    #[test]
    fn mac_text_roundtrip_and_rejects() {
        let m: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        assert_eq!(m, VM);
        assert_eq!(m.to_string(), "52:54:00:12:34:56");
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "5:54:00:12:34:56",
            "zz:54:00:12:34:56",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(j, "\"52:54:00:12:34:56\"");
        assert_eq!(serde_json::from_str::<MacAddr>(&j).unwrap(), m);
        assert!(MacAddr::BROADCAST.is_multicast() && !VM.is_multicast() && VM.is_unicast());
        assert!(!MacAddr::ZERO.is_unicast());
    }

    #[test]
    fn parses_untagged_and_tagged_headers() {
        let f = arp_request(
            VM,
            Ipv4Addr::new(10, 0, 0, 5),
            Ipv4Addr::new(10, 0, 0, 1),
            None,
        );
        assert_eq!(f.len(), MIN_FRAME_LEN);
        let e = EthernetFrame::parse(&f).unwrap();
        assert_eq!(
            (e.dst(), e.src(), e.ethertype(), e.vlan_id()),
            (MacAddr::BROADCAST, VM, ETHERTYPE_ARP, None)
        );
        let t = arp_request(
            VM,
            Ipv4Addr::new(10, 0, 0, 5),
            Ipv4Addr::new(10, 0, 0, 1),
            Some(0x2064),
        );
        let e = EthernetFrame::parse(&t).unwrap();
        assert_eq!(
            (e.ethertype(), e.vlan_id(), e.vlan_tci()),
            (ETHERTYPE_ARP, Some(0x064), Some(0x2064))
        );
        assert_eq!(e.arp().unwrap().unwrap().tpa, Ipv4Addr::new(10, 0, 0, 1));
        assert!(matches!(
            EthernetFrame::parse(&f[..13]),
            Err(FrameError::TooShort { .. })
        ));
        assert!(matches!(
            EthernetFrame::parse(&t[..17]),
            Err(FrameError::TooShort { .. })
        ));
    }

    #[test]
    fn arp_request_reply_and_gratuitous() {
        let ip = Ipv4Addr::new(192, 0, 2, 7);
        let gw = MacAddr([2, 0, 0, 0, 0, 1]);
        let r = arp_reply(gw, Ipv4Addr::new(192, 0, 2, 1), VM, ip, None);
        let e = EthernetFrame::parse(&r).unwrap();
        let a = e.arp().unwrap().unwrap();
        assert_eq!(
            (e.dst(), a.op, a.sha, a.tha, a.tpa),
            (VM, ArpOp::Reply, gw, VM, ip)
        );
        assert!(!a.is_gratuitous());
        for kind in [GarpKind::Request, GarpKind::Reply] {
            let g = gratuitous_arp(VM, ip, kind, None);
            let e = EthernetFrame::parse(&g).unwrap();
            let a = e.arp().unwrap().unwrap();
            assert!(a.is_gratuitous());
            assert_eq!(e.dst(), MacAddr::BROADCAST);
            assert_eq!(e.learned_ip(), Some(IpAddr::V4(ip)));
        }
        // Byte-exact against a hand-written GARP request.
        let g = gratuitous_arp(VM, ip, GarpKind::Request, None);
        let want: Vec<u8> = [
            &[0xff; 6][..],
            &VM.0,
            &[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1],
            &VM.0,
            &[192, 0, 2, 7],
            &[0; 6],
            &[192, 0, 2, 7],
            &[0; 18],
        ]
        .concat();
        assert_eq!(g, want);
    }

    #[test]
    fn arp_rejects_other_hardware_and_probes_teach_nothing() {
        let mut f = arp_request(
            VM,
            Ipv4Addr::new(10, 0, 0, 5),
            Ipv4Addr::new(10, 0, 0, 1),
            None,
        );
        f[ETH_HEADER_LEN + 1] = 6; // htype 6 (IEEE 802)
        let e = EthernetFrame::parse(&f).unwrap();
        assert!(matches!(
            e.arp(),
            Err(FrameError::ArpNotEthernetIpv4 { .. })
        ));
        assert_eq!(e.learned_ip(), None);
        let probe = arp_request(VM, Ipv4Addr::UNSPECIFIED, Ipv4Addr::new(10, 0, 0, 5), None);
        assert_eq!(EthernetFrame::parse(&probe).unwrap().learned_ip(), None);
        // An ARP whose sender is not the frame's source teaches nothing.
        let mut spoof = arp_request(
            VM,
            Ipv4Addr::new(10, 0, 0, 5),
            Ipv4Addr::new(10, 0, 0, 1),
            None,
        );
        spoof[6] = 0x02;
        assert_eq!(EthernetFrame::parse(&spoof).unwrap().learned_ip(), None);
    }

    #[test]
    fn recognises_qemu_rarp() {
        let f = qemu_rarp(VM);
        assert_eq!(f.len(), 60);
        let e = EthernetFrame::parse(&f).unwrap();
        assert!(e.is_rarp_announce());
        assert_eq!(e.learned_ip(), None);
        let g = gratuitous_arp(VM, Ipv4Addr::new(10, 0, 0, 5), GarpKind::Request, None);
        assert!(!EthernetFrame::parse(&g).unwrap().is_rarp_announce());
    }

    #[test]
    fn ip_sources() {
        let mut f = Vec::new();
        push_eth_header(&mut f, MacAddr::BROADCAST, VM, None, ETHERTYPE_IPV4);
        f.extend_from_slice(&[
            0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 10, 1, 2, 3, 10, 1, 2, 4,
        ]);
        let e = EthernetFrame::parse(&f).unwrap();
        assert_eq!(e.ipv4_source(), Some(Ipv4Addr::new(10, 1, 2, 3)));
        assert_eq!(e.ipv6_source(), None);
        assert_eq!(EthernetFrame::parse(&f[..30]).unwrap().ipv4_source(), None);
        let na = unsolicited_na(VM, "2001:db8::5".parse().unwrap(), None);
        let e = EthernetFrame::parse(&na).unwrap();
        assert_eq!(e.ipv6_source(), Some("2001:db8::5".parse().unwrap()));
        assert_eq!(e.ipv4_source(), None);
    }

    #[test]
    fn unsolicited_na_layout_and_checksum() {
        let ip: Ipv6Addr = "fe80::5054:ff:fe12:3456".parse().unwrap();
        let f = unsolicited_na(VM, ip, None);
        assert_eq!(f.len(), ETH_HEADER_LEN + IPV6_HEADER_LEN + 32);
        assert_eq!(&f[..6], &[0x33, 0x33, 0, 0, 0, 1]);
        let e = EthernetFrame::parse(&f).unwrap();
        let nd = e.neighbour().unwrap().unwrap();
        assert_eq!(
            nd.kind,
            NdKind::Advertisement {
                router: false,
                solicited: false,
                override_: true
            }
        );
        assert_eq!((nd.source, nd.target, nd.link_layer), (ip, ip, Some(VM)));
        assert_eq!(nd.destination, "ff02::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(e.learned_ip(), Some(IpAddr::V6(ip)));
        // Recomputing over the stored checksum gives zero, and a flipped bit
        // is rejected.
        let icmp = &f[ETH_HEADER_LEN + IPV6_HEADER_LEN..];
        assert_eq!(icmpv6_checksum(ip, nd.destination, icmp), 0);
        let mut bad = f.clone();
        bad[ETH_HEADER_LEN + IPV6_HEADER_LEN + 10] ^= 1;
        assert!(matches!(
            EthernetFrame::parse(&bad).unwrap().neighbour(),
            Err(FrameError::InvalidNd(_))
        ));
    }

    #[test]
    fn checksum_matches_known_vector() {
        // Unsolicited NA for fe80::1 from 00:00:00:00:00:01, checksum computed
        // independently (RFC 1071 one's complement over pseudo-header + body).
        let src: Ipv6Addr = "fe80::1".parse().unwrap();
        let dst: Ipv6Addr = "ff02::1".parse().unwrap();
        let mut body = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
        body.extend_from_slice(&src.octets());
        body.extend_from_slice(&[2, 1, 0, 0, 0, 0, 0, 1]);
        // Independent computation: sum all 16-bit words by hand.
        let mut words: Vec<u32> = Vec::new();
        for chunk in src.octets().chunks(2).chain(dst.octets().chunks(2)) {
            words.push(u32::from(u16::from_be_bytes([chunk[0], chunk[1]])));
        }
        words.extend([0, body.len() as u32, 0, 58]);
        for chunk in body.chunks(2) {
            words.push(u32::from(u16::from_be_bytes([chunk[0], chunk[1]])));
        }
        let mut s: u32 = words.iter().sum();
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        assert_eq!(icmpv6_checksum(src, dst, &body), !(s as u16));
    }

    #[test]
    fn ns_roundtrip_and_nd_validation() {
        let src: Ipv6Addr = "2001:db8::5".parse().unwrap();
        let target: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let f = neighbour_solicitation(VM, src, target, Some(7));
        let e = EthernetFrame::parse(&f).unwrap();
        assert_eq!(e.dst(), MacAddr([0x33, 0x33, 0xff, 0, 0, 1]));
        let nd = e.neighbour().unwrap().unwrap();
        assert_eq!(
            (nd.kind, nd.target, nd.link_layer),
            (NdKind::Solicitation, target, Some(VM))
        );
        assert_eq!(e.learned_ip(), Some(IpAddr::V6(src)));
        // Hop limit other than 255 means the message was routed: discard.
        let mut routed = f.clone();
        routed[ETH_HEADER_LEN + VLAN_TAG_LEN + 7] = 64;
        assert_eq!(
            EthernetFrame::parse(&routed).unwrap().neighbour(),
            Err(FrameError::InvalidNd("hop limit is not 255"))
        );
        // Truncated payload length.
        let cut = &f[..f.len() - 4];
        assert!(EthernetFrame::parse(cut).unwrap().neighbour().is_err());
    }

    proptest! {
        /// No parser panics on any input, and the ones that succeed agree
        /// with the header bytes.
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(e) = EthernetFrame::parse(&bytes) {
                let _ = e.arp();
                let _ = e.ipv4_source();
                let _ = e.ipv6_source();
                let _ = e.neighbour();
                let _ = e.learned_ip();
                let _ = e.is_rarp_announce();
                prop_assert_eq!(&e.dst().0[..], &bytes[..6]);
            }
            let _ = ArpPacket::parse(&bytes);
        }

        /// ND parsing survives corruption of a valid message anywhere.
        #[test]
        fn nd_survives_corruption(pos in 0usize..200, val in any::<u8>(), cut in 0usize..200, tag in any::<bool>()) {
            let f = unsolicited_na(VM, "2001:db8::9".parse().unwrap(), tag.then_some(5));
            let mut g = f.clone();
            let p = pos % g.len();
            g[p] = val;
            g.truncate(cut.max(1).min(g.len()));
            if let Ok(e) = EthernetFrame::parse(&g) {
                let _ = e.neighbour();
                let _ = e.learned_ip();
            }
        }

        /// Built GARP and NA frames parse back to what was built.
        #[test]
        fn builders_roundtrip(mac in any::<[u8; 6]>(), v4 in any::<[u8; 4]>(), v6 in any::<[u8; 16]>(), tci in proptest::option::of(any::<u16>())) {
            let mac = MacAddr([mac[0] & 0xfe, mac[1], mac[2], mac[3], mac[4], mac[5]]);
            let ip4 = Ipv4Addr::from(v4);
            let g = gratuitous_arp(mac, ip4, GarpKind::Reply, tci);
            let e = EthernetFrame::parse(&g).unwrap();
            let a = e.arp().unwrap().unwrap();
            prop_assert_eq!((a.sha, a.spa, a.tpa, e.vlan_tci()), (mac, ip4, ip4, tci));
            let ip6 = Ipv6Addr::from(v6);
            prop_assume!(!ip6.is_multicast());
            let n = unsolicited_na(mac, ip6, tci);
            let nd = EthernetFrame::parse(&n).unwrap().neighbour().unwrap().unwrap();
            prop_assert_eq!((nd.target, nd.link_layer), (ip6, Some(mac)));
        }
    }
}
