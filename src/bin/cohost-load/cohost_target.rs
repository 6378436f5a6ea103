//! Driving cohost: its real binary, its WebSocket signaling, two peer connections per
//! participant (publisher: we offer; subscriber: the server offers).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::peer_connection::{PeerConnection, RTCIceCandidateInit, RTCSessionDescription};

use cohost::auth::{Authenticator, Role};
use cohost::config::AuthConfig;

use crate::pc::{PcEvent, new_pc_on};
use crate::stats::Sink;
use crate::target::{Joined, PublishTracks, Target};

pub struct CohostTarget {
    child: Mutex<Option<Child>>,
    media_ip: std::net::IpAddr,
    pid: u32,
    pub addr: SocketAddr,
    auth: Authenticator,
}

impl CohostTarget {
    pub async fn start(bin: &str, media_ip: std::net::IpAddr) -> anyhow::Result<Self> {
        Self::start_with(bin, media_ip, &[]).await
    }

    /// [`Self::start`] with extra `COHOST_*` settings (applied after the defaults here).
    pub async fn start_with(
        bin: &str,
        media_ip: std::net::IpAddr,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        // A fresh secret per run: off loopback the server refuses the development one.
        let secret = format!("load-{:032x}", rand::random::<u128>());
        let mut child = Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--rtmp-listen", ""])
            .env_remove("COHOST_CONFIG")
            .env(
                "COHOST_LOG",
                std::env::var("LOADGEN_SERVER_LOG")
                    .unwrap_or_else(|_| "warn,rtc=error,webrtc=error".into()),
            )
            .env("COHOST_WEBRTC__BIND_IP", media_ip.to_string())
            .env("COHOST_AUTH__SECRET", &secret)
            .env("COHOST_WEBRTC__UDP_PORT_MIN", "40000")
            .env("COHOST_WEBRTC__UDP_PORT_MAX", "44999")
            .env("COHOST_ROOM__MAX_PARTICIPANTS", "1000")
            .env("COHOST_ROOM__MAX_PUBLISHERS", "100")
            .env("COHOST_SIGNALING__RATE_LIMIT_PER_SEC", "1000")
            // Every simulated client connects from this one machine: no per-IP cap.
            .env("COHOST_SERVER__MAX_CONNECTIONS_PER_IP", "0")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        let pid = child.id().ok_or_else(|| anyhow!("no pid"))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::time::timeout(Duration::from_secs(20), async {
            while let Ok(Some(l)) = lines.next_line().await {
                if let Some(rest) = l.strip_prefix("cohost listening on http://") {
                    return rest.parse::<SocketAddr>().ok();
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| anyhow!("cohost did not start"))?;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let auth = Authenticator::new(&AuthConfig {
            secret,
            ..AuthConfig::default()
        })
        .map_err(|e| anyhow!("{e}"))?;
        Ok(Self {
            child: Mutex::new(Some(child)),
            media_ip,
            pid,
            addr,
            auth,
        })
    }
}

impl CohostTarget {
    /// A token for `identity` in `room` with `role` (REST calls need a host or admin token).
    pub fn token(&self, room: &str, identity: &str, role: Role) -> anyhow::Result<String> {
        self.auth
            .mint(room, identity, role, None)
            .map_err(|e| anyhow!("{e}"))
    }

    /// [`Target::join`] with the token's role chosen by the caller (a `cohost` token takes a
    /// seat at once); the handle can send further signaling requests.
    pub async fn join_as(
        &self,
        room: &str,
        identity: &str,
        role: Role,
        media: Option<PublishTracks>,
        sink: Arc<Sink>,
    ) -> anyhow::Result<CohostJoined> {
        let token = self
            .auth
            .mint(room, identity, role, None)
            .map_err(|e| anyhow!("{e}"))?;
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", self.addr)).await?;
        let (mut wsink, mut wstream) = ws.split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
        let writer = tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                if wsink.send(m).await.is_err() {
                    break;
                }
            }
        });
        let sig = Arc::new(Sig {
            tx: tx.clone(),
            pending: Default::default(),
            next: Mutex::new(0),
        });
        let who = format!("{room}/{identity}");
        let (sub, sub_events) = new_pc_on(&who, Some(sink), self.media_ip).await?;
        let pubpc: Arc<Mutex<Option<Arc<dyn PeerConnection>>>> = Default::default();
        // The server trickles its publisher candidates right after the `publish` response,
        // and this reader gets them before the joining task has applied the answer (it only
        // wakes up once the response is handed over); a candidate added before the remote
        // description is refused by the stack. They wait here until the answer is applied.
        // `None` once it is: candidates are then added as they come.
        let pub_early: Arc<Mutex<Option<Vec<RTCIceCandidateInit>>>> =
            Arc::new(Mutex::new(Some(vec![])));
        let cand_sub = forward_candidates(sub_events, "subscriber", tx.clone());
        // Reader: responses to their requests; offers and candidates applied in order.
        let pending = sig.pending.clone();
        let (sub2, pub2, tx2, who2) = (sub.clone(), pubpc.clone(), tx.clone(), who.clone());
        let early2 = pub_early.clone();
        let reader = tokio::spawn(async move {
            while let Some(Ok(m)) = wstream.next().await {
                let Message::Text(t) = m else { continue };
                let Ok(v) = serde_json::from_str::<Value>(&t) else {
                    continue;
                };
                match v["type"].as_str() {
                    Some("response") | Some("error") => {
                        if let Some(id) = v["id"].as_u64()
                            && let Some(s) = pending.lock().ok().and_then(|mut p| p.remove(&id))
                        {
                            let _ = s.send(v);
                        } else if v["type"] == "error" {
                            // Errors to messages without an id (candidates): never silent.
                            eprintln!("  server error for {who2}: {}", v["error"]);
                        }
                    }
                    Some("offer") => {
                        let sdp = v["sdp"].as_str().unwrap_or_default().to_string();
                        let Ok(offer) = RTCSessionDescription::offer(sdp) else {
                            continue;
                        };
                        if sub2.set_remote_description(offer).await.is_err() {
                            continue;
                        }
                        let Ok(answer) = sub2.create_answer(None).await else {
                            continue;
                        };
                        let sdp = answer.sdp.clone();
                        if sub2.set_local_description(answer).await.is_err() {
                            continue;
                        }
                        let m = json!({"type":"answer","offer_id":v["offer_id"],"sdp":sdp});
                        let _ = tx2.send(Message::Text(m.to_string().into()));
                    }
                    Some("candidate") => {
                        let c = &v["candidate"];
                        let cand = c["candidate"].as_str().unwrap_or_default();
                        if cand.is_empty() {
                            continue;
                        }
                        let init = RTCIceCandidateInit {
                            candidate: cand.to_string(),
                            sdp_mid: c["sdpMid"].as_str().map(String::from),
                            sdp_mline_index: c["sdpMLineIndex"].as_u64().map(|x| x as u16),
                            ..Default::default()
                        };
                        let pc = if v["target"] == "subscriber" {
                            Some(sub2.clone())
                        } else {
                            let mut early = early2.lock().unwrap_or_else(|p| p.into_inner());
                            match early.as_mut() {
                                Some(q) => {
                                    q.push(init);
                                    continue;
                                }
                                None => pub2.lock().ok().and_then(|p| p.clone()),
                            }
                        };
                        if let Some(pc) = pc
                            && let Err(e) = pc.add_ice_candidate(init).await
                        {
                            eprintln!("  {who2}: {} candidate dropped: {e}", v["target"]);
                        }
                    }
                    _ => {}
                }
            }
        });
        sig.request(json!({"type":"join","token":token})).await?;
        // Audience members join signaling-only; a load client that watches asks for media.
        if role == Role::Audience {
            sig.request(json!({"type":"subscribe","all":true})).await?;
        }
        let mut tasks = vec![writer, reader, cand_sub];
        let mut pcs = vec![sub.clone()];
        let mut pts = None;
        if let Some(m) = media {
            let (pc, events) = new_pc_on(&who, None, self.media_ip).await?;
            *pubpc.lock().map_err(|_| anyhow!("lock"))? = Some(pc.clone());
            let a = pc.add_track(m.audio.clone() as Arc<dyn TrackLocal>).await?;
            let v = pc.add_track(m.video.clone() as Arc<dyn TrackLocal>).await?;
            let offer = pc.create_offer(None).await?;
            let sdp = offer.sdp.clone();
            pc.set_local_description(offer).await?;
            let r = sig.request(json!({"type":"publish","sdp":sdp})).await?;
            let answer = r["result"]["sdp"]
                .as_str()
                .ok_or_else(|| anyhow!("no answer"))?
                .to_string();
            pc.set_remote_description(RTCSessionDescription::answer(answer)?)
                .await?;
            let early = pub_early
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .unwrap_or_default();
            for c in early {
                if let Err(e) = pc.add_ice_candidate(c).await {
                    eprintln!("  {who}: publisher candidate dropped: {e}");
                }
            }
            // Our candidates only now: sent before the `publish` message they reached a server
            // with no publisher connection yet, which refuses them ("no publisher connection
            // yet"). Gathering started with the offer; the channel kept them.
            tasks.push(forward_candidates(events, "publisher", tx.clone()));
            let apt = a.get_parameters().await?.rtp_parameters.codecs[0].payload_type;
            let vpt = v.get_parameters().await?.rtp_parameters.codecs[0].payload_type;
            pts = Some((apt, vpt));
            pcs.push(pc);
        }
        Ok(CohostJoined {
            sig,
            tasks,
            pcs,
            pts,
        })
    }
}

