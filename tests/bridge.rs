//! The bridge end to end: real WebRTC publishers (H.264 + Opus from OpenH264/libopus), the
//! bridge started over the REST API, the mixed output pulled over HTTP-FLV and decoded by
//! ffmpeg: colours where the layout puts them, both voices in the audio.

mod common;

use std::time::{Duration, Instant};

use cohost::auth::Role;
use cohost::media::goertzel::tone_power;
use common::{
    Client, Server, assert_continuous, ffmpeg_capture, is_colour, is_slate, last_frame, live_ended,
    pixel, read_flv_tags, wait_bridge, wait_frames, wait_until,
};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_publishers_mixed_into_pip_with_both_voices() {
    let server = Server::start().await;
    let mut host = Client::join(&server, "mix", "host", Role::Host).await;
    let mut guest = Client::join(&server, "mix", "guest", Role::Cohost).await;
    host.publish_real((220, 30, 30), 440.0).await.unwrap();
    guest.publish_real((30, 30, 220), 660.0).await.unwrap();
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (s, body) = server
        // A size asked for: mixed at that size (the host is 320x240).
        .send_json(
            "POST",
            "/v1/rooms/mix/bridge",
            &admin,
            &json!({"width": 1280, "height": 720}),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    // Until both participants' pictures are in the output.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = server.get("/v1/rooms/mix/bridge", Some(&admin)).await;
        let v: Value = serde_json::from_str(body.trim()).unwrap_or(json!({}));
        if v["stats"]["inputs"].as_u64().unwrap_or(0) >= 4
            && v["stats"]["video_frames"].as_u64().unwrap_or(0) >= 45
        {
            break;
        }
        assert!(Instant::now() < deadline, "bridge not producing: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let url = format!("http://{}/live/mix.flv", server.addr);
    let probe = tokio::process::Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "stream=codec_name,width,height,sample_rate,channels,color_space,color_range",
            "-of",
            "default=nw=1",
            &url,
        ])
        .output()
        .await
        .unwrap();
    let p = String::from_utf8_lossy(&probe.stdout);
    for want in [
        "codec_name=h264",
        "width=1280",
        "height=720",
        // BT.601 limited range is signalled, so players do not guess BT.709 for HD.
        "color_space=smpte170m",
        "color_range=tv",
        "codec_name=aac",
        "sample_rate=48000",
        "channels=2",
    ] {
        assert!(p.contains(want), "{want} in {p}");
    }
    let dir = std::env::temp_dir().join(format!("cohost-bridge-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (video, audio) = ffmpeg_capture(&url, &dir).await;
    let frame_len = 320 * 180 * 3;
    assert!(
        video.len() >= frame_len * 30,
        "decoded {} bytes of video",
        video.len()
    );
    let last = &video[video.len() - frame_len..];
    // Host (red) fills the frame; the co-host (blue) is the bottom-right tile.
    let (r, g, b) = pixel(last, 80, 60);
    assert!(
        r > 150 && g < 90 && b < 90,
        "host area should be red: {:?}",
        (r, g, b)
    );
    let (r, g, b) = pixel(last, 275, 152);
    assert!(
        b > 150 && r < 90 && g < 90,
        "co-host tile should be blue: {:?}",
        (r, g, b)
    );
    let mid = &audio[audio.len() / 4..];
    let (p440, p660) = (
        tone_power(mid, 48000.0, 440.0),
        tone_power(mid, 48000.0, 660.0),
    );
    assert!(
        p440 > 0.05 && p660 > 0.05,
        "both voices: 440 Hz {p440}, 660 Hz {p660}"
    );
    let (s, _) = server
        .send_json("DELETE", "/v1/rooms/mix/bridge", &admin, &json!({}))
        .await;
    assert_eq!(s, 204);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cohost_leave_and_rejoin_keeps_the_output_continuous() {
    let server = Server::start().await;
    let mut host = Client::join(&server, "cont", "host", Role::Host).await;
    host.publish_real((220, 30, 30), 440.0).await.unwrap();
    let mut guest = Client::join(&server, "cont", "guest", Role::Cohost).await;
    guest.publish_real((30, 30, 220), 660.0).await.unwrap();
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (s, body) = server
        .send_json("POST", "/v1/rooms/cont/bridge", &admin, &json!({}))
        .await;
    assert_eq!(s, 201, "{body}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let srv = &server;
    let churn = async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        guest.leave().await;
        drop(guest);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut again = Client::join(srv, "cont", "guest", Role::Cohost).await;
        again.publish_real((30, 220, 30), 660.0).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2000)).await;
        drop(again);
    };
    let tags = read_flv_tags(server.addr, "/live/cont.flv", 7, churn).await;
    assert_continuous(&tags, 150);
    drop(host);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_controls_the_bridge_over_signaling_and_others_may_not() {
    let server = Server::start().await;
    let host = Client::join(&server, "ctl", "host", Role::Host).await;
    let guest = Client::join(&server, "ctl", "guest", Role::Cohost).await;
    let r = guest.sig.request(json!({"type":"start_bridge"})).await;
    assert_eq!(r["error"]["code"], "forbidden", "{r}");
    let r = host
        .sig
        .request(json!({"type":"start_bridge","destinations":["http://not-rtmp/x"]}))
        .await;
    assert_eq!(r["error"]["code"], "bad_destination", "{r}");
    let r = host
        .sig
        .request(json!({"type":"start_bridge","layout":"grid"}))
        .await;
    assert_eq!(r["type"], "response", "{r}");
    let r = host.sig.request(json!({"type":"start_bridge"})).await;
    assert_eq!(r["error"]["code"], "already_running", "{r}");
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (_, body) = server.get("/v1/rooms/ctl/bridge", Some(&admin)).await;
    let v: Value = serde_json::from_str(body.trim()).unwrap();
    assert_eq!(v["layout"], "grid");
    let r = guest
        .sig
        .request(json!({"type":"set_layout","layout":"pip"}))
        .await;
    assert_eq!(r["error"]["code"], "forbidden", "{r}");
    let r = host
        .sig
        .request(json!({"type":"set_layout","layout":null}))
        .await;
    assert_eq!(r["type"], "response", "{r}");
    let (_, body) = server.get("/v1/rooms/ctl/bridge", Some(&admin)).await;
    let v: Value = serde_json::from_str(body.trim()).unwrap();
    assert!(v["layout"].is_null(), "{v}");
    let r = host.sig.request(json!({"type":"stop_bridge"})).await;
    assert_eq!(r["type"], "response", "{r}");
    let r = host.sig.request(json!({"type":"stop_bridge"})).await;
    assert_eq!(r["error"]["code"], "not_running", "{r}");
    let (s, _) = server.get("/v1/rooms/ctl/bridge", Some(&admin)).await;
    assert_eq!(s, 404);
}

/// Lip sync, measured: the publisher flashes white and beeps at the same instant every 1.2 s.
/// The output is recorded (FLV, as a CDN viewer gets it), both streams decoded by ffmpeg, and
/// each flash's first frame (by its timestamp) is paired with the nearest beep onset (5 ms windows of the decoded
/// audio). Every pair must be within 80 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_keeps_lips_and_voice_within_80ms() {
    let server = Server::start().await;
    let mut host = Client::join(&server, "lips", "host", Role::Host).await;
    host.publish_flashes().await.unwrap();
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (s, body) = server
        .send_json("POST", "/v1/rooms/lips/bridge", &admin, &json!({}))
        .await;
    assert_eq!(s, 201, "{body}");
    // Past the first sender reports (the publisher sends one about every second).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = server.get("/v1/rooms/lips/bridge", Some(&admin)).await;
        let v: Value = serde_json::from_str(body.trim()).unwrap_or(json!({}));
        if v["stats"]["video_frames"].as_u64().unwrap_or(0) >= 75 {
            break;
        }
        assert!(Instant::now() < deadline, "bridge not producing: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dir = std::env::temp_dir().join(format!("cohost-lips-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rec = dir.join("rec.flv");
    let url = format!("http://{}/live/lips.flv", server.addr);
    let out = tokio::process::Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-i", &url, "-t", "6", "-c", "copy"])
        .arg(&rec)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let probe = tokio::process::Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "stream=codec_type,start_time",
        ])
        .args(["-of", "csv=p=0"])
        .arg(&rec)
        .output()
        .await
        .unwrap();
    let probe = String::from_utf8_lossy(&probe.stdout).to_string();
    let start = |kind: &str| -> f64 {
        probe
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{kind},")))
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or_else(|| panic!("{kind} start time in {probe}"))
    };
    let a_start = start("audio");
    let (v, a) = (dir.join("v.gray"), dir.join("a.pcm"));
    let out = tokio::process::Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-i"])
        .arg(&rec)
        .args(["-map", "0:v", "-vf", "scale=32:18", "-pix_fmt", "gray"])
        .args(["-fps_mode", "passthrough", "-enc_time_base", "1:1000"])
        .args(["-f", "rawvideo"])
        .arg(&v)
        .args(["-map", "0:a", "-ac", "1", "-ar", "48000", "-f", "s16le"])
        .arg(&a)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let video = std::fs::read(&v).unwrap();
    let audio: Vec<f32> = std::fs::read(&a)
        .unwrap()
        .chunks_exact(2)
        .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])))
        .collect();
    // Each picture's own timestamp: the host passed through comes at its own frame rate.
    let times = tokio::process::Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v"])
        .args(["-show_entries", "frame=pts_time", "-of", "csv=p=0"])
        .arg(&rec)
        .output()
        .await
        .unwrap();
    let times: Vec<f64> = String::from_utf8_lossy(&times.stdout)
        .lines()
        .filter_map(|l| l.trim().trim_end_matches(',').parse().ok())
        .collect();
    let luma: Vec<f32> = video
        .chunks_exact(32 * 18)
        .map(|f| f.iter().map(|&p| f32::from(p)).sum::<f32>() / f.len() as f32)
        .collect();
    assert_eq!(times.len(), luma.len(), "a timestamp per picture");
    let flashes: Vec<f64> = (1..luma.len())
        .filter(|&i| luma[i] > 170.0 && luma[i - 1] <= 170.0)
        .map(|i| times[i])
        .collect();
    let win = 240; // 5 ms
    let rms: Vec<f32> = audio
        .chunks_exact(win)
        .map(|w| (w.iter().map(|s| s * s).sum::<f32>() / win as f32).sqrt())
        .collect();
    let beeps: Vec<f64> = (1..rms.len())
        .filter(|&i| rms[i] > 2000.0 && rms[i - 1] <= 2000.0)
        .map(|i| a_start + (i * win) as f64 / 48000.0)
        .collect();
    let offsets: Vec<f64> = flashes
        .iter()
        .filter_map(|f| {
            beeps
                .iter()
                .map(|b| b - f)
                .min_by(|x, y| x.abs().total_cmp(&y.abs()))
                // A flash near the end of the recording may have lost its beep to the cut.
                .filter(|o| o.abs() < 0.5)
        })
        .collect();
    eprintln!("flashes {flashes:?}\nbeeps {beeps:?}\naudio - video offsets (s): {offsets:?}");
    assert!(
        offsets.len() >= 3,
        "flashes {flashes:?} beeps {beeps:?} in {probe}"
    );
    for o in &offsets {
        assert!(o.abs() <= 0.080, "lip sync off by {o:.3} s: {offsets:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn side_by_side_and_grid_put_each_participant_where_promised() {
    const RED: (u8, u8, u8) = (220, 30, 30);
    const BLUE: (u8, u8, u8) = (30, 30, 220);
    const GREEN: (u8, u8, u8) = (30, 200, 30);
    let server = Server::start().await;
    let mut host = Client::join(&server, "tiles", "host", Role::Host).await;
    let mut first = Client::join(&server, "tiles", "first", Role::Cohost).await;
    let mut second = Client::join(&server, "tiles", "second", Role::Cohost).await;
    host.publish_real(RED, 440.0).await.unwrap();
    first.publish_real(BLUE, 550.0).await.unwrap();
    second.publish_real(GREEN, 660.0).await.unwrap();
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (s, body) = server
        .send_json(
            "POST",
            "/v1/rooms/tiles/bridge",
            &admin,
            &json!({"layout": "side_by_side"}),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    wait_frames(&server, &admin, "tiles", 45).await;
    // Host left, first co-host right; the second has no place in a side-by-side.
    let f = last_frame(&server, "tiles", "sbs").await;
    assert!(
        is_colour(pixel(&f, 80, 90), RED),
        "left {:?}",
        pixel(&f, 80, 90)
    );
    assert!(
        is_colour(pixel(&f, 240, 90), BLUE),
        "right {:?}",
        pixel(&f, 240, 90)
    );

    let (s, body) = server
        .send_json(
            "PATCH",
            "/v1/rooms/tiles/bridge",
            &admin,
            &json!({"layout": "grid"}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    // Three in a 2x2 grid, in co-host order; the fourth cell is empty.
    let f = last_frame(&server, "tiles", "grid").await;
    for (x, y, want, name) in [
        (80, 45, RED, "top left"),
        (240, 45, BLUE, "top right"),
        (80, 135, GREEN, "bottom left"),
        (240, 135, (0, 0, 0), "bottom right"),
    ] {
        assert!(
            is_colour(pixel(&f, x, y), want),
            "{name} {:?}",
            pixel(&f, x, y)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_started_portrait_bridge_follows_the_host_and_ends_a_grace_period_after_the_host_leaves()
 {
    let server = Server::start_with(&[
        ("COHOST_BRIDGE__AUTO_START", "true"),
        ("COHOST_ROOM__HOST_GRACE", "1s"),
        // The configured size, not the host's (320x240).
        ("COHOST_BRIDGE__SIZE_FROM_HOST", "false"),
        ("COHOST_BRIDGE__WIDTH", "720"),
        ("COHOST_BRIDGE__HEIGHT", "1280"),
    ])
    .await;
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let mut host = Client::join(&server, "auto", "host", Role::Host).await;
    let (s, _) = server.get("/v1/rooms/auto/bridge", Some(&admin)).await;
    assert_eq!(s, 404, "nothing published yet, no bridge");
    host.publish_real((220, 30, 30), 440.0).await.unwrap();
    // Started by the host's first track, without any API call.
    let v = wait_frames(&server, &admin, "auto", 30).await;
    assert_eq!(v["config"]["width"], 720, "{v}");
    let url = format!("http://{}/live/auto.flv", server.addr);
    let probe = tokio::process::Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0"])
        .args([
            "-show_entries",
            "stream=width,height",
            "-of",
            "csv=p=0",
            &url,
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&probe.stdout).trim(), "720,1280");
    // The last one out: the room, its bridge and stream end once the host's grace period
    // (1 s) is over.
    host.leave().await;
    let left = Instant::now();
    wait_until("the live to end", Duration::from_secs(10), async || {
        live_ended(&server, "auto").await
    })
    .await;
    assert!(
        left.elapsed() >= Duration::from_millis(900),
        "{:?}",
        left.elapsed()
    );
    // The host comes back: a new room, whose first track starts a fresh bridge.
    drop(host);
    let mut host = Client::join(&server, "auto", "host", Role::Host).await;
    host.publish_real((30, 30, 220), 440.0).await.unwrap();
    let v = wait_frames(&server, &admin, "auto", 15).await;
    assert_eq!(v["config"]["width"], 720, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_away_shows_slate_then_ends() {
    let server = Server::start_with(&[
        ("COHOST_BRIDGE__AUTO_START", "true"),
        ("COHOST_ROOM__HOST_GRACE", "8s"),
    ])
    .await;
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let mut host = Client::join(&server, "away", "host", Role::Host).await;
    host.publish_real((220, 30, 30), 440.0).await.unwrap();
    // Live in one step: the host's first track started the bridge.
    wait_frames(&server, &admin, "away", 30).await;
    // The host's phone drops off the network: no leave, the connection just ends.
    host.sig.vanish();
    let dropped = Instant::now();
    drop(host);
    wait_bridge(&server, &admin, "away", 10, "the slate", |v| {
        v["stats"]["mix_reason"] == "host_away"
    })
    .await;
    // Viewers see the slate (not black, not the host's last picture) and hear silence.
    let dir = std::env::temp_dir().join(format!("cohost-away-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("http://{}/live/away.flv", server.addr);
    let (video, audio) = ffmpeg_capture(&url, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    let n = 320 * 180 * 3;
    assert!(video.len() >= n, "no frame decoded");
    let last = &video[video.len() - n..];
    assert!(is_slate(last), "corner {:?}", pixel(last, 4, 4));
    let tail = &audio[audio.len().saturating_sub(24_000)..];
    let rms = (tail.iter().map(|s| s * s).sum::<f32>() / tail.len().max(1) as f32).sqrt();
    assert!(rms < 50.0, "the host's tone is gone: rms {rms}");
    // The room's feed says so; the room stays open for the host meanwhile.
    let (_, feed) = server.get("/v1/rooms/away/messages", None).await;
    assert!(feed.contains("the host is away"), "{feed}");
    let (s, body) = server.get("/v1/rooms/away", Some(&admin)).await;
    assert_eq!(s, 200, "{body}");
    // The grace period (8 s) ends without the host: the live ends, room and stream with it.
    wait_until("the live to end", Duration::from_secs(20), async || {
        live_ended(&server, "away").await
    })
    .await;
    let took = dropped.elapsed();
    eprintln!("host dropped: live ended after {took:?}");
    assert!(
        took >= Duration::from_secs(7),
        "not before the grace period: {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_ending_the_live_stops_the_bridge_at_once() {
    let server = Server::start_with(&[("COHOST_BRIDGE__AUTO_START", "true")]).await;
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let mut host = Client::join(&server, "end", "host", Role::Host).await;
    host.publish_real((220, 30, 30), 440.0).await.unwrap();
    wait_frames(&server, &admin, "end", 15).await;
    // "End live": stop the bridge, then leave. No grace period, no slate.
    let r = host.sig.request(json!({"type": "stop_bridge"})).await;
    assert_eq!(r["type"], "response", "{r}");
    host.leave().await;
    wait_until("the live to end", Duration::from_secs(3), async || {
        live_ended(&server, "end").await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_media_from_one_publisher_does_not_break_the_bridge() {
    let server = Server::start().await;
    let mut host = Client::join(&server, "junk", "host", Role::Host).await;
    let mut junk = Client::join(&server, "junk", "junk", Role::Cohost).await;
    host.publish_real((220, 30, 30), 440.0).await.unwrap();
    // Payloads that are neither H.264 nor Opus: random-looking bytes in every packet.
    junk.publish(None).await.unwrap();
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (s, body) = server
        .send_json("POST", "/v1/rooms/junk/bridge", &admin, &json!({}))
        .await;
    assert_eq!(s, 201, "{body}");
    let before = wait_frames(&server, &admin, "junk", 30).await;
    let later = wait_frames(
        &server,
        &admin,
        "junk",
        before["stats"]["video_frames"].as_u64().unwrap() + 60,
    )
    .await;
    assert_eq!(later["stats"]["inputs"], 4, "{later}");
    // The host still shows; the broken participant is a placeholder tile, not a crash.
    let f = last_frame(&server, "junk", "junk").await;
    assert!(
        is_colour(pixel(&f, 80, 60), (220, 30, 30)),
        "{:?}",
        pixel(&f, 80, 60)
    );
    let tile = pixel(&f, 275, 152);
    assert!(!is_colour(tile, (220, 30, 30)), "junk tile {tile:?}");
    let (s, _) = server.get("/healthz", None).await;
    assert_eq!(s, 200);
}

/// The cheap solo path: while the host (15 fps) is alone, unchanged output frames are skipped
/// pictures instead of encodes; a co-host switches to mixing every frame at once, and the room
/// returns to the solo path after `bridge.solo_idle`. The whole recording is one continuous
/// stream that ffmpeg decodes without an error, every frame showing the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn solo_host_is_passed_through_without_encoding_and_mixed_only_with_a_cohost() {
    use cohost::media::flv::TAG_VIDEO;
    use cohost::media::h264::{nal_type, split_avcc};
    use cohost::media::h264_ids::slice_header;
    let server = Server::start_with(&[("COHOST_BRIDGE__SOLO_IDLE", "1s")]).await;
    let mut host = Client::join(&server, "pass", "host", Role::Host).await;
    host.publish_real((220, 30, 30), 440.0).await.unwrap();
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (s, body) = server
        .send_json("POST", "/v1/rooms/pass/bridge", &admin, &json!({}))
        .await;
    assert_eq!(s, 201, "{body}");
    let srv = &server;
    let token = admin.as_str();
    let phases = async move {
        let v = wait_bridge(srv, token, "pass", 15, "passing the host through", |v| {
            v["stats"]["path"] == "passthrough"
                && v["stats"]["passthrough_frames"].as_u64() > Some(30)
        })
        .await;
        // Nothing was encoded: the host's own pictures at the host's own size.
        assert_eq!(v["stats"]["encoded_frames"], 0, "{v}");
        assert_eq!(
            (&v["stats"]["width"], &v["stats"]["height"]),
            (&json!(320), &json!(240))
        );
        let mut guest = Client::join(srv, "pass", "guest", Role::Cohost).await;
        guest.publish_real((30, 30, 220), 660.0).await.unwrap();
        let v = wait_bridge(srv, token, "pass", 15, "mixing with a co-host", |v| {
            v["stats"]["path"] == "mixing" && v["stats"]["encoded_frames"].as_u64() > Some(30)
        })
        .await;
        assert_eq!(v["stats"]["mix_reason"], "cohosts", "{v}");
        guest.leave().await;
        drop(guest);
        let v = wait_bridge(srv, token, "pass", 15, "back to passthrough", |v| {
            v["stats"]["path"] == "passthrough"
        })
        .await;
        let encoded = v["stats"]["encoded_frames"].as_u64().unwrap_or(0);
        let passed = v["stats"]["passthrough_frames"].as_u64().unwrap_or(0);
        let v = wait_bridge(srv, token, "pass", 10, "passing through again", |v| {
            v["stats"]["passthrough_frames"].as_u64() > Some(passed + 20)
        })
        .await;
        assert_eq!(
            v["stats"]["encoded_frames"].as_u64(),
            Some(encoded),
            "the encoder rests: {v}"
        );
        assert_eq!(v["stats"]["switches"], 2, "{v}");
    };
    let tags = read_flv_tags(server.addr, "/live/pass.flv", 22, phases).await;
    assert_continuous(&tags, 100);

    // One sequence header holding the host's SPS/PPS and the bridge encoder's.
    let config = tags
        .iter()
        .find(|t| t.kind == TAG_VIDEO && t.is_sequence_header())
        .expect("a sequence header");
    let rec = &config.body[5..];
    assert_eq!(rec[5] & 0x1f, 2, "two SPS");
    let host_sps_len = usize::from(u16::from_be_bytes([rec[6], rec[7]]));
    let host_sps = rec[8..8 + host_sps_len].to_vec();
    // Which encoder made each picture (the PPS its slices name), and where the IDRs are.
    let mut runs: Vec<(u32, bool)> = vec![];
    let mut last = None;
    for t in tags
        .iter()
        .filter(|t| t.kind == TAG_VIDEO && !t.is_sequence_header())
    {
        let nals = split_avcc(&t.body[5..]).expect("AVCC");
        let pps = nals
            .iter()
            .find_map(|n| slice_header(n))
            .expect("a slice")
            .pps_id;
        if pps == 0 && t.is_video_keyframe() {
            let sps = nals.iter().find(|n| nal_type(n) == 7).expect("in-band SPS");
            assert_eq!(sps.to_vec(), host_sps, "the output's SPS is the host's");
        }
        if last != Some(pps) {
            runs.push((pps, t.is_video_keyframe()));
            last = Some(pps);
        }
    }
    let order: Vec<u32> = runs.iter().map(|r| r.0).collect();
    assert_eq!(order, vec![0, 1, 0], "host, mix, host: {runs:?}");
    assert!(
        runs.iter().all(|r| r.1),
        "every switch starts at an IDR: {runs:?}"
    );

    // ffmpeg decodes the whole recording, switches included, without an error, and the host's
    // red fills the top of every picture.
    let decoded = common::decode_recording(&tags, "pass").await;
    let frames = decoded.frames();
    assert!(frames.len() > 100, "{} pictures", frames.len());
    for (i, f) in frames.iter().enumerate() {
        let p = pixel(f, 160, 40);
        assert!(is_colour(p, (220, 30, 30)), "frame {i}: {p:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_passthrough_the_solo_path_repeats_unchanged_pictures_and_mixes_seamlessly() {
    let server = Server::start_with(&[
        ("COHOST_BRIDGE__SOLO_IDLE", "1s"),
        ("COHOST_BRIDGE__PASSTHROUGH", "false"),
    ])
    .await;
    let mut host = Client::join(&server, "solo", "host", Role::Host).await;
    host.publish_real((220, 30, 30), 440.0).await.unwrap();
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (s, body) = server
        .send_json("POST", "/v1/rooms/solo/bridge", &admin, &json!({}))
        .await;
    assert_eq!(s, 201, "{body}");
    let srv = &server;
    let token = admin.as_str();
    let phases = async move {
        let v = wait_bridge(srv, token, "solo", 15, "solo path repeats", |v| {
            v["stats"]["mix_reason"] == "disabled"
                && v["stats"]["repeated_frames"].as_u64() > Some(15)
        })
        .await;
        let solo_frames = v["stats"]["video_frames"].as_u64().unwrap_or(0);
        let solo_repeats = v["stats"]["repeated_frames"].as_u64().unwrap_or(0);
        // A 15 fps host into 30 fps: about every other frame is a repeat, never all of them.
        assert!(solo_repeats < solo_frames, "{v}");
        let mut guest = Client::join(srv, "solo", "guest", Role::Cohost).await;
        guest.publish_real((30, 30, 220), 660.0).await.unwrap();
        let v = wait_bridge(srv, token, "solo", 15, "mixing with a co-host", |v| {
            v["stats"]["inputs"].as_u64() == Some(4)
        })
        .await;
        let at_mixing = v["stats"]["repeated_frames"].as_u64().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let v = wait_bridge(srv, token, "solo", 5, "still mixing", |_| true).await;
        assert_eq!(
            v["stats"]["repeated_frames"].as_u64().unwrap_or(0),
            at_mixing,
            "every frame is encoded while mixing: {v}"
        );
        guest.leave().await;
        drop(guest);
        wait_bridge(
            srv,
            token,
            "solo",
            10,
            "back to solo after the idle time",
            |v| v["stats"]["repeated_frames"].as_u64().unwrap_or(0) > at_mixing + 5,
        )
        .await;
    };
    let tags = read_flv_tags(server.addr, "/live/solo.flv", 14, phases).await;
    assert_continuous(&tags, 300);

    // Decode the recording with ffmpeg: no decoding error, a picture for every video tag, and
    // the host's red in the middle of every one of them (repeats included) once the host's
    // first picture arrived (the recording starts with the bridge, before that picture).
    let decoded = common::decode_recording(&tags, "solo").await;
    let n = 320 * 180 * 3;
    let video_tags = tags
        .iter()
        .filter(|t| t.kind == cohost::media::flv::TAG_VIDEO && !t.is_sequence_header())
        .count();
    assert_eq!(
        decoded.rgb.len() / n,
        video_tags,
        "one picture per video tag"
    );
    let frames = decoded.frames();
    let first = frames
        .iter()
        .position(|f| is_colour(pixel(f, 160, 60), (220, 30, 30)))
        .expect("the host appears");
    assert!(first < 60, "host shown after {first} frames");
    for (i, f) in frames.iter().enumerate().skip(first) {
        let p = pixel(f, 160, 60);
        assert!(is_colour(p, (220, 30, 30)), "frame {i}: {p:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_resolution_change_falls_back_to_transcoding() {
    use cohost::media::flv::TAG_VIDEO;
    let server = Server::start().await;
    let mut host = Client::join(&server, "resize", "host", Role::Host).await;
    // 320x240 for 4 s, then 160x120 for 4 s, then 320x240 again.
    host.publish_resizing((220, 30, 30), 440.0).await.unwrap();
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (s, body) = server
        .send_json("POST", "/v1/rooms/resize/bridge", &admin, &json!({}))
        .await;
    assert_eq!(s, 201, "{body}");
    let srv = &server;
    let token = admin.as_str();
    let phases = async move {
        wait_bridge(srv, token, "resize", 15, "passing the host through", |v| {
            v["stats"]["path"] == "passthrough"
        })
        .await;
        let v = wait_bridge(
            srv,
            token,
            "resize",
            15,
            "mixing at the smaller size",
            |v| v["stats"]["path"] == "mixing",
        )
        .await;
        assert_eq!(v["stats"]["mix_reason"], "parameters_changed", "{v}");
        assert_eq!(
            (&v["stats"]["width"], &v["stats"]["height"]),
            (&json!(320), &json!(240))
        );
        wait_bridge(
            srv,
            token,
            "resize",
            15,
            "passthrough at the first size again",
            |v| v["stats"]["path"] == "passthrough" && v["stats"]["switches"].as_u64() >= Some(2),
        )
        .await;
    };
    let tags = read_flv_tags(server.addr, "/live/resize.flv", 16, phases).await;
    assert_continuous(&tags, 100);
    assert_eq!(
        tags.iter()
            .filter(|t| t.kind == TAG_VIDEO && t.is_sequence_header())
            .count(),
        1
    );
    // ffmpeg decodes it all at one size without an error, the host's red everywhere (the
    // small pictures scaled up by the mix).
    let decoded = common::decode_recording(&tags, "resize").await;
    let sizes = &decoded.sizes;
    assert_eq!(sizes.len(), 1, "one picture size: {sizes:?}");
    assert!(sizes.contains("320,240"), "{sizes:?}");
    let frames = decoded.frames();
    assert!(frames.len() > 100, "{} pictures", frames.len());
    for (i, f) in frames.iter().enumerate() {
        let p = pixel(f, 160, 90);
        assert!(is_colour(p, (220, 30, 30)), "frame {i}: {p:?}");
    }
}

/// A host whose video never reaches the bridge (it joined, published nothing) while a
/// co-host's does: the stream takes the configured size, not the co-host's small picture
/// (once seen in CI: a whole stream at a co-host's 320x240).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_takes_the_configured_size_not_a_cohosts_when_the_host_has_no_video() {
    let server = Server::start_with(&[
        ("COHOST_BRIDGE__WIDTH", "640"),
        ("COHOST_BRIDGE__HEIGHT", "360"),
    ])
    .await;
    let _host = Client::join(&server, "nosize", "host", Role::Host).await;
    let mut guest = Client::join(&server, "nosize", "guest", Role::Cohost).await;
    guest.publish_real((30, 30, 220), 660.0).await.unwrap();
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (s, body) = server
        .send_json("POST", "/v1/rooms/nosize/bridge", &admin, &json!({}))
        .await;
    assert_eq!(s, 201, "{body}");
    // The stream starts after the wait for the host (5 s), with the co-host's picture.
    common::wait_frames(&server, &admin, "nosize", 15).await;
    let url = format!("http://{}/live/nosize.flv", server.addr);
    let probe = tokio::process::Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v"])
        .args([
            "-show_entries",
            "stream=width,height",
            "-of",
            "default=nw=1",
            &url,
        ])
        .output()
        .await
        .unwrap();
    let p = String::from_utf8_lossy(&probe.stdout);
    assert!(p.contains("width=640") && p.contains("height=360"), "{p}");
}
