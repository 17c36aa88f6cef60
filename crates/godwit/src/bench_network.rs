//! `godwit bench network --json`: seed 002's experiment on the overlay. A
//! guest ("mover", lab site `a`) sends a sequence-numbered UDP stream to a
//! guest at a third site ("peer", site `c`), which also holds a TCP echo
//! connection to the mover; the mover migrates a→b and back, `moves` times
//! in all, at the lab's one-way delay. One row per stream rate.
//!
//! Each move is measured on its own: the peer starts a UDP receiver and a
//! TCP echo client whose window spans the migration (a couple of seconds
//! either side), so the receiver's longest inter-arrival gap is the move's
//! interruption, and it is set against QEMU's own downtime for that move.
//! The mover's sender runs for the whole row, so the stream never pauses
//! between moves.
//!
//! One more row (at the first rate) puts the receiver behind a Linux
//! kernel `vxlan` device instead of an agent: site `c` runs no agent, and
//! the peer's probes run on the host in `c`'s namespace, on the device's
//! address.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use godwit_agent::client::ApiClient;
use serde_json::{json, Value};

use crate::bench::median;
use crate::cmd::vm::{guest_call, guest_until_done};
use crate::labenv;
use crate::output::Out;
use crate::scenario;

/// Stream rates of the rows, kbit/s: seed 002's 520 kbit/s, and 50 Mbit/s.
pub const DEFAULT_RATES_KBIT: [u64; 2] = [520, 50_000];
/// Moves per row (a→b and b→a alternately).
pub const DEFAULT_MOVES: usize = 10;
/// One-way delay, ms, as in the issue.
pub const DEFAULT_DELAY_MS: u64 = 50;
/// Guest RAM, MiB.
const RAM_MIB: u64 = 256;
/// The guests' addresses on the overlay.
const MOVER_IP: &str = "10.99.0.1";
/// See [`MOVER_IP`].
const PEER_IP: &str = "10.99.0.3";
/// Overlay prefix length.
const PREFIX: u8 = 24;
/// UDP port of the receiver.
const UDP_PORT: u16 = 5000;
/// TCP port of the mover's echo server.
const TCP_PORT: u16 = 7000;
/// UDP payload per datagram, bytes: a frame that fits one QUIC datagram
/// even before path MTU discovery, so the figures measure moves, not
/// splitting (bigger frames are split, see `godwit_overlay::datagram`).
const PAYLOAD: u32 = 1000;
/// How long the sender runs at most, s (the row ends it sooner by tearing
/// the lab down).
const SENDER_S: u64 = 3600;
/// Stream time before each migration starts and after it ends.
const MARGIN: Duration = Duration::from_secs(2);
/// Receiver window of the first move, before any migration time is known.
const FIRST_WINDOW: Duration = Duration::from_secs(40);
/// Interval between TCP echo messages, ms.
const TCP_INTERVAL_MS: u64 = 20;
/// Cap per migration, s.
const MIGRATION_CAP_S: u64 = 600;

/// What to run.
pub struct NetworkSuite {
    /// Stream rates, kbit/s.
    pub rates_kbit: Vec<u64>,
    /// Moves per row.
    pub moves: usize,
    /// One-way delay, ms.
    pub delay_ms: u64,
    /// Link rate, bits/s.
    pub rate_bps: u64,
    /// Add the row with the receiver behind a kernel `vxlan` device.
    pub kernel_row: bool,
}

/// Where the peer's probes run.
#[derive(Clone)]
enum Peer {
    /// A guest on site `c`, through its agent.
    Guest(ApiClient),
    /// The host in site `c`'s namespace, on the kernel `vxlan` device:
    /// the static guest tool run as a host program.
    Kernel {
        netns: String,
        tool: std::path::PathBuf,
    },
}

/// A probe of the peer.
enum Probe {
    /// Receive the mover's stream for `secs`.
    Udp { secs: u64 },
    /// Keep a TCP echo connection to the mover for `secs`.
    Tcp { secs: u64 },
}

impl Peer {
    /// Runs a probe to its final report.
    async fn run(&self, p: Probe) -> Result<Value> {
        match self {
            Peer::Guest(c) => {
                let (cmd, secs) = match p {
                    Probe::Udp { secs } => (
                        json!({"cmd": "udp_recv", "bind": format!("0.0.0.0:{UDP_PORT}"), "duration_s": secs}),
                        secs,
                    ),
                    Probe::Tcp { secs } => (
                        json!({"cmd": "tcp_echo_client", "dest": format!("{MOVER_IP}:{TCP_PORT}"),
                               "interval_ms": TCP_INTERVAL_MS, "duration_s": secs}),
                        secs,
                    ),
                };
                guest_until_done(c, "peer", cmd, Duration::from_secs(secs + 120)).await
            }
            Peer::Kernel { netns, tool } => {
                let args: Vec<String> = match p {
                    Probe::Udp { secs } => vec![
                        "udp-recv".into(),
                        "--bind".into(),
                        format!("{PEER_IP}:{UDP_PORT}"),
                        "--duration".into(),
                        secs.to_string(),
                    ],
                    Probe::Tcp { secs } => vec![
                        "tcp-echo-client".into(),
                        "--dest".into(),
                        format!("{MOVER_IP}:{TCP_PORT}"),
                        "--interval-ms".into(),
                        TCP_INTERVAL_MS.to_string(),
                        "--duration".into(),
                        secs.to_string(),
                    ],
                };
                let mut cmd = godwit_lab::netns::command_in(netns, tool);
                cmd.args(&args);
                let out = tokio::task::spawn_blocking(move || cmd.output())
                    .await
                    .context("probe task")?
                    .with_context(|| format!("running {} {args:?}", tool.display()))?;
                // The tool prints one report per line (a protocol frame:
                // a "GW1 " prefix, then JSON), the final one last.
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter_map(|l| serde_json::from_str::<Value>(&l[l.find('{')?..]).ok())
                    .rfind(|v| v["done"] == true)
                    .with_context(|| {
                        format!(
                            "no final report from {args:?}: {}",
                            String::from_utf8_lossy(&out.stderr).trim()
                        )
                    })
            }
        }
    }
}

