//! Host<->guest control protocol: the messages exchanged over the
//! `org.godwit.guest.0` virtio-serial port.
//!
//! This module owns the wire format only; it performs no I/O so the host
//! agent can depend on it to parse guest output.
//!
//! # Wire format
//!
//! One JSON object per line, each line prefixed by [`LINE_PREFIX`]:
//!
//! ```text
//! GW1 {"cmd":"ping","id":1}\n                         host -> guest (Command)
//! GW1 {"report":"pong","id":1,"uptime_ms":2412}\n     guest -> host (Report)
//! ```
//!
//! Lines without the prefix are noise (kernel messages, a shell echo, a
//! half line written just before a migration cut the stream) and decode to
//! `Ok(None)`. The prefix carries the protocol version: an incompatible
//! change bumps it to `GW2 `, so an old peer sees the new lines as noise
//! instead of misparsing them.
//!
//! Commands carry an `id` chosen by the host; every report that answers a
//! command echoes it. Long-running jobs (disk I/O, UDP, TCP) stream several
//! reports under the id of the command that started them.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant H as host agent
//!     participant G as godwit-guest serve
//!     G->>H: hello (on start, on reconnect, every few seconds)
//!     H->>G: memdirty_start {id: 1}
//!     G->>H: ack {id: 1}
//!     H->>G: status {id: 2}
//!     G->>H: status {id: 2, memdirty: {...}}
//!     H->>G: memdirty_verify {id: 3}
//!     G->>H: verify {id: 3, errors: 0}
//! ```

use serde::{Deserialize, Serialize};

/// Prefix of every protocol line; also the protocol version marker.
pub const LINE_PREFIX: &str = "GW1 ";

/// Longest line either side accepts. Shell output is capped well below this
/// (see [`MAX_SHELL_OUTPUT`]); anything longer is a bug or garbage.
pub const MAX_LINE_LEN: usize = 1024 * 1024;

/// Cap on captured stdout/stderr bytes of a [`Command::Shell`], each, so one
/// chatty command cannot exceed [`MAX_LINE_LEN`] once JSON-escaped.
pub const MAX_SHELL_OUTPUT: usize = 64 * 1024;

/// Errors decoding a protocol line.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The line exceeds [`MAX_LINE_LEN`].
    #[error("line of {len} bytes exceeds the {MAX_LINE_LEN}-byte limit")]
    TooLong {
        /// Length of the offending line.
        len: usize,
    },
    /// The line has the prefix but its JSON is not a valid message.
    #[error("malformed message")]
    Json(#[from] serde_json::Error),
}

/// Which pages the memory dirtier rewrites.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DirtyPattern {
    /// A cursor sweeps the buffer front to back and wraps.
    Sequential,
    /// Uniformly random pages.
    Random,
    /// 90% of writes hit the first 10% of pages, the rest are uniform over
    /// the cold 90%: a working set, as in most real workloads.
    Hotspot,
}

/// What the block I/O job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskMode {
    /// Write the whole region with a new generation, read it back and check
    /// it, repeat.
    WriteThenVerify,
    /// Sequential reads of the region, in a loop (content is checked when
    /// the job knows what it wrote).
    ReadLoop,
    /// Random blocks, half reads (checked) and half writes.
    Randrw,
}

