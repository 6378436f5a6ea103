//! Fragmented MP4 (ISO BMFF, ISO 14496-12/-14/-15) from an origin stream's FLV tags: the one
//! muxer behind recording and HLS.
//!
//! An fMP4 stream is an init segment (`ftyp` + `moov`: the codecs, no samples) followed by
//! fragments (`moof` + `mdat`: a run of samples per track). [`Fragmenter`] takes FLV tags in
//! order and keeps their samples until the caller cuts a fragment; where to cut is the
//! caller's policy (an HLS part every ~300 ms and a segment at a keyframe, a recording fragment
//! every second), so this file only guarantees that a cut lands on a clean boundary: a video
//! frame's duration is known when the next frame arrives, and audio before that frame goes
//! with it, so a fragment that starts with a keyframe starts a decodable segment.
//!
//! Sans-IO: no clocks, no files. Times are FLV milliseconds rebased to the first media frame
//! (so each fragmenter's timeline starts at 0), video in a 90 kHz timescale and audio in its
//! sample rate.

use super::aac;
use super::flv::{TAG_AUDIO, TAG_VIDEO, Tag};
use super::h264;

pub const VIDEO_TRACK_ID: u32 = 1;
pub const AUDIO_TRACK_ID: u32 = 2;
/// The usual video timescale: every millisecond is a whole number of ticks.
pub const VIDEO_TIMESCALE: u32 = 90_000;
/// Samples of one AAC frame (AAC-LC and the core of HE-AAC at the config's rate).
const AAC_FRAME: u32 = 1024;

