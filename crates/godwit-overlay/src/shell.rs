//! The tokio shell around [`Switch`]: QEMU stream ports, the overlay
//! transport, the command channel and the timer.
//!
//! This module owns every socket and task of the overlay; the switch itself
//! stays sans-IO. One driver task ([`OverlaySwitch`]) owns the [`Switch`]
//! and is the only place that calls it, so no lock is involved:
//!
//! ```mermaid
//! flowchart LR
//!     A1[port 1 tasks] -- unix stream --> Q1[QEMU 1]
//!     A2[port 2 tasks] -- unix stream --> Q2[QEMU 2]
//!     A1 -- Input --> D[driver: Switch]
//!     A2 -- Input --> D
//!     R[VxlanReceiver / QUIC] -- RemoteSink --> D
//!     H[OverlayHandle] -- Command --> D
//!     D -- Deliver --> A1
//!     D -- SendRemote --> T[RemoteTransport]
//!     D -- OverlayEvent --> E[agent: control plane]
//! ```
//!
//! # Ports
//!
//! A guest NIC is a QEMU 7.2 `-netdev stream,server=on,addr.type=unix`
//! server (see `godwit-qemu`'s `args.rs`): QEMU listens on its instance's
//! socket and the port connects to it, retrying until QEMU listens and
//! again whenever the connection ends (QEMU listens again then). QEMU is
//! the server because a 7.2 client never reconnects: with the roles the
//! other way round, restarting the agent would cut every guest off for
//! good (reference network-continuity §1.1). Each connection carries
//! [`crate::stream`] records both ways. [`OverlayHandle::retarget_port`]
//! points a port at another QEMU (a same-host handover): the old connection
//! is closed and frames go to the new one once it is up.
//!
//! # Remotes
//!
//! A [`RemoteTransport`] sends frames to peer sites; frames from peers come
//! back through a [`RemoteSink`]. [`VxlanTransport`] is the plain RFC 7348
//! transport that interoperates with a Linux `vxlan` device; the encrypted
//! QUIC-datagram transport implements the same trait in the agent.
//!
//! # Back-pressure
//!
//! A port reader waits when the driver is behind, which stops reading from
//! QEMU, which makes QEMU queue in the guest NIC: the same back-pressure a
//! TAP device gives. Everything towards a guest or a peer is datagram-like
//! and is dropped (and counted) when its queue is full, because a stalled
//! guest (paused for the switchover, reference §1.4) must not stall the
//! switch for everyone else.

use crate::frame::MacAddr;
use crate::registry::{HostId, RegistryUpdate};
use crate::stream::{StreamCodec, StreamDecoder};
use crate::switch::{
    Action, Delivery, GatewayConfig, PortConfig, PortId, PortState, Switch, SwitchError,
    SwitchStatus,
};
use crate::vxlan::{self, Vni};
use bytes::{Bytes, BytesMut};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, info, trace, warn};

/// Frames queued towards one QEMU connection. QEMU stops reading while its
/// VM is paused (reference §1.4); past this many frames the rest are
/// dropped rather than delivered stale at resume.
pub const PORT_TX_QUEUE: usize = 256;
/// Frames from ports and peers waiting for the driver. Port readers wait
/// when it is full (back-pressure to QEMU); peers' frames are dropped.
pub const INPUT_QUEUE: usize = 1024;
/// Commands waiting for the driver; callers wait when it is full.
pub const COMMAND_QUEUE: usize = 64;
/// Routed frames waiting for the router; more are dropped.
pub const ROUTE_QUEUE: usize = 256;
/// Bytes read from a QEMU connection at a time: one maximal stream record
/// fits, so a big frame needs few reads.
pub const PORT_READ_BUF: usize = 64 * 1024;
/// Pause between attempts to connect to a port's QEMU while it is not
/// listening yet (starting) or not again (just disconnected): short, since
/// QEMU drops what its guest sends until a peer is connected.
pub const DIAL_RETRY: Duration = Duration::from_millis(5);
/// After this many failed attempts in a row the port retries at
/// [`DIAL_RETRY_SLOW`]: its QEMU is probably gone for good.
pub const DIAL_FAST_ATTEMPTS: u32 = 400;
/// Pause between attempts once [`DIAL_FAST_ATTEMPTS`] have failed.
pub const DIAL_RETRY_SLOW: Duration = Duration::from_millis(250);
/// Largest UDP payload received: the IPv4 maximum, so no VXLAN datagram is
/// ever truncated.
pub const MAX_DATAGRAM: usize = 65_535;
/// Send sockets used by default to spread flows over source ports (see
/// [`VxlanConfig::source_sockets`]).
pub const DEFAULT_SOURCE_SOCKETS: usize = 4;
/// Upper bound on [`VxlanConfig::source_sockets`]: each is a file
/// descriptor, and a few already give ECMP most of its spread.
pub const MAX_SOURCE_SOCKETS: usize = 64;

