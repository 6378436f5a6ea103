//! `--scenario bridge`: the cost of the bridge, side by side with ffmpeg doing the same job.
//!
//! cohost: the bridge pipeline runs in this process on a room of N participants whose tracks
//! are fed in real time, through the same `TrackRouter` interface the SFU uses, with the
//! synthetic 720p30 H.264 clip and Opus audio. It decodes every input, mixes, composites the
//! `pip` layout, encodes H.264 + AAC and publishes FLV into an origin. Measured over the window:
//! this process's CPU time per output second (the feeder only copies pre-packetized packets),
//! output frame rate, and the pipeline latency the bridge reports (input picture's last packet
//! received to the frame showing it handed to the origin).
//!
//! Simulcast (`cohost-simulcast`): the co-hosts publish two layers, a 320x180 clip ("q") and
//! the 720p one ("f"); the bridge asks for the smallest layer that covers each pip tile
//! (320x180) and decodes q. The feeder sends both layers (its copying is in the measured CPU).
//! Its ffmpeg peer (`ffmpeg-small`) gets the 320x180 clip for the co-hosts, so both decode the
//! same small pictures.
//!
//! ffmpeg: the same clip as N inputs (`-re`, looped; remuxed to Matroska) plus N tone WAVs (PCM, so ffmpeg
//! decodes no audio: slightly in its favour), the same pip composite with `overlay` and
//! `amix`, libx264 `veryfast` + `zerolatency`, AAC, FLV to /dev/null. Measured: the ffmpeg
//! process's CPU time per output second, from /proc, over the same window.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use serde::Serialize;

use cohost::auth::Role;
use cohost::bridge::pipeline::{Bridge, BridgeConfig};
use cohost::config::RoomConfig;
use cohost::room::{Registry, new_track_id};
use cohost::rtmp::origin::Origin;
use cohost::sfu::{CodecSpec, Packet, TrackRouter};
use cohost::signaling::protocol::Kind;

use crate::media::{Clip, FPS};
use crate::stats::{cpu_seconds, rss_bytes};

#[derive(Debug, Clone, Serialize)]
pub struct BridgeResult {
    pub tool: String,
    pub inputs: usize,
    /// Frames per second each input sends.
    pub input_fps: u32,
    /// CPU seconds (all cores) per second of output.
    pub cpu_per_output_second: f64,
    pub output_fps: f64,
    /// Output frames per second one core could sustain at this cost (fps / CPU share).
    pub fps_per_core: f64,
    /// Share of output frames sent as repeated (skipped) pictures.
    pub repeated_share: f64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
    pub rss_mb: f64,
    /// FLV output (audio + video tag bodies) over the window, Mbit/s: both sides are asked for
    /// 2.5 Mbit/s of video and 128 kbit/s of audio, and this shows they delivered it.
    pub output_mbit: f64,
}

/// Feed one participant's tracks in real time until `stop`. `layers`: the video's clips, low →
/// high (one for a plain track; a simulcast track gets each on its layer, its own SSRC and
/// sequence numbers).
async fn feed(
    layers: Vec<Arc<Clip>>,
    video: Arc<TrackRouter>,
    audio: Arc<TrackRouter>,
    input_fps: u32,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let start = Instant::now();
    let Some(clip) = layers.last().cloned() else {
        return;
    };
    let mut vseq = vec![0u16; layers.len()];
    let (mut aseq, mut n, mut frame) = (0u16, 0u32, 0u32);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let mut p = Packet::default();
        p.header.version = 2;
        p.header.sequence_number = aseq;
        p.header.timestamp = n * 960;
        p.payload = clip.opus[n as usize % clip.opus.len()].clone();
        audio.forward(p);
        aseq = aseq.wrapping_add(1);
        n += 1;
        // Slower senders (phones at 15 fps) send the clip's frames further apart.
        let due = (start.elapsed().as_micros() * u128::from(input_fps) / 1_000_000) as u32;
        while frame <= due {
            for (l, layer) in layers.iter().enumerate() {
                let f = &layer.frames[frame as usize % layer.frames.len()];
                let last = f.payloads.len().saturating_sub(1);
                for (k, payload) in f.payloads.iter().enumerate() {
                    let mut p = Packet::default();
                    p.header.version = 2;
                    p.header.ssrc = 1000 + l as u32;
                    p.header.sequence_number = vseq[l];
                    p.header.timestamp = frame * (90_000 / input_fps.max(1));
                    p.header.marker = k == last;
                    p.payload = payload.clone();
                    if layers.len() > 1 {
                        video.forward_layer(p, l as u8);
                    } else {
                        video.forward(p);
                    }
                    vseq[l] = vseq[l].wrapping_add(1);
                }
            }
            frame += 1;
        }
    }
}

