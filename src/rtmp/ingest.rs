//! RTMP ingest, the sans-IO part: FLV video and audio tag bodies from an RTMP publisher (OBS,
//! ffmpeg) become RTP packets for the room's [`TrackRouter`](crate::sfu::TrackRouter)s. The
//! room side (joining, publishing the tracks) is `crate::participant::rtmp`; this file is pure
//! media conversion and knows nothing of rooms.
//!
//! Video: H.264 is passed through, not transcoded. WebRTC receivers play frames in arrival
//! order and cannot reorder, so only streams without B-frames are accepted: the sequence
//! header's SPS must be the baseline profile (profile_idc 66, which has no B-frames; it is
//! announced as `profile-level-id=42e01f`, what browsers and the bridge decode), and a frame
//! with a non-zero composition time offset (a reordered frame) ends the stream with an error
//! telling the user to set the encoder to baseline. AVCC samples become Annex B and go
//! through the `rtc` crate's RFC 6184 payloader (FU-A for large NAL units, SPS+PPS as one
//! STAP-A); the current SPS and PPS are sent before every IDR. A new sequence header mid-stream
//! (SPS change: resolution or level) replaces the parameter sets, and the next IDR carries the
//! new ones; in-band SPS/PPS in a keyframe do the same. RTP timestamps are the FLV timestamps at
//! 90 kHz from a random base.
//!
//! Audio: AAC-LC (any rate and channel count fdk-aac decodes) is decoded, up/down-mixed to
//! stereo, resampled to 48 kHz (linear interpolation) and encoded to Opus in 20 ms frames;
//! RTP timestamps count samples from the first audio tag's FLV time.
//!
//! Both tracks get synthetic sender reports on one clock (the FLV timeline), so the bridge
//! lines up the publisher's audio and video like it does for WebRTC publishers.

use bytes::Bytes;
use rtc::rtp::codec::h264::H264Payloader;
use rtc::rtp::packetizer::Payloader;

use crate::media::h264::{NAL_IDR, NAL_PPS, NAL_SPS, nal_type};
use crate::media::rtp_h264::MAX_ACCESS_UNIT;
use crate::sfu::{Packet, SenderReport};

/// RTP payload size of video packets (fits any path MTU with SRTP and IP/UDP headers).
pub const VIDEO_MTU: usize = 1200;
/// Payload types on the ingest routers (each subscriber leg rewrites them).
pub const H264_PT: u8 = 125;
pub const OPUS_PT: u8 = 111;
/// What the video track announces: constrained baseline, what browsers and OpenH264 decode.
pub const H264_FMTP: &str =
    "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f";
/// Samples per channel in one 20 ms Opus frame at 48 kHz.
const OPUS_FRAME: usize = 960;
/// Largest PCM frame fdk-aac may return (8 channels x 2048 samples, HE-AAC doubles).
const MAX_PCM: usize = 8 * 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    /// The stream cannot be passed to WebRTC receivers: the publisher must change settings.
    #[error("{0}")]
    Unsupported(String),
    /// One tag was malformed; it was dropped.
    #[error("malformed {0}")]
    Malformed(&'static str),
}

/// What a video tag produced.
#[derive(Debug, Default)]
pub struct VideoOut {
    /// A (new) sequence header was accepted: publish the video track if not yet done.
    pub configured: bool,
    /// The SPS differs from the previous sequence header's.
    pub sps_changed: bool,
    pub packets: Vec<Packet>,
    pub keyframe: bool,
}

fn read_u16(b: &[u8], i: usize) -> Option<usize> {
    Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]) as usize)
}

/// SPS list, PPS list and NAL length size of an AVCDecoderConfigurationRecord.
pub type AvcConfig = (Vec<Vec<u8>>, Vec<Vec<u8>>, usize);

/// SPS and PPS NAL units of an AVCDecoderConfigurationRecord and its NAL length size.
pub fn parse_avc_config(rec: &[u8]) -> Option<AvcConfig> {
    if rec.len() < 7 || rec[0] != 1 {
        return None;
    }
    let len_size = usize::from(rec[4] & 3) + 1;
    let mut i = 5;
    let mut sps = vec![];
    for _ in 0..(rec[5] & 0x1f) {
        let n = read_u16(rec, i + 1)?;
        sps.push(rec.get(i + 3..i + 3 + n)?.to_vec());
        i += 2 + n;
    }
    i += 1;
    let mut pps = vec![];
    for _ in 0..*rec.get(i)? {
        let n = read_u16(rec, i + 1)?;
        pps.push(rec.get(i + 3..i + 3 + n)?.to_vec());
        i += 2 + n;
    }
    if sps.is_empty() || pps.is_empty() || sps.iter().chain(&pps).any(|n| n.is_empty()) {
        return None;
    }
    Some((sps, pps, len_size))
}

