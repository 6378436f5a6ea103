//! WHIP ingest and WHEP playback end to end: the real server binary, aiortc (an independent
//! WebRTC stack, H.264 via libx264 + Opus) publishing over WHIP, WebSocket participants of the
//! room receiving it, the bridge mixing it (HTTP-FLV decoded by ffmpeg), and WHEP viewers built
//! on the `webrtc` crate decoding what they receive (OpenH264, libopus).

mod common;

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cohost::auth::Role;
use cohost::bridge::audio_in::AudioInput;
use cohost::bridge::compose::Yuv;
use cohost::bridge::video_in::VideoInput;
use cohost::media::goertzel::{left_channel, tone_power};
use common::{
    Client, Resp, Server, T, ffmpeg_capture, http, is_colour, payload_type, pixel, post_sdp,
    sdp_attr, wait_frames,
};
use rtc::peer_connection::configuration::RTCOfferOptions;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceGatheringState, RTCSessionDescription, SettingEngineBuilder,
};

/// Power of `freq` in mono 48 kHz audio: the median over 100 ms windows, so that a gap or a
/// concealed packet (a phase jump) in a loaded test run does not hide a tone that is there.
/// About 0.5 for a clean tone, near 0 when it is absent.
fn tone(samples: &[f32], freq: f32) -> f32 {
    let mut p: Vec<f32> = samples
        .chunks_exact(4800)
        .map(|w| tone_power(w, 48000.0, freq))
        .collect();
    if p.is_empty() {
        return 0.0;
    }
    p.sort_by(f32::total_cmp);
    p[p.len() / 2]
}

// ---- HTTP ----

async fn delete(server: &Server, location: &str, token: &str) -> Resp {
    let auth = format!("Bearer {token}");
    http(server, "DELETE", location, &[("Authorization", &auth)], b"").await
}

// ---- aiortc over WHIP ----

/// The aiortc publisher (tests/whip/whip_publish.py), killed by PID when dropped.
struct Aiortc {
    child: tokio::process::Child,
    lines: mpsc::UnboundedReceiver<Value>,
}

impl Aiortc {
    async fn publish(server: &Server, room: &str, token: &str, rgb: (u8, u8, u8)) -> Aiortc {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/whip");
        let python = dir.join(".venv/bin/python");
        assert!(
            python.exists(),
            "{} missing: run .ci/setup (installs aiortc into tests/whip/.venv)",
            python.display()
        );
        let mut child = tokio::process::Command::new(python)
            .arg(dir.join("whip_publish.py"))
            .args(["--url", &format!("http://{}/whip/{room}", server.addr)])
            .args(["--token", token])
            .args(["--rgb", &format!("{},{},{}", rgb.0, rgb.1, rgb.2)])
            .args(["--tone", "440"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start aiortc publisher");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<Value>(&l) {
                    let _ = tx.send(v);
                }
            }
        });
        Aiortc { child, lines: rx }
    }

    async fn wait_event(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let r = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(v) = self.lines.recv().await {
                if pred(&v) {
                    return Some(v);
                }
                if v["event"] == "error" {
                    panic!("aiortc publisher failed: {v}");
                }
            }
            None
        })
        .await;
        match r {
            Ok(Some(v)) => v,
            Ok(None) => panic!("aiortc publisher exited waiting for {what}"),
            Err(_) => panic!("timed out waiting for aiortc {what}"),
        }
    }
}

