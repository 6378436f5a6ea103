//! Wire types of the signaling protocol (version 1): JSON text frames over a WebSocket.
//! `docs/protocol.md` documents every message here; keep the two in step.

use serde::{Deserialize, Serialize};

use crate::auth::Role;
use crate::config::IceServer;

pub const PROTOCOL_VERSION: u32 = 1;

/// Request id chosen by the client; echoed in the response. Strings or numbers are accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RequestId {
    Num(u64),
    Str(String),
}

/// Which of the participant's two peer connections a message is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// The connection the client offers on and sends its media over.
    Publisher,
    /// The connection the server offers on and sends other participants' media over.
    Subscriber,
}

/// An ICE candidate as browsers produce it (`RTCIceCandidate.toJSON()`). An empty
/// `candidate` is end of candidates; from clients, `null` or no `candidate` field means the
/// same (`RTCIceCandidateInit.candidate` defaults to `""`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Candidate {
    #[serde(default, deserialize_with = "null_as_default")]
    pub candidate: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sdp_mid: Option<String>,
    #[serde(
        default,
        rename = "sdpMLineIndex",
        skip_serializing_if = "Option::is_none"
    )]
    pub sdp_mline_index: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_fragment: Option<String>,
}

/// `null` reads as the type's default; the field must still be present unless it also has
/// `#[serde(default)]`.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A message from the client. Every message may carry an `id`; when it does the server answers
/// with a `response` or an `error` carrying the same id.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ClientEnvelope {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<RequestId>,
    #[serde(flatten)]
    pub msg: ClientMessage,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    /// Authenticate and enter a room. Must be the first message.
    Join {
        token: String,
        /// Optional: must equal the token's room when given.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        room: Option<String>,
        /// Optional protocol version the client speaks; defaults to 1.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<u32>,
        /// Ask for a `resume_token`: a dropped connection then keeps this participant (seat,
        /// tracks, subscriptions) for `signaling.resume_grace`, and `resume` on a new
        /// connection takes it over without the room seeing a leave and a join.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        resumable: bool,
    },
    /// First message of a new connection instead of `join`: take over the participant of a
    /// dropped (or still open, the old one is closed) connection with its `resume_token`.
    Resume {
        token: String,
        /// The newest room message id the client has; the result's history holds the ones
        /// after it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_message_id: Option<u64>,
    },
    /// Restart ICE on the subscriber connection (new credentials in the next server offer),
    /// after the client's network changed. The publisher connection restarts with a
    /// `publish` whose offer has new credentials.
    RestartIce,
    /// SDP offer for the publisher connection (first publish or any later change).
    Publish { sdp: String },
    /// Stop publishing and stay in the room: every track ends, the publisher connection is
    /// closed (a new `publish` starts over on a new one).
    Unpublish,
    /// SDP answer to the server's `offer` on the subscriber connection.
    Answer { offer_id: u64, sdp: String },
    /// A trickled ICE candidate. An empty `candidate.candidate` means end of candidates, and
    /// so does `"candidate": null` (what a browser's last `icecandidate` event carries).
    Candidate {
        target: Target,
        #[serde(deserialize_with = "null_as_default")]
        candidate: Candidate,
    },
    /// Ask for a keyframe on a track this participant subscribes to.
    RequestKeyframe { track_id: String },
    /// Choose the simulcast layer of a track this participant receives: by rid (`layer`), or
    /// the smallest layer covering `max_width` x `max_height` (the size it is shown at).
    SetTrackQuality {
        track_id: String,
        #[serde(default)]
        layer: Option<String>,
        #[serde(default)]
        max_width: Option<u32>,
        #[serde(default)]
        max_height: Option<u32>,
    },
    /// Receive media: the listed tracks, or with `all` every track now and later (what hosts
    /// and co-hosts get from their join). Audience members receive nothing until they ask.
    Subscribe {
        #[serde(default)]
        tracks: Vec<String>,
        #[serde(default)]
        all: bool,
    },
    /// Stop receiving the listed tracks, or with `all` every track (and no automatic
    /// subscription to new ones).
    Unsubscribe {
        #[serde(default)]
        tracks: Vec<String>,
        #[serde(default)]
        all: bool,
    },
    /// Stop all incoming media without renegotiating (an app going to the background).
    PauseMedia,
    /// Restart it (keyframes are asked for at once).
    ResumeMedia,
    /// Host only: start the room's bridge (the mixed stream CDN viewers watch).
    StartBridge {
        #[serde(default)]
        layout: Option<Layout>,
        #[serde(default)]
        destinations: Vec<String>,
    },
    /// Host only: pin the bridge layout, or `null` to let it follow the room.
    SetLayout { layout: Option<Layout> },
    /// Host only: stop the room's bridge.
    StopBridge,
    /// Host or admin: record the room's output (now, or once its stream is live).
    StartRecording,
    /// Host or admin: stop recording it (the file being written is completed).
    StopRecording,
    /// Audience: ask the host for a co-host seat.
    RequestCohost,
    /// Audience: withdraw a pending request.
    CancelCohostRequest,
    /// Host: approve or deny a pending request.
    AnswerCohostRequest {
        participant_id: String,
        approve: bool,
    },
    /// Host: invite an audience member to a seat.
    InviteCohost { participant_id: String },
    /// Audience: accept or decline the host's invitation.
    AnswerCohostInvite { accept: bool },
    /// Host: take a co-host's seat away (back to audience, media stopped).
    RemoveCohost { participant_id: String },
    /// Co-host: give the seat back (back to audience, media stopped).
    LeaveSeat,
    /// Host: mute or unmute a co-host's audio or video (the server stops forwarding it).
    MuteTrack {
        participant_id: String,
        kind: Kind,
        muted: bool,
    },
    /// Host: remove anyone from the room (close code 4009).
    Kick { participant_id: String },
    /// Anyone: a chat line.
    Chat { text: String },
    /// Anyone: likes (default 1).
    Like {
        #[serde(default)]
        count: Option<u32>,
    },
    /// Anyone: a gift of some type.
    Gift {
        gift: String,
        #[serde(default)]
        count: Option<u32>,
    },
    /// Host: delete a message from the room (and its history).
    DeleteMessage { message_id: u64 },
    /// Host: mute or unmute a member's chat.
    MuteChat { participant_id: String, muted: bool },
    /// Host: invite the host of another room to a PK.
    PkInvite { room: String },
    /// Host: accept or decline a PK invitation from `room`.
    PkAnswer { room: String, accept: bool },
    /// Host of either room: end the PK.
    PkEnd,
    /// Application-level keepalive (browsers cannot send WebSocket pings).
    Ping,
    /// Leave the room; the server closes the connection afterwards.
    Leave,
}

