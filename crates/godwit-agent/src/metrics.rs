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
    /// Wire bytes of outgoing memory streams (after the codec).
    pub memory_wire_bytes: Counter,
    /// Guest RAM bytes that were not zero, over outgoing migrations.
    pub memory_nonzero_bytes: Counter,
    /// Pages of outgoing migrations by how they travelled, in the order
    /// of [`PAGE_KINDS`].
    pub memory_pages: [Counter; 7],
    /// Sender CPU of outgoing migrations, microseconds.
    pub sender_cpu_us: Counter,
}

/// Labels of [`Metrics::memory_pages`].
pub const PAGE_KINDS: [&str; 7] = [
    "zero", "intra", "store", "image", "disk", "delta", "literal",
];

impl Metrics {
    /// Adds an outgoing migration's figures.
    pub fn record_migration(&self, r: &crate::api::types::MigrationReport) {
        self.memory_wire_bytes.add(r.wire_bytes);
        if let Some(n) = r.nonzero_bytes {
            self.memory_nonzero_bytes.add(n);
        }
        if let Some(c) = &r.codec {
            let refs = [
                c.zero_pages,
                c.intra_pages,
                c.store_pages,
                c.image_pages,
                c.disk_pages,
                c.delta_pages,
                c.literal_pages,
            ];
            for (m, n) in self.memory_pages.iter().zip(refs) {
                m.add(n);
            }
        }
        if let Some(s) = r.sender_cpu_s {
            self.sender_cpu_us.add((s * 1e6) as u64);
        }
    }
}

/// Gauges sampled at render time.
#[derive(Debug, Default)]
pub struct Gauges {
    /// VMs on this host by state.
    pub vms_by_state: Vec<(String, u64)>,
    /// Per peer: (name, connected, rtt seconds, bytes sent, bytes received, lost packets).
    pub peers: Vec<(String, bool, f64, u64, u64, u64)>,
    /// The site store's figures, if there is one.
    pub store: Option<godwit_sitestore::StoreStats>,
    /// The guest network's figures, if it runs.
    pub network: Option<crate::network::NetworkStatus>,
}

