//! The bridge's output as RTP, for WHEP viewers of the mixed stream: the H.264 access units the
//! output encoder already makes, packetized per RFC 6184 (single NAL units, FU-A for large
//! ones, SPS+PPS in one STAP-A before each IDR), and the mixed PCM encoded to Opus (20 ms,
//! stereo, 48 kHz). Both go into [`TrackRouter`]s, so viewers attach like any SFU subscriber.
//!
//! Nothing is packetized or Opus-encoded while nobody watches: each router's subscriber count is
//! checked per frame, and the Opus encoder only exists while audio has a subscriber. Keyframe
//! requests from viewers (PLI/FIR, a new viewer) make the output encoder emit an IDR, at most one
//! per [`KEYFRAME_INTERVAL`] (coalesced, never dropped).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rtc::rtp::codec::h264::H264Payloader;
use rtc::rtp::packetizer::Payloader;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::sfu::keyframe::{Decision, KeyframeThrottle};
use crate::sfu::{CodecSpec, Packet, TrackRouter};
use crate::signaling::protocol::Kind;

/// Fewest time between two IDRs forced by viewers.
pub const KEYFRAME_INTERVAL: Duration = Duration::from_millis(500);
/// RTP payload size limit (fits a 1280-byte path MTU after SRTP and headers).
const MTU: usize = 1200;
const OPUS_FRAME: usize = 960;
const OPUS_BITRATE: i32 = 64_000;

/// The codecs the routers carry (what the SFU's media engine registers, so the payload type
/// resolves on every viewer's leg).
pub fn video_codec() -> CodecSpec {
    CodecSpec {
        mime_type: "video/H264".into(),
        clock_rate: 90_000,
        channels: 0,
        fmtp: "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f".into(),
    }
}

pub fn audio_codec() -> CodecSpec {
    CodecSpec {
        mime_type: "audio/opus".into(),
        clock_rate: 48_000,
        channels: 2,
        fmtp: "minptime=10;useinbandfec=1".into(),
    }
}

/// The routers WHEP viewers subscribe to.
#[derive(Debug, Clone)]
pub struct RtpTracks {
    pub video: Arc<TrackRouter>,
    pub audio: Arc<TrackRouter>,
}

/// The output loop's side: packetizes and encodes into the routers.
pub struct RtpOut {
    tracks: RtpTracks,
    keyframes: mpsc::Receiver<()>,
    throttle: KeyframeThrottle,
    keyframe_at: Option<Instant>,
    payloader: H264Payloader,
    vseq: u16,
    aseq: u16,
    ts_base: u32,
    opus: Option<opus::Encoder>,
    /// Mixed stereo PCM waiting for a whole Opus frame, and the output sample its first
    /// sample is.
    pcm: Vec<i16>,
    pcm_start: u64,
    /// Only the first of a run of errors is logged.
    failing: bool,
}

impl RtpOut {
    pub fn new(room: &str) -> (Self, RtpTracks) {
        let (video, keyframes) = TrackRouter::new(
            format!("{room}-mix-video"),
            format!("{room}-mix"),
            Kind::Video,
            video_codec(),
        );
        // Audio has no keyframes: its request channel is never read.
        let (audio, _) = TrackRouter::new(
            format!("{room}-mix-audio"),
            format!("{room}-mix"),
            Kind::Audio,
            audio_codec(),
        );
        let tracks = RtpTracks { video, audio };
        (
            Self {
                tracks: tracks.clone(),
                keyframes,
                throttle: KeyframeThrottle::new(KEYFRAME_INTERVAL),
                keyframe_at: None,
                payloader: H264Payloader::default(),
                vseq: rand::random(),
                aseq: rand::random(),
                ts_base: rand::random(),
                opus: None,
                pcm: vec![],
                pcm_start: 0,
                failing: false,
            },
            tracks,
        )
    }

    /// Whether the encoder must make the next frame an IDR (a viewer asked, throttled).
    pub fn keyframe_due(&mut self, now: Instant) -> bool {
        while self.keyframes.try_recv().is_ok() {
            match self.throttle.request(now) {
                Decision::SendNow => self.keyframe_at = Some(now),
                Decision::SendAt(at) => self.keyframe_at = Some(at),
                Decision::Coalesced => {}
            }
        }
        match self.keyframe_at {
            Some(at) if now >= at => {
                self.keyframe_at = None;
                self.throttle.sent(now);
                debug!(track = %self.tracks.video.id, "IDR for WHEP viewers");
                true
            }
            _ => false,
        }
    }

    /// Packetize one output picture (Annex B, parameter sets before IDRs) with output
    /// timestamp `ts_ms` if anybody watches.
    pub fn video(&mut self, annexb: &[u8], ts_ms: i64) {
        if self.tracks.video.subscriber_count() == 0 {
            return;
        }
        let ts = self.ts_base.wrapping_add((ts_ms.max(0) as u64 * 90) as u32);
        let payloads = match self.payloader.payload(MTU, &Bytes::copy_from_slice(annexb)) {
            Ok(p) => p,
            Err(e) => {
                if !self.failing {
                    warn!("bridge RTP packetizer: {e}");
                }
                self.failing = true;
                return;
            }
        };
        self.failing = false;
        let last = payloads.len().saturating_sub(1);
        for (i, payload) in payloads.into_iter().enumerate() {
            let mut p = Packet::default();
            p.header.version = 2;
            p.header.sequence_number = self.vseq;
            p.header.timestamp = ts;
            p.header.marker = i == last;
            p.payload = payload;
            self.vseq = self.vseq.wrapping_add(1);
            self.tracks.video.forward(p);
        }
    }

