//! `--scenario codec`: what one 720p picture costs OpenH264, the bridge's codec, on this
//! machine: decoding each synthetic clip, and encoding the camera-like pictures at the bridge's
//! output settings with each of the encoder options that trade speed for compression. Prints
//! milliseconds of CPU per picture (this process, all threads), the bitrate that came out and
//! the luma PSNR against the source, so a faster setting's price in quality shows next to it.

use std::time::Instant;

use cohost::bridge::compose::I420;
use openh264::decoder::Decoder;
use openh264::encoder::{
    BitRate, Complexity, Encoder, EncoderConfig, FrameRate, IntraFramePeriod, RateControlMode,
};
use openh264::formats::YUVBuffer;

use crate::media::{Clip, Content, FPS, picture};

/// Rounds per variant (the fastest is kept).
const ROUNDS: usize = 4;

/// Process CPU seconds (user + system, all threads, ended ones included), from /proc: 10 ms
/// resolution, about 1 % of one variant's run.
fn cpu_now() -> f64 {
    crate::stats::cpu_seconds(std::process::id()).unwrap_or(0.0)
}

/// Decode every frame of `clip`, `rounds` times; CPU ms per picture of the fastest round.
fn decode_cost(clip: &Clip, rounds: usize) -> anyhow::Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..rounds {
        let mut pictures = 0usize;
        let c0 = cpu_now();
        let mut dec = Decoder::new()?;
        for f in &clip.frames {
            if dec.decode(&f.annexb)?.is_some() {
                pictures += 1;
            }
        }
        best = best.min((cpu_now() - c0) * 1e3 / pictures.max(1) as f64);
    }
    Ok(best)
}

fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let se: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| {
            let d = f64::from(*x) - f64::from(*y);
            d * d
        })
        .sum();
    let mse = se / a.len().max(1) as f64;
    if mse == 0.0 {
        99.0
    } else {
        10.0 * (255.0 * 255.0 / mse).log10()
    }
}

struct EncodeResult {
    ms_per_picture: f64,
    wall_ms_per_picture: f64,
    mbit: f64,
    psnr_y: f64,
    /// Pictures the encoder dropped (only with frame skipping on).
    skipped: usize,
}

fn encode_cost(
    config: EncoderConfig,
    pictures: &[Vec<u8>],
    bitrate: u32,
) -> anyhow::Result<EncodeResult> {
    let (stream, cpu, wall) = encode_pictures(config, pictures, bitrate)?;
    let bytes: usize = stream.iter().map(Vec::len).sum();
    let count = pictures.len() as f64;
    Ok(EncodeResult {
        ms_per_picture: cpu * 1e3 / count,
        wall_ms_per_picture: wall * 1e3 / count,
        mbit: bytes as f64 * 8.0 / (count / f64::from(FPS)) / 1e6,
        psnr_y: psnr_y(&stream, pictures)?,
        skipped: stream.iter().filter(|s| s.is_empty()).count(),
    })
}

/// The encoding alone, timed without the PSNR check: the stream, CPU and wall seconds.
fn encode_pictures(
    config: EncoderConfig,
    pictures: &[Vec<u8>],
    bitrate: u32,
) -> anyhow::Result<(Vec<Vec<u8>>, f64, f64)> {
    let (w, h) = (1280usize, 720usize);
    let config = config
        .bitrate(BitRate::from_bps(bitrate))
        .max_frame_rate(FrameRate::from_hz(FPS as f32))
        .intra_frame_period(IntraFramePeriod::from_num_frames(FPS * 2));
    let mut enc = Encoder::with_api_config(openh264::OpenH264API::from_source(), config)?;
    let bufs: Vec<YUVBuffer> = pictures
        .iter()
        .map(|p| YUVBuffer::from_vec(p.clone(), w, h))
        .collect();
    let mut stream = vec![];
    let (c0, t0) = (cpu_now(), Instant::now());
    for b in &bufs {
        stream.push(enc.encode(b)?.to_vec());
    }
    Ok((stream, cpu_now() - c0, t0.elapsed().as_secs_f64()))
}

/// Mean luma PSNR of the decoded stream against its source pictures.
fn psnr_y(stream: &[Vec<u8>], pictures: &[Vec<u8>]) -> anyhow::Result<f64> {
    let mut dec = Decoder::new()?;
    let (mut sum, mut n) = (0.0, 0usize);
    for (bs, src) in stream.iter().zip(pictures) {
        if let Some(img) = dec.decode(bs)? {
            let y = I420::from_yuv(&img).y;
            sum += psnr(&y, &src[..y.len()]);
            n += 1;
        }
    }
    Ok(sum / n.max(1) as f64)
}

