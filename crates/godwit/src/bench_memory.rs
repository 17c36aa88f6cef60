//! `godwit bench memory`: seed 000's experiment with godwit's WAN
//! acceleration. Per one-way delay, loss rate and workload, a fresh
//! two-site lab (so every site starts cold) and:
//!
//! - `godwit`, site `cold`: guest `m1` boots at `a`, runs the workload and
//!   migrates to `b`;
//! - `godwit`, site `warm`: a second guest `m2` of the same image, same
//!   workload, migrates into the same site `b`;
//! - `godwit`, site `return`: `m1` goes back from `b` to `a`, where it ran
//!   before;
//! - `qemu-direct`, site `cold`: QEMU to QEMU over plain TCP with the same
//!   QEMU settings, the baseline.
//!
//! A migration that does not finish within the cap (10 minutes, as in
//! seed 000) counts as failed. Rows carry what the report measured; the
//! memdirty rows also the guest's own verification of every page it
//! wrote.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use godwit_agent::api::types::{MigrationPhase, MigrationReport};
use godwit_agent::client::ApiClient;
use serde_json::{json, Value};

use crate::labenv;
use crate::output::Out;
use crate::scenario;

/// Default one-way delays, ms (seed 000's range and beyond).
pub const DEFAULT_DELAYS_MS: [u64; 5] = [0, 80, 140, 260, 300];
/// Default loss rates, percent.
pub const DEFAULT_LOSS_PCT: [f64; 2] = [0.0, 0.1];
/// Memory memdirty keeps dirty, as a share of guest RAM.
const MEMDIRTY_SHARE: f64 = 0.25;
/// The realistic load: anonymous memory and a second cached copy of
/// corpus files, as shares of guest RAM (the corpus itself is always in
/// memory: the image ships it in the initramfs).
const REALISTIC_ANON_SHARE: f64 = 0.25;
const REALISTIC_CACHE_SHARE: f64 = 0.125;
/// Time for a workload to reach its steady state before migrating.
const SETTLE: Duration = Duration::from_secs(2);
/// Time allowed to build the realistic load (TCG is slow).
const REALISTIC_TIMEOUT: Duration = Duration::from_secs(600);

/// A workload of the suite.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Workload {
    /// Booted and doing nothing.
    Idle,
    /// memdirty re-dirtying random pages at this share of the link rate.
    Memdirty { link_pct: f64 },
    /// Page cache and heap built from real files (`godwit-guest realistic`).
    Realistic,
}

impl std::str::FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "idle" => Ok(Workload::Idle),
            "realistic" => Ok(Workload::Realistic),
            _ => match s.strip_prefix("memdirty-").map(str::parse::<f64>) {
                Some(Ok(p)) if p > 0.0 && p <= 100.0 => Ok(Workload::Memdirty { link_pct: p }),
                _ => Err(format!(
                    "unknown workload {s:?} (idle, realistic, memdirty-<percent of the link>)"
                )),
            },
        }
    }
}

impl Workload {
    /// The row's label: memdirty is named by its dirty rate in Mbit/s.
    fn label(self, rate_bps: u64) -> String {
        match self {
            Workload::Idle => "idle".into(),
            Workload::Realistic => "realistic".into(),
            Workload::Memdirty { link_pct } => {
                format!("memdirty-{}mbit", rate_bps as f64 * link_pct / 100.0 / 1e6)
            }
        }
    }

    /// Starts the workload in a booted guest.
    async fn start(self, client: &ApiClient, vm: &str, ram_mib: u64, rate_bps: u64) -> Result<()> {
        match self {
            Workload::Idle => Ok(()),
            Workload::Memdirty { link_pct } => {
                let pages_per_s = (rate_bps as f64 * link_pct / 100.0 / 8.0 / 4096.0).ceil() as u64;
                let mib = ((ram_mib as f64 * MEMDIRTY_SHARE) as u64).max(1);
                scenario::memdirty(client, vm, mib, pages_per_s.max(1)).await
            }
            Workload::Realistic => {
                let anon = (ram_mib as f64 * REALISTIC_ANON_SHARE) as u64;
                let cache = (ram_mib as f64 * REALISTIC_CACHE_SHARE) as u64;
                let cmd = json!({"cmd": "realistic_start", "anon_mib": anon, "cache_mib": cache});
                crate::cmd::vm::guest_call(client, vm, cmd, REALISTIC_TIMEOUT)
                    .await
                    .context("building the realistic load")?;
                Ok(())
            }
        }
    }
}

