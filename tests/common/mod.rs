//! Test support: start the real `cohost` binary on ephemeral loopback ports, and drive it with
//! clients that speak the documented signaling protocol and real WebRTC (the `webrtc` crate).
#![allow(dead_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use rtc::interceptor::{Interceptor, Packet as IPacket, Slot, StreamInfo, TaggedPacket};
use rtc::media_stream::MediaStreamTrack;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use rtc::sansio::Protocol;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceCandidateInit, RTCPeerConnectionIceEvent, RTCSessionDescription, SettingEngineBuilder,
};
use webrtc::rtp_transceiver::RtpSender;

use cohost::auth::{Authenticator, Claims, Role};
use cohost::config::AuthConfig;

pub mod impair;
pub mod netns;

pub const T: Duration = Duration::from_secs(15);

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TEST_LOG").unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("warn,webrtc=error,rtc=error")
            }),
        )
        .with_test_writer()
        .try_init();
}

/// The real server binary, started on an ephemeral port and killed (by PID) on drop.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    /// The RTMP listener (origin play and ingest).
    pub rtmp: Option<SocketAddr>,
    pub auth: Authenticator,
}

impl Server {
    pub async fn start() -> Server {
        Self::start_with(&[]).await
    }

    pub async fn start_with(env: &[(&str, &str)]) -> Server {
        Self::start_at(None, "127.0.0.1", env).await
    }

    /// The server inside network namespace `ns` ([`netns::Netns`]), listening and gathering
    /// its ICE candidates on `ip`, its address there.
    pub async fn start_in_netns(ns: &str, ip: &str, env: &[(&str, &str)]) -> Server {
        let mut env = env.to_vec();
        // Not loopback: the development secret must be allowed explicitly.
        env.extend([
            ("COHOST_WEBRTC__BIND_IP", ip),
            ("COHOST_SERVER__ALLOW_DEV_SECRET", "true"),
        ]);
        Self::start_at(Some(ns), ip, &env).await
    }

    async fn start_at(ns: Option<&str>, ip: &str, env: &[(&str, &str)]) -> Server {
        init_logs();
        let bin = env!("CARGO_BIN_EXE_cohost");
        let mut cmd = match ns {
            // `ip netns exec` execs the server: the child's PID is the server's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, bin]);
                c
            }
            None => Command::new(bin),
        };
        let listen = format!("{ip}:0");
        cmd.args(["serve", "--listen", &listen, "--rtmp-listen", &listen])
            .env_remove("COHOST_CONFIG")
            .env(
                "COHOST_LOG",
                std::env::var("COHOST_LOG")
                    .unwrap_or_else(|_| "warn,rtc=error,webrtc=error".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        // Most tests start bridges themselves (and check the answers); tests of going live in
        // one step turn the default back on.
        cmd.env("COHOST_BRIDGE__AUTO_START", "false");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn cohost");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::time::timeout(T, async {
            while let Ok(Some(l)) = lines.next_line().await {
                if let Some(rest) = l.strip_prefix("cohost listening on http://") {
                    return rest.parse::<SocketAddr>().expect("addr");
                }
            }
            panic!("server exited before listening");
        })
        .await
        .expect("server start timeout");
        // The RTMP line follows at once when RTMP is enabled.
        let rtmp = tokio::time::timeout(Duration::from_secs(2), lines.next_line())
            .await
            .ok()
            .and_then(|l| l.ok().flatten())
            .and_then(|l| {
                l.strip_prefix("cohost rtmp on rtmp://")
                    .and_then(|r| r.strip_suffix("/live"))
                    .and_then(|a| a.parse::<SocketAddr>().ok())
            });
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Server {
            child,
            addr,
            rtmp,
            auth: Authenticator::new(&AuthConfig::default()).expect("auth"),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub async fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().await.expect("wait")
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn token(&self, room: &str, identity: &str, role: Role) -> String {
        self.auth.mint(room, identity, role, None).expect("mint")
    }

    pub fn expired_token(&self, room: &str, identity: &str) -> String {
        let claims = Claims {
            room: room.into(),
            sub: identity.into(),
            role: Role::Host,
            iat: 1_000,
            exp: 2_000,
            name: None,
        };
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(AuthConfig::default().secret.as_bytes()),
        )
        .expect("encode")
    }

