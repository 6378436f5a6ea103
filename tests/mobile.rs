//! What mobile WebRTC stacks (native libwebrtc on iOS/Android, react-native-webrtc, Flutter)
//! need from the signaling protocol, checked over real sockets against the real server: real
//! mids on server candidates, one end-of-candidates per connection in a shape typed clients
//! decode, `sendonly` subscriber offers with `a=msid-semantic`, one renegotiation per change
//! of the room, and trickled candidates that do not run into the message rate limit.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cohost::auth::Role;
use common::{Client, Server, Signal, post_sdp};
use serde_json::{Value, json};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCSessionDescription, SettingEngineBuilder,
};

/// Everything pushed to `sig` so far (responses to requests made with `request` excepted).
fn drain(sig: &mut Signal) -> Vec<Value> {
    let mut out = vec![];
    while let Ok(v) = sig.events.try_recv() {
        out.push(v);
    }
    out
}

/// Drain `sig` for `d` into `into`.
async fn collect_for(sig: &mut Signal, d: Duration, into: &mut Vec<Value>) {
    let end = tokio::time::Instant::now() + d;
    while let Ok(Some(v)) = tokio::time::timeout_at(end, sig.events.recv()).await {
        into.push(v);
    }
}

/// The m-sections of an SDP: (mid, lines), in order; and the session-level lines.
fn sections(sdp: &str) -> (Vec<&str>, Vec<(String, Vec<&str>)>) {
    let mut session = vec![];
    let mut out: Vec<(String, Vec<&str>)> = vec![];
    for line in sdp.lines() {
        if line.starts_with("m=") {
            out.push((String::new(), vec![line]));
        } else if let Some((mid, lines)) = out.last_mut() {
            if let Some(m) = line.strip_prefix("a=mid:") {
                *mid = m.to_string();
            }
            lines.push(line);
        } else {
            session.push(line);
        }
    }
    (session, out)
}

/// The mid and index a candidate must name on this BUNDLEd SDP: the first mid of the group.
fn bundle_tag(sdp: &str) -> (String, u64) {
    let (session, ms) = sections(sdp);
    let group = session
        .iter()
        .find_map(|l| l.strip_prefix("a=group:BUNDLE "))
        .expect("a BUNDLE group");
    let tag = group.split_whitespace().next().unwrap().to_string();
    let index = ms
        .iter()
        .position(|(mid, _)| *mid == tag)
        .expect("tag m-line");
    (tag, index as u64)
}

fn is_candidate(v: &Value, target: &str) -> bool {
    v["type"] == "candidate" && v["target"] == target
}

fn is_end(v: &Value) -> bool {
    v["candidate"]["candidate"] == ""
}

/// Wait until the server announced `n` tracks of `c`'s own (they start as RTP arrives).
async fn wait_own_tracks(c: &mut Client, n: usize) {
    let pid = c.pid.clone();
    for _ in 0..n {
        c.sig
            .wait_for("own track", |v| {
                v["type"] == "track_published" && v["track"]["participant_id"] == pid.as_str()
            })
            .await;
    }
}

