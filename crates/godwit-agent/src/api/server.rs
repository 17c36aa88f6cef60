//! HTTP handlers of the local API (see the table in [`crate::api`]).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use godwit_qemu::{DiskSpec, LaunchMode, NetdevSpec, NicSpec, VmSpec};
use serde::Deserialize;
use serde_json::{json, Value};

use super::types::*;
use crate::migration::MigrationError;
use crate::vm::VmError;
use crate::Agent;

/// An API error: status plus a machine-readable code.
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ApiErrorBody {
                code: self.code.into(),
                message: self.message,
            }),
        )
            .into_response()
    }
}

impl From<VmError> for ApiError {
    fn from(e: VmError) -> Self {
        let (status, code) = match &e {
            VmError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            VmError::Exists(_) => (StatusCode::CONFLICT, "conflict"),
            VmError::Busy { .. } => (StatusCode::CONFLICT, "busy"),
            VmError::Qemu {
                source: godwit_qemu::QemuError::InvalidSpec(_),
                ..
            } => (StatusCode::BAD_REQUEST, "bad_request"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError::new(status, code, crate::error_chain(&e))
    }
}

impl From<MigrationError> for ApiError {
    fn from(e: MigrationError) -> Self {
        match e {
            MigrationError::Vm(v) => v.into(),
            MigrationError::Peer(p @ crate::peer::PeerError::Unknown(_)) => ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_peer",
                crate::error_chain(&p),
            ),
            other => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "migration",
                crate::error_chain(&other),
            ),
        }
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// The API router.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/network", get(network_status))
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/{name}", get(show_vm).delete(stop_vm))
        .route("/v1/vms/{name}/console", get(console))
        .route("/v1/vms/{name}/guest", post(guest_command))
        .route("/v1/vms/{name}/guest/reports", get(guest_reports))
        .route("/v1/migrations", get(list_migrations).post(start_migration))
        .route("/v1/migrations/{id}", get(show_migration))
        .route("/v1/migrations/{id}/cancel", post(cancel_migration))
        .route("/v1/peers", get(list_peers).post(add_peer))
        .route("/v1/maintenance", post(set_maintenance))
        .route(
            "/v1/evacuation",
            get(show_evacuation).post(start_evacuation),
        )
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state(
            agent.clone(),
            count_requests,
        ))
        .with_state(agent)
}

/// The router of the TCP metrics listener (nothing but `/metrics`).
pub fn metrics_router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(agent)
}

async fn count_requests(
    State(a): State<Arc<Agent>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    a.metrics.api_requests.inc();
    next.run(req).await
}

async fn metrics(State(a): State<Arc<Agent>>) -> impl IntoResponse {
    let body = a.metrics.render(&a.cfg.name, &a.gauges().await);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        body,
    )
}

async fn peer_statuses(a: &Agent) -> Vec<PeerStatus> {
    let stats = a.peers.transport().stats();
    a.peers
        .entries()
        .into_iter()
        .map(|p| {
            let s = stats.iter().find(|s| s.peer == p.name);
            PeerStatus {
                name: p.name,
                site: p.site,
                addr: p.addr.to_string(),
                connected: s.is_some(),
                rtt_ms: s.map(|s| s.rtt.as_secs_f64() * 1000.0),
                tx_bytes: s.map(|s| s.bytes_sent),
                rx_bytes: s.map(|s| s.bytes_received),
            }
        })
        .collect()
}

async fn status(State(a): State<Arc<Agent>>) -> ApiResult<AgentStatus> {
    let mut vms = Vec::new();
    for h in a.vms.all() {
        vms.push(a.vms.info(&h).await);
    }
    Ok(Json(AgentStatus {
        name: a.cfg.name.clone(),
        site: a.cfg.site.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        fingerprint: a.fingerprint.clone(),
        listen: a.cfg.listen.to_string(),
        accel: format!("{:?}", a.cfg.qemu.accel).to_lowercase(),
        peers: peer_statuses(&a).await,
        vms,
        migrations: a
            .migrations
            .all_outgoing()
            .iter()
            .map(|j| j.info())
            .collect(),
        maintenance: a.evacuations.maintenance(),
        evacuation: a.evacuations.info(&a.cfg.name),
        network: match &a.network {
            Some(n) => n
                .status()
                .await
                .ok()
                .and_then(|s| serde_json::to_value(s).ok()),
            None => None,
        },
    }))
}

