//! Congestion-window cap for quinn's BBR (sans-IO).
//!
//! quinn 0.11's BBR (an experimental BBRv1 port) does not pace at its model's
//! rate; only its congestion window limits the sender, and that window adds
//! the measured ACK aggregation on top of 2 × BDP. Through this crate's WAN
//! emulator (100 ms, 100 Mbit/s, 1-BDP drop-tail queue) it settles at 5–6 ×
//! BDP in flight: the queue stays full and ~45 % of packets are dropped at
//! the bottleneck. [`CappedBbr`] keeps BBR's loss-insensitivity (the reason
//! to choose it on lossy long paths) but clamps its window to
//! [`CAP_GAIN`] × (max delivery rate × min RTT), measured independently from
//! ACKs, which bounds the standing queue to (`CAP_GAIN` − 1) × BDP.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{BbrConfig, Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

/// Window cap as a multiple of the estimated BDP. 1.5 leaves half a BDP for
/// BBR's bandwidth probing (pacing gain 1.25) and for delayed ACKs, while a
/// bottleneck buffer of half a BDP or more absorbs the standing queue.
pub const CAP_GAIN: f64 = 1.5;
/// Cap gain while the delivery rate is still growing (BBR startup), so the
/// cap does not slow BBR's doubling per round: a sample lags the window by a
/// round, so doubling needs more than 2 × the last sample.
pub const STARTUP_CAP_GAIN: f64 = 3.0;
/// A sample at least this factor above the best so far counts as growth
/// (BBR's full-pipe test).
pub const GROWTH_FACTOR: f64 = 1.25;
/// Rounds without growth after which the pipe is considered full and the
/// steady [`CAP_GAIN`] applies (BBR's full-pipe test).
pub const FULL_PIPE_ROUNDS: u32 = 3;
/// Extra time worth of data the cap always allows: quinn's default
/// `max_ack_delay` (25 ms). ACKs may legitimately lag delivery by that much,
/// and on fast low-latency paths (loopback, LAN) the min RTT is microseconds
/// while host scheduling adds milliseconds, which a pure BDP multiple would
/// throttle.
pub const CAP_HEADROOM: Duration = Duration::from_millis(25);
/// Delivery-rate samples (one per min-RTT round) the max filter remembers:
/// BBR's 10-round bandwidth window.
pub const RATE_WINDOW_ROUNDS: usize = 10;
/// Shortest sampling interval, so loopback's microsecond RTTs still produce
/// meaningful rate samples.
pub const MIN_SAMPLE_INTERVAL: Duration = Duration::from_millis(1);

/// Factory for [`CappedBbr`].
#[derive(Debug, Clone, Default)]
pub struct CappedBbrConfig {
    bbr: BbrConfig,
}

impl ControllerFactory for CappedBbrConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        let inner = Arc::new(self.bbr.clone()).build(now, current_mtu);
        Box::new(CappedBbr {
            inner,
            rate: DeliveryRate::default(),
            min_rtt: None,
        })
    }
}

/// quinn's BBR with its window clamped to [`CAP_GAIN`] × estimated BDP plus
/// [`CAP_HEADROOM`].
pub struct CappedBbr {
    inner: Box<dyn Controller>,
    rate: DeliveryRate,
    min_rtt: Option<Duration>,
}

impl Clone for CappedBbr {
    fn clone(&self) -> Self {
        CappedBbr {
            inner: self.inner.clone_box(),
            rate: self.rate.clone(),
            min_rtt: self.min_rtt,
        }
    }
}

impl CappedBbr {
    /// The current cap, once both a rate and an RTT sample exist. Never
    /// below BBR's initial window, so a slow first round cannot starve it.
    pub fn cap(&self) -> Option<u64> {
        let rate = self.rate.max()?;
        let rtt = self.min_rtt?;
        let bdp = rate * rtt.as_secs_f64();
        let gain = if self.rate.growing() {
            STARTUP_CAP_GAIN
        } else {
            CAP_GAIN
        };
        let cap = bdp * gain + rate * CAP_HEADROOM.as_secs_f64();
        Some((cap as u64).max(self.inner.initial_window()))
    }
}

impl Controller for CappedBbr {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
        let min_rtt = rtt.min();
        self.min_rtt = Some(min_rtt);
        self.rate.on_ack(now, bytes, app_limited, min_rtt);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.inner
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        let window = self.inner.window();
        self.cap().map_or(window, |cap| window.min(cap))
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = self.inner.metrics();
        m.congestion_window = self.window();
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(Clone::clone(self))
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}