/// Errors of the overlay shell.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// The switch refused a switchover or port operation.
    #[error("overlay switch refused the request")]
    Switch(#[from] SwitchError),
    /// A command named a port the shell does not have.
    #[error("no port {0}")]
    NoPort(PortId),
    /// The overlay UDP socket could not be set up.
    #[error("cannot set up the VXLAN socket on {addr}")]
    Udp {
        /// Local address.
        addr: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The gateway router's device could not be set up.
    #[error("gateway router {device}: {what}")]
    Router {
        /// The TAP device.
        device: String,
        /// The step that failed.
        what: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Too many source sockets were asked for.
    #[error("{0} VXLAN source sockets requested, at most {MAX_SOURCE_SOCKETS} allowed")]
    TooManySourceSockets(usize),
    /// The driver's input queue is full; the frame was dropped.
    #[error("overlay switch input queue is full")]
    Backlogged,
    /// The driver task has stopped.
    #[error("overlay switch has stopped")]
    Stopped,
}

/// Sends frames to peer sites. Implementations must not block: a frame
/// that cannot go out now is dropped and counted, as a NIC would.
///
/// `delivery` and `ack` belong in the overlay header of transports that
/// have one (the QUIC datagram transport); see [`crate::dedup`].
pub trait RemoteTransport: Send + Sync + 'static {
    /// Sends `frame` on network `vni` to `site`.
    fn send(&self, site: &HostId, vni: Vni, delivery: Delivery, ack: u64, frame: Bytes);
}

/// What the driver reports to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OverlayEvent {
    /// Send this registry update to every peer's control channel, in order.
    Push(RegistryUpdate),
    /// The full sync after [`OverlayHandle::reset_peer`]: send these to
    /// `site` only, on its new control channel, before any later
    /// [`OverlayEvent::Push`]. Pushes reported before this event predate
    /// the reset and must not go to the new channel (the switch counts
    /// updates per channel, see [`crate::dedup`]).
    Sync {
        /// The peer whose channel was replaced.
        site: HostId,
        /// Every location held here.
        updates: Vec<RegistryUpdate>,
    },
    /// A peer took the port's MAC over and the port was fenced.
    PortFenced {
        /// Port.
        port: PortId,
        /// New owner.
        to: HostId,
    },
    /// QEMU's post-migration RARP arrived on a pending port: the agent may
    /// claim now.
    RarpSeen {
        /// Port.
        port: PortId,
        /// MAC.
        mac: MacAddr,
    },
    /// A QEMU connected to the port (link up; the destination must see this
    /// before the migration completes, reference §1.1).
    PortConnected {
        /// Port.
        port: PortId,
    },
    /// The port's QEMU connection ended.
    PortDisconnected {
        /// Port.
        port: PortId,
    },
}

/// A frame the switch hands to the router (addressed to the gateway MAC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutedFrame {
    /// Network.
    pub vni: Vni,
    /// Frame.
    pub frame: Bytes,
}

/// Counters of the shell (the switch keeps its own).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ShellStats {
    /// QEMU connections accepted.
    pub connections: u64,
    /// Ports pointed at another QEMU ([`OverlayHandle::retarget_port`]).
    pub retargets: u64,
    /// Frames for a port with no QEMU connected.
    pub tx_not_connected: u64,
    /// Frames dropped because a port's queue was full.
    pub tx_queue_full: u64,
    /// Stream errors (bad record length, truncated record) on connections.
    pub stream_errors: u64,
    /// Routed frames dropped (router absent or behind).
    pub route_dropped: u64,
}

/// Status of the overlay: the switch's and the shell's.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OverlayStatus {
    /// The switch.
    pub switch: SwitchStatus,
    /// The shell.
    pub shell: ShellStats,
    /// Ports with a QEMU connected.
    pub connected: Vec<PortId>,
}

/// The receiving ends of what the driver reports.
#[derive(Debug)]
pub struct OverlayOutputs {
    /// Control-plane events, in order. Unbounded because losing a
    /// [`OverlayEvent::Push`] would leave peers with a stale registry; they
    /// are rare (one per location change).
    pub events: mpsc::UnboundedReceiver<OverlayEvent>,
    /// Frames for the router (bounded; dropped when full).
    pub routed: mpsc::Receiver<RoutedFrame>,
    /// The driver task; it ends after [`OverlayHandle::shutdown`] or when
    /// every handle is dropped.
    pub task: JoinHandle<()>,
}

enum Command {
    AddStreamPort {
        port: PortId,
        cfg: PortConfig,
        state: PortState,
        path: PathBuf,
        reply: oneshot::Sender<Result<(), OverlayError>>,
    },
    RemovePort(PortId, oneshot::Sender<Result<(), OverlayError>>),
    RetargetPort(PortId, PathBuf, oneshot::Sender<Result<(), OverlayError>>),
    AddRemote(Vni, HostId),
    RemoveRemote(Vni, HostId),
    SetGateway(Vni, Option<GatewayConfig>),
    SetArpSuppression(bool),
    Fence(PortId, oneshot::Sender<Result<(), OverlayError>>),
    Claim(
        PortId,
        Vec<IpAddr>,
        oneshot::Sender<Result<(), OverlayError>>,
    ),
    Open(PortId, oneshot::Sender<Result<(), OverlayError>>),
    ApplyUpdate(HostId, RegistryUpdate),
    ResetPeer(HostId),
    Status(oneshot::Sender<OverlayStatus>),
    Shutdown(oneshot::Sender<()>),
}

enum Input {
    Local {
        port: PortId,
        frame: Bytes,
    },
    Remote {
        from: HostId,
        vni: Vni,
        delivery: Delivery,
        ack: u64,
        frame: Bytes,
    },
    Routed {
        vni: Vni,
        frame: Bytes,
    },
    Connected {
        port: PortId,
        conn: u64,
        tx: mpsc::Sender<Bytes>,
    },
    Disconnected {
        port: PortId,
        conn: u64,
        stream_error: bool,
    },
}

/// Cheap, cloneable control handle of a running [`OverlaySwitch`].
#[derive(Debug, Clone)]
pub struct OverlayHandle {
    cmd: mpsc::Sender<Command>,
    input: mpsc::Sender<Input>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Input")
    }
}

impl OverlayHandle {
    /// Attaches a guest port whose QEMU listens as a `-netdev stream` server
    /// at `path`; the port connects (and reconnects) to it. `state` is
    /// `Pending` on a migration destination, `Open` for a VM that boots
    /// here.
    pub async fn add_stream_port(
        &self,
        port: PortId,
        cfg: PortConfig,
        state: PortState,
        path: impl Into<PathBuf>,
    ) -> Result<(), OverlayError> {
        let path = path.into();
        self.ask(|reply| Command::AddStreamPort {
            port,
            cfg,
            state,
            path,
            reply,
        })
        .await?
    }

    /// Detaches a port: closes its connection and withdraws its locations.
    pub async fn remove_port(&self, port: PortId) -> Result<(), OverlayError> {
        self.ask(|r| Command::RemovePort(port, r)).await?
    }

    /// Points `port` at the QEMU listening at `path` (a same-host handover
    /// to a new QEMU): the current connection closes now, and frames for
    /// the port are dropped until the new one is up.
    pub async fn retarget_port(
        &self,
        port: PortId,
        path: impl Into<PathBuf>,
    ) -> Result<(), OverlayError> {
        let path = path.into();
        self.ask(|r| Command::RetargetPort(port, path, r)).await?
    }

