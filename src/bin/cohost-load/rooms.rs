//! `--scenario rooms`: what a live room costs. N real rooms at once in one cohost server
//! process: WebRTC publishers from this generator (clips encoded once per size, replayed with
//! fresh SSRCs, sequence numbers and timestamps, payloads untouched so the bridge can decode
//! them), each room's bridge started over REST into the embedded origin, and one HTTP-FLV
//! reader per room counting the tags it receives (the proof that every output flows). Measured
//! over a window after warm-up: the server process's CPU time (utime+stime from /proc/PID/stat;
//! the generator's own CPU is not counted), hence CPU per room and rooms per core.
//!
//! Side by side for the solo cases: the same number of plain relays, `ffmpeg -re -stream_loop
//! -1 -i clip.flv -c copy -f flv rtmp://...` into Debian's nginx with libnginx-mod-rtmp, each
//! stream with one RTMP player (an `ffmpeg -c copy` reader, not counted, like the HTTP-FLV
//! readers); CPU of nginx plus the ffmpeg publishers per stream. For the mixed cases, ffmpeg
//! composing the same pictures (`rooms_mix`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use cohost::auth::Role;

use crate::cohost_target::{CohostJoined, CohostTarget};
use crate::media::{self, Clip};
use crate::stats::{Sink, cpu_seconds, rss_bytes};
use crate::target::{Joined, Target};

/// What each room holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Case {
    /// A host alone, 1280x720 30 fps at 2.5 Mbit/s.
    Solo720,
    /// A host alone, 360x640 (portrait) 30 fps at 800 kbit/s.
    Solo360,
    /// A 360x640 host (800 kbit/s) and one 320x480 co-host (300 kbit/s).
    Cohost1,
    /// A 360x640 host and three 320x480 co-hosts.
    Cohost3,
    /// Rooms in pairs, the two 360x640 hosts in a PK (over signaling: pk_invite, pk_answer).
    Pk,
}

impl Case {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Case::Solo720 => "solo720",
            Case::Solo360 => "solo360",
            Case::Cohost1 => "cohost1",
            Case::Cohost3 => "cohost3",
            Case::Pk => "pk",
        }
    }

    /// The host's clip.
    pub(crate) fn host(self) -> Size {
        if self == Case::Solo720 {
            HOST_720
        } else {
            HOST_360
        }
    }

    pub(crate) fn cohosts(self) -> usize {
        match self {
            Case::Cohost1 => 1,
            Case::Cohost3 => 3,
            _ => 0,
        }
    }

    pub fn is_solo(self) -> bool {
        matches!(self, Case::Solo720 | Case::Solo360)
    }
}

/// A sender's picture size and bitrate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Size {
    pub(crate) w: usize,
    pub(crate) h: usize,
    bps: u32,
}

const HOST_720: Size = Size {
    w: 1280,
    h: 720,
    bps: 2_500_000,
};
const HOST_360: Size = Size {
    w: 360,
    h: 640,
    bps: 800_000,
};
pub(crate) const COHOST: Size = Size {
    w: 320,
    h: 480,
    bps: 300_000,
};

