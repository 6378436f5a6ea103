// HLS / LL-HLS seen by a real viewer: hls.js (from npm) in Debian's Chromium plays
// `/live/{room}/index.m3u8` of the embedded origin cross-origin (CORS) while the room's host
// goes live from the demo page (the bridge passes the host through), a co-host joins (the
// bridge mixes: the co-host's blue tile must show) and leaves (passthrough again). The video
// must keep advancing with the right pixels, and the latency behind live is printed.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import http from "node:http";
import { tmpdir } from "node:os";
import path from "node:path";
import { startServer, launchBrowser, waitFor } from "./harness.mjs";

const here = path.dirname(new URL(import.meta.url).pathname);
const HLSJS = path.join(here, "node_modules", "hls.js", "dist", "hls.js");

/** The co-host's fake camera: solid blue (the host is Chromium's green test pattern). */
function blueCamera(dir) {
  const file = path.join(dir, "blue.y4m");
  execFileSync("ffmpeg", ["-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", "color=c=0x2848f0:s=320x240:r=30",
    "-t", "1", "-pix_fmt", "yuv420p", "-y", file]);
  return file;
}

async function enter(page, addr, room, name, role) {
  await page.setViewportSize({ width: 1024, height: 700 });
  await page.goto(`http://${addr}/`);
  await page.fill("#room", room);
  await page.fill("#name", name);
  await page.check(role === "host" ? "#role-host" : "#role-audience");
  await page.click("#enter");
  await page.waitForSelector("#app:not([hidden])", { timeout: 15000 });
}

/** A player page on another origin than the server (the test's own HTTP server). */
const page = (src) => `<!doctype html><html><body style="margin:0;background:#000">
<video id="v" muted autoplay playsinline width="640" height="480"></video>
<script src="/hls.js"></script>
<script>
window.samples = []; window.errors = []; window.events = [];
const v = document.getElementById("v");
// maxLiveSyncPlaybackRate: hls.js starts on the last keyframe before its target latency
// (docs/api.md, "Players and latency") and may play up to 1.5x to reach the target, as
// mpegts.js chases latency on the demo page.
const hls = new Hls({ lowLatencyMode: true, enableWorker: true, maxLiveSyncPlaybackRate: 1.5 });
hls.on(Hls.Events.ERROR, (_, d) => window.errors.push({ t: Date.now(), fatal: d.fatal, type: d.type, details: d.details }));
for (const e of ["MANIFEST_PARSED", "LEVEL_UPDATED", "FRAG_CHANGED"]) {
  hls.on(Hls.Events[e], (_, d) => { if (e !== "LEVEL_UPDATED" || window.events.length < 5) window.events.push({ t: Date.now(), e, sn: d.frag?.sn, part: d.frag?.part }); });
}
hls.loadSource(${JSON.stringify(src)});
hls.attachMedia(v);
v.play().catch((e) => window.errors.push({ t: Date.now(), fatal: false, type: "play", details: String(e) }));
const c = document.createElement("canvas");
c.width = 64; c.height = 48;
const g = c.getContext("2d", { willReadFrequently: true });
setInterval(() => {
  let centre = null, pip = null;
  if (v.readyState >= 2) {
    g.drawImage(v, 0, 0, 64, 48);
    centre = Array.from(g.getImageData(32, 24, 1, 1).data.slice(0, 3));
    pip = Array.from(g.getImageData(55, 41, 1, 1).data.slice(0, 3));
  }
  const q = v.getVideoPlaybackQuality();
  // Behind live: hls.js's estimate (live edge of the playlist), and wall clock minus the
  // EXT-X-PROGRAM-DATE-TIME of what is on screen (the server's clock when the frame came in).
  const pdt = hls.playingDate ? Date.now() - hls.playingDate.getTime() : null;
  window.samples.push({ t: Date.now(), ct: v.currentTime, frames: q.totalVideoFrames, w: v.videoWidth, h: v.videoHeight,
    centre, pip, latency: hls.latency, pdt, lowLatency: hls.lowLatencyMode });
}, 100);
</script></body></html>`;

