//! Arbitrary FLV video and audio tag bodies into the RTMP ingest converters (AVC -> RTP,
//! AAC -> Opus). The first byte picks video or audio for each length-prefixed body.
//! Body: `rtmp_ingest::run` in fuzz/targets.rs (replayed by tests/fuzz_regressions.rs).
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::rtmp_ingest::run(data));