/// Split a length-prefixed sample with `len_size`-byte lengths.
fn split_lengths(data: &[u8], len_size: usize) -> Option<Vec<&[u8]>> {
    let mut out = vec![];
    let mut i = 0usize;
    while i < data.len() {
        let mut n = 0usize;
        for k in 0..len_size {
            n = (n << 8) | usize::from(*data.get(i + k)?);
        }
        i += len_size;
        out.push(data.get(i..i.checked_add(n)?)?);
        i += n;
    }
    Some(out)
}

fn check_profile(sps: &[u8]) -> Result<(), IngestError> {
    if nal_type(sps) != NAL_SPS || sps.len() < 4 {
        return Err(IngestError::Malformed("SPS"));
    }
    match sps[1] {
        66 => Ok(()),
        p => {
            let name = match p {
                77 => "main",
                88 => "extended",
                100 => "high",
                110 => "high 10",
                122 => "high 4:2:2",
                244 => "high 4:4:4",
                _ => "non-baseline",
            };
            Err(IngestError::Unsupported(format!(
                "H.264 {name} profile (profile_idc {p}) may use B-frames, which WebRTC receivers \
                 cannot play: set the encoder to the baseline profile (OBS: Output > Profile \
                 'baseline'; ffmpeg: -profile:v baseline -bf 0)"
            )))
        }
    }
}

/// H.264 in FLV (AVC) to RTP.
pub struct VideoIngest {
    sps: Vec<u8>,
    pps: Vec<u8>,
    len_size: usize,
    configured: bool,
    payloader: H264Payloader,
    seq: u16,
    ssrc: u32,
    ts_base: u32,
    pub frames: u64,
}

impl Default for VideoIngest {
    fn default() -> Self {
        Self::new(rand::random(), rand::random(), rand::random())
    }
}

impl VideoIngest {
    pub fn new(ssrc: u32, first_seq: u16, ts_base: u32) -> Self {
        Self {
            sps: vec![],
            pps: vec![],
            len_size: 4,
            configured: false,
            payloader: H264Payloader::default(),
            seq: first_seq,
            ssrc,
            ts_base,
            frames: 0,
        }
    }

    pub fn rtp_timestamp(&self, flv_ms: u32) -> u32 {
        self.ts_base.wrapping_add(flv_ms.wrapping_mul(90))
    }

    fn set_sps(&mut self, sps: &[u8], out: &mut VideoOut) -> Result<(), IngestError> {
        check_profile(sps)?;
        if self.configured && self.sps != sps {
            out.sps_changed = true;
        }
        self.sps = sps.to_vec();
        Ok(())
    }

