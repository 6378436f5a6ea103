//! Passing the host's own H.264 to viewers while the host is alone, and switching between that
//! and the mix (sans-IO).
//!
//! A solo room must cost about what a relay costs, so while nobody else is on screen the output
//! carries the host's access units as they came (no decoding, no encoding); the bridge mixes
//! only while co-hosts or a PK partner are shown, or when passing through would hurt viewers
//! (another size, B-frames, parameter sets that changed, a GOP too long for players joining).
//!
//! The stream's one AVC sequence header holds the host's parameter sets (their own ids) and the
//! bridge encoder's (renumbered to free ids), so a switch is only a change of which slices flow
//! and never touches the header. The switch to the mix happens at the next output frame once
//! the host's pictures are decoded (the input decodes the pictures it kept since the last IDR,
//! at once); the encoder starts it with an IDR. The switch back waits for the host's next IDR
//! (asked for). [`Switcher`] decides; [`SourceSets`] checks each access unit; [`PassClock`]
//! puts the host's RTP timestamps on the output clock.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::media::h264::{self, NAL_PPS, NAL_SPS, nal_type, split_annexb};
use crate::media::h264_ids;
use crate::media::rtp_h264::AccessUnit;

/// Why the output is mixed rather than the host passed through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Co-hosts or a PK partner are on screen (or were, less than `bridge.solo_idle` ago).
    Cohosts,
    /// A layout other than `solo` is pinned.
    Layout,
    /// `bridge.passthrough` is off.
    Disabled,
    /// Nobody is on screen, or the one shown publishes no video.
    NoVideo,
    /// The host dropped out: the host-away slate is shown (see `slate`).
    HostAway,
    /// The one on screen is not the host whose parameter sets the stream header holds (or the
    /// stream started without any: no H.264 from the host when it started).
    OtherSource,
    /// The video is not H.264.
    Codec,
    /// The host's picture size is not the output's.
    Resolution,
    /// The host's SPS/PPS differ from the ones in the stream header (a new encoder, a new
    /// size): the header never changes, so its slices cannot be passed on.
    ParametersChanged,
    /// B-frames (the output carries no composition offsets).
    BFrames,
    /// No IDR from the host within `bridge.passthrough_max_gop` (players joining, CDNs cutting
    /// segments need them).
    LongGop,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Cohosts => "cohosts",
            Reason::Layout => "layout",
            Reason::Disabled => "disabled",
            Reason::NoVideo => "no_video",
            Reason::HostAway => "host_away",
            Reason::OtherSource => "other_source",
            Reason::Codec => "codec",
            Reason::Resolution => "resolution",
            Reason::ParametersChanged => "parameters_changed",
            Reason::BFrames => "b_frames",
            Reason::LongGop => "long_gop",
        }
    }
}

/// The host's parameter sets as the stream header holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSets {
    pub sps: Vec<u8>,
    pub pps: Vec<u8>,
    pub sps_id: u32,
    pub pps_id: u32,
    /// Picture size from the SPS.
    pub size: (u32, u32),
}

impl SourceSets {
    /// From an IDR access unit that carries its SPS and PPS (WebRTC senders send them before
    /// every IDR); `None` otherwise.
    pub fn from_idr(au: &AccessUnit) -> Option<Self> {
        if !au.keyframe {
            return None;
        }
        let nals = split_annexb(&au.annexb);
        let sps = nals.iter().find(|n| nal_type(n) == NAL_SPS)?;
        let pps = nals.iter().find(|n| nal_type(n) == NAL_PPS)?;
        let size = h264::sps_dimensions(sps)?;
        let sps_id = h264_ids::sps_id(sps)?;
        let (pps_id, pps_sps) = h264_ids::pps_ids(pps)?;
        if pps_sps != sps_id {
            return None;
        }
        Some(Self {
            sps: sps.to_vec(),
            pps: pps.to_vec(),
            sps_id,
            pps_id,
            size,
        })
    }

