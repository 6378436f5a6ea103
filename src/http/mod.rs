//! The HTTP surface: WebSocket signaling at `/ws`, health, metrics, the REST API and the demo
//! page. Handlers translate between HTTP and the services; room rules live elsewhere.

mod flv;
mod hls;
mod ingest;
mod recording;
pub mod serve;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tower_http::services::ServeDir;

use crate::auth::{Claims, Role};
use crate::participant::Services;

mod whip;
mod ws;

pub fn router(svc: Arc<Services>) -> Router {
    let web = ServeDir::new(&svc.cfg.server.web_dir);
    Router::new()
        .route("/healthz", get(healthz))
        .route("/ws", get(ws::upgrade))
        .route("/metrics", get(metrics))
        .route("/v1/rooms", get(list_rooms))
        .route("/v1/rooms/{room}", get(get_room))
        .route("/v1/rooms/{room}/messages", get(room_messages))
        .route("/v1/rooms/{room}/actions", axum::routing::post(room_action))
        .route(
            "/live/{file}",
            get(flv::http_flv).layer(axum::Extension(flv::FlvPlayers::new(
                svc.cfg.server.max_flv_players,
                svc.cfg.server.max_flv_players_per_stream,
                svc.metrics.clone(),
            ))),
        )
        // HLS under the stream's name (`/live/{stream}/index.m3u8`); the same parameter name
        // as the HTTP-FLV route at that position, which the router requires.
        .route(
            "/live/{file}/{name}",
            get(hls::get)
                .options(hls::preflight)
                .layer(axum::Extension(crate::hls::Hls::new(
                    svc.cfg.hls.clone(),
                    svc.origin.clone(),
                    svc.metrics.clone(),
                    svc.shutdown.clone(),
                )))
                .layer(axum::middleware::map_response(hls::cors)),
        )
        .route(
            "/v1/rooms/{room}/stream-keys",
            axum::routing::post(ingest::mint_stream_key).delete(ingest::revoke_stream_keys),
        )
        .route(
            "/v1/streams/{stream}/signed-url",
            axum::routing::post(ingest::signed_url),
        )
        .route(
            "/v1/rooms/{room}/bridge",
            get(bridge_status)
                .post(bridge_start)
                .patch(bridge_update)
                .delete(bridge_stop),
        )
        .route(
            "/v1/rooms/{room}/recording",
            get(recording::status)
                .post(recording::start)
                .delete(recording::stop),
        )
        .route("/v1/rooms/{room}/recordings", get(recording::list))
        .route(
            "/v1/rooms/{room}/recordings/{file}",
            get(recording::download),
        )
        .route("/recordings/{room}/{file}", get(recording::replay))
        .route("/v1/dev/token", get(dev_token_status).post(dev_token))
        .route("/vendor/mpegts.js", get(vendor_mpegts))
        .merge(whip::routes())
        .fallback_service(web)
        // Every body-reading extractor (Json, Bytes) is bounded; WHIP/WHEP routes set their
        // own (inner, so it wins) limit for SDP.
        .layer(axum::extract::DefaultBodyLimit::max(
            svc.cfg.server.max_body_bytes,
        ))
        .with_state(svc)
}

async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

async fn metrics(State(svc): State<Arc<Services>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        svc.metrics.render(&svc.rooms, &svc.peers)
            + &svc.whip.render_metrics()
            + &svc.recordings.render_metrics(),
    )
}

fn api_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

/// The bearer token's claims, or 401. Every authenticated endpoint calls this before it looks
/// at its path, query or body, so a caller without a valid token learns nothing about what
/// the endpoint would accept.
fn authenticate(svc: &Services, headers: &HeaderMap) -> Result<Claims, Box<Response>> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            api_error(
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                "missing bearer token",
            )
        })?;
    svc.auth.verify(token.trim()).map_err(|e| {
        Box::new(api_error(
            StatusCode::UNAUTHORIZED,
            e.code(),
            &e.to_string(),
        ))
    })
}

