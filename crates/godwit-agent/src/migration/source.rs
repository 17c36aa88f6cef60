//! The source's side of a migration: prepare the destination, point QEMU
//! at the relay, watch progress, and decide the outcome.
//!
//! ```mermaid
//! stateDiagram-v2
//!   [*] --> Preparing
//!   Preparing --> Transferring: destination QEMU waits; memory stream open
//!   Preparing --> Failed: destination refused or unreachable
//!   Transferring --> Switchover: QEMU paused the guest
//!   Transferring --> Failed: error while the guest still runs here
//!   Switchover --> Completed: QEMU completed (destination sent SHUT)
//!   Switchover --> Deciding: error after the guest paused
//!   Deciding --> Completed: destination says running
//!   Deciding --> Failed: destination says failed; guest resumes here
//!   Deciding --> Undecided: destination unreachable until the deadline
//! ```

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use godwit_migstream::{Encoder, EncoderConfig, QemuFormat};
use godwit_transport::StreamPurpose;
use godwit_wire::{
    ControlRequest, ControlResponse, Frame, IncomingOutcome, MemoryOpen, VersionRange,
    CODEC_PAGES_V1, CODEC_RAW,
};
use serde_json::{json, Value};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, error, info, warn, Instrument};

use super::converge::{Action, Converge, ConvergeConfig, QemuParams, QemuPhase, Sample};
use super::{new_id, MigrationError, MigrationJob};
use crate::api::types::{ConvergenceReport, MemoryCodecReport};
use crate::api::types::{
    MigrationPhase, MigrationProgress, MigrationReport, StartMigration, VmState,
};
use crate::config::{MemoryCodecSetting, PeerEntry};
use crate::cpu::SenderCpu;
use crate::memcodec::Outbound;
use crate::relay::{read_first_frame, run_source, write_frame, RelayError};
use crate::vm::VmHandle;
use crate::Agent;

/// How often QEMU's progress is sampled.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);
/// Time allowed for the destination to launch its QEMU.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(60);
/// Time allowed for the destination's summaries to arrive.
const SUMMARY_TIMEOUT: Duration = Duration::from_secs(60);
/// Time allowed for QEMU to connect to the relay socket after `migrate`.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(15);
/// QEMU's `max-bandwidth`, bytes/s: effectively unlimited, because the
/// relay's flow window is what paces QEMU (see `godwit_wire::window`).
const MAX_BANDWIDTH: u64 = 100_000_000_000;
/// Time allowed for one `migrate-set-parameters` of the convergence
/// controller; QEMU answers slowly while its migration thread holds the
/// big lock, and a late action is better skipped than waited for.
const ACTION_TIMEOUT: Duration = Duration::from_secs(2);

/// Validates the request and starts the migration in the background.
pub async fn start(
    agent: &Arc<Agent>,
    req: StartMigration,
) -> Result<Arc<MigrationJob>, MigrationError> {
    start_with_budget(agent, req, None).await
}

/// Like [`start`], with the WAN bytes paced by a budget shared with other
/// migrations (an evacuation).
pub async fn start_with_budget(
    agent: &Arc<Agent>,
    req: StartMigration,
    budget: Option<Arc<crate::pace::RateBudget>>,
) -> Result<Arc<MigrationJob>, MigrationError> {
    if super::local::is_this_host(agent, &req.to) {
        return super::local::start(agent, req).await;
    }
    if req.qemu.is_some() || req.copy {
        return Err(MigrationError::Refused {
            peer: req.to.clone(),
            message: "--qemu and --copy are for a migration on the same host".into(),
        });
    }
    let peer = agent.peers.resolve(&req.to)?;
    let vm = agent.vms.begin_migration(&req.vm)?;
    let mut job = MigrationJob::new(
        new_id(),
        req.vm.clone(),
        agent.cfg.name.clone(),
        peer.name.clone(),
        peer.site.clone(),
    );
    job.direct = req.direct;
    job.budget = budget;
    let job = Arc::new(job);
    agent.migrations.add_outgoing(job.clone());
    agent.metrics.migrations_started.inc();
    info!(
        migration = job.id,
        vm = req.vm,
        to = peer.name,
        "migration started"
    );
    let a = agent.clone();
    let j = job.clone();
    let span = tracing::info_span!("migration", id = %job.id, vm = %req.vm, to = %peer.name);
    tokio::spawn(async move { run(a, j, vm, peer, req).await }.instrument(span));
    Ok(job)
}

/// How a migration ended.
enum Ending {
    /// The VM runs at the destination.
    Completed,
    /// The VM runs here.
    Failed(String),
    /// Nobody knows; the VM is paused here, the socket is held.
    Undecided(String, UnixStream),
}

