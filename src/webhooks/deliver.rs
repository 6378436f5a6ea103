//! Delivery: HTTP POST of each queued event to every URL, signed, in order per room.
//!
//! Per URL, each room with events waiting has its own FIFO and one worker task draining it
//! (started when its first event arrives, ending when the FIFO is empty), so a room's events
//! go one at a time in order, retries included, while other rooms' events go on: a room whose
//! delivery keeps failing holds back only itself. At most `webhooks.concurrency` requests per
//! URL are in flight; a worker waiting out a retry delay holds no request slot.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sha2::Sha256;
use tokio::sync::{Semaphore, mpsc};
use tracing::{debug, info, warn};

use super::{Queued, Stats};
use crate::config::WebhooksConfig;

pub const SIGNATURE_HEADER: &str = "x-cohost-signature";
pub const TIMESTAMP_HEADER: &str = "x-cohost-timestamp";

/// What a receiver may answer beyond the status line is read (so the connection can be
/// reused) up to this much, then ignored.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// `hex(HMAC-SHA256(key, timestamp + "." + body))`: the `X-Cohost-Signature` value after
/// `sha256=`. The timestamp (unix seconds, `X-Cohost-Timestamp`) is signed with the body so
/// that a receiver can refuse old requests replayed by someone who recorded them.
pub fn sign(key: &[u8], timestamp: &str, body: &[u8]) -> String {
    // HMAC takes keys of any length; the error case cannot happen.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Delay before retry number `n` (1 = the first retry): `initial`, doubling, at most `max`.
fn backoff(initial: Duration, max: Duration, n: u32) -> Duration {
    initial
        .saturating_mul(1u32 << n.saturating_sub(1).min(16))
        .min(max)
}

pub(super) type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Shared by every URL's workers.
struct Shared {
    client: HttpClient,
    key: Vec<u8>,
    timeout: Duration,
    max_attempts: u32,
    retry_initial: Duration,
    retry_max: Duration,
    stats: Arc<Stats>,
}

/// One configured URL.
struct Target {
    uri: hyper::Uri,
    /// For logs: scheme, host and path only (a query may carry a backend's token).
    shown: String,
    /// Rooms with events waiting for this URL, each in order; the front one is being delivered.
    rooms: Mutex<HashMap<String, VecDeque<Arc<Queued>>>>,
    in_flight: Semaphore,
    /// The last attempt failed: a backend that is down fails every event of every room, so
    /// only the change (failing, delivering again) is worth a warning, not each attempt.
    failing: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Start the dispatcher: it hands every queued event to every URL's room FIFO.
pub(super) fn spawn(
    cfg: &WebhooksConfig,
    mut rx: mpsc::UnboundedReceiver<Arc<Queued>>,
    stats: Arc<Stats>,
) {
    let client = client(cfg.timeout, cfg.concurrency, &cfg.ca_file);
    let shared = Arc::new(Shared {
        client,
        key: cfg.key.as_bytes().to_vec(),
        timeout: cfg.timeout,
        max_attempts: cfg.max_attempts.max(1),
        retry_initial: cfg.retry_initial,
        retry_max: cfg.retry_max,
        stats,
    });
    let targets: Vec<Arc<Target>> = cfg
        .urls
        .iter()
        .filter_map(|u| {
            // Validated with the config; a URL that still does not parse is skipped, loudly.
            let uri = match u.parse::<hyper::Uri>() {
                Ok(uri) => uri,
                Err(e) => {
                    warn!("webhooks: URL skipped: {e}");
                    return None;
                }
            };
            let shown = format!(
                "{}://{}{}",
                uri.scheme_str().unwrap_or("http"),
                uri.authority().map_or("", |a| a.as_str()),
                uri.path()
            );
            Some(Arc::new(Target {
                uri,
                shown,
                rooms: Mutex::new(HashMap::new()),
                in_flight: Semaphore::new(cfg.concurrency.max(1)),
                failing: AtomicBool::new(false),
            }))
        })
        .collect();
    tokio::spawn(async move {
        while let Some(q) = rx.recv().await {
            for t in &targets {
                enqueue(&shared, t, q.clone());
            }
        }
    });
}

/// Append to the room's FIFO for `t`, starting its worker if none is draining it.
fn enqueue(shared: &Arc<Shared>, t: &Arc<Target>, q: Arc<Queued>) {
    let mut rooms = lock(&t.rooms);
    if let Some(fifo) = rooms.get_mut(&q.room) {
        fifo.push_back(q);
        return;
    }
    let room = q.room.clone();
    rooms.insert(room.clone(), VecDeque::from([q]));
    tokio::spawn(drain(shared.clone(), t.clone(), room));
}

/// Deliver one room's events to `t` in order until its FIFO is empty. The event being
/// delivered stays at the front meanwhile, so new ones queue behind it instead of starting
/// a second worker for the room.
async fn drain(shared: Arc<Shared>, t: Arc<Target>, room: String) {
    loop {
        let next = lock(&t.rooms)
            .get(&room)
            .and_then(|fifo| fifo.front().cloned());
        let Some(q) = next else {
            lock(&t.rooms).remove(&room);
            return;
        };
        deliver(&shared, &t, &q).await;
        drop(q);
        let mut rooms = lock(&t.rooms);
        let empty = match rooms.get_mut(&room) {
            Some(fifo) => {
                fifo.pop_front();
                fifo.is_empty()
            }
            None => true,
        };
        if empty {
            rooms.remove(&room);
            return;
        }
    }
}

/// Deliver one event to one URL: retried with backoff until a 2xx or `max_attempts`.
async fn deliver(shared: &Shared, t: &Target, q: &Queued) {
    let stats = &shared.stats;
    for attempt in 1..=shared.max_attempts {
        let result = {
            // Closed never: the semaphore lives as long as the target.
            let _slot = t.in_flight.acquire().await;
            post(shared, t, q, attempt).await
        };
        let err = match result {
            Ok(()) => {
                stats.delivered.fetch_add(1, Ordering::Relaxed);
                if t.failing.swap(false, Ordering::Relaxed) {
                    info!(url = %t.shown, "webhook URL takes deliveries again");
                }
                debug!(url = %t.shown, room = %q.room, event = q.name, id = %q.id, attempt,
                    "webhook delivered");
                return;
            }
            Err(e) => e,
        };
        stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
        if attempt == shared.max_attempts {
            let n = stats.dropped_attempts.fetch_add(1, Ordering::Relaxed) + 1;
            // The 1st, 2nd, 4th, ... drop: a dead backend drops every event.
            if n.is_power_of_two() {
                warn!(url = %t.shown, room = %q.room, event = q.name, id = %q.id, dropped = n,
                    "webhook dropped after {attempt} attempts: {err}");
            }
            return;
        }
        let delay = backoff(shared.retry_initial, shared.retry_max, attempt);
        if !t.failing.swap(true, Ordering::Relaxed) {
            warn!(url = %t.shown, room = %q.room, event = q.name, id = %q.id,
                "webhook delivery failed, retrying in {delay:?}: {err}");
        } else {
            debug!(url = %t.shown, room = %q.room, event = q.name, attempt,
                "webhook delivery failed, retrying in {delay:?}: {err}");
        }
        tokio::time::sleep(delay).await;
    }
}

/// One POST of `q` to `t`, bounded by `webhooks.timeout`. Ok only for a 2xx status.
async fn post(shared: &Shared, t: &Target, q: &Queued, attempt: u32) -> Result<(), String> {
    let signed = Signed {
        key: &shared.key,
        event: q.name,
        id: &q.id,
        body: &q.body,
        attempt,
    };
    match send(&shared.client, &t.uri, &signed, shared.timeout).await? {
        s if s.is_success() => Ok(()),
        s => Err(format!("answered {s}")),
    }
}

/// A signed request's parts (events and authorization callbacks alike).
pub(super) struct Signed<'a> {
    pub key: &'a [u8],
    /// `X-Cohost-Event`.
    pub event: &'a str,
    pub id: &'a str,
    pub body: &'a Bytes,
    pub attempt: u32,
}

/// POST `req` to `uri` with the signature headers, bounded by `timeout` (connecting,
/// sending, the response and reading what it says): the answer's status.
pub(super) async fn send(
    client: &HttpClient,
    uri: &hyper::Uri,
    req: &Signed<'_>,
    timeout: Duration,
) -> Result<hyper::StatusCode, String> {
    let timestamp = (super::unix_ms() / 1000).to_string();
    let signature = format!("sha256={}", sign(req.key, &timestamp, req.body));
    let request = hyper::Request::post(uri.clone())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(
            hyper::header::USER_AGENT,
            concat!("cohost/", env!("CARGO_PKG_VERSION")),
        )
        .header("x-cohost-event", req.event)
        .header("x-cohost-event-id", req.id)
        .header(TIMESTAMP_HEADER, timestamp.as_str())
        .header(SIGNATURE_HEADER, signature.as_str())
        .header("x-cohost-attempt", req.attempt.to_string())
        .body(Full::new(req.body.clone()))
        .map_err(|e| format!("building the request: {e}"))?;
    let exchange = async {
        let resp = client
            .request(request)
            .await
            .map_err(|e| format!("request: {}", error_chain(&e)))?;
        let status = resp.status();
        // Read the answer (bounded) so the connection goes back to the pool; its content
        // does not matter.
        let _ = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await;
        Ok::<_, String>(status)
    };
    match tokio::time::timeout(timeout, exchange).await {
        Err(_) => Err(format!("timed out after {timeout:?}")),
        Ok(r) => r,
    }
}

/// The HTTP client of one purpose (events, authorization): pooled connections, `http://` in
/// the clear and `https://` over TLS, trusting the Mozilla roots plus the PEM certificates of
/// `ca_file` (a private CA of the operator's backend), if set.
pub(super) fn client(connect_timeout: Duration, idle_per_host: usize, ca_file: &str) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    // The TLS layer decides per URL; the TCP connector must accept https:// URIs too.
    connector.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config(ca_file))
        .https_or_http()
        .enable_http1()
        .wrap_connector(connector);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(idle_per_host)
        .build(https)
}

