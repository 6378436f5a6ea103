//! The connection driver: one task per signaling connection that runs the session state
//! machine and carries out what it dispatches against the room, the SFU and the two peer
//! connections of the participant (publisher: client offers; subscriber: server offers).
//! It is the only place where signaling, rooms and media meet.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::auth::{Authenticator, Claims, Role};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::peer::{
    IceCandidate, LocalTrack, MediaKind, Peer, PeerError, PeerEvent, PeerFactory, PeerState,
    RemoteTrack,
};
use stats::{PublishedTrack, STATS_INTERVAL, StatsRefresher};

use crate::room::{Actor, EventRx, Registry, Room, RoomError, RoomEvent, new_track_id};
use crate::sfu::{LayerControl, LayerRequest, TrackRouter};
use crate::signaling::protocol::{
    Candidate, ClientMessage, ErrorCode, JoinResult, Kind, LeaveReason, Limits, MessageBody,
    PROTOCOL_VERSION, RequestId, ResponseResult, ServerMessage, Target, close_code,
};
use crate::signaling::session::{Action, MAX_TICK, Session};

pub mod rtmp;

mod downlink;
mod media;
mod outbox;
mod resume;
pub mod stats;
mod subscribe;
pub mod whip;

pub(crate) use downlink::DownlinkGroup;
pub(crate) use media::{forward_tasks, publish_tasks};

pub use outbox::{Next, Outbox, OutboxRx, outbox};

/// Everything a connection needs from the server.
pub struct Services {
    pub cfg: Arc<Config>,
    pub auth: Authenticator,
    pub rooms: Arc<Registry>,
    pub peers: Arc<PeerFactory>,
    pub metrics: Arc<Metrics>,
    /// The embedded origin (HTTP-FLV, RTMP play).
    pub origin: Arc<crate::rtmp::origin::Origin>,
    /// Running bridges by room name.
    pub bridges: dashmap::DashMap<String, crate::bridge::control::BridgeHandle>,
    /// WHIP publishers and WHEP viewers by session id.
    pub whip: whip::Sessions,
    /// Participants a new connection may take over with `resume` (participant/resume.rs).
    pub resumable: resume::Resumable,
    /// Stream-key lifetime cap and per-room revocations (RTMP ingest verifies keys here).
    pub stream_keys: Arc<crate::auth::keys::StreamKeys>,
    /// Recordings of rooms' output (src/recording/).
    pub recordings: Arc<crate::recording::Recordings>,
    /// `webhooks.on_publish` / `on_play` callbacks, when configured.
    pub authorize: Option<Arc<crate::webhooks::auth::Authorizer>>,
    pub shutdown: watch::Receiver<bool>,
}

impl Services {
    /// The view of the server bridge control works on.
    /// `role` is the caller's: admins are trusted with any destination when
    /// `bridge.admin_destinations_trusted`; `None` is the server itself (auto start with the
    /// operator's `auto_destinations`), always trusted.
    pub fn bridge_ctl(&self, role: Option<Role>) -> crate::bridge::control::Bridges<'_> {
        let trusted = match role {
            None => true,
            Some(Role::Admin) => self.cfg.bridge.admin_destinations_trusted,
            Some(_) => false,
        };
        crate::bridge::control::Bridges {
            defaults: &self.cfg.bridge,
            rooms: &self.rooms,
            origin: &self.origin,
            running: &self.bridges,
            trusted,
        }
    }
}

/// What the WebSocket layer hands the driver.
#[derive(Debug)]
pub enum WsIn {
    /// A text frame within `signaling.max_message_bytes`.
    Text(String),
    /// A text frame over the limit: only its length and request id are kept, so the queue to
    /// the driver holds at most that many bytes per message.
    /// (Boxed: rare, and it would make every slot of the queue larger.)
    TooLarge(Box<(usize, Option<RequestId>)>),
    Binary(usize),
    /// Ping or pong frame: proof of life only.
    Activity,
    /// The client closed the WebSocket with a close frame: it means to go (no resume).
    Closed,
}

/// What the driver asks the WebSocket layer to do.
#[derive(Debug)]
pub enum WsOut {
    Text(String),
    /// A message of the room's feed (shared by every member, not copied).
    Shared(bytes::Bytes),
    /// From now on, also send what the room posts for everyone (after the join result).
    Follow(crate::room::Feed),
    Ping,
    Close(u16, String),
}

/// The largest width or height a `set_track_quality` may name (8K and then some).
const MAX_TILE_SIDE: u32 = 16_384;

/// Room events handled in one driver turn before the subscriber offer that covers them.
const DRAIN_MAX: usize = 256;

/// Work finished by helper tasks, reported back to the driver.
enum Internal {
    TrackEnded(String),
}

struct SubTrack {
    local: Arc<LocalTrack>,
    router: Arc<TrackRouter>,
    /// Chooses the simulcast layer this member gets (`set_track_quality`).
    control: LayerControl,
    tasks: Vec<JoinHandle<()>>,
}

/// A track a participant publishes: its router, the SSRC the publisher sends it with, and the
/// tasks reading it (WebSocket members and WHIP publishers alike).
pub(crate) struct Published {
    router: Arc<TrackRouter>,
    /// The first SSRC seen (of a simulcast track: one of its layers').
    ssrc: u32,
    tasks: Vec<JoinHandle<()>>,
}

impl Published {
    /// Did the publisher's new offer stop this track? Judged by the SSRCs the offer signals;
    /// a simulcast track's layers are usually not signalled by SSRC (browsers send rid
    /// simulcast without `a=ssrc` lines), so such a track is only ended with its connection.
    fn stopped_by(&self, sending: &std::collections::HashSet<u32>) -> bool {
        self.router.layers().is_empty() && !sending.contains(&self.ssrc)
    }
}

impl Published {
    fn stats_view<'a>(&'a self, id: &'a str) -> PublishedTrack<'a> {
        PublishedTrack {
            id,
            router: &self.router,
            ssrc: self.ssrc,
        }
    }
}

struct Joined {
    room: Arc<Room>,
    pid: String,
    claims: Claims,
    publisher: Option<Peer>,
    subscriber: Option<Peer>,
    sub_connected: bool,
    sub_tracks: HashMap<String, SubTrack>,
    /// Candidates the client trickled to the publisher and subscriber connection (each goes
    /// into the ICE agent's candidate list, which has no bound of its own).
    candidates: [usize; 2],
    /// Offer in flight: id and deadline for the answer.
    negotiating: Option<(u64, Instant)>,
    /// The subscriber track set changed since the last offer.
    dirty: bool,
    next_offer_id: u64,
    /// Tracks added since the last offer / waiting for the answer: they need a keyframe once
    /// the client can receive them.
    kf_unoffered: Vec<Arc<TrackRouter>>,
    kf_offered: Vec<Arc<TrackRouter>>,
    kf_ready: Vec<Arc<TrackRouter>>,
    published: HashMap<String, Published>,
    /// Subscribe to every track, now and later (hosts and co-hosts; anyone after
    /// `subscribe` with `all`). Audience members start without (see `subscribe`).
    auto_subscribe: bool,
    /// `pause_media`: the forwarding tasks drop this member's media meanwhile.
    paused: Arc<AtomicBool>,
    /// Joined with `resumable`: the secret of its current resume token.
    resume_secret: Option<String>,
    /// `restart_ice`: the next subscriber offer restarts ICE.
    ice_restart: bool,
    /// The simulcast tracks this member receives share its downlink by priority.
    downlink: downlink::DownlinkGroup,
}

