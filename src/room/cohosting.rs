//! The co-host workflow on top of room membership: seats (request/approve, invite, remove,
//! leave), host moderation (mute, kick, chat mute, message deletion), the room's ordered
//! message stream with history, the host's grace period, and PK links between two rooms.
//!
//! Everything is decided here under the room's lock and announced as [`RoomEvent`]s; the
//! signaling driver and the REST API only translate. Timeouts are deadlines checked by
//! [`Registry::tick`], so the logic stays free of timers.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::{
    Lifecycle, MAX_PK_INVITES, Member, MessageBody, Outcome, Registry, Room, RoomError, RoomEvent,
    RoomMessage, Sender, ServerMessage, State, track_info,
};
use crate::auth::Role;
use crate::signaling::protocol::Kind;
use crate::webhooks::{Event, SeatLeft, SeatTaken};

/// Why a role changes, for the webhook it makes.
#[derive(Debug, Clone, Copy)]
enum Seat {
    Taken(SeatTaken),
    Left(SeatLeft),
}

/// Who asks: a member of the room, or an operator (admin token, possibly not a member).
#[derive(Debug, Clone, Copy)]
pub struct Actor<'a> {
    pub pid: Option<&'a str>,
    pub admin: bool,
}

impl<'a> Actor<'a> {
    pub fn member(pid: &'a str, role: Role) -> Self {
        Self {
            pid: Some(pid),
            admin: role == Role::Admin,
        }
    }

    pub fn operator() -> Self {
        Self {
            pid: None,
            admin: true,
        }
    }
}

/// Who the bridge shows, in order, and whether a PK is on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stage {
    /// This room's host(s), then the PK partner's host, then co-hosts in join order.
    pub order: Vec<String>,
    /// How many of `order`'s first entries are this room's hosts.
    pub hosts: usize,
    pub pk: bool,
    /// The host dropped out and may come back (the grace period runs): the bridge shows the
    /// host-away slate where the host's picture was. The part of the grace period left, 0-1.
    pub host_away: Option<f32>,
}

const MAX_GIFT_CHARS: usize = 64;

/// `member_count` goes out at most this often (and only when the counts changed).
const COUNTS_EVERY: Duration = Duration::from_secs(1);

/// Likes added up since the last tick: how many, and who (`Some(None)`: several members).
#[derive(Default)]
pub(super) struct PendingLikes {
    count: u32,
    from: Option<Option<Sender>>,
}

