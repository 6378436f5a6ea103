//! Driving Janus: the VideoRoom plugin over its plain HTTP API (REST plus a long poll per
//! session), as a browser client using janus.js would.
//!
//! Each participant gets one Janus session with two VideoRoom handles:
//! - a "participant" handle that joins the room as `ptype: publisher`. Publishers also send
//!   their offer on it (`joinandconfigure`); non-publishers just join, which is the usual way a
//!   Janus client learns about publishers: the `joined` reply lists the current ones and
//!   `publishers` events announce new ones (pushed, so no polling load on Janus);
//! - a subscriber handle using Janus 1.x multistream subscriptions: one peer connection that
//!   receives every other publisher of the room, grown with `subscribe` renegotiations.
//!
//! Signaling is not trickled: our SDPs are sent once ICE gathering has completed (Janus works
//! in half-trickle mode and puts its own candidates in its SDPs).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::peer_connection::{PeerConnection, RTCPeerConnectionState, RTCSessionDescription};
use webrtc::rtp_transceiver::RtpSender;

use crate::pc::{PcEvent, new_pc_on, wait_gathered};
use crate::stats::Sink;
use crate::target::{Joined, PublishTracks, Target};

/// Ports Janus may use for ICE/RTP: distinct from cohost's 40000-44999 so both can run at once.
const RTP_PORT_RANGE: &str = "45000-49999";
/// Plugins, transports and loggers of the Debian package that are not needed; disabling them
/// keeps startup fast and the process lean (names not present are ignored by Janus).
const DISABLED_PLUGINS: &[&str] = &[
    "audiobridge",
    "duktape",
    "echotest",
    "lua",
    "nosip",
    "recordplay",
    "sip",
    "streaming",
    "textroom",
    "videocall",
    "voicemail",
];
const DISABLED_TRANSPORTS: &[&str] = &["mqtt", "nanomsg", "pfunix", "rabbitmq", "websockets"];
const DISABLED_LOGGERS: &[&str] = &["jsonlog"];
/// Room capacity: far above any scenario, so Janus never refuses a publisher.
const MAX_PUBLISHERS: u32 = 100;
/// Upper bound for one REST request or for the event answering an asynchronous one.
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);
/// Janus answers a long poll after at most 30 s (with a keepalive) when nothing happens.
const POLL_TIMEOUT: Duration = Duration::from_secs(45);
/// How long our ICE gathering may take (one local host candidate: milliseconds).
const GATHER_TIMEOUT: Duration = Duration::from_secs(5);
/// Janus API error: the room already exists (another participant created it first).
const ERR_ROOM_EXISTS: i64 = 427;
/// Janus API error: no such session (it was destroyed or timed out).
const ERR_NO_SUCH_SESSION: i64 = 458;

/// A Janus process of our own, configured for this run only (temporary config folder).
pub struct JanusTarget {
    child: Mutex<Option<Child>>,
    pid: u32,
    /// Janus API (HTTP, on loopback).
    addr: SocketAddr,
    /// Host address Janus's ICE uses; our peer connections bind to it too.
    media_ip: IpAddr,
    dir: PathBuf,
    /// Rooms created so far. Held across the `create` request so concurrent joins of a new
    /// room create it once.
    rooms: tokio::sync::Mutex<HashSet<u64>>,
}

