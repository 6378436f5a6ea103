//! WHIP publishers (RFC 9725) and WHEP viewers: participants whose whole signaling is one HTTP
//! offer/answer exchange plus a resource URL to end (DELETE) or trickle to (PATCH).
//!
//! A WHIP session is a normal room member: it joins with its token's identity and role, its
//! tracks are published into the room as [`TrackRouter`]s exactly like a WebSocket publisher's
//! (others subscribe through their usual renegotiation, the bridge mixes them), and it leaves
//! when the resource is deleted, its media connection fails, it is kicked or replaced, or the
//! server shuts down.
//!
//! A WHEP session is a viewer, not a room member (like an HTTP-FLV viewer): it receives either
//! one participant's current tracks or the bridge's mixed output (the bridge's RTP routers), and
//! ends when those tracks end, its connection fails or the resource is deleted.

use crate::peer::ice_ufrag;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::stats::{PublishedTrack, STATS_INTERVAL, StatsRefresher};
use super::{
    DownlinkGroup, Published, Services, auto_start_bridge, forward_tasks, publish_tasks, to_kind,
    to_media_kind,
};
use crate::auth::{AuthError, Claims, Role};
use crate::peer::{IceCandidate, LocalTrack, Peer, PeerError, PeerEvent, PeerState, PortUse};
use crate::room::{RoomError, RoomEvent, new_track_id};
use crate::sfu::TrackRouter;
use crate::signaling::protocol::{Kind, LeaveReason};

/// How long the server gathers its ICE candidates before answering (host candidates on the
/// configured address come at once; this only bounds a misconfigured machine).
const GATHER_TIMEOUT: Duration = Duration::from_secs(3);

/// What went wrong, in terms an HTTP layer maps to a status code.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WhipError {
    /// Missing, malformed, forged or expired token (401).
    #[error("{0}")]
    Unauthorized(String),
    /// Valid token, but not for this room or role (403).
    #[error("{0}")]
    Forbidden(String),
    /// The offer or SDP fragment cannot be used (400).
    #[error("{0}")]
    BadRequest(String),
    /// No such session, participant or bridge (404).
    #[error("{0}")]
    NotFound(String),
    /// The room refuses it right now: full, too many publishers, nothing to watch (409).
    #[error("{0}")]
    Conflict(String),
    /// `If-Match` names another ICE session (412).
    #[error("{0}")]
    PreconditionFailed(String),
    /// An ICE restart PATCH without `If-Match` (428, RFC 9725 §4.3.2).
    #[error("{0}")]
    PreconditionRequired(String),
    /// Server-side failure (the WebRTC stack failed, ...) (503).
    #[error("{0}")]
    Unavailable(String),
    /// The caller holds too many sessions: `whep_identity_limit` (429, JSON error body).
    #[error("{1}")]
    TooMany(&'static str, String),
    /// A capacity limit of the room or server: `whep_room_full`, `whep_server_full`,
    /// `media_ports_exhausted` (503, JSON error body).
    #[error("{1}")]
    Full(&'static str, String),
}

impl WhipError {
    /// The machine-readable code of a limit refusal (documented in docs/api.md).
    pub fn code(&self) -> Option<&'static str> {
        match self {
            Self::TooMany(c, _) | Self::Full(c, _) => Some(c),
            _ => None,
        }
    }
}

fn auth_error(e: AuthError) -> WhipError {
    match e {
        AuthError::WrongRoom => WhipError::Forbidden("the token is for another room".into()),
        e => WhipError::Unauthorized(e.to_string()),
    }
}

fn room_error(e: RoomError) -> WhipError {
    match e {
        RoomError::Forbidden(_) | RoomError::NotHost | RoomError::WrongRole(_) => {
            WhipError::Forbidden(e.to_string())
        }
        e => WhipError::Conflict(e.to_string()),
    }
}

/// A new session: its id (the last segment of the resource URL), our answer, the ETag of its
/// ICE session.
#[derive(Debug)]
pub struct Created {
    pub session: String,
    pub answer: String,
    pub etag: String,
    /// For a WHIP session: the participant id others see.
    pub participant_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKind {
    Whip,
    Whep,
}

enum Command {
    Candidates(Vec<IceCandidate>, oneshot::Sender<Result<(), WhipError>>),
    Restart(Restart, oneshot::Sender<Result<Patched, WhipError>>),
    End,
}

/// An ICE restart the client asked for (a PATCH with new credentials).
struct Restart {
    /// The ETag the client named; `None` for `If-Match: *`. Checked again in the session's
    /// task, which runs one command at a time: of two restarts naming the same ETag, the
    /// second gets 412 instead of restarting what the first just set up.
    if_match: Option<String>,
    frag: SdpFrag,
}

/// What a PATCH did.
#[derive(Debug, PartialEq, Eq)]
pub enum Patched {
    /// Candidates added to the current ICE session (204).
    Trickled,
    /// ICE restarted (200): our new credentials and candidates as an
    /// `application/trickle-ice-sdpfrag` body, and the new ICE session's ETag.
    Restarted { frag: String, etag: String },
}

struct Handle {
    room: String,
    /// Who created it: DELETE / PATCH need a token of the same identity (or the room's host).
    identity: String,
    kind: SessionKind,
    etag: String,
    ice_ufrag: Option<String>,
    cmd: mpsc::UnboundedSender<Command>,
}

/// Live WHIP and WHEP sessions by id.
#[derive(Default)]
pub struct Sessions {
    map: DashMap<String, Handle>,
    /// WHEP sessions admitted (being set up or live), for the `[whip]` caps.
    whep: Arc<std::sync::Mutex<WhepCounts>>,
}

#[derive(Default)]
struct WhepCounts {
    total: usize,
    per_room: HashMap<String, usize>,
    per_identity: HashMap<String, usize>,
}

/// One admitted WHEP session, counted against the caps until dropped: taken before the peer
/// connection is built (so concurrent POSTs cannot overshoot), held by the session's task.
pub struct WhepSlot {
    counts: Arc<std::sync::Mutex<WhepCounts>>,
    room: String,
    identity: String,
}

fn lock_counts(m: &std::sync::Mutex<WhepCounts>) -> std::sync::MutexGuard<'_, WhepCounts> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Drop for WhepSlot {
    fn drop(&mut self) {
        let mut guard = lock_counts(&self.counts);
        let c = &mut *guard;
        c.total = c.total.saturating_sub(1);
        for (map, key) in [
            (&mut c.per_room, &self.room),
            (&mut c.per_identity, &self.identity),
        ] {
            if let Some(n) = map.get_mut(key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(key);
                }
            }
        }
    }
}

