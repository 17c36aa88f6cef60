//! The codec on streams captured from real QEMU migrations.
//!
//! A paused QEMU whose RAM holds a file twice (duplicate pages) and zeros
//! migrates into a file (`exec:cat`); the capture goes through the encoder
//! and decoder; a second QEMU loads the decoded stream (`-incoming`), and
//! both guests' RAM must match byte for byte. Skipped (with a note) when
//! `qemu-system-x86_64` is not installed.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use godwit_migstream::{Decoder, Encoder, EncoderConfig, MemStore, QemuFormat};

const QEMU: &str = "qemu-system-x86_64";
const RAM_MIB: u64 = 64;

struct Qemu {
    child: Child,
    qmp: BufReader<UnixStream>,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Qemu {
    fn start(dir: &Path, name: &str, extra: &[String]) -> Qemu {
        let sock = dir.join(format!("{name}.qmp"));
        let mut args: Vec<String> = [
            "-accel",
            "tcg",
            "-machine",
            "pc",
            "-m",
            &format!("{RAM_MIB}M"),
            "-nodefaults",
            "-display",
            "none",
            "-S",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push("-qmp".into());
        args.push(format!("unix:{},server=on,wait=off", sock.display()));
        args.extend_from_slice(extra);
        let child = Command::new(QEMU)
            .args(&args)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn qemu");
        let t0 = Instant::now();
        let stream = loop {
            match UnixStream::connect(&sock) {
                Ok(s) => break s,
                Err(_) if t0.elapsed() < Duration::from_secs(20) => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!("qmp: {e}"),
            }
        };
        let mut q = Qemu {
            child,
            qmp: BufReader::new(stream),
        };
        let mut greeting = String::new();
        q.qmp.read_line(&mut greeting).unwrap();
        q.cmd(serde_json::json!({"execute": "qmp_capabilities"}));
        q
    }

    fn cmd(&mut self, c: serde_json::Value) -> serde_json::Value {
        let s = self.qmp.get_mut();
        writeln!(s, "{c}").unwrap();
        loop {
            let mut line = String::new();
            assert!(self.qmp.read_line(&mut line).unwrap() > 0, "qmp closed");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v.get("return").is_some() || v.get("error").is_some() {
                return v;
            }
        }
    }

    fn wait_status(&mut self, query: &str, want: &str) {
        let t0 = Instant::now();
        loop {
            let v = self.cmd(serde_json::json!({"execute": query}));
            if v["return"]["status"] == want {
                return;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "{query}: {v}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn ram(&mut self, path: &Path) -> Vec<u8> {
        let v = self.cmd(serde_json::json!({"execute": "pmemsave", "arguments": {
            "val": 0, "size": RAM_MIB << 20, "filename": path.to_str().unwrap()}}));
        assert!(v.get("return").is_some(), "{v}");
        std::fs::read(path).unwrap()
    }
}

fn have_qemu() -> bool {
    Command::new(QEMU)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn real_capture_roundtrips_and_loads() {
    if !have_qemu() {
        eprintln!("skipping: {QEMU} not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 2 MiB of varied, compressible content, loaded twice at two addresses.
    let blob: Vec<u8> = (0..2u32 << 20)
        .map(|i| ((i / 4096) as u8) ^ ((i * 7) as u8 % 13))
        .collect();
    let blob_path: PathBuf = d.join("blob.bin");
    std::fs::write(&blob_path, &blob).unwrap();
    let loaders: Vec<String> = [0x200_0000u64, 0x300_0000]
        .iter()
        .flat_map(|a| {
            [
                "-device".to_string(),
                format!(
                    "loader,file={},addr={a:#x},force-raw=on",
                    blob_path.display()
                ),
            ]
        })
        .collect();
    let mut src = Qemu::start(d, "src", &loaders);
    let capture = d.join("stream.bin");
    let v = src.cmd(serde_json::json!({"execute": "migrate", "arguments": {
        "uri": format!("exec:cat > {}", capture.display())}}));
    assert!(v.get("return").is_some(), "{v}");
    src.wait_status("query-migrate", "completed");
    let stream = std::fs::read(&capture).unwrap();

    // Through the codec.
    let mut enc = Encoder::new(QemuFormat::default(), EncoderConfig::default()).unwrap();
    let mut dec = Decoder::new(MemStore::default());
    let mut wire = 0u64;
    let mut out = Vec::new();
    for c in stream.chunks(32 << 10) {
        enc.push(c).unwrap();
        while let Some(m) = enc.poll_message() {
            wire += m.payload.len() as u64;
            dec.push_message(&m.payload, 0).unwrap();
        }
    }
    enc.finish().unwrap();
    while let Some(m) = enc.poll_message() {
        wire += m.payload.len() as u64;
        dec.push_message(&m.payload, 0).unwrap();
    }
    while let Some(o) = dec.take_output() {
        out.extend_from_slice(&o);
    }
    assert!(enc.fallback().is_none(), "{:?}", enc.fallback());
    assert!(out == stream, "decoded stream differs from the capture");
    let st = enc.stats();
    assert!(
        st.ref_pages[0] >= 500,
        "the second copy should be intra refs: {st:?}"
    );
    assert!(
        wire * 10 < stream.len() as u64,
        "wire {wire} for a stream of {}",
        stream.len()
    );

    // A destination QEMU loads the decoded stream; its RAM is the source's.
    let decoded = d.join("decoded.bin");
    std::fs::write(&decoded, &out).unwrap();
    let mut dst = Qemu::start(
        d,
        "dst",
        &[
            "-incoming".into(),
            format!("exec:cat {}", decoded.display()),
        ],
    );
    dst.wait_status("query-migrate", "completed");
    let a = src.ram(&d.join("src.ram"));
    let b = dst.ram(&d.join("dst.ram"));
    assert!(a == b, "guest RAM differs after loading the decoded stream");
    assert_eq!(&a[0x200_0000..0x200_0000 + blob.len()], &blob[..]);
}
