//! Starting, changing and stopping a room's bridge: one implementation behind both the REST
//! API and the host's signaling requests. It is also the one owner of a bridge's life: it
//! starts with the host's first track when `bridge.auto_start` says so ([`auto_start`]), and
//! ends with its room ([`follow_room`], hooked to the room registry's lifecycle), whatever kind
//! of participant (WebSocket, WHIP, RTMP ingest) the host or the last one out was.

use serde::Deserialize;

use std::sync::{Arc, Weak};

use dashmap::DashMap;

use super::layout::{Fit, Layout};
use super::pipeline::{Bridge, BridgeConfig};
use crate::auth::Role;
use crate::config::{BridgeSettings, HostGone};
use crate::room::{Lifecycle, Registry, Room};
use crate::rtmp::origin::Origin;
use crate::rtmp::policy::{DestinationPolicy, Guard};
use crate::rtmp::push::{self, Backoff, Destination, Push, PushOptions};
use crate::webhooks::{BridgeStop, Event};

/// A room's bridge and its CDN destinations.
pub struct BridgeHandle {
    pub bridge: Bridge,
    pub destinations: Vec<(String, Push)>,
    /// The room instance it was started for: a room of the same name created after this one
    /// ended is another room, and never inherits this bridge.
    room: Weak<Room>,
}

impl BridgeHandle {
    /// Is this the bridge of `room` (this very room, not an earlier one of the same name)?
    fn serves(&self, room: &Arc<Room>) -> bool {
        std::ptr::eq(self.room.as_ptr(), Arc::as_ptr(room))
    }

    /// Its room ended (closed or gone): the bridge is left over and may be replaced.
    fn is_orphan(&self) -> bool {
        self.room.upgrade().is_none_or(|r| r.is_closed())
    }
}

/// What bridge control needs from the server: the rooms, the origin, the running bridges.
pub struct Bridges<'a> {
    pub defaults: &'a BridgeSettings,
    pub rooms: &'a Registry,
    pub origin: &'a Arc<Origin>,
    pub running: &'a DashMap<String, BridgeHandle>,
    /// The caller's destinations skip the destination policy: the operator's own
    /// (`auto_destinations`) and admins when `bridge.admin_destinations_trusted`.
    pub trusted: bool,
}

/// Options for starting a bridge (every field optional).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct BridgeRequest {
    #[serde(default)]
    pub layout: Option<Layout>,
    #[serde(default)]
    pub width: Option<u32>,
    #[serde(default)]
    pub height: Option<u32>,
    #[serde(default)]
    pub fps: Option<u32>,
    #[serde(default)]
    pub video_bitrate: Option<u32>,
    #[serde(default)]
    pub audio_bitrate: Option<u32>,
    #[serde(default)]
    pub fit: Option<Fit>,
    /// `rtmp://` URLs, or `{"url": ..., "sign": {...}}` for URLs the bridge signs itself.
    #[serde(default)]
    pub destinations: Vec<Destination>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    #[error("no such room (nobody joined it)")]
    NoRoom,
    #[error("the room's bridge is already running")]
    AlreadyRunning,
    #[error("no bridge is running for this room")]
    NotRunning,
    #[error("{0}")]
    BadRequest(String),
    #[error("bad destination: {0}")]
    BadDestination(String),
    /// Above one of the operator's caps (`bridge.max_*`); the message names the key.
    #[error("{0}")]
    OverLimit(String),
    #[error("a bridge has at most {0} destinations (bridge.max_destinations)")]
    TooManyDestinations(usize),
    /// The destination policy refuses it (`bridge.destination_*`).
    #[error("destination refused: {0}")]
    DestinationRefused(String),
}

impl Bridges<'_> {
    fn guard(&self) -> Guard {
        if self.trusted {
            Guard::Trusted
        } else {
            Guard::Checked(Arc::new(DestinationPolicy::from_settings(self.defaults)))
        }
    }

    /// Check destinations before anything starts: URL syntax, then the policy on what the URL
    /// says (the resolved addresses are checked again at every connect).
    fn check_destinations(&self, dests: &[Destination]) -> Result<(), ControlError> {
        let guard = self.guard();
        for d in dests {
            d.validate().map_err(ControlError::BadDestination)?;
            guard
                .check_url(d.url())
                .map_err(|e| ControlError::DestinationRefused(e.to_string()))?;
        }
        Ok(())
    }
}

