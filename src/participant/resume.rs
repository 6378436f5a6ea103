//! Session resume: a participant that joined with `resumable` outlives its WebSocket for
//! `signaling.resume_grace`, and a new connection that sends `resume` with the participant's
//! token takes it over (the room sees neither a leave nor a join, the peer connections, seat,
//! tracks and subscriptions stay). This is what a phone moving between Wi-Fi and cellular
//! needs: its TCP connection dies with the old address, its peer connections survive an ICE
//! restart.
//!
//! How the takeover works: every resumable participant's driver registers its token secret
//! and a one-slot channel in [`Resumable`] (keyed by participant id). The new connection's
//! driver checks the secret, asks the old driver over that channel, and the old driver,
//! between two events of its loop, hands its whole self over (peer connections, room
//! membership, tasks' channels) and exits; the new driver adopts that state and keeps its own
//! WebSocket, session (rate limits, ping timers) and outbox. Nothing is copied or re-created,
//! and there is one owner of a participant at every moment.
//!
//! While detached (no WebSocket), the driver goes on handling room and peer events: what it
//! would send is dropped, subscription changes accumulate and go out as one offer after the
//! resume, which answers with a fresh snapshot of the room (like a join result).

use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info};

use super::{Driver, Joined, WsOut, outbox};
use crate::signaling::protocol::{ErrorCode, LeaveReason, RequestId, ResponseResult, close_code};

/// Resumable participants by id: the token secret and the way to reach the owning driver.
/// One entry per resumable participant in the server (removed when it leaves).
pub type Resumable = dashmap::DashMap<String, ResumeEntry>;

pub struct ResumeEntry {
    /// The room, so a connection pinned to a room (`/ws?room=`) cannot take over another.
    room: String,
    secret: String,
    tx: mpsc::Sender<Takeover>,
}

/// A takeover request: the old driver sends itself back through it.
pub(super) type Takeover = oneshot::Sender<Box<Driver>>;

/// How long a new connection waits for the old driver to hand over (it is between two events
/// of its loop, so this is short unless it is stuck).
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(3);

