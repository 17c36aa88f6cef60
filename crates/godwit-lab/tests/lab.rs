//! End-to-end lab tests: real namespaces, real TUN devices, the real daemon
//! (`godwit-lab-wan`, the same `wan::daemon_main` the CLI runs). Needs root.
//!
//! Each test uses its own namespace prefix and state dir so it cannot touch a
//! real `godwit-*` lab; a guard tears the lab down even if an assert fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use godwit_lab::link::LinkParamsUpdate;
use godwit_lab::wan::WanClient;
use godwit_lab::{netns, probe, topology, LabError, LabSpec};

/// Fidelity tests measure timing: never run two labs at once.
static SERIAL: Mutex<()> = Mutex::new(());

const RATE: u64 = 100_000_000;

struct Lab {
    dir: PathBuf,
    prefix: String,
}

impl Lab {
    fn new(tag: &str) -> Self {
        let prefix = format!("gwt{tag}{}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("{prefix}-state"));
        let _ = topology::down_prefix(&dir, &prefix);
        Self { dir, prefix }
    }

    fn spec(&self, sites: usize, delay: Duration) -> LabSpec {
        LabSpec {
            sites,
            delay,
            rate_bps: RATE,
            prefix: self.prefix.clone(),
            ..LabSpec::default()
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = topology::down_prefix(&self.dir, &self.prefix);
    }
}

fn daemon() -> Command {
    Command::new(env!("CARGO_BIN_EXE_godwit-lab-wan"))
}

/// Mean lateness (µs) above which the host, not the emulator, limits a
/// measurement: the data plane is a SCHED_FIFO thread, so lateness this large
/// means its vCPU was taken away (a pure spin loop on these VMs sees gaps of
/// up to 5 ms in 3 s on an otherwise idle machine).
const HOST_STALL_LATENESS_US: f64 = 500.0;

/// One TCP flow a→b must reach 90–110 % of the link rate. Up to three
/// attempts, as a stalled host only ever lowers goodput; if every attempt ran
/// while the host stalled the emulator, the floor drops to 75 % and the
/// reason is printed (an emulator bug still fails it: the ceiling holds, and
/// a wrong rate or queue model costs far more than host stalls).
fn assert_goodput(state: &godwit_lab::LabState, wan: &mut WanClient, label: &str, secs: Duration) {
    let mut attempts = Vec::new();
    for _ in 0..3 {
        let before = wan.stats_all().unwrap().lateness;
        let gp = probe::tcp_goodput(state, "a", "b", secs).unwrap();
        let after = wan.stats_all().unwrap().lateness;
        let packets = after.packets.saturating_sub(before.packets).max(1);
        let late_us = (after.mean_us * after.packets as f64
            - before.mean_us * before.packets as f64)
            / packets as f64;
        eprintln!("{label} goodput: {gp:?}, mean lateness {late_us:.0} µs");
        assert!(gp.mbit_s <= 110.0, "{label}: above the link rate: {gp:?}");
        if gp.mbit_s >= 90.0 {
            return;
        }
        attempts.push((gp.mbit_s, late_us));
    }
    if attempts.iter().all(|&(_, l)| l >= HOST_STALL_LATENESS_US) {
        eprintln!("{label}: the host descheduled the emulator in every attempt: {attempts:?}");
        assert!(
            attempts.iter().any(|&(m, _)| m >= 75.0),
            "{label}: {attempts:?}"
        );
    } else {
        panic!("{label}: goodput below 90 Mbit/s in every attempt: {attempts:?}");
    }
}

fn assert_gone(dir: &Path, prefix: &str) {
    assert!(
        netns::list_with_prefix(prefix).is_empty(),
        "namespaces left"
    );
    assert!(!dir.exists(), "state dir left");
}

#[test]
fn two_sites_fidelity_cut_heal() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::new("f");
    let state = topology::up(&lab.spec(2, Duration::ZERO), &lab.dir, &daemon()).unwrap();
    assert_eq!(
        topology::load_state(&lab.dir).unwrap().as_ref(),
        Some(&state)
    );
    assert!(matches!(
        topology::up(&lab.spec(2, Duration::ZERO), &lab.dir, &daemon()),
        Err(LabError::AlreadyUp(_))
    ));
    let mut wan = WanClient::connect(&state.wan_socket).unwrap();

    // D = 0: RTT is the emulator's own overhead only.
    let rtt0 = probe::rtt(&state, "a", "b", 50).unwrap();
    eprintln!("D=0 rtt: {rtt0:?}");
    assert_eq!(rtt0.lost, 0);
    assert!(rtt0.median_ms < 2.0, "{rtt0:?}");
    assert_goodput(&state, &mut wan, "D=0", Duration::from_secs(5));

    // D = 130 ms on every link, changed live.
    let changed = wan
        .set_link(
            None,
            None,
            LinkParamsUpdate {
                delay: Some(Duration::from_millis(130)),
                ..LinkParamsUpdate::default()
            },
        )
        .unwrap();
    assert_eq!(changed, 2);
    let rtt130 = probe::rtt(&state, "a", "b", 20).unwrap();
    eprintln!("D=130ms rtt: {rtt130:?}");
    assert_eq!(rtt130.lost, 0);
    // min and median must hold; max is reported but a shared 2-core machine
    // can deschedule any thread for milliseconds.
    assert!((258.0..=262.0).contains(&rtt130.min_ms), "{rtt130:?}");
    assert!((258.0..=262.0).contains(&rtt130.median_ms), "{rtt130:?}");
    assert_goodput(&state, &mut wan, "D=130ms", Duration::from_secs(12));
    let stats = wan.stats_all().unwrap();
    let ab = stats
        .links
        .iter()
        .find(|l| l.from == "a" && l.to == "b")
        .unwrap();
    eprintln!("a->b stats: {ab:?}");
    eprintln!("lateness: {:?}", stats.lateness);

    assert!(
        ab.link.peak_bps_1s <= RATE * 101 / 100,
        "peak above the rate"
    );
    assert!(
        ab.link.peak_bps_1s >= RATE * 90 / 100,
        "peak far below the rate"
    );
    assert_eq!(ab.link.queue_limit_bytes, 3_250_000);

    // Cut stops traffic in both directions; heal restores it.
    wan.set_link(
        None,
        None,
        LinkParamsUpdate {
            delay: Some(Duration::ZERO),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(wan.cut(Some("a"), Some("b")).unwrap(), 2);
    assert!(matches!(
        probe::rtt(&state, "a", "b", 2),
        Err(LabError::Probe(_))
    ));
    let cut_drops: u64 = wan
        .stats()
        .unwrap()
        .iter()
        .map(|l| l.link.counters.dropped_cut)
        .sum();
    assert!(cut_drops >= 2, "cut drops {cut_drops}");
    assert_eq!(wan.heal(None, None).unwrap(), 2);
    let healed = probe::rtt(&state, "b", "a", 5).unwrap();
    assert_eq!(healed.lost, 0);

    drop(wan);
    topology::down(&lab.dir).unwrap();
    assert_gone(&lab.dir, &lab.prefix);
    topology::down_prefix(&lab.dir, &lab.prefix).unwrap();
}

#[test]
fn down_cleans_up_after_a_crash() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::new("c");
    let state = topology::up(&lab.spec(3, Duration::from_millis(5)), &lab.dir, &daemon()).unwrap();
    assert_eq!(state.sites.len(), 3);
    assert_eq!(state.sites[2].netns, format!("{}-c", lab.prefix));
    assert_eq!(state.sites[2].addr.to_string(), "10.77.3.1");
    // Unknown destination inside the lab range: counted as no-route.
    netns::run_in(&state.sites[0].netns, || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(b"x", "10.77.9.1:9").unwrap();
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut wan = WanClient::connect(&state.wan_socket).unwrap();
    let site_a = wan
        .stats_all()
        .unwrap()
        .sites
        .into_iter()
        .find(|s| s.name == "a")
        .unwrap();
    assert_eq!(site_a.dropped_no_route, 1);
    // A bad site name is refused.
    assert!(matches!(wan.cut(Some("z"), None), Err(LabError::Daemon(_))));
    // Three sites: each reaches the others through the emulator.
    let c_to_b = probe::rtt(&state, "c", "b", 5).unwrap();
    assert!((9.0..=12.0).contains(&c_to_b.median_ms), "{c_to_b:?}");

    // Crash: a process lingers in a site, the daemon dies, the state file is lost.
    let mut sleeper = netns::command_in(&state.sites[1].netns, "sleep")
        .arg("600")
        .spawn()
        .unwrap();
    let pid = state.wan_pid.unwrap();
    let killed = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    std::fs::remove_file(lab.dir.join(topology::STATE_FILE)).unwrap();
    topology::down_prefix(&lab.dir, &lab.prefix).unwrap();
    assert_gone(&lab.dir, &lab.prefix);
    assert!(sleeper.wait().is_ok());
}

/// How far the emulator goes at 1 Gbit/s on this machine. Not a pass/fail
/// fidelity check (2 shared cores carry sender, receiver and emulator):
/// run with `cargo test --release -p godwit-lab --test lab -- --ignored --nocapture`.
#[test]
#[ignore]
fn gigabit_report() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::new("g");
    let mut spec = lab.spec(2, Duration::from_millis(10));
    spec.rate_bps = 1_000_000_000;
    let state = topology::up(&spec, &lab.dir, &daemon()).unwrap();
    let gp = probe::tcp_goodput(&state, "a", "b", Duration::from_secs(8)).unwrap();
    let stats = WanClient::connect(&state.wan_socket)
        .unwrap()
        .stats_all()
        .unwrap();
    eprintln!("1 Gbit/s, D=10ms goodput: {gp:?}");
    eprintln!("a->b: {:?}", stats.links[0].link.counters);
    eprintln!("lateness: {:?}", stats.lateness);
    topology::down(&lab.dir).unwrap();
}
