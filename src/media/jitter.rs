//! Reordering buffer for one RTP stream (sans-IO): packets in, in sequence order out.
//!
//! Packets from a phone reach the server out of order (jitter on Wi-Fi and cellular reorders
//! them) and lost ones come back late, as retransmissions answering our NACKs (RTX is unwrapped
//! onto the original sequence numbers by `rtc`). A depacketizer that takes packets as they come
//! treats every reordered or retransmitted packet as a loss, breaks the frame and waits for a
//! keyframe. This buffer sits in front of it:
//! - a packet that is next in sequence goes out at once, so a clean link adds no delay;
//! - after a hole, later packets are held until the missing one arrives or until the hole has
//!   been waited for [`wait`](Reorder::wait): long enough for a retransmission to arrive (the
//!   NACK cycle plus the round trip, plus the measured jitter), never more than the configured
//!   bound; then the hole is given up and the depacketizer sees the sequence gap;
//! - held packets are bounded in number; a sender that jumps far ahead (restart) resets it.
//!
//! Time comes in as arguments: the caller polls at [`deadline`](Reorder::deadline).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// How often a receiver's NACK generator asks for missing packets (`peer::interceptors`):
/// a retransmission can be asked for at the next cycle after a hole is seen.
pub const NACK_INTERVAL: Duration = Duration::from_millis(30);

/// How many times one missing packet is asked for: about [`NACK_INTERVAL`] x this covers the
/// longest wait of a reordering buffer; a packet the sender no longer has is not asked for
/// again and again.
pub const NACK_MAX_PER_PACKET: u16 = 8;

/// A packet on its way through the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub seq: u16,
    pub timestamp: u32,
    pub marker: bool,
    pub payload: Bytes,
}

#[derive(Debug, Clone, Copy)]
pub struct ReorderConfig {
    /// Upper bound of the wait for a missing packet (and so of the delay this buffer adds).
    pub max_wait: Duration,
    /// Lower bound of the wait: reordering by a few milliseconds needs no round trip.
    pub min_wait: Duration,
    /// How often the receiver sends NACKs when lost packets are retransmitted (video): a
    /// hole is then waited for the next NACK cycle and a round trip. `None` (audio, not
    /// retransmitted): only for reordering, a few times the jitter.
    pub nack_interval: Option<Duration>,
    /// Packets held at most; past it the oldest hole is given up.
    pub capacity: usize,
}

impl Default for ReorderConfig {
    fn default() -> Self {
        Self {
            max_wait: Duration::from_millis(200),
            min_wait: Duration::from_millis(15),
            nack_interval: Some(NACK_INTERVAL),
            capacity: 512,
        }
    }
}

impl ReorderConfig {
    /// Audio: no retransmissions (Opus is not NACKed; in-band FEC and concealment cover a
    /// loss), and the playout buffer behind it is short, so holes are not waited for long.
    pub fn audio() -> Self {
        Self {
            max_wait: Duration::from_millis(40),
            min_wait: Duration::from_millis(10),
            nack_interval: None,
            capacity: 64,
        }
    }
}

/// Counters since the buffer was made.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ReorderStats {
    /// Packets that arrived after a later one and were still in time (reordered or repaired).
    pub recovered: u64,
    /// Packets given up after waiting (the depacketizer sees a gap).
    pub lost: u64,
    /// Packets that arrived after their hole had been given up, or a second time.
    pub late: u64,
    pub duplicates: u64,
    /// Times the sender's sequence numbers jumped too far and the buffer started over.
    pub resets: u64,
    /// Delay added to the last released packet, and the largest so far, in milliseconds.
    pub delay_ms: f64,
    pub max_delay_ms: f64,
    /// RFC 3550 interarrival jitter, milliseconds.
    pub jitter_ms: f64,
}

#[derive(Debug)]
struct Held {
    packet: Packet,
    arrived: Instant,
}

/// Sequence numbers further ahead than this are a restarted sender, not a hole to wait for.
const MAX_JUMP: u64 = 3000;

pub struct Reorder {
    config: ReorderConfig,
    /// Held packets by extended (unwrapped) sequence number.
    held: BTreeMap<u64, Held>,
    /// Extended sequence number of the next packet to release.
    next: Option<u64>,
    /// When the first packet arrived, until the first one is released: the packets just
    /// before it may still come (reordered), and the first picture needs them (a keyframe's
    /// parameter sets travel ahead of it).
    starting: Option<Instant>,
    /// Highest extended sequence number seen (the reference for unwrapping).
    highest: Option<u64>,
    rtt: Option<Duration>,
    /// Transit-time reference for the jitter estimate: (arrival, RTP timestamp).
    last_transit: Option<(Instant, u32)>,
    clock_rate: u32,
    stats: ReorderStats,
}