    /// Take one mixed block (interleaved stereo) starting at output sample `first_sample`;
    /// Opus-encode it in 20 ms frames if anybody listens.
    pub fn audio(&mut self, block: &[i16], first_sample: u64) {
        if self.tracks.audio.subscriber_count() == 0 {
            // Nobody listens: no encoder, no buffer.
            self.opus = None;
            self.pcm.clear();
            return;
        }
        if self.opus.is_none() {
            match opus::Encoder::new(48_000, opus::Channels::Stereo, opus::Application::Audio) {
                Ok(mut e) => {
                    let _ = e.set_bitrate(opus::Bitrate::Bits(OPUS_BITRATE));
                    self.opus = Some(e);
                    self.pcm.clear();
                    self.pcm_start = first_sample;
                }
                Err(e) => {
                    warn!("bridge Opus encoder: {e}");
                    return;
                }
            }
        }
        let Some(enc) = self.opus.as_mut() else {
            return;
        };
        self.pcm.extend_from_slice(block);
        let mut out = [0u8; 1500];
        while self.pcm.len() >= OPUS_FRAME * 2 {
            let n = match enc.encode(&self.pcm[..OPUS_FRAME * 2], &mut out) {
                Ok(n) => n,
                Err(e) => {
                    warn!("bridge Opus encode: {e}");
                    0
                }
            };
            let ts = self.ts_base.wrapping_add(self.pcm_start as u32);
            self.pcm.drain(..OPUS_FRAME * 2);
            self.pcm_start += OPUS_FRAME as u64;
            if n == 0 {
                continue;
            }
            let mut p = Packet::default();
            p.header.version = 2;
            p.header.sequence_number = self.aseq;
            p.header.timestamp = ts;
            p.header.marker = false;
            p.payload = Bytes::copy_from_slice(&out[..n]);
            self.aseq = self.aseq.wrapping_add(1);
            self.tracks.audio.forward(p);
        }
    }
}

impl RtpTracks {
    /// The bridge stopped: every viewer's subscription ends.
    pub fn close(&self) {
        self.video.close();
        self.audio.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::compose::{I420, Yuv};
    use crate::bridge::encode::H264Encoder;

    #[tokio::test]
    async fn nothing_is_made_without_viewers_and_viewers_get_decodable_idr() {
        let (mut out, tracks) = RtpOut::new("r");
        let mut enc = H264Encoder::new(320, 240, 30.0, 500_000, 300).unwrap();
        let pic = I420::new(320, 240, Yuv::from_rgb(200, 40, 40));
        let v = enc.encode(&pic).unwrap();
        out.video(&v.annexb, 0);
        out.audio(&vec![0i16; 2048], 0);
        assert_eq!(
            tracks
                .video
                .stats
                .packets_in
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        assert!(out.opus.is_none(), "no Opus encoder without listeners");
        let mut vsub = tracks.video.subscribe(1000);
        let mut asub = tracks.audio.subscribe(1000);
        // A viewer asks for a keyframe: the next frame is forced, a second request inside
        // the interval waits.
        tracks.video.request_keyframe();
        let t0 = Instant::now();
        assert!(out.keyframe_due(t0));
        tracks.video.request_keyframe();
        assert!(!out.keyframe_due(t0 + Duration::from_millis(10)));
        assert!(out.keyframe_due(t0 + KEYFRAME_INTERVAL));
        enc.force_keyframe();
        let v = enc.encode(&pic).unwrap();
        assert!(v.keyframe);
        out.video(&v.annexb, 33);
        let mut input = crate::bridge::video_in::VideoInput::new().unwrap();
        let mut got_picture = false;
        while let Ok(p) = vsub.rx.try_recv() {
            let r = input.push(
                p.header.sequence_number,
                p.header.timestamp,
                p.header.marker,
                &p.payload,
                Instant::now(),
            );
            got_picture |= r.new_picture;
        }
        // Past the input's start wait for reordered packets.
        got_picture |= input
            .poll(Instant::now() + Duration::from_millis(20))
            .new_picture;
        assert!(got_picture, "the packetized IDR decodes");
        // 2048 samples per channel -> two 20 ms Opus frames, 960 samples apart.
        out.audio(&vec![1000i16; 4096], 2048);
        let a = asub.rx.try_recv().unwrap();
        let b = asub.rx.try_recv().unwrap();
        assert_eq!(b.header.timestamp.wrapping_sub(a.header.timestamp), 960);
        tracks.close();
        assert!(vsub.rx.recv().await.is_none());
    }
}
