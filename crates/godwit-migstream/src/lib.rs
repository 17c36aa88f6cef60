//! QEMU's migration stream, page by page, free of I/O.
//!
//! godwit's agents sit between the two QEMUs of a migration. The source
//! agent parses QEMU's precopy stream into page records ([`parser`]) and
//! sends the destination agent only what it cannot rebuild ([`encoder`]);
//! the destination agent re-emits a byte-identical stream to its QEMU
//! ([`decoder`], [`emit`]). Nothing here touches a socket, a file or a
//! clock-driven timer, so every rule is unit- and fuzz-testable.
//!
//! # Layout
//! - [`qemu`]: the stream format's constants, by QEMU version.
//! - [`parser`]: the resumable parser with raw fallback.
//! - [`emit`]: the byte-exact re-emitter.
//! - [`ops`]: the messages and ops the agents exchange.
//! - [`encoder`] / [`decoder`]: the two ends of the page-aware codec.
//! - [`hash`], [`bloom`], [`delta`], [`compress`]: fingerprints, summaries
//!   of what the destination holds, page deltas, batch compression.
#![warn(missing_docs)]

pub mod bloom;
pub mod compress;
pub mod decoder;
pub mod delta;
pub mod emit;
pub mod encoder;
pub mod hash;
pub mod ops;
pub mod parser;
pub mod qemu;
pub mod synth;
pub mod varint;

pub use decoder::{Decoder, DecoderStats, MemStore, PageStore};
pub use encoder::{Encoder, EncoderConfig, EncoderStats, Outgoing};
pub use hash::PageHash;
pub use ops::{Message, Origin, SummaryKind};
pub use parser::{Block, BlockId, Event, Fallback, PageBody, PageRecord, StreamParser};
pub use qemu::{QemuFormat, PAGE_SIZE};

/// Errors of the codec. Any of them ends the migration (the source VM keeps
/// running); none is ever papered over with a guess.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    /// A message ended early.
    #[error("message truncated")]
    Truncated,
    /// A message broke the format.
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    /// Compression failed.
    #[error("compression failed: {0}")]
    Compress(&'static str),
    /// The destination asked for a page the source no longer holds.
    #[error("the destination cannot resolve reference {0} and the page is not retained")]
    Unresolvable(u64),
    /// The destination's page store failed.
    #[error("page store: {0}")]
    Store(String),
}
