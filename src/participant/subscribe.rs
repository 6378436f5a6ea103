//! What a member receives. Hosts and co-hosts subscribe automatically to every track of the
//! room, now and later (they talk to each other in real time). Audience members join
//! signaling-only: no peer connection, no offers, nothing to answer, until they ask for media
//! with `subscribe` (a phone watching the CDN stream and chatting costs the server a WebSocket,
//! not a peer connection). Everyone may subscribe, unsubscribe and pause explicitly.

use std::sync::atomic::Ordering;

use super::{Driver, room_error};
use crate::signaling::protocol::{ErrorCode, Kind, RequestId, ResponseResult};

/// Track ids one `subscribe`/`unsubscribe` may name (a room has far fewer tracks).
pub const MAX_TRACKS_PER_REQUEST: usize = 64;

/// A `subscribe`/`unsubscribe` names tracks or says `all`, and at most
/// [`MAX_TRACKS_PER_REQUEST`] tracks.
fn check_request(tracks: &[String], all: bool) -> Result<(), String> {
    if !all && tracks.is_empty() {
        return Err("name the tracks, or set \"all\": true".into());
    }
    if tracks.len() > MAX_TRACKS_PER_REQUEST {
        return Err(format!(
            "at most {MAX_TRACKS_PER_REQUEST} tracks per request"
        ));
    }
    Ok(())
}

impl Driver {
    /// `subscribe`: the named tracks, or with `all` every track now and later. The first
    /// subscription makes an audience member a real-time participant (`room.max_participants`).
    pub(super) async fn subscribe_request(
        &mut self,
        id: Option<RequestId>,
        tracks: Vec<String>,
        all: bool,
    ) {
        let Some(j) = self.joined.as_ref() else {
            return;
        };
        if let Err(msg) = check_request(&tracks, all) {
            return self.error(id, ErrorCode::BadRequest, msg).await;
        }
        let in_room = j.room.tracks();
        let picked = if all {
            in_room
        } else {
            let mut picked = Vec::with_capacity(tracks.len());
            for t in &tracks {
                match in_room.iter().find(|r| r.id == *t) {
                    Some(r) => picked.push(r.clone()),
                    None => {
                        let msg = format!("no such track in the room: {t}");
                        return self.error(id, ErrorCode::UnknownTrack, msg).await;
                    }
                }
            }
            picked
        };
        if let Err(e) = self.svc.rooms.set_media(&j.room, &j.pid) {
            let (code, _) = room_error(&e);
            return self.error(id, code, e.to_string()).await;
        }
        if all && let Some(j) = self.joined.as_mut() {
            j.auto_subscribe = true;
        }
        for r in picked {
            self.subscribe(r).await;
        }
        self.maybe_offer().await;
        self.reply(id, ResponseResult::Empty {}).await;
    }

    /// `unsubscribe`: the named tracks, or with `all` every track (and no automatic
    /// subscription to new ones). Names of tracks not subscribed are ignored.
    pub(super) async fn unsubscribe_request(
        &mut self,
        id: Option<RequestId>,
        tracks: Vec<String>,
        all: bool,
    ) {
        if let Err(msg) = check_request(&tracks, all) {
            return self.error(id, ErrorCode::BadRequest, msg).await;
        }
        self.stop_receiving(if all { None } else { Some(tracks) })
            .await;
        self.reply(id, ResponseResult::Empty {}).await;
    }

    /// Unsubscribe `tracks` (`None`: all, and no automatic subscription any more), in one
    /// renegotiation.
    pub(super) async fn stop_receiving(&mut self, tracks: Option<Vec<String>>) {
        let Some(j) = self.joined.as_mut() else {
            return;
        };
        let ids = match tracks {
            Some(t) => t,
            None => {
                j.auto_subscribe = false;
                j.sub_tracks.keys().cloned().collect()
            }
        };
        for t in ids {
            self.unsubscribe(&t).await;
        }
        self.maybe_offer().await;
    }

    /// Took a seat (or the host's place): receive every track, now and later.
    pub(super) async fn receive_everything(&mut self) {
        let Some(j) = self.joined.as_mut() else {
            return;
        };
        j.auto_subscribe = true;
        for r in j.room.tracks() {
            self.subscribe(r).await;
        }
        self.maybe_offer().await;
    }

    /// `pause_media` / `resume_media`: stop or restart forwarding every subscribed track to
    /// this member, without renegotiating. Resuming asks for keyframes so video restarts at
    /// once.
    pub(super) async fn pause_request(&mut self, id: Option<RequestId>, paused: bool) {
        let Some(j) = self.joined.as_ref() else {
            return;
        };
        let was = j.paused.swap(paused, Ordering::Relaxed);
        if was && !paused {
            for t in j
                .sub_tracks
                .values()
                .filter(|t| t.router.kind == Kind::Video)
            {
                t.router.request_keyframe();
            }
        }
        self.reply(id, ResponseResult::Empty {}).await;
    }
}
