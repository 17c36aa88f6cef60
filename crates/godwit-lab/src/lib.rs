//! Multi-site WAN lab: network namespaces joined by a user-space WAN emulator.
//!
//! A lab is N *sites* ("a", "b", ...), each a Linux network namespace
//! `<prefix>-<site>` with one TUN device `wan0` holding the site host address
//! `10.77.(i+1).1/32` and a route `10.77.0.0/16 dev wan0`. Every TUN fd is held
//! by one emulator process (the *WAN daemon*), which moves IP packets between
//! sites through a per-direction link model: rate limit with a bounded
//! tail-drop queue, one-way delay, jitter without reordering, random loss and
//! a cut switch. Kernel netem is not needed. Nothing is routed to or from the
//! root namespace: the lab's addresses exist only inside its namespaces.
//!
//! # Layout
//! - [`link`]: the sans-IO link model (no clocks, no sockets), unit- and
//!   property-tested.
//! - [`wan`]: the emulator daemon (a dedicated data-plane thread over the TUN
//!   fds plus a unix-socket control plane) and its client, [`wan::WanClient`].
//! - [`netns`]: run a child process or a closure inside a site's namespace.
//! - [`topology`]: `up` / `down` / `load_state` and the JSON state file.
//! - [`probe`]: in-process RTT and TCP goodput measurements between sites.
//!
//! # Root-namespace side effect
//! On this kernel `net.core.rmem_max` / `wmem_max` are read-only inside a
//! child namespace and copied from the root namespace when the namespace is
//! created. [`topology::up`] therefore *raises* (never lowers) the root values
//! to [`UDP_BUFFER_MAX`] before creating the namespaces, so QUIC's UDP sockets
//! can get ~16 MiB buffers inside the lab.

#![warn(missing_docs)]

pub mod link;
pub mod netns;
pub mod probe;
pub mod topology;
pub mod wan;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Smallest lab worth building: one site cannot talk to anything.
pub const MIN_SITES: usize = 2;
/// Largest lab: keeps the address plan (10.77.1.0 .. 10.77.16.0) and the
/// N×(N-1) link table small; a 2-core machine cannot drive more anyway.
pub const MAX_SITES: usize = 16;
/// Largest one-way delay accepted; beyond this TCP timers, not the link, dominate.
pub const MAX_DELAY: Duration = Duration::from_secs(10);
/// Smallest explicit queue limit: one full-size packet must fit or nothing passes.
pub const MIN_QUEUE_BYTES: u64 = 1500;
/// Default namespace prefix of the real lab (`godwit-a`, `godwit-b`, ...).
pub const DEFAULT_PREFIX: &str = "godwit";
/// Default state directory of the real lab.
pub const DEFAULT_STATE_DIR: &str = "/run/godwit/lab";
/// Socket buffer ceiling wanted for UDP (QUIC) inside the lab: ~1 BDP at
/// 100 Mbit/s × 600 ms plus headroom is 7.5 MiB; 16 MiB leaves room for 2×.
pub const UDP_BUFFER_MAX: u64 = 16 * 1024 * 1024;
/// TCP autotuning ceiling inside the lab (tcp_rmem/tcp_wmem max): the kernel
/// needs about 2× the BDP of buffer, and 100 Mbit/s × 600 ms is 7.5 MB.
pub const TCP_BUFFER_MAX: u64 = 64 * 1024 * 1024;

/// What the user asked for: the shape of the lab and the default link model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabSpec {
    /// Number of sites, [`MIN_SITES`]..=[`MAX_SITES`].
    pub sites: usize,
    /// One-way delay of every link.
    #[serde(rename = "delay_us", with = "serde_micros")]
    pub delay: Duration,
    /// Link rate in bits/s of IP bytes; 0 = unlimited.
    pub rate_bps: u64,
    /// Random loss probability, 0..=1.
    pub loss: f64,
    /// Extra uniform delay 0..=jitter (never reorders).
    #[serde(rename = "jitter_us", with = "serde_micros")]
    pub jitter: Duration,
    /// Queue limit of every link; `None` = [`link::default_queue_bytes`].
    pub queue_bytes: Option<u64>,
    /// Namespace name prefix; [`DEFAULT_PREFIX`] for the real lab, something
    /// unique (e.g. `gwtest1`) for tests so they cannot collide with it.
    #[serde(default = "default_prefix")]
    pub prefix: String,
}

