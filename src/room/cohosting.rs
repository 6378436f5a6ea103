//! The co-host workflow on top of room membership: seats (request/approve, invite, remove,
//! leave), host moderation (mute, kick, chat mute, message deletion), the room's ordered
//! message stream with history, the host's grace period, and PK links between two rooms.
//!
//! Everything is decided here under the room's lock and announced as [`RoomEvent`]s; the
//! signaling driver and the REST API only translate. Timeouts are deadlines checked by
//! [`Registry::tick`], so the logic stays free of timers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{
    Lifecycle, Member, MessageBody, Outcome, Registry, Room, RoomError, RoomEvent, RoomMessage,
    Sender, ServerMessage, State, track_info,
};
use crate::auth::Role;
use crate::signaling::protocol::Kind;

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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stage {
    /// This room's host(s), then the PK partner's host, then co-hosts in join order.
    pub order: Vec<String>,
    pub pk: bool,
}

const MAX_GIFT_CHARS: usize = 64;

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Room {
    fn member<'a>(st: &'a State, pid: &str) -> Option<&'a Member> {
        st.members
            .values()
            .find(|(id, _)| id == pid)
            .map(|(_, m)| m)
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

    fn to_all(st: &State, msg: &ServerMessage) {
        for (id, m) in st.members.values() {
            m.tx.send(RoomEvent::Notify(msg.clone()), id);
        }
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
        Self::to_all(
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
    fn set_role(&self, st: &mut State, pid: &str, role: Role) {
        let Some(m) = Self::find(st, pid) else {
            return;
        };
        let was = m.role;
        m.role = role;
        let identity = m.identity.clone();
        let tracks = if was.may_publish() && !role.may_publish() {
            m.publishing = false;
            std::mem::take(&mut m.tracks)
        } else {
            vec![]
        };
        for t in tracks {
            if let Some(r) = st.tracks.remove(&t) {
                r.close();
                Self::broadcast(
                    st,
                    pid,
                    &RoomEvent::TrackUnpublished {
                        track_id: t,
                        participant_id: pid.to_string(),
                    },
                );
            }
        }
        if was.may_publish() && !role.may_publish() {
            Self::send_to(st, pid, RoomEvent::Demoted);
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
            self.set_role(&mut st, pid, Role::Cohost);
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
            self.set_role(&mut st, pid, Role::Cohost);
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
        self.set_role(&mut st, pid, Role::Audience);
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
    pub fn say(&self, pid: &str, body: MessageBody) -> Result<RoomMessage, RoomError> {
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
        Ok(self.post(&mut st, Some(from), body))
    }

    pub fn delete_message(&self, actor: Actor<'_>, id: u64) -> Result<(), RoomError> {
        let mut st = self.lock();
        Self::check_host(&st, actor)?;
        let before = st.messages.len();
        st.messages.retain(|m| m.id != id);
        if st.messages.len() == before {
            return Err(RoomError::NotFound("message"));
        }
        Self::to_all(&st, &ServerMessage::MessageDeleted { message_id: id });
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
            pk: st.pk.is_some(),
        }
    }

    /// Bookkeeping after `pid` (with `role`) left: its requests end, and a host leaving with
    /// co-hosts seated starts the grace period.
    pub(super) fn after_leave(&self, st: &mut State, pid: &str, role: Role, identity: &str) {
        Self::end_request(st, pid, Outcome::Gone);
        Self::end_invite(st, pid, Outcome::Gone);
        let host_left =
            role == Role::Host && !st.members.values().any(|(_, m)| m.role == Role::Host);
        if host_left && Self::seats_taken(st) > 0 {
            let grace = self.cfg.host_grace;
            st.host_grace_until = Some(Instant::now() + grace);
            st.grace_host = Some(identity.to_string());
            self.notice(
                st,
                format!(
                    "the host left; co-hosts keep their seats for {}s",
                    grace.as_secs()
                ),
            );
        }
    }

    /// Expire deadlines; returns true when the host's grace period just ended.
    fn tick(&self, now: Instant) -> bool {
        let mut st = self.lock();
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
        for from in expired(&st.pk_invites) {
            st.pk_invites.remove(&from);
            Self::to_hosts(&st, &ServerMessage::PkDeclined { room: from });
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
            for pid in seated {
                self.set_role(&mut st, &pid, Role::Audience);
            }
            self.notice(
                &mut st,
                "the host did not come back; co-hosting ended".into(),
            );
            return true;
        }
        false
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

    pub(super) fn remove_foreign(&self, track_id: &str) {
        let mut st = self.lock();
        if let Some(r) = st.foreign.remove(track_id) {
            Self::broadcast(
                &st,
                "",
                &RoomEvent::TrackUnpublished {
                    track_id: track_id.to_string(),
                    participant_id: r.participant_id.clone(),
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
            if r.tick(now) {
                self.announce(&r, Lifecycle::HostGone);
            }
        }
    }

    /// Host of `room` invites the host of `other` to a PK.
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
            actor
                .pid
                .and_then(|p| Room::sender(&st, p))
                .ok_or(RoomError::NotHost)?
        };
        if other == room.name {
            return Err(RoomError::NotFound("other room"));
        }
        let target = self.get(other).ok_or(RoomError::NotFound("room"))?;
        let mut st = target.lock();
        if st.pk.is_some() {
            return Err(RoomError::AlreadyPending("a PK of that room is"));
        }
        if !st.members.values().any(|(_, m)| m.role == Role::Host) {
            return Err(RoomError::NoHost);
        }
        st.pk_invites
            .insert(room.name.clone(), Instant::now() + room.cfg.request_timeout);
        Room::to_hosts(
            &st,
            &ServerMessage::PkInvite {
                room: room.name.clone(),
                from,
            },
        );
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
        {
            let mut st = room.lock();
            Room::check_host(&st, actor)?;
            if st.pk_invites.remove(from).is_none() {
                return Err(RoomError::NotFound("PK invitation"));
            }
        }
        let inviter = self.get(from).ok_or(RoomError::NotFound("room"))?;
        if !accept {
            Room::to_hosts(
                &inviter.lock(),
                &ServerMessage::PkDeclined {
                    room: room.name.clone(),
                },
            );
            return Ok(());
        }
        if inviter.lock().pk.is_some() || room.lock().pk.is_some() {
            return Err(RoomError::AlreadyPending("a PK is"));
        }
        Self::pk_link(&inviter, room);
        Ok(())
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
            for id in ids {
                here.remove_foreign(&id);
            }
            let mut st = here.lock();
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
