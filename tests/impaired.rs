//! A co-host on a phone's network: a WHIP publisher (the `webrtc` crate) reaches the server
//! only through the impairment relay (tests/common/impair.rs: loss, delay, jitter that reorders
//! packets), the host publishes on a clean link, and the bridge mixes both in pip. The co-host's
//! tile in the decoded HTTP-FLV output must keep moving: its pictures change every frame, so a
//! run of output frames in which the tile does not change is a freeze.
//!
//! The bounds asserted here are generous (a loaded CI machine); the targets of the issue are
//! measured with `cargo test --release --test impaired -- --nocapture` and recorded in
//! BENCHMARKS.md.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cohost::auth::Role;
use common::impair::{Impairment, Relay, server_candidate, via_relay};
use common::{Client, Server, payload_type, post_sdp, wait_bridge};
use serde_json::{Value, json};
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::peer_connection::{PeerConnection, RTCSessionDescription};

/// Width and height of the co-host's camera, and its frame interval (15 fps).
const W: usize = 320;
const H: usize = 240;
const FRAME: Duration = Duration::from_millis(66);

/// Luma of the bottom half of co-host frame `n`: a ramp that changes at every frame.
fn ramp(n: u32) -> u8 {
    (30 + (n * 23) % 190) as u8
}

/// A co-host picture: a moving checkerboard on the top half (so that P-frames carry real
/// motion and take several packets, as a camera's do) and, below, a flat red whose luma is
/// `ramp(n)`, which the test reads back from the output (red: the grey placeholder tile is
/// told apart by its colour).
fn picture(n: u32) -> openh264::formats::YUVBuffer {
    let mut y = vec![0u8; W * H];
    for row in 0..H {
        for col in 0..W {
            y[row * W + col] = if row < H / 2 {
                let x = col + n as usize * 3;
                if (x / 8 + row / 8).is_multiple_of(2) {
                    40
                } else {
                    210
                }
            } else {
                ramp(n)
            };
        }
    }
    let (cw, ch) = (W / 2, H / 2);
    let chroma =
        |top: u8, bottom: u8| (0..cw * ch).map(move |i| if i / cw < ch / 2 { top } else { bottom });
    y.extend(chroma(128, 100));
    y.extend(chroma(128, 180));
    openh264::formats::YUVBuffer::from_vec(y, W, H)
}

/// The co-host: a WHIP session whose media goes through `relay`.
struct Cohost {
    _pc: Arc<dyn PeerConnection>,
    stop: Arc<AtomicBool>,
    plis: Arc<AtomicU64>,
    relay: Relay,
}

