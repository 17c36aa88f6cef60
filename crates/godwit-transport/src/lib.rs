//! Encrypted, mutually authenticated agent-to-agent transport over QUIC,
//! tuned for long fat pipes.
//!
//! Every pair of godwit agents keeps one QUIC connection (quinn, TLS 1.3,
//! ALPN `godwit/1`). Both ends authenticate by pinned certificate
//! fingerprint: there is no CA, and an agent whose certificate's SHA-256 is
//! not in the local [`PeerSet`] is refused, as client and as server. Each use
//! gets its own bidirectional stream whose first byte names its
//! [`StreamPurpose`], so control traffic, memory pages, on-demand and
//! background storage, and network frames are prioritised separately and
//! never block each other's flow control.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use godwit_transport::{Identity, PeerSet, StreamPurpose, Transport, TransportConfig};
//! let identity = Identity::generate("site-a")?;
//! let peers = PeerSet::new();
//! peers.insert("site-b", "0123…".parse()?)?;
//! let (transport, mut incoming) =
//!     Transport::bind(TransportConfig::new("0.0.0.0:4433".parse()?, identity, peers)).await?;
//! let conn = transport.connection("site-b", "192.0.2.7:4433".parse()?).await?;
//! let (mut send, _recv) = conn.open(StreamPurpose::Control).await?;
//! send.write_all(b"hello").await?;
//! while let Some(stream) = incoming.next().await {
//!     println!("{} opened a {} stream", stream.peer, stream.purpose);
//! }
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! - [`identity`]: self-signed certificate + key, on-disk format, [`Fingerprint`].
//! - [`peers`]: the runtime-updatable [`PeerSet`] (name → pinned fingerprint).
//! - [`tls`]: rustls configs and the two pinning certificate verifiers.
//! - [`purpose`]: [`StreamPurpose`], its header byte and send priority (sans-IO).
//! - [`config`]: [`TransportConfig`] and the long-fat-pipe tuning of quinn.
//! - [`lfn`]: godwit's default congestion controller, a loss-tolerant
//!   BBR-style model (delivery-rate max filter × min RTT) that ignores
//!   random loss below 2 % per round and so fills long fat pipes (sans-IO).
//! - [`congestion`]: the window cap that tames quinn's BBR (sans-IO), kept
//!   for comparison.
//! - [`transport`]: the tokio shell — [`Transport`], [`PeerConnection`],
//!   [`IncomingStreams`].
#![warn(missing_docs)]

pub mod config;
pub mod congestion;
pub mod identity;
pub mod lfn;
pub mod peers;
pub mod purpose;
pub mod tls;
pub mod transport;

pub use config::{ConfigError, Congestion, TransportConfig};
pub use identity::{Fingerprint, FingerprintParseError, Identity, IdentityError};
pub use peers::{PeerSet, PeerSetError};
pub use purpose::{StreamPurpose, UnknownPurpose};
pub use transport::{
    DatagramHandler, IncomingStream, IncomingStreams, PeerConnection, PeerStats, Transport,
    TransportError,
};
