//! Endpoint configuration and its translation into quinn's transport
//! parameters, sized for long fat pipes.
//!
//! This module owns the tuning decisions (why each window has its size) so
//! they live in one place next to the constants that document them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{congestion, IdleTimeout, MtuDiscoveryConfig, VarInt};

use crate::identity::Identity;
use crate::peers::PeerSet;

/// Default bandwidth-delay product the windows are sized for:
/// 1 Gbit/s × 600 ms (a worst-case intercontinental path) = 75 MB.
pub const DEFAULT_MAX_BDP_BYTES: u64 = 1_000_000_000 / 8 * 600 / 1000;
/// Default idle timeout: RFC 9308 § 3.2's 30 s. A cut link is declared dead
/// after this long without any packet from the peer.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default keep-alive: well under the idle timeout so a healthy but quiet
/// connection never times out, and frequent enough to keep NAT/firewall UDP
/// state alive (those commonly expire after 30 s).
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(5);
/// RTT assumed before the first sample: RFC 9002's 333 ms. Lower values make
/// handshakes on 300+ ms paths retransmit spuriously; it only matters until
/// the first ACK.
pub const INITIAL_RTT: Duration = Duration::from_millis(333);
/// QUIC's minimum MTU; every path must carry it, so start there and probe up.
pub const INITIAL_MTU: u16 = 1200;
/// Upper bound for path MTU discovery: a 1500-byte Ethernet path minus the
/// IPv6 (40) and UDP (8) headers. Probing above it only wastes probes.
pub const MTU_UPPER_BOUND: u16 = 1452;
/// Per-stream receive window over `max_bdp_bytes`, in halves (3 = 1.5 ×).
/// Credit returns to the sender only as the receiver reads, so one stream
/// needs more than one BDP of window to never stall, and a model-based
/// controller keeps up to 1.25 × BDP plus headroom in flight ([`crate::lfn`]).
pub const STREAM_WINDOW_HALVES: u64 = 3;
/// The connection-level receive window and the send buffer are this many
/// times the per-stream window, so one bulk stream filling the BDP cannot
/// starve control or on-demand streams of flow-control credit.
pub const CONNECTION_WINDOW_FACTOR: u64 = 2;
/// Incoming bidirectional streams a peer may have open at once. On-demand
/// storage reads may use one short stream each; memory is bounded by the
/// connection window, not by this count.
pub const MAX_CONCURRENT_BIDI_STREAMS: u32 = 1024;
/// Unreliable datagrams (guest frames) waiting for the congestion window,
/// bytes; past it quinn drops the oldest. quinn's 1 MiB default lost ~4 %
/// of a 50 Mbit/s guest stream on every cold path: the window starts at
/// 10 packets and doubles per round, so at 100 ms RTT it needs ~0.6 s to
/// reach the stream's rate, with ~3 MB offered meanwhile. This holds that
/// ramp without loss; the frames arrive late rather than not at all, and
/// the queue drains within a few rounds once the window has grown.
pub const DATAGRAM_SEND_BUFFER_BYTES: usize = 4 * 1024 * 1024;
/// Requested UDP socket buffer size (SO_RCVBUF/SO_SNDBUF). Bursts of a
/// 1 Gbit/s flow overflow the default ~200 KiB buffer between two reads of
/// the endpoint task; the kernel may cap it (net.core.rmem_max/wmem_max).
pub const UDP_SOCKET_BUFFER_BYTES: usize = 16 * 1024 * 1024;

/// Congestion controller selection.
///
/// Default is [`Congestion::Lfn`], godwit's own model-based controller
/// ([`crate::lfn`]). Loss-based controllers collapse on long paths with a
/// little random loss: at 520 ms RTT and 0.1 % loss CUBIC's Mathis limit is
/// below 1 Mbit/s. quinn's BBR is loss-tolerant but overshoots (4–6 × BDP
/// in flight) and stays in loss recovery whenever every round has a loss;
/// [`Congestion::Bbr`] caps its window ([`crate::congestion`]) but keeps the
/// rest. `Lfn` reaches ≥ 90 % of a 100 Mbit/s link at 0–300 ms one-way
/// delay with and without 0.1 % random loss (`godwit bench transport`,
/// figures in docs/benchmarks.md) and backs off only when a round loses
/// more than 2 %.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Congestion {
    /// godwit's loss-tolerant BBR-style controller ([`crate::lfn`]).
    #[default]
    Lfn,
    /// Loss-based CUBIC (RFC 9438), quinn's default; for comparison.
    Cubic,
    /// quinn's experimental BBR, window capped at 1.5 × measured BDP.
    Bbr,
    /// quinn's experimental BBR as is; for comparison.
    BbrUncapped,
    /// Loss-based NewReno (RFC 9002); for comparison.
    NewReno,
}

