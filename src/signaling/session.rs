//! The per-connection signaling state machine, sans-IO: it takes what arrived and the current
//! time and returns what to do. It owns message size limits, parsing, rate limiting, the join
//! handshake (token checks) and keepalive timing; it knows nothing about rooms or media, which
//! the connection driver handles when it gets a [`Action::Dispatch`].

use std::time::{Duration, Instant};

use super::protocol::{
    ClientEnvelope, ClientMessage, ErrorCode, PROTOCOL_VERSION, RequestId, ServerMessage,
    close_code,
};
use crate::auth::{AuthError, Authenticator, Claims};
use crate::config::SignalingConfig;

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send this message to the client.
    Send(ServerMessage),
    /// Send a WebSocket-level ping.
    Ping,
    /// The token checked out: put the participant in the room and answer `id` (the driver
    /// decides whether the room has space).
    Join {
        id: Option<RequestId>,
        claims: Claims,
        /// The client asked for a resume token (see `ClientMessage::Join`).
        resumable: bool,
    },
    /// Take over a participant with this resume token (the driver checks it and answers,
    /// then calls [`Session::admitted`] or [`Session::resume_refused`]).
    Resume {
        id: Option<RequestId>,
        token: String,
        last_message_id: Option<u64>,
    },
    /// A request for the room/media layer.
    Dispatch {
        id: Option<RequestId>,
        msg: ClientMessage,
    },
    /// Close the WebSocket with this code; the participant (if any) has left.
    Close { code: u16, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitingJoin,
    /// Join was dispatched; waiting for the driver to admit or refuse.
    Joining,
    Joined,
    Closed,
}

/// A token bucket: `rate` tokens per second, holding at most `burst`.
#[derive(Debug, Clone)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32, now: Instant) -> Self {
        Self::with_burst(rate, u64::from(rate.max(1)) * 2, now)
    }

    fn with_burst(rate: u32, burst: u64, now: Instant) -> Self {
        let rate = f64::from(rate.max(1));
        let burst = (burst as f64).max(rate);
        Self {
            rate,
            burst,
            tokens: burst,
            at: now,
        }
    }
    fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub struct Session {
    cfg: SignalingConfig,
    auth: Authenticator,
    /// The room named in the URL (`/ws?room=...`), if any; the token must match it.
    url_room: Option<String>,
    state: State,
    started: Instant,
    last_rx: Instant,
    last_ping: Instant,
    bucket: Bucket,
    /// Trickled candidates: a bucket of their own, which holds every candidate both peer
    /// connections may take (2 x `max_candidates`) and refills at `rate_limit_per_sec`. A phone
    /// trickles tens of them in a burst, right when its `publish` and `answer` go out; they
    /// neither wait for tokens nor use up the ones of other messages. The per-connection
    /// `max_candidates` is enforced by the driver.
    candidate_bucket: Bucket,
    /// Consecutive rate-limited messages; a client that keeps flooding is disconnected.
    limited_in_a_row: u32,
}

impl Session {
    pub fn new(
        cfg: SignalingConfig,
        auth: Authenticator,
        url_room: Option<String>,
        now: Instant,
    ) -> Self {
        let bucket = Bucket::new(cfg.rate_limit_per_sec, now);
        let candidate_bucket = Bucket::with_burst(
            cfg.rate_limit_per_sec,
            (cfg.max_candidates as u64).saturating_mul(2),
            now,
        );
        Self {
            cfg,
            auth,
            url_room,
            state: State::AwaitingJoin,
            started: now,
            last_rx: now,
            last_ping: now,
            bucket,
            candidate_bucket,
            limited_in_a_row: 0,
        }
    }

