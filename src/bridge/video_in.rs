//! One participant's video for the compositor: RTP packets in, the latest decoded picture out.
//! Keeps the last good picture when the input stalls or breaks, follows resolution changes
//! (WebRTC senders scale down under bandwidth pressure) and says when a keyframe is needed.
//!
//! Packets go through a reordering buffer first ([`Reorder`]): on a phone's link packets arrive
//! out of order and lost ones come back as retransmissions after later ones, and the H.264
//! assembler needs them in order. A hole the buffer gives up on breaks the frame; decoding then
//! waits for an IDR, asks for one once, and asks again only if none has come after
//! [`KEYFRAME_RETRY`] (a keyframe can be lost too).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use openh264::decoder::Decoder;
use serde::Serialize;

use super::compose::I420;
use crate::media::jitter::{Packet, Reorder, ReorderConfig};
use crate::media::rtp_h264::{AccessUnit, Assembler, Output};

/// Access units kept while decoding is off (passthrough): the pictures since the last IDR,
/// decoded in one go when decoding is turned on, so the bridge can mix at once. Past either
/// bound the buffer is dropped and decoding starts at the next IDR instead.
const MAX_GOP_UNITS: usize = 300;
const MAX_GOP_BYTES: usize = 24 * 1024 * 1024;

/// While decoding waits for an IDR, the keyframe request is repeated this often.
pub const KEYFRAME_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum VideoInError {
    #[error("decoder: {0}")]
    Decoder(String),
}

/// What one video input did so far (bridge stats, per input).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct VideoInputStats {
    pub frames_decoded: u64,
    pub decode_errors: u64,
    /// Keyframe requests this input made (before the publisher-side throttle).
    pub keyframe_requests: u64,
    /// Packets that arrived after a later one and were still used (reordered, retransmitted).
    pub packets_recovered: u64,
    /// Packets waited for and given up.
    pub packets_lost: u64,
    /// Packets that arrived after they were given up, or twice.
    pub packets_late: u64,
    /// Delay the reordering buffer added to the last packet / the largest so far, and how long
    /// it waits for a missing packet now (follows RTT and jitter, bounded).
    pub hold_ms: f64,
    pub max_hold_ms: f64,
    pub wait_ms: f64,
    /// RFC 3550 interarrival jitter of the input, milliseconds.
    pub jitter_ms: f64,
}

pub struct VideoInput {
    reorder: Reorder,
    assembler: Assembler,
    decoder: Decoder,
    /// Shared with the compositor's queue without copying the picture again.
    latest: Option<std::sync::Arc<I420>>,
    /// RTP timestamp of `latest`.
    latest_ts: Option<u32>,
    /// Decoding waits for an IDR; the last keyframe request went out at.
    waiting: bool,
    /// Decoding was turned on again without the pictures since the last IDR: the decoder's
    /// references are from before it stopped, so nothing but an IDR may go in (P pictures
    /// would decode into garbage on screen).
    idr_only: bool,
    last_request: Option<Instant>,
    stats: VideoInputStats,
    /// Decode pictures (off while the bridge passes this input through untouched).
    decode: bool,
    /// While not decoding: the access units since the last IDR (`None`: none kept, decoding
    /// must wait for an IDR).
    gop: Option<Vec<Arc<AccessUnit>>>,
    gop_bytes: usize,
}

/// What one packet (or one poll) produced.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pushed {
    /// A new picture replaced the latest one.
    pub new_picture: bool,
    /// Ask the publisher for a keyframe.
    pub need_keyframe: bool,
    /// Whole access units released, in order (for passthrough). A loss never leaves a broken
    /// one here: after a gap nothing comes until the next IDR.
    pub units: Vec<Arc<AccessUnit>>,
}

impl VideoInput {
    pub fn new() -> Result<Self, VideoInError> {
        Ok(Self {
            reorder: Reorder::new(ReorderConfig::default(), 90_000),
            assembler: Assembler::new(),
            decoder: Decoder::new().map_err(|e| VideoInError::Decoder(e.to_string()))?,
            latest: None,
            latest_ts: None,
            waiting: false,
            idr_only: false,
            last_request: None,
            stats: VideoInputStats::default(),
            decode: true,
            gop: None,
            gop_bytes: 0,
        })
    }

