//! Pushing the origin's stream to a CDN stand-in: Debian's nginx with libnginx-mod-rtmp on a
//! loopback port, started and stopped by PID. ffprobe reads what nginx serves.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cohost::config::Config;
use cohost::media::flv::{self, Tag};
use cohost::media::h264;
use cohost::rtmp::push::{self, Backoff, PushState};
use openh264::encoder::Encoder;
use openh264::formats::YUVBuffer;

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
            .args(["-v", "error", "-select_streams", "v:0"])
            .args([
                "-show_entries",
                "stream=codec_name,width,height",
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_to_nginx_resumes_after_the_cdn_restarts() {
    let dir = std::env::temp_dir().join(format!("cohost-nginx-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let nginx = Nginx::start(&dir, port).await;

    let mut cfg = Config::default();
    cfg.server.http_listen = "127.0.0.1:0".parse().unwrap();
    cfg.server.rtmp_listen = String::new();
    let server = cohost::app::start(cfg).await.unwrap();
    let origin = server.services.origin.clone();

    // A live 320x240 stream, 30 fps, IDR every second, until the test ends.
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = origin.publish("live1").unwrap();
    let feeder = {
        let stop = stop.clone();
        tokio::task::spawn_blocking(move || {
            let (w, h) = (320usize, 240usize);
            let mut enc = Encoder::new().unwrap();
            let mut sent_config = false;
            let mut i = 0u32;
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if i.is_multiple_of(30) {
                    enc.force_intra_frame();
                }
                let yuv = vec![((i * 7) % 256) as u8; w * h * 3 / 2];
                let bs = enc
                    .encode(&YUVBuffer::from_vec(yuv, w, h))
                    .unwrap()
                    .to_vec();
                let nals = h264::split_annexb(&bs);
                let ts = i * 33;
                if !sent_config {
                    let sps = nals
                        .iter()
                        .find(|x| h264::nal_type(x) == h264::NAL_SPS)
                        .unwrap();
                    let pps = nals
                        .iter()
                        .find(|x| h264::nal_type(x) == h264::NAL_PPS)
                        .unwrap();
                    let cfg = h264::decoder_config(sps, pps).unwrap();
                    publisher.send(Tag {
                        kind: flv::TAG_VIDEO,
                        timestamp_ms: 0,
                        body: flv::avc_sequence_header(&cfg),
                    });
                    sent_config = true;
                }
                let key = nals.iter().any(|x| h264::nal_type(x) == h264::NAL_IDR);
                let slices = nals
                    .iter()
                    .copied()
                    .filter(|x| !matches!(h264::nal_type(x), h264::NAL_SPS | h264::NAL_PPS));
                publisher.send(Tag {
                    kind: flv::TAG_VIDEO,
                    timestamp_ms: ts,
                    body: flv::avc_frame(key, 0, &h264::to_avcc(slices)),
                });
                i += 1;
                let due = start + Duration::from_millis(u64::from(i) * 33);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
            drop(publisher);
        })
    };

    let backoff = Backoff {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(2),
        max_retries: None,
    };
    let url = format!("rtmp://127.0.0.1:{port}/live/cdnkey?sig=secret");
    let push = push::start(origin.clone(), "live1", &url, backoff).unwrap();
    let s = wait_state(&push, PushState::Connected, 0).await;
    assert_eq!(
        s.url,
        format!("rtmp://127.0.0.1:{port}/live/cdnkey"),
        "signature redacted"
    );
    let cdn_url = format!("rtmp://127.0.0.1:{port}/live/cdnkey");
    let text = probe(&cdn_url).await;
    assert!(
        text.contains("codec_name=h264") && text.contains("width=320"),
        "first: {text}"
    );

    // The CDN goes away: the push reports it and keeps retrying; the origin keeps serving.
    nginx.kill().await;
    let s = wait_state(&push, PushState::Retrying, 1).await;
    assert!(s.last_error.is_some());
    assert!(origin.is_live("live1"));
    let flv = probe(&format!("http://{}/live/live1.flv", server.addr)).await;
    assert!(
        flv.contains("codec_name=h264"),
        "origin while the CDN is down: {flv}"
    );

    // The CDN comes back on the same port: the push resumes by itself.
    let nginx = Nginx::start(&dir, port).await;
    let s = wait_state(&push, PushState::Connected, 1).await;
    assert!(s.bytes_sent > 0);
    let text = probe(&cdn_url).await;
    assert!(
        text.contains("codec_name=h264") && text.contains("height=240"),
        "after restart: {text}"
    );

    drop(push);
    stop.store(true, Ordering::Relaxed);
    feeder.await.unwrap();
    nginx.kill().await;
    server.shutdown().await;
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
