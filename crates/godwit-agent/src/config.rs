//! Agent configuration: the TOML file, its defaults, and host initialisation.
//!
//! Sources, in order: command-line flags (handled by the binary), the TOML
//! file (`--config` or `GODWIT_CONFIG`), then the defaults below. The raw
//! [`AgentConfig`] is what the file holds; [`AgentConfig::validate`] turns
//! it into checked values at start-up so that a typo fails loudly instead
//! of at the first migration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default location of the configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/godwit/agent.toml";
/// Default unix socket of the agent's API.
pub const DEFAULT_API_SOCKET: &str = "/run/godwit/agent.sock";
/// Default UDP port of the agent-to-agent QUIC endpoint.
pub const DEFAULT_PEER_PORT: u16 = 7480;
/// Default TCP address for Prometheus scraping.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9480";

/// Errors loading or writing configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or written.
    #[error("cannot access configuration file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid configuration in {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// The host identity could not be created or loaded.
    #[error("host identity in {dir}")]
    Identity {
        /// Identity directory.
        dir: PathBuf,
        /// Cause.
        #[source]
        source: godwit_transport::IdentityError,
    },
}

/// The agent's configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This agent's name; peers pin its certificate under this name.
    pub name: String,
    /// The site this host belongs to (`godwit migrate VM --to SITE`).
    pub site: String,
    /// Persistent state: identity, VM records.
    pub state_dir: PathBuf,
    /// Runtime files: sockets, QEMU logs.
    pub run_dir: PathBuf,
    /// Unix socket of the local API.
    #[serde(default = "default_api_socket")]
    pub api_socket: PathBuf,
    /// UDP address of the QUIC endpoint.
    pub listen: SocketAddr,
    /// TCP address serving Prometheus `/metrics` (also served on the API
    /// socket). Defaults to loopback.
    #[serde(default = "default_metrics")]
    pub metrics_listen: Option<SocketAddr>,
    /// Hypervisor settings.
    #[serde(default)]
    pub qemu: QemuSection,
    /// Migration defaults.
    #[serde(default)]
    pub migration: MigrationSection,
    /// Transport tuning.
    #[serde(default)]
    pub transport: TransportSection,
    /// The site's page store.
    #[serde(default)]
    pub store: StoreSection,
    /// The guest network (overlay switch).
    #[serde(default)]
    pub network: NetworkSection,
    /// Trusted peer agents.
    #[serde(default)]
    pub peers: Vec<PeerEntry>,
}

fn default_api_socket() -> PathBuf {
    PathBuf::from(DEFAULT_API_SOCKET)
}

fn default_metrics() -> Option<SocketAddr> {
    DEFAULT_METRICS_ADDR.parse().ok()
}

/// `[qemu]`: how VMs are launched on this host.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QemuSection {
    /// QEMU binary.
    pub binary: PathBuf,
    /// `tcg` or `kvm`.
    pub accel: godwit_qemu::Accel,
    /// Where guest RAM files live (tmpfs or hugetlbfs; never memfd).
    pub ram_dir: PathBuf,
}

impl Default for QemuSection {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("qemu-system-x86_64"),
            accel: godwit_qemu::Accel::Kvm,
            ram_dir: PathBuf::from("/dev/shm/godwit"),
        }
    }
}

/// Lowest `[migration] stall_ratio`: below half the bandwidth a migration
/// converges in a few passes, so calling it stalled would throttle guests
/// that need no help.
pub const STALL_RATIO_MIN: f64 = 0.5;
/// Highest `[migration] stall_ratio`: beyond 1 the guest dirties faster
/// than the stream drains, where QEMU's own trigger already fires.
pub const STALL_RATIO_MAX: f64 = 1.0;
/// Largest `[migration] device_state_allowance_ms`: the device state is a
/// few hundred KiB; more than this is a typo that would pin QEMU's limit
/// to its floor.
pub const MAX_DEVICE_STATE_ALLOWANCE_MS: u64 = 10_000;

