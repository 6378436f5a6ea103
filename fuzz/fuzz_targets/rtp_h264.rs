//! Arbitrary RTP packets and arrival times through the reordering buffer into the H.264
//! frame assembler.
//! Body: `rtp_h264::run` in fuzz/targets.rs (replayed by tests/fuzz_regressions.rs).
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::rtp_h264::run(data));
