// The host's "go live in one step" in the demo page (web/), in Debian's Chromium against the
// real server with bridge.auto_start: pick camera and microphone, preview, Go live (the stream
// for viewers starts by itself), LIVE badge counting, the small player of what viewers get,
// mute the mic without unpublishing, End live; viewers read that the live ended.
// Screenshots: tests/browser/output/.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdirSync } from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import { startServer, launchBrowser, waitFor, OUTPUT } from "./harness.mjs";

mkdirSync(OUTPUT, { recursive: true });
const pageErrors = [];

async function enter(page, addr, room, name, role) {
  await page.setViewportSize({ width: 1280, height: 900 });
  page.on("pageerror", (e) => pageErrors.push(`[${name}] ${e.stack}`));
  await page.goto(`http://${addr}/`);
  await page.fill("#room", room);
  await page.fill("#name", name);
  await page.check(role === "host" ? "#role-host" : "#role-audience");
  await page.click("#enter");
  await page.waitForSelector("#app:not([hidden])", { timeout: 15000 });
}

/** Frames the <video> decoded so far. */
const decodedFrames = (page, id) => page.evaluate((id) => document.getElementById(id).getVideoPlaybackQuality().totalVideoFrames, id);

/** Loudness of the stream viewers get: ffmpeg decodes `dur` s of the HTTP-FLV audio after
 * dropping the first `skip` s (the origin's GOP cache replays the recent past). */
async function flvVolume(url, skip = 2, dur = 3) {
  const { stderr } = await promisify(execFile)("ffmpeg", ["-hide_banner", "-nostdin", "-i", url, "-ss", String(skip),
    "-t", String(dur), "-vn", "-af", "volumedetect", "-f", "null", "-"], { timeout: 30000 });
  const db = (k) => Number(stderr.match(new RegExp(`${k}: (-?[\\d.]+|-inf) dB`))?.[1] ?? NaN);
  return { mean: db("mean_volume"), max: db("max_volume") };
}