/// `[migration]`: defaults for migrations started on this host.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MigrationSection {
    /// QEMU's downtime limit, milliseconds.
    pub downtime_limit_ms: u64,
    /// Give up after this many seconds (`timeout_strategy = cancel`).
    pub timeout_s: u64,
    /// Let the agent throttle the guest's vCPUs (through QEMU's
    /// auto-converge) when the migration does not converge.
    pub auto_converge: bool,
    /// Dirty rate over effective bandwidth at or above which a dirty-page
    /// pass counts as not converging (two such passes engage throttling).
    pub stall_ratio: f64,
    /// Once throttling is engaged, QEMU steps the throttle up while the
    /// guest dirties more than this share of the stream, percent
    /// (QEMU's `throttle-trigger-threshold`).
    pub throttle_trigger_pct: u8,
    /// Throttle step, percent (QEMU's `cpu-throttle-increment`).
    pub throttle_increment_pct: u8,
    /// Time allowed for the device state to cross and load at the
    /// destination, ms; subtracted from `downtime_limit_ms`, with the WAN
    /// one-way delay, to get QEMU's own `downtime-limit`.
    pub device_state_allowance_ms: u64,
    /// How long the destination waits for the stream once prepared.
    pub incoming_timeout_s: u64,
    /// After a failure in the final phase, how long the source keeps asking
    /// the destination what happened before it leaves the VM paused for an
    /// operator.
    pub decision_timeout_s: u64,
    /// How the memory stream crosses the WAN: `pages` (the page-aware
    /// codec: dedup, deltas, compression; raw relaying when the peer lacks
    /// it or the stream is not understood) or `raw` (byte for byte).
    pub codec: MemoryCodecSetting,
}

/// `[migration] codec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MemoryCodecSetting {
    /// The page-aware codec.
    #[default]
    Pages,
    /// Byte-for-byte relaying.
    Raw,
}

impl Default for MigrationSection {
    fn default() -> Self {
        Self {
            downtime_limit_ms: 300,
            timeout_s: 600,
            auto_converge: true,
            stall_ratio: 0.9,
            throttle_trigger_pct: 50,
            throttle_increment_pct: 10,
            device_state_allowance_ms: 30,
            incoming_timeout_s: 60,
            decision_timeout_s: 120,
            codec: MemoryCodecSetting::Pages,
        }
    }
}

/// `[store]`: this host's share of the site's page store, which keeps
/// the pages of every migration into or out of this host so later ones
/// (another VM of the same image, the VM coming back) need not send them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// Keep a page store at all (off: every migration starts cold).
    pub enabled: bool,
    /// Where it lives; default `<state_dir>/store`.
    pub dir: Option<PathBuf>,
    /// Size bound between migrations, bytes.
    pub max_bytes: u64,
}

impl Default for StoreSection {
    fn default() -> Self {
        Self {
            enabled: true,
            dir: None,
            max_bytes: DEFAULT_STORE_BYTES,
        }
    }
}

