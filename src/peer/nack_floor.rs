//! Drops a subscriber's retransmission requests for packets of a simulcast layer it has left,
//! and those beyond each stream's retransmission budget ([`super::nack_budget`]).
//!
//! When the SFU moves a subscriber down a layer because its link is congested, the link is
//! still full of the old layer: the queue it built, and the packets it lost, which the
//! subscriber keeps asking for (NACK) for a while. Retransmitting them is worse than useless:
//! the new layer starts with a keyframe, so the decoder never needs them, and their bytes keep
//! the link over its rate, so the new (smaller) layer loses packets too, and the loss-based
//! downlink control (`sfu::downlink`) moves the subscriber one layer further down than its link
//! needs (measured behind a `tbf` in tests/simulcast.rs before this existed).
//!
//! So each local stream may have a *floor*: the output sequence number where its current layer
//! started. This interceptor sits wire-ward of the NACK responder (read walks from the wire
//! towards the application) and removes from inbound NACKs the sequence numbers just below the
//! floor, so the responder never sees them. A floor applies for [`FLOOR_TTL`] only, and only to
//! the [`FLOOR_SPAN`] numbers below it: sequence numbers wrap, and much later packets must not
//! look like old ones.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rtc::interceptor::{Interceptor, Packet, StreamInfo, TaggedPacket};
use rtc::rtcp::transport_feedbacks::transport_layer_nack::{
    TransportLayerNack, nack_pairs_from_sequence_numbers,
};
use rtc::sansio::Protocol;
use rtc::shared::error::Error;

use super::nack_budget::RetransmitBudget;

/// Between the pacer (3_000) and the NACK responder (4_000): a smaller slot is nearer the wire.
pub const SLOT: usize = 3_500;
/// How long after a switch requests for the old layer are still dropped: the subscriber's NACK
/// generator gives up on a packet well within this.
pub const FLOOR_TTL: Duration = Duration::from_secs(5);
/// How far below the floor a number counts as the old layer's. The NACK responder keeps far
/// fewer packets than this, so nothing older could be resent anyway.
pub const FLOOR_SPAN: u16 = 4096;

/// Retransmission requests dropped this way, all connections (metric).
pub static DROPPED: AtomicU64 = AtomicU64::new(0);

/// The floors of one connection's local streams, shared by its interceptor chain and its
/// local tracks. Only streams bound to the connection have an entry.
#[derive(Debug, Clone, Default)]
pub struct NackFloors(Arc<Mutex<FloorMap>>);

/// Bound local stream → its floor (output number, when set), if any.
type FloorMap = HashMap<u32, Option<(u16, Instant)>>;

