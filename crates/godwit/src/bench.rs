//! `godwit bench SUITE --json`: experiments run in the lab, printed as one
//! JSON object `{"suite": …, "rows": […]}`.
//!
//! - `lab`: fidelity of the WAN emulator (RTT and TCP goodput against the
//!   configured delay and rate).
//! - `baseline`: seed 000's Table 1 on our lab: a 256 MiB guest running
//!   memdirty migrated at several one-way delays, QEMU to QEMU over plain
//!   TCP ("qemu-direct") and through the agents ("godwit-relay"); a run
//!   that does not finish within 10 minutes counts as failed.
//! - `transport`: QUIC bulk goodput per congestion controller, delay and
//!   loss (`crate::bench_transport`).
//! - `memory`: WAN-accelerated migration per delay, loss, workload and
//!   site state, against QEMU direct (`crate::bench_memory`).
//! - `codec`: the wire cost of re-sent pages with small changes
//!   (`crate::bench_codec`).
//! - `local`: same-host handover against a copy into a new QEMU, per guest
//!   RAM size (`crate::bench_local`).
//! - `evacuate`: four guests moved off a host under a bandwidth budget
//!   (`crate::bench_evacuate`).
//! - `network`: a guest's UDP stream and TCP connection across repeated
//!   moves between sites (`crate::bench_network`).

use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use godwit_lab::link::LinkParamsUpdate;
use godwit_lab::wan::WanClient;
use godwit_lab::LabSpec;
use serde_json::{json, Value};

use crate::cmd::lab::parse_rate;
use crate::labenv;
use crate::output::Out;
use crate::scenario;

/// Suites.
#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum Suite {
    /// WAN emulator fidelity.
    Lab,
    /// Seed 000 Table 1: migration time per delay, QEMU direct vs relay.
    Baseline,
    /// QUIC goodput on long fat pipes, per congestion controller and loss.
    Transport,
    /// Seed 000 with WAN acceleration: bytes, time, CPU per workload and site.
    Memory,
    /// What a re-sent page with a small change costs (codec only).
    Codec,
    /// Seed 001: same-host handover vs copy, per guest RAM size.
    Local,
    /// Seed 001: host evacuation under a bandwidth budget.
    Evacuate,
    /// Seed 002: a guest's UDP stream and TCP connection across moves.
    Network,
}

/// `godwit bench`.
#[derive(Args, Debug)]
pub struct BenchCmd {
    /// Which suite.
    suite: Suite,
    /// One-way delays to test, ms (default: the suite's own list).
    #[arg(long, value_delimiter = ',')]
    delays: Option<Vec<u64>>,
    /// Link rate.
    #[arg(long, default_value = "100mbit", value_parser = parse_rate)]
    rate: u64,
    /// Guest RAM for migration suites, MiB (baseline 256, memory 512).
    #[arg(long)]
    memory: Option<u64>,
    /// Pages memdirty re-dirties per second ("moderate": ~2 MB/s).
    #[arg(long, default_value_t = 500)]
    dirty_rate: u64,
    /// Memory memdirty keeps dirty, MiB.
    #[arg(long, default_value_t = 64)]
    dirty_mib: u64,
    /// Paths to compare (baseline: qemu-direct, godwit-relay; memory:
    /// qemu-direct, godwit).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "qemu-direct,godwit-relay"
    )]
    paths: Vec<String>,
    /// Workloads (memory suite): idle, realistic, memdirty-<percent of
    /// the link rate>.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "idle,memdirty-25,realistic"
    )]
    workloads: Vec<crate::bench_memory::Workload>,
    /// Site states (memory suite): cold, warm, return.
    #[arg(long, value_delimiter = ',', default_value = "cold,warm,return")]
    sites: Vec<crate::bench_memory::SiteState>,
    /// Skip the qemu-direct baseline (memory suite).
    #[arg(long)]
    no_direct: bool,
    /// Keep each cell's agent logs under this directory (memory suite).
    #[arg(long)]
    keep_logs: Option<std::path::PathBuf>,
    /// Cap per migration, s; a slower one counts as failed.
    #[arg(long, default_value_t = CAP_S)]
    cap_s: u64,
    /// Guest RAM sizes (local suite), MiB.
    #[arg(long, value_delimiter = ',')]
    sizes: Option<Vec<u64>>,
    /// Migrations per mode and size (local suite).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Skip the copy baseline (local suite).
    #[arg(long)]
    no_copy: bool,
    /// Consecutive handovers of the smallest guest, each verified (local
    /// suite).
    #[arg(long, default_value_t = 20)]
    series: usize,
    /// Bandwidth budgets (evacuate suite), Mbit/s.
    #[arg(long, value_delimiter = ',')]
    budgets: Option<Vec<u64>>,
    /// Migrations at once (evacuate suite).
    #[arg(long, default_value_t = 2)]
    parallel: usize,
    /// UDP stream rates (network suite), kbit/s.
    #[arg(long, value_delimiter = ',')]
    stream_rates: Option<Vec<u64>>,
    /// Skip the row with the receiver behind a kernel vxlan device
    /// (network suite).
    #[arg(long)]
    no_kernel_vxlan: bool,
    /// Moves per stream rate (network suite).
    #[arg(long, default_value_t = crate::bench_network::DEFAULT_MOVES)]
    moves: usize,
    #[command(flatten)]
    transport: crate::bench_transport::TransportArgs,
}

