//! Control messages exchanged between agents, and the protocol version range.
//!
//! Every control exchange is one request and one response on a fresh QUIC
//! stream of purpose `Control`; streams are cheap, and this avoids
//! multiplexing request ids over a long-lived stream. Each request carries
//! the sender's [`VersionRange`]; the receiver answers with
//! [`ControlResponse::Error`] if the ranges do not overlap.
//!
//! VM specifications travel as opaque JSON (`serde_json::Value`): this crate
//! stays independent of the hypervisor crate, and the receiving agent parses
//! the value into its typed spec at the boundary.

use serde::{Deserialize, Serialize};

use crate::WireError;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// Oldest protocol version this build still accepts. Cloud Hypervisor's
/// policy: accept N and N-1, so agents can be upgraded one host at a time.
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// A closed range of protocol versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRange {
    /// Lowest accepted version.
    pub min: u16,
    /// Highest spoken version.
    pub max: u16,
}

impl VersionRange {
    /// The range this build supports.
    pub const fn ours() -> Self {
        Self {
            min: MIN_PROTOCOL_VERSION,
            max: PROTOCOL_VERSION,
        }
    }

    /// Highest version both ranges contain.
    pub fn negotiate(self, peer: VersionRange) -> Result<u16, WireError> {
        let hi = self.max.min(peer.max);
        let lo = self.min.max(peer.min);
        if hi >= lo && peer.min <= peer.max {
            Ok(hi)
        } else {
            Err(WireError::Version {
                min: peer.min,
                max: peer.max,
            })
        }
    }
}

/// A request from one agent to another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlEnvelope {
    /// Versions the sender speaks.
    pub versions: VersionRange,
    /// Sending agent's name (informational: the authenticated identity comes
    /// from the TLS handshake, not from this field).
    pub from: String,
    /// The request itself.
    pub request: ControlRequest,
}

/// Requests an agent can make of a peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlRequest {
    /// Liveness and identity check.
    Hello,
    /// Prepare to receive a VM: launch QEMU with `-incoming` and be ready to
    /// accept the memory stream for `migration_id`.
    PrepareIncoming {
        /// Migration identifier chosen by the source.
        migration_id: String,
        /// The VM's specification (the destination's typed `VmSpec`).
        vm: serde_json::Value,
        /// Baseline mode: the destination QEMU listens on plain TCP and the
        /// source QEMU connects to it directly, bypassing the agents (used
        /// to compare against QEMU's own transport; unencrypted).
        #[serde(default)]
        direct: bool,
    },
    /// Ask what became of an incoming migration (used after a link cut to
    /// decide who runs the VM).
    QueryOutcome {
        /// Migration identifier.
        migration_id: String,
    },
    /// The source gives up; tear the incoming side down unless it already
    /// runs the VM (the answer says which).
    AbortIncoming {
        /// Migration identifier.
        migration_id: String,
        /// Why.
        reason: String,
    },
    /// The source has retired its copy: the destination now owns the VM.
    Commit {
        /// Migration identifier.
        migration_id: String,
    },
}

/// State of an incoming migration at the destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum IncomingOutcome {
    /// The destination has never heard of it, or forgot it.
    Unknown,
    /// QEMU is up and waiting for, or loading, the stream.
    Loading,
    /// The destination QEMU loaded the whole state and the VM runs there.
    Running,
    /// The incoming side failed or was aborted; nothing runs there.
    Failed {
        /// Why.
        reason: String,
    },
}

/// Machine-readable error classes in [`ControlResponse::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Version ranges do not overlap.
    Version,
    /// The request was malformed.
    BadRequest,
    /// A VM of that name already exists here.
    Conflict,
    /// The host is in maintenance or out of capacity.
    Refused,
    /// Something failed while handling the request.
    Internal,
    /// The named migration or VM is unknown.
    NotFound,
}

