//! `--scenario audience`: one room with thousands of signaling-only audience members (the way
//! a live platform's viewers sit in a room: watching the CDN stream, chatting, liking), a host
//! publishing and a co-host receiving it in real time. Measures, in the server process:
//! memory per idle member, CPU while the room chats (`--chat-rate` lines per second from
//! different members) and likes (`--like-rate` per second, spread over the members), and the
//! fan-out latency of each chat line (sent -> the last member received it) and of every
//! delivery; and the co-host pair's media latency before and during the storm.
//!
//! Members are plain WebSocket clients in this process with small buffers (10,000 of them fit
//! easily); every member counts each chat line it receives by a marker in its text, without
//! parsing the JSON.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use futures::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use cohost::auth::Role;

use crate::cohost_target::CohostTarget;
use crate::stats::{Sink, cpu_seconds, now_ns, percentile, rss_bytes};
use crate::target::{Joined, Target};

pub struct Opts {
    pub members: usize,
    pub chat_rate: f64,
    pub like_rate: f64,
    pub warmup: Duration,
    pub window: Duration,
}

#[derive(Debug, Default, Serialize)]
pub struct AudienceResult {
    pub members: usize,
    pub joined: usize,
    pub failed: usize,
    pub join_secs: f64,
    pub rss_before_mib: f64,
    pub rss_idle_mib: f64,
    pub kib_per_idle_member: f64,
    pub cpu_idle_cores: f64,
    pub cpu_storm_cores: f64,
    /// This load tool's own CPU during the storm (its members share the machine with the
    /// server: when both together use every core, latencies include waiting for a core).
    pub loadgen_storm_cores: f64,
    pub chat_sent: u64,
    pub likes_sent: u64,
    /// Chat lines that did not reach every member by the end of the window (+2 s).
    pub chat_incomplete: u64,
    /// Per chat line: sent -> the last member received it.
    pub fanout_last_p50_ms: f64,
    pub fanout_last_p99_ms: f64,
    /// Every delivery of every chat line.
    pub delivery_p50_ms: f64,
    pub delivery_p99_ms: f64,
    /// Like messages one member received during the window (the likes are added up).
    pub like_messages_seen: u64,
    pub pair_before_p50_ms: f64,
    pub pair_before_p99_ms: f64,
    pub pair_storm_p50_ms: f64,
    pub pair_storm_p99_ms: f64,
}

/// What every member reports: per chat line, deliveries and the latest arrival; every
/// delivery's latency in 1 ms buckets.
struct Board {
    sent_ns: Vec<AtomicU64>,
    got: Vec<AtomicU32>,
    last_ns: Vec<AtomicU64>,
    buckets: Vec<AtomicU64>,
    likes_seen: AtomicU64,
    counting: AtomicBool,
}

const MAX_LINES: usize = 100_000;
const BUCKETS: usize = 10_000;

impl Board {
    fn new() -> Self {
        let v = |n| (0..n).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
        Self {
            sent_ns: v(MAX_LINES),
            got: (0..MAX_LINES).map(|_| AtomicU32::new(0)).collect(),
            last_ns: v(MAX_LINES),
            buckets: v(BUCKETS),
            likes_seen: AtomicU64::new(0),
            counting: AtomicBool::new(false),
        }
    }

    /// A member received `text`: a chat line of ours (`"fanout:SEQ;"`) or a like message.
    fn on_text(&self, text: &str, first: bool) {
        let at = now_ns();
        if let Some(i) = memchr::memmem::find(text.as_bytes(), b"fanout:") {
            let rest = &text[i + 7..];
            let Some(seq) = rest.split(';').next().and_then(|s| s.parse::<usize>().ok()) else {
                return;
            };
            if seq >= MAX_LINES {
                return;
            }
            self.got[seq].fetch_add(1, Ordering::Relaxed);
            self.last_ns[seq].fetch_max(at, Ordering::Relaxed);
            let sent = self.sent_ns[seq].load(Ordering::Relaxed);
            if sent > 0 {
                let ms = (at.saturating_sub(sent) / 1_000_000) as usize;
                self.buckets[ms.min(BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
            }
        } else if first
            && self.counting.load(Ordering::Relaxed)
            && memchr::memmem::find(text.as_bytes(), b"\"kind\":\"like\"").is_some()
        {
            self.likes_seen.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return f64::NAN;
        }
        let want = (total as f64 * p).ceil() as u64;
        let mut seen = 0;
        for (ms, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return ms as f64;
            }
        }
        BUCKETS as f64
    }
}

/// One audience member: a WebSocket that joins and then reads; `out` sends chat and likes.
async fn member(
    url: String,
    token: String,
    board: Arc<Board>,
    first: bool,
    joined: Arc<AtomicUsize>,
) -> anyhow::Result<mpsc::UnboundedSender<String>> {
    let mut cfg = WebSocketConfig::default();
    cfg.read_buffer_size = 4096;
    cfg.write_buffer_size = 0;
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(cfg), true)
        .await
        .context("connect")?;
    let (mut sink, mut stream) = ws.split();
    sink.send(Message::Text(
        json!({"type": "join", "id": 1, "token": token})
            .to_string()
            .into(),
    ))
    .await?;
    // The join result first.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let m = tokio::time::timeout_at(deadline, stream.next())
            .await
            .map_err(|_| anyhow!("join timeout"))?;
        match m {
            Some(Ok(Message::Text(t))) if t.contains("\"type\":\"response\"") => break,
            Some(Ok(Message::Text(t))) if t.contains("\"type\":\"error\"") => {
                return Err(anyhow!("join refused: {t}"));
            }
            Some(Ok(_)) => continue,
            _ => return Err(anyhow!("closed before the join result")),
        }
    }
    joined.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                m = stream.next() => match m {
                    Some(Ok(Message::Text(t))) => board.on_text(&t, first),
                    Some(Ok(_)) => {}
                    _ => break,
                },
                out = rx.recv() => {
                    let Some(out) = out else { break };
                    if sink.send(Message::Text(out.into())).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    Ok(tx)
}

