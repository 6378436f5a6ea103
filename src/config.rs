//! Typed configuration: embedded defaults, then an optional TOML file, then `COHOST_...`
//! environment overrides. Unknown keys are rejected by name so a typo never silently falls back
//! to a default. `config/cohost.toml` in the repository is the commented copy of the defaults.

use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

/// The secret used when none is configured. Fine on loopback; refused on any other address
/// unless `server.allow_dev_secret` is set (see `Config::validate`).
pub const DEV_SECRET: &str = "cohost-development-secret-do-not-use-in-production";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config: {0}")]
    Parse(String),
    #[error("environment variable {var}: {msg}")]
    Env { var: String, msg: String },
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub webrtc: WebrtcConfig,
    pub room: RoomConfig,
    pub signaling: SignalingConfig,
    pub bridge: BridgeSettings,
    pub origin: OriginConfig,
    pub whip: WhipConfig,
    pub webhooks: WebhooksConfig,
    pub recording: RecordingConfig,
    pub hls: HlsConfig,
}

/// HLS and LL-HLS from the embedded origin (`GET /live/{stream}/index.m3u8`): fMP4 segments
/// and parts made from the origin's stream on demand, kept in memory; see `src/hls/` and the
/// "HLS and LL-HLS" section of docs/api.md.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HlsConfig {
    /// Serve HLS at all.
    pub enabled: bool,
    /// Segment target: a segment ends at the first keyframe after it (`EXT-X-TARGETDURATION`
    /// is this rounded up to seconds). 1s-10s.
    #[serde(with = "humantime_serde_compat")]
    pub segment_target: Duration,
    /// LL-HLS part target (`EXT-X-PART-INF:PART-TARGET`). 200ms-1s, at most half the segment
    /// target.
    #[serde(with = "humantime_serde_compat")]
    pub part_target: Duration,
    /// Complete segments kept per stream (and listed in the playlist). 3-60.
    pub window_segments: usize,
    /// Bytes of media kept per stream at most (the oldest segments go first). At least 1 MiB.
    pub max_stream_bytes: usize,
    /// A stream's packager stops this long after its last HLS request. 1s-1h.
    #[serde(with = "humantime_serde_compat")]
    pub idle_stop: Duration,
    /// The first playlist request of a stream waits this long for the first segment
    /// (503 after it). 1s-60s.
    #[serde(with = "humantime_serde_compat")]
    pub start_timeout: Duration,
    /// Streams packaged at once (503 `too_many_streams` beyond). At least 1.
    pub max_streams: usize,
    /// Requests held at once by blocking playlist reloads and preload-hinted parts, all
    /// streams together (503 beyond). At least 1.
    pub max_blocking_requests: usize,
}

impl Default for HlsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            segment_target: Duration::from_secs(2),
            part_target: Duration::from_millis(333),
            window_segments: 7,
            max_stream_bytes: 64 << 20,
            idle_stop: Duration::from_secs(30),
            start_timeout: Duration::from_secs(10),
            max_streams: 200,
            max_blocking_requests: 5000,
        }
    }
}

impl HlsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let ms = |d: Duration| d.as_millis();
        let checks = [
            (
                (1000..=10_000).contains(&ms(self.segment_target)),
                "hls.segment_target must be 1s-10s",
            ),
            (
                (200..=1000).contains(&ms(self.part_target))
                    && ms(self.part_target) * 2 <= ms(self.segment_target),
                "hls.part_target must be 200ms-1s and at most half of hls.segment_target",
            ),
            (
                (3..=60).contains(&self.window_segments),
                "hls.window_segments must be 3-60",
            ),
            (
                self.max_stream_bytes >= 1 << 20,
                "hls.max_stream_bytes must be at least 1048576",
            ),
            (
                (1000..=3_600_000).contains(&ms(self.idle_stop)),
                "hls.idle_stop must be 1s-1h",
            ),
            (
                (1000..=60_000).contains(&ms(self.start_timeout)),
                "hls.start_timeout must be 1s-60s",
            ),
            (
                self.max_streams >= 1 && self.max_blocking_requests >= 1,
                "hls.max_streams and hls.max_blocking_requests must be at least 1",
            ),
        ];
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, msg)) => Err(ConfigError::Invalid((*msg).into())),
            None => Ok(()),
        }
    }
}

/// Recording a room's output (the bridge's stream on the embedded origin) to fragmented MP4
/// files on disk; see `src/recording/` and the "Recording" section of docs/api.md.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecordingConfig {
    /// Directory of the recordings: `{dir}/{room}/{room}-{UTC start}.mp4`. Created when the
    /// first recording starts.
    pub dir: String,
    /// Record every room's output from the moment its bridge starts.
    pub auto: bool,
    /// A file is closed and the next one started (at the next keyframe) once it holds this
    /// much media.
    #[serde(with = "humantime_serde_compat")]
    pub max_duration: Duration,
    /// ... or once it has this many bytes. 0: no size limit.
    pub max_size: u64,
    /// Media cut into one fragment (written and flushed at once): what a crash loses at most.
    #[serde(with = "humantime_serde_compat")]
    pub fragment: Duration,
    /// Recordings running at once in the whole server (409 `too_many_recordings` beyond).
    pub max_concurrent: usize,
    /// Files a listing returns at most (newest first; `?before=` pages further).
    pub list_limit: usize,
}

impl Default for RecordingConfig {
    fn default() -> Self {
        Self {
            dir: "recordings".into(),
            auto: false,
            max_duration: Duration::from_secs(3600),
            max_size: 2 << 30,
            fragment: Duration::from_secs(1),
            max_concurrent: 16,
            list_limit: 1000,
        }
    }
}