/// Media kept before a cut is forced whatever the caller does: a caller that never cuts (or a
/// stream whose video stopped while audio goes on) must not grow memory without bound.
pub const MAX_PENDING_SAMPLES: usize = 2048;
pub const MAX_PENDING_BYTES: usize = 32 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Fmp4Error {
    #[error("bad AVC sequence header: {0}")]
    BadVideoConfig(&'static str),
    #[error("bad AAC sequence header")]
    BadAudioConfig,
    #[error("unsupported {0}")]
    Unsupported(&'static str),
    #[error("truncated FLV tag")]
    Truncated,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VideoTrack {
    /// AVCDecoderConfigurationRecord as carried by the FLV sequence header.
    pub avcc: Vec<u8>,
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AudioTrack {
    /// AudioSpecificConfig as carried by the FLV sequence header.
    pub asc: Vec<u8>,
    pub sample_rate: u32,
    pub channels: u8,
    pub object_type: u8,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tracks {
    pub video: Option<VideoTrack>,
    pub audio: Option<AudioTrack>,
}

impl VideoTrack {
    /// From an AVCDecoderConfigurationRecord: its first SPS gives the size.
    pub fn from_avcc(avcc: &[u8]) -> Result<Self, Fmp4Error> {
        // version(1) profile compat level lengthSize(1) numSps(1) then u16 length + SPS.
        if avcc.len() < 8 || avcc[0] != 1 {
            return Err(Fmp4Error::BadVideoConfig(
                "not an AVCDecoderConfigurationRecord",
            ));
        }
        if avcc[5] & 0x1f == 0 {
            return Err(Fmp4Error::BadVideoConfig("no SPS"));
        }
        let len = usize::from(u16::from_be_bytes([avcc[6], avcc[7]]));
        let sps = avcc
            .get(8..8 + len)
            .ok_or(Fmp4Error::BadVideoConfig("truncated SPS"))?;
        let (width, height) =
            h264::sps_dimensions(sps).ok_or(Fmp4Error::BadVideoConfig("unreadable SPS"))?;
        if width == 0 || height == 0 || width > 16384 || height > 16384 {
            return Err(Fmp4Error::BadVideoConfig("picture size out of range"));
        }
        Ok(Self {
            avcc: avcc.to_vec(),
            width,
            height,
        })
    }

    /// RFC 6381 codec string, e.g. `avc1.42e01f`.
    pub fn codec(&self) -> String {
        format!(
            "avc1.{:02x}{:02x}{:02x}",
            self.avcc[1], self.avcc[2], self.avcc[3]
        )
    }
}

impl AudioTrack {
    pub fn from_asc(asc: &[u8]) -> Result<Self, Fmp4Error> {
        let info = aac::parse_audio_specific_config(asc).ok_or(Fmp4Error::BadAudioConfig)?;
        if asc.len() > 64 || info.channels == 0 || info.sample_rate > 192_000 {
            return Err(Fmp4Error::BadAudioConfig);
        }
        Ok(Self {
            asc: asc.to_vec(),
            sample_rate: info.sample_rate,
            channels: info.channels,
            object_type: info.object_type,
        })
    }

    /// RFC 6381 codec string, e.g. `mp4a.40.2`.
    pub fn codec(&self) -> String {
        format!("mp4a.40.{}", self.object_type)
    }
}

impl Tracks {
    /// The CODECS attribute of an HLS playlist: `avc1.42e01f,mp4a.40.2`.
    pub fn codecs(&self) -> String {
        let v = self.video.as_ref().map(VideoTrack::codec);
        let a = self.audio.as_ref().map(AudioTrack::codec);
        v.into_iter().chain(a).collect::<Vec<_>>().join(",")
    }
}

// ---- box writing ----

/// Append a box: size placeholder, type, contents, then the size patched in.
fn bx(out: &mut Vec<u8>, kind: &[u8; 4], f: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(kind);
    f(out);
    let size = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&size.to_be_bytes());
}

/// A full box: version and 24-bit flags first.
fn full(out: &mut Vec<u8>, kind: &[u8; 4], version: u8, flags: u32, f: impl FnOnce(&mut Vec<u8>)) {
    bx(out, kind, |o| {
        o.push(version);
        o.extend_from_slice(&flags.to_be_bytes()[1..]);
        f(o);
    });
}

fn u16be(o: &mut Vec<u8>, v: u16) {
    o.extend_from_slice(&v.to_be_bytes());
}
fn u32be(o: &mut Vec<u8>, v: u32) {
    o.extend_from_slice(&v.to_be_bytes());
}
fn u64be(o: &mut Vec<u8>, v: u64) {
    o.extend_from_slice(&v.to_be_bytes());
}

const MATRIX: [u32; 9] = [0x0001_0000, 0, 0, 0, 0x0001_0000, 0, 0, 0, 0x4000_0000];

/// The init segment: `ftyp` + `moov` describing the tracks, with no samples. With
/// `duration_ms`, `moov` carries `mvex/mehd` with that duration (players use it as the file's
/// duration). Its byte length does not depend on the value, so a recorder writes `Some(0)` when
/// it opens a file and overwrites the same bytes with the final duration when it closes it.
pub fn init_segment(tracks: &Tracks, duration_ms: Option<u64>) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    bx(&mut out, b"ftyp", |o| {
        o.extend_from_slice(b"iso6");
        u32be(o, 0);
        for brand in [b"iso6", b"iso5", b"mp41", b"dash"] {
            o.extend_from_slice(brand);
        }
    });
    bx(&mut out, b"moov", |o| {
        full(o, b"mvhd", 0, 0, |o| {
            u32be(o, 0); // creation_time
            u32be(o, 0); // modification_time
            u32be(o, 1000); // timescale
            u32be(o, 0); // duration: in mehd for fragmented files
            u32be(o, 0x0001_0000); // rate 1.0
            u16be(o, 0x0100); // volume 1.0
            o.extend_from_slice(&[0; 10]);
            MATRIX.iter().for_each(|m| u32be(o, *m));
            o.extend_from_slice(&[0; 24]); // pre_defined
            u32be(o, AUDIO_TRACK_ID + 1); // next_track_ID
        });
        if let Some(v) = &tracks.video {
            video_trak(o, v);
        }
        if let Some(a) = &tracks.audio {
            audio_trak(o, a);
        }
        bx(o, b"mvex", |o| {
            if let Some(d) = duration_ms {
                full(o, b"mehd", 1, 0, |o| u64be(o, d));
            }
            let ids = [
                tracks.video.as_ref().map(|_| VIDEO_TRACK_ID),
                tracks.audio.as_ref().map(|_| AUDIO_TRACK_ID),
            ];
            for id in ids.into_iter().flatten() {
                full(o, b"trex", 0, 0, |o| {
                    u32be(o, id);
                    u32be(o, 1); // default_sample_description_index
                    u32be(o, 0); // default_sample_duration
                    u32be(o, 0); // default_sample_size
                    u32be(o, 0); // default_sample_flags: sync (audio); video sets its own
                });
            }
        });
    });
    out
}

fn tkhd(o: &mut Vec<u8>, id: u32, audio: bool, width: u32, height: u32) {
    // flags 3: track enabled, in movie.
    full(o, b"tkhd", 0, 3, |o| {
        u32be(o, 0);
        u32be(o, 0);
        u32be(o, id);
        u32be(o, 0); // reserved
        u32be(o, 0); // duration
        o.extend_from_slice(&[0; 8]);
        u16be(o, 0); // layer
        u16be(o, 0); // alternate_group
        u16be(o, if audio { 0x0100 } else { 0 });
        u16be(o, 0);
        MATRIX.iter().for_each(|m| u32be(o, *m));
        u32be(o, width << 16);
        u32be(o, height << 16);
    });
}

fn mdia(
    o: &mut Vec<u8>,
    timescale: u32,
    handler: &[u8; 4],
    name: &str,
    stsd: impl FnOnce(&mut Vec<u8>),
) {
    bx(o, b"mdia", |o| {
        full(o, b"mdhd", 0, 0, |o| {
            u32be(o, 0);
            u32be(o, 0);
            u32be(o, timescale);
            u32be(o, 0);
            u16be(o, 0x55c4); // language "und"
            u16be(o, 0);
        });
        full(o, b"hdlr", 0, 0, |o| {
            u32be(o, 0);
            o.extend_from_slice(handler);
            o.extend_from_slice(&[0; 12]);
            o.extend_from_slice(name.as_bytes());
            o.push(0);
        });
        bx(o, b"minf", |o| {
            if handler == b"vide" {
                full(o, b"vmhd", 0, 1, |o| o.extend_from_slice(&[0; 8]));
            } else {
                full(o, b"smhd", 0, 0, |o| u32be(o, 0));
            }
            bx(o, b"dinf", |o| {
                full(o, b"dref", 0, 0, |o| {
                    u32be(o, 1);
                    full(o, b"url ", 0, 1, |_| {}); // flag 1: media in this file
                });
            });
            bx(o, b"stbl", |o| {
                full(o, b"stsd", 0, 0, |o| {
                    u32be(o, 1);
                    stsd(o);
                });
                // Empty tables: the samples are in the fragments.
                full(o, b"stts", 0, 0, |o| u32be(o, 0));
                full(o, b"stsc", 0, 0, |o| u32be(o, 0));
                full(o, b"stsz", 0, 0, |o| {
                    u32be(o, 0);
                    u32be(o, 0);
                });
                full(o, b"stco", 0, 0, |o| u32be(o, 0));
            });
        });
    });
}

fn video_trak(o: &mut Vec<u8>, v: &VideoTrack) {
    // Sizes above 16 bits cannot be described; VideoTrack::from_avcc caps them well below.
    let (w, h) = (v.width.min(0xffff), v.height.min(0xffff));
    bx(o, b"trak", |o| {
        tkhd(o, VIDEO_TRACK_ID, false, w, h);
        mdia(o, VIDEO_TIMESCALE, b"vide", "cohost video", |o| {
            bx(o, b"avc1", |o| {
                o.extend_from_slice(&[0; 6]);
                u16be(o, 1); // data_reference_index
                o.extend_from_slice(&[0; 16]); // pre_defined, reserved
                u16be(o, w as u16);
                u16be(o, h as u16);
                u32be(o, 0x0048_0000); // 72 dpi
                u32be(o, 0x0048_0000);
                u32be(o, 0);
                u16be(o, 1); // frame_count
                o.extend_from_slice(&[0; 32]); // compressorname
                u16be(o, 0x0018); // depth
                u16be(o, 0xffff); // pre_defined = -1
                bx(o, b"avcC", |o| o.extend_from_slice(&v.avcc));
            });
        });
    });
}

/// An MPEG-4 descriptor header with its length in the 4-byte form every reader accepts.
fn descriptor(o: &mut Vec<u8>, tag: u8, f: impl FnOnce(&mut Vec<u8>)) {
    o.push(tag);
    let at = o.len();
    o.extend_from_slice(&[0x80, 0x80, 0x80, 0]);
    f(o);
    let len = (o.len() - at - 4) as u32;
    o[at] = 0x80 | ((len >> 21) & 0x7f) as u8;
    o[at + 1] = 0x80 | ((len >> 14) & 0x7f) as u8;
    o[at + 2] = 0x80 | ((len >> 7) & 0x7f) as u8;
    o[at + 3] = (len & 0x7f) as u8;
}

fn audio_trak(o: &mut Vec<u8>, a: &AudioTrack) {
    bx(o, b"trak", |o| {
        tkhd(o, AUDIO_TRACK_ID, true, 0, 0);
        mdia(o, a.sample_rate, b"soun", "cohost audio", |o| {
            bx(o, b"mp4a", |o| {
                o.extend_from_slice(&[0; 6]);
                u16be(o, 1); // data_reference_index
                o.extend_from_slice(&[0; 8]);
                u16be(o, u16::from(a.channels));
                u16be(o, 16); // samplesize
                u16be(o, 0);
                u16be(o, 0);
                // 16.16 fixed point; rates above 65535 do not fit and readers use the ASC.
                u32be(o, a.sample_rate.min(0xffff) << 16);
                full(o, b"esds", 0, 0, |o| {
                    descriptor(o, 0x03, |o| {
                        u16be(o, AUDIO_TRACK_ID as u16); // ES_ID
                        o.push(0); // flags
                        descriptor(o, 0x04, |o| {
                            o.push(0x40); // objectTypeIndication: MPEG-4 audio
                            o.push(0x15); // streamType audio (5) << 2 | 1
                            o.extend_from_slice(&[0, 0, 0]); // bufferSizeDB
                            u32be(o, 0); // maxBitrate
                            u32be(o, 0); // avgBitrate
                            descriptor(o, 0x05, |o| o.extend_from_slice(&a.asc));
                        });
                        descriptor(o, 0x06, |o| o.push(0x02)); // SLConfig: MP4
                    });
                });
            });
        });
    });
}

// ---- samples and fragments ----

#[derive(Debug, Clone)]
struct Sample {
    /// Decode time, ms on this fragmenter's timeline.
    dts_ms: u64,
    /// Duration in the track's timescale (video: known once the next frame arrives).
    duration: u32,
    /// Decode time in the track's timescale.
    dts: u64,
    cts: i32,
    key: bool,
    data: Vec<u8>,
}

/// One `moof` + `mdat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fragment {
    pub bytes: Vec<u8>,
    /// `mfhd` sequence number: 1, 2, ... per fragmenter.
    pub sequence: u32,
    /// Time of its first sample, ms on the fragmenter's timeline.
    pub start_ms: u64,
    /// Video duration when it has video, else audio duration, ms.
    pub duration_ms: u64,
    /// It starts with a video keyframe (or has no video): a player can start here.
    pub independent: bool,
    pub video_samples: usize,
    pub audio_samples: usize,
}

/// A media frame that [`Fragmenter::push`] took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub video: bool,
    pub keyframe: bool,
    pub dts_ms: u64,
}

#[derive(Debug, Default)]
pub struct Pushed {
    /// The track set was fixed (at the first media frame) or changed (a differing sequence
    /// header after frames): a new init segment is needed.
    pub new_tracks: bool,
    /// Media cut without the caller asking: the last fragment of the previous tracks when they
    /// changed (it belongs BEFORE the new init segment), or a safety cut at the pending caps.
    pub flushed: Option<Fragment>,
    /// The media frame this tag carried, once its track is known.
    pub frame: Option<Frame>,
}

/// FLV tags in, fMP4 fragments out. See the module comment.
#[derive(Debug, Default)]
pub struct Fragmenter {
    /// Configs from sequence headers, current.
    video_cfg: Option<VideoTrack>,
    audio_cfg: Option<AudioTrack>,
    /// The tracks the current init segment describes: fixed at the first media frame.
    tracks: Option<Tracks>,
    /// FLV time (unwrapped, ms) that is 0 on our timeline.
    zero: Option<u64>,
    /// Unwrapping of FLV's 32-bit millisecond timestamps.
    last_raw: Option<u32>,
    unwrapped: u64,
    video: Vec<Sample>,
    audio: Vec<Sample>,
    pending_bytes: usize,
    /// Where the next audio sample is expected (audio timescale): consecutive AAC frames are
    /// exactly 1024 samples apart even though FLV rounds their times to milliseconds.
    audio_next: Option<u64>,
    /// Late AAC frames dropped (see `push_audio`).
    late_audio: u64,
    /// Last video frame duration (ms), for the final frame of a stream.
    last_video_ms: u64,
    sequence: u32,
}

impl Fragmenter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn tracks(&self) -> Option<&Tracks> {
        self.tracks.as_ref()
    }

    fn unwrap_ts(&mut self, raw: u32) -> u64 {
        // Differences are taken as signed 32-bit: a timestamp that wrapped past 2^32 ms (49.7
        // days) goes on, and a slightly earlier one (audio interleaving) goes back a little.
        match self.last_raw {
            None => self.unwrapped = u64::from(raw),
            Some(last) => {
                let d = raw.wrapping_sub(last) as i32;
                self.unwrapped = self.unwrapped.saturating_add_signed(i64::from(d));
            }
        }
        self.last_raw = Some(raw);
        self.unwrapped
    }

    /// Feed the next tag of the stream. Errors describe a tag that was skipped; the stream
    /// goes on (nothing in the fragmenter is left half-updated).
    pub fn push(&mut self, tag: &Tag) -> Result<Pushed, Fmp4Error> {
        let mut out = Pushed::default();
        let b = &tag.body;
        match tag.kind {
            TAG_VIDEO => {
                let (&first, &kind) = (
                    b.first().ok_or(Fmp4Error::Truncated)?,
                    b.get(1).ok_or(Fmp4Error::Truncated)?,
                );
                if first & 0x0f != 7 {
                    return Err(Fmp4Error::Unsupported("video codec (only H.264)"));
                }
                match kind {
                    0 => {
                        let cfg = VideoTrack::from_avcc(b.get(5..).ok_or(Fmp4Error::Truncated)?)?;
                        self.video_cfg = Some(cfg);
                        self.config_changed(&mut out);
                    }
                    1 => {
                        if b.len() <= 5 {
                            return Err(Fmp4Error::Truncated);
                        }
                        let cts = (i32::from_be_bytes([b[2], b[3], b[4], 0])) >> 8;
                        let t = self.unwrap_ts(tag.timestamp_ms);
                        self.start_if_needed(&mut out);
                        if self.tracks.as_ref().is_some_and(|t| t.video.is_some()) {
                            let key = first >> 4 == 1;
                            let dts_ms = self.rebase(t);
                            self.push_video(dts_ms, cts, key, b[5..].to_vec());
                            out.frame = Some(Frame {
                                video: true,
                                keyframe: key,
                                dts_ms,
                            });
                        }
                    }
                    _ => {} // end of sequence: nothing to carry
                }
            }
            TAG_AUDIO => {
                let (&first, &kind) = (
                    b.first().ok_or(Fmp4Error::Truncated)?,
                    b.get(1).ok_or(Fmp4Error::Truncated)?,
                );
                if first >> 4 != 10 {
                    return Err(Fmp4Error::Unsupported("audio codec (only AAC)"));
                }
                if kind == 0 {
                    self.audio_cfg = Some(AudioTrack::from_asc(&b[2..])?);
                    self.config_changed(&mut out);
                } else {
                    if b.len() <= 2 {
                        return Err(Fmp4Error::Truncated);
                    }
                    let t = self.unwrap_ts(tag.timestamp_ms);
                    self.start_if_needed(&mut out);
                    if self.tracks.as_ref().is_some_and(|t| t.audio.is_some()) {
                        let dts_ms = self.rebase(t);
                        if self.push_audio(dts_ms, b[2..].to_vec()) {
                            out.frame = Some(Frame {
                                video: false,
                                keyframe: true,
                                dts_ms,
                            });
                        }
                    }
                }
            }
            _ => {} // script data: nothing in fMP4
        }
        if out.flushed.is_none()
            && (self.video.len() + self.audio.len() > MAX_PENDING_SAMPLES
                || self.pending_bytes > MAX_PENDING_BYTES)
        {
            out.flushed = self.finish_or_cut();
        }
        Ok(out)
    }

    fn rebase(&mut self, t: u64) -> u64 {
        let zero = *self.zero.get_or_insert(t);
        t.saturating_sub(zero)
    }

    /// The first media frame fixes the track set from the configs seen so far.
    fn start_if_needed(&mut self, out: &mut Pushed) {
        if self.tracks.is_none() && (self.video_cfg.is_some() || self.audio_cfg.is_some()) {
            self.tracks = Some(Tracks {
                video: self.video_cfg.clone(),
                audio: self.audio_cfg.clone(),
            });
            out.new_tracks = true;
        }
    }

    /// A sequence header arrived: once started, a different config means new tracks (what
    /// was pending belongs to the old ones); the same one repeated changes nothing.
    fn config_changed(&mut self, out: &mut Pushed) {
        let Some(cur) = &self.tracks else {
            return;
        };
        let next = Tracks {
            video: self.video_cfg.clone(),
            audio: self.audio_cfg.clone(),
        };
        if *cur != next {
            out.flushed = self.finish();
            self.tracks = Some(next);
            self.audio_next = None;
            out.new_tracks = true;
        }
    }

    fn push_video(&mut self, dts_ms: u64, cts_ms: i32, key: bool, data: Vec<u8>) {
        // The previous frame's duration is the gap to this one (at least 1 ms: equal or
        // backwards times from a broken source must not give zero-length samples).
        if let Some(prev) = self.video.last_mut() {
            let d = dts_ms.saturating_sub(prev.dts_ms).clamp(1, 10_000);
            prev.duration = (d * u64::from(VIDEO_TIMESCALE / 1000)) as u32;
            self.last_video_ms = d;
        }
        let dts_ms = self
            .video
            .last()
            .map_or(dts_ms, |p| dts_ms.max(p.dts_ms + 1));
        self.pending_bytes += data.len();
        self.video.push(Sample {
            dts_ms,
            duration: 0,
            dts: dts_ms * u64::from(VIDEO_TIMESCALE / 1000),
            cts: cts_ms.saturating_mul((VIDEO_TIMESCALE / 1000) as i32),
            key,
            data,
        });
    }

    /// Returns whether the frame was taken.
    fn push_audio(&mut self, dts_ms: u64, data: Vec<u8>) -> bool {
        let Some(rate) = self
            .tracks
            .as_ref()
            .and_then(|t| t.audio.as_ref())
            .map(|a| u64::from(a.sample_rate))
        else {
            return false;
        };
        let raw = dts_ms * rate / 1000;
        let frame = u64::from(AAC_FRAME);
        let dts = match self.audio_next {
            // A whole frame or more behind where the next should be: the source produced
            // more audio than its clock says (the bridge's first few hundred milliseconds
            // do). Dropped: laying it after the previous frame would delay all later audio
            // against the video for good, and restarting the timeline from its time would
            // overlap audio already cut into a fragment ("non monotonically increasing dts"
            // in ffmpeg).
            Some(next) if raw + frame <= next => {
                self.late_audio += 1;
                return false;
            }
            // Within a frame of where it should be: it is the next frame exactly.
            Some(next) if raw < next + frame => next,
            // A gap: go on from the stream's time.
            Some(_) => raw,
            None => self.audio.last().map_or(raw, |p| raw.max(p.dts + frame)),
        };
        // A gap widens the previous frame so the run's timeline stays right.
        if let Some(prev) = self.audio.last_mut() {
            prev.duration = (dts - prev.dts).min(u64::from(u32::MAX)) as u32;
        }
        self.audio_next = Some(dts + frame);
        self.pending_bytes += data.len();
        self.audio.push(Sample {
            dts_ms,
            duration: AAC_FRAME,
            dts,
            cts: 0,
            key: true,
            data,
        });
        true
    }

    /// AAC frames dropped for coming a whole frame or more behind the audio timeline.
    pub fn late_audio(&self) -> u64 {
        self.late_audio
    }

    /// Milliseconds of complete media waiting: from the first pending sample up to the newest
    /// video frame (or past the newest audio frame when there is no video).
    pub fn pending_ms(&self) -> u64 {
        let first = self
            .video
            .first()
            .map(|s| s.dts_ms)
            .into_iter()
            .chain(self.audio.first().map(|s| s.dts_ms))
            .min();
        let Some(first) = first else { return 0 };
        let end = match self.video.last() {
            Some(v) => v.dts_ms,
            None => self
                .audio
                .last()
                .map_or(first, |a| a.dts_ms + self.audio_frame_ms()),
        };
        end.saturating_sub(first)
    }

    fn audio_frame_ms(&self) -> u64 {
        let rate = self
            .tracks
            .as_ref()
            .and_then(|t| t.audio.as_ref())
            .map_or(48_000, |a| u64::from(a.sample_rate).max(1));
        u64::from(AAC_FRAME) * 1000 / rate
    }

    /// A fragment of everything complete: every video frame but the newest, and the audio
    /// before the newest video frame (all audio when the track set has no video). After a
    /// keyframe was pushed, the next fragment starts with it.
    pub fn cut(&mut self) -> Option<Fragment> {
        let has_video = self.tracks.as_ref().is_some_and(|t| t.video.is_some());
        let (nv, boundary) = match self.video.last() {
            Some(last) => (self.video.len() - 1, last.dts_ms),
            // Video is in the tracks but none pending: audio waits for it, unless it has
            // piled up (video stopped): then it goes alone.
            None if has_video && self.audio.len() < 64 => (0, 0),
            None => (0, u64::MAX),
        };
        let na = self
            .audio
            .iter()
            .take_while(|a| a.dts_ms < boundary)
            .count();
        self.emit(nv, na)
    }

    /// End of stream: everything, the newest video frame included (given the previous
    /// frame's duration).
    pub fn finish(&mut self) -> Option<Fragment> {
        let last = self.last_video_ms.max(1);
        if let Some(v) = self.video.last_mut()
            && v.duration == 0
        {
            v.duration = (last * u64::from(VIDEO_TIMESCALE / 1000)) as u32;
        }
        let (nv, na) = (self.video.len(), self.audio.len());
        self.emit(nv, na)
    }

    fn finish_or_cut(&mut self) -> Option<Fragment> {
        self.cut().or_else(|| self.finish())
    }

    fn emit(&mut self, nv: usize, na: usize) -> Option<Fragment> {
        if nv == 0 && na == 0 {
            return None;
        }
        let video: Vec<Sample> = self.video.drain(..nv).collect();
        let audio: Vec<Sample> = self.audio.drain(..na).collect();
        self.pending_bytes = self
            .video
            .iter()
            .chain(&self.audio)
            .map(|s| s.data.len())
            .sum();
        self.sequence += 1;
        let start_ms = video
            .first()
            .map(|s| s.dts_ms)
            .into_iter()
            .chain(audio.first().map(|s| s.dts_ms))
            .min()
            .unwrap_or(0);
        let duration_ms = if video.is_empty() {
            let rate = self
                .tracks
                .as_ref()
                .and_then(|t| t.audio.as_ref())
                .map_or(48_000, |a| u64::from(a.sample_rate).max(1));
            audio.iter().map(|s| u64::from(s.duration)).sum::<u64>() * 1000 / rate
        } else {
            video.iter().map(|s| u64::from(s.duration)).sum::<u64>()
                / u64::from(VIDEO_TIMESCALE / 1000)
        };
        let independent = video.first().is_none_or(|s| s.key);
        Some(Fragment {
            bytes: moof_mdat(self.sequence, &video, &audio),
            sequence: self.sequence,
            start_ms,
            duration_ms,
            independent,
            video_samples: video.len(),
            audio_samples: audio.len(),
        })
    }
}

