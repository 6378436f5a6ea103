// Passthrough seen by a real viewer: while the host is alone the bridge forwards the host's own
// H.264 into the output FLV, while a co-host is on screen it sends the mix, and it switches at
// IDRs under one AVC sequence header (docs/api.md, Passthrough). A co-host joins and leaves
// twice (at least 3 switches) while a Chromium page plays `/live/{room}.flv` with mpegts.js
// (the demo's player), sampled every 100 ms: the viewer must not see a stall or a freeze.
// Alongside, node reads the same FLV and names each video tag's PPS (0: the host's, 1: the
// bridge encoder's), so the switches are located in the stream itself.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import http from "node:http";
import { tmpdir } from "node:os";
import path from "node:path";
import { startServer, launchBrowser, waitFor } from "./harness.mjs";

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), "..", "..");
const MPEGTS = path.join(root, "web", "node_modules", "mpegts.js", "dist", "mpegts.js");

/** Longest stall / frozen period allowed once playback has started. */
const LIMIT_MS = 300;
/** Start-up allowance: measuring starts once the player has played this much. */
const WARMUP_S = 1;

/** The co-host's fake camera: solid blue (the host is Chromium's green test pattern). */
function blueCamera(dir) {
  const file = path.join(dir, "blue.y4m");
  execFileSync("ffmpeg", ["-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", "color=c=0x2848f0:s=320x240:r=30",
    "-t", "1", "-pix_fmt", "yuv420p", "-y", file]);
  return file;
}

/** The demo page, entered through its form (dev token). */
async function enter(page, addr, room, name, role) {
  await page.setViewportSize({ width: 1024, height: 700 });
  await page.goto(`http://${addr}/`);
  await page.fill("#room", room);
  await page.fill("#name", name);
  await page.check(role === "host" ? "#role-host" : "#role-audience");
  await page.click("#enter");
  await page.waitForSelector("#app:not([hidden])", { timeout: 15000 });
}

// ---- The player page, served by the test itself (the origin sends CORS headers for /live) ----

const PLAYER = `<!doctype html><html><body style="margin:0;background:#000">
<video id="v" muted autoplay playsinline width="640" height="480"></video>
<script src="/mpegts.js"></script>
<script>
window.samples = []; window.errors = []; window.logs = []; window.events = [];
const v = document.getElementById("v");
mpegts.LoggingControl.enableVerbose = false;
mpegts.LoggingControl.addLogListener((level, text) => {
  if (level !== "debug" && level !== "verbose") window.logs.push({ t: Date.now(), level, text });
});
// The demo page's player settings (web/demo.js startFlv): what the room's viewers run.
const p = mpegts.createPlayer({ type: "flv", isLive: true, url: "/live.flv" },
  { enableWorker: false, liveBufferLatencyChasing: true, liveBufferLatencyMaxLatency: 3, liveBufferLatencyMinRemain: 0.5 });
p.on(mpegts.Events.ERROR, (type, detail, info) => window.errors.push({ t: Date.now(), type, detail, info: JSON.stringify(info) }));
p.on(mpegts.Events.MEDIA_INFO, (mi) => window.events.push({ t: Date.now(), what: "media_info", w: mi.width, h: mi.height, codec: mi.videoCodec }));
p.on(mpegts.Events.LOADING_COMPLETE, () => window.events.push({ t: Date.now(), what: "loading_complete" }));
for (const e of ["waiting", "seeking", "seeked", "resize", "stalled", "ended"]) {
  v.addEventListener(e, () => window.events.push({ t: Date.now(), what: e, ct: v.currentTime, w: v.videoWidth, h: v.videoHeight }));
}
p.attachMediaElement(v);
p.load();
v.play().catch((e) => window.errors.push({ t: Date.now(), type: "play", detail: String(e) }));
const c = document.createElement("canvas");
c.width = 64; c.height = 48;
const g = c.getContext("2d", { willReadFrequently: true });
// The centre pixel and the pip tile's centre (layout.rs: a quarter of the frame, bottom right).
setInterval(() => {
  let centre = null, pip = null;
  if (v.readyState >= 2) {
    g.drawImage(v, 0, 0, 64, 48);
    centre = Array.from(g.getImageData(32, 24, 1, 1).data.slice(0, 3));
    pip = Array.from(g.getImageData(55, 41, 1, 1).data.slice(0, 3));
  }
  const q = v.getVideoPlaybackQuality();
  const b = v.buffered.length ? v.buffered.end(v.buffered.length - 1) : 0;
  window.samples.push({ t: Date.now(), ct: v.currentTime, frames: q.totalVideoFrames, dropped: q.droppedVideoFrames,
    paused: v.paused, ready: v.readyState, lag: b - v.currentTime, rate: v.playbackRate, centre, pip });
}, 100);
</script></body></html>`;