struct Sig {
    tx: mpsc::UnboundedSender<Message>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>,
    next: Mutex<u64>,
}

impl Sig {
    async fn request(&self, mut v: Value) -> anyhow::Result<Value> {
        let id = {
            let mut n = self.next.lock().map_err(|_| anyhow!("lock"))?;
            *n += 1;
            *n
        };
        v["id"] = json!(id);
        let (s, r) = oneshot::channel();
        self.pending
            .lock()
            .map_err(|_| anyhow!("lock"))?
            .insert(id, s);
        self.tx.send(Message::Text(v.to_string().into()))?;
        let resp = tokio::time::timeout(Duration::from_secs(20), r)
            .await
            .context("request timeout")??;
        if resp["type"] == "error" {
            bail!("{}", resp["error"]);
        }
        Ok(resp)
    }
}

pub struct CohostJoined {
    sig: Arc<Sig>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    pcs: Vec<Arc<dyn PeerConnection>>,
    pts: Option<(u8, u8)>,
}

impl CohostJoined {
    /// Send a signaling request (`{"type": ...}`) and wait for its response.
    pub async fn request(&self, v: Value) -> anyhow::Result<Value> {
        self.sig.request(v).await
    }
}

#[async_trait::async_trait]
impl Joined for CohostJoined {
    fn payload_types(&self) -> Option<(u8, u8)> {
        self.pts
    }