impl Reorder {
    pub fn new(config: ReorderConfig, clock_rate: u32) -> Self {
        Self {
            config: ReorderConfig {
                capacity: config.capacity.max(1),
                ..config
            },
            held: BTreeMap::new(),
            next: None,
            starting: None,
            highest: None,
            rtt: None,
            last_transit: None,
            clock_rate: clock_rate.max(1),
            stats: ReorderStats::default(),
        }
    }

    /// The round trip to the sender, when the connection measured one.
    pub fn set_rtt(&mut self, rtt: Option<Duration>) {
        self.rtt = rtt;
    }

    /// How long a hole is waited for: a retransmission needs a NACK cycle and a round trip
    /// (100 ms assumed until one is measured), and may itself be jittered.
    pub fn wait(&self) -> Duration {
        let jitter = Duration::from_secs_f64(3.0 * self.stats.jitter_ms.min(1000.0) / 1000.0);
        let repair = self.config.nack_interval.map_or(Duration::ZERO, |nack| {
            let rtt = self.rtt.unwrap_or(Duration::from_millis(100));
            nack + rtt + rtt / 4
        });
        (repair + jitter).clamp(
            self.config.min_wait,
            self.config.max_wait.max(self.config.min_wait),
        )
    }

    pub fn stats(&self) -> ReorderStats {
        self.stats
    }

