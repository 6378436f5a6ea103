//! How much of a simulcast track a subscriber's downlink carries, judged from its receiver
//! reports, sans-IO.
//!
//! A subscriber on a weak link (a phone on a bad cell, a `tbf`-limited interface) that is sent
//! more than its link carries loses packets, and its picture breaks up. Its RTCP receiver
//! reports say so: each names the fraction of packets lost since the one before (about one a
//! second). [`Downlink`] turns them into a *cap*: the highest simulcast layer this subscriber
//! may get, or none at all (video paused, audio untouched), in the manner of loss-based
//! congestion control (GCC's loss controller: above 10 % loss back off, under 2 % try more):
//! - A report over [`LOSS_HIGH`] moves the cap one layer down. The next move waits until the
//!   switch is done (the caller says so with [`Downlink::switched`]: a switch waits for a
//!   keyframe of the new layer, whose burst and the old layer's tail are still in the reports
//!   right after it) and [`SETTLE`] more. Below the lowest layer, video pauses.
//! - After [`probe_after`](Downlink::probe_after) of reports under [`LOSS_LOW`] (or no loss
//!   signal at all while paused), the cap goes one layer up: a probe. Loss over the high mark
//!   within [`PROBE_WINDOW`] of a probe means the link does not carry that layer: back down, and
//!   the next probe waits twice as long (up to [`PROBE_MAX`]); a probe that holds resets it.
//!
//! This needs no bitrate numbers and works with every receiver that sends reports (browsers,
//! native libwebrtc, the `webrtc` crate, aiortc). After a switch, the subscriber's requests to
//! resend the old layer are dropped (`peer::nack_floor`), and every stream's retransmissions
//! are bounded (`peer::nack_budget`), so they do not keep the link full.
//! - With the delay-based estimate on (`webrtc.bandwidth_estimate`, `peer::bwe`: GCC over the
//!   transport-wide feedback the client sends), a link found queueing counts as heavy loss
//!   ([`Downlink::congested`]): a link with a deep queue (a cell, a `tbf`) is moved down
//!   before the queue overflows, and a probe that makes the queue grow fails.
//!
//! A subscriber's tracks share one controller over a ladder of caps by priority
//! (`sfu::allocation`). What it does not do (documented): pick a layer from the estimate's
//! level (it starts at 300 kbit/s and climbs slowly without a pacer probing); the estimate
//! only says when the link is over its capacity.

use std::time::{Duration, Instant};

/// Fraction lost (of 256) over which the layer is too much for the link: 10 %.
pub const LOSS_HIGH: u8 = 26;
/// Fraction lost (of 256) under which the link is fine: 2 %.
pub const LOSS_LOW: u8 = 5;
/// Least time between two moves down.
/// Measured through a kernel `tbf` (tests/simulcast.rs): after a switch down, the queue built
/// up by the old layer and the retransmissions its losses are asked for keep the loss high for
/// about 3 s even when the new layer fits; 2 s moved subscribers one layer too far.
pub const SETTLE: Duration = Duration::from_secs(4);
/// The first wait before probing a layer up; doubled by each failed probe. A probe that fails
/// costs about a second of heavy loss (until the next report), so not too often.
pub const PROBE_FIRST: Duration = Duration::from_secs(8);
pub const PROBE_MAX: Duration = Duration::from_secs(64);
/// Longest a move down waits for its switch to complete before another may follow: a switch
/// waits for a keyframe of the lower layer, and if none comes the link must not be left
/// overloaded forever.
pub const SWITCH_MAX: Duration = Duration::from_secs(8);
/// Loss this soon after a probe blames the probe.
pub const PROBE_WINDOW: Duration = Duration::from_secs(4);

#[derive(Debug, Clone)]
pub struct Downlink {
    layers: u8,
    /// 0: video paused; n: layers below n allowed (n = `layers`: no cap).
    level: u8,
    /// The last move down, or the end of the switch it caused, whichever is later.
    last_down: Option<Instant>,
    /// A move down whose switch has not completed yet (since when): the loss reported meanwhile
    /// is still the old layer's.
    pending: Option<Instant>,
    /// Since when the reports have been good (or, paused, since the pause).
    good_since: Option<Instant>,
    last_probe: Option<Instant>,
    probe_after: Duration,
}