impl Drop for Cohost {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl Cohost {
    async fn publish(server: &Server, room: &str, up: Impairment, seed: u64) -> Cohost {
        let (a_ssrc, v_ssrc) = (0x0a0a_0001u32, 0x0b0b_0001u32);
        let (pc, audio, video, offer) = common::whip_publisher(a_ssrc, v_ssrc).await;
        // No client candidates: the server can only learn the relay's address (from the
        // connectivity checks that come through it), so every packet takes the impaired path.
        let sdp: String = offer
            .split_inclusive('\n')
            .filter(|l| !l.starts_with("a=candidate:"))
            .collect();
        let token = server.token(room, "phone", Role::Cohost);
        let r = post_sdp(server, &format!("/whip/{room}"), Some(&token), &sdp).await;
        assert_eq!(r.status, 201, "{}", r.body);
        let target = server_candidate(&r.body).expect("a loopback candidate in the answer");
        let relay = Relay::start(target, up, Impairment::clean(), seed).await;
        let answer = via_relay(&r.body, target, relay.addr);
        pc.set_remote_description(RTCSessionDescription::answer(answer.clone()).unwrap())
            .await
            .unwrap();
        let (apt, vpt) = (payload_type(&answer, "opus"), payload_type(&answer, "H264"));
        let stop = Arc::new(AtomicBool::new(false));
        let plis = Arc::new(AtomicU64::new(0));
        {
            let (v, stop, plis) = (video.clone(), stop.clone(), plis.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    match v.poll().await {
                        Some(TrackLocalEvent::OnRtcpPacket(_)) => {
                            plis.fetch_add(1, Ordering::SeqCst);
                        }
                        Some(_) => {}
                        None => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            });
        }
        tokio::spawn(pump(
            audio,
            video,
            stop.clone(),
            plis.clone(),
            (a_ssrc, apt),
            (v_ssrc, vpt),
        ));
        Cohost {
            _pc: pc,
            stop,
            plis,
            relay,
        }
    }
}

/// 15 fps of [`picture`]s at about 300 kbit/s (a co-host's usual), an IDR every 4 s or when
/// asked (PLI); Opus every 20 ms.
async fn pump(
    a: Arc<TrackLocalStaticRTP>,
    v: Arc<TrackLocalStaticRTP>,
    stop: Arc<AtomicBool>,
    plis: Arc<AtomicU64>,
    (a_ssrc, apt): (u32, u8),
    (v_ssrc, vpt): (u32, u8),
) {
    use openh264::encoder::{BitRate, EncoderConfig, FrameRate, IntraFramePeriod};
    use rtc::rtp::codec::h264::H264Payloader;
    use rtc::rtp::packetizer::Payloader;
    let cfg = EncoderConfig::new()
        .bitrate(BitRate::from_bps(300_000))
        .max_frame_rate(FrameRate::from_hz(15.0))
        .intra_frame_period(IntraFramePeriod::from_num_frames(60));
    let mut enc =
        openh264::encoder::Encoder::with_api_config(openh264::OpenH264API::from_source(), cfg)
            .unwrap();
    let mut opus_enc =
        opus::Encoder::new(48000, opus::Channels::Mono, opus::Application::Voip).unwrap();
    let mut pay = H264Payloader::default();
    let (mut aseq, mut vseq) = (0u16, 0u16);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let start = Instant::now();
    let (mut audio_n, mut video_n) = (0u32, 0u32);
    let mut last_plis = 0;
    while !stop.load(Ordering::SeqCst) {
        tick.tick().await;
        let frame = common::opus_tone_frame(&mut opus_enc, audio_n, 660.0, 8000.0);
        let p = common::rtp_packet(a_ssrc, apt, aseq, audio_n * 960, false, frame);
        aseq = aseq.wrapping_add(1);
        audio_n += 1;
        if a.write_rtp(p).await.is_err() {
            return;
        }
        if start.elapsed() < FRAME * video_n {
            continue;
        }
        let now_plis = plis.load(Ordering::SeqCst);
        if now_plis != last_plis {
            enc.force_intra_frame();
            last_plis = now_plis;
        }
        let bs = enc.encode(&picture(video_n)).unwrap().to_vec();
        let ts = (start.elapsed().as_secs_f64() * 90_000.0) as u32;
        video_n += 1;
        let Ok(pkts) = pay.payload(1200, &Bytes::from(bs)) else {
            continue;
        };
        let last = pkts.len().saturating_sub(1);
        for (k, pl) in pkts.into_iter().enumerate() {
            let p = common::rtp_packet(v_ssrc, vpt, vseq, ts, k == last, pl);
            vseq = vseq.wrapping_add(1);
            let _ = v.write_rtp(p).await;
        }
    }
}

/// What the co-host's tile did in the output.
#[derive(Debug)]
struct TileReport {
    /// Output frames judged (the capture after its first 2 s).
    frames: usize,
    /// Output frames whose tile differs from the frame before.
    changed: usize,
    /// Longest run of output frames with the tile unchanged, in milliseconds (30 fps).
    longest_freeze_ms: f64,
    /// Output frames in which the tile shows no co-host picture (the grey placeholder).
    placeholder: usize,
}

/// Mean luma and mean red-minus-blue of the bottom half of the co-host's pip tile, in
/// 320x180 RGB frames of a 1280x720 output (tile 320x180 at 942,522: 235-315 x 130-175 when
/// scaled).
fn tile(frame: &[u8]) -> (f64, f64) {
    let (mut luma, mut red, mut n) = (0.0, 0.0, 0.0);
    for y in 158..170 {
        for x in 255..295 {
            let (r, g, b) = common::pixel(frame, x, y);
            luma += 0.299 * f64::from(r) + 0.587 * f64::from(g) + 0.114 * f64::from(b);
            red += f64::from(r) - f64::from(b);
            n += 1.0;
        }
    }
    (luma / n, red / n)
}

fn analyse(video: &[u8]) -> TileReport {
    let frame_len = 320 * 180 * 3;
    // A new player starts at the origin's cached keyframe, up to a GOP (2 s) in the past,
    // maybe before the co-host's picture arrived: the first 2 s are not judged.
    let tiles: Vec<(f64, f64)> = video.chunks_exact(frame_len).skip(60).map(tile).collect();
    let lumas: Vec<f64> = tiles.iter().map(|t| t.0).collect();
    let (mut changed, mut run, mut longest) = (0, 0usize, 0usize);
    // The placeholder is grey; the co-host's picture is red there.
    let placeholder = tiles.iter().filter(|t| t.1 < 20.0).count();
    if std::env::var_os("IMPAIRED_DEBUG").is_some() {
        for (i, t) in tiles.iter().enumerate().filter(|(_, t)| t.1 < 20.0) {
            eprintln!("grey frame {i}: luma {:.1}, red-blue {:.1}", t.0, t.1);
        }
    }
    for (i, l) in lumas.iter().enumerate() {
        if i > 0 && (l - lumas[i - 1]).abs() > 4.0 {
            changed += 1;
            run = 0;
        } else {
            run += 1;
            longest = longest.max(run);
        }
    }
    TileReport {
        frames: lumas.len(),
        changed,
        longest_freeze_ms: longest as f64 * 1000.0 / 30.0,
        placeholder,
    }
}

/// Capture `secs` of the room's HTTP-FLV output, decoded to 320x180 RGB.
async fn capture(server: &Server, room: &str, secs: u32) -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("cohost-impaired-{}-{room}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("v.rgb");
    let url = format!("http://{}/live/{room}.flv", server.addr);
    common::run_ffmpeg(
        tokio::process::Command::new("ffmpeg")
            .args(["-v", "error", "-y", "-i", &url, "-t", &secs.to_string()])
            .args(["-fps_mode", "passthrough"])
            .args(common::RAW_RGB_320X180)
            .arg(&path),
        Duration::from_secs(u64::from(secs) + 30),
    )
    .await;
    let video = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    video
}

/// Runs the scenario and returns the tile report and the co-host input's bridge stats.
async fn cohost_through(up: Impairment, room: &str, seed: u64) -> (TileReport, Value, u64) {
    let server = Server::start().await;
    let mut host = Client::join(&server, room, "host", Role::Host).await;
    host.publish_real((200, 40, 40), 440.0).await.unwrap();
    let cohost = Cohost::publish(&server, room, up, seed).await;
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (s, body) = server
        .send_json(
            "POST",
            &format!("/v1/rooms/{room}/bridge"),
            &admin,
            &json!({"layout": "pip"}),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    wait_bridge(&server, &admin, room, 30, "co-host video decoded", |v| {
        v["stats"]["video_inputs"].as_array().is_some_and(|a| {
            a.iter()
                .any(|i| i["frames_decoded"].as_u64().unwrap_or(0) > 15)
        })
    })
    .await;
    let plis_before = cohost.plis.load(Ordering::SeqCst);
    let nacks_before = server.metric("cohost_rtcp_nacks_sent_total").await;
    let video = capture(&server, room, 17).await;
    let keyframes_asked = cohost.plis.load(Ordering::SeqCst) - plis_before;
    let nacks = server.metric("cohost_rtcp_nacks_sent_total").await - nacks_before;
    let report = analyse(&video);
    let (_, body) = server
        .get(&format!("/v1/rooms/{room}/bridge"), Some(&admin))
        .await;
    let v: Value = serde_json::from_str(body.trim()).unwrap_or(json!({}));
    let (_, body) = server.get(&format!("/v1/rooms/{room}"), Some(&admin)).await;
    let r: Value = serde_json::from_str(body.trim()).unwrap_or(json!({}));
    let phone = r["participants"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["identity"] == "phone"))
        .map(|p| p["id"].clone())
        .unwrap_or(json!(null));
    // A WHIP publisher reports like a WebSocket member: its connection's statistics and its
    // tracks' bitrate and round trip.
    let me = r["participants"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["identity"] == "phone").cloned())
        .unwrap_or(json!(null));
    assert!(
        me["media"]["publisher"]["rtt_ms"].as_f64().is_some(),
        "WHIP connection stats: {me}"
    );
    let video = r["tracks"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|t| t["participant_id"] == phone && t["kind"] == "video")
        })
        .cloned()
        .unwrap_or(json!(null));
    let video_bps = video["bitrate_bps"].as_u64().unwrap_or(0);
    assert!(video_bps > 50_000, "WHIP video bitrate {video_bps}: {body}");
    if up.loss > 0.0 {
        // Per-track feedback: the NACKs sent to this publisher and the packets they asked for.
        assert!(
            video["nacks_sent"].as_u64().unwrap_or(0) > 0
                && video["nacked_packets"].as_u64().unwrap_or(0) > 0,
            "NACKs per track: {video}"
        );
    }
    let input = v["stats"]["video_inputs"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["participant_id"] == phone).cloned())
        .unwrap_or(json!(null));
    eprintln!(
        "{room}: {report:?}; PLIs to the co-host in 17 s: {keyframes_asked}; NACKs sent: \
         {nacks}; bridge latency p50/p95 ms: {}/{}; relay up: {}; bridge input: {input}",
        v["stats"]["latency_ms_p50"],
        v["stats"]["latency_ms_p95"],
        cohost.relay.up.summary()
    );
    drop(host);
    (report, input, keyframes_asked)
}

