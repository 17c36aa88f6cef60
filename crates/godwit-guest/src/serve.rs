//! Command dispatch: runs each [`Command`] as a job and reports results.
//!
//! [`Server`] is transport-agnostic: commands come in through
//! [`Server::handle_command`] and every [`Report`] goes to an mpsc sink;
//! [`crate::port`] wires it to the virtio-serial port (or stdio). Slow
//! commands (fills, verifies, builds, probes) run on their own threads so a
//! `status` or `ping` is answered while they work.

use std::process::Stdio;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::diskio::{self, DiskJob};
use crate::memdirty::{Memdirty, VerifyOutcome};
use crate::net;
use crate::proto::{Command, Report, MAX_SHELL_OUTPUT};
use crate::realistic::{error_chain, Realistic, RealisticConfig};
use crate::sys;

/// Version reported in [`Report::Hello`].
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The hello message for this boot.
pub fn hello() -> Report {
    Report::Hello {
        version: VERSION.to_string(),
        boot_id: sys::boot_id(),
        uptime_ms: sys::uptime_ms(),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Poisoned only if a job thread panicked; its slot is still usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Default)]
struct Jobs {
    memdirty: Mutex<Option<Arc<Memdirty>>>,
    realistic: Mutex<Option<Arc<Realistic>>>,
    diskio: Mutex<Option<Arc<DiskJob>>>,
    /// Serialises memdirty start/stop so two starts cannot both allocate.
    memdirty_op: Mutex<()>,
    /// Serialises diskio start/stop/verify on the device.
    diskio_op: Mutex<()>,
}

/// The command dispatcher.
#[derive(Clone)]
pub struct Server {
    jobs: Arc<Jobs>,
    sink: Sender<Report>,
    corpus_dir: std::path::PathBuf,
}

fn verify_report(id: u64, v: VerifyOutcome) -> Report {
    Report::Verify {
        id,
        pages: v.pages,
        errors: v.errors,
        first_bad_page: v.first_bad,
    }
}

fn err_report(id: u64, e: &dyn std::error::Error) -> Report {
    Report::Error {
        id,
        message: error_chain(e),
    }
}

fn truncated(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_SHELL_OUTPUT)]).into_owned()
}

impl Server {
    /// A dispatcher that sends every report to `sink`.
    pub fn new(sink: Sender<Report>) -> Self {
        Self {
            jobs: Arc::default(),
            sink,
            corpus_dir: crate::realistic::DEFAULT_CORPUS_DIR.into(),
        }
    }

