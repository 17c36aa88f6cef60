//! Live migrations through the agents: the registry of jobs on this host
//! and the two state machines, [`source`] and [`destination`].
//!
//! ```mermaid
//! sequenceDiagram
//!   participant SQ as source QEMU
//!   participant SA as source agent
//!   participant DA as destination agent
//!   participant DQ as destination QEMU
//!   SA->>DA: PrepareIncoming(vm spec)
//!   DA->>DQ: launch -incoming defer; migrate-incoming unix:in.sock
//!   DA-->>SA: Prepared
//!   SA->>DA: memory stream: Open(migration id)
//!   DA->>DQ: connect in.sock
//!   DA-->>SA: Ok
//!   SA->>SQ: migrate unix:out.sock (return-path on)
//!   SQ->>SA: migration stream
//!   SA->>DA: Data frames (windowed)
//!   DA->>DQ: bytes
//!   DA-->>SA: Ack(consumed)
//!   DQ-->>DA: return path (PONG, SHUT after load + start)
//!   DA-->>SA: Data (return path)
//!   SA-->>SQ: return path → source reports completed
//!   SA->>DA: Commit
//!   SA->>SQ: quit
//! ```
//!
//! # Exactly one running copy
//! The destination QEMU starts the guest as soon as it has loaded the whole
//! state, and its SHUT message is what lets the source QEMU complete. So
//! the only moment of doubt is a failure after the source paused the
//! guest: the destination may or may not have received everything. The
//! source agent then *holds* its QEMU's socket open (QEMU cannot fail the
//! migration and resume the guest on its own) and asks the destination
//! what happened: `running` → the source retires its copy; `failed` → the
//! source closes the socket and QEMU resumes the guest. A failure while
//! the guest still runs at the source is simpler: the destination cannot
//! have the device state, so the source cancels and the destination
//! discards its QEMU.

pub mod converge;
pub mod destination;
pub mod local;
pub mod source;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use godwit_wire::IncomingOutcome;

use crate::api::types::{MigrationInfo, MigrationPhase, MigrationProgress, MigrationReport};
use crate::relay::RelayStats;

