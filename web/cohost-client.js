// cohost-client.js: a reusable browser client for the cohost signaling protocol v1
// (docs/protocol.md). Plain ES module, no dependencies, no UI: the demo page (index.html +
// demo.js) is one user of it; a web app can import it the same way.
//
//   import { CohostClient } from "./cohost-client.js";
//   const c = new CohostClient("ws://127.0.0.1:8080/ws", token);
//   c.addEventListener("track", (e) => attach(e.detail.participantId, e.detail.stream));
//   c.addEventListener("message", (e) => showChat(e.detail.message));
//   const joined = await c.connect();            // join result (docs/protocol.md#join-result)
//   await c.publish(await navigator.mediaDevices.getUserMedia({ audio: true, video: true }));
//
// Media: one WebSocket, a publisher RTCPeerConnection (the client offers; created by
// publish()) and a subscriber RTCPeerConnection (the server offers; created on the first
// offer). Candidates are trickled; the ones produced before the server knows a connection are
// held back, as the protocol asks. Video is published as simulcast layers unless told not to
// (publish's `simulcast` option); a subscriber picks the layer of a track with
// setTrackQuality(trackId, {maxWidth, maxHeight}) (the size it shows it at) or {layer}.
//
// Events (CustomEvent, payload in `detail`):
//   every server event by its protocol type, with the raw message as detail: participant_joined,
//     participant_left, track_published, track_unpublished, track_muted, track_stalled, role_changed,
//     cohost_request, cohost_request_ended, cohost_invite, cohost_invite_ended, message,
//     message_deleted, pk_invite, pk_declined, pk_invite_ended, pk_started, pk_ended, closing,
//     error (an error without a request id)
//   "track"        {track, stream, participantId, trackId}: remote media on the subscriber connection
//   "roster"       {participants}: the member list changed (this.participants, a Map)
//   "role"         {role}: my own role changed (promoted to cohost, demoted to audience)
//   "state"        {state, detail}: connecting | connected | reconnecting | closed
//   "reconnected"  {joined}: a new connection joined again after a drop (publish again)
//   "closed"       {code, reason, retry}: the WebSocket closed; retry says whether a reconnect follows

/** Close codes after which retrying with the same token cannot help (docs/protocol.md). */
const FINAL_CLOSE = new Set([1000, 4001, 4002, 4003, 4005, 4006, 4009, 4029]);

/** An error answered by the server: `code` is the protocol error code. */
export class CohostError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

