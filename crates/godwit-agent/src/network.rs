//! The guest network of this agent: one overlay switch, the encrypted
//! transport that carries guest frames to peers, and the control channel
//! that carries location-registry updates.
//!
//! This module owns the [`OverlaySwitch`] (spawned at start-up when
//! `[network] enabled`), the map from VMs to switch ports, and the tasks that
//! join the switch to every peer agent:
//!
//! - **Frames** travel as QUIC datagrams on the existing peer connection
//!   (encrypted and authenticated by its TLS), each with the small header of
//!   [`godwit_overlay::datagram`]. A frame that does not fit the path's
//!   datagram size (about 1 150 bytes before path MTU discovery) is split
//!   over several datagrams and put back together by the receiving agent,
//!   so guests keep the usual 1500-byte MTU ([`GUEST_MTU`]).
//! - **Registry updates** travel on one long-lived bidirectional stream per
//!   peer pair ([`StreamPurpose::NetworkFrames`]), opened by the agent with
//!   the smaller name. A stream rather than one `ControlRequest` per update
//!   because the switch counts updates per channel to decide which flooded
//!   frames might be duplicates ([`godwit_overlay::dedup`]): it needs every
//!   update delivered in order and exactly once per channel, and to know
//!   when the channel was replaced ([`OverlayHandle::reset_peer`]). A
//!   request that times out would leave it unknown whether the update was
//!   applied; a stream either carries everything in order or breaks.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant A as agent a (smaller name)
//!     participant B as agent b
//!     A->>B: open stream (purpose NetworkFrames)
//!     Note over A,B: both: reset_peer(other) → Sync (full local registry)
//!     A->>B: RegistryUpdate frames (Sync, then every Push)
//!     B->>A: RegistryUpdate frames (Sync, then every Push)
//!     Note over A,B: stream breaks: a dials again after LINK_RETRY
//! ```
//!
//! The stream carries [`godwit_wire::Frame`]s of kind control whose JSON
//! payload is a [`RegistryUpdate`]; there is no handshake beyond the
//! transport's (the peer's name comes from its pinned certificate).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use godwit_overlay::datagram::{self, DatagramHeader};
use godwit_overlay::router::{RouterConfig, RouterStats, TapRouter};
use godwit_overlay::{
    Delivery, HostId, MacAddr, OverlayError, OverlayEvent, OverlayHandle, OverlayStatus,
    OverlaySwitch, PortConfig, PortId, PortState, RegistryUpdate, RemoteTransport, Vni,
    VxlanConfig, VxlanStats, VxlanTransport,
};
use godwit_transport::{StreamPurpose, Transport};
use godwit_wire::Frame;
use tokio::io::AsyncWriteExt;
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, info, warn, Instrument};

use crate::config::NetworkSection;
use crate::peer::Peers;
use crate::relay::{read_first_frame, write_frame};
use crate::vm::VmHandle;
use godwit_qemu::NetdevSpec;

/// The MTU guests (and the gateway router's device) use on the overlay:
/// Ethernet's usual one. Frames that do not fit one QUIC datagram are split
/// ([`datagram::split`]); bigger MTUs work too, at up to
/// [`datagram::MAX_FRAGMENTS`] datagrams per frame.
pub const GUEST_MTU: usize = 1500;
/// Pause between attempts to (re)open the registry stream to a peer.
pub const LINK_RETRY: Duration = Duration::from_secs(1);
/// How often the set of peers is re-read, so peers added with `godwit peer
/// add` join the network without a restart.
pub const PEER_SCAN: Duration = Duration::from_secs(2);
/// Port events buffered for subscribers (migration hooks); a slow
/// subscriber loses the oldest, which only delays a claim to completion.
pub const EVENT_BUFFER: usize = 256;