fn pid() -> u32 {
    std::process::id()
}

/// The bridge with `n` inputs sending `input_fps`; `solo_repeat`: the solo path's repeats;
/// `small`: co-hosts publish simulcast, this clip as the low layer under `clip`.
pub async fn cohost(
    clip: &Arc<Clip>,
    small: Option<&Arc<Clip>>,
    n: usize,
    input_fps: u32,
    solo_repeat: bool,
    warmup: Duration,
    window: Duration,
) -> anyhow::Result<BridgeResult> {
    let registry = Registry::new(RoomConfig::default());
    let name = format!("bench{n}");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut keep = vec![];
    let mut room = None;
    for i in 0..n {
        let (tx, rx) = cohost::room::event_channel();
        let role = if i == 0 { Role::Host } else { Role::Cohost };
        let (r, snap) = registry
            .join(&name, &format!("p{i}"), role, tx)
            .map_err(|e| anyhow!("join: {e}"))?;
        let pid = snap.participant.id.clone();
        let codec = |mime: &str, rate, ch| CodecSpec {
            mime_type: mime.into(),
            clock_rate: rate,
            channels: ch,
            fmtp: String::new(),
        };
        let layers = match small {
            Some(small) if i > 0 => vec![small.clone(), clip.clone()],
            _ => vec![clip.clone()],
        };
        let rids = if layers.len() > 1 {
            vec!["q".to_string(), "f".to_string()]
        } else {
            vec![]
        };
        let (video, kf1) = TrackRouter::with_layers(
            new_track_id(),
            pid.clone(),
            Kind::Video,
            codec("video/H264", 90_000, 0),
            rids,
        );
        let (audio, kf2) = TrackRouter::new(
            new_track_id(),
            pid.clone(),
            Kind::Audio,
            codec("audio/opus", 48_000, 2),
        );
        r.publish(&pid, video.clone())
            .map_err(|e| anyhow!("publish: {e}"))?;
        r.publish(&pid, audio.clone())
            .map_err(|e| anyhow!("publish: {e}"))?;
        tokio::spawn(feed(layers, video, audio, input_fps, stop_rx.clone()));
        keep.push((rx, kf1, kf2));
        room = Some(r);
    }
    let room = room.context("no inputs")?;
    let config = BridgeConfig {
        solo_repeat,
        ..BridgeConfig::default()
    };
    let fps = f64::from(config.fps);
    let origin = Origin::new();
    let bridge = Bridge::start(room, origin.clone(), config).map_err(|e| anyhow!(e))?;
    tokio::time::sleep(warmup).await;
    // Count what a player of the origin receives during the window.
    let mut player = origin.play(&name).map_err(|e| anyhow!("play: {e}"))?;
    let counted = tokio::spawn(async move {
        let mut bytes = 0usize;
        while let Some(tag) = player.rx.recv().await {
            bytes += tag.body.len();
        }
        bytes
    });
    let (c0, f0, r0, t0) = (
        cpu_seconds(pid()).unwrap_or(0.0),
        bridge.stats().video_frames,
        bridge.stats().repeated_frames,
        Instant::now(),
    );
    tokio::time::sleep(window).await;
    let (c1, f1, secs) = (
        cpu_seconds(pid()).unwrap_or(0.0),
        bridge.stats().video_frames,
        t0.elapsed().as_secs_f64(),
    );
    let stats = bridge.stats();
    eprintln!(
        "  frames {} new pictures {} repeated {} dropped by the rate control {}",
        stats.video_frames, stats.new_pictures, stats.repeated_frames, stats.dropped_pictures
    );
    if small.is_some() {
        let layers: Vec<String> = stats
            .video_inputs
            .iter()
            .map(|i| i.layer.clone().unwrap_or_else(|| "plain".into()))
            .collect();
        eprintln!("  layers decoded: {layers:?}");
    }
    let rss = rss_bytes(pid()).unwrap_or(0) as f64 / 1e6;
    drop(bridge);
    let _ = stop_tx.send(true);
    let output_mbit = counted.await.unwrap_or(0) as f64 * 8.0 / secs / 1e6;
    let cpu = (c1 - c0) / secs;
    let output_fps = (f1 - f0) as f64 / secs;
    Ok(BridgeResult {
        tool: match (n, solo_repeat) {
            (1, true) => "cohost-solo",
            (1, false) => "cohost-encode-all",
            _ if small.is_some() => "cohost-simulcast",
            _ => "cohost",
        }
        .into(),
        inputs: n,
        input_fps,
        cpu_per_output_second: cpu,
        output_fps,
        fps_per_core: if cpu > 0.0 { fps / cpu } else { f64::NAN },
        repeated_share: (stats.repeated_frames - r0) as f64 / ((f1 - f0).max(1)) as f64,
        latency_p50_ms: stats.latency_ms_p50,
        latency_p95_ms: stats.latency_ms_p95,
        rss_mb: rss,
        output_mbit,
    })
}

