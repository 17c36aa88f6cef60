//! The host side of the distributed gateway: a TAP device that hands the
//! frames guests send to the gateway MAC to this host's kernel, which
//! routes them out of the overlay, and brings the kernel's frames for
//! guests back into the switch.
//!
//! Every agent creates the same device, with the same MAC and addresses
//! (`[network] gateway_ips`), so a guest's default route works wherever it
//! runs and its traffic leaves the overlay at the site it runs at (no
//! triangle through a home site). Traffic from outside to a guest enters
//! at whichever site the outside network routes the guest subnet to; the
//! kernel there resolves the guest through the switch, which answers from
//! the location registry ([`crate::switch`]), and the frame crosses the
//! overlay to wherever the guest is now. Nothing is translated: addresses
//! and connections stay valid across moves (reference network-continuity
//! §4 row 10: per-host NAT breaks them).
//!
//! The device lives as long as [`TapRouter`]: a crashed agent leaves no
//! stale gateway behind. Its MTU is the overlay's frame limit, so the
//! kernel fragments or sends "fragmentation needed" to outside senders
//! instead of emitting frames the overlay would drop (§4 row 11).

use crate::frame::MacAddr;
use crate::shell::{OverlayError, RouteSink, RoutedFrame};
use crate::vxlan::Vni;
use bytes::Bytes;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// Largest frame read from the device: more than any MTU it is given.
const READ_BUF: usize = 65_536;

/// What the router's device looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterConfig {
    /// Interface name (at most 15 bytes).
    pub device: String,
    /// The network it routes for.
    pub vni: Vni,
    /// The gateway MAC (the same at every site).
    pub mac: MacAddr,
    /// The gateway addresses with their prefix lengths: the prefixes
    /// become the host's connected routes to the guest subnets.
    pub addrs: Vec<(IpAddr, u8)>,
    /// The device MTU: the largest IP packet a guest frame may carry.
    pub mtu: u32,
}

/// Counters of the router, shared with its task.
#[derive(Debug, Default)]
struct Counters {
    to_host: AtomicU64,
    from_host: AtomicU64,
    other_network: AtomicU64,
    sink_full: AtomicU64,
    write_errors: AtomicU64,
}

/// A snapshot of the router's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RouterStats {
    /// The device.
    pub device: String,
    /// Frames written to the host kernel.
    pub to_host: u64,
    /// Frames the host kernel sent into the network.
    pub from_host: u64,
    /// Routed frames of a network this router does not serve (dropped).
    pub other_network: u64,
    /// Frames from the kernel dropped because the switch was behind.
    pub sink_full: u64,
    /// Frames the kernel refused (device down, queue full).
    pub write_errors: u64,
}

/// A running router: the device and the task that pumps it.
#[derive(Debug)]
pub struct TapRouter {
    device: String,
    counters: Arc<Counters>,
    task: JoinHandle<()>,
}

impl Drop for TapRouter {
    fn drop(&mut self) {
        // The task owns the fd: ending it removes the device.
        self.task.abort();
    }
}

impl TapRouter {
    /// Creates and configures the device in the current network namespace
    /// and starts pumping: frames from `routed` to the kernel, the
    /// kernel's frames into `sink`.
    pub async fn start(
        cfg: RouterConfig,
        mut routed: mpsc::Receiver<RoutedFrame>,
        sink: RouteSink,
    ) -> Result<TapRouter, OverlayError> {
        let fd = godwit_tun::open(&cfg.device, godwit_tun::Mode::Tap)
            .map_err(|e| router_error(&cfg.device, "creating the TAP device", e))?;
        configure(&cfg).await?;
        // SAFETY: the File owns the fd and moves into the AsyncFd, so the
        // fd stays open and the same for the AsyncFd's whole life.
        let afd = unsafe { AsyncFd::register(File::from(fd)) }
            .map_err(|e| router_error(&cfg.device, "polling the TAP device", e.into()))?;
        if !forwarding_on(&cfg.addrs) {
            warn!(
                device = cfg.device,
                "IP forwarding is off in this namespace: guests reach this host's \
                 gateway addresses but nothing beyond (sysctl net.ipv4.ip_forward=1, \
                 net.ipv6.conf.all.forwarding=1)"
            );
        }
        info!(device = cfg.device, mac = %cfg.mac, addrs = ?cfg.addrs, mtu = cfg.mtu, "gateway router up");
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let vni = cfg.vni;
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; READ_BUF];
            loop {
                tokio::select! {
                    f = routed.recv() => {
                        let Some(RoutedFrame { vni: v, frame }) = f else { break };
                        if v != vni {
                            c.other_network.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        // A TAP write takes one whole frame or refuses it
                        // at once (it never writes part of one).
                        match afd.get_ref().write(&frame) {
                            Ok(n) if n == frame.len() => c.to_host.fetch_add(1, Ordering::Relaxed),
                            _ => c.write_errors.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                    ready = afd.readable() => {
                        let Ok(mut guard) = ready else { break };
                        loop {
                            match guard.try_io(|f| f.get_ref().read(&mut buf)) {
                                Ok(Ok(n)) if n > 0 => {
                                    c.from_host.fetch_add(1, Ordering::Relaxed);
                                    let frame = Bytes::copy_from_slice(&buf[..n]);
                                    match sink.route_in(vni, frame) {
                                        Ok(()) => {}
                                        Err(OverlayError::Stopped) => return,
                                        Err(_) => {
                                            c.sink_full.fetch_add(1, Ordering::Relaxed);
                                        }
                                    }
                                }
                                Ok(Ok(_)) => break,
                                Ok(Err(e)) => {
                                    warn!(cause = %e, "reading the gateway device");
                                    break;
                                }
                                Err(_would_block) => break,
                            }
                        }
                    }
                }
            }
        });
        Ok(TapRouter {
            device: cfg.device,
            counters,
            task,
        })
    }

