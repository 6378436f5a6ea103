//! The signaling WebSocket at `/ws`: the HTTP upgrade, and the two halves of a connection (a
//! reader feeding the connection driver, a writer draining its outbox).
//!
//! The upgrade is done here rather than by axum's `WebSocketUpgrade` so that the writer can
//! send large messages as several frames (RFC 6455 fragmentation, which every client library
//! and browser reassembles). The WebSocket library formats each frame into a per-connection
//! buffer that keeps its largest size for the life of the connection: one join result with the
//! room's message history (7 KB in a busy room) made every idle audience member hold 7 KB more
//! (measured with heaptrack: 21.8 MB of 3,000 members' memory). In frames of at most
//! [`FRAGMENT`] bytes the buffer stays near its 1 KiB.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame, Frame, Utf8Bytes};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use crate::participant::{Driver, Next, Services, WsIn, WsOut, outbox};

#[derive(Deserialize)]
pub(super) struct WsQuery {
    room: Option<String>,
}

/// WebSocket transport read and write buffer per connection.
const WS_BUFFER: usize = 1024;
/// Queued messages the writer sends in one flush at most.
const WRITE_BATCH: usize = 64;
/// Text messages longer than this go out as a first frame and continuation frames of at most
/// this many bytes (see the module doc).
pub const FRAGMENT: usize = 1024;

type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

fn bad_request(msg: &'static str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        msg,
    )
        .into_response()
}

fn header_eq(headers: &HeaderMap, key: HeaderName, value: &str) -> bool {
    headers
        .get(&key)
        .is_some_and(|h| h.as_bytes().eq_ignore_ascii_case(value.as_bytes()))
}

fn header_has_token(headers: &HeaderMap, key: HeaderName, token: &str) -> bool {
    headers.get_all(&key).iter().any(|h| {
        h.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// `GET /ws`: check the upgrade request (RFC 6455 section 4.2.1), answer 101, and run the
/// connection once the HTTP layer hands the socket over.
pub(super) async fn upgrade(
    State(svc): State<Arc<Services>>,
    Query(q): Query<WsQuery>,
    mut req: Request,
) -> Response {
    let headers = req.headers();
    if !header_has_token(headers, header::CONNECTION, "upgrade") {
        return bad_request("Connection header did not include 'upgrade'");
    }
    if !header_eq(headers, header::UPGRADE, "websocket") {
        return bad_request("`Upgrade` header did not include 'websocket'");
    }
    if !header_eq(headers, header::SEC_WEBSOCKET_VERSION, "13") {
        return bad_request("`Sec-WebSocket-Version` header did not include '13'");
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return bad_request("`Sec-WebSocket-Key` header missing");
    };
    let accept = derive_accept_key(key.as_bytes());
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return (
            StatusCode::UPGRADE_REQUIRED,
            "WebSocket request couldn't be upgraded since no upgrade state was present",
        )
            .into_response();
    };
    // The transport limit is well above the protocol limit so that an oversized message gets a
    // `message_too_large` error from the session and the connection stays usable; only absurd
    // sizes (over 1 MiB or 16x the limit) make the transport drop the connection.
    let limit = svc.cfg.signaling.max_message_bytes;
    let hard = (limit * 16).max(1 << 20);
    // Small transport buffers: a room holds thousands of mostly idle audience members, and
    // the default 128 KiB read buffer per connection alone would be 1.3 GB for 10,000 of
    // them (measured: 1 KiB instead of 4 KiB saves another 3 KiB per member). Messages are
    // small; a large one (an SDP) is read in more steps.
    let config = WebSocketConfig::default()
        .max_message_size(Some(hard))
        .max_frame_size(Some(hard))
        .read_buffer_size(WS_BUFFER)
        .write_buffer_size(WS_BUFFER);
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!("websocket upgrade failed: {e}");
                return;
            }
        };
        let socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        session(socket, svc, q.room).await;
    });
    let mut res = Response::new(Body::empty());
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = res.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    res
}

