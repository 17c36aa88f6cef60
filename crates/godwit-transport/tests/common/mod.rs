//! Shared helpers for the integration tests: endpoint pairs, an echo server,
//! a byte sink, and an in-process WAN emulator (delay, rate, loss) for UDP.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use godwit_transport::{
    Congestion, Identity, IncomingStreams, PeerSet, StreamPurpose, Transport, TransportConfig,
};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Binds an endpoint for `identity` trusting `peers`.
pub async fn endpoint(
    identity: Identity,
    peers: &[(&str, &Identity)],
    congestion: Congestion,
) -> (Transport, IncomingStreams) {
    let set = PeerSet::from_entries(peers.iter().map(|(n, id)| (*n, id.fingerprint())))
        .expect("peer set");
    let mut cfg = TransportConfig::new(loopback(), identity, set);
    cfg.congestion = congestion;
    Transport::bind(cfg).await.expect("bind")
}

/// Two endpoints "a" and "b" that trust each other.
pub struct Pair {
    pub a: Transport,
    pub a_in: IncomingStreams,
    pub a_id: Identity,
    pub b: Transport,
    pub b_in: IncomingStreams,
    pub b_id: Identity,
}

pub async fn pair(congestion: Congestion) -> Pair {
    let a_id = Identity::generate("a").expect("id a");
    let b_id = Identity::generate("b").expect("id b");
    let (a, a_in) = endpoint(a_id.clone(), &[("b", &b_id)], congestion).await;
    let (b, b_in) = endpoint(b_id.clone(), &[("a", &a_id)], congestion).await;
    Pair {
        a,
        a_in,
        a_id,
        b,
        b_in,
        b_id,
    }
}

/// Echoes every incoming stream: replies `[purpose byte] ++ payload`.
pub fn spawn_echo(mut incoming: IncomingStreams) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(mut s) = incoming.next().await {
            tokio::spawn(async move {
                let Ok(data) = s.recv.read_to_end(1 << 20).await else {
                    return;
                };
                let _ = s.send.write_all(&[s.purpose.to_byte()]).await;
                let _ = s.send.write_all(&data).await;
                let _ = s.send.finish();
            });
        }
    })
}

/// What a sink measured on one stream.
#[derive(Debug, Clone, Copy, Default)]
pub struct SinkReport {
    pub bytes: u64,
    pub elapsed: Duration,
    /// Bytes received after `warmup` past the first byte, and over how long.
    pub steady_bytes: u64,
    pub steady_elapsed: Duration,
}

impl SinkReport {
    pub fn mbit_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.elapsed.as_secs_f64() / 1e6
    }
    pub fn steady_mbit_s(&self) -> f64 {
        self.steady_bytes as f64 * 8.0 / self.steady_elapsed.as_secs_f64().max(1e-9) / 1e6
    }
}

/// Reads the first incoming stream to the end, measuring; replies with the
/// byte count (8 bytes, LE) so the sender knows everything arrived.
pub fn spawn_sink(mut incoming: IncomingStreams, warmup: Duration) -> JoinHandle<SinkReport> {
    tokio::spawn(async move {
        let mut s = incoming.next().await.expect("incoming stream");
        let mut report = SinkReport::default();
        let mut first: Option<Instant> = None;
        let mut steady_start: Option<Instant> = None;
        // Ends at the end of the stream or at the sender's reset.
        while let Ok(Some(chunk)) = s.recv.read_chunk(usize::MAX, true).await {
            let now = Instant::now();
            let f = *first.get_or_insert(now);
            report.bytes += chunk.bytes.len() as u64;
            if now.duration_since(f) >= warmup {
                steady_start.get_or_insert(now);
                report.steady_bytes += chunk.bytes.len() as u64;
            }
        }
        let end = Instant::now();
        if let Some(f) = first {
            report.elapsed = end.duration_since(f);
        }
        if let Some(s0) = steady_start {
            report.steady_elapsed = end.duration_since(s0);
        }
        let _ = s.send.write_all(&report.bytes.to_le_bytes()).await;
        let _ = s.send.finish();
        let _ = s.send.stopped().await;
        report
    })
}

/// Opens a stream and writes `total` bytes in 1 MiB chunks, then waits for
/// the sink's byte count. If `duration` passes first, the stream is reset
/// instead (send buffers may hold a whole BDP, so "stop writing" would not
/// stop the transfer) and the sink reports what it got until the reset.
/// Returns the sink's count.
pub async fn send_bulk(
    conn: &godwit_transport::PeerConnection,
    purpose: StreamPurpose,
    total: u64,
    duration: Duration,
) -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
    const CHUNK: usize = 1 << 20;
    let (mut send, mut recv) = conn.open(purpose).await?;
    let chunk = Bytes::from(vec![0x5au8; CHUNK]);
    let start = Instant::now();
    let mut sent = 0u64;
    let mut timed_out = false;
    while sent < total {
        let n = (total - sent).min(CHUNK as u64) as usize;
        // Duration::MAX means "no deadline": one far in the future.
        let deadline = start
            .checked_add(duration)
            .unwrap_or(start + Duration::from_secs(86_400));
        match tokio::time::timeout_at(deadline.into(), send.write_chunk(chunk.slice(..n))).await {
            Ok(r) => r?,
            Err(_) => {
                timed_out = true;
                break;
            }
        }
        sent += n as u64;
    }
    if timed_out || start.elapsed() >= duration {
        send.reset(quinn::VarInt::from_u32(0))?;
    } else {
        send.finish()?;
    }
    let mut ack = [0u8; 8];
    recv.read_exact(&mut ack).await?;
    let got = u64::from_le_bytes(ack);
    if !timed_out {
        assert_eq!(got, sent, "sink received a different byte count");
    }
    Ok(got)
}

