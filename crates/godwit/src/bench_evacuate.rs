//! `godwit bench evacuate --json`: seed 001's point that migration load
//! must not swamp the network. Four guests on lab site `a` are evacuated to
//! site `b` under a total bandwidth budget; the WAN emulator's own
//! one-second peak on the a→b link is compared with the budget.

use std::time::Duration;

use anyhow::{Context, Result};
use godwit_agent::evacuate::{EvacuationInfo, EvacuationParams, StartEvacuation};
use godwit_lab::wan::WanClient;
use serde_json::{json, Value};

use crate::labenv;
use crate::output::Out;
use crate::scenario;

/// Default budgets, Mbit/s, on a 100 Mbit/s link.
pub const DEFAULT_BUDGETS_MBIT: [u64; 2] = [50, 25];
/// Guests evacuated together.
const VMS: usize = 4;
/// Guest RAM, MiB.
const RAM_MIB: u64 = 256;
/// Memory each guest's memdirty keeps verifiable, MiB, and its rewrite rate.
const DIRTY_MIB: u64 = 32;
/// See [`DIRTY_MIB`].
const DIRTY_RATE: u64 = 200;
/// One-way delay of the lab, ms.
const DELAY_MS: u64 = 10;
/// How long one evacuation may take.
const CAP: Duration = Duration::from_secs(900);

/// What to run.
pub struct EvacuateSuite {
    /// Budgets, Mbit/s.
    pub budgets_mbit: Vec<u64>,
    /// Migrations at once.
    pub parallel: usize,
    /// Link rate, bits/s.
    pub rate_bps: u64,
}

/// Runs one fresh lab per budget.
pub async fn run(s: &EvacuateSuite, out: Out) -> Result<Vec<Value>> {
    let mut rows = Vec::new();
    for &budget in &s.budgets_mbit {
        let spec = godwit_lab::LabSpec {
            sites: 2,
            delay: Duration::from_millis(DELAY_MS),
            rate_bps: s.rate_bps,
            ..godwit_lab::LabSpec::default()
        };
        let st = labenv::up(&spec, godwit_qemu::Accel::Tcg).await?;
        let names: Vec<String> = (1..=VMS).map(|i| format!("e{i}")).collect();
        let res = cell(s, budget, &names, &st.wan_socket, out).await;
        for n in &names {
            scenario::stop_everywhere(&["a", "b"], n).await;
        }
        labenv::down()?;
        rows.push(res?);
    }
    Ok(rows)
}

async fn cell(
    s: &EvacuateSuite,
    budget_mbit: u64,
    names: &[String],
    wan: &std::path::Path,
    out: Out,
) -> Result<Value> {
    let (a, b) = (scenario::site("a"), scenario::site("b"));
    out.note(format!("evacuate: {VMS} VMs under {budget_mbit} Mbit/s"));
    let mut boots = Vec::new();
    for n in names {
        boots.push(scenario::boot(&a, n, RAM_MIB, out).await?);
        scenario::memdirty(&a, n, DIRTY_MIB, DIRTY_RATE).await?;
    }
    let req = StartEvacuation {
        params: Some(EvacuationParams {
            to: vec!["b".into()],
            max_bandwidth_bps: Some(budget_mbit * 1_000_000),
            parallel: s.parallel,
        }),
        resume: false,
    };
    let mut e: EvacuationInfo = a.post("/v1/evacuation", &req).await?;
    let deadline = tokio::time::Instant::now() + CAP;
    while !e.finished && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        e = a.get("/v1/evacuation").await?;
    }
    let link = WanClient::connect(wan)?
        .stats()?
        .into_iter()
        .find(|l| l.from == "a" && l.to == "b")
        .context("no a->b link in the lab")?;
    let mut errors = 0;
    for (n, boot) in names.iter().zip(&boots) {
        if e.vms.iter().any(|v| {
            &v.vm == n
                && v.migration
                    .as_ref()
                    .is_some_and(|m| m.phase == godwit_agent::api::types::MigrationPhase::Completed)
        }) {
            errors += scenario::verify(&b, n, boot).await?.errors;
        }
    }
    let peak = link.link.peak_bps_1s as f64 / 1e6;
    Ok(json!({
        "vms": VMS,
        "ram_mib": RAM_MIB,
        "parallel": s.parallel,
        "delay_ms": DELAY_MS,
        "rate_mbit": s.rate_bps as f64 / 1e6,
        "budget_mbit": budget_mbit,
        "peak_mbit": peak,
        "peak_over_budget": peak / budget_mbit as f64,
        "total_ms": e.elapsed_ms,
        "finished": e.finished,
        "completed": e.completed,
        "failed": e.failed,
        "memory_errors": errors,
        "per_vm_ms": e.vms.iter().map(|v| json!({
            "vm": v.vm,
            "total_ms": v.migration.as_ref().and_then(|m| m.report.as_ref()).map(|r| r.total_ms),
            "wire_bytes": v.migration.as_ref().and_then(|m| m.report.as_ref()).map(|r| r.wire_bytes),
        })).collect::<Vec<_>>(),
    }))
}