impl Sessions {
    /// Count a new WHEP session of `identity` in `room` against the caps, or refuse it. The
    /// identity's own cap is checked first: one greedy viewer gets 429 for itself before the
    /// room or server is full for everyone.
    pub fn admit_whep(
        &self,
        cfg: &crate::config::WhipConfig,
        room: &str,
        identity: &str,
    ) -> Result<WhepSlot, WhipError> {
        let mut c = lock_counts(&self.whep);
        if c.per_identity.get(identity).copied().unwrap_or(0) >= cfg.whep_max_per_identity {
            return Err(WhipError::TooMany(
                "whep_identity_limit",
                format!(
                    "this identity already holds {} WHEP sessions (whip.whep_max_per_identity): \
                     end one (DELETE its Location) first",
                    cfg.whep_max_per_identity
                ),
            ));
        }
        if c.per_room.get(room).copied().unwrap_or(0) >= cfg.whep_max_per_room {
            return Err(WhipError::Full(
                "whep_room_full",
                format!(
                    "room {room:?} has {} WHEP viewers (whip.whep_max_per_room)",
                    cfg.whep_max_per_room
                ),
            ));
        }
        if c.total >= cfg.whep_max_sessions {
            return Err(WhipError::Full(
                "whep_server_full",
                format!(
                    "the server has {} WHEP viewers (whip.whep_max_sessions)",
                    cfg.whep_max_sessions
                ),
            ));
        }
        c.total += 1;
        *c.per_room.entry(room.to_string()).or_default() += 1;
        *c.per_identity.entry(identity.to_string()).or_default() += 1;
        Ok(WhepSlot {
            counts: self.whep.clone(),
            room: room.to_string(),
            identity: identity.to_string(),
        })
    }

    pub fn count(&self, kind: SessionKind) -> usize {
        self.map.iter().filter(|h| h.kind == kind).count()
    }

    /// Prometheus gauges: live WHIP publishers and WHEP viewers.
    pub fn render_metrics(&self) -> String {
        let mut out = String::new();
        for (name, help, kind) in [
            (
                "cohost_whip_sessions",
                "Live WHIP publishing sessions.",
                SessionKind::Whip,
            ),
            (
                "cohost_whep_sessions",
                "Live WHEP viewing sessions.",
                SessionKind::Whep,
            ),
        ] {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}\n",
                self.count(kind)
            ));
        }
        out
    }
}

fn new_session_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Reject what is clearly not an SDP offer before any peer connection is built.
fn check_offer(sdp: &str) -> Result<(), WhipError> {
    if !sdp.trim_start().starts_with("v=0") {
        return Err(WhipError::BadRequest(
            "malformed SDP: an offer starts with \"v=0\"".into(),
        ));
    }
    if !sdp
        .lines()
        .any(|l| l.starts_with("m=audio") || l.starts_with("m=video"))
    {
        return Err(WhipError::BadRequest(
            "the offer has no audio or video section".into(),
        ));
    }
    Ok(())
}

/// Which media kinds the offer asks to receive (a WHEP viewer's `recvonly` sections).
fn receiving_kinds(sdp: &str) -> Vec<Kind> {
    let mut out = vec![];
    let mut cur: Option<(Kind, bool)> = None;
    let flush = |c: Option<(Kind, bool)>, out: &mut Vec<Kind>| {
        if let Some((k, true)) = c {
            out.push(k);
        }
    };
    for line in sdp.lines() {
        let line = line.trim_end();
        if let Some(m) = line.strip_prefix("m=") {
            flush(cur.take(), &mut out);
            let port_zero = m.split_whitespace().nth(1) == Some("0");
            cur = match m.split_whitespace().next() {
                Some("audio") => Some((Kind::Audio, !port_zero)),
                Some("video") => Some((Kind::Video, !port_zero)),
                _ => None,
            };
        } else if let Some((_, recv)) = cur.as_mut()
            && matches!(line, "a=sendonly" | "a=inactive")
        {
            *recv = false;
        }
    }
    flush(cur, &mut out);
    out
}

/// An `application/trickle-ice-sdpfrag` body (RFC 8840).
#[derive(Debug, Default)]
pub struct SdpFrag {
    pub ufrag: Option<String>,
    pub pwd: Option<String>,
    pub candidates: Vec<IceCandidate>,
}

/// An ICE credential as RFC 8839 §5.4 allows it: `ice-char`s (letters, digits, `+`, `/`), of
/// `min`..=256 characters. Checked because it is written back into an SDP.
fn ice_credential(value: &str, what: &str, min: usize) -> Result<String, WhipError> {
    let ok = (min..=256).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/');
    if !ok {
        return Err(WhipError::BadRequest(format!(
            "malformed a={what}: {min} to 256 of A-Z a-z 0-9 + /"
        )));
    }
    Ok(value.to_string())
}

