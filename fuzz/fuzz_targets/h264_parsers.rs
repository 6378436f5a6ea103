//! Arbitrary bytes into the H.264 helpers (Annex B / AVCC splitting, SPS parsing).
#![no_main]

use cohost::media::h264;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for nal in h264::split_annexb(data) {
        let _ = h264::sps_dimensions(nal);
    }
    let _ = h264::split_avcc(data);
    let mut sps = vec![0x67];
    sps.extend_from_slice(data);
    let _ = h264::sps_dimensions(&sps);
    let _ = h264::decoder_config(&sps, data);
});
