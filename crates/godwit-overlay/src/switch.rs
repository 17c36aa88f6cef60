//! The L2 switch of one agent: guest ports, remote sites, the location
//! registry, the distributed gateway and the switchover steps.
//!
//! Frames come in through `handle_*` methods and leave as a list of
//! [`Action`]s for the shell to perform; nothing here touches a socket or a
//! clock. The shell owns the QEMU stream connections (see [`crate::stream`]),
//! the overlay transport (QUIC datagrams or VXLAN, see [`crate::vxlan`]), the
//! control channel that carries [`RegistryUpdate`]s, and a timer.
//!
//! # Calling order
//!
//! - `add_port` when a guest NIC is attached (`Pending` on a migration
//!   destination, `Open` for a VM booted here); `add_remote` for each peer
//!   site on each network.
//! - `handle_local_frame` for every frame read from a guest port,
//!   `handle_remote_frame` for every frame from a peer site,
//!   `handle_route_in` for frames the router sends back into the network,
//!   `handle_update` for every registry update from a peer.
//! - `poll_timeout` after every call; `handle_timeout` when it expires
//!   (only the announcer uses time).
//!
//! # Port states and the switchover
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> Pending: add_port (migration destination)
//!     [*] --> Open: add_port (VM boots here)
//!     Pending --> Pending: claim (location is here; frames to the guest are queued)
//!     Pending --> Open: open (VM resumed; queue flushed, announcer started)
//!     Open --> Fenced: fence (source at switchover) / a peer's claim wins (LostLocal)
//!     Pending --> Fenced: fence
//!     Fenced --> [*]: remove_port
//! ```
//!
//! ```mermaid
//! sequenceDiagram
//!     participant S as source agent
//!     participant D as destination agent
//!     participant P as other peers
//!     Note over D: add_port(Pending), QEMU -incoming connected
//!     Note over S: migration completes, QEMU stops: fence(port)
//!     Note over D: first RARP (Action::RarpSeen) or completion: claim(port)
//!     D->>S: Push(Advertise seq+1)
//!     D->>P: Push(Advertise seq+1)
//!     Note over S: handle_update: LostLocal (port already fenced)
//!     Note over D: VM resumes: open(port), GARP/NA at ANNOUNCE_SCHEDULE
//! ```
//!
//! A fenced port never reopens and never emits: its frames are dropped and
//! counted ([`DropReason::FencedSource`]) before any learning, so a stale
//! copy of the VM (a `cont` on the source, a failed migration resumed by
//! hand) can neither send traffic nor pull its location back. Why no frame
//! is delivered twice is argued in [`crate::dedup`].
//!
//! # Forwarding
//!
//! - Broadcast, multicast and unknown unicast are flooded to the open local
//!   ports of the network except the ingress, and, if the frame came from a
//!   local port (or the router), to every remote site of the network. Frames
//!   from a remote site are never sent to another site (split horizon),
//!   except the single relay below.
//! - Known unicast goes where the registry says: a local port (queued if it
//!   is pending, dropped if fenced) or a remote site.
//! - A known-unicast frame from a peer for a MAC that has moved away is
//!   relayed once to the new location (make-before-break, as
//!   draft-ietf-nvo3-vmm's old NVE does), marked [`Delivery::Relayed`] so it
//!   is never relayed again. Flooded frames are never relayed: the new
//!   location got its own copy.
//! - The distributed gateway answers ARP/NS for its addresses with the same
//!   MAC at every site and hands frames addressed to that MAC to the router
//!   ([`Action::RouteOut`]).

use crate::frame::{
    arp_reply, gratuitous_arp, neighbour_advertisement, unsolicited_na, ArpOp, EthernetFrame,
    GarpKind, MacAddr, NaFlags, NdKind,
};
use crate::registry::{
    Applied, EntryStatus, HostId, Registry, RegistryError, RegistryStats, RegistryUpdate,
};
use crate::vxlan::Vni;
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// When the agent announces a resumed guest's addresses, relative to
/// [`Switch::open`]: each round sends a gratuitous ARP request and reply per
/// IPv4 address and an unsolicited NA (override) per IPv6 address.
///
/// The early rounds (0, 50, 150, 350 ms, doubling gaps like QEMU's own RARP
/// train) refresh caches that accept updates at once. Linux ignores a
/// changed neighbour entry for `locktime` (1 s by default, arp(7)) after its
/// last update, so the late rounds at 1.25 s and 2.25 s land outside any
/// lock started up to 0.25 s after the switchover and then outside the lock
/// our own 1.25 s round may start (reference §4 row 5: "repeat past 1 s").
pub const ANNOUNCE_SCHEDULE: [Duration; 7] = [
    Duration::from_millis(0),
    Duration::from_millis(50),
    Duration::from_millis(150),
    Duration::from_millis(350),
    Duration::from_millis(750),
    Duration::from_millis(1250),
    Duration::from_millis(2250),
];
/// Frames held for a pending (claimed, not yet resumed) port. QEMU itself
/// would queue them while the VM is paused and deliver them late (reference
/// §1.4); holding a bounded few here lets the first replies after resume
/// arrive instead of being lost, without building a stale backlog.
pub const MAX_PENDING_FRAMES: usize = 256;
/// Bytes held for a pending port (with [`MAX_PENDING_FRAMES`]).
pub const MAX_PENDING_BYTES: usize = 1 << 20;
/// Source MACs a port that may bridge ([`PortConfig::allow_other_sources`])
/// can use besides its own, so a guest cannot fill every agent's registry.
pub const MAX_MACS_PER_PORT: usize = 16;

/// Errors of the switchover API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SwitchError {
    /// No such port.
    #[error("no port {0}")]
    UnknownPort(PortId),
    /// The port id is taken.
    #[error("port {0} already exists")]
    DuplicatePort(PortId),
    /// The port is fenced: it may not claim or open again.
    #[error("port {0} is fenced")]
    Fenced(PortId),
    /// The registry refused the claim.
    #[error("location claim refused")]
    Registry(#[from] RegistryError),
}

/// A local guest port (one guest NIC).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct PortId(pub u32);

impl fmt::Display for PortId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// State of a guest port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PortState {
    /// Attached but not running here yet (migration destination): emits
    /// nothing, receives nothing until claimed, then queues.
    Pending,
    /// Running here.
    Open,
    /// The guest runs elsewhere now; anything this port emits is dropped.
    Fenced,
}

/// Static description of a guest port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortConfig {
    /// Network the port is on.
    pub vni: Vni,
    /// The guest NIC's MAC.
    pub mac: MacAddr,
    /// Accept source MACs other than `mac` (a guest that bridges), up to
    /// [`MAX_MACS_PER_PORT`]. Off: such frames are dropped as spoofed.
    pub allow_other_sources: bool,
}

/// The distributed gateway of one network: the same addresses at every site.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GatewayConfig {
    /// Gateway MAC.
    pub mac: MacAddr,
    /// IPv4 addresses answered by ARP.
    pub ipv4: Vec<Ipv4Addr>,
    /// IPv6 addresses (include the link-local one guests learn from RAs)
    /// answered by NA.
    pub ipv6: Vec<Ipv6Addr>,
}

/// How a frame crossed the overlay; carried in the encrypted overlay's
/// datagram header (a VXLAN peer's frames count as [`Delivery::Flood`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Sent to the one site the sender's registry named.
    Unicast,
    /// One of several copies (broadcast, multicast, unknown unicast).
    Flood,
    /// Relayed by a site the destination had left; never relayed again.
    Relayed,
}

impl Delivery {
    /// Wire value.
    pub fn as_u8(self) -> u8 {
        match self {
            Self::Unicast => 1,
            Self::Flood => 2,
            Self::Relayed => 3,
        }
    }

    /// From the wire value.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Unicast),
            2 => Some(Self::Flood),
            3 => Some(Self::Relayed),
            _ => None,
        }
    }
}

/// Why a frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Unknown ingress port.
    UnknownPort,
    /// Not a parseable Ethernet frame.
    Malformed,
    /// Emitted by a fenced port: the stale-copy guarantee.
    FencedSource,
    /// Emitted by a port not yet open.
    PendingSource,
    /// Multicast or all-zero source MAC.
    BadSource,
    /// Source MAC not the port's (or the gateway's).
    Spoofed,
    /// The port used more than [`MAX_MACS_PER_PORT`] MACs.
    TooManyMacs,
    /// The source MAC is pinned (sticky) at another host.
    StickyElsewhere,
    /// The registry refused the source (full, sequence exhausted).
    RegistryRefused,
    /// Addressed to a fenced port.
    FencedDestination,
    /// A pending port's queue is full.
    PendingQueueFull,
    /// Addressed to a pending port that holds no claim (nothing runs yet).
    PendingDestination,
    /// Addressed back to its ingress port.
    Hairpin,
    /// From a peer, for a MAC that is not here and may not be relayed.
    MovedAway,
    /// From a site not joined to the frame's network.
    UnknownRemote,
    /// The registry says local but no port has the MAC.
    NoPort,
    /// A peer's flood copy, sent before that peer had applied the claim of
    /// the port's MAC: withheld from that port (see [`crate::dedup`]).
    /// Counted per port skipped; the frame still reaches other ports.
    FloodBeforeClaim,
}

