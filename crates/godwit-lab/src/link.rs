//! The sans-IO model of one emulated WAN direction (site i → site j).
//!
//! A packet entering a link goes through, in order:
//! 1. **cut**: a cut link drops everything (and flushes what is in flight);
//! 2. **loss**: dropped with probability `loss` (like netem, before the queue,
//!    so lost packets do not use link capacity);
//! 3. **queue + rate**: the link serialises IP bytes at `rate_bps`; a packet
//!    starts transmitting when the previous one has finished. The bytes
//!    accepted but not yet serialised form the bottleneck queue; a packet that
//!    would push it past `queue_bytes` is tail-dropped;
//! 4. **delay + jitter**: delivery is at end of transmission + `delay` + a
//!    uniform 0..=`jitter`, but never earlier than the previous packet's
//!    delivery, so the link never reorders.
//!
//! Nothing here reads a clock or touches a socket: time is passed in as
//! `now`. [`LinkModel`] decides per packet ([`LinkModel::handle_packet`]);
//! [`Link`] adds the in-flight FIFO ([`Link::poll_deliver`],
//! [`Link::poll_timeout`]) that the WAN daemon's data-plane thread drives.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Smallest default queue. At D = 0 the BDP is a few KiB, but the kernel
/// still hands the TUN bursts of dozens of packets (a TSO/GSO frame is
/// segmented in one go), and a queue that tail-drops those caps a single TCP
/// flow below the link rate. Measured at 100 Mbit/s, D = 0: 0 to 4 drops per
/// 5 s flow and 96.4 Mbit/s goodput, the payload maximum.
pub const MIN_DEFAULT_QUEUE_BYTES: u64 = 128 * 1024;
/// Width of one bucket of the sliding rate window.
pub const RATE_BUCKET: Duration = Duration::from_millis(10);
/// Number of buckets of the sliding rate window: 100 × 10 ms = 1 s.
pub const RATE_BUCKETS: usize = 100;

/// Default queue limit for a link of `rate_bps` and one-way `delay`:
/// the bandwidth-delay product at the round trip (2 × delay), so one loss-based
/// TCP flow keeps the link busy after halving its window, but at least
/// [`MIN_DEFAULT_QUEUE_BYTES`]. Unlimited rate has no queue (returns `u64::MAX`).
pub fn default_queue_bytes(rate_bps: u64, delay: Duration) -> u64 {
    if rate_bps == 0 {
        return u64::MAX;
    }
    let bdp = u128::from(rate_bps) * 2 * delay.as_nanos() / 8 / 1_000_000_000;
    u64::try_from(bdp)
        .unwrap_or(u64::MAX)
        .max(MIN_DEFAULT_QUEUE_BYTES)
}

/// Parameters of one link direction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkParams {
    /// Rate in bits/s of IP bytes; 0 = unlimited (no queue).
    pub rate_bps: u64,
    /// One-way propagation delay.
    #[serde(rename = "delay_us", with = "crate::serde_micros")]
    pub delay: Duration,
    /// Extra uniform delay 0..=jitter, clamped so packets never reorder.
    #[serde(rename = "jitter_us", with = "crate::serde_micros")]
    pub jitter: Duration,
    /// Loss probability 0..=1.
    pub loss: f64,
    /// Queue limit in bytes; `None` = [`default_queue_bytes`].
    pub queue_bytes: Option<u64>,
    /// Drop everything.
    pub cut: bool,
}

impl Default for LinkParams {
    fn default() -> Self {
        Self {
            rate_bps: 0,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            queue_bytes: None,
            cut: false,
        }
    }
}

impl LinkParams {
    /// The effective queue limit in bytes.
    pub fn queue_limit(&self) -> u64 {
        self.queue_bytes
            .unwrap_or_else(|| default_queue_bytes(self.rate_bps, self.delay))
    }

    /// Applies the fields set in `u`.
    pub fn apply(&mut self, u: &LinkParamsUpdate) {
        if let Some(r) = u.rate_bps {
            self.rate_bps = r;
        }
        if let Some(d) = u.delay {
            self.delay = d;
        }
        if let Some(j) = u.jitter {
            self.jitter = j;
        }
        if let Some(l) = u.loss {
            self.loss = l;
        }
        if let Some(q) = u.queue_bytes {
            // 0 is the wire encoding of "back to the automatic default".
            self.queue_bytes = (q != 0).then_some(q);
        }
    }
}

