//! RTMP publishers (OBS, ffmpeg) as room participants, beside WHIP: a valid stream key makes
//! the RTMP connection a member of the key's room with the key's identity and role, and its
//! video and audio become tracks published into the room as [`TrackRouter`]s, exactly like a
//! WebRTC publisher's. The member leaves when the connection ends, and the connection ends when
//! the room removes the member (kicked, replaced, lost its seat).
//!
//! The RTMP protocol side (handshake, chunking, commands, the origin) is `rtmp::server`'s; it
//! reaches this module only through the [`Publishers`] and [`Ingest`] traits, so `rtmp/` knows
//! nothing of rooms. The media conversion (FLV tags to RTP) is the sans-IO
//! [`crate::rtmp::ingest`].

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use tracing::{debug, info, warn};

use super::stats::{PublishedTrack, StatsRefresher};
use crate::auth::keys::StreamKeys;
use crate::auth::sign::StreamGrant;
use crate::auth::{Role, now_secs, sign};
use crate::config::OriginConfig;
use crate::room::{Registry, Room, RoomEvent, new_track_id};
use crate::rtmp::ingest::{AudioIngest, H264_FMTP, IngestError, VideoIngest, ntp_at, ntp_now};
use crate::rtmp::server::{Ingest, Publishers, check_signature};
use crate::sfu::{CodecSpec, TrackRouter};
use crate::signaling::protocol::{Kind, LeaveReason};
use crate::webhooks::Event;

/// Malformed tags in a row after which a publisher is disconnected.
const MAX_BAD_TAGS: u32 = 50;

/// Called with (room, role) when an RTMP publisher's first track is published.
pub type OnPublished = Arc<dyn Fn(&str, Role) + Send + Sync>;

/// Admits RTMP publishers into rooms (the RTMP server's [`Publishers`]).
pub struct RtmpRooms {
    pub rooms: Arc<Registry>,
    /// HMAC secret of stream keys (the auth secret).
    pub key_secret: Vec<u8>,
    pub cfg: OriginConfig,
    /// Lifetime cap and revocations of stream keys (shared with the REST API that revokes).
    pub stream_keys: Arc<StreamKeys>,
    /// `webhooks.on_publish`: asked once the stream key is verified, before joining the room.
    pub authorize: Option<Arc<crate::webhooks::auth::Authorizer>>,
    /// Called when an RTMP publisher's first track is published (room, role): the server
    /// starts the room's bridge when `bridge.auto_start` says so.
    pub on_published: Option<OnPublished>,
}

impl Publishers for RtmpRooms {
    fn publish<'a>(
        &'a self,
        stream_key: &'a str,
        app_query: &'a str,
        peer: SocketAddr,
    ) -> crate::rtmp::server::Admission<'a> {
        Box::pin(async move {
            let grant = verify_key(self, stream_key, app_query, peer)?;
            if let Some(a) = &self.authorize {
                let req = crate::webhooks::auth::Request {
                    room: &grant.room,
                    protocol: "rtmp",
                    client_addr: Some(peer.to_string()),
                    identity: Some(&grant.identity),
                    role: Some(grant.role),
                };
                a.allow(crate::webhooks::auth::Action::Publish, &req)
                    .await
                    .map_err(|e| {
                        warn!(%peer, room = %grant.room, "rtmp publish refused: {e}");
                        format!("publish refused: {e}")
                    })?;
            }
            admit(self, grant, peer).map(|i| Box::new(i) as Box<dyn Ingest>)
        })
    }
}

/// An RTMP publisher in a room. Dropping it leaves the room (its tracks end).
struct RoomIngest {
    rooms: Arc<Registry>,
    room: Arc<Room>,
    pid: String,
    role: Role,
    /// The key it published with, and the store that may revoke it while it is live.
    grant: StreamGrant,
    stream_keys: Arc<StreamKeys>,
    events: crate::room::EventRx,
    video: VideoIngest,
    audio: Option<AudioIngest>,
    video_router: Option<Arc<TrackRouter>>,
    audio_router: Option<Arc<TrackRouter>>,
    ntp_base: u64,
    bad_tags: u32,
    audio_packets: u64,
    on_published: Option<OnPublished>,
    /// Set when the stream must end (unsupported media, too many bad tags).
    closing: bool,
    /// Track bitrates (no connection statistics: RTMP has none to give).
    stats: StatsRefresher,
    /// When it was admitted (`ingest_started` sent), for `ingest_stopped`.
    started: Option<std::time::Instant>,
}

