//! The only user of the `webrtc` crate. Builds peer connections from the configuration (port
//! range, NAT IPs, ICE timing, codecs, interceptors), negotiates with SDP strings, and exposes
//! remote tracks (what a client publishes) and local tracks (what the server forwards to a
//! client) as small types the rest of the server uses without seeing any webrtc type.

pub mod bwe;
pub mod keyframe_interceptor;
pub mod nack_budget;
pub mod nack_floor;
pub mod noise;
mod ports;
pub mod runtime;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rtc::interceptor::{
    CongestionControlBuilder, NackGeneratorBuilder, NackResponderBuilder, Registry, Slot,
    TwccSenderBuilder,
};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::RTCOfferOptions;
use rtc::peer_connection::configuration::interceptor_registry::{
    configure_rtcp_reports, configure_simulcast_extension_headers, configure_twcc_receiver_only,
};
use rtc::peer_connection::configuration::media_engine::{
    MIME_TYPE_H264, MIME_TYPE_OPUS, MIME_TYPE_VP8, MediaEngine,
};
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp_transceiver::RTCRtpTransceiverId;
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters,
    RTCRtpEncodingParameters, RtpCodecKind,
};
use tokio::sync::mpsc;
use tracing::{debug, warn};
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceCandidateInit, RTCIceGatheringState, RTCPeerConnectionIceEvent, RTCPeerConnectionState,
    RTCSessionDescription, SettingEngineBuilder,
};
use webrtc::rtp_transceiver::{RTCRtpTransceiverDirection, RtpSender};

use crate::config::WebrtcConfig;
use crate::media::jitter::{NACK_INTERVAL, NACK_MAX_PER_PACKET};
use crate::sfu::{CodecSpec, Packet, SenderReport};
use keyframe_interceptor::{ConnectionFeedback, FeedbackCounts, RtcpCounter};

pub use ports::{PortPool, PortUse};

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("invalid SDP: {0}")]
    BadSdp(String),
    #[error("no free UDP port in {0}-{1}")]
    NoPort(u16, u16),
    /// Only the ports kept for publishers (`webrtc.publisher_port_reserve`) are free.
    #[error("no UDP port left for viewers: the last {0} free ports are kept for publishers")]
    PortsReserved(usize),
    #[error("webrtc: {0}")]
    Webrtc(String),
}

fn werr(e: impl std::fmt::Display) -> PeerError {
    PeerError::Webrtc(e.to_string())
}

/// An ICE candidate in the browser's JSON shape.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IceCandidate {
    pub candidate: String,
    pub sdp_mid: Option<String>,
    pub sdp_mline_index: Option<u16>,
    pub username_fragment: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    New,
    Connecting,
    Connected,
    Disconnected,
    Failed,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaKind {
    Audio,
    Video,
}

/// What a peer connection reports to its owner.
pub enum PeerEvent {
    /// A local ICE candidate to trickle to the client; `None` when gathering is complete
    /// (once per connection: see [`Peer::end_of_candidates`] for its wire shape).
    Candidate(Option<IceCandidate>),
    State(PeerState),
    /// The client started sending a track.
    Track(RemoteTrack),
}

struct Handler {
    tx: mpsc::UnboundedSender<PeerEvent>,
    /// The simulcast m-sections of the client's latest offer (shared with the [`Peer`]).
    simulcast: Arc<std::sync::Mutex<Vec<SimulcastSection>>>,
    connected: Arc<AtomicBool>,
    nat: Arc<NatMap>,
    tag: Arc<BundleTag>,
    /// End of candidates was reported (see `on_ice_gathering_state_change`); shared with the
    /// [`Peer`], which clears it when ICE restarts.
    gathered: Arc<AtomicBool>,
}

/// The m-section every server candidate belongs to: the BUNDLE tag of the local description
/// (the first mid of `a=group:BUNDLE`) and its index, what browsers put in `sdpMid` and
/// `sdpMLineIndex` of their own candidates on a BUNDLEd connection. `webrtc` 0.21's
/// `RTCIceCandidate::to_json` always says `sdpMid: ""`, `sdpMLineIndex: 0`, and by the W3C
/// rules a non-null mid that names no m-section makes `addIceCandidate` fail, so the tag is
/// read from each local description as it is set (gathering starts only after that).
#[derive(Debug, Default)]
struct BundleTag(std::sync::Mutex<Option<(String, u16)>>);

impl BundleTag {
    fn set_from(&self, sdp: &str) {
        if let Some(t) = bundle_tag(sdp) {
            *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
        }
    }

    /// `(sdpMid, sdpMLineIndex)`; before any local description (never seen in practice), no
    /// mid and index 0, which W3C stacks resolve by index.
    fn get(&self) -> (Option<String>, Option<u16>) {
        match &*self.0.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((mid, index)) => (Some(mid.clone()), Some(*index)),
            None => (None, Some(0)),
        }
    }
}

/// The BUNDLE tag of an SDP and the index of its m-section: the first mid of
/// `a=group:BUNDLE`, or the first m-section's mid when nothing is bundled.
pub fn bundle_tag(sdp: &str) -> Option<(String, u16)> {
    let mut mids: Vec<Option<&str>> = vec![];
    let mut group: Option<&str> = None;
    for line in sdp.lines().map(str::trim_end) {
        if line.starts_with("m=") {
            mids.push(None);
        } else if let Some(mid) = line.strip_prefix("a=mid:") {
            if let Some(slot @ None) = mids.last_mut() {
                *slot = Some(mid.trim());
            }
        } else if let Some(g) = line.strip_prefix("a=group:BUNDLE")
            && group.is_none()
        {
            group = g.split_whitespace().next();
        }
    }
    let index = match group {
        Some(tag) => mids.iter().position(|m| *m == Some(tag))?,
        None => mids.iter().position(Option::is_some)?,
    };
    Some((mids[index]?.to_string(), u16::try_from(index).ok()?))
}

/// The first `a=ice-ufrag` of an SDP (with bundle, the one ICE session).
pub fn ice_ufrag(sdp: &str) -> Option<String> {
    sdp.lines()
        .find_map(|l| l.trim_end().strip_prefix("a=ice-ufrag:"))
        .map(str::to_string)
}

/// Adds `a=msid-semantic:WMS *` at session level when an SDP lacks it. `webrtc` 0.21 writes it
/// into every description except the first offer of a connection (its "unmatched" SDP has no
/// session attribute but the BUNDLE group), and without it some stacks ignore the `a=msid`
/// lines and invent stream and track ids. The crate offers no way to add it, and
/// `set_local_description` refuses any text other than the offer it created
/// (`ErrSDPDoesNotMatchOffer`), so the line is added to the text that leaves the server, and
/// [`Peer::local_sdp`] shows the same text. It is a declaration about the `a=msid` lines only,
/// which the crate itself never reads back from its own description.
pub fn with_msid_semantic(sdp: &str) -> String {
    if sdp.lines().any(|l| l.starts_with("a=msid-semantic")) {
        return sdp.to_string();
    }
    match sdp.find("\r\nm=") {
        Some(at) => {
            let at = at + 2;
            format!("{}a=msid-semantic:WMS *\r\n{}", &sdp[..at], &sdp[at..])
        }
        None => sdp.to_string(),
    }
}

