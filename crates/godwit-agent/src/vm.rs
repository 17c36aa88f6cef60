//! VMs on this host: launching QEMU, supervising it, persisting records so
//! an agent restart re-adopts running guests instead of killing them.
//!
//! A VM appears here when it is created, or when an incoming migration
//! launches its destination QEMU (state `incoming`); it leaves when it is
//! stopped, or when it has migrated away. Records live in
//! `state_dir/vms/<name>.json`; QEMU runs in its own session, so it
//! outlives the agent.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use godwit_qemu::{HostConfig, LaunchMode, QemuInstance, VmSpec};
use godwit_qmp::QmpClient;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::{info, warn};

use crate::api::types::{VmInfo, VmState};
use crate::guest::GuestChannel;

/// How long a QEMU gets to quit over QMP before it is signalled.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// Timeout of a QMP command issued on behalf of the API.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors managing VMs.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// No VM of that name here.
    #[error("no VM named {0:?} on this host")]
    NotFound(String),
    /// A VM of that name exists already.
    #[error("a VM named {0:?} already exists on this host")]
    Exists(String),
    /// The VM is busy (e.g. migrating).
    #[error("VM {name:?} is {state:?}")]
    Busy {
        /// VM name.
        name: String,
        /// Its state.
        state: VmState,
    },
    /// QEMU failed.
    #[error("QEMU for VM {name:?}")]
    Qemu {
        /// VM name.
        name: String,
        /// Cause.
        #[source]
        source: godwit_qemu::QemuError,
    },
    /// A QMP command failed.
    #[error("QMP command {command} for VM {name:?}")]
    Qmp {
        /// VM name.
        name: String,
        /// Command.
        command: String,
        /// Cause.
        #[source]
        source: godwit_qmp::QmpError,
    },
    /// Records could not be written.
    #[error("cannot persist VM record {path}")]
    Persist {
        /// Record path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// How long a restarted agent waits for the old QEMU of an interrupted
/// handover to complete when the new one has loaded the state.
const HANDOVER_SETTLE_WAIT: Duration = Duration::from_secs(5);

/// Which QEMU owns the guest after an interrupted same-host handover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settlement {
    /// The new one; `cont` if it has loaded the state but was never told
    /// to run.
    KeepNew {
        /// Whether it still needs `cont`.
        cont: bool,
    },
    /// The old one (the new one never ran the guest).
    KeepOld,
}

/// Decides an interrupted handover from the two QEMUs' run states (`None`:
/// gone or not answering). The new QEMU runs the guest only if it is
/// running, or if it holds the whole state (`paused` after loading) while
/// the old one completed (`postmigrate`, which never runs the guest
/// again) or is gone. In every other case the new one never ran the guest and the old
/// one keeps it: if it was stopped for the switch-over, QEMU resumes it
/// when the retired new QEMU's socket closes.
fn settle(new: Option<&str>, old: Option<&str>) -> Settlement {
    match (new, old) {
        (Some("running"), _) => Settlement::KeepNew { cont: false },
        // A 7.2 destination leaves `inmigrate` only with the whole state
        // loaded; with the old QEMU gone nobody else can run the guest.
        (Some("paused"), Some("postmigrate") | None) => Settlement::KeepNew { cont: true },
        _ => Settlement::KeepOld,
    }
}

async fn run_status(c: &QmpClient) -> Option<String> {
    c.execute_timeout("query-status", json!({}), QMP_TIMEOUT)
        .await
        .ok()
        .and_then(|v| v.get("status").and_then(|r| r.as_str()).map(str::to_owned))
}

/// What is persisted for each VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct VmRecord {
    spec: VmSpec,
    instance: QemuInstance,
    state: VmState,
    /// The incoming migration that brought the VM here, if any: a restarted
    /// agent must still answer the source's `QueryOutcome` for it.
    #[serde(default)]
    migration: Option<String>,
    /// The new QEMU of a same-host handover in progress: written before it
    /// is told to migrate, so a restarted agent knows both processes map one
    /// RAM file and keeps exactly the one that runs the guest.
    #[serde(default)]
    handover: Option<QemuInstance>,
}