/// Errors of the agent's network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The switch refused.
    #[error("overlay switch")]
    Overlay(#[from] OverlayError),
    /// The NIC's MAC is not a MAC.
    #[error("NIC MAC {0:?} is not a MAC address")]
    BadMac(String),
    /// The `[network]` section is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// Counters of the QUIC datagram transport.
#[derive(Debug, Default)]
pub struct DatagramStats {
    /// Datagrams sent.
    pub tx: AtomicU64,
    /// Frames sent split over several datagrams.
    pub tx_split: AtomicU64,
    /// Frames dropped: too big even split, or no datagrams on the
    /// connection.
    pub tx_too_big: AtomicU64,
    /// Frames dropped: no live connection to the peer.
    pub tx_no_connection: AtomicU64,
    /// Frames dropped: quinn refused the datagram.
    pub tx_errors: AtomicU64,
    /// Datagrams received.
    pub rx: AtomicU64,
    /// Datagrams dropped: malformed header.
    pub rx_malformed: AtomicU64,
    /// Datagrams dropped: the switch was behind.
    pub rx_dropped: AtomicU64,
    /// Split frames put back together.
    pub rx_reassembled: AtomicU64,
    /// Split frames given up (a piece lost, late, duplicated or
    /// inconsistent).
    pub rx_reassembly_failed: AtomicU64,
}

/// A snapshot of [`DatagramStats`].
#[derive(Debug, Clone, Default, serde::Serialize)]
#[allow(missing_docs)]
pub struct DatagramCounts {
    pub tx: u64,
    pub tx_split: u64,
    pub tx_too_big: u64,
    pub tx_no_connection: u64,
    pub tx_errors: u64,
    pub rx: u64,
    pub rx_malformed: u64,
    pub rx_dropped: u64,
    pub rx_reassembled: u64,
    pub rx_reassembly_failed: u64,
}

impl DatagramStats {
    fn snapshot(&self) -> DatagramCounts {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DatagramCounts {
            tx: g(&self.tx),
            tx_split: g(&self.tx_split),
            tx_too_big: g(&self.tx_too_big),
            tx_no_connection: g(&self.tx_no_connection),
            tx_errors: g(&self.tx_errors),
            rx: g(&self.rx),
            rx_malformed: g(&self.rx_malformed),
            rx_dropped: g(&self.rx_dropped),
            rx_reassembled: g(&self.rx_reassembled),
            rx_reassembly_failed: g(&self.rx_reassembly_failed),
        }
    }
}

/// Checks a NIC's MAC before its VM starts.
pub fn parse_mac(mac: &str) -> Result<MacAddr, NetworkError> {
    mac.parse()
        .map_err(|_| NetworkError::BadMac(mac.to_owned()))
}

/// [`RemoteTransport`] over the peers' QUIC connections.
struct QuicDatagrams {
    transport: Transport,
    stats: Arc<DatagramStats>,
    /// Id of the next frame that may be split (wraps; ids only have to
    /// differ among the frames a receiver is reassembling at once).
    next_frame_id: AtomicU16,
}

impl RemoteTransport for QuicDatagrams {
    fn send(&self, site: &HostId, vni: Vni, delivery: Delivery, ack: u64, frame: Bytes) {
        // Never dial here: the switch must not wait. The link task keeps
        // the connection up.
        let Some(conn) = self.transport.live_connection(site.as_str()) else {
            self.stats.tx_no_connection.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let quic = conn.quic();
        let Some(max) = quic.max_datagram_size() else {
            self.stats.tx_too_big.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let h = DatagramHeader { vni, delivery, ack };
        let id = self.next_frame_id.fetch_add(1, Ordering::Relaxed);
        let Ok(datagrams) = datagram::split(&h, &frame, max, id) else {
            self.stats.tx_too_big.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if datagrams.len() > 1 {
            self.stats.tx_split.fetch_add(1, Ordering::Relaxed);
        }
        for d in datagrams {
            match quic.send_datagram(d) {
                Ok(()) => self.stats.tx.fetch_add(1, Ordering::Relaxed),
                Err(_) => self.stats.tx_errors.fetch_add(1, Ordering::Relaxed),
            };
        }
    }
}

/// Where the switch's frames to other hosts go: agents over QUIC
/// datagrams, hosts with a kernel `vxlan` device ([`VxlanPeer`]s) as plain
/// VXLAN.
///
/// [`VxlanPeer`]: crate::config::VxlanPeer
struct Remotes {
    quic: QuicDatagrams,
    vxlan: Option<Arc<VxlanTransport>>,
    vxlan_sites: HashSet<HostId>,
}

impl RemoteTransport for Remotes {
    fn send(&self, site: &HostId, vni: Vni, delivery: Delivery, ack: u64, frame: Bytes) {
        match &self.vxlan {
            Some(v) if self.vxlan_sites.contains(site) => v.send(site, vni, delivery, ack, frame),
            _ => self.quic.send(site, vni, delivery, ack, frame),
        }
    }
}

/// Status of the network for `godwit status` and the API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NetworkStatus {
    /// Network of guest NICs.
    pub vni: u32,
    /// VM name to switch port.
    pub ports: BTreeMap<String, PortId>,
    /// Peers with a live registry stream.
    pub linked_peers: Vec<String>,
    /// The switch and its shell.
    pub overlay: OverlayStatus,
    /// The QUIC datagram transport.
    pub datagrams: DatagramCounts,
    /// The VXLAN transport to hosts without an agent, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vxlan: Option<VxlanStats>,
    /// The gateway router, if this agent routes out of the overlay.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router: Option<RouterStats>,
}

enum LinkMsg {
    Up {
        site: HostId,
        gen: u64,
        tx: mpsc::UnboundedSender<RegistryUpdate>,
        ready: oneshot::Sender<()>,
    },
    Down {
        site: HostId,
        gen: u64,
    },
}

/// The agent's guest network.
pub struct Network {
    handle: OverlayHandle,
    vni: Vni,
    host: HostId,
    ports: Mutex<HashMap<String, PortId>>,
    next_port: AtomicU32,
    next_gen: AtomicU64,
    stats: Arc<DatagramStats>,
    links: mpsc::UnboundedSender<LinkMsg>,
    linked: Arc<Mutex<HashSet<HostId>>>,
    /// Pending ports already switched over (switched and opened, on QEMU's
    /// RARP or at completion), so a port switches over once:
    /// a port claims once.
    switched: Arc<Mutex<HashSet<PortId>>>,
    events: broadcast::Sender<OverlayEvent>,
    /// The VXLAN transport, for its counters.
    vxlan: Option<Arc<VxlanTransport>>,
    /// The gateway's host side; dropping it removes the device.
    router: Option<TapRouter>,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("host", &self.host)
            .field("vni", &self.vni)
            .finish_non_exhaustive()
    }
}

impl Network {
    /// Spawns the switch for host `name`, wires the datagram transport of
    /// `peers` to it and starts the registry links.
    pub async fn start(
        name: &str,
        cfg: &NetworkSection,
        peers: &Peers,
    ) -> Result<Arc<Network>, NetworkError> {
        let vni = cfg.vni()?;
        let host = HostId::new(name);
        let stats = Arc::new(DatagramStats::default());
        let (vxlan, vxlan_rx) = if cfg.vxlan_peers.is_empty() {
            (None, None)
        } else {
            let mut vc = VxlanConfig::new();
            for p in &cfg.vxlan_peers {
                vc.peers.insert(HostId::new(&p.name), p.address);
            }
            let listen = cfg.vxlan_listen.unwrap_or_else(|| {
                std::net::SocketAddr::from(([0, 0, 0, 0], godwit_overlay::VXLAN_UDP_PORT))
            });
            let (t, rx) = VxlanTransport::bind(listen, vc)?;
            info!(%listen, peers = cfg.vxlan_peers.len(), "plain VXLAN to hosts without an agent");
            (Some(Arc::new(t)), Some(rx))
        };
        let transport = Arc::new(Remotes {
            quic: QuicDatagrams {
                transport: peers.transport().clone(),
                stats: stats.clone(),
                next_frame_id: AtomicU16::new(0),
            },
            vxlan: vxlan.clone(),
            vxlan_sites: cfg
                .vxlan_peers
                .iter()
                .map(|p| HostId::new(&p.name))
                .collect(),
        });
        let (handle, outputs) = OverlaySwitch::spawn(host.clone(), transport);
        if let Some(rx) = vxlan_rx {
            let sink = handle.remote_sink();
            tokio::spawn(async move {
                if let Err(e) = rx.run(sink).await {
                    warn!(cause = %crate::error_chain(&e), "VXLAN receiver stopped");
                }
            });
        }
        for p in &cfg.vxlan_peers {
            handle.add_remote(vni, HostId::new(&p.name)).await?;
        }
        // Only fails once the driver stopped, which it has not.
        let _ = handle.set_arp_suppression(cfg.arp_suppression).await;
        let mut router = None;
        if let Some(gw) = cfg.gateway() {
            // Only fails once the driver stopped, which it has not.
            let _ = handle.set_gateway(vni, Some(gw.clone())).await;
            if cfg.router {
                let rc = RouterConfig {
                    device: cfg.router_device.clone(),
                    vni,
                    mac: gw.mac,
                    addrs: cfg.gateway_ips.iter().map(|g| (g.addr, g.prefix)).collect(),
                    mtu: GUEST_MTU as u32,
                };
                router = Some(TapRouter::start(rc, outputs.routed, handle.route_sink()).await?);
            }
        }
        let sink = handle.remote_sink();
        let rx_stats = stats.clone();
        // Split frames in reassembly, per peer.
        let reassembly: Mutex<HashMap<String, datagram::Reassembler>> = Mutex::default();
        peers
            .transport()
            .on_datagram(Arc::new(move |peer: &str, d: Bytes| {
                rx_stats.rx.fetch_add(1, Ordering::Relaxed);
                let Ok(dg) = datagram::decode(&d) else {
                    rx_stats.rx_malformed.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                let (h, frame) = match dg.fragment {
                    None => (dg.header, d.slice_ref(dg.payload)),
                    Some(frag) => {
                        let mut all = reassembly.lock().unwrap_or_else(PoisonError::into_inner);
                        let r = all.entry(peer.to_owned()).or_default();
                        let failed = r.expired();
                        let got = r.push(std::time::Instant::now(), dg.header, frag, dg.payload);
                        let failed =
                            r.expired() - failed + u64::from(got == datagram::Reassembly::Dropped);
                        rx_stats
                            .rx_reassembly_failed
                            .fetch_add(failed, Ordering::Relaxed);
                        let datagram::Reassembly::Frame(h, frame) = got else {
                            return;
                        };
                        rx_stats.rx_reassembled.fetch_add(1, Ordering::Relaxed);
                        (h, frame)
                    }
                };
                if sink
                    .deliver(HostId::new(peer), h.vni, h.delivery, h.ack, frame)
                    .is_err()
                {
                    rx_stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }));
        let (links_tx, links_rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let linked = Arc::new(Mutex::new(HashSet::new()));
        let switched = Arc::new(Mutex::new(HashSet::new()));
        let net = Arc::new(Network {
            handle: handle.clone(),
            vni,
            host,
            ports: Mutex::new(HashMap::new()),
            next_port: AtomicU32::new(1),
            next_gen: AtomicU64::new(1),
            stats,
            links: links_tx,
            linked: linked.clone(),
            switched: switched.clone(),
            events: events.clone(),
            vxlan,
            router,
        });
        tokio::spawn(
            dispatch(handle, outputs.events, links_rx, events, linked, switched)
                .instrument(tracing::info_span!("overlay_control")),
        );
        tokio::spawn(scan_peers(Arc::downgrade(&net), peers.clone()));
        info!(vni = %vni, "guest network started");
        Ok(net)
    }

    /// The switch.
    pub fn handle(&self) -> &OverlayHandle {
        &self.handle
    }

    /// The network guest NICs join.
    pub fn vni(&self) -> Vni {
        self.vni
    }

    /// Port events (fenced, RARP seen, connected, disconnected).
    pub fn subscribe(&self) -> broadcast::Receiver<OverlayEvent> {
        self.events.subscribe()
    }

    /// Attaches the NIC of `vm` (a VM whose spec has a `-netdev stream`
    /// NIC) to the switch in `state`: the port connects to the socket its
    /// QEMU listens on. Replaces an earlier port of the same VM. A VM
    /// without such a NIC is left alone.
    pub async fn attach(&self, vm: &VmHandle, state: PortState) -> Result<(), NetworkError> {
        let Some(nic) = &vm.spec.nic else {
            return Ok(());
        };
        if nic.netdev != NetdevSpec::Stream {
            return Ok(());
        }
        let mac = parse_mac(&nic.mac)?;
        let name = vm.spec.name.as_str();
        self.remove_vm_port(name).await;
        let port = PortId(self.next_port.fetch_add(1, Ordering::Relaxed));
        let cfg = PortConfig {
            vni: self.vni,
            mac,
            allow_other_sources: false,
        };
        self.handle
            .add_stream_port(port, cfg, state, vm.instance.net_socket.clone())
            .await?;
        self.lock_ports().insert(name.to_owned(), port);
        info!(vm = name, %port, %mac, ?state, "NIC attached to the overlay");
        Ok(())
    }

    /// Points `vm`'s port at the NIC of its new QEMU on this host, which
    /// listens at `socket` (a same-host handover, once the old QEMU
    /// handed over and before the new one runs the guest).
    pub async fn follow(&self, vm: &str, socket: &std::path::Path) -> Result<(), NetworkError> {
        let Some(port) = self.port_of(vm) else {
            return Ok(());
        };
        self.handle.retarget_port(port, socket).await?;
        Ok(())
    }

    /// Detaches `vm`'s NIC, if it has one.
    pub async fn remove_vm_port(&self, vm: &str) {
        let Some(port) = self.lock_ports().remove(vm) else {
            return;
        };
        self.switched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&port);
        match self.handle.remove_port(port).await {
            Ok(()) => info!(vm, %port, "NIC detached from the overlay"),
            Err(e) => debug!(vm, %port, cause = %e, "removing port"),
        }
    }

    /// The source's switchover step: `vm` now runs elsewhere; nothing its
    /// old QEMU emits goes anywhere from now on.
    ///
    /// Called when the migration has completed, not when QEMU stops the
    /// guest for the switchover: a fenced port never reopens, and QEMU 7.2's
    /// stream client cannot reconnect to a replaced port, so fencing at the
    /// stop would leave a guest whose migration then fails without a
    /// network. Nothing is lost by waiting: the paused guest emits nothing,
    /// and the destination's claim fences the port anyway when it arrives
    /// first.
    pub async fn fence_vm(&self, vm: &str) {
        let Some(port) = self.port_of(vm) else { return };
        if let Err(e) = self.handle.fence(port).await {
            warn!(vm, %port, cause = %e, "fencing the NIC");
        }
    }

    /// After a migration that failed on the source's side: the guest runs
    /// here again. If the destination already switched its location over
    /// (it loaded the state and sent QEMU's RARP before the migration was
    /// declared failed), this host's port was fenced and a fenced port never
    /// reopens: attach a new one and switch the location back with a higher
    /// sequence number. Otherwise nothing moved and nothing is done.
    pub async fn recover(&self, vm: &VmHandle) -> Result<(), NetworkError> {
        let Some(port) = self.port_of(&vm.spec.name) else {
            return Ok(());
        };
        let status = self.handle.status().await?;
        let fenced = status
            .switch
            .ports
            .iter()
            .any(|p| p.port == port && p.state == PortState::Fenced);
        if !fenced {
            return Ok(());
        }
        warn!(vm = vm.spec.name, %port, "the failed migration had moved the guest's location; taking it back");
        self.attach(vm, PortState::Pending).await?;
        if let Some(new) = self.port_of(&vm.spec.name) {
            first_switchover(&self.switched, new);
            switch_over(&self.handle, new).await;
        }
        Ok(())
    }

    /// The destination's switchover once `vm` runs here, unless QEMU's
    /// RARP already triggered it (see [`switch_over`]).
    pub async fn activate(&self, vm: &str) {
        let Some(port) = self.port_of(vm) else { return };
        if first_switchover(&self.switched, port) {
            switch_over(&self.handle, port).await;
        }
    }

    /// `vm`'s port, if its NIC is on the switch.
    pub fn port_of(&self, vm: &str) -> Option<PortId> {
        self.lock_ports().get(vm).copied()
    }

    /// Status for the API.
    pub async fn status(&self) -> Result<NetworkStatus, NetworkError> {
        let overlay = self.handle.status().await?;
        let mut linked: Vec<String> = self
            .linked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|h| h.to_string())
            .collect();
        linked.sort();
        Ok(NetworkStatus {
            vni: self.vni.get(),
            ports: self
                .lock_ports()
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            linked_peers: linked,
            overlay,
            datagrams: self.stats.snapshot(),
            vxlan: self.vxlan.as_ref().map(|v| v.stats()),
            router: self.router.as_ref().map(|r| r.stats()),
        })
    }

    /// Runs the registry link on a stream `peer` opened (or we opened) until
    /// it breaks.
    pub async fn run_link(
        &self,
        peer: &str,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let site = HostId::new(peer);
        let gen = self.next_gen.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::unbounded_channel::<RegistryUpdate>();
        let (ready, ready_rx) = oneshot::channel();
        if self
            .links
            .send(LinkMsg::Up {
                site: site.clone(),
                gen,
                tx,
                ready,
            })
            .is_err()
            || ready_rx.await.is_err()
        {
            return;
        }
        info!(%peer, gen, "registry link up");
        let writer = async {
            while let Some(u) = rx.recv().await {
                if let Err(e) = write_frame(&mut send, &Frame::control(&u)).await {
                    return format!("write: {e}");
                }
            }
            "closed".to_owned()
        };
        let reader = async {
            loop {
                let f = match read_first_frame(&mut recv).await {
                    Ok(f) => f,
                    Err(e) => return format!("read: {e}"),
                };
                match f.json::<RegistryUpdate>() {
                    Ok(u) => {
                        if self.handle.apply_update(site.clone(), u).await.is_err() {
                            return "switch stopped".to_owned();
                        }
                    }
                    // The counts on both sides would diverge: break the
                    // link so both resynchronise.
                    Err(e) => return format!("bad update: {e}"),
                }
            }
        };
        let why = tokio::select! {
            w = writer => w,
            r = reader => r,
        };
        let _ = send.shutdown().await;
        info!(%peer, gen, why, "registry link down");
        let _ = self.links.send(LinkMsg::Down { site, gen });
    }

    fn lock_ports(&self) -> std::sync::MutexGuard<'_, HashMap<String, PortId>> {
        self.ports.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct Link {
    gen: u64,
    tx: mpsc::UnboundedSender<RegistryUpdate>,
    /// Resets requested for this link whose Sync has not come out yet;
    /// pushes wait until it is 0 (they predate the reset).
    syncs_pending: u32,
}

/// Fans the switch's events out: registry updates to the links, port
/// events to subscribers.
async fn dispatch(
    handle: OverlayHandle,
    mut events: mpsc::UnboundedReceiver<OverlayEvent>,
    mut links_rx: mpsc::UnboundedReceiver<LinkMsg>,
    subscribers: broadcast::Sender<OverlayEvent>,
    linked: Arc<Mutex<HashSet<HostId>>>,
    switched: Arc<Mutex<HashSet<PortId>>>,
) {
    let mut links: HashMap<HostId, Link> = HashMap::new();
    let set_linked = |links: &HashMap<HostId, Link>| {
        *linked.lock().unwrap_or_else(PoisonError::into_inner) = links
            .iter()
            .filter(|(_, l)| l.syncs_pending == 0)
            .map(|(h, _)| h.clone())
            .collect();
    };
    loop {
        tokio::select! {
            // Links first: a link must be installed before its Sync event.
            biased;
            m = links_rx.recv() => match m {
                Some(LinkMsg::Up { site, gen, tx, ready }) => {
                    let pending = links.get(&site).map_or(0, |l| l.syncs_pending);
                    links.insert(site.clone(), Link { gen, tx, syncs_pending: pending + 1 });
                    // The reset is queued before any update the link reads
                    // (the link waits for `ready`), so both count from 0.
                    if handle.reset_peer(site).await.is_err() {
                        break;
                    }
                    let _ = ready.send(());
                }
                Some(LinkMsg::Down { site, gen }) => {
                    if links.get(&site).is_some_and(|l| l.gen == gen) {
                        links.remove(&site);
                        set_linked(&links);
                    }
                }
                None => break,
            },
            ev = events.recv() => match ev {
                Some(OverlayEvent::Push(u)) => {
                    for l in links.values() {
                        if l.syncs_pending == 0 {
                            let _ = l.tx.send(u.clone());
                        }
                    }
                }
                Some(OverlayEvent::Sync { site, updates }) => {
                    if let Some(l) = links.get_mut(&site) {
                        l.syncs_pending = l.syncs_pending.saturating_sub(1);
                        if l.syncs_pending == 0 {
                            debug!(%site, n = updates.len(), "full sync");
                            for u in updates {
                                let _ = l.tx.send(u);
                            }
                        }
                    }
                    set_linked(&links);
                }
                Some(OverlayEvent::RarpSeen { port, mac }) => {
                    // QEMU sends its RARP train only once the incoming
                    // state loaded and the VM runs here: the earliest safe
                    // moment to switch over (reference §0.3). Waiting for
                    // the agent to adopt the VM would drop what the guest
                    // sends meanwhile (a pending port's frames go nowhere).
                    if first_switchover(&switched, port) {
                        info!(%port, %mac, "RARP from the arriving guest; switching its location here");
                        switch_over(&handle, port).await;
                    }
                    let _ = subscribers.send(OverlayEvent::RarpSeen { port, mac });
                }
                Some(other) => {
                    // No subscriber is fine.
                    let _ = subscribers.send(other);
                }
                None => break,
            },
        }
    }
    debug!("overlay control stopped");
}

/// Marks `port` switched over; true the first time.
fn first_switchover(done: &Mutex<HashSet<PortId>>, port: PortId) -> bool {
    done.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(port)
}

/// The destination's switchover steps: claim the port's MAC (a higher
/// sequence number, pushed to every peer, which fences the source), then
/// open the port (queued frames flow, the guest's addresses are announced).
async fn switch_over(handle: &OverlayHandle, port: PortId) {
    if let Err(e) = handle.claim(port, Vec::new()).await {
        warn!(%port, cause = %e, "claiming the NIC's location");
    }
    match handle.open(port).await {
        Ok(()) => info!(%port, "NIC open: the guest's location moved here"),
        Err(e) => warn!(%port, cause = %e, "opening the NIC"),
    }
}

/// Joins every configured peer to the network and keeps a registry link to
/// each peer whose name sorts after ours (the other side dials us).
async fn scan_peers(net: std::sync::Weak<Network>, peers: Peers) {
    let mut known = HashSet::new();
    loop {
        let Some(n) = net.upgrade() else { return };
        for p in peers.entries() {
            if !known.insert(p.name.clone()) {
                continue;
            }
            let site = HostId::new(&p.name);
            if n.handle.add_remote(n.vni, site).await.is_err() {
                return;
            }
            if n.host.as_str() < p.name.as_str() {
                let span = tracing::info_span!("registry_link", peer = %p.name);
                tokio::spawn(
                    dial_link(net.clone(), peers.clone(), p.name.clone()).instrument(span),
                );
            }
        }
        drop(n);
        tokio::time::sleep(PEER_SCAN).await;
    }
}

async fn dial_link(net: std::sync::Weak<Network>, peers: Peers, name: String) {
    let mut failures = 0u32;
    loop {
        let Ok(entry) = peers.resolve(&name) else {
            return;
        };
        let opened = match peers.connection(&entry).await {
            Ok(c) => c
                .open(StreamPurpose::NetworkFrames)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(crate::error_chain(&e)),
        };
        match opened {
            Ok((send, recv)) => {
                failures = 0;
                let Some(n) = net.upgrade() else { return };
                n.run_link(&name, send, recv).await;
            }
            Err(e) => {
                failures += 1;
                // The peer is often just not up yet; say so once.
                if failures == 1 {
                    warn!(cause = %e, "cannot open the registry link; retrying");
                }
            }
        }
        if net.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(LINK_RETRY).await;
    }
}
