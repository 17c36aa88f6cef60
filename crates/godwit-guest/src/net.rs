//! Network probes: a sequence-numbered UDP stream and a TCP echo pair.
//!
//! These measure what a live migration does to a guest's traffic: the UDP
//! receiver reports the longest silence (the switchover blackout as seen
//! by a flow), losses, duplicates and reordering; the TCP client reports
//! whether its connection survived (resets) and the longest stall.
//!
//! # UDP datagram layout (little-endian)
//!
//! | offset | size | field                                    |
//! |--------|------|------------------------------------------|
//! | 0      | 4    | magic `GWUD`                             |
//! | 4      | 4    | reserved (0)                             |
//! | 8      | 8    | sequence number, from 0                  |
//! | 16     | 8    | sender `CLOCK_MONOTONIC` send time, ns   |
//! | 24     | ..   | zero padding up to the payload size      |
//!
//! # TCP echo message
//!
//! [`TCP_MSG_LEN`] bytes: `GWT <seq, 20 digits> <padding>\n`; the server
//! echoes bytes verbatim, the client checks each echo equals what it sent.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use crate::proto::{Report, Role, UdpGap};
use crate::sys;

/// `GWUD` in little-endian.
pub const UDP_MAGIC: u32 = u32::from_le_bytes(*b"GWUD");

/// Smallest UDP payload: the header.
pub const UDP_MIN_PAYLOAD: u32 = 24;

/// Largest UDP payload (IPv4 limit).
pub const UDP_MAX_PAYLOAD: u32 = 65_507;

/// Inter-arrival gaps above this count as a "gap" in [`Report::Udp`]: well
/// above the send interval of any sensible test rate, well below a
/// migration blackout.
pub const UDP_GAP_THRESHOLD_MS: u64 = 100;

/// Inter-arrival gaps of at least this are listed in the receiver's final
/// report ([`Report::Udp`]'s `gap_list`).
pub const UDP_GAP_LIST_MS: u64 = 20;

/// At most this many gaps are listed; later ones are only counted.
pub const UDP_GAP_LIST_MAX: usize = 1024;

/// Sequence numbers the receiver tracks for duplicate detection (a bitmap
/// of 8 MiB); later ones are still counted but not checked for duplicates.
pub const UDP_MAX_TRACKED_SEQ: u64 = 1 << 26;

/// How much a late sender may catch up in one burst: beyond this, missed
/// send slots are skipped rather than sent back-to-back, so a stalled guest
/// does not flood the link afterwards.
pub const UDP_MAX_CATCH_UP: Duration = Duration::from_millis(100);

/// Interim reports are sent this often by UDP and TCP probes.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// Socket read timeout: bounds how late a probe notices its deadline.
pub const POLL_TIMEOUT: Duration = Duration::from_millis(100);

/// Fixed size of a TCP echo message.
pub const TCP_MSG_LEN: usize = 64;

/// Pause before a TCP client reconnects after an error.
pub const TCP_RECONNECT_DELAY: Duration = Duration::from_millis(100);

/// Errors of the network probes.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The address does not resolve.
    #[error("bad address {addr}")]
    Addr {
        /// Address text.
        addr: String,
    },
    /// Bad parameters.
    #[error("invalid parameter: {0}")]
    Param(String),
    /// Socket setup failed.
    #[error("socket setup for {addr} failed")]
    Socket {
        /// Address text.
        addr: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

fn resolve(addr: &str) -> Result<SocketAddr, NetError> {
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| NetError::Addr {
            addr: addr.to_string(),
        })
}

fn sock_err(addr: &str) -> impl FnOnce(std::io::Error) -> NetError + '_ {
    move |source| NetError::Socket {
        addr: addr.to_string(),
        source,
    }
}

/// Encode a UDP probe datagram into `buf` (length = payload size).
pub fn encode_udp(buf: &mut [u8], seq: u64, send_ns: u64) {
    buf.fill(0);
    buf[0..4].copy_from_slice(&UDP_MAGIC.to_le_bytes());
    buf[8..16].copy_from_slice(&seq.to_le_bytes());
    buf[16..24].copy_from_slice(&send_ns.to_le_bytes());
}