pub fn run(
    clips: &[(Content, std::sync::Arc<Clip>)],
    content: Content,
    bitrate: u32,
) -> anyhow::Result<()> {
    println!("\nOpenH264 decode, 1280x720 (CPU ms per picture, fastest of {ROUNDS})");
    for (c, clip) in clips {
        println!(
            "  {:<10} {:>6.2} Mbit/s  {:>6.2} ms",
            format!("{c:?}"),
            clip.video_bps / 1e6,
            decode_cost(clip, ROUNDS)?
        );
    }
    let pictures: Vec<Vec<u8>> = (0..(FPS * 4) as usize)
        .map(|i| picture(content, i))
        .collect();
    let dir = std::env::temp_dir().join(format!("cohost-codec-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("pictures.yuv"), pictures.concat())?;
    for (c, clip) in clips {
        let all: Vec<u8> = clip.frames.iter().flat_map(|f| f.annexb.to_vec()).collect();
        std::fs::write(dir.join(format!("{c:?}.h264")), all)?;
    }
    // Frame skipping off as in the bridge (its output frame rate must not change).
    let base = EncoderConfig::new().skip_frames(false);
    let bitrate_mode = base.rate_control_mode(RateControlMode::Bitrate);
    let one = bitrate_mode.num_threads(1);
    let no_scd = one.scene_change_detect(false);
    let bridge = cohost::bridge::encode::output_config(bitrate, FPS as f32);
    let variants: [(&str, EncoderConfig); 9] = [
        ("defaults (quality RC, medium, auto threads)", base),
        ("bitrate RC", bitrate_mode),
        ("bitrate RC, 1 thread", one),
        ("+ no scene change detection", no_scd),
        ("  + low complexity", no_scd.complexity(Complexity::Low)),
        (
            "  + no adaptive quantisation",
            no_scd.adaptive_quantization(false),
        ),
        (
            "  + no background detection",
            no_scd.background_detection(false),
        ),
        ("the bridge's output settings", bridge),
        ("  without frame skipping", bridge.skip_frames(false)),
    ];
    println!(
        "\nOpenH264 encode of the {content:?} pictures, 1280x720 30 fps, {:.1} Mbit/s asked",
        f64::from(bitrate) / 1e6
    );
    println!(
        "  {:<46} {:>9} {:>9} {:>9} {:>8} {:>8}",
        "settings", "CPU ms", "wall ms", "Mbit/s", "PSNR-Y", "skipped"
    );
    // This machine's timings wander by ±25 % from run to run: run every variant several times,
    // interleaved, and keep each one's fastest round.
    let mut best: Vec<Option<EncodeResult>> = variants.iter().map(|_| None).collect();
    for _ in 0..ROUNDS {
        for (k, (_, cfg)) in variants.iter().enumerate() {
            let r = encode_cost(*cfg, &pictures, bitrate)?;
            if best[k]
                .as_ref()
                .is_none_or(|b| r.ms_per_picture < b.ms_per_picture)
            {
                best[k] = Some(r);
            }
        }
    }
    for ((name, _), r) in variants.iter().zip(best.iter()) {
        let Some(r) = r else { continue };
        println!(
            "  {name:<46} {:>9.2} {:>9.2} {:>9.2} {:>8.2} {:>8}",
            r.ms_per_picture, r.wall_ms_per_picture, r.mbit, r.psnr_y, r.skipped
        );
    }
    // The same work by ffmpeg's components (the bridge benchmark's peer), one thread each so
    // that thread overhead does not count against it.
    println!("\nffmpeg 5 components on the same data (CPU ms per picture, fastest of {ROUNDS})");
    let n = pictures.len() as f64;
    for (c, _) in clips {
        let h264 = dir.join(format!("{c:?}.h264"));
        let args = ["-threads", "1", "-f", "h264", "-i"];
        let ms = ffmpeg_cpu(&args, &h264, &["-f", "null", "-"])?;
        println!(
            "  libavcodec h264 decode, {:<10}     {:>7.2}",
            format!("{c:?}"),
            ms * 1e3 / n
        );
    }
    let raw = [
        "-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", "1280x720", "-r", "30", "-i",
    ];
    let x264: Vec<&str> = ["-threads", "1"]
        .into_iter()
        .chain(crate::bridge_bench::X264)
        .chain(["-f", "null", "-"])
        .collect();
    let ms = ffmpeg_cpu(&raw, &dir.join("pictures.yuv"), &x264)?;
    println!(
        "  libx264 veryfast zerolatency encode   {:>7.2}",
        ms * 1e3 / n
    );
    let null = ["-f", "null", "-"];
    let ms = ffmpeg_cpu(&raw, &dir.join("pictures.yuv"), &null)?;
    println!(
        "  (reading the raw pictures alone)      {:>7.2}",
        ms * 1e3 / n
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// CPU seconds (user + system) ffmpeg reports with `-benchmark`, fastest of `ROUNDS` runs.
fn ffmpeg_cpu(pre: &[&str], input: &std::path::Path, post: &[&str]) -> anyhow::Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..ROUNDS {
        let out = std::process::Command::new("ffmpeg")
            .args(["-hide_banner", "-nostats", "-benchmark"])
            .args(pre)
            .arg(input)
            .args(post)
            .output()?;
        let text = String::from_utf8_lossy(&out.stderr);
        let field = |k: &str| -> Option<f64> {
            let line = text.lines().find(|l| l.starts_with("bench: utime"))?;
            let v = line.split_whitespace().find_map(|w| w.strip_prefix(k))?;
            v.trim_end_matches('s').parse().ok()
        };
        match (field("utime="), field("stime=")) {
            (Some(u), Some(s)) => best = best.min(u + s),
            _ => anyhow::bail!("ffmpeg -benchmark printed no times: {text}"),
        }
    }
    Ok(best)
}
