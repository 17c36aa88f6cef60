//! Running code inside a site's network namespace.
//!
//! Namespaces are the named ones `ip netns add` creates, bound under
//! [`NETNS_RUN_DIR`]. A network namespace is a per-*thread* attribute, so
//! [`run_in`] / [`spawn_in`] use a fresh thread that `setns`es and then
//! exits, leaving the caller's threads in the root namespace. Sockets and TUN
//! fds created by that thread stay in the site's namespace after it returns.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::LabError;

/// Where iproute2 binds named network namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Opens the namespace file of `netns` (close-on-exec).
pub(crate) fn open_netns(netns: &str) -> Result<OwnedFd, LabError> {
    let path = format!("{NETNS_RUN_DIR}/{netns}");
    let c = CString::new(path.clone()).map_err(|_| LabError::UnknownSite(netns.to_owned()))?;
    // SAFETY: `c` is a valid NUL-terminated path; open has no other preconditions.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(LabError::io(
            format!("open network namespace {path}"),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Moves the calling thread into the namespace behind `fd`.
fn setns_net(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: setns only reads the fd; it affects the calling thread only.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A `Command` whose child runs inside network namespace `netns`.
///
/// The namespace is opened now and entered between fork and exec; if it
/// cannot be opened, spawning the command fails with that error. Unlike
/// `ip netns exec`, `/sys` is not remounted: the child sees the namespace's
/// sockets, routes and `/proc/sys/net`, but `/sys/class/net` of the root.
pub fn command_in(netns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    let fd = open_netns(netns).map(Arc::new).map_err(|e| match e {
        LabError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::ENOENT),
        _ => libc::EINVAL,
    });
    // SAFETY: the closure only calls setns (async-signal-safe) on an fd
    // opened before fork, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || match &fd {
            Ok(fd) => setns_net(fd),
            Err(errno) => Err(std::io::Error::from_raw_os_error(*errno)),
        });
    }
    cmd
}

/// Runs `f` on a fresh thread inside `netns` and returns its result.
pub fn run_in<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, LabError> {
    spawn_in(netns, f)?
        .join()
        .map_err(|_| LabError::ThreadPanicked(netns.to_owned()))?
}

/// Starts `f` on a fresh thread inside `netns`; join the handle for its result.
///
/// Errors opening or entering the namespace come back through the handle so
/// the caller can start several threads before waiting for any.
pub fn spawn_in<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<Result<T, LabError>>, LabError> {
    let fd = open_netns(netns)?;
    let name = netns.to_owned();
    std::thread::Builder::new()
        .name(format!("netns-{name}"))
        .spawn(move || {
            setns_net(&fd).map_err(|e| LabError::io(format!("setns into {name}"), e))?;
            drop(fd);
            Ok(f())
        })
        .map_err(|e| LabError::io("spawn namespace thread", e))
}

/// Names of the existing network namespaces starting with `<prefix>-`.
pub fn list_with_prefix(prefix: &str) -> Vec<String> {
    let want = format!("{prefix}-");
    let Ok(rd) = std::fs::read_dir(NETNS_RUN_DIR) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&want))
        .collect();
    v.sort();
    v
}

/// Runs `cmd`, turning a non-zero exit into [`LabError::Command`].
pub(crate) fn run_checked(cmd: &mut Command) -> Result<String, LabError> {
    let line = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(|e| LabError::io(format!("run {line}"), e))?;
    if !out.status.success() {
        return Err(LabError::Command {
            command: line,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip <args>`.
pub(crate) fn ip(args: &[&str]) -> Result<String, LabError> {
    run_checked(Command::new("ip").args(args))
}