impl ClientMessage {
    pub fn name(&self) -> &'static str {
        match self {
            ClientMessage::Join { .. } => "join",
            ClientMessage::Resume { .. } => "resume",
            ClientMessage::RestartIce => "restart_ice",
            ClientMessage::Publish { .. } => "publish",
            ClientMessage::Unpublish => "unpublish",
            ClientMessage::Answer { .. } => "answer",
            ClientMessage::Candidate { .. } => "candidate",
            ClientMessage::RequestKeyframe { .. } => "request_keyframe",
            ClientMessage::SetTrackQuality { .. } => "set_track_quality",
            ClientMessage::Subscribe { .. } => "subscribe",
            ClientMessage::Unsubscribe { .. } => "unsubscribe",
            ClientMessage::PauseMedia => "pause_media",
            ClientMessage::ResumeMedia => "resume_media",
            ClientMessage::StartBridge { .. } => "start_bridge",
            ClientMessage::SetLayout { .. } => "set_layout",
            ClientMessage::StopBridge => "stop_bridge",
            ClientMessage::StartRecording => "start_recording",
            ClientMessage::StopRecording => "stop_recording",
            ClientMessage::RequestCohost => "request_cohost",
            ClientMessage::CancelCohostRequest => "cancel_cohost_request",
            ClientMessage::AnswerCohostRequest { .. } => "answer_cohost_request",
            ClientMessage::InviteCohost { .. } => "invite_cohost",
            ClientMessage::AnswerCohostInvite { .. } => "answer_cohost_invite",
            ClientMessage::RemoveCohost { .. } => "remove_cohost",
            ClientMessage::LeaveSeat => "leave_seat",
            ClientMessage::MuteTrack { .. } => "mute_track",
            ClientMessage::Kick { .. } => "kick",
            ClientMessage::Chat { .. } => "chat",
            ClientMessage::Like { .. } => "like",
            ClientMessage::Gift { .. } => "gift",
            ClientMessage::DeleteMessage { .. } => "delete_message",
            ClientMessage::MuteChat { .. } => "mute_chat",
            ClientMessage::PkInvite { .. } => "pk_invite",
            ClientMessage::PkAnswer { .. } => "pk_answer",
            ClientMessage::PkEnd => "pk_end",
            ClientMessage::Ping => "ping",
            ClientMessage::Leave => "leave",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// The host full frame.
    Solo,
    /// The host full frame, co-hosts as small tiles stacked at the bottom right.
    Pip,
    /// Two hosts side by side (PK); this room's host on the left.
    SideBySide,
    /// Up to 9 equal tiles.
    Grid,
}

pub use crate::config::Fit;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Audio,
    Video,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackInfo {
    pub id: String,
    pub participant_id: String,
    pub kind: Kind,
    /// MIME type, e.g. `video/H264`, `audio/opus`.
    pub codec: String,
    /// True while the publisher has the track muted (reserved; always false in v1).
    #[serde(default)]
    pub muted: bool,
    /// A simulcast track's layers (rids), lowest quality first; absent for a plain track.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParticipantInfo {
    pub id: String,
    pub identity: String,
    pub role: Role,
    pub tracks: Vec<TrackInfo>,
}

/// Why a participant left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaveReason {
    /// Sent `leave` or closed the WebSocket.
    Left,
    /// WebSocket or ICE went silent past the configured timeout.
    Disconnected,
    /// The same identity joined again from another connection.
    Replaced,
    /// The server is shutting down.
    ServerShutdown,
    /// The host (or an operator) removed them.
    Kicked,
    /// The server could not deliver to them fast enough: their connection stopped reading
    /// (a socket write timed out or their outgoing queue filled up) and was closed.
    SlowReader,
}