    /// Joins peer `site` to network `vni`.
    pub async fn add_remote(&self, vni: Vni, site: HostId) -> Result<(), OverlayError> {
        self.tell(Command::AddRemote(vni, site)).await
    }

    /// Removes peer `site` from network `vni`.
    pub async fn remove_remote(&self, vni: Vni, site: HostId) -> Result<(), OverlayError> {
        self.tell(Command::RemoveRemote(vni, site)).await
    }

    /// Sets or removes the distributed gateway of `vni`.
    pub async fn set_gateway(
        &self,
        vni: Vni,
        gw: Option<GatewayConfig>,
    ) -> Result<(), OverlayError> {
        self.tell(Command::SetGateway(vni, gw)).await
    }

    /// Turns ARP suppression on or off.
    pub async fn set_arp_suppression(&self, on: bool) -> Result<(), OverlayError> {
        self.tell(Command::SetArpSuppression(on)).await
    }

    /// [`Switch::fence`]: the source's QEMU stopped for the switchover.
    pub async fn fence(&self, port: PortId) -> Result<(), OverlayError> {
        self.ask(|r| Command::Fence(port, r)).await?
    }

    /// [`Switch::claim`]: the destination takes the port's MAC; the update
    /// comes out as [`OverlayEvent::Push`].
    pub async fn claim(&self, port: PortId, ips: Vec<IpAddr>) -> Result<(), OverlayError> {
        self.ask(|r| Command::Claim(port, ips, r)).await?
    }

    /// [`Switch::open`]: the VM resumed here.
    pub async fn open(&self, port: PortId) -> Result<(), OverlayError> {
        self.ask(|r| Command::Open(port, r)).await?
    }

    /// Applies a registry update that peer `from` sent on its control
    /// channel (in order, once per connection; see
    /// [`Switch::handle_update`]).
    pub async fn apply_update(
        &self,
        from: HostId,
        update: RegistryUpdate,
    ) -> Result<(), OverlayError> {
        self.tell(Command::ApplyUpdate(from, update)).await
    }

    /// The control connection to `site` was replaced ([`Switch::reset_peer`]);
    /// the full sync comes out as one [`OverlayEvent::Sync`] event.
    pub async fn reset_peer(&self, site: HostId) -> Result<(), OverlayError> {
        self.tell(Command::ResetPeer(site)).await
    }

    /// A snapshot of the switch and shell state.
    pub async fn status(&self) -> Result<OverlayStatus, OverlayError> {
        self.ask(Command::Status).await
    }

    /// Stops the driver: ports are closed and their paths removed.
    pub async fn shutdown(&self) -> Result<(), OverlayError> {
        self.ask(Command::Shutdown).await
    }

    /// The entry point for frames from peer sites, for a transport's
    /// receive loop.
    pub fn remote_sink(&self) -> RemoteSink {
        RemoteSink {
            input: self.input.clone(),
        }
    }

    /// The entry point for frames from the router (the host side of the
    /// distributed gateway).
    pub fn route_sink(&self) -> RouteSink {
        RouteSink {
            input: self.input.clone(),
        }
    }

    async fn tell(&self, c: Command) -> Result<(), OverlayError> {
        self.cmd.send(c).await.map_err(|_| OverlayError::Stopped)
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, OverlayError> {
        let (tx, rx) = oneshot::channel();
        self.tell(make(tx)).await?;
        rx.await.map_err(|_| OverlayError::Stopped)
    }
}

/// Where a transport's receive loop puts frames from peers.
#[derive(Debug, Clone)]
pub struct RemoteSink {
    input: mpsc::Sender<Input>,
}

impl RemoteSink {
    /// Queues a frame that `from` sent on `vni` with the overlay header's
    /// `delivery` and `ack` (a peer without them, e.g. a kernel VXLAN
    /// device, passes [`Delivery::Flood`] and `u64::MAX`). Never waits:
    /// [`OverlayError::Backlogged`] means the frame was dropped.
    pub fn deliver(
        &self,
        from: HostId,
        vni: Vni,
        delivery: Delivery,
        ack: u64,
        frame: Bytes,
    ) -> Result<(), OverlayError> {
        try_input(
            &self.input,
            Input::Remote {
                from,
                vni,
                delivery,
                ack,
                frame,
            },
        )
    }
}

/// Where the router puts frames it sends into a network (from the gateway
/// MAC to guests, and its neighbour requests).
#[derive(Debug, Clone)]
pub struct RouteSink {
    input: mpsc::Sender<Input>,
}

impl RouteSink {
    /// Queues a frame the router sends into `vni`. Never waits:
    /// [`OverlayError::Backlogged`] means the frame was dropped.
    pub fn route_in(&self, vni: Vni, frame: Bytes) -> Result<(), OverlayError> {
        try_input(&self.input, Input::Routed { vni, frame })
    }
}

/// Queues a datagram-like input without waiting.
fn try_input(input: &mpsc::Sender<Input>, i: Input) -> Result<(), OverlayError> {
    input.try_send(i).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => OverlayError::Backlogged,
        mpsc::error::TrySendError::Closed(_) => OverlayError::Stopped,
    })
}

/// Aborts the task when dropped, so a port's tasks never outlive it.
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Debug)]
struct PortIo {
    /// The [`dial_loop`] task; the connection's tasks end with it.
    _dialer: AbortOnDrop,
    conn: Option<(u64, mpsc::Sender<Bytes>)>,
}

/// The driver task that owns the [`Switch`] and performs its actions.
pub struct OverlaySwitch {
    switch: Switch,
    transport: Arc<dyn RemoteTransport>,
    cmd_rx: mpsc::Receiver<Command>,
    input_rx: mpsc::Receiver<Input>,
    input_tx: mpsc::Sender<Input>,
    events: mpsc::UnboundedSender<OverlayEvent>,
    routed: mpsc::Sender<RoutedFrame>,
    ports: BTreeMap<PortId, PortIo>,
    stats: ShellStats,
}