/// One VM with its live connections.
pub struct VmHandle {
    /// Specification.
    pub spec: VmSpec,
    /// Running QEMU instance.
    pub instance: QemuInstance,
    /// QMP connection.
    pub qmp: QmpClient,
    /// Guest tool channel.
    pub guest: GuestChannel,
    /// The incoming migration that brought it here, if any.
    pub migration: Option<String>,
    state: Mutex<VmState>,
    /// The new QEMU of a same-host handover in progress (persisted).
    handover: Mutex<Option<QemuInstance>>,
    /// When QEMU last stopped and resumed the guest (QMP `STOP` and
    /// `RESUME` timestamps, µs since the epoch by the host's clock).
    run_events: Mutex<RunEvents>,
}

/// Times of the guest's last stop and resume, from QEMU's own events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunEvents {
    /// Last `STOP`, µs since the epoch.
    pub stopped_at_us: Option<i64>,
    /// Last `RESUME`, µs since the epoch.
    pub resumed_at_us: Option<i64>,
}

impl VmHandle {
    /// Current state.
    pub fn state(&self) -> VmState {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_state(&self, s: VmState) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    /// When QEMU last stopped and resumed the guest.
    pub fn run_events(&self) -> RunEvents {
        *self.run_events.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Follows QEMU's events for the stop and resume times.
    fn watch_events(
        self: &Arc<Self>,
        mut events: tokio::sync::broadcast::Receiver<godwit_qmp::QmpEvent>,
    ) {
        let h = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let ev = match events.recv().await {
                    Ok(ev) => ev,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                };
                let Some(h) = h.upgrade() else { return };
                let at = ev.timestamp.seconds * 1_000_000 + ev.timestamp.microseconds;
                let mut r = h.run_events.lock().unwrap_or_else(|p| p.into_inner());
                match ev.name.as_str() {
                    "STOP" => r.stopped_at_us = Some(at),
                    "RESUME" => r.resumed_at_us = Some(at),
                    _ => {}
                }
            }
        });
    }

    /// Runs a QMP command with the API timeout.
    pub async fn qmp(
        &self,
        command: &str,
        args: serde_json::Value,
    ) -> Result<serde_json::Value, VmError> {
        self.qmp
            .execute_timeout(command, args, QMP_TIMEOUT)
            .await
            .map_err(|source| VmError::Qmp {
                name: self.spec.name.clone(),
                command: command.into(),
                source,
            })
    }

    /// QEMU's run state (`running`, `paused`, `postmigrate`, …).
    pub async fn qemu_status(&self) -> Result<(String, bool), VmError> {
        let v = self.qmp("query-status", json!({})).await?;
        let status = v
            .get("status")
            .and_then(|s| s.as_str())
            .unwrap_or("unknown")
            .to_owned();
        let running = v.get("running").and_then(|r| r.as_bool()).unwrap_or(false);
        Ok((status, running))
    }
}

/// All VMs of this host.
#[derive(Clone)]
pub struct VmManager {
    host: HostConfig,
    records_dir: PathBuf,
    vms: Arc<Mutex<HashMap<String, Arc<VmHandle>>>>,
}