    /// Free ids for the bridge encoder's SPS and PPS.
    pub fn free_ids(&self) -> (u32, u32) {
        (
            if self.sps_id == 1 { 2 } else { 1 },
            if self.pps_id == 1 { 2 } else { 1 },
        )
    }

    /// Whether `au` can go into a stream whose header holds these sets: the same parameter
    /// sets in-band (if any), every slice naming this PPS, no B slices. `Ok(true)`: it also
    /// carried those sets in-band (the host's stream is back on them; see [`SourceState`]).
    pub fn check(&self, au: &AccessUnit) -> Result<bool, Reason> {
        let mut carried = false;
        for n in split_annexb(&au.annexb) {
            match nal_type(n) {
                NAL_SPS if n != self.sps.as_slice() => return Err(Reason::ParametersChanged),
                NAL_PPS if n != self.pps.as_slice() => return Err(Reason::ParametersChanged),
                NAL_SPS | NAL_PPS => carried = true,
                1 | 5 => {
                    let h = h264_ids::slice_header(n).ok_or(Reason::ParametersChanged)?;
                    if h.pps_id != self.pps_id {
                        return Err(Reason::ParametersChanged);
                    }
                    if h.is_b() {
                        return Err(Reason::BFrames);
                    }
                }
                _ => {}
            }
        }
        Ok(carried)
    }
}

/// Whether the host's access units can be passed on, unit after unit. Parameter sets hold
/// until new ones come: after an IDR with other SPS/PPS, the P pictures that follow (which
/// carry none) belong to them too, until the header's sets come back in-band.
#[derive(Debug, Default)]
pub struct SourceState {
    /// The host's stream is on parameter sets other than the header's.
    other_sets: bool,
    /// Why the last unit could not be passed on.
    last: Option<Reason>,
}

impl SourceState {
    /// Check the next access unit; `true` if it may be passed on.
    pub fn next(&mut self, sets: &SourceSets, au: &AccessUnit) -> bool {
        match sets.check(au) {
            Err(r) => {
                if r == Reason::ParametersChanged {
                    self.other_sets = true;
                }
                self.last = Some(r);
                false
            }
            Ok(carried) => {
                if carried {
                    self.other_sets = false;
                }
                self.last = self.other_sets.then_some(Reason::ParametersChanged);
                !self.other_sets
            }
        }
    }

    /// Why the host cannot be passed through now, as far as its own stream tells.
    pub fn blocker(&self) -> Option<Reason> {
        self.last
    }
}

/// The host's RTP timestamps on the output clock (milliseconds): spacing from RTP (smooth
/// whatever the network's jitter), anchored to where the output clock wants the picture, and
/// re-anchored when the two drift apart (a pause, a new RTP timeline, a sender clock that runs
/// fast).
#[derive(Debug, Default)]
pub struct PassClock {
    anchor: Option<(i64, u32)>,
}

/// While passing through, the output loop releases the host's pictures every this many AAC
/// blocks of 1024 samples at 48 kHz (64 ms), not at each block: the wake-ups, and the readers'
/// wake-ups for each release, were a tenth of a solo room's CPU (BENCHMARKS.md).
pub const PASS_WAKE_BLOCKS: u64 = 3;
/// A picture is released up to one wake period after its audio was played; the clock is asked
/// for the middle of that period so the error stays within half of it (±32 ms, inside what
/// viewers notice: ITU-R BT.1359 puts the threshold at 45 ms of audio lead).
pub const PASS_RELEASE_LAG_MS: i64 = (PASS_WAKE_BLOCKS as i64 * 1024 * 1000 / 48_000) / 2;
/// How far RTP-derived timestamps may drift from the output clock before re-anchoring: 50 ms
/// of jitter, plus the spread of release times within a wake period.
const MAX_DRIFT_MS: i64 = 50 + 2 * PASS_RELEASE_LAG_MS;

impl PassClock {
    /// Forget the anchor (the output left passthrough).
    pub fn reset(&mut self) {
        self.anchor = None;
    }

