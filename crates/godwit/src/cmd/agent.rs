//! `godwit agent`, `godwit agent init`, `godwit status`, `godwit peer`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use godwit_agent::api::types::{AddPeer, AgentStatus, PeerStatus};
use godwit_agent::config::{self, AgentConfig, PeerEntry};
use serde_json::Value;

use crate::output::Out;
use crate::Global;

/// `godwit agent [init]`.
#[derive(Args, Debug)]
pub struct AgentCmd {
    /// Configuration file.
    #[arg(long, env = "GODWIT_CONFIG", default_value = config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    pub sub: Option<AgentSub>,
}

/// Agent subcommands.
#[derive(Subcommand, Debug)]
pub enum AgentSub {
    /// Create this host's identity (key + certificate) and configuration.
    Init(InitArgs),
}

/// `godwit agent init`.
#[derive(Args, Debug)]
pub struct InitArgs {
    /// Agent name (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Site this host belongs to (default: the agent name).
    #[arg(long)]
    site: Option<String>,
    /// QUIC address peers connect to.
    #[arg(long, default_value = "0.0.0.0:7480")]
    listen: SocketAddr,
    /// Prometheus metrics address.
    #[arg(long, default_value = config::DEFAULT_METRICS_ADDR)]
    metrics: SocketAddr,
    /// State directory (identity, VM records).
    #[arg(long, default_value = "/var/lib/godwit")]
    state_dir: PathBuf,
    /// Runtime directory (sockets, logs).
    #[arg(long, default_value = "/run/godwit")]
    run_dir: PathBuf,
    /// Accelerator: kvm on real hosts, tcg where KVM cannot run guests.
    #[arg(long, default_value = "kvm", value_parser = parse_accel)]
    accel: godwit_qemu::Accel,
    /// Overwrite an existing configuration and identity.
    #[arg(long)]
    force: bool,
}

/// Parses `tcg` / `kvm`.
pub fn parse_accel(s: &str) -> Result<godwit_qemu::Accel, String> {
    match s {
        "tcg" => Ok(godwit_qemu::Accel::Tcg),
        "kvm" => Ok(godwit_qemu::Accel::Kvm),
        other => Err(format!("accelerator must be tcg or kvm, not {other:?}")),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "godwit".into())
}

/// Runs `godwit agent [init]`.
pub async fn run(a: AgentCmd, _g: &Global, out: Out) -> Result<()> {
    match a.sub {
        Some(AgentSub::Init(i)) => {
            let name = i.name.unwrap_or_else(hostname);
            let rep = config::init(&config::InitOptions {
                site: i.site.unwrap_or_else(|| name.clone()),
                name,
                state_dir: i.state_dir,
                run_dir: i.run_dir.clone(),
                api_socket: PathBuf::from(config::DEFAULT_API_SOCKET),
                listen: i.listen,
                metrics_listen: Some(i.metrics),
                accel: i.accel,
                config_path: a.config.clone(),
                force: i.force,
            })?;
            out.result("agent_init", &rep, || {
                format!(
                    "wrote {}\nagent {} (site {}) listens on {}\nfingerprint {}\nOn each peer: godwit peer add {} --peer-site {} --addr <this host>:{} --fingerprint {}",
                    rep.config.display(),
                    rep.name,
                    rep.site,
                    rep.listen,
                    rep.fingerprint,
                    rep.name,
                    rep.site,
                    rep.listen.port(),
                    rep.fingerprint
                )
            });
            Ok(())
        }
        None => {
            let cfg = AgentConfig::load(&a.config).with_context(|| {
                format!(
                    "loading {} (create it with `godwit agent init`)",
                    a.config.display()
                )
            })?;
            godwit_agent::run(cfg, Some(a.config)).await?;
            Ok(())
        }
    }
}

