//! A loss-tolerant, model-based congestion controller for long fat pipes
//! (sans-IO): godwit's default for agent-to-agent connections.
//!
//! # Why not CUBIC, NewReno or quinn's BBR
//!
//! Loss-based controllers read every loss as congestion. On a 520 ms RTT
//! path the Mathis limit at 0.1 % random loss is below 1 Mbit/s, so a WAN
//! with a little non-congestive loss (radio hops, busy peering links) makes
//! a migration crawl. quinn 0.11's BBR is loss-tolerant but does not pace at
//! its model's rate and overshoots by several BDPs, and it sits in loss
//! recovery whenever each round has a loss, which at 0.1 % and thousands of
//! packets per round is always ([`crate::congestion`] caps it, which helps
//! but keeps its recovery quirks).
//!
//! # Model
//!
//! BBR-style: the window is derived from a path model, not from losses.
//!
//! - **Bottleneck bandwidth**: windowed max (over [`BW_WINDOW_ROUNDS`]
//!   rounds) of delivery-rate samples, computed per acknowledged packet as
//!   in draft-cheng-iccrg-delivery-rate-estimation: bytes delivered between
//!   the packet's send and its ACK over max(send interval, ACK interval).
//!   Samples over less than one min RTT are discarded (ACK compression), and
//!   app-limited samples only count when they raise the max.
//! - **Min RTT**: the smallest `ack time − send time` in [`MIN_RTT_WINDOW`]
//!   (or [`MIN_RTT_WINDOW_RTTS`] round trips, whichever is longer, so the
//!   probe's cost stays near 1 % on 600 ms paths); when it expires the
//!   controller briefly shrinks its window ([`Mode::ProbeRtt`]) so the queue
//!   it keeps drains and the true base RTT is seen again.
//! - **Window** = bw × ([`CWND_GAIN`] × min RTT + [`ACK_HEADROOM`]). quinn
//!   paces at 1.25 × window / smoothed RTT, so the window *is* the rate
//!   control: ≥ 1 BDP keeps the pipe full, and the 25 % excess both absorbs
//!   ACK batching and probes for more bandwidth (a free pipe raises the
//!   delivery rate by up to 25 % per round).
//! - **Startup**: the window grows by the bytes acknowledged (doubling per
//!   round), capped at [`STARTUP_GAIN`] × the model, until the bandwidth
//!   stops growing by [`FULL_BW_GROWTH`] for [`FULL_BW_ROUNDS`] rounds or a
//!   round shows congestive loss.
//!
//! # Losses
//!
//! Losses are counted per *loss epoch*: at least one round and at least
//! [`LOSS_EPOCH_MIN_PACKETS`] packets. An epoch whose loss rate stays at or
//! below [`LOSS_THRESHOLD`] is treated as random, non-congestive loss and
//! ignored. Above it, an upper bound on the window (`inflight_hi`) is set to
//! [`LOSS_BETA`] × the window; each clean epoch after that raises the bound
//! by [`INFLIGHT_HI_GROWTH`] until the model is no longer limited by it.
//! Persistent congestion (RFC 9002 § 7.6: everything lost for several PTOs)
//! resets the model and restarts from the minimum window.
//!
//! ECN congestion signals (`lost_bytes == 0`) are ignored: the lab and the
//! WANs godwit targets do not mark, and a marking AQM would need a
//! different response (a later BBRv2-style `inflight_lo`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

