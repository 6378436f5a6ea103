//! Synthetic media, encoded once at start and looped: H.264 from OpenH264 (a moving pattern at
//! the requested bitrate) packetized with FU-A/STAP-A by `rtc`'s payloader, and Opus frames of
//! a tone. Sending then costs only stamping and writing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use openh264::encoder::{
    BitRate, Encoder, EncoderConfig, FrameRate, IntraFramePeriod, RateControlMode,
};
use openh264::formats::YUVBuffer;
use rtc::rtp::codec::h264::H264Payloader;
use rtc::rtp::packetizer::Payloader;
use webrtc::media_stream::track_local::TrackLocal;

use crate::stats::stamp;
use crate::target::PublishTracks;

pub const FPS: u32 = 30;
const MTU: usize = 1200;

/// One video frame as RTP payloads.
pub struct Frame {
    pub payloads: Vec<Bytes>,
    /// The encoded access unit (Annex-B), for tools that read a file (the ffmpeg comparison).
    pub annexb: Bytes,
    /// An IDR frame: where a receiver can start decoding.
    pub key: bool,
}

pub struct Clip {
    pub frames: Vec<Frame>,
    pub opus: Vec<Bytes>,
    pub video_bps: f64,
}

/// What the synthetic clip shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Content {
    /// A desk camera: a still, smooth background, a textured "head" that sways, and faint
    /// sensor noise everywhere; encoded in OpenH264's bitrate mode, a picture in every frame,
    /// so it comes out near the requested bitrate like a browser's sender.
    Camera,
    /// The same scene from a hand-held phone: the background pans a pixel per frame, so
    /// almost nothing can be skipped (costlier to encode and decode than `camera`).
    Handheld,
    /// A moving gradient under strong per-pixel noise that changes every frame: nothing can be
    /// predicted, so it costs every decoder the most (12-18 Mbit/s when no frame may be
    /// skipped, whatever the requested bitrate). The SFU scenarios use it with frame skipping
    /// on, where its packet rate is what they measure.
    Noise,
}

/// One 1280x720 I420 picture of `content` at frame `i`.
pub fn picture(content: Content, i: usize) -> Vec<u8> {
    let (w, h) = (1280usize, 720usize);
    let mut yuv = vec![0u8; w * h * 3 / 2];
    let mut seed = (i as u32).wrapping_mul(2_654_435_761) | 1;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed
    };
    match content {
        Content::Noise => {
            for y in 0..h {
                for x in 0..w {
                    yuv[y * w + x] = ((x + y + i * 4) % 256) as u8 ^ (rnd() as u8 & 0x1f);
                }
            }
            for (k, v) in yuv[w * h..].iter_mut().enumerate() {
                *v = ((k / 7 + i * 2) % 256) as u8;
            }
        }
        Content::Camera | Content::Handheld => {
            // Head swaying on a slow sine; the hand-held background pans 1 px per frame.
            let pan = if content == Content::Handheld { i } else { 0 };
            let (cx, cy) = (
                640.0 + 60.0 * (i as f64 / 25.0).sin(),
                380.0 + 15.0 * (i as f64 / 11.0).sin(),
            );
            let (rx, ry) = (190.0f64, 250.0f64);
            // The background's terms are separable: per column and per row tables.
            let col: Vec<(f64, f64, f64)> = (0..w)
                .map(|x| {
                    let bx = (x + pan) as f64;
                    ((bx / 97.0).sin(), (bx / 23.0).sin(), (bx / 23.0).cos())
                })
                .collect();
            for y in 0..h {
                let (c71, s41, c41) = (
                    (y as f64 / 71.0).cos(),
                    (y as f64 / 41.0).sin(),
                    (y as f64 / 41.0).cos(),
                );
                for x in 0..w {
                    let (s97, s23, c23) = col[x];
                    // sin(a + b) = sin a cos b + cos a sin b
                    let bg = 120.0 + 50.0 * s97 * c71 + 20.0 * (s23 * c41 + c23 * s41);
                    let (dx, dy) = ((x as f64 - cx) / rx, (y as f64 - cy) / ry);
                    let v = if dx * dx + dy * dy < 1.0 {
                        // Texture fixed to the head, so motion search finds it.
                        let (tx, ty) = ((dx * rx) as i64, (dy * ry) as i64);
                        let t = (tx.wrapping_mul(31) ^ ty.wrapping_mul(17)) & 15;
                        170.0 + 25.0 * (dy * 9.0).sin() + t as f64
                    } else {
                        bg
                    };
                    // Faint sensor noise (±2).
                    let n = (rnd() % 5) as f64 - 2.0;
                    yuv[y * w + x] = (v + n).clamp(16.0, 235.0) as u8;
                }
            }
            let (cw, ch) = (w / 2, h / 2);
            for y in 0..ch {
                for x in 0..cw {
                    let u = 128.0 + 20.0 * (((x + pan / 2) as f64) / 60.0).sin();
                    let v = 128.0 + 15.0 * ((y as f64) / 50.0).cos();
                    yuv[w * h + y * cw + x] = u as u8;
                    yuv[w * h + cw * ch + y * cw + x] = v as u8;
                }
            }
        }
    }
    yuv
}