/// Parse a `application/trickle-ice-sdpfrag` body (RFC 8840): candidates per media section
/// (`a=mid`), and the ICE credentials if it carries any.
pub fn parse_sdpfrag(frag: &str) -> Result<SdpFrag, WhipError> {
    let mut ufrag = None;
    let mut pwd = None;
    let mut mid: Option<String> = None;
    let mut mline: Option<u16> = None;
    let mut out = vec![];
    for line in frag.lines() {
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if line.starts_with("m=") {
            mline = Some(mline.map_or(0, |i| i + 1));
            mid = None;
        } else if let Some(m) = line.strip_prefix("a=mid:") {
            mid = Some(m.to_string());
        } else if let Some(u) = line.strip_prefix("a=ice-ufrag:") {
            ufrag = Some(ice_credential(u, "ice-ufrag", 4)?);
        } else if let Some(p) = line.strip_prefix("a=ice-pwd:") {
            pwd = Some(ice_credential(p, "ice-pwd", 22)?);
        } else if let Some(c) = line.strip_prefix("a=candidate:") {
            // A stray CR would start a new line in the SDP a restart builds from it.
            if c.split_whitespace().count() < 8 || c.chars().any(char::is_control) {
                return Err(WhipError::BadRequest(format!(
                    "malformed candidate line: {line}"
                )));
            }
            out.push(IceCandidate {
                candidate: format!("candidate:{c}"),
                sdp_mid: mid.clone(),
                sdp_mline_index: mline,
                username_fragment: None,
            });
        } else if line == "a=end-of-candidates"
            || line.starts_with("a=ice-options:")
            || line.starts_with("a=group:")
        {
        } else if !line.starts_with("a=") && !line.starts_with("c=") {
            return Err(WhipError::BadRequest(format!(
                "not an SDP fragment line: {}",
                line.chars().take(80).collect::<String>()
            )));
        }
    }
    for c in &mut out {
        c.username_fragment = ufrag.clone();
        if c.sdp_mid.is_none() && c.sdp_mline_index.is_none() {
            c.sdp_mline_index = Some(0);
        }
    }
    Ok(SdpFrag {
        ufrag,
        pwd,
        candidates: out,
    })
}

/// Our side of a restarted ICE session as an `application/trickle-ice-sdpfrag` body, in the
/// shape of RFC 9725 §4.3.2's example: credentials, the BUNDLE group, then each m-section's
/// `m=` line and `a=mid` with the candidates it carries (`webrtc` 0.21 lists all of them in the
/// first, the BUNDLE tag).
pub fn answer_sdpfrag(local_sdp: &str) -> Option<String> {
    let first = |prefix: &str| {
        local_sdp
            .lines()
            .find_map(|l| l.trim_end().strip_prefix(prefix))
    };
    let (ufrag, pwd) = (first("a=ice-ufrag:")?, first("a=ice-pwd:")?);
    let mut out = format!("a=ice-ufrag:{ufrag}\r\na=ice-pwd:{pwd}\r\n");
    if let Some(g) = first("a=group:BUNDLE") {
        out.push_str(&format!("a=group:BUNDLE{g}\r\n"));
    }
    for line in local_sdp.lines().map(str::trim_end) {
        if line.starts_with("m=")
            || line.starts_with("a=mid:")
            || line.starts_with("a=candidate:")
            || line == "a=end-of-candidates"
        {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    Some(out)
}

/// Answer an offer on a fresh peer and wait for our candidates, so the answer is complete
/// (WHIP/WHEP clients such as OBS do not expect the server to trickle). Returns the answer,
/// and the events that arrived meanwhile for the session task.
async fn answer_complete(
    peer: &Peer,
    rx: &mut mpsc::UnboundedReceiver<PeerEvent>,
) -> Result<(String, Vec<PeerEvent>), WhipError> {
    let mut early = vec![];
    let deadline = tokio::time::Instant::now() + GATHER_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(PeerEvent::Candidate(None))) | Err(_) | Ok(None) => break,
            Ok(Some(PeerEvent::Candidate(Some(_)))) => {}
            Ok(Some(ev)) => early.push(ev),
        }
    }
    let sdp = peer
        .local_sdp()
        .await
        .ok_or_else(|| WhipError::Unavailable("no local description".into()))?;
    Ok((sdp, early))
}

fn peer_error(e: PeerError) -> WhipError {
    match e {
        PeerError::BadSdp(e) => WhipError::BadRequest(format!("offer not usable: {e}")),
        e @ (PeerError::NoPort(..) | PeerError::PortsReserved(_)) => {
            WhipError::Full("media_ports_exhausted", e.to_string())
        }
        e => WhipError::Unavailable(e.to_string()),
    }
}

/// `POST /whip/{room}`: publish into the room as the token's identity and role.
///
/// Runs in its own task: a client that goes away mid-request must not leave a member in the
/// room with nobody to end it (the session then ends on its connect timeout).
pub async fn publish(
    svc: &Arc<Services>,
    room: &str,
    token: &str,
    offer: String,
) -> Result<Created, WhipError> {
    let (svc, room, token) = (svc.clone(), room.to_string(), token.to_string());
    tokio::spawn(async move { publish_now(&svc, &room, &token, offer).await })
        .await
        .unwrap_or_else(|e| Err(WhipError::Unavailable(format!("publish failed: {e}"))))
}

