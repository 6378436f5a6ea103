//! Selective forwarding: one published track fanned out to N subscriptions.
//!
//! A [`TrackRouter`] is fed by whoever reads the publisher's track and hands each subscriber its
//! own bounded queue. It knows nothing about peer connections or signaling: a WebRTC subscriber,
//! the RTMP bridge or a test all consume a [`Subscription`] the same way. Header rewriting for a
//! particular outgoing leg (SSRC, payload type, extensions) belongs to that leg.
//!
//! A simulcast track (the publisher sends 2-4 layers of one picture, by rid) has one router
//! for all its layers. Each subscription then carries a [`layers::LayerForwarder`] that picks
//! one layer per subscriber and rewrites sequence numbers and timestamps, so every consumer
//! (a WebRTC subscriber, the bridge) still reads one plain stream from its queue. The layer is
//! chosen per subscription ([`LayerControl::select`]); the default is the top layer.

pub mod allocation;
pub mod downlink;
pub mod keyframe;
pub mod layers;

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use tokio::sync::mpsc;

pub use rtc::rtp::Packet;

use crate::signaling::protocol::Kind;
use layers::{LayerForwarder, PacketInfo, Verdict};

/// At most this many simulcast layers per track (browsers send up to 3).
pub const MAX_LAYERS: usize = 4;

/// The codec a track carries, as negotiated with its publisher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecSpec {
    /// e.g. `video/H264`
    pub mime_type: String,
    pub clock_rate: u32,
    pub channels: u16,
    pub fmtp: String,
}

/// Process-wide totals over every track that ever existed (Prometheus counters).
#[derive(Debug)]
pub struct Totals {
    pub packets_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub packets_out: AtomicU64,
    pub bytes_out: AtomicU64,
    pub dropped: AtomicU64,
    pub keyframe_requests: AtomicU64,
    /// Published tracks whose media stopped while their connection was up.
    pub media_stalls: AtomicU64,
}

pub static TOTALS: Totals = Totals {
    packets_in: AtomicU64::new(0),
    bytes_in: AtomicU64::new(0),
    packets_out: AtomicU64::new(0),
    bytes_out: AtomicU64::new(0),
    dropped: AtomicU64::new(0),
    keyframe_requests: AtomicU64::new(0),
    media_stalls: AtomicU64::new(0),
};

/// Counters for one published track; read by metrics and room stats.
#[derive(Debug, Default)]
pub struct TrackStats {
    pub packets_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub packets_out: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Packets not queued because a subscriber's queue was full.
    pub dropped: AtomicU64,
    pub keyframe_requests: AtomicU64,
    /// Incoming bitrate, bits per second, refreshed by the publisher's connection every few
    /// seconds from `bytes_in`.
    pub bitrate_bps: AtomicU64,
    /// Packets the publisher's connection reported lost (RTCP receiver statistics).
    pub packets_lost: AtomicU64,
    /// RTCP NACKs the publisher's connection sent for this track, and the packets they asked
    /// to be retransmitted (refreshed with `bitrate_bps`).
    pub nacks_sent: AtomicU64,
    pub nacked_packets: AtomicU64,
    /// No RTP from the publisher for `webrtc.media_stall_timeout` (until the next packet).
    pub stalled: AtomicBool,
    /// Round trip to the publisher in microseconds (0: not measured yet), refreshed with
    /// `bitrate_bps`: how long a retransmission takes, for receivers' reordering buffers.
    pub rtt_us: AtomicU64,
}

impl TrackStats {
    pub fn rtt(&self) -> Option<std::time::Duration> {
        match self.rtt_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(std::time::Duration::from_micros(us)),
        }
    }

    pub fn set_rtt_ms(&self, ms: Option<f64>) {
        let us = ms
            .filter(|m| m.is_finite() && *m > 0.0)
            .map_or(0, |m| (m * 1000.0) as u64);
        self.rtt_us.store(us, Ordering::Relaxed);
    }
}

/// The latest RTCP sender report of a published track: which RTP timestamp the sender's
/// wallclock (NTP, 32.32 fixed point) read at one instant. Tracks of one sender share that
/// wallclock, so reports put its audio and video on one timeline (lip sync in the bridge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SenderReport {
    pub ntp_time: u64,
    pub rtp_time: u32,
}

struct Sub {
    id: u64,
    tx: mpsc::Sender<Packet>,
    /// Simulcast routers only: which layer this subscriber gets, and the rewriting.
    sel: Option<Mutex<Selector>>,
}

