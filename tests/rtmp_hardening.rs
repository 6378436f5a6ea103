//! Hostile input on the RTMP port (issue 11): the real server binary (or the in-process server
//! where a test needs the origin), real sockets, a real RTMP handshake, then the bytes an
//! attacker sends. Each test proves the bad connection was closed (or, for legal input, served)
//! and that the server is still alive and serving other clients.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

const T: Duration = Duration::from_secs(15);

/// The real `cohost` binary on ephemeral loopback ports, its stderr (the log) captured.
struct Proc {
    child: Child,
    http: SocketAddr,
    rtmp: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    async fn start(env: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cohost"));
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--rtmp-listen",
            "127.0.0.1:0",
        ])
        .env_remove("COHOST_CONFIG")
        .env("COHOST_LOG", "warn,rtc=error,webrtc=error")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn cohost");
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut err = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let sink = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(l)) = err.next_line().await {
                eprintln!("[cohost] {l}");
                sink.lock().unwrap().push(l);
            }
        });
        let mut out = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let (http, rtmp) = tokio::time::timeout(T, async {
            let mut http = None;
            while let Ok(Some(l)) = out.next_line().await {
                if let Some(a) = l.strip_prefix("cohost listening on http://") {
                    http = a.parse::<SocketAddr>().ok();
                }
                if let Some(a) = l
                    .strip_prefix("cohost rtmp on rtmp://")
                    .and_then(|r| r.strip_suffix("/live"))
                {
                    return (http.expect("http first"), a.parse::<SocketAddr>().unwrap());
                }
            }
            panic!("server exited before listening");
        })
        .await
        .expect("server start timeout");
        tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });
        Proc {
            child,
            http,
            rtmp,
            log,
        }
    }

    fn log_has(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    async fn wait_log(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.log_has(needle) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// The process is running, `/healthz` answers 200 and a fresh RTMP client can connect.
    async fn assert_alive(&mut self) {
        assert!(
            self.child.try_wait().expect("try_wait").is_none(),
            "the server process died"
        );
        let mut s = TcpStream::connect(self.http)
            .await
            .expect("HTTP port still open");
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut resp = String::new();
        tokio::time::timeout(T, s.read_to_string(&mut resp))
            .await
            .expect("healthz timeout")
            .unwrap();
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        // From an address of its own, so that a per-IP cap under test does not refuse it.
        let mut r = handshaken_from(self.rtmp, Some("127.0.0.3"))
            .await
            .expect("a fresh RTMP handshake");
        r.write_all(&connect_command()).await.unwrap();
        assert!(
            read_until(&mut r, b"NetConnection.Connect.Success").await,
            "a fresh RTMP client connects"
        );
    }

    fn assert_no_panic(&self) {
        let log = self.log.lock().unwrap();
        assert!(
            !log.iter().any(|l| l.contains("panicked")),
            "a panic was logged: {log:?}"
        );
    }
}

/// An RTMP client that completes the handshake (C0+C1, then C2 echoing S1).
async fn handshaken(rtmp: SocketAddr) -> TcpStream {
    handshaken_from(rtmp, None).await.expect("handshake")
}

async fn handshaken_from(rtmp: SocketAddr, local: Option<&str>) -> std::io::Result<TcpStream> {
    let mut s = match local {
        Some(ip) => {
            let sock = tokio::net::TcpSocket::new_v4()?;
            sock.bind(format!("{ip}:0").parse().unwrap())?;
            sock.connect(rtmp).await?
        }
        None => TcpStream::connect(rtmp).await?,
    };
    let mut c1 = vec![3u8];
    c1.extend(std::iter::repeat_n(7u8, 1536));
    s.write_all(&c1).await?;
    let mut s0s1s2 = vec![0u8; 1 + 1536 * 2];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut s0s1s2))
        .await
        .map_err(|_| std::io::Error::other("handshake timeout"))??;
    s.write_all(&s0s1s2[1..1537]).await?;
    Ok(s)
}

