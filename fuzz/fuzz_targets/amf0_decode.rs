//! Arbitrary bytes into the AMF0 decoder; what decodes must re-encode and decode the same.
#![no_main]

use cohost::media::amf0;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(values) = amf0::decode_all(data) {
        let again = amf0::decode_all(&amf0::encode_all(&values));
        // NaN payloads compare unequal; everything else must round-trip.
        if let Ok(again) = again {
            assert_eq!(format!("{values:?}"), format!("{again:?}"));
        }
    }
});