/// A PK invitation a room received.
pub(super) struct PkInvitation {
    /// The inviting room (this very room: a later room of the same name is another one).
    pub(super) from: Weak<Room>,
    pub(super) deadline: Instant,
    /// The inviting host left: kept until its deadline so that answering it gets `withdrawn`.
    pub(super) withdrawn: bool,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Room {
    fn member<'a>(st: &'a State, pid: &str) -> Option<&'a Member> {
        let seq = st.index.get(pid)?;
        st.members.get(seq).map(|(_, m)| m)
    }

    pub(super) fn seats_taken(st: &State) -> usize {
        st.members
            .values()
            .filter(|(_, m)| m.role == Role::Cohost)
            .count()
    }

    fn sender(st: &State, pid: &str) -> Option<Sender> {
        Self::member(st, pid).map(|m| Sender {
            participant_id: pid.to_string(),
            identity: m.identity.clone(),
        })
    }

    fn check_host(st: &State, actor: Actor<'_>) -> Result<(), RoomError> {
        if actor.admin {
            return Ok(());
        }
        match actor.pid.and_then(|p| Self::member(st, p)) {
            Some(m) if m.role == Role::Host => Ok(()),
            Some(_) => Err(RoomError::NotHost),
            None => Err(RoomError::NotMember),
        }
    }

    fn send_to(st: &State, pid: &str, ev: RoomEvent) {
        if let Some(m) = Self::member(st, pid) {
            m.tx.send(ev, pid);
        }
    }

    fn to_hosts(st: &State, msg: &ServerMessage) {
        for (id, m) in st.members.values() {
            if m.role == Role::Host {
                m.tx.send(RoomEvent::Notify(msg.clone()), id);
            }
        }
    }

    /// To every member, in order with each one's other events, serialized once.
    fn to_all(st: &State, msg: &ServerMessage) {
        let text: Arc<str> = msg.to_json().into();
        for (id, m) in st.members.values() {
            m.tx.send(RoomEvent::Text(text.clone()), id);
        }
    }

    /// To every member through the room's feed: serialized and sent once (a room may have
    /// thousands of members; their writers read it themselves). For the room's message stream
    /// and counts, whose order with other events does not matter. Nobody following is fine.
    fn to_feed(st: &State, msg: &ServerMessage) {
        st.feed.send(bytes::Bytes::from(msg.to_json()));
    }

    /// Append a message to the room's stream and deliver it to everyone.
    pub(super) fn post(
        &self,
        st: &mut State,
        from: Option<Sender>,
        body: MessageBody,
    ) -> RoomMessage {
        st.next_message_id += 1;
        let message = RoomMessage {
            id: st.next_message_id,
            ts_ms: unix_ms(),
            from,
            body,
        };
        st.messages.push_back(message.clone());
        while st.messages.len() > self.cfg.message_history {
            st.messages.pop_front();
        }
        Self::to_feed(
            st,
            &ServerMessage::Message {
                message: message.clone(),
            },
        );
        self.messages_tx.send_replace(message.id);
        message
    }

    fn notice(&self, st: &mut State, text: String) {
        self.post(st, None, MessageBody::Notice { text });
    }

    /// Change a member's role and tell everyone; a co-host losing the seat loses its tracks.
    fn set_role(&self, st: &mut State, pid: &str, role: Role, why: Seat) {
        let Some(m) = Self::find(st, pid) else {
            return;
        };
        let was = m.role;
        m.role = role;
        let event = match why {
            Seat::Taken(how) => Event::CohostSeatTaken {
                participant_id: pid.to_string(),
                identity: m.identity.clone(),
                how,
            },
            Seat::Left(reason) => Event::CohostSeatLeft {
                participant_id: pid.to_string(),
                identity: m.identity.clone(),
                reason,
            },
        };
        self.hook(event);
        // Taking a seat makes an audience member a real-time participant (seats are few, so
        // this never passes `room.max_participants` by much).
        let promoted = role.may_publish() && !was.may_publish();
        let newly_media = promoted && !m.media;
        if promoted {
            m.media = true;
        }
        let identity = m.identity.clone();
        let tracks = if was.may_publish() && !role.may_publish() {
            m.publishing = false;
            std::mem::take(&mut m.tracks)
        } else {
            vec![]
        };
        let track_ids = self.end_tracks(st, pid, &tracks);
        if !track_ids.is_empty() {
            Self::broadcast(
                st,
                pid,
                &RoomEvent::TracksUnpublished {
                    track_ids,
                    participant_id: pid.to_string(),
                },
            );
        }
        if was.may_publish() && !role.may_publish() {
            Self::send_to(st, pid, RoomEvent::Demoted);
        }
        if newly_media && let Some((id, m)) = st.index.get(pid).and_then(|seq| st.members.get(seq))
        {
            // The audience only knew of it as one of many: now it is on stage.
            let info = Self::info_of(st, id, m);
            for (other, o) in st.members.values() {
                if other != pid && !o.media {
                    o.tx.send(RoomEvent::Joined(info.clone()), other);
                }
            }
        }
        if promoted {
            Self::send_to(st, pid, RoomEvent::Promoted);
        }
        Self::to_all(
            st,
            &ServerMessage::RoleChanged {
                participant_id: pid.to_string(),
                identity: identity.clone(),
                role,
            },
        );
        let text = match role {
            Role::Cohost => format!("{identity} took a co-host seat"),
            _ => format!("{identity} left the co-host seat"),
        };
        self.notice(st, text);
    }

    fn check_seat(&self, st: &State) -> Result<(), RoomError> {
        if Self::seats_taken(st) >= self.cfg.cohost_seats {
            return Err(RoomError::SeatsFull(self.cfg.cohost_seats));
        }
        Ok(())
    }

    fn end_request(st: &mut State, pid: &str, outcome: Outcome) {
        if st.requests.remove(pid).is_some() {
            let msg = ServerMessage::CohostRequestEnded {
                participant_id: pid.to_string(),
                outcome,
            };
            Self::to_hosts(st, &msg);
            Self::send_to(st, pid, RoomEvent::Notify(msg));
        }
    }

    fn end_invite(st: &mut State, pid: &str, outcome: Outcome) {
        if st.invites.remove(pid).is_some() {
            let msg = ServerMessage::CohostInviteEnded {
                participant_id: pid.to_string(),
                outcome,
            };
            Self::to_hosts(st, &msg);
            Self::send_to(st, pid, RoomEvent::Notify(msg));
        }
    }

    /// An audience member asks for a seat.
    pub fn request_cohost(&self, pid: &str) -> Result<(), RoomError> {
        let mut st = self.lock();
        let m = Self::member(&st, pid).ok_or(RoomError::NotMember)?;
        if m.role != Role::Audience {
            return Err(RoomError::WrongRole("only audience members ask for a seat"));
        }
        if st.requests.contains_key(pid) {
            return Err(RoomError::AlreadyPending("a request is"));
        }
        if !st.members.values().any(|(_, m)| m.role == Role::Host) {
            return Err(RoomError::NoHost);
        }
        let identity = m.identity.clone();
        st.requests
            .insert(pid.to_string(), Instant::now() + self.cfg.request_timeout);
        Self::to_hosts(
            &st,
            &ServerMessage::CohostRequest {
                participant_id: pid.to_string(),
                identity,
            },
        );
        Ok(())
    }

    pub fn cancel_cohost_request(&self, pid: &str) -> Result<(), RoomError> {
        let mut st = self.lock();
        if !st.requests.contains_key(pid) {
            return Err(RoomError::NotFound("pending request"));
        }
        Self::end_request(&mut st, pid, Outcome::Cancelled);
        Ok(())
    }

    /// The host approves (promoting the requester in place) or denies a request. Approval
    /// with every seat taken fails and leaves the request pending.
    pub fn answer_cohost_request(
        &self,
        actor: Actor<'_>,
        pid: &str,
        approve: bool,
    ) -> Result<(), RoomError> {
        let mut st = self.lock();
        Self::check_host(&st, actor)?;
        if !st.requests.contains_key(pid) {
            return Err(RoomError::NotFound("pending request"));
        }
        if approve {
            // The answer first, then the role change (clients see them in that order).
            self.check_seat(&st)?;
            Self::end_request(&mut st, pid, Outcome::Approved);
            self.set_role(&mut st, pid, Role::Cohost, Seat::Taken(SeatTaken::Approved));
        } else {
            Self::end_request(&mut st, pid, Outcome::Denied);
        }
        Ok(())
    }

    pub fn invite_cohost(&self, actor: Actor<'_>, pid: &str) -> Result<(), RoomError> {
        let mut st = self.lock();
        Self::check_host(&st, actor)?;
        let m = Self::member(&st, pid).ok_or(RoomError::UnknownParticipant(""))?;
        if m.role != Role::Audience {
            return Err(RoomError::WrongRole("only audience members can be invited"));
        }
        if st.invites.contains_key(pid) {
            return Err(RoomError::AlreadyPending("an invitation is"));
        }
        let from = actor
            .pid
            .and_then(|a| Self::sender(&st, a))
            .unwrap_or(Sender {
                participant_id: String::new(),
                identity: "operator".into(),
            });
        st.invites
            .insert(pid.to_string(), Instant::now() + self.cfg.request_timeout);
        Self::send_to(
            &st,
            pid,
            RoomEvent::Notify(ServerMessage::CohostInvite { from }),
        );
        Ok(())
    }

    pub fn answer_cohost_invite(&self, pid: &str, accept: bool) -> Result<(), RoomError> {
        let mut st = self.lock();
        if !st.invites.contains_key(pid) {
            return Err(RoomError::NotFound("invitation"));
        }
        if accept {
            self.check_seat(&st)?;
            Self::end_invite(&mut st, pid, Outcome::Approved);
            self.set_role(&mut st, pid, Role::Cohost, Seat::Taken(SeatTaken::Invited));
        } else {
            Self::end_invite(&mut st, pid, Outcome::Denied);
        }
        Ok(())
    }

    /// The host takes a seat away, or a co-host gives it back (`actor` is the co-host).
    pub fn remove_cohost(&self, actor: Actor<'_>, pid: &str) -> Result<(), RoomError> {
        let mut st = self.lock();
        if actor.pid != Some(pid) {
            Self::check_host(&st, actor)?;
        }
        let m = Self::member(&st, pid).ok_or(RoomError::UnknownParticipant(""))?;
        if m.role != Role::Cohost {
            return Err(RoomError::WrongRole("not a co-host"));
        }
        let why = if actor.pid == Some(pid) {
            SeatLeft::Returned
        } else {
            SeatLeft::Removed
        };
        self.set_role(&mut st, pid, Role::Audience, Seat::Left(why));
        Ok(())
    }

    pub fn mute_track(
        &self,
        actor: Actor<'_>,
        pid: &str,
        kind: Kind,
        muted: bool,
    ) -> Result<(), RoomError> {
        let mut st = self.lock();
        Self::check_host(&st, actor)?;
        let m = Self::member(&st, pid).ok_or(RoomError::UnknownParticipant(""))?;
        let identity = m.identity.clone();
        let routers: Vec<_> = m
            .tracks
            .iter()
            .filter_map(|t| st.tracks.get(t))
            .filter(|r| r.kind == kind)
            .cloned()
            .collect();
        if routers.is_empty() {
            return Err(RoomError::NotFound("track of that kind"));
        }
        for r in routers {
            r.set_muted(muted);
            Self::to_all(
                &st,
                &ServerMessage::TrackMuted {
                    track_id: r.id.clone(),
                    participant_id: pid.to_string(),
                    kind,
                    muted,
                },
            );
        }
        let what = match kind {
            Kind::Audio => "microphone",
            Kind::Video => "camera",
        };
        let verb = if muted { "turned off" } else { "turned on" };
        self.notice(&mut st, format!("the host {verb} {identity}'s {what}"));
        Ok(())
    }

    /// Tell everyone that a published track stopped delivering media while its connection is
    /// up (`stalled`), or that it resumed.
    pub fn track_stalled(&self, track: &crate::sfu::TrackRouter, stalled: bool) {
        let st = self.lock();
        Self::to_all(
            &st,
            &ServerMessage::TrackStalled {
                track_id: track.id.clone(),
                participant_id: track.participant_id.clone(),
                kind: track.kind,
                stalled,
            },
        );
    }

    /// Tell a member it is removed; its connection leaves the room with reason `kicked`.
    pub fn kick(&self, actor: Actor<'_>, pid: &str) -> Result<(), RoomError> {
        let mut st = self.lock();
        Self::check_host(&st, actor)?;
        if actor.pid == Some(pid) {
            return Err(RoomError::WrongRole("the host cannot kick themselves"));
        }
        let identity = Self::member(&st, pid)
            .ok_or(RoomError::UnknownParticipant(""))?
            .identity
            .clone();
        Self::send_to(
            &st,
            pid,
            RoomEvent::Removed(crate::signaling::protocol::LeaveReason::Kicked),
        );
        self.notice(&mut st, format!("{identity} was removed by the host"));
        Ok(())
    }

    /// A chat line, likes or a gift from a member.
    /// A chat line, like or gift from member `pid`. Likes are added up and posted by
    /// [`Room::tick`] (a like storm in a room of thousands is one message per tick, not one per
    /// tap per member).
    pub fn say(&self, pid: &str, body: MessageBody) -> Result<(), RoomError> {
        let mut st = self.lock();
        let max_chars = self.cfg.max_chat_chars;
        match &body {
            MessageBody::Chat { text } if text.chars().count() > max_chars => {
                return Err(RoomError::TooLong(max_chars));
            }
            MessageBody::Gift { gift, .. } if gift.chars().count() > MAX_GIFT_CHARS => {
                return Err(RoomError::TooLong(MAX_GIFT_CHARS));
            }
            _ => {}
        }
        let per_sec = self.cfg.messages_per_sec;
        let now = Instant::now();
        let m = Self::find(&mut st, pid).ok_or(RoomError::NotMember)?;
        if m.chat_muted && matches!(body, MessageBody::Chat { .. }) {
            return Err(RoomError::ChatMuted);
        }
        while m
            .sent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
        {
            m.sent.pop_front();
        }
        if m.sent.len() >= per_sec as usize {
            return Err(RoomError::RateLimited(per_sec));
        }
        m.sent.push_back(now);
        let from = Sender {
            participant_id: pid.to_string(),
            identity: m.identity.clone(),
        };
        if let MessageBody::Like { count } = body {
            let likes = &mut st.likes;
            likes.count = likes.count.saturating_add(count);
            likes.from = match likes.from.take() {
                // One liker so far, or several (then the message names nobody).
                None if likes.count == count => Some(Some(from)),
                Some(Some(f)) if f.participant_id == pid => Some(Some(f)),
                _ => Some(None),
            };
            return Ok(());
        }
        self.post(&mut st, Some(from), body);
        Ok(())
    }

    /// Post the likes added up since the last tick (one message), and the member counts when
    /// they changed (at most once a second).
    fn flush(&self, st: &mut State, now: Instant) {
        if st.likes.count > 0 {
            let likes = std::mem::take(&mut st.likes);
            self.post(
                st,
                likes.from.flatten(),
                MessageBody::Like { count: likes.count },
            );
        }
        let counts = Self::counts_of(st);
        let due = st
            .counts_at
            .is_none_or(|t| now.saturating_duration_since(t) >= COUNTS_EVERY);
        if due && st.counts_sent != Some(counts) && !st.members.is_empty() {
            st.counts_sent = Some(counts);
            st.counts_at = Some(now);
            Self::to_feed(st, &ServerMessage::MemberCount { counts });
        }
    }

    pub fn delete_message(&self, actor: Actor<'_>, id: u64) -> Result<(), RoomError> {
        let mut st = self.lock();
        Self::check_host(&st, actor)?;
        let before = st.messages.len();
        st.messages.retain(|m| m.id != id);
        if st.messages.len() == before {
            return Err(RoomError::NotFound("message"));
        }
        Self::to_feed(&st, &ServerMessage::MessageDeleted { message_id: id });
        Ok(())
    }

    pub fn mute_chat(&self, actor: Actor<'_>, pid: &str, muted: bool) -> Result<(), RoomError> {
        let mut st = self.lock();
        Self::check_host(&st, actor)?;
        let m = Self::find(&mut st, pid).ok_or(RoomError::UnknownParticipant(""))?;
        m.chat_muted = muted;
        let identity = m.identity.clone();
        let verb = if muted { "muted" } else { "unmuted" };
        self.notice(&mut st, format!("the host {verb} {identity}'s chat"));
        Ok(())
    }

    /// Messages after `since`, oldest first (the viewer feed and late joiners).
    pub fn messages_since(&self, since: u64) -> Vec<RoomMessage> {
        self.lock()
            .messages
            .iter()
            .filter(|m| m.id > since)
            .cloned()
            .collect()
    }

    /// Changes whenever a message is posted (long-polling viewers wait on it).
    pub fn message_watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.messages_tx.subscribe()
    }

    /// Tell every member `msg`, in order with their other events (e.g. the recording state,
    /// decided outside the room).
    pub fn tell_all(&self, msg: &ServerMessage) {
        Self::to_all(&self.lock(), msg);
    }

    pub fn pk_partner(&self) -> Option<String> {
        self.lock().pk.as_ref().map(|p| p.name.clone())
    }

    /// Who the bridge shows, in order.
    pub fn stage(&self) -> Stage {
        let st = self.lock();
        let mut order: Vec<String> = st
            .members
            .values()
            .filter(|(_, m)| m.role == Role::Host)
            .map(|(id, _)| id.clone())
            .collect();
        let hosts = order.len();
        for r in st.foreign.values() {
            if !order.contains(&r.participant_id) {
                order.push(r.participant_id.clone());
            }
        }
        order.extend(
            st.members
                .values()
                .filter(|(_, m)| m.role == Role::Cohost)
                .map(|(id, _)| id.clone()),
        );
        Stage {
            order,
            hosts,
            pk: st.pk.is_some(),
            host_away: st
                .host_grace_until
                .filter(|_| !Self::has_host(&st))
                .map(|until| {
                    let total = self.cfg.host_grace.as_secs_f32().max(0.001);
                    let left = until
                        .saturating_duration_since(Instant::now())
                        .as_secs_f32();
                    (left / total).clamp(0.0, 1.0)
                }),
        }
    }

    /// Bookkeeping after `pid` (with `role`) left: its requests end, and a host leaving with
    /// co-hosts seated, or a live room (a bridge streams it), starts the grace period.
    pub(super) fn after_leave(&self, st: &mut State, pid: &str, role: Role, identity: &str) {
        Self::end_request(st, pid, Outcome::Gone);
        Self::end_invite(st, pid, Outcome::Gone);
        let host_left =
            role == Role::Host && !st.members.values().any(|(_, m)| m.role == Role::Host);
        let grace = self.cfg.host_grace;
        let seated = Self::seats_taken(st) > 0;
        if host_left && (seated || st.live) && !grace.is_zero() {
            st.host_grace_until = Some(Instant::now() + grace);
            st.grace_host = Some(identity.to_string());
            let text = match (st.live, seated) {
                (true, true) => format!(
                    "the host is away; co-hosts keep their seats and the stream continues for {}s",
                    grace.as_secs()
                ),
                (true, false) => format!(
                    "the host is away; the stream continues for {}s",
                    grace.as_secs()
                ),
                _ => format!(
                    "the host left; co-hosts keep their seats for {}s",
                    grace.as_secs()
                ),
            };
            self.notice(st, text);
        }
    }

    /// Expire deadlines; returns whether the host's grace period just ended, and the rooms
    /// whose PK invitations to this one timed out (to be told, outside this room's lock).
    fn tick(&self, now: Instant) -> (bool, Vec<Weak<Room>>) {
        let mut st = self.lock();
        self.flush(&mut st, now);
        let expired = |m: &std::collections::BTreeMap<String, Instant>| -> Vec<String> {
            m.iter()
                .filter(|(_, d)| **d <= now)
                .map(|(k, _)| k.clone())
                .collect()
        };
        for pid in expired(&st.requests) {
            Self::end_request(&mut st, &pid, Outcome::TimedOut);
        }
        for pid in expired(&st.invites) {
            Self::end_invite(&mut st, &pid, Outcome::TimedOut);
        }
        let mut pk_expired = vec![];
        let expired_pk: Vec<String> = st
            .pk_invites
            .iter()
            .filter(|(_, i)| i.deadline <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for from in expired_pk {
            if let Some(inv) = st.pk_invites.remove(&from)
                && !inv.withdrawn
            {
                Self::to_hosts(
                    &st,
                    &ServerMessage::PkInviteEnded {
                        room: from,
                        outcome: Outcome::TimedOut,
                    },
                );
                pk_expired.push(inv.from);
            }
        }
        if st.host_grace_until.is_some_and(|d| d <= now) {
            st.host_grace_until = None;
            st.grace_host = None;
            let seated: Vec<String> = st
                .members
                .values()
                .filter(|(_, m)| m.role == Role::Cohost)
                .map(|(id, _)| id.clone())
                .collect();
            let text = if seated.is_empty() {
                "the host did not come back"
            } else {
                "the host did not come back; co-hosting ended"
            };
            for pid in seated {
                self.set_role(
                    &mut st,
                    &pid,
                    Role::Audience,
                    Seat::Left(SeatLeft::HostGone),
                );
            }
            self.notice(&mut st, text.into());
            return (true, pk_expired);
        }
        (false, pk_expired)
    }

    fn has_host(st: &State) -> bool {
        st.members.values().any(|(_, m)| m.role == Role::Host)
    }

    /// This room's PK invitation to `to` ended without a PK: forget it and tell the host(s).
    fn pk_sent_ended(&self, to: &str, outcome: Outcome) {
        let mut st = self.lock();
        if st.pk_sent.remove(to).is_some() {
            Self::to_hosts(
                &st,
                &ServerMessage::PkDeclined {
                    room: to.to_string(),
                    outcome,
                },
            );
        }
    }

    fn host_tracks(&self) -> Vec<Arc<crate::sfu::TrackRouter>> {
        let st = self.lock();
        st.members
            .values()
            .filter(|(_, m)| m.role == Role::Host)
            .flat_map(|(_, m)| m.tracks.iter().filter_map(|t| st.tracks.get(t)).cloned())
            .collect()
    }

    pub(super) fn add_foreign(&self, router: Arc<crate::sfu::TrackRouter>) {
        let mut st = self.lock();
        let info = track_info(&router);
        st.foreign.insert(router.id.clone(), router.clone());
        Self::broadcast(&st, "", &RoomEvent::TrackPublished(info, router));
    }

    /// The partner room's tracks `track_ids` are gone: one event per publisher for all of them
    /// (a member renegotiates once, as for a departure here).
    pub(super) fn remove_foreign(&self, track_ids: &[String]) {
        let mut st = self.lock();
        let mut gone: Vec<(String, Vec<String>)> = vec![];
        for id in track_ids {
            if let Some(r) = st.foreign.remove(id) {
                match gone.iter_mut().find(|(p, _)| *p == r.participant_id) {
                    Some((_, ids)) => ids.push(id.clone()),
                    None => gone.push((r.participant_id.clone(), vec![id.clone()])),
                }
            }
        }
        for (participant_id, track_ids) in gone {
            Self::broadcast(
                &st,
                "",
                &RoomEvent::TracksUnpublished {
                    track_ids,
                    participant_id,
                },
            );
        }
    }

    fn host_sender(&self) -> Option<Sender> {
        let st = self.lock();
        st.members
            .values()
            .find(|(_, m)| m.role == Role::Host)
            .map(|(id, m)| Sender {
                participant_id: id.clone(),
                identity: m.identity.clone(),
            })
    }
}