describe("going live from the demo page", () => {
  const room = "golive";
  let server, b, admin, host, viewer, watch;

  const api = async (p) => {
    const r = await fetch(`http://${server.addr}${p}`, { headers: { Authorization: `Bearer ${admin}` } });
    return { status: r.status, body: r.ok ? await r.json() : null };
  };

  const patchBridge = async (body) => {
    const r = await fetch(`http://${server.addr}/v1/rooms/${room}/bridge`, {
      method: "PATCH", headers: { Authorization: `Bearer ${admin}`, "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    assert.ok(r.ok, `PATCH bridge ${JSON.stringify(body)}: ${r.status}`);
  };

  before(async () => {
    server = await startServer({ COHOST_BRIDGE__AUTO_START: "true" });
    admin = server.token("*", "ops", "admin");
    b = await launchBrowser();
  });
  after(async () => {
    await b?.close();
    await server?.stop();
  });

  it("host goes live in one step and ends live", { timeout: 180000 }, async () => {
    host = await b.browser.newPage();
    await enter(host, server.addr, room, "alice", "host");
    assert.equal(await host.isVisible("#go-live"), true);
    assert.equal(await host.isVisible("#live-badge"), false, "no LIVE badge before going live");

    // Preview: the camera and microphone lists fill in, the host picks devices, nothing is published.
    await host.click("#preview");
    await host.waitForSelector('.tile[data-participant="local"] .label:has-text("preview, not live")');
    const cameras = await host.$$eval("#camera option", (os) => os.map((o) => o.value).filter(Boolean));
    const mics = await host.$$eval("#microphone option", (os) => os.map((o) => o.value).filter(Boolean));
    console.log(`fake devices: ${cameras.length} cameras, ${mics.length} microphones`);
    assert.ok(cameras.length >= 1 && mics.length >= 1, "device lists filled after the preview opened");
    const cam = cameras.at(-1);
    const mic = mics.at(-1);
    await host.selectOption("#camera", cam);
    await host.selectOption("#microphone", mic);
    await waitFor("preview on the chosen devices", () =>
      host.evaluate(([cam, mic]) => {
        const s = window.cohostDemo.localStream;
        return s && s.getVideoTracks()[0]?.getSettings().deviceId === cam && s.getAudioTracks()[0]?.getSettings().deviceId === mic
          && s.getVideoTracks()[0].readyState === "live";
      }, [cam, mic]));
    await waitFor("preview video showing", () =>
      host.evaluate(() => document.querySelector('.tile[data-participant="local"] video').videoWidth > 0));
    assert.equal(await host.evaluate(() => window.cohostDemo.client.pub), null, "the preview publishes nothing");
    assert.equal((await api(`/v1/rooms/${room}/bridge`)).status, 404, "no stream during the preview");
    await host.screenshot({ path: path.join(OUTPUT, "golive-preview.png") });

    // A viewer in the room and a ?watch= viewer (opened from the host's link) wait for the live.
    viewer = await b.browser.newPage();
    await enter(viewer, server.addr, room, "carol", "audience");
    await viewer.waitForSelector('#flv-status[data-state="waiting"]:has-text("not live right now")');
    assert.match(await host.textContent("#stream-url"), new RegExp(`^http://${server.addr}/live/${room}\\.flv$`));
    [watch] = await Promise.all([host.context().waitForEvent("page"), host.click("#watch-link")]);
    watch.on("pageerror", (e) => pageErrors.push(`[watch] ${e.stack}`));
    await watch.waitForSelector("#watch:not([hidden])");
    assert.equal(new URL(watch.url()).searchParams.get("watch"), room, "the link opens the player view, not the .flv file");

    // Go live: one click; the stream starts by itself (bridge.auto_start).
    await host.click("#go-live");
    await host.waitForSelector("#end-live:visible");
    await host.waitForSelector('.tile[data-participant="local"] .label:text-is("alice (you)")');
    const live = await waitFor("stream running", async () => {
      const r = await api(`/v1/rooms/${room}/bridge`);
      return r.status === 200 ? r.body : null;
    });
    assert.equal(live.layout, null);
    const badge1 = await waitFor("LIVE badge", async () => {
      const t = (await host.isVisible("#live-badge")) && (await host.textContent("#live-badge"));
      return t && /^LIVE \d\d:\d\d$/.test(t) ? t : null;
    }, 15000);
    await waitFor("LIVE badge counting", async () => {
      const t = await host.textContent("#live-badge");
      return /^LIVE \d\d:\d\d$/.test(t) && t > badge1 ? t : null;
    }, 5000);
    await host.waitForSelector("#bridge-summary:has-text('Stream running')");
    assert.match(await host.textContent("#bridge-summary"), /2 input tracks now/);
    // The layout selector follows the running stream, whoever changed its layout.
    assert.equal(await host.inputValue("#layout"), "");
    await patchBridge({ layout: "solo" });
    await waitFor("selector showing the pinned layout", async () => (await host.inputValue("#layout")) === "solo", 10000);
    await patchBridge({ layout: null });
    await waitFor("selector back to auto", async () => (await host.inputValue("#layout")) === "", 10000);

    // The small player of what viewers get decodes advancing video and says how far behind it is.
    const f0 = await waitFor("monitor decoding", async () => {
      const f = await decodedFrames(host, "monitor");
      return f > 10 ? f : null;
    }, 30000);
    await waitFor("monitor frames advancing", async () => (await decodedFrames(host, "monitor")) > f0 + 15);
    assert.equal(await host.evaluate(() => document.getElementById("monitor").muted), true, "the host's player is muted");
    const latency = await waitFor("monitor latency shown", async () => {
      const t = await host.textContent("#monitor-latency");
      return /about [\d.]+ s behind you/.test(t) ? t : null;
    });
    console.log(latency);
    // The viewers play too.
    for (const [p, id] of [[viewer, "flv"], [watch, "watch-video"]]) {
      const v0 = await waitFor(`${id} decoding`, async () => {
        const f = await decodedFrames(p, id);
        return f > 10 ? f : null;
      }, 30000);
      await waitFor(`${id} advancing`, async () => (await decodedFrames(p, id)) > v0 + 15);
    }
    await host.screenshot({ path: path.join(OUTPUT, "golive-host-live.png"), fullPage: true });

    // Mute the mic: the track stays published (the server lists it and still receives it) and
    // viewers hear silence.
    const flvUrl = `http://${server.addr}/live/${room}.flv`;
    const loud = await flvVolume(flvUrl);
    console.log("stream audio before muting", loud);
    assert.ok(loud.max > -40, `the fake microphone's beeps are audible before muting: ${JSON.stringify(loud)}`);
    const audioIn = async () => {
      const r = await api(`/v1/rooms/${room}`);
      const me = r.body.participants.find((p) => p.identity === "alice");
      const t = me.tracks.find((t) => t.kind === "audio");
      return t && { id: t.id, packets: r.body.tracks.find((x) => x.id === t.id)?.packets_in ?? 0, tracks: me.tracks.length };
    };
    await host.click("#mute-mic");
    await host.waitForSelector('#mute-mic:text-is("Unmute mic")');
    await host.waitForSelector('.tile[data-participant="local"] .muted:text-is("mic muted")');
    const a0 = await audioIn();
    assert.equal(a0.tracks, 2, "both tracks still published");
    await waitFor("muted audio track still flowing to the server", async () => {
      const a = await audioIn();
      return a.id === a0.id && a.packets > a0.packets + 20;
    });
    const quiet = await waitFor("viewers hear silence", async () => {
      const v = await flvVolume(flvUrl);
      return v.max < -50 ? v : null;
    }, 60000);
    console.log("stream audio while muted", quiet);
    assert.equal(await host.evaluate(() => window.cohostDemo.client.participants.get(window.cohostDemo.client.me.id).tracks.size), 2);
    await host.click("#mute-mic");
    await host.waitForSelector('#mute-mic:text-is("Mute mic")');

    // End live: the stream stops, the camera goes off, the host leaves the room cleanly;
    // viewers read that the live ended.
    await host.click("#end-live");
    await waitFor("stream stopped", async () => (await api(`/v1/rooms/${room}/bridge`)).status === 404, 10000);
    await host.waitForSelector("#entry:visible");
    await host.waitForSelector("#notice:has-text('You ended the live after')");
    await host.waitForSelector("#live-badge", { state: "hidden" });
    assert.equal(await host.isVisible("#error"), false, "no error");
    assert.equal(await host.evaluate(() => window.cohostDemo.localStream), null, "camera released");
    await waitFor("host gone from the room", async () =>
      !(await api(`/v1/rooms/${room}`)).body.participants.some((p) => p.identity === "alice"));
    await viewer.waitForSelector("#chat-log li.left:has-text('alice')");
    for (const [p, sel] of [[viewer, "#flv-status"], [watch, "#watch-status"]]) {
      await p.waitForSelector(`${sel}[data-state="ended"]:visible:has-text("The live ended")`, { timeout: 15000 });
      assert.doesNotMatch(await p.textContent(sel), /bridge/);
    }
    await viewer.screenshot({ path: path.join(OUTPUT, "golive-viewer-live-ended.png") });
    await watch.screenshot({ path: path.join(OUTPUT, "golive-watch-live-ended.png") });
    await host.screenshot({ path: path.join(OUTPUT, "golive-host-ended.png") });
    // No "host is away" notice: the live ended properly.
    assert.equal(await viewer.locator("#chat-log li.notice:has-text('away')").count(), 0);
  });

  it("threw no uncaught exceptions", () => assert.deepEqual(pageErrors, []));
});
