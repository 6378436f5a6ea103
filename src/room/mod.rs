//! Rooms: who is in them, with which role, and which tracks they publish. A room exists while
//! it has participants. Members learn about each other through [`RoomEvent`]s; media flows
//! through the [`TrackRouter`]s the room lists, which is also the subscription interface the
//! bridge uses. Nothing here touches WebRTC, sockets or codecs.

mod cohosting;
mod feed;

pub use cohosting::{Actor, Stage};

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Instant;

use dashmap::DashMap;
use tokio::sync::mpsc;

use crate::auth::Role;
use crate::config::RoomConfig;
use crate::sfu::TrackRouter;
use crate::signaling::protocol::{
    Counts, ErrorCode, LeaveReason, MessageBody, Outcome, ParticipantInfo, RoomMessage, Sender,
    ServerMessage, TrackInfo,
};
use crate::webhooks::{Event, SeatLeft, SeatTaken, Webhooks};
use feed::FeedTx;
pub use feed::{FEED_CAPACITY, Feed, FeedItem};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RoomError {
    #[error("room is full ({0} real-time participants)")]
    Full(usize),
    #[error("room is full ({0} members)")]
    MembersFull(usize),
    #[error("the room already has {0} publishers")]
    TooManyPublishers(usize),
    #[error("at most {0} tracks per participant")]
    TooManyTracks(usize),
    #[error("role {0} may not publish")]
    Forbidden(&'static str),
    #[error("not in the room")]
    NotMember,
    #[error("all {0} co-host seats are taken")]
    SeatsFull(usize),
    #[error("only the host may do that")]
    NotHost,
    #[error("{0}")]
    WrongRole(&'static str),
    #[error("no such participant{0}")]
    UnknownParticipant(&'static str),
    #[error("no such {0}")]
    NotFound(&'static str),
    #[error("{0} already pending")]
    AlreadyPending(&'static str),
    #[error("the room has no host right now")]
    NoHost,
    #[error("the host muted your chat")]
    ChatMuted,
    #[error("at most {0} messages per second")]
    RateLimited(u32),
    #[error("at most {0} characters")]
    TooLong(usize),
    #[error("the room already has a host ({0}); a room has one host")]
    HostPresent(&'static str),
    /// A request that can never succeed as asked (e.g. a PK with one's own room).
    #[error("{0}")]
    Invalid(&'static str),
    /// A PK invitation whose inviting host left (the invitation was withdrawn).
    #[error("{0}")]
    Withdrawn(String),
}

impl RoomError {
    /// The stable protocol error code clients branch on.
    pub fn code(&self) -> ErrorCode {
        match self {
            RoomError::Full(_) | RoomError::MembersFull(_) => ErrorCode::RoomFull,
            RoomError::TooManyPublishers(_) => ErrorCode::TooManyPublishers,
            RoomError::TooManyTracks(_) => ErrorCode::TooManyTracks,
            RoomError::Forbidden(_) | RoomError::NotHost | RoomError::WrongRole(_) => {
                ErrorCode::Forbidden
            }
            RoomError::NotMember | RoomError::UnknownParticipant(_) => {
                ErrorCode::UnknownParticipant
            }
            RoomError::SeatsFull(_) => ErrorCode::SeatsFull,
            RoomError::NotFound(_) => ErrorCode::NotFound,
            RoomError::AlreadyPending(_) => ErrorCode::AlreadyPending,
            RoomError::NoHost => ErrorCode::NoHost,
            RoomError::ChatMuted => ErrorCode::ChatMuted,
            RoomError::RateLimited(_) => ErrorCode::RateLimited,
            RoomError::TooLong(_) => ErrorCode::MessageTooLarge,
            RoomError::HostPresent(_) => ErrorCode::HostPresent,
            RoomError::Invalid(_) => ErrorCode::BadRequest,
            RoomError::Withdrawn(_) => ErrorCode::Withdrawn,
        }
    }
}

/// What members are told. Delivered in order per member.
#[derive(Debug, Clone)]
pub enum RoomEvent {
    Joined(ParticipantInfo),
    /// A member is gone; `tracks` are the ones that ended with it (announced first, in the
    /// same event, so the departure costs one renegotiation: see [`RoomEvent::TracksUnpublished`]).
    Left {
        participant_id: String,
        identity: String,
        reason: LeaveReason,
        tracks: Vec<String>,
    },
    TrackPublished(TrackInfo, Arc<TrackRouter>),
    /// Tracks of one participant that ended together (a co-host's audio and video). One event,
    /// not one per track: a member's connection could otherwise wake between the two and
    /// renegotiate twice.
    TracksUnpublished {
        track_ids: Vec<String>,
        participant_id: String,
    },
    /// Addressed to one member: it has been removed from the room (replaced, kicked).
    Removed(LeaveReason),
    /// A message for the client as it is (co-host workflow, room messages, PK).
    Notify(ServerMessage),
    /// A message for everyone that must stay in order with this member's other events (role
    /// changes, mutes, PK), serialized once for the room. The high-volume ones (chat, likes,
    /// member counts) go through the room's [`Feed`] instead.
    Text(Arc<str>),
    /// Addressed to one member: their seat is gone (back to audience); stop taking their media.
    Demoted,
    /// Addressed to one member: it took a seat (or became the host): it gets media now, and
    /// subscribes to every track like hosts and co-hosts do.
    Promoted,
}

/// How many room events may wait for one member. Events are small (joins, leaves, publishes,
/// room messages; media never goes through here) and every owner drains its queue in its event
/// loop without waiting on its client, so a full queue means the owner is stuck: the member is
/// then cut off (see [`MemberTx`]) instead of the room blocking or the queue growing without
/// bound. 1024 covers a burst of every member of a full room joining and chatting at once.
pub const EVENT_QUEUE: usize = 1024;

/// The sending side of a member's room events (held by the room). Events travel boxed: a
/// queue's first block holds 32 of them whether or not they come, and every member has one,
/// so its slots are a pointer each (256 bytes) rather than a whole event (3 KiB with the
/// largest variants inline, measured per idle audience member).
pub struct EventTx(mpsc::Sender<Box<RoomEvent>>);

/// The receiving side of a member's room events (held by the member's connection). `None`
/// from `recv` while still a member means the room cut this member off because its queue
/// was full: its owner must disconnect it (reason `slow_reader`).
pub struct EventRx(mpsc::Receiver<Box<RoomEvent>>);

impl EventTx {
    fn try_send(&self, ev: RoomEvent) -> Result<(), mpsc::error::TrySendError<Box<RoomEvent>>> {
        self.0.try_send(Box::new(ev))
    }
}

impl EventRx {
    pub async fn recv(&mut self) -> Option<RoomEvent> {
        self.0.recv().await.map(|b| *b)
    }

    pub fn try_recv(&mut self) -> Result<RoomEvent, mpsc::error::TryRecvError> {
        self.0.try_recv().map(|b| *b)
    }
}

/// A bounded channel for one member's room events: pass the sender to [`Registry::join`].
pub fn event_channel() -> (EventTx, EventRx) {
    let (tx, rx) = mpsc::channel(EVENT_QUEUE);
    (EventTx(tx), EventRx(rx))
}

/// A member's event sender. The room never waits on a member: a full queue drops the event and
/// closes the channel, so the owner sees the end of its event stream once it has drained what
/// was queued, and disconnects the member as a slow reader. (The lock is only ever taken under
/// the room's state lock; it exists because events are sent while the state is borrowed
/// shared.)
struct MemberTx(Mutex<Option<EventTx>>);

impl MemberTx {
    fn new(tx: EventTx) -> Self {
        Self(Mutex::new(Some(tx)))
    }

    fn send(&self, ev: RoomEvent, pid: &str) {
        let mut slot = match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let Some(tx) = slot.as_ref() else {
            return;
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(ev) {
            tracing::warn!(
                participant = pid,
                queue = EVENT_QUEUE,
                "room events not read: queue full; cutting the member off as a slow reader"
            );
            *slot = None;
        }
    }
}

struct Member {
    identity: String,
    role: Role,
    /// A real-time participant (counts against `room.max_participants`): hosts, co-hosts and
    /// publishers from their join, audience members from their first subscription.
    media: bool,
    /// Track ids this member publishes, in publish order.
    tracks: Vec<String>,
    /// Holds a publisher slot: set when its first publish offer is accepted, so two newcomers
    /// negotiating at once cannot both pass the publisher limit.
    publishing: bool,
    /// Where this member's events go; see [`MemberTx`].
    tx: MemberTx,
    joined_at: Instant,
    /// Connection statistics the member's driver refreshes (opaque here: RTT, loss, jitter).
    media_stats: serde_json::Value,
    chat_muted: bool,
    /// When this member's recent messages were sent (rate limit).
    sent: VecDeque<Instant>,
}

#[derive(Default)]
struct State {
    /// Insertion order = join order.
    members: BTreeMap<u64, (String, Member)>,
    /// Participant id -> its key in `members` (rooms hold thousands of members; every chat
    /// line, like and stats update looks its sender up).
    index: std::collections::HashMap<String, u64>,
    next_seq: u64,
    tracks: BTreeMap<String, Arc<TrackRouter>>,
    /// Set when the last member left; a closed room is never reused.
    closed: bool,
    /// Pending co-host requests (requester id -> deadline) and invitations (invitee -> deadline).
    requests: BTreeMap<String, Instant>,
    invites: BTreeMap<String, Instant>,
    /// The last messages, oldest first, and the id the next one gets.
    messages: VecDeque<RoomMessage>,
    next_message_id: u64,
    /// The host left with co-hosts seated or while live: their seats and the room's stream
    /// last until then (an empty room stays open until then too).
    host_grace_until: Option<Instant>,
    /// A bridge streams this room (set by bridge control): a host dropping out of a live room
    /// gets the grace period even alone, and viewers see the host-away slate meanwhile.
    live: bool,
    /// The identity of that host: only it may join as host during the grace period.
    grace_host: Option<String>,
    /// The room this one is in a PK with, and the partner host's tracks shown here.
    pk: Option<Arc<Room>>,
    foreign: BTreeMap<String, Arc<TrackRouter>>,
    /// PK invitations received: inviting room -> invitation (at most [`MAX_PK_INVITES`]).
    pk_invites: BTreeMap<String, cohosting::PkInvitation>,
    /// PK invitations this room's host sent and that are pending: invited room -> that room
    /// (at most [`MAX_PK_INVITES`]). Withdrawn when the host leaves.
    pk_sent: BTreeMap<String, std::sync::Weak<Room>>,
    /// Likes waiting for the next tick (see [`Room::say`]).
    likes: cohosting::PendingLikes,
    /// The member counts last sent as `member_count`, and when.
    counts_sent: Option<Counts>,
    counts_at: Option<Instant>,
    /// Messages for everyone (see [`Feed`]).
    feed: FeedTx,
}

/// Pending PK invitations a room may have sent, and may have received, at a time.
pub const MAX_PK_INVITES: usize = 8;

/// Rooms up to this many members post a "joined"/"left" message for every audience member;
/// larger rooms only for real-time participants (see `member_count`).
pub const ANNOUNCE_AUDIENCE_MAX: usize = 100;

/// Audience members a host or co-host joining is told about in its join result (the most
/// recent); later ones arrive as `participant_joined`.
pub const JOIN_AUDIENCE_LISTED: usize = 1000;

pub struct Room {
    pub name: String,
    pub created: Instant,
    cfg: RoomConfig,
    state: Mutex<State>,
    /// The id of the newest message (for long-polling viewers).
    messages_tx: tokio::sync::watch::Sender<u64>,
    /// Where this room's facts go for the operator's backend. Emitted under the room's lock
    /// where the fact is decided, so they are queued in the room's own order.
    hooks: Webhooks,
}

/// The state a new member starts from.
pub struct JoinSnapshot {
    pub participant: ParticipantInfo,
    pub others: Vec<ParticipantInfo>,
    pub tracks: Vec<(TrackInfo, Arc<TrackRouter>)>,
    /// The room's messages for everyone from now on.
    pub feed: Feed,
}

fn track_info(r: &TrackRouter) -> TrackInfo {
    TrackInfo {
        id: r.id.clone(),
        participant_id: r.participant_id.clone(),
        kind: r.kind,
        codec: r.codec.mime_type.clone(),
        muted: r.is_muted(),
        layers: r.layers().to_vec(),
    }
}

impl Room {
    /// The webhook handle (bridges and pushes of this room report through it too).
    pub fn webhooks(&self) -> &Webhooks {
        &self.hooks
    }

    /// Tell the operator's backend (never waits; see [`Webhooks::emit`]).
    pub(crate) fn hook(&self, event: Event) {
        self.hooks.emit(&self.name, event);
    }

    fn hook_unpublished(&self, pid: &str, router: &TrackRouter) {
        self.hook(Event::TrackUnpublished {
            participant_id: pid.to_string(),
            track_id: router.id.clone(),
            kind: router.kind,
        });
    }

    /// A member is gone from the room: its seat (if any), then the member.
    fn hook_left(&self, pid: &str, m: &Member, reason: LeaveReason) {
        if m.role == Role::Cohost {
            self.hook(Event::CohostSeatLeft {
                participant_id: pid.to_string(),
                identity: m.identity.clone(),
                reason: SeatLeft::LeftRoom,
            });
        }
        self.hook(Event::ParticipantLeft {
            participant_id: pid.to_string(),
            identity: m.identity.clone(),
            role: m.role,
            reason,
            duration_ms: crate::webhooks::ms_since(m.joined_at),
        });
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn info_of(st: &State, id: &str, m: &Member) -> ParticipantInfo {
        ParticipantInfo {
            id: id.to_string(),
            identity: m.identity.clone(),
            role: m.role,
            tracks: m
                .tracks
                .iter()
                .filter_map(|t| st.tracks.get(t).map(|r| track_info(r)))
                .collect(),
        }
    }

    /// What a member sees of the others: real-time participants, and for a host or co-host
    /// the most recent audience members too (the ones it may invite); never thousands. And
    /// every track.
    #[allow(clippy::type_complexity)]
    fn view_of(
        st: &State,
        me: &str,
        media: bool,
    ) -> (Vec<ParticipantInfo>, Vec<(TrackInfo, Arc<TrackRouter>)>) {
        let audience: Vec<&(String, Member)> = if media {
            let mut a: Vec<_> = st
                .members
                .values()
                .filter(|(id, m)| !m.media && id != me)
                .collect();
            let skip = a.len().saturating_sub(JOIN_AUDIENCE_LISTED);
            a.drain(..skip);
            a
        } else {
            vec![]
        };
        let others = st
            .members
            .values()
            .filter(|(id, m)| m.media && id != me)
            .chain(audience)
            .map(|(id, m)| Room::info_of(st, id, m))
            .collect();
        let tracks = st
            .tracks
            .values()
            .map(|t| (track_info(t), t.clone()))
            .collect();
        (others, tracks)
    }

    /// A member's state as of now, as its join gave it (for a connection that resumes it).
    pub fn snapshot(&self, pid: &str) -> Option<JoinSnapshot> {
        let st = self.lock();
        let seq = *st.index.get(pid)?;
        let (_, m) = st.members.get(&seq)?;
        let participant = Room::info_of(&st, pid, m);
        let (others, tracks) = Room::view_of(&st, pid, m.media);
        Some(JoinSnapshot {
            participant,
            others,
            tracks,
            feed: st.feed.subscribe(),
        })
    }

    fn find<'a>(st: &'a mut State, pid: &str) -> Option<&'a mut Member> {
        let seq = *st.index.get(pid)?;
        st.members.get_mut(&seq).map(|(_, m)| m)
    }

    fn broadcast(st: &State, except: &str, ev: &RoomEvent) {
        for (id, m) in st.members.values() {
            if id != except {
                m.tx.send(ev.clone(), id);
            }
        }
    }

    pub fn participants(&self) -> Vec<ParticipantInfo> {
        let st = self.lock();
        st.members
            .values()
            .map(|(id, m)| Self::info_of(&st, id, m))
            .collect()
    }

    pub fn set_media_stats(&self, pid: &str, stats: serde_json::Value) {
        let mut st = self.lock();
        if let Some(m) = Self::find(&mut st, pid) {
            m.media_stats = stats;
        }
    }

    /// Participants with their connection statistics, for the REST room view.
    pub fn participants_detailed(&self) -> Vec<serde_json::Value> {
        let st = self.lock();
        st.members
            .values()
            .map(|(id, m)| {
                let info = Self::info_of(&st, id, m);
                serde_json::json!({
                    "id": info.id,
                    "identity": info.identity,
                    "role": info.role,
                    "tracks": info.tracks,
                    "connected_secs": m.joined_at.elapsed().as_secs(),
                    "media": m.media_stats,
                })
            })
            .collect()
    }

    pub fn participant_count(&self) -> usize {
        self.lock().members.len()
    }

    /// Members (any role) and real-time participants (with media) now.
    pub fn counts(&self) -> Counts {
        Self::counts_of(&self.lock())
    }

    fn counts_of(st: &State) -> Counts {
        Counts {
            members: st.members.len(),
            participants: Self::realtime(st),
        }
    }

    fn realtime(st: &State) -> usize {
        st.members.values().filter(|(_, m)| m.media).count()
    }

    /// Tell about a member entering or leaving: everyone when it has media (hosts, co-hosts,
    /// subscribers), only the real-time participants when it is an audience member, so that
    /// thousands of audience members joining do not cost everyone an event each.
    /// Close and remove the tracks `ids` of `pid` (webhooks told): the ids that were live.
    fn end_tracks(&self, st: &mut State, pid: &str, ids: &[String]) -> Vec<String> {
        let mut ended = Vec::with_capacity(ids.len());
        for t in ids {
            if let Some(router) = st.tracks.remove(t) {
                router.close();
                self.hook_unpublished(pid, &router);
                ended.push(t.clone());
            }
        }
        ended
    }

    /// Tell the others that `pid` left with `tracks`, one event per member: those who hear of
    /// presence (see [`Room::presence`]) get `Left` carrying the tracks, the rest only the
    /// tracks (every member may receive them).
    fn departed(
        st: &State,
        pid: &str,
        identity: &str,
        reason: LeaveReason,
        tracks: Vec<String>,
        media: bool,
    ) {
        let left = RoomEvent::Left {
            participant_id: pid.to_string(),
            identity: identity.to_string(),
            reason,
            tracks: tracks.clone(),
        };
        let unpublished = (!tracks.is_empty()).then(|| RoomEvent::TracksUnpublished {
            track_ids: tracks,
            participant_id: pid.to_string(),
        });
        for (id, m) in st.members.values() {
            if id == pid {
                continue;
            }
            if media || m.media {
                m.tx.send(left.clone(), id);
            } else if let Some(ev) = &unpublished {
                m.tx.send(ev.clone(), id);
            }
        }
    }

    fn presence(st: &State, except: &str, ev: &RoomEvent, media: bool) {
        for (id, m) in st.members.values() {
            if id != except && (media || m.media) {
                m.tx.send(ev.clone(), id);
            }
        }
    }

    /// Whether an audience member entering or leaving goes into the room's messages (the
    /// "joined"/"left" lines): in rooms of at most [`ANNOUNCE_AUDIENCE_MAX`] members; larger
    /// rooms get the member count instead.
    fn announce(st: &State, media: bool) -> bool {
        media || st.members.len() <= ANNOUNCE_AUDIENCE_MAX
    }

    /// Every track shown in this room: its members' and, during a PK, the partner host's.
    pub fn tracks(&self) -> Vec<Arc<TrackRouter>> {
        let st = self.lock();
        st.tracks
            .values()
            .chain(st.foreign.values())
            .cloned()
            .collect()
    }

    pub fn track(&self, id: &str) -> Option<Arc<TrackRouter>> {
        self.lock().tracks.get(id).cloned()
    }

    pub fn publisher_count(&self) -> usize {
        self.lock()
            .members
            .values()
            .filter(|(_, m)| m.publishing || !m.tracks.is_empty())
            .count()
    }

    /// May `pid` start publishing (role, publisher limit)? Checked before negotiating so a
    /// refused publisher gets an error instead of an answer.
    /// `adding_track`: also check the per-participant track limit.
    pub fn check_publish(&self, pid: &str, adding_track: bool) -> Result<(), RoomError> {
        let mut st = self.lock();
        let publishers = st
            .members
            .values()
            .filter(|(id, m)| (m.publishing || !m.tracks.is_empty()) && id != pid)
            .count();
        let max_tracks = self.cfg.max_tracks_per_participant;
        let m = Self::find(&mut st, pid).ok_or(RoomError::NotMember)?;
        if !m.role.may_publish() {
            return Err(RoomError::Forbidden(m.role.as_str()));
        }
        if !m.publishing && m.tracks.is_empty() && publishers >= self.cfg.max_publishers {
            return Err(RoomError::TooManyPublishers(self.cfg.max_publishers));
        }
        if adding_track && m.tracks.len() >= max_tracks {
            return Err(RoomError::TooManyTracks(max_tracks));
        }
        m.publishing = true;
        Ok(())
    }

    /// Announce a track `pid` now publishes.
    pub fn publish(&self, pid: &str, router: Arc<TrackRouter>) -> Result<TrackInfo, RoomError> {
        self.check_publish(pid, true)?;
        let mut st = self.lock();
        let m = Self::find(&mut st, pid).ok_or(RoomError::NotMember)?;
        m.tracks.push(router.id.clone());
        let host = m.role == Role::Host;
        let info = track_info(&router);
        self.hook(Event::TrackPublished {
            participant_id: pid.to_string(),
            track_id: router.id.clone(),
            kind: router.kind,
            codec: router.codec.mime_type.clone(),
        });
        st.tracks.insert(router.id.clone(), router.clone());
        Self::broadcast(
            &st,
            pid,
            &RoomEvent::TrackPublished(info.clone(), router.clone()),
        );
        // A host in a PK is seen in the partner room too.
        let partner = st.pk.clone().filter(|_| host);
        drop(st);
        if let Some(p) = partner {
            p.add_foreign(router);
        }
        Ok(info)
    }

    pub fn unpublish(&self, pid: &str, track_id: &str) {
        self.unpublish_tracks(pid, |_| vec![track_id.to_string()]);
    }

    /// `pid` stops publishing and stays in the room: every track it publishes ends and its
    /// publisher slot is free again (a host ending the live and staying to chat).
    pub fn unpublish_all(&self, pid: &str) {
        self.unpublish_tracks(pid, |m| {
            m.publishing = false;
            m.tracks.clone()
        });
    }

    /// End the tracks `which` picks of `pid`, here and in the PK partner's room, each room
    /// told in one event (so a member renegotiates once for all of them).
    fn unpublish_tracks(&self, pid: &str, which: impl FnOnce(&mut Member) -> Vec<String>) {
        let mut st = self.lock();
        let Some(m) = Self::find(&mut st, pid) else {
            return;
        };
        let ids = which(m);
        m.tracks.retain(|t| !ids.contains(t));
        let ended = self.end_tracks(&mut st, pid, &ids);
        if !ended.is_empty() {
            Self::broadcast(
                &st,
                pid,
                &RoomEvent::TracksUnpublished {
                    track_ids: ended,
                    participant_id: pid.to_string(),
                },
            );
        }
        let partner = st.pk.clone();
        drop(st);
        if let Some(p) = partner {
            p.remove_foreign(&ids);
        }
    }

    /// The room ended (its last member left); it is never reused.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Whether a bridge streams this room (see [`Registry::set_live`]).
    pub fn is_live(&self) -> bool {
        self.lock().live
    }

    /// Set the live flag only (see [`Registry::set_live`], which also ends an empty room).
    pub fn mark_live(&self, live: bool) {
        self.lock().live = live;
    }
}

impl Registry {
    /// An audience member starts receiving media (its first `subscribe`): it becomes a
    /// real-time participant, within `room.max_participants`. Everyone is told it is there.
    pub fn set_media(&self, room: &Arc<Room>, pid: &str) -> Result<(), RoomError> {
        let mut st = room.lock();
        let realtime = Room::realtime(&st);
        let info = {
            let Some(m) = Room::find(&mut st, pid) else {
                return Err(RoomError::NotMember);
            };
            if m.media {
                return Ok(());
            }
            if realtime >= self.cfg.max_participants {
                return Err(RoomError::Full(self.cfg.max_participants));
            }
            m.media = true;
            let (id, m) = st
                .members
                .values()
                .find(|(id, _)| id == pid)
                .ok_or(RoomError::NotMember)?;
            Room::info_of(&st, id, m)
        };
        // The audience did not hear of it joining; the real-time participants did.
        for (id, m) in st.members.values() {
            if id != pid && !m.media {
                m.tx.send(RoomEvent::Joined(info.clone()), id);
            }
        }
        Ok(())
    }

    /// Bridge control marks a room live while a bridge streams it (and not live when the bridge
    /// stops). A room that is not live any more ends at once if nobody is in it, even within
    /// the host's grace period (the host ended the live, or an operator stopped the bridge),
    /// unless co-hosts keep their seats.
    pub fn set_live(&self, room: &Arc<Room>, live: bool) {
        {
            let mut st = room.lock();
            let ended = st.live && !live;
            st.live = live;
            if ended {
                // Members and the viewer feed learn that the live is over (not "not started").
                room.post(
                    &mut st,
                    None,
                    MessageBody::Notice {
                        text: "the live ended".into(),
                    },
                );
            }
            if !live && st.members.is_empty() {
                st.host_grace_until = None;
                st.grace_host = None;
            }
        }
        if !live {
            self.remove_if_empty(room);
        }
    }
}

/// A change in a room's life that whoever runs something per room (the bridge) follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// The last member left: the room is closed and out of the registry (a new room of the
    /// same name is another [`Room`]). Sent once per room, whatever kind of participant (a
    /// WebSocket member, a WHIP or an RTMP publisher) was the last one out.
    Ended,
    /// The host's grace period (`room.host_grace`) ended without the host coming back.
    HostGone,
}

/// Told about every room's [`Lifecycle`] changes; see [`Registry::on_lifecycle`]. Called
/// synchronously, with no room lock held, from whichever task made the change: it must not
/// block.
pub type LifecycleHook = Arc<dyn Fn(&Arc<Room>, Lifecycle) + Send + Sync>;

/// All rooms of this server.
pub struct Registry {
    cfg: RoomConfig,
    rooms: DashMap<String, Arc<Room>>,
    /// Who follows the rooms' lives (set once at start-up).
    hooks: RwLock<Vec<LifecycleHook>>,
    /// Handed to every room (see [`Room::webhooks`]).
    webhooks: Webhooks,
}

fn new_id(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    let tail: String = (0..12)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{prefix}_{tail}")
}

pub fn new_track_id() -> String {
    new_id("TR")
}

impl Registry {
    pub fn new(cfg: RoomConfig) -> Self {
        Self::with_webhooks(cfg, Webhooks::default())
    }

    /// Rooms that report to the operator's backend through `webhooks`.
    pub fn with_webhooks(cfg: RoomConfig, webhooks: Webhooks) -> Self {
        Self {
            cfg,
            rooms: DashMap::new(),
            hooks: RwLock::new(Vec::new()),
            webhooks,
        }
    }

    pub fn webhooks(&self) -> &Webhooks {
        &self.webhooks
    }

    /// Follow every room's [`Lifecycle`]: `hook` is called when a room ends or its host is gone
    /// for good. This is the one place a room's end is announced, so whatever lives per room
    /// (the bridge) ends the same way whoever the last participant was.
    pub fn on_lifecycle(&self, hook: LifecycleHook) {
        match self.hooks.write() {
            Ok(mut h) => h.push(hook),
            Err(p) => p.into_inner().push(hook),
        }
    }

    /// Tell the hooks (never under a room lock).
    pub(crate) fn announce(&self, room: &Arc<Room>, change: Lifecycle) {
        let hooks: Vec<LifecycleHook> = match self.hooks.read() {
            Ok(h) => h.clone(),
            Err(p) => p.into_inner().clone(),
        };
        tracing::debug!(room = %room.name, ?change, "room lifecycle");
        for h in hooks {
            h(room, change);
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<Room>> {
        self.rooms.get(name).map(|r| r.clone())
    }

    pub fn rooms(&self) -> Vec<Arc<Room>> {
        self.rooms.iter().map(|r| r.value().clone()).collect()
    }

    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// Enter a room (created on first join). A member with the same identity is removed first
    /// (`Replaced`): a client reconnecting after a network change must not be locked out by its
    /// own ghost.
    pub fn join(
        &self,
        room: &str,
        identity: &str,
        role: Role,
        tx: EventTx,
    ) -> Result<(Arc<Room>, JoinSnapshot), RoomError> {
        loop {
            let r = self
                .rooms
                .entry(room.to_string())
                .or_insert_with(|| {
                    Arc::new(Room {
                        name: room.to_string(),
                        created: Instant::now(),
                        cfg: self.cfg.clone(),
                        state: Mutex::new(State {
                            feed: FeedTx::new(self.cfg.feed_batch),
                            ..State::default()
                        }),
                        messages_tx: tokio::sync::watch::channel(0).0,
                        hooks: self.webhooks.clone(),
                    })
                })
                .clone();
            let mut st = r.lock();
            if st.closed {
                // Lost a race with the last member leaving; the registry entry is being removed.
                drop(st);
                self.rooms.remove_if(room, |_, v| Arc::ptr_eq(v, &r));
                continue;
            }
            // One host per room: a host token of another identity is refused while the host
            // is in the room or within its grace period, so nobody can take over (and kick the
            // host off) a live room with a second host token. The same identity rejoining
            // replaces its old connection below; operators act through the REST API.
            if role == Role::Host {
                let other_live = st
                    .members
                    .values()
                    .any(|(_, m)| m.role == Role::Host && m.identity != identity);
                let other_in_grace = st.host_grace_until.is_some_and(|d| d > Instant::now())
                    && st.grace_host.as_deref().is_some_and(|h| h != identity);
                if other_live || other_in_grace {
                    drop(st);
                    tracing::info!(%room, %identity, "host join refused: the room has a host");
                    return Err(RoomError::HostPresent(if other_live {
                        "in the room"
                    } else {
                        "within its grace period"
                    }));
                }
            }
            // Replace a member with the same identity.
            let ghost = st
                .members
                .iter()
                .find(|(_, (_, m))| m.identity == identity)
                .map(|(seq, (id, _))| (*seq, id.clone()));
            if let Some((seq, ghost_id)) = ghost
                && let Some((_, m)) = st.members.remove(&seq)
            {
                st.index.remove(&ghost_id);
                {
                    m.tx.send(RoomEvent::Removed(LeaveReason::Replaced), &ghost_id);
                    let tracks = r.end_tracks(&mut st, &ghost_id, &m.tracks);
                    Room::departed(
                        &st,
                        &ghost_id,
                        &m.identity,
                        LeaveReason::Replaced,
                        tracks,
                        true,
                    );
                    r.hook_left(&ghost_id, &m, LeaveReason::Replaced);
                }
            }
            let seats_full =
                role == Role::Cohost && Room::seats_taken(&st) >= self.cfg.cohost_seats;
            let media = role.may_publish();
            let refused = if seats_full {
                Some(RoomError::SeatsFull(self.cfg.cohost_seats))
            } else if st.members.len() >= self.cfg.max_members {
                Some(RoomError::MembersFull(self.cfg.max_members))
            } else if media && Room::realtime(&st) >= self.cfg.max_participants {
                Some(RoomError::Full(self.cfg.max_participants))
            } else {
                None
            };
            if let Some(e) = refused {
                let empty = st.members.is_empty();
                drop(st);
                if empty {
                    self.remove_if_empty(&r);
                }
                return Err(e);
            }
            let pid = new_id("PA");
            let member = Member {
                identity: identity.to_string(),
                role,
                media,
                tracks: vec![],
                publishing: false,
                tx: MemberTx::new(tx),
                joined_at: Instant::now(),
                media_stats: serde_json::Value::Null,
                chat_muted: false,
                sent: VecDeque::new(),
            };
            let info = Room::info_of(&st, &pid, &member);
            // The room's first member ever (a room instance is never reused).
            if st.next_seq == 0 {
                r.hook(Event::RoomStarted);
            }
            r.hook(Event::ParticipantJoined {
                participant_id: pid.clone(),
                identity: identity.to_string(),
                role,
            });
            if role == Role::Cohost {
                r.hook(Event::CohostSeatTaken {
                    participant_id: pid.clone(),
                    identity: identity.to_string(),
                    how: SeatTaken::Joined,
                });
            }
            let (others, tracks) = Room::view_of(&st, &pid, media);
            // Under the lock: nothing posted after this join is missed.
            let feed = st.feed.subscribe();
            Room::presence(&st, &pid, &RoomEvent::Joined(info.clone()), media);
            let seq = st.next_seq;
            st.next_seq += 1;
            let sender = Sender {
                participant_id: pid.clone(),
                identity: identity.to_string(),
            };
            st.index.insert(pid.clone(), seq);
            st.members.insert(seq, (pid, member));
            if Room::announce(&st, media) {
                r.post(&mut st, Some(sender), MessageBody::Joined { role });
            }
            if role == Role::Host && st.host_grace_until.take().is_some() {
                st.grace_host = None;
                r.post(
                    &mut st,
                    None,
                    MessageBody::Notice {
                        text: "the host is back".into(),
                    },
                );
            }
            drop(st);
            return Ok((
                r,
                JoinSnapshot {
                    participant: info,
                    others,
                    tracks,
                    feed,
                },
            ));
        }
    }

    /// Leave: unpublish everything, tell the others, and remove the room when it is empty.
    pub fn leave(&self, room: &Arc<Room>, pid: &str, reason: LeaveReason) {
        let mut st = room.lock();
        let seq = st.index.remove(pid);
        if let Some(seq) = seq
            && let Some((_, m)) = st.members.remove(&seq)
        {
            let tracks = room.end_tracks(&mut st, pid, &m.tracks);
            Room::departed(&st, pid, &m.identity, reason, tracks, m.media);
            tracing::info!(room = %room.name, participant = pid, identity = %m.identity,
                ?reason, secs = m.joined_at.elapsed().as_secs(), "left");
            room.hook_left(pid, &m, reason);
            let sender = Sender {
                participant_id: pid.to_string(),
                identity: m.identity.clone(),
            };
            if Room::announce(&st, m.media) {
                room.post(&mut st, Some(sender), MessageBody::Left { reason });
            }
            room.after_leave(&mut st, pid, m.role, &m.identity);
        }
        let host_left = !st.members.values().any(|(_, m)| m.role == Role::Host);
        drop(st);
        if host_left {
            Registry::pk_unlink(room);
            Registry::pk_withdraw(room);
        }
        self.remove_if_empty(room);
    }

    /// Close and remove an empty room, and announce its end (once: closing happens once).
    fn remove_if_empty(&self, room: &Arc<Room>) {
        let ended = {
            let mut st = room.lock();
            // A live room whose host dropped stays open (streaming the host-away slate) until
            // the host's grace period ends: then `tick` removes it.
            if !st.members.is_empty() || st.host_grace_until.is_some() {
                return;
            }
            let was_closed = st.closed;
            st.closed = true;
            st.pk = None;
            st.foreign.clear();
            !was_closed
        };
        self.rooms
            .remove_if(&room.name, |_, v| Arc::ptr_eq(v, room) && v.is_closed());
        if ended {
            room.hook(Event::RoomEnded {
                duration_ms: crate::webhooks::ms_since(room.created),
            });
            self.announce(room, Lifecycle::Ended);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sfu::CodecSpec;
    use crate::signaling::protocol::Kind;

    /// A track of `kind` published by `pid` (an Opus or H.264 router, nothing flowing).
    fn router(id: String, pid: &str, kind: Kind) -> Arc<TrackRouter> {
        let codec = match kind {
            Kind::Audio => CodecSpec {
                mime_type: "audio/opus".into(),
                clock_rate: 48000,
                channels: 2,
                fmtp: String::new(),
            },
            Kind::Video => CodecSpec {
                mime_type: "video/H264".into(),
                clock_rate: 90000,
                channels: 0,
                fmtp: String::new(),
            },
        };
        TrackRouter::new(id, pid.to_string(), kind, codec).0
    }

    /// The next event that is not a room message (joins and leaves also post chat notices).
    fn next_event(rx: &mut EventRx) -> Option<RoomEvent> {
        loop {
            match rx.try_recv() {
                Ok(RoomEvent::Notify(_) | RoomEvent::Text(_)) => continue,
                Ok(ev) => return Some(ev),
                Err(_) => return None,
            }
        }
    }

    fn reg(max: usize) -> Registry {
        Registry::new(RoomConfig {
            max_participants: max,
            max_publishers: 1,
            max_tracks_per_participant: 2,
            ..RoomConfig::default()
        })
    }

    #[test]
    fn join_leave_lifecycle_and_events() {
        let r = reg(3);
        let (tx_a, mut rx_a) = event_channel();
        let (room, snap_a) = r.join("x", "alice", Role::Host, tx_a).unwrap();
        assert!(snap_a.others.is_empty());
        let (tx_b, _rx_b) = event_channel();
        let (_, snap_b) = r.join("x", "bob", Role::Cohost, tx_b).unwrap();
        assert_eq!(snap_b.others.len(), 1);
        assert!(matches!(next_event(&mut rx_a), Some(RoomEvent::Joined(p)) if p.identity == "bob"));
        r.leave(&room, &snap_b.participant.id, LeaveReason::Left);
        assert!(matches!(
            next_event(&mut rx_a),
            Some(RoomEvent::Left { .. })
        ));
        assert_eq!(r.room_count(), 1);
        r.leave(&room, &snap_a.participant.id, LeaveReason::Left);
        assert_eq!(r.room_count(), 0);
    }

    #[test]
    fn a_room_ends_once_whoever_leaves_last_and_its_followers_are_told() {
        let r = reg(3);
        let seen: Arc<Mutex<Vec<(String, Lifecycle, bool)>>> = Arc::default();
        let s = seen.clone();
        r.on_lifecycle(Arc::new(move |room, change| {
            s.lock()
                .unwrap()
                .push((room.name.clone(), change, room.is_closed()));
        }));
        let (tx, _rx_a) = event_channel();
        let (room, a) = r.join("x", "obs", Role::Host, tx).unwrap();
        let (tx, _rx_b) = event_channel();
        let (_, b) = r.join("x", "fan", Role::Audience, tx).unwrap();
        r.leave(&room, &a.participant.id, LeaveReason::Left);
        assert!(
            seen.lock().unwrap().is_empty(),
            "the room still has a member"
        );
        r.leave(&room, &b.participant.id, LeaveReason::Left);
        // Leaving twice (a driver's teardown after a kick) does not end it twice.
        r.leave(&room, &b.participant.id, LeaveReason::Left);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![("x".to_string(), Lifecycle::Ended, true)]
        );
        assert!(r.get("x").is_none());
        // The next room of that name is a new room, with its own end.
        let (tx, _rx) = event_channel();
        let (again, c) = r.join("x", "obs", Role::Host, tx).unwrap();
        assert!(!Arc::ptr_eq(&again, &room) && !again.is_closed());
        r.leave(&again, &c.participant.id, LeaveReason::Left);
        assert_eq!(seen.lock().unwrap().len(), 2);
    }

    #[test]
    fn limits_and_roles() {
        let r = Registry::new(RoomConfig {
            max_members: 4,
            max_participants: 2,
            max_publishers: 1,
            max_tracks_per_participant: 2,
            ..RoomConfig::default()
        });
        let mut rxs = vec![];
        let mut join = |who: &str, role| {
            let (tx, rx) = event_channel();
            rxs.push(rx);
            r.join("x", who, role, tx)
        };
        let (room, a) = join("a", Role::Host).unwrap();
        // The audience is signaling-only: it does not count against the real-time limit.
        let (_, b) = join("b", Role::Audience).unwrap();
        let (_, c) = join("c", Role::Audience).unwrap();
        join("d", Role::Cohost).unwrap();
        assert_eq!(
            room.counts(),
            Counts {
                members: 4,
                participants: 2
            }
        );
        assert_eq!(
            join("e", Role::Audience).err(),
            Some(RoomError::MembersFull(4))
        );
        // Real-time participants are full: an audience member cannot start receiving media.
        assert_eq!(
            r.set_media(&room, &c.participant.id),
            Err(RoomError::Full(2))
        );
        r.leave(&room, &c.participant.id, LeaveReason::Left);
        assert_eq!(join("f", Role::Cohost).err(), Some(RoomError::Full(2)));
        assert_eq!(
            room.check_publish(&b.participant.id, false),
            Err(RoomError::Forbidden("audience"))
        );
        let track = router("TR_1".into(), &a.participant.id, Kind::Audio);
        room.publish(&a.participant.id, track).unwrap();
        assert_eq!(room.publisher_count(), 1);
    }

    /// A co-host's audio and video end in one event per member (removed from the seat,
    /// unpublishing everything, or leaving with its tracks and `Left` in one): a member's
    /// connection never sees half of a departure and so renegotiates once.
    #[test]
    fn a_departure_reaches_each_member_as_one_event() {
        let r = reg(5);
        let (tx, mut rx_host) = event_channel();
        let (room, host) = r.join("x", "h", Role::Host, tx).unwrap();
        let (tx, mut rx_fan) = event_channel();
        r.join("x", "fan", Role::Audience, tx).unwrap();
        let publish = |pid: &str, n: &str| {
            for kind in [Kind::Audio, Kind::Video] {
                room.publish(pid, router(format!("TR_{n}_{kind:?}"), pid, kind))
                    .unwrap();
            }
        };
        let drain = |rx: &mut EventRx| while next_event(rx).is_some() {};
        // Removed from the seat, leaving, and unpublishing everything while staying.
        for (n, how) in [("g1", 0), ("g2", 1), ("g3", 2)] {
            let (tx, _rx) = event_channel();
            let (_, g) = r.join("x", n, Role::Cohost, tx).unwrap();
            publish(&g.participant.id, n);
            drain(&mut rx_host);
            drain(&mut rx_fan);
            match how {
                0 => {
                    let actor = Actor::member(&host.participant.id, Role::Host);
                    room.remove_cohost(actor, &g.participant.id).unwrap();
                }
                1 => r.leave(&room, &g.participant.id, LeaveReason::Left),
                _ => room.unpublish_all(&g.participant.id),
            }
            for rx in [&mut rx_host, &mut rx_fan] {
                let mut ended = vec![];
                while let Some(ev) = next_event(rx) {
                    match ev {
                        RoomEvent::TracksUnpublished { track_ids, .. } => ended.push(track_ids),
                        RoomEvent::Left { tracks, .. } => ended.push(tracks),
                        _ => {}
                    }
                }
                assert_eq!(ended.len(), 1, "{n}: {ended:?}");
                assert_eq!(ended[0].len(), 2, "{n}: {ended:?}");
            }
        }
    }

    #[test]
    fn same_identity_replaces_ghost() {
        let r = reg(5);
        let (tx, mut rx_old) = event_channel();
        r.join("x", "a", Role::Host, tx).unwrap();
        let (tx, _rx) = event_channel();
        let (room, _) = r.join("x", "a", Role::Host, tx).unwrap();
        assert!(matches!(
            next_event(&mut rx_old),
            Some(RoomEvent::Removed(LeaveReason::Replaced))
        ));
        assert_eq!(room.participant_count(), 1);
    }

    #[test]
    fn a_second_host_is_refused_while_the_host_is_present_or_in_grace() {
        let r = reg(5);
        let (tx, _rx_a) = event_channel();
        let (room, a) = r.join("x", "alice", Role::Host, tx).unwrap();
        let (tx, _rx) = event_channel();
        assert_eq!(
            r.join("x", "mallory", Role::Host, tx).err(),
            Some(RoomError::HostPresent("in the room"))
        );
        assert_eq!(RoomError::HostPresent("").code(), ErrorCode::HostPresent);
        // Another identity as co-host is fine; alice is still the one host.
        let (tx, _rx_c) = event_channel();
        r.join("x", "carol", Role::Cohost, tx).unwrap();
        assert_eq!(room.participant_count(), 2);
        // Alice drops with a co-host seated: her grace period keeps the room hers.
        r.leave(&room, &a.participant.id, LeaveReason::Disconnected);
        let (tx, _rx) = event_channel();
        assert_eq!(
            r.join("x", "mallory", Role::Host, tx).err(),
            Some(RoomError::HostPresent("within its grace period"))
        );
        let (tx, _rx_a2) = event_channel();
        r.join("x", "alice", Role::Host, tx).unwrap();
        // The same identity replaces its own connection as before.
        let (tx, _rx_a3) = event_channel();
        r.join("x", "alice", Role::Host, tx).unwrap();
        assert_eq!(room.participant_count(), 2);
    }

    #[test]
    fn a_member_that_does_not_read_its_events_is_cut_off_not_buffered() {
        let r = reg(5);
        let (tx, mut rx_slow) = event_channel();
        // On stage, so that every audience visit is announced to them (room messages go
        // through the room's feed, not these queues).
        let (room, _) = r.join("x", "slow", Role::Cohost, tx).unwrap();
        let (tx, mut rx_ok) = event_channel();
        r.join("x", "ok", Role::Host, tx).unwrap();
        // Far more events than the queue holds (each visit: joined and left); the room never
        // blocks.
        for i in 0..EVENT_QUEUE * 2 {
            let (tx, _rx) = event_channel();
            let (_, v) = r.join("x", &format!("v{i}"), Role::Audience, tx).unwrap();
            r.leave(&room, &v.participant.id, LeaveReason::Left);
            // The reader that keeps up is never cut off.
            while rx_ok.try_recv().is_ok() {}
        }
        // The slow member's queue holds at most EVENT_QUEUE events, then ends: its owner
        // disconnects it as a slow reader.
        let mut queued = 0;
        loop {
            match rx_slow.try_recv() {
                Ok(_) => queued += 1,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => panic!("channel not closed"),
            }
        }
        assert!(queued <= EVENT_QUEUE, "{queued}");
        assert!(matches!(
            rx_ok.try_recv(),
            Err(mpsc::error::TryRecvError::Empty)
        ));
    }
}
