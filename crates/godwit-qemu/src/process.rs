//! QEMU process lifecycle: launch, liveness, termination, machine probing.
//!
//! QEMU runs in its own session (`setsid`), with stdin on `/dev/null` and
//! stdout/stderr appended to a per-instance log, so it survives an agent
//! restart. A [`QemuInstance`] is plain serialisable data; the agent can
//! persist it and later re-adopt the process with
//! [`QemuInstance::is_running`] and [`QmpClient::connect`]. Liveness is
//! checked through `/proc`, which works for children and adopted processes
//! alike; while this process is QEMU's parent, a background task reaps it.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use godwit_qmp::commands::{QueryMachines, Quit};
use godwit_qmp::{QmpClient, QmpCommand, QmpError, QmpEvent};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tracing::{debug, info, warn};

use crate::args::{build_args, InstancePaths};
use crate::spec::{HostConfig, LaunchMode, VmSpec};
use crate::QemuError;

/// Longest unix socket path: `sun_path` is 108 bytes including the NUL.
pub const MAX_SOCKET_PATH_LEN: usize = 107;

/// How long QEMU may take from exec to accepting QMP connections. Startup
/// is normally well under a second; large `-m` with preallocation or a slow
/// disk can stretch it.
pub const QMP_STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Poll interval while waiting for the QMP socket or for a process to exit.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// How long to wait for a process to vanish after SIGKILL. Longer means it
/// is stuck in the kernel (D state), which we report instead of hiding.
pub const SIGKILL_WAIT: Duration = Duration::from_secs(5);

/// After a failed startup handshake, how long to wait for QEMU to exit
/// before reporting the QMP error itself.
const STARTUP_EXIT_WAIT: Duration = Duration::from_millis(500);

/// How long the `-machine none` probe may take to obey `quit`.
const PROBE_QUIT_GRACE: Duration = Duration::from_secs(2);

/// How much of `qemu.log` a startup error quotes.
const LOG_TAIL_BYTES: usize = 2048;

/// A running (or once-running) QEMU process and its host-side files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuInstance {
    /// VM name.
    pub vm: String,
    /// Unique id of this QEMU process (a VM gets a new one per host/migration).
    pub instance_id: String,
    /// Process id.
    pub pid: u32,
    /// How it was started.
    pub mode: LaunchMode,
    /// Instance directory (`run_dir/<vm>-<instance>`); logs stay here after terminate.
    pub dir: PathBuf,
    /// QMP unix socket.
    pub qmp_socket: PathBuf,
    /// Guest agent chardev socket (virtio-serial port `org.godwit.guest.0`).
    pub guest_socket: PathBuf,
    /// NIC `-netdev stream` socket (QEMU listens). Empty in records
    /// written before it existed, whose VMs have no stream NIC.
    #[serde(default)]
    pub net_socket: PathBuf,
    /// Guest serial console log.
    pub serial_log: PathBuf,
    /// QEMU stdout/stderr.
    pub qemu_log: PathBuf,
    /// QEMU pidfile.
    pub pidfile: PathBuf,
    /// Guest RAM file.
    pub ram_file: PathBuf,
    /// Launch time, ms since the epoch.
    pub started_at_ms: u64,
}

impl QemuInstance {
    /// Whether the process is alive *and* is still this QEMU (guards against
    /// pid reuse after an agent restart: its command line must name our QMP socket).
    pub fn is_running(&self) -> bool {
        is_alive(self.pid) && cmdline_mentions(self.pid, &self.qmp_socket)
    }
}

/// How [`terminate`] stopped the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Termination {
    /// It was already gone.
    AlreadyExited,
    /// It obeyed QMP `quit`.
    Quit,
    /// It needed SIGTERM.
    Sigterm,
    /// It needed SIGKILL.
    Sigkill,
}