impl OverlaySwitch {
    /// Starts the driver for host `host` on the current tokio runtime,
    /// sending to peers through `transport`.
    pub fn spawn(
        host: HostId,
        transport: Arc<dyn RemoteTransport>,
    ) -> (OverlayHandle, OverlayOutputs) {
        let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
        let (input_tx, input_rx) = mpsc::channel(INPUT_QUEUE);
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let (route_tx, route_rx) = mpsc::channel(ROUTE_QUEUE);
        let driver = OverlaySwitch {
            switch: Switch::new(host),
            transport,
            cmd_rx,
            input_rx,
            input_tx: input_tx.clone(),
            events: ev_tx,
            routed: route_tx,
            ports: BTreeMap::new(),
            stats: ShellStats::default(),
        };
        let task = tokio::spawn(driver.run());
        (
            OverlayHandle {
                cmd: cmd_tx,
                input: input_tx,
            },
            OverlayOutputs {
                events: ev_rx,
                routed: route_rx,
                task,
            },
        )
    }

    async fn run(mut self) {
        info!(host = %self.switch.registry().local_host(), "overlay switch started");
        loop {
            let deadline = self
                .switch
                .poll_timeout()
                .map(tokio::time::Instant::from_std);
            let timer = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // Commands first: a fence or claim must not wait behind a
                // queue of data frames.
                biased;
                cmd = self.cmd_rx.recv() => match cmd {
                    Some(Command::Shutdown(reply)) => {
                        self.close_all();
                        let _ = reply.send(());
                        break;
                    }
                    Some(c) => self.handle_command(c),
                    None => {
                        self.close_all();
                        break;
                    }
                },
                // The driver holds a sender itself, so this never yields None.
                Some(input) = self.input_rx.recv() => self.handle_input(input),
                () = timer => {
                    let actions = self.switch.handle_timeout(now());
                    self.execute(actions);
                }
            }
        }
        info!(host = %self.switch.registry().local_host(), "overlay switch stopped");
    }

    fn handle_command(&mut self, c: Command) {
        match c {
            Command::AddStreamPort {
                port,
                cfg,
                state,
                path,
                reply,
            } => {
                let _ = reply.send(self.add_stream_port(port, cfg, state, path));
            }
            Command::RemovePort(port, reply) => {
                let r = self.switch.remove_port(port).map_err(OverlayError::from);
                if let Ok(actions) = &r {
                    self.execute(actions.clone());
                }
                self.ports.remove(&port);
                let _ = reply.send(r.map(|_| ()));
            }
            Command::RetargetPort(port, path, reply) => {
                let r = match self.ports.get_mut(&port) {
                    Some(io) => {
                        info!(%port, path = %path.display(), "port follows its VM to another QEMU");
                        self.stats.retargets += 1;
                        if io.conn.take().is_some() {
                            let _ = self.events.send(OverlayEvent::PortDisconnected { port });
                        }
                        io._dialer =
                            AbortOnDrop(tokio::spawn(dial_loop(port, path, self.input_tx.clone())));
                        Ok(())
                    }
                    None => Err(OverlayError::NoPort(port)),
                };
                let _ = reply.send(r);
            }
            Command::AddRemote(vni, site) => self.switch.add_remote(vni, site),
            Command::RemoveRemote(vni, site) => self.switch.remove_remote(vni, &site),
            Command::SetGateway(vni, gw) => self.switch.set_gateway(vni, gw),
            Command::SetArpSuppression(on) => self.switch.set_arp_suppression(on),
            Command::Fence(port, reply) => {
                let _ = reply.send(self.switch.fence(port).map_err(Into::into));
            }
            Command::Claim(port, ips, reply) => {
                let r = self.switch.claim(now(), port, &ips);
                let _ = reply.send(self.finish(r));
            }
            Command::Open(port, reply) => {
                let r = self.switch.open(now(), port);
                let _ = reply.send(self.finish(r));
            }
            Command::ApplyUpdate(from, update) => {
                let actions = self.switch.handle_update(now(), &from, &update);
                self.execute(actions);
            }
            Command::ResetPeer(site) => {
                let updates = self
                    .switch
                    .reset_peer(&site)
                    .into_iter()
                    .filter_map(|a| match a {
                        Action::Push(u) => Some(u),
                        // reset_peer only returns pushes; anything else
                        // would be a new kind of action to perform.
                        other => {
                            self.execute(vec![other]);
                            None
                        }
                    })
                    .collect();
                let _ = self.events.send(OverlayEvent::Sync { site, updates });
            }
            Command::Status(reply) => {
                let _ = reply.send(OverlayStatus {
                    switch: self.switch.status(now()),
                    shell: self.stats.clone(),
                    connected: self
                        .ports
                        .iter()
                        .filter(|(_, io)| io.conn.is_some())
                        .map(|(id, _)| *id)
                        .collect(),
                });
            }
            Command::Shutdown(_) => {} // handled in run()
        }
    }

    fn finish(&mut self, r: Result<Vec<Action>, SwitchError>) -> Result<(), OverlayError> {
        let actions = r?;
        self.execute(actions);
        Ok(())
    }

    fn add_stream_port(
        &mut self,
        port: PortId,
        cfg: PortConfig,
        state: PortState,
        path: PathBuf,
    ) -> Result<(), OverlayError> {
        if self.ports.contains_key(&port) {
            return Err(SwitchError::DuplicatePort(port).into());
        }
        self.switch.add_port(port, cfg, state)?;
        info!(%port, mac = %cfg.mac, vni = %cfg.vni, ?state, path = %path.display(), "stream port added");
        let dialer = tokio::spawn(dial_loop(port, path, self.input_tx.clone()));
        self.ports.insert(
            port,
            PortIo {
                _dialer: AbortOnDrop(dialer),
                conn: None,
            },
        );
        Ok(())
    }

    fn handle_input(&mut self, input: Input) {
        match input {
            Input::Local { port, frame } => {
                let actions = self.switch.handle_local_frame(now(), port, frame);
                self.execute(actions);
            }
            Input::Remote {
                from,
                vni,
                delivery,
                ack,
                frame,
            } => {
                let actions = self
                    .switch
                    .handle_remote_frame(&from, vni, delivery, ack, frame);
                self.execute(actions);
            }
            Input::Routed { vni, frame } => {
                let actions = self.switch.handle_route_in(vni, frame);
                self.execute(actions);
            }
            Input::Connected { port, conn, tx } => {
                let Some(io) = self.ports.get_mut(&port) else {
                    return;
                };
                self.stats.connections += 1;
                io.conn = Some((conn, tx));
                let _ = self.events.send(OverlayEvent::PortConnected { port });
            }
            Input::Disconnected {
                port,
                conn,
                stream_error,
            } => {
                if stream_error {
                    self.stats.stream_errors += 1;
                }
                let Some(io) = self.ports.get_mut(&port) else {
                    return;
                };
                // A replaced connection's end is not the port's.
                if io.conn.as_ref().is_some_and(|(c, _)| *c == conn) {
                    io.conn = None;
                    let _ = self.events.send(OverlayEvent::PortDisconnected { port });
                }
            }
        }
    }

    fn execute(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Deliver { port, frame } => self.deliver(port, frame),
                Action::SendRemote {
                    site,
                    vni,
                    delivery,
                    ack,
                    frame,
                } => self.transport.send(&site, vni, delivery, ack, frame),
                Action::RouteOut { vni, frame } => {
                    if self.routed.try_send(RoutedFrame { vni, frame }).is_err() {
                        self.stats.route_dropped += 1;
                    }
                }
                Action::Push(u) => {
                    let _ = self.events.send(OverlayEvent::Push(u));
                }
                Action::PortFenced { port, to } => {
                    let _ = self.events.send(OverlayEvent::PortFenced { port, to });
                }
                Action::RarpSeen { port, mac } => {
                    let _ = self.events.send(OverlayEvent::RarpSeen { port, mac });
                }
                Action::Drop { reason } => trace!(reason = reason.as_str(), "frame dropped"),
            }
        }
    }

    fn deliver(&mut self, port: PortId, frame: Bytes) {
        let Some((_, tx)) = self.ports.get(&port).and_then(|io| io.conn.as_ref()) else {
            self.stats.tx_not_connected += 1;
            return;
        };
        match tx.try_send(frame) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.stats.tx_queue_full += 1,
            // The writer ended (write error); the reader reports the end.
            Err(mpsc::error::TrySendError::Closed(_)) => self.stats.tx_not_connected += 1,
        }
    }

    fn close_all(&mut self) {
        self.ports.clear();
    }
}

fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// Connection ids, unique over the shell's life, so a connection's end is
/// never taken for its successor's.
static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// Keeps one port connected to the QEMU listening at `path`: connects,
/// runs the connection until it ends, and connects again (QEMU listens
/// again after its peer goes away). Ends when aborted (port removed or
/// retargeted) or when the driver is gone.
async fn dial_loop(port: PortId, path: PathBuf, input: mpsc::Sender<Input>) {
    let mut failures = 0u32;
    loop {
        let stream = match UnixStream::connect(&path).await {
            Ok(s) => s,
            Err(e) => {
                failures = failures.saturating_add(1);
                if failures == DIAL_FAST_ATTEMPTS {
                    warn!(%port, path = %path.display(), cause = %e, "QEMU does not listen on the port's socket; still trying");
                }
                let pause = if failures < DIAL_FAST_ATTEMPTS {
                    DIAL_RETRY
                } else {
                    DIAL_RETRY_SLOW
                };
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        failures = 0;
        let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
        info!(%port, conn, "connected to QEMU");
        let (rd, wr) = stream.into_split();
        let (tx, rx) = mpsc::channel(PORT_TX_QUEUE);
        // Announced before the reader starts, so the driver knows where to
        // answer the connection's first frame.
        if input
            .send(Input::Connected { port, conn, tx })
            .await
            .is_err()
        {
            return;
        }
        let _writer = AbortOnDrop(tokio::spawn(write_loop(port, wr, rx)));
        if !read_loop(port, conn, rd, &input).await {
            return;
        }
        tokio::time::sleep(DIAL_RETRY).await;
    }
}

/// Reads one connection until it ends and reports the end; false when the
/// driver is gone.
async fn read_loop(
    port: PortId,
    conn: u64,
    mut rd: OwnedReadHalf,
    input: &mpsc::Sender<Input>,
) -> bool {
    let mut dec = StreamDecoder::new();
    let mut buf = vec![0u8; PORT_READ_BUF];
    let stream_error = loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) => {
                let r = dec.handle_eof();
                if let Err(e) = &r {
                    warn!(%port, conn, cause = %e, "QEMU connection ended mid-record");
                } else {
                    info!(%port, conn, "QEMU disconnected");
                }
                break r.is_err();
            }
            Ok(n) => n,
            Err(e) => {
                warn!(%port, conn, cause = %e, "read from QEMU failed");
                break false;
            }
        };
        // The slice is within `buf`: `read` returned at most its length.
        if let Err(e) = dec.handle_input(&buf[..n]) {
            warn!(%port, conn, cause = %e, "bad stream record from QEMU: closing");
            break true;
        }
        while let Some(frame) = dec.poll_frame() {
            if input.send(Input::Local { port, frame }).await.is_err() {
                return false;
            }
        }
    };
    input
        .send(Input::Disconnected {
            port,
            conn,
            stream_error,
        })
        .await
        .is_ok()
}

async fn write_loop(port: PortId, mut wr: OwnedWriteHalf, mut rx: mpsc::Receiver<Bytes>) {
    let mut out = BytesMut::new();
    while let Some(frame) = rx.recv().await {
        out.clear();
        push_record(port, &frame, &mut out);
        // Batch what is already queued into one write.
        while out.len() < PORT_READ_BUF {
            let Ok(f) = rx.try_recv() else { break };
            push_record(port, &f, &mut out);
        }
        if let Err(e) = wr.write_all(&out).await {
            debug!(%port, cause = %e, "write to QEMU failed");
            return;
        }
    }
}

fn push_record(port: PortId, frame: &[u8], out: &mut BytesMut) {
    if let Err(e) = StreamCodec::encode(frame, out) {
        // Only an empty or oversized frame gets here; QEMU would drop the
        // connection over it, so it goes nowhere.
        debug!(%port, cause = %e, "frame not sent to QEMU");
    }
}