/// REST calls need role admin (any room with `*`) or host of the room: 403 otherwise.
fn permit(claims: &Claims, room: Option<&str>) -> Result<(), Box<Response>> {
    let ok = match (claims.role, room) {
        (Role::Admin, _) if claims.room == "*" => true,
        (Role::Admin | Role::Host, Some(r)) => claims.room == r,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(Box::new(api_error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "needs an admin token (or the room's host token)",
        )))
    }
}

/// [`authenticate`] then [`permit`].
fn authorize(
    svc: &Services,
    headers: &HeaderMap,
    room: Option<&str>,
) -> Result<Claims, Box<Response>> {
    let claims = authenticate(svc, headers)?;
    permit(&claims, room)?;
    Ok(claims)
}

/// A path parameter, or 400 in our error format (axum's rejection is plain text).
fn path_param<T>(p: Result<Path<T>, PathRejection>) -> Result<T, Box<Response>> {
    p.map(|Path(v)| v).map_err(|e| {
        Box::new(api_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            &format!("bad path: {}", e.body_text()),
        ))
    })
}

/// Largest JSON body of the REST API.
/// Read and parse a JSON body, after authentication (the body is taken as a raw `Body`
/// so that no extractor parses it before the handler has checked the token). Empty means
/// `T::default()`. Errors are 413 or 400 in our error format, never axum's rejection text.
/// `limit` is `server.max_body_bytes`: a raw `Body` is not bounded by the router's
/// `DefaultBodyLimit`, so the limit is applied here.
async fn json_body<T: serde::de::DeserializeOwned + Default>(
    body: Body,
    limit: usize,
) -> Result<T, Box<Response>> {
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        Box::new(api_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            &format!(
                "the body is larger than {limit} bytes (server.max_body_bytes) or was cut off"
            ),
        ))
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    let bad = |msg: String| Box::new(api_error(StatusCode::BAD_REQUEST, "bad_request", &msg));
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let v = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| bad(format!("invalid JSON body at {}: {}", e.path(), e.inner())))?;
    de.end()
        .map_err(|e| bad(format!("invalid JSON body: {e}")))?;
    Ok(v)
}

#[derive(Deserialize)]
struct FeedQuery {
    #[serde(default)]
    since: u64,
    /// Seconds to wait for a message when there is none after `since` (long-poll), 0-30.
    #[serde(default)]
    wait: u64,
}

/// The read-only message feed for viewers who are not on the WebSocket (CDN viewers): the
/// room's messages after `since`, waiting up to `wait` seconds for one if there is none yet.
async fn room_messages(
    State(svc): State<Arc<Services>>,
    room: Result<Path<String>, PathRejection>,
    q: Result<Query<FeedQuery>, QueryRejection>,
) -> Response {
    let room = match path_param(room) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let Ok(Query(q)) = q else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "since and wait must be non-negative integers",
        );
    };
    let Some(r) = svc.rooms.get(&room) else {
        return api_error(StatusCode::NOT_FOUND, "not_found", "no such room");
    };
    let mut watch = r.message_watch();
    let mut messages = r.messages_since(q.since);
    if messages.is_empty() && q.wait > 0 {
        // A waiting poll holds its connection (bounded by the HTTP connection caps): at most
        // 30 s, and well within server.request_timeout so it answers rather than times out.
        let wait = Duration::from_secs(q.wait.min(30)).min(svc.cfg.server.request_timeout / 2);
        let mut stop = svc.shutdown.clone();
        tokio::select! {
            _ = tokio::time::timeout(wait, watch.wait_for(|last| *last > q.since)) => {}
            // Shutting down: answer now so the connection can close.
            Ok(_) = stop.wait_for(|v| *v) => {}
        }
        messages = r.messages_since(q.since);
    }
    let next = messages.last().map_or(q.since, |m| m.id);
    (
        [(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*")],
        Json(json!({"room": room, "messages": messages, "next": next})),
    )
        .into_response()
}

/// Moderation by an operator or the host's backend: the host actions of the signaling protocol
/// (`kick`, `remove_cohost`, `invite_cohost`, `answer_cohost_request`, `mute_track`,
/// `mute_chat`, `delete_message`, `pk_end`) with the same JSON body.
async fn room_action(
    State(svc): State<Arc<Services>>,
    RoomAccess { room, .. }: RoomAccess,
    body: Body,
) -> Response {
    use crate::signaling::protocol::ClientMessage as M;
    let msg: M = match json_body::<Option<M>>(body, svc.cfg.server.max_body_bytes).await {
        Ok(Some(m)) => m,
        Ok(None) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "expected a host action as JSON",
            );
        }
        Err(r) => return *r,
    };
    let Some(r) = svc.rooms.get(&room) else {
        return api_error(StatusCode::NOT_FOUND, "not_found", "no such room");
    };
    let a = crate::room::Actor::operator();
    let result = match msg {
        M::Kick { participant_id } => r.kick(a, &participant_id),
        M::RemoveCohost { participant_id } => r.remove_cohost(a, &participant_id),
        M::InviteCohost { participant_id } => r.invite_cohost(a, &participant_id),
        M::AnswerCohostRequest {
            participant_id,
            approve,
        } => r.answer_cohost_request(a, &participant_id, approve),
        M::MuteTrack {
            participant_id,
            kind,
            muted,
        } => r.mute_track(a, &participant_id, kind, muted),
        M::MuteChat {
            participant_id,
            muted,
        } => r.mute_chat(a, &participant_id, muted),
        M::DeleteMessage { message_id } => r.delete_message(a, message_id),
        M::PkEnd => svc.rooms.pk_end(&r, a),
        other => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("{} is not a host action", other.name()),
            );
        }
    };
    match result {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => {
            let status = match e {
                crate::room::RoomError::NotFound(_)
                | crate::room::RoomError::UnknownParticipant(_)
                | crate::room::RoomError::NotMember => StatusCode::NOT_FOUND,
                crate::room::RoomError::NotHost => StatusCode::FORBIDDEN,
                _ => StatusCode::CONFLICT,
            };
            let code = serde_json::to_value(e.code())
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            api_error(status, &code, &e.to_string())
        }
    }
}