impl VmManager {
    /// A manager persisting into `state_dir/vms`.
    pub fn new(host: HostConfig, state_dir: &std::path::Path) -> Self {
        Self {
            host,
            records_dir: state_dir.join("vms"),
            vms: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Host settings.
    pub fn host(&self) -> &HostConfig {
        &self.host
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<VmHandle>>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-adopts VMs whose QEMU still runs after an agent restart; removes
    /// records of those that died meanwhile. Returns the incoming
    /// migrations whose VM was found running (their outcome is `running`).
    pub async fn readopt(&self) -> Vec<String> {
        let mut arrived = Vec::new();
        let Ok(dir) = std::fs::read_dir(&self.records_dir) else {
            return arrived;
        };
        for entry in dir.flatten() {
            let path = entry.path();
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let rec: VmRecord = match serde_json::from_str(&text) {
                Ok(r) => r,
                Err(e) => {
                    warn!(path = %path.display(), cause = %e, "ignoring unreadable VM record");
                    continue;
                }
            };
            let (rec, settled_qmp) = match rec.handover.clone() {
                Some(new) => match self.settle_handover(rec, new).await {
                    Some(r) => r,
                    None => {
                        let _ = std::fs::remove_file(&path);
                        continue;
                    }
                },
                None => (rec, None),
            };
            if !rec.instance.is_running() {
                info!(
                    vm = rec.spec.name,
                    "VM from a previous run is gone; removing its record"
                );
                let _ = godwit_qemu::terminate(&rec.instance, None, Duration::ZERO).await;
                let _ = std::fs::remove_file(&path);
                continue;
            }
            // QEMU's monitor serves one client at a time: reuse the
            // connection the settlement made.
            let connected = match settled_qmp {
                Some(c) => {
                    let events = c.subscribe();
                    Ok((c, events))
                }
                None => QmpClient::connect(&rec.instance.qmp_socket).await,
            };
            let (qmp, events) = match connected {
                Ok(c) => c,
                Err(e) => {
                    warn!(vm = rec.spec.name, cause = %e, "cannot reconnect to QEMU; leaving it alone");
                    continue;
                }
            };
            let status = qmp
                .execute_timeout("query-status", json!({}), QMP_TIMEOUT)
                .await
                .ok()
                .and_then(|v| v.get("status").and_then(|r| r.as_str()).map(str::to_owned))
                .unwrap_or_default();
            if rec.state == VmState::Incoming && status != "running" {
                // An incoming QEMU whose agent died has lost its stream and
                // never started the guest, so no SHUT left: it owns nothing.
                info!(
                    vm = rec.spec.name,
                    "discarding an incoming QEMU left by a previous run"
                );
                let _ = godwit_qemu::terminate(&rec.instance, Some(&qmp), Duration::ZERO).await;
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if status == "postmigrate" {
                // The guest completed a migration away: it runs elsewhere.
                info!(
                    vm = rec.spec.name,
                    "retiring a source QEMU whose migration completed"
                );
                let _ = godwit_qemu::terminate(&rec.instance, Some(&qmp), Duration::ZERO).await;
                let _ = std::fs::remove_file(&path);
                continue;
            }
            // Whether still marked incoming or already adopted, a live VM
            // that arrived by migration answers `running` for it.
            if let Some(id) = &rec.migration {
                arrived.push(id.clone());
            }
            info!(
                vm = rec.spec.name,
                pid = rec.instance.pid,
                status,
                "re-adopted VM"
            );
            let h = self.insert(
                rec.spec,
                rec.instance,
                qmp,
                events,
                VmState::Running,
                rec.migration,
                None,
            );
            if let Err(e) = self.persist(&h) {
                warn!(vm = h.spec.name, cause = %e, "cannot persist VM record");
            }
        }
        arrived
    }

    /// Resolves a handover that an agent crash interrupted. Both QEMUs map
    /// the same RAM file; [`settle`] decides which one owns the guest from
    /// their run states. Neither retirement removes the RAM file. Returns
    /// the record to re-adopt with the QMP connection to its QEMU (the
    /// monitor takes no second client while this one is open), or `None`
    /// if neither process is left.
    async fn settle_handover(
        &self,
        mut rec: VmRecord,
        new: QemuInstance,
    ) -> Option<(VmRecord, Option<QmpClient>)> {
        rec.handover = None;
        let new_qmp = if new.is_running() {
            QmpClient::connect(&new.qmp_socket)
                .await
                .ok()
                .map(|(c, _)| c)
        } else {
            None
        };
        let old_qmp = if rec.instance.is_running() {
            QmpClient::connect(&rec.instance.qmp_socket)
                .await
                .ok()
                .map(|(c, _)| c)
        } else {
            None
        };
        let new_st = match &new_qmp {
            Some(c) => run_status(c).await,
            None => None,
        };
        let mut old_st = match &old_qmp {
            Some(c) => run_status(c).await,
            None => None,
        };
        // Loaded but not continued: the old QEMU completes as soon as the
        // new one's SHUT reaches it; give it that moment.
        let deadline = tokio::time::Instant::now() + HANDOVER_SETTLE_WAIT;
        while new_st.as_deref() == Some("paused")
            && old_st.as_deref() != Some("postmigrate")
            && old_qmp.is_some()
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
            old_st = match &old_qmp {
                Some(c) => run_status(c).await,
                None => None,
            };
        }
        let decision = settle(new_st.as_deref(), old_st.as_deref());
        let (keep, drop, keep_qmp, drop_qmp) = match decision {
            Settlement::KeepNew { .. } => (new, rec.instance.clone(), new_qmp, old_qmp),
            Settlement::KeepOld => (rec.instance.clone(), new, old_qmp, new_qmp),
        };
        info!(
            vm = rec.spec.name,
            kept = keep.instance_id,
            retired = drop.instance_id,
            new = ?new_st,
            old = ?old_st,
            "settling a handover interrupted by an agent restart"
        );
        let _ = godwit_qemu::retire(&drop, drop_qmp.as_ref(), STOP_GRACE).await;
        if let (Settlement::KeepNew { cont: true }, Some(c)) = (decision, &keep_qmp) {
            if let Err(e) = c.execute_timeout("cont", json!({}), QMP_TIMEOUT).await {
                warn!(vm = rec.spec.name, cause = %e, "cannot continue the new QEMU");
            }
        }
        rec.instance = keep;
        if !rec.instance.is_running() {
            // Neither is left: the guest is gone; free its RAM.
            let _ = godwit_qemu::terminate(&rec.instance, None, Duration::ZERO).await;
            return None;
        }
        if rec.state == VmState::MigratingOut {
            rec.state = VmState::Running;
        }
        Some((rec, keep_qmp))
    }

    #[allow(clippy::too_many_arguments)] // One call site per way a VM appears.
    fn insert(
        &self,
        spec: VmSpec,
        instance: QemuInstance,
        qmp: QmpClient,
        events: tokio::sync::broadcast::Receiver<godwit_qmp::QmpEvent>,
        state: VmState,
        migration: Option<String>,
        guest: Option<GuestChannel>,
    ) -> Arc<VmHandle> {
        let guest = guest.unwrap_or_else(|| {
            GuestChannel::spawn(spec.name.clone(), instance.guest_socket.clone())
        });
        let h = Arc::new(VmHandle {
            spec,
            instance,
            qmp,
            guest,
            migration,
            state: Mutex::new(state),
            handover: Mutex::new(None),
            run_events: Mutex::new(RunEvents::default()),
        });
        h.watch_events(events);
        self.map().insert(h.spec.name.clone(), h.clone());
        self.supervise(h.clone());
        h
    }

    /// Watches a VM's QEMU: when it goes away unexpectedly, the VM is
    /// marked stopped and its files are removed.
    fn supervise(&self, h: Arc<VmHandle>) {
        let mgr = self.clone();
        tokio::spawn(async move {
            h.qmp.closed().await;
            // Give a deliberate stop or a completed migration the chance to
            // account for the exit first.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let current = mgr.get(&h.spec.name).ok();
            if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, &h)) {
                warn!(vm = h.spec.name, "QEMU exited");
                h.set_state(VmState::Stopped);
                h.guest.close();
                let _ = godwit_qemu::terminate(&h.instance, None, Duration::ZERO).await;
                mgr.map().remove(&h.spec.name);
                mgr.forget(&h.spec.name);
            }
        });
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.records_dir.join(format!("{name}.json"))
    }

    /// Persists a VM's record.
    pub fn persist(&self, h: &VmHandle) -> Result<(), VmError> {
        let path = self.record_path(&h.spec.name);
        let err = |source| VmError::Persist {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&self.records_dir).map_err(err)?;
        let rec = VmRecord {
            spec: h.spec.clone(),
            instance: h.instance.clone(),
            state: h.state(),
            migration: h.migration.clone(),
            handover: h.handover.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        };
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(&rec).map_err(|e| err(std::io::Error::other(e)))?;
        std::fs::write(&tmp, text).map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)
    }

