//! How many retransmissions one outgoing stream may make, sans-IO.
//!
//! A subscriber asks (RTCP NACK) for every packet it missed, and asks again when the
//! retransmission is lost too. On a link that loses packets because it is full, every
//! retransmission adds to what fills it: measured behind a kernel `tbf` at half the top
//! simulcast layer's rate (tests/simulcast.rs), the server went on sending at the link's rate
//! for 4-5 s after the subscriber had been moved down a layer, `tbf` dropped about 1,200
//! packets, and in 2 of 6 runs the middle layer kept losing 40 % until it was moved down a
//! second layer, needlessly. With NACKs ignored the same runs dropped 106-137 packets and
//! settled on the middle layer; with this budget, 165-230 and settled too (12 of 12 runs). And a subscriber that asks for everything, again and again,
//! must not make the server send many times what it forwards.
//!
//! So each outgoing stream gets a budget, as senders do (libwebrtc limits retransmissions by
//! rate; mediasoup resends a packet at most once per round trip): over the last second, at
//! most [`SHARE_PERCENT`] of the packets forwarded, and at least [`MIN_GRANT`] (so a
//! low-rate stream on a link with random loss still recovers), and a packet at most once per
//! [`RESEND_GAP`]. A request beyond it is not resent; the decoder recovers at the next keyframe, which it asks for itself when a picture
//! cannot be decoded.

use std::time::{Duration, Instant};

/// The budget's window is two halves of this, rolled one at a time (a sliding second,
/// approximately).
const HALF: Duration = Duration::from_millis(500);
/// Retransmissions per 100 packets forwarded, over the window. Random loss on a phone's link
/// is a few percent, bursts more; a quarter cost frozen pictures at 10 % random loss (more
/// keyframe requests: 3-8 in 17 s instead of 1-2, tests/impaired.rs), half did not, and still
/// holds the simulcast layer behind `tbf` (see above).
pub const SHARE_PERCENT: u32 = 50;
/// Retransmissions always allowed per window, whatever was forwarded.
pub const MIN_GRANT: u32 = 10;
/// A packet is resent at most once in this long: a receiver asks again every few tens of
/// milliseconds until the copy arrives, and a second copy in flight helps nobody (mediasoup
/// resends at most once per round trip; cohost does not know the round trip here).
pub const RESEND_GAP: Duration = Duration::from_millis(100);
/// Packets whose last resend is remembered (by sequence number modulo this).
const RESENT_KEPT: usize = 512;

#[derive(Debug, Clone)]
pub struct RetransmitBudget {
    /// Start of the current half.
    half_start: Instant,
    /// Packets forwarded (first sends), this half and the one before.
    sent: [u32; 2],
    /// Retransmissions granted, this half and the one before.
    granted: [u32; 2],
    /// Highest sequence number sent so far: anything not newer is a retransmission.
    highest: Option<u16>,
    /// When each recently resent packet was granted, by sequence number modulo
    /// [`RESENT_KEPT`].
    resent: Vec<(u16, Option<Instant>)>,
}

impl RetransmitBudget {
    pub fn new(now: Instant) -> Self {
        Self {
            half_start: now,
            sent: [0; 2],
            granted: [0; 2],
            highest: None,
            resent: vec![(0, None); RESENT_KEPT],
        }
    }