impl Drop for RoomIngest {
    fn drop(&mut self) {
        info!(room = %self.room.name, participant = %self.pid, "rtmp publisher left");
        // Before the leave, so the backend hears the ingest ended before the member left.
        if let Some(started) = self.started {
            self.room.hook(Event::IngestStopped {
                participant_id: self.pid.clone(),
                identity: self.grant.identity.clone(),
                duration_ms: crate::webhooks::ms_since(started),
            });
        }
        self.rooms.leave(&self.room, &self.pid, LeaveReason::Left);
    }
}

impl Ingest for RoomIngest {
    fn on_video(&mut self, data: &[u8], ms: u32) {
        self.video_tag(data, ms);
        self.refresh_stats();
    }

    fn on_audio(&mut self, data: &[u8], ms: u32) {
        self.audio_tag(data, ms);
        self.refresh_stats();
    }

    fn finish(&mut self) {
        self.closing = true;
    }

    fn closing(&self) -> bool {
        self.closing
    }

    fn ended(&mut self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let revoked = self.stream_keys.clone();
            let grant = self.grant.clone();
            let (room, pid) = (self.room.name.clone(), self.pid.clone());
            tokio::select! {
                _ = revoked.revoked(&grant) => {
                    info!(%room, participant = %pid,
                        "rtmp publisher's stream key was revoked; disconnecting");
                }
                _ = Self::room_ended(&room, &pid, &mut self.events) => {}
            }
        })
    }
}

impl RoomIngest {
    /// Resolves when the room ends this publication (removed, lost its seat, room gone).
    async fn room_ended(room: &str, pid: &str, events: &mut crate::room::EventRx) {
        loop {
            match events.recv().await {
                Some(RoomEvent::Removed(reason)) => {
                    info!(%room, participant = %pid, ?reason,
                            "rtmp publisher removed from the room");
                    return;
                }
                Some(RoomEvent::Demoted) => {
                    info!(%room, participant = %pid,
                            "rtmp publisher lost its seat; disconnecting");
                    return;
                }
                Some(_) => {}
                None => return,
            }
        }
    }
}

impl RoomIngest {
    fn refresh_stats(&mut self) {
        if !self.stats.due(std::time::Instant::now()) {
            return;
        }
        let published: Vec<PublishedTrack<'_>> = [&self.video_router, &self.audio_router]
            .into_iter()
            .flatten()
            .map(|r| PublishedTrack {
                id: &r.id,
                router: r,
                ssrc: 0,
            })
            .collect();
        self.stats.tracks(&published, None);
    }

    fn publish_track(&mut self, kind: Kind) -> Option<Arc<TrackRouter>> {
        let codec = match kind {
            Kind::Video => CodecSpec {
                mime_type: "video/H264".into(),
                clock_rate: 90_000,
                channels: 0,
                fmtp: H264_FMTP.into(),
            },
            Kind::Audio => CodecSpec {
                mime_type: "audio/opus".into(),
                clock_rate: 48_000,
                channels: 2,
                fmtp: "minptime=10;useinbandfec=1".into(),
            },
        };
        // Keyframe requests cannot reach an RTMP encoder; receivers wait for its next IDR.
        let (router, _keyframe_requests) =
            TrackRouter::new(new_track_id(), self.pid.clone(), kind, codec);
        match self.room.publish(&self.pid, router.clone()) {
            Ok(_) => {
                info!(room = %self.room.name, participant = %self.pid, track = %router.id,
                    ?kind, "rtmp track published");
                if let Some(f) = &self.on_published {
                    f(&self.room.name, self.role);
                }
                Some(router)
            }
            Err(e) => {
                warn!(room = %self.room.name, participant = %self.pid, "rtmp track not published: {e}");
                self.closing = true;
                None
            }
        }
    }

    fn failed(&mut self, what: &str, e: IngestError) {
        match e {
            IngestError::Unsupported(msg) => {
                warn!(room = %self.room.name, participant = %self.pid,
                    "rtmp publisher disconnected: {what}: {msg}");
                self.closing = true;
            }
            IngestError::Malformed(m) => {
                self.bad_tags += 1;
                debug!(room = %self.room.name, "rtmp {what} tag dropped: malformed {m}");
                if self.bad_tags > MAX_BAD_TAGS {
                    warn!(room = %self.room.name, participant = %self.pid,
                        "rtmp publisher disconnected: {MAX_BAD_TAGS} malformed tags in a row");
                    self.closing = true;
                }
            }
        }
    }