/// Responses to [`ControlRequest`]s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlResponse {
    /// Answer to `Hello`.
    Hello {
        /// The responder's highest protocol version.
        version: u16,
        /// Responder's agent name.
        agent: String,
        /// Responder's site.
        site: String,
    },
    /// The destination QEMU waits for the stream.
    Prepared {
        /// Migration identifier.
        migration_id: String,
        /// In direct mode, the URI the source QEMU must migrate to.
        #[serde(default)]
        direct_uri: Option<String>,
    },
    /// Answer to `QueryOutcome` and `AbortIncoming`.
    Outcome {
        /// Migration identifier.
        migration_id: String,
        /// What happened.
        outcome: IncomingOutcome,
    },
    /// Acknowledgement without data.
    Ok,
    /// The destination accepts a memory stream, in this codec (see
    /// [`MemoryOpen::codec`]). A destination that answers plain `Ok` relays
    /// raw bytes only.
    MemoryAccepted {
        /// The codec chosen: [`CODEC_RAW`] or [`CODEC_PAGES_V1`].
        codec: u8,
        /// `Codec` frames (summaries of what the destination holds) that
        /// follow this answer before anything else; the source reads them
        /// before QEMU starts, so no page misses a hit by arriving early.
        #[serde(default)]
        summaries: u32,
    },
    /// Answer to `Commit`: the destination's own figures for the report.
    Committed {
        /// CPU seconds the destination spent receiving (its agent plus
        /// QEMU's non-vCPU threads), when it measured them.
        #[serde(default)]
        receiver_cpu_s: Option<f64>,
        /// When the destination QEMU resumed the guest (its `RESUME`
        /// event), µs since the epoch by the destination host's clock.
        #[serde(default)]
        resumed_at_us: Option<i64>,
    },
    /// The request failed.
    Error {
        /// Error class.
        code: ErrorCode,
        /// Human-readable explanation.
        message: String,
    },
}

/// Header of a memory (migration stream) relay stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryOpen {
    /// Versions the sender speaks.
    pub versions: VersionRange,
    /// Migration identifier, as in `PrepareIncoming`.
    pub migration_id: String,
    /// The best memory codec the source offers ([`CODEC_RAW`] when absent).
    #[serde(default)]
    pub codec: u8,
}

/// Memory codec: QEMU's stream relayed byte for byte in `Data` frames.
pub const CODEC_RAW: u8 = 0;
/// Memory codec: the page-aware codec of `godwit-migstream` in `Codec`
/// frames (version 1).
pub const CODEC_PAGES_V1: u8 = 1;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Frame;

    #[test]
    fn version_negotiation() {
        let ours = VersionRange { min: 1, max: 2 };
        assert_eq!(ours.negotiate(VersionRange { min: 1, max: 1 }), Ok(1));
        assert_eq!(ours.negotiate(VersionRange { min: 2, max: 5 }), Ok(2));
        assert!(ours.negotiate(VersionRange { min: 3, max: 4 }).is_err());
        assert!(ours.negotiate(VersionRange { min: 2, max: 1 }).is_err());
    }

    #[test]
    fn control_messages_roundtrip_through_frames() {
        let req = ControlEnvelope {
            versions: VersionRange::ours(),
            from: "a".into(),
            request: ControlRequest::PrepareIncoming {
                migration_id: "m1".into(),
                vm: serde_json::json!({"name": "vm1", "memory_mib": 256}),
                direct: false,
            },
        };
        let f = Frame::control(&req);
        let back: ControlEnvelope = f.json().unwrap();
        assert_eq!(back, req);
        let resp = ControlResponse::Outcome {
            migration_id: "m1".into(),
            outcome: IncomingOutcome::Failed {
                reason: "cut".into(),
            },
        };
        let back: ControlResponse = Frame::control(&resp).json().unwrap();
        assert_eq!(back, resp);
    }

    #[test]
    fn unknown_request_type_is_an_error() {
        let f = Frame::Control(bytes::Bytes::from_static(
            br#"{"versions":{"min":1,"max":1},"from":"x","request":{"type":"format_disk"}}"#,
        ));
        assert!(matches!(
            f.json::<ControlEnvelope>(),
            Err(WireError::Json(_))
        ));
    }
}
