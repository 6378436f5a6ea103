//! Session resume and ICE restart: what a phone moving between Wi-Fi and cellular needs.
//! A participant that joined with `resumable` outlives its WebSocket for
//! `signaling.resume_grace`; `resume` on a new connection takes it over (same participant id,
//! seat and tracks, no leave/join in the room); both peer connections restart ICE in place.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::impair::{Impairment, Relay};
use common::{Client, Received, Server, Signal, make_payload, payload_type, wait_received};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::peer_connection::{PeerConnection, RTCIceCandidateInit, RTCSessionDescription};

use cohost::auth::Role;

/// Messages about `pid` joining or leaving among what `sig` received so far.
fn presence_changes(sig: &mut Signal, pid: &str) -> Vec<Value> {
    let mut out = vec![];
    while let Ok(v) = sig.events.try_recv() {
        let about = v["participant"]["id"] == pid || v["participant_id"] == pid;
        if about && (v["type"] == "participant_joined" || v["type"] == "participant_left") {
            out.push(v);
        }
    }
    out
}

fn ufrag(sdp: &str) -> Option<String> {
    common::sdp_attr(sdp, "ice-ufrag")
}

#[tokio::test]
async fn resumed_participant_keeps_its_id_and_tracks_and_the_room_sees_no_leave() {
    let server = Server::start().await;
    let mut host = Client::join_resumable(&server, "resume", "host", Role::Host).await;
    let old_token = host.join["resume_token"].as_str().unwrap().to_string();
    assert!(
        old_token.starts_with(&format!("{}.", host.pid)),
        "{}",
        host.join
    );
    assert_eq!(host.join["limits"]["resume_grace_ms"], 30_000);
    let mut co = Client::join(&server, "resume", "co", Role::Cohost).await;
    assert!(co.join["resume_token"].is_null(), "only when asked for");
    host.publish(None).await.unwrap();
    let tag = host.publication.as_ref().unwrap().tag_audio;
    co.wait_packets(tag, 25).await;

    // The phone's TCP connection dies (no close frame): the server keeps the participant.
    host.sig.vanish();
    server
        .wait_metrics("a detached participant", |m| {
            m.get("cohost_resume_detached_total").copied() == Some(1.0)
        })
        .await;
    // Its media keeps flowing meanwhile (the peer connections are independent).
    let (now, _, _) = co.wait_packets(tag, 0).await;
    co.wait_packets(tag, now + 25).await;
    co.sig
        .request(json!({"type": "chat", "text": "while you were away"}))
        .await;

    let r = host.resume(&server).await;
    assert_eq!(r["type"], "response", "{r}");
    let res = &r["result"];
    assert_eq!(res["resumed"], true);
    assert_eq!(
        res["participant"]["id"],
        host.pid.as_str(),
        "same participant"
    );
    assert_eq!(res["participant"]["tracks"].as_array().unwrap().len(), 2);
    let new_token = res["resume_token"].as_str().unwrap();
    assert_ne!(new_token, old_token, "a token works once");
    assert!(
        res["history"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["text"] == "while you were away"),
        "the messages missed are in the history: {res}"
    );
    // Working as before: a request, media.
    let r = host
        .sig
        .request(json!({"type": "chat", "text": "back"}))
        .await;
    assert_eq!(r["type"], "response", "{r}");
    let (now, _, _) = co.wait_packets(tag, 0).await;
    co.wait_packets(tag, now + 25).await;
    co.sig
        .wait_for("the host's chat", |v| {
            v["type"] == "message" && v["message"]["text"] == "back"
        })
        .await;
    assert!(
        presence_changes(&mut co.sig, &host.pid).is_empty(),
        "the room saw no leave and no join"
    );
    assert_eq!(server.metric("cohost_resumes_total").await, 1.0);

    // The old token is spent: refused, and the connection stays open for a join.
    let mut other = Signal::connect(&server.ws_url()).await;
    let r = other
        .request(json!({"type": "resume", "token": old_token}))
        .await;
    assert_eq!(r["error"]["code"], "resume_failed", "{r}");
    let r = other
        .request(json!({"type": "resume", "token": "PA_nothing.00"}))
        .await;
    assert_eq!(r["error"]["code"], "resume_failed", "{r}");
    let token = server.token("resume", "viewer", Role::Audience);
    let r = other.request(json!({"type": "join", "token": token})).await;
    assert_eq!(r["type"], "response", "{r}");
    let _ = other.events.try_recv();
}