/// `sdp` with every `a=ice-ufrag` / `a=ice-pwd` (session or media level) replaced by `ufrag`
/// and `pwd`, its `a=candidate` and `a=end-of-candidates` lines dropped, and `candidates` added
/// to the m-section their mid names (else the first one; with BUNDLE there is one transport).
/// The values must already be checked (no line breaks): see `participant::whip::parse_sdpfrag`.
pub fn with_ice_credentials(
    sdp: &str,
    ufrag: &str,
    pwd: &str,
    candidates: &[IceCandidate],
) -> String {
    let mut sections: Vec<(Option<String>, Vec<String>)> = vec![(None, vec![])];
    for line in sdp.lines().map(str::trim_end) {
        if line.starts_with("m=") {
            sections.push((None, vec![]));
        }
        let Some((mid, lines)) = sections.last_mut() else {
            continue;
        };
        if let Some(m) = line.strip_prefix("a=mid:") {
            *mid = Some(m.trim().to_string());
        }
        if line.starts_with("a=ice-ufrag:") {
            lines.push(format!("a=ice-ufrag:{ufrag}"));
        } else if line.starts_with("a=ice-pwd:") {
            lines.push(format!("a=ice-pwd:{pwd}"));
        } else if !line.starts_with("a=candidate:") && line != "a=end-of-candidates" {
            lines.push(line.to_string());
        }
    }
    for c in candidates {
        let media = &sections[1..];
        let at = media
            .iter()
            .position(|(mid, _)| mid.is_some() && *mid == c.sdp_mid)
            .map_or(1, |i| i + 1);
        if let Some((_, lines)) = sections.get_mut(at) {
            let attr = c.candidate.trim_start_matches("a=");
            lines.push(format!("a={attr}"));
        }
    }
    let mut out = String::new();
    for line in sections.iter().flat_map(|(_, l)| l) {
        out.push_str(line);
        out.push_str("\r\n");
    }
    out
}

/// 1:1 NAT: the address clients must use instead of the local one in host candidates.
///
/// `webrtc` 0.21 stores `SettingEngine::with_nat_1to1_ips` but never applies it (checked in the
/// 0.21.1 source), so cohost rewrites the candidates it announces itself, both trickled ones and
/// `a=candidate` lines inside SDP. Connectivity checks sent to the public address are forwarded
/// by the NAT to the local socket, which is all ICE needs.
#[derive(Debug, Default)]
pub struct NatMap {
    v4: Option<IpAddr>,
    v6: Option<IpAddr>,
}

impl NatMap {
    pub fn new(public_ips: &[String]) -> Self {
        let ips: Vec<IpAddr> = public_ips.iter().filter_map(|s| s.parse().ok()).collect();
        Self {
            v4: ips.iter().copied().find(IpAddr::is_ipv4),
            v6: ips.iter().copied().find(IpAddr::is_ipv6),
        }
    }

    /// Rewrite one candidate attribute (`candidate:... <ip> <port> typ host ...`).
    pub fn candidate(&self, cand: &str) -> String {
        if self.v4.is_none() && self.v6.is_none() {
            return cand.to_string();
        }
        let mut f: Vec<&str> = cand.split(' ').collect();
        let is_host = f.windows(2).any(|w| w[0] == "typ" && w[1] == "host");
        if f.len() < 8 || !is_host {
            return cand.to_string();
        }
        let public = match f[4].parse::<IpAddr>() {
            Ok(IpAddr::V4(_)) => self.v4,
            Ok(IpAddr::V6(_)) => self.v6,
            Err(_) => None,
        };
        match public {
            Some(ip) => {
                let ip = ip.to_string();
                f[4] = &ip;
                f.join(" ")
            }
            None => cand.to_string(),
        }
    }

    /// Rewrite every `a=candidate:` line of an SDP.
    pub fn sdp(&self, sdp: &str) -> String {
        if self.v4.is_none() && self.v6.is_none() {
            return sdp.to_string();
        }
        sdp.split_inclusive('\n')
            .map(|line| match line.strip_prefix("a=") {
                Some(rest) if rest.starts_with("candidate:") => {
                    let body = rest.trim_end_matches(['\r', '\n']);
                    let tail = &rest[body.len()..];
                    format!("a={}{}", self.candidate(body), tail)
                }
                _ => line.to_string(),
            })
            .collect()
    }
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        match event.candidate.to_json() {
            Ok(init) => {
                let (sdp_mid, sdp_mline_index) = self.tag.get();
                let _ = self.tx.send(PeerEvent::Candidate(Some(IceCandidate {
                    candidate: self.nat.candidate(&init.candidate),
                    sdp_mid,
                    sdp_mline_index,
                    username_fragment: init.username_fragment,
                })));
            }
            Err(e) => debug!("candidate to_json: {e}"),
        }
    }

    /// `webrtc` 0.21 gathers again at every `set_local_description` (each renegotiation):
    /// the candidates are the same and are not reported twice, but the gathering state goes
    /// to `Complete` each time. End of candidates is reported once per ICE generation: a
    /// connection has one until [`Peer::restart_ice_from_remote`] starts the next.
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete && !self.gathered.swap(true, Ordering::AcqRel) {
            let _ = self.tx.send(PeerEvent::Candidate(None));
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let s = match state {
            RTCPeerConnectionState::New | RTCPeerConnectionState::Unspecified => PeerState::New,
            RTCPeerConnectionState::Connecting => PeerState::Connecting,
            RTCPeerConnectionState::Connected => PeerState::Connected,
            RTCPeerConnectionState::Disconnected => PeerState::Disconnected,
            RTCPeerConnectionState::Failed => PeerState::Failed,
            RTCPeerConnectionState::Closed => PeerState::Closed,
            #[allow(unreachable_patterns)]
            _ => PeerState::New,
        };
        self.connected
            .store(s == PeerState::Connected, Ordering::Release);
        let _ = self.tx.send(PeerEvent::State(s));
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let Some(ssrc) = track.ssrcs().await.first().copied() else {
            debug!("remote track without SSRC ignored");
            return;
        };
        let Some(codec) = track.codec(ssrc).await else {
            debug!("remote track {ssrc} without codec ignored");
            return;
        };
        let kind = match track.kind().await {
            RtpCodecKind::Audio => MediaKind::Audio,
            _ => MediaKind::Video,
        };
        // A simulcast track: every layer arrives on this one track; which layers there are
        // (and their order) is in the offer, found by the track's msid or else by its rid.
        let layers = match track.rid(ssrc).await {
            Some(rid) => {
                let track_id = track.track_id().await;
                let sections = self.simulcast.lock().unwrap_or_else(|p| p.into_inner());
                let by_msid = sections
                    .iter()
                    .find(|s| s.track_id.as_deref() == Some(track_id.as_str()));
                let mut by_rid = sections.iter().filter(|s| s.rids.contains(&rid));
                let found = by_msid.or_else(|| match (by_rid.next(), by_rid.next()) {
                    (Some(one), None) => Some(one),
                    _ => None,
                });
                match found {
                    Some(s) => s.rids.clone(),
                    None => {
                        warn!(%rid, "simulcast track not found in the offer: only this layer is used");
                        vec![rid]
                    }
                }
            }
            None => vec![],
        };
        let _ = self.tx.send(PeerEvent::Track(RemoteTrack {
            inner: track,
            ssrc,
            layers,
            ssrc_layers: vec![],
            kind,
            codec: CodecSpec {
                mime_type: codec.mime_type,
                clock_rate: codec.clock_rate,
                channels: codec.channels,
                fmtp: codec.sdp_fmtp_line,
            },
        }));
    }
}

