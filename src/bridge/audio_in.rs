//! One participant's audio for the mixer: Opus RTP payloads in, 48 kHz stereo PCM out, with
//! packet loss concealment for the frames that never arrived.

use bytes::Bytes;

/// Samples per channel at 48 kHz the decoder may produce for one packet (120 ms max).
const MAX_FRAME: usize = 5760;
/// At most this many missing frames are concealed; a longer gap is silence (the mixer pads).
const MAX_CONCEAL: u16 = 5;

#[derive(Debug, thiserror::Error)]
pub enum AudioInError {
    #[error("opus: {0}")]
    Opus(String),
}

pub struct AudioInput {
    decoder: opus::Decoder,
    last_seq: Option<u16>,
    /// Samples per channel of the last decoded packet (concealment uses the same size).
    frame_samples: usize,
    pub decoded: u64,
    pub concealed: u64,
    pub errors: u64,
}

impl AudioInput {
    pub fn new() -> Result<Self, AudioInError> {
        Ok(Self {
            decoder: opus::Decoder::new(48000, opus::Channels::Stereo)
                .map_err(|e| AudioInError::Opus(e.to_string()))?,
            last_seq: None,
            frame_samples: 960,
            decoded: 0,
            concealed: 0,
            errors: 0,
        })
    }

    /// Decode one packet with RTP timestamp `ts`; returns interleaved stereo i16 (concealment
    /// first, if packets were missing before this one) and the RTP timestamp of its first frame.
    pub fn push(&mut self, seq: u16, ts: u32, payload: &Bytes) -> (u32, Vec<i16>) {
        let pcm = self.decode(seq, payload);
        // Everything before this packet's own frames is concealment of the packets just before.
        let own = self.frame_samples.min(pcm.len() / 2);
        let first = ts.wrapping_sub((pcm.len() / 2 - own) as u32);
        (first, pcm)
    }

    fn decode(&mut self, seq: u16, payload: &Bytes) -> Vec<i16> {
        let mut out = Vec::new();
        let mut buf = vec![0i16; MAX_FRAME * 2];
        if let Some(last) = self.last_seq {
            let gap = seq.wrapping_sub(last);
            if gap == 0 || gap > 0x8000 {
                return out; // duplicate or late
            }
            let missing = (gap - 1).min(MAX_CONCEAL);
            for k in 0..missing {
                // The frame just before this packet may be in this packet's in-band FEC
                // (publishers that honour `useinbandfec=1` add it when they see loss); libopus
                // recovers it from there, or conceals it like the others (an empty packet asks
                // for loss concealment).
                let fec = k + 1 == missing && gap - 1 <= MAX_CONCEAL;
                let data: &[u8] = if fec { payload } else { &[] };
                if let Ok(n) = self
                    .decoder
                    .decode(data, &mut buf[..self.frame_samples * 2], fec)
                {
                    out.extend_from_slice(&buf[..n * 2]);
                    self.concealed += 1;
                }
            }
        }
        self.last_seq = Some(seq);
        match self.decoder.decode(payload, &mut buf, false) {
            Ok(n) => {
                self.frame_samples = n.clamp(120, MAX_FRAME);
                out.extend_from_slice(&buf[..n * 2]);
                self.decoded += 1;
            }
            Err(_) => {
                // A corrupt packet: conceal it instead.
                self.errors += 1;
                if let Ok(n) = self
                    .decoder
                    .decode(&[], &mut buf[..self.frame_samples * 2], false)
                {
                    out.extend_from_slice(&buf[..n * 2]);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::goertzel::{left_channel, tone_power};

    fn tone_packets(freq: f32, n: usize) -> Vec<Bytes> {
        let mut enc =
            opus::Encoder::new(48000, opus::Channels::Mono, opus::Application::Voip).unwrap();
        (0..n)
            .map(|f| {
                let pcm: Vec<i16> = (0..960)
                    .map(|k| {
                        let t = (f * 960 + k) as f32 / 48000.0;
                        ((t * freq * std::f32::consts::TAU).sin() * 12000.0) as i16
                    })
                    .collect();
                let mut out = vec![0u8; 400];
                let len = enc.encode(&pcm, &mut out).unwrap();
                out.truncate(len);
                Bytes::from(out)
            })
            .collect()
    }

    #[test]
    fn decodes_a_tone_and_conceals_losses() {
        let mut a = AudioInput::new().unwrap();
        let mut pcm = vec![];
        for (i, p) in tone_packets(440.0, 50).iter().enumerate() {
            if i == 20 || i == 21 {
                continue; // lost
            }
            pcm.extend(a.push(i as u16, i as u32 * 960, p).1);
        }
        assert_eq!(a.concealed, 2);
        // The packet after the loss starts two concealed frames earlier than its own timestamp.
        let mut b = AudioInput::new().unwrap();
        let p = tone_packets(440.0, 3);
        b.push(0, 0, &p[0]);
        assert_eq!(b.push(3, 2880, &p[2]).0, 960);
        assert_eq!(pcm.len(), 50 * 960 * 2, "a continuous 1 s of stereo audio");
        let left = left_channel(&pcm[9600..]);
        assert!(tone_power(&left, 48000.0, 440.0) > 0.3);
        assert!(tone_power(&left, 48000.0, 880.0) < 0.05);
    }

    #[test]
    fn garbage_is_concealed_not_fatal() {
        let mut a = AudioInput::new().unwrap();
        let good = tone_packets(300.0, 3);
        a.push(0, 0, &good[0]);
        let (_, out) = a.push(1, 960, &Bytes::from_static(&[0xff, 0xff, 0xff, 0x00, 0x13]));
        assert!(!out.is_empty() || a.errors == 1);
        assert!(!a.push(2, 1920, &good[2]).1.is_empty());
        assert!(a.push(2, 1920, &good[2]).1.is_empty(), "duplicate ignored");
    }
}