struct Selector {
    fwd: LayerForwarder,
    /// What the subscriber asked for (`None`: the default, the top layer). Kept so a size
    /// request is answered again when the layers' sizes become known.
    request: Option<LayerRequest>,
    /// What the subscriber's downlink carries ([`downlink::Downlink`]); the layer forwarded is
    /// the lower of this and what it asked for.
    cap: downlink::Cap,
}

/// What a subscriber asks for on a simulcast track.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerRequest {
    /// The layer with this rid.
    Rid(String),
    /// The smallest layer covering this size ([`layers::layer_for_size`]).
    MaxSize { width: u32, height: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    #[error("the track has no layer {0:?}")]
    UnknownLayer(String),
    #[error("not subscribed to this track any more")]
    NotSubscribed,
}

/// The publisher's simulcast layers, low → high.
struct Simulcast {
    rids: Vec<String>,
    /// The SSRC each layer arrives with (0: not seen yet), for keyframe requests.
    ssrcs: [AtomicU32; MAX_LAYERS],
    /// Picture size per layer, `width << 32 | height` (0: unknown), from H.264 SPS.
    sizes: [AtomicU64; MAX_LAYERS],
    /// Each layer's latest sender report, handed to new subscriptions' forwarders.
    reports: Mutex<[Option<SenderReport>; MAX_LAYERS]>,
    /// Layers owed a keyframe request (bit per layer), taken by the publisher's PLI task.
    keyframe_owed: AtomicU8,
}

impl Simulcast {
    fn top(&self) -> u8 {
        u8::try_from(self.rids.len().saturating_sub(1)).unwrap_or(0)
    }

    fn sizes(&self) -> Vec<Option<(u32, u32)>> {
        self.sizes[..self.rids.len()]
            .iter()
            .map(|s| match s.load(Ordering::Relaxed) {
                0 => None,
                v => Some(((v >> 32) as u32, v as u32)),
            })
            .collect()
    }

    /// The layer a subscription gets: what it asked for (`None`: the top layer), lowered to
    /// what its downlink carries; `None` when its video is paused for the downlink.
    fn wanted(&self, req: Option<&LayerRequest>, cap: downlink::Cap) -> Option<u8> {
        let asked = req
            .and_then(|r| self.target_for(r).ok())
            .unwrap_or_else(|| self.top());
        match cap {
            downlink::Cap::Any => Some(asked),
            downlink::Cap::AtMost(c) => Some(asked.min(c)),
            downlink::Cap::Paused => None,
        }
    }

