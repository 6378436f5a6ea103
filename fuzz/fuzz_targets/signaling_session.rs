//! Feed arbitrary frames to the signaling session state machine: it must never panic, whatever
//! arrives before or after a successful join.
//! Body: `signaling_session::run` in fuzz/targets.rs (replayed by tests/fuzz_regressions.rs).
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::signaling_session::run(data));