/// Decode a UDP probe datagram: `(seq, send_ns)`.
pub fn decode_udp(buf: &[u8]) -> Option<(u64, u64)> {
    if buf.len() < UDP_MIN_PAYLOAD as usize || buf[0..4] != UDP_MAGIC.to_le_bytes() {
        return None;
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&buf[8..16]);
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&buf[16..24]);
    Some((u64::from_le_bytes(seq), u64::from_le_bytes(ts)))
}

/// Receiver-side analysis of a UDP probe stream (sans-IO: arrival times
/// are passed in).
#[derive(Debug, Default)]
pub struct UdpAnalyzer {
    seen: Vec<u64>,
    unique: u64,
    /// Datagrams received, duplicates included.
    pub received: u64,
    /// Duplicates.
    pub duplicates: u64,
    /// Arrivals below the highest sequence number seen.
    pub reordered: u64,
    /// Gaps above [`UDP_GAP_THRESHOLD_MS`].
    pub gaps: u64,
    /// Longest inter-arrival gap.
    pub max_gap_ms: u64,
    /// Highest sequence number seen.
    pub max_seq: Option<u64>,
    /// Lowest sequence number seen.
    pub min_seq: Option<u64>,
    /// Gaps of at least [`UDP_GAP_LIST_MS`], the first [`UDP_GAP_LIST_MAX`].
    pub gap_list: Vec<UdpGap>,
    last_arrival_ms: Option<u64>,
}

impl UdpAnalyzer {
    /// Account one arrival of `seq` at `now_ms` (any monotonic ms clock).
    pub fn handle_datagram(&mut self, seq: u64, now_ms: u64) {
        self.received += 1;
        if let Some(last) = self.last_arrival_ms {
            let gap = now_ms.saturating_sub(last);
            self.max_gap_ms = self.max_gap_ms.max(gap);
            if gap > UDP_GAP_THRESHOLD_MS {
                self.gaps += 1;
            }
            if gap >= UDP_GAP_LIST_MS && self.gap_list.len() < UDP_GAP_LIST_MAX {
                self.gap_list.push(UdpGap {
                    end_ms: now_ms,
                    gap_ms: gap,
                });
            }
        }
        self.last_arrival_ms = Some(now_ms);
        let dup = if seq < UDP_MAX_TRACKED_SEQ {
            // Fits: seq < 2^26.
            let (word, bit) = ((seq / 64) as usize, seq % 64);
            if self.seen.len() <= word {
                self.seen.resize(word + 1, 0);
            }
            let dup = self.seen[word] & (1 << bit) != 0;
            self.seen[word] |= 1 << bit;
            dup
        } else {
            false
        };
        if dup {
            self.duplicates += 1;
            return;
        }
        self.unique += 1;
        self.min_seq = Some(self.min_seq.map_or(seq, |m| m.min(seq)));
        match self.max_seq {
            Some(m) if seq < m => self.reordered += 1,
            _ => self.max_seq = Some(seq),
        }
    }

    /// Sequence numbers below the highest seen that have not arrived.
    pub fn lost(&self) -> u64 {
        self.max_seq
            .map_or(0, |m| (m + 1).saturating_sub(self.unique))
    }

    fn report(&self, id: u64, done: bool) -> Report {
        Report::Udp {
            id,
            role: Role::Receiver,
            done,
            sent: 0,
            received: self.received,
            lost: self.lost(),
            duplicates: self.duplicates,
            reordered: self.reordered,
            gaps: self.gaps,
            max_gap_ms: self.max_gap_ms,
            max_seq: self.max_seq,
            min_seq: self.min_seq,
            gap_list: if done {
                self.gap_list.clone()
            } else {
                Vec::new()
            },
            socket_drops: 0,
        }
    }
}

/// Receive buffer asked for a probe socket: a TCG guest is descheduled for
/// tens of ms at a time, and at thousands of datagrams per second the
/// default ~208 KiB overflows before the probe reads again, which would
/// count as network loss.
const UDP_RECV_BUFFER: libc::c_int = 16 << 20;