export class CohostClient extends EventTarget {
  /**
   * @param {string} wsUrl  e.g. `ws://127.0.0.1:8080/ws`
   * @param {string} token  access token (JWT) for one room, identity and role
   * @param {object} [opts] `reconnect` (default true): rejoin with backoff after a drop;
   *   `requestTimeoutMs` (default 10000); `backoffMs` [first, max] (default [500, 8000]);
   *   `simulcast` (default true): how `publish` sends video, see there
   */
  constructor(wsUrl, token, opts = {}) {
    super();
    this.wsUrl = wsUrl;
    this.token = token;
    this.opts = { reconnect: true, requestTimeoutMs: 10000, backoffMs: [500, 8000], simulcast: true, ...opts };
    this.nextId = 1;
    this.pending = new Map();
    this.ws = null;
    this.pub = null;
    this.sub = null;
    this.iceServers = [];
    this.pubReady = false;
    this.pubQueue = [];
    this.subQueue = [];
    this.subReady = false;
    /** Serializes SDP and candidate handling of the subscriber connection. */
    this.chain = Promise.resolve();
    /** participant id -> {id, identity, role, tracks: Map(trackId -> track)}; me included. */
    this.participants = new Map();
    this.me = null;
    this.room = null;
    this.pk = null;
    this.state = "new";
    this.closedByUser = false;
    this.attempt = 0;
    this.localStream = null;
    /** remote track id -> participant id (from the stream ids), PK partner tracks included. */
    this.trackOwner = new Map();
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  setState(state, detail = {}) {
    this.state = state;
    this.emit("state", { state, ...detail });
  }

  /** Send a request and wait for its `response` (resolves with `result`) or `error` (rejects
   * with a CohostError). */
  request(msg) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) {
      return Promise.reject(new CohostError("not_connected", "not connected to the server"));
    }
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new CohostError("timeout", `no answer to ${msg.type}`));
      }, this.opts.requestTimeoutMs);
      this.pending.set(id, { resolve, reject, timer });
      this.ws.send(JSON.stringify({ ...msg, id }));
    });
  }

  /** Open the WebSocket and join. Resolves with the join result; rejects with a CohostError
   * (`invalid_token`, `token_expired`, `room_full`, `seats_full`, `connect_failed`, ...). */
  async connect() {
    this.closedByUser = false;
    this.setState("connecting");
    const joined = await this.open();
    this.setState("connected");
    return joined;
  }

  async open() {
    const ws = new WebSocket(this.wsUrl);
    this.ws = ws;
    await new Promise((resolve, reject) => {
      ws.onopen = resolve;
      ws.onerror = () => reject(new CohostError("connect_failed", `cannot reach ${this.wsUrl}`));
    });
    ws.onerror = null;
    ws.onmessage = (e) => {
      let m;
      try {
        m = JSON.parse(e.data);
      } catch {
        return;
      }
      this.onMessage(m);
    };
    ws.onclose = (e) => this.onClose(ws, e);
    clearInterval(this.keepalive);
    this.keepalive = setInterval(() => {
      if (ws.readyState === WebSocket.OPEN) ws.send('{"type":"ping"}');
    }, 5000);
    const joined = await this.request({ type: "join", token: this.token, version: 1 });
    this.applyJoin(joined);
    return joined;
  }

  applyJoin(joined) {
    this.iceServers = joined.ice_servers || [];
    this.room = joined.room;
    this.me = { ...joined.participant };
    this.pk = joined.pk || null;
    this.participants.clear();
    for (const p of [joined.participant, ...joined.participants]) this.addParticipant(p);
    // Members of any role, and real-time participants (the audience is signaling-only and
    // not listed to other audience members): `member_count` keeps these current.
    this.counts = joined.counts || null;
    this.emit("counts", this.counts);
    this.emit("roster", { participants: this.participants });
  }

  addParticipant(p) {
    const tracks = new Map((p.tracks || []).map((t) => [t.id, { ...t }]));
    this.participants.set(p.id, { id: p.id, identity: p.identity, role: p.role, tracks });
  }

  onClose(ws, e) {
    if (ws !== this.ws) return;
    clearInterval(this.keepalive);
    for (const [, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(new CohostError("connection_lost", `connection closed (${e.code})`));
    }
    this.pending.clear();
    this.resetMedia();
    const retry = this.opts.reconnect && !this.closedByUser && this.me !== null && !FINAL_CLOSE.has(e.code);
    this.emit("closed", { code: e.code, reason: e.reason, retry });
    if (retry) this.reconnect();
    else this.setState("closed", { code: e.code, reason: e.reason });
  }

  /** Rejoin with exponential backoff (1001 shutdown, 4008 dead, 1006 network drop). */
  async reconnect() {
    const [first, max] = this.opts.backoffMs;
    while (!this.closedByUser) {
      const delayMs = Math.min(max, first * 2 ** this.attempt);
      this.attempt += 1;
      this.setState("reconnecting", { attempt: this.attempt, delayMs });
      await new Promise((r) => setTimeout(r, delayMs));
      if (this.closedByUser) return;
      try {
        const joined = await this.open();
        this.attempt = 0;
        this.setState("connected");
        this.emit("reconnected", { joined });
        return;
      } catch (err) {
        if (err.code && FINAL_CLOSE_CODES.has(err.code)) {
          this.setState("closed", { reason: err.message, code: err.code });
          return;
        }
        // The close handler of that socket is ignored only if a newer socket replaced it;
        // here it is still ours, so keep it from starting a second loop.
        if (this.ws) this.ws.onclose = null;
      }
    }
  }

  resetMedia() {
    this.pub?.close();
    this.sub?.close();
    this.pub = null;
    this.sub = null;
    this.pubReady = false;
    this.subReady = false;
    this.pubQueue = [];
    this.subQueue = [];
  }

  sendCandidate(target, c) {
    const candidate = c ? c.toJSON() : { candidate: "" };
    const msg = JSON.stringify({ type: "candidate", target, candidate });
    const ready = target === "publisher" ? this.pubReady : this.subReady;
    if (!ready) (target === "publisher" ? this.pubQueue : this.subQueue).push(msg);
    else if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(msg);
  }

  onMessage(m) {
    if ((m.type === "response" || m.type === "error") && m.id !== undefined && this.pending.has(m.id)) {
      const p = this.pending.get(m.id);
      this.pending.delete(m.id);
      clearTimeout(p.timer);
      if (m.type === "response") p.resolve(m.result);
      else p.reject(new CohostError(m.error.code, m.error.message));
      return;
    }
    if (m.type === "response") return; // answers to keepalive pings and candidates
    if (m.type === "offer" || m.type === "candidate") {
      this.chain = this.chain.then(() => this.onMedia(m)).catch((err) =>
        this.emit("error", { error: { code: "media", message: String(err?.message || err) } }),
      );
      return;
    }
    this.track(m);
    this.emit(m.type, m);
  }

  /** Keep `participants` and my role in step with the room's events. */
  track(m) {
    const ps = this.participants;
    let changed = true;
    switch (m.type) {
      case "participant_joined":
        this.addParticipant(m.participant);
        break;
      case "participant_left":
        ps.delete(m.participant_id);
        break;
      case "track_published": {
        const p = ps.get(m.track.participant_id);
        if (p) p.tracks.set(m.track.id, { ...m.track });
        break;
      }
      case "track_unpublished":
        ps.get(m.participant_id)?.tracks.delete(m.track_id);
        break;
      case "track_muted": {
        const t = ps.get(m.participant_id)?.tracks.get(m.track_id);
        if (t) t.muted = m.muted;
        break;
      }
      case "track_stalled": {
        // The publisher's media stopped (or resumed) while its connection is up.
        const t = ps.get(m.participant_id)?.tracks.get(m.track_id);
        if (t) t.stalled = m.stalled;
        break;
      }
      case "role_changed": {
        const p = ps.get(m.participant_id);
        if (p) p.role = m.role;
        if (this.me && m.participant_id === this.me.id) {
          this.me.role = m.role;
          // Demoted: the server stopped taking our media; close the publisher connection.
          if (m.role === "audience") this.unpublish();
          this.emit("role", { role: m.role });
        }
        break;
      }
      case "member_count":
        this.counts = { members: m.members, participants: m.participants };
        this.emit("counts", this.counts);
        changed = false;
        break;
      case "pk_started":
        this.pk = m.room;
        break;
      case "pk_ended":
        this.pk = null;
        break;
      default:
        changed = false;
    }
    if (changed) this.emit("roster", { participants: ps });
  }

  ensureSub() {
    if (this.sub) return this.sub;
    const sub = new RTCPeerConnection({ iceServers: this.iceServers });
    sub.onicecandidate = (e) => this.sendCandidate("subscriber", e.candidate);
    sub.ontrack = (e) => {
      // The server's msid is "<participant id> <track id>".
      const stream = e.streams[0] || new MediaStream([e.track]);
      this.trackOwner.set(e.track.id, stream.id);
      this.emit("track", { track: e.track, stream, participantId: stream.id, trackId: e.track.id });
    };
    this.sub = sub;
    return sub;
  }

  async onMedia(m) {
    if (m.type === "offer") {
      const sub = this.ensureSub();
      await sub.setRemoteDescription({ type: "offer", sdp: m.sdp });
      const answer = await sub.createAnswer();
      await sub.setLocalDescription(answer);
      await this.request({ type: "answer", offer_id: m.offer_id, sdp: answer.sdp });
      if (!this.subReady) {
        this.subReady = true;
        for (const msg of this.subQueue.splice(0)) this.ws?.send(msg);
      }
      return;
    }
    const pc = m.target === "subscriber" ? this.sub : this.pub;
    if (pc && m.candidate?.candidate) await pc.addIceCandidate(m.candidate);
  }

  /** Publish a camera/microphone stream (host, or cohost once promoted). Video prefers
   * H.264, which the bridge decodes. Rejects with `forbidden` for the audience.
   *
   * `simulcast` (default: the constructor's `simulcast` option, itself true by default): send
   * the video as layers, lowest quality first (docs/protocol.md#simulcast), so each subscriber
   * gets the layer that fits the size it shows the video at (`setTrackQuality`); the bridge
   * and subscribers that do not choose get the top layer. `true` uses the top layers of
   * SIMULCAST_ENCODINGS that the browser sends at the camera's size (see simulcastEncodings),
   * an array gives the `sendEncodings` as they are (rids, low to high), `false` sends one
   * stream. */
  async publish(stream, { simulcast = this.opts.simulcast } = {}) {
    this.unpublish();
    this.localStream = stream;
    const pub = new RTCPeerConnection({ iceServers: this.iceServers });
    this.pub = pub;
    pub.onicecandidate = (e) => this.sendCandidate("publisher", e.candidate);
    for (const track of stream.getTracks()) {
      const init = { direction: "sendonly", streams: [stream] };
      const video = track.kind === "video";
      let layers = null;
      if (video && simulcast === true) layers = simulcastEncodings(track.getSettings?.() || {});
      else if (video && Array.isArray(simulcast)) layers = simulcast;
      if (layers) init.sendEncodings = layers.map((e) => ({ ...e }));
      const t = pub.addTransceiver(track, init);
      // The server takes no retransmissions of simulcast layers on an RTX stream: without RTX
      // negotiated, the browser retransmits on each layer's own SSRC.
      if (video) preferH264(t, { rtx: !layers });
    }
    const offer = await pub.createOffer();
    await pub.setLocalDescription(offer);
    try {
      const result = await this.request({ type: "publish", sdp: offer.sdp });
      await pub.setRemoteDescription({ type: "answer", sdp: result.sdp });
    } catch (err) {
      this.unpublish();
      throw err;
    }
    this.pubReady = true;
    for (const msg of this.pubQueue.splice(0)) this.ws?.send(msg);
  }

  /** Stop publishing: close the publisher connection (the caller owns the stream's tracks). */
  unpublish() {
    this.pub?.close();
    this.pub = null;
    this.pubReady = false;
    this.pubQueue = [];
    this.localStream = null;
  }

  // Co-host workflow (docs/protocol.md#co-host-workflow). Each resolves on `response` {}.
  requestCohost() { return this.request({ type: "request_cohost" }); }
  cancelCohostRequest() { return this.request({ type: "cancel_cohost_request" }); }
  answerCohostRequest(participantId, approve) {
    return this.request({ type: "answer_cohost_request", participant_id: participantId, approve });
  }
  inviteCohost(participantId) { return this.request({ type: "invite_cohost", participant_id: participantId }); }
  answerCohostInvite(accept) { return this.request({ type: "answer_cohost_invite", accept }); }
  removeCohost(participantId) { return this.request({ type: "remove_cohost", participant_id: participantId }); }
  leaveSeat() { return this.request({ type: "leave_seat" }); }
  muteTrack(participantId, kind, muted) {
    return this.request({ type: "mute_track", participant_id: participantId, kind, muted });
  }
  kick(participantId) { return this.request({ type: "kick", participant_id: participantId }); }

  // Room messages (docs/protocol.md#room-messages).
  /** Receive media: `"all"` (every track, now and later) or an array of track ids. Hosts
   * and co-hosts receive everything from their join; the audience joins signaling-only. */
  subscribe(tracks = "all") {
    return this.request(tracks === "all" ? { type: "subscribe", all: true } : { type: "subscribe", tracks });
  }
  unsubscribe(tracks = "all") {
    return this.request(tracks === "all" ? { type: "unsubscribe", all: true } : { type: "unsubscribe", tracks });
  }
  /**
   * Choose the layer of a simulcast track (one with `layers`) this client receives: `{layer}`
   * (a rid from the track's `layers`) or `{maxWidth, maxHeight}`, the size the video is shown
   * at in device pixels (the server picks the smallest layer covering it). Resolves with the
   * layer chosen (`undefined` for a track without layers). The switch follows at the next
   * keyframe of that layer.
   */
  async setTrackQuality(trackId, { layer, maxWidth, maxHeight } = {}) {
    const msg = { type: "set_track_quality", track_id: trackId };
    if (layer !== undefined) msg.layer = layer;
    else {
      msg.max_width = Math.min(16384, Math.max(1, Math.round(maxWidth)));
      msg.max_height = Math.min(16384, Math.max(1, Math.round(maxHeight)));
    }
    const result = await this.request(msg);
    return result?.layer;
  }

  /** Stop / restart all incoming media without renegotiating (a page in the background). */
  pauseMedia() { return this.request({ type: "pause_media" }); }
  resumeMedia() { return this.request({ type: "resume_media" }); }

  chat(text) { return this.request({ type: "chat", text }); }
  like(count = 1) { return this.request({ type: "like", count }); }
  gift(gift, count = 1) { return this.request({ type: "gift", gift, count }); }
  deleteMessage(messageId) { return this.request({ type: "delete_message", message_id: messageId }); }
  muteChat(participantId, muted) { return this.request({ type: "mute_chat", participant_id: participantId, muted }); }

  // Cross-room PK (docs/protocol.md#cross-room-pk).
  pkInvite(room) { return this.request({ type: "pk_invite", room }); }
  pkAnswer(room, accept) { return this.request({ type: "pk_answer", room, accept }); }
  pkEnd() { return this.request({ type: "pk_end" }); }

  // The room's bridge (host only). `layout`: solo | pip | side_by_side | grid | null (follow the room).
  startBridge({ layout = null, destinations = [] } = {}) {
    const msg = { type: "start_bridge", destinations };
    if (layout) msg.layout = layout;
    return this.request(msg);
  }
  setLayout(layout) { return this.request({ type: "set_layout", layout }); }
  stopBridge() { return this.request({ type: "stop_bridge" }); }

  /**
   * Per-track statistics from both peer connections' getStats(), bitrates over the time since
   * the previous call: [{direction: "send"|"recv", kind, trackId, participantId, kbps,
   * lossPct, rttMs, framesDecoded, audioLevel, totalAudioEnergy}]; a simulcast video track
   * has one "send" row per layer, with its `rid`.
   */
  async stats() {
    const out = [];
    const now = performance.now();
    const prev = this.prevStats || new Map();
    const next = new Map();
    const rate = (key, bytes) => {
      next.set(key, { bytes, t: now });
      const p = prev.get(key);
      return p && now > p.t ? ((bytes - p.bytes) * 8) / (now - p.t) : null; // kbit/s
    };
    for (const [direction, pc] of [["send", this.pub], ["recv", this.sub]]) {
      if (!pc) continue;
      const report = await pc.getStats();
      let pairRtt = null;
      const remote = new Map();
      const tracks = new Map();
      report.forEach((r) => {
        if (r.type === "candidate-pair" && r.nominated && r.state === "succeeded" && r.currentRoundTripTime !== undefined) {
          pairRtt = r.currentRoundTripTime * 1000;
        }
        if (r.type === "remote-inbound-rtp") remote.set(r.localId, r);
        if (r.type === "media-source" || r.type === "track") tracks.set(r.id, r);
      });
      report.forEach((r) => {
        if (direction === "send" && r.type === "outbound-rtp") {
          const ri = remote.get(r.id);
          const src = tracks.get(r.mediaSourceId);
          out.push({
            direction, kind: r.kind, trackId: src?.trackIdentifier || r.mid, participantId: this.me?.id, rid: r.rid,
            kbps: rate(r.id, r.bytesSent || 0),
            lossPct: ri && ri.fractionLost !== undefined ? ri.fractionLost * 100 : null,
            rttMs: ri?.roundTripTime !== undefined ? ri.roundTripTime * 1000 : pairRtt,
          });
        }
        if (direction === "recv" && r.type === "inbound-rtp") {
          const lost = r.packetsLost || 0;
          const got = r.packetsReceived || 0;
          const track = this.findTrack(r.trackIdentifier);
          out.push({
            direction, kind: r.kind, trackId: r.trackIdentifier,
            participantId: track?.participant_id || this.trackOwner.get(r.trackIdentifier),
            kbps: rate(r.id, r.bytesReceived || 0),
            lossPct: got + lost > 0 ? (lost * 100) / (got + lost) : 0,
            rttMs: pairRtt,
            framesDecoded: r.framesDecoded, audioLevel: r.audioLevel, totalAudioEnergy: r.totalAudioEnergy,
          });
        }
      });
    }
    this.prevStats = next;
    return out;
  }

  findTrack(trackId) {
    for (const p of this.participants.values()) {
      const t = p.tracks.get(trackId);
      if (t) return t;
    }
    return null;
  }

  /** Leave the room (no reconnect follows). */
  async leave() {
    this.closedByUser = true;
    clearInterval(this.keepalive);
    try {
      await this.request({ type: "leave" });
    } catch {
      // Already gone.
    }
    this.resetMedia();
    this.ws?.close();
    this.setState("closed", { code: 1000, reason: "left" });
  }
}

