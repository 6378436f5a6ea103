// The demo page's UI. All protocol work is in cohost-client.js; this file only renders the room
// and turns clicks into client calls.
import { CohostClient, CohostError, devToken } from "./cohost-client.js";

const $ = (id) => document.getElementById(id);
const el = (tag, props = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(e.dataset, v);
    else e[k] = v;
  }
  e.append(...children.filter((c) => c !== null && c !== undefined));
  return e;
};

const base = `${location.protocol}//${location.host}`;
const wsUrl = `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/ws`;

// Page state.
let client = null;
let token = null;
let localStream = null; // my camera + microphone (a preview until published)
let micMuted = false; // the microphone track is disabled (still published: silence)
const remote = new Map(); // participant id -> MediaStream (subscriber connection)
const tiles = new Map(); // participant id or "local" -> tile element
const requests = new Map(); // participant id -> identity (co-host requests, host side)
let pkHost = null; // {participant_id, identity, room} of the partner host during a PK
let audienceView = null; // FlvView: the audience's player
let statsTimer = null;

// The host's live: "Go live" publishes, the server's bridge starts by itself (bridge.auto_start;
// the page starts it after a few seconds otherwise); "End live" stops the bridge, then the camera.
let wantLive = false; // pressed "Go live" and not "End live" (republish after a reconnect)
let awaitingStart = false; // published, the stream not seen running yet
let liveSince = null; // Date.now() when the page first saw the stream running in this live
let bridgeStatus = null; // GET /v1/rooms/{room}/bridge, null when not running
let bridgeTimer = null;
let bridgeGen = 0; // the newest refreshBridge call; older answers are dropped
let fallbackTimer = null;
let badgeTimer = null;
let layoutBusy = false; // a set_layout in flight: the selector shows the person's choice
const pendingDests = []; // pushes asked for before the stream runs
let monitor = null; // FlvView: the host's small player of what viewers get
let monitorTimer = null;
let stoppedWarned = false; // told the host that the stream stopped under them

/** Seconds the page waits after publishing for the stream to start by itself. */
const AUTO_START_WAIT_MS = 4000;

// ---------------------------------------------------------------- messages to the person

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}
function showNotice(text) {
  $("notice").textContent = text;
  $("notice").hidden = !text;
  clearTimeout(showNotice.timer);
  if (text) showNotice.timer = setTimeout(() => ($("notice").hidden = true), 6000);
}

const CLOSE_TEXT = {
  1001: "The server is shutting down.",
  4001: "The access token is invalid.",
  4002: "The access token has expired: get a new one.",
  4003: "The token is for another room.",
  4005: "You joined this room from another tab or device; this page was disconnected.",
  4006: "The room is full.",
  4008: "The connection went silent or the media connection failed.",
  4009: "The host removed you from the room.",
  4010: "The connection was too slow to keep up: the server closed it.",
  4011: "This room already has a host.",
  4029: "Too many messages: the server closed the connection.",
};

/** A sentence a person understands for a client, server or media error. */
function describe(err) {
  const code = err?.code;
  switch (err?.name) {
    case "NotAllowedError":
      return "Camera/microphone access was denied. Allow it for this site in the browser's settings, then press \"Go live\" again.";
    case "NotFoundError":
      return "No camera or microphone was found on this device.";
    case "NotReadableError":
      return "The camera or microphone is in use by another program.";
  }
  const text = {
    invalid_token: `The access token is invalid (${err.message}). Check the token, or get a new one.`,
    token_expired: "The access token has expired: get a new one.",
    wrong_room: "The token is for another room.",
    room_full: "The room is full: try again later.",
    host_present: "This room already has a host: join as audience, or wait until the host leaves.",
    seats_full: "Every co-host seat is taken.",
    connect_failed: `Cannot reach the server (${wsUrl}).`,
    connection_lost: "The connection to the server was lost.",
    dev_tokens_off: "This server does not mint tokens for the page: paste an access token below.",
    forbidden: `Not allowed: ${err.message}`,
    chat_muted: "The host muted your chat.",
    rate_limited: "Slow down: too many messages.",
    no_host: "The room has no host right now.",
    not_running: "The stream is not running.",
    bad_destination: `The push URL was refused: ${err?.message}`,
  }[code];
  return text || `${code ? code + ": " : ""}${err?.message || err}`;
}

/** Run an action from a button; show its error instead of throwing. */
function act(fn) {
  return async (ev) => {
    ev?.preventDefault?.();
    try {
      showError("");
      await fn(ev);
    } catch (err) {
      showError(describe(err));
    }
  };
}

// ---------------------------------------------------------------- entering

async function initEntry() {
  const q = new URLSearchParams(location.search);
  if (q.get("watch")) return initWatch(q.get("watch"));
  for (const k of ["room", "name"]) if (q.get(k)) $(k).value = q.get(k);
  if (q.get("role") === "audience") $("role-audience").checked = true;
  if (q.get("simulcast") === "0") $("simulcast").checked = false;
  if (q.get("token")) {
    $("token").value = q.get("token");
    $("token-box").open = true;
  }
  if (!$("name").value) $("name").value = `guest-${Math.random().toString(36).slice(2, 6)}`;
  try {
    const r = await fetch(`${base}/v1/dev/token`);
    const enabled = r.ok && (await r.json()).enabled;
    $("dev-hint").textContent = enabled
      ? "Development server: the page gets its token from POST /v1/dev/token."
      : "This server does not hand out tokens: paste an access token above.";
    if (!enabled) $("token-box").open = true;
  } catch {
    $("dev-hint").textContent = "Cannot reach the server.";
  }
}

$("enter-form").addEventListener("submit", act(async () => {
  $("enter").disabled = true;
  try {
    await enter();
  } finally {
    $("enter").disabled = false;
  }
}));

async function enter() {
  const pasted = $("token").value.trim();
  const role = document.querySelector("input[name=role]:checked").value;
  token = pasted || (await devToken(base, $("room").value.trim(), $("name").value.trim(), role));
  client = new CohostClient(wsUrl, token);
  wire(client);
  let joined;
  try {
    joined = await client.connect();
  } catch (err) {
    client = null;
    throw err;
  }
  onJoined(joined);
  $("entry").hidden = true;
  $("app").hidden = false;
  statsTimer = setInterval(renderStats, 2000);
  if (client.me.role === "cohost") await publishMedia(); // a cohost token publishes at once
}

