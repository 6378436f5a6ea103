//! Arbitrary stream keys and signed-URL query strings into the verifiers.
#![no_main]

use cohost::auth::sign;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let _ = sign::verify_stream_key(b"fuzz-secret-0123456789", &s, 0);
    let _ = sign::key_for_log(&s);
    let (name, q) = sign::split_query(&s);
    let _ = sign::verify_signed(b"fuzz-secret-0123456789", name, &q, 0);
});
