//! The bridge pushing a room's mixed stream to a CDN stand-in: Debian's nginx with
//! libnginx-mod-rtmp on a loopback port, started and stopped by PID. ffprobe reads what nginx
//! serves.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cohost::auth::Role;
use cohost::rtmp::push::{self, Backoff, PushState};
use common::{Client, Server};
use serde_json::{Value, json};

struct Nginx {
    child: tokio::process::Child,
}

fn nginx_conf(dir: &Path, port: u16) -> PathBuf {
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "load_module /usr/lib/nginx/modules/ngx_rtmp_module.so;\n\
             daemon off;\nmaster_process off;\n\
             error_log {dir}/error.log info;\npid {dir}/nginx.pid;\n\
             events {{ worker_connections 64; }}\n\
             rtmp {{ server {{ listen 127.0.0.1:{port}; chunk_size 4096;\n\
               application live {{ live on; record off; }} }} }}\n",
            dir = dir.display()
        ),
    )
    .unwrap();
    conf
}

impl Nginx {
    /// nginx-rtmp in a fresh directory on a free loopback port.
    async fn start_fresh(name: &str) -> (Nginx, PathBuf, u16) {
        let dir = std::env::temp_dir().join(format!("cohost-{name}-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        let port = free_port();
        let nginx = Nginx::start(&dir, port).await;
        (nginx, dir, port)
    }

    async fn start(dir: &Path, port: u16) -> Nginx {
        let conf = nginx_conf(dir, port);
        let child = tokio::process::Command::new("nginx")
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .kill_on_drop(true)
            .spawn()
            .expect("nginx (Debian nginx + libnginx-mod-rtmp) must be installed");
        // Ready when the port accepts connections.
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "nginx did not start: see {}",
                dir.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Nginx { child }
    }

    async fn kill(mut self) {
        let _ = self.child.kill().await;
        let _ = self.child.wait().await;
    }
}

async fn probe(url: &str) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new("ffprobe")
            .args(["-v", "error"])
            .args([
                "-show_entries",
                "stream=codec_name,width,height,r_frame_rate,sample_rate",
                "-of",
                "default=nw=1",
                url,
            ])
            .output(),
    )
    .await
    .expect("ffprobe finished")
    .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn wait_state(p: &push::Push, want: PushState, min_retries: u64) -> push::PushStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = p.status();
        if s.state == want && s.retries >= min_retries {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "push never reached {want:?}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The bridge's destination state, polled over the REST API until `pred` holds.
async fn wait_destination(
    server: &Server,
    token: &str,
    room: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = server
            .get(&format!("/v1/rooms/{room}/bridge"), Some(token))
            .await;
        let v: Value = serde_json::from_str(body.trim()).unwrap_or(json!({}));
        let d = &v["destinations"][0];
        if pred(d) {
            return d.clone();
        }
        assert!(Instant::now() < deadline, "destination never {what}: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_push_to_nginx_resumes_after_the_cdn_restarts() {
    let (nginx, dir, port) = Nginx::start_fresh("nginx").await;
    // Quick retries so the test sees a reconnect within seconds.
    let server = Server::start_with(&[
        ("COHOST_BRIDGE__RECONNECT_INITIAL", "200ms"),
        ("COHOST_BRIDGE__RECONNECT_MAX", "1s"),
    ])
    .await;
    let mut host = Client::join(&server, "cdn", "host", Role::Host).await;
    host.publish_real((30, 200, 30), 500.0).await.unwrap();
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (s, body) = server
        .send_json("POST", "/v1/rooms/cdn/bridge", &admin, &json!({}))
        .await;
    assert_eq!(s, 201, "{body}");
    // A destination added while the bridge runs; its stream key never shows in the status.
    let url = format!("rtmp://127.0.0.1:{port}/live/cdnkey?sig=secret");
    let (s, body) = server
        .send_json(
            "PATCH",
            "/v1/rooms/cdn/bridge",
            &admin,
            &json!({"add_destinations": [url]}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert!(!body.contains("secret"), "signature redacted: {body}");
    let d = wait_destination(&server, &admin, "cdn", "connected", |d| {
        d["state"] == "connected"
    })
    .await;
    assert_eq!(d["url"], format!("rtmp://127.0.0.1:{port}/live/cdnkey"));
    let cdn_url = format!("rtmp://127.0.0.1:{port}/live/cdnkey");
    let text = probe(&cdn_url).await;
    // The host alone is passed through: its own size (320x240) and frame rate (~16 fps, which
    // ffprobe does not guess from a few FLV tags; the mix would be 30/1).
    for want in [
        "codec_name=h264",
        "width=320",
        "height=240",
        "codec_name=aac",
        "sample_rate=48000",
    ] {
        assert!(text.contains(want), "{want} from the CDN: {text}");
    }

    // The CDN goes away: the destination reports it and keeps retrying; the origin keeps
    // serving.
    nginx.kill().await;
    let d = wait_destination(&server, &admin, "cdn", "retrying", |d| {
        d["state"] == "retrying" && d["retries"].as_u64() >= Some(1)
    })
    .await;
    assert!(d["last_error"].is_string(), "{d}");
    let flv = probe(&format!("http://{}/live/cdn.flv", server.addr)).await;
    assert!(
        flv.contains("codec_name=h264") && flv.contains("codec_name=aac"),
        "origin while the CDN is down: {flv}"
    );

    // The CDN comes back on the same port: the push resumes by itself.
    let nginx = Nginx::start(&dir, port).await;
    let d = wait_destination(&server, &admin, "cdn", "connected again", |d| {
        d["state"] == "connected" && d["retries"].as_u64() >= Some(1)
    })
    .await;
    assert!(d["bytes_sent"].as_u64() > Some(0), "{d}");
    let text = probe(&cdn_url).await;
    assert!(
        text.contains("codec_name=h264") && text.contains("height=240"),
        "after restart: {text}"
    );

    // Removing it leaves the bridge running without destinations.
    let (s, body) = server
        .send_json(
            "PATCH",
            "/v1/rooms/cdn/bridge",
            &admin,
            &json!({"remove_destinations": [url]}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(body.trim()).unwrap();
    assert_eq!(v["destinations"], json!([]), "{v}");
    nginx.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_destination_is_reported_not_fatal() {
    let origin = cohost::rtmp::origin::Origin::new();
    let _p = origin.publish("s").unwrap();
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let backoff = Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(100),
        max_retries: Some(2),
    };
    let push = push::start(
        origin.clone(),
        "s",
        &format!("rtmp://127.0.0.1:{port}/live/x"),
        backoff,
    )
    .unwrap();
    let s = wait_state(&push, PushState::Failed, 2).await;
    assert!(
        s.last_error.unwrap().contains("connect"),
        "error names the cause"
    );
    assert!(push::start(origin, "s", "http://nope", Backoff::default()).is_err());
}

/// The bridge's status over REST: (HTTP status, JSON).
async fn bridge_status(server: &Server, token: &str, room: &str) -> Value {
    let (_, body) = server
        .get(&format!("/v1/rooms/{room}/bridge"), Some(token))
        .await;
    serde_json::from_str(body.trim()).unwrap_or(json!({}))
}

/// Poll the first destination until `pred` holds (20 s).
async fn wait_dest(
    server: &Server,
    token: &str,
    room: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    wait_destination(server, token, room, what, pred).await
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_destination_on_loopback_is_refused_for_host() {
    let server = Server::start().await;
    let _host = Client::join(&server, "ssrf", "host", Role::Host).await;
    let host = server.token("ssrf", "host", Role::Host);
    // A listener the server must never reach: it counts connections.
    let trap = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = trap.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while trap.accept().await.is_ok() {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    // Literal internal addresses are refused when asked for, before anything starts.
    for url in [
        format!("rtmp://127.0.0.1:{port}/live/x"),
        "rtmp://127.0.0.1:1/live/x".to_string(),
        format!("rtmp://[::1]:{port}/live/x"),
        format!("rtmp://0.0.0.0:{port}/live/x"),
        format!("rtmp://[::ffff:127.0.0.1]:{port}/live/x"),
    ] {
        let (s, body) = server
            .send_json(
                "POST",
                "/v1/rooms/ssrf/bridge",
                &host,
                &json!({"destinations": [url]}),
            )
            .await;
        assert_eq!(s, 400, "{url}: {body}");
        assert!(body.contains("destination_refused"), "{url}: {body}");
        assert!(!body.contains("os error"), "{body}");
    }
    let (s, body) = server
        .send_json("POST", "/v1/rooms/ssrf/bridge", &host, &json!({}))
        .await;
    assert_eq!(s, 201, "{body}");
    let (s, body) = server
        .send_json(
            "PATCH",
            "/v1/rooms/ssrf/bridge",
            &host,
            &json!({"add_destinations": [format!("rtmp://127.0.0.1:{port}/live/x")]}),
        )
        .await;
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("destination_refused"), "{body}");
    // Names are checked on what they resolve to, right before the connect: `localhost` and
    // `127.1` pass the request but are never connected to.
    for (i, host_name) in ["localhost", "127.1"].iter().enumerate() {
        let url = format!("rtmp://{host_name}:{port}/live/x{i}");
        let (s, body) = server
            .send_json(
                "PATCH",
                "/v1/rooms/ssrf/bridge",
                &host,
                &json!({"add_destinations": [url], "remove_destinations": []}),
            )
            .await;
        assert_eq!(s, 200, "{body}");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = bridge_status(&server, &host, "ssrf").await;
        let d = v["destinations"].as_array().cloned().unwrap_or_default();
        if d.len() == 2
            && d.iter()
                .all(|d| d["last_error"] == "refused_by_policy" && d["retries"].as_u64() >= Some(2))
        {
            break;
        }
        assert!(Instant::now() < deadline, "never refused by policy: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the server connected to a loopback port for a host"
    );
    // An admin is trusted (bridge.admin_destinations_trusted): the same URL is accepted.
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (s, body) = server
        .send_json(
            "PATCH",
            "/v1/rooms/ssrf/bridge",
            &admin,
            &json!({"add_destinations": [format!("rtmp://127.0.0.1:{port}/live/x")]}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_cap_is_enforced() {
    let server = Server::start_with(&[("COHOST_BRIDGE__MAX_DESTINATIONS", "2")]).await;
    let _host = Client::join(&server, "cap", "host", Role::Host).await;
    // Admin: trusted with loopback, so the cap is what is tested (nothing listens there).
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let port = free_port();
    let url = |i: usize| format!("rtmp://127.0.0.1:{port}/live/k{i}");
    let (s, body) = server
        .send_json(
            "POST",
            "/v1/rooms/cap/bridge",
            &admin,
            &json!({"destinations": [url(1), url(2), url(3)]}),
        )
        .await;
    assert_eq!(s, 400, "{body}");
    assert!(
        body.contains("too_many_destinations") && body.contains("bridge.max_destinations"),
        "{body}"
    );
    let (s, body) = server
        .send_json(
            "POST",
            "/v1/rooms/cap/bridge",
            &admin,
            &json!({"destinations": [url(1)]}),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    // One PATCH with 200 destinations (the report's attack) adds none of them.
    let many: Vec<String> = (10..210).map(url).collect();
    let (s, body) = server
        .send_json(
            "PATCH",
            "/v1/rooms/cap/bridge",
            &admin,
            &json!({"add_destinations": many}),
        )
        .await;
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("too_many_destinations"), "{body}");
    let (s, body) = server
        .send_json(
            "PATCH",
            "/v1/rooms/cap/bridge",
            &admin,
            &json!({"add_destinations": [url(2)]}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let (s, _) = server
        .send_json(
            "PATCH",
            "/v1/rooms/cap/bridge",
            &admin,
            &json!({"add_destinations": [url(3)]}),
        )
        .await;
    assert_eq!(s, 400);
    // Removing one makes room for another in the same request.
    let (s, body) = server
        .send_json(
            "PATCH",
            "/v1/rooms/cap/bridge",
            &admin,
            &json!({"add_destinations": [url(3)], "remove_destinations": [url(1)]}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let v = bridge_status(&server, &admin, "cap").await;
    assert_eq!(v["destinations"].as_array().map(Vec::len), Some(2), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_status_does_not_leak_os_errors() {
    // Loopback allowed for hosts by the operator, so that a host's destination really
    // connects (to a closed port) and fails with an OS error.
    let server = Server::start_with(&[
        ("COHOST_BRIDGE__DESTINATION_ALLOW", "[\"127.0.0.0/8\"]"),
        ("COHOST_BRIDGE__RECONNECT_INITIAL", "100ms"),
        ("COHOST_BRIDGE__RECONNECT_MAX", "200ms"),
    ])
    .await;
    let _host = Client::join(&server, "leak", "host", Role::Host).await;
    let host = server.token("leak", "host", Role::Host);
    let port = free_port();
    let (s, body) = server
        .send_json(
            "POST",
            "/v1/rooms/leak/bridge",
            &host,
            &json!({"destinations": [format!("rtmp://127.0.0.1:{port}/live/k")]}),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    let d = wait_dest(&server, &host, "leak", "failing", |d| {
        d["retries"].as_u64() >= Some(1)
    })
    .await;
    assert_eq!(d["last_error"], "connect_failed", "{d}");
    let (_, raw) = server.get("/v1/rooms/leak/bridge", Some(&host)).await;
    for leak in ["os error", "refused", "Connection", "last_error_detail"] {
        assert!(!raw.contains(leak), "host sees {leak:?}: {raw}");
    }
    // The operator still sees what happened.
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let v = bridge_status(&server, &admin, "leak").await;
    let detail = v["destinations"][0]["last_error_detail"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(detail.contains("refused"), "admin detail: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_parameters_above_operator_caps_are_refused() {
    let server = Server::start_with(&[("COHOST_BRIDGE__MAX_FPS", "30")]).await;
    let _host = Client::join(&server, "caps", "host", Role::Host).await;
    let host = server.token("caps", "host", Role::Host);
    for (req, key) in [
        (json!({"width": 3840, "height": 3840}), "bridge.max_width"),
        (json!({"height": 2160}), "bridge.max_height"),
        (json!({"fps": 60}), "bridge.max_fps"),
        (
            json!({"video_bitrate": 4_000_000_000u32}),
            "bridge.max_video_bitrate",
        ),
        (
            json!({"audio_bitrate": 1_000_000}),
            "bridge.max_audio_bitrate",
        ),
    ] {
        let (s, body) = server
            .send_json("POST", "/v1/rooms/caps/bridge", &host, &req)
            .await;
        assert_eq!(s, 400, "{req}: {body}");
        assert!(
            body.contains("over_limit") && body.contains(key),
            "{req}: {body}"
        );
    }
    assert_eq!(
        server.get("/v1/rooms/caps/bridge", Some(&host)).await.0,
        404
    );
    // Within the caps it starts.
    let (s, body) = server
        .send_json(
            "POST",
            "/v1/rooms/caps/bridge",
            &host,
            &json!({"width": 640, "height": 360, "fps": 30}),
        )
        .await;
    assert_eq!(s, 201, "{body}");
}

/// Sends SIGCONT on drop, so a failing test never leaves nginx stopped.
struct Stopped(u32);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_cdn_is_detected_and_reconnected() {
    let (nginx, dir, port) = Nginx::start_fresh("nginx-frozen").await;
    let pid = nginx.child.id().expect("nginx pid");
    let server = Server::start_with(&[
        ("COHOST_BRIDGE__RECONNECT_INITIAL", "200ms"),
        ("COHOST_BRIDGE__RECONNECT_MAX", "1s"),
        ("COHOST_BRIDGE__STALL_TIMEOUT", "2s"),
    ])
    .await;
    let mut host = Client::join(&server, "frozen", "host", Role::Host).await;
    host.publish_real((30, 200, 30), 500.0).await.unwrap();
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (s, body) = server
        .send_json(
            "POST",
            "/v1/rooms/frozen/bridge",
            &admin,
            &json!({"destinations": [format!("rtmp://127.0.0.1:{port}/live/frozen")]}),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    let d = wait_dest(&server, &admin, "frozen", "connected", |d| {
        d["state"] == "connected" && d["bytes_sent"].as_u64() > Some(100_000)
    })
    .await;
    let before = d["bytes_sent"].as_u64().unwrap_or(0);

    // Freeze the CDN: its kernel still accepts bytes until the buffers fill, then nothing.
    let status = std::process::Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let stopped = Stopped(pid);
    let t0 = Instant::now();
    let d = wait_dest(&server, &admin, "frozen", "reported stalled", |d| {
        d["state"] != "connected" && d["stalls"].as_u64() >= Some(1)
    })
    .await;
    let detected = t0.elapsed();
    eprintln!("frozen CDN detected after {detected:?}: {d}");
    assert!(
        detected < Duration::from_secs(12),
        "stall noticed after {detected:?}"
    );
    assert!(d["bytes_sent"].as_u64() >= Some(before), "{d}");

    // Thawed: the push reconnects by itself (backoff) and sends again.
    drop(stopped);
    let t1 = Instant::now();
    let d = wait_dest(&server, &admin, "frozen", "connected again", |d| {
        d["state"] == "connected" && d["retries"].as_u64() >= Some(1)
    })
    .await;
    eprintln!("reconnected {:?} after SIGCONT: {d}", t1.elapsed());
    let text = probe(&format!("rtmp://127.0.0.1:{port}/live/frozen")).await;
    assert!(text.contains("codec_name=h264"), "after thaw: {text}");
    nginx.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The CDN relays the stream through passthrough ↔ mixing switches as one stream: nginx-rtmp
/// (with its own buffering and GOP handling) passes it on, and what a player pulls from it
/// has one picture size and decodes without an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdn_relay_sees_one_resolution_through_passthrough_and_mixing_switches() {
    let (nginx, dir, port) = Nginx::start_fresh("nginx-sw").await;
    let server = Server::start_with(&[("COHOST_BRIDGE__SOLO_IDLE", "1s")]).await;
    let mut host = Client::join(&server, "relay", "host", Role::Host).await;
    host.publish_real((220, 30, 30), 440.0).await.unwrap();
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let url = format!("rtmp://127.0.0.1:{port}/live/relay");
    let (s, body) = server
        .send_json(
            "POST",
            "/v1/rooms/relay/bridge",
            &admin,
            &json!({"destinations": [url]}),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    wait_destination(&server, &admin, "relay", "connected", |d| {
        d["state"] == "connected"
    })
    .await;
    // A player on the CDN records what it gets while a co-host comes and goes.
    let rec = dir.join("relay.flv");
    let mut player = tokio::process::Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-i", &url, "-t", "14", "-c", "copy"])
        .arg(&rec)
        .kill_on_drop(true)
        .spawn()
        .expect("ffmpeg (Debian) must be installed");
    let path = async |want: &str| {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let v = bridge_status(&server, &admin, "relay").await;
            if v["stats"]["path"] == want {
                return v;
            }
            assert!(Instant::now() < deadline, "waiting for {want}: {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    path("passthrough").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut guest = Client::join(&server, "relay", "guest", Role::Cohost).await;
    guest.publish_real((30, 30, 220), 660.0).await.unwrap();
    path("mixing").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    guest.leave().await;
    drop(guest);
    let v = path("passthrough").await;
    assert!(v["stats"]["switches"].as_u64() >= Some(2), "{v}");
    let status = tokio::time::timeout(Duration::from_secs(30), player.wait())
        .await
        .expect("the recording ends")
        .unwrap();
    assert!(status.success(), "ffmpeg recording from nginx failed");
    let probe = tokio::process::Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v"])
        .args(["-show_entries", "frame=width,height", "-of", "csv=p=0"])
        .arg(&rec)
        .output()
        .await
        .unwrap();
    let frames: Vec<String> = String::from_utf8_lossy(&probe.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    let sizes: std::collections::BTreeSet<&String> = frames.iter().collect();
    assert!(frames.len() > 150, "{} pictures from the CDN", frames.len());
    assert_eq!(sizes.len(), 1, "one picture size from the CDN: {sizes:?}");
    let decode = tokio::process::Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(&rec)
        .args(["-f", "null", "-"])
        .output()
        .await
        .unwrap();
    let errors = String::from_utf8_lossy(&decode.stderr);
    assert!(
        decode.status.success() && errors.trim().is_empty(),
        "{errors}"
    );
    nginx.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
}