    /// Output timestamp of a picture with RTP timestamp `rtp` (90 kHz) that the output clock
    /// would place at `want_ms`.
    pub fn map(&mut self, rtp: u32, want_ms: i64) -> i64 {
        if let Some((ms, base)) = self.anchor {
            let t = ms + i64::from(rtp.wrapping_sub(base) as i32) / 90;
            if (t - want_ms).abs() <= MAX_DRIFT_MS {
                return t;
            }
        }
        self.anchor = Some((want_ms, rtp));
        want_ms
    }
}

/// Which pictures the output carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Path {
    Passthrough,
    Mixing,
}

/// What the output loop must do after [`Switcher::tick`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tick {
    /// The host's input must decode (the mix needs its pictures, or soon will).
    pub decode_source: bool,
    /// Ask the host for an IDR (to switch back to passthrough, or to keep the GOP bounded).
    pub request_keyframe: bool,
    /// The path changed at this tick (to mixing: the encoder must start with an IDR).
    pub switched: bool,
}

/// The passthrough / mixing decision, from one tick of the output loop to the next.
#[derive(Debug)]
pub struct Switcher {
    path: Path,
    /// Why mixing (`None` while passing through).
    reason: Option<Reason>,
    /// A reason to mix is current but the host's pictures are not decoded yet.
    blocker: Option<Reason>,
    /// Mixing, and nothing stands in the way of passthrough: the next IDR of the host switches.
    want_passthrough: bool,
    gop: Duration,
    max_gop: Duration,
    last_idr: Option<Instant>,
    /// The last interval between two IDRs was longer than `max_gop`.
    long_gop: bool,
    last_request: Option<Instant>,
    /// Passing through is unwanted since (waiting for the host's pictures to be decoded).
    blocked_since: Option<Instant>,
    /// After falling back for a long GOP, passing through is tried again only from then.
    long_gop_until: Option<Instant>,
    pub switches: u64,
}

/// How often a keyframe request for switching back is repeated while none comes.
const REQUEST_RETRY: Duration = Duration::from_secs(1);
/// How long the switch to mixing waits for the host's pictures to be decoded before it mixes
/// anyway (the host's video stopped: muted, stalled, another codec), showing what it has.
pub const READY_WAIT: Duration = Duration::from_secs(1);
/// After a fall-back for IDRs too far apart (an encoder that does not answer keyframe
/// requests, e.g. OBS with a long keyframe interval), how long mixing goes on before passing
/// through is tried again.
pub const LONG_GOP_RETRY: Duration = Duration::from_secs(30);

impl Switcher {
    /// Starts on `path` (`reason` if mixing). `gop`: the IDR interval asked of the host while
    /// passing through; `max_gop`: beyond it, passing through stops.
    pub fn new(path: Path, reason: Option<Reason>, gop: Duration, max_gop: Duration) -> Self {
        Self {
            path,
            reason,
            blocker: None,
            want_passthrough: false,
            gop,
            max_gop: max_gop.max(gop),
            last_idr: None,
            long_gop: false,
            last_request: None,
            blocked_since: None,
            long_gop_until: None,
            switches: 0,
        }
    }

    pub fn path(&self) -> Path {
        self.path
    }

    /// Why the output mixes now, or is about to.
    pub fn reason(&self) -> Option<Reason> {
        self.reason.or(self.blocker)
    }

    /// An IDR-interval problem of the host (see [`Reason::LongGop`]) at `now`. Measured only
    /// while passing through (while mixing nobody asks the host for IDRs, so their absence
    /// says nothing); after a fall-back, it holds for [`LONG_GOP_RETRY`].
    pub fn gop_blocker(&self, now: Instant) -> Option<Reason> {
        let long = match self.path {
            Path::Passthrough => {
                self.long_gop
                    || self
                        .last_idr
                        .is_some_and(|t| now.saturating_duration_since(t) > self.max_gop)
            }
            Path::Mixing => self.long_gop_until.is_some_and(|u| now < u),
        };
        long.then_some(Reason::LongGop)
    }