/// Windowed-max delivery rate (bytes/s): acknowledged bytes per round of at
/// least one min RTT. Rounds that contained app-limited ACKs only count if
/// they raise the max, so an idle sender does not forget the link's rate.
#[derive(Debug, Clone, Default)]
pub struct DeliveryRate {
    round_start: Option<Instant>,
    round_bytes: u64,
    round_app_limited: bool,
    samples: VecDeque<f64>,
    /// Best non-app-limited sample at the last growth step.
    full_bw: f64,
    rounds_without_growth: u32,
}

impl DeliveryRate {
    /// Feeds one acknowledged packet.
    pub fn on_ack(&mut self, now: Instant, bytes: u64, app_limited: bool, min_rtt: Duration) {
        let Some(start) = self.round_start else {
            // The first ACK only opens a round: its bytes were sent before
            // any interval we can time.
            self.round_start = Some(now);
            return;
        };
        self.round_bytes += bytes;
        self.round_app_limited |= app_limited;
        let elapsed = now.saturating_duration_since(start);
        if elapsed < min_rtt.max(MIN_SAMPLE_INTERVAL) {
            return;
        }
        let sample = self.round_bytes as f64 / elapsed.as_secs_f64();
        if !self.round_app_limited {
            if sample >= self.full_bw * GROWTH_FACTOR {
                self.full_bw = sample;
                self.rounds_without_growth = 0;
            } else {
                self.rounds_without_growth = self.rounds_without_growth.saturating_add(1);
            }
        }
        if !self.round_app_limited || self.max().is_none_or(|m| sample > m) {
            if self.samples.len() == RATE_WINDOW_ROUNDS {
                self.samples.pop_front();
            }
            self.samples.push_back(sample);
        }
        self.round_start = Some(now);
        self.round_bytes = 0;
        self.round_app_limited = false;
    }

    /// True while the rate grew by [`GROWTH_FACTOR`] within the last
    /// [`FULL_PIPE_ROUNDS`] non-app-limited rounds.
    pub fn growing(&self) -> bool {
        self.rounds_without_growth < FULL_PIPE_ROUNDS
    }

    /// The largest recent sample, bytes per second.
    pub fn max(&self) -> Option<f64> {
        self.samples.iter().copied().reduce(f64::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_rate_measures_bytes_per_round() {
        let mut r = DeliveryRate::default();
        let t0 = Instant::now();
        let rtt = Duration::from_millis(100);
        r.on_ack(t0, 1000, false, rtt);
        assert_eq!(r.max(), None);
        // 10 ms apart, 12_500 bytes each: 1.25 MB/s.
        for i in 1..=10u32 {
            r.on_ack(t0 + Duration::from_millis(10) * i, 12_500, false, rtt);
        }
        let max = r.max().expect("one sample");
        assert!((max - 1_250_000.0).abs() < 1.0, "{max}");
    }

    #[test]
    fn growth_detection_follows_bbr_full_pipe_test() {
        let mut r = DeliveryRate::default();
        let t0 = Instant::now();
        let rtt = Duration::from_millis(10);
        r.on_ack(t0, 0, false, rtt);
        let mut t = t0;
        // Doubling rounds: growing.
        for bytes in [1_000u64, 2_000, 4_000, 8_000] {
            t += rtt;
            r.on_ack(t, bytes, false, rtt);
            assert!(r.growing());
        }
        // Three flat rounds: pipe full.
        for _ in 0..FULL_PIPE_ROUNDS {
            t += rtt;
            r.on_ack(t, 8_000, false, rtt);
        }
        assert!(!r.growing());
        // Growth again (more bandwidth became available): growing again.
        t += rtt;
        r.on_ack(t, 16_000, false, rtt);
        assert!(r.growing());
    }

    #[test]
    fn app_limited_rounds_do_not_lower_the_max() {
        let mut r = DeliveryRate::default();
        let t0 = Instant::now();
        let rtt = Duration::from_millis(10);
        r.on_ack(t0, 0, false, rtt);
        r.on_ack(t0 + rtt, 10_000, false, rtt); // 1 MB/s
        for i in 2..30u32 {
            r.on_ack(t0 + rtt * i, 10, true, rtt);
        }
        let max = r.max().expect("sample");
        assert!((max - 1_000_000.0).abs() < 1.0, "{max}");
    }

    #[test]
    fn capped_window_never_exceeds_gain_times_bdp() {
        let factory = Arc::new(CappedBbrConfig::default());
        let now = Instant::now();
        let c = factory.build(now, 1200);
        // Before any sample the cap is absent and BBR's own window applies.
        assert!(c.window() > 0);
        assert_eq!(c.window(), c.initial_window());
    }
}