/// One message as RTMP chunks of `size` bytes: a type 0 header on `csid`, type 3 after.
fn chunks(csid: u8, type_id: u8, stream_id: u32, body: &[u8], size: usize) -> Vec<u8> {
    let mut v = vec![csid, 0, 0, 0];
    v.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    v.push(type_id);
    v.extend_from_slice(&stream_id.to_le_bytes());
    for (i, part) in body.chunks(size).enumerate() {
        if i > 0 {
            v.push(0xc0 | csid);
        }
        v.extend_from_slice(part);
    }
    v
}

fn amf_str(s: &str) -> Vec<u8> {
    let mut v = vec![0x02];
    v.extend_from_slice(&(s.len() as u16).to_be_bytes());
    v.extend_from_slice(s.as_bytes());
    v
}

fn amf_num(n: f64) -> Vec<u8> {
    let mut v = vec![0x00];
    v.extend_from_slice(&n.to_be_bytes());
    v
}

fn connect_body() -> Vec<u8> {
    let mut v = amf_str("connect");
    v.extend(amf_num(1.0));
    v.push(0x03);
    // flashVer makes it longer than one 128-byte chunk, like a real client's.
    let flash = format!("FMLE/3.0 (compatible; cohost-test{})", " ".repeat(80));
    for (k, val) in [
        ("app", "live"),
        ("flashVer", flash.as_str()),
        ("tcUrl", "rtmp://127.0.0.1/live"),
    ] {
        v.extend_from_slice(&(k.len() as u16).to_be_bytes());
        v.extend_from_slice(k.as_bytes());
        v.extend(amf_str(val));
    }
    v.extend_from_slice(&[0, 0, 9]);
    v
}

/// A valid `connect` to the app "live" (AMF0 command on chunk stream 3).
fn connect_command() -> Vec<u8> {
    chunks(3, 20, 0, &connect_body(), 128)
}

/// Reads until `needle` shows up (true) or the connection ends / 10 s pass (false).
async fn read_until(s: &mut TcpStream, needle: &[u8]) -> bool {
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 16384];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                seen.extend_from_slice(&buf[..n]);
                if seen.windows(needle.len()).any(|w| w == needle) {
                    return true;
                }
            }
            _ => return false,
        }
    }
}

/// The server closes `s`: EOF (or a reset) within 5 s, whatever it sent before.
async fn assert_closed(mut s: TcpStream) {
    let mut sink = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await;
    assert!(r.is_ok(), "the server kept the bad connection open");
}

/// Defect 1 (critical): "connect", 1, then 10,000 strict arrays nested in each other (≈50 KB).
/// Before the guard, rml_amf0 recursed once per level until the stack overflowed and the
/// whole process aborted ("has overflowed its stack"): `assert_alive` failed (the process had
/// exited, the HTTP port refused). Now the connection is refused with one log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_amf0_command_closes_only_that_connection() {
    let mut server = Proc::start(&[]).await;
    let mut body = amf_str("connect");
    body.extend(amf_num(1.0));
    for _ in 0..10_000 {
        body.extend_from_slice(&[0x0a, 0, 0, 0, 1]);
    }
    body.extend(amf_num(0.0));
    assert!(body.len() > 50_000);
    let mut s = handshaken(server.rtmp).await;
    let _ = s.write_all(&chunks(3, 20, 0, &body, 128)).await;
    assert_closed(s).await;
    // Objects nest the same way (and ECMA arrays, which rml_amf0 reads as objects).
    let mut body = amf_str("connect");
    body.extend(amf_num(1.0));
    for _ in 0..12_000 {
        body.extend_from_slice(&[0x03, 0, 1, b'a']);
    }
    let mut s = handshaken(server.rtmp).await;
    let _ = s.write_all(&chunks(3, 20, 0, &body, 128)).await;
    assert_closed(s).await;
    assert!(
        server.wait_log("nested deeper than 32 levels").await,
        "the refusal is logged"
    );
    server.assert_alive().await;
    server.assert_no_panic();
}