/** The player page, mpegts.js, and `/live.flv`: the origin's `flvUrl` passed through chunk by
 * chunk as it arrives and parsed on the way (`streams`: one parser per player request), so
 * the player's timeline can be matched to the stream's tags. */
async function servePlayer(flvUrl) {
  const js = readFileSync(MPEGTS);
  const streams = [];
  const upstream = new Set();
  const srv = http.createServer((req, res) => {
    if (req.url.startsWith("/mpegts.js")) {
      res.writeHead(200, { "content-type": "text/javascript" });
      return res.end(js);
    }
    if (req.url === "/") {
      res.writeHead(200, { "content-type": "text/html; charset=utf-8" });
      return res.end(PLAYER);
    }
    if (req.url === "/live.flv") {
      const parser = flvParser();
      parser.status = null;
      streams.push(parser);
      const up = http.get(flvUrl, (o) => {
        parser.status = o.statusCode;
        res.writeHead(o.statusCode, { "content-type": o.headers["content-type"] || "video/x-flv", "cache-control": "no-cache" });
        o.on("data", (chunk) => {
          if (o.statusCode === 200) parser.push(chunk);
          res.write(chunk);
        });
        o.on("end", () => res.end());
      });
      upstream.add(up);
      up.on("error", () => res.destroy());
      res.on("close", () => {
        up.destroy();
        upstream.delete(up);
      });
      return;
    }
    res.writeHead(404).end();
  });
  await new Promise((r) => srv.listen(0, "127.0.0.1", r));
  return {
    url: `http://127.0.0.1:${srv.address().port}/`,
    streams,
    close: () => {
      for (const up of upstream) up.destroy();
      srv.closeAllConnections();
      return new Promise((r) => srv.close(r));
    },
  };
}

// ---- An FLV reader: each video tag's timestamp, keyframe flag and the PPS its slices name ----

/** Exp-Golomb reader over an RBSP (emulation prevention bytes removed). */
function bitReader(bytes) {
  let pos = 0;
  const bit = () => {
    const b = (bytes[pos >> 3] >> (7 - (pos & 7))) & 1;
    pos += 1;
    return b;
  };
  const ue = () => {
    let zeros = 0;
    while (bit() === 0 && zeros < 32) zeros++;
    let v = 0;
    for (let i = 0; i < zeros; i++) v = v * 2 + bit();
    return 2 ** zeros - 1 + v;
  };
  return { ue };
}

function rbsp(nal, max = 32) {
  const out = [];
  for (let i = 1; i < Math.min(nal.length, max); i++) {
    if (i >= 3 && nal[i] === 3 && nal[i - 1] === 0 && nal[i - 2] === 0) continue;
    out.push(nal[i]);
  }
  return Uint8Array.from(out);
}

/** PPS ids named by the slices of one AVCC access unit (4-byte lengths). */
function slicePps(body) {
  const ids = new Set();
  for (let off = 0; off + 4 <= body.length;) {
    const len = body.readUInt32BE(off);
    const nal = body.subarray(off + 4, off + 4 + len);
    off += 4 + len;
    const type = nal[0] & 0x1f;
    if (type === 1 || type === 5) {
      const r = bitReader(rbsp(nal));
      r.ue(); // first_mb_in_slice
      r.ue(); // slice_type
      ids.add(r.ue());
    }
  }
  return [...ids];
}

/** An FLV parser fed with the bytes of one HTTP response as they arrive: each video tag's
 * timestamp, arrival time, keyframe flag and the PPS ids its slices name. */
