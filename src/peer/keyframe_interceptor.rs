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

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rtc::interceptor::{
    Attribute, AttributedPacket, Interceptor, Packet, StreamInfo, TaggedPacket,
};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
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

/// Counts NACK, PLI and FIR in both directions; passes everything through unchanged.
#[derive(Default)]
pub struct RtcpCounter {
    read_queue: VecDeque<TaggedPacket>,
    write_queue: VecDeque<TaggedPacket>,
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
        }
        self.write_queue.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.write_queue.pop_front()
    }
}

impl Interceptor for RtcpCounter {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
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
