//! Request and response bodies of the agent's local API (JSON over HTTP on
//! a unix socket). Shared by the server and [`crate::client::ApiClient`],
//! so the two can never disagree on a field name.

use serde::{Deserialize, Serialize};

/// `POST /v1/vms`: create and start a VM on this host.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    /// VM name, unique across the fleet.
    pub name: String,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Machine type or alias (resolved to a versioned type at creation).
    #[serde(default = "default_machine")]
    pub machine: String,
    /// Guest kernel.
    pub kernel: Option<std::path::PathBuf>,
    /// Guest initramfs.
    pub initrd: Option<std::path::PathBuf>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// Optional disk image.
    pub disk: Option<std::path::PathBuf>,
    /// Optional NIC MAC address.
    pub mac: Option<String>,
}

fn default_machine() -> String {
    "pc".into()
}

/// Where a VM stands on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// QEMU is starting.
    Starting,
    /// The guest runs here.
    Running,
    /// QEMU is up but the guest is paused.
    Paused,
    /// Migrating away from this host.
    MigratingOut,
    /// Arriving on this host (QEMU waits for or loads the stream).
    Incoming,
    /// QEMU has exited.
    Stopped,
}

/// A VM as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmInfo {
    /// Name.
    pub name: String,
    /// State.
    pub state: VmState,
    /// QEMU's own run state (`running`, `paused`, `postmigrate`, …).
    pub qemu_status: Option<String>,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Concrete machine type.
    pub machine: String,
    /// QEMU process id.
    pub pid: Option<u32>,
    /// QEMU instance id on this host.
    pub instance: String,
    /// Last report from the in-guest tool, if connected.
    pub guest: Option<GuestInfo>,
    /// Full specification (opaque to clients).
    pub spec: serde_json::Value,
}

/// What the agent knows of the in-guest tool.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuestInfo {
    /// Whether the agent holds a connection to the guest channel.
    pub connected: bool,
    /// Guest boot id (changes if the guest reboots: a migration must not).
    pub boot_id: Option<String>,
    /// Guest uptime at the last report, ms.
    pub uptime_ms: Option<u64>,
}

/// `POST /v1/migrations`: migrate a local VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartMigration {
    /// VM name.
    pub vm: String,
    /// Destination site or agent name.
    pub to: String,
    /// Override of QEMU's downtime limit, ms.
    pub downtime_limit_ms: Option<u64>,
    /// Override of the migration timeout, s.
    pub timeout_s: Option<u64>,
    /// Baseline mode: QEMU to QEMU over plain TCP, bypassing the agents'
    /// relay (no encryption, no acceleration). For comparisons only.
    #[serde(default)]
    pub direct: bool,
    /// Same host only (`to` names this agent): the QEMU binary of the new
    /// process (a hypervisor upgrade); default: the configured one.
    #[serde(default)]
    pub qemu: Option<std::path::PathBuf>,
    /// Same host only: copy guest RAM into the new QEMU instead of handing
    /// the RAM file over (the baseline of `godwit bench local`).
    #[serde(default)]
    pub copy: bool,
}

/// Phase of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationPhase {
    /// Asking the destination to prepare.
    Preparing,
    /// QEMU is sending memory.
    Transferring,
    /// The guest is paused and the final state is on its way.
    Switchover,
    /// A failure happened after the guest paused; the agents are finding
    /// out where the VM runs.
    Deciding,
    /// The VM runs at the destination.
    Completed,
    /// The VM still runs at the source.
    Failed,
    /// Undecided: the VM is paused at the source and the destination could
    /// not be reached; an operator must resolve it.
    Undecided,
}

impl MigrationPhase {
    /// Whether no further change will happen.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Undecided)
    }
}