/// The codecs cohost accepts from publishers and offers to subscribers. H.264 constrained
/// baseline with packetization-mode 1 comes first (what the bridge decodes and what Chromium
/// sends by default); VP8 is accepted for browsers that insist on it.
pub fn media_engine() -> Result<MediaEngine, PeerError> {
    let mut me = MediaEngine::default();
    let video_fb = vec![
        RTCPFeedback {
            typ: "goog-remb".into(),
            parameter: String::new(),
        },
        RTCPFeedback {
            typ: "ccm".into(),
            parameter: "fir".into(),
        },
        RTCPFeedback {
            typ: "nack".into(),
            parameter: String::new(),
        },
        RTCPFeedback {
            typ: "nack".into(),
            parameter: "pli".into(),
        },
    ];
    let codec = |mime: &str, clock: u32, ch: u16, fmtp: &str, pt: u8, fb: Vec<RTCPFeedback>| {
        RTCRtpCodecParameters {
            rtp_codec: RTCRtpCodec {
                mime_type: mime.into(),
                clock_rate: clock,
                channels: ch,
                sdp_fmtp_line: fmtp.into(),
                rtcp_feedback: fb,
            },
            payload_type: pt,
        }
    };
    me.register_codec(
        codec(
            MIME_TYPE_OPUS,
            48000,
            2,
            "minptime=10;useinbandfec=1",
            111,
            vec![],
        ),
        RtpCodecKind::Audio,
    )
    .map_err(werr)?;
    let rtx = |pt: u8, apt: u8| codec("video/rtx", 90000, 0, &format!("apt={apt}"), pt, vec![]);
    for c in [
        codec(
            MIME_TYPE_H264,
            90000,
            0,
            "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f",
            125,
            video_fb.clone(),
        ),
        rtx(105, 125),
        codec(
            MIME_TYPE_H264,
            90000,
            0,
            "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f",
            102,
            video_fb.clone(),
        ),
        rtx(103, 102),
        codec(MIME_TYPE_VP8, 90000, 0, "", 96, video_fb.clone()),
        rtx(97, 96),
    ] {
        me.register_codec(c, RtpCodecKind::Video).map_err(werr)?;
    }
    Ok(me)
}

/// Interceptors: NACK generator + responder (retransmission both ways), RTCP reports, TWCC,
/// then keyframe-request delivery to the application. This is `rtc`'s default set
/// (`register_default_interceptors`) with the NACK generator tuned: the default asks every
/// 100 ms, and without limit, for every missing packet, so a retransmission came too late for
/// a receiver's reordering buffer, and a packet the sender no longer had was asked for again
/// and again until it left the 512-packet log. The codecs above carry the `nack` feedback.
pub fn interceptors(me: &mut MediaEngine) -> Result<Registry, PeerError> {
    interceptors_counting(me, &ConnectionFeedback::default(), false)
}

/// [`interceptors`] sharing `feedback` with the caller: the RTCP counter's per-stream counts,
/// the NACK floors of its local streams ([`nack_floor`]) and, with `estimate`, the bandwidth
/// estimate ([`bwe`]).
pub fn interceptors_counting(
    me: &mut MediaEngine,
    feedback: &ConnectionFeedback,
    estimate: bool,
) -> Result<Registry, PeerError> {
    let reg = Registry::new()
        .with(Slot::NackResponder, NackResponderBuilder::new().build())
        .with(
            Slot::NackGenerator,
            NackGeneratorBuilder::new()
                .with_interval(NACK_INTERVAL)
                .with_max_nacks_per_packet(NACK_MAX_PER_PACKET)
                .build(),
        );
    configure_simulcast_extension_headers(me).map_err(werr)?;
    let reg = configure_twcc_receiver_only(reg, me).map_err(werr)?;
    // The send-side estimate of what the remote's downlink carries (`bwe`): number what
    // leaves, ingest the transport-wide feedback. No pacer (see `bwe`).
    let reg = if estimate {
        reg.with(Slot::TwccSender, TwccSenderBuilder::new().build())
            .with(
                Slot::CongestionControl,
                CongestionControlBuilder::new(bwe::Estimator::new(feedback.estimate.clone()))
                    .build(),
            )
    } else {
        reg
    };
    let reg = configure_rtcp_reports(reg);
    Ok(reg
        .with(
            Slot::from(keyframe_interceptor::COUNTER_SLOT),
            RtcpCounter::new(feedback.clone()),
        )
        .with(
            Slot::from(nack_floor::SLOT),
            nack_floor::NackFloor::new(feedback.floors.clone()),
        )
        .with(
            Slot::from(keyframe_interceptor::SLOT),
            keyframe_interceptor::KeyframeRequestInterceptor::default(),
        ))
}

/// Connectivity checks per candidate pair: a fast check interval must not also shorten how long
/// a pair is tried (the crate's default is 7 requests), or a briefly loaded machine fails ICE.
/// Keep trying for about 5 seconds whatever the interval.
pub fn binding_requests(check_interval: Duration) -> u16 {
    let ms = check_interval.as_millis().max(1);
    (5000 / ms).clamp(7, 500) as u16
}

/// Builds peer connections; owns the UDP port pool.
pub struct PeerFactory {
    cfg: WebrtcConfig,
    runtime: Option<Arc<dyn webrtc::runtime::Runtime>>,
    nat: Arc<NatMap>,
    ports: Arc<PortPool>,
    /// Live peer connections (for metrics and leak checks).
    pub live: Arc<AtomicU64>,
}

