//! Maintenance mode and host evacuation.
//!
//! A host in **maintenance** takes no new VM: `vm create` and incoming
//! migrations are refused (a same-host handover is still allowed: it is
//! how the host's hypervisor gets upgraded). The flag is a file in the
//! state directory, so it survives agent restarts.
//!
//! An **evacuation** moves every VM off this host to the given sites: the
//! host goes into maintenance first (nothing migrates back meanwhile), the
//! VMs go largest first (with `parallel` at a time, longest-processing-time
//! first keeps the last migration from starting late and bounds the total
//! time), destinations alternate over the sites in that order, and every
//! migration paces its WAN bytes with one [`RateBudget`] shared by all, so
//! the evacuation as a whole stays within `max_bandwidth` however many run.
//! Its parameters are persisted while it runs, with a marker that it is
//! running. An agent that died mid-evacuation finds the marker when it
//! starts again and resumes by itself ([`resume_interrupted`]) once it has
//! re-adopted its VMs and reaches the destinations: the VMs still here go,
//! the ones that left stay gone (a migration the crash cut failed, so its
//! VM still runs here and goes again). An evacuation that ended with
//! failed migrations keeps its parameters for `resume` by hand.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::api::types::{MigrationInfo, MigrationPhase, StartMigration, VmState};
use crate::pace::RateBudget;
use crate::Agent;

/// How often an evacuation looks at its migrations.
const POLL: Duration = Duration::from_millis(200);
/// Migrations an evacuation tries per VM before it leaves the VM here.
pub const ATTEMPTS: u32 = 4;
/// Pause before a VM's next attempt, times the attempts so far: 5, 10 and
/// 15 s outlast a peer's idle timeout (a destination learns that a
/// crashed source's stream is dead only when its connection times out).
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// How long a restarted agent tries to reach an interrupted evacuation's
/// destinations before it leaves the evacuation to `resume` by hand.
const RESUME_REACH: Duration = Duration::from_secs(120);
/// Most migrations an evacuation runs at once.
pub const MAX_PARALLEL: usize = 16;

/// Errors starting an evacuation.
#[derive(Debug, thiserror::Error)]
pub enum EvacuationError {
    /// One is running already.
    #[error("an evacuation of this host is already running")]
    Running,
    /// Nothing to resume.
    #[error("no interrupted evacuation to resume")]
    NothingToResume,
    /// Bad parameters.
    #[error("{0}")]
    Invalid(String),
    /// The state directory cannot be written.
    #[error("cannot write {path}")]
    Persist {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// What an evacuation was asked to do (persisted for `resume`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvacuationParams {
    /// Destination sites (or agents), used in turn.
    pub to: Vec<String>,
    /// Total WAN budget of all its migrations, bits/s (none: unlimited).
    pub max_bandwidth_bps: Option<u64>,
    /// Migrations at once.
    pub parallel: usize,
}

/// `POST /v1/evacuation`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartEvacuation {
    /// Parameters; ignored with `resume`.
    pub params: Option<EvacuationParams>,
    /// Resume the interrupted evacuation with its saved parameters.
    #[serde(default)]
    pub resume: bool,
}

/// One VM of an evacuation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvacuationVm {
    /// VM name.
    pub vm: String,
    /// Its RAM, MiB.
    pub ram_mib: u64,
    /// Destination.
    pub to: String,
    /// Its migration, once started (with the final report when done);
    /// the last attempt's.
    pub migration: Option<MigrationInfo>,
    /// Migrations tried so far (at most [`ATTEMPTS`]).
    #[serde(default)]
    pub attempts: u32,
}

/// API view of an evacuation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvacuationInfo {
    /// This host.
    pub host: String,
    /// Parameters.
    pub params: EvacuationParams,
    /// VMs in the order they go.
    pub vms: Vec<EvacuationVm>,
    /// Whether every migration has ended.
    pub finished: bool,
    /// Since the start, ms (until the end once finished).
    pub elapsed_ms: u64,
    /// VMs that moved.
    pub completed: usize,
    /// VMs still here after their migration failed.
    pub failed: usize,
}

struct Job {
    params: EvacuationParams,
    started: Instant,
    vms: Mutex<Vec<EvacuationVm>>,
    ended: Mutex<Option<Duration>>,
}

/// Maintenance flag and evacuation of this host.
pub struct Evacuations {
    state_dir: PathBuf,
    maintenance: Mutex<bool>,
    current: Mutex<Option<Arc<Job>>>,
}

impl Evacuations {
    /// Reads the maintenance flag from `state_dir`.
    pub fn open(state_dir: &std::path::Path) -> Self {
        Self {
            maintenance: Mutex::new(state_dir.join("maintenance").exists()),
            state_dir: state_dir.to_owned(),
            current: Mutex::new(None),
        }
    }

