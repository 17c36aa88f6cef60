//! Typed QMP commands and their replies, limited to what godwit drives.
//!
//! Each command is a struct holding its arguments; [`QmpCommand`] ties it to
//! the wire name and the reply type. Field names follow QEMU 7.2's
//! `qapi/*.json` (kebab-case on the wire). Reply fields QEMU may omit are
//! `Option`s, and unknown reply fields are ignored so newer QEMUs still
//! decode. Argument fields that are `None` are not sent, so QEMU keeps its
//! current value.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use crate::codec::VersionInfo;

/// A QMP command with typed arguments (`Self`) and a typed reply.
///
/// `Self` serialises to the `arguments` object; a unit struct serialises to
/// `null`, which means "no arguments".
pub trait QmpCommand: Serialize {
    /// The wire name, e.g. `query-status`.
    const NAME: &'static str;
    /// The decoded `return` value.
    type Output: DeserializeOwned;
}

/// The empty reply `{}` that most action commands return.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

macro_rules! unit_command {
    ($(#[$m:meta])* $ty:ident, $name:literal, $out:ty) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
        pub struct $ty;
        impl QmpCommand for $ty {
            const NAME: &'static str = $name;
            type Output = $out;
        }
    };
}

unit_command!(
    /// `qmp_capabilities`: leave capability negotiation mode.
    QmpCapabilities, "qmp_capabilities", Empty);
unit_command!(
    /// `query-version`.
    QueryVersion, "query-version", VersionInfo);
unit_command!(
    /// `query-status`: run state of the VM.
    QueryStatus, "query-status", StatusInfo);
unit_command!(
    /// `query-migrate`: progress of the current or last migration.
    QueryMigrate, "query-migrate", MigrationInfo);
unit_command!(
    /// `query-migrate-capabilities`.
    QueryMigrateCapabilities, "query-migrate-capabilities", Vec<MigrationCapabilityStatus>);
unit_command!(
    /// `query-migrate-parameters`.
    QueryMigrateParameters, "query-migrate-parameters", MigrationParameters);
unit_command!(
    /// `migrate_cancel`: abort an outgoing migration; in precopy the source keeps running.
    MigrateCancel, "migrate_cancel", Empty);
unit_command!(
    /// `cont`: resume vCPUs.
    Cont, "cont", Empty);
unit_command!(
    /// `stop`: pause vCPUs.
    Stop, "stop", Empty);
unit_command!(
    /// `quit`: QEMU exits right after replying.
    Quit, "quit", Empty);
unit_command!(
    /// `system_powerdown`: ACPI power button.
    SystemPowerdown, "system_powerdown", Empty);
unit_command!(
    /// `query-machines`: machine types this binary supports.
    QueryMachines, "query-machines", Vec<MachineInfo>);

/// Reply of `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// Run state: `running`, `paused`, `inmigrate`, `postmigrate`, `shutdown`, ...
    pub status: String,
    /// Whether vCPUs are running.
    pub running: bool,
}

/// RAM statistics inside [`MigrationInfo`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(missing_docs)] // Names mirror QEMU's MigrationStats; see qapi/migration.json.
pub struct MigrationRamStats {
    pub transferred: Option<u64>,
    pub remaining: Option<u64>,
    pub total: Option<u64>,
    pub duplicate: Option<u64>,
    pub normal: Option<u64>,
    pub normal_bytes: Option<u64>,
    pub dirty_pages_rate: Option<u64>,
    /// Megabits per second (a float in QEMU).
    pub mbps: Option<f64>,
    pub dirty_sync_count: Option<u64>,
    pub precopy_bytes: Option<u64>,
    pub downtime_bytes: Option<u64>,
    pub postcopy_bytes: Option<u64>,
    pub pages_per_second: Option<u64>,
    pub page_size: Option<u64>,
    pub multifd_bytes: Option<u64>,
}

/// Reply of `query-migrate`. All members are optional because QEMU only
/// reports those that apply to the current state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// `none`, `setup`, `active`, `completed`, `failed`, `cancelled`, ...
    pub status: Option<String>,
    /// Milliseconds since the start (final total once completed).
    pub total_time: Option<u64>,
    /// Actual downtime in ms; only after completion.
    pub downtime: Option<u64>,
    /// Predicted downtime in ms; only while active.
    pub expected_downtime: Option<u64>,
    /// Setup phase duration in ms.
    pub setup_time: Option<u64>,
    /// RAM progress.
    pub ram: Option<MigrationRamStats>,
    /// Why it failed.
    pub error_desc: Option<String>,
    /// Current auto-converge throttle.
    pub cpu_throttle_percentage: Option<u64>,
}

impl MigrationInfo {
    /// The status string, `"none"` when absent.
    pub fn status(&self) -> &str {
        self.status.as_deref().unwrap_or("none")
    }
}

/// One `{capability, state}` pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationCapabilityStatus {
    /// Capability name, e.g. `return-path`, `events`, `x-ignore-shared`.
    pub capability: String,
    /// Whether it is enabled.
    pub state: bool,
}

impl MigrationCapabilityStatus {
    /// Shorthand constructor.
    pub fn new(capability: impl Into<String>, state: bool) -> Self {
        Self {
            capability: capability.into(),
            state,
        }
    }
}

/// `migrate-set-capabilities`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrateSetCapabilities {
    /// Capabilities to change.
    pub capabilities: Vec<MigrationCapabilityStatus>,
}

impl QmpCommand for MigrateSetCapabilities {
    const NAME: &'static str = "migrate-set-capabilities";
    type Output = Empty;
}