/// A fresh instance id: pid, time and a counter, hex. Unique on this host,
/// which is all it names (files and sockets); the agent adds host identity.
pub fn new_instance_id() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "{:x}{:x}{n:x}",
        ms & 0xff_ffff_ffff,
        std::process::id() & 0xffff
    )
}

/// Launch QEMU with a fresh instance id and the standard path layout, and
/// wait until QMP is up. See [`launch_with_paths`].
pub async fn launch(
    spec: &VmSpec,
    host: &HostConfig,
    mode: LaunchMode,
) -> Result<(QemuInstance, QmpClient, broadcast::Receiver<QmpEvent>), QemuError> {
    let id = new_instance_id();
    let paths = InstancePaths::new(host, &spec.name, &id);
    launch_with_paths(spec, host, &id, &paths, mode).await
}

/// Launch QEMU with explicit paths (e.g. a destination that must map the
/// source's RAM file for `x-ignore-shared`). On any error the process is
/// killed and its files removed.
pub async fn launch_with_paths(
    spec: &VmSpec,
    host: &HostConfig,
    instance_id: &str,
    paths: &InstancePaths,
    mode: LaunchMode,
) -> Result<(QemuInstance, QmpClient, broadcast::Receiver<QmpEvent>), QemuError> {
    spec.validate()?;
    if !crate::spec::is_safe_name(instance_id, 64) {
        return Err(QemuError::InvalidSpec(format!(
            "bad instance id {instance_id:?}"
        )));
    }
    for s in [&paths.qmp_socket, &paths.guest_socket, &paths.net_socket] {
        if s.as_os_str().len() > MAX_SOCKET_PATH_LEN {
            return Err(QemuError::PathTooLong(s.clone()));
        }
    }
    for d in [&paths.dir, &host.ram_dir] {
        std::fs::create_dir_all(d).map_err(|source| QemuError::Io {
            what: format!("create {}", d.display()),
            source,
        })?;
    }
    if let Some(parent) = paths.ram_file.parent() {
        std::fs::create_dir_all(parent).map_err(|source| QemuError::Io {
            what: format!("create {}", parent.display()),
            source,
        })?;
    }
    // A stale socket from a crashed predecessor with the same id would make
    // us connect to nothing; the id is fresh, but be safe.
    for s in [&paths.qmp_socket, &paths.guest_socket, &paths.net_socket] {
        let _ = std::fs::remove_file(s);
    }
    let args = build_args(spec, host, paths, mode);
    let child = spawn_detached(&host.qemu_binary, &args, &paths.qemu_log)?;
    let pid = child.id().ok_or_else(|| QemuError::Spawn {
        binary: host.qemu_binary.clone(),
        source: std::io::Error::other("child exited before its pid was read"),
    })?;
    info!(vm = %spec.name, instance = instance_id, pid, ?mode, "qemu started");
    reap_in_background(child, spec.name.clone(), pid);

    let inst = QemuInstance {
        vm: spec.name.clone(),
        instance_id: instance_id.to_owned(),
        pid,
        mode,
        dir: paths.dir.clone(),
        qmp_socket: paths.qmp_socket.clone(),
        guest_socket: paths.guest_socket.clone(),
        net_socket: paths.net_socket.clone(),
        serial_log: paths.serial_log.clone(),
        qemu_log: paths.qemu_log.clone(),
        pidfile: paths.pidfile.clone(),
        ram_file: paths.ram_file.clone(),
        started_at_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    };
    match wait_for_qmp(pid, &paths.qmp_socket, QMP_STARTUP_TIMEOUT).await {
        Ok((client, events)) => Ok((inst, client, events)),
        Err(e) => {
            // QEMU opens the QMP socket before it loads the kernel or
            // initialises devices, so a bad argument can also surface as a
            // QMP handshake failure. If the process died, say so, with its log.
            let died = matches!(e, QemuError::ExitedDuringStartup { .. })
                || wait_exit(pid, STARTUP_EXIT_WAIT).await;
            let e = if died {
                QemuError::ExitedDuringStartup {
                    log_tail: log_tail(&paths.qemu_log),
                }
            } else {
                e
            };
            warn!(vm = %spec.name, cause = %e, "qemu failed to start");
            let _ = terminate(&inst, None, Duration::ZERO).await;
            Err(e)
        }
    }
}