async fn run(
    agent: Arc<Agent>,
    job: Arc<MigrationJob>,
    vm: Arc<VmHandle>,
    peer: PeerEntry,
    req: StartMigration,
) {
    let mut convergence = None;
    let ending = drive(&agent, &job, &vm, &peer, &req, &mut convergence).await;
    let last = last_stats(&vm).await;
    let mut report = build_report(&job, &vm, last.as_ref());
    report.convergence = convergence;
    agent.metrics.record_migration(&report);
    match ending {
        Ending::Completed => {
            report.success = true;
            // Tell the destination it owns the VM, then retire our copy.
            let commit = ControlRequest::Commit {
                migration_id: job.id.clone(),
            };
            match agent
                .peers
                .call(&peer, commit, Duration::from_secs(5))
                .await
            {
                Ok(ControlResponse::Committed {
                    receiver_cpu_s,
                    resumed_at_us,
                }) => {
                    report.receiver_cpu_s = receiver_cpu_s;
                    report.guest_downtime_ms =
                        guest_downtime_ms(vm.run_events().stopped_at_us, resumed_at_us);
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(cause = %crate::error_chain(&e), "could not confirm the commit to the destination (it owns the VM anyway)");
                }
            }
            if let Some(net) = &agent.network {
                net.fence_vm(&vm.spec.name).await;
            }
            agent.vms.remove(&vm).await;
            if let Some(net) = &agent.network {
                net.remove_vm_port(&vm.spec.name).await;
            }
            agent.metrics.migrations_completed.inc();
            info!(total_ms = report.total_ms, downtime_ms = ?report.downtime_ms, wire_bytes = report.wire_bytes, "migration completed");
            job.finish(MigrationPhase::Completed, report, None);
        }
        Ending::Failed(why) => {
            agent.vms.set_state(&vm, VmState::Running);
            if let Some(net) = &agent.network {
                if let Err(e) = net.recover(&vm).await {
                    warn!(cause = %crate::error_chain(&e), "could not take the guest's network location back");
                }
            }
            agent.metrics.migrations_failed.inc();
            error!(cause = why, "migration failed; the VM keeps running here");
            job.finish(MigrationPhase::Failed, report, Some(why));
        }
        Ending::Undecided(why, socket) => {
            agent.metrics.migrations_failed.inc();
            error!(cause = why, "migration undecided; the VM stays paused here");
            job.finish(MigrationPhase::Undecided, report, Some(why));
            // Holding the socket keeps QEMU from failing the migration and
            // resuming a guest that may run at the destination.
            agent
                .held_sockets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(socket);
        }
    }
}

async fn drive(
    agent: &Arc<Agent>,
    job: &Arc<MigrationJob>,
    vm: &Arc<VmHandle>,
    peer: &PeerEntry,
    req: &StartMigration,
    convergence: &mut Option<ConvergenceReport>,
) -> Ending {
    // 1. The destination launches QEMU waiting for the stream.
    let spec = match serde_json::to_value(&vm.spec) {
        Ok(v) => v,
        Err(e) => return Ending::Failed(format!("cannot serialise the VM spec: {e}")),
    };
    let prep = ControlRequest::PrepareIncoming {
        migration_id: job.id.clone(),
        vm: spec,
        direct: req.direct,
    };
    let direct_uri = match agent.peers.call(peer, prep, PREPARE_TIMEOUT).await {
        Ok(ControlResponse::Prepared { direct_uri, .. }) => direct_uri,
        Ok(ControlResponse::Error { message, .. }) => {
            return Ending::Failed(format!("destination {} refused: {message}", peer.name))
        }
        Ok(other) => {
            return Ending::Failed(format!("destination {} answered {other:?}", peer.name))
        }
        Err(e) => return Ending::Failed(crate::error_chain(&e)),
    };
    let cancelled = job.cancel.borrow().clone();
    if let Some(reason) = cancelled {
        abort_destination(agent, peer, &job.id, &reason).await;
        return Ending::Failed(reason);
    }
    let result = match (req.direct, direct_uri) {
        (false, _) => transfer(agent, job, vm, peer, req, convergence).await,
        (true, Some(uri)) => transfer_direct(agent, job, vm, peer, req, &uri, convergence).await,
        (true, None) => Err(MigrationError::Refused {
            peer: peer.name.clone(),
            message: "the destination did not offer a direct address".into(),
        }),
    };
    match result {
        Ok(ending) => ending,
        Err(e) => {
            let why = crate::error_chain(&e);
            abort_destination(agent, peer, &job.id, &why).await;
            Ending::Failed(why)
        }
    }
}

