//! Boots the real image under QEMU (TCG) and drives the guest instrument
//! over its virtio-serial port.
//!
//! Needs: `apt-get download` access to the Debian archive (the first run
//! downloads the kernel, ~70 MB, into the image cache), `qemu-system-x86_64`,
//! and cargo (the static guest binary is built by `scripts/build-guest.sh`
//! into this test's own target dir unless `GODWIT_GUEST_BIN` points to one).
//! `GODWIT_IMAGE_CACHE` overrides the cache dir (default
//! `/var/cache/godwit/image`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use godwit_guest::proto::{
    decode_report, encode_line, Command as Cmd, DirtyPattern, DiskMode, Report,
};
use godwit_image::{build, cached, ImageConfig};

/// Time allowed for boot to the first hello under TCG (observed ~3-4 s).
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// Time allowed for any one command under TCG.
const CMD_TIMEOUT: Duration = Duration::from_secs(120);

fn guest_bin() -> PathBuf {
    if let Ok(p) = std::env::var("GODWIT_GUEST_BIN") {
        return p.into();
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-guest.sh");
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-static");
    let out = Command::new("sh")
        .arg(&script)
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTFLAGS")
        .stderr(Stdio::inherit())
        .output()
        .expect("run build-guest.sh");
    assert!(out.status.success(), "build-guest.sh failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

struct Qemu {
    child: Child,
    console: PathBuf,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Qemu {
    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }
}

struct Link {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Link {
    fn connect(sock: &Path) -> Link {
        let deadline = Instant::now() + Duration::from_secs(10);
        let s = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("connect {}: {e}", sock.display()),
            }
        };
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        Link {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        }
    }

    fn send(&mut self, c: &Cmd) {
        self.writer.write_all(encode_line(c).as_bytes()).unwrap();
    }

    /// Next report matching `want`, within `timeout`.
    fn expect(&mut self, timeout: Duration, want: impl Fn(&Report) -> bool, qemu: &Qemu) -> Report {
        let deadline = Instant::now() + timeout;
        let mut line = String::new();
        while Instant::now() < deadline {
            match self.reader.read_line(&mut line) {
                Ok(0) => panic!("guest link closed\nconsole:\n{}", qemu.console()),
                Ok(_) => {
                    if line.ends_with('\n') {
                        if let Ok(Some(r)) = decode_report(&line) {
                            if let Report::Error { .. } = r {
                                eprintln!("guest error: {r:?}");
                            }
                            if want(&r) {
                                return r;
                            }
                        }
                        line.clear();
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("read: {e}"),
            }
        }
        panic!(
            "timed out waiting for a report\nconsole:\n{}",
            qemu.console()
        );
    }

    fn request(&mut self, c: Cmd, qemu: &Qemu) -> Report {
        let id = c.id();
        self.send(&c);
        self.expect(
            CMD_TIMEOUT,
            |r| match r {
                Report::Ack { id: i }
                | Report::Error { id: i, .. }
                | Report::Verify { id: i, .. }
                | Report::Status { id: i, .. }
                | Report::Pong { id: i, .. }
                | Report::ShellResult { id: i, .. } => *i == id,
                _ => false,
            },
            qemu,
        )
    }
}

#[test]
fn test_boot_and_drive_guest() {
    let mut cfg = ImageConfig::new(guest_bin());
    if let Ok(dir) = std::env::var("GODWIT_IMAGE_CACHE") {
        cfg.cache_dir = dir.into();
    }
    let t = Instant::now();
    let img = build(&cfg).expect("build image");
    eprintln!("image ready in {:?}: {img:?}", t.elapsed());
    assert_eq!(cached(&cfg).unwrap().as_ref(), Some(&img));
    let initrd_mib = std::fs::metadata(&img.initrd).unwrap().len() as f64 / 1048576.0;
    eprintln!("initrd {initrd_mib:.1} MiB");

    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("guest.sock");
    let console = dir.path().join("console.log");
    let disk = dir.path().join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let t0 = Instant::now();
    let child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", "256", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(&img.kernel)
        .arg("-initrd")
        .arg(&img.initrd)
        .args(["-append", &img.cmdline])
        .args(["-device", "virtio-serial-pci"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=gs,path={},server=on,wait=off",
            sock.display()
        ))
        .args([
            "-device",
            "virtserialport,chardev=gs,name=org.godwit.guest.0",
        ])
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=raw", disk.display()))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&console).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn qemu");
    let qemu = Qemu { child, console };

    let mut link = Link::connect(&sock);
    let hello = link.expect(BOOT_TIMEOUT, |r| matches!(r, Report::Hello { .. }), &qemu);
    let boot = t0.elapsed();
    let Report::Hello {
        boot_id, uptime_ms, ..
    } = hello
    else {
        unreachable!()
    };
    eprintln!("boot to hello: {boot:?} (guest uptime {uptime_ms} ms)");

    assert!(matches!(
        link.request(Cmd::Ping { id: 1 }, &qemu),
        Report::Pong { id: 1, .. }
    ));

    let r = link.request(
        Cmd::MemdirtyStart {
            id: 2,
            mib: 32,
            rate_pages_per_s: 2000,
            pattern: DirtyPattern::Hotspot,
        },
        &qemu,
    );
    assert_eq!(r, Report::Ack { id: 2 }, "{}", qemu.console());
    std::thread::sleep(Duration::from_secs(2));
    let Report::Status {
        memdirty: Some(m), ..
    } = link.request(Cmd::Status { id: 3 }, &qemu)
    else {
        panic!("no memdirty status")
    };
    eprintln!("memdirty: {m:?}");
    assert!(m.running && m.pages == 8192 && m.pages_dirtied > 0);
    let v = link.request(Cmd::MemdirtyVerify { id: 4 }, &qemu);
    assert_eq!(
        v,
        Report::Verify {
            id: 4,
            pages: 8192,
            errors: 0,
            first_bad_page: None
        }
    );

    // The host side goes away and comes back (as at a migration): the
    // guest must greet the new connection and keep serving.
    drop(link);
    std::thread::sleep(Duration::from_millis(500));
    let t1 = Instant::now();
    let mut link = Link::connect(&sock);
    let hello2 = link.expect(
        Duration::from_secs(15),
        |r| matches!(r, Report::Hello { .. }),
        &qemu,
    );
    eprintln!("hello after reconnect in {:?}", t1.elapsed());
    assert!(matches!(hello2, Report::Hello { boot_id: ref b, .. } if *b == boot_id));
    assert!(matches!(
        link.request(Cmd::MemdirtyVerify { id: 5 }, &qemu),
        Report::Verify { errors: 0, .. }
    ));

    let t2 = Instant::now();
    let r = link.request(
        Cmd::RealisticStart {
            id: 6,
            anon_mib: 16,
            cache_mib: 16,
        },
        &qemu,
    );
    assert_eq!(r, Report::Ack { id: 6 });
    eprintln!("realistic built in {:?}", t2.elapsed());
    let Report::Status {
        realistic: Some(rs),
        mem,
        ..
    } = link.request(Cmd::Status { id: 7 }, &qemu)
    else {
        panic!("no realistic status")
    };
    eprintln!("realistic: {rs:?}\nmem: {mem:?}");
    assert!(rs.ready && rs.files > 100);
    assert!(rs.anon_built_bytes >= 16 << 20);
    assert!(rs.rss_anon_bytes >= 16 << 20);
    assert!(rs.tmpfs_copy_bytes >= 16 << 20 && rs.cache_read_bytes >= 16 << 20);

    // Block I/O on the virtio disk: a full write+verify pass, then an
    // exact verify from the job's generation table.
    let r = link.request(
        Cmd::DiskioStart {
            id: 10,
            device: "/dev/vda".into(),
            mib: 0,
            mode: DiskMode::WriteThenVerify,
            block_kib: 64,
        },
        &qemu,
    );
    assert_eq!(r, Report::Ack { id: 10 });
    let sample = link.expect(
        CMD_TIMEOUT,
        |r| matches!(r, Report::Diskio { id: 10, total, .. } if total.passes >= 1),
        &qemu,
    );
    eprintln!("diskio: {sample:?}");
    assert!(matches!(
        link.request(Cmd::DiskioStop { id: 11 }, &qemu),
        Report::Ack { id: 11 }
    ));
    let v = link.request(
        Cmd::DiskioVerify {
            id: 12,
            device: "/dev/vda".into(),
        },
        &qemu,
    );
    assert_eq!(
        v,
        Report::Verify {
            id: 12,
            pages: 256,
            errors: 0,
            first_bad_page: None
        }
    );

    let Report::ShellResult { stdout, code, .. } = link.request(
        Cmd::Shell {
            id: 8,
            argv: vec!["uname".into(), "-r".into()],
        },
        &qemu,
    ) else {
        panic!("no shell result")
    };
    assert_eq!(
        (code, stdout.trim()),
        (Some(0), img.kernel_version.as_str())
    );

    let Report::ShellResult { stdout, .. } = link.request(
        Cmd::Shell {
            id: 9,
            argv: vec!["cat".into(), "/proc/modules".into()],
        },
        &qemu,
    ) else {
        panic!("no shell result")
    };
    for m in ["virtio_console", "virtio_net", "virtio_blk", "virtio_pci"] {
        assert!(stdout.contains(m), "{m} not loaded:\n{stdout}");
    }
}