impl NackFloors {
    fn with<R>(&self, f: impl FnOnce(&mut FloorMap) -> R) -> R {
        match self.0.lock() {
            Ok(mut g) => f(&mut g),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    /// Stream `ssrc` switched layers at output number `seq` (at `now`).
    pub fn set(&self, ssrc: u32, seq: u16, now: Instant) {
        self.with(|m| {
            if let Some(f) = m.get_mut(&ssrc) {
                *f = Some((seq, now));
            }
        });
    }

    fn get(&self, ssrc: u32, now: Instant) -> Option<u16> {
        self.with(|m| {
            let (seq, at) = (*m.get(&ssrc)?)?;
            (now.saturating_duration_since(at) < FLOOR_TTL).then_some(seq)
        })
    }

    fn bind(&self, ssrc: u32) {
        self.with(|m| {
            m.entry(ssrc).or_default();
        });
    }

    fn unbind(&self, ssrc: u32) {
        self.with(|m| m.remove(&ssrc));
    }
}

/// `seq` is one of the [`FLOOR_SPAN`] numbers just below `floor`.
fn below(seq: u16, floor: u16) -> bool {
    (1..=FLOOR_SPAN).contains(&floor.wrapping_sub(seq))
}

/// The numbers `nack` asks for.
fn asked(nack: &TransportLayerNack) -> Vec<u16> {
    nack.nacks.iter().flat_map(|p| p.packet_list()).collect()
}

/// `asked` without the numbers below `floor`; returns how many were removed too.
fn prune(asked: Vec<u16>, floor: u16) -> (Vec<u16>, u64) {
    let n = asked.len();
    let kept: Vec<u16> = asked.into_iter().filter(|s| !below(*s, floor)).collect();
    let dropped = (n - kept.len()) as u64;
    (kept, dropped)
}

/// Retransmission requests not served because the stream had used its budget
/// ([`RetransmitBudget`]), all connections (metric).
pub static OVER_BUDGET: AtomicU64 = AtomicU64::new(0);

/// The NACK filter of one connection: drops requests for an old simulcast layer (the floors)
/// and requests beyond each stream's retransmission budget ([`super::nack_budget`]).
pub struct NackFloor {
    read_queue: VecDeque<TaggedPacket>,
    write_queue: VecDeque<TaggedPacket>,
    floors: NackFloors,
    /// By local SSRC, for the streams bound to the connection.
    budgets: HashMap<u32, RetransmitBudget>,
}

impl NackFloor {
    pub fn new(floors: NackFloors) -> Self {
        Self {
            read_queue: VecDeque::new(),
            write_queue: VecDeque::new(),
            floors,
            budgets: HashMap::new(),
        }
    }

    /// What one NACK may still ask for: above the floor, within the budget (oldest first, not
    /// resent just before). `None`: unchanged.
    fn filter_nack(&mut self, n: &TransportLayerNack, now: Instant) -> Option<Vec<u16>> {
        let mut seqs = asked(n);
        let total = seqs.len();
        if let Some(floor) = self.floors.get(n.media_ssrc, now) {
            let (kept, dropped) = prune(seqs, floor);
            DROPPED.fetch_add(dropped, Ordering::Relaxed);
            seqs = kept;
        }
        if let Some(b) = self.budgets.get_mut(&n.media_ssrc) {
            let granted = b.grant(&seqs, now);
            OVER_BUDGET.fetch_add((seqs.len() - granted.len()) as u64, Ordering::Relaxed);
            seqs = granted;
        }
        (seqs.len() != total).then_some(seqs)
    }

    /// `packets` with each NACK filtered; `None` when nothing is left.
    fn filter(
        &mut self,
        packets: &[Box<dyn rtc::rtcp::Packet>],
        now: Instant,
    ) -> Option<Vec<Box<dyn rtc::rtcp::Packet>>> {
        let mut out: Vec<Box<dyn rtc::rtcp::Packet>> = Vec::with_capacity(packets.len());
        for p in packets {
            let Some(n) = p.as_any().downcast_ref::<TransportLayerNack>() else {
                out.push(p.cloned());
                continue;
            };
            match self.filter_nack(n, now) {
                None => out.push(p.cloned()),
                Some(kept) if kept.is_empty() => {}
                Some(kept) => out.push(Box::new(TransportLayerNack {
                    sender_ssrc: n.sender_ssrc,
                    media_ssrc: n.media_ssrc,
                    nacks: nack_pairs_from_sequence_numbers(&kept),
                })),
            }
        }
        (!out.is_empty()).then_some(out)
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for NackFloor {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet {
            // Most RTCP is not a NACK for a stream we send: pass it as it is.
            let relevant = packets.iter().any(|p| {
                p.as_any()
                    .downcast_ref::<TransportLayerNack>()
                    .is_some_and(|n| self.budgets.contains_key(&n.media_ssrc))
            });
            if relevant {
                match self.filter(packets, msg.now) {
                    Some(kept) => msg.message.packet = Packet::Rtcp(kept),
                    None => return Ok(()),
                }
            }
        }
        self.read_queue.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.read_queue.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtp(p) = &msg.message.packet
            && let Some(b) = self.budgets.get_mut(&p.header.ssrc)
        {
            b.on_sent(p.header.sequence_number, msg.now);
        }
        self.write_queue.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.write_queue.pop_front()
    }
}

impl Interceptor for NackFloor {
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        self.floors.bind(info.ssrc);
        self.budgets
            .insert(info.ssrc, RetransmitBudget::new(Instant::now()));
    }
    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        self.floors.unbind(info.ssrc);
        self.budgets.remove(&info.ssrc);
    }
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::rtcp::transport_feedbacks::transport_layer_nack::NackPair;

    fn nack(ssrc: u32, seqs: &[u16]) -> TransportLayerNack {
        TransportLayerNack {
            sender_ssrc: 1,
            media_ssrc: ssrc,
            nacks: nack_pairs_from_sequence_numbers(seqs),
        }
    }

    fn seqs(n: &TransportLayerNack) -> Vec<u16> {
        n.nacks.iter().flat_map(NackPair::packet_list).collect()
    }

    /// The NACKs among `kept`: (media SSRC, numbers asked).
    fn nacks_in(kept: &[Box<dyn rtc::rtcp::Packet>]) -> Vec<(u32, Vec<u16>)> {
        kept.iter()
            .filter_map(|p| p.as_any().downcast_ref::<TransportLayerNack>())
            .map(|n| (n.media_ssrc, seqs(n)))
            .collect()
    }

    #[test]
    fn requests_below_the_floor_are_dropped_and_others_kept() {
        let p = |s: &[u16], floor| prune(asked(&nack(5, s)), floor);
        assert_eq!(
            p(&[95, 98, 99, 100, 101, 103], 100),
            (vec![100, 101, 103], 3)
        );
        assert_eq!(p(&[10, 11], 100), (vec![], 2));
        // Across the wrap: 65535 is just below a floor of 2; 3 is above it.
        assert_eq!(p(&[65_535, 0, 3], 2), (vec![3], 2));
        // Far below (more than FLOOR_SPAN): that is a later number that wrapped, keep it.
        assert!(!below(100u16.wrapping_sub(FLOOR_SPAN + 1), 100));
        assert!(below(100u16.wrapping_sub(FLOOR_SPAN), 100));
    }

    #[test]
    fn floors_apply_to_bound_streams_for_a_while() {
        let f = NackFloors::default();
        let t0 = Instant::now();
        f.set(9, 100, t0);
        assert_eq!(
            f.get(9, t0),
            None,
            "a stream that is not bound has no floor"
        );
        f.bind(9);
        assert_eq!(f.get(9, t0), None);
        f.set(9, 100, t0);
        assert_eq!(f.get(9, t0 + Duration::from_secs(1)), Some(100));
        assert_eq!(f.get(9, t0 + FLOOR_TTL), None, "expired");
        let mut i = NackFloor::new(f.clone());
        let packets: Vec<Box<dyn rtc::rtcp::Packet>> = vec![
            Box::new(nack(9, &[90, 100])),
            Box::new(nack(8, &[90])),
            Box::new(nack(9, &[91])),
        ];
        let kept = nacks_in(&i.filter(&packets, t0).unwrap());
        assert_eq!(kept, vec![(9, vec![100]), (8, vec![90])]);
        let only_old: Vec<Box<dyn rtc::rtcp::Packet>> = vec![Box::new(nack(9, &[99]))];
        assert!(i.filter(&only_old, t0).is_none());
        f.unbind(9);
        assert_eq!(f.get(9, t0), None);
    }

    /// Beyond a stream's budget, requests are not passed on to the responder: the oldest
    /// numbers are kept.
    #[test]
    fn requests_beyond_the_retransmission_budget_are_dropped() {
        let t0 = Instant::now();
        let mut i = NackFloor::new(NackFloors::default());
        i.budgets.insert(9, RetransmitBudget::new(t0));
        let all: Vec<u16> = (1..=30).collect();
        let packets: Vec<Box<dyn rtc::rtcp::Packet>> = vec![Box::new(nack(9, &all))];
        let kept = nacks_in(&i.filter(&packets, t0).unwrap());
        let expected: Vec<u16> = (1..=10).collect();
        assert_eq!(kept[0].1, expected, "MIN_GRANT, the oldest");
        assert!(i.filter(&packets, t0).is_none(), "budget used up");
        // A stream without a budget (not ours) passes untouched.
        let other: Vec<Box<dyn rtc::rtcp::Packet>> = vec![Box::new(nack(8, &all))];
        let kept = nacks_in(&i.filter(&other, t0).unwrap());
        assert_eq!(kept[0].1, all);
    }
}