/// Live figures of a migration (from QEMU and the relay).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MigrationProgress {
    /// Milliseconds since the migration started.
    pub elapsed_ms: u64,
    /// QEMU's migration status.
    pub qemu_status: Option<String>,
    /// Guest RAM, bytes.
    pub ram_total_bytes: u64,
    /// Bytes QEMU has written (its `ram.transferred`).
    pub transferred_bytes: u64,
    /// Bytes QEMU still has to send (`ram.remaining`).
    pub remaining_bytes: u64,
    /// QEMU's throughput estimate, bits per second.
    pub rate_bps: f64,
    /// Guest dirty rate, bits per second (like `rate_bps`).
    pub dirty_rate_bps: f64,
    /// QEMU's expected downtime, ms.
    pub expected_downtime_ms: Option<u64>,
    /// Estimated time to completion, ms.
    pub eta_ms: Option<u64>,
    /// Completed dirty-bitmap passes.
    pub passes: u64,
    /// Bytes the relay put on the WAN towards the destination.
    pub wire_bytes: u64,
    /// vCPU throttle applied by auto-converge, percent.
    pub cpu_throttle_pct: Option<u64>,
    /// The relay's flow window, bytes.
    #[serde(default)]
    pub relay_window_bytes: u64,
    /// Relayed bytes not yet delivered to the destination QEMU.
    #[serde(default)]
    pub relay_outstanding_bytes: u64,
    /// Effective bandwidth: QEMU stream bits the relay drains per second
    /// (above the wire rate when the codec reduces), smoothed.
    #[serde(default)]
    pub effective_bps: f64,
    /// Effective bandwidth over the wire rate.
    #[serde(default)]
    pub reduction_ratio: Option<f64>,
    /// Predicted total time of the migration (from its start), ms; null
    /// while unknown or when it is not predicted to converge.
    #[serde(default)]
    pub predicted_total_ms: Option<u64>,
    /// Predicted guest pause at switch-over (WAN delay and device state
    /// included), ms.
    #[serde(default)]
    pub predicted_downtime_ms: Option<u64>,
    /// Whether the migration is predicted to converge within its timeout;
    /// null until the dirty rate was measured over a full pass.
    #[serde(default)]
    pub converging: Option<bool>,
    /// The convergence controller's latest action, in words.
    #[serde(default)]
    pub convergence_action: Option<String>,
}

/// Final figures of a migration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MigrationReport {
    /// Whether the VM now runs at the destination.
    pub success: bool,
    /// Total time, ms (from the request to the VM running at the destination).
    pub total_ms: u64,
    /// QEMU's measured downtime, ms (source side: it ends when the
    /// destination's SHUT arrives, one WAN trip after the guest resumed).
    pub downtime_ms: Option<u64>,
    /// The guest's real pause, ms: the source QEMU's `STOP` to the
    /// destination QEMU's `RESUME`, by the two hosts' clocks.
    #[serde(default)]
    pub guest_downtime_ms: Option<u64>,
    /// QEMU setup time, ms.
    pub setup_ms: Option<u64>,
    /// Time QEMU spent migrating (its `total-time`), ms.
    pub qemu_total_ms: Option<u64>,
    /// Bytes on the WAN, both directions, relay framing included.
    pub wire_bytes: u64,
    /// Bytes QEMU wrote into the relay.
    pub stream_bytes: u64,
    /// UDP payload bytes of the QUIC connection during the migration, both
    /// directions (0 for `qemu-direct`).
    #[serde(default)]
    pub transport_bytes: u64,
    /// Guest RAM, MiB.
    pub ram_mib: u64,
    /// Wire bytes per GiB of guest RAM.
    pub wire_bytes_per_gib: f64,
    /// How the stream travelled ("relay": byte-exact through the agents).
    pub mode: String,
    /// Dirty-bitmap passes.
    pub passes: u64,
    /// What the page-aware codec did (absent for raw relaying).
    #[serde(default)]
    pub codec: Option<MemoryCodecReport>,
    /// CPU seconds the source spent: its agent, plus QEMU's migration
    /// thread (see `crate::cpu`).
    #[serde(default)]
    pub sender_cpu_s: Option<f64>,
    /// The source agent's part of `sender_cpu_s`.
    #[serde(default)]
    pub sender_agent_cpu_s: Option<f64>,
    /// CPU seconds the destination spent: its agent, plus QEMU's threads
    /// other than the vCPUs, until the guest ran there.
    #[serde(default)]
    pub receiver_cpu_s: Option<f64>,
    /// Guest RAM that was not zero, bytes (page-aware codec only).
    #[serde(default)]
    pub nonzero_bytes: Option<u64>,
    /// Wire bytes per GiB of non-zero guest RAM.
    #[serde(default)]
    pub wire_bytes_per_nonzero_gib: Option<f64>,
    /// What the convergence controller saw and did (relay path only).
    #[serde(default)]
    pub convergence: Option<ConvergenceReport>,
    /// Same-host migrations only (`mode` "handover" or "local-copy").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalMigrationReport>,
}

