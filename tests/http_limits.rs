//! Limits of the HTTP listener (src/http/serve.rs), tried the way an attacker would: raw bytes
//! on real loopback sockets against the in-process server.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cohost::config::Config;
use cohost::media::flv::{self, Tag};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Upper bound of any single wait in these tests.
const T: Duration = Duration::from_secs(15);

async fn start(tune: impl FnOnce(&mut Config)) -> cohost::app::Server {
    let mut cfg = Config::default();
    cfg.server.http_listen = "127.0.0.1:0".parse().unwrap();
    cfg.server.rtmp_listen = String::new();
    tune(&mut cfg);
    cfg.validate().expect("test config is valid");
    cohost::app::start(cfg).await.expect("server starts")
}

/// Connect from a chosen loopback source address (127.0.0.0/8 is all local on Linux).
async fn connect_from(src: &str, server: &cohost::app::Server) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{src}:0").parse().unwrap()).unwrap();
    s.connect(server.addr).await.unwrap()
}

/// How a connection ended when read to its end.
#[derive(Debug)]
enum End {
    /// The server closed it (EOF or reset) after sending this many bytes.
    Closed(usize),
    /// Still open after the wait, with this many bytes received.
    Open(usize),
}

/// Read (and discard) until the server closes the connection or `limit` passes.
async fn read_to_close(s: &mut TcpStream, limit: Duration) -> End {
    let mut n = 0;
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return End::Open(n),
            Ok(Ok(0)) | Ok(Err(_)) => return End::Closed(n),
            Ok(Ok(k)) => n += k,
        }
    }
}

