//! The tasks that fit what a subscriber receives to what its downlink carries: one
//! [`DownlinkGroup`] per WebSocket subscriber shares the link between its simulcast tracks by
//! priority (`sfu::allocation`: co-hosts step down and pause before the host); a WHEP
//! viewer's tracks form a group without priorities. It reads the receiver reports and the
//! connection's delay signal (`peer::bwe`, with `webrtc.bandwidth_estimate`), sets
//! the layer caps, and tell the connection where each track's current layer began, so requests
//! to retransmit the old one are dropped (`peer::nack_floor`). Reports come about once a
//! second; a switch is seen within a tick.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tracing::{debug, info};

use crate::peer::LocalTrack;
use crate::room::Room;
use crate::sfu::LayerControl;
use crate::sfu::allocation::{Allocation, Member};
use crate::sfu::downlink::Cap;

const TICK: Duration = Duration::from_millis(100);
/// How often who is the host is looked up again (the room's stage).
const PRIORITY_EVERY: Duration = Duration::from_secs(1);
/// No receiver report from any track for this long (they come about once a second per
/// flowing track): the link is taken as idle.
const SILENCE: Duration = Duration::from_secs(3);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Entry {
    key: u64,
    track_id: String,
    publisher: Arc<str>,
    local: Arc<LocalTrack>,
    control: LayerControl,
}

/// One subscriber's simulcast subscriptions, sharing its downlink. Its task starts with the
/// first member and ends with the group.
pub(crate) struct DownlinkGroup {
    entries: Arc<Mutex<Vec<Entry>>>,
    room: Option<Arc<Room>>,
    next: Mutex<u64>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl DownlinkGroup {
    /// `room` ranks the members by their publishers (its host first); without one (a WHEP
    /// viewer of one stream) they are all alike.
    pub fn new(room: Option<Arc<Room>>) -> Self {
        Self {
            entries: Arc::default(),
            room,
            next: Mutex::new(0),
            task: Mutex::new(None),
        }
    }

    /// A simulcast subscription of `track_id` (published by `publisher`) joins the group.
    pub fn add(
        &self,
        track_id: &str,
        publisher: &str,
        local: Arc<LocalTrack>,
        control: LayerControl,
    ) {
        let key = {
            let mut n = lock(&self.next);
            *n += 1;
            *n
        };
        lock(&self.entries).push(Entry {
            key,
            track_id: track_id.to_string(),
            publisher: publisher.into(),
            local,
            control,
        });
        let mut task = lock(&self.task);
        if task.is_none() {
            *task = Some(tokio::spawn(group_task(
                self.entries.clone(),
                self.room.clone(),
            )));
        }
    }

    pub fn remove(&self, track_id: &str) {
        lock(&self.entries).retain(|e| e.track_id != track_id);
    }
}

impl Drop for DownlinkGroup {
    fn drop(&mut self) {
        if let Some(t) = lock(&self.task).take() {
            t.abort();
        }
    }
}

/// Per-entry bookkeeping of the group task.
#[derive(Default)]
struct Seen {
    reports: u64,
    floor: Option<u16>,
    cap: Option<Cap>,
    layer: Option<String>,
}

async fn group_task(entries: Arc<Mutex<Vec<Entry>>>, room: Option<Arc<Room>>) {
    let mut alloc = Allocation::new();
    let mut seen: HashMap<u64, Seen> = HashMap::new();
    let mut hosts: Vec<String> = vec![];
    let mut hosts_at: Option<Instant> = None;
    let mut switching = false;
    let mut last_report = Instant::now();
    let mut overuses_seen = 0u64;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        // Snapshot what is needed, without holding the lock over the work.
        let list: Vec<(u64, Arc<str>, Arc<LocalTrack>, LayerControl)> = lock(&entries)
            .iter()
            .map(|e| {
                (
                    e.key,
                    e.publisher.clone(),
                    e.local.clone(),
                    e.control.clone(),
                )
            })
            .collect();
        seen.retain(|k, _| list.iter().any(|e| e.0 == *k));
        if list.is_empty() {
            continue;
        }
        // Priority only matters between publishers; a subscriber of one publisher (a viewer of
        // the host) never looks the room's stage up (it locks the room, whose members may be
        // thousands).
        let one_publisher = list.iter().all(|e| e.1 == list[0].1);
        if let Some(room) = room.as_ref().filter(|_| !one_publisher)
            && hosts_at.is_none_or(|t| now >= t + PRIORITY_EVERY)
        {
            let stage = room.stage();
            hosts = stage.order[..stage.hosts.min(stage.order.len())].to_vec();
            hosts_at = Some(now);
        }
        alloc.set_members(
            list.iter()
                .map(|(key, publisher, _, control)| Member {
                    key: *key,
                    layers: control.layer_count(),
                    priority: u8::from(!one_publisher && !hosts.iter().any(|h| **h == **publisher)),
                })
                .collect(),
            now,
        );
        let mut worst: Option<u8> = None;
        let mut now_switching = false;
        // One connection carries them all: its delay signal is the group's. An episode that
        // began and ended between two ticks counts too.
        let episodes = list
            .iter()
            .map(|e| e.2.downlink_overuses())
            .max()
            .unwrap_or(0);
        let overused = list.iter().any(|e| e.2.downlink_overused()) || episodes > overuses_seen;
        overuses_seen = overuses_seen.max(episodes);
        for (key, _, local, control) in &list {
            let s = seen.entry(*key).or_default();
            let f = control.switch_floor();
            if f != s.floor {
                s.floor = f;
                if let Some(seq) = f {
                    local.set_nack_floor(seq);
                }
            }
            let (current, target) = control.layers().unwrap_or_default();
            now_switching |= current != target;
            if current != s.layer {
                debug!(ssrc = local.ssrc(), from = ?s.layer, to = ?current, "subscriber simulcast layer switched");
                s.layer = current;
            }
            let r = local.reception();
            if r.reports != s.reports {
                s.reports = r.reports;
                worst = Some(worst.map_or(r.fraction_lost, |w| w.max(r.fraction_lost)));
            }
        }
        // Reports from before a switch completed judge the old layers, not the new ones.
        if switching && !now_switching {
            alloc.switched(now);
        }
        switching = now_switching;
        if worst.is_some() {
            last_report = now;
        }
        match worst {
            // Queueing outranks what the reports say (and must not be preceded by a probe
            // in the same tick).
            _ if overused => alloc.congested(now),
            Some(lost) => alloc.report(lost, now),
            // Nothing has reported for a while (what flows was muted or removed, what is held
            // back sends nothing): held-back tracks are probed again, as when all is paused.
            None if now >= last_report + SILENCE => alloc.idle(now),
            None => alloc.tick(now),
        };
        for ((key, _, local, control), cap) in list.iter().zip(alloc.caps()) {
            let s = seen.entry(*key).or_default();
            if s.cap != Some(*cap) {
                if s.cap.is_some() || *cap != Cap::Any {
                    info!(
                        ssrc = local.ssrc(),
                        ?cap,
                        lost = worst,
                        overused,
                        "subscriber downlink: simulcast layer cap changed"
                    );
                }
                s.cap = Some(*cap);
                control.set_cap(*cap);
            }
        }
    }
}
