//! Simulcast layer forwarding for one subscriber track, sans-IO.
//!
//! A simulcast publisher sends the same video as 2-3 independent RTP streams ("layers", by rid),
//! each with its own SSRC, sequence numbers and timestamp base. A subscriber must see ONE stream:
//! one SSRC, sequence numbers without holes except real loss, timestamps that keep advancing, and
//! a layer change only where its decoder can follow (a keyframe of the new layer). A
//! [`LayerForwarder`] turns the layers into that stream: per packet it says forward (with the
//! rewritten sequence number and timestamp) or drop, and when to ask the publisher for a keyframe
//! on which layer. It also maps an output sequence number back to (layer, input sequence number)
//! so a NACK from the subscriber can be served from the right layer.
//!
//! No I/O, no clock of its own: the caller passes `now`. Design follows LiveKit's
//! `pkg/sfu/forwarder.go` + `rtpmunger.go` (offsets per forwarded run of one layer, sender reports
//! to carry timestamps across a switch) and mediasoup's `SimulcastConsumer.cpp` (switch only on a
//! keyframe of the target layer, keep the current one until then).
//!
//! Rules, each pinned by a test below:
//! - The output is made of *segments*: runs of one layer with a fixed sequence-number offset and a
//!   fixed timestamp offset. A new segment starts only at the first packet of a keyframe, and its
//!   first sequence number is the last one sent + 1. Packets of layers not being forwarded never
//!   touch the output numbering, so they cannot create holes.
//! - Inside a segment the input spacing is kept: a hole in the output is a packet the publisher's
//!   layer lost, which the subscriber may NACK and [`LayerForwarder::nack_source`] maps back.
//! - A switch to the target layer waits for its keyframe while the current layer keeps flowing;
//!   keyframe requests for it go out at most once per `keyframe_request_interval`.
//! - A layer with no packet for `layer_timeout` is gone (the publisher stopped it, e.g. Chrome
//!   shedding its top layer on a weak uplink). If it is the one being forwarded, the first
//!   keyframe of any live layer at or below the target takes over.
//! - Target `None` pauses: everything is dropped until a target is set again, then the stream
//!   resumes at a keyframe with the next sequence number and a timestamp advanced by the pause.
//!   A video track's allocator pauses it when even the lowest layer does not fit; audio tracks
//!   (one layer, every packet flagged as a keyframe) simply keep their target.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::SenderReport;

/// How many output sequence numbers back a NACK can be mapped and a late packet accepted: about
/// 4 s of a 720p layer, longer than any retransmission is useful for.
pub const HISTORY: u64 = 1024;

/// A jump in a layer's sequence numbers larger than this (either way) is a restart of that layer
/// (publisher re-created its encoder or stream), not loss or reordering.
const MAX_SEQ_JUMP: u64 = 4096;

/// Extended sequence numbers start here so that going back from the first packet never needs
/// negative numbers.
const EXT_BASE: u64 = 1 << 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayerError {
    #[error("layer {layer} does not exist (the track has {layers})")]
    UnknownLayer { layer: u8, layers: u8 },
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Number of simulcast layers (1 for a plain track), index 0 = lowest quality.
    pub layers: u8,
    /// RTP clock rate of the codec (90000 for video).
    pub clock_rate: u32,
    pub keyframe_request_interval: Duration,
    /// A layer without packets for this long counts as stopped.
    pub layer_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            layers: 3,
            clock_rate: 90_000,
            keyframe_request_interval: Duration::from_millis(500),
            layer_timeout: Duration::from_secs(1),
        }
    }
}