fn default_prefix() -> String {
    DEFAULT_PREFIX.to_owned()
}

impl Default for LabSpec {
    fn default() -> Self {
        Self {
            sites: 2,
            delay: Duration::ZERO,
            rate_bps: 0,
            loss: 0.0,
            jitter: Duration::ZERO,
            queue_bytes: None,
            prefix: default_prefix(),
        }
    }
}

impl LabSpec {
    /// Checks every field; the error names the offending one.
    pub fn validate(&self) -> Result<(), LabError> {
        let bad = |msg: String| Err(LabError::InvalidSpec(msg));
        if !(MIN_SITES..=MAX_SITES).contains(&self.sites) {
            return bad(format!(
                "sites must be {MIN_SITES}..={MAX_SITES}, got {}",
                self.sites
            ));
        }
        if !(0.0..=1.0).contains(&self.loss) || self.loss.is_nan() {
            return bad(format!("loss must be between 0 and 1, got {}", self.loss));
        }
        if self.delay > MAX_DELAY {
            return bad(format!(
                "delay must be at most {MAX_DELAY:?}, got {:?}",
                self.delay
            ));
        }
        if self.jitter > MAX_DELAY {
            return bad(format!(
                "jitter must be at most {MAX_DELAY:?}, got {:?}",
                self.jitter
            ));
        }
        if let Some(q) = self.queue_bytes {
            if q < MIN_QUEUE_BYTES {
                return bad(format!(
                    "queue must be at least {MIN_QUEUE_BYTES} bytes, got {q}"
                ));
            }
        }
        let prefix_ok = !self.prefix.is_empty()
            && self.prefix.len() <= 20
            && self
                .prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !prefix_ok {
            return bad(format!(
                "prefix must be 1..=20 ASCII letters, digits or '_', got {:?}",
                self.prefix
            ));
        }
        Ok(())
    }

    /// The link parameters every ordered site pair starts with.
    pub fn link_params(&self) -> link::LinkParams {
        link::LinkParams {
            rate_bps: self.rate_bps,
            delay: self.delay,
            jitter: self.jitter,
            loss: self.loss,
            queue_bytes: self.queue_bytes,
            cut: false,
        }
    }
}

/// One site of a lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteInfo {
    /// Site name: "a", "b", ...
    pub name: String,
    /// Site index: 0 for "a".
    pub index: usize,
    /// Network namespace name, `<prefix>-<name>`.
    pub netns: String,
    /// Site host address, `10.77.(index+1).1`, on `wan0`.
    pub addr: Ipv4Addr,
    /// Site subnet, `10.77.(index+1).0/24`.
    pub subnet: String,
}

impl SiteInfo {
    /// The site at `index` of a lab whose namespaces start with `prefix`.
    pub fn new(prefix: &str, index: usize) -> Self {
        let name = site_name(index);
        let octet = site_octet(index);
        Self {
            netns: format!("{prefix}-{name}"),
            name,
            index,
            addr: Ipv4Addr::new(10, 77, octet, 1),
            subnet: format!("10.77.{octet}.0/24"),
        }
    }
}

/// Everything needed to find and tear down a running lab; saved as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabState {
    /// The spec the lab was built from.
    pub spec: LabSpec,
    /// The sites, by index.
    pub sites: Vec<SiteInfo>,
    /// PID of the WAN daemon, once started.
    pub wan_pid: Option<u32>,
    /// Control socket of the WAN daemon.
    pub wan_socket: PathBuf,
    /// Directory holding the state file, daemon config and log.
    pub state_dir: PathBuf,
}

impl LabState {
    /// The site called `name`.
    pub fn site(&self, name: &str) -> Result<&SiteInfo, LabError> {
        self.sites
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| LabError::UnknownSite(name.to_owned()))
    }
}

