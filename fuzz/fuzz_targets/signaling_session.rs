//! Feed arbitrary frames to the signaling session state machine: it must never panic, whatever
//! arrives before or after a successful join.
#![no_main]

use std::time::{Duration, Instant};

use cohost::auth::{Authenticator, Role};
use cohost::config::{AuthConfig, SignalingConfig};
use cohost::signaling::session::Session;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let auth = Authenticator::new(&AuthConfig::default()).expect("auth");
    let now = Instant::now();
    let mut s = Session::new(SignalingConfig::default(), auth.clone(), Some("r".into()), now);
    // Half the inputs start from a joined session so post-join parsing is reached too.
    if data.first().is_some_and(|b| b & 1 == 1) {
        let t = auth.mint("r", "fuzz", Role::Host, None).expect("mint");
        s.on_text(now, &format!(r#"{{"type":"join","token":"{t}"}}"#));
        s.admitted();
    }
    for (i, frame) in data.split(|b| *b == 0xff).enumerate() {
        let t = now + Duration::from_millis(i as u64 * 7);
        match std::str::from_utf8(frame) {
            Ok(text) => {
                let _ = s.on_text(t, text);
            }
            Err(_) => {
                let _ = s.on_binary(t, frame.len());
            }
        }
        let _ = s.on_tick(t);
    }
});