/// Errors that end a migration.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The VM cannot be migrated in its present state.
    #[error(transparent)]
    Vm(#[from] crate::vm::VmError),
    /// The destination could not be reached or refused.
    #[error(transparent)]
    Peer(#[from] crate::peer::PeerError),
    /// The destination refused to prepare.
    #[error("destination {peer} refused: {message}")]
    Refused {
        /// Peer.
        peer: String,
        /// Its explanation.
        message: String,
    },
    /// The relay failed.
    #[error("the migration stream broke")]
    Relay(#[source] crate::relay::RelayError),
    /// QEMU reported a failure.
    #[error("QEMU reported the migration {status}: {desc}")]
    Qemu {
        /// QEMU's status.
        status: String,
        /// QEMU's error description.
        desc: String,
    },
    /// Timed out.
    #[error("the migration did not finish within {0} s")]
    Timeout(u64),
    /// Cancelled (by the operator, or by the timeout).
    #[error("{0}")]
    Cancelled(String),
    /// Local I/O failed.
    #[error("{what}")]
    Io {
        /// What was attempted.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// One outgoing migration.
pub struct MigrationJob {
    /// Id.
    pub id: String,
    /// VM name.
    pub vm: String,
    /// Source agent.
    pub from: String,
    /// Destination agent.
    pub to: String,
    /// Destination site.
    pub to_site: String,
    /// When it started.
    pub started: Instant,
    /// Relay counters.
    pub relay: Arc<RelayStats>,
    /// QEMU to QEMU over plain TCP (baseline), not through the relay.
    pub direct: bool,
    /// Asks the relay to stop (cancel, timeout).
    pub cancel: tokio::sync::watch::Sender<Option<String>>,
    /// UDP payload bytes the peer connection carried during the migration
    /// (QUIC headers, acknowledgements and retransmissions included).
    pub transport_bytes: std::sync::atomic::AtomicU64,
    /// The sender's CPU meter, once QEMU was told to migrate.
    pub sender_cpu: Mutex<Option<crate::cpu::SenderCpu>>,
    /// Bandwidth budget shared with other migrations (an evacuation).
    pub budget: Option<Arc<crate::pace::RateBudget>>,
    state: Mutex<JobState>,
}

struct JobState {
    phase: MigrationPhase,
    progress: MigrationProgress,
    report: Option<MigrationReport>,
    error: Option<String>,
}

impl MigrationJob {
    /// A new job in the `preparing` phase.
    pub fn new(id: String, vm: String, from: String, to: String, to_site: String) -> Self {
        Self {
            id,
            vm,
            from,
            to,
            to_site,
            started: Instant::now(),
            relay: Arc::new(RelayStats::default()),
            direct: false,
            cancel: tokio::sync::watch::channel(None).0,
            transport_bytes: std::sync::atomic::AtomicU64::new(0),
            sender_cpu: Mutex::new(None),
            budget: None,
            state: Mutex::new(JobState {
                phase: MigrationPhase::Preparing,
                progress: MigrationProgress::default(),
                report: None,
                error: None,
            }),
        }
    }

    fn st(&self) -> std::sync::MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Current phase.
    pub fn phase(&self) -> MigrationPhase {
        self.st().phase
    }

    /// Moves to a phase.
    pub fn set_phase(&self, p: MigrationPhase) {
        self.st().phase = p;
    }

    /// Replaces the live figures.
    pub fn set_progress(&self, p: MigrationProgress) {
        self.st().progress = p;
    }

    /// Records the end of the job.
    pub fn finish(&self, phase: MigrationPhase, report: MigrationReport, error: Option<String>) {
        let mut s = self.st();
        s.phase = phase;
        s.report = Some(report);
        s.error = error;
    }

    /// API view.
    pub fn info(&self) -> MigrationInfo {
        let s = self.st();
        let mut progress = s.progress.clone();
        if !s.phase.is_terminal() {
            progress.elapsed_ms = self.started.elapsed().as_millis() as u64;
        }
        MigrationInfo {
            id: self.id.clone(),
            vm: self.vm.clone(),
            from: self.from.clone(),
            to: self.to.clone(),
            to_site: self.to_site.clone(),
            phase: s.phase,
            progress,
            report: s.report.clone(),
            error: s.error.clone(),
        }
    }
}

/// All migrations this agent takes part in.
#[derive(Clone, Default)]
pub struct Migrations {
    outgoing: Arc<Mutex<HashMap<String, Arc<MigrationJob>>>>,
    incoming: Arc<Mutex<HashMap<String, Arc<destination::IncomingJob>>>>,
    /// Outcomes of incoming migrations whose job did not survive an agent
    /// restart (rebuilt from VM records).
    decided: Arc<Mutex<HashMap<String, IncomingOutcome>>>,
}

impl Migrations {
    /// Registers an outgoing job.
    pub fn add_outgoing(&self, job: Arc<MigrationJob>) {
        self.outgoing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(job.id.clone(), job);
    }

    /// An outgoing job by id.
    pub fn outgoing(&self, id: &str) -> Option<Arc<MigrationJob>> {
        self.outgoing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// All outgoing jobs, oldest first.
    pub fn all_outgoing(&self) -> Vec<Arc<MigrationJob>> {
        let mut v: Vec<_> = self
            .outgoing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|j| j.started);
        v
    }

    /// Registers an incoming job.
    pub fn add_incoming(&self, job: Arc<destination::IncomingJob>) {
        self.incoming
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(job.id.clone(), job);
    }

    /// Records the outcome of an incoming migration learnt at start-up.
    pub fn record_outcome(&self, id: String, outcome: IncomingOutcome) {
        self.decided
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, outcome);
    }

    /// A recorded outcome.
    pub fn decided(&self, id: &str) -> Option<IncomingOutcome> {
        self.decided
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// The incoming job still loading VM `vm`, if any.
    pub fn incoming_loading(&self, vm: &str) -> Option<Arc<destination::IncomingJob>> {
        self.incoming
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .find(|j| j.vm.spec.name == vm && matches!(j.outcome(), IncomingOutcome::Loading))
            .cloned()
    }

    /// An incoming job by id.
    pub fn incoming(&self, id: &str) -> Option<Arc<destination::IncomingJob>> {
        self.incoming
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }
}

/// A fresh migration id: time-ordered and unique enough for humans.
pub fn new_id() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    format!("m-{t:x}-{:04x}", rand::random::<u16>())
}
