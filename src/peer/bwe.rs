//! What a subscriber's downlink carries, estimated by the sender from the transport-wide
//! congestion feedback every browser sends: GCC, with libwebrtc's trendline filter as the
//! delay detector.
//!
//! `rtc` runs an estimator inside the interceptor chain and hands its target only to a pacer
//! (or, as an attribute on the feedback packet, to connection stats that our keyframe
//! interceptor does not pass on). cohost does not pace: a pacer queues forwarded media behind
//! an estimate that starts at 300 kbit/s, and up to 4096 packets deep. So [`Estimator`]
//! publishes what it finds where the rest of the server reads it ([`Signals`]): the target
//! (room stats) and whether the link is queueing now (the layer choice, `sfu::downlink`).
//!
//! Why not `rtc`'s own `Gcc` as is: its delay detector compares the Kalman-filtered gradient
//! between two packet groups with a 12.5 ms threshold. libwebrtc compares a regression slope
//! over the last 20 groups, scaled by 4 x min(groups seen, 60), with the same threshold; the
//! bare gradient stays far under it. Measured behind a kernel `tbf` at half the top simulcast
//! layer's rate (tests/simulcast.rs), `rtc`'s detector found no overuse at all while `tbf` dropped
//! packets for seconds. So the pieces of `rtc`'s GCC are kept (grouping, adaptive threshold
//! and overuse debounce, AIMD rate control, loss controller) and the filter is
//! [`Trendline`], libwebrtc's `TrendlineEstimator`.
//!
//! Caveat: without a pacer and with nothing probing, the target of an idle link keeps creeping
//! up (GCC's increase is not capped by what is sent), so a drop is the meaningful signal, not
//! the level. And it starts at 300 kbit/s: the level is for the stats, the overuse signal is
//! what the layer choice uses.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use rtc::interceptor::{
    ArrivalGroupAccumulator, BandwidthEstimator, EstimatorStats, GCC_INITIAL_BITRATE,
    GCC_MAX_BITRATE, GCC_MIN_BITRATE, InterGroupDelay, LossController, OveruseDetector,
    PacketReport, RateCalculator, RateController, Usage,
};

/// Delay-based overuse episodes seen on all subscriber downlinks (a metric).
pub static OVERUSES: AtomicU64 = AtomicU64::new(0);

/// What one connection's estimator publishes, shared with its statistics and its tracks.
#[derive(Debug, Clone, Default)]
pub struct Signals {
    /// The target, bit/s; 0 until the first feedback.
    pub estimate_bps: Arc<AtomicU64>,
    /// The delay detector says the path is queueing now (more is sent than it carries).
    pub overusing: Arc<AtomicBool>,
    /// Overuse episodes so far.
    pub overuses: Arc<AtomicU64>,
}

/// Groups kept in the regression (libwebrtc's `trendline_window_size`).
const WINDOW: usize = 20;
/// Smoothing of the accumulated delay (libwebrtc's `smoothing_coef`).
const SMOOTHING: f64 = 0.9;
/// Gain applied to the slope (libwebrtc's `threshold_gain`).
const GAIN: f64 = 4.0;
/// The slope is scaled by the number of groups seen, up to this (libwebrtc's `kMinNumDeltas`):
/// a young estimator is less sure.
const DELTAS_CAP: u32 = 60;

/// libwebrtc's trendline filter: the accumulated delay between packet groups, smoothed, and
/// the slope of a least-squares line through its last [`WINDOW`] points. A queue that grows
/// makes each group a little later than the one before: the slope is how fast the queue grows
/// (ms per ms). Unlike a filter over single gradients it sees a queue that grows a little with
/// every group, which is what a link does that carries a bit less than it is sent.
#[derive(Debug, Default)]
pub struct Trendline {
    points: VecDeque<(f64, f64)>,
    first: Option<Instant>,
    accumulated_ms: f64,
    smoothed_ms: f64,
    deltas: u32,
}

impl Trendline {
    /// One more gradient. Returns the modified trend (ms, compared with the detector's
    /// threshold) once the window is full.
    pub fn update(&mut self, d: &InterGroupDelay) -> Option<f64> {
        self.deltas = (self.deltas + 1).min(DELTAS_CAP);
        let first = *self.first.get_or_insert(d.at);
        let x = d.at.saturating_duration_since(first).as_secs_f64() * 1000.0;
        self.accumulated_ms += d.delta_ms;
        self.smoothed_ms = SMOOTHING * self.smoothed_ms + (1.0 - SMOOTHING) * self.accumulated_ms;
        self.points.push_back((x, self.smoothed_ms));
        if self.points.len() > WINDOW {
            self.points.pop_front();
        }
        if self.points.len() < WINDOW {
            return None;
        }
        let slope = slope(&self.points)?;
        Some(f64::from(self.deltas) * slope * GAIN)
    }
}

/// Least-squares slope of `points`; `None` when they all share one x.
fn slope(points: &VecDeque<(f64, f64)>) -> Option<f64> {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points.iter().fold((0.0, 0.0), |(num, den), (x, y)| {
        (num + (x - mx) * (y - my), den + (x - mx) * (x - mx))
    });
    (den != 0.0).then(|| num / den)
}

/// GCC over transport-wide feedback: the delay half ([`Trendline`], then `rtc`'s adaptive
/// threshold, overuse debounce and AIMD) and `rtc`'s loss half, combined by `min` as in
/// `rtc`'s `Gcc`; publishing into [`Signals`].
pub struct Estimator {
    groups: ArrivalGroupAccumulator,
    trend: Trendline,
    detector: OveruseDetector,
    rate: RateCalculator,
    delay: RateController,
    loss: LossController,
    target: f64,
    out: Signals,
}

