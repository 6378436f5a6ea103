//! Arbitrary bytes into the H.264 helpers (Annex B / AVCC splitting, SPS parsing).
//! Body: `h264_parsers::run` in fuzz/targets.rs (replayed by tests/fuzz_regressions.rs).
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::h264_parsers::run(data));
