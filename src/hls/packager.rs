//! The sans-IO HLS packager of one stream: FLV tags of the origin in, fMP4 parts and segments
//! out, kept in a bounded sliding window, and the media playlist written from that window.
//! No clocks and no sockets: each tag comes with the wall-clock time (unix ms) it is known to
//! have been produced at, which only feeds `EXT-X-PROGRAM-DATE-TIME`.
//!
//! - A part (LL-HLS partial segment) is one fMP4 fragment (moof+mdat) of the shared muxer, cut
//!   when the next frame would make it longer than the part target, and at every video
//!   keyframe (so a part that starts with one is `INDEPENDENT=YES`).
//! - A segment is its parts back to back, from one keyframe to the first keyframe after the
//!   segment target. A stream whose keyframes are further apart (a passthrough host's encoder)
//!   gets its segment cut at a part boundary before it grows past `EXT-X-TARGETDURATION`
//!   (RFC 8216bis 4.4.3.1 forbids longer ones); such a segment does not start with a keyframe,
//!   which players handle (they decode from the previous one).
//! - A new origin stream (the bridge restarted, an RTMP publisher reconnected), or a changed
//!   sequence header, starts a new segment with `EXT-X-DISCONTINUITY` and a new `EXT-X-MAP`:
//!   the muxer rebases timestamps to 0 for each origin stream, and players must reset their
//!   decoders. Media sequence numbers and part ids keep counting across it.
//!
//! Part ids are global (not per segment), so the `EXT-X-PRELOAD-HINT` of the next part is
//! right even when that part turns out to start a new segment.

use std::collections::VecDeque;
use std::fmt::Write;

use bytes::Bytes;

use crate::media::flv::Tag;
use crate::media::fmp4::{Fragment, Fragmenter, init_segment};

/// What the packager is configured with (from `[hls]`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Segment target (ms): a segment ends at the first keyframe after it.
    pub segment_ms: u64,
    /// Part target (ms): `EXT-X-PART-INF:PART-TARGET`; no part is longer.
    pub part_ms: u64,
    /// Complete segments kept (and listed).
    pub window_segments: usize,
    /// Bytes of media kept at most (complete segments and the open one); the oldest segments
    /// go first. At least one complete segment stays, whatever its size.
    pub max_bytes: usize,
}

impl Settings {
    /// `EXT-X-TARGETDURATION`: the segment target rounded up to whole seconds.
    pub fn target_duration_s(&self) -> u64 {
        self.segment_ms.div_ceil(1000).max(1)
    }
}

#[derive(Debug)]
pub struct Part {
    /// Global part id (URI `part-{run}-{id}.m4s`).
    pub id: u64,
    pub bytes: Bytes,
    pub duration_ms: u64,
    pub independent: bool,
}

#[derive(Debug)]
pub struct Segment {
    pub msn: u64,
    pub parts: Vec<Part>,
    pub duration_ms: u64,
    /// Wall clock (unix ms) of its first frame.
    pub pdt_ms: u64,
    /// Id of the init segment (`EXT-X-MAP`) its fragments need.
    pub init: u64,
    /// Preceded by `EXT-X-DISCONTINUITY`.
    pub discontinuity: bool,
    pub bytes: usize,
}

/// Where a part is: its segment's msn and its index there (`_HLS_msn` / `_HLS_part`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartPos {
    pub msn: u64,
    pub index: usize,
}

/// Answer to a blocking playlist request's `_HLS_msn` / `_HLS_part`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    Yes,
    /// Not yet: wait for the next update.
    Wait,
    /// Further ahead than the spec lets a client ask (RFC 8216bis 6.2.5.2): 400.
    TooFar,
}

/// Answer to a part or segment request.
#[derive(Debug)]
pub enum Lookup {
    Found(Vec<Bytes>),
    /// The next part or the open segment: it will exist soon (preload hint).
    Soon,
    Gone,
}

/// How far ahead of the last part a blocking request may ask (RFC 8216bis: "Advance Part
/// Limit", 3).
const ADVANCE_PART_LIMIT: usize = 3;