/// Migration cap, as in seed 000.
const CAP_S: u64 = 600;

/// The median of `v` (the upper middle of an even count); `None` if empty.
pub fn median<T: Copy + PartialOrd>(v: &[T]) -> Option<T> {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    s.get(s.len() / 2).copied()
}

/// Runs a suite.
pub async fn run(c: BenchCmd, out: Out) -> Result<()> {
    let _lab_lock = if matches!(c.suite, Suite::Codec) {
        None
    } else {
        Some(labenv::exclusive(out)?)
    };
    if !matches!(c.suite, Suite::Codec)
        && godwit_lab::topology::load_state(&labenv::state_dir())?.is_some()
    {
        bail!("a lab is already up; benchmarks build their own (run `godwit lab down` first)");
    }
    let rows = match c.suite {
        Suite::Lab => lab(&c, out).await?,
        Suite::Baseline => baseline(&c, out).await?,
        Suite::Transport => {
            crate::bench_transport::run(c.delays.clone(), c.rate, &c.transport, out).await?
        }
        Suite::Codec => crate::bench_codec::run()?,
        Suite::Local => {
            let suite = crate::bench_local::LocalSuite {
                sizes_mib: c
                    .sizes
                    .clone()
                    .unwrap_or_else(|| crate::bench_local::DEFAULT_SIZES_MIB.to_vec()),
                runs: c.runs.max(1),
                copy: !c.no_copy,
                series: c.series,
            };
            crate::bench_local::run(&suite, out).await?
        }
        Suite::Evacuate => {
            let suite = crate::bench_evacuate::EvacuateSuite {
                budgets_mbit: c
                    .budgets
                    .clone()
                    .unwrap_or_else(|| crate::bench_evacuate::DEFAULT_BUDGETS_MBIT.to_vec()),
                parallel: c.parallel.max(1),
                rate_bps: c.rate,
            };
            crate::bench_evacuate::run(&suite, out).await?
        }
        Suite::Network => {
            let suite = crate::bench_network::NetworkSuite {
                rates_kbit: c
                    .stream_rates
                    .clone()
                    .unwrap_or_else(|| crate::bench_network::DEFAULT_RATES_KBIT.to_vec()),
                moves: c.moves.max(1),
                delay_ms: c
                    .delays
                    .as_ref()
                    .and_then(|d| d.first().copied())
                    .unwrap_or(crate::bench_network::DEFAULT_DELAY_MS),
                rate_bps: c.rate,
                kernel_row: !c.no_kernel_vxlan,
            };
            crate::bench_network::run(&suite, out).await?
        }
        Suite::Memory => {
            let suite = crate::bench_memory::MemorySuite {
                delays_ms: c
                    .delays
                    .clone()
                    .unwrap_or_else(|| crate::bench_memory::DEFAULT_DELAYS_MS.to_vec()),
                loss_pct: c
                    .transport
                    .loss_pct
                    .clone()
                    .unwrap_or_else(|| crate::bench_memory::DEFAULT_LOSS_PCT.to_vec()),
                rate_bps: c.rate,
                ram_mib: c.memory.unwrap_or(512),
                workloads: c.workloads.clone(),
                sites: c.sites.clone(),
                godwit: c.paths.iter().any(|p| p.starts_with("godwit")),
                direct: !c.no_direct && c.paths.iter().any(|p| p == "qemu-direct"),
                cap_s: c.cap_s,
                keep_logs: c.keep_logs.clone(),
            };
            crate::bench_memory::run(&suite, out).await?
        }
    };
    let suite = format!("{:?}", c.suite).to_lowercase();
    let obj = json!({"suite": suite, "rows": rows});
    if out.json {
        println!("{obj}");
    } else {
        println!("{}", serde_json::to_string_pretty(&obj)?);
    }
    Ok(())
}

fn spec(delay_ms: u64, rate: u64) -> LabSpec {
    LabSpec {
        sites: 2,
        delay: Duration::from_millis(delay_ms),
        rate_bps: rate,
        ..LabSpec::default()
    }
}

