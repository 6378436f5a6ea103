//! Keyframe request throttling, sans-IO. Every new subscriber and every PLI/FIR from a
//! subscriber asks for a keyframe; a publisher only needs one per interval. Requests inside the
//! interval are coalesced into one that goes out when the interval ends, so the last joiner is
//! never left waiting for the next natural keyframe.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send a keyframe request now (then call [`KeyframeThrottle::sent`]).
    SendNow,
    /// One request is owed; send it at this instant.
    SendAt(Instant),
    /// A request is already scheduled; this one is folded into it.
    Coalesced,
}

#[derive(Debug, Clone)]
pub struct KeyframeThrottle {
    interval: Duration,
    last_sent: Option<Instant>,
    scheduled: bool,
}

impl KeyframeThrottle {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last_sent: None,
            scheduled: false,
        }
    }

    pub fn request(&mut self, now: Instant) -> Decision {
        if self.scheduled {
            return Decision::Coalesced;
        }
        match self.last_sent {
            Some(t) if now < t + self.interval => {
                self.scheduled = true;
                Decision::SendAt(t + self.interval)
            }
            _ => Decision::SendNow,
        }
    }

    pub fn sent(&mut self, now: Instant) {
        self.last_sent = Some(now);
        self.scheduled = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_requests_in_one_interval_become_two_keyframes() {
        let t0 = Instant::now();
        let iv = Duration::from_millis(500);
        let mut k = KeyframeThrottle::new(iv);
        assert_eq!(k.request(t0), Decision::SendNow);
        k.sent(t0);
        let mut sent = 1;
        for i in 1..10 {
            match k.request(t0 + Duration::from_millis(i * 10)) {
                Decision::SendNow => sent += 1,
                Decision::SendAt(at) => assert_eq!(at, t0 + iv),
                Decision::Coalesced => {}
            }
        }
        assert_eq!(sent, 1);
        k.sent(t0 + iv);
        assert_eq!(k.request(t0 + iv * 3), Decision::SendNow);
    }
}
