//! cohost-load: drives an SFU over its real signaling and WebRTC with synthetic but realistic
//! media, and measures forwarding rate, loss, one-way latency through the SFU, join time to
//! first video, and the SFU process's CPU time per forwarded packet and memory per participant.
//! Runs the same scenarios against cohost and Janus (VideoRoom) in one run for comparison.
//!
//! Loopback only; bounded run time; it starts and stops the servers itself.

mod audience;
mod bridge_bench;
mod codec_bench;
mod cohost_target;
mod janus;
mod media;
mod pc;
mod rooms;
mod rooms_mix;
mod stats;
mod target;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use clap::Parser;
use rtc::media_stream::MediaStreamTrack;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use serde::Serialize;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;

use media::Clip;
use stats::{Sink, cpu_seconds, percentile, rss_bytes};
use target::{Joined, PublishTracks, Target};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "cohost-load",
    about = "Load generator and side-by-side SFU benchmark"
)]
struct Cli {
    /// cohost, janus or both
    #[arg(long, default_value = "both")]
    target: String,
    /// fanout, cohost, join or all (the SFU, against --target); or bridge (the bridge pipeline
    /// in this process against ffmpeg doing the same composite); or solo (the bridge's solo
    /// path: a lone host at 30 and 15 fps, with and without repeating unchanged pictures); or
    /// codec (OpenH264's cost per 720p picture: decoding the clips, encoding with each option);
    /// or rooms (N live rooms of `--rooms-case` in one cohost process, bridges into the
    /// embedded origin, an HTTP-FLV reader each: server CPU per room; the solo cases side by
    /// side with an ffmpeg copy relay into nginx-rtmp); or audience (one room with
    /// `--members` signaling-only audience members chatting and liking, and a co-host pair:
    /// memory per member, CPU, chat fan-out latency, the pair's media latency)
    #[arg(long, default_value = "all")]
    scenario: String,
    /// Audience members in the audience scenario.
    #[arg(long, default_value_t = 10_000)]
    members: usize,
    /// Chat lines per second in the audience scenario (each from another member).
    #[arg(long, default_value_t = 20.0)]
    chat_rate: f64,
    /// Likes per second in the audience scenario, spread over the members.
    #[arg(long, default_value_t = 2000.0)]
    like_rate: f64,
    /// Content of the synthetic clip: camera (a desk camera; default for bridge, solo and
    /// codec), handheld (the same, panning) or noise (default for the SFU scenarios; the
    /// bridge's worst case).
    #[arg(long, value_enum)]
    clip: Option<media::Content>,
    /// Input counts for the bridge scenario.
    #[arg(long, default_value = "1,2,4", value_delimiter = ',')]
    bridge_inputs: Vec<usize>,
    /// Subscriber counts for the fanout scenario.
    #[arg(long, default_value = "1,10,25,50", value_delimiter = ',')]
    subs: Vec<usize>,
    /// Rooms of 4 participants for the cohost scenario; rooms at once for the rooms scenario.
    #[arg(long, default_value_t = 5)]
    rooms: usize,
    /// What each room of the rooms scenario holds.
    #[arg(long, value_enum, default_value = "solo720")]
    rooms_case: rooms::Case,
    /// Rooms scenario: skip the peer run (the nginx-rtmp + ffmpeg relay of the solo cases,
    /// ffmpeg composing the mixed cases).
    #[arg(long)]
    no_relay: bool,
    /// Rooms scenario: the bridges' output size, `WxH` (e.g. 720x1280; the server's
    /// `bridge.width`/`height` with `size_from_host` off), and ffmpeg's canvas for the mixed
    /// cases. Default: the host's size.
    #[arg(long, value_parser = parse_size)]
    rooms_out: Option<(u32, u32)>,
    /// Participants joining in the join scenario.
    #[arg(long, default_value_t = 40)]
    joins: usize,
    /// Joins per second in the join scenario.
    #[arg(long, default_value_t = 10.0)]
    join_rate: f64,
    /// Measurement window per run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Time after everyone receives video before measuring.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Target bitrate of the synthetic H.264 clip.
    #[arg(long, default_value_t = 2_500_000)]
    video_bitrate: u32,
    /// Path of the cohost binary (default: next to this one).
    #[arg(long)]
    cohost_bin: Option<String>,
    /// Path of the janus binary.
    #[arg(long, default_value = "/usr/bin/janus")]
    janus_bin: String,
    /// Address the SFUs and clients use for media (127.0.0.1, or the dummy interface of the
    /// benchmark's network namespace: Janus needs a non-loopback address).
    #[arg(long, default_value = "127.0.0.1")]
    media_ip: std::net::IpAddr,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Serialize, Default)]
