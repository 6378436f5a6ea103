//! The HTTP listener's accept loop (REST, WebSocket upgrades, HTTP-FLV, WHIP/WHEP).
//!
//! `axum::serve` has no header or idle timeout, no write timeout and no connection cap, so
//! slowloris clients (headers never finished), idle sockets and players that stop reading
//! could hold connections forever. This loop serves each connection with hyper's HTTP/1
//! server and bounds it:
//!
//! - admission: `ConnLimiter` (`server.max_connections`, `server.max_connections_per_ip`);
//!   a refused socket is closed at once, before a byte is read;
//! - a request's head must arrive within `server.header_read_timeout` of its first byte (of
//!   the accept, for the first request), a keep-alive connection with nothing in progress is
//!   closed after `server.idle_timeout` (a watchdog per connection, below);
//! - a handler has `server.request_timeout` to produce its response, reading the body
//!   included (408): a client that sends its body slowly is bounded too;
//! - every socket write (HTTP responses, HTTP-FLV streams, WebSockets after the upgrade: the
//!   upgraded connection keeps this socket wrapper) fails after `server.write_timeout` without
//!   progress, so a client that stops reading is disconnected.
//!
//! Only HTTP/1.1 is served (as before: axum's default features have no HTTP/2).
//!
//! Why our own watchdog rather than hyper's `header_read_timeout` alone: hyper (1.12) starts
//! its header timer when it begins waiting for a request head, which on a keep-alive
//! connection is as soon as the previous response is written, so one duration would bound
//! both the idle time between requests and the time to send a head. A server behind a
//! reverse proxy needs a long idle timeout (longer than the proxy's upstream keep-alive) and
//! a short header timeout. hyper's timer stays on as a backstop, set above both.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode, header};
use axum::response::IntoResponse;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tracing::{debug, info, warn};

use crate::config::ServerConfig;
use crate::conn_limit::{ConnLimiter, ConnPermit};
use crate::metrics::Metrics;

/// The limits of one connection (from `[server]`).
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    header: Duration,
    idle: Duration,
    write: Duration,
    request: Duration,
    max_header_bytes: usize,
}

impl Timeouts {
    fn of(cfg: &ServerConfig) -> Self {
        Self {
            header: cfg.header_read_timeout,
            idle: cfg.idle_timeout,
            write: cfg.write_timeout,
            request: cfg.request_timeout,
            max_header_bytes: cfg.max_header_bytes,
        }
    }
}

/// Accept connections until `shutdown` turns true (or its sender is gone), then let the open
/// connections finish (bounded by `server.shutdown_timeout`, counted from the signal) and
/// drop the rest. Returns when the signal came, so the caller can spend what is left of
/// the shutdown budget on WebSockets (which outlive their HTTP connection task).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    cfg: ServerConfig,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Instant {
    let limiter = ConnLimiter::new(cfg.max_connections, cfg.max_connections_per_ip);
    let timeouts = Timeouts::of(&cfg);
    let service = TowerToHyperService::new(router);
    let mut conns = JoinSet::new();
    let mut last_warn: Option<Instant> = None;
    loop {
        // Reap finished connection tasks so the set stays as large as the open connections.
        while conns.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    if !is_connection_error(&e) {
                        // Out of file descriptors and the like: back off instead of spinning.
                        warn!("http accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        let permit = match limiter.try_acquire(peer.ip()) {
            Ok(p) => p,
            Err(why) => {
                let n = metrics
                    .http_connections_refused
                    .fetch_add(1, Ordering::Relaxed)
                    + 1;
                // At most one warning per 10 s: a flood of sockets must not flood the log.
                if last_warn.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    last_warn = Some(Instant::now());
                    warn!(ip = %peer.ip(), refused_total = n, "HTTP connection refused: {why}");
                } else {
                    debug!(ip = %peer.ip(), "HTTP connection refused: {why}");
                }
                drop(stream);
                continue;
            }
        };
        // Signaling messages are small and latency matters more than packet count.
        let _ = stream.set_nodelay(true);
        let io = TimedIo::new(stream, peer, permit, timeouts.write, metrics.clone());
        conns.spawn(connection(
            io,
            peer,
            service.clone(),
            timeouts,
            metrics.clone(),
            shutdown.clone(),
        ));
    }
    let signalled = Instant::now();
    drop(listener);
    let drained = tokio::time::timeout_at(signalled + cfg.shutdown_timeout, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            open = conns.len(),
            "HTTP connections still open after server.shutdown_timeout: dropped"
        );
        conns.abort_all();
    }
    signalled
}

