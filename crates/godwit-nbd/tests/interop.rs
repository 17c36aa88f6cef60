//! Interop with real NBD clients: qemu-img and qemu-io (QEMU 7.2's block
//! layer), nbdinfo and nbdcopy (libnbd). Each test serves image files from
//! this process on a unix socket, drives a client against it and then checks
//! the image files themselves: content byte for byte, and that discarded or
//! zeroed ranges are holes.
//!
//! A missing client tool skips its test with a printed reason.

use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use godwit_nbd::server::{bind_unix, serve_listener, ServedExport};
use godwit_nbd::FileExport;
use tokio::sync::oneshot;

const MIB: u64 = 1024 * 1024;

struct Server {
    dir: tempfile::TempDir,
    socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Serve `(name, image, read_only)` triples from images in a fresh dir.
    async fn start(dir: tempfile::TempDir, exports: &[(&str, &str, bool)]) -> Result<Self> {
        let socket = dir.path().join("nbd.sock");
        let mut served = Vec::new();
        for (name, file, ro) in exports {
            let e = FileExport::open(dir.path().join(file), *ro)?;
            served.push(ServedExport::new(*name, Arc::new(e)));
        }
        let listener = bind_unix(&socket)?;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = rx.await;
            };
            if let Err(e) = serve_listener(listener, served, shutdown).await {
                eprintln!("server error: {e}");
            }
        });
        Ok(Self {
            dir,
            socket,
            stop: Some(tx),
            task: Some(task),
        })
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

