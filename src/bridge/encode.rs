//! Output encoders of the bridge: H.264 (OpenH264: constrained baseline, so no B-frames, fixed
//! GOP, target bitrate) and AAC-LC (fdk-aac, raw frames for FLV). Parameters are fixed for the
//! encoder's lifetime, so the stream's codec configuration never changes mid-stream.
//!
//! The H.264 encoder can also repeat the previous picture without encoding it (a skipped P
//! picture, see [`crate::media::h264_repeat`]); it then renumbers its later slices and keeps the
//! GOP in output frames itself, so repeats never stretch the keyframe interval.

use openh264::encoder::{
    BitRate, Complexity, Encoder, EncoderConfig, FrameRate, IntraFramePeriod, RateControlMode,
    VuiConfig,
};
use openh264::formats::YUVSlices;

use super::compose::I420;
use crate::media::h264;
use crate::media::h264_ids;
use crate::media::h264_repeat::{self, RepeatParams};

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("h264 encoder: {0}")]
    H264(String),
    #[error("aac encoder: {0}")]
    Aac(String),
}

pub struct EncodedVideo {
    /// AVCDecoderConfigurationRecord, present on keyframes.
    pub config: Option<Vec<u8>>,
    /// The picture in AVCC form: its slices, after the parameter sets on keyframes (for CDNs
    /// that cut HLS segments at IDRs and want them in-band).
    pub avcc: Vec<u8>,
    pub keyframe: bool,
    /// The encoder's output as it came (Annex B, parameter sets included on keyframes), for
    /// RTP packetization.
    pub annexb: Vec<u8>,
    /// The rate control dropped the picture given to `encode`: this repeats the previous one.
    pub dropped: bool,
}

/// OpenH264 settings of the bridge's output, chosen with `cohost-load --scenario codec` (see
/// BENCHMARKS.md), which measures each option's CPU per picture, bitrate and PSNR.
pub fn output_config(bitrate: u32, fps: f32) -> EncoderConfig {
    EncoderConfig::new()
        .bitrate(BitRate::from_bps(bitrate))
        .max_frame_rate(FrameRate::from_hz(fps))
        // Bitrate mode with frame skipping: the only way OpenH264 holds the target on
        // pictures that need more bits than it (noise-like content: 17 Mbit/s came out for
        // 2.5 asked without skipping, 3 with). `encode` sends a dropped picture as a repeat
        // of the previous one, so the output frame rate stays constant for CDNs and players.
        // Camera pictures at the target bitrate had no picture dropped (BENCHMARKS.md).
        .rate_control_mode(RateControlMode::Bitrate)
        .skip_frames(true)
        // Keyframes are forced by output frame count here (repeated pictures never reach
        // the encoder, so its own count would drift); 0 = only the first.
        .intra_frame_period(IntraFramePeriod::from_num_frames(0))
        // A scene change would make the encoder insert an IDR of its own and break the fixed
        // GOP (the compositor "changes scene" at every layout change). Background detection
        // stays on: it skips still regions cheaply, which halved the cost on a desk camera.
        .scene_change_detect(false)
        // Low complexity: 10-15 % less CPU per picture in every run, for 0.05 dB of PSNR.
        .complexity(Complexity::Low)
        // One thread: with one slice per picture more threads only add hand-offs, and the
        // bridge runs one encoder per room, so rooms already spread over the cores.
        .num_threads(1)
        // Pictures are BT.601 limited range (WebRTC decoders output it; the compositor's
        // colours use it). Without saying so in the SPS, players guess BT.709 for HD
        // sizes, and greens come out visibly darker than over WebRTC.
        .vui(VuiConfig::bt601())
}