/// Sample flags (ISO 14496-12 §8.8.3.1): a keyframe depends on nothing; other frames depend
/// on others and are not sync samples.
const FLAGS_KEY: u32 = 0x0200_0000;
const FLAGS_DELTA: u32 = 0x0101_0000;

fn moof_mdat(sequence: u32, video: &[Sample], audio: &[Sample]) -> Vec<u8> {
    let data_len: usize = video.iter().chain(audio).map(|s| s.data.len()).sum();
    let mut out = Vec::with_capacity(256 + 16 * (video.len() + audio.len()) + data_len);
    // Offsets of each trun's data_offset field, patched once the moof size is known.
    let mut patches: Vec<(usize, usize)> = vec![];
    let mut mdat_off = 0usize;
    bx(&mut out, b"moof", |o| {
        full(o, b"mfhd", 0, 0, |o| u32be(o, sequence));
        for (id, samples, is_video) in [
            (VIDEO_TRACK_ID, video, true),
            (AUDIO_TRACK_ID, audio, false),
        ] {
            let Some(first) = samples.first() else {
                continue;
            };
            bx(o, b"traf", |o| {
                // 0x020000 default-base-is-moof: data offsets count from this moof.
                full(o, b"tfhd", 0, 0x02_0000, |o| u32be(o, id));
                full(o, b"tfdt", 1, 0, |o| u64be(o, first.dts));
                // data-offset, duration, size; video adds flags and (signed, v1) cts.
                let flags = if is_video { 0x000f01 } else { 0x000301 };
                full(o, b"trun", u8::from(is_video), flags, |o| {
                    u32be(o, samples.len() as u32);
                    patches.push((o.len(), mdat_off));
                    u32be(o, 0);
                    for s in samples {
                        u32be(o, s.duration);
                        u32be(o, s.data.len() as u32);
                        if is_video {
                            u32be(o, if s.key { FLAGS_KEY } else { FLAGS_DELTA });
                            o.extend_from_slice(&s.cts.to_be_bytes());
                        }
                    }
                });
            });
            mdat_off += samples.iter().map(|s| s.data.len()).sum::<usize>();
        }
    });
    let moof_len = out.len();
    for (at, off) in patches {
        let v = (moof_len + 8 + off) as u32;
        out[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }
    // mdat: a 64-bit size would be needed past 4 GiB; the pending caps keep it far below.
    u32be(&mut out, (8 + data_len) as u32);
    out.extend_from_slice(b"mdat");
    for s in video.iter().chain(audio) {
        out.extend_from_slice(&s.data);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::flv;

    /// A 128x128 baseline SPS and its PPS in an avcC.
    fn avcc() -> Vec<u8> {
        let sps = [
            0x67, 0x42, 0xc0, 0x0a, 0x8c, 0x8d, 0x41, 0x02, 0x24, 0x03, 0xc2, 0x21, 0x1a, 0x80,
        ];
        let pps = [0x68, 0xce, 0x3c, 0x80];
        h264::decoder_config(&sps, &pps).unwrap()
    }

    fn vtag(ts: u32, key: bool, payload: &[u8]) -> Tag {
        let mut avcc = (payload.len() as u32).to_be_bytes().to_vec();
        avcc.extend_from_slice(payload);
        Tag {
            kind: TAG_VIDEO,
            timestamp_ms: ts,
            body: flv::avc_frame(key, 0, &avcc),
        }
    }

    fn atag(ts: u32) -> Tag {
        Tag {
            kind: TAG_AUDIO,
            timestamp_ms: ts,
            body: flv::aac_frame(&[0x21, 0x10]),
        }
    }

    fn configs() -> [Tag; 2] {
        [
            Tag {
                kind: TAG_VIDEO,
                timestamp_ms: 0,
                body: flv::avc_sequence_header(&avcc()),
            },
            Tag {
                kind: TAG_AUDIO,
                timestamp_ms: 0,
                body: flv::aac_sequence_header(&[0x11, 0x90]),
            },
        ]
    }

    /// Walk boxes at one level: (type, body range).
    fn boxes(b: &[u8]) -> Vec<([u8; 4], std::ops::Range<usize>)> {
        let mut out = vec![];
        let mut i = 0;
        while i + 8 <= b.len() {
            let size = u32::from_be_bytes(b[i..i + 4].try_into().unwrap()) as usize;
            let kind: [u8; 4] = b[i + 4..i + 8].try_into().unwrap();
            assert!(size >= 8 && i + size <= b.len(), "box {kind:?} size {size}");
            out.push((kind, i + 8..i + size));
            i += size;
        }
        assert_eq!(i, b.len(), "boxes fill the buffer exactly");
        out
    }

    #[test]
    fn init_segment_describes_both_tracks() {
        let t = Tracks {
            video: Some(VideoTrack::from_avcc(&avcc()).unwrap()),
            audio: Some(AudioTrack::from_asc(&[0x11, 0x90]).unwrap()),
        };
        assert_eq!(
            t.video.as_ref().map(|v| (v.width, v.height)),
            Some((128, 128))
        );
        assert_eq!(t.codecs(), "avc1.42c00a,mp4a.40.2");
        let init = init_segment(&t, None);
        let top = boxes(&init);
        assert_eq!(
            top.iter().map(|b| &b.0).collect::<Vec<_>>(),
            [b"ftyp", b"moov"]
        );
        let moov = boxes(&init[top[1].1.clone()]);
        let kinds: Vec<_> = moov.iter().map(|b| b.0).collect();
        assert_eq!(kinds, [*b"mvhd", *b"trak", *b"trak", *b"mvex"]);
        // With a duration: same length, whatever the duration.
        let a = init_segment(&t, Some(0));
        let b = init_segment(&t, Some(123_456));
        assert_eq!(a.len(), b.len());
        assert_ne!(a, b);
    }

    #[test]
    fn fragments_cut_before_keyframes_and_carry_audio_up_to_them() {
        let mut f = Fragmenter::new();
        for t in configs() {
            let p = f.push(&t).unwrap();
            assert!(
                !p.new_tracks && p.frame.is_none(),
                "configs alone start nothing"
            );
        }
        let p = f.push(&vtag(1000, true, &[0x65, 1])).unwrap();
        assert!(p.new_tracks);
        assert_eq!(
            p.frame,
            Some(Frame {
                video: true,
                keyframe: true,
                dts_ms: 0
            })
        );
        f.push(&atag(1010)).unwrap();
        f.push(&vtag(1033, false, &[0x41, 2])).unwrap();
        f.push(&atag(1031)).unwrap();
        f.push(&atag(1053)).unwrap();
        assert_eq!(f.pending_ms(), 33);
        let p = f.push(&vtag(1066, true, &[0x65, 3])).unwrap();
        assert!(p.frame.is_some_and(|fr| fr.keyframe && fr.dts_ms == 66));
        let frag = f.cut().unwrap();
        assert_eq!(frag.sequence, 1);
        assert_eq!((frag.start_ms, frag.duration_ms), (0, 66));
        assert!(frag.independent);
        assert_eq!((frag.video_samples, frag.audio_samples), (2, 3));
        let top = boxes(&frag.bytes);
        assert_eq!(
            top.iter().map(|b| b.0).collect::<Vec<_>>(),
            [*b"moof", *b"mdat"]
        );
        // mdat holds the video samples then the audio ones.
        let mdat = &frag.bytes[top[1].1.clone()];
        assert_eq!(&mdat[..6], &[0, 0, 0, 2, 0x65, 1]);
        // Audio is one continuous 1024-sample run from 10 ms.
        let moof = boxes(&frag.bytes[top[0].1.clone()]);
        let traf_a = &frag.bytes[top[0].1.start + moof[2].1.start..top[0].1.start + moof[2].1.end];
        let a = boxes(traf_a);
        let tfdt = &traf_a[a[1].1.clone()];
        assert_eq!(u64::from_be_bytes(tfdt[4..12].try_into().unwrap()), 480);
        // Nothing complete left: the keyframe at 66 waits for its duration.
        assert!(f.cut().is_none());
        let last = f.finish().unwrap();
        assert_eq!(
            (last.start_ms, last.duration_ms, last.video_samples),
            (66, 33, 1)
        );
        assert_eq!(last.sequence, 2);
    }

    #[test]
    fn a_changed_sequence_header_flushes_and_starts_new_tracks() {
        let mut f = Fragmenter::new();
        for t in configs() {
            f.push(&t).unwrap();
        }
        f.push(&vtag(0, true, &[0x65])).unwrap();
        f.push(&vtag(33, false, &[0x41])).unwrap();
        // The same config again changes nothing.
        let same = f.push(&configs()[0]).unwrap();
        assert!(!same.new_tracks && same.flushed.is_none());
        let p = f
            .push(&Tag {
                kind: TAG_AUDIO,
                timestamp_ms: 50,
                body: flv::aac_sequence_header(&[0x12, 0x10]),
            })
            .unwrap();
        assert!(p.new_tracks);
        assert_eq!(p.flushed.map(|x| x.video_samples), Some(2));
        assert_eq!(
            f.tracks()
                .and_then(|t| t.audio.as_ref())
                .map(|a| a.sample_rate),
            Some(44100)
        );
    }

    #[test]
    fn bad_tags_are_errors_and_change_nothing() {
        let mut f = Fragmenter::new();
        let bad = |kind, body: Vec<u8>| Tag {
            kind,
            timestamp_ms: 0,
            body,
        };
        assert!(f.push(&bad(TAG_VIDEO, vec![])).is_err());
        assert!(f.push(&bad(TAG_VIDEO, vec![0x17])).is_err());
        assert!(f.push(&bad(TAG_VIDEO, vec![0x12, 0])).is_err(), "not H.264");
        assert!(
            f.push(&bad(TAG_VIDEO, vec![0x17, 0, 0, 0, 0, 1, 2]))
                .is_err()
        );
        assert!(
            f.push(&bad(
                TAG_VIDEO,
                flv::avc_sequence_header(&[1, 0x42, 0, 0, 0xff, 0xe1, 0, 200])
            ))
            .is_err()
        );
        assert!(
            f.push(&bad(TAG_AUDIO, flv::aac_sequence_header(&[0x11])))
                .is_err()
        );
        assert!(f.push(&bad(TAG_AUDIO, vec![0x2f, 1, 0])).is_err(), "MP3");
        assert!(f.tracks().is_none());
        // Frames before any config are skipped.
        let p = f.push(&vtag(0, true, &[0x65])).unwrap();
        assert!(p.frame.is_none() && !p.new_tracks);
    }

    #[test]
    fn a_caller_that_never_cuts_is_cut_for() {
        let mut f = Fragmenter::new();
        for t in configs() {
            f.push(&t).unwrap();
        }
        let mut flushed = 0;
        for i in 0..5000u32 {
            if f.push(&atag(i * 21)).unwrap().flushed.is_some() {
                flushed += 1;
            }
        }
        assert!(flushed >= 2, "{flushed}");
        assert!(f.audio.len() <= MAX_PENDING_SAMPLES + 1);
    }

    #[test]
    fn late_audio_is_dropped_and_never_overlaps_across_a_cut() {
        let mut f = Fragmenter::new();
        for t in configs() {
            f.push(&t).unwrap();
        }
        // 48 kHz: a frame is 21.33 ms. Frames at 0, 21, 43, then a cut, then one stamped
        // 30 ms behind where the next should be.
        for ts in [0, 21, 43] {
            f.push(&atag(ts)).unwrap();
        }
        f.push(&vtag(50, true, &[0x65])).unwrap();
        let first = f.cut().unwrap();
        assert_eq!(first.audio_samples, 3);
        let late = f.push(&atag(34)).unwrap();
        assert!(
            late.frame.is_none(),
            "dropped, not laid after the previous frame"
        );
        assert_eq!(f.late_audio(), 1);
        f.push(&atag(64)).unwrap();
        f.push(&atag(85)).unwrap();
        let dts: Vec<u64> = f.audio.iter().map(|s| s.dts).collect();
        assert_eq!(
            dts,
            vec![3 * 1024, 4 * 1024],
            "right after the cut run, no overlap"
        );
        // A real gap (half a second) is kept.
        f.push(&atag(600)).unwrap();
        assert_eq!(f.audio.last().map(|s| s.dts), Some(600 * 48));
        assert_eq!(
            f.audio[1].duration,
            600 * 48 - 4 * 1024,
            "the frame before the gap widens"
        );
    }

    #[test]
    fn timestamps_that_wrap_go_on() {
        let mut f = Fragmenter::new();
        for t in configs() {
            f.push(&t).unwrap();
        }
        let near = u32::MAX - 20;
        f.push(&vtag(near, true, &[0x65])).unwrap();
        let p = f
            .push(&vtag(near.wrapping_add(33), false, &[0x41]))
            .unwrap();
        assert_eq!(p.frame.map(|x| x.dts_ms), Some(33));
    }
}