impl Congestion {
    /// Every controller, default first.
    pub const ALL: [Congestion; 5] = [
        Congestion::Lfn,
        Congestion::Cubic,
        Congestion::Bbr,
        Congestion::BbrUncapped,
        Congestion::NewReno,
    ];

    /// The name [`FromStr`](std::str::FromStr) and serde accept.
    pub const fn name(self) -> &'static str {
        match self {
            Congestion::Lfn => "lfn",
            Congestion::Cubic => "cubic",
            Congestion::Bbr => "bbr",
            Congestion::BbrUncapped => "bbr-uncapped",
            Congestion::NewReno => "new-reno",
        }
    }

    fn factory(self) -> Arc<dyn congestion::ControllerFactory + Send + Sync> {
        match self {
            Congestion::Lfn => Arc::new(crate::lfn::LfnConfig),
            Congestion::Cubic => Arc::new(congestion::CubicConfig::default()),
            Congestion::Bbr => Arc::new(crate::congestion::CappedBbrConfig::default()),
            Congestion::BbrUncapped => Arc::new(congestion::BbrConfig::default()),
            Congestion::NewReno => Arc::new(congestion::NewRenoConfig::default()),
        }
    }
}

impl std::fmt::Display for Congestion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Congestion {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "lfn" => Ok(Congestion::Lfn),
            "cubic" => Ok(Congestion::Cubic),
            "bbr" => Ok(Congestion::Bbr),
            "bbr-uncapped" | "bbr_uncapped" => Ok(Congestion::BbrUncapped),
            "newreno" | "new-reno" | "new_reno" => Ok(Congestion::NewReno),
            _ => Err(ConfigError::UnknownCongestion(s.to_owned())),
        }
    }
}

/// Invalid transport settings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `max_bdp_bytes` was zero.
    #[error("max_bdp_bytes must be positive")]
    ZeroBdp,
    /// The idle timeout does not fit QUIC's transport parameter.
    #[error("idle timeout {0:?} is out of range")]
    IdleTimeout(Duration),
    /// The keep-alive must fire before the idle timeout or it is useless.
    #[error("keep-alive {keep_alive:?} must be shorter than the idle timeout {idle_timeout:?}")]
    KeepAlive {
        /// Configured keep-alive.
        keep_alive: Duration,
        /// Configured idle timeout.
        idle_timeout: Duration,
    },
    /// A congestion controller name that is not lfn, cubic, bbr,
    /// bbr-uncapped or new-reno.
    #[error(
        "unknown congestion controller {0:?} (expected lfn, cubic, bbr, bbr-uncapped or new-reno)"
    )]
    UnknownCongestion(String),
}

/// Everything an endpoint needs.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// UDP address to bind (port 0 picks one).
    pub listen: SocketAddr,
    /// This agent's certificate and key.
    pub identity: Identity,
    /// Trusted peers; shared, so updates apply at runtime.
    pub peers: PeerSet,
    /// Largest bandwidth-delay product to fill with one stream; flow-control
    /// windows are sized from it. Default [`DEFAULT_MAX_BDP_BYTES`].
    pub max_bdp_bytes: u64,
    /// Connection is dropped after this long without hearing from the peer.
    pub idle_timeout: Duration,
    /// Interval of keep-alive pings on an otherwise idle connection.
    pub keep_alive: Duration,
    /// Congestion controller.
    pub congestion: Congestion,
}

impl TransportConfig {
    /// A config with the defaults documented on each field.
    pub fn new(listen: SocketAddr, identity: Identity, peers: PeerSet) -> TransportConfig {
        TransportConfig {
            listen,
            identity,
            peers,
            max_bdp_bytes: DEFAULT_MAX_BDP_BYTES,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            keep_alive: DEFAULT_KEEP_ALIVE,
            congestion: Congestion::default(),
        }
    }

    /// Per-stream receive window: [`STREAM_WINDOW_HALVES`] / 2 × `max_bdp_bytes`.
    pub fn stream_window(&self) -> u64 {
        self.max_bdp_bytes.saturating_mul(STREAM_WINDOW_HALVES) / 2
    }