async fn set_maintenance(
    State(a): State<Arc<Agent>>,
    Json(req): Json<SetMaintenance>,
) -> ApiResult<Value> {
    a.evacuations.set_maintenance(req.on).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            crate::error_chain(&e),
        )
    })?;
    Ok(Json(json!({"host": a.cfg.name, "maintenance": req.on})))
}

async fn show_evacuation(
    State(a): State<Arc<Agent>>,
) -> ApiResult<crate::evacuate::EvacuationInfo> {
    a.evacuations.info(&a.cfg.name).map(Json).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no evacuation on this host",
        )
    })
}

async fn start_evacuation(
    State(a): State<Arc<Agent>>,
    Json(req): Json<crate::evacuate::StartEvacuation>,
) -> ApiResult<crate::evacuate::EvacuationInfo> {
    use crate::evacuate::EvacuationError as E;
    crate::evacuate::start(&a, req).map(Json).map_err(|e| {
        let (status, code) = match &e {
            E::Running => (StatusCode::CONFLICT, "busy"),
            E::NothingToResume => (StatusCode::NOT_FOUND, "not_found"),
            E::Invalid(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            E::Persist { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError::new(status, code, crate::error_chain(&e))
    })
}

async fn network_status(State(a): State<Arc<Agent>>) -> ApiResult<Value> {
    let Some(net) = &a.network else {
        return Ok(Json(json!({"enabled": false})));
    };
    let st = net.status().await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "network",
            crate::error_chain(&e),
        )
    })?;
    let mut v = serde_json::to_value(st).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("enabled".into(), Value::Bool(true));
    }
    Ok(Json(v))
}

async fn list_vms(State(a): State<Arc<Agent>>) -> ApiResult<Vec<VmInfo>> {
    let mut out = Vec::new();
    for h in a.vms.all() {
        out.push(a.vms.info(&h).await);
    }
    Ok(Json(out))
}

async fn create_vm(State(a): State<Arc<Agent>>, Json(req): Json<CreateVm>) -> ApiResult<VmInfo> {
    if a.evacuations.maintenance() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "maintenance",
            format!("host {} is in maintenance: it takes no new VM", a.cfg.name),
        ));
    }
    let machine = a.vms.resolve_machine(&req.machine).await?;
    let disk = req.disk.map(|path| {
        let format = if path.extension().is_some_and(|e| e == "qcow2") {
            "qcow2"
        } else {
            "raw"
        };
        DiskSpec {
            path,
            format: format.into(),
            readonly: false,
        }
    });
    let spec = VmSpec {
        name: req.name,
        memory_mib: req.memory_mib,
        vcpus: req.vcpus,
        machine,
        cpu: None,
        kernel: req.kernel,
        initrd: req.initrd,
        cmdline: req.cmdline,
        disk,
        nic: match req.mac {
            Some(mac) => {
                crate::network::parse_mac(&mac).map_err(|e| {
                    ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string())
                })?;
                // On the agent's switch when it runs one; otherwise a NIC
                // with no link.
                let netdev = if a.network.is_some() {
                    NetdevSpec::Stream
                } else {
                    NetdevSpec::None
                };
                Some(NicSpec { mac, netdev })
            }
            None => None,
        },
        uuid: None,
    };
    spec.validate()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))?;
    let h = a.vms.launch(spec, LaunchMode::Fresh, None).await?;
    if let Some(net) = &a.network {
        if let Err(e) = net.attach(&h, godwit_overlay::PortState::Open).await {
            // A VM that cannot reach its network is not what was asked for.
            a.vms.remove(&h).await;
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "network",
                crate::error_chain(&e),
            ));
        }
    }
    Ok(Json(a.vms.info(&h).await))
}

async fn show_vm(State(a): State<Arc<Agent>>, Path(name): Path<String>) -> ApiResult<VmInfo> {
    let h = a.vms.get(&name)?;
    Ok(Json(a.vms.info(&h).await))
}

