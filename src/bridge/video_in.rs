//! One participant's video for the compositor: RTP packets in, the latest decoded picture out.
//! Keeps the last good picture when the input stalls or breaks, follows resolution changes
//! (WebRTC senders scale down under bandwidth pressure) and says when a keyframe is needed.

use bytes::Bytes;
use openh264::decoder::Decoder;

use super::compose::I420;
use crate::media::rtp_h264::{Assembler, Output};

#[derive(Debug, thiserror::Error)]
pub enum VideoInError {
    #[error("decoder: {0}")]
    Decoder(String),
}

pub struct VideoInput {
    assembler: Assembler,
    decoder: Decoder,
    /// Shared with the compositor's queue without copying the picture again.
    latest: Option<std::sync::Arc<I420>>,
    /// RTP timestamp of `latest`.
    latest_ts: Option<u32>,
    pub frames_decoded: u64,
    pub decode_errors: u64,
}

/// What one packet produced.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pushed {
    /// A new picture replaced the latest one.
    pub new_picture: bool,
    /// Ask the publisher for a keyframe.
    pub need_keyframe: bool,
}

impl VideoInput {
    pub fn new() -> Result<Self, VideoInError> {
        Ok(Self {
            assembler: Assembler::new(),
            decoder: Decoder::new().map_err(|e| VideoInError::Decoder(e.to_string()))?,
            latest: None,
            latest_ts: None,
            frames_decoded: 0,
            decode_errors: 0,
        })
    }

    pub fn push(&mut self, seq: u16, ts: u32, marker: bool, payload: &Bytes) -> Pushed {
        let mut r = Pushed::default();
        for out in self.assembler.push(seq, ts, marker, payload) {
            match out {
                Output::NeedKeyframe => r.need_keyframe = true,
                Output::Frame(au) => match self.decoder.decode(&au.annexb) {
                    Ok(Some(pic)) => {
                        // Copied out: the decoder reuses its buffer for the next picture.
                        let f = I420::from_yuv(&pic);
                        self.latest = Some(std::sync::Arc::new(f));
                        self.latest_ts = Some(au.rtp_timestamp);
                        self.frames_decoded += 1;
                        r.new_picture = true;
                    }
                    Ok(None) => {}
                    Err(_) => {
                        // A picture the decoder rejects: keep showing the last good one and
                        // get a fresh keyframe.
                        self.decode_errors += 1;
                        r.need_keyframe = true;
                    }
                },
            }
        }
        r
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
            for (k, pl) in p.into_iter().enumerate() {
                let r = input.push(seq, ts, k == last, &pl);
                got.new_picture |= r.new_picture;
                seq = seq.wrapping_add(1);
            }
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
        assert_eq!(input.decode_errors, 0);
    }
}
