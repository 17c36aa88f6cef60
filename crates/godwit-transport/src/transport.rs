//! The QUIC endpoint shell: one UDP socket, one connection per peer, one
//! stream per use.
//!
//! This module owns the endpoint's tasks and the peer-connection registry:
//! - an accept task that completes incoming handshakes, maps the client
//!   certificate to a peer name, sends the *admission* signal and registers
//!   the connection;
//! - per connection, a stream-accept task that reads each stream's purpose
//!   header and forwards it to [`IncomingStreams`], and a datagram task
//!   that hands each unreliable datagram (overlay frames) to the
//!   [`DatagramHandler`] set with [`Transport::on_datagram`];
//! - [`Transport::connection`], which reuses a live connection to a peer
//!   (dialled or accepted) or dials one, with concurrent callers sharing a
//!   single dial.
//!
//! # Admission
//!
//! In TLS 1.3 the client finishes its handshake before the server has
//! checked the client certificate, so a dialler whose certificate is refused
//! would otherwise see a "connected" connection that dies a moment later.
//! The acceptor therefore opens one unidirectional stream carrying
//! [`ADMISSION_BYTE`] once it has authenticated the dialler, and
//! [`Transport::connection`] returns only after reading it: refusal is
//! reported by `connection()` itself, at the cost of one extra half RTT.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant D as dialler
//!     participant A as acceptor
//!     D->>A: Initial (ClientHello, ALPN godwit/1)
//!     A->>D: ServerHello .. CertificateVerify, Finished
//!     Note over D: server cert fingerprint == pin?
//!     D->>A: Certificate, CertificateVerify, Finished
//!     Note over A: client cert fingerprint in PeerSet?
//!     A->>D: uni stream [ADMISSION_BYTE]
//!     D->>A: bidi stream [purpose byte] data...
//! ```
//!
//! # Simultaneous dials
//!
//! If two agents dial each other at once, two connections exist. Each side
//! keeps using whichever it registered first; the other stays open and its
//! incoming streams are still served, so nothing is lost.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, VarInt};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::config::{ConfigError, TransportConfig, UDP_SOCKET_BUFFER_BYTES};
use crate::identity::{Fingerprint, Identity};
use crate::peers::PeerSet;
use crate::purpose::{StreamPurpose, STREAM_ERROR_NO_HEADER, STREAM_ERROR_UNKNOWN_PURPOSE};
use crate::tls::{self, TlsError};

/// Connection close code: orderly shutdown of the endpoint.
pub const CLOSE_SHUTDOWN: u32 = 0;
/// Connection close code: the certificate passed TLS but its peer was removed
/// from the peer set before the connection could be registered.
pub const CLOSE_UNKNOWN_PEER: u32 = 1;
/// Connection close code: the peer's pin changed, so the old connection is
/// no longer trusted.
pub const CLOSE_REPINNED: u32 = 2;
/// Payload of the admission stream (see the module docs). A constant rather
/// than empty so a future version can signal something else.
pub const ADMISSION_BYTE: u8 = 0x01;
/// How long an accepted stream may take to deliver its 1-byte purpose
/// header. The opener writes it immediately, so only loss delays it.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Accepted streams buffered for the application before stream acceptance
/// (and thus the peer's stream opening) is back-pressured.
pub const INCOMING_QUEUE: usize = 256;
/// Longest [`Transport::shutdown`] waits for peers to acknowledge the close.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Server name put in the ClientHello. Peers are identified by fingerprint,
/// so this is never checked; a constant also avoids leaking peer names in
/// clear text.
const SERVER_NAME: &str = "peer.godwit";

/// Receives every QUIC datagram from every peer: `(peer name, payload)`.
/// Called on the connection's datagram task, so it must not block (queue or
/// drop, as a NIC would).
pub type DatagramHandler = Arc<dyn Fn(&str, bytes::Bytes) + Send + Sync>;

