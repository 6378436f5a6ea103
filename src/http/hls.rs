//! HLS and LL-HLS over HTTP (the packaging is `crate::hls`):
//!
//! - `GET /live/{stream}/index.m3u8`: the media playlist; `?_HLS_msn=N[&_HLS_part=M]` blocks
//!   until the playlist holds that segment/part (RFC 8216bis 6.2.5.2).
//! - `GET /live/{stream}/init-{run}-{n}.mp4`, `seg-{run}-{msn}.m4s`, `part-{run}-{id}.m4s`:
//!   the files the playlist names; the preload-hinted part blocks until it exists.
//!
//! The same signed-URL rule as HTTP-FLV (`origin.sign_play`: every request carries
//! `sign`/`expires` for `/live/{stream}`, and the playlist passes them on in its URIs), and
//! `webhooks.on_play` asked when a player loads the playlist (protocol `hls`; blocking reloads
//! are the same player coming back and are not asked again). CORS for browser players.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{api_error, ingest};
use crate::auth::sign;
use crate::hls::packager::{Lookup, Ready};
use crate::hls::{Hls, HlsError, Stream};
use crate::participant::Services;

const PLAYLIST: &str = "application/vnd.apple.mpegurl";

/// Every HLS response may be read by a page on another origin (hls.js fetches with XHR).
pub(super) async fn cors(mut r: Response) -> Response {
    r.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    r
}

/// CORS preflight (a player sending `Range` or other non-simple headers).
pub(super) async fn preflight() -> Response {
    (
        StatusCode::NO_CONTENT,
        [
            (header::ACCESS_CONTROL_ALLOW_METHODS, "GET, HEAD, OPTIONS"),
            (header::ACCESS_CONTROL_ALLOW_HEADERS, "Range, Cache-Control"),
            (header::ACCESS_CONTROL_MAX_AGE, "86400"),
            (header::ALLOW, "GET, HEAD, OPTIONS"),
        ],
    )
        .into_response()
}

