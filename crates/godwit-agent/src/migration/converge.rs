//! Convergence control for an outgoing precopy migration: estimates,
//! predictions and the decision to throttle, as a sans-IO core.
//!
//! The source shell ([`super::source`]) feeds a [`Sample`] every progress
//! tick (QEMU's `query-migrate` plus the relay's counters, time passed in)
//! to [`Converge::observe`] and applies the [`Action`]s it returns with
//! `migrate-set-parameters`. The controller owns:
//!
//! - **Estimates.** Smoothed *effective* bandwidth (QEMU stream bytes the
//!   relay drains per second: what QEMU's convergence actually depends
//!   on), wire rate, their ratio (the codec's reduction) and the dirty rate.
//! - **Predictions.** Time to completion with the classic pass-by-pass
//!   model (pass *i* sends the dirty set; the next set is what the guest
//!   dirtied meanwhile; QEMU switches over once the set fits its threshold)
//!   and the guest's pause: final remainder / effective bandwidth + one-way
//!   WAN delay + a device-state allowance.
//! - **QEMU's downtime limit.** QEMU switches over when `remaining <
//!   bandwidth × downtime-limit` with *its* bandwidth estimate and *its*
//!   idea of downtime, which knows nothing of the WAN: the last byte still
//!   needs one one-way delay (plus whatever queues beyond the flow window)
//!   and the device state still has to cross and load. So the limit given
//!   to QEMU is the operator's target minus those, never below
//!   [`QEMU_DOWNTIME_FLOOR`], and scaled down when QEMU's bandwidth
//!   estimate runs ahead of the relay's real drain rate.
//! - **Non-convergence.** A pass whose dirty rate is at least
//!   `stall_ratio` × effective bandwidth counts as stalled; two stalled
//!   passes after the first full pass, or a predicted finish beyond the
//!   timeout, make the controller throttle the guest (if allowed); one
//!   pass is enough when the guest dirties faster than the stream drains.
//!
//! # Throttling with QEMU 7.2
//! QEMU cannot be told "throttle to N % now". Its auto-converge throttles
//! at a dirty-bitmap sync when, for two syncs in a row, the bytes dirtied
//! since the previous sync exceed `throttle-trigger-threshold` % of the
//! bytes sent meanwhile; it starts at `cpu-throttle-initial` and adds
//! `cpu-throttle-increment` each time. The `auto-converge` capability can
//! only be set before `migrate`, but the parameters can change while it
//! runs. So the capability is on from the start (when the operator allows
//! throttling) with the trigger at 100, where it fires only if the guest
//! dirties faster than the stream drains — a migration that can never
//! finish. When the controller decides, it lowers the trigger to
//! `throttle_trigger_pct` and sets an initial throttle sized from the
//! measured rates; QEMU then steps the throttle up until the dirty rate is
//! below that share of the stream rate.
//!
//! Postcopy would be the other way out, but `postcopy-ram` is off (the
//! relay's codec does not carry it), so a migration that does not converge
//! even at full throttle is reported as stalled and ends at its timeout.
//!
//! ```mermaid
//! stateDiagram-v2
//!   [*] --> Watching
//!   Watching --> Throttling: 2 stalled passes (1 if dirty ≥ bandwidth), or predicted past the timeout
//!   Watching --> Throttling: QEMU's own trigger fired (reported)
//!   Throttling --> Stalled: still stalled at full throttle
//! ```

use std::time::Duration;

use crate::api::types::{ConvergenceEvent, ConvergenceReport};

/// The lowest `downtime-limit` given to QEMU, ms. Below this QEMU's
/// threshold (bandwidth × limit) is a handful of pages, so at WAN delays
/// that eat the whole target it would chase an unreachable remainder;
/// 20 ms still lets it switch over with the last few hundred KiB at
/// 100 Mbit/s.
pub const QEMU_DOWNTIME_FLOOR: Duration = Duration::from_millis(20);
/// QEMU's `downtime-limit` while the gate is closed: small enough that
/// even a tenfold bandwidth overestimate lets no real remainder through,
/// yet not 0 (with 0 QEMU would skip the sync at a pass's end and stop).
pub const GATE_CLOSED_LIMIT: Duration = Duration::from_millis(1);
/// The gate opens when the dirty set of the last sync would cross at the
/// effective rate within this many budgets: QEMU then stops within the
/// next pass, with at most that much left.
pub const GATE_FACTOR: f64 = 1.5;
/// The relay starts draining its backlog (see [`Converge::near_switchover`])
/// once the dirty set of the last sync is within this many gate sizes: a
/// pass or two before QEMU may stop, so the backlog (half a round trip at
/// the window's probing gain) is gone when it does.
pub const DRAIN_FACTOR: f64 = 4.0;

/// A recomputed `downtime-limit` is sent to QEMU only when it differs from
/// the one QEMU has by at least this much (and by
/// [`DOWNTIME_LIMIT_HYSTERESIS_SHARE`] of it): RTT samples jitter, and each
/// change is a QMP round trip and a log line.
pub const DOWNTIME_LIMIT_HYSTERESIS: Duration = Duration::from_millis(10);

/// Relative part of the downtime-limit hysteresis: QEMU's threshold is
/// bandwidth × limit with a bandwidth that swings far more than this from
/// one 100 ms window to the next, so smaller corrections buy nothing.
pub const DOWNTIME_LIMIT_HYSTERESIS_SHARE: f64 = 0.15;

/// Smoothing time constant of QEMU's bandwidth estimate over the relay's
/// drain rate. QEMU's figure covers its last 100 ms window only, so it is
/// far noisier than the relay's counters; only its lasting bias matters.
pub const OVERESTIMATE_TAU: Duration = Duration::from_secs(8);

/// Smoothing time constant of the rate estimates. Ticks are 250 ms; two
/// seconds rides out the codec's batching and QEMU's bitmap syncs while
/// still following a change of the link or of the dedup rate within a pass.
pub const RATE_TAU: Duration = Duration::from_secs(2);

/// QEMU's `throttle-trigger-threshold` while the controller has not
/// decided to throttle: its maximum, so QEMU's own auto-converge only
/// fires when the guest dirties faster than the stream drains.
pub const TRIGGER_IDLE_PCT: u8 = 100;

/// The smallest initial throttle, percent (QEMU's own default): less than
/// this hardly changes a guest's dirty rate.
pub const MIN_INITIAL_THROTTLE_PCT: u8 = 20;

/// The largest initial throttle, percent: QEMU's increments take it
/// further if needed, but a first step this big is already drastic.
pub const MAX_INITIAL_THROTTLE_PCT: u8 = 80;

/// QEMU's `max-cpu-throttle` default (godwit leaves it alone): at this
/// throttle the controller knows QEMU cannot step further.
pub const QEMU_MAX_THROTTLE_PCT: u64 = 99;