/// `[network]`: the agent's virtual switch and the overlay between sites.
///
/// Every agent with the network enabled runs one switch; a VM NIC with a MAC
/// is attached to it on network `vni`, and every configured peer joins that
/// network (frames as QUIC datagrams, registry updates on a control stream).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSection {
    /// Run the switch (off: NICs are left unconnected).
    pub enabled: bool,
    /// The network (VXLAN network identifier, 24 bits) guest NICs join.
    pub vni: u32,
    /// Addresses of the distributed gateway, `ADDR/PREFIX` (a bare
    /// address is a host prefix), answered with the same MAC at every
    /// site. Empty: no gateway.
    pub gateway_ips: Vec<GatewayAddr>,
    /// The gateway's MAC; default [`DEFAULT_GATEWAY_MAC`].
    pub gateway_mac: Option<godwit_overlay::MacAddr>,
    /// Route guest traffic out of the overlay through this host: the
    /// agent creates `router_device`, a TAP device with the gateway's MAC
    /// and addresses, and the host kernel forwards (it needs
    /// `net.ipv4.ip_forward=1`). Off: the gateway only answers ARP/ND.
    /// Unused without `gateway_ips`.
    pub router: bool,
    /// The router's device name; default [`DEFAULT_ROUTER_DEVICE`].
    pub router_device: String,
    /// Answer guests' ARP requests and neighbour solicitations for
    /// addresses the location registry knows, on this host, instead of
    /// flooding them to every site (EVPN's ARP suppression): a guest's
    /// first packet to a peer at another site does not wait a WAN round
    /// trip for resolution.
    pub arp_suppression: bool,
    /// Hosts that run no agent but a Linux `vxlan` device: frames to and
    /// from them travel as plain VXLAN (RFC 7348, UDP, neither encrypted
    /// nor authenticated beyond the source address), and their guests'
    /// locations are learned from the frames they send.
    pub vxlan_peers: Vec<VxlanPeer>,
    /// Where VXLAN from `vxlan_peers` is received; default
    /// `0.0.0.0:4789`. Unused without VXLAN peers.
    pub vxlan_listen: Option<std::net::SocketAddr>,
}

/// A VXLAN-only peer (`[[network.vxlan_peers]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VxlanPeer {
    /// Name in the location registry and in status.
    pub name: String,
    /// Its VTEP: the address its `vxlan` device sends from and receives
    /// on (usually port 4789).
    pub address: std::net::SocketAddr,
}

/// The gateway MAC when `[network] gateway_mac` is not set: locally
/// administered (bit 1 of the first byte) and unicast, so it never collides
/// with a vendor MAC, and the same at every site by construction.
pub const DEFAULT_GATEWAY_MAC: godwit_overlay::MacAddr =
    godwit_overlay::MacAddr([0x02, 0x67, 0x64, 0x77, 0x00, 0x01]);

/// The gateway router's TAP device unless `[network] router_device` says
/// otherwise.
pub const DEFAULT_ROUTER_DEVICE: &str = "godwit-gw0";

/// A distributed gateway address with the prefix length of the subnet it
/// serves (`[network] gateway_ips` entries, written `ADDR/PREFIX`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct GatewayAddr {
    /// The address.
    pub addr: std::net::IpAddr,
    /// Prefix length of the guest subnet.
    pub prefix: u8,
}

impl std::str::FromStr for GatewayAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = a
            .parse()
            .map_err(|_| format!("gateway address {s:?}: expected ADDR/PREFIX"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("gateway address {s:?}: prefix must be 0 to {max}")),
            },
        };
        Ok(GatewayAddr { addr, prefix })
    }
}

impl TryFrom<String> for GatewayAddr {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<GatewayAddr> for String {
    fn from(g: GatewayAddr) -> String {
        g.to_string()
    }
}

impl std::fmt::Display for GatewayAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The network guest NICs join unless `[network] vni` says otherwise.
pub const DEFAULT_VNI: u32 = 1;

/// The VXLAN UDP port (RFC 7348), for `[network] vxlan_listen` and
/// `vxlan_peers`.
pub const VXLAN_PORT: u16 = godwit_overlay::VXLAN_UDP_PORT;

impl Default for NetworkSection {
    fn default() -> Self {
        Self {
            enabled: true,
            vni: DEFAULT_VNI,
            gateway_ips: Vec::new(),
            gateway_mac: None,
            router: true,
            router_device: DEFAULT_ROUTER_DEVICE.to_owned(),
            arp_suppression: true,
            vxlan_peers: Vec::new(),
            vxlan_listen: None,
        }
    }
}

impl NetworkSection {
    /// The network as a [`godwit_overlay::Vni`].
    pub fn vni(&self) -> Result<godwit_overlay::Vni, ConfigError> {
        godwit_overlay::Vni::new(self.vni).map_err(|_| {
            ConfigError::Invalid(format!("network.vni {} does not fit in 24 bits", self.vni))
        })
    }