    /// Records (and persists) the new QEMU of a handover of `h`, or clears it.
    pub fn set_handover(&self, h: &VmHandle, new: Option<QemuInstance>) -> Result<(), VmError> {
        *h.handover.lock().unwrap_or_else(|p| p.into_inner()) = new;
        self.persist(h)
    }

    /// Makes the new QEMU of a completed handover the VM's process: the VM
    /// keeps its name, spec and migration record, and from now on the old
    /// handle is no longer current (its supervisor ignores the old QEMU's
    /// exit). The caller retires the old QEMU.
    pub fn complete_handover(
        &self,
        old: &Arc<VmHandle>,
        instance: QemuInstance,
        qmp: QmpClient,
        events: tokio::sync::broadcast::Receiver<godwit_qmp::QmpEvent>,
        guest: GuestChannel,
    ) -> Result<Arc<VmHandle>, VmError> {
        let h = self.insert(
            old.spec.clone(),
            instance,
            qmp,
            events,
            VmState::Running,
            old.migration.clone(),
            Some(guest),
        );
        self.persist(&h)?;
        Ok(h)
    }

    fn forget(&self, name: &str) {
        let _ = std::fs::remove_file(self.record_path(name));
    }

    /// Resolves a machine alias such as `pc` to the versioned type this
    /// host's QEMU maps it to, so both ends of a migration use one type.
    pub async fn resolve_machine(&self, alias: &str) -> Result<String, VmError> {
        godwit_qemu::resolve_machine(&self.host, alias)
            .await
            .map_err(|source| VmError::Qemu {
                name: alias.into(),
                source,
            })
    }

