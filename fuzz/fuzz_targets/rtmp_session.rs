//! Bytes a client sends after the RTMP handshake, into the server's guarded session: the
//! guard (`cohost::rtmp::guard`) and a real `rml_rtmp` server session with its AMF0 decoder,
//! accepting every connect/publish/play request (`cohost::rtmp::drive_server_session`). The
//! first byte picks the read size. Errors are fine (the server closes that connection); a
//! crash is not, and neither is a panic inside `rml_rtmp` that only `catch_unwind` stopped:
//! the guard is meant to refuse every input that makes `rml_rtmp` panic.
//! Body: `rtmp_session::run` in fuzz/targets.rs (replayed by tests/fuzz_regressions.rs).
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::rtmp_session::run(data));