/// Errors from the transport shell.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Invalid settings.
    #[error("invalid transport configuration")]
    Config(#[from] ConfigError),
    /// TLS configuration could not be built.
    #[error("building TLS configuration")]
    Tls(#[from] TlsError),
    /// rustls config lacks what QUIC needs (e.g. the initial cipher suite).
    #[error("TLS configuration is unusable for QUIC")]
    QuicCrypto(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Binding or configuring the UDP socket failed.
    #[error("binding UDP socket {addr}")]
    Bind {
        /// Requested address.
        addr: SocketAddr,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The peer name is not in the peer set.
    #[error("peer {peer:?} is not in the peer set")]
    UnknownPeer {
        /// Requested peer.
        peer: String,
    },
    /// quinn refused to start the dial (bad address, endpoint stopping).
    #[error("dialling peer {peer:?} at {addr}")]
    Connect {
        /// Peer being dialled.
        peer: String,
        /// Its address.
        addr: SocketAddr,
        /// Underlying error.
        #[source]
        source: quinn::ConnectError,
    },
    /// Mutual authentication failed: our pin did not match the peer's
    /// certificate, or the peer did not accept ours.
    #[error("authentication with peer {peer:?} failed")]
    Refused {
        /// Peer involved.
        peer: String,
        /// The TLS alert or close that carried the refusal.
        #[source]
        source: ConnectionError,
    },
    /// The connection failed or was closed.
    #[error("connection to peer {peer:?} failed")]
    Connection {
        /// Peer involved.
        peer: String,
        /// Underlying error.
        #[source]
        source: ConnectionError,
    },
    /// Writing the stream header failed.
    #[error("opening a {purpose} stream to peer {peer:?}")]
    OpenStream {
        /// Peer involved.
        peer: String,
        /// Purpose of the stream.
        purpose: StreamPurpose,
        /// Underlying error.
        #[source]
        source: quinn::WriteError,
    },
    /// The peer completed TLS but never sent the admission signal.
    #[error("peer {peer:?} did not admit the connection within {timeout:?}")]
    AdmissionTimeout {
        /// Peer involved.
        peer: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// The peer's admission stream was malformed.
    #[error("peer {peer:?} sent a malformed admission stream")]
    BadAdmission {
        /// Peer involved.
        peer: String,
    },
    /// [`Transport::shutdown`] was called.
    #[error("transport is shut down")]
    ShutDown,
}

/// Per-peer counters, from quinn's `ConnectionStats` of the registered
/// connection.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PeerStats {
    /// Peer name.
    pub peer: String,
    /// Peer's UDP address.
    pub remote: SocketAddr,
    /// Smoothed RTT.
    #[serde(rename = "rtt_us", serialize_with = "serialize_micros")]
    pub rtt: Duration,
    /// Congestion window, bytes.
    pub cwnd: u64,
    /// UDP payload bytes sent.
    pub bytes_sent: u64,
    /// UDP payload bytes received.
    pub bytes_received: u64,
    /// QUIC packets sent.
    pub packets_sent: u64,
    /// Packets declared lost.
    pub lost_packets: u64,
    /// Bytes declared lost.
    pub lost_bytes: u64,
    /// Congestion events (window reductions).
    pub congestion_events: u64,
    /// Current path MTU (UDP payload), bytes.
    pub path_mtu: u16,
}

fn serialize_micros<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// An authenticated connection to one peer. Cheap to clone.
#[derive(Clone)]
pub struct PeerConnection {
    peer: Arc<str>,
    fingerprint: Fingerprint,
    conn: quinn::Connection,
}

impl PeerConnection {
    /// The peer's name (from the peer set).
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The fingerprint the peer authenticated with.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// Opens a bidirectional stream for `purpose`: sets its send priority and
    /// writes the purpose header (which also announces it to the peer).
    pub async fn open(
        &self,
        purpose: StreamPurpose,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), TransportError> {
        let (mut send, recv) = self
            .conn
            .open_bi()
            .await
            .map_err(|e| classify(&self.peer, e))?;
        // Fails only if the stream is already closed, which the write below
        // reports with a better error.
        let _ = send.set_priority(purpose.priority());
        send.write_all(&[purpose.to_byte()])
            .await
            .map_err(|source| TransportError::OpenStream {
                peer: self.peer.to_string(),
                purpose,
                source,
            })?;
        Ok((send, recv))
    }

    /// Current smoothed RTT.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    /// Current counters.
    pub fn stats(&self) -> PeerStats {
        let s = self.conn.stats();
        PeerStats {
            peer: self.peer.to_string(),
            remote: self.conn.remote_address(),
            rtt: s.path.rtt,
            cwnd: s.path.cwnd,
            bytes_sent: s.udp_tx.bytes,
            bytes_received: s.udp_rx.bytes,
            packets_sent: s.path.sent_packets,
            lost_packets: s.path.lost_packets,
            lost_bytes: s.path.lost_bytes,
            congestion_events: s.path.congestion_events,
            path_mtu: s.path.current_mtu,
        }
    }

    /// Why the connection closed, or `None` while it is alive.
    pub fn close_reason(&self) -> Option<String> {
        self.conn.close_reason().map(|e| e.to_string())
    }

    /// Resolves when the connection has closed.
    pub async fn closed(&self) {
        self.conn.closed().await;
    }

    /// The underlying quinn connection, e.g. for datagrams.
    pub fn quic(&self) -> &quinn::Connection {
        &self.conn
    }

    fn is_alive(&self) -> bool {
        self.conn.close_reason().is_none()
    }
}

impl std::fmt::Debug for PeerConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerConnection")
            .field("peer", &self.peer)
            .field("remote", &self.conn.remote_address())
            .field("id", &self.conn.stable_id())
            .finish()
    }
}

/// A bidirectional stream opened by an authenticated peer.
#[derive(Debug)]
pub struct IncomingStream {
    /// Peer name.
    pub peer: String,
    /// Purpose from the stream header.
    pub purpose: StreamPurpose,
    /// Our sending half.
    pub send: quinn::SendStream,
    /// Our receiving half, positioned after the header.
    pub recv: quinn::RecvStream,
}

/// Streams opened by peers, in arrival order. Ends after
/// [`Transport::shutdown`] once every connection has closed.
#[derive(Debug)]
pub struct IncomingStreams {
    rx: mpsc::Receiver<IncomingStream>,
}

impl IncomingStreams {
    /// The next accepted stream, or `None` once the transport is shut down.
    pub async fn next(&mut self) -> Option<IncomingStream> {
        self.rx.recv().await
    }
}

/// The agent's QUIC endpoint. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: quinn::Endpoint,
    identity: Identity,
    peers: PeerSet,
    quic: Arc<quinn::TransportConfig>,
    admission_timeout: Duration,
    slots: Mutex<HashMap<String, Arc<PeerSlot>>>,
    /// Taken at shutdown so [`IncomingStreams`] ends once the tasks holding
    /// clones finish.
    incoming_tx: Mutex<Option<mpsc::Sender<IncomingStream>>>,
    /// Where datagrams go; `None` drops them.
    datagrams: RwLock<Option<DatagramHandler>>,
    shut_down: AtomicBool,
}

