//! RTMP server for the embedded origin: players pull `rtmp://HOST:PORT/live/{stream}` and get
//! the same GOP-cached stream HTTP-FLV serves (with `?sign=...&expires=...` when
//! `origin.sign_play` is on). Publishers (OBS, ffmpeg) push to `rtmp://HOST:PORT/live/{stream
//! key}`: a valid key makes the connection a participant of the key's room (see
//! [`super::ingest`] for the media conversion); an invalid or expired key is refused with a
//! `NetStream.Publish.Denied` status and the connection closed.
//!
//! Protocol work is `rml_rtmp`'s (handshake, chunking, the session state machine); this file
//! only moves bytes and maps events to the origin and the rooms. Every error closes that one
//! connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use rml_rtmp::sessions::{
    ServerSession, ServerSessionConfig, ServerSessionEvent, ServerSessionResult, StreamMetadata,
};
use rml_rtmp::time::RtmpTimestamp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::ingest::{AudioIngest, H264_FMTP, IngestError, VideoIngest, ntp_at, ntp_now};
use super::origin::{Origin, Player};
use crate::auth::sign::{self, SignError};
use crate::auth::{Role, now_secs};
use crate::config::OriginConfig;
use crate::media::amf0::{self, Value};
use crate::media::flv::{TAG_AUDIO, TAG_SCRIPT, TAG_VIDEO, Tag};
use crate::room::{Registry, Room, RoomEvent, new_track_id};
use crate::sfu::{CodecSpec, TrackRouter};
use crate::signaling::protocol::{Kind, LeaveReason};

/// Called with (room, role) when an RTMP publisher's first track is published.
pub type OnPublished = Arc<dyn Fn(&str, Role) + Send + Sync>;

/// What the RTMP server needs from the rest of the server.
pub struct RtmpContext {
    pub origin: Arc<Origin>,
    pub rooms: Arc<Registry>,
    /// HMAC secret of stream keys (the auth secret).
    pub key_secret: Vec<u8>,
    pub cfg: OriginConfig,
    /// Called when an RTMP publisher's first track is published (room, role): the server
    /// starts the room's bridge when `bridge.auto_start` says so.
    pub on_published: Option<OnPublished>,
}

/// Bytes a client may send before it plays or publishes (handshake excluded).
const SETUP_MAX_BYTES: usize = 1 << 20;
/// A publisher that sends nothing for this long is gone.
const PUBLISH_IDLE: Duration = Duration::from_secs(30);
/// Malformed tags in a row after which a publisher is disconnected.
const MAX_BAD_TAGS: u32 = 50;

/// The RTMP application name players use (`rtmp://host/live/...`).
pub const APP: &str = "live";
/// Time a client has to finish the handshake and ask to play.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("handshake: {0:?}")]
    Handshake(String),
    #[error("rtmp: {0}")]
    Session(String),
    #[error("setup timeout")]
    Timeout,
}

fn serr(e: impl std::fmt::Debug) -> ConnError {
    ConnError::Session(format!("{e:?}"))
}

