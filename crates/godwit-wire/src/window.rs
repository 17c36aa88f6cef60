//! The relay flow window: how many relayed bytes may be outstanding between
//! the source agent and the destination QEMU.
//!
//! QEMU decides when to stop the guest from the rate at which its socket
//! accepts bytes (see `qemu-migration-stream.md` §4.2). If the agents
//! buffered freely, QEMU would see the speed of a local socket, switch over
//! too early, and the real downtime would include draining that backlog
//! across the WAN. So the source agent only forwards while
//! `sent - acked < window`, where `acked` counts bytes the destination
//! agent has written into its QEMU, and the window tracks the measured
//! bandwidth-delay product:
//!
//! ```text
//! window = clamp(max_rate × (min_rtt + ACK_ALLOWANCE) × GAIN, MIN_WINDOW, MAX_WINDOW)
//! ```
//!
//! `GAIN` > 1 lets the window grow by that factor each round trip while
//! the path is faster than the current window allows (as in BBR's
//! startup); once the path is full, the excess backlog is bounded by
//! `(GAIN - 1) × BDP`. Time is passed in; nothing here reads a clock.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Window before any delivery-rate sample exists. 4 MiB fills 100 Mbit/s
/// up to ~330 ms RTT from the first round trip, yet is drained in a third
/// of a second should QEMU switch over at once.
pub const INITIAL_WINDOW: u64 = 4 << 20;
/// Smallest window: enough for 1 Gbit/s at 2 ms RTT, so LAN migrations
/// are never window-limited.
pub const MIN_WINDOW: u64 = 256 << 10;
/// Largest window: 10 Gbit/s × 600 ms RTT would need 750 MB; we cap at
/// 256 MiB to bound agent memory per migration.
pub const MAX_WINDOW: u64 = 256 << 20;
/// Growth factor over the measured bandwidth-delay product.
pub const GAIN: f64 = 1.5;
/// Gain while draining before switch-over ([`RelayWindow::set_draining`]):
/// the window holds the path's bandwidth-delay product and no backlog, so
/// when QEMU stops the guest nothing waits in a queue behind the last pass.
pub const DRAIN_GAIN: f64 = 1.0;
/// Extra time allowed for acknowledgement batching at the receiver.
pub const ACK_ALLOWANCE: Duration = Duration::from_millis(10);
/// Shortest span a delivery-rate sample covers. Each sample spans at least
/// one round trip as well: acknowledgements arrive in bursts, and only over
/// a full round trip does "bytes acknowledged" measure the path rather than
/// the burst.
pub const MIN_SAMPLE_SPAN: Duration = Duration::from_millis(50);
/// How long a rate sample stays in the max filter; long enough to ride out
/// a pause in QEMU's output, short enough to follow a slower path.
pub const RATE_FILTER_SPAN: Duration = Duration::from_secs(2);

/// Errors from feeding the window inconsistent numbers.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WindowError {
    /// The peer acknowledged bytes we never sent, or went backwards.
    #[error("peer acknowledged {acked} bytes but {sent} were sent and {prev} acknowledged before")]
    BadAck {
        /// Acknowledged total.
        acked: u64,
        /// Sent total.
        sent: u64,
        /// Previous acknowledged total.
        prev: u64,
    },
}

/// Flow window for one relayed direction (see the module docs).
#[derive(Debug, Clone)]
pub struct RelayWindow {
    sent: u64,
    acked: u64,
    min_rtt: Option<Duration>,
    /// (time, cumulative acked) points, oldest first.
    history: VecDeque<(Instant, u64)>,
    /// (time, bytes/s) samples, newest last.
    rates: VecDeque<(Instant, f64)>,
    /// [`GAIN`], or [`DRAIN_GAIN`] once draining.
    gain: f64,
}

impl Default for RelayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl RelayWindow {
    /// A window with nothing sent.
    pub fn new() -> Self {
        Self {
            sent: 0,
            acked: 0,
            min_rtt: None,
            history: VecDeque::new(),
            rates: VecDeque::new(),
            gain: GAIN,
        }
    }

    /// Records `n` bytes handed to the transport.
    pub fn handle_sent(&mut self, n: u64) {
        self.sent += n;
    }

    /// Records a round-trip time sample from the transport.
    pub fn handle_rtt(&mut self, rtt: Duration) {
        if rtt.is_zero() {
            return;
        }
        self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
    }

    /// Records a cumulative acknowledgement from the receiver.
    pub fn handle_ack(&mut self, now: Instant, acked: u64) -> Result<(), WindowError> {
        if acked > self.sent || acked < self.acked {
            return Err(WindowError::BadAck {
                acked,
                sent: self.sent,
                prev: self.acked,
            });
        }
        self.acked = acked;
        let span = self.min_rtt.unwrap_or_default().max(MIN_SAMPLE_SPAN);
        // The newest point at least `span` old gives the sample.
        if let Some(&(t0, a0)) = self
            .history
            .iter()
            .rev()
            .find(|&&(t, _)| now.saturating_duration_since(t) >= span)
        {
            let dt = now.saturating_duration_since(t0).as_secs_f64();
            self.rates.push_back((now, (acked - a0) as f64 / dt));
        }
        self.history.push_back((now, acked));
        let keep = span * 2;
        // Drop points that can no longer be the base of a sample, keeping
        // the newest such point.
        while self.history.len() > 1 && now.saturating_duration_since(self.history[1].0) >= keep {
            self.history.pop_front();
        }
        while let Some(&(t, _)) = self.rates.front() {
            if now.saturating_duration_since(t) > RATE_FILTER_SPAN {
                self.rates.pop_front();
            } else {
                break;
            }
        }
        Ok(())
    }