    /// Use another corpus directory for `realistic_start` (tests).
    pub fn with_corpus_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.corpus_dir = dir.into();
        self
    }

    /// Send a report to the sink.
    pub fn handle_report(&self, r: Report) {
        self.send(r);
    }

    fn send(&self, r: Report) {
        // The sink only closes when the I/O loop is gone, i.e. at exit.
        let _ = self.sink.send(r);
    }

    fn spawn(&self, id: u64, name: &str, f: impl FnOnce(&Server) + Send + 'static) {
        let this = self.clone();
        let res = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || f(&this));
        if let Err(e) = res {
            self.send(err_report(id, &e));
        }
    }

    /// Current status snapshot.
    pub fn status(&self, id: u64) -> Report {
        let memdirty = lock(&self.jobs.memdirty).as_ref().map(|m| m.stats());
        let realistic = lock(&self.jobs.realistic).as_ref().map(|r| r.stats());
        let diskio = lock(&self.jobs.diskio).as_ref().map(|d| d.stats());
        Report::Status {
            id,
            uptime_ms: sys::uptime_ms(),
            memdirty,
            realistic,
            diskio,
            mem: sys::meminfo(),
        }
    }

    /// Run one command; its reports go to the sink (possibly later, from a
    /// job thread).
    pub fn handle_command(&self, cmd: Command) {
        match cmd {
            Command::Ping { id } => self.send(Report::Pong {
                id,
                uptime_ms: sys::uptime_ms(),
            }),
            Command::Status { id } => self.send(self.status(id)),
            Command::MemdirtyStart {
                id,
                mib,
                rate_pages_per_s,
                pattern,
            } => self.spawn(id, "memdirty-start", move |s| {
                let _op = lock(&s.jobs.memdirty_op);
                // Free the old buffer first so two never coexist.
                if let Some(old) = lock(&s.jobs.memdirty).take() {
                    old.stop();
                }
                match Memdirty::start(mib, rate_pages_per_s, pattern) {
                    Ok(m) => {
                        *lock(&s.jobs.memdirty) = Some(Arc::new(m));
                        s.send(Report::Ack { id });
                    }
                    Err(e) => s.send(err_report(id, &e)),
                }
            }),
            Command::MemdirtyStop { id } => {
                let m = lock(&self.jobs.memdirty).clone();
                match m {
                    Some(m) => {
                        m.stop();
                        self.send(Report::Ack { id });
                    }
                    None => self.send(Report::Error {
                        id,
                        message: "no memdirty running".into(),
                    }),
                }
            }
            Command::MemdirtyVerify { id } => {
                let m = lock(&self.jobs.memdirty).clone();
                match m {
                    Some(m) => {
                        self.spawn(id, "memdirty-verify", move |s| {
                            s.send(verify_report(id, m.verify()));
                        });
                    }
                    None => self.send(Report::Error {
                        id,
                        message: "no memdirty buffer to verify".into(),
                    }),
                }
            }
            Command::RealisticStart {
                id,
                anon_mib,
                cache_mib,
            } => self.spawn(id, "realistic", move |s| {
                // Drop any previous load before building the next.
                lock(&s.jobs.realistic).take();
                let mut cfg = RealisticConfig::new(anon_mib, cache_mib);
                cfg.corpus.clone_from(&s.corpus_dir);
                let r = Arc::new(Realistic::build(&cfg));
                let err = r.stats().error;
                *lock(&s.jobs.realistic) = Some(r);
                match err {
                    None => s.send(Report::Ack { id }),
                    Some(message) => s.send(Report::Error { id, message }),
                }
            }),
            Command::DiskioStart {
                id,
                device,
                mib,
                mode,
                block_kib,
            } => self.spawn(id, "diskio-start", move |s| {
                let _op = lock(&s.jobs.diskio_op);
                if let Some(old) = lock(&s.jobs.diskio).take() {
                    old.stop();
                }
                match DiskJob::start(id, &device, mib, mode, block_kib, s.sink.clone()) {
                    Ok(j) => {
                        *lock(&s.jobs.diskio) = Some(Arc::new(j));
                        s.send(Report::Ack { id });
                    }
                    Err(e) => s.send(err_report(id, &e)),
                }
            }),
            Command::DiskioStop { id } => self.spawn(id, "diskio-stop", move |s| {
                let _op = lock(&s.jobs.diskio_op);
                let j = lock(&s.jobs.diskio).clone();
                match j {
                    Some(j) => {
                        j.stop();
                        s.send(Report::Ack { id });
                    }
                    None => s.send(Report::Error {
                        id,
                        message: "no diskio running".into(),
                    }),
                }
            }),
            Command::DiskioVerify { id, device } => self.spawn(id, "diskio-verify", move |s| {
                let _op = lock(&s.jobs.diskio_op);
                let j = lock(&s.jobs.diskio)
                    .clone()
                    .filter(|j| j.device() == device);
                let res = match j {
                    Some(j) => j.verify(),
                    None => diskio::verify_stateless(&device),
                };
                match res {
                    Ok(v) => s.send(verify_report(id, v)),
                    Err(e) => s.send(err_report(id, &e)),
                }
            }),
            Command::UdpSend {
                id,
                dest,
                rate_kbit,
                payload,
                duration_s,
            } => self.spawn(id, "udp-send", move |s| {
                if let Err(e) = net::udp_send(id, &dest, rate_kbit, payload, duration_s, &s.sink) {
                    s.send(err_report(id, &e));
                }
            }),
            Command::UdpRecv {
                id,
                bind,
                duration_s,
            } => self.spawn(id, "udp-recv", move |s| {
                if let Err(e) = net::udp_recv(id, &bind, duration_s, &s.sink) {
                    s.send(err_report(id, &e));
                }
            }),
            Command::TcpEchoServe { id, bind } => {
                match net::tcp_echo_serve(id, &bind, self.sink.clone()) {
                    Ok(()) => self.send(Report::Ack { id }),
                    Err(e) => self.send(err_report(id, &e)),
                }
            }
            Command::TcpEchoClient {
                id,
                dest,
                interval_ms,
                duration_s,
            } => self.spawn(id, "tcp-client", move |s| {
                if let Err(e) = net::tcp_echo_client(id, &dest, interval_ms, duration_s, &s.sink) {
                    s.send(err_report(id, &e));
                }
            }),
            Command::Shell { id, argv } => self.spawn(id, "shell", move |s| {
                s.send(run_shell(id, &argv));
            }),
        }
    }
}