    /// One FLV video tag body at FLV time `flv_ms`.
    pub fn push(&mut self, body: &[u8], flv_ms: u32) -> Result<VideoOut, IngestError> {
        let mut out = VideoOut::default();
        if body.is_empty() {
            return Err(IngestError::Malformed("video tag"));
        }
        let codec = body[0] & 0x0f;
        if codec != 7 {
            return Err(IngestError::Unsupported(format!(
                "video codec id {codec}: only H.264 (AVC) is accepted"
            )));
        }
        if body[0] >> 4 == 5 {
            // Video info / command frame: nothing to play.
            return Ok(out);
        }
        if body.len() < 5 {
            return Err(IngestError::Malformed("AVC packet"));
        }
        let cts = i32::from_be_bytes([0, body[2], body[3], body[4]]);
        let data = &body[5..];
        match body[1] {
            0 => {
                let (sps, pps, len_size) =
                    parse_avc_config(data).ok_or(IngestError::Malformed("AVC sequence header"))?;
                self.set_sps(&sps[0], &mut out)?;
                self.pps = pps[0].clone();
                self.len_size = len_size;
                self.configured = true;
                out.configured = true;
                Ok(out)
            }
            1 => {
                if !self.configured {
                    // Nothing decodes before the sequence header.
                    return Ok(out);
                }
                if cts != 0 {
                    return Err(IngestError::Unsupported(
                        "the stream has B-frames (reordered frames), which WebRTC receivers \
                         cannot play: set the encoder to the baseline profile / bframes=0 \
                         (OBS: Output > Profile 'baseline'; ffmpeg: -bf 0)"
                            .into(),
                    ));
                }
                let nals = split_lengths(data, self.len_size)
                    .ok_or(IngestError::Malformed("AVC sample lengths"))?;
                let keyframe = nals.iter().any(|n| nal_type(n) == NAL_IDR);
                // In-band parameter sets replace the configured ones.
                for n in &nals {
                    match nal_type(n) {
                        NAL_SPS => self.set_sps(n, &mut out)?,
                        NAL_PPS if !n.is_empty() => self.pps = n.to_vec(),
                        _ => {}
                    }
                }
                let mut annexb = Vec::with_capacity(data.len() + 64);
                if keyframe {
                    for ps in [&self.sps, &self.pps] {
                        annexb.extend_from_slice(&[0, 0, 0, 1]);
                        annexb.extend_from_slice(ps);
                    }
                }
                for n in nals {
                    // Parameter sets are already in front of the IDR; access unit delimiters
                    // and filler data carry nothing for the receiver.
                    if n.is_empty() || matches!(nal_type(n), NAL_SPS | NAL_PPS | 9 | 12) {
                        continue;
                    }
                    annexb.extend_from_slice(&[0, 0, 0, 1]);
                    annexb.extend_from_slice(n);
                }
                if annexb.is_empty() {
                    return Ok(out);
                }
                if annexb.len() > MAX_ACCESS_UNIT {
                    return Err(IngestError::Malformed("oversized access unit"));
                }
                let payloads = self
                    .payloader
                    .payload(VIDEO_MTU, &Bytes::from(annexb))
                    .map_err(|_| IngestError::Malformed("H.264 access unit"))?;
                let ts = self.rtp_timestamp(flv_ms);
                let last = payloads.len().saturating_sub(1);
                for (k, payload) in payloads.into_iter().enumerate() {
                    let mut p = Packet::default();
                    p.header.version = 2;
                    p.header.payload_type = H264_PT;
                    p.header.sequence_number = self.seq;
                    p.header.timestamp = ts;
                    p.header.ssrc = self.ssrc;
                    p.header.marker = k == last;
                    p.payload = payload;
                    self.seq = self.seq.wrapping_add(1);
                    out.packets.push(p);
                }
                self.frames += 1;
                out.keyframe = keyframe;
                Ok(out)
            }
            // End of sequence, or unknown packet types: nothing to send.
            _ => Ok(out),
        }
    }
}

/// Linear-interpolation resampler of interleaved stereo i16 to 48 kHz, keeping its phase
/// across calls so frame boundaries do not click.
struct Resampler {
    from: u32,
    /// Position of the next output sample in input frames, relative to `prev`'s frame (-1).
    pos: f64,
    prev: [i16; 2],
}

impl Resampler {
    fn new(from: u32) -> Self {
        Self {
            from,
            pos: 0.0,
            prev: [0, 0],
        }
    }

    fn process(&mut self, input: &[i16], out: &mut Vec<i16>) {
        if self.from == 48_000 {
            out.extend_from_slice(input);
            return;
        }
        let frames = input.len() / 2;
        if frames == 0 {
            return;
        }
        let step = f64::from(self.from) / 48_000.0;
        // Frame k of the virtual signal: k = -1 is `prev`, 0.. are `input`.
        let at = |k: isize, c: usize| -> f64 {
            if k < 0 {
                f64::from(self.prev[c])
            } else {
                f64::from(input[k as usize * 2 + c])
            }
        };
        while self.pos < (frames - 1) as f64 + 1.0 {
            let x = self.pos - 1.0;
            let k = x.floor();
            let frac = x - k;
            let k = k as isize;
            for c in 0..2 {
                let a = at(k, c);
                let b = at(k + 1, c);
                out.push((a + (b - a) * frac).round().clamp(-32768.0, 32767.0) as i16);
            }
            self.pos += step;
        }
        self.pos -= frames as f64;
        self.prev = [input[(frames - 1) * 2], input[(frames - 1) * 2 + 1]];
    }
}