function onJoined(joined) {
  $("chat-log").replaceChildren();
  for (const m of joined.history || []) addMessage(m, $("chat-log"));
  pkHost = null;
  renderRole();
  renderMembers();
  if (client.me.role === "host") refreshBridge();
}

// ---------------------------------------------------------------- client events

function wire(c) {
  c.addEventListener("state", (e) => {
    const { state, attempt, delayMs } = e.detail;
    const pill = $("state");
    pill.dataset.state = state;
    pill.textContent = {
      connecting: "connecting…",
      connected: `connected · ${c.room || ""}`,
      reconnecting: `connection lost · retrying in ${Math.round((delayMs || 0) / 100) / 10} s (attempt ${attempt})`,
      closed: "disconnected",
    }[state] || state;
    if (state === "reconnecting") showError(`Connection lost. Retrying in ${Math.round(delayMs / 100) / 10} s (attempt ${attempt})…`);
  });
  c.addEventListener("closed", (e) => {
    const { code, retry } = e.detail;
    remote.clear();
    if (retry) return renderTiles();
    if (c !== client) return; // a failed join: enter() shows its error
    if (code !== 1000) showError(CLOSE_TEXT[code] || `Disconnected (${code}${e.detail.reason ? ": " + e.detail.reason : ""}).`);
    teardown(); // back to the entry form; the error stays up
  });
  c.addEventListener("reconnected", act(async (e) => {
    showError("");
    showNotice("Reconnected.");
    onJoined(e.detail.joined);
    if (localStream && (wantLive || c.me.role === "cohost") && c.me.role !== "audience") {
      await c.publish(localStream, { simulcast: $("simulcast").checked });
      await keepResolution(c);
      if (wantLive) {
        awaitingStart = true;
        scheduleFallbackStart();
      }
    }
    renderMedia();
  }));
  c.addEventListener("track", (e) => {
    const { stream, participantId } = e.detail;
    remote.set(participantId, stream);
    stream.onremovetrack = () => renderTiles();
    renderTiles();
  });
  c.addEventListener("roster", () => {
    renderMembers();
    renderTiles();
    audienceView?.refreshText();
  });
  c.addEventListener("role", act(async (e) => {
    const role = e.detail.role;
    if (role === "cohost") {
      showNotice("You are a co-host now: going live with camera and microphone.");
      renderRole();
      await publishMedia();
    } else if (role === "audience") {
      stopLocal();
      showNotice("You are back in the audience: watching the mixed stream.");
      renderRole();
    }
  }));
  c.addEventListener("cohost_request", (e) => {
    requests.set(e.detail.participant_id, e.detail.identity);
    renderRequests();
  });
  c.addEventListener("cohost_request_ended", (e) => {
    const { participant_id, outcome } = e.detail;
    requests.delete(participant_id);
    renderRequests();
    if (participant_id === c.me.id) {
      $("cancel-cohost").hidden = true;
      $("ask-cohost").hidden = false;
      const text = { denied: "The host declined your request.", timed_out: "Your request timed out.", cancelled: "Request cancelled." }[outcome];
      if (text) showNotice(text);
    }
  });
  c.addEventListener("cohost_invite", (e) => {
    const { from } = e.detail;
    $("invites").replaceChildren(el("li", {},
      el("span", { class: "name", textContent: `${from.identity} invites you to co-host` }),
      el("button", { class: "small", textContent: "Accept", onclick: act(() => answerInvite(true)) }),
      el("button", { class: "small secondary", textContent: "Decline", onclick: act(() => answerInvite(false)) })));
  });
  c.addEventListener("cohost_invite_ended", () => $("invites").replaceChildren());
  c.addEventListener("message", (e) => addMessage(e.detail.message, $("chat-log")));
  c.addEventListener("counts", () => renderMembers());
  c.addEventListener("message_deleted", (e) => document.querySelector(`#chat-log [data-id="${e.detail.message_id}"]`)?.remove());
  c.addEventListener("pk_invite", (e) => {
    const { room, from } = e.detail;
    $("pk-invites").append(el("li", { dataset: { room } },
      el("span", { class: "name", textContent: `${from.identity} (room ${room}) invites you to a PK` }),
      el("button", { class: "small", textContent: "Accept", onclick: act(() => pkAnswer(room, true)) }),
      el("button", { class: "small secondary", textContent: "Decline", onclick: act(() => pkAnswer(room, false)) })));
  });
  c.addEventListener("pk_declined", (e) => {
    const { room, outcome } = e.detail;
    const why = { denied: "declined the PK", timed_out: "did not answer in time", gone: "has no host any more" }[outcome] ?? "declined the PK";
    showNotice(`Room ${room} ${why}.`);
  });
  c.addEventListener("pk_invite_ended", (e) => {
    document.querySelector(`#pk-invites [data-room="${CSS.escape(e.detail.room)}"]`)?.remove();
    showNotice(e.detail.outcome === "gone" ? `Room ${e.detail.room} withdrew its PK invitation.` : `The PK invitation from room ${e.detail.room} expired.`);
  });
  c.addEventListener("pk_started", (e) => {
    pkHost = { ...e.detail.host, room: e.detail.room };
    showNotice(`PK with ${e.detail.host.identity} (room ${e.detail.room}) started.`);
    $("pk-end").hidden = false;
    $("pk-invites").replaceChildren();
    renderTiles();
  });
  c.addEventListener("pk_ended", (e) => {
    if (pkHost) remote.delete(pkHost.participant_id);
    pkHost = null;
    showNotice(`PK with room ${e.detail.room} ended.`);
    $("pk-end").hidden = true;
    renderTiles();
  });
  c.addEventListener("track_unpublished", (e) => {
    if (pkHost && e.detail.participant_id === pkHost.participant_id) renderTiles();
  });
  c.addEventListener("error", (e) => showError(describe(e.detail.error)));
}

// ---------------------------------------------------------------- roles and media

