//! The recorder's decisions, sans-IO: FLV tags of one origin stream in, file operations out
//! (open a file with these tracks, append this fragment, close the file). No clocks, no disk:
//! the writer (`writer.rs`) carries the operations out and the tests feed tags by hand.
//!
//! - A file starts at a video keyframe (audio alone only for a stream without video) and has
//!   its own 0-based timeline: each file gets a fresh [`Fragmenter`], fed the stream's
//!   sequence headers and then the keyframe.
//! - A fragment is cut at every video keyframe and whenever `fragment_ms` of media is pending,
//!   so a crash loses at most about one fragment.
//! - Rotation: at the first keyframe after the file holds `max_duration_ms` of media or
//!   `max_size` bytes, the file is closed with exactly the media before that keyframe, and the
//!   next one starts on it.
//! - A changed sequence header (new codec parameters) closes the file and the next starts at
//!   the next keyframe. The bridge keeps one AVC sequence header for the whole life of its
//!   origin stream (passthrough and mixing share it), so switching between them never does
//!   this; a new origin stream (bridge restart) is a new session and a new file anyway.

use std::sync::Arc;

use crate::media::flv::{TAG_AUDIO, TAG_VIDEO, Tag};
use crate::media::fmp4::{Fragment, Fragmenter, Pushed, Tracks};
use crate::webhooks::RecordingEnd;

/// What the writer must do, in order.
pub enum Op {
    /// Open a new file for these tracks (its init segment written first).
    Open(Tracks),
    /// Append a fragment (moof+mdat) to the open file and flush it.
    Append(Fragment),
    /// Close the open file (its duration patched into the init segment).
    Close(RecordingEnd),
}

/// Limits of one file.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub fragment_ms: u64,
    pub max_duration_ms: u64,
    /// 0: no limit.
    pub max_size: u64,
}

/// Audio tags kept from after the newest video tag, for a file that starts at the next
/// keyframe (audio of the keyframe's time may arrive just before it). Bounded: a stream with
/// video has a video tag every frame.
const AUDIO_CARRY: usize = 64;
/// A stream whose sequence headers name no video is recorded audio-only after this many audio
/// frames (a stream with video has its video sequence header before its first frames).
const AUDIO_ONLY_AFTER: u32 = 100;

/// One origin stream being recorded.
pub struct Session {
    limits: Limits,
    video_config: Option<Arc<Tag>>,
    audio_config: Option<Arc<Tag>>,
    /// The current file's muxer; `None` while waiting for a keyframe to start a file.
    frag: Option<Fragmenter>,
    /// A file is open (its `Open` was emitted and no `Close` yet).
    open: bool,
    /// Media and bytes in the open file's fragments so far.
    file_ms: u64,
    file_bytes: u64,
    audio_carry: Vec<Arc<Tag>>,
    audio_waited: u32,
    /// Tags the muxer refused (bad input); counted, never fatal.
    pub refused: u64,
}