    pub fn is_joined(&self) -> bool {
        self.state == State::Joined
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Any frame (text, binary, ping, pong) proves the client is alive.
    pub fn on_activity(&mut self, now: Instant) {
        self.last_rx = now;
    }

    /// A binary frame: the protocol is text only.
    pub fn on_binary(&mut self, now: Instant, len: usize) -> Vec<Action> {
        self.on_activity(now);
        if len > self.cfg.max_message_bytes {
            return vec![Action::Send(too_large(
                None,
                len,
                self.cfg.max_message_bytes,
            ))];
        }
        vec![Action::Send(ServerMessage::error(
            None,
            ErrorCode::BadRequest,
            "binary frames are not part of the protocol; send JSON text",
        ))]
    }

    /// A text frame over `max_message_bytes`, already dropped by the transport, which kept
    /// only its length and request id.
    pub fn on_too_large(&mut self, now: Instant, len: usize, id: Option<RequestId>) -> Vec<Action> {
        self.on_activity(now);
        if self.state == State::Closed {
            return vec![];
        }
        vec![Action::Send(too_large(id, len, self.cfg.max_message_bytes))]
    }

    pub fn on_text(&mut self, now: Instant, text: &str) -> Vec<Action> {
        self.on_activity(now);
        if self.state == State::Closed {
            return vec![];
        }
        if text.len() > self.cfg.max_message_bytes {
            return vec![Action::Send(too_large(
                request_id_of(text),
                text.len(),
                self.cfg.max_message_bytes,
            ))];
        }
        // Parsed first: the message type picks the bucket (the text is within
        // `max_message_bytes`, and a rate-limited message was parsed for its id before too).
        let parsed = serde_json::from_str::<ClientEnvelope>(text);
        let bucket = match &parsed {
            Ok(ClientEnvelope {
                msg: ClientMessage::Candidate { .. },
                ..
            }) => &mut self.candidate_bucket,
            _ => &mut self.bucket,
        };
        if !bucket.take(now) {
            self.limited_in_a_row += 1;
            if self.limited_in_a_row > self.cfg.rate_limit_per_sec.max(1) * 4 {
                return self.close(close_code::RATE_LIMITED, "rate limit exceeded repeatedly");
            }
            let id = match &parsed {
                Ok(env) => env.id.clone(),
                Err(_) => request_id_of(text),
            };
            return vec![Action::Send(ServerMessage::error(
                id,
                ErrorCode::RateLimited,
                format!(
                    "more than {} messages per second",
                    self.cfg.rate_limit_per_sec
                ),
            ))];
        }
        self.limited_in_a_row = 0;
        let env: ClientEnvelope = match parsed {
            Ok(e) => e,
            Err(e) => return vec![Action::Send(parse_error(text, &e))],
        };
        let ClientEnvelope { id, msg } = env;
        match (self.state, msg) {
            (_, ClientMessage::Ping) => vec![Action::Send(ServerMessage::Response {
                id,
                result: super::protocol::ResponseResult::Pong {
                    server_time_ms: unix_ms(),
                },
            })],
            (
                State::AwaitingJoin,
                ClientMessage::Join {
                    token,
                    room,
                    version,
                    resumable,
                },
            ) => self.on_join(id, &token, room, version, resumable),
            (
                State::AwaitingJoin,
                ClientMessage::Resume {
                    token,
                    last_message_id,
                },
            ) => {
                self.state = State::Joining;
                vec![Action::Resume {
                    id,
                    token,
                    last_message_id,
                }]
            }
            (State::AwaitingJoin, other) | (State::Joining, other) => {
                vec![Action::Send(ServerMessage::error(
                    id,
                    ErrorCode::NotJoined,
                    format!("send join before {}", other.name()),
                ))]
            }
            (State::Joined, ClientMessage::Join { .. } | ClientMessage::Resume { .. }) => {
                vec![Action::Send(ServerMessage::error(
                    id,
                    ErrorCode::AlreadyJoined,
                    "already joined",
                ))]
            }
            (State::Joined, ClientMessage::Leave) => {
                let mut out = vec![Action::Send(ServerMessage::Response {
                    id,
                    result: super::protocol::ResponseResult::Empty {},
                })];
                out.extend(self.close(close_code::NORMAL, "left"));
                out
            }
            (State::Joined, msg) => vec![Action::Dispatch { id, msg }],
            (State::Closed, _) => vec![],
        }
    }

    fn on_join(
        &mut self,
        id: Option<RequestId>,
        token: &str,
        room: Option<String>,
        version: Option<u32>,
        resumable: bool,
    ) -> Vec<Action> {
        if let Some(v) = version
            && v != PROTOCOL_VERSION
        {
            return vec![Action::Send(ServerMessage::error(
                id,
                ErrorCode::UnsupportedVersion,
                format!("this server speaks protocol version {PROTOCOL_VERSION}, not {v}"),
            ))];
        }
        let claims = match self.auth.verify(token) {
            Ok(c) => c,
            Err(e) => return self.refuse(id, &e),
        };
        let url_room = self.url_room.clone();
        for wanted in [room.as_deref(), url_room.as_deref()].into_iter().flatten() {
            if wanted != claims.room {
                return self.refuse(id, &AuthError::WrongRoom);
            }
        }
        if claims.role == crate::auth::Role::Admin && claims.room == "*" {
            let mut out = vec![Action::Send(ServerMessage::error(
                id,
                ErrorCode::Forbidden,
                "a wildcard admin token cannot join a room; mint one for the room",
            ))];
            out.extend(self.close(close_code::WRONG_ROOM, "forbidden"));
            return out;
        }
        self.state = State::Joining;
        vec![Action::Join {
            id,
            claims,
            resumable,
        }]
    }

    fn refuse(&mut self, id: Option<RequestId>, e: &AuthError) -> Vec<Action> {
        let (code, close) = match e {
            AuthError::Expired => (ErrorCode::TokenExpired, close_code::TOKEN_EXPIRED),
            AuthError::WrongRoom => (ErrorCode::WrongRoom, close_code::WRONG_ROOM),
            AuthError::Invalid(_) | AuthError::BadGrant(_) => {
                (ErrorCode::InvalidToken, close_code::INVALID_TOKEN)
            }
        };
        let mut out = vec![Action::Send(ServerMessage::error(id, code, e.to_string()))];
        out.extend(self.close(close, e.code()));
        out
    }

    /// The driver admitted the participant.
    pub fn admitted(&mut self) {
        if self.state == State::Joining {
            self.state = State::Joined;
        }
    }

    /// The driver could not resume (unknown or used token): the connection stays open for a
    /// `join` (or another `resume`) within the join deadline.
    pub fn resume_refused(&mut self) {
        if self.state == State::Joining {
            self.state = State::AwaitingJoin;
        }
    }

    /// The room a `?room=` in the WebSocket URL pins this connection to.
    pub fn url_room(&self) -> Option<&str> {
        self.url_room.as_deref()
    }

    /// The driver refused the join (room full, ...): tell the client and close.
    pub fn refused(
        &mut self,
        id: Option<RequestId>,
        code: ErrorCode,
        message: &str,
        close: u16,
    ) -> Vec<Action> {
        let mut out = vec![Action::Send(ServerMessage::error(id, code, message))];
        out.extend(self.close(close, message));
        out
    }

    /// Timers: join deadline, pings, dead connection detection.
    pub fn on_tick(&mut self, now: Instant) -> Vec<Action> {
        match self.state {
            State::Closed => vec![],
            State::AwaitingJoin
                if now.saturating_duration_since(self.started) >= self.cfg.join_timeout =>
            {
                let mut out = vec![Action::Send(ServerMessage::error(
                    None,
                    ErrorCode::Timeout,
                    "no join received in time",
                ))];
                out.extend(self.close(close_code::JOIN_TIMEOUT, "join timeout"));
                out
            }
            _ if now.saturating_duration_since(self.last_rx) >= self.cfg.dead_after => {
                self.close(close_code::DEAD, "connection timed out")
            }
            _ if now.saturating_duration_since(self.last_ping) >= self.cfg.ping_interval => {
                self.last_ping = now;
                vec![Action::Ping]
            }
            _ => vec![],
        }
    }

    /// When the driver should call [`Session::on_tick`] next.
    pub fn next_tick(&self) -> Instant {
        let ping = self.last_ping + self.cfg.ping_interval;
        let dead = self.last_rx + self.cfg.dead_after;
        let join = if self.state == State::AwaitingJoin {
            self.started + self.cfg.join_timeout
        } else {
            dead
        };
        ping.min(dead).min(join)
    }

    pub fn close(&mut self, code: u16, reason: &str) -> Vec<Action> {
        if self.state == State::Closed {
            return vec![];
        }
        self.state = State::Closed;
        vec![
            Action::Send(ServerMessage::Closing {
                code,
                reason: reason.into(),
            }),
            Action::Close {
                code,
                reason: reason.into(),
            },
        ]
    }
}

fn too_large(id: Option<RequestId>, len: usize, max: usize) -> ServerMessage {
    ServerMessage::error(
        id,
        ErrorCode::MessageTooLarge,
        format!("message of {len} bytes exceeds the limit of {max} bytes"),
    )
}

/// Best effort: recover the request id of a message that failed to parse as a whole, so the
/// client can match the error to its request.
pub fn request_id_of(text: &str) -> Option<RequestId> {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        id: Option<RequestId>,
    }
    serde_json::from_str::<IdOnly>(text).ok().and_then(|v| v.id)
}