pub struct H264Encoder {
    enc: Encoder,
    pub width: u32,
    pub height: u32,
    gop: u32,
    /// Output pictures (encoded or repeated) since the last IDR.
    since_idr: u32,
    force: bool,
    /// Set from the first IDR's parameter sets when they allow repeating.
    repeat: Option<RepeatParams>,
    /// Pictures repeated since the last IDR: the encoder's `frame_num`s are this far behind.
    inserted: u32,
    /// `frame_num` of the last picture sent (`None` until one was, or when repeating is off).
    last_frame_num: Option<u32>,
    /// Parameter-set ids the output must carry instead of the encoder's own (SPS, PPS): the
    /// output stream also holds another encoder's sets (see [`crate::media::h264_ids`]).
    ids: Option<(u32, u32)>,
    /// The SPS and PPS of the last keyframe, ids already rewritten.
    params: Option<(Vec<u8>, Vec<u8>)>,
    /// Pictures the encoder was called for (repeats and probes not counted).
    pub encoded: u64,
}

impl H264Encoder {
    pub fn new(
        width: u32,
        height: u32,
        fps: f32,
        bitrate: u32,
        gop_frames: u32,
    ) -> Result<Self, EncodeError> {
        let cfg = output_config(bitrate, fps);
        let enc = Encoder::with_api_config(openh264::OpenH264API::from_source(), cfg)
            .map_err(|e| EncodeError::H264(e.to_string()))?;
        Ok(Self {
            enc,
            width,
            height,
            gop: gop_frames.max(1),
            since_idr: 0,
            force: false,
            repeat: None,
            inserted: 0,
            last_frame_num: None,
            ids: None,
            params: None,
            encoded: 0,
        })
    }

    /// Carry `sps_id` and `pps_id` instead of the encoder's own ids (before the first picture).
    pub fn with_ids(mut self, sps_id: u32, pps_id: u32) -> Self {
        self.ids = Some((sps_id, pps_id));
        self
    }

    /// The encoder's SPS and PPS (as the output carries them) without waiting for the first
    /// picture: encodes one black picture that goes nowhere, and makes the next one an IDR.
    /// OpenH264's parameter sets depend only on its settings, so later IDRs repeat them.
    pub fn probe(&mut self) -> Result<(Vec<u8>, Vec<u8>), EncodeError> {
        if self.params.is_none() {
            let black = I420::new(self.width, self.height, super::compose::Yuv::BLACK);
            self.encode(&black)?;
            self.encoded -= 1;
            self.force = true;
        }
        self.params
            .clone()
            .ok_or_else(|| EncodeError::H264("no parameter sets from the encoder".into()))
    }

    pub fn force_keyframe(&mut self) {
        self.force = true;
    }

    /// Repeat the previous picture as a skipped P picture (no encoding). `None` when that is not
    /// possible now: before the first picture, when a keyframe is due or forced, or when the
    /// stream's parameter sets do not allow it; the caller then encodes.
    pub fn repeat(&mut self) -> Option<EncodedVideo> {
        if self.force || self.since_idr >= self.gop {
            return None;
        }
        self.repeat_previous()
    }

    /// The skipped P picture itself, keyframe or not due.
    fn repeat_previous(&mut self) -> Option<EncodedVideo> {
        let p = self.repeat.as_ref()?;
        let last = self.last_frame_num?;
        let f = (last + 1) % p.max_frame_num();
        let nal = p.skip_slice(f);
        self.last_frame_num = Some(f);
        self.inserted += 1;
        self.since_idr += 1;
        Some(EncodedVideo {
            config: None,
            avcc: h264::to_avcc([nal.as_slice()]),
            keyframe: false,
            annexb: annexb([nal.as_slice()]),
            dropped: false,
        })
    }

