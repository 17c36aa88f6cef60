//! Same-host migration: a new QEMU on this host takes over a running VM,
//! to upgrade or restart the hypervisor under it.
//!
//! * **Handover** (the default): the new QEMU maps the very RAM file of the
//!   old one (`memory-backend-file,share=on` on tmpfs or hugetlbfs) and both
//!   sides set `x-ignore-shared`, so only device state and a few ROM/ACPI
//!   blocks cross the local socket: no guest memory is copied. The new QEMU
//!   may be a different binary (`godwit upgrade --qemu`).
//! * **Copy**: an ordinary migration into a new QEMU with its own RAM file,
//!   over the same local socket; the baseline `godwit bench local` compares
//!   against.
//!
//! # Exactly one running copy on one RAM file
//! Both processes map the same memory, so the old QEMU must never run the
//! guest again once the new one has, and the other way round. The new QEMU
//! is told `stop` while it waits for the stream (QEMU then does not start
//! the guest after loading it, as with `-S`). The old QEMU completes only
//! after the new one has loaded everything (return path: the destination's
//! SHUT), and a completed source stays in `postmigrate` for good. Only then
//! does the agent `cont` the new QEMU. If anything fails before that, the
//! new QEMU never ran the guest: it is retired and the old one resumes. The
//! new instance is persisted in the VM record before it is told to load
//! state, so a restarted agent settles an interrupted handover the same way
//! (see `VmManager::readopt`).
//!
//! # Guest pause as the guest sees it
//! Besides QEMU's `downtime` and the STOP→RESUME timestamps of the two
//! QEMUs, the agent pings the guest tool over both QEMUs' guest channels
//! during the handover: the gap between the last answer through the old
//! QEMU and the first through the new one is the pause the guest's own
//! services saw (`local.guest_pause_ms`); its resolution is the median time
//! between answers before the handover (`local.guest_ping_interval_ms`).
//! The round trip of the first answer through the new QEMU
//! (`local.guest_first_answer_ms`) against that interval is what the new
//! process costs the guest after it runs: under TCG it translates the
//! guest's code afresh, so the first round trip takes several times a
//! warm one.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use godwit_qemu::{InstancePaths, LaunchMode, MigrationOutcome, QemuInstance};
use godwit_qmp::commands::{MigrationCapabilityStatus, MigrationParameters};
use serde_json::json;
use tracing::{debug, error, info, warn, Instrument};

use super::{new_id, MigrationError, MigrationJob};
use crate::api::types::{
    LocalMigrationReport, MigrationPhase, MigrationReport, StartMigration, VmState,
};
use crate::cpu::{qemu_non_vcpu, SenderCpu};
use crate::guest::GuestChannel;
use crate::vm::{VmHandle, STOP_GRACE};
use crate::Agent;

/// Whole-migration timeout of a same-host migration unless the request
/// sets one: a handover takes milliseconds, a copy of a large guest seconds.
const LOCAL_TIMEOUT: Duration = Duration::from_secs(600);
/// QEMU's `max-bandwidth` for a local copy: unlimited in practice.
const LOCAL_MAX_BANDWIDTH: u64 = 100_000_000_000;
/// QEMU's `downtime-limit` for a local migration, ms (QEMU's default). A
/// handover's final pass is device state only; a copy's local socket moves
/// GiB/s. Set explicitly because an earlier WAN migration attempt may have
/// left other values in the old QEMU.
const LOCAL_DOWNTIME_LIMIT_MS: u64 = 300;
/// How long one ping of the pause meter waits for its answer.
const PING_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between pings: the meter's resolution, and a bound on the load it
/// puts on the guest.
const PING_INTERVAL: Duration = Duration::from_millis(1);
/// How long the meter waits for the guest to answer through the new QEMU.
const PING_GIVE_UP: Duration = Duration::from_secs(10);

/// How the new QEMU gets the guest's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalMode {
    /// Shares the RAM file (`x-ignore-shared`); nothing is copied.
    Handover,
    /// Copies RAM into a RAM file of its own (baseline).
    Copy,
}

impl LocalMode {
    fn name(self) -> &'static str {
        match self {
            LocalMode::Handover => "handover",
            LocalMode::Copy => "local-copy",
        }
    }
}

