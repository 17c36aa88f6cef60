//! godwit's per-VM network overlay, free of I/O.
//!
//! A guest keeps its MAC, its IPs and its open connections wherever it runs:
//! every agent runs a virtual switch, the sites are joined by an L2 overlay,
//! and a location registry (EVPN MAC mobility, pushed by the owner rather
//! than learned from the data plane) says on which host each MAC lives. At
//! switchover the destination claims the MAC with a higher sequence number
//! and pushes it to every peer at once, the source's port is fenced, the
//! destination's port opens when the VM resumes and the agent announces the
//! guest's addresses. There is no home agent and no triangle routing; the
//! gateway is distributed (same IP and MAC at every site).
//!
//! The core is sans-IO: parsers, codecs and state machines that take bytes
//! and `now` and return actions. The [`shell`] (feature `tokio`, on by
//! default) runs the switch in a task with QEMU stream sockets, the VXLAN
//! UDP socket and a timer; the agent adds the QUIC-datagram transport and
//! the control channel that carries registry updates.
//!
//! # Layout
//! - [`frame`]: Ethernet/802.1Q views, ARP/RARP, IPv4/IPv6 sources,
//!   Neighbour Discovery; builders for gratuitous ARP, ARP replies and
//!   (unsolicited) Neighbour Advertisements.
//! - [`stream`]: QEMU `-netdev stream` framing (4-byte big-endian length).
//! - [`vxlan`]: RFC 7348 header and [`Vni`], the network identifier.
//! - [`datagram`]: the header of frames carried as QUIC datagrams between
//!   agents (VNI, delivery, ack).
//! - [`registry`]: the location registry, its update messages and the
//!   flapping (split-brain) detector.
//! - [`switch`]: the agent's L2 switch, the distributed gateway, the
//!   switchover API (`fence`, `claim`, `open`) and the announcer.
//! - [`dedup`]: why no frame is delivered twice across a switchover.
//! - [`shell`] (feature `tokio`): [`OverlaySwitch`], the driver task, its
//!   QEMU stream ports, the [`RemoteTransport`] trait and [`VxlanTransport`].
//! - [`router`] (feature `tokio`): [`router::TapRouter`], the host side of
//!   the distributed gateway (a TAP device into this host's kernel).
#![warn(missing_docs)]

pub mod datagram;
pub mod dedup;
pub mod frame;
pub mod registry;
#[cfg(feature = "tokio")]
pub mod router;
#[cfg(feature = "tokio")]
pub mod shell;
pub mod stream;
pub mod switch;
pub mod vxlan;

pub use frame::{EthernetFrame, FrameError, MacAddr};
pub use registry::{
    Advertisement, Applied, HostId, Location, Registry, RegistryError, RegistryUpdate,
};
#[cfg(feature = "tokio")]
pub use shell::{
    OverlayError, OverlayEvent, OverlayHandle, OverlayOutputs, OverlayStatus, OverlaySwitch,
    RemoteSink, RemoteTransport, RouteSink, RoutedFrame, ShellStats, VxlanConfig, VxlanReceiver,
    VxlanStats, VxlanTransport,
};
pub use stream::{StreamCodec, StreamDecoder, StreamError, MAX_STREAM_FRAME_LEN};
pub use switch::{
    Action, Announcer, Delivery, DropReason, GatewayConfig, PortConfig, PortId, PortState, Switch,
    SwitchError, SwitchStats, SwitchStatus, ANNOUNCE_SCHEDULE,
};
pub use vxlan::{Vni, VxlanError, VxlanPacket, VXLAN_UDP_PORT};