/// The convergence controller's settings for this migration. `act` is off
/// for the `--direct` baseline, which keeps QEMU's stock behaviour.
fn converge_config(agent: &Agent, req: &StartMigration, act: bool) -> ConvergeConfig {
    let m = &agent.cfg.migration;
    ConvergeConfig {
        downtime_target: Duration::from_millis(
            req.downtime_limit_ms.unwrap_or(m.downtime_limit_ms),
        ),
        timeout: Duration::from_secs(req.timeout_s.unwrap_or(m.timeout_s)),
        may_throttle: m.auto_converge,
        act,
        stall_ratio: m.stall_ratio,
        throttle_trigger_pct: m.throttle_trigger_pct,
        throttle_increment_pct: m.throttle_increment_pct,
        device_allowance: Duration::from_millis(m.device_state_allowance_ms),
    }
}

/// Sets QEMU's migration capabilities and parameters for this migration;
/// `params` come from the convergence controller.
async fn configure_qemu(
    agent: &Agent,
    vm: &VmHandle,
    params: &QemuParams,
) -> Result<(), MigrationError> {
    let mut caps = godwit_qemu::migration::source_capabilities();
    caps.extend(
        [
            ("auto-converge", agent.cfg.migration.auto_converge),
            ("xbzrle", false),
            ("multifd", false),
            ("postcopy-ram", false),
        ]
        .into_iter()
        .map(|(c, s)| godwit_qmp::commands::MigrationCapabilityStatus::new(c, s)),
    );
    vm.qmp("migrate-set-capabilities", json!({ "capabilities": caps }))
        .await?;
    let mut args = serde_json::Map::new();
    args.insert("max-bandwidth".into(), json!(MAX_BANDWIDTH));
    for (k, v) in params.pairs() {
        args.insert(k.into(), json!(v));
    }
    vm.qmp("migrate-set-parameters", Value::Object(args))
        .await?;
    Ok(())
}

/// Applies one action of the convergence controller. A failure is logged
/// and otherwise ignored: convergence control helps a migration, it must
/// never be the reason one fails.
async fn apply_action(vm: &VmHandle, a: &Action) {
    let pairs = a.params.pairs();
    if pairs.is_empty() {
        warn!(kind = a.kind.name(), "{}", a.reason);
        return;
    }
    let args: serde_json::Map<String, Value> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    match tokio::time::timeout(
        ACTION_TIMEOUT,
        vm.qmp("migrate-set-parameters", Value::Object(args)),
    )
    .await
    {
        Ok(Ok(_)) => match a.kind {
            super::converge::ActionKind::DowntimeLimit => {
                debug!(kind = a.kind.name(), "{}", a.reason)
            }
            _ => info!(kind = a.kind.name(), "{}", a.reason),
        },
        Ok(Err(e)) => {
            warn!(kind = a.kind.name(), cause = %e, reason = a.reason, "QEMU refused a convergence action")
        }
        Err(_) => {
            warn!(
                kind = a.kind.name(),
                reason = a.reason,
                "QEMU did not answer a convergence action in time"
            )
        }
    }
}

/// One controller sample from `query-migrate` and the relay's counters.
fn sample_from(job: &MigrationJob, v: &Value, rtt: Duration) -> Sample {
    let page = u64_field(v, &["ram", "page-size"]).unwrap_or(4096);
    Sample {
        elapsed: job.started.elapsed(),
        phase: QemuPhase::from_status(&str_field(v, "status").unwrap_or_default()),
        remaining_bytes: u64_field(v, &["ram", "remaining"]).unwrap_or(0),
        dirty_bytes_per_s: u64_field(v, &["ram", "dirty-pages-rate"]).unwrap_or(0) as f64
            * page as f64,
        passes: u64_field(v, &["ram", "dirty-sync-count"]).unwrap_or(0),
        throttle_pct: u64_field(v, &["cpu-throttle-percentage"]).unwrap_or(0),
        qemu_bytes_per_s: v
            .pointer("/ram/mbps")
            .and_then(Value::as_f64)
            .unwrap_or(0.0)
            * 1e6
            / 8.0,
        stream_bytes: job.relay.stream_bytes.load(Ordering::Relaxed),
        wire_bytes: job.relay.wire_bytes(),
        outstanding_wire_bytes: job.relay.outstanding.load(Ordering::Relaxed),
        rtt,
    }
}

/// Puts the controller's estimates and predictions into the progress.
fn add_predictions(p: &mut MigrationProgress, c: &Converge) {
    let e = c.estimates();
    p.effective_bps = e.effective_bytes_per_s.unwrap_or(0.0) * 8.0;
    p.reduction_ratio = e.reduction_ratio;
    p.predicted_total_ms = e.predicted_total.map(|d| d.as_millis() as u64);
    p.predicted_downtime_ms = e.predicted_downtime.map(|d| d.as_millis() as u64);
    p.converging = e.converging;
    p.convergence_action = c.last_action().map(str::to_owned);
}