function renderRole() {
  const role = client.me.role;
  $("who").textContent = `${client.me.identity} · ${role} · room ${client.room}`;
  $("host-panel").hidden = role !== "host";
  $("media-panel").hidden = role === "audience";
  $("audience-panel").hidden = role !== "audience";
  $("cohost-panel").hidden = role !== "cohost";
  $("reactions").hidden = role === "host"; // likes and gifts are for the audience and co-hosts
  $("ask-cohost").hidden = false;
  $("cancel-cohost").hidden = true;
  $("invites").replaceChildren();
  $("stream-url").textContent = streamUrl(client.room);
  $("watch-link").href = `?watch=${encodeURIComponent(client.room)}`;
  if (role === "audience") {
    $("flv-box").hidden = false;
    audienceView ??= new FlvView($("flv"), $("flv-status"), { url: streamUrl(client.room), waiting: audienceWaiting });
    audienceView.start();
  } else {
    audienceView?.stop();
    audienceView = null;
    $("flv-box").hidden = true;
  }
  renderTiles();
  renderMedia();
  renderLive();
}

function streamUrl(room) {
  return `${base}/live/${encodeURIComponent(room)}.flv`;
}

/** Why the audience's player has nothing to play yet (it never played in this visit). */
function audienceWaiting() {
  const host = client && [...client.participants.values()].find((p) => p.role === "host");
  if (!host) return "The room has no host right now. The stream plays here when a host goes live.";
  if (host.tracks.size > 0) return "The host is going live: the stream starts in a moment…";
  return "The host is not live right now. The stream plays here when they go live.";
}

function videoConstraints() {
  const id = $("camera").value;
  const [width, height] = $("resolution").value.split("x").map(Number);
  return { width: { ideal: width }, height: { ideal: height }, ...(id ? { deviceId: { exact: id } } : {}) };
}
function audioConstraints() {
  const id = $("microphone").value;
  return id ? { deviceId: { exact: id } } : true;
}

/** Open the chosen camera and microphone (the preview) unless they are open already. */
async function openMedia() {
  if (localStream) return;
  localStream = await navigator.mediaDevices.getUserMedia({ audio: audioConstraints(), video: videoConstraints() });
  setMicMuted(micMuted);
  renderTiles();
  renderMedia();
  await fillDevices().catch(() => {});
}

/** Publish the camera and microphone (host going live, or a co-host taking the seat). */
async function publishMedia() {
  await openMedia();
  await client.publish(localStream, { simulcast: $("simulcast").checked });
  await keepResolution(client);
  renderTiles();
  renderMedia();
}

/** The host's one step: camera and microphone published; the stream for viewers follows. */
async function goLive() {
  $("go-live").disabled = true;
  try {
    await publishMedia();
    wantLive = true;
    awaitingStart = true;
    liveSince = null;
    showError("");
    scheduleFallbackStart();
    renderLive();
    await refreshBridge();
  } finally {
    $("go-live").disabled = false;
  }
}

/** A server without bridge.auto_start: start the stream after a few seconds without it. */
function scheduleFallbackStart() {
  clearTimeout(fallbackTimer);
  fallbackTimer = setTimeout(act(async () => {
    // After a reconnect the "reconnected" handler schedules this again.
    if (!wantLive || !awaitingStart || !client || client.me.role !== "host" || client.state !== "connected") return;
    const now = await fetchBridge();
    if (now.running || !wantLive) return refreshBridge();
    try {
      await client.startBridge({ layout: layoutValue(), destinations: pendingDests.splice(0) });
    } catch (err) {
      if (err.code !== "already_running") throw err;
    }
    await refreshBridge();
  }), AUTO_START_WAIT_MS);
}

/** End live: the stream stops first (viewers read that the live ended, not a "host away"
 * slate), then the page leaves the room cleanly (`leave`), which unpublishes the camera and
 * microphone. Protocol v1 has no message to unpublish and stay: a closed publisher connection
 * counts as a failed one (close 4008), so the host does not stay in the room as not-live. */
async function endLive() {
  const c = client;
  const duration = liveSince !== null ? clock(Date.now() - liveSince) : null;
  clearTimeout(fallbackTimer);
  try {
    await c.stopBridge();
  } catch (err) {
    if (err.code !== "not_running") {
      // The signaling request failed (a lost connection, a timeout): the REST API then.
      const r = await fetch(`${base}/v1/rooms/${encodeURIComponent(c.room)}/bridge`, {
        method: "DELETE",
        headers: { Authorization: `Bearer ${token}` },
      }).catch(() => null);
      if (!r || (!r.ok && r.status !== 404)) throw err; // still live: the host can try again
    }
  }
  wantLive = false;
  teardown();
  await c.leave();
  showNotice(`You ended the live${duration ? ` after ${duration}` : ""} and left the room; viewers see that the live ended. Enter again to go live again.`);
}

function setMicMuted(muted) {
  micMuted = muted;
  // Disabled, not unpublished: the track stays published and sends silence.
  for (const t of localStream?.getAudioTracks() || []) t.enabled = !muted;
  $("mute-mic").textContent = muted ? "Unmute mic" : "Mute mic";
  $("mute-mic").setAttribute("aria-pressed", String(muted));
  renderTiles();
}

/** The camera and microphone lists (names appear once the browser was allowed to use them). */
async function fillDevices() {
  if (!navigator.mediaDevices?.enumerateDevices) return;
  const devices = await navigator.mediaDevices.enumerateDevices();
  for (const [sel, kind, trackKind, fallback] of [
    [$("camera"), "videoinput", "video", "default camera"],
    [$("microphone"), "audioinput", "audio", "default microphone"],
  ]) {
    const inUse = localStream?.getTracks().find((t) => t.kind === trackKind)?.getSettings().deviceId;
    const want = sel.value || inUse || "";
    const list = devices.filter((d) => d.kind === kind && d.deviceId);
    sel.replaceChildren(el("option", { value: "", textContent: fallback }),
      ...list.map((d, i) => el("option", { value: d.deviceId, textContent: d.label || `${fallback.split(" ")[1]} ${i + 1}` })));
    sel.value = list.some((d) => d.deviceId === want) ? want : "";
  }
}