impl JanusTarget {
    pub async fn start(bin: &str, media_ip: IpAddr) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "cohost-load-janus-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let conf = dir.join("conf");
        std::fs::create_dir_all(&conf).with_context(|| format!("creating {}", conf.display()))?;
        let port = free_port()?;
        let media_ip = check_media_ip(media_ip)?;
        write_configs(&conf, port, media_ip)?;
        let log_path = dir.join("janus.log");
        let log = std::fs::File::create(&log_path)?;
        let mut child = Command::new(bin)
            // -o: no ANSI colours in the log file.
            .args(["-F".as_ref(), conf.as_os_str(), "-o".as_ref()])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        let pid = child.id().ok_or_else(|| anyhow!("no pid"))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(v) = http(addr, "GET", "/janus/info", None).await
                && v["janus"] == "server_info"
            {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "janus exited ({status}) at startup; log: {}",
                    log_path.display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "janus did not answer on {addr}; log: {}",
                    log_path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            child: Mutex::new(Some(child)),
            pid,
            addr,
            media_ip,
            dir,
            rooms: Default::default(),
        })
    }

    /// Create the VideoRoom for `room` unless done before, using any attached handle.
    async fn ensure_room(
        &self,
        session: &Arc<Session>,
        handle: u64,
        room: u64,
    ) -> anyhow::Result<()> {
        let mut rooms = self.rooms.lock().await;
        if rooms.contains(&room) {
            return Ok(());
        }
        let data = session
            .sync_request(
                handle,
                json!({
                    "request": "create",
                    "room": room,
                    "publishers": MAX_PUBLISHERS,
                    "audiocodec": "opus",
                    "videocodec": "h264",
                    // Our clip's profile: Janus then picks exactly our H.264 payload type.
                    "h264_profile": "42e01f",
                    // No REMB cap: the load generator sends at a fixed rate anyway.
                    "bitrate": 0,
                    // No periodic keyframe requests (cohost does not send them either).
                    "fir_freq": 0,
                    "notify_joining": false,
                    "permanent": false,
                }),
            )
            .await?;
        if data["error_code"].as_i64() != Some(ERR_ROOM_EXISTS) {
            check(&data).context("creating the room")?;
        }
        rooms.insert(room);
        Ok(())
    }
}

/// An ephemeral TCP port on 127.0.0.1 for Janus's HTTP transport. The listener is dropped
/// before Janus binds the port; the window for someone else to take it is tiny.
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Janus cannot do ICE on loopback: it skips loopback interfaces when gathering, and libnice
/// pins each host candidate's socket to its interface (IP_UNICAST_IF), so even replies to a
/// 127.0.0.1 client go out of another interface and are lost. The benchmark therefore runs in
/// a network namespace of its own with a dummy interface (bench/sfu-vs-janus.sh), and both
/// SFUs and all clients use that interface's address: traffic never leaves the namespace.
fn check_media_ip(ip: IpAddr) -> anyhow::Result<IpAddr> {
    if ip.is_loopback() || ip.is_unspecified() {
        bail!(
            "Janus needs a non-loopback media address; run bench/sfu-vs-janus.sh, which creates \
             a private network namespace and passes --media-ip"
        );
    }
    Ok(ip)
}

/// Janus configuration: VideoRoom over plain HTTP on loopback, ICE on one host address,
/// nothing else loaded. Based on the Debian package's /etc/janus samples.
fn write_configs(conf: &Path, port: u16, media_ip: IpAddr) -> anyhow::Result<()> {
    let list = |names: &[&str]| {
        names
            .iter()
            .map(|n| format!("libjanus_{n}.so"))
            .collect::<Vec<_>>()
            .join(",")
    };
    // Folders of plugins etc. are left at the package's compiled-in defaults.
    let janus = format!(
        r#"general: {{
	configs_folder = "{conf}"
	server_name = "cohost-load"
	# Warnings and errors only, like cohost's "warn" (logging costs CPU in both).
	debug_level = 3
	# Address for the SDPs' c= lines: the one ICE uses.
	interface = "{media_ip}"
	session_timeout = 60
}}
certificates: {{
	# None configured: Janus generates a DTLS certificate at startup.
}}
media: {{
	rtp_port_range = "{RTP_PORT_RANGE}"
}}
nat: {{
	nice_debug = false
	# One host candidate on the address our clients use (see host_ipv4); no STUN/TURN, no
	# IPv6 or other interfaces to try.
	ice_enforce_list = "{media_ip}"
	ignore_mdns = true
	# Half-trickle: Janus's candidates are in its SDPs, ours in our SDPs.
	full_trickle = false
}}
plugins: {{
	disable = "{plugins}"
}}
transports: {{
	disable = "{transports}"
}}
loggers: {{
	disable = "{loggers}"
}}
events: {{
	broadcast = false
}}
"#,
        conf = conf.display(),
        plugins = list(DISABLED_PLUGINS),
        transports = list(DISABLED_TRANSPORTS),
        loggers = list(DISABLED_LOGGERS),
    );
    let transport = format!(
        r#"general: {{
	json = "compact"
	base_path = "/janus"
	http = true
	port = {port}
	ip = "127.0.0.1"
	https = false
}}
admin: {{
	admin_http = false
	admin_https = false
}}
cors: {{
}}
"#
    );
    // No static rooms: each scenario's rooms are created through the API.
    let videoroom = "general: {\n}\n";
    std::fs::write(conf.join("janus.jcfg"), janus)?;
    std::fs::write(conf.join("janus.transport.http.jcfg"), transport)?;
    std::fs::write(conf.join("janus.plugin.videoroom.jcfg"), videoroom)?;
    Ok(())
}

