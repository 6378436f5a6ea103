//! Arbitrary bytes into the AMF0 decoder; what decodes must re-encode and decode the same.
//! Body: `amf0_decode::run` in fuzz/targets.rs (replayed by tests/fuzz_regressions.rs).
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::amf0_decode::run(data));