impl RecordingConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.dir.trim().is_empty() {
            return Err(ConfigError::Invalid(
                "recording.dir must not be empty".into(),
            ));
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(10)).contains(&self.fragment) {
            return Err(ConfigError::Invalid(
                "recording.fragment must be 100ms..=10s".into(),
            ));
        }
        if self.max_duration < Duration::from_secs(1) || self.max_duration < self.fragment {
            return Err(ConfigError::Invalid(
                "recording.max_duration must be at least 1s and at least recording.fragment".into(),
            ));
        }
        if self.max_size != 0 && self.max_size < 1 << 20 {
            return Err(ConfigError::Invalid(
                "recording.max_size must be 0 (no limit) or at least 1048576 bytes".into(),
            ));
        }
        if self.max_concurrent == 0 || self.list_limit == 0 {
            return Err(ConfigError::Invalid(
                "recording.max_concurrent and recording.list_limit must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// Webhooks: the server POSTs signed JSON events (room, participant, track, seat, PK, bridge,
/// CDN destination, RTMP ingest) to the operator's backend; see `src/webhooks/` and the
/// "Webhooks" section of docs/api.md.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// `http://` or `https://` URLs every event is POSTed to. Empty: webhooks are off.
    pub urls: Vec<String>,
    /// PEM file of CA certificates trusted for `https://` URLs besides the Mozilla roots
    /// compiled in (a private CA of the operator's backend). Empty: only those.
    pub ca_file: String,
    /// HMAC-SHA256 key of the `X-Cohost-Signature` header; at least 16 bytes when `urls` is
    /// set. Never logged (the `Debug` form redacts it).
    pub key: String,
    /// Longest one delivery attempt may take (connect, request, response head); longer counts
    /// as a failed attempt.
    #[serde(with = "humantime_serde_compat")]
    pub timeout: Duration,
    /// Events waiting for delivery, all URLs and rooms together; when full, new events are
    /// dropped and counted (`cohost_webhooks_dropped_total{reason="queue_full"}`).
    pub queue: usize,
    /// Attempts per event and URL (the first one included); then the event is dropped for
    /// that URL and counted (`reason="attempts_exhausted"`).
    pub max_attempts: u32,
    /// Delay before the first retry, doubling up to `retry_max`.
    #[serde(with = "humantime_serde_compat")]
    pub retry_initial: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub retry_max: Duration,
    /// Requests in flight at once per URL (each to a different room: one room's events go
    /// one at a time, in order).
    pub concurrency: usize,
    /// Authorization callbacks (SRS-style): an `http://` or `https://` URL asked before an RTMP ingest
    /// (`on_publish`) or an origin player (`on_play`: RTMP play, HTTP-FLV) is admitted; a
    /// non-2xx answer refuses it. Empty: not asked. Signed like the events.
    pub on_publish: String,
    pub on_play: String,
    /// Longest wait for an authorization answer (the client waits meanwhile).
    #[serde(with = "humantime_serde_compat")]
    pub auth_timeout: Duration,
    /// When the authorization backend cannot be asked (connection error, timeout): admit
    /// (`true`, fail open) or refuse (`false`, fail closed). A non-2xx answer always refuses.
    pub auth_fail_open: bool,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            urls: vec![],
            ca_file: String::new(),
            key: String::new(),
            timeout: Duration::from_secs(5),
            queue: 10_000,
            max_attempts: 6,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            concurrency: 8,
            on_publish: String::new(),
            on_play: String::new(),
            auth_timeout: Duration::from_secs(3),
            auth_fail_open: false,
        }
    }
}

/// The key stays out of logs and panic messages.
impl std::fmt::Debug for WebhooksConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhooksConfig")
            .field("urls", &self.urls)
            .field("ca_file", &self.ca_file)
            .field(
                "key",
                &if self.key.is_empty() {
                    ""
                } else {
                    "<redacted>"
                },
            )
            .field("timeout", &self.timeout)
            .field("queue", &self.queue)
            .field("max_attempts", &self.max_attempts)
            .field("retry_initial", &self.retry_initial)
            .field("retry_max", &self.retry_max)
            .field("concurrency", &self.concurrency)
            .field("on_publish", &self.on_publish)
            .field("on_play", &self.on_play)
            .field("auth_timeout", &self.auth_timeout)
            .field("auth_fail_open", &self.auth_fail_open)
            .finish()
    }
}

impl WebhooksConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let callbacks: Vec<&String> = [&self.on_publish, &self.on_play]
            .into_iter()
            .filter(|u| !u.is_empty())
            .collect();
        if self.urls.is_empty() && callbacks.is_empty() {
            return Ok(());
        }
        if self.key.len() < 16 {
            return Err(ConfigError::Invalid(
                "webhooks.key must be at least 16 bytes when webhooks.urls, on_publish or \
                 on_play is set"
                    .into(),
            ));
        }
        if self.auth_timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "webhooks.auth_timeout must be > 0".into(),
            ));
        }
        for u in self.urls.iter().chain(callbacks) {
            let ok = u
                .strip_prefix("http://")
                .or_else(|| u.strip_prefix("https://"))
                .and_then(|rest| rest.split(['/', '?']).next())
                .is_some_and(|authority| !authority.is_empty())
                && u.parse::<hyper::Uri>().is_ok();
            if !ok {
                return Err(ConfigError::Invalid(format!(
                    "webhooks.urls, on_publish, on_play: {u:?} is not an http:// or https:// URL"
                )));
            }
        }
        if !self.ca_file.is_empty() {
            // Read here so a wrong path stops the server at start, not at the first event.
            let pem = std::fs::read_to_string(&self.ca_file).map_err(|e| {
                ConfigError::Invalid(format!("webhooks.ca_file {:?}: {e}", self.ca_file))
            })?;
            if !pem.contains("-----BEGIN CERTIFICATE-----") {
                return Err(ConfigError::Invalid(format!(
                    "webhooks.ca_file {:?} holds no PEM certificate",
                    self.ca_file
                )));
            }
        }
        if self.timeout.is_zero()
            || self.queue == 0
            || self.max_attempts == 0
            || self.concurrency == 0
            || self.retry_initial.is_zero()
            || self.retry_max < self.retry_initial
        {
            return Err(ConfigError::Invalid(
                "webhooks.timeout, queue, max_attempts, concurrency and retry_initial must be > 0, \
                 and webhooks.retry_max at least webhooks.retry_initial"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// WHIP publishing and WHEP playback sessions (`POST /whip/...`, `POST /whep/...`). A WHEP
/// viewer is not a room member, so these caps are what bounds how many media connections
/// (each one UDP port) viewers can make the server hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WhipConfig {
    /// A WHIP or WHEP session whose media connection (ICE and DTLS) is not up this long after
    /// the answer is ended and its port freed.
    #[serde(with = "humantime_serde_compat")]
    pub connect_timeout: Duration,
    /// WHEP sessions one token identity may hold at once, all rooms together (429 beyond).
    pub whep_max_per_identity: usize,
    /// WHEP sessions per room (503 beyond).
    pub whep_max_per_room: usize,
    /// WHEP sessions in the whole server (503 beyond).
    pub whep_max_sessions: usize,
}

impl Default for WhipConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(15),
            whep_max_per_identity: 4,
            whep_max_per_room: 100,
            whep_max_sessions: 400,
        }
    }
}

