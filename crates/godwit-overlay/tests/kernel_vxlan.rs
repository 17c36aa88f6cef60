//! RFC 7348 interop with the real Linux `vxlan` device.
//!
//! Namespace `a` runs an [`OverlaySwitch`] with a [`VxlanTransport`] on
//! 10.99.0.1:4789 and one stream port, whose QEMU side is played by the test
//! (a "guest" at 52:54:00:00:00:01 / 192.168.42.1). Namespace `b` has a
//! kernel `vxlan` device (VNI 42, dstport 4789, nolearning, remote
//! 10.99.0.1) with 192.168.42.2/24. Needs root (namespaces, `ip`).

mod common;

use common::*;
use godwit_overlay::frame::{arp_request, ArpOp};
use godwit_overlay::switch::DropReason;
use godwit_overlay::{
    EthernetFrame, HostId, MacAddr, OverlayHandle, OverlayOutputs, OverlaySwitch, PortConfig,
    PortId, PortState, Vni, VxlanConfig, VxlanStats, VxlanTransport,
};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const GUEST_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 1]);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 42, 1);
const KERNEL_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 42, 2);
const T: Duration = Duration::from_secs(5);

struct Site {
    _ns: TwoNs,
    _dir: tempfile::TempDir,
    h: OverlayHandle,
    out: OverlayOutputs,
    transport: Arc<VxlanTransport>,
    guest: Guest,
    b: String,
}

/// The namespaces, the kernel VTEP in `b`, the switch in `a` and the
/// connected test guest.
async fn setup(tag: &str) -> Site {
    let ns = TwoNs::new(tag);
    let b = ns.b.clone();
    sh(&[
        "ip",
        "-n",
        &b,
        "link",
        "add",
        "vx0",
        "type",
        "vxlan",
        "id",
        "42",
        "dstport",
        "4789",
        "local",
        "10.99.0.2",
        "remote",
        "10.99.0.1",
        "nolearning",
    ]);
    sh(&[
        "ip",
        "-n",
        &b,
        "addr",
        "add",
        "192.168.42.2/24",
        "dev",
        "vx0",
    ]);
    sh(&["ip", "-n", &b, "link", "set", "vx0", "up"]);

    let kernel = HostId::new("kernel");
    let cfg = VxlanConfig::new().peer(kernel.clone(), IpAddr::V4(Ipv4Addr::new(10, 99, 0, 2)));
    // The sockets must live in namespace `a`.
    let (transport, receiver) = in_netns(&ns.a, move || {
        VxlanTransport::bind(SocketAddr::from(([10, 99, 0, 1], 4789)), cfg)
    })
    .expect("bind VXLAN in ns a");
    let transport = Arc::new(transport);
    let (h, out) = OverlaySwitch::spawn(HostId::new("site-a"), transport.clone());
    let vni = Vni::new(42).unwrap();
    h.add_remote(vni, kernel).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("net0.sock");
    h.add_stream_port(
        PortId(1),
        PortConfig {
            vni,
            mac: GUEST_MAC,
            allow_other_sources: false,
        },
        PortState::Open,
        &path,
    )
    .await
    .unwrap();
    tokio::spawn(receiver.run(h.remote_sink()));
    let guest = Guest::serve(Path::new(&path), GUEST_MAC, GUEST_IP).await;
    Site {
        _ns: ns,
        _dir: dir,
        h,
        out,
        transport,
        guest,
        b,
    }
}

/// `ip -s` counters of vx0 in namespace `b`: (rx packets, tx packets,
/// rx errors, rx dropped).
fn vx0_counters(b: &str) -> (u64, u64, u64, u64) {
    let j = sh(&["ip", "-n", b, "-j", "-s", "link", "show", "dev", "vx0"]);
    let v: serde_json::Value = serde_json::from_str(&j).expect("ip -j output");
    let s = &v[0]["stats64"];
    let g = |dir: &str, k: &str| {
        s[dir][k]
            .as_u64()
            .unwrap_or_else(|| panic!("{dir}.{k} in {j}"))
    };
    (
        g("rx", "packets"),
        g("tx", "packets"),
        g("rx", "errors"),
        g("rx", "dropped"),
    )
}