/** A camera or microphone chosen while the preview runs (or while live): swap the track in
 * place; a published sender gets the new track without renegotiating. */
async function switchDevice(kind) {
  if (!localStream) return; // used by the next preview or "Go live"
  const got = await navigator.mediaDevices.getUserMedia(kind === "video" ? { video: videoConstraints() } : { audio: audioConstraints() });
  const track = got.getTracks()[0];
  if (kind === "audio") track.enabled = !micMuted;
  const sender = client?.pub?.getSenders().find((s) => s.track?.kind === kind);
  if (sender) await sender.replaceTrack(track);
  const keep = localStream.getTracks().filter((t) => t.kind !== kind);
  localStream.getTracks().filter((t) => t.kind === kind).forEach((t) => t.stop());
  localStream = new MediaStream([...keep, track]);
  if (client?.localStream) client.localStream = localStream;
  renderTiles();
}

/** Ask the browser to lower the frame rate rather than the picture size when bandwidth or CPU
 * is short: the bridge passes a solo host's own H.264 through only at the stream's size, and a
 * scaled-down sender forces mixing (docs/api.md, Passthrough). */
async function keepResolution(c) {
  const sender = c.pub?.getSenders().find((s) => s.track?.kind === "video");
  if (!sender) return;
  try {
    const params = sender.getParameters();
    params.degradationPreference = "maintain-resolution";
    await sender.setParameters(params);
  } catch (err) {
    console.warn("cannot set degradationPreference", err);
  }
}

function stopLocal() {
  client?.unpublish();
  localStream?.getTracks().forEach((t) => t.stop());
  localStream = null;
  micMuted = false;
  setMicMuted(false);
  renderTiles();
  renderMedia();
}

/** The camera/microphone controls: preview before publishing, mute while publishing. */
function renderMedia() {
  const published = !!client?.pub;
  $("preview").hidden = published;
  $("preview").textContent = localStream ? "Stop preview" : "Preview camera";
  $("mute-mic").hidden = !localStream;
  // The layers are negotiated when publishing, for the camera size of that moment.
  $("resolution").disabled = published;
  $("simulcast").disabled = published;
}

/** The LIVE badge, the Go live / End live buttons and the line next to them. */
function renderLive() {
  const host = client?.me?.role === "host" && client.state !== "closed";
  const badge = $("live-badge");
  badge.hidden = !host || !wantLive;
  let line = localStream ? "Preview: only you see this." : "Not live.";
  if (wantLive) {
    if (bridgeStatus && liveSince !== null) {
      badge.dataset.state = "live";
      badge.textContent = `LIVE ${clock(Date.now() - liveSince)}`;
      line = "You are live.";
    } else if (liveSince !== null && !awaitingStart) {
      badge.dataset.state = "stopped";
      badge.textContent = "STREAM STOPPED";
      line = "The stream for viewers stopped.";
    } else {
      badge.dataset.state = "starting";
      badge.textContent = "STARTING…";
      line = "Starting the stream…";
    }
  } else {
    badge.dataset.state = "off";
  }
  $("live-state").textContent = line;
  if (!monitor?.player && !monitor?.retryTimer) $("monitor-overlay").textContent = wantLive ? "the stream is starting…" : "not live";
  $("go-live").hidden = wantLive;
  $("end-live").hidden = !wantLive;
  clearInterval(badgeTimer);
  badgeTimer = host && wantLive ? setInterval(renderLive, 500) : null;
}

/** 83 s -> "01:23", 3723 s -> "1:02:03". */
function clock(ms) {
  const t = Math.max(0, Math.floor(ms / 1000));
  const two = (n) => String(n).padStart(2, "0");
  const h = Math.floor(t / 3600);
  return h ? `${h}:${two(Math.floor(t / 60) % 60)}:${two(t % 60)}` : `${two(Math.floor(t / 60))}:${two(t % 60)}`;
}

/** Video tiles: shown to the host and co-hosts (real-time); the audience watches the FLV. */
function renderTiles() {
  const box = $("tiles");
  const live = client && client.me && client.me.role !== "audience" && client.state !== "closed";
  const want = new Map();
  if (live && localStream) {
    const label = `${client.me.identity} (you)${client.pub ? "" : " · preview, not live"}`;
    want.set("local", { stream: localStream, label, muted: true, flags: micMuted ? "mic muted" : "" });
  }
  if (live) {
    for (const p of client.participants.values()) {
      if (p.id === client.me.id || !remote.has(p.id) || p.tracks.size === 0) continue;
      const off = [...p.tracks.values()].filter((t) => t.muted).map((t) => (t.kind === "audio" ? "mic muted" : "camera muted"));
      if ([...p.tracks.values()].some((t) => t.stalled && !t.muted)) off.push("reconnecting…");
      want.set(p.id, { stream: remote.get(p.id), label: `${p.identity} · ${p.role}`, muted: false, flags: off.join(", ") });
    }
    if (pkHost && remote.has(pkHost.participant_id)) {
      want.set(pkHost.participant_id, { stream: remote.get(pkHost.participant_id), label: `${pkHost.identity} · PK (room ${pkHost.room})`, muted: false, flags: "" });
    }
  }
  for (const [id, t] of tiles) {
    if (!want.has(id)) {
      tileSizes.unobserve(t.querySelector("video"));
      clearTimeout(t.qualityTimer);
      t.remove();
      tiles.delete(id);
    }
  }
  $("stage-empty").hidden = want.size > 0 || client?.me?.role === "audience";
  for (const [id, w] of want) {
    let t = tiles.get(id);
    if (!t) {
      const v = el("video", { autoplay: true, playsInline: true, muted: w.muted });
      t = el("div", { class: "tile", dataset: { participant: id } }, v, el("span", { class: "label" }), el("span", { class: "muted", hidden: true }));
      tiles.set(id, t);
      box.append(t);
      if (id !== "local") {
        tileSizes.observe(v);
        v.addEventListener("resize", () => renderTileSize(t));
      }
    }
    const v = t.querySelector("video");
    if (v.srcObject !== w.stream) v.srcObject = w.stream;
    t.querySelector(".label").textContent = w.label;
    t.querySelector(".muted").textContent = w.flags;
    t.querySelector(".muted").hidden = !w.flags;
    if (id !== "local") scheduleQuality(t);
  }
}

