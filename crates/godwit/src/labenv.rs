//! The lab as the CLI sees it: one agent per lab site, started inside the
//! site's network namespace, trusting every other site's agent.
//!
//! Layout (all ephemeral, under the lab state directory):
//! `sites/<site>/agent.toml`, `agent.sock`, `agent.log`, `state/`, `run/`;
//! guest RAM in `/dev/shm/godwit/lab-<site>`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use godwit_agent::client::ApiClient;
use godwit_agent::config::{self, AgentConfig, PeerEntry};
use godwit_lab::{LabSpec, LabState};

/// Default lab state directory.
pub fn state_dir() -> PathBuf {
    godwit_lab::topology::default_state_dir()
}

/// Directory of a site's agent.
pub fn site_dir(site: &str) -> PathBuf {
    state_dir().join("sites").join(site)
}

/// API socket of a lab site's agent.
pub fn site_socket(site: &str) -> PathBuf {
    site_dir(site).join("agent.sock")
}

/// UDP port of lab agents.
pub const LAB_PEER_PORT: u16 = godwit_agent::config::DEFAULT_PEER_PORT;

/// Loads the running lab, or explains how to start one.
pub fn require_lab() -> Result<LabState> {
    godwit_lab::topology::load_state(&state_dir())?
        .context("no lab is up (start one with `godwit lab up`)")
}

/// Brings up the topology and one agent per site.
pub async fn up(spec: &LabSpec, accel: godwit_qemu::Accel) -> Result<LabState> {
    up_with(spec, accel, &LabNetwork::default()).await
}

/// How the lab's guest network differs from the agents' defaults.
#[derive(Debug, Clone, Default)]
pub struct LabNetwork {
    /// Sites that run no agent, only a Linux `vxlan` device.
    pub kernel_vxlan: Vec<String>,
    /// The distributed gateway every agent runs (`[network] gateway_ips`),
    /// with its router into the site's namespace.
    pub gateway: Vec<config::GatewayAddr>,
}

/// The name of the Linux `vxlan` device on a kernel-VXLAN site.
pub const KERNEL_VXLAN_DEV: &str = "vx0";

/// [`up`] with the guest network of `net`. The sites named in
/// `kernel_vxlan` run no agent: each gets a Linux `vxlan` device
/// ([`KERNEL_VXLAN_DEV`], the agents' network identifier, flooding to every
/// agent site, learning on), and every agent has it as a plain-VXLAN peer.
/// Addresses on the device are the caller's to add.
pub async fn up_with(
    spec: &LabSpec,
    accel: godwit_qemu::Accel,
    net: &LabNetwork,
) -> Result<LabState> {
    let kernel_vxlan = &net.kernel_vxlan[..];
    let exe = std::env::current_exe().context("locating the godwit binary")?;
    let mut daemon = std::process::Command::new(&exe);
    daemon.args(["lab", "wan-daemon"]);
    let st = godwit_lab::topology::up(spec, &state_dir(), &daemon)
        .context("building the lab topology")?;
    let started = async {
        for k in kernel_vxlan {
            if !st.sites.iter().any(|s| &s.name == k) {
                bail!("no lab site {k:?} for a kernel VXLAN device");
            }
        }
        kernel_vxlan_devices(&st, kernel_vxlan)?;
        start_agents(&st, &exe, accel, net).await
    };
    if let Err(e) = started.await {
        let _ = down();
        return Err(e);
    }
    Ok(st)
}