/// The embedded origin's application `live` (RTMP `rtmp://HOST/live/...`, HTTP-FLV
/// `/live/{stream}.flv`): signed URLs against hotlinking and RTMP ingest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OriginConfig {
    /// Players (RTMP play and HTTP-FLV) need `?sign=...&expires=...`.
    pub sign_play: bool,
    /// RTMP publishers need `?sign=...&expires=...` besides a valid stream key.
    pub sign_publish: bool,
    /// HMAC-SHA256 secret of signed URLs (at least 16 bytes when signing is on).
    pub sign_secret: String,
    /// Accept RTMP publishing with stream keys (`cohost token --stream-key`).
    pub ingest: bool,
    /// Default lifetime of stream keys and signed URLs minted by `cohost token` / the API.
    #[serde(with = "humantime_serde_compat")]
    pub key_ttl: Duration,
    /// Longest lifetime a stream key may have: minting a longer one is refused (400), and a
    /// key whose expiry is further away than this is refused at publish time (keys minted
    /// before the cap existed, or under a larger one).
    #[serde(with = "humantime_serde_compat")]
    pub key_max_ttl: Duration,

    /// RTMP connections (players and publishers) open at once; more are closed at accept.
    /// 0: no limit.
    pub rtmp_max_connections: usize,
    /// RTMP connections open at once from one client IP. 0: no limit.
    pub rtmp_max_connections_per_ip: usize,
    /// Longest a write to an RTMP client may take (a player that stops reading, a publisher
    /// that never reads our acknowledgements); the connection is closed after it.
    #[serde(with = "humantime_serde_compat")]
    pub rtmp_write_timeout: Duration,
    /// Largest RTMP message (a video frame) a client may send, in bytes; larger ones close the
    /// connection. At most 16777215 (the protocol's 24-bit length).
    pub rtmp_max_message_bytes: usize,
}