impl PeerFactory {
    pub fn new(cfg: WebrtcConfig) -> Self {
        let ports = Arc::new(
            PortPool::new(cfg.udp_port_min, cfg.udp_port_max)
                .with_reserve(cfg.publisher_port_reserve)
                .probing(cfg.bind_ip),
        );
        Self {
            runtime: runtime::BufferedRuntime::shared(cfg.socket_buffer_bytes),
            nat: Arc::new(NatMap::new(&cfg.public_ips)),
            cfg,
            ports,
            live: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn ports(&self) -> &Arc<PortPool> {
        &self.ports
    }

    /// Create a peer connection bound to one port of the configured range (a publisher's:
    /// it may take any free port, the reserve included).
    pub async fn create(&self) -> Result<(Peer, mpsc::UnboundedReceiver<PeerEvent>), PeerError> {
        self.create_for(PortUse::Publisher).await
    }

    /// Create a peer connection for `use_`: a viewer's is refused with
    /// [`PeerError::PortsReserved`] when only the publishers' reserve is left.
    pub async fn create_for(
        &self,
        use_: PortUse,
    ) -> Result<(Peer, mpsc::UnboundedReceiver<PeerEvent>), PeerError> {
        let (tx, rx) = mpsc::unbounded_channel();
        // Try a handful of ports: another process may hold some of the range.
        let attempts = 16.min(self.ports.capacity());
        let mut last_err = PeerError::NoPort(self.cfg.udp_port_min, self.cfg.udp_port_max);
        for _ in 0..attempts {
            let lease = match self.ports.lease_for(use_) {
                Ok(l) => l,
                Err(ports::NoLease::Reserved) => {
                    return Err(PeerError::PortsReserved(self.ports.reserve()));
                }
                Err(ports::NoLease::Exhausted) => break,
            };
            let connected = Arc::new(AtomicBool::new(false));
            let feedback = ConnectionFeedback::default();
            let tag = Arc::new(BundleTag::default());
            let gathered = Arc::new(AtomicBool::new(false));
            let simulcast: Arc<std::sync::Mutex<Vec<SimulcastSection>>> = Default::default();
            match self
                .build(
                    lease.port(),
                    tx.clone(),
                    connected.clone(),
                    &feedback,
                    (tag.clone(), gathered.clone(), simulcast.clone()),
                )
                .await
            {
                Ok(pc) => {
                    self.live.fetch_add(1, Ordering::Relaxed);
                    return Ok((
                        Peer {
                            pc: Arc::new(pc),
                            _lease: lease,
                            live: self.live.clone(),
                            connected,
                            nat: self.nat.clone(),
                            feedback,
                            tag,
                            gathered,
                            simulcast,
                        },
                        rx,
                    ));
                }
                Err(e) => {
                    debug!(port = lease.port(), "peer build failed: {e}");
                    last_err = e;
                }
            }
        }
        Err(last_err)
    }

    async fn build(
        &self,
        port: u16,
        tx: mpsc::UnboundedSender<PeerEvent>,
        connected: Arc<AtomicBool>,
        feedback: &ConnectionFeedback,
        (tag, gathered, simulcast): (
            Arc<BundleTag>,
            Arc<AtomicBool>,
            Arc<std::sync::Mutex<Vec<SimulcastSection>>>,
        ),
    ) -> Result<impl PeerConnection + use<>, PeerError> {
        let mut me = media_engine()?;
        let registry = interceptors_counting(&mut me, feedback, self.cfg.bandwidth_estimate)?;
        let se = SettingEngineBuilder::new()
            .with_ice_timeouts(
                Some(self.cfg.ice_disconnected_timeout),
                Some(self.cfg.ice_failed_timeout),
                Some(Duration::from_secs(1)),
            )
            .with_ice_connection_attempts(
                Some(self.cfg.ice_check_interval),
                Some(binding_requests(self.cfg.ice_check_interval)),
            )
            .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
            .with_include_loopback_candidate(self.cfg.bind_ip.is_loopback())
            // The ICE agent waits before accepting a peer-reflexive pair (1 s by default) or a
            // server-reflexive one (500 ms), hoping for a better one. With trickle ICE the
            // server usually learns a client's address from its first check (prflx) before the
            // candidate arrives over signaling, so the wait only delays media by a second;
            // the server has nothing better to wait for.
            .with_prflx_acceptance_min_wait(Some(Duration::ZERO))
            .with_srflx_acceptance_min_wait(Some(Duration::ZERO));
        // The configured STUN/TURN servers are for clients behind NAT (handed out in the join
        // response). The server itself announces its bind IP or `public_ips` and needs neither,
        // and asking a STUN server from every connection would only add gathering time.
        let config = RTCConfigurationBuilder::new().build();
        let addr = SocketAddr::new(self.cfg.bind_ip, port);
        let tcp: Vec<SocketAddr> = if self.cfg.ice_tcp { vec![addr] } else { vec![] };
        let mut builder = PeerConnectionBuilder::new();
        if let Some(rt) = &self.runtime {
            builder = builder.with_runtime(rt.clone());
        }
        builder
            .with_configuration(config)
            .with_media_engine(me)
            .with_setting_engine(se.build())
            .with_interceptor_registry(registry)
            .with_handler(Arc::new(Handler {
                tx,
                simulcast,
                connected,
                nat: self.nat.clone(),
                tag,
                gathered,
            }) as Arc<dyn PeerConnectionEventHandler>)
            .with_udp_addrs(vec![addr])
            .with_tcp_addrs(tcp)
            .build()
            .await
            .map_err(werr)
    }

    pub fn bind_ip(&self) -> IpAddr {
        self.cfg.bind_ip
    }
}

/// One peer connection. Closing is explicit (`close`); dropping releases the port.
pub struct Peer {
    pc: Arc<dyn PeerConnection>,
    _lease: ports::PortLease,
    live: Arc<AtomicU64>,
    connected: Arc<AtomicBool>,
    nat: Arc<NatMap>,
    /// RTCP feedback per stream: sent about the streams it receives, received about the
    /// streams it sends.
    feedback: ConnectionFeedback,
    /// The mid and index our candidates name (shared with the event handler).
    tag: Arc<BundleTag>,
    /// End of candidates of the current ICE generation was reported (shared with the handler).
    gathered: Arc<AtomicBool>,
    /// Simulcast m-sections of the client's latest offer (shared with the handler).
    simulcast: Arc<std::sync::Mutex<Vec<SimulcastSection>>>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Peer {
    /// Apply a client offer and return our answer (publisher connection).
    pub async fn answer(&self, offer_sdp: String) -> Result<String, PeerError> {
        // A client's ICE restart (new credentials): the new generation's end of candidates
        // is reported again.
        if let Some(current) = self.pc.remote_description().await
            && ice_ufrag(&current.sdp) != ice_ufrag(&offer_sdp)
        {
            self.gathered.store(false, Ordering::Release);
        }
        self.apply_offer(offer_sdp).await?;
        self.create_answer().await
    }

    /// Apply a client offer without answering yet: tracks added now attach to the offer's
    /// transceivers of their kind (how a WHEP viewer's recvonly offer gets our tracks).
    pub async fn apply_offer(&self, offer_sdp: String) -> Result<(), PeerError> {
        let sections = simulcast_sections(&offer_sdp).map_err(PeerError::BadSdp)?;
        *self.simulcast.lock().unwrap_or_else(|p| p.into_inner()) = sections;
        let offer = RTCSessionDescription::offer(offer_sdp)
            .map_err(|e| PeerError::BadSdp(e.to_string()))?;
        self.pc
            .set_remote_description(offer)
            .await
            .map_err(|e| PeerError::BadSdp(e.to_string()))
    }

    /// Create and apply the answer to the offer applied with [`Peer::apply_offer`].
    pub async fn create_answer(&self) -> Result<String, PeerError> {
        let answer = self.pc.create_answer(None).await.map_err(werr)?;
        let sdp = self.nat.sdp(&with_msid_semantic(&answer.sdp));
        self.tag.set_from(&answer.sdp);
        self.pc.set_local_description(answer).await.map_err(werr)?;
        Ok(sdp)
    }

    /// The local description with every candidate gathered so far (`a=candidate` lines), for
    /// clients that do not trickle (WHIP/WHEP): call it once gathering is complete.
    pub async fn local_sdp(&self) -> Option<String> {
        self.pc
            .local_description()
            .await
            .map(|d| self.nat.sdp(&with_msid_semantic(&d.sdp)))
    }

    /// Restart ICE at the client's request when the client cannot send a whole new offer: a
    /// WHIP/WHEP client PATCHes only its new ICE credentials and candidates (RFC 9725 §4.3.2).
    /// `webrtc` 0.21 has no call for an answerer's restart: it restarts by itself when a
    /// remote *offer* carries credentials other than the current remote description's (its
    /// `will_restart_ice`, mirroring the core's `set_remote_description`). So the client's last
    /// offer is applied again with the new credentials and candidates in place of the old
    /// ones, and answered: the answer carries our new credentials. Tracks, transceivers and
    /// DTLS stay as they are; only the ICE generation changes.
    ///
    /// Returns the answer; the caller waits for `PeerEvent::Candidate(None)` (reported again
    /// for the new generation) before reading our candidates from [`Peer::local_sdp`].
    pub async fn restart_ice_from_remote(
        &self,
        ufrag: &str,
        pwd: &str,
        candidates: &[IceCandidate],
    ) -> Result<String, PeerError> {
        let current = self
            .pc
            .remote_description()
            .await
            .ok_or_else(|| PeerError::Webrtc("no remote description to restart".into()))?;
        let offer = with_ice_credentials(&current.sdp, ufrag, pwd, candidates);
        self.apply_offer(offer).await?;
        // A new generation gathers again (the crate keeps its host candidates, so at once) and
        // its end of candidates must be reported again.
        self.gathered.store(false, Ordering::Release);
        self.create_answer().await
    }

    /// Create and apply an offer (subscriber connection); with `ice_restart`, new ICE
    /// credentials (the client's network changed).
    pub async fn offer(&self, ice_restart: bool) -> Result<String, PeerError> {
        let opts = ice_restart.then_some(RTCOfferOptions { ice_restart: true });
        if ice_restart {
            // A new ICE generation: its end of candidates is reported again.
            self.gathered.store(false, Ordering::Release);
        }
        let offer = self.pc.create_offer(opts).await.map_err(werr)?;
        let sdp = self.nat.sdp(&with_msid_semantic(&offer.sdp));
        self.tag.set_from(&offer.sdp);
        self.pc.set_local_description(offer).await.map_err(werr)?;
        Ok(sdp)
    }

    /// End of candidates in the browser's shape: an empty candidate naming the same m-section
    /// as our candidates (see [`BundleTag`]).
    pub fn end_of_candidates(&self) -> IceCandidate {
        let (sdp_mid, sdp_mline_index) = self.tag.get();
        IceCandidate {
            candidate: String::new(),
            sdp_mid,
            sdp_mline_index,
            username_fragment: None,
        }
    }

    /// Apply the client's answer to our offer.
    pub async fn accept_answer(&self, sdp: String) -> Result<(), PeerError> {
        let answer =
            RTCSessionDescription::answer(sdp).map_err(|e| PeerError::BadSdp(e.to_string()))?;
        self.pc
            .set_remote_description(answer)
            .await
            .map_err(|e| PeerError::BadSdp(e.to_string()))
    }

    pub async fn add_candidate(&self, c: IceCandidate) -> Result<(), PeerError> {
        if c.candidate.is_empty() {
            // End of candidates: nothing to do for a full-ICE agent that keeps checking.
            return Ok(());
        }
        self.pc
            .add_ice_candidate(RTCIceCandidateInit {
                candidate: c.candidate,
                sdp_mid: c.sdp_mid,
                sdp_mline_index: c.sdp_mline_index,
                username_fragment: c.username_fragment,
                ..Default::default()
            })
            .await
            .map_err(|e| PeerError::BadSdp(e.to_string()))
    }

    /// Add an outgoing track carrying `codec`; `stream_id` groups tracks of one participant.
    pub async fn add_local_track(
        &self,
        stream_id: &str,
        track_id: &str,
        kind: MediaKind,
        codec: &CodecSpec,
    ) -> Result<LocalTrack, PeerError> {
        let ssrc: u32 = rand::random::<u32>() | 1;
        let rtp_kind = match kind {
            MediaKind::Audio => RtpCodecKind::Audio,
            MediaKind::Video => RtpCodecKind::Video,
        };
        let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
            stream_id.to_string(),
            track_id.to_string(),
            track_id.to_string(),
            rtp_kind,
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    ssrc: Some(ssrc),
                    ..Default::default()
                },
                codec: RTCRtpCodec {
                    mime_type: codec.mime_type.clone(),
                    clock_rate: codec.clock_rate,
                    channels: codec.channels,
                    sdp_fmtp_line: codec.fmtp.clone(),
                    rtcp_feedback: vec![],
                },
                ..Default::default()
            }],
        )));
        let sender = self
            .pc
            .add_track(track.clone() as Arc<dyn TrackLocal>)
            .await
            .map_err(werr)?;
        // The server only sends on these connections. `add_track` makes a new transceiver
        // `sendrecv` (a reused one, whose track was removed and which is `inactive` from then
        // on, comes back `sendonly` by itself); say `sendonly`, so the offer does not invite the
        // client to send, and `remove_track` leaves an `inactive` m-section, not a `recvonly`.
        let id = RTCRtpTransceiverId::from(sender.id());
        for t in self.pc.get_transceivers().await {
            if t.id() == id {
                t.set_direction(RTCRtpTransceiverDirection::Sendonly)
                    .await
                    .map_err(werr)?;
            }
        }
        Ok(LocalTrack {
            track,
            sender,
            connected: self.connected.clone(),
            ssrc,
            codec: codec.clone(),
            pt: AtomicU8::new(0),
            written: AtomicU64::new(0),
            reception: self.feedback.received.clone(),
            floors: self.feedback.floors.clone(),
            estimate: self.feedback.estimate.clone(),
        })
    }

    pub async fn remove_local_track(&self, t: &LocalTrack) -> Result<(), PeerError> {
        self.pc.remove_track(&t.sender).await.map_err(werr)
    }

    /// Transport and stream statistics (what the REST room stats show).
    pub async fn stats(&self) -> PeerStats {
        use webrtc::peer_connection::{RTCStatsReportEntry, StatsSelector};
        let report = self
            .pc
            .get_stats(std::time::Instant::now(), StatsSelector::None)
            .await;
        let mut out = PeerStats {
            estimate_bps: match self.feedback.estimate.estimate_bps.load(Ordering::Relaxed) {
                0 => None,
                b => Some(b),
            },
            ..Default::default()
        };
        for e in report.iter() {
            match e {
                RTCStatsReportEntry::IceCandidatePair(p) if p.nominated => {
                    out.rtt_ms = Some(p.current_round_trip_time * 1000.0);
                }
                RTCStatsReportEntry::InboundRtp(s) => {
                    let r = &s.received_rtp_stream_stats;
                    let ssrc = r.rtp_stream_stats.ssrc;
                    out.inbound.push(InboundStat {
                        ssrc,
                        packets_received: r.packets_received,
                        packets_lost: r.packets_lost.max(0) as u64,
                        jitter_ms: r.jitter * 1000.0,
                        feedback_sent: self.feedback.sent.get(ssrc).unwrap_or_default(),
                    });
                }
                RTCStatsReportEntry::RemoteInboundRtp(s) => {
                    let ssrc = s.received_rtp_stream_stats.rtp_stream_stats.ssrc;
                    out.remote_inbound.push(RemoteInboundStat {
                        ssrc,
                        fraction_lost: s.fraction_lost,
                        rtt_ms: s.round_trip_time * 1000.0,
                        feedback_received: self.feedback.received.get(ssrc).unwrap_or_default(),
                    });
                }
                _ => {}
            }
        }
        out
    }

    pub async fn close(&self) {
        if let Err(e) = self.pc.close().await {
            debug!("peer close: {e}");
        }
    }
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PeerStats {
    /// Round-trip time of the selected ICE candidate pair.
    pub rtt_ms: Option<f64>,
    /// Streams we receive (publisher connection).
    pub inbound: Vec<InboundStat>,
    /// How the client receives what we send (subscriber connection, from its receiver reports).
    pub remote_inbound: Vec<RemoteInboundStat>,
    /// Subscriber connection: what its downlink carries, bit/s, as GCC estimates it from the
    /// client's transport-wide congestion feedback (`bwe`); absent before the first feedback.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimate_bps: Option<u64>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct InboundStat {
    pub ssrc: u32,
    pub packets_received: u64,
    pub packets_lost: u64,
    pub jitter_ms: f64,
    /// NACKs (and the packets they asked for), PLIs and FIRs we sent about this stream.
    pub feedback_sent: FeedbackCounts,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RemoteInboundStat {
    pub ssrc: u32,
    pub fraction_lost: f64,
    pub rtt_ms: f64,
    /// NACKs (and the packets they asked for), PLIs and FIRs the client sent about it.
    pub feedback_received: FeedbackCounts,
}

/// What a published track delivers. The `u8` is the simulcast layer (index into
/// [`RemoteTrack::layers`]; always 0 for a plain track).
#[derive(Debug)]
pub enum Inbound {
    Rtp(Packet, u8),
    SenderReport(SenderReport, u8),
}

/// A track a client publishes to us.
pub struct RemoteTrack {
    inner: Arc<dyn TrackRemote>,
    /// The SSRC of the first packet (of a simulcast track: of the first layer to arrive).
    pub ssrc: u32,
    /// Simulcast: the rids of its layers, low → high (the order of the offer's
    /// `a=simulcast`); empty for a plain track.
    pub layers: Vec<String>,
    /// Which layer each SSRC seen so far carries (a handful: one per layer).
    ssrc_layers: Vec<(u32, u8)>,
    pub kind: MediaKind,
    pub codec: CodecSpec,
}

/// The simulcast description of one m-section of an offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimulcastSection {
    /// The track id of its `a=msid`, if any.
    pub track_id: Option<String>,
    /// The rids the client sends, in `a=simulcast:send` order (low → high by cohost's rule).
    pub rids: Vec<String>,
}

