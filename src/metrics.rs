//! Process-wide counters, rendered in the Prometheus text format at `GET /metrics`.
//! Gauges that the registry and the peer factory already know (rooms, participants, peers,
//! ports) are read from them at scrape time rather than kept twice.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::peer::PeerFactory;
use crate::peer::keyframe_interceptor::RTCP;
use crate::peer::noise;
use crate::room::Registry;
use crate::sfu::TOTALS;
use crate::signaling::protocol::Kind;
use crate::webhooks::Webhooks;

#[derive(Debug, Default)]
pub struct Metrics {
    pub ws_connections: AtomicU64,
    /// Bytes queued for signaling clients and not yet handed to their sockets.
    pub ws_outbox_bytes: AtomicU64,
    /// Signaling connections closed because the client did not read (close code 4010).
    pub ws_slow_readers: AtomicU64,
    pub joins: AtomicU64,
    pub join_failures: AtomicU64,
    /// Resumable participants whose connection was lost (kept for `signaling.resume_grace`).
    pub resume_detached: AtomicU64,
    /// Participants taken over by a `resume` on a new connection.
    pub resumes: AtomicU64,
    pub signaling_errors: AtomicU64,
    pub peer_failures: AtomicU64,
    pub ice_failures: AtomicU64,
    pub plis_sent: AtomicU64,
    /// HTTP listener (`src/http/serve.rs`): connections open now (WebSockets and HTTP-FLV
    /// players included), refused by the connection caps, and closed by a timeout.
    pub http_connections: AtomicU64,
    pub http_connections_refused: AtomicU64,
    pub http_timeouts: AtomicU64,
    /// HTTP-FLV players playing now, and refused by `server.max_flv_players*`.
    pub flv_players: AtomicU64,
    pub flv_players_refused: AtomicU64,
    /// HLS packagers running (`src/hls/`), HLS requests answered by kind, and requests refused
    /// by `hls.max_blocking_requests`.
    pub hls_streams: AtomicU64,
    pub hls_playlist_requests: AtomicU64,
    pub hls_media_requests: AtomicU64,
    pub hls_blocking_refused: AtomicU64,
}