    fn video_tag(&mut self, data: &[u8], ms: u32) {
        match self.video.push(data, ms) {
            Ok(out) => {
                self.bad_tags = 0;
                if out.sps_changed {
                    info!(room = %self.room.name, participant = %self.pid,
                        "rtmp publisher changed its SPS; the next IDR carries the new one");
                }
                if out.configured && self.video_router.is_none() {
                    self.video_router = self.publish_track(Kind::Video);
                }
                if let Some(r) = &self.video_router {
                    if out.keyframe {
                        r.set_sender_report(crate::sfu::SenderReport {
                            ntp_time: ntp_at(self.ntp_base, f64::from(ms)),
                            rtp_time: self.video.rtp_timestamp(ms),
                        });
                    }
                    for p in out.packets {
                        r.forward(p);
                    }
                }
            }
            Err(e) => self.failed("video", e),
        }
    }

    fn audio_tag(&mut self, data: &[u8], ms: u32) {
        if self.audio.is_none() {
            match AudioIngest::new(rand::random(), rand::random(), rand::random()) {
                Ok(a) => self.audio = Some(a),
                Err(e) => return self.failed("audio", e),
            }
        }
        let Some(a) = self.audio.as_mut() else {
            return;
        };
        let is_config = data.get(1) == Some(&0);
        match a.push(data, ms) {
            Ok(packets) => {
                self.bad_tags = 0;
                if is_config && self.audio_router.is_none() {
                    self.audio_router = self.publish_track(Kind::Audio);
                }
                if let (Some(r), Some(a)) = (&self.audio_router, &self.audio) {
                    for p in packets {
                        if self.audio_packets.is_multiple_of(50)
                            && let Some(sr) = a.sender_report(self.ntp_base)
                        {
                            r.set_sender_report(sr);
                        }
                        self.audio_packets += 1;
                        r.forward(p);
                    }
                }
            }
            Err(e) => self.failed("audio", e),
        }
    }
}

/// Check the publish URL's signature and the stream key: what the key grants.
fn verify_key(
    ctx: &RtmpRooms,
    stream_key: &str,
    app_query: &str,
    peer: SocketAddr,
) -> Result<StreamGrant, String> {
    if !ctx.cfg.ingest {
        return Err("RTMP ingest is disabled on this server (origin.ingest)".into());
    }
    let (key, mut query) = sign::split_query(stream_key);
    if query.is_empty() {
        query = sign::split_query(app_query).1;
    }
    let logged = sign::key_for_log(key);
    check_signature(&ctx.cfg, ctx.cfg.sign_publish, key, &query).map_err(|e| {
        warn!(%peer, key = %logged, "rtmp publish refused: URL signature: {e}");
        format!("publish URL signature: {e} ({})", e.code())
    })?;
    let grant = ctx
        .stream_keys
        .verify(&ctx.key_secret, key, now_secs())
        .map_err(|e| {
            warn!(%peer, key = %logged, "rtmp publish refused: stream key: {e}");
            format!("invalid stream key: {e} ({})", e.code())
        })?;
    Ok(grant)
}

/// Join the key's room and become a publisher there.
fn admit(ctx: &RtmpRooms, grant: StreamGrant, peer: SocketAddr) -> Result<RoomIngest, String> {
    let (tx, events) = crate::room::event_channel();
    let (room, snap) = ctx
        .rooms
        .join(&grant.room, &grant.identity, grant.role, tx)
        .map_err(|e| {
            warn!(%peer, room = %grant.room, "rtmp publish refused: {e}");
            format!("cannot join room {}: {e}", grant.room)
        })?;
    let pid = snap.participant.id.clone();
    let mut ingest = RoomIngest {
        rooms: ctx.rooms.clone(),
        room,
        pid,
        role: grant.role,
        grant: grant.clone(),
        stream_keys: ctx.stream_keys.clone(),
        events,
        video: VideoIngest::default(),
        audio: None,
        video_router: None,
        audio_router: None,
        ntp_base: ntp_now(),
        bad_tags: 0,
        audio_packets: 0,
        on_published: ctx.on_published.clone(),
        closing: false,
        stats: StatsRefresher::default(),
        started: None,
    };
    // Dropping `ingest` on refusal leaves the room again (a refused publisher's
    // `participant_joined` is followed by its `participant_left`, with no ingest events).
    ingest.room.check_publish(&ingest.pid, false).map_err(|e| {
        warn!(%peer, room = %ingest.room.name, "rtmp publish refused: {e}");
        format!("may not publish: {e}")
    })?;
    ingest.started = Some(std::time::Instant::now());
    ingest.room.hook(Event::IngestStarted {
        participant_id: ingest.pid.clone(),
        identity: grant.identity.clone(),
        role: grant.role,
        remote_addr: peer.to_string(),
    });
    info!(%peer, room = %ingest.room.name, identity = %grant.identity, participant = %ingest.pid,
        "rtmp publisher joined");
    Ok(ingest)
}