    /// The distributed gateway, if addresses are configured.
    pub fn gateway(&self) -> Option<godwit_overlay::GatewayConfig> {
        if self.gateway_ips.is_empty() {
            return None;
        }
        let mut gw = godwit_overlay::GatewayConfig {
            mac: self.gateway_mac.unwrap_or(DEFAULT_GATEWAY_MAC),
            ..Default::default()
        };
        for g in &self.gateway_ips {
            match &g.addr {
                std::net::IpAddr::V4(a) => gw.ipv4.push(*a),
                std::net::IpAddr::V6(a) => gw.ipv6.push(*a),
            }
        }
        Some(gw)
    }
}

/// Default bound of the page store: 8 GiB.
pub const DEFAULT_STORE_BYTES: u64 = 8 << 30;

/// `[transport]`: QUIC tuning.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportSection {
    /// Largest bandwidth-delay product to size windows for, bytes.
    pub max_bdp_bytes: u64,
    /// A peer silent for this long is considered gone, seconds.
    pub idle_timeout_s: u64,
    /// Congestion controller: `lfn` (default, loss-tolerant), `cubic`,
    /// `bbr` (capped), `bbr-uncapped`, `new-reno`.
    pub congestion: godwit_transport::Congestion,
}

impl Default for TransportSection {
    fn default() -> Self {
        Self {
            // 1 Gbit/s × 600 ms.
            max_bdp_bytes: 75_000_000,
            idle_timeout_s: 10,
            congestion: default_congestion(),
        }
    }
}

/// The default controller, overridable with `GODWIT_CONGESTION` (for
/// experiments without rewriting configs).
fn default_congestion() -> godwit_transport::Congestion {
    std::env::var("GODWIT_CONGESTION")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_default()
}

/// `[[peers]]`: a trusted agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerEntry {
    /// The peer's agent name.
    pub name: String,
    /// The peer's site.
    pub site: String,
    /// Its QUIC address.
    pub addr: SocketAddr,
    /// SHA-256 fingerprint of its certificate.
    pub fingerprint: String,
}