/// ffmpeg's video encoder in the comparison: libx264 as live encoders run it (no lookahead,
/// no B-frames), at the bridge's bitrate and GOP.
pub const X264: [&str; 16] = [
    "-c:v",
    "libx264",
    "-preset",
    "veryfast",
    "-tune",
    "zerolatency",
    "-b:v",
    "2500k",
    "-maxrate",
    "2500k",
    "-bufsize",
    "5000k",
    "-g",
    "60",
    "-bf",
    "0",
];

/// A mono 16-bit WAV of a tone, for ffmpeg's audio inputs.
pub(crate) fn write_wav(path: &Path, hz: f64, secs: u32) -> std::io::Result<()> {
    let rate = 48_000u32;
    let samples: Vec<i16> = (0..rate * secs)
        .map(|i| {
            ((f64::from(i) / f64::from(rate) * hz * std::f64::consts::TAU).sin() * 8000.0) as i16
        })
        .collect();
    let data = (samples.len() * 2) as u32;
    let mut out = Vec::with_capacity(44 + data as usize);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&(rate * 2).to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data.to_le_bytes());
    for s in samples {
        out.extend_from_slice(&s.to_le_bytes());
    }
    std::fs::write(path, out)
}

/// The `pip` layout of the bridge (1280x720: host full frame, others 320x180 stacked up from
/// the bottom-right corner with an 18 px margin) as an ffmpeg filter graph.
fn pip_graph(n: usize) -> String {
    let mut g = String::from("[0:v]scale=1280:720,setsar=1[b0];");
    let mut y = 720 - 18 - 180;
    for i in 1..n {
        g += &format!(
            "[{i}:v]scale=320:180[s{i}];[b{p}][s{i}]overlay=x=942:y={y}[b{i}];",
            p = i - 1
        );
        y -= 198;
    }
    g += &format!("[b{}]null[v];", n - 1);
    let audio: String = (0..n).map(|i| format!("[{}:a]", n + i)).collect();
    if n > 1 {
        g += &format!("{audio}amix=inputs={n}:normalize=0[a]");
    } else {
        g += &format!("{audio}anull[a]");
    }
    g
}

/// The last `key=` value ffmpeg wrote to its progress file (`frame`, `total_size`).
pub(crate) fn progress_value(path: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let prefix = format!("{key}=");
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse().ok())
}