    /// The counters.
    pub fn stats(&self) -> RouterStats {
        let c = &self.counters;
        RouterStats {
            device: self.device.clone(),
            to_host: c.to_host.load(Ordering::Relaxed),
            from_host: c.from_host.load(Ordering::Relaxed),
            other_network: c.other_network.load(Ordering::Relaxed),
            sink_full: c.sink_full.load(Ordering::Relaxed),
            write_errors: c.write_errors.load(Ordering::Relaxed),
        }
    }
}

/// Sets the MAC, MTU, addresses and routes and brings the device up, with
/// iproute2 (present on every host that runs QEMU networking).
///
/// The gateway address is the same at every site, so the host must never
/// use it as the source of its own traffic to guests: a guest's reply
/// would reach whichever site it runs at, which knows nothing of the
/// connection and resets it. Hence the address is host-scoped (IPv4) or
/// deprecated (IPv6), both of which source selection skips, and the guest
/// subnet is an explicit route rather than the address's prefix route: the
/// host talks to guests from its own addresses.
async fn configure(cfg: &RouterConfig) -> Result<(), OverlayError> {
    let dev = cfg.device.as_str();
    let mac = cfg.mac.to_string();
    let mtu = cfg.mtu.to_string();
    ip(
        dev,
        &["link", "set", "dev", dev, "address", &mac, "mtu", &mtu],
    )
    .await?;
    ip(dev, &["link", "set", "dev", dev, "up"]).await?;
    for (addr, len) in &cfg.addrs {
        let (host, net) = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(*len)).unwrap_or(0);
                let net = std::net::Ipv4Addr::from(u32::from(*a) & mask);
                (format!("{a}/32"), format!("{net}/{len}"))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(*len)).unwrap_or(0);
                let net = std::net::Ipv6Addr::from(u128::from(*a) & mask);
                (format!("{a}/128"), format!("{net}/{len}"))
            }
        };
        let mut argv = vec!["addr", "replace", host.as_str(), "dev", dev];
        if addr.is_ipv4() {
            argv.extend(["scope", "host"]);
        } else {
            // Every site holds the same address: duplicate address
            // detection would only ever find another site's copy.
            argv.extend(["nodad", "preferred_lft", "0"]);
        }
        ip(dev, &argv).await?;
        if (addr.is_ipv4() && *len < 32) || (addr.is_ipv6() && *len < 128) {
            ip(dev, &["route", "replace", net.as_str(), "dev", dev]).await?;
        }
    }
    Ok(())
}

async fn ip(dev: &str, args: &[&str]) -> Result<(), OverlayError> {
    let out = tokio::process::Command::new("ip")
        .args(args)
        .output()
        .await
        .map_err(|e| router_error(dev, "running ip (iproute2)", e))?;
    if out.status.success() {
        return Ok(());
    }
    Err(router_error(
        dev,
        "configuring the TAP device",
        io::Error::other(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    ))
}

/// Whether the kernel forwards the families of `addrs`.
fn forwarding_on(addrs: &[(IpAddr, u8)]) -> bool {
    let on = |p: &str| std::fs::read_to_string(p).is_ok_and(|v| v.trim() == "1");
    let v4 = !addrs.iter().any(|(a, _)| a.is_ipv4()) || on("/proc/sys/net/ipv4/ip_forward");
    let v6 =
        !addrs.iter().any(|(a, _)| a.is_ipv6()) || on("/proc/sys/net/ipv6/conf/all/forwarding");
    v4 && v6
}

fn router_error(device: &str, what: &'static str, source: io::Error) -> OverlayError {
    OverlayError::Router {
        device: device.to_owned(),
        what,
        source,
    }
}