fn parse_error(text: &str, e: &serde_json::Error) -> ServerMessage {
    #[derive(serde::Deserialize)]
    struct TypeOnly {
        #[serde(rename = "type")]
        ty: Option<serde_json::Value>,
    }
    let id = request_id_of(text);
    match serde_json::from_str::<TypeOnly>(text) {
        Err(_) => ServerMessage::error(id, ErrorCode::BadRequest, format!("invalid JSON: {e}")),
        Ok(TypeOnly { ty: None }) => {
            ServerMessage::error(id, ErrorCode::BadRequest, "missing \"type\"")
        }
        Ok(TypeOnly { ty: Some(t) }) => {
            let known = [
                "join",
                "resume",
                "restart_ice",
                "publish",
                "unpublish",
                "subscribe",
                "unsubscribe",
                "pause_media",
                "resume_media",
                "answer",
                "candidate",
                "request_keyframe",
                "set_track_quality",
                "start_bridge",
                "set_layout",
                "stop_bridge",
                "start_recording",
                "stop_recording",
                "request_cohost",
                "cancel_cohost_request",
                "answer_cohost_request",
                "invite_cohost",
                "answer_cohost_invite",
                "remove_cohost",
                "leave_seat",
                "mute_track",
                "kick",
                "chat",
                "like",
                "gift",
                "delete_message",
                "mute_chat",
                "pk_invite",
                "pk_answer",
                "pk_end",
                "ping",
                "leave",
            ];
            match t.as_str() {
                Some(name) if known.contains(&name) => ServerMessage::error(
                    id,
                    ErrorCode::BadRequest,
                    format!("invalid {name} message: {e}"),
                ),
                _ => ServerMessage::error(
                    id,
                    ErrorCode::UnknownType,
                    format!("unknown message type {t}"),
                ),
            }
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Interval at which a driver with nothing else to do should look at the timers.
pub const MAX_TICK: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;
    use crate::config::{AuthConfig, SignalingConfig};

    fn session(now: Instant) -> (Session, Authenticator) {
        let auth = Authenticator::new(&AuthConfig::default()).unwrap();
        (
            Session::new(SignalingConfig::default(), auth.clone(), None, now),
            auth,
        )
    }

    fn codes(actions: &[Action]) -> Vec<ErrorCode> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(ServerMessage::Error { error, .. }) => Some(error.code),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn requests_before_join_are_refused() {
        let now = Instant::now();
        let (mut s, _) = session(now);
        let out = s.on_text(now, r#"{"id":1,"type":"publish","sdp":"x"}"#);
        assert_eq!(codes(&out), vec![ErrorCode::NotJoined]);
    }

    #[test]
    fn join_with_valid_token_dispatches() {
        let now = Instant::now();
        let (mut s, auth) = session(now);
        let t = auth.mint("r", "a", Role::Host, None).unwrap();
        let out = s.on_text(now, &format!(r#"{{"id":1,"type":"join","token":"{t}"}}"#));
        assert!(matches!(&out[..], [Action::Join { claims, .. }] if claims.sub == "a"));
        s.admitted();
        assert!(s.is_joined());
        let out = s.on_text(now, r#"{"id":2,"type":"publish","sdp":"v=0"}"#);
        assert!(matches!(&out[..], [Action::Dispatch { .. }]));
    }

    #[test]
    fn bad_token_closes_with_code() {
        let now = Instant::now();
        let (mut s, _) = session(now);
        let out = s.on_text(now, r#"{"id":1,"type":"join","token":"nope"}"#);
        assert_eq!(codes(&out), vec![ErrorCode::InvalidToken]);
        assert!(out.iter().any(
            |a| matches!(a, Action::Close { code, .. } if *code == close_code::INVALID_TOKEN)
        ));
        assert!(s.is_closed());
    }

    #[test]
    fn malformed_oversized_and_unknown_messages_get_errors() {
        let now = Instant::now();
        let (mut s, _) = session(now);
        assert_eq!(
            codes(&s.on_text(now, "{not json")),
            vec![ErrorCode::BadRequest]
        );
        assert_eq!(
            codes(&s.on_text(now, r#"{"id":"x","type":"dance"}"#)),
            vec![ErrorCode::UnknownType]
        );
        let big = format!(r#"{{"type":"ping","pad":"{}"}}"#, "a".repeat(70_000));
        assert_eq!(
            codes(&s.on_text(now, &big)),
            vec![ErrorCode::MessageTooLarge]
        );
        assert!(!s.is_closed());
    }

    #[test]
    fn flooding_is_rate_limited() {
        let now = Instant::now();
        let (mut s, _) = session(now);
        let mut limited = 0;
        for _ in 0..150 {
            limited += codes(&s.on_text(now, r#"{"type":"ping"}"#))
                .iter()
                .filter(|c| **c == ErrorCode::RateLimited)
                .count();
        }
        assert_eq!(limited, 50, "burst is 2x rate = 100");
    }

    #[test]
    fn candidates_have_their_own_allowance() {
        let now = Instant::now();
        let (mut s, auth) = session(now);
        let t = auth.mint("r", "a", Role::Host, None).unwrap();
        s.on_text(now, &format!(r#"{{"type":"join","token":"{t}"}}"#));
        s.admitted();
        let cand = r#"{"type":"candidate","target":"publisher","candidate":{"candidate":"candidate:1 1 udp 1 10.0.0.1 9 typ host","sdpMid":"0","sdpMLineIndex":0}}"#;
        // Both connections' worth of candidates at once, then a full burst of other messages:
        // nothing is limited.
        for _ in 0..200 {
            assert!(matches!(
                &s.on_text(now, cand)[..],
                [Action::Dispatch { .. }]
            ));
        }
        for _ in 0..99 {
            assert!(codes(&s.on_text(now, r#"{"type":"ping"}"#)).is_empty());
        }
        // Beyond its allowance a candidate is limited like anything else.
        assert_eq!(codes(&s.on_text(now, cand)), vec![ErrorCode::RateLimited]);
        let later = now + Duration::from_secs(1);
        assert!(matches!(
            &s.on_text(later, cand)[..],
            [Action::Dispatch { .. }]
        ));
    }

    #[test]
    fn random_and_mutated_input_never_panics() {
        let now = Instant::now();
        let (mut s, auth) = session(now);
        let t = auth.mint("r", "a", Role::Host, None).unwrap();
        let seeds = [
            format!(r#"{{"id":1,"type":"join","token":"{t}"}}"#),
            r#"{"id":"x","type":"publish","sdp":"v=0"}"#.to_string(),
            r#"{"type":"candidate","target":"publisher","candidate":{"candidate":"c","sdpMid":"0","sdpMLineIndex":0}}"#.to_string(),
            r#"{"type":"answer","offer_id":1,"sdp":"v=0"}"#.to_string(),
        ];
        let mut rng_state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng_state ^= rng_state << 13;
            rng_state ^= rng_state >> 7;
            rng_state ^= rng_state << 17;
            rng_state
        };
        for i in 0..20_000u64 {
            let mut bytes = seeds[(next() % 4) as usize].clone().into_bytes();
            for _ in 0..(next() % 6) {
                let pos = (next() as usize) % bytes.len().max(1);
                let last = bytes.len() - 1;
                let b = next() as u8;
                match next() % 3 {
                    0 => bytes[pos.min(last)] = b,
                    1 => bytes.insert(pos, b),
                    _ => {
                        bytes.remove(pos.min(last));
                    }
                }
                if bytes.is_empty() {
                    bytes.push(b'{');
                }
            }
            let text = String::from_utf8_lossy(&bytes);
            let at = now + Duration::from_millis(i);
            let _ = s.on_text(at, &text);
            if s.is_closed() {
                let (fresh, _) = session(at);
                s = fresh;
            }
        }
    }

    #[test]
    fn silence_means_dead_and_join_has_deadline() {
        let now = Instant::now();
        let (mut s, _) = session(now);
        let out = s.on_tick(now + Duration::from_secs(11));
        assert!(
            out.iter().any(
                |a| matches!(a, Action::Close { code, .. } if *code == close_code::JOIN_TIMEOUT)
            )
        );

        let (mut s, auth) = session(now);
        let t = auth.mint("r", "a", Role::Host, None).unwrap();
        s.on_text(now, &format!(r#"{{"type":"join","token":"{t}"}}"#));
        s.admitted();
        assert_eq!(s.on_tick(now + Duration::from_secs(5)), vec![Action::Ping]);
        let out = s.on_tick(now + Duration::from_secs(16));
        assert!(
            out.iter()
                .any(|a| matches!(a, Action::Close { code, .. } if *code == close_code::DEAD))
        );
    }
}