async fn list_rooms(State(svc): State<Arc<Services>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&svc, &headers, None) {
        return *r;
    }
    let rooms: Vec<_> = svc
        .rooms
        .rooms()
        .iter()
        .map(|r| {
            let counts = r.counts();
            json!({
                "name": r.name,
                "members": counts.members,
                "participants": counts.participants,
                "viewers": viewers(&svc, &r.name),
                "publishers": r.publisher_count(),
                "tracks": r.tracks().len(),
                "age_secs": r.created.elapsed().as_secs(),
            })
        })
        .collect();
    Json(json!({ "rooms": rooms })).into_response()
}

async fn get_room(
    State(svc): State<Arc<Services>>,
    RoomAccess { room, .. }: RoomAccess,
) -> Response {
    let Some(r) = svc.rooms.get(&room) else {
        return api_error(StatusCode::NOT_FOUND, "not_found", "no such room");
    };
    let tracks: Vec<_> = r
        .tracks()
        .iter()
        .map(|t| {
            json!({
                "id": t.id,
                "participant_id": t.participant_id,
                "kind": t.kind,
                "codec": t.codec.mime_type,
                "subscribers": t.subscriber_count(),
                "packets_in": t.stats.packets_in.load(Ordering::Relaxed),
                "bytes_in": t.stats.bytes_in.load(Ordering::Relaxed),
                "packets_out": t.stats.packets_out.load(Ordering::Relaxed),
                "dropped": t.stats.dropped.load(Ordering::Relaxed),
                "bitrate_bps": t.stats.bitrate_bps.load(Ordering::Relaxed),
                "packets_lost": t.stats.packets_lost.load(Ordering::Relaxed),
                "keyframe_requests": t.stats.keyframe_requests.load(Ordering::Relaxed),
                "nacks_sent": t.stats.nacks_sent.load(Ordering::Relaxed),
                "nacked_packets": t.stats.nacked_packets.load(Ordering::Relaxed),
                "stalled": t.stats.stalled.load(Ordering::Relaxed),
            })
        })
        .collect();
    let counts = r.counts();
    Json(json!({
        "name": r.name,
        "counts": {
            "members": counts.members,
            "participants": counts.participants,
            "viewers": viewers(&svc, &r.name),
        },
        "participants": r.participants_detailed(),
        "tracks": tracks,
    }))
    .into_response()
}