    /// Whether the host is in maintenance.
    pub fn maintenance(&self) -> bool {
        *self.maintenance.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enters or leaves maintenance (persisted).
    pub fn set_maintenance(&self, on: bool) -> Result<(), EvacuationError> {
        let path = self.state_dir.join("maintenance");
        let r = if on {
            std::fs::create_dir_all(&self.state_dir).and_then(|()| std::fs::write(&path, b"1\n"))
        } else {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                r => r,
            }
        };
        r.map_err(|source| EvacuationError::Persist { path, source })?;
        *self.maintenance.lock().unwrap_or_else(|p| p.into_inner()) = on;
        info!(on, "maintenance mode");
        Ok(())
    }

    fn params_path(&self) -> PathBuf {
        self.state_dir.join("evacuation.json")
    }

    /// Exists while an evacuation runs: found at start-up, it means the
    /// agent died in the middle of one.
    fn running_path(&self) -> PathBuf {
        self.state_dir.join("evacuation.running")
    }

    /// The current (or last) evacuation.
    pub fn info(&self, host: &str) -> Option<EvacuationInfo> {
        let job = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        Some(view(host, &job))
    }

    /// Parameters of an interrupted evacuation, if any.
    pub fn saved(&self) -> Option<EvacuationParams> {
        let text = std::fs::read_to_string(self.params_path()).ok()?;
        serde_json::from_str(&text).ok()
    }
}

fn view(host: &str, job: &Job) -> EvacuationInfo {
    let vms = job.vms.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let ended = *job.ended.lock().unwrap_or_else(|p| p.into_inner());
    let phase = |v: &EvacuationVm| v.migration.as_ref().map(|m| m.phase);
    EvacuationInfo {
        host: host.to_owned(),
        params: job.params.clone(),
        completed: vms
            .iter()
            .filter(|v| phase(v) == Some(MigrationPhase::Completed))
            .count(),
        failed: vms
            .iter()
            .filter(|v| phase(v).is_some_and(|p| p.is_terminal() && p != MigrationPhase::Completed))
            .count(),
        vms,
        finished: ended.is_some(),
        elapsed_ms: ended.unwrap_or_else(|| job.started.elapsed()).as_millis() as u64,
    }
}

/// Starts (or resumes) evacuating this host in the background.
pub fn start(agent: &Arc<Agent>, req: StartEvacuation) -> Result<EvacuationInfo, EvacuationError> {
    let ev = &agent.evacuations;
    let params = if req.resume {
        ev.saved().ok_or(EvacuationError::NothingToResume)?
    } else {
        req.params
            .ok_or_else(|| EvacuationError::Invalid("no parameters given".into()))?
    };
    if params.to.is_empty() {
        return Err(EvacuationError::Invalid("no destination given".into()));
    }
    if params
        .to
        .iter()
        .any(|t| *t == agent.cfg.name || *t == agent.cfg.site)
    {
        return Err(EvacuationError::Invalid(
            "an evacuation cannot go to the host (or site) it empties".into(),
        ));
    }
    if params.parallel == 0 || params.parallel > MAX_PARALLEL {
        return Err(EvacuationError::Invalid(format!(
            "parallel must be 1..={MAX_PARALLEL}"
        )));
    }
    if params.max_bandwidth_bps == Some(0) {
        return Err(EvacuationError::Invalid(
            "the bandwidth budget is zero".into(),
        ));
    }
    let mut cur = ev.current.lock().unwrap_or_else(|p| p.into_inner());
    if cur
        .as_ref()
        .is_some_and(|j| j.ended.lock().unwrap_or_else(|p| p.into_inner()).is_none())
    {
        return Err(EvacuationError::Running);
    }
    ev.set_maintenance(true)?;
    let path = ev.params_path();
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(&params).unwrap_or_default(),
    )
    .map_err(|source| EvacuationError::Persist { path, source })?;
    let path = ev.running_path();
    std::fs::write(&path, b"1\n").map_err(|source| EvacuationError::Persist { path, source })?;
    // Largest first; destinations in turn.
    let mut here: Vec<(String, u64)> = agent
        .vms
        .all()
        .into_iter()
        .filter(|h| h.state() == VmState::Running)
        .map(|h| (h.spec.name.clone(), h.spec.memory_mib))
        .collect();
    here.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let vms = here
        .into_iter()
        .enumerate()
        .map(|(i, (vm, ram_mib))| EvacuationVm {
            vm,
            ram_mib,
            to: params.to[i % params.to.len()].clone(),
            migration: None,
            attempts: 0,
        })
        .collect();
    let job = Arc::new(Job {
        params,
        started: Instant::now(),
        vms: Mutex::new(vms),
        ended: Mutex::new(None),
    });
    *cur = Some(job.clone());
    drop(cur);
    info!(vms = job.vms.lock().map(|v| v.len()).unwrap_or(0), params = ?job.params, "evacuation started");
    let a = agent.clone();
    let j = job.clone();
    tokio::spawn(async move { run(a, j).await });
    Ok(view(&agent.cfg.name, &job))
}