impl Default for OriginConfig {
    fn default() -> Self {
        Self {
            sign_play: false,
            sign_publish: false,
            sign_secret: String::new(),
            ingest: true,
            key_ttl: Duration::from_secs(24 * 3600),
            key_max_ttl: Duration::from_secs(7 * 24 * 3600),

            rtmp_max_connections: 1000,
            rtmp_max_connections_per_ip: 64,
            rtmp_write_timeout: Duration::from_secs(10),
            rtmp_max_message_bytes: 8 << 20,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// HTTP listen address: WebSocket signaling, REST API, demo page.
    pub http_listen: SocketAddr,
    /// Allow the built-in development secret on a non-loopback address (not recommended).
    pub allow_dev_secret: bool,
    /// RTMP listen address of the embedded origin (players pull rtmp://HOST:PORT/live/{stream}).
    /// Empty: no RTMP listener.
    pub rtmp_listen: String,
    /// Directory served at `/` (the demo page).
    pub web_dir: String,
    /// The development token endpoint `POST /v1/dev/token` (the demo page's "enter" button):
    /// `auto` enables it only on a loopback `http_listen` with the development secret.
    pub dev_tokens: DevTokens,
    /// How long graceful shutdown waits for peers to close.
    #[serde(with = "humantime_serde_compat")]
    pub shutdown_timeout: Duration,
    /// HTTP: a request's head (request line and headers) must arrive within this time, counted
    /// from its first byte (or from the accept, for a connection's first request). Bounds
    /// slowloris clients that never finish their headers.
    #[serde(with = "humantime_serde_compat")]
    pub header_read_timeout: Duration,
    /// HTTP: a keep-alive connection with no request in progress and no byte received is
    /// closed after this time. Behind a reverse proxy that pools upstream connections, keep it
    /// above the proxy's upstream keep-alive timeout.
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
    /// HTTP, WebSocket and HTTP-FLV: a socket write that makes no progress for this long (the
    /// client stopped reading) closes the connection.
    #[serde(with = "humantime_serde_compat")]
    pub write_timeout: Duration,
    /// HTTP: longest time a handler may take to produce its response, reading the request
    /// body included (408 after it). Streaming bodies (HTTP-FLV) and WebSockets are not
    /// bounded by it once their response has started.
    #[serde(with = "humantime_serde_compat")]
    pub request_timeout: Duration,
    /// HTTP: connections open at once on `http_listen` (WebSockets and HTTP-FLV players
    /// included); more are closed as soon as they are accepted. 0 = no limit.
    pub max_connections: usize,
    /// HTTP: connections open at once from one client IP. Behind a reverse proxy every client
    /// has the proxy's IP: raise this to about `max_connections` there. 0 = no limit.
    pub max_connections_per_ip: usize,
    /// HTTP: largest request head (request line and headers), in bytes; also the size of a
    /// connection's read buffer, so the memory a slowloris connection can hold (431 above it).
    /// At least 8192.
    pub max_header_bytes: usize,
    /// HTTP: largest request body of the REST API, in bytes (413 above it). WHIP/WHEP SDP
    /// bodies have their own 64 KiB limit.
    pub max_body_bytes: usize,
    /// HTTP-FLV players (`GET /live/{stream}.flv`) at once, in total and per stream
    /// (503 `too_many_players` above). 0 = no limit.
    pub max_flv_players: usize,
    pub max_flv_players_per_stream: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HMAC secret for HS256/HS384/HS512 tokens.
    pub secret: String,
    /// JWT algorithm: HS256, HS384 or HS512.
    pub algorithm: String,
    /// Default lifetime of tokens minted by `cohost token`.
    #[serde(with = "humantime_serde_compat")]
    pub token_ttl: Duration,
    /// Allowed clock skew when checking expiry.
    #[serde(with = "humantime_serde_compat")]
    pub leeway: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebrtcConfig {
    /// Local IP the media sockets bind to. `0.0.0.0` means every non-loopback interface.
    pub bind_ip: IpAddr,
    /// Inclusive UDP port range handed out to peer connections.
    pub udp_port_min: u16,
    pub udp_port_max: u16,
    /// Public IPs announced as host candidates instead of the local ones (1:1 NAT).
    pub public_ips: Vec<String>,
    /// Also gather ICE-TCP (passive) candidates on the same port numbers.
    pub ice_tcp: bool,
    /// STUN/TURN servers handed to clients in the join response.
    pub ice_servers: Vec<IceServer>,
    /// ICE: no traffic for this long marks a connection disconnected.
    #[serde(with = "humantime_serde_compat")]
    pub ice_disconnected_timeout: Duration,
    /// ICE: disconnected for this long marks it failed (and the participant leaves).
    #[serde(with = "humantime_serde_compat")]
    pub ice_failed_timeout: Duration,
    /// ICE connectivity check interval (the crate's default is 200 ms).
    #[serde(with = "humantime_serde_compat")]
    pub ice_check_interval: Duration,
    /// Minimum time between two keyframe requests sent to one publisher track.
    #[serde(with = "humantime_serde_compat")]
    pub keyframe_request_interval: Duration,
    /// A published track that delivers no RTP for this long is reported stalled (log,
    /// `cohost_media_stalls_total`, `track_stalled` to the room) until its media resumes.
    #[serde(with = "humantime_serde_compat")]
    pub media_stall_timeout: Duration,
    /// Kernel send and receive buffer of every media socket, in bytes (capped by the kernel's
    /// net.core.rmem_max / wmem_max). Large buffers absorb keyframe bursts; 0 keeps the OS default.
    pub socket_buffer_bytes: usize,
    /// Packets queued per subscriber track; when full, new packets for that subscriber are
    /// dropped (it recovers through NACK or a keyframe request) so one slow subscriber never
    /// holds back the others.
    pub subscriber_queue: usize,
    /// Ports of the range kept for publishing connections: a viewer's connection (a WHEP
    /// session, an audience member's subscriber connection) is refused while no more than this
    /// many ports are free, so viewers can never take the ports a co-host needs to publish.
    /// At most half the range is kept, whatever the value.
    pub publisher_port_reserve: usize,
    /// Estimate each subscriber connection's downlink with GCC over the client's
    /// transport-wide congestion feedback (`peer::bwe`), shown in the room stats; a downlink
    /// found queueing takes its simulcast tracks a step down (`sfu::downlink`). Off by
    /// default: numbering every forwarded packet and keeping its send history cost 15-19 % more
    /// CPU per forwarded packet (BENCHMARKS.md).
    pub bandwidth_estimate: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub username: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub credential: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoomConfig {
    /// Members per room, any role: the audience joins signaling-only (chat, likes, gifts,
    /// co-host requests) and costs no media.
    pub max_members: usize,
    /// Real-time participants per room: members with media (hosts, co-hosts, RTMP/WHIP
    /// publishers, and audience members once they subscribe to tracks).
    pub max_participants: usize,
    /// Participants publishing media at once per room.
    pub max_publishers: usize,
    /// Published tracks per participant.
    pub max_tracks_per_participant: usize,
    /// Co-host seats besides the host.
    pub cohost_seats: usize,
    /// A co-host request or invitation not answered within this time ends as `timed_out`.
    #[serde(with = "humantime_serde_compat")]
    pub request_timeout: Duration,
    /// After the host leaves or drops, co-hosts keep their seats this long for the host to come
    /// back; then they return to the audience.
    #[serde(with = "humantime_serde_compat")]
    pub host_grace: Duration,
    /// Messages a new member (and the viewer feed) gets from the room's history.
    pub message_history: usize,
    /// Longest chat line, in characters (gift names: 64).
    pub max_chat_chars: usize,
    /// Chat lines, likes and gifts per second one member may send.
    pub messages_per_sec: u32,
    /// In rooms of 100 members and more, messages for everyone go out at most this often, in
    /// batches (one socket write per member per batch instead of per line); a line into a
    /// quiet room goes out at once. "0s": every line at once.
    #[serde(with = "humantime_serde_compat")]
    pub feed_batch: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SignalingConfig {
    /// Largest WebSocket message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Server sends a WebSocket ping this often.
    #[serde(with = "humantime_serde_compat")]
    pub ping_interval: Duration,
    /// Nothing received for this long: the connection is dead and the participant leaves.
    #[serde(with = "humantime_serde_compat")]
    pub dead_after: Duration,
    /// A connection must send `join` within this time.
    #[serde(with = "humantime_serde_compat")]
    pub join_timeout: Duration,
    /// How long the server waits for an answer to its subscriber offer.
    #[serde(with = "humantime_serde_compat")]
    pub answer_timeout: Duration,
    /// Requests per second a connection may send (burst of twice that).
    pub rate_limit_per_sec: u32,
    /// Longest time one WebSocket write (a message, ping or close frame) may take; a client
    /// that does not read for this long is disconnected as a slow reader (close code 4010).
    #[serde(with = "humantime_serde_compat")]
    pub write_timeout: Duration,
    /// Messages queued for one client at most; more means a slow reader (4010).
    pub send_queue_messages: usize,
    /// Bytes of messages queued for one client at most; more means a slow reader (4010).
    pub send_queue_bytes: usize,
    /// ICE candidates a client may trickle per peer connection; more get `bad_request`.
    pub max_candidates: usize,
    /// A participant that joined with `resumable` outlives a dropped connection this long
    /// (its seat, tracks and subscriptions stay; the room sees no leave) so that a phone
    /// changing networks can `resume` on a new connection. 0 turns resuming off.
    #[serde(with = "humantime_serde_compat")]
    pub resume_grace: Duration,
}

/// Defaults of every room's bridge (a start request may override the output parameters).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BridgeSettings {
    /// Start a room's bridge when its host first publishes (go live in one step).
    pub auto_start: bool,
    /// CDN destinations of automatically started bridges: rtmp:// URLs, or tables
    /// `{url = "rtmp://...", sign = {scheme = "tx_secret", key = "..."}}` for URLs the bridge
    /// signs itself. The embedded origin always gets the stream.
    pub auto_destinations: Vec<Destination>,
    /// Output resolution (even numbers; 720x1280 for portrait). With `size_from_host` it is
    /// used only when the host sends no H.264 within a few seconds of the start.
    pub width: u32,
    pub height: u32,
    /// The output takes the host's picture size (from its first SPS) unless a start request
    /// names a size; the host can then be passed through.
    pub size_from_host: bool,
    /// While the host is alone on screen, pass its own H.264 to viewers without decoding or
    /// encoding (the output mixes only while others are shown).
    pub passthrough: bool,
    /// A host whose IDRs come further apart than this is mixed instead of passed through.
    #[serde(with = "humantime_serde_compat")]
    pub passthrough_max_gop: Duration,
    pub fps: u32,
    /// H.264 target bitrate, bits per second.
    pub video_bitrate: u32,
    /// Keyframe interval.
    #[serde(with = "humantime_serde_compat")]
    pub gop: Duration,
    /// When the host's grace period ends without the host: `stop` stops the bridge (the live
    /// ends), `solo` keeps it streaming whoever is left (the host's tile comes back when they
    /// do).
    pub on_host_gone: HostGone,
    /// AAC-LC bitrate, bits per second (48 kHz stereo).
    pub audio_bitrate: u32,
    /// A picture whose aspect differs from its tile: `crop` or `letterbox`.
    pub fit: Fit,
    /// Audio jitter buffer per input (added latency; rides out network and scheduling jitter).
    #[serde(with = "humantime_serde_compat")]
    pub audio_buffer: Duration,
    /// CDN push reconnect: first delay, doubling up to `reconnect_max`.
    #[serde(with = "humantime_serde_compat")]
    pub reconnect_initial: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub reconnect_max: Duration,
    /// Give up on a destination after this many failed attempts in a row; 0 = never.
    pub reconnect_max_retries: u64,
    /// Solo (cheap) path: while the host is alone, an output frame whose picture has not
    /// changed is sent as a skipped picture instead of being composited and encoded.
    pub solo_repeat: bool,
    /// After the last co-host leaves (or a PK ends), mix every frame this long before going
    /// back to the solo path.
    #[serde(with = "humantime_serde_compat")]
    pub solo_idle: Duration,
    /// Operator caps on what a start request (REST or signaling) may ask for: a request above
    /// one is refused (400 `over_limit`, the message names the key). The defaults above must
    /// fit within them.
    pub max_width: u32,
    pub max_height: u32,
    pub max_fps: u32,
    pub max_video_bitrate: u32,
    pub max_audio_bitrate: u32,
    /// CDN destinations per bridge (`auto_destinations` count too).
    pub max_destinations: usize,
    /// A connected destination that takes no bytes for this long (a frozen CDN: the write
    /// blocks once the socket buffers are full) is reported `stalled` and reconnected.
    #[serde(with = "humantime_serde_compat")]
    pub stall_timeout: Duration,
    /// URL schemes callers may push to (only `rtmp` is implemented).
    pub destination_schemes: Vec<String>,
    /// When non-empty, the only host names non-admin callers may push to: exact names, or
    /// `*.example.com` for any name under example.com.
    pub destination_hosts: Vec<String>,
    /// Address ranges (CIDR) refused to non-admin callers besides the built-in ones (loopback,
    /// private, link-local, shared, unspecified, multicast, broadcast, documentation).
    pub destination_deny: Vec<Cidr>,
    /// Address ranges (CIDR) allowed to non-admin callers even though a built-in rule denies
    /// them (e.g. a CDN edge on the private network). `destination_deny` still wins.
    pub destination_allow: Vec<Cidr>,
    /// Admin callers (admin tokens, REST or signaling) skip the destination policy, like
    /// `auto_destinations` do. The caps above apply to everyone.
    pub admin_destinations_trusted: bool,
}

/// An address range in CIDR notation (`10.0.0.0/8`, `fd00::/8`; a bare address is a /32 or
/// /128). In the config file and the API it is a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in the range. IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) count as
    /// their IPv4 address, so a mapped address cannot slip past an IPv4 rule.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// `::ffff:a.b.c.d` as `a.b.c.d`; everything else as it is.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr = canonical_ip(
            a.parse()
                .map_err(|_| format!("{s:?} is not a CIDR range"))?,
        );
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0-{max}"))?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl TryFrom<String> for Cidr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        format!("{}/{}", c.addr, c.prefix)
    }
}

/// How a picture whose aspect ratio differs from its tile is fitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Fit {
    /// Fill the tile, cutting the overflow (no bars).
    #[default]
    Crop,
    /// Show the whole picture, with bars.
    Letterbox,
}

