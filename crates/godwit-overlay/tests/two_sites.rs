//! Two [`OverlaySwitch`]es ("sites" a and b) joined by VXLAN on loopback,
//! with a guest that moves from b to a the way a migrated VM does: the
//! source fences its port, the destination claims and opens a new port at
//! guest's new QEMU. Frames reach the guest at its new place, exactly
//! once, and nothing reaches (or leaves) the stale copy at the old place.
//! No root needed.

mod common;

use bytes::Bytes;
use common::Guest;
use godwit_overlay::frame::{gratuitous_arp, GarpKind};
use godwit_overlay::switch::DropReason;
use godwit_overlay::{
    EthernetFrame, HostId, MacAddr, OverlayEvent, OverlayHandle, OverlayOutputs, OverlaySwitch,
    PortConfig, PortId, PortState, Vni, VxlanConfig, VxlanTransport,
};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// IEEE 802 local experimental EtherType: the test's numbered data frames.
const ETHERTYPE_TEST: u16 = 0x88b5;
const QUIET: Duration = Duration::from_millis(300);
const T: Duration = Duration::from_secs(5);

fn vni() -> Vni {
    Vni::new(42).unwrap()
}

fn mac(n: u8) -> MacAddr {
    MacAddr([0x52, 0x54, 0, 0, 0, n])
}

fn ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 42, 0, n)
}

fn cfg(n: u8) -> PortConfig {
    PortConfig {
        vni: vni(),
        mac: mac(n),
        allow_other_sources: false,
    }
}

/// A numbered data frame.
fn data(dst: MacAddr, src: MacAddr, id: u32) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ETHERTYPE_TEST.to_be_bytes());
    f.extend_from_slice(&id.to_be_bytes());
    f.resize(60, 0);
    f
}

/// The ids of the data frames among `frames`.
fn ids(frames: &[Bytes]) -> Vec<u32> {
    let mut v: Vec<u32> = frames
        .iter()
        .filter_map(|f| {
            let e = EthernetFrame::parse(f).ok()?;
            let p = e.payload();
            (e.ethertype() == ETHERTYPE_TEST).then(|| u32::from_be_bytes([p[0], p[1], p[2], p[3]]))
        })
        .collect();
    v.sort_unstable();
    v
}

/// The control plane between sites: every registry update a site pushes
/// is applied by the others, in order. Other events are forwarded to the
/// returned channel.
fn wire_control(
    sites: Vec<(HostId, OverlayOutputs, OverlayHandle)>,
) -> mpsc::UnboundedReceiver<(HostId, OverlayEvent)> {
    let (tx, rx) = mpsc::unbounded_channel();
    for (host, mut out, peer) in sites {
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(ev) = out.events.recv().await {
                match ev {
                    OverlayEvent::Push(u) => {
                        let _ = peer.apply_update(host.clone(), u).await;
                    }
                    other => {
                        let _ = tx.send((host.clone(), other));
                    }
                }
            }
        });
    }
    rx
}

