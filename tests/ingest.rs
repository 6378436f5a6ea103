//! RTMP ingest from a real encoder (ffmpeg: libx264 baseline + AAC) into a room, seen by a real
//! WebRTC subscriber and decoded (OpenH264, libopus); stream keys refused when invalid or
//! expired; signed play URLs of the embedded origin; hostile bytes on the RTMP port.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cohost::auth::{Role, sign};
use cohost::config::DEV_SECRET;
use cohost::media::goertzel::{left_channel, tone_power};
use cohost::media::rtp_h264::{Assembler, Output};
use common::{
    Client, Server, assert_continuous, decode_recording, is_colour, is_slate, pixel, read_flv_tags,
    wait_until,
};
use openh264::formats::YUVSource;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

const SIGN_SECRET: &str = "test-origin-sign-secret";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `cohost token --stream-key` (the real CLI): the key and the printed URL.
async fn cli_stream_key(room: &str, identity: &str, env: &[(&str, &str)]) -> (String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cohost"));
    cmd.args(["token", "--room", room, "--identity", identity])
        .args(["--role", "host", "--stream-key", "--ttl", "10m"])
        .env_remove("COHOST_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().await.expect("cohost token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("{name} in {text}"))
    };
    (field("stream key:"), field("url:"))
}

/// ffmpeg publishing test pictures and a 440 Hz tone (44.1 kHz) for `secs` seconds, in real time.
fn ffmpeg_push(url: &str, secs: u32) -> Child {
    common::ffmpeg_push_lavfi(url, "testsrc=size=320x240:rate=30", secs, Stdio::piped())
}

