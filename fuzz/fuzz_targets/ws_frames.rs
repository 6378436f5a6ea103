//! Arbitrary bytes as the byte stream a client sends on an upgraded signaling WebSocket: the
//! server's frame codec (tungstenite in server role, with the size limits `ws_upgrade` in
//! src/http/mod.rs sets) parses them, and every message goes into the signaling `Session` the
//! way the connection driver feeds it. Neither the codec nor the session may panic, whatever the
//! frames (unmasked, fragmented, oversized lengths, bad UTF-8, control frames mid-message).
//!
//! Byte 0 is a flag byte: bit 0 starts from a joined session (post-join parsing), bit 1 refuses
//! instead of admitting a join. The literal `$T` in a text message is replaced by a valid host
//! token for the room, so that the fuzzer can reach the join path through real frames.
//! Body: `ws_frames::run` in fuzz/targets.rs (replayed by tests/fuzz_regressions.rs).
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::ws_frames::run(data));
