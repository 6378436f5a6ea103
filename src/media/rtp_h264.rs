//! H.264 access units from RTP (RFC 6184: single NAL, STAP-A, FU-A), sans-IO.
//!
//! Packets arrive in order from the SFU's subscription (NACK already repaired what it could).
//! A frame with a sequence gap is dropped, and so is everything after it until the next IDR,
//! because P-frames after a loss decode to garbage; the caller is told so it can ask the
//! publisher for a keyframe.

use bytes::Bytes;
use rtc::rtp::codec::h264::H264Packet;
use rtc::rtp::packetizer::Depacketizer;

use super::h264::{NAL_IDR, nal_type, split_annexb};

/// Largest access unit accepted; larger ones are dropped (hostile or broken input).
pub const MAX_ACCESS_UNIT: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessUnit {
    /// Annex B (start-code prefixed) NAL units of one picture.
    pub annexb: Vec<u8>,
    pub rtp_timestamp: u32,
    pub keyframe: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Frame(AccessUnit),
    /// A frame was lost or broken: decoding waits for an IDR; ask the publisher for one.
    NeedKeyframe,
}

/// RTP payload types the checks below look at (RFC 6184 §5.4).
const STAP_A: u8 = 24;
const FU_A: u8 = 28;
const FU_END: u8 = 0x40;

/// Whether a STAP-A payload's aggregated units fit in it exactly. `rtc`'s depacketizer (0.21.1)
/// reads a unit's 2-byte size without checking that both bytes are there and panics (index out
/// of bounds) on a payload whose last unit leaves one byte, e.g. `18 00 01 65 00`; found by the
/// rtp_h264 fuzz target. A publisher controls these bytes, so they are checked here first.
fn stap_a_well_formed(payload: &[u8]) -> bool {
    let mut at = 1;
    while at < payload.len() {
        let Some(size) = payload.get(at..at + 2) else {
            return false;
        };
        at += 2 + (usize::from(size[0]) << 8 | usize::from(size[1]));
    }
    at == payload.len()
}

#[derive(Default)]
pub struct Assembler {
    depacketizer: H264Packet,
    /// Bytes of FU-A fragments the depacketizer holds for an unfinished NAL unit. It buffers
    /// them without limit until a fragment with the end bit arrives, so the assembler counts
    /// them and starts over past [`MAX_ACCESS_UNIT`].
    fragment_bytes: usize,
    current: Vec<u8>,
    current_ts: Option<u32>,
    last_seq: Option<u16>,
    /// The current frame lost a packet.
    broken: bool,
    /// Waiting for an IDR after a loss (or at start).
    waiting_for_idr: bool,
    started: bool,
}

impl Assembler {
    pub fn new() -> Self {
        Self {
            waiting_for_idr: true,
            ..Self::default()
        }
    }

    fn finish(&mut self, out: &mut Vec<Output>) {
        let Some(ts) = self.current_ts.take() else {
            return;
        };
        let data = std::mem::take(&mut self.current);
        if self.broken || data.is_empty() || data.len() > MAX_ACCESS_UNIT {
            self.broken = false;
            if !self.waiting_for_idr {
                self.waiting_for_idr = true;
                out.push(Output::NeedKeyframe);
            }
            return;
        }
        let keyframe = split_annexb(&data).iter().any(|n| nal_type(n) == NAL_IDR);
        if self.waiting_for_idr && !keyframe {
            return;
        }
        self.waiting_for_idr = false;
        out.push(Output::Frame(AccessUnit {
            annexb: data,
            rtp_timestamp: ts,
            keyframe,
        }));
    }

    /// Feed one RTP packet (sequence number, timestamp, marker bit, payload).
    pub fn push(&mut self, seq: u16, timestamp: u32, marker: bool, payload: &Bytes) -> Vec<Output> {
        let mut out = vec![];
        if !self.started {
            self.started = true;
            // Ask at once: the stream may be mid-GOP when we attach.
            out.push(Output::NeedKeyframe);
        }
        let mut lost = false;
        if let Some(last) = self.last_seq {
            let gap = seq.wrapping_sub(last);
            if gap == 0 || gap > 0x8000 {
                // Duplicate or late retransmission of something already handled.
                return out;
            }
            lost = gap > 1;
        }
        self.last_seq = Some(seq);
        if self.current_ts.is_some_and(|t| t != timestamp) {
            // A new picture started without the previous one's marker: its tail was lost
            // (or never sent). The missing packets may also have been this picture's head,
            // so a gap here breaks both.
            self.broken |= lost;
            self.finish(&mut out);
            self.broken = lost;
        } else if lost {
            self.broken = true;
        }
        if self.current_ts.is_none() {
            self.current_ts = Some(timestamp);
        }
        let nal_type = payload.first().map_or(0, |b| b & 0x1f);
        if nal_type == STAP_A && !stap_a_well_formed(payload) {
            tracing::debug!(len = payload.len(), "malformed STAP-A payload dropped");
            self.broken = true;
        } else if nal_type == FU_A
            && payload.get(1).is_some_and(|b| b & FU_END == 0)
            && self.fragment_bytes + payload.len() > MAX_ACCESS_UNIT
        {
            tracing::debug!("FU-A NAL unit larger than {MAX_ACCESS_UNIT} bytes dropped");
            self.depacketizer = H264Packet::default();
            self.fragment_bytes = 0;
            self.broken = true;
        } else {
            self.depacketize(nal_type, payload);
        }
        if marker {
            self.finish(&mut out);
        }
        out
    }