async fn lab(c: &BenchCmd, out: Out) -> Result<Vec<Value>> {
    let delays = c.delays.clone().unwrap_or_else(|| vec![0, 130]);
    let first = delays.first().copied().unwrap_or(0);
    let mut daemon = std::process::Command::new(std::env::current_exe()?);
    daemon.args(["lab", "wan-daemon"]);
    let st = godwit_lab::topology::up(&spec(first, c.rate), &labenv::state_dir(), &daemon)?;
    let res = async {
        let mut rows = Vec::new();
        for d in &delays {
            let upd = LinkParamsUpdate {
                delay: Some(Duration::from_millis(*d)),
                rate_bps: Some(c.rate),
                ..Default::default()
            };
            WanClient::connect(&st.wan_socket)?.set_link(None, None, upd)?;
            out.note(format!(
                "lab fidelity at {d} ms one-way, {} Mbit/s",
                c.rate as f64 / 1e6
            ));
            let st2 = st.clone();
            let rtt =
                tokio::task::spawn_blocking(move || godwit_lab::probe::rtt(&st2, "a", "b", 50))
                    .await??;
            let st2 = st.clone();
            let secs = if *d >= 100 { 25 } else { 10 };
            let gp = tokio::task::spawn_blocking(move || {
                godwit_lab::probe::tcp_goodput(&st2, "a", "b", Duration::from_secs(secs))
            })
            .await??;
            rows.push(json!({
                "delay_ms": d,
                "rate_mbit": c.rate as f64 / 1e6,
                "rtt_ms": rtt.median_ms,
                "rtt_min_ms": rtt.min_ms,
                "rtt_max_ms": rtt.max_ms,
                "rtt_error_ms": rtt.median_ms - 2.0 * *d as f64,
                "goodput_mbit": gp.mbit_s,
                "goodput_ratio": gp.mbit_s * 1e6 / c.rate as f64,
                "goodput_method": gp.method,
            }));
        }
        anyhow::Ok(rows)
    }
    .await;
    let _ = labenv::down();
    res
}

async fn baseline(c: &BenchCmd, out: Out) -> Result<Vec<Value>> {
    let delays = c.delays.clone().unwrap_or_else(|| vec![0, 80, 140, 260]);
    let mut rows = Vec::new();
    for d in delays {
        labenv::up(&spec(d, c.rate), godwit_qemu::Accel::Tcg).await?;
        for path in &c.paths {
            let direct = match path.as_str() {
                "qemu-direct" => true,
                "godwit-relay" => false,
                other => bail!("unknown path {other:?} (qemu-direct, godwit-relay)"),
            };
            out.note(format!("baseline: {path} at {d} ms one-way"));
            let row = match one_migration(c, direct, out).await {
                Ok(mut r) => {
                    r["path"] = json!(path);
                    r
                }
                Err(e) => json!({"path": path, "success": false, "error": format!("{e:#}")}),
            };
            let mut row = row;
            row["delay_ms"] = json!(d);
            row["rate_mbit"] = json!(c.rate as f64 / 1e6);
            row["ram_mib"] = json!(c.memory.unwrap_or(256));
            rows.push(row);
            scenario::stop_everywhere(&["a", "b"], "bench").await;
        }
        labenv::down()?;
    }
    Ok(rows)
}

async fn one_migration(c: &BenchCmd, direct: bool, out: Out) -> Result<Value> {
    let a = scenario::site("a");
    let b = scenario::site("b");
    let boot = scenario::boot(&a, "bench", c.memory.unwrap_or(256), out).await?;
    scenario::memdirty(&a, "bench", c.dirty_mib, c.dirty_rate).await?;
    // Let the dirtier reach steady state, as a running workload would be.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let m = scenario::migrate(
        &a,
        "bench",
        "b",
        direct,
        c.cap_s,
        Out {
            json: false,
            quiet: true,
        },
    )
    .await?;
    let ok = m.phase == godwit_agent::api::types::MigrationPhase::Completed;
    let r = m.report.clone().unwrap_or_default();
    let mut row = json!({
        "success": ok,
        "total_ms": r.total_ms,
        "downtime_ms": r.downtime_ms,
        "wire_bytes": r.wire_bytes,
        "qemu_total_ms": r.qemu_total_ms,
        "passes": r.passes,
        "error": m.error,
    });
    if ok {
        let v = scenario::verify(&b, "bench", &boot).await?;
        row["memory_errors"] = json!(v.errors);
        row["same_boot"] = json!(v.same_boot);
    }
    Ok(row)
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_takes_the_upper_middle() {
        assert_eq!(super::median::<u64>(&[]), None);
        assert_eq!(super::median(&[5]), Some(5));
        assert_eq!(super::median(&[9, 1, 5]), Some(5));
        assert_eq!(super::median(&[4, 1, 3, 2]), Some(3));
        assert_eq!(super::median(&[-3i64, 7]), Some(7));
        assert_eq!(super::median(&[2.5, 0.5]), Some(2.5));
    }
}