/// The longest rid accepted (RFC 8851 sets no limit; browsers use 1-3 characters).
const MAX_RID_LEN: usize = 32;

/// The send-simulcast m-sections of an offer. Each `a=simulcast:send` list names the layers;
/// alternatives (`a,b`) count by their first rid and a paused rid (`~a`) is still a layer.
/// Refused: more than [`crate::sfu::MAX_LAYERS`] layers, a rid that is not 1-32 characters
/// of `A-Za-z0-9-_`, or one rid twice, so the layer list is always small and printable.
pub fn simulcast_sections(sdp: &str) -> Result<Vec<SimulcastSection>, String> {
    let mut out = vec![];
    let mut cur: Option<SimulcastSection> = None;
    let mut flush = |cur: &mut Option<SimulcastSection>| {
        if let Some(s) = cur.take()
            && !s.rids.is_empty()
        {
            out.push(s);
        }
    };
    for line in sdp.lines().map(str::trim_end) {
        if line.starts_with("m=") {
            flush(&mut cur);
            cur = Some(SimulcastSection {
                track_id: None,
                rids: vec![],
            });
            continue;
        }
        let Some(sec) = cur.as_mut() else { continue };
        if let Some(msid) = line.strip_prefix("a=msid:") {
            sec.track_id = msid.split_whitespace().nth(1).map(str::to_string);
        } else if let Some(sc) = line.strip_prefix("a=simulcast:") {
            let mut words = sc.split_whitespace();
            while let Some(dir) = words.next() {
                let list = words.next().unwrap_or("");
                if dir != "send" {
                    continue;
                }
                for alt in list.split(';') {
                    let rid = alt.split(',').next().unwrap_or("").trim_start_matches('~');
                    let valid = !rid.is_empty()
                        && rid.len() <= MAX_RID_LEN
                        && rid
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                    if !valid {
                        return Err(format!("invalid simulcast rid {rid:?}"));
                    }
                    if sec.rids.iter().any(|r| r == rid) {
                        return Err(format!("simulcast rid {rid:?} listed twice"));
                    }
                    sec.rids.push(rid.to_string());
                }
                if sec.rids.len() > crate::sfu::MAX_LAYERS {
                    return Err(format!(
                        "at most {} simulcast layers per track",
                        crate::sfu::MAX_LAYERS
                    ));
                }
            }
        }
    }
    flush(&mut cur);
    Ok(out)
}

