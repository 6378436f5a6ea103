//! Starting, changing and stopping a room's bridge: one implementation behind both the REST
//! API and the host's signaling requests.

use serde::Deserialize;

use std::sync::Arc;

use dashmap::DashMap;

use super::layout::{Fit, Layout};
use super::pipeline::{Bridge, BridgeConfig};
use crate::config::BridgeSettings;
use crate::room::Registry;
use crate::rtmp::origin::Origin;
use crate::rtmp::push::{self, Backoff, Destination, Push};

/// A room's bridge and its CDN destinations.
pub struct BridgeHandle {
    pub bridge: Bridge,
    pub destinations: Vec<(String, Push)>,
}

/// What bridge control needs from the server: the rooms, the origin, the running bridges.
pub struct Bridges<'a> {
    pub defaults: &'a BridgeSettings,
    pub rooms: &'a Registry,
    pub origin: &'a Arc<Origin>,
    pub running: &'a DashMap<String, BridgeHandle>,
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
}

fn start_push(svc: &Bridges<'_>, room: &str, dest: &Destination) -> Result<Push, ControlError> {
    let d = svc.defaults;
    let backoff = Backoff {
        initial: d.reconnect_initial,
        max: d.reconnect_max,
        max_retries: (d.reconnect_max_retries > 0).then_some(d.reconnect_max_retries),
    };
    push::start_destination(svc.origin.clone(), room, dest, backoff)
        .map_err(ControlError::BadDestination)
}

pub fn start(svc: &Bridges<'_>, room: &str, req: BridgeRequest) -> Result<(), ControlError> {
    let r = svc.rooms.get(room).ok_or(ControlError::NoRoom)?;
    if svc.running.contains_key(room) {
        return Err(ControlError::AlreadyRunning);
    }
    let d = BridgeConfig::from(svc.defaults);
    let cfg = BridgeConfig {
        width: req.width.unwrap_or(d.width),
        height: req.height.unwrap_or(d.height),
        fps: req.fps.unwrap_or(d.fps),
        video_bitrate: req.video_bitrate.unwrap_or(d.video_bitrate),
        fit: req.fit.unwrap_or(d.fit),
        ..d
    };
    crate::config::check_output(cfg.width, cfg.height, cfg.fps)
        .map_err(ControlError::BadRequest)?;
    // Check every destination before starting anything.
    for d in &req.destinations {
        d.validate().map_err(ControlError::BadDestination)?;
    }
    let bridge = Bridge::start(r, svc.origin.clone(), cfg).map_err(ControlError::BadRequest)?;
    bridge.set_layout(req.layout);
    let mut destinations = vec![];
    for d in &req.destinations {
        destinations.push((d.url().to_string(), start_push(svc, room, d)?));
    }
    svc.running.insert(
        room.to_string(),
        BridgeHandle {
            bridge,
            destinations,
        },
    );
    Ok(())
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
    for d in add {
        d.validate().map_err(ControlError::BadDestination)?;
    }
    let mut h = svc.running.get_mut(room).ok_or(ControlError::NotRunning)?;
    h.destinations.retain(|(url, _)| !remove.contains(url));
    for d in add {
        if !h.destinations.iter().any(|(u, _)| u == d.url()) {
            let p = start_push(svc, room, d)?;
            h.destinations.push((d.url().to_string(), p));
        }
    }
    Ok(())
}

pub fn stop(svc: &Bridges<'_>, room: &str) -> Result<(), ControlError> {
    svc.running
        .remove(room)
        .map(|_| ())
        .ok_or(ControlError::NotRunning)
}
