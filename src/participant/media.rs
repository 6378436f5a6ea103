//! The tasks that move one track's media between a participant's peer connections and the
//! SFU, the same for every kind of participant (WebSocket members, WHIP publishers and WHEP
//! viewers): a published track's reader and keyframe task, a subscription's writer and
//! feedback reader (the downlink follower is in `downlink`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::Services;
use crate::peer::{Feedback, Inbound, LocalTrack, RemoteTrack};
use crate::room::Room;
use crate::sfu::keyframe::{Decision, KeyframeThrottle};
use crate::sfu::{LayerControl, TrackRouter};

/// The tasks behind one published track: a reader that feeds the publisher's packets (and
/// sender reports) into `router`, and a keyframe task that turns subscribers' requests into
/// throttled PLIs to the publisher. `on_end` runs when the publisher's track ends.
pub(crate) fn publish_tasks(
    mut t: RemoteTrack,
    router: Arc<TrackRouter>,
    mut kf_rx: mpsc::Receiver<()>,
    svc: &Services,
    room: Arc<Room>,
    on_end: Box<dyn FnOnce() + Send>,
) -> Vec<JoinHandle<()>> {
    let r = router.clone();
    let requester = t.keyframe_requester();
    let stall_after = svc.cfg.webrtc.media_stall_timeout;
    let reader = tokio::spawn(async move {
        // Media that stops while the connection stays up (the publisher's encoder died,
        // packets are lost or dropped somewhere) must not go unnoticed: a bridge would show a
        // frozen tile and nobody would know why. Only RTP counts (sender reports go on), and
        // one timer is re-armed when it fires rather than one made per packet.
        let mut last_rtp = tokio::time::Instant::now();
        let check = tokio::time::sleep(stall_after);
        tokio::pin!(check);
        loop {
            let inbound = tokio::select! {
                inbound = t.recv() => match inbound {
                    Some(inbound) => inbound,
                    None => break,
                },
                () = &mut check => {
                    let now = tokio::time::Instant::now();
                    if now >= last_rtp + stall_after
                        && !r.stats.stalled.swap(true, Ordering::Relaxed)
                    {
                        crate::sfu::TOTALS
                            .media_stalls
                            .fetch_add(1, Ordering::Relaxed);
                        warn!(room = %room.name, participant = %r.participant_id, track = %r.id,
                            kind = ?r.kind, "publisher media stopped: no RTP for {stall_after:?}");
                        room.track_stalled(&r, true);
                    }
                    check.as_mut().reset(last_rtp.max(now) + stall_after);
                    continue;
                }
            };
            if matches!(inbound, Inbound::Rtp(..)) {
                last_rtp = tokio::time::Instant::now();
                if r.stats.stalled.load(Ordering::Relaxed)
                    && r.stats.stalled.swap(false, Ordering::Relaxed)
                {
                    info!(room = %room.name, participant = %r.participant_id, track = %r.id,
                        "publisher media resumed");
                    room.track_stalled(&r, false);
                }
            }
            let (mut p, layer) = match inbound {
                Inbound::Rtp(p, layer) => (p, layer),
                Inbound::SenderReport(sr, layer) => {
                    if r.sender_report().is_none() {
                        debug!(track = %r.id, layer, "first sender report");
                    }
                    r.set_layer_sender_report(layer, sr);
                    continue;
                }
            };
            // Header extensions carry ids negotiated with this publisher only; every
            // subscriber leg drops them, so drop them once here and keep the per-subscriber
            // clones allocation-free.
            p.header.extension = false;
            p.header.extension_profile = 0;
            p.header.extensions.clear();
            r.forward_layer(p, layer);
        }
        on_end();
    });
    // Keyframe requests from subscribers, throttled, out to the publisher as PLI.
    let interval = svc.cfg.webrtc.keyframe_request_interval;
    let metrics = svc.metrics.clone();
    let pli_track = router.id.clone();
    let pli_router = router.clone();
    let pli = tokio::spawn(async move {
        let mut throttle = KeyframeThrottle::new(interval);
        while kf_rx.recv().await.is_some() {
            match throttle.request(Instant::now()) {
                Decision::SendNow => {}
                Decision::SendAt(at) => {
                    tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await
                }
                Decision::Coalesced => continue,
            }
            // A simulcast track: one PLI per layer owed a keyframe (those not seen yet are
            // asked through the track's first SSRC).
            let ssrcs = pli_router.take_keyframe_ssrcs();
            debug!(track = %pli_track, ?ssrcs, "PLI to publisher");
            let sent = if ssrcs.is_empty() {
                requester.send_pli().await.map(|()| 1)
            } else {
                let mut n = 0;
                for ssrc in ssrcs {
                    if let Err(e) = requester.send_pli_to(ssrc).await {
                        debug!(track = %pli_track, "PLI: {e}");
                        break;
                    }
                    n += 1;
                }
                Ok(n)
            };
            let Ok(n) = sent else { break };
            metrics.plis_sent.fetch_add(n, Ordering::Relaxed);
            throttle.sent(Instant::now());
        }
    });
    vec![reader, pli]
}

/// The tasks behind one subscription: a writer that forwards `router`'s packets to `local`,
/// and a feedback reader that turns the subscriber's PLI/FIR into keyframe requests (of the
/// layer it gets, on a simulcast track). While `paused` is set the packets are dropped
/// (`pause_media`). A simulcast track follows the downlink in `group`, shared with the
/// subscriber's other tracks (`downlink`). Also returns the handle choosing the
/// subscription's simulcast layer.
pub(crate) fn forward_tasks(
    local: &Arc<LocalTrack>,
    router: &Arc<TrackRouter>,
    queue: usize,
    paused: Arc<AtomicBool>,
    group: &super::downlink::DownlinkGroup,
) -> (Vec<JoinHandle<()>>, LayerControl) {
    let mut sub = router.subscribe(queue);
    let control = sub.control();
    let l = local.clone();
    let writer = tokio::spawn(async move {
        // Drain what has queued up per wake-up: fewer task switches under fan-out.
        let mut batch = Vec::with_capacity(32);
        while sub.rx.recv_many(&mut batch, 32).await > 0 {
            if paused.load(Ordering::Relaxed) {
                batch.clear();
                continue;
            }
            for p in batch.drain(..) {
                // Errors before negotiation completes are expected; the packet is dropped.
                let _ = l.write(p).await;
            }
        }
    });
    let l = local.clone();
    let c = control.clone();
    let feedback = tokio::spawn(async move {
        loop {
            match l.feedback().await {
                Some(Feedback::KeyframeRequest) => c.request_keyframe(),
                // Not bound to the transport yet (negotiation pending): look again soon.
                None => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    if control.layer_count() >= 2 {
        group.add(
            &router.id,
            &router.participant_id,
            local.clone(),
            control.clone(),
        );
    }
    (vec![writer, feedback], control)
}
