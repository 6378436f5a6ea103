//! The bridge's output loop (one thread per room): decides per tick whether viewers get the
//! host passed through or the mix ([`super::passthrough`]), composites and encodes while
//! mixing, mixes and encodes audio always, and publishes FLV tags into the embedded origin (and
//! RTP for WHEP viewers of the mix).
//!
//! Output timestamps come from the output clock (frame and sample counters; the host's RTP
//! spacing while passing through), never straight from the inputs, and never go back, so they
//! are monotonic and continuous whatever the participants do. Parameters (size, frame rate,
//! sample rate, channels) and the one AVC sequence header are fixed when the stream starts: at
//! the host's first IDR, whose SPS gives the size unless one was asked for.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::compose::{I420, Yuv};
use super::encode::{AAC_FRAME, AacEncoder, EncodedVideo, H264Encoder};
use super::layout::{Layout, Rect, tiles};
use super::mix::{Limiter, mix_into};
use super::passthrough::{
    PASS_RELEASE_LAG_MS, PASS_WAKE_BLOCKS, PassClock, Path, Reason, SourceSets, SourceState,
    Switcher,
};
use super::pipeline::{BridgeConfig, SAMPLE_RATE, Slots, lock};
use super::rtp_out::RtpOut;
use super::slate;
use crate::media::amf0::{self, Value};
use crate::media::flv::{self, Tag};
use crate::media::h264::{self, nal_type, split_annexb};
use crate::media::h264_ids;
use crate::media::rtp_h264::AccessUnit;
use crate::room::Room;
use crate::rtmp::origin::Publisher;
use crate::sfu::LayerRequest;

/// How long the stream waits for the host's first IDR (its size and parameter sets) before it
/// starts without them: mixed, at the configured size.
pub const HOST_WAIT: Duration = Duration::from_secs(5);
/// While passing through, a keyframe request after a break (new source, dropped units) is
/// repeated this often until an IDR comes.
const BREAK_RETRY: Duration = Duration::from_secs(1);
/// Access units of the source held back for lip sync at most (about three seconds at 30 fps;
/// the audio buffer holds far less): past it the oldest is dropped and passing through
/// restarts at the next IDR.
const MAX_HELD: usize = 90;
/// Where the host's picture was while the host is away: the slate (participant ids never hold
/// a NUL).
const AWAY: &str = "\0host-away";

/// The output's path as the bridge stats show it.
#[derive(Debug, Default, Clone, Serialize)]
pub struct PathStats {
    /// `starting` (waiting for the host's first IDR), `passthrough` or `mixing`.
    pub path: &'static str,
    /// Why mixing (or about to): see [`Reason`].
    pub mix_reason: Option<&'static str>,
    /// Switches between passthrough and mixing so far.
    pub switches: u64,
    /// Pictures the bridge's encoder encoded (0 while the host has only been passed through).
    pub encoded_frames: u64,
    /// Output frames that were the host's own access units.
    pub passthrough_frames: u64,
    /// The output picture size (0 before the stream starts).
    pub width: u32,
    pub height: u32,
}

/// What the output loop shares with the [`super::pipeline::Bridge`] handle.
pub struct OutputShared {
    pub layout: Arc<Mutex<Option<Layout>>>,
    pub counters: Arc<OutputCounters>,
    pub latency: Arc<Mutex<super::pipeline::LatencyWindow>>,
}

/// Counters the output loop shares with [`super::pipeline::Bridge::stats`].
#[derive(Default)]
pub struct OutputCounters {
    pub video_frames: AtomicU64,
    pub audio_frames: AtomicU64,
    pub repeated: AtomicU64,
    pub dropped: AtomicU64,
    pub new_pictures: AtomicU64,
    pub path: Mutex<PathStats>,
}