impl Registry {
    /// Expire requests, invitations and grace periods; a room whose host did not come back in
    /// time is announced as [`Lifecycle::HostGone`] (the bridge policy follows it).
    pub fn tick(&self, now: Instant) {
        for r in self.rooms() {
            let (host_gone, pk_expired) = r.tick(now);
            for inviter in pk_expired.iter().filter_map(Weak::upgrade) {
                inviter.pk_sent_ended(&r.name, Outcome::TimedOut);
            }
            if host_gone {
                self.announce(&r, Lifecycle::HostGone);
                // A live room kept open for its host ends now if nobody is left in it.
                self.remove_if_empty(&r);
            }
        }
    }

    /// Host of `room` invites the host of `other` to a PK. One invitation per pair of rooms
    /// is pending at a time; it ends when answered, after `room.request_timeout`, or when
    /// either host leaves (see [`Registry::pk_withdraw`]).
    pub fn pk_invite(
        &self,
        room: &Arc<Room>,
        actor: Actor<'_>,
        other: &str,
    ) -> Result<(), RoomError> {
        let from = {
            let st = room.lock();
            Room::check_host(&st, actor)?;
            if st.pk.is_some() {
                return Err(RoomError::AlreadyPending("a PK is"));
            }
            if other == room.name {
                return Err(RoomError::Invalid("a room cannot PK with itself"));
            }
            if st.pk_sent.contains_key(other) {
                return Err(RoomError::AlreadyPending("a PK invitation to that room is"));
            }
            // One invitation per pair of rooms: answer theirs instead.
            if st.pk_invites.get(other).is_some_and(|i| !i.withdrawn) {
                return Err(RoomError::AlreadyPending(
                    "a PK invitation from that room is (answer it with pk_answer)",
                ));
            }
            if st.pk_sent.len() >= MAX_PK_INVITES {
                return Err(RoomError::AlreadyPending(
                    "the most PK invitations a room may send at once are",
                ));
            }
            actor
                .pid
                .and_then(|p| Room::sender(&st, p))
                .ok_or(RoomError::NotHost)?
        };
        let target = self.get(other).ok_or(RoomError::NotFound("room"))?;
        {
            let mut st = target.lock();
            if st.pk.is_some() {
                return Err(RoomError::AlreadyPending("a PK of that room is"));
            }
            if !Room::has_host(&st) {
                return Err(RoomError::NoHost);
            }
            // The invited room may have invited this one meanwhile; a withdrawn invitation
            // (its host left) is replaced by this one.
            match st.pk_invites.get(&room.name) {
                Some(i) if !i.withdrawn => {
                    return Err(RoomError::AlreadyPending("a PK invitation to that room is"));
                }
                Some(_) => {}
                None if st.pk_invites.len() >= MAX_PK_INVITES => {
                    return Err(RoomError::AlreadyPending(
                        "the most PK invitations a room may receive at once are",
                    ));
                }
                None => {}
            }
            st.pk_invites.insert(
                room.name.clone(),
                PkInvitation {
                    from: Arc::downgrade(room),
                    deadline: Instant::now() + room.cfg.request_timeout,
                    withdrawn: false,
                },
            );
            Room::to_hosts(
                &st,
                &ServerMessage::PkInvite {
                    room: room.name.clone(),
                    from,
                },
            );
        }
        room.lock()
            .pk_sent
            .insert(other.to_string(), Arc::downgrade(&target));
        Ok(())
    }