async function servePlayer(src) {
  const js = readFileSync(HLSJS);
  const srv = http.createServer((req, res) => {
    if (req.url === "/hls.js") {
      res.writeHead(200, { "content-type": "text/javascript" });
      return res.end(js);
    }
    if (req.url === "/") {
      res.writeHead(200, { "content-type": "text/html; charset=utf-8" });
      return res.end(page(src));
    }
    res.writeHead(404).end();
  });
  await new Promise((r) => srv.listen(0, "127.0.0.1", r));
  return {
    url: `http://127.0.0.1:${srv.address().port}/`,
    close: () => {
      srv.closeAllConnections();
      return new Promise((r) => srv.close(r));
    },
  };
}

const isBlue = (px) => px && px[2] > 150 && px[2] > px[0] + 60 && px[2] > px[1] + 60;
const median = (xs) => {
  const s = xs.filter((x) => typeof x === "number" && Number.isFinite(x)).sort((a, b) => a - b);
  return s.length ? s[Math.floor(s.length / 2)] : NaN;
};

/** Longest time the video's current time did not advance, from wall time `from` on. */
function longestStall(samples, from) {
  const s = samples.filter((x) => x.t >= from);
  let last = s[0];
  let worst = 0;
  for (const x of s.slice(1)) {
    if (x.ct > last.ct) {
      worst = Math.max(worst, x.t - last.t - (x.ct - last.ct) * 1000);
      last = x;
    }
  }
  if (s.length) worst = Math.max(worst, s.at(-1).t - last.t);
  return Math.round(worst);
}