/// Registry entry for one peer.
#[derive(Default)]
struct PeerSlot {
    /// The connection `connection()` hands out.
    conn: Mutex<Option<PeerConnection>>,
    /// Held across a dial so concurrent callers share it.
    dial: tokio::sync::Mutex<()>,
}

impl PeerSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<PeerConnection>> {
        // Critical sections are single assignments; a poisoned lock still
        // holds a consistent value.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The registered connection if it is alive and still matches the pin.
    fn live(&self, pin: Fingerprint) -> Option<PeerConnection> {
        let mut guard = self.lock();
        match guard.as_ref() {
            Some(c) if c.is_alive() && c.fingerprint == pin => Some(c.clone()),
            Some(c) => {
                if c.is_alive() {
                    tracing::info!(peer = %c.peer, "closing connection: peer was re-pinned");
                    c.conn.close(VarInt::from_u32(CLOSE_REPINNED), b"re-pinned");
                }
                *guard = None;
                None
            }
            None => None,
        }
    }

    /// Registers `conn` unless a live one is already registered; returns the
    /// registered connection.
    fn register(&self, conn: PeerConnection) -> PeerConnection {
        let mut guard = self.lock();
        match guard.as_ref() {
            Some(existing) if existing.is_alive() => existing.clone(),
            _ => {
                *guard = Some(conn.clone());
                conn
            }
        }
    }

