//! In-process measurements between two sites of a running lab.
//!
//! Each probe runs a server thread in the destination site's namespace and a
//! client thread in the source site's namespace (see [`crate::netns`]), so
//! the traffic crosses the WAN emulator exactly like a site's own traffic.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::netns::spawn_in;
use crate::wan::WanClient;
use crate::{LabError, LabState};

/// Size of a UDP echo probe: small, so serialisation adds < 10 µs at 100 Mbit/s.
const RTT_PROBE_BYTES: usize = 64;
/// Pause between RTT probes so they never queue behind each other.
const RTT_PROBE_GAP: Duration = Duration::from_millis(5);
/// Extra time, beyond the configured round trip, to wait for one echo.
const RTT_PROBE_SLACK: Duration = Duration::from_secs(2);
/// Write size of the TCP goodput sender.
const TCP_CHUNK: usize = 256 * 1024;
/// Shortest steady-state warm-up skipped by the goodput measurement.
const MIN_WARMUP: Duration = Duration::from_secs(1);
/// Warm-up in round trips: slow start needs ~log2(BDP / 10 segments) RTTs
/// (8 at 100 Mbit/s × 260 ms) to fill the pipe, plus a few to settle.
const WARMUP_RTTS: u32 = 12;
/// Time allowed for a connection set-up or the server to appear.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Round-trip time statistics, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RttStats {
    /// Probes sent.
    pub sent: usize,
    /// Probes whose echo never came back.
    pub lost: usize,
    /// Smallest RTT.
    pub min_ms: f64,
    /// Median RTT.
    pub median_ms: f64,
    /// Mean RTT.
    pub mean_ms: f64,
    /// Largest RTT.
    pub max_ms: f64,
}

/// TCP goodput of one bulk transfer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GoodputStats {
    /// Goodput over the steady-state window, Mbit/s (payload bytes, 10^6 bits).
    pub mbit_s: f64,
    /// Payload bytes received in total.
    pub total_bytes: u64,
    /// From first to last byte received, s.
    pub total_s: f64,
    /// Payload bytes received inside the window.
    pub window_bytes: u64,
    /// Length of the window, s.
    pub window_s: f64,
    /// How the figure was measured.
    pub method: String,
}

/// Round trip of `from`→`to`→`from` as currently configured in the WAN
/// daemon (delays may have been changed since `up`), falling back to the
/// spec. Returns (base RTT, total jitter).
fn configured_rtt(state: &LabState, from: &str, to: &str) -> (Duration, Duration) {
    let live = WanClient::connect(&state.wan_socket)
        .and_then(|mut c| c.stats())
        .ok()
        .and_then(|links| {
            let dir = |a: &str, b: &str| {
                links
                    .iter()
                    .find(|l| l.from == a && l.to == b)
                    .map(|l| (l.link.params.delay, l.link.params.jitter))
            };
            let (d1, j1) = dir(from, to)?;
            let (d2, j2) = dir(to, from)?;
            Some((d1 + d2, j1 + j2))
        });
    live.unwrap_or((state.spec.delay * 2, state.spec.jitter * 2))
}

/// Sends `count` UDP echo probes from site `from` to site `to`, one at a time.
pub fn rtt(state: &LabState, from: &str, to: &str, count: usize) -> Result<RttStats, LabError> {
    let (src, dst) = (state.site(from)?.clone(), state.site(to)?.clone());
    let (base, jitter) = configured_rtt(state, from, to);
    let wait = base + jitter + RTT_PROBE_SLACK;
    let (port_tx, port_rx) = mpsc::channel();
    let server = spawn_in(&dst.netns, move || -> Result<(), LabError> {
        let sock =
            UdpSocket::bind((dst.addr, 0)).map_err(|e| LabError::io("bind echo socket", e))?;
        let port = sock
            .local_addr()
            .map_err(|e| LabError::io("echo socket address", e))?
            .port();
        let _ = port_tx.send(port);
        sock.set_read_timeout(Some(wait + SETUP_TIMEOUT))
            .map_err(|e| LabError::io("echo socket timeout", e))?;
        let mut buf = [0u8; RTT_PROBE_BYTES];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                return Ok(()); // Client gone quiet: done.
            };
            if &buf[..n] == b"stop" {
                return Ok(());
            }
            let _ = sock.send_to(&buf[..n], peer);
        }
    })?;
    let port = port_rx
        .recv_timeout(SETUP_TIMEOUT)
        .map_err(|_| LabError::Probe("echo server did not start".into()))?;
    let target = SocketAddr::from((dst.addr, port));
    let client = spawn_in(
        &src.netns,
        move || -> Result<Vec<Option<Duration>>, LabError> {
            let sock =
                UdpSocket::bind((src.addr, 0)).map_err(|e| LabError::io("bind probe socket", e))?;
            sock.connect(target)
                .map_err(|e| LabError::io("connect probe socket", e))?;
            let mut samples = Vec::with_capacity(count);
            let mut buf = [0u8; RTT_PROBE_BYTES];
            for seq in 0..count as u64 {
                let mut probe = [0u8; RTT_PROBE_BYTES];
                probe[..8].copy_from_slice(&seq.to_be_bytes());
                let sent = Instant::now();
                sock.send(&probe)
                    .map_err(|e| LabError::io("send probe", e))?;
                let deadline = sent + wait;
                let mut got = None;
                while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                    sock.set_read_timeout(Some(left.max(Duration::from_micros(1))))
                        .map_err(|e| LabError::io("probe timeout", e))?;
                    match sock.recv(&mut buf) {
                        Ok(n) if n >= 8 && buf[..8] == seq.to_be_bytes() => {
                            got = Some(sent.elapsed());
                            break;
                        }
                        Ok(_) => continue, // A late echo of an earlier probe.
                        Err(_) => break,
                    }
                }
                samples.push(got);
                std::thread::sleep(RTT_PROBE_GAP);
            }
            let _ = sock.send(b"stop");
            Ok(samples)
        },
    )?;
    let samples = client
        .join()
        .map_err(|_| LabError::ThreadPanicked(from.to_owned()))???;
    // The server stops on "stop" or after its timeout; don't fail the probe on it.
    let _ = server.join();
    summarize_rtt(&samples)
}