/// Handle used to ask the publisher for keyframes while another task reads packets.
#[derive(Clone)]
pub struct KeyframeRequester {
    inner: Arc<dyn TrackRemote>,
    ssrc: u32,
}

impl KeyframeRequester {
    pub async fn send_pli(&self) -> Result<(), PeerError> {
        self.send_pli_to(self.ssrc).await
    }

    /// A PLI for another SSRC of the same track (a simulcast layer).
    pub async fn send_pli_to(&self, ssrc: u32) -> Result<(), PeerError> {
        self.inner
            .write_rtcp(vec![Box::new(PictureLossIndication {
                sender_ssrc: 0,
                media_ssrc: ssrc,
            })])
            .await
            .map_err(werr)
    }
}

impl RemoteTrack {
    /// Next RTP packet or sender report, with its layer; `None` when the track ended. Packets
    /// of a simulcast track from an SSRC no layer claims (yet) are skipped.
    pub async fn recv(&mut self) -> Option<Inbound> {
        loop {
            match self.inner.poll().await? {
                TrackRemoteEvent::OnRtpPacket(p) => match self.layer_of(p.header.ssrc).await {
                    Some(l) => return Some(Inbound::Rtp(p, l)),
                    None => continue,
                },
                TrackRemoteEvent::OnRtcpPacket(packets) => {
                    let sr = packets.iter().find_map(|p| {
                        p.as_any()
                            .downcast_ref::<rtc::rtcp::sender_report::SenderReport>()
                    });
                    if let Some(sr) = sr
                        && let Some(l) = self.layer_of(sr.ssrc).await
                    {
                        return Some(Inbound::SenderReport(
                            SenderReport {
                                ntp_time: sr.ntp_time,
                                rtp_time: sr.rtp_time,
                            },
                            l,
                        ));
                    }
                }
                // A simulcast layer's first packet: its SSRC and rid.
                TrackRemoteEvent::OnOpen(init) => {
                    if let Some(rid) = init.rid.as_deref() {
                        self.learn(init.ssrc, rid);
                    }
                }
                TrackRemoteEvent::OnEnded | TrackRemoteEvent::OnError => return None,
                _ => continue,
            }
        }
    }