pub struct Opts {
    pub case: Case,
    pub rooms: usize,
    pub warmup: Duration,
    pub window: Duration,
    /// Run the nginx-rtmp + ffmpeg relay side by side (solo cases).
    pub relay: bool,
    /// The bridges' output size (None: the host's).
    pub out: Option<(u32, u32)>,
    pub content: media::Content,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct RoomsResult {
    pub system: String,
    pub case: String,
    pub rooms: usize,
    /// Publishing participants (cohost) or publishing ffmpeg processes (relay).
    pub publishers: usize,
    /// Measured CPU (cores) of the server side: cohost's process, or nginx + the ffmpeg
    /// publishers.
    pub cpu_cores: f64,
    pub cpu_per_room: f64,
    pub rooms_per_core: f64,
    /// Relay only: nginx alone.
    pub nginx_cores: Option<f64>,
    /// cohost only: the server's CPU before any room joined (3 s), included in `cpu_cores`.
    pub idle_cores: Option<f64>,
    /// Streams whose reader received video during the window.
    pub rooms_with_output: usize,
    /// Video tags (frames) per second per output: lowest and mean over the rooms.
    pub out_fps_min: f64,
    pub out_fps_mean: f64,
    /// Output (FLV tag bodies for cohost, FLV file size for ffmpeg readers) per room, Mbit/s.
    pub out_mbit_per_room: f64,
    /// cohost: the bridges' paths at the end of the window (e.g. `passthrough 20`) and
    /// the encoder's and passthrough's frames during the window, summed over the rooms.
    pub paths: String,
    pub encoded_frames: u64,
    pub passthrough_frames: u64,
    /// cohost: output picture size(s) the bridges report.
    pub out_sizes: String,
    pub rss_mib: f64,
    pub connections: usize,
    pub failed_connections: usize,
    pub failed_participants: Vec<String>,
    /// Anything else that failed: a bridge that did not start, an output that did not flow,
    /// a relay process that died.
    pub errors: Vec<String>,
    pub valid: bool,
}

/// Counters of one FLV reader.
#[derive(Default)]
struct FlvCount {
    video: AtomicU64,
    audio: AtomicU64,
    bytes: AtomicU64,
    connected: AtomicBool,
}

/// Read `GET path` (an HTTP-FLV stream) until it ends or `stop`; retry while it is not live
/// yet (404) until `deadline`.
async fn flv_reader(
    addr: std::net::SocketAddr,
    path: String,
    count: Arc<FlvCount>,
    deadline: Instant,
) -> anyhow::Result<()> {
    loop {
        let mut s = TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let (status, chunked, rest) = read_head(&mut s).await?;
        if status == 404 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        if status != 200 {
            bail!("GET {path}: HTTP {status}");
        }
        count.connected.store(true, Ordering::Relaxed);
        let mut dechunk = Dechunk::new(chunked);
        let mut flv = FlvParse::default();
        let mut body = vec![];
        dechunk.feed(&rest, &mut body)?;
        flv.feed(&body, &count)?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            body.clear();
            dechunk.feed(&buf[..n], &mut body)?;
            flv.feed(&body, &count)?;
        }
    }
}

/// Status, whether the body is chunked, and the body bytes read with the head.
async fn read_head(s: &mut TcpStream) -> anyhow::Result<(u16, bool, Vec<u8>)> {
    let mut head = vec![];
    let mut buf = [0u8; 4096];
    let end = loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            bail!("connection closed in the response head");
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if head.len() > 64 * 1024 {
            bail!("response head too long");
        }
    };
    let text = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad status line"))?;
    let chunked = text.contains("transfer-encoding: chunked");
    Ok((status, chunked, head[end..].to_vec()))
}

/// HTTP/1.1 chunked transfer decoding, incremental (or a pass-through for a plain body).
struct Dechunk {
    chunked: bool,
    /// Bytes left in the current chunk's data; then its CRLF.
    left: usize,
    crlf: usize,
    line: Vec<u8>,
}

impl Dechunk {
    fn new(chunked: bool) -> Self {
        Self {
            chunked,
            left: 0,
            crlf: 0,
            line: vec![],
        }
    }