/// Who sent a room message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sender {
    pub participant_id: String,
    pub identity: String,
}

/// What a room message says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MessageBody {
    Chat {
        text: String,
    },
    Like {
        count: u32,
    },
    Gift {
        gift: String,
        count: u32,
    },
    /// Someone entered the room.
    Joined {
        role: Role,
    },
    /// Someone left it.
    Left {
        reason: LeaveReason,
    },
    /// A system notice (seat changes, mutes, kicks, PK, the host's absence).
    Notice {
        text: String,
    },
}

/// One entry of a room's ordered message stream (ids increase by one per room).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomMessage {
    pub id: u64,
    /// Server time, milliseconds since the Unix epoch.
    pub ts_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Sender>,
    #[serde(flatten)]
    pub body: MessageBody,
}

/// How a co-host request or invitation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Approved,
    Denied,
    Cancelled,
    TimedOut,
    /// The requester left the room.
    Gone,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub max_message_bytes: usize,
    /// Members of any role (signaling-only audience included).
    pub max_members: usize,
    /// Real-time participants (with media).
    pub max_participants: usize,
    pub max_publishers: usize,
    pub max_tracks_per_participant: usize,
    pub rate_limit_per_sec: u32,
    pub ping_interval_ms: u64,
    /// How long a resumable participant outlives its dropped connection.
    pub resume_grace_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinResult {
    pub version: u32,
    pub room: String,
    pub participant: ParticipantInfo,
    /// Everyone else in the room, with their published tracks.
    pub participants: Vec<ParticipantInfo>,
    pub ice_servers: Vec<IceServer>,
    pub limits: Limits,
    /// Co-host seats of the room.
    pub seats: usize,
    /// The last messages of the room, oldest first.
    pub history: Vec<RoomMessage>,
    /// The room this one is in a PK with, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pk: Option<String>,
    /// How many are in the room now (this member included).
    pub counts: Counts,
    /// With `resumable` (join) and after every `resume`: the secret a new connection gives
    /// `resume` to take this participant over. Each one works once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_token: Option<String>,
    /// This result answers a `resume`: the same participant, state as of now.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resumed: bool,
}

