//! Framing of QEMU's `-netdev stream` (and the TCP mode of the legacy
//! `-netdev socket`): how guest frames cross the unix or TCP socket between
//! QEMU and the agent.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | frame length `L`, unsigned big-endian |
//! | 4 | L | the Ethernet frame: no virtio-net header, no FCS, no padding |
//!
//! QEMU 7.2 (`net/stream.c`, `net_fill_rstate()`) writes exactly this in
//! both directions and closes the connection when `L` exceeds its receive
//! buffer, `NET_BUFSIZE` = 69 632. The decoder enforces the same bound, so a
//! corrupted length is caught before anything is buffered for it, and the
//! encoder refuses to produce a record QEMU would reject.
//!
//! Decoding follows "check, then parse": a partial record consumes nothing
//! and yields `Ok(None)`; a bad length is an error after which the stream
//! cannot be resynchronised and the connection must be closed (QEMU, as the
//! server, then listens again).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::collections::VecDeque;

/// Size of the record header.
pub const STREAM_HEADER_LEN: usize = 4;

/// Largest frame carried in one record: QEMU's `NET_BUFSIZE` (4096 + 65 536),
/// the size of the buffer `net_fill_rstate()` reads into. Bigger records make
/// QEMU drop the connection, so we never send one and treat one received as
/// a corrupted stream.
pub const MAX_STREAM_FRAME_LEN: usize = 4096 + 65_536;

/// Errors of the stream framing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// A record announced (or a caller tried to send) a frame bigger than
    /// [`MAX_STREAM_FRAME_LEN`].
    #[error("stream record of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// The length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A record of length zero: QEMU never sends one, so the stream is not
    /// what we think it is.
    #[error("stream record of length zero")]
    Empty,
    /// The connection ended in the middle of a record.
    #[error("stream ended inside a record ({buffered} bytes of it received)")]
    Truncated {
        /// Bytes of the incomplete record.
        buffered: usize,
    },
}

/// Stateless encoder/decoder of stream records.
#[derive(Debug, Default, Clone, Copy)]
pub struct StreamCodec;

impl StreamCodec {
    /// Checks whether `buf` starts with a complete record: `Ok(Some(n))` is
    /// the record's total size (header included), `Ok(None)` asks for more.
    pub fn check(buf: &[u8]) -> Result<Option<usize>, StreamError> {
        let Some(header) = buf.get(..STREAM_HEADER_LEN) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        // u32 always fits in usize on the 32/64-bit targets godwit builds for;
        // saturate so a 16-bit target would still reject it as too long.
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len == 0 {
            return Err(StreamError::Empty);
        }
        if len > MAX_STREAM_FRAME_LEN {
            return Err(StreamError::TooLong {
                len,
                max: MAX_STREAM_FRAME_LEN,
            });
        }
        let total = STREAM_HEADER_LEN + len;
        Ok((buf.len() >= total).then_some(total))
    }

    /// Takes one complete frame off the front of `buf`; `Ok(None)` (nothing
    /// consumed) if the record is incomplete.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Bytes>, StreamError> {
        let Some(total) = Self::check(buf)? else {
            return Ok(None);
        };
        buf.advance(STREAM_HEADER_LEN);
        Ok(Some(buf.split_to(total - STREAM_HEADER_LEN).freeze()))
    }

    /// Appends the record for `frame` to `dst`.
    pub fn encode(frame: &[u8], dst: &mut BytesMut) -> Result<(), StreamError> {
        if frame.is_empty() {
            return Err(StreamError::Empty);
        }
        if frame.len() > MAX_STREAM_FRAME_LEN {
            return Err(StreamError::TooLong {
                len: frame.len(),
                max: MAX_STREAM_FRAME_LEN,
            });
        }
        dst.reserve(STREAM_HEADER_LEN + frame.len());
        // Bounded by MAX_STREAM_FRAME_LEN above, so it fits in u32.
        dst.put_u32(frame.len() as u32);
        dst.put_slice(frame);
        Ok(())
    }
}

/// Incremental decoder for one QEMU connection: feed it whatever the socket
/// returned, in any chunking, and take frames out.
///
/// Calling order: [`handle_input`](Self::handle_input) with each chunk read,
/// then [`poll_frame`](Self::poll_frame) until it returns `None`. An error is
/// sticky: every later `handle_input` returns it again.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    buf: BytesMut,
    frames: VecDeque<Bytes>,
    error: Option<StreamError>,
}