/// Window gain over the BDP in steady state (see the module docs).
pub const CWND_GAIN: f64 = 1.25;
/// Window cap over the BDP during startup: the window grows by the bytes
/// acknowledged, and a bandwidth sample lags the window by a round, so
/// doubling each round needs 2 ×.
pub const STARTUP_GAIN: f64 = 2.0;
/// Time worth of data added to every window: the receiver may hold an ACK
/// this long beyond the RTT, and host scheduling adds milliseconds, which a
/// pure BDP multiple would throttle on sub-millisecond paths. Small enough
/// (62 KB at 100 Mbit/s) to fit the shallowest lab queue (128 KiB).
pub const ACK_HEADROOM: Duration = Duration::from_millis(5);
/// Window over the BDP during [`Mode::ProbeRtt`]: below 1 so the standing
/// queue (≤ 0.25 BDP + headroom) drains, but close to 1 so the probe costs
/// only ~15 % of one round.
pub const PROBE_RTT_GAIN: f64 = 0.85;
/// Shortest [`Mode::ProbeRtt`] once the window is reached, so sub-ms paths
/// still get enough RTT samples (BBR's 200 ms).
pub const PROBE_RTT_MIN_DURATION: Duration = Duration::from_millis(200);
/// Lifetime of a min-RTT sample before it must be re-measured (BBR's 10 s).
pub const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);
/// Lifetime of a min-RTT sample in round trips, when that exceeds
/// [`MIN_RTT_WINDOW`]. A [`Mode::ProbeRtt`] costs about 0.4 round trip of
/// link time (the sender pauses until in-flight is down to
/// [`PROBE_RTT_GAIN`] × BDP, holds there for a round trip, then refills), so
/// probing every 10 s costs 2.4 % of a 600 ms path but 0.4 % of a 100 ms
/// one; 40 round trips keeps it near 1 % on the longest paths while paths
/// up to 250 ms RTT keep BBR's 10 s.
pub const MIN_RTT_WINDOW_RTTS: u32 = 40;
/// Rounds the bandwidth max filter remembers (BBR's 10).
pub const BW_WINDOW_ROUNDS: u64 = 10;
/// Bandwidth growth per round that counts as "still growing" in startup.
pub const FULL_BW_GROWTH: f64 = 1.25;
/// Rounds without growth after which the pipe is full and startup ends.
pub const FULL_BW_ROUNDS: u32 = 3;
/// Loss rate per epoch above which loss is taken as congestion. 2 % is
/// BBRv2's threshold: 20 × the random loss godwit must tolerate (0.1 %),
/// while a sender overflowing a drop-tail queue loses far more.
pub const LOSS_THRESHOLD: f64 = 0.02;
/// Fewest packets (at the current MTU) a loss epoch spans, so one unlucky
/// random loss in a tiny round (sub-ms paths) is not mistaken for 2 %+.
pub const LOSS_EPOCH_MIN_PACKETS: u64 = 100;
/// Multiplicative decrease of the window bound after a congestive epoch
/// (CUBIC's β).
pub const LOSS_BETA: f64 = 0.7;
/// Growth of the window bound per clean epoch after a congestive one: back
/// to the model in ~3 epochs from [`LOSS_BETA`].
pub const INFLIGHT_HI_GROWTH: f64 = 1.125;
/// Initial window, bytes: RFC 9002's 14 720 (10 packets of 1472 bytes).
pub const INITIAL_WINDOW: u64 = 14_720;
/// Smallest window, in packets (RFC 9002's minimum of 2, doubled so a
/// lossy ACK path does not stall it).
pub const MIN_WINDOW_PACKETS: u64 = 4;
/// Most send records kept for delivery-rate sampling. One record exists per
/// distinct delivery state at send time, i.e. per ACK batch within one RTT;
/// beyond this the oldest are dropped (their samples are just skipped).
pub const MAX_SEND_RECORDS: usize = 1 << 16;

/// Factory for [`Lfn`]; no settings: every tunable is a documented constant.
#[derive(Debug, Clone, Default)]
pub struct LfnConfig;

impl ControllerFactory for LfnConfig {
    fn build(self: Arc<Self>, _now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Lfn::new(current_mtu))
    }
}

/// What the controller is doing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Doubling per round until the pipe is full.
    Startup,
    /// Steady state: window = [`CWND_GAIN`] × BDP + headroom.
    ProbeBw,
    /// Window at [`PROBE_RTT_GAIN`] × BDP to re-measure the min RTT.
    ProbeRtt {
        /// When the probe ends; set once in-flight has come down to the
        /// probe window.
        done_at: Option<Instant>,
        /// Smallest RTT seen during the probe.
        min_rtt: Option<Duration>,
    },
}

/// Delivery state captured when packets are sent (one record per distinct
/// state; the packets sent until the next record share it).
#[derive(Debug, Clone, Copy)]
struct SendRecord {
    sent: Instant,
    delivered: u64,
    delivered_time: Instant,
    first_sent_time: Instant,
}

/// Windowed max of per-round values, kept as a monotonic deque.
#[derive(Debug, Clone, Default)]
pub struct MaxFilter {
    entries: VecDeque<(u64, f64)>,
}

impl MaxFilter {
    /// Adds `value` measured in `round` and forgets rounds older than
    /// `window` rounds.
    pub fn update(&mut self, round: u64, value: f64, window: u64) {
        let mut value = value;
        if let Some(&(r, v)) = self.entries.back() {
            if r == round {
                value = value.max(v);
                self.entries.pop_back();
            }
        }
        while self.entries.back().is_some_and(|&(_, v)| v <= value) {
            self.entries.pop_back();
        }
        self.entries.push_back((round, value));
        while self
            .entries
            .front()
            .is_some_and(|&(r, _)| r + window <= round)
        {
            self.entries.pop_front();
        }
    }

    /// The max over the window, if any value was seen.
    pub fn get(&self) -> Option<f64> {
        self.entries.front().map(|&(_, v)| v)
    }

    /// Forgets everything.
    pub fn reset(&mut self) {
        self.entries.clear();
    }
}

/// The controller. See the module docs.
#[derive(Debug, Clone)]
pub struct Lfn {
    mtu: u64,
    mode: Mode,
    /// Window from the model (startup growth or target), bytes.
    cwnd: u64,
    /// Bound after congestive loss, bytes.
    inflight_hi: Option<u64>,

