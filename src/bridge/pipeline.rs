//! The clocked bridge pipeline of one room: every published track is subscribed through the
//! same interface as any SFU subscriber, decoded by its own task, and sampled by one output
//! loop that composites video at a fixed frame rate, mixes audio in AAC-sized blocks, encodes
//! both and publishes FLV tags into the embedded origin under the room's name.
//!
//! Output timestamps come from the output clock (frame and sample counters), never from the
//! inputs, so they are monotonic and continuous whatever the participants do; parameters
//! (resolution, frame rate, sample rate, channels, SPS/PPS) are fixed at start. Each
//! participant's audio plays through a jitter buffer and its video follows that audio (see
//! [`super::sync`]), so lips and voice stay together.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;
use tracing::{info, warn};

use super::audio_in::AudioInput;
use super::compose::{I420, Yuv};
use super::encode::{AAC_FRAME, AacEncoder, H264Encoder};
use super::layout::{Fit, Layout, Rect, tiles};
use super::mix::{Limiter, mix_into};
use super::rtp_out::{RtpOut, RtpTracks};
use super::sync::{PlayoutBuffer, Timed, VideoQueue, show_until};
use super::video_in::{VideoInput, VideoInputStats};
use crate::config::BridgeSettings;
use crate::media::amf0::{self, Value};
use crate::media::flv::{self, Tag};
use crate::media::jitter::{Packet as JitterPacket, Reorder, ReorderConfig};
use crate::room::Room;
use crate::rtmp::origin::{Origin, Publisher};
use crate::sfu::TrackRouter;
use crate::signaling::protocol::Kind;

const SAMPLE_RATE: u32 = 48_000;
/// Audio kept per input before the oldest is dropped back to the jitter target (bounds latency
/// when the sender's clock runs fast or a burst arrives after a stall).
const MAX_AUDIO_BUFFER_MS: u32 = 300;
/// Pictures kept per input while they wait for their audio (about half a second at 30 fps).
const VIDEO_QUEUE: usize = 16;

#[derive(Debug, Clone, Serialize)]
pub struct BridgeConfig {
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub video_bitrate: u32,
    /// Frames from one keyframe to the next.
    pub gop_frames: u32,
    pub audio_bitrate: u32,
    pub fit: Fit,
    /// Audio jitter buffer per input: playing starts once this much is buffered. Larger rides
    /// out worse networks and busier machines, at that much added latency.
    pub audio_buffer_ms: u32,
    /// Solo path: repeat unchanged pictures as skipped pictures while the host is alone.
    pub solo_repeat: bool,
    /// Mixing continues this long after the last co-host or PK partner is gone.
    pub solo_idle_ms: u64,
}

impl From<&BridgeSettings> for BridgeConfig {
    fn from(s: &BridgeSettings) -> Self {
        Self {
            width: s.width,
            height: s.height,
            fps: s.fps,
            video_bitrate: s.video_bitrate,
            gop_frames: ((s.gop.as_secs_f64() * f64::from(s.fps)).round() as u32).max(1),
            audio_bitrate: s.audio_bitrate,
            fit: s.fit,
            audio_buffer_ms: s.audio_buffer.as_millis().min(1000) as u32,
            solo_repeat: s.solo_repeat,
            solo_idle_ms: s.solo_idle.as_millis().min(u128::from(u64::MAX)) as u64,
        }
    }
}

impl Default for BridgeConfig {
    fn default() -> Self {
        Self::from(&BridgeSettings::default())
    }
}

/// One participant as the output loop sees it.
struct InputSlot {
    audio: Option<PlayoutBuffer>,
    audio_track: Option<Arc<TrackRouter>>,
    video: VideoQueue<Arc<I420>>,
    video_track: Option<Arc<TrackRouter>>,
    /// The video input's counters, refreshed by its task a few times a second.
    video_stats: Option<VideoInputStats>,
}

impl InputSlot {
    fn new() -> Self {
        Self {
            audio: None,
            audio_track: None,
            video: VideoQueue::new(VIDEO_QUEUE),
            video_track: None,
            video_stats: None,
        }
    }

