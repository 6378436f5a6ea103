//! The embedded origin: named live streams of FLV tags, each with a GOP cache, so a player that
//! connects (HTTP-FLV now, RTMP play later) starts at once on a keyframe: it gets the metadata,
//! the sequence headers and the tags since the last keyframe, then the live tags.
//!
//! One publisher per stream name at a time; any number of players. A slow player never holds
//! up the publisher or other players: each player has a bounded queue, and one that falls too
//! far behind is dropped (its connection closes) rather than buffering without bound.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{mpsc, watch};

use crate::media::flv::{TAG_AUDIO, TAG_SCRIPT, TAG_VIDEO, Tag};

/// Tags queued per player before it is considered too slow and dropped.
pub const PLAYER_QUEUE: usize = 1024;
/// Largest GOP kept (tags). A stream without keyframes must not grow the cache forever.
pub const MAX_GOP_TAGS: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OriginError {
    #[error("stream {0} already has a publisher")]
    Busy(String),
    #[error("no such stream: {0}")]
    NotFound(String),
}

#[derive(Default)]
struct StreamState {
    metadata: Option<Arc<Tag>>,
    video_config: Option<Arc<Tag>>,
    audio_config: Option<Arc<Tag>>,
    /// Tags since (and including) the last video keyframe.
    gop: Vec<Arc<Tag>>,
    players: Vec<mpsc::Sender<Arc<Tag>>>,
    publishing: bool,
}

#[derive(Default)]
pub struct Origin {
    streams: Mutex<HashMap<String, StreamState>>,
    /// Counts publishes (any stream): whoever waits for a stream to start (a recording, the
    /// automatic recorder) watches it and then looks with [`Origin::play`]. One value, so
    /// waiting costs nothing per stream and cannot queue up.
    publishes: watch::Sender<u64>,
}

/// The publishing side of a stream; the stream ends for players when it is dropped.
pub struct Publisher {
    origin: Arc<Origin>,
    name: String,
}

/// A player: the tags to send first, then live tags from `rx` until it returns `None`.
pub struct Player {
    pub initial: Vec<Arc<Tag>>,
    pub rx: mpsc::Receiver<Arc<Tag>>,
    /// Whether the stream had audio / video sequence headers when play started (FLV header
    /// flags; players use them to decide what to wait for).
    pub has_audio: bool,
    pub has_video: bool,
}

impl Origin {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, StreamState>> {
        match self.streams.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    pub fn publish(self: &Arc<Self>, name: &str) -> Result<Publisher, OriginError> {
        let mut s = self.lock();
        let st = s.entry(name.to_string()).or_default();
        if st.publishing {
            return Err(OriginError::Busy(name.to_string()));
        }
        *st = StreamState {
            publishing: true,
            ..StreamState::default()
        };
        drop(s);
        self.publishes.send_modify(|n| *n = n.wrapping_add(1));
        Ok(Publisher {
            origin: self.clone(),
            name: name.to_string(),
        })
    }

    /// Changes after every publish: subscribe first, then try [`Origin::play`], then wait for
    /// a change, so a publish between the two is never missed.
    pub fn publishes(&self) -> watch::Receiver<u64> {
        self.publishes.subscribe()
    }

    /// Start playing a live stream (it must have a publisher).
    pub fn play(&self, name: &str) -> Result<Player, OriginError> {
        let mut s = self.lock();
        let st = s
            .get_mut(name)
            .filter(|st| st.publishing)
            .ok_or_else(|| OriginError::NotFound(name.to_string()))?;
        let mut initial: Vec<Arc<Tag>> = vec![];
        initial.extend(st.metadata.iter().cloned());
        initial.extend(st.video_config.iter().cloned());
        initial.extend(st.audio_config.iter().cloned());
        initial.extend(st.gop.iter().cloned());
        let (tx, rx) = mpsc::channel(PLAYER_QUEUE);
        st.players.push(tx);
        Ok(Player {
            initial,
            rx,
            has_audio: st.audio_config.is_some(),
            has_video: st.video_config.is_some(),
        })
    }