    fn roll(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.half_start);
        if elapsed < HALF {
            return;
        }
        if elapsed < HALF * 2 {
            self.sent = [0, self.sent[0]];
            self.granted = [0, self.granted[0]];
            self.half_start += HALF;
        } else {
            self.sent = [0; 2];
            self.granted = [0; 2];
            self.half_start = now;
        }
    }

    /// A packet with `seq` leaves (a first send or a retransmission: only first sends count).
    pub fn on_sent(&mut self, seq: u16, now: Instant) {
        self.roll(now);
        let newer = self
            .highest
            .is_none_or(|h| seq != h && seq.wrapping_sub(h) < 0x8000);
        if newer {
            self.highest = Some(seq);
            self.sent[0] = self.sent[0].saturating_add(1);
        }
    }

    /// Retransmissions of `asked` (in the order asked) are requested: the ones that may be
    /// made, oldest first (a receiver's jitter buffer needs them in that order), leaving out
    /// packets resent less than [`RESEND_GAP`] ago.
    pub fn grant(&mut self, asked: &[u16], now: Instant) -> Vec<u16> {
        self.roll(now);
        let sent = self.sent[0] + self.sent[1];
        let allowed = (sent * SHARE_PERCENT / 100).max(MIN_GRANT);
        let mut left = allowed.saturating_sub(self.granted[0] + self.granted[1]);
        let mut out = Vec::with_capacity(asked.len().min(left as usize));
        for &seq in asked {
            if left == 0 {
                break;
            }
            let slot = &mut self.resent[usize::from(seq) % RESENT_KEPT];
            if slot.0 == seq
                && slot
                    .1
                    .is_some_and(|t| now.saturating_duration_since(t) < RESEND_GAP)
            {
                continue;
            }
            *slot = (seq, Some(now));
            out.push(seq);
            left -= 1;
        }
        self.granted[0] += out.len() as u32;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 100 packets a second forwarded: 50 retransmissions a second, whatever is asked; the
    /// budget comes back as the window slides.
    #[test]
    fn retransmissions_are_a_share_of_what_is_forwarded() {
        let t0 = Instant::now();
        let mut b = RetransmitBudget::new(t0);
        let mut t = t0;
        for seq in 0..100u16 {
            t = t0 + Duration::from_millis(u64::from(seq) * 10);
            b.on_sent(seq, t);
        }
        let ask = |from: u16| (from..from + 40).collect::<Vec<u16>>();
        assert_eq!(b.grant(&ask(0), t), ask(0));
        let oldest: Vec<u16> = (40..50).collect();
        assert_eq!(b.grant(&ask(40), t), oldest, "50 of 100, oldest first");
        assert!(b.grant(&ask(80), t).is_empty());
        // Retransmitted packets (old numbers) are not forwarded packets.
        for seq in 50..90u16 {
            b.on_sent(seq, t);
        }
        assert!(b.grant(&[120], t).is_empty());
        // A second later, with the stream still flowing, the window holds new sends only.
        for seq in 100..200u16 {
            t = t0 + Duration::from_millis(1000 + u64::from(seq - 100) * 10);
            b.on_sent(seq, t);
        }
        assert_eq!(b.grant(&(300..400).collect::<Vec<u16>>(), t).len(), 50);
    }

    /// Asked again before its copy could arrive, a packet is not resent again.
    #[test]
    fn a_packet_is_resent_at_most_once_per_gap() {
        let t0 = Instant::now();
        let mut b = RetransmitBudget::new(t0);
        assert_eq!(b.grant(&[5, 6], t0), vec![5, 6]);
        let soon = t0 + RESEND_GAP / 2;
        assert_eq!(b.grant(&[5, 6, 7], soon), vec![7]);
        assert_eq!(b.grant(&[5], t0 + RESEND_GAP), vec![5]);
    }

    #[test]
    fn a_quiet_stream_may_still_recover_a_few_packets() {
        let t0 = Instant::now();
        let mut b = RetransmitBudget::new(t0);
        b.on_sent(7, t0);
        let many: Vec<u16> = (100..150).collect();
        assert_eq!(b.grant(&many, t0).len(), MIN_GRANT as usize);
        assert!(b.grant(&[200], t0).is_empty());
        // After a pause longer than the window, the budget is whole again.
        assert_eq!(b.grant(&many, t0 + HALF * 3).len(), MIN_GRANT as usize);
        // Sequence numbers wrap: 2 is newer than 65_530.
        let mut w = RetransmitBudget::new(t0);
        w.on_sent(65_530, t0);
        w.on_sent(2, t0);
        assert_eq!(w.sent[0], 2);
        w.on_sent(65_531, t0);
        assert_eq!(w.sent[0], 2, "older than the highest: a retransmission");
    }
}
