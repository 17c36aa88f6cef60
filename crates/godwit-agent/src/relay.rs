//! Relay pumps: carry QEMU's migration stream between a local unix socket
//! and a peer stream in both directions, through a memory codec (raw or
//! page-aware, [`crate::memcodec`]); the destination QEMU always receives
//! exactly the bytes the source QEMU wrote.
//!
//! The source pump reads QEMU's outgoing stream only while the
//! [`RelayWindow`] allows, so agent buffers stay near the path's
//! bandwidth-delay product and QEMU's bandwidth estimate (and therefore its
//! switch-over decision) reflects the WAN, not a local socket. The
//! destination pump writes into its QEMU and acknowledges what it wrote.
//! The return path (destination QEMU → source QEMU: PONG, SHUT) flows the
//! other way unbatched, and is never synthesised: the source QEMU reports
//! completion only after the destination really loaded the state.
//!
//! Both pumps are generic over tokio's `AsyncRead`/`AsyncWrite`, so tests
//! run them over in-memory pipes; in the agent they sit between a
//! `UnixStream` and a QUIC stream pair.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use godwit_wire::{Frame, FrameCodec, RelayWindow};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tracing::debug;

use crate::memcodec::{Inbound, Outbound};
use crate::rpgate::{ReturnGate, ReturnPathParser, MSG_SHUT};

/// Largest chunk of QEMU's stream put into one frame.
pub const CHUNK: usize = 64 << 10;
/// Read size from the source QEMU's socket: large reads mean fewer
/// wake-ups per byte (QEMU writes 256 KiB vectors when it can).
const QEMU_READ: usize = 256 << 10;
/// How long gathered stream bytes wait for more once QEMU pauses writing.
/// Far below any RTT, so the switch-over does not notice it.
const FLUSH_DELAY: Duration = Duration::from_millis(2);
/// How long the source waits for the destination's end of stream after
/// its own QEMU closed the socket (the destination QEMU closes right after
/// its SHUT message, so this is generous).
pub const END_GRACE: Duration = Duration::from_secs(30);
/// The destination acknowledges at least this often (in relayed bytes),
/// and also whenever it has no complete frame left to process: acks that
/// wait for an idle moment would stall a window-limited source.
pub const ACK_EVERY: u64 = 256 << 10;
/// The source gives up when bytes are outstanding and the destination has
/// acknowledged nothing for this long: the destination QEMU stopped
/// consuming, or the peer stream is wedged. Far above any real pause (QEMU
/// loads a page in microseconds), far below the migration timeout.
pub const ACK_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the source refreshes its RTT sample.
const RTT_TICK: Duration = Duration::from_millis(50);

/// Errors that end a relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Reading or writing the local QEMU socket failed.
    #[error("local QEMU socket failed")]
    Qemu(#[source] std::io::Error),
    /// Reading or writing the peer stream failed (link cut, peer gone).
    #[error("peer stream failed")]
    Peer(#[source] std::io::Error),
    /// The peer closed the stream without an orderly end.
    #[error("peer closed the stream without finishing it")]
    PeerClosed,
    /// The peer aborted the migration.
    #[error("peer aborted: {0}")]
    PeerAborted(String),
    /// The peer sent something that is not a valid frame here.
    #[error("protocol violation by peer: {0}")]
    Protocol(String),
    /// The relay was cancelled locally.
    #[error("relay cancelled: {0}")]
    Cancelled(String),
    /// The destination did not finish its side in time.
    #[error("peer did not end its stream within {0:?}")]
    EndTimeout(Duration),
    /// The destination stopped acknowledging relayed bytes.
    #[error("the destination acknowledged nothing for {0:?}")]
    AckStall(Duration),
    /// The destination gave the migration up before its QEMU finished
    /// (the return path was fenced; see [`crate::rpgate`]).
    #[error("the destination gave the migration up")]
    Fenced,
    /// The page-aware codec rejected a message or failed.
    #[error("memory codec: {0}")]
    Codec(String),
}

/// Counters of one relay, readable while it runs.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// QEMU stream bytes carried towards the destination.
    pub stream_bytes: AtomicU64,
    /// Return-path bytes carried towards the source.
    pub return_bytes: AtomicU64,
    /// Framed bytes written to the peer stream.
    pub wire_tx: AtomicU64,
    /// Framed bytes read from the peer stream.
    pub wire_rx: AtomicU64,
    /// Current flow window, bytes (source only).
    pub window: AtomicU64,
    /// Bytes sent and not yet acknowledged (source only).
    pub outstanding: AtomicU64,
    /// Set by the convergence controller when the switch-over is near: the
    /// window stops probing, so no backlog the guest's pause would wait for
    /// builds up (source only).
    pub drain: std::sync::atomic::AtomicBool,
    /// What the page-aware codec did (source only; set when the relay
    /// ends).
    pub codec: std::sync::Mutex<Option<crate::api::types::MemoryCodecReport>>,
}

