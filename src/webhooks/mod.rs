//! Webhooks: the one owner of telling the operator's backend what happens (rooms, members,
//! tracks, co-host seats, PKs, bridges, CDN destinations, RTMP ingest) without polling.
//!
//! Whoever decides a fact calls [`Webhooks::emit`] on the handle it already has (the room
//! registry hands it to every room; bridges and pushes reach it through their room). `emit`
//! never waits and never fails the caller: it is a few atomics and a channel send, safe under
//! a room's lock and from the bridge's output thread. Events then wait in one bounded queue
//! per server (`webhooks.queue`; when full, new events are dropped and counted) and are POSTed
//! as signed JSON to every configured URL by [`deliver`]: in order per room, rooms never
//! waiting for each other, retried with exponential backoff up to `webhooks.max_attempts`.
//!
//! Order: events are queued in the order `emit` is called. Facts about one room are decided
//! under that room's lock (members, tracks, seats, PK) or after one another in one task
//! (bridge, push), so that order is the room's own.

pub mod auth;
mod deliver;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::auth::Role;
use crate::config::WebhooksConfig;
use crate::signaling::protocol::{Kind, LeaveReason};

pub use deliver::{SIGNATURE_HEADER, TIMESTAMP_HEADER, sign};

/// What happened; `event` in the JSON body. Field names are part of the API (docs/api.md).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The room's first member joined (a room exists while it has members).
    RoomStarted,
    /// The room's last member left (after the host's grace period, if one ran).
    RoomEnded {
        duration_ms: u64,
    },
    ParticipantJoined {
        participant_id: String,
        identity: String,
        role: Role,
    },
    ParticipantLeft {
        participant_id: String,
        identity: String,
        role: Role,
        reason: LeaveReason,
        duration_ms: u64,
    },
    TrackPublished {
        participant_id: String,
        track_id: String,
        kind: Kind,
        codec: String,
    },
    TrackUnpublished {
        participant_id: String,
        track_id: String,
        kind: Kind,
    },
    CohostSeatTaken {
        participant_id: String,
        identity: String,
        how: SeatTaken,
    },
    CohostSeatLeft {
        participant_id: String,
        identity: String,
        reason: SeatLeft,
    },
    /// This room's host and `partner_room`'s host went into a PK (sent for both rooms).
    PkStarted {
        partner_room: String,
        partner_host: String,
    },
    PkEnded {
        partner_room: String,
    },
    BridgeStarted {
        width: u32,
        height: u32,
        fps: u32,
        /// CDN destinations it pushes to (the embedded origin not counted).
        destinations: usize,
    },
    BridgeStopped {
        reason: BridgeStop,
    },
    /// The output changed path: `passthrough` (the host's own video) or `mixing`.
    BridgeSwitched {
        from: &'static str,
        to: &'static str,
        /// Why it mixes (`cohosts`, `layout`, `resolution`, ...); absent when passing through.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'static str>,
    },
    DestinationConnected {
        url: String,
    },
    DestinationRetrying {
        url: String,
        /// Retries so far, this one included.
        retries: u64,
        /// A stable code (`connect_failed`, `stalled`, ...) and the full error text.
        error: &'static str,
        detail: String,
        retry_in_ms: u64,
    },
    DestinationFailed {
        url: String,
        retries: u64,
        error: &'static str,
        detail: String,
    },
    /// A stream-key RTMP publisher (OBS, ffmpeg) was admitted into the room.
    IngestStarted {
        participant_id: String,
        identity: String,
        role: Role,
        remote_addr: String,
    },
    IngestStopped {
        participant_id: String,
        identity: String,
        duration_ms: u64,
    },
    /// A recording file of the room's output was opened (its first keyframe arrived).
    RecordingStarted {
        /// The file name (in `GET /v1/rooms/{room}/recordings`).
        file: String,
    },
    /// A recording file was closed: complete and playable.
    RecordingFinished {
        file: String,
        /// Media in the file.
        duration_ms: u64,
        /// Bytes on disk.
        size: u64,
        reason: RecordingEnd,
    },
}

impl Event {
    /// The `event` name (also sent as `X-Cohost-Event`).
    pub fn name(&self) -> &'static str {
        match self {
            Event::RoomStarted => "room_started",
            Event::RoomEnded { .. } => "room_ended",
            Event::ParticipantJoined { .. } => "participant_joined",
            Event::ParticipantLeft { .. } => "participant_left",
            Event::TrackPublished { .. } => "track_published",
            Event::TrackUnpublished { .. } => "track_unpublished",
            Event::CohostSeatTaken { .. } => "cohost_seat_taken",
            Event::CohostSeatLeft { .. } => "cohost_seat_left",
            Event::PkStarted { .. } => "pk_started",
            Event::PkEnded { .. } => "pk_ended",
            Event::BridgeStarted { .. } => "bridge_started",
            Event::BridgeStopped { .. } => "bridge_stopped",
            Event::BridgeSwitched { .. } => "bridge_switched",
            Event::DestinationConnected { .. } => "destination_connected",
            Event::DestinationRetrying { .. } => "destination_retrying",
            Event::DestinationFailed { .. } => "destination_failed",
            Event::IngestStarted { .. } => "ingest_started",
            Event::IngestStopped { .. } => "ingest_stopped",
            Event::RecordingStarted { .. } => "recording_started",
            Event::RecordingFinished { .. } => "recording_finished",
        }
    }
}

