//! cohost: a co-host live streaming server. See `../shared/DESIGN.md` and README.md.
pub mod app;
pub mod auth;
pub mod bridge;
pub mod config;
pub mod conn_limit;
pub mod hls;
pub mod http;
pub mod media;
pub mod metrics;
pub mod participant;
pub mod peer;
pub mod recording;
pub mod room;
pub mod rtmp;
pub mod sfu;
pub mod signaling;
pub mod webhooks;