    fn unregister(&self, conn: &PeerConnection) {
        let mut guard = self.lock();
        if guard
            .as_ref()
            .is_some_and(|c| c.conn.stable_id() == conn.conn.stable_id())
        {
            *guard = None;
        }
    }
}

impl Transport {
    /// Binds the UDP socket and starts accepting connections.
    pub async fn bind(
        cfg: TransportConfig,
    ) -> Result<(Transport, IncomingStreams), TransportError> {
        let quic = Arc::new(cfg.quic_transport()?);
        let server_tls = tls::server_config(&cfg.identity, &cfg.peers)?;
        let server_crypto = QuicServerConfig::try_from(server_tls)
            .map_err(|e| TransportError::QuicCrypto(Box::new(e)))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(quic.clone());

        let socket = bind_socket(cfg.listen).map_err(|source| TransportError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| TransportError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let local = endpoint.local_addr().unwrap_or(cfg.listen);
        tracing::info!(%local, fingerprint = %cfg.identity.fingerprint(),
            congestion = ?cfg.congestion, max_bdp_bytes = cfg.max_bdp_bytes, "transport listening");

        let (tx, rx) = mpsc::channel(INCOMING_QUEUE);
        let inner = Arc::new(Inner {
            endpoint: endpoint.clone(),
            identity: cfg.identity,
            peers: cfg.peers,
            quic,
            admission_timeout: cfg.idle_timeout,
            slots: Mutex::new(HashMap::new()),
            incoming_tx: Mutex::new(Some(tx)),
            datagrams: RwLock::new(None),
            shut_down: AtomicBool::new(false),
        });
        tokio::spawn(
            accept_loop(endpoint, Arc::downgrade(&inner))
                .instrument(tracing::debug_span!("accept", %local)),
        );
        Ok((Transport { inner }, IncomingStreams { rx }))
    }

    /// A live authenticated connection to `peer`: the registered one
    /// (dialled or accepted) if alive, else a new dial to `addr`. Concurrent
    /// callers for the same peer share one dial.
    pub async fn connection(
        &self,
        peer: &str,
        addr: SocketAddr,
    ) -> Result<PeerConnection, TransportError> {
        let inner = &self.inner;
        let pin = inner.pin(peer)?;
        let slot = inner.slot(peer);
        if let Some(c) = slot.live(pin) {
            return Ok(c);
        }
        let _dialling = slot.dial.lock().await;
        // Another caller's dial, or an accepted connection, may have landed
        // while we waited.
        if let Some(c) = slot.live(pin) {
            return Ok(c);
        }
        if inner.shut_down.load(Ordering::Acquire) {
            return Err(TransportError::ShutDown);
        }
        let conn = inner
            .dial(peer, addr, pin)
            .instrument(tracing::debug_span!("dial", %peer, %addr))
            .await?;
        inner.spawn_stream_acceptor(conn.clone());
        Ok(slot.register(conn))
    }

    /// The registered connection to `peer` if it is alive, without dialling
    /// (for senders that must not wait, such as overlay frames).
    pub fn live_connection(&self, peer: &str) -> Option<PeerConnection> {
        let pin = self.inner.peers.get(peer)?;
        let slot = self.inner.lock_slots().get(peer).cloned()?;
        slot.live(pin)
    }

    /// Sets where datagrams from peers go (replacing any earlier handler).
    /// Datagrams that arrive while none is set are dropped.
    pub fn on_datagram(&self, handler: DatagramHandler) {
        *self
            .inner
            .datagrams
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(handler);
    }

    /// The shared peer set; edits apply to the next handshake.
    pub fn peers(&self) -> &PeerSet {
        &self.inner.peers
    }

    /// Our certificate fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.inner.identity.fingerprint()
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.endpoint.local_addr()
    }