fn unavailable(code: &str, msg: &str) -> Response {
    let mut r = api_error(StatusCode::SERVICE_UNAVAILABLE, code, msg);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

fn not_found(msg: &str) -> Response {
    api_error(StatusCode::NOT_FOUND, "not_found", msg)
}

/// What a file name of a playlist asks for.
#[derive(Debug, PartialEq, Eq)]
enum File<'a> {
    Playlist,
    Init(&'a str, u64),
    Segment(&'a str, u64),
    Part(&'a str, u64),
}

fn parse_file(f: &str) -> Option<File<'_>> {
    if f == "index.m3u8" {
        return Some(File::Playlist);
    }
    let (kind, ext, rest) = if let Some(r) = f.strip_prefix("init-") {
        ("init", ".mp4", r)
    } else if let Some(r) = f.strip_prefix("seg-") {
        ("seg", ".m4s", r)
    } else {
        ("part", ".m4s", f.strip_prefix("part-")?)
    };
    let (run, n) = rest.strip_suffix(ext)?.split_once('-')?;
    if run.is_empty() {
        return None;
    }
    let n: u64 = n.parse().ok()?;
    Some(match kind {
        "init" => File::Init(run, n),
        "seg" => File::Segment(run, n),
        _ => File::Part(run, n),
    })
}

/// `_HLS_msn` / `_HLS_part` of a playlist request; `Err` when they are malformed.
fn blocking_params(pairs: &[(&str, &str)]) -> Result<Option<(u64, Option<usize>)>, &'static str> {
    let get = |k: &str| pairs.iter().find(|(qk, _)| *qk == k).map(|(_, v)| *v);
    let msn = get("_HLS_msn")
        .map(|v| v.parse::<u64>().map_err(|_| "_HLS_msn must be an integer"))
        .transpose()?;
    let part = get("_HLS_part")
        .map(|v| {
            v.parse::<usize>()
                .map_err(|_| "_HLS_part must be an integer")
        })
        .transpose()?;
    match (msn, part) {
        (None, Some(_)) => Err("_HLS_part needs _HLS_msn"),
        (None, None) => Ok(None),
        (Some(m), p) => Ok(Some((m, p))),
    }
}

/// The query the playlist's URIs carry: the request's own signature when play URLs are
/// signed (it covers `/live/{stream}`, so it is valid for every file of the stream), else
/// nothing. Only values of the expected form are passed on (they were verified already).
fn uri_query(svc: &Services, pairs: &[(&str, &str)]) -> String {
    if !svc.cfg.origin.sign_play {
        return String::new();
    }
    let get = |k: &str| pairs.iter().find(|(qk, _)| *qk == k).map(|(_, v)| *v);
    match (get("sign"), get("expires")) {
        (Some(s), Some(e))
            if s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
                && e.bytes().all(|b| b.is_ascii_digit()) =>
        {
            format!("?sign={s}&expires={e}")
        }
        _ => String::new(),
    }
}

/// `GET /live/{stream}/{file}`.
pub(super) async fn get(
    State(svc): State<Arc<Services>>,
    Extension(hls): Extension<Arc<Hls>>,
    Path((name, file)): Path<(String, String)>,
    uri: axum::http::Uri,
) -> Response {
    if !hls.cfg.enabled {
        return not_found("HLS is off on this server (hls.enabled)");
    }
    let Some(file) = parse_file(&file) else {
        return not_found("no such HLS file");
    };
    if let Err(r) = ingest::check_play(&svc, &name, uri.query()) {
        return *r;
    }
    let q = format!("?{}", uri.query().unwrap_or(""));
    let (_, pairs) = sign::split_query(&q);
    match file {
        File::Playlist => playlist(&svc, &hls, &name, &pairs).await,
        File::Init(run, id) => {
            let Some(s) = hls.get(&name).filter(|s| s.run == run) else {
                return not_found("no such HLS file (the stream's packager restarted?)");
            };
            match s.with(|p| p.init_bytes(id)) {
                Some(b) => media(&svc, "video/mp4", vec![b]),
                None => not_found("no such init segment"),
            }
        }
        File::Segment(run, msn) => {
            wait_media(&svc, &hls, &name, run, move |p| p.segment_bytes(msn)).await
        }
        File::Part(run, id) => wait_media(&svc, &hls, &name, run, move |p| p.part_bytes(id)).await,
    }
}

fn media(svc: &Services, content_type: &'static str, chunks: Vec<bytes::Bytes>) -> Response {
    svc.metrics
        .hls_media_requests
        .fetch_add(1, Ordering::Relaxed);
    let len: usize = chunks.iter().map(|c| c.len()).sum();
    let body = axum::body::Body::from_stream(futures::stream::iter(
        chunks.into_iter().map(Ok::<_, std::convert::Infallible>),
    ));
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CONTENT_LENGTH, HeaderValue::from(len)),
            // A file name never changes meaning (the run id), so caches may keep it.
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=600, immutable"),
            ),
        ],
        body,
    )
        .into_response()
}

/// A segment or part: at once when it exists, after a wait when it is the next one (the
/// preload hint), 404 when it is gone or was never going to exist.
async fn wait_media(
    svc: &Services,
    hls: &Hls,
    name: &str,
    run: &str,
    f: impl Fn(&crate::hls::packager::Packager) -> Lookup,
) -> Response {
    let Some(s) = hls.get(name).filter(|s| s.run == run) else {
        return not_found("no such HLS file (the stream's packager restarted?)");
    };
    let found = match s.with(&f) {
        Lookup::Found(b) => Some(b),
        Lookup::Gone => None,
        Lookup::Soon => {
            let Some(_slot) = hls.try_block() else {
                return unavailable(
                    "too_many_blocking_requests",
                    "too many blocking HLS requests (hls.max_blocking_requests)",
                );
            };
            s.wait_for(hls.block_timeout(), |p| match f(p) {
                Lookup::Found(b) => Some(Some(b)),
                Lookup::Gone => Some(None),
                Lookup::Soon => None,
            })
            .await
            .flatten()
        }
    };
    match found {
        Some(b) => media(svc, "video/iso.segment", b),
        None => not_found("no such segment or part"),
    }
}