/// Janus room ids are numbers: a stable hash of the scenario's room name (FNV-1a), kept well
/// below 2^53 as Janus's JSON expects.
fn room_id(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h % 1_000_000_000 + 1
}

/// One HTTP/1.1 exchange with a JSON body each way (`Connection: close`, so the body is
/// whatever follows the headers until EOF, unless the server chose chunked encoding).
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<Value> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let req = match body {
        Some(b) => {
            let b = b.to_string();
            format!(
                "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{b}",
                b.len()
            )
        }
        None => format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    };
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP response"))?;
    let head = std::str::from_utf8(&buf[..end])?.to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("malformed HTTP status line"))?;
    let mut body = buf[end + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        body = dechunk(&body)?;
    }
    if status != "200" {
        bail!(
            "HTTP {status} for {method} {path}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(serde_json::from_slice(&body)?)
}

fn dechunk(mut b: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("malformed chunk"))?;
        let size_str = std::str::from_utf8(&b[..eol])?;
        let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = b.get(..size).ok_or_else(|| anyhow!("truncated chunk"))?;
        out.extend_from_slice(chunk);
        b = b.get(size + 2..).unwrap_or_default();
    }
}

/// The plugin's reply data, or an error if the plugin reported one.
fn check(data: &Value) -> anyhow::Result<&Value> {
    if let Some(code) = data["error_code"].as_i64() {
        bail!("videoroom error {code}: {}", data["error"]);
    }
    Ok(data)
}

fn plugin_data(ev: &Value) -> &Value {
    &ev["plugindata"]["data"]
}

/// A Janus session: REST requests on it, plus the long poll that delivers its events.
struct Session {
    addr: SocketAddr,
    id: u64,
    next_tx: AtomicU64,
    /// Events awaited by transaction id (asynchronous plugin requests).
    pending: Mutex<HashMap<String, mpsc::UnboundedSender<Value>>>,
}

/// Events Janus sends for one transaction; stops routing them when dropped.
struct Events {
    rx: mpsc::UnboundedReceiver<Value>,
    tx_id: String,
    session: Arc<Session>,
}

impl Events {
    async fn next(&mut self) -> anyhow::Result<Value> {
        tokio::time::timeout(REPLY_TIMEOUT, self.rx.recv())
            .await
            .context("timed out waiting for a Janus event")?
            .ok_or_else(|| anyhow!("Janus session closed"))
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        if let Ok(mut p) = self.session.pending.lock() {
            p.remove(&self.tx_id);
        }
    }
}