function flvParser() {
  const st = { tags: [], seqHeaders: [], firstAudioTs: null, bytes: 0 };
  let buf = Buffer.alloc(0);
  let headerDone = false;
  st.push = (chunk) => {
    const now = Date.now();
    st.bytes += chunk.length;
    buf = Buffer.concat([buf, chunk]);
    if (!headerDone) {
      if (buf.length < 13) return;
      buf = buf.subarray(13);
      headerDone = true;
    }
    while (buf.length >= 11) {
      const size = buf.readUIntBE(1, 3);
      if (buf.length < 11 + size + 4) break;
      const kind = buf[0];
      const ts = buf.readUIntBE(4, 3) | (buf[7] << 24);
      const body = buf.subarray(11, 11 + size);
      if (kind === 8 && body[1] === 1 && st.firstAudioTs === null) st.firstAudioTs = ts;
      if (kind === 9) {
        if (body[1] === 0) st.seqHeaders.push({ ts, at: now, record: Buffer.from(body.subarray(5)) });
        else if (body[1] === 1) st.tags.push({ ts, at: now, key: body[0] >> 4 === 1, pps: slicePps(body.subarray(5)), size });
      }
      buf = buf.subarray(11 + size + 4);
    }
  };
  return st;
}

/** SPS and PPS ids in an AVCDecoderConfigurationRecord. */
function recordIds(rec) {
  let off = 5;
  const sps = [];
  const nSps = rec[off++] & 0x1f;
  for (let i = 0; i < nSps; i++) {
    const len = rec.readUInt16BE(off);
    const nal = rec.subarray(off + 2, off + 2 + len);
    // profile_idc, constraint flags, level_idc come before the id.
    sps.push({ id: bitReader(rbsp(nal).subarray(3)).ue(), profile: nal[1], level: nal[3] });
    off += 2 + len;
  }
  const pps = [];
  const nPps = rec[off++];
  for (let i = 0; i < nPps; i++) {
    const len = rec.readUInt16BE(off);
    const r = bitReader(rbsp(rec.subarray(off + 2, off + 2 + len)));
    pps.push({ id: r.ue(), sps: r.ue() });
    off += 2 + len;
  }
  return { sps, pps };
}

// ---- Measures from the player's samples ----

/** Stalls and frozen periods in the player's samples from wall time `from` on.
 * A stall: current time not advancing; its length is the wall time minus the media time
 * played between two advances (a late sampler is no stall). A frozen period: the decoded
 * frame count not rising, from the sample after its last rise to the sample showing the next
 * (`ms`, an upper bound; `observed`: first to last sample showing the same count). Each list
 * holds the periods longer than `report` ms, longest first. */
function measure(samples, from, report = 150) {
  const s = samples.filter((x) => x.t >= from);
  const stalls = [];
  const freezes = [];
  let lastAdvance = s[0];
  let lastRise = s[0];
  for (let i = 1; i < s.length; i++) {
    const x = s[i];
    if (x.ct > lastAdvance.ct) {
      const lost = Math.round(x.t - lastAdvance.t - ((x.ct - lastAdvance.ct) * 1000) / (x.rate || 1));
      if (lost > report) stalls.push({ ms: lost, t: lastAdvance.t, ct: lastAdvance.ct });
      lastAdvance = x;
    }
    if (x.frames > lastRise.frames) {
      const ms = x.t - lastRise.t;
      if (ms > report) freezes.push({ ms, observed: s[i - 1].t - lastRise.t, t: lastRise.t, ct: lastRise.ct, frames: lastRise.frames });
      lastRise = x;
    }
  }
  const last = s[s.length - 1];
  // Still stalled or frozen at the end counts too.
  if (last && last.ct === lastAdvance.ct && last.t - lastAdvance.t > report) {
    stalls.push({ ms: last.t - lastAdvance.t, t: lastAdvance.t, ct: lastAdvance.ct, open: true });
  }
  if (last && last.frames === lastRise.frames && last.t - lastRise.t > report) {
    freezes.push({ ms: last.t - lastRise.t, observed: last.t - lastRise.t, t: lastRise.t, ct: lastRise.ct, open: true });
  }
  stalls.sort((a, b) => b.ms - a.ms);
  freezes.sort((a, b) => b.ms - a.ms);
  return {
    stalls, freezes,
    stall: stalls[0]?.ms ?? 0,
    freeze: freezes[0]?.ms ?? 0,
    samples: s.length,
    frames: last ? last.frames - s[0].frames : 0,
    dropped: last ? last.dropped - s[0].dropped : 0,
  };
}