async fn publish_now(
    svc: &Arc<Services>,
    room: &str,
    token: &str,
    offer: String,
) -> Result<Created, WhipError> {
    let claims = svc.auth.verify_for_room(token, room).map_err(auth_error)?;
    if !claims.role.may_publish() {
        return Err(WhipError::Forbidden(format!(
            "role {} may not publish",
            claims.role.as_str()
        )));
    }
    check_offer(&offer)?;
    let (room_tx, room_rx) = crate::room::event_channel();
    let (r, snap) = svc
        .rooms
        .join(&claims.room, &claims.sub, claims.role, room_tx)
        .map_err(|e| {
            svc.metrics.join_failures.fetch_add(1, Ordering::Relaxed);
            room_error(e)
        })?;
    let pid = snap.participant.id.clone();
    let leave = |reason| {
        svc.rooms.leave(&r, &pid, reason);
    };
    if let Err(e) = r.check_publish(&pid, false) {
        leave(LeaveReason::Left);
        return Err(room_error(e));
    }
    let (peer, mut peer_rx) = match svc.peers.create().await {
        Ok(p) => p,
        Err(e) => {
            svc.metrics.peer_failures.fetch_add(1, Ordering::Relaxed);
            leave(LeaveReason::Left);
            return Err(peer_error(e));
        }
    };
    let ufrag = ice_ufrag(&offer);
    let answered = match peer.answer(offer).await {
        Ok(_) => answer_complete(&peer, &mut peer_rx).await,
        Err(e) => Err(peer_error(e)),
    };
    let (answer, early) = match answered {
        Ok(a) => a,
        Err(e) => {
            peer.close().await;
            leave(LeaveReason::Left);
            return Err(e);
        }
    };
    svc.metrics.joins.fetch_add(1, Ordering::Relaxed);
    let session = new_session_id();
    let etag = format!("\"{}\"", &new_session_id()[..16]);
    info!(room = %r.name, participant = %pid, identity = %claims.sub,
        role = claims.role.as_str(), "WHIP publisher joined");
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    svc.whip.map.insert(
        session.clone(),
        Handle {
            room: room.to_string(),
            identity: claims.sub.clone(),
            kind: SessionKind::Whip,
            etag: etag.clone(),
            ice_ufrag: ufrag,
            cmd: cmd_tx,
        },
    );
    let task = WhipTask {
        svc: svc.clone(),
        session: session.clone(),
        room: r,
        pid: pid.clone(),
        claims,
        peer,
        published: HashMap::new(),
        stats: StatsRefresher::default(),
    };
    tokio::spawn(task.run(peer_rx, room_rx, cmd_rx, early));
    Ok(Created {
        session,
        answer,
        etag,
        participant_id: Some(pid),
    })
}

struct WhipTask {
    svc: Arc<Services>,
    session: String,
    room: Arc<crate::room::Room>,
    pid: String,
    claims: Claims,
    peer: Peer,
    published: HashMap<String, Published>,
    stats: StatsRefresher,
}

impl WhipTask {
    async fn run(
        mut self,
        mut peer_rx: mpsc::UnboundedReceiver<PeerEvent>,
        mut room_rx: crate::room::EventRx,
        mut cmd_rx: mpsc::UnboundedReceiver<Command>,
        early: Vec<PeerEvent>,
    ) {
        let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<String>();
        let mut shutdown = self.svc.shutdown.clone();
        let mut connected = false;
        let mut trickled = 0usize;
        // A publisher whose ICE never completes would hold a seat and a port until then.
        let connect_deadline = tokio::time::Instant::now() + self.svc.cfg.whip.connect_timeout;
        let mut reason = None;
        let mut stats_tick = tokio::time::interval(STATS_INTERVAL);
        stats_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for ev in early {
            if let Some(r) = self.on_peer_event(ev, &ended_tx, &mut connected) {
                reason = Some(r);
            }
        }
        while reason.is_none() {
            tokio::select! {
                c = cmd_rx.recv() => match c {
                    Some(Command::Candidates(cands, reply)) => {
                        let max = self.svc.cfg.signaling.max_candidates;
                        let _ = reply.send(
                            add_candidates(&self.peer, cands, &mut trickled, max).await,
                        );
                    }
                    Some(Command::Restart(r, reply)) => {
                        let (done, events) = restart_ice(
                            &self.svc, &self.session, &self.peer, &mut peer_rx, r, &mut trickled,
                        )
                        .await;
                        let _ = reply.send(done);
                        for ev in events {
                            if let Some(r) = self.on_peer_event(ev, &ended_tx, &mut connected) {
                                reason = Some(r);
                            }
                        }
                    }
                    Some(Command::End) | None => reason = Some(LeaveReason::Left),
                },
                ev = peer_rx.recv() => match ev {
                    Some(ev) => reason = self.on_peer_event(ev, &ended_tx, &mut connected),
                    None => reason = Some(LeaveReason::Disconnected),
                },
                ev = room_rx.recv() => match ev {
                    Some(RoomEvent::Removed(r)) => reason = Some(r),
                    // The seat is gone: a WHIP publisher has nothing else to do in the room.
                    Some(RoomEvent::Demoted) => reason = Some(LeaveReason::Kicked),
                    Some(_) => {}
                    None => reason = Some(LeaveReason::Left),
                },
                Some(track_id) = ended_rx.recv() => {
                    if let Some(p) = self.published.remove(&track_id) {
                        for t in p.tasks {
                            t.abort();
                        }
                        self.room.unpublish(&self.pid, &track_id);
                    }
                }
                _ = tokio::time::sleep_until(connect_deadline), if !connected => {
                    warn!(session = %self.session, "WHIP media connection never came up");
                    reason = Some(LeaveReason::Disconnected);
                }
                _ = stats_tick.tick() => self.refresh_stats().await,
                _ = shutdown.changed() => reason = Some(LeaveReason::ServerShutdown),
            }
        }
        self.teardown(reason.unwrap_or(LeaveReason::Left)).await;
    }