/// How the bridge signs a destination's URL itself, at every (re)connect, from a key the CDN
/// gave the operator (instead of a pasted URL that expires).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "scheme", rename_all = "snake_case")]
pub enum CdnSigning {
    /// Tencent-style: `?txSecret=md5(key + stream + txTime)&txTime={expiry as hex}`.
    TxSecret {
        key: String,
        /// Lifetime of each signature, seconds (default 86400).
        #[serde(default = "default_sign_ttl")]
        ttl_secs: u64,
    },
    /// Alibaba-style: `?auth_key={expiry}-{rand}-{uid}-md5("/{app}/{stream}-{expiry}-{rand}-{uid}-{key}")`.
    AuthKey {
        key: String,
        #[serde(default = "default_sign_ttl")]
        ttl_secs: u64,
        /// User id field of the signature (default "0").
        #[serde(default = "default_uid")]
        uid: String,
    },
}

fn default_sign_ttl() -> u64 {
    86_400
}

fn default_uid() -> String {
    "0".into()
}

impl std::fmt::Debug for CdnSigning {
    // Never print keys.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CdnSigning::TxSecret { ttl_secs, .. } => write!(f, "TxSecret(ttl {ttl_secs}s)"),
            CdnSigning::AuthKey { ttl_secs, .. } => write!(f, "AuthKey(ttl {ttl_secs}s)"),
        }
    }
}

