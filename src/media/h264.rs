//! H.264 bitstream helpers: Annex B splitting, AVCC (length-prefixed) conversion, the
//! AVCDecoderConfigurationRecord FLV/MP4 need, and reading the picture size from an SPS.
//! Pure functions over byte slices; malformed input yields `None`/empty, never a panic.

pub const NAL_IDR: u8 = 5;
pub const NAL_SPS: u8 = 7;
pub const NAL_PPS: u8 = 8;

pub fn nal_type(nal: &[u8]) -> u8 {
    nal.first().map_or(0, |b| b & 0x1f)
}

/// NAL units of an Annex B stream (start codes 00 00 01 or 00 00 00 01), without start codes.
pub fn split_annexb(data: &[u8]) -> Vec<&[u8]> {
    // Non-overlapping matches, as a left-to-right scan finds them (SIMD: this runs over every
    // access unit of every host passed through).
    let starts: Vec<usize> = memchr::memmem::find_iter(data, &[0, 0, 1])
        .map(|i| i + 3)
        .collect();
    let mut out = Vec::with_capacity(starts.len());
    for (k, &s) in starts.iter().enumerate() {
        let mut end = starts.get(k + 1).map_or(data.len(), |n| n - 3);
        // A 4-byte start code leaves a zero before the next 00 00 01; trailing zeros too.
        while end > s && data[end - 1] == 0 {
            end -= 1;
        }
        if end > s {
            out.push(&data[s..end]);
        }
    }
    out
}

/// NAL units with 4-byte big-endian length prefixes (FLV/MP4 sample format).
pub fn to_avcc<'a>(nals: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for n in nals {
        out.extend_from_slice(&(n.len() as u32).to_be_bytes());
        out.extend_from_slice(n);
    }
    out
}

/// NAL units of an AVCC sample with 4-byte lengths; `None` if the lengths do not add up.
pub fn split_avcc(data: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = vec![];
    let mut i = 0usize;
    while i < data.len() {
        let len = u32::from_be_bytes(data.get(i..i + 4)?.try_into().ok()?) as usize;
        i += 4;
        out.push(data.get(i..i.checked_add(len)?)?);
        i += len;
    }
    Some(out)
}

/// AVCDecoderConfigurationRecord (ISO 14496-15 §5.2.4.1) for one SPS and one PPS, with
/// 4-byte NAL lengths.
pub fn decoder_config(sps: &[u8], pps: &[u8]) -> Option<Vec<u8>> {
    if sps.len() < 4 || pps.is_empty() || sps.len() > 0xffff || pps.len() > 0xffff {
        return None;
    }
    let mut out = vec![
        1,      // configurationVersion
        sps[1], // AVCProfileIndication
        sps[2], // profile_compatibility
        sps[3], // AVCLevelIndication
        0xff,   // 6 reserved bits + lengthSizeMinusOne = 3
        0xe1,   // 3 reserved bits + numOfSequenceParameterSets = 1
    ];
    out.extend_from_slice(&(sps.len() as u16).to_be_bytes());
    out.extend_from_slice(sps);
    out.push(1); // numOfPictureParameterSets
    out.extend_from_slice(&(pps.len() as u16).to_be_bytes());
    out.extend_from_slice(pps);
    Some(out)
}

/// Remove emulation-prevention bytes (00 00 03 → 00 00).
pub(crate) fn unescape(nal: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(nal.len());
    let mut zeros = 0;
    for &b in nal {
        if zeros >= 2 && b == 3 {
            zeros = 0;
            continue;
        }
        zeros = if b == 0 { zeros + 1 } else { 0 };
        out.push(b);
    }
    out
}

pub(crate) struct Bits<'a> {
    pub(crate) data: &'a [u8],
    pub(crate) pos: usize,
}

