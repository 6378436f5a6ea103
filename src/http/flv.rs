//! HTTP-FLV from the embedded origin: `GET /live/{stream}.flv`, with a cap on players.
//!
//! A player is one long response that lasts as long as the stream. Its connection counts
//! against the HTTP connection caps like any other; on top of that the number of players is
//! capped in total and per stream (`server.max_flv_players*`), because each one costs the
//! stream's bitrate in upload. A player that stops reading is disconnected by the socket's
//! write timeout (`server.write_timeout`, src/http/serve.rs), and the origin drops a player
//! whose tag queue fills.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use super::{api_error, ingest};
use crate::metrics::Metrics;
use crate::participant::Services;

/// HTTP-FLV players playing, by stream, against `server.max_flv_players*`.
pub(super) struct FlvPlayers {
    max_total: usize,
    max_per_stream: usize,
    open: Mutex<Open>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Open {
    total: usize,
    /// Pruned when a stream's last player leaves: never more entries than players.
    per_stream: HashMap<String, usize>,
}

/// One player's place; given back when its response body is dropped.
struct Slot {
    players: Arc<FlvPlayers>,
    stream: String,
}

impl FlvPlayers {
    /// Caps of 0 mean no limit.
    pub(super) fn new(max_total: usize, max_per_stream: usize, metrics: Arc<Metrics>) -> Arc<Self> {
        let cap = |n: usize| if n == 0 { usize::MAX } else { n };
        Arc::new(Self {
            max_total: cap(max_total),
            max_per_stream: cap(max_per_stream),
            open: Mutex::new(Open::default()),
            metrics,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn try_acquire(self: &Arc<Self>, stream: &str) -> Option<Slot> {
        let mut open = self.lock();
        let on_stream = open.per_stream.get(stream).copied().unwrap_or(0);
        if open.total >= self.max_total || on_stream >= self.max_per_stream {
            drop(open);
            self.metrics
                .flv_players_refused
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        open.total += 1;
        *open.per_stream.entry(stream.to_string()).or_insert(0) += 1;
        self.metrics.flv_players.fetch_add(1, Ordering::Relaxed);
        Some(Slot {
            players: self.clone(),
            stream: stream.to_string(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.players.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_stream.get_mut(&self.stream) {
            *n -= 1;
            if *n == 0 {
                open.per_stream.remove(&self.stream);
            }
        }
        self.players
            .metrics
            .flv_players
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Waiting tags written at once up to about this many bytes.
const COALESCE_BYTES: usize = 256 * 1024;

/// `GET /live/{stream}.flv`. The body starts with the FLV header, metadata, sequence headers
/// and the cached GOP, then follows the live stream until it ends, the client goes away or
/// the server shuts down.
pub(super) async fn http_flv(
    State(svc): State<Arc<Services>>,
    Extension(players): Extension<Arc<FlvPlayers>>,
    Path(file): Path<String>,
    uri: axum::http::Uri,
) -> Response {
    let Some(name) = file.strip_suffix(".flv") else {
        return api_error(StatusCode::NOT_FOUND, "not_found", "use /live/{stream}.flv");
    };
    if let Err(r) = ingest::check_play(&svc, name, uri.query()) {
        return *r;
    }
    // `webhooks.on_play`: the operator's backend may refuse this player.
    if let Some(a) = &svc.authorize {
        let req = crate::webhooks::auth::Request {
            room: name,
            protocol: "http-flv",
            client_addr: None,
            identity: None,
            role: None,
        };
        if let Err(e) = a.allow(crate::webhooks::auth::Action::Play, &req).await {
            return api_error(StatusCode::FORBIDDEN, "play_refused", &e);
        }
    }
    let Some(slot) = players.try_acquire(name) else {
        tracing::info!(stream = %name, "HTTP-FLV player refused: server.max_flv_players(_per_stream) reached");
        let mut r = api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_players",
            "too many HTTP-FLV players (server.max_flv_players / max_flv_players_per_stream)",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("10"));
        return r;
    };
    let player = match svc.origin.play(name) {
        Ok(p) => p,
        Err(e) => return api_error(StatusCode::NOT_FOUND, "not_found", &e.to_string()),
    };
    let mut head = crate::media::flv::header(player.has_audio, player.has_video).to_vec();
    for t in &player.initial {
        crate::media::flv::write_tag(&mut head, t.kind, t.timestamp_ms, &t.body);
    }
    let first = futures::stream::once(async move {
        Ok::<_, std::convert::Infallible>(bytes::Bytes::from(head))
    });
    // The slot travels with the stream: it is given back when hyper drops the body.
    // Tags that are already waiting go out in one write (the bridge makes an audio frame and
    // a picture at the same moment): one syscall per tag was a tenth of a solo room's CPU.
    let live = futures::stream::unfold((player.rx, slot), |(mut rx, slot)| async move {
        let t = rx.recv().await?;
        let mut b = Vec::with_capacity(t.body.len() + 15);
        crate::media::flv::write_tag(&mut b, t.kind, t.timestamp_ms, &t.body);
        while b.len() < COALESCE_BYTES
            && let Ok(t) = rx.try_recv()
        {
            crate::media::flv::write_tag(&mut b, t.kind, t.timestamp_ms, &t.body);
        }
        Some((Ok(bytes::Bytes::from(b)), (rx, slot)))
    });
    // On shutdown the response ends cleanly, so the connection can close within
    // server.shutdown_timeout instead of being cut.
    let mut stop = svc.shutdown.clone();
    let shutdown = async move {
        if stop.wait_for(|v| *v).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    (
        [
            (header::CONTENT_TYPE, "video/x-flv"),
            (header::CACHE_CONTROL, "no-cache"),
            // Players (flv.js, mpegts.js) on other origins fetch this cross-origin.
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
        ],
        axum::body::Body::from_stream(first.chain(live).take_until(shutdown)),
    )
        .into_response()
}