    /// Host of `room` accepts or declines the PK invitation from `from`.
    pub fn pk_answer(
        &self,
        room: &Arc<Room>,
        actor: Actor<'_>,
        from: &str,
        accept: bool,
    ) -> Result<(), RoomError> {
        let withdrawn = || {
            RoomError::Withdrawn(format!(
                "the host of room {from} who invited you left; the invitation was withdrawn"
            ))
        };
        // One room's lock at a time (two hosts may answer each other's invitations at once).
        let from_room = {
            let mut st = room.lock();
            Room::check_host(&st, actor)?;
            let inv = st
                .pk_invites
                .get(from)
                .ok_or(RoomError::NotFound("PK invitation"))?;
            if inv.withdrawn {
                st.pk_invites.remove(from);
                return Err(withdrawn());
            }
            inv.from.clone()
        };
        let inviter = from_room.upgrade().filter(|r| {
            let theirs = r.lock();
            !theirs.closed && Room::has_host(&theirs)
        });
        {
            let mut st = room.lock();
            // Still pending? (It may have been answered, expired or withdrawn meanwhile.)
            match st.pk_invites.get(from) {
                None => return Err(RoomError::NotFound("PK invitation")),
                Some(i) if i.withdrawn || inviter.is_none() => {
                    st.pk_invites.remove(from);
                    return Err(withdrawn());
                }
                Some(_) => {}
            }
            if accept && st.pk.is_some() {
                return Err(RoomError::AlreadyPending("a PK is"));
            }
            st.pk_invites.remove(from);
        }
        let Some(inviter) = inviter else {
            return Err(withdrawn());
        };
        if !accept {
            inviter.pk_sent_ended(&room.name, Outcome::Denied);
            return Ok(());
        }
        inviter.lock().pk_sent.remove(&room.name);
        if inviter.lock().pk.is_some() {
            return Err(RoomError::AlreadyPending("a PK of the inviting room is"));
        }
        Self::pk_link(&inviter, room);
        // The inviting host may have left while the rooms were being linked: then the link
        // ends at once rather than showing a room without its host.
        let gone = {
            let st = inviter.lock();
            st.closed || !Room::has_host(&st)
        };
        if gone {
            Self::pk_unlink(room);
        }
        Ok(())
    }