    fn target_for(&self, req: &LayerRequest) -> Result<u8, SelectError> {
        match req {
            LayerRequest::Rid(rid) => self
                .rids
                .iter()
                .position(|r| r == rid)
                .and_then(|i| u8::try_from(i).ok())
                // Echo at most a short prefix of what the client sent.
                .ok_or_else(|| SelectError::UnknownLayer(rid.chars().take(32).collect())),
            LayerRequest::MaxSize { width, height } => {
                Ok(layers::layer_for_size(&self.sizes(), *width, *height))
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct TrackRouter {
    pub id: String,
    pub participant_id: String,
    pub kind: Kind,
    pub codec: CodecSpec,
    subs: RwLock<Vec<Sub>>,
    next_id: AtomicU64,
    closed: AtomicBool,
    /// Muted by the host: packets are not forwarded.
    muted: AtomicBool,
    keyframe_tx: mpsc::Sender<()>,
    sender_report: Mutex<Option<SenderReport>>,
    simulcast: Option<Simulcast>,
    pub stats: TrackStats,
}

impl std::fmt::Debug for TrackRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackRouter")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// A subscriber's end: packets arrive on `rx` in publisher order. Dropping it unsubscribes.
pub struct Subscription {
    router: Arc<TrackRouter>,
    id: u64,
    pub rx: mpsc::Receiver<Packet>,
}

impl Subscription {
    pub fn router(&self) -> &Arc<TrackRouter> {
        &self.router
    }

    /// A handle that chooses this subscription's layer while another task reads `rx`.
    pub fn control(&self) -> LayerControl {
        LayerControl {
            router: self.router.clone(),
            id: self.id,
        }
    }
}

/// Chooses the simulcast layer of one subscription (a no-op on a plain track).
#[derive(Clone)]
pub struct LayerControl {
    router: Arc<TrackRouter>,
    id: u64,
}

impl LayerControl {
    /// Switch to the layer `req` names (at the next keyframe of that layer, which is asked
    /// for). Returns the layer's rid, `None` for a track without layers.
    pub fn select(&self, req: LayerRequest) -> Result<Option<String>, SelectError> {
        self.router.select(self.id, req)
    }

    /// The subscriber lost its picture: ask for a keyframe of the layer it is getting (or
    /// switching to), not of every layer.
    pub fn request_keyframe(&self) {
        match self.router.layer_of(self.id) {
            Some(l) => self.router.request_keyframe_layers(1 << l),
            None => self.router.request_keyframe(),
        }
    }

    /// (layer being forwarded, layer wanted) as rids, for a simulcast track.
    pub fn layers(&self) -> Option<(Option<String>, Option<String>)> {
        self.router.sub_layers(self.id)
    }

    /// Where the layer this subscription gets began on its output ([`LayerForwarder::switch_floor`]).
    pub fn switch_floor(&self) -> Option<u16> {
        self.router
            .with_selector(self.id, |g| g.fwd.switch_floor())
            .flatten()
    }

    /// Number of simulcast layers (0 for a plain track).
    pub fn layer_count(&self) -> u8 {
        u8::try_from(self.router.layers().len()).unwrap_or(0)
    }

    /// Limit this subscription to what its downlink carries ([`downlink::Downlink`]).
    pub fn set_cap(&self, cap: downlink::Cap) {
        self.router.set_cap(self.id, cap)
    }

    /// The current downlink cap, for a simulcast track.
    pub fn cap(&self) -> Option<downlink::Cap> {
        self.router.cap_of(self.id)
    }

    /// The sender report that maps this subscription's timestamps to the publisher's
    /// wallclock: on a simulcast track the forwarded layer's, shifted by the rewriting (the
    /// track's own report is the top layer's, on another timestamp base); on a plain track
    /// the track's.
    pub fn sender_report(&self) -> Option<SenderReport> {
        if self.router.simulcast.is_none() {
            return self.router.sender_report();
        }
        self.router
            .with_selector(self.id, |g| g.fwd.output_sender_report())
            .flatten()
    }

    pub fn router(&self) -> &Arc<TrackRouter> {
        &self.router
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.router.unsubscribe(self.id);
    }
}

impl TrackRouter {
    /// Returns the router and the receiver of keyframe requests the publisher side must serve
    /// (one `()` per request; already coalesced to at most one outstanding).
    pub fn new(
        id: String,
        participant_id: String,
        kind: Kind,
        codec: CodecSpec,
    ) -> (Arc<Self>, mpsc::Receiver<()>) {
        Self::with_layers(id, participant_id, kind, codec, vec![])
    }

    /// A router for a simulcast track whose layers are `rids`, low → high (at most
    /// [`MAX_LAYERS`]; more are cut off at the top). Fewer than two rids: a plain track.
    pub fn with_layers(
        id: String,
        participant_id: String,
        kind: Kind,
        codec: CodecSpec,
        mut rids: Vec<String>,
    ) -> (Arc<Self>, mpsc::Receiver<()>) {
        rids.truncate(MAX_LAYERS);
        let simulcast = (rids.len() >= 2).then(|| Simulcast {
            rids,
            ssrcs: Default::default(),
            sizes: Default::default(),
            reports: Mutex::new([None; MAX_LAYERS]),
            keyframe_owed: AtomicU8::new(0),
        });
        let (keyframe_tx, keyframe_rx) = mpsc::channel(1);
        (
            Arc::new(Self {
                id,
                participant_id,
                kind,
                codec,
                subs: RwLock::new(Vec::new()),
                next_id: AtomicU64::new(1),
                closed: AtomicBool::new(false),
                muted: AtomicBool::new(false),
                keyframe_tx,
                sender_report: Mutex::new(None),
                simulcast,
                stats: TrackStats::default(),
            }),
            keyframe_rx,
        )
    }

    /// Fan one packet out. Never blocks: a subscriber whose queue is full loses this packet
    /// (it will NACK or ask for a keyframe) rather than stalling everybody else.
    pub fn forward(&self, pkt: Packet) {
        if self.muted.load(Ordering::Relaxed) {
            return;
        }
        let len = pkt.payload.len() as u64;
        self.stats.packets_in.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes_in.fetch_add(len, Ordering::Relaxed);
        TOTALS.packets_in.fetch_add(1, Ordering::Relaxed);
        TOTALS.bytes_in.fetch_add(len, Ordering::Relaxed);
        let subs = match self.subs.read() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut out = 0u64;
        let mut dropped = 0u64;
        for s in subs.iter() {
            match s.tx.try_send(pkt.clone()) {
                Ok(()) => out += 1,
                Err(mpsc::error::TrySendError::Full(_)) => dropped += 1,
                // The subscription is being dropped; its Drop removes it.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        self.stats.packets_out.fetch_add(out, Ordering::Relaxed);
        self.stats.bytes_out.fetch_add(out * len, Ordering::Relaxed);
        TOTALS.packets_out.fetch_add(out, Ordering::Relaxed);
        TOTALS.bytes_out.fetch_add(out * len, Ordering::Relaxed);
        if dropped > 0 {
            self.stats.dropped.fetch_add(dropped, Ordering::Relaxed);
            TOTALS.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
    }

    /// Each layer's picture size as learned from its SPS (`None`: not seen yet), low → high;
    /// empty for a plain track.
    pub fn layer_sizes(&self) -> Vec<Option<(u32, u32)>> {
        self.simulcast.as_ref().map_or(vec![], Simulcast::sizes)
    }

    /// The rids of a simulcast track's layers, low → high; empty for a plain track.
    pub fn layers(&self) -> &[String] {
        self.simulcast.as_ref().map_or(&[], |s| s.rids.as_slice())
    }

    /// Fan out one packet of layer `layer` (index into [`TrackRouter::layers`]). Each
    /// subscription's forwarder says whether this subscriber gets it and under which sequence
    /// number and timestamp. A plain track ignores `layer`.
    pub fn forward_layer(&self, pkt: Packet, layer: u8) {
        let Some(sim) = &self.simulcast else {
            return self.forward(pkt);
        };
        if self.muted.load(Ordering::Relaxed) {
            return;
        }
        let li = usize::from(layer);
        if li >= sim.rids.len() {
            return;
        }
        let len = pkt.payload.len() as u64;
        self.stats.packets_in.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes_in.fetch_add(len, Ordering::Relaxed);
        TOTALS.packets_in.fetch_add(1, Ordering::Relaxed);
        TOTALS.bytes_in.fetch_add(len, Ordering::Relaxed);
        if sim.ssrcs[li].load(Ordering::Relaxed) != pkt.header.ssrc {
            sim.ssrcs[li].store(pkt.header.ssrc, Ordering::Relaxed);
            // Owed a keyframe before it arrived: the request can name it now.
            if sim.keyframe_owed.load(Ordering::Relaxed) & (1 << li) != 0 {
                self.request_keyframe_inner();
            }
        }
        let keyframe = self.is_keyframe(&pkt.payload);
        // A layer's size is read from its keyframes' SPS (cheap: a few per second at most).
        let mut resized = false;
        if keyframe
            && let Some((w, h)) = crate::media::rtp_keyframe::h264_sps(&pkt.payload)
                .and_then(crate::media::h264::sps_dimensions)
        {
            let packed = (u64::from(w) << 32) | u64::from(h);
            resized = sim.sizes[li].swap(packed, Ordering::Relaxed) != packed;
        }
        let info = PacketInfo {
            layer,
            seq: pkt.header.sequence_number,
            timestamp: pkt.header.timestamp,
            keyframe,
        };
        let now = Instant::now();
        let mut owed = 0u8;
        let mut out = 0u64;
        let mut dropped = 0u64;
        {
            let subs = match self.subs.read() {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
            for s in subs.iter() {
                let Some(sel) = &s.sel else { continue };
                let verdict = {
                    let mut g = lock(sel);
                    if resized
                        && let Some(LayerRequest::MaxSize { .. }) = g.request
                        && let t @ Some(_) = sim.wanted(g.request.as_ref(), g.cap)
                        && g.fwd.target() != t
                        && let Ok(Some(k)) = g.fwd.set_target(t, now)
                    {
                        owed |= 1 << k;
                    }
                    match g.fwd.push(&info, now) {
                        Ok(o) => {
                            if let Some(k) = o.keyframe_request {
                                owed |= 1 << k;
                            }
                            o.verdict
                        }
                        Err(_) => continue,
                    }
                };
                if let Verdict::Forward { seq, timestamp } = verdict {
                    let mut p = pkt.clone();
                    p.header.sequence_number = seq;
                    p.header.timestamp = timestamp;
                    match s.tx.try_send(p) {
                        Ok(()) => out += 1,
                        Err(mpsc::error::TrySendError::Full(_)) => dropped += 1,
                        Err(mpsc::error::TrySendError::Closed(_)) => {}
                    }
                }
            }
        }
        self.stats.packets_out.fetch_add(out, Ordering::Relaxed);
        self.stats.bytes_out.fetch_add(out * len, Ordering::Relaxed);
        TOTALS.packets_out.fetch_add(out, Ordering::Relaxed);
        TOTALS.bytes_out.fetch_add(out * len, Ordering::Relaxed);
        if dropped > 0 {
            self.stats.dropped.fetch_add(dropped, Ordering::Relaxed);
            TOTALS.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
        if owed != 0 {
            self.request_keyframe_layers(owed);
        }
    }

    /// Does this payload start a keyframe (a switch point between layers)? Only H.264 and VP8
    /// are known; other codecs never switch (they stay on the first layer that started).
    fn is_keyframe(&self, payload: &[u8]) -> bool {
        let mime = &self.codec.mime_type;
        if mime.eq_ignore_ascii_case("video/H264") {
            crate::media::rtp_keyframe::h264_is_keyframe(payload)
        } else if mime.eq_ignore_ascii_case("video/VP8") {
            crate::media::rtp_keyframe::vp8_is_keyframe(payload)
        } else {
            self.kind == Kind::Audio
        }
    }

    /// Record a sender report of layer `layer` (a plain track: of the track).
    pub fn set_layer_sender_report(&self, layer: u8, sr: SenderReport) {
        let Some(sim) = &self.simulcast else {
            return self.set_sender_report(sr);
        };
        let li = usize::from(layer);
        if li >= sim.rids.len() {
            return;
        }
        lock(&sim.reports)[li] = Some(sr);
        let subs = match self.subs.read() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        for s in subs.iter() {
            if let Some(sel) = &s.sel {
                let _ = lock(sel).fwd.set_sender_report(layer, sr);
            }
        }
        // The track's own report (lip sync in the bridge) is the top layer's: what a
        // subscription gets by default, with its timestamps unchanged until a switch.
        if layer == sim.top() {
            self.set_sender_report(sr);
        }
    }

    fn select(&self, id: u64, req: LayerRequest) -> Result<Option<String>, SelectError> {
        let Some(sim) = &self.simulcast else {
            return Ok(None);
        };
        let asked = sim.target_for(&req)?;
        let owed = self
            .with_selector(id, |g| {
                g.request = Some(req);
                let t = sim.wanted(g.request.as_ref(), g.cap);
                g.fwd.set_target(t, Instant::now()).ok().flatten()
            })
            .ok_or(SelectError::NotSubscribed)?;
        if let Some(k) = owed {
            self.request_keyframe_layers(1 << k);
        }
        // The answer names what was asked for; a downlink cap may hold it lower for now.
        Ok(sim.rids.get(usize::from(asked)).cloned())
    }

    /// Apply what subscription `id`'s downlink carries.
    fn set_cap(&self, id: u64, cap: downlink::Cap) {
        let Some(sim) = &self.simulcast else { return };
        let owed = self.with_selector(id, |g| {
            g.cap = cap;
            let t = sim.wanted(g.request.as_ref(), cap);
            if g.fwd.target() == t {
                None
            } else {
                g.fwd.set_target(t, Instant::now()).ok().flatten()
            }
        });
        if let Some(Some(k)) = owed {
            self.request_keyframe_layers(1 << k);
        }
    }

    /// The downlink cap of subscription `id` (simulcast only).
    fn cap_of(&self, id: u64) -> Option<downlink::Cap> {
        self.with_selector(id, |g| g.cap)
    }

    /// The layer subscription `id` gets or is heading for (simulcast only).
    fn layer_of(&self, id: u64) -> Option<u8> {
        self.with_selector(id, |g| g.fwd.current().or(g.fwd.target()))
            .flatten()
    }

    fn sub_layers(&self, id: u64) -> Option<(Option<String>, Option<String>)> {
        let sim = self.simulcast.as_ref()?;
        let rid = |l: Option<u8>| l.and_then(|l| sim.rids.get(usize::from(l)).cloned());
        self.with_selector(id, |g| (rid(g.fwd.current()), rid(g.fwd.target())))
    }

    /// Run `f` on subscription `id`'s layer selector; `None` for a plain track or a
    /// subscription that is gone. Keyframe requests `f` yields are the caller's to send, after
    /// the locks are released.
    fn with_selector<R>(&self, id: u64, f: impl FnOnce(&mut Selector) -> R) -> Option<R> {
        let subs = match self.subs.read() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        let sel = subs.iter().find(|s| s.id == id)?.sel.as_ref()?;
        let mut g = lock(sel);
        Some(f(&mut g))
    }

    /// Ask the publisher for keyframes of the layers in `mask` (bit per layer).
    pub fn request_keyframe_layers(&self, mask: u8) {
        if let Some(sim) = &self.simulcast {
            sim.keyframe_owed.fetch_or(mask, Ordering::Relaxed);
        }
        self.request_keyframe_inner();
    }

    /// The SSRCs the publisher's keyframe task should send a PLI for now: the layers owed a
    /// request whose SSRC is known. Empty for a plain track (the track's own SSRC then), and
    /// for a simulcast track whose owed layers have not arrived yet. A layer whose SSRC is not
    /// known stays owed, and its first packet asks again: else a subscriber (the bridge, at
    /// its start) that asked before the layer arrived waits for the publisher's next
    /// periodic keyframe.
    pub fn take_keyframe_ssrcs(&self) -> Vec<u32> {
        let Some(sim) = &self.simulcast else {
            return vec![];
        };
        let owed = sim.keyframe_owed.swap(0, Ordering::Relaxed);
        let mut unknown = 0u8;
        let mut out = vec![];
        for l in 0..sim.rids.len() {
            if owed & (1 << l) == 0 {
                continue;
            }
            match sim.ssrcs[l].load(Ordering::Relaxed) {
                0 => unknown |= 1 << l,
                s => out.push(s),
            }
        }
        if unknown != 0 {
            sim.keyframe_owed.fetch_or(unknown, Ordering::Relaxed);
        }
        out
    }

    pub fn set_muted(&self, muted: bool) {
        self.muted.store(muted, Ordering::Relaxed);
        if !muted {
            // Subscribers resume on a keyframe.
            self.request_keyframe();
        }
    }

    pub fn is_muted(&self) -> bool {
        self.muted.load(Ordering::Relaxed)
    }

    /// Record the publisher's latest sender report (about once a second).
    pub fn set_sender_report(&self, sr: SenderReport) {
        match self.sender_report.lock() {
            Ok(mut g) => *g = Some(sr),
            Err(p) => *p.into_inner() = Some(sr),
        }
    }

    pub fn sender_report(&self) -> Option<SenderReport> {
        match self.sender_report.lock() {
            Ok(g) => *g,
            Err(p) => *p.into_inner(),
        }
    }

    pub fn subscribe(self: &Arc<Self>, capacity: usize) -> Subscription {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let sel = self.simulcast.as_ref().map(|sim| {
            let mut fwd = LayerForwarder::new(layers::Config {
                layers: u8::try_from(sim.rids.len()).unwrap_or(1),
                clock_rate: self.codec.clock_rate,
                ..Default::default()
            });
            // The keyframe this asks for is requested by whoever subscribed, once the
            // subscriber can receive it.
            let _ = fwd.set_target(Some(sim.top()), Instant::now());
            for (l, sr) in lock(&sim.reports).iter().enumerate() {
                if let (Some(sr), Ok(l)) = (sr, u8::try_from(l)) {
                    let _ = fwd.set_sender_report(l, *sr);
                }
            }
            Mutex::new(Selector {
                fwd,
                request: None,
                cap: downlink::Cap::Any,
            })
        });
        if !self.closed.load(Ordering::Acquire) {
            let mut subs = match self.subs.write() {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
            subs.push(Sub { id, tx, sel });
        }
        // A closed router keeps `tx` dropped, so the subscriber sees the end at once.
        Subscription {
            router: self.clone(),
            id,
            rx,
        }
    }

    fn unsubscribe(&self, id: u64) {
        let mut subs = match self.subs.write() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        subs.retain(|s| s.id != id);
    }

    pub fn subscriber_count(&self) -> usize {
        match self.subs.read() {
            Ok(s) => s.len(),
            Err(p) => p.into_inner().len(),
        }
    }

    /// Ask the publisher for a keyframe (throttled on the publisher side); of every layer of
    /// a simulcast track.
    pub fn request_keyframe(&self) {
        if let Some(sim) = &self.simulcast {
            let all = u8::try_from((1u16 << sim.rids.len()) - 1).unwrap_or(u8::MAX);
            sim.keyframe_owed.fetch_or(all, Ordering::Relaxed);
        }
        self.request_keyframe_inner();
    }

    fn request_keyframe_inner(&self) {
        if self.kind == Kind::Video {
            self.stats.keyframe_requests.fetch_add(1, Ordering::Relaxed);
            TOTALS.keyframe_requests.fetch_add(1, Ordering::Relaxed);
            // Full means one is already outstanding: that one will serve this request too.
            let _ = self.keyframe_tx.try_send(());
        }
    }

    /// The publisher stopped: every subscription ends.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let mut subs = match self.subs.write() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        subs.clear();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn router() -> (Arc<TrackRouter>, mpsc::Receiver<()>) {
        TrackRouter::new(
            "t".into(),
            "p".into(),
            Kind::Video,
            CodecSpec {
                mime_type: "video/H264".into(),
                clock_rate: 90000,
                channels: 0,
                fmtp: String::new(),
            },
        )
    }

    fn pkt(seq: u16) -> Packet {
        let mut p = Packet::default();
        p.header.sequence_number = seq;
        p.payload = Bytes::from(vec![seq as u8; 10]);
        p
    }

    #[tokio::test]
    async fn fans_out_in_order_and_drops_when_full() {
        let (r, _k) = router();
        let mut a = r.subscribe(100);
        let mut b = r.subscribe(2);
        for s in 0..5 {
            r.forward(pkt(s));
        }
        for s in 0..5 {
            assert_eq!(a.rx.recv().await.unwrap().header.sequence_number, s);
        }
        assert_eq!(b.rx.recv().await.unwrap().header.sequence_number, 0);
        assert_eq!(b.rx.recv().await.unwrap().header.sequence_number, 1);
        assert_eq!(r.stats.dropped.load(Ordering::Relaxed), 3);
        drop(a);
        assert_eq!(r.subscriber_count(), 1);
        r.close();
        assert!(b.rx.recv().await.is_none());
    }

    fn sim_router() -> (Arc<TrackRouter>, mpsc::Receiver<()>) {
        TrackRouter::with_layers(
            "t".into(),
            "p".into(),
            Kind::Video,
            CodecSpec {
                mime_type: "video/H264".into(),
                clock_rate: 90000,
                channels: 0,
                fmtp: String::new(),
            },
            vec!["q".into(), "h".into(), "f".into()],
        )
    }

    /// A keyframe asked of a layer before its first packet (a subscriber, e.g. the bridge,
    /// that starts before the publisher's top layer): the request stays owed, and the layer's
    /// first packet asks again, now naming its SSRC.
    #[tokio::test]
    async fn keyframe_owed_by_a_layer_not_seen_yet_is_asked_when_it_arrives() {
        let (r, mut kf) = sim_router();
        let _s = r.subscribe(10);
        r.forward_layer(layer_pkt(0, 0, false), 0);
        // (The new subscription asked for the layer it can start on; served.)
        r.take_keyframe_ssrcs();
        while kf.try_recv().is_ok() {}
        r.request_keyframe_layers(1 << 2);
        assert!(kf.try_recv().is_ok());
        // f (SSRC 102) has not sent anything: nothing to name yet, but still owed.
        assert_eq!(r.take_keyframe_ssrcs(), Vec::<u32>::new());
        assert!(kf.try_recv().is_err());
        r.forward_layer(layer_pkt(2, 0, false), 2);
        assert!(kf.try_recv().is_ok(), "f's first packet asks again");
        assert_eq!(r.take_keyframe_ssrcs(), vec![102]);
        // Served: nothing more owed.
        r.forward_layer(layer_pkt(1, 0, false), 1);
        assert_eq!(r.take_keyframe_ssrcs(), Vec::<u32>::new());
    }

    /// A packet of layer `l`: SSRC 100 + l, its own numbering; a keyframe starts with an IDR
    /// NAL header. The payload's second byte names the layer.
    fn layer_pkt(l: u8, frame: u16, keyframe: bool) -> Packet {
        let mut p = Packet::default();
        p.header.ssrc = 100 + u32::from(l);
        p.header.sequence_number = u16::from(l) * 10_000 + frame;
        p.header.timestamp = u32::from(l) * 1_000_000 + u32::from(frame) * 3000;
        p.payload = Bytes::from(vec![if keyframe { 0x65 } else { 0x41 }, l]);
        p
    }

    #[tokio::test]
    async fn simulcast_subscription_gets_one_layer_and_switches_at_its_keyframe() {
        let (r, _k) = sim_router();
        assert_eq!(r.layers(), ["q", "h", "f"]);
        let mut a = r.subscribe(1000);
        let ctl = a.control();
        let mut got = vec![];
        let mut feed = |frames: std::ops::Range<u16>, kf: &[u8], got: &mut Vec<Packet>| {
            for f in frames {
                for l in 0..3u8 {
                    r.forward_layer(layer_pkt(l, f, kf.contains(&l) && f % 10 == 0), l);
                }
                while let Ok(p) = a.rx.try_recv() {
                    got.push(p);
                }
            }
        };
        // Default: the top layer. A new subscription starts on the first keyframe of any
        // live layer and moves up at the keyframes of better ones: here 0, 1 and 2 of one
        // frame arrive in that order (the top layer is not known to be sending before).
        feed(0..5, &[0, 1, 2], &mut got);
        let layers: Vec<u8> = got.iter().map(|p| p.payload[1]).collect();
        assert_eq!(layers, [0, 1, 2, 2, 2, 2, 2]);
        // Ask for "q": a keyframe of layer 0 is owed (SSRC 100); "f" keeps flowing until then.
        assert_eq!(
            ctl.select(LayerRequest::Rid("q".into())),
            Ok(Some("q".into()))
        );
        assert_eq!(r.take_keyframe_ssrcs(), vec![100]);
        feed(5..10, &[], &mut got);
        assert!(got[2..].iter().all(|p| p.payload[1] == 2));
        feed(10..15, &[0], &mut got);
        assert_eq!(got.len(), 17);
        assert!(got[12..].iter().all(|p| p.payload[1] == 0));
        // One stream: consecutive numbers, timestamps forward.
        for w in got.windows(2) {
            assert_eq!(
                w[1].header.sequence_number,
                w[0].header.sequence_number.wrapping_add(1)
            );
            assert!((w[1].header.timestamp.wrapping_sub(w[0].header.timestamp) as i32) > 0);
        }
        // Bad choices are errors; sizes unknown (no SPS seen) mean the top layer.
        assert_eq!(
            ctl.select(LayerRequest::Rid("x".into())),
            Err(SelectError::UnknownLayer("x".into()))
        );
        assert_eq!(
            ctl.select(LayerRequest::MaxSize {
                width: 10,
                height: 10
            }),
            Ok(Some("f".into()))
        );
        // A PLI from this subscriber names the layer it gets (still "q" until f's keyframe).
        r.take_keyframe_ssrcs();
        ctl.request_keyframe();
        assert_eq!(r.take_keyframe_ssrcs(), vec![100]);
        // A plain track has no layers to choose.
        let (plain, _k2) = router();
        let s = plain.subscribe(10);
        assert_eq!(s.control().select(LayerRequest::Rid("q".into())), Ok(None));
        assert!(plain.layers().is_empty());
    }

    /// CPU per published packet with 10 subscribers, plain vs simulcast (3 layers: every
    /// subscription's forwarder sees every layer's packet). Run by hand:
    /// `cargo test --lib forward_cost -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn forward_cost_per_packet() {
        const SUBS: usize = 10;
        const N: u16 = 30_000;
        let time = |r: &Arc<TrackRouter>, layered: bool| {
            let subs: Vec<Subscription> = (0..SUBS).map(|_| r.subscribe(usize::from(N))).collect();
            let t = Instant::now();
            for f in 0..N / 3 {
                for l in 0..3u8 {
                    let p = layer_pkt(l, f, f % 300 == 0);
                    if layered {
                        r.forward_layer(p, l);
                    } else {
                        r.forward(p);
                    }
                }
            }
            let per = t.elapsed() / u32::from(N / 3 * 3);
            drop(subs);
            (per, r.stats.packets_out.load(Ordering::Relaxed))
        };
        let (plain, _k) = router();
        let (sim, _k2) = sim_router();
        println!(
            "per packet, {SUBS} subscribers: plain {:?}, simulcast {:?} ((time, packets queued))",
            time(&plain, false),
            time(&sim, true)
        );
    }

    #[tokio::test]
    async fn keyframe_requests_coalesce() {
        let (r, mut k) = router();
        for _ in 0..10 {
            r.request_keyframe();
        }
        assert!(k.recv().await.is_some());
        assert!(k.try_recv().is_err());
    }
}
