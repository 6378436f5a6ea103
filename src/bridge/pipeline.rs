//! The bridge pipeline of one room: every published track is subscribed through the same
//! interface as any SFU subscriber and handled by its own task (reordering, depacketizing,
//! decoding when the mix needs it), and one output loop ([`super::output`]) samples the inputs:
//! it passes the host through while the host is alone, composites and encodes otherwise, mixes
//! audio in AAC-sized blocks, and publishes FLV tags into the embedded origin under the room's
//! name. Each participant's audio plays through a jitter buffer and its video follows that
//! audio (see [`super::sync`]), so lips and voice stay together.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::audio_in::AudioInput;
use super::compose::I420;
use super::encode::AacEncoder;
use super::layout::{Fit, Layout};
use super::output::{Output, OutputCounters, OutputShared, PathStats};
use super::rtp_out::{RtpOut, RtpTracks};
use super::sync::{PlayoutBuffer, Timed, VideoQueue, show_until};
use super::video_in::{VideoInput, VideoInputStats};
use crate::config::BridgeSettings;
use crate::media::jitter::{Packet as JitterPacket, Reorder, ReorderConfig};
use crate::media::rtp_h264::AccessUnit;
use crate::room::Room;
use crate::rtmp::origin::Origin;
use crate::sfu::{LayerControl, TrackRouter};
use crate::signaling::protocol::Kind;

pub const SAMPLE_RATE: u32 = 48_000;
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
    /// Take the output size from the host's first SPS (`width`/`height`: only without one).
    pub size_from_host: bool,
    /// Pass the host's own H.264 through while the host is alone on screen.
    pub passthrough: bool,
    /// A host whose IDRs come further apart than this is mixed instead.
    pub passthrough_max_gop_ms: u64,
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
            size_from_host: s.size_from_host,
            passthrough: s.passthrough,
            passthrough_max_gop_ms: s.passthrough_max_gop.as_millis().min(u128::from(u64::MAX))
                as u64,
        }
    }
}

impl Default for BridgeConfig {
    fn default() -> Self {
        Self::from(&BridgeSettings::default())
    }
}

/// Access units of the passthrough source waiting for the output loop (about two seconds);
/// past that the loop has fallen behind, and passing through restarts at an IDR.
const MAX_UNITS: usize = 64;

/// What the output loop tells a video input, and what the input tells back.
#[derive(Debug)]
pub struct VideoCtl {
    /// Decode pictures (off while the input is passed through untouched).
    pub decode: AtomicBool,
    /// Hand whole access units to the output loop (the passthrough source).
    pub forward: AtomicBool,
    /// Decoding is on and has produced a picture since it was turned on.
    pub ready: AtomicBool,
}

impl Default for VideoCtl {
    fn default() -> Self {
        Self {
            decode: AtomicBool::new(true),
            forward: AtomicBool::new(false),
            ready: AtomicBool::new(false),
        }
    }
}

/// One participant as the output loop sees it.
pub struct InputSlot {
    pub audio: Option<PlayoutBuffer>,
    pub audio_track: Option<Arc<TrackRouter>>,
    pub video: VideoQueue<Arc<I420>>,
    pub video_track: Option<Arc<TrackRouter>>,
    /// Chooses the simulcast layer of `video_track`'s subscription (a no-op on a plain track).
    pub video_layers: Option<LayerControl>,
    /// The tile size the layer was last chosen for (`None`: the top layer asked for).
    pub layer_for: Option<Option<(u32, u32)>>,
    /// The video input's counters, refreshed by its task a few times a second.
    pub video_stats: Option<VideoInputStats>,
    pub ctl: Arc<VideoCtl>,
    /// Access units for passthrough (only while `ctl.forward`).
    pub units: VecDeque<Arc<AccessUnit>>,
    /// Units were dropped from `units` (the output loop fell behind).
    pub units_dropped: bool,
}

impl InputSlot {
    fn new() -> Self {
        Self {
            audio: None,
            audio_track: None,
            video: VideoQueue::new(VIDEO_QUEUE),
            video_track: None,
            video_layers: None,
            layer_for: None,
            video_stats: None,
            ctl: Arc::default(),
            units: VecDeque::new(),
            units_dropped: false,
        }
    }

