//! Parameter-set ids of an H.264 stream: reading them, renumbering them, and one decoder
//! configuration record holding several parameter sets.
//!
//! Why: the bridge's output carries two encoders in one stream, the host's own (passed through
//! while the host is alone) and the bridge's (while mixing), under ONE AVC sequence header that
//! never changes (players re-initialise on any change of it: mpegts.js freezes ~4 s, see
//! `shared/experiments/avc-switch`). H.264 allows several SPS/PPS under distinct ids in one
//! stream, each slice naming its PPS; so the host's sets keep their ids, the bridge encoder's are
//! renumbered to free ids, and its slice headers are rewritten to name them.
//!
//! The ids are Exp-Golomb codes, so a new id may change the header's length and every later bit
//! moves: the RBSP is rewritten up to its stop bit. That is valid for CAVLC slices only (CABAC
//! slice data starts byte-aligned after `cabac_alignment_one_bit`s); [`pps_is_cavlc`] tells.
//! Pure functions over bytes; malformed input yields `None`, never a panic.

use super::h264::{BitWriter, Bits, NAL_PPS, NAL_SPS, escape, nal_type, unescape};

/// Bytes of a slice NAL unit that always hold its first three header fields (three
/// Exp-Golomb codes of at most 65 bits each, with emulation-prevention bytes).
const SLICE_HEADER_BYTES: usize = 32;

/// `seq_parameter_set_id` of an SPS NAL unit.
pub fn sps_id(sps: &[u8]) -> Option<u32> {
    if nal_type(sps) != NAL_SPS {
        return None;
    }
    let rbsp = unescape(sps.get(1..sps.len().min(SLICE_HEADER_BYTES))?);
    let mut b = Bits {
        data: &rbsp,
        pos: 24,
    };
    b.ue()
}

/// (`pic_parameter_set_id`, `seq_parameter_set_id`) of a PPS NAL unit.
pub fn pps_ids(pps: &[u8]) -> Option<(u32, u32)> {
    if nal_type(pps) != NAL_PPS {
        return None;
    }
    let rbsp = unescape(pps.get(1..pps.len().min(SLICE_HEADER_BYTES))?);
    let mut b = Bits {
        data: &rbsp,
        pos: 0,
    };
    Some((b.ue()?, b.ue()?))
}

/// Whether a PPS selects CAVLC entropy coding (`entropy_coding_mode_flag` 0).
pub fn pps_is_cavlc(pps: &[u8]) -> Option<bool> {
    if nal_type(pps) != NAL_PPS {
        return None;
    }
    let rbsp = unescape(pps.get(1..pps.len().min(SLICE_HEADER_BYTES))?);
    let mut b = Bits {
        data: &rbsp,
        pos: 0,
    };
    b.ue()?;
    b.ue()?;
    Some(b.bit()? == 0)
}

/// The first fields of a slice header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SliceHeader {
    pub first_mb: u32,
    /// 0-9; `% 5`: 0 P, 1 B, 2 I, 3 SP, 4 SI.
    pub slice_type: u32,
    pub pps_id: u32,
}

impl SliceHeader {
    pub fn is_b(&self) -> bool {
        self.slice_type % 5 == 1
    }
}

/// The slice header of a coded slice NAL unit (types 1 and 5).
pub fn slice_header(nal: &[u8]) -> Option<SliceHeader> {
    if !matches!(nal_type(nal), 1 | 5) {
        return None;
    }
    let rbsp = unescape(nal.get(1..nal.len().min(SLICE_HEADER_BYTES))?);
    let mut b = Bits {
        data: &rbsp,
        pos: 0,
    };
    Some(SliceHeader {
        first_mb: b.ue()?,
        slice_type: b.ue()?,
        pps_id: b.ue()?,
    })
}

/// Position just past the last 1 bit of `rbsp` (its `rbsp_stop_one_bit`), minus that bit.
fn payload_end(rbsp: &[u8]) -> Option<usize> {
    let (i, last) = rbsp.iter().enumerate().rev().find(|(_, b)| **b != 0)?;
    Some(i * 8 + 7 - last.trailing_zeros() as usize)
}

/// Rewrite the NAL unit with the `count` Exp-Golomb fields that start `skip_ue` fields after
/// bit `fixed` replaced by `values`.
fn replace_ue(nal: &[u8], fixed: usize, skip_ue: usize, values: &[u32]) -> Option<Vec<u8>> {
    let rbsp = unescape(nal.get(1..)?);
    let mut b = Bits {
        data: &rbsp,
        pos: fixed,
    };
    for _ in 0..skip_ue {
        b.ue()?;
    }
    let start = b.pos;
    for _ in values {
        b.ue()?;
    }
    let end = b.pos;
    let stop = payload_end(&rbsp)?;
    if stop < end {
        return None;
    }
    let mut w = BitWriter::default();
    w.copy_bits(&rbsp, 0, start);
    for v in values {
        w.ue(*v);
    }
    w.copy_bits(&rbsp, end, stop);
    w.bit(1); // rbsp_stop_one_bit
    let mut out = vec![*nal.first()?];
    out.extend(escape(&w.finish()));
    Some(out)
}