/// Players of the room's stream on the embedded origin (HTTP-FLV and RTMP viewers), not
/// counting the bridge's own CDN pushes, which play from the origin too.
fn viewers(svc: &Services, room: &str) -> usize {
    let pushes = svc.bridges.get(room).map_or(0, |h| h.destinations.len());
    svc.origin.player_count(room).saturating_sub(pushes)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct BridgeUpdate {
    /// `null` unpins (the layout follows the room again); absent leaves it as it is.
    #[serde(default, with = "double_option")]
    layout: Option<Option<crate::bridge::layout::Layout>>,
    #[serde(default)]
    add_destinations: Vec<crate::config::Destination>,
    #[serde(default)]
    remove_destinations: Vec<String>,
}

/// Distinguish an absent field from an explicit `null`.
mod double_option {
    use serde::{Deserialize, Deserializer};
    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}

/// The caller may act on the room named in the path, checked in this order: the token (401),
/// the room in the path (400), whether the token may act on it (403); rejections in our error
/// format. An extractor, so a handler names it among its arguments (before a body) instead of
/// repeating the checks.
pub(super) struct RoomAccess {
    pub claims: Claims,
    pub room: String,
}

impl FromRequestParts<Arc<Services>> for RoomAccess {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        svc: &Arc<Services>,
    ) -> Result<Self, Self::Rejection> {
        let room = Path::<String>::from_request_parts(parts, svc).await;
        let check = || {
            let claims = authenticate(svc, &parts.headers)?;
            let room = path_param(room)?;
            permit(&claims, Some(&room))?;
            Ok(RoomAccess { claims, room })
        };
        check().map_err(|r: Box<Response>| *r)
    }
}

/// `admin`: show each destination's full last error (OS error, address); hosts see the code
/// only (see `rtmp::push::PushError`).
fn bridge_json(
    name: &str,
    h: &crate::bridge::control::BridgeHandle,
    admin: bool,
) -> serde_json::Value {
    json!({
        "room": name,
        "config": h.bridge.config,
        "layout": h.bridge.layout(),
        "stats": h.bridge.stats(),
        "play": {
            "http_flv": format!("/live/{name}.flv"),
            "hls": format!("/live/{name}/index.m3u8"),
            "rtmp": format!("rtmp://HOST/live/{name}"),
        },
        "destinations": h
            .destinations
            .iter()
            .map(|(_, p)| {
                let mut s = p.status();
                if !admin {
                    s.last_error_detail = None;
                }
                s
            })
            .collect::<Vec<_>>(),
    })
}

fn control_error(e: &crate::bridge::control::ControlError) -> Response {
    use crate::bridge::control::ControlError as E;
    let (status, code) = match e {
        E::NoRoom | E::NotRunning => (StatusCode::NOT_FOUND, "not_found"),
        E::AlreadyRunning => (StatusCode::CONFLICT, "already_running"),
        E::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
        E::BadDestination(_) => (StatusCode::BAD_REQUEST, "bad_destination"),
        E::OverLimit(_) => (StatusCode::BAD_REQUEST, "over_limit"),
        E::TooManyDestinations(_) => (StatusCode::BAD_REQUEST, "too_many_destinations"),
        E::DestinationRefused(_) => (StatusCode::BAD_REQUEST, "destination_refused"),
    };
    api_error(status, code, &e.to_string())
}

/// `POST /v1/rooms/{room}/bridge`: start mixing the room into one stream.
async fn bridge_start(
    State(svc): State<Arc<Services>>,
    RoomAccess { claims, room }: RoomAccess,
    body: Body,
) -> Response {
    let req: crate::bridge::control::BridgeRequest =
        match json_body(body, svc.cfg.server.max_body_bytes).await {
            Ok(r) => r,
            Err(r) => return *r,
        };
    if let Err(e) = crate::bridge::control::start(&svc.bridge_ctl(Some(claims.role)), &room, req) {
        return control_error(&e);
    }
    let admin = claims.role == Role::Admin;
    match svc.bridges.get(&room) {
        Some(h) => (StatusCode::CREATED, Json(bridge_json(&room, &h, admin))).into_response(),
        None => control_error(&crate::bridge::control::ControlError::NotRunning),
    }
}