fn new_secret() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compare without returning early at the first difference (the secret is a credential).
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Driver {
    /// Register a just-joined (or just-resumed) participant as resumable; returns its token.
    /// `None` when resuming is off (`signaling.resume_grace` = 0).
    pub(super) fn make_resumable(&mut self) -> Option<String> {
        if self.svc.cfg.signaling.resume_grace.is_zero() {
            return None;
        }
        let j = self.joined.as_mut()?;
        let secret = new_secret();
        let token = format!("{}.{}", j.pid, secret);
        let tx = match &self.takeover_tx {
            Some(tx) => tx.clone(),
            None => {
                let (tx, rx) = mpsc::channel(1);
                self.takeover_rx = Some(rx);
                self.takeover_tx = Some(tx.clone());
                tx
            }
        };
        self.svc.resumable.insert(
            j.pid.clone(),
            ResumeEntry {
                room: j.room.name.clone(),
                secret: secret.clone(),
                tx,
            },
        );
        j.resume_secret = Some(secret);
        Some(token)
    }

    /// Forget the participant's token (it leaves).
    pub(super) fn forget_resumable(&self, j: &Joined) {
        if let Some(secret) = &j.resume_secret {
            self.svc
                .resumable
                .remove_if(&j.pid, |_, e| same(&e.secret, secret));
        }
    }

    /// Whether a lost connection keeps the participant (detaches) instead of ending it.
    pub(super) fn can_detach(&self) -> bool {
        self.ending.is_none()
            && self.detached_until.is_none()
            && self
                .joined
                .as_ref()
                .is_some_and(|j| j.resume_secret.is_some())
    }

    pub(super) fn is_detached(&self) -> bool {
        self.detached_until.is_some()
    }

    /// The client's connection is gone or unresponsive: a resumable participant is kept for
    /// `resume_grace`, any other one leaves.
    pub(super) fn connection_lost(&mut self, otherwise: LeaveReason) {
        if self.can_detach() {
            self.detach();
        } else if self.ending.is_none() {
            self.ending = Some(otherwise);
        }
    }

    /// Let go of the WebSocket and keep the participant for the grace period.
    fn detach(&mut self) {
        let grace = self.svc.cfg.signaling.resume_grace;
        // The WebSocket task notices its input is gone and ends; the writer sends what is
        // queued (a close frame, if any) and ends when the old outbox is dropped here.
        self.inbound = None;
        let (dead, rx) = outbox(1, 1, self.svc.metrics.clone());
        drop(rx);
        drop(std::mem::replace(&mut self.out, dead));
        self.detached_until = Some(Instant::now() + grace);
        self.svc
            .metrics
            .resume_detached
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(j) = &self.joined {
            info!(room = %j.room.name, participant = %j.pid, grace_s = grace.as_secs(),
                "connection lost; participant kept for resume");
        }
    }

    /// The grace period ran out without a resume: the participant leaves now.
    pub(super) fn check_detached_expiry(&mut self) {
        if self
            .detached_until
            .is_some_and(|until| Instant::now() >= until)
        {
            self.detached_until = None;
            if let Some(j) = &self.joined {
                info!(room = %j.room.name, participant = %j.pid, "not resumed in time; leaving");
            }
            self.ending = Some(LeaveReason::Disconnected);
        }
    }

    /// A new connection asked for this participant: stop the loop and hand over (see `run`).
    pub(super) fn on_takeover(&mut self, t: Takeover) {
        if self.takeover.is_none() {
            self.takeover = Some(t);
        }
    }

    /// Hand this driver over to the connection that asked (called once the loop stopped).
    /// Returns the driver back if the asker is gone (it gave up waiting).
    pub(super) fn hand_over(mut self, to: Takeover) -> Result<(), Box<Driver>> {
        if !self.is_detached() {
            self.out.push(WsOut::Close(
                close_code::RESUMED_ELSEWHERE,
                "resumed on another connection".into(),
            ));
        }
        self.detached_until = None;
        to.send(Box::new(self))
    }

    /// `resume`: take over the participant behind `token`.
    pub(super) async fn resume(
        &mut self,
        id: Option<RequestId>,
        token: String,
        last_message_id: Option<u64>,
    ) {
        let old = match self.take_over(&token).await {
            Ok(old) => old,
            Err(why) => {
                debug!("resume refused: {why}");
                self.session.resume_refused();
                self.error(
                    id,
                    ErrorCode::ResumeFailed,
                    format!("cannot resume: {why}; join again"),
                )
                .await;
                return;
            }
        };
        self.adopt(*old);
        self.session.admitted();
        let token = self.make_resumable();
        let Some(j) = self.joined.as_ref() else {
            return;
        };
        let room = j.room.clone();
        let Some(snap) = room.snapshot(&j.pid) else {
            // Removed from the room in the meantime: the room event that says so is queued.
            return;
        };
        info!(room = %room.name, participant = %j.pid, "resumed");
        self.svc
            .metrics
            .resumes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut result = self.join_result(&room, snap.participant, snap.others);
        result.history = room.messages_since(last_message_id.unwrap_or(0));
        result.resume_token = token;
        result.resumed = true;
        self.reply(id, ResponseResult::Joined(Box::new(result)))
            .await;
        self.out.push(WsOut::Follow(snap.feed));
        self.after_resume().await;
    }

    async fn take_over(&mut self, token: &str) -> Result<Box<Driver>, &'static str> {
        let (pid, secret) = token.split_once('.').ok_or("malformed token")?;
        let tx = {
            let e = self.svc.resumable.get(pid).ok_or("unknown or used token")?;
            if !same(&e.secret, secret) {
                return Err("unknown or used token");
            }
            if self.session.url_room().is_some_and(|r| r != e.room) {
                return Err("the token is for another room");
            }
            e.tx.clone()
        };
        let (reply, answer) = oneshot::channel();
        tx.try_send(reply)
            .map_err(|_| "the participant is being resumed or is leaving")?;
        match tokio::time::timeout(HANDOVER_TIMEOUT, answer).await {
            Ok(Ok(old)) => Ok(old),
            Ok(Err(_)) => Err("the participant left"),
            Err(_) => Err("the old connection did not hand over in time"),
        }
    }

    /// Take the participant's state from the old driver; keep this connection's WebSocket,
    /// session and outbox. What the old driver keeps (its outbox) is dropped with it, which
    /// ends its WebSocket.
    fn adopt(&mut self, mut old: Driver) {
        std::mem::swap(&mut self.joined, &mut old.joined);
        self.room_rx = old.room_rx.take();
        self.pub_rx = old.pub_rx.take();
        self.sub_rx = old.sub_rx.take();
        // Helper tasks hold the old internal sender: keep the pair.
        std::mem::swap(&mut self.internal_tx, &mut old.internal_tx);
        std::mem::swap(&mut self.internal_rx, &mut old.internal_rx);
        self.stats = std::mem::take(&mut old.stats);
        self.stats_at = old.stats_at;
        self.takeover_rx = old.takeover_rx.take();
        self.takeover_tx = old.takeover_tx.take();
    }

    /// After a resume: the offer the client may have missed goes out again (the same id:
    /// a client that already answered it answers again), or the changes made while detached
    /// go out as one new offer.
    async fn after_resume(&mut self) {
        let answer_timeout = self.svc.cfg.signaling.answer_timeout;
        let Some(j) = self.joined.as_mut() else {
            return;
        };
        if let Some((offer_id, _)) = j.negotiating
            && let Some(peer) = j.subscriber.as_ref()
            && let Some(sdp) = peer.local_sdp().await
        {
            j.negotiating = Some((offer_id, Instant::now() + answer_timeout));
            self.send(crate::signaling::protocol::ServerMessage::Offer { offer_id, sdp })
                .await;
            return;
        }
        self.maybe_offer().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_in_full_and_differ() {
        let a = new_secret();
        let b = new_secret();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(same(&a, &a.clone()));
        assert!(!same(&a, &b));
        assert!(!same(&a, &a[..31]));
    }
}