    /// The host of `room` is gone: withdraw the PK invitations it sent (the invited hosts get
    /// `pk_invite_ended` `gone`; answering one gets `withdrawn`) and drop the ones it received
    /// (the inviting hosts get `pk_declined` `gone`).
    pub(super) fn pk_withdraw(room: &Arc<Room>) {
        let (sent, received) = {
            let mut st = room.lock();
            let sent = std::mem::take(&mut st.pk_sent);
            let received = std::mem::take(&mut st.pk_invites);
            (sent, received)
        };
        for to in sent.values().filter_map(Weak::upgrade) {
            let mut st = to.lock();
            if let Some(inv) = st.pk_invites.get_mut(&room.name)
                && !inv.withdrawn
                && std::ptr::eq(inv.from.as_ptr(), Arc::as_ptr(room))
            {
                // Kept (until its deadline) so that a late answer gets a clear `withdrawn`.
                inv.withdrawn = true;
                Room::to_hosts(
                    &st,
                    &ServerMessage::PkInviteEnded {
                        room: room.name.clone(),
                        outcome: Outcome::Gone,
                    },
                );
            }
        }
        for inv in received.into_values().filter(|i| !i.withdrawn) {
            if let Some(from) = inv.from.upgrade() {
                from.pk_sent_ended(&room.name, Outcome::Gone);
            }
        }
    }

