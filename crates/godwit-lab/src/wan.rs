//! The WAN emulator daemon and its control client.
//!
//! One process holds the `wan0` TUN fd of every site. Its data-plane thread
//! (plain std, not tokio: it needs sub-millisecond timer precision) reads an
//! IP packet from site i, picks site j from the destination address
//! (`10.77.(j+1).x`), runs it through the [`Link`] model of i→j and writes it
//! into site j's `wan0` when it is due. Sleeping uses `ppoll` with a
//! nanosecond timeout, 1 ns timer slack and `SCHED_FIFO` when allowed; it
//! spins before deadlines closer than [`SPIN_THRESHOLD`], and ends sleeps
//! longer than 1 ms 200 µs early and spins the rest (waking an idle vCPU is
//! slow). Under steady traffic sleeps are short, so it does not spin much.
//!
//! # Control protocol
//! A unix stream socket; one JSON object per line each way.
//!
//! | request (`op`) | fields | result |
//! |---|---|---|
//! | `ping` | | `"pong"` |
//! | `set_link` | `from`, `to` (site or null = all), `params` ([`LinkParamsUpdate`]) | number of links changed |
//! | `cut` / `heal` | `a`, `b` (site or null): both directions between a and b; a only = every link touching a; neither = all | number of links changed |
//! | `stats` | | [`WanStats`] |
//! | `shutdown` | | `null`, then the daemon exits |
//!
//! Replies are `{"ok":true,"result":…}` or `{"ok":false,"error":"…"}`.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::link::{Link, LinkParams, LinkParamsUpdate, LinkSnapshot};
use crate::{netns, LabError, SiteInfo};

/// Name of the TUN device in every site.
pub const TUN_NAME: &str = "wan0";
/// MTU of `wan0`: a standard Ethernet-sized WAN path.
pub const TUN_MTU: u32 = 1500;
/// Largest packet read from a TUN (the IPv4 maximum), whatever the MTU.
const MAX_PACKET: usize = 65_535;
/// Packets read from one site per wakeup before serving the others, so one
/// busy site cannot starve the rest or delay due deliveries.
const READ_BATCH: usize = 64;
/// Deadlines closer than this are busy-waited: a ppoll wakeup can be late by
/// tens of µs on a loaded VM, spinning this long costs little CPU.
pub const SPIN_THRESHOLD: Duration = Duration::from_micros(20);
/// SCHED_FIFO priority of the data-plane thread: above every normal task,
/// well below kernel threads that run at 50 and up.
const DATA_PLANE_RT_PRIORITY: libc::c_int = 10;
/// A sleep longer than this lets the CPU go idle (on a VM: halt the vCPU),
/// and waking from that takes 100 µs or more; such sleeps end
/// [`EARLY_WAKE`] before the deadline and spin the rest.
const LONG_SLEEP: Duration = Duration::from_millis(1);
/// How much earlier than the deadline a long sleep ends.
const EARLY_WAKE: Duration = Duration::from_micros(200);
/// Longest sleep of the data plane when nothing is due (control requests wake
/// it earlier through an eventfd).
const IDLE_POLL: Duration = Duration::from_millis(200);
/// How long a control connection waits for the data plane to answer.
const CONTROL_REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Client-side read/write timeout on the control socket.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Recycled packet buffers kept at most (bounds idle memory to ~8 MiB).
const POOL_MAX: usize = 4096;
/// Capacity of a fresh packet buffer: one MTU-sized packet and a bit.
const BUF_CAPACITY: usize = 2048;

/// What the daemon needs to know; written as JSON by [`crate::topology::up`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WanConfig {
    /// Control socket path.
    pub socket: PathBuf,
    /// Sites, by index; each gets a `wan0` in its namespace.
    pub sites: Vec<SiteInfo>,
    /// Initial parameters of every link.
    pub link: LinkParams,
    /// RNG seed for loss and jitter (random if absent).
    #[serde(default)]
    pub seed: Option<u64>,
}

