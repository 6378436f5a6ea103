//! The bridge: turns a room into one stream for CDN viewers (decode, composite, mix, encode,
//! publish into the embedded origin and push to destinations). So far the building blocks:
//! per-participant video and audio inputs (RTP → decoded pictures / PCM), layouts, the
//! compositor's pixel work and the audio mixer. The clocked pipeline, encoders and the
//! control API that tie them together are not written yet.
pub mod audio_in;
pub mod compose;
pub mod encode;
pub mod layout;
pub mod mix;
pub mod pipeline;
pub mod video_in;
