//! Driving and watching a migration through QMP.
//!
//! The source always enables `return-path`: with it, QEMU reports
//! `completed` only after the destination has loaded the state and started
//! the VM (the destination's `SHUT` message); without it `completed` only
//! means "written into the socket". `events` is enabled on both ends so
//! progress arrives as `MIGRATION` events; [`wait_migration`] also polls
//! `query-migrate`, so a lagged event receiver cannot hang it.

use std::time::Duration;

use godwit_qmp::commands::{
    Migrate, MigrateIncoming, MigrateSetCapabilities, MigrateSetParameters,
    MigrationCapabilityStatus, MigrationInfo, MigrationParameters, QueryMigrate,
};
use godwit_qmp::{QmpClient, QmpError, QmpEvent};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tracing::debug;

use crate::QemuError;

/// How often [`wait_migration`] polls `query-migrate` besides listening to
/// events: a safety net, and the cadence of the `on_progress` callback.
pub const MIGRATION_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Capabilities godwit always sets on the source.
///
/// `x-ignore-shared` is cleared explicitly: capabilities stay set in a QEMU
/// process, and one that received the guest by a same-host handover has
/// it on. A migration to another host with it on would leave the guest's
/// RAM behind. A handover sets it again as an extra capability.
pub fn source_capabilities() -> Vec<MigrationCapabilityStatus> {
    vec![
        MigrationCapabilityStatus::new("events", true),
        MigrationCapabilityStatus::new("return-path", true),
        MigrationCapabilityStatus::new("x-ignore-shared", false),
    ]
}

/// Capabilities godwit always sets on the destination (see
/// [`source_capabilities`] for `x-ignore-shared`).
pub fn destination_capabilities() -> Vec<MigrationCapabilityStatus> {
    vec![
        MigrationCapabilityStatus::new("events", true),
        MigrationCapabilityStatus::new("x-ignore-shared", false),
    ]
}

/// Destination: set capabilities (the defaults plus `extra`, which wins)
/// and start listening on `uri` (the QEMU must run in
/// [`LaunchMode::Incoming`](crate::LaunchMode::Incoming)).
pub async fn start_incoming(
    client: &QmpClient,
    uri: &str,
    extra: &[MigrationCapabilityStatus],
) -> Result<(), QemuError> {
    let mut capabilities = destination_capabilities();
    capabilities.extend_from_slice(extra);
    client
        .execute_typed(&MigrateSetCapabilities { capabilities })
        .await?;
    client
        .execute_typed(&MigrateIncoming {
            uri: uri.to_owned(),
        })
        .await?;
    Ok(())
}

/// Source: set capabilities (the defaults plus `extra`) and parameters, then
/// start migrating to `uri`. Returns as soon as QEMU accepted the command.
pub async fn start_outgoing(
    client: &QmpClient,
    uri: &str,
    extra: &[MigrationCapabilityStatus],
    params: &MigrationParameters,
) -> Result<(), QemuError> {
    let mut capabilities = source_capabilities();
    capabilities.extend_from_slice(extra);
    client
        .execute_typed(&MigrateSetCapabilities { capabilities })
        .await?;
    if *params != MigrationParameters::default() {
        client
            .execute_typed(&MigrateSetParameters(params.clone()))
            .await?;
    }
    client
        .execute_typed(&Migrate {
            uri: uri.to_owned(),
        })
        .await?;
    Ok(())
}

/// How a migration ended, as seen by one QEMU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum MigrationOutcome {
    /// Status `completed`.
    Completed {
        /// Final statistics (may be sparse on the destination).
        info: MigrationInfo,
    },
    /// Status `failed`.
    Failed {
        /// QEMU's `error-desc`, if any.
        error: Option<String>,
        /// Final statistics.
        info: MigrationInfo,
    },
    /// Status `cancelled`.
    Cancelled {
        /// Final statistics.
        info: MigrationInfo,
    },
    /// The QMP connection closed first. On a QEMU 7.2 destination this is
    /// how a failed incoming migration looks: QEMU exits.
    Disconnected {
        /// The last status seen before the connection closed.
        last_status: Option<String>,
    },
    /// The timeout passed; the migration is still running.
    TimedOut {
        /// Latest statistics.
        info: MigrationInfo,
    },
}

fn is_terminal(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "cancelled")
}

fn outcome_of(info: MigrationInfo) -> MigrationOutcome {
    match info.status() {
        "completed" => MigrationOutcome::Completed { info },
        "cancelled" => MigrationOutcome::Cancelled { info },
        _ => MigrationOutcome::Failed {
            error: info.error_desc.clone(),
            info,
        },
    }
}

/// Wait until the migration reaches `completed`, `failed` or `cancelled`,
/// the connection closes, or `timeout` passes. Works on both ends.
/// `on_progress` is called with every `query-migrate` poll result.
pub async fn wait_migration(
    client: &QmpClient,
    events: &mut broadcast::Receiver<QmpEvent>,
    timeout: Duration,
    mut on_progress: impl FnMut(&MigrationInfo),
) -> Result<MigrationOutcome, QemuError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut tick = tokio::time::interval(MIGRATION_POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_status: Option<String> = None;
    let mut events_open = true;
    loop {
        tokio::select! {
            ev = events.recv(), if events_open => match ev {
                Ok(ev) if ev.name == "MIGRATION" => {
                    let status = ev.data.get("status").and_then(|s| s.as_str()).unwrap_or_default();
                    debug!(status, "migration event");
                    last_status = Some(status.to_owned());
                    if is_terminal(status) {
                        // Fetch the final statistics; fall back to the event.
                        return match client.execute_typed(&godwit_qmp::commands::QueryMigrate).await {
                            Ok(info) if is_terminal(info.status()) => Ok(outcome_of(info)),
                            Ok(_) | Err(QmpError::Disconnected) => Ok(outcome_of(MigrationInfo {
                                status: Some(status.to_owned()),
                                ..Default::default()
                            })),
                            Err(e) => Err(e.into()),
                        };
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => debug!(n, "migration events lagged"),
                // The client's driver is gone: the connection closed.
                Err(broadcast::error::RecvError::Closed) => events_open = false,
            },
            _ = tick.tick() => match client.execute_typed(&QueryMigrate).await {
                Ok(info) => {
                    on_progress(&info);
                    if is_terminal(info.status()) {
                        return Ok(outcome_of(info));
                    }
                    last_status = info.status.clone();
                }
                Err(QmpError::Disconnected) => return Ok(MigrationOutcome::Disconnected { last_status }),
                Err(e) => return Err(e.into()),
            },
            _ = tokio::time::sleep_until(deadline) => {
                let info = match client.execute_typed(&QueryMigrate).await {
                    Ok(i) => i,
                    Err(QmpError::Disconnected) => return Ok(MigrationOutcome::Disconnected { last_status }),
                    Err(e) => return Err(e.into()),
                };
                return Ok(MigrationOutcome::TimedOut { info });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_mapping() {
        let mk = |s: &str| MigrationInfo {
            status: Some(s.into()),
            error_desc: Some("boom".into()),
            ..Default::default()
        };
        assert!(matches!(
            outcome_of(mk("completed")),
            MigrationOutcome::Completed { .. }
        ));
        assert!(matches!(
            outcome_of(mk("cancelled")),
            MigrationOutcome::Cancelled { .. }
        ));
        match outcome_of(mk("failed")) {
            MigrationOutcome::Failed { error, .. } => assert_eq!(error.as_deref(), Some("boom")),
            o => panic!("{o:?}"),
        }
        assert!(is_terminal("failed") && !is_terminal("active") && !is_terminal("none"));
    }
}