impl Bits<'_> {
    pub(crate) fn bit(&mut self) -> Option<u32> {
        let byte = *self.data.get(self.pos / 8)?;
        let b = (byte >> (7 - self.pos % 8)) & 1;
        self.pos += 1;
        Some(u32::from(b))
    }
    pub(crate) fn bits(&mut self, n: u32) -> Option<u32> {
        let mut v = 0u32;
        for _ in 0..n {
            v = (v << 1) | self.bit()?;
        }
        Some(v)
    }
    /// Unsigned Exp-Golomb.
    pub(crate) fn ue(&mut self) -> Option<u32> {
        let mut zeros = 0;
        while self.bit()? == 0 {
            zeros += 1;
            if zeros > 31 {
                return None;
            }
        }
        Some((1u32 << zeros) - 1 + self.bits(zeros)?)
    }
    pub(crate) fn se(&mut self) -> Option<i32> {
        let k = self.ue()?;
        Some(if k % 2 == 1 {
            k.div_ceil(2) as i32
        } else {
            -((k / 2) as i32)
        })
    }
}

/// Insert emulation-prevention bytes (00 00 0x → 00 00 03 0x for x ≤ 3).
pub fn escape(rbsp: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rbsp.len() + rbsp.len() / 64 + 1);
    let mut zeros = 0;
    for &b in rbsp {
        if zeros >= 2 && b <= 3 {
            out.push(3);
            zeros = 0;
        }
        zeros = if b == 0 { zeros + 1 } else { 0 };
        out.push(b);
    }
    // A trailing zero byte would run into the next start code.
    if rbsp.last() == Some(&0) {
        out.push(3);
    }
    out
}

#[derive(Default)]
pub(crate) struct BitWriter {
    out: Vec<u8>,
    cur: u8,
    n: u8,
}

impl BitWriter {
    pub(crate) fn bit(&mut self, b: u32) {
        self.cur = (self.cur << 1) | (b & 1) as u8;
        self.n += 1;
        if self.n == 8 {
            self.out.push(self.cur);
            self.cur = 0;
            self.n = 0;
        }
    }
    pub(crate) fn bits(&mut self, v: u32, n: u32) {
        for i in (0..n).rev() {
            self.bit(v >> i);
        }
    }
    pub(crate) fn ue(&mut self, v: u32) {
        let x = u64::from(v) + 1;
        let len = 64 - x.leading_zeros();
        for _ in 1..len {
            self.bit(0);
        }
        for i in (0..len).rev() {
            self.bit((x >> i) as u32);
        }
    }
    pub(crate) fn se(&mut self, v: i32) {
        let k = if v > 0 {
            (v as u32) * 2 - 1
        } else {
            v.unsigned_abs() * 2
        };
        self.ue(k);
    }
    /// Append bits `from..to` of `src` (most significant bit first), a byte at a time where
    /// it can: slices are copied whole when their header is rewritten.
    pub(crate) fn copy_bits(&mut self, src: &[u8], mut from: usize, to: usize) {
        while from < to && (!from.is_multiple_of(8) || self.n != 0) && to - from >= 8 {
            // Unaligned: eight bits at a time, read across two source bytes.
            let (i, s) = (from / 8, from % 8);
            let hi = src.get(i).copied().unwrap_or(0);
            let lo = src.get(i + 1).copied().unwrap_or(0);
            let v = if s == 0 {
                hi
            } else {
                (hi << s) | (lo >> (8 - s))
            };
            self.byte(v);
            from += 8;
        }
        if from.is_multiple_of(8) && self.n == 0 && from < to {
            let whole = (to - from) / 8;
            let i = from / 8;
            self.out
                .extend_from_slice(src.get(i..i + whole).unwrap_or_default());
            from += whole * 8;
        }
        while from < to {
            let b = src.get(from / 8).map_or(0, |b| (b >> (7 - from % 8)) & 1);
            self.bit(u32::from(b));
            from += 1;
        }
    }
    /// Eight bits at once.
    fn byte(&mut self, v: u8) {
        if self.n == 0 {
            self.out.push(v);
        } else {
            let n = u32::from(self.n);
            self.out.push((self.cur << (8 - n)) | (v >> n));
            self.cur = v & ((1u8 << n) - 1);
        }
    }
    /// Pad with zero bits to a whole byte.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        while self.n != 0 {
            self.bit(0);
        }
        self.out
    }
}