    /// Plain HTTP GET; returns (status, body).
    pub async fn get(&self, path: &str, bearer: Option<&str>) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(self.addr)
            .await
            .expect("connect");
        let auth = bearer
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\n{auth}Connection: close\r\n\r\n",
            self.addr
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.expect("read");
        let text = String::from_utf8_lossy(&buf).to_string();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        // Chunked bodies: good enough to search in; strip chunk size lines for JSON.
        (status, body)
    }

    /// HTTP request with a JSON body; returns (status, body).
    pub async fn send_json(
        &self,
        method: &str,
        path: &str,
        bearer: &str,
        body: &Value,
    ) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(self.addr)
            .await
            .expect("connect");
        let b = body.to_string();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {bearer}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
            self.addr,
            b.len()
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.expect("read");
        let text = String::from_utf8_lossy(&buf).to_string();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    pub async fn metrics(&self) -> HashMap<String, f64> {
        let (_, body) = self.get("/metrics", None).await;
        body.lines()
            .filter(|l| l.starts_with("cohost_"))
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((k.to_string(), v.trim().parse().ok()?))
            })
            .collect()
    }

    pub async fn metric(&self, name: &str) -> f64 {
        self.metrics().await.get(name).copied().unwrap_or(-1.0)
    }

    /// Wait until `f(metrics)` holds (polling /metrics), or panic after `T`.
    pub async fn wait_metrics(&self, what: &str, f: impl Fn(&HashMap<String, f64>) -> bool) {
        let deadline = Instant::now() + T;
        loop {
            let m = self.metrics().await;
            if f(&m) {
                return;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}; metrics: {m:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub type WsTx = mpsc::UnboundedSender<Message>;

/// Raw signaling connection: send JSON, await responses by id, read pushed messages.
pub struct Signal {
    tx: WsTx,
    pending: Arc<Mutex<HashMap<String, oneshot::Sender<Value>>>>,
    pub events: mpsc::UnboundedReceiver<Value>,
    next_id: AtomicU64,
    pub closed: Arc<Mutex<Option<(u16, String)>>>,
    reader: tokio::task::JoinHandle<()>,
    /// To the writer task: a new socket (reconnect) or none (vanish).
    ctl: mpsc::UnboundedSender<Option<WsSink>>,
    ev_tx: mpsc::UnboundedSender<Value>,
    auto: Option<mpsc::UnboundedSender<Value>>,
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;
type WsSink = futures::stream::SplitSink<WsStream, Message>;

impl Drop for Signal {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn id_key(v: &Value) -> Option<String> {
    match v.get("id")? {
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// Handles the server's subscriber offers and candidates when attached.
pub type AutoHandler = Arc<dyn Fn(Value) -> bool + Send + Sync>;

/// Read one WebSocket: responses to their requests, offers and candidates to the auto
/// handler, everything to `events`, and the close code to `closed`.
fn spawn_reader(
    mut stream: futures::stream::SplitStream<WsStream>,
    pending: Arc<Mutex<HashMap<String, oneshot::Sender<Value>>>>,
    ev_tx: mpsc::UnboundedSender<Value>,
    auto: Option<mpsc::UnboundedSender<Value>>,
    closed: Arc<Mutex<Option<(u16, String)>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(Ok(m)) = stream.next().await {
            match m {
                Message::Text(t) => {
                    let Ok(v) = serde_json::from_str::<Value>(&t) else {
                        continue;
                    };
                    let ty = v["type"].as_str().unwrap_or("").to_string();
                    if (ty == "response" || ty == "error")
                        && let Some(k) = id_key(&v)
                        && let Some(s) = pending.lock().unwrap().remove(&k)
                    {
                        let _ = s.send(v);
                        continue;
                    }
                    if let Some(a) = &auto
                        && (ty == "offer" || ty == "candidate")
                    {
                        let _ = a.send(v.clone());
                    }
                    let _ = ev_tx.send(v);
                }
                Message::Close(f) => {
                    *closed.lock().unwrap() = Some(
                        f.map(|f| (u16::from(f.code), f.reason.to_string()))
                            .unwrap_or((1005, String::new())),
                    );
                    break;
                }
                _ => {}
            }
        }
        if closed.lock().unwrap().is_none() {
            *closed.lock().unwrap() = Some((1006, "eof".into()));
        }
    })
}

impl Signal {
    pub async fn connect(url: &str) -> Signal {
        Self::connect_with(url, None).await
    }

    pub async fn connect_with(url: &str, auto: Option<mpsc::UnboundedSender<Value>>) -> Signal {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("ws connect");
        let (sink, stream) = ws.split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
        let (ctl, mut ctl_rx) = mpsc::unbounded_channel::<Option<WsSink>>();
        // The writer outlives one socket: `reconnect` hands it the next one. What is sent
        // while there is none is lost, as on a real network.
        tokio::spawn(async move {
            let mut sink = Some(sink);
            loop {
                tokio::select! {
                    // A new socket first: what is sent after a reconnect goes on it.
                    biased;
                    c = ctl_rx.recv() => match c {
                        Some(next) => sink = next,
                        None => break,
                    },
                    m = rx.recv() => {
                        let Some(m) = m else { break };
                        let close = matches!(m, Message::Close(_));
                        if let Some(s) = sink.as_mut()
                            && (s.send(m).await.is_err() || close)
                        {
                            sink = None;
                        }
                    }
                }
            }
        });
        let pending: Arc<Mutex<HashMap<String, oneshot::Sender<Value>>>> = Default::default();
        let (ev_tx, events) = mpsc::unbounded_channel();
        let closed: Arc<Mutex<Option<(u16, String)>>> = Default::default();
        let reader = spawn_reader(
            stream,
            pending.clone(),
            ev_tx.clone(),
            auto.clone(),
            closed.clone(),
        );
        Signal {
            tx,
            pending,
            events,
            next_id: AtomicU64::new(1),
            closed,
            reader,
            ctl,
            ev_tx,
            auto,
        }
    }

    /// Continue on a new WebSocket (after [`Signal::vanish`], or while the old one is still
    /// open: the old one is dropped without a close frame). Requests, events and the offer
    /// handler carry on; send `resume` next.
    pub async fn reconnect(&mut self, url: &str) {
        self.vanish();
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("ws reconnect");
        let (sink, stream) = ws.split();
        *self.closed.lock().unwrap() = None;
        let _ = self.ctl.send(Some(sink));
        self.reader = spawn_reader(
            stream,
            self.pending.clone(),
            self.ev_tx.clone(),
            self.auto.clone(),
            self.closed.clone(),
        );
    }

    /// A sender of raw frames on this connection (and on the ones after a reconnect).
    pub fn sender(&self) -> WsTx {
        self.tx.clone()
    }

    pub fn send_raw(&self, text: impl Into<String>) {
        let _ = self.tx.send(Message::Text(text.into().into()));
    }

    pub fn send(&self, v: Value) {
        self.send_raw(v.to_string());
    }

    /// Send a request with a fresh id and wait for its response or error.
    pub async fn request(&self, mut v: Value) -> Value {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        v["id"] = json!(id);
        let (s, r) = oneshot::channel();
        self.pending.lock().unwrap().insert(id.to_string(), s);
        self.send(v);
        tokio::time::timeout(T, r)
            .await
            .expect("response timeout")
            .expect("response")
    }

    /// Wait for a pushed message matching `pred`, skipping others.
    pub async fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let r = tokio::time::timeout(T, async {
            while let Some(v) = self.events.recv().await {
                if pred(&v) {
                    return Some(v);
                }
            }
            None
        })
        .await;
        match r {
            Ok(Some(v)) => v,
            Ok(None) => panic!("connection ended waiting for {what}"),
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }

    pub async fn wait_closed(&self) -> (u16, String) {
        let deadline = Instant::now() + T;
        loop {
            if let Some(c) = self.closed.lock().unwrap().clone() {
                return c;
            }
            assert!(Instant::now() < deadline, "connection not closed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Drop the TCP connection without a close frame (a killed tab).
    pub fn vanish(&mut self) {
        // Both halves of the socket are dropped: TCP closes with no close frame.
        self.reader.abort();
        let _ = self.ctl.send(None);
    }
}

/// The value of the first `a=<key>:` line of an SDP (`ice-ufrag`, `ice-pwd`, ...).
pub fn sdp_attr(sdp: &str, key: &str) -> Option<String> {
    let prefix = format!("a={key}:");
    sdp.lines()
        .find_map(|l| l.trim_end().strip_prefix(&prefix).map(String::from))
}

/// The payload type of `codec` (e.g. `opus`, `H264`) in an SDP.
pub fn payload_type(sdp: &str, codec: &str) -> u8 {
    sdp.lines()
        .find_map(|l| {
            let (pt, name) = l.strip_prefix("a=rtpmap:")?.split_once(' ')?;
            name.starts_with(codec).then(|| pt.parse().ok())?
        })
        .unwrap_or_else(|| panic!("{codec} in {sdp}"))
}

/// `candidate` with the m-section of a server `candidate` message's `candidate` object.
pub fn candidate_init(c: &Value, candidate: String) -> RTCIceCandidateInit {
    RTCIceCandidateInit {
        candidate,
        sdp_mid: c["sdpMid"].as_str().map(String::from),
        sdp_mline_index: c["sdpMLineIndex"].as_u64().map(|x| x as u16),
        ..Default::default()
    }
}

/// Wait until the track carrying `tag` has `n` packets in `received`: (packets, bad
/// payloads, first packet's arrival).
pub async fn wait_received(
    received: &Arc<Mutex<HashMap<String, Received>>>,
    tag: u32,
    n: u64,
) -> (u64, u64, Instant) {
    let deadline = Instant::now() + T;
    loop {
        {
            let r = received.lock().unwrap();
            if let Some(e) = r.values().find(|e| e.pattern_ids.contains(&tag))
                && e.packets >= n
            {
                return (e.packets, e.bad_payloads, e.first_at.unwrap());
            }
        }
        if Instant::now() > deadline {
            let r = received.lock().unwrap();
            let summary: Vec<_> = r.iter().map(|(k, e)| (k.clone(), e.packets)).collect();
            panic!("timed out waiting for {n} packets of tag {tag}: {summary:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Everything a test receiver records about one incoming track.
#[derive(Default)]
pub struct Received {
    pub kind: String,
    pub stream_id: String,
    pub packets: u64,
    pub bad_payloads: u64,
    /// Sequence numbers seen (to find gaps after NACK recovery).
    pub seqs: Vec<u16>,
    /// SSRCs the packets came with (one per track unless something rewrote it wrongly).
    pub ssrcs: HashSet<u32>,
    pub first_at: Option<Instant>,
    pub pattern_ids: HashSet<u32>,
    /// The first RAW_KEPT packets as received (sequence, timestamp, marker, payload), for tests
    /// that depacketize and decode real media.
    pub raw: Vec<(u16, u32, bool, Bytes)>,
    /// The track itself, for tests that send RTCP about it.
    pub remote: Option<Arc<dyn TrackRemote>>,
}

pub const RAW_KEPT: usize = 4000;

/// Payload pattern: [tag u32][counter u32][bytes derived from both]. Lets a receiver check the
/// bytes arrived intact without knowing anything else.
pub fn make_payload(tag: u32, counter: u32, len: usize) -> Bytes {
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(&tag.to_be_bytes());
    v.extend_from_slice(&counter.to_be_bytes());
    while v.len() < len {
        v.push((tag as usize + counter as usize + v.len()) as u8);
    }
    Bytes::from(v)
}

pub fn check_payload(p: &[u8]) -> Option<u32> {
    if p.len() < 8 {
        return None;
    }
    let tag = u32::from_be_bytes(p[0..4].try_into().ok()?);
    let counter = u32::from_be_bytes(p[4..8].try_into().ok()?);
    let ok = p[8..]
        .iter()
        .enumerate()
        .all(|(i, b)| *b == (tag as usize + counter as usize + i + 8) as u8);
    ok.then_some(tag)
}

struct ClientHandler {
    target: &'static str,
    ws: WsTx,
    received: Arc<Mutex<HashMap<String, Received>>>,
    connected: Arc<AtomicBool>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for ClientHandler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        if let Ok(init) = event.candidate.to_json() {
            let msg = json!({"type":"candidate","target":self.target,"candidate":{
                "candidate": init.candidate, "sdpMid": init.sdp_mid,
                "sdpMLineIndex": init.sdp_mline_index}});
            let _ = self.ws.send(Message::Text(msg.to_string().into()));
        }
    }

    async fn on_connection_state_change(
        &self,
        state: webrtc::peer_connection::RTCPeerConnectionState,
    ) {
        if state == webrtc::peer_connection::RTCPeerConnectionState::Connected {
            self.connected.store(true, Ordering::SeqCst);
        }
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let track_id = track.track_id().await.to_string();
        let stream_id = track.stream_id().await.to_string();
        let kind = format!("{}", track.kind().await).to_lowercase();
        {
            let mut r = self.received.lock().unwrap();
            let e = r.entry(track_id.clone()).or_default();
            e.kind = kind;
            e.stream_id = stream_id;
            e.remote = Some(track.clone());
        }
        let received = self.received.clone();
        tokio::spawn(async move {
            while let Some(ev) = track.poll().await {
                match ev {
                    TrackRemoteEvent::OnRtpPacket(p) => {
                        let mut r = received.lock().unwrap();
                        let e = r.entry(track_id.clone()).or_default();
                        e.packets += 1;
                        e.first_at.get_or_insert_with(Instant::now);
                        e.seqs.push(p.header.sequence_number);
                        e.ssrcs.insert(p.header.ssrc);
                        if e.raw.len() < RAW_KEPT {
                            e.raw.push((
                                p.header.sequence_number,
                                p.header.timestamp,
                                p.header.marker,
                                p.payload.clone(),
                            ));
                        }
                        match check_payload(&p.payload) {
                            Some(tag) => {
                                e.pattern_ids.insert(tag);
                            }
                            None => e.bad_payloads += 1,
                        }
                    }
                    TrackRemoteEvent::OnEnded => break,
                    _ => {}
                }
            }
        });
    }
}

/// Drops chosen outgoing RTP packets the first time they pass (wire-most slot), so that the
/// NACK responder above it has them buffered and can retransmit: simulated loss on the wire.
pub struct LossInterceptor {
    pub every: u16,
    /// Drop on the receive path instead of the send path.
    pub on_read: bool,
    seen: HashSet<(u32, u16)>,
    pub dropped: Arc<AtomicU64>,
    rq: VecDeque<TaggedPacket>,
    wq: VecDeque<TaggedPacket>,
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for LossInterceptor {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;
    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if self.on_read
            && let IPacket::Rtp(p) = &msg.message.packet
            && p.header.sequence_number % self.every == 3
            && self.seen.insert((p.header.ssrc, p.header.sequence_number))
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.rq.push_back(msg);
        Ok(())
    }
    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.rq.pop_front()
    }
    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if !self.on_read
            && let IPacket::Rtp(p) = &msg.message.packet
        {
            let key = (p.header.ssrc, p.header.sequence_number);
            // Only the media payload types we send (96..=127), every Nth sequence number.
            if p.header.sequence_number % self.every == 3 && self.seen.insert(key) {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        }
        self.wq.push_back(msg);
        Ok(())
    }
    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.wq.pop_front()
    }
}

impl Interceptor for LossInterceptor {
    fn bind_local_stream(&mut self, _: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _: &StreamInfo) {}
}

/// A narrow downlink: received RTP over `rate` (bit/s; 0 = no limit) is dropped, as a `tbf`
/// with a queue of 400 ms would drop it (a token bucket of `rate` x 400 ms, at least 8 KB). Wire-most, so the receiver reports above it count the drops as loss.
pub struct RatePolicer {
    pub rate: Arc<AtomicU64>,
    pub passed: Arc<AtomicU64>,
    pub dropped: Arc<AtomicU64>,
    tokens: f64,
    last: Option<Instant>,
    rq: VecDeque<TaggedPacket>,
    wq: VecDeque<TaggedPacket>,
}

impl RatePolicer {
    pub fn new(rate: Arc<AtomicU64>, passed: Arc<AtomicU64>, dropped: Arc<AtomicU64>) -> Self {
        Self {
            rate,
            passed,
            dropped,
            tokens: 0.0,
            last: None,
            rq: VecDeque::new(),
            wq: VecDeque::new(),
        }
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for RatePolicer {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;
    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if let IPacket::Rtp(p) = &msg.message.packet {
            let rate = self.rate.load(Ordering::Relaxed) as f64 / 8.0;
            let now = Instant::now();
            let bucket = (rate * 0.4).max(8000.0);
            let dt = self
                .last
                .replace(now)
                .map_or(0.0, |t| (now - t).as_secs_f64());
            let len = (p.payload.len() + 40) as f64;
            if rate > 0.0 {
                self.tokens = (self.tokens + dt * rate).min(bucket);
                if self.tokens < len {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                self.tokens -= len;
            } else {
                // Unlimited; a limit set later starts with a full bucket, as tbf does.
                self.tokens = f64::MAX;
            }
            self.passed.fetch_add(1, Ordering::Relaxed);
        }
        self.rq.push_back(msg);
        Ok(())
    }
    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.rq.pop_front()
    }
    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.wq.push_back(msg);
        Ok(())
    }
    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.wq.pop_front()
    }
}

impl Interceptor for RatePolicer {
    fn bind_local_stream(&mut self, _: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _: &StreamInfo) {}
}

pub async fn build_pc(
    target: &'static str,
    ws: WsTx,
    received: Arc<Mutex<HashMap<String, Received>>>,
    connected: Arc<AtomicBool>,
    loss: Option<(u16, bool, Arc<AtomicU64>)>,
) -> Arc<dyn PeerConnection> {
    build_pc_with(target, ws, received, connected, loss, None, "127.0.0.1").await
}

/// [`build_pc`], with received RTP going through `policer` first.
pub async fn build_pc_with(
    target: &'static str,
    ws: WsTx,
    received: Arc<Mutex<HashMap<String, Received>>>,
    connected: Arc<AtomicBool>,
    loss: Option<(u16, bool, Arc<AtomicU64>)>,
    policer: Option<RatePolicer>,
    bind_ip: &str,
) -> Arc<dyn PeerConnection> {
    let mut me = cohost::peer::media_engine().unwrap();
    let mut reg = cohost::peer::interceptors(&mut me).unwrap();
    if let Some(p) = policer {
        reg = reg.with(Slot::from(400usize), p);
    }
    if let Some((every, on_read, dropped)) = loss {
        reg = reg.with(
            Slot::from(500usize),
            LossInterceptor {
                every,
                on_read,
                seen: HashSet::new(),
                dropped,
                rq: VecDeque::new(),
                wq: VecDeque::new(),
            },
        );
    }
    let se = SettingEngineBuilder::new()
        .with_ice_connection_attempts(Some(Duration::from_millis(50)), Some(100))
        .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
        .with_include_loopback_candidate(true)
        .with_prflx_acceptance_min_wait(Some(Duration::ZERO))
        .with_srflx_acceptance_min_wait(Some(Duration::ZERO))
        .build();
    let pc = PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(me)
        .with_setting_engine(se)
        .with_interceptor_registry(reg)
        .with_handler(Arc::new(ClientHandler {
            target,
            ws,
            received,
            connected,
        }) as Arc<dyn PeerConnectionEventHandler>)
        .with_udp_addrs(vec![format!("{bind_ip}:0")])
        .build()
        .await
        .expect("client pc");
    Arc::new(pc)
}

/// A local RTP track with a fixed SSRC and codec, for test publishers.
pub fn local_track(
    stream_id: &str,
    kind: RtpCodecKind,
    ssrc: u32,
    mime: &str,
    clock_rate: u32,
    channels: u16,
    fmtp: &str,
) -> Arc<TrackLocalStaticRTP> {
    Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
        stream_id.to_string(),
        format!("{mime}-{ssrc}"),
        "label".to_string(),
        kind,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                ssrc: Some(ssrc),
                ..Default::default()
            },
            codec: RTCRtpCodec {
                mime_type: mime.into(),
                clock_rate,
                channels,
                sdp_fmtp_line: fmtp.into(),
                rtcp_feedback: vec![],
            },
            ..Default::default()
        }],
    )))
}

/// ffmpeg output options: video scaled to 320x180 raw RGB (what [`pixel`] reads), one
/// picture per coded frame (no frames duplicated or dropped to a constant rate).
pub const RAW_RGB_320X180: [&str; 12] = [
    "-map",
    "0:v",
    "-fps_mode",
    "passthrough",
    // Millisecond timestamps, as FLV has them: two pictures a millisecond apart (a switch
    // between the host passed through and the mix) stay two pictures.
    "-enc_time_base",
    "1:1000",
    "-vf",
    "scale=320:180",
    "-f",
    "rawvideo",
    "-pix_fmt",
    "rgb24",
];

pub struct Publication {
    pub audio: Arc<TrackLocalStaticRTP>,
    pub video: Arc<TrackLocalStaticRTP>,
    audio_sender: Arc<dyn RtpSender>,
    video_sender: Arc<dyn RtpSender>,
    pub tag_audio: u32,
    pub tag_video: u32,
    pub plis: Arc<AtomicU64>,
    pub loss_dropped: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

/// A participant: signaling plus a publisher and a subscriber peer connection.
pub struct Client {
    pub sig: Signal,
    pub pid: String,
    pub join: Value,
    pub received: Arc<Mutex<HashMap<String, Received>>>,
    pub sub_connected: Arc<AtomicBool>,
    pub subscriber: Arc<dyn PeerConnection>,
    pub publisher: Arc<Mutex<Option<Arc<dyn PeerConnection>>>>,
    pub publication: Option<Publication>,
    pub offers_answered: Arc<AtomicU64>,
    /// Server candidates for the publisher connection that arrived before its answer was
    /// applied (the server trickles them as soon as it has them); added after the answer.
    pending_pub: Arc<Mutex<Vec<RTCIceCandidateInit>>>,
    auto: tokio::task::JoinHandle<()>,
    /// The local address its peer connections use (127.0.0.1 unless the server is elsewhere).
    pub bind_ip: String,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.auto.abort();
        if let Some(p) = &self.publication {
            p.stop.store(true, Ordering::SeqCst);
        }
    }
}

impl Client {
    /// Connect and join; panics unless the join succeeds.
    pub async fn join(server: &Server, room: &str, identity: &str, role: Role) -> Client {
        let token = server.token(room, identity, role);
        Self::join_with_token(server, &token).await.expect("join")
    }

    /// Join as an audience member that receives every track (audience members join
    /// signaling-only and ask for media with `subscribe`).
    pub async fn watch(server: &Server, room: &str, identity: &str) -> Client {
        let c = Self::join(server, room, identity, Role::Audience).await;
        c.subscribe_all().await;
        c
    }

    /// `subscribe` to every track, now and later.
    pub async fn subscribe_all(&self) {
        let r = self
            .sig
            .request(json!({"type": "subscribe", "all": true}))
            .await;
        assert_eq!(r["type"], "response", "subscribe: {r}");
    }

    pub async fn join_with_token(server: &Server, token: &str) -> Result<Client, Value> {
        Self::join_opts(server, token, None).await
    }

    /// `sub_loss`: the subscriber connection drops every Nth received packet once.
    pub async fn join_opts(
        server: &Server,
        token: &str,
        sub_loss: Option<(u16, Arc<AtomicU64>)>,
    ) -> Result<Client, Value> {
        Self::join_full(server, token, sub_loss, false, None, "127.0.0.1").await
    }

    /// Join with peer connections on `bind_ip` (a server in a network namespace).
    pub async fn join_at(
        server: &Server,
        room: &str,
        identity: &str,
        role: Role,
        bind_ip: &str,
    ) -> Client {
        let token = server.token(room, identity, role);
        Self::join_full(server, &token, None, false, None, bind_ip)
            .await
            .expect("join")
    }

    /// An audience member receiving every track, its peer connections on `bind_ip`.
    pub async fn watch_at(server: &Server, room: &str, identity: &str, bind_ip: &str) -> Client {
        let c = Self::join_at(server, room, identity, Role::Audience, bind_ip).await;
        c.subscribe_all().await;
        c
    }

    /// An audience member receiving every track over a narrow downlink ([`RatePolicer`]).
    pub async fn watch_policed(
        server: &Server,
        room: &str,
        identity: &str,
        policer: RatePolicer,
    ) -> Client {
        let token = server.token(room, identity, Role::Audience);
        let c = Self::join_full(server, &token, None, false, Some(policer), "127.0.0.1")
            .await
            .expect("join");
        c.subscribe_all().await;
        c
    }

    /// Join with `resumable`: the join result carries a `resume_token`.
    pub async fn join_resumable(server: &Server, room: &str, identity: &str, role: Role) -> Client {
        let token = server.token(room, identity, role);
        Self::join_full(server, &token, None, true, None, "127.0.0.1")
            .await
            .expect("join")
    }

    /// A phone whose connection dropped: continue on a new WebSocket with `resume` (the
    /// peer connections stay). Returns the `resume` response (or error).
    pub async fn resume(&mut self, server: &Server) -> Value {
        self.sig.reconnect(&server.ws_url()).await;
        let token = self.join["resume_token"].clone();
        let r = self
            .sig
            .request(json!({"type": "resume", "token": token}))
            .await;
        if r["type"] == "response" {
            self.join = r["result"].clone();
        }
        r
    }

    async fn join_full(
        server: &Server,
        token: &str,
        sub_loss: Option<(u16, Arc<AtomicU64>)>,
        resumable: bool,
        policer: Option<RatePolicer>,
        bind_ip: &str,
    ) -> Result<Client, Value> {
        let (auto_tx, mut auto_rx) = mpsc::unbounded_channel::<Value>();
        let sig = Signal::connect_with(&server.ws_url(), Some(auto_tx)).await;
        let received: Arc<Mutex<HashMap<String, Received>>> = Default::default();
        let sub_connected = Arc::new(AtomicBool::new(false));
        let subscriber = build_pc_with(
            "subscriber",
            sig.tx.clone(),
            received.clone(),
            sub_connected.clone(),
            sub_loss.map(|(n, d)| (n, true, d)),
            policer,
            bind_ip,
        )
        .await;
        let publisher: Arc<Mutex<Option<Arc<dyn PeerConnection>>>> = Default::default();
        let offers_answered = Arc::new(AtomicU64::new(0));
        // Answer server offers and apply server candidates in the background, in order.
        let sub = subscriber.clone();
        let pubc = publisher.clone();
        let pending_pub: Arc<Mutex<Vec<RTCIceCandidateInit>>> = Default::default();
        let pending = pending_pub.clone();
        let ws = sig.tx.clone();
        let answered = offers_answered.clone();
        let auto = tokio::spawn(async move {
            while let Some(v) = auto_rx.recv().await {
                match v["type"].as_str() {
                    Some("offer") => {
                        let sdp = v["sdp"].as_str().unwrap_or_default().to_string();
                        let offer = RTCSessionDescription::offer(sdp).expect("offer sdp");
                        sub.set_remote_description(offer).await.expect("srd");
                        let answer = sub.create_answer(None).await.expect("answer");
                        let sdp = answer.sdp.clone();
                        sub.set_local_description(answer).await.expect("sld");
                        let msg = json!({"type":"answer","offer_id":v["offer_id"],"sdp":sdp,"id":"auto-answer"});
                        let _ = ws.send(Message::Text(msg.to_string().into()));
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                    Some("candidate") => {
                        let c = &v["candidate"];
                        let cand = c["candidate"].as_str().unwrap_or_default().to_string();
                        if cand.is_empty() {
                            continue;
                        }
                        let init = candidate_init(c, cand);
                        if v["target"] == "subscriber" {
                            let _ = sub.add_ice_candidate(init).await;
                        } else {
                            let pc = pubc.lock().unwrap().clone();
                            let added = match pc {
                                Some(pc) => pc.add_ice_candidate(init.clone()).await.is_ok(),
                                None => false,
                            };
                            if !added {
                                pending.lock().unwrap().push(init);
                            }
                        }
                    }
                    _ => {}
                }
            }
        });
        let resp = sig
            .request(json!({"type":"join","token":token,"resumable":resumable}))
            .await;
        if resp["type"] != "response" {
            auto.abort();
            return Err(resp);
        }
        let pid = resp["result"]["participant"]["id"]
            .as_str()
            .unwrap()
            .to_string();
        Ok(Client {
            sig,
            pid,
            join: resp["result"].clone(),
            received,
            sub_connected,
            subscriber,
            publisher,
            publication: None,
            offers_answered,
            pending_pub,
            auto,
            bind_ip: bind_ip.to_string(),
        })
    }

    /// Publish real media: H.264 320x240 pictures of one solid RGB colour (15 fps, IDR every
    /// second and on PLI) and an Opus sine tone.
    pub async fn publish_real(&mut self, rgb: (u8, u8, u8), tone_hz: f32) -> Result<(), Value> {
        self.publish_inner(None, Some(Pattern::Solid(rgb, tone_hz)))
            .await
    }

    /// Publish real media like [`publish_real`](Self::publish_real) whose pictures change size:
    /// 320x240 for 4 s, 160x120 for 4 s, and so on (a WebRTC sender scaling down and back up).
    pub async fn publish_resizing(&mut self, rgb: (u8, u8, u8), tone_hz: f32) -> Result<(), Value> {
        self.publish_inner(None, Some(Pattern::Resizing(rgb, tone_hz)))
            .await
    }

    /// Publish real media that is grey and silent except for a white flash and a 1 kHz beep at
    /// the same instant every 1.2 s (for lip-sync measurements).
    pub async fn publish_flashes(&mut self) -> Result<(), Value> {
        self.publish_inner(None, Some(Pattern::Flashes)).await
    }

    /// Publish Opus + H.264 tracks and start sending synthetic packets: audio 50 pkt/s,
    /// video 30 frames/s of `video_pkts_per_frame` packets.
    pub async fn publish(&mut self, loss_every: Option<u16>) -> Result<(), Value> {
        self.publish_inner(loss_every, None).await
    }

    async fn publish_inner(
        &mut self,
        loss_every: Option<u16>,
        real: Option<Pattern>,
    ) -> Result<(), Value> {
        let loss_dropped = Arc::new(AtomicU64::new(0));
        let pc = build_pc(
            "publisher",
            self.sig.tx.clone(),
            Default::default(),
            Arc::new(AtomicBool::new(false)),
            loss_every.map(|n| (n, false, loss_dropped.clone())),
        )
        .await;
        *self.publisher.lock().unwrap() = Some(pc.clone());
        let (a_ssrc, v_ssrc) = (rand::random::<u32>() | 1, rand::random::<u32>() | 1);
        let stream = format!("stream-{}", self.pid);
        let track = |kind, ssrc, mime: &str, clock, ch, fmtp: &str| {
            local_track(&stream, kind, ssrc, mime, clock, ch, fmtp)
        };
        let audio = track(
            RtpCodecKind::Audio,
            a_ssrc,
            "audio/opus",
            48000,
            2,
            "minptime=10;useinbandfec=1",
        );
        let video = track(
            RtpCodecKind::Video,
            v_ssrc,
            "video/H264",
            90000,
            0,
            "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f",
        );
        let audio_sender = pc
            .add_track(audio.clone() as Arc<dyn TrackLocal>)
            .await
            .expect("add audio");
        let video_sender = pc
            .add_track(video.clone() as Arc<dyn TrackLocal>)
            .await
            .expect("add video");
        let offer = pc.create_offer(None).await.expect("offer");
        let sdp = offer.sdp.clone();
        pc.set_local_description(offer).await.expect("sld");
        let resp = self.sig.request(json!({"type":"publish","sdp":sdp})).await;
        if resp["type"] != "response" {
            return Err(resp);
        }
        let answer =
            RTCSessionDescription::answer(resp["result"]["sdp"].as_str().unwrap().to_string())
                .unwrap();
        pc.set_remote_description(answer).await.expect("srd");
        self.add_pending_candidates(&pc).await;
        let pt = |s: &Arc<dyn RtpSender>| {
            let s = s.clone();
            async move { s.get_parameters().await.unwrap().rtp_parameters.codecs[0].payload_type }
        };
        let (apt, vpt) = (pt(&audio_sender).await, pt(&video_sender).await);
        let tag_audio = rand::random::<u32>();
        let tag_video = rand::random::<u32>();
        let stop = Arc::new(AtomicBool::new(false));
        let plis = Arc::new(AtomicU64::new(0));
        // PLIs reaching the publisher.
        {
            let v = video.clone();
            let plis = plis.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    match v.poll().await {
                        Some(TrackLocalEvent::OnRtcpPacket(_)) => {
                            plis.fetch_add(1, Ordering::SeqCst);
                        }
                        Some(_) => {}
                        None => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            });
        }
        if let Some(pattern) = real {
            let (a, v, stop, plis) = (audio.clone(), video.clone(), stop.clone(), plis.clone());
            tokio::spawn(real_pump(
                a, v, stop, plis, a_ssrc, v_ssrc, apt, vpt, pattern,
            ));
        }
        // Media pump: 20 ms ticks; audio every tick, a 3-packet video frame every ~33 ms.
        if real.is_none() {
            let (a, v, stop) = (audio.clone(), video.clone(), stop.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(20));
                let (mut aseq, mut vseq, mut n) = (0u16, 0u16, 0u32);
                let mut vframe = 0u32;
                let start = Instant::now();
                while !stop.load(Ordering::SeqCst) {
                    tick.tick().await;
                    n += 1;
                    let mut p = rtc::rtp::Packet::default();
                    p.header.version = 2;
                    p.header.ssrc = a_ssrc;
                    p.header.payload_type = apt;
                    p.header.sequence_number = aseq;
                    p.header.timestamp = n * 960;
                    p.payload = make_payload(tag_audio, n, 80);
                    aseq = aseq.wrapping_add(1);
                    if a.write_rtp(p).await.is_err() {
                        break;
                    }
                    let due = (start.elapsed().as_millis() / 33) as u32;
                    while vframe < due {
                        vframe += 1;
                        for k in 0..3u32 {
                            let mut p = rtc::rtp::Packet::default();
                            p.header.version = 2;
                            p.header.ssrc = v_ssrc;
                            p.header.payload_type = vpt;
                            p.header.sequence_number = vseq;
                            p.header.timestamp = vframe * 3000;
                            p.header.marker = k == 2;
                            p.payload = make_payload(tag_video, vframe * 3 + k, 1000);
                            vseq = vseq.wrapping_add(1);
                            // Fails once the video track was removed; audio goes on.
                            let _ = v.write_rtp(p).await;
                        }
                    }
                }
            });
        }
        self.publication = Some(Publication {
            audio,
            video,
            audio_sender,
            video_sender,
            tag_audio,
            tag_video,
            plis,
            loss_dropped,
            stop,
        });
        Ok(())
    }

    /// Apply the server candidates that arrived before the publisher's answer.
    pub async fn add_pending_candidates(&self, pc: &Arc<dyn PeerConnection>) {
        let pending: Vec<RTCIceCandidateInit> =
            std::mem::take(&mut *self.pending_pub.lock().unwrap());
        for c in pending {
            let _ = pc.add_ice_candidate(c).await;
        }
    }

    /// Remove the video track from the publisher connection and renegotiate.
    pub async fn unpublish_video(&self) -> Value {
        let pc = self.publisher.lock().unwrap().clone().expect("published");
        let p = self.publication.as_ref().expect("published");
        pc.remove_track(&p.video_sender)
            .await
            .expect("remove_track");
        let offer = pc.create_offer(None).await.expect("offer");
        let sdp = offer.sdp.clone();
        pc.set_local_description(offer).await.expect("sld");
        let resp = self.sig.request(json!({"type":"publish","sdp":sdp})).await;
        if resp["type"] == "response" {
            let answer =
                RTCSessionDescription::answer(resp["result"]["sdp"].as_str().unwrap().to_string())
                    .unwrap();
            pc.set_remote_description(answer).await.expect("srd");
        }
        resp
    }

    pub fn stop_media(&self) {
        if let Some(p) = &self.publication {
            p.stop.store(true, Ordering::SeqCst);
        }
    }

    /// Wait until this client receives at least `n` packets carrying `tag` (another client's
    /// track), returning (packets, bad payloads, first arrival).
    pub async fn wait_packets(&self, tag: u32, n: u64) -> (u64, u64, Instant) {
        wait_received(&self.received, tag, n).await
    }

    /// Sequence numbers received for the track carrying `tag`.
    pub fn seqs(&self, tag: u32) -> Vec<u16> {
        let r = self.received.lock().unwrap();
        r.values()
            .find(|e| e.pattern_ids.contains(&tag))
            .map(|e| e.seqs.clone())
            .unwrap_or_default()
    }

    pub async fn leave(&self) {
        let r = self.sig.request(json!({"type":"leave"})).await;
        assert_eq!(r["type"], "response", "{r}");
    }
}