/// Control request (one JSON line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum WanRequest {
    /// Liveness check.
    Ping,
    /// Change link parameters of `from`→`to` (None = every site).
    SetLink {
        /// Source site or all.
        from: Option<String>,
        /// Destination site or all.
        to: Option<String>,
        /// Fields to change.
        params: LinkParamsUpdate,
    },
    /// Cut both directions between `a` and `b` (see module docs).
    Cut {
        /// First site or all.
        a: Option<String>,
        /// Second site or all.
        b: Option<String>,
    },
    /// Undo a cut (same selection as `Cut`).
    Heal {
        /// First site or all.
        a: Option<String>,
        /// Second site or all.
        b: Option<String>,
    },
    /// Counters of every link and site.
    Stats,
    /// Stop the daemon.
    Shutdown,
}

/// Control reply (one JSON line).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WanReply {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The result on success.
    #[serde(default)]
    pub result: serde_json::Value,
    /// The reason on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Stats of one link direction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkStats {
    /// Source site.
    pub from: String,
    /// Destination site.
    pub to: String,
    /// Counters, queue, rates and parameters.
    #[serde(flatten)]
    pub link: LinkSnapshot,
}

/// Per-site counters that belong to no link.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SiteStats {
    /// Site name.
    pub name: String,
    /// Packets from this site to an address no site owns (or not IPv4).
    pub dropped_no_route: u64,
    /// Packets that could not be written into this site's `wan0`.
    pub write_errors: u64,
}

/// Everything `stats` returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WanStats {
    /// Time since the daemon started, ms.
    pub uptime_ms: u64,
    /// Every ordered site pair.
    pub links: Vec<LinkStats>,
    /// Every site.
    pub sites: Vec<SiteStats>,
    /// Timer accuracy of the data plane: how late packets were written
    /// compared with their modelled delivery time.
    pub lateness: LatenessStats,
}

/// How late deliveries were (scheduling and timer wakeup error of the shell).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatenessStats {
    /// Packets delivered.
    pub packets: u64,
    /// Mean lateness, µs.
    pub mean_us: f64,
    /// Largest lateness, µs.
    pub max_us: f64,
    /// Packets delivered more than 1 ms late.
    pub over_1ms: u64,
}

/// Entry point of `godwit lab wan-daemon --config <file>`.
///
/// `args` are the arguments after the subcommand (what
/// [`crate::topology::up`] appends to the command it is given).
/// Creates the `wan0` devices, configures them, serves the control socket
/// and runs the data plane on the calling thread until `shutdown`. The
/// caller should exit the process afterwards.
pub fn daemon_main(args: &[String]) -> Result<(), LabError> {
    let mut config_path = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--config" => config_path = it.next().cloned(),
            other => return Err(LabError::Usage(format!("unexpected argument {other:?}"))),
        }
    }
    let path = config_path.ok_or_else(|| LabError::Usage("--config <file> is required".into()))?;
    let text = std::fs::read_to_string(&path)
        .map_err(|e| LabError::io(format!("read WAN config {path}"), e))?;
    let config: WanConfig =
        serde_json::from_str(&text).map_err(|e| LabError::json(format!("WAN config {path}"), e))?;
    run(config)
}

/// Runs the daemon described by `config` on the calling thread until `shutdown`.
pub fn run(config: WanConfig) -> Result<(), LabError> {
    let mut fds = Vec::with_capacity(config.sites.len());
    for site in &config.sites {
        let fd = netns::run_in(&site.netns, || {
            godwit_tun::open(TUN_NAME, godwit_tun::Mode::Tun)
        })?
        .map_err(|e| LabError::io(format!("create {TUN_NAME} in {}", site.netns), e))?;
        fds.push(fd);
        configure_tun(site)?;
    }
    let wake = Arc::new(eventfd()?);
    let (tx, rx) = mpsc::channel::<(WanRequest, mpsc::Sender<WanReply>)>();
    let _ = std::fs::remove_file(&config.socket);
    let listener = UnixListener::bind(&config.socket)
        .map_err(|e| LabError::io(format!("bind {}", config.socket.display()), e))?;
    let stop = Arc::new(AtomicBool::new(false));
    let control = {
        let wake_fd = wake.clone();
        let stop = stop.clone();
        let site_names: Vec<String> = config.sites.iter().map(|s| s.name.clone()).collect();
        std::thread::Builder::new()
            .name("wan-control".into())
            .spawn(move || serve_control(listener, tx, wake_fd, stop, site_names))
            .map_err(|e| LabError::io("spawn control thread", e))?
    };
    tracing::info!(sites = config.sites.len(), socket = %config.socket.display(), "WAN emulator running");
    let seed = config.seed.unwrap_or_else(rand::random);
    let mut engine = Engine::new(&config, fds, seed);
    let result = engine.run(&wake, &rx);
    stop.store(true, Ordering::SeqCst);
    // Wake the accept() so the control thread sees `stop` and ends.
    let _ = UnixStream::connect(&config.socket);
    let _ = control.join();
    let _ = std::fs::remove_file(&config.socket);
    tracing::info!("WAN emulator stopped");
    result
}

