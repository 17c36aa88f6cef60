//! `godwit migrate` and `godwit migration`.

use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use godwit_agent::api::types::{
    ConvergenceReport, MigrationInfo, MigrationPhase, MigrationProgress, StartMigration,
};
use godwit_agent::client::ApiClient;

use crate::output::{self, Out};
use crate::{Global, OperationFailed};

/// `godwit migrate VM --to SITE`.
#[derive(Args, Debug)]
pub struct MigrateCmd {
    /// VM name.
    pub vm: String,
    /// Destination site (or agent name).
    #[arg(long)]
    pub to: String,
    /// Downtime QEMU may aim for, ms.
    #[arg(long)]
    pub downtime_limit: Option<u64>,
    /// Give up after this many seconds (the VM keeps running here).
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Start the migration and return at once.
    #[arg(long)]
    pub no_wait: bool,
    /// Baseline: QEMU to QEMU over plain TCP, bypassing the agents' relay
    /// (unencrypted; for comparisons).
    #[arg(long)]
    pub direct: bool,
    /// When `--to` is this host: copy guest RAM into the new QEMU instead of
    /// handing its RAM file over (a baseline for comparisons).
    #[arg(long)]
    pub copy: bool,
}

/// `godwit upgrade VM`: a new QEMU on this host takes over the running VM.
#[derive(Args, Debug)]
pub struct UpgradeCmd {
    /// VM name.
    pub vm: String,
    /// QEMU binary of the new process (default: the agent's configured one).
    #[arg(long)]
    pub qemu: Option<std::path::PathBuf>,
    /// Give up after this many seconds (the VM keeps running in its QEMU).
    #[arg(long)]
    pub timeout: Option<u64>,
}

/// `godwit migration [ID]`.
#[derive(Args, Debug)]
pub struct ShowCmd {
    /// Migration id (default: all).
    pub id: Option<String>,
    /// Cancel this migration (the VM keeps running at the source).
    #[arg(long, requires = "id")]
    pub cancel: bool,
}

/// How often the CLI polls the agent.
const POLL: Duration = Duration::from_millis(100);
/// How often JSON progress lines are printed.
const JSON_PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Starts a migration and follows it to the end, drawing progress.
pub async fn migrate(client: &ApiClient, req: &StartMigration, out: Out) -> Result<MigrationInfo> {
    let started: MigrationInfo = client.post("/v1/migrations", req).await?;
    follow(client, &started.id, out).await
}

