//! Loopback tests of the transport: authentication, stream purposes,
//! connection reuse, runtime peer updates, shutdown.

mod common;

use std::time::Duration;

use common::{endpoint, pair, spawn_echo, TestResult};
use godwit_transport::{Congestion, Identity, StreamPurpose, TransportError};

const TIMEOUT: Duration = Duration::from_secs(10);

async fn echo(
    conn: &godwit_transport::PeerConnection,
    purpose: StreamPurpose,
    payload: &[u8],
) -> Result<Vec<u8>, Box<dyn std::error::Error + Send + Sync>> {
    let (mut send, mut recv) = conn.open(purpose).await?;
    send.write_all(payload).await?;
    send.finish()?;
    Ok(recv.read_to_end(1 << 20).await?)
}

#[tokio::test]
async fn streams_of_every_purpose_echo_both_ways() -> TestResult {
    let p = pair(Congestion::default()).await;
    let a_addr = p.a.local_addr()?;
    let b_addr = p.b.local_addr()?;
    let _echo_a = spawn_echo(p.a_in);
    let _echo_b = spawn_echo(p.b_in);

    let ab = tokio::time::timeout(TIMEOUT, p.a.connection("b", b_addr)).await??;
    assert_eq!(ab.peer(), "b");
    for purpose in StreamPurpose::ALL {
        let payload = format!("hello over {purpose}").into_bytes();
        let reply = echo(&ab, purpose, &payload).await?;
        assert_eq!(reply[0], purpose.to_byte(), "{purpose}");
        assert_eq!(&reply[1..], &payload[..], "{purpose}");
    }

    // b asks for a connection to a: it reuses the one a dialled (b is its
    // server side) instead of dialling back.
    let ba = tokio::time::timeout(TIMEOUT, p.b.connection("a", a_addr)).await??;
    assert_eq!(ba.peer(), "a");
    assert_eq!(ba.quic().side(), quinn::Side::Server);
    for purpose in StreamPurpose::ALL {
        let reply = echo(&ba, purpose, b"back").await?;
        assert_eq!(reply, [&[purpose.to_byte()][..], b"back"].concat());
    }

    let stats = p.a.stats();
    assert_eq!(stats.len(), 1);
    assert_eq!(stats[0].peer, "b");
    assert!(stats[0].bytes_sent > 0 && stats[0].bytes_received > 0);
    assert!(stats[0].path_mtu >= 1200);
    println!("stats a->b: {}", serde_json::to_string(&stats[0])?);
    Ok(())
}

#[tokio::test]
async fn concurrent_callers_share_one_connection() -> TestResult {
    let p = pair(Congestion::default()).await;
    let b_addr = p.b.local_addr()?;
    let _echo = spawn_echo(p.b_in);
    let (c1, c2) = tokio::join!(p.a.connection("b", b_addr), p.a.connection("b", b_addr));
    let (c1, c2) = (c1?, c2?);
    assert_eq!(c1.quic().stable_id(), c2.quic().stable_id());
    let c3 = p.a.connection("b", b_addr).await?;
    assert_eq!(c1.quic().stable_id(), c3.quic().stable_id());
    // b has exactly one connection registered, from a.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(p.b.stats().len(), 1);
    Ok(())
}

#[tokio::test]
async fn simultaneous_dials_both_work() -> TestResult {
    let p = pair(Congestion::default()).await;
    let (a_addr, b_addr) = (p.a.local_addr()?, p.b.local_addr()?);
    let _echo_a = spawn_echo(p.a_in);
    let _echo_b = spawn_echo(p.b_in);
    let (ab, ba) = tokio::join!(p.a.connection("b", b_addr), p.b.connection("a", a_addr));
    let (ab, ba) = (ab?, ba?);
    // Each side uses whichever connection it registered; streams flow both
    // ways regardless of which one that is.
    assert_eq!(echo(&ab, StreamPurpose::Control, b"1").await?, [1, b'1']);
    assert_eq!(echo(&ba, StreamPurpose::Control, b"2").await?, [1, b'2']);
    // Later calls keep returning the same registered connection.
    assert_eq!(
        p.a.connection("b", b_addr).await?.quic().stable_id(),
        ab.quic().stable_id()
    );
    Ok(())
}

#[tokio::test]
async fn untrusted_peer_is_refused_as_client_and_as_server() -> TestResult {
    let p = pair(Congestion::default()).await;
    let a_addr = p.a.local_addr()?;
    let mut a_in = p.a_in;
    // u trusts a, but a does not know u.
    let u_id = Identity::generate("u")?;
    let (u, _u_in) = endpoint(u_id.clone(), &[("a", &p.a_id)], Congestion::default()).await;
    let u_addr = u.local_addr()?;

    // As client: a's client-certificate verifier refuses u.
    let err = tokio::time::timeout(TIMEOUT, u.connection("a", a_addr))
        .await?
        .expect_err("a must refuse u");
    assert!(matches!(err, TransportError::Refused { .. }), "{err:?}");
    println!("u -> a refused: {}", error_chain(&err));

    // As server: a dials u's address believing it is b; the pin mismatches.
    let err = tokio::time::timeout(TIMEOUT, p.a.connection("b", u_addr))
        .await?
        .expect_err("a must refuse u's certificate");
    assert!(matches!(err, TransportError::Refused { .. }), "{err:?}");
    println!("a -> u refused: {}", error_chain(&err));

    // A name a does not know is refused before any packet is sent.
    let err = p.a.connection("u", u_addr).await.expect_err("unknown name");
    assert!(matches!(err, TransportError::UnknownPeer { .. }), "{err:?}");

    // Nothing from u reached a's application.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), a_in.next())
            .await
            .is_err()
    );
    // And a's registry holds no connection for anyone.
    assert!(p.a.stats().is_empty());
    Ok(())
}

