//! QEMU process management for godwit: VM specs, command lines, launch,
//! supervision, and migration plumbing over QMP.
//!
//! # Layout
//!
//! - [`spec`]: [`VmSpec`] (guest hardware, migration-invariant) and
//!   [`HostConfig`] (binary, accelerator, directories).
//! - [`args`]: [`build_args`], the pure spec → command line function, and
//!   the per-instance file layout ([`InstancePaths`]).
//! - [`process`]: [`launch`], [`terminate`], liveness, [`resolve_machine`];
//!   [`QemuInstance`] is serialisable so the agent can persist and re-adopt it.
//! - [`migration`]: capability defaults, `start_incoming` / `start_outgoing`
//!   and [`wait_migration`].
#![warn(missing_docs)]

use std::path::PathBuf;
use std::time::Duration;

pub mod args;
pub mod migration;
pub mod process;
pub mod spec;

pub use args::{build_args, InstancePaths, GUEST_PORT_NAME, NIC_ID, RAM_BACKEND_ID};
pub use migration::{start_incoming, start_outgoing, wait_migration, MigrationOutcome};
pub use process::{
    is_alive, launch, launch_with_paths, new_instance_id, ram_backing, resolve_machine, retire,
    terminate, wait_exit, QemuInstance, RamBacking, Termination,
};
pub use spec::{Accel, DiskSpec, HostConfig, LaunchMode, NetdevSpec, NicSpec, VmSpec};

/// Errors of QEMU process management.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// The VM spec is unusable.
    #[error("invalid VM spec: {0}")]
    InvalidSpec(String),
    /// A unix socket path exceeds the kernel's limit.
    #[error("socket path too long (max {max} bytes): {0}", max = process::MAX_SOCKET_PATH_LEN)]
    PathTooLong(PathBuf),
    /// A filesystem operation failed.
    #[error("cannot {what}")]
    Io {
        /// What we tried.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The QEMU binary could not be executed.
    #[error("cannot execute {}", binary.display())]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU exited before QMP came up (bad arguments, missing files, ...).
    #[error("qemu exited during startup: {log_tail}")]
    ExitedDuringStartup {
        /// The end of QEMU's log.
        log_tail: String,
    },
    /// QMP did not come up in time.
    #[error("qemu QMP socket not ready after {after:?}")]
    StartupTimeout {
        /// The timeout.
        after: Duration,
    },
    /// A QMP command failed.
    #[error("QMP")]
    Qmp(#[from] godwit_qmp::QmpError),
    /// No such machine type or alias.
    #[error("unknown machine type {0:?}")]
    UnknownMachine(String),
    /// The process survived SIGKILL (stuck in the kernel).
    #[error("qemu pid {pid} did not exit after SIGKILL")]
    Unkillable {
        /// The pid.
        pid: u32,
    },
}
