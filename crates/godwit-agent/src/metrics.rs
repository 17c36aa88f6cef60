//! Agent metrics in the Prometheus text format.
//!
//! Plain atomic counters, rendered by hand: the set is small and fixed, and
//! this keeps a metrics registry crate out of the dependency tree.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counters the agent exports.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Outgoing migrations started.
    pub migrations_started: Counter,
    /// Outgoing migrations that completed.
    pub migrations_completed: Counter,
    /// Outgoing migrations that failed or stayed undecided.
    pub migrations_failed: Counter,
    /// Incoming migrations whose VM now runs here.
    pub incoming_completed: Counter,
    /// Migration stream bytes relayed out of this host.
    pub relay_tx_bytes: Counter,
    /// Migration stream bytes relayed into this host.
    pub relay_rx_bytes: Counter,
    /// API requests served.
    pub api_requests: Counter,
}

/// Gauges sampled at render time.
#[derive(Debug, Default)]
pub struct Gauges {
    /// VMs on this host by state.
    pub vms_by_state: Vec<(String, u64)>,
    /// Per peer: (name, connected, rtt seconds, bytes sent, bytes received, lost packets).
    pub peers: Vec<(String, bool, f64, u64, u64, u64)>,
}

impl Metrics {
    /// Renders all metrics.
    pub fn render(&self, agent: &str, g: &Gauges) -> String {
        let mut o = String::new();
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP godwit_{name} {help}\n# TYPE godwit_{name} counter\ngodwit_{name}{{agent=\"{agent}\"}} {v}");
        };
        counter(
            "migrations_started_total",
            "Outgoing migrations started.",
            self.migrations_started.get(),
        );
        counter(
            "migrations_completed_total",
            "Outgoing migrations completed.",
            self.migrations_completed.get(),
        );
        counter(
            "migrations_failed_total",
            "Outgoing migrations failed or undecided.",
            self.migrations_failed.get(),
        );
        counter(
            "incoming_completed_total",
            "Incoming migrations now running here.",
            self.incoming_completed.get(),
        );
        counter(
            "relay_tx_bytes_total",
            "Migration stream bytes relayed out.",
            self.relay_tx_bytes.get(),
        );
        counter(
            "relay_rx_bytes_total",
            "Migration stream bytes relayed in.",
            self.relay_rx_bytes.get(),
        );
        counter(
            "api_requests_total",
            "Local API requests served.",
            self.api_requests.get(),
        );
        let _ = writeln!(
            o,
            "# HELP godwit_vms VMs on this host by state.\n# TYPE godwit_vms gauge"
        );
        for (state, n) in &g.vms_by_state {
            let _ = writeln!(o, "godwit_vms{{agent=\"{agent}\",state=\"{state}\"}} {n}");
        }
        let _ = writeln!(o, "# HELP godwit_peer_up Whether a QUIC connection to the peer is up.\n# TYPE godwit_peer_up gauge");
        for (p, up, ..) in &g.peers {
            let _ = writeln!(
                o,
                "godwit_peer_up{{agent=\"{agent}\",peer=\"{p}\"}} {}",
                u8::from(*up)
            );
        }
        let _ = writeln!(o, "# HELP godwit_peer_rtt_seconds Smoothed RTT to the peer.\n# TYPE godwit_peer_rtt_seconds gauge");
        for (p, _, rtt, ..) in &g.peers {
            let _ = writeln!(
                o,
                "godwit_peer_rtt_seconds{{agent=\"{agent}\",peer=\"{p}\"}} {rtt}"
            );
        }
        let _ = writeln!(o, "# HELP godwit_peer_tx_bytes Bytes sent on the peer connection.\n# TYPE godwit_peer_tx_bytes counter");
        for (p, _, _, tx, ..) in &g.peers {
            let _ = writeln!(
                o,
                "godwit_peer_tx_bytes{{agent=\"{agent}\",peer=\"{p}\"}} {tx}"
            );
        }
        let _ = writeln!(o, "# HELP godwit_peer_rx_bytes Bytes received on the peer connection.\n# TYPE godwit_peer_rx_bytes counter");
        for (p, _, _, _, rx, _) in &g.peers {
            let _ = writeln!(
                o,
                "godwit_peer_rx_bytes{{agent=\"{agent}\",peer=\"{p}\"}} {rx}"
            );
        }
        let _ = writeln!(o, "# HELP godwit_peer_lost_packets Packets lost on the peer connection.\n# TYPE godwit_peer_lost_packets counter");
        for (p, _, _, _, _, lost) in &g.peers {
            let _ = writeln!(
                o,
                "godwit_peer_lost_packets{{agent=\"{agent}\",peer=\"{p}\"}} {lost}"
            );
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.migrations_started.inc();
        m.relay_tx_bytes.add(42);
        let g = Gauges {
            vms_by_state: vec![("running".into(), 2)],
            peers: vec![("b".into(), true, 0.26, 10, 20, 0)],
        };
        let t = m.render("a", &g);
        assert!(t.contains("godwit_migrations_started_total{agent=\"a\"} 1"));
        assert!(t.contains("godwit_relay_tx_bytes_total{agent=\"a\"} 42"));
        assert!(t.contains("godwit_vms{agent=\"a\",state=\"running\"} 2"));
        assert!(t.contains("godwit_peer_rtt_seconds{agent=\"a\",peer=\"b\"} 0.26"));
        for line in t.lines().filter(|l| !l.starts_with('#')) {
            let mut parts = line.rsplitn(2, ' ');
            let v = parts.next().unwrap();
            assert!(v.parse::<f64>().is_ok(), "bad sample line {line}");
        }
    }
}
