//! `godwit bench transport`: bulk QUIC goodput between two lab sites over
//! `godwit-transport`, per congestion controller, one-way delay and random
//! loss.
//!
//! Each run is one connection carrying one stream of purpose `Memory` (the
//! relay's), written as fast as quinn accepts. Both endpoints run in this
//! process, each on its own thread with a current-thread tokio runtime that
//! has entered the site's network namespace ([`godwit_lab::netns::spawn_in`],
//! like [`godwit_lab::probe`]), so their UDP sockets live in the sites and
//! every packet crosses the WAN emulator. The receiver timestamps every
//! chunk; goodput is the payload that arrived within the measurement window,
//! which starts [`warmup`] after the first byte.

use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use godwit_lab::link::LinkParamsUpdate;
use godwit_lab::wan::WanClient;
use godwit_lab::{LabSpec, LabState, SiteInfo};
use godwit_transport::{
    Congestion, Identity, PeerSet, PeerStats, StreamPurpose, Transport, TransportConfig,
};
use serde_json::{json, Value};

use crate::labenv;
use crate::output::Out;

/// Default one-way delays, ms: the seed's 0/80/140/260 plus 300 (600 ms RTT).
const DEFAULT_DELAYS_MS: [u64; 5] = [0, 80, 140, 260, 300];
/// Default random loss rates, percent.
const DEFAULT_LOSS_PCT: [f64; 2] = [0.0, 0.1];
/// Shortest warm-up before measuring.
const MIN_WARMUP: Duration = Duration::from_secs(2);
/// Warm-up in round trips: startup needs ~log2(BDP / initial window) rounds
/// (9 at 100 Mbit/s × 520 ms) plus a few to settle.
const WARMUP_RTTS: u32 = 12;
/// Shortest measurement window.
const MIN_MEASURE: Duration = Duration::from_secs(20);
/// Measurement window in round trips, for the longest paths.
const MEASURE_RTTS: u32 = 40;
/// Size of one write of the sender.
const WRITE_CHUNK: usize = 1 << 20;
/// Time for the lab endpoints to bind, connect and hand over results,
/// beyond the transfer itself.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Flags of the transport suite.
#[derive(Args, Debug, Clone)]
pub struct TransportArgs {
    /// Congestion controllers to compare (transport suite).
    #[arg(long, value_delimiter = ',', default_value = "lfn,cubic")]
    congestion: Vec<Congestion>,
    /// Random loss rates, percent (transport suite).
    #[arg(long = "loss", value_delimiter = ',')]
    pub(crate) loss_pct: Option<Vec<f64>>,
    /// Measurement window, s (transport suite; default max(20 s, 40 RTT)).
    #[arg(long)]
    measure_s: Option<f64>,
}

/// Warm-up before the measurement window: max(2 s, 12 RTT).
pub fn warmup(rtt: Duration) -> Duration {
    (rtt * WARMUP_RTTS).max(MIN_WARMUP)
}

/// Default measurement window: max(20 s, 40 RTT).
pub fn measure(rtt: Duration) -> Duration {
    (rtt * MEASURE_RTTS).max(MIN_MEASURE)
}

