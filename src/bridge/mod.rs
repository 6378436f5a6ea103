//! The bridge: turns a room into one stream for CDN viewers (decode, composite, mix, encode,
//! publish into the embedded origin and push to destinations). So far: layouts, the video
//! compositor's pixel work and the audio mixer, all pure.
pub mod compose;
pub mod layout;
pub mod mix;
