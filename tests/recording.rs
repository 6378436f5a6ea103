//! Recording a room's output to fragmented MP4, against the real server binary: a WebRTC host
//! (tests/common's `publish_real`: H.264 320x240 15 fps, an IDR every second, and Opus) whose
//! bridge publishes into the embedded origin, recorded into a temporary directory that each
//! test deletes. ffprobe/ffmpeg (Debian) read and decode every file.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cohost::auth::Role;
use common::{Client, Server, wait_bridge, wait_until};
use serde_json::{Value, json};
use tokio::process::Command;

/// A directory under the system temp dir, removed on drop (recordings are megabytes).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("cohost-rec-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn s(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // KEEP_RECORDINGS=1 keeps them for a look after a failure.
        if std::env::var_os("KEEP_RECORDINGS").is_some() {
            eprintln!("kept {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn rec_server(dir: &TempDir, extra: &[(&str, &str)]) -> Server {
    let d = dir.s();
    let mut env = vec![("COHOST_RECORDING__DIR", d.as_str())];
    env.extend_from_slice(extra);
    Server::start_with(&env).await
}

fn admin(server: &Server) -> String {
    server.auth.mint("*", "ops", Role::Admin, None).unwrap()
}

/// A host publishing real media into `room`.
async fn live_host(server: &Server, room: &str) -> Client {
    let mut host = Client::join(server, room, "host", Role::Host).await;
    host.publish_real((220, 30, 30), 440.0).await.unwrap();
    host
}

async fn start_bridge(server: &Server, room: &str) {
    let (s, body) = server
        .send_json(
            "POST",
            &format!("/v1/rooms/{room}/bridge"),
            &admin(server),
            &json!({}),
        )
        .await;
    assert_eq!(s, 201, "{body}");
}

async fn rest(server: &Server, method: &str, path: &str) -> (u16, Value) {
    let (s, body) = server
        .send_json(method, path, &admin(server), &json!({}))
        .await;
    (s, serde_json::from_str(body.trim()).unwrap_or(json!({})))
}

async fn list(server: &Server, room: &str) -> Value {
    let (s, body) = server
        .get(
            &format!("/v1/rooms/{room}/recordings"),
            Some(&admin(server)),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    serde_json::from_str(body.trim()).unwrap()
}

/// Wait until the listing holds a file in `state`; returns that file's entry.
async fn wait_file(server: &Server, room: &str, state: &str, secs: u64) -> Value {
    let mut found = json!(null);
    wait_until(
        &format!("a {state} file of {room}"),
        Duration::from_secs(secs),
        async || {
            let v = list(server, room).await;
            match v["files"]
                .as_array()
                .and_then(|f| f.iter().find(|f| f["state"] == state))
            {
                Some(f) => {
                    found = f.clone();
                    true
                }
                None => false,
            }
        },
    )
    .await;
    found
}

/// Until the room's recording has ended (its files all closed).
async fn wait_stopped(server: &Server, room: &str) {
    wait_until(
        "the recording to end",
        Duration::from_secs(15),
        async || {
            let (s, _) = rest(server, "GET", &format!("/v1/rooms/{room}/recording")).await;
            s == 404
        },
    )
    .await;
}

/// ffprobe's format duration in seconds.
async fn ffprobe_duration(p: &Path) -> f64 {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-show_entries", "format=duration"])
        .args(["-of", "default=nw=1:nk=1"])
        .arg(p)
        .output()
        .await
        .expect("ffprobe (Debian ffmpeg) must be installed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "ffprobe {}: {}",
        p.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("ffprobe duration of {}: {text:?}", p.display()))
}

/// The streams ffprobe sees: codec names.
async fn ffprobe_codecs(p: &Path) -> Vec<String> {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-show_entries", "stream=codec_name"])
        .args(["-of", "default=nw=1:nk=1"])
        .arg(p)
        .output()
        .await
        .unwrap();
    let mut c: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    c.sort();
    c
}

/// Decode the whole file; ffmpeg's error output (empty when clean) and the number of video
/// frames and the last video frame's time (s).
async fn decode(p: &Path) -> (String, u64, f64) {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(p)
        // Frame times as they are (the bridge's output is 15 fps while passing a 15 fps host
        // through and 30 fps while mixing): no frame rate of ffmpeg's choosing in between.
        .args(["-fps_mode", "passthrough", "-enc_time_base", "1:1000"])
        .args(["-f", "null", "-"])
        .output()
        .await
        .unwrap();
    let errors = String::from_utf8_lossy(&out.stderr).to_string();
    let probe = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0"])
        .args(["-show_entries", "packet=pts_time", "-of", "csv=p=0"])
        .arg(p)
        .output()
        .await
        .unwrap();
    let pts: Vec<f64> = String::from_utf8_lossy(&probe.stdout)
        .lines()
        .filter_map(|l| l.trim().trim_end_matches(',').parse().ok())
        .collect();
    let last = pts.iter().copied().fold(0.0, f64::max);
    (errors, pts.len() as u64, last)
}

fn files_on_disk(dir: &TempDir, room: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.0.join(room))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_started_over_rest_is_read_by_ffprobe_with_wall_clock_duration() {
    let dir = TempDir::new("wall");
    let server = rec_server(&dir, &[]).await;
    let _host = live_host(&server, "rec1").await;
    // Asked for before the room's stream exists: it waits for it.
    let (s, v) = rest(&server, "POST", "/v1/rooms/rec1/recording").await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["recording"]["state"], "waiting", "{v}");
    let (s, v) = rest(&server, "POST", "/v1/rooms/rec1/recording").await;
    assert_eq!((s, &v["error"]["code"]), (409, &json!("already_recording")));
    start_bridge(&server, "rec1").await;
    // The file opens at the stream's first keyframe.
    let f = wait_file(&server, "rec1", "recording", 20).await;
    let t0 = Instant::now();
    let (_, st) = rest(&server, "GET", "/v1/rooms/rec1/recording").await;
    assert_eq!(st["recording"]["state"], "recording", "{st}");
    assert_eq!(st["recording"]["file"], f["file"], "{st}");
    tokio::time::sleep(Duration::from_secs(7)).await;
    let (s, _) = rest(&server, "DELETE", "/v1/rooms/rec1/recording").await;
    assert_eq!(s, 204);
    let wall = t0.elapsed().as_secs_f64();
    wait_stopped(&server, "rec1").await;
    let (s, _) = rest(&server, "DELETE", "/v1/rooms/rec1/recording").await;
    assert_eq!(s, 404);
    assert_eq!(server.metric("cohost_recording_files_total").await, 1.0);
    assert_eq!(server.metric("cohost_recordings_active").await, 0.0);

    let files = files_on_disk(&dir, "rec1");
    assert_eq!(files.len(), 1, "{files:?}");
    let d = ffprobe_duration(&files[0]).await;
    eprintln!("recorded {wall:.2} s of wall time: ffprobe says {d:.3} s");
    assert!((d - wall).abs() <= 1.0, "ffprobe {d} s, wall {wall} s");
    assert_eq!(ffprobe_codecs(&files[0]).await, ["aac", "h264"]);
    let (errors, frames, last) = decode(&files[0]).await;
    assert!(errors.is_empty(), "ffmpeg: {errors}");
    assert!(frames as f64 >= (wall - 1.0) * 14.0, "{frames} frames");
    assert!((last - d).abs() < 0.5, "last frame at {last} s of {d} s");
    // The listing agrees with the file.
    let v = list(&server, "rec1").await;
    let entry = &v["files"][0];
    assert_eq!(entry["state"], "complete", "{v}");
    assert_eq!(
        entry["size"].as_u64(),
        Some(std::fs::metadata(&files[0]).unwrap().len())
    );
    let listed = entry["duration_ms"].as_u64().unwrap() as f64 / 1000.0;
    assert!((listed - d).abs() < 0.2, "listed {listed} s, ffprobe {d} s");
    assert!(entry["start"].as_str().unwrap().ends_with('Z'), "{entry}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_rotates_files_by_duration() {
    let dir = TempDir::new("rotate");
    let server = rec_server(&dir, &[("COHOST_RECORDING__MAX_DURATION", "3s")]).await;
    let _host = live_host(&server, "rot").await;
    start_bridge(&server, "rot").await;
    wait_bridge(&server, &admin(&server), "rot", 20, "bridge output", |v| {
        v["stats"]["video_frames"].as_u64() > Some(15)
    })
    .await;
    let (s, _) = rest(&server, "POST", "/v1/rooms/rot/recording").await;
    assert_eq!(s, 201);
    wait_file(&server, "rot", "recording", 10).await;
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    rest(&server, "DELETE", "/v1/rooms/rot/recording").await;
    let wall = t0.elapsed().as_secs_f64();
    wait_stopped(&server, "rot").await;
    let files = files_on_disk(&dir, "rot");
    assert!(files.len() >= 3, "{files:?}");
    let mut total = 0.0;
    for (i, f) in files.iter().enumerate() {
        let d = ffprobe_duration(f).await;
        let (errors, frames, _) = decode(f).await;
        eprintln!("{}: {d:.3} s, {frames} frames", f.display());
        assert!(errors.is_empty(), "{}: {errors}", f.display());
        // Rotation waits for the keyframe after 3 s (one a second); the last file is cut
        // short by the stop.
        if i + 1 < files.len() {
            assert!((2.9..=4.2).contains(&d), "{}: {d} s", f.display());
        }
        total += d;
    }
    // Nothing lost between files: together they span the recording (the first one starts at
    // the origin's cached keyframe, up to a second before the request).
    assert!(
        total >= wall - 1.0 && total <= wall + 1.5,
        "files {total} s, wall {wall} s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_survives_a_passthrough_to_mix_switch() {
    let dir = TempDir::new("switch");
    let server = rec_server(&dir, &[("COHOST_BRIDGE__SOLO_IDLE", "1s")]).await;
    let _host = live_host(&server, "sw").await;
    let token = admin(&server);
    let (s, _) = rest(&server, "POST", "/v1/rooms/sw/recording").await;
    assert_eq!(s, 201);
    start_bridge(&server, "sw").await;
    wait_bridge(&server, &token, "sw", 20, "passthrough", |v| {
        v["stats"]["path"] == "passthrough" && v["stats"]["passthrough_frames"].as_u64() > Some(30)
    })
    .await;
    let mut guest = Client::join(&server, "sw", "guest", Role::Cohost).await;
    guest.publish_real((30, 30, 220), 660.0).await.unwrap();
    wait_bridge(&server, &token, "sw", 20, "mixing", |v| {
        v["stats"]["path"] == "mixing" && v["stats"]["encoded_frames"].as_u64() > Some(30)
    })
    .await;
    guest.leave().await;
    drop(guest);
    let v = wait_bridge(&server, &token, "sw", 20, "passthrough again", |v| {
        v["stats"]["path"] == "passthrough" && v["stats"]["switches"].as_u64() >= Some(2)
    })
    .await;
    let passed = v["stats"]["passthrough_frames"].as_u64().unwrap_or(0);
    wait_bridge(&server, &token, "sw", 10, "more passthrough", |v| {
        v["stats"]["passthrough_frames"].as_u64() > Some(passed + 20)
    })
    .await;
    rest(&server, "DELETE", "/v1/rooms/sw/recording").await;
    wait_stopped(&server, "sw").await;
    // One file: the switches share the stream's one sequence header.
    let files = files_on_disk(&dir, "sw");
    assert_eq!(files.len(), 1, "{files:?}");
    let d = ffprobe_duration(&files[0]).await;
    let (errors, frames, last) = decode(&files[0]).await;
    eprintln!("passthrough -> mix -> passthrough: {d:.3} s, {frames} frames");
    assert!(errors.is_empty(), "ffmpeg: {errors}");
    assert!(
        d > 5.0 && (last - d).abs() < 0.5,
        "{d} s, last frame {last} s"
    );
    assert!(frames as f64 >= d * 13.0, "{frames} frames in {d} s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_after_a_crash_keeps_all_but_the_last_fragment() {
    let dir = TempDir::new("crash");
    let mut server = rec_server(&dir, &[]).await;
    let _host = live_host(&server, "crash").await;
    let (s, _) = rest(&server, "POST", "/v1/rooms/crash/recording").await;
    assert_eq!(s, 201);
    start_bridge(&server, "crash").await;
    wait_file(&server, "crash", "recording", 20).await;
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(6)).await;
    // The server dies without a chance to close anything.
    let pid = server.pid().expect("server pid");
    let killed = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let wall = t0.elapsed().as_secs_f64();
    server.wait().await;
    let files = files_on_disk(&dir, "crash");
    assert_eq!(files.len(), 1, "{files:?}");
    let (errors, frames, last) = decode(&files[0]).await;
    eprintln!("killed after {wall:.2} s: {frames} frames up to {last:.3} s survive");
    assert!(errors.is_empty(), "ffmpeg: {errors}");
    // recording.fragment is 1 s: at most about that (plus a frame in flight) is lost.
    assert!(
        last >= wall - 1.0 - 0.5,
        "last frame at {last} s of {wall} s"
    );
    let codecs = ffprobe_codecs(&files[0]).await;
    assert_eq!(codecs, ["aac", "h264"]);

    // A restarted server lists it as incomplete (its duration was never written).
    let server = rec_server(&dir, &[]).await;
    let _host = Client::join(&server, "crash", "host", Role::Host).await;
    let v = list(&server, "crash").await;
    assert_eq!(v["files"][0]["state"], "incomplete", "{v}");
    assert!(v["files"][0].get("duration_ms").is_none(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_is_completed_at_a_graceful_shutdown() {
    let dir = TempDir::new("term");
    let mut server = rec_server(&dir, &[]).await;
    let _host = live_host(&server, "term").await;
    let (s, _) = rest(&server, "POST", "/v1/rooms/term/recording").await;
    assert_eq!(s, 201);
    start_bridge(&server, "term").await;
    wait_file(&server, "term", "recording", 20).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(server.metric("cohost_recordings_active").await, 1.0);
    let pid = server.pid().expect("server pid");
    let term = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await
        .unwrap();
    assert!(term.success());
    let status = tokio::time::timeout(Duration::from_secs(20), server.wait())
        .await
        .expect("the server exits");
    assert!(status.success(), "{status:?}");
    let files = files_on_disk(&dir, "term");
    assert_eq!(files.len(), 1, "{files:?}");
    // The file was completed: its duration is in the init segment.
    let head = std::fs::read(&files[0]).unwrap();
    let written = cohost::recording::writer::mehd_duration_ms(&head).expect("a duration") as f64;
    let d = ffprobe_duration(&files[0]).await;
    assert!(
        (written / 1000.0 - d).abs() < 0.2,
        "mehd {written} ms, ffprobe {d} s"
    );
    assert!(d > 2.5, "{d} s");
    let (errors, _, _) = decode(&files[0]).await;
    assert!(errors.is_empty(), "ffmpeg: {errors}");
}

/// Raw HTTP GET with extra headers: (status, headers, body bytes).
async fn get_raw(server: &Server, path: &str, extra: &str) -> (u16, String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\n{extra}Connection: close\r\n\r\n",
        server.addr
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head, buf[split + 4..].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_is_listed_and_downloaded_with_a_signed_url() {
    let dir = TempDir::new("signed");
    let server = rec_server(
        &dir,
        &[
            ("COHOST_ORIGIN__SIGN_PLAY", "true"),
            ("COHOST_ORIGIN__SIGN_SECRET", "recording-sign-secret-0123"),
        ],
    )
    .await;
    let _host = live_host(&server, "dl").await;
    start_bridge(&server, "dl").await;
    let (s, _) = rest(&server, "POST", "/v1/rooms/dl/recording").await;
    assert_eq!(s, 201);
    wait_file(&server, "dl", "recording", 20).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    rest(&server, "DELETE", "/v1/rooms/dl/recording").await;
    wait_stopped(&server, "dl").await;
    let v = list(&server, "dl").await;
    let entry = &v["files"][0];
    let file = entry["file"].as_str().unwrap();
    let url = entry["url"].as_str().unwrap();
    assert!(
        url.starts_with(&format!("/recordings/dl/{file}?")) && url.contains("sign="),
        "{url}"
    );
    let on_disk = std::fs::read(dir.0.join("dl").join(file)).unwrap();

    // The signed replay URL, whole and by range.
    let (s, head, body) = get_raw(&server, url, "").await;
    assert_eq!(s, 200, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: video/mp4"),
        "{head}"
    );
    assert_eq!(body, on_disk);
    let (s, head, body) = get_raw(&server, url, "Range: bytes=100-199\r\n").await;
    assert_eq!(s, 206, "{head}");
    assert_eq!(body, on_disk[100..200]);
    // ffmpeg plays it from the URL.
    let (errors, frames, _) = decode(Path::new(&format!("http://{}{url}", server.addr))).await;
    assert!(
        errors.is_empty() && frames > 20,
        "{frames} frames: {errors}"
    );

    // Without a signature, or with a wrong one: refused.
    let (s, _, _) = get_raw(&server, &format!("/recordings/dl/{file}"), "").await;
    assert_eq!(s, 403);
    let forged = url.replace("sign=", "sign=00");
    let (s, _, _) = get_raw(&server, &forged, "").await;
    assert_eq!(s, 403);
    // With a bearer token: the API path.
    let token = admin(&server);
    let (s, _, body) = get_raw(
        &server,
        &format!("/v1/rooms/dl/recordings/{file}"),
        &format!("Authorization: Bearer {token}\r\n"),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(body, on_disk);
    let (s, _, _) = get_raw(&server, &format!("/v1/rooms/dl/recordings/{file}"), "").await;
    assert_eq!(s, 401);
    // Another room's host may not list or download this room's files.
    let other = server.token("other", "h", Role::Host);
    let (s, _) = server.get("/v1/rooms/dl/recordings", Some(&other)).await;
    assert_eq!(s, 403);
    // Names that would leave the directory never reach the disk.
    for bad in [
        "/v1/rooms/dl/recordings/..%2F..%2Fetc%2Fpasswd",
        "/v1/rooms/dl/recordings/.hidden.mp4",
        "/v1/rooms/dl/recordings/notes.txt",
        "/v1/rooms/../recordings/x.mp4",
    ] {
        let (s, _, _) = get_raw(&server, bad, &format!("Authorization: Bearer {token}\r\n")).await;
        assert!(matches!(s, 400 | 403 | 404), "{bad}: {s}");
    }
    let (s, _, _) = get_raw(
        &server,
        "/v1/rooms/dl/recordings/dl-20990101T000000.000Z.mp4",
        &format!("Authorization: Bearer {token}\r\n"),
    )
    .await;
    assert_eq!(s, 404);
}

/// A webhook receiver that records every event body (signatures are tests/webhooks.rs's
/// business).
async fn hook_receiver() -> (u16, tokio::sync::mpsc::UnboundedReceiver<Value>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: bytes::Bytes| {
            let tx = tx.clone();
            async move {
                if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                    let _ = tx.send(v);
                }
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    (port, rx)
}

async fn next_event(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Value>, name: &str) -> Value {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let v = rx.recv().await.expect("receiver");
            if v["event"] == name {
                return v;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {name} event"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_finished_webhook_reports_file_duration_size() {
    let dir = TempDir::new("hook");
    let (port, mut events) = hook_receiver().await;
    let url = format!("[\"http://127.0.0.1:{port}/hook\"]");
    let server = rec_server(
        &dir,
        &[
            ("COHOST_WEBHOOKS__URLS", url.as_str()),
            ("COHOST_WEBHOOKS__KEY", "webhook-test-key-0123456789"),
        ],
    )
    .await;
    let mut host = live_host(&server, "wh").await;
    let mut viewer = Client::join(&server, "wh", "viewer", Role::Audience).await;
    start_bridge(&server, "wh").await;
    // The audience may not record; the host may, over signaling.
    let r = viewer.sig.request(json!({"type": "start_recording"})).await;
    assert_eq!(r["error"]["code"], "forbidden", "{r}");
    let r = host.sig.request(json!({"type": "start_recording"})).await;
    assert_eq!(r["type"], "response", "{r}");
    let r = host.sig.request(json!({"type": "start_recording"})).await;
    assert_eq!(r["error"]["code"], "already_recording", "{r}");
    viewer
        .sig
        .wait_for("recording_started", |v| v["type"] == "recording_started")
        .await;
    let started = next_event(&mut events, "recording_started").await;
    assert_eq!(started["room"], "wh");
    let file = started["file"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let r = host.sig.request(json!({"type": "stop_recording"})).await;
    assert_eq!(r["type"], "response", "{r}");
    let stopped = viewer
        .sig
        .wait_for("recording_stopped", |v| v["type"] == "recording_stopped")
        .await;
    assert_eq!(stopped["reason"], "requested", "{stopped}");
    host.sig
        .wait_for("recording_stopped", |v| v["type"] == "recording_stopped")
        .await;
    let finished = next_event(&mut events, "recording_finished").await;
    assert_eq!(finished["file"], file.as_str(), "{finished}");
    assert_eq!(finished["reason"], "stopped", "{finished}");
    let path = dir.0.join("wh").join(&file);
    assert_eq!(
        finished["size"].as_u64(),
        Some(std::fs::metadata(&path).unwrap().len())
    );
    let d = ffprobe_duration(&path).await;
    let reported = finished["duration_ms"].as_u64().unwrap() as f64 / 1000.0;
    assert!(
        (reported - d).abs() < 0.2,
        "reported {reported} s, ffprobe {d} s"
    );
    let r = host.sig.request(json!({"type": "stop_recording"})).await;
    assert_eq!(r["error"]["code"], "not_recording", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_continues_in_a_new_file_when_the_bridge_restarts_and_auto_records() {
    let dir = TempDir::new("restart");
    let server = rec_server(&dir, &[("COHOST_RECORDING__AUTO", "true")]).await;
    let _host = live_host(&server, "rs").await;
    // recording.auto: the bridge's stream starts the recording.
    start_bridge(&server, "rs").await;
    let first = wait_file(&server, "rs", "recording", 20).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (s, _) = rest(&server, "DELETE", "/v1/rooms/rs/bridge").await;
    assert_eq!(s, 204);
    // The stream ended: the file is closed, the recording waits.
    wait_until("waiting", Duration::from_secs(10), async || {
        let (_, v) = rest(&server, "GET", "/v1/rooms/rs/recording").await;
        v["recording"]["state"] == "waiting"
    })
    .await;
    start_bridge(&server, "rs").await;
    wait_until("a second file", Duration::from_secs(20), async || {
        let v = list(&server, "rs").await;
        v["files"].as_array().map_or(0, Vec::len) == 2 && v["files"][0]["state"] == "recording"
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    rest(&server, "DELETE", "/v1/rooms/rs/recording").await;
    wait_stopped(&server, "rs").await;
    let v = list(&server, "rs").await;
    assert_eq!(v["files"][1]["file"], first["file"], "{v}");
    for f in files_on_disk(&dir, "rs") {
        let d = ffprobe_duration(&f).await;
        let (errors, _, _) = decode(&f).await;
        assert!(errors.is_empty(), "{}: {errors}", f.display());
        assert!(d > 2.0, "{}: {d} s", f.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_write_error_stops_the_recording_not_the_server() {
    let dir = TempDir::new("ioerr");
    let server = rec_server(&dir, &[]).await;
    // The room's directory cannot be created: a file is in its place.
    std::fs::write(dir.0.join("bad"), b"not a directory").unwrap();
    let mut host = live_host(&server, "bad").await;
    start_bridge(&server, "bad").await;
    let r = host.sig.request(json!({"type": "start_recording"})).await;
    assert_eq!(r["type"], "response", "{r}");
    let stopped = host
        .sig
        .wait_for("recording_stopped", |v| v["type"] == "recording_stopped")
        .await;
    assert_eq!(stopped["reason"], "write_error", "{stopped}");
    wait_stopped(&server, "bad").await;
    assert_eq!(
        server.metric("cohost_recording_write_errors_total").await,
        1.0
    );
    // The server and the room's stream carry on.
    let (s, _) = server.get("/healthz", None).await;
    assert_eq!(s, 200);
    let v = wait_bridge(&server, &admin(&server), "bad", 5, "bridge", |v| {
        v["stats"]["video_frames"].as_u64() > Some(0)
    })
    .await;
    assert!(v["stats"].is_object());
    // Unknown rooms and bad names get clear errors.
    let (s, _) = rest(&server, "POST", "/v1/rooms/nobody/recording").await;
    assert_eq!(s, 404);
    let (s, _) = rest(&server, "POST", "/v1/rooms/..%2Fx/recording").await;
    assert!(matches!(s, 400 | 404), "{s}");
}

/// `recording.max_concurrent` bounds the recordings of the whole server: one more is refused
/// with 409 `too_many_recordings`, and a stopped one frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recordings_beyond_max_concurrent_are_refused() {
    let dir = TempDir::new("cap");
    let server = rec_server(&dir, &[("COHOST_RECORDING__MAX_CONCURRENT", "1")]).await;
    let _a = Client::join(&server, "rec-cap-a", "host", Role::Host).await;
    let _b = Client::join(&server, "rec-cap-b", "host", Role::Host).await;
    let (s, v) = rest(&server, "POST", "/v1/rooms/rec-cap-a/recording").await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = rest(&server, "POST", "/v1/rooms/rec-cap-b/recording").await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("too_many_recordings")),
        "{v}"
    );
    let (s, v) = rest(&server, "DELETE", "/v1/rooms/rec-cap-a/recording").await;
    assert_eq!(s, 204, "{v}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, v) = rest(&server, "POST", "/v1/rooms/rec-cap-b/recording").await;
        if s == 201 {
            break;
        }
        assert!(Instant::now() < deadline, "place never freed: {s} {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
