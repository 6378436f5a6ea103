//! The body of every fuzz target, one function per target, shared by the targets
//! (fuzz_targets/NAME.rs) and by the regression test that replays saved crashing inputs under
//! `cargo test` (tests/fuzz_regressions.rs, inputs in fuzz/regressions/NAME/).
#![allow(dead_code)]

pub mod signaling_session {
    use std::time::{Duration, Instant};

    use cohost::auth::{Authenticator, Role};
    use cohost::config::{AuthConfig, SignalingConfig};
    use cohost::signaling::session::Session;

    /// Feed arbitrary frames to the signaling session state machine: it must never panic, whatever
    /// arrives before or after a successful join.
    pub fn run(data: &[u8]) {
        let auth = Authenticator::new(&AuthConfig::default()).expect("auth");
        let now = Instant::now();
        let mut s = Session::new(
            SignalingConfig::default(),
            auth.clone(),
            Some("r".into()),
            now,
        );
        // Half the inputs start from a joined session so post-join parsing is reached too.
        if data.first().is_some_and(|b| b & 1 == 1) {
            let t = auth.mint("r", "fuzz", Role::Host, None).expect("mint");
            s.on_text(now, &format!(r#"{{"type":"join","token":"{t}"}}"#));
            s.admitted();
        }
        for (i, frame) in data.split(|b| *b == 0xff).enumerate() {
            let t = now + Duration::from_millis(i as u64 * 7);
            match std::str::from_utf8(frame) {
                Ok(text) => {
                    let _ = s.on_text(t, text);
                }
                Err(_) => {
                    let _ = s.on_binary(t, frame.len());
                }
            }
            let _ = s.on_tick(t);
        }
    }
}

pub mod flv_reader {
    use cohost::media::flv::Reader;

    /// Arbitrary bytes, split into arbitrary chunks, into the incremental FLV reader.
    pub fn run(data: &[u8]) {
        let split = data.first().map_or(1, |b| usize::from(*b).max(1));
        let mut r = Reader::new();
        for chunk in data.chunks(split) {
            r.push(chunk);
            while let Ok(Some(t)) = r.next_tag() {
                let _ = (t.is_video_keyframe(), t.is_sequence_header());
            }
        }
    }
}

pub mod amf0_decode {
    use cohost::media::amf0;

    /// Arbitrary bytes into the AMF0 decoder; what decodes must re-encode and decode the same.
    pub fn run(data: &[u8]) {
        if let Ok(values) = amf0::decode_all(data) {
            let again = amf0::decode_all(&amf0::encode_all(&values));
            // NaN payloads compare unequal; everything else must round-trip.
            if let Ok(again) = again {
                assert_eq!(format!("{values:?}"), format!("{again:?}"));
            }
        }
    }
}

pub mod h264_parsers {
    use cohost::bridge::passthrough::{SourceSets, SourceState};
    use cohost::media::rtp_h264::AccessUnit;
    use cohost::media::{h264, h264_ids, rtp_keyframe};

    /// Arbitrary bytes into the H.264 helpers (Annex B / AVCC splitting, SPS parsing,
    /// parameter-set ids and their renumbering) and into the passthrough checks a host's
    /// access unit goes through.
    pub fn run(data: &[u8]) {
        for nal in h264::split_annexb(data) {
            let _ = h264::sps_dimensions(nal);
            let _ = h264_ids::sps_id(nal);
            let _ = h264_ids::pps_ids(nal);
            let _ = h264_ids::pps_is_cavlc(nal);
            let _ = h264_ids::slice_header(nal);
            let _ = h264_ids::renumber_sps(nal, 1);
            let _ = h264_ids::renumber_pps(nal, 1, 1);
            let _ = h264_ids::renumber_slice(nal, 2);
        }
        let au = AccessUnit {
            annexb: data.to_vec(),
            rtp_timestamp: 0,
            keyframe: true,
        };
        if let Some(sets) = SourceSets::from_idr(&au) {
            let _ = sets.check(&au);
            let _ = SourceState::default().next(&sets, &au);
            let _ = h264_ids::decoder_config(&[&sets.sps], &[&sets.pps]);
        }
        let _ = h264::split_avcc(data);
        // What the SFU reads from every simulcast packet: keyframe or not, and a keyframe's
        // SPS (layer sizes).
        let _ = rtp_keyframe::h264_is_keyframe(data);
        let _ = rtp_keyframe::vp8_is_keyframe(data);
        let _ = rtp_keyframe::h264_sps(data).and_then(h264::sps_dimensions);
        let mut sps = vec![0x67];
        sps.extend_from_slice(data);
        let _ = h264::sps_dimensions(&sps);
        let _ = h264::decoder_config(&sps, data);
    }
}

pub mod rtp_h264 {
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use cohost::media::jitter::{Packet, Reorder, ReorderConfig};
    use cohost::media::rtp_h264::Assembler;

    /// Arbitrary RTP payloads, sequence numbers, timestamps and arrival times through the
    /// reordering buffer into the H.264 frame assembler, as a bridge video input takes them.
    pub fn run(data: &[u8]) {
        let config = ReorderConfig::default();
        let mut r = Reorder::new(config, 90_000);
        let mut a = Assembler::new();
        let mut now = Instant::now();
        // Records: [seq hi, seq lo, ts byte, flags, len, payload...]; flags bit 0 is the
        // marker, bits 1-7 the milliseconds since the previous packet.
        let mut rest = data;
        while rest.len() >= 5 {
            let seq = u16::from_be_bytes([rest[0], rest[1]]);
            let timestamp = u32::from(rest[2]) * 3000;
            let marker = rest[3] & 1 == 1;
            now += Duration::from_millis(u64::from(rest[3] >> 1));
            let len = usize::from(rest[4]).min(rest.len() - 5);
            let payload = Bytes::copy_from_slice(&rest[5..5 + len]);
            r.push(
                Packet {
                    seq,
                    timestamp,
                    marker,
                    payload,
                },
                now,
            );
            assert!(
                r.len() <= config.capacity,
                "the reordering buffer is bounded"
            );
            if let Some(d) = r.deadline() {
                assert!(d <= now + config.max_wait, "the wait is bounded");
            }
            while let Some(p) = r.pop(now) {
                let _ = a.push(p.seq, p.timestamp, p.marker, &p.payload);
            }
            rest = &rest[5 + len..];
        }
    }
}

pub mod rtmp_ingest {
    use cohost::rtmp::ingest::{AudioIngest, VideoIngest, parse_avc_config};

    /// Arbitrary FLV video and audio tag bodies into the RTMP ingest converters (AVC -> RTP,
    /// AAC -> Opus). The first byte picks video or audio for each length-prefixed body.
    pub fn run(data: &[u8]) {
        let mut v = VideoIngest::new(1, 0, 0);
        let Ok(mut a) = AudioIngest::new(2, 0, 0) else {
            return;
        };
        let _ = parse_avc_config(data);
        let mut rest = data;
        let mut ms = 0u32;
        while rest.len() >= 2 {
            let (kind, len) = (rest[0], usize::from(rest[1]) * 4);
            rest = &rest[2..];
            let body = &rest[..len.min(rest.len())];
            rest = &rest[body.len()..];
            ms = ms.wrapping_add(33);
            if kind & 1 == 0 {
                let _ = v.push(body, ms);
            } else {
                let _ = a.push(body, ms);
            }
        }
    }
}

pub mod origin_signatures {
    use cohost::auth::sign;

    /// Arbitrary stream keys and signed-URL query strings into the verifiers.
    pub fn run(data: &[u8]) {
        let s = String::from_utf8_lossy(data);
        let _ = sign::verify_stream_key(b"fuzz-secret-0123456789", &s, 0);
        let _ = sign::key_for_log(&s);
        let (name, q) = sign::split_query(&s);
        let _ = sign::verify_signed(b"fuzz-secret-0123456789", name, &q, 0);
    }
}

pub mod ws_frames {
    use std::io::{self, Cursor, Read, Write};
    use std::time::{Duration, Instant};

    use cohost::auth::{Authenticator, Role};
    use cohost::config::{AuthConfig, SignalingConfig};
    use cohost::signaling::protocol::{ErrorCode, close_code};
    use cohost::signaling::session::{Action, Session, request_id_of};
    use tungstenite::protocol::{Role as WsRole, WebSocket, WebSocketConfig};
    use tungstenite::{Error, Message};

    /// The client's bytes to read; what the server writes (pongs, close replies) is discarded.
    struct Stream(Cursor<Vec<u8>>);

    impl Read for Stream {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.read(buf)
        }
    }

    impl Write for Stream {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn apply(s: &mut Session, refuse: bool, actions: Vec<Action>) {
        for a in actions {
            match a {
                // The driver serialises every message it sends.
                Action::Send(m) => {
                    let _ = m.to_json();
                }
                // The driver decides whether the room has space.
                Action::Join { id, .. } if refuse => {
                    let more =
                        s.refused(id, ErrorCode::RoomFull, "room full", close_code::ROOM_FULL);
                    apply(s, refuse, more);
                }
                Action::Join { .. } => s.admitted(),
                // An unknown token: the connection waits for a join again.
                Action::Resume { .. } if refuse => s.resume_refused(),
                Action::Resume { .. } => s.admitted(),
                Action::Dispatch { .. } | Action::Ping | Action::Close { .. } => {}
            }
        }
    }

    /// Arbitrary bytes as the byte stream a client sends on an upgraded signaling WebSocket: the
    /// server's frame codec (tungstenite in server role, with the size limits `ws_upgrade` in
    /// src/http/mod.rs sets) parses them, and every message goes into the signaling `Session` the
    /// way the connection driver feeds it. Neither the codec nor the session may panic, whatever the
    /// frames (unmasked, fragmented, oversized lengths, bad UTF-8, control frames mid-message).
    ///
    /// Byte 0 is a flag byte: bit 0 starts from a joined session (post-join parsing), bit 1 refuses
    /// instead of admitting a join. The literal `$T` in a text message is replaced by a valid host
    /// token for the room, so that the fuzzer can reach the join path through real frames.
    pub fn run(data: &[u8]) {
        let Some((&flags, stream)) = data.split_first() else {
            return;
        };
        let cfg = SignalingConfig::default();
        let max_bytes = cfg.max_message_bytes;
        // Same limits as ws_upgrade: 16x the protocol limit, at least 1 MiB.
        let hard = (cfg.max_message_bytes * 16).max(1 << 20);
        let ws_cfg = WebSocketConfig::default()
            .max_message_size(Some(hard))
            .max_frame_size(Some(hard));
        let mut ws = WebSocket::from_raw_socket(
            Stream(Cursor::new(stream.to_vec())),
            WsRole::Server,
            Some(ws_cfg),
        );

        let auth = Authenticator::new(&AuthConfig::default()).expect("auth");
        let token = auth.mint("r", "fuzz", Role::Host, None).expect("mint");
        let now = Instant::now();
        let mut s = Session::new(cfg, auth, Some("r".into()), now);
        let refuse = flags & 2 == 2;
        if flags & 1 == 1 {
            let join = format!(r#"{{"type":"join","token":"{token}"}}"#);
            let actions = s.on_text(now, &join);
            apply(&mut s, false, actions);
        }

        // Every read consumes input or ends the loop; the bound is only a guard.
        for i in 0..10_000u64 {
            let t = now + Duration::from_millis(i * 7);
            let actions = match ws.read() {
                // As ws_session in src/http/mod.rs: an oversized text is reduced to its length and
                // request id before it reaches the session.
                Ok(Message::Text(text)) if text.len() > max_bytes => {
                    s.on_too_large(t, text.len(), request_id_of(text.as_str()))
                }
                Ok(Message::Text(text)) => s.on_text(t, &text.replace("$T", &token)),
                Ok(Message::Binary(b)) => s.on_binary(t, b.len()),
                Ok(Message::Ping(_) | Message::Pong(_)) => {
                    s.on_activity(t);
                    vec![]
                }
                Ok(Message::Close(_)) => break,
                Ok(Message::Frame(_)) => vec![],
                Err(Error::Io(_) | Error::ConnectionClosed | Error::AlreadyClosed) => break,
                // Protocol errors, capacity, bad UTF-8: the server logs and drops the connection.
                Err(_) => break,
            };
            apply(&mut s, refuse, actions);
            let actions = s.on_tick(t);
            apply(&mut s, refuse, actions);
            if s.is_closed() {
                break;
            }
        }
    }
}

pub mod whip_sdp {
    use std::io::Cursor;
    use std::time::Instant;

    use cohost::participant::whip::{answer_sdpfrag, parse_sdpfrag};
    use cohost::peer::{
        NatMap, interceptors, media_engine, sending_ssrcs, simulcast_sections, with_ice_credentials,
    };
    use std::sync::OnceLock;

    use rtc::crypto::{self, SignatureScheme};
    use rtc::peer_connection::RTCPeerConnectionBuilder;
    use rtc::peer_connection::certificate::{CertificateParams, RTCCertificate};
    use rtc::peer_connection::configuration::RTCConfigurationBuilder;
    use rtc::peer_connection::sdp::RTCSessionDescription;
    use rtc::peer_connection::transport::RTCIceCandidateInit;
    use rtc::sdp::SessionDescription;

    /// WHIP/WHEP bodies: an SDP offer (`POST /whip/{room}`, `POST /whep/{room}`) and a trickle
    /// fragment (`PATCH` on the session, `application/trickle-ice-sdpfrag`).
    ///
    /// The offer goes where the server sends it: the SDP parser of `rtc` (which `webrtc` 0.21 is built
    /// on; `RTCSessionDescription::offer` parses eagerly and `sdp::SessionDescription::unmarshal` is
    /// its parser), then a sans-IO `rtc` peer connection with cohost's own codecs and interceptors
    /// (`peer::media_engine`, `peer::interceptors`): set the remote offer, create and set the answer,
    /// add the fragment's candidates (`participant::whip::parse_sdpfrag`); when the fragment
    /// carries ICE credentials, an ICE restart as the server does one (`peer::with_ice_credentials`
    /// on the offer, applied again and answered, `participant::whip::answer_sdpfrag` on the answer).
    /// cohost's own SDP helpers run on the same text (`peer::sending_ssrcs` and
    /// `peer::simulcast_sections` on offers,
    /// `peer::NatMap::sdp` on answers). The whip module's private pre-checks (`check_offer`, `ice_ufrag`, `receiving_kinds`) only
    /// iterate lines and compare strings.
    ///
    /// Input: UTF-8 (the server answers 400 to anything else), offer and fragment separated by the
    /// first NUL byte.
    /// One DTLS certificate for every run: generating a key per peer connection would dominate
    /// the run time and it does not depend on the input.
    fn certificate() -> Option<RTCCertificate> {
        static CERT: OnceLock<Option<RTCCertificate>> = OnceLock::new();
        CERT.get_or_init(|| {
            let provider = crypto::default_provider().ok()?;
            let params = CertificateParams::new(vec!["cohost-fuzz".to_owned()]).ok()?;
            RTCCertificate::generate(provider.crypto(), SignatureScheme::EcdsaP256Sha256, params)
                .ok()
        })
        .clone()
    }

    pub fn run(data: &[u8]) {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let (offer, frag) = text.split_once('\0').unwrap_or((text, ""));

        // The parser alone, and a marshal/unmarshal round trip of what it accepts.
        if let Ok(parsed) = SessionDescription::unmarshal(&mut Cursor::new(offer.as_bytes())) {
            let again = parsed.marshal();
            let _ = SessionDescription::unmarshal(&mut Cursor::new(again.as_bytes()));
        }
        let _ = sending_ssrcs(offer);
        let _ = simulcast_sections(offer);
        let nat = NatMap::new(&["203.0.113.7".into(), "2001:db8::7".into()]);
        let _ = nat.sdp(offer);
        let cands = parse_sdpfrag(frag);

        let Ok(desc) = RTCSessionDescription::offer(offer.to_string()) else {
            return;
        };
        let Ok(mut me) = media_engine() else {
            return;
        };
        let Ok(reg) = interceptors(&mut me) else {
            return;
        };
        let now = Instant::now();
        let Some(cert) = certificate() else {
            return;
        };
        let Ok(mut pc) = RTCPeerConnectionBuilder::new()
            .with_configuration(
                RTCConfigurationBuilder::new()
                    .with_certificates(vec![cert])
                    .build(),
            )
            .with_media_engine(me)
            .with_interceptor_registry(reg)
            .build(now)
        else {
            return;
        };
        if pc.set_remote_description(now, desc).is_err() {
            return;
        }
        if let Ok(answer) = pc.create_answer(None) {
            let _ = nat.sdp(&answer.sdp);
            let _ = pc.set_local_description(now, answer);
        }
        if let Ok(frag) = cands {
            if let (Some(ufrag), Some(pwd)) = (&frag.ufrag, &frag.pwd) {
                let restarted = with_ice_credentials(offer, ufrag, pwd, &frag.candidates);
                if let Ok(desc) = RTCSessionDescription::offer(restarted)
                    && pc.set_remote_description(now, desc).is_ok()
                    && let Ok(answer) = pc.create_answer(None)
                {
                    let _ = answer_sdpfrag(&answer.sdp);
                    let _ = pc.set_local_description(now, answer);
                }
            }
            for c in frag.candidates {
                let _ = pc.add_remote_candidate(RTCIceCandidateInit {
                    candidate: c.candidate,
                    sdp_mid: c.sdp_mid,
                    sdp_mline_index: c.sdp_mline_index,
                    username_fragment: c.username_fragment,
                    ..Default::default()
                });
            }
        }
    }
}

pub mod rtmp_session {
    use cohost::rtmp::session::SessionError;

    /// Bytes a client sends after the RTMP handshake, into the server's guarded session: the
    /// guard (`cohost::rtmp::guard`) and a real `rml_rtmp` server session with its AMF0 decoder,
    /// accepting every connect/publish/play request (`cohost::rtmp::drive_server_session`). The
    /// first byte picks the read size. Errors are fine (the server closes that connection); a
    /// crash is not, and neither is a panic inside `rml_rtmp` that only `catch_unwind` stopped:
    /// the guard is meant to refuse every input that makes `rml_rtmp` panic.
    pub fn run(data: &[u8]) {
        if let Err(SessionError::Panicked(msg)) = cohost::rtmp::drive_server_session(data) {
            panic!("rml_rtmp panicked behind the guard: {msg}");
        }
    }
}

pub mod fmp4_mux {
    use cohost::media::flv::{TAG_AUDIO, TAG_SCRIPT, TAG_VIDEO, Tag};
    use cohost::media::fmp4::{Fragmenter, init_segment};

    /// Walk top-level boxes: every size must fit exactly.
    fn check_boxes(b: &[u8]) {
        let mut i = 0usize;
        while i < b.len() {
            let size = u32::from_be_bytes(b[i..i + 4].try_into().expect("4 bytes")) as usize;
            assert!(size >= 8 && i + size <= b.len(), "box size {size} at {i}");
            i += size;
        }
    }

    /// Records of [control, ts_hi, ts_lo, len, body...] become FLV tags fed to the fMP4
    /// fragmenter (the path RTMP ingest bytes take to HLS and recordings). Control bits 0-1 pick
    /// the tag type, bit 2 asks for a cut after the tag, bit 3 for a finish. Whatever comes in,
    /// nothing panics and every fragment and init segment is well-formed.
    pub fn run(data: &[u8]) {
        let mut f = Fragmenter::new();
        let mut rest = data;
        while rest.len() >= 4 {
            let (ctl, ts, len) = (rest[0], u16::from_be_bytes([rest[1], rest[2]]), rest[3]);
            let end = (4 + usize::from(len)).min(rest.len());
            let body = rest[4..end].to_vec();
            rest = &rest[end..];
            let kind = [TAG_AUDIO, TAG_VIDEO, TAG_SCRIPT, TAG_VIDEO][usize::from(ctl & 3)];
            let tag = Tag {
                kind,
                timestamp_ms: u32::from(ts) * 16,
                body,
            };
            if let Ok(p) = f.push(&tag) {
                if let Some(fr) = p.flushed {
                    check_boxes(&fr.bytes);
                }
                if p.new_tracks {
                    let t = f.tracks().expect("tracks after new_tracks");
                    check_boxes(&init_segment(t, Some(u64::from(ts))));
                }
            }
            let out = if ctl & 8 != 0 {
                f.finish()
            } else if ctl & 4 != 0 {
                f.cut()
            } else {
                None
            };
            if let Some(fr) = out {
                check_boxes(&fr.bytes);
            }
        }
        if let Some(fr) = f.finish() {
            check_boxes(&fr.bytes);
        }
    }
}