/// Members of a room: all of them, and those with media.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Members of any role (signaling-only audience included).
    pub members: usize,
    /// Real-time participants (hosts, co-hosts, publishers, subscribed audience).
    pub participants: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ResponseResult {
    Joined(Box<JoinResult>),
    Answer {
        sdp: String,
    },
    Pong {
        server_time_ms: u64,
    },
    /// `set_track_quality` on a simulcast track: the layer chosen (its rid).
    Layer {
        layer: String,
    },
    Empty {},
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

/// Stable error codes. Clients branch on these, never on the message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    MessageTooLarge,
    UnknownType,
    UnsupportedVersion,
    NotJoined,
    AlreadyJoined,
    InvalidToken,
    TokenExpired,
    WrongRoom,
    Forbidden,
    RoomFull,
    TooManyPublishers,
    TooManyTracks,
    BadSdp,
    UnknownSession,
    UnknownTrack,
    StaleAnswer,
    RateLimited,
    Timeout,
    Internal,
    /// The room's bridge is already running.
    AlreadyRunning,
    /// No bridge is running for the room.
    NotRunning,
    /// A bridge destination is not a valid rtmp:// URL.
    BadDestination,
    /// Every co-host seat is taken.
    SeatsFull,
    /// No such participant in the room (or not in the state the request needs).
    UnknownParticipant,
    /// No such pending request, invitation or message.
    NotFound,
    /// A request or invitation for this is already pending, or the PK is already on.
    AlreadyPending,
    /// The room has no host right now.
    NoHost,
    /// The host muted this member's chat.
    ChatMuted,
    /// A join with role host while another identity is the room's host (or within its grace
    /// period): a room has one host.
    HostPresent,
    /// `pk_answer` to an invitation whose inviting host left: it was withdrawn.
    Withdrawn,
    /// `resume` with a token that is unknown, used or past its grace period: join again.
    ResumeFailed,
    /// The room is already being recorded.
    AlreadyRecording,
    /// The room is not being recorded.
    NotRecording,
    /// `recording.max_concurrent` recordings are running.
    TooManyRecordings,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// Result of a request. `id` echoes the request's id and is omitted when it had none.
    Response {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
        result: ResponseResult,
    },
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
        error: ErrorBody,
    },
    /// SDP offer on the subscriber connection; answer with `answer` and the same `offer_id`.
    Offer {
        offer_id: u64,
        sdp: String,
    },
    /// A server ICE candidate for one of the two connections.
    Candidate {
        target: Target,
        candidate: Candidate,
    },
    ParticipantJoined {
        participant: ParticipantInfo,
    },
    /// The room's member counts changed (at most about once a second; audience members
    /// entering and leaving are announced only through this in large rooms).
    MemberCount {
        #[serde(flatten)]
        counts: Counts,
    },
    ParticipantLeft {
        participant_id: String,
        identity: String,
        reason: LeaveReason,
    },
    TrackPublished {
        track: TrackInfo,
    },
    TrackUnpublished {
        track_id: String,
        participant_id: String,
    },
    /// Someone's role changed: promoted to a co-host seat or back to audience.
    RoleChanged {
        participant_id: String,
        identity: String,
        role: Role,
    },
    /// To the host: an audience member asks for a seat.
    CohostRequest {
        participant_id: String,
        identity: String,
    },
    /// To the host and the requester: how the request ended.
    CohostRequestEnded {
        participant_id: String,
        outcome: Outcome,
    },
    /// To an audience member: the host invites them to a seat.
    CohostInvite {
        from: Sender,
    },
    /// To the host and the invitee: how the invitation ended.
    CohostInviteEnded {
        participant_id: String,
        outcome: Outcome,
    },
    /// A track was muted or unmuted by the host (its media stops or resumes).
    TrackMuted {
        track_id: String,
        participant_id: String,
        kind: Kind,
        muted: bool,
    },
    /// A published track stopped delivering media while its connection was up (`stalled`),
    /// or resumed.
    TrackStalled {
        track_id: String,
        participant_id: String,
        kind: Kind,
        stalled: bool,
    },
    /// A room message (chat, like, gift, join/leave, notice).
    Message {
        message: RoomMessage,
    },
    MessageDeleted {
        message_id: u64,
    },
    /// To a host: the host of `room` invites this room to a PK.
    PkInvite {
        room: String,
        from: Sender,
    },
    /// The PK with `room` started: its host's tracks are announced to this room.
    PkStarted {
        room: String,
        host: Sender,
    },
    /// To the inviting host: the PK invitation to `room` ended without a PK: `denied` (its
    /// host declined), `timed_out` or `gone` (its host left).
    PkDeclined {
        room: String,
        outcome: Outcome,
    },
    /// To the invited host: the PK invitation from `room` ended unanswered: `timed_out`, or
    /// `gone` (the inviting host left; the invitation was withdrawn).
    PkInviteEnded {
        room: String,
        outcome: Outcome,
    },
    /// The PK with `room` ended.
    PkEnded {
        room: String,
    },
    /// The room's output is being recorded from now on (to everyone in the room).
    RecordingStarted {},
    /// The room's recording ended: `requested`, `room_ended`, `write_error`,
    /// `server_shutdown`.
    RecordingStopped {
        reason: String,
    },
    /// Sent just before the server closes the WebSocket, with the close code it will use.
    Closing {
        code: u16,
        reason: String,
    },
}

