//! Building and tearing down a lab, and its state file.
//!
//! `up` creates one namespace per site, tunes its sysctls, starts the WAN
//! daemon detached (new session, log in the state dir), waits until its
//! control socket answers and records everything in `<state_dir>/lab.json`.
//! `down` needs none of that to work: it also finds the daemon by the config
//! path on its command line and the namespaces by name prefix, so it cleans
//! up after a crash, and running it twice is harmless.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::{self, ip, run_checked};
use crate::wan::{WanClient, WanConfig};
use crate::{
    LabError, LabSpec, LabState, SiteInfo, DEFAULT_PREFIX, TCP_BUFFER_MAX, UDP_BUFFER_MAX,
};

/// State file inside the state dir.
pub const STATE_FILE: &str = "lab.json";
/// WAN daemon config inside the state dir.
pub const WAN_CONFIG_FILE: &str = "wan.json";
/// WAN daemon log (its stdout and stderr) inside the state dir.
pub const WAN_LOG_FILE: &str = "wan.log";
/// WAN daemon control socket inside the state dir.
pub const WAN_SOCKET_FILE: &str = "wan.sock";
/// How long `up` waits for the daemon to create the devices and answer.
const DAEMON_READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `down` gives the daemon to exit after SIGTERM before SIGKILL.
const DAEMON_STOP_TIMEOUT: Duration = Duration::from_secs(3);
/// Poll interval while waiting for the daemon to start or stop.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Reads the state file of `state_dir`, if there is one.
pub fn load_state(state_dir: &Path) -> Result<Option<LabState>, LabError> {
    let path = state_dir.join(STATE_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LabError::io(format!("read {}", path.display()), e)),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| LabError::json(path.display().to_string(), e))
}

fn save_state(state: &LabState) -> Result<(), LabError> {
    let path = state.state_dir.join(STATE_FILE);
    let tmp = state.state_dir.join(format!("{STATE_FILE}.tmp"));
    let text = serde_json::to_string_pretty(state).map_err(|e| LabError::json("lab state", e))?;
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| LabError::io(format!("write {}", path.display()), e))
}

/// Builds the lab described by `spec`, recording it in `state_dir`.
///
/// `wan_daemon` is the command prefix that runs [`crate::wan::daemon_main`]
/// (`godwit lab wan-daemon`); `--config <file>` is appended. On failure
/// everything created so far is torn down again.
pub fn up(spec: &LabSpec, state_dir: &Path, wan_daemon: &Command) -> Result<LabState, LabError> {
    spec.validate()?;
    if state_dir.join(STATE_FILE).exists() {
        return Err(LabError::AlreadyUp(format!(
            "state file {} exists",
            state_dir.join(STATE_FILE).display()
        )));
    }
    let existing = netns::list_with_prefix(&spec.prefix);
    if !existing.is_empty() {
        return Err(LabError::AlreadyUp(format!(
            "namespaces {} exist",
            existing.join(", ")
        )));
    }
    std::fs::create_dir_all(state_dir)
        .map_err(|e| LabError::io(format!("create {}", state_dir.display()), e))?;
    let mut state = LabState {
        spec: spec.clone(),
        sites: (0..spec.sites)
            .map(|i| SiteInfo::new(&spec.prefix, i))
            .collect(),
        wan_pid: None,
        wan_socket: state_dir.join(WAN_SOCKET_FILE),
        state_dir: state_dir.to_path_buf(),
    };
    // Written first so that `down` finds the prefix even if `up` dies midway.
    save_state(&state)?;
    match build(&mut state, wan_daemon) {
        Ok(()) => {
            tracing::info!(sites = spec.sites, prefix = %spec.prefix, "lab is up");
            Ok(state)
        }
        Err(e) => {
            if let Err(cleanup) = down_prefix(state_dir, &spec.prefix) {
                tracing::warn!(cause = %cleanup, "cleanup after failed lab up");
            }
            Err(e)
        }
    }
}

