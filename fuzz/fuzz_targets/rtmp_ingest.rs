//! Arbitrary FLV video and audio tag bodies into the RTMP ingest converters (AVC -> RTP,
//! AAC -> Opus). The first byte picks video or audio for each length-prefixed body.
#![no_main]

use cohost::rtmp::ingest::{AudioIngest, VideoIngest, parse_avc_config};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut v = VideoIngest::new(1, 0, 0);
    let Ok(mut a) = AudioIngest::new(2, 0, 0) else {
        return;
    };
    let _ = parse_avc_config(data);
    let mut rest = data;
    let mut ms = 0u32;
    while rest.len() >= 2 {
        let (kind, len) = (rest[0], usize::from(rest[1]) * 4);
        rest = &rest[2..];
        let body = &rest[..len.min(rest.len())];
        rest = &rest[body.len()..];
        ms = ms.wrapping_add(33);
        if kind & 1 == 0 {
            let _ = v.push(body, ms);
        } else {
            let _ = a.push(body, ms);
        }
    }
});