/// Host -> guest commands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Liveness check; answered by [`Report::Pong`].
    Ping {
        /// Request id.
        id: u64,
    },
    /// Snapshot of every job; answered by [`Report::Status`].
    Status {
        /// Request id.
        id: u64,
    },
    /// Allocate `mib` MiB of verifiable pages and rewrite them at
    /// `rate_pages_per_s`. Replaces a running dirtier. Answered by
    /// [`Report::Ack`] once the buffer is filled.
    MemdirtyStart {
        /// Request id.
        id: u64,
        /// Buffer size.
        mib: u64,
        /// Target page rewrites per second (0 = fill once, then idle).
        rate_pages_per_s: u64,
        /// Which pages to rewrite.
        pattern: DirtyPattern,
    },
    /// Stop rewriting (the buffer is kept for a later verify).
    MemdirtyStop {
        /// Request id.
        id: u64,
    },
    /// Check every page; answered by [`Report::Verify`].
    MemdirtyVerify {
        /// Request id.
        id: u64,
    },
    /// Build a realistic memory image from the corpus; answered by
    /// [`Report::Ack`] when built.
    RealisticStart {
        /// Request id.
        id: u64,
        /// Anonymous memory to build, in MiB.
        anon_mib: u64,
        /// MiB of corpus files to copy into tmpfs: a second cached copy of
        /// data already in the cache (the corpus itself is always read).
        cache_mib: u64,
    },
    /// Start block I/O on `device`; streams [`Report::Diskio`] samples.
    DiskioStart {
        /// Request id.
        id: u64,
        /// Block device path, e.g. `/dev/vda`.
        device: String,
        /// Region size from the start of the device (0 = whole device).
        mib: u64,
        /// Access pattern.
        mode: DiskMode,
        /// Block size in KiB.
        block_kib: u32,
    },
    /// Stop block I/O.
    DiskioStop {
        /// Request id.
        id: u64,
    },
    /// Check every block of the region; answered by [`Report::Verify`].
    DiskioVerify {
        /// Request id.
        id: u64,
        /// Block device path.
        device: String,
    },
    /// Send sequence-numbered UDP datagrams; streams [`Report::Udp`].
    UdpSend {
        /// Request id.
        id: u64,
        /// `addr:port`.
        dest: String,
        /// Send rate in kbit/s of payload.
        rate_kbit: u64,
        /// Datagram payload size in bytes.
        payload: u32,
        /// How long to send.
        duration_s: u64,
    },
    /// Receive and analyse the datagrams of a [`Command::UdpSend`].
    UdpRecv {
        /// Request id.
        id: u64,
        /// `addr:port` to bind.
        bind: String,
        /// How long to receive.
        duration_s: u64,
    },
    /// Run a TCP echo server until the guest program exits.
    TcpEchoServe {
        /// Request id.
        id: u64,
        /// `addr:port` to bind.
        bind: String,
    },
    /// Send a numbered message every `interval_ms` and check its echo;
    /// streams [`Report::Tcp`].
    TcpEchoClient {
        /// Request id.
        id: u64,
        /// `addr:port` of the echo server.
        dest: String,
        /// Interval between messages.
        interval_ms: u64,
        /// How long to run.
        duration_s: u64,
    },
    /// Run a program; answered by [`Report::ShellResult`].
    Shell {
        /// Request id.
        id: u64,
        /// Program and arguments (no shell is involved unless `argv[0]` is one).
        argv: Vec<String>,
    },
}

impl Command {
    /// The request id.
    pub fn id(&self) -> u64 {
        match self {
            Command::Ping { id }
            | Command::Status { id }
            | Command::MemdirtyStart { id, .. }
            | Command::MemdirtyStop { id }
            | Command::MemdirtyVerify { id }
            | Command::RealisticStart { id, .. }
            | Command::DiskioStart { id, .. }
            | Command::DiskioStop { id }
            | Command::DiskioVerify { id, .. }
            | Command::UdpSend { id, .. }
            | Command::UdpRecv { id, .. }
            | Command::TcpEchoServe { id, .. }
            | Command::TcpEchoClient { id, .. }
            | Command::Shell { id, .. } => *id,
        }
    }
}

/// Memory dirtier counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemdirtyStats {
    /// Buffer size.
    pub mib: u64,
    /// Pages in the buffer.
    pub pages: u64,
    /// Target rewrite rate.
    pub rate_pages_per_s: u64,
    /// Pattern in use.
    pub pattern: Option<DirtyPattern>,
    /// Whether the dirtier is rewriting (false after stop).
    pub running: bool,
    /// Page rewrites since start (excluding the initial fill).
    pub pages_dirtied: u64,
    /// Rewrite rate measured over the last second, pages/s. Below the
    /// target when the guest CPU cannot keep up (TCG).
    pub achieved_pages_per_s: u64,
    /// Verifications done and the errors they found in total.
    pub verifies: u64,
    /// Total bad pages found by all verifications.
    pub verify_errors: u64,
}

/// Realistic-load figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RealisticStats {
    /// True once the build has finished.
    pub ready: bool,
    /// Corpus files read.
    pub files: u64,
    /// Corpus bytes read through the page cache.
    pub cache_read_bytes: u64,
    /// Bytes copied to tmpfs (a second cached copy).
    pub tmpfs_copy_bytes: u64,
    /// Bytes of data structures built in anonymous memory (our accounting).
    pub anon_built_bytes: u64,
    /// Resident anonymous memory of this process (`RssAnon`).
    pub rss_anon_bytes: u64,
    /// Error that stopped the build, if any.
    pub error: Option<String>,
}

