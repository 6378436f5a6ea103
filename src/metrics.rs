//! Process-wide counters, rendered in the Prometheus text format at `GET /metrics`.
//! Gauges that the registry and the peer factory already know (rooms, participants, peers,
//! ports) are read from them at scrape time rather than kept twice.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::peer::PeerFactory;
use crate::room::Registry;
use crate::signaling::protocol::Kind;

#[derive(Debug, Default)]
pub struct Metrics {
    pub ws_connections: AtomicU64,
    pub joins: AtomicU64,
    pub join_failures: AtomicU64,
    pub signaling_errors: AtomicU64,
    pub peer_failures: AtomicU64,
    pub ice_failures: AtomicU64,
    pub plis_sent: AtomicU64,
}

fn line(out: &mut String, name: &str, kind: &str, help: &str, v: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
    );
}

impl Metrics {
    pub fn render(&self, rooms: &Registry, peers: &PeerFactory) -> String {
        let mut out = String::new();
        let (mut participants, mut audio, mut video, mut subs) = (0u64, 0u64, 0u64, 0u64);
        let (mut pk_in, mut pk_out, mut by_out, mut dropped, mut kf) = (0u64, 0, 0, 0, 0);
        for r in rooms.rooms() {
            participants += r.participant_count() as u64;
            for t in r.tracks() {
                match t.kind {
                    Kind::Audio => audio += 1,
                    Kind::Video => video += 1,
                }
                subs += t.subscriber_count() as u64;
                pk_in += t.stats.packets_in.load(Ordering::Relaxed);
                pk_out += t.stats.packets_out.load(Ordering::Relaxed);
                by_out += t.stats.bytes_out.load(Ordering::Relaxed);
                dropped += t.stats.dropped.load(Ordering::Relaxed);
                kf += t.stats.keyframe_requests.load(Ordering::Relaxed);
            }
        }
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        line(
            &mut out,
            "cohost_rooms",
            "gauge",
            "Rooms with at least one participant.",
            rooms.room_count() as u64,
        );
        line(
            &mut out,
            "cohost_participants",
            "gauge",
            "Participants in all rooms.",
            participants,
        );
        line(
            &mut out,
            "cohost_published_tracks_audio",
            "gauge",
            "Published audio tracks.",
            audio,
        );
        line(
            &mut out,
            "cohost_published_tracks_video",
            "gauge",
            "Published video tracks.",
            video,
        );
        line(
            &mut out,
            "cohost_subscriptions",
            "gauge",
            "Track subscriptions.",
            subs,
        );
        line(
            &mut out,
            "cohost_peer_connections",
            "gauge",
            "Open peer connections.",
            g(&peers.live),
        );
        line(
            &mut out,
            "cohost_udp_ports_in_use",
            "gauge",
            "UDP ports leased from the range.",
            peers.ports().in_use() as u64,
        );
        line(
            &mut out,
            "cohost_ws_connections",
            "gauge",
            "Open signaling WebSockets.",
            g(&self.ws_connections),
        );
        line(
            &mut out,
            "cohost_tasks_alive",
            "gauge",
            "Tokio tasks alive in the server runtime.",
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks() as u64,
        );
        line(
            &mut out,
            "cohost_packets_received_live",
            "gauge",
            "RTP packets received on currently published tracks.",
            pk_in,
        );
        line(
            &mut out,
            "cohost_packets_forwarded_live",
            "gauge",
            "RTP packets forwarded from currently published tracks.",
            pk_out,
        );
        line(
            &mut out,
            "cohost_bytes_forwarded_live",
            "gauge",
            "Payload bytes forwarded from currently published tracks.",
            by_out,
        );
        line(
            &mut out,
            "cohost_packets_dropped_live",
            "gauge",
            "Packets dropped on full subscriber queues (current tracks).",
            dropped,
        );
        line(
            &mut out,
            "cohost_keyframe_requests_live",
            "gauge",
            "Keyframe requests raised on current tracks.",
            kf,
        );
        line(
            &mut out,
            "cohost_joins_total",
            "counter",
            "Successful joins.",
            g(&self.joins),
        );
        line(
            &mut out,
            "cohost_join_failures_total",
            "counter",
            "Refused joins (room full, ...).",
            g(&self.join_failures),
        );
        line(
            &mut out,
            "cohost_signaling_errors_total",
            "counter",
            "Error responses sent.",
            g(&self.signaling_errors),
        );
        line(
            &mut out,
            "cohost_peer_failures_total",
            "counter",
            "Peer connections that could not be created.",
            g(&self.peer_failures),
        );
        line(
            &mut out,
            "cohost_ice_failures_total",
            "counter",
            "Peer connections that failed (ICE/DTLS).",
            g(&self.ice_failures),
        );
        line(
            &mut out,
            "cohost_plis_sent_total",
            "counter",
            "PLIs sent to publishers (after throttling).",
            g(&self.plis_sent),
        );
        out
    }
}
