// The demo page's UI. All protocol work is in cohost-client.js; this file only renders the room
// and turns clicks into client calls.
import { CohostClient, devToken, tokenClaims } from "./cohost-client.js";

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
let localStream = null; // my camera + microphone
let wantLive = false; // host pressed "Go live" (republish after a reconnect)
const remote = new Map(); // participant id -> MediaStream (subscriber connection)
const tiles = new Map(); // participant id or "local" -> tile element
const requests = new Map(); // participant id -> identity (co-host requests, host side)
let pkHost = null; // {participant_id, identity, room} of the partner host during a PK
let flv = null; // mpegts.js player
let flvRetry = null;
let flvWatch = null;
let bridgeTimer = null;
let statsTimer = null;

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
    not_running: "The bridge is not running: start it first.",
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
  for (const k of ["room", "name"]) if (q.get(k)) $(k).value = q.get(k);
  if (q.get("role") === "audience") $("role-audience").checked = true;
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
  if (client.me.role === "cohost") await goLive(); // a cohost token publishes at once
}

function onJoined(joined) {
  $("chat-log").replaceChildren();
  for (const m of joined.history || []) addMessage(m);
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
      await c.publish(localStream);
      await keepResolution(c);
    }
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
  });
  c.addEventListener("role", act(async (e) => {
    const role = e.detail.role;
    if (role === "cohost") {
      showNotice("You are a co-host now: going live with camera and microphone.");
      renderRole();
      await goLive();
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
  c.addEventListener("message", (e) => addMessage(e.detail.message));
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
  $("audience-panel").hidden = role !== "audience";
  $("cohost-panel").hidden = role !== "cohost";
  $("reactions").hidden = role === "host"; // likes and gifts are for the audience and co-hosts
  $("ask-cohost").hidden = false;
  $("cancel-cohost").hidden = true;
  $("invites").replaceChildren();
  $("flv-link").href = `/live/${client.room}.flv`;
  $("flv-link").hidden = role !== "host";
  if (role === "audience") startFlv();
  else stopFlv();
  renderTiles();
}

async function goLive() {
  if (!localStream) {
    localStream = await navigator.mediaDevices.getUserMedia({
      audio: true,
      video: { width: { ideal: 640 }, height: { ideal: 480 } },
    });
  }
  renderTiles();
  await client.publish(localStream);
  await keepResolution(client);
  wantLive = client.me.role === "host";
  $("go-live").hidden = true;
  $("stop-live").hidden = false;
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
  wantLive = false;
  $("go-live").hidden = false;
  $("stop-live").hidden = true;
  renderTiles();
}

/** Video tiles: shown to the host and co-hosts (real-time); the audience watches the FLV. */
function renderTiles() {
  const box = $("tiles");
  const live = client && client.me && client.me.role !== "audience" && client.state !== "closed";
  const want = new Map();
  if (live && localStream) want.set("local", { stream: localStream, label: `${client.me.identity} (you)`, muted: true, flags: "" });
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
    }
    const v = t.querySelector("video");
    if (v.srcObject !== w.stream) v.srcObject = w.stream;
    t.querySelector(".label").textContent = w.label;
    t.querySelector(".muted").textContent = w.flags;
    t.querySelector(".muted").hidden = !w.flags;
  }
}

// ---------------------------------------------------------------- audience: HTTP-FLV

function startFlv() {
  $("flv-box").hidden = false;
  if (flv || flvRetry) return;
  const status = $("flv-status");
  const mpegts = window.mpegts;
  if (!mpegts) {
    status.textContent = "mpegts.js is missing on the server: run `npm ci --prefix web`.";
    return;
  }
  if (!mpegts.getFeatureList().mseLivePlayback) {
    status.textContent = "This browser cannot play HTTP-FLV (no Media Source Extensions).";
    return;
  }
  const video = $("flv");
  status.hidden = false;
  status.textContent = "connecting to the stream…";
  flv = mpegts.createPlayer(
    { type: "flv", isLive: true, url: `${base}/live/${encodeURIComponent(client.room)}.flv` },
    { enableWorker: false, liveBufferLatencyChasing: true, liveBufferLatencyMaxLatency: 3, liveBufferLatencyMinRemain: 0.5 },
  );
  flv.attachMediaElement(video);
  const retry = (text) => {
    stopFlv(false);
    status.hidden = false;
    status.textContent = text;
    flvRetry = setTimeout(() => {
      flvRetry = null;
      if (client?.me?.role === "audience") startFlv();
    }, 2000);
  };
  flv.on(mpegts.Events.ERROR, (type, detail, info) => {
    const notLive = info && info.code === 404;
    retry(notLive ? "The room is not live yet (the host has not started the bridge). Retrying…" : `Stream error (${detail}). Retrying…`);
  });
  flv.on(mpegts.Events.LOADING_COMPLETE, () => retry("The stream ended. Waiting for it to come back…"));
  video.onplaying = () => (status.hidden = true);
  // A live stream whose time stops (the origin went quiet, a network stall) gets a new player,
  // as CDN players do; a pause by the person is left alone.
  let lastTime = -1;
  let still = 0;
  flvWatch = setInterval(() => {
    if (video.paused && video.currentTime > 0) return;
    still = video.currentTime === lastTime ? still + 1 : 0;
    lastTime = video.currentTime;
    if (still >= 4) retry("The stream stalled. Reconnecting…");
  }, 2000);
  flv.load();
  video.play().catch(() => {
    // Autoplay with sound refused: play muted, the person can unmute with the controls.
    video.muted = true;
    video.play().catch(() => {});
  });
}

function stopFlv(hide = true) {
  clearTimeout(flvRetry);
  flvRetry = null;
  clearInterval(flvWatch);
  flvWatch = null;
  if (flv) {
    try {
      flv.destroy();
    } catch {
      // already torn down
    }
    flv = null;
  }
  if (hide) $("flv-box").hidden = true;
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
  $("member-count").textContent = `(${members.length})`;
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

/** Bridge status from the REST API (the host's token may read its room's bridge). */
async function refreshBridge() {
  clearTimeout(bridgeTimer);
  if (!client || client.me.role !== "host" || client.state === "closed") return;
  let status = null;
  try {
    const r = await fetch(`${base}/v1/rooms/${encodeURIComponent(client.room)}/bridge`, {
      headers: { Authorization: `Bearer ${token}` },
    });
    if (r.ok) status = await r.json();
  } catch {
    // Server unreachable: the connection state pill says so.
  }
  renderBridge(status);
  if (status) bridgeTimer = setTimeout(refreshBridge, 2000);
}

function renderBridge(status) {
  const running = !!status;
  $("bridge-start").disabled = running;
  $("bridge-stop").disabled = !running;
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
  $("bridge-summary").textContent = running
    ? `Bridge running: ${status.config.width}x${status.config.height} @ ${status.config.fps} fps, layout ${status.layout || "auto"}, ` +
      `${status.stats.video_frames} frames, ${status.stats.inputs} inputs` +
      (status.stats.latency_ms_p50 != null ? `, latency ${Math.round(status.stats.latency_ms_p50)} ms` : "") +
      `. Viewers: ${status.play.http_flv}`
    : "Bridge stopped.";
}

$("go-live").addEventListener("click", act(goLive));
$("stop-live").addEventListener("click", act(async () => stopLocal()));
$("bridge-start").addEventListener("click", act(async () => {
  const dest = $("bridge-dest").value.trim();
  await client.startBridge({ layout: layoutValue(), destinations: dest ? [dest] : [] });
  showNotice("Bridge started.");
  await refreshBridge();
}));
$("bridge-stop").addEventListener("click", act(async () => {
  await client.stopBridge();
  await refreshBridge();
}));
$("layout").addEventListener("change", act(async () => {
  if ($("bridge-stop").disabled) return; // applied when the bridge starts
  await client.setLayout(layoutValue());
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
  const c = client;
  teardown();
  await c?.leave();
}));

/** Leave the room view: stop media, timers and the player, show the entry form. */
function teardown() {
  clearInterval(statsTimer);
  clearTimeout(bridgeTimer);
  stopFlv();
  stopLocal();
  remote.clear();
  requests.clear();
  renderRequests();
  pkHost = null;
  client = null;
  renderTiles();
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

function addMessage(m) {
  const log = $("chat-log");
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
  if (client?.me?.role === "host" && m.kind === "chat") {
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
      el("td", { textContent: `${r.direction === "send" ? "↑" : "↓"} ${name(r.participantId)} ${r.kind}` }),
      el("td", { textContent: fmt(r.kbps, "") }), el("td", { textContent: fmt(r.lossPct, " %", 1) }),
      el("td", { textContent: fmt(r.rttMs, " ms", 1) })));
  }
  if (rows.length === 0) body.append(el("tr", {}, el("td", { colSpan: 4, textContent: "no media yet" })));
}

// For the browser tests and the curious: the live client and page state.
window.cohostDemo = {
  get client() { return client; },
  get localStream() { return localStream; },
  get flv() { return flv; },
};

initEntry();