/// The next item of a receiver that may be absent (absent: never).
async fn recv_opt_bounded<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

async fn recv_opt<T>(rx: &mut Option<mpsc::UnboundedReceiver<T>>) -> Option<T> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

pub(crate) fn to_kind(k: MediaKind) -> Kind {
    match k {
        MediaKind::Audio => Kind::Audio,
        MediaKind::Video => Kind::Video,
    }
}

pub(crate) fn to_media_kind(k: Kind) -> MediaKind {
    match k {
        Kind::Audio => MediaKind::Audio,
        Kind::Video => MediaKind::Video,
    }
}

fn cand_out(c: IceCandidate) -> Candidate {
    Candidate {
        candidate: c.candidate,
        sdp_mid: c.sdp_mid,
        sdp_mline_index: c.sdp_mline_index,
        username_fragment: c.username_fragment,
    }
}

fn cand_in(c: Candidate) -> IceCandidate {
    IceCandidate {
        candidate: c.candidate,
        sdp_mid: c.sdp_mid,
        sdp_mline_index: c.sdp_mline_index,
        username_fragment: c.username_fragment,
    }
}

/// Error code and, for a refused join, the close code.
/// The acting member's own id (these actions are always a member's own).
fn me<'a>(a: Actor<'a>) -> &'a str {
    a.pid.unwrap_or_default()
}

fn room_error(e: &RoomError) -> (ErrorCode, u16) {
    let close = match e {
        RoomError::Full(_) | RoomError::SeatsFull(_) => close_code::ROOM_FULL,
        RoomError::HostPresent(_) => close_code::HOST_PRESENT,
        _ => 0,
    };
    (e.code(), close)
}

pub struct Driver {
    svc: Arc<Services>,
    session: Session,
    /// Never awaited: a client that does not read fills it and is disconnected.
    out: Outbox,
    joined: Option<Joined>,
    // Kept outside `Joined` so the select loop can wait on all of them at once.
    room_rx: Option<EventRx>,
    pub_rx: Option<mpsc::UnboundedReceiver<PeerEvent>>,
    sub_rx: Option<mpsc::UnboundedReceiver<PeerEvent>>,
    /// Made with the first published track (its reader tasks report through it): most
    /// members (the audience) never publish, and an idle channel costs about 1 KiB.
    internal_tx: Option<mpsc::UnboundedSender<Internal>>,
    internal_rx: Option<mpsc::UnboundedReceiver<Internal>>,
    /// Set once the driver decided to end; the loop exits after flushing.
    ending: Option<LeaveReason>,
    /// Next refresh of connection statistics and track bitrates.
    stats_at: Instant,
    /// Track counters and connection statistics (shared with WHIP, participant/stats.rs).
    stats: StatsRefresher,
    /// The WebSocket's input; `None` once detached (participant/resume.rs).
    inbound: Option<mpsc::Receiver<WsIn>>,
    /// Takeover requests from `resume` on other connections (resumable participants only).
    takeover_rx: Option<mpsc::Receiver<resume::Takeover>>,
    takeover_tx: Option<mpsc::Sender<resume::Takeover>>,
    /// A takeover to carry out once the loop stopped.
    takeover: Option<resume::Takeover>,
    /// Detached (no WebSocket): the participant leaves at this time unless resumed.
    detached_until: Option<Instant>,
}

impl Driver {
    pub fn new(svc: Arc<Services>, url_room: Option<String>, out: Outbox) -> Self {
        let session = Session::new(
            svc.cfg.signaling.clone(),
            svc.auth.clone(),
            url_room,
            Instant::now(),
        );
        Self {
            svc,
            session,
            out,
            joined: None,
            room_rx: None,
            pub_rx: None,
            sub_rx: None,
            internal_tx: None,
            internal_rx: None,
            ending: None,
            stats_at: Instant::now() + STATS_INTERVAL,
            stats: StatsRefresher::default(),
            inbound: None,
            takeover_rx: None,
            takeover_tx: None,
            takeover: None,
            detached_until: None,
        }
    }

