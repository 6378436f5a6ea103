//! Repeating a picture without encoding it: a P slice whose every macroblock is `P_Skip`
//! (a few bytes, no encoder call), and the `frame_num` renumbering of the encoder's later slices
//! that keeps the stream valid around such inserted pictures.
//!
//! Why: the bridge's output frame rate is fixed, but its inputs often deliver fewer pictures
//! (mobile hosts at 15 fps, stalls, static scenes). Encoding an unchanged canvas costs a full
//! encoder call; a skipped picture costs nothing and decodes to exactly the previous picture
//! (all-skip macroblocks predict a zero motion vector from their neighbours, carry no residual,
//! and the deblocking filter has nothing to do between them).
//!
//! The inserted pictures are reference pictures with their own `frame_num`, so the encoder's next
//! slices get `frame_num + inserted` (fixed-length field: rewritten in place). With one reference
//! frame (the encoder's setting) the encoder's next P picture then predicts from the inserted
//! picture, whose pixels equal the encoder's own reconstruction. Only the parameter sets this
//! supports are accepted (CAVLC, frames only, `pic_order_cnt_type` 2, one slice group, no
//! weighted prediction, no redundant pictures); anything else gets `None` and the caller encodes
//! as usual. Pure functions over bytes; malformed input yields `None`, never a panic.

pub use super::h264::escape;
use super::h264::{BitWriter, Bits, NAL_PPS, NAL_SPS, nal_type, parse_sps, unescape};

/// What the inserted slice and the renumbering need from the SPS and PPS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepeatParams {
    log2_max_frame_num: u32,
    mbs: u32,
    pps_id: u32,
    deblocking_control: bool,
}

impl RepeatParams {
    /// `None` unless the stream is one this module can extend safely.
    pub fn new(sps: &[u8], pps: &[u8]) -> Option<Self> {
        if nal_type(sps) != NAL_SPS || nal_type(pps) != NAL_PPS {
            return None;
        }
        let sps = parse_sps(sps)?;
        let log2_max_frame_num = sps.log2_max_frame_num;
        // pic_order_cnt_type 0/1 would need POC fields rewritten too; fields are not handled.
        if log2_max_frame_num > 16 || sps.poc_type != 2 || !sps.frame_mbs_only {
            return None;
        }
        let sps_id = sps.sps_id;
        let mbs = sps.w_mbs.checked_mul(sps.h_map_units)?;

        let rbsp = unescape(pps.get(1..)?);
        let mut b = Bits {
            data: &rbsp,
            pos: 0,
        };
        let pps_id = b.ue()?;
        if b.ue()? != sps_id {
            return None;
        }
        if b.bit()? != 0 {
            return None; // CABAC
        }
        b.bit()?; // bottom_field_pic_order_in_frame_present_flag (unused with POC type 2)
        if b.ue()? != 0 {
            return None; // slice groups
        }
        b.ue()?; // num_ref_idx_l0_default_active_minus1 (overridden in the slice)
        b.ue()?; // num_ref_idx_l1_default_active_minus1
        if b.bit()? != 0 {
            return None; // weighted prediction
        }
        b.bits(2)?; // weighted_bipred_idc
        b.se()?; // pic_init_qp_minus26
        b.se()?; // pic_init_qs_minus26
        b.se()?; // chroma_qp_index_offset
        let deblocking_control = b.bit()? == 1;
        b.bit()?; // constrained_intra_pred_flag
        if b.bit()? != 0 {
            return None; // redundant_pic_cnt
        }
        Some(Self {
            log2_max_frame_num,
            mbs,
            pps_id,
            deblocking_control,
        })
    }

    pub fn max_frame_num(&self) -> u32 {
        1 << self.log2_max_frame_num
    }