fn start_push(svc: &Bridges<'_>, room: &str, dest: &Destination) -> Result<Push, ControlError> {
    let d = svc.defaults;
    let backoff = Backoff {
        initial: d.reconnect_initial,
        max: d.reconnect_max,
        max_retries: (d.reconnect_max_retries > 0).then_some(d.reconnect_max_retries),
    };
    let opts = PushOptions {
        backoff,
        guard: svc.guard(),
        stall_timeout: d.stall_timeout,
        webhooks: svc.rooms.webhooks().clone(),
    };
    push::start_destination(svc.origin.clone(), room, dest, opts)
        .map_err(ControlError::BadDestination)
}

pub fn start(svc: &Bridges<'_>, room: &str, req: BridgeRequest) -> Result<(), ControlError> {
    let r = svc.rooms.get(room).ok_or(ControlError::NoRoom)?;
    // A bridge left over from an earlier room of this name (only possible in a race with
    // that room's end) does not count as running: it goes.
    svc.running.remove_if(room, |_, h| h.is_orphan());
    if svc.running.contains_key(room) {
        return Err(ControlError::AlreadyRunning);
    }
    let d = BridgeConfig::from(svc.defaults);
    let cfg = BridgeConfig {
        width: req.width.unwrap_or(d.width),
        height: req.height.unwrap_or(d.height),
        fps: req.fps.unwrap_or(d.fps),
        video_bitrate: req.video_bitrate.unwrap_or(d.video_bitrate),
        audio_bitrate: req.audio_bitrate.unwrap_or(d.audio_bitrate),
        fit: req.fit.unwrap_or(d.fit),
        // A size asked for is kept; otherwise the host's own size is taken.
        size_from_host: d.size_from_host && req.width.is_none() && req.height.is_none(),
        ..d
    };
    crate::config::check_output(cfg.width, cfg.height, cfg.fps)
        .map_err(ControlError::BadRequest)?;
    svc.defaults
        .check_caps(
            cfg.width,
            cfg.height,
            cfg.fps,
            cfg.video_bitrate,
            cfg.audio_bitrate,
        )
        .map_err(ControlError::OverLimit)?;
    if cfg.video_bitrate == 0 || cfg.audio_bitrate == 0 {
        return Err(ControlError::BadRequest(
            "video_bitrate and audio_bitrate must be > 0".into(),
        ));
    }
    let max = svc.defaults.max_destinations;
    let mut urls: Vec<&str> = req.destinations.iter().map(|d| d.url()).collect();
    urls.sort_unstable();
    urls.dedup();
    if urls.len() > max {
        return Err(ControlError::TooManyDestinations(max));
    }
    // Check every destination before starting anything.
    svc.check_destinations(&req.destinations)?;
    let (width, height, fps) = (cfg.width, cfg.height, cfg.fps);
    let bridge =
        Bridge::start(r.clone(), svc.origin.clone(), cfg).map_err(ControlError::BadRequest)?;
    bridge.set_layout(req.layout);
    // Before any destination can report connecting (their tasks start in the loop below).
    r.hook(Event::BridgeStarted {
        width,
        height,
        fps,
        destinations: urls.len(),
    });
    let mut destinations = vec![];
    for d in &req.destinations {
        if !destinations.iter().any(|(u, _)| u == d.url()) {
            match start_push(svc, room, d) {
                Ok(p) => destinations.push((d.url().to_string(), p)),
                Err(e) => {
                    r.hook(Event::BridgeStopped {
                        reason: BridgeStop::Failed,
                    });
                    return Err(e);
                }
            }
        }
    }
    svc.running.insert(
        room.to_string(),
        BridgeHandle {
            bridge,
            destinations,
            room: Arc::downgrade(&r),
        },
    );
    // Live: a host dropping out now gets the grace period (and viewers the host-away slate).
    svc.rooms.set_live(&r, true);
    // The room may have ended while the bridge started: its end was announced before this
    // bridge was in `running`, so nobody else would stop it.
    if r.is_closed() {
        if svc.running.remove_if(room, |_, h| h.serves(&r)).is_some() {
            r.hook(Event::BridgeStopped {
                reason: BridgeStop::RoomEnded,
            });
        }
        return Err(ControlError::NoRoom);
    }
    Ok(())
}