/** Protocol error codes after which reconnecting with the same token cannot help. */
const FINAL_CLOSE_CODES = new Set(["invalid_token", "token_expired", "wrong_room", "room_full", "seats_full", "host_present"]);

/**
 * The simulcast layers `publish` sends by default, as `sendEncodings` (lowest quality first,
 * as the server expects): a quarter, half and the full camera size, for a host sending up to
 * 800 kbit/s at the top. Which of them are offered depends on the camera size (see
 * simulcastEncodings); within those, the browser sends the layers its bandwidth estimate
 * allows, from the bottom. Pass your own array to `publish` for other sizes or bitrates.
 */
export const SIMULCAST_ENCODINGS = Object.freeze([
  Object.freeze({ rid: "q", scaleResolutionDownBy: 4, maxBitrate: 100_000 }),
  Object.freeze({ rid: "h", scaleResolutionDownBy: 2, maxBitrate: 250_000 }),
  Object.freeze({ rid: "f", scaleResolutionDownBy: 1, maxBitrate: 800_000 }),
]);

/**
 * The layers of SIMULCAST_ENCODINGS to send for a camera of `width` x `height`, or null for
 * no simulcast. Chromium (libwebrtc) caps the number of simulcast layers by the picture size,
 * whatever `scaleResolutionDownBy` says: 3 from 960x540 up, 2 from 480x270, else 1; and the
 * layers it leaves out are the TOP ones: a 640x480 camera offered q/h/f sends only 160x120 and
 * 320x240 (measured with Chromium 156), so the bridge and every subscriber would get half the
 * picture. Offer only the top layers it will send, so the top one is always the full picture
 * (640x480: h and f; 1280x720: q, h and f). A size the browser does not report: all layers.
 */