/// Which site state a row measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiteState {
    /// Nothing of this VM or image at the destination beyond its disk.
    Cold,
    /// A second VM of the same image into the same site.
    Warm,
    /// The VM returns to the site it left.
    Return,
}

impl std::str::FromStr for SiteState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cold" => Ok(SiteState::Cold),
            "warm" => Ok(SiteState::Warm),
            "return" => Ok(SiteState::Return),
            _ => Err(format!("unknown site state {s:?} (cold, warm, return)")),
        }
    }
}

/// What the suite runs.
#[derive(Debug, Clone)]
pub struct MemorySuite {
    /// One-way delays, ms.
    pub delays_ms: Vec<u64>,
    /// Loss rates, percent.
    pub loss_pct: Vec<f64>,
    /// Link rate, bits/s.
    pub rate_bps: u64,
    /// Guest RAM, MiB.
    pub ram_mib: u64,
    /// Workloads.
    pub workloads: Vec<Workload>,
    /// Site states for the godwit path (cold always runs: warm and return
    /// follow it).
    pub sites: Vec<SiteState>,
    /// Run godwit's path.
    pub godwit: bool,
    /// Run the qemu-direct baseline.
    pub direct: bool,
    /// Cap per migration, s.
    pub cap_s: u64,
    /// Where to keep each cell's agent logs (they go with the lab).
    pub keep_logs: Option<std::path::PathBuf>,
}

/// Runs the suite; one row per migration.
pub async fn run(s: &MemorySuite, out: Out) -> Result<Vec<Value>> {
    let mut rows = Vec::new();
    for &delay in &s.delays_ms {
        for &loss in &s.loss_pct {
            for &w in &s.workloads {
                let spec = godwit_lab::LabSpec {
                    sites: 2,
                    delay: Duration::from_millis(delay),
                    rate_bps: s.rate_bps,
                    loss: loss / 100.0,
                    ..godwit_lab::LabSpec::default()
                };
                labenv::up(&spec, godwit_qemu::Accel::Tcg).await?;
                let cell = Cell {
                    suite: s,
                    delay_ms: delay,
                    loss_pct: loss,
                    workload: w,
                };
                let res = cell.run(&mut rows, out).await;
                if let Some(dir) = &s.keep_logs {
                    let cell_dir = dir.join(format!("{}-{delay}ms-{loss}pct", w.label(s.rate_bps)));
                    for site in ["a", "b"] {
                        let from = labenv::site_dir(site).join("agent.log");
                        let _ = std::fs::create_dir_all(&cell_dir);
                        if let Err(e) = std::fs::copy(&from, cell_dir.join(format!("{site}.log"))) {
                            out.note(format!("cannot keep {}: {e}", from.display()));
                        }
                    }
                }
                scenario::stop_everywhere(&["a", "b"], "m1").await;
                scenario::stop_everywhere(&["a", "b"], "m2").await;
                scenario::stop_everywhere(&["a", "b"], "d1").await;
                labenv::down()?;
                if let Err(e) = res {
                    // A broken lab or guest, not a migration result.
                    bail!(
                        "{} at {delay} ms, {loss} % loss: {e:#}",
                        w.label(s.rate_bps)
                    );
                }
            }
        }
    }
    Ok(rows)
}

struct Cell<'a> {
    suite: &'a MemorySuite,
    delay_ms: u64,
    loss_pct: f64,
    workload: Workload,
}

