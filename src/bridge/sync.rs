//! Putting every input on the bridge's one output clock (sans-IO).
//!
//! Audio is the master of each participant: its decoded PCM goes through a playout buffer that
//! absorbs network and scheduling jitter (it starts playing once `target` samples are buffered,
//! and goes back to buffering after an underrun), and it knows the RTP timestamp of the sample
//! being played. A participant's pictures wait in a [`VideoQueue`] and the compositor shows the
//! newest picture that is not ahead of the audio being played, so lips stay with the voice:
//! - with RTCP sender reports for both tracks, "not ahead" compares the sender's NTP times of the
//!   picture and of the audio sample (exact, whatever the two tracks' network paths did);
//! - before the first reports (about a second), it compares arrival times, delaying video by the
//!   audio buffer's current depth;
//! - with no audio (or audio buffering) the newest picture is shown at once.
//!
//! Mixing several participants needs no common timestamp: each buffer plays at the output's
//! sample rate from its own start, so every voice is delayed by about `target`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::sfu::SenderReport;

/// NTP time (32.32 fixed point, as in an RTCP sender report) of `rtp`, given a report of the
/// same stream and its clock rate, in seconds.
pub fn ntp_seconds(sr: SenderReport, rtp: u32, clock_rate: u32) -> f64 {
    let base = (sr.ntp_time >> 32) as f64 + (sr.ntp_time & 0xffff_ffff) as f64 / 4_294_967_296.0;
    // Signed distance: a timestamp a little before the report is negative, not 2^32 ahead.
    let delta = rtp.wrapping_sub(sr.rtp_time) as i32;
    base + f64::from(delta) / f64::from(clock_rate.max(1))
}

/// Jitter buffer for one participant's decoded audio (interleaved stereo at the output rate).
#[derive(Debug)]
pub struct PlayoutBuffer {
    samples: VecDeque<i16>,
    /// RTP timestamp of the first frame in `samples` (Opus RTP runs at 48 kHz, like the output).
    head_rtp: u32,
    playing: bool,
    /// Frames (per channel) buffered before playing starts.
    target: usize,
    /// Beyond this many buffered frames the oldest are dropped back to `target` (the sender's
    /// clock runs faster than ours, or a burst arrived after a stall).
    max: usize,
    /// RTP timestamp of the first frame of the last block pulled.
    played_rtp: Option<u32>,
    pub underruns: u64,
    pub dropped: u64,
}

impl PlayoutBuffer {
    pub fn new(target: usize, max: usize) -> Self {
        Self {
            samples: VecDeque::new(),
            head_rtp: 0,
            playing: false,
            target: target.max(1),
            max: max.max(target + 1),
            played_rtp: None,
            underruns: 0,
            dropped: 0,
        }
    }

    /// Frames (per channel) buffered.
    pub fn level(&self) -> usize {
        self.samples.len() / 2
    }

    pub fn is_playing(&self) -> bool {
        self.playing
    }

    /// The RTP timestamp being played now (`None` while buffering).
    pub fn played_rtp(&self) -> Option<u32> {
        self.played_rtp.filter(|_| self.playing)
    }

    /// Append decoded PCM whose first frame has RTP timestamp `rtp`.
    pub fn push(&mut self, rtp: u32, pcm: &[i16]) {
        if self.samples.is_empty() {
            self.head_rtp = rtp;
        } else {
            let expected = self.head_rtp.wrapping_add(self.level() as u32);
            let ahead = rtp.wrapping_sub(expected) as i32;
            if ahead > 0 && (ahead as usize) < self.max {
                // A timestamp jump without lost packets (discontinuous transmission): the
                // sender was silent for that long.
                self.samples
                    .extend(std::iter::repeat_n(0, ahead as usize * 2));
            } else if ahead != 0 {
                // A new timeline (publisher restarted, or a jump too large to fill): keep
                // playing continuously and re-anchor the head on the new timestamps.
                self.head_rtp = rtp.wrapping_sub(self.level() as u32);
            }
        }
        self.samples.extend(pcm);
        let level = self.level();
        if level > self.max {
            let drop = level - self.target;
            self.samples.drain(..drop * 2);
            self.head_rtp = self.head_rtp.wrapping_add(drop as u32);
            self.dropped += drop as u64;
        }
    }

    /// Take `frames` frames for the mixer (interleaved stereo); silence while buffering.
    pub fn pull(&mut self, frames: usize) -> Vec<i16> {
        let mut out = vec![0i16; frames * 2];
        if !self.playing {
            if self.level() < self.target {
                return out;
            }
            self.playing = true;
        }
        let take = self.level().min(frames);
        let first = self.head_rtp;
        for (o, s) in out.iter_mut().zip(self.samples.drain(..take * 2)) {
            *o = s;
        }
        self.head_rtp = self.head_rtp.wrapping_add(take as u32);
        // The block starts playing now: its first frame is what the output hears at this time.
        self.played_rtp = Some(first);
        if take < frames {
            // Ran dry: the rest of this block is silence; refill to `target` before playing on,
            // so one late packet does not turn into a stutter on every block.
            self.playing = false;
            self.underruns += 1;
        }
        out
    }
}

