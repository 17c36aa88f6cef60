//! The destination's side of a migration.
//!
//! ```mermaid
//! stateDiagram-v2
//!   [*] --> Loading: PrepareIncoming (QEMU -incoming)
//!   Loading --> Running: QEMU loaded the state and started the guest
//!   Loading --> Failed: stream broke / QEMU died / abort / timeout
//!   Running --> [*]: the VM is ours
//!   Failed --> [*]: QEMU discarded
//! ```
//!
//! The outcome is decided here and only here: whatever this side answers
//! to `QueryOutcome` is final, and the source follows it. The deciding
//! fact is whether QEMU's SHUT message (which lets the source complete and
//! retire its copy) has left this host: the relay forwards it only through
//! the job's [`ReturnGate`], and the failure path fences that gate first.
//! A SHUT that passed means the VM is ours (`Running`); a fenced gate means
//! the source can never complete, so discarding our QEMU is safe. Which of
//! the two happened first is settled under the gate's lock, so there is no
//! window in which both copies, or neither, could be considered live.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use godwit_migstream::{Decoder, MemStore};
use godwit_qemu::{LaunchMode, VmSpec};
use godwit_wire::{
    ControlResponse, ErrorCode, Frame, IncomingOutcome, MemoryOpen, VersionRange, CODEC_PAGES_V1,
};
use tokio::net::UnixStream;
use tokio::sync::watch;
use tracing::{info, warn, Instrument};

use crate::api::types::VmState;
use crate::config::MemoryCodecSetting;
use crate::cpu::ReceiverCpu;
use crate::memcodec::{Inbound, SharedStore};
use crate::relay::{read_first_frame, run_destination, write_frame, RelayStats};
use crate::rpgate::ReturnGate;
use crate::vm::VmHandle;
use crate::Agent;

/// How often the destination checks whether its QEMU finished loading.
const WATCH_INTERVAL: Duration = Duration::from_millis(50);

/// One incoming migration.
pub struct IncomingJob {
    /// Migration id.
    pub id: String,
    /// Source agent.
    pub from: String,
    /// The destination VM (QEMU waiting for the stream).
    pub vm: Arc<VmHandle>,
    /// QEMU's incoming socket.
    pub socket: PathBuf,
    /// Relay counters.
    pub relay: Arc<RelayStats>,
    /// Gate on the return path's SHUT.
    pub gate: Arc<ReturnGate>,
    started: Instant,
    /// Receiving cost, metered from the launch of QEMU to the guest's
    /// start here ([`Self::receiver_cpu_s`]).
    cpu: ReceiverCpu,
    receiver_cpu_s: Mutex<Option<f64>>,
    stream_taken: AtomicBool,
    outcome: Mutex<IncomingOutcome>,
    cancel: watch::Sender<Option<String>>,
}