async fn wait_offers(c: &Client, n: u64) {
    let deadline = Instant::now() + common::T;
    while c.offers_answered.load(Ordering::SeqCst) < n {
        assert!(Instant::now() < deadline, "fewer than {n} offers answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_candidates_name_a_real_mid() {
    let server = Server::start().await;
    let mut host = Client::join(&server, "mid", "host", Role::Host).await;
    host.publish(None).await.unwrap();
    let pc = host.publisher.lock().unwrap().clone().expect("publisher");
    let answer = pc
        .remote_description()
        .await
        .expect("the server's answer")
        .sdp;
    let (tag, index) = bundle_tag(&answer);
    let c = host
        .sig
        .wait_for("a publisher candidate", |v| {
            is_candidate(v, "publisher") && !is_end(v)
        })
        .await;
    assert_eq!(c["candidate"]["sdpMid"], tag.as_str(), "{c}");
    assert_eq!(c["candidate"]["sdpMLineIndex"], index, "{c}");

    // The subscriber connection: the server's offer sets the mids.
    let mut fan = Client::watch(&server, "mid", "fan").await;
    let offer = fan.sig.wait_for("offer", |v| v["type"] == "offer").await;
    let (tag, index) = bundle_tag(offer["sdp"].as_str().unwrap());
    assert_eq!(index, 0, "the bundle tag is the first m-line");
    let c = fan
        .sig
        .wait_for("a subscriber candidate", |v| {
            is_candidate(v, "subscriber") && !is_end(v)
        })
        .await;
    assert_eq!(c["candidate"]["sdpMid"], tag.as_str(), "{c}");
    assert_eq!(c["candidate"]["sdpMLineIndex"], index, "{c}");
    // And media flows with them.
    fan.wait_packets(host.publication.as_ref().unwrap().tag_video, 20)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_of_candidates_is_sent_once_in_a_form_native_stacks_parse() {
    let server = Server::start().await;
    let mut host = Client::join(&server, "eoc", "host", Role::Host).await;
    host.publish(None).await.unwrap();
    let mut guest = Client::join(&server, "eoc", "guest", Role::Cohost).await;
    guest.publish(None).await.unwrap();
    let guest_video = guest.publication.as_ref().unwrap().tag_video;
    host.wait_packets(guest_video, 10).await;
    // Renegotiate both kinds of connection: the guest re-offers its publisher connection
    // without video, and the host's subscriber connection gets another offer for that.
    let before = host.offers_answered.load(Ordering::SeqCst);
    let r = guest.unpublish_video().await;
    assert_eq!(r["type"], "response", "{r}");
    wait_offers(&host, before + 1).await;
    let mut host_events = drain(&mut host.sig);
    let mut guest_events = drain(&mut guest.sig);
    // Whatever a later gathering round would send has time to arrive.
    collect_for(&mut host.sig, Duration::from_millis(700), &mut host_events).await;
    collect_for(
        &mut guest.sig,
        Duration::from_millis(100),
        &mut guest_events,
    )
    .await;
    let offers = host_events.iter().filter(|v| v["type"] == "offer").count();
    assert!(
        offers >= 2,
        "the subscriber connection was renegotiated: {offers} offers"
    );
    // Renegotiation offers carry the candidates, and the end of them, in the SDP.
    for o in host_events.iter().filter(|v| v["type"] == "offer").skip(1) {
        let sdp = o["sdp"].as_str().unwrap();
        assert!(
            sdp.contains("\r\na=candidate:") && sdp.contains("\r\na=end-of-candidates"),
            "{sdp}"
        );
    }

    for (who, events, target, publishes_or_offers) in [
        ("host", &host_events, "subscriber", offers),
        ("guest", &guest_events, "publisher", 2),
        ("host", &host_events, "publisher", 1),
    ] {
        let ends: Vec<&Value> = events
            .iter()
            .filter(|v| is_candidate(v, target) && is_end(v))
            .collect();
        assert_eq!(
            ends.len(),
            1,
            "{who}'s {target} connection after {publishes_or_offers} negotiations: {ends:?}"
        );
        // Typed models (Swift Codable, Kotlin, Dart) decode it like any candidate: every
        // field present, with its type, and the mid of the connection's other candidates.
        let c = &ends[0]["candidate"];
        let other = events
            .iter()
            .find(|v| is_candidate(v, target) && !is_end(v))
            .expect("a candidate before it");
        assert!(c["sdpMid"].as_str().is_some_and(|m| !m.is_empty()), "{c}");
        assert!(c["sdpMLineIndex"].as_u64().is_some(), "{c}");
        assert_eq!(c["sdpMid"], other["candidate"]["sdpMid"]);
        assert_eq!(c["sdpMLineIndex"], other["candidate"]["sdpMLineIndex"]);
        // It comes after the connection's candidates.
        let last_cand = events
            .iter()
            .rposition(|v| is_candidate(v, target) && !is_end(v))
            .unwrap();
        let end_at = events
            .iter()
            .position(|v| is_candidate(v, target) && is_end(v))
            .unwrap();
        assert!(end_at > last_cand, "{who} {target}: end before a candidate");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_of_candidates_from_clients_is_accepted_in_every_form() {
    let server = Server::start().await;
    let mut host = Client::join(&server, "eocin", "host", Role::Host).await;
    host.publish(None).await.unwrap();
    for c in [
        json!({"candidate": ""}),
        json!({"candidate": "", "sdpMid": "0", "sdpMLineIndex": 0}),
        json!({"candidate": "", "sdpMid": null, "sdpMLineIndex": null, "usernameFragment": null}),
        json!({"candidate": null, "sdpMid": "0"}),
        json!({}),
        Value::Null,
    ] {
        let r = host
            .sig
            .request(json!({"type": "candidate", "target": "publisher", "candidate": c}))
            .await;
        assert_eq!(r["type"], "response", "{c} -> {r}");
    }
    // Media still flows to a subscriber afterwards.
    let fan = Client::watch(&server, "eocin", "fan").await;
    fan.wait_packets(host.publication.as_ref().unwrap().tag_audio, 20)
        .await;
}

/// Direction attributes of the m-sections of `sdp`, by mid.
fn directions(sdp: &str) -> Vec<(String, String, bool)> {
    sections(sdp)
        .1
        .into_iter()
        .map(|(mid, lines)| {
            let dir = lines
                .iter()
                .find(|l| {
                    matches!(
                        **l,
                        "a=sendrecv" | "a=sendonly" | "a=recvonly" | "a=inactive"
                    )
                })
                .map(|l| l[2..].to_string())
                .unwrap_or_default();
            let msid = lines.iter().any(|l| l.starts_with("a=msid:"));
            (mid, dir, msid)
        })
        .collect()
}

fn has_msid_semantic(sdp: &str) -> bool {
    sections(sdp)
        .0
        .iter()
        .any(|l| l.starts_with("a=msid-semantic:") && l.contains("WMS"))
}

struct QuietHandler;

#[async_trait::async_trait]
impl PeerConnectionEventHandler for QuietHandler {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_offer_is_sendonly_with_msid_semantic() {
    let server = Server::start().await;
    let mut host = Client::join(&server, "dir", "host", Role::Cohost).await;
    host.publish(None).await.unwrap();
    wait_own_tracks(&mut host, 2).await;
    let mut fan = Client::watch(&server, "dir", "fan").await;
    let first = fan
        .sig
        .wait_for("first offer", |v| v["type"] == "offer")
        .await;
    let sdp = first["sdp"].as_str().unwrap();
    assert!(has_msid_semantic(sdp), "first offer: {sdp}");
    let dirs = directions(sdp);
    assert_eq!(dirs.len(), 2, "{dirs:?}");
    for (mid, dir, msid) in &dirs {
        assert_eq!(dir, "sendonly", "m-section {mid}: {sdp}");
        assert!(msid, "m-section {mid} names its track");
    }
    let pubn = host.publication.as_ref().unwrap();
    let (tag_audio, tag_video) = (pubn.tag_audio, pubn.tag_video);
    fan.wait_packets(tag_video, 20).await;

    // The host stops its video: that m-section goes inactive, audio stays sendonly.
    let r = host.unpublish_video().await;
    assert_eq!(r["type"], "response", "{r}");
    let next = fan
        .sig
        .wait_for("offer without video", |v| v["type"] == "offer")
        .await;
    let sdp = next["sdp"].as_str().unwrap();
    assert!(has_msid_semantic(sdp), "renegotiation offer: {sdp}");
    let dirs = directions(sdp);
    let kind_of = |mid: &str| {
        sections(sdp)
            .1
            .into_iter()
            .find(|(m, _)| m == mid)
            .map(|(_, l)| l[0].split_whitespace().next().unwrap().to_string())
            .unwrap()
    };
    for (mid, dir, msid) in &dirs {
        match kind_of(mid).as_str() {
            "m=audio" => assert_eq!((dir.as_str(), *msid), ("sendonly", true), "{sdp}"),
            _ => assert_eq!((dir.as_str(), *msid), ("inactive", false), "{sdp}"),
        }
    }
    let before = fan.wait_packets(tag_audio, 1).await.0;
    fan.wait_packets(tag_audio, before + 20).await;

    // Another publisher's tracks: sendonly too, the video one on the inactive m-section.
    let mut guest = Client::join(&server, "dir", "guest", Role::Cohost).await;
    guest.publish(None).await.unwrap();
    wait_own_tracks(&mut guest, 2).await;
    let g = guest.publication.as_ref().unwrap();
    fan.wait_packets(g.tag_video, 20).await;
    fan.wait_packets(g.tag_audio, 20).await;
    let offers: Vec<Value> = drain(&mut fan.sig)
        .into_iter()
        .filter(|v| v["type"] == "offer")
        .collect();
    let sdp = offers.last().expect("offers for the guest")["sdp"]
        .as_str()
        .unwrap();
    let dirs = directions(sdp);
    let sendonly = dirs.iter().filter(|(_, d, _)| d == "sendonly").count();
    assert_eq!(sendonly, 3, "host audio, guest audio and video: {dirs:?}");
    assert!(
        dirs.iter()
            .all(|(_, d, _)| d == "sendonly" || d == "inactive"),
        "{dirs:?}"
    );
    assert_eq!(
        dirs.len(),
        3,
        "the guest's video reuses the inactive m-section: {dirs:?}"
    );

    // WHEP viewers get the same from the answer to their recvonly offer.
    let mut me = cohost::peer::media_engine().unwrap();
    let reg = cohost::peer::interceptors(&mut me).unwrap();
    let pc: Arc<dyn PeerConnection> = Arc::new(
        PeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_media_engine(me)
            .with_setting_engine(SettingEngineBuilder::new().build())
            .with_interceptor_registry(reg)
            .with_handler(Arc::new(QuietHandler) as Arc<dyn PeerConnectionEventHandler>)
            .with_udp_addrs(vec!["127.0.0.1:0".to_string()])
            .build()
            .await
            .unwrap(),
    );
    common::add_recvonly_audio_video(&pc).await;
    let offer = pc.create_offer(None).await.unwrap();
    pc.set_local_description(offer.clone()).await.unwrap();
    let token = server.token("dir", "viewer", Role::Audience);
    let r = post_sdp(&server, "/whep/dir/host", Some(&token), &offer.sdp).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(has_msid_semantic(&r.body), "WHEP answer: {}", r.body);
    for (mid, dir, _) in directions(&r.body) {
        assert_eq!(dir, "sendonly", "WHEP m-section {mid}: {}", r.body);
    }
    let _ = pc.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cohost_leaving_costs_one_renegotiation() {
    let server = Server::start().await;
    let mut host = Client::join(&server, "one", "host", Role::Host).await;
    host.publish(None).await.unwrap();
    let mut fan = Client::watch(&server, "one", "fan").await;
    // Two co-hosts: one leaves, the other is removed by the host.
    let mut guests = vec![];
    for name in ["g1", "g2"] {
        let mut g = Client::join(&server, "one", name, Role::Cohost).await;
        g.publish(None).await.unwrap();
        for c in [&host, &fan] {
            c.wait_packets(g.publication.as_ref().unwrap().tag_video, 10)
                .await;
            c.wait_packets(g.publication.as_ref().unwrap().tag_audio, 10)
                .await;
        }
        guests.push(g);
    }
    let g2 = guests.pop().unwrap();
    let g1 = guests.pop().unwrap();
    // Settled: no offer in flight for anyone.
    tokio::time::sleep(Duration::from_millis(500)).await;

    for (how, gone) in [("leaves", &g1), ("is removed", &g2)] {
        let before: Vec<u64> = [&host, &fan]
            .iter()
            .map(|c| c.offers_answered.load(Ordering::SeqCst))
            .collect();
        drain(&mut host.sig);
        drain(&mut fan.sig);
        if how == "leaves" {
            gone.leave().await;
        } else {
            let r = host
                .sig
                .request(json!({"type": "remove_cohost", "participant_id": gone.pid}))
                .await;
            assert_eq!(r["type"], "response", "{r}");
        }
        for (i, c) in [&mut host, &mut fan].into_iter().enumerate() {
            let mut events = vec![];
            // Both tracks go, then (after a leave) the participant.
            let mut gone_tracks = 0;
            let deadline = Instant::now() + common::T;
            while gone_tracks < 2 {
                assert!(Instant::now() < deadline, "tracks not unpublished");
                let v = c.sig.wait_for("events", |_| true).await;
                if v["type"] == "track_unpublished" && v["participant_id"] == gone.pid.as_str() {
                    gone_tracks += 1;
                }
                events.push(v);
            }
            wait_offers(c, before[i] + 1).await;
            // A second offer, had there been one, would follow the first answer at once.
            collect_for(&mut c.sig, Duration::from_millis(700), &mut events).await;
            let offers = events.iter().filter(|v| v["type"] == "offer").count();
            assert_eq!(offers, 1, "a co-host who {how}: {offers} offers");
            assert_eq!(c.offers_answered.load(Ordering::SeqCst), before[i] + 1);
            let sdp = events.iter().find(|v| v["type"] == "offer").unwrap()["sdp"]
                .as_str()
                .unwrap()
                .to_string();
            let inactive = directions(&sdp)
                .iter()
                .filter(|(_, d, _)| d == "inactive")
                .count();
            assert!(inactive >= 2, "both tracks left in that one offer: {sdp}");
            if how == "leaves" {
                let at = |t: &str| events.iter().position(|v| v["type"] == t).unwrap();
                assert!(at("participant_left") < at("offer"), "{events:?}");
            }
        }
    }
    // The host's media still reaches the audience.
    let tag = host.publication.as_ref().unwrap().tag_audio;
    let before = fan.wait_packets(tag, 1).await.0;
    fan.wait_packets(tag, before + 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_candidates_do_not_hit_the_message_rate_limit() {
    // The default limit: 50 messages per second, bursts of 100.
    let server = Server::start().await;
    let mut host = Client::join(&server, "rate", "host", Role::Host).await;
    host.publish(None).await.unwrap();
    // Use up most of the burst with other messages...
    for _ in 0..90 {
        host.sig.send(json!({"type": "ping"}));
    }
    // ...then trickle like a phone on two connections: 60 candidates at once, half of them
    // with an id.
    let t0 = Instant::now();
    for n in 0..60u32 {
        let mut m = json!({"type": "candidate", "target": "publisher", "candidate": {
            "candidate": format!("candidate:{n} 1 udp 2122260223 192.0.2.{} {} typ host",
                1 + n % 200, 40000 + n),
            "sdpMid": "0", "sdpMLineIndex": 0}});
        if n % 2 == 0 {
            m["id"] = json!(format!("c{n}"));
        }
        host.sig.send(m);
    }
    // A request right after the burst still goes through.
    let r = host.sig.request(json!({"type": "ping"})).await;
    assert_eq!(r["type"], "response", "{r}");
    let elapsed = t0.elapsed();
    let mut events = drain(&mut host.sig);
    collect_for(&mut host.sig, Duration::from_millis(300), &mut events).await;
    // (The test client trickles its own candidates without waiting for `publish`, so one of
    // them may get `unknown_session`: not what this test is about.)
    let limited: Vec<&Value> = events
        .iter()
        .filter(|v| v["type"] == "error")
        .filter(|v| {
            v["error"]["code"] == "rate_limited"
                || v["id"].as_str().is_some_and(|i| i.starts_with('c'))
        })
        .collect();
    assert!(limited.is_empty(), "errors: {limited:?}");
    let acks = events
        .iter()
        .filter(|v| v["type"] == "response" && v["id"].as_str().is_some_and(|i| i.starts_with('c')))
        .count();
    assert_eq!(acks, 30, "each candidate with an id is acknowledged");
    let pongs = events
        .iter()
        .filter(|v| v["type"] == "response" && v.get("id").is_none())
        .filter(|v| v["result"].get("server_time_ms").is_none())
        .count();
    assert_eq!(pongs, 0, "a candidate without an id gets no response");
    println!("90 pings + 60 candidates + 1 request answered in {elapsed:?}");
    // Past the per-connection candidate cap (max_candidates, 100) the usual error comes back.
    let mut refused = 0;
    for n in 60..120u32 {
        let r = host
            .sig
            .request(
                json!({"type": "candidate", "target": "publisher", "candidate": {
                "candidate": format!("candidate:{n} 1 udp 2122260223 198.51.100.{} {} typ host",
                    1 + n % 200, 40000 + n),
                "sdpMid": "0", "sdpMLineIndex": 0}}),
            )
            .await;
        if r["type"] == "error" {
            assert_eq!(r["error"]["code"], "bad_request", "{r}");
            refused += 1;
        }
    }
    assert!(refused > 0, "the per-connection cap still holds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repromoted_cohost_publishes_on_a_new_connection() {
    let server = Server::start().await;
    let host = Client::join(&server, "again", "host", Role::Host).await;
    let mut fan = Client::join(&server, "again", "fan", Role::Audience).await;
    let mut old_tracks = vec![];
    for round in 0..2 {
        let r = host
            .sig
            .request(json!({"type": "invite_cohost", "participant_id": fan.pid}))
            .await;
        assert_eq!(r["type"], "response", "{r}");
        fan.sig
            .wait_for("invitation", |v| v["type"] == "cohost_invite")
            .await;
        let r = fan
            .sig
            .request(json!({"type": "answer_cohost_invite", "accept": true}))
            .await;
        assert_eq!(r["type"], "response", "{r}");
        fan.sig
            .wait_for("promoted", |v| {
                v["type"] == "role_changed" && v["role"] == "cohost"
            })
            .await;
        // The documented steps: a new RTCPeerConnection, tracks, offer, `publish`
        // (`Client::publish` builds a new connection every time).
        fan.publish(None).await.unwrap();
        let p = fan.publication.as_ref().unwrap();
        host.wait_packets(p.tag_video, 20).await;
        host.wait_packets(p.tag_audio, 20).await;
        let mut ids = vec![];
        let fan_pid = fan.pid.clone();
        for _ in 0..2 {
            let t = fan
                .sig
                .wait_for("own track", |v| {
                    v["type"] == "track_published"
                        && v["track"]["participant_id"] == fan_pid.as_str()
                })
                .await;
            ids.push(t["track"]["id"].as_str().unwrap().to_string());
        }
        assert!(
            ids.iter().all(|i| !old_tracks.contains(i)),
            "new track ids after a new promotion"
        );
        old_tracks.extend(ids);
        if round == 1 {
            break;
        }
        let r = host
            .sig
            .request(json!({"type": "remove_cohost", "participant_id": fan.pid}))
            .await;
        assert_eq!(r["type"], "response", "{r}");
        fan.sig
            .wait_for("demoted", |v| {
                v["type"] == "role_changed" && v["role"] == "audience"
            })
            .await;
        // The server closed its end of the publisher connection: late candidates for it are
        // refused, and the client closes its own end.
        let r = fan
            .sig
            .request(
                json!({"type": "candidate", "target": "publisher", "candidate": {
                "candidate": "candidate:1 1 udp 2122260223 192.0.2.1 40000 typ host",
                "sdpMid": "0", "sdpMLineIndex": 0}}),
            )
            .await;
        assert_eq!(r["error"]["code"], "unknown_session", "{r}");
        let old = fan.publisher.lock().unwrap().take().unwrap();
        fan.stop_media();
        old.close().await.unwrap();
    }
}

/// The `a=ice-ufrag` of an SDP.
fn ufrag(sdp: &str) -> Option<String> {
    common::sdp_attr(sdp, "ice-ufrag")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_ice_restart_gets_new_credentials_and_media_keeps_flowing() {
    let server = Server::start().await;
    let mut host = Client::join(&server, "restart", "host", Role::Host).await;
    let co = Client::join(&server, "restart", "co", Role::Cohost).await;
    host.publish(None).await.unwrap();
    let tag = host.publication.as_ref().unwrap().tag_video;
    let (before, _, _) = co.wait_packets(tag, 30).await;
    let pc = host.publisher.lock().unwrap().clone().unwrap();
    let old = pc.remote_description().await.unwrap().sdp;
    // A phone that changed networks restarts ICE with a new offer on the same connection.
    let offer = pc
        .create_offer(Some(rtc::peer_connection::configuration::RTCOfferOptions {
            ice_restart: true,
        }))
        .await
        .unwrap();
    assert_ne!(
        ufrag(&offer.sdp),
        ufrag(&pc.local_description().await.unwrap().sdp)
    );
    let sdp = offer.sdp.clone();
    pc.set_local_description(offer).await.unwrap();
    let r = host
        .sig
        .request(json!({"type": "publish", "sdp": sdp}))
        .await;
    assert_eq!(r["type"], "response", "{r}");
    let answer = r["result"]["sdp"].as_str().unwrap().to_string();
    assert!(
        ufrag(&answer).is_some() && ufrag(&answer) != ufrag(&old),
        "the server's ICE credentials change"
    );
    pc.set_remote_description(RTCSessionDescription::answer(answer).unwrap())
        .await
        .unwrap();
    host.add_pending_candidates(&pc).await;
    // Media goes on over the restarted transport.
    co.wait_packets(tag, before + 60).await;
}
