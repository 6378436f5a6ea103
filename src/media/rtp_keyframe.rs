//! Does this RTP packet start a keyframe? Read from the payload alone (no depacketizing), so a
//! forwarder can decide per packet where a decoder could join a stream: a simulcast layer switch
//! or a resume is only clean at the first packet of a keyframe.
//!
//! Bad or short payloads answer `false`: a packet we cannot read is never a switch point.

/// H.264 (RFC 6184): an IDR slice (type 5) or an SPS (type 7), as a single NAL unit, inside a
/// STAP-A, or as the first fragment of an FU-A.
///
/// SPS counts because encoders (Chrome's OpenH264 included) send SPS and PPS right before each
/// IDR, usually in the same STAP-A or as separate packets ahead of it: the packet carrying the SPS
/// is the first one of the keyframe, and switching there gives the decoder its parameter sets.
pub fn h264_is_keyframe(payload: &[u8]) -> bool {
    const IDR: u8 = 5;
    const SPS: u8 = 7;
    const STAP_A: u8 = 24;
    const FU_A: u8 = 28;
    let starts = |t: u8| t == IDR || t == SPS;
    let Some(&first) = payload.first() else {
        return false;
    };
    match first & 0x1f {
        STAP_A => {
            // [hdr][size16][nal]...[size16][nal]
            let mut rest = &payload[1..];
            while rest.len() >= 2 {
                let size = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                let Some(nal) = rest.get(2..2 + size) else {
                    return false;
                };
                if nal.first().is_some_and(|h| starts(h & 0x1f)) {
                    return true;
                }
                rest = &rest[2 + size..];
            }
            false
        }
        // FU header: S|E|R|type. Only the first fragment starts the picture.
        FU_A => payload
            .get(1)
            .is_some_and(|fu| fu & 0x80 != 0 && starts(fu & 0x1f)),
        t => starts(t),
    }
}

/// The SPS NAL unit an H.264 RTP payload carries whole (single NAL unit or inside a STAP-A),
/// for reading a simulcast layer's picture size at its keyframes. An SPS split across FU-A
/// fragments (never seen: SPS are tens of bytes) is not found.
pub fn h264_sps(payload: &[u8]) -> Option<&[u8]> {
    const SPS: u8 = 7;
    const STAP_A: u8 = 24;
    let first = *payload.first()?;
    match first & 0x1f {
        SPS => Some(payload),
        STAP_A => {
            let mut rest = &payload[1..];
            while rest.len() >= 2 {
                let size = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                let nal = rest.get(2..2 + size)?;
                if nal.first().is_some_and(|h| h & 0x1f == SPS) {
                    return Some(nal);
                }
                rest = &rest[2 + size..];
            }
            None
        }
        _ => None,
    }
}

/// VP8 (RFC 7741): the first packet of partition 0 (S=1, PID=0) whose VP8 payload header has the
/// inverse keyframe bit P cleared.
pub fn vp8_is_keyframe(payload: &[u8]) -> bool {
    let Some(&b0) = payload.first() else {
        return false;
    };
    let extended = b0 & 0x80 != 0;
    let start = b0 & 0x10 != 0;
    let partition = b0 & 0x07;
    if !start || partition != 0 {
        return false;
    }
    let mut i = 1;
    if extended {
        let Some(&x) = payload.get(1) else {
            return false;
        };
        i = 2;
        if x & 0x80 != 0 {
            // PictureID: 7 or 15 bits (M bit).
            let Some(&pid) = payload.get(i) else {
                return false;
            };
            i += if pid & 0x80 != 0 { 2 } else { 1 };
        }
        if x & 0x40 != 0 {
            i += 1; // TL0PICIDX
        }
        if x & 0x30 != 0 {
            i += 1; // TID/Y/KEYIDX
        }
    }
    payload.get(i).is_some_and(|h| h & 0x01 == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h264_keyframe_starts() {
        assert!(h264_is_keyframe(&[0x65, 0x88])); // IDR
        assert!(h264_is_keyframe(&[0x67, 0x42])); // SPS
        assert!(!h264_is_keyframe(&[0x68, 0xce])); // PPS alone
        assert!(!h264_is_keyframe(&[0x41, 0x9a])); // non-IDR slice
        // STAP-A with SPS and PPS
        assert!(h264_is_keyframe(&[
            0x78, 0x00, 0x02, 0x67, 0x42, 0x00, 0x02, 0x68, 0xce
        ]));
        // STAP-A with a non-IDR slice only; and one with a truncated size
        assert!(!h264_is_keyframe(&[0x78, 0x00, 0x02, 0x41, 0x9a]));
        assert!(!h264_is_keyframe(&[0x78, 0x00, 0x09, 0x67]));
        // FU-A: IDR start, IDR middle, non-IDR start
        assert!(h264_is_keyframe(&[0x7c, 0x85, 0x88]));
        assert!(!h264_is_keyframe(&[0x7c, 0x05, 0x88]));
        assert!(!h264_is_keyframe(&[0x7c, 0x81, 0x9a]));
        assert!(!h264_is_keyframe(&[0x7c]));
        assert!(!h264_is_keyframe(&[]));
    }

    #[test]
    fn h264_sps_is_found_alone_or_in_a_stap_a() {
        assert_eq!(h264_sps(&[0x67, 0x42, 0x00]), Some(&[0x67, 0x42, 0x00][..]));
        let stap = [0x78, 0x00, 0x02, 0x68, 0xce, 0x00, 0x02, 0x67, 0x42];
        assert_eq!(h264_sps(&stap), Some(&[0x67, 0x42][..]));
        assert_eq!(h264_sps(&[0x78, 0x00, 0x09, 0x67]), None);
        assert_eq!(h264_sps(&[0x65, 0x88]), None);
        assert_eq!(h264_sps(&[]), None);
    }

    #[test]
    fn vp8_keyframe_starts() {
        // S=1 PID=0, no extension, P=0
        assert!(vp8_is_keyframe(&[0x10, 0x00]));
        // P=1: interframe
        assert!(!vp8_is_keyframe(&[0x10, 0x01]));
        // not the start of partition 0
        assert!(!vp8_is_keyframe(&[0x00, 0x00]));
        assert!(!vp8_is_keyframe(&[0x11, 0x00]));
        // X=1 with I (15-bit picture id), L, T: header at index 6
        assert!(vp8_is_keyframe(&[0x90, 0xe0, 0x80, 0x01, 0x05, 0x20, 0x00]));
        assert!(!vp8_is_keyframe(&[
            0x90, 0xe0, 0x80, 0x01, 0x05, 0x20, 0x01
        ]));
        // X=1 with 7-bit picture id only
        assert!(vp8_is_keyframe(&[0x90, 0x80, 0x05, 0x9c]));
        // truncated
        assert!(!vp8_is_keyframe(&[0x90, 0x80, 0x85]));
        assert!(!vp8_is_keyframe(&[0x90]));
        assert!(!vp8_is_keyframe(&[]));
    }
}
