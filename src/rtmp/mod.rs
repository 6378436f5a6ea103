//! RTMP and the embedded origin. The origin (live FLV streams with a GOP cache) is served over
//! HTTP-FLV by `http/`; the RTMP server and the CDN push client build on it.
pub mod ingest;
pub mod origin;
pub mod policy;
pub mod push;
pub mod server;
