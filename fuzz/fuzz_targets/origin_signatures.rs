//! Arbitrary stream keys and signed-URL query strings into the verifiers.
//! Body: `origin_signatures::run` in fuzz/targets.rs (replayed by tests/fuzz_regressions.rs).
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::origin_signatures::run(data));
