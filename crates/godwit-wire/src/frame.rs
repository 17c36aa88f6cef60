//! Binary frame codec shared by every agent-to-agent stream.
//!
//! | offset | size | field                                   |
//! |--------|------|-----------------------------------------|
//! | 0      | 1    | kind ([`FrameKind`]; 0 is invalid)      |
//! | 1      | 3    | reserved, must be zero                  |
//! | 4      | 4    | payload length, big-endian, ≤ [`MAX_FRAME_LEN`] |
//! | 8      | len  | payload                                 |
//!
//! Decoding follows the "check, then parse" rule: a partial frame yields
//! `Ok(None)` and consumes nothing; a malformed header is an error and the
//! stream must be aborted (it cannot be resynchronised).

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Size of the fixed frame header.
pub const FRAME_HEADER_LEN: usize = 8;

/// Largest payload one frame may carry. 1 MiB keeps a control message or a
/// data chunk well above anything we send (data chunks are 64 KiB) while
/// bounding what a hostile peer can make us buffer before we reject it.
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Errors from decoding frames.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// The kind byte is not one we know.
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    /// Reserved header bytes were not zero.
    #[error("reserved frame header bytes are not zero")]
    Reserved,
    /// The payload length exceeds [`MAX_FRAME_LEN`].
    #[error("frame payload of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The payload does not match the kind's layout.
    #[error("malformed {kind:?} frame: {why}")]
    Malformed {
        /// Frame kind.
        kind: FrameKind,
        /// What was wrong.
        why: &'static str,
    },
    /// A control payload is not valid JSON for the expected message.
    #[error("malformed control message: {0}")]
    Json(String),
    /// The peer speaks no protocol version we accept.
    #[error("peer protocol versions {min}..={max} do not overlap ours")]
    Version {
        /// Peer's lowest version.
        min: u16,
        /// Peer's highest version.
        max: u16,
    },
}

/// Frame kinds. Zero is reserved as invalid so an all-zero header is rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Opens a typed stream; JSON payload (e.g. [`crate::MemoryOpen`]).
    Open = 1,
    /// A control request or response; JSON payload.
    Control = 2,
    /// Opaque relayed bytes (QEMU's migration stream or its return path).
    Data = 3,
    /// Cumulative count of relayed bytes the receiver has delivered; be64.
    Ack = 4,
    /// Orderly end of the relayed byte stream in this direction.
    End = 5,
    /// The sender gives up; UTF-8 reason.
    Abort = 6,
    /// A message of the page-aware memory codec (`godwit-migstream`), opaque
    /// here.
    Codec = 7,
}