/// Nothing on our side was refused: every datagram from the kernel was
/// valid VXLAN from the configured peer.
async fn assert_clean(site: &Site) {
    let VxlanStats {
        received,
        malformed,
        unknown_peer,
        send_errors,
        ..
    } = site.transport.stats();
    assert!(received > 0);
    assert_eq!((malformed, unknown_peer, send_errors), (0, 0, 0));
    let st = site.h.status().await.unwrap();
    for r in [
        DropReason::Malformed,
        DropReason::UnknownRemote,
        DropReason::BadSource,
    ] {
        assert_eq!(st.switch.stats.drops.get(r), 0, "{r:?}");
    }
    // nolearning: the kernel holds only the default flood entry, no guest
    // MAC.
    let fdb = sh(&["bridge", "-n", &site.b, "fdb", "show", "dev", "vx0"]);
    assert!(fdb.contains("00:00:00:00:00:00 dst 10.99.0.1"), "{fdb}");
    assert!(!fdb.contains("52:54:00:00:00:01"), "{fdb}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_pings_kernel_vxlan() {
    if !is_root() {
        eprintln!("SKIPPED guest_pings_kernel_vxlan: needs root for network namespaces");
        return;
    }
    let mut site = setup("g2k").await;
    let before = vx0_counters(&site.b);

    site.guest
        .send(&arp_request(GUEST_MAC, GUEST_IP, KERNEL_IP, None))
        .await;
    let reply = site
        .guest
        .recv_until(T, |f| {
            EthernetFrame::parse(f)
                .ok()
                .and_then(|e| e.arp().ok().flatten())
                .is_some_and(|a| a.op == ArpOp::Reply && a.spa == KERNEL_IP && a.tha == GUEST_MAC)
        })
        .await
        .expect("kernel's ARP reply through the switch");
    let eth = EthernetFrame::parse(&reply).unwrap();
    let arp = eth.arp().unwrap().unwrap();
    assert_eq!(eth.dst(), GUEST_MAC);
    let kernel_mac = arp.sha;

    for seq in 1..=3u16 {
        let payload: Vec<u8> = (0..56u8).map(|i| i ^ seq as u8).collect();
        site.guest
            .send(&icmp_echo(
                GUEST_MAC,
                kernel_mac,
                GUEST_IP,
                KERNEL_IP,
                ICMP_ECHO_REQUEST,
                0x6764,
                seq,
                &payload,
            ))
            .await;
        let r = site
            .guest
            .recv_until(T, |f| {
                parse_icmp_echo(f).is_some_and(|e| e.kind == ICMP_ECHO_REPLY && e.seq == seq)
            })
            .await
            .unwrap_or_else(|| panic!("echo reply {seq}"));
        let e = parse_icmp_echo(&r).unwrap();
        assert_eq!((e.src, e.dst, e.id), (KERNEL_IP, GUEST_IP, 0x6764));
        assert_eq!(e.payload, payload);
        assert_eq!(EthernetFrame::parse(&r).unwrap().src(), kernel_mac);
    }

    let after = vx0_counters(&site.b);
    assert!(after.0 >= before.0 + 4, "vx0 rx {before:?} -> {after:?}");
    assert!(after.1 >= before.1 + 4, "vx0 tx {before:?} -> {after:?}");
    assert_eq!((after.2, after.3), (0, 0), "vx0 rx errors/dropped");
    assert_clean(&site).await;
    site.h.shutdown().await.unwrap();
    site.out.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_pings_guest_through_the_switch() {
    if !is_root() {
        eprintln!(
            "SKIPPED kernel_pings_guest_through_the_switch: needs root for network namespaces"
        );
        return;
    }
    let mut site = setup("k2g").await;
    let b = site.b.clone();
    let guest = &mut site.guest;
    // `ping -c 3 192.168.42.1` from namespace b's kernel stack.
    let ping = tokio::task::spawn_blocking(move || kernel_ping(&b, GUEST_IP, 3, T));
    // The guest answers ARP and echo requests while ping runs.
    let answered = async {
        let mut echoes = 0;
        while echoes < 3 {
            if guest
                .recv_until(T, |f| {
                    parse_icmp_echo(f).is_some_and(|e| e.kind == ICMP_ECHO_REQUEST)
                })
                .await
                .is_none()
            {
                break;
            }
            echoes += 1;
        }
        echoes
    };
    let (report, echoes) = tokio::join!(ping, answered);
    let report = report.expect("ping thread");
    assert_eq!((report.sent, report.received), (3, 3), "0% loss expected");
    assert_eq!(echoes, 3);
    assert_eq!(vx0_counters(&site.b).2, 0);
    assert_clean(&site).await;
    site.h.shutdown().await.unwrap();
}