fn build(state: &mut LabState, wan_daemon: &Command) -> Result<(), LabError> {
    // Child namespaces copy net.core.{r,w}mem_max from the root namespace at
    // creation and cannot change them, so raise them first (never lower).
    for key in ["rmem_max", "wmem_max"] {
        raise_root_sysctl(&format!("/proc/sys/net/core/{key}"), UDP_BUFFER_MAX)?;
    }
    let tcp_mem = format!("4096 131072 {TCP_BUFFER_MAX}");
    for site in &state.sites {
        ip(&["netns", "add", &site.netns])?;
        ip(&["-n", &site.netns, "link", "set", "lo", "up"])?;
        let mut sysctl = netns::command_in(&site.netns, "sysctl");
        sysctl.args([
            "-q",
            "-w",
            &format!("net.ipv4.tcp_rmem={tcp_mem}"),
            &format!("net.ipv4.tcp_wmem={tcp_mem}"),
            // The lab is IPv4-only: no router solicitations or MLD on wan0
            // showing up as no-route drops.
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
            // Sites route for their /24 (VMs behind a bridge, later work).
            "net.ipv4.ip_forward=1",
        ]);
        run_checked(&mut sysctl)?;
    }
    let config = WanConfig {
        socket: state.wan_socket.clone(),
        sites: state.sites.clone(),
        link: state.spec.link_params(),
        seed: None,
    };
    let config_path = state.state_dir.join(WAN_CONFIG_FILE);
    let text =
        serde_json::to_string_pretty(&config).map_err(|e| LabError::json("WAN config", e))?;
    std::fs::write(&config_path, text)
        .map_err(|e| LabError::io(format!("write {}", config_path.display()), e))?;
    let pid = spawn_daemon(
        wan_daemon,
        &config_path,
        &state.state_dir.join(WAN_LOG_FILE),
    )?;
    state.wan_pid = Some(pid);
    save_state(state)?;
    wait_ready(pid, &state.wan_socket, &state.state_dir.join(WAN_LOG_FILE))
}

fn raise_root_sysctl(path: &str, want: u64) -> Result<(), LabError> {
    let cur: u64 = std::fs::read_to_string(path)
        .map_err(|e| LabError::io(format!("read {path}"), e))?
        .trim()
        .parse()
        .unwrap_or(0);
    if cur < want {
        tracing::info!(path, from = cur, to = want, "raising root-namespace sysctl");
        std::fs::write(path, want.to_string())
            .map_err(|e| LabError::io(format!("write {path}"), e))?;
    }
    Ok(())
}

fn spawn_daemon(prefix: &Command, config: &Path, log: &Path) -> Result<u32, LabError> {
    let mut cmd = Command::new(prefix.get_program());
    cmd.args(prefix.get_args()).arg("--config").arg(config);
    for (k, v) in prefix.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    if let Some(dir) = prefix.get_current_dir() {
        cmd.current_dir(dir);
    }
    let log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| LabError::io(format!("open {}", log.display()), e))?;
    let log_err = log_file
        .try_clone()
        .map_err(|e| LabError::io("clone log fd", e))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(log_file))
        .stderr(Stdio::from(log_err));
    // SAFETY: setsid is async-signal-safe; it detaches the daemon from the
    // caller's session and terminal so it outlives the CLI.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| LabError::io(format!("start WAN daemon {:?}", prefix.get_program()), e))?;
    // The child is not waited for: the CLI exits right away and the daemon
    // is re-parented; `down` reaps it if it is still our child.
    Ok(child.id())
}