impl Session {
    /// Create a session and start its long poll. Events not awaited by a request (publisher
    /// announcements, Janus-initiated renegotiations, webrtcup, ...) come out of the receiver.
    async fn create(
        addr: SocketAddr,
    ) -> anyhow::Result<(
        Arc<Self>,
        tokio::task::JoinHandle<()>,
        mpsc::UnboundedReceiver<Value>,
    )> {
        let r = http(
            addr,
            "POST",
            "/janus",
            Some(&json!({"janus":"create","transaction":"c"})),
        )
        .await?;
        let id = r["data"]["id"]
            .as_u64()
            .ok_or_else(|| anyhow!("janus create: {r}"))?;
        let session = Arc::new(Self {
            addr,
            id,
            next_tx: AtomicU64::new(1),
            pending: Default::default(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let poller = tokio::spawn(session.clone().poll(tx));
        Ok((session, poller, rx))
    }

    async fn poll(self: Arc<Self>, unsolicited: mpsc::UnboundedSender<Value>) {
        let path = format!("/janus/{}?maxev=10", self.id);
        loop {
            let r = tokio::time::timeout(POLL_TIMEOUT, http(self.addr, "GET", &path, None)).await;
            let v = match r {
                Ok(Ok(v)) => v,
                _ => {
                    // Janus busy or restarting the connection: retry shortly.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if v["janus"] == "error" {
                if v["error"]["code"].as_i64() == Some(ERR_NO_SUCH_SESSION) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            // With maxev Janus returns an array; a bare keepalive when the poll timed out.
            let events = match v {
                Value::Array(a) => a,
                other => vec![other],
            };
            for ev in events {
                if ev["janus"] == "keepalive" {
                    continue;
                }
                let waiter = ev["transaction"]
                    .as_str()
                    .and_then(|t| self.pending.lock().ok()?.get(t).cloned());
                match waiter {
                    Some(w) => {
                        let _ = w.send(ev);
                    }
                    None => {
                        let _ = unsolicited.send(ev);
                    }
                }
            }
        }
    }

    /// Send a Janus API message on the session (or one of its handles) and return the
    /// immediate HTTP reply together with the events that will follow for its transaction.
    async fn send(
        self: &Arc<Self>,
        handle: Option<u64>,
        mut msg: Value,
    ) -> anyhow::Result<(Value, Events)> {
        let tx_id = format!("t{}", self.next_tx.fetch_add(1, Ordering::Relaxed));
        msg["transaction"] = json!(tx_id);
        let (tx, rx) = mpsc::unbounded_channel();
        // Registered before sending: the event may reach the long poll before our reply.
        self.pending
            .lock()
            .map_err(|_| anyhow!("lock"))?
            .insert(tx_id.clone(), tx);
        let events = Events {
            rx,
            tx_id,
            session: self.clone(),
        };
        let path = match handle {
            Some(h) => format!("/janus/{}/{h}", self.id),
            None => format!("/janus/{}", self.id),
        };
        let r = tokio::time::timeout(REPLY_TIMEOUT, http(self.addr, "POST", &path, Some(&msg)))
            .await
            .context("Janus request timed out")??;
        if r["janus"] == "error" {
            bail!("janus {}: {}", msg["janus"], r["error"]);
        }
        Ok((r, events))
    }

    async fn attach(self: &Arc<Self>) -> anyhow::Result<u64> {
        let (r, _) = self
            .send(
                None,
                json!({"janus":"attach","plugin":"janus.plugin.videoroom"}),
            )
            .await?;
        r["data"]["id"]
            .as_u64()
            .ok_or_else(|| anyhow!("janus attach: {r}"))
    }

    /// A request the plugin answers in the HTTP reply (create, listparticipants, ...). Returns
    /// the plugin's data, which may carry an error code.
    async fn sync_request(self: &Arc<Self>, handle: u64, body: Value) -> anyhow::Result<Value> {
        let (r, _) = self
            .send(Some(handle), json!({"janus":"message","body":body}))
            .await?;
        if r["janus"] != "success" {
            bail!("expected a synchronous reply, got {r}");
        }
        Ok(plugin_data(&r).clone())
    }

    /// A request the plugin acknowledges and answers later with events (join, configure,
    /// start, subscribe, ...).
    async fn async_request(
        self: &Arc<Self>,
        handle: u64,
        body: Value,
        jsep: Option<Value>,
    ) -> anyhow::Result<Events> {
        let mut msg = json!({"janus":"message","body":body});
        if let Some(j) = jsep {
            msg["jsep"] = j;
        }
        let (r, events) = self.send(Some(handle), msg).await?;
        if r["janus"] == "success" {
            // Validation errors come back synchronously.
            check(plugin_data(&r))?;
        }
        Ok(events)
    }

    /// Tell Janus our candidates are all in the SDP already.
    async fn end_of_candidates(self: &Arc<Self>, handle: u64) -> anyhow::Result<()> {
        self.send(
            Some(handle),
            json!({"janus":"trickle","candidate":{"completed":true}}),
        )
        .await?;
        Ok(())
    }
}

/// Our local description once ICE gathering is over, candidates included.
async fn gathered_sdp(
    pc: &Arc<dyn PeerConnection>,
    events: &mut mpsc::UnboundedReceiver<PcEvent>,
) -> anyhow::Result<String> {
    wait_gathered(events, GATHER_TIMEOUT).await;
    Ok(pc
        .local_description()
        .await
        .ok_or_else(|| anyhow!("no local description"))?
        .sdp)
}

/// Report a connection that fails (ICE or DTLS): otherwise a broken setup only shows up as
/// receivers without video. Ends with the connection.
fn report_failure(mut events: mpsc::UnboundedReceiver<PcEvent>, what: String) {
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            match ev {
                PcEvent::State(RTCPeerConnectionState::Failed) => {
                    eprintln!("  janus: {what}: connection failed");
                    return;
                }
                PcEvent::State(RTCPeerConnectionState::Closed) => return,
                _ => {}
            }
        }
    });
}

/// The payload type a sender was negotiated to use.
async fn payload_type(sender: &Arc<dyn RtpSender>) -> anyhow::Result<u8> {
    let params = sender.get_parameters().await?;
    let codec = params.rtp_parameters.codecs.first();
    Ok(codec
        .ok_or_else(|| anyhow!("no codec negotiated"))?
        .payload_type)
}

/// Publisher ids listed in a `joined` reply or a `publishers` event.
fn publisher_ids(data: &Value) -> Vec<u64> {
    data["publishers"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["id"].as_u64()).collect())
        .unwrap_or_default()
}

/// The subscriber side of one participant: a single peer connection receiving every other
/// publisher of the room. Runs as a task so renegotiations are strictly one at a time, in the
/// order Janus's events arrive.
struct Subscriber {
    session: Arc<Session>,
    room: u64,
    /// The participant handle (publisher announcements arrive on it).
    participant: u64,
    /// The subscriber handle.
    handle: u64,
    own_id: u64,
    /// room/identity, naming its connection in the failed-connection count.
    who: String,
    sink: Arc<Sink>,
    media_ip: IpAddr,
    /// Shared with [`JanusJoined`] so leaving closes it.
    pc: Arc<Mutex<Option<Arc<dyn PeerConnection>>>>,
    /// Whether the subscriber handle joined the room (shared: only then does it `leave`).
    joined: Arc<AtomicBool>,
    subscribed: HashSet<u64>,
}

impl Subscriber {
    async fn run(mut self, mut events: mpsc::UnboundedReceiver<Value>, initial: Vec<u64>) {
        let mut wanted: HashSet<u64> = initial.into_iter().collect();
        loop {
            // Take in everything already announced so one request covers all new feeds.
            while let Ok(ev) = events.try_recv() {
                self.on_event(ev, &mut wanted).await;
            }
            let new: Vec<u64> = wanted
                .iter()
                .copied()
                .filter(|id| *id != self.own_id && !self.subscribed.contains(id))
                .collect();
            if !new.is_empty() {
                if let Err(e) = self.subscribe(&new).await {
                    eprintln!(
                        "  janus: subscribing to {new:?} in room {}: {e:#}",
                        self.room
                    );
                }
                // Failed feeds are not retried: they are gone, or the error would repeat.
                self.subscribed.extend(new);
                continue;
            }
            match events.recv().await {
                Some(ev) => self.on_event(ev, &mut wanted).await,
                None => return,
            }
        }
    }