    pub fn decoding(&self) -> bool {
        self.decode
    }

    /// Turn decoding off (the input is passed through: nothing needs its pictures) or on. On
    /// again, the pictures kept since the last IDR are decoded at once; without them decoding
    /// waits for the next IDR, and `need_keyframe` says so.
    pub fn set_decode(&mut self, on: bool, now: Instant) -> Pushed {
        let mut r = Pushed::default();
        if on == self.decode {
            return r;
        }
        self.decode = on;
        if !on {
            self.gop = None;
            self.gop_bytes = 0;
            return r;
        }
        match self.gop.take() {
            Some(units) => {
                for au in units {
                    self.decode(&au.annexb, au.rtp_timestamp, &mut r);
                }
            }
            None => {
                self.waiting = true;
                self.idr_only = true;
                r.need_keyframe = true;
                self.last_request = Some(now);
                self.stats.keyframe_requests += 1;
            }
        }
        self.gop_bytes = 0;
        r
    }

    /// Keep `au` for decoding later (decoding is off).
    fn keep(&mut self, au: &Arc<AccessUnit>) {
        if au.keyframe {
            self.gop = Some(vec![]);
            self.gop_bytes = 0;
        }
        let Some(gop) = self.gop.as_mut() else {
            return;
        };
        self.gop_bytes += au.annexb.len();
        if gop.len() >= MAX_GOP_UNITS || self.gop_bytes > MAX_GOP_BYTES {
            self.gop = None;
            self.gop_bytes = 0;
            return;
        }
        gop.push(au.clone());
    }

    /// The publisher connection's round trip, when measured: how long a retransmission takes.
    pub fn set_rtt(&mut self, rtt: Option<Duration>) {
        self.reorder.set_rtt(rtt);
    }

    /// Feed one RTP packet that arrived at `now`.
    pub fn push(
        &mut self,
        seq: u16,
        ts: u32,
        marker: bool,
        payload: &Bytes,
        now: Instant,
    ) -> Pushed {
        self.reorder.push(
            Packet {
                seq,
                timestamp: ts,
                marker,
                payload: payload.clone(),
            },
            now,
        );
        self.poll(now)
    }