    /// The picture to composite now (the last good one if nothing new is due), and when its
    /// last packet arrived if it is new on screen.
    fn picture(&mut self, now: Instant) -> (Option<Arc<I420>>, Option<Instant>) {
        let audio_sr = self.audio_track.as_ref().and_then(|t| t.sender_report());
        let video_sr = self.video_track.as_ref().and_then(|t| t.sender_report());
        let rate = self
            .video_track
            .as_ref()
            .map_or(90_000, |t| t.codec.clock_rate);
        let until = show_until(self.audio.as_ref(), audio_sr, video_sr, now, SAMPLE_RATE);
        let pic = self.video.show(until, video_sr, rate);
        // The host turned this camera off: a placeholder, not a frozen picture.
        if self.video_track.as_ref().is_some_and(|t| t.is_muted()) {
            return (None, None);
        }
        (pic, self.video.newly_shown())
    }
}

type Slots = Arc<Mutex<HashMap<String, InputSlot>>>;

#[derive(Debug, Default, Serialize)]
pub struct BridgeStats {
    pub video_frames: u64,
    pub audio_frames: u64,
    pub inputs: u64,
    /// Output frames sent as skipped pictures (the solo path: nothing changed on screen).
    pub repeated_frames: u64,
    /// Output frames that show at least one input picture not shown before.
    pub new_pictures: u64,
    /// Pictures the encoder's rate control dropped (they needed more bits than the bitrate
    /// allows), each sent as a repeat of the previous picture.
    pub dropped_pictures: u64,
    /// `solo` (the cheap path: the host alone, unchanged pictures not encoded) or `mixing`.
    pub path: &'static str,
    /// Input picture's last RTP packet received to the output frame showing it handed to the
    /// origin (decode, lip-sync hold, composite, encode), over the last 256 new pictures.
    pub latency_ms_p50: Option<f64>,
    pub latency_ms_p95: Option<f64>,
    /// Per video input: decoding, reordering buffer (jitter, hold, recovered/lost packets)
    /// and keyframe requests.
    pub video_inputs: Vec<VideoInputReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VideoInputReport {
    pub participant_id: String,
    pub track_id: String,
    #[serde(flatten)]
    pub stats: VideoInputStats,
}

/// The last few latency samples, in microseconds.
#[derive(Debug, Default)]
struct LatencyWindow {
    samples: std::collections::VecDeque<u32>,
}

impl LatencyWindow {
    const LEN: usize = 256;

    fn push(&mut self, d: Duration) {
        if self.samples.len() == Self::LEN {
            self.samples.pop_front();
        }
        self.samples
            .push_back(d.as_micros().min(u128::from(u32::MAX)) as u32);
    }

    /// Nearest-rank percentiles in milliseconds.
    fn percentiles(&self, ps: [f64; 2]) -> [Option<f64>; 2] {
        let mut v: Vec<u32> = self.samples.iter().copied().collect();
        v.sort_unstable();
        ps.map(|p| {
            let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len().max(1)) - 1;
            v.get(i).map(|us| f64::from(*us) / 1000.0)
        })
    }
}