// ---------------------------------------------------------------- simulcast: a layer per tile

/** Quiet time after a tile's last size change before the page asks for a layer. */
const QUALITY_DEBOUNCE_MS = 300;

/** Remote tiles whose size changed: ask again for the layer that fits (debounced). */
const tileSizes = new ResizeObserver((entries) => {
  for (const e of entries) {
    const t = e.target.closest(".tile");
    if (!t) continue;
    // Device pixels where the browser reports them (exact), else CSS pixels x devicePixelRatio.
    const dp = e.devicePixelContentBoxSize?.[0];
    t.shown = dp
      ? { w: dp.inlineSize, h: dp.blockSize }
      : { w: e.contentRect.width * devicePixelRatio, h: e.contentRect.height * devicePixelRatio };
    scheduleQuality(t);
  }
});

function scheduleQuality(t, delayMs = QUALITY_DEBOUNCE_MS) {
  clearTimeout(t.qualityTimer);
  t.qualityTimer = setTimeout(() => requestQuality(t).catch((err) => console.warn("set_track_quality", err)), delayMs);
}

/**
 * Ask for the layer of the participant's simulcast video that covers the tile at its size in
 * device pixels. The tiles crop the picture to fill (object-fit: cover), so a layer covers the
 * tile exactly when it is at least the tile's width and height, which is the server's rule
 * for `max_width`/`max_height`. Asked again only when the track or the size changes.
 */
async function requestQuality(t) {
  const c = client;
  const p = c?.participants.get(t.dataset.participant);
  const track = p && [...p.tracks.values()].find((x) => x.kind === "video" && x.layers?.length > 1);
  if (!track || !t.shown || t.shown.w < 1 || t.shown.h < 1 || !t.isConnected) return;
  const want = { trackId: track.id, maxWidth: Math.round(t.shown.w), maxHeight: Math.round(t.shown.h) };
  const key = JSON.stringify(want);
  if (t.qualityAsked === key) return;
  t.qualityAsked = key;
  try {
    t.layer = await c.setTrackQuality(track.id, want);
    t.qualityRetries = 0;
  } catch (err) {
    t.qualityAsked = null;
    // A track announced before our subscription to it exists: try again shortly.
    if (err.code === "unknown_track" && (t.qualityRetries = (t.qualityRetries || 0) + 1) <= 5) scheduleQuality(t, 1000);
    else throw err;
    return;
  }
  renderTileSize(t);
}

/** The tile's received picture size and simulcast layer, in its label's tooltip and dataset. */
function renderTileSize(t) {
  const v = t.querySelector("video");
  const size = v.videoWidth ? `${v.videoWidth}x${v.videoHeight}` : "";
  t.dataset.received = size;
  if (t.layer) t.dataset.layer = t.layer;
  t.querySelector(".label").title = `receiving ${size || "nothing yet"}${t.layer ? `, layer ${t.layer}` : ""}`;
}

// ---------------------------------------------------------------- HTTP-FLV players

const ENDED_TEXT = "The live ended. The player starts again if the host goes live again.";

/**
 * A player of a room's mixed stream from the embedded origin (HTTP-FLV through mpegts.js), as a
 * CDN viewer sees it: the audience's player, the host's small "what viewers get" player and the
 * `?watch=ROOM` view. It retries while the stream is absent and tells a stream that has not
 * started (`waiting()`) from one that ended after this player played it.
 */
class FlvView {
  constructor(video, status, { url, waiting }) {
    this.video = video;
    this.status = status;
    this.url = url;
    this.waiting = waiting;
    this.player = null;
    this.retryTimer = null;
    this.watchTimer = null;
    this.played = false; // played something since start()
    this.state = "idle"; // connecting | waiting | playing | ended | error
  }

  say(state, text) {
    this.state = state;
    this.status.dataset.state = state;
    this.status.textContent = text;
    this.status.hidden = state === "playing";
  }

  /** The waiting text follows the room (the host arrives, publishes, ...). */
  refreshText() {
    if (this.state === "waiting") this.say("waiting", this.waiting());
  }

  start() {
    if (this.player || this.retryTimer) return;
    const mpegts = window.mpegts;
    if (!mpegts) return this.say("error", "mpegts.js is missing on the server: run `npm ci --prefix web`.");
    if (!mpegts.getFeatureList().mseLivePlayback) return this.say("error", "This browser cannot play HTTP-FLV (no Media Source Extensions).");
    if (this.state === "idle") this.say("connecting", "connecting to the stream…");
    const video = this.video;
    const player = mpegts.createPlayer(
      { type: "flv", isLive: true, url: this.url },
      { enableWorker: false, liveBufferLatencyChasing: true, liveBufferLatencyMaxLatency: 3, liveBufferLatencyMinRemain: 0.5 },
    );
    this.player = player;
    player.attachMediaElement(video);
    player.on(mpegts.Events.ERROR, (type, detail, info) => {
      if (info && info.code === 404) {
        // No stream: it ended (this player had it) or has not started.
        if (this.played) this.retry("ended", ENDED_TEXT);
        else this.retry("waiting", this.waiting());
      } else {
        this.retry("error", `Stream error (${detail}). Retrying…`);
      }
    });
    // The origin closed the stream: ask again at once; a 404 then says it ended.
    player.on(mpegts.Events.LOADING_COMPLETE, () => this.retry("connecting", "The stream stopped. Checking…", 300));
    video.onplaying = () => {
      this.played = true;
      this.say("playing", "");
    };
    // A live stream whose time stops (the origin went quiet, a network stall) gets a new player,
    // as CDN players do; a pause by the person is left alone.
    let lastTime = -1;
    let still = 0;
    this.watchTimer = setInterval(() => {
      if (video.paused && video.currentTime > 0) return;
      still = video.currentTime === lastTime ? still + 1 : 0;
      lastTime = video.currentTime;
      if (still >= 4) this.retry("connecting", "The stream stalled. Reconnecting…");
    }, 2000);
    player.load();
    video.play().catch(() => {
      // Autoplay with sound refused: play muted, the person can unmute with the controls.
      video.muted = true;
      video.play().catch(() => {});
    });
  }

