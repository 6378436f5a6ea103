//! Client peer connections for the load generator: the same codecs and interceptors as the
//! server (so NACK/RTCP behave as in production), loopback only, fast ICE.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceGatheringState, RTCPeerConnectionIceEvent, RTCPeerConnectionState, SettingEngineBuilder,
};

use crate::stats::Sink;

/// Events a client connection reports to its signaling code.
#[derive(Debug)]
pub enum PcEvent {
    /// A local candidate (browser JSON shape fields); `None` = gathering complete.
    Candidate(Option<(String, Option<String>, Option<u16>)>),
    State(RTCPeerConnectionState),
}

struct Handler {
    tx: mpsc::UnboundedSender<PcEvent>,
    sink: Option<Arc<Sink>>,
    watch: Arc<Watch>,
}

/// What became of one client connection, for the failed-connection count every scenario
/// reports: a run where any participant failed to connect is not a valid benchmark result.
#[derive(Debug)]
struct Watch {
    /// The participant (room/identity) the connection belongs to.
    who: String,
    /// ICE started (both descriptions set): from here on it must connect.
    started: AtomicBool,
    connected: AtomicBool,
    failed: AtomicBool,
}

/// Every connection made since the last [`reset_tracking`].
static TRACKED: Mutex<Vec<Arc<Watch>>> = Mutex::new(Vec::new());

fn tracked() -> std::sync::MutexGuard<'static, Vec<Arc<Watch>>> {
    TRACKED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Forget the connections of earlier scenarios.
pub fn reset_tracking() {
    tracked().clear();
}

/// Connections and participants since the last [`reset_tracking`] that failed to connect:
/// negotiation started but the connection never reached `connected`, or it failed later.
#[derive(Debug, Clone, Default)]
pub struct ConnReport {
    pub connections: usize,
    pub failed_connections: usize,
    pub participants: usize,
    /// Participants with at least one failed connection (room/identity).
    pub failed_participants: Vec<String>,
}

pub fn connection_report() -> ConnReport {
    let all = tracked();
    let mut r = ConnReport::default();
    let mut who: Vec<&str> = vec![];
    let mut failed: Vec<String> = vec![];
    for w in all.iter() {
        if !who.contains(&w.who.as_str()) {
            who.push(&w.who);
        }
        if !w.started.load(Ordering::Relaxed) {
            // Never negotiated (a lone publisher's unused subscriber connection).
            continue;
        }
        r.connections += 1;
        if !w.connected.load(Ordering::Relaxed) || w.failed.load(Ordering::Relaxed) {
            r.failed_connections += 1;
            if !failed.contains(&w.who) {
                failed.push(w.who.clone());
            }
        }
    }
    r.participants = who.len();
    r.failed_participants = failed;
    r
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        if let Ok(init) = event.candidate.to_json() {
            let _ = self.tx.send(PcEvent::Candidate(Some((
                init.candidate,
                init.sdp_mid,
                init.sdp_mline_index,
            ))));
        }
    }

    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.tx.send(PcEvent::Candidate(None));
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let w = &self.watch;
        match state {
            RTCPeerConnectionState::Connecting => w.started.store(true, Ordering::Relaxed),
            RTCPeerConnectionState::Connected => {
                w.started.store(true, Ordering::Relaxed);
                w.connected.store(true, Ordering::Relaxed);
            }
            RTCPeerConnectionState::Failed => {
                w.started.store(true, Ordering::Relaxed);
                w.failed.store(true, Ordering::Relaxed);
                eprintln!("  connection of {} failed", w.who);
            }
            _ => {}
        }
        let _ = self.tx.send(PcEvent::State(state));
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let Some(sink) = self.sink.clone() else {
            return;
        };
        tokio::spawn(async move {
            while let Some(ev) = track.poll().await {
                match ev {
                    TrackRemoteEvent::OnRtpPacket(p) => sink.on_packet(&p, Instant::now()),
                    TrackRemoteEvent::OnEnded => break,
                    _ => {}
                }
            }
        });
    }
}

/// Build a client connection of participant `who` bound to `ip` (127.0.0.1, or the benchmark
/// namespace's dummy interface, see bench/sfu-vs-janus.sh). Received media goes to `sink` (if
/// any); candidates and state changes come out of the returned channel; whether it connected
/// is tracked for [`connection_report`].
pub async fn new_pc_on(
    who: &str,
    sink: Option<Arc<Sink>>,
    ip: IpAddr,
) -> anyhow::Result<(Arc<dyn PeerConnection>, mpsc::UnboundedReceiver<PcEvent>)> {
    let mut me = cohost::peer::media_engine()?;
    let reg = cohost::peer::interceptors(&mut me)?;
    let se = SettingEngineBuilder::new()
        .with_ice_connection_attempts(Some(Duration::from_millis(50)), Some(100))
        .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
        .with_include_loopback_candidate(true)
        .with_prflx_acceptance_min_wait(Some(Duration::ZERO))
        .with_srflx_acceptance_min_wait(Some(Duration::ZERO))
        .build();
    let (tx, rx) = mpsc::unbounded_channel();
    let watch = Arc::new(Watch {
        who: who.to_string(),
        started: AtomicBool::new(false),
        connected: AtomicBool::new(false),
        failed: AtomicBool::new(false),
    });
    tracked().push(watch.clone());
    let mut builder = PeerConnectionBuilder::new();
    // Same large socket buffers as the server: receivers must not be where bursts are lost.
    if let Some(rt) = cohost::peer::runtime::BufferedRuntime::shared(4 * 1024 * 1024) {
        builder = builder.with_runtime(rt);
    }
    let pc = builder
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(me)
        .with_setting_engine(se)
        .with_interceptor_registry(reg)
        .with_handler(Arc::new(Handler { tx, sink, watch }) as Arc<dyn PeerConnectionEventHandler>)
        .with_udp_addrs(vec![SocketAddr::new(ip, 0).to_string()])
        .build()
        .await
        .map_err(|e| anyhow::anyhow!("client peer connection: {e}"))?;
    Ok((Arc::new(pc), rx))
}

/// Wait until ICE gathering completes (for signaling without trickle, e.g. Janus over HTTP).
pub async fn wait_gathered(rx: &mut mpsc::UnboundedReceiver<PcEvent>, timeout: Duration) {
    let _ = tokio::time::timeout(timeout, async {
        while let Some(ev) = rx.recv().await {
            if matches!(ev, PcEvent::Candidate(None)) {
                return;
            }
        }
    })
    .await;
}