/// Count sequence gaps: numbers missing between the first and last received (mod 2^16),
/// ignoring duplicates and reordering.
pub fn missing_seqs(seqs: &[u16]) -> usize {
    if seqs.is_empty() {
        return 0;
    }
    let first = seqs[0];
    let set: HashSet<u16> = seqs.iter().copied().collect();
    let span = seqs
        .iter()
        .map(|s| s.wrapping_sub(first))
        .filter(|d| *d < 30000)
        .max()
        .unwrap_or(0);
    (0..=span)
        .filter(|d| !set.contains(&first.wrapping_add(*d)))
        .count()
}

/// What a real publisher shows and says.
#[derive(Debug, Clone, Copy)]
enum Pattern {
    /// A solid colour and a continuous tone.
    Solid((u8, u8, u8), f32),
    /// Grey and silence, with a white flash and a 60 ms 1 kHz beep together every 60 ticks.
    Flashes,
    /// Like `Solid`, at 320x240 and 160x120 in turn, 4 s each.
    Resizing((u8, u8, u8), f32),
}

impl Pattern {
    /// Colour, tone and amplitude for 20 ms tick `n`.
    fn at(self, n: u32) -> ((u8, u8, u8), f32, f32) {
        match self {
            Pattern::Solid(rgb, tone) | Pattern::Resizing(rgb, tone) => (rgb, tone, 10000.0),
            Pattern::Flashes if n % 60 < 3 => ((255, 255, 255), 1000.0, 12000.0),
            Pattern::Flashes => ((90, 90, 90), 1000.0, 0.0),
        }
    }

