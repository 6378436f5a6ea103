//! What a subscriber's downlink carries, estimated by the sender: GCC (`rtc`'s delay- and
//! loss-based estimator) over the transport-wide congestion feedback every browser sends.
//!
//! `rtc` runs the estimator inside the interceptor chain and hands its target only to a pacer
//! (or, as an attribute on the feedback packet, to connection stats that our keyframe
//! interceptor does not pass on). cohost does not pace: a pacer queues forwarded media behind
//! an estimate that starts at 300 kbit/s, and up to 4096 packets deep. So the estimator is
//! wrapped and publishes each new target where the connection's statistics read it.
//! Caveat: without a pacer and with nothing probing, the estimate of an idle link keeps
//! creeping up (GCC's increase is not capped by what is sent), so a drop is the meaningful
//! signal, not the level.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rtc::interceptor::{BandwidthEstimator, EstimatorStats, Gcc, PacketReport};

/// GCC, publishing its target (bit/s, 0 before the first feedback) to `out`.
pub struct PublishingGcc {
    inner: Gcc,
    out: Arc<AtomicU64>,
}

impl PublishingGcc {
    pub fn new(out: Arc<AtomicU64>) -> Self {
        Self {
            inner: Gcc::default(),
            out,
        }
    }
}

impl BandwidthEstimator for PublishingGcc {
    fn on_reports(&mut self, now: Instant, reports: &[PacketReport]) {
        self.inner.on_reports(now, reports);
        if !reports.is_empty() {
            self.out
                .store(self.inner.target_bitrate() as u64, Ordering::Relaxed);
        }
    }

    fn target_bitrate(&self) -> f64 {
        self.inner.target_bitrate()
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.inner.handle_timeout(now);
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.inner.poll_timeout()
    }

    fn stats(&self) -> EstimatorStats {
        self.inner.stats()
    }
}