pub struct Output {
    pub room: Arc<Room>,
    pub slots: Slots,
    pub publisher: Publisher,
    pub audio: AacEncoder,
    pub config: BridgeConfig,
    pub layout: Arc<Mutex<Option<Layout>>>,
    pub counters: Arc<OutputCounters>,
    pub latency: Arc<Mutex<super::pipeline::LatencyWindow>>,
    pub rtp: RtpOut,
    limiter: Limiter,
    /// Created when the stream starts (its size may be the host's).
    video: Option<H264Encoder>,
    /// The stream started: headers sent, size fixed.
    started: bool,
    width: u32,
    height: u32,
    /// The host's parameter sets in the stream header (`None`: the stream started without
    /// them, and only mixes).
    sets: Option<SourceSets>,
    switcher: Option<Switcher>,
    clock: PassClock,
    /// The participant whose access units are forwarded to the output loop now.
    source: Option<String>,
    /// Whether the source's access units can be passed on (and why not).
    source_state: SourceState,
    /// Passing through must restart at an IDR (new source, units dropped, back from mixing).
    need_idr: bool,
    last_break_request: Option<Instant>,
    /// The source's access units waiting for their audio (lip sync), with when they came.
    held: VecDeque<(Arc<AccessUnit>, Instant, bool)>,
    /// Timestamp of the last video tag sent.
    last_ts: Option<i64>,
    /// When the room last had more than its host on screen (co-hosts or a PK).
    last_multi: Option<Instant>,
    /// What the last output frame showed.
    last_shown: Option<Shown>,
    /// The host-away slate as last drawn, with its countdown step (redrawn when it moves).
    slate: Option<(u32, Arc<I420>)>,
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
}

impl Frame {
    fn shown(&self) -> Shown {
        Shown {
            layout: self.layout,
            tiles: self.tiles.clone(),
        }
    }
}

/// Who is on screen and how, without touching any picture.
struct Scene {
    layout: Layout,
    pinned: bool,
    shown: Vec<String>,
    /// More than the host on screen: co-hosts or a PK partner.
    multi: bool,
    /// The first picture on screen is this room's host's (not a co-host's, nor the slate,
    /// while the host has no video in the bridge).
    host_first: bool,
    /// The host is away (the slate is shown first): the part of the grace period left.
    away: Option<f32>,
}

impl Output {
    pub fn new(
        room: Arc<Room>,
        slots: Slots,
        publisher: Publisher,
        audio: AacEncoder,
        config: BridgeConfig,
        shared: OutputShared,
        rtp: RtpOut,
    ) -> Self {
        Self {
            room,
            slots,
            publisher,
            audio,
            layout: shared.layout,
            counters: shared.counters,
            latency: shared.latency,
            rtp,
            limiter: Limiter::default(),
            video: None,
            started: false,
            width: config.width,
            height: config.height,
            config,
            sets: None,
            switcher: None,
            clock: PassClock::default(),
            source: None,
            source_state: SourceState::default(),
            need_idr: true,
            last_break_request: None,
            held: VecDeque::new(),
            last_ts: None,
            last_multi: None,
            last_shown: None,
            slate: None,
        }
    }