/// A CDN destination: a plain `rtmp://` URL, or a URL plus a signing scheme the bridge applies
/// at each connect. In JSON either `"rtmp://..."` or `{"url": "rtmp://...", "sign": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Destination {
    Url(String),
    Signed { url: String, sign: CdnSigning },
}

impl From<String> for Destination {
    fn from(url: String) -> Self {
        Destination::Url(url)
    }
}

impl From<&str> for Destination {
    fn from(url: &str) -> Self {
        Destination::Url(url.to_string())
    }
}

impl Destination {
    /// The configured URL (without any signature the bridge adds); identifies the destination.
    pub fn url(&self) -> &str {
        match self {
            Destination::Url(u) | Destination::Signed { url: u, .. } => u,
        }
    }
}

/// `server.dev_tokens`: whether `POST /v1/dev/token` mints tokens for anyone who asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DevTokens {
    /// On only when `server.http_listen` is loopback and `auth.secret` is the development secret.
    #[default]
    Auto,
    /// On (loopback `server.http_listen` only: validation refuses it elsewhere).
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum HostGone {
    #[default]
    Solo,
    Stop,
}

/// Output parameters a bridge can encode: even sizes of 16 to 3840, 1 to 60 frames per second.
pub fn check_output(width: u32, height: u32, fps: u32) -> Result<(), String> {
    let size = |v: u32| (16..=3840).contains(&v) && v.is_multiple_of(2);
    if size(width) && size(height) && (1..=60).contains(&fps) {
        Ok(())
    } else {
        Err(format!(
            "{width}x{height} at {fps} fps: width/height must be even, 16-3840; fps 1-60"
        ))
    }
}

impl BridgeSettings {
    /// Check output parameters against the operator's caps (`max_*`); the error names the key.
    pub fn check_caps(
        &self,
        width: u32,
        height: u32,
        fps: u32,
        video_bitrate: u32,
        audio_bitrate: u32,
    ) -> Result<(), String> {
        let caps = [
            ("width", "max_width", width, self.max_width),
            ("height", "max_height", height, self.max_height),
            ("fps", "max_fps", fps, self.max_fps),
            (
                "video_bitrate",
                "max_video_bitrate",
                video_bitrate,
                self.max_video_bitrate,
            ),
            (
                "audio_bitrate",
                "max_audio_bitrate",
                audio_bitrate,
                self.max_audio_bitrate,
            ),
        ];
        for (what, key, value, max) in caps {
            if value > max {
                return Err(format!(
                    "{what} {value} is above the operator's limit bridge.{key} ({max})"
                ));
            }
        }
        Ok(())
    }
}

impl Default for BridgeSettings {
    fn default() -> Self {
        Self {
            auto_start: true,
            auto_destinations: vec![],
            width: 1280,
            height: 720,
            size_from_host: true,
            passthrough: true,
            passthrough_max_gop: Duration::from_secs(8),
            fps: 30,
            video_bitrate: 2_500_000,
            gop: Duration::from_secs(2),
            on_host_gone: HostGone::Stop,
            audio_bitrate: 128_000,
            fit: Default::default(),
            audio_buffer: Duration::from_millis(60),
            reconnect_initial: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            reconnect_max_retries: 0,
            solo_repeat: true,
            solo_idle: Duration::from_secs(30),
            max_width: 1920,
            max_height: 1920,
            max_fps: 60,
            max_video_bitrate: 8_000_000,
            max_audio_bitrate: 320_000,
            max_destinations: 5,
            stall_timeout: Duration::from_secs(5),
            destination_schemes: vec!["rtmp".into()],
            destination_hosts: vec![],
            destination_deny: vec![],
            destination_allow: vec![],
            admin_destinations_trusted: true,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            http_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            allow_dev_secret: false,
            rtmp_listen: "127.0.0.1:1935".into(),
            web_dir: "web".into(),
            dev_tokens: DevTokens::Auto,
            shutdown_timeout: Duration::from_secs(5),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            write_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            max_connections_per_ip: 256,
            max_header_bytes: 64 * 1024,
            max_body_bytes: 64 * 1024,
            max_flv_players: 1000,
            max_flv_players_per_stream: 500,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            secret: DEV_SECRET.into(),
            algorithm: "HS256".into(),
            token_ttl: Duration::from_secs(3600),
            leeway: Duration::from_secs(5),
        }
    }
}

impl Default for WebrtcConfig {
    fn default() -> Self {
        Self {
            bind_ip: IpAddr::from([127, 0, 0, 1]),
            udp_port_min: 50000,
            udp_port_max: 50999,
            public_ips: vec![],
            ice_tcp: false,
            ice_servers: vec![],
            ice_disconnected_timeout: Duration::from_secs(3),
            ice_failed_timeout: Duration::from_secs(5),
            ice_check_interval: Duration::from_millis(50),
            keyframe_request_interval: Duration::from_millis(250),
            media_stall_timeout: Duration::from_secs(5),
            socket_buffer_bytes: 4 * 1024 * 1024,
            subscriber_queue: 512,
            publisher_port_reserve: 100,
            bandwidth_estimate: false,
        }
    }
}