/// Sets a big receive buffer on `sock`, past `rmem_max` if allowed (root).
fn grow_recv_buffer(sock: &UdpSocket) {
    use std::os::fd::AsRawFd;
    let v = UDP_RECV_BUFFER;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt reads a c_int from a live local for the
        // length given; the fd is the socket's own.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

/// `Udp: RcvbufErrors` from `/proc/net/snmp` (0 if unreadable).
fn udp_rcvbuf_errors() -> u64 {
    let Ok(t) = std::fs::read_to_string("/proc/net/snmp") else {
        return 0;
    };
    let mut udp = t.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Send probe datagrams to `dest` at `rate_kbit` for `duration_s`; reports
/// to `sink` every [`REPORT_INTERVAL`] and at the end.
pub fn udp_send(
    id: u64,
    dest: &str,
    rate_kbit: u64,
    payload: u32,
    duration_s: u64,
    sink: &Sender<Report>,
) -> Result<(), NetError> {
    if !(UDP_MIN_PAYLOAD..=UDP_MAX_PAYLOAD).contains(&payload) || rate_kbit == 0 {
        return Err(NetError::Param(format!(
            "payload {payload} must be in {UDP_MIN_PAYLOAD}..={UDP_MAX_PAYLOAD} and rate > 0"
        )));
    }
    let addr = resolve(dest)?;
    let bind = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let sock = UdpSocket::bind(bind).map_err(sock_err(dest))?;
    let interval = Duration::from_secs_f64(f64::from(payload) * 8.0 / (rate_kbit as f64 * 1000.0));
    let mut buf = vec![0u8; payload as usize];
    let start = Instant::now();
    let end = start + Duration::from_secs(duration_s);
    let mut next = start;
    let mut seq = 0u64;
    let mut last_report = start;
    let report = |seq: u64, done: bool| Report::Udp {
        id,
        role: Role::Sender,
        done,
        sent: seq,
        received: 0,
        lost: 0,
        duplicates: 0,
        reordered: 0,
        gaps: 0,
        max_gap_ms: 0,
        max_seq: seq.checked_sub(1),
        min_seq: None,
        gap_list: Vec::new(),
        socket_drops: 0,
    };
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if now < next {
            std::thread::sleep((next - now).min(end - now));
            continue;
        }
        if now - next > UDP_MAX_CATCH_UP {
            next = now;
        }
        encode_udp(&mut buf, seq, sys::monotonic_ns());
        // Send errors (no route while the guest's link is being moved)
        // show up as losses at the receiver; keep going.
        let _ = sock.send_to(&buf, addr);
        seq += 1;
        next += interval;
        if now - last_report >= REPORT_INTERVAL {
            last_report = now;
            let _ = sink.send(report(seq, false));
        }
    }
    let _ = sink.send(report(seq, true));
    Ok(())
}

/// Receive probe datagrams on `bind` for `duration_s` (0 = forever).
pub fn udp_recv(
    id: u64,
    bind: &str,
    duration_s: u64,
    sink: &Sender<Report>,
) -> Result<(), NetError> {
    let sock = UdpSocket::bind(resolve(bind)?).map_err(sock_err(bind))?;
    sock.set_read_timeout(Some(POLL_TIMEOUT))
        .map_err(sock_err(bind))?;
    grow_recv_buffer(&sock);
    let drops_before = udp_rcvbuf_errors();
    let start = Instant::now();
    let end = (duration_s > 0).then(|| start + Duration::from_secs(duration_s));
    let mut a = UdpAnalyzer::default();
    let mut last_report = start;
    let mut buf = vec![0u8; 65_536];
    while end.is_none_or(|e| Instant::now() < e) {
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            if let Some((seq, _ts)) = decode_udp(&buf[..n]) {
                a.handle_datagram(seq, start.elapsed().as_millis() as u64);
            }
        }
        if last_report.elapsed() >= REPORT_INTERVAL {
            last_report = Instant::now();
            let _ = sink.send(with_drops(a.report(id, false), drops_before));
        }
    }
    let _ = sink.send(with_drops(a.report(id, true), drops_before));
    Ok(())
}

/// Fills in a receiver report's `socket_drops` since `before`.
fn with_drops(mut r: Report, before: u64) -> Report {
    if let Report::Udp { socket_drops, .. } = &mut r {
        *socket_drops = udp_rcvbuf_errors().saturating_sub(before);
    }
    r
}