    /// Counters of every live registered peer connection, sorted by peer.
    pub fn stats(&self) -> Vec<PeerStats> {
        let slots: Vec<Arc<PeerSlot>> = self.inner.lock_slots().values().cloned().collect();
        let mut stats: Vec<PeerStats> = slots
            .iter()
            .filter_map(|s| s.lock().clone())
            .filter(PeerConnection::is_alive)
            .map(|c| c.stats())
            .collect();
        stats.sort_by(|a, b| a.peer.cmp(&b.peer));
        stats
    }

    /// Closes every connection, stops accepting, and waits (at most
    /// [`SHUTDOWN_GRACE`]) for peers to acknowledge.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        inner.shut_down.store(true, Ordering::Release);
        inner
            .incoming_tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        inner
            .endpoint
            .close(VarInt::from_u32(CLOSE_SHUTDOWN), b"shutdown");
        if tokio::time::timeout(SHUTDOWN_GRACE, inner.endpoint.wait_idle())
            .await
            .is_err()
        {
            tracing::debug!("shutdown grace expired with connections still draining");
        }
    }
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("local", &self.inner.endpoint.local_addr().ok())
            .field("fingerprint", &self.inner.identity.fingerprint())
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn pin(&self, peer: &str) -> Result<Fingerprint, TransportError> {
        self.peers
            .get(peer)
            .ok_or_else(|| TransportError::UnknownPeer {
                peer: peer.to_owned(),
            })
    }

    fn lock_slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<PeerSlot>>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn slot(&self, peer: &str) -> Arc<PeerSlot> {
        self.lock_slots()
            .entry(peer.to_owned())
            .or_default()
            .clone()
    }

    fn incoming_sender(&self) -> Option<mpsc::Sender<IncomingStream>> {
        self.incoming_tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    async fn dial(
        &self,
        peer: &str,
        addr: SocketAddr,
        pin: Fingerprint,
    ) -> Result<PeerConnection, TransportError> {
        let client_tls = tls::client_config(&self.identity, peer, pin)?;
        let client_crypto = QuicClientConfig::try_from(client_tls)
            .map_err(|e| TransportError::QuicCrypto(Box::new(e)))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
        client.transport_config(self.quic.clone());
        let connecting = self
            .endpoint
            .connect_with(client, addr, SERVER_NAME)
            .map_err(|source| TransportError::Connect {
                peer: peer.to_owned(),
                addr,
                source,
            })?;
        let conn = connecting.await.map_err(|e| classify(peer, e))?;

        let admission = async {
            let mut recv = conn.accept_uni().await.map_err(|e| classify(peer, e))?;
            let mut byte = [0u8; 1];
            match recv.read_exact(&mut byte).await {
                Ok(()) if byte[0] == ADMISSION_BYTE => Ok(()),
                Err(quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(e))) => {
                    Err(classify(peer, e))
                }
                _ => Err(TransportError::BadAdmission {
                    peer: peer.to_owned(),
                }),
            }
        };
        match tokio::time::timeout(self.admission_timeout, admission).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                conn.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"admission timeout");
                return Err(TransportError::AdmissionTimeout {
                    peer: peer.to_owned(),
                    timeout: self.admission_timeout,
                });
            }
        }
        tracing::info!(%peer, %addr, rtt = ?conn.rtt(), "connected to peer");
        Ok(PeerConnection {
            peer: peer.into(),
            fingerprint: pin,
            conn,
        })
    }

    async fn handle_incoming(self: Arc<Self>, incoming: quinn::Incoming) {
        let remote = incoming.remote_address();
        let conn = match incoming.await {
            Ok(conn) => conn,
            Err(e) => {
                // Unpinned certificates were already logged by the verifier.
                tracing::debug!(%remote, cause = %e, "incoming handshake failed");
                return;
            }
        };
        let Some(fingerprint) = peer_fingerprint(&conn) else {
            // Unreachable with our verifier (it requires a certificate).
            conn.close(VarInt::from_u32(CLOSE_UNKNOWN_PEER), b"no certificate");
            return;
        };
        // The verifier accepted this fingerprint moments ago, but the peer set
        // may have changed since; look the name up again.
        let Some(peer) = self.peers.name_of(&fingerprint) else {
            tracing::warn!(%remote, %fingerprint, "peer removed during handshake; closing");
            conn.close(VarInt::from_u32(CLOSE_UNKNOWN_PEER), b"unknown peer");
            return;
        };
        if let Err(e) = send_admission(&conn, &peer).await {
            tracing::debug!(%peer, %remote, cause = %e, "sending admission failed");
            return;
        }
        tracing::info!(%peer, %remote, "accepted connection from peer");
        let pc = PeerConnection {
            peer: peer.as_str().into(),
            fingerprint,
            conn,
        };
        self.spawn_stream_acceptor(pc.clone());
        self.slot(&peer).register(pc);
    }

    fn spawn_stream_acceptor(self: &Arc<Self>, conn: PeerConnection) {
        let Some(tx) = self.incoming_sender() else {
            conn.conn
                .close(VarInt::from_u32(CLOSE_SHUTDOWN), b"shutdown");
            return;
        };
        let span = tracing::debug_span!("peer", peer = %conn.peer, id = conn.conn.stable_id());
        tokio::spawn(read_datagrams(Arc::downgrade(self), conn.clone()).instrument(span.clone()));
        tokio::spawn(accept_streams(Arc::downgrade(self), conn, tx).instrument(span));
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Ends the accept loop and every connection when the last Transport
        // clone goes away without an explicit shutdown.
        self.endpoint
            .close(VarInt::from_u32(CLOSE_SHUTDOWN), b"dropped");
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, inner: Weak<Inner>) {
    while let Some(incoming) = endpoint.accept().await {
        let Some(inner) = inner.upgrade() else { break };
        tokio::spawn(inner.handle_incoming(incoming));
    }
    tracing::debug!("accept loop finished");
}

