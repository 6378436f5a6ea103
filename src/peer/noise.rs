//! Counting, instead of logging, what `rtc` warns about once per packet.
//!
//! `rtc` 0.21 logs every error of its receive pipeline as a WARN line
//! (`SrtpHandler.handle_read got error: ...`). While DTLS is still setting up, media that a
//! peer already sends cannot be decrypted yet: about 200 lines per connection, all the same,
//! burying what matters. Later, a packet that fails SRTP authentication or replay checks is
//! another line each. This layer swallows those events before any other layer sees them and
//! counts them (`cohost_srtp_*` metrics); what else `rtc` warns about passes through.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// Packets that arrived before the connection's SRTP keys (DTLS still running).
pub static SRTP_BEFORE_KEYS: AtomicU64 = AtomicU64::new(0);
/// Packets that failed SRTP/SRTCP decryption or parsing after the keys were set.
pub static SRTP_READ_ERRORS: AtomicU64 = AtomicU64::new(0);

const TARGET: &str = "rtc::peer_connection::handler";
const SRTP_READ: &str = "SrtpHandler.handle_read got error";
const BEFORE_KEYS: &str = "remote_srtp_context is not set yet";

#[derive(Default)]
struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        }
    }
}

/// The layer; add it to the subscriber (it filters for every other layer).
#[derive(Debug, Default, Clone, Copy)]
pub struct RtcNoise;

impl RtcNoise {
    /// Whether `message` (of a WARN from `rtc`'s handler chain) is counted and not logged.
    pub fn swallow(message: &str) -> bool {
        if !message.starts_with(SRTP_READ) {
            return false;
        }
        if message.contains(BEFORE_KEYS) {
            SRTP_BEFORE_KEYS.fetch_add(1, Ordering::Relaxed);
        } else {
            SRTP_READ_ERRORS.fetch_add(1, Ordering::Relaxed);
        }
        true
    }
}

impl<S: Subscriber> Layer<S> for RtcNoise {
    fn event_enabled(&self, event: &Event<'_>, _: Context<'_, S>) -> bool {
        let meta = event.metadata();
        if *meta.level() != Level::WARN || !meta.target().starts_with(TARGET) {
            return true;
        }
        let mut m = Message::default();
        event.record(&mut m);
        !Self::swallow(&m.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn srtp_warnings_are_counted_not_logged() {
        let before = SRTP_BEFORE_KEYS.load(Ordering::Relaxed);
        let errors = SRTP_READ_ERRORS.load(Ordering::Relaxed);
        let seen = std::sync::Arc::new(AtomicU64::new(0));
        struct Count(std::sync::Arc<AtomicU64>);
        impl<S: Subscriber> Layer<S> for Count {
            fn on_event(&self, _: &Event<'_>, _: Context<'_, S>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let sub = tracing_subscriber::registry()
            .with(RtcNoise)
            .with(Count(seen.clone()));
        tracing::subscriber::with_default(sub, || {
            for _ in 0..3 {
                tracing::warn!(target: "rtc::peer_connection::handler", "SrtpHandler.handle_read got error: remote_srtp_context is not set yet for rtp_packet 127.0.0.1:5000");
            }
            tracing::warn!(target: "rtc::peer_connection::handler", "SrtpHandler.handle_read got error: srtp auth tag mismatch");
            tracing::warn!(target: "rtc::peer_connection::handler", "IceHandler.handle_read got error: something else");
            tracing::warn!("our own warning");
        });
        assert_eq!(
            seen.load(Ordering::Relaxed),
            2,
            "only the other two are logged"
        );
        assert!(SRTP_BEFORE_KEYS.load(Ordering::Relaxed) >= before + 3);
        assert!(SRTP_READ_ERRORS.load(Ordering::Relaxed) > errors);
    }
}