async fn bridge_status(
    State(svc): State<Arc<Services>>,
    RoomAccess { claims, room }: RoomAccess,
) -> Response {
    match svc.bridges.get(&room) {
        Some(h) => Json(bridge_json(&room, &h, claims.role == Role::Admin)).into_response(),
        None => api_error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no bridge for this room",
        ),
    }
}

async fn bridge_update(
    State(svc): State<Arc<Services>>,
    RoomAccess { claims, room }: RoomAccess,
    body: Body,
) -> Response {
    use crate::bridge::control;
    let req: BridgeUpdate = match json_body(body, svc.cfg.server.max_body_bytes).await {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let ctl = svc.bridge_ctl(Some(claims.role));
    // Destinations first: a refused update (policy, cap) changes nothing, layout included.
    if let Err(e) =
        control::update_destinations(&ctl, &room, &req.add_destinations, &req.remove_destinations)
    {
        return control_error(&e);
    }
    if let Some(layout) = req.layout
        && let Err(e) = control::set_layout(&ctl, &room, layout)
    {
        return control_error(&e);
    }
    match svc.bridges.get(&room) {
        Some(h) => Json(bridge_json(&room, &h, claims.role == Role::Admin)).into_response(),
        None => control_error(&control::ControlError::NotRunning),
    }
}

async fn bridge_stop(
    State(svc): State<Arc<Services>>,
    RoomAccess { room, .. }: RoomAccess,
) -> Response {
    // Through bridge control like the host's `stop_bridge`: the room is not live any more
    // (an empty room kept for its host ends now) and `bridge_stopped` is reported.
    match crate::bridge::control::stop(&svc.bridge_ctl(None), &room) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(_) => api_error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no bridge for this room",
        ),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DevTokenRequest {
    room: String,
    identity: String,
    role: String,
}

/// `GET /v1/dev/token`: whether the development token endpoint is on (the demo page asks).
async fn dev_token_status(State(svc): State<Arc<Services>>) -> Response {
    Json(json!({"enabled": svc.cfg.dev_tokens_enabled()})).into_response()
}

/// `POST /v1/dev/token` `{room, identity, role}` -> `{token}`: development only (see
/// `server.dev_tokens`); never mints admin tokens.
async fn dev_token(
    State(svc): State<Arc<Services>>,
    body: Result<Json<DevTokenRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if !svc.cfg.dev_tokens_enabled() {
        return api_error(
            StatusCode::NOT_FOUND,
            "dev_tokens_off",
            "the development token endpoint is off (server.dev_tokens); paste a token minted by your backend or `cohost token`",
        );
    }
    let Ok(Json(req)) = body else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "expected JSON {\"room\", \"identity\", \"role\"}",
        );
    };
    let role = match req.role.as_str() {
        "host" => Role::Host,
        "cohost" => Role::Cohost,
        "audience" => Role::Audience,
        _ => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "role must be host, cohost or audience",
            );
        }
    };
    match svc.auth.mint(&req.room, &req.identity, role, None) {
        Ok(token) => {
            tracing::info!(room = %req.room, identity = %req.identity, role = role.as_str(), "development token minted");
            Json(json!({"token": token})).into_response()
        }
        Err(e) => api_error(StatusCode::BAD_REQUEST, "bad_request", &e.to_string()),
    }
}

/// `GET /vendor/mpegts.js`: the HTTP-FLV player the demo page uses, installed from npm into
/// `{web_dir}/node_modules` (not kept in git).
async fn vendor_mpegts(State(svc): State<Arc<Services>>) -> Response {
    let path =
        std::path::Path::new(&svc.cfg.server.web_dir).join("node_modules/mpegts.js/dist/mpegts.js");
    match tokio::fs::read(&path).await {
        Ok(js) => (
            [
                (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            js,
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "mpegts.js is not installed");
            (
                StatusCode::NOT_FOUND,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                format!(
                    "mpegts.js is not installed ({}): run `npm ci --prefix web`\n",
                    path.display()
                ),
            )
                .into_response()
        }
    }
}
