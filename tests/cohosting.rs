//! The co-host workflow end to end over real signaling (and, where it matters, real media and
//! the decoded bridge output): seats by request/approve and invitation, host moderation, the
//! host's grace period, cross-room PK, room messages and the viewer feed.

mod common;

use std::time::Duration;

use cohost::auth::Role;
use common::{
    Client, Server, assert_continuous, is_colour, last_frame, pixel, read_flv_tags, wait_frames,
};
use serde_json::{Value, json};

const RED: (u8, u8, u8) = (220, 30, 30);
const BLUE: (u8, u8, u8) = (30, 30, 220);

fn is_type(t: &'static str) -> impl Fn(&Value) -> bool {
    move |v: &Value| v["type"] == t
}

async fn ok(c: &Client, msg: Value) {
    let r = c.sig.request(msg.clone()).await;
    assert_eq!(r["type"], "response", "{msg} -> {r}");
}

async fn refused(c: &Client, msg: Value, code: &str) {
    let r = c.sig.request(msg.clone()).await;
    assert_eq!(r["error"]["code"], code, "{msg} -> {r}");
}

async fn start_bridge(server: &Server, room: &str) -> String {
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (s, body) = server
        .send_json(
            "POST",
            &format!("/v1/rooms/{room}/bridge"),
            &admin,
            &json!({}),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    admin
}

/// Role of `pid` as the room API reports it.
async fn role_of(server: &Server, room: &str, pid: &str) -> String {
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (_, body) = server.get(&format!("/v1/rooms/{room}"), Some(&admin)).await;
    let v: Value = serde_json::from_str(body.trim()).unwrap();
    v["participants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == pid)
        .map(|p| p["role"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_approve_publish_everyone_sees_the_cohost_and_bridge_goes_pip() {
    let server = Server::start().await;
    let mut host = Client::join(&server, "live", "host", Role::Host).await;
    host.publish_real(RED, 440.0).await.unwrap();
    let admin = start_bridge(&server, "live").await;
    let mut other = Client::join(&server, "live", "other", Role::Audience).await;
    let mut fan = Client::join(&server, "live", "fan", Role::Audience).await;
    wait_frames(&server, &admin, "live", 30).await;

    // Solo -> co-hosting -> solo, read from the output while it happens.
    let srv = &server;
    let fan_pid = fan.pid.clone();
    let workflow = async {
        // An audience member may not publish before approval.
        let r = fan.publish_real(BLUE, 660.0).await;
        assert_eq!(r.unwrap_err()["error"]["code"], "forbidden");
        ok(&fan, json!({"type": "request_cohost"})).await;
        let req = host
            .sig
            .wait_for("cohost_request", is_type("cohost_request"))
            .await;
        assert_eq!(req["participant_id"], fan_pid);
        assert_eq!(req["identity"], "fan");
        ok(
            &host,
            json!({"type": "answer_cohost_request", "participant_id": fan_pid, "approve": true}),
        )
        .await;
        let ended = fan
            .sig
            .wait_for("request ended", is_type("cohost_request_ended"))
            .await;
        assert_eq!(ended["outcome"], "approved");
        // Everyone is told, the requester included.
        for c in [&mut fan, &mut other, &mut host] {
            let v = c
                .sig
                .wait_for("role_changed", |v| {
                    v["type"] == "role_changed" && v["participant_id"] == fan_pid
                })
                .await;
            assert_eq!(v["role"], "cohost");
        }
        assert_eq!(role_of(srv, "live", &fan_pid).await, "cohost");
        // Promoted in place: publishes on the same connection.
        fan.publish_real(BLUE, 660.0).await.unwrap();
        for c in [&mut other, &mut host] {
            c.sig
                .wait_for("the new co-host's video", |v| {
                    v["type"] == "track_published"
                        && v["track"]["participant_id"] == fan_pid
                        && v["track"]["kind"] == "video"
                })
                .await;
        }
        // The bridge follows: pip with the co-host bottom right.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let f = last_frame(srv, "live", "approve").await;
        assert!(
            is_colour(pixel(&f, 80, 60), RED),
            "host {:?}",
            pixel(&f, 80, 60)
        );
        let tile = pixel(&f, 275, 152);
        assert!(is_colour(tile, BLUE), "co-host tile {tile:?}");
        // The co-host gives the seat back: solo again.
        ok(&fan, json!({"type": "leave_seat"})).await;
        host.sig
            .wait_for("seat given back", |v| {
                v["type"] == "role_changed" && v["role"] == "audience"
            })
            .await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
    };
    let tags = read_flv_tags(server.addr, "/live/live.flv", 14, workflow).await;
    assert_continuous(&tags, 300);
    let f = last_frame(&server, "live", "solo").await;
    assert!(
        is_colour(pixel(&f, 275, 152), RED),
        "solo again: {:?}",
        pixel(&f, 275, 152)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_can_be_denied_cancelled_or_time_out() {
    let server = Server::start_with(&[("COHOST_ROOM__REQUEST_TIMEOUT", "1s")]).await;
    let mut host = Client::join(&server, "r", "host", Role::Host).await;
    let mut fan = Client::join(&server, "r", "fan", Role::Audience).await;

    ok(&fan, json!({"type": "request_cohost"})).await;
    refused(&fan, json!({"type": "request_cohost"}), "already_pending").await;
    host.sig
        .wait_for("request", is_type("cohost_request"))
        .await;
    ok(
        &host,
        json!({"type": "answer_cohost_request", "participant_id": fan.pid, "approve": false}),
    )
    .await;
    let v = fan
        .sig
        .wait_for("denied", is_type("cohost_request_ended"))
        .await;
    assert_eq!(v["outcome"], "denied");

    ok(&fan, json!({"type": "request_cohost"})).await;
    ok(&fan, json!({"type": "cancel_cohost_request"})).await;
    let v = host
        .sig
        .wait_for("cancelled", |v| {
            v["type"] == "cohost_request_ended" && v["outcome"] == "cancelled"
        })
        .await;
    assert_eq!(v["participant_id"], fan.pid);

    ok(&fan, json!({"type": "request_cohost"})).await;
    let v = fan
        .sig
        .wait_for("timeout", |v| {
            v["type"] == "cohost_request_ended"
                && v["outcome"] != "denied"
                && v["outcome"] != "cancelled"
        })
        .await;
    assert_eq!(v["outcome"], "timed_out");
    // An answer to an expired request changes nothing.
    refused(
        &host,
        json!({"type": "answer_cohost_request", "participant_id": fan.pid, "approve": true}),
        "not_found",
    )
    .await;
    assert_eq!(role_of(&server, "r", &fan.pid).await, "audience");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_invites_removes_mutes_and_kicks() {
    let server = Server::start().await;
    let mut host = Client::join(&server, "m", "host", Role::Host).await;
    let mut fan = Client::join(&server, "m", "fan", Role::Audience).await;
    let mut other = Client::join(&server, "m", "other", Role::Audience).await;

    ok(
        &host,
        json!({"type": "invite_cohost", "participant_id": fan.pid}),
    )
    .await;
    let inv = fan.sig.wait_for("invite", is_type("cohost_invite")).await;
    assert_eq!(inv["from"]["identity"], "host");
    ok(
        &fan,
        json!({"type": "answer_cohost_invite", "accept": true}),
    )
    .await;
    fan.sig
        .wait_for("promoted", |v| {
            v["type"] == "role_changed" && v["role"] == "cohost"
        })
        .await;
    fan.publish(None).await.unwrap();
    let video = host
        .sig
        .wait_for("co-host video", |v| {
            v["type"] == "track_published" && v["track"]["kind"] == "video"
        })
        .await;
    let track_id = video["track"]["id"].as_str().unwrap().to_string();
    let tag = fan.publication.as_ref().unwrap().tag_video;
    host.wait_packets(tag, 20).await;

    // Mute: the SFU stops forwarding; everyone is told.
    ok(
        &host,
        json!({"type": "mute_track", "participant_id": fan.pid, "kind": "video", "muted": true}),
    )
    .await;
    let m = other.sig.wait_for("muted", is_type("track_muted")).await;
    assert_eq!(m["track_id"], track_id.as_str());
    assert_eq!(m["muted"], true);
    let before = host.wait_packets(tag, 1).await.0;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (after, _, _) = host.wait_packets(tag, 1).await;
    assert!(
        after <= before + 3,
        "muted video still flows: {before} -> {after}"
    );
    ok(
        &host,
        json!({"type": "mute_track", "participant_id": fan.pid, "kind": "video", "muted": false}),
    )
    .await;
    host.wait_packets(tag, after + 20).await;

    // Remove: back to audience, tracks gone, may not publish any more.
    ok(
        &host,
        json!({"type": "remove_cohost", "participant_id": fan.pid}),
    )
    .await;
    other
        .sig
        .wait_for("track removed", |v| {
            v["type"] == "track_unpublished" && v["track_id"] == track_id.as_str()
        })
        .await;
    fan.sig
        .wait_for("demoted", |v| {
            v["type"] == "role_changed" && v["role"] == "audience"
        })
        .await;
    assert_eq!(role_of(&server, "m", &fan.pid).await, "audience");
    let r = fan.publish(None).await;
    assert_eq!(r.unwrap_err()["error"]["code"], "forbidden");

    // Kick: the connection closes with 4009, the others see why.
    ok(&host, json!({"type": "kick", "participant_id": other.pid})).await;
    let (code, _) = other.sig.wait_closed().await;
    assert_eq!(code, 4009);
    let left = host
        .sig
        .wait_for("kicked", |v| v["type"] == "participant_left")
        .await;
    assert_eq!(left["reason"], "kicked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_host_may_do_host_things() {
    let server = Server::start().await;
    let host = Client::join(&server, "h", "host", Role::Host).await;
    let cohost = Client::join(&server, "h", "co", Role::Cohost).await;
    let co2 = Client::join(&server, "h", "co2", Role::Cohost).await;
    let fan = Client::join(&server, "h", "fan", Role::Audience).await;
    ok(&fan, json!({"type": "chat", "text": "hi"})).await;
    let msg_id = host.join["history"].as_array().map_or(0, |h| h.len()) as u64 + 10;
    for who in [&cohost, &fan] {
        for msg in [
            json!({"type": "answer_cohost_request", "participant_id": fan.pid, "approve": true}),
            json!({"type": "invite_cohost", "participant_id": fan.pid}),
            json!({"type": "remove_cohost", "participant_id": co2.pid}),
            json!({"type": "mute_track", "participant_id": cohost.pid, "kind": "audio", "muted": true}),
            json!({"type": "kick", "participant_id": host.pid}),
            json!({"type": "delete_message", "message_id": msg_id}),
            json!({"type": "mute_chat", "participant_id": fan.pid, "muted": true}),
            json!({"type": "pk_invite", "room": "elsewhere"}),
            json!({"type": "pk_end"}),
            json!({"type": "start_bridge"}),
        ] {
            refused(who, msg, "forbidden").await;
        }
    }
    // Nothing changed.
    assert_eq!(role_of(&server, "h", &cohost.pid).await, "cohost");
    assert_eq!(role_of(&server, "h", &co2.pid).await, "cohost");
    assert_eq!(role_of(&server, "h", &fan.pid).await, "audience");
    assert_eq!(role_of(&server, "h", &host.pid).await, "host");
    ok(&fan, json!({"type": "chat", "text": "still here"})).await;
    let (s, _) = server
        .get(
            "/v1/rooms/h/bridge",
            Some(&server.auth.mint("*", "o", Role::Admin, None).unwrap()),
        )
        .await;
    assert_eq!(s, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approval_fails_while_every_seat_is_taken() {
    let server = Server::start_with(&[("COHOST_ROOM__COHOST_SEATS", "1")]).await;
    let mut host = Client::join(&server, "s", "host", Role::Host).await;
    let seated = Client::join(&server, "s", "seated", Role::Cohost).await;
    let fan = Client::join(&server, "s", "fan", Role::Audience).await;
    // A second co-host token is refused at the door.
    let r = Client::join_with_token(&server, &server.token("s", "late", Role::Cohost)).await;
    assert_eq!(r.err().unwrap()["error"]["code"], "seats_full");

    ok(&fan, json!({"type": "request_cohost"})).await;
    host.sig
        .wait_for("request", is_type("cohost_request"))
        .await;
    let approve =
        json!({"type": "answer_cohost_request", "participant_id": fan.pid, "approve": true});
    refused(&host, approve.clone(), "seats_full").await;
    assert_eq!(role_of(&server, "s", &fan.pid).await, "audience");
    // The request is still pending: freeing the seat lets the approval through.
    ok(&seated, json!({"type": "leave_seat"})).await;
    ok(&host, approve).await;
    assert_eq!(role_of(&server, "s", &fan.pid).await, "cohost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cohosts_keep_their_seats_while_the_host_comes_back_within_grace() {
    let server = Server::start_with(&[("COHOST_ROOM__HOST_GRACE", "2s")]).await;
    let host = Client::join(&server, "g", "host", Role::Host).await;
    let mut co = Client::join(&server, "g", "co", Role::Cohost).await;
    host.leave().await;
    drop(host);
    co.sig
        .wait_for("grace notice", |v| {
            v["type"] == "message"
                && v["message"]["text"]
                    .as_str()
                    .is_some_and(|t| t.contains("keep their seats"))
        })
        .await;
    // Back within the grace period: nothing changes for the co-host.
    let host = Client::join(&server, "g", "host", Role::Host).await;
    co.sig
        .wait_for("host back", |v| {
            v["type"] == "message" && v["message"]["text"] == "the host is back"
        })
        .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(role_of(&server, "g", &co.pid).await, "cohost");

    // Gone for longer than the grace period: co-hosting ends.
    host.leave().await;
    let v = co
        .sig
        .wait_for("demoted after grace", is_type("role_changed"))
        .await;
    assert_eq!(v["role"], "audience");
    assert_eq!(role_of(&server, "g", &co.pid).await, "audience");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pk_links_two_rooms_and_each_bridge_shows_its_own_host_left() {
    let server = Server::start().await;
    let mut a = Client::join(&server, "room-a", "alice", Role::Host).await;
    let mut b = Client::join(&server, "room-b", "bob", Role::Host).await;
    a.publish_real(RED, 440.0).await.unwrap();
    b.publish_real(BLUE, 660.0).await.unwrap();
    let admin = start_bridge(&server, "room-a").await;
    start_bridge(&server, "room-b").await;
    let mut fan_a = Client::join(&server, "room-a", "fan", Role::Audience).await;
    wait_frames(&server, &admin, "room-a", 30).await;
    wait_frames(&server, &admin, "room-b", 30).await;

    ok(&a, json!({"type": "pk_invite", "room": "room-b"})).await;
    let inv = b.sig.wait_for("pk invite", is_type("pk_invite")).await;
    assert_eq!(inv["room"], "room-a");
    assert_eq!(inv["from"]["identity"], "alice");
    ok(
        &b,
        json!({"type": "pk_answer", "room": "room-a", "accept": true}),
    )
    .await;
    let started = a.sig.wait_for("pk started", is_type("pk_started")).await;
    assert_eq!(started["room"], "room-b");
    // Each side sees and hears the other host in real time (the SFU forwards across rooms),
    // and so does the audience.
    let bob = b.pid.clone();
    for c in [&mut a, &mut fan_a] {
        c.sig
            .wait_for("bob's video in room a", |v| {
                v["type"] == "track_published"
                    && v["track"]["participant_id"] == bob.as_str()
                    && v["track"]["kind"] == "video"
            })
            .await;
    }
    let alice = a.pid.clone();
    b.sig
        .wait_for("alice's video in room b", |v| {
            v["type"] == "track_published" && v["track"]["participant_id"] == alice.as_str()
        })
        .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let fa = last_frame(&server, "room-a", "pk-a").await;
    let fb = last_frame(&server, "room-b", "pk-b").await;
    assert!(
        is_colour(pixel(&fa, 80, 90), RED) && is_colour(pixel(&fa, 240, 90), BLUE),
        "room a: own host left {:?}, partner right {:?}",
        pixel(&fa, 80, 90),
        pixel(&fa, 240, 90)
    );
    assert!(
        is_colour(pixel(&fb, 80, 90), BLUE) && is_colour(pixel(&fb, 240, 90), RED),
        "room b: own host left {:?}, partner right {:?}",
        pixel(&fb, 80, 90),
        pixel(&fb, 240, 90)
    );

    // Either host ends it; both rooms go back to their own layout.
    ok(&b, json!({"type": "pk_end"})).await;
    a.sig.wait_for("pk ended", is_type("pk_ended")).await;
    fan_a
        .sig
        .wait_for("bob's tracks leave room a", |v| {
            v["type"] == "track_unpublished" && v["participant_id"] == bob.as_str()
        })
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let fa = last_frame(&server, "room-a", "after-a").await;
    assert!(
        is_colour(pixel(&fa, 240, 90), RED),
        "room a solo again: {:?}",
        pixel(&fa, 240, 90)
    );
    refused(&a, json!({"type": "pk_end"}), "not_found").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_is_ordered_kept_for_late_joiners_limited_and_moderated() {
    let server = Server::start_with(&[
        ("COHOST_ROOM__MESSAGES_PER_SEC", "3"),
        ("COHOST_ROOM__MAX_CHAT_CHARS", "20"),
    ])
    .await;
    let mut host = Client::join(&server, "c", "host", Role::Host).await;
    let mut fan = Client::join(&server, "c", "fan", Role::Audience).await;
    for text in ["one", "two", "three"] {
        ok(&fan, json!({"type": "chat", "text": text})).await;
    }
    let mut ids = vec![];
    for text in ["one", "two", "three"] {
        let v = host
            .sig
            .wait_for("chat", |v| {
                v["type"] == "message" && v["message"]["kind"] == "chat"
            })
            .await;
        assert_eq!(v["message"]["text"], text, "in order");
        assert_eq!(v["message"]["from"]["identity"], "fan");
        assert!(v["message"]["ts_ms"].as_u64().unwrap() > 1_700_000_000_000);
        ids.push(v["message"]["id"].as_u64().unwrap());
    }
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");
    // Too fast: the fourth within a second is refused.
    refused(
        &fan,
        json!({"type": "chat", "text": "four"}),
        "rate_limited",
    )
    .await;
    refused(
        &fan,
        json!({"type": "chat", "text": "x".repeat(21)}),
        "message_too_large",
    )
    .await;
    ok(&host, json!({"type": "gift", "gift": "rocket", "count": 2})).await;
    ok(&host, json!({"type": "like"})).await;

    // A late joiner gets the history, in order.
    let late = Client::join(&server, "c", "late", Role::Audience).await;
    let history = late.join["history"].as_array().unwrap().clone();
    let chats: Vec<&str> = history
        .iter()
        .filter(|m| m["kind"] == "chat")
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(chats, ["one", "two", "three"]);
    assert!(
        history
            .iter()
            .any(|m| m["kind"] == "gift" && m["gift"] == "rocket" && m["count"] == 2)
    );
    assert!(
        history
            .iter()
            .any(|m| m["kind"] == "joined" && m["from"]["identity"] == "fan")
    );

    // Moderation: delete a message, mute a member's chat.
    ok(
        &host,
        json!({"type": "delete_message", "message_id": ids[1]}),
    )
    .await;
    let d = fan
        .sig
        .wait_for("deleted", is_type("message_deleted"))
        .await;
    assert_eq!(d["message_id"], ids[1]);
    ok(
        &host,
        json!({"type": "mute_chat", "participant_id": fan.pid, "muted": true}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    refused(
        &fan,
        json!({"type": "chat", "text": "hello?"}),
        "chat_muted",
    )
    .await;
    let late2 = Client::join(&server, "c", "late2", Role::Audience).await;
    let texts: Vec<&str> = late2.join["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["kind"] == "chat")
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["one", "three"], "deleted from history");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewers_without_websocket_long_poll_the_message_feed() {
    let server = Server::start().await;
    let host = Client::join(&server, "feed", "host", Role::Host).await;
    let (s, body) = server.get("/v1/rooms/feed/messages?since=0", None).await;
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(body.trim()).unwrap();
    let next = v["next"].as_u64().unwrap();
    assert!(
        v["messages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["kind"] == "joined")
    );
    // Nothing new yet: the request waits until a message arrives.
    let path = format!("/v1/rooms/feed/messages?since={next}&wait=10");
    let poll = server.get(&path, None);
    let say = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        ok(&host, json!({"type": "chat", "text": "hello viewers"})).await;
    };
    let ((s, body), ()) = tokio::join!(poll, say);
    assert_eq!(s, 200);
    let v: Value = serde_json::from_str(body.trim()).unwrap();
    let msgs = v["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 1, "{v}");
    assert_eq!(msgs[0]["text"], "hello viewers");
    assert_eq!(v["next"], msgs[0]["id"]);
    let (s, _) = server.get("/v1/rooms/nope/messages", None).await;
    assert_eq!(s, 404);
}

/// The PK messages `c` got so far (without waiting).
fn pk_messages(c: &mut Client) -> Vec<Value> {
    let mut out = vec![];
    while let Ok(v) = c.sig.events.try_recv() {
        if v["type"].as_str().is_some_and(|t| t.starts_with("pk_")) {
            out.push(v);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_pk_invitation_is_declined_to_the_inviting_host_and_ended_for_the_invited() {
    let server = Server::start_with(&[("COHOST_ROOM__REQUEST_TIMEOUT", "1s")]).await;
    let mut a = Client::join(&server, "pa", "alice", Role::Host).await;
    let mut b = Client::join(&server, "pb", "bob", Role::Host).await;
    ok(&a, json!({"type": "pk_invite", "room": "pb"})).await;
    b.sig.wait_for("pk invite", is_type("pk_invite")).await;
    // Nobody answers within room.request_timeout.
    let declined = a.sig.wait_for("pk declined", is_type("pk_declined")).await;
    assert_eq!(declined["room"], "pb", "{declined}");
    assert_eq!(declined["outcome"], "timed_out", "{declined}");
    let ended = b
        .sig
        .wait_for("pk invite ended", is_type("pk_invite_ended"))
        .await;
    assert_eq!(ended["room"], "pa", "{ended}");
    assert_eq!(ended["outcome"], "timed_out", "{ended}");
    // The invited host got no pk_declined (that is the inviter's), and the late answer fails.
    assert!(pk_messages(&mut b).is_empty());
    refused(
        &b,
        json!({"type": "pk_answer", "room": "pa", "accept": true}),
        "not_found",
    )
    .await;
    // The inviter may invite again.
    ok(&a, json!({"type": "pk_invite", "room": "pb"})).await;
    b.sig
        .wait_for("pk invite again", is_type("pk_invite"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_leaving_withdraws_its_pk_invitations_sent_and_received() {
    let server = Server::start().await;
    let a = Client::join(&server, "wa", "alice", Role::Host).await;
    let mut b = Client::join(&server, "wb", "bob", Role::Host).await;
    let mut c = Client::join(&server, "wc", "carol", Role::Host).await;
    // Sent: alice invites bob, then leaves. Bob is told; accepting fails clearly and links
    // nothing.
    ok(&a, json!({"type": "pk_invite", "room": "wb"})).await;
    b.sig.wait_for("pk invite", is_type("pk_invite")).await;
    a.leave().await;
    drop(a);
    let ended = b
        .sig
        .wait_for("withdrawn", is_type("pk_invite_ended"))
        .await;
    assert_eq!(ended["room"], "wa", "{ended}");
    assert_eq!(ended["outcome"], "gone", "{ended}");
    refused(
        &b,
        json!({"type": "pk_answer", "room": "wa", "accept": true}),
        "withdrawn",
    )
    .await;
    refused(&b, json!({"type": "pk_end"}), "not_found").await;
    assert!(pk_messages(&mut b).is_empty(), "no pk_started");
    // Received: carol invites bob, bob leaves. Carol is told and may invite elsewhere.
    ok(&c, json!({"type": "pk_invite", "room": "wb"})).await;
    b.sig.wait_for("pk invite", is_type("pk_invite")).await;
    b.leave().await;
    drop(b);
    let declined = c.sig.wait_for("declined", is_type("pk_declined")).await;
    assert_eq!(declined["room"], "wb", "{declined}");
    assert_eq!(declined["outcome"], "gone", "{declined}");
    // Bob's room is gone; a new host of it starts with no invitations.
    let b2 = Client::join(&server, "wb", "bob", Role::Host).await;
    refused(
        &b2,
        json!({"type": "pk_answer", "room": "wc", "accept": true}),
        "not_found",
    )
    .await;
    ok(&c, json!({"type": "pk_invite", "room": "wb"})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pk_invite_refuses_own_room_unknown_room_and_a_second_pending_invitation() {
    let server = Server::start().await;
    let a = Client::join(&server, "ia", "alice", Role::Host).await;
    let mut b = Client::join(&server, "ib", "bob", Role::Host).await;
    refused(
        &a,
        json!({"type": "pk_invite", "room": "ia"}),
        "bad_request",
    )
    .await;
    refused(
        &a,
        json!({"type": "pk_invite", "room": "nobody"}),
        "not_found",
    )
    .await;
    ok(&a, json!({"type": "pk_invite", "room": "ib"})).await;
    refused(
        &a,
        json!({"type": "pk_invite", "room": "ib"}),
        "already_pending",
    )
    .await;
    // Bob crossing with his own invitation to alice: one invitation per pair of rooms.
    refused(
        &b,
        json!({"type": "pk_invite", "room": "ia"}),
        "already_pending",
    )
    .await;
    // Bob declines the one invitation he got: alice hears it; he had no second one.
    b.sig.wait_for("pk invite", is_type("pk_invite")).await;
    ok(
        &b,
        json!({"type": "pk_answer", "room": "ia", "accept": false}),
    )
    .await;
    let mut a = a;
    let declined = a.sig.wait_for("declined", is_type("pk_declined")).await;
    assert_eq!(declined["outcome"], "denied", "{declined}");
    let rest = pk_messages(&mut b);
    assert!(rest.is_empty(), "a second invitation: {rest:?}");
}