/// `bridge.auto_start`: a host's first published track starts the room's bridge, whatever
/// kind of participant the host is (WebSocket, WHIP, RTMP ingest). Call it with the server's
/// own view (`trusted`: the operator's `auto_destinations`).
pub fn auto_start(svc: &Bridges<'_>, room: &str, role: Role) {
    let cfg = svc.defaults;
    if !cfg.auto_start || role != Role::Host || svc.running.contains_key(room) {
        return;
    }
    let req = BridgeRequest {
        destinations: cfg.auto_destinations.clone(),
        ..Default::default()
    };
    match start(svc, room, req) {
        Ok(()) => tracing::info!(%room, "bridge started automatically"),
        // Raced with another start: it is running, which is what we wanted.
        Err(ControlError::AlreadyRunning) => {}
        Err(e) => tracing::warn!(%room, "automatic bridge start failed: {e}"),
    }
}

/// Follow a room's life (hooked to [`Registry::on_lifecycle`]): the bridge ends with its room
/// (a bridge of an empty room would stream black to the CDN forever, and block a fresh start
/// for the room's next host with `already_running`), and when the host's grace period ends
/// without the host, `bridge.on_host_gone` decides.
pub fn follow_room(
    running: &DashMap<String, BridgeHandle>,
    settings: &BridgeSettings,
    room: &Arc<Room>,
    change: Lifecycle,
) {
    let stop = match change {
        Lifecycle::Ended => true,
        Lifecycle::HostGone => settings.on_host_gone == HostGone::Stop,
    };
    if stop
        && running
            .remove_if(&room.name, |_, h| h.serves(room) || h.is_orphan())
            .is_some()
    {
        // The room's registry ends it right after a host-gone announcement if it is empty.
        room.mark_live(false);
        room.hook(Event::BridgeStopped {
            reason: match change {
                Lifecycle::Ended => BridgeStop::RoomEnded,
                Lifecycle::HostGone => BridgeStop::HostGone,
            },
        });
        match change {
            Lifecycle::Ended => tracing::info!(room = %room.name, "room ended; bridge stopped"),
            Lifecycle::HostGone => tracing::info!(room = %room.name,
                "host gone: bridge stopped (bridge.on_host_gone = stop)"),
        }
    }
}

/// Pin (`Some`) or unpin (`None`) the layout.
pub fn set_layout(
    svc: &Bridges<'_>,
    room: &str,
    layout: Option<Layout>,
) -> Result<(), ControlError> {
    let h = svc.running.get(room).ok_or(ControlError::NotRunning)?;
    h.bridge.set_layout(layout);
    Ok(())
}

pub fn update_destinations(
    svc: &Bridges<'_>,
    room: &str,
    add: &[Destination],
    remove: &[String],
) -> Result<(), ControlError> {
    svc.check_destinations(add)?;
    let mut h = svc.running.get_mut(room).ok_or(ControlError::NotRunning)?;
    // The cap counts what the bridge would have after this update; refused as a whole.
    let mut after: Vec<&str> = h
        .destinations
        .iter()
        .map(|(u, _)| u.as_str())
        .filter(|u| !remove.iter().any(|r| r == u))
        .chain(add.iter().map(|d| d.url()))
        .collect();
    after.sort_unstable();
    after.dedup();
    let max = svc.defaults.max_destinations;
    if after.len() > max {
        return Err(ControlError::TooManyDestinations(max));
    }
    h.destinations.retain(|(url, _)| !remove.contains(url));
    for d in add {
        if !h.destinations.iter().any(|(u, _)| u == d.url()) {
            let p = start_push(svc, room, d)?;
            h.destinations.push((d.url().to_string(), p));
        }
    }
    Ok(())
}

/// Stop the room's bridge (the host ended the live, or an operator stopped it). The room is
/// not live any more: if its host had dropped out and nobody else is in it, it ends now.
pub fn stop(svc: &Bridges<'_>, room: &str) -> Result<(), ControlError> {
    let (_, handle) = svc.running.remove(room).ok_or(ControlError::NotRunning)?;
    if let Some(r) = handle.room.upgrade() {
        r.hook(Event::BridgeStopped {
            reason: BridgeStop::Requested,
        });
        svc.rooms.set_live(&r, false);
    }
    Ok(())
}