/// A partial change of [`LinkParams`]; `None` fields are left alone.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkParamsUpdate {
    /// New rate in bits/s (0 = unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_bps: Option<u64>,
    /// New one-way delay.
    #[serde(
        default,
        rename = "delay_us",
        with = "crate::serde_opt_micros",
        skip_serializing_if = "Option::is_none"
    )]
    pub delay: Option<Duration>,
    /// New jitter.
    #[serde(
        default,
        rename = "jitter_us",
        with = "crate::serde_opt_micros",
        skip_serializing_if = "Option::is_none"
    )]
    pub jitter: Option<Duration>,
    /// New loss probability 0..=1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// New queue limit in bytes; `Some(0)` = back to the automatic default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_bytes: Option<u64>,
}

impl LinkParamsUpdate {
    /// Rejects values no link can have.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(l) = self.loss {
            if !(0.0..=1.0).contains(&l) || l.is_nan() {
                return Err(format!("loss must be between 0 and 1, got {l}"));
            }
        }
        for d in [self.delay, self.jitter].into_iter().flatten() {
            if d > crate::MAX_DELAY {
                return Err(format!(
                    "delay/jitter must be at most {:?}",
                    crate::MAX_DELAY
                ));
            }
        }
        if let Some(q) = self.queue_bytes {
            if q != 0 && q < crate::MIN_QUEUE_BYTES {
                return Err(format!(
                    "queue must be 0 (auto) or at least {} bytes",
                    crate::MIN_QUEUE_BYTES
                ));
            }
        }
        Ok(())
    }
}

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// Tail drop: the bottleneck queue was full.
    Queue,
    /// Random loss.
    Loss,
    /// The link is cut.
    Cut,
    /// No site owns the destination address (counted by the daemon, per source).
    NoRoute,
}

/// What happens to one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver to the far site at `at`.
    Deliver {
        /// Delivery time (non-decreasing across a link's packets).
        at: Instant,
    },
    /// Drop it.
    Drop(DropReason),
}

/// Plain counters of one link direction.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkCounters {
    /// Packets offered to the link.
    pub packets_in: u64,
    /// IP bytes offered to the link.
    pub bytes_in: u64,
    /// Packets handed to the far site.
    pub packets_delivered: u64,
    /// IP bytes handed to the far site.
    pub bytes_delivered: u64,
    /// Packets tail-dropped at the queue.
    pub dropped_queue: u64,
    /// Packets dropped by random loss.
    pub dropped_loss: u64,
    /// Packets dropped because the link was cut (including flushed in-flight ones).
    pub dropped_cut: u64,
}

/// A point-in-time view of a link: counters, queue and rates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkSnapshot {
    /// Parameters in force.
    pub params: LinkParams,
    /// Effective queue limit in bytes.
    pub queue_limit_bytes: u64,
    /// Counters since the daemon started.
    pub counters: LinkCounters,
    /// Bytes waiting in the bottleneck queue (accepted, not yet serialised).
    pub queue_bytes: u64,
    /// Bytes accepted and not yet delivered (queue + propagation).
    pub in_flight_bytes: u64,
    /// Delivered rate over the last second, bits/s.
    pub rate_bps_1s: u64,
    /// Highest delivered rate seen over any 1 s window, bits/s.
    pub peak_bps_1s: u64,
}

/// Sliding 1 s window of delivered bytes in [`RATE_BUCKETS`] buckets of
/// [`RATE_BUCKET`], tracking the current and the peak per-second rate.
#[derive(Debug, Clone)]
pub struct RateWindow {
    origin: Option<Instant>,
    /// Index (since `origin`) of the newest bucket.
    head: u64,
    buckets: [u64; RATE_BUCKETS],
    sum: u64,
    peak: u64,
}

impl Default for RateWindow {
    fn default() -> Self {
        Self {
            origin: None,
            head: 0,
            buckets: [0; RATE_BUCKETS],
            sum: 0,
            peak: 0,
        }
    }
}