impl Default for RoomConfig {
    fn default() -> Self {
        Self {
            max_members: 10_000,
            max_participants: 200,
            max_publishers: 9,
            max_tracks_per_participant: 4,
            cohost_seats: 3,
            request_timeout: Duration::from_secs(30),
            host_grace: Duration::from_secs(30),
            message_history: 50,
            max_chat_chars: 300,
            messages_per_sec: 5,
            feed_batch: Duration::from_millis(50),
        }
    }
}

impl Default for SignalingConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 64 * 1024,
            ping_interval: Duration::from_secs(5),
            dead_after: Duration::from_secs(15),
            join_timeout: Duration::from_secs(10),
            answer_timeout: Duration::from_secs(10),
            rate_limit_per_sec: 50,
            write_timeout: Duration::from_secs(10),
            send_queue_messages: 1024,
            send_queue_bytes: 1024 * 1024,
            max_candidates: 100,
            resume_grace: Duration::from_secs(30),
        }
    }
}

impl Config {
    /// Defaults, then the file (if any), then `COHOST_SECTION__KEY=value` environment variables.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut value = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Parse(e.to_string()))?
            }
            None => toml::Table::new(),
        };
        apply_env(&mut value, std::env::vars())?;
        let cfg = Self::from_table(value)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parse a TOML document over the defaults (no environment), rejecting unknown keys.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let table = text
            .parse::<toml::Table>()
            .map_err(|e| ConfigError::Parse(e.to_string()))?;
        let cfg = Self::from_table(table)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn from_table(table: toml::Table) -> Result<Self, ConfigError> {
        Config::deserialize(toml::Value::Table(table))
            .map_err(|e| ConfigError::Parse(e.to_string().trim().to_string()))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let w = &self.webrtc;
        if w.udp_port_min == 0 || w.udp_port_min > w.udp_port_max {
            return Err(ConfigError::Invalid(format!(
                "webrtc.udp_port_min ({}) must be > 0 and <= webrtc.udp_port_max ({})",
                w.udp_port_min, w.udp_port_max
            )));
        }
        if !matches!(self.auth.algorithm.as_str(), "HS256" | "HS384" | "HS512") {
            return Err(ConfigError::Invalid(format!(
                "auth.algorithm must be HS256, HS384 or HS512, not {:?}",
                self.auth.algorithm
            )));
        }
        if self.auth.secret.len() < 16 {
            return Err(ConfigError::Invalid(
                "auth.secret must be at least 16 bytes".into(),
            ));
        }
        if self.room.max_participants == 0
            || self.room.max_publishers == 0
            || self.room.max_members == 0
        {
            return Err(ConfigError::Invalid(
                "room.max_members, room.max_participants and room.max_publishers must be at least 1"
                    .into(),
            ));
        }
        if self.room.feed_batch > Duration::from_secs(1) {
            return Err(ConfigError::Invalid(
                "room.feed_batch must be at most 1s".into(),
            ));
        }
        if self.signaling.max_message_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "signaling.max_message_bytes must be at least 1024".into(),
            ));
        }
        let sg = &self.signaling;
        if sg.write_timeout.is_zero()
            || sg.send_queue_messages < 16
            || sg.send_queue_bytes < sg.max_message_bytes
        {
            return Err(ConfigError::Invalid(
                "signaling.write_timeout must be > 0, signaling.send_queue_messages at least 16 \
                 and signaling.send_queue_bytes at least signaling.max_message_bytes"
                    .into(),
            ));
        }
        // A detached participant holds a seat and two peer connections: minutes, not hours.
        if sg.resume_grace > Duration::from_secs(600) {
            return Err(ConfigError::Invalid(
                "signaling.resume_grace must be at most 10m".into(),
            ));
        }
        let b = &self.bridge;
        check_output(b.width, b.height, b.fps)
            .map_err(|e| ConfigError::Invalid(format!("bridge: {e}")))?;
        if b.gop.is_zero()
            || b.audio_buffer > Duration::from_secs(1)
            || b.reconnect_initial.is_zero()
        {
            return Err(ConfigError::Invalid(
                "bridge.gop and bridge.reconnect_initial must be > 0, bridge.audio_buffer at most 1s".into(),
            ));
        }
        b.check_caps(b.width, b.height, b.fps, b.video_bitrate, b.audio_bitrate)
            .map_err(|e| ConfigError::Invalid(format!("bridge defaults: {e}")))?;
        if b.max_destinations == 0 || b.auto_destinations.len() > b.max_destinations {
            return Err(ConfigError::Invalid(format!(
                "bridge.max_destinations ({}) must be at least 1 and cover bridge.auto_destinations ({})",
                b.max_destinations,
                b.auto_destinations.len()
            )));
        }
        if b.stall_timeout < Duration::from_millis(500) {
            return Err(ConfigError::Invalid(
                "bridge.stall_timeout must be at least 500ms".into(),
            ));
        }
        if let Some(s) = b.destination_schemes.iter().find(|s| s.as_str() != "rtmp") {
            return Err(ConfigError::Invalid(format!(
                "bridge.destination_schemes: {s:?} is not supported (only \"rtmp\")"
            )));
        }
        if self.origin.key_ttl.is_zero() || self.origin.key_ttl > self.origin.key_max_ttl {
            return Err(ConfigError::Invalid(format!(
                "origin.key_ttl ({}) must be > 0 and at most origin.key_max_ttl ({})",
                humantime::format_duration(self.origin.key_ttl),
                humantime::format_duration(self.origin.key_max_ttl)
            )));
        }
        if w.subscriber_queue == 0 {
            return Err(ConfigError::Invalid(
                "webrtc.subscriber_queue must be at least 1".into(),
            ));
        }
        if self.server.dev_tokens == DevTokens::On && !self.server.http_listen.ip().is_loopback() {
            return Err(ConfigError::Invalid(format!(
                "server.dev_tokens = \"on\" needs a loopback server.http_listen (not {}): \
                 anyone reaching the port could mint host tokens",
                self.server.http_listen
            )));
        }
        let sv = &self.server;
        if sv.header_read_timeout.is_zero()
            || sv.idle_timeout.is_zero()
            || sv.write_timeout.is_zero()
            || sv.request_timeout.is_zero()
        {
            return Err(ConfigError::Invalid(
                "server.header_read_timeout, idle_timeout, write_timeout and request_timeout must be > 0".into(),
            ));
        }
        if sv.max_body_bytes < 1024 || sv.max_header_bytes < 8192 {
            return Err(ConfigError::Invalid(
                "server.max_body_bytes must be at least 1024 and server.max_header_bytes at least 8192".into(),
            ));
        }
        let o = &self.origin;
        if (o.sign_play || o.sign_publish) && o.sign_secret.len() < 16 {
            return Err(ConfigError::Invalid(
                "origin.sign_secret must be at least 16 bytes when origin.sign_play or origin.sign_publish is on".into(),
            ));
        }
        if self.whip.connect_timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "whip.connect_timeout must be > 0".into(),
            ));
        }

        if o.rtmp_write_timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "origin.rtmp_write_timeout must be more than zero".into(),
            ));
        }
        if !(64 * 1024..=0xff_ffff).contains(&o.rtmp_max_message_bytes) {
            return Err(ConfigError::Invalid(format!(
                "origin.rtmp_max_message_bytes must be 65536..=16777215, not {}",
                o.rtmp_max_message_bytes
            )));
        }
        self.webhooks.validate()?;
        self.hls.validate()?;
        self.recording.validate()?;
        for ip in &w.public_ips {
            if ip.parse::<IpAddr>().is_err() {
                return Err(ConfigError::Invalid(format!(
                    "webrtc.public_ips: {ip:?} is not an IP address"
                )));
            }
        }
        Ok(())
    }

    /// Whether `POST /v1/dev/token` is served (see [`DevTokens`]).
    pub fn dev_tokens_enabled(&self) -> bool {
        let loopback = self.server.http_listen.ip().is_loopback();
        match self.server.dev_tokens {
            DevTokens::Off => false,
            DevTokens::On => loopback,
            DevTokens::Auto => loopback && self.auth.secret == DEV_SECRET,
        }
    }

    /// True when the server would run a public address with the well-known development secret.
    pub fn dev_secret_exposed(&self) -> bool {
        self.auth.secret == DEV_SECRET
            && !(self.server.http_listen.ip().is_loopback() && self.webrtc.bind_ip.is_loopback())
    }
}