    // Delivery-rate sampling.
    delivered: u64,
    delivered_time: Option<Instant>,
    first_sent_time: Option<Instant>,
    records: VecDeque<SendRecord>,
    /// Estimate of bytes in flight: last reported by quinn, plus sends,
    /// minus losses since.
    in_flight: u64,

    // Model.
    bw: MaxFilter,
    min_rtt: Option<Duration>,
    min_rtt_stamp: Option<Instant>,

    // Rounds.
    round_count: u64,
    next_round_delivered: u64,
    round_start: bool,
    full_bw: f64,
    full_bw_rounds: u32,
    full_pipe: bool,

    // Loss epoch.
    epoch_delivered: u64,
    epoch_lost: u64,
}

impl Lfn {
    /// A controller for a path whose current MTU is `mtu`.
    pub fn new(mtu: u16) -> Lfn {
        Lfn {
            mtu: u64::from(mtu),
            mode: Mode::Startup,
            cwnd: INITIAL_WINDOW,
            inflight_hi: None,
            delivered: 0,
            delivered_time: None,
            first_sent_time: None,
            records: VecDeque::new(),
            in_flight: 0,
            bw: MaxFilter::default(),
            min_rtt: None,
            min_rtt_stamp: None,
            round_count: 0,
            next_round_delivered: 0,
            round_start: false,
            full_bw: 0.0,
            full_bw_rounds: 0,
            full_pipe: false,
            epoch_delivered: 0,
            epoch_lost: 0,
        }
    }

    /// Records that `bytes` were sent at `now`.
    pub fn handle_sent(&mut self, now: Instant, bytes: u64) {
        if self.in_flight == 0 {
            // Idle (or first) send: time spent with nothing in flight must not
            // dilute the next delivery-rate samples.
            self.delivered_time = Some(now);
            self.first_sent_time = Some(now);
        }
        self.in_flight = self.in_flight.saturating_add(bytes);
        let delivered_time = *self.delivered_time.get_or_insert(now);
        let first_sent_time = *self.first_sent_time.get_or_insert(now);
        let same = self.records.back().is_some_and(|r| {
            r.delivered == self.delivered
                && r.delivered_time == delivered_time
                && r.first_sent_time == first_sent_time
        });
        if !same {
            if self.records.len() == MAX_SEND_RECORDS {
                self.records.pop_front();
            }
            self.records.push_back(SendRecord {
                sent: now,
                delivered: self.delivered,
                delivered_time,
                first_sent_time,
            });
        }
    }