impl RateWindow {
    /// Records `bytes` delivered at `now`.
    pub fn record(&mut self, now: Instant, bytes: u64) {
        self.advance(now);
        let slot = (self.head % RATE_BUCKETS as u64) as usize;
        self.buckets[slot] += bytes;
        self.sum += bytes;
        self.peak = self.peak.max(self.sum);
    }

    /// Bytes delivered in the last second, as of `now`.
    pub fn bytes_last_second(&mut self, now: Instant) -> u64 {
        self.advance(now);
        self.sum
    }

    /// Most bytes ever delivered within one 1 s window.
    pub fn peak_bytes(&self) -> u64 {
        self.peak
    }

    fn advance(&mut self, now: Instant) {
        let origin = *self.origin.get_or_insert(now);
        let idx = u64::try_from(
            now.saturating_duration_since(origin).as_nanos() / RATE_BUCKET.as_nanos(),
        )
        .unwrap_or(u64::MAX);
        if idx <= self.head {
            return;
        }
        let steps = (idx - self.head).min(RATE_BUCKETS as u64);
        for k in 1..=steps {
            let slot = ((self.head + k) % RATE_BUCKETS as u64) as usize;
            self.sum -= self.buckets[slot];
            self.buckets[slot] = 0;
        }
        self.head = idx;
    }
}

/// The per-packet decision core of one link direction.
#[derive(Debug)]
pub struct LinkModel {
    params: LinkParams,
    queue_limit: u64,
    /// When the serialiser finishes the last accepted packet.
    busy_until: Option<Instant>,
    /// Delivery time of the last accepted packet (the no-reorder floor).
    last_delivery: Option<Instant>,
    rng: StdRng,
    counters: LinkCounters,
    window: RateWindow,
}

impl LinkModel {
    /// A link with `params`; `seed` makes loss and jitter reproducible.
    pub fn new(params: LinkParams, seed: u64) -> Self {
        Self {
            queue_limit: params.queue_limit(),
            params,
            busy_until: None,
            last_delivery: None,
            rng: StdRng::seed_from_u64(seed),
            counters: LinkCounters::default(),
            window: RateWindow::default(),
        }
    }

    /// Decides the fate of a `len`-byte IP packet arriving at `now`.
    pub fn handle_packet(&mut self, now: Instant, len: usize) -> Verdict {
        let len64 = len as u64;
        self.counters.packets_in += 1;
        self.counters.bytes_in += len64;
        if self.params.cut {
            self.counters.dropped_cut += 1;
            return Verdict::Drop(DropReason::Cut);
        }
        if self.params.loss > 0.0 && self.rng.gen::<f64>() < self.params.loss {
            self.counters.dropped_loss += 1;
            return Verdict::Drop(DropReason::Loss);
        }
        let tx_end = if self.params.rate_bps == 0 {
            now
        } else {
            if self.queue_bytes(now).saturating_add(len64) > self.queue_limit {
                self.counters.dropped_queue += 1;
                return Verdict::Drop(DropReason::Queue);
            }
            let start = self.busy_until.map_or(now, |b| b.max(now));
            let end = start + tx_time(len64, self.params.rate_bps);
            self.busy_until = Some(end);
            end
        };
        let mut at = tx_end + self.params.delay;
        if !self.params.jitter.is_zero() {
            let j = self.rng.gen_range(0..=self.params.jitter.as_nanos());
            at += Duration::from_nanos(u64::try_from(j).unwrap_or(u64::MAX));
        }
        if let Some(last) = self.last_delivery {
            at = at.max(last);
        }
        self.last_delivery = Some(at);
        Verdict::Deliver { at }
    }

    /// Records that a `len`-byte packet was handed to the far site at `now`.
    pub fn handle_delivered(&mut self, now: Instant, len: usize) {
        self.counters.packets_delivered += 1;
        self.counters.bytes_delivered += len as u64;
        self.window.record(now, len as u64);
    }

    /// Replaces the parameters. Packets already accepted keep their delivery
    /// times; later ones still never overtake them.
    pub fn set_params(&mut self, params: LinkParams) {
        self.queue_limit = params.queue_limit();
        self.params = params;
    }

