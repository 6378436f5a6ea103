//! Audio mixing: sum the inputs' PCM and keep the result in range with a smooth limiter
//! instead of wrapping or hard clipping (a hard clip of a sum of voices sounds like crackle).

/// Interleaved i16 PCM frames of equal length are summed into `out` (same length).
/// Inputs shorter than `out` contribute silence past their end.
pub fn mix_into(out: &mut [i16], inputs: &[&[i16]], limiter: &mut Limiter) {
    let mut acc = vec![0i32; out.len()];
    for input in inputs {
        for (a, s) in acc.iter_mut().zip(input.iter()) {
            *a += i32::from(*s);
        }
    }
    limiter.process(&acc, out);
}

/// A peak limiter with instant attack and slow release: the gain drops at once when the sum
/// would exceed the ceiling and recovers over about 50 ms at 48 kHz.
#[derive(Debug, Clone)]
pub struct Limiter {
    gain: f32,
    ceiling: f32,
    release_per_sample: f32,
}

impl Default for Limiter {
    fn default() -> Self {
        Self {
            gain: 1.0,
            // A little headroom below full scale: AAC encoders overshoot on transients.
            ceiling: 32_000.0,
            release_per_sample: 1.0 / 2400.0,
        }
    }
}

impl Limiter {
    pub fn process(&mut self, input: &[i32], out: &mut [i16]) {
        for (s, o) in input.iter().zip(out.iter_mut()) {
            let x = *s as f32;
            // Release first, then make sure this sample fits with the gain it is played at.
            self.gain = (self.gain + self.release_per_sample).min(1.0);
            if x.abs() * self.gain > self.ceiling {
                self.gain = self.ceiling / x.abs();
            }
            *o = (x * self.gain).clamp(-32768.0, 32767.0) as i16;
        }
    }

    pub fn gain(&self) -> f32 {
        self.gain
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_inputs_sum_exactly() {
        let a = [100i16, -200, 300];
        let b = [1i16, 2, 3];
        let mut out = [0i16; 3];
        mix_into(&mut out, &[&a, &b], &mut Limiter::default());
        assert_eq!(out, [101, -198, 303]);
    }

    #[test]
    fn loud_inputs_never_wrap_or_clip_hard() {
        let loud: Vec<i16> = (0..4800)
            .map(|i| ((i as f32 / 10.0).sin() * 30_000.0) as i16)
            .collect();
        let mut out = vec![0i16; loud.len()];
        let mut lim = Limiter::default();
        mix_into(&mut out, &[&loud, &loud, &loud], &mut lim);
        // Same sign as the true sum everywhere (no wrap-around), and within the ceiling.
        for (o, s) in out.iter().zip(loud.iter()) {
            assert!(i32::from(*o).abs() <= 32_000);
            assert!(
                i32::from(*o) * i32::from(*s) >= 0,
                "sign flipped: {o} vs {s}"
            );
        }
        assert!(lim.gain() < 1.0);
        // Shorter input: the rest is silence from it.
        let mut out = vec![0i16; 4];
        mix_into(&mut out, &[&[5, 5][..]], &mut Limiter::default());
        assert_eq!(out, vec![5, 5, 0, 0]);
    }
}