impl RelayStats {
    /// Framed bytes in both directions.
    pub fn wire_bytes(&self) -> u64 {
        self.wire_tx.load(Ordering::Relaxed) + self.wire_rx.load(Ordering::Relaxed)
    }
}

/// Reads frames from a peer stream.
struct FrameReader<R> {
    rd: R,
    buf: BytesMut,
    eof: bool,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    fn new(rd: R) -> Self {
        Self {
            rd,
            buf: BytesMut::with_capacity(2 * CHUNK),
            eof: false,
        }
    }

    /// Next frame, or `None` at a clean end of stream. Cancel-safe: bytes
    /// read are kept in `buf` across calls.
    async fn next(&mut self, stats: &RelayStats) -> Result<Option<Frame>, RelayError> {
        loop {
            match FrameCodec::decode(&mut self.buf) {
                Ok(Some(f)) => {
                    stats
                        .wire_rx
                        .fetch_add(f.encoded_len() as u64, Ordering::Relaxed);
                    return Ok(Some(f));
                }
                Ok(None) => {}
                Err(e) => return Err(RelayError::Protocol(e.to_string())),
            }
            if self.eof {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(RelayError::Protocol("stream ended inside a frame".into()))
                };
            }
            self.buf.reserve(CHUNK);
            let n = self
                .rd
                .read_buf(&mut self.buf)
                .await
                .map_err(RelayError::Peer)?;
            if n == 0 {
                self.eof = true;
            }
        }
    }
}

/// Awaits `fut`, logging (debug) when it took longer than `SLOW_AWAIT`:
/// the relay's awaits should all be short, and a long one pinpoints a stall.
async fn timed<T>(what: &'static str, fut: impl std::future::Future<Output = T>) -> T {
    let t0 = Instant::now();
    let out = fut.await;
    let took = t0.elapsed();
    if took > SLOW_AWAIT {
        debug!(what, ?took, "slow relay operation");
    }
    out
}

/// See [`timed`].
const SLOW_AWAIT: Duration = Duration::from_millis(200);

async fn send_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    f: &Frame,
    stats: &RelayStats,
) -> Result<(), RelayError> {
    let mut out = BytesMut::with_capacity(f.encoded_len());
    FrameCodec::encode(f, &mut out);
    timed("write to peer", w.write_all(&out))
        .await
        .map_err(RelayError::Peer)?;
    stats.wire_tx.fetch_add(out.len() as u64, Ordering::Relaxed);
    Ok(())
}

/// Reads a single frame expected at the start of a stream (the open header
/// or the answer to it).
pub async fn read_first_frame<R: AsyncRead + Unpin>(rd: &mut R) -> Result<Frame, RelayError> {
    let mut buf = BytesMut::new();
    loop {
        match FrameCodec::check(&buf) {
            Ok(Some(total)) => {
                // Read exactly one frame: anything after it belongs to the
                // pump that takes over the stream.
                debug_assert_eq!(buf.len(), total);
                return match FrameCodec::decode(&mut buf) {
                    Ok(Some(f)) => Ok(f),
                    Ok(None) => Err(RelayError::Protocol("incomplete first frame".into())),
                    Err(e) => Err(RelayError::Protocol(e.to_string())),
                };
            }
            Ok(None) => {}
            Err(e) => return Err(RelayError::Protocol(e.to_string())),
        }
        // Read the header first, then exactly the payload.
        let want = if buf.len() < godwit_wire::FRAME_HEADER_LEN {
            godwit_wire::FRAME_HEADER_LEN - buf.len()
        } else {
            let len = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
            godwit_wire::FRAME_HEADER_LEN + len - buf.len()
        };
        let mut chunk = vec![0u8; want];
        rd.read_exact(&mut chunk).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                RelayError::PeerClosed
            } else {
                RelayError::Peer(e)
            }
        })?;
        buf.extend_from_slice(&chunk);
    }
}