/// `godwit status`.
pub async fn status(g: &Global, out: Out) -> Result<()> {
    let st: AgentStatus = g.client().get("/v1/status").await?;
    out.result("status", &st, || {
        let mut s = format!(
            "agent {} (site {}) godwit {}  accel {}  listen {}\nfingerprint {}\n",
            st.name, st.site, st.version, st.accel, st.listen, st.fingerprint
        );
        if st.maintenance {
            s.push_str("MAINTENANCE: this host takes no new VM\n");
        }
        if let Some(e) = &st.evacuation {
            s.push_str(&format!(
                "evacuation: {} of {} VMs moved, {} failed, {}{}\n",
                e.completed,
                e.vms.len(),
                e.failed,
                crate::output::ms(e.elapsed_ms),
                if e.finished { "" } else { " (running)" }
            ));
        }
        s.push_str(&peer_table(&st.peers));
        if let Some(n) = &st.network {
            s.push_str(&network_lines(n));
        }
        s.push_str(&format!("VMs: {}\n", st.vms.len()));
        for v in &st.vms {
            s.push_str(&format!(
                "  {:<16} {:<14} {:>6} MiB  qemu {}\n",
                v.name,
                format!("{:?}", v.state).to_lowercase(),
                v.memory_mib,
                v.qemu_status.as_deref().unwrap_or("?")
            ));
        }
        if !st.migrations.is_empty() {
            s.push_str("Migrations:\n");
            for m in &st.migrations {
                s.push_str(&format!("  {} {} -> {}  {:?}\n", m.id, m.vm, m.to, m.phase));
            }
        }
        s.trim_end().to_owned()
    });
    Ok(())
}

/// The guest network in `godwit status`: where each guest MAC is, with its
/// mobility sequence number and moves, and this host's ports.
fn network_lines(n: &Value) -> String {
    let sw = &n["overlay"]["switch"];
    let reg = &sw["registry"];
    let mut s = format!(
        "Network vni {}: {} locations, {} moves, {} claims; linked to {}\n",
        n["vni"],
        reg["entries"],
        reg["moves"],
        reg["claims"],
        n["linked_peers"]
            .as_array()
            .map(|a| a
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", "))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "no peer".into()),
    );
    for e in sw["locations"].as_array().into_iter().flatten() {
        let ips: Vec<&str> = e["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        s.push_str(&format!(
            "  {} at {:<10} seq {:<4} moves {:<4}{} {}\n",
            e["mac"].as_str().unwrap_or("?"),
            e["host"].as_str().unwrap_or("?"),
            e["seq"],
            e["total_moves"],
            if e["frozen"] == Value::Bool(true) {
                " FROZEN"
            } else {
                ""
            },
            ips.join(" ")
        ));
    }
    for p in sw["ports"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "  port {:<3} {} {}\n",
            p["port"],
            p["mac"].as_str().unwrap_or("?"),
            p["state"].as_str().unwrap_or("?"),
        ));
    }
    let r = &n["router"];
    if let Some(dev) = r["device"].as_str() {
        s.push_str(&format!(
            "  gateway router {dev}: {} frames to the host, {} from it\n",
            r["to_host"], r["from_host"]
        ));
    }
    s
}

fn peer_table(peers: &[PeerStatus]) -> String {
    let mut s = format!("Peers: {}\n", peers.len());
    for p in peers {
        s.push_str(&format!(
            "  {:<12} site {:<8} {:<22} {}  rtt {}\n",
            p.name,
            p.site,
            p.addr,
            if p.connected {
                "connected"
            } else {
                "idle     "
            },
            p.rtt_ms
                .map(|r| format!("{r:.1} ms"))
                .unwrap_or_else(|| "-".into())
        ));
    }
    s
}

/// `godwit peer …`.
#[derive(Subcommand, Debug)]
pub enum PeerCmd {
    /// Trust another agent (pins its certificate fingerprint).
    Add {
        /// Peer agent name.
        name: String,
        /// Its site (default: its name). Not `--site`, which picks a lab
        /// agent for every command.
        #[arg(long = "peer-site")]
        site: Option<String>,
        /// Its QUIC address.
        #[arg(long)]
        addr: SocketAddr,
        /// Its certificate fingerprint (from its `godwit agent init`).
        #[arg(long)]
        fingerprint: String,
    },
    /// List trusted peers.
    List,
}

/// Runs a peer subcommand.
pub async fn peer(c: PeerCmd, g: &Global, out: Out) -> Result<()> {
    let client = g.client();
    let peers: Vec<PeerStatus> = match c {
        PeerCmd::Add {
            name,
            site,
            addr,
            fingerprint,
        } => {
            let peer = PeerEntry {
                site: site.unwrap_or_else(|| name.clone()),
                name,
                addr,
                fingerprint,
            };
            client.post("/v1/peers", &AddPeer { peer }).await?
        }
        PeerCmd::List => client.get("/v1/peers").await?,
    };
    out.result("peers", &peers, || peer_table(&peers).trim_end().to_owned());
    Ok(())
}