pub(crate) fn skip_scaling_list(b: &mut Bits<'_>, size: usize) -> Option<()> {
    let (mut last, mut next) = (8i32, 8i32);
    for _ in 0..size {
        if next != 0 {
            // delta_scale is in -128..=127 (§7.4.2.1.1.1); anything else is a broken SPS and
            // would overflow the sum below (found by the h264_parsers fuzz target).
            let delta = b.se()?;
            if !(-128..=127).contains(&delta) {
                return None;
            }
            next = (last + delta + 256) % 256;
        }
        last = if next == 0 { last } else { next };
    }
    Some(())
}

/// The SPS fields this crate needs (ITU-T H.264 §7.3.2.1.1), up to the cropping window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sps {
    pub sps_id: u32,
    pub chroma_format_idc: u32,
    pub log2_max_frame_num: u32,
    pub poc_type: u32,
    pub w_mbs: u32,
    pub h_map_units: u32,
    pub frame_mbs_only: bool,
    /// Cropping offsets: left, right, top, bottom.
    pub crop: (u32, u32, u32, u32),
}

/// Parse an SPS NAL unit (`None` if it is not one or does not parse).
pub(crate) fn parse_sps(sps: &[u8]) -> Option<Sps> {
    if nal_type(sps) != NAL_SPS {
        return None;
    }
    let rbsp = unescape(sps.get(1..)?);
    let mut b = Bits {
        data: &rbsp,
        pos: 0,
    };
    let profile = b.bits(8)?;
    b.bits(16)?; // constraint flags + level
    let sps_id = b.ue()?;
    let mut chroma_format_idc = 1;
    if matches!(
        profile,
        100 | 110 | 122 | 244 | 44 | 83 | 86 | 118 | 128 | 138 | 139 | 134 | 135
    ) {
        chroma_format_idc = b.ue()?;
        if chroma_format_idc == 3 {
            b.bit()?; // separate_colour_plane_flag
        }
        b.ue()?; // bit_depth_luma_minus8
        b.ue()?; // bit_depth_chroma_minus8
        b.bit()?; // qpprime_y_zero_transform_bypass_flag
        if b.bit()? == 1 {
            for i in 0..if chroma_format_idc == 3 { 12 } else { 8 } {
                if b.bit()? == 1 {
                    skip_scaling_list(&mut b, if i < 6 { 16 } else { 64 })?;
                }
            }
        }
    }
    let log2_max_frame_num = b.ue()?.checked_add(4)?;
    let poc_type = b.ue()?;
    if poc_type == 0 {
        b.ue()?;
    } else if poc_type == 1 {
        b.bit()?;
        b.se()?;
        b.se()?;
        let n = b.ue()?;
        if n > 255 {
            return None;
        }
        for _ in 0..n {
            b.se()?;
        }
    }
    b.ue()?; // max_num_ref_frames
    b.bit()?; // gaps_in_frame_num_value_allowed_flag
    let w_mbs = b.ue()?.checked_add(1)?;
    let h_map_units = b.ue()?.checked_add(1)?;
    let frame_mbs_only = b.bit()? == 1;
    if !frame_mbs_only {
        b.bit()?; // mb_adaptive_frame_field_flag
    }
    b.bit()?; // direct_8x8_inference_flag
    let mut crop = (0, 0, 0, 0);
    if b.bit()? == 1 {
        crop = (b.ue()?, b.ue()?, b.ue()?, b.ue()?);
    }
    Some(Sps {
        sps_id,
        chroma_format_idc,
        log2_max_frame_num,
        poc_type,
        w_mbs,
        h_map_units,
        frame_mbs_only,
        crop,
    })
}

