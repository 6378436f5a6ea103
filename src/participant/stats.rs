//! Media statistics of a participant's connections, the same for every kind of participant
//! (WebSocket member, WHIP publisher): each published track's incoming bitrate, packets lost
//! and the publisher connection's round trip go on its router (`TrackStats`, read by the room
//! stats, metrics and the bridge's reordering buffers), and the connections' own statistics
//! into the room (`participants[].media` of `GET /v1/rooms/{room}`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::peer::{Peer, PeerStats};
use crate::room::Room;
use crate::sfu::TrackRouter;

/// How often a participant's statistics are refreshed.
pub const STATS_INTERVAL: Duration = Duration::from_secs(2);

/// One published track: its router and the SSRC its publisher sends it with (0: unknown).
pub struct PublishedTrack<'a> {
    pub id: &'a str,
    pub router: &'a Arc<TrackRouter>,
    pub ssrc: u32,
}

/// A simulcast track this participant receives: the layer it gets, the one it is switching to
/// and what its downlink carries (`participants[].media.layers` of the room stats).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SubscribedLayer {
    pub track_id: String,
    pub layer: Option<String>,
    pub target: Option<String>,
    /// `"any"`, the rid of the highest layer the downlink carries, or `"paused"`.
    pub downlink: String,
}

/// What one participant's refreshes remember between two runs.
#[derive(Default)]
pub struct StatsRefresher {
    last_bytes: HashMap<String, u64>,
    last_at: Option<Instant>,
}

impl StatsRefresher {
    /// Refresh the tracks' counters from the connections and report the connections'
    /// statistics to the room under participant `pid`.
    pub async fn refresh(
        &mut self,
        room: &Room,
        pid: &str,
        publisher: Option<&Peer>,
        subscriber: Option<&Peer>,
        published: &[PublishedTrack<'_>],
        layers: &[SubscribedLayer],
    ) {
        let publisher: Option<PeerStats> = match publisher {
            Some(p) => Some(p.stats().await),
            None => None,
        };
        let subscriber: Option<PeerStats> = match subscriber {
            Some(p) => Some(p.stats().await),
            None => None,
        };
        self.tracks(published, publisher.as_ref());
        room.set_media_stats(
            pid,
            serde_json::json!({ "publisher": publisher, "subscriber": subscriber, "layers": layers }),
        );
    }

    /// Whether a refresh is due (for callers without a timer of their own: RTMP ingest
    /// refreshes from its media callbacks).
    pub fn due(&self, now: Instant) -> bool {
        self.last_at.is_none_or(|t| now >= t + STATS_INTERVAL)
    }

    /// The tracks' counters: bitrate from `bytes_in` since the last call, and, from the
    /// publisher connection's statistics when there is one, loss and round trip.
    pub fn tracks(&mut self, published: &[PublishedTrack<'_>], publisher: Option<&PeerStats>) {
        let now = Instant::now();
        let elapsed = self
            .last_at
            .replace(now)
            .map_or(STATS_INTERVAL, |t| now.duration_since(t))
            .as_secs_f64()
            .max(0.001);
        for t in published {
            let stats = &t.router.stats;
            let bytes = stats.bytes_in.load(Ordering::Relaxed);
            let last = self
                .last_bytes
                .insert(t.id.to_string(), bytes)
                .unwrap_or(bytes);
            let bps = (bytes.saturating_sub(last) as f64 * 8.0 / elapsed) as u64;
            stats.bitrate_bps.store(bps, Ordering::Relaxed);
            stats.set_rtt_ms(publisher.and_then(|s| s.rtt_ms));
            if let Some(s) =
                publisher.and_then(|s| s.inbound.iter().find(|i| t.ssrc != 0 && i.ssrc == t.ssrc))
            {
                stats.packets_lost.store(s.packets_lost, Ordering::Relaxed);
                stats
                    .nacks_sent
                    .store(s.feedback_sent.nacks, Ordering::Relaxed);
                stats
                    .nacked_packets
                    .store(s.feedback_sent.nacked_packets, Ordering::Relaxed);
            }
        }
        self.last_bytes
            .retain(|id, _| published.iter().any(|t| t.id == id.as_str()));
    }
}