/// Runs the suite on a fresh two-site lab; returns one row per run.
pub async fn run(
    delays: Option<Vec<u64>>,
    rate: u64,
    t: &TransportArgs,
    out: Out,
) -> Result<Vec<Value>> {
    let delays = delays.unwrap_or_else(|| DEFAULT_DELAYS_MS.to_vec());
    let losses = t
        .loss_pct
        .clone()
        .unwrap_or_else(|| DEFAULT_LOSS_PCT.to_vec());
    if let Some(l) = losses.iter().find(|l| !(0.0..=100.0).contains(*l)) {
        bail!("--loss {l} is not a percentage between 0 and 100");
    }
    let spec = LabSpec {
        sites: 2,
        delay: Duration::from_millis(delays.first().copied().unwrap_or(0)),
        rate_bps: rate,
        ..LabSpec::default()
    };
    let mut daemon = std::process::Command::new(std::env::current_exe()?);
    daemon.args(["lab", "wan-daemon"]);
    let st = godwit_lab::topology::up(&spec, &labenv::state_dir(), &daemon)
        .context("building the lab topology")?;
    let res = async {
        let mut rows = Vec::new();
        for &d in &delays {
            for &loss in &losses {
                let upd = LinkParamsUpdate {
                    delay: Some(Duration::from_millis(d)),
                    rate_bps: Some(rate),
                    loss: Some(loss / 100.0),
                    ..Default::default()
                };
                WanClient::connect(&st.wan_socket)?.set_link(None, None, upd)?;
                for &cc in &t.congestion {
                    let rtt = Duration::from_millis(2 * d);
                    let window = t
                        .measure_s
                        .map(Duration::from_secs_f64)
                        .unwrap_or_else(|| measure(rtt));
                    out.note(format!(
                        "transport: {cc} at {d} ms one-way, {loss} % loss, {} Mbit/s, {:.0} s",
                        rate as f64 / 1e6,
                        (warmup(rtt) + window).as_secs_f64()
                    ));
                    let st2 = st.clone();
                    let r = tokio::task::spawn_blocking(move || {
                        one_run(&st2, cc, warmup(rtt), window, rtt)
                    })
                    .await?;
                    let mut row = match r {
                        Ok(m) => json!({
                            "goodput_mbit": m.goodput_mbit,
                            "link_share": m.goodput_mbit * 1e6 / rate as f64,
                            "rtt_ms": m.stats.rtt.as_secs_f64() * 1e3,
                            "retransmit_pct": m.retransmit_pct,
                            "cwnd_bytes": m.stats.cwnd,
                            "duration_s": m.window_s,
                            "warmup_s": warmup(rtt).as_secs_f64(),
                            "path_mtu": m.stats.path_mtu,
                        }),
                        Err(e) => json!({"error": format!("{e:#}")}),
                    };
                    row["congestion"] = json!(cc.name());
                    row["delay_ms"] = json!(d);
                    row["loss_pct"] = json!(loss);
                    row["rate_mbit"] = json!(rate as f64 / 1e6);
                    out.note(format!("  {row}"));
                    rows.push(row);
                }
            }
        }
        anyhow::Ok(rows)
    }
    .await;
    let _ = labenv::down();
    res
}

/// Result of one run.
struct Measured {
    goodput_mbit: f64,
    window_s: f64,
    retransmit_pct: f64,
    stats: PeerStats,
}

/// Sender counters at the start and the end of the measurement window.
struct SenderReport {
    start: PeerStats,
    end: PeerStats,
}

/// One connection from site a to site b: `warmup` + `window` + slack of
/// sending, measured at the receiver.
fn one_run(
    st: &LabState,
    cc: Congestion,
    warmup: Duration,
    window: Duration,
    rtt: Duration,
) -> Result<Measured> {
    let (a, b) = (st.site("a")?.clone(), st.site("b")?.clone());
    let a_id = Identity::generate("bench-a")?;
    let b_id = Identity::generate("bench-b")?;
    let (port_tx, port_rx) = mpsc::channel();
    let server = {
        let (a_fp, b_id) = (a_id.fingerprint(), b_id.clone());
        let netns = b.netns.clone();
        godwit_lab::netns::spawn_in(&netns, move || {
            runtime()?.block_on(receive(b, b_id, a_fp, cc, port_tx))
        })?
    };
    let port = port_rx
        .recv_timeout(SETUP_TIMEOUT)
        .context("the receiver did not start")?;
    // Send past the window by a few RTTs so the receiver's window is full
    // even though the first byte reaches it one RTT after we start.
    let send_for = warmup + window + rtt * 2 + Duration::from_secs(1);
    let client = {
        let b_fp = b_id.fingerprint();
        let target = SocketAddr::from((st.site("b")?.addr, port));
        let netns = a.netns.clone();
        godwit_lab::netns::spawn_in(&netns, move || {
            runtime()?.block_on(send(a, a_id, b_fp, cc, target, warmup, send_for))
        })?
    };
    let sent = client
        .join()
        .map_err(|_| anyhow::anyhow!("sender thread panicked"))???;
    let samples = server
        .join()
        .map_err(|_| anyhow::anyhow!("receiver thread panicked"))???;
    let (bytes, secs) = window_bytes(&samples, warmup, window)?;
    let packets = sent
        .end
        .packets_sent
        .saturating_sub(sent.start.packets_sent);
    let lost = sent
        .end
        .lost_packets
        .saturating_sub(sent.start.lost_packets);
    Ok(Measured {
        goodput_mbit: bytes as f64 * 8.0 / secs / 1e6,
        window_s: secs,
        retransmit_pct: if packets == 0 {
            0.0
        } else {
            lost as f64 * 100.0 / packets as f64
        },
        stats: sent.end,
    })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    // Current-thread: every task, and so every socket, stays on this
    // thread, which is inside the site's namespace.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime in the lab namespace")
}

fn config(
    site: &SiteInfo,
    me: Identity,
    peer: &str,
    peer_fp: godwit_transport::Fingerprint,
    cc: Congestion,
) -> Result<TransportConfig> {
    let peers = PeerSet::new();
    peers.insert(peer, peer_fp)?;
    let mut cfg = TransportConfig::new(SocketAddr::from((site.addr, 0)), me, peers);
    cfg.congestion = cc;
    Ok(cfg)
}