    /// The layer `ssrc` carries: 0 on a plain track; on a simulcast track the layer of its rid
    /// (learned from the layer's open event, or asked of the track), `None` if unknown.
    async fn layer_of(&mut self, ssrc: u32) -> Option<u8> {
        if self.layers.is_empty() {
            return Some(0);
        }
        if let Some(&(_, l)) = self.ssrc_layers.iter().find(|(s, _)| *s == ssrc) {
            return Some(l);
        }
        let rid = self.inner.rid(ssrc).await?;
        self.learn(ssrc, &rid)
    }

    fn learn(&mut self, ssrc: u32, rid: &str) -> Option<u8> {
        let l = u8::try_from(self.layers.iter().position(|r| r == rid)?).ok()?;
        // A layer whose SSRC changed (the publisher restarted it) replaces its old entry, so
        // the list stays one entry per layer.
        self.ssrc_layers.retain(|&(s, old)| old != l && s != ssrc);
        self.ssrc_layers.push((ssrc, l));
        Some(l)
    }

    pub fn keyframe_requester(&self) -> KeyframeRequester {
        KeyframeRequester {
            inner: self.inner.clone(),
            ssrc: self.ssrc,
        }
    }
}

/// A track we send to a client, fed with packets forwarded from another participant.
pub struct LocalTrack {
    track: Arc<TrackLocalStaticRTP>,
    sender: Arc<dyn RtpSender>,
    /// The connection's DTLS/SRTP is up; before that packets could not be protected and are
    /// dropped here instead of failing deeper down (and logging) once per packet.
    connected: Arc<AtomicBool>,
    ssrc: u32,
    codec: CodecSpec,
    /// Negotiated payload type on this leg; 0 until known.
    pt: AtomicU8,
    pub written: AtomicU64,
    /// The connection's feedback per stream we send: this track's receiver reports.
    reception: keyframe_interceptor::FeedbackBySsrc,
    /// Where this stream's current simulcast layer started, for [`nack_floor`].
    floors: nack_floor::NackFloors,
    /// The connection's bandwidth estimate ([`bwe`]; only with `webrtc.bandwidth_estimate`).
    estimate: bwe::Signals,
}

/// Feedback a subscriber sent about a local track.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feedback {
    KeyframeRequest,
}

fn fmtp_param<'a>(fmtp: &'a str, key: &str) -> Option<&'a str> {
    fmtp.split(';')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v)
}

impl LocalTrack {
    pub fn ssrc(&self) -> u32 {
        self.ssrc
    }

    /// The stream switched simulcast layers at output number `seq`: the subscriber's
    /// retransmission requests for the old layer's packets are dropped from now on
    /// ([`nack_floor`]).
    pub fn set_nack_floor(&self, seq: u16) {
        self.floors.set(self.ssrc, seq, Instant::now());
    }

    /// The connection's delay signal says its path is queueing now: more is sent to the
    /// subscriber than its downlink carries ([`bwe`]; never with `webrtc.bandwidth_estimate`
    /// off, or before the client's first transport-wide feedback).
    pub fn downlink_overused(&self) -> bool {
        self.estimate.overusing_now()
    }

    /// Episodes of [`downlink_overused`](Self::downlink_overused) on the connection so far
    /// (one shorter than the caller's look is still counted here).
    pub fn downlink_overuses(&self) -> u64 {
        self.estimate.overuses.load(Ordering::Relaxed)
    }

    /// What the subscriber reported about this track so far (receiver reports, loss).
    pub fn reception(&self) -> FeedbackCounts {
        self.reception.get(self.ssrc).unwrap_or_default()
    }

    /// Find the payload type negotiated for our codec on this sender. H.264 variants differ in
    /// packetization mode and profile, so those must match too, not just the MIME type.
    async fn resolve_pt(&self) -> Option<u8> {
        let params = self.sender.get_parameters().await.ok()?;
        let codecs = &params.rtp_parameters.codecs;
        let same_mime = |c: &&RTCRtpCodecParameters| {
            c.rtp_codec
                .mime_type
                .eq_ignore_ascii_case(&self.codec.mime_type)
        };
        let exact = codecs.iter().filter(same_mime).find(|c| {
            !self.codec.mime_type.eq_ignore_ascii_case(MIME_TYPE_H264)
                || (fmtp_param(&c.rtp_codec.sdp_fmtp_line, "packetization-mode")
                    == fmtp_param(&self.codec.fmtp, "packetization-mode")
                    && fmtp_param(&c.rtp_codec.sdp_fmtp_line, "profile-level-id")
                        .map(|p| p.get(..4).unwrap_or(p).to_ascii_lowercase())
                        == fmtp_param(&self.codec.fmtp, "profile-level-id")
                            .map(|p| p.get(..4).unwrap_or(p).to_ascii_lowercase()))
        });
        exact
            .or_else(|| codecs.iter().find(same_mime))
            .map(|c| c.payload_type)
    }