    /// Records the acknowledgement at `now` of `bytes` sent at `sent`.
    pub fn handle_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool) {
        self.delivered += bytes;
        self.delivered_time = Some(now);
        self.epoch_delivered += bytes;
        self.in_flight = self.in_flight.saturating_sub(bytes);
        self.update_min_rtt(now, now.saturating_duration_since(sent));

        // The record in force when this packet was sent: the last one at or
        // before `sent`. Older records belong to packets acknowledged or
        // lost by now (QUIC acknowledges in packet-number order).
        let idx = self.records.partition_point(|r| r.sent <= sent);
        if let Some(rec) = idx
            .checked_sub(1)
            .and_then(|i| self.records.get(i))
            .copied()
        {
            self.records.drain(..idx - 1);
            self.first_sent_time = Some(sent);
            if rec.delivered >= self.next_round_delivered {
                self.next_round_delivered = self.delivered;
                self.round_count += 1;
                self.round_start = true;
            }
            let send_elapsed = sent.saturating_duration_since(rec.first_sent_time);
            let ack_elapsed = now.saturating_duration_since(rec.delivered_time);
            let interval = send_elapsed.max(ack_elapsed);
            let min_rtt = self.min_rtt.unwrap_or_default();
            if !interval.is_zero() && interval >= min_rtt {
                let rate = (self.delivered - rec.delivered) as f64 / interval.as_secs_f64();
                if !app_limited || self.bw.get().is_none_or(|m| rate > m) {
                    self.bw.update(self.round_count, rate, BW_WINDOW_ROUNDS);
                }
            }
        }

        match self.mode {
            Mode::Startup => {
                let cap = self
                    .model_window(STARTUP_GAIN)
                    .unwrap_or(u64::MAX)
                    .max(INITIAL_WINDOW);
                self.cwnd = self.cwnd.saturating_add(bytes).min(cap).max(self.cwnd);
            }
            Mode::ProbeBw => {
                if let Some(target) = self.model_window(CWND_GAIN) {
                    // Grow towards the target by what was delivered (no
                    // bursts), but drop to it at once.
                    self.cwnd = if self.cwnd < target {
                        (self.cwnd + bytes).min(target)
                    } else {
                        target
                    };
                }
            }
            Mode::ProbeRtt { .. } => {}
        }
    }

    /// Ends a batch of acknowledgements; `in_flight` is quinn's count.
    pub fn handle_end_acks(&mut self, now: Instant, in_flight: u64, app_limited: bool) {
        self.in_flight = in_flight;
        if std::mem::take(&mut self.round_start) {
            self.on_round_start(app_limited);
        }
        let lifetime = self.min_rtt_lifetime();
        let expired = self
            .min_rtt_stamp
            .is_some_and(|t| now.saturating_duration_since(t) > lifetime);
        if expired && self.mode == Mode::ProbeBw {
            tracing::debug!(min_rtt = ?self.min_rtt, "min RTT expired: probing");
            self.mode = Mode::ProbeRtt {
                done_at: None,
                min_rtt: None,
            };
        }
        if let Mode::ProbeRtt { done_at, min_rtt } = self.mode {
            match done_at {
                None if in_flight <= self.probe_rtt_window() => {
                    let rtt = self.min_rtt.unwrap_or_default();
                    self.mode = Mode::ProbeRtt {
                        done_at: Some(now + rtt.max(PROBE_RTT_MIN_DURATION)),
                        min_rtt,
                    };
                }
                Some(t) if now >= t => {
                    if let Some(m) = min_rtt {
                        self.min_rtt = Some(m);
                    }
                    self.min_rtt_stamp = Some(now);
                    self.mode = Mode::ProbeBw;
                    tracing::debug!(min_rtt = ?self.min_rtt, "min RTT probe done");
                }
                _ => {}
            }
        }
    }

    /// Records that `lost_bytes` were declared lost; `persistent` per RFC
    /// 9002 § 7.6.
    pub fn handle_loss(&mut self, persistent: bool, lost_bytes: u64) {
        self.in_flight = self.in_flight.saturating_sub(lost_bytes);
        self.epoch_lost += lost_bytes;
        if persistent {
            // The path may have changed entirely: relearn it.
            tracing::debug!("persistent congestion: resetting the path model");
            self.bw.reset();
            self.full_bw = 0.0;
            self.full_bw_rounds = 0;
            self.full_pipe = false;
            self.mode = Mode::Startup;
            self.cwnd = self.min_window();
            self.inflight_hi = None;
            self.epoch_lost = 0;
            self.epoch_delivered = 0;
        }
    }

    /// Records a new path MTU.
    pub fn handle_mtu(&mut self, mtu: u16) {
        self.mtu = u64::from(mtu);
    }

    /// The congestion window, bytes.
    pub fn window(&self) -> u64 {
        let w = match self.mode {
            Mode::ProbeRtt { .. } => self.cwnd.min(self.probe_rtt_window()),
            _ => self.cwnd,
        };
        w.min(self.inflight_hi.unwrap_or(u64::MAX))
            .max(self.min_window())
    }

    /// Current mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Bottleneck bandwidth estimate, bytes/s.
    pub fn bandwidth(&self) -> Option<f64> {
        self.bw.get()
    }

    /// Min RTT estimate.
    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt
    }

    /// The bound set by congestive loss, if any.
    pub fn inflight_hi(&self) -> Option<u64> {
        self.inflight_hi
    }

    fn min_window(&self) -> u64 {
        MIN_WINDOW_PACKETS * self.mtu
    }

    /// bw × (gain × min RTT + headroom), once both are measured.
    fn model_window(&self, gain: f64) -> Option<u64> {
        let bw = self.bw.get()?;
        let rtt = self.min_rtt?;
        let w = bw * (gain * rtt.as_secs_f64() + ACK_HEADROOM.as_secs_f64());
        Some((w as u64).max(self.min_window()))
    }

    /// How long a min-RTT sample stays valid: [`MIN_RTT_WINDOW`], or
    /// [`MIN_RTT_WINDOW_RTTS`] round trips on paths long enough for that to
    /// be more.
    fn min_rtt_lifetime(&self) -> Duration {
        self.min_rtt.map_or(MIN_RTT_WINDOW, |rtt| {
            (rtt * MIN_RTT_WINDOW_RTTS).max(MIN_RTT_WINDOW)
        })
    }

    fn probe_rtt_window(&self) -> u64 {
        let bdp = match (self.bw.get(), self.min_rtt) {
            (Some(bw), Some(rtt)) => bw * rtt.as_secs_f64(),
            _ => 0.0,
        };
        ((bdp * PROBE_RTT_GAIN) as u64).max(self.min_window())
    }

    fn update_min_rtt(&mut self, now: Instant, sample: Duration) {
        if let Mode::ProbeRtt { min_rtt, .. } = &mut self.mode {
            *min_rtt = Some(min_rtt.map_or(sample, |m| m.min(sample)));
        }
        if self.min_rtt.is_none_or(|m| sample <= m) {
            self.min_rtt = Some(sample);
            self.min_rtt_stamp = Some(now);
        }
    }

    fn on_round_start(&mut self, app_limited: bool) {
        tracing::trace!(
            round = self.round_count,
            mode = ?self.mode,
            bw = self.bw.get(),
            min_rtt = ?self.min_rtt,
            cwnd = self.cwnd,
            window = self.window(),
            in_flight = self.in_flight,
            epoch_delivered = self.epoch_delivered,
            epoch_lost = self.epoch_lost,
            app_limited,
            "round"
        );
        if self.mode == Mode::Startup && !app_limited {
            let bw = self.bw.get().unwrap_or(0.0);
            if bw >= self.full_bw * FULL_BW_GROWTH {
                self.full_bw = bw;
                self.full_bw_rounds = 0;
            } else {
                self.full_bw_rounds += 1;
                if self.full_bw_rounds >= FULL_BW_ROUNDS {
                    self.exit_startup();
                }
            }
        }
        let total = self.epoch_delivered + self.epoch_lost;
        if total < LOSS_EPOCH_MIN_PACKETS * self.mtu {
            return;
        }
        let loss = self.epoch_lost as f64 / total as f64;
        if loss > LOSS_THRESHOLD {
            let bound = (self.window() as f64 * LOSS_BETA) as u64;
            self.inflight_hi = Some(bound.max(self.min_window()));
            tracing::debug!(loss, bound, "congestive loss: bounding the window");
            if self.mode == Mode::Startup {
                self.exit_startup();
            }
        } else if let Some(hi) = self.inflight_hi {
            let hi = (hi as f64 * INFLIGHT_HI_GROWTH) as u64;
            let target = self.model_window(CWND_GAIN).unwrap_or(u64::MAX);
            self.inflight_hi = (hi < target).then_some(hi);
        }
        self.epoch_delivered = 0;
        self.epoch_lost = 0;
    }

    fn exit_startup(&mut self) {
        tracing::debug!(bw = self.bw.get(), min_rtt = ?self.min_rtt, "startup done");
        self.full_pipe = true;
        self.mode = Mode::ProbeBw;
        if let Some(target) = self.model_window(CWND_GAIN) {
            // Startup's excess drains because quinn sends nothing until
            // in-flight falls below the window.
            self.cwnd = self.cwnd.min(target);
        }
    }
}

