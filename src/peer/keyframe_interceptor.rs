//! Passes inbound keyframe requests (PLI, FIR) and sender reports up to the application.
//!
//! In `webrtc` 0.21 inbound RTCP ends at the interceptor chain unless an interceptor marks a
//! packet for delivery. The SFU must see keyframe requests from subscribers to relay them to the
//! publisher (and a test publisher must see the ones the SFU sends), and the bridge needs each
//! publisher's sender reports for lip sync, so this interceptor, placed last, marks exactly those
//! and drops every other RTCP packet, which the NACK, report and TWCC interceptors have already
//! consumed.
//!
//! `rtc` routes a delivered compound packet to one track, chosen by the first packet's first
//! destination SSRC. So each wanted packet goes up on its own, and a sender report loses its
//! reception report blocks (their SSRCs are ours, not the sender's track).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rtc::interceptor::{
    Attribute, AttributedPacket, Interceptor, Packet, StreamInfo, TaggedPacket,
};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use rtc::sansio::Protocol;
use rtc::shared::error::Error;

/// Slot after every default interceptor.
pub const SLOT: usize = 14_000;

/// Slot of [`RtcpCounter`]: wire-most, so it sees the RTCP the interceptors generate (NACK,
/// reports) on the way out and every RTCP packet on the way in.
pub const COUNTER_SLOT: usize = 500;

/// RTCP feedback counted over all connections of the process (Prometheus counters).
#[derive(Debug)]
pub struct RtcpTotals {
    pub nacks_received: AtomicU64,
    pub nacks_sent: AtomicU64,
    pub plis_received: AtomicU64,
    pub plis_sent: AtomicU64,
    pub firs_received: AtomicU64,
}

pub static RTCP: RtcpTotals = RtcpTotals {
    nacks_received: AtomicU64::new(0),
    nacks_sent: AtomicU64::new(0),
    plis_received: AtomicU64::new(0),
    plis_sent: AtomicU64::new(0),
    firs_received: AtomicU64::new(0),
};

/// Feedback about one media stream (SSRC) of a connection: what we asked of a publisher
/// (`*_sent`, its SSRC) or what a subscriber asked of us (`*_received`, the SSRC we send).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct FeedbackCounts {
    /// RTCP NACK messages, and the packets they asked to be retransmitted.
    pub nacks: u64,
    pub nacked_packets: u64,
    pub plis: u64,
    pub firs: u64,
    /// Receiver reports about the stream (report blocks naming its SSRC), and the latest one's
    /// fraction of packets lost since the report before, in 1/256 (RFC 3550 6.4.1). The
    /// subscriber's downlink is judged by these (`sfu::downlink`).
    pub reports: u64,
    pub fraction_lost: u8,
}

/// Per-SSRC feedback counts of one connection, shared between its interceptor chain and the
/// connection's statistics. Only streams bound to the connection are counted, so a peer that
/// names made-up SSRCs cannot grow the map.
#[derive(Debug, Clone, Default)]
pub struct FeedbackBySsrc(Arc<Mutex<HashMap<u32, FeedbackCounts>>>);

