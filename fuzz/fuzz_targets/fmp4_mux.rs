//! FLV tags built from arbitrary records into the fMP4 fragmenter (recording, HLS).
//! Body: `fmp4_mux::run` in fuzz/targets.rs (replayed by tests/fuzz_regressions.rs).
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::fmp4_mux::run(data));
