//! The godwit agent: the per-host daemon.
//!
//! One agent runs on every host. It launches and supervises the host's
//! QEMU processes, serves the local API that every other `godwit`
//! subcommand talks to (JSON over HTTP on a unix socket), keeps one
//! authenticated QUIC connection to each peer agent, and carries live
//! migrations between sites.
//!
//! # Layout
//! - [`config`]: the TOML configuration and `godwit agent init`.
//! - [`api`]: the local API: request/response types and the server.
//! - [`client`]: the API client used by the CLI and tests.
//! - [`vm`]: VMs on this host (launch, supervise, persist, re-adopt).
//! - [`guest`]: the channel to the in-guest measuring tool.
//! - [`peer`]: trusted peers and control calls to them.
//! - [`relay`]: pumps carrying QEMU's migration stream over a peer stream.
//! - [`rpgate`]: the destination's gate on QEMU's return path (who owns the VM).
//! - [`migration`]: the source and destination state machines.
//! - [`metrics`]: Prometheus counters.
//! - [`failpoint`]: crash points that recovery tests arm.
//! - [`network`]: the guest network: overlay switch, QUIC datagram
//!   transport and registry links to peers.
#![warn(missing_docs)]

pub mod api;
pub mod client;
pub mod config;
pub mod cpu;
pub mod evacuate;
pub mod failpoint;
pub mod guest;
pub mod memcodec;
pub mod metrics;
pub mod migration;
pub mod network;
pub mod pace;
pub mod peer;
pub mod relay;
pub mod rpgate;
pub mod site;
pub mod vm;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use godwit_transport::{IncomingStream, StreamPurpose, Transport, TransportConfig};
use godwit_wire::{
    ControlEnvelope, ControlRequest, ControlResponse, ErrorCode, Frame, VersionRange,
};
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn, Instrument};

pub use config::AgentConfig;