async fn room_identities(server: &Server, room: &str) -> Vec<String> {
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (status, body) = server.get(&format!("/v1/rooms/{room}"), Some(&admin)).await;
    if status != 200 {
        return vec![];
    }
    let v: Value = serde_json::from_str(body.trim()).unwrap_or(json!({}));
    v["participants"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["identity"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn raw_of(c: &Client, kind: &str) -> Vec<(u16, u32, bool, Bytes)> {
    c.received
        .lock()
        .unwrap()
        .values()
        .filter(|r| r.kind == kind)
        .flat_map(|r| r.raw.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmp_publisher_with_a_stream_key_is_seen_and_heard_by_webrtc_subscribers() {
    let server = Server::start().await;
    let rtmp = server.rtmp.expect("rtmp listener");
    let mut viewer = Client::watch(&server, "obsroom", "viewer").await;
    let (key, url) = cli_stream_key("obsroom", "obs", &[]).await;
    assert!(url.ends_with(&format!("/live/{key}")), "{url}");
    let mut ff = ffmpeg_push(&format!("rtmp://{rtmp}/live/{key}"), 6);
    // The publisher is a participant under the key's identity.
    wait_until(
        "the RTMP publisher in the room",
        Duration::from_secs(15),
        async || {
            room_identities(&server, "obsroom")
                .await
                .contains(&"obs".to_string())
        },
    )
    .await;
    // The viewer is told over signaling, like for any member: the join, then both tracks.
    viewer
        .sig
        .wait_for("participant_joined", |v| {
            v["type"] == "participant_joined" && v["participant"]["identity"] == "obs"
        })
        .await;
    let mut kinds = vec![];
    while kinds.len() < 2 {
        let v = viewer
            .sig
            .wait_for("track_published", |v| v["type"] == "track_published")
            .await;
        kinds.push(v["track"]["kind"].as_str().unwrap_or("").to_string());
    }
    kinds.sort();
    assert_eq!(kinds, ["audio", "video"]);
    // Enough media reaches the WebRTC subscriber: about 3 s of video and audio.
    wait_until(
        "media at the subscriber",
        Duration::from_secs(20),
        async || raw_of(&viewer, "video").len() >= 150 && raw_of(&viewer, "audio").len() >= 150,
    )
    .await;
    // Video: depacketize (RFC 6184) and decode with OpenH264.
    let video = raw_of(&viewer, "video");
    let mut asm = Assembler::new();
    let mut dec = openh264::decoder::Decoder::new().unwrap();
    let (mut decoded, mut keyframes) = (0, 0);
    let mut size = None;
    for (seq, ts, marker, payload) in &video {
        for o in asm.push(*seq, *ts, *marker, payload) {
            if let Output::Frame(au) = o {
                keyframes += usize::from(au.keyframe);
                if let Ok(Some(pic)) = dec.decode(&au.annexb) {
                    decoded += 1;
                    size = Some(pic.dimensions());
                }
            }
        }
    }
    assert!(
        decoded >= 30,
        "decoded {decoded} pictures of {} packets",
        video.len()
    );
    assert!(keyframes >= 1);
    assert_eq!(size, Some((320, 240)));
    // Audio: Opus packets that decode to the 440 Hz tone, 20 ms each.
    let audio = raw_of(&viewer, "audio");
    let mut opus = opus::Decoder::new(48_000, opus::Channels::Stereo).unwrap();
    let mut pcm = vec![0i16; 5760 * 2];
    let mut all = vec![];
    for (_, _, _, p) in &audio {
        let n = opus.decode(p, &mut pcm, false).expect("opus decodes");
        assert_eq!(n, 960, "20 ms frames");
        all.extend_from_slice(&pcm[..n * 2]);
    }
    let tail = left_channel(&all[all.len() / 2..]);
    let p440 = tone_power(&tail, 48_000.0, 440.0);
    let p1000 = tone_power(&tail, 48_000.0, 1000.0);
    assert!(p440 > 0.2 && p1000 < 0.05, "440 Hz {p440}, 1 kHz {p1000}");
    for w in audio.windows(2) {
        assert_eq!(w[1].1.wrapping_sub(w[0].1), 960, "RTP timestamps step 960");
    }
    // The publisher stops: it leaves the room and its tracks end.
    let status = tokio::time::timeout(Duration::from_secs(20), ff.wait())
        .await
        .expect("ffmpeg finished")
        .unwrap();
    assert!(status.success());
    wait_until(
        "the publisher to leave",
        Duration::from_secs(10),
        async || {
            !room_identities(&server, "obsroom")
                .await
                .contains(&"obs".to_string())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_and_expired_stream_keys_are_refused_at_connect() {
    let server = Server::start().await;
    let rtmp = server.rtmp.expect("rtmp listener");
    let secret = DEV_SECRET.as_bytes();
    let expired = sign::mint_stream_key(secret, "keys", "obs", Role::Host, now() - 60).unwrap();
    let forged = sign::mint_stream_key(
        b"somebody-elses-secret",
        "keys",
        "obs",
        Role::Host,
        now() + 600,
    )
    .unwrap();
    let jwt = server.token("keys", "obs", Role::Host);
    for (key, why) in [
        (expired.as_str(), "expired"),
        (forged.as_str(), "bad signature"),
        ("keys", "malformed"),
        (jwt.as_str(), "malformed"),
    ] {
        let started = Instant::now();
        let out = ffmpeg_push(&format!("rtmp://{rtmp}/live/{key}"), 5)
            .wait_with_output()
            .await
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{why}: ffmpeg must fail");
        assert!(err.contains(why), "{why}: {err}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "refused at once, not after the stream"
        );
        assert!(
            room_identities(&server, "keys").await.is_empty(),
            "nobody joined"
        );
    }
    // A signed publish URL is required when origin.sign_publish is on: the key alone is refused.
    let env = [
        ("COHOST_ORIGIN__SIGN_PUBLISH", "true"),
        ("COHOST_ORIGIN__SIGN_SECRET", SIGN_SECRET),
    ];
    let server = Server::start_with(&env).await;
    let rtmp = server.rtmp.expect("rtmp listener");
    let (key, url) = cli_stream_key("keys", "obs", &env).await;
    let out = ffmpeg_push(&format!("rtmp://{rtmp}/live/{key}"), 5)
        .wait_with_output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("signature"));
    // With the printed URL's signature it is accepted.
    let query = url.split_once('?').expect("signed url").1;
    let mut ff = ffmpeg_push(&format!("rtmp://{rtmp}/live/{key}?{query}"), 3);
    wait_until(
        "the signed publisher",
        Duration::from_secs(15),
        async || {
            room_identities(&server, "keys")
                .await
                .contains(&"obs".to_string())
        },
    )
    .await;
    let _ = ff.kill().await;
}

/// `cohost sign-url` (the real CLI) for `stream`: (rtmp, flv) URLs.
async fn cli_sign_url(stream: &str, rtmp: &str, http: &str) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cohost"))
        .args(["sign-url", "--stream", stream, "--ttl", "10m"])
        .env_remove("COHOST_CONFIG")
        .env("COHOST_ORIGIN__SIGN_SECRET", SIGN_SECRET)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lines = text.lines();
    let r = lines.next().unwrap().replace("127.0.0.1:1935", rtmp);
    let f = lines.next().unwrap().replace("127.0.0.1:8080", http);
    (r, f)
}

async fn ffprobe_ok(url: &str) -> (bool, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        Command::new("ffprobe")
            .args(["-v", "error", "-rw_timeout", "10000000"])
            .args(["-show_entries", "stream=codec_name,width,height"])
            .args(["-of", "default=nw=1", url])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("ffprobe finished")
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.status.success() && text.contains("codec_name=h264"),
        text,
    )
}

/// Until the room's bridge has encoded a second of output.
async fn wait_bridge(server: &Server, room: &str) {
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    wait_until("the bridge output", Duration::from_secs(30), async || {
        let (_, body) = server
            .get(&format!("/v1/rooms/{room}/bridge"), Some(&admin))
            .await;
        let v: Value = serde_json::from_str(body.trim()).unwrap_or(json!({}));
        v["stats"]["video_frames"].as_u64().unwrap_or(0) >= 15
    })
    .await;
}

/// A server whose RTMP host's bridge starts by itself, small output for speed.
async fn bridged_server(extra: &[(&str, &str)]) -> Server {
    let mut env = vec![
        ("COHOST_BRIDGE__AUTO_START", "true"),
        ("COHOST_BRIDGE__WIDTH", "320"),
        ("COHOST_BRIDGE__HEIGHT", "240"),
        ("COHOST_BRIDGE__FPS", "15"),
    ];
    env.extend_from_slice(extra);
    Server::start_with(&env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_play_urls_refuse_missing_and_bad_signatures_and_play_valid_ones() {
    let server = bridged_server(&[
        ("COHOST_ORIGIN__SIGN_PLAY", "true"),
        ("COHOST_ORIGIN__SIGN_SECRET", SIGN_SECRET),
    ])
    .await;
    let rtmp = server.rtmp.expect("rtmp listener");
    let (key, _) = cli_stream_key("signed", "obs", &[]).await;
    let _ff = ffmpeg_push(&format!("rtmp://{rtmp}/live/{key}"), 30);
    let (rtmp_url, flv_url) =
        cli_sign_url("signed", &rtmp.to_string(), &server.addr.to_string()).await;
    // The RTMP host's bridge output is on the origin under the room's name.
    wait_bridge(&server, "signed").await;
    // HTTP-FLV: no signature, a bad one, an expired one: 403; the signed URL plays.
    let path = "/live/signed.flv";
    let bad = format!("{path}?sign={}&expires={}", "0".repeat(64), now() + 600);
    let expired_q = sign::signed_query(SIGN_SECRET.as_bytes(), "/live/signed", now() - 10);
    for p in [path.to_string(), bad, format!("{path}?{expired_q}")] {
        let (s, body) = server.get(&p, None).await;
        assert_eq!(s, 403, "{p}: {body}");
    }
    let (ok, text) = ffprobe_ok(&flv_url).await;
    assert!(ok, "signed HTTP-FLV plays: {text}");
    assert!(text.contains("width=320"), "{text}");
    // RTMP play: the same rules.
    let plain = format!("rtmp://{rtmp}/live/signed");
    let (ok, text) = ffprobe_ok(&plain).await;
    assert!(!ok, "unsigned RTMP play refused: {text}");
    let tampered = rtmp_url.replace("/live/signed?", "/live/other?");
    let (ok, _) = ffprobe_ok(&tampered).await;
    assert!(!ok, "a signature for another stream is refused");
    let (ok, text) = ffprobe_ok(&rtmp_url).await;
    assert!(ok, "signed RTMP play works: {text}");
}

/// A minimal RTMP publisher (rml_rtmp's client session) for sending hand-made tags.
struct RtmpPublisher {
    sock: tokio::net::TcpStream,
    session: rml_rtmp::sessions::ClientSession,
}

impl RtmpPublisher {
    async fn connect(rtmp: std::net::SocketAddr, key: &str) -> Result<Self, String> {
        use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
        use rml_rtmp::sessions::{
            ClientSession, ClientSessionConfig, ClientSessionEvent, ClientSessionResult,
            PublishRequestType,
        };
        let mut sock = tokio::net::TcpStream::connect(rtmp).await.unwrap();
        let mut hs = Handshake::new(PeerType::Client);
        sock.write_all(&hs.generate_outbound_p0_and_p1().unwrap())
            .await
            .unwrap();
        let mut buf = vec![0u8; 8192];
        let leftover = loop {
            let n = sock.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed in handshake");
            match hs.process_bytes(&buf[..n]).unwrap() {
                HandshakeProcessResult::InProgress { response_bytes } => {
                    sock.write_all(&response_bytes).await.unwrap()
                }
                HandshakeProcessResult::Completed {
                    response_bytes,
                    remaining_bytes,
                } => {
                    sock.write_all(&response_bytes).await.unwrap();
                    break remaining_bytes;
                }
            }
        };
        let (mut session, initial) = ClientSession::new(ClientSessionConfig::new()).unwrap();
        let mut out = initial;
        out.extend(session.handle_input(&leftover).unwrap());
        out.push(session.request_connection("live".into()).unwrap());
        let mut published = false;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            for r in std::mem::take(&mut out) {
                match r {
                    ClientSessionResult::OutboundResponse(p) => {
                        sock.write_all(&p.bytes).await.unwrap()
                    }
                    ClientSessionResult::RaisedEvent(
                        ClientSessionEvent::ConnectionRequestAccepted,
                    ) => {
                        out.push(
                            session
                                .request_publishing(key.into(), PublishRequestType::Live)
                                .unwrap(),
                        );
                    }
                    ClientSessionResult::RaisedEvent(
                        ClientSessionEvent::PublishRequestAccepted,
                    ) => published = true,
                    ClientSessionResult::RaisedEvent(
                        ClientSessionEvent::ConnectionRequestRejected { description },
                    ) => return Err(description),
                    _ => {}
                }
            }
            if published {
                return Ok(Self { sock, session });
            }
            if !out.is_empty() {
                continue;
            }
            assert!(Instant::now() < deadline, "publish timed out");
            let n = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut buf))
                .await
                .map_err(|_| "timeout".to_string())?
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed".into());
            }
            out = session
                .handle_input(&buf[..n])
                .map_err(|e| format!("{e:?}"))?;
        }
    }

    async fn video(&mut self, body: &[u8], ms: u32) {
        let ts = rml_rtmp::time::RtmpTimestamp::new(ms);
        if let Ok(rml_rtmp::sessions::ClientSessionResult::OutboundResponse(p)) = self
            .session
            .publish_video_data(Bytes::copy_from_slice(body), ts, false)
        {
            let _ = self.sock.write_all(&p.bytes).await;
        }
    }

    async fn audio(&mut self, body: &[u8], ms: u32) {
        let ts = rml_rtmp::time::RtmpTimestamp::new(ms);
        if let Ok(rml_rtmp::sessions::ClientSessionResult::OutboundResponse(p)) = self
            .session
            .publish_audio_data(Bytes::copy_from_slice(body), ts, false)
        {
            let _ = self.sock.write_all(&p.bytes).await;
        }
    }
}

/// An RTMP client that completes the handshake (C0+C1, then C2 echoing S1).
async fn handshaken(rtmp: std::net::SocketAddr) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(rtmp).await.unwrap();
    let mut c1 = vec![3u8];
    c1.extend(std::iter::repeat_n(7u8, 1536));
    s.write_all(&c1).await.unwrap();
    let mut s0s1s2 = vec![0u8; 1 + 1536 * 2];
    s.read_exact(&mut s0s1s2).await.unwrap();
    s.write_all(&s0s1s2[1..1537]).await.unwrap();
    s
}

/// Chunk header (fmt 0, csid 2) + body of a protocol control message.
fn control(msg_type: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![0x02, 0, 0, 0];
    v.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    v.push(msg_type);
    v.extend_from_slice(&[0, 0, 0, 0]);
    v.extend_from_slice(body);
    v
}

async fn drain(mut s: tokio::net::TcpStream) {
    let mut sink = vec![];
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_rtmp_port_closes_only_that_connection() {
    let server = bridged_server(&[]).await;
    let rtmp = server.rtmp.expect("rtmp listener");
    let (key, _) = cli_stream_key("sturdy", "obs", &[]).await;
    let _ff = ffmpeg_push(&format!("rtmp://{rtmp}/live/{key}"), 30);
    wait_bridge(&server, "sturdy").await;
    // Random bytes.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let junk: Vec<u8> = (0..50_000)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect();
    let mut s = tokio::net::TcpStream::connect(rtmp).await.unwrap();
    let _ = s.write_all(&junk).await;
    drain(s).await;
    // A truncated handshake, then silence until the server gives up.
    let mut s = tokio::net::TcpStream::connect(rtmp).await.unwrap();
    s.write_all(&[3u8; 700]).await.unwrap();
    drop(s);
    // A huge chunk size, then a chunk claiming a 16 MB message that never comes.
    let mut s = handshaken(rtmp).await;
    let _ = s
        .write_all(&control(1, &0x7fff_ffffu32.to_be_bytes()))
        .await;
    let mut big = vec![0x03, 0, 0, 0, 0xff, 0xff, 0xff, 0x14, 0, 0, 0, 0];
    big.extend(std::iter::repeat_n(0x41u8, 100_000));
    let _ = s.write_all(&big).await;
    drop(s);
    // A chunk size of zero (invalid) closes the connection.
    let mut s = handshaken(rtmp).await;
    let _ = s.write_all(&control(1, &0u32.to_be_bytes())).await;
    let _ = s.write_all(&junk[..5000]).await;
    drain(s).await;
    // A second publisher with a valid key whose media is garbage after publish: a baseline
    // sequence header, then random "frames" and audio, and finally raw junk bytes.
    // (A co-host key: a host key of another identity is refused while obs hosts the room.)
    let key2 = sign::mint_stream_key(
        DEV_SECRET.as_bytes(),
        "sturdy",
        "garbler",
        Role::Cohost,
        now() + 600,
    )
    .unwrap();
    let mut p = RtmpPublisher::connect(rtmp, &key2)
        .await
        .expect("valid key accepted");
    let header = cohost::media::flv::avc_sequence_header(&[
        1, 66, 0, 30, 0xff, 0xe1, 0, 4, 0x67, 66, 0, 30, 1, 0, 1, 0x68,
    ]);
    p.video(&header, 0).await;
    for i in 0..200usize {
        let mut body = vec![0x17u8, 1, 0, 0, 0];
        body.extend_from_slice(&junk[i * 97..i * 97 + 300]);
        p.video(&body, i as u32 * 33).await;
        let mut aac = vec![0xaf, if i == 0 { 0 } else { 1 }];
        aac.extend_from_slice(&junk[i * 50..i * 50 + 40]);
        p.audio(&aac, i as u32 * 33).await;
    }
    let _ = p.sock.write_all(&junk).await;
    drain(p.sock).await;
    // The server is healthy, the first publisher is still in the room, and a player works.
    let (s, body) = server.get("/healthz", None).await;
    assert_eq!(s, 200, "{body}");
    assert!(
        room_identities(&server, "sturdy")
            .await
            .contains(&"obs".to_string())
    );
    let (ok, text) = ffprobe_ok(&format!("rtmp://{rtmp}/live/sturdy")).await;
    assert!(ok, "a player still works: {text}");
}

/// A one-shot RTMP server that records the stream key (with its query) a client publishes to.
async fn capture_publish_key(listener: tokio::net::TcpListener) -> String {
    use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
    use rml_rtmp::sessions::{
        ServerSession, ServerSessionConfig, ServerSessionEvent, ServerSessionResult,
    };
    let (mut sock, _) = listener.accept().await.unwrap();
    let mut hs = Handshake::new(PeerType::Server);
    let mut buf = vec![0u8; 8192];
    let leftover = loop {
        let n = sock.read(&mut buf).await.unwrap();
        assert!(n > 0);
        match hs.process_bytes(&buf[..n]).unwrap() {
            HandshakeProcessResult::InProgress { response_bytes } => {
                sock.write_all(&response_bytes).await.unwrap()
            }
            HandshakeProcessResult::Completed {
                response_bytes,
                remaining_bytes,
            } => {
                sock.write_all(&response_bytes).await.unwrap();
                break remaining_bytes;
            }
        }
    };
    let (mut session, mut out) = ServerSession::new(ServerSessionConfig::new()).unwrap();
    out.extend(session.handle_input(&leftover).unwrap());
    loop {
        let mut more = vec![];
        for r in out {
            match r {
                ServerSessionResult::OutboundResponse(p) => sock.write_all(&p.bytes).await.unwrap(),
                ServerSessionResult::RaisedEvent(ServerSessionEvent::ConnectionRequested {
                    request_id,
                    ..
                }) => more.extend(session.accept_request(request_id).unwrap()),
                ServerSessionResult::RaisedEvent(ServerSessionEvent::PublishStreamRequested {
                    stream_key,
                    ..
                }) => return stream_key,
                _ => {}
            }
        }
        if !more.is_empty() {
            out = more;
            continue;
        }
        let n = sock.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before publishing");
        out = session.handle_input(&buf[..n]).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_signs_cdn_destination_urls_itself_at_connect() {
    let server = bridged_server(&[("COHOST_BRIDGE__AUTO_START", "false")]).await;
    let _host = Client::join(&server, "cdn", "host", Role::Host).await;
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    // A bad scheme is refused before anything starts.
    let (s, body) = server
        .send_json(
            "POST",
            "/v1/rooms/cdn/bridge",
            &admin,
            &json!({"destinations": [{"url": "rtmp://127.0.0.1:1/live/x",
                                      "sign": {"scheme": "nope", "key": "k"}}]}),
        )
        .await;
    // 400 in the API's error format, naming the field.
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("destinations[0]"), "{body}");
    // tx_secret: the CDN stand-in sees txSecret = md5(key + stream + txTime).
    let cdn = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = cdn.local_addr().unwrap().port();
    let captured = tokio::spawn(capture_publish_key(cdn));
    let url = format!("rtmp://127.0.0.1:{port}/live/cdnroom");
    let (s, body) = server
        .send_json(
            "POST",
            "/v1/rooms/cdn/bridge",
            &admin,
            &json!({"destinations": [{"url": url,
                    "sign": {"scheme": "tx_secret", "key": "cdn-key", "ttl_secs": 3600}}]}),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    let key = tokio::time::timeout(Duration::from_secs(20), captured)
        .await
        .expect("the bridge connected")
        .unwrap();
    let (stream, query) = sign::split_query(&key);
    assert_eq!(stream, "cdnroom");
    let get = |k: &str| {
        query
            .iter()
            .find(|(q, _)| *q == k)
            .map(|(_, v)| v.to_string())
    };
    let tx_time = get("txTime").expect("txTime");
    let expiry = u64::from_str_radix(&tx_time, 16).unwrap();
    assert!(
        expiry.abs_diff(now() + 3600) < 60,
        "expiry about an hour ahead"
    );
    assert_eq!(
        get("txSecret"),
        Some(sign::tx_secret("cdn-key", "cdnroom", expiry).0)
    );
    // The status shows the URL without the signature, and never the key.
    let (_, body) = server.get("/v1/rooms/cdn/bridge", Some(&admin)).await;
    assert!(
        body.contains(&format!("rtmp://127.0.0.1:{port}/live/cdnroom")),
        "{body}"
    );
    assert!(
        !body.contains("txSecret") && !body.contains("cdn-key"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_keys_and_signed_urls_come_from_the_rest_api() {
    let server = Server::start().await;
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (s, body) = server
        .send_json(
            "POST",
            "/v1/rooms/api1/stream-keys",
            &admin,
            &json!({"identity": "obs", "role": "cohost", "ttl": "2h"}),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    let v: Value = serde_json::from_str(body.trim()).unwrap();
    let key = v["stream_key"].as_str().unwrap();
    let g = sign::verify_stream_key(DEV_SECRET.as_bytes(), key, now()).expect("a valid key");
    assert_eq!(
        (g.room.as_str(), g.identity.as_str(), g.role),
        ("api1", "obs", Role::Cohost)
    );
    assert!(g.expiry.abs_diff(now() + 7200) < 60);
    assert!(
        v["url"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/live/{key}")),
        "{v}"
    );
    // Refused: no token, a viewer's token, a role that may not publish, a bad ttl.
    let viewer = server.token("api1", "v", Role::Audience);
    let (s, _) = server
        .send_json(
            "POST",
            "/v1/rooms/api1/stream-keys",
            &viewer,
            &json!({"identity": "x"}),
        )
        .await;
    assert_eq!(s, 403);
    let (s, _) = server.get("/v1/rooms/api1/stream-keys", None).await;
    assert!(s == 405 || s == 401, "{s}");
    for bad in [
        json!({"identity": "x", "role": "audience"}),
        json!({"identity": "x", "ttl": "soon"}),
        json!({"identity": "bad name"}),
        json!({"identity": "x", "extra": 1}),
    ] {
        let (s, body) = server
            .send_json("POST", "/v1/rooms/api1/stream-keys", &admin, &bad)
            .await;
        assert_eq!(s, 400, "{bad}: {body}");
    }
    // Signed URLs need a configured secret.
    let (s, body) = server
        .send_json("POST", "/v1/streams/api1/signed-url", &admin, &json!({}))
        .await;
    assert_eq!(s, 409, "{body}");
    let server = Server::start_with(&[("COHOST_ORIGIN__SIGN_SECRET", SIGN_SECRET)]).await;
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (s, body) = server
        .send_json(
            "POST",
            "/v1/streams/api1/signed-url",
            &admin,
            &json!({"ttl": "5m"}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(body.trim()).unwrap();
    let flv = v["flv"].as_str().unwrap();
    let (_, q) = sign::split_query(flv);
    assert_eq!(
        sign::verify_signed(SIGN_SECRET.as_bytes(), "/live/api1", &q, now()),
        Ok(())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kicked_rtmp_publisher_is_disconnected() {
    let server = Server::start().await;
    let rtmp = server.rtmp.expect("rtmp listener");
    let _host = Client::join(&server, "kick", "host", Role::Host).await;
    let key = sign::mint_stream_key(
        DEV_SECRET.as_bytes(),
        "kick",
        "obs",
        Role::Cohost,
        now() + 600,
    )
    .unwrap();
    let mut ff = ffmpeg_push(&format!("rtmp://{rtmp}/live/{key}"), 30);
    wait_until(
        "the RTMP publisher in the room",
        Duration::from_secs(15),
        async || {
            room_identities(&server, "kick")
                .await
                .contains(&"obs".to_string())
        },
    )
    .await;
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (_, body) = server.get("/v1/rooms/kick", Some(&admin)).await;
    let v: Value = serde_json::from_str(body.trim()).unwrap();
    let pid = v["participants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["identity"] == "obs")
        .and_then(|p| p["id"].as_str())
        .unwrap()
        .to_string();
    let (s, body) = server
        .send_json(
            "POST",
            "/v1/rooms/kick/actions",
            &admin,
            &json!({"type": "kick", "participant_id": pid}),
        )
        .await;
    assert_eq!(s, 204, "{body}");
    // ffmpeg loses its connection long before its 30 s are up.
    let status = tokio::time::timeout(Duration::from_secs(10), ff.wait())
        .await
        .expect("ffmpeg disconnected")
        .unwrap();
    assert!(!status.success());
    assert!(
        !room_identities(&server, "kick")
            .await
            .contains(&"obs".to_string())
    );
}

/// ffmpeg publishing a plain `colour` picture (and a tone) for `secs` seconds, in real time.
fn ffmpeg_push_colour(url: &str, colour: &str, secs: u32) -> Child {
    common::ffmpeg_push_lavfi(
        url,
        &format!("color=c={colour}:size=320x240:rate=30"),
        secs,
        Stdio::null(),
    )
}

/// A host stream key for `room` (identity "obs").
fn host_key(room: &str) -> String {
    sign::mint_stream_key(DEV_SECRET.as_bytes(), room, "obs", Role::Host, now() + 600).unwrap()
}

/// How long until the room's bridge and its HTTP-FLV stream are both gone (404), at most
/// `limit`.
async fn time_until_bridge_and_flv_gone(server: &Server, room: &str, limit: Duration) -> Duration {
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let t0 = Instant::now();
    wait_until("the bridge and its FLV stream to end", limit, async || {
        let (bridge, _) = server
            .get(&format!("/v1/rooms/{room}/bridge"), Some(&admin))
            .await;
        let (flv, _) = server.get(&format!("/live/{room}.flv"), None).await;
        bridge == 404 && flv == 404
    })
    .await;
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmp_ingest_host_leaving_shows_the_slate_then_ends_the_bridge() {
    // The bridge starts by itself with the RTMP host's first track (bridge.auto_start).
    let server = bridged_server(&[("COHOST_ROOM__HOST_GRACE", "3s")]).await;
    let rtmp = server.rtmp.expect("rtmp listener");
    let mut ff = ffmpeg_push(&format!("rtmp://{rtmp}/live/{}", host_key("obsroom")), 60);
    wait_bridge(&server, "obsroom").await;
    // The encoder stops (killed: no unpublish; its TCP connection just ends).
    ff.kill().await.unwrap();
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    wait_until("the slate", Duration::from_secs(5), async || {
        let (_, body) = server.get("/v1/rooms/obsroom/bridge", Some(&admin)).await;
        body.contains("\"mix_reason\":\"host_away\"")
    })
    .await;
    // The grace period (3 s) ends without the encoder: the room and its bridge end.
    let took = time_until_bridge_and_flv_gone(&server, "obsroom", Duration::from_secs(10)).await;
    eprintln!("rtmp host stopped: bridge and FLV gone {took:?} after the slate");
    assert!(room_identities(&server, "obsroom").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmp_ingest_host_reconnecting_within_grace_continues_the_same_stream() {
    let server = bridged_server(&[("COHOST_ROOM__HOST_GRACE", "20s")]).await;
    let rtmp = server.rtmp.expect("rtmp listener");
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let url = format!("rtmp://{rtmp}/live/{}", host_key("resume"));
    let stats = async || -> Value {
        let (_, body) = server.get("/v1/rooms/resume/bridge", Some(&admin)).await;
        serde_json::from_str(body.trim()).unwrap_or(json!({}))
    };
    let mut ff = ffmpeg_push_colour(&url, "blue", 60);
    wait_bridge(&server, "resume").await;
    // One viewer reads the stream through the whole episode.
    let steps = async {
        wait_until("blue passed through", Duration::from_secs(15), async || {
            stats().await["stats"]["passthrough_frames"].as_u64() > Some(20)
        })
        .await;
        // The encoder drops (killed) and comes back 2 s into the slate with another picture.
        ff.kill().await.unwrap();
        wait_until("the slate", Duration::from_secs(5), async || {
            stats().await["stats"]["mix_reason"] == "host_away"
        })
        .await;
        let slate_frames = stats().await["stats"]["encoded_frames"]
            .as_u64()
            .unwrap_or(0);
        wait_until("2 s of slate", Duration::from_secs(10), async || {
            stats().await["stats"]["encoded_frames"]
                .as_u64()
                .unwrap_or(0)
                > slate_frames + 30
        })
        .await;
        let ff = ffmpeg_push_colour(&url, "red", 60);
        wait_until("red passed through", Duration::from_secs(15), async || {
            let v = stats().await;
            v["stats"]["path"] == "passthrough" && v["stats"]["switches"].as_u64() >= Some(2)
        })
        .await;
        ff
    };
    let (tags, ff) = {
        let addr = server.addr;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tags = read_flv_tags(addr, "/live/resume.flv", 14, async {
            let _ = tx.send(steps.await);
        })
        .await;
        (tags, rx.await.ok())
    };
    drop(ff);
    // One stream: one header, continuous timestamps, decodable throughout.
    assert_continuous(&tags, 60);
    let decoded = decode_recording(&tags, "resume").await;
    let frames = decoded.frames();
    let first = |f: &dyn Fn(&[u8]) -> bool| frames.iter().position(|p| f(p));
    let blue = first(&|p| is_colour(pixel(p, 160, 90), (0, 0, 255))).expect("blue");
    let slate = first(&|p| is_slate(p)).expect("the slate");
    let red = first(&|p| is_colour(pixel(p, 160, 90), (255, 0, 0))).expect("red");
    assert!(
        blue < slate && slate < red,
        "blue {blue}, slate {slate}, red {red}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmp_ingest_host_reconnecting_gets_a_fresh_bridge() {
    // Without a grace period the room ends when its encoder stops.
    let server = bridged_server(&[
        ("COHOST_BRIDGE__AUTO_START", "false"),
        ("COHOST_ROOM__HOST_GRACE", "0s"),
    ])
    .await;
    let rtmp = server.rtmp.expect("rtmp listener");
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let url = format!("rtmp://{rtmp}/live/{}", host_key("again"));
    let start = async || {
        server
            .send_json("POST", "/v1/rooms/again/bridge", &admin, &json!({}))
            .await
    };
    let mut ff = ffmpeg_push_colour(&url, "blue", 60);
    wait_until(
        "the RTMP host in the room",
        Duration::from_secs(15),
        async || room_identities(&server, "again").await == ["obs"],
    )
    .await;
    let (s, body) = start().await;
    assert_eq!(s, 201, "{body}");
    wait_bridge(&server, "again").await;
    // The encoder stops: the room ends and its bridge with it.
    ff.kill().await.unwrap();
    let took = time_until_bridge_and_flv_gone(&server, "again", Duration::from_secs(10)).await;
    eprintln!("rtmp host stopped: bridge and FLV gone after {took:?}");
    // The encoder comes back (another picture): a new room, and a new bridge for it.
    let _ff = ffmpeg_push_colour(&url, "red", 60);
    wait_until("the RTMP host back", Duration::from_secs(15), async || {
        room_identities(&server, "again").await == ["obs"]
    })
    .await;
    let (s, body) = start().await;
    assert_eq!(s, 201, "a fresh bridge, not already_running: {body}");
    wait_bridge(&server, "again").await;
    // The output shows the new stream (red), not a leftover black or blue picture.
    let f = common::last_frame(&server, "again", "rtmp-again").await;
    let p = common::pixel(&f, 160, 90);
    assert!(
        common::is_colour(p, (255, 0, 0)),
        "centre of the output: {p:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmp_ingest_host_gone_past_grace_stops_the_bridge_when_on_host_gone_is_stop() {
    let server = bridged_server(&[
        ("COHOST_ROOM__HOST_GRACE", "1s"),
        ("COHOST_BRIDGE__ON_HOST_GONE", "stop"),
    ])
    .await;
    let rtmp = server.rtmp.expect("rtmp listener");
    // A co-host keeps the room alive after the RTMP host goes.
    let _co = Client::join(&server, "grace", "guest", Role::Cohost).await;
    let mut ff = ffmpeg_push(&format!("rtmp://{rtmp}/live/{}", host_key("grace")), 60);
    wait_bridge(&server, "grace").await;
    ff.kill().await.unwrap();
    // The host's grace period (1 s) ends without it: bridge.on_host_gone = stop.
    let took = time_until_bridge_and_flv_gone(&server, "grace", Duration::from_secs(10)).await;
    eprintln!("rtmp host stopped with a co-host seated: bridge gone after {took:?}");
    assert!(
        took >= Duration::from_millis(500),
        "not before the grace period: {took:?}"
    );
    assert_eq!(room_identities(&server, "grace").await, ["guest"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmp_ingest_host_is_passed_through_without_encoding() {
    let server = bridged_server(&[]).await;
    let rtmp = server.rtmp.expect("rtmp listener");
    let (key, _) = cli_stream_key("obspass", "obs", &[]).await;
    let _ff = ffmpeg_push(&format!("rtmp://{rtmp}/live/{key}"), 30);
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let mut last = json!({});
    wait_until(
        "the RTMP host passed through",
        Duration::from_secs(30),
        async || {
            let (_, body) = server.get("/v1/rooms/obspass/bridge", Some(&admin)).await;
            last = serde_json::from_str(body.trim()).unwrap_or(json!({}));
            last["stats"]["path"] == "passthrough"
                && last["stats"]["passthrough_frames"].as_u64() > Some(60)
        },
    )
    .await;
    // x264 baseline from OBS/ffmpeg goes to viewers as it came: nothing encoded, its own size.
    assert_eq!(last["stats"]["encoded_frames"], 0, "{last}");
    assert_eq!(
        (&last["stats"]["width"], &last["stats"]["height"]),
        (&json!(320), &json!(240)),
        "{last}"
    );
}