impl FeedbackBySsrc {
    fn with<R>(&self, f: impl FnOnce(&mut HashMap<u32, FeedbackCounts>) -> R) -> R {
        match self.0.lock() {
            Ok(mut g) => f(&mut g),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    pub fn get(&self, ssrc: u32) -> Option<FeedbackCounts> {
        self.with(|m| m.get(&ssrc).copied())
    }

    fn bind(&self, ssrc: u32) {
        self.with(|m| {
            m.entry(ssrc).or_default();
        });
    }

    fn unbind(&self, ssrc: u32) {
        self.with(|m| m.remove(&ssrc));
    }

    fn add(&self, ssrc: u32, f: impl FnOnce(&mut FeedbackCounts)) {
        self.with(|m| {
            if let Some(c) = m.get_mut(&ssrc) {
                f(c);
            }
        });
    }
}

/// One connection's feedback per stream, shared by its [`RtcpCounter`] and its statistics.
#[derive(Debug, Clone, Default)]
pub struct ConnectionFeedback {
    /// Outgoing feedback, by the remote stream it is about (publisher's SSRC).
    pub sent: FeedbackBySsrc,
    /// Incoming feedback, by the local stream it is about (the SSRC we send).
    pub received: FeedbackBySsrc,
    /// Where each local stream's current simulcast layer started (`super::nack_floor`).
    pub floors: super::nack_floor::NackFloors,
    /// The send-side bandwidth estimate of the connection and its delay signal
    /// (`super::bwe`); nothing until the first transport-wide feedback.
    pub estimate: super::bwe::Signals,
}

/// Counts NACK, PLI and FIR in both directions, in total and per stream; passes everything
/// through unchanged.
#[derive(Default)]
pub struct RtcpCounter {
    read_queue: VecDeque<TaggedPacket>,
    write_queue: VecDeque<TaggedPacket>,
    feedback: ConnectionFeedback,
}

impl RtcpCounter {
    pub fn new(feedback: ConnectionFeedback) -> Self {
        Self {
            feedback,
            ..Self::default()
        }
    }
}

fn count_per_stream(packets: &[Box<dyn rtc::rtcp::Packet>], by_ssrc: &FeedbackBySsrc) {
    for p in packets {
        let any = p.as_any();
        if let Some(n) = any.downcast_ref::<TransportLayerNack>() {
            let asked: u64 = n
                .nacks
                .iter()
                .map(|pair| 1 + u64::from(pair.lost_packets.count_ones()))
                .sum();
            by_ssrc.add(n.media_ssrc, |c| {
                c.nacks += 1;
                c.nacked_packets += asked;
            });
        } else if let Some(pli) = any.downcast_ref::<PictureLossIndication>() {
            by_ssrc.add(pli.media_ssrc, |c| c.plis += 1);
        } else if let Some(fir) = any.downcast_ref::<FullIntraRequest>() {
            for e in &fir.fir {
                by_ssrc.add(e.ssrc, |c| c.firs += 1);
            }
        } else {
            let blocks = if let Some(rr) = any.downcast_ref::<ReceiverReport>() {
                &rr.reports
            } else if let Some(sr) = any.downcast_ref::<SenderReport>() {
                &sr.reports
            } else {
                continue;
            };
            for b in blocks {
                by_ssrc.add(b.ssrc, |c| {
                    c.reports += 1;
                    c.fraction_lost = b.fraction_lost;
                });
            }
        }
    }
}

fn count(packets: &[Box<dyn rtc::rtcp::Packet>], inbound: bool) {
    for p in packets {
        let any = p.as_any();
        let c = if any.is::<TransportLayerNack>() {
            if inbound {
                &RTCP.nacks_received
            } else {
                &RTCP.nacks_sent
            }
        } else if any.is::<PictureLossIndication>() {
            if inbound {
                &RTCP.plis_received
            } else {
                &RTCP.plis_sent
            }
        } else if inbound && any.is::<FullIntraRequest>() {
            &RTCP.firs_received
        } else {
            continue;
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for RtcpCounter {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet {
            count(packets, true);
            count_per_stream(packets, &self.feedback.received);
        }
        self.read_queue.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.read_queue.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet {
            count(packets, false);
            count_per_stream(packets, &self.feedback.sent);
        }
        self.write_queue.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.write_queue.pop_front()
    }
}

impl Interceptor for RtcpCounter {
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        self.feedback.received.bind(info.ssrc);
    }
    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        self.feedback.received.unbind(info.ssrc);
    }
    fn bind_remote_stream(&mut self, info: &StreamInfo) {
        self.feedback.sent.bind(info.ssrc);
    }
    fn unbind_remote_stream(&mut self, info: &StreamInfo) {
        self.feedback.sent.unbind(info.ssrc);
    }
}

#[derive(Default)]
pub struct KeyframeRequestInterceptor {
    read_queue: VecDeque<TaggedPacket>,
    write_queue: VecDeque<TaggedPacket>,
}

/// The form in which `p` goes up to the application, if it does.
fn delivered(p: &dyn rtc::rtcp::Packet) -> Option<Box<dyn rtc::rtcp::Packet>> {
    let any = p.as_any();
    if any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>() {
        return Some(p.cloned());
    }
    let sr = any.downcast_ref::<SenderReport>()?;
    Some(Box::new(SenderReport {
        reports: vec![],
        profile_extensions: Default::default(),
        ..sr.clone()
    }))
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for KeyframeRequestInterceptor {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        let Packet::Rtcp(packets) = &msg.message.packet else {
            self.read_queue.push_back(msg);
            return Ok(());
        };
        for p in packets.iter().filter_map(|p| delivered(p.as_ref())) {
            self.read_queue.push_back(TaggedPacket {
                now: msg.now,
                transport: msg.transport,
                message: AttributedPacket::new(Packet::Rtcp(vec![p]))
                    .with(Attribute::DeliverToApplication),
            });
        }
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.read_queue.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.write_queue.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.write_queue.pop_front()
    }
}

impl Interceptor for KeyframeRequestInterceptor {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::rtcp::transport_feedbacks::transport_layer_nack::NackPair;

    fn nack(media_ssrc: u32, packet_id: u16, lost_packets: u16) -> Box<dyn rtc::rtcp::Packet> {
        Box::new(TransportLayerNack {
            sender_ssrc: 1,
            media_ssrc,
            nacks: vec![NackPair {
                packet_id,
                lost_packets,
            }],
        })
    }

    #[test]
    fn feedback_is_counted_per_bound_stream_only() {
        let by = FeedbackBySsrc::default();
        by.bind(42);
        count_per_stream(
            &[
                nack(42, 100, 0b101),
                Box::new(PictureLossIndication {
                    sender_ssrc: 1,
                    media_ssrc: 42,
                }),
            ],
            &by,
        );
        // A stream that is not bound (made up by the peer) is not counted, nor kept.
        count_per_stream(&[nack(7, 1, 0)], &by);
        assert_eq!(
            by.get(42),
            Some(FeedbackCounts {
                nacks: 1,
                nacked_packets: 3,
                plis: 1,
                firs: 0,
                ..Default::default()
            })
        );
        // Receiver reports: how many, and the latest loss, per bound stream.
        let rr = |ssrc: u32, fraction_lost: u8| -> Box<dyn rtc::rtcp::Packet> {
            Box::new(ReceiverReport {
                ssrc: 1,
                reports: vec![rtc::rtcp::reception_report::ReceptionReport {
                    ssrc,
                    fraction_lost,
                    ..Default::default()
                }],
                ..Default::default()
            })
        };
        count_per_stream(&[rr(42, 30), rr(7, 99)], &by);
        count_per_stream(&[rr(42, 12)], &by);
        let c = by.get(42).unwrap_or_default();
        assert_eq!((c.reports, c.fraction_lost), (2, 12));
        assert_eq!(by.get(7), None);
        by.unbind(42);
        assert_eq!(by.get(42), None);
    }
}