/// Creates the `vxlan` device of each kernel-VXLAN site.
fn kernel_vxlan_devices(st: &LabState, kernel: &[String]) -> Result<()> {
    let vni = godwit_agent::config::DEFAULT_VNI.to_string();
    let port = godwit_agent::config::VXLAN_PORT.to_string();
    for site in st.sites.iter().filter(|s| kernel.contains(&s.name)) {
        let ip = |args: &[&str]| -> Result<()> {
            let out = godwit_lab::netns::command_in(&site.netns, args[0])
                .args(&args[1..])
                .output()
                .with_context(|| format!("running {args:?} in site {}", site.name))?;
            if !out.status.success() {
                bail!(
                    "{args:?} in site {} failed: {}",
                    site.name,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(())
        };
        let local = site.addr.to_string();
        ip(&[
            "ip",
            "link",
            "add",
            KERNEL_VXLAN_DEV,
            "type",
            "vxlan",
            "id",
            &vni,
            "dstport",
            &port,
            "local",
            &local,
            "learning",
        ])?;
        // Broadcast and unknown unicast go to every agent site (head-end
        // replication); replies go where the kernel learnt the MAC.
        for other in st.sites.iter().filter(|s| !kernel.contains(&s.name)) {
            ip(&[
                "bridge",
                "fdb",
                "append",
                "00:00:00:00:00:00",
                "dev",
                KERNEL_VXLAN_DEV,
                "dst",
                &other.addr.to_string(),
            ])?;
        }
        // The lab's links carry 1500-byte packets; VXLAN adds 50 bytes.
        ip(&["ip", "link", "set", KERNEL_VXLAN_DEV, "mtu", "1450", "up"])?;
    }
    Ok(())
}

async fn start_agents(
    st: &LabState,
    exe: &Path,
    accel: godwit_qemu::Accel,
    net: &LabNetwork,
) -> Result<()> {
    let kernel_vxlan = &net.kernel_vxlan[..];
    let mut cfgs = Vec::new();
    let mut reports = Vec::new();
    let agent_sites: Vec<_> = st
        .sites
        .iter()
        .filter(|s| !kernel_vxlan.contains(&s.name))
        .collect();
    for site in &agent_sites {
        let dir = site_dir(&site.name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let cfg_path = dir.join("agent.toml");
        let rep = config::init(&config::InitOptions {
            name: site.name.clone(),
            site: site.name.clone(),
            state_dir: dir.join("state"),
            run_dir: dir.join("run"),
            api_socket: dir.join("agent.sock"),
            listen: (site.addr, LAB_PEER_PORT).into(),
            metrics_listen: "127.0.0.1:9480".parse().ok(),
            accel,
            config_path: cfg_path.clone(),
            force: true,
        })
        .with_context(|| format!("initialising the agent of site {}", site.name))?;
        reports.push(rep);
        cfgs.push(cfg_path);
    }
    for (i, site) in agent_sites.iter().enumerate() {
        let mut cfg = AgentConfig::load(&cfgs[i])?;
        cfg.network.vxlan_peers = st
            .sites
            .iter()
            .filter(|s| kernel_vxlan.contains(&s.name))
            .map(|s| config::VxlanPeer {
                name: s.name.clone(),
                address: (s.addr, godwit_agent::config::VXLAN_PORT).into(),
            })
            .collect();
        cfg.network.gateway_ips = net.gateway.clone();
        if !cfg.network.vxlan_peers.is_empty() {
            cfg.network.vxlan_listen = Some((site.addr, godwit_agent::config::VXLAN_PORT).into());
        }
        cfg.qemu.ram_dir = PathBuf::from(format!("/dev/shm/godwit/lab-{}", site.name));
        cfg.peers = reports
            .iter()
            .filter(|r| r.name != site.name)
            .map(|r| PeerEntry {
                name: r.name.clone(),
                site: r.site.clone(),
                addr: r.listen,
                fingerprint: r.fingerprint.clone(),
            })
            .collect();
        cfg.save(&cfgs[i])?;
        let _ = std::fs::remove_file(site_dir(&site.name).join("agent.log"));
        spawn_agent(site, exe, &[])?;
    }
    for site in &agent_sites {
        wait_agent(&site.name, Duration::from_secs(20)).await?;
    }
    Ok(())
}

/// Starts the agent of `site` from its `agent.toml` in the site's
/// namespace, appending to its `agent.log`, with the crash points
/// `failpoints` armed (see `godwit_agent::failpoint`).
fn spawn_agent(site: &godwit_lab::SiteInfo, exe: &Path, failpoints: &[String]) -> Result<()> {
    let dir = site_dir(&site.name);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("agent.log"))?;
    let mut cmd = godwit_lab::netns::command_in(&site.netns, exe);
    cmd.args(["agent", "--config"])
        .arg(dir.join("agent.toml"))
        .env(
            "RUST_LOG",
            std::env::var("GODWIT_LAB_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if failpoints.is_empty() {
        cmd.env_remove(godwit_agent::failpoint::ENV);
    } else {
        cmd.env(godwit_agent::failpoint::ENV, failpoints.join(","));
    }
    detach(&mut cmd);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting the agent of site {}", site.name))?;
    std::fs::write(dir.join("agent.pid"), child.id().to_string())?;
    Ok(())
}

/// Kills the agent of lab site `site` with `SIGKILL`, as a crash would
/// (its QEMUs keep running in their own sessions), and starts it again
/// with the same configuration and state, the crash points `failpoints`
/// armed. Returns once the new agent answers.
pub async fn restart_agent(site: &str, failpoints: &[String]) -> Result<()> {
    let st = require_lab()?;
    let info = st.site(site)?;
    let pid_path = site_dir(site).join("agent.pid");
    if !pid_path.exists() {
        bail!("lab site {site} runs no agent");
    }
    for p in failpoints {
        if !godwit_agent::failpoint::ALL.contains(&p.as_str()) {
            bail!(
                "unknown failpoint {p:?} (known: {})",
                godwit_agent::failpoint::ALL.join(", ")
            );
        }
    }
    let old: Option<i32> = std::fs::read_to_string(&pid_path)
        .ok()
        .and_then(|t| t.trim().parse().ok());
    if let Some(pid) = old.filter(|p| *p > 0) {
        // SAFETY: kill(2) on the pid this lab started the agent with.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let t0 = Instant::now();
        // SAFETY: signal 0 only checks whether the process still exists.
        while unsafe { libc::kill(pid, 0) } == 0 && !is_zombie(pid) {
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("the agent of site {site} (pid {pid}) did not die");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let exe = std::env::current_exe().context("locating the godwit binary")?;
    spawn_agent(info, &exe, failpoints)?;
    wait_agent(site, Duration::from_secs(20)).await
}

/// Whether `pid` is a zombie (dead, not yet reaped by its parent).
fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st == "Z"))
        })
        .unwrap_or(false)
}