    /// Picture size at 20 ms tick `n`.
    fn size(self, n: u32) -> (usize, usize) {
        match self {
            Pattern::Resizing(..) if (n / 200) % 2 == 1 => (160, 120),
            _ => (320, 240),
        }
    }
}

/// Real media for bridge tests: OpenH264 pictures and Opus audio following a [`Pattern`].
#[allow(clippy::too_many_arguments)]
async fn real_pump(
    a: Arc<TrackLocalStaticRTP>,
    v: Arc<TrackLocalStaticRTP>,
    stop: Arc<AtomicBool>,
    plis: Arc<AtomicU64>,
    a_ssrc: u32,
    v_ssrc: u32,
    apt: u8,
    vpt: u8,
    pattern: Pattern,
) {
    use rtc::rtp::codec::h264::H264Payloader;
    use rtc::rtp::packetizer::Payloader;
    let mut enc = openh264::encoder::Encoder::new().unwrap();
    let mut size = pattern.size(0);
    let mut opus_enc =
        opus::Encoder::new(48000, opus::Channels::Mono, opus::Application::Voip).unwrap();
    let mut pay = H264Payloader::default();
    let (mut aseq, mut vseq) = (0u16, 0u16);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut last_plis = 0u64;
    let mut n = 0u32;
    while !stop.load(Ordering::SeqCst) {
        tick.tick().await;
        let (rgb, tone, amplitude) = pattern.at(n);
        // Audio: one 20 ms Opus frame per tick.
        let frame = opus_tone_frame(&mut opus_enc, n, tone, amplitude);
        let p = rtp_packet(a_ssrc, apt, aseq, n * 960, false, frame);
        aseq = aseq.wrapping_add(1);
        if a.write_rtp(p).await.is_err() {
            return;
        }
        // Video: every third tick (~16 fps).
        if n.is_multiple_of(3) {
            let p_now = plis.load(Ordering::SeqCst);
            let (w, h) = pattern.size(n);
            if (w, h) != size {
                // A new size: a new encoder (new SPS/PPS), starting with an IDR.
                enc = openh264::encoder::Encoder::new().unwrap();
                size = (w, h);
            }
            if n.is_multiple_of(45) || p_now != last_plis {
                enc.force_intra_frame();
                last_plis = p_now;
            }
            let c = cohost::bridge::compose::Yuv::from_rgb(rgb.0, rgb.1, rgb.2);
            let mut yuv = vec![c.0; w * h];
            yuv.extend(std::iter::repeat_n(c.1, w * h / 4));
            yuv.extend(std::iter::repeat_n(c.2, w * h / 4));
            let bs = enc
                .encode(&openh264::formats::YUVBuffer::from_vec(yuv, w, h))
                .unwrap()
                .to_vec();
            let pkts = pay.payload(1200, &Bytes::from(bs)).unwrap();
            let last = pkts.len().saturating_sub(1);
            for (k, pl) in pkts.into_iter().enumerate() {
                let p = rtp_packet(v_ssrc, vpt, vseq, n * 1800, k == last, pl);
                vseq = vseq.wrapping_add(1);
                let _ = v.write_rtp(p).await;
            }
        }
        n += 1;
    }
}