    fn on_peer_event(
        &mut self,
        ev: PeerEvent,
        ended_tx: &mpsc::UnboundedSender<String>,
        connected: &mut bool,
    ) -> Option<LeaveReason> {
        match ev {
            PeerEvent::Candidate(_) => None,
            PeerEvent::State(PeerState::Connected) => {
                *connected = true;
                None
            }
            PeerEvent::State(PeerState::Failed | PeerState::Closed) => {
                self.svc
                    .metrics
                    .ice_failures
                    .fetch_add(1, Ordering::Relaxed);
                warn!(session = %self.session, "WHIP media connection failed; participant leaves");
                Some(LeaveReason::Disconnected)
            }
            PeerEvent::State(_) => None,
            PeerEvent::Track(t) => {
                let track_id = new_track_id();
                let (router, kf_rx) = TrackRouter::with_layers(
                    track_id.clone(),
                    self.pid.clone(),
                    to_kind(t.kind),
                    t.codec.clone(),
                    t.layers.clone(),
                );
                if let Err(e) = self.room.publish(&self.pid, router.clone()) {
                    warn!(session = %self.session, "WHIP track not published: {e}");
                    return None;
                }
                info!(room = %self.room.name, participant = %self.pid, track = %track_id,
                    codec = %t.codec.mime_type, "WHIP track published");
                let done = ended_tx.clone();
                let tid = track_id.clone();
                let ssrc = t.ssrc;
                let tasks = publish_tasks(
                    t,
                    router.clone(),
                    kf_rx,
                    &self.svc,
                    self.room.clone(),
                    Box::new(move || {
                        let _ = done.send(tid);
                    }),
                );
                self.published.insert(
                    track_id,
                    Published {
                        router,
                        ssrc,
                        tasks,
                    },
                );
                auto_start_bridge(&self.svc, &self.room.name, self.claims.role);
                None
            }
        }
    }

    /// Bitrate, loss and round trip of the published tracks, and the connection's statistics
    /// in the room, like a WebSocket member's.
    async fn refresh_stats(&mut self) {
        let published: Vec<PublishedTrack<'_>> = self
            .published
            .iter()
            .map(|(id, p)| p.stats_view(id))
            .collect();
        self.stats
            .refresh(
                &self.room,
                &self.pid,
                Some(&self.peer),
                None,
                &published,
                &[],
            )
            .await;
    }

    async fn teardown(mut self, reason: LeaveReason) {
        self.svc.whip.map.remove(&self.session);
        info!(room = %self.room.name, participant = %self.pid, ?reason, "WHIP session ended");
        // The last one out ends the room, and the bridge follows (bridge::control).
        self.svc.rooms.leave(&self.room, &self.pid, reason);
        for (_, p) in self.published.drain() {
            p.router.close();
            for t in p.tasks {
                t.abort();
            }
        }
        self.peer.close().await;
    }
}

/// Add trickled candidates (`PATCH`) to a session's peer. The ICE agent keeps and pairs every
/// remote candidate it is given, so a session takes at most `signaling.max_candidates` of
/// them in all (the same cap as a WebSocket peer connection); beyond, the PATCH is refused.
async fn add_candidates(
    peer: &Peer,
    cands: Vec<IceCandidate>,
    added: &mut usize,
    max: usize,
) -> Result<(), WhipError> {
    if added.saturating_add(cands.len()) > max {
        return Err(WhipError::BadRequest(format!(
            "too many trickled candidates for this session (at most {max}, signaling.max_candidates)"
        )));
    }
    *added += cands.len();
    for c in cands {
        peer.add_candidate(c)
            .await
            .map_err(|e| WhipError::BadRequest(format!("candidate refused: {e}")))?;
    }
    Ok(())
}

/// Restart a session's ICE with the client's new credentials and candidates, in the session's
/// task (one command at a time), and answer with ours. Returns the peer events that arrived
/// while waiting for our candidates, for the task to handle as usual.
async fn restart_ice(
    svc: &Services,
    session: &str,
    peer: &Peer,
    peer_rx: &mut mpsc::UnboundedReceiver<PeerEvent>,
    r: Restart,
    trickled: &mut usize,
) -> (Result<Patched, WhipError>, Vec<PeerEvent>) {
    let started = tokio::time::Instant::now();
    let Some(etag) = svc.whip.map.get(session).map(|h| h.etag.clone()) else {
        return (
            Err(WhipError::NotFound("the session has ended".into())),
            vec![],
        );
    };
    if let Some(m) = &r.if_match
        && *m != etag
    {
        return (
            Err(WhipError::PreconditionFailed(format!(
                "If-Match {m} does not name this ICE session ({etag})"
            ))),
            vec![],
        );
    }
    let (Some(ufrag), Some(pwd)) = (r.frag.ufrag, r.frag.pwd) else {
        return (
            Err(WhipError::BadRequest(
                "an ICE restart needs a=ice-ufrag and a=ice-pwd".into(),
            )),
            vec![],
        );
    };
    // The new generation starts with no remote candidates: the cap counts from here.
    let max = svc.cfg.signaling.max_candidates;
    if r.frag.candidates.len() > max {
        return (
            Err(WhipError::BadRequest(format!(
                "too many candidates (at most {max}, signaling.max_candidates)"
            ))),
            vec![],
        );
    }
    *trickled = r.frag.candidates.len();
    if let Err(e) = peer
        .restart_ice_from_remote(&ufrag, &pwd, &r.frag.candidates)
        .await
    {
        warn!(%session, "ICE restart failed: {e}");
        let e = match e {
            PeerError::BadSdp(e) => WhipError::BadRequest(format!("ICE restart refused: {e}")),
            e => WhipError::Unavailable(format!("ICE restart failed: {e}")),
        };
        return (Err(e), vec![]);
    }
    // Our candidates of the new generation, all in the answer like a POST's.
    let (sdp, early) = match answer_complete(peer, peer_rx).await {
        Ok(x) => x,
        Err(e) => return (Err(e), vec![]),
    };
    let Some(frag) = answer_sdpfrag(&sdp) else {
        return (
            Err(WhipError::Unavailable(
                "no ICE credentials in our answer".into(),
            )),
            early,
        );
    };
    let etag = format!("\"{}\"", &new_session_id()[..16]);
    if let Some(mut h) = svc.whip.map.get_mut(session) {
        h.etag = etag.clone();
        h.ice_ufrag = Some(ufrag);
    }
    info!(%session, elapsed = ?started.elapsed(), "ICE restarted by PATCH");
    (Ok(Patched::Restarted { frag, etag }), early)
}