    async fn on_event(&mut self, ev: Value, wanted: &mut HashSet<u64>) {
        let sender = ev["sender"].as_u64();
        let data = plugin_data(&ev);
        if sender == Some(self.participant) {
            wanted.extend(publisher_ids(data));
        } else if sender == Some(self.handle)
            && ev["jsep"]["type"] == "offer"
            && let Err(e) = self.answer(&ev["jsep"]).await
        {
            // Janus renegotiates on its own when a publisher we receive leaves.
            eprintln!(
                "  janus: answering a renegotiation in room {}: {e:#}",
                self.room
            );
        }
    }

    async fn subscribe(&mut self, feeds: &[u64]) -> anyhow::Result<()> {
        let streams: Vec<Value> = feeds.iter().map(|f| json!({"feed": f})).collect();
        let body = if self.joined.load(Ordering::Relaxed) {
            json!({"request":"subscribe","streams":streams})
        } else {
            json!({"request":"join","ptype":"subscriber","room":self.room,"streams":streams})
        };
        let mut events = self.session.async_request(self.handle, body, None).await?;
        let ev = events.next().await?;
        check(plugin_data(&ev))?;
        self.joined.store(true, Ordering::Relaxed);
        // No offer means nothing changed in the SDP; nothing to answer then.
        if ev["jsep"]["type"] == "offer" {
            self.answer(&ev["jsep"]).await?;
        }
        Ok(())
    }