// ---- Decoding the bridge output (ffmpeg, FLV) ----

/// Run an ffmpeg command to its end (within `limit`) and check that it succeeded.
pub async fn run_ffmpeg(cmd: &mut tokio::process::Command, limit: Duration) {
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .expect("ffmpeg finished")
        .expect("ffmpeg (Debian) must be installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A recording of FLV tags decoded by ffmpeg: its video as 320x180 RGB pictures (one per coded
/// picture) and the picture sizes ffprobe sees in it.
pub struct Decoded {
    pub rgb: Vec<u8>,
    pub sizes: std::collections::BTreeSet<String>,
}

impl Decoded {
    pub fn frames(&self) -> Vec<&[u8]> {
        self.rgb.chunks_exact(320 * 180 * 3).collect()
    }
}

/// Write `tags` as an FLV file and decode it with ffmpeg, which must report no error.
pub async fn decode_recording(tags: &[cohost::media::flv::Tag], name: &str) -> Decoded {
    let dir = std::env::temp_dir().join(format!("cohost-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("rec.flv");
    let mut flv = cohost::media::flv::header(true, true).to_vec();
    for t in tags {
        cohost::media::flv::write_tag(&mut flv, t.kind, t.timestamp_ms, &t.body);
    }
    std::fs::write(&file, &flv).unwrap();
    let probe = tokio::process::Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v"])
        .args(["-show_entries", "frame=width,height", "-of", "csv=p=0"])
        .arg(&file)
        .output()
        .await
        .expect("ffprobe (Debian) must be installed");
    let out = tokio::process::Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(&file)
        .args(RAW_RGB_320X180)
        .arg("-")
        .output()
        .await
        .expect("ffmpeg (Debian) must be installed");
    let _ = std::fs::remove_dir_all(&dir);
    let errors = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && errors.trim().is_empty(), "{errors}");
    Decoded {
        rgb: out.stdout,
        sizes: String::from_utf8_lossy(&probe.stdout)
            .lines()
            .map(|l| l.trim().to_string())
            .collect(),
    }
}

pub async fn ffmpeg_capture(url: &str, dir: &std::path::Path) -> (Vec<u8>, Vec<f32>) {
    let v = dir.join("v.rgb");
    let a = dir.join("a.pcm");
    run_ffmpeg(
        tokio::process::Command::new("ffmpeg")
            .args(["-v", "error", "-y", "-i", url, "-t", "3"])
            .args(RAW_RGB_320X180)
            .arg(&v)
            // Output options apply to the next output only: the audio output needs its own -t.
            .args([
                "-map", "0:a", "-t", "3", "-f", "s16le", "-ac", "1", "-ar", "48000",
            ])
            .arg(&a),
        Duration::from_secs(30),
    )
    .await;
    let video = std::fs::read(&v).unwrap();
    let audio = std::fs::read(&a)
        .unwrap()
        .chunks_exact(2)
        .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])))
        .collect();
    (video, audio)
}