impl Drop for Aiortc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Wait until `client` has received `n` packets of each kind from participant `pid`.
async fn wait_media_from(client: &Client, pid: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got: Vec<(String, u64)> = {
            let r = client.received.lock().unwrap();
            r.values()
                .filter(|e| e.stream_id == pid)
                .map(|e| (e.kind.clone(), e.packets))
                .collect()
        };
        let of = |k: &str| {
            got.iter()
                .filter(|(kind, _)| kind == k)
                .map(|(_, p)| *p)
                .sum::<u64>()
        };
        if of("video") >= n && of("audio") >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "media from {pid} not received: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiortc_whip_publisher_is_a_room_participant_and_in_the_bridge_output() {
    let server = Server::start().await;
    let mut watcher = Client::watch(&server, "wr", "watcher").await;
    let token = server.token("wr", "obs", Role::Host);
    let mut pubr = Aiortc::publish(&server, "wr", &token, (30, 30, 220)).await;
    let created = pubr.wait_event("201", |v| v["event"] == "created").await;
    assert_eq!(created["status"], 201);
    assert_eq!(created["content_type"], "application/sdp");
    let location = created["location"].as_str().unwrap().to_string();
    assert!(location.starts_with("/whip/wr/"), "{location}");
    assert!(created["etag"].as_str().is_some_and(|e| e.starts_with('"')));
    // The room sees a participant with the token's identity and role join ...
    let joined = watcher
        .sig
        .wait_for("participant_joined", |v| {
            v["type"] == "participant_joined" && v["participant"]["identity"] == "obs"
        })
        .await;
    assert_eq!(joined["participant"]["role"], "host");
    let pid = joined["participant"]["id"].as_str().unwrap().to_string();
    pubr.wait_event("connected", |v| v["state"] == "connected")
        .await;
    // ... publish H.264 and Opus, and a WebRTC subscriber receives both.
    let mut kinds = std::collections::HashSet::new();
    while kinds.len() < 2 {
        let t = watcher
            .sig
            .wait_for("track_published", |v| {
                v["type"] == "track_published" && v["track"]["participant_id"] == pid.as_str()
            })
            .await;
        kinds.insert(t["track"]["kind"].as_str().unwrap_or_default().to_string());
    }
    assert!(
        kinds.contains("video") && kinds.contains("audio"),
        "{kinds:?}"
    );
    wait_media_from(&watcher, &pid, 30).await;
    let (_, room) = server
        .get(
            "/v1/rooms/wr",
            Some(&server.auth.mint("*", "ops", Role::Admin, None).unwrap()),
        )
        .await;
    let room: Value = serde_json::from_str(room.trim()).unwrap();
    let codecs: Vec<&str> = room["tracks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["codec"].as_str())
        .collect();
    assert!(
        codecs.iter().any(|c| c.eq_ignore_ascii_case("video/H264"))
            && codecs.iter().any(|c| c.eq_ignore_ascii_case("audio/opus")),
        "{codecs:?}"
    );
    // The bridge mixes it like any other input: its colour and its tone in the FLV output.
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (s, body) = server
        .send_json("POST", "/v1/rooms/wr/bridge", &admin, &json!({}))
        .await;
    assert_eq!(s, 201, "{body}");
    wait_frames(&server, &admin, "wr", 45).await;
    let dir = std::env::temp_dir().join(format!("cohost-whip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (video, audio) = ffmpeg_capture(&format!("http://{}/live/wr.flv", server.addr), &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    let n = 320 * 180 * 3;
    assert!(video.len() >= n * 10, "decoded {} bytes", video.len());
    let last = &video[video.len() - n..];
    let p = pixel(last, 160, 90);
    assert!(
        is_colour(p, (30, 30, 220)),
        "WHIP publisher's blue fills the solo frame: {p:?}"
    );
    let mid = &audio[audio.len() / 4..];
    let (p440, p1000) = (tone(mid, 440.0), tone(mid, 1000.0));
    let windows: Vec<(f32, f32)> = mid
        .chunks_exact(4800)
        .map(|w| {
            let rms = (w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32).sqrt();
            (rms, tone_power(w, 48000.0, 440.0))
        })
        .collect();
    assert!(
        p440 > 0.1 && p440 > 10.0 * p1000,
        "its 440 Hz tone: {p440} (1 kHz: {p1000}); per 100 ms (rms, 440 Hz): {windows:?}"
    );
    drop(pubr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whip_delete_ends_the_session_and_the_room_sees_the_participant_leave() {
    let server = Server::start().await;
    let mut watcher = Client::watch(&server, "wd", "watcher").await;
    let token = server.token("wd", "encoder", Role::Cohost);
    let mut pubr = Aiortc::publish(&server, "wd", &token, (200, 200, 40)).await;
    let created = pubr.wait_event("201", |v| v["event"] == "created").await;
    let location = created["location"].as_str().unwrap().to_string();
    let joined = watcher
        .sig
        .wait_for("participant_joined", |v| {
            v["type"] == "participant_joined" && v["participant"]["identity"] == "encoder"
        })
        .await;
    let pid = joined["participant"]["id"].as_str().unwrap().to_string();
    wait_media_from(&watcher, &pid, 10).await;
    // DELETE needs a token of the room, of the session's identity (or the host's).
    let r = delete(&server, &location, "garbage").await;
    assert_eq!(r.status, 401, "{}", r.body);
    let other = server.token("wd", "watcher", Role::Audience);
    let r = delete(&server, &location, &other).await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = delete(
        &server,
        &location,
        &server.token("elsewhere", "encoder", Role::Cohost),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = delete(&server, &location, &token).await;
    assert_eq!(r.status, 200, "{}", r.body);
    for _ in 0..2 {
        watcher
            .sig
            .wait_for("track_unpublished", |v| {
                v["type"] == "track_unpublished" && v["participant_id"] == pid.as_str()
            })
            .await;
    }
    let left = watcher
        .sig
        .wait_for("participant_left", |v| {
            v["type"] == "participant_left" && v["participant_id"] == pid.as_str()
        })
        .await;
    assert_eq!(left["identity"], "encoder");
    assert_eq!(left["reason"], "left");
    // The resource is gone.
    let r = delete(&server, &location, &token).await;
    assert_eq!(r.status, 404, "{}", r.body);
    // The room goes on: the watcher is still in it, alone.
    let (_, room) = server
        .get(
            "/v1/rooms/wd",
            Some(&server.auth.mint("*", "ops", Role::Admin, None).unwrap()),
        )
        .await;
    let room: Value = serde_json::from_str(room.trim()).unwrap();
    assert_eq!(room["participants"].as_array().unwrap().len(), 1, "{room}");
}

// ---- WHEP viewers (webrtc crate) ----

struct ViewerHandler {
    tx: mpsc::UnboundedSender<(String, rtc::rtp::Packet)>,
    gathered: Arc<AtomicBool>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for ViewerHandler {
    async fn on_ice_gathering_state_change(&self, s: RTCIceGatheringState) {
        if s == RTCIceGatheringState::Complete {
            self.gathered.store(true, Ordering::SeqCst);
        }
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let kind = format!("{}", track.kind().await).to_lowercase();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            while let Some(ev) = track.poll().await {
                let p = match ev {
                    TrackRemoteEvent::OnRtpPacket(p) => p,
                    TrackRemoteEvent::OnEnded => break,
                    _ => continue,
                };
                if tx.send((kind.clone(), p)).is_err() {
                    break;
                }
            }
        });
    }
}

struct Viewer {
    pc: Arc<dyn PeerConnection>,
    rx: mpsc::UnboundedReceiver<(String, rtc::rtp::Packet)>,
    location: String,
    etag: String,
}

/// A recvonly (audio + video) offer with every candidate gathered.
async fn viewer_offer() -> (
    Arc<dyn PeerConnection>,
    String,
    mpsc::UnboundedReceiver<(String, rtc::rtp::Packet)>,
) {
    let mut me = cohost::peer::media_engine().unwrap();
    let reg = cohost::peer::interceptors(&mut me).unwrap();
    let se = SettingEngineBuilder::new()
        .with_ice_connection_attempts(Some(Duration::from_millis(50)), Some(100))
        .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
        .with_include_loopback_candidate(true)
        .with_prflx_acceptance_min_wait(Some(Duration::ZERO))
        .with_srflx_acceptance_min_wait(Some(Duration::ZERO))
        .build();
    let (tx, rx) = mpsc::unbounded_channel();
    let gathered = Arc::new(AtomicBool::new(false));
    let pc: Arc<dyn PeerConnection> = Arc::new(
        PeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_media_engine(me)
            .with_setting_engine(se)
            .with_interceptor_registry(reg)
            .with_handler(Arc::new(ViewerHandler {
                tx,
                gathered: gathered.clone(),
            }) as Arc<dyn PeerConnectionEventHandler>)
            .with_udp_addrs(vec!["127.0.0.1:0".to_string()])
            .build()
            .await
            .unwrap(),
    );
    common::add_recvonly_audio_video(&pc).await;
    let offer = pc.create_offer(None).await.unwrap();
    pc.set_local_description(offer).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gathered.load(Ordering::SeqCst) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sdp = pc.local_description().await.unwrap().sdp;
    (pc, sdp, rx)
}

async fn whep(server: &Server, path: &str, token: &str) -> Result<Viewer, Resp> {
    let (pc, sdp, rx) = viewer_offer().await;
    let r = post_sdp(server, path, Some(token), &sdp).await;
    if r.status != 201 {
        return Err(r);
    }
    assert_eq!(r.header("content-type"), Some("application/sdp"));
    let location = r.header("location").unwrap().to_string();
    let etag = r.header("etag").unwrap().to_string();
    pc.set_remote_description(RTCSessionDescription::answer(r.body.clone()).unwrap())
        .await
        .unwrap();
    Ok(Viewer {
        pc,
        rx,
        location,
        etag,
    })
}

/// Decode what the viewer receives until it has shown a picture whose centre is `rgb` and
/// `secs_audio` seconds of audio; returns the audio (interleaved stereo).
async fn decode_until(v: &mut Viewer, rgb: (u8, u8, u8), audio_secs: f32) -> Vec<i16> {
    decode_with(v, &mut VideoInput::new().unwrap(), rgb, audio_secs).await
}

/// [`decode_until`] with the caller's decoder (to follow one stream across calls).
async fn decode_with(
    v: &mut Viewer,
    video: &mut VideoInput,
    rgb: (u8, u8, u8),
    audio_secs: f32,
) -> Vec<i16> {
    let want = Yuv::from_rgb(rgb.0, rgb.1, rgb.2);
    let mut audio_in = AudioInput::new().unwrap();
    let mut pcm = vec![];
    let mut seen: Option<(u8, u8, u8)> = None;
    let mut matched = false;
    let begun = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !(matched && pcm.len() as f32 >= audio_secs * 96_000.0) {
        let Ok(Some((kind, p))) = tokio::time::timeout_at(deadline, v.rx.recv()).await else {
            panic!(
                "WHEP media: picture {seen:?} (want {want:?}), {} audio samples",
                pcm.len()
            );
        };
        if kind == "video" {
            let r = video.push(
                p.header.sequence_number,
                p.header.timestamp,
                p.header.marker,
                &p.payload,
                Instant::now(),
            );
            if r.new_picture
                && let Some(pic) = video.latest()
            {
                let (w, h) = (pic.width as usize, pic.height as usize);
                let (y, u, vv) = (
                    pic.y[(h / 2) * w + w / 2],
                    pic.u[(h / 4) * (w / 2) + w / 4],
                    pic.v[(h / 4) * (w / 2) + w / 4],
                );
                seen = Some((y, u, vv));
                let close = |a: u8, b: u8| a.abs_diff(b) < 25;
                if !matched && close(y, want.0) && close(u, want.1) && close(vv, want.2) {
                    matched = true;
                    eprintln!(
                        "WHEP: first {rgb:?} picture decoded {:?} after the answer",
                        begun.elapsed()
                    );
                }
            }
        } else {
            let (_, samples) =
                audio_in.push(p.header.sequence_number, p.header.timestamp, &p.payload);
            pcm.extend(samples);
        }
    }
    pcm
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whep_viewer_receives_and_decodes_the_mixed_bridge_output() {
    let server = Server::start().await;
    let mut host = Client::join(&server, "wm", "host", Role::Host).await;
    host.publish_real((220, 30, 30), 440.0).await.unwrap();
    let viewer_token = server.token("wm", "fan", Role::Audience);
    // Before the bridge runs there is no mixed output to watch.
    let r = whep(&server, "/whep/wm", &viewer_token)
        .await
        .err()
        .unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(r.body.contains("no bridge"), "{}", r.body);
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (s, body) = server
        .send_json("POST", "/v1/rooms/wm/bridge", &admin, &json!({}))
        .await;
    assert_eq!(s, 201, "{body}");
    wait_frames(&server, &admin, "wm", 30).await;
    let started = Instant::now();
    let mut v = whep(&server, "/whep/wm", &viewer_token)
        .await
        .map_err(|r| format!("{} {}", r.status, r.body))
        .unwrap();
    assert!(v.location.starts_with("/whep/wm/"), "{}", v.location);
    // The host's red (the host alone: its own pictures passed through), packetized, decoded
    // here.
    let mut video = VideoInput::new().unwrap();
    let pcm = decode_with(&mut v, &mut video, (220, 30, 30), 1.0).await;
    let first_picture = started.elapsed();
    let left = left_channel(&pcm[pcm.len() / 2..]);
    let (p440, p1000) = (tone(&left, 440.0), tone(&left, 1000.0));
    assert!(
        p440 > 0.1 && p440 > 10.0 * p1000,
        "the host's 440 Hz in the mixed Opus: {p440} (1 kHz {p1000})"
    );
    eprintln!("WHEP mixed output: matching picture + 1 s of audio {first_picture:?} after POST");
    // A co-host joins: the output switches from the host's own pictures to the bridge's mix
    // (another encoder, its own parameter sets), and the same decoder goes on without an error.
    let mut guest = Client::join(&server, "wm", "guest", Role::Cohost).await;
    guest.publish_real((30, 30, 220), 660.0).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, body) = server.get("/v1/rooms/wm/bridge", Some(&admin)).await;
        let b: Value = serde_json::from_str(body.trim()).unwrap_or(json!({}));
        if b["stats"]["path"] == "mixing" {
            break;
        }
        assert!(Instant::now() < deadline, "no switch to mixing: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = video.stats().frames_decoded;
    decode_with(&mut v, &mut video, (220, 30, 30), 2.0).await;
    let s = video.stats();
    assert_eq!(s.decode_errors, 0, "{s:?}");
    assert!(s.frames_decoded > before + 30, "{before} -> {s:?}");
    drop(guest);
    // Stopping the bridge ends the viewer's session: its resource goes away with it.
    let (s, _) = server
        .send_json("DELETE", "/v1/rooms/wm/bridge", &admin, &json!({}))
        .await;
    assert_eq!(s, 204);
    let auth = format!("Bearer {viewer_token}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // An empty trickle fragment: 204 while the session lives, 404 once it is gone.
        let r = http(
            &server,
            "PATCH",
            &v.location,
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/trickle-ice-sdpfrag"),
            ],
            b"a=end-of-candidates\r\n",
        )
        .await;
        if r.status == 404 {
            break;
        }
        assert_eq!(r.status, 204, "{}", r.body);
        assert!(
            Instant::now() < deadline,
            "WHEP session outlived the bridge"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = v.pc.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whep_viewer_of_one_participant_gets_that_participants_media() {
    let server = Server::start().await;
    let mut host = Client::join(&server, "wp", "host", Role::Host).await;
    let mut guest = Client::join(&server, "wp", "guest", Role::Cohost).await;
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let wait_tracks = |n: usize| {
        let (server, admin) = (&server, admin.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let (_, body) = server.get("/v1/rooms/wp", Some(&admin)).await;
                let v: Value = serde_json::from_str(body.trim()).unwrap_or(json!({}));
                if v["tracks"].as_array().map_or(0, |t| t.len()) >= n {
                    return;
                }
                assert!(Instant::now() < deadline, "tracks not published: {body}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    // One after the other: each publisher's negotiation settles before the next one's
    // tracks renegotiate its subscriber connection.
    host.publish_real((220, 30, 30), 440.0).await.unwrap();
    wait_tracks(2).await;
    guest.publish_real((30, 200, 30), 660.0).await.unwrap();
    wait_tracks(4).await;
    let token = server.token("wp", "fan", Role::Audience);
    // By identity: the guest's green and 660 Hz, not the host's.
    let mut v = whep(&server, "/whep/wp/guest", &token)
        .await
        .map_err(|r| format!("{} {}", r.status, r.body))
        .unwrap();
    let pcm = decode_until(&mut v, (30, 200, 30), 1.0).await;
    let left = left_channel(&pcm[pcm.len() / 2..]);
    let (p660, p440) = (tone(&left, 660.0), tone(&left, 440.0));
    assert!(
        p660 > 0.1 && p660 > 10.0 * p440,
        "the guest's voice only: 660 Hz {p660}, 440 Hz {p440}"
    );
    let r = delete(&server, &v.location, &token).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let _ = v.pc.close().await;
    // By participant id too.
    let mut v = whep(&server, &format!("/whep/wp/{}", host.pid), &token)
        .await
        .map_err(|r| format!("{} {}", r.status, r.body))
        .unwrap();
    decode_until(&mut v, (220, 30, 30), 0.2).await;
    let _ = v.pc.close().await;
    // Nobody by that name.
    let r = whep(&server, "/whep/wp/nobody", &token)
        .await
        .err()
        .unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
}

/// A complete sendonly (audio + video) offer from the `webrtc` crate, as a WHIP client makes.
async fn publisher_offer() -> (Arc<dyn PeerConnection>, String) {
    let (pc, _, _, sdp) =
        common::whip_publisher(rand::random::<u32>() | 1, rand::random::<u32>() | 1).await;
    (pc, sdp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whip_trickle_patch_cors_preflight_and_ice_restart_preconditions() {
    let server = Server::start().await;
    // Preflight from a browser page on another origin.
    let r = http(
        &server,
        "OPTIONS",
        "/whip/tr",
        &[
            ("Origin", "https://studio.example"),
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "authorization, content-type",
            ),
        ],
        b"",
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    let methods = r.header("access-control-allow-methods").unwrap();
    for m in ["POST", "PATCH", "DELETE"] {
        assert!(methods.contains(m), "{methods}");
    }
    let allowed = r
        .header("access-control-allow-headers")
        .unwrap()
        .to_lowercase();
    assert!(allowed.contains("authorization") && allowed.contains("content-type"));
    assert_eq!(r.header("accept-post"), Some("application/sdp"));
    let token = server.token("tr", "studio", Role::Host);
    let (_pc, sdp) = publisher_offer().await;
    let asked = Instant::now();
    let r = post_sdp(&server, "/whip/tr", Some(&token), &sdp).await;
    assert_eq!(r.status, 201, "{}", r.body);
    eprintln!(
        "WHIP POST -> 201 with a complete answer: {:?}",
        asked.elapsed()
    );
    // Every response exposes the headers a page needs to read.
    let exposed = r.header("access-control-expose-headers").unwrap();
    for h in ["Location", "ETag", "Link"] {
        assert!(exposed.contains(h), "{exposed}");
    }
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert_eq!(
        r.header("accept-patch"),
        Some("application/trickle-ice-sdpfrag")
    );
    assert!(
        r.body.contains("a=candidate:"),
        "the answer carries the server's candidates (no server trickle): {}",
        r.body
    );
    let location = r.header("location").unwrap().to_string();
    let etag = r.header("etag").unwrap().to_string();
    assert_eq!(server.metric("cohost_whip_sessions").await, 1.0);
    let ufrag = sdp
        .lines()
        .find_map(|l| l.strip_prefix("a=ice-ufrag:"))
        .unwrap()
        .trim()
        .to_string();
    let auth = format!("Bearer {token}");
    let frag = format!(
        "a=ice-ufrag:{ufrag}\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n\
         a=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host\r\na=end-of-candidates\r\n"
    );
    let patch = |if_match: &'static str, ct: &'static str, body: String| {
        let (server, location, auth) = (&server, location.clone(), auth.clone());
        async move {
            http(
                server,
                "PATCH",
                &location,
                &[
                    ("Authorization", &auth),
                    ("Content-Type", ct),
                    ("If-Match", if_match),
                ],
                body.as_bytes(),
            )
            .await
        }
    };
    const FRAG: &str = "application/trickle-ice-sdpfrag";
    // Trickled candidate: 204.
    let r = patch("*", FRAG, frag.clone()).await;
    assert_eq!(r.status, 204, "{}", r.body);
    // With the ETag of this ICE session too.
    let etag: &'static str = Box::leak(etag.into_boxed_str());
    let r = patch(etag, FRAG, frag.clone()).await;
    assert_eq!(r.status, 204, "{}", r.body);
    // Another ICE session's ETag: 412.
    let r = patch("\"not-this-one\"", FRAG, frag.clone()).await;
    assert_eq!(r.status, 412, "{}", r.body);
    // A flood of trickled candidates: the session keeps at most signaling.max_candidates (100).
    let flood: String = (0..150)
        .map(|i| {
            format!(
                "a=candidate:{i} 1 udp 2130706431 127.0.0.1 {} typ host\r\n",
                10000 + i
            )
        })
        .collect();
    let big =
        format!("a=ice-ufrag:{ufrag}\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n{flood}");
    let r = patch("*", FRAG, big).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body.contains("too many trickled candidates"),
        "{}",
        r.body
    );
    // New credentials = ICE restart (RFC 9725 §4.3.2): it must name the ICE session ...
    let restart = frag.replace(&ufrag, "NEWUFRAG");
    let r = http(
        &server,
        "PATCH",
        &location,
        &[("Authorization", &auth), ("Content-Type", FRAG)],
        restart.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 428, "{}", r.body);
    assert!(r.body.contains("If-Match"), "{}", r.body);
    let r = patch("\"not-this-one\"", FRAG, restart.clone()).await;
    assert_eq!(r.status, 412, "{}", r.body);
    // ... and carry the new password too.
    let r = patch("*", FRAG, restart).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("a=ice-pwd"), "{}", r.body);
    // Wrong content type, garbage fragment.
    let r = patch("*", "application/sdp", frag.clone()).await;
    assert_eq!(r.status, 415, "{}", r.body);
    let r = patch("*", FRAG, "this is not sdp".into()).await;
    assert_eq!(r.status, 400, "{}", r.body);
    // Unknown session.
    let r = http(
        &server,
        "PATCH",
        "/whip/tr/0000",
        &[("Authorization", &auth), ("Content-Type", FRAG)],
        frag.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.body);
    let r = delete(&server, &location, &token).await;
    assert_eq!(r.status, 200, "{}", r.body);
    server
        .wait_metrics("no WHIP session left", |m| {
            m.get("cohost_whip_sessions") == Some(&0.0)
                && m.get("cohost_participants") == Some(&0.0)
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whip_and_whep_bad_input_gets_clear_errors_and_the_server_stays_healthy() {
    let server = Server::start().await;
    let _host = Client::join(&server, "bad", "host", Role::Host).await;
    let (_pc, offer) = publisher_offer().await;
    // A co-host token: the room has its host already (a second host would get 409).
    let host = server.token("bad", "studio", Role::Cohost);
    let cases: Vec<(&str, Resp, u16, &str)> = vec![
        (
            "no token",
            post_sdp(&server, "/whip/bad", None, &offer).await,
            401,
            "bearer",
        ),
        (
            "forged token",
            post_sdp(&server, "/whip/bad", Some("abc.def.ghi"), &offer).await,
            401,
            "invalid token",
        ),
        (
            "expired token",
            post_sdp(
                &server,
                "/whip/bad",
                Some(&server.expired_token("bad", "studio")),
                &offer,
            )
            .await,
            401,
            "expired",
        ),
        (
            "token for another room",
            post_sdp(
                &server,
                "/whip/bad",
                Some(&server.token("other", "studio", Role::Host)),
                &offer,
            )
            .await,
            403,
            "another room",
        ),
        (
            "audience may not publish",
            post_sdp(
                &server,
                "/whip/bad",
                Some(&server.token("bad", "fan", Role::Audience)),
                &offer,
            )
            .await,
            403,
            "may not publish",
        ),
        (
            "wrong content type",
            http(
                &server,
                "POST",
                "/whip/bad",
                &[
                    ("Content-Type", "application/json"),
                    ("Authorization", &format!("Bearer {host}")),
                ],
                offer.as_bytes(),
            )
            .await,
            415,
            "application/sdp",
        ),
        (
            "no content type",
            http(
                &server,
                "POST",
                "/whip/bad",
                &[("Authorization", &format!("Bearer {host}"))],
                offer.as_bytes(),
            )
            .await,
            415,
            "application/sdp",
        ),
        (
            "oversized body",
            post_sdp(
                &server,
                "/whip/bad",
                Some(&host),
                // Just past the 64 KiB limit (so the server reads all of it before answering).
                &format!("{offer}{}", "a=x\r\n".repeat(14_000)),
            )
            .await,
            413,
            "larger than",
        ),
        (
            "garbage SDP",
            post_sdp(&server, "/whip/bad", Some(&host), "hello, this is not SDP").await,
            400,
            "malformed SDP",
        ),
        (
            "SDP without media",
            post_sdp(
                &server,
                "/whip/bad",
                Some(&host),
                "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n",
            )
            .await,
            400,
            "no audio or video",
        ),
        (
            "truncated SDP",
            post_sdp(
                &server,
                "/whip/bad",
                Some(&host),
                &offer[..offer.find("m=video").unwrap() + 12],
            )
            .await,
            400,
            "offer not usable",
        ),
        (
            "binary body",
            http(
                &server,
                "POST",
                "/whip/bad",
                &[
                    ("Content-Type", "application/sdp"),
                    ("Authorization", &format!("Bearer {host}")),
                ],
                &[0xff, 0xfe, 0x00, 0x80, 0x81],
            )
            .await,
            400,
            "UTF-8",
        ),
        (
            "unknown WHIP session",
            delete(&server, "/whip/bad/ffffffff", &host).await,
            404,
            "no such session",
        ),
        (
            "WHEP without a bridge",
            post_sdp(&server, "/whep/bad", Some(&host), &offer).await,
            404,
            "no bridge",
        ),
        (
            "WHEP of a participant without tracks",
            post_sdp(&server, "/whep/bad/host", Some(&host), &offer).await,
            409,
            "publishes nothing",
        ),
        (
            "WHEP without a token",
            post_sdp(&server, "/whep/bad/host", None, &offer).await,
            401,
            "bearer",
        ),
        (
            "WHEP token for another room",
            post_sdp(
                &server,
                "/whep/bad/host",
                Some(&server.token("other", "fan", Role::Audience)),
                &offer,
            )
            .await,
            403,
            "another room",
        ),
    ];
    for (what, r, status, text) in &cases {
        assert_eq!(r.status, *status, "{what}: {}", r.body);
        assert!(
            r.body.to_lowercase().contains(&text.to_lowercase()),
            "{what}: {:?} should say {text:?}",
            r.body
        );
        assert!(
            r.header("content-type")
                .is_some_and(|c| c.starts_with("text/plain")),
            "{what}: {:?}",
            r.header("content-type")
        );
        assert_eq!(r.header("access-control-allow-origin"), Some("*"), "{what}");
        if *status == 401 {
            assert_eq!(r.header("www-authenticate"), Some("Bearer"), "{what}");
        }
    }
    // Nobody was left behind in the room by the refused publishers; the server is healthy and
    // a correct WHIP publish still works.
    let (s, body) = server.get("/healthz", None).await;
    assert_eq!(s, 200, "{body}");
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (_, room) = server.get("/v1/rooms/bad", Some(&admin)).await;
    let room: Value = serde_json::from_str(room.trim()).unwrap();
    assert_eq!(room["participants"].as_array().unwrap().len(), 1, "{room}");
    let r = post_sdp(&server, "/whip/bad", Some(&host), &offer).await;
    assert_eq!(r.status, 201, "{}", r.body);
}

// ---- limits: WHEP caps, the publishers' port reserve, reaping sessions without ICE ----

/// A WebSocket host publishing synthetic media into `room`; returns once the room lists its
/// two tracks (so `/whep/{room}/host` has something to watch).
async fn publishing_host(server: &Server, room: &str) -> Client {
    let mut host = Client::join(server, room, "host", Role::Host).await;
    host.publish(None).await.unwrap();
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let deadline = Instant::now() + T;
    loop {
        let (_, body) = server.get(&format!("/v1/rooms/{room}"), Some(&admin)).await;
        let v: Value = serde_json::from_str(body.trim()).unwrap_or(json!({}));
        if v["tracks"].as_array().map_or(0, |t| t.len()) >= 2 {
            return host;
        }
        assert!(Instant::now() < deadline, "tracks not published: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A limit refusal: `status`, a JSON body with `code`, and `Retry-After`.
fn assert_refused(r: &Resp, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"), "{code}");
    assert!(r.header("retry-after").is_some(), "{code}: no Retry-After");
    let v: Value = serde_json::from_str(r.body.trim()).unwrap();
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whep_sessions_are_capped_per_identity() {
    let server = Server::start_with(&[
        ("COHOST_WHIP__WHEP_MAX_PER_IDENTITY", "2"),
        ("COHOST_WHIP__WHEP_MAX_PER_ROOM", "3"),
        ("COHOST_WHIP__WHEP_MAX_SESSIONS", "4"),
    ])
    .await;
    let _a = publishing_host(&server, "capa").await;
    let _b = publishing_host(&server, "capb").await;
    let fan = server.token("capa", "fan", Role::Audience);
    let open = |room: &'static str, token: String| {
        let server = &server;
        async move { whep(server, &format!("/whep/{room}/host"), &token).await }
    };
    let v1 = open("capa", fan.clone()).await.map_err(|r| r.body).unwrap();
    let _v2 = open("capa", fan.clone()).await.map_err(|r| r.body).unwrap();
    // One token identity: its third session is refused, for it alone.
    let r = open("capa", fan.clone()).await.err().unwrap();
    assert_refused(&r, 429, "whep_identity_limit");
    // Other identities fill the room, then the server.
    let _v3 = open("capa", server.token("capa", "fan2", Role::Audience))
        .await
        .map_err(|r| r.body)
        .unwrap();
    let r = open("capa", server.token("capa", "fan3", Role::Audience))
        .await
        .err()
        .unwrap();
    assert_refused(&r, 503, "whep_room_full");
    let _v4 = open("capb", server.token("capb", "fan4", Role::Audience))
        .await
        .map_err(|r| r.body)
        .unwrap();
    let r = open("capb", server.token("capb", "fan5", Role::Audience))
        .await
        .err()
        .unwrap();
    assert_refused(&r, 503, "whep_server_full");
    assert_eq!(server.metric("cohost_whep_sessions").await, 4.0);
    // Ending a session gives its slot back: the identity may watch again.
    let r = delete(&server, &v1.location, &fan).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let _ = v1.pc.close().await;
    let deadline = Instant::now() + T;
    loop {
        match open("capa", fan.clone()).await {
            Ok(_) => break,
            Err(r) => {
                assert!(
                    Instant::now() < deadline,
                    "slot not freed: {} {}",
                    r.status,
                    r.body
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_can_still_publish_when_whep_viewers_fill_their_share() {
    // 10 ports, 4 kept for publishers; no WHEP cap gets in the way first.
    let server = Server::start_with(&[
        ("COHOST_WEBRTC__UDP_PORT_MIN", "47400"),
        ("COHOST_WEBRTC__UDP_PORT_MAX", "47409"),
        ("COHOST_WEBRTC__PUBLISHER_PORT_RESERVE", "4"),
        ("COHOST_WHIP__WHEP_MAX_PER_IDENTITY", "100"),
    ])
    .await;
    let _host = publishing_host(&server, "res").await;
    let fan = server.token("res", "fan", Role::Audience);
    // One audience token opens viewers until it is refused.
    let mut viewers = vec![];
    let refused = loop {
        match whep(&server, "/whep/res/host", &fan).await {
            Ok(v) => viewers.push(v),
            Err(r) => break r,
        }
        assert!(viewers.len() <= 10, "viewers were never refused");
    };
    assert_refused(&refused, 503, "media_ports_exhausted");
    assert_eq!(
        viewers.len(),
        5,
        "10 ports - the host's - 4 kept for publishers"
    );
    assert_eq!(server.metric("cohost_udp_ports_in_use").await, 6.0);
    // A co-host still publishes, over WHIP and over the WebSocket.
    let (_pc, offer) = publisher_offer().await;
    let r = post_sdp(
        &server,
        "/whip/res",
        Some(&server.token("res", "studio", Role::Cohost)),
        &offer,
    )
    .await;
    assert_eq!(r.status, 201, "WHIP publish refused: {}", r.body);
    let mut guest = Client::join(&server, "res", "guest", Role::Cohost).await;
    guest.publish(None).await.unwrap();
}

/// `sdp` without its ICE candidates: a client whose connectivity checks never come.
fn without_candidates(sdp: &str) -> String {
    sdp.split_inclusive('\n')
        .filter(|l| !l.starts_with("a=candidate") && !l.starts_with("a=end-of-candidates"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whep_session_without_ice_is_reaped() {
    let server = Server::start_with(&[
        ("COHOST_WHIP__CONNECT_TIMEOUT", "2s"),
        ("COHOST_WHIP__WHEP_MAX_PER_IDENTITY", "1"),
    ])
    .await;
    let _host = publishing_host(&server, "reap").await;
    let ports_before = server.metric("cohost_udp_ports_in_use").await;
    let fan = server.token("reap", "fan", Role::Audience);
    let (pc, offer, _rx) = viewer_offer().await;
    let _ = pc.close().await;
    let ghost_viewer = without_candidates(&offer);
    let r = post_sdp(&server, "/whep/reap/host", Some(&fan), &ghost_viewer).await;
    assert_eq!(r.status, 201, "{}", r.body);
    // A WHIP publisher that never connects either: a member of the room until reaped.
    let (pc, offer) = publisher_offer().await;
    let _ = pc.close().await;
    let r = post_sdp(
        &server,
        "/whip/reap",
        Some(&server.token("reap", "ghost", Role::Cohost)),
        &without_candidates(&offer),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let m = server.metrics().await;
    assert_eq!(m["cohost_whep_sessions"], 1.0, "{m:?}");
    assert_eq!(m["cohost_whip_sessions"], 1.0, "{m:?}");
    assert_eq!(m["cohost_udp_ports_in_use"], ports_before + 2.0, "{m:?}");
    let started = Instant::now();
    // Both are ended after whip.connect_timeout (2 s), long before the old fixed 30 s, and
    // their ports and the viewer's slot come back.
    server
        .wait_metrics("sessions without ICE reaped", |m| {
            m["cohost_whep_sessions"] == 0.0
                && m["cohost_whip_sessions"] == 0.0
                && m["cohost_udp_ports_in_use"] == ports_before
        })
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (_, room) = server.get("/v1/rooms/reap", Some(&admin)).await;
    let room: Value = serde_json::from_str(room.trim()).unwrap();
    assert_eq!(room["participants"].as_array().unwrap().len(), 1, "{room}");
    let v = whep(&server, "/whep/reap/host", &fan).await;
    assert!(v.is_ok(), "the reaped session's slot was not given back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whip_publishes_of_one_identity_replace_each_other() {
    let server = Server::start().await;
    let _host = Client::join(&server, "dup", "host", Role::Host).await;
    let studio = server.token("dup", "studio", Role::Cohost);
    let ports_before = server.metric("cohost_udp_ports_in_use").await;
    // The same identity publishing five times holds one session, one seat and one port.
    let mut pcs = vec![];
    for _ in 0..5 {
        let (pc, offer) = publisher_offer().await;
        let r = post_sdp(&server, "/whip/dup", Some(&studio), &offer).await;
        assert_eq!(r.status, 201, "{}", r.body);
        pcs.push(pc);
    }
    server
        .wait_metrics("one WHIP session left", |m| {
            m["cohost_whip_sessions"] == 1.0 && m["cohost_udp_ports_in_use"] == ports_before + 1.0
        })
        .await;
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (_, room) = server.get("/v1/rooms/dup", Some(&admin)).await;
    let room: Value = serde_json::from_str(room.trim()).unwrap();
    let studios = room["participants"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["identity"] == "studio")
        .count();
    assert_eq!(studios, 1, "{room}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whip_host_leaving_ends_the_bridge_and_a_new_host_gets_a_fresh_one() {
    let server = Server::start_with(&[
        // The live ends a grace period (1 s here) after its host leaves.
        ("COHOST_ROOM__HOST_GRACE", "1s"),
        ("COHOST_BRIDGE__WIDTH", "320"),
        ("COHOST_BRIDGE__HEIGHT", "240"),
        ("COHOST_BRIDGE__FPS", "15"),
    ])
    .await;
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let token = server.token("wh", "studio", Role::Host);
    for round in 0..2 {
        // The WHIP host alone in its room, with the room's bridge running.
        let (pc, offer) = publisher_offer().await;
        let r = post_sdp(&server, "/whip/wh", Some(&token), &offer).await;
        assert_eq!(r.status, 201, "{}", r.body);
        let location = r.header("location").unwrap().to_string();
        let (s, body) = server
            .send_json("POST", "/v1/rooms/wh/bridge", &admin, &json!({}))
            .await;
        assert_eq!(s, 201, "round {round}: a fresh bridge: {body}");
        wait_frames(&server, &admin, "wh", 15).await;
        // The host leaves: the room ends, and so do its bridge and its FLV stream.
        let r = delete(&server, &location, &token).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let t0 = Instant::now();
        loop {
            let (bridge, _) = server.get("/v1/rooms/wh/bridge", Some(&admin)).await;
            let (flv, _) = server.get("/live/wh.flv", None).await;
            if bridge == 404 && flv == 404 {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "bridge {bridge}, stream {flv} after the WHIP host left"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!(
            "WHIP host left: bridge and FLV gone after {:?}",
            t0.elapsed()
        );
        let _ = pc.close().await;
    }
}

// ---- ICE restart over PATCH (RFC 9725 §4.3.2) ----

/// What a client does to restart ICE on its own `webrtc` 0.21 connection over WHIP/WHEP: an
/// offer with `ice_restart`, whose new credentials and candidates go to the server as a
/// trickle-ice-sdpfrag PATCH. Returns the connection's previous answer and the fragment.
async fn client_restart_frag(pc: &Arc<dyn PeerConnection>) -> (String, String) {
    let previous = pc.remote_description().await.unwrap().sdp;
    let offer = pc
        .create_offer(Some(RTCOfferOptions { ice_restart: true }))
        .await
        .unwrap();
    pc.set_local_description(offer).await.unwrap();
    // The crate keeps its host candidates across a restart: they are in the description at once.
    let local = pc.local_description().await.unwrap().sdp;
    let mut frag = format!(
        "a=ice-ufrag:{}\r\na=ice-pwd:{}\r\n",
        sdp_attr(&local, "ice-ufrag").unwrap(),
        sdp_attr(&local, "ice-pwd").unwrap()
    );
    for l in local.lines().map(str::trim_end) {
        if l.starts_with("m=") || l.starts_with("a=mid:") || l.starts_with("a=candidate:") {
            frag.push_str(l);
            frag.push_str("\r\n");
        }
    }
    (previous, frag)
}

/// The client's new answer: its previous one with the server's new credentials and candidates
/// (from the 200 response's fragment) in place of the old ones, candidates in the first
/// m-section (BUNDLE).
fn answer_after_restart(previous: &str, server_frag: &str) -> String {
    let ufrag = sdp_attr(server_frag, "ice-ufrag").unwrap();
    let pwd = sdp_attr(server_frag, "ice-pwd").unwrap();
    let cands: Vec<&str> = server_frag
        .lines()
        .map(str::trim_end)
        .filter(|l| l.starts_with("a=candidate:"))
        .collect();
    let mut out = String::new();
    let mut first_mid = true;
    for l in previous.lines().map(str::trim_end) {
        if l.starts_with("a=candidate:") || l == "a=end-of-candidates" {
            continue;
        }
        let l = if l.starts_with("a=ice-ufrag:") {
            format!("a=ice-ufrag:{ufrag}")
        } else if l.starts_with("a=ice-pwd:") {
            format!("a=ice-pwd:{pwd}")
        } else {
            l.to_string()
        };
        out.push_str(&l);
        out.push_str("\r\n");
        if l.starts_with("a=mid:") && std::mem::take(&mut first_mid) {
            for c in &cands {
                out.push_str(c);
                out.push_str("\r\n");
            }
        }
    }
    out
}

async fn patch_frag(
    server: &Server,
    location: &str,
    token: &str,
    if_match: Option<&str>,
    frag: &str,
) -> Resp {
    let auth = format!("Bearer {token}");
    let mut h = vec![
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/trickle-ice-sdpfrag"),
    ];
    if let Some(m) = if_match {
        h.push(("If-Match", m));
    }
    http(server, "PATCH", location, &h, frag.as_bytes()).await
}

/// A 200 answer to a restart: the server's new credentials, its candidates and a new ETag.
/// Applies them to the client's connection and returns the ETag.
async fn finish_restart(
    pc: &Arc<dyn PeerConnection>,
    r: &Resp,
    previous: &str,
    old_etag: &str,
) -> String {
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.header("content-type"),
        Some("application/trickle-ice-sdpfrag")
    );
    let etag = r.header("etag").unwrap().to_string();
    assert_ne!(etag, old_etag, "a restart makes a new ICE session");
    let ufrag = sdp_attr(&r.body, "ice-ufrag").unwrap();
    assert_ne!(Some(ufrag), sdp_attr(previous, "ice-ufrag"), "{}", r.body);
    assert!(sdp_attr(&r.body, "ice-pwd").is_some(), "{}", r.body);
    assert!(r.body.contains("a=candidate:"), "{}", r.body);
    assert!(r.body.contains("a=mid:"), "{}", r.body);
    let answer = answer_after_restart(previous, &r.body);
    pc.set_remote_description(RTCSessionDescription::answer(answer).unwrap())
        .await
        .unwrap();
    etag
}

/// Packets the WebSocket `client` received from participant `pid`, all tracks.
fn packets_from(client: &Client, pid: &str) -> u64 {
    let r = client.received.lock().unwrap();
    r.values()
        .filter(|e| e.stream_id == pid)
        .map(|e| e.packets)
        .sum()
}

async fn wait_more_packets(client: &Client, pid: &str, than: u64, what: &str) -> Duration {
    let t0 = Instant::now();
    while packets_from(client, pid) < than + 50 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{what}: media stopped ({} packets, {than} before)",
            packets_from(client, pid)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whip_ice_restart_by_patch_keeps_media_flowing() {
    let server = Server::start().await;
    let mut watcher = Client::watch(&server, "ir", "watcher").await;
    let token = server.token("ir", "phone", Role::Cohost);
    let (a_ssrc, v_ssrc) = (rand::random::<u32>() | 1, rand::random::<u32>() | 1);
    let (pc, audio, video, offer) = common::whip_publisher(a_ssrc, v_ssrc).await;
    let r = post_sdp(&server, "/whip/ir", Some(&token), &offer).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let location = r.header("location").unwrap().to_string();
    let mut etag = r.header("etag").unwrap().to_string();
    let (apt, vpt) = (payload_type(&r.body, "opus"), payload_type(&r.body, "H264"));
    pc.set_remote_description(RTCSessionDescription::answer(r.body.clone()).unwrap())
        .await
        .unwrap();
    let joined = watcher
        .sig
        .wait_for("participant_joined", |v| {
            v["type"] == "participant_joined" && v["participant"]["identity"] == "phone"
        })
        .await;
    let pid = joined["participant"]["id"].as_str().unwrap().to_string();
    // 50 packets a second of each kind, whatever happens to ICE.
    let stop = Arc::new(AtomicBool::new(false));
    let pump = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(Ordering::SeqCst) {
                let pay = common::make_payload(7, n, 200);
                let (seq, ts) = (n as u16, n.wrapping_mul(960));
                let _ = audio
                    .write_rtp(common::rtp_packet(a_ssrc, apt, seq, ts, true, pay.clone()))
                    .await;
                let _ = video
                    .write_rtp(common::rtp_packet(v_ssrc, vpt, seq, ts, true, pay))
                    .await;
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    wait_media_from(&watcher, &pid, 30).await;

    // First restart, naming the ETag; a second one (a phone moving on again), with `*`.
    for round in 0..2 {
        let (previous, frag) = client_restart_frag(&pc).await;
        // Without If-Match, or naming an ICE session that is gone: refused, nothing changes.
        let r = patch_frag(&server, &location, &token, None, &frag).await;
        assert_eq!(r.status, 428, "{}", r.body);
        let r = patch_frag(&server, &location, &token, Some("\"stale\""), &frag).await;
        assert_eq!(r.status, 412, "{}", r.body);
        let before = packets_from(&watcher, &pid);
        let asked = Instant::now();
        let if_match = if round == 0 { etag.clone() } else { "*".into() };
        let r = patch_frag(&server, &location, &token, Some(&if_match), &frag).await;
        let took = asked.elapsed();
        let new = finish_restart(&pc, &r, &previous, &etag).await;
        let old = std::mem::replace(&mut etag, new);
        let resumed = wait_more_packets(&watcher, &pid, before, "after the restart").await;
        eprintln!(
            "restart {round}: PATCH -> 200 in {took:?}; 50 more packets at the viewer {resumed:?} \
             after the answer was applied"
        );
        // The old ETag names a finished ICE session now.
        let r = patch_frag(&server, &location, &token, Some(&old), &frag).await;
        assert_eq!(r.status, 412, "{}", r.body);
    }
    // Trickle on the new ICE session still answers 204.
    let ufrag = sdp_attr(&pc.local_description().await.unwrap().sdp, "ice-ufrag").unwrap();
    let trickle = format!("a=ice-ufrag:{ufrag}\r\na=candidate:9 1 udp 1 127.0.0.1 9 typ host\r\n");
    let r = patch_frag(&server, &location, &token, Some(&etag), &trickle).await;
    assert_eq!(r.status, 204, "{}", r.body);
    // One session, one participant all along: nobody left or joined, the tracks stayed.
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (_, room) = server.get("/v1/rooms/ir", Some(&admin)).await;
    let room: Value = serde_json::from_str(room.trim()).unwrap();
    let ids: Vec<&str> = room["participants"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["id"].as_str())
        .collect();
    assert!(ids.contains(&pid.as_str()) && ids.len() == 2, "{room}");
    assert_eq!(room["tracks"].as_array().unwrap().len(), 2, "{room}");
    assert_eq!(server.metric("cohost_whip_sessions").await, 1.0);
    stop.store(true, Ordering::SeqCst);
    let _ = pump.await;
    let r = delete(&server, &location, &token).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let _ = pc.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whep_viewer_ice_restart_by_patch_keeps_media_flowing() {
    let server = Server::start().await;
    let mut host = Client::join(&server, "vr", "host", Role::Host).await;
    host.publish(None).await.unwrap();
    let token = server.token("vr", "fan", Role::Audience);
    // 409 until the host's tracks are published.
    let t0 = Instant::now();
    let mut v = loop {
        match whep(&server, "/whep/vr/host", &token).await {
            Ok(v) => break v,
            Err(r) => assert!(
                r.status == 409 && t0.elapsed() < T,
                "{} {}",
                r.status,
                r.body
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let count = |v: &mut Viewer| {
        let mut n = 0;
        while v.rx.try_recv().is_ok() {
            n += 1;
        }
        n
    };
    let wait_packets = async |v: &mut Viewer, what: &str| {
        let t0 = Instant::now();
        let mut n = 0;
        while n < 50 {
            assert!(t0.elapsed() < T, "{what}: {n} packets");
            n += count(v);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        t0.elapsed()
    };
    wait_packets(&mut v, "before the restart").await;
    let (previous, frag) = client_restart_frag(&v.pc).await;
    let r = patch_frag(&server, &v.location, &token, None, &frag).await;
    assert_eq!(r.status, 428, "{}", r.body);
    let asked = Instant::now();
    let r = patch_frag(&server, &v.location, &token, Some(&v.etag), &frag).await;
    let took = asked.elapsed();
    v.etag = finish_restart(&v.pc, &r, &previous, &v.etag).await;
    count(&mut v);
    let resumed = wait_packets(&mut v, "after the restart").await;
    eprintln!("WHEP restart: PATCH -> 200 in {took:?}; 50 packets {resumed:?} after");
    let r = delete(&server, &v.location, &token).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let _ = v.pc.close().await;
}