impl FrameKind {
    fn from_u8(b: u8) -> Result<Self, WireError> {
        Ok(match b {
            1 => Self::Open,
            2 => Self::Control,
            3 => Self::Data,
            4 => Self::Ack,
            5 => Self::End,
            6 => Self::Abort,
            7 => Self::Codec,
            other => return Err(WireError::UnknownKind(other)),
        })
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Stream-opening header (JSON).
    Open(Bytes),
    /// Control message (JSON).
    Control(Bytes),
    /// Relayed bytes.
    Data(Bytes),
    /// Cumulative delivered-byte count.
    Ack(u64),
    /// End of the relayed stream.
    End,
    /// Abort with a reason.
    Abort(String),
    /// Page-aware codec message.
    Codec(Bytes),
}

impl Frame {
    /// The kind of this frame.
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Open(_) => FrameKind::Open,
            Frame::Control(_) => FrameKind::Control,
            Frame::Data(_) => FrameKind::Data,
            Frame::Ack(_) => FrameKind::Ack,
            Frame::End => FrameKind::End,
            Frame::Abort(_) => FrameKind::Abort,
            Frame::Codec(_) => FrameKind::Codec,
        }
    }

    /// Builds a control frame from a serialisable message.
    pub fn control<T: serde::Serialize>(msg: &T) -> Self {
        // Serialising our own plain data types cannot fail (no maps with
        // non-string keys, no custom serialisers); fall back to an empty
        // object rather than panicking should that ever change.
        Frame::Control(Bytes::from(
            serde_json::to_vec(msg).unwrap_or_else(|_| b"{}".to_vec()),
        ))
    }

    /// Builds an open frame from a serialisable header.
    pub fn open<T: serde::Serialize>(msg: &T) -> Self {
        Frame::Open(Bytes::from(
            serde_json::to_vec(msg).unwrap_or_else(|_| b"{}".to_vec()),
        ))
    }

    /// Parses the JSON payload of an `Open` or `Control` frame.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, WireError> {
        match self {
            Frame::Open(b) | Frame::Control(b) => {
                serde_json::from_slice(b).map_err(|e| WireError::Json(e.to_string()))
            }
            other => Err(WireError::Malformed {
                kind: other.kind(),
                why: "expected a JSON-carrying frame",
            }),
        }
    }

    /// Encoded size of this frame.
    pub fn encoded_len(&self) -> usize {
        FRAME_HEADER_LEN + self.payload_len()
    }

    fn payload_len(&self) -> usize {
        match self {
            Frame::Open(b) | Frame::Control(b) | Frame::Data(b) | Frame::Codec(b) => b.len(),
            Frame::Ack(_) => 8,
            Frame::End => 0,
            Frame::Abort(s) => s.len(),
        }
    }
}

/// Stateless frame encoder/decoder.
#[derive(Debug, Default, Clone, Copy)]
pub struct FrameCodec;

impl FrameCodec {
    /// Appends the encoding of `frame` to `dst`.
    ///
    /// Payloads longer than [`MAX_FRAME_LEN`] are a programming error of the
    /// caller (all producers chunk); they are truncated to stay decodable.
    pub fn encode(frame: &Frame, dst: &mut BytesMut) {
        let len = frame.payload_len().min(MAX_FRAME_LEN);
        dst.reserve(FRAME_HEADER_LEN + len);
        dst.put_u8(frame.kind() as u8);
        dst.put_bytes(0, 3);
        // `len` ≤ MAX_FRAME_LEN, which fits in u32.
        dst.put_u32(len as u32);
        match frame {
            Frame::Open(b) | Frame::Control(b) | Frame::Data(b) | Frame::Codec(b) => {
                dst.put_slice(&b[..len])
            }
            Frame::Ack(n) => dst.put_u64(*n),
            Frame::End => {}
            Frame::Abort(s) => dst.put_slice(&s.as_bytes()[..len]),
        }
    }

    /// Checks whether `src` starts with a complete, well-formed header and
    /// returns the total frame length if the whole frame is present.
    pub fn check(src: &[u8]) -> Result<Option<usize>, WireError> {
        if src.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        FrameKind::from_u8(src[0])?;
        if src[1..4] != [0, 0, 0] {
            return Err(WireError::Reserved);
        }
        let len = u32::from_be_bytes([src[4], src[5], src[6], src[7]]) as usize;
        if len > MAX_FRAME_LEN {
            return Err(WireError::TooLong {
                len,
                max: MAX_FRAME_LEN,
            });
        }
        let total = FRAME_HEADER_LEN + len;
        Ok((src.len() >= total).then_some(total))
    }