    /// Connection receive window and send buffer:
    /// [`CONNECTION_WINDOW_FACTOR`] × the stream window.
    pub fn connection_window(&self) -> u64 {
        self.stream_window()
            .saturating_mul(CONNECTION_WINDOW_FACTOR)
    }

    /// quinn transport parameters for these settings (shared by both the
    /// server and the client side of every connection).
    pub fn quic_transport(&self) -> Result<quinn::TransportConfig, ConfigError> {
        if self.max_bdp_bytes == 0 {
            return Err(ConfigError::ZeroBdp);
        }
        if self.keep_alive >= self.idle_timeout {
            return Err(ConfigError::KeepAlive {
                keep_alive: self.keep_alive,
                idle_timeout: self.idle_timeout,
            });
        }
        let idle = IdleTimeout::try_from(self.idle_timeout)
            .map_err(|_| ConfigError::IdleTimeout(self.idle_timeout))?;
        // VarInt tops out at 2^62-1 bytes, far beyond any real BDP; clamp
        // rather than fail.
        let varint = |v: u64| VarInt::from_u64(v).unwrap_or(VarInt::MAX);
        let stream_window = self.stream_window();
        let conn_window = self.connection_window();

        let mut mtu = MtuDiscoveryConfig::default();
        mtu.upper_bound(MTU_UPPER_BOUND);

        let mut t = quinn::TransportConfig::default();
        t.stream_receive_window(varint(stream_window))
            .receive_window(varint(conn_window))
            .send_window(conn_window)
            .max_concurrent_bidi_streams(VarInt::from_u32(MAX_CONCURRENT_BIDI_STREAMS))
            .datagram_send_buffer_size(DATAGRAM_SEND_BUFFER_BYTES)
            .initial_rtt(INITIAL_RTT)
            .initial_mtu(INITIAL_MTU)
            .min_mtu(INITIAL_MTU)
            .mtu_discovery_config(Some(mtu))
            .keep_alive_interval(Some(self.keep_alive))
            .max_idle_timeout(Some(idle))
            .congestion_controller_factory(self.congestion.factory());
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> TransportConfig {
        TransportConfig::new(
            "127.0.0.1:0".parse().expect("addr"),
            Identity::generate("t").expect("generate"),
            PeerSet::new(),
        )
    }

    #[test]
    fn default_bdp_is_one_gigabit_times_600ms() {
        assert_eq!(DEFAULT_MAX_BDP_BYTES, 75_000_000);
        assert!(cfg().quic_transport().is_ok());
    }

    #[test]
    fn windows_cover_one_and_a_half_bdp() {
        let c = cfg();
        // 100 Mbit/s × 600 ms RTT and 1 Gbit/s × 600 ms RTT.
        for bdp in [100_000_000 / 8 * 6 / 10, 1_000_000_000u64 / 8 * 6 / 10] {
            assert!(c.stream_window() >= bdp * 3 / 2, "{bdp}");
        }
        assert!(c.connection_window() >= 2 * c.stream_window());
    }

    #[test]
    fn invalid_settings_are_rejected() {
        let mut c = cfg();
        c.max_bdp_bytes = 0;
        assert_eq!(c.quic_transport().err(), Some(ConfigError::ZeroBdp));
        let mut c = cfg();
        c.keep_alive = c.idle_timeout;
        assert!(matches!(
            c.quic_transport(),
            Err(ConfigError::KeepAlive { .. })
        ));
        let mut c = cfg();
        c.max_bdp_bytes = u64::MAX; // clamps to VarInt::MAX instead of failing
        assert!(c.quic_transport().is_ok());
    }

    #[test]
    fn congestion_parses_and_deserializes() {
        assert_eq!(Congestion::default(), Congestion::Lfn);
        for c in Congestion::ALL {
            assert_eq!(c.name().parse::<Congestion>(), Ok(c));
            let json = serde_json::to_string(&c).expect("ser");
            assert_eq!(json, format!("\"{c}\""));
        }
        assert_eq!("BBR".parse::<Congestion>(), Ok(Congestion::Bbr));
        assert_eq!("new-reno".parse::<Congestion>(), Ok(Congestion::NewReno));
        assert!("vegas".parse::<Congestion>().is_err());
        let c: Congestion = serde_json::from_str("\"cubic\"").expect("de");
        assert_eq!(c, Congestion::Cubic);
        let c: Congestion = serde_json::from_str("\"new-reno\"").expect("de");
        assert_eq!(c, Congestion::NewReno);
    }
}