#[tokio::test]
async fn participant_not_resumed_within_the_grace_leaves_as_disconnected() {
    let server = Server::start_with(&[("COHOST_SIGNALING__RESUME_GRACE", "2s")]).await;
    let mut co = Client::join_resumable(&server, "grace", "co", Role::Cohost).await;
    let mut host = Client::join(&server, "grace", "host", Role::Host).await;
    let token = co.join["resume_token"].as_str().unwrap().to_string();
    let gone = Instant::now();
    co.sig.vanish();
    let left = host
        .sig
        .wait_for("the co-host's leave", |v| {
            v["type"] == "participant_left" && v["participant_id"] == co.pid.as_str()
        })
        .await;
    let after = gone.elapsed();
    assert_eq!(left["reason"], "disconnected", "{left}");
    assert!(
        after >= Duration::from_millis(1500),
        "kept for the grace period, left after {after:?}"
    );
    let sig = Signal::connect(&server.ws_url()).await;
    let r = sig.request(json!({"type": "resume", "token": token})).await;
    assert_eq!(r["error"]["code"], "resume_failed", "{r}");
}

#[tokio::test]
async fn resume_while_the_old_connection_is_open_closes_it_with_4012() {
    let server = Server::start().await;
    let mut host = Client::join(&server, "takeover", "host", Role::Host).await;
    let phone = Client::join_resumable(&server, "takeover", "phone", Role::Cohost).await;
    host.sig
        .wait_for("the phone joins", |v| v["type"] == "participant_joined")
        .await;
    // The phone's new network connects before the server noticed the old one is gone.
    let sig = Signal::connect(&server.ws_url()).await;
    let r = sig
        .request(json!({"type": "resume", "token": phone.join["resume_token"]}))
        .await;
    assert_eq!(r["type"], "response", "{r}");
    assert_eq!(r["result"]["participant"]["id"], phone.pid.as_str());
    let (code, _) = phone.sig.wait_closed().await;
    assert_eq!(code, 4012);
    // The new connection works; nobody saw the phone leave.
    let r = sig.request(json!({"type": "like"})).await;
    assert_eq!(r["type"], "response", "{r}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(presence_changes(&mut host.sig, &phone.pid).is_empty());
}

#[tokio::test]
async fn a_close_frame_or_leave_ends_a_resumable_participant_at_once() {
    let server = Server::start().await;
    let mut host = Client::join(&server, "bye", "host", Role::Host).await;
    let a = Client::join_resumable(&server, "bye", "a", Role::Cohost).await;
    let b = Client::join_resumable(&server, "bye", "b", Role::Audience).await;
    let t = Instant::now();
    a.sig.request(json!({"type": "leave"})).await;
    host.sig
        .wait_for("a leaves", |v| {
            v["type"] == "participant_left" && v["participant_id"] == a.pid.as_str()
        })
        .await;
    // A close frame: the client means to go.
    b.sig.sender().send(Message::Close(None)).unwrap();
    let left = host
        .sig
        .wait_for("b leaves", |v| {
            v["type"] == "participant_left" && v["participant_id"] == b.pid.as_str()
        })
        .await;
    assert_eq!(left["reason"], "left");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[tokio::test]
async fn subscriber_restart_ice_gets_new_credentials_and_media_keeps_flowing() {
    let server = Server::start().await;
    let mut host = Client::join(&server, "subice", "host", Role::Host).await;
    let co = Client::join(&server, "subice", "co", Role::Cohost).await;
    host.publish(None).await.unwrap();
    let tag = host.publication.as_ref().unwrap().tag_video;
    let (before, _, _) = co.wait_packets(tag, 30).await;
    let old = co.subscriber.remote_description().await.unwrap().sdp;
    let answered = co.offers_answered.load(Ordering::SeqCst);
    let r = co.sig.request(json!({"type": "restart_ice"})).await;
    assert_eq!(r["type"], "response", "{r}");
    common::wait_until("the restart offer answered", common::T, async || {
        co.offers_answered.load(Ordering::SeqCst) > answered
    })
    .await;
    let new = co.subscriber.remote_description().await.unwrap().sdp;
    assert!(
        ufrag(&new).is_some() && ufrag(&new) != ufrag(&old),
        "the server's ICE credentials change"
    );
    co.wait_packets(tag, before + 60).await;
    // A member without a subscriber connection has nothing to restart.
    let aud = Client::join(&server, "subice", "aud", Role::Audience).await;
    let r = aud.sig.request(json!({"type": "restart_ice"})).await;
    assert_eq!(r["error"]["code"], "bad_request", "{r}");
}

/// A phone: a publisher and a subscriber connection whose every packet goes through a relay
/// per server address (tests/common/impair.rs), so that the test can move the phone to another
/// address, as a network change does.
struct Phone {
    sig: Signal,
    join: Value,
    publisher: Arc<dyn PeerConnection>,
    subscriber: Arc<dyn PeerConnection>,
    received: Arc<Mutex<HashMap<String, Received>>>,
    relays: Arc<tokio::sync::Mutex<HashMap<SocketAddr, Relay>>>,
    stop: Arc<AtomicBool>,
    tag: u32,
    pending_pub: Arc<Mutex<Vec<RTCIceCandidateInit>>>,
}

impl Drop for Phone {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The relay standing for `server` (started on first use).
async fn relay_for(
    relays: &tokio::sync::Mutex<HashMap<SocketAddr, Relay>>,
    server: SocketAddr,
) -> SocketAddr {
    let mut r = relays.lock().await;
    if let Some(relay) = r.get(&server) {
        return relay.addr;
    }
    let relay = Relay::start(server, Impairment::clean(), Impairment::clean(), 7).await;
    let addr = relay.addr;
    r.insert(server, relay);
    addr
}

/// A candidate line's UDP address, if it is one on loopback.
fn udp_addr(cand: &str) -> Option<SocketAddr> {
    let f: Vec<&str> = cand.trim().split(' ').collect();
    (f.len() > 7 && f[2].eq_ignore_ascii_case("udp") && f[4] == "127.0.0.1")
        .then(|| format!("{}:{}", f[4], f[5]).parse().ok())?
}

/// `cand` pointing at the relay instead of the server; `None` for candidates the phone
/// must not use (TCP: they would bypass the relay).
async fn through_relay(
    relays: &tokio::sync::Mutex<HashMap<SocketAddr, Relay>>,
    cand: &str,
) -> Option<String> {
    let body = cand.strip_prefix("candidate:").unwrap_or(cand);
    let server = udp_addr(body)?;
    let relay = relay_for(relays, server).await;
    let mut f: Vec<String> = body.split(' ').map(String::from).collect();
    f[4] = relay.ip().to_string();
    f[5] = relay.port().to_string();
    Some(format!("candidate:{}", f.join(" ")))
}

/// An SDP with its server candidates through the relays and the phone's own removed (the
/// server learns the phone's address only from what comes through a relay).
async fn sdp_through_relay(
    relays: &tokio::sync::Mutex<HashMap<SocketAddr, Relay>>,
    sdp: &str,
) -> String {
    let mut out = String::new();
    for line in sdp.split_inclusive('\n') {
        if let Some(c) = line.trim_end().strip_prefix("a=")
            && c.starts_with("candidate:")
        {
            if let Some(c) = through_relay(relays, c).await {
                out.push_str(&format!("a={c}\r\n"));
            }
            continue;
        }
        out.push_str(line);
    }
    out
}

fn without_candidates(sdp: &str) -> String {
    sdp.split_inclusive('\n')
        .filter(|l| !l.starts_with("a=candidate:") && !l.starts_with("a=end-of-candidates"))
        .collect()
}

impl Phone {
    async fn join(server: &Server, room: &str, identity: &str, role: Role) -> Phone {
        let (auto_tx, mut auto_rx) = mpsc::unbounded_channel::<Value>();
        let sig = Signal::connect_with(&server.ws_url(), Some(auto_tx)).await;
        let received: Arc<Mutex<HashMap<String, Received>>> = Default::default();
        // Its own candidates go nowhere: only the relays' addresses reach the server.
        let (nowhere, _) = mpsc::unbounded_channel();
        let subscriber = common::build_pc(
            "subscriber",
            nowhere,
            received.clone(),
            Arc::new(AtomicBool::new(false)),
            None,
        )
        .await;
        let (a_ssrc, v_ssrc) = (0x0a0a_0002u32, 0x0b0b_0002u32);
        let (publisher, audio, video, offer) = common::whip_publisher(a_ssrc, v_ssrc).await;
        let relays: Arc<tokio::sync::Mutex<HashMap<SocketAddr, Relay>>> = Default::default();
        let pending_pub: Arc<Mutex<Vec<RTCIceCandidateInit>>> = Default::default();
        // Offers and candidates from the server, through the relays.
        {
            let (sub, publ, relays, ws) = (
                subscriber.clone(),
                publisher.clone(),
                relays.clone(),
                sig.sender(),
            );
            let pending = pending_pub.clone();
            tokio::spawn(async move {
                while let Some(v) = auto_rx.recv().await {
                    match v["type"].as_str() {
                        Some("offer") => {
                            let sdp = sdp_through_relay(&relays, v["sdp"].as_str().unwrap()).await;
                            sub.set_remote_description(RTCSessionDescription::offer(sdp).unwrap())
                                .await
                                .unwrap();
                            let answer = sub.create_answer(None).await.unwrap();
                            let sdp = without_candidates(&answer.sdp);
                            sub.set_local_description(answer).await.unwrap();
                            let msg = json!({"type": "answer", "offer_id": v["offer_id"], "sdp": sdp, "id": "phone-answer"});
                            let _ = ws.send(Message::Text(msg.to_string().into()));
                        }
                        Some("candidate") => {
                            let c = &v["candidate"];
                            let Some(cand) =
                                through_relay(&relays, c["candidate"].as_str().unwrap_or("")).await
                            else {
                                continue;
                            };
                            let init = common::candidate_init(c, cand);
                            if v["target"] == "subscriber" {
                                let _ = sub.add_ice_candidate(init).await;
                            } else if publ.remote_description().await.is_some() {
                                let _ = publ.add_ice_candidate(init).await;
                            } else {
                                pending.lock().unwrap().push(init);
                            }
                        }
                        _ => {}
                    }
                }
            });
        }
        let token = server.token(room, identity, role);
        let r = sig
            .request(json!({"type": "join", "token": token, "resumable": true}))
            .await;
        assert_eq!(r["type"], "response", "{r}");
        let join = r["result"].clone();
        let r = sig
            .request(json!({"type": "publish", "sdp": without_candidates(&offer)}))
            .await;
        assert_eq!(r["type"], "response", "{r}");
        let answer_sdp = r["result"]["sdp"].as_str().unwrap().to_string();
        let (apt, vpt) = (
            payload_type(&answer_sdp, "opus"),
            payload_type(&answer_sdp, "H264"),
        );
        let answer = sdp_through_relay(&relays, &answer_sdp).await;
        publisher
            .set_remote_description(RTCSessionDescription::answer(answer).unwrap())
            .await
            .unwrap();
        let pending: Vec<_> = std::mem::take(&mut *pending_pub.lock().unwrap());
        for c in pending {
            let _ = publisher.add_ice_candidate(c).await;
        }
        // Audio with tagged payloads, 50 packets a second.
        let tag = rand::random::<u32>();
        let stop = Arc::new(AtomicBool::new(false));
        {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(20));
                let mut n = 0u32;
                while !stop.load(Ordering::SeqCst) {
                    tick.tick().await;
                    n += 1;
                    let mut p = rtc::rtp::Packet::default();
                    p.header.version = 2;
                    p.header.ssrc = a_ssrc;
                    p.header.payload_type = apt;
                    p.header.sequence_number = n as u16;
                    p.header.timestamp = n * 960;
                    p.payload = make_payload(tag, n, 80);
                    let _ = audio.write_rtp(p).await;
                    // A video packet every other tick, so the phone has a video track too.
                    if n.is_multiple_of(2) {
                        let mut v = rtc::rtp::Packet::default();
                        v.header.version = 2;
                        v.header.ssrc = v_ssrc;
                        v.header.payload_type = vpt;
                        v.header.sequence_number = (n / 2) as u16;
                        v.header.timestamp = n * 1800;
                        v.header.marker = true;
                        v.payload = make_payload(tag ^ 1, n, 400);
                        let _ = video.write_rtp(v).await;
                    }
                }
            });
        }
        Phone {
            sig,
            join,
            publisher,
            subscriber,
            received,
            relays,
            stop,
            tag,
            pending_pub,
        }
    }

    /// The network changes: every relay now reaches the server from 127.0.0.2 (new address,
    /// new ports), and the WebSocket dies without a close frame.
    async fn move_network(&mut self) {
        for r in self.relays.lock().await.values() {
            r.moved.store(true, Ordering::SeqCst);
        }
        self.sig.vanish();
    }

    /// What a mobile client does on the new network: resume on a new WebSocket, restart ICE
    /// on the publisher connection (a new `publish` with an ICE-restart offer) and ask for a
    /// restart of the subscriber connection.
    async fn recover(&mut self, server: &Server, resume_token: &str) -> Value {
        self.sig.reconnect(&server.ws_url()).await;
        let r = self
            .sig
            .request(json!({"type": "resume", "token": resume_token}))
            .await;
        assert_eq!(r["type"], "response", "{r}");
        let offer = self
            .publisher
            .create_offer(Some(rtc::peer_connection::configuration::RTCOfferOptions {
                ice_restart: true,
            }))
            .await
            .unwrap();
        let sdp = without_candidates(&offer.sdp);
        self.publisher.set_local_description(offer).await.unwrap();
        let p = self
            .sig
            .request(json!({"type": "publish", "sdp": sdp}))
            .await;
        assert_eq!(p["type"], "response", "{p}");
        let answer = sdp_through_relay(&self.relays, p["result"]["sdp"].as_str().unwrap()).await;
        self.publisher
            .set_remote_description(RTCSessionDescription::answer(answer).unwrap())
            .await
            .unwrap();
        let pending: Vec<_> = std::mem::take(&mut *self.pending_pub.lock().unwrap());
        for c in pending {
            let _ = self.publisher.add_ice_candidate(c).await;
        }
        let s = self.sig.request(json!({"type": "restart_ice"})).await;
        assert_eq!(s["type"], "response", "{s}");
        r
    }
}

