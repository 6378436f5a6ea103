//! AAC framing helpers for FLV: the AudioSpecificConfig of an AAC-LC stream.

const SAMPLE_RATES: [u32; 13] = [
    96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350,
];

/// AudioSpecificConfig (ISO 14496-3 §1.6.2.1) for AAC-LC: object type 2, the sampling
/// frequency index and the channel configuration. `None` for rates without an index.
pub fn audio_specific_config(sample_rate: u32, channels: u8) -> Option<[u8; 2]> {
    let idx = SAMPLE_RATES.iter().position(|r| *r == sample_rate)? as u8;
    if channels == 0 || channels > 7 {
        return None;
    }
    const AAC_LC: u8 = 2;
    Some([
        (AAC_LC << 3) | (idx >> 1),
        ((idx & 1) << 7) | (channels << 3),
    ])
}

/// What an AudioSpecificConfig says: object type, sampling rate and channel configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AscInfo {
    pub object_type: u8,
    pub sample_rate: u32,
    pub channels: u8,
}

/// Read the first fields of an AudioSpecificConfig (ISO 14496-3 §1.6.2.1): enough to describe
/// the track in a container. `None` when it is too short or names a reserved rate index. An
/// escaped object type (31) or an explicit 24-bit rate (index 15) are read too.
pub fn parse_audio_specific_config(asc: &[u8]) -> Option<AscInfo> {
    // A bit reader over at most the first 8 bytes: every field needed is in there.
    let mut bits: u64 = 0;
    for (i, b) in asc.iter().take(8).enumerate() {
        bits |= u64::from(*b) << (56 - 8 * i);
    }
    let avail = asc.len().min(8) * 8;
    let mut pos = 0usize;
    let mut read = |n: usize| -> Option<u32> {
        if pos + n > avail {
            return None;
        }
        let v = (bits << pos) >> (64 - n);
        pos += n;
        Some(v as u32)
    };
    let mut object_type = read(5)?;
    if object_type == 31 {
        object_type = 32 + read(6)?;
    }
    let idx = read(4)?;
    let sample_rate = if idx == 15 {
        read(24)?
    } else {
        *SAMPLE_RATES.get(idx as usize)?
    };
    let channels = read(4)? as u8;
    if sample_rate == 0 {
        return None;
    }
    Some(AscInfo {
        object_type: object_type as u8,
        sample_rate,
        channels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_configs() {
        // 48 kHz stereo LC is the classic 0x11 0x90; 44.1 kHz stereo 0x12 0x10.
        assert_eq!(audio_specific_config(48000, 2), Some([0x11, 0x90]));
        assert_eq!(audio_specific_config(44100, 2), Some([0x12, 0x10]));
        assert_eq!(audio_specific_config(48000, 1), Some([0x11, 0x88]));
        assert_eq!(audio_specific_config(12345, 2), None);
    }

    #[test]
    fn configs_read_back() {
        let info = |a: &[u8]| parse_audio_specific_config(a);
        assert_eq!(
            info(&[0x11, 0x90]),
            Some(AscInfo {
                object_type: 2,
                sample_rate: 48000,
                channels: 2
            })
        );
        assert_eq!(
            info(&[0x12, 0x08]).map(|i| (i.sample_rate, i.channels)),
            Some((44100, 1))
        );
        assert_eq!(info(&[0x11]), None, "too short");
        assert_eq!(info(&[]), None);
        // Index 13 is reserved.
        assert_eq!(info(&[0x16, 0x90]), None);
        // Explicit rate: index 15 then 24 bits of 12345, then 2 channels.
        let mut bits: u64 = (2u64 << 59) | (15u64 << 55) | (12345u64 << 31) | (2u64 << 27);
        bits &= !0u64;
        let b = bits.to_be_bytes();
        assert_eq!(info(&b[..5]).map(|i| i.sample_rate), Some(12345));
    }
}