/// The header fields the forwarder needs from one incoming packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketInfo {
    /// Layer index (from the packet's SSRC → rid mapping), 0 = lowest.
    pub layer: u8,
    pub seq: u16,
    pub timestamp: u32,
    /// First packet of a keyframe (see `media::rtp_keyframe`).
    pub keyframe: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send with these header values (and the subscriber track's one SSRC).
    Forward {
        seq: u16,
        timestamp: u32,
    },
    Drop(DropReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Target is `None`.
    Paused,
    /// Nothing is being forwarded yet (start, resume, stopped layer) and this packet is no
    /// keyframe we may start on.
    WaitingForKeyframe,
    /// Another layer is being forwarded.
    OtherLayer,
    /// A late packet of the current layer from before the current segment, or older than
    /// [`HISTORY`]: its output number could collide with one already used.
    TooLate,
    /// This output sequence number was already sent (duplicate or FEC/RTX copy).
    Duplicate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: Verdict,
    /// Ask the publisher for a keyframe on this layer now (already throttled).
    pub keyframe_request: Option<u8>,
}

#[derive(Debug, Default, Clone)]
struct Layer {
    /// Extended sequence number of the newest packet seen.
    highest: Option<u64>,
    last_seen: Option<Instant>,
    sender_report: Option<SenderReport>,
    last_keyframe_request: Option<Instant>,
}

/// A run of one layer in the output: out = in + (out_start - in_start), ts_out = ts_in + ts_offset.
#[derive(Debug, Clone, Copy)]
struct Segment {
    layer: u8,
    in_start: u64,
    out_start: u64,
    ts_offset: u32,
}

/// The newest packet sent (late packets never update it).
#[derive(Debug, Clone, Copy)]
struct LastOut {
    seq: u64,
    ts: u32,
    at: Instant,
}

#[derive(Debug)]
pub struct LayerForwarder {
    cfg: Config,
    layers: Vec<Layer>,
    target: Option<u8>,
    /// Layer being forwarded; `None` at start and while paused. Its segment is `segments.back()`.
    current: Option<u8>,
    /// Newest last; the newest output packet always belongs to `segments.back()`. Older ones are
    /// kept while they cover the last [`HISTORY`] output numbers, for NACK mapping.
    segments: VecDeque<Segment>,
    last_out: Option<LastOut>,
    /// Which of the last [`HISTORY`] output numbers were sent, indexed by `seq % HISTORY`.
    sent: [u64; (HISTORY / 64) as usize],
    /// Smoothed timestamp step between consecutive frames on the output, for switches without
    /// usable sender reports.
    frame_interval: u32,
}

impl LayerForwarder {
    pub fn new(cfg: Config) -> Self {
        let cfg = Config {
            layers: cfg.layers.max(1),
            clock_rate: cfg.clock_rate.max(1),
            ..cfg
        };
        Self {
            layers: vec![Layer::default(); usize::from(cfg.layers)],
            target: None,
            current: None,
            segments: VecDeque::new(),
            last_out: None,
            sent: [0; (HISTORY / 64) as usize],
            // 30 fps until the stream tells otherwise.
            frame_interval: (cfg.clock_rate / 30).max(1),
            cfg,
        }
    }

    pub fn target(&self) -> Option<u8> {
        self.target
    }

    /// The output number where the current run of one layer began (at a switch, or a resume
    /// after a pause): packets below it are another layer's, which the subscriber no longer
    /// needs retransmitted (`peer::nack_floor`). Before the first switch it is the first
    /// packet's number, below which nothing was sent.
    pub fn switch_floor(&self) -> Option<u16> {
        self.segments.back().map(|s| s.out_start as u16)
    }

    /// The layer being forwarded now (`None`: nothing yet, or paused).
    pub fn current(&self) -> Option<u8> {
        self.current
    }

    /// Set the wanted layer (`None` pauses). Returns a keyframe request to send now, if the
    /// switch needs one and the throttle allows it.
    pub fn set_target(
        &mut self,
        target: Option<u8>,
        now: Instant,
    ) -> Result<Option<u8>, LayerError> {
        if let Some(t) = target {
            self.check_layer(t)?;
        }
        self.target = target;
        if target.is_none() {
            // Pause at once: the next video packet is dropped, whatever its layer.
            self.current = None;
        }
        Ok(self.keyframe_request(now))
    }

    /// Record a layer's latest RTCP sender report (the NTP ↔ RTP mapping of its clock).
    pub fn set_sender_report(&mut self, layer: u8, sr: SenderReport) -> Result<(), LayerError> {
        let i = self.check_layer(layer)?;
        self.layers[i].sender_report = Some(sr);
        Ok(())
    }

    /// The layer a switch is heading for: the target if it is sending, else the best live layer
    /// below it, else the target anyway (nothing below is live; wait for it).
    pub fn effective_target(&self, now: Instant) -> Option<u8> {
        let t = self.target?;
        if self.alive(t, now) {
            return Some(t);
        }
        Some((0..t).rev().find(|&l| self.alive(l, now)).unwrap_or(t))
    }

    /// The sender report of the layer being forwarded, moved onto the output's timestamps
    /// (`rtp_time` + the segment's offset): what a subscriber that syncs this video with other
    /// tracks (the bridge's lip sync) must use, since the output may run on any layer's clock.
    /// `None` while nothing is forwarded or that layer has sent no report yet.
    pub fn output_sender_report(&self) -> Option<SenderReport> {
        let seg = self.segments.back()?;
        if self.current != Some(seg.layer) {
            return None;
        }
        let sr = self.layers.get(usize::from(seg.layer))?.sender_report?;
        Some(SenderReport {
            ntp_time: sr.ntp_time,
            rtp_time: sr.rtp_time.wrapping_add(seg.ts_offset),
        })
    }

    /// Map an output sequence number (from a subscriber's NACK) to the layer and input sequence
    /// number it stands for, if it is within the last [`HISTORY`] numbers. Numbers the output
    /// skipped (the publisher's layer lost them) map too: that is what a NACK asks for.
    pub fn nack_source(&self, out_seq: u16) -> Option<(u8, u16)> {
        let last = self.last_out?;
        let back = (last.seq as u16).wrapping_sub(out_seq);
        if u64::from(back) >= HISTORY {
            return None; // too old, or ahead of anything sent
        }
        let x = last.seq - u64::from(back);
        let seg = self.segments.iter().rev().find(|s| s.out_start <= x)?;
        Some((seg.layer, (seg.in_start + (x - seg.out_start)) as u16))
    }

    /// One incoming packet of any layer.
    pub fn push(&mut self, p: &PacketInfo, now: Instant) -> Result<Outcome, LayerError> {
        let li = self.check_layer(p.layer)?;
        let (ext, newest, restarted) = self.track_layer(li, p.seq, now);
        let verdict = self.decide(p, ext, newest, restarted, now);
        Ok(Outcome {
            verdict,
            keyframe_request: self.keyframe_request(now),
        })
    }

    fn check_layer(&self, layer: u8) -> Result<usize, LayerError> {
        if layer < self.cfg.layers {
            Ok(usize::from(layer))
        } else {
            Err(LayerError::UnknownLayer {
                layer,
                layers: self.cfg.layers,
            })
        }
    }

    fn alive(&self, layer: u8, now: Instant) -> bool {
        self.layers
            .get(usize::from(layer))
            .and_then(|l| l.last_seen)
            .is_some_and(|t| now.saturating_duration_since(t) <= self.cfg.layer_timeout)
    }

    /// Extend a layer's sequence number. Returns (extended seq, is it the layer's newest packet,
    /// did the layer restart).
    fn track_layer(&mut self, li: usize, seq: u16, now: Instant) -> (u64, bool, bool) {
        let layer = &mut self.layers[li];
        layer.last_seen = Some(now);
        let Some(h) = layer.highest else {
            let e = EXT_BASE + u64::from(seq);
            layer.highest = Some(e);
            return (e, true, false);
        };
        let fwd = seq.wrapping_sub(h as u16);
        let delta = i64::from(fwd as i16);
        if delta.unsigned_abs() > MAX_SEQ_JUMP {
            // Re-anchor ahead: a restarted stream is new, never "late".
            let e = h + u64::from(fwd);
            layer.highest = Some(e);
            (e, true, true)
        } else if delta > 0 {
            let e = h + delta.unsigned_abs();
            layer.highest = Some(e);
            (e, true, false)
        } else {
            (h.saturating_sub(delta.unsigned_abs()), false, false)
        }
    }

    fn decide(
        &mut self,
        p: &PacketInfo,
        ext: u64,
        newest: bool,
        restarted: bool,
        now: Instant,
    ) -> Verdict {
        if self.target.is_none() {
            return Verdict::Drop(DropReason::Paused);
        }
        let Some(eff) = self.effective_target(now) else {
            return Verdict::Drop(DropReason::Paused);
        };
        if self.current != Some(p.layer) && p.keyframe && newest {
            // Planned switch: the keyframe of the layer we are heading for.
            let planned = p.layer == eff;
            // Rescue: nothing flows (start, resume, current layer stopped); any live layer not
            // above the goal is better than a frozen picture, and the planned switch follows.
            let idle = !self.current.is_some_and(|c| self.alive(c, now));
            if planned || (idle && p.layer <= eff) {
                self.start_segment(p, ext, now);
            }
        } else if restarted && self.current == Some(p.layer) {
            // The old offsets mean nothing for a restarted stream; continue the numbering from
            // here. (The publisher's restart begins with a keyframe in practice.)
            self.start_segment(p, ext, now);
        }
        match self.current {
            Some(c) if c == p.layer => self.forward_current(p, ext, now),
            Some(_) => Verdict::Drop(DropReason::OtherLayer),
            None => Verdict::Drop(DropReason::WaitingForKeyframe),
        }
    }

    /// Begin a run of `p.layer` at packet `p`: next output number, and a timestamp that follows
    /// the last one sent.
    fn start_segment(&mut self, p: &PacketInfo, ext: u64, now: Instant) {
        let (out_start, ts_out) = match self.last_out {
            // First packet ever: keep the publisher's numbers, so a single-layer track passes
            // through unchanged.
            None => (ext, p.timestamp),
            Some(last) => (last.seq + 1, self.switch_timestamp(p, last, now)),
        };
        self.segments.push_back(Segment {
            layer: p.layer,
            in_start: ext,
            out_start,
            ts_offset: ts_out.wrapping_sub(p.timestamp),
        });
        self.current = Some(p.layer);
    }

    /// The output timestamp of the first packet of a new segment.
    ///
    /// Best: the same instant on the sender's wallclock as the previous layer's timeline. Both
    /// layers' sender reports map RTP to that wallclock, so the new layer's timestamp converts to
    /// the old layer's clock and then through the old segment's offset. Same layer again (resume,
    /// restart): its own clock, no report needed. The result is taken only if it moves forward and
    /// not further than the time that really passed (plus slack): stale reports or a publisher's
    /// pacer holding back a big keyframe must not make the timestamps jump or go back.
    /// Otherwise: last timestamp + max(one frame interval, time elapsed since the last packet).
    fn switch_timestamp(&self, p: &PacketInfo, last: LastOut, now: Instant) -> u32 {
        let clock = u64::from(self.cfg.clock_rate);
        let elapsed = now.saturating_duration_since(last.at);
        let elapsed_ticks = (elapsed.as_nanos() * u128::from(clock) / 1_000_000_000)
            .min(u128::from(u32::MAX / 4)) as u64;
        let step = elapsed_ticks.max(u64::from(self.frame_interval));
        let fallback = last.ts.wrapping_add(step as u32);

        let Some(prev) = self.segments.back() else {
            return fallback;
        };
        let in_prev_clock = if prev.layer == p.layer {
            Some(p.timestamp)
        } else {
            let new_sr = self.layers[usize::from(p.layer)].sender_report;
            let old_sr = self.layers[usize::from(prev.layer)].sender_report;
            new_sr.zip(old_sr).map(|(n, o)| {
                // NTP is 32.32 fixed point; the difference of the two reports' instants in ticks.
                let ntp_delta = i128::from(n.ntp_time) - i128::from(o.ntp_time);
                let ticks = (ntp_delta * i128::from(clock)) >> 32;
                p.timestamp
                    .wrapping_sub(n.rtp_time)
                    .wrapping_add(o.rtp_time)
                    .wrapping_add(ticks as u32)
            })
        };
        if let Some(ts) = in_prev_clock {
            let candidate = ts.wrapping_add(prev.ts_offset);
            let ahead = candidate.wrapping_sub(last.ts) as i32;
            if ahead > 0 && (ahead as u64) <= step + clock / 2 {
                return candidate;
            }
            // At or just behind the last timestamp: the frame we switch on was already sent
            // from the old layer (layers carry the same frames), or the publisher's pacer held
            // the big keyframe back. One tick on keeps the clock true and still makes it a new
            // frame (H.264 receivers split frames where the timestamp changes). LiveKit does the
            // same below 50 ms.
            if ahead <= 0 && u64::from(ahead.unsigned_abs()) <= clock / 20 {
                return last.ts.wrapping_add(1);
            }
        }
        fallback
    }

    fn forward_current(&mut self, p: &PacketInfo, ext: u64, now: Instant) -> Verdict {
        let Some(seg) = self.segments.back().copied() else {
            return Verdict::Drop(DropReason::WaitingForKeyframe);
        };
        if ext < seg.in_start {
            // Sent before this run began, when its number range belonged to another layer.
            return Verdict::Drop(DropReason::TooLate);
        }
        let out = seg.out_start + (ext - seg.in_start);
        let ts = p.timestamp.wrapping_add(seg.ts_offset);
        match self.last_out {
            Some(last) if out <= last.seq => {
                // Late (reordered or retransmitted) packet of this run: it fills a hole the run
                // left, unless that number is out of the window or already sent.
                if out + HISTORY <= last.seq {
                    return Verdict::Drop(DropReason::TooLate);
                }
                if self.was_sent(out) {
                    return Verdict::Drop(DropReason::Duplicate);
                }
                self.mark_sent(out);
            }
            last => {
                if let Some(last) = last {
                    // Holes between the last number and this one are loss: clear their bits
                    // (left from HISTORY numbers ago) so late copies can fill them.
                    for s in (last.seq + 1..out).rev().take(HISTORY as usize) {
                        self.clear_sent(s);
                    }
                    let step = ts.wrapping_sub(last.ts);
                    let same_run = out > seg.out_start;
                    if same_run
                        && out == last.seq + 1
                        && step > 0
                        && step <= self.cfg.clock_rate / 2
                    {
                        // Consecutive packets, new frame: learn the frame interval (7/8 smoothing).
                        self.frame_interval =
                            ((u64::from(self.frame_interval) * 7 + u64::from(step)) / 8).max(1)
                                as u32;
                    }
                }
                self.mark_sent(out);
                self.last_out = Some(LastOut {
                    seq: out,
                    ts,
                    at: now,
                });
                self.prune_segments(out);
            }
        }
        Verdict::Forward {
            seq: out as u16,
            timestamp: ts,
        }
    }

    fn prune_segments(&mut self, last_seq: u64) {
        // Drop the oldest run once the next one starts outside the window (nothing of the oldest
        // is mappable any more). Bounded count too, against a flapping target.
        while self.segments.len() > 1
            && (self.segments[1].out_start + HISTORY <= last_seq || self.segments.len() > 64)
        {
            self.segments.pop_front();
        }
    }

    fn keyframe_request(&mut self, now: Instant) -> Option<u8> {
        let eff = self.effective_target(now)?;
        if self.current == Some(eff) {
            return None;
        }
        let interval = self.cfg.keyframe_request_interval;
        let layer = self.layers.get_mut(usize::from(eff))?;
        if layer
            .last_keyframe_request
            .is_some_and(|t| now.saturating_duration_since(t) < interval)
        {
            return None;
        }
        layer.last_keyframe_request = Some(now);
        Some(eff)
    }

    fn bit(seq: u64) -> (usize, u64) {
        let i = seq % HISTORY;
        ((i / 64) as usize, 1 << (i % 64))
    }

    fn was_sent(&self, seq: u64) -> bool {
        let (w, b) = Self::bit(seq);
        self.sent[w] & b != 0
    }

    fn mark_sent(&mut self, seq: u64) {
        let (w, b) = Self::bit(seq);
        self.sent[w] |= b;
    }

    fn clear_sent(&mut self, seq: u64) {
        let (w, b) = Self::bit(seq);
        self.sent[w] &= !b;
    }
}

/// The layer for a subscriber that shows the track at most `width` x `height` (its tile): the
/// lowest layer whose known picture size covers both, else the top layer. A layer whose size is
/// not known yet (no keyframe seen, or not H.264) is never picked below the top; the caller
/// asks again when sizes become known. `sizes` is low → high; an empty slice answers 0.
pub fn layer_for_size(sizes: &[Option<(u32, u32)>], width: u32, height: u32) -> u8 {
    let top = sizes.len().saturating_sub(1);
    let i = sizes
        .iter()
        .position(|s| s.is_some_and(|(w, h)| w >= width && h >= height))
        .unwrap_or(top);
    u8::try_from(i).unwrap_or(u8::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 30 fps at 90 kHz.
    const FI: u32 = 3000;
    const FRAME: Duration = Duration::from_micros(33_333);
    /// Capture wallclock of frame 0, NTP 32.32.
    const NTP0: u64 = 3_900_000_000 << 32;

    /// A simulcast publisher: every layer encodes the same frames, each with its own sequence
    /// numbers and timestamp base (as Chrome does), two packets per frame.
    struct Sim {
        t0: Instant,
        seq: Vec<u16>,
        base: Vec<u32>,
    }

    impl Sim {
        fn new() -> Self {
            Self {
                t0: Instant::now(),
                seq: vec![100, 20_000, 65_500],
                base: vec![1_000, 2_000_000_000, u32::MAX - 5 * FI],
            }
        }

        fn at(&self, n: u32) -> Instant {
            self.t0 + FRAME * n
        }

        /// The report each layer would send: frame 0 at NTP0 on its own clock.
        fn sr(&self, layer: u8) -> SenderReport {
            SenderReport {
                ntp_time: NTP0,
                rtp_time: self.base[usize::from(layer)],
            }
        }

        fn frame(&mut self, layer: u8, n: u32, keyframe: bool) -> Vec<PacketInfo> {
            let l = usize::from(layer);
            (0..2)
                .map(|i| {
                    let seq = self.seq[l];
                    self.seq[l] = seq.wrapping_add(1);
                    PacketInfo {
                        layer,
                        seq,
                        timestamp: self.base[l].wrapping_add(n.wrapping_mul(FI)),
                        keyframe: keyframe && i == 0,
                    }
                })
                .collect()
        }
    }

    #[derive(Default)]
    struct Log {
        /// (layer, out seq, out ts, frame) of every forwarded packet, in order.
        out: Vec<(u8, u16, u32, u32)>,
        requests: Vec<(u32, u8)>,
    }

    /// Push frame `n` of `layers` (in that order), keyframes on `kf`. As with a real publisher, a
    /// frame of the old layer may go out before the new layer's keyframe of the same frame.
    fn step(
        f: &mut LayerForwarder,
        sim: &mut Sim,
        log: &mut Log,
        n: u32,
        layers: &[u8],
        kf: &[u8],
    ) {
        for &l in layers {
            for p in sim.frame(l, n, kf.contains(&l)) {
                let o = f.push(&p, sim.at(n)).unwrap();
                if let Verdict::Forward { seq, timestamp } = o.verdict {
                    log.out.push((l, seq, timestamp, n));
                }
                if let Some(r) = o.keyframe_request {
                    log.requests.push((n, r));
                }
            }
        }
    }

    fn fwd(sim: &Sim, target: u8) -> LayerForwarder {
        let mut f = LayerForwarder::new(Config::default());
        f.set_target(Some(target), sim.t0).unwrap();
        f
    }

    fn assert_seq_continuous(out: &[(u8, u16, u32, u32)]) {
        for w in out.windows(2) {
            assert_eq!(
                w[1].1,
                w[0].1.wrapping_add(1),
                "sequence hole or repeat: {w:?}"
            );
        }
    }

    /// No holes, and timestamps never back and never more than two frames ahead.
    fn assert_continuous(out: &[(u8, u16, u32, u32)]) {
        assert_seq_continuous(out);
        for w in out.windows(2) {
            let dt = w[1].2.wrapping_sub(w[0].2);
            assert!(dt <= 2 * FI, "timestamp jump {dt}: {w:?}");
        }
    }

    fn first_of(out: &[(u8, u16, u32, u32)], layer: u8) -> usize {
        out.iter().position(|o| o.0 == layer).unwrap()
    }

    #[test]
    fn single_layer_passes_through_unchanged() {
        let mut sim = Sim::new();
        let mut f = LayerForwarder::new(Config {
            layers: 1,
            ..Config::default()
        });
        assert_eq!(f.set_target(Some(0), sim.t0).unwrap(), Some(0));
        let mut log = Log::default();
        step(&mut f, &mut sim, &mut log, 0, &[0], &[]);
        assert!(log.out.is_empty(), "started before a keyframe");
        for n in 1..5 {
            step(
                &mut f,
                &mut sim,
                &mut log,
                n,
                &[0],
                if n == 1 { &[0] } else { &[] },
            );
        }
        // Starts at the keyframe with the publisher's own numbers.
        assert_eq!(log.out[0], (0, 102, 1_000 + FI, 1));
        assert_eq!(log.out.len(), 8);
        assert_continuous(&log.out);
    }

    #[test]
    fn no_switch_before_the_target_keyframe_and_continuity_up_and_down() {
        let mut sim = Sim::new();
        let mut f = fwd(&sim, 0);
        for l in 0..3 {
            f.set_sender_report(l, sim.sr(l)).unwrap();
        }
        let mut log = Log::default();
        step(&mut f, &mut sim, &mut log, 0, &[0, 1, 2], &[0, 1, 2]);
        assert_eq!(f.current(), Some(0));
        // Up: the target changes, layer 0 keeps flowing until layer 2's keyframe (frame 10).
        f.set_target(Some(2), sim.at(1)).unwrap();
        for n in 1..20 {
            step(
                &mut f,
                &mut sim,
                &mut log,
                n,
                &[0, 1, 2],
                if n == 10 { &[1, 2] } else { &[] },
            );
            assert_eq!(f.current(), Some(if n < 10 { 0 } else { 2 }), "frame {n}");
        }
        // Down at frame 30 (layer 0 keyframe at 25 comes too early: target still 2).
        for n in 20..30 {
            step(
                &mut f,
                &mut sim,
                &mut log,
                n,
                &[0, 1, 2],
                if n == 25 { &[0] } else { &[] },
            );
        }
        f.set_target(Some(0), sim.at(30)).unwrap();
        for n in 30..40 {
            step(
                &mut f,
                &mut sim,
                &mut log,
                n,
                &[0, 1, 2],
                if n == 33 { &[0] } else { &[] },
            );
        }
        assert_eq!(f.current(), Some(0));
        // Two packets per frame, nothing lost, no holes: layer 0 frames 0..=10, layer 2 from its
        // keyframe (frame 10, which layer 0 had already sent) to 32, layer 0 again from 33.
        assert_continuous(&log.out);
        let layers: Vec<u8> = log.out.iter().map(|o| o.0).collect();
        assert_eq!(&layers[..22], &[0; 22]);
        assert_eq!(&layers[22..68], &[2; 46]);
        assert_eq!(&layers[68..], &[0; 14]);
        assert_eq!(log.out[22].3, 10);
        // With sender reports the output clock is the first layer's clock throughout, one tick
        // late from the switch to layer 2 on: its first frame had already gone out from layer 0,
        // so it got last + 1 (and the way back carries that tick along).
        for (i, o) in log.out.iter().enumerate() {
            let tick = u32::from(i >= 22);
            assert_eq!(o.2, 1_000 + o.3 * FI + tick, "{o:?}");
        }
    }

    #[test]
    fn timestamps_without_sender_reports_advance_one_frame_interval() {
        let mut sim = Sim::new();
        let mut f = fwd(&sim, 0);
        let mut log = Log::default();
        step(&mut f, &mut sim, &mut log, 0, &[0, 1], &[0]);
        for n in 1..10 {
            step(&mut f, &mut sim, &mut log, n, &[0, 1], &[]);
        }
        f.set_target(Some(1), sim.at(10)).unwrap();
        step(&mut f, &mut sim, &mut log, 10, &[0, 1], &[1]);
        assert_eq!(f.current(), Some(1));
        let i = first_of(&log.out, 1);
        let (before, after) = (log.out[i - 1], log.out[i]);
        assert_eq!((before.0, before.3, after.3), (0, 10, 10));
        assert_eq!(after.1, before.1.wrapping_add(1));
        assert_eq!(after.2, before.2 + FI, "learned 30 fps step");
        assert_continuous(&log.out);
    }

    #[test]
    fn implausible_sender_reports_fall_back_to_the_frame_interval() {
        let mut sim = Sim::new();
        let mut f = fwd(&sim, 0);
        f.set_sender_report(0, sim.sr(0)).unwrap();
        // Layer 1's report is 10 s off (stale or wrong): mapped timestamp would jump.
        let mut bad = sim.sr(1);
        bad.ntp_time += 10 << 32;
        f.set_sender_report(1, bad).unwrap();
        let mut log = Log::default();
        step(&mut f, &mut sim, &mut log, 0, &[0, 1], &[0]);
        for n in 1..5 {
            step(&mut f, &mut sim, &mut log, n, &[0, 1], &[]);
        }
        f.set_target(Some(1), sim.at(5)).unwrap();
        step(&mut f, &mut sim, &mut log, 5, &[0, 1], &[1]);
        let i = first_of(&log.out, 1);
        assert_eq!(log.out[i].2, log.out[i - 1].2 + FI);
        // And one 1 s behind maps backwards: also refused.
        let mut f = fwd(&sim, 0);
        f.set_sender_report(0, sim.sr(0)).unwrap();
        let mut behind = sim.sr(1);
        behind.ntp_time -= 1 << 32;
        f.set_sender_report(1, behind).unwrap();
        let mut log = Log::default();
        step(&mut f, &mut sim, &mut log, 6, &[0, 1], &[0]);
        f.set_target(Some(1), sim.at(7)).unwrap();
        step(&mut f, &mut sim, &mut log, 7, &[0, 1], &[1]);
        let i = first_of(&log.out, 1);
        assert_eq!(log.out[i].2, log.out[i - 1].2 + FI);
    }

    #[test]
    fn keyframe_requests_are_throttled_per_layer() {
        let mut sim = Sim::new();
        let mut f = fwd(&sim, 0);
        let mut log = Log::default();
        step(&mut f, &mut sim, &mut log, 0, &[0, 1], &[0]);
        // The first request (start) was for layer 0 when the target was set.
        log.requests.clear();
        assert_eq!(f.set_target(Some(1), sim.at(1)).unwrap(), Some(1));
        // 29 frames (~1 s) without a layer-1 keyframe: re-asked every 500 ms, not per packet.
        for n in 1..30 {
            step(&mut f, &mut sim, &mut log, n, &[0, 1], &[]);
        }
        let frames: Vec<u32> = log.requests.iter().map(|r| r.0).collect();
        assert!(log.requests.iter().all(|r| r.1 == 1));
        // Set at frame 1; frame 16 is 499.995 ms later, frame 17 the first one past 500 ms.
        assert_eq!(frames, vec![17], "one retry after 500 ms, then wait");
        step(&mut f, &mut sim, &mut log, 30, &[0, 1], &[1]);
        assert_eq!(f.current(), Some(1));
        // Once there, no more requests.
        log.requests.clear();
        for n in 31..60 {
            step(&mut f, &mut sim, &mut log, n, &[0, 1], &[]);
        }
        assert!(log.requests.is_empty());
    }

    #[test]
    fn sequence_and_timestamp_wrap_across_switches() {
        let mut sim = Sim::new();
        // Layer 2 starts at seq 65500 and timestamp 5 frames before u32 wrap.
        let mut f = fwd(&sim, 2);
        for l in 0..3 {
            f.set_sender_report(l, sim.sr(l)).unwrap();
        }
        let mut log = Log::default();
        for n in 0..60 {
            let kf: &[u8] = match n {
                0 => &[2],
                40 => &[0],
                _ => &[],
            };
            if n == 20 {
                f.set_target(Some(0), sim.at(n)).unwrap();
            }
            step(&mut f, &mut sim, &mut log, n, &[0, 2], kf);
        }
        assert_eq!(log.out[0], (2, 65_500, u32::MAX - 5 * FI, 0));
        assert_continuous(&log.out);
        // Output seq passed 65535 → 0; timestamps passed u32::MAX → small.
        assert!(log.out.iter().any(|o| o.1 == 65_535) && log.out.iter().any(|o| o.1 == 0));
        assert!(log.out.iter().any(|o| o.2 < FI * 100));
        assert_eq!(log.out[first_of(&log.out, 0)].3, 40);
        // NACK across the wrap maps back to layer 2.
        assert_eq!(f.nack_source(65_535), Some((2, 65_535)));
        assert_eq!(f.nack_source(0), Some((2, 0)));
    }

    #[test]
    fn late_and_duplicate_packets_of_the_current_layer() {
        let sim = Sim::new();
        let mut f = fwd(&sim, 0);
        let at = sim.at(0);
        let p = |layer: u8, seq: u16, keyframe: bool| PacketInfo {
            layer,
            seq,
            timestamp: 1_000 + u32::from(seq) * 10,
            keyframe,
        };
        let fw = |o: Outcome| match o.verdict {
            Verdict::Forward { seq, timestamp } => Some((seq, timestamp)),
            Verdict::Drop(_) => None,
        };
        assert_eq!(fw(f.push(&p(0, 10, true), at).unwrap()), Some((10, 1_100)));
        // 11 and 12 lost, 13 arrives: the hole stays (real loss, NACKable).
        assert_eq!(fw(f.push(&p(0, 13, false), at).unwrap()), Some((13, 1_130)));
        assert_eq!(f.nack_source(11), Some((0, 11)));
        // 12 arrives late: rewritten the same way, filling its own hole.
        assert_eq!(fw(f.push(&p(0, 12, false), at).unwrap()), Some((12, 1_120)));
        // Its duplicate (e.g. a retransmission that also made it) is dropped.
        assert_eq!(
            f.push(&p(0, 12, false), at).unwrap().verdict,
            Verdict::Drop(DropReason::Duplicate)
        );
        assert_eq!(
            f.push(&p(0, 13, false), at).unwrap().verdict,
            Verdict::Drop(DropReason::Duplicate)
        );
        // Packets from before the first keyframe never go out.
        assert_eq!(
            f.push(&p(0, 9, false), at).unwrap().verdict,
            Verdict::Drop(DropReason::TooLate)
        );
        // Switch to layer 1 (seq 500 ↦ 14); then layer 0's late 11 and layer 1's pre-switch 499
        // must not take numbers of the new run.
        f.set_target(Some(1), at).unwrap();
        f.push(&p(1, 498, false), at).unwrap();
        assert!(fw(f.push(&p(1, 500, true), at).unwrap()).is_some_and(|o| o.0 == 14));
        assert_eq!(
            f.push(&p(0, 11, false), at).unwrap().verdict,
            Verdict::Drop(DropReason::OtherLayer)
        );
        assert_eq!(
            f.push(&p(1, 499, false), at).unwrap().verdict,
            Verdict::Drop(DropReason::TooLate)
        );
        // Layer 1: 502 before 501; 501 gets 15, 502 got 16.
        assert!(fw(f.push(&p(1, 502, false), at).unwrap()).is_some_and(|o| o.0 == 16));
        assert!(fw(f.push(&p(1, 501, false), at).unwrap()).is_some_and(|o| o.0 == 15));
        // Far too late for the window.
        for s in 503..503 + HISTORY as u16 + 10 {
            f.push(&p(1, s, false), at).unwrap();
        }
        f.push(&p(1, 300, false), at).unwrap();
        assert_eq!(
            f.push(&p(1, 503, false), at).unwrap().verdict,
            Verdict::Drop(DropReason::TooLate)
        );
    }

    #[test]
    fn nack_maps_output_numbers_to_their_layer() {
        let mut sim = Sim::new();
        let mut f = fwd(&sim, 0);
        let mut log = Log::default();
        step(&mut f, &mut sim, &mut log, 0, &[0, 1], &[0]);
        step(&mut f, &mut sim, &mut log, 1, &[0, 1], &[]);
        f.set_target(Some(1), sim.at(2)).unwrap();
        step(&mut f, &mut sim, &mut log, 2, &[0, 1], &[1]);
        step(&mut f, &mut sim, &mut log, 3, &[0, 1], &[]);
        // Layer 0 sent 100..=105 (frames 0..=2) unchanged; layer 1 from its frame-2 keyframe
        // (20_004) on as 106..
        assert_eq!(log.out[5], (0, 105, 1_000 + 2 * FI, 2));
        assert_eq!(log.out[6].1, 106);
        assert_eq!(f.nack_source(101), Some((0, 101)));
        assert_eq!(f.nack_source(105), Some((0, 105)));
        assert_eq!(f.nack_source(106), Some((1, 20_004)));
        assert_eq!(f.nack_source(109), Some((1, 20_007)));
        // Not sent yet, or before anything was sent.
        assert_eq!(f.nack_source(110), None);
        assert_eq!(f.nack_source(99), None);
        // Out of the window after HISTORY more packets.
        for n in 4..(4 + HISTORY as u32 / 2 + 1) {
            step(&mut f, &mut sim, &mut log, n, &[1], &[]);
        }
        assert_eq!(f.nack_source(106), None);
        assert!(f.segments.len() == 1, "old runs pruned");
        let last = log.out.last().unwrap().1;
        assert!(f.nack_source(last).is_some_and(|s| s.0 == 1));
    }

    #[test]
    fn pause_drops_video_and_resume_continues_at_a_keyframe() {
        let mut sim = Sim::new();
        let mut f = fwd(&sim, 1);
        for l in 0..2 {
            f.set_sender_report(l, sim.sr(l)).unwrap();
        }
        let mut log = Log::default();
        step(&mut f, &mut sim, &mut log, 0, &[0, 1], &[1]);
        step(&mut f, &mut sim, &mut log, 1, &[0, 1], &[]);
        log.requests.clear();
        assert_eq!(f.set_target(None, sim.at(2)).unwrap(), None);
        for n in 2..62 {
            step(&mut f, &mut sim, &mut log, n, &[0, 1], &[0, 1]);
        }
        assert_eq!(log.out.len(), 4, "nothing while paused, keyframes included");
        assert!(log.requests.is_empty(), "no keyframe requests while paused");
        let p = sim.frame(1, 62, false)[0];
        assert_eq!(
            f.push(&p, sim.at(62)).unwrap().verdict,
            Verdict::Drop(DropReason::Paused)
        );
        // Resume on the lower layer: asks for its keyframe, waits for it.
        assert_eq!(f.set_target(Some(0), sim.at(63)).unwrap(), Some(0));
        step(&mut f, &mut sim, &mut log, 63, &[0, 1], &[]);
        assert_eq!(log.out.len(), 4);
        step(&mut f, &mut sim, &mut log, 64, &[0, 1], &[0]);
        assert_eq!(log.out.len(), 6);
        let (before, after) = (log.out[3], log.out[4]);
        assert_eq!(after.0, 0);
        assert_eq!(after.1, before.1.wrapping_add(1), "no hole for the pause");
        // The timestamp moved by the 63 frames the pause lasted (sender reports agree).
        assert_eq!(after.2.wrapping_sub(before.2), 63 * FI);
    }

    #[test]
    fn resume_without_sender_reports_advances_by_the_elapsed_time() {
        let mut sim = Sim::new();
        let mut f = fwd(&sim, 0);
        let mut log = Log::default();
        step(&mut f, &mut sim, &mut log, 0, &[0, 1], &[0]);
        f.set_target(None, sim.at(1)).unwrap();
        f.set_target(Some(1), sim.at(30)).unwrap();
        step(&mut f, &mut sim, &mut log, 30, &[0, 1], &[1]);
        let dt = log.out[2].2.wrapping_sub(log.out[1].2);
        // 30 frames of 33.333 ms at 90 kHz, within a tick of rounding.
        assert!((89_990..=90_000).contains(&dt), "{dt}");
        assert_eq!(log.out[2].1, log.out[1].1.wrapping_add(1));
    }

    #[test]
    fn stopped_layer_falls_back_to_any_live_layer_keyframe() {
        let mut sim = Sim::new();
        let mut f = fwd(&sim, 2);
        let mut log = Log::default();
        step(&mut f, &mut sim, &mut log, 0, &[0, 1, 2], &[2]);
        for n in 1..10 {
            step(&mut f, &mut sim, &mut log, n, &[0, 1, 2], &[]);
        }
        assert_eq!(f.current(), Some(2));
        log.requests.clear();
        // The publisher drops layer 2. For 1 s (layer_timeout) nothing changes; then a
        // keyframe of layer 1 is asked for, and layer 0's keyframe (which came first) is taken.
        for n in 10..40 {
            step(&mut f, &mut sim, &mut log, n, &[0, 1], &[]);
        }
        assert_eq!(f.current(), Some(2));
        assert_eq!(f.effective_target(sim.at(40)), Some(1));
        step(&mut f, &mut sim, &mut log, 40, &[0, 1], &[0]);
        assert_eq!(f.current(), Some(0));
        assert_eq!(log.requests.first().map(|r| r.1), Some(1));
        // No hole; the timestamp moved by the 31 frames the picture stood still.
        assert_seq_continuous(&log.out);
        let i = first_of(&log.out, 0);
        let dt = log.out[i].2.wrapping_sub(log.out[i - 1].2);
        assert!((31 * FI - 1..=31 * FI).contains(&dt), "{dt}");
        // Then up to the best live one, layer 1, at its keyframe.
        step(&mut f, &mut sim, &mut log, 41, &[0, 1], &[1]);
        assert_eq!(f.current(), Some(1));
        assert_continuous(&log.out[i..]);
        // Layer 2 comes back: the target is live again, switch up at its keyframe.
        step(&mut f, &mut sim, &mut log, 42, &[0, 1, 2], &[]);
        assert_eq!(f.effective_target(sim.at(42)), Some(2));
        step(&mut f, &mut sim, &mut log, 43, &[0, 1, 2], &[2]);
        assert_eq!(f.current(), Some(2));
        assert_continuous(&log.out[i..]);
    }

    #[test]
    fn start_takes_a_lower_layer_when_the_target_is_not_sending() {
        let mut sim = Sim::new();
        let mut f = fwd(&sim, 2);
        let mut log = Log::default();
        // Only layers 0 and 1 are sent (the publisher's uplink is weak).
        step(&mut f, &mut sim, &mut log, 0, &[0, 1], &[0]);
        assert_eq!(f.current(), Some(0));
        step(&mut f, &mut sim, &mut log, 1, &[0, 1], &[1]);
        assert_eq!(f.current(), Some(1));
        // Layer 0's keyframe must not pull it back down.
        step(&mut f, &mut sim, &mut log, 2, &[0, 1], &[0]);
        assert_eq!(f.current(), Some(1));
        assert_continuous(&log.out);
    }

    #[test]
    fn restarted_layer_keeps_the_numbering_continuous() {
        let mut sim = Sim::new();
        let mut f = fwd(&sim, 0);
        let mut log = Log::default();
        step(&mut f, &mut sim, &mut log, 0, &[0], &[0]);
        step(&mut f, &mut sim, &mut log, 1, &[0], &[]);
        sim.seq[0] = sim.seq[0].wrapping_add(30_000);
        step(&mut f, &mut sim, &mut log, 2, &[0], &[]);
        assert_eq!(log.out.len(), 6);
        assert_continuous(&log.out);
    }

    #[test]
    fn size_requests_pick_the_smallest_covering_layer() {
        let sizes = [Some((320, 180)), Some((640, 360)), Some((1280, 720))];
        assert_eq!(layer_for_size(&sizes, 320, 180), 0);
        assert_eq!(layer_for_size(&sizes, 100, 100), 0);
        assert_eq!(layer_for_size(&sizes, 321, 180), 1);
        assert_eq!(layer_for_size(&sizes, 640, 361), 2);
        // Bigger than anything: the top layer.
        assert_eq!(layer_for_size(&sizes, 4000, 4000), 2);
        // Unknown sizes are skipped; all unknown means the top.
        assert_eq!(layer_for_size(&[None, Some((640, 360)), None], 10, 10), 1);
        assert_eq!(layer_for_size(&[None, None, None], 10, 10), 2);
        assert_eq!(layer_for_size(&[], 10, 10), 0);
    }

    #[test]
    fn unknown_layers_are_errors_not_panics() {
        let mut f = LayerForwarder::new(Config {
            layers: 2,
            ..Config::default()
        });
        let now = Instant::now();
        let err = LayerError::UnknownLayer {
            layer: 2,
            layers: 2,
        };
        assert_eq!(f.set_target(Some(2), now), Err(err.clone()));
        let sr = SenderReport {
            ntp_time: 0,
            rtp_time: 0,
        };
        assert_eq!(
            f.set_sender_report(7, sr),
            Err(LayerError::UnknownLayer {
                layer: 7,
                layers: 2
            })
        );
        let p = PacketInfo {
            layer: 2,
            seq: 0,
            timestamp: 0,
            keyframe: true,
        };
        assert_eq!(f.push(&p, now), Err(err));
        assert_eq!(f.nack_source(0), None);
    }

    /// Random targets, keyframes, pauses and stopped layers over in-order input: the output
    /// sequence never repeats or goes back, has no holes (nothing was lost), and every packet
    /// sent maps back to itself through `nack_source`.
    #[test]
    fn randomized_switching_keeps_output_sequence_strictly_increasing() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        for seed in 0..20u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut sim = Sim::new();
            let mut f = fwd(&sim, rng.random_range(0..3));
            let mut with_sr = [false; 3];
            let mut sending = [true; 3];
            let mut last: Option<(u16, u32)> = None;
            for n in 0..3_000u32 {
                let now = sim.at(n);
                if rng.random_bool(0.02) {
                    let t = if rng.random_bool(0.15) {
                        None
                    } else {
                        Some(rng.random_range(0..3))
                    };
                    f.set_target(t, now).unwrap();
                }
                if rng.random_bool(0.01) {
                    let l = rng.random_range(0..3usize);
                    sending[l] = !sending[l];
                }
                for l in 0..3u8 {
                    if !with_sr[usize::from(l)] && rng.random_bool(0.05) {
                        with_sr[usize::from(l)] = true;
                        f.set_sender_report(l, sim.sr(l)).unwrap();
                    }
                    if !sending[usize::from(l)] {
                        continue;
                    }
                    let kf = rng.random_bool(0.05);
                    for p in sim.frame(l, n, kf) {
                        let o = f.push(&p, now).unwrap();
                        if let Verdict::Forward { seq, timestamp } = o.verdict {
                            if let Some((ls, lt)) = last {
                                assert_eq!(seq, ls.wrapping_add(1), "seed {seed} frame {n}");
                                let dt = timestamp.wrapping_sub(lt) as i32;
                                assert!(dt >= 0, "timestamp back, seed {seed} frame {n}");
                            }
                            assert_eq!(f.nack_source(seq), Some((p.layer, p.seq)));
                            last = Some((seq, timestamp));
                        }
                    }
                }
            }
            assert!(last.is_some(), "seed {seed} never forwarded");
        }
    }

    /// The bridge syncs video to audio through the forwarded layer's sender report: moved onto
    /// the output timestamps, it must map them to the same wallclock whichever layer flows.
    #[test]
    fn output_sender_report_follows_the_forwarded_layer() {
        let t0 = Instant::now();
        let mut f = LayerForwarder::new(Config::default());
        f.set_target(Some(2), t0).unwrap();
        assert_eq!(f.output_sender_report(), None, "nothing forwarded");
        let ntp = 3_900_000_000u64 << 32;
        // Same instant on both layers' clocks; different timestamp bases.
        let sr0 = SenderReport {
            ntp_time: ntp,
            rtp_time: 1000,
        };
        let sr2 = SenderReport {
            ntp_time: ntp,
            rtp_time: 50_000,
        };
        f.set_sender_report(0, sr0).unwrap();
        f.set_sender_report(2, sr2).unwrap();
        let key = |layer, seq, timestamp| PacketInfo {
            layer,
            seq,
            timestamp,
            keyframe: true,
        };
        // Layer 0's keyframe comes first: the output starts on its clock.
        f.push(&key(0, 10, 1000), t0).unwrap();
        assert_eq!(f.current(), Some(0));
        assert_eq!(f.output_sender_report(), Some(sr0));
        // The top layer's keyframe a frame later: its report, moved onto the output
        // timestamps, is the same mapping (the output kept layer 0's clock).
        let o = f
            .push(&key(2, 500, 53_000), t0 + Duration::from_millis(33))
            .unwrap();
        assert_eq!(f.current(), Some(2));
        let Verdict::Forward { timestamp, .. } = o.verdict else {
            panic!("{o:?}");
        };
        assert_eq!(timestamp, 4000);
        assert_eq!(f.output_sender_report(), Some(sr0));
    }
}