/// What the subscriber may get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    /// Any layer (no cap).
    Any,
    /// At most this layer.
    AtMost(u8),
    /// No video.
    Paused,
}

impl Downlink {
    pub fn new(layers: u8) -> Self {
        let layers = layers.max(1);
        Self {
            layers,
            level: layers,
            last_down: None,
            pending: None,
            good_since: None,
            last_probe: None,
            probe_after: PROBE_FIRST,
        }
    }

    /// The same controller over `layers` rungs, now at `level` (0: paused), keeping its
    /// timers (a shared downlink whose tracks changed, `sfu::allocation`).
    pub fn resize(&mut self, layers: u8, level: u8, now: Instant) {
        self.layers = layers.max(1);
        self.level = level.min(self.layers);
        if self.level == 0 {
            // Paused: no packets, so no reports; probe from here (as after a move down).
            self.good_since.get_or_insert(now);
        }
    }

    /// No report has come for a while although the caller expected some (a shared downlink
    /// whose flowing tracks all went quiet: muted, removed): count the silence as a good
    /// link, as while paused, so what is held back is probed again. Returns the new cap if it
    /// changed.
    pub fn idle(&mut self, now: Instant) -> Option<Cap> {
        let before = self.cap();
        self.good_since.get_or_insert(now);
        self.maybe_probe(now);
        (self.cap() != before).then(|| self.cap())
    }

    pub fn cap(&self) -> Cap {
        match self.level {
            0 => Cap::Paused,
            l if l >= self.layers => Cap::Any,
            l => Cap::AtMost(l - 1),
        }
    }

    /// The forwarder finished a switch this cap asked for (it now sends the layer it was
    /// heading for): loss from now on is the new layer's.
    pub fn switched(&mut self, now: Instant) {
        if self.last_down.is_some() {
            self.last_down = Some(now);
        }
        self.pending = None;
    }

    pub fn probe_after(&self) -> Duration {
        self.probe_after
    }

    /// A receiver report arrived with `fraction_lost` (of 256). Returns the new cap if it
    /// changed.
    pub fn report(&mut self, fraction_lost: u8, now: Instant) -> Option<Cap> {
        let before = self.cap();
        if fraction_lost > LOSS_HIGH {
            self.good_since = None;
            // Measured behind a `tbf` (tests/simulcast.rs): the lower layer's keyframe can take
            // seconds to come, and counting the settle time from the move rather than from the
            // switch took subscribers a second layer down while still on the first.
            let settled = self.last_down.is_none_or(|t| now >= t + SETTLE)
                && self.pending.is_none_or(|t| now >= t + SWITCH_MAX);
            if self.level > 0 && settled {
                if self.last_probe.is_some_and(|t| now < t + PROBE_WINDOW) {
                    self.probe_after = (self.probe_after * 2).min(PROBE_MAX);
                    self.last_probe = None;
                }
                self.level -= 1;
                self.last_down = Some(now);
                self.pending = Some(now);
                if self.level == 0 {
                    // Paused: no packets, so no more loss; probe from here.
                    self.good_since = Some(now);
                }
            }
        } else if fraction_lost <= LOSS_LOW {
            if self.last_probe.is_some_and(|t| now >= t + PROBE_WINDOW) {
                // The probed layer held: the link carries it.
                self.probe_after = PROBE_FIRST;
                self.last_probe = None;
            }
            self.good_since.get_or_insert(now);
            self.maybe_probe(now);
        } else {
            // Between the marks: hold, and do not count towards a probe.
            self.good_since = None;
        }
        (self.cap() != before).then(|| self.cap())
    }

    /// The delay-based estimate says the link is queueing now (`peer::bwe`): what is sent
    /// outruns what it carries, and loss is on its way (a queue overflows) or the picture
    /// lags. Judged as a report of heavy loss: one layer down, with the same settle times, and
    /// no probe while it lasts. Said every tick while it lasts. Returns the new cap if it
    /// changed.
    pub fn congested(&mut self, now: Instant) -> Option<Cap> {
        if self.level == 0 {
            // Video is paused: what queues is the rest (audio), and the verdict may be old.
            // Probing the video again is how to find out: as time passing while paused.
            return self.tick(now);
        }
        self.report(u8::MAX, now)
    }

