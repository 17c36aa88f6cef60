//! Throughput tests: a bulk transfer over plain loopback, and single-stream
//! transfers through an in-process emulated long fat pipe (delay + rate +
//! optional random loss). Figures are printed (run with `--nocapture`);
//! only gross failures are asserted, since the machine may be loaded.

mod common;

use std::time::Duration;

use common::{pair, send_bulk, spawn_sink, LinkParams, TestResult, WanProxy};
use godwit_transport::{Congestion, StreamPurpose};

/// The tests measure throughput, so they must not run concurrently.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_bulk_transfer_256_mib() -> TestResult {
    let _serial = SERIAL.lock().await;
    const TOTAL: u64 = 256 << 20;
    let p = pair(Congestion::default()).await;
    let b_addr = p.b.local_addr()?;
    let sink = spawn_sink(p.b_in, Duration::from_millis(500));
    let conn = p.a.connection("b", b_addr).await?;
    let sent = send_bulk(
        &conn,
        StreamPurpose::StorageBackground,
        TOTAL,
        Duration::MAX,
    )
    .await?;
    let report = sink.await?;
    assert_eq!(report.bytes, TOTAL);
    assert_eq!(sent, TOTAL);
    println!(
        "loopback: {} MiB in {:.2?} = {:.0} Mbit/s (steady {:.0} Mbit/s); stats {:?}",
        TOTAL >> 20,
        report.elapsed,
        report.mbit_s(),
        report.steady_mbit_s(),
        conn.stats()
    );
    Ok(())
}

/// One stream through a 100 ms RTT, 100 Mbit/s link.
async fn lfn_run(congestion: Congestion, loss: f64, duration: Duration) -> common::SinkReport {
    let link = LinkParams {
        one_way_delay: Duration::from_millis(50),
        rate_bits_per_s: 100_000_000,
        loss,
        // One BDP of buffering at the bottleneck.
        queue_limit: Duration::from_millis(100),
    };
    let p = pair(congestion).await;
    let proxy = WanProxy::start(p.b.local_addr().expect("addr"), link, 0x9d1c_77aa).await;
    let sink = spawn_sink(p.b_in, duration / 2);
    let conn =
        p.a.connection("b", proxy.addr)
            .await
            .expect("connect via proxy");
    let monitor = {
        let conn = conn.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let s = conn.stats();
                println!(
                    "  t+1s: rtt {:?} cwnd {} sent {} lost {} cong {}",
                    s.rtt, s.cwnd, s.bytes_sent, s.lost_packets, s.congestion_events
                );
            }
        })
    };
    send_bulk(&conn, StreamPurpose::Memory, u64::MAX, duration)
        .await
        .expect("bulk send");
    monitor.abort();
    let report = sink.await.expect("sink");
    let stats = conn.stats();
    println!(
        "lfn 100ms/100Mbit loss={:.2}% {:?}: {:.1} MB in {:.2?}: avg {:.1} Mbit/s, \
         second half {:.1} Mbit/s | rtt {:?} cwnd {} lost {} cong-events {} mtu {} | proxy {:?}",
        loss * 100.0,
        congestion,
        report.bytes as f64 / 1e6,
        report.elapsed,
        report.mbit_s(),
        report.steady_mbit_s(),
        stats.rtt,
        stats.cwnd,
        stats.lost_packets,
        stats.congestion_events,
        stats.path_mtu,
        proxy.stats(),
    );
    p.a.shutdown().await;
    p.b.shutdown().await;
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_fat_pipe_single_stream_reaches_link_rate() -> TestResult {
    let _serial = SERIAL.lock().await;
    let report = lfn_run(Congestion::default(), 0.0, Duration::from_secs(5)).await;
    // Loose sanity bound only (a loaded CI box may be slower); the printed
    // figure is the result.
    assert!(report.steady_mbit_s() > 20.0, "{report:?}");
    Ok(())
}

/// Every controller with and without 0.1 % random loss at 100 ms RTT. Takes
/// ~50 s, so it is opt-in: `cargo test -p godwit-transport --test
/// throughput -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow congestion-control comparison; run explicitly"]
async fn congestion_controllers_under_random_loss() -> TestResult {
    let _serial = SERIAL.lock().await;
    for loss in [0.0, 0.001] {
        for cc in Congestion::ALL {
            lfn_run(cc, loss, Duration::from_secs(6)).await;
        }
    }
    Ok(())
}
