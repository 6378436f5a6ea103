//! Simulcast through the real server binary: a webrtc-crate publisher sends three rid layers
//! of real H.264 (OpenH264, three sizes) on one track, and a webrtc-crate subscriber chooses
//! its layer with `set_track_quality`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cohost::auth::Role;
use cohost::media::rtp_h264::{Assembler, Output};
use common::{Client, Server, build_pc_with, missing_seqs, sdp_attr, wait_until};
use openh264::formats::YUVSource;
use rtc::media_stream::MediaStreamTrack;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use serde_json::{Value, json};
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCSessionDescription, SettingEngineBuilder,
};

const RIDS: [&str; 3] = ["q", "h", "f"];
/// Picture size per layer, low → high (as a browser scales 4:2:1).
const SIZES: [(usize, usize); 3] = [(128, 72), (256, 144), (512, 288)];
const H264_FMTP: &str = "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f";

/// What the simulcast publisher reports back.
struct SimulcastPublisher {
    stop: Arc<AtomicBool>,
    /// PLIs received per layer.
    plis: Arc<[AtomicU64; 3]>,
    _pc: Arc<dyn PeerConnection>,
}

impl Drop for SimulcastPublisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// How the simulcast publisher signals its offer.
enum Via<'a> {
    /// `publish` on a member's WebSocket (trickle ICE through it).
    WebSocket(&'a Client),
    /// WHIP `POST /whip/{room}` with this token.
    Whip(&'a Server, &'a str, &'a str),
}

struct NoEvents;

#[async_trait::async_trait]
impl PeerConnectionEventHandler for NoEvents {}

/// Publish one video track as three rid layers, each its own SSRC, sequence numbers and RTP
/// timestamp base, each an OpenH264 stream of one size at ~15 fps. Keyframes: when a PLI
/// names the layer, else only every 10 s (so a quick switch proves the PLI went to the layer).
async fn publish_simulcast(via: Via<'_>) -> SimulcastPublisher {
    publish_simulcast_with(via, None).await
}

/// [`publish_simulcast`]; with `bitrates`, each layer is noise encoded at that many bit/s
/// (OpenH264 in bitrate mode), so the layers cost what real camera layers do.
async fn publish_simulcast_with(via: Via<'_>, bitrates: Option<[u32; 3]>) -> SimulcastPublisher {
    let pc = match &via {
        Via::WebSocket(host) => {
            let pc = build_pc_with(
                "publisher",
                host.sig.sender(),
                Default::default(),
                Arc::new(AtomicBool::new(false)),
                None,
                None,
                &host.bind_ip,
            )
            .await;
            *host.publisher.lock().unwrap() = Some(pc.clone());
            pc
        }
        Via::Whip(..) => {
            let mut me = cohost::peer::media_engine().unwrap();
            let reg = cohost::peer::interceptors(&mut me).unwrap();
            let se = SettingEngineBuilder::new()
                .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
                .with_include_loopback_candidate(true)
                .build();
            let pc = PeerConnectionBuilder::new()
                .with_configuration(RTCConfigurationBuilder::new().build())
                .with_media_engine(me)
                .with_setting_engine(se)
                .with_interceptor_registry(reg)
                .with_handler(Arc::new(NoEvents) as Arc<dyn PeerConnectionEventHandler>)
                .with_udp_addrs(vec!["127.0.0.1:0".to_string()])
                .build()
                .await
                .unwrap();
            Arc::new(pc) as Arc<dyn PeerConnection>
        }
    };
    let ssrcs: [u32; 3] = std::array::from_fn(|_| rand::random::<u32>() | 1);
    let codec = RTCRtpCodec {
        mime_type: "video/H264".into(),
        clock_rate: 90_000,
        channels: 0,
        sdp_fmtp_line: H264_FMTP.into(),
        rtcp_feedback: vec![],
    };
    let encodings = RIDS
        .iter()
        .zip(ssrcs)
        .map(|(rid, ssrc)| RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                rid: rid.to_string(),
                ssrc: Some(ssrc),
                ..Default::default()
            },
            codec: codec.clone(),
            ..Default::default()
        })
        .collect();
    let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
        "stream".to_string(),
        "camera".to_string(),
        "camera".to_string(),
        RtpCodecKind::Video,
        encodings,
    )));
    let sender = pc
        .add_track(track.clone() as Arc<dyn TrackLocal>)
        .await
        .expect("add simulcast track");
    let offer = pc.create_offer(None).await.expect("offer");
    let sdp = offer.sdp.clone();
    assert!(sdp.contains("a=simulcast:send q;h;f"), "offer: {sdp}");
    let mid = sdp_attr(&sdp, "mid").expect("mid");
    pc.set_local_description(offer).await.expect("sld");
    let answer_sdp = match via {
        Via::WebSocket(host) => {
            let resp = host.sig.request(json!({"type":"publish","sdp":sdp})).await;
            assert_eq!(resp["type"], "response", "publish: {resp}");
            resp["result"]["sdp"].as_str().unwrap().to_string()
        }
        Via::Whip(server, room, token) => {
            let r = common::post_sdp(server, &format!("/whip/{room}"), Some(token), &sdp).await;
            assert_eq!(r.status, 201, "{}", r.body);
            r.body
        }
    };
    // The server accepts every layer.
    assert!(
        answer_sdp.contains("a=simulcast:recv q;h;f"),
        "answer: {answer_sdp}"
    );
    pc.set_remote_description(RTCSessionDescription::answer(answer_sdp).unwrap())
        .await
        .expect("srd");
    if let Via::WebSocket(host) = via {
        host.add_pending_candidates(&pc).await;
    }
    let params = sender.get_parameters().await.unwrap().rtp_parameters;
    let pt = params.codecs[0].payload_type;
    let ext = |uri: &str| {
        params
            .header_extensions
            .iter()
            .find(|e| e.uri == uri)
            .map(|e| e.id as u8)
            .unwrap_or_else(|| panic!("{uri} negotiated"))
    };
    let mid_id = ext("urn:ietf:params:rtp-hdrext:sdes:mid");
    let rid_id = ext("urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id");

    let stop = Arc::new(AtomicBool::new(false));
    let plis: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
    {
        // PLIs, by the SSRC they name.
        let (t, stop, plis) = (track.clone(), stop.clone(), plis.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                match t.poll().await {
                    Some(TrackLocalEvent::OnRtcpPacket(pkts)) => {
                        for p in pkts {
                            if let Some(pli) = p.as_any().downcast_ref::<PictureLossIndication>()
                                && let Some(l) = ssrcs.iter().position(|s| *s == pli.media_ssrc)
                            {
                                plis[l].fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    }
                    Some(_) => {}
                    None => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
    }
    let (t, stop2, plis2) = (track.clone(), stop.clone(), plis.clone());
    tokio::spawn(async move {
        use openh264::encoder::{BitRate, EncoderConfig, FrameRate, RateControlMode};
        use rtc::rtp::codec::h264::H264Payloader;
        use rtc::rtp::packetizer::Payloader;
        let mut encs: Vec<openh264::encoder::Encoder> = (0..3)
            .map(|l| match bitrates {
                None => openh264::encoder::Encoder::new().unwrap(),
                Some(b) => openh264::encoder::Encoder::with_api_config(
                    openh264::OpenH264API::from_source(),
                    EncoderConfig::new()
                        .bitrate(BitRate::from_bps(b[l]))
                        .max_frame_rate(FrameRate::from_hz(15.0))
                        .rate_control_mode(RateControlMode::Bitrate)
                        // Every frame, as a camera sends: OpenH264 otherwise skips frames
                        // of noise to keep its rate and sends a 40 KB one every 300 ms, a
                        // burst no camera makes (and one a delay-based estimate cannot read).
                        .skip_frames(false),
                )
                .unwrap(),
            })
            .collect();
        let mut textures: Vec<Vec<u8>> = SIZES
            .iter()
            .map(|(w, h)| (0..w * h).map(|_| rand::random::<u8>()).collect())
            .collect();
        let mut pay = H264Payloader::default();
        let mut seq: [u16; 3] = std::array::from_fn(|_| rand::random());
        let ts0: [u32; 3] = std::array::from_fn(|_| rand::random());
        let mut seen_plis = [0u64; 3];
        let mut tick = tokio::time::interval(Duration::from_millis(66));
        let mut n = 0u32;
        while !stop2.load(Ordering::SeqCst) {
            tick.tick().await;
            // Encoding three layers of noise takes a while: off the runtime's workers, which
            // also run this process's peer connections (their drivers stamp packets when they
            // send and receive them; blocked, they batch them and the timing is garbled).
            let encoded: Vec<Vec<u8>> = tokio::task::block_in_place(|| {
                (0..3)
                    .map(|l| {
                        let (w, h) = SIZES[l];
                        let p = plis2[l].load(Ordering::SeqCst);
                        if n.is_multiple_of(150) || p != seen_plis[l] {
                            encs[l].force_intra_frame();
                            seen_plis[l] = p;
                        }
                        // A moving gradient, so P-frames carry something.
                        let mut yuv = vec![0u8; w * h * 3 / 2];
                        if bitrates.is_some() {
                            // A noise texture scrolling sideways, an eighth of it new each frame: P
                            // frames that need bits, so the encoder runs at its target bitrate.
                            let tex = &mut textures[l];
                            let band = h / 8;
                            let b0 = (n as usize % 8) * band;
                            tex[b0 * w..(b0 + band) * w].fill_with(rand::random::<u8>);
                            let shift = (n as usize * 2) % w;
                            for y in 0..h {
                                let row = &tex[y * w..(y + 1) * w];
                                yuv[y * w..y * w + w - shift].copy_from_slice(&row[shift..]);
                                yuv[y * w + w - shift..(y + 1) * w].copy_from_slice(&row[..shift]);
                            }
                        } else {
                            for y in 0..h {
                                for x in 0..w {
                                    yuv[y * w + x] = ((x + y + n as usize * 4) % 256) as u8;
                                }
                            }
                        }
                        yuv[w * h..].fill(128);
                        encs[l]
                            .encode(&openh264::formats::YUVBuffer::from_vec(yuv, w, h))
                            .unwrap()
                            .to_vec()
                    })
                    .collect()
            });
            for (l, bs) in encoded.into_iter().enumerate() {
                let pkts = pay.payload(1100, &Bytes::from(bs)).unwrap();
                let last = pkts.len().saturating_sub(1);
                for (k, payload) in pkts.into_iter().enumerate() {
                    let mut p = common::rtp_packet(
                        ssrcs[l],
                        pt,
                        seq[l],
                        ts0[l].wrapping_add(n * 6000),
                        k == last,
                        payload,
                    );
                    seq[l] = seq[l].wrapping_add(1);
                    p.header
                        .set_extension(mid_id, Bytes::from(mid.clone()))
                        .unwrap();
                    p.header
                        .set_extension(rid_id, Bytes::from(RIDS[l]))
                        .unwrap();
                    if t.write_rtp(p).await.is_err() {
                        return;
                    }
                }
            }
            n += 1;
        }
    });
    SimulcastPublisher {
        stop,
        plis,
        _pc: pc,
    }
}

/// One decoded picture of what the subscriber received.
#[derive(Debug, Clone, Copy)]
struct Picture {
    size: (usize, usize),
    keyframe: bool,
    /// Index in the received packets of the access unit's last packet.
    at: usize,
}

/// Depacketize and decode everything received on `track_id` so far.
fn decode(viewer: &Client, track_id: &str) -> (Vec<Picture>, usize) {
    let raw: Vec<(u16, u32, bool, Bytes)> = viewer
        .received
        .lock()
        .unwrap()
        .get(track_id)
        .map(|r| r.raw.clone())
        .unwrap_or_default();
    let mut asm = Assembler::new();
    let mut dec = openh264::decoder::Decoder::new().unwrap();
    let mut pics = vec![];
    let mut errors = 0;
    for (i, (seq, ts, marker, payload)) in raw.iter().enumerate() {
        for o in asm.push(*seq, *ts, *marker, payload) {
            if let Output::Frame(au) = o {
                match dec.decode(&au.annexb) {
                    Ok(Some(pic)) => pics.push(Picture {
                        size: pic.dimensions(),
                        keyframe: au.keyframe,
                        at: i,
                    }),
                    Ok(None) => {}
                    Err(_) => errors += 1,
                }
            }
        }
    }
    (pics, errors)
}

/// Wait until pictures of `size` arrive after packet index `from`; returns when.
async fn wait_size(viewer: &Client, track_id: &str, size: (usize, usize), from: usize) -> Instant {
    wait_until(
        &format!("{size:?} pictures"),
        Duration::from_secs(15),
        async || {
            let (pics, _) = decode(viewer, track_id);
            pics.iter()
                .filter(|p| p.at >= from && p.size == size)
                .count()
                >= 5
        },
    )
    .await;
    Instant::now()
}

fn received_len(viewer: &Client, track_id: &str) -> usize {
    viewer
        .received
        .lock()
        .unwrap()
        .get(track_id)
        .map_or(0, |r| r.raw.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_switches_simulcast_layer_on_request() {
    let server = Server::start().await;
    let host = Client::join(&server, "sim", "host", Role::Host).await;
    let mut viewer = Client::watch(&server, "sim", "viewer").await;
    let publisher = publish_simulcast(Via::WebSocket(&host)).await;

    // The room hears of one video track with three layers, lowest first.
    let (track, local_id) = video_track(&mut viewer).await;
    assert_eq!(track["layers"], json!(["q", "h", "f"]), "{track}");
    let track_id = track["id"].as_str().unwrap().to_string();

    // Default: the top layer.
    wait_size(&viewer, &local_id, SIZES[2], 0).await;

    // Bad requests get clear errors.
    let bad = |v: Value| {
        let sig = &viewer.sig;
        async move { sig.request(v).await }
    };
    let r = bad(json!({"type":"set_track_quality","track_id":track_id,"layer":"x"})).await;
    assert_eq!(r["error"]["code"], "bad_request", "{r}");
    let r =
        bad(json!({"type":"set_track_quality","track_id":track_id,"max_width":0,"max_height":10}))
            .await;
    assert_eq!(r["error"]["code"], "bad_request", "{r}");
    let r = bad(json!({"type":"set_track_quality","track_id":track_id})).await;
    assert_eq!(r["error"]["code"], "bad_request", "{r}");
    let r = bad(json!({"type":"set_track_quality","track_id":"nope","layer":"q"})).await;
    assert_eq!(r["error"]["code"], "unknown_track", "{r}");
    let r = bad(json!({"type":"set_track_quality","track_id":track_id,"layer":"q","max_width":-1}))
        .await;
    assert_eq!(r["error"]["code"], "bad_request", "{r}");

    // Down to the small layer, by name.
    let plis_before = publisher.plis[0].load(Ordering::SeqCst);
    let from = received_len(&viewer, &local_id);
    let asked = Instant::now();
    let r = viewer
        .sig
        .request(json!({"type":"set_track_quality","track_id":track_id,"layer":"q"}))
        .await;
    assert_eq!(r["result"], json!({"layer":"q"}), "{r}");
    let at = wait_size(&viewer, &local_id, SIZES[0], from).await;
    println!("switch down took at most {:?}", at - asked);
    assert!(
        publisher.plis[0].load(Ordering::SeqCst) > plis_before,
        "a PLI named the small layer's SSRC"
    );

    // Up to the large one, by the size it is shown at (256x144 does not cover 400x200).
    let from = received_len(&viewer, &local_id);
    let asked = Instant::now();
    let r = viewer
        .sig
        .request(json!({"type":"set_track_quality","track_id":track_id,
            "max_width":400,"max_height":200}))
        .await;
    assert_eq!(r["result"], json!({"layer":"f"}), "{r}");
    let at = wait_size(&viewer, &local_id, SIZES[2], from).await;
    println!("switch up took at most {:?}", at - asked);

    // What the subscriber got is one stream: one SSRC, no sequence gaps or repeats,
    // timestamps that never go back, every picture decoded, and each change of size at a
    // keyframe.
    let (ssrcs, seqs, raw) = {
        let r = viewer.received.lock().unwrap();
        let e = r.get(&local_id).unwrap();
        (e.ssrcs.clone(), e.seqs.clone(), e.raw.clone())
    };
    assert_eq!(ssrcs.len(), 1, "one SSRC: {ssrcs:?}");
    assert_eq!(missing_seqs(&seqs), 0, "no sequence gaps");
    for w in seqs.windows(2) {
        assert_eq!(w[1], w[0].wrapping_add(1), "in order, no repeats");
    }
    for w in raw.windows(2) {
        let dt = w[1].1.wrapping_sub(w[0].1) as i32;
        assert!(dt >= 0, "timestamp went back by {}", -dt);
    }
    let (pics, errors) = decode(&viewer, &local_id);
    assert_eq!(errors, 0, "decode errors");
    // A new subscription may start on whichever layer's keyframe comes first and then move
    // up to the top one: count the requested switches from the first top-layer picture.
    let first_top = pics.iter().position(|p| p.size == SIZES[2]).unwrap();
    let mut switches = 0;
    for (i, w) in pics.windows(2).enumerate() {
        if w[1].size != w[0].size {
            switches += usize::from(i >= first_top);
            assert!(
                w[1].keyframe,
                "size changed at a non-key picture: {:?}",
                w[1]
            );
        }
    }
    assert_eq!(switches, 2, "f → q → f");
    // The publisher was not asked for keyframes of layers nobody switched to more than the
    // throttle allows (a few).
    println!(
        "PLIs per layer: {:?}",
        publisher
            .plis
            .iter()
            .map(|p| p.load(Ordering::SeqCst))
            .collect::<Vec<_>>()
    );
}

/// The video track of the first `track_published` with a video track, and the subscriber's
/// id for it once media arrives.
async fn video_track(viewer: &mut Client) -> (Value, String) {
    let ev = viewer
        .sig
        .wait_for("track_published", |v| {
            v["type"] == "track_published" && v["track"]["kind"] == "video"
        })
        .await;
    let viewer = &*viewer;
    wait_until(
        "the subscriber track",
        Duration::from_secs(15),
        async || {
            viewer
                .received
                .lock()
                .unwrap()
                .iter()
                .any(|(_, r)| r.kind == "video" && r.packets > 0)
        },
    )
    .await;
    let r = viewer.received.lock().unwrap();
    let local = r
        .iter()
        .find(|(_, r)| r.kind == "video")
        .map(|(k, _)| k.clone())
        .unwrap();
    (ev["track"].clone(), local)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whip_publisher_may_send_simulcast() {
    let server = Server::start().await;
    let mut viewer = Client::watch(&server, "wsim", "viewer").await;
    let token = server.token("wsim", "encoder", Role::Host);
    let _publisher = publish_simulcast(Via::Whip(&server, "wsim", &token)).await;
    let (track, local_id) = video_track(&mut viewer).await;
    assert_eq!(track["layers"], json!(["q", "h", "f"]), "{track}");
    wait_size(&viewer, &local_id, SIZES[2], 0).await;
    let from = received_len(&viewer, &local_id);
    let r = viewer
        .sig
        .request(json!({"type":"set_track_quality","track_id":track["id"],"layer":"h"}))
        .await;
    assert_eq!(r["result"], json!({"layer":"h"}), "{r}");
    wait_size(&viewer, &local_id, SIZES[1], from).await;
}

/// The viewer's layer of the room's one simulcast video track, as the room stats show it:
/// (layer forwarded, downlink cap).
async fn viewer_layer(server: &Server, room: &str, viewer: &str) -> Option<(String, String)> {
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (code, body) = server.get(&format!("/v1/rooms/{room}"), Some(&admin)).await;
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let p = v["participants"]
        .as_array()?
        .iter()
        .find(|p| p["identity"] == viewer)?;
    let l = &p["media"]["layers"][0];
    Some((
        l["layer"].as_str()?.to_string(),
        l["downlink"].as_str()?.to_string(),
    ))
}

/// The subscriber connection's bandwidth estimate (GCC, `peer::bwe`) in the room stats.
async fn viewer_estimate(server: &Server, room: &str, viewer: &str) -> Option<u64> {
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (_, body) = server.get(&format!("/v1/rooms/{room}"), Some(&admin)).await;
    let v: Value = serde_json::from_str(&body).ok()?;
    v["participants"]
        .as_array()?
        .iter()
        .find(|p| p["identity"] == viewer)?["media"]["subscriber"]["estimate_bps"]
        .as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_on_a_narrow_downlink_moves_down_a_layer_and_back_up() {
    let server = Server::start_with(&[("COHOST_WEBRTC__BANDWIDTH_ESTIMATE", "true")]).await;
    let host = Client::join(&server, "narrow", "host", Role::Host).await;
    let rate = Arc::new(AtomicU64::new(0));
    let (passed, dropped) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let policer = common::RatePolicer::new(rate.clone(), passed.clone(), dropped.clone());
    let mut viewer = Client::watch_policed(&server, "narrow", "viewer", policer).await;
    let _publisher =
        publish_simulcast_with(Via::WebSocket(&host), Some([80_000, 200_000, 1_000_000])).await;
    let (_track, local_id) = video_track(&mut viewer).await;
    wait_size(&viewer, &local_id, SIZES[2], 0).await;
    // The wire, second by second (shown with --nocapture).
    let (p2, d2) = (passed.clone(), dropped.clone());
    let trace = tokio::spawn(async move {
        let (mut lp, mut ld) = (0, 0);
        for s in 0.. {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let (p, d) = (p2.load(Ordering::SeqCst), d2.load(Ordering::SeqCst));
            println!("{s:3} s: {} passed, {} dropped", p - lp, d - ld);
            (lp, ld) = (p, d);
        }
    });

    // What the top layer costs on the wire, unlimited.
    let bits = |p: &Arc<AtomicU64>| p.load(Ordering::SeqCst);
    let top_bps = top_layer_bps(&viewer, &local_id).await;

    let est = viewer_estimate(&server, "narrow", "viewer").await;
    println!("unlimited: estimate {est:?}");
    // The subscriber's transport-wide feedback reaches the server's estimator (`peer::bwe`).
    assert!(
        est.is_some_and(|e| e >= 100_000),
        "a bandwidth estimate in the stats: {est:?}"
    );
    // The link narrows to half of that: the server moves the viewer down.
    let limit = top_bps / 2;
    rate.store(limit, Ordering::SeqCst);
    let narrowed = Instant::now();
    wait_until(
        "a lower layer for the viewer",
        Duration::from_secs(20),
        async || {
            matches!(viewer_layer(&server, "narrow", "viewer").await,
            Some((l, d)) if l != "f" && d != "any")
        },
    )
    .await;
    let (layer, cap) = viewer_layer(&server, "narrow", "viewer").await.unwrap();
    println!(
        "after {:?}: layer {layer}, downlink {cap}",
        narrowed.elapsed()
    );
    // Settled on a layer that fits: next to no loss over the next 3 s (before the server
    // probes the layer above again, `sfu::downlink::PROBE_FIRST` after the link was fine).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (p0, d0) = (bits(&passed), bits(&dropped));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (p, d) = (bits(&passed) - p0, bits(&dropped) - d0);
    println!("after the switch: {p} packets passed, {d} dropped");
    let est = viewer_estimate(&server, "narrow", "viewer").await;
    println!("limit {limit} bit/s; estimate {est:?}");
    assert!(p > 20, "video keeps flowing: {p} packets");
    assert!(
        d * 100 <= (p + d) * 3,
        "loss after the switch: {d} of {}",
        p + d
    );
    let (layer, _) = viewer_layer(&server, "narrow", "viewer").await.unwrap();
    assert_ne!(layer, "f", "still below the top layer");

    // The limit is lifted: the server probes back up to the top layer.
    rate.store(0, Ordering::SeqCst);
    let lifted = Instant::now();
    wait_until("the top layer again", Duration::from_secs(40), async || {
        matches!(viewer_layer(&server, "narrow", "viewer").await,
            Some((l, d)) if l == "f" && d == "any")
    })
    .await;
    println!("back on the top layer after {:?}", lifted.elapsed());
    trace.abort();
}

/// The layer and downlink cap of each simulcast track `viewer` receives, by the identity of
/// the track's publisher.
async fn viewer_layers(
    server: &Server,
    room: &str,
    viewer: &str,
) -> std::collections::HashMap<String, (String, String)> {
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (code, body) = server.get(&format!("/v1/rooms/{room}"), Some(&admin)).await;
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let ps = v["participants"].as_array().cloned().unwrap_or_default();
    let owner = |track: &Value| {
        ps.iter()
            .find(|p| {
                p["tracks"]
                    .as_array()
                    .is_some_and(|ts| ts.iter().any(|t| t["id"] == *track))
            })
            .and_then(|p| p["identity"].as_str())
            .map(str::to_string)
    };
    let mut out = std::collections::HashMap::new();
    if let Some(p) = ps.iter().find(|p| p["identity"] == viewer) {
        for l in p["media"]["layers"].as_array().cloned().unwrap_or_default() {
            if let (Some(who), Some(layer), Some(cap)) = (
                owner(&l["track_id"]),
                l["layer"].as_str(),
                l["downlink"].as_str(),
            ) {
                out.insert(who, (layer.to_string(), cap.to_string()));
            }
        }
    }
    out
}

/// A viewer receiving the host and a co-host, both simulcast, over one link that narrows: the
/// co-host's video steps down first and the host's stays on its top layer
/// (`sfu::allocation`), where each track judged on its own would have taken both down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn narrow_downlink_takes_the_cohost_down_before_the_host() {
    let server = Server::start().await;
    let host = Client::join(&server, "prio", "host", Role::Host).await;
    let guest = Client::join(&server, "prio", "guest", Role::Cohost).await;
    let rate = Arc::new(AtomicU64::new(0));
    let (passed, dropped) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let policer = common::RatePolicer::new(rate.clone(), passed.clone(), dropped.clone());
    let viewer = Client::watch_policed(&server, "prio", "viewer", policer).await;
    let bitrates = Some([80_000, 200_000, 1_000_000]);
    let _host_pub = publish_simulcast_with(Via::WebSocket(&host), bitrates).await;
    let _guest_pub = publish_simulcast_with(Via::WebSocket(&guest), bitrates).await;
    // Both videos arrive, each on its top layer.
    wait_until(
        "both videos on the top layer",
        Duration::from_secs(20),
        async || {
            let l = viewer_layers(&server, "prio", "viewer").await;
            l.len() == 2 && l.values().all(|(layer, cap)| layer == "f" && cap == "any")
        },
    )
    .await;
    // What both top layers cost on the wire, unlimited.
    let bytes = || -> u64 {
        viewer
            .received
            .lock()
            .unwrap()
            .values()
            .filter(|r| r.kind == "video")
            .map(|r| r.raw.iter().map(|p| p.3.len() as u64 + 40).sum::<u64>())
            .sum()
    };
    let (b0, t0) = (bytes(), Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let both = (bytes() - b0) * 8 * 1000 / t0.elapsed().as_millis() as u64;
    println!("both top layers: {both} bit/s");
    assert!(both > 800_000, "two top layers: {both}");
    // Room for the host's top layer and the co-host's middle one, not for both tops.
    let limit = both * 65 / 100;
    rate.store(limit, Ordering::SeqCst);
    let narrowed = Instant::now();
    wait_until(
        "the co-host below its top layer",
        Duration::from_secs(25),
        async || {
            let l = viewer_layers(&server, "prio", "viewer").await;
            l.get("guest")
                .is_some_and(|(layer, cap)| layer != "f" && cap != "any")
        },
    )
    .await;
    println!("co-host down after {:?}", narrowed.elapsed());
    // Settled: the host kept its top layer all along.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let l = viewer_layers(&server, "prio", "viewer").await;
        println!("layers: {l:?}");
        let (layer, cap) = l.get("host").cloned().unwrap_or_default();
        assert_eq!(
            (layer.as_str(), cap.as_str()),
            ("f", "any"),
            "the host's video stays on its top layer while the co-host's steps down: {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The bridge decodes each simulcast input from the smallest layer that covers its tile at the
/// output size. Output 640x360 in pip: the host fills the canvas (no layer covers it: the top,
/// 512x288), the co-host's 160x90 tile is covered by the 256x144 layer ("h", not the top and
/// not the 128x72 one). A grid makes the co-host's tile 320x360: the top layer again. The
/// output decodes without an error across the switches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_takes_the_smallest_layer_that_covers_each_tile() {
    let server = Server::start().await;
    let host = Client::join(&server, "simbr", "host", Role::Host).await;
    let guest = Client::join(&server, "simbr", "guest", Role::Cohost).await;
    let host_pid = host.join["participant"]["id"].as_str().unwrap().to_string();
    let guest_pid = guest.join["participant"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let _host_pub = publish_simulcast(Via::WebSocket(&host)).await;
    let _guest_pub = publish_simulcast(Via::WebSocket(&guest)).await;
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (s, body) = server
        .send_json(
            "POST",
            "/v1/rooms/simbr/bridge",
            &admin,
            &json!({"width": 640, "height": 360, "layout": "pip"}),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    // (layer received, layer asked for) of a participant's video input.
    let layer = |v: &Value, pid: &str| -> (Value, Value) {
        v["stats"]["video_inputs"]
            .as_array()
            .and_then(|a| a.iter().find(|i| i["participant_id"] == pid))
            .map_or((Value::Null, Value::Null), |i| {
                (i["layer"].clone(), i["layer_target"].clone())
            })
    };
    // On layer `rid` (received and asked for) and pictures decoded from it.
    let on = |pid: &str, rid: &str| {
        let (pid, rid) = (pid.to_string(), rid.to_string());
        move |v: &Value| {
            let (now, want) = layer(v, &pid);
            let decoded = v["stats"]["video_inputs"]
                .as_array()
                .and_then(|a| a.iter().find(|i| i["participant_id"] == pid.as_str()))
                .and_then(|i| i["frames_decoded"].as_u64())
                .unwrap_or(0);
            now == rid && want == rid && decoded >= 5
        }
    };
    let asked = Instant::now();
    common::wait_bridge(
        &server,
        &admin,
        "simbr",
        30,
        "co-host on h in pip",
        on(&guest_pid, "h"),
    )
    .await;
    println!("co-host on layer h after {:?}", asked.elapsed());
    let v = common::wait_bridge(
        &server,
        &admin,
        "simbr",
        10,
        "host on f",
        on(&host_pid, "f"),
    )
    .await;
    common::wait_frames(&server, &admin, "simbr", 30).await;
    println!("bridge stats in pip: {}", v["stats"]);

    // Record the output while the layout changes: the co-host's tile grows, its layer goes up
    // (its decoder gets a new SPS at the top layer's IDR mid-stream).
    let recording = record_output(&server, "simbr", 8);
    let change = async {
        // Let the recording start on the pip picture: once ffmpeg plays from the origin.
        wait_player(&server, "simbr", &admin).await;
        set_layout(&server, "simbr", &admin, "grid").await;
        let asked = Instant::now();
        let v = common::wait_bridge(
            &server,
            &admin,
            "simbr",
            10,
            "co-host on f in a grid",
            on(&guest_pid, "f"),
        )
        .await;
        println!(
            "co-host on layer f {:?} after the grid: {}",
            asked.elapsed(),
            v["stats"]
        );
        // The host's grid tile (320x360) is still only covered by the top layer.
        assert_eq!(layer(&v, &host_pid).0, "f", "{v}");
    };
    let (out, ()) = tokio::join!(recording, change);
    assert_decoded(out, 60);
    // The bridge's own decoders never failed on a layer switch.
    let v = common::wait_bridge(&server, &admin, "simbr", 5, "stats", |_| true).await;
    for i in v["stats"]["video_inputs"].as_array().unwrap() {
        assert_eq!(i["decode_errors"], 0, "{i}");
    }
}

/// A simulcast host alone is passed through from its top layer: the bridge's subscription may
/// start on whichever layer's keyframe comes first, but the stream (its size, its header) starts
/// on the top layer's IDR, so the output is the top layer's size and its own H.264.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulcast_host_alone_is_passed_through_from_the_top_layer() {
    // The test publisher makes an IDR every 10 s unless asked: passing through allows that.
    let server = Server::start_with(&[("COHOST_BRIDGE__PASSTHROUGH_MAX_GOP", "30s")]).await;
    let host = Client::join(&server, "simsolo", "host", Role::Host).await;
    let host_pid = host.join["participant"]["id"].as_str().unwrap().to_string();
    let _host_pub = publish_simulcast(Via::WebSocket(&host)).await;
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (s, body) = server
        .send_json("POST", "/v1/rooms/simsolo/bridge", &admin, &json!({}))
        .await;
    assert_eq!(s, 201, "{body}");
    let v = common::wait_bridge(&server, &admin, "simsolo", 20, "passthrough", |v| {
        v["stats"]["path"] == "passthrough"
            && v["stats"]["passthrough_frames"].as_u64().unwrap_or(0) >= 15
    })
    .await;
    let (w, h) = SIZES[2];
    assert_eq!(v["stats"]["width"], w, "{v}");
    assert_eq!(v["stats"]["height"], h, "{v}");
    let input = v["stats"]["video_inputs"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["participant_id"] == host_pid.as_str()))
        .cloned()
        .unwrap_or_default();
    assert_eq!(input["layer_target"], "f", "{v}");
    let url = format!("http://{}/live/simsolo.flv", server.addr);
    let out = tokio::process::Command::new("ffmpeg")
        .args([
            "-v", "error", "-i", &url, "-map", "0:v", "-t", "3", "-f", "framemd5", "-",
        ])
        .output()
        .await
        .expect("ffmpeg runs");
    let errors = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && errors.trim().is_empty(),
        "ffmpeg: {errors}"
    );
    let v = common::wait_bridge(&server, &admin, "simsolo", 5, "stats", |_| true).await;
    assert_eq!(v["stats"]["path"], "passthrough", "{v}");
    assert_eq!(v["stats"]["encoded_frames"], 0, "{v}");
}

/// A simulcast host shown small goes down a layer, and when it is alone on screen again it is
/// back on the top layer and passed through again, from the top layer's IDR: the output keeps
/// the top layer's size and decodes without an error throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulcast_host_in_a_grid_goes_down_a_layer_and_passthrough_resumes_on_the_top_one() {
    let server = Server::start_with(&[("COHOST_BRIDGE__PASSTHROUGH_MAX_GOP", "30s")]).await;
    let host = Client::join(&server, "simgrid", "host", Role::Host).await;
    let mut first = Client::join(&server, "simgrid", "first", Role::Cohost).await;
    let mut second = Client::join(&server, "simgrid", "second", Role::Cohost).await;
    let host_pid = host.join["participant"]["id"].as_str().unwrap().to_string();
    let _host_pub = publish_simulcast(Via::WebSocket(&host)).await;
    first.publish_real((30, 30, 220), 550.0).await.unwrap();
    second.publish_real((30, 200, 30), 660.0).await.unwrap();
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    // Solo pinned: the host is passed through although co-hosts are in the room.
    let (s, body) = server
        .send_json(
            "POST",
            "/v1/rooms/simgrid/bridge",
            &admin,
            &json!({"layout": "solo"}),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    let host_input = |v: &Value| {
        v["stats"]["video_inputs"]
            .as_array()
            .and_then(|a| a.iter().find(|i| i["participant_id"] == host_pid.as_str()))
            .cloned()
            .unwrap_or_default()
    };
    let on = |v: &Value, rid: &str| {
        let i = host_input(v);
        i["layer"] == rid && i["layer_target"] == rid
    };
    let v = common::wait_bridge(&server, &admin, "simgrid", 20, "passthrough", |v| {
        v["stats"]["path"] == "passthrough"
            && v["stats"]["passthrough_frames"].as_u64().unwrap_or(0) >= 15
            && on(v, "f")
    })
    .await;
    let (w, h) = SIZES[2];
    assert_eq!(
        (v["stats"]["width"].clone(), v["stats"]["height"].clone()),
        (json!(w), json!(h))
    );

    let recording = record_output(&server, "simgrid", 10);
    let change = async {
        wait_player(&server, "simgrid", &admin).await;
        // Three in a 2x2 grid of 512x288: the host's 256x144 tile is covered by "h".
        set_layout(&server, "simgrid", &admin, "grid").await;
        let v = common::wait_bridge(
            &server,
            &admin,
            "simgrid",
            10,
            "host on h in the grid",
            |v| on(v, "h") && v["stats"]["path"] == "mixing",
        )
        .await;
        let passed = v["stats"]["passthrough_frames"].as_u64().unwrap_or(0);
        // Alone on screen again: the top layer, and passing through once its IDR is there.
        set_layout(&server, "simgrid", &admin, "solo").await;
        let v = common::wait_bridge(
            &server,
            &admin,
            "simgrid",
            10,
            "passthrough again on f",
            |v| {
                on(v, "f")
                    && v["stats"]["path"] == "passthrough"
                    && v["stats"]["passthrough_frames"].as_u64().unwrap_or(0) >= passed + 15
            },
        )
        .await;
        println!("back to passthrough: {}", v["stats"]);
        assert_eq!(v["stats"]["width"], w, "{v}");
    };
    let (out, ()) = tokio::join!(recording, change);
    assert_decoded(out, 60);
}

/// The same with the kernel's `tbf` as the narrow link: the server runs in a network namespace
/// whose egress is rate-limited, the viewer (and the publisher) in the test's namespace, so
/// what the server sends the viewer waits in a real queue and is tail-dropped when it is full.
/// Skips (with a message) where network namespaces cannot be made (not root).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_behind_a_tbf_limited_link_moves_down_a_layer_and_back_up() {
    behind_tbf(false).await;
}

/// The same with the delay-based estimate on (`webrtc.bandwidth_estimate`): the server sees
/// the `tbf` queue grow from the viewer's transport-wide feedback and moves it down on that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_behind_a_tbf_limited_link_is_moved_down_when_its_queue_grows() {
    behind_tbf(true).await;
}

async fn behind_tbf(estimate: bool) {
    let ns = match common::netns::Netns::create() {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!("SKIPPED: cannot make a network namespace here ({e})");
            return;
        }
    };
    let env: &[(&str, &str)] = if estimate {
        &[("COHOST_WEBRTC__BANDWIDTH_ESTIMATE", "true")]
    } else {
        &[]
    };
    let server = Server::start_in_netns(&ns.name, &ns.ns_ip, env).await;
    let host = Client::join_at(&server, "tbf", "host", Role::Host, &ns.root_ip).await;
    let mut viewer = Client::watch_at(&server, "tbf", "viewer", &ns.root_ip).await;
    let publisher =
        publish_simulcast_with(Via::WebSocket(&host), Some([80_000, 200_000, 1_000_000])).await;
    let plis = || -> Vec<u64> {
        publisher
            .plis
            .iter()
            .map(|p| p.load(Ordering::SeqCst))
            .collect()
    };
    let (_track, local_id) = video_track(&mut viewer).await;
    wait_size(&viewer, &local_id, SIZES[2], 0).await;

    let seqs = || -> Vec<u16> {
        viewer
            .received
            .lock()
            .unwrap()
            .get(&local_id)
            .map(|r| r.seqs.clone())
            .unwrap_or_default()
    };
    let top_bps = top_layer_bps(&viewer, &local_id).await;
    // A link that carries everything is not found queueing.
    let overuses_before = server.metric("cohost_downlink_overuses_total").await;
    let est = viewer_estimate(&server, "tbf", "viewer").await;
    println!("unlimited: estimate {est:?}, overuses {overuses_before}");
    if estimate {
        assert!(est.is_some(), "a bandwidth estimate in the stats");
    }

    let kbit = top_bps / 2 / 1000;
    ns.limit(Some(kbit)).expect("tbf");
    let narrowed = Instant::now();
    let plis_before = plis();
    // First the cap (the server's judgement), then the layer (the switch waits for a keyframe
    // of the lower layer, through the queue). Both are read from the room stats, whose answer
    // crosses the narrowed link too: they show up here seconds after the server's log has
    // them ("subscriber downlink: simulcast layer cap changed").
    wait_until(
        "a cap for the viewer",
        Duration::from_secs(20),
        async || matches!(viewer_layer(&server, "tbf", "viewer").await, Some((_, d)) if d != "any"),
    )
    .await;
    println!(
        "capped after {:?}; tbf dropped {}",
        narrowed.elapsed(),
        ns.dropped()
    );
    wait_until(
        "a lower layer for the viewer",
        Duration::from_secs(20),
        async || {
            matches!(viewer_layer(&server, "tbf", "viewer").await,
            Some((l, d)) if l != "f" && d != "any")
        },
    )
    .await;
    let (layer, cap) = viewer_layer(&server, "tbf", "viewer").await.unwrap();
    let overuses = server.metric("cohost_downlink_overuses_total").await - overuses_before;
    println!(
        "tbf {kbit} kbit/s: after {:?} layer {layer}, downlink {cap}; tbf dropped {}; \
         delay overuses {overuses}",
        narrowed.elapsed(),
        ns.dropped()
    );
    if estimate {
        assert!(overuses > 0.0, "the queue growing was seen: {overuses}");
    }
    // Wait until the layer stays put for 4 s (a second step down may follow the first while
    // the queue the top layer built drains), then: next to no loss (sequence gaps) over 3 s,
    // before the server probes the layer above again.
    let mut last = (layer, cap, Instant::now());
    wait_until("the layer to settle", Duration::from_secs(30), async || {
        let now = viewer_layer(&server, "tbf", "viewer").await.unwrap();
        if (now.0.as_str(), now.1.as_str()) != (last.0.as_str(), last.1.as_str()) {
            println!(
                "  then {} / {} after {:?}",
                now.0,
                now.1,
                narrowed.elapsed()
            );
            last = (now.0, now.1, Instant::now());
        }
        last.2.elapsed() >= Duration::from_secs(4)
    })
    .await;
    // Keyframes asked of each layer (q, h, f) since the link narrowed: every switch asks one,
    // and so does a subscriber that lost part of a picture.
    println!(
        "settled after {:?}: keyframe requests per layer since narrowing {:?}",
        narrowed.elapsed(),
        plis()
            .iter()
            .zip(&plis_before)
            .map(|(a, b)| a - b)
            .collect::<Vec<_>>()
    );
    let (from, dropped0) = (seqs().len(), ns.dropped());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got = seqs();
    let window = &got[from.saturating_sub(1)..];
    let missing = common::missing_seqs(window);
    let dropped = ns.dropped() - dropped0;
    let old_nacks = server.metric("cohost_nack_old_layer_dropped_total").await;
    let over = server.metric("cohost_nack_over_budget_total").await;
    println!(
        "after the switch: {} packets, {missing} missing, tbf dropped {dropped}; old-layer \
         NACKs dropped {old_nacks}; over budget {over}",
        window.len()
    );
    assert!(window.len() > 20, "video keeps flowing: {}", window.len());
    // The viewer asked for far more retransmissions than its full link could take: the
    // server's budget (peer::nack_budget) left most of them out. (Moved down on the queue's
    // growth, before it overflowed, the viewer may have had little to ask for.)
    if !estimate {
        assert!(over > 0.0, "retransmissions over budget: {over}");
    }
    assert!(
        missing * 100 <= (window.len() + missing) * 3,
        "loss after the switch: {missing} of {}",
        window.len() + missing
    );

    ns.limit(None).expect("lift tbf");
    let lifted = Instant::now();
    wait_until("the top layer again", Duration::from_secs(40), async || {
        matches!(viewer_layer(&server, "tbf", "viewer").await,
            Some((l, d)) if l == "f" && d == "any")
    })
    .await;
    println!("back on the top layer after {:?}", lifted.elapsed());
}

/// ffmpeg reading the room's HTTP-FLV output for `secs` seconds, decoding every picture.
fn record_output(
    server: &Server,
    room: &str,
    secs: u32,
) -> impl std::future::Future<Output = std::io::Result<std::process::Output>> {
    let url = format!("http://{}/live/{room}.flv", server.addr);
    let secs = secs.to_string();
    tokio::process::Command::new("ffmpeg")
        .args([
            "-v", "error", "-i", &url, "-map", "0:v", "-t", &secs, "-f", "framemd5", "-",
        ])
        .output()
}

/// Wait until the origin counts a player of the room (ffmpeg has started reading).
async fn wait_player(server: &Server, room: &str, admin: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = server.get(&format!("/v1/rooms/{room}"), Some(admin)).await;
        let v: Value = serde_json::from_str(body.trim()).unwrap_or(json!({}));
        if v["counts"]["viewers"].as_u64().unwrap_or(0) >= 1 {
            return;
        }
        assert!(Instant::now() < deadline, "ffmpeg never played: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn set_layout(server: &Server, room: &str, admin: &str, layout: &str) {
    let (s, body) = server
        .send_json(
            "PATCH",
            &format!("/v1/rooms/{room}/bridge"),
            admin,
            &json!({ "layout": layout }),
        )
        .await;
    assert_eq!(s, 200, "{body}");
}

/// What [`record_output`] read decoded without an error, at least `min_frames` pictures.
fn assert_decoded(out: std::io::Result<std::process::Output>, min_frames: usize) {
    let out = out.expect("ffmpeg runs");
    let errors = String::from_utf8_lossy(&out.stderr);
    let frames = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("0,"))
        .count();
    assert!(
        out.status.success() && errors.trim().is_empty(),
        "ffmpeg: {errors}"
    );
    assert!(frames >= min_frames, "decoded {frames} frames");
}

/// What the viewer receives of `local_id` over 3 s on the wire (payload + 40 bytes of headers
/// per packet), in bit/s; it must be the top layer's (over 400 kbit/s) to be worth narrowing.
async fn top_layer_bps(viewer: &Client, local_id: &str) -> u64 {
    let bytes = || {
        viewer
            .received
            .lock()
            .unwrap()
            .get(local_id)
            .map_or(0, |r| {
                r.raw.iter().map(|p| p.3.len() as u64 + 40).sum::<u64>()
            })
    };
    let (b0, t0) = (bytes(), Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let bps = (bytes() - b0) * 8 * 1000 / t0.elapsed().as_millis() as u64;
    println!("top layer: {bps} bit/s");
    assert!(bps > 400_000, "the top layer is the big one: {bps}");
    bps
}
