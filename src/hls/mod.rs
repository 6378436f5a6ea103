//! HLS and LL-HLS from the embedded origin: per stream, a task plays the origin's stream like
//! any player and feeds the sans-IO [`packager::Packager`]; HTTP handlers (`src/http/hls.rs`)
//! read its window and wait on its updates.
//!
//! **On demand.** A packager starts with the first playlist request of a stream and stops
//! `hls.idle_stop` after the last HLS request. Most rooms are solo and watched over HTTP-FLV
//! or a CDN; packaging every stream all the time would cost each of them a copy of every
//! frame and a window of memory (seven 2 s segments of a 2.5 Mbit/s stream are about 4.4 MB)
//! for nobody. The price is the first viewer's wait: the origin's GOP cache gives the
//! packager the current GOP at once, so the first segment is complete at the stream's next
//! keyframe (at most `bridge.gop`, 2 s, for a mixed room). MediaMTX makes the same choice by
//! default (its muxer starts on the first request).
//!
//! **Names.** A packager's files carry a run id (its start time), `init-{run}-{n}.mp4`,
//! `seg-{run}-{msn}.m4s`, `part-{run}-{id}.m4s`, so a file name never means two different
//! contents (a packager stopped for idleness and started again counts from 0 again) and
//! caches may keep them.
//!
//! **Restarts.** When the origin stream ends (bridge stopped, RTMP publisher gone) the task
//! keeps the window and waits for the stream to come back while someone still asks; what
//! comes then follows an `EXT-X-DISCONTINUITY` with a new `EXT-X-MAP`.

pub mod packager;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::config::HlsConfig;
use crate::media::flv::{TAG_AUDIO, TAG_VIDEO, Tag};
use crate::metrics::Metrics;
use crate::rtmp::origin::Origin;
use packager::{Packager, Settings};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HlsError {
    #[error("no such stream: {0}")]
    NotLive(String),
    #[error("too many HLS streams (hls.max_streams)")]
    TooManyStreams,
}

/// How often a packager whose origin stream is gone looks for it again.
const RETRY_PLAY: Duration = Duration::from_millis(250);

/// The HLS service: the packagers running, by stream name.
pub struct Hls {
    pub cfg: HlsConfig,
    origin: Arc<Origin>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    streams: Mutex<HashMap<String, Arc<Stream>>>,
    blocking: AtomicUsize,
    epoch: Instant,
}

/// One packaged stream, shared by its task and the HTTP handlers.
pub struct Stream {
    pub name: String,
    /// Names this packager's files (see the module doc).
    pub run: String,
    packager: Mutex<Packager>,
    /// The packager's version after each tag: what waiting requests watch.
    updates: watch::Sender<u64>,
    /// ms since `Hls::epoch` of the last HLS request.
    last_request: AtomicU64,
    /// Requests waiting on this stream now: a stream with a waiting viewer is not idle.
    waiting: AtomicUsize,
    /// The last playlist written: (packager version, URI query, text). Every LL-HLS viewer
    /// asks for the same playlist after each part; it is written once per part and query.
    rendered: Mutex<Option<(u64, String, bytes::Bytes)>>,
    /// Server shutdown: waiting requests answer at once so connections can close in time.
    shutdown: watch::Receiver<bool>,
}

/// A place among the requests allowed to block; given back on drop.
pub struct Blocking<'a>(&'a Hls);