    fn metadata(&self) -> Tag {
        let c = &self.config;
        let meta = amf0::ecma([
            ("width", Value::Number(f64::from(self.width))),
            ("height", Value::Number(f64::from(self.height))),
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

    fn scene(&self) -> Scene {
        // Host first, then the PK partner's host, then co-hosts (the room decides).
        let stage = self.room.stage();
        let slots = lock(&self.slots);
        let hosts = &stage.order[..stage.hosts.min(stage.order.len())];
        let mut shown: Vec<String> = stage
            .order
            .iter()
            .filter(|p| slots.contains_key(*p))
            .cloned()
            .collect();
        // The host dropped out: the slate takes the host's place until the host is back.
        if stage.host_away.is_some() {
            shown.insert(0, AWAY.to_string());
        }
        let pinned = *lock(&self.layout);
        // Unless pinned, the layout follows the room: PK side by side, co-hosts in pip.
        let layout = pinned.unwrap_or(if stage.pk {
            Layout::SideBySide
        } else if shown.len() > 1 {
            Layout::Pip
        } else {
            Layout::Solo
        });
        let host_first = shown.first().is_some_and(|p| hosts.contains(p));
        Scene {
            layout,
            pinned: pinned.is_some(),
            host_first,
            multi: stage.pk || shown.len() > 1,
            shown,
            away: stage.host_away,
        }
    }

    /// The host-away slate at the output size with `left` of the grace period remaining; the
    /// same picture (`Arc`) until the countdown bar moves, so the frames between repeat.
    fn slate(&mut self, left: f32) -> Arc<I420> {
        let step = (left * 100.0).ceil() as u32;
        match &self.slate {
            Some((s, pic)) if *s == step => pic.clone(),
            _ => {
                let pic = Arc::new(slate::render(self.width, self.height, left));
                self.slate = Some((step, pic.clone()));
                pic
            }
        }
    }

    /// What the output frame for now shows.
    fn frame(&mut self, now: Instant, scene: &Scene) -> Frame {
        let slate = scene.away.map(|left| self.slate(left));
        let mut slots = lock(&self.slots);
        let mut fresh = vec![];
        let mut drawn = vec![];
        for (pid, tile) in scene.shown.iter().zip(tiles(
            scene.layout,
            scene.shown.len(),
            self.width,
            self.height,
        )) {
            let (pic, arrived) = if pid == AWAY {
                (slate.clone(), None)
            } else {
                slots.get_mut(pid).map_or((None, None), |s| s.picture(now))
            };
            fresh.extend(arrived);
            drawn.push((tile, pic));
        }
        Frame {
            layout: scene.layout,
            tiles: drawn,
            fresh,
        }
    }

    fn draw(&self, frame: &Frame) -> Arc<I420> {
        let c = &self.config;
        let full = Rect::new(0, 0, self.width, self.height);
        // The host's picture usually has the output size and fills the canvas (solo, pip):
        // then it is the canvas as it is (solo) or the start of one (pip), which saves
        // filling 1.4 MB with black and copying it row by row on every frame.
        let (mut canvas, rest) = match frame.tiles.split_first() {
            Some(((tile, Some(pic)), rest))
                if *tile == full && (pic.width, pic.height) == (self.width, self.height) =>
            {
                if rest.is_empty() {
                    return pic.clone();
                }
                (I420::clone(pic), rest)
            }
            _ => (
                I420::new(self.width, self.height, Yuv::BLACK),
                &frame.tiles[..],
            ),
        };
        for (tile, pic) in rest {
            match pic {
                Some(pic) => canvas.draw(&pic.view(), *tile, c.fit),
                None => canvas.fill(*tile, Yuv::PLACEHOLDER),
            }
        }
        Arc::new(canvas)
    }

    /// Whether others were on screen less than `solo_idle` ago (mixing continues that long,
    /// so a co-host dropping and rejoining does not flip paths).
    fn recently_multi(&mut self, now: Instant, multi: bool) -> bool {
        if multi {
            self.last_multi = Some(now);
        }
        let idle = Duration::from_millis(self.config.solo_idle_ms);
        self.last_multi
            .is_some_and(|t| now.saturating_duration_since(t) < idle)
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

    /// Make `pid` the participant whose access units come to the output loop (and who may
    /// stop decoding); every other input decodes and forwards nothing.
    fn set_source(&mut self, pid: Option<&String>) {
        if self.source.as_ref() == pid {
            return;
        }
        self.held.clear();
        let mut slots = lock(&self.slots);
        if let Some(old) = self.source.as_ref().and_then(|p| slots.get_mut(p)) {
            old.ctl.forward.store(false, Ordering::Relaxed);
            old.ctl.decode.store(true, Ordering::Relaxed);
            old.units.clear();
        }
        if let Some(new) = pid.and_then(|p| slots.get_mut(p)) {
            new.units.clear();
            new.ctl.forward.store(true, Ordering::Relaxed);
        }
        self.source = pid.cloned();
        self.source_state = SourceState::default();
        self.need_idr = true;
    }

    /// The source's access units that arrived since the last call (and whether some were
    /// dropped because the loop fell behind).
    fn take_units(&mut self) -> Vec<Arc<AccessUnit>> {
        let mut slots = lock(&self.slots);
        let Some(slot) = self.source.as_ref().and_then(|p| slots.get_mut(p)) else {
            return vec![];
        };
        if std::mem::take(&mut slot.units_dropped) {
            self.need_idr = true;
        }
        slot.units.drain(..).collect()
    }

    /// The source's simulcast top layer size: `None` for a plain track (any IDR will do),
    /// `Some(None)` while the top layer's size is not known yet.
    fn source_top_size(&self) -> Option<Option<(u32, u32)>> {
        let slots = lock(&self.slots);
        let track = self
            .source
            .as_ref()
            .and_then(|p| slots.get(p))?
            .video_track
            .as_ref()?;
        let sizes = track.layer_sizes();
        let top = sizes.last()?;
        Some(*top)
    }

    /// Ask each simulcast video input for the smallest layer that covers its tile at the
    /// output size (the rule SFU subscribers get, [`crate::sfu::layers::layer_for_size`]), so
    /// a co-host in a pip tile is decoded from a small layer. The host alone on screen gets
    /// the top layer: passing through carries the host's own stream, whose size is the
    /// output's. Asked again only when a tile changes (layout, who is on screen); the SFU
    /// answers a size request again itself when the layers' sizes become known.
    fn choose_layers(&mut self, scene: &Scene) {
        if !self.started {
            // The output size is not fixed yet; subscriptions start on the top layer.
            return;
        }
        let rects = tiles(scene.layout, scene.shown.len(), self.width, self.height);
        let mut asks = vec![];
        {
            let mut slots = lock(&self.slots);
            for (pid, slot) in slots.iter_mut() {
                let Some(ctl) = slot.video_layers.clone() else {
                    continue;
                };
                let Some(top) = ctl.router().layers().last().cloned() else {
                    // A plain track: nothing to choose.
                    continue;
                };
                let want = match scene.shown.iter().position(|p| p == pid) {
                    // The host alone on screen: the top layer (`None`).
                    Some(0) if scene.layout == Layout::Solo => None,
                    // Shown but without a tile in this layout, or not on screen: the
                    // smallest layer, decoded only to be ready when it is shown.
                    Some(i) => Some(rects.get(i).map_or((1, 1), |r| (r.w, r.h))),
                    None => Some((1, 1)),
                };
                if slot.layer_for == Some(want) {
                    continue;
                }
                slot.layer_for = Some(want);
                asks.push((pid.clone(), ctl, want, top));
            }
        }
        // Outside the slots lock: selecting takes the track's locks.
        for (pid, ctl, want, top) in asks {
            let req = match want {
                None => LayerRequest::Rid(top),
                Some((width, height)) => LayerRequest::MaxSize { width, height },
            };
            match ctl.select(req) {
                Ok(rid) => info!(
                    room = %self.room.name,
                    participant = %pid,
                    track = %ctl.router().id,
                    tile = ?want,
                    layer = ?rid,
                    "bridge input asks for simulcast layer"
                ),
                Err(e) => {
                    debug!(room = %self.room.name, participant = %pid, "bridge layer choice: {e}")
                }
            }
        }
    }

    /// Before the stream starts: wait for the host's first IDR (at most [`HOST_WAIT`]), then
    /// fix the size, make the encoder and send the headers.
    fn try_start(&mut self, now: Instant, since_start: Duration, now_ms: i64) {
        let scene = self.scene();
        self.set_source(scene.shown.first());
        let units = self.take_units();
        // A simulcast host may reach the bridge on a lower layer first (a subscription starts
        // on whichever layer's keyframe comes first, then moves to the top): the stream's size
        // and header come from the top layer's IDR only, or passing through would carry the
        // small picture, and the top layer's slices would never match the header.
        let top = self.source_top_size();
        let first_idr = units.iter().position(|au| {
            au.keyframe
                && top.is_none_or(|t| t.is_some() && SourceSets::from_idr(au).map(|s| s.size) == t)
        });
        let sets = first_idr.and_then(|i| SourceSets::from_idr(&units[i]));
        // Wait for the host's picture, also while a co-host's is first on screen (the host's
        // input may come a moment later).
        if (sets.is_none() || !scene.host_first) && since_start < HOST_WAIT {
            return;
        }
        let c = &self.config;
        // The size is the host's, never a co-host's: a host without video in the bridge (yet)
        // leaves a co-host first on screen, whose small picture must not become the stream's
        // size for its whole life (seen in CI: 320x240). Then the configured size.
        if let Some(s) = &sets
            && c.size_from_host
            && scene.host_first
            && crate::config::check_output(s.size.0, s.size.1, c.fps).is_ok()
        {
            (self.width, self.height) = s.size;
        }
        let encoder = H264Encoder::new(
            self.width,
            self.height,
            c.fps as f32,
            c.video_bitrate,
            c.gop_frames,
        );
        let mut encoder = match (encoder, &sets) {
            (Ok(e), Some(s)) => {
                let (sps, pps) = s.free_ids();
                e.with_ids(sps, pps)
            }
            (Ok(e), None) => e,
            (Err(e), _) => {
                warn!(room = %self.room.name, "bridge encoder: {e}");
                return;
            }
        };
        let (esps, epps) = match encoder.probe() {
            Ok(p) => p,
            Err(e) => {
                warn!(room = %self.room.name, "bridge encoder: {e}");
                return;
            }
        };
        let record = match &sets {
            Some(s) => h264_ids::decoder_config(&[&s.sps, &esps], &[&s.pps, &epps]),
            None => h264_ids::decoder_config(&[&esps], &[&epps]),
        };
        let Some(record) = record else {
            warn!(room = %self.room.name, "bridge: no decoder configuration record");
            return;
        };
        self.video = Some(encoder);
        self.publisher.send(self.metadata());
        self.publisher.send(Tag {
            kind: flv::TAG_VIDEO,
            timestamp_ms: 0,
            body: flv::avc_sequence_header(&record),
        });
        self.publisher.send(Tag {
            kind: flv::TAG_AUDIO,
            timestamp_ms: 0,
            body: flv::aac_sequence_header(&self.audio.asc),
        });
        self.started = true;
        let gop = Duration::from_secs_f64(f64::from(c.gop_frames) / f64::from(c.fps.max(1)));
        let max_gop = Duration::from_millis(c.passthrough_max_gop_ms);
        let (path, reason) = match &sets {
            None => (Path::Mixing, Some(Reason::OtherSource)),
            Some(s) if s.size != (self.width, self.height) => {
                (Path::Mixing, Some(Reason::Resolution))
            }
            Some(_) if !c.passthrough => (Path::Mixing, Some(Reason::Disabled)),
            // The first tick decides whether co-hosts are there already.
            Some(_) => (Path::Passthrough, None),
        };
        self.switcher = Some(Switcher::new(path, reason, gop, max_gop));
        self.sets = sets;
        self.hook_path("starting", path, reason);
        info!(
            room = %self.room.name,
            width = self.width,
            height = self.height,
            path = ?path,
            reason = reason.map(Reason::as_str),
            "bridge stream starts"
        );
        // The IDR (and what followed it) goes out now if passing through.
        if let Some(i) = first_idr {
            self.need_idr = true;
            self.passthrough_tick(now, now_ms, units[i..].to_vec());
        }
    }

    /// Why the output must not pass the source through now (`None`: it may).
    fn blocker(&mut self, now: Instant, scene: &Scene) -> Option<Reason> {
        let recent = self.recently_multi(now, scene.multi);
        let sets = self.sets.as_ref()?;
        if scene.away.is_some() {
            return Some(Reason::HostAway);
        }
        if !self.config.passthrough {
            return Some(Reason::Disabled);
        }
        if scene.layout != Layout::Solo {
            return Some(if scene.pinned {
                Reason::Layout
            } else {
                Reason::Cohosts
            });
        }
        if recent && !scene.pinned {
            return Some(Reason::Cohosts);
        }
        if sets.size != (self.width, self.height) {
            return Some(Reason::Resolution);
        }
        let slots = lock(&self.slots);
        let Some(track) = scene
            .shown
            .first()
            .and_then(|p| slots.get(p))
            .and_then(|s| s.video_track.as_ref())
        else {
            return Some(Reason::NoVideo);
        };
        if !track.codec.mime_type.eq_ignore_ascii_case("video/H264") {
            return Some(Reason::Codec);
        }
        if track.is_muted() {
            // Its camera is off: the mix shows the placeholder, not a frozen picture.
            return Some(Reason::NoVideo);
        }
        drop(slots);
        self.source_state
            .blocker()
            .or_else(|| self.switcher.as_ref()?.gop_blocker(now))
    }

    /// One tick after the start: decide the path, steer the source's input, and pass its
    /// access units on while passing through.
    fn passthrough_tick(&mut self, now: Instant, now_ms: i64, mut units: Vec<Arc<AccessUnit>>) {
        let scene = self.scene();
        self.set_source(scene.shown.first());
        self.choose_layers(&scene);
        units.extend(self.take_units());
        let Some(sets) = self.sets.clone() else {
            return;
        };
        // Checked in order and before deciding, so a host whose parameter sets just changed
        // is not passed on for one more tick.
        let units: Vec<(Arc<AccessUnit>, bool)> = units
            .into_iter()
            .map(|au| {
                let ok = self.source_state.next(&sets, &au);
                (au, ok)
            })
            .collect();
        let blocker = self.blocker(now, &scene);
        let (ready, track) = {
            let slots = lock(&self.slots);
            let slot = self.source.as_ref().and_then(|p| slots.get(p));
            // Keyframe requests go to the layer the source receives (the top one while it
            // is passed through), not to every layer of a simulcast host.
            let track = slot.and_then(|s| s.video_layers.clone());
            let ready = slot.is_none_or(|s| s.video_track.as_ref().is_none_or(|t| t.is_muted()))
                || slot.is_some_and(|s| s.ctl.ready.load(Ordering::Relaxed));
            (ready, track)
        };
        let Some(switcher) = self.switcher.as_mut() else {
            return;
        };
        let tick = switcher.tick(now, blocker, ready);
        if let Some(slot) = self
            .source
            .as_ref()
            .and_then(|p| lock(&self.slots).get(p).map(|s| s.ctl.clone()))
        {
            slot.decode.store(tick.decode_source, Ordering::Relaxed);
        }
        if tick.switched {
            let reason = switcher.reason();
            info!(room = %self.room.name, reason = reason.map(Reason::as_str), "bridge output: passthrough -> mixing");
            self.hook_path("passthrough", Path::Mixing, reason);
            if let Some(v) = self.video.as_mut() {
                v.force_keyframe();
            }
            self.clock.reset();
            self.need_idr = true;
            self.last_shown = None;
        }
        let mut request = tick.request_keyframe;
        // The host's pictures wait for the host's audio, as in the mix (see `sync`).
        for (au, ok) in units {
            if self.held.len() >= MAX_HELD {
                self.held.pop_front();
                self.need_idr = true;
            }
            self.held.push_back((au, now, ok));
        }
        let due = {
            let slots = lock(&self.slots);
            let slot = self.source.as_ref().and_then(|p| slots.get(p));
            let until = slot.map(|s| s.show_until(now));
            let sr = slot.and_then(|s| s.video_sr());
            let mut due = vec![];
            while let Some((au, arrived, _)) = self.held.front() {
                if until.is_some_and(|u| !u.allows(*arrived, au.rtp_timestamp, sr, 90_000)) {
                    break;
                }
                if let Some((au, _, ok)) = self.held.pop_front() {
                    due.push((au, ok));
                }
            }
            due
        };
        for (au, ok) in due {
            let passable = ok && (au.keyframe || !self.need_idr);
            let Some(switcher) = self.switcher.as_mut() else {
                return;
            };
            let (emit, switched) = switcher.unit(au.keyframe, passable, now);
            if switched {
                info!(room = %self.room.name, "bridge output: mixing -> passthrough");
                self.hook_path("mixing", Path::Passthrough, None);
            }
            if emit {
                self.need_idr = false;
                self.emit_unit(&au, now_ms);
            } else if !passable && self.path() == Path::Passthrough {
                // A unit left out (B picture, other parameter sets): what follows may refer
                // to it, so passing through resumes at the next IDR.
                self.need_idr = true;
            }
        }
        if self.need_idr
            && self.switcher.as_ref().map(Switcher::path) == Some(Path::Passthrough)
            && self
                .last_break_request
                .is_none_or(|t| now.saturating_duration_since(t) >= BREAK_RETRY)
        {
            request = true;
            self.last_break_request = Some(now);
        }
        // A WHEP viewer asked for a keyframe: the host makes it while passed through.
        if self.path() == Path::Passthrough && self.rtp.keyframe_due(now) {
            request = true;
        }
        if request && let Some(t) = track {
            t.request_keyframe();
        }
    }

    /// Tell the operator's backend the output's path changed (`from`: the path before, or
    /// `starting` for the path the stream starts on).
    fn hook_path(&self, from: &'static str, to: Path, reason: Option<Reason>) {
        self.room.hook(crate::webhooks::Event::BridgeSwitched {
            from,
            to: match to {
                Path::Passthrough => "passthrough",
                Path::Mixing => "mixing",
            },
            reason: reason.map(Reason::as_str),
        });
    }

    fn path(&self) -> Path {
        self.switcher.as_ref().map_or(Path::Mixing, Switcher::path)
    }

    /// Timestamp for a video tag that wants `ts`: never before the last one.
    fn next_ts(&mut self, ts: i64) -> i64 {
        let ts = match self.last_ts {
            Some(last) => ts.max(last + 1),
            None => ts.max(0),
        };
        self.last_ts = Some(ts);
        ts
    }

    /// One of the host's access units, as it came, on the output clock.
    fn emit_unit(&mut self, au: &AccessUnit, now_ms: i64) {
        // Released when the host's audio is played: the output clock now is where it goes,
        // less half the wake period over which releases are grouped.
        let ts = self
            .clock
            .map(au.rtp_timestamp, now_ms - PASS_RELEASE_LAG_MS);
        let ts = self.next_ts(ts);
        // Access unit delimiters are left out (FLV frames each access unit itself).
        let nals = split_annexb(&au.annexb);
        let avcc = h264::to_avcc(nals.into_iter().filter(|n| nal_type(n) != 9));
        self.publisher.send(Tag {
            kind: flv::TAG_VIDEO,
            timestamp_ms: ts as u32,
            body: flv::avc_frame(au.keyframe, 0, &avcc),
        });
        self.rtp.video(&au.annexb, ts);
        self.counters.video_frames.fetch_add(1, Ordering::Relaxed);
        let mut p = lock(&self.counters.path);
        p.passthrough_frames += 1;
    }

    /// One mixed output frame (frame number `n` of the output's frame grid).
    fn mix_frame(&mut self, now: Instant, n: u64) {
        let fps = u64::from(self.config.fps.max(1));
        let ts = (n * 1000 / fps) as i64;
        if self.last_ts.is_some_and(|last| ts <= last) {
            // Just back from passthrough, whose pictures run a little ahead (they go with
            // the host's buffered audio): this grid slot is already covered.
            return;
        }
        if self.rtp.keyframe_due(now)
            && let Some(v) = self.video.as_mut()
        {
            v.force_keyframe();
        }
        let scene = self.scene();
        let solo = self.config.solo_repeat && !self.recently_multi(now, scene.multi);
        let mut frame = self.frame(now, &scene);
        let shown = frame.shown();
        // Nothing changed on screen while the host is alone: repeat the last picture without
        // compositing or encoding (same SPS/PPS, frame rate and timestamps).
        let unchanged = self.last_shown.as_ref() == Some(&shown);
        let Some(video) = self.video.as_mut() else {
            return;
        };
        let repeat = (solo && unchanged).then(|| video.repeat()).flatten();
        if repeat.is_some() {
            self.counters.repeated.fetch_add(1, Ordering::Relaxed);
        }
        self.last_shown = Some(shown);
        let fresh = std::mem::take(&mut frame.fresh);
        if !fresh.is_empty() {
            self.counters.new_pictures.fetch_add(1, Ordering::Relaxed);
        }
        let picture = match repeat {
            Some(v) => Ok(v),
            None => {
                let canvas = self.draw(&frame);
                match self.video.as_mut() {
                    Some(video) => video.encode(&canvas),
                    None => return,
                }
            }
        };
        match picture {
            Ok(v) => self.send_mixed(v, ts, fresh),
            Err(e) => warn!("bridge video encode: {e}"),
        }
    }

    fn send_mixed(&mut self, v: EncodedVideo, ts: i64, fresh: Vec<Instant>) {
        if v.dropped {
            // The output still shows the picture before: encode the next frame even if
            // nothing changes on screen.
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            self.last_shown = None;
        }
        let ts = self.next_ts(ts);
        self.rtp.video(&v.annexb, ts);
        self.publisher.send(Tag {
            kind: flv::TAG_VIDEO,
            timestamp_ms: ts as u32,
            body: flv::avc_frame(v.keyframe, 0, &v.avcc),
        });
        self.counters.video_frames.fetch_add(1, Ordering::Relaxed);
        let sent = Instant::now();
        let mut w = lock(&self.latency);
        for a in fresh {
            w.push(sent.saturating_duration_since(a));
        }
    }

    fn publish_path_stats(&self) {
        let mut p = lock(&self.counters.path);
        p.path = if !self.started {
            "starting"
        } else {
            match self.path() {
                Path::Passthrough => "passthrough",
                Path::Mixing => "mixing",
            }
        };
        p.mix_reason = self
            .switcher
            .as_ref()
            .and_then(Switcher::reason)
            .map(Reason::as_str);
        p.switches = self.switcher.as_ref().map_or(0, |s| s.switches);
        p.encoded_frames = self.video.as_ref().map_or(0, |v| v.encoded);
        if self.started {
            (p.width, p.height) = (self.width, self.height);
        }
    }

    pub fn run(mut self, stop: watch::Receiver<bool>) {
        info!(room = %self.room.name, "bridge started");
        let start = Instant::now();
        let (mut frames, mut audio_samples) = (0u64, 0u64);
        let fps = u64::from(self.config.fps.max(1));
        // Whole frames of encoder priming are not sent: the first frame sent then starts (within
        // a frame) with the first mixed sample, at timestamp 0 like the first video frame.
        let skip = (self.audio.delay / AAC_FRAME) as u64;
        let mut encoded = 0u64;
        // Room messages ride along as onTextData script tags (players that read them can show
        // chat over the video); start after what was said before the bridge started.
        let mut said = self.room.messages_since(0).last().map_or(0, |m| m.id);
        while !*stop.borrow() {
            let now = Instant::now();
            let elapsed = now.saturating_duration_since(start);
            let now_ms = elapsed.as_millis() as i64;
            if !self.started {
                self.try_start(now, elapsed, now_ms);
            }
            // Video frames due by now (mixed only on the mixing path; passthrough frames come
            // when the host's do).
            while frames * 1_000_000 / fps <= elapsed.as_micros() as u64 {
                if self.started && self.path() == Path::Mixing {
                    self.mix_frame(Instant::now(), frames);
                }
                frames += 1;
            }
            self.publish_path_stats();
            if self.started {
                for m in self.room.messages_since(said) {
                    said = m.id;
                    self.publisher.send(text_data(&m, now_ms as u32));
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
                        let ts = (n * AAC_FRAME as u64 * 1000 / u64::from(SAMPLE_RATE)) as u32;
                        if self.started {
                            self.counters.audio_frames.fetch_add(1, Ordering::Relaxed);
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
            // After the audio: the host's pictures are released up to the audio just played
            // (`sync`), so those that go with this wake period's audio leave with it.
            if self.started {
                let before = self.path();
                self.passthrough_tick(now, now_ms, vec![]);
                // Switched to mixing: the frame due now was counted above while passing
                // through; mix it at once rather than a wake period later (a freeze).
                if before == Path::Passthrough && self.path() == Path::Mixing && frames > 0 {
                    self.mix_frame(Instant::now(), frames - 1);
                }
            }
            // Sleep until the next thing is due: an audio block (the host's pictures passed
            // through go with their audio, so they are due then too) or, while mixing, a
            // frame. Waking every few milliseconds instead cost a solo room more in scheduling
            // than its video (perf, BENCHMARKS.md).
            let at = |us: u64| start + Duration::from_micros(us);
            // While passing through, the loop wakes for every PASS_WAKE_BLOCKS audio blocks
            // instead of each one: a third of the wake-ups took a solo room from 0.0253 to
            // 0.0225 core (BENCHMARKS.md); the host's pictures keep their RTP spacing (see
            // `PassClock`), only their release is grouped.
            let mixing = self.started && self.path() == Path::Mixing;
            let batch = if self.started && !mixing {
                PASS_WAKE_BLOCKS
            } else {
                1
            };
            let mut wake = at((audio_samples + (batch - 1) * AAC_FRAME as u64) * 1_000_000
                / u64::from(SAMPLE_RATE));
            if mixing {
                wake = wake.min(at(frames * 1_000_000 / fps));
            }
            let nap = wake
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(1), Duration::from_millis(100));
            std::thread::sleep(nap);
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
