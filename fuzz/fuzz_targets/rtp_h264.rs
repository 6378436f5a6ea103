//! Arbitrary RTP payloads, sequence numbers and timestamps into the H.264 frame assembler.
#![no_main]

use bytes::Bytes;
use cohost::media::rtp_h264::Assembler;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut a = Assembler::new();
    // Records: [seq hi, seq lo, ts byte, flags, len, payload...]
    let mut rest = data;
    while rest.len() >= 5 {
        let seq = u16::from_be_bytes([rest[0], rest[1]]);
        let ts = u32::from(rest[2]) * 3000;
        let marker = rest[3] & 1 == 1;
        let len = usize::from(rest[4]).min(rest.len() - 5);
        let payload = Bytes::copy_from_slice(&rest[5..5 + len]);
        let _ = a.push(seq, ts, marker, &payload);
        rest = &rest[5 + len..];
    }
});