    fn feed(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> anyhow::Result<()> {
        if !self.chunked {
            out.extend_from_slice(data);
            return Ok(());
        }
        while !data.is_empty() {
            if self.left > 0 {
                let n = self.left.min(data.len());
                out.extend_from_slice(&data[..n]);
                self.left -= n;
                data = &data[n..];
                if self.left == 0 {
                    self.crlf = 2;
                }
            } else if self.crlf > 0 {
                data = &data[1..];
                self.crlf -= 1;
            } else {
                let b = data[0];
                data = &data[1..];
                if b == b'\n' {
                    let line = String::from_utf8_lossy(&self.line).trim().to_string();
                    self.line.clear();
                    let hex = line.split(';').next().unwrap_or_default();
                    if hex.is_empty() {
                        continue;
                    }
                    self.left = usize::from_str_radix(hex, 16)
                        .map_err(|_| anyhow!("bad chunk size {line:?}"))?;
                } else if self.line.len() < 1024 {
                    self.line.push(b);
                } else {
                    bail!("chunk size line too long");
                }
            }
        }
        Ok(())
    }
}

/// FLV tag counting: header, then (tag header, body, previous tag size) repeated.
#[derive(Default)]
struct FlvParse {
    buf: Vec<u8>,
    header_done: bool,
}

impl FlvParse {
    fn feed(&mut self, data: &[u8], count: &FlvCount) -> anyhow::Result<()> {
        self.buf.extend_from_slice(data);
        let mut pos = 0;
        if !self.header_done {
            if self.buf.len() < 13 {
                return Ok(());
            }
            if &self.buf[..3] != b"FLV" {
                bail!("not an FLV stream");
            }
            pos = 13;
            self.header_done = true;
        }
        while self.buf.len() >= pos + 11 {
            let h = &self.buf[pos..pos + 11];
            let size = (usize::from(h[1]) << 16) | (usize::from(h[2]) << 8) | usize::from(h[3]);
            if self.buf.len() < pos + 11 + size + 4 {
                break;
            }
            let body = &self.buf[pos + 11..pos + 11 + size];
            match h[0] & 0x1f {
                // Video: coded frames only (not the AVC sequence header, packet type 0).
                9 if body.get(1).is_some_and(|t| *t == 1) => {
                    count.video.fetch_add(1, Ordering::Relaxed);
                }
                8 => {
                    count.audio.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
            count.bytes.fetch_add(size as u64, Ordering::Relaxed);
            pos += 11 + size + 4;
        }
        self.buf.drain(..pos);
        Ok(())
    }
}

/// One HTTP request with `Connection: close`: status and body.
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Value)> {
    let mut s = TcpStream::connect(addr).await?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let (status, chunked, rest) = read_head(&mut s).await?;
    let mut raw = rest;
    s.read_to_end(&mut raw).await?;
    let mut out = vec![];
    Dechunk::new(chunked).feed(&raw, &mut out)?;
    let v = serde_json::from_slice(&out).unwrap_or(Value::Null);
    Ok((status, v))
}

struct Participant {
    joined: CohostJoined,
    stop: Arc<AtomicBool>,
    pump: tokio::task::JoinHandle<()>,
}

async fn join(
    t: &CohostTarget,
    clip: &Arc<Clip>,
    room: &str,
    identity: &str,
    role: Role,
    id: u32,
) -> anyhow::Result<Participant> {
    let (pt, ssrcs) = crate::tracks(id);
    let joined = t
        .join_as(
            room,
            identity,
            role,
            Some(pt.clone()),
            Arc::new(Sink::new()),
        )
        .await?;
    let pts = joined
        .payload_types()
        .ok_or_else(|| anyhow!("no payload types negotiated"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let pump = media::pump_with(clip.clone(), pt, ssrcs, pts, stop.clone(), false);
    Ok(Participant { joined, stop, pump })
}

impl Participant {
    async fn leave(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.pump.abort();
        Box::new(self.joined).leave().await;
    }
}

pub(crate) async fn clip_for(size: Size, content: media::Content) -> anyhow::Result<Arc<Clip>> {
    eprintln!(
        "encoding the {}x{} clip ({content:?}, {} bit/s asked)...",
        size.w, size.h, size.bps
    );
    let clip = tokio::task::spawn_blocking(move || {
        media::make_clip_sized(content, size.bps, 4, true, size.w, size.h)
    })
    .await??;
    eprintln!(
        "  {:.2} Mbit/s, {:.1} packets/frame",
        clip.video_bps / 1e6,
        clip.frames.iter().map(|f| f.payloads.len()).sum::<usize>() as f64
            / clip.frames.len().max(1) as f64
    );
    Ok(Arc::new(clip))
}

/// Path, encoded and passthrough frames, size of each room's bridge (None: no bridge).
async fn bridge_stats(
    t: &CohostTarget,
    rooms: &[String],
    tokens: &[String],
) -> Vec<Option<(String, u64, u64, String)>> {
    let mut out = vec![];
    for (r, tok) in rooms.iter().zip(tokens) {
        let s = match http(t.addr, "GET", &format!("/v1/rooms/{r}/bridge"), tok, None).await {
            Ok((200, v)) => {
                let st = &v["stats"];
                Some((
                    st["path"].as_str().unwrap_or("?").to_string(),
                    st["encoded_frames"].as_u64().unwrap_or(0),
                    st["passthrough_frames"].as_u64().unwrap_or(0),
                    format!(
                        "{}x{}",
                        st["width"].as_u64().unwrap_or(0),
                        st["height"].as_u64().unwrap_or(0)
                    ),
                ))
            }
            _ => None,
        };
        out.push(s);
    }
    out
}

/// Count the distinct values of `v` as "a 3, b 1".
fn tally(v: impl Iterator<Item = String>) -> String {
    let mut seen: Vec<(String, usize)> = vec![];
    for x in v {
        match seen.iter_mut().find(|(k, _)| *k == x) {
            Some((_, n)) => *n += 1,
            None => seen.push((x, 1)),
        }
    }
    seen.iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub async fn cohost(t: &CohostTarget, o: &Opts) -> anyhow::Result<RoomsResult> {
    crate::pc::reset_tracking();
    // The server's own CPU with no room (timers, the runtime): shown, not subtracted.
    let (i0, it) = (cpu_seconds(t.pid()), Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = match (i0, cpu_seconds(t.pid())) {
        (Some(a), Some(b)) => Some((b - a) / it.elapsed().as_secs_f64()),
        _ => None,
    };
    let host_clip = clip_for(o.case.host(), o.content).await?;
    let cohost_clip = if o.case.cohosts() > 0 {
        Some(clip_for(COHOST, o.content).await?)
    } else {
        None
    };
    let mut r = RoomsResult {
        system: "cohost".into(),
        case: o.case.name().into(),
        rooms: o.rooms,
        idle_cores: idle,
        ..Default::default()
    };
    let names: Vec<String> = (0..o.rooms)
        .map(|i| format!("{}-{i}", o.case.name()))
        .collect();
    let mut tokens = vec![];
    let mut parts: Vec<Participant> = vec![];
    let mut hosts: Vec<Option<usize>> = vec![];
    let mut id = 1000u32;
    for room in &names {
        tokens.push(t.token(room, "host", Role::Host)?);
        id += 1;
        match join(t, &host_clip, room, "host", Role::Host, id).await {
            Ok(p) => {
                hosts.push(Some(parts.len()));
                parts.push(p);
            }
            Err(e) => {
                hosts.push(None);
                r.errors.push(format!("{room}/host: join: {e:#}"));
                continue;
            }
        }
        if let Some(clip) = &cohost_clip {
            for c in 0..o.case.cohosts() {
                id += 1;
                match join(t, clip, room, &format!("co{c}"), Role::Cohost, id).await {
                    Ok(p) => parts.push(p),
                    Err(e) => r.errors.push(format!("{room}/co{c}: join: {e:#}")),
                }
            }
        }
    }
    r.publishers = parts.len();
    if o.case == Case::Pk {
        for pair in 0..o.rooms / 2 {
            let (a, b) = (2 * pair, 2 * pair + 1);
            let (Some(ha), Some(hb)) = (hosts[a], hosts[b]) else {
                continue;
            };
            let res = async {
                parts[ha]
                    .joined
                    .request(json!({"type":"pk_invite","room":names[b]}))
                    .await?;
                parts[hb]
                    .joined
                    .request(json!({"type":"pk_answer","room":names[a],"accept":true}))
                    .await
            }
            .await;
            if let Err(e) = res {
                r.errors
                    .push(format!("PK {} with {}: {e:#}", names[a], names[b]));
            }
        }
    }
    // Bridges: the output size is the host's (from its SPS) or the server's configured one
    // (`--rooms-out`), nothing asked for.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut readers = vec![];
    for (room, tok) in names.iter().zip(&tokens) {
        let path = format!("/v1/rooms/{room}/bridge");
        match http(t.addr, "POST", &path, tok, Some(&json!({}))).await {
            Ok((201, _)) => {}
            // `bridge.auto_start` (the server's default) starts it at the host's first
            // publish, with the same settings as this request (the host's size, the
            // embedded origin): that one is measured.
            Ok((409, v)) if v["error"]["code"] == "already_running" => {}
            Ok((s, v)) => r.errors.push(format!("{room}: bridge start: HTTP {s} {v}")),
            Err(e) => r.errors.push(format!("{room}: bridge start: {e:#}")),
        }
        let count = Arc::new(FlvCount::default());
        let (addr, c, p) = (t.addr, count.clone(), format!("/live/{room}.flv"));
        let task = tokio::spawn(async move {
            if let Err(e) = flv_reader(addr, p.clone(), c, deadline).await {
                eprintln!("  reader {p}: {e:#}");
            }
        });
        readers.push((count, task));
    }
    // Every output flowing (video received), or the deadline.
    while Instant::now() < deadline
        && readers
            .iter()
            .any(|(c, _)| c.video.load(Ordering::Relaxed) == 0)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "  {} of {} outputs flowing; warm-up {:?}",
        readers
            .iter()
            .filter(|(c, _)| c.video.load(Ordering::Relaxed) > 0)
            .count(),
        o.rooms,
        o.warmup
    );
    tokio::time::sleep(o.warmup).await;
    let s0 = bridge_stats(t, &names, &tokens).await;
    let snap = |readers: &Vec<(Arc<FlvCount>, tokio::task::JoinHandle<()>)>| {
        readers
            .iter()
            .map(|(c, _)| {
                (
                    c.video.load(Ordering::Relaxed),
                    c.bytes.load(Ordering::Relaxed),
                )
            })
            .collect::<Vec<_>>()
    };
    let (c0, f0, t0) = (cpu_seconds(t.pid()), snap(&readers), Instant::now());
    tokio::time::sleep(o.window).await;
    let (c1, f1, secs) = (
        cpu_seconds(t.pid()),
        snap(&readers),
        t0.elapsed().as_secs_f64(),
    );
    let s1 = bridge_stats(t, &names, &tokens).await;
    r.rss_mib = rss_bytes(t.pid()).unwrap_or(0) as f64 / (1024.0 * 1024.0);
    let cpu = match (c0, c1) {
        (Some(a), Some(b)) => (b - a) / secs,
        _ => bail!("no CPU time for the server's PID {}", t.pid()),
    };
    fill_cpu(&mut r, cpu);
    let fps = fill_output_between(&mut r, &f0, &f1, secs);
    for (i, room) in names.iter().enumerate() {
        if fps[i] <= 0.0 {
            r.errors
                .push(format!("{room}: no video output during the window"));
        }
    }
    r.paths = tally(s1.iter().map(|s| {
        s.as_ref()
            .map(|s| s.0.clone())
            .unwrap_or_else(|| "no bridge".into())
    }));
    r.out_sizes = tally(s1.iter().flatten().map(|s| s.3.clone()));
    for (a, b) in s0.iter().zip(&s1) {
        if let (Some(a), Some(b)) = (a, b) {
            r.encoded_frames += b.1.saturating_sub(a.1);
            r.passthrough_frames += b.2.saturating_sub(a.2);
        }
    }
    let c = crate::pc::connection_report();
    r.connections = c.connections;
    r.failed_connections = c.failed_connections;
    r.failed_participants = c.failed_participants;
    r.valid = r.failed_connections == 0 && r.errors.is_empty();
    for (_, task) in readers {
        task.abort();
    }
    for p in parts {
        p.leave().await;
    }
    Ok(r)
}

pub(crate) fn fill_cpu(r: &mut RoomsResult, cpu: f64) {
    r.cpu_cores = cpu;
    r.cpu_per_room = cpu / r.rooms.max(1) as f64;
    r.rooms_per_core = if r.cpu_per_room > 0.0 {
        1.0 / r.cpu_per_room
    } else {
        f64::NAN
    };
}

/// [`fill_output`] from (frames, bytes) counters of each output at the start and the end of
/// the window; returns each output's frames per second.
pub(crate) fn fill_output_between(
    r: &mut RoomsResult,
    f0: &[(u64, u64)],
    f1: &[(u64, u64)],
    secs: f64,
) -> Vec<f64> {
    let fps: Vec<f64> = f0
        .iter()
        .zip(f1)
        .map(|(a, b)| b.0.saturating_sub(a.0) as f64 / secs)
        .collect();
    let bytes: u64 = f0
        .iter()
        .zip(f1)
        .map(|(a, b)| b.1.saturating_sub(a.1))
        .sum();
    fill_output(r, &fps, bytes, secs);
    fps
}

fn fill_output(r: &mut RoomsResult, fps: &[f64], bytes: u64, secs: f64) {
    r.rooms_with_output = fps.iter().filter(|f| **f > 0.0).count();
    r.out_fps_min = fps.iter().copied().fold(f64::INFINITY, f64::min);
    if !r.out_fps_min.is_finite() {
        r.out_fps_min = 0.0;
    }
    r.out_fps_mean = fps.iter().sum::<f64>() / fps.len().max(1) as f64;
    r.out_mbit_per_room = bytes as f64 * 8.0 / secs / 1e6 / r.rooms.max(1) as f64;
}

/// The nginx-rtmp configuration: foreground, one process, its own PID file.
fn nginx_conf(dir: &Path, port: u16) -> anyhow::Result<PathBuf> {
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "load_module /usr/lib/nginx/modules/ngx_rtmp_module.so;\n\
             daemon off;\nmaster_process off;\n\
             error_log {dir}/error.log warn;\npid {dir}/nginx.pid;\n\
             events {{ worker_connections 1024; }}\n\
             rtmp {{ server {{ listen 127.0.0.1:{port}; chunk_size 4096;\n\
               application live {{ live on; record off; }} }} }}\n",
            dir = dir.display()
        ),
    )?;
    Ok(conf)
}

/// The clip with a 128 kbit/s AAC tone, as FLV (what an encoder like OBS pushes).
async fn clip_flv(clip: &Clip, dir: &Path) -> anyhow::Result<PathBuf> {
    let h264 = dir.join("clip.h264");
    let wav = dir.join("tone.wav");
    let flv = dir.join("clip.flv");
    let all: Vec<u8> = clip
        .frames
        .iter()
        .flat_map(|f| f.annexb.iter().copied())
        .collect();
    std::fs::write(&h264, all)?;
    crate::bridge_bench::write_wav(&wav, 440.0, 4)?;
    let out = tokio::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y", "-f", "h264"])
        .args(["-framerate", "30", "-i"])
        .arg(&h264)
        .arg("-i")
        .arg(&wav)
        .args([
            "-c:v", "copy", "-c:a", "aac", "-b:a", "128k", "-ar", "48000",
        ])
        .args(["-ac", "2", "-shortest", "-f", "flv"])
        .arg(&flv)
        .output()
        .await
        .context("ffmpeg (Debian's)")?;
    if !out.status.success() {
        bail!("ffmpeg clip.flv: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(flv)
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Runs `f` in a fresh temporary directory `cohost-<name>-<pid>`, removed afterwards
/// whatever `f` returned.
pub(crate) async fn in_temp_dir<T>(
    name: &str,
    f: impl AsyncFnOnce(&Path) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let dir = std::env::temp_dir().join(format!("cohost-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let res = f(&dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    res
}

/// The same number of solo streams through a plain relay: ffmpeg `-c copy` into nginx-rtmp.
pub async fn relay(o: &Opts) -> anyhow::Result<RoomsResult> {
    in_temp_dir("rooms-relay", async |dir| relay_in(o, dir).await).await
}

async fn relay_in(o: &Opts, dir: &Path) -> anyhow::Result<RoomsResult> {
    let clip = clip_for(o.case.host(), o.content).await?;
    let flv = clip_flv(&clip, dir).await?;
    let port = free_port()?;
    let conf = nginx_conf(dir, port)?;
    let mut nginx = tokio::process::Command::new("nginx")
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf)
        .kill_on_drop(true)
        .spawn()
        .context("nginx (Debian nginx + libnginx-mod-rtmp)")?;
    let npid = nginx.id().context("nginx pid")?;
    let ready = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if Instant::now() > ready {
            bail!("nginx did not start: see {}", dir.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut r = RoomsResult {
        system: "nginx-rtmp+ffmpeg".into(),
        case: o.case.name().into(),
        rooms: o.rooms,
        publishers: o.rooms,
        paths: "relay (copy)".into(),
        ..Default::default()
    };
    let quiet = ["-hide_banner", "-loglevel", "error", "-nostats"];
    let mut pubs = vec![];
    for i in 0..o.rooms {
        let c = tokio::process::Command::new("ffmpeg")
            .args(quiet)
            .args(["-re", "-stream_loop", "-1", "-i"])
            .arg(&flv)
            .args(["-c", "copy", "-f", "flv"])
            .arg(format!("rtmp://127.0.0.1:{port}/live/s{i}"))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("ffmpeg publisher")?;
        pubs.push(c);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut players = vec![];
    for i in 0..o.rooms {
        let progress = dir.join(format!("play-{i}.txt"));
        let c = tokio::process::Command::new("ffmpeg")
            .args(quiet)
            .args(["-y", "-i"])
            .arg(format!("rtmp://127.0.0.1:{port}/live/s{i}"))
            .args(["-c", "copy", "-progress"])
            .arg(&progress)
            .args(["-f", "flv", "/dev/null"])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("ffmpeg player")?;
        players.push((c, progress));
    }
    tokio::time::sleep(o.warmup + Duration::from_secs(2)).await;
    let ppids: Vec<u32> = pubs.iter().filter_map(|c| c.id()).collect();
    let cpu_of =
        |pids: &[u32]| -> Option<f64> { pids.iter().map(|p| cpu_seconds(*p)).sum::<Option<f64>>() };
    let prog = |players: &Vec<(tokio::process::Child, PathBuf)>| {
        players
            .iter()
            .map(|(_, p)| {
                (
                    crate::bridge_bench::progress_value(p, "frame").unwrap_or(0),
                    crate::bridge_bench::progress_value(p, "total_size").unwrap_or(0),
                )
            })
            .collect::<Vec<_>>()
    };
    let (n0, p0, f0, t0) = (
        cpu_seconds(npid),
        cpu_of(&ppids),
        prog(&players),
        Instant::now(),
    );
    tokio::time::sleep(o.window).await;
    let (n1, p1, f1, secs) = (
        cpu_seconds(npid),
        cpu_of(&ppids),
        prog(&players),
        t0.elapsed().as_secs_f64(),
    );
    for (i, c) in pubs.iter_mut().enumerate() {
        if let Ok(Some(st)) = c.try_wait() {
            r.errors.push(format!("publisher s{i} exited: {st}"));
        }
    }
    for (i, (c, _)) in players.iter_mut().enumerate() {
        if let Ok(Some(st)) = c.try_wait() {
            r.errors.push(format!("player s{i} exited: {st}"));
        }
    }
    if ppids.len() != o.rooms {
        r.errors.push("a publisher has no PID".into());
    }
    let (Some(n0), Some(n1), Some(p0), Some(p1)) = (n0, n1, p0, p1) else {
        bail!("no CPU time for nginx or an ffmpeg publisher (one exited?)");
    };
    let nginx_cores = (n1 - n0) / secs;
    r.nginx_cores = Some(nginx_cores);
    fill_cpu(&mut r, nginx_cores + (p1 - p0) / secs);
    let fps = fill_output_between(&mut r, &f0, &f1, secs);
    for (i, f) in fps.iter().enumerate() {
        if *f <= 0.0 {
            r.errors
                .push(format!("s{i}: no video at the player during the window"));
        }
    }
    r.valid = r.errors.is_empty();
    for (mut c, _) in players {
        let _ = c.kill().await;
    }
    for mut c in pubs {
        let _ = c.kill().await;
    }
    let _ = nginx.kill().await;
    let _ = nginx.wait().await;
    Ok(r)
}

pub fn print(results: &[RoomsResult]) {
    println!(
        "\n{:<18} {:<8} {:>5} {:>5} {:>7} {:>10} {:>10} {:>7} {:>7} {:>8} {:>8} {:>7}",
        "system",
        "case",
        "rooms",
        "pubs",
        "cores",
        "core/room",
        "rooms/core",
        "fps min",
        "fps avg",
        "Mb/s/rm",
        "RSS MiB",
        "failed"
    );
    for r in results {
        println!(
            "{:<18} {:<8} {:>5} {:>5} {:>7.3} {:>10.4} {:>10.1} {:>7.1} {:>7.1} {:>8.2} {:>8.0} {:>7}",
            r.system,
            r.case,
            r.rooms,
            r.publishers,
            r.cpu_cores,
            r.cpu_per_room,
            r.rooms_per_core,
            r.out_fps_min,
            r.out_fps_mean,
            r.out_mbit_per_room,
            r.rss_mib,
            format!(
                "{}/{}",
                r.failed_participants.len() + r.errors.len(),
                r.publishers
            )
        );
    }
    for r in results {
        if let Some(i) = r.idle_cores {
            println!(
                "cohost {}: the idle server (before any room) used {:.4} cores, included above",
                r.case, i
            );
        }
        if r.system == "cohost" {
            println!(
                "cohost {}: bridge paths at the end of the window: {}; output size {}; during \
                 the window: encoded frames {}, passthrough frames {}",
                r.case, r.paths, r.out_sizes, r.encoded_frames, r.passthrough_frames
            );
        }
        if let Some(n) = r.nginx_cores {
            println!(
                "{} {}: nginx alone {:.4} cores ({:.4} per stream); ffmpeg publishers {:.4} \
                 per stream",
                r.system,
                r.case,
                n,
                n / r.rooms.max(1) as f64,
                (r.cpu_cores - n) / r.rooms.max(1) as f64
            );
        }
    }
    if let (Some(c), Some(f)) = (
        results.iter().find(|r| r.system == "cohost"),
        results.iter().find(|r| r.system != "cohost"),
    ) {
        println!(
            "ratio cohost / {}, CPU per room: {:.2}",
            if f.system == "ffmpeg-x264" {
                "ffmpeg composite (which neither receives WebRTC nor forwards between participants)"
            } else {
                "relay"
            },
            c.cpu_per_room / f.cpu_per_room
        );
    }
}

/// Say loudly which runs are not benchmark results; returns whether all are valid.
pub fn print_validity(results: &[RoomsResult], errors: &[String]) -> bool {
    let mut valid = errors.is_empty();
    for r in results.iter().filter(|r| !r.valid) {
        valid = false;
        println!(
            "\nNOT A VALID BENCHMARK RESULT: {} {} ({} rooms): {} of {} participants failed to \
             connect ({} of {} connections), {} other failures: {}",
            r.system,
            r.case,
            r.rooms,
            r.failed_participants.len(),
            r.publishers,
            r.failed_connections,
            r.connections,
            r.errors.len(),
            r.failed_participants
                .iter()
                .chain(&r.errors)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    for e in errors {
        println!("\nNOT A VALID BENCHMARK RESULT: scenario did not finish: {e}");
    }
    if valid {
        println!("\nall participants connected and every output flowed: valid benchmark result");
    }
    valid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flv_tags_are_counted_across_chunk_and_read_boundaries() {
        // FLV header, an AVC sequence header, a coded frame, an audio tag.
        let mut flv = b"FLV\x01\x05\x00\x00\x00\x09\x00\x00\x00\x00".to_vec();
        let tag = |t: u8, body: &[u8]| {
            let mut v = vec![t, 0, 0, body.len() as u8, 0, 0, 0, 0, 0, 0, 0];
            v.extend_from_slice(body);
            v.extend_from_slice(&((11 + body.len()) as u32).to_be_bytes());
            v
        };
        flv.extend(tag(9, &[0x17, 0, 0, 0, 0, 1, 2]));
        flv.extend(tag(9, &[0x17, 1, 0, 0, 0, 9, 9, 9]));
        flv.extend(tag(8, &[0xaf, 1, 5]));
        // Chunked in pieces of 5 bytes, delivered in reads of 7.
        let mut wire = vec![];
        for c in flv.chunks(5) {
            wire.extend(format!("{:x}\r\n", c.len()).as_bytes());
            wire.extend_from_slice(c);
            wire.extend(b"\r\n");
        }
        let count = FlvCount::default();
        let (mut d, mut p) = (Dechunk::new(true), FlvParse::default());
        for r in wire.chunks(7) {
            let mut body = vec![];
            d.feed(r, &mut body).unwrap();
            p.feed(&body, &count).unwrap();
        }
        assert_eq!(count.video.load(Ordering::Relaxed), 1);
        assert_eq!(count.audio.load(Ordering::Relaxed), 1);
        assert_eq!(count.bytes.load(Ordering::Relaxed), 7 + 8 + 3);
    }
}