/// Polls a migration until it ends.
pub async fn follow(client: &ApiClient, id: &str, out: Out) -> Result<MigrationInfo> {
    let pb = out.progress_bar(1000);
    let t0 = Instant::now();
    let mut last_json = Instant::now();
    let mut last_note: Option<String> = None;
    loop {
        let m: MigrationInfo = client.get(&format!("/v1/migrations/{id}")).await?;
        if m.phase.is_terminal() {
            pb.finish_and_clear();
            return Ok(m);
        }
        if out.json && last_json.elapsed() >= JSON_PROGRESS_EVERY {
            out.emit("progress", &m);
            last_json = Instant::now();
        }
        // cargo's rule: nothing during the first 500 ms.
        if t0.elapsed() >= Duration::from_millis(500) {
            let p = &m.progress;
            let done = p.ram_total_bytes.saturating_sub(p.remaining_bytes);
            if let Some(permille) = (done * 1000).checked_div(p.ram_total_bytes) {
                pb.set_position(permille);
            }
            pb.set_prefix(format!("{:?}", m.phase).to_lowercase());
            pb.set_message(progress_line(p));
            // A throttle changes the guest's life: say it above the bar
            // once, in full (a hidden bar prints nothing).
            if p.convergence_action.is_some() && p.convergence_action != last_note {
                last_note = p.convergence_action.clone();
                if let Some(n) = &last_note {
                    pb.println(format!("godwit: {n}"));
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The progress bar's text. The agent's predictions (WAN delay and
/// reduction included) replace QEMU's raw `expected-downtime` and the
/// naive ETA when the agent has them; `~` marks QEMU's own figures.
fn progress_line(p: &MigrationProgress) -> String {
    // The effective rate is what QEMU's stream drains at; with the codec
    // reducing, it is above the rate on the wire.
    let rate = if p.effective_bps > 0.0 {
        p.effective_bps
    } else {
        p.rate_bps
    };
    let downtime = match (p.predicted_downtime_ms, p.expected_downtime_ms) {
        (Some(d), _) => output::ms(d),
        (None, Some(d)) => format!("~{}", output::ms(d)),
        (None, None) => "-".into(),
    };
    let eta = match (p.predicted_total_ms, p.eta_ms) {
        (Some(t), _) => output::ms(t.saturating_sub(p.elapsed_ms)),
        // Our model says it will not converge as things stand.
        (None, _) if p.converging == Some(false) => "never".into(),
        (None, Some(e)) => format!("~{}", output::ms(e)),
        (None, None) => "-".into(),
    };
    let mut s = format!(
        "sent {}  {}  dirty {}  left {}  downtime {}  ETA {}",
        output::bytes(p.transferred_bytes),
        output::rate(rate),
        output::rate(p.dirty_rate_bps),
        output::bytes(p.remaining_bytes),
        downtime,
        eta,
    );
    if let Some(r) = p.reduction_ratio.filter(|r| *r > 1.05) {
        s.push_str(&format!("  x{r:.1}"));
    }
    match p.cpu_throttle_pct.filter(|t| *t > 0) {
        Some(t) => s.push_str(&format!("  THROTTLED {t}%")),
        None if p.convergence_action.is_some() => s.push_str("  throttling"),
        None => {}
    }
    s
}

/// Human rendering of a finished migration.
pub fn summary(m: &MigrationInfo) -> String {
    let mut s = format!(
        "migration {} of {}: {} -> {} ({})\n",
        m.id,
        m.vm,
        m.from,
        m.to,
        format!("{:?}", m.phase).to_lowercase()
    );
    if let Some(r) = &m.report {
        s.push_str(&format!(
            "  total time      {}\n  downtime        {}\n  bytes on wire   {} ({} per GiB of RAM); QUIC/UDP {}\n  stream bytes    {}\n  guest RAM       {} MiB, {} passes, mode {}\n",
            output::ms(r.total_ms),
            match (r.guest_downtime_ms, r.downtime_ms) {
                (Some(g), Some(q)) => format!("{} (guest paused; QEMU counts {})", output::ms(g), output::ms(q)),
                (Some(g), None) => output::ms(g),
                (None, Some(q)) => format!("{} (QEMU)", output::ms(q)),
                (None, None) => "-".into(),
            },
            output::bytes(r.wire_bytes),
            output::bytes(r.wire_bytes_per_gib as u64),
            output::bytes(r.transport_bytes),
            output::bytes(r.stream_bytes),
            r.ram_mib,
            r.passes,
            r.mode
        ));
    }
    if let Some(l) = m.report.as_ref().and_then(|r| r.local.as_ref()) {
        s.push_str(&format!(
            "  same host       QEMU {} -> {}, RAM {}, guest saw a pause of {}, CPU {:.3} s\n",
            l.old_qemu.as_deref().unwrap_or("?"),
            l.new_qemu.as_deref().unwrap_or("?"),
            if l.ram_shared {
                "handed over (0 bytes copied)"
            } else {
                "copied"
            },
            l.guest_pause_ms
                .map_or("-".into(), |p| format!("{p:.1} ms")),
            l.cpu_s,
        ));
    }
    if let Some(c) = m.report.as_ref().and_then(|r| r.codec.as_ref()) {
        let sh = &c.shares;
        let pct = |x: f64| format!("{:.1} %", x * 100.0);
        s.push_str(&format!(
            "  pages           zero {}, sent before {}, site store {}, earlier image {}, disk {}, delta {}, literal {}\n  compression     {:.2}x{}\n",
            pct(sh.zero), pct(sh.intra), pct(sh.store), pct(sh.image), pct(sh.disk), pct(sh.delta), pct(sh.literal),
            c.compression_ratio(),
            c.fallback.as_ref().map(|f| format!("; fell back to raw {f}")).unwrap_or_default(),
        ));
    }
    if let Some(r) = &m.report {
        if let Some(n) = r.wire_bytes_per_nonzero_gib {
            s.push_str(&format!(
                "  per non-zero    {} on the wire per GiB of non-zero RAM\n",
                output::bytes(n as u64)
            ));
        }
        let cpu = |x: Option<f64>| x.map(|v| format!("{v:.2} s")).unwrap_or_else(|| "-".into());
        s.push_str(&format!(
            "  CPU             sender {} (agent {}), receiver {}\n",
            cpu(r.sender_cpu_s),
            cpu(r.sender_agent_cpu_s),
            cpu(r.receiver_cpu_s)
        ));
    }
    if let Some(c) = m.report.as_ref().and_then(|r| r.convergence.as_ref()) {
        s.push_str(&convergence_summary(c));
    }
    if let Some(e) = &m.error {
        s.push_str(&format!("  error           {e}\n"));
    }
    s.trim_end().to_owned()
}

/// The report's convergence lines: QEMU's limit, the predicted pause,
/// the throttle, and every action but routine limit changes.
fn convergence_summary(c: &ConvergenceReport) -> String {
    let mut s = format!(
        "  convergence     target {}, QEMU limit {}, predicted pause {}",
        output::ms(c.downtime_target_ms),
        c.qemu_downtime_limit_ms
            .map(output::ms)
            .unwrap_or_else(|| "-".into()),
        c.predicted_downtime_ms
            .map(output::ms)
            .unwrap_or_else(|| "-".into()),
    );
    if c.effective_bps > 0.0 {
        s.push_str(&format!(", effective {}", output::rate(c.effective_bps)));
    }
    if let Some(r) = c.reduction_ratio {
        s.push_str(&format!(" (x{r:.1} the wire)"));
    }
    s.push('\n');
    if c.max_throttle_pct > 0 {
        s.push_str(&format!(
            "  throttle        up to {} % from {}\n",
            c.max_throttle_pct,
            c.throttle_started_ms
                .map(output::ms)
                .unwrap_or_else(|| "-".into())
        ));
    }
    for e in c.events.iter().filter(|e| e.kind != "downtime-limit") {
        s.push_str(&format!(
            "  {:<15} at {}: {}\n",
            e.kind,
            output::ms(e.at_ms),
            e.text
        ));
    }
    s
}

/// Runs `godwit migrate`.
pub async fn run(c: MigrateCmd, g: &Global, out: Out) -> Result<()> {
    let client = g.client();
    let req = StartMigration {
        vm: c.vm,
        to: c.to,
        downtime_limit_ms: c.downtime_limit,
        timeout_s: c.timeout,
        direct: c.direct,
        qemu: None,
        copy: c.copy,
    };
    if c.no_wait {
        let m: MigrationInfo = client.post("/v1/migrations", &req).await?;
        out.result("migration", &m, || format!("started migration {}", m.id));
        return Ok(());
    }
    let m = migrate(&client, &req, out).await?;
    conclude(m, out)
}

/// Runs `godwit upgrade`: a same-host migration to this very agent.
pub async fn upgrade(c: UpgradeCmd, g: &Global, out: Out) -> Result<()> {
    let client = g.client();
    let me: godwit_agent::api::types::AgentStatus = client.get("/v1/status").await?;
    let req = StartMigration {
        vm: c.vm,
        to: me.name,
        downtime_limit_ms: None,
        timeout_s: c.timeout,
        direct: false,
        qemu: c.qemu,
        copy: false,
    };
    let m = migrate(&client, &req, out).await?;
    conclude(m, out)
}

/// Prints the summary; a migration that did not complete is an error.
fn conclude(m: MigrationInfo, out: Out) -> Result<()> {
    out.result("summary", &m, || summary(&m));
    match m.phase {
        MigrationPhase::Completed => Ok(()),
        MigrationPhase::Undecided => Err(OperationFailed(format!(
            "migration {} is undecided: {}",
            m.id,
            m.error.unwrap_or_default()
        ))
        .into()),
        _ => Err(OperationFailed(format!(
            "migration {} failed; {} keeps running at {}: {}",
            m.id,
            m.vm,
            m.from,
            m.error.unwrap_or_default()
        ))
        .into()),
    }
}

/// Runs `godwit migration`.
pub async fn show(c: ShowCmd, g: &Global, out: Out) -> Result<()> {
    let client = g.client();
    match c.id {
        Some(id) if c.cancel => {
            let _: MigrationInfo = client
                .post(
                    &format!("/v1/migrations/{id}/cancel"),
                    &serde_json::json!({}),
                )
                .await?;
            let m = follow(&client, &id, out).await?;
            out.result("summary", &m, || summary(&m));
        }
        Some(id) => {
            let m: MigrationInfo = client.get(&format!("/v1/migrations/{id}")).await?;
            out.result("migration", &m, || summary(&m));
        }
        None => {
            let ms: Vec<MigrationInfo> = client.get("/v1/migrations").await?;
            out.result("migrations", &ms, || {
                ms.iter().map(summary).collect::<Vec<_>>().join("\n")
            });
        }
    }
    Ok(())
}