fn have(tool: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Skip (return early) with a printed reason when a tool is missing.
macro_rules! require {
    ($($tool:expr),+) => {
        $(if !have($tool) {
            eprintln!("SKIPPED: `{}` is not installed", $tool);
            return Ok(());
        })+
    };
}

async fn run(cmd: &str, args: &[&str]) -> Result<Output> {
    let mut c = tokio::process::Command::new(cmd);
    c.args(args).kill_on_drop(true);
    // nbdsh needs the system python first in PATH (a pyenv python3 may
    // shadow it on dev machines).
    let path = std::env::var("PATH").unwrap_or_default();
    c.env("PATH", format!("/usr/bin:{path}"));
    let out = tokio::time::timeout(std::time::Duration::from_secs(120), c.output())
        .await
        .with_context(|| format!("{cmd} timed out"))?
        .with_context(|| format!("spawn {cmd}"))?;
    Ok(out)
}

async fn run_ok(cmd: &str, args: &[&str]) -> Result<String> {
    let out = run(cmd, args).await?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "{cmd} {args:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    Ok(stdout)
}

fn sparse_image(path: &Path, size: u64) -> Result<()> {
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    Ok(())
}

/// Data (`true`) / hole (`false`) runs of a file, from SEEK_DATA/SEEK_HOLE.
fn file_map(path: &Path) -> Result<Vec<(u64, u64, bool)>> {
    let f = std::fs::File::open(path)?;
    let size = f.metadata()?.len();
    let fd = f.as_raw_fd();
    let mut runs = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        // SAFETY: lseek on an fd owned by `f`, alive for this call.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        let data = if data < 0 { size } else { data as u64 };
        if data > pos {
            runs.push((pos, data - pos, false));
            pos = data;
            continue;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 { size } else { hole as u64 };
        runs.push((pos, hole - pos, true));
        pos = hole;
    }
    Ok(runs)
}

fn is_hole(map: &[(u64, u64, bool)], start: u64, len: u64) -> bool {
    map.iter()
        .filter(|(s, l, _)| *s < start + len && s + l > start)
        .all(|(_, _, data)| !data)
}

fn allocated_bytes(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

fn assert_bytes(content: &[u8], start: u64, len: u64, value: u8) -> Result<()> {
    let range = &content[start as usize..(start + len) as usize];
    if let Some(i) = range.iter().position(|&b| b != value) {
        bail!(
            "byte at {} is {:#x}, expected {value:#x}",
            start + i as u64,
            range[i]
        );
    }
    Ok(())
}

fn deterministic_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Never zero, so data never reads as a hole.
            (x as u8) | 1
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_write_read_flush_discard_zero() -> Result<()> {
    require!("qemu-io");
    let dir = tempfile::tempdir()?;
    sparse_image(&dir.path().join("disk.raw"), 64 * MIB)?;
    let srv = Server::start(dir, &[("export", "disk.raw", false)]).await?;
    let uri = srv.uri("export");
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "flush",
            "-c",
            "discard 256k 256k",
            "-c",
            "write -P 0xcd 2M 1M",
            // -u (may unmap): WRITE_ZEROES without NO_HOLE, punches a hole.
            "-c",
            "write -z -u 2M 512k",
            // Without -u QEMU sets NO_HOLE: zeros, allocation kept.
            "-c",
            "write -z 2560k 256k",
            "-c",
            "read -P 0 256k 256k",
            "-c",
            "read -P 0 2M 768k",
            "-c",
            "read -P 0xcd 2816k 256k",
            "-c",
            "write -P 0x11 63M 1M",
            &uri,
        ],
    )
    .await?;
    ensure!(!out.contains("Pattern verification failed"), "{out}");
    ensure!(!out.contains("failed"), "{out}");

    let img = srv.path("disk.raw");
    let content = std::fs::read(&img)?;
    ensure!(content.len() as u64 == 64 * MIB, "image size changed");
    assert_bytes(&content, 0, 256 * 1024, 0xab)?;
    assert_bytes(&content, 256 * 1024, 256 * 1024, 0)?;
    assert_bytes(&content, 512 * 1024, 512 * 1024, 0xab)?;
    assert_bytes(&content, MIB, MIB, 0)?;
    assert_bytes(&content, 2 * MIB, 768 * 1024, 0)?;
    assert_bytes(&content, 2 * MIB + 768 * 1024, 256 * 1024, 0xcd)?;
    assert_bytes(&content, 3 * MIB, 60 * MIB, 0)?;
    assert_bytes(&content, 63 * MIB, MIB, 0x11)?;
    let map = file_map(&img)?;
    ensure!(
        is_hole(&map, 256 * 1024, 256 * 1024),
        "discard left data: {map:?}"
    );
    ensure!(
        is_hole(&map, 2 * MIB, 512 * 1024),
        "write -z left data: {map:?}"
    );
    ensure!(
        is_hole(&map, 4 * MIB, 59 * MIB),
        "untouched range allocated: {map:?}"
    );
    let alloc = allocated_bytes(&img)?;
    ensure!(
        alloc <= 3 * MIB,
        "image not sparse: {alloc} bytes allocated"
    );
    srv.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_info_convert_compare_keeps_sparse() -> Result<()> {
    require!("qemu-img");
    let dir = tempfile::tempdir()?;
    let size = 32 * MIB;
    // Source: data at a few places, holes elsewhere.
    let src = dir.path().join("src.raw");
    sparse_image(&src, size)?;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&src)?;
        f.write_all_at(&deterministic_bytes(MIB as usize, 1), 0)?;
        f.write_all_at(&deterministic_bytes(300_000, 2), 10 * MIB + 4096)?;
        f.write_all_at(&deterministic_bytes(4096, 3), size - 4096)?;
    }
    sparse_image(&dir.path().join("dst.raw"), size)?;
    let srv = Server::start(dir, &[("dst", "dst.raw", false)]).await?;
    let uri = srv.uri("dst");

    let info = run_ok("qemu-img", &["info", "--output=json", &uri]).await?;
    ensure!(
        info.contains(&format!("\"virtual-size\": {size}")),
        "{info}"
    );

    let src_s = src.to_string_lossy().into_owned();
    run_ok(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", &src_s, &uri],
    )
    .await?;
    let cmp = run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &src_s, &uri],
    )
    .await?;
    ensure!(cmp.contains("Images are identical"), "{cmp}");

    let want = std::fs::read(&src)?;
    let got = std::fs::read(srv.path("dst.raw"))?;
    ensure!(want == got, "destination image differs from the source");
    let alloc = allocated_bytes(&srv.path("dst.raw"))?;
    ensure!(
        alloc <= 2 * MIB,
        "destination not sparse: {alloc} bytes allocated"
    );

    // And back out through NBD reads into a local file.
    let back = srv.path("back.raw").to_string_lossy().into_owned();
    run_ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri, &back],
    )
    .await?;
    ensure!(std::fs::read(&back)? == want, "read-back differs");

    // Compare must be able to fail: change one byte on the server side.
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x77 20M 512", &uri],
    )
    .await?;
    let out = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &src_s, &uri],
    )
    .await?;
    ensure!(!out.status.success(), "compare missed a difference");
    srv.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_export_refuses_writes() -> Result<()> {
    require!("qemu-io");
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("ro.raw");
    std::fs::write(&img, vec![0x5a; MIB as usize])?;
    let srv = Server::start(dir, &[("ro", "ro.raw", true)]).await?;
    let uri = srv.uri("ro");
    run_ok(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x5a 0 1M", &uri],
    )
    .await?;
    // Ask QEMU to open it writable: it must fail or the write must fail.
    let out = run("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4k", &uri]).await?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        !text.contains("wrote 4096"),
        "write to a read-only export succeeded: {text}"
    );
    ensure!(std::fs::read(srv.path("ro.raw"))? == vec![0x5a; MIB as usize]);
    srv.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_map_list_and_nbdcopy_multi_conn() -> Result<()> {
    require!("nbdinfo", "nbdcopy");
    let dir = tempfile::tempdir()?;
    let size = 16 * MIB;
    let img = dir.path().join("a.raw");
    sparse_image(&img, size)?;
    let data = deterministic_bytes(MIB as usize, 9);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img)?;
        f.write_all_at(&data, 4 * MIB)?;
    }
    sparse_image(&dir.path().join("b.raw"), size)?;
    let srv = Server::start(dir, &[("a", "a.raw", false), ("b", "b.raw", false)]).await?;

    let map = run_ok("nbdinfo", &["--map", &srv.uri("a")]).await?;
    let rows: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let expect = [
        ["0", &(4 * MIB).to_string(), "3"],
        [&(4 * MIB).to_string(), &MIB.to_string(), "0"],
        [&(5 * MIB).to_string(), &(11 * MIB).to_string(), "3"],
    ];
    ensure!(rows.len() == 3, "unexpected map:\n{map}");
    for (row, want) in rows.iter().zip(expect.iter()) {
        ensure!(
            row[..3] == want[..],
            "unexpected map row {row:?}, want {want:?}:\n{map}"
        );
    }

    let list = run_ok("nbdinfo", &["--list", &srv.uri("a")]).await?;
    ensure!(
        list.contains("export=\"a\"") && list.contains("export=\"b\""),
        "{list}"
    );

    // nbdcopy a -> b over NBD with 4 connections each (the server advertises
    // multi-conn), then b -> a local file.
    run_ok("nbdcopy", &["-C", "4", &srv.uri("a"), &srv.uri("b")]).await?;
    let b = std::fs::read(srv.path("b.raw"))?;
    ensure!(
        b == std::fs::read(srv.path("a.raw"))?,
        "nbdcopy a->b differs"
    );
    ensure!(
        allocated_bytes(&srv.path("b.raw"))? <= 2 * MIB,
        "b not sparse"
    );
    let out = srv.path("out.raw").to_string_lossy().into_owned();
    run_ok("nbdcopy", &[&srv.uri("b"), &out]).await?;
    ensure!(std::fs::read(&out)? == b, "nbdcopy b->file differs");
    srv.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdsh_simple_replies_list_and_info() -> Result<()> {
    require!("/usr/bin/nbdsh");
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("d.raw");
    std::fs::write(&img, deterministic_bytes(MIB as usize, 4))?;
    let srv = Server::start(dir, &[("d", "d.raw", false)]).await?;
    // Without structured replies (like the Linux kernel client), then with
    // opt mode to check LIST and meta contexts.
    let script = format!(
        r#"
import nbd
h = nbd.NBD()
h.set_request_structured_replies(False)
h.connect_uri("{uri}")
assert not h.get_structured_replies_negotiated()
buf = h.pread(4096, 8192)
assert buf == open("{img}", "rb").read()[8192:8192+4096]
h.shutdown()

h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri("{uri}")
names = []
h.opt_list(lambda n, d: names.append(n))
assert names == ["d"], names
ctx = []
h.opt_list_meta_context(lambda n: ctx.append(n))
assert ctx == ["base:allocation"], ctx
h.set_export_name("nope")
try:
    h.opt_info()
    raise SystemExit("INFO for an unknown export succeeded")
except nbd.Error:
    pass
h.set_export_name("d")
h.add_meta_context("base:allocation")
h.opt_go()
assert h.can_meta_context("base:allocation")
assert h.get_size() == 1048576
h.shutdown()
print("ok")
"#,
        uri = srv.uri("d"),
        img = srv.path("d.raw").display()
    );
    // nbdsh needs the system python (see the reference notes).
    let out = run_ok("/usr/bin/nbdsh", &["-c", &script]).await?;
    ensure!(out.trim() == "ok", "{out}");
    srv.stop().await;
    Ok(())
}
