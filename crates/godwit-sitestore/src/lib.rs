//! The destination site's page store.
//!
//! Every page that arrives at a site is kept on disk, shared by all VMs
//! migrating into that site and persistent across migrations and agent
//! restarts, so a second VM of the same image (a warm site) or a VM coming
//! back (a return) costs almost nothing on the wire. At the start of a
//! migration the destination sends the source Bloom summaries of what it
//! holds ([`SiteStore::summary`], [`SiteStore::image_summary`],
//! [`SiteStore::disk_summary`]); the source then sends references, which
//! the migstream `Decoder` resolves through [`SiteStore`]'s
//! [`godwit_migstream::PageStore`] implementation.
//!
//! A wrong page is silent guest corruption, so every read is verified:
//! BLAKE3 of the bytes read must equal the requested fingerprint, else the
//! entry is dropped and counted, and the read misses (the protocol then asks
//! the source for the page). Correctness never depends on the store; only
//! the bytes on the wire do.
//!
//! The store is synchronous std I/O; the agent wraps it in
//! `Arc<Mutex<SiteStore>>`.
//!
//! # Layout
//! - [`store`]: [`SiteStore`]: the segment log, the in-memory index,
//!   verified reads, pins and eviction, and the façade over the modules
//!   below.
//! - [`format`](mod@format): the on-disk formats (segment records, sidecar indexes,
//!   image manifests) as pure encode/decode functions.
//! - [`disk`]: hash → (file, offset) index of the guest's disk blocks that
//!   the destination already holds (never copied, never persisted).
//! - [`image`]: per-VM manifests of the pages of a VM's earlier image, and
//!   the VM-name rules that make them safe file names.
//! - [`error`] holds [`StoreError`].
//!
//! # On disk
//! ```text
//! <dir>/seg/<n>.seg   append-only records [magic u32][hash 32 B][len u32][data]
//! <dir>/seg/<n>.idx   sidecar index of a sealed segment (written atomically)
//! <dir>/img/<vm>.img  the hashes of the VM's last image migrated out of here
//! ```
#![warn(missing_docs)]

pub mod disk;
pub mod error;
pub mod format;
pub mod image;
pub mod store;

pub use error::StoreError;
pub use store::{Pin, SiteStore, StoreConfig, StoreStats};