    /// A P slice NAL unit (reference, `nal_ref_idc` 3) repeating the previous picture.
    pub fn skip_slice(&self, frame_num: u32) -> Vec<u8> {
        let mut w = BitWriter::default();
        w.ue(0); // first_mb_in_slice
        w.ue(5); // slice_type: P, and every slice of the picture is P
        w.ue(self.pps_id);
        w.bits(frame_num % self.max_frame_num(), self.log2_max_frame_num);
        w.bit(1); // num_ref_idx_active_override_flag
        w.ue(0); // num_ref_idx_l0_active_minus1: the previous picture only
        w.bit(0); // ref_pic_list_modification_flag_l0
        w.bit(0); // adaptive_ref_pic_marking_mode_flag: sliding window
        w.se(0); // slice_qp_delta
        if self.deblocking_control {
            w.ue(1); // disable_deblocking_filter_idc: nothing to filter anyway
        }
        w.ue(self.mbs); // mb_skip_run: the whole picture
        w.bit(1); // rbsp_stop_one_bit
        let mut nal = vec![0x61]; // nal_ref_idc 3, type 1 (non-IDR slice)
        nal.extend(escape(&w.finish()));
        nal
    }

    /// The same slice NAL unit with `frame_num` replaced (IDR and non-slice NAL units are
    /// returned unchanged; `None` if the header does not parse).
    pub fn renumber(&self, nal: &[u8], frame_num: u32) -> Option<Vec<u8>> {
        if nal_type(nal) != 1 {
            return Some(nal.to_vec());
        }
        let mut rbsp = unescape(nal.get(1..)?);
        let mut b = Bits {
            data: &rbsp,
            pos: 0,
        };
        b.ue()?; // first_mb_in_slice
        b.ue()?; // slice_type
        if b.ue()? != self.pps_id {
            return None;
        }
        let at = b.pos;
        b.bits(self.log2_max_frame_num)?;
        let v = frame_num % self.max_frame_num();
        for i in 0..self.log2_max_frame_num as usize {
            let bit = (v >> (self.log2_max_frame_num as usize - 1 - i)) & 1;
            let (byte, shift) = ((at + i) / 8, 7 - (at + i) % 8);
            let slot = rbsp.get_mut(byte)?;
            *slot = (*slot & !(1 << shift)) | ((bit as u8) << shift);
        }
        let mut out = vec![*nal.first()?];
        out.extend(escape(&rbsp));
        Some(out)
    }
}

/// Bytes of a slice NAL unit that always hold the fields up to `frame_num` (three Exp-Golomb
/// codes of at most 65 bits each, 16 bits of `frame_num`, emulation-prevention bytes).
const HEADER_BYTES: usize = 48;