// ---------------------------------------------------------------------------
// WAN emulator

/// One direction of an emulated link.
#[derive(Debug, Clone, Copy)]
pub struct LinkParams {
    pub one_way_delay: Duration,
    pub rate_bits_per_s: u64,
    /// Random loss probability per packet, 0.0..1.0.
    pub loss: f64,
    /// Tail-drop once this much data is queued (in transmission time).
    pub queue_limit: Duration,
}

/// Per-packet IP + UDP overhead counted against the rate (IPv4).
const WIRE_OVERHEAD: usize = 28;

struct Shaper {
    params: LinkParams,
    next_free: Instant,
    rng: u64,
    pub dropped_loss: u64,
    pub dropped_queue: u64,
    pub forwarded: u64,
}

impl Shaper {
    fn new(params: LinkParams, seed: u64) -> Shaper {
        Shaper {
            params,
            next_free: Instant::now(),
            rng: seed | 1,
            dropped_loss: 0,
            dropped_queue: 0,
            forwarded: 0,
        }
    }

    fn random(&mut self) -> f64 {
        // xorshift64*: plenty for loss decisions.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// When the packet is delivered, or None if dropped.
    fn admit(&mut self, len: usize, now: Instant) -> Option<Instant> {
        if self.params.loss > 0.0 && self.random() < self.params.loss {
            self.dropped_loss += 1;
            return None;
        }
        let start = self.next_free.max(now);
        if start.duration_since(now) > self.params.queue_limit {
            self.dropped_queue += 1;
            return None;
        }
        let bits = ((len + WIRE_OVERHEAD) * 8) as f64;
        let tx = Duration::from_secs_f64(bits / self.params.rate_bits_per_s as f64);
        self.next_free = start + tx;
        self.forwarded += 1;
        Some(self.next_free + self.params.one_way_delay)
    }
}

/// Counters of one proxy direction.
#[derive(Debug, Clone, Copy, Default)]
pub struct DirStats {
    pub forwarded: u64,
    pub dropped_loss: u64,
    pub dropped_queue: u64,
}

/// A UDP proxy on loopback emulating a symmetric WAN link to `upstream`.
/// Clients send to `addr`; one client at a time.
pub struct WanProxy {
    pub addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
    stats: Arc<Mutex<[DirStats; 2]>>,
}

impl WanProxy {
    pub async fn start(upstream: SocketAddr, params: LinkParams, seed: u64) -> WanProxy {
        let front = Arc::new(big_udp());
        let back = Arc::new(big_udp());
        back.connect(upstream).await.expect("connect upstream");
        let addr = front.local_addr().expect("addr");
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let stats = Arc::new(Mutex::new([DirStats::default(); 2]));
        let mut tasks = Vec::new();

        // client -> server
        let (tx_up, rx_up) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
        {
            let front = front.clone();
            let client = client.clone();
            let stats = stats.clone();
            tasks.push(tokio::spawn(async move {
                let mut shaper = Shaper::new(params, seed);
                let mut buf = vec![0u8; 65536];
                while let Ok((n, from)) = front.recv_from(&mut buf).await {
                    *client.lock().expect("lock") = Some(from);
                    if let Some(at) = shaper.admit(n, Instant::now()) {
                        let _ = tx_up.send((at, buf[..n].to_vec()));
                    }
                    record(&stats, 0, &shaper);
                }
            }));
        }
        {
            let back = back.clone();
            tasks.push(tokio::spawn(deliver(rx_up, move |pkt| {
                let _ = back.try_send(&pkt);
            })));
        }
        // server -> client
        let (tx_down, rx_down) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
        {
            let back = back.clone();
            let stats = stats.clone();
            tasks.push(tokio::spawn(async move {
                let mut shaper = Shaper::new(params, seed.wrapping_mul(31).wrapping_add(7));
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = back.recv(&mut buf).await {
                    if let Some(at) = shaper.admit(n, Instant::now()) {
                        let _ = tx_down.send((at, buf[..n].to_vec()));
                    }
                    record(&stats, 1, &shaper);
                }
            }));
        }
        {
            let front = front.clone();
            tasks.push(tokio::spawn(deliver(rx_down, move |pkt| {
                if let Some(to) = *client.lock().expect("lock") {
                    let _ = front.try_send_to(&pkt, to);
                }
            })));
        }
        WanProxy { addr, tasks, stats }
    }

    /// [client→server, server→client] counters.
    pub fn stats(&self) -> [DirStats; 2] {
        *self.stats.lock().expect("lock")
    }
}

impl Drop for WanProxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn record(stats: &Mutex<[DirStats; 2]>, dir: usize, s: &Shaper) {
    stats.lock().expect("lock")[dir] = DirStats {
        forwarded: s.forwarded,
        dropped_loss: s.dropped_loss,
        dropped_queue: s.dropped_queue,
    };
}

async fn deliver(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(Instant, Vec<u8>)>,
    send: impl Fn(Vec<u8>),
) {
    while let Some((at, pkt)) = rx.recv().await {
        // Only sleep when early: a sleep on a past deadline still waits for
        // a timer tick (1 ms), which would throttle the link to 1 pkt/ms.
        if at > Instant::now() {
            tokio::time::sleep_until(at.into()).await;
        }
        send(pkt);
    }
}

fn big_udp() -> UdpSocket {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).expect("sock");
    let _ = s.set_recv_buffer_size(16 << 20);
    let _ = s.set_send_buffer_size(16 << 20);
    s.bind(&loopback().into()).expect("bind");
    s.set_nonblocking(true).expect("nonblocking");
    UdpSocket::from_std(s.into()).expect("tokio socket")
}