    async fn send(&self, msg: ServerMessage) {
        if let ServerMessage::Error { error, .. } = &msg {
            let m = &self.svc.metrics;
            m.signaling_errors.fetch_add(1, Ordering::Relaxed);
            if matches!(
                error.code,
                ErrorCode::InvalidToken
                    | ErrorCode::TokenExpired
                    | ErrorCode::WrongRoom
                    | ErrorCode::RoomFull
            ) {
                m.join_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Never waits (see `Outbox::push`); a full queue ends the connection as a slow reader.
        self.out.push(WsOut::Text(msg.to_json()));
    }

    /// Results are sent whether or not the request carried an id: a client that omits ids
    /// still needs its join result and SDP answers.
    async fn reply(&self, id: Option<RequestId>, result: ResponseResult) {
        self.send(ServerMessage::Response { id, result }).await;
    }

    async fn error(&self, id: Option<RequestId>, code: ErrorCode, msg: impl Into<String>) {
        let msg = msg.into();
        debug!(?code, "request error: {msg}");
        self.svc
            .metrics
            .signaling_errors
            .fetch_add(1, Ordering::Relaxed);
        self.send(ServerMessage::error(id, code, msg)).await;
    }

    /// Run until the connection ends. `inbound` closing means the WebSocket is gone.
    pub async fn run(mut self, inbound: mpsc::Receiver<WsIn>) {
        self.inbound = Some(inbound);
        let mut shutdown = self.svc.shutdown.clone();
        loop {
            if self.out.is_slow() && self.ending.is_none() {
                self.ending = Some(LeaveReason::SlowReader);
            }
            // A detached participant has a closed session and goes on until its grace ends.
            if self.ending.is_some()
                || self.takeover.is_some()
                || (self.session.is_closed() && !self.is_detached())
            {
                break;
            }
            let tick_at = self.next_deadline();
            tokio::select! {
                m = recv_opt_bounded(&mut self.inbound) => match m {
                    Some(WsIn::Text(t)) => {
                        let acts = self.session.on_text(Instant::now(), &t);
                        self.apply_boxed(acts).await;
                    }
                    Some(WsIn::TooLarge(big)) => {
                        let (n, id) = *big;
                        let acts = self.session.on_too_large(Instant::now(), n, id);
                        self.apply_boxed(acts).await;
                    }
                    Some(WsIn::Binary(n)) => {
                        let acts = self.session.on_binary(Instant::now(), n);
                        self.apply_boxed(acts).await;
                    }
                    Some(WsIn::Activity) => self.session.on_activity(Instant::now()),
                    Some(WsIn::Closed) => {
                        self.ending = Some(LeaveReason::Left);
                    }
                    // Gone without a close frame (a network change, a killed app).
                    None => self.connection_lost(LeaveReason::Left),
                },
                Some(t) = recv_opt_bounded(&mut self.takeover_rx) => self.on_takeover(t),
                // `None` here: the room cut this member off (see [`EventRx`]).
                ev = async {
                    match self.room_rx.as_mut() {
                        Some(r) => r.recv().await,
                        None => std::future::pending().await,
                    }
                } => match ev {
                    Some(ev) => {
                        Box::pin(self.room_event(ev)).await;
                        // What else is queued, in the same turn, then one subscriber offer for
                        // everything that changed together (a co-host leaving unpublishes its
                        // audio and video back to back; in a room of thousands, one wake-up
                        // per chat line would cost more than the lines).
                        Box::pin(self.drain_room_events()).await;
                        if self.ending.is_none() && !self.session.is_closed() {
                            Box::pin(self.maybe_offer()).await;
                        }
                    }
                    None => {
                        // The room cut us off: our event queue was full.
                        self.room_rx = None;
                        self.detached_until = None;
                        Box::pin(self.close_with(
                            close_code::SLOW_READER,
                            "too many room events not read",
                            LeaveReason::SlowReader,
                        ))
                        .await;
                    }
                },
                _ = self.out.stalled() => {
                    // The writer gave up: a socket write took longer than write_timeout.
                    warn!("websocket write timed out; disconnecting a slow reader");
                    self.ending = Some(LeaveReason::SlowReader);
                }
                ev = recv_opt(&mut self.pub_rx) => {
                    if let Some(ev) = ev { Box::pin(self.on_peer_event(Target::Publisher, ev)).await; }
                }
                ev = recv_opt(&mut self.sub_rx) => {
                    if let Some(ev) = ev { Box::pin(self.on_peer_event(Target::Subscriber, ev)).await; }
                }
                Some(ev) = recv_opt(&mut self.internal_rx) => Box::pin(self.on_internal(ev)).await,
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(tick_at)) => {
                    if self.is_detached() {
                        self.check_detached_expiry();
                    } else {
                        let acts = self.session.on_tick(Instant::now());
                        self.apply_boxed(acts).await;
                        Box::pin(self.check_answer_timeout()).await;
                    }
                    if Instant::now() >= self.stats_at {
                        Box::pin(self.refresh_stats()).await;
                    }
                }
                _ = shutdown.changed() => {
                    let acts = self.session.close(close_code::GOING_AWAY, "server shutting down");
                    self.apply_boxed(acts).await;
                    self.detached_until = None;
                    self.ending = Some(LeaveReason::ServerShutdown);
                }
            }
        }
        if let Some(to) = self.takeover.take()
            && self.ending.is_none()
        {
            match self.hand_over(to) {
                Ok(()) => return,
                // The new connection gave up waiting: this one ends as if never resumed.
                Err(mut me) => {
                    me.ending = Some(LeaveReason::Disconnected);
                    Box::pin(me.teardown()).await;
                    return;
                }
            }
        }
        Box::pin(self.teardown()).await;
    }

    /// A room event: room-wide messages (serialized once by the room) go straight out; the
    /// rest through the (boxed: large) handler. (The busiest room-wide messages do not come
    /// this way at all: the writer reads them from the room's feed.)
    async fn room_event(&mut self, ev: RoomEvent) {
        match ev {
            RoomEvent::Text(text) => {
                self.out.push(WsOut::Text(text.to_string()));
            }
            ev => Box::pin(self.on_room_event(ev)).await,
        }
    }

    /// Handle the room events already waiting (at most [`DRAIN_MAX`], so the connection's
    /// other inputs keep their turn), without offering in between: the caller sends one offer
    /// for all of them. The subscriber answer timeout is unchanged: it runs from that offer.
    async fn drain_room_events(&mut self) {
        for _ in 0..DRAIN_MAX {
            if self.ending.is_some() || self.session.is_closed() {
                return;
            }
            let Some(rx) = self.room_rx.as_mut() else {
                return;
            };
            // Empty: done. Disconnected: the next `recv` in the loop sees it.
            let Ok(ev) = rx.try_recv() else {
                return;
            };
            self.room_event(ev).await;
        }
    }

    fn next_deadline(&self) -> Instant {
        // A signaling-only member (most of a big room's audience) wakes only for its own
        // timers (pings, the dead-connection deadline): no media timers, no stats.
        let media = self.joined.as_ref().is_none_or(|j| {
            j.publisher.is_some() || j.subscriber.is_some() || !j.published.is_empty()
        });
        let mut t = match self.detached_until {
            Some(until) => until,
            None => self.session.next_tick(),
        };
        if media {
            t = t.min(Instant::now() + MAX_TICK).min(self.stats_at);
        }
        if let Some(j) = &self.joined
            && let Some((_, deadline)) = j.negotiating
        {
            t = t.min(deadline);
        }
        t
    }

    async fn apply(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Send(m) => self.send(m).await,
                Action::Ping => {
                    self.out.push(WsOut::Ping);
                }
                Action::Close { code, reason } => {
                    self.out.push(WsOut::Close(code, reason));
                    if code == close_code::DEAD {
                        // Silent for too long: a phone between networks keeps its place.
                        self.connection_lost(LeaveReason::Disconnected);
                    } else if self.ending.is_none() {
                        self.ending = Some(LeaveReason::Left);
                    }
                }
                Action::Join {
                    id,
                    claims,
                    resumable,
                } => self.join(id, claims, resumable).await,
                Action::Resume {
                    id,
                    token,
                    last_message_id,
                } => self.resume(id, token, last_message_id).await,
                Action::Dispatch { id, msg } => self.dispatch(id, msg).await,
            }
        }
    }

    /// `apply` can reach itself again (a dispatched request may close the session), so the
    /// recursion goes through a boxed future.
    fn apply_boxed(
        &mut self,
        actions: Vec<Action>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(self.apply(actions))
    }

    async fn close_with(&mut self, code: u16, reason: &str, leave: LeaveReason) {
        let acts = self.session.close(code, reason);
        self.apply_boxed(acts).await;
        if !self.is_detached() {
            self.ending = Some(leave);
        }
    }

    /// A join result for `participant` (this one) seeing `others` (also a resume's result).
    fn join_result(
        &self,
        room: &Room,
        participant: crate::signaling::protocol::ParticipantInfo,
        others: Vec<crate::signaling::protocol::ParticipantInfo>,
    ) -> JoinResult {
        let cfg = &self.svc.cfg;
        JoinResult {
            version: PROTOCOL_VERSION,
            room: room.name.clone(),
            participant,
            participants: others,
            ice_servers: cfg.webrtc.ice_servers.clone(),
            limits: Limits {
                max_message_bytes: cfg.signaling.max_message_bytes,
                max_members: cfg.room.max_members,
                max_participants: cfg.room.max_participants,
                max_publishers: cfg.room.max_publishers,
                max_tracks_per_participant: cfg.room.max_tracks_per_participant,
                rate_limit_per_sec: cfg.signaling.rate_limit_per_sec,
                ping_interval_ms: cfg.signaling.ping_interval.as_millis() as u64,
                resume_grace_ms: cfg.signaling.resume_grace.as_millis() as u64,
            },
            seats: cfg.room.cohost_seats,
            history: room.messages_since(0),
            pk: room.pk_partner(),
            counts: room.counts(),
            resume_token: None,
            resumed: false,
        }
    }

    async fn join(&mut self, id: Option<RequestId>, claims: Claims, resumable: bool) {
        let (tx, rx) = crate::room::event_channel();
        let rooms = self.svc.rooms.clone();
        match rooms.join(&claims.room, &claims.sub, claims.role, tx) {
            Err(e) => {
                let (code, close) = room_error(&e);
                let acts = self.session.refused(
                    id,
                    code,
                    &e.to_string(),
                    if close == 0 {
                        close_code::NORMAL
                    } else {
                        close
                    },
                );
                self.svc
                    .metrics
                    .join_failures
                    .fetch_add(1, Ordering::Relaxed);
                self.apply_boxed(acts).await;
            }
            Ok((room, snap)) => {
                self.session.admitted();
                self.svc.metrics.joins.fetch_add(1, Ordering::Relaxed);
                info!(room = %room.name, participant = %snap.participant.id,
                    identity = %claims.sub, role = claims.role.as_str(), "joined");
                let mut result = self.join_result(&room, snap.participant.clone(), snap.others);
                let role = claims.role;
                self.room_rx = Some(rx);
                self.joined = Some(Joined {
                    downlink: downlink::DownlinkGroup::new(Some(room.clone())),
                    room,
                    pid: snap.participant.id,
                    claims,
                    publisher: None,
                    subscriber: None,
                    sub_connected: false,
                    sub_tracks: HashMap::new(),
                    candidates: [0, 0],
                    negotiating: None,
                    dirty: false,
                    next_offer_id: 1,
                    kf_unoffered: vec![],
                    kf_offered: vec![],
                    kf_ready: vec![],
                    published: HashMap::new(),
                    // Hosts and co-hosts talk in real time; the audience asks for media.
                    auto_subscribe: role.may_publish(),
                    paused: Arc::new(AtomicBool::new(false)),
                    resume_secret: None,
                    ice_restart: false,
                });
                if resumable {
                    result.resume_token = self.make_resumable();
                }
                self.reply(id, ResponseResult::Joined(Box::new(result)))
                    .await;
                self.out.push(WsOut::Follow(snap.feed));
                if role.may_publish() {
                    for (_, router) in snap.tracks {
                        self.subscribe(router).await;
                    }
                    self.maybe_offer().await;
                }
            }
        }
    }

    async fn dispatch(&mut self, id: Option<RequestId>, msg: ClientMessage) {
        match msg {
            ClientMessage::Publish { sdp } => self.publish(id, sdp).await,
            ClientMessage::Unpublish => {
                if let Some(j) = self.joined.as_ref() {
                    j.room.unpublish_all(&j.pid);
                }
                self.stop_publishing().await;
                self.reply(id, ResponseResult::Empty {}).await;
            }
            ClientMessage::Answer { offer_id, sdp } => self.answer(id, offer_id, sdp).await,
            ClientMessage::Candidate { target, candidate } => {
                self.candidate(id, target, candidate).await
            }
            ClientMessage::RequestKeyframe { track_id } => {
                let found = self
                    .joined
                    .as_ref()
                    .and_then(|j| j.sub_tracks.get(&track_id))
                    .map(|t| t.router.clone());
                match found {
                    Some(r) => {
                        r.request_keyframe();
                        self.reply(id, ResponseResult::Empty {}).await;
                    }
                    None => {
                        self.error(id, ErrorCode::UnknownTrack, "not subscribed to that track")
                            .await
                    }
                }
            }
            ClientMessage::SetTrackQuality {
                track_id,
                layer,
                max_width,
                max_height,
            } => {
                self.set_track_quality(id, track_id, layer, max_width, max_height)
                    .await
            }
            ClientMessage::Subscribe { tracks, all } => {
                self.subscribe_request(id, tracks, all).await
            }
            ClientMessage::Unsubscribe { tracks, all } => {
                self.unsubscribe_request(id, tracks, all).await
            }
            ClientMessage::RestartIce => self.restart_ice(id).await,
            ClientMessage::PauseMedia => self.pause_request(id, true).await,
            ClientMessage::ResumeMedia => self.pause_request(id, false).await,
            ClientMessage::StartBridge {
                layout,
                destinations,
            } => {
                let req = crate::bridge::control::BridgeRequest {
                    layout,
                    destinations: destinations.into_iter().map(Into::into).collect(),
                    ..Default::default()
                };
                self.bridge_ctl(id, |svc, room| {
                    crate::bridge::control::start(svc, room, req)
                })
                .await
            }
            ClientMessage::SetLayout { layout } => {
                self.bridge_ctl(id, |svc, room| {
                    crate::bridge::control::set_layout(svc, room, layout)
                })
                .await
            }
            ClientMessage::StopBridge => self.bridge_ctl(id, crate::bridge::control::stop).await,
            ClientMessage::StartRecording => self.recording_ctl(id, true).await,
            ClientMessage::StopRecording => self.recording_ctl(id, false).await,
            ClientMessage::RequestCohost => {
                self.room_op(id, |_, r, a| r.request_cohost(me(a))).await
            }
            ClientMessage::CancelCohostRequest => {
                self.room_op(id, |_, r, a| r.cancel_cohost_request(me(a)))
                    .await
            }
            ClientMessage::AnswerCohostRequest {
                participant_id,
                approve,
            } => {
                self.room_op(id, |_, r, a| {
                    r.answer_cohost_request(a, &participant_id, approve)
                })
                .await
            }
            ClientMessage::InviteCohost { participant_id } => {
                self.room_op(id, |_, r, a| r.invite_cohost(a, &participant_id))
                    .await
            }
            ClientMessage::AnswerCohostInvite { accept } => {
                self.room_op(id, |_, r, a| r.answer_cohost_invite(me(a), accept))
                    .await
            }
            ClientMessage::RemoveCohost { participant_id } => {
                self.room_op(id, |_, r, a| r.remove_cohost(a, &participant_id))
                    .await
            }
            ClientMessage::LeaveSeat => self.room_op(id, |_, r, a| r.remove_cohost(a, me(a))).await,
            ClientMessage::MuteTrack {
                participant_id,
                kind,
                muted,
            } => {
                self.room_op(id, |_, r, a| r.mute_track(a, &participant_id, kind, muted))
                    .await
            }
            ClientMessage::Kick { participant_id } => {
                self.room_op(id, |_, r, a| r.kick(a, &participant_id)).await
            }
            ClientMessage::Chat { text } => {
                self.room_op(id, |_, r, a| {
                    r.say(me(a), MessageBody::Chat { text }).map(|_| ())
                })
                .await
            }
            ClientMessage::Like { count } => {
                let count = count.unwrap_or(1).clamp(1, 1000);
                self.room_op(id, |_, r, a| {
                    r.say(me(a), MessageBody::Like { count }).map(|_| ())
                })
                .await
            }
            ClientMessage::Gift { gift, count } => {
                let count = count.unwrap_or(1).clamp(1, 10_000);
                self.room_op(id, |_, r, a| {
                    r.say(me(a), MessageBody::Gift { gift, count }).map(|_| ())
                })
                .await
            }
            ClientMessage::DeleteMessage { message_id } => {
                self.room_op(id, |_, r, a| r.delete_message(a, message_id))
                    .await
            }
            ClientMessage::MuteChat {
                participant_id,
                muted,
            } => {
                self.room_op(id, |_, r, a| r.mute_chat(a, &participant_id, muted))
                    .await
            }
            ClientMessage::PkInvite { room } => {
                self.room_op(id, |reg, r, a| reg.pk_invite(r, a, &room))
                    .await
            }
            ClientMessage::PkAnswer { room, accept } => {
                self.room_op(id, |reg, r, a| reg.pk_answer(r, a, &room, accept))
                    .await
            }
            ClientMessage::PkEnd => self.room_op(id, |reg, r, a| reg.pk_end(r, a)).await,
            // Join, Ping and Leave are handled by the session itself.
            other => {
                self.error(
                    id,
                    ErrorCode::BadRequest,
                    format!("{} is not valid now", other.name()),
                )
                .await
            }
        }
    }

    /// Run a co-host workflow / room message operation as this member and answer it.
    async fn room_op(
        &mut self,
        id: Option<RequestId>,
        f: impl FnOnce(&Registry, &Arc<Room>, Actor<'_>) -> Result<(), RoomError>,
    ) {
        let Some(j) = self.joined.as_ref() else {
            return;
        };
        let actor = Actor::member(&j.pid, j.claims.role);
        match f(&self.svc.rooms, &j.room, actor) {
            Ok(()) => self.reply(id, ResponseResult::Empty {}).await,
            Err(e) => {
                let (code, _) = room_error(&e);
                self.error(id, code, e.to_string()).await;
            }
        }
    }

    /// `bridge.auto_start`: the host's first published track starts the room's bridge.
    fn auto_start_bridge(&self) {
        if let Some(j) = self.joined.as_ref() {
            auto_start_bridge(&self.svc, &j.room.name, j.claims.role);
        }
    }

    /// Run a bridge control action for this connection's room, if its role allows it.
    async fn bridge_ctl(
        &mut self,
        id: Option<RequestId>,
        f: impl FnOnce(
            &crate::bridge::control::Bridges<'_>,
            &str,
        ) -> Result<(), crate::bridge::control::ControlError>,
    ) {
        use crate::bridge::control::ControlError as E;
        let Some(j) = self.joined.as_ref() else {
            return;
        };
        if !matches!(j.claims.role, Role::Host | Role::Admin) {
            self.error(
                id,
                ErrorCode::Forbidden,
                "only the host controls the bridge",
            )
            .await;
            return;
        }
        let room = j.room.name.clone();
        match f(&self.svc.bridge_ctl(Some(j.claims.role)), &room) {
            Ok(()) => self.reply(id, ResponseResult::Empty {}).await,
            Err(e) => {
                let code = match e {
                    E::AlreadyRunning => ErrorCode::AlreadyRunning,
                    E::NotRunning | E::NoRoom => ErrorCode::NotRunning,
                    E::BadDestination(_) | E::DestinationRefused(_) => ErrorCode::BadDestination,
                    E::BadRequest(_) | E::OverLimit(_) | E::TooManyDestinations(_) => {
                        ErrorCode::BadRequest
                    }
                };
                self.error(id, code, e.to_string()).await;
            }
        }
    }

    /// `start_recording` / `stop_recording` for this connection's room (host or admin).
    async fn recording_ctl(&mut self, id: Option<RequestId>, start: bool) {
        use crate::recording::RecordingError as E;
        let Some(j) = self.joined.as_ref() else {
            return;
        };
        if !matches!(j.claims.role, Role::Host | Role::Admin) {
            self.error(id, ErrorCode::Forbidden, "only the host controls recording")
                .await;
            return;
        }
        let room = j.room.name.clone();
        let rec = &self.svc.recordings;
        let r = if start {
            rec.start(&room).map(|_| ())
        } else {
            rec.stop(&room, crate::recording::StopReason::Requested)
        };
        match r {
            Ok(()) => self.reply(id, ResponseResult::Empty {}).await,
            Err(e) => {
                let code = match e {
                    E::AlreadyRecording => ErrorCode::AlreadyRecording,
                    E::NotRecording => ErrorCode::NotRecording,
                    E::TooMany(_) => ErrorCode::TooManyRecordings,
                    E::NoRoom | E::NotFound => ErrorCode::NotFound,
                    E::BadName => ErrorCode::BadRequest,
                    E::Io(_) => ErrorCode::Internal,
                };
                self.error(id, code, e.to_string()).await;
            }
        }
    }

    async fn publish(&mut self, id: Option<RequestId>, sdp: String) {
        let Some(j) = self.joined.as_mut() else {
            return;
        };
        if let Err(e) = j.room.check_publish(&j.pid, false) {
            let (code, _) = room_error(&e);
            let msg = e.to_string();
            self.error(id, code, msg).await;
            return;
        }
        if sdp.len() > self.svc.cfg.signaling.max_message_bytes {
            self.error(id, ErrorCode::BadSdp, "SDP too large").await;
            return;
        }
        if j.publisher.is_none() {
            match self.svc.peers.create().await {
                Ok((p, rx)) => {
                    j.publisher = Some(p);
                    j.candidates[0] = 0;
                    self.pub_rx = Some(rx);
                }
                Err(e) => {
                    warn!("cannot create publisher peer: {e}");
                    self.svc
                        .metrics
                        .peer_failures
                        .fetch_add(1, Ordering::Relaxed);
                    self.error(id, ErrorCode::Internal, e.to_string()).await;
                    return;
                }
            }
        }
        let Some(peer) = j.publisher.as_ref() else {
            return;
        };
        let sending = crate::peer::sending_ssrcs(&sdp);
        match peer.answer(sdp).await {
            Ok(answer) => {
                let stopped: Vec<String> = match sending {
                    Some(sending) => j
                        .published
                        .iter()
                        .filter(|(_, p)| p.stopped_by(&sending))
                        .map(|(id, _)| id.clone())
                        .collect(),
                    None => vec![],
                };
                self.reply(id, ResponseResult::Answer { sdp: answer }).await;
                {
                    for track_id in stopped {
                        self.on_internal(Internal::TrackEnded(track_id)).await;
                    }
                }
            }
            Err(PeerError::BadSdp(e)) => self.error(id, ErrorCode::BadSdp, e).await,
            Err(e) => self.error(id, ErrorCode::Internal, e.to_string()).await,
        }
    }

    async fn answer(&mut self, id: Option<RequestId>, offer_id: u64, sdp: String) {
        let Some(j) = self.joined.as_mut() else {
            return;
        };
        match (j.negotiating, j.subscriber.as_ref()) {
            (Some((want, _)), Some(peer)) if want == offer_id => {
                match peer.accept_answer(sdp).await {
                    Ok(()) => {
                        debug!(participant = %j.pid, offer_id, "subscriber answer applied");
                        j.negotiating = None;
                        let offered = std::mem::take(&mut j.kf_offered);
                        j.kf_ready.extend(offered);
                        self.reply(id, ResponseResult::Empty {}).await;
                        self.flush_keyframes();
                        self.maybe_offer().await;
                    }
                    Err(e) => {
                        // The offer stays in flight: the client may send a corrected answer.
                        self.error(id, ErrorCode::BadSdp, e.to_string()).await
                    }
                }
            }
            _ => {
                self.error(
                    id,
                    ErrorCode::StaleAnswer,
                    format!("no offer {offer_id} is waiting for an answer"),
                )
                .await
            }
        }
    }

    async fn candidate(&mut self, id: Option<RequestId>, target: Target, c: Candidate) {
        let max = self.svc.cfg.signaling.max_candidates;
        let Some(j) = self.joined.as_mut() else {
            return;
        };
        let slot = match target {
            Target::Publisher => 0,
            Target::Subscriber => 1,
        };
        let connected = match target {
            Target::Publisher => j.publisher.is_some(),
            Target::Subscriber => j.subscriber.is_some(),
        };
        if connected && !c.candidate.is_empty() {
            if j.candidates[slot] >= max {
                let msg = format!("at most {max} candidates per connection");
                self.error(id, ErrorCode::BadRequest, msg).await;
                return;
            }
            j.candidates[slot] += 1;
        }
        let Some(j) = self.joined.as_ref() else {
            return;
        };
        let peer = match target {
            Target::Publisher => j.publisher.as_ref(),
            Target::Subscriber => j.subscriber.as_ref(),
        };
        let Some(peer) = peer else {
            self.error(
                id,
                ErrorCode::UnknownSession,
                format!("no {target:?} connection yet").to_lowercase(),
            )
            .await;
            return;
        };
        match peer.add_candidate(cand_in(c)).await {
            // A phone trickles tens of candidates in a burst; only those with an `id` get an
            // acknowledgement (without one the client could not match it anyway). Errors are
            // always sent.
            Ok(()) if id.is_none() => {}
            Ok(()) => self.reply(id, ResponseResult::Empty {}).await,
            Err(e) => self.error(id, ErrorCode::BadRequest, e.to_string()).await,
        }
    }

    async fn on_room_event(&mut self, ev: RoomEvent) {
        let Some(j) = self.joined.as_ref() else {
            return;
        };
        let auto = j.auto_subscribe;
        match ev {
            RoomEvent::Joined(p) => {
                self.send(ServerMessage::ParticipantJoined { participant: p })
                    .await
            }
            RoomEvent::Left {
                participant_id,
                identity,
                reason,
                tracks,
            } => {
                self.tracks_ended(tracks, &participant_id).await;
                self.send(ServerMessage::ParticipantLeft {
                    participant_id,
                    identity,
                    reason,
                })
                .await
            }
            RoomEvent::TrackPublished(info, router) => {
                self.send(ServerMessage::TrackPublished { track: info })
                    .await;
                if auto {
                    self.subscribe(router).await;
                }
            }
            RoomEvent::TracksUnpublished {
                track_ids,
                participant_id,
            } => self.tracks_ended(track_ids, &participant_id).await,
            RoomEvent::Removed(reason) => {
                let (code, why) = match reason {
                    LeaveReason::Replaced => {
                        (close_code::REPLACED, "replaced by a newer connection")
                    }
                    LeaveReason::Kicked => (close_code::KICKED, "removed by the host"),
                    LeaveReason::SlowReader => (close_code::SLOW_READER, "slow reader"),
                    _ => (close_code::NORMAL, "removed"),
                };
                // A replaced member is already out of the room (teardown's leave is then a
                // no-op); a kicked one leaves in teardown with reason `kicked`.
                self.close_with(code, why, reason).await;
            }
            RoomEvent::Notify(msg) => self.send(msg).await,
            RoomEvent::Text(text) => {
                self.out.push(WsOut::Text(text.to_string()));
            }
            RoomEvent::Demoted => {
                // Back in the audience: no media either way, until it asks again.
                self.stop_publishing().await;
                self.stop_receiving(None).await;
            }
            RoomEvent::Promoted => self.receive_everything().await,
        }
    }

    /// The seat is gone: close the publisher connection and end its tracks (the room already
    /// unpublished them), so the server stops taking this member's media.
    async fn stop_publishing(&mut self) {
        let Some(j) = self.joined.as_mut() else {
            return;
        };
        for (_, p) in j.published.drain() {
            p.router.close();
            for t in p.tasks {
                t.abort();
            }
        }
        if let Some(pc) = j.publisher.take() {
            pc.close().await;
        }
        self.pub_rx = None;
    }

    async fn on_peer_event(&mut self, target: Target, ev: PeerEvent) {
        match ev {
            PeerEvent::Candidate(Some(c)) => {
                self.send(ServerMessage::Candidate {
                    target,
                    candidate: cand_out(c),
                })
                .await
            }
            PeerEvent::Candidate(None) => {
                // End of candidates, once per connection, as browsers send it: an empty
                // candidate string with the sdpMid/sdpMLineIndex of our candidates. Typed
                // client models (Swift/Kotlin/Dart) decode it like any candidate, W3C stacks
                // accept it, and native libwebrtc, which has no end-of-candidates in its API
                // ("Expect line: candidate:"), is told to skip it (docs/protocol.md). It is
                // also in every later server SDP as `a=end-of-candidates`.
                let peer = self.joined.as_ref().and_then(|j| match target {
                    Target::Publisher => j.publisher.as_ref(),
                    Target::Subscriber => j.subscriber.as_ref(),
                });
                if let Some(c) = peer.map(Peer::end_of_candidates) {
                    self.send(ServerMessage::Candidate {
                        target,
                        candidate: cand_out(c),
                    })
                    .await
                }
            }
            PeerEvent::State(s) => {
                debug!(?target, ?s, "peer state");
                match s {
                    PeerState::Connected if target == Target::Subscriber => {
                        if let Some(j) = self.joined.as_mut() {
                            j.sub_connected = true;
                        }
                        self.flush_keyframes();
                    }
                    PeerState::Failed => {
                        self.svc
                            .metrics
                            .ice_failures
                            .fetch_add(1, Ordering::Relaxed);
                        // A resumable client (a phone changing networks) restarts ICE on the
                        // same connection, which brings a failed one back: it stays.
                        if self
                            .joined
                            .as_ref()
                            .is_some_and(|j| j.resume_secret.is_some())
                        {
                            warn!(
                                ?target,
                                "media connection failed; waiting for an ICE restart"
                            );
                            return;
                        }
                        warn!(?target, "media connection failed; participant leaves");
                        self.close_with(
                            close_code::DEAD,
                            "media connection failed",
                            LeaveReason::Disconnected,
                        )
                        .await;
                    }
                    _ => {}
                }
            }
            PeerEvent::Track(t) if target == Target::Publisher => self.on_remote_track(t).await,
            PeerEvent::Track(_) => {
                // Media sent on the subscriber connection is not a publication: ignore it, so
                // a role that may not publish cannot sneak media in that way.
                debug!("ignoring track received on a subscriber connection");
            }
        }
    }

    async fn on_remote_track(&mut self, t: RemoteTrack) {
        let Some(j) = self.joined.as_mut() else {
            return;
        };
        let track_id = new_track_id();
        let (router, kf_rx) = TrackRouter::with_layers(
            track_id.clone(),
            j.pid.clone(),
            to_kind(t.kind),
            t.codec.clone(),
            t.layers.clone(),
        );
        let info = match j.room.publish(&j.pid, router.clone()) {
            Ok(i) => i,
            Err(e) => {
                let (code, _) = room_error(&e);
                let msg = format!("track not published: {e}");
                self.error(None, code, msg).await;
                return;
            }
        };
        info!(room = %j.room.name, participant = %j.pid, track = %track_id,
            codec = %t.codec.mime_type, layers = ?t.layers, "track published");
        let done = self
            .internal_tx
            .get_or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                self.internal_rx = Some(rx);
                tx
            })
            .clone();
        let tid = track_id.clone();
        let ssrc = t.ssrc;
        let tasks = publish_tasks(
            t,
            router.clone(),
            kf_rx,
            &self.svc,
            j.room.clone(),
            Box::new(move || {
                let _ = done.send(Internal::TrackEnded(tid));
            }),
        );
        j.published.insert(
            track_id,
            Published {
                router: router.clone(),
                ssrc,
                tasks,
            },
        );
        self.send(ServerMessage::TrackPublished { track: info })
            .await;
        self.auto_start_bridge();
    }

    /// Tracks of `participant_id` ended: stop receiving them (the caller offers once for all)
    /// and tell the client, one message per track.
    async fn tracks_ended(&mut self, track_ids: Vec<String>, participant_id: &str) {
        for track_id in track_ids {
            self.unsubscribe(&track_id).await;
            self.send(ServerMessage::TrackUnpublished {
                track_id,
                participant_id: participant_id.to_string(),
            })
            .await;
        }
    }

    async fn on_internal(&mut self, ev: Internal) {
        match ev {
            Internal::TrackEnded(track_id) => {
                if let Some(j) = self.joined.as_mut()
                    && let Some(p) = j.published.remove(&track_id)
                {
                    for t in p.tasks {
                        t.abort();
                    }
                    j.room.unpublish(&j.pid, &track_id);
                    let participant_id = j.pid.clone();
                    self.send(ServerMessage::TrackUnpublished {
                        track_id,
                        participant_id,
                    })
                    .await;
                }
            }
        }
    }

    /// Start forwarding `router` to this participant.
    async fn subscribe(&mut self, router: Arc<TrackRouter>) {
        let Some(j) = self.joined.as_mut() else {
            return;
        };
        if router.participant_id == j.pid || j.sub_tracks.contains_key(&router.id) {
            return;
        }
        if j.subscriber.is_none() {
            // An audience member only watches: like a WHEP viewer, it may not take the ports
            // kept for publishers. Members who may publish keep their place in the reserve.
            let use_ = if j.claims.role.may_publish() {
                crate::peer::PortUse::Publisher
            } else {
                crate::peer::PortUse::Viewer
            };
            match self.svc.peers.create_for(use_).await {
                Ok((p, rx)) => {
                    j.subscriber = Some(p);
                    j.candidates[1] = 0;
                    self.sub_rx = Some(rx);
                }
                Err(e) => {
                    warn!("cannot create subscriber peer: {e}");
                    self.svc
                        .metrics
                        .peer_failures
                        .fetch_add(1, Ordering::Relaxed);
                    let msg = e.to_string();
                    self.error(None, ErrorCode::Internal, msg).await;
                    return;
                }
            }
        }
        let Some(peer) = j.subscriber.as_ref() else {
            return;
        };
        let local = match peer
            .add_local_track(
                &router.participant_id,
                &router.id,
                to_media_kind(router.kind),
                &router.codec,
            )
            .await
        {
            Ok(l) => Arc::new(l),
            Err(e) => {
                warn!(track = %router.id, "cannot add subscriber track: {e}");
                return;
            }
        };
        let (tasks, control) = forward_tasks(
            &local,
            &router,
            self.svc.cfg.webrtc.subscriber_queue,
            j.paused.clone(),
            &j.downlink,
        );
        j.sub_tracks.insert(
            router.id.clone(),
            SubTrack {
                local,
                router: router.clone(),
                control,
                tasks,
            },
        );
        j.kf_unoffered.push(router);
        j.dirty = true;
    }

    async fn unsubscribe(&mut self, track_id: &str) {
        let Some(j) = self.joined.as_mut() else {
            return;
        };
        if let Some(t) = j.sub_tracks.remove(track_id) {
            for task in &t.tasks {
                task.abort();
            }
            j.downlink.remove(track_id);
            if let Some(peer) = j.subscriber.as_ref()
                && let Err(e) = peer.remove_local_track(&t.local).await
            {
                debug!("remove track: {e}");
            }
            j.kf_unoffered.retain(|r| r.id != track_id);
            j.kf_offered.retain(|r| r.id != track_id);
            j.kf_ready.retain(|r| r.id != track_id);
            j.dirty = true;
        }
    }

    /// `set_track_quality`: choose the simulcast layer of a track this member receives, by
    /// rid or by the size it is shown at. A track without layers answers `{}`.
    async fn set_track_quality(
        &mut self,
        id: Option<RequestId>,
        track_id: String,
        layer: Option<String>,
        max_width: Option<u32>,
        max_height: Option<u32>,
    ) {
        let req = match (layer, max_width, max_height) {
            (Some(rid), None, None) => LayerRequest::Rid(rid),
            (None, Some(w), Some(h))
                if (1..=MAX_TILE_SIDE).contains(&w) && (1..=MAX_TILE_SIDE).contains(&h) =>
            {
                LayerRequest::MaxSize {
                    width: w,
                    height: h,
                }
            }
            (None, Some(_), Some(_)) => {
                let msg = format!("max_width and max_height must be 1 to {MAX_TILE_SIDE}");
                self.error(id, ErrorCode::BadRequest, msg).await;
                return;
            }
            _ => {
                let msg = "give either layer, or max_width and max_height";
                self.error(id, ErrorCode::BadRequest, msg).await;
                return;
            }
        };
        let control = self
            .joined
            .as_ref()
            .and_then(|j| j.sub_tracks.get(&track_id))
            .map(|t| t.control.clone());
        let Some(control) = control else {
            let msg = "not subscribed to that track";
            self.error(id, ErrorCode::UnknownTrack, msg).await;
            return;
        };
        match control.select(req) {
            Ok(Some(layer)) => {
                debug!(track = %track_id, %layer, "subscriber layer chosen");
                self.reply(id, ResponseResult::Layer { layer }).await
            }
            Ok(None) => self.reply(id, ResponseResult::Empty {}).await,
            Err(e @ crate::sfu::SelectError::UnknownLayer(_)) => {
                self.error(id, ErrorCode::BadRequest, e.to_string()).await
            }
            Err(e @ crate::sfu::SelectError::NotSubscribed) => {
                self.error(id, ErrorCode::UnknownTrack, e.to_string()).await
            }
        }
    }

    /// Send a new subscriber offer if the track set changed and none is in flight.
    async fn maybe_offer(&mut self) {
        // Detached: nobody to answer; the changes go out in one offer after a resume.
        if self.is_detached() {
            return;
        }
        let Some(j) = self.joined.as_mut() else {
            return;
        };
        if !j.dirty || j.negotiating.is_some() {
            return;
        }
        let Some(peer) = j.subscriber.as_ref() else {
            return;
        };
        let restart = std::mem::take(&mut j.ice_restart);
        match peer.offer(restart).await {
            Ok(sdp) => {
                let offer_id = j.next_offer_id;
                j.next_offer_id += 1;
                j.negotiating = Some((
                    offer_id,
                    Instant::now() + self.svc.cfg.signaling.answer_timeout,
                ));
                j.dirty = false;
                let fresh = std::mem::take(&mut j.kf_unoffered);
                j.kf_offered.extend(fresh);
                debug!(participant = %j.pid, offer_id, "subscriber offer sent");
                self.send(ServerMessage::Offer { offer_id, sdp }).await;
            }
            Err(e) => {
                warn!("subscriber offer failed: {e}");
                self.error(None, ErrorCode::Internal, format!("offer failed: {e}"))
                    .await;
            }
        }
    }

    /// `restart_ice`: the next subscriber offer carries new ICE credentials (now, or after
    /// the answer to the offer in flight).
    async fn restart_ice(&mut self, id: Option<RequestId>) {
        let Some(j) = self.joined.as_mut() else {
            return;
        };
        if j.subscriber.is_none() {
            self.error(
                id,
                ErrorCode::BadRequest,
                "no subscriber connection to restart (a publisher restarts with publish)",
            )
            .await;
            return;
        }
        j.ice_restart = true;
        j.dirty = true;
        self.reply(id, ResponseResult::Empty {}).await;
        self.maybe_offer().await;
    }

    /// Ask publishers for keyframes for tracks the client can now receive.
    fn flush_keyframes(&mut self) {
        let Some(j) = self.joined.as_mut() else {
            return;
        };
        if !j.sub_connected {
            return;
        }
        for r in j.kf_ready.drain(..) {
            debug!(participant = %j.pid, track = %r.id, "keyframe for new subscription");
            r.request_keyframe();
        }
    }

    /// Refresh track bitrates and the connection statistics the REST API shows.
    async fn refresh_stats(&mut self) {
        self.stats_at = Instant::now() + STATS_INTERVAL;
        let Some(j) = self.joined.as_ref() else {
            return;
        };
        // Nothing to measure for a signaling-only member (thousands of them sit in a room).
        if j.publisher.is_none() && j.subscriber.is_none() && j.published.is_empty() {
            return;
        }
        let published: Vec<PublishedTrack<'_>> =
            j.published.iter().map(|(id, p)| p.stats_view(id)).collect();
        let layers: Vec<stats::SubscribedLayer> = j
            .sub_tracks
            .iter()
            .filter_map(|(id, t)| {
                let (layer, target) = t.control.layers()?;
                let rids = t.router.layers();
                let downlink = match t.control.cap()? {
                    crate::sfu::downlink::Cap::Any => "any".to_string(),
                    crate::sfu::downlink::Cap::AtMost(l) => {
                        rids.get(usize::from(l)).cloned().unwrap_or_default()
                    }
                    crate::sfu::downlink::Cap::Paused => "paused".to_string(),
                };
                Some(stats::SubscribedLayer {
                    track_id: id.clone(),
                    layer,
                    target,
                    downlink,
                })
            })
            .collect();
        self.stats
            .refresh(
                &j.room,
                &j.pid,
                j.publisher.as_ref(),
                j.subscriber.as_ref(),
                &published,
                &layers,
            )
            .await;
    }

    async fn check_answer_timeout(&mut self) {
        let expired = self
            .joined
            .as_ref()
            .and_then(|j| j.negotiating)
            .is_some_and(|(_, deadline)| Instant::now() >= deadline);
        if expired {
            self.error(
                None,
                ErrorCode::Timeout,
                "no answer to the subscriber offer",
            )
            .await;
            self.close_with(
                close_code::DEAD,
                "negotiation timeout",
                LeaveReason::Disconnected,
            )
            .await;
        }
    }

    async fn teardown(&mut self) {
        let reason = if self.out.is_slow() {
            LeaveReason::SlowReader
        } else {
            self.ending.unwrap_or(LeaveReason::Left)
        };
        if let Some(j) = self.joined.take() {
            self.forget_resumable(&j);
            // The last one out ends the room, and the bridge follows (bridge::control).
            self.svc.rooms.leave(&j.room, &j.pid, reason);
            Self::release(j).await;
        }
    }

    /// Stop every task and close both peer connections.
    async fn release(mut j: Joined) {
        for (_, p) in j.published.drain() {
            p.router.close();
            for t in p.tasks {
                t.abort();
            }
        }
        for (_, t) in j.sub_tracks.drain() {
            for task in t.tasks {
                task.abort();
            }
        }
        if let Some(p) = j.publisher.take() {
            p.close().await;
        }
        if let Some(p) = j.subscriber.take() {
            p.close().await;
        }
    }
}

/// `bridge.auto_start`: a host's first published track starts the room's bridge.
pub(crate) fn auto_start_bridge(svc: &Services, room: &str, role: Role) {
    crate::bridge::control::auto_start(&svc.bridge_ctl(None), room, role);
}

#[cfg(test)]
mod tests {
    /// Every member's queues reserve 32 slots of these up front, so their size is memory per
    /// idle audience member (room events travel boxed for the same reason).
    #[test]
    fn queue_items_of_an_idle_member_stay_small() {
        use std::mem::size_of;
        assert!(
            size_of::<super::WsIn>() <= 24,
            "WsIn {}",
            size_of::<super::WsIn>()
        );
        assert!(
            size_of::<super::WsOut>() <= 40,
            "WsOut {}",
            size_of::<super::WsOut>()
        );
    }
}