    /// Launches a VM (fresh boot, or waiting for incoming migration `migration`).
    pub async fn launch(
        &self,
        spec: VmSpec,
        mode: LaunchMode,
        migration: Option<String>,
    ) -> Result<Arc<VmHandle>, VmError> {
        let name = spec.name.clone();
        if self.map().contains_key(&name) {
            return Err(VmError::Exists(name));
        }
        let (instance, qmp, events) =
            godwit_qemu::launch(&spec, &self.host, mode)
                .await
                .map_err(|source| VmError::Qemu {
                    name: name.clone(),
                    source,
                })?;
        // Re-check under the lock: a concurrent create may have won.
        if self.map().contains_key(&name) {
            let _ = godwit_qemu::terminate(&instance, Some(&qmp), STOP_GRACE).await;
            return Err(VmError::Exists(name));
        }
        let state = match mode {
            LaunchMode::Fresh => VmState::Running,
            LaunchMode::Incoming => VmState::Incoming,
        };
        let h = self.insert(spec, instance, qmp, events, state, migration, None);
        self.persist(&h)?;
        info!(vm = name, pid = h.instance.pid, ?mode, "QEMU launched");
        Ok(h)
    }

    /// A VM by name.
    pub fn get(&self, name: &str) -> Result<Arc<VmHandle>, VmError> {
        self.map()
            .get(name)
            .cloned()
            .ok_or_else(|| VmError::NotFound(name.into()))
    }

    /// All VMs.
    pub fn all(&self) -> Vec<Arc<VmHandle>> {
        let mut v: Vec<_> = self.map().values().cloned().collect();
        v.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        v
    }