/// Centre-crop an I420 picture of `sw`x`sh` to the aspect ratio of `w`x`h` and resample it
/// there (each output sample averages the 2x2 source samples around its position).
fn resample(src: &[u8], sw: usize, sh: usize, w: usize, h: usize) -> Vec<u8> {
    // Crop: the largest centred rectangle of the output's aspect ratio.
    let (cw, ch) = if sw * h > sh * w {
        (sh * w / h, sh)
    } else {
        (sw, sw * h / w)
    };
    let (x0, y0) = ((sw - cw) / 2, (sh - ch) / 2);
    let mut out = vec![0u8; w * h * 3 / 2];
    let plane = |src: &[u8],
                 sw: usize,
                 sh: usize,
                 x0: usize,
                 y0: usize,
                 cw: usize,
                 ch: usize,
                 dst: &mut [u8],
                 w: usize,
                 h: usize| {
        for y in 0..h {
            let sy = (y0 + y * ch / h).min(sh - 1);
            let sy1 = (sy + 1).min(sh - 1);
            for x in 0..w {
                let sx = (x0 + x * cw / w).min(sw - 1);
                let sx1 = (sx + 1).min(sw - 1);
                let sum = u32::from(src[sy * sw + sx])
                    + u32::from(src[sy * sw + sx1])
                    + u32::from(src[sy1 * sw + sx])
                    + u32::from(src[sy1 * sw + sx1]);
                dst[y * w + x] = (sum / 4) as u8;
            }
        }
    };
    let (ys, us) = (sw * sh, sw * sh / 4);
    let (yd, ud) = (w * h, w * h / 4);
    let (dy, duv) = out.split_at_mut(yd);
    let (du, dv) = duv.split_at_mut(ud);
    plane(&src[..ys], sw, sh, x0, y0, cw, ch, dy, w, h);
    let (sw2, sh2, w2, h2) = (sw / 2, sh / 2, w / 2, h / 2);
    let (x02, y02, cw2, ch2) = (x0 / 2, y0 / 2, cw / 2, ch / 2);
    plane(&src[ys..ys + us], sw2, sh2, x02, y02, cw2, ch2, du, w2, h2);
    plane(
        &src[ys + us..ys + 2 * us],
        sw2,
        sh2,
        x02,
        y02,
        cw2,
        ch2,
        dv,
        w2,
        h2,
    );
    out
}