/// A decoded picture waiting for its turn.
#[derive(Debug)]
pub struct Timed<P> {
    pub picture: P,
    pub rtp: u32,
    pub arrived: Instant,
}

/// How far the compositor may show a participant's video.
#[derive(Debug, Clone, Copy)]
pub enum ShowUntil {
    /// Pictures whose sender NTP time is at most this (seconds).
    Ntp(f64),
    /// Pictures that arrived at or before this instant.
    Arrived(Instant),
    /// Everything: no audio to wait for.
    Latest,
}

impl ShowUntil {
    /// Whether a picture with RTP timestamp `rtp` that arrived at `arrived` is due.
    pub fn allows(
        self,
        arrived: Instant,
        rtp: u32,
        video_sr: Option<SenderReport>,
        clock_rate: u32,
    ) -> bool {
        match self {
            ShowUntil::Latest => true,
            ShowUntil::Arrived(t) => arrived <= t,
            ShowUntil::Ntp(t) => match video_sr {
                Some(sr) => ntp_seconds(sr, rtp, clock_rate) <= t,
                None => true,
            },
        }
    }
}

/// One participant's decoded pictures, oldest first, and the one on screen.
#[derive(Debug)]
pub struct VideoQueue<P> {
    queue: VecDeque<Timed<P>>,
    capacity: usize,
    shown: Option<P>,
    /// Arrival of the picture that went on screen in the last `show`, if a new one did.
    newly_shown: Option<Instant>,
}

impl<P: Clone> VideoQueue<P> {
    pub fn new(capacity: usize) -> Self {
        Self {
            queue: VecDeque::new(),
            capacity: capacity.max(1),
            shown: None,
            newly_shown: None,
        }
    }

    pub fn push(&mut self, t: Timed<P>) {
        if self.queue.len() == self.capacity
            && let Some(old) = self.queue.pop_front()
        {
            // Audio stalled for longer than the queue holds: show what would be dropped, so
            // the picture stays as recent as memory allows.
            self.shown = Some(old.picture);
        }
        self.queue.push_back(t);
    }

    /// Advance to the newest picture allowed by `until` and return what is on screen (the last
    /// good picture if nothing new is due).
    pub fn show(
        &mut self,
        until: ShowUntil,
        video_sr: Option<SenderReport>,
        clock_rate: u32,
    ) -> Option<P> {
        self.newly_shown = None;
        while let Some(front) = self.queue.front() {
            if !until.allows(front.arrived, front.rtp, video_sr, clock_rate) {
                break;
            }
            if let Some(f) = self.queue.pop_front() {
                self.shown = Some(f.picture);
                self.newly_shown = Some(f.arrived);
            }
        }
        self.shown.clone()
    }

    /// Put `picture` on screen at once and forget the queue (decoding was off: the queue and
    /// the picture on screen are old, and the newest picture must not wait for lip sync).
    pub fn reset_to(&mut self, picture: P) {
        self.queue.clear();
        self.shown = Some(picture);
        self.newly_shown = None;
    }

    /// When the picture the last `show` put on screen arrived (`None` if it kept the old one).
    pub fn newly_shown(&self) -> Option<Instant> {
        self.newly_shown
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }
}