    /// Changes a VM's state and persists it.
    pub fn set_state(&self, h: &VmHandle, s: VmState) {
        h.set_state(s);
        if let Err(e) = self.persist(h) {
            warn!(vm = h.spec.name, cause = %e, "cannot persist VM state");
        }
    }

    /// Marks a VM as migrating away, refusing if it is not simply running.
    pub fn begin_migration(&self, name: &str) -> Result<Arc<VmHandle>, VmError> {
        let h = self.get(name)?;
        let mut st = h.state.lock().unwrap_or_else(|p| p.into_inner());
        if *st != VmState::Running {
            return Err(VmError::Busy {
                name: name.into(),
                state: *st,
            });
        }
        *st = VmState::MigratingOut;
        Ok(h.clone())
    }

    /// Removes a VM from this host and terminates its QEMU (after it stopped,
    /// or after it migrated away).
    pub async fn remove(&self, h: &Arc<VmHandle>) {
        {
            let mut m = self.map();
            if m.get(&h.spec.name).is_some_and(|c| Arc::ptr_eq(c, h)) {
                m.remove(&h.spec.name);
            }
        }
        self.forget(&h.spec.name);
        h.set_state(VmState::Stopped);
        h.guest.close();
        if let Err(e) = godwit_qemu::terminate(&h.instance, Some(&h.qmp), STOP_GRACE).await {
            warn!(vm = h.spec.name, cause = %e, "terminating QEMU");
        }
    }

    /// Stops a VM (powers it off hard: the guest is not asked).
    pub async fn stop(&self, name: &str) -> Result<(), VmError> {
        let h = self.get(name)?;
        if h.state() == VmState::MigratingOut {
            return Err(VmError::Busy {
                name: name.into(),
                state: h.state(),
            });
        }
        self.remove(&h).await;
        info!(vm = name, "VM stopped");
        Ok(())
    }

    /// The API view of a VM.
    pub async fn info(&self, h: &VmHandle) -> VmInfo {
        let qemu_status = match tokio::time::timeout(Duration::from_secs(2), h.qemu_status()).await
        {
            Ok(Ok((s, _))) => Some(s),
            _ => None,
        };
        VmInfo {
            name: h.spec.name.clone(),
            state: h.state(),
            qemu_status,
            memory_mib: h.spec.memory_mib,
            vcpus: h.spec.vcpus,
            machine: h.spec.machine.clone(),
            pid: Some(h.instance.pid),
            instance: h.instance.instance_id.clone(),
            guest: Some(h.guest.info()),
            spec: serde_json::to_value(&h.spec).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupted_handover_keeps_the_qemu_that_owns_the_guest() {
        use Settlement::*;
        // The new QEMU runs the guest: whatever the old one says.
        assert_eq!(
            settle(Some("running"), Some("postmigrate")),
            KeepNew { cont: false }
        );
        assert_eq!(settle(Some("running"), None), KeepNew { cont: false });
        // Loaded and the old one completed: continue the new one.
        assert_eq!(
            settle(Some("paused"), Some("postmigrate")),
            KeepNew { cont: true }
        );
        assert_eq!(settle(Some("paused"), None), KeepNew { cont: true });
        // Loaded but the old one did not complete: it resumes the guest
        // when the new one's socket closes, so the new one must go.
        assert_eq!(settle(Some("paused"), Some("running")), KeepOld);
        assert_eq!(settle(Some("paused"), Some("finish-migrate")), KeepOld);
        // Still waiting for the stream, or gone.
        assert_eq!(settle(Some("inmigrate"), Some("running")), KeepOld);
        assert_eq!(settle(Some("inmigrate"), Some("finish-migrate")), KeepOld);
        assert_eq!(settle(None, Some("running")), KeepOld);
        assert_eq!(settle(None, None), KeepOld);
    }
}