    /// Parameters in force.
    pub fn params(&self) -> &LinkParams {
        &self.params
    }

    /// Counters so far.
    pub fn counters(&self) -> &LinkCounters {
        &self.counters
    }

    /// Bytes in the bottleneck queue at `now` (remaining serialisation time × rate).
    pub fn queue_bytes(&self, now: Instant) -> u64 {
        match self.busy_until {
            Some(b) if b > now && self.params.rate_bps > 0 => {
                let ns = (b - now).as_nanos();
                u64::try_from(ns * u128::from(self.params.rate_bps) / 8 / 1_000_000_000)
                    .unwrap_or(u64::MAX)
            }
            _ => 0,
        }
    }

    /// Counts `n` accepted packets that were thrown away because of a cut.
    fn count_flushed(&mut self, n: u64) {
        self.counters.dropped_cut += n;
    }

    /// A snapshot at `now` (`in_flight_bytes` is filled in by [`Link`]).
    pub fn snapshot(&mut self, now: Instant) -> LinkSnapshot {
        LinkSnapshot {
            params: self.params.clone(),
            queue_limit_bytes: self.queue_limit,
            counters: self.counters.clone(),
            queue_bytes: self.queue_bytes(now),
            in_flight_bytes: 0,
            rate_bps_1s: self.window.bytes_last_second(now) * 8,
            peak_bps_1s: self.window.peak_bytes() * 8,
        }
    }
}

/// Serialisation time of `len` bytes at `rate_bps`, rounded *up* to the
/// nanosecond so the configured rate is never exceeded.
pub fn tx_time(len: u64, rate_bps: u64) -> Duration {
    let bits_ns = u128::from(len) * 8 * 1_000_000_000;
    let ns = bits_ns.div_ceil(u128::from(rate_bps.max(1)));
    Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
}

/// A link direction with its in-flight FIFO of packets `P`.
///
/// Calling order for a driver: [`Link::handle_packet`] for each packet read
/// from the source site; [`Link::poll_deliver`] until `None` whenever the
/// clock reaches [`Link::poll_timeout`]; sleep until the earliest
/// `poll_timeout` of all links.
#[derive(Debug)]
pub struct Link<P> {
    model: LinkModel,
    in_flight: VecDeque<(Instant, usize, P)>,
    in_flight_bytes: u64,
}

impl<P> Link<P> {
    /// A link with `params`; `seed` makes loss and jitter reproducible.
    pub fn new(params: LinkParams, seed: u64) -> Self {
        Self {
            model: LinkModel::new(params, seed),
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
        }
    }

    /// Offers `packet` (`len` IP bytes) at `now`; on drop the packet is handed back.
    pub fn handle_packet(
        &mut self,
        now: Instant,
        len: usize,
        packet: P,
    ) -> Result<(), (DropReason, P)> {
        match self.model.handle_packet(now, len) {
            Verdict::Deliver { at } => {
                self.in_flight.push_back((at, len, packet));
                self.in_flight_bytes += len as u64;
                Ok(())
            }
            Verdict::Drop(reason) => Err((reason, packet)),
        }
    }

    /// Next packet due at or before `now`, in arrival order; counts it as
    /// delivered at its modelled time (so the rate window shows what the
    /// emulated link carried, not the shell's wakeup jitter).
    pub fn poll_deliver(&mut self, now: Instant) -> Option<P> {
        match self.in_flight.front() {
            Some(&(at, _, _)) if at <= now => {}
            _ => return None,
        }
        let (at, len, p) = self.in_flight.pop_front()?;
        self.in_flight_bytes -= len as u64;
        self.model.handle_delivered(at, len);
        Some(p)
    }