/// Encode `seconds` of 1280x720 video at `bitrate` bps with a 2 s GOP, plus Opus 20 ms frames.
///
/// `every_frame`: forbid the encoder to skip frames. OpenH264 holds its bitrate by skipping
/// (an empty output for that frame) when the picture needs more bits than the budget: fine for
/// the SFU scenarios, which measure packets, but the bridge scenarios need a picture in every
/// frame. With `every_frame` the encoder runs in bitrate mode, which raises the quantiser
/// instead of skipping (the noise content still cannot be held to the bitrate).
pub fn make_clip(
    content: Content,
    bitrate: u32,
    seconds: u32,
    every_frame: bool,
) -> anyhow::Result<Clip> {
    make_clip_sized(content, bitrate, seconds, every_frame, 1280, 720)
}

/// [`make_clip`] at `w`x`h` (even): the 1280x720 scene, centre-cropped to that aspect ratio
/// (a portrait phone sees the middle of it) and resampled.
pub fn make_clip_sized(
    content: Content,
    bitrate: u32,
    seconds: u32,
    every_frame: bool,
    w: usize,
    h: usize,
) -> anyhow::Result<Clip> {
    anyhow::ensure!(
        w >= 16 && h >= 16 && w.is_multiple_of(2) && h.is_multiple_of(2),
        "clip size {w}x{h}: even, at least 16"
    );
    let mut config = EncoderConfig::new()
        .bitrate(BitRate::from_bps(bitrate))
        .max_frame_rate(FrameRate::from_hz(FPS as f32))
        .skip_frames(!every_frame)
        .intra_frame_period(IntraFramePeriod::from_num_frames(FPS * 2));
    if every_frame {
        config = config.rate_control_mode(RateControlMode::Bitrate);
    }
    let mut enc = Encoder::with_api_config(openh264::OpenH264API::from_source(), config)?;
    let mut payloader = H264Payloader::default();
    let mut frames = vec![];
    let mut total = 0usize;
    let n = (FPS * seconds) as usize;
    for i in 0..n {
        let full = picture(content, i);
        let pic = if (w, h) == (1280, 720) {
            full
        } else {
            resample(&full, 1280, 720, w, h)
        };
        let buf = YUVBuffer::from_vec(pic, w, h);
        let bs = enc.encode(&buf)?;
        let annexb = Bytes::from(bs.to_vec());
        total += annexb.len();
        let key = openh264::nal_units(&annexb).any(|n| {
            n.get(..5).is_some_and(|h| {
                // After a 3- or 4-byte start code: NAL type 5 is an IDR slice.
                let hdr = if h[2] == 1 { h[3] } else { h[4] };
                hdr & 0x1f == 5
            })
        });
        let payloads = payloader.payload(MTU, &annexb)?;
        frames.push(Frame {
            payloads,
            key,
            annexb,
        });
    }
    // Opus: 440 Hz tone, 48 kHz mono, 20 ms frames, 32 kbit/s.
    let mut oenc = opus::Encoder::new(48000, opus::Channels::Mono, opus::Application::Voip)?;
    oenc.set_bitrate(opus::Bitrate::Bits(32000))?;
    let mut opus = vec![];
    for f in 0..50 {
        let pcm: Vec<i16> = (0..960)
            .map(|k| {
                let t = (f * 960 + k) as f64 / 48000.0;
                ((t * 440.0 * std::f64::consts::TAU).sin() * 8000.0) as i16
            })
            .collect();
        let mut out = vec![0u8; 400];
        let len = oenc.encode(&pcm, &mut out)?;
        // Stamps overwrite the last 16 bytes: keep every frame longer than that.
        out.truncate(len.max(40));
        opus.push(Bytes::from(out));
    }
    Ok(Clip {
        video_bps: total as f64 * 8.0 / f64::from(seconds),
        frames,
        opus,
    })
}