impl AgentConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        let cfg: AgentConfig = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Writes the configuration file (atomically).
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let io = |source| ConfigError::Io {
            path: path.to_owned(),
            source,
        };
        let text = toml::to_string_pretty(self)
            .map_err(|e| ConfigError::Invalid(format!("cannot serialise: {e}")))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = path.with_extension("toml.tmp");
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Checks values that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let valid_name = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        if !valid_name(&self.name) {
            return Err(ConfigError::Invalid(format!(
                "agent name {:?} must be 1-63 characters of [A-Za-z0-9_-]",
                self.name
            )));
        }
        if !valid_name(&self.site) {
            return Err(ConfigError::Invalid(format!(
                "site {:?} must be 1-63 characters of [A-Za-z0-9_-]",
                self.site
            )));
        }
        for p in &self.peers {
            if p.name == self.name {
                return Err(ConfigError::Invalid(format!(
                    "peer {:?} has this agent's own name",
                    p.name
                )));
            }
            p.fingerprint
                .parse::<godwit_transport::Fingerprint>()
                .map_err(|_| {
                    ConfigError::Invalid(format!(
                        "peer {:?}: fingerprint {:?} is not 64 hex digits",
                        p.name, p.fingerprint
                    ))
                })?;
        }
        self.network.vni()?;
        let dev = &self.network.router_device;
        if dev.is_empty() || dev.len() >= godwit_tun::IFNAMSIZ || dev.contains(['/', ' ']) {
            return Err(ConfigError::Invalid(format!(
                "network.router_device {dev:?} is not an interface name (1 to {} bytes)",
                godwit_tun::IFNAMSIZ - 1
            )));
        }
        let mut vxlan_names = std::collections::HashSet::new();
        for p in &self.network.vxlan_peers {
            if p.name.is_empty()
                || p.name == self.name
                || self.peers.iter().any(|a| a.name == p.name)
                || !vxlan_names.insert(p.name.as_str())
            {
                return Err(ConfigError::Invalid(format!(
                    "network.vxlan_peers: name {:?} is empty or already taken",
                    p.name
                )));
            }
        }
        if self.migration.downtime_limit_ms == 0 || self.migration.downtime_limit_ms > 2_000_000 {
            return Err(ConfigError::Invalid(
                "migration.downtime_limit_ms must be 1..=2000000".into(),
            ));
        }
        let m = &self.migration;
        if !(STALL_RATIO_MIN..=STALL_RATIO_MAX).contains(&m.stall_ratio) {
            return Err(ConfigError::Invalid(format!(
                "migration.stall_ratio must be {STALL_RATIO_MIN}..={STALL_RATIO_MAX}"
            )));
        }
        if !(1..=100).contains(&m.throttle_trigger_pct) {
            return Err(ConfigError::Invalid(
                "migration.throttle_trigger_pct must be 1..=100".into(),
            ));
        }
        if !(1..=100).contains(&m.throttle_increment_pct) {
            return Err(ConfigError::Invalid(
                "migration.throttle_increment_pct must be 1..=100".into(),
            ));
        }
        if m.device_state_allowance_ms > MAX_DEVICE_STATE_ALLOWANCE_MS {
            return Err(ConfigError::Invalid(format!(
                "migration.device_state_allowance_ms must be at most {MAX_DEVICE_STATE_ALLOWANCE_MS}"
            )));
        }
        Ok(())
    }

    /// Directory holding this host's key and certificate.
    pub fn identity_dir(&self) -> PathBuf {
        self.state_dir.join("identity")
    }

    /// Migration timeout.
    pub fn migration_timeout(&self) -> Duration {
        Duration::from_secs(self.migration.timeout_s)
    }
}

/// What `godwit agent init` needs to know.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Agent name (default: the host name).
    pub name: String,
    /// Site name.
    pub site: String,
    /// State directory.
    pub state_dir: PathBuf,
    /// Runtime directory.
    pub run_dir: PathBuf,
    /// API socket.
    pub api_socket: PathBuf,
    /// QUIC listen address.
    pub listen: SocketAddr,
    /// Metrics address.
    pub metrics_listen: Option<SocketAddr>,
    /// Accelerator.
    pub accel: godwit_qemu::Accel,
    /// Where to write the configuration.
    pub config_path: PathBuf,
    /// Replace an existing identity and configuration.
    pub force: bool,
}

/// Result of `godwit agent init`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitReport {
    /// Configuration file written.
    pub config: PathBuf,
    /// Agent name.
    pub name: String,
    /// Site.
    pub site: String,
    /// QUIC address.
    pub listen: SocketAddr,
    /// Certificate fingerprint peers must pin.
    pub fingerprint: String,
    /// Whether a new identity was generated (false: an existing one was kept).
    pub generated: bool,
}