/// Passes the prediction model simulates at most: a migration that needs
/// more is not going to converge in any useful sense.
pub const MAX_PREDICTED_PASSES: usize = 200;

/// Events the report keeps. Routine downtime-limit changes beyond this
/// are dropped (throttle and stall notices are always kept), so a long
/// migration on a jittery link cannot grow the report without bound.
pub const MAX_EVENTS: usize = 64;

/// Bounds of one sample of QEMU's bandwidth estimate over the relay's
/// drain rate: QEMU's 100 ms windows spike tenfold around bitmap syncs,
/// and one spike must not drag its limit to the floor.
const OVERESTIMATE_CLAMP: (f64, f64) = (0.25, 4.0);

/// QEMU 7.2 recomputes `dirty-pages-rate` at a sync only if at least this
/// long has passed since it last did (ram.c `migration_bitmap_sync`);
/// syncs closer together repeat the old figure, which must not count as
/// another stalled pass.
const QEMU_DIRTY_RATE_PERIOD: Duration = Duration::from_secs(1);

/// How long a migration must stay stalled at QEMU's maximum throttle
/// before the controller reports it as stalled: the dirty rate QEMU
/// publishes lags the throttle by a sync or two.
pub const STALL_NOTICE_AFTER: Duration = Duration::from_secs(20);

/// Shortest interval that yields a rate sample: QEMU's counters move in
/// 32 KiB buffers, and a shorter interval is mostly noise.
const MIN_RATE_INTERVAL: Duration = Duration::from_millis(50);

/// Resolved settings of one migration's controller.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvergeConfig {
    /// The guest pause the operator asks for: WAN delay and device state
    /// included (`downtime_limit_ms` of the request or `[migration]`).
    pub downtime_target: Duration,
    /// Time after which the migration is cancelled.
    pub timeout: Duration,
    /// Whether the guest may be throttled (`[migration] auto_converge`).
    pub may_throttle: bool,
    /// Whether to act at all; `false` keeps QEMU's stock behaviour and
    /// only predicts (the `--direct` baseline).
    pub act: bool,
    /// Dirty rate / effective bandwidth at or above which a pass does not
    /// converge (`[migration] stall_ratio`).
    pub stall_ratio: f64,
    /// QEMU's `throttle-trigger-threshold` once throttling is engaged,
    /// percent (`[migration] throttle_trigger_pct`).
    pub throttle_trigger_pct: u8,
    /// QEMU's `cpu-throttle-increment`, percent
    /// (`[migration] throttle_increment_pct`).
    pub throttle_increment_pct: u8,
    /// Time for the device state to cross and load at the destination
    /// (`[migration] device_state_allowance_ms`).
    pub device_allowance: Duration,
}

impl Default for ConvergeConfig {
    fn default() -> Self {
        Self {
            downtime_target: Duration::from_millis(300),
            timeout: Duration::from_secs(600),
            may_throttle: true,
            act: true,
            stall_ratio: 0.9,
            throttle_trigger_pct: 50,
            throttle_increment_pct: 10,
            device_allowance: Duration::from_millis(30),
        }
    }
}

/// QEMU's migration status, as far as the controller cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QemuPhase {
    /// `setup` (or no status yet).
    #[default]
    Setup,
    /// `active`: precopy passes.
    Active,
    /// The guest is paused (`pre-switchover`, `device`, …) or QEMU is done.
    Switchover,
}

impl QemuPhase {
    /// From `query-migrate`'s `status`.
    pub fn from_status(s: &str) -> Self {
        match s {
            "" | "none" | "setup" => QemuPhase::Setup,
            "active" => QemuPhase::Active,
            _ => QemuPhase::Switchover,
        }
    }
}

/// One observation, taken every progress tick.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    /// Time since the migration started.
    pub elapsed: Duration,
    /// QEMU's status.
    pub phase: QemuPhase,
    /// QEMU's `ram.remaining`, bytes.
    pub remaining_bytes: u64,
    /// QEMU's `ram.dirty-pages-rate` × page size, bytes/s.
    pub dirty_bytes_per_s: f64,
    /// QEMU's `ram.dirty-sync-count`.
    pub passes: u64,
    /// QEMU's `cpu-throttle-percentage`.
    pub throttle_pct: u64,
    /// QEMU's own bandwidth estimate (`ram.mbps`), bytes/s.
    pub qemu_bytes_per_s: f64,
    /// Stream bytes the relay took from QEMU so far.
    pub stream_bytes: u64,
    /// Bytes the relay put on the WAN so far.
    pub wire_bytes: u64,
    /// Wire bytes sent and not yet acknowledged by the destination.
    pub outstanding_wire_bytes: u64,
    /// The link's smoothed round-trip time.
    pub rtt: Duration,
}

/// QEMU migration parameters to set; `None` leaves one alone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QemuParams {
    /// `downtime-limit`, ms.
    pub downtime_limit_ms: Option<u64>,
    /// `throttle-trigger-threshold`, percent.
    pub throttle_trigger_threshold: Option<u8>,
    /// `cpu-throttle-initial`, percent.
    pub cpu_throttle_initial: Option<u8>,
    /// `cpu-throttle-increment`, percent.
    pub cpu_throttle_increment: Option<u8>,
}

impl QemuParams {
    /// The parameters as `migrate-set-parameters` names and values.
    pub fn pairs(&self) -> Vec<(&'static str, u64)> {
        let mut v = Vec::new();
        if let Some(x) = self.downtime_limit_ms {
            v.push(("downtime-limit", x));
        }
        if let Some(x) = self.throttle_trigger_threshold {
            v.push(("throttle-trigger-threshold", u64::from(x)));
        }
        if let Some(x) = self.cpu_throttle_initial {
            v.push(("cpu-throttle-initial", u64::from(x)));
        }
        if let Some(x) = self.cpu_throttle_increment {
            v.push(("cpu-throttle-increment", u64::from(x)));
        }
        v
    }

    /// Whether nothing is to be set.
    pub fn is_empty(&self) -> bool {
        self.pairs().is_empty()
    }
}

/// What an [`Action`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionKind {
    /// QEMU's `downtime-limit` follows the WAN delay.
    DowntimeLimit,
    /// The controller engaged throttling.
    Throttle,
    /// QEMU's own auto-converge throttled before the controller did.
    QemuThrottled,
    /// Not converging even at full throttle; nothing more to do.
    Stalled,
}

impl ActionKind {
    /// Short name, as in the report.
    pub fn name(self) -> &'static str {
        match self {
            ActionKind::DowntimeLimit => "downtime-limit",
            ActionKind::Throttle => "throttle",
            ActionKind::QemuThrottled => "qemu-throttle",
            ActionKind::Stalled => "stalled",
        }
    }
}