/// Bind a TCP echo server; serves each connection on its own thread until
/// the process exits. Reports an accept and a close per connection.
pub fn tcp_echo_serve(id: u64, bind: &str, sink: Sender<Report>) -> Result<(), NetError> {
    let listener = TcpListener::bind(resolve(bind)?).map_err(sock_err(bind))?;
    std::thread::Builder::new()
        .name("tcp-echo".into())
        .spawn(move || {
            let mut connects = 0u64;
            for conn in listener.incoming() {
                let Ok(mut stream) = conn else { continue };
                connects += 1;
                let sink = sink.clone();
                let _ = std::thread::Builder::new()
                    .name("tcp-echo-conn".into())
                    .spawn(move || {
                        let _ = stream.set_nodelay(true);
                        let mut echoed = 0u64;
                        let mut buf = [0u8; 16 * 1024];
                        let err = loop {
                            match stream.read(&mut buf) {
                                Ok(0) => break None,
                                Ok(n) => {
                                    if let Err(e) = stream.write_all(&buf[..n]) {
                                        break Some(e.to_string());
                                    }
                                    echoed += n as u64;
                                }
                                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                                Err(e) => break Some(e.to_string()),
                            }
                        };
                        let _ = sink.send(Report::Tcp {
                            id,
                            role: Role::Receiver,
                            done: false,
                            connects,
                            resets: u64::from(err.is_some()),
                            sent: 0,
                            echoed,
                            mismatches: 0,
                            max_stall_ms: 0,
                            last_error: err,
                        });
                    });
            }
        })
        .map_err(sock_err(bind))?;
    Ok(())
}

/// Client counters.
#[derive(Debug, Default, Clone)]
struct ClientStats {
    connects: u64,
    resets: u64,
    sent: u64,
    echoed: u64,
    mismatches: u64,
    max_stall_ms: u64,
    last_error: Option<String>,
}

impl ClientStats {
    fn report(&self, id: u64, done: bool) -> Report {
        Report::Tcp {
            id,
            role: Role::Sender,
            done,
            connects: self.connects,
            resets: self.resets,
            sent: self.sent,
            echoed: self.echoed,
            mismatches: self.mismatches,
            max_stall_ms: self.max_stall_ms,
            last_error: self.last_error.clone(),
        }
    }
}

fn tcp_message(seq: u64) -> [u8; TCP_MSG_LEN] {
    let mut m = [b'.'; TCP_MSG_LEN];
    let head = format!("GWT {seq:020} ");
    m[..head.len()].copy_from_slice(head.as_bytes());
    m[TCP_MSG_LEN - 1] = b'\n';
    m
}