impl DropReason {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownPort => "unknown_port",
            Self::Malformed => "malformed",
            Self::FencedSource => "fenced_source",
            Self::PendingSource => "pending_source",
            Self::BadSource => "bad_source",
            Self::Spoofed => "spoofed",
            Self::TooManyMacs => "too_many_macs",
            Self::StickyElsewhere => "sticky_elsewhere",
            Self::RegistryRefused => "registry_refused",
            Self::FencedDestination => "fenced_destination",
            Self::PendingQueueFull => "pending_queue_full",
            Self::PendingDestination => "pending_destination",
            Self::Hairpin => "hairpin",
            Self::MovedAway => "moved_away",
            Self::UnknownRemote => "unknown_remote",
            Self::NoPort => "no_port",
            Self::FloodBeforeClaim => "flood_before_claim",
        }
    }
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write `frame` to a local guest port.
    Deliver {
        /// Port.
        port: PortId,
        /// Frame.
        frame: Bytes,
    },
    /// Send `frame` to a peer site over the overlay.
    SendRemote {
        /// Peer.
        site: HostId,
        /// Network.
        vni: Vni,
        /// How (goes into the overlay header).
        delivery: Delivery,
        /// How many of `site`'s registry updates this switch had applied
        /// when it sent the frame (goes into the overlay header; see
        /// [`crate::dedup`]).
        ack: u64,
        /// Frame.
        frame: Bytes,
    },
    /// Hand `frame` (addressed to the gateway MAC) to the router.
    RouteOut {
        /// Network.
        vni: Vni,
        /// Frame.
        frame: Bytes,
    },
    /// Send this registry update to every peer, now.
    Push(RegistryUpdate),
    /// A port was fenced because a peer took its MAC over.
    PortFenced {
        /// Port.
        port: PortId,
        /// New owner of the MAC.
        to: HostId,
    },
    /// QEMU's post-migration RARP arrived on a pending port: the activation
    /// trigger (OVN `activation-strategy=rarp`); the shell may claim now.
    RarpSeen {
        /// Port.
        port: PortId,
        /// MAC announced.
        mac: MacAddr,
    },
    /// The frame was dropped.
    Drop {
        /// Why.
        reason: DropReason,
    },
}

/// Drop counters, one per [`DropReason`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DropCounters(BTreeMap<&'static str, u64>);

impl DropCounters {
    fn add(&mut self, r: DropReason) {
        *self.0.entry(r.as_str()).or_insert(0) += 1;
    }

    /// Frames dropped for `r`.
    pub fn get(&self, r: DropReason) -> u64 {
        self.0.get(r.as_str()).copied().unwrap_or(0)
    }

    /// All drops.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

/// Counters for status and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SwitchStats {
    /// Frames from local ports.
    pub rx_local: u64,
    /// Frames from peer sites.
    pub rx_remote: u64,
    /// Frames from the router.
    pub rx_routed: u64,
    /// Frames written to local ports.
    pub delivered: u64,
    /// Frames sent to peer sites.
    pub sent_remote: u64,
    /// Frames flooded.
    pub flooded: u64,
    /// Frames handed to the router.
    pub routed_out: u64,
    /// Frames relayed to a MAC's new site.
    pub relayed: u64,
    /// Frames queued for pending ports.
    pub queued: u64,
    /// ARP requests answered from the registry.
    pub arp_suppressed: u64,
    /// ARP/NS answered by the distributed gateway.
    pub gateway_replies: u64,
    /// Announcement frames (GARP/NA) generated.
    pub announcements: u64,
    /// RARP activations seen on pending ports.
    pub rarp_seen: u64,
    /// Ports fenced.
    pub fences: u64,
    /// Claims made.
    pub claims: u64,
    /// Ports opened.
    pub opens: u64,
    /// Frames dropped, by reason.
    pub drops: DropCounters,
}

/// Status of one port.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PortStatus {
    /// Port.
    pub port: PortId,
    /// Network.
    pub vni: Vni,
    /// Guest MAC.
    pub mac: MacAddr,
    /// State.
    pub state: PortState,
    /// Frames queued (pending ports).
    pub queued: usize,
    /// Announcement rounds still to send.
    pub announce_rounds_left: usize,
}

/// Everything `godwit status` shows about the overlay.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SwitchStatus {
    /// This host.
    pub host: HostId,
    /// Ports.
    pub ports: Vec<PortStatus>,
    /// Registry entries (location, sequence, frozen, moves).
    pub locations: Vec<EntryStatus>,
    /// Switch counters.
    pub stats: SwitchStats,
    /// Registry counters.
    pub registry: RegistryStats,
}

/// Generates the gratuitous ARP / unsolicited NA rounds for one guest at
/// [`ANNOUNCE_SCHEDULE`].
#[derive(Debug, Clone)]
pub struct Announcer {
    start: Instant,
    next: usize,
    mac: MacAddr,
    ips: Vec<IpAddr>,
}

impl Announcer {
    /// An announcer whose first round is due at `now`.
    pub fn new(now: Instant, mac: MacAddr, ips: Vec<IpAddr>) -> Self {
        Self {
            start: now,
            next: 0,
            mac,
            ips,
        }
    }

    /// When the next round is due; `None` when finished.
    pub fn poll_timeout(&self) -> Option<Instant> {
        ANNOUNCE_SCHEDULE.get(self.next).map(|d| self.start + *d)
    }

    /// The frames of the round due at `now`, if any. A late call sends one
    /// round and skips the rounds already missed rather than bursting them.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Vec<u8>> {
        match self.poll_timeout() {
            Some(t) if t <= now => {}
            _ => return Vec::new(),
        }
        while ANNOUNCE_SCHEDULE
            .get(self.next)
            .is_some_and(|d| self.start + *d <= now)
        {
            self.next += 1;
        }
        self.round()
    }

    /// Rounds not yet sent.
    pub fn rounds_left(&self) -> usize {
        ANNOUNCE_SCHEDULE.len().saturating_sub(self.next)
    }

    /// One round: GARP request and reply per IPv4 address, unsolicited NA
    /// per IPv6 address.
    pub fn round(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for ip in &self.ips {
            match ip {
                IpAddr::V4(v4) => {
                    out.push(gratuitous_arp(self.mac, *v4, GarpKind::Request, None));
                    out.push(gratuitous_arp(self.mac, *v4, GarpKind::Reply, None));
                }
                IpAddr::V6(v6) => out.push(unsolicited_na(self.mac, *v6, None)),
            }
        }
        out
    }
}

#[derive(Debug)]
struct Port {
    cfg: PortConfig,
    state: PortState,
    queue: VecDeque<Bytes>,
    queued_bytes: usize,
    /// Extra source MACs seen (ports with `allow_other_sources`).
    macs: BTreeSet<MacAddr>,
    announcer: Option<Announcer>,
    /// Per peer: how many of our pushes that peer must have applied (our
    /// claim of this port's MAC included) before its flood copies may reach
    /// this port. Empty until the port is claimed.
    claim_epochs: BTreeMap<HostId, u64>,
}

#[derive(Debug, Clone, Copy)]
enum Ingress<'a> {
    Local(PortId),
    Remote {
        from: &'a HostId,
        delivery: Delivery,
        ack: u64,
    },
    Router,
}

/// The switch of one agent.
#[derive(Debug)]
pub struct Switch {
    registry: Registry,
    ports: BTreeMap<PortId, Port>,
    /// (vni, mac) → port, for MACs the registry places here.
    mac_table: HashMap<(Vni, MacAddr), PortId>,
    remotes: BTreeMap<Vni, BTreeSet<HostId>>,
    gateways: HashMap<Vni, GatewayConfig>,
    arp_suppression: bool,
    /// Per peer: registry updates pushed to it on the current control
    /// connection.
    pushes_to: BTreeMap<HostId, u64>,
    /// Per peer: registry updates applied from it on the current control
    /// connection.
    applied_from: HashMap<HostId, u64>,
    stats: SwitchStats,
}

