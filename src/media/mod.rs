//! Pure codec and container helpers: no I/O, no clocks (time comes in as arguments), no async. The bridge and the RTMP
//! origin build on these; each parser here is fuzzed (see `fuzz/`).
pub mod aac;
pub mod amf0;
pub mod flv;
pub mod fmp4;
pub mod goertzel;
pub mod h264;
pub mod h264_ids;
pub mod h264_repeat;
pub mod jitter;
pub mod rtp_h264;
pub mod rtp_keyframe;
