//! The embedded origin over HTTP-FLV, checked with a real decoder (ffprobe).

use std::time::{Duration, Instant};

use cohost::config::Config;
use cohost::media::amf0::{self, Value};
use cohost::media::flv::{self, Tag};

/// Encoded 320x240 frames with an IDR every 30 frames, as FLV video tag bodies, using the
/// bridge's encoder (fixed GOP, parameter sets split out into the decoder config).
fn frames(n: u32) -> (Vec<u8>, Vec<(bool, Vec<u8>)>) {
    use cohost::bridge::compose::{I420, Yuv};
    let mut enc = cohost::bridge::encode::H264Encoder::new(320, 240, 30.0, 500_000, 30).unwrap();
    let mut config = vec![];
    let mut out = vec![];
    for i in 0..n {
        let pic = I420::new(320, 240, Yuv(((i * 5) % 220) as u8 + 16, 128, 128));
        let v = enc.encode(&pic).unwrap();
        if config.is_empty() {
            config = v.config.clone().unwrap();
        }
        out.push((v.keyframe, flv::avc_frame(v.keyframe, 0, &v.avcc)));
    }
    (config, out)
}

fn video(ts: u32, body: Vec<u8>) -> Tag {
    Tag {
        kind: flv::TAG_VIDEO,
        timestamp_ms: ts,
        body,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_flv_player_starts_on_the_last_keyframe_and_decodes() {
    let mut cfg = Config::default();
    cfg.server.http_listen = "127.0.0.1:0".parse().unwrap();
    cfg.server.rtmp_listen = "127.0.0.1:0".into();
    let server = cohost::app::start(cfg).await.unwrap();
    let origin = server.services.origin.clone();
    let (config, frames) = frames(90);
    let publisher = origin.publish("room1").unwrap();
    let meta = amf0::ecma([
        ("width", Value::Number(320.0)),
        ("height", Value::Number(240.0)),
        ("videocodecid", Value::Number(7.0)),
    ]);
    publisher.send(Tag {
        kind: flv::TAG_SCRIPT,
        timestamp_ms: 0,
        body: flv::script("onMetaData", &meta),
    });
    publisher.send(video(0, flv::avc_sequence_header(&config)));
    // 45 frames before the player connects: its stream must start at the IDR of frame 30.
    for (i, (_, body)) in frames.iter().enumerate().take(45) {
        publisher.send(video(i as u32 * 33, body.clone()));
    }
    let url = format!("http://{}/live/room1.flv", server.addr);
    let probe = tokio::process::Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0", "-count_frames"])
        .args([
            "-show_entries",
            "stream=codec_name,width,height,nb_read_frames",
        ])
        .args(["-of", "default=nw=1", &url])
        .output();
    let probe = tokio::spawn(probe);
    let deadline = Instant::now() + Duration::from_secs(15);
    while origin.player_count("room1") == 0 {
        assert!(Instant::now() < deadline, "ffprobe never connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (i, (_, body)) in frames.iter().enumerate().skip(45) {
        publisher.send(video(i as u32 * 33, body.clone()));
    }
    drop(publisher); // the stream ends: ffprobe reads to EOF
    let out = tokio::time::timeout(Duration::from_secs(20), probe)
        .await
        .expect("ffprobe finished")
        .unwrap()
        .expect("ffprobe (Debian ffmpeg) must be installed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("codec_name=h264"), "{text}");
    assert!(
        text.contains("width=320") && text.contains("height=240"),
        "{text}"
    );
    assert!(
        text.contains("nb_read_frames=60"),
        "starts at frame 30 of 90: {text}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_flv_unknown_stream_is_404() {
    let mut cfg = Config::default();
    cfg.server.http_listen = "127.0.0.1:0".parse().unwrap();
    cfg.server.rtmp_listen = "127.0.0.1:0".into();
    let server = cohost::app::start(cfg).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for path in ["/live/nothing.flv", "/live/nothing"] {
        let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.unwrap();
        assert!(buf.starts_with("HTTP/1.1 404"), "{path}: {buf}");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmp_player_decodes_the_origin_stream() {
    let mut cfg = Config::default();
    cfg.server.http_listen = "127.0.0.1:0".parse().unwrap();
    cfg.server.rtmp_listen = "127.0.0.1:0".into();
    let server = cohost::app::start(cfg).await.unwrap();
    let rtmp = server.rtmp_addr.expect("rtmp enabled");
    let origin = server.services.origin.clone();
    let (config, frames) = frames(60);
    let publisher = origin.publish("room2").unwrap();
    publisher.send(video(0, flv::avc_sequence_header(&config)));
    for (i, (_, body)) in frames.iter().enumerate().take(10) {
        publisher.send(video(i as u32 * 33, body.clone()));
    }
    let url = format!("rtmp://{rtmp}/live/room2");
    let probe = tokio::spawn(
        tokio::process::Command::new("ffprobe")
            .args(["-v", "error", "-select_streams", "v:0", "-count_frames"])
            .args([
                "-show_entries",
                "stream=codec_name,width,height,nb_read_frames",
            ])
            .args(["-of", "default=nw=1", &url])
            .output(),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while origin.player_count("room2") == 0 {
        assert!(Instant::now() < deadline, "ffprobe never started playing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (i, (_, body)) in frames.iter().enumerate().skip(10) {
        publisher.send(video(i as u32 * 33, body.clone()));
    }
    drop(publisher);
    let out = tokio::time::timeout(Duration::from_secs(20), probe)
        .await
        .expect("ffprobe finished")
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("codec_name=h264"),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("width=320") && text.contains("height=240"),
        "{text}"
    );
    assert!(text.contains("nb_read_frames=60"), "{text}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmp_garbage_and_refused_requests_leave_the_server_healthy() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut cfg = Config::default();
    cfg.server.http_listen = "127.0.0.1:0".parse().unwrap();
    cfg.server.rtmp_listen = "127.0.0.1:0".into();
    let server = cohost::app::start(cfg).await.unwrap();
    let rtmp = server.rtmp_addr.unwrap();
    // Random bytes, a truncated handshake, a valid C0 followed by junk.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut junk = vec![0u8; 20_000];
    for b in junk.iter_mut() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        *b = seed as u8;
    }
    for payload in [&junk[..], &[3u8, 0, 0][..], &[3u8; 3000][..]] {
        let mut s = tokio::net::TcpStream::connect(rtmp).await.unwrap();
        let _ = s.write_all(payload).await;
        let _ = s.shutdown().await;
        let mut sink = vec![];
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await;
    }
    // Playing a stream that does not exist fails cleanly.
    let out = tokio::process::Command::new("ffprobe")
        .args(["-v", "error", &format!("rtmp://{rtmp}/live/nothing")])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    // The origin still serves a real stream afterwards.
    let origin = server.services.origin.clone();
    let (config, frames) = frames(30);
    let publisher = origin.publish("after").unwrap();
    publisher.send(video(0, flv::avc_sequence_header(&config)));
    for (i, (_, body)) in frames.iter().enumerate() {
        publisher.send(video(i as u32 * 33, body.clone()));
    }
    let probe = tokio::spawn(
        tokio::process::Command::new("ffprobe")
            .args([
                "-v",
                "error",
                "-show_entries",
                "stream=codec_name",
                "-of",
                "default=nw=1",
            ])
            .arg(format!("rtmp://{rtmp}/live/after"))
            .output(),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while origin.player_count("after") == 0 {
        assert!(Instant::now() < deadline, "no player");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Keep the stream alive with a new GOP until ffprobe has what it needs, then end it.
    for (i, (_, body)) in frames.iter().enumerate() {
        publisher.send(video(1000 + i as u32 * 33, body.clone()));
    }
    drop(publisher);
    let out = tokio::time::timeout(Duration::from_secs(20), probe)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("codec_name=h264"));
    server.shutdown().await;
}