  retry(state, text, delayMs = 2000) {
    this.close();
    this.say(state, text);
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      this.start();
    }, delayMs);
  }

  close() {
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    clearInterval(this.watchTimer);
    this.watchTimer = null;
    if (this.player) {
      try {
        this.player.destroy();
      } catch {
        // already torn down
      }
      this.player = null;
    }
  }

  /** Stop playing; the next start() is a new visit. */
  stop() {
    this.close();
    this.played = false;
    this.say("idle", "not playing");
  }

  /** Seconds of media buffered ahead of the playing position (the player's own delay). */
  bufferedAhead() {
    const b = this.video.buffered;
    return b.length ? Math.max(0, b.end(b.length - 1) - this.video.currentTime) : null;
  }
}

// ---------------------------------------------------------------- ?watch=ROOM: a viewer without a token

function initWatch(room) {
  $("entry").hidden = true;
  $("watch").hidden = false;
  $("state").hidden = true;
  document.title = `${room} · cohost`;
  $("watch-title").textContent = `Room ${room}`;
  $("watch-url").textContent = streamUrl(room);
  $("watch-enter").href = `./?room=${encodeURIComponent(room)}&role=audience`;
  watchView = new FlvView($("watch-video"), $("watch-status"), {
    url: streamUrl(room),
    waiting: () => "The room is not live right now. The stream plays here when it goes live.",
  });
  watchView.start();
  followMessages(room);
}

let watchView = null;

/** The room's messages for viewers without a connection: the public long-poll feed. */
async function followMessages(room) {
  const log = $("watch-log");
  let since = 0;
  let gone = false;
  for (;;) {
    try {
      const r = await fetch(`${base}/v1/rooms/${encodeURIComponent(room)}/messages?since=${since}&wait=25`);
      if (r.status === 404) {
        // No such room (yet, or any more): a room of that name later starts counting afresh.
        gone = true;
        since = 0;
        await new Promise((res) => setTimeout(res, 3000));
        continue;
      }
      if (!r.ok) throw new Error(String(r.status));
      const body = await r.json();
      if (gone) log.replaceChildren();
      gone = false;
      for (const m of body.messages || []) addMessage(m, log);
      if (typeof body.next === "number") since = body.next;
    } catch {
      await new Promise((res) => setTimeout(res, 3000));
    }
  }
}

// ---------------------------------------------------------------- host: requests, members, bridge, PK

function renderRequests() {
  const ul = $("requests");
  ul.replaceChildren();
  if (requests.size === 0) ul.append(el("li", { class: "empty", textContent: "none" }));
  for (const [pid, identity] of requests) {
    ul.append(el("li", { dataset: { participant: pid } },
      el("span", { class: "name", textContent: `${identity} asks to co-host` }),
      el("button", { class: "small approve", textContent: "Approve", onclick: act(() => client.answerCohostRequest(pid, true)) }),
      el("button", { class: "small secondary deny", textContent: "Deny", onclick: act(() => client.answerCohostRequest(pid, false)) })));
  }
}

function renderMembers() {
  if (!client?.me) return;
  const ul = $("members");
  ul.replaceChildren();
  const host = client.me.role === "host";
  const members = [...client.participants.values()];
  // The audience is not listed to the audience: the server's counts say how many are here.
  const n = client.counts;
  $("member-count").textContent = n
    ? `(${n.members} in the room, ${n.participants} on stage)`
    : `(${members.length})`;
  for (const p of members) {
    const li = el("li", { dataset: { participant: p.id, identity: p.identity } },
      el("span", { class: "name", textContent: p.identity + (p.id === client.me.id ? " (you)" : "") }),
      el("span", { class: `role ${p.role}`, textContent: p.role }));
    if (host && p.id !== client.me.id) {
      const muted = (kind) => [...p.tracks.values()].some((t) => t.kind === kind && t.muted);
      if (p.role === "cohost") {
        for (const kind of ["audio", "video"]) {
          const m = muted(kind);
          li.append(el("button", {
            class: `small secondary mute-${kind}`,
            textContent: `${m ? "Unmute" : "Mute"} ${kind === "audio" ? "mic" : "camera"}`,
            onclick: act(() => client.muteTrack(p.id, kind, !m)),
          }));
        }
        li.append(el("button", { class: "small secondary remove", textContent: "Remove", onclick: act(() => client.removeCohost(p.id)) }));
      } else if (p.role === "audience") {
        li.append(el("button", { class: "small secondary invite", textContent: "Invite", onclick: act(() => client.inviteCohost(p.id)) }));
      }
      li.append(el("button", { class: "small secondary kick", textContent: "Kick", onclick: act(() => client.kick(p.id)) }));
    }
    ul.append(li);
  }
}

async function answerInvite(accept) {
  $("invites").replaceChildren();
  await client.answerCohostInvite(accept);
}

async function pkAnswer(room, accept) {
  document.querySelector(`#pk-invites [data-room="${room}"]`)?.remove();
  await client.pkAnswer(room, accept);
}

function layoutValue() {
  return $("layout").value || null;
}

/** The room's stream (the bridge) from the REST API, which the host's token may read:
 * {running, status}; `running` is null when the server could not be asked. */
async function fetchBridge() {
  try {
    const r = await fetch(`${base}/v1/rooms/${encodeURIComponent(client.room)}/bridge`, {
      headers: { Authorization: `Bearer ${token}` },
    });
    if (r.ok) return { running: true, status: await r.json() };
    if (r.status === 404) return { running: false, status: null };
  } catch {
    // Server unreachable: the connection state pill says so.
  }
  return { running: null, status: null };
}

/** Players of the room's stream on the server's own origin (HTTP-FLV/RTMP), from the room
 * view the host's token may read; null when unknown. */
let viewerCount = null;
async function fetchViewers() {
  try {
    const r = await fetch(`${base}/v1/rooms/${encodeURIComponent(client.room)}`, {
      headers: { Authorization: `Bearer ${token}` },
    });
    if (!r.ok) return null;
    return (await r.json()).counts?.viewers ?? null;
  } catch {
    return null;
  }
}