/// Block I/O job counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskioStats {
    /// Device path.
    pub device: String,
    /// Mode.
    pub mode: Option<DiskMode>,
    /// Whether the job is running.
    pub running: bool,
    /// Bytes read since start.
    pub read_bytes: u64,
    /// Bytes written since start.
    pub write_bytes: u64,
    /// Content errors seen by reads.
    pub errors: u64,
    /// Completed passes over the region (write_then_verify/read_loop).
    pub passes: u64,
}

/// Guest memory figures from `/proc/meminfo`, in KiB.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemInfo {
    /// MemTotal.
    pub total_kib: u64,
    /// MemFree.
    pub free_kib: u64,
    /// MemAvailable.
    pub available_kib: u64,
    /// Cached (page cache including tmpfs/shmem).
    pub cached_kib: u64,
    /// Shmem (tmpfs).
    pub shmem_kib: u64,
    /// AnonPages.
    pub anon_kib: u64,
}

/// Which side of a UDP/TCP test a report comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The sending / client side.
    Sender,
    /// The receiving / server side.
    Receiver,
}

/// One inter-arrival gap seen by a UDP receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UdpGap {
    /// When the datagram that ended the gap arrived, ms since the receiver
    /// started.
    pub end_ms: u64,
    /// The gap, ms.
    pub gap_ms: u64,
}

/// Guest -> host reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "report", rename_all = "snake_case")]
pub enum Report {
    /// Sent at start, when the host (re)connects, and every few seconds.
    Hello {
        /// godwit-guest version.
        version: String,
        /// `/proc/sys/kernel/random/boot_id`: changes iff the guest rebooted,
        /// so the host can tell a migrated guest from a restarted one.
        boot_id: String,
        /// Guest uptime (CLOCK_BOOTTIME is migrated with the guest).
        uptime_ms: u64,
    },
    /// Answer to [`Command::Ping`].
    Pong {
        /// Request id.
        id: u64,
        /// Guest uptime.
        uptime_ms: u64,
    },
    /// Answer to [`Command::Status`].
    Status {
        /// Request id.
        id: u64,
        /// Guest uptime.
        uptime_ms: u64,
        /// Memory dirtier, if one was started.
        memdirty: Option<MemdirtyStats>,
        /// Realistic load, if one was started.
        realistic: Option<RealisticStats>,
        /// Block I/O, if started.
        diskio: Option<DiskioStats>,
        /// Guest memory figures.
        mem: MemInfo,
    },
    /// Result of a memory or disk verification. For disks, `pages` counts
    /// blocks of the job's block size.
    Verify {
        /// Request id.
        id: u64,
        /// Units checked.
        pages: u64,
        /// Units whose content was wrong.
        errors: u64,
        /// Index of the first bad unit.
        first_bad_page: Option<u64>,
    },
    /// One block I/O throughput sample, every 100 ms while running.
    Diskio {
        /// Id of the `diskio_start`.
        id: u64,
        /// Guest uptime at the end of the sample.
        uptime_ms: u64,
        /// Sample length.
        interval_ms: u64,
        /// Bytes read in the sample.
        read_bytes: u64,
        /// Bytes written in the sample.
        write_bytes: u64,
        /// Content errors in the sample.
        errors: u64,
        /// Totals since the start.
        total: DiskioStats,
    },
    /// UDP stream figures: every second while running and once at the end
    /// (`done`).
    Udp {
        /// Id of the `udp_send`/`udp_recv`.
        id: u64,
        /// Which side.
        role: Role,
        /// Final report.
        done: bool,
        /// Datagrams sent (sender).
        sent: u64,
        /// Datagrams received, duplicates included (receiver).
        received: u64,
        /// Sequence numbers below the highest seen that never arrived.
        lost: u64,
        /// Datagrams seen more than once.
        duplicates: u64,
        /// Datagrams that arrived after a higher sequence number.
        reordered: u64,
        /// Inter-arrival gaps longer than [`crate::net::UDP_GAP_THRESHOLD_MS`].
        gaps: u64,
        /// Longest inter-arrival gap, in ms.
        max_gap_ms: u64,
        /// Highest sequence number seen (receiver) or sent (sender).
        max_seq: Option<u64>,
        /// Receiver: lowest sequence number seen. A receiver started after
        /// the sender counts everything below it as `lost`; the datagrams
        /// lost since it started are `max_seq - min_seq + 1 - (received -
        /// duplicates)`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        min_seq: Option<u64>,
        /// Receiver, final report only: every inter-arrival gap of at least
        /// [`crate::net::UDP_GAP_LIST_MS`] (the first
        /// [`crate::net::UDP_GAP_LIST_MAX`]), so a caller can tell which
        /// gap belongs to which event.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        gap_list: Vec<UdpGap>,
        /// Receiver: datagrams this machine's kernel dropped because a UDP
        /// socket's receive buffer was full while the probe ran
        /// (`/proc/net/snmp` `Udp: RcvbufErrors`), i.e. lost after the
        /// network delivered them.
        #[serde(default)]
        socket_drops: u64,
    },
    /// TCP echo figures: every second while running and once at the end.
    Tcp {
        /// Id of the `tcp_echo_client`/`tcp_echo_serve`.
        id: u64,
        /// Which side (server = receiver).
        role: Role,
        /// Final report.
        done: bool,
        /// Successful connections (client) or accepted ones (server).
        connects: u64,
        /// Connections lost to an error or EOF.
        resets: u64,
        /// Messages sent (client).
        sent: u64,
        /// Echoes received and matching (client) / bytes echoed (server).
        echoed: u64,
        /// Echoes that did not match what was sent.
        mismatches: u64,
        /// Longest time without a successful echo, in ms.
        max_stall_ms: u64,
        /// Last error, if any.
        last_error: Option<String>,
    },
    /// The command was accepted (or, for starts, the job is set up).
    Ack {
        /// Request id.
        id: u64,
    },
    /// The command failed.
    Error {
        /// Request id (0 if the command could not be parsed).
        id: u64,
        /// What went wrong.
        message: String,
    },
    /// Result of [`Command::Shell`].
    ShellResult {
        /// Request id.
        id: u64,
        /// Exit code; `None` if killed by a signal or not started.
        code: Option<i32>,
        /// Captured stdout (lossy UTF-8, capped at [`MAX_SHELL_OUTPUT`]).
        stdout: String,
        /// Captured stderr (same cap).
        stderr: String,
    },
}

