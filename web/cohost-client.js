// A small browser client for the cohost signaling protocol v1 (docs/protocol.md).
// One WebSocket; a publisher RTCPeerConnection (we offer) and a subscriber RTCPeerConnection
// (the server offers). No dependencies.

export class CohostClient extends EventTarget {
  constructor(wsUrl, token) {
    super();
    this.wsUrl = wsUrl;
    this.token = token;
    this.nextId = 1;
    this.pending = new Map();
    this.pub = null;
    this.sub = null;
    this.iceServers = [];
    // Candidates produced before the server knows the connection are held back.
    this.pubReady = false;
    this.pubQueue = [];
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  request(msg) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.ws.send(JSON.stringify({ ...msg, id }));
    });
  }

  async connect() {
    this.ws = new WebSocket(this.wsUrl);
    await new Promise((resolve, reject) => {
      this.ws.onopen = resolve;
      this.ws.onerror = () => reject(new Error("WebSocket connection failed"));
    });
    this.ws.onmessage = (e) => this.onMessage(JSON.parse(e.data));
    this.ws.onclose = (e) => this.emit("closed", { code: e.code, reason: e.reason });
    this.keepalive = setInterval(() => {
      if (this.ws.readyState === WebSocket.OPEN) this.ws.send('{"type":"ping"}');
    }, 5000);
    const joined = await this.request({ type: "join", token: this.token, version: 1 });
    this.iceServers = joined.ice_servers || [];
    this.sub = new RTCPeerConnection({ iceServers: this.iceServers });
    this.sub.onicecandidate = (e) => this.sendCandidate("subscriber", e.candidate);
    this.sub.ontrack = (e) => this.emit("track", { track: e.track, streams: e.streams });
    return joined;
  }

  sendCandidate(target, c) {
    const candidate = c ? c.toJSON() : { candidate: "" };
    const msg = JSON.stringify({ type: "candidate", target, candidate });
    if (target === "publisher" && !this.pubReady) this.pubQueue.push(msg);
    else this.ws.send(msg);
  }

  async onMessage(m) {
    if ((m.type === "response" || m.type === "error") && this.pending.has(m.id)) {
      const p = this.pending.get(m.id);
      this.pending.delete(m.id);
      if (m.type === "response") p.resolve(m.result);
      else p.reject(Object.assign(new Error(m.error.message), { code: m.error.code }));
      return;
    }
    switch (m.type) {
      case "offer": {
        await this.sub.setRemoteDescription({ type: "offer", sdp: m.sdp });
        const answer = await this.sub.createAnswer();
        await this.sub.setLocalDescription(answer);
        await this.request({ type: "answer", offer_id: m.offer_id, sdp: answer.sdp });
        break;
      }
      case "candidate": {
        const pc = m.target === "subscriber" ? this.sub : this.pub;
        if (pc && m.candidate.candidate) await pc.addIceCandidate(m.candidate);
        break;
      }
      default:
        this.emit(m.type, m);
    }
  }

  async publish(stream) {
    this.pub = new RTCPeerConnection({ iceServers: this.iceServers });
    this.pub.onicecandidate = (e) => this.sendCandidate("publisher", e.candidate);
    for (const track of stream.getTracks()) {
      const t = this.pub.addTransceiver(track, { direction: "sendonly", streams: [stream] });
      if (track.kind === "video") preferH264(t);
    }
    const offer = await this.pub.createOffer();
    await this.pub.setLocalDescription(offer);
    const result = await this.request({ type: "publish", sdp: offer.sdp });
    await this.pub.setRemoteDescription({ type: "answer", sdp: result.sdp });
    this.pubReady = true;
    for (const msg of this.pubQueue.splice(0)) this.ws.send(msg);
  }

  async leave() {
    clearInterval(this.keepalive);
    try {
      await this.request({ type: "leave" });
    } catch (_) {
      // Already gone.
    }
    this.pub?.close();
    this.sub?.close();
  }
}

// The bridge (the mixed RTMP/HTTP-FLV output) decodes H.264, not VP8, and browsers offer VP8
// first unless told otherwise: put H.264 (constrained baseline, packetization-mode=1 first)
// at the top of the video codec list where the browser lets us.
function preferH264(transceiver) {
  const caps = globalThis.RTCRtpSender?.getCapabilities?.("video");
  if (!caps || !transceiver.setCodecPreferences) return;
  const rank = (c) => {
    if (c.mimeType.toLowerCase() !== "video/h264") return 2;
    const f = c.sdpFmtpLine || "";
    return f.includes("packetization-mode=1") && /profile-level-id=42/.test(f) ? 0 : 1;
  };
  const codecs = [...caps.codecs].sort((a, b) => rank(a) - rank(b));
  try {
    transceiver.setCodecPreferences(codecs);
  } catch {
    // Older browsers: keep their default order; the SFU still accepts VP8.
  }
}