fn jittery(loss: f64) -> Impairment {
    Impairment {
        loss,
        burst: 1.0,
        delay: Duration::from_millis(30),
        jitter: Duration::from_millis(10),
        reorder: true,
        duplicate: 0.0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_link_cohost_is_live_in_the_mix() {
    let (r, input, plis) = cohost_through(Impairment::clean(), "clean", 5).await;
    assert!(r.frames >= 300, "{r:?}");
    assert_eq!(r.placeholder, 0, "{r:?}");
    assert!(r.changed * 3 >= r.frames, "the tile keeps moving: {r:?}");
    assert_eq!(input["packets_lost"], 0, "{input}");
    assert!(plis <= 3, "keyframe requests: {plis}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reordering_alone_never_blanks_the_cohost_tile() {
    let (r, input, plis) = cohost_through(jittery(0.0), "jitter0", 1).await;
    assert!(r.frames >= 300, "{r:?}");
    assert_eq!(r.placeholder, 0, "the tile shows the co-host: {r:?}");
    assert!(r.changed * 3 >= r.frames, "the tile keeps moving: {r:?}");
    assert!(r.longest_freeze_ms <= 500.0, "{r:?}");
    assert!(
        input["packets_recovered"].as_u64().unwrap_or(0) > 0,
        "{input}"
    );
    assert!(plis <= 3, "keyframe requests: {plis}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_percent_loss_is_repaired_by_retransmission() {
    let (r, input, plis) = cohost_through(jittery(0.05), "loss5", 2).await;
    assert!(r.frames >= 300, "{r:?}");
    assert!(r.changed * 3 >= r.frames, "the tile keeps moving: {r:?}");
    assert!(r.longest_freeze_ms <= 1500.0, "{r:?}");
    assert!(
        input["packets_recovered"].as_u64().unwrap_or(0) > 0,
        "{input}"
    );
    assert!(plis <= 10, "keyframe requests: {plis}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_percent_loss_keeps_the_cohost_moving() {
    let (r, _input, plis) = cohost_through(jittery(0.10), "loss10", 3).await;
    assert!(r.frames >= 300, "{r:?}");
    assert!(r.changed * 4 >= r.frames, "the tile keeps moving: {r:?}");
    assert!(r.longest_freeze_ms <= 3000.0, "{r:?}");
    assert!(plis <= 20, "keyframe requests: {plis}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_media_that_stops_is_reported_and_its_return_too() {
    let server = Server::start_with(&[("COHOST_WEBRTC__MEDIA_STALL_TIMEOUT", "1s")]).await;
    let mut host = Client::join(&server, "stall", "host", Role::Host).await;
    let cohost = Cohost::publish(&server, "stall", Impairment::clean(), 4).await;
    let video = host
        .sig
        .wait_for("the co-host's video", |v| {
            v["type"] == "track_published" && v["track"]["kind"] == "video"
        })
        .await;
    let track = video["track"]["id"].as_str().unwrap().to_string();
    // Media flows, then the co-host's uplink dies (its ICE connection is still up for 3 s).
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, body) = server.get("/v1/rooms/stall", Some(&admin)).await;
        let v: Value = serde_json::from_str(body.trim()).unwrap_or(json!({}));
        let packets = v["tracks"]
            .as_array()
            .and_then(|a| a.iter().find(|t| t["id"] == track.as_str()))
            .and_then(|t| t["packets_in"].as_u64())
            .unwrap_or(0);
        if packets > 50 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no media from the co-host: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = server.metric("cohost_media_stalls_total").await;
    cohost.relay.cut.store(true, Ordering::Relaxed);
    let cut_at = Instant::now();
    let stalled = host
        .sig
        .wait_for("track_stalled", |v| {
            v["type"] == "track_stalled" && v["track_id"] == track.as_str() && v["stalled"] == true
        })
        .await;
    eprintln!(
        "stall reported {:?} after the uplink was cut: {stalled}",
        cut_at.elapsed()
    );
    assert!(cut_at.elapsed() < Duration::from_secs(3));
    assert!(server.metric("cohost_media_stalls_total").await >= before + 1.0);
    let (_, body) = server.get("/v1/rooms/stall", Some(&admin)).await;
    assert!(body.contains("\"stalled\":true"), "{body}");
    cohost.relay.cut.store(false, Ordering::Relaxed);
    host.sig
        .wait_for("track_stalled (resumed)", |v| {
            v["type"] == "track_stalled" && v["track_id"] == track.as_str() && v["stalled"] == false
        })
        .await;
}

/// The relay itself: what it is told to do, it does (loss rate, bursts, delay, reordering).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impairment_relay_drops_delays_and_reorders_as_configured() {
    async fn send_through(imp: Impairment, n: u16) -> (Vec<(u16, Duration)>, u64, u64) {
        let sink = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let relay = Relay::start(sink.local_addr().unwrap(), imp, Impairment::clean(), 7).await;
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let start = Instant::now();
        let mut got = vec![];
        let mut buf = [0u8; 64];
        for i in 0..n {
            client.send_to(&i.to_be_bytes(), relay.addr).await.unwrap();
            if !imp.jitter.is_zero() {
                // Packets 1 ms apart, so that +-10 ms of jitter can reorder them.
                tokio::time::sleep(Duration::from_millis(1)).await;
            } else if i % 64 == 0 {
                tokio::task::yield_now().await;
            }
            while let Ok(Ok((len, _))) =
                tokio::time::timeout(Duration::ZERO, sink.recv_from(&mut buf)).await
            {
                if len == 2 {
                    got.push((u16::from_be_bytes([buf[0], buf[1]]), start.elapsed()));
                }
            }
        }
        while let Ok(Ok((_, _))) =
            tokio::time::timeout(Duration::from_millis(300), sink.recv_from(&mut buf)).await
        {
            got.push((u16::from_be_bytes([buf[0], buf[1]]), start.elapsed()));
        }
        let up = &relay.up;
        (
            got,
            up.dropped.load(Ordering::Relaxed),
            up.reordered.load(Ordering::Relaxed),
        )
    }
    let inversions = |got: &[(u16, Duration)]| got.windows(2).filter(|w| w[1].0 < w[0].0).count();
    // 10 % independent loss.
    let (got, dropped, _) = send_through(
        Impairment {
            loss: 0.10,
            burst: 1.0,
            ..Impairment::clean()
        },
        2000,
    )
    .await;
    assert!((140..=260).contains(&dropped), "dropped {dropped} of 2000");
    assert_eq!(got.len() as u64, 2000 - dropped);
    // 10 % loss in bursts of 4 on average: the same rate, longer runs.
    let (got, dropped, _) = send_through(
        Impairment {
            loss: 0.10,
            burst: 4.0,
            ..Impairment::clean()
        },
        2000,
    )
    .await;
    assert!((100..=320).contains(&dropped), "dropped {dropped} of 2000");
    let received: std::collections::HashSet<u16> = got.iter().map(|g| g.0).collect();
    let longest = (0..2000u16)
        .fold((0, 0), |(run, best), i| {
            if received.contains(&i) {
                (0, best)
            } else {
                (run + 1, best.max(run + 1))
            }
        })
        .1;
    assert!(longest >= 4, "bursty loss: longest run {longest}");
    // Delay with jitter that reorders, and without reordering.
    let jitter = Impairment {
        delay: Duration::from_millis(30),
        jitter: Duration::from_millis(10),
        reorder: true,
        ..Impairment::clean()
    };
    let (got, _, reordered) = send_through(jitter, 500).await;
    assert_eq!(got.len(), 500);
    assert!(
        reordered > 20 && inversions(&got) > 20,
        "{reordered} reordered"
    );
    let (got, _, reordered) = send_through(
        Impairment {
            reorder: false,
            ..jitter
        },
        500,
    )
    .await;
    assert_eq!((reordered, inversions(&got)), (0, 0));
    // Every packet waited at least delay - jitter (20 ms) after it was sent (1 ms apart).
    let first = got.iter().find(|g| g.0 == 0).unwrap().1;
    assert!(first >= Duration::from_millis(19), "{first:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_that_stops_while_rtcp_goes_on_is_reported() {
    // The publisher's encoder dies, its connection (and its RTCP sender reports, about one a
    // second) goes on: only RTP counts as media.
    let server = Server::start_with(&[("COHOST_WEBRTC__MEDIA_STALL_TIMEOUT", "3s")]).await;
    let mut host = Client::join(&server, "rtcp", "host", Role::Host).await;
    let cohost = Cohost::publish(&server, "rtcp", Impairment::clean(), 6).await;
    let video = host
        .sig
        .wait_for("the co-host's video", |v| {
            v["type"] == "track_published" && v["track"]["kind"] == "video"
        })
        .await;
    let track = video["track"]["id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent = cohost.relay.up.packets.load(Ordering::Relaxed);
    cohost.stop.store(true, Ordering::SeqCst);
    let stopped_at = Instant::now();
    host.sig
        .wait_for("track_stalled", |v| {
            v["type"] == "track_stalled" && v["track_id"] == track.as_str() && v["stalled"] == true
        })
        .await;
    eprintln!(
        "stall reported {:?} after RTP stopped",
        stopped_at.elapsed()
    );
    // The connection kept sending (RTCP, consent checks) the whole time.
    assert!(cohost.relay.up.packets.load(Ordering::Relaxed) > sent + 3);
}
