//! Audience members at platform scale: they join signaling-only (no peer connection, no
//! offers) and receive media only when they ask; their joins are not fanned out to each other;
//! counts and likes are coalesced.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use cohost::auth::Role;
use common::{Client, Server, wait_until};
use serde_json::{Value, json};

/// Pushed messages received so far (without waiting).
fn drain(c: &mut Client) -> Vec<Value> {
    let mut out = vec![];
    while let Ok(v) = c.sig.events.try_recv() {
        out.push(v);
    }
    out
}

async fn counts(server: &Server, room: &str) -> Value {
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (_, body) = server.get(&format!("/v1/rooms/{room}"), Some(&admin)).await;
    let v: Value = serde_json::from_str(body.trim()).unwrap_or(json!({}));
    v["counts"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audience_joins_signaling_only_and_receives_media_after_subscribe() {
    let server = Server::start().await;
    let mut host = Client::join(&server, "sig", "host", Role::Host).await;
    let mut fan = Client::join(&server, "sig", "fan", Role::Audience).await;
    assert_eq!(fan.join["counts"], json!({"members": 2, "participants": 1}));
    host.publish(None).await.unwrap();
    let (tag_audio, tag_video) = {
        let p = host.publication.as_ref().unwrap();
        (p.tag_audio, p.tag_video)
    };
    // The audience hears about the tracks, and nothing else happens: no offer to answer.
    fan.sig
        .wait_for("the host's video", |v| {
            v["type"] == "track_published" && v["track"]["kind"] == "video"
        })
        .await;
    let r = fan.sig.request(json!({"type": "ping"})).await;
    assert_eq!(r["type"], "response");
    assert!(
        !drain(&mut fan).iter().any(|v| v["type"] == "offer"),
        "an audience member got an offer without asking"
    );
    assert_eq!(fan.offers_answered.load(Ordering::Relaxed), 0);
    assert_eq!(counts(&server, "sig").await["participants"], 1);

    // Asking for the video only: one offer, video flows, audio does not.
    let tracks = host.join["participant"]["id"].clone();
    let video_id = {
        let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
        let (_, body) = server.get("/v1/rooms/sig", Some(&admin)).await;
        let v: Value = serde_json::from_str(body.trim()).unwrap();
        v["tracks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["kind"] == "video" && t["participant_id"] == tracks)
            .map(|t| t["id"].clone())
            .expect("the host's video track")
    };
    let r = fan
        .sig
        .request(json!({"type": "subscribe", "tracks": [video_id]}))
        .await;
    assert_eq!(r["type"], "response", "{r}");
    fan.wait_packets(tag_video, 30).await;
    assert_eq!(counts(&server, "sig").await["participants"], 2);
    assert!(
        !fan.received
            .lock()
            .unwrap()
            .values()
            .any(|e| e.pattern_ids.contains(&tag_audio)),
        "audio arrived without being asked for"
    );
    // Everything, then paused: packets stop without a renegotiation; resumed: they flow.
    fan.subscribe_all().await;
    fan.wait_packets(tag_audio, 30).await;
    let offers = fan.offers_answered.load(Ordering::Relaxed);
    let r = fan.sig.request(json!({"type": "pause_media"})).await;
    assert_eq!(r["type"], "response", "{r}");
    let packets = |c: &Client| -> u64 {
        c.received
            .lock()
            .unwrap()
            .values()
            .filter(|e| e.pattern_ids.contains(&tag_video))
            .map(|e| e.packets)
            .sum()
    };
    // Packets in flight arrive for a moment; then nothing for half a second.
    let mut last = (packets(&fan), std::time::Instant::now());
    wait_until(
        "video to stop while paused",
        Duration::from_secs(5),
        async || {
            let now = packets(&fan);
            if now != last.0 {
                last = (now, std::time::Instant::now());
            }
            last.1.elapsed() >= Duration::from_millis(500)
        },
    )
    .await;
    let r = fan.sig.request(json!({"type": "resume_media"})).await;
    assert_eq!(r["type"], "response", "{r}");
    let before = packets(&fan);
    wait_until("video to flow again", Duration::from_secs(5), async || {
        packets(&fan) > before + 30
    })
    .await;
    assert_eq!(
        fan.offers_answered.load(Ordering::Relaxed),
        offers,
        "no renegotiation"
    );
    // Unsubscribing from everything removes the tracks (one offer).
    let r = fan
        .sig
        .request(json!({"type": "unsubscribe", "all": true}))
        .await;
    assert_eq!(r["type"], "response", "{r}");
    wait_until(
        "the removal offer answered",
        Duration::from_secs(5),
        async || fan.offers_answered.load(Ordering::Relaxed) > offers,
    )
    .await;
    // Bad requests get clear errors.
    let r = fan.sig.request(json!({"type": "subscribe"})).await;
    assert_eq!(r["error"]["code"], "bad_request", "{r}");
    let r = fan
        .sig
        .request(json!({"type": "subscribe", "tracks": ["TR_nope"]}))
        .await;
    assert_eq!(r["error"]["code"], "unknown_track", "{r}");
    drop(host);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audience_joins_reach_the_stage_but_not_the_rest_of_the_audience() {
    let server = Server::start().await;
    let mut host = Client::join(&server, "fan-out", "host", Role::Host).await;
    let mut first = Client::join(&server, "fan-out", "first", Role::Audience).await;
    let second = Client::join(&server, "fan-out", "second", Role::Audience).await;
    // The host sees every member come in (it may invite them).
    host.sig
        .wait_for("the second fan", |v| {
            v["type"] == "participant_joined" && v["participant"]["identity"] == "second"
        })
        .await;
    // Audience members learn the new count instead, coalesced (at most about once a second).
    let v = first
        .sig
        .wait_for("member count", |v| {
            v["type"] == "member_count" && v["members"] == 3
        })
        .await;
    assert_eq!(v["participants"], 1, "{v}");
    assert!(
        !drain(&mut first)
            .iter()
            .any(|v| v["type"] == "participant_joined"),
        "an audience member was told about another audience member"
    );
    // The second fan's join result lists the stage, not the audience.
    let listed: Vec<&str> = second.join["participants"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["identity"].as_str())
        .collect();
    assert_eq!(listed, ["host"]);
    // Taking a seat puts the fan on stage: now everyone is told.
    let r = first.sig.request(json!({"type": "request_cohost"})).await;
    assert_eq!(r["type"], "response", "{r}");
    let r = host
        .sig
        .request(
            json!({"type": "answer_cohost_request", "participant_id": first.pid, "approve": true}),
        )
        .await;
    assert_eq!(r["type"], "response", "{r}");
    let mut second = second;
    second
        .sig
        .wait_for("the new co-host", |v| {
            v["type"] == "participant_joined" && v["participant"]["identity"] == "first"
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_like_storm_is_coalesced_into_few_messages() {
    let server = Server::start().await;
    let _host = Client::join(&server, "likes", "host", Role::Host).await;
    let mut fans = vec![];
    for i in 0..5 {
        fans.push(Client::join(&server, "likes", &format!("fan{i}"), Role::Audience).await);
    }
    for _ in 0..3 {
        for f in &fans {
            let r = f.sig.request(json!({"type": "like", "count": 2})).await;
            assert_eq!(r["type"], "response", "{r}");
        }
    }
    // Every like is counted, in far fewer messages than taps.
    let mut total = 0;
    let mut messages = 0;
    let mut since = 0u64;
    wait_until("30 likes in the feed", Duration::from_secs(5), async || {
        let (_, body) = server
            .get(&format!("/v1/rooms/likes/messages?since={since}"), None)
            .await;
        let v: Value = serde_json::from_str(body.trim()).unwrap_or(json!({}));
        for m in v["messages"].as_array().into_iter().flatten() {
            since = since.max(m["id"].as_u64().unwrap_or(0));
            if m["kind"] == "like" {
                total += m["count"].as_u64().unwrap_or(0);
                messages += 1;
            }
        }
        total >= 30
    })
    .await;
    assert_eq!(total, 30);
    assert!(messages < 15, "{messages} like messages for 15 taps");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_unpublishes_and_stays_in_the_room() {
    let server = Server::start_with(&[("COHOST_ROOM__MAX_PUBLISHERS", "1")]).await;
    let mut host = Client::join(&server, "stay", "host", Role::Host).await;
    let mut co = Client::join(&server, "stay", "co", Role::Cohost).await;
    host.publish(None).await.unwrap();
    co.sig
        .wait_for("the host's video", |v| {
            v["type"] == "track_published" && v["track"]["kind"] == "video"
        })
        .await;
    // The one publisher slot is the host's.
    let r = co.publish(None).await;
    assert!(r.is_err(), "{r:?}");
    let r = host.sig.request(json!({"type": "unpublish"})).await;
    assert_eq!(r["type"], "response", "{r}");
    for _ in 0..2 {
        co.sig
            .wait_for("the host's tracks ending", |v| {
                v["type"] == "track_unpublished"
            })
            .await;
    }
    // Still in the room (chat goes on), with its slot free for someone else.
    let r = host
        .sig
        .request(json!({"type": "chat", "text": "thanks for watching"}))
        .await;
    assert_eq!(r["type"], "response", "{r}");
    assert_eq!(counts(&server, "stay").await["members"], 2);
    drop(co);
    let mut other = Client::join(&server, "stay", "other", Role::Cohost).await;
    other.publish(None).await.unwrap();
}
