//! Bytes a client sends after the RTMP handshake, into the server's guarded session: the
//! guard (`cohost::rtmp::guard`) and a real `rml_rtmp` server session with its AMF0 decoder,
//! accepting every connect/publish/play request (`cohost::rtmp::drive_server_session`). The
//! first byte picks the read size. Errors are fine (the server closes that connection); a
//! crash is not, and neither is a panic inside `rml_rtmp` that only `catch_unwind` stopped:
//! the guard is meant to refuse every input that makes `rml_rtmp` panic.
#![no_main]

use cohost::rtmp::session::SessionError;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(SessionError::Panicked(msg)) = cohost::rtmp::drive_server_session(data) {
        panic!("rml_rtmp panicked behind the guard: {msg}");
    }
});