/// Errors of the lab: topology, namespaces, the emulator and probes.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A lab already exists in this state dir or under this prefix.
    #[error("a lab is already up ({0}); run `godwit lab down` first")]
    AlreadyUp(String),
    /// The spec failed validation.
    #[error("invalid lab spec: {0}")]
    InvalidSpec(String),
    /// A site name that is not part of the lab.
    #[error("unknown site {0:?}")]
    UnknownSite(String),
    /// A system call or file operation failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An external command (`ip`, `sysctl`) failed.
    #[error("command `{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// The state file or a control message could not be (de)serialized.
    #[error("bad JSON in {context}")]
    Json {
        /// What was being parsed or written.
        context: String,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// The WAN daemon answered a request with an error.
    #[error("WAN daemon refused the request: {0}")]
    Daemon(String),
    /// The WAN daemon did not become ready or answer in time.
    #[error("WAN daemon timed out: {0}")]
    Timeout(String),
    /// Bad command-line arguments for the daemon.
    #[error("bad wan-daemon arguments: {0}")]
    Usage(String),
    /// A probe measurement failed.
    #[error("probe failed: {0}")]
    Probe(String),
    /// A thread inside a namespace panicked.
    #[error("thread in namespace {0} panicked")]
    ThreadPanicked(String),
}

impl LabError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn json(context: impl Into<String>, source: serde_json::Error) -> Self {
        Self::Json {
            context: context.into(),
            source,
        }
    }
}

/// Site name of index `i`: "a".."p".
pub fn site_name(i: usize) -> String {
    // Only called with i < MAX_SITES (16), so the char stays in 'a'..='p'.
    char::from(b'a' + (i % 26) as u8).to_string()
}

/// Index of site `name`, if it is a valid site name.
pub fn site_index(name: &str) -> Option<usize> {
    match name.as_bytes() {
        [c @ b'a'..=b'z'] => Some(usize::from(c - b'a')).filter(|&i| i < MAX_SITES),
        _ => None,
    }
}

/// Third octet of site `i`'s subnet (`10.77.<octet>.0/24`).
pub(crate) fn site_octet(i: usize) -> u8 {
    // i < MAX_SITES (16) everywhere this is called, so i + 1 fits in a u8.
    (i + 1) as u8
}

/// Serde helper: a `Duration` as integer microseconds (`*_us` fields).
pub(crate) mod serde_micros {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_micros)
    }
}

/// Serde helper: an `Option<Duration>` as integer microseconds.
pub(crate) mod serde_opt_micros {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<u64>::deserialize(d).map(|o| o.map(Duration::from_micros))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_plan() {
        let s = SiteInfo::new("godwit", 2);
        assert_eq!(s.name, "c");
        assert_eq!(s.netns, "godwit-c");
        assert_eq!(s.addr, Ipv4Addr::new(10, 77, 3, 1));
        assert_eq!(s.subnet, "10.77.3.0/24");
        assert_eq!(site_index("c"), Some(2));
        assert_eq!(site_index("q"), None);
        assert_eq!(site_index("ab"), None);
    }

    #[test]
    fn spec_validation() {
        let ok = LabSpec::default();
        assert!(ok.validate().is_ok());
        for bad in [
            LabSpec {
                sites: 1,
                ..ok.clone()
            },
            LabSpec {
                sites: 17,
                ..ok.clone()
            },
            LabSpec {
                loss: 1.5,
                ..ok.clone()
            },
            LabSpec {
                loss: f64::NAN,
                ..ok.clone()
            },
            LabSpec {
                queue_bytes: Some(10),
                ..ok.clone()
            },
            LabSpec {
                prefix: "a-b".into(),
                ..ok.clone()
            },
            LabSpec {
                delay: Duration::from_secs(11),
                ..ok.clone()
            },
        ] {
            assert!(
                matches!(bad.validate(), Err(LabError::InvalidSpec(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn state_roundtrip() {
        let spec = LabSpec {
            delay: Duration::from_millis(130),
            rate_bps: 100_000_000,
            ..LabSpec::default()
        };
        let state = LabState {
            sites: (0..2).map(|i| SiteInfo::new("godwit", i)).collect(),
            spec,
            wan_pid: Some(42),
            wan_socket: "/run/godwit/lab/wan.sock".into(),
            state_dir: "/run/godwit/lab".into(),
        };
        let json = serde_json::to_string(&state).unwrap();
        assert!(json.contains("\"delay_us\":130000"));
        let back: LabState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
    }
}
