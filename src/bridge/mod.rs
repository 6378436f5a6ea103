//! The bridge: turns a room into one stream for CDN viewers (decode, composite, mix, encode,
//! publish into the embedded origin; destinations are pushed from there). `pipeline` ties the
//! pieces together: per-participant inputs (RTP → decoded pictures / PCM), layouts, the
//! compositor, the mixer and the encoders.
pub mod audio_in;
pub mod compose;
pub mod control;
pub mod encode;
pub mod layout;
pub mod mix;
pub mod output;
pub mod passthrough;
pub mod pipeline;
pub mod rtp_out;
pub mod slate;
pub mod sync;
pub mod video_in;