/// ffmpeg cannot loop a raw Annex-B stream (no seeking): wrap the clip in Matroska once.
pub(crate) async fn clip_mkv(clip: &Clip, dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let mkv = dir.join(format!("{name}.mkv"));
    if !mkv.exists() {
        let h264 = dir.join(format!("{name}.h264"));
        let all: Vec<u8> = clip
            .frames
            .iter()
            .flat_map(|f| f.annexb.iter().copied())
            .collect();
        std::fs::write(&h264, all)?;
        write_wav(&dir.join("tone.wav"), 440.0, 4)?;
        let out = tokio::process::Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-y", "-f", "h264"])
            .args(["-framerate", "30", "-i"])
            .arg(&h264)
            .args(["-c", "copy"])
            .arg(&mkv)
            .output()
            .await?;
        if !out.status.success() {
            return Err(anyhow!(
                "ffmpeg remux: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(mkv)
}

/// ffmpeg composing `videos` (each `-re`, looped) with one looped `tone` per video through
/// `graph` (inputs `0..n` video, `n..2n` audio; outputs `[v]`, `[a]`), encoding libx264
/// ([`X264`]) and AAC to FLV on /dev/null, its progress written to `progress`.
pub(crate) fn composite_command(
    videos: &[&Path],
    tone: &Path,
    graph: &str,
    progress: &Path,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("ffmpeg");
    cmd.args(["-hide_banner", "-loglevel", "error", "-nostats", "-y"]);
    for v in videos {
        cmd.args(["-re", "-stream_loop", "-1", "-i"]).arg(v);
    }
    for _ in videos {
        cmd.args(["-re", "-stream_loop", "-1", "-i"]).arg(tone);
    }
    cmd.args(["-filter_complex", graph, "-map", "[v]", "-map", "[a]"])
        .args(X264)
        .args(["-pix_fmt", "yuv420p", "-r", "30"])
        .args(["-c:a", "aac", "-b:a", "128k", "-ar", "48000", "-ac", "2"])
        .arg("-progress")
        .arg(progress)
        .args(["-f", "flv", "/dev/null"])
        .kill_on_drop(true);
    cmd
}

/// `small`: the co-hosts' inputs are this clip (the layer the simulcast bridge decodes).
pub async fn ffmpeg(
    clip: &Clip,
    small: Option<&Clip>,
    n: usize,
    warmup: Duration,
    window: Duration,
    dir: &Path,
) -> anyhow::Result<BridgeResult> {
    let mkv = clip_mkv(clip, dir, "clip").await?;
    let small_mkv = match small {
        Some(s) => Some(clip_mkv(s, dir, "clip-small").await?),
        None => None,
    };
    let progress = dir.join(format!("progress-{n}.txt"));
    let _ = std::fs::remove_file(&progress);
    let videos: Vec<&Path> = (0..n)
        .map(|i| match &small_mkv {
            Some(s) if i > 0 => s.as_path(),
            _ => mkv.as_path(),
        })
        .collect();
    let mut cmd = composite_command(&videos, &dir.join("tone.wav"), &pip_graph(n), &progress);
    let mut child = cmd.spawn().context("ffmpeg (Debian's, with libx264)")?;
    let fpid = child.id().context("ffmpeg pid")?;
    tokio::time::sleep(warmup).await;
    let (c0, f0, b0, t0) = (
        cpu_seconds(fpid).unwrap_or(0.0),
        progress_value(&progress, "frame").unwrap_or(0),
        progress_value(&progress, "total_size").unwrap_or(0),
        Instant::now(),
    );
    tokio::time::sleep(window).await;
    let (c1, f1, b1, secs) = (
        cpu_seconds(fpid).unwrap_or(0.0),
        progress_value(&progress, "frame").unwrap_or(0),
        progress_value(&progress, "total_size").unwrap_or(0),
        t0.elapsed().as_secs_f64(),
    );
    let rss = rss_bytes(fpid).unwrap_or(0) as f64 / 1e6;
    if let Ok(Some(status)) = child.try_wait() {
        return Err(anyhow!("ffmpeg exited early: {status}"));
    }
    let _ = child.kill().await;
    let cpu = (c1 - c0) / secs;
    Ok(BridgeResult {
        tool: if small.is_some() {
            "ffmpeg-small"
        } else {
            "ffmpeg"
        }
        .into(),
        inputs: n,
        input_fps: FPS,
        cpu_per_output_second: cpu,
        // Progress is written about twice a second: the rate over the window is close.
        output_fps: (f1.saturating_sub(f0)) as f64 / secs,
        repeated_share: 0.0,
        fps_per_core: if cpu > 0.0 { 30.0 / cpu } else { f64::NAN },
        latency_p50_ms: None,
        latency_p95_ms: None,
        rss_mb: rss,
        // FLV file size (tag headers included: about 1 % more than the tag bodies).
        output_mbit: b1.saturating_sub(b0) as f64 * 8.0 / secs / 1e6,
    })
}

/// `small`: also measure simulcast co-hosts (this clip as their low layer) against ffmpeg fed
/// the same small clip.
pub async fn run(
    clip: &Arc<Clip>,
    small: Option<&Arc<Clip>>,
    inputs: &[usize],
    warmup: Duration,
    window: Duration,
    with_ffmpeg: bool,
) -> Vec<BridgeResult> {
    let dir: PathBuf = std::env::temp_dir().join(format!("cohost-bridge-bench-{}", pid()));
    let _ = std::fs::create_dir_all(&dir);
    let mut out = vec![];
    for &n in inputs {
        // Simulcast changes nothing for a host alone (it gets the top layer).
        let variants: Vec<Option<&Arc<Clip>>> = match small {
            Some(s) if n > 1 => vec![None, Some(s)],
            _ => vec![None],
        };
        for &small in &variants {
            let what = if small.is_some() {
                " (simulcast co-hosts)"
            } else {
                ""
            };
            eprintln!("[bridge] cohost, {n} inputs{what}");
            match cohost(clip, small, n, FPS, true, warmup, window).await {
                Ok(r) => out.push(r),
                Err(e) => eprintln!("  failed: {e:#}"),
            }
            if !with_ffmpeg {
                continue;
            }
            let what = if small.is_some() {
                " (small co-host inputs)"
            } else {
                ""
            };
            eprintln!("[bridge] ffmpeg, {n} inputs{what}");
            match ffmpeg(clip, small.map(|s| s.as_ref()), n, warmup, window, &dir).await {
                Ok(r) => out.push(r),
                Err(e) => eprintln!("  failed: {e:#}"),
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    out
}

/// The solo path's cost: the host alone at 30 and 15 fps, with and without repeats.
pub async fn solo(clip: &Arc<Clip>, warmup: Duration, window: Duration) -> Vec<BridgeResult> {
    let mut out = vec![];
    for input_fps in [FPS, FPS / 2] {
        for repeat in [false, true] {
            eprintln!("[bridge] solo host at {input_fps} fps, repeats {repeat}");
            match cohost(clip, None, 1, input_fps, repeat, warmup, window).await {
                Ok(r) => out.push(r),
                Err(e) => eprintln!("  failed: {e:#}"),
            }
        }
    }
    out
}

pub fn print(results: &[BridgeResult]) {
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    println!(
        "\n{:<17} {:>6} {:>6} {:>14} {:>10} {:>9} {:>12} {:>9} {:>9} {:>8} {:>8}",
        "bridge",
        "inputs",
        "in fps",
        "CPU s/out s",
        "out fps",
        "repeated",
        "fps/core",
        "lat p50",
        "lat p95",
        "RSS MB",
        "out Mb/s"
    );
    for r in results {
        println!(
            "{:<17} {:>6} {:>6} {:>14.3} {:>10.1} {:>8.0}% {:>12.1} {:>9} {:>9} {:>8.0} {:>8.2}",
            r.tool,
            r.inputs,
            r.input_fps,
            r.cpu_per_output_second,
            r.output_fps,
            r.repeated_share * 100.0,
            r.fps_per_core,
            ms(r.latency_p50_ms),
            ms(r.latency_p95_ms),
            r.rss_mb,
            r.output_mbit
        );
    }
    for c in results.iter().filter(|r| r.tool.starts_with("cohost")) {
        // The simulcast bridge against ffmpeg fed full-size inputs and the same small ones.
        let peers: &[&str] = if c.tool == "cohost-simulcast" {
            &["ffmpeg", "ffmpeg-small"]
        } else {
            &["ffmpeg"]
        };
        for peer in peers {
            if let Some(f) = results
                .iter()
                .find(|r| r.tool == *peer && r.inputs == c.inputs)
            {
                println!(
                    "ratio {}/{}, {} inputs: CPU {:.2}",
                    c.tool,
                    f.tool,
                    c.inputs,
                    c.cpu_per_output_second / f.cpu_per_output_second
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pip_graph_matches_the_bridge_layout() {
        use cohost::bridge::layout::{Layout, tiles};
        let t = tiles(Layout::Pip, 4, 1280, 720);
        let g = pip_graph(4);
        for r in &t[1..] {
            assert!(
                g.contains(&format!("overlay=x={}:y={}", r.x, r.y)),
                "{r:?} in {g}"
            );
            assert_eq!((r.w, r.h), (320, 180));
        }
        assert!(g.ends_with("[4:a][5:a][6:a][7:a]amix=inputs=4:normalize=0[a]"));
        assert!(pip_graph(1).ends_with("[1:a]anull[a]"));
    }
}