#[tokio::test]
async fn phone_moving_to_a_new_address_resumes_and_keeps_its_place() {
    let server = Server::start().await;
    let admin = server.token("*", "ops", Role::Admin);
    let mut host = Client::join(&server, "move", "host", Role::Host).await;
    host.publish(None).await.unwrap();
    let host_tag = host.publication.as_ref().unwrap().tag_audio;
    let mut phone = Phone::join(&server, "move", "phone", Role::Cohost).await;
    let pid = phone.join["participant"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let token = phone.join["resume_token"].as_str().unwrap().to_string();
    // Both directions work through the relays: the host hears the phone, the phone the host.
    let (heard, _, _) = host.wait_packets(phone.tag, 25).await;
    let (got, _, _) = wait_received(&phone.received, host_tag, 25).await;
    // The room's bridge shows the phone.
    let r = host.sig.request(json!({"type": "start_bridge"})).await;
    assert_eq!(r["type"], "response", "{r}");
    let shows_phone = |v: &Value| {
        v["stats"]["video_inputs"]
            .as_array()
            .is_some_and(|a| a.iter().any(|i| i["participant_id"] == pid.as_str()))
    };
    common::wait_bridge(
        &server,
        &admin,
        "move",
        15,
        "the phone in the bridge",
        shows_phone,
    )
    .await;

    // (The phone's join, seen before the move.)
    let _ = presence_changes(&mut host.sig, &pid);
    let sub_ufrag = ufrag(&phone.subscriber.remote_description().await.unwrap().sdp);
    phone.move_network().await;
    let r = phone.recover(&server, &token).await;
    assert_eq!(r["result"]["participant"]["id"], pid.as_str());

    // Media flows again both ways, from and to the new address.
    host.wait_packets(phone.tag, heard + 50).await;
    wait_received(&phone.received, host_tag, got + 50).await;
    // Nobody saw the phone leave; the bridge kept it all along.
    assert!(
        presence_changes(&mut host.sig, &pid).is_empty(),
        "no leave/join for the phone"
    );
    let (_, body) = server.get("/v1/rooms/move/bridge", Some(&admin)).await;
    let v: Value = serde_json::from_str(body.trim()).unwrap();
    assert!(shows_phone(&v), "{v}");
    let (status, body) = server.get("/v1/rooms/move", Some(&admin)).await;
    assert_eq!(status, 200);
    assert!(body.contains(&pid), "{body}");
    // The subscriber connection was restarted (new server credentials).
    common::wait_until(
        "the subscriber restart offer applied",
        common::T,
        async || ufrag(&phone.subscriber.remote_description().await.unwrap().sdp) != sub_ufrag,
    )
    .await;
    let (now, _, _) = wait_received(&phone.received, host_tag, 0).await;
    wait_received(&phone.received, host_tag, now + 50).await;
}