/// What a WHEP viewer asks for.
pub enum WhepSource {
    /// The room's mixed bridge output.
    Mix,
    /// One participant, by participant id or identity.
    Participant(String),
}

/// `POST /whep/{room}` and `POST /whep/{room}/{participant}`: receive the bridge's mixed
/// output or one participant's tracks. Any role of the room may watch.
pub async fn subscribe(
    svc: &Arc<Services>,
    room: &str,
    source: WhepSource,
    token: &str,
    offer: String,
) -> Result<Created, WhipError> {
    // In its own task, like `publish`: the answer's session must not be half made.
    let (svc, room, token) = (svc.clone(), room.to_string(), token.to_string());
    tokio::spawn(async move { subscribe_now(&svc, &room, source, &token, offer).await })
        .await
        .unwrap_or_else(|e| Err(WhipError::Unavailable(format!("subscribe failed: {e}"))))
}

async fn subscribe_now(
    svc: &Arc<Services>,
    room: &str,
    source: WhepSource,
    token: &str,
    offer: String,
) -> Result<Created, WhipError> {
    let claims = svc.auth.verify_for_room(token, room).map_err(auth_error)?;
    check_offer(&offer)?;
    let slot = svc
        .whip
        .admit_whep(&svc.cfg.whip, room, &claims.sub)
        .inspect_err(|e| {
            warn!(%room, identity = %claims.sub, "WHEP session refused: {e}");
        })?;
    let (stream_id, routers) = match source {
        WhepSource::Mix => {
            let Some(h) = svc.bridges.get(room) else {
                return Err(WhipError::NotFound(format!(
                    "no bridge is running for room {room:?} (start one with POST /v1/rooms/{room}/bridge)"
                )));
            };
            let (v, a) = h.bridge.rtp_tracks();
            (format!("{room}-mix"), vec![v, a])
        }
        WhepSource::Participant(who) => {
            let r = svc
                .rooms
                .get(room)
                .ok_or_else(|| WhipError::NotFound(format!("room {room:?} has nobody in it")))?;
            let p = r
                .participants()
                .into_iter()
                .find(|p| p.id == who || p.identity == who)
                .ok_or_else(|| {
                    WhipError::NotFound(format!("no participant {who:?} in room {room:?}"))
                })?;
            let routers: Vec<_> = r
                .tracks()
                .into_iter()
                .filter(|t| t.participant_id == p.id)
                .collect();
            if routers.is_empty() {
                return Err(WhipError::Conflict(format!(
                    "participant {who:?} publishes nothing yet"
                )));
            }
            (p.id, routers)
        }
    };
    let wanted = receiving_kinds(&offer);
    let routers: Vec<_> = routers
        .into_iter()
        .filter(|r| wanted.contains(&r.kind))
        .collect();
    if routers.is_empty() {
        return Err(WhipError::BadRequest(
            "the offer receives neither audio nor video (WHEP offers are recvonly)".into(),
        ));
    }
    // A viewer: it may not take the ports kept for publishers.
    let (peer, mut peer_rx) = svc.peers.create_for(PortUse::Viewer).await.map_err(|e| {
        svc.metrics.peer_failures.fetch_add(1, Ordering::Relaxed);
        warn!(%room, identity = %claims.sub, "WHEP session refused: {e}");
        peer_error(e)
    })?;
    let ufrag = ice_ufrag(&offer);
    let setup = async {
        peer.apply_offer(offer).await.map_err(peer_error)?;
        let mut locals = vec![];
        for r in &routers {
            let l = peer
                .add_local_track(&stream_id, &r.id, to_media_kind(r.kind), &r.codec)
                .await
                .map_err(peer_error)?;
            locals.push((Arc::new(l), r.clone()));
        }
        peer.create_answer().await.map_err(peer_error)?;
        let (answer, early) = answer_complete(&peer, &mut peer_rx).await?;
        Ok::<_, WhipError>((locals, answer, early))
    };
    let (locals, answer, early) = match setup.await {
        Ok(x) => x,
        Err(e) => {
            peer.close().await;
            return Err(e);
        }
    };
    let session = new_session_id();
    let etag = format!("\"{}\"", &new_session_id()[..16]);
    info!(%room, viewer = %claims.sub, stream = %stream_id, "WHEP viewer attached");
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    svc.whip.map.insert(
        session.clone(),
        Handle {
            room: room.to_string(),
            identity: claims.sub.clone(),
            kind: SessionKind::Whep,
            etag: etag.clone(),
            ice_ufrag: ufrag,
            cmd: cmd_tx,
        },
    );
    let queue = svc.cfg.webrtc.subscriber_queue;
    // One stream's tracks: no priorities between them.
    let downlink = DownlinkGroup::new(None);
    let tasks: Vec<JoinHandle<()>> = locals
        .iter()
        .flat_map(|(l, r)| forward_tasks(l, r, queue, Default::default(), &downlink).0)
        .collect();
    tokio::spawn(whep_run(
        svc.clone(),
        session.clone(),
        slot,
        peer,
        peer_rx,
        cmd_rx,
        locals,
        (tasks, downlink),
        early,
    ));
    Ok(Created {
        session,
        answer,
        etag,
        participant_id: None,
    })
}