    /// The sender report for the video timestamps this input receives: on a simulcast track
    /// the forwarded layer's, moved onto the subscription's timestamps (the track's own report
    /// is the top layer's, whose timestamp base another layer does not share).
    pub fn video_sr(&self) -> Option<crate::sfu::SenderReport> {
        match &self.video_layers {
            Some(c) => c.sender_report(),
            None => self.video_track.as_ref().and_then(|t| t.sender_report()),
        }
    }

    /// How far this participant's video may be shown now (it follows its audio).
    pub fn show_until(&self, now: Instant) -> super::sync::ShowUntil {
        let audio_sr = self.audio_track.as_ref().and_then(|t| t.sender_report());
        let video_sr = self.video_sr();
        show_until(self.audio.as_ref(), audio_sr, video_sr, now, SAMPLE_RATE)
    }

    /// The picture to composite now (the last good one if nothing new is due), and when its
    /// last packet arrived if it is new on screen.
    pub fn picture(&mut self, now: Instant) -> (Option<Arc<I420>>, Option<Instant>) {
        let audio_sr = self.audio_track.as_ref().and_then(|t| t.sender_report());
        let video_sr = self.video_sr();
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

pub type Slots = Arc<Mutex<HashMap<String, InputSlot>>>;

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
    /// The output's path (`passthrough`: the host's own video, nothing decoded or encoded;
    /// `mixing`), why it mixes, switches so far, encoder and passthrough frame counts, size.
    #[serde(flatten)]
    pub path: PathStats,
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
    /// Simulcast inputs only: the rid of the layer the bridge receives now, and of the one it
    /// asked for (the smallest that covers the input's tile; they differ until that layer's
    /// next keyframe).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer_target: Option<String>,
    #[serde(flatten)]
    pub stats: VideoInputStats,
}

/// The last few latency samples, in microseconds.
#[derive(Debug, Default)]
pub struct LatencyWindow {
    samples: std::collections::VecDeque<u32>,
}

impl LatencyWindow {
    const LEN: usize = 256;