/// Runs one fresh three-site lab per row.
pub async fn run(s: &NetworkSuite, out: Out) -> Result<Vec<Value>> {
    let mut cells: Vec<(u64, bool)> = s.rates_kbit.iter().map(|&r| (r, false)).collect();
    if let (true, Some(&r)) = (s.kernel_row, s.rates_kbit.first()) {
        cells.push((r, true));
    }
    let mut rows = Vec::new();
    for (rate, kernel) in cells {
        let spec = godwit_lab::LabSpec {
            sites: 3,
            delay: Duration::from_millis(s.delay_ms),
            rate_bps: s.rate_bps,
            ..godwit_lab::LabSpec::default()
        };
        let net = labenv::LabNetwork {
            kernel_vxlan: if kernel {
                vec!["c".to_owned()]
            } else {
                Vec::new()
            },
            ..Default::default()
        };
        let st = labenv::up_with(&spec, godwit_qemu::Accel::Tcg, &net).await?;
        let res = async {
            let peer = if kernel {
                let c = st
                    .sites
                    .iter()
                    .find(|x| x.name == "c")
                    .context("no site c")?;
                kernel_address(&c.netns)?;
                Peer::Kernel {
                    netns: c.netns.clone(),
                    tool: crate::guestimg::find_guest_bin(None)?,
                }
            } else {
                Peer::Guest(scenario::site("c"))
            };
            row(s, rate, &peer, out).await
        }
        .await;
        for vm in ["mover", "peer"] {
            scenario::stop_everywhere(&["a", "b", "c"], vm).await;
        }
        labenv::down()?;
        let mut r = res?;
        r["receiver"] = json!(if kernel { "kernel-vxlan" } else { "guest" });
        rows.push(r);
    }
    Ok(rows)
}

