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
}
