//! WHIP (RFC 9725) and WHEP over HTTP: content types, body limits, bearer tokens, status codes,
//! resource URLs and CORS. What a session may do is decided in `participant::whip`.
//!
//! - `POST /whip/{room}` (`application/sdp` offer) → `201`, answer, `Location: /whip/{room}/{id}`
//! - `POST /whep/{room}` (mixed output) and `POST /whep/{room}/{participant}` → `201`, answer,
//!   `Location: /whep/{room}/{id}`
//! - `PATCH` on a Location (`application/trickle-ice-sdpfrag`): trickled candidates → `204`;
//!   an ICE restart (new `a=ice-ufrag`, `If-Match` required) → `200` with our new credentials
//!   and candidates as an sdpfrag and a new `ETag`; `DELETE` → `200`.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;

use crate::participant::Services;
use crate::participant::whip::{self, Created, Patched, SessionKind, WhepSource, WhipError};

/// Largest offer or SDP fragment accepted (a browser offer with every codec is ~6 KiB).
pub const MAX_BODY: usize = 64 * 1024;

const SDP: &str = "application/sdp";
const SDPFRAG: &str = "application/trickle-ice-sdpfrag";

pub fn routes() -> Router<Arc<Services>> {
    Router::new()
        .route("/whip/{room}", post(whip_post).options(preflight))
        .route(
            "/whip/{room}/{session}",
            axum::routing::delete(whip_delete)
                .patch(whip_patch)
                .options(preflight),
        )
        .route("/whep/{room}", post(whep_mix).options(preflight))
        // POST subscribes to a participant; DELETE / PATCH act on a session resource.
        .route(
            "/whep/{room}/{target}",
            post(whep_participant)
                .delete(whep_delete)
                .patch(whep_patch)
                .options(preflight),
        )
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(cors))
}

/// Every WHIP/WHEP response may be read by a page on another origin, headers included.
async fn cors(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("Location, ETag, Link, Accept-Patch, Accept-Post"),
    );
    r
}

/// CORS preflight (and RFC 9725's OPTIONS): which methods and headers a page may use.
async fn preflight() -> Response {
    (
        StatusCode::NO_CONTENT,
        [
            (
                header::ACCESS_CONTROL_ALLOW_METHODS,
                "POST, PATCH, DELETE, OPTIONS",
            ),
            (
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                "Authorization, Content-Type, If-Match",
            ),
            (header::ACCESS_CONTROL_MAX_AGE, "86400"),
            (header::ALLOW, "POST, PATCH, DELETE, OPTIONS"),
            (header::HeaderName::from_static("accept-post"), SDP),
            (header::HeaderName::from_static("accept-patch"), SDPFRAG),
        ],
    )
        .into_response()
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{}\n", msg.into()),
    )
        .into_response()
}

fn error(e: WhipError) -> Response {
    let status = match &e {
        WhipError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        WhipError::Forbidden(_) => StatusCode::FORBIDDEN,
        WhipError::BadRequest(_) => StatusCode::BAD_REQUEST,
        WhipError::NotFound(_) => StatusCode::NOT_FOUND,
        WhipError::Conflict(_) => StatusCode::CONFLICT,
        WhipError::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
        WhipError::PreconditionRequired(_) => StatusCode::PRECONDITION_REQUIRED,
        WhipError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        WhipError::TooMany(..) => StatusCode::TOO_MANY_REQUESTS,
        WhipError::Full(..) => StatusCode::SERVICE_UNAVAILABLE,
    };
    if let Some(code) = e.code() {
        // Limit refusals carry a machine-readable code (the REST API's error shape), so a
        // client can tell "you hold too many" from "the server is full" and back off.
        let body = serde_json::json!({"error": {"code": code, "message": e.to_string()}});
        return (
            status,
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::RETRY_AFTER, "5"),
            ],
            body.to_string(),
        )
            .into_response();
    }
    let mut r = text(status, e.to_string());
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

fn bearer(headers: &HeaderMap) -> Result<&str, Box<Response>> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            Box::new(error(WhipError::Unauthorized(
                "missing bearer token (Authorization: Bearer <token from `cohost token`>)".into(),
            )))
        })
}