    pub fn encode(&mut self, frame: &I420) -> Result<EncodedVideo, EncodeError> {
        // (An encoder's first picture is always an IDR.)
        let want_key = self.force || self.since_idr >= self.gop;
        if want_key {
            self.enc.force_intra_frame();
            self.force = false;
        }
        let (w, h) = (frame.width as usize, frame.height as usize);
        let src = YUVSlices::new((&frame.y, &frame.u, &frame.v), (w, h), (w, w / 2, w / 2));
        let bs = self
            .enc
            .encode(&src)
            .map_err(|e| EncodeError::H264(e.to_string()))?
            .to_vec();
        if bs.is_empty() {
            // The rate control dropped the picture: it needs more bits than the budget has
            // (noise-like content). Show the previous one again, so the frame rate stays
            // constant; a keyframe that was due comes with the next picture instead.
            self.force |= want_key;
            let mut v = self.repeat_previous().ok_or_else(|| {
                EncodeError::H264("the encoder dropped a picture before its first one".into())
            })?;
            v.dropped = true;
            return Ok(v);
        }
        self.encoded += 1;
        let nals = self.renumbered(h264::split_annexb(&bs))?;
        let nals: Vec<&[u8]> = nals.iter().map(|n| n.as_ref()).collect();
        let sps = nals.iter().find(|n| h264::nal_type(n) == h264::NAL_SPS);
        let pps = nals.iter().find(|n| h264::nal_type(n) == h264::NAL_PPS);
        let config = match (sps, pps) {
            (Some(s), Some(p)) => h264::decoder_config(s, p),
            _ => None,
        };
        let keyframe = nals.iter().any(|n| h264::nal_type(n) == h264::NAL_IDR);
        if keyframe {
            self.since_idr = 0;
            self.inserted = 0;
            if let (Some(s), Some(p)) = (sps, pps) {
                if self.repeat.is_none() {
                    self.repeat = RepeatParams::new(s, p);
                }
                self.params = Some((s.to_vec(), p.to_vec()));
            }
        }
        self.since_idr += 1;
        let mut slices: Vec<Vec<u8>> = vec![];
        for n in nals
            .iter()
            .filter(|n| !matches!(h264::nal_type(n), h264::NAL_SPS | h264::NAL_PPS))
        {
            let mut nal = n.to_vec();
            if let Some(p) = self.repeat.as_ref()
                && let Some(f) = h264_repeat::frame_num(p, n)
            {
                let f = (f + self.inserted) % p.max_frame_num();
                if self.inserted > 0 {
                    match p.renumber(n, f) {
                        Some(r) => nal = r,
                        None => {
                            // Cannot keep numbering consistent: stop repeating, restart at
                            // the next picture with a keyframe.
                            self.repeat = None;
                            self.force = true;
                        }
                    }
                }
                self.last_frame_num = Some(f);
            }
            slices.push(nal);
        }
        // FLV and RTP viewers get the same pictures (renumbered slices, parameter sets before
        // keyframes).
        let params: Vec<&[u8]> = if keyframe {
            sps.into_iter().chain(pps).copied().collect()
        } else {
            vec![]
        };
        let avcc = h264::to_avcc(
            params
                .iter()
                .copied()
                .chain(slices.iter().map(|n| n.as_slice())),
        );
        let annexb = annexb(
            params
                .into_iter()
                .chain(slices.iter().map(|n| n.as_slice())),
        );
        Ok(EncodedVideo {
            config,
            avcc,
            keyframe,
            annexb,
            dropped: false,
        })
    }
}

impl H264Encoder {
    /// The encoder's NAL units with the output's parameter-set ids (unchanged without
    /// [`with_ids`](Self::with_ids)).
    fn renumbered<'a>(
        &self,
        nals: Vec<&'a [u8]>,
    ) -> Result<Vec<std::borrow::Cow<'a, [u8]>>, EncodeError> {
        use std::borrow::Cow;
        let Some((sps_id, pps_id)) = self.ids else {
            return Ok(nals.into_iter().map(Cow::Borrowed).collect());
        };
        nals.into_iter()
            .map(|n| {
                match h264::nal_type(n) {
                    h264::NAL_SPS => h264_ids::renumber_sps(n, sps_id),
                    // Renumbering moves the slice bits: CAVLC only (OpenH264 makes nothing else).
                    h264::NAL_PPS => h264_ids::pps_is_cavlc(n)
                        .filter(|c| *c)
                        .and_then(|_| h264_ids::renumber_pps(n, pps_id, sps_id)),
                    _ => h264_ids::renumber_slice(n, pps_id),
                }
                .map(Cow::Owned)
                .ok_or_else(|| {
                    EncodeError::H264("cannot renumber the encoder's parameter sets".into())
                })
            })
            .collect()
    }
}

fn annexb<'a>(nals: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = vec![];
    for n in nals {
        out.extend_from_slice(&[0, 0, 0, 1]);
        out.extend_from_slice(n);
    }
    out
}