/// What a same-host migration did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LocalMigrationReport {
    /// The old QEMU's version.
    pub old_qemu: Option<String>,
    /// The new QEMU's version.
    pub new_qemu: Option<String>,
    /// Whether the new QEMU took over the RAM file (handover) instead of
    /// receiving a copy.
    pub ram_shared: bool,
    /// Pause as the guest's own tool saw it: from its last answer through
    /// the old QEMU to its first through the new one, ms (null without the
    /// guest tool).
    pub guest_pause_ms: Option<f64>,
    /// Median time between the guest tool's answers before the handover,
    /// ms: the resolution of `guest_pause_ms`.
    #[serde(default)]
    pub guest_ping_interval_ms: Option<f64>,
    /// Round trip of the guest tool's first answer through the new QEMU,
    /// ms: against `guest_ping_interval_ms`, the new process's warm-up
    /// (under TCG, translating the guest's code afresh).
    #[serde(default)]
    pub guest_first_answer_ms: Option<f64>,
    /// CPU seconds: the agent, the old QEMU's migration thread and all of
    /// the new QEMU's non-vCPU threads (start-up included).
    pub cpu_s: f64,
    /// Starting the new QEMU until its QMP answered, ms.
    #[serde(default)]
    pub launch_ms: f64,
    /// Moving the state and starting the guest in the new QEMU, ms.
    #[serde(default)]
    pub transfer_ms: f64,
}

/// What the convergence controller saw and did in one migration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConvergenceReport {
    /// The operator's downtime target (guest pause, WAN included), ms.
    pub downtime_target_ms: u64,
    /// The `downtime-limit` QEMU had last, ms.
    pub qemu_downtime_limit_ms: Option<u64>,
    /// Actions and notices, in order.
    pub events: Vec<ConvergenceEvent>,
    /// Highest vCPU throttle QEMU applied, percent.
    pub max_throttle_pct: u64,
    /// When throttling began, ms since the migration started.
    pub throttle_started_ms: Option<u64>,
    /// Last smoothed effective bandwidth, bits/s.
    pub effective_bps: f64,
    /// Last effective bandwidth over wire rate.
    pub reduction_ratio: Option<f64>,
    /// The last predicted guest pause before switch-over, ms.
    pub predicted_downtime_ms: Option<u64>,
}

/// One action or notice of the convergence controller.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConvergenceEvent {
    /// Ms since the migration started.
    pub at_ms: u64,
    /// `downtime-limit`, `throttle`, `qemu-throttle` or `stalled`.
    pub kind: String,
    /// What and why, with the figures.
    pub text: String,
}

/// What the page-aware memory codec did in one migration (source side).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryCodecReport {
    /// Why the stream parser fell back to raw relaying, and where.
    pub fallback: Option<String>,
    /// Page records QEMU sent.
    pub pages: u64,
    /// Zero-page records.
    pub zero_pages: u64,
    /// Runs the zero pages were sent as.
    pub zero_runs: u64,
    /// Pages sent literally (compressed in batches).
    pub literal_pages: u64,
    /// Pages sent as deltas against their previous version.
    pub delta_pages: u64,
    /// Bytes of those deltas before batch compression.
    pub delta_bytes: u64,
    /// Pages already sent in this migration, sent as references.
    pub intra_pages: u64,
    /// Pages found in the destination site's store.
    pub store_pages: u64,
    /// Pages found in this VM's earlier image at the destination.
    pub image_pages: u64,
    /// Pages found in the guest's disk blocks at the destination.
    pub disk_pages: u64,
    /// Optimistic references the destination could not resolve (resent).
    pub misses: u64,
    /// Stream bytes carried verbatim (framing, device state, fallback).
    pub raw_bytes: u64,
    /// Batches by codec: none, lz4, zstd.
    pub batches: [u64; 3],
    /// Op bytes before compression.
    pub ops_bytes: u64,
    /// Message bytes after compression.
    pub message_bytes: u64,
    /// CPU time spent compressing, seconds.
    pub compress_s: f64,
    /// Guest pages whose last version was not zero.
    #[serde(default)]
    pub nonzero_pages: u64,
    /// Share of page records by how they travelled.
    #[serde(default)]
    pub shares: PageShares,
}

/// Share of a migration's page records (0..=1) by how each travelled.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PageShares {
    /// Zero pages.
    pub zero: f64,
    /// Already sent in this migration.
    pub intra: f64,
    /// Found in the destination site's store.
    pub store: f64,
    /// Found in the VM's earlier image there.
    pub image: f64,
    /// Found in disk blocks there.
    pub disk: f64,
    /// Sent as a delta against the version last sent.
    pub delta: f64,
    /// Sent whole (compressed).
    pub literal: f64,
}