/// The stream format of the VM's QEMU (its version); the baseline format
/// when QEMU does not say.
async fn qemu_format(vm: &VmHandle) -> QemuFormat {
    match vm.qmp("query-version", json!({})).await {
        Ok(v) => {
            let q = &v["qemu"];
            let major = q["major"].as_u64().unwrap_or(7) as u16;
            let minor = q["minor"].as_u64().unwrap_or(2) as u16;
            QemuFormat::for_version(major, minor)
        }
        Err(e) => {
            warn!(cause = %e, "query-version failed; assuming QEMU 7.2's stream format");
            QemuFormat::default()
        }
    }
}

/// Baseline path: QEMU to QEMU over plain TCP through the same network,
/// with the same QEMU settings, so the relay can be compared with it.
async fn transfer_direct(
    agent: &Arc<Agent>,
    job: &Arc<MigrationJob>,
    vm: &Arc<VmHandle>,
    peer: &PeerEntry,
    req: &StartMigration,
    uri: &str,
    convergence: &mut Option<ConvergenceReport>,
) -> Result<Ending, MigrationError> {
    // The destination names its port; its address is the one we reach it at.
    let port = uri.rsplit(':').next().unwrap_or_default();
    let uri = format!("tcp:{}:{port}", peer.addr.ip());
    // The baseline keeps QEMU's stock convergence: the controller only
    // predicts. The control connection (already up) gives the link's RTT.
    let link = agent.peers.connection(peer).await.ok();
    let rtt = || link.as_ref().map(|c| c.rtt()).unwrap_or_default();
    let mut conv = Converge::new(converge_config(agent, req, false));
    configure_qemu(agent, vm, &conv.initial_parameters(rtt())).await?;
    start_cpu_meter(job, vm, false);
    vm.qmp("migrate", json!({ "uri": uri })).await?;
    job.set_phase(MigrationPhase::Transferring);
    let timeout_s = req.timeout_s.unwrap_or(agent.cfg.migration.timeout_s);
    let deadline = Instant::now() + Duration::from_secs(timeout_s);
    loop {
        tokio::time::sleep(PROGRESS_INTERVAL).await;
        let Some(stats) = last_stats(vm).await else {
            return Err(MigrationError::Qemu {
                status: "unknown".into(),
                desc: "QEMU stopped answering".into(),
            });
        };
        sample_cpu(job);
        let status = str_field(&stats, "status").unwrap_or_default();
        let mut p = progress_from(job, &stats);
        p.wire_bytes = p.transferred_bytes;
        job.relay
            .stream_bytes
            .store(p.transferred_bytes, Ordering::Relaxed);
        job.relay
            .wire_tx
            .store(p.transferred_bytes, Ordering::Relaxed);
        conv.observe(sample_from(job, &stats, rtt()));
        *convergence = Some(conv.report());
        add_predictions(&mut p, &conv);
        job.set_progress(p);
        match status.as_str() {
            "completed" => return Ok(Ending::Completed),
            "failed" | "cancelled" => {
                ensure_running(vm).await;
                return Err(MigrationError::Qemu {
                    status,
                    desc: str_field(&stats, "error-desc").unwrap_or_default(),
                });
            }
            "active" | "setup" => {}
            _ => {
                if job.phase() == MigrationPhase::Transferring {
                    job.set_phase(MigrationPhase::Switchover);
                }
            }
        }
        let cancelled = job.cancel.borrow().clone();
        if cancelled.is_some() || Instant::now() > deadline {
            let _ = vm.qmp("migrate_cancel", json!({})).await;
            wait_qemu_terminal(vm).await;
            if migration_status(vm).await.as_deref() == Some("completed") {
                return Ok(Ending::Completed);
            }
            ensure_running(vm).await;
            return Err(match cancelled {
                Some(reason) => MigrationError::Cancelled(reason),
                None => MigrationError::Timeout(timeout_s),
            });
        }
    }
}

async fn abort_destination(agent: &Agent, peer: &PeerEntry, id: &str, why: &str) {
    let req = ControlRequest::AbortIncoming {
        migration_id: id.into(),
        reason: why.into(),
    };
    if let Err(e) = agent.peers.call(peer, req, Duration::from_secs(5)).await {
        // The destination also discards its QEMU when the stream breaks or
        // never arrives, so this is only a courtesy.
        warn!(cause = %crate::error_chain(&e), "could not tell the destination to abort");
    }
}