impl Switch {
    /// A switch for host `local`, with no ports.
    pub fn new(local: HostId) -> Self {
        Self {
            registry: Registry::new(local),
            ports: BTreeMap::new(),
            mac_table: HashMap::new(),
            remotes: BTreeMap::new(),
            gateways: HashMap::new(),
            arp_suppression: false,
            pushes_to: BTreeMap::new(),
            applied_from: HashMap::new(),
            stats: SwitchStats::default(),
        }
    }

    /// Answer ARP requests for IPs the registry knows locally instead of
    /// flooding them (off by default).
    pub fn set_arp_suppression(&mut self, on: bool) {
        self.arp_suppression = on;
    }

    /// Sets (or with `None` removes) the distributed gateway of `vni`.
    pub fn set_gateway(&mut self, vni: Vni, gw: Option<GatewayConfig>) {
        match gw {
            Some(g) => self.gateways.insert(vni, g),
            None => self.gateways.remove(&vni),
        };
    }

    /// Joins peer `site` to network `vni`: it receives floods and is
    /// accepted as a sender on it.
    pub fn add_remote(&mut self, vni: Vni, site: HostId) {
        self.remotes.entry(vni).or_default().insert(site);
    }

    /// Removes peer `site` from network `vni`.
    pub fn remove_remote(&mut self, vni: Vni, site: &HostId) {
        if let Some(s) = self.remotes.get_mut(&vni) {
            s.remove(site);
        }
    }

    /// Attaches a guest port in `state` (`Pending` on a migration
    /// destination, `Open` for a VM that boots here).
    pub fn add_port(
        &mut self,
        port: PortId,
        cfg: PortConfig,
        state: PortState,
    ) -> Result<(), SwitchError> {
        if self.ports.contains_key(&port) {
            return Err(SwitchError::DuplicatePort(port));
        }
        self.mac_table.entry((cfg.vni, cfg.mac)).or_insert(port);
        self.ports.insert(
            port,
            Port {
                cfg,
                state,
                queue: VecDeque::new(),
                queued_bytes: 0,
                macs: BTreeSet::new(),
                announcer: None,
                claim_epochs: BTreeMap::new(),
            },
        );
        Ok(())
    }

    /// Detaches a port, withdrawing the locations it still holds here.
    pub fn remove_port(&mut self, port: PortId) -> Result<Vec<Action>, SwitchError> {
        let p = self
            .ports
            .remove(&port)
            .ok_or(SwitchError::UnknownPort(port))?;
        let mut out = Vec::new();
        for mac in std::iter::once(p.cfg.mac).chain(p.macs.iter().copied()) {
            let key = (p.cfg.vni, mac);
            if self.mac_table.get(&key) == Some(&port) {
                self.mac_table.remove(&key);
                if let Some(u) = self.registry.withdraw_local(p.cfg.vni, mac) {
                    self.push(u, &mut out);
                }
            }
        }
        Ok(out)
    }

    /// Fences a port: from now on nothing it emits goes anywhere and nothing
    /// is delivered to it. Idempotent. The source agent calls this when its
    /// QEMU stops for the switchover; a winning peer claim does it too.
    pub fn fence(&mut self, port: PortId) -> Result<(), SwitchError> {
        let p = self
            .ports
            .get_mut(&port)
            .ok_or(SwitchError::UnknownPort(port))?;
        if p.state != PortState::Fenced {
            info!(%port, mac = %p.cfg.mac, "port fenced");
            self.stats.fences += 1;
        }
        fence_port(p, &mut self.stats);
        Ok(())
    }

    /// The destination's switchover claim: the port's MAC lives here now,
    /// with a sequence number above any seen, plus `ips` (bindings carried
    /// by the migration; known ones are kept). Returns the update to push to
    /// every peer at once. Frames for the guest are queued until
    /// [`open`](Self::open).
    pub fn claim(
        &mut self,
        now: Instant,
        port: PortId,
        ips: &[IpAddr],
    ) -> Result<Vec<Action>, SwitchError> {
        let p = self
            .ports
            .get(&port)
            .ok_or(SwitchError::UnknownPort(port))?;
        if p.state == PortState::Fenced {
            return Err(SwitchError::Fenced(port));
        }
        let (vni, mac) = (p.cfg.vni, p.cfg.mac);
        let u = self.registry.claim(now, vni, mac, ips)?;
        self.mac_table.insert((vni, mac), port);
        self.stats.claims += 1;
        let mut out = Vec::new();
        self.push(u, &mut out);
        // A peer's flood copy reaches this port only once the peer had
        // applied the claim when it sent it: earlier copies may also have
        // reached the source's copy of the guest (crate::dedup).
        let epochs = self.pushes_to.clone();
        if let Some(p) = self.ports.get_mut(&port) {
            p.claim_epochs = epochs;
        }
        Ok(out)
    }

    /// Opens a port (the VM resumed here): delivers the queued frames and
    /// starts announcing the guest's addresses; the first round is in the
    /// returned actions. Call [`claim`](Self::claim) first on a migration
    /// destination (a port opened unclaimed takes its location on its first
    /// frame instead).
    pub fn open(&mut self, now: Instant, port: PortId) -> Result<Vec<Action>, SwitchError> {
        let p = self
            .ports
            .get_mut(&port)
            .ok_or(SwitchError::UnknownPort(port))?;
        if p.state == PortState::Fenced {
            return Err(SwitchError::Fenced(port));
        }
        let mut out = Vec::new();
        if p.state != PortState::Open {
            self.stats.opens += 1;
            p.state = PortState::Open;
        }
        for frame in p.queue.drain(..) {
            self.stats.delivered += 1;
            out.push(Action::Deliver { port, frame });
        }
        p.queued_bytes = 0;
        let ips = self
            .registry
            .location(p.cfg.vni, p.cfg.mac)
            .filter(|l| l.host == *self.registry.local_host())
            .map(|l| l.ips.iter().copied().collect())
            .unwrap_or_default();
        p.announcer = Some(Announcer::new(now, p.cfg.mac, ips));
        info!(%port, mac = %p.cfg.mac, "port open");
        out.extend(self.handle_timeout(now));
        Ok(out)
    }

    /// Handles a frame read from a local guest port.
    pub fn handle_local_frame(&mut self, now: Instant, port: PortId, frame: Bytes) -> Vec<Action> {
        self.stats.rx_local += 1;
        let mut out = Vec::new();
        let Some(p) = self.ports.get(&port) else {
            self.drop_frame(DropReason::UnknownPort, &mut out);
            return out;
        };
        let cfg = p.cfg;
        let state = p.state;
        let Ok(eth) = EthernetFrame::parse(&frame) else {
            self.drop_frame(DropReason::Malformed, &mut out);
            return out;
        };
        match state {
            PortState::Open => {}
            PortState::Fenced => {
                // The stale-source guarantee: checked before learning, so a
                // stale copy cannot even move its location back.
                self.drop_frame(DropReason::FencedSource, &mut out);
                return out;
            }
            PortState::Pending => {
                if eth.is_rarp_announce() && eth.src() == cfg.mac {
                    self.stats.rarp_seen += 1;
                    out.push(Action::RarpSeen { port, mac: cfg.mac });
                }
                self.drop_frame(DropReason::PendingSource, &mut out);
                return out;
            }
        }
        let src = eth.src();
        let vni = cfg.vni;
        if !src.is_unicast() {
            self.drop_frame(DropReason::BadSource, &mut out);
            return out;
        }
        let gw_mac = self.gateways.get(&vni).map(|g| g.mac);
        if gw_mac == Some(src) || (src != cfg.mac && !cfg.allow_other_sources) {
            self.drop_frame(DropReason::Spoofed, &mut out);
            return out;
        }
        if src != cfg.mac {
            let known = self.ports.get(&port).is_some_and(|p| p.macs.contains(&src));
            let full = self
                .ports
                .get(&port)
                .is_some_and(|p| p.macs.len() >= MAX_MACS_PER_PORT);
            if !known && full {
                self.drop_frame(DropReason::TooManyMacs, &mut out);
                return out;
            }
        }
        match self.registry.learn_local(now, vni, src, eth.learned_ip()) {
            Ok(update) => {
                if let Some(u) = update {
                    self.push(u, &mut out);
                }
                self.mac_table.insert((vni, src), port);
                if src != cfg.mac {
                    if let Some(p) = self.ports.get_mut(&port) {
                        p.macs.insert(src);
                    }
                }
            }
            // RFC 7432 §15.1: a frozen MAC is still forwarded, just no
            // longer advertised.
            Err(RegistryError::Frozen { .. }) => {}
            Err(RegistryError::Sticky { .. }) => {
                self.drop_frame(DropReason::StickyElsewhere, &mut out);
                return out;
            }
            Err(RegistryError::Full | RegistryError::SequenceExhausted { .. }) => {
                self.drop_frame(DropReason::RegistryRefused, &mut out);
                return out;
            }
        }
        if self.answer_gateway(vni, port, &eth, &mut out) {
            return out;
        }
        if gw_mac == Some(eth.dst()) {
            self.stats.routed_out += 1;
            // A guest answering a router's neighbour request: the request
            // may have come from any site's router (the same MAC at every
            // site), so every site's router gets the answer. Only the
            // kernel that asked takes it; without this it would wait for
            // its next retry, when the registry has learnt the address.
            if eth.is_neighbour_answer() {
                self.send_to_all_sites(vni, frame.clone(), &mut out);
            }
            out.push(Action::RouteOut { vni, frame });
            return out;
        }
        if self.arp_suppression && self.suppress_arp(vni, port, &eth, &mut out) {
            return out;
        }
        let dst = eth.dst();
        self.forward(Ingress::Local(port), vni, dst, frame, &mut out);
        out
    }

