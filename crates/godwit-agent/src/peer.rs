//! Peer agents: who we trust, where they are, and control calls to them.
//!
//! A control call opens a fresh `Control` stream on the (shared) QUIC
//! connection, writes one [`ControlEnvelope`] and reads one
//! [`ControlResponse`]. Trust itself (pinned certificate fingerprints) is
//! enforced by `godwit-transport`; this module keeps the list in step with
//! the configuration file.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use godwit_transport::{PeerConnection, StreamPurpose, Transport};
use godwit_wire::{ControlEnvelope, ControlRequest, ControlResponse, Frame, VersionRange};
use tokio::io::AsyncWriteExt;

use crate::config::PeerEntry;
use crate::relay::{read_first_frame, write_frame, RelayError};

/// Default time allowed for one control call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// Errors reaching or calling a peer.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// No peer has that name or site.
    #[error("no trusted peer named or at site {0:?} (see `godwit peer add`)")]
    Unknown(String),
    /// The QUIC connection could not be made or broke.
    #[error("cannot reach peer {peer}")]
    Transport {
        /// Peer name.
        peer: String,
        /// Cause.
        #[source]
        source: godwit_transport::TransportError,
    },
    /// The stream failed.
    #[error("control call to peer {peer} failed")]
    Stream {
        /// Peer name.
        peer: String,
        /// Cause.
        #[source]
        source: RelayError,
    },
    /// The peer took too long.
    #[error("peer {peer} did not answer within {timeout:?}")]
    Timeout {
        /// Peer name.
        peer: String,
        /// Limit.
        timeout: Duration,
    },
    /// The peer's answer was malformed.
    #[error("peer {peer} sent a malformed answer: {why}")]
    Protocol {
        /// Peer name.
        peer: String,
        /// What.
        why: String,
    },
}

/// The trusted peers and the transport to reach them.
#[derive(Clone)]
pub struct Peers {
    me: String,
    transport: Transport,
    entries: Arc<RwLock<Vec<PeerEntry>>>,
}

impl Peers {
    /// Peers from the configuration.
    pub fn new(me: String, transport: Transport, entries: Vec<PeerEntry>) -> Self {
        Self {
            me,
            transport,
            entries: Arc::new(RwLock::new(entries)),
        }
    }

    /// The transport.
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// All configured peers.
    pub fn entries(&self) -> Vec<PeerEntry> {
        self.entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Adds or replaces a peer (the caller persists the configuration).
    pub fn upsert(&self, entry: PeerEntry) -> Result<(), String> {
        let fp: godwit_transport::Fingerprint = entry
            .fingerprint
            .parse()
            .map_err(|_| format!("fingerprint {:?} is not 64 hex digits", entry.fingerprint))?;
        self.transport
            .peers()
            .insert(&entry.name, fp)
            .map_err(|e| e.to_string())?;
        let mut v = self.entries.write().unwrap_or_else(|p| p.into_inner());
        v.retain(|p| p.name != entry.name);
        v.push(entry);
        Ok(())
    }

    /// Finds a peer by agent name, or by site if exactly one peer is there.
    pub fn resolve(&self, name_or_site: &str) -> Result<PeerEntry, PeerError> {
        let v = self.entries.read().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = v.iter().find(|p| p.name == name_or_site) {
            return Ok(p.clone());
        }
        let mut at_site = v.iter().filter(|p| p.site == name_or_site);
        match (at_site.next(), at_site.next()) {
            (Some(p), None) => Ok(p.clone()),
            _ => Err(PeerError::Unknown(name_or_site.into())),
        }
    }

    /// The connection to a peer (shared; dialled on first use).
    pub async fn connection(&self, peer: &PeerEntry) -> Result<PeerConnection, PeerError> {
        self.transport
            .connection(&peer.name, peer.addr)
            .await
            .map_err(|source| PeerError::Transport {
                peer: peer.name.clone(),
                source,
            })
    }

    /// One control request and its answer.
    pub async fn call(
        &self,
        peer: &PeerEntry,
        request: ControlRequest,
        timeout: Duration,
    ) -> Result<ControlResponse, PeerError> {
        let fut = async {
            let conn = self.connection(peer).await?;
            let (mut send, mut recv) =
                conn.open(StreamPurpose::Control)
                    .await
                    .map_err(|source| PeerError::Transport {
                        peer: peer.name.clone(),
                        source,
                    })?;
            let env = ControlEnvelope {
                versions: VersionRange::ours(),
                from: self.me.clone(),
                request,
            };
            let stream_err = |source| PeerError::Stream {
                peer: peer.name.clone(),
                source,
            };
            write_frame(&mut send, &Frame::control(&env))
                .await
                .map_err(stream_err)?;
            let _ = send.shutdown().await;
            let f = read_first_frame(&mut recv).await.map_err(stream_err)?;
            f.json::<ControlResponse>()
                .map_err(|e| PeerError::Protocol {
                    peer: peer.name.clone(),
                    why: e.to_string(),
                })
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| PeerError::Timeout {
                peer: peer.name.clone(),
                timeout,
            })?
    }
}
