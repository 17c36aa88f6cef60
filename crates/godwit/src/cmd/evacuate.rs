//! `godwit maintenance HOST` and `godwit evacuate HOST`.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use godwit_agent::api::types::{AgentStatus, MigrationPhase, SetMaintenance};
use godwit_agent::client::ApiClient;
use godwit_agent::evacuate::{EvacuationInfo, EvacuationParams, StartEvacuation};
use serde_json::Value;

use crate::output::{self, Out};
use crate::{Global, OperationFailed};

/// How often the CLI polls an evacuation.
const POLL: Duration = Duration::from_millis(500);

/// `godwit maintenance HOST`.
#[derive(Args, Debug)]
pub struct MaintenanceCmd {
    /// The host (agent name) this CLI talks to.
    pub host: String,
    /// Leave maintenance.
    #[arg(long)]
    pub off: bool,
}

/// `godwit evacuate HOST --to SITE[,SITE...]`.
#[derive(Args, Debug)]
pub struct EvacuateCmd {
    /// The host (agent name) this CLI talks to.
    pub host: String,
    /// Destination sites (or agents), used in turn.
    #[arg(long, value_delimiter = ',', required_unless_present = "resume")]
    pub to: Vec<String>,
    /// Total WAN bandwidth of all its migrations, e.g. 50mbit.
    #[arg(long, value_parser = crate::cmd::lab::parse_rate)]
    pub max_bandwidth: Option<u64>,
    /// Migrations at once.
    #[arg(long, default_value_t = 2)]
    pub parallel: usize,
    /// Resume an interrupted evacuation with its saved parameters.
    #[arg(long)]
    pub resume: bool,
}

/// The CLI talks to one agent: `host` must be it.
async fn check_host(client: &ApiClient, host: &str) -> Result<AgentStatus> {
    let me: AgentStatus = client.get("/v1/status").await?;
    if me.name != host {
        bail!(
            "this CLI talks to agent {:?}, not {host:?} (use --site or --socket to reach {host})",
            me.name
        );
    }
    Ok(me)
}

/// Runs `godwit maintenance`.
pub async fn maintenance(c: MaintenanceCmd, g: &Global, out: Out) -> Result<()> {
    let client = g.client();
    check_host(&client, &c.host).await?;
    let v: Value = client
        .post("/v1/maintenance", &SetMaintenance { on: !c.off })
        .await?;
    out.result("maintenance", &v, || {
        format!(
            "{} is {}",
            c.host,
            if c.off {
                "out of maintenance"
            } else {
                "in maintenance: it takes no new VM"
            }
        )
    });
    Ok(())
}

/// Runs `godwit evacuate` and follows it to the end.
pub async fn evacuate(c: EvacuateCmd, g: &Global, out: Out) -> Result<()> {
    let client = g.client();
    check_host(&client, &c.host).await?;
    let req = StartEvacuation {
        params: (!c.resume).then(|| EvacuationParams {
            to: c.to.clone(),
            max_bandwidth_bps: c.max_bandwidth,
            parallel: c.parallel,
        }),
        resume: c.resume,
    };
    let mut e: EvacuationInfo = client.post("/v1/evacuation", &req).await?;
    let bar = out.progress_bar(e.vms.len() as u64);
    while !e.finished {
        tokio::time::sleep(POLL).await;
        e = client.get("/v1/evacuation").await?;
        bar.set_position((e.completed + e.failed) as u64);
        bar.set_message(running(&e));
    }
    bar.finish_and_clear();
    out.result("evacuation", &e, || summary(&e));
    if e.failed > 0 {
        return Err(OperationFailed(format!(
            "{} of {} VMs are still on {}; `godwit evacuate {} --resume` tries them again",
            e.failed,
            e.vms.len(),
            e.host,
            e.host
        ))
        .into());
    }
    Ok(())
}

fn running(e: &EvacuationInfo) -> String {
    e.vms
        .iter()
        .filter_map(|v| {
            let m = v.migration.as_ref()?;
            (!m.phase.is_terminal()).then(|| {
                let p = &m.progress;
                format!(
                    "{} -> {}: {} of {}",
                    v.vm,
                    v.to,
                    output::bytes(p.transferred_bytes),
                    output::bytes(p.ram_total_bytes)
                )
            })
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn summary(e: &EvacuationInfo) -> String {
    let mut s = format!(
        "evacuation of {}: {} of {} VMs moved in {}{}\n",
        e.host,
        e.completed,
        e.vms.len(),
        output::ms(e.elapsed_ms),
        e.params
            .max_bandwidth_bps
            .map(|b| format!(" under {}", output::rate(b as f64)))
            .unwrap_or_default()
    );
    for v in &e.vms {
        let (phase, detail) = match &v.migration {
            None => ("not started".to_owned(), String::new()),
            Some(m) => (
                format!("{:?}", m.phase).to_lowercase(),
                match (&m.report, &m.error) {
                    (_, Some(err)) if m.phase != MigrationPhase::Completed => err.clone(),
                    (Some(r), _) => format!(
                        "{}, downtime {}, {} on the wire",
                        output::ms(r.total_ms),
                        r.guest_downtime_ms
                            .or(r.downtime_ms)
                            .map_or("-".into(), output::ms),
                        output::bytes(r.wire_bytes)
                    ),
                    _ => String::new(),
                },
            ),
        };
        s.push_str(&format!(
            "  {:<16} {:>6} MiB -> {:<8} {:<10} {}\n",
            v.vm, v.ram_mib, v.to, phase, detail
        ));
    }
    s
}