/// TLS client settings: ring (the provider WebRTC's DTLS already uses), TLS 1.2 and 1.3, the
/// bundled roots and `ca_file`'s certificates. A certificate in `ca_file` that does not parse
/// is logged and skipped (the config check already made sure the file holds certificates).
fn tls_config(ca_file: &str) -> rustls::ClientConfig {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if !ca_file.is_empty() {
        match CertificateDer::pem_file_iter(ca_file) {
            Ok(certs) => {
                for c in certs {
                    match c
                        .map_err(|e| e.to_string())
                        .and_then(|c| roots.add(c).map_err(|e| e.to_string()))
                    {
                        Ok(()) => {}
                        Err(e) => warn!("webhooks.ca_file {ca_file}: certificate skipped: {e}"),
                    }
                }
            }
            Err(e) => warn!("webhooks.ca_file {ca_file}: not read: {e}"),
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    match rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
    {
        Ok(b) => b.with_root_certificates(roots).with_no_client_auth(),
        // ring supports the default versions; this cannot fail, but never panic over it.
        Err(e) => {
            warn!("webhooks: TLS setup: {e}; using rustls defaults");
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        }
    }
}

/// An error and its causes ("client error (Connect): tcp connect error: Connection refused").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_covers_timestamp_and_body() {
        // Reference value: printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac key-key-key-key-1
        let s = sign(b"key-key-key-key-1", "1700000000", br#"{"a":1}"#);
        assert_eq!(
            s,
            "1ef420b5c1b20102bf0fbae8b7514f1a860bd10fdf3bcc8dbecfda3d79f146f7"
        );
        assert_ne!(s, sign(b"key-key-key-key-1", "1700000001", br#"{"a":1}"#));
        assert_ne!(s, sign(b"key-key-key-key-1", "1700000000", br#"{"a":2}"#));
        assert_ne!(s, sign(b"key-key-key-key-2", "1700000000", br#"{"a":1}"#));
    }

    #[test]
    fn backoff_doubles_up_to_the_max() {
        let (i, m) = (Duration::from_millis(100), Duration::from_millis(700));
        let d: Vec<u128> = (1..=6).map(|n| backoff(i, m, n).as_millis()).collect();
        assert_eq!(d, vec![100, 200, 400, 700, 700, 700]);
        assert_eq!(backoff(i, Duration::MAX, 100), i * 65536);
    }
}