/// The `frame_num` a slice NAL unit carries (`None` for other NAL units or bad headers).
pub fn frame_num(p: &RepeatParams, nal: &[u8]) -> Option<u32> {
    if !matches!(nal_type(nal), 1 | 5) {
        return None;
    }
    // The header fields up to frame_num fit in a few bytes: unescape only those, not the
    // whole slice (this runs for every output picture).
    let rbsp = unescape(nal.get(1..nal.len().min(HEADER_BYTES))?);
    let mut b = Bits {
        data: &rbsp,
        pos: 0,
    };
    b.ue()?;
    b.ue()?;
    b.ue()?;
    b.bits(p.log2_max_frame_num)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::media::h264::split_annexb;
    use openh264::decoder::Decoder;
    use openh264::encoder::{Encoder, EncoderConfig};
    use openh264::formats::{YUVBuffer, YUVSource};

    /// A picture with a horizontal gradient, different for each `shade` (also used by
    /// `h264_ids`'s tests).
    pub(crate) fn frame(w: usize, h: usize, shade: u8) -> YUVBuffer {
        let mut rgb = vec![0u8; w * h * 3];
        for (i, px) in rgb.chunks_mut(3).enumerate() {
            let x = (i % w) as u8;
            px.copy_from_slice(&[x.wrapping_add(shade), shade, 255 - shade]);
        }
        YUVBuffer::from_rgb_source(openh264::formats::RgbSliceU8::new(&rgb, (w, h)))
    }

    #[test]
    fn bit_writer_and_escape() {
        let mut w = BitWriter::default();
        w.ue(0);
        w.ue(1);
        w.ue(2);
        w.se(-1);
        w.bit(1);
        // 1 010 011 011 1 -> 1010 0110 111(0 0000)
        assert_eq!(w.finish(), vec![0b1010_0110, 0b1110_0000]);
        assert_eq!(escape(&[0, 0, 1, 0, 0, 0]), vec![0, 0, 3, 1, 0, 0, 3, 0, 3]);
        assert_eq!(
            unescape(&escape(&[0, 0, 0, 0, 2, 5])),
            vec![0, 0, 0, 0, 2, 5]
        );
    }

    /// Encoder pictures, inserted skip pictures and renumbered encoder pictures decode (with
    /// OpenH264's decoder) to exactly what the encoder alone would show.
    #[test]
    fn skipped_pictures_repeat_exactly_and_the_stream_stays_decodable() {
        let (w, h) = (320usize, 192usize);
        let mut enc = Encoder::with_api_config(
            openh264::OpenH264API::from_source(),
            EncoderConfig::new().skip_frames(false),
        )
        .unwrap();
        let mut dec = Decoder::new().unwrap();
        // Fed the encoder's own stream, untouched: what viewers must see.
        let mut reference = Decoder::new().unwrap();
        let mut params: Option<RepeatParams> = None;
        let mut inserted = 0u32;
        let mut last_luma: Option<Vec<u8>> = None;
        for i in 0..12u8 {
            let bs = enc.encode(&frame(w, h, i * 9)).unwrap().to_vec();
            let nals = split_annexb(&bs);
            if params.is_none() {
                let sps = nals.iter().find(|n| nal_type(n) == NAL_SPS).unwrap();
                let pps = nals.iter().find(|n| nal_type(n) == NAL_PPS).unwrap();
                params = Some(RepeatParams::new(sps, pps).expect("OpenH264's SPS/PPS supported"));
            }
            let p = params.as_ref().unwrap();
            let want = reference
                .decode(&bs)
                .unwrap()
                .expect("picture")
                .y()
                .to_vec();
            let mut au = vec![];
            for n in &nals {
                let fixed = if nal_type(n) == 1 {
                    let f = frame_num(p, n).unwrap();
                    p.renumber(n, f + inserted).unwrap()
                } else {
                    n.to_vec()
                };
                au.extend_from_slice(&[0, 0, 0, 1]);
                au.extend_from_slice(&fixed);
            }
            let pic = dec.decode(&au).unwrap().expect("picture");
            let luma = pic.y().to_vec();
            assert_eq!(luma, want, "picture {i} decodes as the encoder meant");
            // After every second picture, insert two repeats of it.
            if i % 2 == 1 {
                let mut f = nals.iter().find_map(|n| frame_num(p, n)).unwrap() + inserted;
                for _ in 0..2 {
                    f += 1;
                    inserted += 1;
                    let mut au = vec![0, 0, 0, 1];
                    au.extend(p.skip_slice(f));
                    let rep = dec.decode(&au).unwrap().expect("repeated picture");
                    assert_eq!(rep.y(), &luma[..], "a skipped picture repeats exactly");
                }
            }
            assert_ne!(last_luma.as_ref(), Some(&luma), "pictures change");
            last_luma = Some(luma);
        }
        assert_eq!(inserted, 12);
    }

    #[test]
    fn unsupported_or_garbage_parameter_sets_are_refused() {
        assert_eq!(RepeatParams::new(&[0x67], &[0x68]), None);
        assert_eq!(RepeatParams::new(&[0x68, 1, 2], &[0x67, 1]), None);
        for seed in 0..2000u32 {
            let bytes: Vec<u8> = (0..24)
                .map(|i| (seed.wrapping_mul(2654435761).rotate_left(i) >> 3) as u8)
                .collect();
            let mut sps = vec![0x67];
            sps.extend_from_slice(&bytes);
            let mut pps = vec![0x68];
            pps.extend_from_slice(&bytes[3..]);
            if let Some(p) = RepeatParams::new(&sps, &pps) {
                let _ = p.renumber(&sps, 3);
                let _ = p.skip_slice(7);
            }
            let mut slice = vec![0x41];
            slice.extend_from_slice(&bytes);
            let p = RepeatParams {
                log2_max_frame_num: 16,
                mbs: 10,
                pps_id: 0,
                deblocking_control: true,
            };
            let _ = p.renumber(&slice, 5);
            let _ = frame_num(&p, &slice);
        }
    }
}