/// Which pictures of a participant are due, given its audio state.
pub fn show_until(
    audio: Option<&PlayoutBuffer>,
    audio_sr: Option<SenderReport>,
    video_sr: Option<SenderReport>,
    now: Instant,
    sample_rate: u32,
) -> ShowUntil {
    let Some(a) = audio.filter(|a| a.is_playing()) else {
        return ShowUntil::Latest;
    };
    match (a.played_rtp(), audio_sr, video_sr) {
        (Some(rtp), Some(sr), Some(_)) => ShowUntil::Ntp(ntp_seconds(sr, rtp, sample_rate)),
        _ => {
            let depth =
                Duration::from_micros(a.level() as u64 * 1_000_000 / u64::from(sample_rate));
            ShowUntil::Arrived(now.checked_sub(depth).unwrap_or(now))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(n: usize, v: i16) -> Vec<i16> {
        vec![v; n * 2]
    }

    #[test]
    fn ntp_of_rtp_handles_wrap_and_earlier_timestamps() {
        let sr = SenderReport {
            ntp_time: (100u64 << 32) | (1u64 << 31),
            rtp_time: u32::MAX - 479,
        };
        assert!((ntp_seconds(sr, u32::MAX - 479, 48000) - 100.5).abs() < 1e-9);
        // 960 ticks later, across the 32-bit wrap.
        assert!((ntp_seconds(sr, 480, 48000) - 100.52).abs() < 1e-9);
        // 20 ms before the report.
        assert!((ntp_seconds(sr, u32::MAX - 479 - 960, 48000) - 100.48).abs() < 1e-9);
    }

    #[test]
    fn buffers_to_target_then_plays_and_rebuffers_after_underrun() {
        let mut b = PlayoutBuffer::new(1920, 9600);
        b.push(0, &frames(960, 1));
        assert_eq!(b.pull(1024), frames(1024, 0), "still buffering");
        assert_eq!(b.played_rtp(), None);
        b.push(960, &frames(960, 2));
        let out = b.pull(1024);
        assert!(b.is_playing());
        assert_eq!(&out[..1920], &frames(960, 1)[..]);
        assert_eq!(&out[1920..], &frames(64, 2)[..]);
        assert_eq!(b.played_rtp(), Some(0));
        // 896 left; a 1024 pull runs dry: silence after, back to buffering.
        let out = b.pull(1024);
        assert_eq!(out[1791], 2);
        assert_eq!(out[1792], 0);
        assert_eq!(b.underruns, 1);
        assert!(!b.is_playing());
        assert_eq!(b.pull(1024), frames(1024, 0));
    }

    #[test]
    fn timestamp_jump_is_silence_and_overflow_drops_to_target() {
        let mut b = PlayoutBuffer::new(960, 4800);
        b.push(0, &frames(960, 1));
        // DTX: 1920 ticks skipped without a sequence gap.
        b.push(2880, &frames(960, 1));
        assert_eq!(b.level(), 960 * 4);
        // A burst over `max` drops back to `target`, keeping the newest audio.
        b.push(3840, &frames(960, 3));
        b.push(4800, &frames(960, 3));
        assert_eq!(b.level(), 960);
        assert_eq!(b.dropped, 4800);
        let out = b.pull(960);
        assert_eq!(out, frames(960, 3));
        assert_eq!(b.played_rtp(), Some(4800));
        // A new timeline (reconnect) re-anchors without a gap.
        b.push(1_000_000, &frames(960, 4));
        b.push(1_000_960, &frames(960, 4));
        assert_eq!(b.level(), 1920);
        b.pull(960);
        assert_eq!(b.played_rtp(), Some(1_000_000));
    }

    #[test]
    fn video_waits_for_the_audio_it_belongs_with() {
        let t0 = Instant::now();
        let vsr = SenderReport {
            ntp_time: 10u64 << 32,
            rtp_time: 0,
        };
        let mut q = VideoQueue::new(30);
        for k in 0..5u32 {
            q.push(Timed {
                picture: k,
                rtp: k * 3000,
                arrived: t0 + Duration::from_millis(u64::from(k) * 33),
            });
        }
        // Audio plays sender time 10.07 s: pictures at 0, 33 and 66 ms are due.
        assert_eq!(q.show(ShowUntil::Ntp(10.07), Some(vsr), 90000), Some(2));
        assert_eq!(q.queued(), 2);
        assert_eq!(q.newly_shown(), Some(t0 + Duration::from_millis(66)));
        // Nothing newer is due yet: the last picture stays.
        assert_eq!(q.show(ShowUntil::Ntp(10.08), Some(vsr), 90000), Some(2));
        assert_eq!(q.newly_shown(), None);
        assert_eq!(
            q.show(
                ShowUntil::Arrived(t0 + Duration::from_millis(100)),
                None,
                90000
            ),
            Some(3)
        );
        assert_eq!(q.show(ShowUntil::Latest, None, 90000), Some(4));
    }

    #[test]
    fn a_full_queue_advances_instead_of_growing() {
        let t0 = Instant::now();
        let mut q = VideoQueue::new(2);
        for k in 0..5u32 {
            q.push(Timed {
                picture: k,
                rtp: k,
                arrived: t0,
            });
        }
        assert_eq!(q.queued(), 2);
        assert_eq!(q.show(ShowUntil::Ntp(0.0), None, 90000), Some(4));
    }

    #[test]
    fn show_until_prefers_sender_reports() {
        let now = Instant::now();
        let mut a = PlayoutBuffer::new(480, 4800);
        assert!(matches!(
            show_until(Some(&a), None, None, now, 48000),
            ShowUntil::Latest
        ));
        a.push(48000, &frames(1440, 1));
        a.pull(480);
        let sr = SenderReport {
            ntp_time: 5u64 << 32,
            rtp_time: 0,
        };
        match show_until(Some(&a), Some(sr), Some(sr), now, 48000) {
            ShowUntil::Ntp(t) => assert!((t - 6.0).abs() < 1e-9),
            other => panic!("{other:?}"),
        }
        match show_until(Some(&a), Some(sr), None, now, 48000) {
            ShowUntil::Arrived(t) => assert_eq!(now - t, Duration::from_millis(20)),
            other => panic!("{other:?}"),
        }
    }
}