/// A running bridge. Dropping it stops the pipeline and ends the origin stream.
pub struct Bridge {
    stop: watch::Sender<bool>,
    layout: Arc<Mutex<Option<Layout>>>,
    video_frames: Arc<AtomicU64>,
    audio_frames: Arc<AtomicU64>,
    inputs: Arc<AtomicU64>,
    repeated: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
    new_pictures: Arc<AtomicU64>,
    solo: Arc<AtomicBool>,
    latency: Arc<Mutex<LatencyWindow>>,
    slots: Slots,
    pub config: BridgeConfig,
    /// The output as RTP for WHEP viewers.
    rtp: RtpTracks,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.rtp.close();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Bridge {
    /// Pin a layout (`None`: follow the room: solo alone, pip with co-hosts).
    pub fn set_layout(&self, layout: Option<Layout>) {
        *lock(&self.layout) = layout;
    }

    pub fn layout(&self) -> Option<Layout> {
        *lock(&self.layout)
    }

    /// The output as RTP tracks (video H.264, audio Opus) that WHEP viewers subscribe to.
    pub fn rtp_tracks(&self) -> (Arc<TrackRouter>, Arc<TrackRouter>) {
        (self.rtp.video.clone(), self.rtp.audio.clone())
    }

    pub fn stats(&self) -> BridgeStats {
        let [p50, p95] = lock(&self.latency).percentiles([0.5, 0.95]);
        BridgeStats {
            video_frames: self.video_frames.load(Ordering::Relaxed),
            audio_frames: self.audio_frames.load(Ordering::Relaxed),
            inputs: self.inputs.load(Ordering::Relaxed),
            repeated_frames: self.repeated.load(Ordering::Relaxed),
            dropped_pictures: self.dropped.load(Ordering::Relaxed),
            new_pictures: self.new_pictures.load(Ordering::Relaxed),
            path: if self.solo.load(Ordering::Relaxed) {
                "solo"
            } else {
                "mixing"
            },
            latency_ms_p50: p50,
            latency_ms_p95: p95,
            video_inputs: lock(&self.slots)
                .iter()
                .filter_map(|(pid, slot)| {
                    Some(VideoInputReport {
                        participant_id: pid.clone(),
                        track_id: slot.video_track.as_ref()?.id.clone(),
                        stats: slot.video_stats.clone()?,
                    })
                })
                .collect(),
        }
    }

    pub fn start(
        room: Arc<Room>,
        origin: Arc<Origin>,
        config: BridgeConfig,
    ) -> Result<Bridge, String> {
        if !config.width.is_multiple_of(2) || !config.height.is_multiple_of(2) || config.fps == 0 {
            return Err("width and height must be even, fps > 0".into());
        }
        let publisher = origin.publish(&room.name).map_err(|e| e.to_string())?;
        let video = H264Encoder::new(
            config.width,
            config.height,
            config.fps as f32,
            config.video_bitrate,
            config.gop_frames,
        )
        .map_err(|e| e.to_string())?;
        let audio =
            AacEncoder::new(SAMPLE_RATE, true, config.audio_bitrate).map_err(|e| e.to_string())?;
        let (stop, stop_rx) = watch::channel(false);
        let (rtp_out, rtp) = RtpOut::new(&room.name, config.fps);
        let slots: Slots = Arc::default();
        let bridge = Bridge {
            rtp,
            stop,
            layout: Arc::new(Mutex::new(None)),
            video_frames: Arc::new(AtomicU64::new(0)),
            audio_frames: Arc::new(AtomicU64::new(0)),
            inputs: Arc::new(AtomicU64::new(0)),
            repeated: Arc::new(AtomicU64::new(0)),
            dropped: Arc::new(AtomicU64::new(0)),
            new_pictures: Arc::new(AtomicU64::new(0)),
            solo: Arc::new(AtomicBool::new(false)),
            latency: Arc::default(),
            slots: slots.clone(),
            config: config.clone(),
        };
        // Inputs follow the room's tracks.
        let buffer = (SAMPLE_RATE * config.audio_buffer_ms / 1000) as usize;
        tokio::spawn(follow_tracks(
            room.clone(),
            slots.clone(),
            bridge.inputs.clone(),
            buffer,
            stop_rx.clone(),
        ));
        let out = Output {
            room,
            slots,
            publisher,
            video,
            audio,
            config,
            layout: bridge.layout.clone(),
            video_frames: bridge.video_frames.clone(),
            audio_frames: bridge.audio_frames.clone(),
            latency: bridge.latency.clone(),
            limiter: Limiter::default(),
            repeated: bridge.repeated.clone(),
            dropped: bridge.dropped.clone(),
            new_pictures: bridge.new_pictures.clone(),
            solo: bridge.solo.clone(),
            last_multi: None,
            last_shown: None,
            rtp: rtp_out,
        };
        std::thread::Builder::new()
            .name("cohost-bridge".into())
            .spawn(move || out.run(stop_rx))
            .map_err(|e| e.to_string())?;
        Ok(bridge)
    }
}

/// Subscribe to every track of the room (now and later) with one decoding task each.
async fn follow_tracks(
    room: Arc<Room>,
    slots: Slots,
    count: Arc<AtomicU64>,
    audio_buffer: usize,
    mut stop: watch::Receiver<bool>,
) {
    let mut running: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        let tracks = room.tracks();
        for t in &tracks {
            if !running.contains_key(&t.id) {
                running.insert(
                    t.id.clone(),
                    tokio::spawn(input_task(t.clone(), slots.clone(), audio_buffer)),
                );
            }
        }
        running.retain(|id, h| {
            let keep = tracks.iter().any(|t| &t.id == id) && !h.is_finished();
            if !keep {
                h.abort();
            }
            keep
        });
        // The inputs followed now (not a running total).
        count.store(running.len() as u64, Ordering::Relaxed);
        // Participants whose tracks are all gone leave the layout.
        {
            let live: Vec<String> = tracks.iter().map(|t| t.participant_id.clone()).collect();
            lock(&slots).retain(|pid, _| live.contains(pid));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.changed() => break,
        }
    }
    for (_, h) in running {
        h.abort();
    }
}

