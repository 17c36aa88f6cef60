//! Real-QEMU tests (TCG): launch, local live migration over unix sockets,
//! and failure experiments with a cutting proxy between source and
//! destination. QEMU is installed on every dev/CI host; nothing skips.
//!
//! The guest is a `pc` machine without a kernel: SeaBIOS finds nothing to
//! boot and idles, which is enough to exercise arguments, QMP and migration.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use godwit_qemu::migration::{start_incoming, start_outgoing};
use godwit_qemu::{
    launch, resolve_machine, terminate, wait_exit, wait_migration, Accel, DiskSpec, HostConfig,
    LaunchMode, MigrationOutcome, NetdevSpec, NicSpec, QemuError, Termination, VmSpec,
};
use godwit_qmp::commands::{MigrationParameters, QueryMigrate, QueryStatus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);
const GRACE: Duration = Duration::from_secs(5);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "godwit_qemu=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Kills a test's QEMU if the test panics before terminating it (QEMU runs
/// in its own session, so it would otherwise outlive the test binary).
struct KillOnDrop(godwit_qemu::QemuInstance);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0.is_running() {
            // SAFETY: kill(2) has no memory-safety preconditions; the pid was
            // just verified to be this test's QEMU.
            unsafe { libc::kill(self.0.pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

struct Env {
    host: HostConfig,
    _run: tempfile::TempDir,
    _ram: tempfile::TempDir,
}

fn env() -> Env {
    let run = tempfile::Builder::new()
        .prefix("gq")
        .tempdir_in("/tmp")
        .unwrap();
    let ram = tempfile::Builder::new()
        .prefix("godwit-test")
        .tempdir_in("/dev/shm")
        .unwrap();
    Env {
        host: HostConfig {
            qemu_binary: "qemu-system-x86_64".into(),
            accel: Accel::Tcg,
            run_dir: run.path().to_path_buf(),
            ram_dir: ram.path().to_path_buf(),
        },
        _run: run,
        _ram: ram,
    }
}

async fn spec(host: &HostConfig, name: &str, disk: Option<PathBuf>) -> VmSpec {
    VmSpec {
        name: name.into(),
        memory_mib: 128,
        vcpus: 1,
        machine: resolve_machine(host, "pc").await.unwrap(),
        cpu: None,
        kernel: None,
        initrd: None,
        cmdline: String::new(),
        disk: disk.map(|path| DiskSpec {
            path,
            format: "raw".into(),
            readonly: false,
        }),
        nic: Some(NicSpec {
            mac: "52:54:00:12:34:56".into(),
            netdev: NetdevSpec::None,
        }),
        uuid: Some("6b3a1f0e-0000-4000-8000-000000000001".into()),
    }
}

#[tokio::test]
async fn test_resolve_machine() {
    init_tracing();
    let e = env();
    let pc = resolve_machine(&e.host, "pc").await.unwrap();
    assert!(pc.starts_with("pc-i440fx-"), "{pc}");
    assert_eq!(resolve_machine(&e.host, &pc).await.unwrap(), pc);
    let q35 = resolve_machine(&e.host, "q35").await.unwrap();
    assert!(q35.starts_with("pc-q35-"), "{q35}");
    assert!(matches!(
        resolve_machine(&e.host, "nope").await,
        Err(QemuError::UnknownMachine(_))
    ));
    // The probe leaves nothing behind.
    assert_eq!(std::fs::read_dir(&e.host.run_dir).unwrap().count(), 0);
}

#[tokio::test]
async fn test_launch_failure_reports_log() {
    init_tracing();
    let e = env();
    let mut s = spec(&e.host, "bad", None).await;
    s.kernel = Some("/nonexistent/vmlinuz".into());
    match launch(&s, &e.host, LaunchMode::Fresh).await {
        Err(QemuError::ExitedDuringStartup { log_tail }) => {
            assert!(log_tail.contains("vmlinuz"), "{log_tail}")
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        std::fs::read_dir(&e.host.ram_dir).unwrap().count(),
        0,
        "RAM file removed"
    );
}

#[tokio::test]
async fn test_live_migration_local() {
    init_tracing();
    let e = env();
    let disk = e.host.run_dir.join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let s = spec(&e.host, "vm1", Some(disk)).await;

    let (src, src_qmp, mut src_ev) = launch(&s, &e.host, LaunchMode::Fresh).await.unwrap();
    let _src_guard = KillOnDrop(src.clone());
    let st = src_qmp.execute_typed(&QueryStatus).await.unwrap();
    assert_eq!((st.status.as_str(), st.running), ("running", true));
    assert!(src.ram_file.exists());
    assert_eq!(
        std::fs::metadata(&src.ram_file).unwrap().len(),
        godwit_qemu::args::guest_ram_kib(&s, e.host.accel) * 1024
    );
    assert!(src.guest_socket.exists());
    assert!(src.is_running());
    // The instance round-trips through serde (the agent persists it).
    let j = serde_json::to_string(&src).unwrap();
    assert_eq!(
        serde_json::from_str::<godwit_qemu::QemuInstance>(&j).unwrap(),
        src
    );

    let (dst, dst_qmp, mut dst_ev) = launch(&s, &e.host, LaunchMode::Incoming).await.unwrap();
    let _dst_guard = KillOnDrop(dst.clone());
    let st = dst_qmp.execute_typed(&QueryStatus).await.unwrap();
    assert_eq!((st.status.as_str(), st.running), ("inmigrate", false));

    let uri = format!("unix:{}", dst.dir.join("mig.sock").display());
    start_incoming(&dst_qmp, &uri, &[]).await.unwrap();
    let params = MigrationParameters {
        max_bandwidth: Some(10_000_000_000),
        downtime_limit: Some(500),
        ..Default::default()
    };
    let t0 = Instant::now();
    start_outgoing(&src_qmp, &uri, &[], &params).await.unwrap();
    let (so, dso) = tokio::join!(
        wait_migration(&src_qmp, &mut src_ev, MIGRATION_TIMEOUT, |_| {}),
        wait_migration(&dst_qmp, &mut dst_ev, MIGRATION_TIMEOUT, |_| {}),
    );
    let (so, dso) = (so.unwrap(), dso.unwrap());
    eprintln!(
        "migration took {:?}\nsource: {so:?}\ndest: {dso:?}",
        t0.elapsed()
    );
    let MigrationOutcome::Completed { info } = so else {
        panic!("source: {so:?}")
    };
    assert!(info.downtime.is_some());
    assert!(info.ram.as_ref().and_then(|r| r.transferred).unwrap_or(0) > 0);
    assert!(matches!(dso, MigrationOutcome::Completed { .. }), "{dso:?}");

    let st = dst_qmp.execute_typed(&QueryStatus).await.unwrap();
    assert_eq!((st.status.as_str(), st.running), ("running", true));
    let st = src_qmp.execute_typed(&QueryStatus).await.unwrap();
    assert_eq!((st.status.as_str(), st.running), ("postmigrate", false));
    eprintln!(
        "dest query-migrate after: {:?}",
        dst_qmp.execute_typed(&QueryMigrate).await
    );

    assert_eq!(
        terminate(&src, Some(&src_qmp), GRACE).await.unwrap(),
        Termination::Quit
    );
    assert_eq!(
        terminate(&dst, Some(&dst_qmp), GRACE).await.unwrap(),
        Termination::Quit
    );
    for i in [&src, &dst] {
        assert!(!i.is_running());
        assert!(!i.ram_file.exists(), "RAM file removed");
        assert!(!i.qmp_socket.exists() && !i.guest_socket.exists());
        assert!(i.qemu_log.exists(), "logs are kept");
    }
    // Terminating again is harmless.
    assert_eq!(
        terminate(&src, None, GRACE).await.unwrap(),
        Termination::AlreadyExited
    );
}

#[tokio::test]
async fn test_terminate_escalates_to_signals() {
    init_tracing();
    let e = env();
    let s = spec(&e.host, "vm2", None).await;
    let (inst, qmp, _ev) = launch(&s, &e.host, LaunchMode::Fresh).await.unwrap();
    let _inst_guard = KillOnDrop(inst.clone());
    // Without a QMP client, SIGTERM does it (QEMU exits cleanly on SIGTERM).
    drop(qmp);
    assert_eq!(
        terminate(&inst, None, GRACE).await.unwrap(),
        Termination::Sigterm
    );
    assert!(!inst.ram_file.exists());
}

/// What the proxy does to the connection.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Cut {
    /// Close both sides after this many source→destination bytes.
    ForwardAfter(u64),
    /// Stop forwarding after this many bytes but keep both sockets open
    /// (a silent WAN stall).
    StallAfter(u64),
    /// Forward the return path until the destination's SHUT message
    /// (type 1), then drop it and close both sides.
    BeforeShut,
}

type CutTx = std::sync::Arc<std::sync::Mutex<Option<tokio::sync::oneshot::Sender<(Instant, u64)>>>>;

fn report_cut(tx: &CutTx, n: u64) {
    if let Some(tx) = tx.lock().unwrap().take() {
        let _ = tx.send((Instant::now(), n));
    }
}

/// A proxy between the source QEMU (connecting to `listen`) and the
/// destination's incoming socket. Reports the cut time and the number of
/// forwarded bytes on `cut_tx` when it cuts.
async fn cutting_proxy(listen: PathBuf, target: PathBuf, cut: Cut, cut_tx: CutTx) {
    let l = UnixListener::bind(&listen).unwrap();
    let (s, _) = l.accept().await.unwrap();
    let d = UnixStream::connect(&target).await.unwrap();
    let (mut sr, mut sw) = s.into_split();
    let (mut dr, mut dw) = d.into_split();
    let fwd_tx = cut_tx.clone();
    let fwd = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut n_total = 0u64;
        let limit = match cut {
            Cut::ForwardAfter(l) | Cut::StallAfter(l) => l,
            Cut::BeforeShut => u64::MAX,
        };
        loop {
            let n = sr.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return n_total;
            }
            let n = n.min((limit - n_total) as usize);
            if dw.write_all(&buf[..n]).await.is_err() {
                return n_total;
            }
            n_total += n as u64;
            if n_total >= limit {
                if let Cut::StallAfter(_) = cut {
                    // Keep every socket open and forward nothing more.
                    report_cut(&fwd_tx, n_total);
                    std::future::pending::<()>().await;
                }
                return n_total;
            }
        }
    });
    let rev = tokio::spawn(async move {
        let mut pending = Vec::new();
        let mut buf = vec![0u8; 4096];
        loop {
            let n = dr.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            if cut != Cut::BeforeShut {
                if sw.write_all(&buf[..n]).await.is_err() {
                    return;
                }
                continue;
            }
            pending.extend_from_slice(&buf[..n]);
            // Return-path messages: be16 type, be16 len, payload.
            while pending.len() >= 4 {
                let ty = u16::from_be_bytes([pending[0], pending[1]]);
                let len = u16::from_be_bytes([pending[2], pending[3]]) as usize;
                if pending.len() < 4 + len {
                    break;
                }
                if ty == 1 {
                    eprintln!("proxy: dropping SHUT {:02x?}", &pending[..4 + len]);
                    return;
                }
                let msg: Vec<u8> = pending.drain(..4 + len).collect();
                if sw.write_all(&msg).await.is_err() {
                    return;
                }
            }
        }
    });
    // Aborting the proxy task must also close the sockets the inner tasks hold.
    let _guard = AbortOnDrop(vec![fwd.abort_handle(), rev.abort_handle()]);
    match cut {
        Cut::ForwardAfter(_) | Cut::StallAfter(_) => {
            // StallAfter never gets past this await: the sockets stay open
            // until the proxy task is aborted.
            let n = fwd.await.unwrap_or(0);
            rev.abort();
            let _ = rev.await;
            report_cut(&cut_tx, n);
        }
        Cut::BeforeShut => {
            let _ = rev.await;
            fwd.abort();
            let _ = fwd.await;
            report_cut(&cut_tx, 0);
        }
    }
    // Every socket half is dropped by now: both connections are closed.
}