/// Encode a message as one protocol line, prefix and trailing `\n` included.
pub fn encode_line(msg: &impl Serialize) -> String {
    // Serialising our own plain data types (no maps with non-string keys,
    // no fallible Serialize impls) cannot fail; fall back to an empty
    // object rather than panic just in case.
    let json = serde_json::to_string(msg).unwrap_or_else(|_| "{}".to_string());
    let mut line = String::with_capacity(LINE_PREFIX.len() + json.len() + 1);
    line.push_str(LINE_PREFIX);
    line.push_str(&json);
    line.push('\n');
    line
}

/// Split off the prefix; `None` for noise lines.
fn payload(line: &str) -> Result<Option<&str>, ProtoError> {
    if line.len() > MAX_LINE_LEN {
        return Err(ProtoError::TooLong { len: line.len() });
    }
    // Noise may precede the prefix on the same line (a partial line cut by
    // a reconnect), so search rather than only checking the start.
    let Some(pos) = line.find(LINE_PREFIX) else {
        return Ok(None);
    };
    Ok(Some(
        line[pos + LINE_PREFIX.len()..].trim_end_matches(['\r', '\n']),
    ))
}

/// Decode a guest report line. `Ok(None)` for lines without the prefix.
pub fn decode_report(line: &str) -> Result<Option<Report>, ProtoError> {
    match payload(line)? {
        None => Ok(None),
        Some(json) => Ok(Some(serde_json::from_str(json)?)),
    }
}