    /// Decodes one frame from the front of `src`, consuming it.
    ///
    /// Returns `Ok(None)` if more bytes are needed (nothing is consumed).
    pub fn decode(src: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        let Some(total) = Self::check(src)? else {
            return Ok(None);
        };
        let kind = FrameKind::from_u8(src[0])?;
        let mut frame = src.split_to(total);
        frame.advance(FRAME_HEADER_LEN);
        let payload = frame.freeze();
        let out = match kind {
            FrameKind::Open => Frame::Open(payload),
            FrameKind::Control => Frame::Control(payload),
            FrameKind::Data => Frame::Data(payload),
            FrameKind::Codec => Frame::Codec(payload),
            FrameKind::Ack => {
                if payload.len() != 8 {
                    return Err(WireError::Malformed {
                        kind,
                        why: "ack payload must be 8 bytes",
                    });
                }
                let mut p = payload;
                Frame::Ack(p.get_u64())
            }
            FrameKind::End => {
                if !payload.is_empty() {
                    return Err(WireError::Malformed {
                        kind,
                        why: "end frame carries no payload",
                    });
                }
                Frame::End
            }
            FrameKind::Abort => Frame::Abort(String::from_utf8_lossy(&payload).into_owned()),
        };
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(f: Frame) {
        let mut buf = BytesMut::new();
        FrameCodec::encode(&f, &mut buf);
        assert_eq!(buf.len(), f.encoded_len());
        let got = FrameCodec::decode(&mut buf).unwrap().unwrap();
        assert_eq!(got, f);
        assert!(buf.is_empty());
    }

    #[test]
    fn roundtrips_every_kind() {
        roundtrip(Frame::Open(Bytes::from_static(b"{\"a\":1}")));
        roundtrip(Frame::Control(Bytes::from_static(b"{}")));
        roundtrip(Frame::Data(Bytes::from(vec![7u8; 70_000])));
        roundtrip(Frame::Ack(u64::MAX - 3));
        roundtrip(Frame::End);
        roundtrip(Frame::Abort("link cut".into()));
    }

    #[test]
    fn partial_input_consumes_nothing() {
        let mut full = BytesMut::new();
        FrameCodec::encode(&Frame::Data(Bytes::from_static(b"hello")), &mut full);
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert_eq!(FrameCodec::decode(&mut part).unwrap(), None);
            assert_eq!(part.len(), cut);
        }
    }

    #[test]
    fn rejects_bad_headers() {
        let mut b = BytesMut::from(&[0u8, 0, 0, 0, 0, 0, 0, 0][..]);
        assert_eq!(FrameCodec::decode(&mut b), Err(WireError::UnknownKind(0)));
        let mut b = BytesMut::from(&[3u8, 1, 0, 0, 0, 0, 0, 0][..]);
        assert_eq!(FrameCodec::decode(&mut b), Err(WireError::Reserved));
        let mut b = BytesMut::from(&[3u8, 0, 0, 0, 0x10, 0, 0, 1][..]);
        assert!(matches!(
            FrameCodec::decode(&mut b),
            Err(WireError::TooLong { .. })
        ));
        let mut b = BytesMut::from(&[4u8, 0, 0, 0, 0, 0, 0, 2, 1, 2][..]);
        assert!(matches!(
            FrameCodec::decode(&mut b),
            Err(WireError::Malformed { .. })
        ));
        let mut b = BytesMut::from(&[5u8, 0, 0, 0, 0, 0, 0, 1, 1][..]);
        assert!(matches!(
            FrameCodec::decode(&mut b),
            Err(WireError::Malformed { .. })
        ));
    }

    proptest! {
        /// Any sequence of frames, split at arbitrary points, decodes back
        /// to the same sequence.
        #[test]
        fn stream_of_frames_survives_any_split(
            datas in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..20),
            acks in proptest::collection::vec(any::<u64>(), 0..5),
            split in 1usize..97,
        ) {
            let mut frames: Vec<Frame> = datas.into_iter().map(|d| Frame::Data(Bytes::from(d))).collect();
            frames.extend(acks.into_iter().map(Frame::Ack));
            frames.push(Frame::End);
            let mut wire = BytesMut::new();
            for f in &frames { FrameCodec::encode(f, &mut wire); }
            let mut rx = BytesMut::new();
            let mut out = Vec::new();
            for chunk in wire.chunks(split) {
                rx.extend_from_slice(chunk);
                while let Some(f) = FrameCodec::decode(&mut rx).unwrap() { out.push(f); }
            }
            prop_assert_eq!(out, frames);
        }

        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut b = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = FrameCodec::decode(&mut b) {}
        }
    }
}