/// Errors starting or running the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Configuration problem.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The transport could not start.
    #[error("starting the peer transport")]
    Transport(#[from] godwit_transport::TransportError),
    /// The guest network could not start.
    #[error("starting the guest network")]
    Network(#[from] network::NetworkError),
    /// A local resource could not be set up.
    #[error("{what}")]
    Io {
        /// What was attempted.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Another agent already serves the API socket.
    #[error("another agent is already running on {0}")]
    AlreadyRunning(std::path::PathBuf),
}

/// Formats an error and its chain of causes on one line.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// The running agent, shared by all its tasks.
pub struct Agent {
    /// Configuration.
    pub cfg: AgentConfig,
    /// Path of the configuration file (rewritten by `peer add`).
    pub config_path: Option<std::path::PathBuf>,
    /// VMs on this host.
    pub vms: vm::VmManager,
    /// Peer agents.
    pub peers: peer::Peers,
    /// Migrations.
    pub migrations: migration::Migrations,
    /// Counters.
    pub metrics: metrics::Metrics,
    /// This host's certificate fingerprint.
    pub fingerprint: String,
    /// Migration sockets held after an undecided migration (see
    /// `migration::source`).
    pub held_sockets: Mutex<Vec<tokio::net::UnixStream>>,
    /// The site's page store, unless disabled or unusable.
    pub site: Option<Arc<site::Site>>,
    /// Maintenance mode and host evacuation.
    pub evacuations: evacuate::Evacuations,
    /// The guest network, unless `[network] enabled = false`.
    pub network: Option<Arc<network::Network>>,
}

impl Agent {
    /// Gauges for `/metrics` and status.
    pub async fn gauges(&self) -> metrics::Gauges {
        let mut by_state = std::collections::BTreeMap::<String, u64>::new();
        for h in self.vms.all() {
            let s = serde_json::to_value(h.state())
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            *by_state.entry(s).or_default() += 1;
        }
        let stats = self.peers.transport().stats();
        let peers = self
            .peers
            .entries()
            .into_iter()
            .map(|p| match stats.iter().find(|s| s.peer == p.name) {
                Some(s) => (
                    p.name,
                    true,
                    s.rtt.as_secs_f64(),
                    s.bytes_sent,
                    s.bytes_received,
                    s.lost_packets,
                ),
                None => (p.name, false, 0.0, 0, 0, 0),
            })
            .collect();
        metrics::Gauges {
            vms_by_state: by_state.into_iter().collect(),
            peers,
            store: self.site.as_ref().map(|s| s.lock().stats()),
            network: match &self.network {
                Some(n) => n.status().await.ok(),
                None => None,
            },
        }
    }
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(
    cfg: AgentConfig,
    config_path: Option<std::path::PathBuf>,
) -> Result<(), AgentError> {
    let io = |what: String| move |source| AgentError::Io { what, source };
    for d in [&cfg.state_dir, &cfg.run_dir, &cfg.qemu.ram_dir] {
        std::fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
    }
    if let Some(dir) = cfg.api_socket.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    // Refuse to start twice: a live agent answers on the socket.
    if tokio::net::UnixStream::connect(&cfg.api_socket)
        .await
        .is_ok()
    {
        return Err(AgentError::AlreadyRunning(cfg.api_socket.clone()));
    }
    let _ = std::fs::remove_file(&cfg.api_socket);

    let id_dir = cfg.identity_dir();
    let identity = godwit_transport::Identity::load(&id_dir).map_err(|source| {
        AgentError::Config(config::ConfigError::Identity {
            dir: id_dir.clone(),
            source,
        })
    })?;
    let fingerprint = identity.fingerprint().to_string();
    let peer_set = godwit_transport::PeerSet::new();
    for p in &cfg.peers {
        let fp = p.fingerprint.parse().map_err(|_| {
            config::ConfigError::Invalid(format!("peer {}: bad fingerprint", p.name))
        })?;
        peer_set
            .insert(&p.name, fp)
            .map_err(|e| config::ConfigError::Invalid(format!("peer {}: {e}", p.name)))?;
    }
    let mut tcfg = TransportConfig::new(cfg.listen, identity, peer_set);
    tcfg.max_bdp_bytes = cfg.transport.max_bdp_bytes;
    tcfg.idle_timeout = Duration::from_secs(cfg.transport.idle_timeout_s);
    tcfg.congestion = cfg.transport.congestion;
    let (transport, mut incoming) = Transport::bind(tcfg).await?;

    let host = godwit_qemu::HostConfig {
        qemu_binary: cfg.qemu.binary.clone(),
        accel: cfg.qemu.accel,
        run_dir: cfg.run_dir.join("vms"),
        ram_dir: cfg.qemu.ram_dir.clone(),
    };
    let vms = vm::VmManager::new(host, &cfg.state_dir);
    let arrived = vms.readopt().await;
    let migrations = migration::Migrations::default();
    for id in arrived {
        migrations.record_outcome(id, godwit_wire::IncomingOutcome::Running);
    }
    let site = if cfg.store.enabled {
        let dir = cfg
            .store
            .dir
            .clone()
            .unwrap_or_else(|| cfg.state_dir.join("store"));
        let max = cfg.store.max_bytes;
        match tokio::task::spawn_blocking(move || site::Site::open(&dir, max)).await {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => {
                // Migrations still work, only without the store's hits.
                warn!(cause = %error_chain(&e), "site store unusable; migrations run without it");
                None
            }
            Err(e) => {
                warn!(cause = %e, "opening the site store failed");
                None
            }
        }
    } else {
        None
    };
    let state_dir_for_evacuations = cfg.state_dir.clone();
    let peers = peer::Peers::new(cfg.name.clone(), transport.clone(), cfg.peers.clone());
    let network = if cfg.network.enabled {
        let net = network::Network::start(&cfg.name, &cfg.network, &peers).await?;
        // VMs still running from before a restart: their QEMU listens again
        // once the old switch's connection ended.
        for vm in vms.all() {
            if let Err(e) = net.attach(&vm, godwit_overlay::PortState::Open).await {
                warn!(vm = vm.spec.name, cause = %error_chain(&e), "cannot reattach the NIC");
            }
        }
        Some(net)
    } else {
        None
    };
    let agent = Arc::new(Agent {
        site,
        network,
        peers,
        cfg,
        config_path,
        vms,
        migrations,
        metrics: metrics::Metrics::default(),
        fingerprint,
        held_sockets: Mutex::new(Vec::new()),
        evacuations: evacuate::Evacuations::open(&state_dir_for_evacuations),
    });

    // Streams opened by peers.
    let a = agent.clone();
    tokio::spawn(async move {
        while let Some(s) = incoming.next().await {
            let a = a.clone();
            let span = tracing::debug_span!("peer_stream", peer = %s.peer, purpose = ?s.purpose);
            tokio::spawn(handle_stream(a, s).instrument(span));
        }
    });

    let listener = tokio::net::UnixListener::bind(&agent.cfg.api_socket).map_err(io(format!(
        "binding the API socket {}",
        agent.cfg.api_socket.display()
    )))?;
    let router = api::server::router(agent.clone());
    if let Some(addr) = agent.cfg.metrics_listen {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                let r = api::server::metrics_router(agent.clone());
                tokio::spawn(async move {
                    if let Err(e) = axum::serve(l, r).await {
                        warn!(cause = %e, "metrics server stopped");
                    }
                });
            }
            Err(e) => warn!(%addr, cause = %e, "cannot serve metrics"),
        }
    }
    info!(
        name = agent.cfg.name,
        site = agent.cfg.site,
        listen = %agent.cfg.listen,
        api = %agent.cfg.api_socket.display(),
        fingerprint = agent.fingerprint,
        "agent started"
    );
    evacuate::resume_interrupted(&agent);
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        info!("agent stopping; VMs keep running");
    };
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(io("serving the API".into()))?;
    let _ = std::fs::remove_file(&agent.cfg.api_socket);
    agent.peers.transport().shutdown().await;
    Ok(())
}