/// Defect 2a: a command message with one AMF0 value. rml_rtmp's command parsing does
/// `drain(..3)` on the values and panicked ("range end index 3 out of range"), logged as a
/// task panic. Now the guard refuses it: a clean close, one warning, no panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_with_one_amf_value_is_refused_without_a_panic() {
    let mut server = Proc::start(&[]).await;
    for type_id in [20u8, 17] {
        let mut s = handshaken(server.rtmp).await;
        let _ = s
            .write_all(&chunks(3, type_id, 0, &amf_str("connect"), 128))
            .await;
        assert_closed(s).await;
    }
    // `@setDataFrame` alone: rml_rtmp indexed `data[0]` of the remaining values and panicked.
    let mut s = handshaken(server.rtmp).await;
    let _ = s
        .write_all(&chunks(3, 18, 0, &amf_str("@setDataFrame"), 128))
        .await;
    assert_closed(s).await;
    assert!(server.wait_log("rml_rtmp needs at least 3").await);
    assert!(server.wait_log("@setDataFrame with 1 AMF0 values").await);
    server.assert_alive().await;
    server.assert_no_panic();
}

/// Defect 2b: interleaved chunks. rml_rtmp keeps one partial message for all chunk streams:
/// a message on chunk stream 4 arriving while one on stream 3 is half received underflowed
/// `length - current_payload_length` (a panic; "capacity overflow" in release). Legal
/// interleaving is now reassembled by the guard (the connect completes), and a header that
/// contradicts the message in progress on its own stream is refused with a log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_chunks_are_reassembled_or_refused_without_a_panic() {
    let mut server = Proc::start(&[]).await;
    // Legal: the connect's first chunk, a whole audio message on stream 4, the connect's rest.
    let connect = connect_command();
    let first = 12 + 128;
    assert!(connect.len() > first, "the connect takes two chunks");
    let mut bytes = connect[..first].to_vec();
    bytes.extend(chunks(4, 8, 0, &[0xaf, 1, 2, 3, 4, 5, 6, 7, 8, 9], 128));
    bytes.extend_from_slice(&connect[first..]);
    let mut s = handshaken(server.rtmp).await;
    s.write_all(&bytes).await.unwrap();
    assert!(
        read_until(&mut s, b"NetConnection.Connect.Success").await,
        "interleaved chunks make one connect"
    );
    drop(s);
    // Inconsistent: half a 200-byte message on stream 3, then a type 1 header on stream 3
    // claiming a 10-byte message.
    let mut bytes = chunks(3, 20, 0, &[0x05; 200], 128)[..12 + 128].to_vec();
    bytes.extend_from_slice(&[0x43, 0, 0, 0, 0, 0, 10, 8]);
    bytes.extend_from_slice(&[0; 10]);
    let mut s = handshaken(server.rtmp).await;
    let _ = s.write_all(&bytes).await;
    assert_closed(s).await;
    assert!(
        server
            .wait_log("new message header on chunk stream 3 before its previous message ended")
            .await
    );
    server.assert_alive().await;
    server.assert_no_panic();
}

/// Connections over `rtmp_max_connections_per_ip` are closed before the handshake; another
/// client address is still admitted, and a slot is given back when a connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmp_connections_over_the_per_ip_cap_are_refused() {
    let mut server = Proc::start(&[("COHOST_ORIGIN__RTMP_MAX_CONNECTIONS_PER_IP", "2")]).await;
    let a = handshaken_from(server.rtmp, Some("127.0.0.1"))
        .await
        .unwrap();
    let b = handshaken_from(server.rtmp, Some("127.0.0.1"))
        .await
        .unwrap();
    let refused = handshaken_from(server.rtmp, Some("127.0.0.1")).await;
    assert!(
        refused.is_err(),
        "a third connection from one IP is refused"
    );
    assert!(
        server
            .wait_log("too many connections from this address")
            .await
    );
    // Another address (all of 127.0.0.0/8 is loopback) is a different client.
    let _c = handshaken_from(server.rtmp, Some("127.0.0.2"))
        .await
        .expect("another IP is admitted");
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if handshaken_from(server.rtmp, Some("127.0.0.1"))
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the closed connection's slot came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(b);
    server.assert_alive().await;
}

