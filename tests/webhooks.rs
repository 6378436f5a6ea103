//! Webhooks against a real HTTP receiver: an axum server on an ephemeral loopback port that
//! checks every request's signature the way docs/api.md tells backends to, and records what
//! arrives. The cohost server is the real binary (tests/common).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use cohost::auth::Role;
use common::{Client, Server};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::sync::mpsc;

const KEY: &str = "webhook-test-key-0123456789";
/// Longest wait for one expected event.
const WAIT: Duration = Duration::from_secs(20);

/// The receiver side of the documented check: HMAC-SHA256 over `timestamp + "." + body`,
/// compared in constant time.
fn verify(key: &[u8], timestamp: &str, body: &[u8], signature: &str) -> bool {
    let Some(hex_sig) = signature.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return false;
    };
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

/// One request the receiver accepted.
#[derive(Debug, Clone)]
struct Delivery {
    body: Value,
    raw: Bytes,
    timestamp: String,
    signature: String,
    header_event: String,
    header_id: String,
    attempt: u32,
}

struct Receiver {
    tx: mpsc::UnboundedSender<Delivery>,
    /// Answer 503 to this many requests first.
    fail_first: usize,
    requests: AtomicUsize,
    bad_signatures: AtomicUsize,
}

fn header(h: &HeaderMap, name: &str) -> String {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

async fn hook(State(r): State<Arc<Receiver>>, h: HeaderMap, raw: Bytes) -> StatusCode {
    let n = r.requests.fetch_add(1, Ordering::SeqCst);
    let timestamp = header(&h, "x-cohost-timestamp");
    let signature = header(&h, "x-cohost-signature");
    if !verify(KEY.as_bytes(), &timestamp, &raw, &signature) {
        r.bad_signatures.fetch_add(1, Ordering::SeqCst);
        return StatusCode::UNAUTHORIZED;
    }
    if n < r.fail_first {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let Ok(body) = serde_json::from_slice::<Value>(&raw) else {
        return StatusCode::BAD_REQUEST;
    };
    let _ = r.tx.send(Delivery {
        body,
        raw: raw.clone(),
        timestamp,
        signature,
        header_event: header(&h, "x-cohost-event"),
        header_id: header(&h, "x-cohost-event-id"),
        attempt: header(&h, "x-cohost-attempt").parse().unwrap_or(0),
    });
    StatusCode::NO_CONTENT
}

/// Serve the receiver on `listener`; deliveries come out of the returned channel.
fn serve_receiver(
    listener: tokio::net::TcpListener,
    fail_first: usize,
) -> (Arc<Receiver>, mpsc::UnboundedReceiver<Delivery>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let state = Arc::new(Receiver {
        tx,
        fail_first,
        requests: AtomicUsize::new(0),
        bad_signatures: AtomicUsize::new(0),
    });
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(state.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (state, rx)
}

async fn receiver(fail_first: usize) -> (u16, Arc<Receiver>, mpsc::UnboundedReceiver<Delivery>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (state, rx) = serve_receiver(l, fail_first);
    (port, state, rx)
}

fn hook_env(port: u16) -> Vec<(String, String)> {
    vec![
        (
            "COHOST_WEBHOOKS__URLS".into(),
            format!("[\"http://127.0.0.1:{port}/hook\"]"),
        ),
        ("COHOST_WEBHOOKS__KEY".into(), KEY.into()),
    ]
}

async fn start(env: Vec<(String, String)>) -> Server {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Server::start_with(&env).await
}

/// Collect deliveries for `room` until `last` arrives (or panic after `WAIT`).
async fn events_until(
    rx: &mut mpsc::UnboundedReceiver<Delivery>,
    room: &str,
    last: &str,
) -> Vec<Delivery> {
    let mut got = vec![];
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let d = match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(d)) => d,
            _ => panic!(
                "no {last} for room {room} within {WAIT:?}; got {:?}",
                names(&got)
            ),
        };
        if d.body["room"] != room {
            continue;
        }
        let done = d.body["event"] == last;
        got.push(d);
        if done {
            return got;
        }
    }
}