pub struct Packager {
    cfg: Settings,
    /// The muxer of the current origin stream; `None` between streams.
    fr: Option<Fragmenter>,
    /// Wall clock (unix ms) of media time 0 of the current origin stream: the earliest
    /// `arrival - dts` seen (the frame that came with the least delay).
    anchor_ms: Option<u64>,
    /// Duration of the newest video frame interval, to cut parts before they outgrow the target.
    frame_interval_ms: u64,
    last_video_dts: Option<u64>,
    /// Init segments by id, for the ids the window still references.
    inits: VecDeque<(u64, Bytes)>,
    next_init: u64,
    /// The next segment starts after a break (new stream or new tracks).
    discontinuity_next: bool,
    segments: VecDeque<Segment>,
    open: Option<Segment>,
    next_msn: u64,
    next_part: u64,
    /// Discontinuities among segments dropped from the window (`EXT-X-DISCONTINUITY-SEQUENCE`).
    discontinuity_seq: u64,
    /// Changes with every new part: what blocked requests wait on.
    version: u64,
}

impl Packager {
    pub fn new(cfg: Settings) -> Self {
        Self {
            cfg,
            fr: None,
            anchor_ms: None,
            frame_interval_ms: 0,
            last_video_dts: None,
            inits: VecDeque::new(),
            next_init: 0,
            discontinuity_next: false,
            segments: VecDeque::new(),
            open: None,
            next_msn: 0,
            next_part: 0,
            discontinuity_seq: 0,
            version: 0,
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.cfg
    }

    /// Bumped whenever a part, segment or init is added.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Complete segments in the window.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Feed one tag of the origin stream, produced at `arrival_ms` (unix ms). A bad tag is
    /// logged and skipped: the stream goes on.
    pub fn push(&mut self, tag: &Tag, arrival_ms: u64) {
        let fr = self.fr.get_or_insert_with(Fragmenter::new);
        let pushed = match fr.push(tag) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, "hls: tag skipped");
                return;
            }
        };
        if let Some(f) = pushed.flushed {
            self.add_part(f);
        }
        if pushed.new_tracks {
            let Some(tracks) = self.fr.as_ref().and_then(|f| f.tracks()) else {
                return;
            };
            let init = Bytes::from(init_segment(tracks, None));
            // New tracks mid-stream: what came before them ends its segment, and the break is
            // marked for players. The first tracks of a later origin stream are a break too
            // (`end_of_stream` closed its segment already).
            if !self.inits.is_empty() {
                self.close_segment();
                self.discontinuity_next = true;
            }
            self.inits.push_back((self.next_init, init));
            self.next_init += 1;
            self.version += 1;
        }
        let Some(frame) = pushed.frame else {
            return;
        };
        let anchor = arrival_ms.saturating_sub(frame.dts_ms);
        self.anchor_ms = Some(self.anchor_ms.map_or(anchor, |a| a.min(anchor)));
        if frame.video {
            if let Some(last) = self.last_video_dts
                && frame.dts_ms > last
            {
                // Capped: a gap in the stream is not a frame rate.
                self.frame_interval_ms = (frame.dts_ms - last).min(self.cfg.part_ms / 2);
            }
            self.last_video_dts = Some(frame.dts_ms);
        }
        if frame.video && frame.keyframe {
            // Everything before the keyframe is one part; the keyframe starts the next one,
            // and a new segment once this one is long enough.
            if let Some(f) = self.fr.as_mut().and_then(Fragmenter::cut) {
                self.add_part(f);
            }
            if self
                .open
                .as_ref()
                .is_some_and(|s| s.duration_ms + self.cfg.part_ms / 2 >= self.cfg.segment_ms)
            {
                self.close_segment();
            }
            return;
        }
        let pending = self.fr.as_ref().map_or(0, Fragmenter::pending_ms);
        if pending > 0 && pending + self.frame_interval_ms > self.cfg.part_ms {
            if let Some(f) = self.fr.as_mut().and_then(Fragmenter::cut) {
                self.add_part(f);
            }
            let audio_only = self
                .fr
                .as_ref()
                .and_then(Fragmenter::tracks)
                .is_some_and(|t| t.video.is_none());
            if audio_only
                && self
                    .open
                    .as_ref()
                    .is_some_and(|s| s.duration_ms + self.cfg.part_ms / 2 >= self.cfg.segment_ms)
            {
                // Every audio part is independent: segments end on the target.
                self.close_segment();
            } else {
                self.close_if_too_long();
            }
        }
    }

    /// The origin stream ended: its last media becomes the last part, and whatever comes next
    /// (another origin stream on the same name) follows a discontinuity.
    pub fn end_of_stream(&mut self) {
        if let Some(f) = self.fr.as_mut().and_then(Fragmenter::finish) {
            self.add_part(f);
        }
        self.close_segment();
        self.fr = None;
        self.anchor_ms = None;
        self.last_video_dts = None;
        if !self.inits.is_empty() {
            self.discontinuity_next = true;
        }
    }

    /// A segment without a keyframe in sight is cut before its duration would round above
    /// `EXT-X-TARGETDURATION`, i.e. before it reaches target + 0.5 s with the next part.
    fn close_if_too_long(&mut self) {
        let limit = self.cfg.target_duration_s() * 1000 + 500;
        if self
            .open
            .as_ref()
            .is_some_and(|s| s.duration_ms + self.cfg.part_ms + self.frame_interval_ms >= limit)
        {
            self.close_segment();
        }
    }

    fn add_part(&mut self, f: Fragment) {
        let Some((init, _)) = self.inits.back() else {
            return;
        };
        let init = *init;
        if self.open.is_none() {
            // A stream's first segment must start where a decoder can: media before the first
            // keyframe (a player that joined the origin before one) is dropped.
            if !f.independent && self.segments.back().is_none_or(|s| s.init != init) {
                tracing::debug!("hls: media before the first keyframe dropped");
                return;
            }
            let pdt_ms = self.anchor_ms.unwrap_or(0) + f.start_ms;
            self.open = Some(Segment {
                msn: self.next_msn,
                parts: vec![],
                duration_ms: 0,
                pdt_ms,
                init,
                discontinuity: std::mem::take(&mut self.discontinuity_next),
                bytes: 0,
            });
            self.next_msn += 1;
        }
        let Some(seg) = self.open.as_mut() else {
            return;
        };
        seg.duration_ms += f.duration_ms;
        seg.bytes += f.bytes.len();
        seg.parts.push(Part {
            id: self.next_part,
            bytes: Bytes::from(f.bytes),
            duration_ms: f.duration_ms,
            independent: f.independent,
        });
        self.next_part += 1;
        self.version += 1;
        self.prune();
    }

    fn close_segment(&mut self) {
        if let Some(seg) = self.open.take() {
            self.segments.push_back(seg);
            self.version += 1;
            self.prune();
        }
    }

    /// Keep the window within `window_segments` and `max_bytes`.
    fn prune(&mut self) {
        let open_bytes = self.open.as_ref().map_or(0, |s| s.bytes);
        let mut total: usize = open_bytes + self.segments.iter().map(|s| s.bytes).sum::<usize>();
        while self.segments.len() > self.cfg.window_segments
            || (total > self.cfg.max_bytes && self.segments.len() > 1)
        {
            let Some(old) = self.segments.pop_front() else {
                break;
            };
            total -= old.bytes;
            if old.discontinuity {
                self.discontinuity_seq += 1;
            }
        }
        // Init segments no segment of the window needs any more (the newest always stays).
        let oldest = self.segments.front().or(self.open.as_ref()).map(|s| s.init);
        while self.inits.len() > 1 && self.inits.front().is_some_and(|(id, _)| Some(*id) < oldest) {
            self.inits.pop_front();
        }
    }

    /// Whether the playlist holds what a blocking request asks for.
    pub fn ready(&self, msn: u64, part: Option<usize>) -> Ready {
        let open_msn = self.open.as_ref().map(|s| s.msn);
        // The last segment of the playlist: the open one, or the next to open.
        let last = open_msn.unwrap_or(self.next_msn);
        if msn > last + 2 {
            return Ready::TooFar;
        }
        let Some(part) = part else {
            return if msn < self.next_msn && open_msn != Some(msn) {
                Ready::Yes
            } else {
                Ready::Wait
            };
        };
        if let Some(seg) = self.segment(msn) {
            if part < seg.parts.len() {
                return Ready::Yes;
            }
            if open_msn == Some(msn) {
                return if part > seg.parts.len() + ADVANCE_PART_LIMIT {
                    Ready::TooFar
                } else {
                    Ready::Wait
                };
            }
            // A complete segment with fewer parts: the next part is the next segment's first.
            return if self.segment(msn + 1).is_some() {
                Ready::Yes
            } else {
                Ready::Wait
            };
        }
        if self.segments.front().is_some_and(|s| msn < s.msn) {
            // Older than the window: the current playlist is the answer.
            return Ready::Yes;
        }
        if part > ADVANCE_PART_LIMIT {
            return Ready::TooFar;
        }
        Ready::Wait
    }

    fn segment(&self, msn: u64) -> Option<&Segment> {
        self.segments
            .iter()
            .chain(self.open.iter())
            .find(|s| s.msn == msn)
    }

    /// The bytes of a complete segment (its parts back to back).
    pub fn segment_bytes(&self, msn: u64) -> Lookup {
        if let Some(s) = self.segments.iter().find(|s| s.msn == msn) {
            return Lookup::Found(s.parts.iter().map(|p| p.bytes.clone()).collect());
        }
        if self.open.as_ref().is_some_and(|s| s.msn == msn) || msn == self.next_msn {
            return Lookup::Soon;
        }
        Lookup::Gone
    }

    pub fn part_bytes(&self, id: u64) -> Lookup {
        if let Some(p) = self
            .segments
            .iter()
            .chain(self.open.iter())
            .flat_map(|s| s.parts.iter())
            .find(|p| p.id == id)
        {
            return Lookup::Found(vec![p.bytes.clone()]);
        }
        // The hinted part, and the ones right after it, are worth waiting for.
        if (self.next_part..self.next_part + ADVANCE_PART_LIMIT as u64).contains(&id)
            && !self.inits.is_empty()
        {
            return Lookup::Soon;
        }
        Lookup::Gone
    }

    pub fn init_bytes(&self, id: u64) -> Option<Bytes> {
        self.inits
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, b)| b.clone())
    }

    /// Where the newest part is (for tests and logs).
    pub fn last_part(&self) -> Option<PartPos> {
        let s = self.open.as_ref().or(self.segments.back())?;
        Some(PartPos {
            msn: s.msn,
            index: s.parts.len().checked_sub(1)?,
        })
    }

    /// The media playlist. `run` names this packager's files (see the module doc of
    /// `crate::hls`); `query` is appended to every URI (`?sign=..&expires=..`, or empty).
    pub fn playlist(&self, run: &str, query: &str) -> String {
        let cfg = &self.cfg;
        let td = cfg.target_duration_s();
        let mut out = String::with_capacity(4096);
        let first_msn = self
            .segments
            .front()
            .or(self.open.as_ref())
            .map_or(self.next_msn, |s| s.msn);
        let _ = write!(
            out,
            "#EXTM3U\n\
             #EXT-X-VERSION:6\n\
             #EXT-X-TARGETDURATION:{td}\n\
             #EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK={:.3}\n\
             #EXT-X-PART-INF:PART-TARGET={:.3}\n\
             #EXT-X-MEDIA-SEQUENCE:{first_msn}\n\
             #EXT-X-DISCONTINUITY-SEQUENCE:{}\n",
            // Three part targets (RFC 8216bis recommends at least that).
            (cfg.part_ms * 3) as f64 / 1000.0,
            cfg.part_ms as f64 / 1000.0,
            self.discontinuity_seq,
        );
        // Parts are listed for the last segments only (RFC 8216bis: parts older than three
        // target durations from the end may go); the segments themselves stay.
        let mut recent_ms = 0;
        let mut parts_from = first_msn;
        for s in self.open.iter().chain(self.segments.iter().rev()) {
            recent_ms += s.duration_ms;
            parts_from = s.msn;
            if recent_ms >= td * 3000 {
                break;
            }
        }
        let mut map = None;
        for s in self.segments.iter().chain(self.open.iter()) {
            // Printed on the window's first segment too: the discontinuity sequence counts
            // only the tags that left the window, so each segment keeps its number.
            if s.discontinuity {
                out.push_str("#EXT-X-DISCONTINUITY\n");
            }
            if map != Some(s.init) {
                let _ = writeln!(out, "#EXT-X-MAP:URI=\"init-{run}-{}.mp4{query}\"", s.init);
                map = Some(s.init);
            }
            let _ = writeln!(out, "#EXT-X-PROGRAM-DATE-TIME:{}", rfc3339_ms(s.pdt_ms));
            if s.msn >= parts_from {
                for p in &s.parts {
                    let _ = write!(
                        out,
                        "#EXT-X-PART:DURATION={:.3},URI=\"part-{run}-{}.m4s{query}\"",
                        p.duration_ms as f64 / 1000.0,
                        p.id
                    );
                    out.push_str(if p.independent {
                        ",INDEPENDENT=YES\n"
                    } else {
                        "\n"
                    });
                }
            }
            if self.open.as_ref().is_some_and(|o| o.msn == s.msn) {
                break;
            }
            let _ = writeln!(
                out,
                "#EXTINF:{:.3},\nseg-{run}-{}.m4s{query}",
                s.duration_ms as f64 / 1000.0,
                s.msn
            );
        }
        if self.fr.is_some() && !self.inits.is_empty() {
            let _ = writeln!(
                out,
                "#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"part-{run}-{}.m4s{query}\"",
                self.next_part
            );
        }
        out
    }
}

