//! RTMP push to a CDN: one task per destination, playing a stream of the embedded origin and
//! publishing it to `rtmp://host[:port]/app/key`. It reconnects with exponential backoff and,
//! by default, never gives up. Because each destination is just another player of the origin,
//! a reconnect restarts with metadata, sequence headers and the GOP cache (so on a keyframe),
//! and a destination that stalls is dropped by the origin instead of holding anyone up.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use rml_rtmp::sessions::{
    ClientSession, ClientSessionConfig, ClientSessionEvent, ClientSessionResult, PublishRequestType,
};
use rml_rtmp::time::RtmpTimestamp;
use serde::Serialize;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tracing::{info, warn};

use super::origin::Origin;
use super::policy::{Guard, PolicyError};
pub use crate::config::{CdnSigning, Destination};
use crate::media::flv::{TAG_AUDIO, TAG_SCRIPT, TAG_VIDEO, Tag};
use crate::webhooks::Event;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where to publish, parsed from an `rtmp://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtmpUrl {
    pub host: String,
    pub port: u16,
    pub app: String,
    /// Stream key, including any query string (CDN signatures live there).
    pub key: String,
}

impl RtmpUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("rtmp://")
            .ok_or_else(|| "destination must be an rtmp:// URL".to_string())?;
        let (authority, path) = rest
            .split_once('/')
            .ok_or_else(|| "missing /app/key in RTMP URL".to_string())?;
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse().map_err(|_| format!("bad port {p:?}"))?,
            ),
            None => (authority.to_string(), 1935),
        };
        let (app, key) = path
            .split_once('/')
            .ok_or_else(|| "missing stream key in RTMP URL".to_string())?;
        if host.is_empty() || app.is_empty() || key.is_empty() {
            return Err("RTMP URL needs host, app and stream key".into());
        }
        Ok(Self {
            host,
            port,
            app: app.to_string(),
            key: key.to_string(),
        })
    }

    /// The URL without the key's query string, safe to log and show (signatures stay secret).
    pub fn redacted(&self) -> String {
        let key = self.key.split('?').next().unwrap_or("");
        format!("rtmp://{}:{}/{}/{}", self.host, self.port, self.app, key)
    }
}

// The plain types live in config (operators write them in `bridge.auto_destinations`); what
// needs the RTMP URL parser and the signing functions stays here.
impl Destination {
    /// The URL to connect to at Unix time `now` (`rand` is the auth_key nonce).
    pub fn signed_url(&self, now: u64, rand: &str) -> Result<String, String> {
        let Destination::Signed { url, sign } = self else {
            return Ok(self.url().to_string());
        };
        let u = RtmpUrl::parse(url)?;
        let stream = u.key.split('?').next().unwrap_or("");
        let query = match sign {
            CdnSigning::TxSecret { key, ttl_secs } => {
                let (secret, time) =
                    crate::auth::sign::tx_secret(key, stream, now.saturating_add(*ttl_secs));
                format!("txSecret={secret}&txTime={time}")
            }
            CdnSigning::AuthKey { key, ttl_secs, uid } => {
                if uid.contains('-') || uid.is_empty() {
                    return Err("auth_key uid must be non-empty without '-'".into());
                }
                let v = crate::auth::sign::auth_key(
                    &u.app,
                    stream,
                    now.saturating_add(*ttl_secs),
                    rand,
                    uid,
                    key,
                );
                format!("auth_key={v}")
            }
        };
        let sep = if url.contains('?') { '&' } else { '?' };
        Ok(format!("{url}{sep}{query}"))
    }

    /// Check the URL and signing settings without connecting.
    pub fn validate(&self) -> Result<(), String> {
        self.signed_url(0, "0")
            .and_then(|u| RtmpUrl::parse(&u))
            .map(|_| ())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PushState {
    Connecting,
    Connected,
    Retrying,
    Stopped,
    Failed,
}

/// Why a push attempt ended. The API shows a host only [`PushError::code`]: the details (OS
/// errors, addresses, what the far end said) would let a host map networks through the
/// server, so they go to the server log and to admin callers only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    #[error("refused by the destination policy: {0}")]
    Refused(#[from] PolicyError),
    #[error("resolving the host: {0}")]
    Resolve(String),
    #[error("connect to {addr}: {detail}")]
    Connect { addr: String, detail: String },
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error("RTMP: {0}")]
    Protocol(String),
    #[error("rejected by the server: {0}")]
    Rejected(String),
    #[error("no bytes accepted for {0:?}: the destination is stalled")]
    Stalled(Duration),
    #[error("connection lost: {0}")]
    Disconnected(String),
    #[error("bad destination: {0}")]
    BadUrl(String),
    #[error("{0}")]
    Stream(String),
}

impl PushError {
    /// Stable code shown in the status (`last_error`).
    pub fn code(&self) -> &'static str {
        match self {
            PushError::Refused(_) => "refused_by_policy",
            PushError::Resolve(_) => "resolve_failed",
            PushError::Connect { .. } => "connect_failed",
            PushError::Timeout(_) => "timeout",
            PushError::Protocol(_) => "protocol_error",
            PushError::Rejected(_) => "rejected",
            PushError::Stalled(_) => "stalled",
            PushError::Disconnected(_) => "disconnected",
            PushError::BadUrl(_) => "bad_destination",
            PushError::Stream(_) => "stream_interrupted",
        }
    }
}

fn proto(e: impl std::fmt::Debug) -> PushError {
    PushError::Protocol(format!("{e:?}"))
}

fn io(e: std::io::Error) -> PushError {
    PushError::Disconnected(e.to_string())
}

/// What the API shows about a destination.
#[derive(Debug, Clone, Serialize)]
pub struct PushStatus {
    pub url: String,
    pub state: PushState,
    /// A [`PushError::code`].
    pub last_error: Option<String>,
    /// The full error (OS error text, address): only for admin callers, see [`PushError`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error_detail: Option<String>,
    pub retries: u64,
    /// Times the destination stopped taking bytes while connected (`stalled`).
    pub stalls: u64,
    pub bytes_sent: u64,
    /// Unix time (s) of the current connection, if connected.
    pub connected_since: Option<u64>,
}

/// Reconnect policy: delays double from `initial` up to `max`; `max_retries` None = forever.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub max_retries: Option<u64>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
            max_retries: None,
        }
    }
}

impl Backoff {
    pub fn delay(&self, attempt: u64) -> Duration {
        let factor = 1u32 << attempt.min(16) as u32;
        self.initial.saturating_mul(factor).min(self.max)
    }
}

/// How a destination connects: reconnect policy, who may be connected to, and when a
/// connected destination that takes no bytes counts as stalled.
#[derive(Debug, Clone)]
pub struct PushOptions {
    pub backoff: Backoff,
    pub guard: Guard,
    pub stall_timeout: Duration,
    /// Where connected / retrying / failed go (about the room the stream is named after).
    pub webhooks: crate::webhooks::Webhooks,
}

impl Default for PushOptions {
    fn default() -> Self {
        Self {
            backoff: Backoff::default(),
            guard: Guard::Trusted,
            stall_timeout: Duration::from_secs(5),
            webhooks: Default::default(),
        }
    }
}

/// The socket's kernel send buffer. Small on purpose: with the default autotuning (up to
/// 4 MiB) a frozen CDN swallows many seconds of stream into buffers before a write blocks,
/// and a blocked write is how a stall shows. 256 KiB (the kernel doubles it) is about 0.5 s of
/// the largest allowed bitrate, and covers the bandwidth-delay product of 8 Mbit/s at 200 ms.
const PUSH_SNDBUF: u32 = 256 * 1024;

/// The RTMP acknowledgement window we ask the destination for: it acknowledges every this
/// many bytes it has read (RTMP "Window Acknowledgement Size"). Acks are what shows that the
/// far end's application, not just its kernel, takes the stream: a frozen CDN's kernel keeps
/// accepting bytes into its receive buffer (megabytes, tens of seconds of a quiet stream), but
/// its acks stop at once.
const ACK_WINDOW: u32 = 32 * 1024;

/// How often a connected destination's progress is checked.
const PROGRESS_CHECK: Duration = Duration::from_millis(250);

/// Whether the far end still reads what we send, judged by its RTMP acknowledgements.
/// Destinations that never acknowledge are judged by write timeouts only.
struct Progress {
    /// Last acknowledged byte count, once the destination has acknowledged anything.
    acked: Option<u32>,
    /// Bytes written since the acknowledged count last changed.
    since_ack: u64,
    last_change: Instant,
}

impl Progress {
    fn new() -> Self {
        Self {
            acked: None,
            since_ack: 0,
            last_change: Instant::now(),
        }
    }

    fn on_ack(&mut self, bytes_received: u32) {
        if self.acked != Some(bytes_received) {
            self.acked = Some(bytes_received);
            self.since_ack = 0;
            self.last_change = Instant::now();
        }
    }

    /// Stalled: it acknowledges normally, yet more than two windows went out (one window plus
    /// as much again in flight) without any acknowledgement for `stall`.
    fn stalled(&self, stall: Duration) -> bool {
        self.acked.is_some()
            && self.since_ack > 2 * u64::from(ACK_WINDOW)
            && self.last_change.elapsed() > stall
    }
}

/// A running destination. Dropping it stops the push.
pub struct Push {
    status: Arc<Mutex<PushStatus>>,
    stop: watch::Sender<bool>,
}

impl Push {
    pub fn status(&self) -> PushStatus {
        match self.status.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

impl Drop for Push {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn update(status: &Mutex<PushStatus>, f: impl FnOnce(&mut PushStatus)) {
    match status.lock() {
        Ok(mut s) => f(&mut s),
        Err(p) => f(&mut p.into_inner()),
    }
}

/// Start pushing origin stream `stream` to `url` (trusted: no destination policy).
pub fn start(
    origin: Arc<Origin>,
    stream: &str,
    url: &str,
    backoff: Backoff,
) -> Result<Push, String> {
    let opts = PushOptions {
        backoff,
        ..Default::default()
    };
    start_destination(origin, stream, &Destination::from(url), opts)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Start pushing origin stream `stream` to `dest`, signing its URL at every connect.
pub fn start_destination(
    origin: Arc<Origin>,
    stream: &str,
    dest: &Destination,
    opts: PushOptions,
) -> Result<Push, String> {
    dest.validate()?;
    opts.guard
        .check_url(dest.url())
        .map_err(|e| e.to_string())?;
    let dest = dest.clone();
    let target = RtmpUrl::parse(dest.url())?;
    let status = Arc::new(Mutex::new(PushStatus {
        url: target.redacted(),
        state: PushState::Connecting,
        last_error: None,
        last_error_detail: None,
        retries: 0,
        stalls: 0,
        bytes_sent: 0,
        connected_since: None,
    }));
    let (stop_tx, mut stop) = watch::channel(false);
    let st = status.clone();
    let stream = stream.to_string();
    let backoff = opts.backoff;
    tokio::spawn(async move {
        let mut attempt = 0u64;
        loop {
            update(&st, |s| s.state = PushState::Connecting);
            let started = Instant::now();
            // A fresh signature for every connection (signed URLs expire).
            let nonce = format!("{:016x}", rand::random::<u64>());
            let attempt_target = dest
                .signed_url(unix_now(), &nonce)
                .and_then(|u| RtmpUrl::parse(&u));
            let result = tokio::select! {
                r = async {
                    match &attempt_target {
                        Ok(t) => run_once(&origin, &stream, t, &st, &opts).await,
                        Err(e) => Err(PushError::BadUrl(e.clone())),
                    }
                } => r,
                _ = stop.changed() => Ok(()),
            };
            if *stop.borrow() {
                break;
            }
            // A connection that stayed up a while resets the backoff.
            if started.elapsed() > Duration::from_secs(10) {
                attempt = 0;
            }
            let err = match result {
                Ok(()) => PushError::Stream("stream ended".into()),
                Err(e) => e,
            };
            // The full error only here and for admins; see PushError.
            warn!(url = %target.redacted(), code = err.code(), "push interrupted: {err}");
            let stalled = matches!(err, PushError::Stalled(_));
            let retries = match st.lock() {
                Ok(s) => s.retries,
                Err(p) => p.into_inner().retries,
            };
            if backoff.max_retries.is_some_and(|m| attempt >= m) {
                opts.webhooks.emit(
                    &stream,
                    Event::DestinationFailed {
                        url: target.redacted(),
                        retries,
                        error: err.code(),
                        detail: err.to_string(),
                    },
                );
                update(&st, |s| {
                    s.state = PushState::Failed;
                    s.last_error = Some(err.code().into());
                    s.last_error_detail = Some(err.to_string());
                    s.connected_since = None;
                    s.stalls += u64::from(stalled);
                });
                return;
            }
            update(&st, |s| {
                s.state = PushState::Retrying;
                s.last_error = Some(err.code().into());
                s.last_error_detail = Some(err.to_string());
                s.retries += 1;
                s.stalls += u64::from(stalled);
                s.connected_since = None;
            });
            let delay = backoff.delay(attempt);
            opts.webhooks.emit(
                &stream,
                Event::DestinationRetrying {
                    url: target.redacted(),
                    retries: retries + 1,
                    error: err.code(),
                    detail: err.to_string(),
                    retry_in_ms: delay.as_millis().min(u128::from(u64::MAX)) as u64,
                },
            );
            attempt += 1;
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => break,
            }
        }
        update(&st, |s| {
            s.state = PushState::Stopped;
            s.connected_since = None;
        });
    });
    Ok(Push {
        status,
        stop: stop_tx,
    })
}

/// Resolve the destination's host now and connect to the first address the guard allows.
/// Denied addresses are never connected to, whatever DNS said when the destination was added.
async fn connect(target: &RtmpUrl, guard: &Guard) -> Result<TcpStream, PushError> {
    let host = target
        .host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(&target.host);
    let addrs: Vec<SocketAddr> = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::lookup_host((host, target.port)),
    )
    .await
    .map_err(|_| PushError::Timeout("resolving the host"))?
    .map_err(|e| PushError::Resolve(e.to_string()))?
    .collect();
    let mut refused = None;
    let mut last = None;
    for addr in addrs {
        if let Err(e) = guard.check_addr(addr.ip()) {
            warn!(url = %target.redacted(), %addr, "push destination address refused by policy");
            refused = Some(e);
            continue;
        }
        match connect_addr(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .or(refused.map(PushError::Refused))
        .unwrap_or_else(|| PushError::Resolve("no address".into())))
}

async fn connect_addr(addr: SocketAddr) -> Result<TcpStream, PushError> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    };
    let err = |e: std::io::Error| PushError::Connect {
        addr: addr.to_string(),
        detail: e.to_string(),
    };
    let sock = sock.map_err(err)?;
    sock.set_send_buffer_size(PUSH_SNDBUF).map_err(err)?;
    sock.set_nodelay(true).map_err(err)?;
    tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(addr))
        .await
        .map_err(|_| PushError::Timeout("connect"))?
        .map_err(err)
}

/// Write with a deadline: a destination that takes no bytes for `stall` is stalled.
async fn write(sock: &mut TcpStream, bytes: &[u8], stall: Duration) -> Result<(), PushError> {
    tokio::time::timeout(stall, sock.write_all(bytes))
        .await
        .map_err(|_| PushError::Stalled(stall))?
        .map_err(io)
}

async fn send_results(
    sock: &mut TcpStream,
    results: Vec<ClientSessionResult>,
    events: &mut Vec<ClientSessionEvent>,
    stall: Duration,
) -> Result<(), PushError> {
    for r in results {
        match r {
            ClientSessionResult::OutboundResponse(p) => write(sock, &p.bytes, stall).await?,
            ClientSessionResult::RaisedEvent(e) => events.push(e),
            ClientSessionResult::UnhandleableMessageReceived(_) => {}
        }
    }
    Ok(())
}

/// Read until the session raises an event matching `want` (or a rejection).
async fn wait_for(
    sock: &mut TcpStream,
    session: &mut ClientSession,
    want: fn(&ClientSessionEvent) -> bool,
) -> Result<(), PushError> {
    let mut buf = vec![0u8; 8192];
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    loop {
        let n = tokio::time::timeout_at(deadline, sock.read(&mut buf))
            .await
            .map_err(|_| PushError::Timeout("waiting for the server"))?
            .map_err(io)?;
        if n == 0 {
            return Err(PushError::Disconnected("closed by the server".into()));
        }
        let results = session.handle_input(&buf[..n]).map_err(proto)?;
        let mut events = vec![];
        send_results(sock, results, &mut events, CONNECT_TIMEOUT).await?;
        for e in events {
            if let ClientSessionEvent::ConnectionRequestRejected { description } = &e {
                return Err(PushError::Rejected(description.clone()));
            }
            if want(&e) {
                return Ok(());
            }
        }
    }
}

async fn run_once(
    origin: &Origin,
    stream: &str,
    target: &RtmpUrl,
    status: &Mutex<PushStatus>,
    opts: &PushOptions,
) -> Result<(), PushError> {
    let mut player = origin
        .play(stream)
        .map_err(|e| PushError::Stream(e.to_string()))?;
    let mut sock = connect(target, &opts.guard).await?;
    let stall = opts.stall_timeout;
    // Handshake.
    let mut hs = Handshake::new(PeerType::Client);
    let p0p1 = hs.generate_outbound_p0_and_p1().map_err(proto)?;
    write(&mut sock, &p0p1, CONNECT_TIMEOUT).await?;
    let mut buf = vec![0u8; 8192];
    let leftover = loop {
        let n = tokio::time::timeout(CONNECT_TIMEOUT, sock.read(&mut buf))
            .await
            .map_err(|_| PushError::Timeout("RTMP handshake"))?
            .map_err(io)?;
        if n == 0 {
            return Err(PushError::Disconnected("closed during handshake".into()));
        }
        match hs.process_bytes(&buf[..n]).map_err(proto)? {
            HandshakeProcessResult::InProgress { response_bytes } => {
                write(&mut sock, &response_bytes, CONNECT_TIMEOUT).await?;
            }
            HandshakeProcessResult::Completed {
                response_bytes,
                remaining_bytes,
            } => {
                write(&mut sock, &response_bytes, CONNECT_TIMEOUT).await?;
                break remaining_bytes;
            }
        }
    };
    let mut config = ClientSessionConfig::new();
    config.window_ack_size = ACK_WINDOW;
    config.tc_url = Some(format!(
        "rtmp://{}:{}/{}",
        target.host, target.port, target.app
    ));
    let (mut session, initial) = ClientSession::new(config).map_err(proto)?;
    let mut events = vec![];
    send_results(&mut sock, initial, &mut events, CONNECT_TIMEOUT).await?;
    if !leftover.is_empty() {
        let r = session.handle_input(&leftover).map_err(proto)?;
        send_results(&mut sock, r, &mut events, CONNECT_TIMEOUT).await?;
    }
    let r = session
        .request_connection(target.app.clone())
        .map_err(proto)?;
    send_results(&mut sock, vec![r], &mut events, CONNECT_TIMEOUT).await?;
    wait_for(&mut sock, &mut session, |e| {
        matches!(e, ClientSessionEvent::ConnectionRequestAccepted)
    })
    .await?;
    let r = session
        .request_publishing(target.key.clone(), PublishRequestType::Live)
        .map_err(proto)?;
    send_results(&mut sock, vec![r], &mut events, CONNECT_TIMEOUT).await?;
    wait_for(&mut sock, &mut session, |e| {
        matches!(e, ClientSessionEvent::PublishRequestAccepted)
    })
    .await?;
    info!(url = %target.redacted(), stream, "push connected");
    opts.webhooks.emit(
        stream,
        Event::DestinationConnected {
            url: target.redacted(),
        },
    );
    let now = unix_now();
    update(status, |s| {
        s.state = PushState::Connected;
        s.connected_since = Some(now);
    });
    let mut progress = Progress::new();
    // Metadata, sequence headers and the GOP first, then live tags.
    for tag in std::mem::take(&mut player.initial) {
        progress.since_ack += send_tag(&mut sock, &mut session, &tag, status, stall).await?;
    }
    let mut check = tokio::time::interval(PROGRESS_CHECK);
    loop {
        tokio::select! {
            n = sock.read(&mut buf) => {
                let n = n.map_err(io)?;
                if n == 0 {
                    return Err(PushError::Disconnected("closed by the server".into()));
                }
                // Acknowledgements and pings.
                let r = session.handle_input(&buf[..n]).map_err(proto)?;
                let mut ev = vec![];
                send_results(&mut sock, r, &mut ev, stall).await?;
                for e in ev {
                    if let ClientSessionEvent::AcknowledgementReceived { bytes_received } = e {
                        progress.on_ack(bytes_received);
                    }
                }
            }
            _ = check.tick() => {
                if progress.stalled(stall) {
                    return Err(PushError::Stalled(stall));
                }
            }
            tag = player.rx.recv() => match tag {
                Some(tag) => {
                    progress.since_ack +=
                        send_tag(&mut sock, &mut session, &tag, status, stall).await?;
                }
                None if origin.is_live(stream) => {
                    return Err(PushError::Stream(
                        "fell behind the stream; restarting at a keyframe".into(),
                    ))
                }
                None => return Ok(()),
            },
        }
    }
}

async fn send_tag(
    sock: &mut TcpStream,
    session: &mut ClientSession,
    tag: &Tag,
    status: &Mutex<PushStatus>,
    stall: Duration,
) -> Result<u64, PushError> {
    let ts = RtmpTimestamp::new(tag.timestamp_ms);
    let data = Bytes::copy_from_slice(&tag.body);
    let r = match tag.kind {
        TAG_VIDEO => session.publish_video_data(data, ts, false),
        TAG_AUDIO => session.publish_audio_data(data, ts, false),
        TAG_SCRIPT => match super::server::metadata_from(tag) {
            Some(m) => session.publish_metadata(&m),
            None => return Ok(0),
        },
        _ => return Ok(0),
    }
    .map_err(proto)?;
    if let ClientSessionResult::OutboundResponse(p) = r {
        write(sock, &p.bytes, stall).await?;
        let n = p.bytes.len() as u64;
        update(status, |s| s.bytes_sent += n);
        return Ok(n);
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_redact() {
        let u =
            RtmpUrl::parse("rtmp://push.example.com/live/room1?txSecret=abc&txTime=5f").unwrap();
        assert_eq!(u.port, 1935);
        assert_eq!(u.app, "live");
        assert_eq!(u.key, "room1?txSecret=abc&txTime=5f");
        assert_eq!(u.redacted(), "rtmp://push.example.com:1935/live/room1");
        assert!(RtmpUrl::parse("http://x/live/a").is_err());
        assert!(RtmpUrl::parse("rtmp://x:99999/live/a").is_err());
        assert!(RtmpUrl::parse("rtmp://x/live").is_err());
    }

    #[test]
    fn signed_destinations_get_a_fresh_signature_in_the_query() {
        let d: Destination = serde_json::from_value(serde_json::json!({
            "url": "rtmp://push.example.com/live/room1",
            "sign": {"scheme": "tx_secret", "key": "mykey", "ttl_secs": 0}
        }))
        .unwrap();
        // txTime 5C2AAD80 = 1546300800; txSecret = md5("mykeyroom15C2AAD80") (by hand, Python).
        assert_eq!(
            d.signed_url(1_546_300_800, "x").unwrap(),
            "rtmp://push.example.com/live/room1?txSecret=fa8b25e408640aa32c627665c8f948a5&txTime=5C2AAD80"
        );
        let d: Destination = serde_json::from_value(serde_json::json!({
            "url": "rtmp://push.example.com/live/room1?vhost=v",
            "sign": {"scheme": "auth_key", "key": "mykey", "ttl_secs": 100}
        }))
        .unwrap();
        // md5("/live/room1-1546300800-0-0-mykey") by hand (Python).
        assert_eq!(
            d.signed_url(1_546_300_700, "0").unwrap(),
            "rtmp://push.example.com/live/room1?vhost=v&auth_key=1546300800-0-0-815338df2d2d7e4016256b04ad01ecb7"
        );
        assert_eq!(d.url(), "rtmp://push.example.com/live/room1?vhost=v");
        assert!(
            !format!("{d:?}").contains("mykey"),
            "keys are never printed"
        );
        // Plain strings still work; bad schemes and URLs are refused.
        let d: Destination = serde_json::from_value(serde_json::json!("rtmp://h/live/k")).unwrap();
        assert_eq!(d.signed_url(5, "0").unwrap(), "rtmp://h/live/k");
        assert!(
            serde_json::from_value::<Destination>(serde_json::json!({
                "url": "rtmp://h/live/k", "sign": {"scheme": "nope", "key": "k"}
            }))
            .is_err()
        );
        let bad = Destination::Signed {
            url: "http://h/live/k".into(),
            sign: CdnSigning::TxSecret {
                key: "k".into(),
                ttl_secs: 1,
            },
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn progress_is_judged_by_acknowledgements() {
        let stall = Duration::from_millis(0);
        let mut p = Progress::new();
        p.since_ack = 10 * u64::from(ACK_WINDOW);
        assert!(
            !p.stalled(stall),
            "a peer that never acked: write timeouts only"
        );
        p.on_ack(100);
        assert!(!p.stalled(stall), "just acked");
        p.since_ack = 3 * u64::from(ACK_WINDOW);
        std::thread::sleep(Duration::from_millis(2));
        assert!(p.stalled(stall), "three windows out, no ack");
        p.on_ack(100);
        assert!(p.stalled(stall), "the same count again is no progress");
        p.on_ack(200);
        assert!(!p.stalled(stall));
    }

    #[test]
    fn backoff_doubles_to_the_cap() {
        let b = Backoff::default();
        assert_eq!(b.delay(0), Duration::from_millis(500));
        assert_eq!(b.delay(3), Duration::from_secs(4));
        assert_eq!(b.delay(40), Duration::from_secs(30));
    }
}
