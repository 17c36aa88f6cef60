//! The two ends of a memory stream's codec, as the relay pumps see them.
//!
//! A memory stream travels either raw (QEMU's bytes in `Data` frames, the
//! fallback for peers without the page-aware codec) or page-aware
//! (`godwit-migstream`'s messages in `Codec` frames). [`Outbound`] (source)
//! and [`Inbound`] (destination) give the pumps one interface for both, so
//! flow control, acknowledgements and failure handling exist once.
//!
//! Flow control counts *wire* bytes (encoded frames) in both modes: the
//! source's window holds what the path can carry, so QEMU, which sees its
//! bytes taken at the rate the reduced stream crosses the WAN, estimates
//! its bandwidth (and switch-over) from the effective rate.

use std::collections::VecDeque;

use bytes::Bytes;
use godwit_migstream::{Decoder, Encoder, PageStore};
use godwit_wire::Frame;

use crate::relay::{RelayError, CHUNK};
use crate::site::ImageRecorder;

/// Source end: QEMU's bytes in, frames out.
pub enum Outbound {
    /// Byte-exact `Data` frames.
    Raw(VecDeque<Frame>),
    /// The page-aware encoder, and where the pages it sends are recorded
    /// (this site's store), if anywhere.
    Pages(Box<Encoder>, Option<ImageRecorder>),
}

impl Outbound {
    /// Raw relaying.
    pub fn raw() -> Self {
        Outbound::Raw(VecDeque::new())
    }

    /// Takes bytes from QEMU.
    pub fn push(&mut self, b: &[u8]) -> Result<(), RelayError> {
        match self {
            Outbound::Raw(q) => {
                for c in b.chunks(CHUNK) {
                    q.push_back(Frame::Data(Bytes::copy_from_slice(c)));
                }
                Ok(())
            }
            Outbound::Pages(e, rec) => {
                e.push(b).map_err(codec_err)?;
                if let Some(r) = rec {
                    r.record(e.take_new_pages());
                }
                Ok(())
            }
        }
    }

    /// Whether [`Self::flush`] would produce a frame.
    pub fn has_unflushed(&self) -> bool {
        match self {
            Outbound::Raw(_) => false,
            Outbound::Pages(e, _) => e.has_unflushed(),
        }
    }

    /// QEMU paused writing: send what is gathered.
    pub fn flush(&mut self) -> Result<(), RelayError> {
        match self {
            Outbound::Raw(_) => Ok(()),
            Outbound::Pages(e, _) => e.flush().map_err(codec_err),
        }
    }

    /// QEMU closed its stream.
    pub fn finish(&mut self) -> Result<(), RelayError> {
        match self {
            Outbound::Raw(_) => Ok(()),
            Outbound::Pages(e, rec) => {
                e.finish().map_err(codec_err)?;
                if let Some(r) = rec {
                    r.record(e.take_new_pages());
                }
                Ok(())
            }
        }
    }

    /// Whether a frame is ready, and whether it may bypass the window.
    pub fn peek_priority(&self) -> Option<bool> {
        match self {
            Outbound::Raw(q) => q.front().map(|_| false),
            Outbound::Pages(e, _) => e.peek_priority(),
        }
    }

    /// The next frame and whether it bypasses the window.
    pub fn pop(&mut self) -> Option<(Frame, bool)> {
        match self {
            Outbound::Raw(q) => q.pop_front().map(|f| (f, false)),
            Outbound::Pages(e, _) => e
                .poll_message()
                .map(|o| (Frame::Codec(o.payload), o.priority)),
        }
    }

    /// A windowed frame went out; `wire_end` is the window's sent count.
    pub fn on_sent(&mut self, wire_end: u64) {
        if let Outbound::Pages(e, _) = self {
            e.on_sent(wire_end);
        }
    }

    /// The destination acknowledged `wire` bytes.
    pub fn on_acked(&mut self, wire: u64) {
        if let Outbound::Pages(e, _) = self {
            e.on_acked(wire);
        }
    }

    /// A `Codec` frame from the destination.
    pub fn on_peer_message(&mut self, payload: &Bytes) -> Result<(), RelayError> {
        match self {
            Outbound::Raw(_) => Err(RelayError::Protocol(
                "codec message on a raw memory stream".into(),
            )),
            Outbound::Pages(e, _) => e.handle_message(payload).map_err(codec_err),
        }
    }

    /// The link's measured rate (bytes/s), for the choice of compression.
    pub fn set_link_rate(&mut self, rate: f64) {
        if let Outbound::Pages(e, _) = self {
            e.set_link_rate(rate);
        }
    }
}

/// A page store that can cross threads.
pub type SharedStore = Box<dyn PageStore + Send>;

/// Destination end: frames in, QEMU's bytes out.
pub enum Inbound {
    /// `Data` frames carry QEMU's bytes.
    Raw {
        /// Bytes for QEMU.
        out: VecDeque<Bytes>,
        /// Wire bytes consumed.
        completed: u64,
    },
    /// The page-aware decoder.
    Pages(Box<Decoder<SharedStore>>),
}

impl Inbound {
    /// Raw relaying.
    pub fn raw() -> Self {
        Inbound::Raw {
            out: VecDeque::new(),
            completed: 0,
        }
    }

    /// A `Data` or `Codec` frame that cost `wire` bytes.
    pub fn on_frame(&mut self, f: Frame, wire: u64) -> Result<(), RelayError> {
        match (self, f) {
            (Inbound::Raw { out, completed }, Frame::Data(d)) => {
                out.push_back(d);
                *completed += wire;
                Ok(())
            }
            (Inbound::Pages(d), Frame::Codec(p)) => d.push_message(&p, wire).map_err(codec_err),
            (_, f) => Err(RelayError::Protocol(format!(
                "unexpected {:?} frame for this memory codec",
                f.kind()
            ))),
        }
    }

    /// Bytes ready for QEMU.
    pub fn take_output(&mut self) -> Option<Bytes> {
        match self {
            Inbound::Raw { out, .. } => out.pop_front(),
            Inbound::Pages(d) => d.take_output(),
        }
    }

    /// A frame to send back (a NEED).
    pub fn poll_reply(&mut self) -> Option<Frame> {
        match self {
            Inbound::Raw { .. } => None,
            Inbound::Pages(d) => d.poll_need().map(Frame::Codec),
        }
    }

    /// Wire bytes fully delivered to QEMU.
    pub fn completed_wire(&self) -> u64 {
        match self {
            Inbound::Raw { completed, .. } => *completed,
            Inbound::Pages(d) => d.completed_wire(),
        }
    }
}

fn codec_err(e: godwit_migstream::CodecError) -> RelayError {
    RelayError::Codec(e.to_string())
}