/// The request's media type must be `want`; the body must fit and be UTF-8.
fn body_text(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    want: &str,
) -> Result<String, Box<Response>> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media = ct.split(';').next().unwrap_or("").trim();
    if !media.eq_ignore_ascii_case(want) {
        return Err(Box::new(text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "expected Content-Type: {want}, got {:?}",
                ct.chars().take(80).collect::<String>()
            ),
        )));
    }
    let body = body.map_err(|e| {
        let status = e.status();
        Box::new(if status == StatusCode::PAYLOAD_TOO_LARGE {
            text(status, format!("body larger than {MAX_BODY} bytes"))
        } else {
            text(status, e.body_text())
        })
    })?;
    String::from_utf8(body.to_vec())
        .map_err(|_| Box::new(text(StatusCode::BAD_REQUEST, "the body is not UTF-8 text")))
}

fn created(svc: &Services, location: String, c: Created) -> Response {
    let mut r = (
        StatusCode::CREATED,
        [
            (header::CONTENT_TYPE, SDP.to_string()),
            (header::LOCATION, location),
            (header::ETAG, c.etag),
            (
                header::HeaderName::from_static("accept-patch"),
                SDPFRAG.to_string(),
            ),
        ],
        c.answer,
    )
        .into_response();
    // RFC 9725 §4.6: the ICE servers a client should use, as Link headers.
    for s in &svc.cfg.webrtc.ice_servers {
        for url in &s.urls {
            let mut link = format!("<{url}>; rel=\"ice-server\"");
            if !s.username.is_empty() {
                link.push_str(&format!(
                    "; username=\"{}\"; credential=\"{}\"; credential-type=\"password\"",
                    s.username, s.credential
                ));
            }
            if let Ok(v) = HeaderValue::from_str(&link) {
                r.headers_mut().append(header::LINK, v);
            }
        }
    }
    r
}

async fn whip_post(
    State(svc): State<Arc<Services>>,
    Path(room): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let offer = match body_text(&headers, body, SDP) {
        Ok(o) => o,
        Err(r) => return *r,
    };
    let token = match bearer(&headers) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    match whip::publish(&svc, &room, token, offer).await {
        Ok(c) => {
            let loc = format!("/whip/{room}/{}", c.session);
            created(&svc, loc, c)
        }
        Err(e) => error(e),
    }
}

async fn whep_post(
    svc: Arc<Services>,
    room: String,
    source: WhepSource,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let offer = match body_text(&headers, body, SDP) {
        Ok(o) => o,
        Err(r) => return *r,
    };
    let token = match bearer(&headers) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    match whip::subscribe(&svc, &room, source, token, offer).await {
        Ok(c) => {
            let loc = format!("/whep/{room}/{}", c.session);
            created(&svc, loc, c)
        }
        Err(e) => error(e),
    }
}

async fn whep_mix(
    State(svc): State<Arc<Services>>,
    Path(room): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    whep_post(svc, room, WhepSource::Mix, headers, body).await
}

async fn whep_participant(
    State(svc): State<Arc<Services>>,
    Path((room, who)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    whep_post(svc, room, WhepSource::Participant(who), headers, body).await
}

fn delete(svc: &Services, room: &str, session: &str, kind: SessionKind, h: &HeaderMap) -> Response {
    let token = match bearer(h) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    match whip::end(svc, room, session, kind, token) {
        Ok(()) => text(StatusCode::OK, "session ended"),
        Err(e) => error(e),
    }
}

async fn patch(
    svc: &Services,
    room: &str,
    session: &str,
    kind: SessionKind,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let frag = match body_text(headers, body, SDPFRAG) {
        Ok(f) => f,
        Err(r) => return *r,
    };
    let token = match bearer(headers) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    let if_match = headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok());
    match whip::patch(svc, room, session, kind, token, if_match, &frag).await {
        Ok(Patched::Trickled) => StatusCode::NO_CONTENT.into_response(),
        Ok(Patched::Restarted { frag, etag }) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, SDPFRAG.to_string()),
                (header::ETAG, etag),
            ],
            frag,
        )
            .into_response(),
        Err(e) => error(e),
    }
}

async fn whip_delete(
    State(svc): State<Arc<Services>>,
    Path((room, session)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    delete(&svc, &room, &session, SessionKind::Whip, &headers)
}

async fn whep_delete(
    State(svc): State<Arc<Services>>,
    Path((room, session)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    delete(&svc, &room, &session, SessionKind::Whep, &headers)
}

async fn whip_patch(
    State(svc): State<Arc<Services>>,
    Path((room, session)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    patch(&svc, &room, &session, SessionKind::Whip, &headers, body).await
}

async fn whep_patch(
    State(svc): State<Arc<Services>>,
    Path((room, session)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    patch(&svc, &room, &session, SessionKind::Whep, &headers, body).await
}