impl Cell<'_> {
    async fn run(&self, rows: &mut Vec<Value>, out: Out) -> Result<()> {
        let (a, b) = (scenario::site("a"), scenario::site("b"));
        let s = self.suite;
        let label = self.workload.label(s.rate_bps);
        out.note(format!(
            "memory: {label} at {} ms one-way, {} % loss",
            self.delay_ms, self.loss_pct
        ));
        let mut nonzero = Value::Null;
        if s.godwit {
            let boot1 = self.boot(&a, "m1", out).await?;
            let cold = self.migrate(&a, &b, "m1", &boot1, false, "b").await?;
            nonzero = cold["nonzero_mib"].clone();
            let cold_ok = cold["success"].as_bool() == Some(true);
            rows.push(self.row("godwit", SiteState::Cold, cold));
            if cold_ok && s.sites.contains(&SiteState::Warm) {
                let boot2 = self.boot(&a, "m2", out).await?;
                let r = self.migrate(&a, &b, "m2", &boot2, false, "b").await?;
                rows.push(self.row("godwit", SiteState::Warm, r));
                scenario::stop_everywhere(&["a", "b"], "m2").await;
            }
            if cold_ok && s.sites.contains(&SiteState::Return) {
                let r = self.migrate(&b, &a, "m1", &boot1, false, "a").await?;
                rows.push(self.row("godwit", SiteState::Return, r));
            }
            scenario::stop_everywhere(&["a", "b"], "m1").await;
        }
        if s.direct {
            let boot = self.boot(&a, "d1", out).await?;
            let mut r = self.migrate(&a, &b, "d1", &boot, true, "b").await?;
            // QEMU's stream does not say which pages are non-zero; the
            // same workload's godwit run does, when there is one.
            r["nonzero_mib"] = nonzero;
            rows.push(self.row("qemu-direct", SiteState::Cold, r));
        }
        Ok(())
    }

    async fn boot(&self, at: &ApiClient, vm: &str, out: Out) -> Result<String> {
        let s = self.suite;
        let id = scenario::boot(at, vm, s.ram_mib, out).await?;
        self.workload.start(at, vm, s.ram_mib, s.rate_bps).await?;
        tokio::time::sleep(SETTLE).await;
        Ok(id)
    }

    /// One migration; a failed migration is a row, a failed lab an error.
    async fn migrate(
        &self,
        from: &ApiClient,
        to: &ApiClient,
        vm: &str,
        boot_id: &str,
        direct: bool,
        to_name: &str,
    ) -> Result<Value> {
        let quiet = Out::QUIET;
        let m = match scenario::migrate(from, vm, to_name, direct, self.suite.cap_s, quiet).await {
            Ok(m) => m,
            Err(e) => return Ok(json!({"success": false, "error": format!("{e:#}")})),
        };
        let ok = m.phase == MigrationPhase::Completed;
        let r = m.report.clone().unwrap_or_default();
        let mut row = figures(&r);
        row["success"] = json!(ok);
        row["error"] = json!(m.error);
        if ok {
            let v = if matches!(self.workload, Workload::Memdirty { .. }) {
                scenario::verify(to, vm, boot_id).await?
            } else {
                scenario::continuity(to, vm, boot_id).await?
            };
            row["memory_errors"] = json!(v.errors);
            row["pages_verified"] = json!(v.pages);
            row["same_boot"] = json!(v.same_boot);
            if v.errors > 0 || !v.same_boot {
                row["success"] = json!(false);
            }
        }
        Ok(row)
    }

    fn row(&self, path: &str, site: SiteState, mut r: Value) -> Value {
        let s = self.suite;
        r["path"] = json!(path);
        r["workload"] = json!(self.workload.label(s.rate_bps));
        r["site"] = json!(format!("{site:?}").to_lowercase());
        r["delay_ms"] = json!(self.delay_ms);
        r["loss_pct"] = json!(self.loss_pct);
        r["rate_mbit"] = json!(s.rate_bps as f64 / 1e6);
        r["ram_mib"] = json!(s.ram_mib);
        r
    }
}

/// The report's figures as row fields.
fn figures(r: &MigrationReport) -> Value {
    const MIB: f64 = (1u64 << 20) as f64;
    const GIB: f64 = (1u64 << 30) as f64;
    let ram = r.ram_mib as f64 * MIB;
    let per_gib = |x: Option<f64>| x.filter(|_| ram > 0.0).map(|v| v * GIB / ram);
    json!({
        "mode": r.mode,
        "total_ms": r.total_ms,
        "downtime_ms": r.guest_downtime_ms,
        "qemu_downtime_ms": r.downtime_ms,
        "wire_bytes": r.wire_bytes,
        "stream_bytes": r.stream_bytes,
        "nonzero_mib": r.nonzero_bytes.map(|b| b as f64 / MIB),
        "wire_per_gib_ram": per_gib(Some(r.wire_bytes as f64)),
        "wire_gib_per_gib_nonzero": r.wire_bytes_per_nonzero_gib.map(|b| b / GIB),
        "sender_cpu_s": r.sender_cpu_s,
        "sender_agent_cpu_s": r.sender_agent_cpu_s,
        "receiver_cpu_s": r.receiver_cpu_s,
        "sender_cpu_s_per_gib": per_gib(r.sender_cpu_s),
        "receiver_cpu_s_per_gib": per_gib(r.receiver_cpu_s),
        "passes": r.passes,
        "shares": r.codec.as_ref().map(|c| json!(c.shares)),
        "compression_ratio": r.codec.as_ref().map(|c| c.compression_ratio()),
        "misses": r.codec.as_ref().map(|c| c.misses),
        "batches": r.codec.as_ref().map(|c| c.batches.iter().sum::<u64>()),
        "fallback": r.codec.as_ref().and_then(|c| c.fallback.clone()),
    })
}