/// Send the clip in real time on the given tracks until `stop` is set. Like a real sender it
/// answers keyframe requests (PLI/FIR) by jumping to the clip's next IDR frame, and paces a
/// frame's packets (8 per millisecond) instead of bursting them.
pub fn pump(
    clip: Arc<Clip>,
    tracks: PublishTracks,
    ssrcs: (u32, u32),
    pts: (u8, u8),
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    pump_with(clip, tracks, ssrcs, pts, stop, true)
}

/// [`pump`]; `stamped: false` sends the clip's payloads untouched (no send-time stamp over
/// their last 16 bytes), for receivers that decode them: the bridge.
pub fn pump_with(
    clip: Arc<Clip>,
    tracks: PublishTracks,
    ssrcs: (u32, u32),
    pts: (u8, u8),
    stop: Arc<AtomicBool>,
    stamped: bool,
) -> tokio::task::JoinHandle<()> {
    let want_key = Arc::new(AtomicBool::new(false));
    let (v, w, st) = (tracks.video.clone(), want_key.clone(), stop.clone());
    let feedback = tokio::spawn(async move {
        while !st.load(Ordering::Relaxed) {
            match v.poll().await {
                Some(webrtc::media_stream::track_local::TrackLocalEvent::OnRtcpPacket(_)) => {
                    w.store(true, Ordering::Relaxed)
                }
                Some(_) => {}
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let keys: Vec<usize> = (0..clip.frames.len())
        .filter(|i| clip.frames[*i].key)
        .collect();
    tokio::spawn(async move {
        let _feedback = AbortOnDrop(feedback);
        let mut pos = 0usize;
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let start = tokio::time::Instant::now();
        let (mut aseq, mut vseq) = (rand::random::<u16>(), rand::random::<u16>());
        let (mut a_sent, mut v_sent) = (0u64, 0u64);
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let ms = start.elapsed().as_millis() as u64;
            while a_sent * 20 <= ms {
                let payload = &clip.opus[(a_sent % clip.opus.len() as u64) as usize];
                let mut p = packet(payload, ssrcs.0, pts.0, aseq, (a_sent * 960) as u32, true);
                if stamped {
                    stamp_packet(&mut p, false, false);
                }
                aseq = aseq.wrapping_add(1);
                a_sent += 1;
                if tracks.audio.write_rtp(p).await.is_err() {
                    return;
                }
            }
            while v_sent * 1000 / u64::from(FPS) <= ms {
                if want_key.swap(false, Ordering::Relaxed) && !clip.frames[pos].key {
                    pos = keys
                        .iter()
                        .copied()
                        .find(|k| *k > pos)
                        .or(keys.first().copied())
                        .unwrap_or(0);
                }
                let frame = &clip.frames[pos];
                pos = (pos + 1) % clip.frames.len();
                let ts = (v_sent * 90000 / u64::from(FPS)) as u32;
                let last = frame.payloads.len().saturating_sub(1);
                for (i, pl) in frame.payloads.iter().enumerate() {
                    let mut p = packet(pl, ssrcs.1, pts.1, vseq, ts, i == last);
                    if stamped {
                        stamp_packet(&mut p, true, frame.key);
                    }
                    vseq = vseq.wrapping_add(1);
                    if tracks.video.write_rtp(p).await.is_err() {
                        return;
                    }
                    if i % 8 == 7 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                v_sent += 1;
            }
        }
    })
}

fn packet(payload: &Bytes, ssrc: u32, pt: u8, seq: u16, ts: u32, marker: bool) -> rtc::rtp::Packet {
    let mut p = rtc::rtp::Packet::default();
    p.header.version = 2;
    p.header.ssrc = ssrc;
    p.header.payload_type = pt;
    p.header.sequence_number = seq;
    p.header.timestamp = ts;
    p.header.marker = marker;
    p.payload = payload.clone();
    p
}

fn stamp_packet(p: &mut rtc::rtp::Packet, video: bool, key: bool) {
    let mut b = BytesMut::from(&p.payload[..]);
    stamp(&mut b, video, key);
    p.payload = b.freeze();
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
