//! `godwit demo`: the README's main job. Two sites over a 50 ms, 100 Mbit/s
//! emulated WAN, a guest running memdirty, a live migration through the
//! agents, a memory check, a report; the lab is removed at the end.

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use crate::cmd::lab::{parse_duration, parse_rate};
use crate::labenv;
use crate::output::Out;
use crate::scenario;

/// `godwit demo`.
#[derive(Args, Debug)]
pub struct DemoCmd {
    /// One-way WAN delay.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    delay: std::time::Duration,
    /// WAN rate.
    #[arg(long, default_value = "100mbit", value_parser = parse_rate)]
    rate: u64,
    /// Guest RAM, MiB.
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// Memory memdirty fills and keeps dirtying, MiB.
    #[arg(long, default_value_t = 64)]
    dirty_mib: u64,
    /// Pages memdirty re-dirties per second.
    #[arg(long, default_value_t = 500)]
    dirty_rate: u64,
    /// Keep the lab up afterwards.
    #[arg(long)]
    keep: bool,
}

const VM: &str = "demo";

/// Runs the demo.
pub async fn run(c: DemoCmd, out: Out) -> Result<()> {
    if godwit_lab::topology::load_state(&labenv::state_dir())?.is_some() {
        bail!("a lab is already up; remove it with `godwit lab down` first");
    }
    out.note("[1/5] guest image");
    crate::guestimg::ensure(out, None, "/var/cache/godwit/image".into()).await?;
    out.note(format!(
        "[2/5] lab: 2 sites, {:?} one-way, {} Mbit/s",
        c.delay,
        c.rate as f64 / 1e6
    ));
    let up = crate::cmd::lab::UpArgs {
        sites: 2,
        delay: c.delay,
        rate: c.rate,
        loss: 0.0,
        jitter: std::time::Duration::ZERO,
        queue: None,
        accel: godwit_qemu::Accel::Tcg,
        kernel_vxlan: Vec::new(),
        gateway: Vec::new(),
    };
    labenv::up(&up.spec(), up.accel).await?;
    let result = demo(&c, out).await;
    if !c.keep {
        out.note("tearing the lab down");
        if let Err(e) = labenv::down() {
            eprintln!("godwit: warning: lab teardown: {e:#}");
        }
    }
    result
}

async fn demo(c: &DemoCmd, out: Out) -> Result<()> {
    let (a, b) = (scenario::site("a"), scenario::site("b"));
    out.note(format!(
        "[3/5] booting VM {VM:?} ({} MiB) at site a; memdirty {} MiB at {} pages/s",
        c.memory, c.dirty_mib, c.dirty_rate
    ));
    let boot_id = scenario::boot(&a, VM, c.memory, out).await?;
    scenario::memdirty(&a, VM, c.dirty_mib, c.dirty_rate).await?;
    out.note("[4/5] live migration a -> b through the agents");
    let m = scenario::migrate(&a, VM, "b", false, 600, out).await?;
    if m.phase != godwit_agent::api::types::MigrationPhase::Completed {
        bail!(crate::OperationFailed(format!(
            "migration failed: {}",
            m.error.clone().unwrap_or_default()
        )));
    }
    out.note("[5/5] verifying the guest at site b");
    let v = scenario::verify(&b, VM, &boot_id)
        .await
        .context("verifying at the destination")?;
    scenario::assert_gone(&a, VM).await?;
    let summary = json!({"migration": m, "verification": v});
    out.result("summary", &summary, || {
        format!(
            "{}\n  guest memory    {} pages checked, {} errors\n  guest           {} at site b (same boot: {}), uptime {:.1} s\n  source          QEMU at site a retired",
            crate::cmd::migrate::summary(&m),
            v.pages,
            v.errors,
            if v.errors == 0 { "running" } else { "CORRUPTED" },
            v.same_boot,
            v.uptime_ms as f64 / 1000.0
        )
    });
    if v.errors != 0 || !v.same_boot {
        bail!(
            "guest verification failed: {} memory errors, same boot {}",
            v.errors,
            v.same_boot
        );
    }
    Ok(())
}