/// Clears the input's part of its slot when the input task ends (track removed, or aborted).
struct Detach {
    slots: Slots,
    pid: String,
    kind: Kind,
}

impl Drop for Detach {
    fn drop(&mut self) {
        if let Some(slot) = lock(&self.slots).get_mut(&self.pid) {
            match self.kind {
                Kind::Audio => {
                    slot.audio = None;
                    slot.audio_track = None;
                }
                Kind::Video => slot.video_track = None,
            }
        }
    }
}

/// How often an input task copies its counters into the bridge stats.
const STATS_EVERY: Duration = Duration::from_millis(500);

/// Sleeps until `at`, or forever without one.
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

async fn input_task(router: Arc<TrackRouter>, slots: Slots, audio_buffer: usize) {
    let mut sub = router.subscribe(1024);
    let pid = router.participant_id.clone();
    let _detach = Detach {
        slots: slots.clone(),
        pid: pid.clone(),
        kind: router.kind,
    };
    {
        let mut s = lock(&slots);
        let slot = s.entry(pid.clone()).or_insert_with(InputSlot::new);
        match router.kind {
            Kind::Audio => {
                slot.audio = Some(PlayoutBuffer::new(
                    audio_buffer,
                    (SAMPLE_RATE * MAX_AUDIO_BUFFER_MS / 1000) as usize,
                ));
                slot.audio_track = Some(router.clone());
            }
            Kind::Video => slot.video_track = Some(router.clone()),
        }
    }
    match router.kind {
        Kind::Video => {
            if !router.codec.mime_type.eq_ignore_ascii_case("video/H264") {
                // VP8 is forwarded by the SFU but not decoded by the bridge yet: the
                // participant gets a placeholder tile.
                warn!(track = %router.id, codec = %router.codec.mime_type, "bridge cannot decode this codec; placeholder tile");
                std::future::pending::<()>().await;
                return;
            }
            let Ok(mut input) = VideoInput::new() else {
                return;
            };
            let mut stats_at = Instant::now();
            loop {
                // Wake for the next packet, or when the reordering buffer gives up a hole
                // (or a keyframe request is due again) with no packet coming.
                let deadline = input.deadline();
                let (r, arrived) = tokio::select! {
                    p = sub.rx.recv() => {
                        let Some(p) = p else { break };
                        let arrived = Instant::now();
                        input.set_rtt(router.stats.rtt());
                        let r = input.push(
                            p.header.sequence_number,
                            p.header.timestamp,
                            p.header.marker,
                            &p.payload,
                            arrived,
                        );
                        (r, arrived)
                    }
                    _ = sleep_until_opt(deadline) => {
                        let now = Instant::now();
                        (input.poll(now), now)
                    }
                };
                if r.need_keyframe {
                    router.request_keyframe();
                }
                let publish_stats = arrived >= stats_at;
                if publish_stats {
                    stats_at = arrived + STATS_EVERY;
                }
                let picture = r
                    .new_picture
                    .then(|| input.latest().cloned().zip(input.latest_rtp_timestamp()))
                    .flatten();
                if picture.is_some() || publish_stats {
                    let mut s = lock(&slots);
                    if let Some(slot) = s.get_mut(&pid) {
                        if let Some((picture, rtp)) = picture {
                            slot.video.push(Timed {
                                picture,
                                rtp,
                                arrived,
                            });
                        }
                        if publish_stats {
                            slot.video_stats = Some(input.stats());
                        }
                    }
                }
            }
        }
        Kind::Audio => {
            let Ok(mut input) = AudioInput::new() else {
                return;
            };
            // Reordered packets are put back in order before decoding (a late one would be
            // concealed and then dropped); the wait is short, the playout buffer is behind it.
            let mut reorder = Reorder::new(ReorderConfig::audio(), 48_000);
            loop {
                let now = tokio::select! {
                    p = sub.rx.recv() => {
                        let Some(p) = p else { break };
                        let now = Instant::now();
                        reorder.push(
                            JitterPacket {
                                seq: p.header.sequence_number,
                                timestamp: p.header.timestamp,
                                marker: p.header.marker,
                                payload: p.payload,
                            },
                            now,
                        );
                        now
                    }
                    _ = sleep_until_opt(reorder.deadline()) => Instant::now(),
                };
                while let Some(p) = reorder.pop(now) {
                    let (rtp, pcm) = input.push(p.seq, p.timestamp, &p.payload);
                    if let Some(buf) = lock(&slots).get_mut(&pid).and_then(|s| s.audio.as_mut()) {
                        buf.push(rtp, &pcm);
                    }
                }
            }
        }
    }
}