/// Writes a single frame (used for stream headers and their answers).
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> Result<(), RelayError> {
    send_frame(w, f, &RelayStats::default()).await
}

/// Ends this side's peer stream: after an error the peer is told why
/// first. The stream stays open until the relay as a whole ends, even
/// after this side sent `End`, so that a failure noticed later can still
/// be reported (see [`tell_peer`]).
async fn finish<W: AsyncWrite + Unpin>(
    peer_tx: &mut W,
    result: &Result<(), RelayError>,
    stats: &RelayStats,
) {
    if let Err(e) = result {
        tell_peer(peer_tx, e, stats).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), peer_tx.shutdown()).await;
}

/// Best effort: tells the peer why this side gave up, so it can clean up
/// at once instead of waiting for the connection to time out. Pointless
/// when the peer stream itself failed or the peer aborted first.
async fn tell_peer<W: AsyncWrite + Unpin>(peer_tx: &mut W, e: &RelayError, stats: &RelayStats) {
    if !matches!(e, RelayError::Peer(_) | RelayError::PeerAborted(_)) {
        let abort = Frame::Abort(e.to_string());
        let _ =
            tokio::time::timeout(Duration::from_secs(1), send_frame(peer_tx, &abort, stats)).await;
    }
}

/// Source side: QEMU's outgoing migration socket ⇄ peer stream.
///
/// QEMU's bytes go through `out` (raw or page-aware, see
/// [`crate::memcodec`]); frames leave as the flow window allows, and QEMU
/// is read only when the codec has nothing waiting, so QEMU's view of the
/// bandwidth is the rate its (reduced) stream crosses the path. Returns
/// when both directions have ended cleanly. `rtt` is sampled for the flow
/// window; `cancel` aborts the relay (the peer is told why).
#[allow(clippy::too_many_arguments)]
pub async fn run_source<Q, PR, PW>(
    qemu: Q,
    peer_rx: PR,
    mut peer_tx: PW,
    rtt: impl Fn() -> Duration,
    stats: Arc<RelayStats>,
    mut cancel: watch::Receiver<Option<String>>,
    out: &mut Outbound,
) -> Result<(), RelayError>
where
    Q: AsyncRead + AsyncWrite + Unpin,
    PR: AsyncRead + Unpin,
    PW: AsyncWrite + Unpin,
{
    let (mut q_rd, mut q_wr) = tokio::io::split(qemu);
    let mut frames = FrameReader::new(peer_rx);
    let mut window = RelayWindow::new();
    let mut buf = vec![0u8; QEMU_READ];
    let mut qemu_done = false;
    let mut end_sent = false;
    let mut flush_at: Option<tokio::time::Instant> = None;
    let mut peer_done = false;
    let mut tick = tokio::time::interval(RTT_TICK);
    let mut end_deadline: Option<tokio::time::Instant> = None;
    let mut stalled_since: Option<Instant> = None;
    let mut last_progress = (Instant::now(), 0u64);
    window.handle_rtt(rtt());
    let result = 'relay: loop {
        if stats.drain.load(Ordering::Relaxed) {
            window.set_draining();
        }
        // Send what the codec has ready, as far as the window allows;
        // priority frames (answers the destination waits for) always go.
        while let Some(priority) = out.peek_priority() {
            if !priority && window.available() == 0 {
                break;
            }
            let Some((f, priority)) = out.pop() else {
                break;
            };
            if let Err(e) = send_frame(&mut peer_tx, &f, &stats).await {
                break 'relay Err(e);
            }
            if !priority {
                window.handle_sent(f.encoded_len() as u64);
                out.on_sent(window.sent());
            }
        }
        if qemu_done && !end_sent && out.peek_priority().is_none() {
            end_sent = true;
            if let Err(e) = send_frame(&mut peer_tx, &Frame::End, &stats).await {
                break Err(e);
            }
        }
        if end_sent && peer_done {
            break Ok(());
        }
        stats.window.store(window.window(), Ordering::Relaxed);
        stats
            .outstanding
            .store(window.outstanding(), Ordering::Relaxed);
        let can_read = !qemu_done && out.peek_priority().is_none() && window.available() > 0;
        if !out.has_unflushed() {
            flush_at = None;
        }
        let deadline = end_deadline;
        tokio::select! {
            // Order matters (biased): cancellation, the peer and the clock
            // before QEMU's stream, which may always be ready on a fast path.
            biased;
            _ = cancel.changed() => {
                let why = cancel.borrow().clone().unwrap_or_else(|| "cancelled".into());
                break Err(RelayError::Cancelled(why));
            }

            f = frames.next(&stats), if !peer_done => {
                match f {
                    Ok(Some(Frame::Data(d))) => {
                        debug!(bytes = d.len(), "return path to the source QEMU");
                        // Return path: deliver at once, unbatched.
                        if let Err(e) = timed("write return path to QEMU", q_wr.write_all(&d)).await { break Err(RelayError::Qemu(e)); }
                        stats.return_bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
                    }
                    Ok(Some(Frame::Codec(m))) => {
                        if let Err(e) = out.on_peer_message(&m) { break Err(e); }
                    }
                    Ok(Some(Frame::Ack(n))) => {
                        if let Err(e) = window.handle_ack(Instant::now(), n) { break Err(RelayError::Protocol(e.to_string())); }
                        out.on_acked(n);
                    }
                    Ok(Some(Frame::End)) => {
                        debug!("destination ended its stream");
                        peer_done = true;
                        let _ = q_wr.shutdown().await;
                    }
                    Ok(Some(Frame::Abort(why))) => break Err(RelayError::PeerAborted(why)),
                    Ok(Some(other)) => break Err(RelayError::Protocol(format!("unexpected {:?} frame", other.kind()))),
                    Ok(None) => break Err(RelayError::PeerClosed),
                    Err(e) => break Err(e),
                }
            }
            _ = tick.tick() => {
                window.handle_rtt(rtt());
                if let Some(rate) = window.max_rate() {
                    out.set_link_rate(rate);
                }
                if window.acked() != last_progress.1 || window.outstanding() == 0 {
                    last_progress = (Instant::now(), window.acked());
                } else if last_progress.0.elapsed() > ACK_STALL_TIMEOUT {
                    break Err(RelayError::AckStall(ACK_STALL_TIMEOUT));
                }
                // A window that stays full means the destination does not
                // consume: worth a trace when diagnosing slow switch-overs.
                match (window.available() == 0, stalled_since) {
                    (true, None) => stalled_since = Some(Instant::now()),
                    (true, Some(t)) if t.elapsed() > Duration::from_secs(1) => {
                        debug!(outstanding = window.outstanding(), window = window.window(), acked = window.acked(), "relay window full for over a second");
                        stalled_since = Some(Instant::now());
                    }
                    (false, _) => stalled_since = None,
                    _ => {}
                }
            }
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                break Err(RelayError::EndTimeout(END_GRACE));
            }
            r = q_rd.read(&mut buf), if can_read => {
                let n = match r { Ok(n) => n, Err(e) => break Err(RelayError::Qemu(e)) };
                if n == 0 {
                    debug!(sent = window.sent(), "source QEMU closed its stream");
                    qemu_done = true;
                    end_deadline = Some(tokio::time::Instant::now() + END_GRACE);
                    if let Err(e) = out.finish() { break Err(e); }
                } else {
                    stats.stream_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    if let Err(e) = out.push(&buf[..n]) { break Err(e); }
                }
            }
            // QEMU has nothing more right now: whatever is gathered goes
            // out after a short grace (FLUSH_DELAY), so no byte QEMU flushed
            // waits for long, yet a QEMU that writes in bursts still fills
            // whole batches (better compression, less CPU per byte).
            _ = async { match flush_at { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } }, if can_read => {
                flush_at = None;
                if let Err(e) = out.flush() { break Err(e); }
            }
            _ = std::future::ready(()), if can_read && flush_at.is_none() && out.has_unflushed() => {
                flush_at = Some(tokio::time::Instant::now() + FLUSH_DELAY);
            }
        }
    };
    finish(&mut peer_tx, &result, &stats).await;
    result
}