/// Starts a same-host migration of `req.vm` in the background.
pub async fn start(
    agent: &Arc<Agent>,
    req: StartMigration,
) -> Result<Arc<MigrationJob>, MigrationError> {
    let mode = if req.copy {
        LocalMode::Copy
    } else {
        LocalMode::Handover
    };
    if req.direct {
        return Err(MigrationError::Refused {
            peer: agent.cfg.name.clone(),
            message: "--direct is a WAN baseline; a same-host migration never leaves the host"
                .into(),
        });
    }
    let vm = agent.vms.begin_migration(&req.vm)?;
    if mode == LocalMode::Handover {
        // Refuse before anything starts: a RAM file QEMU would not carry
        // over is silent guest memory loss (QEMU 7.2 skips every shared
        // block, named file or not).
        if let Err(e) = godwit_qemu::ram_backing(&vm.instance.ram_file) {
            agent.vms.set_state(&vm, VmState::Running);
            return Err(MigrationError::Refused {
                peer: agent.cfg.name.clone(),
                message: format!(
                    "a handover needs guest RAM in a tmpfs or hugetlbfs file: {}",
                    crate::error_chain(&e)
                ),
            });
        }
    }
    let job = Arc::new(MigrationJob::new(
        new_id(),
        req.vm.clone(),
        agent.cfg.name.clone(),
        agent.cfg.name.clone(),
        agent.cfg.site.clone(),
    ));
    agent.migrations.add_outgoing(job.clone());
    agent.metrics.migrations_started.inc();
    info!(
        migration = job.id,
        vm = req.vm,
        mode = mode.name(),
        "same-host migration started"
    );
    let a = agent.clone();
    let j = job.clone();
    let span = tracing::info_span!("local_migration", id = %job.id, vm = %req.vm);
    tokio::spawn(async move { run(a, j, vm, req, mode).await }.instrument(span));
    Ok(job)
}

/// What a successful local migration measured.
struct Done {
    /// Request to the guest running in the new QEMU.
    total_ms: u64,
    new: Arc<VmHandle>,
    qemu_downtime_ms: Option<u64>,
    stream_bytes: u64,
    report: LocalMigrationReport,
}

async fn run(
    agent: Arc<Agent>,
    job: Arc<MigrationJob>,
    vm: Arc<VmHandle>,
    req: StartMigration,
    mode: LocalMode,
) {
    let timeout = req.timeout_s.map_or(LOCAL_TIMEOUT, Duration::from_secs);
    let result = match tokio::time::timeout(timeout, drive(&agent, &job, &vm, &req, mode)).await {
        Ok(r) => r,
        Err(_) => Err(MigrationError::Timeout(timeout.as_secs())),
    };
    let mut report = MigrationReport {
        total_ms: job.started.elapsed().as_millis() as u64,
        ram_mib: vm.spec.memory_mib,
        mode: mode.name().into(),
        ..MigrationReport::default()
    };
    match result {
        Ok(done) => {
            report.success = true;
            report.total_ms = done.total_ms;
            report.downtime_ms = done.qemu_downtime_ms;
            report.stream_bytes = done.stream_bytes;
            report.guest_downtime_ms = super::source::guest_downtime_ms(
                vm.run_events().stopped_at_us,
                done.new.run_events().resumed_at_us,
            );
            report.sender_cpu_s = Some(done.report.cpu_s);
            debug!(stop_us = ?vm.run_events().stopped_at_us, resume_us = ?done.new.run_events().resumed_at_us, "qemu run events");
            report.local = Some(done.report);
            agent.metrics.migrations_completed.inc();
            info!(
                total_ms = report.total_ms,
                downtime_ms = ?report.downtime_ms,
                guest_pause_ms = ?report.local.as_ref().and_then(|l| l.guest_pause_ms),
                "same-host migration completed"
            );
            job.finish(MigrationPhase::Completed, report, None);
        }
        Err(e) => {
            let why = crate::error_chain(&e);
            agent.vms.set_state(&vm, VmState::Running);
            agent.metrics.migrations_failed.inc();
            error!(
                cause = why,
                "same-host migration failed; the VM keeps running in its QEMU"
            );
            job.finish(MigrationPhase::Failed, report, Some(why));
        }
    }
}

