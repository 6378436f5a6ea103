//! Goertzel: the power of one frequency in a block of samples. Tests use it to prove a tone
//! made it through decode, mix and encode.

/// Relative power of `freq` Hz in `samples` (mono) at `rate` Hz, normalised by the block's
/// total energy: about 0.5 for a pure tone at that frequency, near 0 when it is absent.
pub fn tone_power(samples: &[f32], rate: f32, freq: f32) -> f32 {
    if samples.is_empty() {
        return 0.0;
    }
    let w = 2.0 * std::f32::consts::PI * freq / rate;
    let coeff = 2.0 * w.cos();
    let (mut s1, mut s2) = (0.0f32, 0.0f32);
    for &x in samples {
        let s0 = x + coeff * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    let power = s1 * s1 + s2 * s2 - coeff * s1 * s2;
    let energy: f32 = samples.iter().map(|x| x * x).sum();
    if energy <= f32::EPSILON {
        return 0.0;
    }
    power / (energy * samples.len() as f32)
}

/// Left channel of interleaved stereo i16, as f32.
pub fn left_channel(interleaved: &[i16]) -> Vec<f32> {
    interleaved
        .iter()
        .step_by(2)
        .map(|s| f32::from(*s))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_tone_that_is_there() {
        let rate = 48000.0;
        let s: Vec<f32> = (0..4800)
            .map(|i| (2.0 * std::f32::consts::PI * 440.0 * i as f32 / rate).sin())
            .collect();
        assert!(tone_power(&s, rate, 440.0) > 0.4);
        assert!(tone_power(&s, rate, 660.0) < 0.01);
        assert_eq!(tone_power(&[], rate, 440.0), 0.0);
    }
}