    /// Rewrite the header for this leg (SSRC, payload type; publisher extensions are dropped
    /// because their ids were negotiated on another connection) and send.
    pub async fn write(&self, mut pkt: Packet) -> Result<(), PeerError> {
        if !self.connected.load(Ordering::Acquire) {
            return Err(PeerError::Webrtc("not connected yet".into()));
        }
        let mut pt = self.pt.load(Ordering::Relaxed);
        if pt == 0 {
            match self.resolve_pt().await {
                Some(p) => {
                    self.pt.store(p, Ordering::Relaxed);
                    pt = p;
                }
                None => return Err(PeerError::Webrtc("payload type not negotiated yet".into())),
            }
        }
        pkt.header.ssrc = self.ssrc;
        pkt.header.payload_type = pt;
        pkt.header.extension = false;
        pkt.header.extensions.clear();
        pkt.header.extension_profile = 0;
        // The publisher's padding count goes too: left over, the transport-wide sequence
        // number stamped on the way out makes the header's size and what is written disagree,
        // and SRTP drops the packet.
        pkt.header.extensions_padding = 0;
        self.track.write_rtp(pkt).await.map_err(werr)?;
        self.written.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Next feedback from the subscriber; `None` when the track is unbound.
    pub async fn feedback(&self) -> Option<Feedback> {
        loop {
            match self.track.poll().await? {
                TrackLocalEvent::OnRtcpPacket(_) => return Some(Feedback::KeyframeRequest),
                #[allow(unreachable_patterns)]
                _ => continue,
            }
        }
    }
}

/// SSRCs the offerer is sending on, from the `a=ssrc` lines of its send-capable m-sections
/// (`sendrecv`/`sendonly`, port not 0). `None` when the SDP signals no SSRCs at all, in which
/// case the caller cannot tell which tracks stopped.
///
/// `webrtc` 0.21 does not end a remote track when the offerer stops sending on its transceiver
/// (checked: no `OnEnded` arrives), so the publisher's own re-offers are read to unpublish
/// tracks it removed.
pub fn sending_ssrcs(sdp: &str) -> Option<std::collections::HashSet<u32>> {
    let mut out = std::collections::HashSet::new();
    let mut any_ssrc = false;
    let mut sections: Vec<(bool, Vec<u32>)> = vec![];
    for line in sdp.lines() {
        let line = line.trim_end();
        if let Some(m) = line.strip_prefix("m=") {
            let port_zero = m.split_whitespace().nth(1) == Some("0");
            sections.push((!port_zero, vec![]));
        } else if let Some((sending, ssrcs)) = sections.last_mut() {
            match line {
                "a=recvonly" | "a=inactive" => *sending = false,
                _ => {
                    if let Some(rest) = line.strip_prefix("a=ssrc:")
                        && let Some(n) = rest.split_whitespace().next().and_then(|n| n.parse().ok())
                    {
                        any_ssrc = true;
                        ssrcs.push(n);
                    }
                }
            }
        }
    }
    for (sending, ssrcs) in sections {
        if sending {
            out.extend(ssrcs);
        }
    }
    any_ssrc.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sending_ssrcs_skips_stopped_sections() {
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=sendrecv\r\na=ssrc:11 cname:x\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=recvonly\r\na=ssrc:22 cname:x\r\n\
                   m=video 0 UDP/TLS/RTP/SAVPF 96\r\na=sendrecv\r\na=ssrc:33 cname:x\r\n";
        let s = sending_ssrcs(sdp).unwrap();
        assert!(s.contains(&11) && !s.contains(&22) && !s.contains(&33));
        assert!(sending_ssrcs("v=0\r\nm=audio 9 X 111\r\n").is_none());
    }

    #[test]
    fn simulcast_sections_are_read_and_checked() {
        let sdp = "v=0\r\nm=audio 9 X 111\r\na=msid:s a1\r\n\
                   m=video 9 X 96\r\na=msid:s cam\r\na=rid:q send\r\na=rid:h send\r\n\
                   a=rid:f send\r\na=simulcast:send q;~h;f,f2 recv x\r\n\
                   m=video 9 X 96\r\na=msid:s plain\r\n";
        assert_eq!(
            simulcast_sections(sdp).unwrap(),
            vec![SimulcastSection {
                track_id: Some("cam".into()),
                rids: vec!["q".into(), "h".into(), "f".into()],
            }]
        );
        let with = |sc: &str| simulcast_sections(&format!("v=0\r\nm=video 9 X 96\r\n{sc}\r\n"));
        assert!(with("a=simulcast:send a;b;c;d;e").is_err(), "5 layers");
        assert!(with("a=simulcast:send a;a").is_err(), "twice");
        assert!(with("a=simulcast:send a;b\"c").is_err(), "bad character");
        assert!(with(&format!("a=simulcast:send a;{}", "x".repeat(33))).is_err());
        assert!(with("a=simulcast:send ;").is_err(), "empty rid");
        assert_eq!(with("a=simulcast:recv a;b").unwrap(), vec![]);
        assert_eq!(with("a=simulcast:send a;b").unwrap()[0].track_id, None);
    }

    #[test]
    fn nat_map_rewrites_host_candidates_only() {
        let n = NatMap::new(&["203.0.113.9".into()]);
        assert_eq!(
            n.candidate("candidate:1 1 udp 2130706431 10.0.0.5 50000 typ host"),
            "candidate:1 1 udp 2130706431 203.0.113.9 50000 typ host"
        );
        let relay = "candidate:2 1 udp 1 10.0.0.5 50000 typ relay raddr 0.0.0.0 rport 0";
        assert_eq!(n.candidate(relay), relay);
        let sdp = "v=0\r\na=candidate:1 1 udp 2130706431 10.0.0.5 50000 typ host\r\na=end-of-candidates\r\n";
        assert_eq!(
            n.sdp(sdp),
            "v=0\r\na=candidate:1 1 udp 2130706431 203.0.113.9 50000 typ host\r\na=end-of-candidates\r\n"
        );
        assert_eq!(NatMap::new(&[]).candidate("candidate:x"), "candidate:x");
    }

    #[test]
    fn bundle_tag_is_the_first_bundled_mid() {
        let sdp = "v=0\r\na=group:BUNDLE 1 2\r\nm=audio 0 X 111\r\na=mid:0\r\n\
                   m=audio 9 X 111\r\na=mid:1\r\nm=video 9 X 96\r\na=mid:2\r\n";
        assert_eq!(bundle_tag(sdp), Some(("1".into(), 1)));
        let unbundled = "v=0\r\nm=audio 9 X 111\r\na=mid:a\r\nm=video 9 X 96\r\na=mid:v\r\n";
        assert_eq!(bundle_tag(unbundled), Some(("a".into(), 0)));
        assert_eq!(bundle_tag("v=0\r\nm=audio 9 X 111\r\n"), None);
        assert_eq!(
            bundle_tag("v=0\r\na=group:BUNDLE x\r\nm=audio 9 X 1\r\na=mid:0\r\n"),
            None
        );
    }

    #[test]
    fn msid_semantic_is_added_once_at_session_level() {
        let sdp = "v=0\r\nt=0 0\r\na=group:BUNDLE 0\r\nm=audio 9 X 111\r\na=mid:0\r\n";
        let with = with_msid_semantic(sdp);
        assert_eq!(
            with,
            "v=0\r\nt=0 0\r\na=group:BUNDLE 0\r\na=msid-semantic:WMS *\r\nm=audio 9 X 111\r\na=mid:0\r\n"
        );
        assert_eq!(with_msid_semantic(&with), with);
    }

    #[test]
    fn ice_credentials_are_replaced_everywhere_and_candidates_swapped() {
        let sdp = "v=0\r\na=ice-ufrag:old\r\na=group:BUNDLE 0 1\r\n\
                   m=audio 9 X 111\r\na=mid:0\r\na=ice-ufrag:old\r\na=ice-pwd:oldpwd\r\n\
                   a=candidate:1 1 udp 1 10.0.0.1 5000 typ host\r\na=end-of-candidates\r\n\
                   m=video 9 X 96\r\na=mid:1\r\na=ice-ufrag:old\r\na=ice-pwd:oldpwd\r\n";
        let cand = |mid: Option<&str>, port| IceCandidate {
            candidate: format!("candidate:2 1 udp 2 10.0.0.2 {port} typ host"),
            sdp_mid: mid.map(String::from),
            ..Default::default()
        };
        let out = with_ice_credentials(
            sdp,
            "NEW",
            "newpwd",
            &[cand(Some("1"), 1), cand(None, 2), cand(Some("x"), 3)],
        );
        assert_eq!(
            out,
            "v=0\r\na=ice-ufrag:NEW\r\na=group:BUNDLE 0 1\r\n\
             m=audio 9 X 111\r\na=mid:0\r\na=ice-ufrag:NEW\r\na=ice-pwd:newpwd\r\n\
             a=candidate:2 1 udp 2 10.0.0.2 2 typ host\r\n\
             a=candidate:2 1 udp 2 10.0.0.2 3 typ host\r\n\
             m=video 9 X 96\r\na=mid:1\r\na=ice-ufrag:NEW\r\na=ice-pwd:newpwd\r\n\
             a=candidate:2 1 udp 2 10.0.0.2 1 typ host\r\n"
        );
        // No m-section at all: nothing to put candidates in, nothing breaks.
        assert_eq!(
            with_ice_credentials("v=0\r\n", "a", "b", &[cand(None, 1)]),
            "v=0\r\n"
        );
    }

    #[test]
    fn binding_requests_cover_five_seconds() {
        assert_eq!(binding_requests(Duration::from_millis(50)), 100);
        assert_eq!(binding_requests(Duration::from_millis(200)), 25);
        assert_eq!(binding_requests(Duration::from_secs(2)), 7);
    }
}