async fn drive(
    agent: &Arc<Agent>,
    job: &MigrationJob,
    vm: &Arc<VmHandle>,
    req: &StartMigration,
    mode: LocalMode,
) -> Result<Done, MigrationError> {
    let mut host = agent.vms.host().clone();
    if let Some(q) = &req.qemu {
        host.qemu_binary = q.clone();
    }
    let old_version = qemu_version(&vm.qmp).await;
    // Started early, so the guest has answered a few times before it pauses.
    let meter = PauseMeter::start(vm.guest.clone());
    let t0 = Instant::now();
    let id = godwit_qemu::new_instance_id();
    let mut paths = InstancePaths::new(&host, &vm.spec.name, &id);
    if mode == LocalMode::Handover {
        paths.ram_file = vm.instance.ram_file.clone();
    }
    let cpu = Mutex::new(SenderCpu::start(vm.instance.pid, true));
    job.set_phase(MigrationPhase::Preparing);
    let (new, new_qmp, new_events) =
        godwit_qemu::launch_with_paths(&vm.spec, &host, &id, &paths, LaunchMode::Incoming)
            .await
            .map_err(|source| {
                MigrationError::Vm(crate::vm::VmError::Qemu {
                    name: vm.spec.name.clone(),
                    source,
                })
            })?;
    let launch_ms = t0.elapsed().as_secs_f64() * 1e3;
    debug!(launch_ms, "new QEMU launched");
    // From here on the new QEMU must be retired (never terminated: in a
    // handover its RAM file is the guest's) unless it takes over.
    let guest = GuestChannel::spawn(vm.spec.name.clone(), new.guest_socket.clone());
    let t1 = Instant::now();
    let outcome = transfer(agent, job, vm, &new, &new_qmp, mode, &cpu, meter).await;
    let (qemu_downtime_ms, stream_bytes, meter) = match outcome {
        Ok(v) => v,
        Err(e) => {
            guest.close();
            let _ = agent.vms.set_handover(vm, None);
            if let Err(r) = retire_new(&new, &new_qmp, mode).await {
                warn!(cause = %crate::error_chain(&r), "could not stop the new QEMU");
            }
            // The old QEMU resumes the guest by itself when its migration
            // fails; make sure it was not left paused.
            if let Ok((status, false)) = vm.qemu_status().await {
                if status == "paused" {
                    let _ = vm.qmp("cont", json!({})).await;
                }
            }
            return Err(e);
        }
    };
    // The guest runs in the new QEMU: what follows is bookkeeping, which
    // the guest does not wait for, so the meter's first ping through the
    // new QEMU goes out now.
    let pause = tokio::spawn(meter.finish(guest.clone()));
    let transfer_ms = t1.elapsed().as_secs_f64() * 1e3;
    let total_ms = job.started.elapsed().as_millis() as u64;
    let new_version = qemu_version(&new_qmp).await;
    let new_pid = new.pid;
    let h = agent
        .vms
        .complete_handover(vm, new, new_qmp, new_events, guest)?;
    let guest_pause = pause.await.ok().flatten();
    let mut c = cpu.lock().unwrap_or_else(|p| p.into_inner()).clone();
    c.sample();
    // The new QEMU's own work: start-up and loading the state.
    let cpu_s = c.seconds() + qemu_non_vcpu(new_pid).unwrap_or_default().as_secs_f64();
    vm.guest.close();
    // The guest runs in the new QEMU: the old one's exit is not part of
    // the handover's time.
    let old = vm.clone();
    tokio::spawn(async move {
        let retired = match mode {
            LocalMode::Handover => {
                godwit_qemu::retire(&old.instance, Some(&old.qmp), STOP_GRACE).await
            }
            LocalMode::Copy => {
                godwit_qemu::terminate(&old.instance, Some(&old.qmp), STOP_GRACE).await
            }
        };
        if let Err(e) = retired {
            warn!(cause = %crate::error_chain(&e), "could not stop the old QEMU (it is paused for good)");
        }
    });
    Ok(Done {
        total_ms,
        new: h,
        qemu_downtime_ms,
        stream_bytes,
        report: LocalMigrationReport {
            old_qemu: old_version,
            new_qemu: new_version,
            ram_shared: mode == LocalMode::Handover,
            guest_pause_ms: guest_pause.as_ref().map(|p| p.gap_ms),
            guest_ping_interval_ms: guest_pause.as_ref().and_then(|p| p.interval_ms),
            guest_first_answer_ms: guest_pause.map(|p| p.first_answer_ms),
            cpu_s,
            launch_ms,
            transfer_ms,
        },
    })
}

