//! WHIP/WHEP bodies: an SDP offer (`POST /whip/{room}`, `POST /whep/{room}`) and a trickle
//! fragment (`PATCH` on the session, `application/trickle-ice-sdpfrag`).
//!
//! The offer goes where the server sends it: the SDP parser of `rtc` (which `webrtc` 0.21 is built
//! on; `RTCSessionDescription::offer` parses eagerly and `sdp::SessionDescription::unmarshal` is
//! its parser), then a sans-IO `rtc` peer connection with cohost's own codecs and interceptors
//! (`peer::media_engine`, `peer::interceptors`): set the remote offer, create and set the answer,
//! add the fragment's candidates (`participant::whip::parse_sdpfrag`); when the fragment carries
//! ICE credentials, an ICE restart as the server does one (`peer::with_ice_credentials` on the
//! offer, applied again and answered, `participant::whip::answer_sdpfrag` on the answer).
//! cohost's own SDP helpers run on the same text (`peer::sending_ssrcs` and `peer::simulcast_sections`
//! on offers,
//! `peer::NatMap::sdp` on answers). The whip module's private pre-checks (`check_offer`, `ice_ufrag`, `receiving_kinds`) only
//! iterate lines and compare strings.
//!
//! Input: UTF-8 (the server answers 400 to anything else), offer and fragment separated by the
//! first NUL byte.
//! Body: `whip_sdp::run` in fuzz/targets.rs (replayed by tests/fuzz_regressions.rs).
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::whip_sdp::run(data));