    /// Bytes sent and not yet acknowledged.
    pub fn outstanding(&self) -> u64 {
        self.sent - self.acked
    }

    /// Total bytes sent.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Total bytes acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Highest recent delivery rate, bytes per second.
    pub fn max_rate(&self) -> Option<f64> {
        self.rates.iter().map(|&(_, r)| r).reduce(f64::max)
    }

    /// Current window in bytes.
    pub fn window(&self) -> u64 {
        match (self.max_rate(), self.min_rtt) {
            (Some(rate), Some(rtt)) if rate > 0.0 => {
                let bdp = rate * (rtt + ACK_ALLOWANCE).as_secs_f64() * self.gain;
                (bdp as u64).clamp(MIN_WINDOW, MAX_WINDOW)
            }
            _ => INITIAL_WINDOW,
        }
    }

    /// Stops probing for more bandwidth (see [`DRAIN_GAIN`]); the switch-over
    /// is near. The rate estimate keeps the pipe full.
    pub fn set_draining(&mut self) {
        self.gain = DRAIN_GAIN;
    }

    /// How many more bytes may be sent now.
    pub fn available(&self) -> u64 {
        self.window().saturating_sub(self.outstanding())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_with_initial_window() {
        let w = RelayWindow::new();
        assert_eq!(w.available(), INITIAL_WINDOW);
    }

    #[test]
    fn rejects_acks_beyond_sent_or_backwards() {
        let mut w = RelayWindow::new();
        let t = Instant::now();
        w.handle_sent(100);
        assert!(w.handle_ack(t, 101).is_err());
        w.handle_ack(t, 50).unwrap();
        assert!(w.handle_ack(t, 40).is_err());
    }

    /// A path of fixed `rate` (bytes/s) and `rtt` with a sender that always
    /// has data, for `steps` × 5 ms; drains from step `drain_at` on.
    /// Returns the window and the throughput over the second half.
    fn simulate(rate: f64, rtt: Duration, steps: usize, drain_at: Option<usize>) -> (u64, f64) {
        let mut w = RelayWindow::new();
        let t0 = Instant::now();
        let step = Duration::from_millis(5);
        // Bytes in flight, with the time they will be acknowledged.
        let mut inflight: VecDeque<(Instant, u64)> = VecDeque::new();
        let mut link_free = t0;
        let mut acked = 0u64;
        let mut now = t0;
        let mut half = (t0, 0u64);
        for i in 0..steps {
            if i == steps / 2 {
                half = (now, acked);
            }
            if Some(i) == drain_at {
                w.set_draining();
            }
            now += step;
            w.handle_rtt(rtt);
            while let Some(&(t, n)) = inflight.front() {
                if t <= now {
                    acked += n;
                    inflight.pop_front();
                } else {
                    break;
                }
            }
            w.handle_ack(now, acked).unwrap();
            const CHUNK: u64 = 64 << 10;
            while w.available() >= CHUNK {
                // The bottleneck serialises at `rate`.
                let start = link_free.max(now);
                let done = start + Duration::from_secs_f64(CHUNK as f64 / rate);
                link_free = done;
                inflight.push_back((done + rtt, CHUNK));
                w.handle_sent(CHUNK);
            }
        }
        let thr = (acked - half.1) as f64 / now.duration_since(half.0).as_secs_f64();
        (w.window(), thr)
    }

    /// The window must converge near GAIN × BDP, never below the BDP
    /// (which would starve the link) and never far above it.
    #[test]
    fn converges_to_the_bandwidth_delay_product() {
        for (rate, rtt_ms) in [(12.5e6, 260u64), (12.5e6, 1), (125e6, 100)] {
            let rtt = Duration::from_millis(rtt_ms);
            let (win, thr) = simulate(rate, rtt, 4000, None);
            let bdp = rate * (rtt + ACK_ALLOWANCE).as_secs_f64();
            let win = win as f64;
            assert!(
                win >= (bdp).min(MAX_WINDOW as f64).max(MIN_WINDOW as f64) * 0.99,
                "rate {rate} rtt {rtt_ms}: window {win} below bdp {bdp}"
            );
            assert!(
                win <= (bdp * GAIN * 1.3).max(MIN_WINDOW as f64),
                "rate {rate} rtt {rtt_ms}: window {win} far above bdp {bdp}"
            );
            // And the achieved throughput is close to the link rate.
            assert!(
                thr > rate * 0.85,
                "rate {rate} rtt {rtt_ms}: throughput {thr}"
            );
        }
    }

    /// Draining keeps the link full with a window of one BDP: no backlog.
    #[test]
    fn draining_holds_the_bdp_and_the_rate() {
        for (rate, rtt_ms) in [(12.5e6, 520u64), (12.5e6, 160)] {
            let rtt = Duration::from_millis(rtt_ms);
            let (win, thr) = simulate(rate, rtt, 4000, Some(1000));
            let bdp = rate * (rtt + ACK_ALLOWANCE).as_secs_f64();
            let win = win as f64;
            assert!(
                (bdp * 0.99..=bdp * 1.1).contains(&win),
                "rate {rate} rtt {rtt_ms}: window {win} vs bdp {bdp}"
            );
            assert!(
                thr > rate * 0.95,
                "rate {rate} rtt {rtt_ms}: throughput {thr}"
            );
        }
    }
}