fn summarize_rtt(samples: &[Option<Duration>]) -> Result<RttStats, LabError> {
    let mut ms: Vec<f64> = samples
        .iter()
        .flatten()
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    if ms.is_empty() {
        return Err(LabError::Probe(format!(
            "all {} RTT probes were lost",
            samples.len()
        )));
    }
    ms.sort_by(f64::total_cmp);
    let mid = ms.len() / 2;
    let median = if ms.len() % 2 == 0 {
        (ms[mid - 1] + ms[mid]) / 2.0
    } else {
        ms[mid]
    };
    Ok(RttStats {
        sent: samples.len(),
        lost: samples.len() - ms.len(),
        min_ms: ms[0],
        median_ms: median,
        mean_ms: ms.iter().sum::<f64>() / ms.len() as f64,
        max_ms: ms[ms.len() - 1],
    })
}

/// Sends bulk TCP data from `from` to `to` for `duration` and measures the
/// receiver's goodput after a warm-up of max(1 s, 12 RTT), capped at half
/// the transfer.
pub fn tcp_goodput(
    state: &LabState,
    from: &str,
    to: &str,
    duration: Duration,
) -> Result<GoodputStats, LabError> {
    let (src, dst) = (state.site(from)?.clone(), state.site(to)?.clone());
    let (port_tx, port_rx) = mpsc::channel();
    let server = spawn_in(
        &dst.netns,
        move || -> Result<Vec<(Instant, u64)>, LabError> {
            let l = TcpListener::bind((dst.addr, 0))
                .map_err(|e| LabError::io("bind goodput listener", e))?;
            let port = l
                .local_addr()
                .map_err(|e| LabError::io("listener address", e))?
                .port();
            let _ = port_tx.send(port);
            let (mut s, _) = l
                .accept()
                .map_err(|e| LabError::io("accept goodput connection", e))?;
            let mut buf = vec![0u8; TCP_CHUNK];
            let mut total = 0u64;
            let mut samples = Vec::new();
            loop {
                match s.read(&mut buf) {
                    Ok(0) => return Ok(samples),
                    Ok(n) => {
                        total += n as u64;
                        // Bytes that have *arrived* = read + still queued in the
                        // socket; counting only reads would credit a window with
                        // whatever a briefly descheduled reader had left behind.
                        samples.push((Instant::now(), total + unread_bytes(&s)));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(LabError::io("receive goodput data", e)),
                }
            }
        },
    )?;
    let port = port_rx
        .recv_timeout(SETUP_TIMEOUT)
        .map_err(|_| LabError::Probe("goodput server did not start".into()))?;
    let target = SocketAddr::from((dst.addr, port));
    let client = spawn_in(&src.netns, move || -> Result<(), LabError> {
        let mut s = TcpStream::connect_timeout(&target, SETUP_TIMEOUT)
            .map_err(|e| LabError::io(format!("connect to {target}"), e))?;
        let chunk = vec![0x5au8; TCP_CHUNK];
        let end = Instant::now() + duration;
        while Instant::now() < end {
            s.write_all(&chunk)
                .map_err(|e| LabError::io("send goodput data", e))?;
        }
        s.shutdown(std::net::Shutdown::Write)
            .map_err(|e| LabError::io("finish goodput stream", e))
    })?;
    let sent = client
        .join()
        .map_err(|_| LabError::ThreadPanicked(from.to_owned()))?;
    let samples = server
        .join()
        .map_err(|_| LabError::ThreadPanicked(to.to_owned()))???;
    sent??;
    let (rtt, _) = configured_rtt(state, from, to);
    let warmup = (rtt * WARMUP_RTTS).max(MIN_WARMUP).min(duration / 2);
    summarize_goodput(&samples, warmup)
}

/// Bytes received by the kernel but not yet read from `s` (FIONREAD).
fn unread_bytes(s: &TcpStream) -> u64 {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which lives across the call.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n as *mut libc::c_int) };
    if r < 0 {
        0
    } else {
        u64::try_from(n).unwrap_or(0)
    }
}

fn summarize_goodput(
    samples: &[(Instant, u64)],
    warmup: Duration,
) -> Result<GoodputStats, LabError> {
    let (Some(&(first_t, first_b)), Some(&(last_t, total))) = (samples.first(), samples.last())
    else {
        return Err(LabError::Probe("no data received".into()));
    };
    let start = first_t + warmup;
    let (win_t, win_b) = samples
        .iter()
        .find(|(t, _)| *t >= start)
        .map_or((first_t, first_b), |&(t, b)| (t, b));
    let window = last_t.saturating_duration_since(win_t);
    if window.is_zero() {
        return Err(LabError::Probe("transfer too short to measure".into()));
    }
    let window_bytes = total - win_b;
    Ok(GoodputStats {
        mbit_s: window_bytes as f64 * 8.0 / window.as_secs_f64() / 1e6,
        total_bytes: total,
        total_s: last_t.saturating_duration_since(first_t).as_secs_f64(),
        window_bytes,
        window_s: window.as_secs_f64(),
        method: format!(
            "one TCP flow, payload bytes arrived at the receiver (read + FIONREAD) from {:.2} s after the first byte to the last byte",
            warmup.as_secs_f64()
        ),
    })
}