/// Migration parameters: the argument of `migrate-set-parameters` and the
/// reply of `query-migrate-parameters`. `None` fields are not sent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationParameters {
    /// Bytes per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    /// Milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_limit: Option<u64>,
    /// Auto-converge initial throttle, percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_initial: Option<u8>,
    /// Auto-converge throttle step, percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_increment: Option<u8>,
    /// Auto-converge: keep throttling proportional.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_tailslow: Option<bool>,
    /// Auto-converge ceiling, percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_cpu_throttle: Option<u8>,
    /// Dirty-rate/bandwidth percentage that triggers throttling.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttle_trigger_threshold: Option<u8>,
    /// Self-announce: initial delay, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub announce_initial: Option<u64>,
    /// Self-announce: max delay, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub announce_max: Option<u64>,
    /// Self-announce: number of rounds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub announce_rounds: Option<u64>,
    /// Self-announce: step, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub announce_step: Option<u64>,
    /// Number of multifd channels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd_channels: Option<u8>,
    /// `none`, `zlib`, `zstd`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd_compression: Option<String>,
    /// XBZRLE cache size, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xbzrle_cache_size: Option<u64>,
    /// Postcopy bandwidth cap, bytes/s (0 = unlimited).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_postcopy_bandwidth: Option<u64>,
}

/// `migrate-set-parameters`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(transparent)]
pub struct MigrateSetParameters(pub MigrationParameters);

impl QmpCommand for MigrateSetParameters {
    const NAME: &'static str = "migrate-set-parameters";
    type Output = Empty;
}

/// `migrate`: start an outgoing migration (returns immediately; watch
/// `MIGRATION` events or poll `query-migrate`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Migrate {
    /// e.g. `unix:/run/godwit/x.sock`, `tcp:host:port`.
    pub uri: String,
}

impl QmpCommand for Migrate {
    const NAME: &'static str = "migrate";
    type Output = Empty;
}

/// `migrate-incoming`: start listening (QEMU must run with `-incoming defer`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrateIncoming {
    /// e.g. `unix:/run/godwit/x.sock`.
    pub uri: String,
}

impl QmpCommand for MigrateIncoming {
    const NAME: &'static str = "migrate-incoming";
    type Output = Empty;
}

/// One entry of `query-machines`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MachineInfo {
    /// Concrete, versioned name, e.g. `pc-i440fx-7.2`.
    pub name: String,
    /// Alias such as `pc` or `q35`.
    pub alias: Option<String>,
    /// Whether this is the default machine.
    #[serde(default)]
    pub is_default: bool,
    /// Maximum vCPUs.
    pub cpu_max: Option<u32>,
    /// Whether the machine type is deprecated.
    #[serde(default)]
    pub deprecated: bool,
}

/// `human-monitor-command`: run an HMP command (debugging only; the output
/// format is not stable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct HumanMonitorCommand {
    /// The HMP command line, e.g. `info migrate`.
    pub command_line: String,
}

impl QmpCommand for HumanMonitorCommand {
    const NAME: &'static str = "human-monitor-command";
    type Output = String;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unit_commands_have_no_arguments() {
        assert_eq!(serde_json::to_value(QueryStatus).unwrap(), json!(null));
    }

    #[test]
    fn set_parameters_skips_none() {
        let p = MigrateSetParameters(MigrationParameters {
            max_bandwidth: Some(1 << 30),
            downtime_limit: Some(500),
            ..Default::default()
        });
        assert_eq!(
            serde_json::to_value(p).unwrap(),
            json!({"max-bandwidth": 1073741824u64, "downtime-limit": 500})
        );
    }

    #[test]
    fn decodes_captured_query_migrate() {
        // [measured] QEMU 7.2 source after a run (reference doc section 4.2).
        let v = json!({"status":"completed","setup-time":4,"downtime":7,"total-time":143,
         "ram":{"transferred":18138927,"remaining":0,"total":269230080,"duplicate":61460,
                "skipped":0,"normal":4285,"normal-bytes":17551360,"dirty-pages-rate":0,
                "mbps":1053.1,"dirty-sync-count":3,"postcopy-requests":0,"page-size":4096,
                "multifd-bytes":0,"pages-per-second":134580,"precopy-bytes":18138785,
                "downtime-bytes":142,"postcopy-bytes":0,"dirty-sync-missed-zero-copy":0}});
        let i: MigrationInfo = serde_json::from_value(v).unwrap();
        assert_eq!(i.status(), "completed");
        assert_eq!(i.downtime, Some(7));
        let ram = i.ram.unwrap();
        assert_eq!(ram.normal_bytes, Some(17551360));
        assert_eq!(ram.mbps, Some(1053.1));
        let none: MigrationInfo = serde_json::from_value(json!({})).unwrap();
        assert_eq!(none.status(), "none");
    }

    #[test]
    fn decodes_machine_and_status() {
        let m: Vec<MachineInfo> = serde_json::from_value(json!([
            {"hotpluggable-cpus": true, "name": "pc-i440fx-7.2", "alias": "pc", "is-default": true,
             "cpu-max": 255, "deprecated": false, "default-ram-id": "pc.ram"},
            {"name": "pc-q35-5.2", "cpu-max": 288, "deprecated": false}
        ]))
        .unwrap();
        assert_eq!(m[0].alias.as_deref(), Some("pc"));
        assert!(m[0].is_default && !m[1].is_default);
        let s: StatusInfo =
            serde_json::from_value(json!({"status":"running","singlestep":false,"running":true}))
                .unwrap();
        assert!(s.running);
        let _: Empty = serde_json::from_value(json!({})).unwrap();
    }
}