/// Resolves when shutdown is signalled (or its sender is gone: nobody can signal it any more).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// Errors of one incoming connection (it went away before we accepted it), not of the
/// listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Serve one connection until it ends, a header or idle timeout fires, or shutdown asks it to
/// finish its current request and close.
async fn connection(
    io: TimedIo,
    peer: SocketAddr,
    service: TowerToHyperService<Router>,
    t: Timeouts,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let activity = io.activity.clone();
    let act = activity.clone();
    let m = metrics.clone();
    let handler = hyper::service::service_fn(move |req: Request<Incoming>| {
        // The request is in progress from here until its response body is written or dropped.
        let guard = RequestGuard::begin(&act);
        let fut = hyper::service::Service::call(&service, req);
        let metrics = m.clone();
        async move {
            let resp = match tokio::time::timeout(t.request, fut).await {
                Ok(Ok(r)) => r,
                Ok(Err(never)) => match never {},
                Err(_) => {
                    metrics.http_timeouts.fetch_add(1, Ordering::Relaxed);
                    debug!(%peer, "HTTP request timed out (server.request_timeout)");
                    request_timeout_response()
                }
            };
            Ok::<_, Infallible>(resp.map(|b| Guarded {
                inner: b,
                _guard: guard,
            }))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .keep_alive(true)
        // Bounds the request head (431 above it) and so the memory a connection holds.
        .max_buf_size(t.max_header_bytes)
        // Backstop only: never before the watchdog's own deadlines (see the module doc).
        .header_read_timeout(t.idle + t.header + Duration::from_secs(1));
    let conn = builder
        .serve_connection(TokioIo::new(io), handler)
        .with_upgrades();
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        let deadline = activity.deadline(&t);
        let expiry = async move {
            match deadline {
                Some((at, _)) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(%peer, "HTTP connection: {e}");
                }
                return;
            }
            _ = expiry => {
                if let Some((at, what)) = activity.deadline(&t)
                    && at <= Instant::now()
                {
                    metrics.http_timeouts.fetch_add(1, Ordering::Relaxed);
                    debug!(%peer, "closing HTTP connection: {what}");
                    // Dropping the connection closes the socket. Nothing is in progress on it.
                    return;
                }
            }
            _ = activity.changed.notified() => {}
            _ = stopped(&mut shutdown), if !draining => {
                // Finish the request in progress (if any), then close; idle ones close now.
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
        }
    }
}

/// 408 for a handler that did not answer within `server.request_timeout` (typically one
/// waiting for a request body that arrives too slowly). The connection closes after it:
/// the rest of that body may still be on its way.
fn request_timeout_response() -> Response<Body> {
    (
        StatusCode::REQUEST_TIMEOUT,
        [(header::CONNECTION, "close")],
        axum::Json(serde_json::json!({"error": {
            "code": "request_timeout",
            "message": "the request was not received and answered within server.request_timeout",
        }})),
    )
        .into_response()
}

/// Where a connection is in its request cycle, for the header and idle timeouts.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for the next request; nothing received since `since`.
    Idle { since: Instant },
    /// A request head is arriving, its first byte (or the accept) at `since`.
    Head { since: Instant },
    /// `n` requests being served: handler running or response body being written. Their
    /// time is bounded by `server.request_timeout` and `server.write_timeout` instead.
    Busy { n: usize },
}

/// Shared by a connection's socket wrapper (which sees bytes arrive), its service (which sees
/// requests start and end) and its watchdog.
#[derive(Debug)]
struct Activity {
    phase: Mutex<Phase>,
    /// True in `Phase::Idle`: lets the read path skip the lock on every other read.
    idle: AtomicBool,
    /// Wakes the watchdog when the phase changes (its deadline moves).
    changed: Notify,
}

impl Activity {
    fn new() -> Self {
        Self {
            phase: Mutex::new(Phase::Head {
                since: Instant::now(),
            }),
            idle: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// When the connection must be closed if nothing changes, and why.
    fn deadline(&self, t: &Timeouts) -> Option<(Instant, &'static str)> {
        match *self.lock() {
            Phase::Idle { since } => Some((since + t.idle, "idle (server.idle_timeout)")),
            Phase::Head { since } => Some((
                since + t.header,
                "request head not received (server.header_read_timeout)",
            )),
            Phase::Busy { .. } => None,
        }
    }

    /// Bytes arrived: on an idle connection, a request head has started.
    fn on_read(&self) {
        if !self.idle.load(Ordering::Relaxed) {
            return;
        }
        let mut p = self.lock();
        if let Phase::Idle { .. } = *p {
            *p = Phase::Head {
                since: Instant::now(),
            };
        }
        self.idle.store(false, Ordering::Relaxed);
        drop(p);
        // notify_one keeps a permit when the watchdog is not waiting at this instant.
        self.changed.notify_one();
    }
}

/// A request in progress; dropped with its response body (or when the handler is dropped).
#[derive(Debug)]
struct RequestGuard(Arc<Activity>);

impl RequestGuard {
    fn begin(a: &Arc<Activity>) -> Self {
        let mut p = a.lock();
        *p = match *p {
            Phase::Busy { n } => Phase::Busy { n: n + 1 },
            _ => Phase::Busy { n: 1 },
        };
        a.idle.store(false, Ordering::Relaxed);
        drop(p);
        a.changed.notify_one();
        Self(a.clone())
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let mut p = self.0.lock();
        if let Phase::Busy { n } = *p {
            if n <= 1 {
                *p = Phase::Idle {
                    since: Instant::now(),
                };
                self.0.idle.store(true, Ordering::Relaxed);
            } else {
                *p = Phase::Busy { n: n - 1 };
            }
        }
        drop(p);
        self.0.changed.notify_one();
    }
}

/// A response body that holds its request's guard until hyper has written (or dropped) it.
struct Guarded<B> {
    inner: B,
    _guard: RequestGuard,
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The accepted socket with a write timeout, the connection's admission permit (given back
/// when the socket closes, also after a WebSocket upgrade: the upgraded stream owns this
/// wrapper) and its place in the `cohost_http_connections` gauge.
struct TimedIo {
    inner: TcpStream,
    peer: SocketAddr,
    write_timeout: Duration,
    /// Armed when a write first returns Pending, disarmed by any write that makes progress.
    write_deadline: Pin<Box<Sleep>>,
    write_armed: bool,
    activity: Arc<Activity>,
    metrics: Arc<Metrics>,
    _permit: ConnPermit,
}

impl TimedIo {
    fn new(
        inner: TcpStream,
        peer: SocketAddr,
        permit: ConnPermit,
        write_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        metrics.http_connections.fetch_add(1, Ordering::Relaxed);
        Self {
            inner,
            peer,
            write_timeout,
            write_deadline: Box::pin(tokio::time::sleep(write_timeout)),
            write_armed: false,
            activity: Arc::new(Activity::new()),
            metrics,
            _permit: permit,
        }
    }

    /// A write returned Pending: time out if it stays so for `write_timeout`.
    fn poll_stalled<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        if !self.write_armed {
            self.write_armed = true;
            let at = Instant::now() + self.write_timeout;
            self.write_deadline.as_mut().reset(at);
        }
        match self.write_deadline.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.write_armed = false;
                self.metrics.http_timeouts.fetch_add(1, Ordering::Relaxed);
                info!(
                    peer = %self.peer,
                    "HTTP/WebSocket client stopped reading: write timed out (server.write_timeout)"
                );
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "write timed out (server.write_timeout)",
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn progressed<T>(
        &mut self,
        r: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending => self.poll_stalled(cx),
            ready => {
                self.write_armed = false;
                ready
            }
        }
    }
}

impl Drop for TimedIo {
    fn drop(&mut self) {
        self.metrics
            .http_connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl AsyncRead for TimedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.on_read();
        }
        r
    }
}

impl AsyncWrite for TimedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.progressed(r, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.progressed(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.progressed(r, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.progressed(r, cx)
    }
}
