//! The serve loop's transport: the `org.godwit.guest.0` virtio-serial port
//! (or stdio for use outside a guest).
//!
//! # Surviving the host going away
//!
//! The host end is a QEMU chardev socket; at every live migration the
//! source QEMU's socket goes away and the destination QEMU has a new one,
//! so the host side disconnects and reconnects under us. In the guest this
//! shows up as follows (drivers/char/virtio_console.c):
//!
//! * `poll()` reports `POLLHUP` while no host is connected, and `read()`
//!   returns 0 once buffered data is drained;
//! * `write()` blocks while no host is connected (or fails with `EAGAIN`
//!   on a non-blocking fd) and may accept only part of a buffer.
//!
//! So the port is opened non-blocking and driven by `poll()` with a short
//! timeout. `POLLHUP` or a 0-byte read marks the link down: we back off
//! and keep polling, never exit. Reports produced meanwhile are queued, up
//! to [`MAX_QUEUED_LINES`] (oldest dropped). A line cut by a disconnect is
//! dropped rather than finished on the next connection.
//!
//! **Hello policy:** a [`crate::proto::Report::Hello`] is sent at start,
//! first thing whenever the link comes up again (poll stops reporting
//! `POLLHUP`), and every [`HELLO_INTERVAL`] regardless, in case a host
//! connected in a way we could not observe.
//!
//! If the port disappears (`ENODEV`, `POLLNVAL`) or is not there yet at
//! boot, the loop re-scans `/sys/class/virtio-ports` every
//! [`REOPEN_DELAY`].

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use crate::proto::{decode_command, encode_line, Report, MAX_LINE_LEN};
use crate::serve::{hello, Server};

/// Name of the guest port (QEMU `virtserialport,name=`).
pub const PORT_NAME: &str = "org.godwit.guest.0";

/// Where the kernel lists virtio-serial ports.
pub const SYS_VIRTIO_PORTS: &str = "/sys/class/virtio-ports";

/// Period of unconditional hellos.
pub const HELLO_INTERVAL: Duration = Duration::from_secs(5);

/// Reports kept while the host is away: a few tens of seconds of disk
/// samples (10/s), far more than a migration switchover takes.
pub const MAX_QUEUED_LINES: usize = 1024;

/// `poll()` timeout: also the latency with which job reports (which arrive
/// on a channel, not an fd) are forwarded.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Back-off while the host is disconnected (poll returns at once then).
pub const HUP_BACKOFF: Duration = Duration::from_millis(50);

/// Delay between attempts to find and open the port.
pub const REOPEN_DELAY: Duration = Duration::from_secs(1);

/// Bytes read per `read()` call.
const READ_CHUNK: usize = 64 * 1024;

/// Find the `/dev` node of the virtio-serial port called `name` by reading
/// `<sys_dir>/*/name`.
pub fn find_port(sys_dir: &Path, name: &str) -> Option<PathBuf> {
    let rd = std::fs::read_dir(sys_dir).ok()?;
    let mut found: Vec<PathBuf> = rd
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("name")).is_ok_and(|n| n.trim_end() == name)
        })
        .map(|e| Path::new("/dev").join(e.file_name()))
        .collect();
    found.sort();
    found.into_iter().next()
}

/// Outgoing lines with bounded buffering and partial-write tracking.
#[derive(Debug, Default)]
pub struct OutQueue {
    lines: VecDeque<Vec<u8>>,
    /// Bytes of the front line already written.
    offset: usize,
    /// Lines dropped because the queue was full.
    pub dropped: u64,
}

impl OutQueue {
    /// Queue a line at the back, dropping the oldest unstarted line if full.
    pub fn push(&mut self, line: String) {
        if self.lines.len() >= MAX_QUEUED_LINES {
            // Never drop a line that is half written: the host would see
            // its tail glued to the next line.
            let victim = usize::from(self.offset > 0);
            if self.lines.remove(victim).is_some() {
                self.dropped += 1;
            }
        }
        self.lines.push_back(line.into_bytes());
    }