struct AbortOnDrop(Vec<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// Signed milliseconds from `a` to `b` (negative: `b` happened first).
fn ms_between(a: Instant, b: Instant) -> i128 {
    if b >= a {
        (b - a).as_millis() as i128
    } else {
        -((a - b).as_millis() as i128)
    }
}

async fn run_cut_experiment(cut: Cut, bandwidth: u64) {
    init_tracing();
    let e = env();
    let s = spec(&e.host, "vmcut", None).await;
    let (src, src_qmp, mut src_ev) = launch(&s, &e.host, LaunchMode::Fresh).await.unwrap();
    let _src_guard = KillOnDrop(src.clone());
    let (dst, dst_qmp, mut dst_ev) = launch(&s, &e.host, LaunchMode::Incoming).await.unwrap();
    let _dst_guard = KillOnDrop(dst.clone());
    let dst_sock = dst.dir.join("mig.sock");
    let proxy_sock = src.dir.join("proxy.sock");
    start_incoming(&dst_qmp, &format!("unix:{}", dst_sock.display()), &[])
        .await
        .unwrap();
    let (cut_tx, cut_rx) = tokio::sync::oneshot::channel();
    let cut_tx: CutTx = std::sync::Arc::new(std::sync::Mutex::new(Some(cut_tx)));
    let proxy = tokio::spawn(cutting_proxy(proxy_sock.clone(), dst_sock, cut, cut_tx));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let params = MigrationParameters {
        max_bandwidth: Some(bandwidth),
        ..Default::default()
    };
    start_outgoing(
        &src_qmp,
        &format!("unix:{}", proxy_sock.display()),
        &[],
        &params,
    )
    .await
    .unwrap();
    let sw = {
        let c = src_qmp.clone();
        tokio::spawn(async move {
            let o = wait_migration(&c, &mut src_ev, MIGRATION_TIMEOUT, |_| {}).await;
            (Instant::now(), o)
        })
    };
    let dw = {
        let c = dst_qmp.clone();
        let pid = dst.pid;
        tokio::spawn(async move {
            let o = wait_migration(&c, &mut dst_ev, MIGRATION_TIMEOUT, |_| {}).await;
            let t = Instant::now();
            // When did the process itself go away (if it did)?
            let exited = wait_exit(pid, Duration::from_secs(10))
                .await
                .then(Instant::now);
            (t, o, exited)
        })
    };
    let (cut_at, forwarded) = cut_rx.await.unwrap();
    eprintln!("== cut {cut:?}: forwarded {forwarded} bytes before the cut");
    if let Cut::StallAfter(_) = cut {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let si = src_qmp.execute_typed(&QueryMigrate).await.unwrap();
        let di = dst_qmp.execute_typed(&QueryMigrate).await.unwrap();
        eprintln!(
            "3 s into the stall: source {:?} (remaining {:?}), dest {:?}, dest run state {:?}",
            si.status(),
            si.ram.as_ref().and_then(|r| r.remaining),
            di.status(),
            dst_qmp.execute_typed(&QueryStatus).await.unwrap().status
        );
        assert_eq!(si.status(), "active", "QEMU has no stream timeout");
        let t = Instant::now();
        src_qmp
            .execute_typed(&godwit_qmp::commands::MigrateCancel)
            .await
            .unwrap();
        eprintln!("migrate_cancel returned after {:?}", t.elapsed());
    }
    let (s_at, so) = sw.await.unwrap();
    if let Cut::StallAfter(_) = cut {
        // The source gave up, but the destination's socket is still open
        // (held by the proxy, as an agent would hold it): it just waits.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let st = dst_qmp.execute_typed(&QueryStatus).await.unwrap();
        eprintln!("dest 1 s after the source cancelled: {st:?}");
        assert_eq!(st.status, "inmigrate");
        let t = Instant::now();
        proxy.abort();
        let exited = wait_exit(dst.pid, Duration::from_secs(5)).await;
        eprintln!(
            "dest exited {exited} {:?} after the proxy closed its socket",
            t.elapsed()
        );
    }
    let (d_at, dso, d_exit) = dw.await.unwrap();
    let (so, dso) = (so.unwrap(), dso.unwrap());
    eprintln!(
        "source outcome at {:+} ms from cut: {so:?}",
        ms_between(cut_at, s_at)
    );
    eprintln!(
        "dest outcome at {:+} ms from cut: {dso:?}",
        ms_between(cut_at, d_at)
    );
    match d_exit {
        Some(t) => eprintln!(
            "dest process exited at {:+} ms from cut",
            ms_between(cut_at, t)
        ),
        None => eprintln!("dest process still alive"),
    }
    let src_status = src_qmp.execute_typed(&QueryStatus).await.unwrap();
    eprintln!("source run state after: {src_status:?}");
    let dst_status = dst_qmp.execute_typed(&QueryStatus).await;
    eprintln!("dest run state after: {dst_status:?}");
    eprintln!(
        "dest qemu.log:\n{}",
        std::fs::read_to_string(&dst.qemu_log).unwrap_or_default()
    );
    match cut {
        Cut::ForwardAfter(_) | Cut::StallAfter(_) => {
            // The source resumes after a failed/cancelled precopy; the 7.2
            // destination exits when its stream breaks.
            assert!(
                matches!(
                    so,
                    MigrationOutcome::Failed { .. } | MigrationOutcome::Cancelled { .. }
                ),
                "{so:?}"
            );
            assert!(src_status.running, "source resumes");
            // It emits MIGRATION{failed} just before exiting, so which of
            // the two the watcher sees first is a race.
            assert!(
                matches!(
                    dso,
                    MigrationOutcome::Disconnected { .. } | MigrationOutcome::Failed { .. }
                ),
                "{dso:?}"
            );
            assert!(d_exit.is_some());
        }
        Cut::BeforeShut => {
            // Split brain: the destination runs AND the source resumed.
            assert!(matches!(so, MigrationOutcome::Failed { .. }), "{so:?}");
            assert!(matches!(dso, MigrationOutcome::Completed { .. }), "{dso:?}");
            assert!(src_status.running);
            assert!(dst_status.unwrap().running);
        }
    }
    proxy.abort();
    let _ = terminate(&src, Some(&src_qmp), GRACE).await.unwrap();
    let _ = terminate(&dst, Some(&dst_qmp), GRACE).await.unwrap();
    assert!(!src.ram_file.exists() && !dst.ram_file.exists());
}

/// Mid-stream cut (both sockets closed) after 1 MiB of a ~1.7 MB stream.
#[tokio::test]
async fn test_live_migration_incoming_cut_midway() {
    // 1 MB/s so the stream is still flowing when 1 MiB has passed.
    run_cut_experiment(Cut::ForwardAfter(1 << 20), 1_000_000).await;
}

/// Silent stall (sockets stay open) after 1 MiB, then `migrate_cancel`.
#[tokio::test]
async fn test_live_migration_stall_then_cancel() {
    run_cut_experiment(Cut::StallAfter(1 << 20), 1_000_000).await;
}

/// The destination's SHUT never reaches the source.
#[tokio::test]
async fn test_live_migration_return_path_cut_before_shut() {
    run_cut_experiment(Cut::BeforeShut, 10_000_000_000).await;
}