/// Static configuration of a [`VxlanTransport`].
#[derive(Debug, Clone, Default)]
pub struct VxlanConfig {
    /// Peer sites and their VTEP addresses (normally port
    /// [`vxlan::VXLAN_UDP_PORT`]). Datagrams from other IPs are dropped.
    pub peers: BTreeMap<HostId, SocketAddr>,
    /// Extra sockets to send from, each on its own ephemeral source port.
    /// A flow (inner MACs and EtherType, [`vxlan::source_port`]) always
    /// uses the same one, so its packets stay in order on one underlay
    /// path while flows spread over ECMP links (RFC 7348 §5). 0 sends
    /// everything from the receiving socket's port.
    pub source_sockets: usize,
}

impl VxlanConfig {
    /// A configuration with no peers and [`DEFAULT_SOURCE_SOCKETS`].
    pub fn new() -> Self {
        Self {
            peers: BTreeMap::new(),
            source_sockets: DEFAULT_SOURCE_SOCKETS,
        }
    }

    /// Adds peer `site` with its VTEP at `ip`, port
    /// [`vxlan::VXLAN_UDP_PORT`].
    pub fn peer(mut self, site: HostId, ip: IpAddr) -> Self {
        self.peers
            .insert(site, SocketAddr::new(ip, vxlan::VXLAN_UDP_PORT));
        self
    }
}

/// Counters of a VXLAN transport.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct VxlanStats {
    /// Datagrams sent.
    pub sent: u64,
    /// Datagrams not sent: the socket was full or the send failed.
    pub send_errors: u64,
    /// Frames for a site with no configured address.
    pub unknown_site: u64,
    /// Datagrams received.
    pub received: u64,
    /// Datagrams that were not valid VXLAN.
    pub malformed: u64,
    /// Datagrams from an address that is no configured peer.
    pub unknown_peer: u64,
    /// Frames dropped because the switch was behind.
    pub backlogged: u64,
}

#[derive(Debug, Default)]
struct VxlanCounters {
    sent: AtomicU64,
    send_errors: AtomicU64,
    unknown_site: AtomicU64,
    received: AtomicU64,
    malformed: AtomicU64,
    unknown_peer: AtomicU64,
    backlogged: AtomicU64,
}

