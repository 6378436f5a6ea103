//! RTMP and the embedded origin. The origin (live FLV streams with a GOP cache) is served over
//! HTTP-FLV by `http/`; the RTMP server and the CDN push client build on it.
pub mod guard;
pub mod ingest;
pub mod origin;
pub mod policy;
pub mod push;
pub mod server;
pub mod session;

pub use session::drive_server_session;