/// Accept connections until `shutdown` flips.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<RtmpContext>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((sock, peer)) => {
                    let ctx = ctx.clone();
                    let stop = shutdown.clone();
                    tokio::spawn(async move {
                        if let Err(e) = connection(sock, peer, ctx, stop).await {
                            debug!(%peer, "rtmp connection closed: {e}");
                        }
                    });
                }
                Err(e) => {
                    debug!("rtmp accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

async fn handshake(sock: &mut TcpStream) -> Result<Vec<u8>, ConnError> {
    let mut hs = Handshake::new(PeerType::Server);
    let mut buf = vec![0u8; 4096];
    loop {
        let n = sock.read(&mut buf).await?;
        if n == 0 {
            return Err(ConnError::Handshake("closed during handshake".into()));
        }
        match hs
            .process_bytes(&buf[..n])
            .map_err(|e| ConnError::Handshake(format!("{e:?}")))?
        {
            HandshakeProcessResult::InProgress { response_bytes } => {
                sock.write_all(&response_bytes).await?;
            }
            HandshakeProcessResult::Completed {
                response_bytes,
                remaining_bytes,
            } => {
                sock.write_all(&response_bytes).await?;
                return Ok(remaining_bytes);
            }
        }
    }
}

pub(crate) fn metadata_from(tag: &Tag) -> Option<StreamMetadata> {
    let values = amf0::decode_all(&tag.body).ok()?;
    let m = values
        .iter()
        .find(|v| matches!(v, Value::EcmaArray(_) | Value::Object(_)))?;
    let num = |k: &str| m.get(k).and_then(Value::as_f64);
    let mut out = StreamMetadata::new();
    out.video_width = num("width").map(|v| v as u32);
    out.video_height = num("height").map(|v| v as u32);
    out.video_codec_id = num("videocodecid").map(|v| v as u32);
    out.video_frame_rate = num("framerate").map(|v| v as f32);
    out.video_bitrate_kbps = num("videodatarate").map(|v| v as u32);
    out.audio_codec_id = num("audiocodecid").map(|v| v as u32);
    out.audio_bitrate_kbps = num("audiodatarate").map(|v| v as u32);
    out.audio_sample_rate = num("audiosamplerate").map(|v| v as u32);
    out.audio_channels = num("audiochannels").map(|v| v as u32);
    out.encoder = m.get("encoder").and_then(Value::as_str).map(str::to_string);
    Some(out)
}

/// Serialize one origin tag for the player on `stream_id`.
fn packet_for(
    session: &mut ServerSession,
    stream_id: u32,
    tag: &Tag,
) -> Result<Option<Vec<u8>>, ConnError> {
    let ts = RtmpTimestamp::new(tag.timestamp_ms);
    let data = Bytes::copy_from_slice(&tag.body);
    let p = match tag.kind {
        TAG_VIDEO => session
            .send_video_data(stream_id, data, ts, false)
            .map_err(serr)?,
        TAG_AUDIO => session
            .send_audio_data(stream_id, data, ts, false)
            .map_err(serr)?,
        TAG_SCRIPT => match metadata_from(tag) {
            Some(m) => session.send_metadata(stream_id, &m).map_err(serr)?,
            None => return Ok(None),
        },
        _ => return Ok(None),
    };
    Ok(Some(p.bytes))
}

async fn connection(
    mut sock: TcpStream,
    peer: SocketAddr,
    ctx: Arc<RtmpContext>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    sock.set_nodelay(true)?;
    let leftover = tokio::time::timeout(SETUP_TIMEOUT, handshake(&mut sock))
        .await
        .map_err(|_| ConnError::Timeout)??;
    let (mut session, initial) = ServerSession::new(ServerSessionConfig::new()).map_err(serr)?;
    let mut pending: Vec<ServerSessionResult> = initial;
    pending.extend(session.handle_input(&leftover).map_err(serr)?);
    let mut conn = Conn {
        peer,
        player: None,
        ingest: None,
        app_query: String::new(),
    };
    let mut buf = vec![0u8; 8192];
    let setup_deadline = tokio::time::Instant::now() + SETUP_TIMEOUT;
    let mut setup_bytes = leftover.len();
    let mut idle_deadline = tokio::time::Instant::now() + PUBLISH_IDLE;
    loop {
        // Act on what the session produced.
        for r in std::mem::take(&mut pending) {
            match r {
                ServerSessionResult::OutboundResponse(p) => sock.write_all(&p.bytes).await?,
                ServerSessionResult::RaisedEvent(ev) => {
                    pending.extend(on_event(&mut session, &ctx, ev, &mut conn, &mut sock).await?);
                }
                ServerSessionResult::UnhandleableMessageReceived(_) => {}
            }
        }
        if conn.ingest.as_ref().is_some_and(|i| i.closing) {
            return Ok(());
        }
        if !pending.is_empty() {
            continue;
        }
        let waiting = conn.player.is_none() && conn.ingest.is_none();
        let publishing = conn.ingest.is_some();
        let live = async {
            match conn.player.as_mut() {
                Some((_, p)) => p.rx.recv().await,
                None => std::future::pending().await,
            }
        };
        let room_event = async {
            match conn.ingest.as_mut() {
                Some(i) => i.events.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            n = sock.read(&mut buf) => {
                let n = n?;
                if n == 0 {
                    return Ok(());
                }
                if waiting {
                    setup_bytes += n;
                    if setup_bytes > SETUP_MAX_BYTES {
                        return Err(ConnError::Session("too much data before play/publish".into()));
                    }
                }
                idle_deadline = tokio::time::Instant::now() + PUBLISH_IDLE;
                pending = session.handle_input(&buf[..n]).map_err(serr)?;
            }
            tag = live => match tag {
                Some(tag) => {
                    let id = conn.player.as_ref().map_or(0, |(id, _)| *id);
                    if let Some(bytes) = packet_for(&mut session, id, &tag)? {
                        sock.write_all(&bytes).await?;
                    }
                }
                None => {
                    // The stream ended: tell the player and close.
                    if let Some((id, _)) = conn.player.take()
                        && let Ok(p) = session.finish_playing(id)
                    {
                        let _ = sock.write_all(&p.bytes).await;
                    }
                    return Ok(());
                }
            },
            ev = room_event => match ev {
                Some(RoomEvent::Removed(reason)) => {
                    info!(%peer, ?reason, "rtmp publisher removed from the room");
                    return Ok(());
                }
                Some(RoomEvent::Demoted) => {
                    info!(%peer, "rtmp publisher lost its seat; disconnecting");
                    return Ok(());
                }
                Some(_) => {}
                None => return Ok(()),
            },
            _ = tokio::time::sleep_until(setup_deadline), if waiting => {
                return Err(ConnError::Timeout);
            }
            _ = tokio::time::sleep_until(idle_deadline), if publishing => {
                info!(%peer, "rtmp publisher idle; disconnecting");
                return Ok(());
            }
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

/// Per-connection state: a player, a publisher, or (before either) nothing.
struct Conn {
    peer: SocketAddr,
    player: Option<(u32, Player)>,
    ingest: Option<Ingest>,
    /// A query string the client put on the app name (`rtmp://h/live?sign=...`), used when the
    /// stream name has none.
    app_query: String,
}

/// An RTMP publisher in a room. Dropping it leaves the room (its tracks end).
struct Ingest {
    rooms: Arc<Registry>,
    room: Arc<Room>,
    pid: String,
    role: Role,
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
}

impl Drop for Ingest {
    fn drop(&mut self) {
        info!(room = %self.room.name, participant = %self.pid, "rtmp publisher left");
        self.rooms.leave(&self.room, &self.pid, LeaveReason::Left);
    }
}

impl Ingest {
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

    fn on_video(&mut self, data: &[u8], ms: u32) {
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

    fn on_audio(&mut self, data: &[u8], ms: u32) {
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

/// Check `?sign=&expires=` of `name` (`stream?query`) for `/live/{stream}` when `required`.
fn check_signature(
    cfg: &OriginConfig,
    required: bool,
    stream: &str,
    query: &[(&str, &str)],
) -> Result<(), SignError> {
    if !required {
        return Ok(());
    }
    sign::verify_signed(
        cfg.sign_secret.as_bytes(),
        &format!("/{APP}/{stream}"),
        query,
        now_secs(),
    )
}

fn publish_request(
    ctx: &RtmpContext,
    stream_key: &str,
    app_query: &str,
    peer: SocketAddr,
) -> Result<Ingest, String> {
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
    let grant = sign::verify_stream_key(&ctx.key_secret, key, now_secs()).map_err(|e| {
        warn!(%peer, key = %logged, "rtmp publish refused: stream key: {e}");
        format!("invalid stream key: {e} ({})", e.code())
    })?;
    let (tx, events) = crate::room::event_channel();
    let (room, snap) = ctx
        .rooms
        .join(&grant.room, &grant.identity, grant.role, tx)
        .map_err(|e| {
            warn!(%peer, room = %grant.room, "rtmp publish refused: {e}");
            format!("cannot join room {}: {e}", grant.room)
        })?;
    let pid = snap.participant.id.clone();
    let ingest = Ingest {
        rooms: ctx.rooms.clone(),
        room,
        pid,
        role: grant.role,
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
    };
    // Dropping `ingest` on refusal leaves the room again.
    ingest.room.check_publish(&ingest.pid, false).map_err(|e| {
        warn!(%peer, room = %ingest.room.name, "rtmp publish refused: {e}");
        format!("may not publish: {e}")
    })?;
    info!(%peer, room = %ingest.room.name, identity = %grant.identity, participant = %ingest.pid,
        "rtmp publisher joined");
    Ok(ingest)
}

async fn on_event(
    session: &mut ServerSession,
    ctx: &RtmpContext,
    ev: ServerSessionEvent,
    conn: &mut Conn,
    sock: &mut TcpStream,
) -> Result<Vec<ServerSessionResult>, ConnError> {
    let peer = conn.peer;
    Ok(match ev {
        ServerSessionEvent::ConnectionRequested {
            request_id,
            app_name,
        } => {
            let (app, _) = sign::split_query(&app_name);
            if app == APP {
                conn.app_query = app_name.clone();
                session.accept_request(request_id).map_err(serr)?
            } else {
                debug!(%peer, "rtmp connect to unknown app refused");
                session
                    .reject_request(
                        request_id,
                        "NetConnection.Connect.Rejected",
                        "unknown application",
                    )
                    .map_err(serr)?
            }
        }
        ServerSessionEvent::PlayStreamRequested {
            request_id,
            stream_key,
            stream_id,
            ..
        } => {
            let (name, mut query) = sign::split_query(&stream_key);
            if query.is_empty() {
                query = sign::split_query(&conn.app_query).1;
            }
            if let Err(e) = check_signature(&ctx.cfg, ctx.cfg.sign_play, name, &query) {
                warn!(%peer, stream = %name, "rtmp play refused: URL signature: {e}");
                return session
                    .reject_request(
                        request_id,
                        "NetStream.Play.Failed",
                        &format!("play URL signature: {e} ({})", e.code()),
                    )
                    .map_err(serr);
            }
            match ctx.origin.play(name) {
                Ok(p) => {
                    info!(%peer, stream = %name, "rtmp play");
                    let mut out = session.accept_request(request_id).map_err(serr)?;
                    // Flush the acceptance, then the GOP cache, before any live tag.
                    for r in out.drain(..) {
                        if let ServerSessionResult::OutboundResponse(pk) = r {
                            sock.write_all(&pk.bytes).await?;
                        }
                    }
                    for tag in &p.initial {
                        if let Some(bytes) = packet_for(session, stream_id, tag)? {
                            sock.write_all(&bytes).await?;
                        }
                    }
                    conn.player = Some((stream_id, p));
                    out
                }
                Err(e) => {
                    debug!(%peer, stream = %name, "rtmp play refused: {e}");
                    session
                        .reject_request(request_id, "NetStream.Play.StreamNotFound", &e.to_string())
                        .map_err(serr)?
                }
            }
        }
        ServerSessionEvent::PublishStreamRequested {
            request_id,
            stream_key,
            ..
        } => {
            if conn.ingest.is_some() || conn.player.is_some() {
                return session
                    .reject_request(
                        request_id,
                        "NetStream.Publish.Denied",
                        "this connection already plays or publishes",
                    )
                    .map_err(serr);
            }
            match publish_request(ctx, &stream_key, &conn.app_query, peer) {
                Ok(ingest) => {
                    conn.ingest = Some(ingest);
                    session.accept_request(request_id).map_err(serr)?
                }
                Err(msg) => {
                    let out = session
                        .reject_request(request_id, "NetStream.Publish.Denied", &msg)
                        .map_err(serr)?;
                    // Send the status, then close: a refused publisher has nothing else to do.
                    for r in out {
                        if let ServerSessionResult::OutboundResponse(pk) = r {
                            let _ = sock.write_all(&pk.bytes).await;
                        }
                    }
                    let _ = sock.flush().await;
                    return Err(ConnError::Session(format!("publish refused: {msg}")));
                }
            }
        }
        ServerSessionEvent::VideoDataReceived {
            data, timestamp, ..
        } => {
            if let Some(i) = conn.ingest.as_mut()
                && !i.closing
            {
                i.on_video(&data, timestamp.value);
            }
            vec![]
        }
        ServerSessionEvent::AudioDataReceived {
            data, timestamp, ..
        } => {
            if let Some(i) = conn.ingest.as_mut()
                && !i.closing
            {
                i.on_audio(&data, timestamp.value);
            }
            vec![]
        }
        ServerSessionEvent::PublishStreamFinished { .. } => {
            if let Some(i) = conn.ingest.as_mut() {
                i.closing = true;
            }
            vec![]
        }
        _ => vec![],
    })
}