async fn handle_stream(agent: Arc<Agent>, s: IncomingStream) {
    let IncomingStream {
        peer,
        purpose,
        mut send,
        mut recv,
    } = s;
    match purpose {
        StreamPurpose::Control => {
            let resp = match relay::read_first_frame(&mut recv).await {
                Ok(f) => match f.json::<ControlEnvelope>() {
                    Ok(env) => match VersionRange::ours().negotiate(env.versions) {
                        Ok(_) => handle_control(&agent, &peer, env.request).await,
                        Err(e) => ControlResponse::Error {
                            code: ErrorCode::Version,
                            message: e.to_string(),
                        },
                    },
                    Err(e) => ControlResponse::Error {
                        code: ErrorCode::BadRequest,
                        message: e.to_string(),
                    },
                },
                Err(e) => {
                    debug!(cause = %e, "control stream without a request");
                    return;
                }
            };
            if relay::write_frame(&mut send, &Frame::control(&resp))
                .await
                .is_ok()
            {
                let _ = send.shutdown().await;
            }
        }
        StreamPurpose::Memory => {
            migration::destination::accept_memory_stream(agent, peer, send, recv).await
        }
        StreamPurpose::NetworkFrames if agent.network.is_some() => {
            if let Some(n) = &agent.network {
                n.run_link(&peer, send, recv).await;
            }
        }
        other => {
            debug!(?other, "no handler for this stream purpose yet");
            let _ = send.reset(quinn::VarInt::from_u32(
                godwit_transport::purpose::STREAM_ERROR_UNKNOWN_PURPOSE,
            ));
        }
    }
}

async fn handle_control(agent: &Arc<Agent>, peer: &str, req: ControlRequest) -> ControlResponse {
    debug!(?req, "control request");
    match req {
        ControlRequest::Hello => ControlResponse::Hello {
            version: godwit_wire::PROTOCOL_VERSION,
            agent: agent.cfg.name.clone(),
            site: agent.cfg.site.clone(),
        },
        ControlRequest::PrepareIncoming {
            migration_id,
            vm,
            direct,
        } => migration::destination::prepare(agent, peer, migration_id, vm, direct).await,
        ControlRequest::QueryOutcome { migration_id } => {
            migration::destination::query(agent, &migration_id)
        }
        ControlRequest::AbortIncoming {
            migration_id,
            reason,
        } => migration::destination::abort(agent, &migration_id, reason).await,
        ControlRequest::Commit { migration_id } => {
            migration::destination::commit(agent, &migration_id)
        }
    }
}