/// Destination side: peer stream ⇄ the destination QEMU's incoming socket.
///
/// `greeting` goes to the source first (the summaries of what this site
/// holds). Frames go through `inbound` (raw or page-aware); what it
/// produces is written to QEMU, and the wire bytes it fully delivered are
/// acknowledged. The return path is parsed into messages and SHUT passes
/// only through `gate` (see [`crate::rpgate`]).
#[allow(clippy::too_many_arguments)]
pub async fn run_destination<Q, PR, PW>(
    qemu: Q,
    peer_rx: PR,
    mut peer_tx: PW,
    stats: Arc<RelayStats>,
    gate: Arc<ReturnGate>,
    mut cancel: watch::Receiver<Option<String>>,
    greeting: Vec<Frame>,
    inbound: &mut Inbound,
) -> Result<(), RelayError>
where
    Q: AsyncRead + AsyncWrite + Unpin,
    PR: AsyncRead + Unpin,
    PW: AsyncWrite + Unpin,
{
    let (mut q_rd, mut q_wr) = tokio::io::split(qemu);
    let mut frames = FrameReader::new(peer_rx);
    let mut buf = vec![0u8; CHUNK];
    let mut acked = 0u64;
    let mut qemu_done = false;
    let mut peer_done = false;
    let mut rp = ReturnPathParser::default();
    let mut greeting = greeting.into_iter();
    let result = 'relay: loop {
        if let Some(f) = greeting.next() {
            if let Err(e) = send_frame(&mut peer_tx, &f, &stats).await {
                break Err(e);
            }
            continue;
        }
        if qemu_done && peer_done {
            break Ok(());
        }
        tokio::select! {
            f = frames.next(&stats), if !peer_done => {
                match f {
                    Ok(Some(f @ (Frame::Data(_) | Frame::Codec(_)))) => {
                        let wire = f.encoded_len() as u64;
                        if let Err(e) = inbound.on_frame(f, wire) { break Err(e); }
                        while let Some(reply) = inbound.poll_reply() {
                            if let Err(e) = send_frame(&mut peer_tx, &reply, &stats).await { break 'relay Err(e); }
                        }
                        while let Some(d) = inbound.take_output() {
                            if let Err(e) = timed("write stream to QEMU", q_wr.write_all(&d)).await { break 'relay Err(RelayError::Qemu(e)); }
                            stats.stream_bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
                        }
                        let done = inbound.completed_wire();
                        let idle = !matches!(FrameCodec::check(&frames.buf), Ok(Some(_)));
                        if done > acked && (done - acked >= ACK_EVERY || idle) {
                            if let Err(e) = send_frame(&mut peer_tx, &Frame::Ack(done), &stats).await { break Err(e); }
                            acked = done;
                        }
                    }
                    Ok(Some(Frame::End)) => {
                        peer_done = true;
                        let _ = send_frame(&mut peer_tx, &Frame::Ack(inbound.completed_wire()), &stats).await;
                        let _ = q_wr.shutdown().await;
                    }
                    Ok(Some(Frame::Abort(why))) => break Err(RelayError::PeerAborted(why)),
                    Ok(Some(other)) => break Err(RelayError::Protocol(format!("unexpected {:?} frame", other.kind()))),
                    Ok(None) => break Err(RelayError::PeerClosed),
                    Err(e) => break Err(e),
                }
            }
            r = q_rd.read(&mut buf), if !qemu_done => {
                let n = match r { Ok(n) => n, Err(e) => break Err(RelayError::Qemu(e)) };
                if n == 0 {
                    qemu_done = true;
                    if let Err(e) = send_frame(&mut peer_tx, &Frame::End, &stats).await { break Err(e); }
                    continue;
                }
                rp.handle_input(&buf[..n]);
                loop {
                    let msg = match rp.poll_message() {
                        Ok(Some(m)) => m,
                        Ok(None) => break,
                        Err(e) => break 'relay Err(RelayError::Protocol(format!("destination QEMU: {e}"))),
                    };
                    if msg.kind == MSG_SHUT {
                        if !gate.pass_shut() {
                            break 'relay Err(RelayError::Fenced);
                        }
                        debug!("SHUT passed the gate");
                    }
                    let len = msg.bytes.len() as u64;
                    if let Err(e) = send_frame(&mut peer_tx, &Frame::Data(Bytes::from(msg.bytes)), &stats).await { break 'relay Err(e); }
                    stats.return_bytes.fetch_add(len, Ordering::Relaxed);
                }
            }
            _ = cancel.changed() => {
                let why = cancel.borrow().clone().unwrap_or_else(|| "cancelled".into());
                break Err(RelayError::Cancelled(why));
            }
        }
    };
    finish(&mut peer_tx, &result, &stats).await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    /// QEMU's SHUT(0) message.
    const SHUT: [u8; 8] = [0, 1, 0, 4, 0, 0, 0, 0];

    async fn source_raw<Q, PR, PW>(
        qemu: Q,
        rx: PR,
        tx: PW,
        stats: Arc<RelayStats>,
        cancel: watch::Receiver<Option<String>>,
    ) -> Result<(), RelayError>
    where
        Q: AsyncRead + AsyncWrite + Unpin,
        PR: AsyncRead + Unpin,
        PW: AsyncWrite + Unpin,
    {
        let mut out = Outbound::raw();
        let rtt = || Duration::from_millis(1);
        run_source(qemu, rx, tx, rtt, stats, cancel, &mut out).await
    }

    async fn destination_raw<Q, PR, PW>(
        qemu: Q,
        rx: PR,
        tx: PW,
        stats: Arc<RelayStats>,
        gate: Arc<ReturnGate>,
        cancel: watch::Receiver<Option<String>>,
    ) -> Result<(), RelayError>
    where
        Q: AsyncRead + AsyncWrite + Unpin,
        PR: AsyncRead + Unpin,
        PW: AsyncWrite + Unpin,
    {
        let mut inbound = Inbound::raw();
        run_destination(qemu, rx, tx, stats, gate, cancel, Vec::new(), &mut inbound).await
    }

    /// A fake source QEMU writes a stream and waits for a "SHUT" on the
    /// return path; a fake destination QEMU reads it all, answers, closes.
    #[tokio::test]
    async fn carries_both_directions_byte_exact() {
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (src_qemu, src_agent_q) = duplex(1 << 16);
        let (dst_qemu, dst_agent_q) = duplex(1 << 16);
        let (a_to_b, b_from_a) = duplex(1 << 20);
        let (b_to_a, a_from_b) = duplex(1 << 20);
        let (_c1, cancel1) = watch::channel(None);
        let (_c2, cancel2) = watch::channel(None);
        let s_stats = Arc::new(RelayStats::default());
        let d_stats = Arc::new(RelayStats::default());
        let src = tokio::spawn(source_raw(
            src_agent_q,
            a_from_b,
            a_to_b,
            s_stats.clone(),
            cancel1,
        ));
        let gate = Arc::new(ReturnGate::default());
        let dst = tokio::spawn(destination_raw(
            dst_agent_q,
            b_from_a,
            b_to_a,
            d_stats.clone(),
            gate.clone(),
            cancel2,
        ));
        let p = payload.clone();
        let fake_src = tokio::spawn(async move {
            let (mut rd, mut wr) = tokio::io::split(src_qemu);
            wr.write_all(&p).await.unwrap();
            let mut shut = [0u8; 8];
            rd.read_exact(&mut shut).await.unwrap();
            assert_eq!(shut, SHUT);
            wr.shutdown().await.unwrap();
            drop(wr);
            let mut rest = Vec::new();
            rd.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
        });
        let fake_dst = tokio::spawn(async move {
            let (mut rd, mut wr) = tokio::io::split(dst_qemu);
            let mut got = vec![0u8; payload.len()];
            rd.read_exact(&mut got).await.unwrap();
            assert_eq!(got, payload);
            wr.write_all(&SHUT).await.unwrap();
            wr.shutdown().await.unwrap();
            let mut rest = Vec::new();
            rd.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
        });
        fake_src.await.unwrap();
        fake_dst.await.unwrap();
        src.await.unwrap().unwrap();
        dst.await.unwrap().unwrap();
        assert_eq!(s_stats.stream_bytes.load(Ordering::Relaxed), 3_000_000);
        assert_eq!(d_stats.stream_bytes.load(Ordering::Relaxed), 3_000_000);
        assert_eq!(s_stats.return_bytes.load(Ordering::Relaxed), 8);
        assert!(gate.shut_passed());
    }

    /// A fenced gate keeps SHUT from ever reaching the source.
    #[tokio::test]
    async fn fenced_gate_blocks_shut() {
        let (mut dst_qemu, dst_agent_q) = duplex(1 << 16);
        let (_a_to_b, b_from_a) = duplex(1 << 16);
        let (b_to_a, mut a_from_b) = duplex(1 << 16);
        let (_c, cancel) = watch::channel(None);
        let gate = Arc::new(ReturnGate::default());
        assert!(!gate.fence());
        let dst = tokio::spawn(destination_raw(
            dst_agent_q,
            b_from_a,
            b_to_a,
            Arc::new(RelayStats::default()),
            gate,
            cancel,
        ));
        dst_qemu.write_all(&[0, 2, 0, 4, 0, 0, 0, 1]).await.unwrap();
        dst_qemu.write_all(&SHUT).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), dst)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(r, Err(RelayError::Fenced)), "{r:?}");
        let mut seen = Vec::new();
        let _ =
            tokio::time::timeout(Duration::from_millis(200), a_from_b.read_to_end(&mut seen)).await;
        // The PONG went out; the SHUT did not.
        assert!(seen.windows(8).any(|w| w == [0, 2, 0, 4, 0, 0, 0, 1]));
        assert!(!seen.windows(8).any(|w| w == SHUT));
    }

    /// Cutting the peer stream fails the source relay with a peer error and
    /// never hangs.
    #[tokio::test]
    async fn cut_peer_fails_source() {
        let (_src_qemu, src_agent_q) = duplex(1 << 16);
        let (a_to_b, b_from_a) = duplex(1 << 16);
        let (b_to_a, a_from_b) = duplex(1 << 16);
        let (_c, cancel) = watch::channel(None);
        let src = tokio::spawn(source_raw(
            src_agent_q,
            a_from_b,
            a_to_b,
            Arc::new(RelayStats::default()),
            cancel,
        ));
        drop(b_from_a);
        drop(b_to_a);
        let r = tokio::time::timeout(Duration::from_secs(5), src)
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(r, Err(RelayError::PeerClosed) | Err(RelayError::Peer(_))),
            "{r:?}"
        );
    }

    /// The source never has more than the window outstanding when the
    /// destination does not acknowledge.
    #[tokio::test]
    async fn source_respects_window_without_acks() {
        let (mut src_qemu, src_agent_q) = duplex(1 << 16);
        let (a_to_b, mut b_from_a) = duplex(64 << 20);
        let (_b_to_a, a_from_b) = duplex(1 << 16);
        let (_c, cancel) = watch::channel(None);
        let stats = Arc::new(RelayStats::default());
        let _src = tokio::spawn(source_raw(
            src_agent_q,
            a_from_b,
            a_to_b,
            stats.clone(),
            cancel,
        ));
        let writer = tokio::spawn(async move {
            let chunk = vec![1u8; 1 << 16];
            loop {
                if src_qemu.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        });
        let drain = tokio::spawn(async move {
            let mut sink = vec![0u8; 1 << 16];
            while b_from_a.read(&mut sink).await.unwrap_or(0) > 0 {}
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The window counts framed bytes: QEMU's bytes fill it but for the
        // frame headers.
        let relayed = stats.stream_bytes.load(Ordering::Relaxed);
        let window = godwit_wire::window::INITIAL_WINDOW;
        assert!(
            relayed <= window + CHUNK as u64 && relayed > window - CHUNK as u64,
            "{relayed}"
        );
        writer.abort();
        drain.abort();
    }

    /// The destination QEMU dies mid-stream (its socket closes first, then
    /// writes to it fail): the source must learn why promptly instead of
    /// waiting for acknowledgements that cannot come.
    #[tokio::test]
    async fn destination_qemu_death_reaches_the_source() {
        let (mut src_qemu, src_agent_q) = duplex(1 << 16);
        let (dst_qemu, dst_agent_q) = duplex(1 << 16);
        let (a_to_b, b_from_a) = duplex(1 << 20);
        let (b_to_a, a_from_b) = duplex(1 << 20);
        let (_c1, cancel1) = watch::channel(None);
        let (_c2, cancel2) = watch::channel(None);
        let src = tokio::spawn(source_raw(
            src_agent_q,
            a_from_b,
            a_to_b,
            Arc::new(RelayStats::default()),
            cancel1,
        ));
        let dst = tokio::spawn(destination_raw(
            dst_agent_q,
            b_from_a,
            b_to_a,
            Arc::new(RelayStats::default()),
            Arc::new(ReturnGate::default()),
            cancel2,
        ));
        // The destination QEMU goes away at once.
        drop(dst_qemu);
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 1 << 16];
            while src_qemu.write_all(&chunk).await.is_ok() {}
        });
        let r = tokio::time::timeout(Duration::from_secs(10), src).await;
        writer.abort();
        let r = r.expect("the source relay hung").unwrap();
        // Whichever the source notices first: the destination's abort, or
        // its half of the stream going away.
        assert!(
            matches!(r, Err(RelayError::PeerAborted(_) | RelayError::Peer(_))),
            "{r:?}"
        );
        assert!(dst.await.unwrap().is_err());
    }
}