/// Steps 2-4: open the stream, start QEMU's migration, relay, decide.
/// An `Err` means the guest never paused: it still runs here.
async fn transfer(
    agent: &Arc<Agent>,
    job: &Arc<MigrationJob>,
    vm: &Arc<VmHandle>,
    peer: &PeerEntry,
    req: &StartMigration,
    convergence: &mut Option<ConvergenceReport>,
) -> Result<Ending, MigrationError> {
    // 2. The memory stream, accepted by the destination before QEMU starts.
    let conn = agent.peers.connection(peer).await?;
    let (mut send, mut recv) = conn.open(StreamPurpose::Memory).await.map_err(|source| {
        crate::peer::PeerError::Transport {
            peer: peer.name.clone(),
            source,
        }
    })?;
    let offer = match agent.cfg.migration.codec {
        MemoryCodecSetting::Pages => CODEC_PAGES_V1,
        MemoryCodecSetting::Raw => CODEC_RAW,
    };
    let open = MemoryOpen {
        versions: VersionRange::ours(),
        migration_id: job.id.clone(),
        codec: offer,
    };
    write_frame(&mut send, &Frame::open(&open))
        .await
        .map_err(MigrationError::Relay)?;
    let (codec, summaries) = match read_first_frame(&mut recv)
        .await
        .map_err(MigrationError::Relay)?
    {
        f @ Frame::Control(_) => match f.json::<ControlResponse>() {
            // A destination without the page-aware codec.
            Ok(ControlResponse::Ok) => (CODEC_RAW, 0),
            Ok(ControlResponse::MemoryAccepted { codec, summaries }) if codec <= offer => {
                (codec, summaries)
            }
            Ok(other) => {
                return Err(MigrationError::Refused {
                    peer: peer.name.clone(),
                    message: format!("{other:?}"),
                })
            }
            Err(e) => return Err(MigrationError::Relay(RelayError::Protocol(e.to_string()))),
        },
        Frame::Abort(why) => {
            return Err(MigrationError::Refused {
                peer: peer.name.clone(),
                message: why,
            })
        }
        other => {
            return Err(MigrationError::Relay(RelayError::Protocol(format!(
                "unexpected {:?} frame",
                other.kind()
            ))))
        }
    };
    let mut outbound = if codec == CODEC_PAGES_V1 {
        let format = qemu_format(vm).await;
        let mut enc = Encoder::new(format, EncoderConfig::default())
            .map_err(|e| MigrationError::Relay(RelayError::Codec(e.to_string())))?;
        // What the destination holds, before QEMU sends a page.
        for _ in 0..summaries {
            let f = tokio::time::timeout(SUMMARY_TIMEOUT, read_first_frame(&mut recv))
                .await
                .map_err(|_| {
                    MigrationError::Relay(RelayError::Protocol(
                        "the destination's summaries did not arrive".into(),
                    ))
                })?
                .map_err(MigrationError::Relay)?;
            match f {
                Frame::Codec(p) => enc
                    .handle_message(&p)
                    .map_err(|e| MigrationError::Relay(RelayError::Codec(e.to_string())))?,
                other => {
                    return Err(MigrationError::Relay(RelayError::Protocol(format!(
                        "expected a summary, got a {:?} frame",
                        other.kind()
                    ))))
                }
            }
        }
        let recorder = agent.site.as_ref().and_then(|s| s.recorder(&vm.spec.name));
        enc.keep_new_pages(recorder.is_some());
        Outbound::Pages(Box::new(enc), recorder)
    } else {
        Outbound::raw()
    };
    info!(migration = job.id, codec, "memory stream accepted");

    // 3. QEMU migrates into our socket.
    let path = agent.cfg.run_dir.join(format!("out-{}.sock", job.id));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|source| MigrationError::Io {
        what: format!("binding the relay socket {}", path.display()),
        source,
    })?;
    let mut conv = Converge::new(converge_config(agent, req, true));
    let initial = conv.initial_parameters(conn.rtt());
    info!(
        rtt_ms = conn.rtt().as_millis() as u64,
        qemu_downtime_limit_ms = initial.downtime_limit_ms,
        "QEMU's downtime limit set for the WAN delay"
    );
    configure_qemu(agent, vm, &initial).await?;
    start_cpu_meter(job, vm, true);
    vm.qmp(
        "migrate",
        json!({"uri": format!("unix:{}", path.display())}),
    )
    .await?;
    let accepted = tokio::time::timeout(ACCEPT_TIMEOUT, listener.accept()).await;
    let _ = std::fs::remove_file(&path);
    let mut qemu = match accepted {
        Ok(Ok((s, _))) => s,
        Ok(Err(source)) => {
            return Err(MigrationError::Io {
                what: "accepting QEMU's migration connection".into(),
                source,
            })
        }
        Err(_) => {
            let _ = vm.qmp("migrate_cancel", json!({})).await;
            return Err(MigrationError::Io {
                what: "QEMU did not connect to the relay socket".into(),
                source: std::io::Error::from(std::io::ErrorKind::TimedOut),
            });
        }
    };
    job.set_phase(MigrationPhase::Transferring);

    // 4. Relay, while sampling QEMU's progress.
    let timeout_s = req.timeout_s.unwrap_or(agent.cfg.migration.timeout_s);
    let deadline = Instant::now() + Duration::from_secs(timeout_s);
    let cancel_rx = job.cancel.subscribe();
    let before = conn.stats();
    let rtt_conn = conn.clone();
    let sample_conn = conn.clone();
    let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
    let mut timed_out = false;
    // The relay runs in a task of its own. Sampling progress over QMP can
    // block for a while during switch-over (QEMU's migration thread holds
    // the big QEMU lock while it writes the final state); if the relay
    // shared a task with the sampler, it would stop draining QEMU's
    // socket exactly then, QEMU would block on the write still holding the
    // lock, and the switch-over would crawl.
    let stats = job.relay.clone();
    // An evacuation's migrations share one bandwidth budget.
    let send = crate::pace::PacedWriter::new(send, job.budget.clone());
    let mut relay = tokio::spawn(async move {
        let r = run_source(
            &mut qemu,
            recv,
            send,
            move || rtt_conn.rtt(),
            stats,
            cancel_rx,
            &mut outbound,
        )
        .await;
        (r, qemu, outbound)
    });
    let (result, qemu, outbound) = loop {
        tokio::select! {
            r = &mut relay => match r {
                Ok(ended) => break ended,
                Err(e) => {
                    // The relay task panicked (a bug): the socket went with
                    // it, so QEMU decides by itself; treat as a failure.
                    return Err(MigrationError::Io { what: "the relay task failed".into(), source: std::io::Error::other(e.to_string()) });
                }
            },
            _ = tick.tick() => {
                sample_cpu(job);
                if let Some(stats) = last_stats(vm).await {
                    let status = str_field(&stats, "status").unwrap_or_default();
                    if status != "active" && status != "setup" && job.phase() == MigrationPhase::Transferring {
                        job.set_phase(MigrationPhase::Switchover);
                    }
                    let sample = sample_from(job, &stats, sample_conn.rtt());
                    let qemu_mbit = sample.qemu_bytes_per_s * 8e-6;
                    for a in conv.observe(sample) {
                        apply_action(vm, &a).await;
                    }
                    if conv.near_switchover() && !job.relay.drain.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        debug!("switch-over near: the relay drains its backlog");
                    }
                    let e = conv.estimates();
                    debug!(
                        effective_mbit = e.effective_bytes_per_s.unwrap_or(0.0) * 8e-6,
                        wire_mbit = e.wire_bytes_per_s.unwrap_or(0.0) * 8e-6,
                        qemu_mbit,
                        dirty_mbit = e.dirty_bytes_per_s * 8e-6,
                        predicted_total_ms = e.predicted_total.map(|d| d.as_millis() as u64),
                        predicted_downtime_ms = e.predicted_downtime.map(|d| d.as_millis() as u64),
                        converging = e.converging,
                        "convergence estimates"
                    );
                    let mut p = progress_from(job, &stats);
                    add_predictions(&mut p, &conv);
                    job.set_progress(p);
                }
                if !timed_out && Instant::now() > deadline {
                    timed_out = true;
                    job.cancel.send_replace(Some(format!("the migration did not finish within {timeout_s} s")));
                }
            }
        }
    };
    sample_cpu(job);
    *convergence = Some(conv.report());
    if let Outbound::Pages(enc, _) = &outbound {
        let report = MemoryCodecReport::from_encoder(enc.stats(), enc.fallback());
        if let Ok(mut c) = job.relay.codec.lock() {
            *c = Some(report);
        }
    }
    // Write the recorded image and shrink the store off the async threads.
    drop(outbound);
    if let Some(site) = agent.site.clone() {
        let _ = tokio::task::spawn_blocking(move || site.settle()).await;
    }
    let after = conn.stats();
    job.transport_bytes.store(
        (after.bytes_sent + after.bytes_received)
            .saturating_sub(before.bytes_sent + before.bytes_received),
        Ordering::Relaxed,
    );
    agent
        .metrics
        .relay_tx_bytes
        .add(job.relay.stream_bytes.load(Ordering::Relaxed));

    // 5. Decide.
    match result {
        Ok(()) => match wait_qemu_terminal(vm).await {
            Some((s, _)) if s == "completed" => Ok(Ending::Completed),
            Some((s, desc)) => {
                ensure_running(vm).await;
                Err(MigrationError::Qemu { status: s, desc })
            }
            None => Ok(decide_after_pause(
                agent,
                job,
                vm,
                peer,
                qemu,
                "QEMU did not report an end".into(),
            )
            .await),
        },
        Err(relay_err) => {
            let why = if let Some(reason) = job.cancel.borrow().clone() {
                reason
            } else if timed_out {
                format!("the migration did not finish within {timeout_s} s")
            } else {
                crate::error_chain(&relay_err)
            };
            // The destination's SHUT may have arrived just before the error.
            if migration_status(vm).await.as_deref() == Some("completed") {
                return Ok(Ending::Completed);
            }
            match vm.qemu_status().await {
                Ok((_, true)) => {
                    // The guest never paused: the destination cannot hold
                    // its device state. Cancel and keep running here.
                    drop(qemu);
                    let _ = vm.qmp("migrate_cancel", json!({})).await;
                    wait_qemu_terminal(vm).await;
                    ensure_running(vm).await;
                    match job.cancel.borrow().clone() {
                        Some(reason) => Err(MigrationError::Cancelled(reason)),
                        None => Err(MigrationError::Relay(relay_err)),
                    }
                }
                _ => Ok(decide_after_pause(agent, job, vm, peer, qemu, why).await),
            }
        }
    }
}