/// Something the shell should do (and say).
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    /// What it is about.
    pub kind: ActionKind,
    /// Parameters to set (empty for pure notices).
    pub params: QemuParams,
    /// Why, in words with the figures behind it.
    pub reason: String,
}

/// The controller's current view.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Estimates {
    /// Effective bandwidth: stream bytes drained per second.
    pub effective_bytes_per_s: Option<f64>,
    /// Bytes per second on the WAN.
    pub wire_bytes_per_s: Option<f64>,
    /// Effective / wire rate (above 1 when the codec reduces).
    pub reduction_ratio: Option<f64>,
    /// Guest dirty rate, bytes/s (QEMU's, from the last sync).
    pub dirty_bytes_per_s: f64,
    /// Predicted total migration time, from the start.
    pub predicted_total: Option<Duration>,
    /// Predicted guest pause.
    pub predicted_downtime: Option<Duration>,
    /// Whether the migration is predicted to converge in time; `None`
    /// until the dirty rate has been measured over a full pass.
    pub converging: Option<bool>,
}

/// An exponentially weighted rate with a time constant.
#[derive(Debug, Clone, Copy, Default)]
struct Ewma {
    value: Option<f64>,
}

impl Ewma {
    fn update(&mut self, x: f64, dt: Duration) {
        self.update_with(x, dt, RATE_TAU);
    }

    fn update_with(&mut self, x: f64, dt: Duration, tau: Duration) {
        let a = 1.0 - (-dt.as_secs_f64() / tau.as_secs_f64()).exp();
        self.value = Some(match self.value {
            Some(v) => v + a * (x - v),
            None => x,
        });
    }
}

/// The convergence controller of one migration.
#[derive(Debug, Clone)]
pub struct Converge {
    cfg: ConvergeConfig,
    prev: Option<Sample>,
    effective: Ewma,
    wire: Ewma,
    /// Rate at which `remaining` falls within a pass (above the effective
    /// bandwidth while zero pages are scanned).
    drain: Ewma,
    /// QEMU's bandwidth estimate over the real drain rate (starts at 1:
    /// no bias until shown otherwise).
    qemu_overestimate: Ewma,
    /// Time with rate samples while QEMU was active.
    active_for: Duration,
    /// Unacknowledged wire bytes, smoothed (one tick's figure swings
    /// between an empty and a full window).
    outstanding: Ewma,
    dirty: f64,
    passes: u64,
    /// When the current pass began (the last sync).
    pass_started: Duration,
    stalled_passes: u32,
    stalled_at_max: u32,
    /// When a pass was last judged (a fresh dirty rate).
    judged_at: Option<Duration>,
    /// When QEMU's throttle reached its maximum.
    at_max_since: Option<Duration>,
    engaged: bool,
    stalled_reported: bool,
    /// The `downtime-limit` QEMU has (as far as we know).
    qemu_limit: Option<Duration>,
    /// The limit QEMU gets once the gate opens (for predictions).
    open_limit: Option<Duration>,
    /// QEMU's remaining bytes right after the last sync: the dirty set.
    sync_pending: Option<u64>,
    /// Whether QEMU may switch over by itself (see [`GATE_CLOSED_LIMIT`]).
    gate_open: bool,
    estimates: Estimates,
    events: Vec<ConvergenceEvent>,
    max_throttle: u64,
    throttle_since: Option<Duration>,
    last_action: Option<String>,
}

impl Converge {
    /// A controller for one migration.
    pub fn new(cfg: ConvergeConfig) -> Self {
        Self {
            cfg,
            prev: None,
            effective: Ewma::default(),
            wire: Ewma::default(),
            drain: Ewma::default(),
            qemu_overestimate: Ewma { value: Some(1.0) },
            active_for: Duration::ZERO,
            outstanding: Ewma::default(),
            dirty: 0.0,
            passes: 0,
            pass_started: Duration::ZERO,
            stalled_passes: 0,
            stalled_at_max: 0,
            judged_at: None,
            at_max_since: None,
            engaged: false,
            stalled_reported: false,
            qemu_limit: None,
            open_limit: None,
            sync_pending: None,
            gate_open: false,
            estimates: Estimates::default(),
            events: Vec::new(),
            max_throttle: 0,
            throttle_since: None,
            last_action: None,
        }
    }

    /// Parameters to set before `migrate`, for a link of this RTT: the
    /// WAN-aware downtime limit and, if throttling is allowed, the idle
    /// trigger. With `act` off, only the operator's limit as is.
    pub fn initial_parameters(&mut self, rtt: Duration) -> QemuParams {
        if !self.cfg.act {
            return QemuParams {
                downtime_limit_ms: Some(self.cfg.downtime_target.as_millis() as u64),
                ..QemuParams::default()
            };
        }
        self.open_limit = Some(self.qemu_limit_for(rtt, 0, None));
        let limit = GATE_CLOSED_LIMIT;
        self.qemu_limit = Some(limit);
        QemuParams {
            downtime_limit_ms: Some(limit.as_millis() as u64),
            throttle_trigger_threshold: self.cfg.may_throttle.then_some(TRIGGER_IDLE_PCT),
            cpu_throttle_initial: self.cfg.may_throttle.then_some(MIN_INITIAL_THROTTLE_PCT),
            cpu_throttle_increment: self
                .cfg
                .may_throttle
                .then_some(self.cfg.throttle_increment_pct),
        }
    }

    /// Feeds one sample; returns what to do now (usually nothing). Samples
    /// must come in time order.
    pub fn observe(&mut self, s: Sample) -> Vec<Action> {
        let mut actions = Vec::new();
        self.update_rates(&s);
        let new_pass = s.passes > self.passes;
        if new_pass {
            self.pass_started = s.elapsed;
            self.passes = s.passes;
            self.sync_pending = Some(s.remaining_bytes);
        }
        // QEMU publishes a dirty rate only at syncs; keep the last one.
        if s.dirty_bytes_per_s > 0.0 || new_pass {
            self.dirty = s.dirty_bytes_per_s.max(0.0);
        }
        if s.throttle_pct > self.max_throttle {
            self.max_throttle = s.throttle_pct;
        }
        if s.throttle_pct > 0 && self.throttle_since.is_none() {
            self.throttle_since = Some(s.elapsed);
        }
        if s.phase == QemuPhase::Active {
            self.predict(&s);
            if self.cfg.act {
                self.decide(&s, new_pass, &mut actions);
            }
        } else if s.phase == QemuPhase::Switchover {
            // The guest is paused: the prediction is what it was.
            self.estimates.converging = Some(true);
        }
        for a in &actions {
            if a.kind == ActionKind::DowntimeLimit && self.events.len() >= MAX_EVENTS {
                continue;
            }
            self.events.push(ConvergenceEvent {
                at_ms: s.elapsed.as_millis() as u64,
                kind: a.kind.name().into(),
                text: a.reason.clone(),
            });
            // QEMU's limit following the RTT is routine; the progress bar
            // shows what changes the guest's life.
            if a.kind != ActionKind::DowntimeLimit {
                self.last_action = Some(a.reason.clone());
            }
        }
        self.prev = Some(s);
        actions
    }

