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
        if boundary && self.open && self.due() {
            if let Some(f) = self.frag.as_mut() {
                // The keyframe completes the last frame before it; cut yields exactly the
                // media before it. What follows belongs to the next file.
                let r = f.push(tag);
                self.handle(r, &mut ops);
            }
            if let Some(fr) = self.frag.as_mut().and_then(Fragmenter::cut) {
                self.append(fr, &mut ops);
            }
            self.close(RecordingEnd::Rotated, &mut ops);
            self.frag = None;
            self.maybe_start(tag, &mut ops);
            return ops;
        }
        if tag.kind == TAG_VIDEO {
            self.audio_carry.clear();
        } else if self.audio_carry.len() < AUDIO_CARRY {
            self.audio_carry.push(tag.clone());
        }
        if let Some(f) = self.frag.as_mut() {
            let r = f.push(tag);
            self.handle(r, &mut ops);
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