/// `2026-12-04T19:30:00.123Z`.
fn rfc3339_ms(unix_ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms);
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::flv::{self, TAG_AUDIO, TAG_VIDEO};

    fn settings() -> Settings {
        Settings {
            segment_ms: 2000,
            part_ms: 333,
            window_segments: 4,
            max_bytes: 64 << 20,
        }
    }

    fn tag(kind: u8, ts: u32, body: Vec<u8>) -> Tag {
        Tag {
            kind,
            timestamp_ms: ts,
            body,
        }
    }

    /// A 128x128 baseline SPS and its PPS in an avcC (as in the muxer's tests).
    fn avcc() -> Vec<u8> {
        let sps = [
            0x67, 0x42, 0xc0, 0x0a, 0x8c, 0x8d, 0x41, 0x02, 0x24, 0x03, 0xc2, 0x21, 0x1a, 0x80,
        ];
        let pps = [0x68, 0xce, 0x3c, 0x80];
        crate::media::h264::decoder_config(&sps, &pps).unwrap()
    }

    /// `frames` of 30 fps video with a keyframe every `gop` frames, and 48 kHz AAC, from `t0`.
    fn stream(p: &mut Packager, t0: u32, frames: u32, gop: u32) {
        p.push(&tag(TAG_VIDEO, t0, flv::avc_sequence_header(&avcc())), 0);
        p.push(
            &tag(TAG_AUDIO, t0, flv::aac_sequence_header(&[0x11, 0x90])),
            0,
        );
        let mut audio_t = 0u32;
        for i in 0..frames {
            let t = i * 100 / 3;
            let kf = i % gop == 0;
            p.push(
                &tag(TAG_VIDEO, t0 + t, flv::avc_frame(kf, 0, &[0, 0, 0, 1, 5])),
                1_000_000 + t as u64,
            );
            while audio_t < t + 33 {
                p.push(
                    &tag(TAG_AUDIO, t0 + audio_t, flv::aac_frame(&[1; 10])),
                    1_000_000 + audio_t as u64,
                );
                audio_t += 21;
            }
        }
    }

    fn attr<'a>(line: &'a str, key: &str) -> Option<&'a str> {
        line.split([':', ','])
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    }

    #[test]
    fn segments_end_on_keyframes_and_parts_stay_within_the_target() {
        let mut p = Packager::new(settings());
        stream(&mut p, 0, 30 * 7, 60); // 7 s, a keyframe every 2 s
        assert_eq!(
            p.segment_count(),
            3,
            "keyframes at 2, 4, 6 s close three segments"
        );
        let pl = p.playlist("r", "");
        assert!(
            pl.starts_with("#EXTM3U\n#EXT-X-VERSION:6\n#EXT-X-TARGETDURATION:2\n"),
            "{pl}"
        );
        assert!(pl.contains("#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK=0.999\n"));
        assert!(pl.contains("#EXT-X-PART-INF:PART-TARGET=0.333\n"));
        assert!(pl.contains("#EXT-X-MEDIA-SEQUENCE:0\n"));
        assert!(pl.contains("#EXT-X-MAP:URI=\"init-r-0.mp4\"\n"));
        for l in pl.lines().filter(|l| l.starts_with("#EXTINF:")) {
            let d: f64 = l[8..l.len() - 1].parse().unwrap();
            assert!((1.9..=2.1).contains(&d), "{l}");
        }
        let parts: Vec<&str> = pl
            .lines()
            .filter(|l| l.starts_with("#EXT-X-PART:"))
            .collect();
        assert!(parts.len() >= 9, "{pl}");
        for l in &parts {
            let d: f64 = attr(l, "DURATION").unwrap().parse().unwrap();
            assert!(d <= 0.333 + 1e-9, "a part longer than PART-TARGET: {l}");
        }
        // Every segment's first part starts on the keyframe.
        let mut prev_extinf = true;
        for l in pl.lines() {
            if l.starts_with("#EXT-X-PART:") {
                if prev_extinf {
                    assert!(l.ends_with("INDEPENDENT=YES"), "{l}");
                }
                prev_extinf = false;
            } else if l.starts_with("seg-") {
                prev_extinf = true;
            }
        }
        assert!(
            pl.trim_end()
                .lines()
                .last()
                .unwrap()
                .starts_with("#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"part-r-")
        );
        // Program date time from the arrival clock: the first frame arrived at 1 000 000 ms.
        assert!(
            pl.contains("#EXT-X-PROGRAM-DATE-TIME:1970-01-01T00:16:40.000Z\n"),
            "{pl}"
        );
        // Segment bytes are its parts.
        let Lookup::Found(b) = p.segment_bytes(1) else {
            panic!()
        };
        assert!(b.len() >= 6);
    }

    #[test]
    fn window_is_bounded_by_count_and_bytes() {
        let mut p = Packager::new(settings());
        stream(&mut p, 0, 30 * 21, 30); // 21 s, a keyframe every 1 s: 2 s segments
        assert_eq!(p.segment_count(), 4);
        let pl = p.playlist("r", "");
        assert!(
            !pl.contains("#EXT-X-MEDIA-SEQUENCE:0\n"),
            "old segments left the window"
        );
        assert!(matches!(p.segment_bytes(0), Lookup::Gone));
        let mut s = settings();
        s.max_bytes = 1; // smaller than any segment: one complete segment stays
        let mut p = Packager::new(s);
        stream(&mut p, 0, 30 * 9, 30);
        assert_eq!(p.segment_count(), 1);
    }

    #[test]
    fn long_gops_are_cut_before_they_exceed_the_target_duration() {
        let mut p = Packager::new(settings());
        stream(&mut p, 0, 30 * 9, 30 * 8); // keyframes 8 s apart
        let pl = p.playlist("r", "");
        let n = pl.lines().filter(|l| l.starts_with("#EXTINF:")).count();
        assert!(n >= 3, "{pl}");
        for l in pl.lines().filter(|l| l.starts_with("#EXTINF:")) {
            let d: f64 = l[8..l.len() - 1].parse().unwrap();
            assert!(d.round() <= 2.0, "{l}");
        }
    }

    #[test]
    fn a_new_origin_stream_follows_a_discontinuity_with_a_new_map() {
        let mut p = Packager::new(settings());
        stream(&mut p, 0, 30 * 5, 60);
        p.end_of_stream();
        let before = p.segment_count();
        // The publisher comes back: timestamps start again from another value.
        stream(&mut p, 90_000, 30 * 5, 60);
        assert!(p.segment_count() > before);
        let pl = p.playlist("r", "?sign=ab&expires=9");
        assert_eq!(pl.matches("#EXT-X-DISCONTINUITY\n").count(), 1, "{pl}");
        assert!(pl.contains("#EXT-X-MAP:URI=\"init-r-0.mp4?sign=ab&expires=9\"\n"));
        assert!(pl.contains("#EXT-X-MAP:URI=\"init-r-1.mp4?sign=ab&expires=9\"\n"));
        let d = pl.find("#EXT-X-DISCONTINUITY\n").unwrap();
        assert!(pl[d..].starts_with("#EXT-X-DISCONTINUITY\n#EXT-X-MAP:URI=\"init-r-1.mp4"));
        assert!(p.init_bytes(1).is_some());
        // Media sequence numbers go on counting across the break.
        let msns: Vec<u64> = pl
            .lines()
            .filter_map(|l| l.strip_prefix("seg-r-")?.split('.').next()?.parse().ok())
            .collect();
        assert!(msns.windows(2).all(|w| w[1] == w[0] + 1), "{msns:?}");
        // Once the segment with the break leaves the window, the discontinuity sequence counts it.
        p.end_of_stream();
        stream(&mut p, 500_000, 30 * 13, 60);
        let pl = p.playlist("r", "");
        assert!(pl.contains("#EXT-X-DISCONTINUITY-SEQUENCE:2\n"), "{pl}");
    }

    #[test]
    fn blocking_reload_conditions() {
        let mut p = Packager::new(settings());
        assert_eq!(p.ready(0, Some(0)), Ready::Wait);
        assert_eq!(p.ready(3, None), Ready::TooFar);
        stream(&mut p, 0, 30 * 3, 60);
        let last = p.last_part().unwrap();
        assert_eq!(last.msn, 1);
        assert_eq!(p.ready(0, None), Ready::Yes);
        assert_eq!(p.ready(1, None), Ready::Wait, "segment 1 is still open");
        assert_eq!(p.ready(1, Some(last.index)), Ready::Yes);
        assert_eq!(p.ready(1, Some(last.index + 1)), Ready::Wait);
        assert_eq!(p.ready(1, Some(last.index + 10)), Ready::TooFar);
        assert_eq!(p.ready(3, Some(0)), Ready::Wait);
        assert_eq!(p.ready(4, Some(0)), Ready::TooFar);
        // The hinted part is worth waiting for; one far ahead is not.
        let hint = p.playlist("r", "");
        let id: u64 = hint
            .rsplit("part-r-")
            .next()
            .and_then(|s| s.split('.').next())
            .and_then(|s| s.parse().ok())
            .unwrap();
        assert!(matches!(p.part_bytes(id), Lookup::Soon));
        assert!(matches!(p.part_bytes(id - 1), Lookup::Found(_)));
        assert!(matches!(p.part_bytes(id + 100), Lookup::Gone));
        let v = p.version();
        p.push(
            &tag(TAG_VIDEO, 3000, flv::avc_frame(false, 0, &[0, 0, 0, 1, 1])),
            0,
        );
        p.push(
            &tag(TAG_VIDEO, 3033, flv::avc_frame(false, 0, &[0, 0, 0, 1, 1])),
            0,
        );
        p.push(
            &tag(TAG_VIDEO, 3366, flv::avc_frame(false, 0, &[0, 0, 0, 1, 1])),
            0,
        );
        assert!(p.version() > v);
        assert!(matches!(p.part_bytes(id), Lookup::Found(_)));
    }

    /// Random tags: valid and broken sequence headers, frames with timestamps going back,
    /// jumping ahead and wrapping, truncated bodies, stream ends. Nothing panics, and the
    /// window stays within its bounds.
    #[test]
    fn random_streams_never_panic_and_stay_bounded() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut s = settings();
        s.max_bytes = 4096;
        let mut p = Packager::new(s);
        let mut ts = 0u32;
        for i in 0..50_000u64 {
            let r = next();
            ts = match r % 50 {
                0 => ts.wrapping_sub((r >> 8) as u32 % 5000),
                1 => ts.wrapping_add((r >> 8) as u32),
                _ => ts.wrapping_add((r >> 8) as u32 % 40),
            };
            let payload = vec![(r >> 16) as u8; (r >> 24) as usize % 300];
            let t = match (r >> 32) % 16 {
                0 => tag(TAG_VIDEO, ts, flv::avc_sequence_header(&avcc())),
                1 => tag(TAG_AUDIO, ts, flv::aac_sequence_header(&[0x11, 0x90])),
                2 => tag(TAG_AUDIO, ts, flv::aac_sequence_header(&[0x12, 0x10])),
                3 => tag(TAG_VIDEO, ts, payload[..payload.len().min(7)].to_vec()),
                4 => tag(flv::TAG_SCRIPT, ts, payload),
                5 | 6 => tag(
                    TAG_VIDEO,
                    ts,
                    flv::avc_frame(true, (r >> 40) as i32 % 100, &payload),
                ),
                7..=11 => tag(TAG_VIDEO, ts, flv::avc_frame(false, 0, &payload)),
                _ => tag(TAG_AUDIO, ts, flv::aac_frame(&payload)),
            };
            p.push(&t, i * 10);
            if r % 5000 == 0 {
                p.end_of_stream();
            }
            assert!(p.segment_count() <= 4);
            if i % 997 == 0 {
                let pl = p.playlist("r", "");
                assert!(pl.starts_with("#EXTM3U\n"));
                if let Some(last) = p.last_part() {
                    let _ = p.ready(last.msn, Some(last.index + 1));
                }
            }
        }
        assert!(p.version() > 1000, "parts were made: {}", p.version());
    }

    #[test]
    fn garbage_tags_never_panic() {
        let mut p = Packager::new(settings());
        for (i, body) in [
            vec![],
            vec![0x17],
            vec![0x17, 0],
            vec![0xaf, 0],
            vec![0x27, 1, 0, 0],
        ]
        .into_iter()
        .enumerate()
        {
            p.push(&tag(TAG_VIDEO, i as u32, body.clone()), 0);
            p.push(&tag(TAG_AUDIO, i as u32, body), 0);
        }
        p.end_of_stream();
        let _ = p.playlist("r", "");
    }
}