/// A text message as the frames that carry it: one, or a first frame and continuation frames
/// of at most [`FRAGMENT`] bytes, split between characters.
fn text_frames(text: Bytes, out: &mut Vec<Message>) {
    let Ok(s) = std::str::from_utf8(&text) else {
        // Every queued text is built from Rust strings; this cannot happen.
        tracing::error!("not sending a websocket text that is not UTF-8");
        return;
    };
    if s.len() <= FRAGMENT {
        if let Ok(t) = Utf8Bytes::try_from(text) {
            out.push(Message::Text(t));
        }
        return;
    }
    let mut start = 0;
    while start < s.len() {
        let mut end = (start + FRAGMENT).min(s.len());
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        let opcode = if start == 0 {
            OpCode::Data(Data::Text)
        } else {
            OpCode::Data(Data::Continue)
        };
        out.push(Message::Frame(Frame::message(
            text.slice(start..end),
            opcode,
            end == s.len(),
        )));
        start = end;
    }
}

/// A queued item as frames; returns whether it was the last (a close).
fn frames_of(m: WsOut, out: &mut Vec<Message>) -> bool {
    match m {
        WsOut::Text(t) => text_frames(Bytes::from(t), out),
        // The room's own JSON (shared by every member, not copied).
        WsOut::Shared(b) => text_frames(b, out),
        // Taken by the queue itself (`OutboxRx`); never handed out.
        WsOut::Follow(_) => {}
        WsOut::Ping => out.push(Message::Ping(Bytes::new())),
        WsOut::Close(code, reason) => {
            out.push(Message::Close(Some(CloseFrame {
                code: code.into(),
                reason: reason.into(),
            })));
            return true;
        }
    }
    false
}

