//! godwit's own NBD (Network Block Device) server.
//!
//! Every guest disk is served by its host's agent over a unix socket; QEMU's
//! NBD client connects to it. No Rust NBD crate is production-grade (see
//! `nbd-and-storage-relocation.md` §4.1), so the protocol is implemented here,
//! following the NBD specification (`doc/proto.md`).
//!
//! # Layout
//!
//! - [`proto`]: the sans-IO protocol core. [`proto::ServerConnection`] takes
//!   bytes from the client in arbitrary chunks and yields typed events
//!   (negotiated export, requests, disconnect) and the bytes to send back. It
//!   speaks fixed newstyle only, structured replies, `base:allocation`.
//! - [`export`]: block backends behind the [`export::Backend`] trait: a raw
//!   (sparse) image file ([`export::FileExport`]) and an in-memory one
//!   ([`export::MemExport`], for tests and fuzzing), plus [`export::execute`],
//!   which runs one request against a backend.
//! - `server` (feature `tokio`, on by default): the thin async shell,
//!   [`server::serve_unix`], one task per connection driving the core.
#![warn(missing_docs)]

pub mod export;
pub mod proto;
#[cfg(feature = "tokio")]
pub mod server;

pub use export::{Backend, ExportError, FileExport, MemExport};
pub use proto::{
    Command, ExportInfo, NbdErrno, Negotiated, ProtoError, Reply, Request, ServerConnection,
    ServerEvent,
};