/// Send a numbered message every `interval_ms` to the echo server at
/// `dest` for `duration_s`, checking each echo; reconnects on errors.
pub fn tcp_echo_client(
    id: u64,
    dest: &str,
    interval_ms: u64,
    duration_s: u64,
    sink: &Sender<Report>,
) -> Result<(), NetError> {
    let addr = resolve(dest)?;
    let interval = Duration::from_millis(interval_ms);
    let start = Instant::now();
    let end = start + Duration::from_secs(duration_s);
    let mut st = ClientStats::default();
    let mut last_ok = start;
    let mut last_report = start;
    let mut seq = 0u64;
    let mut stream: Option<TcpStream> = None;
    let fail = |st: &mut ClientStats, stream: &mut Option<TcpStream>, e: String| {
        if stream.take().is_some() {
            st.resets += 1;
        }
        st.last_error = Some(e);
        std::thread::sleep(TCP_RECONNECT_DELAY);
    };
    while Instant::now() < end {
        if last_report.elapsed() >= REPORT_INTERVAL {
            last_report = Instant::now();
            let _ = sink.send(st.report(id, false));
        }
        let stall = last_ok.elapsed().as_millis() as u64;
        st.max_stall_ms = st.max_stall_ms.max(stall);
        let Some(s) = stream.as_mut() else {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    let _ = s.set_read_timeout(Some(POLL_TIMEOUT));
                    st.connects += 1;
                    stream = Some(s);
                }
                Err(e) => fail(&mut st, &mut stream, e.to_string()),
            }
            continue;
        };
        let msg = tcp_message(seq);
        if let Err(e) = s.write_all(&msg) {
            fail(&mut st, &mut stream, e.to_string());
            continue;
        }
        st.sent += 1;
        seq += 1;
        // Read the echo, waiting through stalls (a migration pauses the
        // peer for a while; TCP retransmits) until the run ends.
        let mut got = [0u8; TCP_MSG_LEN];
        let mut have = 0;
        let mut err = None;
        while have < TCP_MSG_LEN && Instant::now() < end {
            match s.read(&mut got[have..]) {
                Ok(0) => {
                    err = Some("connection closed by peer".to_string());
                    break;
                }
                Ok(n) => have += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    err = Some(e.to_string());
                    break;
                }
            }
        }
        if let Some(e) = err {
            fail(&mut st, &mut stream, e);
            continue;
        }
        if have < TCP_MSG_LEN {
            break; // Run ended mid-echo.
        }
        if got == msg {
            st.echoed += 1;
        } else {
            st.mismatches += 1;
        }
        let now = Instant::now();
        st.max_stall_ms = st
            .max_stall_ms
            .max(now.duration_since(last_ok).as_millis() as u64);
        last_ok = now;
        let next = now + interval;
        let wait = next.min(end).saturating_duration_since(Instant::now());
        std::thread::sleep(wait);
    }
    let _ = sink.send(st.report(id, true));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn analyzer_counts() {
        let mut a = UdpAnalyzer::default();
        // 0,1,2, (3 lost), 5, 4 (reordered), 4 (dup), 6 after a 300 ms gap.
        for (seq, t) in [
            (0, 0),
            (1, 10),
            (2, 20),
            (5, 30),
            (4, 40),
            (4, 41),
            (6, 341),
        ] {
            a.handle_datagram(seq, t);
        }
        assert_eq!(a.received, 7);
        assert_eq!(a.duplicates, 1);
        assert_eq!(a.reordered, 1);
        assert_eq!(a.lost(), 1);
        assert_eq!(a.max_gap_ms, 300);
        assert_eq!(a.gaps, 1);
        assert_eq!(a.max_seq, Some(6));
        assert_eq!(a.min_seq, Some(0));
        // Gaps of 20 ms and more are listed with when they ended.
        assert_eq!(
            a.gap_list,
            vec![UdpGap {
                end_ms: 341,
                gap_ms: 300
            }]
        );
        let mut buf = [0u8; 100];
        encode_udp(&mut buf, 42, 7);
        assert_eq!(decode_udp(&buf), Some((42, 7)));
        assert_eq!(decode_udp(&buf[..10]), None);
    }

    #[test]
    fn udp_over_loopback() {
        let (tx, rx) = mpsc::channel();
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let bind = format!("127.0.0.1:{port}");
        let rtx = tx.clone();
        let recv = std::thread::spawn(move || udp_recv(2, &bind, 2, &rtx).unwrap());
        std::thread::sleep(Duration::from_millis(100));
        udp_send(1, &format!("127.0.0.1:{port}"), 800, 100, 1, &tx).unwrap();
        recv.join().unwrap();
        let finals: Vec<Report> = rx
            .try_iter()
            .filter(|r| matches!(r, Report::Udp { done: true, .. }))
            .collect();
        let [Report::Udp { sent, .. }, Report::Udp {
            received,
            lost,
            duplicates,
            ..
        }] = finals.as_slice()
        else {
            panic!("{finals:?}")
        };
        // 800 kbit/s of 100-byte datagrams = 1000/s for 1 s.
        assert!((900..=1100).contains(sent), "{sent}");
        assert_eq!((*received, *lost, *duplicates), (*sent, 0, 0));
    }

    #[test]
    fn tcp_echo_over_loopback() {
        let (tx, rx) = mpsc::channel();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        tcp_echo_serve(1, &format!("127.0.0.1:{port}"), tx.clone()).unwrap();
        tcp_echo_client(2, &format!("127.0.0.1:{port}"), 5, 1, &tx).unwrap();
        let last = rx
            .try_iter()
            .filter(|r| matches!(r, Report::Tcp { done: true, .. }))
            .last()
            .unwrap();
        let Report::Tcp {
            connects,
            resets,
            sent,
            echoed,
            mismatches,
            ..
        } = last
        else {
            unreachable!()
        };
        assert_eq!((connects, resets, mismatches), (1, 0, 0));
        assert!(sent > 50 && echoed == sent, "{sent} {echoed}");
        assert_eq!(tcp_message(7).len(), TCP_MSG_LEN);
    }
}