describe("HLS in a browser", () => {
  const room = "hlsroom";
  let server, tmp, hostB, guestB, viewerB, player, admin, host, guest, viewer;

  const bridge = async () => {
    const r = await fetch(`http://${server.addr}/v1/rooms/${room}/bridge`, { headers: { authorization: `Bearer ${admin}` } });
    return r.ok ? (await r.json()).stats : null;
  };

  before(async () => {
    tmp = mkdtempSync(path.join(tmpdir(), "cohost-hls-"));
    server = await startServer({ COHOST_BRIDGE__AUTO_START: "true", COHOST_BRIDGE__SOLO_IDLE: "1s" });
    admin = server.token("*", "ops", "admin");
    player = await servePlayer(`http://${server.addr}/live/${room}/index.m3u8`);
    hostB = await launchBrowser();
    guestB = await launchBrowser({ video: blueCamera(tmp) });
    viewerB = await launchBrowser();
  });

  after(async () => {
    await viewerB?.close();
    await guestB?.close();
    await hostB?.close();
    await player?.close();
    await server?.stop();
    if (tmp) rmSync(tmp, { recursive: true, force: true });
  });

  it("hls_js_plays_the_room_through_a_passthrough_mix_switch_and_reports_its_latency", { timeout: 240000 }, async () => {
    const marks = [];
    host = await hostB.browser.newPage();
    await enter(host, server.addr, room, "alice", "host");
    await host.click("#go-live");
    await waitFor("bridge passing the host through", async () => {
      const s = await bridge();
      return s && s.path === "passthrough" ? s : null;
    }, 30000);

    viewer = await viewerB.browser.newPage();
    await viewer.goto(player.url);
    const playing = await waitFor("hls.js playing", () =>
      viewer.evaluate(() => {
        const s = window.samples.at(-1);
        return s && s.ct > 1 && s.frames > 0 ? s : null;
      }), 30000);
    // 5 s of the host alone.
    await waitFor("5 s of play", () => viewer.evaluate((ct) => window.samples.at(-1).ct > ct + 5, playing.ct), 20000);
    const solo = await viewer.evaluate(() => window.samples.slice(-30));

    // A co-host joins: the bridge switches to mixing; the viewer sees the blue tile.
    guest = await guestB.browser.newPage();
    await guest.route("**/vendor/mpegts.js", (r) => r.abort());
    await enter(guest, server.addr, room, "bob", "audience");
    await guest.click("#ask-cohost");
    await host.waitForSelector("#requests li:has-text('bob') button.approve");
    await host.click("#requests li:has-text('bob') button.approve");
    await guest.waitForSelector("#cohost-panel:not([hidden])");
    marks.push({ t: Date.now(), what: "approve" });
    await waitFor("mixing", async () => {
      const s = await bridge();
      return s && s.path === "mixing" ? s : null;
    }, 30000);
    await waitFor("the co-host's blue tile at the HLS viewer", () =>
      viewer.evaluate(() => {
        const px = window.samples.at(-1)?.pip;
        return !!px && px[2] > 150 && px[2] > px[0] + 60 && px[2] > px[1] + 60;
      }), 30000);
    // The co-host leaves: passthrough again, and the viewer goes on.
    marks.push({ t: Date.now(), what: "blue tile seen" });
    await guest.click("#leave-seat");
    await guest.waitForSelector("#audience-panel:not([hidden])");
    await waitFor("passthrough again", async () => {
      const s = await bridge();
      return s && s.path === "passthrough" ? s : null;
    }, 30000);
    marks.push({ t: Date.now(), what: "passthrough again" });
    const back = await viewer.evaluate(() => window.samples.at(-1).ct);
    await waitFor("5 s of play after the switch back", () =>
      viewer.evaluate((ct) => window.samples.at(-1).ct > ct + 5, back), 30000);

    const pg = await viewer.evaluate(() => ({ samples: window.samples, errors: window.errors, events: window.events }));
    const last = pg.samples.slice(-50);
    const stall = longestStall(pg.samples, playing.t + 2000);
    const fatal = pg.errors.filter((e) => e.fatal);
    const blue = pg.samples.filter((x) => isBlue(x.pip)).length;
    const latency = median(last.map((x) => x.latency));
    const pdt = median(last.map((x) => x.pdt));
    const soloLatency = median(solo.map((x) => x.latency));
    const soloPdt = median(solo.map((x) => x.pdt));
    console.log(`hls.js: ${pg.samples.at(-1).w}x${pg.samples.at(-1).h}, low-latency mode ${last.at(-1).lowLatency}, ` +
      `frames decoded ${pg.samples.at(-1).frames}, samples with the blue tile ${blue}, longest stall ${stall} ms`);
    console.log(`latency behind live (hls.latency, median): solo ${soloLatency?.toFixed(2)} s, at the end ${latency?.toFixed(2)} s; ` +
      `wall clock - program date time of the frame shown: solo ${Math.round(soloPdt)} ms, at the end ${Math.round(pdt)} ms`);
    console.log(`centre pixel solo ${JSON.stringify(solo.at(-1).centre)}, at the end ${JSON.stringify(last.at(-1).centre)}`);
    const rel = (t) => ((t - playing.t) / 1000).toFixed(1);
    console.log(`hls.js errors (s after playback start): ${JSON.stringify(pg.errors.map((e) => ({ ...e, t: rel(e.t) })))}`);
    console.log(`marks: ${marks.map((m) => `${rel(m.t)} ${m.what}`).join(", ")}`);
    const lat = pg.samples.filter((_, i) => i % 20 === 0).map((x) => `${rel(x.t)}:${x.latency?.toFixed(1)}`);
    console.log(`hls.latency over time: ${lat.join(" ")}`);

    assert.deepEqual(fatal, [], "no fatal hls.js error");
    assert.ok(blue > 0, "the co-host's tile was seen");
    const green = (px) => px && px[1] > px[0] + 30 && px[1] > px[2] + 30;
    assert.ok(solo.filter((x) => green(x.centre)).length > solo.length / 2, `the host's green test pattern: ${JSON.stringify(solo.at(-1).centre)}`);
    assert.ok(green(last.at(-1).centre), `the host again after the switch: ${JSON.stringify(last.at(-1).centre)}`);
    assert.ok(latency < 6, `hls.js latency ${latency} s`);
    assert.ok(stall < 3000, `longest stall ${stall} ms`);
  });
});