fn wait_ready(pid: u32, socket: &Path, log: &Path) -> Result<(), LabError> {
    let deadline = Instant::now() + DAEMON_READY_TIMEOUT;
    loop {
        if let Ok(mut c) = WanClient::connect(socket) {
            if c.ping().is_ok() {
                return Ok(());
            }
        }
        if !alive(pid) {
            return Err(LabError::Daemon(format!(
                "WAN daemon exited during start-up: {}",
                log_tail(log)
            )));
        }
        if Instant::now() > deadline {
            return Err(LabError::Timeout(format!(
                "no answer on {} after {DAEMON_READY_TIMEOUT:?}: {}",
                socket.display(),
                log_tail(log)
            )));
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

/// Whether `pid` is a live (non-zombie) process; reaps it if it is our child.
fn alive(pid: u32) -> bool {
    let Ok(p) = libc::pid_t::try_from(pid) else {
        return false;
    };
    let mut status = 0;
    // SAFETY: WNOHANG waitpid on a specific pid; fails harmlessly (ECHILD)
    // if it is not our child.
    if unsafe { libc::waitpid(p, &mut status, libc::WNOHANG) } == p {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Field 3, after the parenthesised command name, is the state.
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next()),
            Some("Z") | Some("X") | None
        ),
        Err(_) => false,
    }
}

fn kill(pid: u32, sig: libc::c_int) {
    if let Ok(p) = libc::pid_t::try_from(pid) {
        if p > 1 {
            // SAFETY: sending a signal has no memory-safety preconditions.
            unsafe { libc::kill(p, sig) };
        }
    }
}

/// Stops `pid`: SIGTERM, then SIGKILL after [`DAEMON_STOP_TIMEOUT`].
fn stop_process(pid: u32) {
    kill(pid, libc::SIGTERM);
    let deadline = Instant::now() + DAEMON_STOP_TIMEOUT;
    while alive(pid) {
        if Instant::now() > deadline {
            kill(pid, libc::SIGKILL);
            std::thread::sleep(POLL_INTERVAL);
            alive(pid);
            return;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// PIDs whose command line mentions `needle` (the daemon's config path).
fn pids_with_arg(needle: &str) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c.split(|&b| b == 0).any(|a| a == needle.as_bytes()))
                .unwrap_or(false)
        })
        .collect()
}

/// Tears down the lab recorded in `state_dir`; with no state file, the
/// namespaces named `godwit-*`. Idempotent.
pub fn down(state_dir: &Path) -> Result<(), LabError> {
    let prefix = load_state(state_dir)
        .ok()
        .flatten()
        .map_or_else(|| DEFAULT_PREFIX.to_owned(), |s| s.spec.prefix);
    down_prefix(state_dir, &prefix)
}

/// Like [`down`] with an explicit namespace prefix (for tests).
pub fn down_prefix(state_dir: &Path, prefix: &str) -> Result<(), LabError> {
    let state = load_state(state_dir).ok().flatten();
    let config_path = state_dir.join(WAN_CONFIG_FILE);
    let mut daemons = pids_with_arg(&config_path.to_string_lossy());
    if let Some(pid) = state.as_ref().and_then(|s| s.wan_pid) {
        // Reaps a zombie child of ours. A live process is only signalled
        // below if its command line still names our config: after a crash
        // the recorded pid may have been reused.
        alive(pid);
    }
    daemons.sort_unstable();
    daemons.dedup();
    for pid in daemons {
        tracing::debug!(pid, "stopping WAN daemon");
        stop_process(pid);
    }
    let mut first_err = None;
    for ns in netns::list_with_prefix(prefix) {
        if let Ok(out) = ip(&["netns", "pids", &ns]) {
            for pid in out.split_whitespace().filter_map(|p| p.parse::<u32>().ok()) {
                kill(pid, libc::SIGKILL);
                alive(pid);
            }
        }
        if let Err(e) = ip(&["netns", "del", &ns]) {
            tracing::warn!(netns = %ns, cause = %e, "could not delete namespace");
            first_err.get_or_insert(e);
        }
    }
    // Recursive only for a directory that is recognisably a lab state dir
    // (callers may keep per-site files in it); anything else loses just our
    // own files, so a mistyped `--state-dir /` cannot wipe a tree.
    let ours = [STATE_FILE, WAN_CONFIG_FILE, WAN_LOG_FILE, WAN_SOCKET_FILE];
    if ours.iter().any(|f| state_dir.join(f).exists()) && state_dir.parent().is_some() {
        let _ = std::fs::remove_dir_all(state_dir);
    } else {
        for f in ours {
            let _ = std::fs::remove_file(state_dir.join(f));
        }
        let _ = std::fs::remove_file(state_dir.join(format!("{STATE_FILE}.tmp")));
        let _ = std::fs::remove_dir(state_dir);
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The state dir to use when none is given.
pub fn default_state_dir() -> PathBuf {
    PathBuf::from(crate::DEFAULT_STATE_DIR)
}
