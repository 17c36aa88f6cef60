//! The overlay header of a guest frame carried between agents as QUIC
//! datagrams (encrypted and authenticated by the peer connection's TLS),
//! and the splitting of frames larger than one datagram.
//!
//! Unlike VXLAN this header carries what [`crate::dedup`] needs: how the
//! frame crossed the overlay ([`Delivery`]) and how many of the receiver's
//! registry updates the sender had applied when it sent it (`ack`).
//!
//! | offset | size | field                                           |
//! |--------|------|-------------------------------------------------|
//! | 0      | 1    | version, [`DATAGRAM_VERSION`]                   |
//! | 1      | 1    | delivery: 1 unicast, 2 flood, 3 relayed; bit 7 ([`FRAGMENT_FLAG`]) marks a fragment |
//! | 2      | 4    | VNI, little-endian, below 2^24                  |
//! | 6      | 8    | ack, little-endian                              |
//! | 14     | 4    | fragments only: id (u16 LE), index, count       |
//! | 14/18  | rest | the Ethernet frame (no FCS, at least 14 bytes), or one piece of it |
//!
//! A QUIC datagram must fit one packet: about 1 150 bytes of frame before
//! path MTU discovery has run, about 1 400 after. A guest with the usual
//! 1500-byte MTU sends bigger frames, so the sender splits them
//! ([`split`]) into at most [`MAX_FRAGMENTS`] pieces of one frame id, each
//! with the whole header, and the receiver puts them back together
//! ([`Reassembler`]). Datagrams are never retransmitted: a frame missing a
//! piece is dropped after [`REASSEMBLY_TIMEOUT`], as a lost frame would be.
//!
//! Version 0 is reserved as invalid. A receiver drops datagrams of another
//! version: both agents of a connection negotiated the same control
//! protocol, so a mismatch is a bug or an attack, never a rollout.

use crate::switch::Delivery;
use crate::vxlan::Vni;
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Header version this code writes and accepts.
pub const DATAGRAM_VERSION: u8 = 1;
/// Bytes of the header before a whole frame.
pub const DATAGRAM_HEADER_LEN: usize = 14;
/// Bytes of the header before a fragment.
pub const FRAGMENT_HEADER_LEN: usize = DATAGRAM_HEADER_LEN + 4;
/// The delivery byte's flag for a fragment.
pub const FRAGMENT_FLAG: u8 = 0x80;
/// Shortest frame accepted: an Ethernet header (dst, src, EtherType).
pub const MIN_FRAME_LEN: usize = 14;
/// Most pieces one frame is split into: a 64 KiB frame (the largest QEMU
/// stream record) in datagrams of about 1 150 bytes.
pub const MAX_FRAGMENTS: usize = 64;
/// How long the pieces of one frame may take to arrive. They are sent back
/// to back, so only a lost piece makes them wait this long.
pub const REASSEMBLY_TIMEOUT: Duration = Duration::from_millis(200);
/// Frames being reassembled from one peer at a time; the oldest is given up
/// for a new one.
pub const MAX_PARTIAL_FRAMES: usize = 32;

/// Why a datagram was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    /// Shorter than a header plus an Ethernet header (or, for a fragment,
    /// plus one byte).
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
    /// A fragment's index and count do not make sense.
    #[error("overlay fragment {index} of {count} is out of range")]
    Fragment {
        /// Index.
        index: u8,
        /// Count.
        count: u8,
    },
    /// The frame does not fit in [`MAX_FRAGMENTS`] datagrams of the
    /// allowed size.
    #[error("a {len}-byte frame does not fit {MAX_FRAGMENTS} datagrams of {max} bytes")]
    TooBig {
        /// Frame length.
        len: usize,
        /// Largest datagram.
        max: usize,
    },
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

/// Which piece of a split frame a datagram carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragment {
    /// The frame's id, chosen by the sender (wraps).
    pub id: u16,
    /// The piece, from 0.
    pub index: u8,
    /// Pieces of the frame, 2 to [`MAX_FRAGMENTS`].
    pub count: u8,
}

