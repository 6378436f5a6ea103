//! RTMP server for the embedded origin: players pull `rtmp://HOST:PORT/live/{stream}` and get
//! the same GOP-cached stream HTTP-FLV serves. Publishing over RTMP is refused here (ingest
//! with signed stream keys is a separate feature).
//!
//! Protocol work is `rml_rtmp`'s (handshake, chunking, the session state machine); this file
//! only moves bytes and maps events to the origin. Every error closes that one connection.

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
use tracing::{debug, info};

use super::origin::{Origin, Player};
use crate::media::amf0::{self, Value};
use crate::media::flv::{TAG_AUDIO, TAG_SCRIPT, TAG_VIDEO, Tag};

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
    origin: Arc<Origin>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((sock, peer)) => {
                    let origin = origin.clone();
                    let stop = shutdown.clone();
                    tokio::spawn(async move {
                        if let Err(e) = connection(sock, peer, origin, stop).await {
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
    origin: Arc<Origin>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    sock.set_nodelay(true)?;
    let leftover = tokio::time::timeout(SETUP_TIMEOUT, handshake(&mut sock))
        .await
        .map_err(|_| ConnError::Timeout)??;
    let (mut session, initial) = ServerSession::new(ServerSessionConfig::new()).map_err(serr)?;
    let mut pending: Vec<ServerSessionResult> = initial;
    pending.extend(session.handle_input(&leftover).map_err(serr)?);
    let mut player: Option<(u32, Player)> = None;
    let mut buf = vec![0u8; 8192];
    let setup_deadline = tokio::time::Instant::now() + SETUP_TIMEOUT;
    loop {
        // Act on what the session produced.
        for r in std::mem::take(&mut pending) {
            match r {
                ServerSessionResult::OutboundResponse(p) => sock.write_all(&p.bytes).await?,
                ServerSessionResult::RaisedEvent(ev) => {
                    pending.extend(
                        on_event(&mut session, &origin, ev, peer, &mut player, &mut sock).await?,
                    );
                }
                ServerSessionResult::UnhandleableMessageReceived(_) => {}
            }
        }
        if !pending.is_empty() {
            continue;
        }
        let waiting = player.is_none();
        let live = async {
            match player.as_mut() {
                Some((_, p)) => p.rx.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            n = sock.read(&mut buf) => {
                let n = n?;
                if n == 0 {
                    return Ok(());
                }
                pending = session.handle_input(&buf[..n]).map_err(serr)?;
            }
            tag = live => match tag {
                Some(tag) => {
                    let id = player.as_ref().map_or(0, |(id, _)| *id);
                    if let Some(bytes) = packet_for(&mut session, id, &tag)? {
                        sock.write_all(&bytes).await?;
                    }
                }
                None => {
                    // The stream ended: tell the player and close.
                    if let Some((id, _)) = player.take()
                        && let Ok(p) = session.finish_playing(id)
                    {
                        let _ = sock.write_all(&p.bytes).await;
                    }
                    return Ok(());
                }
            },
            _ = tokio::time::sleep_until(setup_deadline), if waiting => {
                return Err(ConnError::Timeout);
            }
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

async fn on_event(
    session: &mut ServerSession,
    origin: &Origin,
    ev: ServerSessionEvent,
    peer: SocketAddr,
    player: &mut Option<(u32, Player)>,
    sock: &mut TcpStream,
) -> Result<Vec<ServerSessionResult>, ConnError> {
    Ok(match ev {
        ServerSessionEvent::ConnectionRequested {
            request_id,
            app_name,
        } => {
            if app_name == APP {
                session.accept_request(request_id).map_err(serr)?
            } else {
                debug!(%peer, app = %app_name, "rtmp connect to unknown app refused");
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
        } => match origin.play(&stream_key) {
            Ok(p) => {
                info!(%peer, stream = %stream_key, "rtmp play");
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
                *player = Some((stream_id, p));
                out
            }
            Err(e) => {
                debug!(%peer, stream = %stream_key, "rtmp play refused: {e}");
                session
                    .reject_request(request_id, "NetStream.Play.StreamNotFound", &e.to_string())
                    .map_err(serr)?
            }
        },
        ServerSessionEvent::PublishStreamRequested { request_id, .. } => session
            .reject_request(
                request_id,
                "NetStream.Publish.Denied",
                "publishing to this server is not enabled",
            )
            .map_err(serr)?,
        _ => vec![],
    })
}
