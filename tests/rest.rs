//! The REST API against unauthenticated and malformed requests (auth before parsing, one
//! error format), and stream-key lifetime caps and revocation.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use cohost::auth::{Role, sign};
use common::{Client, Server};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One raw HTTP/1.1 request; returns (status, body).
async fn raw(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("response")
        .unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The API's error format: `{"error": {"code", "message"}}`.
fn error_code(body: &str) -> String {
    serde_json::from_str::<Value>(body.trim())
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(String::from))
        .unwrap_or_else(|| panic!("not the API's error format: {body:?}"))
}

/// Every authenticated REST route, with a body that does not parse.
const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/rooms"),
    ("GET", "/v1/rooms/r1"),
    ("POST", "/v1/rooms/r1/actions"),
    ("POST", "/v1/rooms/r1/stream-keys"),
    ("DELETE", "/v1/rooms/r1/stream-keys"),
    ("POST", "/v1/streams/r1/signed-url"),
    ("GET", "/v1/rooms/r1/bridge"),
    ("POST", "/v1/rooms/r1/bridge"),
    ("PATCH", "/v1/rooms/r1/bridge"),
    ("DELETE", "/v1/rooms/r1/bridge"),
    // A path that does not decode (invalid UTF-8) is still a 401 first.
    ("PATCH", "/v1/rooms/%FF%FE/bridge"),
];