async fn run(agent: Arc<Agent>, job: Arc<Job>) {
    let budget = job
        .params
        .max_bandwidth_bps
        .map(|b| Arc::new(RateBudget::new(b)));
    let permits = Arc::new(tokio::sync::Semaphore::new(job.params.parallel));
    let n = job.vms.lock().map(|v| v.len()).unwrap_or(0);
    let mut tasks = Vec::new();
    for i in 0..n {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let (a, j, b) = (agent.clone(), job.clone(), budget.clone());
        tasks.push(tokio::spawn(async move {
            one(&a, &j, i, b).await;
            drop(permit);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    *job.ended.lock().unwrap_or_else(|p| p.into_inner()) = Some(job.started.elapsed());
    let v = view(&agent.cfg.name, &job);
    if v.failed == 0 {
        let _ = std::fs::remove_file(agent.evacuations.params_path());
    }
    let _ = std::fs::remove_file(agent.evacuations.running_path());
    info!(
        completed = v.completed,
        failed = v.failed,
        elapsed_ms = v.elapsed_ms,
        "evacuation ended"
    );
}

/// Migrates the `i`-th VM and follows it to its end, trying again (up to
/// [`ATTEMPTS`] in all) after a failure that left the VM running here: a
/// transient fault (a cut link, a destination still cleaning up after a
/// crash) should not end an unattended evacuation.
async fn one(agent: &Arc<Agent>, job: &Job, i: usize, budget: Option<Arc<RateBudget>>) {
    let (vm, to) = {
        let vms = job.vms.lock().unwrap_or_else(|p| p.into_inner());
        (vms[i].vm.clone(), vms[i].to.clone())
    };
    let set = |m: MigrationInfo, attempt: u32| {
        let mut vms = job.vms.lock().unwrap_or_else(|p| p.into_inner());
        vms[i].migration = Some(m);
        vms[i].attempts = attempt;
    };
    for attempt in 1..=ATTEMPTS {
        let req = StartMigration {
            vm: vm.clone(),
            to: to.clone(),
            downtime_limit_ms: None,
            timeout_s: None,
            direct: false,
            qemu: None,
            copy: false,
        };
        let phase =
            match crate::migration::source::start_with_budget(agent, req, budget.clone()).await {
                Ok(m) => loop {
                    let info = m.info();
                    let phase = info.phase;
                    set(info, attempt);
                    if phase.is_terminal() {
                        break phase;
                    }
                    tokio::time::sleep(POLL).await;
                },
                Err(e) => {
                    let why = crate::error_chain(&e);
                    warn!(
                        vm,
                        attempt,
                        cause = why,
                        "evacuation: the migration did not start"
                    );
                    set(
                        MigrationInfo {
                            id: String::new(),
                            vm: vm.clone(),
                            from: agent.cfg.name.clone(),
                            to: to.clone(),
                            to_site: String::new(),
                            phase: MigrationPhase::Failed,
                            progress: Default::default(),
                            report: None,
                            error: Some(why),
                        },
                        attempt,
                    );
                    MigrationPhase::Failed
                }
            };
        let still_here = agent
            .vms
            .get(&vm)
            .is_ok_and(|h| h.state() == VmState::Running);
        if phase == MigrationPhase::Completed || !still_here || attempt == ATTEMPTS {
            return;
        }
        let why = job.vms.lock().unwrap_or_else(|p| p.into_inner())[i]
            .migration
            .as_ref()
            .and_then(|m| m.error.clone())
            .unwrap_or_default();
        info!(
            vm,
            attempt,
            cause = why,
            "evacuation: trying the migration again"
        );
        tokio::time::sleep(RETRY_AFTER * attempt).await;
    }
}

/// At agent start-up: resumes the evacuation a crash interrupted, if any,
/// in the background once every destination answers (a restarted agent's
/// peer connections are dialled afresh). Gives up after [`RESUME_REACH`],
/// leaving the evacuation to `godwit evacuate --resume`.
pub fn resume_interrupted(agent: &Arc<Agent>) {
    let ev = &agent.evacuations;
    if !ev.running_path().exists() {
        return;
    }
    let Some(params) = ev.saved() else {
        warn!("an evacuation was running but its parameters are unreadable; not resuming");
        let _ = std::fs::remove_file(ev.running_path());
        return;
    };
    let agent = agent.clone();
    tokio::spawn(async move {
        info!(?params, "resuming the evacuation a restart interrupted");
        let deadline = Instant::now() + RESUME_REACH;
        for to in &params.to {
            loop {
                let reached = match agent.peers.resolve(to) {
                    Ok(p) => agent.peers.connection(&p).await.map(|_| ()),
                    Err(e) => Err(e),
                };
                match reached {
                    Ok(()) => break,
                    Err(e) if Instant::now() >= deadline => {
                        warn!(to, cause = %crate::error_chain(&e),
                            "cannot reach an evacuation destination; resume it by hand (godwit evacuate --resume)");
                        return;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                }
            }
        }
        let req = StartEvacuation {
            params: None,
            resume: true,
        };
        if let Err(e) = start(&agent, req) {
            warn!(cause = %crate::error_chain(&e), "could not resume the evacuation");
        }
    });
}