    fn depacketize(&mut self, nal_type: u8, payload: &Bytes) {
        if nal_type == FU_A {
            if payload.get(1).is_some_and(|b| b & FU_END != 0) {
                self.fragment_bytes = 0;
            } else {
                self.fragment_bytes += payload.len();
            }
        }
        match self.depacketizer.depacketize(payload) {
            Ok(nals) => {
                if self.current.len() + nals.len() <= MAX_ACCESS_UNIT {
                    self.current.extend_from_slice(&nals);
                } else {
                    self.broken = true;
                }
            }
            Err(_) => self.broken = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openh264::encoder::Encoder;
    use openh264::formats::YUVBuffer;
    use rtc::rtp::codec::h264::H264Payloader;
    use rtc::rtp::packetizer::Payloader;

    /// (seq, ts, marker, payload) packets of `n` encoded frames, IDR every 10.
    fn packets(n: u32) -> Vec<(u16, u32, bool, Bytes)> {
        let mut enc = Encoder::new().unwrap();
        let mut pay = H264Payloader::default();
        let mut out = vec![];
        let mut seq = 65_530u16; // wraps during the test
        for i in 0..n {
            if i % 10 == 0 {
                enc.force_intra_frame();
            }
            let yuv = vec![(i * 20 % 256) as u8; 160 * 120 * 3 / 2];
            let bs = enc
                .encode(&YUVBuffer::from_vec(yuv, 160, 120))
                .unwrap()
                .to_vec();
            let p = pay.payload(300, &Bytes::from(bs)).unwrap();
            let last = p.len() - 1;
            for (k, pl) in p.into_iter().enumerate() {
                out.push((seq, i * 3000, k == last, pl));
                seq = seq.wrapping_add(1);
            }
        }
        out
    }

    fn frames(outs: &[Output]) -> usize {
        outs.iter()
            .filter(|o| matches!(o, Output::Frame(_)))
            .count()
    }

    #[test]
    fn clean_stream_yields_every_frame_decodable() {
        let mut a = Assembler::new();
        let mut dec = openh264::decoder::Decoder::new().unwrap();
        let mut outs = vec![];
        for (s, t, m, p) in packets(30) {
            outs.extend(a.push(s, t, m, &p));
        }
        assert_eq!(frames(&outs), 30);
        assert_eq!(
            outs[0],
            Output::NeedKeyframe,
            "asks for a keyframe when attaching"
        );
        let mut decoded = 0;
        for o in &outs {
            if let Output::Frame(au) = o
                && dec.decode(&au.annexb).unwrap().is_some()
            {
                decoded += 1;
            }
        }
        assert!(decoded >= 29, "decoded {decoded}");
    }

    #[test]
    fn loss_drops_until_the_next_idr_and_asks_for_one() {
        let mut a = Assembler::new();
        let pk = packets(30);
        // Drop one packet in frame 3 (frames 0..9 form the first GOP).
        let victim = pk.iter().position(|p| p.1 == 3 * 3000).unwrap();
        let mut outs = vec![];
        for (i, (s, t, m, p)) in pk.into_iter().enumerate() {
            if i != victim {
                outs.extend(a.push(s, t, m, &p));
            }
        }
        let need = outs.iter().filter(|o| **o == Output::NeedKeyframe).count();
        assert_eq!(need, 2, "at attach and after the loss");
        // Frames 0-2, then nothing until frame 10 (IDR), then 10-29.
        assert_eq!(frames(&outs), 3 + 20);
        let first_after = outs
            .iter()
            .filter_map(|o| match o {
                Output::Frame(au) => Some(au),
                _ => None,
            })
            .nth(3)
            .unwrap();
        assert!(first_after.keyframe && first_after.rtp_timestamp == 10 * 3000);
    }

    #[test]
    fn garbage_payloads_do_not_panic() {
        let mut a = Assembler::new();
        let mut seed = 7u32;
        for i in 0..2000u16 {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let len = (seed >> 16) as usize % 40;
            let payload: Vec<u8> = (0..len).map(|k| (seed >> (k % 24)) as u8).collect();
            let _ = a.push(i, u32::from(i / 3), i % 3 == 2, &Bytes::from(payload));
        }
    }

    #[test]
    fn truncated_stap_a_is_dropped_not_a_panic() {
        // Found by the rtp_h264 fuzz target: the last aggregated unit's size field has one of
        // its two bytes, and rtc's depacketizer indexed past the end.
        let mut a = Assembler::new();
        let _ = a.push(
            1,
            0,
            false,
            &Bytes::from_static(&[0x18, 0x00, 0x01, 0x65, 0x00]),
        );
        let _ = a.push(2, 0, true, &Bytes::from_static(&[0x18, 0x00]));
        assert!(stap_a_well_formed(&[0x18, 0x00, 0x01, 0x65, 0x00, 0x00]));
        assert!(!stap_a_well_formed(&[0x18, 0x00, 0x05, 0x65]));
    }

    #[test]
    fn endless_fu_a_fragments_are_bounded() {
        // FU-A start and middle fragments, never an end: the depacketizer would buffer them all.
        let mut a = Assembler::new();
        let mut frag = vec![0x7c, 0x85];
        frag.resize(1200, 0xab);
        let frag = Bytes::from(frag);
        for seq in 0..(2 * MAX_ACCESS_UNIT / 1200) as u16 {
            let _ = a.push(seq, 0, false, &frag);
            assert!(a.fragment_bytes <= MAX_ACCESS_UNIT);
        }
        assert!(a.broken);
    }
}
