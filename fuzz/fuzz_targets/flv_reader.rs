//! Arbitrary bytes, split into arbitrary chunks, into the incremental FLV reader.
//! Body: `flv_reader::run` in fuzz/targets.rs (replayed by tests/fuzz_regressions.rs).
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::flv_reader::run(data));