    pub fn push(&mut self, d: Duration) {
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
    counters: Arc<OutputCounters>,
    inputs: Arc<AtomicU64>,
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

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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
        let c = &self.counters;
        BridgeStats {
            video_frames: c.video_frames.load(Ordering::Relaxed),
            audio_frames: c.audio_frames.load(Ordering::Relaxed),
            inputs: self.inputs.load(Ordering::Relaxed),
            repeated_frames: c.repeated.load(Ordering::Relaxed),
            dropped_pictures: c.dropped.load(Ordering::Relaxed),
            new_pictures: c.new_pictures.load(Ordering::Relaxed),
            path: lock(&c.path).clone(),
            latency_ms_p50: p50,
            latency_ms_p95: p95,
            video_inputs: lock(&self.slots)
                .iter()
                .filter_map(|(pid, slot)| {
                    let (layer, layer_target) = slot
                        .video_layers
                        .as_ref()
                        .and_then(LayerControl::layers)
                        .unwrap_or_default();
                    Some(VideoInputReport {
                        participant_id: pid.clone(),
                        track_id: slot.video_track.as_ref()?.id.clone(),
                        layer,
                        layer_target,
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
        let audio =
            AacEncoder::new(SAMPLE_RATE, true, config.audio_bitrate).map_err(|e| e.to_string())?;
        let (stop, stop_rx) = watch::channel(false);
        let (rtp_out, rtp) = RtpOut::new(&room.name);
        let slots: Slots = Arc::default();
        let bridge = Bridge {
            rtp,
            stop,
            layout: Arc::new(Mutex::new(None)),
            counters: Arc::default(),
            inputs: Arc::new(AtomicU64::new(0)),
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
        let out = Output::new(
            room,
            slots,
            publisher,
            audio,
            config,
            OutputShared {
                layout: bridge.layout.clone(),
                counters: bridge.counters.clone(),
                latency: bridge.latency.clone(),
            },
            rtp_out,
        );
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
    router: Arc<TrackRouter>,
}

impl Drop for Detach {
    fn drop(&mut self) {
        if let Some(slot) = lock(&self.slots).get_mut(&self.pid) {
            match self.kind {
                Kind::Audio => {
                    slot.audio = None;
                    slot.audio_track = None;
                }
                // Another video track of the participant may be the current one.
                Kind::Video => {
                    if slot
                        .video_track
                        .as_ref()
                        .is_some_and(|t| Arc::ptr_eq(t, &self.router))
                    {
                        slot.video_track = None;
                        slot.video_layers = None;
                        slot.layer_for = None;
                    }
                }
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
    // The output loop picks this subscription's simulcast layer from the tile it shows.
    let layers = sub.control();
    let pid = router.participant_id.clone();
    let _detach = Detach {
        slots: slots.clone(),
        pid: pid.clone(),
        kind: router.kind,
        router: router.clone(),
    };
    let ctl = {
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
            Kind::Video => {
                slot.video_track = Some(router.clone());
                slot.video_layers = Some(layers.clone());
                slot.layer_for = None;
            }
        }
        slot.ctl.clone()
    };
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
            let mut resumed = false;
            // The layer received when the stats were last published (switches are logged).
            let mut layer_seen: Option<String> = None;
            loop {
                // Wake for the next packet, or when the reordering buffer gives up a hole
                // (or a keyframe request is due again) with no packet coming.
                let deadline = input.deadline();
                let (mut r, arrived) = tokio::select! {
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
                // The output loop turns decoding off while it passes this input through, and
                // on again (decoding what was kept since the last IDR) when it will mix.
                let decode = ctl.decode.load(Ordering::Relaxed);
                if decode != input.decoding() {
                    let d = input.set_decode(decode, arrived);
                    r.need_keyframe |= d.need_keyframe;
                    r.new_picture |= d.new_picture;
                    ctl.ready.store(false, Ordering::Relaxed);
                    // The first picture decoded after this goes on screen at once.
                    resumed = decode;
                }
                if r.new_picture && input.decoding() {
                    ctl.ready.store(true, Ordering::Relaxed);
                }
                if r.need_keyframe {
                    // Of the layer received (or being switched to), not of every layer.
                    layers.request_keyframe();
                }
                let forward = ctl.forward.load(Ordering::Relaxed) && !r.units.is_empty();
                let publish_stats = arrived >= stats_at;
                if publish_stats {
                    stats_at = arrived + STATS_EVERY;
                    if let Some((Some(now_on), _)) = layers.layers()
                        && layer_seen.as_ref() != Some(&now_on)
                    {
                        debug!(track = %router.id, participant = %pid, from = ?layer_seen, to = %now_on, "bridge input switched simulcast layer");
                        layer_seen = Some(now_on);
                    }
                }
                let picture = r
                    .new_picture
                    .then(|| input.latest().cloned().zip(input.latest_rtp_timestamp()))
                    .flatten();
                if picture.is_some() || publish_stats || forward {
                    let mut s = lock(&slots);
                    if let Some(slot) = s.get_mut(&pid) {
                        // A participant with two video tracks (a camera and a screen) has one
                        // tile and one passthrough queue: only its newest video track feeds
                        // them, so two streams never interleave in one queue.
                        // The current one ended: the one still sending takes over.
                        if slot.video_track.is_none() {
                            slot.video_track = Some(router.clone());
                            slot.video_layers = Some(layers.clone());
                            slot.layer_for = None;
                        }
                        let current = slot
                            .video_track
                            .as_ref()
                            .is_some_and(|t| Arc::ptr_eq(t, &router));
                        let (forward, picture) = if current {
                            (forward, picture)
                        } else {
                            (false, None)
                        };
                        if forward {
                            for au in r.units.drain(..) {
                                if slot.units.len() >= MAX_UNITS {
                                    slot.units.clear();
                                    slot.units_dropped = true;
                                }
                                slot.units.push_back(au);
                            }
                        }
                        if let Some((picture, rtp)) = picture {
                            if std::mem::take(&mut resumed) {
                                // Decoding was off while the host was passed through: what
                                // the queue holds is old, and this picture is where the
                                // output is now.
                                slot.video.reset_to(picture);
                            } else {
                                slot.video.push(Timed {
                                    picture,
                                    rtp,
                                    arrived,
                                });
                            }
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