    /// Answer an offer from Janus and complete the (re)negotiation with `start`.
    async fn answer(&mut self, jsep: &Value) -> anyhow::Result<()> {
        let sdp = jsep["sdp"]
            .as_str()
            .ok_or_else(|| anyhow!("offer without sdp"))?
            .to_string();
        let existing = self.pc.lock().map_err(|_| anyhow!("lock"))?.clone();
        // The connection is made on the first offer; its events are only needed then.
        let (pc, new_events) = match existing {
            Some(pc) => (pc, None),
            None => {
                let (pc, ev) = new_pc_on(&self.who, Some(self.sink.clone()), self.media_ip).await?;
                *self.pc.lock().map_err(|_| anyhow!("lock"))? = Some(pc.clone());
                (pc, Some(ev))
            }
        };
        let first = new_events.is_some();
        pc.set_remote_description(RTCSessionDescription::offer(sdp)?)
            .await?;
        let answer = pc.create_answer(None).await?;
        pc.set_local_description(answer).await?;
        // ICE gathers once, on the first answer; later answers reuse its candidates.
        let sdp = match new_events {
            Some(mut ev) => {
                let sdp = gathered_sdp(&pc, &mut ev).await?;
                report_failure(ev, format!("subscriber in room {}", self.room));
                sdp
            }
            None => {
                pc.local_description()
                    .await
                    .ok_or_else(|| anyhow!("no local description"))?
                    .sdp
            }
        };
        let mut events = self
            .session
            .async_request(
                self.handle,
                json!({"request":"start"}),
                Some(json!({"type":"answer","sdp":sdp})),
            )
            .await?;
        if first {
            self.session.end_of_candidates(self.handle).await?;
        }
        check(plugin_data(&events.next().await?))?;
        Ok(())
    }
}

struct JanusJoined {
    session: Arc<Session>,
    participant: u64,
    sub_handle: u64,
    sub_joined: Arc<AtomicBool>,
    publisher_pc: Option<Arc<dyn PeerConnection>>,
    sub_pc: Arc<Mutex<Option<Arc<dyn PeerConnection>>>>,
    subscriber: tokio::task::JoinHandle<()>,
    poller: tokio::task::JoinHandle<()>,
    pts: Option<(u8, u8)>,
}

#[async_trait::async_trait]
impl Joined for JanusJoined {
    fn payload_types(&self) -> Option<(u8, u8)> {
        self.pts
    }

    async fn leave(self: Box<Self>) {
        // No renegotiations while tearing down, and no events needed any more (stopping the
        // long poll first also keeps it from polling a destroyed session).
        self.subscriber.abort();
        self.poller.abort();
        let s = &self.session;
        // `leave` on the participant handle also unpublishes. Replies are not awaited: the
        // session is destroyed right after.
        let mut handles = vec![self.participant];
        if self.sub_joined.load(Ordering::Relaxed) {
            handles.insert(0, self.sub_handle);
        }
        for h in handles {
            let _ = s.async_request(h, json!({"request":"leave"}), None).await;
        }
        for h in [self.sub_handle, self.participant] {
            let _ = s.send(Some(h), json!({"janus":"detach"})).await;
        }
        let _ = s.send(None, json!({"janus":"destroy"})).await;
        let sub = self.sub_pc.lock().ok().and_then(|p| p.clone());
        for pc in self.publisher_pc.iter().chain(sub.iter()) {
            let _ = pc.close().await;
        }
    }
}

#[async_trait::async_trait]
impl Target for JanusTarget {
    fn name(&self) -> &'static str {
        "janus"
    }

    fn pid(&self) -> u32 {
        self.pid
    }