/// Waits until `site`'s registry places `m` at `host`.
async fn wait_location(site: &OverlayHandle, m: MacAddr, host: &str) {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let st = site.status().await.unwrap();
        if st
            .switch
            .locations
            .iter()
            .any(|e| e.mac == m && e.location.host.as_str() == host)
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{m} never at {host}: {:?}",
            st.switch.locations
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_moves_between_sites_and_nothing_arrives_twice() {
    // The VXLAN sockets: two loopback addresses, so each peer is known by
    // its IP.
    let sa = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let sb = std::net::UdpSocket::bind("127.0.0.2:0").unwrap();
    let (addr_a, addr_b) = (sa.local_addr().unwrap(), sb.local_addr().unwrap());
    let peers = |site: &str, addr| VxlanConfig {
        peers: BTreeMap::from([(HostId::new(site), addr)]),
        ..VxlanConfig::new()
    };
    let (ta, ra) = VxlanTransport::from_socket(sa, peers("b", addr_b)).unwrap();
    let (tb, rb) = VxlanTransport::from_socket(sb, peers("a", addr_a)).unwrap();
    let (ta, tb) = (Arc::new(ta), Arc::new(tb));
    let (a, out_a) = OverlaySwitch::spawn(HostId::new("a"), ta.clone());
    let (b, out_b) = OverlaySwitch::spawn(HostId::new("b"), tb.clone());
    tokio::spawn(ra.run(a.remote_sink()));
    tokio::spawn(rb.run(b.remote_sink()));
    a.add_remote(vni(), HostId::new("b")).await.unwrap();
    b.add_remote(vni(), HostId::new("a")).await.unwrap();
    let mut events = wire_control(vec![
        (HostId::new("a"), out_a, b.clone()),
        (HostId::new("b"), out_b, a.clone()),
    ]);

    // Guest 1 on a; guest 2 (the one that moves) and guest 3 on b.
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    a.add_stream_port(PortId(1), cfg(1), PortState::Open, p("a1"))
        .await
        .unwrap();
    b.add_stream_port(PortId(2), cfg(2), PortState::Open, p("b2"))
        .await
        .unwrap();
    b.add_stream_port(PortId(3), cfg(3), PortState::Open, p("b3"))
        .await
        .unwrap();
    let mut g1 = Guest::serve(Path::new(&p("a1")), mac(1), ip(1)).await;
    let mut g2_old = Guest::serve(Path::new(&p("b2")), mac(2), ip(2)).await;
    let mut g3 = Guest::serve(Path::new(&p("b3")), mac(3), ip(3)).await;

    // Each guest announces itself; the registries learn and sync.
    for g in [&mut g1, &mut g2_old, &mut g3] {
        let garp = gratuitous_arp(g.mac, g.ip, GarpKind::Request, None);
        g.send(&garp).await;
    }
    wait_location(&a, mac(2), "b").await;
    wait_location(&a, mac(3), "b").await;
    wait_location(&b, mac(1), "a").await;
    for g in [&mut g1, &mut g2_old, &mut g3] {
        g.drain(QUIET).await;
    }

    // Before the move: guest 1 reaches guest 2 across the overlay.
    for id in 1..=5 {
        g1.send(&data(mac(2), mac(1), id)).await;
    }
    assert_eq!(ids(&g2_old.drain(QUIET).await), vec![1, 2, 3, 4, 5]);
    assert_eq!(ids(&g3.drain(Duration::ZERO).await), Vec::<u32>::new());

    // The move: a new pending port on a that connects to the arriving guest, the
    // source fences, the destination claims and then opens.
    a.add_stream_port(PortId(4), cfg(2), PortState::Pending, p("a4"))
        .await
        .unwrap();
    let mut g2_new = Guest::serve(Path::new(&p("a4")), mac(2), ip(2)).await;
    b.fence(PortId(2)).await.unwrap();
    a.claim(PortId(4), vec![IpAddr::V4(ip(2))]).await.unwrap();
    wait_location(&b, mac(2), "a").await;
    a.open(PortId(4)).await.unwrap();

    // After: guest 1 (same site) and guest 3 (other site) reach guest 2 at
    // its new place; a broadcast from guest 3 reaches it once. The stale
    // copy at b still sends, and none of it goes anywhere.
    for id in 6..=10 {
        g1.send(&data(mac(2), mac(1), id)).await;
    }
    for id in 11..=15 {
        g3.send(&data(mac(2), mac(3), id)).await;
    }
    g3.send(&data(MacAddr::BROADCAST, mac(3), 16)).await;
    for id in 100..=104 {
        g2_old.send(&data(mac(1), mac(2), id)).await;
        g2_old
            .send(&data(MacAddr::BROADCAST, mac(2), id + 100))
            .await;
    }
    let got_new = g2_new.drain(QUIET).await;
    assert_eq!(
        ids(&got_new),
        (6..=16).collect::<Vec<_>>(),
        "each exactly once"
    );
    assert_eq!(
        ids(&g2_old.drain(QUIET).await),
        Vec::<u32>::new(),
        "fenced copy"
    );
    let got1 = g1.drain(QUIET).await;
    assert_eq!(ids(&got1), vec![16], "nothing from the stale copy");
    assert_eq!(ids(&g3.drain(QUIET).await), Vec::<u32>::new());
    // Opening the port announced the guest's address (GARP) from a.
    assert!(got1.iter().any(|f| {
        EthernetFrame::parse(f).is_ok_and(|e| {
            e.src() == mac(2) && e.arp().ok().flatten().is_some_and(|a| a.is_gratuitous())
        })
    }));

    // The moved guest talks from its new place; the reply path works too.
    g2_new.send(&data(mac(3), mac(2), 17)).await;
    assert_eq!(ids(&g3.drain(QUIET).await), vec![17]);

    let sb = b.status().await.unwrap();
    assert_eq!(sb.switch.stats.drops.get(DropReason::FencedSource), 10);
    let sa = a.status().await.unwrap();
    assert_eq!(sa.switch.stats.claims, 1);
    assert_eq!(sa.switch.stats.opens, 1);
    assert_eq!((ta.stats().malformed, tb.stats().malformed), (0, 0));
    // b learnt the move from the claim, after fencing the port itself: no
    // PortFenced event (that is for a claim that surprises the source).
    while let Ok((host, ev)) = events.try_recv() {
        assert!(
            !matches!(ev, OverlayEvent::PortFenced { .. }),
            "{host}: {ev:?}"
        );
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