/// Creates the host identity (unless one exists) and writes the configuration.
pub fn init(opts: &InitOptions) -> Result<InitReport, ConfigError> {
    if opts.config_path.exists() && !opts.force {
        return Err(ConfigError::Invalid(format!(
            "{} already exists (use --force to overwrite)",
            opts.config_path.display()
        )));
    }
    let cfg = AgentConfig {
        name: opts.name.clone(),
        site: opts.site.clone(),
        state_dir: opts.state_dir.clone(),
        run_dir: opts.run_dir.clone(),
        api_socket: opts.api_socket.clone(),
        listen: opts.listen,
        metrics_listen: opts.metrics_listen,
        qemu: QemuSection {
            accel: opts.accel,
            ..QemuSection::default()
        },
        migration: MigrationSection::default(),
        transport: TransportSection::default(),
        store: StoreSection::default(),
        network: NetworkSection::default(),
        peers: Vec::new(),
    };
    cfg.validate()?;
    let dir = cfg.identity_dir();
    let id_err = |source| ConfigError::Identity {
        dir: dir.clone(),
        source,
    };
    let (identity, generated) = match godwit_transport::Identity::load(&dir) {
        Ok(id) if !opts.force => (id, false),
        _ => {
            let id = godwit_transport::Identity::generate(&opts.name).map_err(id_err)?;
            id.save(&dir).map_err(id_err)?;
            (id, true)
        }
    };
    cfg.save(&opts.config_path)?;
    Ok(InitReport {
        config: opts.config_path.clone(),
        name: cfg.name,
        site: cfg.site,
        listen: cfg.listen,
        fingerprint: identity.fingerprint().to_string(),
        generated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> AgentConfig {
        toml::from_str(
            r#"
            name = "a"
            site = "a"
            state_dir = "/var/lib/godwit"
            run_dir = "/run/godwit"
            listen = "10.77.1.1:7480"
            [qemu]
            accel = "tcg"
            [[peers]]
            name = "b"
            site = "b"
            addr = "10.77.2.1:7480"
            fingerprint = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
            "#,
        )
        .unwrap()
    }

    #[test]
    fn defaults_fill_in() {
        let c = sample();
        c.validate().unwrap();
        assert_eq!(c.migration.downtime_limit_ms, 300);
        assert_eq!(c.api_socket, PathBuf::from(DEFAULT_API_SOCKET));
        assert_eq!(c.qemu.accel, godwit_qemu::Accel::Tcg);
    }

    #[test]
    fn gateway_addresses_carry_their_prefix() {
        let n: NetworkSection =
            toml::from_str(r#"gateway_ips = ["10.99.0.1/24", "fd00::1/64", "192.0.2.1"]"#).unwrap();
        let p: Vec<String> = n.gateway_ips.iter().map(|g| g.to_string()).collect();
        assert_eq!(p, ["10.99.0.1/24", "fd00::1/64", "192.0.2.1/32"]);
        assert!(n.router && n.arp_suppression);
        assert_eq!(n.router_device, DEFAULT_ROUTER_DEVICE);
        let gw = n.gateway().unwrap();
        assert_eq!((gw.ipv4.len(), gw.ipv6.len()), (2, 1));
        for bad in ["10.99.0.1/33", "fd00::1/129", "10.99.0.1/", "gw/24"] {
            let r: Result<NetworkSection, _> = toml::from_str(&format!("gateway_ips = [{bad:?}]"));
            assert!(r.is_err(), "{bad}");
        }
        let mut c = sample();
        c.network.router_device = "a-name-too-long-x".into();
        assert!(c.validate().is_err());
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let r: Result<AgentConfig, _> = toml::from_str(
            "name='a'\nsite='a'\nstate_dir='/x'\nrun_dir='/y'\nlisten='1.2.3.4:1'\nlisten_port=3\n",
        );
        assert!(r.is_err());
    }

    #[test]
    fn bad_values_are_rejected() {
        let mut c = sample();
        c.peers[0].fingerprint = "zz".into();
        assert!(c.validate().is_err());
        let mut c = sample();
        c.name = "bad name".into();
        assert!(c.validate().is_err());
        let mut c = sample();
        c.peers[0].name = "a".into();
        assert!(c.validate().is_err());
        let mut c = sample();
        c.migration.stall_ratio = 1.5;
        assert!(c.validate().is_err());
        let mut c = sample();
        c.migration.throttle_trigger_pct = 0;
        assert!(c.validate().is_err());
        let mut c = sample();
        c.migration.throttle_increment_pct = 101;
        assert!(c.validate().is_err());
        let mut c = sample();
        c.migration.device_state_allowance_ms = 60_000;
        assert!(c.validate().is_err());
    }
}