impl VxlanCounters {
    fn snapshot(&self) -> VxlanStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        VxlanStats {
            sent: g(&self.sent),
            send_errors: g(&self.send_errors),
            unknown_site: g(&self.unknown_site),
            received: g(&self.received),
            malformed: g(&self.malformed),
            unknown_peer: g(&self.unknown_peer),
            backlogged: g(&self.backlogged),
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The plain RFC 7348 overlay: one UDP socket per agent, interoperable with
/// a Linux `vxlan` device (`dstport 4789`, no learning needed).
///
/// VXLAN has no room for [`Delivery`] or the control-plane `ack`, so both
/// are dropped on send and the receiver reports every frame as a kernel
/// peer's (`Flood`, `u64::MAX`): between godwit agents the at-most-once
/// guarantee of [`crate::dedup`] needs the QUIC transport.
#[derive(Debug)]
pub struct VxlanTransport {
    socket: std::net::UdpSocket,
    pool: Vec<std::net::UdpSocket>,
    peers: HashMap<HostId, SocketAddr>,
    counters: Arc<VxlanCounters>,
}

/// The receiving half of a [`VxlanTransport`]: run it with the switch's
/// [`RemoteSink`].
#[derive(Debug)]
pub struct VxlanReceiver {
    socket: std::net::UdpSocket,
    by_ip: HashMap<IpAddr, HostId>,
    counters: Arc<VxlanCounters>,
}

impl VxlanTransport {
    /// Binds the VXLAN socket at `local` (normally port
    /// [`vxlan::VXLAN_UDP_PORT`]). Sockets belong to the network namespace
    /// of the calling thread, so call this on a thread inside the site's
    /// namespace if it has one; no tokio runtime is needed.
    pub fn bind(
        local: SocketAddr,
        cfg: VxlanConfig,
    ) -> Result<(Self, VxlanReceiver), OverlayError> {
        let socket = std::net::UdpSocket::bind(local).map_err(|source| OverlayError::Udp {
            addr: local.to_string(),
            source,
        })?;
        Self::from_socket(socket, cfg)
    }

    /// Wraps an already bound socket. The source sockets are bound on the
    /// same IP from the calling thread (see [`bind`](Self::bind)).
    pub fn from_socket(
        socket: std::net::UdpSocket,
        cfg: VxlanConfig,
    ) -> Result<(Self, VxlanReceiver), OverlayError> {
        if cfg.source_sockets > MAX_SOURCE_SOCKETS {
            return Err(OverlayError::TooManySourceSockets(cfg.source_sockets));
        }
        let local = socket.local_addr().map_err(|source| OverlayError::Udp {
            addr: "?".into(),
            source,
        })?;
        let udp_err = |source| OverlayError::Udp {
            addr: local.to_string(),
            source,
        };
        socket.set_nonblocking(true).map_err(udp_err)?;
        let mut pool = Vec::with_capacity(cfg.source_sockets);
        for _ in 0..cfg.source_sockets {
            let s = std::net::UdpSocket::bind(SocketAddr::new(local.ip(), 0)).map_err(udp_err)?;
            s.set_nonblocking(true).map_err(udp_err)?;
            pool.push(s);
        }
        let rx = socket.try_clone().map_err(udp_err)?;
        let counters = Arc::new(VxlanCounters::default());
        let by_ip = cfg
            .peers
            .iter()
            .map(|(h, a)| (a.ip().to_canonical(), h.clone()))
            .collect();
        info!(%local, peers = cfg.peers.len(), source_sockets = pool.len(), "VXLAN transport bound");
        Ok((
            Self {
                socket,
                pool,
                peers: cfg.peers.into_iter().collect(),
                counters: counters.clone(),
            },
            VxlanReceiver {
                socket: rx,
                by_ip,
                counters,
            },
        ))
    }

    /// Local address of the receiving socket.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Counters.
    pub fn stats(&self) -> VxlanStats {
        self.counters.snapshot()
    }

    /// The socket a frame's flow is sent from.
    fn socket_for(&self, frame: &[u8]) -> &std::net::UdpSocket {
        if self.pool.is_empty() {
            return &self.socket;
        }
        let h = usize::from(vxlan::source_port(frame) - vxlan::SOURCE_PORT_MIN);
        // In range: the modulus is the pool's non-zero length.
        &self.pool[h % self.pool.len()]
    }
}

impl RemoteTransport for VxlanTransport {
    fn send(&self, site: &HostId, vni: Vni, _delivery: Delivery, _ack: u64, frame: Bytes) {
        let Some(dst) = self.peers.get(site) else {
            bump(&self.counters.unknown_site);
            debug!(%site, "no VXLAN address for site");
            return;
        };
        let mut buf = BytesMut::with_capacity(vxlan::VXLAN_HEADER_LEN + frame.len());
        vxlan::encode(vni, &frame, &mut buf);
        match self.socket_for(&frame).send_to(&buf, dst) {
            Ok(_) => bump(&self.counters.sent),
            Err(e) => {
                bump(&self.counters.send_errors);
                trace!(%site, %dst, cause = %e, "VXLAN send failed");
            }
        }
    }
}

impl VxlanReceiver {
    /// Receives datagrams and hands their frames to `sink` until the switch
    /// stops (then `Ok`) or the socket fails. Needs a tokio runtime.
    pub async fn run(self, sink: RemoteSink) -> Result<(), OverlayError> {
        let local = self
            .socket
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let udp_err = |source| OverlayError::Udp {
            addr: local.clone(),
            source,
        };
        let socket = tokio::net::UdpSocket::from_std(self.socket).map_err(udp_err)?;
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let (n, from) = match socket.recv_from(&mut buf).await {
                Ok(r) => r,
                // An ICMP error for an earlier send (with IP_RECVERR on);
                // it says nothing about this socket.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset
                    ) =>
                {
                    debug!(cause = %e, "VXLAN peer unreachable");
                    continue;
                }
                Err(e) => return Err(udp_err(e)),
            };
            bump(&self.counters.received);
            let Some(site) = self.by_ip.get(&from.ip().to_canonical()) else {
                bump(&self.counters.unknown_peer);
                debug!(%from, "VXLAN datagram from an unknown peer");
                continue;
            };
            // Within `buf`: recv_from returned at most its length.
            let pkt = match vxlan::decode(&buf[..n]) {
                Ok(p) => p,
                Err(e) => {
                    bump(&self.counters.malformed);
                    debug!(%from, cause = %e, "bad VXLAN datagram");
                    continue;
                }
            };
            let frame = Bytes::copy_from_slice(pkt.inner);
            match sink.deliver(site.clone(), pkt.vni, Delivery::Flood, u64::MAX, frame) {
                Ok(()) => {}
                Err(OverlayError::Backlogged) => bump(&self.counters.backlogged),
                Err(_) => return Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{arp_request, EthernetFrame};
    use std::net::Ipv4Addr;
    use std::sync::Mutex;
    use tokio::net::UnixListener;

    /// Records what the switch sends to peers.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(HostId, Vni, Bytes)>>);

    impl RemoteTransport for Recorder {
        fn send(&self, site: &HostId, vni: Vni, _d: Delivery, _a: u64, frame: Bytes) {
            self.0.lock().unwrap().push((site.clone(), vni, frame));
        }
    }

    fn vni() -> Vni {
        Vni::new(42).unwrap()
    }

    fn mac(n: u8) -> MacAddr {
        MacAddr([0x52, 0x54, 0, 0, 0, n])
    }

    fn cfg(n: u8) -> PortConfig {
        PortConfig {
            vni: vni(),
            mac: mac(n),
            allow_other_sources: false,
        }
    }

    async fn send(s: &mut UnixStream, frame: &[u8]) {
        let mut out = BytesMut::new();
        StreamCodec::encode(frame, &mut out).unwrap();
        s.write_all(&out).await.unwrap();
    }

    async fn recv(s: &mut UnixStream) -> Option<Bytes> {
        let mut d = StreamDecoder::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(f) = d.poll_frame() {
                return Some(f);
            }
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .ok()?
                .ok()?;
            if n == 0 {
                return None;
            }
            d.handle_input(&buf[..n]).unwrap();
        }
    }

    #[tokio::test]
    async fn stream_ports_switch_frames_and_flood_to_remotes() {
        let dir = tempfile::tempdir().unwrap();
        let rec = Arc::new(Recorder::default());
        let (h, mut out) = OverlaySwitch::spawn(HostId::new("a"), rec.clone());
        h.add_remote(vni(), HostId::new("b")).await.unwrap();
        // QEMU listens; the ports connect.
        let q1 = UnixListener::bind(dir.path().join("p1")).unwrap();
        let q2 = UnixListener::bind(dir.path().join("p2")).unwrap();
        for n in [1, 2] {
            h.add_stream_port(
                PortId(n.into()),
                cfg(n),
                PortState::Open,
                dir.path().join(format!("p{n}")),
            )
            .await
            .unwrap();
        }
        let mut g1 = q1.accept().await.unwrap().0;
        let mut g2 = q2.accept().await.unwrap().0;
        for _ in 0..2 {
            assert!(matches!(
                out.events.recv().await,
                Some(OverlayEvent::PortConnected { .. })
            ));
        }
        let arp = arp_request(
            mac(1),
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            None,
        );
        send(&mut g1, &arp).await;
        assert_eq!(recv(&mut g2).await.unwrap(), &arp[..]);
        assert!(matches!(
            out.events.recv().await,
            Some(OverlayEvent::Push(_))
        ));
        {
            let sent = rec.0.lock().unwrap();
            assert_eq!(sent.len(), 1);
            assert_eq!(sent[0].0, HostId::new("b"));
        }
        // A frame from a remote for guest 2 reaches it.
        let mut reply = arp_request(
            mac(9),
            Ipv4Addr::new(10, 0, 0, 9),
            Ipv4Addr::new(10, 0, 0, 2),
            None,
        );
        reply[..6].copy_from_slice(&mac(2).0);
        h.remote_sink()
            .deliver(
                HostId::new("b"),
                vni(),
                Delivery::Flood,
                u64::MAX,
                Bytes::from(reply.clone()),
            )
            .unwrap();
        // Guest 2 has not spoken, so this is unknown unicast: flooded to
        // both local ports.
        assert_eq!(recv(&mut g2).await.unwrap(), &reply[..]);
        assert_eq!(recv(&mut g1).await.unwrap(), &reply[..]);
        h.shutdown().await.unwrap();
        out.task.await.unwrap();
        // The switch is gone: QEMU sees its peer leave.
        assert_eq!(recv(&mut g1).await, None);
    }

    #[tokio::test]
    async fn a_port_waits_for_qemu_reconnects_and_follows_a_retarget() {
        let dir = tempfile::tempdir().unwrap();
        let old_path = dir.path().join("old");
        let (h, mut out) = OverlaySwitch::spawn(HostId::new("a"), Arc::new(Recorder::default()));
        h.add_remote(vni(), HostId::new("b")).await.unwrap();
        // Added before QEMU listens (QEMU still starting): it keeps trying.
        h.add_stream_port(PortId(1), cfg(1), PortState::Open, &old_path)
            .await
            .unwrap();
        tokio::time::sleep(DIAL_RETRY * 4).await;
        let old_qemu = UnixListener::bind(&old_path).unwrap();
        let mut old = old_qemu.accept().await.unwrap().0;
        assert!(matches!(
            out.events.recv().await,
            Some(OverlayEvent::PortConnected { .. })
        ));
        // A bad record closes the connection; the port stays and connects
        // again, as QEMU listens again after its peer goes away.
        old.write_all(&[0, 0, 0, 0]).await.unwrap();
        assert_eq!(recv(&mut old).await, None);
        assert!(matches!(
            out.events.recv().await,
            Some(OverlayEvent::PortDisconnected { .. })
        ));
        let mut old = old_qemu.accept().await.unwrap().0;
        assert!(matches!(
            out.events.recv().await,
            Some(OverlayEvent::PortConnected { .. })
        ));
        // A same-host handover: the port moves to the new QEMU.
        let new_path = dir.path().join("new");
        let new_qemu = UnixListener::bind(&new_path).unwrap();
        h.retarget_port(PortId(1), &new_path).await.unwrap();
        assert!(matches!(
            out.events.recv().await,
            Some(OverlayEvent::PortDisconnected { .. })
        ));
        assert_eq!(recv(&mut old).await, None);
        let mut new = new_qemu.accept().await.unwrap().0;
        assert!(matches!(
            out.events.recv().await,
            Some(OverlayEvent::PortConnected { .. })
        ));
        let bcast = arp_request(
            mac(7),
            Ipv4Addr::new(10, 0, 0, 7),
            Ipv4Addr::new(10, 0, 0, 1),
            None,
        );
        h.remote_sink()
            .deliver(
                HostId::new("b"),
                vni(),
                Delivery::Flood,
                u64::MAX,
                Bytes::from(bcast.clone()),
            )
            .unwrap();
        assert_eq!(recv(&mut new).await.unwrap(), &bcast[..]);
        let st = h.status().await.unwrap();
        assert_eq!(
            (
                st.shell.connections,
                st.shell.retargets,
                st.shell.stream_errors
            ),
            (3, 1, 1)
        );
        assert_eq!(st.connected, vec![PortId(1)]);
        assert!(matches!(
            h.retarget_port(PortId(9), &new_path).await,
            Err(OverlayError::NoPort(PortId(9)))
        ));
        // Removing the port closes its connection.
        h.remove_port(PortId(1)).await.unwrap();
        assert_eq!(recv(&mut new).await, None);
    }

    #[tokio::test]
    async fn vxlan_transport_roundtrip_on_loopback() {
        let a_sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b_sock = std::net::UdpSocket::bind("127.0.0.2:0").unwrap();
        let (a_addr, b_addr) = (a_sock.local_addr().unwrap(), b_sock.local_addr().unwrap());
        let mut cfg_a = VxlanConfig::new();
        cfg_a.peers.insert(HostId::new("b"), b_addr);
        let (ta, _ra) = VxlanTransport::from_socket(a_sock, cfg_a).unwrap();
        let mut cfg_b = VxlanConfig::new();
        cfg_b.peers.insert(HostId::new("a"), a_addr);
        cfg_b.source_sockets = 0;
        let (tb, rb) = VxlanTransport::from_socket(b_sock, cfg_b).unwrap();
        let (h, mut out) = OverlaySwitch::spawn(HostId::new("b"), Arc::new(tb));
        h.add_remote(vni(), HostId::new("a")).await.unwrap();
        let recv_task = tokio::spawn(rb.run(h.remote_sink()));
        // b's switch has no port, so its counters show the frame arrived.
        let frame = arp_request(
            mac(1),
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            None,
        );
        ta.send(
            &HostId::new("b"),
            vni(),
            Delivery::Flood,
            0,
            Bytes::from(frame.clone()),
        );
        ta.send(
            &HostId::new("nobody"),
            vni(),
            Delivery::Flood,
            0,
            Bytes::from(frame),
        );
        let mut rx_remote = 0;
        for _ in 0..100 {
            rx_remote = h.status().await.unwrap().switch.stats.rx_remote;
            if rx_remote > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(rx_remote, 1);
        let st = ta.stats();
        assert_eq!((st.sent, st.unknown_site), (1, 1));
        h.shutdown().await.unwrap();
        out.task.await.unwrap();
        while out.events.try_recv().is_ok() {}
        recv_task.abort();
    }

    #[test]
    fn a_flow_keeps_its_source_socket() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (t, _r) = VxlanTransport::from_socket(s, VxlanConfig::new()).unwrap();
        let f = arp_request(
            mac(1),
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            None,
        );
        let p1 = t.socket_for(&f).local_addr().unwrap();
        assert_eq!(p1, t.socket_for(&f).local_addr().unwrap());
        assert_ne!(p1, t.local_addr().unwrap());
        assert!(EthernetFrame::parse(&f).is_ok());
        let too_many = VxlanConfig {
            source_sockets: MAX_SOURCE_SOCKETS + 1,
            ..VxlanConfig::new()
        };
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(matches!(
            VxlanTransport::from_socket(s, too_many),
            Err(OverlayError::TooManySourceSockets(_))
        ));
    }
}