/** Follow the room's stream: every second while live, every few seconds otherwise. */
async function refreshBridge() {
  clearTimeout(bridgeTimer);
  const gen = ++bridgeGen;
  if (!client || client.me?.role !== "host" || client.state === "closed") return;
  const c = client;
  const { running, status } = await fetchBridge();
  if (status) viewerCount = await fetchViewers();
  if (gen !== bridgeGen || c !== client) return; // a newer call or another visit took over
  if (running !== null) await onBridge(status);
  if (gen !== bridgeGen || c !== client) return;
  bridgeTimer = setTimeout(refreshBridge, wantLive || bridgeStatus ? 1000 : 3000);
}

async function onBridge(status) {
  bridgeStatus = status;
  if (status && wantLive && awaitingStart) {
    awaitingStart = false;
    clearTimeout(fallbackTimer);
    if (liveSince === null) liveSince = Date.now();
    await applyPending(status).catch((err) => showError(describe(err)));
  } else if (!status && wantLive && !awaitingStart && liveSince !== null && !stoppedWarned) {
    stoppedWarned = true;
    showError("The stream for viewers stopped (the server or an operator stopped it). Press \"End live\", then \"Go live\" to start again.");
  }
  if (status) stoppedWarned = false;
  if (status && wantLive) startMonitor();
  else if (!status) stopMonitor();
  renderBridge(status);
  renderLive();
}

/** A layout or pushes chosen before the stream ran, applied once it runs. */
async function applyPending(status) {
  const want = layoutValue();
  if (want !== null && want !== (status.layout ?? null)) {
    layoutBusy = true;
    try {
      await client.setLayout(want);
      status.layout = want;
    } finally {
      layoutBusy = false;
    }
  }
  if (pendingDests.length) await patchBridge({ add_destinations: pendingDests.splice(0) });
}