    /// Queue a line to go out next (after any half-written line).
    pub fn push_front(&mut self, line: String) {
        let at = usize::from(self.offset > 0).min(self.lines.len());
        self.lines.insert(at, line.into_bytes());
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Number of queued lines.
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// The connection went away: a half-written line is lost for good.
    pub fn handle_disconnect(&mut self) {
        if self.offset > 0 {
            self.lines.pop_front();
            self.offset = 0;
        }
    }

    /// Write as much as `w` accepts. `Ok` when the queue is empty or the
    /// writer would block; errors other than `WouldBlock`/`Interrupted`
    /// are returned.
    pub fn write_to(&mut self, w: &mut impl Write) -> io::Result<()> {
        while let Some(front) = self.lines.front() {
            match w.write(&front[self.offset..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.offset += n;
                    if self.offset == front.len() {
                        self.lines.pop_front();
                        self.offset = 0;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Splits incoming bytes into lines; drops lines over [`MAX_LINE_LEN`].
#[derive(Debug, Default)]
pub struct LineBuf {
    buf: Vec<u8>,
    overlong: bool,
}

impl LineBuf {
    /// Feed bytes; returns the complete lines (without `\n`).
    pub fn handle_input(&mut self, data: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        for chunk in data.split_inclusive(|b| *b == b'\n') {
            let complete = chunk.last() == Some(&b'\n');
            let body = if complete {
                &chunk[..chunk.len() - 1]
            } else {
                chunk
            };
            if !self.overlong {
                self.buf.extend_from_slice(body);
                if self.buf.len() > MAX_LINE_LEN {
                    self.buf = Vec::new();
                    self.overlong = true;
                }
            }
            if complete {
                if !self.overlong {
                    out.push(String::from_utf8_lossy(&self.buf).into_owned());
                }
                self.buf.clear();
                self.overlong = false;
            }
        }
        out
    }

    /// Forget a partial line (the sender went away mid-line).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.overlong = false;
    }
}

fn log(msg: &str) {
    eprintln!("godwit-guest: {msg}");
}

fn dispatch_line(server: &Server, line: &str) {
    match decode_command(line) {
        Ok(Some(cmd)) => server.handle_command(cmd),
        Ok(None) => {}
        Err(e) => server.handle_error(&e),
    }
}

impl Server {
    /// Report an undecodable command (id 0: we could not read its id).
    fn handle_error(&self, e: &dyn std::error::Error) {
        self.handle_report(Report::Error {
            id: 0,
            message: crate::realistic::error_chain(e),
        });
    }
}

/// Serve over the virtio-serial port forever. `device` overrides the port
/// lookup (for testing with another character device or FIFO).
pub fn serve_port(device: Option<PathBuf>) -> ! {
    let (tx, rx) = mpsc::channel();
    let server = Server::new(tx);
    let mut out = OutQueue::default();
    out.push(encode_line(&hello()));
    let mut warned = false;
    loop {
        let path = device
            .clone()
            .or_else(|| find_port(Path::new(SYS_VIRTIO_PORTS), PORT_NAME));
        let opened = path.as_ref().map(|p| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(p)
        });
        match opened {
            Some(Ok(file)) => {
                warned = false;
                if let Err(e) = run_fd(&file, &server, &rx, &mut out) {
                    log(&format!("port error, reopening: {e}"));
                }
            }
            Some(Err(e)) if !warned => {
                log(&format!("cannot open port {path:?}: {e}"));
                warned = true;
            }
            None if !warned => {
                log(&format!("port {PORT_NAME} not found, waiting"));
                warned = true;
            }
            _ => {}
        }
        for r in rx.try_iter() {
            out.push(encode_line(&r));
        }
        std::thread::sleep(REOPEN_DELAY);
    }
}

/// Drive one open port until it fails fatally.
fn run_fd(
    file: &File,
    server: &Server,
    rx: &Receiver<Report>,
    out: &mut OutQueue,
) -> io::Result<()> {
    let fd = file.as_raw_fd();
    let mut lines = LineBuf::default();
    let mut connected = false;
    let mut last_hello = Instant::now();
    let mut buf = vec![0u8; READ_CHUNK];
    let mut rfile = file;
    let mut wfile = file;
    loop {
        for r in rx.try_iter() {
            out.push(encode_line(&r));
        }
        if last_hello.elapsed() >= HELLO_INTERVAL {
            out.push(encode_line(&hello()));
            last_hello = Instant::now();
        }
        let mut events = libc::POLLIN;
        if !out.is_empty() {
            events |= libc::POLLOUT;
        }
        let mut pfd = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        // POLL_INTERVAL is 20 ms: fits in c_int.
        let timeout = POLL_INTERVAL.as_millis() as libc::c_int;
        // SAFETY: one valid pollfd, count 1, for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // A timeout (rc == 0) carries news too: the port reports POLLHUP
        // whenever no host is connected, so silence means connected.
        let re = if rc == 0 { 0 } else { pfd.revents };
        if re & libc::POLLNVAL != 0 {
            return Err(io::Error::other("port fd became invalid"));
        }
        let mut down = re & (libc::POLLHUP | libc::POLLERR) != 0;
        if re & libc::POLLIN != 0 {
            match rfile.read(&mut buf) {
                Ok(0) => down = true,
                Ok(n) => {
                    for line in lines.handle_input(&buf[..n]) {
                        dispatch_line(server, &line);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Err(e),
                Err(_) => down = true,
            }
        }
        if down {
            if connected {
                log("host disconnected");
                connected = false;
                lines.clear();
                out.handle_disconnect();
            }
            std::thread::sleep(HUP_BACKOFF);
            continue;
        }
        if !connected {
            log("host connected");
            connected = true;
            out.push_front(encode_line(&hello()));
            last_hello = Instant::now();
        }
        if re & libc::POLLOUT != 0 {
            match out.write_to(&mut wfile) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Err(e),
                Err(_) => {
                    connected = false;
                    out.handle_disconnect();
                }
            }
        }
    }
}

/// Serve over stdin/stdout until stdin closes (for use outside a guest,
/// e.g. `godwit-guest serve --stdio` under a test harness).
pub fn serve_stdio() -> io::Result<()> {
    let (tx, rx) = mpsc::channel();
    let server = Server::new(tx);
    let writer = std::thread::spawn(move || {
        let mut stdout = io::stdout().lock();
        let _ = stdout.write_all(encode_line(&hello()).as_bytes());
        let _ = stdout.flush();
        for r in rx {
            if stdout.write_all(encode_line(&r).as_bytes()).is_err() {
                break;
            }
            let _ = stdout.flush();
        }
    });
    for line in io::stdin().lock().lines() {
        dispatch_line(&server, &line?);
    }
    drop(server);
    // Jobs still running hold sink clones; don't wait for them.
    drop(writer);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_buf_splits_and_bounds() {
        let mut l = LineBuf::default();
        assert!(l.handle_input(b"GW1 {\"a\"").is_empty());
        assert_eq!(l.handle_input(b":1}\nx\ny"), ["GW1 {\"a\":1}", "x"]);
        l.clear();
        assert_eq!(l.handle_input(b"z\n"), ["z"]);
        let big = vec![b'a'; MAX_LINE_LEN + 10];
        assert!(l.handle_input(&big).is_empty());
        assert_eq!(l.handle_input(b"tail\nok\n"), ["ok"]);
    }

    /// A writer that accepts `budget` bytes, then would block.
    struct Choked {
        got: Vec<u8>,
        budget: usize,
    }

    impl Write for Choked {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            if self.budget == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = b.len().min(self.budget).min(3);
            self.budget -= n;
            self.got.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn out_queue_partial_writes_and_bounds() {
        let mut q = OutQueue::default();
        q.push("first\n".into());
        q.push("second\n".into());
        let mut w = Choked {
            got: vec![],
            budget: 8,
        };
        q.write_to(&mut w).unwrap();
        assert_eq!(w.got, b"first\nse");
        // Hello goes after the half-written line, never inside it.
        q.push_front("hello\n".into());
        w.budget = 100;
        q.write_to(&mut w).unwrap();
        assert_eq!(w.got, b"first\nsecond\nhello\n");
        // A disconnect drops the half-written line.
        q.push("third\n".into());
        w.budget = 2;
        q.write_to(&mut w).unwrap();
        q.handle_disconnect();
        assert!(q.is_empty());
        // Bounded.
        for i in 0..MAX_QUEUED_LINES + 5 {
            q.push(format!("{i}\n"));
        }
        assert_eq!(q.len(), MAX_QUEUED_LINES);
        assert_eq!(q.dropped, 5);
    }

    #[test]
    fn finds_port_by_name() {
        let dir = std::env::temp_dir().join(format!("godwit-vports-{}", std::process::id()));
        for (p, n) in [
            ("vport0p1", "other\n"),
            ("vport1p2", "org.godwit.guest.0\n"),
        ] {
            std::fs::create_dir_all(dir.join(p)).unwrap();
            std::fs::write(dir.join(p).join("name"), n).unwrap();
        }
        assert_eq!(
            find_port(&dir, PORT_NAME),
            Some(PathBuf::from("/dev/vport1p2"))
        );
        assert_eq!(find_port(&dir, "nope"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