/// The guest is paused here and the stream broke: ask the destination.
async fn decide_after_pause(
    agent: &Arc<Agent>,
    job: &MigrationJob,
    vm: &Arc<VmHandle>,
    peer: &PeerEntry,
    qemu: UnixStream,
    why: String,
) -> Ending {
    job.set_phase(MigrationPhase::Deciding);
    warn!(
        cause = why,
        "stream failed after the guest paused; asking the destination"
    );
    let deadline = Instant::now() + Duration::from_secs(agent.cfg.migration.decision_timeout_s);
    loop {
        let q = ControlRequest::QueryOutcome {
            migration_id: job.id.clone(),
        };
        match agent.peers.call(peer, q, Duration::from_secs(5)).await {
            Ok(ControlResponse::Outcome {
                outcome: IncomingOutcome::Running,
                ..
            }) => {
                // Kill our QEMU while still holding its socket, so it can
                // never resume the guest.
                let _ = godwit_qemu::terminate(&vm.instance, None, Duration::ZERO).await;
                drop(qemu);
                return Ending::Completed;
            }
            Ok(ControlResponse::Outcome {
                outcome: IncomingOutcome::Failed { reason },
                ..
            }) => {
                drop(qemu);
                wait_qemu_terminal(vm).await;
                ensure_running(vm).await;
                return Ending::Failed(format!("{why}; destination: {reason}"));
            }
            Ok(ControlResponse::Outcome {
                outcome: IncomingOutcome::Unknown,
                ..
            }) => {
                // The destination has no record: nothing runs there.
                drop(qemu);
                wait_qemu_terminal(vm).await;
                ensure_running(vm).await;
                return Ending::Failed(format!(
                    "{why}; the destination has no record of the migration"
                ));
            }
            Ok(_) | Err(_) => {}
        }
        if Instant::now() > deadline {
            return Ending::Undecided(
                format!("{why}; destination unreachable: the VM stays paused here until an operator decides"),
                qemu,
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Resumes the guest if QEMU left it paused after a failed migration.
async fn ensure_running(vm: &VmHandle) {
    for _ in 0..50 {
        match vm.qemu_status().await {
            Ok((_, true)) => return,
            Ok((status, false)) => {
                // QEMU resumes by itself after a failed precopy; `cont`
                // covers the states where it does not.
                if status != "finish-migrate" {
                    let _ = vm.qmp("cont", json!({})).await;
                }
            }
            Err(_) => return,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn last_stats(vm: &VmHandle) -> Option<Value> {
    tokio::time::timeout(Duration::from_secs(2), vm.qmp("query-migrate", json!({})))
        .await
        .ok()?
        .ok()
}

async fn migration_status(vm: &VmHandle) -> Option<String> {
    last_stats(vm).await.and_then(|v| str_field(&v, "status"))
}

/// Waits (bounded) for QEMU's migration to reach an end state; returns it
/// with QEMU's error description.
async fn wait_qemu_terminal(vm: &VmHandle) -> Option<(String, String)> {
    for _ in 0..100 {
        if let Some(v) = last_stats(vm).await {
            let s = str_field(&v, "status").unwrap_or_default();
            if matches!(s.as_str(), "completed" | "failed" | "cancelled") {
                return Some((s, str_field(&v, "error-desc").unwrap_or_default()));
            }
        } else if vm.qmp.is_closed() {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

fn str_field(v: &Value, k: &str) -> Option<String> {
    v.get(k).and_then(Value::as_str).map(str::to_owned)
}

fn u64_field(v: &Value, path: &[&str]) -> Option<u64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_u64().or_else(|| cur.as_f64().map(|f| f as u64))
}

fn progress_from(job: &MigrationJob, v: &Value) -> MigrationProgress {
    let page = u64_field(v, &["ram", "page-size"]).unwrap_or(4096);
    let rate_bps = v
        .pointer("/ram/mbps")
        .and_then(Value::as_f64)
        .unwrap_or(0.0)
        * 1e6;
    let remaining = u64_field(v, &["ram", "remaining"]).unwrap_or(0);
    let dirty = u64_field(v, &["ram", "dirty-pages-rate"]).unwrap_or(0) as f64 * page as f64;
    let eta_ms = if rate_bps > 0.0 {
        let net = rate_bps / 8.0 - dirty;
        (net > 0.0).then(|| (remaining as f64 / net * 1000.0) as u64)
    } else {
        None
    };
    MigrationProgress {
        elapsed_ms: job.started.elapsed().as_millis() as u64,
        qemu_status: str_field(v, "status"),
        ram_total_bytes: u64_field(v, &["ram", "total"]).unwrap_or(0),
        transferred_bytes: u64_field(v, &["ram", "transferred"]).unwrap_or(0),
        remaining_bytes: remaining,
        rate_bps,
        dirty_rate_bps: dirty * 8.0,
        expected_downtime_ms: u64_field(v, &["expected-downtime"]),
        eta_ms,
        passes: u64_field(v, &["ram", "dirty-sync-count"]).unwrap_or(0),
        wire_bytes: job.relay.wire_bytes(),
        cpu_throttle_pct: u64_field(v, &["cpu-throttle-percentage"]),
        relay_window_bytes: job.relay.window.load(Ordering::Relaxed),
        relay_outstanding_bytes: job.relay.outstanding.load(Ordering::Relaxed),
        // Filled in by `add_predictions`.
        ..MigrationProgress::default()
    }
}

fn build_report(job: &MigrationJob, vm: &VmHandle, last: Option<&Value>) -> MigrationReport {
    let wire = job.relay.wire_bytes();
    let ram_mib = vm.spec.memory_mib;
    let codec = job.relay.codec.lock().ok().and_then(|c| c.clone());
    let nonzero_bytes = codec
        .as_ref()
        .map(|c| c.nonzero_pages * godwit_migstream::PAGE_SIZE as u64);
    MigrationReport {
        success: false,
        total_ms: job.started.elapsed().as_millis() as u64,
        downtime_ms: last.and_then(|v| u64_field(v, &["downtime"])),
        guest_downtime_ms: None,
        setup_ms: last.and_then(|v| u64_field(v, &["setup-time"])),
        qemu_total_ms: last.and_then(|v| u64_field(v, &["total-time"])),
        wire_bytes: wire,
        stream_bytes: job.relay.stream_bytes.load(Ordering::Relaxed),
        transport_bytes: job.transport_bytes.load(Ordering::Relaxed),
        ram_mib,
        wire_bytes_per_gib: if ram_mib > 0 {
            wire as f64 * 1024.0 / ram_mib as f64
        } else {
            0.0
        },
        mode: if job.direct {
            "qemu-direct".into()
        } else if codec.is_some() {
            "pages".into()
        } else {
            "relay".into()
        },
        passes: last
            .and_then(|v| u64_field(v, &["ram", "dirty-sync-count"]))
            .unwrap_or(0),
        codec,
        sender_cpu_s: job
            .sender_cpu
            .lock()
            .ok()
            .and_then(|c| c.as_ref().map(|c| c.seconds())),
        sender_agent_cpu_s: job
            .sender_cpu
            .lock()
            .ok()
            .and_then(|c| c.as_ref().map(|c| c.agent_seconds())),
        receiver_cpu_s: None,
        nonzero_bytes,
        wire_bytes_per_nonzero_gib: nonzero_bytes
            .filter(|n| *n > 0)
            .map(|n| wire as f64 * (1u64 << 30) as f64 / n as f64),
        // Set by `run` from the controller.
        convergence: None,
        local: None,
    }
}

/// The guest's real pause: from the source QEMU stopping it to the
/// destination QEMU resuming it, by the two hosts' clocks (exact in the
/// lab, where both are one host; NTP-accurate otherwise). QEMU's own
/// `downtime` ends when the source hears SHUT back, one WAN trip later.
pub(super) fn guest_downtime_ms(
    stopped_at_us: Option<i64>,
    resumed_at_us: Option<i64>,
) -> Option<u64> {
    let d = resumed_at_us? - stopped_at_us?;
    // A negative or absurd difference means the clocks disagree: no figure.
    (0..3_600_000_000).contains(&d).then_some((d / 1000) as u64)
}

/// Starts metering the sender's CPU just before QEMU starts migrating.
fn start_cpu_meter(job: &MigrationJob, vm: &VmHandle, agent_carries_stream: bool) {
    if let Ok(mut c) = job.sender_cpu.lock() {
        *c = Some(SenderCpu::start(vm.instance.pid, agent_carries_stream));
    }
}

/// Reads QEMU's migration thread while it still exists.
fn sample_cpu(job: &MigrationJob) {
    if let Ok(mut c) = job.sender_cpu.lock() {
        if let Some(c) = c.as_mut() {
            c.sample();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_downtime_needs_both_clocks_and_sane_order() {
        assert_eq!(
            guest_downtime_ms(Some(1_000_000), Some(1_250_000)),
            Some(250)
        );
        assert_eq!(guest_downtime_ms(Some(2_000_000), Some(1_000_000)), None);
        assert_eq!(guest_downtime_ms(None, Some(1)), None);
    }
}