async fn session(socket: Socket, svc: Arc<Services>, room: Option<String>) {
    svc.metrics.ws_connections.fetch_add(1, Ordering::Relaxed);
    let sig = &svc.cfg.signaling;
    let (max_bytes, write_timeout) = (sig.max_message_bytes, sig.write_timeout);
    let (mut sink, mut stream) = socket.split();
    // Small: the reader waits when the driver is busy, which pushes back on the client through
    // TCP; each queued text is at most max_message_bytes (larger ones are reduced to their
    // length below).
    let (in_tx, in_rx) = mpsc::channel::<WsIn>(16);
    // Bounded in messages and bytes, and never awaited by the driver (see `Outbox`).
    let (out_tx, mut out_rx) = outbox(
        sig.send_queue_messages,
        sig.send_queue_bytes,
        svc.metrics.clone(),
    );
    // The driver's future is small (about 3 KB: its handlers are boxed while they run), which
    // matters with thousands of idle members.
    let mut driver = tokio::spawn(Driver::new(svc.clone(), room, out_tx).run(in_rx));
    // Every write has a deadline: a client that stops reading cannot hold the writer (or, via
    // a full queue, the driver) forever. Each batch is flushed, so the socket layer buffers at
    // most what is being written.
    let mut writer = tokio::spawn(async move {
        let mut batch = Vec::new();
        loop {
            let mut last = match out_rx.next().await {
                Next::Send(m) => frames_of(m, &mut batch),
                Next::Abort(code) => {
                    // Nothing is half-written here, so a close frame may still get through;
                    // the socket is dropped right after either way.
                    let frame = Message::Close(Some(CloseFrame {
                        code: code.into(),
                        reason: "slow reader".into(),
                    }));
                    let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(frame)).await;
                    break;
                }
                Next::End => break,
            };
            // What else is queued goes out in the same flush (one write for many small
            // messages when a busy room's chat piles up).
            let mut taken = 1;
            while !last && taken < WRITE_BATCH {
                let Some(m) = out_rx.try_next() else { break };
                last = frames_of(m, &mut batch);
                taken += 1;
            }
            let write = async {
                for m in batch.drain(..) {
                    sink.feed(m).await?;
                }
                sink.flush().await
            };
            tokio::select! {
                r = tokio::time::timeout(write_timeout, write) => match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::debug!("websocket write: {e}");
                        break;
                    }
                    Err(_) => {
                        out_rx.stalled();
                        break;
                    }
                },
                // The driver gave up on this client mid-write: drop the connection.
                _ = out_rx.aborted() => break,
            }
            if last {
                break;
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
    });
    let mut driver_done = false;
    let mut let_go = false;
    loop {
        tokio::select! {
            m = stream.next() => {
                let ev = match m {
                    Some(Ok(Message::Text(t))) if t.len() > max_bytes => WsIn::TooLarge(Box::new((
                        t.len(),
                        crate::signaling::session::request_id_of(t.as_str()),
                    ))),
                    Some(Ok(Message::Text(t))) => WsIn::Text(t.to_string()),
                    Some(Ok(Message::Binary(b))) => WsIn::Binary(b.len()),
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {
                        WsIn::Activity
                    }
                    // A close frame is a deliberate goodbye; a connection that just ends
                    // (None, an error) may come back with `resume`.
                    Some(Ok(Message::Close(_))) => {
                        let _ = in_tx.send(WsIn::Closed).await;
                        break;
                    }
                    None => break,
                    Some(Err(e)) => {
                        tracing::debug!("websocket read: {e}");
                        break;
                    }
                };
                if in_tx.send(ev).await.is_err() {
                    break;
                }
            }
            _ = &mut driver => { driver_done = true; break; }
            // The driver let go of this connection (a resumable participant detached, or
            // was taken over by a resume): stop reading.
            _ = in_tx.closed() => { let_go = true; break; }
        }
    }
    drop(in_tx);
    // A detached driver lives on without this connection (up to `resume_grace`).
    if !driver_done && !let_go {
        let _ = (&mut driver).await;
    }
    // The writer ends by itself within write_timeout (+1 s for the close); this only guards
    // against a bug.
    if tokio::time::timeout(write_timeout + Duration::from_secs(2), &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
    svc.metrics.ws_connections.fetch_sub(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(msgs: &[Message]) -> (Vec<(bool, bool, usize)>, String) {
        let mut whole = Vec::new();
        let mut shape = vec![];
        for m in msgs {
            match m {
                Message::Text(t) => {
                    shape.push((true, true, t.len()));
                    whole.extend_from_slice(t.as_bytes());
                }
                Message::Frame(f) => {
                    let first = f.header().opcode == OpCode::Data(Data::Text);
                    shape.push((first, f.header().is_final, f.payload().len()));
                    whole.extend_from_slice(f.payload());
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        (shape, String::from_utf8(whole).expect("utf-8 when joined"))
    }

    #[test]
    fn a_short_text_is_one_frame() {
        let mut out = vec![];
        text_frames(Bytes::from_static(b"{\"type\":\"pong\"}"), &mut out);
        assert_eq!(texts(&out).0, vec![(true, true, 15)]);
    }

    #[test]
    fn a_long_text_is_fragmented_between_characters() {
        // Multi-byte characters straddle every FRAGMENT boundary.
        let s = "é€😀x".repeat(400);
        let mut out = vec![];
        text_frames(Bytes::from(s.clone()), &mut out);
        let (shape, joined) = texts(&out);
        assert_eq!(joined, s);
        assert!(shape.len() >= s.len() / FRAGMENT);
        assert!(shape[0].0 && !shape[0].1, "first frame is Text, not final");
        assert!(shape[1..].iter().all(|f| !f.0), "then continuation frames");
        assert!(shape.last().is_some_and(|f| f.1), "the last one is final");
        assert!(shape.iter().all(|f| f.2 <= FRAGMENT));
        assert!(shape[..shape.len() - 1].iter().all(|f| f.2 > FRAGMENT - 4));
    }
}