    /// One output-loop tick. `blocker`: why passing through is not wanted or not possible now
    /// (`None`: the host alone and passable); `source_ready`: the host's input has decoded
    /// pictures (or there is no host video to wait for).
    pub fn tick(&mut self, now: Instant, blocker: Option<Reason>, source_ready: bool) -> Tick {
        let mut t = Tick::default();
        match self.path {
            Path::Passthrough => {
                self.blocker = blocker;
                match blocker {
                    Some(r) => {
                        t.decode_source = true;
                        let since = *self.blocked_since.get_or_insert(now);
                        if source_ready || now.saturating_duration_since(since) >= READY_WAIT {
                            self.path = Path::Mixing;
                            self.reason = Some(r);
                            self.blocker = None;
                            self.blocked_since = None;
                            self.switches += 1;
                            t.switched = true;
                            // IDR intervals are measured afresh when passing through again.
                            self.last_idr = None;
                            self.long_gop = false;
                            if r == Reason::LongGop {
                                self.long_gop_until = Some(now + LONG_GOP_RETRY);
                            }
                        }
                    }
                    None => {
                        self.blocked_since = None;
                        // WebRTC senders send IDRs only when asked: ask every `gop`, so that
                        // players joining and CDNs cutting segments find one.
                        let due = self
                            .last_idr
                            .is_none_or(|i| now.saturating_duration_since(i) >= self.gop);
                        if due && self.request_due(now, self.gop) {
                            t.request_keyframe = true;
                        }
                    }
                }
            }
            Path::Mixing => {
                t.decode_source = true;
                self.want_passthrough = blocker.is_none();
                match blocker {
                    Some(r) => self.reason = Some(r),
                    None => {
                        if self.request_due(now, REQUEST_RETRY) {
                            t.request_keyframe = true;
                        }
                    }
                }
            }
        }
        if t.request_keyframe {
            self.last_request = Some(now);
        }
        t
    }

    fn request_due(&self, now: Instant, every: Duration) -> bool {
        self.last_request
            .is_none_or(|r| now.saturating_duration_since(r) >= every)
    }