impl IncomingJob {
    /// What happened so far.
    pub fn outcome(&self) -> IncomingOutcome {
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn error(code: ErrorCode, message: impl Into<String>) -> ControlResponse {
    ControlResponse::Error {
        code,
        message: message.into(),
    }
}

/// Handles `PrepareIncoming`: launch QEMU waiting for the stream.
pub async fn prepare(
    agent: &Arc<Agent>,
    from: &str,
    migration_id: String,
    vm: serde_json::Value,
    direct: bool,
) -> ControlResponse {
    if agent.evacuations.maintenance() {
        return error(
            ErrorCode::Refused,
            format!("host {} is in maintenance: it takes no VM", agent.cfg.name),
        );
    }
    let mut spec: VmSpec = match serde_json::from_value(vm) {
        Ok(s) => s,
        Err(e) => return error(ErrorCode::BadRequest, format!("VM spec: {e}")),
    };
    if let Err(e) = spec.validate() {
        return error(ErrorCode::BadRequest, e.to_string());
    }
    if agent.migrations.incoming(&migration_id).is_some() {
        return error(
            ErrorCode::Conflict,
            format!("migration {migration_id} is already known here"),
        );
    }
    let name = spec.name.clone();
    if let Some(stale) = agent.migrations.incoming_loading(&name) {
        if stale.from == from {
            // The source asks again for a VM it is still sending: it runs
            // the VM and its earlier migration died with it (an agent
            // crash), though this side learns that only when the
            // connection times out. Settle the stale one as failed now; the
            // gate keeps this exact: had its SHUT left, the guest would run
            // here and the source could not be asking.
            let outcome = settle_failure(
                agent,
                &stale,
                format!("superseded by migration {migration_id} of the same VM from {from}"),
            )
            .await;
            info!(
                stale = stale.id,
                migration = migration_id,
                vm = name,
                ?outcome,
                "superseded a stale incoming migration"
            );
        }
    }
    unplug_nic_without_network(agent, &mut spec);
    let vm = match agent
        .vms
        .launch(spec, LaunchMode::Incoming, Some(migration_id.clone()))
        .await
    {
        Ok(h) => h,
        Err(crate::vm::VmError::Exists(n)) => {
            return error(
                ErrorCode::Conflict,
                format!("a VM named {n:?} already runs on {}", agent.cfg.name),
            );
        }
        Err(e) => return error(ErrorCode::Internal, crate::error_chain(&e)),
    };
    // The port connects to the new QEMU's NIC before any state arrives:
    // QEMU drops the post-migration RARP of a NIC with no peer (reference
    // network-continuity §1.1). Pending: it neither sends nor receives
    // until the claim.
    if let Some(net) = &agent.network {
        if let Err(e) = net.attach(&vm, godwit_overlay::PortState::Pending).await {
            agent.vms.remove(&vm).await;
            return error(ErrorCode::Internal, crate::error_chain(&e));
        }
    }
    let socket = agent.cfg.run_dir.join(format!("in-{migration_id}.sock"));
    let _ = std::fs::remove_file(&socket);
    let uri = if direct {
        // QEMU binds the port itself; ask the kernel for a free one first.
        match std::net::TcpListener::bind((agent.cfg.listen.ip(), 0)).and_then(|l| l.local_addr()) {
            Ok(a) => format!("tcp:{a}"),
            Err(e) => {
                agent.vms.remove(&vm).await;
                detach_nic(agent, &name).await;
                return error(
                    ErrorCode::Internal,
                    format!("no TCP port for a direct migration: {e}"),
                );
            }
        }
    } else {
        format!("unix:{}", socket.display())
    };
    let setup = async {
        vm.qmp(
            "migrate-set-capabilities",
            serde_json::json!({"capabilities": godwit_qemu::migration::destination_capabilities()}),
        )
        .await?;
        vm.qmp("migrate-incoming", serde_json::json!({"uri": uri}))
            .await
    };
    if let Err(e) = setup.await {
        agent.vms.remove(&vm).await;
        detach_nic(agent, &name).await;
        return error(ErrorCode::Internal, crate::error_chain(&e));
    }
    let (cancel, _) = watch::channel(None);
    let cpu = ReceiverCpu::start(vm.instance.pid);
    let job = Arc::new(IncomingJob {
        id: migration_id.clone(),
        from: from.into(),
        vm,
        socket,
        relay: Arc::new(RelayStats::default()),
        gate: Arc::new(ReturnGate::default()),
        started: Instant::now(),
        cpu,
        receiver_cpu_s: Mutex::new(None),
        // A direct migration never gets a relayed stream.
        stream_taken: AtomicBool::new(direct),
        outcome: Mutex::new(IncomingOutcome::Loading),
        cancel,
    });
    agent.migrations.add_incoming(job.clone());
    info!(
        migration = migration_id,
        vm = name,
        from,
        "prepared incoming migration"
    );
    let a = agent.clone();
    let span = tracing::info_span!("incoming", migration = %migration_id, vm = %name);
    tokio::spawn(watch_job(a, job).instrument(span));
    ControlResponse::Prepared {
        migration_id,
        direct_uri: direct.then_some(uri),
    }
}

/// Leaves the arriving VM's stream NIC without a link when this agent
/// runs no switch (the guest keeps its NIC, as hardware it migrated with).
fn unplug_nic_without_network(agent: &Agent, spec: &mut VmSpec) {
    if agent.network.is_some() {
        return;
    }
    if let Some(nic) = &mut spec.nic {
        if nic.netdev == godwit_qemu::NetdevSpec::Stream {
            warn!(
                vm = spec.name,
                "the arriving VM's NIC stays unconnected: [network] is disabled here"
            );
            nic.netdev = godwit_qemu::NetdevSpec::None;
        }
    }
}

async fn detach_nic(agent: &Agent, vm: &str) {
    if let Some(net) = &agent.network {
        net.remove_vm_port(vm).await;
    }
}

/// Declares the incoming side failed, unless the SHUT already left (then
/// the VM is ours). See the module docs for why this is exact.
async fn settle_failure(agent: &Agent, job: &IncomingJob, reason: String) -> IncomingOutcome {
    job.cancel.send_replace(Some(reason.clone()));
    let shut_passed = job.gate.fence();
    // With the gate fenced the source cannot complete; if QEMU nevertheless
    // runs the guest, keeping it is as consistent as discarding it, and it
    // holds the newest state.
    let running = shut_passed
        || (!job.vm.qmp.is_closed()
            && matches!(
                tokio::time::timeout(Duration::from_secs(2), job.vm.qemu_status()).await,
                Ok(Ok((_, true)))
            ));
    let decided = {
        let mut o = job.outcome.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(*o, IncomingOutcome::Loading | IncomingOutcome::Unknown) {
            *o = if running {
                IncomingOutcome::Running
            } else {
                IncomingOutcome::Failed {
                    reason: reason.clone(),
                }
            };
        }
        o.clone()
    };
    match &decided {
        IncomingOutcome::Failed { .. } => {
            warn!(
                migration = job.id,
                cause = reason,
                "incoming migration failed; discarding destination QEMU"
            );
            agent.vms.remove(&job.vm).await;
            detach_nic(agent, &job.vm.spec.name).await;
        }
        IncomingOutcome::Running => adopt(agent, job),
        _ => {}
    }
    decided
}

fn adopt(agent: &Agent, job: &IncomingJob) {
    if job.vm.state() != VmState::Running {
        *job.receiver_cpu_s.lock().unwrap_or_else(|p| p.into_inner()) = Some(job.cpu.seconds());
        agent.vms.set_state(&job.vm, VmState::Running);
        agent.metrics.incoming_completed.inc();
        if let Some(net) = agent.network.clone() {
            let vm = job.vm.spec.name.clone();
            tokio::spawn(async move { net.activate(&vm).await });
        }
        info!(
            migration = job.id,
            vm = job.vm.spec.name,
            "VM runs here now"
        );
    }
}

/// Waits for the destination QEMU to start the guest, to die, or for the
/// stream never to arrive.
async fn watch_job(agent: Arc<Agent>, job: Arc<IncomingJob>) {
    let no_stream_limit = Duration::from_secs(agent.cfg.migration.incoming_timeout_s);
    let total_limit = agent.cfg.migration_timeout() + Duration::from_secs(60);
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        if !matches!(job.outcome(), IncomingOutcome::Loading) {
            return;
        }
        if job.vm.qmp.is_closed() {
            settle_failure(
                &agent,
                &job,
                "destination QEMU exited while loading the state".into(),
            )
            .await;
            return;
        }
        if let Ok(Ok((_, true))) =
            tokio::time::timeout(Duration::from_secs(2), job.vm.qemu_status()).await
        {
            let newly = {
                let mut o = job.outcome.lock().unwrap_or_else(|p| p.into_inner());
                if matches!(*o, IncomingOutcome::Loading) {
                    *o = IncomingOutcome::Running;
                    true
                } else {
                    false
                }
            };
            if newly {
                adopt(&agent, &job);
            }
            return;
        }
        let waited = job.started.elapsed();
        if !job.stream_taken.load(Ordering::SeqCst) && waited > no_stream_limit {
            settle_failure(
                &agent,
                &job,
                format!("no migration stream arrived within {no_stream_limit:?}"),
            )
            .await;
            return;
        }
        if waited > total_limit {
            settle_failure(
                &agent,
                &job,
                format!("the migration did not finish within {total_limit:?}"),
            )
            .await;
            return;
        }
    }
}

/// Handles a `Memory` stream: connects it to the waiting QEMU.
pub async fn accept_memory_stream(
    agent: Arc<Agent>,
    peer: String,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let refuse = |why: String| Frame::Abort(why);
    let open = match read_first_frame(&mut recv).await {
        Ok(f @ Frame::Open(_)) => f,
        Ok(other) => {
            let _ = write_frame(
                &mut send,
                &refuse(format!("expected an open frame, got {:?}", other.kind())),
            )
            .await;
            return;
        }
        Err(e) => {
            warn!(peer, cause = %e, "memory stream without a header");
            return;
        }
    };
    let header: MemoryOpen = match open.json() {
        Ok(h) => h,
        Err(e) => {
            let _ = write_frame(&mut send, &refuse(format!("bad memory stream header: {e}"))).await;
            return;
        }
    };
    if let Err(e) = VersionRange::ours().negotiate(header.versions) {
        let _ = write_frame(&mut send, &refuse(e.to_string())).await;
        return;
    }
    let Some(job) = agent.migrations.incoming(&header.migration_id) else {
        let _ = write_frame(
            &mut send,
            &refuse(format!("unknown migration {}", header.migration_id)),
        )
        .await;
        return;
    };
    if job.from != peer {
        let _ = write_frame(
            &mut send,
            &refuse("migration belongs to another peer".into()),
        )
        .await;
        return;
    }
    if job.stream_taken.swap(true, Ordering::SeqCst)
        || !matches!(job.outcome(), IncomingOutcome::Loading)
    {
        let _ = write_frame(
            &mut send,
            &refuse("migration stream already attached or finished".into()),
        )
        .await;
        return;
    }
    // QEMU listens once migrate-incoming returned; allow it a moment.
    let mut qemu = None;
    for _ in 0..100 {
        match UnixStream::connect(&job.socket).await {
            Ok(s) => {
                qemu = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let Some(qemu) = qemu else {
        let why = format!(
            "cannot connect to the destination QEMU at {}",
            job.socket.display()
        );
        let _ = write_frame(&mut send, &refuse(why.clone())).await;
        settle_failure(&agent, &job, why).await;
        return;
    };
    // The page-aware codec when both sides want it; raw relaying otherwise.
    let pages =
        header.codec >= CODEC_PAGES_V1 && agent.cfg.migration.codec == MemoryCodecSetting::Pages;
    let (answer, mut inbound, greeting) = if pages {
        let (store, greeting): (SharedStore, Vec<Frame>) = match agent.site.clone() {
            Some(site) => {
                let spec = job.vm.spec.clone();
                let s = site.clone();
                let summaries = tokio::task::spawn_blocking(move || {
                    s.index_boot_media(spec.kernel.as_deref(), spec.initrd.as_deref());
                    s.summary_messages(&spec.name)
                })
                .await
                .unwrap_or_default();
                (
                    Box::new(site.incoming()),
                    summaries.into_iter().map(Frame::Codec).collect(),
                )
            }
            None => (Box::<MemStore>::default(), Vec::new()),
        };
        (
            ControlResponse::MemoryAccepted {
                codec: CODEC_PAGES_V1,
                summaries: greeting.len() as u32,
            },
            Inbound::Pages(Box::new(Decoder::new(store))),
            greeting,
        )
    } else {
        (ControlResponse::Ok, Inbound::raw(), Vec::new())
    };
    if let Err(e) = write_frame(&mut send, &Frame::control(&answer)).await {
        settle_failure(&agent, &job, format!("answering the source: {e}")).await;
        return;
    }
    let cancel = job.cancel.subscribe();
    let result = run_destination(
        qemu,
        recv,
        send,
        job.relay.clone(),
        job.gate.clone(),
        cancel,
        greeting,
        &mut inbound,
    )
    .await;
    if let Inbound::Pages(d) = &inbound {
        info!(migration = job.id, stats = ?d.stats(), "page-aware stream decoded");
    }
    // Unpin the store, write what arrived, shrink to the bound.
    drop(inbound);
    if let Some(site) = agent.site.clone() {
        let _ = tokio::task::spawn_blocking(move || site.settle()).await;
    }
    agent
        .metrics
        .relay_rx_bytes
        .add(job.relay.stream_bytes.load(Ordering::Relaxed));
    match result {
        Ok(()) => info!(migration = job.id, "migration stream finished"),
        Err(e) => {
            let outcome = settle_failure(
                &agent,
                &job,
                format!("migration stream: {}", crate::error_chain(&e)),
            )
            .await;
            info!(
                migration = job.id,
                ?outcome,
                "migration stream ended with an error"
            );
        }
    }
}

/// Handles `QueryOutcome`.
pub fn query(agent: &Agent, id: &str) -> ControlResponse {
    let outcome = agent
        .migrations
        .incoming(id)
        .map(|j| j.outcome())
        .or_else(|| agent.migrations.decided(id))
        .unwrap_or(IncomingOutcome::Unknown);
    ControlResponse::Outcome {
        migration_id: id.into(),
        outcome,
    }
}

/// Handles `AbortIncoming`.
pub async fn abort(agent: &Agent, id: &str, reason: String) -> ControlResponse {
    let outcome = match agent.migrations.incoming(id) {
        Some(job) => settle_failure(agent, &job, format!("aborted by the source: {reason}")).await,
        None => IncomingOutcome::Unknown,
    };
    ControlResponse::Outcome {
        migration_id: id.into(),
        outcome,
    }
}

/// Handles `Commit`: the source retired its copy.
pub fn commit(agent: &Agent, id: &str) -> ControlResponse {
    if let Some(job) = agent.migrations.incoming(id) {
        // The source completes on our SHUT, which may be before the
        // watcher's next look at QEMU: a passed SHUT already decided.
        if job.gate.shut_passed() {
            let newly = {
                let mut o = job.outcome.lock().unwrap_or_else(|p| p.into_inner());
                let loading = matches!(*o, IncomingOutcome::Loading);
                if loading {
                    *o = IncomingOutcome::Running;
                }
                loading
            };
            if newly {
                adopt(agent, &job);
            }
        }
    }
    match agent.migrations.incoming(id) {
        Some(job) if matches!(job.outcome(), IncomingOutcome::Running) => {
            info!(
                migration = id,
                vm = job.vm.spec.name,
                "source retired its copy"
            );
            // The source may commit before our watcher noticed the guest
            // run (SHUT passed first): meter now then.
            let cpu = job
                .receiver_cpu_s
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .unwrap_or_else(|| job.cpu.seconds());
            ControlResponse::Committed {
                receiver_cpu_s: Some(cpu),
                resumed_at_us: job.vm.run_events().resumed_at_us,
            }
        }
        Some(job) => error(
            ErrorCode::Conflict,
            format!("migration {id} is {:?}, not running", job.outcome()),
        ),
        None => error(ErrorCode::NotFound, format!("unknown migration {id}")),
    }
}
