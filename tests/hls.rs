//! HLS and LL-HLS from the embedded origin, over real sockets: a stream published into the
//! origin (frames from the bridge's own H.264 and AAC encoders, in real time) is read back as
//! HLS by ffmpeg and by hand-written requests (blocking reloads, preload hints, signed URLs,
//! limits).

use std::sync::Arc;
use std::time::{Duration, Instant};

use cohost::bridge::compose::{I420, Yuv};
use cohost::bridge::encode::{AacEncoder, H264Encoder};
use cohost::config::Config;
use cohost::media::flv::{self, Tag};
use cohost::rtmp::origin::Origin;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const W: u32 = 320;
const H: u32 = 240;

/// 4 s of 30 fps video (a keyframe every 2 s) and 48 kHz mono AAC, encoded once and looped.
struct Media {
    avc_config: Vec<u8>,
    video: Vec<(bool, Vec<u8>)>,
    asc: Vec<u8>,
    audio: Vec<Vec<u8>>,
}

fn media() -> &'static Media {
    static M: std::sync::OnceLock<Media> = std::sync::OnceLock::new();
    M.get_or_init(|| {
        let mut enc = H264Encoder::new(W, H, 30.0, 400_000, 60).unwrap();
        let mut avc_config = vec![];
        let mut video = vec![];
        for i in 0..120 {
            // A red picture with a moving bar, so frames differ.
            let mut pic = I420::new(W, H, Yuv(81, 90, 240));
            let x = (i * 2) % (W as usize - 16);
            for row in 0..H as usize {
                for c in 0..16 {
                    pic.y[row * W as usize + x + c] = 235;
                }
            }
            let v = enc.encode(&pic).unwrap();
            if let Some(c) = &v.config {
                avc_config = c.clone();
            }
            video.push((v.keyframe, v.avcc));
        }
        let mut aac = AacEncoder::new(48_000, false, 64_000).unwrap();
        let pcm: Vec<i16> = (0..48_000 * 4)
            .map(|n| ((n as f32 * 440.0 * std::f32::consts::TAU / 48_000.0).sin() * 8000.0) as i16)
            .collect();
        let audio = aac.push(&pcm).unwrap();
        Media {
            avc_config,
            video,
            asc: aac.asc.clone(),
            audio,
        }
    })
}

/// Publish `name` into the origin in real time until the task is aborted (the stream ends
/// when it is: the publisher is dropped with it).
fn publish(origin: Arc<Origin>, name: &str) -> tokio::task::JoinHandle<()> {
    let name = name.to_string();
    tokio::spawn(async move {
        let m = media();
        let p = origin.publish(&name).expect("publish");
        p.send(Tag {
            kind: flv::TAG_VIDEO,
            timestamp_ms: 0,
            body: flv::avc_sequence_header(&m.avc_config),
        });
        p.send(Tag {
            kind: flv::TAG_AUDIO,
            timestamp_ms: 0,
            body: flv::aac_sequence_header(&m.asc),
        });
        let start = tokio::time::Instant::now();
        let mut audio_n = 0u64;
        for n in 0u64.. {
            let t = n * 1000 / 30;
            tokio::time::sleep_until(start + Duration::from_millis(t)).await;
            let (kf, avcc) = &m.video[(n % m.video.len() as u64) as usize];
            p.send(Tag {
                kind: flv::TAG_VIDEO,
                timestamp_ms: t as u32,
                body: flv::avc_frame(*kf, 0, avcc),
            });
            while audio_n * 1024 * 1000 / 48_000 < t + 33 {
                let a = &m.audio[(audio_n % m.audio.len() as u64) as usize];
                p.send(Tag {
                    kind: flv::TAG_AUDIO,
                    timestamp_ms: (audio_n * 1024 * 1000 / 48_000) as u32,
                    body: flv::aac_frame(a),
                });
                audio_n += 1;
            }
        }
    })
}

