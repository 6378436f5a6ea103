//! Server-level behaviour: network configuration (port range, NAT IP, ICE servers, ICE-TCP),
//! startup refusal with the development secret, graceful shutdown, hostile signaling input.

mod common;

use std::time::{Duration, Instant};

use cohost::auth::Role;
use common::{Client, Server, Signal};
use serde_json::{Value, json};

/// Server candidates trickled for the publisher connection after publishing.
async fn publisher_candidates(c: &mut Client) -> Vec<String> {
    let mut out = vec![];
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let r = tokio::time::timeout(Duration::from_millis(500), c.sig.events.recv()).await;
        match r {
            Ok(Some(v)) if v["type"] == "candidate" && v["target"] == "publisher" => {
                let s = v["candidate"]["candidate"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                if s.is_empty() {
                    break;
                }
                out.push(s);
            }
            Ok(Some(_)) => {}
            _ => {
                if !out.is_empty() {
                    break;
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_ports_come_from_the_configured_range_and_nat_ip_is_announced() {
    let server = Server::start_with(&[
        ("COHOST_WEBRTC__UDP_PORT_MIN", "47100"),
        ("COHOST_WEBRTC__UDP_PORT_MAX", "47109"),
        ("COHOST_WEBRTC__PUBLIC_IPS", r#"["127.0.0.2"]"#),
    ])
    .await;
    let mut c = Client::join(&server, "nat", "a", Role::Host).await;
    c.publish(None).await.unwrap();
    let cands = publisher_candidates(&mut c).await;
    assert!(!cands.is_empty(), "no server candidates trickled");
    for cand in &cands {
        // candidate:<foundation> <component> <proto> <priority> <ip> <port> typ <type>
        let f: Vec<&str> = cand.split_whitespace().collect();
        let (ip, port): (&str, u16) = (f[4], f[5].parse().unwrap());
        assert_eq!(
            ip, "127.0.0.2",
            "public IP must replace the local one: {cand}"
        );
        assert!(
            (47100..=47109).contains(&port),
            "port outside range: {cand}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_port_range_is_a_clear_error_not_a_crash() {
    let server = Server::start_with(&[
        ("COHOST_WEBRTC__UDP_PORT_MIN", "47120"),
        ("COHOST_WEBRTC__UDP_PORT_MAX", "47120"),
    ])
    .await;
    let mut a = Client::join(&server, "ports", "a", Role::Host).await;
    a.publish(None).await.unwrap();
    let mut b = Client::join(&server, "ports", "b", Role::Cohost).await;
    let err = b.publish(None).await.expect_err("no port left");
    assert_eq!(err["error"]["code"], "internal", "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("UDP port"),
        "{err}"
    );
    let (s, _) = server.get("/healthz", None).await;
    assert_eq!(s, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_response_hands_out_configured_ice_servers() {
    let server = Server::start_with(&[(
        "COHOST_WEBRTC__ICE_SERVERS",
        r#"[{urls=["turn:turn.example.org:3478?transport=udp"], username="u", credential="p"}]"#,
    )])
    .await;
    let c = Client::join(&server, "ice", "a", Role::Host).await;
    let s = &c.join["ice_servers"][0];
    assert_eq!(s["urls"][0], "turn:turn.example.org:3478?transport=udp");
    assert_eq!(s["username"], "u");
    assert_eq!(s["credential"], "p");
    assert_eq!(c.join["version"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ice_tcp_candidates_are_offered_when_enabled() {
    let server = Server::start_with(&[("COHOST_WEBRTC__ICE_TCP", "true")]).await;
    let mut c = Client::join(&server, "tcp", "a", Role::Host).await;
    c.publish(None).await.unwrap();
    let cands = publisher_candidates(&mut c).await;
    assert!(
        cands.iter().any(|c| c.to_lowercase().contains(" tcp ")),
        "no TCP candidate in {cands:?}"
    );
    assert!(cands.iter().any(|c| c.to_lowercase().contains(" udp ")));
}

#[tokio::test]
async fn dev_secret_on_a_public_address_refuses_to_start() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cohost"))
        .args(["serve", "--listen", "0.0.0.0:0", "--rtmp-listen", ""])
        .env_remove("COHOST_CONFIG")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("development secret"), "{err}");
}

#[tokio::test]
async fn token_command_mints_a_verifiable_token() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cohost"))
        .args([
            "token",
            "--room",
            "demo",
            "--identity",
            "alice",
            "--role",
            "host",
            "--ttl",
            "10m",
        ])
        .env_remove("COHOST_CONFIG")
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap();
    let auth = cohost::auth::Authenticator::new(&Default::default()).unwrap();
    let c = auth.verify_for_room(token.trim(), "demo").unwrap();
    assert_eq!(c.sub, "alice");
    assert!(c.exp - c.iat == 600);
    let bad = tokio::process::Command::new(env!("CARGO_BIN_EXE_cohost"))
        .args([
            "token",
            "--room",
            "demo",
            "--identity",
            "a",
            "--role",
            "king",
        ])
        .output()
        .await
        .unwrap();
    assert!(!bad.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_connections_and_exits() {
    let mut server = Server::start().await;
    let mut a = Client::join(&server, "bye", "a", Role::Host).await;
    a.publish(None).await.unwrap();
    let pid = server.pid().unwrap();
    let st = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(a.sig.wait_closed().await.0, 1001);
    let status = tokio::time::timeout(Duration::from_secs(10), server.wait())
        .await
        .expect("server did not exit");
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_never_break_the_server() {
    let server = Server::start().await;
    let mut good = Client::join(&server, "h", "good", Role::Host).await;
    good.publish(None).await.unwrap();
    let tag = good.publication.as_ref().unwrap().tag_audio;
    let watcher = Client::watch(&server, "h", "watcher").await;
    watcher.wait_packets(tag, 10).await;
    // A joined attacker and an unjoined one each send junk.
    let token = server.token("h", "evil", Role::Cohost);
    let evil = Signal::connect(&server.ws_url()).await;
    let r = evil.request(json!({"type":"join","token":token})).await;
    assert_eq!(r["type"], "response");
    let anon = Signal::connect(&server.ws_url()).await;
    let junk: Vec<String> = vec![
        "".into(),
        "null".into(),
        "[]".into(),
        "42".into(),
        r#"{"type":null}"#.into(),
        r#"{"type":"publish","sdp":12}"#.into(),
        r#"{"type":"publish","sdp":"v=0\r\no=- 0 0 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"}"#.into(),
        r#"{"type":"answer","offer_id":-1,"sdp":""}"#.into(),
        r#"{"type":"candidate","target":"publisher","candidate":{"candidate":"garbage"}}"#.into(),
        r#"{"type":"candidate","target":"nowhere","candidate":{}}"#.into(),
        r#"{"type":"request_keyframe","track_id":"TR_nope"}"#.into(),
        "\u{0}\u{1}\u{2}".into(),
        format!("{{\"type\":\"join\",\"token\":\"{}\"}}", "A".repeat(60_000)),
        "{\"a\":".repeat(1000),
    ];
    for j in &junk {
        evil.send_raw(j.clone());
        anon.send_raw(j.clone());
    }
    let r = evil.request(json!({"type":"ping"})).await;
    assert_eq!(r["type"], "response", "evil connection still answered: {r}");
    // The room's media kept flowing throughout.
    let before = watcher
        .received
        .lock()
        .unwrap()
        .values()
        .map(|e| e.packets)
        .sum::<u64>();
    watcher.wait_packets(tag, 10 + 50).await;
    let after = watcher
        .received
        .lock()
        .unwrap()
        .values()
        .map(|e| e.packets)
        .sum::<u64>();
    assert!(after > before);
    let (s, body) = server.get("/healthz", None).await;
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(body.trim()).unwrap_or(json!({}));
    assert_eq!(v["status"], "ok");
}

/// POST a development token request; returns (status, JSON body).
async fn dev_token(server: &Server, body: Value) -> (u16, Value) {
    // The endpoint ignores Authorization; the helper always sends one.
    let (status, text) = server
        .send_json("POST", "/v1/dev/token", "unused", &body)
        .await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test]
async fn dev_token_endpoint_mints_room_tokens_on_loopback_but_never_admin() {
    let server = Server::start().await;
    let (status, body) = server.get("/v1/dev/token", None).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"enabled\":true"), "{body}");
    for role in ["host", "cohost", "audience"] {
        let (status, body) = dev_token(
            &server,
            json!({"room": "demo", "identity": "alice", "role": role}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let token = body["token"].as_str().expect("token");
        let claims = server.auth.verify_for_room(token, "demo").expect("valid");
        assert_eq!(claims.sub, "alice");
        assert_eq!(claims.role.as_str(), role);
    }
    let (status, body) = dev_token(
        &server,
        json!({"room": "*", "identity": "ops", "role": "admin"}),
    )
    .await;
    assert_eq!(status, 400, "admin is refused: {body}");
    assert_eq!(body["error"]["code"], "bad_request");
    let (status, body) = dev_token(
        &server,
        json!({"room": "demo", "identity": "no spaces!", "role": "host"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = dev_token(&server, json!({"room": "demo"})).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn dev_token_endpoint_is_off_with_a_real_secret_or_when_configured_off() {
    for env in [
        [("COHOST_AUTH__SECRET", "a-real-secret-that-is-long-enough")],
        [("COHOST_SERVER__DEV_TOKENS", "off")],
    ] {
        let server = Server::start_with(&env).await;
        let (status, body) = server.get("/v1/dev/token", None).await;
        assert_eq!(status, 200);
        assert!(body.contains("\"enabled\":false"), "{env:?}: {body}");
        let (status, body) = dev_token(
            &server,
            json!({"room": "demo", "identity": "alice", "role": "host"}),
        )
        .await;
        assert_eq!(status, 404, "{env:?}: {body}");
        assert_eq!(body["error"]["code"], "dev_tokens_off");
        assert!(body.get("token").is_none());
    }
}

#[tokio::test]
async fn vendor_mpegts_says_how_to_install_it_when_missing() {
    let empty = tempfile_dir("cohost-empty-web");
    let dir = empty.to_string_lossy().to_string();
    let server = Server::start_with(&[("COHOST_SERVER__WEB_DIR", &dir)]).await;
    let (status, body) = server.get("/vendor/mpegts.js", None).await;
    assert_eq!(status, 404);
    assert!(body.contains("npm ci --prefix web"), "{body}");
    drop(server);
    let _ = std::fs::remove_dir_all(&empty);
}

fn tempfile_dir(prefix: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