fn pair_latency(sink: &Sink) -> (f64, f64) {
    let mut lat = sink.window().latencies_us;
    lat.sort_unstable();
    (
        percentile(&lat, 0.50) / 1000.0,
        percentile(&lat, 0.99) / 1000.0,
    )
}

pub async fn run(
    cohost_bin: &str,
    o: &Opts,
    clip: &Arc<crate::media::Clip>,
) -> anyhow::Result<AudienceResult> {
    let members = o.members.to_string();
    let limit = (o.members + 100).to_string();
    let conns = (o.members + 1000).to_string();
    let t = CohostTarget::start_with(
        cohost_bin,
        "127.0.0.1".parse()?,
        &[
            ("COHOST_ROOM__MAX_MEMBERS", limit.as_str()),
            ("COHOST_SERVER__MAX_CONNECTIONS", conns.as_str()),
            ("COHOST_LOG", "error"),
        ],
    )
    .await?;
    let _ = members;
    let pid = t.pid();
    let room = "audience";
    let mut r = AudienceResult {
        members: o.members,
        ..Default::default()
    };
    // The stage: a host publishing, a co-host receiving it in real time.
    let host = crate::join_publisher(&t, clip, room, "host", 1, Arc::new(Sink::new())).await?;
    let pair = Arc::new(Sink::new());
    let cohost = t
        .join_as(room, "cohost", Role::Cohost, None, pair.clone())
        .await?;
    tokio::time::sleep(o.warmup).await;
    pair.record(true);
    tokio::time::sleep(Duration::from_secs(5)).await;
    pair.record(false);
    (r.pair_before_p50_ms, r.pair_before_p99_ms) = pair_latency(&pair);
    let rss0 = rss_bytes(pid).unwrap_or(0);

    // The audience joins, 200 at a time.
    let board = Arc::new(Board::new());
    let joined = Arc::new(AtomicUsize::new(0));
    let url = format!("ws://{}/ws", t.addr);
    let t0 = Instant::now();
    let mut senders = Vec::with_capacity(o.members);
    let ids: Vec<usize> = (0..o.members).collect();
    for chunk in ids.chunks(200) {
        let futs = chunk.iter().map(|i| {
            let token = t.token(room, &format!("fan{i}"), Role::Audience);
            let (url, board, joined) = (url.clone(), board.clone(), joined.clone());
            async move { member(url, token?, board, *i == 0, joined).await }
        });
        for res in futures::future::join_all(futs).await {
            match res {
                Ok(tx) => senders.push(tx),
                Err(e) => {
                    if r.failed < 5 {
                        eprintln!("  member failed: {e:#}");
                    }
                    r.failed += 1;
                }
            }
        }
    }
    r.join_secs = t0.elapsed().as_secs_f64();
    r.joined = joined.load(Ordering::Relaxed);
    eprintln!(
        "  {} members joined in {:.1} s ({} failed)",
        r.joined, r.join_secs, r.failed
    );
    // Idle: memory and CPU with everyone connected and nobody talking.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss1 = rss_bytes(pid).unwrap_or(0);
    r.rss_before_mib = rss0 as f64 / 1048576.0;
    r.rss_idle_mib = rss1 as f64 / 1048576.0;
    r.kib_per_idle_member = rss1.saturating_sub(rss0) as f64 / 1024.0 / r.joined.max(1) as f64;
    let (c0, i0) = (cpu_seconds(pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(5)).await;
    r.cpu_idle_cores = match (c0, cpu_seconds(pid)) {
        (Some(a), Some(b)) => (b - a) / i0.elapsed().as_secs_f64(),
        _ => f64::NAN,
    };

    // The storm: chat lines from different members at `chat_rate`, likes at `like_rate`.
    if senders.is_empty() {
        t.shutdown().await;
        return Err(anyhow!("no member joined"));
    }
    board.counting.store(true, Ordering::Relaxed);
    pair.record(true);
    let (c0, i0) = (cpu_seconds(pid), Instant::now());
    let me = std::process::id();
    let l0 = cpu_seconds(me);
    let end = Instant::now() + o.window;
    let chat_every = Duration::from_secs_f64(1.0 / o.chat_rate.max(0.1));
    let like_every = Duration::from_secs_f64(1.0 / o.like_rate.max(0.1));
    let (mut next_chat, mut next_like) = (Instant::now(), Instant::now());
    let (mut seq, mut likes, mut liker) = (0usize, 0u64, 0usize);
    while Instant::now() < end && seq < MAX_LINES {
        let now = Instant::now();
        if now >= next_chat {
            // Chatters are spread over the room (each under its 5 lines per second).
            let who = (seq * 7919) % senders.len();
            board.sent_ns[seq].store(now_ns(), Ordering::Relaxed);
            let line = json!({"type": "chat", "text": format!("fanout:{seq};")}).to_string();
            let _ = senders[who].send(line);
            seq += 1;
            next_chat += chat_every;
        }
        while Instant::now() >= next_like {
            let _ = senders[liker % senders.len()].send(r#"{"type":"like"}"#.to_string());
            liker += 1;
            likes += 1;
            next_like += like_every;
        }
        let wake = next_chat.min(next_like);
        tokio::time::sleep(
            wake.saturating_duration_since(Instant::now())
                .min(Duration::from_millis(5)),
        )
        .await;
    }
    r.cpu_storm_cores = match (c0, cpu_seconds(pid)) {
        (Some(a), Some(b)) => (b - a) / i0.elapsed().as_secs_f64(),
        _ => f64::NAN,
    };
    r.loadgen_storm_cores = match (l0, cpu_seconds(me)) {
        (Some(a), Some(b)) => (b - a) / i0.elapsed().as_secs_f64(),
        _ => f64::NAN,
    };
    pair.record(false);
    (r.pair_storm_p50_ms, r.pair_storm_p99_ms) = pair_latency(&pair);
    board.counting.store(false, Ordering::Relaxed);
    r.chat_sent = seq as u64;
    r.likes_sent = likes;
    // Lines still on their way get two more seconds.
    let want = r.joined as u32;
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && (0..seq).any(|i| board.got[i].load(Ordering::Relaxed) < want)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut last = vec![];
    for i in 0..seq {
        if board.got[i].load(Ordering::Relaxed) < want {
            r.chat_incomplete += 1;
            continue;
        }
        let sent = board.sent_ns[i].load(Ordering::Relaxed);
        let at = board.last_ns[i].load(Ordering::Relaxed);
        last.push((at.saturating_sub(sent) / 1000).min(u64::from(u32::MAX)) as u32);
    }
    last.sort_unstable();
    r.fanout_last_p50_ms = percentile(&last, 0.50) / 1000.0;
    r.fanout_last_p99_ms = percentile(&last, 0.99) / 1000.0;
    r.delivery_p50_ms = board.percentile_ms(0.50);
    r.delivery_p99_ms = board.percentile_ms(0.99);
    r.like_messages_seen = board.likes_seen.load(Ordering::Relaxed);
    drop(senders);
    host.leave().await;
    Box::new(cohost).leave().await;
    t.shutdown().await;
    Ok(r)
}

pub fn print(r: &AudienceResult) {
    println!(
        "members {} (joined {}, failed {}) in {:.1} s",
        r.members, r.joined, r.failed, r.join_secs
    );
    println!(
        "memory: {:.1} MiB before, {:.1} MiB idle with everyone in: {:.1} KiB per idle member",
        r.rss_before_mib, r.rss_idle_mib, r.kib_per_idle_member
    );
    println!(
        "server CPU: {:.3} cores idle, {:.3} cores during the storm ({} chat lines, {} likes); \
         this load tool (its members) during the storm: {:.3} cores",
        r.cpu_idle_cores, r.cpu_storm_cores, r.chat_sent, r.likes_sent, r.loadgen_storm_cores
    );
    println!(
        "chat fan-out (send -> last member): p50 {:.0} ms, p99 {:.0} ms; every delivery: p50 \
         {:.0} ms, p99 {:.0} ms; lines not delivered to everyone: {}",
        r.fanout_last_p50_ms,
        r.fanout_last_p99_ms,
        r.delivery_p50_ms,
        r.delivery_p99_ms,
        r.chat_incomplete
    );
    println!(
        "likes: {} sent, {} like messages seen by one member",
        r.likes_sent, r.like_messages_seen
    );
    println!(
        "co-host pair media latency: before p50 {:.1} ms p99 {:.1} ms; during p50 {:.1} ms p99 \
         {:.1} ms",
        r.pair_before_p50_ms, r.pair_before_p99_ms, r.pair_storm_p50_ms, r.pair_storm_p99_ms
    );
    if r.failed > 0 || r.chat_incomplete > 0 {
        println!(
            "\nNOT A VALID BENCHMARK RESULT: {} members failed to join, {} chat lines did not \
             reach everyone",
            r.failed, r.chat_incomplete
        );
    }
}