/** PATCH /v1/rooms/{room}/bridge with the host's token (adds pushes to a running stream). */
async function patchBridge(body) {
  const r = await fetch(`${base}/v1/rooms/${encodeURIComponent(client.room)}/bridge`, {
    method: "PATCH",
    headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  if (!r.ok) {
    const e = (await r.json().catch(() => ({}))).error || {};
    throw new CohostError(e.code || `http_${r.status}`, e.message || r.statusText);
  }
}

const PATH_TEXT = {
  starting: "waiting for your first keyframe",
  passthrough: "your own video passed through (no re-encoding)",
};

function renderBridge(status) {
  const running = !!status;
  const table = $("bridge-status");
  table.hidden = !running || status.destinations.length === 0;
  const body = table.querySelector("tbody");
  body.replaceChildren();
  for (const d of status?.destinations || []) {
    body.append(el("tr", { class: `dest ${d.state}` },
      el("td", { textContent: d.url }), el("td", { class: "dest-state", textContent: d.state }),
      el("td", { textContent: String(d.retries) }), el("td", { textContent: `${Math.round(d.bytes_sent / 1024)} KiB` }),
      el("td", { textContent: d.last_error || "" })));
  }
  // The selector shows the running stream's layout (unless the person is changing it).
  if (running && !layoutBusy) $("layout").value = status.layout ?? "";
  if (!running) {
    $("bridge-summary").textContent = wantLive ? "Starting the stream for viewers…" : "No stream for viewers (not live).";
    return;
  }
  const st = status.stats;
  // The output size is the host's, known once the stream started (stats.width/height).
  const size = st.width && st.height ? `${st.width}x${st.height} @ ` : "";
  const path = PATH_TEXT[st.path] || (st.path === "mixing" ? `mixing (${st.mix_reason || "?"})` : st.path || "");
  const parts = [
    `Stream running: ${size}${status.config.fps} fps`,
    `layout ${status.layout || "auto"}`,
    // stats.inputs: the tracks the bridge takes in now (it goes down when a co-host leaves).
    `${st.inputs} input track${st.inputs === 1 ? "" : "s"} now`,
    path,
  ];
  if (st.latency_ms_p50 != null) parts.push(`mixing delay ${Math.round(st.latency_ms_p50)} ms`);
  if (viewerCount != null) parts.push(`${viewerCount} watching the stream from this server`);
  $("bridge-summary").textContent = parts.filter(Boolean).join(" · ");
}

/** The host's small player of what viewers get, with how far behind it plays. */
function startMonitor() {
  if (!monitor) {
    monitor = new FlvView($("monitor"), $("monitor-overlay"), {
      url: streamUrl(client.room),
      waiting: () => "the stream is starting…",
    });
  }
  if (monitor.player || monitor.retryTimer) return;
  monitor.start();
  clearInterval(monitorTimer);
  monitorTimer = setInterval(renderMonitorLatency, 1000);
}

function stopMonitor() {
  clearInterval(monitorTimer);
  monitorTimer = null;
  if (monitor) {
    monitor.stop();
    monitor.say("idle", "not live");
  }
  $("monitor-latency").textContent = "";
}

function renderMonitorLatency() {
  const buf = monitor?.state === "playing" ? monitor.bufferedAhead() : null;
  if (buf === null) {
    $("monitor-latency").textContent = "";
    return;
  }
  const mixMs = bridgeStatus?.stats?.latency_ms_p50;
  const total = buf + (mixMs != null ? mixMs / 1000 : 0);
  $("monitor-latency").textContent = `Viewers here are about ${total.toFixed(1)} s behind you (player buffer ${buf.toFixed(1)} s` +
    (mixMs != null ? ` + mixing ${Math.round(mixMs)} ms` : "") + "); a CDN adds its own delay.";
}

$("go-live").addEventListener("click", act(goLive));
$("end-live").addEventListener("click", act(endLive));
$("preview").addEventListener("click", act(async () => {
  if (localStream && !client?.pub) stopLocal();
  else await openMedia();
}));
$("mute-mic").addEventListener("click", act(async () => setMicMuted(!micMuted)));
$("camera").addEventListener("change", act(() => switchDevice("video")));
$("resolution").addEventListener("change", act(() => switchDevice("video")));
$("microphone").addEventListener("change", act(() => switchDevice("audio")));
$("copy-url").addEventListener("click", act(async () => {
  await navigator.clipboard.writeText($("stream-url").textContent);
  showNotice("Stream URL copied.");
}));
$("bridge-add").addEventListener("click", act(async () => {
  const dest = $("bridge-dest").value.trim();
  if (!dest) throw new Error("Enter an rtmp:// push URL.");
  if (bridgeStatus) {
    await patchBridge({ add_destinations: [dest] });
    showNotice("Push added.");
  } else {
    pendingDests.push(dest);
    showNotice("The push starts with the stream.");
  }
  $("bridge-dest").value = "";
  await refreshBridge();
}));
$("layout").addEventListener("change", act(async () => {
  if (!bridgeStatus) return; // applied when the stream starts
  layoutBusy = true;
  try {
    await client.setLayout(layoutValue());
  } finally {
    layoutBusy = false;
  }
  await refreshBridge();
}));
$("pk-invite").addEventListener("click", act(async () => {
  const room = $("pk-room").value.trim();
  if (!room) throw new Error("Enter the other room's name.");
  await client.pkInvite(room);
  showNotice(`PK invitation sent to room ${room}.`);
}));
$("pk-end").addEventListener("click", act(() => client.pkEnd()));

// ---------------------------------------------------------------- audience and co-host buttons

$("ask-cohost").addEventListener("click", act(async () => {
  await client.requestCohost();
  $("ask-cohost").hidden = true;
  $("cancel-cohost").hidden = false;
  showNotice("Request sent: waiting for the host.");
}));
$("cancel-cohost").addEventListener("click", act(() => client.cancelCohostRequest()));
$("leave-seat").addEventListener("click", act(() => client.leaveSeat()));
$("like").addEventListener("click", act(() => client.like(1)));
for (const id of ["gift-rose", "gift-rocket"]) $(id).addEventListener("click", act(() => client.gift($(id).dataset.gift, 1)));
$("leave").addEventListener("click", act(async () => {
  if (wantLive) return endLive(); // leaving while live ends the live properly
  const c = client;
  teardown();
  await c?.leave();
}));

/** Leave the room view: stop media, timers and the player, show the entry form. */
function teardown() {
  clearInterval(statsTimer);
  clearTimeout(bridgeTimer);
  clearTimeout(fallbackTimer);
  bridgeGen += 1;
  audienceView?.stop();
  audienceView = null;
  $("flv-box").hidden = true;
  stopMonitor();
  monitor = null;
  wantLive = false;
  awaitingStart = false;
  liveSince = null;
  bridgeStatus = null;
  pendingDests.length = 0;
  stopLocal();
  remote.clear();
  requests.clear();
  renderRequests();
  pkHost = null;
  client = null;
  renderTiles();
  renderLive();
  $("app").hidden = true;
  $("entry").hidden = false;
}

// ---------------------------------------------------------------- chat and notices

$("chat-form").addEventListener("submit", act(async () => {
  const text = $("chat-input").value.trim();
  if (!text) return;
  await client.chat(text);
  $("chat-input").value = "";
}));

function addMessage(m, log) {
  if (log.querySelector(`[data-id="${m.id}"]`)) return; // history and live events overlap
  const who = m.from ? m.from.identity : "";
  let text;
  switch (m.kind) {
    case "chat": text = m.text; break;
    case "like": text = `sent ${m.count > 1 ? m.count + " likes" : "a like"} ♥`; break;
    case "gift": text = `sent ${m.count} × ${m.gift}`; break;
    case "joined": text = `joined as ${m.role}`; break;
    case "left": text = `left (${m.reason})`; break;
    case "notice": text = m.text; break;
    default: text = JSON.stringify(m);
  }
  const li = el("li", { class: m.kind, dataset: { id: String(m.id) } },
    who ? el("span", { class: "from", textContent: `${who}: ` }) : null,
    el("span", { class: "text", textContent: text }));
  if (log.id === "chat-log" && client?.me?.role === "host" && m.kind === "chat") {
    li.append(" ", el("button", { class: "small secondary", textContent: "×", title: "delete", onclick: act(() => client.deleteMessage(m.id)) }));
  }
  log.append(li);
  while (log.children.length > 200) log.firstChild.remove();
  log.scrollTop = log.scrollHeight;
}

// ---------------------------------------------------------------- stats

async function renderStats() {
  if (!client || client.state === "closed") return;
  const rows = await client.stats().catch(() => []);
  const pcs = [["sending", client.pub], ["receiving", client.sub]].filter(([, pc]) => pc);
  $("media-state").textContent = pcs.length ? pcs.map(([n, pc]) => `${n}: ${pc.connectionState}`).join(" · ") : "no media connections";
  const body = $("stats").querySelector("tbody");
  body.replaceChildren();
  const name = (pid) => (pid === client.me?.id ? "me" : client.participants.get(pid)?.identity || (pkHost && pkHost.participant_id === pid ? pkHost.identity : "?"));
  const fmt = (v, unit, digits = 0) => (v === null || v === undefined || Number.isNaN(v) ? "–" : `${v.toFixed(digits)}${unit}`);
  for (const r of rows) {
    body.append(el("tr", {},
      el("td", { textContent: `${r.direction === "send" ? "↑" : "↓"} ${name(r.participantId)} ${r.kind}${r.rid ? ` ${r.rid}` : ""}` }),
      el("td", { textContent: fmt(r.kbps, "") }), el("td", { textContent: fmt(r.lossPct, " %", 1) }),
      el("td", { textContent: fmt(r.rttMs, " ms", 1) })));
  }
  if (rows.length === 0) body.append(el("tr", {}, el("td", { colSpan: 4, textContent: "no media yet" })));
}

// For the browser tests and the curious: the live client and page state.
window.cohostDemo = {
  get client() { return client; },
  get localStream() { return localStream; },
  get audienceView() { return audienceView; },
  get monitor() { return monitor; },
  get watchView() { return watchView; },
  get live() { return { wantLive, awaitingStart, liveSince, micMuted, bridge: bridgeStatus }; },
};

initEntry();
