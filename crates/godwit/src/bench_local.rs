//! `godwit bench local --json`: same-host migration (seed 001), a handover
//! of the RAM file to a new QEMU against an ordinary copy into a new QEMU
//! on the same host, per guest RAM size.
//!
//! Each size boots one guest on lab site `a` with memdirty rewriting part
//! of its memory, then alternates the modes (so machine noise hits both
//! alike) for `runs` rounds, and verifies every memdirty page after each
//! migration. Rows give medians over the runs. A `series` row hands the
//! smallest guest over `series` times in a row, verifying after each.

use anyhow::{Context, Result};
use godwit_agent::api::types::{MigrationInfo, MigrationPhase, StartMigration};
use godwit_agent::client::ApiClient;
use serde_json::{json, Value};

use crate::bench::median;
use crate::labenv;
use crate::output::Out;
use crate::scenario;

/// Default guest RAM sizes, MiB (the list).
pub const DEFAULT_SIZES_MIB: [u64; 4] = [256, 1024, 4096, 8192];
/// Memory memdirty keeps verifiable, MiB, at most: enough to matter for a
/// copy, small enough that a TCG guest fills it quickly.
const DIRTY_MIB_MAX: u64 = 512;
/// Pages memdirty rewrites per second during the runs.
const DIRTY_RATE: u64 = 1000;
/// Cap of one same-host migration, s.
const LOCAL_CAP_S: u64 = 300;

/// What to run.
pub struct LocalSuite {
    /// Guest RAM sizes, MiB.
    pub sizes_mib: Vec<u64>,
    /// Migrations per mode and size.
    pub runs: usize,
    /// Whether to run the copy baseline.
    pub copy: bool,
    /// Consecutive handovers of the smallest guest (0: none).
    pub series: usize,
}

/// One migration's figures.
#[derive(Default, Clone)]
struct Sample {
    total_ms: f64,
    qemu_downtime_ms: Option<f64>,
    stop_to_resume_ms: Option<f64>,
    guest_pause_ms: Option<f64>,
    guest_ping_interval_ms: Option<f64>,
    guest_first_answer_ms: Option<f64>,
    cpu_s: Option<f64>,
    stream_bytes: f64,
    launch_ms: f64,
    transfer_ms: f64,
}

/// Runs the suite on a fresh two-site lab (only site `a` is used).
pub async fn run(s: &LocalSuite, out: Out) -> Result<Vec<Value>> {
    let spec = godwit_lab::LabSpec {
        sites: 2,
        ..godwit_lab::LabSpec::default()
    };
    labenv::up(&spec, godwit_qemu::Accel::Tcg).await?;
    let res = sizes(s, out).await;
    scenario::stop_everywhere(&["a"], "l1").await;
    labenv::down()?;
    res
}

async fn sizes(s: &LocalSuite, out: Out) -> Result<Vec<Value>> {
    let a = scenario::site("a");
    let me: godwit_agent::api::types::AgentStatus = a.get("/v1/status").await?;
    let mut rows = Vec::new();
    for (i, &mib) in s.sizes_mib.iter().enumerate() {
        out.note(format!("local: {mib} MiB guest"));
        let boot = scenario::boot(&a, "l1", mib, out).await?;
        let dirty = (mib / 4).min(DIRTY_MIB_MAX);
        scenario::memdirty(&a, "l1", dirty, DIRTY_RATE).await?;
        let modes: &[bool] = if s.copy { &[false, true] } else { &[false] };
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); modes.len()];
        let mut errors = 0;
        let mut failures = vec![Vec::new(); modes.len()];
        for _ in 0..s.runs {
            for (k, &copy) in modes.iter().enumerate() {
                match once(&a, &me.name, copy).await? {
                    Ok(x) => samples[k].push(x),
                    Err(why) => failures[k].push(why),
                }
                let v = scenario::verify(&a, "l1", &boot).await?;
                errors += v.errors;
                if !v.same_boot {
                    anyhow::bail!("the guest rebooted during a same-host migration");
                }
            }
        }
        for (k, &copy) in modes.iter().enumerate() {
            rows.push(row(copy, mib, dirty, &samples[k], &failures[k], errors));
        }
        if i == 0 && s.series > 0 {
            rows.push(series(&a, &me.name, &boot, mib, dirty, s.series, out).await?);
        }
        scenario::stop_everywhere(&["a"], "l1").await;
    }
    Ok(rows)
}