async fn playlist(svc: &Services, hls: &Arc<Hls>, name: &str, pairs: &[(&str, &str)]) -> Response {
    let block = match blocking_params(pairs) {
        Ok(b) => b,
        Err(e) => return api_error(StatusCode::BAD_REQUEST, "bad_request", e),
    };
    if block.is_none()
        && let Some(a) = &svc.authorize
    {
        let req = crate::webhooks::auth::Request {
            room: name,
            protocol: "hls",
            client_addr: None,
            identity: None,
            role: None,
        };
        if let Err(e) = a.allow(crate::webhooks::auth::Action::Play, &req).await {
            return api_error(StatusCode::FORBIDDEN, "play_refused", &e);
        }
    }
    let s = match hls.stream(name) {
        Ok(s) => s,
        Err(HlsError::NotLive(_)) => return not_found("the stream is not live"),
        Err(HlsError::TooManyStreams) => {
            tracing::info!(stream = %name, "hls: refused, hls.max_streams reached");
            return unavailable("too_many_streams", "too many HLS streams (hls.max_streams)");
        }
    };
    // A new packager (or one whose stream has not given a segment yet): the first answer
    // waits for a complete segment, which every player can start from.
    // It counts among the requests held (`hls.max_blocking_requests`).
    if s.with(|p| p.segment_count()) == 0 {
        let Some(_slot) = hls.try_block() else {
            return unavailable(
                "too_many_blocking_requests",
                "too many blocking HLS requests (hls.max_blocking_requests)",
            );
        };
        if s.wait_for(hls.cfg.start_timeout, |p| {
            (p.segment_count() > 0).then_some(())
        })
        .await
        .is_none()
        {
            return unavailable(
                "stream_starting",
                "no HLS segment yet (the stream has not sent a keyframe within hls.start_timeout)",
            );
        }
    }
    let mut cache = "no-cache";
    if let Some((msn, part)) = block {
        match wait_ready(hls, &s, msn, part).await {
            Ok(()) => {
                // The answer to one msn/part never changes: a CDN may keep it a little.
                cache = "public, max-age=6";
            }
            Err(r) => return *r,
        }
    }
    svc.metrics
        .hls_playlist_requests
        .fetch_add(1, Ordering::Relaxed);
    let query = uri_query(svc, pairs);
    let text = s.playlist(&query);
    (
        [
            (header::CONTENT_TYPE, PLAYLIST),
            (header::CACHE_CONTROL, cache),
        ],
        text,
    )
        .into_response()
}

/// Hold a blocking reload until the playlist has `msn`/`part`: 400 when it asks too far
/// ahead, 503 after three target durations (RFC 8216bis 6.2.5.2), 503 when too many wait.
async fn wait_ready(
    hls: &Hls,
    s: &Stream,
    msn: u64,
    part: Option<usize>,
) -> Result<(), Box<Response>> {
    let too_far = || {
        Box::new(api_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "_HLS_msn/_HLS_part is too far ahead of the playlist",
        ))
    };
    match s.with(|p| p.ready(msn, part)) {
        Ready::Yes => return Ok(()),
        Ready::TooFar => return Err(too_far()),
        Ready::Wait => {}
    }
    let Some(_slot) = hls.try_block() else {
        return Err(Box::new(unavailable(
            "too_many_blocking_requests",
            "too many blocking HLS requests (hls.max_blocking_requests)",
        )));
    };
    match s
        .wait_for(hls.block_timeout(), |p| match p.ready(msn, part) {
            Ready::Wait => None,
            r => Some(r),
        })
        .await
    {
        Some(Ready::Yes) => Ok(()),
        Some(_) => Err(too_far()),
        None => Err(Box::new(unavailable(
            "not_yet",
            "the requested part did not arrive within three target durations",
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names() {
        assert_eq!(parse_file("index.m3u8"), Some(File::Playlist));
        assert_eq!(parse_file("init-17-0.mp4"), Some(File::Init("17", 0)));
        assert_eq!(parse_file("seg-17-42.m4s"), Some(File::Segment("17", 42)));
        assert_eq!(parse_file("part-17-9.m4s"), Some(File::Part("17", 9)));
        for bad in [
            "",
            "x.flv",
            "seg-17.m4s",
            "seg-17-x.m4s",
            "part-17-1.mp4",
            "seg--1.m4s",
            "init-1-99999999999999999999.mp4",
        ] {
            assert_eq!(parse_file(bad), None, "{bad}");
        }
    }

    #[test]
    fn blocking_params_are_checked() {
        assert_eq!(blocking_params(&[]), Ok(None));
        assert_eq!(blocking_params(&[("_HLS_msn", "3")]), Ok(Some((3, None))));
        assert_eq!(
            blocking_params(&[("_HLS_msn", "3"), ("_HLS_part", "1")]),
            Ok(Some((3, Some(1))))
        );
        assert!(blocking_params(&[("_HLS_part", "1")]).is_err());
        assert!(blocking_params(&[("_HLS_msn", "-1")]).is_err());
        assert!(blocking_params(&[("_HLS_msn", "1"), ("_HLS_part", "x")]).is_err());
    }
}
