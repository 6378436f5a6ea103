//! Signaling clients that do not play along: one that never reads what the server sends, a
//! member that stalls, a second host for a room that has one. Real TCP clients against the
//! real server binary.

mod common;

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use cohost::auth::Role;
use common::*;

/// A TCP connection with a tiny receive buffer, so that a client that stops reading makes the
/// server's writes block after a few kilobytes (plus the server's own send buffer).
async fn tiny_window_tcp(server: &Server) -> TcpStream {
    let sock = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&server.addr.into()).unwrap();
    sock.set_nonblocking(true).unwrap();
    TcpStream::from_std(sock.into()).unwrap()
}

/// Handshake and join over a tiny-window socket; reads only the join response.
async fn join_then_stop_reading(
    server: &Server,
    room: &str,
    identity: &str,
) -> WebSocketStream<TcpStream> {
    let tcp = tiny_window_tcp(server).await;
    let (mut ws, _) = tokio_tungstenite::client_async(server.ws_url(), tcp)
        .await
        .expect("websocket handshake");
    let token = server.token(room, identity, Role::Audience);
    ws.send(Message::Text(
        json!({"id": 1, "type": "join", "token": token})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let deadline = Instant::now() + T;
    loop {
        let m = tokio::time::timeout_at(deadline.into(), ws.next())
            .await
            .expect("join response")
            .expect("open")
            .expect("frame");
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["id"] == 1 {
                assert_eq!(v["type"], "response", "{v}");
                return ws;
            }
        }
    }
}

/// A request the server answers with an error that echoes its 60 KB request id.
fn big_error_request(i: usize) -> Message {
    let id = format!("{i:06}{}", "x".repeat(60_000));
    Message::Text(
        json!({"id": id, "type": "no_such_message"})
            .to_string()
            .into(),
    )
}

async fn participants(server: &Server, room: &str) -> Vec<String> {
    let admin = server.auth.mint("*", "ops", Role::Admin, None).unwrap();
    let (status, body) = server.get(&format!("/v1/rooms/{room}"), Some(&admin)).await;
    if status == 404 {
        return vec![];
    }
    let v: Value = serde_json::from_str(body.trim()).unwrap_or(json!({}));
    v["participants"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["identity"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Wait until `identity` is no longer listed in `room`; returns how long it took.
async fn wait_gone(server: &Server, room: &str, identity: &str, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if !participants(server, room)
            .await
            .iter()
            .any(|p| p == identity)
        {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{identity} still in room {room} after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The server must end a connection whose reader stopped: the stream ends (close or reset)
/// once the client looks again.
async fn assert_server_closed(ws: WebSocketStream<TcpStream>) {
    let mut tcp = ws.into_inner();
    let mut buf = vec![0u8; 1 << 16];
    let r = tokio::time::timeout(T, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(r.is_ok(), "the server kept the connection open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_client_that_never_reads_is_disconnected() {
    let server = Server::start_with(&[("COHOST_SIGNALING__WRITE_TIMEOUT", "3s")]).await;
    let mut host = Client::join(&server, "flood", "host", Role::Host).await;
    let pid = server.pid().expect("server pid");
    let mut ws = join_then_stop_reading(&server, "flood", "deaf").await;
    let rss_before = rss_kib(pid);
    // Flood within the rate limit (40 of 50/s) with requests whose errors echo 60 KB each:
    // 2.4 MB/s of replies the client never reads.
    let start = Instant::now();
    let mut max_queued = 0.0f64;
    let mut sent = 0;
    let mut rss_max = rss_before;
    while start.elapsed() < Duration::from_secs(12) {
        if ws.send(big_error_request(sent)).await.is_err() {
            break;
        }
        sent += 1;
        if sent % 10 == 0 {
            max_queued = max_queued.max(server.metric("cohost_ws_outbox_bytes").await);
            rss_max = rss_max.max(rss_kib(pid));
            if server.metric("cohost_ws_slow_readers_total").await >= 1.0 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let cut_after = start.elapsed();
    server
        .wait_metrics("the slow reader is counted", |m| {
            m.get("cohost_ws_slow_readers_total") == Some(&1.0)
        })
        .await;
    wait_gone(&server, "flood", "deaf", Duration::from_secs(10)).await;
    let left = host
        .sig
        .wait_for("participant_left", |v| {
            v["type"] == "participant_left" && v["identity"] == "deaf"
        })
        .await;
    assert_eq!(left["reason"], "slow_reader", "{left}");
    // Per-connection memory stays bounded: the queue never held more than its 1 MiB limit
    // plus one message, and the queue is empty once the connection is gone.
    assert!(max_queued <= (1 << 20) as f64 + 70_000.0, "{max_queued}");
    server
        .wait_metrics("queue freed", |m| {
            m.get("cohost_ws_outbox_bytes") == Some(&0.0)
        })
        .await;
    eprintln!(
        "never-reading client: {sent} requests of 60 KB sent, cut off after {cut_after:?}; \
         max queued {max_queued} bytes; server RSS {rss_before} KiB before, max {rss_max} KiB \
         during, {} KiB after",
        rss_kib(pid)
    );
    assert_server_closed(ws).await;
    // The other member keeps working.
    let pong = host.sig.request(json!({"type": "ping"})).await;
    assert_eq!(pong["type"], "response", "{pong}");
    let said = host
        .sig
        .request(json!({"type": "chat", "text": "still here"}))
        .await;
    assert_eq!(said["type"], "response", "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_member_leaves_room_after_timeout() {
    // A generous queue, so that the write timeout (not a full queue) is what catches the stall,
    // and a dead-connection timeout far beyond it.
    let server = Server::start_with(&[
        ("COHOST_SIGNALING__WRITE_TIMEOUT", "2s"),
        ("COHOST_SIGNALING__SEND_QUEUE_BYTES", "67108864"),
        ("COHOST_SIGNALING__DEAD_AFTER", "60s"),
    ])
    .await;
    let mut host = Client::join(&server, "stall", "host", Role::Host).await;
    let mut ws = join_then_stop_reading(&server, "stall", "frozen").await;
    // One burst (within the rate limit's burst of 100) of replies the client will never read,
    // more than the kernel buffers hold; then the client freezes: no reads, no writes.
    for i in 0..95 {
        ws.send(big_error_request(i)).await.unwrap();
    }
    let frozen = Instant::now();
    let took = wait_gone(&server, "stall", "frozen", Duration::from_secs(12)).await;
    eprintln!(
        "stalled member left the room {:?} after it froze",
        frozen.elapsed()
    );
    assert!(took < Duration::from_secs(12));
    let left = host
        .sig
        .wait_for("participant_left", |v| {
            v["type"] == "participant_left" && v["identity"] == "frozen"
        })
        .await;
    assert_eq!(left["reason"], "slow_reader", "{left}");
    assert_eq!(server.metric("cohost_ws_slow_readers_total").await, 1.0);
    assert_server_closed(ws).await;
    let pong = host.sig.request(json!({"type": "ping"})).await;
    assert_eq!(pong["type"], "response", "{pong}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_still_gets_the_join_timeout() {
    // No join and no reads: the join deadline fires all the same.
    let server = Server::start_with(&[("COHOST_SIGNALING__JOIN_TIMEOUT", "1s")]).await;
    let tcp = tiny_window_tcp(&server).await;
    let (ws, _) = tokio_tungstenite::client_async(server.ws_url(), tcp)
        .await
        .expect("websocket handshake");
    server
        .wait_metrics("the connection is gone", |m| {
            m.get("cohost_ws_connections") == Some(&0.0)
        })
        .await;
    assert_server_closed(ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_host_is_refused_while_the_host_is_live() {
    let server = Server::start().await;
    let mut alice = Client::join(&server, "one", "alice", Role::Host).await;
    let fan = Client::join(&server, "one", "fan", Role::Audience).await;
    // Another identity with a host token for the same room.
    let token = server.token("one", "mallory", Role::Host);
    let mut mallory = Signal::connect(&server.ws_url()).await;
    let r = mallory
        .request(json!({"type": "join", "token": token}))
        .await;
    assert_eq!(r["type"], "error", "{r}");
    assert_eq!(r["error"]["code"], "host_present", "{r}");
    let closing = mallory
        .wait_for("closing", |v| v["type"] == "closing")
        .await;
    assert_eq!(closing["code"], 4011, "{closing}");
    assert_eq!(mallory.wait_closed().await.0, 4011);
    // Over WHIP too: the same rule, answered 409.
    let offer = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
                 m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=sendonly\r\n\
                 a=rtpmap:111 opus/48000/2\r\n";
    let r = common::post_sdp(&server, "/whip/one", Some(&token), offer).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.body.contains("already has a host"), "{}", r.body);
    // Alice is unaffected: still the one host, and her host actions work.
    assert_eq!(participants(&server, "one").await, vec!["alice", "fan"]);
    let kicked = alice
        .sig
        .request(json!({"type": "kick", "participant_id": fan.pid}))
        .await;
    assert_eq!(kicked["type"], "response", "{kicked}");
    assert_eq!(fan.sig.wait_closed().await.0, 4009);
    alice
        .sig
        .wait_for("fan left", |v| {
            v["type"] == "participant_left" && v["identity"] == "fan"
        })
        .await;
    // Alice rejoining from a new connection still replaces her old one.
    let again = Client::join(&server, "one", "alice", Role::Host).await;
    assert_eq!(alice.sig.wait_closed().await.0, 4005);
    let pong = again.sig.request(json!({"type": "ping"})).await;
    assert_eq!(pong["type"], "response", "{pong}");
    assert_eq!(participants(&server, "one").await, vec!["alice"]);
}

/// Reads one WebSocket frame the server sent (unmasked): (fin, opcode, payload).
async fn read_frame(tcp: &mut TcpStream) -> (bool, u8, Vec<u8>) {
    let mut h = [0u8; 2];
    tcp.read_exact(&mut h).await.expect("frame header");
    let (fin, opcode) = (h[0] & 0x80 != 0, h[0] & 0x0f);
    assert_eq!(h[1] & 0x80, 0, "server frames are not masked");
    let len = match h[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            tcp.read_exact(&mut l).await.unwrap();
            u16::from_be_bytes(l) as usize
        }
        127 => {
            let mut l = [0u8; 8];
            tcp.read_exact(&mut l).await.unwrap();
            u64::from_be_bytes(l) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    tcp.read_exact(&mut payload).await.unwrap();
    (fin, opcode, payload)
}

/// A client text frame (masked, as RFC 6455 requires of clients; the key is zero).
fn client_text(text: &str) -> Vec<u8> {
    let mut f = vec![0x81u8];
    let n = text.len();
    if n < 126 {
        f.push(0x80 | n as u8);
    } else {
        f.push(0x80 | 126);
        f.extend_from_slice(&(n as u16).to_be_bytes());
    }
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(text.as_bytes());
    f
}

/// A join result carrying a long history arrives as a text frame and continuation frames of
/// at most 1 KiB (the server's per-connection write buffer then never grows to the size of
/// its largest message), and the client reassembles it into the same JSON.
#[tokio::test]
async fn long_messages_are_sent_in_fragments_the_client_reassembles() {
    use tokio::io::AsyncWriteExt;
    let server = Server::start().await;
    let chatter = Client::join(&server, "frag", "chatter", Role::Audience).await;
    let line = "x".repeat(290);
    for i in 0..5 {
        let r = chatter
            .sig
            .request(json!({"type": "chat", "text": format!("{i}{line}")}))
            .await;
        assert_eq!(r["type"], "response", "{r}");
    }

    // A plain GET is not an upgrade: 400, nothing else happens.
    let mut plain = TcpStream::connect(server.addr).await.unwrap();
    plain
        .write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    tokio::time::timeout(T, plain.read_to_string(&mut resp))
        .await
        .expect("answer")
        .unwrap();
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");

    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    // The handshake answer, byte by byte up to its blank line (the frames follow it).
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tokio::time::timeout(T, tcp.read_exact(&mut b))
            .await
            .expect("handshake")
            .unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // RFC 6455's own example key and accept value.
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    let token = server.token("frag", "reader", Role::Audience);
    tcp.write_all(&client_text(
        &json!({"id": 1, "type": "join", "token": token}).to_string(),
    ))
    .await
    .unwrap();

    let deadline = Instant::now() + T;
    loop {
        // One whole message, frame by frame.
        let mut frames = vec![];
        let mut text = vec![];
        loop {
            let (fin, opcode, payload) =
                tokio::time::timeout_at(deadline.into(), read_frame(&mut tcp))
                    .await
                    .expect("the join result");
            if opcode >= 8 {
                continue; // ping in between: allowed, and not part of the message
            }
            frames.push((opcode, payload.len()));
            text.extend_from_slice(&payload);
            if fin {
                break;
            }
        }
        let v: Value = serde_json::from_slice(&text).expect("reassembled JSON");
        if v["type"] != "response" {
            continue;
        }
        let history = v["result"]["history"].as_array().expect("history");
        let chat: Vec<&Value> = history.iter().filter(|m| m["kind"] == "chat").collect();
        assert_eq!(chat.len(), 5, "{v}");
        assert_eq!(chat[4]["text"], format!("4{line}"));
        assert!(text.len() > 1500, "history makes it long: {}", text.len());
        assert!(frames.len() >= 2, "fragmented: {frames:?}");
        assert_eq!(frames[0].0, 1, "a text frame first: {frames:?}");
        assert!(
            frames[1..].iter().all(|f| f.0 == 0),
            "then continuations: {frames:?}"
        );
        assert!(frames.iter().all(|f| f.1 <= 1024), "{frames:?}");
        break;
    }
}