export function simulcastEncodings({ width, height } = {}) {
  const pixels = width && height ? width * height : Infinity;
  const n = pixels >= 960 * 540 ? 3 : pixels >= 480 * 270 ? 2 : 1;
  if (n < 2) return null;
  return SIMULCAST_ENCODINGS.slice(-n).map((e) => ({ ...e }));
}

// The bridge (the mixed RTMP/HTTP-FLV output) decodes H.264, not VP8, and browsers offer VP8
// first unless told otherwise: put H.264 (constrained baseline, packetization-mode=1 first)
// at the top of the video codec list where the browser lets us. `rtx: false` leaves the
// retransmission codec out (simulcast).
function preferH264(transceiver, { rtx = true } = {}) {
  const caps = globalThis.RTCRtpSender?.getCapabilities?.("video");
  if (!caps || !transceiver.setCodecPreferences) return;
  const rank = (c) => {
    if (c.mimeType.toLowerCase() !== "video/h264") return 2;
    const f = c.sdpFmtpLine || "";
    return f.includes("packetization-mode=1") && /profile-level-id=42/.test(f) ? 0 : 1;
  };
  const codecs = [...caps.codecs]
    .filter((c) => rtx || c.mimeType.toLowerCase() !== "video/rtx")
    .sort((a, b) => rank(a) - rank(b));
  try {
    transceiver.setCodecPreferences(codecs);
  } catch {
    // Older browsers: keep their default order; the SFU still accepts VP8.
  }
}

/** Ask the development token endpoint (`POST /v1/dev/token`, on only in development, see
 * docs/api.md) for a token. Rejects with a CohostError (`dev_tokens_off`, `bad_request`). */
export async function devToken(baseUrl, room, identity, role) {
  let res;
  try {
    res = await fetch(`${baseUrl}/v1/dev/token`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ room, identity, role }),
    });
  } catch {
    throw new CohostError("connect_failed", "cannot reach the server");
  }
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new CohostError(body.error?.code || `http_${res.status}`, body.error?.message || res.statusText);
  return body.token;
}

/** Read the claims of a token without verifying it (the server does that): {room, sub, role}. */
export function tokenClaims(token) {
  try {
    const b64 = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4)));
  } catch {
    return null;
  }
}