    /// Handles a frame that peer `from` sent on network `vni`, with the
    /// `delivery` and `ack` of its overlay header. A kernel VXLAN peer has
    /// neither: pass [`Delivery::Flood`] and `u64::MAX` (it takes no part in
    /// the control plane, so its floods are outside the at-most-once
    /// guarantee of [`crate::dedup`]).
    pub fn handle_remote_frame(
        &mut self,
        from: &HostId,
        vni: Vni,
        delivery: Delivery,
        ack: u64,
        frame: Bytes,
    ) -> Vec<Action> {
        self.stats.rx_remote += 1;
        let mut out = Vec::new();
        if !self.remotes.get(&vni).is_some_and(|s| s.contains(from)) {
            self.drop_frame(DropReason::UnknownRemote, &mut out);
            return out;
        }
        let Ok(eth) = EthernetFrame::parse(&frame) else {
            self.drop_frame(DropReason::Malformed, &mut out);
            return out;
        };
        if !eth.src().is_unicast() {
            self.drop_frame(DropReason::BadSource, &mut out);
            return out;
        }
        let dst = eth.dst();
        if self.gateways.get(&vni).is_some_and(|g| g.mac == dst) {
            // A peer without its own gateway (a kernel VXLAN site) routes
            // through ours.
            self.stats.routed_out += 1;
            out.push(Action::RouteOut { vni, frame });
            return out;
        }
        self.forward(
            Ingress::Remote {
                from,
                delivery,
                ack,
            },
            vni,
            dst,
            frame,
            &mut out,
        );
        out
    }

    /// Handles a frame the router sends into network `vni` (from the
    /// gateway MAC to a guest).
    pub fn handle_route_in(&mut self, vni: Vni, frame: Bytes) -> Vec<Action> {
        self.stats.rx_routed += 1;
        let mut out = Vec::new();
        let Ok(eth) = EthernetFrame::parse(&frame) else {
            self.drop_frame(DropReason::Malformed, &mut out);
            return out;
        };
        // The host kernel behind the router resolves guests like any
        // neighbour. A guest at another site would answer to its own
        // site's gateway (the same MAC everywhere), so the kernel that
        // asked would never hear back: answer from the registry, which
        // knows every guest's addresses.
        if let Some(reply) = self.answer_from_registry(vni, &eth) {
            self.stats.arp_suppressed += 1;
            self.stats.routed_out += 1;
            out.push(Action::RouteOut {
                vni,
                frame: Bytes::from(reply),
            });
            return out;
        }
        let dst = eth.dst();
        self.forward(Ingress::Router, vni, dst, frame, &mut out);
        out
    }

    /// Applies a registry update from a peer. If it takes over a MAC whose
    /// port is here, that port is fenced ([`Action::PortFenced`]); if the
    /// peer is behind, our own advertisement is pushed again.
    ///
    /// `from` is the peer whose control connection carried the update: the
    /// shell must deliver each peer's updates in order and exactly once per
    /// connection (a reliable QUIC stream), and call
    /// [`reset_peer`](Self::reset_peer) when that connection is replaced.
    pub fn handle_update(
        &mut self,
        now: Instant,
        from: &HostId,
        update: &RegistryUpdate,
    ) -> Vec<Action> {
        *self.applied_from.entry(from.clone()).or_insert(0) += 1;
        let mut out = Vec::new();
        match self.registry.handle_update(now, update) {
            Applied::LostLocal { vni, mac, to, seq } => {
                let port = self.mac_table.remove(&(vni, mac));
                let primary = self
                    .ports
                    .iter()
                    .find(|(_, p)| p.cfg.vni == vni && p.cfg.mac == mac)
                    .map(|(id, _)| *id);
                if let Some(id) = primary {
                    if let Some(p) = self.ports.get_mut(&id) {
                        if p.state != PortState::Fenced {
                            info!(port = %id, %mac, %to, seq, "MAC taken over by a peer: port fenced");
                            self.stats.fences += 1;
                            fence_port(p, &mut self.stats);
                            out.push(Action::PortFenced { port: id, to });
                        }
                    }
                } else if let Some(id) = port {
                    // A secondary MAC of a bridging port moved: forget it,
                    // keep the port.
                    if let Some(p) = self.ports.get_mut(&id) {
                        p.macs.remove(&mac);
                    }
                }
            }
            Applied::Superseded { ours: Some(u) } => self.push(u, &mut out),
            Applied::Rejected(why) => {
                debug!(why, "registry update rejected");
            }
            _ => {}
        }
        out
    }

    /// A new control connection to `site` replaced the old one: both sides
    /// restart their update counts, and this side pushes every local
    /// location again (full sync; the returned actions go to `site` only,
    /// although pushing them to everyone is harmless).
    pub fn reset_peer(&mut self, site: &HostId) -> Vec<Action> {
        self.applied_from.insert(site.clone(), 0);
        let sync = self.registry.local_advertisements();
        let n = sync.len() as u64;
        self.pushes_to.insert(site.clone(), n);
        for p in self.ports.values_mut() {
            if let Some(e) = p.claim_epochs.get_mut(site) {
                // The sync carries every claim still held here.
                *e = n;
            }
        }
        sync.into_iter().map(Action::Push).collect()
    }