/// The receiver: accepts one Memory stream and timestamps every chunk.
async fn receive(
    site: SiteInfo,
    me: Identity,
    peer_fp: godwit_transport::Fingerprint,
    cc: Congestion,
    port_tx: mpsc::Sender<u16>,
) -> Result<Vec<(Instant, u64)>> {
    let (transport, mut incoming) = Transport::bind(config(&site, me, "a", peer_fp, cc)?).await?;
    let _ = port_tx.send(transport.local_addr()?.port());
    let stream = tokio::time::timeout(SETUP_TIMEOUT, incoming.next())
        .await
        .context("no stream from the sender")?
        .context("transport shut down")?;
    if stream.purpose != StreamPurpose::Memory {
        bail!("unexpected {} stream", stream.purpose);
    }
    let mut recv = stream.recv;
    let mut total = 0u64;
    let mut samples = Vec::new();
    // The sender resets the stream (or closes the connection) when done.
    while let Ok(Some(chunk)) = recv.read_chunk(usize::MAX, true).await {
        total += chunk.bytes.len() as u64;
        samples.push((Instant::now(), total));
    }
    transport.shutdown().await;
    Ok(samples)
}

/// The sender: one Memory stream written for `send_for`.
async fn send(
    site: SiteInfo,
    me: Identity,
    peer_fp: godwit_transport::Fingerprint,
    cc: Congestion,
    target: SocketAddr,
    warmup: Duration,
    send_for: Duration,
) -> Result<SenderReport> {
    let (transport, _incoming) = Transport::bind(config(&site, me, "b", peer_fp, cc)?).await?;
    let conn = tokio::time::timeout(SETUP_TIMEOUT, transport.connection("b", target))
        .await
        .context("connecting timed out")??;
    let (mut tx, _rx) = conn.open(StreamPurpose::Memory).await?;
    let chunk = vec![0x5au8; WRITE_CHUNK];
    let started = Instant::now();
    let mut start = None;
    while started.elapsed() < send_for {
        tx.write_all(&chunk).await?;
        if start.is_none() && started.elapsed() >= warmup {
            start = Some(conn.stats());
        }
    }
    let end = conn.stats();
    // Reset rather than finish: finishing would wait for quinn's send buffer
    // (up to the connection window) to drain, which only costs time.
    let _ = tx.reset(0u32.into());
    transport.shutdown().await;
    Ok(SenderReport {
        start: start.unwrap_or_else(|| end.clone()),
        end,
    })
}

/// Payload bytes that arrived in [first + warmup, first + warmup + window],
/// and the window's length in seconds (shorter if the data ended early).
fn window_bytes(
    samples: &[(Instant, u64)],
    warmup: Duration,
    window: Duration,
) -> Result<(u64, f64)> {
    let Some(&(first, _)) = samples.first() else {
        bail!("no data received");
    };
    let (from, to) = (first + warmup, first + warmup + window);
    let at = |t: Instant| {
        let i = samples.partition_point(|&(s, _)| s <= t);
        i.checked_sub(1).map(|i| samples[i])
    };
    let (Some((t0, b0)), Some((t1, b1))) = (at(from), at(to)) else {
        bail!("transfer ended before the measurement window");
    };
    let secs = t1.saturating_duration_since(t0).as_secs_f64();
    if secs < window.as_secs_f64() / 2.0 {
        bail!("transfer too short to measure ({secs:.1} s of data in the window)");
    }
    Ok((b1 - b0, secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_and_window_follow_the_rtt() {
        assert_eq!(warmup(Duration::ZERO), MIN_WARMUP);
        assert_eq!(
            warmup(Duration::from_millis(520)),
            Duration::from_millis(6240)
        );
        assert_eq!(measure(Duration::from_millis(160)), MIN_MEASURE);
        assert_eq!(measure(Duration::from_millis(600)), Duration::from_secs(24));
    }

    #[test]
    fn window_counts_bytes_inside_it() {
        let t = Instant::now();
        let s: Vec<(Instant, u64)> = (0..=100u32)
            .map(|i| (t + Duration::from_millis(100) * i, u64::from(i) * 1000))
            .collect();
        let (bytes, secs) =
            window_bytes(&s, Duration::from_secs(2), Duration::from_secs(5)).expect("window");
        assert_eq!(bytes, 50_000);
        assert!((secs - 5.0).abs() < 1e-6);
        assert!(window_bytes(&s, Duration::from_secs(20), Duration::from_secs(5)).is_err());
    }
}