async fn server(tweak: impl FnOnce(&mut Config)) -> cohost::app::Server {
    let mut cfg = Config::default();
    cfg.server.http_listen = "127.0.0.1:0".parse().unwrap();
    cfg.server.rtmp_listen = "127.0.0.1:0".into();
    tweak(&mut cfg);
    cohost::app::start(cfg).await.unwrap()
}

struct Resp {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Resp {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

async fn get(addr: std::net::SocketAddr, path: &str) -> Resp {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![];
    s.read_to_end(&mut buf).await.unwrap();
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Resp {
        status,
        head,
        body: buf[split + 4..].to_vec(),
    }
}

/// The `(msn, part)` a client asks for next (the part after the playlist's newest), and the
/// URI of the preload hint (empty when there is none).
fn next_part(playlist: &str) -> ((u64, usize), String) {
    let mut msn: u64 = playlist
        .lines()
        .find_map(|l| l.strip_prefix("#EXT-X-MEDIA-SEQUENCE:"))
        .and_then(|v| v.parse().ok())
        .expect("media sequence");
    let mut parts = 0;
    for l in playlist.lines() {
        if l.starts_with("#EXT-X-PART:") {
            parts += 1;
        } else if l.starts_with("seg-") {
            msn += 1;
            parts = 0;
        }
    }
    let hint = playlist
        .lines()
        .find_map(|l| l.strip_prefix("#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap_or("")
        .to_string();
    ((msn, parts), hint)
}

async fn wait_playlist(addr: std::net::SocketAddr, room: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = get(addr, &format!("/live/{room}/index.m3u8")).await;
        if r.status == 200 {
            assert_eq!(
                r.header("content-type").as_deref(),
                Some("application/vnd.apple.mpegurl")
            );
            return r.text();
        }
        assert!(
            Instant::now() < deadline,
            "no playlist: {} {}",
            r.status,
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hls_playlist_is_decoded_by_ffmpeg() {
    let server = server(|_| {}).await;
    let publisher = publish(server.services.origin.clone(), "room1");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let pl = wait_playlist(server.addr, "room1").await;
    // The first request starts the packager and waits for its first segment: the origin's
    // GOP cache plus the next keyframe, not several segments.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    for tag in [
        "#EXTM3U",
        "#EXT-X-TARGETDURATION:2",
        "#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK=",
        "#EXT-X-PART-INF:PART-TARGET=0.333",
        "#EXT-X-MAP:URI=\"init-",
        "#EXT-X-PROGRAM-DATE-TIME:",
        "#EXT-X-PART:DURATION=",
        ",INDEPENDENT=YES",
        "#EXT-X-PRELOAD-HINT:TYPE=PART",
    ] {
        assert!(pl.contains(tag), "{tag} missing:\n{pl}");
    }
    // The files it names, with their types.
    let init = pl
        .lines()
        .find_map(|l| l.strip_prefix("#EXT-X-MAP:URI=\""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap();
    let r = get(server.addr, &format!("/live/room1/{init}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type").as_deref(), Some("video/mp4"));
    assert_eq!(
        r.header("access-control-allow-origin").as_deref(),
        Some("*")
    );
    let seg = pl.lines().find(|l| l.starts_with("seg-")).unwrap();
    let r = get(server.addr, &format!("/live/room1/{seg}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("video/iso.segment")
    );
    assert!(r.body.len() > 1000);
    // HTTP-FLV on the same stream name still works next to the HLS routes.
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"GET /live/room1.flv HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 512];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    drop(s);

    // ffprobe sees the stream's parameters, ffmpeg decodes 4 s of it without an error.
    let url = format!("http://{}/live/room1/index.m3u8", server.addr);
    let probe = tokio::process::Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "stream=codec_name,width,height,sample_rate",
        ])
        .args(["-of", "default=nw=1", &url])
        .output()
        .await
        .expect("ffprobe (Debian ffmpeg) must be installed");
    let text = String::from_utf8_lossy(&probe.stdout);
    assert!(
        probe.status.success(),
        "{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    assert!(
        text.contains("codec_name=h264")
            && text.contains("width=320")
            && text.contains("height=240"),
        "{text}"
    );
    assert!(
        text.contains("codec_name=aac") && text.contains("sample_rate=48000"),
        "{text}"
    );
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new("ffmpeg")
            .args(["-hide_banner", "-v", "error", "-i", &url, "-t", "4"])
            .args(["-f", "framemd5", "-"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("ffmpeg finished")
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.trim().is_empty(), "decode errors: {err}");
    let frames = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("0,"))
        .count();
    assert!(
        (110..=125).contains(&frames),
        "{frames} video frames in 4 s"
    );
    publisher.abort();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ll_hls_blocking_reload_waits_for_the_next_part() {
    let server = server(|_| {}).await;
    let publisher = publish(server.services.origin.clone(), "room2");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pl = wait_playlist(server.addr, "room2").await;
    // The part after the newest one: held until it exists (about one part target).
    let ((want_msn, want_part), _) = next_part(&pl);
    let t = Instant::now();
    let r = get(
        server.addr,
        &format!("/live/room2/index.m3u8?_HLS_msn={want_msn}&_HLS_part={want_part}"),
    )
    .await;
    let waited = t.elapsed();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(waited < Duration::from_secs(2), "{waited:?}");
    let ((m, i), hint) = next_part(&r.text());
    assert!(
        (m, i) > (want_msn, want_part),
        "asked {want_msn}.{want_part}, got a playlist whose next part is {m}.{i}"
    );
    // The preload-hinted part: the request blocks until the part is ready, then gets it.
    let t = Instant::now();
    let r = get(server.addr, &format!("/live/room2/{hint}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!r.body.is_empty());
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // Asking far ahead is a client error, not a wait (RFC 8216bis 6.2.5.2).
    let r = get(
        server.addr,
        &format!("/live/room2/index.m3u8?_HLS_msn={}", m + 10),
    )
    .await;
    assert_eq!(r.status, 400);
    let r = get(server.addr, "/live/room2/index.m3u8?_HLS_part=1").await;
    assert_eq!(r.status, 400);
    // A part that never comes (the publisher is gone): 503 after three target durations.
    publisher.abort();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pl = get(server.addr, "/live/room2/index.m3u8").await.text();
    let ((m, i), hint) = next_part(&pl);
    assert!(hint.is_empty(), "no hint while the stream is gone:\n{pl}");
    let t = Instant::now();
    let r = get(
        server.addr,
        &format!("/live/room2/index.m3u8?_HLS_msn={m}&_HLS_part={i}"),
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(t.elapsed() >= Duration::from_secs(5), "{:?}", t.elapsed());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hls_survives_a_publisher_restart_with_a_discontinuity() {
    let server = server(|_| {}).await;
    let origin = server.services.origin.clone();
    let publisher = publish(origin.clone(), "room3");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let url = format!("http://{}/live/room3/index.m3u8", server.addr);
    let pl = wait_playlist(server.addr, "room3").await;
    assert!(!pl.contains("#EXT-X-DISCONTINUITY\n"));
    // A player reads through the restart.
    let ffmpeg = tokio::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-v", "error", "-i", &url, "-t", "9"])
        .args(["-f", "framemd5", "-"])
        .kill_on_drop(true)
        .output();
    let ffmpeg = tokio::spawn(ffmpeg);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The publisher goes away (a bridge restart, an RTMP reconnect) and comes back.
    publisher.abort();
    let deadline = Instant::now() + Duration::from_secs(5);
    while origin.is_live("room3") {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let publisher = publish(origin.clone(), "room3");
    // The playlist goes on with a discontinuity and the new stream's init segment.
    let deadline = Instant::now() + Duration::from_secs(10);
    let pl = loop {
        let pl = get(server.addr, "/live/room3/index.m3u8").await.text();
        let after = pl.split("#EXT-X-DISCONTINUITY\n").nth(1).unwrap_or("");
        if after.contains("#EXTINF:") {
            break pl;
        }
        assert!(
            Instant::now() < deadline,
            "no segment after a discontinuity:\n{pl}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let maps: Vec<&str> = pl
        .lines()
        .filter(|l| l.starts_with("#EXT-X-MAP:"))
        .collect();
    assert_eq!(maps.len(), 2, "{pl}");
    assert_ne!(maps[0], maps[1]);
    let d = pl.find("#EXT-X-DISCONTINUITY\n").unwrap();
    assert!(
        pl[d..].lines().nth(1).unwrap().starts_with("#EXT-X-MAP:"),
        "{pl}"
    );
    let out = tokio::time::timeout(Duration::from_secs(40), ffmpeg)
        .await
        .expect("ffmpeg finished")
        .unwrap()
        .unwrap();
    let frames = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("0,"))
        .count();
    assert!(
        frames >= 150,
        "ffmpeg decoded {frames} frames across the restart: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    publisher.abort();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hls_play_urls_are_signed_like_http_flv() {
    let secret = "a-signing-secret-of-some-length";
    let server = server(|c| {
        c.origin.sign_play = true;
        c.origin.sign_secret = secret.into();
    })
    .await;
    let publisher = publish(server.services.origin.clone(), "room4");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = get(server.addr, "/live/room4/index.m3u8").await;
    assert_eq!(r.status, 403, "{}", r.text());
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let q = format!(
        "?{}",
        cohost::auth::sign::signed_query(secret.as_bytes(), "/live/room4", expires)
    );
    let bad = q.replace("sign=", "sign=00");
    assert_eq!(
        get(server.addr, &format!("/live/room4/index.m3u8{bad}"))
            .await
            .status,
        403
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let pl = loop {
        let r = get(server.addr, &format!("/live/room4/index.m3u8{q}")).await;
        if r.status == 200 {
            break r.text();
        }
        assert!(Instant::now() < deadline, "{} {}", r.status, r.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Every URI of the playlist carries the signature, and works; without it, 403.
    let seg = pl.lines().find(|l| l.starts_with("seg-")).unwrap();
    assert!(seg.ends_with(&q), "{seg}");
    assert!(pl.contains(&format!(".mp4{q}\"")), "{pl}");
    assert_eq!(
        get(server.addr, &format!("/live/room4/{seg}")).await.status,
        200
    );
    let bare = seg.split('?').next().unwrap();
    assert_eq!(
        get(server.addr, &format!("/live/room4/{bare}"))
            .await
            .status,
        403
    );
    publisher.abort();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hls_abusive_clients_are_bounded() {
    let server = server(|c| {
        c.hls.max_blocking_requests = 2;
        c.hls.max_streams = 1;
        c.hls.idle_stop = Duration::from_secs(2);
    })
    .await;
    let origin = server.services.origin.clone();
    let publisher = publish(origin.clone(), "room5");
    let other = publish(origin.clone(), "other");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Streams that are not live start nothing; bad names are 404.
    for path in [
        "/live/nothing/index.m3u8",
        "/live/room5/seg-1-1.m4s",
        "/live/room5/../../etc/passwd",
        "/live/room5/part-x-99999999999999999999999.m4s",
        "/live/room5/index.m3u9",
    ] {
        assert_eq!(get(server.addr, path).await.status, 404, "{path}");
    }
    let pl = wait_playlist(server.addr, "room5").await;
    // One stream at a time here (hls.max_streams = 1).
    let r = get(server.addr, "/live/other/index.m3u8").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after").as_deref(), Some("1"));
    // Two requests may block; a third is refused at once instead of holding a connection.
    let ((m, _), _) = next_part(&pl);
    let path = format!("/live/room5/index.m3u8?_HLS_msn={}&_HLS_part=0", m + 1);
    let addr = server.addr;
    let held: Vec<_> = (0..2)
        .map(|_| {
            let p = path.clone();
            tokio::spawn(async move { get(addr, &p).await.status })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let r = get(server.addr, &path).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(t.elapsed() < Duration::from_millis(500));
    for h in held {
        assert_eq!(h.await.unwrap(), 200);
    }
    let m = server
        .services
        .metrics
        .hls_blocking_refused
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(m >= 1);
    // Nobody asks any more: the packager stops (hls.idle_stop) and frees its place.
    let deadline = Instant::now() + Duration::from_secs(10);
    while server
        .services
        .metrics
        .hls_streams
        .load(std::sync::atomic::Ordering::Relaxed)
        > 0
    {
        assert!(Instant::now() < deadline, "the packager did not stop");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(get(server.addr, "/live/other/index.m3u8").await.status, 200);
    publisher.abort();
    other.abort();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hls_playlist_load_asks_on_play_and_blocking_reloads_do_not() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    // The operator's backend: refuses while `deny` is set, records every request.
    struct Backend {
        deny: AtomicBool,
        asked: AtomicUsize,
        bodies: std::sync::Mutex<Vec<serde_json::Value>>,
    }
    let backend = Arc::new(Backend {
        deny: AtomicBool::new(true),
        asked: AtomicUsize::new(0),
        bodies: Default::default(),
    });
    let app = axum::Router::new()
        .route(
            "/auth",
            axum::routing::post(
                |axum::extract::State(b): axum::extract::State<Arc<Backend>>,
                 body: axum::body::Bytes| async move {
                    b.asked.fetch_add(1, Ordering::SeqCst);
                    if let Ok(v) = serde_json::from_slice(&body) {
                        b.bodies.lock().unwrap().push(v);
                    }
                    if b.deny.load(Ordering::SeqCst) {
                        axum::http::StatusCode::FORBIDDEN
                    } else {
                        axum::http::StatusCode::NO_CONTENT
                    }
                },
            ),
        )
        .with_state(backend.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/auth", l.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    let server = server(|c| {
        c.webhooks.on_play = url;
        c.webhooks.key = "a-webhook-key-of-some-length".into();
    })
    .await;
    let publisher = publish(server.services.origin.clone(), "room6");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = get(server.addr, "/live/room6/index.m3u8").await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("play_refused"), "{}", r.text());
    {
        let bodies = backend.bodies.lock().unwrap();
        assert_eq!(bodies[0]["action"], "on_play");
        assert_eq!(bodies[0]["protocol"], "hls");
        assert_eq!(bodies[0]["room"], "room6");
    }
    assert_eq!(
        server.services.metrics.hls_streams.load(Ordering::Relaxed),
        0,
        "a refused player starts nothing"
    );
    backend.deny.store(false, Ordering::SeqCst);
    let pl = wait_playlist(server.addr, "room6").await;
    let asked = backend.asked.load(Ordering::SeqCst);
    // The player's blocking reloads are not asked again.
    let ((m, p), _) = next_part(&pl);
    let r = get(
        server.addr,
        &format!("/live/room6/index.m3u8?_HLS_msn={m}&_HLS_part={p}"),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(backend.asked.load(Ordering::SeqCst), asked);
    publisher.abort();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_hls_requests_answer_at_shutdown() {
    let server = server(|_| {}).await;
    let publisher = publish(server.services.origin.clone(), "room7");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pl = wait_playlist(server.addr, "room7").await;
    let ((m, _), _) = next_part(&pl);
    let addr = server.addr;
    // Two segments ahead: held for seconds.
    let held = tokio::spawn(async move {
        let t = Instant::now();
        let r = get(addr, &format!("/live/room7/index.m3u8?_HLS_msn={}", m + 2)).await;
        (r.status, t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    server.shutdown().await;
    let (status, waited) = held.await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "shutdown took {:?}",
        t.elapsed()
    );
    assert!(
        waited < Duration::from_secs(3),
        "held {waited:?} ({status})"
    );
    publisher.abort();
}
