//! A UDP relay that impairs a link the way phones' networks do: loss (random, or in bursts),
//! delay, jitter (reordering packets, as netem does, or keeping their order) and duplication,
//! each direction on its own, with counters. This kernel has no netem, so tests put it between a
//! client and the server: the client is given the relay's address instead of the server's
//! candidate, the server sees the relay's upstream socket as the client (a peer-reflexive
//! candidate, like a NAT's). Everything stays on loopback.
//!
//! Loss follows a Gilbert-Elliott model: `loss` is the long-run fraction dropped and
//! `burst` the mean number of packets lost in a row (1 = independent losses). Randomness is
//! seeded, so a run can be repeated.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::sync::{Mutex, mpsc};
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, Default)]
pub struct Impairment {
    /// Long-run fraction of packets dropped, 0-1.
    pub loss: f64,
    /// Mean length of a loss burst in packets (1 or less: independent losses).
    pub burst: f64,
    /// Fixed one-way delay.
    pub delay: Duration,
    /// Each packet's delay varies uniformly by up to this much either way.
    pub jitter: Duration,
    /// With jitter: packets may overtake each other (netem's behaviour). Without: each packet
    /// leaves no earlier than the one before it.
    pub reorder: bool,
    /// Fraction of packets sent twice.
    pub duplicate: f64,
}

impl Impairment {
    pub fn clean() -> Self {
        Self::default()
    }
}

/// Per-direction counters.
#[derive(Debug, Default)]
pub struct Counters {
    pub packets: AtomicU64,
    pub dropped: AtomicU64,
    pub duplicated: AtomicU64,
    /// Packets sent out before one that arrived earlier.
    pub reordered: AtomicU64,
}

impl Counters {
    pub fn summary(&self) -> String {
        format!(
            "{} packets, {} dropped, {} duplicated, {} reordered",
            self.packets.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
            self.duplicated.load(Ordering::Relaxed),
            self.reordered.load(Ordering::Relaxed)
        )
    }
}

/// A running relay; its tasks stop when it is dropped.
pub struct Relay {
    /// Where the client sends (instead of the server's address).
    pub addr: SocketAddr,
    /// Client to server.
    pub up: Arc<Counters>,
    /// Server to client.
    pub down: Arc<Counters>,
    /// While set, everything the client sends is dropped (the uplink is dead).
    pub cut: Arc<AtomicBool>,
    /// Once set, the client's packets reach the server from another address (127.0.0.2,
    /// another port): what a phone moving from Wi-Fi to cellular looks like to the server.
    pub moved: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct Gilbert {
    bad: bool,
    p_enter: f64,
    p_leave: f64,
}

impl Gilbert {
    fn new(loss: f64, burst: f64) -> Self {
        let loss = loss.clamp(0.0, 0.99);
        let burst = burst.max(1.0);
        // Stationary loss = p_enter / (p_enter + p_leave), mean burst = 1 / p_leave.
        let p_leave = 1.0 / burst;
        Self {
            bad: false,
            p_enter: (loss * p_leave / (1.0 - loss)).min(1.0),
            p_leave,
        }
    }