const BAD_BODIES: &[&str] = &[
    "{\"add_destinations\": 5, \"width\": \"x\"}",
    "not json at all",
    "{\"type\": 7}",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_requests_get_401_before_body_parsing() {
    let server = Server::start().await;
    let _host = Client::join(&server, "r1", "host", Role::Host).await;
    let expired = server.expired_token("r1", "host");
    for (method, path) in ROUTES {
        for body in BAD_BODIES {
            for bearer in [None, Some("garbage.token.here"), Some(expired.as_str())] {
                let (s, resp) = raw(server.addr, method, path, bearer, body).await;
                assert_eq!(s, 401, "{method} {path} {bearer:?} {body}: {resp}");
                let code = error_code(&resp);
                assert!(
                    code == "invalid_token" || code == "token_expired",
                    "{method} {path}: {resp}"
                );
                // Nothing about the schema leaks to a caller without a token.
                for field in ["add_destinations", "width", "identity", "variant", "line"] {
                    assert!(
                        !resp.contains(field),
                        "{method} {path} leaks {field}: {resp}"
                    );
                }
            }
        }
    }
    // A valid token of the wrong room or role: 403, still before parsing.
    let audience = server.token("r1", "viewer", Role::Audience);
    let (s, resp) = raw(
        server.addr,
        "PATCH",
        "/v1/rooms/r1/bridge",
        Some(&audience),
        BAD_BODIES[0],
    )
    .await;
    assert_eq!(s, 403, "{resp}");
    assert_eq!(error_code(&resp), "forbidden");
    // With a valid token, a bad body is a 400 in the API's format (not axum's 422 text).
    let host = server.token("r1", "host", Role::Host);
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    for (method, path) in [
        ("POST", "/v1/rooms/r1/actions"),
        ("POST", "/v1/rooms/r1/stream-keys"),
        ("POST", "/v1/streams/r1/signed-url"),
        ("POST", "/v1/rooms/r1/bridge"),
        ("PATCH", "/v1/rooms/r1/bridge"),
    ] {
        let token = if path.starts_with("/v1/streams") {
            &admin
        } else {
            &host
        };
        for body in BAD_BODIES {
            let (s, resp) = raw(server.addr, method, path, Some(token), body).await;
            assert_eq!(s, 400, "{method} {path} {body}: {resp}");
            assert_eq!(error_code(&resp), "bad_request", "{method} {path}: {resp}");
        }
    }
    let (s, resp) = raw(
        server.addr,
        "PATCH",
        "/v1/rooms/%FF%FE/bridge",
        Some(&admin),
        "{}",
    )
    .await;
    assert_eq!(s, 400, "{resp}");
    assert_eq!(error_code(&resp), "bad_request");
    // The public message feed answers a bad query in the same format.
    let (s, resp) = raw(
        server.addr,
        "GET",
        "/v1/rooms/r1/messages?since=x",
        None,
        "",
    )
    .await;
    assert_eq!(s, 400, "{resp}");
    assert_eq!(error_code(&resp), "bad_request");
    // Bodies over the limit: 413 in the API's format, after the token check.
    let big = format!("{{\"identity\": \"{}\"}}", "a".repeat(100_000));
    let (s, _) = raw(server.addr, "POST", "/v1/rooms/r1/stream-keys", None, &big).await;
    assert_eq!(s, 401);
    let (s, resp) = raw(
        server.addr,
        "POST",
        "/v1/rooms/r1/stream-keys",
        Some(&host),
        &big,
    )
    .await;
    assert_eq!(s, 413, "{resp}");
    assert_eq!(error_code(&resp), "body_too_large");
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_key_ttl_is_capped() {
    let server = Server::start_with(&[
        ("COHOST_ORIGIN__KEY_MAX_TTL", "1h"),
        ("COHOST_ORIGIN__KEY_TTL", "30m"),
        ("COHOST_ORIGIN__SIGN_SECRET", "test-origin-sign-secret"),
    ])
    .await;
    // A host token valid for 60 s asks for a key valid for 100 years.
    let host = server
        .auth
        .mint(
            "cap",
            "host",
            Role::Host,
            Some(std::time::Duration::from_secs(60)),
        )
        .unwrap();
    let (s, body) = server
        .send_json(
            "POST",
            "/v1/rooms/cap/stream-keys",
            &host,
            &json!({"identity": "obs", "ttl": "100years"}),
        )
        .await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(error_code(&body), "key_ttl_too_long");
    assert!(body.contains("origin.key_max_ttl"), "{body}");
    // Signed URLs have the same cap.
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (s, body) = server
        .send_json(
            "POST",
            "/v1/streams/cap/signed-url",
            &admin,
            &json!({"ttl": "2h"}),
        )
        .await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(error_code(&body), "key_ttl_too_long");
    // Within the cap.
    let (s, body) = server
        .send_json(
            "POST",
            "/v1/rooms/cap/stream-keys",
            &host,
            &json!({"identity": "obs", "ttl": "30m"}),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    let v: Value = serde_json::from_str(body.trim()).unwrap();
    let expires = v["expires"].as_u64().unwrap();
    assert!(expires <= now() + 1800 + 5, "{v}");
    // The CLI refuses too.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cohost"))
        .args([
            "token",
            "--room",
            "cap",
            "--identity",
            "obs",
            "--role",
            "host",
        ])
        .args(["--stream-key", "--ttl", "36500days"])
        .env_remove("COHOST_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("origin.key_max_ttl"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_stream_keys_can_be_revoked() {
    let server = Server::start().await;
    let host = server.token("rev", "host", Role::Host);
    let mint = async |token: &str| {
        let (s, body) = server
            .send_json(
                "POST",
                "/v1/rooms/rev/stream-keys",
                token,
                &json!({"identity": "obs", "ttl": "10m"}),
            )
            .await;
        assert_eq!(s, 201, "{body}");
        let v: Value = serde_json::from_str(body.trim()).unwrap();
        v["stream_key"].as_str().unwrap().to_string()
    };
    let old = mint(&host).await;
    // Only the room's host or an admin may revoke.
    for token in [
        server.token("rev", "viewer", Role::Audience),
        server.token("rev", "guest", Role::Cohost),
        server.token("other", "host", Role::Host),
    ] {
        let (s, body) = raw(
            server.addr,
            "DELETE",
            "/v1/rooms/rev/stream-keys",
            Some(&token),
            "",
        )
        .await;
        assert_eq!(s, 403, "{body}");
    }
    let (s, body) = raw(
        server.addr,
        "DELETE",
        "/v1/rooms/rev/stream-keys",
        Some(&host),
        "",
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(body.trim()).unwrap();
    let revoked_before = v["revoked_before"].as_u64().unwrap();
    let g_old = sign::verify_stream_key(cohost::config::DEV_SECRET.as_bytes(), &old, now())
        .expect("the MAC is still valid; revocation is the server's list");
    assert!(g_old.issued <= revoked_before);
    // A key minted right after (same second or not) is issued after the revocation.
    let new = mint(&host).await;
    let g_new =
        sign::verify_stream_key(cohost::config::DEV_SECRET.as_bytes(), &new, now()).unwrap();
    assert!(g_new.issued > revoked_before, "{new}");
}

/// ffmpeg publishing test pictures for `secs` seconds, in real time.
fn ffmpeg_push(url: &str, secs: u32) -> tokio::process::Child {
    tokio::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-re"])
        .args(["-f", "lavfi", "-i", "testsrc=size=160x120:rate=15"])
        .args(["-t", &secs.to_string()])
        .args(["-c:v", "libx264", "-profile:v", "baseline", "-bf", "0"])
        .args([
            "-pix_fmt",
            "yuv420p",
            "-preset",
            "ultrafast",
            "-f",
            "flv",
            url,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("ffmpeg")
}

/// A revoked key is refused at publish, and a publisher live on a key that gets revoked is
/// disconnected (RTMP ingest selects on `StreamKeys::revoked`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_stream_key_cannot_publish_and_live_publisher_is_dropped() {
    let server = Server::start().await;
    let rtmp = server.rtmp.expect("rtmp listener");
    let host = server.token("revrtmp", "host", Role::Host);
    let _h = Client::join(&server, "revrtmp", "host", Role::Host).await;
    let (s, body) = server
        .send_json(
            "POST",
            "/v1/rooms/revrtmp/stream-keys",
            &host,
            &json!({"identity": "obs", "role": "cohost", "ttl": "10m"}),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    let v: Value = serde_json::from_str(body.trim()).unwrap();
    let key = v["stream_key"].as_str().unwrap().to_string();
    let mut live = ffmpeg_push(&format!("rtmp://{rtmp}/live/{key}"), 30);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (s, _) = raw(
        server.addr,
        "DELETE",
        "/v1/rooms/revrtmp/stream-keys",
        Some(&host),
        "",
    )
    .await;
    assert_eq!(s, 200);
    let started = Instant::now();
    let st = tokio::time::timeout(Duration::from_secs(10), live.wait())
        .await
        .expect("the live publisher is disconnected")
        .unwrap();
    assert!(!st.success(), "after {:?}", started.elapsed());
    let out = ffmpeg_push(&format!("rtmp://{rtmp}/live/{key}"), 3)
        .wait_with_output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("key_revoked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