    /// When the next packet is due, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.in_flight.front().map(|&(at, _, _)| at)
    }

    /// Replaces the parameters; cutting the link also loses what is in flight
    /// (returned so the driver can recycle the buffers).
    pub fn set_params(&mut self, params: LinkParams) -> Vec<P> {
        let flushed = if params.cut {
            self.model.count_flushed(self.in_flight.len() as u64);
            self.in_flight_bytes = 0;
            self.in_flight.drain(..).map(|(_, _, p)| p).collect()
        } else {
            Vec::new()
        };
        self.model.set_params(params);
        flushed
    }

    /// Parameters in force.
    pub fn params(&self) -> &LinkParams {
        self.model.params()
    }

    /// A snapshot at `now`.
    pub fn snapshot(&mut self, now: Instant) -> LinkSnapshot {
        let mut s = self.model.snapshot(now);
        s.in_flight_bytes = self.in_flight_bytes;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn params(rate_bps: u64, delay: Duration) -> LinkParams {
        LinkParams {
            rate_bps,
            delay,
            ..LinkParams::default()
        }
    }

    #[test]
    fn default_queue_is_bdp_with_floor() {
        assert_eq!(default_queue_bytes(100_000_000, ms(130)), 3_250_000);
        assert_eq!(
            default_queue_bytes(100_000_000, Duration::ZERO),
            MIN_DEFAULT_QUEUE_BYTES
        );
        assert_eq!(default_queue_bytes(0, ms(130)), u64::MAX);
    }

    #[test]
    fn delay_and_serialisation() {
        let t0 = Instant::now();
        let mut m = LinkModel::new(params(100_000_000, ms(130)), 1);
        // 1500 B at 100 Mbit/s = 120 µs.
        assert_eq!(
            m.handle_packet(t0, 1500),
            Verdict::Deliver {
                at: t0 + Duration::from_micros(120) + ms(130)
            }
        );
        // Back to back: waits for the first to finish.
        assert_eq!(
            m.handle_packet(t0, 1500),
            Verdict::Deliver {
                at: t0 + Duration::from_micros(240) + ms(130)
            }
        );
        assert_eq!(m.queue_bytes(t0), 3000);
        assert_eq!(m.queue_bytes(t0 + Duration::from_micros(120)), 1500);
    }

    #[test]
    fn tail_drop_at_limit() {
        let t0 = Instant::now();
        let mut p = params(8_000, Duration::ZERO); // 1 byte per ms.
        p.queue_bytes = Some(3000);
        let mut m = LinkModel::new(p, 1);
        assert!(matches!(m.handle_packet(t0, 1500), Verdict::Deliver { .. }));
        assert!(matches!(m.handle_packet(t0, 1500), Verdict::Deliver { .. }));
        assert_eq!(m.handle_packet(t0, 1), Verdict::Drop(DropReason::Queue));
        // 1 s later 1000 bytes have drained.
        assert!(matches!(
            m.handle_packet(t0 + ms(1000), 1000),
            Verdict::Deliver { .. }
        ));
        assert_eq!(m.counters().dropped_queue, 1);
    }

    #[test]
    fn cut_flushes_and_heal_restores() {
        let t0 = Instant::now();
        let mut l: Link<u32> = Link::new(params(0, ms(10)), 1);
        l.handle_packet(t0, 100, 1).unwrap();
        let mut p = l.params().clone();
        p.cut = true;
        assert_eq!(l.set_params(p.clone()), vec![1]);
        assert_eq!(l.handle_packet(t0, 100, 2), Err((DropReason::Cut, 2)));
        assert_eq!(l.poll_timeout(), None);
        p.cut = false;
        l.set_params(p);
        l.handle_packet(t0, 100, 3).unwrap();
        assert_eq!(l.poll_deliver(t0 + ms(9)), None);
        assert_eq!(l.poll_deliver(t0 + ms(10)), Some(3));
        let s = l.snapshot(t0 + ms(10));
        assert_eq!(s.counters.dropped_cut, 2);
        assert_eq!(s.counters.packets_delivered, 1);
    }

    #[test]
    fn rate_window_peak() {
        let t0 = Instant::now();
        let mut w = RateWindow::default();
        for i in 0..100 {
            w.record(t0 + ms(i * 10), 1000);
        }
        assert_eq!(w.bytes_last_second(t0 + ms(990)), 100_000);
        assert_eq!(w.bytes_last_second(t0 + ms(1500)), 49_000);
        assert_eq!(w.bytes_last_second(t0 + ms(5000)), 0);
        assert_eq!(w.peak_bytes(), 100_000);
    }

    #[test]
    fn loss_rate_matches_statistically() {
        let t0 = Instant::now();
        let p = LinkParams {
            loss: 0.1,
            ..LinkParams::default()
        };
        let mut m = LinkModel::new(p, 7);
        let n = 100_000;
        for _ in 0..n {
            m.handle_packet(t0, 100);
        }
        let lost = m.counters().dropped_loss as f64;
        // Binomial sd = sqrt(n p (1-p)) ≈ 95; allow 5 sd.
        assert!((lost - 10_000.0).abs() < 475.0, "lost {lost}");
    }

    proptest! {
        /// Serialisation never exceeds the rate: consecutive deliveries are
        /// at least one transmission time apart (with no jitter), which bounds
        /// the bytes in any window by rate × window + one packet.
        #[test]
        fn rate_never_exceeded(
            rate in 1_000_000u64..1_000_000_000,
            delay_us in 0u64..200_000,
            pkts in proptest::collection::vec((0u64..500, 40usize..1500), 1..300),
        ) {
            let t0 = Instant::now();
            let mut m = LinkModel::new(params(rate, Duration::from_micros(delay_us)), 3);
            let mut now = t0;
            let mut prev: Option<Instant> = None;
            for (gap_us, len) in pkts {
                now += Duration::from_micros(gap_us);
                if let Verdict::Deliver { at } = m.handle_packet(now, len) {
                    prop_assert!(at >= now + Duration::from_micros(delay_us) + tx_time(len as u64, rate));
                    if let Some(p) = prev {
                        prop_assert!(at - p >= tx_time(len as u64, rate));
                    }
                    prev = Some(at);
                }
                prop_assert!(m.queue_bytes(now) <= m.params().queue_limit());
            }
        }

        /// The peak 1 s rate reported never exceeds the link rate (plus one
        /// 10 ms bucket of rounding), however late the shell polls.
        #[test]
        fn peak_rate_bounded(
            poll_lag_us in proptest::collection::vec(0u64..50_000, 50..400),
        ) {
            let rate = 10_000_000u64;
            let t0 = Instant::now();
            let mut l: Link<()> = Link::new(params(rate, ms(5)), 1);
            let mut now = t0;
            for lag in poll_lag_us {
                // Saturate the link, then poll late.
                while l.handle_packet(now, 1500, ()).is_ok() {}
                now += Duration::from_micros(lag);
                while l.poll_deliver(now).is_some() {}
            }
            let peak = l.snapshot(now).peak_bps_1s;
            prop_assert!(peak <= rate + rate / 100 + 1500 * 8, "peak {}", peak);
        }

        /// Delivery times are non-decreasing whatever the jitter, loss or
        /// parameter changes, and `Link` hands packets out in arrival order.
        #[test]
        fn order_preserved(
            seed in any::<u64>(),
            jitter_us in 0u64..50_000,
            steps in proptest::collection::vec((0u64..2_000, 40usize..1500, any::<bool>(), 0u64..100_000), 1..300),
        ) {
            let t0 = Instant::now();
            let mut p = LinkParams {
                rate_bps: 10_000_000,
                delay: ms(20),
                jitter: Duration::from_micros(jitter_us),
                loss: 0.05,
                queue_bytes: Some(20_000),
                cut: false,
            };
            let mut l: Link<usize> = Link::new(p.clone(), seed);
            let mut now = t0;
            let mut out = Vec::new();
            for (i, (gap_us, len, change, new_delay_us)) in steps.into_iter().enumerate() {
                now += Duration::from_micros(gap_us);
                if change {
                    p.delay = Duration::from_micros(new_delay_us);
                    prop_assert!(l.set_params(p.clone()).is_empty());
                }
                let _ = l.handle_packet(now, len, i);
                while let Some(x) = l.poll_deliver(now) {
                    out.push(x);
                }
            }
            while let Some(t) = l.poll_timeout() {
                while let Some(x) = l.poll_deliver(t) {
                    out.push(x);
                }
            }
            prop_assert!(out.windows(2).all(|w| w[0] < w[1]));
        }
    }
}