struct Output {
    room: Arc<Room>,
    slots: Slots,
    publisher: Publisher,
    video: H264Encoder,
    audio: AacEncoder,
    config: BridgeConfig,
    layout: Arc<Mutex<Option<Layout>>>,
    video_frames: Arc<AtomicU64>,
    audio_frames: Arc<AtomicU64>,
    latency: Arc<Mutex<LatencyWindow>>,
    limiter: Limiter,
    repeated: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
    new_pictures: Arc<AtomicU64>,
    solo: Arc<AtomicBool>,
    /// When the room last had more than its host on screen (co-hosts or a PK).
    last_multi: Option<Instant>,
    /// What the last output frame showed.
    last_shown: Option<Shown>,
    rtp: RtpOut,
}

/// What one output frame shows: layout and, per tile, which picture or a placeholder. Decoded
/// pictures are shared `Arc`s and never modified, so the same `Arc` means the same pixels;
/// holding them here keeps a freed picture's address from being reused by a new one while
/// they are compared.
struct Shown {
    layout: Layout,
    tiles: Vec<(Rect, Option<Arc<I420>>)>,
}

impl PartialEq for Shown {
    fn eq(&self, other: &Self) -> bool {
        self.layout == other.layout
            && self.tiles.len() == other.tiles.len()
            && self
                .tiles
                .iter()
                .zip(&other.tiles)
                .all(|((ra, pa), (rb, pb))| {
                    ra == rb
                        && match (pa, pb) {
                            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                            (None, None) => true,
                            _ => false,
                        }
                })
    }
}

/// The pictures of one output frame, before drawing.
struct Frame {
    layout: Layout,
    tiles: Vec<(Rect, Option<Arc<I420>>)>,
    /// Arrival times of the pictures new on it.
    fresh: Vec<Instant>,
    /// More than the host on screen: co-hosts or a PK partner.
    multi: bool,
}

impl Frame {
    fn shown(&self) -> Shown {
        Shown {
            layout: self.layout,
            tiles: self.tiles.clone(),
        }
    }
}

impl Output {
    fn metadata(&self) -> Tag {
        let c = &self.config;
        let meta = amf0::ecma([
            ("width", Value::Number(f64::from(c.width))),
            ("height", Value::Number(f64::from(c.height))),
            ("framerate", Value::Number(f64::from(c.fps))),
            ("videocodecid", Value::Number(7.0)),
            (
                "videodatarate",
                Value::Number(f64::from(c.video_bitrate / 1000)),
            ),
            ("audiocodecid", Value::Number(10.0)),
            (
                "audiodatarate",
                Value::Number(f64::from(c.audio_bitrate / 1000)),
            ),
            ("audiosamplerate", Value::Number(f64::from(SAMPLE_RATE))),
            ("audiochannels", Value::Number(2.0)),
            ("stereo", Value::Boolean(true)),
            ("encoder", Value::String("cohost".into())),
        ]);
        Tag {
            kind: flv::TAG_SCRIPT,
            timestamp_ms: 0,
            body: flv::script("onMetaData", &meta),
        }
    }