fn spawn_detached(
    binary: &Path,
    args: &[OsString],
    log: &Path,
) -> Result<tokio::process::Child, QemuError> {
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|source| QemuError::Io {
            what: format!("open {}", log.display()),
            source,
        })?;
    let logf2 = logf.try_clone().map_err(|source| QemuError::Io {
        what: format!("dup {}", log.display()),
        source,
    })?;
    let mut cmd = std::process::Command::new(binary);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(logf))
        .stderr(Stdio::from(logf2));
    // SAFETY: the closure runs between fork and exec and only calls setsid,
    // which is async-signal-safe; it touches no allocator or lock.
    unsafe {
        cmd.pre_exec(|| {
            // Own session and process group: terminal signals and an agent
            // restart (killing the agent's process group) leave QEMU alone.
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    debug!(binary = %binary.display(), ?args, "spawning qemu");
    tokio::process::Command::from(cmd)
        .kill_on_drop(false)
        .spawn()
        .map_err(|source| QemuError::Spawn {
            binary: binary.to_path_buf(),
            source,
        })
}

/// Reap our child so it never lingers as a zombie (which `is_alive` would
/// treat as dead anyway). If the runtime shuts down first, tokio's orphan
/// queue reaps it.
fn reap_in_background(mut child: tokio::process::Child, vm: String, pid: u32) {
    tokio::spawn(async move {
        match child.wait().await {
            Ok(st) if st.success() => info!(%vm, pid, "qemu exited"),
            Ok(st) => warn!(%vm, pid, status = %st, "qemu exited abnormally"),
            Err(e) => warn!(%vm, pid, cause = %e, "cannot wait for qemu"),
        }
    });
}

async fn wait_for_qmp(
    pid: u32,
    sock: &Path,
    timeout: Duration,
) -> Result<(QmpClient, broadcast::Receiver<QmpEvent>), QemuError> {
    let deadline = Instant::now() + timeout;
    loop {
        if !is_alive(pid) {
            return Err(QemuError::ExitedDuringStartup {
                log_tail: String::new(),
            });
        }
        match QmpClient::connect(sock).await {
            Ok(c) => return Ok(c),
            // Not listening yet: QEMU creates the socket during startup.
            Err(QmpError::Connect { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(POLL_INTERVAL).await;
            }
            Err(QmpError::Connect { .. }) => {
                return Err(QemuError::StartupTimeout { after: timeout })
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn log_tail(log: &Path) -> String {
    let Ok(data) = std::fs::read(log) else {
        return String::new();
    };
    let start = data.len().saturating_sub(LOG_TAIL_BYTES);
    String::from_utf8_lossy(&data[start..]).trim().to_owned()
}

/// Whether `pid` exists and is not a zombie.
pub fn is_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Format: "pid (comm) S ..."; comm may contain spaces and parentheses,
    // so the state is the first field after the *last* ')'.
    match stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
    {
        Some("Z") | Some("X") | Some("x") => false,
        Some(_) => true,
        None => false,
    }
}

fn cmdline_mentions(pid: u32, needle: &Path) -> bool {
    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = needle.as_os_str().as_encoded_bytes();
    !needle.is_empty() && cmd.windows(needle.len()).any(|w| w == needle)
}

/// Wait until `pid` is gone. Returns `false` on timeout.
pub async fn wait_exit(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !is_alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    let Ok(p) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions; the pid was
    // verified to be our QEMU just before.
    let _ = unsafe { libc::kill(p, sig) };
}

/// Stop an instance: QMP `quit` (if a client is given), then SIGTERM, then
/// SIGKILL, waiting `grace` after each of the first two. Always removes the
/// RAM file, the sockets and the pidfile (logs stay). Signals are only sent
/// while the pid still runs this instance's command line.
///
/// A source that was migrated away is in `postmigrate`; `quit` is the right
/// way to end it. An instance whose RAM file another instance maps (either
/// side of a same-host handover) must be ended with [`retire`] instead.
pub async fn terminate(
    inst: &QemuInstance,
    client: Option<&QmpClient>,
    grace: Duration,
) -> Result<Termination, QemuError> {
    end(inst, client, grace, true).await
}

/// Like [`terminate`], but leaves the RAM file in place: for the old QEMU
/// after a same-host handover (the new one runs the guest on that very
/// file) and for a new QEMU whose handover failed (the file is still the
/// old one's guest RAM).
pub async fn retire(
    inst: &QemuInstance,
    client: Option<&QmpClient>,
    grace: Duration,
) -> Result<Termination, QemuError> {
    end(inst, client, grace, false).await
}

async fn end(
    inst: &QemuInstance,
    client: Option<&QmpClient>,
    grace: Duration,
    remove_ram: bool,
) -> Result<Termination, QemuError> {
    let how = stop_process(inst, client, grace).await;
    cleanup_files(inst, remove_ram);
    let how = how?;
    info!(vm = %inst.vm, instance = %inst.instance_id, ?how, remove_ram, "qemu terminated");
    Ok(how)
}

/// Linux `statfs` magic of tmpfs (`/dev/shm`).
const TMPFS_MAGIC: i64 = 0x0102_1994;
/// Linux `statfs` magic of hugetlbfs.
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// Where a guest RAM file lives, as far as a same-host handover cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RamBacking {
    /// tmpfs: memory, shared by every process that maps the file.
    Tmpfs,
    /// hugetlbfs.
    Hugetlbfs,
}

/// Checks that `ram_file` is a file QEMU can hand to another QEMU with
/// `x-ignore-shared`: a regular file on tmpfs or hugetlbfs. On any other
/// file system the pages would be written back to a disk, and anything that
/// is not a named file (memfd, anonymous `share=on`) is silently *not*
/// carried over by QEMU 7.2, so it is refused with the reason.
pub fn ram_backing(ram_file: &Path) -> Result<RamBacking, QemuError> {
    let meta = std::fs::metadata(ram_file).map_err(|source| QemuError::Io {
        what: format!("stat guest RAM file {}", ram_file.display()),
        source,
    })?;
    if !meta.is_file() {
        return Err(QemuError::InvalidSpec(format!(
            "guest RAM {} is not a regular file",
            ram_file.display()
        )));
    }
    let c = std::ffi::CString::new(ram_file.as_os_str().as_encoded_bytes()).map_err(|_| {
        QemuError::InvalidSpec(format!(
            "guest RAM path {} has a NUL byte",
            ram_file.display()
        ))
    })?;
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid NUL-terminated C string and `st` a live,
    // properly sized struct; both outlive the call.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(QemuError::Io {
            what: format!("statfs {}", ram_file.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs by libc target.
    match st.f_type as i64 {
        TMPFS_MAGIC => Ok(RamBacking::Tmpfs),
        HUGETLBFS_MAGIC => Ok(RamBacking::Hugetlbfs),
        other => Err(QemuError::InvalidSpec(format!(
            "guest RAM {} is on a file system of type {other:#x}, not tmpfs or hugetlbfs: \
             its pages would be written back to disk",
            ram_file.display()
        ))),
    }
}

async fn stop_process(
    inst: &QemuInstance,
    client: Option<&QmpClient>,
    grace: Duration,
) -> Result<Termination, QemuError> {
    if !inst.is_running() {
        return Ok(Termination::AlreadyExited);
    }
    if let Some(c) = client.filter(|c| !c.is_closed()) {
        match c
            .execute_timeout(Quit::NAME, serde_json::Value::Null, grace)
            .await
        {
            Ok(_) | Err(QmpError::Disconnected) => {}
            Err(e) => debug!(cause = %e, "qmp quit failed"),
        }
        if wait_exit(inst.pid, grace).await {
            return Ok(Termination::Quit);
        }
    }
    if !inst.is_running() {
        return Ok(Termination::AlreadyExited);
    }
    signal(inst.pid, libc::SIGTERM);
    if wait_exit(inst.pid, grace).await {
        return Ok(Termination::Sigterm);
    }
    if inst.is_running() {
        signal(inst.pid, libc::SIGKILL);
    }
    if wait_exit(inst.pid, SIGKILL_WAIT).await {
        Ok(Termination::Sigkill)
    } else {
        Err(QemuError::Unkillable { pid: inst.pid })
    }
}

fn cleanup_files(inst: &QemuInstance, remove_ram: bool) {
    let ram = remove_ram.then_some(&inst.ram_file);
    for f in [
        &inst.qmp_socket,
        &inst.guest_socket,
        &inst.net_socket,
        &inst.pidfile,
    ]
    .into_iter()
    .chain(ram)
    {
        match std::fs::remove_file(f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(file = %f.display(), cause = %e, "cannot remove instance file"),
        }
    }
}

/// Resolve a machine alias (`pc`, `q35`) to the concrete versioned type this
/// QEMU maps it to (e.g. `pc-i440fx-7.2`) by asking a throwaway
/// `-machine none` QEMU. A name that is already concrete is returned as is.
pub async fn resolve_machine(host: &HostConfig, alias: &str) -> Result<String, QemuError> {
    let id = format!("probe-{}", new_instance_id());
    let dir = host.run_dir.join(&id);
    std::fs::create_dir_all(&dir).map_err(|source| QemuError::Io {
        what: format!("create {}", dir.display()),
        source,
    })?;
    let sock = dir.join("qmp.sock");
    let log = dir.join("qemu.log");
    let accel = match host.accel {
        crate::Accel::Tcg => "tcg",
        crate::Accel::Kvm => "kvm",
    };
    let args: Vec<OsString> = vec![
        "-machine".into(),
        "none".into(),
        "-accel".into(),
        accel.into(),
        "-nodefaults".into(),
        "-display".into(),
        "none".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", sock.display()).into(),
    ];
    let child = spawn_detached(&host.qemu_binary, &args, &log)?;
    let pid = child.id().unwrap_or(0);
    reap_in_background(child, id.clone(), pid);
    let probe = QemuInstance {
        vm: id.clone(),
        instance_id: id.clone(),
        pid,
        mode: LaunchMode::Fresh,
        dir: dir.clone(),
        qmp_socket: sock.clone(),
        guest_socket: dir.join("unused"),
        net_socket: dir.join("unused"),
        serial_log: dir.join("unused"),
        qemu_log: log.clone(),
        pidfile: dir.join("unused"),
        ram_file: dir.join("unused"),
        started_at_ms: 0,
    };
    let mut client = None;
    let res = async {
        let (c, _ev) = wait_for_qmp(pid, &sock, QMP_STARTUP_TIMEOUT).await?;
        let c = client.insert(c);
        Ok::<_, QemuError>(c.execute_typed(&QueryMachines).await?)
    }
    .await;
    let _ = terminate(&probe, client.as_ref(), PROBE_QUIT_GRACE).await;
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_dir(&dir);
    let machines = res?;
    machines
        .iter()
        .find(|m| m.name == alias)
        .or_else(|| machines.iter().find(|m| m.alias.as_deref() == Some(alias)))
        .map(|m| m.name.clone())
        .ok_or_else(|| QemuError::UnknownMachine(alias.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_of_self_and_nonexistent() {
        assert!(is_alive(std::process::id()));
        assert!(!is_alive(u32::MAX - 1));
    }

    #[test]
    fn instance_ids_are_unique_and_safe() {
        let a = new_instance_id();
        let b = new_instance_id();
        assert_ne!(a, b);
        assert!(crate::spec::is_safe_name(&a, 64));
    }
}
