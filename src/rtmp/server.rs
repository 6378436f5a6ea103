//! RTMP server for the embedded origin: players pull `rtmp://HOST:PORT/live/{stream}` and get
//! the same GOP-cached stream HTTP-FLV serves (with `?sign=...&expires=...` when
//! `origin.sign_play` is on). Publishers (OBS, ffmpeg) push to `rtmp://HOST:PORT/live/{stream
//! key}`: [`RtmpContext::publishers`] checks the key and takes the media (a room participant,
//! `crate::participant::rtmp`, which uses [`super::ingest`] for the media conversion); an
//! invalid or expired key is refused with a `NetStream.Publish.Denied` status and the
//! connection closed.
//!
//! Protocol work is `rml_rtmp`'s (handshake, chunking, the session state machine); this file
//! only moves bytes and maps events to the origin and the publishers. Every error closes that one
//! connection.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use rml_rtmp::sessions::{ServerSessionEvent, ServerSessionResult, StreamMetadata};
use rml_rtmp::time::RtmpTimestamp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::guard::Limits;
use super::origin::{Origin, Player};
use super::session::{Session, SessionError, quiet_catch};
use crate::auth::now_secs;
use crate::auth::sign::{self, SignError};
use crate::config::OriginConfig;
use crate::conn_limit::ConnLimiter;
use crate::media::amf0::{self, Value};
use crate::media::flv::{TAG_AUDIO, TAG_SCRIPT, TAG_VIDEO, Tag};