/// One same-host migration of `l1`; `Err(why)` inside if it failed (the VM
/// then still runs in its old QEMU, which the next verification checks).
async fn once(a: &ApiClient, me: &str, copy: bool) -> Result<Result<Sample, String>> {
    let req = StartMigration {
        vm: "l1".into(),
        to: me.into(),
        downtime_limit_ms: None,
        timeout_s: Some(LOCAL_CAP_S),
        direct: false,
        qemu: None,
        copy,
    };
    let m: MigrationInfo = crate::cmd::migrate::migrate(
        a,
        &req,
        Out {
            json: false,
            quiet: true,
        },
    )
    .await?;
    if m.phase != MigrationPhase::Completed {
        return Ok(Err(m.error.unwrap_or_else(|| format!("{:?}", m.phase))));
    }
    let r = m.report.context("a completed migration without a report")?;
    let l = r.local.clone().unwrap_or_default();
    Ok(Ok(Sample {
        total_ms: r.total_ms as f64,
        qemu_downtime_ms: r.downtime_ms.map(|d| d as f64),
        stop_to_resume_ms: r.guest_downtime_ms.map(|d| d as f64),
        guest_pause_ms: l.guest_pause_ms,
        guest_ping_interval_ms: l.guest_ping_interval_ms,
        guest_first_answer_ms: l.guest_first_answer_ms,
        cpu_s: r.sender_cpu_s,
        stream_bytes: r.stream_bytes as f64,
        launch_ms: l.launch_ms,
        transfer_ms: l.transfer_ms,
    }))
}

async fn series(
    a: &ApiClient,
    me: &str,
    boot: &str,
    mib: u64,
    dirty: u64,
    n: usize,
    out: Out,
) -> Result<Value> {
    out.note(format!("local: {n} handovers in a row, {mib} MiB"));
    let mut samples = Vec::new();
    let mut failures = Vec::new();
    let mut errors = 0;
    for _ in 0..n {
        match once(a, me, false).await? {
            Ok(x) => samples.push(x),
            Err(why) => failures.push(why),
        }
        let v = scenario::verify(a, "l1", boot).await?;
        errors += v.errors;
        if !v.same_boot {
            anyhow::bail!("the guest rebooted during the handover series");
        }
    }
    let mut r = row(false, mib, dirty, &samples, &failures, errors);
    r["mode"] = json!("handover-series");
    Ok(r)
}

fn max(v: &[f64]) -> Option<f64> {
    v.iter().copied().reduce(f64::max)
}

fn row(copy: bool, mib: u64, dirty: u64, s: &[Sample], failed: &[String], errors: u64) -> Value {
    let col = |f: fn(&Sample) -> Option<f64>| s.iter().filter_map(f).collect::<Vec<_>>();
    let pause = col(|x| x.guest_pause_ms);
    json!({
        "mode": if copy { "copy" } else { "handover" },
        "ram_mib": mib,
        "dirty_mib": dirty,
        "runs": s.len() + failed.len(),
        "failed": failed.len(),
        "first_failure": failed.first(),
        "memory_errors": errors,
        "total_ms": median(&col(|x| Some(x.total_ms))),
        "total_max_ms": max(&col(|x| Some(x.total_ms))),
        "launch_ms": median(&col(|x| Some(x.launch_ms))),
        "transfer_ms": median(&col(|x| Some(x.transfer_ms))),
        "pause_ms": median(&pause.clone()),
        "pause_max_ms": max(&pause),
        "stop_to_resume_ms": median(&col(|x| x.stop_to_resume_ms)),
        "qemu_downtime_ms": median(&col(|x| x.qemu_downtime_ms)),
        "guest_ping_interval_ms": median(&col(|x| x.guest_ping_interval_ms)),
        "guest_first_answer_ms": median(&col(|x| x.guest_first_answer_ms)),
        "cpu_s": median(&col(|x| x.cpu_s)),
        "stream_bytes": median(&col(|x| Some(x.stream_bytes))),
    })
}