/// Puts the peer's address on site `c`'s kernel `vxlan` device.
fn kernel_address(netns: &str) -> Result<()> {
    let addr = format!("{PEER_IP}/{PREFIX}");
    let out = godwit_lab::netns::command_in(netns, "ip")
        .args(["addr", "add", &addr, "dev", labenv::KERNEL_VXLAN_DEV])
        .output()
        .context("running ip addr add")?;
    if !out.status.success() {
        bail!(
            "ip addr add {addr} dev {}: {}",
            labenv::KERNEL_VXLAN_DEV,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// One move's figures.
struct Move {
    value: Value,
    gap_ms: u64,
    downtime_ms: u64,
    migration: Duration,
}

async fn row(s: &NetworkSuite, rate_kbit: u64, peer: &Peer, out: Out) -> Result<Value> {
    out.note(format!(
        "network: {rate_kbit} kbit/s, {} moves at {} ms",
        s.moves, s.delay_ms
    ));
    scenario::boot_with_ip(
        &scenario::site("a"),
        "mover",
        RAM_MIB,
        Some(&format!("{MOVER_IP}/{PREFIX}")),
        out,
    )
    .await?;
    if let Peer::Guest(c) = peer {
        scenario::boot_with_ip(
            c,
            "peer",
            RAM_MIB,
            Some(&format!("{PEER_IP}/{PREFIX}")),
            out,
        )
        .await?;
    }
    let a = scenario::site("a");
    ack(
        &a,
        "mover",
        json!({"cmd": "tcp_echo_serve", "bind": format!("0.0.0.0:{TCP_PORT}")}),
    )
    .await?;
    let first = guest_call(
        &a,
        "mover",
        json!({"cmd": "udp_send", "dest": format!("{PEER_IP}:{UDP_PORT}"),
               "rate_kbit": rate_kbit, "payload": PAYLOAD, "duration_s": SENDER_S}),
        Duration::from_secs(60),
    )
    .await
    .context("starting the UDP sender")?;
    if first.get("report").and_then(Value::as_str) == Some("error") {
        bail!("the UDP sender failed: {first}");
    }
    let mut moves: Vec<Move> = Vec::new();
    let mut here = "a";
    for i in 0..s.moves {
        let there = if here == "a" { "b" } else { "a" };
        // Wide enough for the slowest migration so far, twice over.
        let window = moves
            .iter()
            .map(|m| m.migration)
            .max()
            .map_or(FIRST_WINDOW, |d| d * 2 + MARGIN * 2);
        let m = one_move(peer, here, there, window)
            .await
            .with_context(|| format!("move {} ({here} -> {there})", i + 1))?;
        out.note(format!(
            "  move {}: {here}->{there} gap {} ms, downtime {} ms",
            i + 1,
            m.gap_ms,
            m.downtime_ms
        ));
        moves.push(m);
        here = there;
    }
    let sum = |k: &str| -> u64 { moves.iter().map(|m| m.value[k].as_u64().unwrap_or(0)).sum() };
    let gaps: Vec<u64> = moves.iter().map(|m| m.gap_ms).collect();
    let over: Vec<i64> = moves
        .iter()
        .map(|m| m.gap_ms as i64 - m.downtime_ms as i64)
        .collect();
    Ok(json!({
        "rate_kbit": rate_kbit,
        "delay_ms": s.delay_ms,
        "migrations": moves.len(),
        "max_gap_ms": gaps.iter().max(),
        "median_gap_ms": median(&gaps),
        "downtime_ms": median(&moves.iter().map(|m| m.downtime_ms).collect::<Vec<_>>()),
        "median_gap_over_downtime_ms": median(&over),
        "lost": sum("lost"),
        "receiver_socket_drops": sum("receiver_socket_drops"),
        "duplicated": sum("duplicated"),
        "reordered": sum("reordered"),
        "received": sum("received"),
        "tcp_resets": sum("tcp_resets"),
        "tcp_survived": moves.iter().filter(|m| m.value["tcp_survived"] == true).count(),
        "moves": moves.into_iter().map(|m| m.value).collect::<Vec<_>>(),
    }))
}

/// One migration of the mover with the peer's probes around it.
async fn one_move(peer: &Peer, from: &str, to: &str, window: Duration) -> Result<Move> {
    let secs = window.as_secs().max(1);
    let probe = |p: Probe| {
        let peer = peer.clone();
        tokio::spawn(async move { peer.run(p).await })
    };
    let recv = probe(Probe::Udp { secs });
    let tcp = probe(Probe::Tcp {
        secs: secs.saturating_sub(1).max(1),
    });
    let t0 = Instant::now();
    tokio::time::sleep(MARGIN).await;
    let m = scenario::migrate(
        &scenario::site(from),
        "mover",
        to,
        false,
        MIGRATION_CAP_S,
        Out::QUIET,
    )
    .await?;
    let migration = t0.elapsed().saturating_sub(MARGIN);
    let report = m.report.as_ref().context("the migration has no report")?;
    if !report.success {
        bail!("the migration failed: {:?}", m.error);
    }
    let covered = t0.elapsed() + MARGIN <= window;
    let udp = recv.await.context("UDP receiver task")??;
    let tcp = tcp.await.context("TCP client task")??;
    let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    // The receiver joined a running stream: count from the first datagram
    // it saw, not from sequence number 0.
    let unique = n(&udp, "received").saturating_sub(n(&udp, "duplicates"));
    let lost = match (udp["min_seq"].as_u64(), udp["max_seq"].as_u64()) {
        (Some(lo), Some(hi)) => (hi - lo.min(hi) + 1).saturating_sub(unique),
        _ => 0,
    };
    if unique == 0 {
        bail!("the receiver saw no datagram from the mover: {udp}");
    }
    let gap_ms = n(&udp, "max_gap_ms");
    let downtime_ms = report.downtime_ms.unwrap_or(0);
    Ok(Move {
        value: json!({
            "from": from,
            "to": to,
            "gap_ms": gap_ms,
            "downtime_ms": downtime_ms,
            "migration_ms": report.total_ms,
            "received": n(&udp, "received"),
            "lost": lost,
            // Of `lost`: dropped by the receiving machine's own socket
            // buffer after the overlay had delivered them.
            "receiver_socket_drops": n(&udp, "socket_drops"),
            "duplicated": n(&udp, "duplicates"),
            "reordered": n(&udp, "reordered"),
            "tcp_connects": n(&tcp, "connects"),
            "tcp_resets": n(&tcp, "resets"),
            "tcp_max_stall_ms": n(&tcp, "max_stall_ms"),
            "tcp_survived": n(&tcp, "connects") == 1 && n(&tcp, "resets") == 0 && n(&tcp, "mismatches") == 0,
            // The migration ended inside the probes' window, so the gap
            // around its switchover was seen.
            "covered": covered,
        }),
        gap_ms,
        downtime_ms,
        migration,
    })
}

/// Sends a command that answers with an ack.
async fn ack(c: &ApiClient, vm: &str, cmd: Value) -> Result<()> {
    let r = guest_call(c, vm, cmd.clone(), Duration::from_secs(60)).await?;
    if r.get("report").and_then(Value::as_str) != Some("ack") {
        bail!("{vm} refused {cmd}: {r}");
    }
    Ok(())
}