/// How a co-host seat was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SeatTaken {
    /// The host approved the member's request.
    Approved,
    /// The member accepted the host's invitation.
    Invited,
    /// The member joined with a co-host token.
    Joined,
}

/// Why a co-host seat was given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SeatLeft {
    /// The host (or an operator) took the seat away.
    Removed,
    /// The co-host gave it back and stays in the room.
    Returned,
    /// The co-host left the room (`participant_left` tells why).
    LeftRoom,
    /// The host's grace period ended without the host: everyone went back to the audience.
    HostGone,
}

/// Why a bridge stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BridgeStop {
    /// The host ended the live, or an operator stopped it (REST or signaling).
    Requested,
    /// Its room ended.
    RoomEnded,
    /// The host's grace period ended without the host (`bridge.on_host_gone = "stop"`).
    HostGone,
    /// It could not start one of its destinations and was stopped again at once.
    Failed,
}

/// Why a recording file was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordingEnd {
    /// It reached `recording.max_duration` or `max_size`; the next file goes on.
    Rotated,
    /// The stream's codec parameters changed (a new sequence header); the next file goes on.
    TracksChanged,
    /// The room's stream ended (bridge stopped or restarted); a recording that goes on waits
    /// for it and continues in a new file.
    StreamEnded,
    /// The recording was stopped (REST, signaling, its room ended, server shutdown).
    Stopped,
    /// Writing failed (disk full, I/O error): the recording stopped.
    Error,
}

/// The JSON body: the envelope fields, then the event's own.
#[derive(Serialize)]
struct Envelope<'a> {
    id: &'a str,
    #[serde(flatten)]
    event: &'a Event,
    /// Unix time in milliseconds when the fact was decided (not when it was delivered).
    created_at: u64,
    room: &'a str,
}

/// Counters behind `cohost_webhooks_*` in /metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// Deliveries answered 2xx (one per event and URL).
    pub delivered: AtomicU64,
    /// Attempts that failed (non-2xx, connection error, timeout), retried or not.
    pub failed_attempts: AtomicU64,
    /// Events not queued because the queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Deliveries given up after `webhooks.max_attempts` (one per event and URL).
    pub dropped_attempts: AtomicU64,
}

/// One event on its way: its body is serialized once and shared by every URL's delivery.
/// It holds one slot of the bounded queue until every URL is done with it.
struct Queued {
    id: String,
    name: &'static str,
    room: String,
    body: Bytes,
    _slot: OwnedSemaphorePermit,
}

struct Inner {
    tx: mpsc::UnboundedSender<Arc<Queued>>,
    /// The bounded queue: one permit per event waiting (the channel itself is unbounded
    /// because this is what bounds it).
    slots: Arc<Semaphore>,
    capacity: usize,
}