    async fn leave(self: Box<Self>) {
        let _ = self.sig.request(json!({"type":"leave"})).await;
        for pc in &self.pcs {
            let _ = pc.close().await;
        }
        for t in self.tasks {
            t.abort();
        }
    }
}

fn forward_candidates(
    mut rx: mpsc::UnboundedReceiver<PcEvent>,
    target: &'static str,
    tx: mpsc::UnboundedSender<Message>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            if let PcEvent::Candidate(Some((c, mid, idx))) = ev {
                let m = json!({"type":"candidate","target":target,
                    "candidate":{"candidate":c,"sdpMid":mid,"sdpMLineIndex":idx}});
                let _ = tx.send(Message::Text(m.to_string().into()));
            }
        }
    })
}

#[async_trait::async_trait]
impl Target for CohostTarget {
    fn name(&self) -> &'static str {
        "cohost"
    }

    fn pid(&self) -> u32 {
        self.pid
    }

    async fn join(
        &self,
        room: &str,
        identity: &str,
        media: Option<PublishTracks>,
        sink: Arc<Sink>,
    ) -> anyhow::Result<Box<dyn Joined>> {
        let role = if media.is_some() {
            Role::Host
        } else {
            Role::Audience
        };
        Ok(Box::new(
            self.join_as(room, identity, role, media, sink).await?,
        ))
    }

    async fn shutdown(&self) {
        let child = self.child.lock().ok().and_then(|mut c| c.take());
        if let Some(mut c) = child {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &self.pid.to_string()])
                .status();
            if tokio::time::timeout(Duration::from_secs(10), c.wait())
                .await
                .is_err()
            {
                let _ = c.kill().await;
            }
        }
    }
}