    /// Time passes with no report (none come while video is paused). Returns the new cap if
    /// it changed.
    pub fn tick(&mut self, now: Instant) -> Option<Cap> {
        if self.level != 0 {
            return None;
        }
        let before = self.cap();
        self.maybe_probe(now);
        (self.cap() != before).then(|| self.cap())
    }

    fn maybe_probe(&mut self, now: Instant) {
        if self.level >= self.layers {
            return;
        }
        let Some(since) = self.good_since else { return };
        let quiet_since = self.last_probe.map_or(since, |p| p.max(since));
        if now >= quiet_since + self.probe_after {
            self.level += 1;
            self.last_probe = Some(now);
            self.pending = None;
            // The next probe needs its own good stretch after this one.
            self.good_since = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BAD: u8 = 80; // ~31 %
    const GOOD: u8 = 0;

    #[test]
    fn heavy_loss_moves_down_one_layer_per_settle_time_then_pauses() {
        let t0 = Instant::now();
        let mut d = Downlink::new(3);
        assert_eq!(d.cap(), Cap::Any);
        assert_eq!(d.report(BAD, t0), Some(Cap::AtMost(1)));
        d.switched(t0);
        // Reports right after the switch still see the old layer's loss: no second step.
        assert_eq!(d.report(BAD, t0 + Duration::from_secs(1)), None);
        assert_eq!(d.report(BAD, t0 + SETTLE), Some(Cap::AtMost(0)));
        d.switched(t0 + SETTLE);
        assert_eq!(d.report(BAD, t0 + SETTLE * 2), Some(Cap::Paused));
        assert_eq!(d.report(BAD, t0 + SETTLE * 3), None);
    }

    #[test]
    fn loss_while_a_switch_completes_is_not_held_against_the_new_layer() {
        let t0 = Instant::now();
        let mut d = Downlink::new(3);
        assert_eq!(d.report(BAD, t0), Some(Cap::AtMost(1)));
        // The new layer's keyframe arrives 1.5 s later; its burst shows in the next reports.
        let done = t0 + Duration::from_millis(1500);
        d.switched(done);
        assert_eq!(d.report(BAD, t0 + SETTLE), None);
        assert_eq!(
            d.report(BAD, done + SETTLE - Duration::from_millis(1)),
            None
        );
        assert_eq!(d.report(BAD, done + SETTLE), Some(Cap::AtMost(0)));
    }

    #[test]
    fn no_second_step_down_while_the_first_switch_is_pending() {
        let t0 = Instant::now();
        let mut d = Downlink::new(3);
        assert_eq!(d.report(BAD, t0), Some(Cap::AtMost(1)));
        // The lower layer's keyframe is slow: the subscriber still gets the top layer, and its
        // loss says nothing about the layer it is moving to.
        assert_eq!(d.report(BAD, t0 + SETTLE), None);
        assert_eq!(d.report(BAD, t0 + SETTLE + Duration::from_secs(2)), None);
        d.switched(t0 + Duration::from_secs(7));
        assert_eq!(d.report(BAD, t0 + Duration::from_secs(8)), None);
        assert_eq!(
            d.report(BAD, t0 + Duration::from_secs(7) + SETTLE),
            Some(Cap::AtMost(0))
        );
        // A switch that never completes does not hold forever.
        let t1 = t0 + Duration::from_secs(20);
        assert_eq!(d.report(BAD, t1 + SWITCH_MAX), Some(Cap::Paused));
    }

    #[test]
    fn moderate_loss_holds_and_small_loss_is_fine() {
        let t0 = Instant::now();
        let mut d = Downlink::new(3);
        for s in 0..30 {
            assert_eq!(d.report(12, t0 + Duration::from_secs(s)), None);
        }
        assert_eq!(d.cap(), Cap::Any);
    }

    #[test]
    fn a_good_link_is_probed_up_one_layer_at_a_time() {
        let t0 = Instant::now();
        let mut d = Downlink::new(3);
        d.report(BAD, t0);
        d.switched(t0);
        d.report(BAD, t0 + SETTLE);
        assert_eq!(d.cap(), Cap::AtMost(0));
        let mut ups = vec![];
        for s in 5..40 {
            if let Some(c) = d.report(GOOD, t0 + Duration::from_secs(s)) {
                ups.push((s, c));
            }
        }
        // Good from 5 s: the first probe after 8 s of it, the next after 8 s more.
        assert_eq!(ups, vec![(13, Cap::AtMost(1)), (21, Cap::Any)]);
    }

    #[test]
    fn a_failed_probe_goes_back_and_waits_twice_as_long() {
        let t0 = Instant::now();
        let mut d = Downlink::new(2);
        d.report(BAD, t0);
        assert_eq!(d.cap(), Cap::AtMost(0));
        assert_eq!(
            d.report(GOOD, t0 + Duration::from_secs(3)),
            None,
            "good from 3 s"
        );
        assert_eq!(d.report(GOOD, t0 + Duration::from_secs(11)), Some(Cap::Any));
        // The probe loses packets: back down, next probe waits 16 s of good reports.
        assert_eq!(
            d.report(BAD, t0 + Duration::from_secs(12)),
            Some(Cap::AtMost(0))
        );
        assert_eq!(d.probe_after(), PROBE_FIRST * 2);
        assert_eq!(d.report(GOOD, t0 + Duration::from_secs(13)), None);
        assert_eq!(d.report(GOOD, t0 + Duration::from_secs(28)), None);
        assert_eq!(d.report(GOOD, t0 + Duration::from_secs(29)), Some(Cap::Any));
        // This one holds: the wait goes back to the first.
        d.report(GOOD, t0 + Duration::from_secs(34));
        assert_eq!(d.probe_after(), PROBE_FIRST);
    }

    #[test]
    fn a_queueing_link_moves_down_and_holds_back_probes_while_it_lasts() {
        let t0 = Instant::now();
        let mut d = Downlink::new(3);
        assert_eq!(d.congested(t0), Some(Cap::AtMost(1)));
        d.switched(t0);
        // Still queueing while the old layer's tail drains: no second step before settling.
        assert_eq!(d.congested(t0 + Duration::from_millis(100)), None);
        // The reports say no loss, but the queue grew until 3 s: probing waits for 8 s of
        // a link that is neither losing nor queueing.
        for ms in (200..3000).step_by(100) {
            assert_eq!(d.report(GOOD, t0 + Duration::from_millis(ms)), None);
            assert_eq!(d.congested(t0 + Duration::from_millis(ms)), None);
        }
        for s in 3..11 {
            assert_eq!(d.report(GOOD, t0 + Duration::from_secs(s)), None, "{s} s");
        }
        assert_eq!(d.report(GOOD, t0 + Duration::from_secs(11)), Some(Cap::Any));
        // The probe makes the queue grow: back down, and the next probe waits twice as long.
        assert_eq!(
            d.congested(t0 + Duration::from_millis(11_500)),
            Some(Cap::AtMost(1))
        );
        assert_eq!(d.probe_after(), PROBE_FIRST * 2);
    }

    #[test]
    fn a_queueing_link_does_not_keep_paused_video_from_being_probed() {
        let t0 = Instant::now();
        let mut d = Downlink::new(1);
        assert_eq!(d.congested(t0), Some(Cap::Paused));
        for ms in (100..8000).step_by(100) {
            assert_eq!(d.congested(t0 + Duration::from_millis(ms)), None);
        }
        assert_eq!(d.congested(t0 + Duration::from_secs(8)), Some(Cap::Any));
    }

    #[test]
    fn paused_video_is_probed_again_without_reports() {
        let t0 = Instant::now();
        let mut d = Downlink::new(1);
        assert_eq!(d.report(BAD, t0), Some(Cap::Paused));
        assert_eq!(d.tick(t0 + Duration::from_secs(7)), None);
        assert_eq!(d.tick(t0 + Duration::from_secs(8)), Some(Cap::Any));
        // A single-layer track: Any is its only layer.
        assert_eq!(d.cap(), Cap::Any);
    }
}
