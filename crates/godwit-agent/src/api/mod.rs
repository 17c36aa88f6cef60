//! The agent's local API: JSON over HTTP on a unix socket.
//!
//! | method | path | body → answer |
//! |---|---|---|
//! | GET | /v1/status | → [`types::AgentStatus`] |
//! | GET | /v1/vms | → `[VmInfo]` |
//! | POST | /v1/vms | [`types::CreateVm`] → `VmInfo` |
//! | GET | /v1/vms/{name} | → `VmInfo` |
//! | DELETE | /v1/vms/{name} | stop the VM |
//! | GET | /v1/vms/{name}/console?bytes=N | → serial console tail (text) |
//! | POST | /v1/vms/{name}/guest | [`types::GuestRequest`] → the guest tool's report |
//! | GET | /v1/vms/{name}/guest/reports?since=N | → `{seq, reports}` |
//! | GET | /v1/migrations | → `[MigrationInfo]` |
//! | POST | /v1/migrations | [`types::StartMigration`] → `MigrationInfo` |
//! | GET | /v1/migrations/{id} | → `MigrationInfo` |
//! | POST | /v1/migrations/{id}/cancel | → `MigrationInfo` (the VM stays at the source) |
//! | GET | /v1/peers | → `[PeerStatus]` |
//! | POST | /v1/peers | [`types::AddPeer`] → `[PeerStatus]` |
//! | GET | /metrics | → Prometheus text |
//!
//! Errors answer with an HTTP status and a [`types::ApiErrorBody`].

pub mod server;
pub mod types;