/// Writes one metric family: HELP and TYPE, then one sample per label
/// set (`(label name, label value)` pairs after the agent label).
fn family<V: std::fmt::Display>(
    o: &mut String,
    agent: &str,
    name: &str,
    kind: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Vec<(&'static str, String)>, V)>,
) {
    let _ = writeln!(
        o,
        "# HELP godwit_{name} {help}\n# TYPE godwit_{name} {kind}"
    );
    for (labels, v) in samples {
        let mut l = format!("agent=\"{agent}\"");
        for (k, val) in labels {
            let _ = write!(l, ",{k}=\"{val}\"");
        }
        let _ = writeln!(o, "godwit_{name}{{{l}}} {v}");
    }
}

impl Metrics {
    /// Renders all metrics.
    pub fn render(&self, agent: &str, g: &Gauges) -> String {
        let mut o = String::new();
        let counters: [(&str, &str, &Counter); 9] = [
            (
                "migrations_started_total",
                "Outgoing migrations started.",
                &self.migrations_started,
            ),
            (
                "migrations_completed_total",
                "Outgoing migrations completed.",
                &self.migrations_completed,
            ),
            (
                "migrations_failed_total",
                "Outgoing migrations failed or undecided.",
                &self.migrations_failed,
            ),
            (
                "incoming_completed_total",
                "Incoming migrations now running here.",
                &self.incoming_completed,
            ),
            (
                "relay_tx_bytes_total",
                "Migration stream bytes relayed out.",
                &self.relay_tx_bytes,
            ),
            (
                "relay_rx_bytes_total",
                "Migration stream bytes relayed in.",
                &self.relay_rx_bytes,
            ),
            (
                "api_requests_total",
                "Local API requests served.",
                &self.api_requests,
            ),
            (
                "memory_wire_bytes_total",
                "Wire bytes of outgoing memory streams, after the page-aware codec.",
                &self.memory_wire_bytes,
            ),
            (
                "memory_nonzero_bytes_total",
                "Non-zero guest RAM bytes of outgoing migrations.",
                &self.memory_nonzero_bytes,
            ),
        ];
        for (name, help, c) in counters {
            family(&mut o, agent, name, "counter", help, [(vec![], c.get())]);
        }
        family(
            &mut o,
            agent,
            "memory_pages_total",
            "counter",
            "Pages of outgoing migrations by how they travelled.",
            PAGE_KINDS
                .iter()
                .zip(&self.memory_pages)
                .map(|(k, c)| (vec![("how", k.to_string())], c.get())),
        );
        family(
            &mut o,
            agent,
            "sender_cpu_seconds_total",
            "counter",
            "CPU the source spent on outgoing migrations (agent and QEMU's migration thread).",
            [(vec![], self.sender_cpu_us.get() as f64 / 1e6)],
        );
        if let Some(s) = &g.store {
            family(
                &mut o,
                agent,
                "store",
                "gauge",
                "Site page store figures (pages, bytes, disk_chunks; hits, misses, corrupt and evicted_pages count since start).",
                [
                    ("pages", s.pages),
                    ("bytes", s.bytes),
                    ("disk_chunks", s.disk_chunks),
                    ("hits", s.hits),
                    ("misses", s.misses),
                    ("corrupt", s.corrupt),
                    ("evicted_pages", s.evicted_pages),
                ]
                .map(|(k, v)| (vec![("figure", k.to_string())], v)),
            );
        }
        if let Some(n) = &g.network {
            let r = &n.overlay.switch.registry;
            family(
                &mut o,
                agent,
                "network_registry",
                "gauge",
                "Location registry (entries and frozen_now now; the rest count since start).",
                [
                    ("entries", r.entries),
                    ("moves", r.moves),
                    ("claims", r.claims),
                    ("updates_applied", r.updates_applied),
                    ("updates_ignored", r.updates_ignored),
                    ("rejected", r.rejected),
                    ("freezes", r.freezes),
                    ("frozen_now", r.frozen_now),
                ]
                .map(|(k, v)| (vec![("figure", k.to_string())], v)),
            );
            let sw = &n.overlay.switch.stats;
            family(
                &mut o,
                agent,
                "network_switch_total",
                "counter",
                "Guest switch events: switchover steps and frames.",
                [
                    ("fences", sw.fences),
                    ("claims", sw.claims),
                    ("opens", sw.opens),
                    ("announcements", sw.announcements),
                    ("rarp_seen", sw.rarp_seen),
                    ("delivered", sw.delivered),
                    ("sent_remote", sw.sent_remote),
                    ("flooded", sw.flooded),
                ]
                .map(|(k, v)| (vec![("event", k.to_string())], v)),
            );
            family(
                &mut o,
                agent,
                "network_location_seq",
                "gauge",
                "Mobility sequence number of each guest MAC, labelled with where it is.",
                n.overlay.switch.locations.iter().map(|e| {
                    (
                        vec![
                            ("mac", e.mac.to_string()),
                            ("host", e.location.host.to_string()),
                        ],
                        e.location.seq,
                    )
                }),
            );
            let d = &n.datagrams;
            family(
                &mut o,
                agent,
                "network_datagrams_total",
                "counter",
                "Guest frames as QUIC datagrams, and why some were dropped.",
                [
                    ("tx", d.tx),
                    ("tx_split", d.tx_split),
                    ("tx_too_big", d.tx_too_big),
                    ("tx_no_connection", d.tx_no_connection),
                    ("tx_errors", d.tx_errors),
                    ("rx", d.rx),
                    ("rx_malformed", d.rx_malformed),
                    ("rx_dropped", d.rx_dropped),
                    ("rx_reassembled", d.rx_reassembled),
                    ("rx_reassembly_failed", d.rx_reassembly_failed),
                ]
                .map(|(k, v)| (vec![("what", k.to_string())], v)),
            );
            if let Some(r) = &n.router {
                family(
                    &mut o,
                    agent,
                    "network_routed_total",
                    "counter",
                    "Frames through the distributed gateway's host side, and drops.",
                    [
                        ("to_host", r.to_host),
                        ("from_host", r.from_host),
                        ("other_network", r.other_network),
                        ("sink_full", r.sink_full),
                        ("write_errors", r.write_errors),
                    ]
                    .map(|(k, v)| (vec![("what", k.to_string())], v)),
                );
            }
        }
        family(
            &mut o,
            agent,
            "vms",
            "gauge",
            "VMs on this host by state.",
            g.vms_by_state
                .iter()
                .map(|(st, n)| (vec![("state", st.clone())], *n)),
        );
        let peer = |p: &String| vec![("peer", p.clone())];
        family(
            &mut o,
            agent,
            "peer_up",
            "gauge",
            "Whether a QUIC connection to the peer is up.",
            g.peers.iter().map(|(p, up, ..)| (peer(p), u8::from(*up))),
        );
        family(
            &mut o,
            agent,
            "peer_rtt_seconds",
            "gauge",
            "Smoothed RTT to the peer.",
            g.peers.iter().map(|(p, _, rtt, ..)| (peer(p), *rtt)),
        );
        family(
            &mut o,
            agent,
            "peer_tx_bytes",
            "counter",
            "Bytes sent on the peer connection.",
            g.peers.iter().map(|(p, _, _, tx, ..)| (peer(p), *tx)),
        );
        family(
            &mut o,
            agent,
            "peer_rx_bytes",
            "counter",
            "Bytes received on the peer connection.",
            g.peers.iter().map(|(p, _, _, _, rx, _)| (peer(p), *rx)),
        );
        family(
            &mut o,
            agent,
            "peer_lost_packets",
            "counter",
            "Packets lost on the peer connection.",
            g.peers.iter().map(|(p, _, _, _, _, lost)| (peer(p), *lost)),
        );
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
            store: Some(godwit_sitestore::StoreStats::default()),
            network: None,
        };
        m.memory_pages[2].add(7);
        let t = m.render("a", &g);
        assert!(t.contains("godwit_migrations_started_total{agent=\"a\"} 1"));
        assert!(t.contains("godwit_relay_tx_bytes_total{agent=\"a\"} 42"));
        assert!(t.contains("godwit_vms{agent=\"a\",state=\"running\"} 2"));
        assert!(t.contains("godwit_peer_rtt_seconds{agent=\"a\",peer=\"b\"} 0.26"));
        assert!(t.contains("godwit_memory_pages_total{agent=\"a\",how=\"store\"} 7"));
        assert!(t.contains("godwit_store{agent=\"a\",figure=\"pages\"} 0"));
        for line in t.lines().filter(|l| !l.starts_with('#')) {
            let mut parts = line.rsplitn(2, ' ');
            let v = parts.next().unwrap();
            assert!(v.parse::<f64>().is_ok(), "bad sample line {line}");
        }
    }
}