    /// What the output frame for now shows.
    fn frame(&self, now: Instant) -> Frame {
        let c = &self.config;
        // Host first, then the PK partner's host, then co-hosts (the room decides).
        let stage = self.room.stage();
        let mut slots = lock(&self.slots);
        let mut fresh = vec![];
        let shown: Vec<&String> = stage
            .order
            .iter()
            .filter(|p| slots.contains_key(*p))
            .collect();
        // Unless pinned, the layout follows the room: PK side by side, co-hosts in pip.
        let layout = lock(&self.layout).unwrap_or(if stage.pk {
            Layout::SideBySide
        } else if shown.len() > 1 {
            Layout::Pip
        } else {
            Layout::Solo
        });
        let mut drawn = vec![];
        for (pid, tile) in shown
            .iter()
            .zip(tiles(layout, shown.len(), c.width, c.height))
        {
            let (pic, arrived) = slots.get_mut(*pid).map_or((None, None), |s| s.picture(now));
            fresh.extend(arrived);
            drawn.push((tile, pic));
        }
        Frame {
            layout,
            tiles: drawn,
            fresh,
            multi: stage.pk || shown.len() > 1,
        }
    }

    fn draw(&self, frame: &Frame) -> Arc<I420> {
        let c = &self.config;
        let full = Rect::new(0, 0, c.width, c.height);
        // The host's picture usually has the output size and fills the canvas (solo, pip):
        // then it is the canvas as it is (solo) or the start of one (pip), which saves
        // filling 1.4 MB with black and copying it row by row on every frame.
        let (mut canvas, rest) = match frame.tiles.split_first() {
            Some(((tile, Some(pic)), rest))
                if *tile == full && (pic.width, pic.height) == (c.width, c.height) =>
            {
                if rest.is_empty() {
                    return pic.clone();
                }
                (I420::clone(pic), rest)
            }
            _ => (I420::new(c.width, c.height, Yuv::BLACK), &frame.tiles[..]),
        };
        for (tile, pic) in rest {
            match pic {
                Some(pic) => canvas.draw(&pic.view(), *tile, c.fit),
                None => canvas.fill(*tile, Yuv::PLACEHOLDER),
            }
        }
        Arc::new(canvas)
    }

    /// The solo path: the host has been alone (no co-host, no PK) for `solo_idle`.
    fn solo_path(&mut self, now: Instant, frame: &Frame) -> bool {
        if frame.multi {
            self.last_multi = Some(now);
        }
        let idle = Duration::from_millis(self.config.solo_idle_ms);
        let solo = self.config.solo_repeat
            && self
                .last_multi
                .is_none_or(|t| now.saturating_duration_since(t) >= idle);
        self.solo.store(solo, Ordering::Relaxed);
        solo
    }

    fn mix_block(&mut self) -> Vec<i16> {
        let mut blocks: Vec<Vec<i16>> = vec![];
        {
            let mut slots = lock(&self.slots);
            for audio in slots.values_mut().filter_map(|s| s.audio.as_mut()) {
                blocks.push(audio.pull(AAC_FRAME));
            }
        }
        let refs: Vec<&[i16]> = blocks.iter().map(|b| b.as_slice()).collect();
        let mut out = vec![0i16; AAC_FRAME * 2];
        mix_into(&mut out, &refs, &mut self.limiter);
        out
    }

