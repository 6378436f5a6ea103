//! Arbitrary bytes, split into arbitrary chunks, into the incremental FLV reader.
#![no_main]

use cohost::media::flv::Reader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(1, |b| usize::from(*b).max(1));
    let mut r = Reader::new();
    for chunk in data.chunks(split) {
        r.push(chunk);
        loop {
            match r.next_tag() {
                Ok(Some(t)) => {
                    let _ = (t.is_video_keyframe(), t.is_sequence_header());
                }
                Ok(None) | Err(_) => break,
            }
        }
    }
});