/// AAC in FLV to Opus RTP.
pub struct AudioIngest {
    decoder: Option<fdk_aac::dec::Decoder>,
    resampler: Option<Resampler>,
    pcm: Vec<i16>,
    fifo: Vec<i16>,
    encoder: opus::Encoder,
    opus_buf: Vec<u8>,
    seq: u16,
    ssrc: u32,
    ts_base: u32,
    /// FLV time (ms) of the first audio sample and samples (per channel) encoded since.
    start_ms: Option<u32>,
    samples_out: u64,
    pub decode_errors: u64,
}

impl AudioIngest {
    pub fn new(ssrc: u32, first_seq: u16, ts_base: u32) -> Result<Self, IngestError> {
        let mut encoder =
            opus::Encoder::new(48_000, opus::Channels::Stereo, opus::Application::Audio)
                .map_err(|e| IngestError::Unsupported(format!("opus encoder: {e}")))?;
        let _ = encoder.set_bitrate(opus::Bitrate::Bits(96_000));
        Ok(Self {
            decoder: None,
            resampler: None,
            pcm: vec![0; MAX_PCM],
            fifo: Vec::with_capacity(OPUS_FRAME * 4),
            encoder,
            opus_buf: vec![0; 1500],
            seq: first_seq,
            ssrc,
            ts_base,
            start_ms: None,
            samples_out: 0,
            decode_errors: 0,
        })
    }

    /// RTP timestamp and FLV-timeline milliseconds of the next Opus frame.
    fn next_times(&self) -> (u32, f64) {
        let start = self.start_ms.unwrap_or(0);
        let rtp = self
            .ts_base
            .wrapping_add(start.wrapping_mul(48))
            .wrapping_add(self.samples_out as u32);
        (rtp, f64::from(start) + self.samples_out as f64 / 48.0)
    }

    /// One FLV audio tag body at `flv_ms`: Opus RTP packets (and the last one's FLV time).
    pub fn push(&mut self, body: &[u8], flv_ms: u32) -> Result<Vec<Packet>, IngestError> {
        let Some(&head) = body.first() else {
            return Err(IngestError::Malformed("audio tag"));
        };
        if head >> 4 != 10 {
            return Err(IngestError::Unsupported(format!(
                "audio format {}: only AAC is accepted",
                head >> 4
            )));
        }
        if body.len() < 2 {
            return Err(IngestError::Malformed("AAC packet"));
        }
        let data = &body[2..];
        if body[1] == 0 {
            let mut dec = fdk_aac::dec::Decoder::new(fdk_aac::dec::Transport::Raw);
            dec.config_raw(data)
                .map_err(|_| IngestError::Unsupported("AAC configuration not decodable".into()))?;
            let _ = dec.set_min_output_channels(2);
            let _ = dec.set_max_output_channels(2);
            self.decoder = Some(dec);
            self.resampler = None;
            return Ok(vec![]);
        }
        let Some(dec) = self.decoder.as_mut() else {
            return Ok(vec![]);
        };
        if data.is_empty() {
            return Ok(vec![]);
        }
        if dec.fill(data).is_err() || dec.decode_frame(&mut self.pcm).is_err() {
            self.decode_errors += 1;
            return Err(IngestError::Malformed("AAC frame"));
        }
        let info = dec.stream_info();
        let (rate, ch, n) = (
            info.sampleRate.max(0) as u32,
            info.numChannels.max(0) as usize,
            info.frameSize.max(0) as usize,
        );
        if !(8_000..=96_000).contains(&rate) || ch == 0 || ch * n > self.pcm.len() {
            self.decode_errors += 1;
            return Err(IngestError::Malformed("AAC stream info"));
        }
        let mut stereo = Vec::with_capacity(n * 2);
        for f in self.pcm[..ch * n].chunks_exact(ch) {
            let l = f[0];
            let r = if ch > 1 { f[1] } else { f[0] };
            stereo.extend_from_slice(&[l, r]);
        }
        if self.resampler.as_ref().is_none_or(|r| r.from != rate) {
            self.resampler = Some(Resampler::new(rate));
        }
        if self.start_ms.is_none() {
            self.start_ms = Some(flv_ms);
        }
        if let Some(r) = self.resampler.as_mut() {
            r.process(&stereo, &mut self.fifo);
        }
        let mut out = vec![];
        while self.fifo.len() >= OPUS_FRAME * 2 {
            let frame: Vec<i16> = self.fifo.drain(..OPUS_FRAME * 2).collect();
            let len = self
                .encoder
                .encode(&frame, &mut self.opus_buf)
                .map_err(|_| IngestError::Malformed("Opus encode"))?;
            let (ts, _) = self.next_times();
            let mut p = Packet::default();
            p.header.version = 2;
            p.header.payload_type = OPUS_PT;
            p.header.sequence_number = self.seq;
            p.header.timestamp = ts;
            p.header.ssrc = self.ssrc;
            p.header.marker = self.samples_out == 0;
            p.payload = Bytes::copy_from_slice(&self.opus_buf[..len]);
            self.seq = self.seq.wrapping_add(1);
            self.samples_out += OPUS_FRAME as u64;
            out.push(p);
        }
        Ok(out)
    }