    pub fn pk_end(&self, room: &Arc<Room>, actor: Actor<'_>) -> Result<(), RoomError> {
        {
            let st = room.lock();
            Room::check_host(&st, actor)?;
            if st.pk.is_none() {
                return Err(RoomError::NotFound("PK"));
            }
        }
        Self::pk_unlink(room);
        Ok(())
    }

    /// Link two rooms: each shows the other's host tracks and is told who the partner is.
    fn pk_link(a: &Arc<Room>, b: &Arc<Room>) {
        a.lock().pk = Some(b.clone());
        b.lock().pk = Some(a.clone());
        // Clients learn about the PK first, then get the partner's tracks.
        for (here, there) in [(a, b), (b, a)] {
            if let Some(host) = there.host_sender() {
                let mut st = here.lock();
                here.hook(Event::PkStarted {
                    partner_room: there.name.clone(),
                    partner_host: host.identity.clone(),
                });
                Room::to_all(
                    &st,
                    &ServerMessage::PkStarted {
                        room: there.name.clone(),
                        host: host.clone(),
                    },
                );
                here.notice(
                    &mut st,
                    format!("PK with {} of room {} started", host.identity, there.name),
                );
            }
        }
        for (here, there) in [(a, b), (b, a)] {
            for t in there.host_tracks() {
                here.add_foreign(t);
            }
        }
    }

    /// End the PK of `room` (if any) on both sides.
    pub(super) fn pk_unlink(room: &Arc<Room>) {
        let Some(partner) = room.lock().pk.take() else {
            return;
        };
        partner.lock().pk = None;
        for (here, there) in [(room, &partner), (&partner, room)] {
            let ids: Vec<String> = here.lock().foreign.keys().cloned().collect();
            here.remove_foreign(&ids);
            let mut st = here.lock();
            here.hook(Event::PkEnded {
                partner_room: there.name.clone(),
            });
            Room::to_all(
                &st,
                &ServerMessage::PkEnded {
                    room: there.name.clone(),
                },
            );
            here.notice(&mut st, format!("PK with room {} ended", there.name));
        }
    }
}