/// Moves the state into the new QEMU and starts the guest there. Returns
/// QEMU's downtime, the bytes QEMU sent, and the guest-observed pause.
#[allow(clippy::too_many_arguments)]
async fn transfer(
    agent: &Arc<Agent>,
    job: &MigrationJob,
    vm: &Arc<VmHandle>,
    new: &QemuInstance,
    new_qmp: &godwit_qmp::QmpClient,
    mode: LocalMode,
    cpu: &Mutex<SenderCpu>,
    meter: PauseMeter,
) -> Result<(Option<u64>, u64, PauseMeter), MigrationError> {
    let qemu_err = |e: godwit_qemu::QemuError| {
        MigrationError::Vm(crate::vm::VmError::Qemu {
            name: vm.spec.name.clone(),
            source: e,
        })
    };
    let caps = match mode {
        LocalMode::Handover => vec![MigrationCapabilityStatus::new("x-ignore-shared", true)],
        LocalMode::Copy => Vec::new(),
    };
    // No autostart: the guest starts in the new QEMU only when the agent
    // says so, after the old one has completed (see the module doc).
    new_qmp
        .execute_timeout("stop", json!({}), crate::vm::QMP_TIMEOUT)
        .await
        .map_err(|e| qemu_err(e.into()))?;
    agent.vms.set_handover(vm, Some(new.clone()))?;
    let sock = new.dir.join("handover.sock");
    let uri = format!("unix:{}", sock.display());
    godwit_qemu::start_incoming(new_qmp, &uri, &caps)
        .await
        .map_err(qemu_err)?;
    let params = MigrationParameters {
        max_bandwidth: Some(LOCAL_MAX_BANDWIDTH),
        downtime_limit: Some(LOCAL_DOWNTIME_LIMIT_MS),
        ..Default::default()
    };
    job.set_phase(MigrationPhase::Transferring);
    crate::failpoint::hit(crate::failpoint::HANDOVER_BEFORE_MIGRATE);
    // `(events, false)` clears whatever a WAN attempt may have enabled.
    let mut src_caps = caps.clone();
    src_caps.extend(
        ["auto-converge", "xbzrle", "compress", "multifd"]
            .into_iter()
            .map(|c| MigrationCapabilityStatus::new(c, false)),
    );
    godwit_qemu::start_outgoing(&vm.qmp, &uri, &src_caps, &params)
        .await
        .map_err(qemu_err)?;
    let mut src_events = vm.qmp.subscribe();
    let outcome = godwit_qemu::wait_migration(&vm.qmp, &mut src_events, LOCAL_TIMEOUT, |_| {
        cpu.lock().unwrap_or_else(|p| p.into_inner()).sample();
    })
    .await
    .map_err(qemu_err)?;
    cpu.lock().unwrap_or_else(|p| p.into_inner()).sample();
    let info = match outcome {
        MigrationOutcome::Completed { info } => info,
        other => {
            return Err(MigrationError::Qemu {
                status: "failed".into(),
                desc: describe(&other),
            });
        }
    };
    // The old QEMU is in `postmigrate` for good: the new one may run.
    job.set_phase(MigrationPhase::Switchover);
    if let Some(net) = &agent.network {
        // Same host, same switch: only the NIC's socket changes.
        if let Err(e) = net.follow(&vm.spec.name, &new.net_socket).await {
            warn!(cause = %crate::error_chain(&e), "the NIC could not follow the guest to the new QEMU");
        }
    }
    crate::failpoint::hit(crate::failpoint::HANDOVER_BEFORE_CONT);
    let t_cont = Instant::now();
    new_qmp
        .execute_timeout("cont", json!({}), crate::vm::QMP_TIMEOUT)
        .await
        .map_err(|e| qemu_err(e.into()))?;
    debug!(
        cont_ms = t_cont.elapsed().as_secs_f64() * 1e3,
        "new QEMU continued"
    );
    let bytes = info.ram.as_ref().and_then(|r| r.transferred).unwrap_or(0);
    Ok((info.downtime, bytes, meter))
}

fn describe(o: &MigrationOutcome) -> String {
    match o {
        MigrationOutcome::Failed { error, .. } => error.clone().unwrap_or_else(|| "failed".into()),
        MigrationOutcome::Cancelled { .. } => "cancelled".into(),
        MigrationOutcome::Disconnected { last_status } => {
            format!("QMP closed (last status {last_status:?})")
        }
        MigrationOutcome::TimedOut { .. } => "timed out".into(),
        MigrationOutcome::Completed { .. } => "completed".into(),
    }
}