async fn stop_vm(State(a): State<Arc<Agent>>, Path(name): Path<String>) -> ApiResult<Value> {
    a.vms.stop(&name).await?;
    if let Some(net) = &a.network {
        net.remove_vm_port(&name).await;
    }
    Ok(Json(json!({"stopped": name})))
}

#[derive(Deserialize)]
struct ConsoleQuery {
    bytes: Option<u64>,
}

async fn console(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
    Query(q): Query<ConsoleQuery>,
) -> Result<String, ApiError> {
    let h = a.vms.get(&name)?;
    let want = q.bytes.unwrap_or(16 << 10);
    let data = std::fs::read(&h.instance.serial_log).unwrap_or_default();
    let start = data.len().saturating_sub(want as usize);
    Ok(String::from_utf8_lossy(&data[start..]).into_owned())
}

async fn guest_command(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
    Json(req): Json<GuestRequest>,
) -> ApiResult<Value> {
    let h = a.vms.get(&name)?;
    let timeout = Duration::from_millis(req.timeout_ms.min(3_600_000));
    // Wait for the guest tool if the VM has just booted or arrived.
    h.guest
        .wait_ready(timeout)
        .await
        .map_err(|e| ApiError::new(StatusCode::GATEWAY_TIMEOUT, "guest", e.to_string()))?;
    let v = h.guest.request(req.command, timeout).await.map_err(|e| {
        let status = match e {
            crate::guest::GuestError::BadCommand => StatusCode::BAD_REQUEST,
            crate::guest::GuestError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        };
        ApiError::new(status, "guest", e.to_string())
    })?;
    Ok(Json(v))
}

#[derive(Deserialize)]
struct SinceQuery {
    since: Option<u64>,
}

async fn guest_reports(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
    Query(q): Query<SinceQuery>,
) -> ApiResult<Value> {
    let h = a.vms.get(&name)?;
    let (seq, reports) = h.guest.reports_since(q.since.unwrap_or(0));
    Ok(Json(json!({"seq": seq, "reports": reports})))
}

async fn list_migrations(State(a): State<Arc<Agent>>) -> ApiResult<Vec<MigrationInfo>> {
    Ok(Json(
        a.migrations
            .all_outgoing()
            .iter()
            .map(|j| j.info())
            .collect(),
    ))
}

async fn start_migration(
    State(a): State<Arc<Agent>>,
    Json(req): Json<StartMigration>,
) -> ApiResult<MigrationInfo> {
    let job = crate::migration::source::start(&a, req).await?;
    Ok(Json(job.info()))
}

fn outgoing_job(a: &Agent, id: &str) -> Result<Arc<crate::migration::MigrationJob>, ApiError> {
    a.migrations.outgoing(id).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no migration {id} on this agent"),
        )
    })
}

async fn show_migration(
    State(a): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> ApiResult<MigrationInfo> {
    let job = outgoing_job(&a, &id)?;
    Ok(Json(job.info()))
}

async fn cancel_migration(
    State(a): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> ApiResult<MigrationInfo> {
    let job = outgoing_job(&a, &id)?;
    if job.phase().is_terminal() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "finished",
            format!("migration {id} has already ended"),
        ));
    }
    // Before the guest pauses this aborts cleanly; after, the agents still
    // settle who owns the VM (the destination decides), so nothing is lost.
    // send_replace stores the reason even before the relay subscribes
    // (while preparing, or in direct mode where nothing subscribes).
    job.cancel
        .send_replace(Some("cancelled by the operator".into()));
    Ok(Json(job.info()))
}

async fn list_peers(State(a): State<Arc<Agent>>) -> ApiResult<Vec<PeerStatus>> {
    Ok(Json(peer_statuses(&a).await))
}

async fn add_peer(
    State(a): State<Arc<Agent>>,
    Json(req): Json<AddPeer>,
) -> ApiResult<Vec<PeerStatus>> {
    a.peers
        .upsert(req.peer.clone())
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e))?;
    // Persist so the peer is still trusted after a restart.
    if let Some(path) = &a.config_path {
        let mut cfg = a.cfg.clone();
        cfg.peers = a.peers.entries();
        cfg.save(path).map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                crate::error_chain(&e),
            )
        })?;
    }
    Ok(Json(peer_statuses(&a).await))
}