    /// A sender report for the audio track: the next frame's RTP time at its FLV time.
    pub fn sender_report(&self, ntp_base: u64) -> Option<SenderReport> {
        self.start_ms?;
        let (rtp, ms) = self.next_times();
        Some(SenderReport {
            ntp_time: ntp_at(ntp_base, ms),
            rtp_time: rtp,
        })
    }
}

/// NTP time (32.32) of FLV time `ms` given the NTP time of FLV time 0.
pub fn ntp_at(ntp_base: u64, ms: f64) -> u64 {
    ntp_base.wrapping_add((ms / 1000.0 * 4_294_967_296.0) as u64)
}

/// The current wallclock as NTP 32.32.
pub fn ntp_now() -> u64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs() + 2_208_988_800;
    (secs << 32) | ((u64::from(d.subsec_nanos()) << 32) / 1_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::flv;
    use crate::media::h264::{decoder_config, split_annexb, to_avcc};
    use crate::media::rtp_h264::{Assembler, Output};
    use openh264::encoder::Encoder;
    use openh264::formats::YUVBuffer;

    /// Baseline frames from OpenH264 as FLV bodies (config first), IDR every 10.
    fn flv_stream(n: u32, w: usize, h: usize) -> Vec<Vec<u8>> {
        let mut enc = Encoder::new().unwrap();
        let mut out = vec![];
        for i in 0..n {
            if i % 10 == 0 {
                enc.force_intra_frame();
            }
            let yuv = vec![(i * 20 % 256) as u8; w * h * 3 / 2];
            let bs = enc
                .encode(&YUVBuffer::from_vec(yuv, w, h))
                .unwrap()
                .to_vec();
            let nals = split_annexb(&bs);
            if out.is_empty() {
                let sps = nals.iter().find(|n| nal_type(n) == NAL_SPS).unwrap();
                let pps = nals.iter().find(|n| nal_type(n) == NAL_PPS).unwrap();
                out.push(flv::avc_sequence_header(&decoder_config(sps, pps).unwrap()));
            }
            let key = nals.iter().any(|n| nal_type(n) == NAL_IDR);
            let pic: Vec<&[u8]> = nals
                .iter()
                .copied()
                .filter(|n| !matches!(nal_type(n), NAL_SPS | NAL_PPS))
                .collect();
            out.push(flv::avc_frame(key, 0, &to_avcc(pic)));
        }
        out
    }

    #[test]
    fn baseline_flv_becomes_decodable_rtp_with_parameter_sets_before_idr() {
        let mut v = VideoIngest::new(1234, 65_500, 0);
        let mut asm = Assembler::new();
        let mut dec = openh264::decoder::Decoder::new().unwrap();
        let mut decoded = 0;
        let mut keyframes = 0;
        for (i, body) in flv_stream(30, 320, 240).iter().enumerate() {
            let out = v.push(body, (i as u32).saturating_sub(1) * 33).unwrap();
            if i == 0 {
                assert!(out.configured && out.packets.is_empty());
            }
            for p in &out.packets {
                assert!(p.payload.len() <= VIDEO_MTU);
                assert_eq!(p.header.ssrc, 1234);
            }
            if out.keyframe {
                keyframes += 1;
                // The first packet of an IDR is the STAP-A (type 24) with SPS and PPS.
                assert_eq!(out.packets[0].payload[0] & 0x1f, 24);
            }
            for p in out.packets {
                for o in asm.push(
                    p.header.sequence_number,
                    p.header.timestamp,
                    p.header.marker,
                    &p.payload,
                ) {
                    if let Output::Frame(au) = o
                        && dec.decode(&au.annexb).unwrap().is_some()
                    {
                        decoded += 1;
                    }
                }
            }
        }
        assert_eq!(keyframes, 3);
        assert_eq!(decoded, 30);
        assert_eq!(v.rtp_timestamp(1000), 90_000);
    }

    #[test]
    fn b_frames_and_other_profiles_and_codecs_are_refused_with_advice() {
        let stream = flv_stream(2, 160, 120);
        let mut v = VideoIngest::default();
        v.push(&stream[0], 0).unwrap();
        // Same frame with a composition time offset: a reordered (B-frame) stream.
        let mut b = stream[1].clone();
        b[4] = 66;
        let e = v.push(&b, 33).unwrap_err();
        assert!(
            matches!(&e, IngestError::Unsupported(m) if m.contains("B-frames")),
            "{e}"
        );
        // A high-profile SPS in the sequence header.
        let sps = [0x67, 100, 0, 0x1f, 0xac];
        let pps = [0x68, 0xce];
        let hdr = flv::avc_sequence_header(&decoder_config(&sps, &pps).unwrap());
        let e = VideoIngest::default().push(&hdr, 0).unwrap_err();
        assert!(
            matches!(&e, IngestError::Unsupported(m) if m.contains("baseline")),
            "{e}"
        );
        // VP6 (codec id 4).
        let e = VideoIngest::default()
            .push(&[0x14, 0, 0, 0, 0], 0)
            .unwrap_err();
        assert!(matches!(e, IngestError::Unsupported(_)));
        // MP3 audio (format 2).
        let mut a = AudioIngest::new(1, 0, 0).unwrap();
        assert!(matches!(
            a.push(&[0x2f, 1, 2], 0),
            Err(IngestError::Unsupported(_))
        ));
    }

    #[test]
    fn sps_change_mid_stream_is_flagged_and_sent_with_the_next_idr() {
        let a = flv_stream(3, 320, 240);
        let b = flv_stream(3, 640, 360);
        let mut v = VideoIngest::default();
        v.push(&a[0], 0).unwrap();
        v.push(&a[1], 0).unwrap();
        let out = v.push(&b[0], 100).unwrap();
        assert!(out.configured && out.sps_changed);
        let out = v.push(&b[1], 100).unwrap();
        assert!(out.keyframe);
        let mut asm = Assembler::new();
        let mut got = None;
        for p in out.packets {
            for o in asm.push(
                p.header.sequence_number,
                p.header.timestamp,
                p.header.marker,
                &p.payload,
            ) {
                if let Output::Frame(au) = o {
                    got = Some(au);
                }
            }
        }
        let au = got.expect("frame");
        let sps = split_annexb(&au.annexb)
            .into_iter()
            .find(|n| nal_type(n) == NAL_SPS)
            .map(|n| n.to_vec())
            .unwrap();
        assert_eq!(crate::media::h264::sps_dimensions(&sps), Some((640, 360)));
    }

    /// AAC-LC at `rate` Hz mono from fdk-aac: (AudioSpecificConfig, raw frames) of a sine.
    fn aac_stream(rate: u32, channels: u8, frames: usize) -> (Vec<u8>, Vec<Vec<u8>>) {
        use fdk_aac::enc::{
            AudioObjectType, BitRate, ChannelMode, Encoder, EncoderParams, Transport,
        };
        let enc = Encoder::new(EncoderParams {
            bit_rate: BitRate::Cbr(64_000),
            sample_rate: rate,
            transport: Transport::Raw,
            channels: if channels == 1 {
                ChannelMode::Mono
            } else {
                ChannelMode::Stereo
            },
            audio_object_type: AudioObjectType::Mpeg4LowComplexity,
        })
        .unwrap();
        let info = enc.info().unwrap();
        let asc = info.confBuf[..info.confSize as usize].to_vec();
        let mut out = vec![];
        let mut t = 0f32;
        let mut buf = vec![0u8; 4096];
        while out.len() < frames {
            let pcm: Vec<i16> = (0..1024 * channels as usize)
                .map(|k| {
                    if k % channels as usize == 0 {
                        t += 1.0;
                    }
                    ((t * 440.0 * std::f32::consts::TAU / rate as f32).sin() * 8000.0) as i16
                })
                .collect();
            let r = enc.encode(&pcm, &mut buf).unwrap();
            if r.output_size > 0 {
                out.push(buf[..r.output_size].to_vec());
            }
        }
        (asc, out)
    }

    #[test]
    fn aac_at_44100_mono_becomes_48k_stereo_opus_that_decodes() {
        let (asc, frames) = aac_stream(44_100, 1, 100);
        let mut a = AudioIngest::new(7, 0, 1000).unwrap();
        let mut hdr = vec![0xaf, 0];
        hdr.extend_from_slice(&asc);
        assert!(a.push(&hdr, 0).unwrap().is_empty());
        let mut packets = vec![];
        for (i, f) in frames.iter().enumerate() {
            let mut body = vec![0xaf, 1];
            body.extend_from_slice(f);
            packets.extend(
                a.push(&body, 500 + (i as u32 * 1024 * 1000 / 44_100))
                    .unwrap(),
            );
        }
        // 100 frames of 1024 samples at 44.1 kHz = 2.32 s = about 116 Opus frames.
        assert!((110..=117).contains(&packets.len()), "{}", packets.len());
        for w in packets.windows(2) {
            assert_eq!(
                w[1].header.timestamp.wrapping_sub(w[0].header.timestamp),
                960
            );
            assert_eq!(w[1].header.sequence_number, w[0].header.sequence_number + 1);
        }
        assert_eq!(packets[0].header.timestamp, 1000 + 500 * 48);
        let mut dec = opus::Decoder::new(48_000, opus::Channels::Stereo).unwrap();
        let mut pcm = vec![0i16; 960 * 2];
        let mut energy = 0f64;
        for p in &packets[10..] {
            assert_eq!(dec.decode(&p.payload, &mut pcm, false).unwrap(), 960);
            energy += pcm.iter().map(|s| f64::from(*s).powi(2)).sum::<f64>();
        }
        let rms = (energy / ((packets.len() - 10) * 1920) as f64).sqrt();
        assert!(rms > 2000.0, "the tone survives: rms {rms}");
        let sr = a.sender_report(0).unwrap();
        assert_eq!(sr.rtp_time, 1000 + 500 * 48 + packets.len() as u32 * 960);
    }

    #[test]
    fn resampler_keeps_rate_and_phase() {
        let mut r = Resampler::new(44_100);
        let mut out = vec![];
        let ramp: Vec<i16> = (0..44_100)
            .flat_map(|i| [(i / 2) as i16, -((i / 2) as i16)])
            .collect();
        for chunk in ramp.chunks(1024 * 2) {
            r.process(chunk, &mut out);
        }
        let frames = out.len() / 2;
        assert!((47_990..=48_010).contains(&frames), "{frames}");
        // A linear ramp stays monotonic across chunk boundaries.
        for w in out.chunks(2).collect::<Vec<_>>().windows(2) {
            assert!(w[1][0] >= w[0][0]);
        }
    }

    #[test]
    fn random_tags_never_panic() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let stream = flv_stream(3, 160, 120);
        let (asc, aac) = aac_stream(48_000, 2, 3);
        let mut v = VideoIngest::default();
        let mut a = AudioIngest::new(1, 0, 0).unwrap();
        let mut hdr = vec![0xaf, 0];
        hdr.extend_from_slice(&asc);
        for i in 0..3000u32 {
            // Mutate real tags (flip bytes, truncate) or make random ones.
            let mut body = match next() % 4 {
                0 => stream[(next() % 3) as usize].clone(),
                1 => {
                    let mut b = vec![0xaf, 1];
                    b.extend_from_slice(&aac[(next() % 3) as usize]);
                    b
                }
                2 => hdr.clone(),
                _ => (0..next() % 64).map(|_| next() as u8).collect(),
            };
            for _ in 0..next() % 4 {
                if !body.is_empty() {
                    let k = (next() as usize) % body.len();
                    body[k] ^= next() as u8;
                }
            }
            if next() % 5 == 0 {
                let keep = (next() as usize) % (body.len() + 1);
                body.truncate(keep);
            }
            let _ = v.push(&body, i * 33);
            let _ = a.push(&body, i * 21);
            if i % 100 == 0 {
                v = VideoIngest::default();
                v.push(&stream[0], 0).unwrap();
            }
        }
    }
}