/// Decode a host command line. `Ok(None)` for lines without the prefix.
pub fn decode_command(line: &str) -> Result<Option<Command>, ProtoError> {
    match payload(line)? {
        None => Ok(None),
        Some(json) => Ok(Some(serde_json::from_str(json)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_commands() -> Vec<Command> {
        vec![
            Command::Ping { id: 1 },
            Command::Status { id: 2 },
            Command::MemdirtyStart {
                id: 3,
                mib: 64,
                rate_pages_per_s: 2000,
                pattern: DirtyPattern::Hotspot,
            },
            Command::MemdirtyStop { id: 4 },
            Command::MemdirtyVerify { id: 5 },
            Command::RealisticStart {
                id: 6,
                anon_mib: 32,
                cache_mib: 16,
            },
            Command::DiskioStart {
                id: 7,
                device: "/dev/vda".into(),
                mib: 0,
                mode: DiskMode::WriteThenVerify,
                block_kib: 64,
            },
            Command::DiskioStop { id: 8 },
            Command::DiskioVerify {
                id: 9,
                device: "/dev/vda".into(),
            },
            Command::UdpSend {
                id: 10,
                dest: "10.0.0.1:5000".into(),
                rate_kbit: 1000,
                payload: 1200,
                duration_s: 10,
            },
            Command::UdpRecv {
                id: 11,
                bind: "0.0.0.0:5000".into(),
                duration_s: 10,
            },
            Command::TcpEchoServe {
                id: 12,
                bind: "0.0.0.0:7".into(),
            },
            Command::TcpEchoClient {
                id: 13,
                dest: "10.0.0.1:7".into(),
                interval_ms: 10,
                duration_s: 5,
            },
            Command::Shell {
                id: 14,
                argv: vec!["uname".into(), "-a".into()],
            },
        ]
    }

    #[test]
    fn commands_round_trip() {
        for cmd in all_commands() {
            let line = encode_line(&cmd);
            assert!(line.starts_with(LINE_PREFIX) && line.ends_with('\n'));
            assert_eq!(line.matches('\n').count(), 1, "{line}");
            let back = decode_command(&line).unwrap().unwrap();
            assert_eq!(back, cmd);
            assert_eq!(back.id(), cmd.id());
        }
    }

    #[test]
    fn reports_round_trip() {
        let reports = vec![
            Report::Hello {
                version: "0.1.0".into(),
                boot_id: "abc".into(),
                uptime_ms: 5,
            },
            Report::Pong {
                id: 1,
                uptime_ms: 9,
            },
            Report::Status {
                id: 2,
                uptime_ms: 1,
                memdirty: Some(MemdirtyStats {
                    mib: 1,
                    pattern: Some(DirtyPattern::Random),
                    ..Default::default()
                }),
                realistic: Some(RealisticStats::default()),
                diskio: None,
                mem: MemInfo::default(),
            },
            Report::Verify {
                id: 3,
                pages: 10,
                errors: 1,
                first_bad_page: Some(4),
            },
            Report::Diskio {
                id: 4,
                uptime_ms: 1,
                interval_ms: 100,
                read_bytes: 1,
                write_bytes: 2,
                errors: 0,
                total: DiskioStats::default(),
            },
            Report::Udp {
                id: 5,
                role: Role::Receiver,
                done: true,
                sent: 0,
                received: 10,
                lost: 1,
                duplicates: 0,
                reordered: 2,
                gaps: 1,
                max_gap_ms: 300,
                max_seq: Some(10),
                min_seq: Some(0),
                socket_drops: 3,
                gap_list: vec![UdpGap {
                    end_ms: 5000,
                    gap_ms: 240,
                }],
            },
            Report::Tcp {
                id: 6,
                role: Role::Sender,
                done: false,
                connects: 1,
                resets: 0,
                sent: 5,
                echoed: 5,
                mismatches: 0,
                max_stall_ms: 12,
                last_error: None,
            },
            Report::Ack { id: 7 },
            Report::Error {
                id: 8,
                message: "line\nbreak \"quoted\"".into(),
            },
            Report::ShellResult {
                id: 9,
                code: Some(0),
                stdout: "a\nb\n".into(),
                stderr: String::new(),
            },
        ];
        for r in reports {
            let line = encode_line(&r);
            assert_eq!(line.matches('\n').count(), 1, "{line}");
            assert_eq!(decode_report(&line).unwrap().unwrap(), r);
        }
    }

    #[test]
    fn wire_shape_is_stable() {
        let line = encode_line(&Command::MemdirtyStart {
            id: 1,
            mib: 32,
            rate_pages_per_s: 100,
            pattern: DirtyPattern::Sequential,
        });
        assert_eq!(
            line,
            "GW1 {\"cmd\":\"memdirty_start\",\"id\":1,\"mib\":32,\"rate_pages_per_s\":100,\"pattern\":\"sequential\"}\n"
        );
        assert_eq!(
            encode_line(&Report::Ack { id: 3 }),
            "GW1 {\"report\":\"ack\",\"id\":3}\n"
        );
    }

    #[test]
    fn noise_is_ignored_and_garbage_rejected() {
        assert!(decode_report("[    2.1] virtio_net\n").unwrap().is_none());
        assert!(decode_report("").unwrap().is_none());
        assert!(decode_command("GW1 {\"cmd\":\"nope\",\"id\":1}").is_err());
        assert!(decode_command("GW1 {\"cmd\":\"ping\"}").is_err());
        assert!(decode_command("GW1 not json").is_err());
        // A reconnect may leave half a line in front of a good one.
        let r = decode_report("{\"repGW1 {\"report\":\"ack\",\"id\":2}\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r, Report::Ack { id: 2 });
        let long = format!("GW1 {}", "x".repeat(MAX_LINE_LEN));
        assert!(matches!(
            decode_report(&long),
            Err(ProtoError::TooLong { .. })
        ));
    }
}