/// Read one response with a Content-Length body from a keep-alive connection.
async fn read_response(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(T, async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    return String::from_utf8_lossy(&buf[..end + 4 + len]).into_owned();
                }
            }
            let k = s.read(&mut chunk).await.expect("read response");
            assert!(k > 0, "connection closed mid-response: {buf:?}");
            buf.extend_from_slice(&chunk[..k]);
        }
    })
    .await
    .expect("response in time")
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const GET_HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_after_header_timeout() {
    let server = start(|c| {
        c.server.header_read_timeout = Duration::from_secs(1);
        c.server.idle_timeout = Duration::from_secs(30);
    })
    .await;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        tasks.push(tokio::spawn(async move {
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
            if i % 2 == 1 {
                // Half of them keep dribbling header lines: the deadline is for the whole
                // head, not between bytes.
                let (mut r, mut w) = s.into_split();
                let drip = tokio::spawn(async move {
                    for _ in 0..100 {
                        if w.write_all(b"X-Slow: 1\r\n").await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(150)).await;
                    }
                });
                let mut buf = [0u8; 1024];
                let end = tokio::time::timeout(Duration::from_secs(6), async {
                    let mut n = 0;
                    loop {
                        match r.read(&mut buf).await {
                            Ok(0) | Err(_) => return n,
                            Ok(k) => n += k,
                        }
                    }
                })
                .await;
                drip.abort();
                match end {
                    Ok(n) => End::Closed(n),
                    Err(_) => End::Open(0),
                }
            } else {
                read_to_close(&mut s, Duration::from_secs(6)).await
            }
        }));
    }
    for t in tasks {
        match t.await.unwrap() {
            End::Closed(n) => assert_eq!(n, 0, "closed without a response"),
            End::Open(n) => panic!("a slowloris connection is still open after 6 s ({n} bytes)"),
        }
    }
    let elapsed = t0.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900),
        "closed by the header timeout, not earlier: {elapsed:?}"
    );
    let m = &server.services.metrics;
    assert!(m.http_timeouts.load(Ordering::Relaxed) >= 100);
    // The server still serves.
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(GET_HEALTHZ).await.unwrap();
    assert!(read_response(&mut s).await.starts_with("HTTP/1.1 200"));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_per_ip_cap_are_refused() {
    let server = start(|c| {
        c.server.max_connections_per_ip = 4;
        c.server.max_connections = 6;
        // The held connections send nothing: keep them open for the whole test.
        c.server.header_read_timeout = Duration::from_secs(60);
    })
    .await;
    let m = server.services.metrics.clone();
    // Four idle connections fill 127.0.0.1's share.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect_from("127.0.0.1", &server).await);
    }
    wait_until("4 admitted connections", || {
        m.http_connections.load(Ordering::Relaxed) == 4
    })
    .await;
    // A fifth from the same IP is closed at once, even with a complete request.
    let mut fifth = connect_from("127.0.0.1", &server).await;
    let _ = fifth.write_all(GET_HEALTHZ).await;
    match read_to_close(&mut fifth, Duration::from_secs(3)).await {
        End::Closed(0) => {}
        other => panic!("over the per-IP cap: {other:?}"),
    }
    // Another client IP is still served (keep-alive: its connections stay open).
    let mut other = Vec::new();
    for _ in 0..2 {
        let mut s = connect_from("127.0.0.2", &server).await;
        s.write_all(GET_HEALTHZ).await.unwrap();
        assert!(read_response(&mut s).await.starts_with("HTTP/1.1 200"));
        other.push(s);
    }
    // Six open in total: a third IP hits the total cap.
    let mut third = connect_from("127.0.0.3", &server).await;
    let _ = third.write_all(GET_HEALTHZ).await;
    match read_to_close(&mut third, Duration::from_secs(3)).await {
        End::Closed(0) => {}
        other => panic!("over the total cap: {other:?}"),
    }
    assert_eq!(m.http_connections_refused.load(Ordering::Relaxed), 2);
    // Closing a connection gives its slot back; /metrics reports the refusals.
    drop(held.pop());
    wait_until("a freed slot", || {
        m.http_connections.load(Ordering::Relaxed) == 5
    })
    .await;
    let mut s = connect_from("127.0.0.1", &server).await;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let text = read_response(&mut s).await;
    assert!(
        text.contains("\ncohost_http_connections_refused_total 2\n"),
        "{text}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keepalive_connection_is_closed() {
    let server = start(|c| {
        c.server.idle_timeout = Duration::from_secs(1);
        c.server.header_read_timeout = Duration::from_secs(5);
    })
    .await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    // Keep-alive works: a second request on the same connection within the idle timeout.
    s.write_all(GET_HEALTHZ).await.unwrap();
    assert!(read_response(&mut s).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.write_all(GET_HEALTHZ).await.unwrap();
    assert!(read_response(&mut s).await.starts_with("HTTP/1.1 200"));
    // Then silence: closed after idle_timeout (1 s), well before header_read_timeout (5 s).
    let idle_from = Instant::now();
    match read_to_close(&mut s, Duration::from_secs(4)).await {
        End::Closed(0) => {}
        other => panic!("idle keep-alive connection: {other:?}"),
    }
    let idle = idle_from.elapsed();
    assert!(
        idle >= Duration::from_millis(900) && idle < Duration::from_secs(3),
        "closed after {idle:?}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_body_sent_too_slowly_gets_408() {
    let server = start(|c| c.server.request_timeout = Duration::from_secs(1)).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(
        b"POST /v1/dev/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 1000\r\n\r\n{\"room\":",
    )
    .await
    .unwrap();
    let t0 = Instant::now();
    let r = read_response(&mut s).await;
    assert!(r.starts_with("HTTP/1.1 408"), "{r}");
    assert!(r.contains("request_timeout"), "{r}");
    assert!(t0.elapsed() < Duration::from_secs(4));
    match read_to_close(&mut s, Duration::from_secs(3)).await {
        End::Closed(_) => {}
        other => panic!("connection after 408: {other:?}"),
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_rest_body_is_refused_with_413() {
    let server = start(|c| c.server.max_body_bytes = 4096).await;
    // A valid host token: the token is checked before the body (issue 11, defect 9), so
    // without one the answer would be 401 whatever the body.
    let token = server
        .services
        .auth
        .mint("r", "host", cohost::auth::Role::Host, None)
        .expect("token");
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let body = vec![b'a'; 10_000];
    let head = format!(
        "POST /v1/rooms/r/stream-keys HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Authorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let _ = s.write_all(&body).await;
    let r = read_response(&mut s).await;
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_head_gets_431() {
    let server = start(|c| c.server.max_header_bytes = 16 * 1024).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let mut head = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\n");
    for i in 0..40 {
        head.push_str(&format!("X-Big-{i}: {}\r\n", "a".repeat(1000)));
    }
    head.push_str("\r\n");
    let _ = s.write_all(head.as_bytes()).await;
    let r = read_response(&mut s).await;
    assert!(r.starts_with("HTTP/1.1 431"), "{r}");
    // A head under the limit is served.
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(
        format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Ok: {}\r\n\r\n",
            "a".repeat(8000)
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    assert!(read_response(&mut s).await.starts_with("HTTP/1.1 200"));
    server.shutdown().await;
}

fn video(ts: u32, body: Vec<u8>) -> Tag {
    Tag {
        kind: flv::TAG_VIDEO,
        timestamp_ms: ts,
        body,
    }
}

/// A keyframe-flagged AVC video tag body of about `size` bytes (content is never decoded).
fn keyframe(size: usize) -> Vec<u8> {
    flv::avc_frame(true, 0, &vec![0x65; size])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_flv_reader_that_stops_reading_is_disconnected() {
    let server = start(|c| c.server.write_timeout = Duration::from_secs(1)).await;
    let origin = server.services.origin.clone();
    let m = server.services.metrics.clone();
    let publisher = origin.publish("stall").unwrap();
    publisher.send(video(0, flv::avc_sequence_header(&[1, 0x64, 0, 0x1f])));
    publisher.send(video(0, keyframe(1000)));
    // A player with a small receive window that reads its response head and then nothing.
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(server.addr).await.unwrap();
    s.write_all(b"GET /live/stall.flv HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    wait_until("the player", || origin.player_count("stall") == 1).await;
    // 24 MiB: far more than the socket buffers hold, far fewer tags than the origin's
    // per-player queue (1024), so the origin never drops this player itself: only the
    // write timeout can.
    let mut sent = 0usize;
    let mut ts = 0;
    for _ in 0..384 {
        ts += 5;
        let body = keyframe(64 * 1024);
        sent += body.len();
        publisher.send(video(ts, body));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Keep the stream alive (a few small tags) until the player is gone.
    let deadline = Instant::now() + T;
    let mut extra = 0;
    while m.flv_players.load(Ordering::Relaxed) > 0 {
        assert!(
            Instant::now() < deadline,
            "the stalled HTTP-FLV reader is still connected"
        );
        assert!(extra < 500, "stay under the origin's queue");
        ts += 40;
        publisher.send(video(ts, keyframe(100)));
        extra += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_until("the connection to close", || {
        m.http_connections.load(Ordering::Relaxed) == 0
    })
    .await;
    publisher.send(video(ts + 40, keyframe(100)));
    assert_eq!(origin.player_count("stall"), 0);
    assert!(m.http_timeouts.load(Ordering::Relaxed) >= 1);
    // The client, reading again, finds the end of what was buffered, then the close.
    match read_to_close(&mut s, Duration::from_secs(5)).await {
        End::Closed(n) => assert!(n < sent, "got {n} of {sent} bytes"),
        other => panic!("still open: {other:?}"),
    }
    drop(publisher);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_flv_players_over_the_stream_cap_get_503_and_shutdown_ends_streams() {
    let server = start(|c| c.server.max_flv_players_per_stream = 1).await;
    let origin = server.services.origin.clone();
    let publisher = origin.publish("capped").unwrap();
    publisher.send(video(0, flv::avc_sequence_header(&[1, 0x64, 0, 0x1f])));
    publisher.send(video(0, keyframe(100)));
    let req = b"GET /live/capped.flv HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut first = TcpStream::connect(server.addr).await.unwrap();
    first.write_all(req).await.unwrap();
    wait_until("the first player", || origin.player_count("capped") == 1).await;
    let mut second = TcpStream::connect(server.addr).await.unwrap();
    second.write_all(req).await.unwrap();
    let r = read_response(&mut second).await;
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    assert!(r.contains("too_many_players"), "{r}");
    assert_eq!(
        server
            .services
            .metrics
            .flv_players_refused
            .load(Ordering::Relaxed),
        1
    );
    // A graceful shutdown ends the live response, so the player sees its end promptly.
    let t0 = Instant::now();
    server.shutdown().await;
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    match read_to_close(&mut first, Duration::from_secs(3)).await {
        End::Closed(n) => assert!(n > 0),
        other => panic!("player after shutdown: {other:?}"),
    }
    drop(publisher);
}