async fn accept_streams(
    inner: Weak<Inner>,
    conn: PeerConnection,
    tx: mpsc::Sender<IncomingStream>,
) {
    let reason = loop {
        match conn.conn.accept_bi().await {
            Ok((send, recv)) => {
                tokio::spawn(read_header(conn.peer.clone(), send, recv, tx.clone()));
            }
            Err(e) => break e,
        }
    };
    tracing::debug!(cause = %reason, "connection closed");
    if let Some(inner) = inner.upgrade() {
        inner.slot(&conn.peer).unregister(&conn);
    }
}

async fn read_datagrams(inner: Weak<Inner>, conn: PeerConnection) {
    while let Ok(d) = conn.conn.read_datagram().await {
        let Some(inner) = inner.upgrade() else { break };
        let handler = inner
            .datagrams
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(h) = handler {
            h(&conn.peer, d);
        }
    }
}

async fn read_header(
    peer: Arc<str>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    tx: mpsc::Sender<IncomingStream>,
) {
    let mut header = [0u8; 1];
    let purpose = match tokio::time::timeout(HEADER_TIMEOUT, recv.read_exact(&mut header)).await {
        Ok(Ok(())) => StreamPurpose::from_byte(header[0]).map_err(|e| {
            tracing::warn!(cause = %e, "resetting stream with unknown purpose");
            STREAM_ERROR_UNKNOWN_PURPOSE
        }),
        Ok(Err(e)) => {
            tracing::debug!(cause = %e, "stream ended before its header");
            Err(STREAM_ERROR_NO_HEADER)
        }
        Err(_) => {
            tracing::warn!("resetting stream whose header did not arrive in time");
            Err(STREAM_ERROR_NO_HEADER)
        }
    };
    match purpose {
        Ok(purpose) => {
            let stream = IncomingStream {
                peer: peer.to_string(),
                purpose,
                send,
                recv,
            };
            // Fails only when the application dropped IncomingStreams; the
            // streams are then dropped, which stops/finishes them.
            let _ = tx.send(stream).await;
        }
        Err(code) => {
            let code = VarInt::from_u32(code);
            // Errors mean the stream is already closed, which is the goal.
            let _ = recv.stop(code);
            let _ = send.reset(code);
        }
    }
}

