//! Helpers of the shell's integration tests: a test-side "guest" that speaks
//! QEMU's stream framing, hand-built IPv4/ICMP packets, and network
//! namespaces that are removed even when a test panics.
#![allow(dead_code)] // each test binary uses a different subset

use bytes::{Bytes, BytesMut};
use godwit_overlay::frame::{arp_reply, ArpOp, ETHERTYPE_IPV4};
use godwit_overlay::{EthernetFrame, MacAddr, StreamCodec, StreamDecoder};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// A guest NIC as QEMU's `-netdev stream,server=on` sees it.
pub struct Guest {
    s: UnixStream,
    dec: StreamDecoder,
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
}

impl Guest {
    /// Listens at `path` as QEMU does and takes the switch port's
    /// connection (the port keeps dialling until something listens).
    pub async fn serve(path: &std::path::Path, mac: MacAddr, ip: Ipv4Addr) -> Self {
        let listener = tokio::net::UnixListener::bind(path).expect("listen as QEMU");
        let (s, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
            .await
            .expect("the port connects within 5 s")
            .expect("accept the port");
        Self {
            s,
            dec: StreamDecoder::new(),
            mac,
            ip,
        }
    }

    pub async fn send(&mut self, frame: &[u8]) {
        let mut out = BytesMut::new();
        StreamCodec::encode(frame, &mut out).expect("encodable frame");
        self.s.write_all(&out).await.expect("write to port");
    }

    /// The next frame, or `None` on timeout or EOF.
    pub async fn recv(&mut self, timeout: Duration) -> Option<Bytes> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut buf = [0u8; 16384];
        loop {
            if let Some(f) = self.dec.poll_frame() {
                return Some(f);
            }
            let n = tokio::time::timeout_at(deadline, self.s.read(&mut buf))
                .await
                .ok()?
                .ok()?;
            if n == 0 {
                return None;
            }
            self.dec
                .handle_input(&buf[..n])
                .expect("valid stream records");
        }
    }

    /// Receives until `want` matches, answering ARP and ping on the way
    /// like a guest's stack would.
    pub async fn recv_until(
        &mut self,
        timeout: Duration,
        mut want: impl FnMut(&[u8]) -> bool,
    ) -> Option<Bytes> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let f = self.recv(left).await?;
            if let Some(reply) = self.answer(&f) {
                self.send(&reply).await;
            }
            if want(&f) {
                return Some(f);
            }
        }
    }

    /// Every frame received within `window`.
    pub async fn drain(&mut self, window: Duration) -> Vec<Bytes> {
        let deadline = tokio::time::Instant::now() + window;
        let mut v = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return v;
            }
            match self.recv(left).await {
                Some(f) => v.push(f),
                None => return v,
            }
        }
    }

    /// The reply a guest stack gives to `frame`: ARP for its IP, ICMP echo.
    pub fn answer(&self, frame: &[u8]) -> Option<Vec<u8>> {
        let eth = EthernetFrame::parse(frame).ok()?;
        if let Ok(Some(arp)) = eth.arp() {
            if arp.op == ArpOp::Request && arp.tpa == self.ip && arp.spa != self.ip {
                return Some(arp_reply(self.mac, self.ip, arp.sha, arp.spa, None));
            }
            return None;
        }
        let echo = parse_icmp_echo(frame)?;
        if echo.kind != ICMP_ECHO_REQUEST || echo.dst != self.ip {
            return None;
        }
        Some(icmp_echo(
            self.mac,
            eth.src(),
            self.ip,
            echo.src,
            ICMP_ECHO_REPLY,
            echo.id,
            echo.seq,
            &echo.payload,
        ))
    }
}

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO_REQUEST: u8 = 8;

/// RFC 1071 Internet checksum.
pub fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet/IPv4/ICMP echo request or reply, checksums included.
#[allow(clippy::too_many_arguments)]
pub fn icmp_echo(
    src_mac: MacAddr,
    dst_mac: MacAddr,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    kind: u8,
    id: u16,
    seq: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut icmp = vec![kind, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(payload);
    let c = inet_checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 1, 0, 0]); // id 0, DF, TTL 64, ICMP
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = inet_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::with_capacity(14 + ip.len() + icmp.len());
    f.extend_from_slice(&dst_mac.0);
    f.extend_from_slice(&src_mac.0);
    f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

pub struct IcmpEcho {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub kind: u8,
    pub id: u16,
    pub seq: u16,
    pub payload: Vec<u8>,
}