fn g(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// `cohost_webhooks_*` (all zero while webhooks are off).
fn render_webhooks(out: &mut String, w: &Webhooks) {
    let s = w.stats();
    let _ = writeln!(
        out,
        "# HELP cohost_webhooks_queued Webhook events waiting for delivery (webhooks.queue at most).\n\
         # TYPE cohost_webhooks_queued gauge\ncohost_webhooks_queued {}\n\
         # HELP cohost_webhooks_delivered_total Webhook deliveries answered 2xx (one per event and URL).\n\
         # TYPE cohost_webhooks_delivered_total counter\ncohost_webhooks_delivered_total {}\n\
         # HELP cohost_webhooks_failed_total Webhook delivery attempts that failed (non-2xx, connection error, timeout); retried until webhooks.max_attempts.\n\
         # TYPE cohost_webhooks_failed_total counter\ncohost_webhooks_failed_total {}\n\
         # HELP cohost_webhooks_dropped_total Webhook events dropped: queue_full (not queued), attempts_exhausted (given up for one URL).\n\
         # TYPE cohost_webhooks_dropped_total counter\n\
         cohost_webhooks_dropped_total{{reason=\"queue_full\"}} {}\n\
         cohost_webhooks_dropped_total{{reason=\"attempts_exhausted\"}} {}",
        w.queued(),
        g(&s.delivered),
        g(&s.failed_attempts),
        g(&s.dropped_queue_full),
        g(&s.dropped_attempts),
    );
}

impl Metrics {
    pub fn render(&self, rooms: &Registry, peers: &PeerFactory) -> String {
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
                pk_in += g(&t.stats.packets_in);
                pk_out += g(&t.stats.packets_out);
                by_out += g(&t.stats.bytes_out);
                dropped += g(&t.stats.dropped);
                kf += g(&t.stats.keyframe_requests);
            }
        }
        let tasks = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks() as u64;
        let rows: &[(&str, &str, &str, u64)] = &[
            (
                "cohost_rooms",
                "gauge",
                "Rooms with at least one participant.",
                rooms.room_count() as u64,
            ),
            (
                "cohost_participants",
                "gauge",
                "Participants in all rooms.",
                participants,
            ),
            (
                "cohost_published_tracks_audio",
                "gauge",
                "Published audio tracks.",
                audio,
            ),
            (
                "cohost_published_tracks_video",
                "gauge",
                "Published video tracks.",
                video,
            ),
            (
                "cohost_subscriptions",
                "gauge",
                "Track subscriptions (subscribed tracks).",
                subs,
            ),
            (
                "cohost_peer_connections",
                "gauge",
                "Open peer connections.",
                g(&peers.live),
            ),
            (
                "cohost_udp_ports_in_use",
                "gauge",
                "UDP ports leased from the range.",
                peers.ports().in_use() as u64,
            ),
            (
                "cohost_ws_connections",
                "gauge",
                "Open signaling WebSockets.",
                g(&self.ws_connections),
            ),
            (
                "cohost_ws_outbox_bytes",
                "gauge",
                "Bytes queued for signaling clients, not yet written to their sockets.",
                g(&self.ws_outbox_bytes),
            ),
            (
                "cohost_ws_slow_readers_total",
                "counter",
                "Signaling connections closed because the client did not read (4010).",
                g(&self.ws_slow_readers),
            ),
            (
                "cohost_http_connections",
                "gauge",
                "Open connections on the HTTP listener (WebSockets and HTTP-FLV included).",
                g(&self.http_connections),
            ),
            (
                "cohost_http_connections_refused_total",
                "counter",
                "HTTP connections closed at accept by server.max_connections(_per_ip).",
                g(&self.http_connections_refused),
            ),
            (
                "cohost_http_timeouts_total",
                "counter",
                "HTTP connections or requests ended by a header, idle, request or write timeout.",
                g(&self.http_timeouts),
            ),
            (
                "cohost_flv_players",
                "gauge",
                "HTTP-FLV players playing.",
                g(&self.flv_players),
            ),
            (
                "cohost_flv_players_refused_total",
                "counter",
                "HTTP-FLV requests refused by server.max_flv_players(_per_stream).",
                g(&self.flv_players_refused),
            ),
            (
                "cohost_hls_streams",
                "gauge",
                "Streams packaged for HLS now (packagers run on demand).",
                g(&self.hls_streams),
            ),
            (
                "cohost_hls_playlist_requests_total",
                "counter",
                "HLS playlist requests answered (blocking reloads included).",
                g(&self.hls_playlist_requests),
            ),
            (
                "cohost_hls_media_requests_total",
                "counter",
                "HLS init, segment and part requests answered.",
                g(&self.hls_media_requests),
            ),
            (
                "cohost_hls_blocking_refused_total",
                "counter",
                "HLS requests that would have blocked, refused by hls.max_blocking_requests (503).",
                g(&self.hls_blocking_refused),
            ),
            (
                "cohost_tasks_alive",
                "gauge",
                "Tokio tasks alive in the server runtime.",
                tasks,
            ),
            (
                "cohost_packets_received_live",
                "gauge",
                "RTP packets received on currently published tracks.",
                pk_in,
            ),
            (
                "cohost_packets_forwarded_live",
                "gauge",
                "RTP packets forwarded from currently published tracks.",
                pk_out,
            ),
            (
                "cohost_bytes_forwarded_live",
                "gauge",
                "Payload bytes forwarded from currently published tracks.",
                by_out,
            ),
            (
                "cohost_packets_dropped_live",
                "gauge",
                "Packets dropped on full subscriber queues (current tracks).",
                dropped,
            ),
            (
                "cohost_keyframe_requests_live",
                "gauge",
                "Keyframe requests raised on current tracks.",
                kf,
            ),
            (
                "cohost_packets_received_total",
                "counter",
                "RTP packets received from publishers.",
                g(&TOTALS.packets_in),
            ),
            (
                "cohost_bytes_received_total",
                "counter",
                "RTP payload bytes received from publishers.",
                g(&TOTALS.bytes_in),
            ),
            (
                "cohost_packets_forwarded_total",
                "counter",
                "RTP packets handed to subscriber legs.",
                g(&TOTALS.packets_out),
            ),
            (
                "cohost_bytes_forwarded_total",
                "counter",
                "RTP payload bytes handed to subscriber legs.",
                g(&TOTALS.bytes_out),
            ),
            (
                "cohost_packets_dropped_total",
                "counter",
                "Packets dropped on full subscriber queues.",
                g(&TOTALS.dropped),
            ),
            (
                "cohost_keyframe_requests_total",
                "counter",
                "Keyframe requests raised (joins, PLI/FIR from subscribers), before throttling.",
                g(&TOTALS.keyframe_requests),
            ),
            (
                "cohost_media_stalls_total",
                "counter",
                "Published tracks whose media stopped (no RTP for webrtc.media_stall_timeout) while their connection was up.",
                g(&TOTALS.media_stalls),
            ),
            (
                "cohost_plis_sent_total",
                "counter",
                "Keyframe requests sent to publishers after throttling.",
                g(&self.plis_sent),
            ),
            (
                "cohost_srtp_packets_before_keys_total",
                "counter",
                "Packets that arrived before their connection's SRTP keys (DTLS still running); dropped, counted instead of logged.",
                g(&noise::SRTP_BEFORE_KEYS),
            ),
            (
                "cohost_srtp_read_errors_total",
                "counter",
                "Packets that failed SRTP/SRTCP decryption or parsing; dropped, counted instead of logged.",
                g(&noise::SRTP_READ_ERRORS),
            ),
            (
                "cohost_rtcp_nacks_received_total",
                "counter",
                "RTCP NACK packets received (from subscribers).",
                g(&RTCP.nacks_received),
            ),
            (
                "cohost_nack_old_layer_dropped_total",
                "counter",
                "Retransmissions subscribers asked for, of a simulcast layer they had been switched away from; not sent.",
                g(&crate::peer::nack_floor::DROPPED),
            ),
            (
                "cohost_downlink_overuses_total",
                "counter",
                "Times a subscriber's downlink was found queueing (more sent than it carries) by the delay-based estimate (webrtc.bandwidth_estimate); each moves its simulcast tracks down.",
                g(&crate::peer::bwe::OVERUSES),
            ),
            (
                "cohost_nack_over_budget_total",
                "counter",
                "Retransmissions subscribers asked for beyond the stream's budget (half of what it forwards, at least 10 a second, a packet at most once per 100 ms); not sent.",
                g(&crate::peer::nack_floor::OVER_BUDGET),
            ),
            (
                "cohost_rtcp_nacks_sent_total",
                "counter",
                "RTCP NACK packets sent (to publishers).",
                g(&RTCP.nacks_sent),
            ),
            (
                "cohost_rtcp_plis_received_total",
                "counter",
                "RTCP PLI packets received (from subscribers).",
                g(&RTCP.plis_received),
            ),
            (
                "cohost_rtcp_plis_sent_total",
                "counter",
                "RTCP PLI packets sent on the wire (to publishers).",
                g(&RTCP.plis_sent),
            ),
            (
                "cohost_rtcp_firs_received_total",
                "counter",
                "RTCP FIR packets received (from subscribers).",
                g(&RTCP.firs_received),
            ),
            (
                "cohost_joins_total",
                "counter",
                "Successful joins.",
                g(&self.joins),
            ),
            (
                "cohost_resume_detached_total",
                "counter",
                "Resumable participants whose connection was lost and who were kept for resume.",
                g(&self.resume_detached),
            ),
            (
                "cohost_resumes_total",
                "counter",
                "Participants taken over by a resume on a new connection.",
                g(&self.resumes),
            ),
            (
                "cohost_join_failures_total",
                "counter",
                "Refused joins (bad or expired token, wrong room, room full).",
                g(&self.join_failures),
            ),
            (
                "cohost_signaling_errors_total",
                "counter",
                "Error messages sent to signaling clients.",
                g(&self.signaling_errors),
            ),
            (
                "cohost_peer_failures_total",
                "counter",
                "Peer connections that could not be created (ports, sockets).",
                g(&self.peer_failures),
            ),
            (
                "cohost_ice_failures_total",
                "counter",
                "Peer connections that failed (ICE or DTLS).",
                g(&self.ice_failures),
            ),
        ];
        let mut out = String::with_capacity(rows.len() * 160);
        for (name, kind, help, v) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
        render_webhooks(&mut out, rooms.webhooks());
        out
    }
}