struct Result_ {
    target: String,
    scenario: String,
    /// Publishers / subscribers / participants for this run.
    publishers: usize,
    subscribers: usize,
    participants: usize,
    packets_per_sec: f64,
    mbit_per_sec: f64,
    loss_pct: f64,
    latency_p50_ms: f64,
    latency_p95_ms: f64,
    latency_p99_ms: f64,
    audio_latency_p50_ms: f64,
    audio_latency_p99_ms: f64,
    join_first_video_p50_ms: f64,
    join_first_video_p95_ms: f64,
    cpu_us_per_packet: f64,
    cpu_cores: f64,
    rss_mib: f64,
    rss_kib_per_participant: f64,
    /// Client connections whose negotiation started, and those that never connected or
    /// failed later (by the end of the measurement window).
    connections: usize,
    failed_connections: usize,
    /// Participants (room/identity) with at least one failed connection.
    failed_participants: Vec<String>,
    /// False when any participant failed to connect: the numbers are then not comparable
    /// (fewer streams were forwarded) and the run is not a benchmark result.
    valid: bool,
}

impl Result_ {
    /// Record which connections of this scenario failed (see [`pc::connection_report`]).
    fn with_connections(mut self) -> Self {
        let c = pc::connection_report();
        self.connections = c.connections;
        self.failed_connections = c.failed_connections;
        self.failed_participants = c.failed_participants;
        self.valid = self.failed_connections == 0;
        self
    }
}

fn tracks(id: u32) -> (PublishTracks, (u32, u32)) {
    let (a, v) = (rand::random::<u32>() | 1, rand::random::<u32>() | 1);
    let mk = |kind, ssrc, mime: &str, clock, ch, fmtp: &str| {
        Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
            format!("load-{id}"),
            format!("load-{id}-{mime}"),
            "load".to_string(),
            kind,
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    ssrc: Some(ssrc),
                    ..Default::default()
                },
                codec: RTCRtpCodec {
                    mime_type: mime.into(),
                    clock_rate: clock,
                    channels: ch,
                    sdp_fmtp_line: fmtp.into(),
                    rtcp_feedback: vec![],
                },
                ..Default::default()
            }],
        )))
    };
    (
        PublishTracks {
            audio: mk(
                RtpCodecKind::Audio,
                a,
                "audio/opus",
                48000,
                2,
                "minptime=10;useinbandfec=1",
            ),
            video: mk(
                RtpCodecKind::Video,
                v,
                "video/H264",
                90000,
                0,
                "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f",
            ),
        },
        (a, v),
    )
}

struct Publisher {
    joined: Box<dyn Joined>,
    stop: Arc<AtomicBool>,
    pump: tokio::task::JoinHandle<()>,
}