impl Estimator {
    pub fn new(out: Signals) -> Self {
        let (init, min, max) = (GCC_INITIAL_BITRATE, GCC_MIN_BITRATE, GCC_MAX_BITRATE);
        Self {
            groups: ArrivalGroupAccumulator::default(),
            trend: Trendline::default(),
            detector: OveruseDetector::new(),
            rate: RateCalculator::default(),
            delay: RateController::new(init, min, max),
            loss: LossController::new(init, min, max),
            target: init,
            out,
        }
    }
}

impl BandwidthEstimator for Estimator {
    fn on_reports(&mut self, now: Instant, reports: &[PacketReport]) {
        if reports.is_empty() {
            return;
        }
        let mut usage = self.detector.usage();
        for report in reports {
            if report.arrived {
                self.rate.add(now, report.size);
            }
            if let Some(d) = self.groups.accumulate(report)
                && let Some(trend) = self.trend.update(&d)
            {
                let next = self.detector.update(d.at, trend);
                if next == Usage::Over && usage != Usage::Over {
                    tracing::debug!(
                        trend,
                        threshold = self.detector.threshold_ms(),
                        "subscriber downlink queueing (delay-based overuse)"
                    );
                    self.out.overuses.fetch_add(1, Ordering::Relaxed);
                    OVERUSES.fetch_add(1, Ordering::Relaxed);
                }
                usage = next;
            }
        }
        self.out
            .overusing
            .store(usage == Usage::Over, Ordering::Relaxed);
        let received = self.rate.rate_bits_per_second(now);
        let delay = self.delay.update(now, usage, received);
        let lost = reports.iter().filter(|r| !r.arrived).count();
        let loss = self.loss.update(now, lost, reports.len());
        self.target = delay.min(loss).clamp(GCC_MIN_BITRATE, GCC_MAX_BITRATE);
        self.out
            .estimate_bps
            .store(self.target as u64, Ordering::Relaxed);
    }

    fn target_bitrate(&self) -> f64 {
        self.target
    }

    fn stats(&self) -> EstimatorStats {
        let mut s = EstimatorStats::default();
        s.delay_based_bitrate = Some(self.delay.target());
        s.loss_based_bitrate = Some(self.loss.target());
        s.packet_loss = self.loss.average_loss();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::rtcp::transport_feedbacks::cc_feedback_report::Ecn;
    use std::time::Duration;

    fn report(id: u64, departure: Instant, arrival: Duration) -> PacketReport {
        PacketReport {
            ssrc: 1,
            id,
            rtp_sequence_number: id as u16,
            is_twcc: true,
            twcc_sequence_number: id as u16,
            size: 1200,
            arrived: true,
            departure,
            arrival: Some(arrival),
            ecn: Ecn::default(),
        }
    }

    /// A frame of `n` packets every 33 ms for `secs`, through a link of `link_bps` (a queue
    /// that drains at that rate, unbounded), fed back every 100 ms. Returns whether the path
    /// was overusing at the end and how many episodes there were.
    fn run(send_bps: f64, link_bps: f64, secs: u64) -> (bool, u64) {
        let out = Signals::default();
        let mut e = Estimator::new(out.clone());
        let t0 = Instant::now();
        let frame_bytes = send_bps / 8.0 / 30.0;
        let n = (frame_bytes / 1200.0).ceil() as u64;
        let mut free_at = 0.0f64; // when the link is free again, s
        let mut pending = vec![];
        let mut id = 0;
        for f in 0..secs * 30 {
            let sent = f as f64 / 30.0;
            for k in 0..n {
                // Packets of a frame leave 0.1 ms apart.
                let dep = sent + k as f64 * 0.0001;
                let done = free_at.max(dep) + 1200.0 * 8.0 / link_bps;
                free_at = done;
                pending.push(report(
                    id,
                    t0 + Duration::from_secs_f64(dep),
                    Duration::from_secs_f64(done + 0.02),
                ));
                id += 1;
            }
            if f % 3 == 2 {
                e.on_reports(t0 + Duration::from_secs_f64(sent + 0.03), &pending);
                pending.clear();
            }
        }
        (
            out.overusing.load(Ordering::Relaxed),
            out.overuses.load(Ordering::Relaxed),
        )
    }

    #[test]
    fn a_link_that_carries_what_is_sent_is_not_overused() {
        assert_eq!(run(800_000.0, 2_000_000.0, 10), (false, 0));
    }

    #[test]
    fn a_link_that_carries_half_of_what_is_sent_is_overused_within_a_second() {
        let (now, episodes) = run(1_000_000.0, 500_000.0, 1);
        assert!(now && episodes == 1, "overusing {now}, episodes {episodes}");
    }

    #[test]
    fn a_slow_queue_build_up_is_seen() {
        // 10 % more than the link carries: the queue grows 3 ms a frame.
        let (_, episodes) = run(1_100_000.0, 1_000_000.0, 3);
        assert!(episodes >= 1, "episodes {episodes}");
    }

    #[test]
    fn the_slope_of_a_line_is_its_slope() {
        let points: VecDeque<(f64, f64)> =
            (0..20).map(|i| (i as f64, 2.0 * i as f64 + 1.0)).collect();
        assert!((slope(&points).unwrap() - 2.0).abs() < 1e-9);
        let flat: VecDeque<(f64, f64)> = (0..20).map(|_| (3.0, 1.0)).collect();
        assert_eq!(slope(&flat), None);
    }
}
