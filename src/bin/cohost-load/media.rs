//! Synthetic media, encoded once at start and looped: H.264 from OpenH264 (a moving pattern at
//! the requested bitrate) packetized with FU-A/STAP-A by `rtc`'s payloader, and Opus frames of
//! a tone. Sending then costs only stamping and writing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use openh264::encoder::{BitRate, Encoder, EncoderConfig, FrameRate, IntraFramePeriod};
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
}

pub struct Clip {
    pub frames: Vec<Frame>,
    pub opus: Vec<Bytes>,
    pub video_bps: f64,
}

/// Encode `seconds` of 1280x720 video at `bitrate` bps with a 2 s GOP, plus Opus 20 ms frames.
pub fn make_clip(bitrate: u32, seconds: u32) -> anyhow::Result<Clip> {
    let (w, h) = (1280usize, 720usize);
    let config = EncoderConfig::new()
        .bitrate(BitRate::from_bps(bitrate))
        .max_frame_rate(FrameRate::from_hz(FPS as f32))
        .intra_frame_period(IntraFramePeriod::from_num_frames(FPS * 2));
    let mut enc = Encoder::with_api_config(openh264::OpenH264API::from_source(), config)?;
    let mut payloader = H264Payloader::default();
    let mut frames = vec![];
    let mut total = 0usize;
    let n = (FPS * seconds) as usize;
    for i in 0..n {
        // A moving diagonal gradient with noise so the encoder has real work and real sizes.
        let mut yuv = vec![0u8; w * h * 3 / 2];
        let mut seed = (i as u32).wrapping_mul(2_654_435_761);
        for y in 0..h {
            for x in 0..w {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                yuv[y * w + x] = ((x + y + i * 4) % 256) as u8 ^ (seed as u8 & 0x1f);
            }
        }
        for (k, v) in yuv[w * h..].iter_mut().enumerate() {
            *v = ((k / 7 + i * 2) % 256) as u8;
        }
        let buf = YUVBuffer::from_vec(yuv, w, h);
        let bs = enc.encode(&buf)?;
        let annexb = Bytes::from(bs.to_vec());
        total += annexb.len();
        let payloads = payloader.payload(MTU, &annexb)?;
        frames.push(Frame { payloads });
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

/// Send the clip in real time on the given tracks until `stop` is set.
pub fn pump(
    clip: Arc<Clip>,
    tracks: PublishTracks,
    ssrcs: (u32, u32),
    pts: (u8, u8),
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
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
                stamp_packet(&mut p, false);
                aseq = aseq.wrapping_add(1);
                a_sent += 1;
                if tracks.audio.write_rtp(p).await.is_err() {
                    return;
                }
            }
            while v_sent * 1000 / u64::from(FPS) <= ms {
                let frame = &clip.frames[(v_sent % clip.frames.len() as u64) as usize];
                let ts = (v_sent * 90000 / u64::from(FPS)) as u32;
                let last = frame.payloads.len().saturating_sub(1);
                for (i, pl) in frame.payloads.iter().enumerate() {
                    let mut p = packet(pl, ssrcs.1, pts.1, vseq, ts, i == last);
                    stamp_packet(&mut p, true);
                    vseq = vseq.wrapping_add(1);
                    if tracks.video.write_rtp(p).await.is_err() {
                        return;
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

fn stamp_packet(p: &mut rtc::rtp::Packet, video: bool) {
    let mut b = BytesMut::from(&p.payload[..]);
    stamp(&mut b, video);
    p.payload = b.freeze();
}