/// Run a program to completion and capture its output. There is no
/// timeout: the host decides what it runs, and a hung command only costs
/// one thread.
pub fn run_shell(id: u64, argv: &[String]) -> Report {
    let Some((prog, args)) = argv.split_first() else {
        return Report::Error {
            id,
            message: "empty argv".into(),
        };
    };
    match std::process::Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) => Report::ShellResult {
            id,
            code: out.status.code(),
            stdout: truncated(&out.stdout),
            stderr: truncated(&out.stderr),
        },
        Err(e) => Report::ShellResult {
            id,
            code: None,
            stdout: String::new(),
            stderr: format!("cannot run {prog}: {e}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::DirtyPattern;
    use std::sync::mpsc;
    use std::time::Duration;

    fn wait_for(rx: &mpsc::Receiver<Report>, id: u64) -> Report {
        loop {
            let r = rx.recv_timeout(Duration::from_secs(30)).unwrap();
            let rid = match &r {
                Report::Ack { id }
                | Report::Error { id, .. }
                | Report::Verify { id, .. }
                | Report::Status { id, .. }
                | Report::Pong { id, .. }
                | Report::ShellResult { id, .. } => *id,
                _ => continue,
            };
            if rid == id {
                return r;
            }
        }
    }

    #[test]
    fn dispatch_memdirty_and_friends() {
        let (tx, rx) = mpsc::channel();
        let s = Server::new(tx);
        s.handle_command(Command::Ping { id: 1 });
        assert!(matches!(wait_for(&rx, 1), Report::Pong { id: 1, .. }));
        s.handle_command(Command::MemdirtyVerify { id: 2 });
        assert!(matches!(wait_for(&rx, 2), Report::Error { .. }));
        s.handle_command(Command::MemdirtyStart {
            id: 3,
            mib: 2,
            rate_pages_per_s: 5000,
            pattern: DirtyPattern::Hotspot,
        });
        assert_eq!(wait_for(&rx, 3), Report::Ack { id: 3 });
        std::thread::sleep(Duration::from_millis(200));
        s.handle_command(Command::Status { id: 4 });
        let Report::Status {
            memdirty: Some(m), ..
        } = wait_for(&rx, 4)
        else {
            panic!()
        };
        assert!(m.running && m.pages == 512);
        s.handle_command(Command::MemdirtyVerify { id: 5 });
        assert_eq!(
            wait_for(&rx, 5),
            Report::Verify {
                id: 5,
                pages: 512,
                errors: 0,
                first_bad_page: None
            }
        );
        s.handle_command(Command::MemdirtyStop { id: 6 });
        assert_eq!(wait_for(&rx, 6), Report::Ack { id: 6 });
        s.handle_command(Command::Shell {
            id: 7,
            argv: vec!["sh".into(), "-c".into(), "echo hi; exit 3".into()],
        });
        assert_eq!(
            wait_for(&rx, 7),
            Report::ShellResult {
                id: 7,
                code: Some(3),
                stdout: "hi\n".into(),
                stderr: String::new()
            }
        );
        s.handle_command(Command::Shell {
            id: 8,
            argv: vec![],
        });
        assert!(matches!(wait_for(&rx, 8), Report::Error { .. }));
        s.handle_command(Command::DiskioVerify {
            id: 9,
            device: "/nonexistent".into(),
        });
        assert!(matches!(wait_for(&rx, 9), Report::Error { .. }));
    }
}