impl Controller for Lfn {
    fn on_sent(&mut self, now: Instant, bytes: u64, _last_packet_number: u64) {
        self.handle_sent(now, bytes);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        _rtt: &RttEstimator,
    ) {
        self.handle_ack(now, sent, bytes, app_limited);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        _largest_packet_num_acked: Option<u64>,
    ) {
        self.handle_end_acks(now, in_flight, app_limited);
    }

    fn on_congestion_event(
        &mut self,
        _now: Instant,
        _sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.handle_loss(is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.handle_mtu(new_mtu);
    }

    fn window(&self) -> u64 {
        Lfn::window(self)
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = ControllerMetrics::default();
        m.congestion_window = self.window();
        m.pacing_rate = self.bw.get().map(|b| (b * 8.0) as u64);
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        INITIAL_WINDOW
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MTU: u16 = 1200;

    #[test]
    fn max_filter_keeps_the_window_max() {
        let mut f = MaxFilter::default();
        assert_eq!(f.get(), None);
        f.update(1, 5.0, 3);
        f.update(1, 3.0, 3);
        f.update(2, 4.0, 3);
        assert_eq!(f.get(), Some(5.0));
        f.update(3, 1.0, 3);
        assert_eq!(f.get(), Some(5.0));
        // Round 1 leaves the 3-round window: the best left is round 2's.
        f.update(4, 2.0, 3);
        assert_eq!(f.get(), Some(4.0));
        f.update(4, 9.0, 3);
        assert_eq!(f.get(), Some(9.0));
        assert!(f.entries.len() <= 3);
    }

    /// A pipe delivering `rate` bytes/s with a fixed `rtt`: packet n is sent
    /// at n × gap and acknowledged (or lost, every `lose_every`th) one RTT
    /// later, in time order. Returns the time after the last event.
    fn steady(
        c: &mut Lfn,
        t0: Instant,
        rtt: Duration,
        rate: f64,
        rounds: u32,
        lose_every: u64,
    ) -> Instant {
        let pkt = u64::from(MTU);
        let gap = Duration::from_secs_f64(pkt as f64 / rate);
        let per_round = (rtt.as_secs_f64() / gap.as_secs_f64()) as u64;
        let total = per_round * u64::from(rounds);
        let at = |n: u64| t0 + gap * u32::try_from(n).expect("small");
        for n in 0..total + per_round {
            let now = at(n);
            if n < total {
                c.handle_sent(now, pkt);
            }
            if let Some(k) = n.checked_sub(per_round) {
                if lose_every > 0 && (k + 1) % lose_every == 0 {
                    c.handle_loss(false, pkt);
                } else {
                    c.handle_ack(now, at(k), pkt, false);
                }
                c.handle_end_acks(now, pkt * (n.min(total) - k), false);
            }
        }
        at(total + per_round)
    }

    #[test]
    fn model_converges_to_the_path() {
        let mut c = Lfn::new(MTU);
        let t0 = Instant::now();
        let rtt = Duration::from_millis(100);
        let rate = 12_500_000.0; // 100 Mbit/s
        steady(&mut c, t0, rtt, rate, 20, 0);
        let bw = c.bandwidth().expect("bw");
        assert!((bw / rate - 1.0).abs() < 0.05, "bw {bw}");
        let min_rtt = c.min_rtt().expect("rtt");
        assert!(rtt - min_rtt < Duration::from_millis(1), "{min_rtt:?}");
        // Sent at a constant rate for 20 rounds: the pipe looks full.
        assert_eq!(c.mode(), Mode::ProbeBw);
        let bdp = rate * rtt.as_secs_f64();
        let w = c.window() as f64;
        assert!(
            w >= bdp * CWND_GAIN * 0.95 && w <= bdp * 1.4,
            "window {w}, bdp {bdp}"
        );
    }

    #[test]
    fn random_loss_below_threshold_is_ignored() {
        let mut c = Lfn::new(MTU);
        let t0 = Instant::now();
        let rtt = Duration::from_millis(100);
        // 0.2 %: ten times below the threshold.
        steady(&mut c, t0, rtt, 12_500_000.0, 20, 500);
        assert_eq!(c.inflight_hi(), None);
        assert!(c.window() as f64 >= 12_500_000.0 * 0.1 * CWND_GAIN * 0.95);
    }

    #[test]
    fn congestive_loss_bounds_the_window_then_recovers() {
        let mut c = Lfn::new(MTU);
        let t0 = Instant::now();
        let rtt = Duration::from_millis(100);
        let t = steady(&mut c, t0, rtt, 12_500_000.0, 20, 0);
        let before = c.window();
        // 5 % loss for a few rounds.
        let t = steady(&mut c, t, rtt, 12_500_000.0, 3, 20);
        let hi = c.inflight_hi().expect("bounded");
        assert!(
            hi <= (before as f64 * LOSS_BETA) as u64 + 1,
            "{hi} vs {before}"
        );
        assert!(c.window() <= hi);
        // Clean rounds lift the bound again.
        steady(&mut c, t, rtt, 12_500_000.0, 12, 0);
        assert_eq!(c.inflight_hi(), None);
    }

    #[test]
    fn persistent_congestion_restarts_from_the_minimum_window() {
        let mut c = Lfn::new(MTU);
        let t0 = Instant::now();
        steady(&mut c, t0, Duration::from_millis(50), 12_500_000.0, 10, 0);
        c.handle_loss(true, 1_000_000);
        assert_eq!(c.mode(), Mode::Startup);
        assert_eq!(c.window(), MIN_WINDOW_PACKETS * u64::from(MTU));
        assert_eq!(c.bandwidth(), None);
    }

    /// A packet-level bottleneck: drop-tail queue, rate, fixed delay, random
    /// loss, ACK per packet; the sender paces like quinn (1.25 × window /
    /// smoothed RTT).
    struct Sim {
        rate: f64,
        one_way: Duration,
        queue: f64,
        loss: f64,
        rng: u64,
        /// Share of quinn's 1.25 × window / RTT pacing rate the sender
        /// achieves. quinn's token bucket drops the tokens of a late timer
        /// wake-up, and on the lab's busy 2-core host that costs ~20 %: its
        /// startup grew ~1.65 × per round where this simulator with a
        /// perfect pacer doubles.
        pace_eff: f64,
        /// At this time after the start the link rate becomes this (a
        /// competing flow or a tbf taking part of the bottleneck).
        squeeze: Option<(Duration, f64)>,
    }

    struct SimReport {
        utilization: f64,
        queue_drops: u64,
        random_drops: u64,
        final_min_rtt: Duration,
        /// Queue drops after the warm-up.
        late_queue_drops: u64,
        /// Packets sent after the warm-up.
        late_sent: u64,
        /// Whether congestive loss ever bounded the window.
        bounded: bool,
        /// Utilisation per base RTT from the start (for debugging a failing
        /// assertion).
        timeline: Vec<f64>,
    }

    impl Sim {
        fn random(&mut self) -> f64 {
            // xorshift64*
            self.rng ^= self.rng >> 12;
            self.rng ^= self.rng << 25;
            self.rng ^= self.rng >> 27;
            (self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
        }

        fn run(mut self, c: &mut Lfn, duration: Duration, warmup: Duration) -> SimReport {
            let pkt = u64::from(MTU);
            let t0 = Instant::now();
            let end = t0 + duration;
            let mut t = t0;
            let mut link_free = t0;
            // (sent, ack time or None if dropped)
            let mut flight: VecDeque<(Instant, Option<Instant>)> = VecDeque::new();
            let mut in_flight = 0u64;
            let mut next_send = t0;
            let mut srtt = self.one_way * 2 + Duration::from_millis(1);
            let (mut queue_drops, mut random_drops, mut measured) = (0, 0, 0u64);
            let rtt0 = (self.one_way * 2).max(Duration::from_millis(1));
            let mut timeline: Vec<u64> = Vec::new();
            let (mut late_queue_drops, mut late_sent, mut bounded) = (0, 0, false);
            while t < end {
                if let Some((at, rate)) = self.squeeze {
                    if t >= t0 + at {
                        self.rate = rate;
                    }
                }
                let next_ack = flight.iter().find_map(|&(_, a)| a);
                let stalled = next_ack.is_none() && !flight.is_empty();
                let can_send = in_flight + pkt <= c.window();
                let send_at = can_send.then_some(next_send.max(t));
                let timeout = stalled.then(|| flight[0].0 + srtt * 3);
                let Some(now) = [next_ack, send_at, timeout].into_iter().flatten().min() else {
                    break;
                };
                t = now;
                if Some(now) == send_at {
                    c.handle_sent(now, pkt);
                    in_flight += pkt;
                    if now >= t0 + warmup {
                        late_sent += 1;
                    }
                    let backlog =
                        link_free.saturating_duration_since(now).as_secs_f64() * self.rate;
                    let ack = if self.random() < self.loss {
                        random_drops += 1;
                        None
                    } else if backlog + pkt as f64 > self.queue {
                        queue_drops += 1;
                        if now >= t0 + warmup {
                            late_queue_drops += 1;
                        }
                        None
                    } else {
                        link_free =
                            link_free.max(now) + Duration::from_secs_f64(pkt as f64 / self.rate);
                        Some(link_free + self.one_way * 2)
                    };
                    flight.push_back((now, ack));
                    let pace = 1.25 * self.pace_eff * c.window() as f64 / srtt.as_secs_f64();
                    next_send = now + Duration::from_secs_f64(pkt as f64 / pace);
                    continue;
                }
                let mut lost = 0;
                while let Some(&(sent, ack)) = flight.front() {
                    match ack {
                        Some(a) if a <= now => {
                            flight.pop_front();
                            in_flight -= pkt;
                            c.handle_ack(now, sent, pkt, false);
                            let sample = now - sent;
                            srtt = (srtt * 7 + sample) / 8;
                            if now >= t0 + warmup {
                                measured += pkt;
                            }
                            let slot = ((now - t0).as_secs_f64() / rtt0.as_secs_f64()) as usize;
                            if timeline.len() <= slot {
                                timeline.resize(slot + 1, 0);
                            }
                            timeline[slot] += pkt;
                        }
                        None if next_ack.is_some_and(|a| a <= now) || Some(now) == timeout => {
                            flight.pop_front();
                            in_flight -= pkt;
                            lost += pkt;
                        }
                        _ => break,
                    }
                }
                if lost > 0 {
                    c.handle_loss(false, lost);
                    bounded |= c.inflight_hi().is_some();
                }
                c.handle_end_acks(now, in_flight, false);
            }
            let window = (duration - warmup).as_secs_f64();
            SimReport {
                utilization: measured as f64 / (self.rate * window),
                queue_drops,
                random_drops,
                final_min_rtt: c.min_rtt().unwrap_or_default(),
                late_queue_drops,
                late_sent,
                bounded,
                timeline: timeline
                    .iter()
                    .map(|&b| b as f64 / (self.rate * rtt0.as_secs_f64()))
                    .collect(),
            }
        }
    }

    /// The lab's path: 100 Mbit/s, `one_way_ms`, drop-tail queue of one
    /// BDP (at least 128 KiB), random `loss`; measured for `secs` after a
    /// warm-up of 12 RTT (at least 2 s), like `godwit bench transport`.
    fn lab_sim(one_way_ms: u64, loss: f64) -> Sim {
        let rate = 12_500_000.0;
        let one_way = Duration::from_millis(one_way_ms);
        Sim {
            rate,
            one_way,
            queue: (rate * 2.0 * one_way.as_secs_f64()).max(128.0 * 1024.0),
            loss,
            rng: 0x9e37_79b9_7f4a_7c15,
            pace_eff: 1.0,
            squeeze: None,
        }
    }

    fn run_sim(sim: Sim, secs: u64) -> SimReport {
        let warmup = (sim.one_way * 24).max(Duration::from_secs(2));
        let mut c = Lfn::new(MTU);
        sim.run(&mut c, Duration::from_secs(secs) + warmup, warmup)
    }

    fn lfn_sim(one_way_ms: u64, loss: f64, secs: u64) -> SimReport {
        run_sim(lab_sim(one_way_ms, loss), secs)
    }

    #[test]
    fn fills_a_520ms_pipe_with_random_loss() {
        let r = lfn_sim(260, 0.001, 30);
        assert!(r.utilization > 0.93, "utilization {}", r.utilization);
        assert!(r.random_drops > 0);
        // Past startup the queue never overflows.
        assert!(r.queue_drops < 6000, "queue drops {}", r.queue_drops);
        // ProbeRtt kept the min RTT at the base RTT, not base + queue.
        assert!(
            r.final_min_rtt < Duration::from_millis(525),
            "{:?}",
            r.final_min_rtt
        );
    }

    #[test]
    fn fills_short_and_medium_pipes() {
        for (d, loss) in [(0, 0.0), (0, 0.001), (80, 0.0), (80, 0.001)] {
            let r = lfn_sim(d, loss, 15);
            assert!(
                r.utilization > 0.93,
                "{d} ms loss {loss}: utilization {}",
                r.utilization
            );
        }
    }

    #[test]
    fn fills_a_600ms_pipe_with_random_loss() {
        // The lab's worst cell (300 ms one-way, 0.1 % loss). With BBR's 10 s
        // min-RTT lifetime the 24 s window held two ProbeRtts and this was
        // 0.987.
        let r = lfn_sim(300, 0.001, 24);
        assert!(
            r.utilization > 0.99,
            "utilization {} {:.2?}",
            r.utilization,
            r.timeline
        );
        assert!(r.random_drops > 0);
        // Startup's overflow (capped at 2 × BDP on a 1-BDP queue) is all
        // there is: under 0.1 % of the packets.
        assert!(
            r.late_queue_drops * 1000 < r.late_sent,
            "queue drops {} of {}",
            r.late_queue_drops,
            r.late_sent
        );
        assert!(!r.bounded, "random loss mistaken for congestion");
    }

    #[test]
    fn fills_a_600ms_pipe_with_a_lazy_pacer() {
        // The lab's host paces ~20 % below quinn's nominal rate, which
        // slows startup to ~1.6 × per round: the measurement window starts
        // ~4 RTT before the pipe is full. This was 0.926 with the 10 s
        // min-RTT lifetime (startup's cost is not addressed here).
        let mut sim = lab_sim(300, 0.001);
        sim.pace_eff = 0.8;
        let r = run_sim(sim, 24);
        assert!(
            r.utilization > 0.93,
            "utilization {} {:.2?}",
            r.utilization,
            r.timeline
        );
    }

    #[test]
    fn min_rtt_lifetime_scales_only_on_long_paths() {
        let mut c = Lfn::new(MTU);
        assert_eq!(c.min_rtt_lifetime(), MIN_RTT_WINDOW);
        c.min_rtt = Some(Duration::from_millis(100));
        assert_eq!(c.min_rtt_lifetime(), MIN_RTT_WINDOW);
        c.min_rtt = Some(Duration::from_millis(600));
        assert_eq!(c.min_rtt_lifetime(), Duration::from_secs(24));
    }

    #[test]
    fn backs_off_when_a_real_bottleneck_overflows() {
        // 140 ms one-way at 100 Mbit/s, then a tbf-like bottleneck of
        // 40 Mbit/s with a 128 KiB queue takes over: the bandwidth filter
        // still remembers 100 Mbit/s for 10 rounds, so the window is ~2.5 ×
        // the new pipe and the queue overflows by far more than 2 % per
        // epoch. The controller must bound its window rather than keep
        // flooding, and settle to a low loss rate on the new pipe.
        let mut sim = lab_sim(140, 0.0);
        sim.queue = 128.0 * 1024.0;
        sim.squeeze = Some((Duration::from_secs(8), 5_000_000.0));
        let mut c = Lfn::new(MTU);
        // Measure from 12 s, after the filter has forgotten the old rate.
        let r = sim.run(&mut c, Duration::from_secs(30), Duration::from_secs(12));
        assert!(r.bounded, "never backed off");
        // Without a back-off the loss would be ~60 % (window 2.5 × the
        // pipe). With it the window saw-tooths around the pipe: epochs just
        // under the threshold are tolerated, each one over it cuts the bound
        // to 0.7 ×, so loss stays near 2 % and the link mostly busy.
        let late_loss = r.late_queue_drops as f64 / r.late_sent.max(1) as f64;
        assert!(
            late_loss < 1.5 * LOSS_THRESHOLD,
            "loss {late_loss} after settling"
        );
        assert!(
            r.utilization > 0.7,
            "utilization {} {:.2?}",
            r.utilization,
            r.timeline
        );
        let bw = c.bandwidth().expect("bw");
        assert!(bw < 5_000_000.0 * 1.1, "bw {bw}");
    }
}