/// The SPS with `seq_parameter_set_id` set to `id`.
pub fn renumber_sps(sps: &[u8], id: u32) -> Option<Vec<u8>> {
    if nal_type(sps) != NAL_SPS || id > 31 {
        return None;
    }
    // profile_idc, constraint flags and level_idc come first: 24 bits.
    replace_ue(sps, 24, 0, &[id])
}

/// The PPS with its own id set to `pps_id` and its SPS reference to `sps_id`.
pub fn renumber_pps(pps: &[u8], pps_id: u32, sps_id: u32) -> Option<Vec<u8>> {
    if nal_type(pps) != NAL_PPS || pps_id > 255 || sps_id > 31 {
        return None;
    }
    replace_ue(pps, 0, 0, &[pps_id, sps_id])
}

/// The CAVLC slice with its PPS reference set to `pps_id` (other NAL units: unchanged).
pub fn renumber_slice(nal: &[u8], pps_id: u32) -> Option<Vec<u8>> {
    if !matches!(nal_type(nal), 1 | 5) {
        return Some(nal.to_vec());
    }
    if pps_id > 255 {
        return None;
    }
    replace_ue(nal, 0, 2, &[pps_id])
}

/// AVCDecoderConfigurationRecord (ISO 14496-15 §5.2.4.1) holding every SPS and PPS given, with
/// 4-byte NAL lengths. Profile and compatibility come from the first SPS (the compatibility
/// flags are those all SPS share), the level is the highest.
pub fn decoder_config(sps: &[&[u8]], pps: &[&[u8]]) -> Option<Vec<u8>> {
    let first = sps.first()?;
    if sps.len() > 31
        || pps.is_empty()
        || pps.len() > 255
        || sps.iter().any(|s| s.len() < 4 || s.len() > 0xffff)
        || pps.iter().any(|p| p.is_empty() || p.len() > 0xffff)
    {
        return None;
    }
    let compat = sps.iter().fold(0xff, |c, s| c & s[2]);
    let level = sps.iter().map(|s| s[3]).max()?;
    let mut out = vec![
        1,        // configurationVersion
        first[1], // AVCProfileIndication
        compat,   // profile_compatibility
        level,    // AVCLevelIndication
        0xff,     // 6 reserved bits + lengthSizeMinusOne = 3
        0xe0 | sps.len() as u8,
    ];
    for s in sps {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s);
    }
    out.push(pps.len() as u8);
    for p in pps {
        out.extend_from_slice(&(p.len() as u16).to_be_bytes());
        out.extend_from_slice(p);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::h264::{decoder_config as one_config, split_annexb};
    use crate::media::h264_repeat::tests::frame;
    use openh264::decoder::Decoder;
    use openh264::encoder::{Encoder, EncoderConfig};
    use openh264::formats::YUVSource;

    fn annexb(nals: &[Vec<u8>]) -> Vec<u8> {
        let mut au = vec![];
        for n in nals {
            au.extend_from_slice(&[0, 0, 0, 1]);
            au.extend_from_slice(n);
        }
        au
    }

    #[test]
    fn ids_are_read_and_renumbered() {
        let mut enc = Encoder::new().unwrap();
        let bs = enc.encode(&frame(160, 96, 10)).unwrap().to_vec();
        let nals = split_annexb(&bs);
        let sps = nals.iter().find(|n| nal_type(n) == NAL_SPS).unwrap();
        let pps = nals.iter().find(|n| nal_type(n) == NAL_PPS).unwrap();
        let idr = nals.iter().find(|n| nal_type(n) == 5).unwrap();
        assert_eq!(sps_id(sps), Some(0));
        assert_eq!(pps_ids(pps), Some((0, 0)));
        assert_eq!(pps_is_cavlc(pps), Some(true));
        assert_eq!(slice_header(idr).unwrap().pps_id, 0);
        for id in [1u32, 2, 7, 31] {
            let s = renumber_sps(sps, id).unwrap();
            assert_eq!(sps_id(&s), Some(id));
            assert_eq!(
                crate::media::h264::sps_dimensions(&s),
                Some((160, 96)),
                "the rest of the SPS is intact"
            );
            let p = renumber_pps(pps, id + 3, id).unwrap();
            assert_eq!(pps_ids(&p), Some((id + 3, id)));
            let sl = renumber_slice(idr, id + 3).unwrap();
            let h = slice_header(&sl).unwrap();
            assert_eq!((h.pps_id, h.first_mb), (id + 3, 0));
            // Back to the original ids gives the original bytes.
            assert_eq!(renumber_sps(&s, 0).unwrap(), sps.to_vec());
            assert_eq!(renumber_pps(&p, 0, 0).unwrap(), pps.to_vec());
            assert_eq!(renumber_slice(&sl, 0).unwrap(), idr.to_vec());
        }
        assert_eq!(renumber_sps(pps, 1), None);
        assert_eq!(renumber_pps(sps, 1, 1), None);
        assert_eq!(renumber_slice(sps, 1).unwrap(), sps.to_vec());
    }

    /// Two encoders in one stream: A under its own ids, B renumbered to SPS 1 / PPS 1, both
    /// parameter sets given to the decoder up front; switching between them at IDRs decodes
    /// every picture exactly as each encoder alone would.
    #[test]
    fn two_encoders_share_one_stream_under_distinct_ids() {
        let (w, h) = (320usize, 192usize);
        let cfg = || EncoderConfig::new().skip_frames(false);
        let mut a = Encoder::with_api_config(openh264::OpenH264API::from_source(), cfg()).unwrap();
        let mut b = Encoder::with_api_config(
            openh264::OpenH264API::from_source(),
            cfg().bitrate(openh264::encoder::BitRate::from_bps(300_000)),
        )
        .unwrap();
        let (mut ref_a, mut ref_b) = (Decoder::new().unwrap(), Decoder::new().unwrap());
        let mut dec = Decoder::new().unwrap();
        let mut sets: Option<Vec<Vec<u8>>> = None;
        for part in 0..4u8 {
            let use_b = part % 2 == 1;
            if part > 0 {
                if use_b {
                    b.force_intra_frame();
                } else {
                    a.force_intra_frame();
                }
            }
            for i in 0..6u8 {
                let f = frame(w, h, part * 40 + i * 5);
                let (enc, reference) = if use_b {
                    (&mut b, &mut ref_b)
                } else {
                    (&mut a, &mut ref_a)
                };
                let bs = enc.encode(&f).unwrap().to_vec();
                let want = reference
                    .decode(&bs)
                    .unwrap()
                    .expect("picture")
                    .y()
                    .to_vec();
                let nals: Vec<Vec<u8>> = split_annexb(&bs)
                    .into_iter()
                    .map(|n| match (use_b, nal_type(n)) {
                        (true, NAL_SPS) => renumber_sps(n, 1).unwrap(),
                        (true, NAL_PPS) => renumber_pps(n, 1, 1).unwrap(),
                        (true, _) => renumber_slice(n, 1).unwrap(),
                        (false, _) => n.to_vec(),
                    })
                    .collect();
                if sets.is_none() {
                    // Both encoders' sets first, as a decoder configuration record would.
                    let bb = b.encode(&frame(w, h, 0)).unwrap().to_vec();
                    let bn = split_annexb(&bb);
                    let sb = bn.iter().find(|n| nal_type(n) == NAL_SPS).unwrap();
                    let pb = bn.iter().find(|n| nal_type(n) == NAL_PPS).unwrap();
                    let s: Vec<Vec<u8>> = vec![
                        nals[0].clone(),
                        renumber_sps(sb, 1).unwrap(),
                        nals[1].clone(),
                        renumber_pps(pb, 1, 1).unwrap(),
                    ];
                    let rec = decoder_config(&[&s[0], &s[1]], &[&s[2], &s[3]]).expect("a record");
                    assert_eq!(rec[5] & 0x1f, 2);
                    // A record of one set each is what the one-set helper makes.
                    assert_eq!(decoder_config(&[&s[0]], &[&s[2]]), one_config(&s[0], &s[2]));
                    sets = Some(s);
                    // ref_b saw nothing yet; the probe picture went nowhere else.
                    b.force_intra_frame();
                }
                let mut au = vec![];
                if part == 0 && i == 0 {
                    au = annexb(sets.as_ref().unwrap());
                }
                // In-band sets stay out: the decoder has them all from the start.
                let slices: Vec<Vec<u8>> = nals
                    .into_iter()
                    .filter(|n| !matches!(nal_type(n), NAL_SPS | NAL_PPS))
                    .collect();
                au.extend(annexb(&slices));
                let got = dec.decode(&au).unwrap().expect("picture").y().to_vec();
                assert_eq!(got, want, "part {part} picture {i}");
            }
        }
    }

    #[test]
    fn garbage_is_refused_without_panic() {
        for seed in 0..3000u32 {
            let bytes: Vec<u8> = (0..40)
                .map(|i| (seed.wrapping_mul(2654435761).rotate_left(i) >> 5) as u8)
                .collect();
            for t in [0x67u8, 0x68, 0x65, 0x41] {
                let mut nal = vec![t];
                nal.extend_from_slice(&bytes[..(seed as usize % 40)]);
                let _ = sps_id(&nal);
                let _ = pps_ids(&nal);
                let _ = pps_is_cavlc(&nal);
                let _ = slice_header(&nal);
                let _ = renumber_sps(&nal, 3);
                let _ = renumber_pps(&nal, 2, 3);
                let _ = renumber_slice(&nal, 4);
                let _ = decoder_config(&[&nal], &[&nal]);
            }
        }
        assert_eq!(decoder_config(&[], &[&[0x68, 1]]), None);
        assert_eq!(payload_end(&[0, 0]), None);
        assert_eq!(payload_end(&[0b0001_0000]), Some(3));
    }
}
