//! What a scenario needs from the SFU under test. cohost and Janus each implement [`Target`];
//! scenarios are written once against it so both are driven identically in the same run.

use std::sync::Arc;

use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;

use crate::stats::Sink;

/// Tracks a publishing participant sends. The caller created them (SSRCs fixed) and writes
/// packets to them once [`Joined::payload_types`] is known.
#[derive(Clone)]
pub struct PublishTracks {
    pub audio: Arc<TrackLocalStaticRTP>,
    pub video: Arc<TrackLocalStaticRTP>,
}

#[async_trait::async_trait]
pub trait Target: Send + Sync {
    fn name(&self) -> &'static str;

    /// PID of the SFU process, for CPU time and resident memory from /proc.
    fn pid(&self) -> u32;

    /// Enter `room` as `identity`. With `media`, publish those tracks. Subscribe to every
    /// other publisher of the room, present and future, and hand every RTP packet received
    /// to `sink`. Returns once the publish negotiation (if any) has completed; subscriptions
    /// may still be negotiating.
    async fn join(
        &self,
        room: &str,
        identity: &str,
        media: Option<PublishTracks>,
        sink: Arc<Sink>,
    ) -> anyhow::Result<Box<dyn Joined>>;

    /// Stop the SFU process.
    async fn shutdown(&self);
}

#[async_trait::async_trait]
pub trait Joined: Send + Sync {
    /// Negotiated (audio, video) payload types of the published tracks.
    fn payload_types(&self) -> Option<(u8, u8)>;
    /// Leave the room and close the peer connections.
    async fn leave(self: Box<Self>);
}