/// AAC-LC encoder taking interleaved stereo i16 at 48 kHz, producing raw 1024-sample frames.
pub struct AacEncoder {
    enc: fdk_aac::enc::Encoder,
    pending: Vec<i16>,
    channels: usize,
    /// AudioSpecificConfig for the FLV sequence header.
    pub asc: Vec<u8>,
    /// Samples per channel of priming the encoder puts before the input's first sample (FLV
    /// has no edit list to tell decoders; the bridge drops whole frames of it to keep lip sync).
    pub delay: usize,
}

pub const AAC_FRAME: usize = 1024;

impl AacEncoder {
    pub fn new(sample_rate: u32, stereo: bool, bitrate: u32) -> Result<Self, EncodeError> {
        use fdk_aac::enc::{AudioObjectType, BitRate, ChannelMode, EncoderParams, Transport};
        let enc = fdk_aac::enc::Encoder::new(EncoderParams {
            bit_rate: BitRate::Cbr(bitrate),
            sample_rate,
            transport: Transport::Raw,
            channels: if stereo {
                ChannelMode::Stereo
            } else {
                ChannelMode::Mono
            },
            audio_object_type: AudioObjectType::Mpeg4LowComplexity,
        })
        .map_err(|e| EncodeError::Aac(format!("{e:?}")))?;
        let info = enc.info().map_err(|e| EncodeError::Aac(format!("{e:?}")))?;
        let n = (info.confSize as usize).min(info.confBuf.len());
        let asc = info.confBuf[..n].to_vec();
        let delay = info.nDelay as usize;
        Ok(Self {
            delay,
            enc,
            pending: Vec::new(),
            channels: if stereo { 2 } else { 1 },
            asc,
        })
    }