    /// When [`poll`](Self::poll) has something to do without a new packet: a hole to give up,
    /// or a keyframe request to repeat.
    pub fn deadline(&self) -> Option<Instant> {
        let retry = self
            .last_request
            .filter(|_| self.waiting)
            .map(|t| t + KEYFRAME_RETRY);
        match (self.reorder.deadline(), retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Release what the reordering buffer lets go at `now`, decode it, and repeat an
    /// unanswered keyframe request.
    pub fn poll(&mut self, now: Instant) -> Pushed {
        let mut r = Pushed::default();
        while let Some(p) = self.reorder.pop(now) {
            for out in self
                .assembler
                .push(p.seq, p.timestamp, p.marker, &p.payload)
            {
                match out {
                    Output::NeedKeyframe => {
                        self.waiting = true;
                        r.need_keyframe = true;
                    }
                    Output::Frame(au) => {
                        if au.keyframe {
                            self.waiting = false;
                            self.idr_only = false;
                        }
                        let au = Arc::new(au);
                        if self.decode && self.idr_only {
                            // Not decodable yet (see `idr_only`); passed on all the same.
                        } else if self.decode {
                            self.decode(&au.annexb, au.rtp_timestamp, &mut r);
                        } else {
                            self.keep(&au);
                        }
                        r.units.push(au);
                    }
                }
            }
        }
        if !r.need_keyframe
            && self.waiting
            && self.last_request.is_some_and(|t| now >= t + KEYFRAME_RETRY)
        {
            // Still no IDR: the one sent may have been lost on the way.
            r.need_keyframe = true;
        }
        if r.need_keyframe {
            self.last_request = Some(now);
            self.stats.keyframe_requests += 1;
        }
        r
    }

    fn decode(&mut self, annexb: &[u8], ts: u32, r: &mut Pushed) {
        match self.decoder.decode(annexb) {
            Ok(Some(pic)) => {
                // Copied out: the decoder reuses its buffer for the next picture.
                let f = I420::from_yuv(&pic);
                self.latest = Some(std::sync::Arc::new(f));
                self.latest_ts = Some(ts);
                self.stats.frames_decoded += 1;
                r.new_picture = true;
            }
            Ok(None) => {}
            Err(e) => {
                // A picture the decoder rejects: keep showing the last good one and get a
                // fresh keyframe.
                tracing::debug!(
                    rtp_timestamp = ts,
                    bytes = annexb.len(),
                    "picture not decoded: {e}"
                );
                self.stats.decode_errors += 1;
                self.waiting = true;
                r.need_keyframe = true;
            }
        }
    }

    pub fn stats(&self) -> VideoInputStats {
        let q = self.reorder.stats();
        VideoInputStats {
            packets_recovered: q.recovered,
            packets_lost: q.lost,
            packets_late: q.late + q.duplicates,
            hold_ms: q.delay_ms,
            max_hold_ms: q.max_delay_ms,
            wait_ms: self.reorder.wait().as_secs_f64() * 1000.0,
            jitter_ms: q.jitter_ms,
            ..self.stats.clone()
        }
    }

    /// The latest good picture, if any arrived yet.
    pub fn latest(&self) -> Option<&std::sync::Arc<I420>> {
        self.latest.as_ref()
    }

    pub fn latest_rtp_timestamp(&self) -> Option<u32> {
        self.latest_ts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::compose::Yuv;
    use crate::bridge::layout::Rect;
    use openh264::encoder::Encoder;
    use openh264::formats::YUVBuffer;
    use rtc::rtp::codec::h264::H264Payloader;
    use rtc::rtp::packetizer::Payloader;

    /// Longer than the reordering buffer's start wait.
    const START: Duration = Duration::from_millis(20);

    fn solid(w: usize, h: usize, c: Yuv) -> YUVBuffer {
        let mut v = vec![c.0; w * h];
        v.extend(std::iter::repeat_n(c.1, w * h / 4));
        v.extend(std::iter::repeat_n(c.2, w * h / 4));
        YUVBuffer::from_vec(v, w, h)
    }

    #[test]
    fn decodes_colours_and_follows_a_resolution_change() {
        let red = Yuv::from_rgb(220, 30, 30);
        let mut input = VideoInput::new().unwrap();
        let mut pay = H264Payloader::default();
        let mut seq = 0u16;
        let mut feed = |input: &mut VideoInput, bs: Vec<u8>, ts: u32| {
            let p = pay.payload(1200, &Bytes::from(bs)).unwrap();
            let last = p.len() - 1;
            let mut got = Pushed::default();
            let t = Instant::now();
            for (k, pl) in p.into_iter().enumerate() {
                let r = input.push(seq, ts, k == last, &pl, t);
                got.new_picture |= r.new_picture;
                seq = seq.wrapping_add(1);
            }
            // Past the reordering buffer's start wait.
            got.new_picture |= input.poll(t + START).new_picture;
            got
        };
        let mut enc = Encoder::new().unwrap();
        for i in 0..5 {
            let bs = enc.encode(&solid(640, 360, red)).unwrap().to_vec();
            assert!(feed(&mut input, bs, i * 3000).new_picture);
        }
        let f = input.latest().unwrap();
        assert_eq!((f.width, f.height), (640, 360));
        let m = f.mean(Rect::new(100, 100, 200, 100));
        assert!(
            (i32::from(m.0) - i32::from(red.0)).abs() < 6,
            "{m:?} vs {red:?}"
        );
        // The sender scales down: a new encoder, a new SPS, an IDR.
        let mut enc = Encoder::new().unwrap();
        let bs = enc.encode(&solid(320, 180, red)).unwrap().to_vec();
        assert!(feed(&mut input, bs, 5 * 3000).new_picture);
        let f = input.latest().unwrap();
        assert_eq!((f.width, f.height), (320, 180));
        assert_eq!(input.stats().decode_errors, 0);
    }

    /// (seq, ts, marker, payload) of `n` 160x120 frames whose brightness changes; one IDR,
    /// the first.
    fn stream(n: u32) -> Vec<(u16, u32, bool, Bytes)> {
        // No frame skipping: every picture is in the stream.
        let cfg = openh264::encoder::EncoderConfig::new()
            .skip_frames(false)
            .bitrate(openh264::encoder::BitRate::from_bps(2_000_000))
            // The only IDR is the first (a brightness change is no scene change here).
            .intra_frame_period(openh264::encoder::IntraFramePeriod::from_num_frames(0))
            .scene_change_detect(false);
        let mut enc = Encoder::with_api_config(openh264::OpenH264API::from_source(), cfg).unwrap();
        let mut pay = H264Payloader::default();
        let mut out = vec![];
        let mut seq = 100u16;
        for i in 0..n {
            let c = Yuv(((i * 7) % 200 + 20) as u8, 128, 128);
            let bs = enc.encode(&solid(160, 120, c)).unwrap().to_vec();
            let p = pay.payload(100, &Bytes::from(bs)).unwrap();
            let last = p.len() - 1;
            for (k, pl) in p.into_iter().enumerate() {
                out.push((seq, i * 3000, k == last, pl));
                seq = seq.wrapping_add(1);
            }
        }
        out
    }

    fn run(input: &mut VideoInput, packets: &[(u16, u32, bool, Bytes)], t: Instant) -> (u64, u64) {
        // Pictures decoded (one push may release several frames), keyframe requests.
        let (before, mut requests) = (input.stats().frames_decoded, 0);
        for (s, ts, m, p) in packets {
            let r = input.push(*s, *ts, *m, p, t);
            requests += u64::from(r.need_keyframe);
        }
        // Past the reordering buffer's start wait (the first packet waits for reordered ones).
        requests += u64::from(input.poll(t + START).need_keyframe);
        (input.stats().frames_decoded - before, requests)
    }

    #[test]
    fn pictures_kept_while_not_decoding_are_decoded_when_turned_on() {
        let pk = stream(20);
        let mut input = VideoInput::new().unwrap();
        let t = Instant::now();
        assert_eq!(input.set_decode(false, t), Pushed::default());
        let mut units = 0;
        for (s, ts, m, p) in &pk {
            units += input.push(*s, *ts, *m, p, t).units.len();
        }
        units += input.poll(t + START).units.len();
        assert_eq!(units, 20, "every access unit is handed on");
        assert_eq!(input.stats().frames_decoded, 0, "nothing decoded while off");
        let r = input.set_decode(true, t + START);
        assert!(r.new_picture && !r.need_keyframe, "{r:?}");
        assert_eq!(input.stats().frames_decoded, 20, "caught up at once");
        // Off and on again with no IDR in between: decoding must wait for one.
        input.set_decode(false, t + START);
        let r = input.set_decode(true, t + START);
        assert!(r.need_keyframe && !r.new_picture);
    }

    #[test]
    fn decoding_resumed_without_the_pictures_since_the_idr_waits_for_the_next_idr() {
        // 20 pictures, the first an IDR; then a second IDR stream of 5.
        let first = stream(20);
        let mut input = VideoInput::new().unwrap();
        let t = Instant::now();
        let (decoded, _) = run(&mut input, &first[..first.len() / 2], t);
        assert!(decoded > 0);
        // Off while the rest of the first GOP passes, on again before any new IDR: P pictures
        // that refer to what the decoder never saw are not fed to it.
        input.set_decode(false, t);
        let half = first.len() / 2;
        // Turned on after the GOP's start was missed (nothing kept: it was off since mid-GOP).
        input.gop = None;
        let r = input.set_decode(true, t + START);
        assert!(r.need_keyframe);
        let before = input.stats().frames_decoded;
        let (decoded, _) = run(&mut input, &first[half..], t + START);
        assert_eq!(
            decoded, 0,
            "P pictures without their references are not decoded"
        );
        assert_eq!(input.stats().frames_decoded, before);
        // The next IDR (sequence numbers go on where the first stream stopped): decoding
        // resumes.
        let next: Vec<_> = stream(5)
            .into_iter()
            .map(|(s, ts, m, p)| (s.wrapping_add(first.len() as u16), ts + 200_000, m, p))
            .collect();
        let (decoded, _) = run(&mut input, &next, t + START * 3);
        assert_eq!(decoded, 5);
        assert_eq!(input.stats().decode_errors, 0);
    }

    #[test]
    fn reordered_packets_lose_no_picture() {
        let mut pk = stream(30);
        // Swap neighbours all along the stream, as jitter on a phone's link does.
        for i in (1..pk.len() - 1).step_by(3) {
            pk.swap(i, i + 1);
        }
        let mut input = VideoInput::new().unwrap();
        let (pictures, requests) = run(&mut input, &pk, Instant::now());
        assert_eq!(pictures, 30, "{:?}", input.stats());
        assert_eq!(requests, 1, "only the one asked when attaching");
        assert!(input.stats().packets_recovered > 5);
        assert_eq!(input.stats().packets_lost, 0);
    }

    /// Index of the second packet of the first frame from frame 5 on that has several.
    fn victim(pk: &[(u16, u32, bool, Bytes)]) -> usize {
        (1..pk.len())
            .find(|&i| pk[i].1 >= 5 * 3000 && pk[i].1 == pk[i - 1].1)
            .expect("a frame of several packets")
    }

    #[test]
    fn a_retransmitted_packet_repairs_the_frame_without_a_keyframe_request() {
        let pk = stream(20);
        let victim = victim(&pk);
        let mut input = VideoInput::new().unwrap();
        input.set_rtt(Some(Duration::from_millis(60)));
        let t = Instant::now();
        let mut held = pk.clone();
        let lost = held.remove(victim);
        // Everything up to a few packets after the hole, then the retransmission 80 ms later.
        let (a, b) = held.split_at((victim + 4).min(held.len()));
        let (p1, r1) = run(&mut input, a, t);
        assert!(input.deadline().is_some(), "waits for the hole");
        let later = t + Duration::from_millis(80);
        let (p2, r2) = run(&mut input, &[lost], later);
        let (p3, r3) = run(&mut input, b, later);
        assert_eq!(p1 + p2 + p3, 20);
        assert_eq!(r1 + r2 + r3, 1, "only the one asked when attaching");
        assert_eq!(input.stats().packets_recovered, 1);
        assert!(input.stats().max_hold_ms >= 79.0);
    }

    #[test]
    fn an_unrepaired_loss_asks_once_then_again_only_after_the_retry_interval() {
        let pk = stream(20);
        let victim = victim(&pk);
        let before = u64::from(pk[victim].1 / 3000);
        let mut input = VideoInput::new().unwrap();
        let t = Instant::now();
        let mut held = pk.clone();
        held.remove(victim);
        let (pictures, requests) = run(&mut input, &held, t);
        assert_eq!(
            pictures, before,
            "frames before the hole; the rest are held"
        );
        assert_eq!(requests, 1);
        // The hole is given up at its deadline: frames after it need an IDR, asked for once.
        let deadline = input.deadline().unwrap();
        let r = input.poll(deadline);
        assert!(r.need_keyframe && !r.new_picture);
        assert_eq!(input.stats().packets_lost, 1);
        // No IDR comes: nothing more until the retry interval, then one more request.
        assert!(
            !input
                .poll(deadline + Duration::from_millis(500))
                .need_keyframe
        );
        let retry = input.deadline().unwrap();
        assert_eq!(retry, deadline + KEYFRAME_RETRY);
        assert!(input.poll(retry).need_keyframe);
        assert_eq!(input.stats().keyframe_requests, 3);
    }
}