    /// Packets held now.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    fn extend(&self, seq: u16) -> u64 {
        let Some(h) = self.highest else {
            // Start high enough that packets a little before the first one unwrap below it.
            return (1 << 32) + u64::from(seq);
        };
        let delta = i64::from(seq.wrapping_sub(h as u16) as i16);
        (h as i64 + delta) as u64
    }

    fn update_jitter(&mut self, timestamp: u32, now: Instant) {
        if let Some((at, ts)) = self.last_transit {
            let arrival = now.saturating_duration_since(at).as_secs_f64() * 1000.0;
            let sent =
                f64::from(timestamp.wrapping_sub(ts) as i32) * 1000.0 / f64::from(self.clock_rate);
            let d = (arrival - sent).abs();
            // A pause of the sender (muted camera) is not jitter.
            if d < 1000.0 {
                self.stats.jitter_ms += (d - self.stats.jitter_ms) / 16.0;
            }
        }
        self.last_transit = Some((now, timestamp));
    }

    /// Take one packet in. Call [`pop`](Self::pop) afterwards.
    pub fn push(&mut self, packet: Packet, now: Instant) {
        let ext = self.extend(packet.seq);
        let next = match self.next {
            None => {
                self.starting = Some(now);
                *self.next.insert(ext)
            }
            // Nothing released yet: an earlier packet that arrives late is the new start.
            Some(n) if ext < n && self.starting.is_some() && n - ext < MAX_JUMP => {
                self.next = Some(ext);
                ext
            }
            Some(n) => n,
        };
        if ext < next {
            self.stats.late += 1;
            return;
        }
        if ext > next + MAX_JUMP {
            // The sender restarted its sequence (or jumped): nothing held will be completed.
            self.stats.resets += 1;
            self.stats.lost += self.held.len() as u64;
            self.held.clear();
            self.next = None;
            self.starting = None;
            self.highest = None;
            self.last_transit = None;
            return self.push(packet, now);
        }
        if self.held.contains_key(&ext) {
            self.stats.duplicates += 1;
            return;
        }
        if self.highest.is_none_or(|h| ext > h) {
            // Only packets in order feed the jitter estimate (a retransmission's transit time
            // includes the NACK round trip).
            self.update_jitter(packet.timestamp, now);
            self.highest = Some(ext);
        } else {
            // Arrived after a later packet, in time: reordered, or a retransmission.
            self.stats.recovered += 1;
        }
        self.held.insert(
            ext,
            Held {
                packet,
                arrived: now,
            },
        );
    }

    /// The next packet in order, if it may go out now: it is the next one, or the hole before
    /// it has been waited for long enough (or the buffer is full).
    pub fn pop(&mut self, now: Instant) -> Option<Packet> {
        let next = self.next?;
        if self.starting.is_some_and(|t| {
            now < t + self.config.min_wait && self.held.len() < self.config.capacity
        }) {
            return None;
        }
        let (&first, _) = self.held.first_key_value()?;
        self.starting = None;
        if first != next {
            let overdue = self
                .hole_since()
                .is_some_and(|since| now >= since + self.wait());
            if !overdue && self.held.len() < self.config.capacity {
                return None;
            }
            self.stats.lost += first - next;
        }
        let h = self.held.remove(&first)?;
        self.next = Some(first + 1);
        let delay = now.saturating_duration_since(h.arrived).as_secs_f64() * 1000.0;
        self.stats.delay_ms = delay;
        self.stats.max_delay_ms = self.stats.max_delay_ms.max(delay);
        Some(h.packet)
    }

    /// When the current hole became visible: the earliest arrival among the packets after it.
    fn hole_since(&self) -> Option<Instant> {
        self.held.values().map(|h| h.arrived).min()
    }

    /// When [`pop`](Self::pop) will give up the current hole, if there is one.
    pub fn deadline(&self) -> Option<Instant> {
        if let Some(t) = self.starting {
            return Some(t + self.config.min_wait);
        }
        let next = self.next?;
        let (&first, _) = self.held.first_key_value()?;
        if first == next {
            return None;
        }
        self.hole_since().map(|since| since + self.wait())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(seq: u16) -> Packet {
        Packet {
            seq,
            timestamp: u32::from(seq) * 3000,
            marker: true,
            payload: Bytes::from(vec![seq as u8]),
        }
    }

    fn drain(r: &mut Reorder, now: Instant) -> Vec<u16> {
        std::iter::from_fn(|| r.pop(now)).map(|p| p.seq).collect()
    }

    fn buffer() -> Reorder {
        let mut r = Reorder::new(ReorderConfig::default(), 90_000);
        r.set_rtt(Some(Duration::from_millis(40)));
        r
    }

    /// Gets `r` past its start: packet `first` in and out. Returns the time it went out.
    fn start(r: &mut Reorder, first: u16) -> Instant {
        let t0 = Instant::now();
        r.push(pkt(first), t0);
        assert!(
            drain(r, t0).is_empty(),
            "the first packet waits for ones just before it"
        );
        let t = r.deadline().expect("the start wait");
        assert_eq!(drain(r, t), vec![first]);
        t
    }

    #[test]
    fn packets_just_before_the_first_one_are_not_lost() {
        let mut r = buffer();
        let t = Instant::now();
        r.push(pkt(5), t);
        r.push(pkt(6), t);
        r.push(pkt(4), t + Duration::from_millis(5));
        assert!(drain(&mut r, t + Duration::from_millis(5)).is_empty());
        assert_eq!(r.deadline(), Some(t + ReorderConfig::default().min_wait));
        assert_eq!(
            drain(&mut r, t + ReorderConfig::default().min_wait),
            vec![4, 5, 6]
        );
        assert_eq!((r.stats().lost, r.stats().recovered), (0, 1));
    }

    #[test]
    fn in_order_packets_pass_at_once() {
        let mut r = buffer();
        let t = start(&mut r, 0);
        for s in 1..100u16 {
            r.push(pkt(s), t);
            assert_eq!(drain(&mut r, t), vec![s]);
            assert_eq!(r.stats().delay_ms, 0.0);
        }
        assert_eq!(r.deadline(), None);
    }

    #[test]
    fn reordered_packets_come_out_in_order_without_loss() {
        let mut r = buffer();
        let t = start(&mut r, 0);
        let mut out = vec![];
        for s in [2u16, 1, 3, 5, 6, 4, 7] {
            r.push(pkt(s), t);
            out.extend(drain(&mut r, t));
        }
        assert_eq!(out, (1..8).collect::<Vec<_>>());
        let st = r.stats();
        assert_eq!((st.lost, st.recovered, st.late), (0, 2, 0));
    }

    #[test]
    fn a_retransmission_within_the_wait_fills_the_hole() {
        let mut r = buffer();
        let t = start(&mut r, 10);
        // 11 lost; 12-15 arrive and are held.
        for s in 12..16 {
            r.push(pkt(s), t + Duration::from_millis(u64::from(s)));
        }
        assert!(drain(&mut r, t + Duration::from_millis(20)).is_empty());
        let deadline = r.deadline().unwrap();
        assert!(deadline > t + Duration::from_millis(60), "{deadline:?}");
        // The retransmission of 11 arrives after a NACK round trip.
        let later = t + Duration::from_millis(70);
        r.push(pkt(11), later);
        assert_eq!(drain(&mut r, later), vec![11, 12, 13, 14, 15]);
        assert_eq!(r.stats().lost, 0);
        assert_eq!(r.stats().recovered, 1);
        assert!(r.stats().max_delay_ms >= 58.0);
    }

    #[test]
    fn a_hole_is_given_up_after_the_wait_and_the_late_packet_is_dropped() {
        let mut r = buffer();
        let t = start(&mut r, 0);
        r.push(pkt(2), t);
        r.push(pkt(3), t);
        assert!(drain(&mut r, t).is_empty());
        let wait = r.wait();
        assert!(wait <= ReorderConfig::default().max_wait);
        assert_eq!(r.deadline(), Some(t + wait));
        assert!(drain(&mut r, t + wait - Duration::from_millis(1)).is_empty());
        assert_eq!(drain(&mut r, t + wait), vec![2, 3]);
        assert_eq!(r.stats().lost, 1);
        r.push(pkt(1), t + wait * 2);
        assert!(drain(&mut r, t + wait * 2).is_empty());
        assert_eq!(r.stats().late, 1);
    }

    #[test]
    fn the_wait_follows_rtt_and_is_bounded() {
        let mut r = buffer();
        r.set_rtt(Some(Duration::from_millis(10)));
        let short = r.wait();
        r.set_rtt(Some(Duration::from_millis(100)));
        let long = r.wait();
        assert!(short < long, "{short:?} {long:?}");
        r.set_rtt(Some(Duration::from_secs(5)));
        assert_eq!(r.wait(), ReorderConfig::default().max_wait);
    }

    #[test]
    fn audio_waits_only_for_reordering() {
        let mut r = Reorder::new(ReorderConfig::audio(), 48_000);
        r.set_rtt(Some(Duration::from_millis(150)));
        assert_eq!(r.wait(), ReorderConfig::audio().min_wait);
        let t = Instant::now();
        for s in 0..50u16 {
            let at = t + Duration::from_millis(u64::from(s) * 20 + u64::from(s % 3) * 9);
            r.push(
                Packet {
                    seq: s,
                    timestamp: u32::from(s) * 960,
                    marker: false,
                    payload: Bytes::new(),
                },
                at,
            );
        }
        assert!(r.wait() > ReorderConfig::audio().min_wait);
        assert!(r.wait() <= ReorderConfig::audio().max_wait);
    }

    #[test]
    fn sequence_numbers_wrap() {
        let mut r = buffer();
        let t = start(&mut r, 65534);
        let mut out = vec![];
        for s in [0u16, 65535, 1, 2] {
            r.push(pkt(s), t);
            out.extend(drain(&mut r, t));
        }
        assert_eq!(out, vec![65535, 0, 1, 2]);
    }

    #[test]
    fn the_buffer_is_bounded() {
        let cfg = ReorderConfig {
            capacity: 8,
            ..ReorderConfig::default()
        };
        let mut r = Reorder::new(cfg, 90_000);
        let t = start(&mut r, 0);
        // 1 never comes; a flood after it is held only up to capacity.
        let mut out = vec![];
        for s in 2..100u16 {
            r.push(pkt(s), t);
            out.extend(drain(&mut r, t));
            assert!(r.len() <= 8);
        }
        assert_eq!(out.first(), Some(&2));
        assert_eq!(r.stats().lost, 1);
    }

    #[test]
    fn a_sequence_jump_starts_over() {
        let mut r = buffer();
        let t = start(&mut r, 0);
        r.push(pkt(2), t);
        assert!(drain(&mut r, t).is_empty());
        r.push(pkt(30_000), t);
        assert_eq!(r.stats().resets, 1);
        let t = r.deadline().unwrap();
        assert_eq!(drain(&mut r, t), vec![30_000]);
        r.push(pkt(30_001), t);
        assert_eq!(drain(&mut r, t), vec![30_001]);
    }

    #[test]
    fn duplicates_are_counted_and_dropped() {
        let mut r = buffer();
        let t = start(&mut r, 0);
        r.push(pkt(2), t);
        r.push(pkt(2), t);
        assert!(drain(&mut r, t).is_empty());
        assert_eq!(r.stats().duplicates, 1);
        r.push(pkt(0), t);
        assert_eq!(r.stats().late, 1);
    }
}