fn names(ds: &[Delivery]) -> Vec<String> {
    ds.iter()
        .map(|d| d.body["event"].as_str().unwrap_or("?").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_and_in_order_per_room() {
    let (port, recv, mut rx) = receiver(0).await;
    let server = start(hook_env(port)).await;

    let mut host = Client::join(&server, "wh-order", "alice", Role::Host).await;
    host.publish(None).await.unwrap();
    // The tracks are published once their media arrives: wait for them before going on.
    let mut got = events_until(&mut rx, "wh-order", "track_published").await;
    got.extend(events_until(&mut rx, "wh-order", "track_published").await);
    let guest = Client::join(&server, "wh-order", "bob", Role::Audience).await;
    // The host invites bob to a seat and he accepts; then the host takes it back.
    let r = host
        .sig
        .request(json!({"type": "invite_cohost", "participant_id": guest.pid}))
        .await;
    assert_eq!(r["type"], "response", "{r}");
    let r = guest
        .sig
        .request(json!({"type": "answer_cohost_invite", "accept": true}))
        .await;
    assert_eq!(r["type"], "response", "{r}");
    let r = host
        .sig
        .request(json!({"type": "remove_cohost", "participant_id": guest.pid}))
        .await;
    assert_eq!(r["type"], "response", "{r}");
    guest.leave().await;
    host.leave().await;

    got.extend(events_until(&mut rx, "wh-order", "room_ended").await);
    let seq = names(&got);
    let want = [
        "room_started",
        "participant_joined",
        "track_published",
        "track_published",
        "participant_joined",
        "cohost_seat_taken",
        "cohost_seat_left",
        "participant_left",
        "track_unpublished",
        "track_unpublished",
        "participant_left",
        "room_ended",
    ];
    assert_eq!(seq, want, "events in the room's order");

    // The payloads say who and what.
    let b = |i: usize| &got[i].body;
    assert_eq!(b(1)["identity"], "alice");
    assert_eq!(b(1)["role"], "host");
    assert_eq!(b(1)["participant_id"], host.pid.as_str());
    let kinds: Vec<&str> = [2, 3]
        .iter()
        .map(|i| b(*i)["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"audio") && kinds.contains(&"video"),
        "{kinds:?}"
    );
    assert!(b(2)["codec"].as_str().unwrap().contains('/'), "{}", b(2));
    assert_eq!(b(4)["identity"], "bob");
    assert_eq!(b(4)["role"], "audience");
    assert_eq!(b(5)["how"], "invited");
    assert_eq!(b(5)["participant_id"], guest.pid.as_str());
    assert_eq!(b(6)["reason"], "removed");
    assert_eq!(b(7)["identity"], "bob");
    assert_eq!(b(7)["reason"], "left");
    assert_eq!(b(10)["identity"], "alice");
    assert_eq!(b(10)["reason"], "left");
    assert!(b(10)["duration_ms"].as_u64().is_some(), "{}", b(10));
    assert!(b(11)["duration_ms"].as_u64().is_some(), "{}", b(11));

    // Every delivery: unique id (header = body), header event = body event, creation times in
    // order, signed over timestamp and body; any change to either breaks the signature.
    let mut ids = std::collections::HashSet::new();
    let mut last_created = 0;
    for d in &got {
        let id = d.body["id"].as_str().unwrap();
        assert!(ids.insert(id.to_string()), "duplicate id {id}");
        assert_eq!(d.header_id, id);
        assert_eq!(d.header_event, d.body["event"].as_str().unwrap());
        assert_eq!(d.attempt, 1);
        let created = d.body["created_at"].as_u64().unwrap();
        assert!(created >= last_created && created > 1_700_000_000_000);
        last_created = created;
        assert!(verify(KEY.as_bytes(), &d.timestamp, &d.raw, &d.signature));
        let mut tampered = d.raw.to_vec();
        tampered[d.raw.len() / 2] ^= 1;
        assert!(!verify(
            KEY.as_bytes(),
            &d.timestamp,
            &tampered,
            &d.signature
        ));
        let later = (d.timestamp.parse::<u64>().unwrap() + 1).to_string();
        assert!(!verify(KEY.as_bytes(), &later, &d.raw, &d.signature));
        assert!(!verify(
            b"another-key-0123456789",
            &d.timestamp,
            &d.raw,
            &d.signature
        ));
    }
    assert_eq!(recv.bad_signatures.load(Ordering::SeqCst), 0);
    server
        .wait_metrics("webhooks delivered", |m| {
            m.get("cohost_webhooks_delivered_total").copied() >= Some(got.len() as f64)
                && m.get("cohost_webhooks_queued") == Some(&0.0)
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_retried_until_the_receiver_is_back() {
    // The receiver's port is known but nothing listens yet: every attempt is refused.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut env = hook_env(port);
    env.extend([
        ("COHOST_WEBHOOKS__RETRY_INITIAL".into(), "50ms".into()),
        ("COHOST_WEBHOOKS__RETRY_MAX".into(), "200ms".into()),
        ("COHOST_WEBHOOKS__MAX_ATTEMPTS".into(), "100".into()),
    ]);
    let server = start(env).await;
    let host = Client::join(&server, "wh-retry", "carol", Role::Host).await;
    host.leave().await;
    // Attempts fail while the receiver is down (connection refused)...
    server
        .wait_metrics("failed webhook attempts", |m| {
            m.get("cohost_webhooks_failed_total").copied() >= Some(3.0)
        })
        .await;
    assert_eq!(server.metric("cohost_webhooks_delivered_total").await, 0.0);
    // ...then it comes up, answering 503 twice before it takes them.
    let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let (recv, mut rx) = serve_receiver(l, 2);
    let got = events_until(&mut rx, "wh-retry", "room_ended").await;
    assert_eq!(
        names(&got),
        [
            "room_started",
            "participant_joined",
            "participant_left",
            "room_ended"
        ],
        "each event once, in order, after the retries"
    );
    assert!(
        got[0].attempt > 3,
        "first event's attempt: {}",
        got[0].attempt
    );
    assert_eq!(recv.requests.load(Ordering::SeqCst), 2 + got.len());
    server
        .wait_metrics("webhooks delivered after retries", |m| {
            m.get("cohost_webhooks_delivered_total") == Some(&4.0)
                && m.get("cohost_webhooks_queued") == Some(&0.0)
                && m.get("cohost_webhooks_dropped_total{reason=\"attempts_exhausted\"}")
                    == Some(&0.0)
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_queue_overflow_is_counted_not_blocking() {
    // A receiver that accepts connections and never answers.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut conns = vec![];
        while let Ok((s, _)) = l.accept().await {
            conns.push(s);
        }
    });
    let mut env = hook_env(port);
    env.extend([
        ("COHOST_WEBHOOKS__QUEUE".into(), "3".into()),
        ("COHOST_WEBHOOKS__TIMEOUT".into(), "60s".into()),
    ]);
    let server = start(env).await;
    // Signaling goes on at its usual pace while the queue is full.
    let host = Client::join(&server, "wh-full", "dave", Role::Host).await;
    for i in 0..5 {
        let t = Instant::now();
        let c = Client::join(&server, "wh-full", &format!("viewer{i}"), Role::Audience).await;
        let r = c
            .sig
            .request(json!({"type": "chat", "text": "hello"}))
            .await;
        assert_eq!(r["type"], "response", "{r}");
        c.leave().await;
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "join, chat and leave took {:?} with the webhook queue full",
            t.elapsed()
        );
    }
    host.leave().await;
    // 1 room_started + 6 joins + 6 leaves + room_ended = 14 events; 3 fit in the queue.
    server
        .wait_metrics("webhook drops counted", |m| {
            m.get("cohost_webhooks_dropped_total{reason=\"queue_full\"}") == Some(&11.0)
                && m.get("cohost_webhooks_queued") == Some(&3.0)
                && m.get("cohost_webhooks_delivered_total") == Some(&0.0)
        })
        .await;
    held.abort();
}

/// Read deliveries for `room` into `log` until one satisfies `pred` (or panic after `WAIT`).
async fn wait_event(
    rx: &mut mpsc::UnboundedReceiver<Delivery>,
    room: &str,
    log: &mut Vec<Delivery>,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) {
    if log.iter().any(|d| pred(&d.body)) {
        return;
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let d = match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(d)) => d,
            _ => panic!("no {what} within {WAIT:?}; got {:?}", names(log)),
        };
        if d.body["room"] != room {
            continue;
        }
        let done = pred(&d.body);
        log.push(d);
        if done {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_and_destination_events_are_reported() {
    let (port, _recv, mut rx) = receiver(0).await;
    let mut env = hook_env(port);
    env.extend([
        ("COHOST_BRIDGE__RECONNECT_INITIAL".into(), "100ms".into()),
        ("COHOST_BRIDGE__RECONNECT_MAX".into(), "200ms".into()),
        ("COHOST_BRIDGE__RECONNECT_MAX_RETRIES".into(), "2".into()),
    ]);
    let server = start(env).await;
    let room = "wh-bridge";
    let mut host = Client::join(&server, room, "erin", Role::Host).await;
    host.publish_real((30, 200, 30), 500.0).await.unwrap();
    // A CDN that is not there: nothing listens on this port.
    let cdn_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (s, body) = server
        .send_json(
            "POST",
            &format!("/v1/rooms/{room}/bridge"),
            &admin,
            &json!({"destinations": [format!("rtmp://127.0.0.1:{cdn_port}/live/streamkey?sig=secret")]}),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    let mut log = vec![];
    wait_event(&mut rx, room, &mut log, "destination_failed", |b| {
        b["event"] == "destination_failed"
    })
    .await;
    // The stream starts on the host's own H.264 (passed through while alone).
    wait_event(&mut rx, room, &mut log, "bridge_switched", |b| {
        b["event"] == "bridge_switched"
    })
    .await;
    let (s, body) = server
        .send_json(
            "DELETE",
            &format!("/v1/rooms/{room}/bridge"),
            &admin,
            &json!({}),
        )
        .await;
    assert!(s == 200 || s == 204, "{s} {body}");
    host.leave().await;
    wait_event(&mut rx, room, &mut log, "room_ended", |b| {
        b["event"] == "room_ended"
    })
    .await;

    let seq = names(&log);
    let at = |name: &str| {
        seq.iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("no {name} in {seq:?}"))
    };
    let ev = |name: &str| &log[at(name)].body;
    assert_eq!(ev("bridge_started")["destinations"], 1);
    assert!(ev("bridge_started")["width"].as_u64().unwrap() > 0);
    // Retries are numbered; the last error says what went wrong; the stream key's query
    // (its signature) is not in the URL.
    let retrying: Vec<&Value> = log
        .iter()
        .map(|d| &d.body)
        .filter(|b| b["event"] == "destination_retrying")
        .collect();
    assert_eq!(retrying.len(), 2, "{seq:?}");
    assert_eq!(retrying[0]["retries"], 1);
    assert_eq!(retrying[1]["retries"], 2);
    assert_eq!(retrying[0]["error"], "connect_failed", "{}", retrying[0]);
    assert!(retrying[0]["retry_in_ms"].as_u64().unwrap() >= 100);
    let failed = ev("destination_failed");
    assert_eq!(failed["retries"], 2);
    assert_eq!(failed["error"], "connect_failed");
    assert!(!failed["detail"].as_str().unwrap().is_empty());
    let url = failed["url"].as_str().unwrap();
    assert_eq!(url, format!("rtmp://127.0.0.1:{cdn_port}/live/streamkey"));
    assert!(
        !seq.contains(&"destination_connected".to_string()),
        "{seq:?}"
    );
    let switched = ev("bridge_switched");
    assert_eq!(switched["from"], "starting", "{switched}");
    assert_eq!(switched["to"], "passthrough", "{switched}");
    assert_eq!(ev("bridge_stopped")["reason"], "requested");
    // In the order they happened.
    assert!(at("bridge_started") < at("destination_retrying"));
    assert!(at("destination_failed") < at("bridge_stopped"));
    assert!(at("bridge_stopped") < at("room_ended"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seat_requests_and_pk_are_reported_in_both_rooms() {
    let (port, _recv, mut rx) = receiver(0).await;
    let server = start(hook_env(port)).await;
    let a = Client::join(&server, "wh-pk-a", "host-a", Role::Host).await;
    let mut b = Client::join(&server, "wh-pk-b", "host-b", Role::Host).await;
    let fan = Client::join(&server, "wh-pk-a", "fan", Role::Audience).await;
    let ok = |r: Value| assert_eq!(r["type"], "response", "{r}");
    // A seat asked for and approved; the co-host then leaves the room.
    ok(fan.sig.request(json!({"type": "request_cohost"})).await);
    ok(a.sig
        .request(
            json!({"type": "answer_cohost_request", "participant_id": fan.pid, "approve": true}),
        )
        .await);
    fan.leave().await;
    // A PK between the two rooms, ended by room b's host.
    ok(a.sig
        .request(json!({"type": "pk_invite", "room": "wh-pk-b"}))
        .await);
    b.sig
        .wait_for("pk invite", |v| v["type"] == "pk_invite")
        .await;
    ok(b.sig
        .request(json!({"type": "pk_answer", "room": "wh-pk-a", "accept": true}))
        .await);
    ok(b.sig.request(json!({"type": "pk_end"})).await);
    a.leave().await;

    // Deliveries of both rooms arrive interleaved; each room's are in its own order.
    let mut all = vec![];
    let done = |all: &Vec<Delivery>| {
        let seen = |room: &str, ev: &str| {
            all.iter()
                .any(|d: &Delivery| d.body["room"] == room && d.body["event"] == ev)
        };
        seen("wh-pk-a", "room_ended") && seen("wh-pk-b", "pk_ended")
    };
    let deadline = Instant::now() + WAIT;
    while !done(&all) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(d)) => all.push(d),
            _ => panic!("events missing; got {:?}", names(&all)),
        }
    }
    let of = |room: &str| -> Vec<Delivery> {
        all.iter()
            .filter(|d| d.body["room"] == room)
            .cloned()
            .collect()
    };
    let log_a = of("wh-pk-a");
    let log_b = of("wh-pk-b");
    assert_eq!(
        names(&log_b),
        [
            "room_started",
            "participant_joined",
            "pk_started",
            "pk_ended"
        ]
    );
    assert_eq!(log_b[2].body["partner_room"], "wh-pk-a");
    assert_eq!(log_b[2].body["partner_host"], "host-a");
    assert_eq!(
        names(&log_a),
        [
            "room_started",
            "participant_joined",
            "participant_joined",
            "cohost_seat_taken",
            "cohost_seat_left",
            "participant_left",
            "pk_started",
            "pk_ended",
            "participant_left",
            "room_ended"
        ]
    );
    assert_eq!(log_a[3].body["how"], "approved");
    assert_eq!(log_a[4].body["reason"], "left_room");
    assert_eq!(log_a[5].body["role"], "cohost");
    assert_eq!(log_a[6].body["partner_room"], "wh-pk-b");
    assert_eq!(log_a[6].body["partner_host"], "host-b");
    assert_eq!(log_a[7].body["partner_room"], "wh-pk-b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmp_ingest_is_reported_from_start_to_stop() {
    let (port, _recv, mut rx) = receiver(0).await;
    let server = start(hook_env(port)).await;
    let rtmp = server.rtmp.expect("rtmp listener");
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let key = cohost::auth::sign::mint_stream_key(
        cohost::config::DEV_SECRET.as_bytes(),
        "wh-ingest",
        "studio",
        Role::Host,
        exp,
    )
    .unwrap();
    // Two seconds of test pictures and a tone, then ffmpeg ends the stream.
    let mut ffmpeg = common::ffmpeg_push_lavfi(
        &format!("rtmp://{rtmp}/live/{key}"),
        "testsrc=size=320x240:rate=30",
        2,
        std::process::Stdio::null(),
    );
    let status = ffmpeg.wait();
    let status = tokio::time::timeout(Duration::from_secs(30), status)
        .await
        .expect("ffmpeg finished")
        .expect("ffmpeg (Debian ffmpeg) must be installed");
    assert!(status.success());
    let got = events_until(&mut rx, "wh-ingest", "room_ended").await;
    let seq = names(&got);
    assert_eq!(
        seq,
        [
            "room_started",
            "participant_joined",
            "ingest_started",
            "track_published",
            "track_published",
            "ingest_stopped",
            "track_unpublished",
            "track_unpublished",
            "participant_left",
            "room_ended"
        ]
    );
    let started = &got[2].body;
    assert_eq!(started["identity"], "studio");
    assert_eq!(started["role"], "host");
    assert!(
        started["remote_addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert_eq!(started["participant_id"], got[1].body["participant_id"]);
    assert!(got[5].body["duration_ms"].as_u64().unwrap() >= 1000);
}

/// The operator's authorization backend: refuses identity `banned`, and players while
/// `deny_play` is set; records every (verified) request.
struct AuthBackend {
    tx: mpsc::UnboundedSender<Value>,
    deny_play: std::sync::atomic::AtomicBool,
}

async fn auth_hook(State(b): State<Arc<AuthBackend>>, h: HeaderMap, raw: Bytes) -> StatusCode {
    let ts = header(&h, "x-cohost-timestamp");
    if !verify(KEY.as_bytes(), &ts, &raw, &header(&h, "x-cohost-signature")) {
        return StatusCode::UNAUTHORIZED;
    }
    let Ok(v) = serde_json::from_slice::<Value>(&raw) else {
        return StatusCode::BAD_REQUEST;
    };
    let refuse = v["identity"] == "banned"
        || (v["action"] == "on_play" && b.deny_play.load(Ordering::SeqCst));
    let _ = b.tx.send(v);
    if refuse {
        StatusCode::FORBIDDEN
    } else {
        StatusCode::OK
    }
}

/// ffmpeg publishing one second of test media to `url`; whether it was let in to the end.
async fn ffmpeg_publish_1s(url: &str) -> bool {
    let mut ffmpeg = common::ffmpeg_push_lavfi(
        url,
        "testsrc=size=160x120:rate=15",
        1,
        std::process::Stdio::null(),
    );
    let status = ffmpeg.wait();
    tokio::time::timeout(Duration::from_secs(30), status)
        .await
        .expect("ffmpeg finished")
        .expect("ffmpeg (Debian ffmpeg) must be installed")
        .success()
}

fn stream_key(room: &str, identity: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    cohost::auth::sign::mint_stream_key(
        cohost::config::DEV_SECRET.as_bytes(),
        room,
        identity,
        Role::Host,
        exp,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_play_callbacks_admit_or_refuse() {
    let (tx, mut asked) = mpsc::unbounded_channel();
    let backend = Arc::new(AuthBackend {
        tx,
        deny_play: std::sync::atomic::AtomicBool::new(true),
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let app = axum::Router::new()
        .route("/auth", axum::routing::post(auth_hook))
        .with_state(backend.clone());
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    let url = format!("http://127.0.0.1:{port}/auth");
    let server = start(vec![
        ("COHOST_WEBHOOKS__ON_PUBLISH".into(), url.clone()),
        ("COHOST_WEBHOOKS__ON_PLAY".into(), url),
        ("COHOST_WEBHOOKS__KEY".into(), KEY.into()),
    ])
    .await;
    let rtmp = server.rtmp.expect("rtmp listener");
    let next = async |asked: &mut mpsc::UnboundedReceiver<Value>| {
        tokio::time::timeout(WAIT, asked.recv())
            .await
            .expect("callback asked")
            .unwrap()
    };

    // A valid stream key the backend refuses: ffmpeg is turned away, nobody joins.
    let banned = format!("rtmp://{rtmp}/live/{}", stream_key("wh-auth", "banned"));
    assert!(!ffmpeg_publish_1s(&banned).await, "refused publisher");
    let v = next(&mut asked).await;
    assert_eq!(v["action"], "on_publish");
    assert_eq!(v["room"], "wh-auth");
    assert_eq!(v["identity"], "banned");
    assert_eq!(v["role"], "host");
    assert_eq!(v["protocol"], "rtmp");
    assert!(v["client_addr"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(v["id"].as_str().unwrap().starts_with("AU_"));
    // One it admits publishes to the end.
    let ok = format!("rtmp://{rtmp}/live/{}", stream_key("wh-auth", "studio"));
    assert!(ffmpeg_publish_1s(&ok).await, "admitted publisher");
    assert_eq!(next(&mut asked).await["identity"], "studio");
    // An invalid stream key never reaches the backend.
    let forged = format!("rtmp://{rtmp}/live/not-a-key");
    assert!(!ffmpeg_publish_1s(&forged).await);

    // Players: refused by the backend (403 play_refused), then admitted (on to the origin,
    // which has no such stream: 404).
    let (s, body) = server.get("/live/wh-auth.flv", None).await;
    assert_eq!(s, 403, "{body}");
    assert!(body.contains("play_refused"), "{body}");
    let v = next(&mut asked).await;
    assert_eq!(v["action"], "on_play");
    assert_eq!(v["protocol"], "http-flv");
    assert_eq!(v["room"], "wh-auth");
    backend.deny_play.store(false, Ordering::SeqCst);
    let (s, body) = server.get("/live/wh-auth.flv", None).await;
    assert_eq!(s, 404, "{body}");
    assert_eq!(next(&mut asked).await["action"], "on_play");
    assert!(
        asked.try_recv().is_err(),
        "the forged key was not asked about"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn play_callback_fails_closed_or_open_as_configured() {
    // Nothing listens here: the backend cannot be asked.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    for (fail_open, want) in [("false", 403), ("true", 404)] {
        let server = start(vec![
            (
                "COHOST_WEBHOOKS__ON_PLAY".into(),
                format!("http://127.0.0.1:{port}/auth"),
            ),
            ("COHOST_WEBHOOKS__KEY".into(), KEY.into()),
            ("COHOST_WEBHOOKS__AUTH_FAIL_OPEN".into(), fail_open.into()),
        ])
        .await;
        let (s, body) = server.get("/live/wh-closed.flv", None).await;
        assert_eq!(s, want, "auth_fail_open = {fail_open}: {body}");
    }
}

/// Serve the receiver over TLS with `cert`/`key` on `listener`; TLS handshakes that fail are
/// counted in the returned counter.
fn serve_receiver_tls(
    listener: tokio::net::TcpListener,
    cert: rustls::pki_types::CertificateDer<'static>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> (
    Arc<Receiver>,
    mpsc::UnboundedReceiver<Delivery>,
    Arc<AtomicUsize>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let state = Arc::new(Receiver {
        tx,
        fail_first: 0,
        requests: AtomicUsize::new(0),
        bad_signatures: AtomicUsize::new(0),
    });
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(state.clone());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let failed = Arc::new(AtomicUsize::new(0));
    let f = failed.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, app, f) = (acceptor.clone(), app.clone(), f.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    f.fetch_add(1, Ordering::SeqCst);
                    return;
                };
                let svc = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (state, rx, failed)
}

/// An operator's backend behind https with a certificate from its own CA: events arrive
/// signed once `webhooks.ca_file` names that CA, and a server that does not trust it sends
/// nothing (the TLS handshake fails; no event goes out in the clear).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_reach_an_https_backend_whose_ca_is_configured() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let dir = std::env::temp_dir().join(format!("cohost-wh-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("backend-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();

    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap();
    let (recv, mut rx, tls_failures) = serve_receiver_tls(l, leaf.der().clone(), key);
    let url = format!("[\"https://127.0.0.1:{port}/hook\"]");
    let env = |ca: Option<&str>| {
        let mut e = vec![
            ("COHOST_WEBHOOKS__URLS".to_string(), url.clone()),
            ("COHOST_WEBHOOKS__KEY".to_string(), KEY.to_string()),
        ];
        if let Some(ca) = ca {
            e.push(("COHOST_WEBHOOKS__CA_FILE".to_string(), ca.to_string()));
        }
        e
    };

    let server = start(env(Some(ca_file.to_str().unwrap()))).await;
    let _host = Client::join(&server, "wh-tls", "alice", Role::Host).await;
    let got = events_until(&mut rx, "wh-tls", "participant_joined").await;
    assert!(names(&got).contains(&"participant_joined".to_string()));
    assert_eq!(recv.bad_signatures.load(Ordering::SeqCst), 0);
    assert_eq!(tls_failures.load(Ordering::SeqCst), 0);
    drop(server);

    // Only the bundled public roots: the backend's certificate is refused.
    let server = start(env(None)).await;
    let _host = Client::join(&server, "wh-tls-untrusted", "alice", Role::Host).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while tls_failures.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "no TLS attempt within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while let Ok(d) = rx.try_recv() {
        assert_ne!(
            d.body["room"], "wh-tls-untrusted",
            "delivered without trust: {d:?}"
        );
    }
    println!(
        "https: {} requests verified; untrusted: {} TLS handshakes refused",
        recv.requests.load(Ordering::SeqCst),
        tls_failures.load(Ordering::SeqCst)
    );
    drop(server);
    std::fs::remove_dir_all(&dir).unwrap();
}