    async fn join(
        &self,
        room: &str,
        identity: &str,
        media: Option<PublishTracks>,
        sink: Arc<Sink>,
    ) -> anyhow::Result<Box<dyn Joined>> {
        let room = room_id(room);
        let (session, poller, unsolicited) = Session::create(self.addr).await?;
        // Whatever fails below, do not leave the long poll running.
        let result = async {
            let participant = session.attach().await?;
            let sub_handle = session.attach().await?;
            self.ensure_room(&session, participant, room).await?;
            let join = json!({"request":"join","ptype":"publisher","room":room,"display":identity});
            let mut publisher_pc = None;
            let mut pts = None;
            let joined = match media {
                Some(m) => {
                    let who = format!("{room}/{identity}");
                    let (pc, mut pc_events) = new_pc_on(&who, None, self.media_ip).await?;
                    let a = pc.add_track(m.audio.clone() as Arc<dyn TrackLocal>).await?;
                    let v = pc.add_track(m.video.clone() as Arc<dyn TrackLocal>).await?;
                    let offer = pc.create_offer(None).await?;
                    pc.set_local_description(offer).await?;
                    let sdp = gathered_sdp(&pc, &mut pc_events).await?;
                    let mut body = join;
                    body["request"] = json!("joinandconfigure");
                    body["audio"] = json!(true);
                    body["video"] = json!(true);
                    let mut events = session
                        .async_request(participant, body, Some(json!({"type":"offer","sdp":sdp})))
                        .await?;
                    session.end_of_candidates(participant).await?;
                    // The `joined` event carries the answer.
                    let ev = events.next().await?;
                    let data = check(plugin_data(&ev))?.clone();
                    let answer = ev["jsep"]["sdp"]
                        .as_str()
                        .ok_or_else(|| anyhow!("no answer from Janus: {ev}"))?
                        .to_string();
                    pc.set_remote_description(RTCSessionDescription::answer(answer)?)
                        .await?;
                    pts = Some((payload_type(&a).await?, payload_type(&v).await?));
                    report_failure(pc_events, format!("publisher {identity} in room {room}"));
                    publisher_pc = Some(pc);
                    data
                }
                None => {
                    let mut events = session.async_request(participant, join, None).await?;
                    check(plugin_data(&events.next().await?))?.clone()
                }
            };
            let own_id = joined["id"]
                .as_u64()
                .ok_or_else(|| anyhow!("no participant id in {joined}"))?;
            anyhow::Ok((
                participant,
                sub_handle,
                publisher_pc,
                pts,
                own_id,
                publisher_ids(&joined),
            ))
        }
        .await;
        let (participant, sub_handle, publisher_pc, pts, own_id, initial) = match result {
            Ok(r) => r,
            Err(e) => {
                poller.abort();
                let _ = session.send(None, json!({"janus":"destroy"})).await;
                return Err(e);
            }
        };
        let sub_pc: Arc<Mutex<Option<Arc<dyn PeerConnection>>>> = Default::default();
        let sub_joined = Arc::new(AtomicBool::new(false));
        let subscriber = tokio::spawn(
            Subscriber {
                session: session.clone(),
                room,
                participant,
                handle: sub_handle,
                own_id,
                who: format!("{room}/{identity}"),
                sink,
                media_ip: self.media_ip,
                pc: sub_pc.clone(),
                joined: sub_joined.clone(),
                subscribed: HashSet::new(),
            }
            .run(unsolicited, initial),
        );
        Ok(Box::new(JanusJoined {
            session,
            participant,
            sub_handle,
            sub_joined,
            publisher_pc,
            sub_pc,
            subscriber,
            poller,
            pts,
        }))
    }

    async fn shutdown(&self) {
        let child = self.child.lock().ok().and_then(|mut c| c.take());
        if let Some(mut c) = child {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &self.pid.to_string()])
                .status();
            let clean = match tokio::time::timeout(Duration::from_secs(10), c.wait()).await {
                Ok(Ok(status)) => status.success(),
                _ => {
                    let _ = c.kill().await;
                    false
                }
            };
            // The log is the only trace of what went wrong: keep it then.
            if !clean {
                eprintln!(
                    "janus did not exit cleanly; log: {}",
                    self.dir.join("janus.log").display()
                );
                return;
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