/// Coded picture size (width, height) after cropping, from an SPS NAL unit.
pub fn sps_dimensions(sps: &[u8]) -> Option<(u32, u32)> {
    let s = parse_sps(sps)?;
    let (cl, cr, ct, cb) = s.crop;
    let (sub_w, sub_h) = match s.chroma_format_idc {
        0 | 3 => (1, 1),
        2 => (2, 1),
        _ => (2, 2),
    };
    let field = if s.frame_mbs_only { 1 } else { 2 };
    let crop_x = sub_w;
    let crop_y = sub_h * field;
    let width = s
        .w_mbs
        .checked_mul(16)?
        .checked_sub(cl.checked_add(cr)?.checked_mul(crop_x)?)?;
    let height = s
        .h_map_units
        .checked_mul(16 * field)?
        .checked_sub(ct.checked_add(cb)?.checked_mul(crop_y)?)?;
    Some((width, height))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_scaling_delta_is_rejected() {
        // Found by the h264_parsers fuzz target: a High-profile SPS whose scaling list carries
        // a delta_scale of 2^31 - 1 overflowed `last + delta`.
        let mut b = Bits {
            // se() of k = 2^32 - 3 (i32::MAX): 31 zero bits, a one, then 2^31 - 2 in 31 bits.
            data: &[0, 0, 0, 1, 0xff, 0xff, 0xff, 0xfc],
            pos: 0,
        };
        assert_eq!(skip_scaling_list(&mut b, 16), None);
        let crash = [
            0x7a, 0x00, 0x00, 0xff, 0x00, 0x00, 0x00, 0x01, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00,
            0x01, 0x00, 0x00, 0x01, 0x00, 0x04,
        ];
        for nal in split_annexb(&crash) {
            let _ = sps_dimensions(nal);
        }
        let mut sps = vec![0x67];
        sps.extend_from_slice(&crash);
        let _ = sps_dimensions(&sps);
        let _ = decoder_config(&sps, &crash);
    }

    #[test]
    fn annexb_avcc_roundtrip() {
        let stream = [
            0, 0, 0, 1, 0x67, 1, 2, 0, 0, 1, 0x68, 3, 0, 0, 0, 1, 0x65, 4, 5,
        ];
        let nals = split_annexb(&stream);
        assert_eq!(
            nals,
            vec![&[0x67, 1, 2][..], &[0x68, 3][..], &[0x65, 4, 5][..]]
        );
        let avcc = to_avcc(nals.iter().copied());
        assert_eq!(split_avcc(&avcc).unwrap(), nals);
        assert!(split_avcc(&[0, 0, 0, 9, 1]).is_none());
        assert!(split_annexb(&[1, 2, 3]).is_empty());
    }

    #[test]
    fn sps_dimensions_of_real_encoder_output() {
        use openh264::encoder::Encoder;
        use openh264::formats::YUVBuffer;
        for (w, h) in [(1280usize, 720usize), (720, 1280), (320, 180), (642, 362)] {
            let mut enc = Encoder::new().unwrap();
            let frame = YUVBuffer::new(w, h);
            let bs = enc.encode(&frame).unwrap().to_vec();
            let nals = split_annexb(&bs);
            let sps = nals.iter().find(|n| nal_type(n) == NAL_SPS).unwrap();
            assert_eq!(sps_dimensions(sps), Some((w as u32, h as u32)), "{w}x{h}");
            let pps = nals.iter().find(|n| nal_type(n) == NAL_PPS).unwrap();
            assert!(decoder_config(sps, pps).is_some());
        }
        assert_eq!(sps_dimensions(&[0x67]), None);
        assert_eq!(sps_dimensions(&[0x68, 1, 2]), None);
    }

    #[test]
    fn decoder_config_layout() {
        let sps = [0x67, 0x42, 0xc0, 0x1f, 0xaa];
        let pps = [0x68, 0xce, 0x3c, 0x80];
        let c = decoder_config(&sps, &pps).unwrap();
        assert_eq!(&c[..6], &[1, 0x42, 0xc0, 0x1f, 0xff, 0xe1]);
        assert_eq!(&c[6..8], &[0, 5]);
        assert_eq!(c[13], 1);
        assert_eq!(&c[16..], &pps);
    }
}
