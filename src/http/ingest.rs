//! REST endpoints of RTMP ingest and signed origin URLs, and the HTTP-FLV signature check.
//!
//! - `POST /v1/rooms/{room}/stream-keys` mints a stream key (OBS: `rtmp://HOST:1935/live` +
//!   the key).
//! - `DELETE /v1/rooms/{room}/stream-keys` revokes every key of the room issued so far.
//! - `POST /v1/streams/{stream}/signed-url` signs play URLs of the embedded origin.
//!
//! Every handler checks the token before it parses its path or body.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{RoomAccess, api_error, authenticate, json_body, path_param, permit};
use crate::auth::{Role, now_secs, sign, valid_name};
use crate::participant::Services;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct KeyRequest {
    identity: String,
    #[serde(default)]
    role: Option<Role>,
    /// Lifetime, e.g. "2h" (default `origin.key_ttl`, at most `origin.key_max_ttl`).
    #[serde(default)]
    ttl: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SignRequest {
    #[serde(default)]
    ttl: Option<String>,
}

/// The requested lifetime, capped by `origin.key_max_ttl` (a longer one is refused, not
/// shortened: the caller would otherwise hand out a key that dies earlier than it thinks).
fn ttl_of(svc: &Services, ttl: Option<&str>) -> Result<Duration, Box<Response>> {
    let ttl = match ttl {
        None => svc.cfg.origin.key_ttl,
        Some(t) => humantime::parse_duration(t).map_err(|e| {
            Box::new(api_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("ttl: {e}"),
            ))
        })?,
    };
    svc.stream_keys.check_ttl(ttl).map_err(|e| {
        Box::new(api_error(
            StatusCode::BAD_REQUEST,
            e.code(),
            &format!(
                "ttl {} is above the server's limit origin.key_max_ttl ({})",
                humantime::format_duration(ttl),
                humantime::format_duration(svc.cfg.origin.key_max_ttl)
            ),
        ))
    })?;
    Ok(ttl)
}

/// `HOST` of the request (without its port), for the URLs shown back.
fn host_of(headers: &HeaderMap) -> String {
    headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(|h| match h.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name.to_string(),
            _ => h.to_string(),
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "HOST".into())
}

fn rtmp_port(svc: &Services) -> String {
    svc.cfg
        .server
        .rtmp_listen
        .rsplit_once(':')
        .map_or("1935".into(), |(_, p)| p.to_string())
}

pub(super) async fn mint_stream_key(
    State(svc): State<Arc<Services>>,
    RoomAccess { room, .. }: RoomAccess,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let req: KeyRequest = match json_body(body, svc.cfg.server.max_body_bytes).await {
        Ok(r) => r,
        Err(r) => return *r,
    };
    if !valid_name(&room) || !valid_name(&req.identity) {
        return api_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "room and identity must be 1-64 chars of [A-Za-z0-9._-]",
        );
    }
    let ttl = match ttl_of(&svc, req.ttl.as_deref()) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    let now = now_secs();
    // After any revocation of the room, even one in this same second.
    let issued = svc.stream_keys.issue_time(&room, now);
    let expires = now.saturating_add(ttl.as_secs());
    let role = req.role.unwrap_or(Role::Host);
    match sign::mint_stream_key_at(
        svc.cfg.auth.secret.as_bytes(),
        &room,
        &req.identity,
        role,
        issued,
        expires,
    ) {
        Ok(key) => {
            let server = format!("rtmp://{}:{}/live", host_of(&headers), rtmp_port(&svc));
            let mut url = format!("{server}/{key}");
            if svc.cfg.origin.sign_publish {
                let q = sign::signed_query(
                    svc.cfg.origin.sign_secret.as_bytes(),
                    &format!("/live/{key}"),
                    expires,
                );
                url = format!("{url}?{q}");
            }
            (
                StatusCode::CREATED,
                Json(json!({
                    "room": room,
                    "identity": req.identity,
                    "role": role,
                    "stream_key": key,
                    "server": server,
                    "url": url,
                    "expires": expires,
                })),
            )
                .into_response()
        }
        Err(e) => api_error(StatusCode::BAD_REQUEST, "bad_request", &e.to_string()),
    }
}

/// `DELETE /v1/rooms/{room}/stream-keys`: every key of the room issued until now stops
/// working (RTMP publishers using one are refused, and live ones disconnected). Keys minted
/// afterwards work. In memory: a restart forgets revocations (see docs/api.md).
pub(super) async fn revoke_stream_keys(
    State(svc): State<Arc<Services>>,
    RoomAccess { claims, room }: RoomAccess,
) -> Response {
    if !valid_name(&room) {
        return api_error(StatusCode::BAD_REQUEST, "bad_request", "bad room name");
    }
    match svc.stream_keys.revoke(&room, now_secs()) {
        Ok(at) => {
            tracing::info!(%room, by = %claims.sub, role = claims.role.as_str(), "stream keys revoked");
            Json(json!({"room": room, "revoked_before": at})).into_response()
        }
        Err(e) => api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            &e.to_string(),
        ),
    }
}

pub(super) async fn signed_url(
    State(svc): State<Arc<Services>>,
    stream: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let stream = match authenticate(&svc, &headers).and_then(|c| {
        permit(&c, None)?;
        path_param(stream)
    }) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let req: SignRequest = match json_body(body, svc.cfg.server.max_body_bytes).await {
        Ok(r) => r,
        Err(r) => return *r,
    };
    if !valid_name(&stream) {
        return api_error(StatusCode::BAD_REQUEST, "bad_request", "bad stream name");
    }
    if svc.cfg.origin.sign_secret.is_empty() {
        return api_error(
            StatusCode::CONFLICT,
            "signing_disabled",
            "origin.sign_secret is not configured",
        );
    }
    let ttl = match ttl_of(&svc, req.ttl.as_deref()) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    let expires = now_secs().saturating_add(ttl.as_secs());
    let q = sign::signed_query(
        svc.cfg.origin.sign_secret.as_bytes(),
        &format!("/live/{stream}"),
        expires,
    );
    let host = host_of(&headers);
    let http_port = svc.cfg.server.http_listen.port();
    Json(json!({
        "stream": stream,
        "expires": expires,
        "query": q,
        "rtmp": format!("rtmp://{host}:{}/live/{stream}?{q}", rtmp_port(&svc)),
        "flv": format!("http://{host}:{http_port}/live/{stream}.flv?{q}"),
    }))
    .into_response()
}

/// HTTP-FLV play: the signature check when `origin.sign_play` is on.
pub(super) fn check_play(
    svc: &Services,
    stream: &str,
    query: Option<&str>,
) -> Result<(), Box<Response>> {
    if !svc.cfg.origin.sign_play {
        return Ok(());
    }
    let q = format!("?{}", query.unwrap_or(""));
    let (_, pairs) = sign::split_query(&q);
    sign::verify_signed(
        svc.cfg.origin.sign_secret.as_bytes(),
        &format!("/live/{stream}"),
        &pairs,
        now_secs(),
    )
    .map_err(|e| {
        tracing::warn!(%stream, "http-flv play refused: URL signature: {e}");
        Box::new(api_error(
            StatusCode::FORBIDDEN,
            e.code(),
            &format!("play URL signature: {e}"),
        ))
    })
}