pub fn pixel(frame: &[u8], x: usize, y: usize) -> (u8, u8, u8) {
    let i = (y * 320 + x) * 3;
    (frame[i], frame[i + 1], frame[i + 2])
}

/// Read an HTTP-FLV stream for `secs` seconds and return its tags (de-chunking the body).
pub async fn read_flv_tags(
    addr: std::net::SocketAddr,
    path: &str,
    secs: u64,
    during: impl std::future::Future<Output = ()>,
) -> Vec<cohost::media::flv::Tag> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw: Vec<u8> = vec![];
    let reading = async {
        let mut buf = vec![0u8; 65536];
        let end = tokio::time::Instant::now() + Duration::from_secs(secs);
        while let Ok(Ok(n)) = tokio::time::timeout_at(end, s.read(&mut buf)).await {
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
        }
    };
    tokio::join!(reading, during);
    // Headers, then a chunked body: "<hex size>\r\n<data>\r\n"...
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&raw[..head_end]).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    let mut body = vec![];
    let mut i = head_end;
    while let Some(nl) = raw[i..].windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(std::str::from_utf8(&raw[i..i + nl]).unwrap().trim(), 16)
            .unwrap_or(0);
        let start = i + nl + 2;
        if size == 0 || start + size > raw.len() {
            body.extend_from_slice(&raw[start.min(raw.len())..(start + size).min(raw.len())]);
            break;
        }
        body.extend_from_slice(&raw[start..start + size]);
        i = start + size + 2;
        if i >= raw.len() {
            break;
        }
    }
    let mut r = cohost::media::flv::Reader::new();
    r.push(&body);
    let mut tags = vec![];
    while let Ok(Some(t)) = r.next_tag() {
        tags.push(t);
    }
    tags
}