async fn join_publisher(
    t: &dyn Target,
    clip: &Arc<Clip>,
    room: &str,
    identity: &str,
    id: u32,
    sink: Arc<Sink>,
) -> anyhow::Result<Publisher> {
    let (pt, ssrcs) = tracks(id);
    let joined = t.join(room, identity, Some(pt.clone()), sink).await?;
    let pts = joined
        .payload_types()
        .ok_or_else(|| anyhow!("no payload types negotiated"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let pump = media::pump(clip.clone(), pt, ssrcs, pts, stop.clone());
    Ok(Publisher { joined, stop, pump })
}

impl Publisher {
    async fn leave(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.pump.abort();
        self.joined.leave().await;
    }
}

/// Wait until every sink saw video (or the timeout), returning join→first video times in ms.
async fn first_video(sinks: &[Arc<Sink>], timeout: Duration) -> Vec<f64> {
    let deadline = Instant::now() + timeout;
    loop {
        let done: Vec<f64> = sinks
            .iter()
            .filter_map(|s| s.first_video_after_start())
            .map(|d| d.as_secs_f64() * 1000.0)
            .collect();
        if done.len() == sinks.len() || Instant::now() > deadline {
            if done.len() < sinks.len() {
                eprintln!(
                    "  warning: {} of {} receivers got no video",
                    sinks.len() - done.len(),
                    sinks.len()
                );
            }
            return done;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Measure a window over `sinks` and the target's process.
async fn measure(t: &dyn Target, sinks: &[Arc<Sink>], cli: &Cli, rss_base: u64) -> Result_ {
    for s in sinks {
        s.record(true);
    }
    let pid = t.pid();
    let cpu0 = cpu_seconds(pid).unwrap_or(0.0);
    let t0 = Instant::now();
    tokio::time::sleep(cli.duration).await;
    let cpu1 = cpu_seconds(pid).unwrap_or(0.0);
    let secs = t0.elapsed().as_secs_f64();
    for s in sinks {
        s.record(false);
    }
    let rss = rss_bytes(pid).unwrap_or(0);
    let (mut pk, mut by, mut exp) = (0u64, 0u64, 0u64);
    let mut lat: Vec<u32> = vec![];
    let mut alat: Vec<u32> = vec![];
    for s in sinks {
        let w = s.window();
        pk += w.packets;
        by += w.bytes;
        exp += w.expected;
        lat.extend(w.latencies_us);
        alat.extend(w.audio_latencies_us);
    }
    lat.sort_unstable();
    alat.sort_unstable();
    let cpu = cpu1 - cpu0;
    Result_ {
        target: t.name().into(),
        packets_per_sec: pk as f64 / secs,
        mbit_per_sec: by as f64 * 8.0 / secs / 1e6,
        loss_pct: if exp > 0 {
            (exp.saturating_sub(pk)) as f64 * 100.0 / exp as f64
        } else {
            0.0
        },
        latency_p50_ms: percentile(&lat, 0.50) / 1000.0,
        latency_p95_ms: percentile(&lat, 0.95) / 1000.0,
        latency_p99_ms: percentile(&lat, 0.99) / 1000.0,
        audio_latency_p50_ms: percentile(&alat, 0.50) / 1000.0,
        audio_latency_p99_ms: percentile(&alat, 0.99) / 1000.0,
        cpu_us_per_packet: if pk > 0 {
            cpu * 1e6 / pk as f64
        } else {
            f64::NAN
        },
        cpu_cores: cpu / secs,
        rss_mib: rss as f64 / (1024.0 * 1024.0),
        rss_kib_per_participant: rss.saturating_sub(rss_base) as f64 / 1024.0,
        ..Default::default()
    }
}

fn pcts(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| {
        if v.is_empty() {
            f64::NAN
        } else {
            v[((v.len() - 1) as f64 * p).round() as usize]
        }
    };
    (q(0.5), q(0.95))
}

async fn fanout(
    t: &dyn Target,
    clip: &Arc<Clip>,
    subs: usize,
    cli: &Cli,
) -> anyhow::Result<Result_> {
    let room = format!("fanout{subs}");
    pc::reset_tracking();
    let rss_base = rss_bytes(t.pid()).unwrap_or(0);
    let publisher = join_publisher(t, clip, &room, "pub", 1, Arc::new(Sink::new())).await?;
    let mut sinks = vec![];
    let mut joined = vec![];
    // Join in small parallel batches: realistic and quick.
    for chunk in (0..subs).collect::<Vec<_>>().chunks(10) {
        let futs = chunk.iter().map(|i| {
            let sink = Arc::new(Sink::new());
            let room = room.clone();
            async move {
                let j = t.join(&room, &format!("sub{i}"), None, sink.clone()).await;
                (sink, j)
            }
        });
        for (sink, j) in futures::future::join_all(futs).await {
            joined.push(j.context("subscriber join")?);
            sinks.push(sink);
        }
    }
    let (p50, p95) = pcts(first_video(&sinks, Duration::from_secs(30)).await);
    tokio::time::sleep(cli.warmup).await;
    let mut r = measure(t, &sinks, cli, rss_base).await.with_connections();
    r.rss_kib_per_participant /= (subs + 1) as f64;
    r.scenario = "fanout".into();
    r.publishers = 1;
    r.subscribers = subs;
    r.participants = subs + 1;
    r.join_first_video_p50_ms = p50;
    r.join_first_video_p95_ms = p95;
    for j in joined {
        j.leave().await;
    }
    publisher.leave().await;
    Ok(r)
}

async fn cohost_rooms(
    t: &dyn Target,
    clip: &Arc<Clip>,
    rooms: usize,
    cli: &Cli,
) -> anyhow::Result<Result_> {
    pc::reset_tracking();
    let rss_base = rss_bytes(t.pid()).unwrap_or(0);
    let mut pubs = vec![];
    let mut sinks = vec![];
    for r in 0..rooms {
        for p in 0..4 {
            let sink = Arc::new(Sink::new());
            let id = (r * 4 + p + 10) as u32;
            pubs.push(
                join_publisher(
                    t,
                    clip,
                    &format!("cohost{r}"),
                    &format!("p{p}"),
                    id,
                    sink.clone(),
                )
                .await?,
            );
            sinks.push(sink);
        }
    }
    let (p50, p95) = pcts(first_video(&sinks, Duration::from_secs(30)).await);
    tokio::time::sleep(cli.warmup).await;
    let n = rooms * 4;
    let mut r = measure(t, &sinks, cli, rss_base).await.with_connections();
    r.rss_kib_per_participant /= n as f64;
    r.scenario = "cohost".into();
    r.publishers = n;
    r.subscribers = n;
    r.participants = n;
    r.join_first_video_p50_ms = p50;
    r.join_first_video_p95_ms = p95;
    for p in pubs {
        p.leave().await;
    }
    Ok(r)
}

async fn join_scenario(t: &dyn Target, clip: &Arc<Clip>, cli: &Cli) -> anyhow::Result<Result_> {
    pc::reset_tracking();
    let rss_base = rss_bytes(t.pid()).unwrap_or(0);
    let rooms = cli.joins.div_ceil(10).max(1);
    let mut pubs = vec![];
    for r in 0..rooms {
        pubs.push(
            join_publisher(
                t,
                clip,
                &format!("join{r}"),
                "pub",
                100 + r as u32,
                Arc::new(Sink::new()),
            )
            .await?,
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let gap = Duration::from_secs_f64(1.0 / cli.join_rate.max(0.1));
    let start = tokio::time::Instant::now();
    let sinks: Vec<Arc<Sink>> = (0..cli.joins).map(|_| Arc::new(Sink::new())).collect();
    // Each join starts at its slot of the fixed rate; its clock (the sink's) starts then too.
    let futs = sinks.iter().enumerate().map(|(i, sink)| {
        let room = format!("join{}", i % rooms);
        let name = format!("j{i}");
        async move {
            tokio::time::sleep_until(start + gap * i as u32).await;
            sink.reset_start();
            t.join(&room, &name, None, sink.clone()).await
        }
    });
    let mut joined = vec![];
    for j in futures::future::join_all(futs).await {
        joined.push(j?);
    }
    let (p50, p95) = pcts(first_video(&sinks, Duration::from_secs(30)).await);
    let mut r = measure(
        t,
        &sinks,
        &Cli {
            duration: Duration::from_secs(2),
            ..cli.clone()
        },
        rss_base,
    )
    .await
    .with_connections();
    r.scenario = "join".into();
    r.publishers = rooms;
    r.subscribers = cli.joins;
    r.participants = cli.joins + rooms;
    r.rss_kib_per_participant /= r.participants as f64;
    r.join_first_video_p50_ms = p50;
    r.join_first_video_p95_ms = p95;
    for j in joined {
        j.leave().await;
    }
    for p in pubs {
        p.leave().await;
    }
    Ok(r)
}

/// Run the scenarios `cli` asks for; a scenario that could not finish (a join refused, ...) is
/// named in `errors`.
async fn run_all(
    t: &dyn Target,
    clip: &Arc<Clip>,
    cli: &Cli,
    errors: &mut Vec<String>,
) -> Vec<Result_> {
    let mut out = vec![];
    let all = cli.scenario == "all";
    if all || cli.scenario == "fanout" {
        for &s in &cli.subs {
            eprintln!("[{}] fanout, {s} subscribers", t.name());
            match fanout(t, clip, s, cli).await {
                Ok(r) => out.push(r),
                Err(e) => {
                    eprintln!("  failed: {e:#}");
                    errors.push(format!("{} fanout {s}: {e:#}", t.name()));
                }
            }
        }
    }
    if all || cli.scenario == "cohost" {
        eprintln!("[{}] cohost, {} rooms of 4", t.name(), cli.rooms);
        match cohost_rooms(t, clip, cli.rooms, cli).await {
            Ok(r) => out.push(r),
            Err(e) => {
                eprintln!("  failed: {e:#}");
                errors.push(format!("{} cohost: {e:#}", t.name()));
            }
        }
    }
    if all || cli.scenario == "join" {
        eprintln!(
            "[{}] join, {} participants at {}/s",
            t.name(),
            cli.joins,
            cli.join_rate
        );
        match join_scenario(t, clip, cli).await {
            Ok(r) => out.push(r),
            Err(e) => {
                eprintln!("  failed: {e:#}");
                errors.push(format!("{} join: {e:#}", t.name()));
            }
        }
    }
    out
}

fn print(results: &[Result_]) {
    println!(
        "{:<7} {:<7} {:>5} {:>9} {:>7} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8} {:>6} {:>8} {:>7}",
        "target",
        "scen",
        "subs",
        "pkt/s",
        "Mbit/s",
        "loss%",
        "lat p50",
        "lat p95",
        "lat p99",
        "aud p50",
        "aud p99",
        "join p50",
        "join p95",
        "cpu µs/p",
        "cores",
        "KiB/part",
        "failed"
    );
    for r in results {
        println!(
            "{:<7} {:<7} {:>5} {:>9.0} {:>7.1} {:>6.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>9.0} {:>9.0} {:>8.2} {:>6.2} {:>8.0} {:>7}",
            r.target,
            r.scenario,
            r.subscribers,
            r.packets_per_sec,
            r.mbit_per_sec,
            r.loss_pct,
            r.latency_p50_ms,
            r.latency_p95_ms,
            r.latency_p99_ms,
            r.audio_latency_p50_ms,
            r.audio_latency_p99_ms,
            r.join_first_video_p50_ms,
            r.join_first_video_p95_ms,
            r.cpu_us_per_packet,
            r.cpu_cores,
            r.rss_kib_per_participant,
            format!("{}/{}", r.failed_participants.len(), r.participants)
        );
    }
}

/// Say loudly which runs are not benchmark results: any participant that failed to connect,
/// or a scenario that could not finish. Returns whether every run is valid.
fn print_validity(results: &[Result_], errors: &[String]) -> bool {
    let mut valid = errors.is_empty();
    for r in results.iter().filter(|r| !r.valid) {
        valid = false;
        println!(
            "\nNOT A VALID BENCHMARK RESULT: {} {} ({} subs): {} of {} participants failed to \
             connect ({} of {} connections): {}",
            r.target,
            r.scenario,
            r.subscribers,
            r.failed_participants.len(),
            r.participants,
            r.failed_connections,
            r.connections,
            r.failed_participants.join(", ")
        );
    }
    for e in errors {
        println!("\nNOT A VALID BENCHMARK RESULT: scenario did not finish: {e}");
    }
    if valid {
        println!("\nall participants connected: valid benchmark result");
    }
    valid
}

fn print_ratios(results: &[Result_]) {
    println!("\ncohost / janus (lower is better for cohost):");
    println!(
        "{:<7} {:>5} {:>12} {:>12} {:>12} {:>12}",
        "scen", "subs", "cpu/packet", "lat p50", "lat p99", "join p50"
    );
    for c in results.iter().filter(|r| r.target == "cohost") {
        if let Some(j) = results.iter().find(|r| {
            r.target == "janus" && r.scenario == c.scenario && r.subscribers == c.subscribers
        }) {
            println!(
                "{:<7} {:>5} {:>12.2} {:>12.2} {:>12.2} {:>12.2}",
                c.scenario,
                c.subscribers,
                c.cpu_us_per_packet / j.cpu_us_per_packet,
                c.latency_p50_ms / j.latency_p50_ms,
                c.latency_p99_ms / j.latency_p99_ms,
                c.join_first_video_p50_ms / j.join_first_video_p50_ms
            );
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let cohost_bin = match &cli.cohost_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .with_file_name("cohost")
            .to_string_lossy()
            .into_owned(),
    };
    if cli.scenario == "rooms" {
        return rooms_main(&cli, &cohost_bin).await;
    }
    if cli.scenario == "audience" {
        return audience_main(&cli, &cohost_bin).await;
    }
    let bridge = matches!(cli.scenario.as_str(), "bridge" | "solo" | "codec");
    let content = cli.clip.unwrap_or(if bridge {
        media::Content::Camera
    } else {
        media::Content::Noise
    });
    let clip = load_clip(content, cli.video_bitrate, bridge).await?;
    if cli.scenario == "codec" {
        // Decoding is measured on every kind of clip; encoding on `--clip`'s pictures.
        let mut clips = vec![];
        for c in [
            media::Content::Camera,
            media::Content::Handheld,
            media::Content::Noise,
        ] {
            clips.push((
                c,
                if c == content {
                    clip.clone()
                } else {
                    load_clip(c, cli.video_bitrate, true).await?
                },
            ));
        }
        let b = cli.video_bitrate;
        return tokio::task::spawn_blocking(move || codec_bench::run(&clips, content, b)).await?;
    }
    if cli.scenario == "bridge" || cli.scenario == "solo" {
        let results = if cli.scenario == "solo" {
            bridge_bench::solo(&clip, cli.warmup, cli.duration).await
        } else {
            // The co-hosts' low simulcast layer: what a pip tile (320x180) needs, at about
            // the bitrate a browser gives its quarter-size layer.
            let small =
                load_clip_sized(content, (cli.video_bitrate / 16).max(100_000), 320, 180).await?;
            bridge_bench::run(
                &clip,
                Some(&small),
                &cli.bridge_inputs,
                cli.warmup,
                cli.duration,
                cli.target != "cohost",
            )
            .await
        };
        println!(
            "\ncohost-load bridge on {} cores, {}; window {:?} per run",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            chrono_like_now(),
            cli.duration
        );
        bridge_bench::print(&results);
        if let Some(p) = &cli.json {
            std::fs::write(p, serde_json::to_string_pretty(&results)?)?;
        }
        return Ok(());
    }
    let mut results = vec![];
    let mut errors = vec![];
    if cli.target == "cohost" || cli.target == "both" {
        let t = cohost_target::CohostTarget::start(&cohost_bin, cli.media_ip).await?;
        results.extend(run_all(&t, &clip, &cli, &mut errors).await);
        t.shutdown().await;
    }
    if cli.target == "janus" || cli.target == "both" {
        let t = janus::JanusTarget::start(&cli.janus_bin, cli.media_ip).await?;
        results.extend(run_all(&t, &clip, &cli, &mut errors).await);
        t.shutdown().await;
    }
    println!(
        "\ncohost-load on {} cores, {}; window {:?} per run",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        chrono_like_now(),
        cli.duration
    );
    print(&results);
    if results.iter().any(|r| r.target == "janus") && results.iter().any(|r| r.target == "cohost") {
        print_ratios(&results);
    }
    let valid = print_validity(&results, &errors);
    if let Some(p) = &cli.json {
        std::fs::write(p, serde_json::to_string_pretty(&results)?)?;
    }
    if !valid {
        // Scripts comparing runs must not take this one for a result.
        std::process::exit(2);
    }
    Ok(())
}

fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s.split_once('x').ok_or("WxH, e.g. 720x1280")?;
    let n = |v: &str| v.parse::<u32>().map_err(|e| format!("{v}: {e}"));
    let (w, h) = (n(w)?, n(h)?);
    if w < 16 || h < 16 || w % 2 == 1 || h % 2 == 1 {
        return Err("even sizes of at least 16".into());
    }
    Ok((w, h))
}

/// `--scenario rooms`: cohost, then the relay (solo cases) or ffmpeg composing the same rooms
/// (mixed cases); a table; exit 2 if not valid.
async fn rooms_main(cli: &Cli, cohost_bin: &str) -> anyhow::Result<()> {
    let o = rooms::Opts {
        case: cli.rooms_case,
        rooms: cli.rooms,
        warmup: cli.warmup,
        window: cli.duration,
        relay: !cli.no_relay && cli.rooms_case.is_solo(),
        out: cli.rooms_out,
        content: cli.clip.unwrap_or(media::Content::Camera),
    };
    if o.rooms == 0 || (o.case == rooms::Case::Pk && !o.rooms.is_multiple_of(2)) {
        return Err(anyhow!("--rooms: at least 1 (an even number for pk)"));
    }
    let mut results = vec![];
    let mut errors = vec![];
    if cli.target != "janus" {
        eprintln!("[cohost] rooms, {} x {:?}", o.rooms, o.case);
        let size = o.out.map(|(w, h)| (w.to_string(), h.to_string()));
        let env: Vec<(&str, &str)> = match &size {
            Some((w, h)) => vec![
                ("COHOST_BRIDGE__WIDTH", w.as_str()),
                ("COHOST_BRIDGE__HEIGHT", h.as_str()),
                ("COHOST_BRIDGE__SIZE_FROM_HOST", "false"),
            ],
            None => vec![],
        };
        let t = cohost_target::CohostTarget::start_with(cohost_bin, cli.media_ip, &env).await?;
        match rooms::cohost(&t, &o).await {
            Ok(r) => results.push(r),
            Err(e) => {
                eprintln!("  failed: {e:#}");
                errors.push(format!("cohost rooms: {e:#}"));
            }
        }
        t.shutdown().await;
    }
    if !cli.no_relay && !o.case.is_solo() {
        eprintln!("[ffmpeg] {} rooms composed by ffmpeg (libx264)", o.rooms);
        match rooms_mix::ffmpeg_mix(&o).await {
            Ok(r) => results.push(r),
            Err(e) => {
                eprintln!("  failed: {e:#}");
                errors.push(format!("ffmpeg mix: {e:#}"));
            }
        }
    }
    if o.relay {
        eprintln!("[relay] {} ffmpeg -c copy streams into nginx-rtmp", o.rooms);
        match rooms::relay(&o).await {
            Ok(r) => results.push(r),
            Err(e) => {
                eprintln!("  failed: {e:#}");
                errors.push(format!("relay: {e:#}"));
            }
        }
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "
cohost-load rooms on {} cores, {}; warm-up {:?}, window {:?}; load average at the \
         end: {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        chrono_like_now(),
        cli.warmup,
        cli.duration,
        load.trim()
    );
    rooms::print(&results);
    let valid = rooms::print_validity(&results, &errors);
    if let Some(p) = &cli.json {
        std::fs::write(p, serde_json::to_string_pretty(&results)?)?;
    }
    if !valid {
        std::process::exit(2);
    }
    Ok(())
}

/// `--scenario audience`: one run against cohost; exit 2 if not valid.
async fn audience_main(cli: &Cli, cohost_bin: &str) -> anyhow::Result<()> {
    let clip = load_clip(
        cli.clip.unwrap_or(media::Content::Noise),
        cli.video_bitrate,
        false,
    )
    .await?;
    let o = audience::Opts {
        members: cli.members,
        chat_rate: cli.chat_rate,
        like_rate: cli.like_rate,
        warmup: cli.warmup,
        window: cli.duration,
    };
    eprintln!(
        "[cohost] audience: {} members, {} chat lines/s, {} likes/s",
        o.members, o.chat_rate, o.like_rate
    );
    let r = audience::run(cohost_bin, &o, &clip).await?;
    println!(
        "\ncohost-load audience on {} cores, {}; window {:?}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        chrono_like_now(),
        cli.duration
    );
    audience::print(&r);
    if let Some(p) = &cli.json {
        std::fs::write(p, serde_json::to_string_pretty(&r)?)?;
    }
    if r.failed > 0 || r.chat_incomplete > 0 {
        std::process::exit(2);
    }
    Ok(())
}

/// Encode the synthetic clip (`every_frame`: a picture in every frame, for the bridge).
async fn load_clip(
    content: media::Content,
    bitrate: u32,
    every_frame: bool,
) -> anyhow::Result<Arc<Clip>> {
    eprintln!("encoding the synthetic clip ({content:?}, {bitrate} bit/s asked)...");
    let clip =
        tokio::task::spawn_blocking(move || media::make_clip(content, bitrate, 4, every_frame))
            .await??;
    let pictures = clip.frames.iter().filter(|f| !f.annexb.is_empty()).count();
    eprintln!(
        "clip: {} frames ({} with a picture), {:.2} Mbit/s, {:.1} packets/frame",
        clip.frames.len(),
        pictures,
        clip.video_bps / 1e6,
        clip.frames.iter().map(|f| f.payloads.len()).sum::<usize>() as f64
            / clip.frames.len() as f64
    );
    Ok(Arc::new(clip))
}

async fn load_clip_sized(
    content: media::Content,
    bitrate: u32,
    w: usize,
    h: usize,
) -> anyhow::Result<Arc<Clip>> {
    eprintln!("encoding the {w}x{h} clip ({content:?}, {bitrate} bit/s asked)...");
    let clip = tokio::task::spawn_blocking(move || {
        media::make_clip_sized(content, bitrate, 4, true, w, h)
    })
    .await??;
    Ok(Arc::new(clip))
}

fn chrono_like_now() -> String {
    let out = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
