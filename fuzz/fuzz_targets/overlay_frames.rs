//! Fuzzes the overlay's parsers of untrusted frames (`godwit_overlay`): the
//! QEMU `-netdev stream` decoder (bytes from QEMU's socket, i.e. from the
//! guest), VXLAN decoding (UDP datagrams from any host that reaches port
//! 4789), the QUIC overlay datagram header, and the Ethernet/ARP/ND views of the frames inside, then the
//! switch itself with the frame arriving from a guest port and from a peer.
//!
//! Invariants checked:
//! - nothing panics;
//! - the stream decoder yields the same frames and error however the input
//!   is chunked, and never holds a complete record back;
//! - a decoded VXLAN packet re-encodes (RFC form: flags 0x08, reserved 0)
//!   to a packet that decodes to the same VNI and inner frame;
//! - a decoded QUIC overlay datagram re-encodes to the same bytes, and a
//!   frame split into datagrams comes back whole from the reassembler;
//! - a parsed ARP packet re-encodes to the bytes it came from;
//! - the switch never delivers a frame back to its ingress port and never
//!   sends a peer's frame to another peer unless as a single relay.
#![no_main]

use bytes::{Bytes, BytesMut};
use godwit_overlay::frame::ArpPacket;
use godwit_overlay::switch::{Action, Delivery, PortConfig, PortId, PortState, Switch};
use godwit_overlay::{datagram, vxlan, EthernetFrame, HostId, MacAddr, StreamDecoder, StreamError, Vni};
use libfuzzer_sys::fuzz_target;
use std::time::Instant;

fn decode_stream(data: &[u8], chunk: usize) -> (Vec<Bytes>, Option<StreamError>) {
    let mut d = StreamDecoder::new();
    let mut frames = Vec::new();
    for piece in data.chunks(chunk.max(1)) {
        let res = d.handle_input(piece);
        while let Some(f) = d.poll_frame() {
            frames.push(f);
        }
        if let Err(e) = res {
            return (frames, Some(e));
        }
    }
    (frames, None)
}

fn check_frame(f: &[u8]) {
    let Ok(e) = EthernetFrame::parse(f) else {
        return;
    };
    let _ = e.ipv4_source();
    let _ = e.ipv6_source();
    let _ = e.neighbour();
    let _ = e.learned_ip();
    let _ = e.is_rarp_announce();
    if let Ok(Some(arp)) = e.arp() {
        let mut out = Vec::new();
        arp.encode(&mut out);
        assert_eq!(&out[..], &e.payload()[..out.len()]);
        assert_eq!(ArpPacket::parse(&out), Ok(arp));
    }
}

fn check_switch(f: Bytes) {
    let t = Instant::now();
    let vni = Vni::new(1).unwrap_or_else(|_| unreachable!());
    let mut s = Switch::new(HostId::new("here"));
    let guest = EthernetFrame::parse(&f).map_or(MacAddr([2, 0, 0, 0, 0, 1]), |e| e.src());
    let cfg = |mac| PortConfig {
        vni,
        mac,
        allow_other_sources: true,
    };
    let _ = s.add_port(PortId(1), cfg(guest), PortState::Open);
    let _ = s.add_port(PortId(2), cfg(MacAddr([2, 0, 0, 0, 0, 2])), PortState::Open);
    s.set_arp_suppression(true);
    s.add_remote(vni, HostId::new("peer"));
    s.add_remote(vni, HostId::new("other"));
    for a in s.handle_local_frame(t, PortId(1), f.clone()) {
        // Replies (ARP suppression) go back to the ingress, the frame never.
        assert!(!matches!(&a, Action::Deliver { port: PortId(1), frame } if *frame == f));
    }
    let peer = HostId::new("peer");
    for d in [Delivery::Unicast, Delivery::Flood, Delivery::Relayed] {
        let out = s.handle_remote_frame(&peer, vni, d, 0, f.clone());
        let remote: Vec<_> = out
            .iter()
            .filter_map(|a| match a {
                Action::SendRemote { site, delivery, .. } => Some((site.clone(), *delivery)),
                _ => None,
            })
            .collect();
        assert!(remote.len() <= 1, "{remote:?}");
        for (site, delivery) in remote {
            assert_eq!(d, Delivery::Unicast);
            assert_eq!(delivery, Delivery::Relayed);
            assert_ne!(site, peer);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // 1. QEMU stream framing, at several chunkings.
    let (whole, err) = decode_stream(data, data.len());
    for chunk in [1, 3, 4, 7, 64] {
        let (split, e) = decode_stream(data, chunk);
        assert_eq!(split, whole, "chunk size {chunk} changed the frames");
        assert_eq!(e, err, "chunk size {chunk} changed the error");
    }
    for f in &whole {
        check_frame(f);
    }

    // 2. The input as a VXLAN datagram.
    if let Ok(p) = vxlan::decode(data) {
        let mut out = BytesMut::new();
        vxlan::encode(p.vni, p.inner, &mut out);
        assert_eq!(out[0], vxlan::VXLAN_FLAG_I);
        let q = vxlan::decode(&out).unwrap_or_else(|e| panic!("re-encoded packet fails: {e}"));
        assert_eq!((q.vni, q.inner), (p.vni, p.inner));
        check_frame(p.inner);
    }

    // 3. The input as a QUIC overlay datagram: a decoded whole frame
    // re-encodes to the same bytes; a piece goes into a reassembler.
    let t = Instant::now();
    if let Ok(d) = datagram::decode(data) {
        match d.fragment {
            None => {
                let mut out = BytesMut::new();
                datagram::encode(&d.header, d.payload, &mut out);
                assert_eq!(&out[..], data);
            }
            Some(f) => {
                let mut r = datagram::Reassembler::new();
                let _ = r.push(t, d.header, f, d.payload);
            }
        }
        // The input as a frame to send: split (datagram size from the
        // first byte), the pieces come back in reverse order and make the
        // same frame.
        if data.len() >= datagram::MIN_FRAME_LEN {
            let max = datagram::FRAGMENT_HEADER_LEN + 1 + usize::from(data[0]) * 8;
            if let Ok(parts) = datagram::split(&d.header, data, max, 7) {
                let mut r = datagram::Reassembler::new();
                let mut got = None;
                for p in parts.iter().rev() {
                    assert!(p.len() <= max);
                    let q = datagram::decode(p).unwrap_or_else(|e| panic!("own piece refused: {e}"));
                    got = Some(match q.fragment {
                        None => datagram::Reassembly::Frame(q.header, Bytes::copy_from_slice(q.payload)),
                        Some(f) => r.push(t, q.header, f, q.payload),
                    });
                }
                assert_eq!(
                    got,
                    Some(datagram::Reassembly::Frame(d.header, Bytes::copy_from_slice(data)))
                );
            }
        }
    }

    // 4. The input as a raw frame (TAP, `-netdev dgram`), through the switch.
    check_frame(data);
    check_switch(Bytes::copy_from_slice(data));
});