/// The handle every event source holds: cheap to clone; a disabled one (no URLs) does nothing.
#[derive(Clone, Default)]
pub struct Webhooks {
    inner: Option<Arc<Inner>>,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks")
            .field("enabled", &self.inner.is_some())
            .finish()
    }
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Webhooks {
    /// Start delivering to `cfg.urls` (disabled when there are none). Needs a tokio runtime.
    pub fn start(cfg: &WebhooksConfig) -> Webhooks {
        let stats = Arc::new(Stats::default());
        if cfg.urls.is_empty() {
            return Webhooks { inner: None, stats };
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let capacity = cfg.queue.max(1);
        deliver::spawn(cfg, rx, stats.clone());
        Webhooks {
            inner: Some(Arc::new(Inner {
                tx,
                slots: Arc::new(Semaphore::new(capacity)),
                capacity,
            })),
            stats,
        }
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Events queued and not yet delivered or given up (all URLs).
    pub fn queued(&self) -> usize {
        self.inner
            .as_ref()
            .map_or(0, |i| i.capacity - i.slots.available_permits())
    }

    /// Queue `event` about `room` for every URL. Never waits: with the queue full the event is
    /// dropped and counted.
    pub fn emit(&self, room: &str, event: Event) {
        let Some(inner) = &self.inner else {
            return;
        };
        let Ok(slot) = inner.slots.clone().try_acquire_owned() else {
            let n = self
                .stats
                .dropped_queue_full
                .fetch_add(1, Ordering::Relaxed)
                + 1;
            // A slow or dead backend fills the queue with every event after: log the 1st,
            // 2nd, 4th, ... drop, not each one.
            if n.is_power_of_two() {
                tracing::warn!(
                    room,
                    event = event.name(),
                    dropped = n,
                    queue = inner.capacity,
                    "webhook queue full: event dropped"
                );
            }
            return;
        };
        let id = format!("EV_{:032x}", rand::random::<u128>());
        let body = match serde_json::to_vec(&Envelope {
            id: &id,
            event: &event,
            created_at: unix_ms(),
            room,
        }) {
            Ok(b) => Bytes::from(b),
            // Only plain strings and numbers go in; this cannot fail, but is not worth a panic.
            Err(e) => {
                tracing::error!(
                    room,
                    event = event.name(),
                    "webhook event not serialized: {e}"
                );
                return;
            }
        };
        let q = Arc::new(Queued {
            id,
            name: event.name(),
            room: room.to_string(),
            body,
            _slot: slot,
        });
        // Fails only when the delivery side is gone (runtime shutting down).
        let _ = inner.tx.send(q);
    }

    /// Wait (at most until `deadline`) for the queue to drain: graceful shutdown gives the
    /// last events (`participant_left`, `room_ended`) a chance to go out.
    pub async fn flush(&self, deadline: tokio::time::Instant) {
        while self.queued() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Milliseconds since `t`, for `duration_ms` fields.
pub(crate) fn ms_since(t: Instant) -> u64 {
    t.elapsed().as_millis().min(u128::from(u64::MAX)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_has_the_common_fields_then_the_events() {
        let ev = Event::ParticipantLeft {
            participant_id: "PA_1".into(),
            identity: "alice".into(),
            role: Role::Cohost,
            reason: LeaveReason::Kicked,
            duration_ms: 1200,
        };
        let body = serde_json::to_value(Envelope {
            id: "EV_1",
            event: &ev,
            created_at: 5,
            room: "r1",
        })
        .unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "id": "EV_1", "event": "participant_left", "created_at": 5, "room": "r1",
                "participant_id": "PA_1", "identity": "alice", "role": "cohost",
                "reason": "kicked", "duration_ms": 1200
            })
        );
        let started = serde_json::to_value(Envelope {
            id: "EV_2",
            event: &Event::RoomStarted,
            created_at: 5,
            room: "r1",
        })
        .unwrap();
        assert_eq!(started["event"], "room_started");
        assert_eq!(Event::RoomStarted.name(), "room_started");
    }

    /// `Event::name` (the `X-Cohost-Event` header) is what serde writes as `event`.
    #[test]
    fn event_names_match_the_json() {
        let s = String::new;
        let all = [
            Event::RoomStarted,
            Event::RoomEnded { duration_ms: 1 },
            Event::ParticipantJoined {
                participant_id: s(),
                identity: s(),
                role: Role::Host,
            },
            Event::ParticipantLeft {
                participant_id: s(),
                identity: s(),
                role: Role::Host,
                reason: LeaveReason::Left,
                duration_ms: 1,
            },
            Event::TrackPublished {
                participant_id: s(),
                track_id: s(),
                kind: Kind::Audio,
                codec: s(),
            },
            Event::TrackUnpublished {
                participant_id: s(),
                track_id: s(),
                kind: Kind::Video,
            },
            Event::CohostSeatTaken {
                participant_id: s(),
                identity: s(),
                how: SeatTaken::Joined,
            },
            Event::CohostSeatLeft {
                participant_id: s(),
                identity: s(),
                reason: SeatLeft::HostGone,
            },
            Event::PkStarted {
                partner_room: s(),
                partner_host: s(),
            },
            Event::PkEnded { partner_room: s() },
            Event::BridgeStarted {
                width: 2,
                height: 2,
                fps: 1,
                destinations: 0,
            },
            Event::BridgeStopped {
                reason: BridgeStop::Failed,
            },
            Event::BridgeSwitched {
                from: "starting",
                to: "mixing",
                reason: None,
            },
            Event::DestinationConnected { url: s() },
            Event::DestinationRetrying {
                url: s(),
                retries: 1,
                error: "timeout",
                detail: s(),
                retry_in_ms: 1,
            },
            Event::DestinationFailed {
                url: s(),
                retries: 1,
                error: "timeout",
                detail: s(),
            },
            Event::IngestStarted {
                participant_id: s(),
                identity: s(),
                role: Role::Cohost,
                remote_addr: s(),
            },
            Event::IngestStopped {
                participant_id: s(),
                identity: s(),
                duration_ms: 1,
            },
            Event::RecordingStarted { file: s() },
            Event::RecordingFinished {
                file: s(),
                duration_ms: 1,
                size: 1,
                reason: RecordingEnd::Rotated,
            },
        ];
        let mut names = std::collections::HashSet::new();
        for ev in &all {
            let v = serde_json::to_value(ev).unwrap();
            assert_eq!(v["event"], ev.name(), "{v}");
            assert!(names.insert(ev.name()));
        }
    }

    #[test]
    fn disabled_handle_does_nothing() {
        let w = Webhooks::default();
        assert!(!w.enabled());
        w.emit("r", Event::RoomStarted);
        assert_eq!(w.queued(), 0);
    }
}