    /// The `downtime-limit` QEMU gets once the gate opens (target minus
    /// the WAN's share), as last computed.
    pub fn open_limit(&self) -> Option<Duration> {
        self.open_limit
    }

    /// Whether the switch-over is near: the gate is open, or the dirty set
    /// of the last sync is within [`DRAIN_FACTOR`] gate sizes.
    pub fn near_switchover(&self) -> bool {
        if self.gate_open {
            return true;
        }
        match (self.effective.value, self.sync_pending, self.open_limit) {
            (Some(bw), Some(p), Some(limit)) if bw > 0.0 => {
                p as f64 <= DRAIN_FACTOR * GATE_FACTOR * bw * limit.as_secs_f64()
            }
            _ => false,
        }
    }

    /// The current estimates and predictions.
    pub fn estimates(&self) -> Estimates {
        self.estimates
    }

    /// The text of the latest action other than a routine downtime-limit
    /// change, for the progress bar.
    pub fn last_action(&self) -> Option<&str> {
        self.last_action.as_deref()
    }

    /// Whether the controller engaged throttling (or QEMU did by itself).
    pub fn throttling(&self) -> bool {
        self.engaged
    }

    /// The summary for the migration report.
    pub fn report(&self) -> ConvergenceReport {
        ConvergenceReport {
            downtime_target_ms: self.cfg.downtime_target.as_millis() as u64,
            qemu_downtime_limit_ms: self.qemu_limit.map(|d| d.as_millis() as u64),
            events: self.events.clone(),
            max_throttle_pct: self.max_throttle,
            throttle_started_ms: self.throttle_since.map(|d| d.as_millis() as u64),
            effective_bps: self.estimates.effective_bytes_per_s.unwrap_or(0.0) * 8.0,
            reduction_ratio: self.estimates.reduction_ratio,
            predicted_downtime_ms: self
                .estimates
                .predicted_downtime
                .map(|d| d.as_millis() as u64),
        }
    }

    fn outstanding_now(&self) -> u64 {
        self.outstanding.value.unwrap_or(0.0) as u64
    }

    fn update_rates(&mut self, s: &Sample) {
        let Some(p) = &self.prev else { return };
        let dt = s.elapsed.saturating_sub(p.elapsed);
        if dt < MIN_RATE_INTERVAL || s.phase != QemuPhase::Active || p.phase != QemuPhase::Active {
            return;
        }
        let secs = dt.as_secs_f64();
        let stream = s.stream_bytes.saturating_sub(p.stream_bytes) as f64 / secs;
        let wire = s.wire_bytes.saturating_sub(p.wire_bytes) as f64 / secs;
        self.effective.update(stream, dt);
        self.wire.update(wire, dt);
        self.outstanding.update(s.outstanding_wire_bytes as f64, dt);
        // `remaining` jumps up at a sync; only a tick within one pass says
        // how fast it drains.
        if s.passes == p.passes && s.remaining_bytes <= p.remaining_bytes {
            let drained = (p.remaining_bytes - s.remaining_bytes) as f64 / secs;
            self.drain.update(drained, dt);
        }
        self.active_for += dt;
        // While the effective estimate still ramps up from the first
        // samples, QEMU's figure leads it: that is lag, not bias.
        if let Some(eff) = self.effective.value.filter(|e| *e > 0.0) {
            if s.qemu_bytes_per_s > 0.0 && self.active_for >= RATE_TAU * 2 {
                let ratio =
                    (s.qemu_bytes_per_s / eff).clamp(OVERESTIMATE_CLAMP.0, OVERESTIMATE_CLAMP.1);
                self.qemu_overestimate
                    .update_with(ratio, dt, OVERESTIMATE_TAU);
            }
        }
        self.estimates.effective_bytes_per_s = self.effective.value;
        self.estimates.wire_bytes_per_s = self.wire.value;
        self.estimates.reduction_ratio = match (self.effective.value, self.wire.value) {
            (Some(e), Some(w)) if w > 0.0 => Some(e / w),
            _ => None,
        };
    }

    /// The guest pause beyond QEMU's own estimate: one-way delay for the
    /// last byte, queueing beyond what the link holds in flight, and the
    /// device state.
    fn wan_overhead(&self, rtt: Duration, outstanding: u64, wire_rate: Option<f64>) -> Duration {
        let one_way = rtt / 2;
        // The flow window is sized to the bandwidth-delay product, so about
        // rate × RTT of it is in flight; anything beyond waits in a queue.
        let queue = match wire_rate.filter(|w| *w > 0.0) {
            Some(w) => {
                let in_flight = w * rtt.as_secs_f64();
                Duration::from_secs_f64(((outstanding as f64 - in_flight).max(0.0)) / w)
            }
            None => Duration::ZERO,
        };
        one_way + queue + self.cfg.device_allowance
    }

    /// The `downtime-limit` QEMU should use so that its switch-over
    /// decision keeps the guest's real pause within the target.
    fn qemu_limit_for(&self, rtt: Duration, outstanding: u64, wire_rate: Option<f64>) -> Duration {
        let budget =
            self.cfg
                .downtime_target
                .saturating_sub(self.wan_overhead(rtt, outstanding, wire_rate));
        // QEMU multiplies the limit by its own bandwidth estimate; if that
        // runs ahead of what the relay drains, it would let too big a
        // remainder through. Scale down by the overestimate (never up: an
        // underestimate only makes it cautious).
        let over = self.qemu_overestimate.value.unwrap_or(1.0).max(1.0);
        budget.div_f64(over).max(QEMU_DOWNTIME_FLOOR)
    }

