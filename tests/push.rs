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
    let dir = std::env::temp_dir().join(format!("cohost-nginx-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let nginx = Nginx::start(&dir, port).await;
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
    for want in [
        "codec_name=h264",
        "width=1280",
        "height=720",
        "r_frame_rate=30/1",
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
        text.contains("codec_name=h264") && text.contains("height=720"),
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