/// Poll the bridge status until `pred` holds (or fail after `secs`, saying `what`).
pub async fn wait_bridge(
    server: &Server,
    token: &str,
    room: &str,
    secs: u64,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (_, body) = server
            .get(&format!("/v1/rooms/{room}/bridge"), Some(token))
            .await;
        let v: Value = serde_json::from_str(body.trim()).unwrap_or(json!({}));
        if pred(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Poll the bridge status until `video_frames` reaches `frames`.
pub async fn wait_frames(server: &Server, token: &str, room: &str, frames: u64) -> Value {
    wait_bridge(server, token, room, 20, "bridge not producing", |v| {
        v["stats"]["video_frames"].as_u64().unwrap_or(0) >= frames
    })
    .await
}

/// The last decoded 320x180 frame of `secs` of the room's HTTP-FLV output.
pub async fn last_frame(server: &Server, room: &str, tag: &str) -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("cohost-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (video, _) = ffmpeg_capture(&format!("http://{}/live/{room}.flv", server.addr), &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    let n = 320 * 180 * 3;
    assert!(video.len() >= n, "no frame decoded");
    video[video.len() - n..].to_vec()
}

/// A receive-only audio and a receive-only video transceiver: what a WHEP viewer offers.
pub async fn add_recvonly_audio_video(pc: &Arc<dyn PeerConnection>) {
    use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
    use webrtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
    for kind in [RtpCodecKind::Audio, RtpCodecKind::Video] {
        pc.add_transceiver_from_kind(
            kind,
            Some(RTCRtpTransceiverInit {
                direction: RTCRtpTransceiverDirection::Recvonly,
                streams: vec![],
                send_encodings: vec![],
            }),
        )
        .await
        .unwrap();
    }
}

/// Poll `f` until it holds, failing after `timeout` with `what`.
pub async fn wait_until(what: &str, timeout: Duration, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether a decoded 320x180 RGB frame is the host-away slate: its dark blue card in a corner
/// (not black, not the host) and the caption's white pixels.
pub fn is_slate(frame: &[u8]) -> bool {
    let (r, g, b) = pixel(frame, 4, 4);
    let card = b >= r + 12 && b >= g + 8 && (30..100).contains(&b) && r < 60;
    let white = frame
        .chunks_exact(3)
        .filter(|p| p[0] > 190 && p[1] > 190 && p[2] > 190)
        .count();
    card && white > 40
}

/// The room and its bridge and HTTP-FLV stream are all gone (404).
pub async fn live_ended(server: &Server, room: &str) -> bool {
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (r, _) = server.get(&format!("/v1/rooms/{room}"), Some(&admin)).await;
    let (b, _) = server
        .get(&format!("/v1/rooms/{room}/bridge"), Some(&admin))
        .await;
    let (f, _) = server.get(&format!("/live/{room}.flv"), None).await;
    r == 404 && b == 404 && f == 404
}

pub fn is_colour(p: (u8, u8, u8), want: (u8, u8, u8)) -> bool {
    let close = |a: u8, b: u8| a.abs_diff(b) < 50;
    close(p.0, want.0) && close(p.1, want.1) && close(p.2, want.2)
}

/// The bridge output stayed one continuous stream: one codec configuration, video every 33-34
/// ms (30 fps, no gap longer than a frame interval), audio increasing without gaps.
pub fn assert_continuous(tags: &[cohost::media::flv::Tag], min_video: usize) {
    use cohost::media::flv::{TAG_AUDIO, TAG_VIDEO};
    let video: Vec<_> = tags
        .iter()
        .filter(|t| t.kind == TAG_VIDEO && !t.is_sequence_header())
        .collect();
    let audio: Vec<_> = tags
        .iter()
        .filter(|t| t.kind == TAG_AUDIO && !t.is_sequence_header())
        .collect();
    assert!(video.len() > min_video, "{} video tags", video.len());
    let configs = tags
        .iter()
        .filter(|t| t.kind == TAG_VIDEO && t.is_sequence_header())
        .count();
    assert_eq!(configs, 1, "one codec configuration for the whole stream");
    // Mixed frames come every 33-34 ms (30 fps); the host passed through comes at its own
    // rate (15 fps here), and the switches between the two may leave up to a few frames.
    for w in video.windows(2) {
        let gap = w[1].timestamp_ms as i64 - w[0].timestamp_ms as i64;
        assert!(
            (1..=200).contains(&gap),
            "video gap {gap} ms at {}",
            w[0].timestamp_ms
        );
    }
    for w in audio.windows(2) {
        assert!(
            w[1].timestamp_ms > w[0].timestamp_ms,
            "audio timestamps must increase"
        );
        assert!(w[1].timestamp_ms - w[0].timestamp_ms <= 22, "audio gap");
    }
}

/// One 20 ms Opus frame (48 kHz mono) of a `tone` Hz sine at `amplitude`, tick `n` of a
/// continuous signal.
pub fn opus_tone_frame(enc: &mut opus::Encoder, n: u32, tone: f32, amplitude: f32) -> Bytes {
    let pcm: Vec<i16> = (0..960)
        .map(|k| {
            let t = (n * 960 + k) as f32 / 48000.0;
            ((t * tone * std::f32::consts::TAU).sin() * amplitude) as i16
        })
        .collect();
    let mut out = vec![0u8; 400];
    let len = enc.encode(&pcm, &mut out).unwrap();
    out.truncate(len);
    Bytes::from(out)
}

/// An RTP packet for a test publisher's local track.
pub fn rtp_packet(
    ssrc: u32,
    pt: u8,
    seq: u16,
    ts: u32,
    marker: bool,
    payload: Bytes,
) -> rtc::rtp::Packet {
    let mut p = rtc::rtp::Packet::default();
    p.header.version = 2;
    p.header.ssrc = ssrc;
    p.header.payload_type = pt;
    p.header.sequence_number = seq;
    p.header.timestamp = ts;
    p.header.marker = marker;
    p.payload = payload;
    p
}

struct QuietHandler;

#[async_trait::async_trait]
impl PeerConnectionEventHandler for QuietHandler {}

/// A WHIP client's peer connection on the `webrtc` crate (cohost's codecs and interceptors),
/// with an Opus and an H.264 sending track of the given SSRCs, and its complete offer (set as
/// its local description).
pub async fn whip_publisher(
    a_ssrc: u32,
    v_ssrc: u32,
) -> (
    Arc<dyn PeerConnection>,
    Arc<TrackLocalStaticRTP>,
    Arc<TrackLocalStaticRTP>,
    String,
) {
    let mut me = cohost::peer::media_engine().unwrap();
    let reg = cohost::peer::interceptors(&mut me).unwrap();
    let se = SettingEngineBuilder::new()
        .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
        .with_include_loopback_candidate(true)
        .build();
    let pc: Arc<dyn PeerConnection> = Arc::new(
        PeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_media_engine(me)
            .with_setting_engine(se)
            .with_interceptor_registry(reg)
            .with_handler(Arc::new(QuietHandler) as Arc<dyn PeerConnectionEventHandler>)
            .with_udp_addrs(vec!["127.0.0.1:0".to_string()])
            .build()
            .await
            .unwrap(),
    );
    let audio = local_track(
        "studio",
        RtpCodecKind::Audio,
        a_ssrc,
        "audio/opus",
        48000,
        2,
        "minptime=10;useinbandfec=1",
    );
    let video = local_track(
        "studio",
        RtpCodecKind::Video,
        v_ssrc,
        "video/H264",
        90000,
        0,
        "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f",
    );
    pc.add_track(audio.clone() as Arc<dyn TrackLocal>)
        .await
        .unwrap();
    pc.add_track(video.clone() as Arc<dyn TrackLocal>)
        .await
        .unwrap();
    let offer = pc.create_offer(None).await.unwrap();
    let sdp = offer.sdp.clone();
    pc.set_local_description(offer).await.unwrap();
    (pc, audio, video, sdp)
}

// ---- Raw HTTP (WHIP/WHEP and other non-JSON endpoints) ----

pub struct Resp {
    pub status: u16,
    pub headers: HashMap<String, Vec<String>>,
    pub body: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .and_then(|v| v.first())
            .map(String::as_str)
    }
}

/// One HTTP/1.1 request over a fresh loopback connection.
pub async fn http(
    server: &Server,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
        server.addr,
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    // The server may answer (413) before reading a large body: ignore a reset on write.
    let _ = s.write_all(&bytes).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut map: HashMap<String, Vec<String>> = HashMap::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            map.entry(k.trim().to_ascii_lowercase())
                .or_default()
                .push(v.trim().to_string());
        }
    }
    Resp {
        status,
        headers: map,
        body: body.to_string(),
    }
}

pub async fn post_sdp(server: &Server, path: &str, token: Option<&str>, sdp: &str) -> Resp {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut h = vec![("Content-Type", "application/sdp")];
    if let Some(a) = &auth {
        h.push(("Authorization", a.as_str()));
    }
    http(server, "POST", path, &h, sdp.as_bytes()).await
}

/// ffmpeg publishing lavfi `video` (x264 baseline, 1 s GOP) and a 440 Hz tone (AAC) to `url`.
pub fn ffmpeg_push_lavfi(
    url: &str,
    video: &str,
    secs: u32,
    stderr: Stdio,
) -> tokio::process::Child {
    tokio::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-re"])
        .args(["-f", "lavfi", "-i", video])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"])
        .args(["-t", &secs.to_string()])
        .args([
            "-c:v",
            "libx264",
            "-profile:v",
            "baseline",
            "-bf",
            "0",
            "-g",
            "30",
        ])
        .args([
            "-pix_fmt",
            "yuv420p",
            "-preset",
            "ultrafast",
            "-tune",
            "zerolatency",
        ])
        .args(["-c:a", "aac", "-b:a", "96k", "-f", "flv", url])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .expect("ffmpeg (Debian ffmpeg) must be installed")
}