/// A decoded datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram<'a> {
    /// The header.
    pub header: DatagramHeader,
    /// Set if this is one piece of a split frame.
    pub fragment: Option<Fragment>,
    /// The frame, or the piece of it.
    pub payload: &'a [u8],
}

/// Appends the header and the whole `frame` to `dst`.
pub fn encode(h: &DatagramHeader, frame: &[u8], dst: &mut BytesMut) {
    dst.reserve(DATAGRAM_HEADER_LEN + frame.len());
    put_header(h, 0, dst);
    dst.put_slice(frame);
}

fn put_header(h: &DatagramHeader, flags: u8, dst: &mut BytesMut) {
    dst.put_u8(DATAGRAM_VERSION);
    dst.put_u8(h.delivery.as_u8() | flags);
    dst.put_u32_le(h.vni.get());
    dst.put_u64_le(h.ack);
}

/// The datagrams that carry `frame`: one if it fits in `max` bytes with
/// its header, else pieces of frame `id`, each at most `max` bytes.
pub fn split(
    h: &DatagramHeader,
    frame: &[u8],
    max: usize,
    id: u16,
) -> Result<Vec<Bytes>, DatagramError> {
    if DATAGRAM_HEADER_LEN + frame.len() <= max {
        let mut b = BytesMut::new();
        encode(h, frame, &mut b);
        return Ok(vec![b.freeze()]);
    }
    let too_big = DatagramError::TooBig {
        len: frame.len(),
        max,
    };
    let piece = max
        .checked_sub(FRAGMENT_HEADER_LEN)
        .filter(|&p| p > 0)
        .ok_or(too_big)?;
    let count = frame.len().div_ceil(piece);
    if count > MAX_FRAGMENTS {
        return Err(too_big);
    }
    Ok(frame
        .chunks(piece)
        .enumerate()
        .map(|(i, part)| {
            let mut b = BytesMut::with_capacity(FRAGMENT_HEADER_LEN + part.len());
            put_header(h, FRAGMENT_FLAG, &mut b);
            b.put_u16_le(id);
            // Both fit: count <= MAX_FRAGMENTS (64).
            b.put_u8(i as u8);
            b.put_u8(count as u8);
            b.put_slice(part);
            b.freeze()
        })
        .collect())
}

/// Splits a datagram into its header, fragment and payload.
pub fn decode(src: &[u8]) -> Result<Datagram<'_>, DatagramError> {
    if src.len() < DATAGRAM_HEADER_LEN + 1 {
        return Err(DatagramError::TooShort { len: src.len() });
    }
    let head = &src[..DATAGRAM_HEADER_LEN];
    if head[0] != DATAGRAM_VERSION {
        return Err(DatagramError::Version(head[0]));
    }
    let fragmented = head[1] & FRAGMENT_FLAG != 0;
    let d = head[1] & !FRAGMENT_FLAG;
    let delivery = Delivery::from_u8(d).ok_or(DatagramError::Delivery(head[1]))?;
    let vni = u32::from_le_bytes([head[2], head[3], head[4], head[5]]);
    let vni = Vni::new(vni).map_err(|_| DatagramError::Vni(vni))?;
    let mut ack = [0u8; 8];
    ack.copy_from_slice(&head[6..14]);
    let header = DatagramHeader {
        vni,
        delivery,
        ack: u64::from_le_bytes(ack),
    };
    if !fragmented {
        if src.len() < DATAGRAM_HEADER_LEN + MIN_FRAME_LEN {
            return Err(DatagramError::TooShort { len: src.len() });
        }
        return Ok(Datagram {
            header,
            fragment: None,
            payload: &src[DATAGRAM_HEADER_LEN..],
        });
    }
    if src.len() < FRAGMENT_HEADER_LEN + 1 {
        return Err(DatagramError::TooShort { len: src.len() });
    }
    let f = &src[DATAGRAM_HEADER_LEN..FRAGMENT_HEADER_LEN];
    let (index, count) = (f[2], f[3]);
    if count < 2 || usize::from(count) > MAX_FRAGMENTS || index >= count {
        return Err(DatagramError::Fragment { index, count });
    }
    Ok(Datagram {
        header,
        fragment: Some(Fragment {
            id: u16::from_le_bytes([f[0], f[1]]),
            index,
            count,
        }),
        payload: &src[FRAGMENT_HEADER_LEN..],
    })
}