impl Drop for Blocking<'_> {
    fn drop(&mut self) {
        self.0.blocking.fetch_sub(1, Ordering::Relaxed);
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Hls {
    pub fn new(
        cfg: HlsConfig,
        origin: Arc<Origin>,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            origin,
            metrics,
            shutdown,
            streams: Mutex::new(HashMap::new()),
            blocking: AtomicUsize::new(0),
            epoch: Instant::now(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Stream>>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn settings(&self) -> Settings {
        Settings {
            segment_ms: self.cfg.segment_target.as_millis() as u64,
            part_ms: self.cfg.part_target.as_millis() as u64,
            window_segments: self.cfg.window_segments,
            max_bytes: self.cfg.max_stream_bytes,
        }
    }

    /// Longest a blocking request waits: three target durations (RFC 8216bis 6.2.5.2).
    pub fn block_timeout(&self) -> Duration {
        Duration::from_secs(3 * self.settings().target_duration_s())
    }

    /// A running packager, without starting one (media requests).
    pub fn get(&self, name: &str) -> Option<Arc<Stream>> {
        // Marked under the map's lock: a packager decides to stop under it too (see `run`).
        let streams = self.lock();
        let s = streams.get(name)?.clone();
        s.last_request.store(self.now(), Ordering::Relaxed);
        Some(s)
    }

    /// The stream's packager, started when the origin has the stream live (playlist requests).
    pub fn stream(self: &Arc<Self>, name: &str) -> Result<Arc<Stream>, HlsError> {
        if let Some(s) = self.get(name) {
            return Ok(s);
        }
        if !self.origin.is_live(name) {
            return Err(HlsError::NotLive(name.to_string()));
        }
        let mut streams = self.lock();
        if let Some(s) = streams.get(name) {
            return Ok(s.clone());
        }
        if streams.len() >= self.cfg.max_streams {
            return Err(HlsError::TooManyStreams);
        }
        let s = Arc::new(Stream {
            name: name.to_string(),
            run: unix_ms().to_string(),
            packager: Mutex::new(Packager::new(self.settings())),
            updates: watch::channel(0).0,
            last_request: AtomicU64::new(self.now()),
            waiting: AtomicUsize::new(0),
            rendered: Mutex::new(None),
            shutdown: self.shutdown.clone(),
        });
        streams.insert(name.to_string(), s.clone());
        drop(streams);
        self.metrics.hls_streams.fetch_add(1, Ordering::Relaxed);
        tracing::info!(stream = %name, run = %s.run, "hls: packager started");
        tokio::spawn(run(self.clone(), s.clone()));
        Ok(s)
    }

    /// A place for one more blocking request, or `None` at `hls.max_blocking_requests`.
    pub fn try_block(&self) -> Option<Blocking<'_>> {
        let n = self.blocking.fetch_add(1, Ordering::Relaxed);
        if n >= self.cfg.max_blocking_requests {
            self.blocking.fetch_sub(1, Ordering::Relaxed);
            self.metrics
                .hls_blocking_refused
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(Blocking(self))
    }

    pub fn stream_count(&self) -> usize {
        self.lock().len()
    }

    fn idle(&self, s: &Stream) -> bool {
        s.waiting.load(Ordering::Relaxed) == 0
            && self
                .now()
                .saturating_sub(s.last_request.load(Ordering::Relaxed))
                > self.cfg.idle_stop.as_millis() as u64
    }
}

impl Stream {
    /// Read the packager's state.
    pub fn with<R>(&self, f: impl FnOnce(&Packager) -> R) -> R {
        f(&self.packager.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The media playlist with `query` on its URIs, written once per packager version.
    pub fn playlist(&self, query: &str) -> bytes::Bytes {
        let mut cache = self.rendered.lock().unwrap_or_else(|p| p.into_inner());
        let p = self.packager.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((v, q, text)) = cache.as_ref()
            && *v == p.version()
            && q == query
        {
            return text.clone();
        }
        let text = bytes::Bytes::from(p.playlist(&self.run, query));
        *cache = Some((p.version(), query.to_string(), text.clone()));
        text
    }

    fn update(&self, f: impl FnOnce(&mut Packager)) {
        let v = {
            let mut p = self.packager.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut p);
            p.version()
        };
        self.updates.send_if_modified(|old| {
            let changed = *old != v;
            *old = v;
            changed
        });
    }

    /// Wait until `f` answers (or `timeout` passes, `None`). `f` is asked now and after each
    /// update of the packager.
    pub async fn wait_for<R>(
        &self,
        timeout: Duration,
        mut f: impl FnMut(&Packager) -> Option<R>,
    ) -> Option<R> {
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.waiting);
        let mut rx = self.updates.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            rx.borrow_and_update();
            if let Some(r) = self.with(&mut f) {
                return Some(r);
            }
            let mut stop = self.shutdown.clone();
            tokio::select! {
                r = tokio::time::timeout_at(deadline, rx.changed()) => match r {
                    Ok(Ok(())) => {}
                    // Timed out, or the packager is gone (its sender dropped with the stream).
                    _ => return self.with(&mut f),
                },
                Ok(_) = stop.wait_for(|v| *v) => return self.with(&mut f),
            }
        }
    }
}

/// When each tag of a player's first batch was produced: the origin hands over its GOP cache
/// at once, and the newest of those tags is the one that was produced now.
fn initial_arrivals(initial: &[Arc<Tag>], now_ms: u64) -> Vec<u64> {
    let media = |t: &Tag| matches!(t.kind, TAG_AUDIO | TAG_VIDEO) && !t.is_sequence_header();
    let newest = initial
        .iter()
        .filter(|t| media(t))
        .map(|t| t.timestamp_ms)
        .max();
    initial
        .iter()
        .map(|t| match newest {
            // Bounded: a GOP is seconds, not the 49 days a u32 of ms wraps at.
            Some(n) if media(t) => {
                now_ms.saturating_sub(u64::from(n.wrapping_sub(t.timestamp_ms)).min(60_000))
            }
            _ => now_ms,
        })
        .collect()
}

/// A packager's life: play the origin's stream, feed every tag, and when the stream ends,
/// wait for it to come back, until nobody has asked for `hls.idle_stop`.
async fn run(hls: Arc<Hls>, s: Arc<Stream>) {
    let mut shutdown = hls.shutdown.clone();
    let mut idle_check = tokio::time::interval(Duration::from_secs(1));
    loop {
        play(&hls, &s, &mut shutdown, &mut idle_check).await;
        {
            // Decided under the map's lock, where requests mark the stream: a request either
            // sees the stream gone (and starts a new packager) or keeps this one going.
            let mut streams = hls.lock();
            // (A closed channel: the server is gone without saying so.)
            if *shutdown.borrow() || shutdown.has_changed().is_err() || hls.idle(&s) {
                if streams.get(&s.name).is_some_and(|x| Arc::ptr_eq(x, &s)) {
                    streams.remove(&s.name);
                }
                break;
            }
        }
        // A request came just as the packager went idle: go on, after a break (the origin is
        // played again from its GOP cache).
        s.update(Packager::end_of_stream);
    }
    hls.metrics.hls_streams.fetch_sub(1, Ordering::Relaxed);
    tracing::info!(stream = %s.name, run = %s.run, "hls: packager stopped");
}

/// Play the origin's stream into the packager, again whenever it ends, until the stream is
/// idle or the server shuts down.
async fn play(
    hls: &Hls,
    s: &Stream,
    shutdown: &mut watch::Receiver<bool>,
    idle_check: &mut tokio::time::Interval,
) {
    loop {
        if hls.idle(s) || *shutdown.borrow() {
            return;
        }
        let mut player = match hls.origin.play(&s.name) {
            Ok(p) => p,
            Err(_) => {
                tokio::select! {
                    _ = tokio::time::sleep(RETRY_PLAY) => {}
                    _ = shutdown.changed() => return,
                }
                continue;
            }
        };
        tracing::debug!(stream = %s.name, tags = player.initial.len(), "hls: playing the origin");
        let arrivals = initial_arrivals(&player.initial, unix_ms());
        s.update(|p| {
            for (t, at) in player.initial.iter().zip(arrivals) {
                p.push(t, at);
            }
        });
        loop {
            tokio::select! {
                t = player.rx.recv() => match t {
                    Some(t) => {
                        // Tags already waiting go in under one lock (the bridge sends a
                        // picture and its audio together).
                        let now = unix_ms();
                        s.update(|p| {
                            p.push(&t, now);
                            while let Ok(t) = player.rx.try_recv() {
                                p.push(&t, now);
                            }
                        });
                    }
                    None => break,
                },
                _ = idle_check.tick() => if hls.idle(s) { return },
                _ = shutdown.changed() => return,
            }
        }
        // The origin stream ended (or dropped us for being slow): close what we have and
        // follow whatever comes next with a discontinuity.
        tracing::info!(stream = %s.name, "hls: origin stream ended");
        s.update(Packager::end_of_stream);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::flv;

    #[test]
    fn a_gop_cache_is_dated_back_from_its_newest_tag() {
        let t = |kind, ts, body| {
            Arc::new(Tag {
                kind,
                timestamp_ms: ts,
                body,
            })
        };
        let initial = vec![
            t(flv::TAG_SCRIPT, 0, vec![2]),
            t(TAG_VIDEO, 0, flv::avc_sequence_header(&[1])),
            t(TAG_VIDEO, 1000, flv::avc_frame(true, 0, &[1])),
            t(TAG_VIDEO, 2500, flv::avc_frame(false, 0, &[1])),
        ];
        assert_eq!(
            initial_arrivals(&initial, 10_000),
            vec![10_000, 10_000, 8_500, 10_000]
        );
    }
}