    fn drop_next(&mut self, rng: &mut StdRng) -> bool {
        if self.bad {
            self.bad = rng.random::<f64>() >= self.p_leave;
        } else {
            self.bad = rng.random::<f64>() < self.p_enter;
        }
        self.bad
    }
}

/// One direction: decides each packet's fate and departure time, and sends it then.
async fn direction(
    imp: Impairment,
    seed: u64,
    mut rx: mpsc::Receiver<(Vec<u8>, Instant)>,
    // Sent from the first socket, or from the second once `moved`.
    out: [Arc<UdpSocket>; 2],
    moved: Arc<AtomicBool>,
    to: Arc<Mutex<Option<SocketAddr>>>,
    counters: Arc<Counters>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut loss = Gilbert::new(imp.loss, imp.burst);
    // (departure, arrival order, bytes)
    let mut queue: BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>> = BinaryHeap::new();
    let mut order = 0u64;
    let mut last_departure = Instant::now();
    let mut last_sent_order = 0u64;
    loop {
        let next = queue.peek().map(|Reverse((at, _, _))| *at);
        tokio::select! {
            got = rx.recv() => {
                let Some((bytes, arrived)) = got else { return };
                counters.packets.fetch_add(1, Ordering::Relaxed);
                if imp.loss > 0.0 && loss.drop_next(&mut rng) {
                    counters.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let copies = if imp.duplicate > 0.0 && rng.random::<f64>() < imp.duplicate {
                    counters.duplicated.fetch_add(1, Ordering::Relaxed);
                    2
                } else {
                    1
                };
                for _ in 0..copies {
                    let j = imp.jitter.as_secs_f64();
                    let offset = if j > 0.0 { rng.random_range(-j..=j) } else { 0.0 };
                    let d = (imp.delay.as_secs_f64() + offset).max(0.0);
                    let mut at = arrived + Duration::from_secs_f64(d);
                    if !imp.reorder && at < last_departure {
                        at = last_departure;
                    }
                    last_departure = last_departure.max(at);
                    order += 1;
                    queue.push(Reverse((at, order, bytes.clone())));
                }
            }
            _ = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                let now = Instant::now();
                while queue.peek().is_some_and(|Reverse((at, _, _))| *at <= now) {
                    let Some(Reverse((_, n, bytes))) = queue.pop() else { break };
                    if n < last_sent_order {
                        counters.reordered.fetch_add(1, Ordering::Relaxed);
                    }
                    last_sent_order = last_sent_order.max(n);
                    if let Some(addr) = *to.lock().await {
                        let sock = &out[usize::from(moved.load(Ordering::Relaxed))];
                        let _ = sock.send_to(&bytes, addr).await;
                    }
                }
            }
        }
    }
}

impl Relay {
    /// Relay between one client (whoever sends to [`Relay::addr`] first) and `server`.
    pub async fn start(server: SocketAddr, up: Impairment, down: Impairment, seed: u64) -> Relay {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("relay bind"));
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("relay bind"));
        // Where the client seems to come from after `moved` (all of 127/8 is loopback).
        let back2 = Arc::new(UdpSocket::bind("127.0.0.2:0").await.expect("relay bind"));
        let moved = Arc::new(AtomicBool::new(false));
        let addr = front.local_addr().expect("relay addr");
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let server_addr = Arc::new(Mutex::new(Some(server)));
        let (up_c, down_c) = (Arc::new(Counters::default()), Arc::new(Counters::default()));
        let (up_tx, up_rx) = mpsc::channel(4096);
        let (down_tx, down_rx) = mpsc::channel(4096);
        let mut tasks = vec![
            tokio::spawn(direction(
                up,
                seed,
                up_rx,
                [back.clone(), back2.clone()],
                moved.clone(),
                server_addr,
                up_c.clone(),
            )),
            tokio::spawn(direction(
                down,
                seed ^ 0x9e37_79b9,
                down_rx,
                [front.clone(), front.clone()],
                Arc::new(AtomicBool::new(false)),
                client.clone(),
                down_c.clone(),
            )),
        ];
        // Client to server: remember who the client is.
        let (f, c) = (front.clone(), client.clone());
        let cut = Arc::new(AtomicBool::new(false));
        let (cut2, up_c2) = (cut.clone(), up_c.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = f.recv_from(&mut buf).await {
                *c.lock().await = Some(from);
                if cut2.load(Ordering::Relaxed) {
                    up_c2.packets.fetch_add(1, Ordering::Relaxed);
                    up_c2.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if up_tx
                    .send((buf[..n].to_vec(), Instant::now()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }));
        // Server to client, at the client's current address only: after a move, what the
        // server still sends to the old one is lost, as on a real network.
        for (i, b) in [back.clone(), back2.clone()].into_iter().enumerate() {
            let down_tx = down_tx.clone();
            let moved = moved.clone();
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, from)) = b.recv_from(&mut buf).await {
                    if from != server || moved.load(Ordering::Relaxed) != (i == 1) {
                        continue;
                    }
                    if down_tx
                        .send((buf[..n].to_vec(), Instant::now()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }));
        }
        Relay {
            addr,
            up: up_c,
            down: down_c,
            cut,
            moved,
            tasks,
        }
    }
}

/// `sdp` with its UDP host candidates on `server` rewritten to `relay`, and every other
/// candidate removed, so that the client can only reach the server through the relay.
pub fn via_relay(sdp: &str, server: SocketAddr, relay: SocketAddr) -> String {
    let mut out = String::new();
    for line in sdp.split_inclusive('\n') {
        if let Some(c) = line.trim_end().strip_prefix("a=candidate:") {
            let f: Vec<&str> = c.split(' ').collect();
            let on_server = f.len() > 5
                && f[2].eq_ignore_ascii_case("udp")
                && f[4] == server.ip().to_string()
                && f[5] == server.port().to_string();
            if !on_server {
                continue;
            }
            let mut g: Vec<String> = f.iter().map(|s| s.to_string()).collect();
            g[4] = relay.ip().to_string();
            g[5] = relay.port().to_string();
            out.push_str(&format!("a=candidate:{}\r\n", g.join(" ")));
        } else {
            out.push_str(line);
        }
    }
    out
}

/// The first UDP host candidate on loopback in `sdp`.
pub fn server_candidate(sdp: &str) -> Option<SocketAddr> {
    sdp.lines().find_map(|l| {
        let f: Vec<&str> = l.trim().strip_prefix("a=candidate:")?.split(' ').collect();
        (f.len() > 7 && f[2].eq_ignore_ascii_case("udp") && f[7] == "host" && f[4] == "127.0.0.1")
            .then(|| format!("{}:{}", f[4], f[5]).parse().ok())?
    })
}