#[allow(clippy::too_many_arguments)]
async fn whep_run(
    svc: Arc<Services>,
    session: String,
    slot: WhepSlot,
    peer: Peer,
    mut peer_rx: mpsc::UnboundedReceiver<PeerEvent>,
    mut cmd_rx: mpsc::UnboundedReceiver<Command>,
    locals: Vec<(Arc<LocalTrack>, Arc<TrackRouter>)>,
    // The forwarding tasks, and the downlink follower (ends when dropped, with the session).
    (tasks, _downlink): (Vec<JoinHandle<()>>, DownlinkGroup),
    early: Vec<PeerEvent>,
) {
    let mut shutdown = svc.shutdown.clone();
    let mut connected = false;
    let mut trickled = 0usize;
    // Reap a viewer whose ICE never completes: it would hold a port and a slot of the caps.
    let connect_deadline = tokio::time::Instant::now() + svc.cfg.whip.connect_timeout;
    let mut every = tokio::time::interval(Duration::from_millis(500));
    let mut pending: std::collections::VecDeque<PeerEvent> = early.into();
    let why = loop {
        let ev = match pending.pop_front() {
            Some(ev) => Some(ev),
            None => tokio::select! {
                c = cmd_rx.recv() => match c {
                    Some(Command::Candidates(cands, reply)) => {
                        let max = svc.cfg.signaling.max_candidates;
                        let _ = reply.send(add_candidates(&peer, cands, &mut trickled, max).await);
                        continue;
                    }
                    Some(Command::Restart(r, reply)) => {
                        let (done, events) =
                            restart_ice(&svc, &session, &peer, &mut peer_rx, r, &mut trickled)
                                .await;
                        let _ = reply.send(done);
                        pending.extend(events);
                        continue;
                    }
                    Some(Command::End) | None => break "deleted",
                },
                ev = peer_rx.recv() => match ev {
                    Some(ev) => Some(ev),
                    None => break "peer gone",
                },
                _ = every.tick() => {
                    // The tracks ended (participant left, bridge stopped): nothing more to show.
                    if locals.iter().all(|(_, r)| r.is_closed()) {
                        break "source ended";
                    }
                    None
                }
                _ = tokio::time::sleep_until(connect_deadline), if !connected => {
                    break "media connection never came up";
                }
                _ = shutdown.changed() => break "server shutting down",
            },
        };
        match ev {
            Some(PeerEvent::State(PeerState::Connected)) => {
                connected = true;
                // Start the viewer on a keyframe.
                for (_, r) in &locals {
                    r.request_keyframe();
                }
            }
            Some(PeerEvent::State(PeerState::Failed | PeerState::Closed)) => {
                break "media connection failed";
            }
            _ => {}
        }
    };
    svc.whip.map.remove(&session);
    if connected {
        debug!(%session, "WHEP session ended: {why}");
    } else {
        info!(%session, "WHEP session ended before its media connection came up: {why}");
    }
    for t in tasks {
        t.abort();
    }
    drop(locals);
    peer.close().await;
    // Counted until the port is given back (the lease goes with the peer).
    drop(peer);
    drop(slot);
}

/// Look a session up for DELETE / PATCH: `room` must match the URL it was created under, and
/// the token must be valid for the room and carry the session's identity (or be the room's
/// host's or an admin's).
fn lookup(
    svc: &Services,
    room: &str,
    session: &str,
    kind: SessionKind,
    token: &str,
) -> Result<(mpsc::UnboundedSender<Command>, String, Option<String>), WhipError> {
    let claims = svc.auth.verify_for_room(token, room).map_err(auth_error)?;
    match svc.whip.map.get(session) {
        Some(h) if h.room == room && h.kind == kind => {
            if h.identity != claims.sub && !matches!(claims.role, Role::Host | Role::Admin) {
                return Err(WhipError::Forbidden(
                    "the session belongs to another identity".into(),
                ));
            }
            Ok((h.cmd.clone(), h.etag.clone(), h.ice_ufrag.clone()))
        }
        _ => Err(WhipError::NotFound(format!("no such session {session:?}"))),
    }
}

/// `DELETE` on a session resource: end it (a WHIP participant leaves the room).
pub fn end(
    svc: &Services,
    room: &str,
    session: &str,
    kind: SessionKind,
    token: &str,
) -> Result<(), WhipError> {
    let (cmd, _, _) = lookup(svc, room, session, kind, token)?;
    // Gone from the map now, so a second DELETE is a 404 even before the task has finished.
    svc.whip.map.remove(session);
    let _ = cmd.send(Command::End);
    Ok(())
}