impl StreamDecoder {
    /// A decoder at the start of a connection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes read from the socket. Complete frames become available to
    /// [`poll_frame`](Self::poll_frame); afterwards fewer than
    /// `STREAM_HEADER_LEN + MAX_STREAM_FRAME_LEN` bytes stay buffered.
    pub fn handle_input(&mut self, data: &[u8]) -> Result<(), StreamError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        self.buf.extend_from_slice(data);
        loop {
            match StreamCodec::decode(&mut self.buf) {
                Ok(Some(frame)) => self.frames.push_back(frame),
                Ok(None) => return Ok(()),
                Err(e) => {
                    self.buf.clear();
                    self.error = Some(e.clone());
                    return Err(e);
                }
            }
        }
    }

    /// The next complete frame, oldest first.
    pub fn poll_frame(&mut self) -> Option<Bytes> {
        self.frames.pop_front()
    }

    /// Bytes of an incomplete record held back.
    pub fn buffered_input(&self) -> usize {
        self.buf.len()
    }

    /// True once the decoder has failed.
    pub fn is_failed(&self) -> bool {
        self.error.is_some()
    }

    /// Checks the connection ended cleanly: EOF in the middle of a record is
    /// a truncated frame, which the caller should report.
    pub fn handle_eof(&self) -> Result<(), StreamError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        if !self.buf.is_empty() {
            return Err(StreamError::Truncated {
                buffered: self.buf.len(),
            });
        }
        Ok(())
    }

    /// True if an EOF now would cut a record in half.
    pub fn is_mid_record(&self) -> bool {
        !self.buf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rarp_record_layout() {
        let frame = [0xabu8; 60];
        let mut out = BytesMut::new();
        StreamCodec::encode(&frame, &mut out).unwrap();
        assert_eq!(&out[..4], &[0, 0, 0, 0x3c]);
        assert_eq!(out.len(), 64);
        assert_eq!(StreamCodec::decode(&mut out).unwrap().unwrap(), &frame[..]);
        assert!(out.is_empty());
    }

    #[test]
    fn partial_consumes_nothing() {
        let mut out = BytesMut::new();
        StreamCodec::encode(b"0123456789abcdef", &mut out).unwrap();
        for cut in 0..out.len() {
            let mut part = BytesMut::from(&out[..cut]);
            assert_eq!(StreamCodec::decode(&mut part), Ok(None));
            assert_eq!(part.len(), cut);
        }
    }

    #[test]
    fn bounds_are_enforced() {
        let mut ok = BytesMut::new();
        StreamCodec::encode(&vec![1u8; MAX_STREAM_FRAME_LEN], &mut ok).unwrap();
        assert_eq!(StreamCodec::check(&ok), Ok(Some(MAX_STREAM_FRAME_LEN + 4)));
        let too_long = vec![0u8; MAX_STREAM_FRAME_LEN + 1];
        assert_eq!(
            StreamCodec::encode(&too_long, &mut BytesMut::new()),
            Err(StreamError::TooLong {
                len: MAX_STREAM_FRAME_LEN + 1,
                max: MAX_STREAM_FRAME_LEN
            })
        );
        assert_eq!(
            StreamCodec::encode(&[], &mut BytesMut::new()),
            Err(StreamError::Empty)
        );
        // A too-long header is rejected from its 4 bytes alone.
        let hdr = ((MAX_STREAM_FRAME_LEN + 1) as u32).to_be_bytes();
        assert!(matches!(
            StreamCodec::check(&hdr),
            Err(StreamError::TooLong { .. })
        ));
        assert_eq!(
            StreamCodec::check(&[0xff; 4]),
            Err(StreamError::TooLong {
                len: u32::MAX as usize,
                max: MAX_STREAM_FRAME_LEN
            })
        );
        assert_eq!(StreamCodec::check(&[0; 4]), Err(StreamError::Empty));
    }

    #[test]
    fn decoder_error_is_sticky() {
        let mut d = StreamDecoder::new();
        d.handle_input(&[0, 0, 0, 2, 9, 9, 0, 0]).unwrap();
        assert_eq!(d.poll_frame().unwrap(), &[9, 9][..]);
        assert!(d.is_mid_record());
        assert_eq!(d.handle_eof(), Err(StreamError::Truncated { buffered: 2 }));
        assert_eq!(d.handle_input(&[0, 0]), Err(StreamError::Empty));
        assert!(d.is_failed());
        assert_eq!(d.handle_input(&[0, 0, 0, 1, 1]), Err(StreamError::Empty));
        assert_eq!(d.handle_eof(), Err(StreamError::Empty));
        assert_eq!(d.poll_frame(), None);
    }

    proptest! {
        /// Any sequence of frames, split at arbitrary points, decodes back
        /// to the same sequence, and the decoder never holds more than one
        /// incomplete record.
        #[test]
        fn any_chunking_yields_the_same_frames(
            frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..400), 0..20),
            splits in proptest::collection::vec(1usize..300, 1..10),
        ) {
            let mut wire = BytesMut::new();
            for f in &frames {
                StreamCodec::encode(f, &mut wire).unwrap();
            }
            let mut d = StreamDecoder::new();
            let mut got = Vec::new();
            let mut rest = &wire[..];
            let mut i = 0;
            while !rest.is_empty() {
                let n = splits[i % splits.len()].min(rest.len());
                i += 1;
                d.handle_input(&rest[..n]).unwrap();
                rest = &rest[n..];
                prop_assert!(d.buffered_input() < STREAM_HEADER_LEN + MAX_STREAM_FRAME_LEN);
                while let Some(f) = d.poll_frame() {
                    got.push(f.to_vec());
                }
            }
            prop_assert!(!d.is_mid_record());
            prop_assert_eq!(d.handle_eof(), Ok(()));
            prop_assert_eq!(got, frames);
        }

        /// Arbitrary bytes never panic the decoder; it either fails for good
        /// or keeps less than a record buffered.
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..600), chunk in 1usize..64) {
            let mut d = StreamDecoder::new();
            for c in data.chunks(chunk) {
                if d.handle_input(c).is_err() {
                    prop_assert!(d.is_failed());
                    break;
                }
                prop_assert!(d.buffered_input() < STREAM_HEADER_LEN + MAX_STREAM_FRAME_LEN);
            }
        }
    }
}