    /// Feed PCM; returns the AAC frames completed so far (each covers 1024 samples).
    pub fn push(&mut self, pcm: &[i16]) -> Result<Vec<Vec<u8>>, EncodeError> {
        self.pending.extend_from_slice(pcm);
        let block = AAC_FRAME * self.channels;
        let mut out = vec![];
        while self.pending.len() >= block {
            let mut buf = vec![0u8; 8192];
            let info = self
                .enc
                .encode(&self.pending[..block], &mut buf)
                .map_err(|e| EncodeError::Aac(format!("{e:?}")))?;
            self.pending.drain(..info.input_consumed.clamp(1, block));
            if info.output_size > 0 {
                buf.truncate(info.output_size);
                out.push(buf);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::compose::Yuv;

    #[test]
    fn h264_output_has_a_fixed_config_and_gop() {
        let mut e = H264Encoder::new(640, 360, 30.0, 1_000_000, 60).unwrap();
        let mut configs = vec![];
        let mut keys = vec![];
        for i in 0..130u32 {
            let f = I420::new(640, 360, Yuv::from_rgb((i * 2) as u8, 100, 50));
            let v = e.encode(&f).unwrap();
            assert!(!v.avcc.is_empty());
            if v.keyframe {
                keys.push(i);
                configs.push(v.config.clone().unwrap());
            }
        }
        assert_eq!(keys, vec![0, 60, 120]);
        assert!(
            configs.windows(2).all(|w| w[0] == w[1]),
            "SPS/PPS never change"
        );
    }

    /// Every third output picture repeated: keyframes stay every `gop` output frames, and the
    /// stream decodes (OpenH264) with repeats equal to the picture before them.
    #[test]
    fn repeated_pictures_keep_the_gop_and_decode_exactly() {
        use openh264::formats::YUVSource;
        let mut e = H264Encoder::new(320, 192, 30.0, 500_000, 30).unwrap();
        let mut dec = openh264::decoder::Decoder::new().unwrap();
        let mut keys = vec![];
        let (mut repeats, mut last): (u32, Option<Vec<u8>>) = (0, None);
        for i in 0..95u32 {
            let rep = if i % 3 == 2 { e.repeat() } else { None };
            let repeated = rep.is_some();
            let v = match rep {
                Some(v) => v,
                // Steps of 9 in green (about 4 in luma): smaller changes of a flat picture
                // are legitimately coded as "no change" by the encoder's background detection.
                None => e
                    .encode(&I420::new(
                        320,
                        192,
                        Yuv::from_rgb(100, (i * 9 % 200) as u8, 50),
                    ))
                    .unwrap(),
            };
            if v.keyframe {
                keys.push(i);
            }
            let mut au = vec![];
            if let Some(cfg) = &v.config {
                // SPS and PPS from the decoder configuration record.
                let sps_len = usize::from(u16::from_be_bytes([cfg[6], cfg[7]]));
                let sps = &cfg[8..8 + sps_len];
                let pps = &cfg[8 + sps_len + 3..];
                for n in [sps, pps] {
                    au.extend_from_slice(&[0, 0, 0, 1]);
                    au.extend_from_slice(n);
                }
            }
            for n in h264::split_avcc(&v.avcc).unwrap() {
                au.extend_from_slice(&[0, 0, 0, 1]);
                au.extend_from_slice(n);
            }
            let y = dec.decode(&au).unwrap().expect("a picture").y().to_vec();
            if repeated {
                repeats += 1;
                assert!(
                    Some(&y) == last.as_ref(),
                    "picture {i} repeats the one before"
                );
            } else if let Some(prev) = &last {
                assert!(&y != prev, "picture {i} is new");
            }
            last = Some(y);
        }
        assert_eq!(keys, vec![0, 30, 60, 90], "GOP counted in output frames");
        assert!(repeats >= 28, "{repeats}");
    }

    #[test]
    fn dropped_pictures_become_repeats_and_the_bitrate_holds() {
        use openh264::decoder::Decoder;
        let (w, h, target) = (640u32, 360u32, 500_000u32);
        let mut e = H264Encoder::new(w, h, 30.0, target, 60).unwrap();
        let mut dec = Decoder::new().unwrap();
        let mut seed = 0x9e37_79b9u32;
        let (mut bytes, mut dropped, mut keys) = (0usize, 0u32, vec![]);
        for i in 0..150u32 {
            // Fresh noise in every picture: nothing to predict, far more bits than the target
            // (3.8 Mbit/s came out without dropping pictures).
            let mut f = I420::new(w, h, Yuv::BLACK);
            for p in [&mut f.y, &mut f.u, &mut f.v] {
                for v in p.iter_mut() {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    *v = 80 + (seed as u8 & 0x3f);
                }
            }
            let v = e.encode(&f).unwrap();
            dropped += u32::from(v.dropped);
            if v.keyframe {
                keys.push(i);
            }
            bytes += v.avcc.len();
            // Every output frame decodes to a picture, repeats included.
            assert!(
                dec.decode(&v.annexb).unwrap().is_some(),
                "frame {i} gave no picture"
            );
        }
        let bps = bytes as f64 * 8.0 * 30.0 / 150.0;
        assert!(dropped > 0, "no picture was dropped");
        assert!(bps < 1.5 * f64::from(target), "{bps} bit/s for {target}");
        // Keyframes keep the GOP, one frame later at most when one was due on a dropped picture.
        assert_eq!(keys[0], 0);
        for k in keys.windows(2) {
            assert!((60..=62).contains(&(k[1] - k[0])), "keyframes at {keys:?}");
        }
        assert!(keys.len() >= 3, "keyframes at {keys:?}");
    }

    #[test]
    fn aac_frames_come_out_per_1024_samples() {
        let mut a = AacEncoder::new(48000, true, 128_000).unwrap();
        assert_eq!(
            a.asc,
            crate::media::aac::audio_specific_config(48000, 2).unwrap()
        );
        let pcm: Vec<i16> = (0..48000 * 2)
            .map(|i| ((i / 2) as f32 / 10.0).sin() as i16 * 1000)
            .collect();
        let mut frames = 0;
        for chunk in pcm.chunks(1920) {
            frames += a.push(chunk).unwrap().len();
        }
        // 48000 samples = 46.9 frames; the encoder holds back its look-ahead.
        assert!((44..=47).contains(&frames), "{frames}");
    }
}