const isBlue = (px) => px && px[2] > 150 && px[2] > px[0] + 60 && px[2] > px[1] + 60;

describe("passthrough and mixing as a viewer sees them", () => {
  const room = "solo";
  let server, tmp, hostB, guestB, viewerB, player, admin, host, guest, viewer;
  const switchLog = []; // path changes seen through the REST API
  let polling = null;
  let lastStats = null;

  const bridge = async () => {
    const r = await fetch(`http://${server.addr}/v1/rooms/${room}/bridge`, { headers: { authorization: `Bearer ${admin}` } });
    return r.ok ? (await r.json()).stats : null;
  };

  before(async () => {
    tmp = mkdtempSync(path.join(tmpdir(), "cohost-passthrough-"));
    server = await startServer({ COHOST_BRIDGE__AUTO_START: "true", COHOST_BRIDGE__SOLO_IDLE: "1s" });
    admin = server.token("*", "ops", "admin");
    player = await servePlayer(`http://${server.addr}/live/${room}.flv`);
    hostB = await launchBrowser(); // Chromium's green test pattern, 640x480
    guestB = await launchBrowser({ video: blueCamera(tmp) });
    viewerB = await launchBrowser();
  });

  after(async () => {
    clearInterval(polling);
    await viewerB?.close();
    await guestB?.close();
    await hostB?.close();
    await player?.close();
    await server?.stop();
    if (tmp) rmSync(tmp, { recursive: true, force: true });
  });

  it("viewer_plays_through_at_least_three_switches_without_a_stall_or_a_freeze", { timeout: 240000 }, async () => {
    // The host goes live: the bridge starts by itself and passes the host through.
    host = await hostB.browser.newPage();
    await enter(host, server.addr, room, "alice", "host");
    await host.click("#go-live");
    await waitFor("host's tracks published", () =>
      host.evaluate(() => window.cohostDemo.client.participants.get(window.cohostDemo.client.me.id)?.tracks.size === 2));
    const pref = await host.evaluate(() =>
      window.cohostDemo.client.pub.getSenders().find((s) => s.track?.kind === "video").getParameters().degradationPreference);
    const started = await waitFor("bridge passing the host through", async () => {
      const s = await bridge();
      return s && s.path === "passthrough" ? s : null;
    }, 30000);
    console.log(`host sender degradationPreference: ${pref}; output ${started.width}x${started.height}`);
    assert.deepEqual([started.width, started.height], [640, 480], "the host's fake camera size");

    // Every path change, as the REST API shows it.
    polling = setInterval(async () => {
      const s = await bridge().catch(() => null);
      if (!s) return;
      if (!lastStats || s.path !== lastStats.path || s.switches !== lastStats.switches || s.mix_reason !== lastStats.mix_reason) {
        switchLog.push({ t: Date.now(), path: s.path, reason: s.mix_reason, switches: s.switches });
      }
      lastStats = s;
    }, 100);

    // The viewer.
    viewer = await viewerB.browser.newPage();
    await viewer.goto(player.url);
    const playing = await waitFor("the viewer playing", () =>
      viewer.evaluate((w) => {
        const s = window.samples.at(-1);
        return s && s.ct > w && s.frames > 0 ? s : null;
      }, WARMUP_S), 30000);
    const measureFrom = playing.t;
    const switches0 = (await bridge()).switches;

    // A co-host joins (the request approved in the host's page) and leaves, twice.
    guest = await guestB.browser.newPage();
    // Back in the audience the demo page would play the FLV too: not this test's viewer.
    await guest.route("**/vendor/mpegts.js", (r) => r.abort());
    await enter(guest, server.addr, room, "bob", "audience");
    const times = [];
    for (let round = 1; round <= 2; round++) {
      await guest.click("#ask-cohost");
      await host.waitForSelector("#requests li:has-text('bob') button.approve");
      await host.click("#requests li:has-text('bob') button.approve");
      await guest.waitForSelector("#cohost-panel:not([hidden])");
      const mixing = await waitFor(`round ${round}: mixing`, async () => {
        const s = await bridge();
        return s && s.path === "mixing" && s.mix_reason === "cohosts" ? s : null;
      }, 30000);
      times.push({ t: Date.now(), to: "mixing", switches: mixing.switches });
      // The co-host stays until the viewer sees them in the mix (the pip tile).
      await waitFor(`round ${round}: the co-host's blue tile at the viewer`, () =>
        viewer.evaluate(() => {
          const px = window.samples.at(-1)?.pip;
          return !!px && px[2] > 150 && px[2] > px[0] + 60 && px[2] > px[1] + 60;
        }), 20000);
      await guest.click("#leave-seat");
      await guest.waitForSelector("#audience-panel:not([hidden])");
      const back = await waitFor(`round ${round}: passthrough again`, async () => {
        const s = await bridge();
        return s && s.path === "passthrough" ? s : null;
      }, 30000);
      times.push({ t: Date.now(), to: "passthrough", switches: back.switches });
      // The viewer plays 3 s of the host passed through (a late freeze would show here).
      const startedAt = await viewer.evaluate(() => window.samples.at(-1).ct);
      await waitFor(`round ${round}: 3 s of play after the switch back`, () =>
        viewer.evaluate((ct) => window.samples.at(-1).ct > ct + 3, startedAt), 15000);
    }
    clearInterval(polling);

    const final = await bridge();
    const page = await viewer.evaluate(() => ({ samples: window.samples, errors: window.errors, logs: window.logs, events: window.events }));
    await viewer.close(); // ends the player's stream
    const flv = player.streams[0];
    const m = measure(page.samples, measureFrom);
    const t0 = measureFrom;
    const rel = (t) => ((t - t0) / 1000).toFixed(2);
    // mpegts.js starts its timeline at the first audio or video timestamp it got.
    const base = Math.min(flv.tags[0]?.ts ?? Infinity, flv.firstAudioTs ?? Infinity);
    const tsOf = (ct) => Math.round(base + ct * 1000);
    /** When the player showed stream time `ts` (first sample at or past it). */
    const shownAt = (ts) => page.samples.find((x) => tsOf(x.ct) >= ts);

    // Where the switches are in the stream: the PPS the slices name changes (0 host, 1 encoder).
    const flvSwitches = [];
    for (let i = 1; i < flv.tags.length; i++) {
      const a = flv.tags[i - 1];
      const b = flv.tags[i];
      if (a.pps.join() !== b.pps.join()) {
        flvSwitches.push({ ts: b.ts, at: b.at, from: a.pps.join(), to: b.pps.join(), key: b.key, step: b.ts - a.ts, arrivalStep: b.at - a.at });
      }
    }
    let backwards = 0;
    const steps = [];
    for (let i = 1; i < flv.tags.length; i++) {
      const d = flv.tags[i].ts - flv.tags[i - 1].ts;
      if (d < 0) backwards++;
      if (d > 100) steps.push({ ts: flv.tags[i].ts, step: d, pps: flv.tags[i].pps.join(), key: flv.tags[i].key, arrivalStep: flv.tags[i].at - flv.tags[i - 1].at });
    }
    const records = flv.seqHeaders.map((h) => h.record.toString("hex"));
    const ids = flv.seqHeaders[0] ? recordIds(flv.seqHeaders[0].record) : null;
    /** The stream around a player's stall or freeze: tag steps > 100 ms and the nearest switch. */
    const context = (p) => {
      const ts = tsOf(p.ct);
      const near = steps.filter((x) => x.ts >= ts - 100 && x.ts <= ts + p.ms + 200);
      const sw = flvSwitches.map((x) => ({ ts: x.ts, d: x.ts - ts })).sort((a, b) => Math.abs(a.d) - Math.abs(b.d))[0];
      return `${p.ms} ms at ${rel(p.t)} s (stream ts ${ts}${p.observed !== undefined ? `, observed ${p.observed} ms` : ""}; ` +
        `tag steps there ${JSON.stringify(near)}; nearest switch ${sw ? `${sw.d} ms away` : "none"})`;
    };
    const blueSeen = page.samples.filter((x) => x.t >= t0 && isBlue(x.pip)).length;

    console.log(`output ${final.width}x${final.height}; path ${final.path}; switches ${final.switches} (${final.switches - switches0} while playing); ` +
      `encoded_frames ${final.encoded_frames}; passthrough_frames ${final.passthrough_frames}; mix_reason now ${final.mix_reason}`);
    console.log("REST path changes (s after playback start):", switchLog.map((x) => `${rel(x.t)} ${x.path}${x.reason ? "(" + x.reason + ")" : ""} #${x.switches}`).join(", "));
    console.log("FLV switches (PPS from->to; tag ts; out at; shown by the player at):\n  " + flvSwitches.map((x) => {
      const shown = shownAt(x.ts);
      const win = shown ? measure(page.samples.filter((y) => y.t < shown.t + 3000), shown.t - 1000, 0) : null;
      return `${x.from}->${x.to} ${x.key ? "IDR" : "NOT AN IDR"} ts=${x.ts} (dts step ${x.step} ms, arrival step ${x.arrivalStep} ms) out ${rel(x.at)} s, ` +
        `shown ${shown ? rel(shown.t) + " s" : "never"}; player from 1 s before to 3 s after: longest stall ${win?.stall} ms, longest frozen ${win?.freeze} ms`;
    }).join("\n  "));
    console.log(`FLV: ${flv.tags.length} video tags, ${flv.seqHeaders.length} AVC sequence header(s) ${JSON.stringify(ids)}, ` +
      `${backwards} timestamps going back, dts steps > 100 ms: ${JSON.stringify(steps)}; player connections ${player.streams.length}`);
    console.log(`player: ${m.samples} samples over ${rel(page.samples.at(-1).t)} s after playback start; frames decoded ${m.frames} (dropped ${m.dropped}); ` +
      `samples with the blue co-host tile ${blueSeen}; latency at end ${page.samples.at(-1).lag.toFixed(2)} s`);
    console.log(`longest stall ${m.stall} ms; stalls > 150 ms: ${m.stalls.map(context).join("; ") || "none"}`);
    console.log(`longest frozen ${m.freeze} ms; frozen > 150 ms: ${m.freezes.map(context).join("; ") || "none"}`);
    console.log("player events:", JSON.stringify(page.events.map((e) => ({ ...e, t: rel(e.t) }))));
    const warn = page.logs.filter((l) => l.level === "warn" || l.level === "error" || /changed|re-generate/.test(l.text));
    console.log(`mpegts.js: ${page.errors.length} error event(s) ${JSON.stringify(page.errors)}; warnings ${JSON.stringify(warn.map((l) => `${rel(l.t)} ${l.text}`))}`);

    assert.equal(times.length, 4, "joined and left twice");
    const reasons = [...new Set(switchLog.map((x) => x.reason).filter(Boolean))];
    assert.deepEqual(reasons, ["cohosts"], "mixed only for the co-host (no fall-back such as parameters_changed or resolution)");
    assert.ok(final.switches - switches0 >= 3, `at least 3 switches while playing, got ${final.switches - switches0}`);
    assert.ok(flvSwitches.length >= Math.max(3, final.switches - switches0), `the viewer's stream carries the switches, got ${flvSwitches.length}`);
    for (const x of flvSwitches) assert.ok(x.key, `switch at ts ${x.ts} starts with an IDR`);
    assert.equal(new Set(records).size, 1, "one AVC sequence header, never changed");
    assert.equal(backwards, 0, "video timestamps never go back");
    assert.equal(player.streams.length, 1, "the player never reconnected");
    assert.deepEqual(page.errors, [], "mpegts.js reported no error");
    assert.ok(m.stall <= LIMIT_MS, `longest stall ${m.stall} ms > ${LIMIT_MS} ms: ${m.stalls.map(context).join("; ")}`);
    assert.ok(m.freeze <= LIMIT_MS, `longest frozen period ${m.freeze} ms > ${LIMIT_MS} ms: ${m.freezes.map(context).join("; ")}`);
  });
});