/// Apply `COHOST_SECTION__KEY=value` overrides onto a TOML table. The value is parsed as a TOML
/// value when it is one (`8080`, `true`, `["a"]`) and taken as a string otherwise.
/// `COHOST_CONFIG` and `COHOST_LOG` are not config keys and are skipped.
pub fn apply_env(
    table: &mut toml::Table,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    for (var, raw) in vars {
        let Some(rest) = var.strip_prefix("COHOST_") else {
            continue;
        };
        if rest == "CONFIG" || rest == "LOG" {
            continue;
        }
        let parts: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
            return Err(ConfigError::Env {
                var,
                msg: "expected COHOST_<SECTION>__<KEY>".into(),
            });
        }
        let value = parse_env_value(&raw);
        let section = table
            .entry(parts[0].clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match section {
            toml::Value::Table(t) => {
                t.insert(parts[1].clone(), value);
            }
            _ => {
                return Err(ConfigError::Env {
                    var,
                    msg: format!("{} is not a section", parts[0]),
                });
            }
        }
    }
    Ok(())
}

fn parse_env_value(raw: &str) -> toml::Value {
    // `key = <raw>` parses when raw is a TOML literal; otherwise treat it as a plain string.
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

/// Durations are written the human way in the file: "5s", "200ms", "1h".
mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_parse_types() {
        let mut t = toml::Table::new();
        apply_env(
            &mut t,
            vec![
                ("COHOST_ROOM__MAX_PARTICIPANTS".into(), "7".into()),
                (
                    "COHOST_AUTH__SECRET".into(),
                    "a-very-long-secret-value".into(),
                ),
                ("PATH".into(), "/bin".into()),
            ],
        )
        .unwrap();
        let cfg = Config::from_table(t).unwrap();
        assert_eq!(cfg.room.max_participants, 7);
        assert_eq!(cfg.auth.secret, "a-very-long-secret-value");
    }

    #[test]
    fn env_unknown_key_is_rejected() {
        let mut t = toml::Table::new();
        apply_env(&mut t, vec![("COHOST_ROOM__NOPE".into(), "1".into())]).unwrap();
        let err = Config::from_table(t).unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn dev_tokens_default_on_only_for_loopback_with_the_dev_secret() {
        let mut cfg = Config::default();
        assert!(cfg.dev_tokens_enabled(), "loopback + development secret");
        cfg.auth.secret = "a-real-secret-of-some-length".into();
        assert!(!cfg.dev_tokens_enabled(), "a real secret turns auto off");
        cfg.server.dev_tokens = DevTokens::On;
        assert!(cfg.dev_tokens_enabled(), "explicitly on, on loopback");
        let mut cfg = Config::default();
        cfg.server.http_listen = "0.0.0.0:8080".parse().unwrap();
        assert!(!cfg.dev_tokens_enabled(), "auto is off on a public address");
        let mut cfg = Config::default();
        cfg.server.dev_tokens = DevTokens::Off;
        assert!(!cfg.dev_tokens_enabled());
    }

    #[test]
    fn dev_tokens_on_with_a_public_address_is_refused() {
        let err = Config::from_toml_str(
            "[server]\nhttp_listen = \"0.0.0.0:8080\"\ndev_tokens = \"on\"\n\
             [auth]\nsecret = \"a-real-secret-of-some-length\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("server.dev_tokens"), "{err}");
        let err = Config::from_toml_str("[server]\ndev_tokens = \"maybe\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("maybe") || err.contains("variant"), "{err}");
    }

    #[test]
    fn dev_secret_on_public_address_is_flagged() {
        let mut cfg = Config::default();
        assert!(!cfg.dev_secret_exposed());
        cfg.server.http_listen = "0.0.0.0:8080".parse().unwrap();
        assert!(cfg.dev_secret_exposed());
    }
}