    fn run(mut self, stop: watch::Receiver<bool>) {
        info!(room = %self.room.name, "bridge started");
        let start = Instant::now();
        let (mut frames, mut audio_samples) = (0u64, 0u64);
        let mut sent_headers = false;
        let fps = u64::from(self.config.fps);
        // Whole frames of encoder priming are not sent: the first frame sent then starts (within
        // a frame) with the first mixed sample, at timestamp 0 like the first video frame.
        let skip = (self.audio.delay / AAC_FRAME) as u64;
        let mut encoded = 0u64;
        // Room messages ride along as onTextData script tags (players that read them can show
        // chat over the video); start after what was said before the bridge started.
        let mut said = self.room.messages_since(0).last().map_or(0, |m| m.id);
        while !*stop.borrow() {
            let elapsed = start.elapsed();
            // Video frames due by now.
            while frames * 1_000_000 / fps <= elapsed.as_micros() as u64 {
                let now = Instant::now();
                if self.rtp.keyframe_due(now) {
                    self.video.force_keyframe();
                }
                let mut frame = self.frame(now);
                let shown = frame.shown();
                // Nothing changed on screen while the host is alone: repeat the last picture
                // without compositing or encoding (same SPS/PPS, frame rate and timestamps).
                let unchanged = self.last_shown.as_ref() == Some(&shown);
                let repeat = (self.solo_path(now, &frame) && sent_headers && unchanged)
                    .then(|| self.video.repeat())
                    .flatten();
                if repeat.is_some() {
                    self.repeated.fetch_add(1, Ordering::Relaxed);
                }
                self.last_shown = Some(shown);
                let fresh = std::mem::take(&mut frame.fresh);
                if !fresh.is_empty() {
                    self.new_pictures.fetch_add(1, Ordering::Relaxed);
                }
                let picture = match repeat {
                    Some(v) => Ok(v),
                    None => self.video.encode(&self.draw(&frame)),
                };
                match picture {
                    Ok(v) => {
                        if v.dropped {
                            // The output still shows the picture before: encode the next
                            // frame even if nothing changes on screen.
                            self.dropped.fetch_add(1, Ordering::Relaxed);
                            self.last_shown = None;
                        }
                        self.rtp.video(&v, frames);
                        let ts = (frames * 1000 / fps) as u32;
                        if !sent_headers {
                            let Some(cfg) = v.config.as_ref() else {
                                // The first frame of an encoder is always an IDR with SPS/PPS.
                                frames += 1;
                                continue;
                            };
                            self.publisher.send(self.metadata());
                            self.publisher.send(Tag {
                                kind: flv::TAG_VIDEO,
                                timestamp_ms: 0,
                                body: flv::avc_sequence_header(cfg),
                            });
                            self.publisher.send(Tag {
                                kind: flv::TAG_AUDIO,
                                timestamp_ms: 0,
                                body: flv::aac_sequence_header(&self.audio.asc),
                            });
                            sent_headers = true;
                        }
                        self.publisher.send(Tag {
                            kind: flv::TAG_VIDEO,
                            timestamp_ms: ts,
                            body: flv::avc_frame(v.keyframe, 0, &v.avcc),
                        });
                        self.video_frames.fetch_add(1, Ordering::Relaxed);
                        let sent = Instant::now();
                        let mut w = lock(&self.latency);
                        for a in fresh {
                            w.push(sent.saturating_duration_since(a));
                        }
                    }
                    Err(e) => warn!("bridge video encode: {e}"),
                }
                frames += 1;
            }
            if sent_headers {
                for m in self.room.messages_since(said) {
                    said = m.id;
                    let ts = (frames * 1000 / fps) as u32;
                    self.publisher.send(text_data(&m, ts));
                }
            }
            // Audio blocks due by now.
            while audio_samples * 1_000_000 / u64::from(SAMPLE_RATE) <= elapsed.as_micros() as u64 {
                let block = self.mix_block();
                self.rtp.audio(&block, audio_samples);
                if let Ok(frames_out) = self.audio.push(&block) {
                    for f in frames_out {
                        encoded += 1;
                        let Some(n) = (encoded - 1).checked_sub(skip) else {
                            continue;
                        };
                        self.audio_frames.fetch_add(1, Ordering::Relaxed);
                        let ts = (n * AAC_FRAME as u64 * 1000 / u64::from(SAMPLE_RATE)) as u32;
                        if sent_headers {
                            self.publisher.send(Tag {
                                kind: flv::TAG_AUDIO,
                                timestamp_ms: ts,
                                body: flv::aac_frame(&f),
                            });
                        }
                    }
                }
                audio_samples += AAC_FRAME as u64;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        info!(room = %self.room.name, frames, "bridge stopped");
    }
}

/// A room message as an FLV `onTextData` script tag (the form players such as flv.js and
/// Flash-era tools expose as text tracks): `type`, `text`, `from`, `id`.
fn text_data(m: &crate::signaling::protocol::RoomMessage, ts: u32) -> Tag {
    use crate::signaling::protocol::MessageBody as B;
    let (kind, text) = match &m.body {
        B::Chat { text } => ("chat", text.clone()),
        B::Like { count } => ("like", count.to_string()),
        B::Gift { gift, count } => ("gift", format!("{gift} x{count}")),
        B::Joined { .. } => ("joined", String::new()),
        B::Left { .. } => ("left", String::new()),
        B::Notice { text } => ("notice", text.clone()),
    };
    let from = m
        .from
        .as_ref()
        .map_or(String::new(), |f| f.identity.clone());
    let data = amf0::ecma([
        ("type", Value::String(kind.into())),
        ("text", Value::String(text)),
        ("from", Value::String(from)),
        ("id", Value::Number(m.id as f64)),
    ]);
    Tag {
        kind: flv::TAG_SCRIPT,
        timestamp_ms: ts,
        body: flv::script("onTextData", &data),
    }
}