    /// Sends the announcement rounds that are due.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Action> {
        let mut due = Vec::new();
        for (id, p) in &mut self.ports {
            let Some(a) = &mut p.announcer else { continue };
            let frames = a.handle_timeout(now);
            if a.poll_timeout().is_none() {
                p.announcer = None;
            }
            if !frames.is_empty() {
                due.push((*id, p.cfg.vni, frames));
            }
        }
        let mut out = Vec::new();
        for (port, vni, frames) in due {
            for f in frames {
                self.stats.announcements += 1;
                let f = Bytes::from(f);
                self.flood(Ingress::Local(port), vni, f, &mut out);
            }
        }
        out
    }

    /// The next time [`handle_timeout`](Self::handle_timeout) has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.ports
            .values()
            .filter_map(|p| p.announcer.as_ref().and_then(Announcer::poll_timeout))
            .min()
    }

    /// The location registry (read-only).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The location registry, e.g. for [`Registry::set_sticky`] or
    /// [`Registry::unfreeze`].
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// State of a port.
    pub fn port_state(&self, port: PortId) -> Option<PortState> {
        self.ports.get(&port).map(|p| p.state)
    }

    /// Counters.
    pub fn stats(&self) -> &SwitchStats {
        &self.stats
    }

    /// Snapshot for status and metrics.
    pub fn status(&self, now: Instant) -> SwitchStatus {
        SwitchStatus {
            host: self.registry.local_host().clone(),
            ports: self
                .ports
                .iter()
                .map(|(id, p)| PortStatus {
                    port: *id,
                    vni: p.cfg.vni,
                    mac: p.cfg.mac,
                    state: p.state,
                    queued: p.queue.len(),
                    announce_rounds_left: p.announcer.as_ref().map_or(0, Announcer::rounds_left),
                })
                .collect(),
            locations: self.registry.entries(now),
            stats: self.stats.clone(),
            registry: self.registry.stats().clone(),
        }
    }

    fn forward(
        &mut self,
        ingress: Ingress<'_>,
        vni: Vni,
        dst: MacAddr,
        frame: Bytes,
        out: &mut Vec<Action>,
    ) {
        if dst.is_multicast() {
            self.flood(ingress, vni, frame, out);
            return;
        }
        let Some(host) = self.registry.location(vni, dst).map(|l| l.host.clone()) else {
            // Unknown unicast floods like broadcast.
            self.flood(ingress, vni, frame, out);
            return;
        };
        if host == *self.registry.local_host() {
            let Some(&port) = self.mac_table.get(&(vni, dst)) else {
                self.drop_frame(DropReason::NoPort, out);
                return;
            };
            if matches!(ingress, Ingress::Local(p) if p == port) {
                self.drop_frame(DropReason::Hairpin, out);
                return;
            }
            self.deliver_local(port, frame, out);
            return;
        }
        match ingress {
            Ingress::Local(_) | Ingress::Router => {
                self.stats.sent_remote += 1;
                let ack = self.ack_for(&host);
                out.push(Action::SendRemote {
                    site: host,
                    vni,
                    delivery: Delivery::Unicast,
                    ack,
                    frame,
                });
            }
            Ingress::Remote {
                from,
                delivery: Delivery::Unicast,
                ..
            } if host != *from => {
                // The sender's registry was behind: ours names the new
                // site. This is the only copy of the frame (it was sent as
                // unicast), so moving it on cannot duplicate it.
                self.stats.relayed += 1;
                self.stats.sent_remote += 1;
                let ack = self.ack_for(&host);
                out.push(Action::SendRemote {
                    site: host,
                    vni,
                    delivery: Delivery::Relayed,
                    ack,
                    frame,
                });
            }
            Ingress::Remote { .. } => self.drop_frame(DropReason::MovedAway, out),
        }
    }

    fn flood(&mut self, ingress: Ingress<'_>, vni: Vni, frame: Bytes, out: &mut Vec<Action>) {
        self.stats.flooded += 1;
        let except = match ingress {
            Ingress::Local(p) => Some(p),
            _ => None,
        };
        for (id, p) in &self.ports {
            if p.cfg.vni == vni && p.state == PortState::Open && Some(*id) != except {
                if let Ingress::Remote { from, ack, .. } = ingress {
                    if p.claim_epochs.get(from).is_some_and(|e| ack < *e) {
                        // Sent before `from` knew the guest had moved here:
                        // the source's copy of the guest may have had it.
                        self.stats.drops.add(DropReason::FloodBeforeClaim);
                        continue;
                    }
                }
                self.stats.delivered += 1;
                out.push(Action::Deliver {
                    port: *id,
                    frame: frame.clone(),
                });
            }
        }
        if matches!(ingress, Ingress::Remote { .. }) {
            return;
        }
        self.send_to_all_sites(vni, frame, out);
    }

    /// Sends a flooded copy of `frame` to every remote site of `vni`.
    fn send_to_all_sites(&mut self, vni: Vni, frame: Bytes, out: &mut Vec<Action>) {
        if let Some(sites) = self.remotes.get(&vni) {
            for site in sites {
                self.stats.sent_remote += 1;
                out.push(Action::SendRemote {
                    site: site.clone(),
                    vni,
                    delivery: Delivery::Flood,
                    ack: self.applied_from.get(site).copied().unwrap_or(0),
                    frame: frame.clone(),
                });
            }
        }
    }

    fn deliver_local(&mut self, port: PortId, frame: Bytes, out: &mut Vec<Action>) {
        let Some(p) = self.ports.get_mut(&port) else {
            self.drop_frame(DropReason::NoPort, out);
            return;
        };
        match p.state {
            PortState::Open => {
                self.stats.delivered += 1;
                out.push(Action::Deliver { port, frame });
            }
            PortState::Fenced => self.drop_frame(DropReason::FencedDestination, out),
            PortState::Pending => {
                if p.queue.len() >= MAX_PENDING_FRAMES
                    || p.queued_bytes + frame.len() > MAX_PENDING_BYTES
                {
                    self.drop_frame(DropReason::PendingQueueFull, out);
                    return;
                }
                p.queued_bytes += frame.len();
                p.queue.push_back(frame);
                self.stats.queued += 1;
            }
        }
    }

    /// Answers ARP requests and Neighbour Solicitations for the gateway's
    /// addresses. True if the frame was consumed.
    fn answer_gateway(
        &mut self,
        vni: Vni,
        port: PortId,
        eth: &EthernetFrame<'_>,
        out: &mut Vec<Action>,
    ) -> bool {
        let Some(gw) = self.gateways.get(&vni) else {
            return false;
        };
        if let Ok(Some(arp)) = eth.arp() {
            if arp.op == ArpOp::Request && gw.ipv4.contains(&arp.tpa) && !arp.is_gratuitous() {
                let reply = arp_reply(gw.mac, arp.tpa, arp.sha, arp.spa, eth.vlan_tci());
                self.stats.gateway_replies += 1;
                self.stats.delivered += 1;
                out.push(Action::Deliver {
                    port,
                    frame: Bytes::from(reply),
                });
                return true;
            }
            return false;
        }
        if let Ok(Some(nd)) = eth.neighbour() {
            if nd.kind == NdKind::Solicitation && gw.ipv6.contains(&nd.target) {
                // RFC 4861 §7.2.4: to the solicitor, or to all-nodes if it
                // had no address yet (DAD).
                let (dst_mac, dst_ip, solicited) = if nd.source.is_unspecified() {
                    let all = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
                    (MacAddr::ipv6_multicast(all), all, false)
                } else {
                    (eth.src(), nd.source, true)
                };
                let flags = NaFlags {
                    router: true,
                    solicited,
                    override_: true,
                };
                let na = neighbour_advertisement(
                    gw.mac,
                    nd.target,
                    dst_mac,
                    dst_ip,
                    nd.target,
                    flags,
                    eth.vlan_tci(),
                );
                self.stats.gateway_replies += 1;
                self.stats.delivered += 1;
                out.push(Action::Deliver {
                    port,
                    frame: Bytes::from(na),
                });
                return true;
            }
        }
        false
    }

    /// ARP suppression: answers a request for an IP the registry binds to a
    /// MAC. True if the frame was consumed.
    fn suppress_arp(
        &mut self,
        vni: Vni,
        port: PortId,
        eth: &EthernetFrame<'_>,
        out: &mut Vec<Action>,
    ) -> bool {
        let Some(reply) = self.answer_from_registry(vni, eth) else {
            return false;
        };
        self.stats.arp_suppressed += 1;
        self.stats.delivered += 1;
        out.push(Action::Deliver {
            port,
            frame: Bytes::from(reply),
        });
        true
    }

    /// The ARP reply or Neighbour Advertisement the owner of the address
    /// asked for would send, if the registry binds that address to a MAC
    /// other than the asker's. DAD probes (no source address) are never
    /// answered: only the owner may object to an address.
    fn answer_from_registry(&self, vni: Vni, eth: &EthernetFrame<'_>) -> Option<Vec<u8>> {
        if let Ok(Some(arp)) = eth.arp() {
            if arp.op != ArpOp::Request || arp.is_gratuitous() || arp.spa.is_unspecified() {
                return None;
            }
            let mac = self.registry.lookup_ip(vni, IpAddr::V4(arp.tpa))?;
            return (mac != arp.sha)
                .then(|| arp_reply(mac, arp.tpa, arp.sha, arp.spa, eth.vlan_tci()));
        }
        let nd = eth.neighbour().ok()??;
        if nd.kind != NdKind::Solicitation || nd.source.is_unspecified() {
            return None;
        }
        let mac = self.registry.lookup_ip(vni, IpAddr::V6(nd.target))?;
        let flags = NaFlags {
            router: false,
            solicited: true,
            override_: true,
        };
        (mac != eth.src()).then(|| {
            neighbour_advertisement(
                mac,
                nd.target,
                eth.src(),
                nd.source,
                nd.target,
                flags,
                eth.vlan_tci(),
            )
        })
    }

    /// Emits a registry update for every peer and counts it per peer.
    fn push(&mut self, u: RegistryUpdate, out: &mut Vec<Action>) {
        let peers: BTreeSet<HostId> = self.remotes.values().flatten().cloned().collect();
        for site in peers {
            *self.pushes_to.entry(site).or_insert(0) += 1;
        }
        out.push(Action::Push(u));
    }

    fn ack_for(&self, site: &HostId) -> u64 {
        self.applied_from.get(site).copied().unwrap_or(0)
    }

    fn drop_frame(&mut self, reason: DropReason, out: &mut Vec<Action>) {
        self.stats.drops.add(reason);
        out.push(Action::Drop { reason });
    }
}