    fn predict(&mut self, s: &Sample) {
        let Some(bw) = self.effective.value.filter(|b| *b > 0.0) else {
            return;
        };
        let limit = self.open_limit.unwrap_or(self.cfg.downtime_target);
        let threshold = bw * limit.as_secs_f64();
        let overhead = self.wan_overhead(s.rtt, self.outstanding_now(), self.wire.value);
        let dirty = self.dirty;
        // The current pass drains at the observed rate (zero pages go fast);
        // later passes carry dirtied, non-zero pages at the stream rate.
        let drain = self.drain.value.filter(|d| *d > bw).unwrap_or(bw);
        let now = s.elapsed.as_secs_f64();
        let horizon = self.cfg.timeout.as_secs_f64();
        let mut total = 0.0;
        let mut pass_time = s.remaining_bytes as f64 / drain;
        // The next dirty set is what the guest dirties from the sync that
        // began this pass until the pass ends.
        let mut span = s.elapsed.saturating_sub(self.pass_started).as_secs_f64() + pass_time;
        let mut outcome = None;
        for _ in 0..MAX_PREDICTED_PASSES {
            total += pass_time;
            let next = dirty * span;
            if next <= threshold {
                let pause = next / bw + overhead.as_secs_f64();
                outcome = Some((total + pause, pause));
                break;
            }
            if dirty >= bw || now + total > horizon {
                break;
            }
            pass_time = next / bw;
            span = pass_time;
        }
        self.estimates.dirty_bytes_per_s = dirty;
        match outcome {
            Some((rest, pause)) => {
                self.estimates.predicted_total = Some(s.elapsed + Duration::from_secs_f64(rest));
                self.estimates.predicted_downtime = Some(Duration::from_secs_f64(pause));
            }
            None => {
                self.estimates.predicted_total = None;
                self.estimates.predicted_downtime = None;
            }
        }
        // The dirty rate is first measured at the sync that ends the first
        // full pass; before that a prediction is a lower bound.
        self.estimates.converging = (self.passes >= 2).then(|| {
            outcome.is_some_and(|(rest, _)| now + rest <= horizon)
                && dirty < self.cfg.stall_ratio * bw
        });
    }

    fn decide(&mut self, s: &Sample, new_pass: bool, actions: &mut Vec<Action>) {
        let bw = self.effective.value.unwrap_or(0.0);
        // Keep QEMU's limit in line with the WAN delay and its estimate.
        let open_limit = self.qemu_limit_for(s.rtt, self.outstanding_now(), self.wire.value);
        self.open_limit = Some(open_limit);
        // The gate: QEMU judges the switch-over from its bandwidth over the
        // last 100 ms, which a burst of zero, duplicate or compressible
        // pages inflates many times over; it would then stop the guest
        // with far more left than the WAN carries in the budget. So QEMU
        // gets a token limit until our own figures (the dirty set found at
        // the last sync, at the smoothed effective rate) show that the
        // remainder fits.
        if !self.gate_open && bw > 0.0 {
            if let Some(p) = self.sync_pending {
                if p as f64 <= GATE_FACTOR * bw * open_limit.as_secs_f64() {
                    self.gate_open = true;
                }
            }
        }
        let limit = if self.gate_open {
            open_limit
        } else {
            GATE_CLOSED_LIMIT
        };
        let differs = match self.qemu_limit {
            Some(cur) => {
                let diff = cur.abs_diff(limit);
                diff >= DOWNTIME_LIMIT_HYSTERESIS
                    && diff.as_secs_f64() >= cur.as_secs_f64() * DOWNTIME_LIMIT_HYSTERESIS_SHARE
            }
            None => true,
        };
        if differs && bw > 0.0 {
            let one_way = s.rtt / 2;
            actions.push(Action {
                kind: ActionKind::DowntimeLimit,
                params: QemuParams {
                    downtime_limit_ms: Some(limit.as_millis() as u64),
                    ..QemuParams::default()
                },
                reason: if !self.gate_open {
                    format!(
                        "QEMU downtime-limit {} ms until the dirty set fits the {} ms budget at the effective rate",
                        limit.as_millis(),
                        open_limit.as_millis()
                    )
                } else {
                    format!(
                    "QEMU downtime-limit {} ms: target {} ms minus {} ms one-way delay and {} ms for the device state{}",
                    limit.as_millis(),
                    self.cfg.downtime_target.as_millis(),
                    one_way.as_millis(),
                    self.cfg.device_allowance.as_millis(),
                    match self.qemu_overestimate.value {
                        Some(o) if o > 1.05 => format!(", over {o:.2} (QEMU's bandwidth estimate runs ahead of the relay)"),
                        _ => String::new(),
                    }
                )
                },
            });
            self.qemu_limit = Some(limit);
        }

        // Stalled passes are judged at syncs: that is when QEMU publishes
        // the dirty rate of the pass that just ended.
        let fresh = self
            .judged_at
            .is_none_or(|t| s.elapsed.saturating_sub(t) >= QEMU_DIRTY_RATE_PERIOD);
        if s.throttle_pct >= QEMU_MAX_THROTTLE_PCT {
            self.at_max_since.get_or_insert(s.elapsed);
        } else {
            self.at_max_since = None;
        }
        if new_pass && fresh && self.passes >= 2 && bw > 0.0 {
            self.judged_at = Some(s.elapsed);
            if self.dirty >= self.cfg.stall_ratio * bw {
                self.stalled_passes += 1;
            } else {
                self.stalled_passes = 0;
            }
            if self.engaged && s.throttle_pct >= QEMU_MAX_THROTTLE_PCT {
                if self.dirty >= self.cfg.stall_ratio * bw {
                    self.stalled_at_max += 1;
                } else {
                    self.stalled_at_max = 0;
                }
            }
        }
        if !self.engaged && s.throttle_pct > 0 {
            // QEMU's own trigger (at 100 %) fired: the guest dirtied faster
            // than the stream drained for two syncs.
            self.engaged = true;
            actions.push(Action {
                kind: ActionKind::QemuThrottled,
                params: QemuParams::default(),
                reason: format!(
                    "QEMU's auto-converge throttled the vCPUs to {} %: dirty rate {} above the effective bandwidth {}",
                    s.throttle_pct,
                    mbit(self.dirty),
                    mbit(bw)
                ),
            });
        }
        if !self.engaged && self.cfg.may_throttle && self.passes >= 2 && bw > 0.0 {
            let late = self
                .estimates
                .predicted_total
                .is_none_or(|t| t > self.cfg.timeout);
            // Two stalled passes; or one, if the guest dirties faster than
            // the stream drains (no pass can ever be the last, and QEMU's
            // own trigger would fire at the next sync with a blind step).
            let hopeless = self.stalled_passes >= 1 && self.dirty >= bw;
            let why = if self.stalled_passes >= 2 || hopeless {
                Some(format!(
                    "not converging: dirty rate {} is {:.0} % of the effective bandwidth {} (wire {}) for {} passes",
                    mbit(self.dirty),
                    100.0 * self.dirty / bw,
                    mbit(bw),
                    mbit(self.wire.value.unwrap_or(0.0)),
                    self.stalled_passes
                ))
            } else if late && self.passes >= 3 {
                Some(format!(
                    "not converging within the {} s timeout: dirty rate {} against effective bandwidth {}",
                    self.cfg.timeout.as_secs(),
                    mbit(self.dirty),
                    mbit(bw)
                ))
            } else {
                None
            };
            if let Some(why) = why {
                self.engaged = true;
                // The dirty rate scales roughly with the vCPUs' share of
                // time: aim the first step at the trigger's ratio.
                let target = f64::from(self.cfg.throttle_trigger_pct) / 100.0;
                let ratio = self.dirty / bw;
                let needed = if ratio > 0.0 {
                    (1.0 - target / ratio) * 100.0
                } else {
                    0.0
                };
                let initial = (needed.ceil().max(0.0) as u8)
                    .clamp(MIN_INITIAL_THROTTLE_PCT, MAX_INITIAL_THROTTLE_PCT);
                actions.push(Action {
                    kind: ActionKind::Throttle,
                    params: QemuParams {
                        throttle_trigger_threshold: Some(self.cfg.throttle_trigger_pct),
                        cpu_throttle_initial: Some(initial),
                        cpu_throttle_increment: Some(self.cfg.throttle_increment_pct),
                        ..QemuParams::default()
                    },
                    reason: format!(
                        "{why}; throttling the vCPUs from {initial} % (+{} % per 2 passes while dirty > {} % of the stream)",
                        self.cfg.throttle_increment_pct, self.cfg.throttle_trigger_pct
                    ),
                });
            }
        }
        let long_at_max = self
            .at_max_since
            .is_some_and(|t| s.elapsed.saturating_sub(t) >= STALL_NOTICE_AFTER);
        if self.engaged && !self.stalled_reported && self.stalled_at_max >= 2 && long_at_max {
            self.stalled_reported = true;
            actions.push(Action {
                kind: ActionKind::Stalled,
                params: QemuParams::default(),
                reason: format!(
                    "still not converging at {} % throttle: dirty rate {} against effective bandwidth {}; postcopy is off, the migration will time out",
                    s.throttle_pct,
                    mbit(self.dirty),
                    mbit(bw)
                ),
            });
        }
    }
}

