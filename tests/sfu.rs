//! SFU behaviour through the real server binary, real WebSockets and real WebRTC peers.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cohost::auth::Role;
use common::{Client, Server, missing_seqs};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_publishers_receive_each_others_audio_and_video() {
    let server = Server::start().await;
    let mut a = Client::join(&server, "duo", "alice", Role::Host).await;
    let mut b = Client::join(&server, "duo", "bob", Role::Cohost).await;
    assert_eq!(b.join["participants"][0]["identity"], "alice");
    let t0 = Instant::now();
    a.publish(None).await.expect("a publishes");
    b.publish(None).await.expect("b publishes");
    let (pa, pb) = (
        a.publication.as_ref().unwrap(),
        b.publication.as_ref().unwrap(),
    );
    let (ta_audio, ta_video, tb_audio, tb_video) =
        (pa.tag_audio, pa.tag_video, pb.tag_audio, pb.tag_video);

    let (_, _, first) = b.wait_packets(ta_video, 1).await;
    println!("first video packet after {:?}", first - t0);
    for (c, tag) in [
        (&b, ta_audio),
        (&b, ta_video),
        (&a, tb_audio),
        (&a, tb_video),
    ] {
        let (n, bad, _) = c.wait_packets(tag, 150).await;
        assert_eq!(bad, 0, "payload bytes altered");
        assert!(n >= 150);
    }
    // Sequence numbers pass through unchanged: contiguous on loopback.
    for (c, tag) in [
        (&b, ta_audio),
        (&b, ta_video),
        (&a, tb_audio),
        (&a, tb_video),
    ] {
        let seqs = c.seqs(tag);
        assert_eq!(missing_seqs(&seqs), 0, "gaps in {seqs:?}");
    }
    // Room state seen by a late joiner lists both publishers and their tracks.
    let c = Client::watch(&server, "duo", "carol").await;
    let ps = c.join["participants"].as_array().unwrap();
    assert_eq!(ps.len(), 2);
    for p in ps {
        assert_eq!(p["tracks"].as_array().unwrap().len(), 2, "{p}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiner_triggers_one_keyframe_request_and_receives_video() {
    let server = Server::start().await;
    let mut host = Client::join(&server, "kf", "host", Role::Host).await;
    host.publish(None).await.unwrap();
    let tag = host.publication.as_ref().unwrap().tag_video;
    let plis = host.publication.as_ref().unwrap().plis.clone();
    // Nobody subscribes yet: no keyframe requests.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = plis.load(Ordering::SeqCst);
    let viewer = Client::watch(&server, "kf", "viewer").await;
    viewer.wait_packets(tag, 30).await;
    let deadline = Instant::now() + common::T;
    while plis.load(Ordering::SeqCst) == before {
        assert!(Instant::now() < deadline, "no PLI reached the publisher");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Wait past the throttle interval; exactly one request for one joiner.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(plis.load(Ordering::SeqCst) - before, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_joiners_at_once_trigger_few_keyframe_requests() {
    let server = Server::start_with(&[("COHOST_WEBRTC__KEYFRAME_REQUEST_INTERVAL", "500ms")]).await;
    let mut host = Client::join(&server, "kf10", "host", Role::Host).await;
    host.publish(None).await.unwrap();
    let tag = host.publication.as_ref().unwrap().tag_video;
    let plis = host.publication.as_ref().unwrap().plis.clone();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = plis.load(Ordering::SeqCst);
    let joins = (0..10).map(|i| {
        let s = &server;
        async move { Client::watch(s, "kf10", &format!("v{i}")).await }
    });
    let viewers = futures::future::join_all(joins).await;
    for v in &viewers {
        v.wait_packets(tag, 30).await;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let sent = plis.load(Ordering::SeqCst) - before;
    let requested = server.metric("cohost_keyframe_requests_live").await;
    println!("10 joiners: {requested} keyframe requests raised, {sent} PLIs reached the publisher");
    assert!(requested >= 10.0, "each joiner asks for a keyframe");
    assert!(
        (1..=4).contains(&sent),
        "throttle should coalesce, got {sent}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_retransmission_recovers_lost_packets() {
    let server = Server::start().await;
    let mut host = Client::join(&server, "nack", "host", Role::Host).await;
    let viewer = Client::watch(&server, "nack", "viewer").await;
    // The host's wire drops every 25th packet the first time it is sent.
    host.publish(Some(25)).await.unwrap();
    let p = host.publication.as_ref().unwrap();
    viewer.wait_packets(p.tag_video, 400).await;
    let dropped = p.loss_dropped.load(Ordering::SeqCst);
    assert!(dropped >= 10, "loss simulation dropped {dropped}");
    // Let the last NACK round trips finish, then every sequence number must be there.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seqs = viewer.seqs(p.tag_video);
    // Packets near the end may still be waiting for their retransmission: judge all but the
    // newest 60 sequence numbers.
    let first = seqs[0];
    let newest = seqs
        .iter()
        .map(|s| s.wrapping_sub(first))
        .filter(|d| *d < 30000)
        .max()
        .unwrap_or(0);
    let settled: Vec<u16> = seqs
        .iter()
        .copied()
        .filter(|s| {
            let d = s.wrapping_sub(first);
            d < 30000 && d + 60 <= newest
        })
        .collect();
    let missing = missing_seqs(&settled);
    if missing > 0 {
        let first = seqs[0];
        let set: std::collections::HashSet<u16> = seqs.iter().copied().collect();
        let gaps: Vec<u16> = (0..seqs.len() as u16)
            .filter(|d| !set.contains(&first.wrapping_add(*d)))
            .collect();
        println!(
            "first seq {first}, missing offsets {gaps:?}, received {}",
            seqs.len()
        );
    }
    println!("dropped {dropped} on the publisher's wire; {missing} missing at the subscriber");
    assert_eq!(missing, 0, "NACK did not recover the losses");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_retransmission_recovers_loss_toward_subscriber() {
    let server = Server::start().await;
    let mut host = Client::join(&server, "nack2", "host", Role::Host).await;
    let dropped = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let token = server.token("nack2", "viewer", Role::Audience);
    let viewer = Client::join_opts(&server, &token, Some((25, dropped.clone())))
        .await
        .unwrap();
    viewer.subscribe_all().await;
    host.publish(None).await.unwrap();
    let p = host.publication.as_ref().unwrap();
    viewer.wait_packets(p.tag_video, 400).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let d = dropped.load(Ordering::SeqCst);
    assert!(d >= 10, "loss simulation dropped {d}");
    let seqs = viewer.seqs(p.tag_video);
    let first = seqs[0];
    let newest = seqs
        .iter()
        .map(|s| s.wrapping_sub(first))
        .filter(|d| *d < 30000)
        .max()
        .unwrap_or(0);
    let settled: Vec<u16> = seqs
        .iter()
        .copied()
        .filter(|s| {
            let d = s.wrapping_sub(first);
            d < 30000 && d + 60 <= newest
        })
        .collect();
    let missing = missing_seqs(&settled);
    println!("subscriber dropped {d} on arrival; {missing} still missing");
    assert_eq!(missing, 0, "the SFU did not retransmit on NACK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audience_cannot_publish() {
    let server = Server::start().await;
    let mut v = Client::watch(&server, "r", "viewer").await;
    let err = v
        .publish(None)
        .await
        .expect_err("audience publish must fail");
    assert_eq!(err["error"]["code"], "forbidden", "{err}");
    // The connection still works.
    let r = v.sig.request(json!({"type":"ping"})).await;
    assert_eq!(r["type"], "response");
    assert_eq!(server.metric("cohost_published_tracks_video").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_for_room_a_cannot_join_room_b() {
    let server = Server::start().await;
    let token = server.token("a", "bob", Role::Cohost);
    let sig = common::Signal::connect(&server.ws_url()).await;
    let r = sig
        .request(json!({"type":"join","token":token,"room":"b"}))
        .await;
    assert_eq!(r["error"]["code"], "wrong_room", "{r}");
    assert_eq!(sig.wait_closed().await.0, 4003);
    // Same through the URL form.
    let sig = common::Signal::connect(&format!("{}?room=b", server.ws_url())).await;
    let r = sig.request(json!({"type":"join","token":token})).await;
    assert_eq!(r["error"]["code"], "wrong_room", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_forged_tokens_are_refused() {
    let server = Server::start().await;
    let sig = common::Signal::connect(&server.ws_url()).await;
    let r = sig
        .request(json!({"type":"join","token":server.expired_token("r","old")}))
        .await;
    assert_eq!(r["error"]["code"], "token_expired", "{r}");
    assert_eq!(sig.wait_closed().await.0, 4002);
    let sig = common::Signal::connect(&server.ws_url()).await;
    let r = sig
        .request(json!({"type":"join","token":"eyJhbGciOiJIUzI1NiJ9.e30.AAAA"}))
        .await;
    assert_eq!(r["error"]["code"], "invalid_token", "{r}");
    assert_eq!(sig.wait_closed().await.0, 4001);
    assert_eq!(server.metric("cohost_rooms").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_full_is_refused() {
    let server = Server::start_with(&[
        ("COHOST_ROOM__MAX_MEMBERS", "3"),
        ("COHOST_ROOM__MAX_PARTICIPANTS", "2"),
    ])
    .await;
    let _a = Client::join(&server, "small", "a", Role::Host).await;
    // Real-time participants: the host and one co-host; a second co-host is refused.
    let _b = Client::join(&server, "small", "b", Role::Cohost).await;
    let err = Client::join_with_token(&server, &server.token("small", "c", Role::Cohost))
        .await
        .err()
        .expect("refused");
    assert_eq!(err["error"]["code"], "room_full", "{err}");
    // The audience is signaling-only and counts only against the member limit.
    let fan = Client::join(&server, "small", "fan", Role::Audience).await;
    let err = Client::join_with_token(&server, &server.token("small", "d", Role::Audience))
        .await
        .err()
        .expect("refused");
    assert_eq!(err["error"]["code"], "room_full", "{err}");
    // Receiving media would make the audience member the third real-time participant.
    let r = fan
        .sig
        .request(json!({"type": "subscribe", "all": true}))
        .await;
    assert_eq!(r["error"]["code"], "room_full", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_messages_get_errors_and_connection_keeps_working() {
    let server = Server::start().await;
    let mut c = Client::join(&server, "bad", "x", Role::Host).await;
    c.sig.send_raw("{this is not json");
    let e = c
        .sig
        .wait_for("bad_request", |v| v["type"] == "error")
        .await;
    assert_eq!(e["error"]["code"], "bad_request");
    let r = c.sig.request(json!({"type":"teleport"})).await;
    assert_eq!(r["error"]["code"], "unknown_type");
    let r = c.sig.request(json!({"type":"publish"})).await;
    assert_eq!(r["error"]["code"], "bad_request", "missing sdp: {r}");
    let r = c
        .sig
        .request(json!({"type":"ping","pad":"x".repeat(100_000)}))
        .await;
    assert_eq!(r["error"]["code"], "message_too_large", "{r}");
    let r = c
        .sig
        .request(json!({"type":"publish","sdp":"v=0\r\nthis is not sdp"}))
        .await;
    assert_eq!(r["error"]["code"], "bad_sdp", "{r}");
    let r = c
        .sig
        .request(json!({"type":"candidate","target":"subscriber","candidate":{"candidate":"candidate:1 1 udp 1 127.0.0.1 9 typ host"}}))
        .await;
    assert_eq!(r["error"]["code"], "unknown_session", "{r}");
    let r = c
        .sig
        .request(json!({"type":"answer","offer_id":99,"sdp":"v=0"}))
        .await;
    assert_eq!(r["error"]["code"], "stale_answer", "{r}");
    let r = c.sig.request(json!({"type":"join","token":"t"})).await;
    assert_eq!(r["error"]["code"], "already_joined", "{r}");
    // After all that, publishing still works and media flows to another participant.
    c.publish(None).await.expect("publish after errors");
    let v = Client::watch(&server, "bad", "y").await;
    v.wait_packets(c.publication.as_ref().unwrap().tag_audio, 20)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_cleans_up_events_tracks_room_and_tasks() {
    let server = Server::start().await;
    let baseline_tasks = server.metric("cohost_tasks_alive").await;
    let mut a = Client::join(&server, "life", "a", Role::Host).await;
    let mut b = Client::join(&server, "life", "b", Role::Cohost).await;
    b.publish(None).await.unwrap();
    let tag = b.publication.as_ref().unwrap().tag_video;
    a.wait_packets(tag, 20).await;
    let offers_before = a.offers_answered.load(Ordering::SeqCst);
    b.leave().await;
    // The tracks are unpublished first, then the participant leaves.
    let unpub = a
        .sig
        .wait_for("track_unpublished", |v| v["type"] == "track_unpublished")
        .await;
    assert_eq!(unpub["participant_id"], b.pid.as_str());
    let ev = a
        .sig
        .wait_for("participant_left", |v| v["type"] == "participant_left")
        .await;
    assert_eq!(ev["identity"], "b");
    assert_eq!(ev["reason"], "left");
    // A renegotiation removed the tracks from a's subscriber connection.
    let deadline = Instant::now() + common::T;
    while a.offers_answered.load(Ordering::SeqCst) == offers_before {
        assert!(
            Instant::now() < deadline,
            "no renegotiation after unpublish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server
        .wait_metrics("b's resources released", |m| {
            m["cohost_participants"] == 1.0 && m["cohost_peer_connections"] == 1.0
        })
        .await;
    a.leave().await;
    drop(a);
    drop(b);
    server
        .wait_metrics("room removed and everything released", |m| {
            m["cohost_rooms"] == 0.0
                && m["cohost_peer_connections"] == 0.0
                && m["cohost_udp_ports_in_use"] == 0.0
                && m["cohost_ws_connections"] == 0.0
                && m["cohost_tasks_alive"] <= baseline_tasks
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanished_websocket_is_a_leave() {
    let server = Server::start().await;
    let mut a = Client::join(&server, "gone", "a", Role::Host).await;
    let mut b = Client::join(&server, "gone", "b", Role::Cohost).await;
    b.publish(None).await.unwrap();
    a.wait_packets(b.publication.as_ref().unwrap().tag_audio, 10)
        .await;
    // Kill b's signaling connection without a close frame, like a killed tab.
    b.sig.vanish();
    let ev = a
        .sig
        .wait_for("participant_left", |v| v["type"] == "participant_left")
        .await;
    assert_eq!(ev["identity"], "b");
    server
        .wait_metrics("b released", |m| {
            m["cohost_participants"] == 1.0
                && m["cohost_published_tracks_video"] == 0.0
                && m["cohost_peer_connections"] == 1.0
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanished_media_connection_is_a_leave_after_ice_timeout() {
    let server = Server::start().await;
    let mut a = Client::join(&server, "cut", "a", Role::Host).await;
    let mut b = Client::join(&server, "cut", "b", Role::Cohost).await;
    b.publish(None).await.unwrap();
    a.wait_packets(b.publication.as_ref().unwrap().tag_audio, 10)
        .await;
    // Cut b's media (its peer connections go silent) while its WebSocket stays up.
    b.stop_media();
    let pc = b.publisher.lock().unwrap().clone().unwrap();
    pc.close().await.unwrap();
    b.subscriber.close().await.unwrap();
    let t = Instant::now();
    let ev = a
        .sig
        .wait_for("participant_left", |v| v["type"] == "participant_left")
        .await;
    println!("media cut detected after {:?}", t.elapsed());
    assert_eq!(ev["reason"], "disconnected");
    assert_eq!(b.sig.wait_closed().await.0, 4008);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_identity_rejoining_replaces_the_old_connection() {
    let server = Server::start().await;
    let old = Client::join(&server, "re", "a", Role::Host).await;
    let _new = Client::join(&server, "re", "a", Role::Host).await;
    assert_eq!(old.sig.wait_closed().await.0, 4005);
    server
        .wait_metrics("one participant", |m| m["cohost_participants"] == 1.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_room_api_requires_admin_or_host() {
    let server = Server::start().await;
    let _a = Client::join(&server, "api", "a", Role::Host).await;
    let (s, _) = server.get("/v1/rooms", None).await;
    assert_eq!(s, 401);
    let cohost = server.token("api", "c", Role::Cohost);
    let (s, _) = server.get("/v1/rooms/api", Some(&cohost)).await;
    assert_eq!(s, 403);
    let host = server.token("api", "a", Role::Host);
    let (s, body) = server.get("/v1/rooms/api", Some(&host)).await;
    assert_eq!(s, 200);
    assert!(body.contains("\"identity\":\"a\""), "{body}");
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (s, body) = server.get("/v1/rooms", Some(&admin)).await;
    assert_eq!(s, 200);
    assert!(body.contains("\"name\":\"api\""), "{body}");
    let (s, body) = server.get("/healthz", None).await;
    assert_eq!(s, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_track_by_renegotiation_unpublishes_it() {
    let server = Server::start().await;
    let mut host = Client::join(&server, "unpub", "host", Role::Host).await;
    let mut viewer = Client::watch(&server, "unpub", "viewer").await;
    host.publish(None).await.unwrap();
    let p = host.publication.as_ref().unwrap();
    viewer.wait_packets(p.tag_video, 20).await;
    let r = host.unpublish_video().await;
    assert_eq!(r["type"], "response", "{r}");
    let ev = viewer
        .sig
        .wait_for("track_unpublished", |v| v["type"] == "track_unpublished")
        .await;
    assert_eq!(ev["participant_id"], host.pid.as_str());
    // Audio keeps flowing.
    let (n, _, _) = viewer.wait_packets(p.tag_audio, 10).await;
    let (m, _, _) = viewer.wait_packets(p.tag_audio, n + 25).await;
    assert!(m > n);
    server
        .wait_metrics("one video track fewer", |m| {
            m["cohost_published_tracks_video"] == 0.0
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_stats_and_metrics_report_forwarding() {
    let server = Server::start().await;
    let mut host = Client::join(&server, "stats", "host", Role::Host).await;
    let viewer = Client::watch(&server, "stats", "viewer").await;
    host.publish(None).await.unwrap();
    viewer
        .wait_packets(host.publication.as_ref().unwrap().tag_video, 30)
        .await;
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let deadline = Instant::now() + common::T;
    let room = loop {
        let (s, body) = server.get("/v1/rooms/stats", Some(&admin)).await;
        assert_eq!(s, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
        let video = v["tracks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["kind"] == "video")
            .cloned()
            .unwrap();
        let host_media = v["participants"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["identity"] == "host")
            .map(|p| p["media"].clone())
            .unwrap();
        if video["bitrate_bps"].as_u64().unwrap_or(0) > 0 && !host_media["publisher"].is_null() {
            break v;
        }
        assert!(Instant::now() < deadline, "no bitrate in {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let video = room["tracks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["kind"] == "video")
        .unwrap();
    // 3 packets of 1000 bytes per 33 ms frame: about 720 kbit/s.
    let bps = video["bitrate_bps"].as_u64().unwrap();
    assert!((300_000..2_000_000).contains(&bps), "{bps}");
    assert_eq!(video["subscribers"], 1);
    let m = server.metrics().await;
    assert!(m["cohost_packets_forwarded_total"] > 0.0);
    assert!(m["cohost_bytes_forwarded_total"] > 0.0);
    assert!(m["cohost_plis_sent_total"] >= 1.0);
    assert!(m["cohost_rtcp_plis_sent_total"] >= 1.0);
    assert_eq!(m["cohost_subscriptions"], 2.0);
}

/// A subscriber that asks (NACK) for the last 100 packets every 20 ms, whatever it received,
/// gets a bounded share resent (`peer::nack_budget`: half of what is forwarded, at least 10 a
/// second, a packet at most once per 100 ms), not 50 times the stream; and the stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retransmissions_to_a_subscriber_that_asks_for_everything_are_bounded() {
    use rtc::rtcp::transport_feedbacks::transport_layer_nack::{
        TransportLayerNack, nack_pairs_from_sequence_numbers,
    };
    let server = Server::start().await;
    let mut host = Client::join(&server, "nackflood", "host", Role::Host).await;
    host.publish(None).await.unwrap();
    let viewer = Client::watch(&server, "nackflood", "fan").await;
    let tag = host.publication.as_ref().unwrap().tag_video;
    viewer.wait_packets(tag, 50).await;
    let (remote, ssrc) = {
        let r = viewer.received.lock().unwrap();
        let e = r
            .values()
            .find(|e| e.pattern_ids.contains(&tag))
            .expect("the host's video");
        (
            e.remote.clone().expect("remote track"),
            *e.ssrcs.iter().next().expect("an SSRC"),
        )
    };
    let from = viewer.seqs(tag).len();
    let until = Instant::now() + Duration::from_secs(3);
    let mut asked = 0usize;
    while Instant::now() < until {
        let last = *viewer.seqs(tag).last().expect("packets");
        let seqs: Vec<u16> = (0..100u16).rev().map(|i| last.wrapping_sub(i)).collect();
        asked += seqs.len();
        let nack = TransportLayerNack {
            sender_ssrc: 1,
            media_ssrc: ssrc,
            nacks: nack_pairs_from_sequence_numbers(&seqs),
        };
        remote
            .write_rtcp(vec![Box::new(nack)])
            .await
            .expect("send NACK");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the last resends arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = viewer.seqs(tag);
    let window = &got[from..];
    let unique = window
        .iter()
        .collect::<std::collections::HashSet<_>>()
        .len();
    let over = server.metric("cohost_nack_over_budget_total").await;
    println!(
        "asked {asked} resends in 3 s; received {} packets, {unique} distinct; {over} over budget",
        window.len()
    );
    assert!(unique > 50, "the stream goes on: {unique} new packets");
    assert!(
        window.len() <= unique * 2,
        "resends bounded: {} packets for {unique} distinct",
        window.len()
    );
}