/// What [`Reassembler::push`] made of a piece.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reassembly {
    /// The frame is complete.
    Frame(DatagramHeader, Bytes),
    /// More pieces are needed.
    Pending,
    /// The piece was dropped: a duplicate, one that contradicts the other
    /// pieces of its id, or a frame shorter than an Ethernet header.
    Dropped,
}

#[derive(Debug)]
struct Partial {
    id: u16,
    header: DatagramHeader,
    started: Instant,
    pieces: Vec<Option<Bytes>>,
    got: usize,
}

/// Puts split frames from one peer back together (sans-IO: the caller
/// passes the time). Bounded: at most [`MAX_PARTIAL_FRAMES`] frames of at
/// most [`MAX_FRAGMENTS`] pieces each are held, and none for longer than
/// [`REASSEMBLY_TIMEOUT`].
#[derive(Debug, Default)]
pub struct Reassembler {
    partial: VecDeque<Partial>,
    expired: u64,
}

impl Reassembler {
    /// A reassembler with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one piece of a split frame.
    pub fn push(
        &mut self,
        now: Instant,
        header: DatagramHeader,
        frag: Fragment,
        payload: &[u8],
    ) -> Reassembly {
        self.expire(now);
        let at = self.partial.iter().position(|p| p.id == frag.id);
        let at = match at {
            Some(i)
                if self.partial[i].header == header
                    && self.partial[i].pieces.len() == usize::from(frag.count) =>
            {
                i
            }
            other => {
                // A reused id with another shape: the old frame is lost.
                if let Some(i) = other {
                    self.partial.remove(i);
                    self.expired += 1;
                }
                if self.partial.len() >= MAX_PARTIAL_FRAMES {
                    self.partial.pop_front();
                    self.expired += 1;
                }
                self.partial.push_back(Partial {
                    id: frag.id,
                    header,
                    started: now,
                    pieces: vec![None; usize::from(frag.count)],
                    got: 0,
                });
                self.partial.len() - 1
            }
        };
        let p = &mut self.partial[at];
        let slot = &mut p.pieces[usize::from(frag.index)];
        if slot.is_some() {
            return Reassembly::Dropped;
        }
        *slot = Some(Bytes::copy_from_slice(payload));
        p.got += 1;
        if p.got < p.pieces.len() {
            return Reassembly::Pending;
        }
        let Some(p) = self.partial.remove(at) else {
            return Reassembly::Dropped;
        };
        let mut frame = BytesMut::with_capacity(p.pieces.iter().flatten().map(Bytes::len).sum());
        for piece in p.pieces.iter().flatten() {
            frame.put_slice(piece);
        }
        if frame.len() < MIN_FRAME_LEN {
            return Reassembly::Dropped;
        }
        Reassembly::Frame(p.header, frame.freeze())
    }

    /// Frames given up so far (a piece lost, late or displaced).
    pub fn expired(&self) -> u64 {
        self.expired
    }

    /// Frames waiting for pieces.
    pub fn pending(&self) -> usize {
        self.partial.len()
    }