/// A player: handshake, connect, createStream, play `name` on message stream 1.
async fn rtmp_player(rtmp: SocketAddr, name: &str) -> TcpStream {
    let mut s = handshaken(rtmp).await;
    s.write_all(&connect_command()).await.unwrap();
    assert!(read_until(&mut s, b"NetConnection.Connect.Success").await);
    let mut create = amf_str("createStream");
    create.extend(amf_num(2.0));
    create.push(0x05);
    let mut play = amf_str("play");
    play.extend(amf_num(3.0));
    play.push(0x05);
    play.extend(amf_str(name));
    let mut bytes = chunks(3, 20, 0, &create, 128);
    bytes.extend(chunks(8, 20, 1, &play, 128));
    s.write_all(&bytes).await.unwrap();
    assert!(read_until(&mut s, b"NetStream.Play.Start").await);
    s
}

/// A player that stops reading is disconnected after `rtmp_write_timeout` (before, its task
/// blocked in `write_all` forever and it stayed a player of the stream while fewer than 1024
/// tags were queued), while another player of the same stream keeps receiving everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmp_player_that_stops_reading_is_disconnected_after_the_write_timeout() {
    let mut cfg = cohost::config::Config::default();
    cfg.server.http_listen = "127.0.0.1:0".parse().unwrap();
    cfg.server.rtmp_listen = "127.0.0.1:0".into();
    cfg.origin.rtmp_write_timeout = Duration::from_secs(1);
    let server = cohost::app::start(cfg).await.unwrap();
    let rtmp = server.rtmp_addr.unwrap();
    let origin = server.services.origin.clone();
    let publisher = origin.publish("slow").unwrap();
    let tag = |ts: u32, len: usize| cohost::media::flv::Tag {
        kind: cohost::media::flv::TAG_VIDEO,
        timestamp_ms: ts,
        body: vec![0x27; len],
    };
    publisher.send(tag(0, 100));
    let stalled = rtmp_player(rtmp, "slow").await;
    let mut good = rtmp_player(rtmp, "slow").await;
    assert_eq!(origin.player_count("slow"), 2);
    let received = Arc::new(AtomicUsize::new(0));
    let count = received.clone();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n) = good.read(&mut buf).await {
            if n == 0 {
                break;
            }
            count.fetch_add(n, Ordering::Relaxed);
        }
    });
    // 300 tags of 64 KB (19 MB): far more than the socket buffers hold, far fewer than the
    // 1024 tags that would make the origin drop the stalled player by itself.
    let start = Instant::now();
    let (tags, size) = (300u32, 64 * 1024);
    for i in 0..tags {
        publisher.send(tag(i * 33, size));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // The origin prunes a closed player on its next tag: keep a trickle going.
    let mut ts = tags * 33;
    while origin.player_count("slow") > 1 {
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "the stalled player was never disconnected"
        );
        ts += 33;
        publisher.send(tag(ts, 10));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let disconnected_after = start.elapsed();
    eprintln!("stalled player disconnected after {disconnected_after:?}");
    assert_eq!(origin.player_count("slow"), 1, "the reading player stays");
    let want = tags as usize * size;
    let deadline = Instant::now() + T;
    while received.load(Ordering::Relaxed) < want {
        assert!(
            Instant::now() < deadline,
            "the reading player got {} of {want} bytes",
            received.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_closed(stalled).await;
    drop(publisher);
    let _ = tokio::time::timeout(T, reader).await;
    server.shutdown().await;
}