/// Addresses `wan0` of `site` and routes the whole lab through it.
fn configure_tun(site: &SiteInfo) -> Result<(), LabError> {
    let ns = site.netns.as_str();
    let mtu = TUN_MTU.to_string();
    let addr = format!("{}/32", site.addr);
    let src = site.addr.to_string();
    netns::ip(&["-n", ns, "link", "set", TUN_NAME, "mtu", &mtu, "up"])?;
    netns::ip(&["-n", ns, "addr", "add", &addr, "dev", TUN_NAME])?;
    netns::ip(&[
        "-n",
        ns,
        "route",
        "add",
        "10.77.0.0/16",
        "dev",
        TUN_NAME,
        "src",
        &src,
    ])?;
    Ok(())
}

fn eventfd() -> Result<OwnedFd, LabError> {
    // SAFETY: plain syscall with constant flags.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(LabError::io("eventfd", std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just returned by eventfd and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn serve_control(
    listener: UnixListener,
    tx: mpsc::Sender<(WanRequest, mpsc::Sender<WanReply>)>,
    wake_fd: Arc<OwnedFd>,
    stop: Arc<AtomicBool>,
    sites: Vec<String>,
) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(conn) = conn else { continue };
        let tx = tx.clone();
        let sites = sites.clone();
        let wake_fd = wake_fd.clone();
        // One thread per connection: clients are few (the CLI, tests) and a
        // slow one must not block the others.
        let _ = std::thread::Builder::new()
            .name("wan-control-conn".into())
            .spawn(move || {
                if let Err(e) = handle_conn(conn, &tx, &wake_fd, &sites) {
                    tracing::debug!(cause = %e, "control connection ended");
                }
            });
    }
}

fn handle_conn(
    conn: UnixStream,
    tx: &mpsc::Sender<(WanRequest, mpsc::Sender<WanReply>)>,
    wake_fd: &OwnedFd,
    sites: &[String],
) -> std::io::Result<()> {
    let mut writer = conn.try_clone()?;
    for line in BufReader::new(conn).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<WanRequest>(&line) {
            Err(e) => error_reply(format!("bad request: {e}")),
            Ok(req) => match check_request(&req, sites) {
                Err(e) => error_reply(e),
                Ok(()) => {
                    let (rtx, rrx) = mpsc::channel();
                    if tx.send((req, rtx)).is_err() {
                        return Ok(());
                    }
                    // SAFETY: writing 8 bytes from a live u64 to the eventfd,
                    // kept open by our Arc clone.
                    unsafe { libc::write(wake_fd.as_raw_fd(), (&1u64 as *const u64).cast(), 8) };
                    rrx.recv_timeout(CONTROL_REPLY_TIMEOUT)
                        .unwrap_or_else(|_| error_reply("data plane did not answer".into()))
                }
            },
        };
        let mut text = serde_json::to_string(&reply).unwrap_or_else(|_| "{\"ok\":false}".into());
        text.push('\n');
        writer.write_all(text.as_bytes())?;
    }
    Ok(())
}

fn error_reply(msg: String) -> WanReply {
    WanReply {
        ok: false,
        result: serde_json::Value::Null,
        error: Some(msg),
    }
}

fn ok_reply(result: serde_json::Value) -> WanReply {
    WanReply {
        ok: true,
        result,
        error: None,
    }
}

/// Rejects unknown sites and impossible parameters before they reach the data plane.
fn check_request(req: &WanRequest, sites: &[String]) -> Result<(), String> {
    let known = |s: &Option<String>| match s {
        Some(name) if !sites.contains(name) => Err(format!("unknown site {name:?}")),
        _ => Ok(()),
    };
    match req {
        WanRequest::SetLink { from, to, params } => {
            known(from)?;
            known(to)?;
            params.validate()
        }
        WanRequest::Cut { a, b } | WanRequest::Heal { a, b } => {
            known(a)?;
            known(b)
        }
        _ => Ok(()),
    }
}