#[tokio::test]
async fn right_name_wrong_fingerprint_is_refused() -> TestResult {
    let p = pair(Congestion::default()).await;
    let a_addr = p.a.local_addr()?;
    // An impostor with b's name (and CN b.godwit) but its own key.
    let fake_b = Identity::generate("b")?;
    assert_ne!(fake_b.fingerprint(), p.b_id.fingerprint());
    let (imp, _imp_in) = endpoint(fake_b, &[("a", &p.a_id)], Congestion::default()).await;

    let err = tokio::time::timeout(TIMEOUT, imp.connection("a", a_addr))
        .await?
        .expect_err("impostor client");
    assert!(matches!(err, TransportError::Refused { .. }), "{err:?}");

    let err = tokio::time::timeout(TIMEOUT, p.a.connection("b", imp.local_addr()?))
        .await?
        .expect_err("impostor server");
    assert!(matches!(err, TransportError::Refused { .. }), "{err:?}");

    // The real b still gets in.
    let _echo = spawn_echo(p.a_in);
    let ba = tokio::time::timeout(TIMEOUT, p.b.connection("a", a_addr)).await??;
    assert_eq!(echo(&ba, StreamPurpose::Control, b"hi").await?[1..], *b"hi");
    Ok(())
}

#[tokio::test]
async fn peer_added_at_runtime_is_accepted_without_restart() -> TestResult {
    let a_id = Identity::generate("a")?;
    let c_id = Identity::generate("c")?;
    let (a, a_in) = endpoint(a_id.clone(), &[], Congestion::default()).await;
    let (c, _c_in) = endpoint(c_id.clone(), &[("a", &a_id)], Congestion::default()).await;
    let a_addr = a.local_addr()?;
    let err = c
        .connection("a", a_addr)
        .await
        .expect_err("not yet trusted");
    assert!(matches!(err, TransportError::Refused { .. }), "{err:?}");

    a.peers().insert("c", c_id.fingerprint())?;
    let _echo = spawn_echo(a_in);
    let ca = tokio::time::timeout(TIMEOUT, c.connection("a", a_addr)).await??;
    assert_eq!(echo(&ca, StreamPurpose::Memory, b"x").await?, [2, b'x']);
    Ok(())
}

#[tokio::test]
async fn unknown_purpose_byte_resets_the_stream() -> TestResult {
    let p = pair(Congestion::default()).await;
    let b_addr = p.b.local_addr()?;
    let mut b_in = p.b_in;
    let ab = p.a.connection("b", b_addr).await?;
    // Bypass open(): write a bogus header on a raw stream.
    let (mut send, mut recv) = ab.quic().open_bi().await?;
    send.write_all(&[0x7f, 1, 2, 3]).await?;
    let err = recv
        .read_to_end(64)
        .await
        .expect_err("stream must be reset");
    let code = godwit_transport::purpose::STREAM_ERROR_UNKNOWN_PURPOSE;
    assert!(
        matches!(err, quinn::ReadToEndError::Read(quinn::ReadError::Reset(c)) if c == quinn::VarInt::from_u32(code)),
        "{err:?}"
    );
    // The connection survives and the stream never reached the application.
    assert!(ab.close_reason().is_none());
    assert!(
        tokio::time::timeout(Duration::from_millis(100), b_in.next())
            .await
            .is_err()
    );
    let (mut s, _r) = ab.open(StreamPurpose::Control).await?;
    s.write_all(b"ok").await?;
    let got = tokio::time::timeout(TIMEOUT, b_in.next())
        .await?
        .expect("stream");
    assert_eq!(got.purpose, StreamPurpose::Control);
    Ok(())
}

#[tokio::test]
async fn shutdown_ends_incoming_and_closes_peers() -> TestResult {
    let p = pair(Congestion::default()).await;
    let b_addr = p.b.local_addr()?;
    let mut b_in = p.b_in;
    let ab = p.a.connection("b", b_addr).await?;
    p.b.shutdown().await;
    assert!(tokio::time::timeout(TIMEOUT, b_in.next()).await?.is_none());
    tokio::time::timeout(TIMEOUT, ab.closed()).await?;
    assert!(ab.close_reason().is_some());
    println!("a sees: {:?}", ab.close_reason());
    // a notices the dead connection and redials (and fails: b is gone).
    let err = tokio::time::timeout(Duration::from_secs(1), p.a.connection("b", b_addr)).await;
    assert!(!matches!(err, Ok(Ok(_))));
    Ok(())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