impl Session {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            video_config: None,
            audio_config: None,
            frag: None,
            open: false,
            file_ms: 0,
            file_bytes: 0,
            audio_carry: Vec::new(),
            audio_waited: 0,
            refused: 0,
        }
    }

    /// A file is open.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Media in the open file so far (fragments written).
    pub fn file_ms(&self) -> u64 {
        self.file_ms
    }

    /// Feed one tag of the stream, in order.
    pub fn push(&mut self, tag: &Arc<Tag>) -> Vec<Op> {
        let mut ops = Vec::new();
        if tag.kind != TAG_AUDIO && tag.kind != TAG_VIDEO {
            // Script data (metadata, chat as onTextData) is not recorded.
            return ops;
        }
        if tag.is_sequence_header() {
            let slot = if tag.kind == TAG_VIDEO {
                &mut self.video_config
            } else {
                &mut self.audio_config
            };
            let changed = slot.as_ref().is_some_and(|old| old.body != tag.body);
            *slot = Some(tag.clone());
            if changed && self.frag.is_some() {
                // New codec parameters: the file ends with everything before them; the next
                // starts at the next keyframe under the new ones.
                self.end_file(RecordingEnd::TracksChanged, &mut ops);
            } else if let Some(f) = self.frag.as_mut() {
                // The same header again (or a first one for the other track): the muxer sees
                // it like any tag.
                let r = f.push(tag);
                self.handle(r, &mut ops);
            }
            return ops;
        }
        let keyframe = tag.is_video_keyframe();
        if self.frag.is_none() {
            self.maybe_start(tag, &mut ops);
            return ops;
        }
        // Rotation happens at a keyframe (or any audio frame of an audio-only file).
        let video_file = self
            .frag
            .as_ref()
            .and_then(|f| f.tracks())
            .is_some_and(|t| t.video.is_some());
        let boundary = if video_file {
            keyframe
        } else {
            tag.kind == TAG_AUDIO
        };
        if let Some(f) = self.frag.as_mut() {
            // At a keyframe this cuts exactly the media before it (see `handle`).
            let r = f.push(tag);
            self.handle(r, &mut ops);
        }
        if boundary && self.open && self.due() {
            if video_file {
                // The file holds everything before the keyframe; the next starts on it (with
                // the audio of its time that came just before it, still in `audio_carry`).
                self.close(RecordingEnd::Rotated, &mut ops);
                self.frag = None;
                self.maybe_start(tag, &mut ops);
            } else {
                if let Some(fr) = self.frag.as_mut().and_then(Fragmenter::cut) {
                    self.append(fr, &mut ops);
                }
                self.close(RecordingEnd::Rotated, &mut ops);
                self.frag = None;
                self.audio_carry.clear();
            }
            return ops;
        }
        if tag.kind == TAG_VIDEO {
            self.audio_carry.clear();
        } else if self.audio_carry.len() < AUDIO_CARRY {
            self.audio_carry.push(tag.clone());
        }
        ops
    }

    /// The stream ended or the recording stops: the open file gets everything and is closed.
    pub fn end(&mut self, reason: RecordingEnd) -> Vec<Op> {
        let mut ops = Vec::new();
        self.end_file(reason, &mut ops);
        ops
    }

    fn end_file(&mut self, reason: RecordingEnd, ops: &mut Vec<Op>) {
        if let Some(fr) = self.frag.as_mut().and_then(Fragmenter::finish) {
            self.append(fr, ops);
        }
        self.close(reason, ops);
        self.frag = None;
        self.audio_carry.clear();
    }

    fn due(&self) -> bool {
        let pending = self.frag.as_ref().map_or(0, Fragmenter::pending_ms);
        self.file_ms + pending >= self.limits.max_duration_ms
            || (self.limits.max_size > 0 && self.file_bytes >= self.limits.max_size)
    }

    /// Start a new file's muxer on `tag` if a file may start there.
    fn maybe_start(&mut self, tag: &Arc<Tag>, ops: &mut Vec<Op>) {
        let start = if tag.kind == TAG_VIDEO {
            tag.is_video_keyframe() && self.video_config.is_some()
        } else {
            // Audio starts a file only in a stream without video.
            if self.video_config.is_none() && self.audio_config.is_some() {
                self.audio_waited = self.audio_waited.saturating_add(1);
            }
            self.video_config.is_none()
                && self.audio_config.is_some()
                && self.audio_waited > AUDIO_ONLY_AFTER
        };
        if !start {
            if tag.kind == TAG_AUDIO && self.audio_carry.len() < AUDIO_CARRY {
                self.audio_carry.push(tag.clone());
            } else if tag.kind == TAG_VIDEO {
                self.audio_carry.clear();
            }
            return;
        }
        let configs: Vec<Arc<Tag>> = self
            .video_config
            .iter()
            .chain(self.audio_config.iter())
            .cloned()
            .collect();
        self.frag = Some(Fragmenter::new());
        for c in &configs {
            if let Some(f) = self.frag.as_mut() {
                let r = f.push(c);
                self.handle(r, ops);
            }
        }
        if let Some(f) = self.frag.as_mut() {
            let r = f.push(tag);
            self.handle(r, ops);
        }
        // Audio of the keyframe's time that arrived just before it goes into this file.
        let carried = std::mem::take(&mut self.audio_carry);
        for a in carried
            .iter()
            .filter(|a| tag.kind == TAG_VIDEO && a.timestamp_ms >= tag.timestamp_ms)
        {
            if let Some(f) = self.frag.as_mut() {
                let r = f.push(a);
                self.handle(r, ops);
            }
        }
    }

    /// What the muxer said about one tag.
    fn handle(&mut self, r: Result<Pushed, crate::media::fmp4::Fmp4Error>, ops: &mut Vec<Op>) {
        let p = match r {
            Ok(p) => p,
            Err(e) => {
                self.refused += 1;
                if self.refused.is_power_of_two() {
                    tracing::warn!(refused = self.refused, "recording: tag refused: {e}");
                }
                return;
            }
        };
        if p.new_tracks {
            if self.open {
                // The muxer saw different tracks (a case the session did not catch itself):
                // the previous tracks' media closes this file, the new ones open the next.
                if let Some(fr) = p.flushed {
                    self.append(fr, ops);
                }
                self.close(RecordingEnd::TracksChanged, ops);
            }
            if let Some(t) = self.frag.as_ref().and_then(|f| f.tracks()).cloned() {
                ops.push(Op::Open(t));
                self.open = true;
                self.file_ms = 0;
                self.file_bytes = 0;
            }
        } else if let Some(fr) = p.flushed {
            self.append(fr, ops);
        }
        let Some(frame) = p.frame else {
            return;
        };
        let cut = (frame.video && frame.keyframe)
            || self
                .frag
                .as_ref()
                .is_some_and(|f| f.pending_ms() >= self.limits.fragment_ms);
        if cut && let Some(fr) = self.frag.as_mut().and_then(Fragmenter::cut) {
            self.append(fr, ops);
        }
    }

    fn append(&mut self, fr: Fragment, ops: &mut Vec<Op>) {
        if !self.open {
            return;
        }
        self.file_ms = self.file_ms.max(fr.start_ms + fr.duration_ms);
        self.file_bytes += fr.bytes.len() as u64;
        ops.push(Op::Append(fr));
    }

    fn close(&mut self, reason: RecordingEnd, ops: &mut Vec<Op>) {
        if self.open {
            ops.push(Op::Close(reason));
            self.open = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::{flv, h264};

    const LIMITS: Limits = Limits {
        fragment_ms: 1000,
        max_duration_ms: 3000,
        max_size: 0,
    };

    /// A 128x128 baseline SPS and its PPS in an avcC (`pps_tail` varies the PPS).
    fn avcc(pps_tail: u8) -> Vec<u8> {
        let sps = [
            0x67, 0x42, 0xc0, 0x0a, 0x8c, 0x8d, 0x41, 0x02, 0x24, 0x03, 0xc2, 0x21, 0x1a, 0x80,
        ];
        let pps = [0x68, 0xce, 0x3c, pps_tail];
        h264::decoder_config(&sps, &pps).unwrap()
    }

    fn tag(kind: u8, ts: u32, body: Vec<u8>) -> Arc<Tag> {
        Arc::new(Tag {
            kind,
            timestamp_ms: ts,
            body,
        })
    }

    fn video(ts: u32, key: bool) -> Arc<Tag> {
        tag(
            TAG_VIDEO,
            ts,
            flv::avc_frame(key, 0, &[0, 0, 0, 2, 0x65, 0x88]),
        )
    }

    fn audio(ts: u32) -> Arc<Tag> {
        tag(TAG_AUDIO, ts, flv::aac_frame(&[0x21, 0x10]))
    }

    fn configs(pps_tail: u8) -> [Arc<Tag>; 2] {
        [
            tag(TAG_VIDEO, 0, flv::avc_sequence_header(&avcc(pps_tail))),
            tag(TAG_AUDIO, 0, flv::aac_sequence_header(&[0x11, 0x90])),
        ]
    }

    /// What the writer would have: per file, its fragments' (start, duration, independent),
    /// and how each file ended.
    /// A fragment's (start, duration, independent).
    type Frag = (u64, u64, bool);

    #[derive(Debug, Default)]
    struct Files {
        files: Vec<(Vec<Frag>, Option<RecordingEnd>)>,
        open: bool,
    }

    impl Files {
        fn apply(&mut self, ops: Vec<Op>) {
            for op in ops {
                match op {
                    Op::Open(t) => {
                        assert!(!self.open, "open while a file is open");
                        assert!(t.video.is_some() && t.audio.is_some());
                        self.files.push((vec![], None));
                        self.open = true;
                    }
                    Op::Append(f) => {
                        assert!(self.open, "append without a file");
                        let file = self.files.last_mut().unwrap();
                        file.0.push((f.start_ms, f.duration_ms, f.independent));
                    }
                    Op::Close(r) => {
                        assert!(self.open, "close without a file");
                        self.files.last_mut().unwrap().1 = Some(r);
                        self.open = false;
                    }
                }
            }
        }
    }

    /// 15 fps video with a keyframe every second from `from` ms, and 20 ms audio frames, in
    /// timestamp order, for `ms`.
    fn stream(s: &mut Session, files: &mut Files, from: u32, ms: u32) {
        let mut next_audio = from;
        for second in 0..ms.div_ceil(1000) {
            for j in 0..15 {
                let t = from + second * 1000 + j * 66;
                if t >= from + ms {
                    return;
                }
                while next_audio <= t {
                    files.apply(s.push(&audio(next_audio)));
                    next_audio += 20;
                }
                files.apply(s.push(&video(t, j == 0)));
            }
        }
    }

    #[test]
    fn a_file_starts_at_a_keyframe_and_fragments_are_cut_at_keyframes_and_every_second() {
        let mut s = Session::new(LIMITS);
        let mut f = Files::default();
        for c in configs(0x80) {
            f.apply(s.push(&c));
        }
        // Audio and a P-frame before any keyframe: nothing to start a file on.
        f.apply(s.push(&audio(0)));
        f.apply(s.push(&video(10, false)));
        assert!(f.files.is_empty());
        stream(&mut s, &mut f, 100, 2500);
        f.apply(s.end(RecordingEnd::Stopped));
        assert_eq!(f.files.len(), 1, "{f:?}");
        let (frags, end) = &f.files[0];
        assert_eq!(*end, Some(RecordingEnd::Stopped));
        assert_eq!(frags[0].0, 0, "the file's timeline starts at 0");
        // Fragments follow each other without gaps, and those cut at keyframes start with one.
        for w in frags.windows(2) {
            assert_eq!(w[0].0 + w[0].1, w[1].0, "{frags:?}");
        }
        assert!(frags.iter().filter(|f| f.2).count() >= 3, "{frags:?}");
        assert!(frags.iter().all(|f| f.1 <= 1000), "{frags:?}");
    }

    #[test]
    fn rotation_closes_the_file_just_before_a_keyframe_and_the_next_starts_on_it() {
        let mut s = Session::new(LIMITS);
        let mut f = Files::default();
        for c in configs(0x80) {
            f.apply(s.push(&c));
        }
        stream(&mut s, &mut f, 0, 10_000);
        f.apply(s.end(RecordingEnd::Stopped));
        assert!(f.files.len() >= 3, "{f:?}");
        let mut total = 0;
        for (i, (frags, end)) in f.files.iter().enumerate() {
            let last = i + 1 == f.files.len();
            assert_eq!(
                *end,
                Some(if last {
                    RecordingEnd::Stopped
                } else {
                    RecordingEnd::Rotated
                })
            );
            assert_eq!(frags[0], (0, frags[0].1, true), "file {i}: {frags:?}");
            let d = frags.last().map_or(0, |l| l.0 + l.1);
            if !last {
                // The first keyframe at or after 3 s: exactly 3 s (a keyframe each second).
                assert_eq!(d, 3000, "file {i}: {frags:?}");
            }
            total += d;
        }
        // Nothing lost or doubled between files (the last frame's duration is a guess).
        assert!((9_900..=10_100).contains(&total), "{total} ms");
    }

    #[test]
    fn a_new_sequence_header_closes_the_file_and_the_same_one_again_does_not() {
        let mut s = Session::new(LIMITS);
        let mut f = Files::default();
        for c in configs(0x80) {
            f.apply(s.push(&c));
        }
        stream(&mut s, &mut f, 0, 1500);
        // The same headers again (a repeat): one file goes on.
        for c in configs(0x80) {
            f.apply(s.push(&c));
        }
        stream(&mut s, &mut f, 1500, 1000);
        assert_eq!(f.files.len(), 1);
        // Different parameters: the file ends, the next starts at the next keyframe.
        f.apply(s.push(&configs(0x81)[0]));
        assert_eq!(f.files[0].1, Some(RecordingEnd::TracksChanged));
        assert!(!s.is_open());
        f.apply(s.push(&video(2600, false)));
        assert!(!s.is_open(), "not on a P-frame");
        stream(&mut s, &mut f, 3000, 1000);
        f.apply(s.end(RecordingEnd::StreamEnded));
        assert_eq!(f.files.len(), 2, "{f:?}");
        assert_eq!(f.files[1].0[0].0, 0);
        assert_eq!(f.files[1].1, Some(RecordingEnd::StreamEnded));
    }

    #[test]
    fn a_stream_without_video_is_recorded_audio_only_and_rotates_too() {
        let mut s = Session::new(LIMITS);
        let mut opened = 0;
        let mut rotated = 0;
        let mut ms = 0;
        s.push(&configs(0x80)[1]);
        // AAC frames of 1024 samples at 48 kHz: 21.33 ms apart, 10.67 s in all.
        for i in 0..500u32 {
            for op in s.push(&audio(i * 64 / 3)) {
                match op {
                    Op::Open(t) => {
                        assert!(t.video.is_none() && t.audio.is_some());
                        opened += 1;
                    }
                    Op::Append(f) => ms += f.duration_ms,
                    Op::Close(r) => {
                        assert_eq!(r, RecordingEnd::Rotated);
                        rotated += 1;
                    }
                }
            }
        }
        // Waits ~2 s for a video header that never comes, then records the rest in 3 s files
        // (the last one still open).
        assert_eq!((opened, rotated), (3, 2), "{ms} ms");
        assert!((6_000..=8_700).contains(&ms), "{ms} ms");
    }

    #[test]
    fn garbage_tags_are_refused_not_a_panic() {
        let mut s = Session::new(LIMITS);
        let mut f = Files::default();
        for body in [
            vec![],
            vec![0x17],
            vec![0x17, 0],
            vec![0x17, 0, 0, 0, 0, 1, 2],
            vec![0x27, 1],
            vec![0xaf, 0],
            vec![0xaf],
            vec![0x12, 0x01, 0, 0, 0, 1],
        ] {
            for kind in [TAG_AUDIO, TAG_VIDEO, 18, 0] {
                f.apply(s.push(&tag(kind, 5, body.clone())));
            }
        }
        for c in configs(0x80) {
            f.apply(s.push(&c));
        }
        stream(&mut s, &mut f, 100, 1200);
        f.apply(s.end(RecordingEnd::Stopped));
        assert_eq!(
            f.files.len(),
            1,
            "a good stream after garbage still records"
        );
    }
}
