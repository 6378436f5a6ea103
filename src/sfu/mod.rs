//! Selective forwarding: one published track fanned out to N subscriptions.
//!
//! A [`TrackRouter`] is fed by whoever reads the publisher's track and hands each subscriber its
//! own bounded queue. It knows nothing about peer connections or signaling: a WebRTC subscriber,
//! the RTMP bridge or a test all consume a [`Subscription`] the same way. Header rewriting for a
//! particular outgoing leg (SSRC, payload type, extensions) belongs to that leg.

pub mod keyframe;
pub mod layers;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::mpsc;

pub use rtc::rtp::Packet;

use crate::signaling::protocol::Kind;

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
        if !self.closed.load(Ordering::Acquire) {
            let mut subs = match self.subs.write() {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
            subs.push(Sub { id, tx });
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

    /// Ask the publisher for a keyframe (throttled on the publisher side).
    pub fn request_keyframe(&self) {
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