    /// One access unit of the host that passed [`SourceSets::check`] (`passable`) or not, at
    /// `now`. Returns whether the output carries it; the first carried IDR while mixing
    /// switches to passthrough (`switched` in the returned pair).
    pub fn unit(&mut self, keyframe: bool, passable: bool, now: Instant) -> (bool, bool) {
        if keyframe {
            if self.path == Path::Passthrough
                && let Some(last) = self.last_idr
            {
                self.long_gop = now.saturating_duration_since(last) > self.max_gop;
            }
            self.last_idr = Some(now);
        }
        match self.path {
            Path::Passthrough => (passable, false),
            Path::Mixing => {
                if self.want_passthrough && keyframe && passable {
                    self.path = Path::Passthrough;
                    self.reason = None;
                    self.want_passthrough = false;
                    self.switches += 1;
                    (true, true)
                } else {
                    (false, false)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOP: Duration = Duration::from_secs(2);
    const MAX_GOP: Duration = Duration::from_secs(8);

    #[test]
    fn passes_through_until_a_cohost_then_mixes_once_the_host_is_decoded() {
        let t0 = Instant::now();
        let mut s = Switcher::new(Path::Passthrough, None, GOP, MAX_GOP);
        // Alone: the first tick asks for an IDR (none seen yet), then every GOP.
        let tick = s.tick(t0, None, false);
        assert!(tick.request_keyframe && !tick.decode_source);
        assert_eq!(s.unit(true, true, t0), (true, false));
        assert!(
            !s.tick(t0 + Duration::from_secs(1), None, false)
                .request_keyframe
        );
        assert!(s.tick(t0 + GOP, None, false).request_keyframe);
        // A co-host: decode the host, keep passing through until its pictures are ready.
        let t1 = t0 + Duration::from_secs(3);
        let tick = s.tick(t1, Some(Reason::Cohosts), false);
        assert!(tick.decode_source && !tick.switched);
        assert_eq!(s.path(), Path::Passthrough);
        assert_eq!(s.unit(false, true, t1), (true, false));
        assert_eq!(s.reason(), Some(Reason::Cohosts));
        let tick = s.tick(t1, Some(Reason::Cohosts), true);
        assert!(tick.switched);
        assert_eq!(s.path(), Path::Mixing);
        // Mixing: the host's units are not carried.
        assert_eq!(s.unit(false, true, t1), (false, false));
        assert_eq!(s.unit(true, true, t1), (false, false));
        // Alone again (after solo_idle, the caller's business): ask, switch at the next IDR.
        let t2 = t1 + Duration::from_secs(5);
        let tick = s.tick(t2, None, true);
        assert!(tick.request_keyframe && tick.decode_source && !tick.switched);
        assert_eq!(s.unit(false, true, t2), (false, false));
        assert!(!s.tick(t2, None, true).request_keyframe, "throttled");
        assert!(s.tick(t2 + REQUEST_RETRY, None, true).request_keyframe);
        assert_eq!(s.unit(true, false, t2), (false, false), "not passable");
        assert_eq!(s.unit(true, true, t2), (true, true));
        assert_eq!(s.path(), Path::Passthrough);
        assert_eq!(s.switches, 2);
        assert_eq!(s.reason(), None);
    }

    #[test]
    fn a_long_gop_is_a_reason_to_mix() {
        let t0 = Instant::now();
        let mut s = Switcher::new(Path::Passthrough, None, GOP, MAX_GOP);
        s.unit(true, true, t0);
        assert_eq!(s.gop_blocker(t0 + MAX_GOP), None);
        assert_eq!(
            s.gop_blocker(t0 + MAX_GOP + Duration::from_millis(1)),
            Some(Reason::LongGop)
        );
        // The next IDR came late: still long until an interval within the limit is seen.
        let t1 = t0 + MAX_GOP + Duration::from_secs(1);
        s.unit(true, true, t1);
        assert_eq!(s.gop_blocker(t1), Some(Reason::LongGop));
        s.unit(true, true, t1 + GOP);
        assert_eq!(s.gop_blocker(t1 + GOP), None);
        // A fall-back for a long GOP: mixing goes on for LONG_GOP_RETRY, then passthrough is
        // tried again.
        let t2 = t1 + GOP + MAX_GOP + Duration::from_secs(1);
        assert_eq!(s.gop_blocker(t2), Some(Reason::LongGop));
        assert!(s.tick(t2, Some(Reason::LongGop), true).switched);
        assert_eq!(
            s.gop_blocker(t2 + Duration::from_secs(29)),
            Some(Reason::LongGop)
        );
        assert_eq!(s.gop_blocker(t2 + LONG_GOP_RETRY), None);
    }

    /// Found in review: after a co-host session longer than `max_gop` (nobody asks a WebRTC
    /// host for IDRs while mixing), passing through must still come back.
    #[test]
    fn passthrough_resumes_after_a_long_cohost_session() {
        let t0 = Instant::now();
        let mut s = Switcher::new(Path::Passthrough, None, GOP, MAX_GOP);
        s.unit(true, true, t0);
        assert!(s.tick(t0, Some(Reason::Cohosts), true).switched);
        // A minute of co-hosting without any IDR from the host.
        let t1 = t0 + Duration::from_secs(60);
        assert_eq!(
            s.gop_blocker(t1),
            None,
            "the old IDR says nothing while mixing"
        );
        let tick = s.tick(t1, None, true);
        assert!(tick.request_keyframe);
        // The IDR asked for, late after the last one: the switch happens all the same.
        assert_eq!(s.unit(true, true, t1), (true, true));
        assert_eq!(s.gop_blocker(t1), None);
    }

    /// Found in review: a host whose video stopped (muted, stalled) is never "ready"; the
    /// switch to mixing must not wait for it forever.
    #[test]
    fn mixing_starts_without_the_host_pictures_after_a_while() {
        let t0 = Instant::now();
        let mut s = Switcher::new(Path::Passthrough, None, GOP, MAX_GOP);
        assert!(!s.tick(t0, Some(Reason::Cohosts), false).switched);
        assert!(
            !s.tick(t0 + READY_WAIT / 2, Some(Reason::Cohosts), false)
                .switched
        );
        assert!(
            s.tick(t0 + READY_WAIT, Some(Reason::Cohosts), false)
                .switched
        );
    }

    #[test]
    fn pass_clock_follows_rtp_and_reanchors_on_drift() {
        let mut c = PassClock::default();
        assert_eq!(c.map(90_000, 1000), 1000);
        // 33 ms of RTP later, whatever the arrival jitter.
        assert_eq!(c.map(90_000 + 2970, 1050), 1033);
        assert_eq!(c.map(90_000 + 5940, 1060), 1066);
        // Within the tolerance (jitter plus the spread of a wake period's releases).
        assert_eq!(c.map(90_000 + 8910, 1160), 1099);
        // Drifted too far (or a new timeline): back on the output clock.
        assert_eq!(c.map(90_000 + 11880, 1260), 1260);
        assert_eq!(c.map(5, 1200), 1200);
        // Wrapping RTP timestamps.
        let mut c = PassClock::default();
        assert_eq!(c.map(u32::MAX - 1499, 0), 0);
        assert_eq!(c.map(1500, 33), 33);
        c.reset();
        assert_eq!(c.map(1500, 500), 500);
    }

    #[test]
    fn access_units_are_checked_against_the_header_sets() {
        use openh264::encoder::Encoder;
        use openh264::formats::YUVBuffer;
        let mut enc = Encoder::new().unwrap();
        let au = |bs: Vec<u8>, keyframe| AccessUnit {
            annexb: bs,
            rtp_timestamp: 0,
            keyframe,
        };
        let idr = au(
            enc.encode(&YUVBuffer::new(320, 240)).unwrap().to_vec(),
            true,
        );
        let sets = SourceSets::from_idr(&idr).expect("sets");
        assert_eq!(sets.size, (320, 240));
        assert_eq!((sets.sps_id, sets.pps_id), (0, 0));
        assert_eq!(sets.free_ids(), (1, 1));
        assert_eq!(sets.check(&idr), Ok(true));
        let p = au(
            enc.encode(&YUVBuffer::new(320, 240)).unwrap().to_vec(),
            false,
        );
        assert_eq!(SourceSets::from_idr(&p), None);
        assert_eq!(sets.check(&p), Ok(false));
        // Another size: other parameter sets, and the pictures after them are theirs.
        let mut other = Encoder::new().unwrap();
        let idr2 = au(
            other.encode(&YUVBuffer::new(160, 120)).unwrap().to_vec(),
            true,
        );
        assert_eq!(sets.check(&idr2), Err(Reason::ParametersChanged));
        let p2 = au(
            other.encode(&YUVBuffer::new(160, 120)).unwrap().to_vec(),
            false,
        );
        assert_eq!(sets.check(&p2), Ok(false), "alone it looks fine");
        let mut state = SourceState::default();
        assert!(state.next(&sets, &idr) && state.next(&sets, &p));
        assert!(!state.next(&sets, &idr2));
        assert!(!state.next(&sets, &p2), "still on the other sets");
        assert_eq!(state.blocker(), Some(Reason::ParametersChanged));
        // Back on the header's sets (a new encoder at the first size makes the same ones).
        let mut back = Encoder::new().unwrap();
        let idr3 = au(
            back.encode(&YUVBuffer::new(320, 240)).unwrap().to_vec(),
            true,
        );
        assert!(state.next(&sets, &idr3));
        assert_eq!(state.blocker(), None);
        // A slice naming another PPS.
        let nals = split_annexb(&p.annexb);
        let renamed = h264_ids::renumber_slice(nals[0], 3).unwrap();
        let mut bs = vec![0, 0, 0, 1];
        bs.extend(renamed);
        assert_eq!(sets.check(&au(bs, false)), Err(Reason::ParametersChanged));
        assert_eq!(
            sets.check(&au(vec![0, 0, 1, 0x41], false)),
            Err(Reason::ParametersChanged)
        );
    }
}
