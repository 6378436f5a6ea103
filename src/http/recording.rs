//! REST endpoints of recording (src/recording/ owns it):
//!
//! - `POST /v1/rooms/{room}/recording` starts recording the room's output, `DELETE` stops it,
//!   `GET` tells its state.
//! - `GET /v1/rooms/{room}/recordings[?before=FILE]` lists the room's files, newest first.
//! - `GET /v1/rooms/{room}/recordings/{file}` downloads one (bearer token), and
//!   `GET /recordings/{room}/{file}` does without a token: the replay URL players get, signed
//!   like the live stream's when `origin.sign_play` is on. Both serve byte ranges.
//!
//! Every authenticated handler checks the token before it parses its path or query.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{RoomAccess, api_error, path_param};
use crate::auth::{now_secs, sign};
use crate::participant::Services;
use crate::recording::{RecordingError, StopReason};

fn rec_error(e: &RecordingError) -> Response {
    use RecordingError as E;
    let (status, code) = match e {
        E::NoRoom | E::NotRecording | E::NotFound => (StatusCode::NOT_FOUND, "not_found"),
        E::AlreadyRecording => (StatusCode::CONFLICT, "already_recording"),
        E::TooMany(_) => (StatusCode::CONFLICT, "too_many_recordings"),
        E::BadName => (StatusCode::BAD_REQUEST, "bad_request"),
        E::Io(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    };
    api_error(status, code, &e.to_string())
}

/// The path a replay URL signs (as `/live/{stream}` is for the live stream).
fn signed_path(room: &str, file: &str) -> String {
    format!("/recordings/{room}/{file}")
}

/// The replay URL of a file: signed (for `origin.key_ttl`) when `origin.sign_play` is on.
fn replay_url(svc: &Services, room: &str, file: &str) -> String {
    let path = signed_path(room, file);
    if !svc.cfg.origin.sign_play {
        return path;
    }
    let expires = now_secs().saturating_add(svc.cfg.origin.key_ttl.as_secs());
    let q = sign::signed_query(svc.cfg.origin.sign_secret.as_bytes(), &path, expires);
    format!("{path}?{q}")
}

/// `POST /v1/rooms/{room}/recording`.
pub(super) async fn start(
    State(svc): State<Arc<Services>>,
    RoomAccess { claims, room }: RoomAccess,
) -> Response {
    match svc.recordings.start(&room) {
        Ok(status) => {
            tracing::info!(%room, by = %claims.sub, "recording requested");
            (
                StatusCode::CREATED,
                Json(json!({"room": room, "recording": status})),
            )
                .into_response()
        }
        Err(e) => rec_error(&e),
    }
}

/// `DELETE /v1/rooms/{room}/recording`.
pub(super) async fn stop(
    State(svc): State<Arc<Services>>,
    RoomAccess { room, .. }: RoomAccess,
) -> Response {
    match svc.recordings.stop(&room, StopReason::Requested) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => rec_error(&e),
    }
}

/// `GET /v1/rooms/{room}/recording`.
pub(super) async fn status(
    State(svc): State<Arc<Services>>,
    RoomAccess { room, .. }: RoomAccess,
) -> Response {
    match svc.recordings.status(&room) {
        Some(s) => Json(json!({"room": room, "recording": s})).into_response(),
        None => rec_error(&RecordingError::NotRecording),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    before: Option<String>,
}

/// `GET /v1/rooms/{room}/recordings`.
pub(super) async fn list(
    State(svc): State<Arc<Services>>,
    RoomAccess { room, .. }: RoomAccess,
    q: Result<axum::extract::Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(axum::extract::Query(q)) = q else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the only query parameter is before={file name}",
        );
    };
    let svc2 = svc.clone();
    let room2 = room.clone();
    // Directory listing and file heads: blocking I/O, off the async workers.
    let files = match tokio::task::spawn_blocking(move || {
        svc2.recordings.list(&room2, q.before.as_deref())
    })
    .await
    {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => return rec_error(&e),
        Err(_) => return rec_error(&RecordingError::Io("listing failed".into())),
    };
    let limit = svc.cfg.recording.list_limit;
    let next = (files.len() >= limit)
        .then(|| files.last().map(|f| f.file.clone()))
        .flatten();
    let files: Vec<_> = files
        .into_iter()
        .map(|f| {
            let url = replay_url(&svc, &room, &f.file);
            let mut v = serde_json::to_value(&f).unwrap_or_default();
            v["url"] = json!(url);
            v
        })
        .collect();
    Json(json!({
        "room": room,
        "recording": svc.recordings.status(&room),
        "files": files,
        "next_before": next,
    }))
    .into_response()
}

/// Serve a file with byte ranges (tower-http's `ServeFile`: `Range`, `If-Modified-Since`,
/// `HEAD`).
async fn serve(path: std::path::PathBuf, req_headers: &HeaderMap) -> Response {
    let mut req = Request::new(Body::empty());
    for h in [header::RANGE, header::IF_RANGE, header::IF_MODIFIED_SINCE] {
        if let Some(v) = req_headers.get(&h) {
            req.headers_mut().insert(h, v.clone());
        }
    }
    // The type comes from the extension (`.mp4`: video/mp4).
    let mut sf = tower_http::services::ServeFile::new(&path);
    match sf.try_call(req).await {
        Ok(r) => {
            let (mut parts, body) = r.into_parts();
            parts.headers.insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                header::HeaderValue::from_static("*"),
            );
            Response::from_parts(parts, Body::new(body))
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), "recording download failed: {e}");
            api_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "cannot read the file",
            )
        }
    }
}

/// `GET /v1/rooms/{room}/recordings/{file}` (bearer token).
pub(super) async fn download(
    State(svc): State<Arc<Services>>,
    p: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Response {
    let (room, file) = match super::authenticate(&svc, &headers).and_then(|c| {
        let (room, file) = path_param(p)?;
        super::permit(&c, Some(&room))?;
        Ok((room, file))
    }) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    match svc.recordings.file_path(&room, &file) {
        Ok(path) => serve(path, &headers).await,
        Err(e) => rec_error(&e),
    }
}

/// `GET /recordings/{room}/{file}`: the replay URL, signed when `origin.sign_play` is on.
pub(super) async fn replay(
    State(svc): State<Arc<Services>>,
    p: Result<Path<(String, String)>, PathRejection>,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    let (room, file) = match path_param(p) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    if svc.cfg.origin.sign_play {
        let q = format!("?{}", uri.query().unwrap_or(""));
        let (_, pairs) = sign::split_query(&q);
        if let Err(e) = sign::verify_signed(
            svc.cfg.origin.sign_secret.as_bytes(),
            &signed_path(&room, &file),
            &pairs,
            now_secs(),
        ) {
            tracing::info!(%room, %file, "recording download refused: URL signature: {e}");
            return api_error(
                StatusCode::FORBIDDEN,
                e.code(),
                &format!("replay URL signature: {e}"),
            );
        }
    }
    match svc.recordings.file_path(&room, &file) {
        Ok(path) => serve(path, &headers).await,
        Err(e) => rec_error(&e),
    }
}