/// The data plane: all TUN fds and all links.
struct Engine {
    names: Vec<String>,
    fds: Vec<OwnedFd>,
    /// Link i→j at `i * n + j` (the diagonal is unused).
    links: Vec<Link<Vec<u8>>>,
    site_stats: Vec<SiteStats>,
    pool: Vec<Vec<u8>>,
    started: Instant,
    late_packets: u64,
    late_sum_ns: u128,
    late_max: Duration,
    late_over_1ms: u64,
}

impl Engine {
    fn new(config: &WanConfig, fds: Vec<OwnedFd>, seed: u64) -> Self {
        let n = config.sites.len();
        let links = (0..n * n)
            .map(|k| {
                let s = seed ^ (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                Link::new(config.link.clone(), s)
            })
            .collect();
        Self {
            names: config.sites.iter().map(|s| s.name.clone()).collect(),
            fds,
            links,
            site_stats: config
                .sites
                .iter()
                .map(|s| SiteStats {
                    name: s.name.clone(),
                    ..SiteStats::default()
                })
                .collect(),
            pool: Vec::new(),
            started: Instant::now(),
            late_packets: 0,
            late_sum_ns: 0,
            late_max: Duration::ZERO,
            late_over_1ms: 0,
        }
    }

    fn n(&self) -> usize {
        self.names.len()
    }

    fn run(
        &mut self,
        wake: &OwnedFd,
        rx: &mpsc::Receiver<(WanRequest, mpsc::Sender<WanReply>)>,
    ) -> Result<(), LabError> {
        set_realtime();
        let mut pfds: Vec<libc::pollfd> = self
            .fds
            .iter()
            .chain(std::iter::once(wake))
            .map(|fd| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let mut rbuf = vec![0u8; MAX_PACKET];
        // Set after a long sleep cut short by EARLY_WAKE: spin the rest.
        let mut woke_early = false;
        loop {
            let now = Instant::now();
            self.deliver_due(now);
            let timeout = match self.next_deadline() {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => IDLE_POLL,
            };
            let timeout = if timeout < SPIN_THRESHOLD || (woke_early && timeout < EARLY_WAKE) {
                Duration::ZERO
            } else if timeout > LONG_SLEEP && timeout != IDLE_POLL {
                woke_early = true;
                timeout - EARLY_WAKE
            } else {
                woke_early = false;
                timeout
            };
            let ts = libc::timespec {
                tv_sec: timeout.as_secs() as libc::time_t,
                tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
            };
            // SAFETY: pfds is a valid array of pollfd of the given length; ts
            // lives across the call; a null sigmask leaves the mask unchanged.
            let r = unsafe {
                libc::ppoll(
                    pfds.as_mut_ptr(),
                    pfds.len() as libc::nfds_t,
                    &ts,
                    std::ptr::null(),
                )
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(LabError::io("ppoll", e));
            }
            if r == 0 {
                continue;
            }
            let n = self.n();
            for (i, pfd) in pfds[..n].iter().enumerate() {
                if pfd.revents & libc::POLLIN != 0 {
                    self.read_site(i, &mut rbuf);
                }
            }
            if pfds[self.n()].revents & libc::POLLIN != 0 {
                let mut v = 0u64;
                // SAFETY: reading 8 bytes into a live u64 from the eventfd.
                unsafe { libc::read(wake.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
                while let Ok((req, reply)) = rx.try_recv() {
                    let shutdown = req == WanRequest::Shutdown;
                    let _ = reply.send(self.handle_request(req));
                    if shutdown {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Reads up to [`READ_BATCH`] packets from site `i` into their links.
    fn read_site(&mut self, i: usize, rbuf: &mut [u8]) {
        let n = self.n();
        for _ in 0..READ_BATCH {
            // SAFETY: rbuf is a valid writable buffer of rbuf.len() bytes.
            let r = unsafe {
                libc::read(
                    self.fds[i].as_raw_fd(),
                    rbuf.as_mut_ptr().cast(),
                    rbuf.len(),
                )
            };
            if r <= 0 {
                // EAGAIN: drained. Other errors: nothing to do but try later.
                return;
            }
            let now = Instant::now();
            let pkt = &rbuf[..r as usize];
            let Some(j) = route(pkt, n).filter(|&j| j != i) else {
                self.site_stats[i].dropped_no_route += 1;
                continue;
            };
            let mut buf = self
                .pool
                .pop()
                .unwrap_or_else(|| Vec::with_capacity(BUF_CAPACITY));
            buf.clear();
            buf.extend_from_slice(pkt);
            if let Err((_, buf)) = self.links[i * n + j].handle_packet(now, pkt.len(), buf) {
                self.recycle(buf);
            }
        }
    }

    /// Writes every packet that is due by `now` into its destination site.
    fn deliver_due(&mut self, now: Instant) {
        let n = self.n();
        for k in 0..self.links.len() {
            let j = k % n;
            while let Some(due) = self.links[k].poll_timeout().filter(|&t| t <= now) {
                let Some(buf) = self.links[k].poll_deliver(now) else {
                    break;
                };
                let late = now - due;
                self.late_packets += 1;
                self.late_sum_ns += late.as_nanos();
                self.late_max = self.late_max.max(late);
                if late > Duration::from_millis(1) {
                    self.late_over_1ms += 1;
                }
                // SAFETY: buf is a valid readable buffer of buf.len() bytes.
                let w =
                    unsafe { libc::write(self.fds[j].as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
                if w < 0 {
                    self.site_stats[j].write_errors += 1;
                }
                self.recycle(buf);
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.links.iter().filter_map(|l| l.poll_timeout()).min()
    }

    fn recycle(&mut self, buf: Vec<u8>) {
        if self.pool.len() < POOL_MAX {
            self.pool.push(buf);
        }
    }

    fn idx(&self, name: &Option<String>) -> Option<usize> {
        name.as_deref()
            .and_then(|s| self.names.iter().position(|x| x == s))
    }

    fn handle_request(&mut self, req: WanRequest) -> WanReply {
        let n = self.n();
        match req {
            WanRequest::Ping => ok_reply("pong".into()),
            WanRequest::SetLink { from, to, params } => {
                let (f, t) = (self.idx(&from), self.idx(&to));
                let mut count = 0u64;
                for i in 0..n {
                    for j in 0..n {
                        if i == j || f.is_some_and(|f| f != i) || t.is_some_and(|t| t != j) {
                            continue;
                        }
                        let mut p = self.links[i * n + j].params().clone();
                        p.apply(&params);
                        self.set_params(i * n + j, p);
                        count += 1;
                    }
                }
                tracing::info!(?from, ?to, ?params, "link parameters changed");
                ok_reply(count.into())
            }
            WanRequest::Cut { a, b } => ok_reply(self.set_cut(&a, &b, true).into()),
            WanRequest::Heal { a, b } => ok_reply(self.set_cut(&a, &b, false).into()),
            WanRequest::Stats => {
                let now = Instant::now();
                let names = self.names.clone();
                let mut links = Vec::new();
                for i in 0..n {
                    for j in 0..n {
                        if i != j {
                            links.push(LinkStats {
                                from: names[i].clone(),
                                to: names[j].clone(),
                                link: self.links[i * n + j].snapshot(now),
                            });
                        }
                    }
                }
                let stats = WanStats {
                    uptime_ms: u64::try_from(self.started.elapsed().as_millis())
                        .unwrap_or(u64::MAX),
                    links,
                    sites: self.site_stats.clone(),
                    lateness: LatenessStats {
                        packets: self.late_packets,
                        mean_us: if self.late_packets == 0 {
                            0.0
                        } else {
                            self.late_sum_ns as f64 / self.late_packets as f64 / 1e3
                        },
                        max_us: self.late_max.as_secs_f64() * 1e6,
                        over_1ms: self.late_over_1ms,
                    },
                };
                match serde_json::to_value(stats) {
                    Ok(v) => ok_reply(v),
                    Err(e) => error_reply(format!("encode stats: {e}")),
                }
            }
            WanRequest::Shutdown => ok_reply(serde_json::Value::Null),
        }
    }

    /// Cuts or heals the pairs selected by (a, b); returns how many changed.
    fn set_cut(&mut self, a: &Option<String>, b: &Option<String>, cut: bool) -> u64 {
        let n = self.n();
        let pairs = pairs_between(n, self.idx(a), self.idx(b));
        for &(i, j) in &pairs {
            let mut p = self.links[i * n + j].params().clone();
            p.cut = cut;
            self.set_params(i * n + j, p);
        }
        tracing::info!(?a, ?b, cut, "links cut state changed");
        pairs.len() as u64
    }

    fn set_params(&mut self, k: usize, p: LinkParams) {
        for buf in self.links[k].set_params(p) {
            self.recycle(buf);
        }
    }
}

/// Makes the calling (data-plane) thread wake up on time: 1 ns timer slack
/// (the default 50 µs would delay every wakeup) and, when allowed,
/// `SCHED_FIFO` so compile jobs or TCG guests on the same cores cannot delay
/// deliveries by whole scheduler ticks. The thread only spins for
/// [`SPIN_THRESHOLD`] at a time, and the kernel's RT throttling still leaves
/// other tasks 5 % of each CPU, so it cannot lock the machine up.
fn set_realtime() {
    // SAFETY: prctl with integer arguments only affects this thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
    let param = libc::sched_param {
        sched_priority: DATA_PLANE_RT_PRIORITY,
    };
    // SAFETY: sched_setscheduler(0, ..) targets the calling thread; `param` lives across the call.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        tracing::warn!(
            cause = %std::io::Error::last_os_error(),
            "could not make the WAN data plane real-time; delays may jitter under load"
        );
    }
}

/// Ordered pairs (i, j), i ≠ j, of `n` sites selected by a `cut`/`heal`
/// (a, b): both directions between a and b; every link touching the one
/// given; or all links.
fn pairs_between(n: usize, a: Option<usize>, b: Option<usize>) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    for i in 0..n {
        for j in 0..n {
            let sel = match (a, b) {
                (Some(a), Some(b)) => (i == a && j == b) || (i == b && j == a),
                (Some(x), None) | (None, Some(x)) => i == x || j == x,
                (None, None) => true,
            };
            if i != j && sel {
                v.push((i, j));
            }
        }
    }
    v
}

/// Destination site of an IPv4 packet to `10.77.(j+1).x`, if `j < n`.
fn route(pkt: &[u8], n: usize) -> Option<usize> {
    if pkt.len() < 20 || pkt[0] >> 4 != 4 {
        return None;
    }
    let dst = &pkt[16..20];
    if dst[0] != 10 || dst[1] != 77 || dst[2] == 0 {
        return None;
    }
    let j = usize::from(dst[2]) - 1;
    (j < n).then_some(j)
}

/// Client of a running WAN daemon's control socket.
#[derive(Debug)]
pub struct WanClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl WanClient {
    /// Connects to the daemon at `socket`.
    pub fn connect(socket: &Path) -> Result<Self, LabError> {
        let s = UnixStream::connect(socket).map_err(|e| {
            LabError::io(format!("connect to WAN daemon at {}", socket.display()), e)
        })?;
        s.set_read_timeout(Some(CLIENT_TIMEOUT))
            .and_then(|()| s.set_write_timeout(Some(CLIENT_TIMEOUT)))
            .map_err(|e| LabError::io("set control socket timeouts", e))?;
        let writer = s
            .try_clone()
            .map_err(|e| LabError::io("clone control socket", e))?;
        Ok(Self {
            reader: BufReader::new(s),
            writer,
        })
    }

    /// Sends one request and returns its result value.
    pub fn request(&mut self, req: &WanRequest) -> Result<serde_json::Value, LabError> {
        let mut line =
            serde_json::to_string(req).map_err(|e| LabError::json("encode request", e))?;
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| LabError::io("send control request", e))?;
        let mut answer = String::new();
        let got = self
            .reader
            .read_line(&mut answer)
            .map_err(|e| LabError::io("read control reply", e))?;
        if got == 0 {
            return Err(LabError::Daemon("connection closed without a reply".into()));
        }
        let reply: WanReply =
            serde_json::from_str(&answer).map_err(|e| LabError::json("control reply", e))?;
        if reply.ok {
            Ok(reply.result)
        } else {
            Err(LabError::Daemon(reply.error.unwrap_or_default()))
        }
    }

    /// Liveness check.
    pub fn ping(&mut self) -> Result<(), LabError> {
        self.request(&WanRequest::Ping).map(drop)
    }

    /// Changes the parameters of `from`→`to` (None = every site); returns
    /// how many links changed.
    pub fn set_link(
        &mut self,
        from: Option<&str>,
        to: Option<&str>,
        params: LinkParamsUpdate,
    ) -> Result<u64, LabError> {
        let v = self.request(&WanRequest::SetLink {
            from: from.map(str::to_owned),
            to: to.map(str::to_owned),
            params,
        })?;
        Ok(v.as_u64().unwrap_or(0))
    }

    /// Cuts both directions between `a` and `b`; `a` alone = every link
    /// touching it; neither = all links. Returns how many links changed.
    pub fn cut(&mut self, a: Option<&str>, b: Option<&str>) -> Result<u64, LabError> {
        let v = self.request(&WanRequest::Cut {
            a: a.map(str::to_owned),
            b: b.map(str::to_owned),
        })?;
        Ok(v.as_u64().unwrap_or(0))
    }

    /// Undoes [`WanClient::cut`] with the same selection.
    pub fn heal(&mut self, a: Option<&str>, b: Option<&str>) -> Result<u64, LabError> {
        let v = self.request(&WanRequest::Heal {
            a: a.map(str::to_owned),
            b: b.map(str::to_owned),
        })?;
        Ok(v.as_u64().unwrap_or(0))
    }

    /// Stats of every link direction.
    pub fn stats(&mut self) -> Result<Vec<LinkStats>, LabError> {
        self.stats_all().map(|s| s.links)
    }

    /// Stats of every link and site.
    pub fn stats_all(&mut self) -> Result<WanStats, LabError> {
        let v = self.request(&WanRequest::Stats)?;
        serde_json::from_value(v).map_err(|e| LabError::json("stats reply", e))
    }

    /// Asks the daemon to exit.
    pub fn shutdown(&mut self) -> Result<(), LabError> {
        self.request(&WanRequest::Shutdown).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_to(dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[16..20].copy_from_slice(&dst);
        p
    }

    #[test]
    fn routes_by_third_octet() {
        assert_eq!(route(&ipv4_to([10, 77, 1, 1]), 2), Some(0));
        assert_eq!(route(&ipv4_to([10, 77, 2, 9]), 2), Some(1));
        assert_eq!(route(&ipv4_to([10, 77, 3, 1]), 2), None);
        assert_eq!(route(&ipv4_to([10, 77, 0, 1]), 2), None);
        assert_eq!(route(&ipv4_to([10, 78, 1, 1]), 2), None);
        assert_eq!(route(&ipv4_to([10, 77, 1, 1])[..19], 2), None);
        let mut v6 = ipv4_to([10, 77, 1, 1]);
        v6[0] = 0x60;
        assert_eq!(route(&v6, 2), None);
    }

    #[test]
    fn cut_selection() {
        assert_eq!(pairs_between(3, Some(0), Some(2)), vec![(0, 2), (2, 0)]);
        assert_eq!(
            pairs_between(3, Some(1), None),
            vec![(0, 1), (1, 0), (1, 2), (2, 1)]
        );
        assert_eq!(pairs_between(3, None, None).len(), 6);
    }

    #[test]
    fn requests_roundtrip_and_are_checked() {
        let req = WanRequest::SetLink {
            from: Some("a".into()),
            to: None,
            params: LinkParamsUpdate {
                delay: Some(Duration::from_millis(130)),
                ..LinkParamsUpdate::default()
            },
        };
        let line = serde_json::to_string(&req).unwrap();
        assert_eq!(
            line,
            r#"{"op":"set_link","from":"a","to":null,"params":{"delay_us":130000}}"#
        );
        assert_eq!(serde_json::from_str::<WanRequest>(&line).unwrap(), req);
        let sites = vec!["a".to_owned(), "b".to_owned()];
        assert!(check_request(&req, &sites).is_ok());
        let bad = WanRequest::Cut {
            a: Some("z".into()),
            b: None,
        };
        assert!(check_request(&bad, &sites).is_err());
        let bad_loss = WanRequest::SetLink {
            from: None,
            to: None,
            params: LinkParamsUpdate {
                loss: Some(2.0),
                ..LinkParamsUpdate::default()
            },
        };
        assert!(check_request(&bad_loss, &sites).is_err());
        assert!(serde_json::from_str::<WanRequest>(r#"{"op":"reboot"}"#).is_err());
    }
}
