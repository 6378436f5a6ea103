//! Driving Janus (VideoRoom plugin over its HTTP API). Placeholder until implemented.

use std::sync::Arc;

use crate::stats::Sink;
use crate::target::{Joined, PublishTracks, Target};

pub struct JanusTarget;

impl JanusTarget {
    pub async fn start(_bin: &str) -> anyhow::Result<Self> {
        anyhow::bail!("the Janus target is not implemented yet")
    }
}

#[async_trait::async_trait]
impl Target for JanusTarget {
    fn name(&self) -> &'static str {
        "janus"
    }
    fn pid(&self) -> u32 {
        0
    }
    async fn join(
        &self,
        _room: &str,
        _identity: &str,
        _media: Option<PublishTracks>,
        _sink: Arc<Sink>,
    ) -> anyhow::Result<Box<dyn Joined>> {
        anyhow::bail!("not implemented")
    }
    async fn shutdown(&self) {}
}