impl MemoryCodecReport {
    /// From the encoder's counters.
    pub fn from_encoder(
        s: &godwit_migstream::EncoderStats,
        fallback: Option<&godwit_migstream::Fallback>,
    ) -> Self {
        MemoryCodecReport {
            fallback: fallback.map(|f| format!("at stream byte {}: {}", f.at, f.reason)),
            pages: s.pages,
            zero_pages: s.zero_pages,
            zero_runs: s.zero_runs,
            literal_pages: s.literal_pages,
            delta_pages: s.delta_pages,
            delta_bytes: s.delta_bytes,
            intra_pages: s.ref_pages[0],
            store_pages: s.ref_pages[1],
            image_pages: s.ref_pages[2],
            disk_pages: s.ref_pages[3],
            misses: s.fills,
            raw_bytes: s.raw_bytes,
            batches: s.batches,
            ops_bytes: s.batch_raw_bytes,
            message_bytes: s.message_bytes,
            compress_s: s.compress_time.as_secs_f64(),
            nonzero_pages: s.nonzero_pages,
            shares: {
                let share = |n: u64| {
                    if s.pages == 0 {
                        0.0
                    } else {
                        n as f64 / s.pages as f64
                    }
                };
                PageShares {
                    zero: share(s.zero_pages),
                    intra: share(s.ref_pages[0]),
                    store: share(s.ref_pages[1]),
                    image: share(s.ref_pages[2]),
                    disk: share(s.ref_pages[3]),
                    delta: share(s.delta_pages),
                    literal: share(s.literal_pages),
                }
            },
        }
    }

    /// Compression ratio of the batches (ops bytes over message bytes).
    pub fn compression_ratio(&self) -> f64 {
        if self.message_bytes == 0 {
            1.0
        } else {
            self.ops_bytes as f64 / self.message_bytes as f64
        }
    }
}

/// A migration as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationInfo {
    /// Migration id.
    pub id: String,
    /// VM name.
    pub vm: String,
    /// Source agent.
    pub from: String,
    /// Destination agent.
    pub to: String,
    /// Destination site.
    pub to_site: String,
    /// Phase.
    pub phase: MigrationPhase,
    /// Live figures.
    pub progress: MigrationProgress,
    /// Final report, once terminal.
    pub report: Option<MigrationReport>,
    /// What went wrong, if it failed.
    pub error: Option<String>,
}

/// `POST /v1/vms/{name}/guest`: a command for the in-guest tool.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuestRequest {
    /// The command (its `id` is assigned by the agent).
    pub command: serde_json::Value,
    /// How long to wait for the answer, ms.
    #[serde(default = "default_guest_timeout")]
    pub timeout_ms: u64,
}

fn default_guest_timeout() -> u64 {
    30_000
}

/// Status of this agent (`GET /v1/status`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentStatus {
    /// Agent name.
    pub name: String,
    /// Site.
    pub site: String,
    /// godwit version.
    pub version: String,
    /// Certificate fingerprint.
    pub fingerprint: String,
    /// QUIC address.
    pub listen: String,
    /// Accelerator used for VMs.
    pub accel: String,
    /// Peers and their link figures.
    pub peers: Vec<PeerStatus>,
    /// VMs on this host.
    pub vms: Vec<VmInfo>,
    /// Migrations known to this agent.
    pub migrations: Vec<MigrationInfo>,
    /// Whether the host is in maintenance (takes no new VM).
    #[serde(default)]
    pub maintenance: bool,
    /// The current or last evacuation of this host.
    #[serde(default)]
    pub evacuation: Option<crate::evacuate::EvacuationInfo>,
    /// The guest network ([`crate::network::NetworkStatus`]), if it runs.
    #[serde(default)]
    pub network: Option<serde_json::Value>,
}

/// `POST /v1/maintenance`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetMaintenance {
    /// On or off.
    pub on: bool,
}

/// A peer as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Name.
    pub name: String,
    /// Site.
    pub site: String,
    /// Address.
    pub addr: String,
    /// Whether a QUIC connection is up.
    pub connected: bool,
    /// Smoothed round-trip time, ms.
    pub rtt_ms: Option<f64>,
    /// Bytes sent on the connection.
    pub tx_bytes: Option<u64>,
    /// Bytes received.
    pub rx_bytes: Option<u64>,
}

/// `POST /v1/peers`: trust another agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddPeer {
    /// The peer.
    #[serde(flatten)]
    pub peer: crate::config::PeerEntry,
}

/// Error body of every failed request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiErrorBody {
    /// Error class.
    pub code: String,
    /// Message, with its causes joined by ": ".
    pub message: String,
}