    fn expire(&mut self, now: Instant) {
        while self
            .partial
            .front()
            .is_some_and(|p| now.saturating_duration_since(p.started) > REASSEMBLY_TIMEOUT)
        {
            self.partial.pop_front();
            self.expired += 1;
        }
    }
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
        let d = decode(&b).unwrap();
        assert_eq!((d.header, d.fragment), (h, None));
        assert_eq!(d.payload, &frame()[..]);
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
        assert_eq!(decode(&v).err(), Some(DatagramError::Version(0)));
        let mut v = b.to_vec();
        v[1] = 9;
        assert_eq!(decode(&v).err(), Some(DatagramError::Delivery(9)));
        let mut v = b.to_vec();
        v[5] = 1;
        assert_eq!(decode(&v).err(), Some(DatagramError::Vni(1 << 24 | 1)));
        assert_eq!(
            decode(&b[..DATAGRAM_HEADER_LEN + 13]).err(),
            Some(DatagramError::TooShort {
                len: DATAGRAM_HEADER_LEN + 13
            })
        );
    }

    fn header() -> DatagramHeader {
        DatagramHeader {
            vni: Vni::new(7).unwrap(),
            delivery: Delivery::Unicast,
            ack: 42,
        }
    }

    fn big_frame(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn small_frames_are_not_split() {
        let f = frame();
        let d = split(&header(), &f, DATAGRAM_HEADER_LEN + f.len(), 9).unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(decode(&d[0]).unwrap().fragment, None);
    }

    #[test]
    fn split_and_reassemble_in_any_order() {
        let f = big_frame(1514);
        let parts = split(&header(), &f, 1200, 0xbeef).unwrap();
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.len() <= 1200));
        let t = Instant::now();
        let mut r = Reassembler::new();
        let mut out = Vec::new();
        for p in parts.iter().rev() {
            let d = decode(p).unwrap();
            let frag = d.fragment.unwrap();
            assert_eq!((frag.id, frag.count), (0xbeef, 2));
            out.push(r.push(t, d.header, frag, d.payload));
        }
        assert_eq!(out[0], Reassembly::Pending);
        assert_eq!(out[1], Reassembly::Frame(header(), Bytes::from(f)));
        assert_eq!((r.pending(), r.expired()), (0, 0));
    }

    #[test]
    fn lost_pieces_expire_and_bounds_hold() {
        let t = Instant::now();
        let mut r = Reassembler::new();
        let f = big_frame(3000);
        // Frame 1 loses its last piece.
        let parts = split(&header(), &f, 1200, 1).unwrap();
        assert_eq!(parts.len(), 3);
        for p in &parts[..2] {
            let d = decode(p).unwrap();
            assert_eq!(
                r.push(t, d.header, d.fragment.unwrap(), d.payload),
                Reassembly::Pending
            );
        }
        // A duplicate piece is dropped.
        let d = decode(&parts[0]).unwrap();
        assert_eq!(
            r.push(t, d.header, d.fragment.unwrap(), d.payload),
            Reassembly::Dropped
        );
        // Too late: frame 1 is given up when frame 2 arrives.
        let later = t + REASSEMBLY_TIMEOUT + Duration::from_millis(1);
        let parts2 = split(&header(), &f, 1200, 2).unwrap();
        let d = decode(&parts2[0]).unwrap();
        assert_eq!(
            r.push(later, d.header, d.fragment.unwrap(), d.payload),
            Reassembly::Pending
        );
        assert_eq!((r.pending(), r.expired()), (1, 1));
        // Many partial frames: never more than MAX_PARTIAL_FRAMES held.
        for id in 100..100 + 2 * MAX_PARTIAL_FRAMES as u16 {
            let p = split(&header(), &f, 1200, id).unwrap();
            let d = decode(&p[0]).unwrap();
            r.push(later, d.header, d.fragment.unwrap(), d.payload);
        }
        assert_eq!(r.pending(), MAX_PARTIAL_FRAMES);
    }

    #[test]
    fn refuses_what_cannot_be_split() {
        let f = big_frame(64 * 1024);
        assert!(matches!(
            split(&header(), &f, 600, 0),
            Err(DatagramError::TooBig { .. })
        ));
        assert!(matches!(
            split(&header(), &f, FRAGMENT_HEADER_LEN, 0),
            Err(DatagramError::TooBig { .. })
        ));
        // 64 KiB in 1200-byte datagrams: 56 pieces.
        assert_eq!(split(&header(), &f, 1200, 0).unwrap().len(), 56);
        // Bad fragment fields.
        let mut p = split(&header(), &big_frame(2000), 1200, 3).unwrap()[0].to_vec();
        p[DATAGRAM_HEADER_LEN + 3] = 1;
        assert!(matches!(decode(&p), Err(DatagramError::Fragment { .. })));
        p[DATAGRAM_HEADER_LEN + 3] = 2;
        p[DATAGRAM_HEADER_LEN + 2] = 2;
        assert!(matches!(decode(&p), Err(DatagramError::Fragment { .. })));
    }
}