/// A publisher's media on its way into the rest of the server (a room participant: see
/// `crate::participant::rtmp`). The RTMP server only hands it the publisher's tags and closes
/// the connection when it says so; rooms are none of `rtmp/`'s business.
pub trait Ingest: Send {
    /// One FLV video tag body at `ms` on the publisher's timeline.
    fn on_video(&mut self, data: &[u8], ms: u32);
    /// One FLV audio tag body.
    fn on_audio(&mut self, data: &[u8], ms: u32);
    /// The publisher ended its stream (closeStream / deleteStream).
    fn finish(&mut self);
    /// The stream must end (unsupported media, too many bad tags, finished).
    fn closing(&self) -> bool;
    /// Resolves when the other side ends this publication (kicked, lost its seat, room gone).
    /// Cancel-safe: the server polls a fresh one on each turn of its loop.
    fn ended(&mut self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// What admitting a publisher resolves to.
pub type Admission<'a> = Pin<Box<dyn Future<Output = Result<Box<dyn Ingest>, String>> + Send + 'a>>;

/// Admits RTMP publishers (checks the stream key and makes them participants). Async: the
/// operator's `on_publish` callback may be asked first.
pub trait Publishers: Send + Sync {
    /// `stream_key` as the client sent it (with any `?query`); `app_query` the connect app's
    /// name with its query. `Err` is the description sent with `NetStream.Publish.Denied`.
    fn publish<'a>(
        &'a self,
        stream_key: &'a str,
        app_query: &'a str,
        peer: SocketAddr,
    ) -> Admission<'a>;
}

/// What the RTMP server needs from the rest of the server.
pub struct RtmpContext {
    pub origin: Arc<Origin>,
    pub cfg: OriginConfig,
    /// `webhooks.on_play`: asked before a player is admitted.
    pub authorize: Option<Arc<crate::webhooks::auth::Authorizer>>,
    /// Where publishers go.
    pub publishers: Arc<dyn Publishers>,
}

/// Bytes a client may send before it plays or publishes (handshake excluded).
const SETUP_MAX_BYTES: usize = 1 << 20;
/// A publisher that sends nothing for this long is gone.
const PUBLISH_IDLE: Duration = Duration::from_secs(30);

/// The RTMP application name players use (`rtmp://host/live/...`).
pub const APP: &str = "live";
/// Time a client has to finish the handshake and ask to play.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// At most one warning this often about refused connections (a flood must not flood the log).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("handshake: {0:?}")]
    Handshake(String),
    #[error("{0}")]
    Session(#[from] SessionError),
    #[error("{0}")]
    Closed(String),
    #[error("setup timeout")]
    Timeout,
    #[error("write timed out")]
    WriteTimeout,
}

impl ConnError {
    /// Worth a warning: the client sent what the guard refuses or what made `rml_rtmp` panic.
    /// Everything else (a client going away, a timeout) is ordinary.
    fn is_hostile(&self) -> bool {
        matches!(
            self,
            ConnError::Session(SessionError::Refused(_) | SessionError::Panicked(_))
        )
    }
}

/// Writes all of `bytes` within `timeout`: a peer that stops reading cannot hold the task.
async fn send(sock: &mut TcpStream, bytes: &[u8], timeout: Duration) -> Result<(), ConnError> {
    tokio::time::timeout(timeout, sock.write_all(bytes))
        .await
        .map_err(|_| ConnError::WriteTimeout)??;
    Ok(())
}

/// Accept connections until `shutdown` flips.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<RtmpContext>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limiter = ConnLimiter::new(
        ctx.cfg.rtmp_max_connections,
        ctx.cfg.rtmp_max_connections_per_ip,
    );
    let mut refusals_logged = 0u64;
    let mut last_refusal_log: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((sock, peer)) => {
                    let permit = match limiter.try_acquire(peer.ip()) {
                        Ok(p) => p,
                        Err(why) => {
                            // Closed at once, before the handshake.
                            drop(sock);
                            let now = tokio::time::Instant::now();
                            if last_refusal_log.is_none_or(|t| now - t >= REFUSAL_LOG_EVERY) {
                                let total = limiter.refused.load(std::sync::atomic::Ordering::Relaxed);
                                warn!(%peer, "rtmp connection refused: {why} ({} refused since the last warning)",
                                    total - refusals_logged);
                                refusals_logged = total;
                                last_refusal_log = Some(now);
                            }
                            continue;
                        }
                    };
                    let ctx = ctx.clone();
                    let stop = shutdown.clone();
                    tokio::spawn(async move {
                        let _permit = permit;
                        match connection(sock, peer, ctx, stop).await {
                            Err(e) if e.is_hostile() => warn!(%peer, "rtmp connection closed: {e}"),
                            Err(e) => debug!(%peer, "rtmp connection closed: {e}"),
                            Ok(()) => {}
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

async fn handshake(sock: &mut TcpStream, write_timeout: Duration) -> Result<Vec<u8>, ConnError> {
    let mut hs = Handshake::new(PeerType::Server);
    let mut buf = vec![0u8; 4096];
    loop {
        let n = sock.read(&mut buf).await?;
        if n == 0 {
            return Err(ConnError::Handshake("closed during handshake".into()));
        }
        // rml_rtmp's handshake is not known to panic; caught anyway, like every call into it.
        let step = quiet_catch(|| hs.process_bytes(&buf[..n]))
            .map_err(|p| ConnError::Session(SessionError::Panicked(p)))?
            .map_err(|e| ConnError::Handshake(format!("{e:?}")))?;
        match step {
            HandshakeProcessResult::InProgress { response_bytes } => {
                send(sock, &response_bytes, write_timeout).await?;
            }
            HandshakeProcessResult::Completed {
                response_bytes,
                remaining_bytes,
            } => {
                send(sock, &response_bytes, write_timeout).await?;
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
    session: &mut Session,
    stream_id: u32,
    tag: &Tag,
) -> Result<Option<Vec<u8>>, ConnError> {
    let ts = RtmpTimestamp::new(tag.timestamp_ms);
    let data = Bytes::copy_from_slice(&tag.body);
    let p = match tag.kind {
        TAG_VIDEO => session.send_video_data(stream_id, data, ts)?,
        TAG_AUDIO => session.send_audio_data(stream_id, data, ts)?,
        TAG_SCRIPT => match metadata_from(tag) {
            Some(m) => session.send_metadata(stream_id, &m)?,
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
    let wt = ctx.cfg.rtmp_write_timeout;
    let leftover = tokio::time::timeout(SETUP_TIMEOUT, handshake(&mut sock, wt))
        .await
        .map_err(|_| ConnError::Timeout)??;
    let limits = Limits {
        max_message_bytes: ctx.cfg.rtmp_max_message_bytes,
        ..Limits::default()
    };
    let (mut session, initial) = Session::new(limits)?;
    let mut pending: Vec<ServerSessionResult> = initial;
    pending.extend(session.handle_input(&leftover)?);
    let mut conn = Conn {
        peer,
        player: None,
        ingest: None,
        app_query: String::new(),
        write_timeout: wt,
    };
    let mut buf = vec![0u8; 8192];
    let setup_deadline = tokio::time::Instant::now() + SETUP_TIMEOUT;
    let mut setup_bytes = leftover.len();
    let mut idle_deadline = tokio::time::Instant::now() + PUBLISH_IDLE;
    loop {
        // Act on what the session produced.
        for r in std::mem::take(&mut pending) {
            match r {
                ServerSessionResult::OutboundResponse(p) => send(&mut sock, &p.bytes, wt).await?,
                ServerSessionResult::RaisedEvent(ev) => {
                    pending.extend(on_event(&mut session, &ctx, ev, &mut conn, &mut sock).await?);
                }
                ServerSessionResult::UnhandleableMessageReceived(_) => {}
            }
        }
        if conn.ingest.as_ref().is_some_and(|i| i.closing()) {
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
        let ended = async {
            match conn.ingest.as_mut() {
                Some(i) => i.ended().await,
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
                        return Err(ConnError::Closed("too much data before play/publish".into()));
                    }
                }
                idle_deadline = tokio::time::Instant::now() + PUBLISH_IDLE;
                pending = session.handle_input(&buf[..n])?;
            }
            tag = live => match tag {
                Some(tag) => {
                    let id = conn.player.as_ref().map_or(0, |(id, _)| *id);
                    if let Some(bytes) = packet_for(&mut session, id, &tag)? {
                        send(&mut sock, &bytes, wt).await?;
                    }
                }
                None => {
                    // The stream ended: tell the player and close.
                    if let Some((id, _)) = conn.player.take()
                        && let Ok(p) = session.finish_playing(id)
                    {
                        let _ = send(&mut sock, &p.bytes, wt).await;
                    }
                    return Ok(());
                }
            },
            _ = ended => return Ok(()),
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
    ingest: Option<Box<dyn Ingest>>,
    /// A query string the client put on the app name (`rtmp://h/live?sign=...`), used when the
    /// stream name has none.
    app_query: String,
    write_timeout: Duration,
}

/// Check `?sign=&expires=` of `name` (`stream?query`) for `/live/{stream}` when `required`.
pub(crate) fn check_signature(
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

async fn on_event(
    session: &mut Session,
    ctx: &RtmpContext,
    ev: ServerSessionEvent,
    conn: &mut Conn,
    sock: &mut TcpStream,
) -> Result<Vec<ServerSessionResult>, ConnError> {
    let peer = conn.peer;
    let wt = conn.write_timeout;
    Ok(match ev {
        ServerSessionEvent::ConnectionRequested {
            request_id,
            app_name,
        } => {
            let (app, _) = sign::split_query(&app_name);
            if app == APP {
                conn.app_query = app_name.clone();
                session.accept_request(request_id)?
            } else {
                debug!(%peer, "rtmp connect to unknown app refused");
                session.reject_request(
                    request_id,
                    "NetConnection.Connect.Rejected",
                    "unknown application",
                )?
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
                    .map_err(ConnError::from);
            }
            if let Some(a) = &ctx.authorize {
                let req = crate::webhooks::auth::Request {
                    room: name,
                    protocol: "rtmp",
                    client_addr: Some(peer.to_string()),
                    identity: None,
                    role: None,
                };
                if let Err(e) = a.allow(crate::webhooks::auth::Action::Play, &req).await {
                    warn!(%peer, stream = %name, "rtmp play refused: {e}");
                    return session
                        .reject_request(request_id, "NetStream.Play.Failed", &e)
                        .map_err(ConnError::from);
                }
            }
            match ctx.origin.play(name) {
                Ok(p) => {
                    info!(%peer, stream = %name, "rtmp play");
                    let mut out = session.accept_request(request_id)?;
                    // Flush the acceptance, then the GOP cache, before any live tag.
                    for r in out.drain(..) {
                        if let ServerSessionResult::OutboundResponse(pk) = r {
                            send(sock, &pk.bytes, wt).await?;
                        }
                    }
                    for tag in &p.initial {
                        if let Some(bytes) = packet_for(session, stream_id, tag)? {
                            send(sock, &bytes, wt).await?;
                        }
                    }
                    conn.player = Some((stream_id, p));
                    out
                }
                Err(e) => {
                    debug!(%peer, stream = %name, "rtmp play refused: {e}");
                    session.reject_request(
                        request_id,
                        "NetStream.Play.StreamNotFound",
                        &e.to_string(),
                    )?
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
                    .map_err(ConnError::from);
            }
            let admitted = ctx
                .publishers
                .publish(&stream_key, &conn.app_query, peer)
                .await;
            match admitted {
                Ok(ingest) => {
                    conn.ingest = Some(ingest);
                    session.accept_request(request_id)?
                }
                Err(msg) => {
                    let out =
                        session.reject_request(request_id, "NetStream.Publish.Denied", &msg)?;
                    // Send the status, then close: a refused publisher has nothing else to do.
                    for r in out {
                        if let ServerSessionResult::OutboundResponse(pk) = r {
                            let _ = send(sock, &pk.bytes, wt).await;
                        }
                    }
                    let _ = tokio::time::timeout(wt, sock.flush()).await;
                    return Err(ConnError::Closed(format!("publish refused: {msg}")));
                }
            }
        }
        ServerSessionEvent::VideoDataReceived {
            data, timestamp, ..
        } => {
            if let Some(i) = conn.ingest.as_mut()
                && !i.closing()
            {
                i.on_video(&data, timestamp.value);
            }
            vec![]
        }
        ServerSessionEvent::AudioDataReceived {
            data, timestamp, ..
        } => {
            if let Some(i) = conn.ingest.as_mut()
                && !i.closing()
            {
                i.on_audio(&data, timestamp.value);
            }
            vec![]
        }
        ServerSessionEvent::PublishStreamFinished { .. } => {
            if let Some(i) = conn.ingest.as_mut() {
                i.finish();
            }
            vec![]
        }
        _ => vec![],
    })
}
