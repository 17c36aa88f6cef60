//! End-to-end tests: real QEMU guests (TCG) in a two-site lab over the
//! emulated WAN, migrated through the agents by the `godwit` binary, as a
//! user would run it.
//!
//! Needs root, QEMU, the guest image prerequisites and the static guest
//! tool (`scripts/build-guest.sh`); `scripts/test` provides all of them.
//! The lab is a machine-wide resource, so the tests take a lock and run
//! one at a time.

use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

static LAB: Mutex<()> = Mutex::new(());

const GODWIT: &str = env!("CARGO_BIN_EXE_godwit");

fn godwit(args: &[&str]) -> Output {
    Command::new(GODWIT)
        .args(args)
        .env_remove("GODWIT_SOCKET")
        .output()
        .expect("running the godwit binary")
}

/// Runs a command that must succeed; returns its JSON lines.
fn ok(args: &[&str]) -> Vec<Value> {
    let out = godwit(args);
    assert!(
        out.status.success(),
        "godwit {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    json_lines(&out)
}

fn json_lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn last_data(lines: &[Value], kind: &str) -> Value {
    lines
        .iter()
        .rev()
        .find(|l| l["type"] == kind)
        .map(|l| l["data"].clone())
        .unwrap_or_else(|| panic!("no {kind:?} line in {lines:?}"))
}

/// A lab that is torn down when the test ends, pass or fail. The lab is a
/// machine-wide singleton: the test holds an exclusive lock on
/// [`LAB_LOCK`] while it owns it, so another process's lab (a benchmark,
/// another test run) is waited for instead of torn down.
struct Lab(#[allow(dead_code)] std::fs::File);

/// Lock file shared by everything that brings the lab up on this machine.
const LAB_LOCK: &str = "/run/godwit/lab.lock";

impl Lab {
    fn up(delay: &str, rate: &str) -> Lab {
        Self::up_with(delay, rate, &["--sites", "2"]).0
    }

    /// A lab with extra `godwit lab up` flags; returns what `lab up`
    /// printed (sites, addresses, namespaces) too.
    fn up_with(delay: &str, rate: &str, flags: &[&str]) -> (Lab, Value) {
        std::fs::create_dir_all("/run/godwit").expect("creating /run/godwit");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LAB_LOCK)
            .expect("opening the lab lock");
        // SAFETY: flock on a file descriptor we own.
        let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) };
        assert_eq!(rc, 0, "locking {LAB_LOCK}");
        let _ = godwit(&["lab", "down"]);
        ok(&["--json", "image", "build"]);
        let mut args = vec!["--json", "lab", "up", "--delay", delay, "--rate", rate];
        args.extend_from_slice(flags);
        let st = last_data(&ok(&args), "lab");
        (Lab(f), st)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let out = godwit(&["lab", "down"]);
        if !out.status.success() {
            eprintln!("lab down failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

fn guest(site: &str, vm: &str, cmd: Value) -> Value {
    guest_with(site, vm, &cmd, &[])
}

/// `godwit guest` with extra flags; returns the report it prints.
fn guest_with(site: &str, vm: &str, cmd: &Value, flags: &[&str]) -> Value {
    let c = cmd.to_string();
    let mut args = vec![
        "--json",
        "--site",
        site,
        "guest",
        vm,
        &c,
        "--timeout",
        "300",
    ];
    args.extend_from_slice(flags);
    last_data(&ok(&args), "guest")
}

/// Boots the test guest at site `a` with memdirty running; returns its boot id.
fn boot_with_memdirty(vm: &str, memory: &str, mib: u64, rate: u64) -> String {
    ok(&[
        "--json", "--site", "a", "vm", "create", vm, "--memory", memory, "--wait",
    ]);
    let started = guest(
        "a",
        vm,
        json!({"cmd": "memdirty_start", "mib": mib, "rate_pages_per_s": rate, "pattern": "random"}),
    );
    assert_eq!(started["report"], "ack", "{started}");
    let info = last_data(&ok(&["--json", "--site", "a", "vm", "show", vm]), "vm");
    info["guest"]["boot_id"]
        .as_str()
        .expect("boot id")
        .to_owned()
}

fn vm_names(site: &str) -> Vec<String> {
    let v = last_data(&ok(&["--json", "--site", site, "vm", "list"]), "vms");
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Memory verification at `site`: every memdirty page checked, none wrong.
fn assert_memory_intact(site: &str, vm: &str) -> u64 {
    let v = guest(site, vm, json!({"cmd": "memdirty_verify"}));
    assert_eq!(v["report"], "verify", "{v}");
    assert_eq!(v["errors"], 0, "memory errors at {site}: {v}");
    let pages = v["pages"].as_u64().unwrap();
    assert!(pages > 0, "{v}");
    pages
}

fn assert_runs_at(site: &str, vm: &str, boot_id: &str) {
    // A guest call waits until the guest tool has greeted this agent.
    guest(site, vm, json!({"cmd": "ping"}));
    let info = last_data(&ok(&["--json", "--site", site, "vm", "show", vm]), "vm");
    assert_eq!(info["state"], "running", "{info}");
    assert_eq!(info["qemu_status"], "running", "{info}");
    assert_eq!(
        info["guest"]["boot_id"], boot_id,
        "the guest rebooted: {info}"
    );
    // The guest keeps running: its clock advances and memdirty keeps
    // rewriting pages.
    let s1 = guest(site, vm, json!({"cmd": "status"}));
    std::thread::sleep(Duration::from_millis(1000));
    let s2 = guest(site, vm, json!({"cmd": "status"}));
    assert!(
        s2["uptime_ms"].as_u64() > s1["uptime_ms"].as_u64(),
        "{s1} {s2}"
    );
    let dirtied = |s: &Value| s["memdirty"]["pages_dirtied"].as_u64().unwrap_or(0);
    assert!(dirtied(&s2) > dirtied(&s1), "memdirty stopped: {s1} {s2}");
}

/// Migrates vm1 a → b and checks it; with `and_back`, also b → a, where
/// the site store must supply the VM's own earlier image.
fn migrate_and_check(delay: &str, and_back: bool) {
    let _g = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let _lab = Lab::up(delay, "100mbit");
    let boot = boot_with_memdirty("vm1", "256", 64, 500);
    let lines = ok(&["--json", "--site", "a", "migrate", "vm1", "--to", "b"]);
    let m = last_data(&lines, "summary");
    assert_eq!(m["phase"], "completed", "{m}");
    let r = &m["report"];
    assert_eq!(r["success"], true, "{m}");
    assert!(r["wire_bytes"].as_u64().unwrap() > 1 << 20, "{m}");
    assert!(r["downtime_ms"].as_u64().is_some(), "{m}");
    eprintln!("migration at {delay}: {r}");
    // The VM left the source entirely and runs, unrebooted, at the destination.
    assert!(vm_names("a").is_empty(), "VM still at the source");
    assert_eq!(vm_names("b"), vec!["vm1".to_owned()]);
    assert_runs_at("b", "vm1", &boot);
    assert_memory_intact("b", "vm1");
    // b holds the VM's boot media: pages equal to them came from there.
    let pages = |r: &Value, k: &str| r["codec"][k].as_u64().unwrap_or(0);
    assert!(pages(r, "disk_pages") > 1000, "no boot-media hits: {r}");
    if !and_back {
        return;
    }
    let lines = ok(&["--json", "--site", "b", "migrate", "vm1", "--to", "a"]);
    let back = last_data(&lines, "summary");
    assert_eq!(back["phase"], "completed", "{back}");
    let rb = &back["report"];
    eprintln!("return trip: {rb}");
    // a recorded what vm1 sent when it left: most pages come back from
    // there, and the return costs a fraction of the first trip.
    assert!(
        pages(rb, "image_pages") > 10_000,
        "no earlier-image hits: {rb}"
    );
    assert!(
        rb["wire_bytes"].as_u64().unwrap() * 2 < r["wire_bytes"].as_u64().unwrap(),
        "return trip not cheaper: {rb} vs {r}"
    );
    assert_runs_at("a", "vm1", &boot);
    assert_memory_intact("a", "vm1");
}

#[test]
fn test_live_migration_relay_0ms() {
    migrate_and_check("0ms", true);
}

#[test]
fn test_live_migration_relay_130ms() {
    migrate_and_check("130ms", false);
}

/// Waits until the migration at `site` has moved at least `bytes` of stream.
fn wait_transferred(site: &str, id: &str, bytes: u64) {
    let t0 = Instant::now();
    loop {
        let m = last_data(
            &ok(&["--json", "--site", site, "migration", id]),
            "migration",
        );
        let p = m["progress"]["transferred_bytes"].as_u64().unwrap_or(0);
        assert!(
            !["completed", "failed"].contains(&m["phase"].as_str().unwrap_or("")),
            "finished too early: {m}"
        );
        if p >= bytes {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "migration did not progress: {m}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn wait_terminal(site: &str, id: &str, limit: Duration) -> Value {
    let t0 = Instant::now();
    loop {
        let m = last_data(
            &ok(&["--json", "--site", site, "migration", id]),
            "migration",
        );
        if ["completed", "failed", "undecided"].contains(&m["phase"].as_str().unwrap_or("")) {
            return m;
        }
        assert!(t0.elapsed() < limit, "migration did not end: {m}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn start(vm: &str) -> String {
    let lines = ok(&[
        "--json",
        "--site",
        "a",
        "migrate",
        vm,
        "--to",
        "b",
        "--no-wait",
    ]);
    last_data(&lines, "migration")["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn wait_no_vms(site: &str, limit: Duration) {
    let t0 = Instant::now();
    while !vm_names(site).is_empty() {
        assert!(
            t0.elapsed() < limit,
            "VMs left at {site}: {:?}",
            vm_names(site)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The WAN is cut mid-migration: the VM keeps running at the source with
/// its memory intact, nothing is left at the destination, and the error
/// says what happened.
#[test]
fn test_live_migration_wan_cut() {
    let _g = LAB.lock().unwrap_or_else(|p| p.into_inner());
    // A slow link keeps the migration in flight long enough to cut it.
    let _lab = Lab::up("50ms", "20mbit");
    let boot = boot_with_memdirty("vm1", "256", 64, 500);
    let id = start("vm1");
    wait_transferred("a", &id, 8 << 20);
    ok(&["lab", "cut", "a", "b"]);
    let m = wait_terminal("a", &id, Duration::from_secs(90));
    assert_eq!(m["phase"], "failed", "{m}");
    let err = m["error"].as_str().unwrap_or_default().to_owned();
    assert!(!err.is_empty(), "{m}");
    eprintln!("cut error: {err}");
    ok(&["lab", "heal", "a", "b"]);
    assert_runs_at("a", "vm1", &boot);
    assert_memory_intact("a", "vm1");
    wait_no_vms("b", Duration::from_secs(60));
}

/// The destination QEMU dies mid-migration: the source keeps the VM.
#[test]
fn test_live_migration_destination_qemu_dies() {
    let _g = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let _lab = Lab::up("20ms", "20mbit");
    let boot = boot_with_memdirty("vm1", "256", 64, 500);
    let id = start("vm1");
    wait_transferred("a", &id, 8 << 20);
    let dest = last_data(&ok(&["--json", "--site", "b", "vm", "show", "vm1"]), "vm");
    assert_eq!(dest["state"], "incoming", "{dest}");
    let pid = dest["pid"].as_u64().unwrap();
    // SAFETY: plain kill(2) on a pid we just read from the agent.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let m = wait_terminal("a", &id, Duration::from_secs(90));
    assert_eq!(m["phase"], "failed", "{m}");
    eprintln!("destination QEMU death: {}", m["error"]);
    assert_runs_at("a", "vm1", &boot);
    assert_memory_intact("a", "vm1");
    wait_no_vms("b", Duration::from_secs(30));
}

/// The destination agent is killed mid-migration: the source keeps the VM,
/// and the orphaned destination QEMU does not survive its lost stream.
#[test]
fn test_live_migration_peer_agent_dies() {
    let _g = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let _lab = Lab::up("20ms", "20mbit");
    let boot = boot_with_memdirty("vm1", "256", 64, 500);
    let id = start("vm1");
    wait_transferred("a", &id, 8 << 20);
    let dest = last_data(&ok(&["--json", "--site", "b", "vm", "show", "vm1"]), "vm");
    let qemu_pid = dest["pid"].as_u64().unwrap() as i32;
    let agent_pid: i32 = std::fs::read_to_string("/run/godwit/lab/sites/b/agent.pid")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: plain kill(2) on the lab agent's pid.
    unsafe { libc::kill(agent_pid, libc::SIGKILL) };
    let m = wait_terminal("a", &id, Duration::from_secs(90));
    assert_eq!(m["phase"], "failed", "{m}");
    eprintln!("peer agent death: {}", m["error"]);
    assert_runs_at("a", "vm1", &boot);
    assert_memory_intact("a", "vm1");
    // The destination QEMU lost its stream with its agent and exits.
    let t0 = Instant::now();
    // SAFETY: kill with signal 0 only checks for existence.
    while unsafe { libc::kill(qemu_pid, 0) } == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "orphaned destination QEMU {qemu_pid} still runs"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Bad input gets a clear error and changes nothing.
#[test]
fn test_migrate_to_unknown_site_is_refused() {
    let _g = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let _lab = Lab::up("0ms", "100mbit");
    ok(&[
        "--json", "--site", "a", "vm", "create", "vm1", "--memory", "128",
    ]);
    let out = godwit(&["--site", "a", "migrate", "vm1", "--to", "nowhere"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nowhere"), "{err}");
    let out = godwit(&["--site", "a", "migrate", "nosuchvm", "--to", "b"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("nosuchvm"));
    assert_eq!(vm_names("a"), vec!["vm1".to_owned()]);
}

/// An operator cancels a migration in flight: the VM keeps running at the
/// source, untouched, and the destination discards its QEMU.
#[test]
fn test_live_migration_cancel() {
    let _g = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let _lab = Lab::up("20ms", "20mbit");
    let boot = boot_with_memdirty("vm1", "256", 64, 500);
    let id = start("vm1");
    wait_transferred("a", &id, 8 << 20);
    let lines = godwit(&["--json", "--site", "a", "migration", &id, "--cancel"]);
    let m = last_data(&json_lines(&lines), "summary");
    assert_eq!(m["phase"], "failed", "{m}");
    assert!(
        m["error"]
            .as_str()
            .unwrap_or_default()
            .contains("cancelled"),
        "{m}"
    );
    assert_runs_at("a", "vm1", &boot);
    assert_memory_intact("a", "vm1");
    wait_no_vms("b", Duration::from_secs(30));
}

/// RAM files of the lab site `site`'s guests (the agent's `ram_dir`).
fn ram_files(site: &str) -> Vec<String> {
    let dir = format!("/dev/shm/godwit/lab-{site}");
    let mut v: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".ram"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Same-host handovers (`godwit upgrade`): the new QEMU takes the RAM file
/// over, nothing but device state moves, memory stays intact; a failed
/// upgrade leaves the VM running in its QEMU; and a VM that was handed
/// over still migrates to another site with all its memory.
#[test]
fn test_same_host_handover() {
    let _g = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let _lab = Lab::up("0ms", "1000mbit");
    // A disk the guest keeps writing and checking across every handover.
    let disk = std::env::temp_dir().join(format!("godwit-handover-{}.raw", std::process::id()));
    std::fs::write(&disk, vec![0u8; 16 << 20]).expect("creating the test disk");
    let disk_s = disk.to_string_lossy().into_owned();
    ok(&[
        "--json", "--site", "a", "vm", "create", "vm1", "--memory", "256", "--disk", &disk_s,
        "--wait",
    ]);
    let started = guest(
        "a",
        "vm1",
        json!({"cmd": "memdirty_start", "mib": 64, "rate_pages_per_s": 500, "pattern": "random"}),
    );
    assert_eq!(started["report"], "ack", "{started}");
    let started = guest(
        "a",
        "vm1",
        json!({"cmd": "diskio_start", "device": "/dev/vda", "mib": 16, "mode": "randrw", "block_kib": 4}),
    );
    assert_eq!(started["report"], "ack", "{started}");
    let info = last_data(&ok(&["--json", "--site", "a", "vm", "show", "vm1"]), "vm");
    let boot = info["guest"]["boot_id"]
        .as_str()
        .expect("boot id")
        .to_owned();
    assert_eq!(ram_files("a").len(), 1);
    for i in 0..3 {
        let lines = ok(&["--json", "--site", "a", "upgrade", "vm1"]);
        let m = last_data(&lines, "summary");
        assert_eq!(m["phase"], "completed", "{m}");
        let r = &m["report"];
        eprintln!("handover {i}: {r}");
        assert_eq!(r["mode"], "handover", "{r}");
        assert_eq!(r["local"]["ram_shared"], true, "{r}");
        assert_eq!(r["wire_bytes"], 0, "{r}");
        // Device state, ROMs and ACPI tables only: no guest RAM.
        assert!(r["stream_bytes"].as_u64().unwrap() < 2 << 20, "{r}");
        assert!(r["local"]["guest_pause_ms"].as_f64().is_some(), "{r}");
        assert_runs_at("a", "vm1", &boot);
        assert_memory_intact("a", "vm1");
        // The old QEMU is gone and the one RAM file stays.
        assert_eq!(ram_files("a").len(), 1, "{:?}", ram_files("a"));
    }
    // Every block the guest wrote before and across the handovers reads back.
    let stopped = guest("a", "vm1", json!({"cmd": "diskio_stop"}));
    assert_eq!(stopped["report"], "ack", "{stopped}");
    let v = guest(
        "a",
        "vm1",
        json!({"cmd": "diskio_verify", "device": "/dev/vda"}),
    );
    assert_eq!(v["report"], "verify", "{v}");
    assert_eq!(v["errors"], 0, "disk errors after handovers: {v}");
    // A new QEMU that cannot start: the VM keeps running where it was.
    let out = godwit(&[
        "--json",
        "--site",
        "a",
        "upgrade",
        "vm1",
        "--qemu",
        "/nonexistent/qemu-system-x86_64",
    ]);
    assert!(!out.status.success(), "an impossible upgrade succeeded");
    let m = last_data(&json_lines(&out), "summary");
    assert_eq!(m["phase"], "failed", "{m}");
    assert_runs_at("a", "vm1", &boot);
    assert_memory_intact("a", "vm1");
    // The handed-over QEMU still migrates to another site with its RAM.
    let m = last_data(
        &ok(&["--json", "--site", "a", "migrate", "vm1", "--to", "b"]),
        "summary",
    );
    assert_eq!(m["phase"], "completed", "{m}");
    assert_runs_at("b", "vm1", &boot);
    assert_memory_intact("b", "vm1");
    assert!(ram_files("a").is_empty(), "{:?}", ram_files("a"));
    let _ = std::fs::remove_file(&disk);
}

/// Boots the test guest at `site` with a NIC on the overlay and eth0 at
/// `ip`; returns its VM info.
fn boot_on_overlay(site: &str, vm: &str, ip: &str) -> Value {
    boot_on_overlay_with(site, vm, ip, &[])
}

/// [`boot_on_overlay`] with more `vm create` flags.
fn boot_on_overlay_with(site: &str, vm: &str, ip: &str, flags: &[&str]) -> Value {
    let mut args = vec![
        "--json", "--site", site, "vm", "create", vm, "--ip", ip, "--wait",
    ];
    args.extend_from_slice(flags);
    last_data(&ok(&args), "vm")
}

/// Starts a TCP echo server on port 7000 in the guest.
fn serve_echo(site: &str, vm: &str) {
    let served = guest(
        site,
        vm,
        json!({"cmd": "tcp_echo_serve", "bind": "0.0.0.0:7000"}),
    );
    assert_eq!(served["report"], "ack", "{served}");
}

/// The location of `mac` in `site`'s registry: (host, sequence number).
fn location(site: &str, mac: &str) -> (String, u64) {
    let st = last_data(&ok(&["--json", "--site", site, "status"]), "status");
    let locs = st["network"]["overlay"]["switch"]["locations"]
        .as_array()
        .unwrap_or_else(|| panic!("no network in the status of {site}: {st}"))
        .clone();
    let e = locs
        .iter()
        .find(|e| e["mac"] == mac)
        .unwrap_or_else(|| panic!("{mac} unknown at {site}: {locs:?}"));
    (
        e["host"].as_str().unwrap_or_default().to_owned(),
        e["seq"].as_u64().unwrap_or_default(),
    )
}

/// Runs a guest probe to its final report, in the background.
fn probe(site: &'static str, vm: &'static str, cmd: Value) -> std::thread::JoinHandle<Value> {
    std::thread::spawn(move || guest_with(site, vm, &cmd, &["--until-done"]))
}

/// Network continuity (issue 5): a guest keeps its address, a UDP stream
/// and a TCP connection to a guest at the other site while it moves a→b,
/// back to a, and is handed over to a new QEMU at a. Every site learns its
/// new location with a higher sequence number.
#[test]
fn test_network_continuity() {
    let _g = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let _lab = Lab::up("25ms", "100mbit");
    let mover = boot_on_overlay("a", "mover", "10.9.0.1/24");
    boot_on_overlay("b", "peer", "10.9.0.2/24");
    let mac = mover["spec"]["nic"]["mac"]
        .as_str()
        .unwrap_or_else(|| panic!("--ip gives the VM a NIC: {mover}"))
        .to_owned();
    serve_echo("a", "mover");
    let recv = probe(
        "b",
        "peer",
        json!({"cmd": "udp_recv", "bind": "0.0.0.0:5000", "duration_s": 50}),
    );
    let tcp = probe(
        "b",
        "peer",
        json!({"cmd": "tcp_echo_client", "dest": "10.9.0.1:7000", "interval_ms": 50, "duration_s": 46}),
    );
    std::thread::sleep(Duration::from_secs(1));
    // 520 kbit/s as in seed 002; the sender's final report is not awaited
    // (its guest moves away from the agent that took the command).
    guest(
        "a",
        "mover",
        json!({"cmd": "udp_send", "dest": "10.9.0.2:5000", "rate_kbit": 520, "payload": 200, "duration_s": 44}),
    );
    std::thread::sleep(Duration::from_secs(3));
    let mut downtimes = Vec::new();
    for (from, to) in [("a", "b"), ("b", "a")] {
        let m = last_data(
            &ok(&["--json", "--site", from, "migrate", "mover", "--to", to]),
            "summary",
        );
        assert_eq!(m["phase"], "completed", "{m}");
        downtimes.push(m["report"]["downtime_ms"].as_u64().unwrap_or(0));
        std::thread::sleep(Duration::from_secs(3));
    }
    // A same-host handover: the NIC follows the guest to the new QEMU.
    let up = last_data(
        &ok(&["--json", "--site", "a", "upgrade", "mover"]),
        "summary",
    );
    assert_eq!(up["phase"], "completed", "{up}");
    let udp = recv.join().expect("UDP receiver");
    let tcp = tcp.join().expect("TCP client");
    eprintln!("network continuity: downtimes {downtimes:?} ms\n  udp {udp}\n  tcp {tcp}");
    let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"));
    // ~325 datagrams/s for ~44 s.
    assert!(n(&udp, "received") > 10_000, "{udp}");
    assert_eq!(n(&udp, "duplicates"), 0, "{udp}");
    assert!(n(&udp, "lost") * 100 <= n(&udp, "received"), "{udp}");
    // Seed 002's mobile-IPv6 design stopped a stream for ~6 s per move.
    assert!(n(&udp, "max_gap_ms") < 3_000, "{udp}");
    assert_eq!(n(&tcp, "connects"), 1, "{tcp}");
    assert_eq!(n(&tcp, "resets"), 0, "{tcp}");
    assert_eq!(n(&tcp, "mismatches"), 0, "{tcp}");
    assert!(n(&tcp, "echoed") > 200, "{tcp}");
    // Both sites hold the guest at a, after two moves.
    for site in ["a", "b"] {
        assert_eq!(location(site, &mac), ("a".to_owned(), 2), "at {site}");
    }
}

/// Runs a program in a lab site's network namespace; returns its stdout.
fn in_site(lab: &Value, site: &str, argv: &[&str]) -> std::process::Output {
    let netns = lab["sites"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == site))
        .and_then(|s| s["netns"].as_str())
        .unwrap_or_else(|| panic!("no site {site} in {lab}"))
        .to_owned();
    Command::new("ip")
        .args(["netns", "exec", &netns])
        .args(argv)
        .output()
        .expect("running ip netns exec")
}

/// Runs the guest tool's TCP echo client as a host program in `site`'s
/// namespace (scripts/test builds the static tool); returns its final
/// report and its stderr.
fn host_echo_client(
    lab: &Value,
    site: &str,
    dest: &str,
    interval_ms: u64,
    secs: u64,
) -> (Value, String) {
    let tool = std::env::var("GODWIT_GUEST_BIN").expect("GODWIT_GUEST_BIN (set by scripts/test)");
    let (interval, secs) = (interval_ms.to_string(), secs.to_string());
    let out = in_site(
        lab,
        site,
        &[
            &tool,
            "tcp-echo-client",
            "--dest",
            dest,
            "--interval-ms",
            &interval,
            "--duration",
            &secs,
        ],
    );
    // Each line is a protocol frame: a "GW1 " prefix, then the report.
    let last = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(&l[l.find('{')?..]).ok())
        .next_back()
        .unwrap_or_default();
    (last, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Deliverable 2's plain VXLAN mode: a host with no agent, only a Linux
/// `vxlan` device, reaches a guest on the overlay, before and after the
/// guest migrates to another site.
#[test]
fn test_kernel_vxlan_peer() {
    let _g = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let (_lab, lab) = Lab::up_with("10ms", "100mbit", &["--sites", "3", "--kernel-vxlan", "c"]);
    let added = in_site(
        &lab,
        "c",
        &["ip", "addr", "add", "10.9.0.3/24", "dev", "vx0"],
    );
    assert!(added.status.success(), "{added:?}");
    boot_on_overlay("a", "mover", "10.9.0.1/24");
    serve_echo("a", "mover");
    let ping = |when: &str| {
        // A TCP echo exchange from the kernel side: ARP, learning on both
        // sides and the connection all have to work.
        let (last, stderr) = host_echo_client(&lab, "c", "10.9.0.1:7000", 100, 4);
        eprintln!("kernel vxlan peer, {when}: {last}");
        assert!(
            last["echoed"].as_u64().unwrap_or(0) > 5 && last["resets"] == 0,
            "no TCP echo from the guest {when}: {last} {stderr}"
        );
    };
    ping("guest at a");
    let m = last_data(
        &ok(&["--json", "--site", "a", "migrate", "mover", "--to", "b"]),
        "summary",
    );
    assert_eq!(m["phase"], "completed", "{m}");
    ping("guest moved to b");
    let st = last_data(&ok(&["--json", "--site", "b", "status"]), "status");
    let vx = &st["network"]["vxlan"];
    assert!(
        vx["sent"].as_u64().unwrap_or(0) > 0,
        "no VXLAN sent from b: {st}"
    );
    assert!(
        vx["received"].as_u64().unwrap_or(0) > 0,
        "no VXLAN received at b: {st}"
    );
}

/// Deliverable 4, routing out of the overlay: with the distributed gateway
/// (the same address and MAC at every site, routed by each site's kernel),
/// a TCP connection between a guest and a host outside the overlay (site
/// c's own address, in another IP subnet) stays open while the guest moves
/// a→b and back. The guest's replies leave through the gateway of
/// whichever site it runs at; c reaches the guest through its own router.
#[test]
fn test_routing_out_of_the_overlay() {
    let _g = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let (_lab, lab) = Lab::up_with(
        "25ms",
        "100mbit",
        &["--sites", "3", "--gateway", "10.9.0.254/24"],
    );
    let tool = std::env::var("GODWIT_GUEST_BIN").expect("GODWIT_GUEST_BIN (set by scripts/test)");
    boot_on_overlay_with("a", "mover", "10.9.0.1/24", &["--gateway", "10.9.0.254"]);
    serve_echo("a", "mover");
    // The client runs on site c's host, not in any guest, and talks from
    // c's own address (10.77.3.1).
    let client = {
        let lab = lab.clone();
        std::thread::spawn(move || host_echo_client(&lab, "c", "10.9.0.1:7000", 50, 24))
    };
    std::thread::sleep(Duration::from_secs(4));
    let routed = |site: &str| {
        let st = last_data(&ok(&["--json", "--site", site, "status"]), "status");
        st["network"]["router"]["to_host"].as_u64().unwrap_or(0)
    };
    let before = [routed("a"), routed("b")];
    for (from, to) in [("a", "b"), ("b", "a")] {
        let m = last_data(
            &ok(&["--json", "--site", from, "migrate", "mover", "--to", to]),
            "summary",
        );
        assert_eq!(m["phase"], "completed", "{m}");
        std::thread::sleep(Duration::from_secs(4));
    }
    let after = [routed("a"), routed("b")];
    // Full-size frames (1442 bytes, more than one QUIC datagram holds):
    // split by c's agent, put back together by a's.
    let recv = probe(
        "a",
        "mover",
        json!({"cmd": "udp_recv", "bind": "0.0.0.0:5001", "duration_s": 6}),
    );
    std::thread::sleep(Duration::from_secs(1));
    let sent = in_site(
        &lab,
        "c",
        &[
            &tool,
            "udp-send",
            "--dest",
            "10.9.0.1:5001",
            "--rate-kbit",
            "2000",
            "--payload",
            "1400",
            "--duration",
            "3",
        ],
    );
    assert!(sent.status.success(), "{sent:?}");
    let big = recv.join().expect("UDP receiver");
    let (tcp, stderr) = client.join().expect("TCP client");
    eprintln!(
        "routing out: tcp {tcp}; routed at a, b: {before:?} -> {after:?}; 1400-byte udp {big}"
    );
    let n = |v: &Value, k: &str| {
        v[k].as_u64()
            .unwrap_or_else(|| panic!("no {k} in {v}: {stderr}"))
    };
    assert_eq!(n(&tcp, "connects"), 1, "{tcp}");
    assert_eq!(n(&tcp, "resets"), 0, "{tcp}");
    assert_eq!(n(&tcp, "mismatches"), 0, "{tcp}");
    // One echo per ~100 ms (50 ms round trip plus the interval) for 24 s.
    assert!(n(&tcp, "echoed") > 150, "{tcp}");
    // Neither the first contact (c's kernel resolving the guest) nor a
    // move may stall the connection for long.
    assert!(n(&tcp, "max_stall_ms") < 3_000, "{tcp}");
    // The guest's replies left through b's router while it ran at b, and
    // through a's again once back.
    assert!(
        after[1] > before[1],
        "b routed nothing: {before:?} -> {after:?}"
    );
    assert!(
        after[0] > before[0],
        "a routed nothing: {before:?} -> {after:?}"
    );
    // ~180 datagrams/s for 3 s, every one split in two on the way.
    assert!(n(&big, "received") > 400, "{big}");
    assert!(n(&big, "lost") * 100 <= n(&big, "received"), "{big}");
    let st = last_data(&ok(&["--json", "--site", "a", "status"]), "status");
    let reassembled = st["network"]["datagrams"]["rx_reassembled"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        reassembled >= n(&big, "received"),
        "a reassembled {reassembled}: {st}"
    );
}

/// Live QEMU processes of `vm` at lab site `site` (their command lines
/// name the instance directory under the site's run directory).
fn qemu_pids(site: &str, vm: &str) -> Vec<u32> {
    let needle = format!("/sites/{site}/run/vms/{vm}-");
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
            .unwrap_or(true);
        if cmd.contains("qemu-system") && cmd.contains(&needle) && !zombie {
            pids.push(pid);
        }
    }
    pids
}

/// Waits until `vm` at `site` runs in exactly one QEMU; returns its pid.
fn wait_one_qemu(site: &str, vm: &str) -> u32 {
    let t0 = Instant::now();
    loop {
        let pids = qemu_pids(site, vm);
        if pids.len() == 1 {
            return pids[0];
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{vm} at {site} runs in {} QEMUs: {pids:?}",
            pids.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The agent dies (SIGKILL, at a crash point) in the middle of a
/// same-host handover, once before the old QEMU migrates and once after it
/// completed but before the new one runs. The restarted agent keeps the
/// QEMU that owns the guest (the old one, then the new one), retires the
/// other without touching the shared RAM file, and the guest runs on with
/// every page intact: never two QEMUs running it, never none.
#[test]
fn test_handover_agent_crash() {
    let _g = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let _lab = Lab::up("0ms", "1000mbit");
    let boot = boot_with_memdirty("vm1", "256", 64, 500);
    for (point, keeps_new) in [
        ("handover-before-migrate", false),
        ("handover-before-cont", true),
    ] {
        let before = wait_one_qemu("a", "vm1");
        ok(&["lab", "restart", "a", "--failpoint", point]);
        let out = godwit(&["--json", "--site", "a", "upgrade", "vm1"]);
        assert!(
            !out.status.success(),
            "the upgrade survived the crash at {point}"
        );
        ok(&["lab", "restart", "a"]);
        let after = wait_one_qemu("a", "vm1");
        eprintln!("crash at {point}: QEMU {before} -> {after}");
        assert_eq!(after != before, keeps_new, "crash at {point}");
        assert_runs_at("a", "vm1", &boot);
        assert_memory_intact("a", "vm1");
        assert_eq!(ram_files("a").len(), 1, "{:?}", ram_files("a"));
        let info = last_data(&ok(&["--json", "--site", "a", "vm", "show", "vm1"]), "vm");
        assert_eq!(info["pid"].as_u64(), Some(u64::from(after)), "{info}");
    }
    // The settled VM hands over again as usual.
    let m = last_data(&ok(&["--json", "--site", "a", "upgrade", "vm1"]), "summary");
    assert_eq!(m["phase"], "completed", "{m}");
    assert_runs_at("a", "vm1", &boot);
    assert_memory_intact("a", "vm1");
}

/// The source agent is killed (SIGKILL) while it evacuates its host. The
/// migration in flight fails, its VM keeps running at the source, and the
/// restarted agent resumes the evacuation by itself: both VMs end at the
/// destination with their memory intact and nothing is left behind.
#[test]
fn test_evacuation_resumes_after_agent_crash() {
    let _g = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let _lab = Lab::up("10ms", "100mbit");
    let boot1 = boot_with_memdirty("vm1", "256", 64, 500);
    let boot2 = boot_with_memdirty("vm2", "192", 32, 200);
    let mut cli = std::process::Command::new(env!("CARGO_BIN_EXE_godwit"))
        .args([
            "--json",
            "--site",
            "a",
            "evacuate",
            "a",
            "--to",
            "b",
            "--parallel",
            "1",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting godwit evacuate");
    // The first (largest) VM is on its way: its destination QEMU exists.
    let t0 = Instant::now();
    while !vm_names("b").contains(&"vm1".to_owned()) {
        assert!(t0.elapsed() < Duration::from_secs(60), "vm1 never left");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    ok(&["lab", "restart", "a"]);
    let _ = cli.wait();
    let t0 = Instant::now();
    loop {
        let (here, there) = (vm_names("a"), vm_names("b"));
        if here.is_empty() && there.len() == 2 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(240),
            "evacuation did not resume: at a {here:?}, at b {there:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    for (vm, boot) in [("vm1", &boot1), ("vm2", &boot2)] {
        assert_runs_at("b", vm, boot);
        assert_memory_intact("b", vm);
        assert!(qemu_pids("a", vm).is_empty(), "{vm} still has a QEMU at a");
    }
    // It was the restarted agent that finished the job, and the migration
    // the crash cut went again.
    let log = std::fs::read_to_string("/run/godwit/lab/sites/a/agent.log").unwrap();
    for l in log.lines().filter(|l| l.contains("evacuation")) {
        eprintln!("{l}");
    }
    assert!(log.contains("resuming the evacuation a restart interrupted"));
    let started = log
        .lines()
        .filter(|l| l.contains("migration started") && l.contains("vm=\"vm1\""))
        .count();
    assert!(started >= 2, "vm1 should have gone again");
    // b did not wait for its dead connection to time out: the new
    // migration of vm1 superseded the one the crash cut.
    let log_b = std::fs::read_to_string("/run/godwit/lab/sites/b/agent.log").unwrap();
    assert!(
        log_b.contains("superseded a stale incoming migration"),
        "b kept the stale incoming vm1"
    );
}