fn fence_port(p: &mut Port, stats: &mut SwitchStats) {
    if p.state != PortState::Fenced && !p.queue.is_empty() {
        warn!(mac = %p.cfg.mac, frames = p.queue.len(), "fencing drops queued frames");
    }
    for _ in p.queue.drain(..) {
        stats.drops.add(DropReason::FencedDestination);
    }
    p.queued_bytes = 0;
    p.state = PortState::Fenced;
    p.announcer = None;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{
        arp_reply, arp_request, neighbour_solicitation, push_eth_header, ETHERTYPE_ARP,
        ETHERTYPE_IPV6,
    };

    const A: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0xa]);
    const B: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0xb]);
    const GW: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 1]);
    const PA: PortId = PortId(1);
    const PB: PortId = PortId(2);

    fn vni() -> Vni {
        Vni::new(100).unwrap()
    }

    /// A test frame with an experimental EtherType and an id.
    fn data(dst: MacAddr, src: MacAddr, id: u64) -> Bytes {
        let mut f = Vec::new();
        push_eth_header(&mut f, dst, src, None, 0x88b5);
        f.extend_from_slice(&id.to_be_bytes());
        Bytes::from(f)
    }

    fn cfg(mac: MacAddr) -> PortConfig {
        PortConfig {
            vni: vni(),
            mac,
            allow_other_sources: false,
        }
    }

    fn switch(host: &str) -> Switch {
        let mut s = Switch::new(HostId::new(host));
        s.add_port(PA, cfg(A), PortState::Open).unwrap();
        s.add_port(PB, cfg(B), PortState::Open).unwrap();
        s.add_remote(vni(), HostId::new("r1"));
        s.add_remote(vni(), HostId::new("r2"));
        s
    }

    fn delivered(actions: &[Action]) -> Vec<PortId> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Deliver { port, .. } => Some(*port),
                _ => None,
            })
            .collect()
    }

    fn remote(actions: &[Action]) -> Vec<(String, Delivery)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::SendRemote { site, delivery, .. } => {
                    Some((site.as_str().to_string(), *delivery))
                }
                _ => None,
            })
            .collect()
    }

    fn drops(actions: &[Action]) -> Vec<DropReason> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Drop { reason } => Some(*reason),
                _ => None,
            })
            .collect()
    }

    fn pushes(actions: &[Action]) -> Vec<RegistryUpdate> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Push(u) => Some(u.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn broadcast_floods_everywhere_but_the_ingress_then_unicast_is_direct() {
        let t = Instant::now();
        let mut s = switch("h");
        let arp = Bytes::from(arp_request(
            A,
            "10.0.0.10".parse().unwrap(),
            "10.0.0.11".parse().unwrap(),
            None,
        ));
        let out = s.handle_local_frame(t, PA, arp);
        assert_eq!(delivered(&out), vec![PB]);
        assert_eq!(
            remote(&out),
            vec![
                ("r1".into(), Delivery::Flood),
                ("r2".into(), Delivery::Flood)
            ]
        );
        // A's location (with its IP) is pushed to the peers.
        let p = pushes(&out);
        assert_eq!(p.len(), 1);
        assert_eq!(
            s.registry().lookup_ip(vni(), "10.0.0.10".parse().unwrap()),
            Some(A)
        );
        // B answers A directly: A is known to be local on PA.
        let out = s.handle_local_frame(t, PB, data(A, B, 1));
        assert_eq!(delivered(&out), vec![PA]);
        assert!(remote(&out).is_empty());
        // A frame to an unknown MAC floods (unknown unicast).
        let x = MacAddr([0x52, 0x54, 0, 0, 0, 0x99]);
        let out = s.handle_local_frame(t, PA, data(x, A, 2));
        assert_eq!(delivered(&out), vec![PB]);
        assert_eq!(remote(&out).len(), 2);
        // A frame to a MAC at a peer goes only there.
        s.handle_update(
            t,
            &HostId::new("peer"),
            &RegistryUpdate::Advertise(crate::registry::Advertisement {
                vni: vni(),
                mac: x,
                host: HostId::new("r2"),
                seq: 0,
                ips: vec![],
                sticky: false,
            }),
        );
        let out = s.handle_local_frame(t, PA, data(x, A, 3));
        assert_eq!(remote(&out), vec![("r2".into(), Delivery::Unicast)]);
        assert!(delivered(&out).is_empty());
    }

    #[test]
    fn source_checks() {
        let t = Instant::now();
        let mut s = switch("h");
        s.set_gateway(
            vni(),
            Some(GatewayConfig {
                mac: GW,
                ..Default::default()
            }),
        );
        assert_eq!(
            drops(&s.handle_local_frame(t, PA, data(B, B, 1))),
            vec![DropReason::Spoofed]
        );
        assert_eq!(
            drops(&s.handle_local_frame(t, PA, data(B, GW, 1))),
            vec![DropReason::Spoofed]
        );
        assert_eq!(
            drops(&s.handle_local_frame(t, PA, data(B, MacAddr::BROADCAST, 1))),
            vec![DropReason::BadSource]
        );
        assert_eq!(
            drops(&s.handle_local_frame(t, PortId(9), data(B, A, 1))),
            vec![DropReason::UnknownPort]
        );
        assert_eq!(
            drops(&s.handle_local_frame(t, PA, Bytes::from_static(&[1, 2, 3]))),
            vec![DropReason::Malformed]
        );
        s.handle_local_frame(t, PA, data(B, A, 1));
        assert_eq!(
            drops(&s.handle_local_frame(t, PA, data(A, A, 1))),
            vec![DropReason::Hairpin]
        );
        // A bridging port may use a bounded number of other MACs.
        s.add_port(
            PortId(3),
            PortConfig {
                allow_other_sources: true,
                ..cfg(MacAddr([0x52, 0, 0, 0, 0, 3]))
            },
            PortState::Open,
        )
        .unwrap();
        for i in 0..MAX_MACS_PER_PORT as u8 {
            let out =
                s.handle_local_frame(t, PortId(3), data(B, MacAddr([0x52, 1, 0, 0, 0, i]), 1));
            assert!(drops(&out).is_empty());
        }
        let out = s.handle_local_frame(t, PortId(3), data(B, MacAddr([0x52, 2, 0, 0, 0, 0]), 1));
        assert_eq!(drops(&out), vec![DropReason::TooManyMacs]);
        assert_eq!(s.stats().drops.get(DropReason::Spoofed), 2);
    }

    #[test]
    fn fenced_port_emits_nothing_and_cannot_move_its_location_back() {
        let t = Instant::now();
        let mut s = switch("src");
        s.handle_local_frame(t, PA, data(B, A, 0));
        s.fence(PA).unwrap();
        s.fence(PA).unwrap();
        assert_eq!(s.stats().fences, 1);
        // The destination's claim arrives: A is remote now.
        let claim = RegistryUpdate::Advertise(crate::registry::Advertisement {
            vni: vni(),
            mac: A,
            host: HostId::new("r1"),
            seq: 1,
            ips: vec![],
            sticky: false,
        });
        let out = s.handle_update(t, &HostId::new("peer"), &claim);
        assert!(out.is_empty(), "already fenced: {out:?}");
        // The stale copy keeps talking: all dropped, no learn, no push.
        for i in 0..10 {
            let out = s.handle_local_frame(t, PA, data(B, A, i));
            assert_eq!(
                out,
                vec![Action::Drop {
                    reason: DropReason::FencedSource
                }]
            );
        }
        assert_eq!(s.registry().location(vni(), A).unwrap().seq, 1);
        assert_eq!(s.stats().drops.get(DropReason::FencedSource), 10);
        // B's frames to A now go to A's new site.
        let out = s.handle_local_frame(t, PB, data(A, B, 11));
        assert_eq!(remote(&out), vec![("r1".into(), Delivery::Unicast)]);
        assert!(matches!(s.open(t, PA), Err(SwitchError::Fenced(PA))));
        assert!(matches!(s.claim(t, PA, &[]), Err(SwitchError::Fenced(PA))));
    }

    #[test]
    fn winning_peer_claim_fences_an_open_port() {
        let t = Instant::now();
        let mut s = switch("src");
        s.handle_local_frame(t, PA, data(B, A, 0));
        let claim = RegistryUpdate::Advertise(crate::registry::Advertisement {
            vni: vni(),
            mac: A,
            host: HostId::new("r1"),
            seq: 1,
            ips: vec![],
            sticky: false,
        });
        let out = s.handle_update(t, &HostId::new("peer"), &claim);
        assert_eq!(
            out,
            vec![Action::PortFenced {
                port: PA,
                to: HostId::new("r1")
            }]
        );
        assert_eq!(s.port_state(PA), Some(PortState::Fenced));
        assert!(s.handle_update(t, &HostId::new("peer"), &claim).is_empty());
        // A stale (lower) advertisement is answered with ours.
        s.handle_local_frame(t, PB, data(A, B, 0));
        let stale = RegistryUpdate::Advertise(crate::registry::Advertisement {
            vni: vni(),
            mac: B,
            host: HostId::new("zz"),
            seq: 0,
            ips: vec![],
            sticky: false,
        });
        // Tie at seq 0: our host "src" sorts before "zz", so we win.
        let out = s.handle_update(t, &HostId::new("peer"), &stale);
        assert_eq!(pushes(&out).len(), 1);
        assert_eq!(s.port_state(PB), Some(PortState::Open));
    }

    #[test]
    fn pending_port_rarp_claim_queue_open_announce() {
        let t0 = Instant::now();
        let mut d = Switch::new(HostId::new("dst"));
        d.add_port(PA, cfg(A), PortState::Pending).unwrap();
        d.add_port(PB, cfg(B), PortState::Open).unwrap();
        d.add_remote(vni(), HostId::new("src"));
        // A is at the source, with two IPs.
        d.handle_update(
            t0,
            &HostId::new("peer"),
            &RegistryUpdate::Advertise(crate::registry::Advertisement {
                vni: vni(),
                mac: A,
                host: HostId::new("src"),
                seq: 4,
                ips: vec!["10.0.0.10".parse().unwrap(), "2001:db8::a".parse().unwrap()],
                sticky: false,
            }),
        );
        // Before the claim, B's frames to A go to the source.
        let out = d.handle_local_frame(t0, PB, data(A, B, 1));
        assert_eq!(remote(&out), vec![("src".into(), Delivery::Unicast)]);
        // QEMU's RARP on the pending port: the activation signal, no egress.
        let mut rarp = Vec::new();
        push_eth_header(
            &mut rarp,
            MacAddr::BROADCAST,
            A,
            None,
            crate::frame::ETHERTYPE_RARP,
        );
        crate::frame::ArpPacket {
            op: ArpOp::ReverseRequest,
            sha: A,
            spa: Ipv4Addr::UNSPECIFIED,
            tha: A,
            tpa: Ipv4Addr::UNSPECIFIED,
        }
        .encode(&mut rarp);
        rarp.resize(60, 0);
        let out = d.handle_local_frame(t0, PA, Bytes::from(rarp));
        assert_eq!(
            out,
            vec![
                Action::RarpSeen { port: PA, mac: A },
                Action::Drop {
                    reason: DropReason::PendingSource
                }
            ]
        );
        let out = d.claim(t0, PA, &[]).unwrap();
        let p = pushes(&out);
        assert!(
            matches!(&p[..], [RegistryUpdate::Advertise(a)] if a.seq == 5 && a.host.as_str() == "dst")
        );
        // Frames for A now queue on the pending port.
        assert!(d.handle_local_frame(t0, PB, data(A, B, 2)).is_empty());
        assert!(d
            .handle_remote_frame(
                &HostId::new("src"),
                vni(),
                Delivery::Unicast,
                0,
                data(A, B, 3)
            )
            .is_empty());
        assert_eq!(d.status(t0).ports[0].queued, 2);
        // Floods do not reach a pending port.
        let out = d.handle_local_frame(t0, PB, data(MacAddr::BROADCAST, B, 4));
        assert!(delivered(&out).is_empty());
        // Resume: queue flushed in order, first announcement round flooded
        // to B and the peer (2 GARP + 1 NA).
        let t1 = t0 + Duration::from_millis(300);
        let out = d.open(t1, PA).unwrap();
        let mut ids = Vec::new();
        for a in &out {
            if let Action::Deliver { port: PA, frame } = a {
                ids.push(frame[frame.len() - 1]);
            }
        }
        assert_eq!(ids, vec![2, 3]);
        assert_eq!(delivered(&out).iter().filter(|p| **p == PB).count(), 3);
        assert_eq!(remote(&out).len(), 3);
        let kinds: Vec<u16> = out
            .iter()
            .filter_map(|a| match a {
                Action::Deliver { port: PB, frame } => {
                    EthernetFrame::parse(frame).ok().map(|e| e.ethertype())
                }
                _ => None,
            })
            .collect();
        assert_eq!(kinds, vec![ETHERTYPE_ARP, ETHERTYPE_ARP, ETHERTYPE_IPV6]);
        // The remaining rounds follow ANNOUNCE_SCHEDULE.
        let mut rounds = 1;
        while let Some(next) = d.poll_timeout() {
            assert_eq!(next, t1 + ANNOUNCE_SCHEDULE[rounds]);
            let out = d.handle_timeout(next);
            assert_eq!(remote(&out).len(), 3);
            rounds += 1;
        }
        assert_eq!(rounds, ANNOUNCE_SCHEDULE.len());
        assert!(*ANNOUNCE_SCHEDULE.last().unwrap() > Duration::from_secs(2));
        assert_eq!(d.stats().announcements, 3 * ANNOUNCE_SCHEDULE.len() as u64);
    }

    #[test]
    fn pending_queue_is_bounded() {
        let t = Instant::now();
        let mut d = Switch::new(HostId::new("dst"));
        d.add_port(PA, cfg(A), PortState::Pending).unwrap();
        d.add_port(PB, cfg(B), PortState::Open).unwrap();
        d.claim(t, PA, &[]).unwrap();
        for i in 0..MAX_PENDING_FRAMES as u64 + 5 {
            d.handle_local_frame(t, PB, data(A, B, i));
        }
        assert_eq!(d.stats().drops.get(DropReason::PendingQueueFull), 5);
        let out = d.open(t, PA).unwrap();
        assert_eq!(delivered(&out).len(), MAX_PENDING_FRAMES);
    }

    #[test]
    fn announcer_skips_missed_rounds() {
        let t = Instant::now();
        let mut a = Announcer::new(t, A, vec!["10.0.0.1".parse().unwrap()]);
        assert_eq!(a.handle_timeout(t).len(), 2);
        assert!(a.handle_timeout(t + Duration::from_millis(10)).is_empty());
        // Woken late at 400 ms: one round, not three.
        assert_eq!(a.handle_timeout(t + Duration::from_millis(400)).len(), 2);
        assert_eq!(a.poll_timeout(), Some(t + ANNOUNCE_SCHEDULE[4]));
        assert_eq!(a.rounds_left(), 3);
    }

    #[test]
    fn distributed_gateway() {
        let t = Instant::now();
        let mut s = switch("h");
        let gw4: Ipv4Addr = "10.0.0.1".parse().unwrap();
        let gw6: Ipv6Addr = "fe80::1".parse().unwrap();
        s.set_gateway(
            vni(),
            Some(GatewayConfig {
                mac: GW,
                ipv4: vec![gw4],
                ipv6: vec![gw6],
            }),
        );
        let out = s.handle_local_frame(
            t,
            PA,
            Bytes::from(arp_request(A, "10.0.0.10".parse().unwrap(), gw4, None)),
        );
        let [_, Action::Deliver { port: PA, frame }] = &out[..] else {
            panic!("{out:?}")
        };
        let e = EthernetFrame::parse(frame).unwrap();
        let arp = e.arp().unwrap().unwrap();
        assert_eq!(
            (e.dst(), e.src(), arp.op, arp.sha, arp.spa),
            (A, GW, ArpOp::Reply, GW, gw4)
        );
        // NS for the gateway's link-local address.
        let me: Ipv6Addr = "fe80::a".parse().unwrap();
        let out =
            s.handle_local_frame(t, PA, Bytes::from(neighbour_solicitation(A, me, gw6, None)));
        let Some(Action::Deliver { port: PA, frame }) = out.last() else {
            panic!("{out:?}")
        };
        let e = EthernetFrame::parse(frame).unwrap();
        let nd = e.neighbour().unwrap().unwrap();
        assert_eq!(
            nd.kind,
            NdKind::Advertisement {
                router: true,
                solicited: true,
                override_: true
            }
        );
        assert_eq!(
            (e.dst(), nd.destination, nd.target, nd.link_layer),
            (A, me, gw6, Some(GW))
        );
        // Traffic to the gateway MAC is routed out, not flooded.
        let out = s.handle_local_frame(t, PA, data(GW, A, 7));
        assert!(matches!(&out[..], [Action::RouteOut { .. }]));
        // The router's answer comes back in and reaches A.
        let out = s.handle_route_in(vni(), data(A, GW, 8));
        assert_eq!(delivered(&out), vec![PA]);
        assert_eq!(s.stats().gateway_replies, 2);
    }

    #[test]
    fn arp_suppression_answers_from_the_registry() {
        let t = Instant::now();
        let mut s = switch("h");
        s.set_arp_suppression(true);
        s.handle_local_frame(
            t,
            PB,
            Bytes::from(arp_request(
                B,
                "10.0.0.11".parse().unwrap(),
                "10.0.0.1".parse().unwrap(),
                None,
            )),
        );
        let out = s.handle_local_frame(
            t,
            PA,
            Bytes::from(arp_request(
                A,
                "10.0.0.10".parse().unwrap(),
                "10.0.0.11".parse().unwrap(),
                None,
            )),
        );
        let [_, Action::Deliver { port: PA, frame }] = &out[..] else {
            panic!("{out:?}")
        };
        let arp = EthernetFrame::parse(frame).unwrap().arp().unwrap().unwrap();
        assert_eq!((arp.sha, arp.tha), (B, A));
        assert_eq!(s.stats().arp_suppressed, 1);
    }

    #[test]
    fn router_resolves_guests_from_the_registry() {
        let t = Instant::now();
        let mut s = switch("h");
        let gw4: Ipv4Addr = "10.0.0.1".parse().unwrap();
        let (b4, b6): (Ipv4Addr, Ipv6Addr) =
            ("10.0.0.11".parse().unwrap(), "fd00::11".parse().unwrap());
        s.set_gateway(
            vni(),
            Some(GatewayConfig {
                mac: GW,
                ipv4: vec![gw4],
                ipv6: vec![],
            }),
        );
        // B's own ARP and NS teach the registry both its addresses.
        s.handle_local_frame(t, PB, Bytes::from(arp_request(B, b4, gw4, None)));
        s.handle_local_frame(
            t,
            PB,
            Bytes::from(neighbour_solicitation(
                B,
                b6,
                "fd00::1".parse().unwrap(),
                None,
            )),
        );
        // The host kernel behind the router asks for B: the switch answers
        // for B, back to the router, whatever the suppression setting.
        let out = s.handle_route_in(vni(), Bytes::from(arp_request(GW, gw4, b4, None)));
        let [Action::RouteOut { frame, .. }] = &out[..] else {
            panic!("{out:?}")
        };
        let e = EthernetFrame::parse(frame).unwrap();
        let arp = e.arp().unwrap().unwrap();
        assert_eq!(
            (e.dst(), arp.op, arp.sha, arp.spa, arp.tha, arp.tpa),
            (GW, ArpOp::Reply, B, b4, GW, gw4)
        );
        let me6: Ipv6Addr = "fd00::1".parse().unwrap();
        let out = s.handle_route_in(
            vni(),
            Bytes::from(neighbour_solicitation(GW, me6, b6, None)),
        );
        let [Action::RouteOut { frame, .. }] = &out[..] else {
            panic!("{out:?}")
        };
        let e = EthernetFrame::parse(frame).unwrap();
        let nd = e.neighbour().unwrap().unwrap();
        assert_eq!(
            (e.dst(), nd.destination, nd.target, nd.link_layer),
            (GW, me6, b6, Some(B))
        );
        // An address nobody has claimed is asked for on the whole network.
        let unknown: Ipv4Addr = "10.0.0.99".parse().unwrap();
        let out = s.handle_route_in(vni(), Bytes::from(arp_request(GW, gw4, unknown, None)));
        assert_eq!(delivered(&out), vec![PA, PB]);
        assert_eq!(remote(&out).len(), 2);
        // A's answer goes to every site's router: any of them may have
        // asked.
        let out = s.handle_local_frame(t, PA, Bytes::from(arp_reply(A, unknown, GW, gw4, None)));
        assert!(
            matches!(out.last(), Some(Action::RouteOut { .. })),
            "{out:?}"
        );
        assert_eq!(
            remote(&out),
            vec![
                ("r1".into(), Delivery::Flood),
                ("r2".into(), Delivery::Flood)
            ]
        );
        // Traffic to the gateway is routed here only.
        let out = s.handle_local_frame(t, PA, data(GW, A, 9));
        assert!(matches!(&out[..], [Action::RouteOut { .. }]), "{out:?}");
        // DAD probes are never answered for the owner.
        let out = s.handle_route_in(
            vni(),
            Bytes::from(neighbour_solicitation(GW, Ipv6Addr::UNSPECIFIED, b6, None)),
        );
        assert!(
            !out.iter().any(|a| matches!(a, Action::RouteOut { .. })),
            "{out:?}"
        );
    }

    #[test]
    fn remote_frames_split_horizon_and_relay() {
        let t = Instant::now();
        let mut s = switch("old");
        let r1 = HostId::new("r1");
        assert_eq!(
            drops(&s.handle_remote_frame(
                &HostId::new("stranger"),
                vni(),
                Delivery::Flood,
                0,
                data(MacAddr::BROADCAST, MacAddr([2, 0, 0, 0, 0, 9]), 1)
            )),
            vec![DropReason::UnknownRemote]
        );
        // A broadcast from a peer reaches local ports only.
        let out = s.handle_remote_frame(
            &r1,
            vni(),
            Delivery::Flood,
            0,
            data(MacAddr::BROADCAST, MacAddr([2, 0, 0, 0, 0, 9]), 1),
        );
        assert_eq!(delivered(&out), vec![PA, PB]);
        assert!(remote(&out).is_empty());
        // A moved to r2.
        s.handle_local_frame(t, PA, data(B, A, 0));
        s.handle_update(
            t,
            &HostId::new("peer"),
            &RegistryUpdate::Advertise(crate::registry::Advertisement {
                vni: vni(),
                mac: A,
                host: HostId::new("r2"),
                seq: 1,
                ips: vec![],
                sticky: false,
            }),
        );
        // A unicast copy from r1 (which is behind) is relayed to r2, once.
        let out = s.handle_remote_frame(
            &r1,
            vni(),
            Delivery::Unicast,
            0,
            data(A, MacAddr([2, 0, 0, 0, 0, 9]), 2),
        );
        assert_eq!(remote(&out), vec![("r2".into(), Delivery::Relayed)]);
        let out = s.handle_remote_frame(
            &r1,
            vni(),
            Delivery::Relayed,
            0,
            data(A, MacAddr([2, 0, 0, 0, 0, 9]), 3),
        );
        assert_eq!(drops(&out), vec![DropReason::MovedAway]);
        // A flood copy (r2 got its own) is not relayed, and nothing goes
        // back to the site it came from.
        let out = s.handle_remote_frame(
            &r1,
            vni(),
            Delivery::Flood,
            0,
            data(A, MacAddr([2, 0, 0, 0, 0, 9]), 4),
        );
        assert_eq!(drops(&out), vec![DropReason::MovedAway]);
        let out = s.handle_remote_frame(
            &HostId::new("r2"),
            vni(),
            Delivery::Unicast,
            0,
            data(A, MacAddr([2, 0, 0, 0, 0, 9]), 5),
        );
        assert_eq!(drops(&out), vec![DropReason::MovedAway]);
        assert_eq!(s.stats().relayed, 1);
    }

    #[test]
    fn remove_port_withdraws_only_what_is_still_here() {
        let t = Instant::now();
        let mut s = switch("h");
        s.handle_local_frame(t, PA, data(B, A, 0));
        let out = s.remove_port(PA).unwrap();
        assert!(matches!(&pushes(&out)[..], [RegistryUpdate::Withdraw { mac, .. }] if *mac == A));
        // B never spoke, so there is no location to withdraw.
        assert!(s.remove_port(PB).unwrap().is_empty());
        assert!(matches!(
            s.remove_port(PB),
            Err(SwitchError::UnknownPort(_))
        ));
        assert!(matches!(s.add_port(PA, cfg(A), PortState::Open), Ok(())));
        assert!(matches!(
            s.add_port(PA, cfg(A), PortState::Open),
            Err(SwitchError::DuplicatePort(_))
        ));
    }

    #[test]
    fn status_serialises() {
        let t = Instant::now();
        let mut s = switch("h");
        s.handle_local_frame(t, PA, data(B, A, 0));
        s.fence(PB).unwrap();
        let j = serde_json::to_value(s.status(t)).unwrap();
        assert_eq!(j["ports"][1]["state"], "fenced");
        assert_eq!(j["locations"][0]["seq"], 0);
        assert_eq!(j["locations"][0]["host"], "h");
        assert_eq!(j["stats"]["fences"], 1);
        assert_eq!(j["registry"]["entries"], 1);
    }
}