/// An ICMP echo (request or reply) in an untagged IPv4 frame, with both
/// checksums verified.
pub fn parse_icmp_echo(frame: &[u8]) -> Option<IcmpEcho> {
    let eth = EthernetFrame::parse(frame).ok()?;
    if eth.ethertype() != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = eth.payload();
    let ihl = usize::from(*ip.first()? & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    if ip.len() < total || total < ihl + 8 || *ip.get(9)? != 1 {
        return None;
    }
    assert_eq!(inet_checksum(&ip[..ihl]), 0, "IPv4 header checksum");
    let icmp = &ip[ihl..total];
    assert_eq!(inet_checksum(icmp), 0, "ICMP checksum");
    if icmp[0] != ICMP_ECHO_REQUEST && icmp[0] != ICMP_ECHO_REPLY {
        return None;
    }
    Some(IcmpEcho {
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        kind: icmp[0],
        id: u16::from_be_bytes([icmp[4], icmp[5]]),
        seq: u16::from_be_bytes([icmp[6], icmp[7]]),
        payload: icmp[8..].to_vec(),
    })
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a command, panicking with its stderr if it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Two namespaces `a` (10.99.0.1/24) and `b` (10.99.0.2/24) joined by a
/// veth pair (`veth0` in each); deleted on drop, panics included.
pub struct TwoNs {
    pub a: String,
    pub b: String,
}

impl TwoNs {
    pub fn new(tag: &str) -> Self {
        let pid = std::process::id();
        let ns = Self {
            a: format!("gwo-{tag}-{pid}-a"),
            b: format!("gwo-{tag}-{pid}-b"),
        };
        // Created one by one so that the guard exists (and cleans up)
        // whatever step fails.
        sh(&["ip", "netns", "add", &ns.a]);
        sh(&["ip", "netns", "add", &ns.b]);
        sh(&[
            "ip", "link", "add", "veth0", "netns", &ns.a, "type", "veth", "peer", "name", "veth0",
            "netns", &ns.b,
        ]);
        for (n, ip) in [(&ns.a, "10.99.0.1/24"), (&ns.b, "10.99.0.2/24")] {
            sh(&["ip", "-n", n, "addr", "add", ip, "dev", "veth0"]);
            sh(&["ip", "-n", n, "link", "set", "veth0", "up"]);
            sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
        }
        ns
    }
}

impl Drop for TwoNs {
    fn drop(&mut self) {
        for n in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// Runs `f` on a thread inside namespace `ns`: sockets it creates stay in
/// that namespace (a network namespace is per thread).
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("open netns");
            // SAFETY: setns only reads the fd and moves this thread only,
            // which ends when the scope does.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread")
    })
}

/// What [`kernel_ping`] saw.
#[derive(Debug, Default)]
pub struct PingReport {
    pub sent: u16,
    pub received: u16,
}

/// `ping -c count dst` done by the kernel stack of namespace `ns` through
/// a raw ICMP socket (iputils is not installed everywhere): the kernel
/// resolves `dst` with ARP, routes and builds the IP header; we check the
/// echo replies. Blocking; run it with `spawn_blocking`.
pub fn kernel_ping(ns: &str, dst: Ipv4Addr, count: u16, timeout: Duration) -> PingReport {
    in_netns(ns, || {
        // SAFETY: plain socket(2) call; the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh socket nobody else owns.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: `tv` outlives the call and its size is passed.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.octets()),
            },
            sin_zero: [0; 8],
        };
        let id = (std::process::id() & 0xffff) as u16;
        let mut rep = PingReport::default();
        for seq in 1..=count {
            let mut icmp = vec![ICMP_ECHO_REQUEST, 0, 0, 0];
            icmp.extend_from_slice(&id.to_be_bytes());
            icmp.extend_from_slice(&seq.to_be_bytes());
            icmp.extend_from_slice(&[0xa5; 48]);
            let c = inet_checksum(&icmp);
            icmp[2..4].copy_from_slice(&c.to_be_bytes());
            // SAFETY: buffer and address are valid for the given lengths.
            let n = unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    icmp.as_ptr().cast(),
                    icmp.len(),
                    0,
                    (&addr as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            assert_eq!(
                n,
                icmp.len() as isize,
                "sendto: {}",
                std::io::Error::last_os_error()
            );
            rep.sent += 1;
            let deadline = std::time::Instant::now() + timeout;
            let mut buf = [0u8; 1500];
            while std::time::Instant::now() < deadline {
                // SAFETY: `buf` is valid for its length.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                let Ok(n) = usize::try_from(n) else { continue };
                // A raw socket gets the IP header too.
                let ihl = usize::from(buf[0] & 0x0f) * 4;
                let Some(m) = buf.get(ihl..n) else { continue };
                if m.len() >= 8
                    && m[0] == ICMP_ECHO_REPLY
                    && buf[12..16] == dst.octets()
                    && m[4..6] == id.to_be_bytes()
                    && m[6..8] == seq.to_be_bytes()
                    && inet_checksum(m) == 0
                {
                    rep.received += 1;
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        rep
    })
}