async fn send_admission(conn: &quinn::Connection, peer: &str) -> Result<(), TransportError> {
    let peer = || peer.to_owned();
    let mut send = conn
        .open_uni()
        .await
        .map_err(|source| TransportError::Connection {
            peer: peer(),
            source,
        })?;
    send.write_all(&[ADMISSION_BYTE])
        .await
        .map_err(|source| TransportError::OpenStream {
            peer: peer(),
            purpose: StreamPurpose::Control,
            source,
        })?;
    // Only fails if already finished/reset; the byte is queued either way.
    let _ = send.finish();
    Ok(())
}

fn peer_fingerprint(conn: &quinn::Connection) -> Option<Fingerprint> {
    let identity = conn.peer_identity()?;
    let certs = identity
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .ok()?;
    certs.first().map(|c| Fingerprint::of_der(c))
}

/// Turns quinn's connection error into ours, telling authentication failures
/// (TLS alerts, which QUIC carries as CRYPTO_ERROR 0x100..=0x1ff, or our
/// unknown-peer close) apart from network failures.
fn classify(peer: &str, source: ConnectionError) -> TransportError {
    let is_crypto = |code: quinn::TransportErrorCode| (0x100..0x200).contains(&u64::from(code));
    let refused = match &source {
        ConnectionError::TransportError(e) => is_crypto(e.code),
        ConnectionError::ConnectionClosed(c) => is_crypto(c.error_code),
        ConnectionError::ApplicationClosed(a) => {
            a.error_code == VarInt::from_u32(CLOSE_UNKNOWN_PEER)
        }
        _ => false,
    };
    let peer = peer.to_owned();
    if refused {
        TransportError::Refused { peer, source }
    } else {
        TransportError::Connection { peer, source }
    }
}

/// Binds a UDP socket with large kernel buffers. Linux caps the request at
/// net.core.{r,w}mem_max (and reports twice the granted value); we log what
/// we got instead of failing, since small buffers only cost throughput.
fn bind_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if let Err(e) = socket.set_recv_buffer_size(UDP_SOCKET_BUFFER_BYTES) {
        tracing::warn!(cause = %e, "setting SO_RCVBUF failed");
    }
    if let Err(e) = socket.set_send_buffer_size(UDP_SOCKET_BUFFER_BYTES) {
        tracing::warn!(cause = %e, "setting SO_SNDBUF failed");
    }
    let rcv = socket.recv_buffer_size().unwrap_or(0);
    let snd = socket.send_buffer_size().unwrap_or(0);
    if rcv < UDP_SOCKET_BUFFER_BYTES || snd < UDP_SOCKET_BUFFER_BYTES {
        tracing::warn!(
            requested = UDP_SOCKET_BUFFER_BYTES,
            rcvbuf = rcv,
            sndbuf = snd,
            "kernel capped UDP socket buffers; raise net.core.rmem_max/wmem_max for fat pipes"
        );
    } else {
        tracing::debug!(rcvbuf = rcv, sndbuf = snd, "UDP socket buffers");
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crypto_close_is_classified_as_refusal() {
        let close = quinn::ConnectionClose {
            error_code: quinn::TransportErrorCode::crypto(49),
            frame_type: None,
            reason: bytes::Bytes::new(),
        };
        assert!(matches!(
            classify("p", ConnectionError::ConnectionClosed(close)),
            TransportError::Refused { .. }
        ));
        assert!(matches!(
            classify("p", ConnectionError::TimedOut),
            TransportError::Connection { .. }
        ));
    }

    #[test]
    fn socket_buffers_are_enlarged_or_logged() {
        let s = bind_socket("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let s = socket2::SockRef::from(&s);
        // Linux doubles the value; whatever the cap, it is above the ~200 KiB default.
        assert!(s.recv_buffer_size().expect("rcvbuf") > 256 * 1024);
    }
}