/// A byte rate as Mbit/s text.
fn mbit(bytes_per_s: f64) -> String {
    format!("{:.1} Mbit/s", bytes_per_s * 8.0 / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: f64 = 1024.0 * 1024.0;
    const TICK: Duration = Duration::from_millis(250);

    /// A toy QEMU 7.2 precopy: sends at `bw` stream bytes/s, the guest
    /// dirties `dirty` bytes/s (times the unthrottled share), a sync
    /// happens when the remainder falls below bw × limit, and
    /// auto-converge follows QEMU's rule.
    struct Sim {
        t: f64,
        bw: f64,
        wire_div: f64,
        dirty: f64,
        remaining: f64,
        dirtied: f64,
        passes: u64,
        last_sync: f64,
        sent_at_sync: f64,
        dirty_rate: f64,
        stream: f64,
        limit_ms: u64,
        trigger: u64,
        initial: u64,
        increment: u64,
        auto_converge: bool,
        /// Whether the throttle slows the guest's dirtying at all.
        throttle_works: bool,
        /// Guest RAM: a dirty set never exceeds it (pages are distinct).
        ram: f64,
        high: u32,
        throttle: u64,
        done: Option<f64>,
        rtt: Duration,
    }

    impl Sim {
        fn new(ram_mib: f64, bw_mbit: f64, dirty_mbit: f64) -> Self {
            Sim {
                t: 0.0,
                bw: bw_mbit * 1e6 / 8.0,
                wire_div: 1.0,
                dirty: dirty_mbit * 1e6 / 8.0,
                remaining: ram_mib * MIB,
                dirtied: 0.0,
                passes: 1,
                last_sync: 0.0,
                sent_at_sync: 0.0,
                dirty_rate: 0.0,
                stream: 0.0,
                limit_ms: 300,
                trigger: 50,
                initial: 20,
                increment: 10,
                auto_converge: true,
                throttle_works: true,
                ram: ram_mib * MIB,
                high: 0,
                throttle: 0,
                done: None,
                rtt: Duration::from_millis(20),
            }
        }

        fn apply(&mut self, p: &QemuParams) {
            if let Some(x) = p.downtime_limit_ms {
                self.limit_ms = x;
            }
            if let Some(x) = p.throttle_trigger_threshold {
                self.trigger = u64::from(x);
            }
            if let Some(x) = p.cpu_throttle_initial {
                self.initial = u64::from(x);
            }
            if let Some(x) = p.cpu_throttle_increment {
                self.increment = u64::from(x);
            }
        }

        fn step(&mut self, dt: f64) {
            let mut left = dt;
            let sub: f64 = 0.005;
            while left > 1e-9 && self.done.is_none() {
                let h = sub.min(left);
                left -= h;
                self.t += h;
                let send = (self.bw * h).min(self.remaining);
                self.remaining -= send;
                self.stream += send;
                let share = if self.throttle_works {
                    1.0 - self.throttle as f64 / 100.0
                } else {
                    1.0
                };
                self.dirtied = (self.dirtied + self.dirty * share * h).min(self.ram);
                let threshold = self.bw * self.limit_ms as f64 / 1000.0;
                if self.remaining < threshold {
                    // Sync.
                    let period = self.t - self.last_sync;
                    let xfer = self.stream - self.sent_at_sync;
                    if period >= 1.0 {
                        if self.auto_converge && self.dirtied > xfer * self.trigger as f64 / 100.0 {
                            self.high += 1;
                            if self.high >= 2 {
                                self.high = 0;
                                self.throttle = if self.throttle == 0 {
                                    self.initial
                                } else {
                                    (self.throttle + self.increment).min(99)
                                };
                            }
                        }
                        self.dirty_rate = self.dirtied / period;
                    }
                    self.remaining += self.dirtied;
                    self.dirtied = 0.0;
                    self.passes += 1;
                    self.last_sync = self.t;
                    self.sent_at_sync = self.stream;
                    if self.remaining < threshold {
                        self.done = Some(self.t + self.remaining / self.bw);
                    }
                }
            }
        }

        fn sample(&self) -> Sample {
            Sample {
                elapsed: Duration::from_secs_f64(self.t),
                phase: if self.done.is_some() {
                    QemuPhase::Switchover
                } else {
                    QemuPhase::Active
                },
                remaining_bytes: self.remaining as u64,
                dirty_bytes_per_s: self.dirty_rate,
                passes: self.passes,
                throttle_pct: self.throttle,
                qemu_bytes_per_s: self.bw,
                stream_bytes: self.stream as u64,
                wire_bytes: (self.stream / self.wire_div) as u64,
                outstanding_wire_bytes: 0,
                rtt: self.rtt,
            }
        }

        /// Runs to the end (or `cap` s), applying actions; returns them
        /// with the predictions seen at each tick.
        fn run(&mut self, c: &mut Converge, cap: f64) -> (Vec<Action>, Vec<(f64, Estimates)>) {
            let init = c.initial_parameters(self.rtt);
            self.apply(&init);
            let mut all = Vec::new();
            let mut seen = Vec::new();
            while self.done.is_none() && self.t < cap {
                self.step(TICK.as_secs_f64());
                for a in c.observe(self.sample()) {
                    self.apply(&a.params);
                    all.push(a);
                }
                seen.push((self.t, c.estimates()));
            }
            (all, seen)
        }
    }

    fn cfg() -> ConvergeConfig {
        ConvergeConfig::default()
    }

    #[test]
    fn converging_migration_needs_no_action_and_predictions_approach_the_truth() {
        let mut sim = Sim::new(256.0, 100.0, 20.0);
        let mut c = Converge::new(cfg());
        let (actions, seen) = sim.run(&mut c, 600.0);
        let end = sim.done.expect("the simulated migration converges");
        assert!(
            actions.iter().all(|a| a.kind == ActionKind::DowntimeLimit),
            "{actions:?}"
        );
        assert_eq!(sim.throttle, 0);
        // From the second pass on, the prediction is within 10 % of the end.
        let later: Vec<_> = seen
            .iter()
            .filter(|(t, e)| *t > end * 0.9 && e.predicted_total.is_some())
            .collect();
        assert!(!later.is_empty());
        for (t, e) in later {
            let p = e.predicted_total.unwrap().as_secs_f64();
            assert!(
                (p - end).abs() < end * 0.1,
                "at {t:.1} s predicted {p:.1} s, ended {end:.1} s"
            );
            assert_eq!(e.converging, Some(true));
        }
        // Half way through (still in the first pass, where the dirty rate
        // is not yet known), already within 25 %.
        let (_, mid) = seen.iter().find(|(t, _)| *t >= end * 0.5).unwrap();
        let p = mid.predicted_total.unwrap().as_secs_f64();
        assert!(
            (p - end).abs() < end * 0.25,
            "mid-way predicted {p:.1} s, ended {end:.1} s"
        );
        // The predicted pause stays within the target.
        let d = c.estimates().predicted_downtime.unwrap();
        assert!(d <= Duration::from_millis(300), "{d:?}");
        let r = c.report();
        assert_eq!(r.max_throttle_pct, 0);
        assert!(r.events.iter().all(|e| e.kind == "downtime-limit"));
    }

    #[test]
    fn non_converging_migration_throttles_within_a_few_passes() {
        let mut sim = Sim::new(256.0, 100.0, 120.0);
        let mut c = Converge::new(cfg());
        let (actions, _) = sim.run(&mut c, 600.0);
        let throttle = actions
            .iter()
            .find(|a| a.kind == ActionKind::Throttle || a.kind == ActionKind::QemuThrottled)
            .expect("the controller throttles");
        assert_eq!(throttle.kind, ActionKind::Throttle, "{actions:?}");
        assert!(throttle.reason.contains("Mbit/s"), "{}", throttle.reason);
        assert!(
            throttle.reason.contains("dirty rate"),
            "{}",
            throttle.reason
        );
        assert_eq!(throttle.params.throttle_trigger_threshold, Some(50));
        let initial = throttle.params.cpu_throttle_initial.unwrap();
        assert!((MIN_INITIAL_THROTTLE_PCT..=MAX_INITIAL_THROTTLE_PCT).contains(&initial));
        let at = c
            .report()
            .events
            .iter()
            .find(|e| e.kind == "throttle")
            .unwrap()
            .at_ms;
        // Engaged by the fourth sync (two stalled passes after the first).
        assert!(sim.done.is_some(), "throttling lets it converge");
        assert!(c.report().max_throttle_pct >= u64::from(initial));
        assert!(c.throttling());
        let first_pass = 256.0 * MIB / (100e6 / 8.0);
        assert!(
            (at as f64) / 1000.0 < first_pass * 4.0,
            "engaged at {at} ms"
        );
    }

    #[test]
    fn slow_convergence_below_the_link_rate_throttles_after_two_passes() {
        // 92 % of the bandwidth: QEMU's own trigger (at 100) never fires,
        // the controller does after two stalled passes.
        let mut sim = Sim::new(128.0, 100.0, 92.0);
        let mut c = Converge::new(cfg());
        let (actions, seen) = sim.run(&mut c, 900.0);
        let t = actions
            .iter()
            .find(|a| a.kind != ActionKind::DowntimeLimit)
            .expect("an action");
        assert_eq!(t.kind, ActionKind::Throttle, "{t:?}");
        assert!(t.reason.contains("for 2 passes"), "{}", t.reason);
        assert!(sim.done.is_some());
        assert!(seen.iter().any(|(_, e)| e.converging == Some(false)));
        assert_eq!(seen.last().unwrap().1.converging, Some(true));
    }

    #[test]
    fn stalled_at_full_throttle_is_reported_once() {
        let mut sim = Sim::new(64.0, 100.0, 150.0);
        sim.throttle_works = false;
        let mut c = Converge::new(cfg());
        let (actions, _) = sim.run(&mut c, 400.0);
        assert!(sim.done.is_none());
        assert_eq!(sim.throttle, 99);
        let kinds: Vec<_> = actions
            .iter()
            .filter(|a| a.kind != ActionKind::DowntimeLimit)
            .map(|a| a.kind)
            .collect();
        assert_eq!(kinds, vec![ActionKind::Throttle, ActionKind::Stalled]);
        let stalled = c
            .report()
            .events
            .into_iter()
            .find(|e| e.kind == "stalled")
            .unwrap();
        assert!(stalled.text.contains("99 %"), "{}", stalled.text);
    }

    #[test]
    fn qemu_own_trigger_is_reported() {
        let mut sim = Sim::new(64.0, 100.0, 150.0);
        // No bound on the dirty set, so QEMU's rule (dirtied > sent) holds.
        sim.ram = f64::MAX;
        let mut c = Converge::new(ConvergeConfig {
            // Never stalled by our ratio: only QEMU's trigger can fire.
            stall_ratio: 10.0,
            timeout: Duration::from_secs(100_000),
            ..cfg()
        });
        let (actions, _) = sim.run(&mut c, 300.0);
        assert!(
            actions.iter().any(|a| a.kind == ActionKind::QemuThrottled),
            "{actions:?}"
        );
    }

    #[test]
    fn no_throttle_when_not_allowed() {
        let mut sim = Sim::new(64.0, 100.0, 120.0);
        sim.auto_converge = false;
        let mut c = Converge::new(ConvergeConfig {
            may_throttle: false,
            ..cfg()
        });
        let (actions, seen) = sim.run(&mut c, 60.0);
        assert!(actions.iter().all(|a| a.kind == ActionKind::DowntimeLimit));
        assert!(sim.done.is_none());
        assert_eq!(seen.last().unwrap().1.converging, Some(false));
        assert_eq!(seen.last().unwrap().1.predicted_total, None);
    }

    #[test]
    fn reduction_makes_effective_bandwidth_exceed_the_wire_rate() {
        // The codec shrinks the stream 4×: QEMU drains 400 Mbit/s of
        // stream over a 100 Mbit/s wire, and a 150 Mbit/s dirty rate
        // converges without throttling.
        let mut sim = Sim::new(128.0, 400.0, 150.0);
        sim.wire_div = 4.0;
        let mut c = Converge::new(cfg());
        let (actions, _) = sim.run(&mut c, 600.0);
        assert!(sim.done.is_some());
        assert!(actions.iter().all(|a| a.kind == ActionKind::DowntimeLimit));
        let e = c.estimates();
        let eff = e.effective_bytes_per_s.unwrap();
        let wire = e.wire_bytes_per_s.unwrap();
        assert!(eff > wire * 3.5, "effective {eff} wire {wire}");
        assert!((e.reduction_ratio.unwrap() - 4.0).abs() < 0.2);
        assert!((eff * 8.0 / 1e6 - 400.0).abs() < 20.0, "{eff}");
    }

    #[test]
    fn downtime_budget_subtracts_the_one_way_delay() {
        let mut c = Converge::new(cfg());
        // 100 ms RTT: 300 - 50 - 30 device allowance.
        let p = c.initial_parameters(Duration::from_millis(100));
        // QEMU starts behind the gate; the open limit is the budget.
        assert_eq!(p.downtime_limit_ms, Some(1));
        assert_eq!(c.open_limit(), Some(Duration::from_millis(220)));
        assert_eq!(p.throttle_trigger_threshold, Some(TRIGGER_IDLE_PCT));
        // 520 ms RTT eats the whole target: the floor.
        let mut c = Converge::new(cfg());
        c.initial_parameters(Duration::from_millis(520));
        assert_eq!(c.open_limit(), Some(QEMU_DOWNTIME_FLOOR));
        // Without acting, QEMU gets the operator's figure unchanged.
        let mut c = Converge::new(ConvergeConfig {
            act: false,
            ..cfg()
        });
        let p = c.initial_parameters(Duration::from_millis(520));
        assert_eq!(p.downtime_limit_ms, Some(300));
        assert_eq!(p.throttle_trigger_threshold, None);
    }

    #[test]
    fn downtime_limit_follows_the_rtt_and_queue() {
        let mut c = Converge::new(cfg());
        c.initial_parameters(Duration::from_millis(20));
        let base = Sample {
            phase: QemuPhase::Active,
            remaining_bytes: 1 << 30,
            passes: 1,
            rtt: Duration::from_millis(200),
            qemu_bytes_per_s: 12.5e6,
            ..Sample::default()
        };
        c.observe(base.clone());
        c.observe(Sample {
            elapsed: Duration::from_millis(250),
            stream_bytes: 3_125_000,
            wire_bytes: 3_125_000,
            remaining_bytes: base.remaining_bytes - 3_125_000,
            ..base.clone()
        });
        // 300 - 100 one-way - 30.
        assert_eq!(c.open_limit(), Some(Duration::from_millis(170)));
        // 5 MB outstanding on a 12.5 MB/s, 200 ms link: 2.5 MB in flight,
        // 2.5 MB queued = 200 ms more, once the smoothed figure catches up.
        for i in 2..40u64 {
            let sent = 3_125_000 * i;
            c.observe(Sample {
                elapsed: TICK * i as u32,
                stream_bytes: sent,
                wire_bytes: sent,
                outstanding_wire_bytes: 5_000_000,
                remaining_bytes: base.remaining_bytes - sent,
                ..base.clone()
            });
        }
        assert_eq!(c.open_limit(), Some(QEMU_DOWNTIME_FLOOR));
    }

    #[test]
    fn qemu_overestimate_shrinks_its_limit() {
        let mut c = Converge::new(cfg());
        c.initial_parameters(Duration::ZERO);
        let mut s = Sample {
            phase: QemuPhase::Active,
            remaining_bytes: 1 << 30,
            passes: 1,
            // QEMU believes twice what the relay drains.
            qemu_bytes_per_s: 25e6,
            ..Sample::default()
        };
        for i in 0..200u64 {
            s.elapsed = TICK * i as u32;
            s.stream_bytes = 3_125_000 * i;
            s.wire_bytes = s.stream_bytes;
            c.observe(s.clone());
        }
        // (300 - 30) / 2.
        let l = c.open_limit().unwrap().as_millis();
        assert!((130..=140).contains(&l), "{l}");
    }

    #[test]
    fn qemu_may_switch_over_only_once_the_dirty_set_fits() {
        let mut c = Converge::new(cfg());
        c.initial_parameters(Duration::ZERO);
        let limit_actions = |a: Vec<Action>| -> Vec<u64> {
            a.into_iter()
                .filter(|a| a.kind == ActionKind::DowntimeLimit)
                .filter_map(|a| a.params.downtime_limit_ms)
                .collect()
        };
        // 12.5 MB/s effective; budget (300 - 30) ms holds 3.4 MB.
        let mut s = Sample {
            phase: QemuPhase::Active,
            remaining_bytes: 1 << 30,
            passes: 1,
            qemu_bytes_per_s: 12.5e6,
            ..Sample::default()
        };
        for i in 0..20u64 {
            s.elapsed = TICK * i as u32;
            s.stream_bytes = 3_125_000 * i;
            s.wire_bytes = s.stream_bytes;
            assert!(limit_actions(c.observe(s.clone())).is_empty());
        }
        // A sync finds 40 MB dirty: too much, the gate stays shut even if
        // QEMU's own estimate were to run wild.
        s.passes = 2;
        s.remaining_bytes = 40_000_000;
        s.elapsed = TICK * 20;
        assert!(limit_actions(c.observe(s.clone())).is_empty());
        // The next sync finds 3 MB: QEMU gets the budget.
        s.passes = 3;
        s.remaining_bytes = 3_000_000;
        s.elapsed = TICK * 21;
        s.stream_bytes += 3_125_000;
        s.wire_bytes = s.stream_bytes;
        let opened = limit_actions(c.observe(s.clone()));
        assert!(
            opened.len() == 1 && (250..=270).contains(&opened[0]),
            "{opened:?}"
        );
    }

    #[test]
    fn params_render_as_qmp_names() {
        let p = QemuParams {
            downtime_limit_ms: Some(20),
            throttle_trigger_threshold: Some(50),
            cpu_throttle_initial: Some(30),
            cpu_throttle_increment: Some(10),
        };
        assert_eq!(
            p.pairs(),
            vec![
                ("downtime-limit", 20),
                ("throttle-trigger-threshold", 50),
                ("cpu-throttle-initial", 30),
                ("cpu-throttle-increment", 10)
            ]
        );
        assert!(QemuParams::default().is_empty());
        assert_eq!(QemuPhase::from_status("active"), QemuPhase::Active);
        assert_eq!(QemuPhase::from_status("device"), QemuPhase::Switchover);
        assert_eq!(QemuPhase::from_status("setup"), QemuPhase::Setup);
    }
}