impl ServerMessage {
    pub fn error(id: Option<RequestId>, code: ErrorCode, message: impl Into<String>) -> Self {
        ServerMessage::Error {
            id,
            error: ErrorBody {
                code,
                message: message.into(),
            },
        }
    }

    pub fn to_json(&self) -> String {
        // Serializing these plain types cannot fail; fall back to a fixed error just in case.
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"type":"error","error":{"code":"internal","message":"serialization"}}"#.into()
        })
    }
}

/// WebSocket close codes the server uses (4000-4999 are application-defined).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const INVALID_TOKEN: u16 = 4001;
    pub const TOKEN_EXPIRED: u16 = 4002;
    pub const WRONG_ROOM: u16 = 4003;
    pub const JOIN_TIMEOUT: u16 = 4004;
    pub const REPLACED: u16 = 4005;
    pub const ROOM_FULL: u16 = 4006;
    pub const DEAD: u16 = 4008;
    pub const KICKED: u16 = 4009;
    /// The client did not read what the server sent (write timeout or full outgoing queue).
    pub const SLOW_READER: u16 = 4010;
    /// A host token was refused because the room already has another host.
    pub const HOST_PRESENT: u16 = 4011;
    /// A `resume` on another connection took this participant over.
    pub const RESUMED_ELSEWHERE: u16 = 4012;
    pub const RATE_LIMITED: u16 = 4029;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_messages_parse() {
        let m: ClientEnvelope =
            serde_json::from_str(r#"{"id":1,"type":"join","token":"t"}"#).unwrap();
        assert_eq!(m.id, Some(RequestId::Num(1)));
        assert!(matches!(m.msg, ClientMessage::Join { .. }));
        let m: ClientEnvelope = serde_json::from_str(
            r#"{"type":"candidate","target":"subscriber","candidate":{"candidate":"candidate:1 1 udp 1 127.0.0.1 9 typ host","sdpMid":"0","sdpMLineIndex":0}}"#,
        )
        .unwrap();
        assert!(m.id.is_none());
        match m.msg {
            ClientMessage::Candidate { target, candidate } => {
                assert_eq!(target, Target::Subscriber);
                assert_eq!(candidate.sdp_mline_index, Some(0));
            }
            other => panic!("{other:?}"),
        }
        assert!(serde_json::from_str::<ClientEnvelope>(r#"{"type":"nope"}"#).is_err());
    }

    #[test]
    fn end_of_candidates_parses_in_every_form_clients_send() {
        for c in [
            r#"{"candidate":""}"#,
            r#"{"candidate":"","sdpMid":"0","sdpMLineIndex":0}"#,
            r#"{"candidate":"","sdpMid":null,"sdpMLineIndex":null,"usernameFragment":null}"#,
            r#"{"candidate":null,"sdpMid":"0"}"#,
            r#"{}"#,
            "null",
        ] {
            let text = format!(r#"{{"type":"candidate","target":"publisher","candidate":{c}}}"#);
            let m: ClientEnvelope =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{c}: {e}"));
            match m.msg {
                ClientMessage::Candidate { candidate, .. } => {
                    assert!(candidate.candidate.is_empty(), "{c}")
                }
                other => panic!("{other:?}"),
            }
        }
        // The `candidate` field itself is still required.
        assert!(
            serde_json::from_str::<ClientEnvelope>(r#"{"type":"candidate","target":"publisher"}"#)
                .is_err()
        );
    }

    #[test]
    fn server_messages_serialize() {
        let s = ServerMessage::error(
            Some(RequestId::Str("a".into())),
            ErrorCode::RoomFull,
            "full",
        )
        .to_json();
        assert_eq!(
            s,
            r#"{"type":"error","id":"a","error":{"code":"room_full","message":"full"}}"#
        );
        let s = ServerMessage::Response {
            id: Some(RequestId::Num(3)),
            result: ResponseResult::Empty {},
        }
        .to_json();
        assert_eq!(s, r#"{"type":"response","id":3,"result":{}}"#);
    }
}