/// `PATCH` with an `application/trickle-ice-sdpfrag` body (RFC 9725 §4.3): the client's
/// trickled candidates, or, when it carries an `a=ice-ufrag` other than the session's, an ICE
/// restart (a client that changed networks), which must name the session's ETag or `*` in
/// `If-Match` (§4.3.2).
pub async fn patch(
    svc: &Services,
    room: &str,
    session: &str,
    kind: SessionKind,
    token: &str,
    if_match: Option<&str>,
    frag: &str,
) -> Result<Patched, WhipError> {
    let (cmd, etag, ufrag) = lookup(svc, room, session, kind, token)?;
    let if_match = if_match.map(str::trim);
    if let Some(m) = if_match
        && m != "*"
        && m != etag
    {
        return Err(WhipError::PreconditionFailed(format!(
            "If-Match {m} does not name this ICE session ({etag})"
        )));
    }
    let frag = parse_sdpfrag(frag)?;
    let ended = || WhipError::NotFound("the session has ended".into());
    if let (Some(new), Some(old)) = (&frag.ufrag, &ufrag)
        && new != old
    {
        let Some(m) = if_match else {
            return Err(WhipError::PreconditionRequired(
                "an ICE restart (a new a=ice-ufrag) needs If-Match: the session's ETag, or *"
                    .into(),
            ));
        };
        let restart = Restart {
            if_match: (m != "*").then(|| m.to_string()),
            frag,
        };
        let (tx, rx) = oneshot::channel();
        cmd.send(Command::Restart(restart, tx))
            .map_err(|_| ended())?;
        return rx.await.map_err(|_| ended())?;
    }
    let (tx, rx) = oneshot::channel();
    cmd.send(Command::Candidates(frag.candidates, tx))
        .map_err(|_| ended())?;
    rx.await.map_err(|_| ended())??;
    Ok(Patched::Trickled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdpfrag_candidates_take_mid_and_ufrag() {
        let frag = "a=ice-ufrag:EsAw\r\na=ice-pwd:P2uYro0UCOQ4zxjKXaWCBui1\r\n\
                    m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n\
                    a=candidate:1387637174 1 udp 2122260223 127.0.0.1 61764 typ host generation 0\r\n\
                    a=end-of-candidates\r\n";
        let f = parse_sdpfrag(frag).unwrap();
        assert_eq!(f.ufrag.as_deref(), Some("EsAw"));
        assert_eq!(f.pwd.as_deref(), Some("P2uYro0UCOQ4zxjKXaWCBui1"));
        let c = f.candidates;
        assert_eq!(c.len(), 1);
        assert!(c[0].candidate.starts_with("candidate:1387637174 1 udp"));
        assert_eq!(c[0].sdp_mid.as_deref(), Some("0"));
        assert_eq!(c[0].username_fragment.as_deref(), Some("EsAw"));
        assert!(parse_sdpfrag("a=candidate:1 1 udp\r\n").is_err());
        assert!(parse_sdpfrag("hello world").is_err());
        // Credentials go back into an SDP: only RFC 8839's characters and lengths.
        assert!(parse_sdpfrag("a=ice-ufrag:abc\r\n").is_err());
        assert!(parse_sdpfrag("a=ice-ufrag:ab cd\r\n").is_err());
        assert!(parse_sdpfrag("a=ice-pwd:short\r\n").is_err());
        assert!(parse_sdpfrag("a=ice-pwd:P2uYro0UCOQ4zxjKXaWCBui1\rx\r\n").is_err());
        let cr = "a=candidate:1 1 udp 1 10.0.0.1 9 typ host\ra=x:y\r\n";
        assert!(parse_sdpfrag(cr).is_err());
    }

    #[test]
    fn restart_answer_fragment_has_credentials_group_and_candidates() {
        let answer = "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\na=group:BUNDLE 0 1\r\n\
                      m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\n\
                      a=ice-ufrag:srvU\r\na=ice-pwd:srvPwdsrvPwdsrvPwdsrvPwd\r\na=mid:0\r\n\
                      a=rtpmap:111 opus/48000/2\r\n\
                      a=candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host\r\n\
                      a=end-of-candidates\r\n\
                      m=video 9 UDP/TLS/RTP/SAVPF 125\r\na=ice-ufrag:srvU\r\n\
                      a=ice-pwd:srvPwdsrvPwdsrvPwdsrvPwd\r\na=mid:1\r\n";
        let frag = answer_sdpfrag(answer).unwrap();
        assert_eq!(
            frag,
            "a=ice-ufrag:srvU\r\na=ice-pwd:srvPwdsrvPwdsrvPwdsrvPwd\r\na=group:BUNDLE 0 1\r\n\
             m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n\
             a=candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host\r\n\
             a=end-of-candidates\r\nm=video 9 UDP/TLS/RTP/SAVPF 125\r\na=mid:1\r\n"
        );
        // It reads back as a fragment with those credentials and the candidate under mid 0.
        let back = parse_sdpfrag(&frag).unwrap();
        assert_eq!(back.ufrag.as_deref(), Some("srvU"));
        assert_eq!(back.candidates.len(), 1);
        assert_eq!(back.candidates[0].sdp_mid.as_deref(), Some("0"));
        assert_eq!(answer_sdpfrag("v=0\r\nm=audio 9 X 111\r\n"), None);
    }

    #[test]
    fn offers_are_checked_before_any_peer_is_built() {
        assert!(check_offer("garbage").is_err());
        assert!(check_offer("v=0\r\ns=-\r\n").is_err());
        assert!(check_offer("v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n").is_ok());
        let whep = "v=0\r\nm=audio 9 X 111\r\na=recvonly\r\nm=video 9 X 96\r\na=sendonly\r\n\
                    m=video 0 X 96\r\na=recvonly\r\n";
        assert_eq!(receiving_kinds(whep), vec![Kind::Audio]);
    }
}