/// Puts the child in its own session so it outlives this command.
fn detach(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe and touches no memory of the
    // parent; it runs in the forked child before exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
}

/// Waits until a site's agent answers.
pub async fn wait_agent(site: &str, timeout: Duration) -> Result<()> {
    let client = ApiClient::new(site_socket(site));
    let t0 = Instant::now();
    loop {
        match client.get::<serde_json::Value>("/v1/status").await {
            Ok(_) => return Ok(()),
            Err(e) if t0.elapsed() > timeout => {
                let log =
                    std::fs::read_to_string(site_dir(site).join("agent.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                bail!(
                    "the agent of site {site} did not start: {e}\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Tears the lab down: agents, QEMUs, namespaces, the WAN daemon, files.
pub fn down() -> Result<()> {
    // Processes inside the namespaces (agents, QEMUs) are killed by the
    // topology teardown; the files are ours.
    godwit_lab::topology::down(&state_dir()).context("tearing down the lab")?;
    if let Ok(entries) = std::fs::read_dir("/dev/shm/godwit") {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("lab-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(())
}

/// Lock file shared by everything that brings the lab up on this machine
/// (benchmarks, the integration tests).
pub const LAB_LOCK: &str = "/run/godwit/lab.lock";

/// Takes the machine's lab lock, waiting for another benchmark or test run
/// to finish with the lab; held until the returned file is dropped.
pub fn exclusive(out: crate::output::Out) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all("/run/godwit").context("creating /run/godwit")?;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LAB_LOCK)
        .with_context(|| format!("opening {LAB_LOCK}"))?;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        out.note(format!("waiting for the lab ({LAB_LOCK} is held)"));
        // SAFETY: as above.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error()).context("locking the lab");
        }
    }
    Ok(f)
}