    pub fn is_live(&self, name: &str) -> bool {
        self.lock().get(name).is_some_and(|s| s.publishing)
    }

    pub fn player_count(&self, name: &str) -> usize {
        self.lock().get(name).map_or(0, |s| s.players.len())
    }

    pub fn stream_names(&self) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, s)| s.publishing)
            .map(|(n, _)| n.clone())
            .collect()
    }
}

impl Publisher {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Send one tag to the stream's players and keep what late players need.
    pub fn send(&self, tag: Tag) {
        let tag = Arc::new(tag);
        let mut s = self.origin.lock();
        let Some(st) = s.get_mut(&self.name) else {
            return;
        };
        match tag.kind {
            TAG_SCRIPT => st.metadata = Some(tag.clone()),
            TAG_VIDEO if tag.is_sequence_header() => st.video_config = Some(tag.clone()),
            TAG_AUDIO if tag.is_sequence_header() => st.audio_config = Some(tag.clone()),
            TAG_VIDEO if tag.is_video_keyframe() => {
                st.gop.clear();
                st.gop.push(tag.clone());
            }
            _ => {
                // Before the first keyframe there is nothing a player could start from.
                if !st.gop.is_empty() && st.gop.len() < MAX_GOP_TAGS {
                    st.gop.push(tag.clone());
                }
            }
        }
        // A full queue means a player that cannot keep up: drop it (its connection ends).
        st.players.retain(|p| {
            !matches!(
                p.try_send(tag.clone()),
                Err(mpsc::error::TrySendError::Full(_)) | Err(mpsc::error::TrySendError::Closed(_))
            )
        });
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        let mut s = self.origin.lock();
        // Removing the state drops every player's sender: their streams end.
        s.remove(&self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::flv;

    fn tag(kind: u8, body: Vec<u8>, ts: u32) -> Tag {
        Tag {
            kind,
            timestamp_ms: ts,
            body,
        }
    }

    #[tokio::test]
    async fn late_player_starts_on_the_last_keyframe() {
        let o = Origin::new();
        let p = o.publish("room").unwrap();
        assert_eq!(
            o.publish("room").err(),
            Some(OriginError::Busy("room".into()))
        );
        p.send(tag(TAG_SCRIPT, vec![2], 0));
        p.send(tag(TAG_VIDEO, flv::avc_sequence_header(&[1]), 0));
        p.send(tag(TAG_VIDEO, flv::avc_frame(true, 0, &[1]), 0));
        p.send(tag(TAG_VIDEO, flv::avc_frame(false, 0, &[2]), 33));
        p.send(tag(TAG_VIDEO, flv::avc_frame(true, 0, &[3]), 66));
        p.send(tag(TAG_AUDIO, flv::aac_frame(&[4]), 70));
        let mut pl = o.play("room").unwrap();
        let ts: Vec<u32> = pl.initial.iter().map(|t| t.timestamp_ms).collect();
        // metadata, sequence header, then the GOP that starts at the keyframe at 66 ms.
        assert_eq!(ts, vec![0, 0, 66, 70]);
        assert!(pl.initial[2].is_video_keyframe());
        p.send(tag(TAG_VIDEO, flv::avc_frame(false, 0, &[5]), 99));
        assert_eq!(pl.rx.recv().await.unwrap().timestamp_ms, 99);
        drop(p);
        assert!(pl.rx.recv().await.is_none(), "stream ended");
        assert_eq!(
            o.play("room").err(),
            Some(OriginError::NotFound("room".into()))
        );
    }

    #[tokio::test]
    async fn slow_player_is_dropped_not_buffered() {
        let o = Origin::new();
        let p = o.publish("s").unwrap();
        let _slow = o.play("s").unwrap();
        for i in 0..(PLAYER_QUEUE as u32 + 10) {
            p.send(tag(TAG_AUDIO, flv::aac_frame(&[0]), i));
        }
        assert_eq!(o.player_count("s"), 0);
    }
}