async fn retire_new(
    new: &QemuInstance,
    qmp: &godwit_qmp::QmpClient,
    mode: LocalMode,
) -> Result<godwit_qemu::Termination, godwit_qemu::QemuError> {
    match mode {
        LocalMode::Handover => godwit_qemu::retire(new, Some(qmp), STOP_GRACE).await,
        LocalMode::Copy => godwit_qemu::terminate(new, Some(qmp), STOP_GRACE).await,
    }
}

async fn qemu_version(qmp: &godwit_qmp::QmpClient) -> Option<String> {
    let v = qmp
        .execute_timeout("query-version", json!({}), crate::vm::QMP_TIMEOUT)
        .await
        .ok()?;
    let q = v.get("qemu")?;
    Some(format!(
        "{}.{}.{}",
        q.get("major")?.as_u64()?,
        q.get("minor")?.as_u64()?,
        q.get("micro")?.as_u64()?
    ))
}

/// Pings the guest tool through the old QEMU until it stops answering,
/// then through the new one until its first answer. Pinging the new QEMU
/// starts only when it is told to run: pings written before would queue
/// in the guest's port and delay the answer that counts.
struct PauseMeter {
    stop: tokio::sync::watch::Sender<bool>,
    old: Option<tokio::task::JoinHandle<Vec<(Instant, Instant)>>>,
}

impl Drop for PauseMeter {
    /// Stops the pings when a failed handover drops the meter.
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// What the pause meter saw.
struct PauseFigures {
    /// Last answer through the old QEMU to the first through the new, ms.
    gap_ms: f64,
    /// Median time between answers before the handover, ms: the meter's
    /// resolution (a ping's round trip through the guest tool).
    interval_ms: Option<f64>,
    /// Round trip of the first answered ping through the new QEMU, ms.
    first_answer_ms: f64,
}

impl PauseMeter {
    fn start(old: GuestChannel) -> Self {
        let (stop, rx) = tokio::sync::watch::channel(false);
        let old = tokio::spawn(async move { ping_loop(old, rx, false).await });
        Self {
            stop,
            old: Some(old),
        }
    }

    /// Waits for the first answer through `new`; `None` if the guest runs
    /// no tool (or it never answered on one side).
    async fn finish(mut self, new: GuestChannel) -> Option<PauseFigures> {
        let (_never, rx) = tokio::sync::watch::channel(false);
        let first_new = ping_loop(new, rx, true).await.first().copied();
        let _ = self.stop.send(true);
        let old = match self.old.take() {
            Some(t) => t.await.unwrap_or_default(),
            None => Vec::new(),
        };
        let (first_sent, first_answer) = first_new?;
        let (_, last_old) = *old.last()?;
        let gap = first_answer.saturating_duration_since(last_old);
        let mut gaps: Vec<f64> = old
            .windows(2)
            .map(|w| (w[1].1 - w[0].1).as_secs_f64() * 1e3)
            .collect();
        gaps.sort_by(f64::total_cmp);
        Some(PauseFigures {
            gap_ms: gap.as_secs_f64() * 1e3,
            interval_ms: gaps.get(gaps.len() / 2).copied(),
            first_answer_ms: (first_answer - first_sent).as_secs_f64() * 1e3,
        })
    }
}

/// Pings until told to stop; with `first`, until the first answer. Returns
/// when each answered ping was sent and when its answer came.
async fn ping_loop(
    ch: GuestChannel,
    mut stop: tokio::sync::watch::Receiver<bool>,
    first: bool,
) -> Vec<(Instant, Instant)> {
    let give_up = Instant::now() + PING_GIVE_UP;
    let mut answers = Vec::new();
    while !*stop.borrow() && Instant::now() < give_up {
        let sent = Instant::now();
        let ping = ch.request(json!({"cmd": "ping"}), PING_TIMEOUT);
        let ok = tokio::select! {
            r = ping => r.is_ok(),
            _ = stop.changed() => break,
        };
        if ok {
            answers.push((sent, Instant::now()));
            if first {
                break;
            }
        } else if !ch.info().connected {
            // Not connected yet (the new QEMU's socket) or any more.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(PING_INTERVAL).await;
    }
    answers
}

/// Whether `to` names this agent: then the migration stays on this host.
pub fn is_this_host(agent: &Agent, to: &str) -> bool {
    to == agent.cfg.name
}
