//! The agent-to-agent protocol of godwit, free of I/O.
//!
//! Agents talk over one authenticated QUIC connection per peer (see
//! `godwit-transport`); every QUIC stream carries a sequence of [`Frame`]s.
//! This crate owns what goes *inside* those streams and nothing else: it
//! never touches a socket or reads a clock, so every rule here is unit- and
//! fuzz-testable.
//!
//! # Layout
//! - [`frame`]: the binary frame codec (8-byte header, bounded payload).
//! - [`control`]: typed control requests and responses (JSON inside
//!   `Control` frames), with the protocol version range.
//! - [`window`]: the relay flow window that keeps the bytes buffered
//!   between the two QEMUs close to the path's bandwidth-delay product, so
//!   QEMU's own bandwidth and downtime estimates stay true.
//!
//! # Streams
//! ```text
//! control stream:  client ── Control(request) ──▶ server
//!                  client ◀── Control(response) ── server     (then both finish)
//!
//! memory stream:   source ── Open(MemoryOpen) ──▶ destination
//!                  source ◀── Control(MemoryAccepted{codec}) or Abort ──
//!                  source ── Data* or Codec* … End ──▶  (QEMU's migration stream,
//!                                                      raw or page-aware)
//!                  source ◀── Data* (return path) + Codec* (summaries, NEEDs)
//!                              + Ack(wire bytes consumed) ──
//!                  either side ── Abort(reason) ──▶   on failure
//! ```
#![warn(missing_docs)]

pub mod control;
pub mod frame;
pub mod window;

pub use control::{
    ControlEnvelope, ControlRequest, ControlResponse, ErrorCode, IncomingOutcome, MemoryOpen,
    VersionRange, CODEC_PAGES_V1, CODEC_RAW, PROTOCOL_VERSION,
};
pub use frame::{Frame, FrameCodec, FrameKind, WireError, FRAME_HEADER_LEN, MAX_FRAME_LEN};
pub use window::RelayWindow;
