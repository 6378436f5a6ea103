// The demo page (web/) driven through its UI in Debian's Chromium, against the real server:
// a host goes live (on a server without bridge.auto_start the page starts the stream itself;
// golive.test.mjs covers going live and ending it with auto_start), an audience member asks to co-host and is approved, both see and hear each
// other, a viewer watches the bridge's HTTP-FLV output (mpegts.js) showing both, chat reaches
// everyone, and the removed co-host falls back to the audience. Screenshots: tests/browser/output/.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { startServer, launchBrowser, waitFor, OUTPUT } from "./harness.mjs";

mkdirSync(OUTPUT, { recursive: true });

/** Uncaught exceptions in any page: the last test checks there were none. */
const pageErrors = [];

/** A fake camera for the co-host that is clearly not Chromium's green test pattern: solid blue. */
function blueCamera(dir) {
  const file = path.join(dir, "blue.y4m");
  execFileSync("ffmpeg", ["-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", "color=c=0x2848f0:s=320x240:r=30",
    "-t", "1", "-pix_fmt", "yuv420p", "-y", file]);
  return file;
}

/** Enter the room through the entry form (the token comes from the development endpoint). */
async function enter(page, addr, room, name, role, viewport = { width: 1280, height: 800 }) {
  await page.setViewportSize(viewport);
  page.on("pageerror", (e) => pageErrors.push(`[${name}] ${e.stack}`));
  await page.goto(`http://${addr}/`);
  await page.fill("#room", room);
  await page.fill("#name", name);
  await page.check(role === "host" ? "#role-host" : "#role-audience");
  await page.click("#enter");
  await page.waitForSelector("#app:not([hidden])", { timeout: 15000 });
  await page.evaluate(() => (window.__sameDocument = true)); // survives only without a reload
}

/** Inbound media on the page's subscriber connection, summed per kind. */
async function inbound(page) {
  return page.evaluate(async () => {
    const c = window.cohostDemo.client;
    if (!c || !c.sub) return null;
    const out = { framesDecoded: 0, audioEnergy: 0, video: 0, audio: 0 };
    (await c.sub.getStats()).forEach((r) => {
      if (r.type !== "inbound-rtp") return;
      if (r.kind === "video") {
        out.video += 1;
        out.framesDecoded += r.framesDecoded || 0;
      } else {
        out.audio += 1;
        out.audioEnergy += r.totalAudioEnergy || 0;
      }
    });
    return out;
  });
}

async function expectMediaFlowing(page, who) {
  const first = await waitFor(`${who}: decoded video and audio energy`, async () => {
    const s = await inbound(page);
    return s && s.framesDecoded > 10 && s.audioEnergy > 0 ? s : null;
  });
  const later = await waitFor(`${who}: frames and audio energy rising`, async () => {
    const s = await inbound(page);
    return s && s.framesDecoded > first.framesDecoded + 10 && s.audioEnergy > first.audioEnergy ? s : null;
  });
  return { first, later };
}

/** Mean RGB of a square patch of the page's FLV <video> frame, in video pixels. */
async function flvPatch(page, cx, cy, half = 12) {
  return page.evaluate(({ cx, cy, half }) => {
    const v = document.getElementById("flv");
    const c = document.createElement("canvas");
    c.width = v.videoWidth;
    c.height = v.videoHeight;
    const g = c.getContext("2d", { willReadFrequently: true });
    g.drawImage(v, 0, 0);
    const d = g.getImageData(cx - half, cy - half, 2 * half, 2 * half).data;
    const sum = [0, 0, 0];
    for (let i = 0; i < d.length; i += 4) for (let k = 0; k < 3; k++) sum[k] += d[i + k];
    const n = d.length / 4;
    return { size: [v.videoWidth, v.videoHeight], rgb: sum.map((s) => Math.round(s / n)) };
  }, { cx, cy, half });
}

/** A loopback TCP port with nothing listening (bound, then closed). */
async function closedPort() {
  const srv = createServer();
  await new Promise((r) => srv.listen(0, "127.0.0.1", r));
  const { port } = srv.address();
  await new Promise((r) => srv.close(r));
  return port;
}

/** The bridge's first pip tile on a landscape w x h output (src/bridge/layout.rs): a quarter
 * of the size, at the bottom right, margin min(w, h) / 40. */
function pipRect(w, h) {
  const margin = Math.max(2, Math.floor(Math.min(w, h) / 40));
  const tw = Math.floor(w / 4);
  const th = Math.floor(h / 4);
  const x = w - margin - tw;
  const y = h - margin - th;
  return { x, y, w: tw, h: th, cx: Math.round(x + tw / 2), cy: Math.round(y + th / 2) };
}

const isBlue = ([r, g, b]) => b > 150 && b > r + 60 && b > g + 60;
const isGreen = ([r, g, b]) => g > 60 && g > r + 40 && g > b + 40;

describe("co-hosting through the demo page", () => {
  const room = "stage";
  let server, hostBrowser, guestBrowser, tmp, host, guest, viewer, pipTile;

  before(async () => {
    tmp = mkdtempSync(path.join(tmpdir(), "cohost-demo-"));
    server = await startServer({
      // The page pushes to a dead CDN on loopback: hosts may not push to loopback by default
      // (bridge destination policy), the operator allows it here.
      COHOST_BRIDGE__DESTINATION_ALLOW: '["127.0.0.0/8"]',
      // The page starts the stream itself when the server does not (start_bridge).
      COHOST_BRIDGE__AUTO_START: "false",
    });
    hostBrowser = await launchBrowser(); // Chromium's green test pattern: host and viewer
    guestBrowser = await launchBrowser({ video: blueCamera(tmp) }); // the co-host's blue camera
  });

  after(async () => {
    await hostBrowser?.close();
    await guestBrowser?.close();
    await server?.stop();
    rmSync(tmp, { recursive: true, force: true });
  });

  it("host_goes_live_from_the_page_with_camera_and_microphone", async () => {
    host = await hostBrowser.browser.newPage();
    await enter(host, server.addr, room, "alice", "host");
    await host.click("#go-live");
    await host.waitForSelector('.tile[data-participant="local"] video');
    await waitFor("host's tracks published", () =>
      host.evaluate(() => window.cohostDemo.client.participants.get(window.cohostDemo.client.me.id).tracks.size === 2));
    assert.equal(await host.textContent("#state"), "connected · stage");
    // Without bridge.auto_start the page sends start_bridge itself after a few seconds.
    await host.waitForSelector("#live-badge:text-matches('^LIVE [0-9]{2}:[0-9]{2}$')", { timeout: 20000 });
    await host.waitForSelector("#bridge-summary:has-text('Stream running')");
  });

  it("audience_request_is_approved_in_the_host_ui_and_the_guest_publishes_without_reloading", async () => {
    guest = await guestBrowser.browser.newPage();
    await enter(guest, server.addr, room, "bob", "audience");
    assert.equal(await guest.isVisible("#flv-box"), true, "audience starts on the FLV player");
    await guest.click("#ask-cohost");
    await host.waitForSelector("#requests li:has-text('bob asks to co-host') button.approve");
    await host.click("#requests li:has-text('bob') button.approve");
    await guest.waitForSelector("#cohost-panel:not([hidden])");
    await guest.waitForSelector('.tile[data-participant="local"] video');
    await waitFor("guest's tracks published", () =>
      guest.evaluate(() => window.cohostDemo.client.participants.get(window.cohostDemo.client.me.id).tracks.size === 2));
    assert.equal(await guest.evaluate(() => window.__sameDocument), true, "no reload");
    assert.equal(await guest.isVisible("#flv-box"), false, "FLV player gone once co-hosting");
    await host.waitForSelector('#members li[data-identity="bob"] .role.cohost');
  });

  it("host_and_cohost_pages_decode_each_others_video_and_audio", async () => {
    for (const [page, who] of [[host, "host"], [guest, "co-host"]]) {
      const { later } = await expectMediaFlowing(page, who);
      assert.equal(later.video, 1, `${who}: one remote video track`);
      assert.equal(later.audio, 1, `${who}: one remote audio track`);
    }
    // The page's own stats table shows the remote tracks with a bitrate.
    await waitFor("stats table rows with a bitrate", () =>
      host.evaluate(() => [...document.querySelectorAll("#stats tbody tr")].some((tr) => /↓ bob video/.test(tr.cells[0]?.textContent) && Number(tr.cells[1].textContent) > 0)));
    await host.waitForSelector("#media-state:has-text('sending: connected · receiving: connected')");
    await host.screenshot({ path: path.join(OUTPUT, "host-desktop-cohosting.png") });
    await guest.setViewportSize({ width: 390, height: 844 });
    await guest.screenshot({ path: path.join(OUTPUT, "cohost-phone.png"), fullPage: true });
  });

  it("audience_page_plays_the_bridge_http_flv_with_host_full_frame_and_cohost_pip_tile", async () => {
    // A CDN destination that refuses connections: the page shows it retrying, and the embedded
    // origin still gets the stream.
    const dead = `rtmp://127.0.0.1:${await closedPort()}/live/stage`;
    await host.click("#stream-settings summary");
    await host.fill("#bridge-dest", dead);
    await host.click("#bridge-add");
    await host.waitForSelector(`#bridge-status tr.dest:has-text('${dead}') td.dest-state:text-matches('connecting|retrying|failed')`);
    viewer = await hostBrowser.browser.newPage();
    await enter(viewer, server.addr, room, "carol", "audience");
    const t0 = await waitFor("FLV playing", () =>
      viewer.evaluate(() => {
        const v = document.getElementById("flv");
        return v.currentTime > 0.5 && v.videoWidth > 0 ? v.currentTime : null;
      }));
    await waitFor("FLV time advancing", () =>
      viewer.evaluate((t0) => document.getElementById("flv").currentTime > t0 + 1.5, t0));
    const [w, h] = await viewer.evaluate(() => [document.getElementById("flv").videoWidth, document.getElementById("flv").videoHeight]);
    assert.ok(w > h, `a landscape output (the bridge default), got ${w}x${h}`);
    pipTile = pipRect(w, h);
    const pip = await waitFor("the co-host's blue camera in the pip tile", async () => {
      const p = await flvPatch(viewer, pipTile.cx, pipTile.cy);
      return isBlue(p.rgb) ? p : null;
    });
    await viewer.screenshot({ path: path.join(OUTPUT, "audience-flv-pip.png") });
    const main = await flvPatch(viewer, Math.round(w * 0.25), Math.round(h * 0.7));
    console.log("FLV patches: pip", pip.rgb, "main", main.rgb);
    assert.ok(isGreen(main.rgb), `host's green test pattern full frame, got ${main.rgb}`);
    const above = await flvPatch(viewer, pipTile.cx, pipTile.y - pipTile.h / 3);
    assert.ok(isGreen(above.rgb), `above the pip tile it is the host again, got ${above.rgb}`);
    // The host sees the stream's status: host and co-host, audio and video.
    await host.waitForSelector("#bridge-summary:has-text('Stream running')");
    await host.waitForSelector("#bridge-summary:has-text('4 input tracks now')");
  });

  it("host_pins_side_by_side_in_the_page_and_the_flv_output_follows", async () => {
    assert.equal(await host.inputValue("#layout"), "", "the selector shows the running layout: auto");
    await host.selectOption("#layout", "side_by_side");
    await host.waitForSelector("#bridge-summary:has-text('layout side_by_side')");
    assert.equal(await host.inputValue("#layout"), "side_by_side");
    // Landscape side by side: host on the left half, co-host on the right half.
    const size = await viewer.evaluate(() => [document.getElementById("flv").videoWidth, document.getElementById("flv").videoHeight]);
    await waitFor("the co-host's blue camera filling the right half", async () =>
      isBlue((await flvPatch(viewer, Math.round(size[0] * 0.75), Math.round(size[1] / 2))).rgb));
    const left = await flvPatch(viewer, Math.round(size[0] * 0.12), Math.round(size[1] / 2));
    assert.ok(isGreen(left.rgb), `host on the left, got ${left.rgb}`);
    await viewer.screenshot({ path: path.join(OUTPUT, "audience-flv-side-by-side.png") });
    await host.selectOption("#layout", ""); // back to following the room: pip
    await host.waitForSelector("#bridge-summary:has-text('layout auto')");
    await waitFor("pip again", async () => isGreen((await flvPatch(viewer, Math.round(size[0] * 0.75), Math.round(size[1] * 0.3))).rgb));
    await host.screenshot({ path: path.join(OUTPUT, "host-bridge-status.png"), fullPage: true });
  });

  it("host_mutes_the_cohost_camera_in_the_page_and_the_mix_shows_a_placeholder", async () => {
    await host.click('#members li[data-identity="bob"] button.mute-video');
    await host.waitForSelector('.tile[data-participant] .muted:text("camera muted")');
    await host.waitForSelector('#members li[data-identity="bob"] button.mute-video:text("Unmute camera")');
    const pipCenter = [pipTile.cx, pipTile.cy];
    const placeholder = await waitFor("the pip tile no longer blue", async () => {
      const p = await flvPatch(viewer, ...pipCenter);
      return !isBlue(p.rgb) && !isGreen(p.rgb) ? p : null;
    });
    console.log("muted pip tile", placeholder.rgb);
    await viewer.screenshot({ path: path.join(OUTPUT, "audience-flv-cohost-camera-muted.png") });
    await host.click('#members li[data-identity="bob"] button.mute-video');
    let seen = null;
    await waitFor("the co-host's camera back in the pip tile", async () => {
      seen = (await flvPatch(viewer, ...pipCenter)).rgb;
      return isBlue(seen);
    }, 30000).catch((e) => assert.fail(`${e.message}; pip tile shows ${seen}`));
    await host.waitForSelector('.tile[data-participant] .muted', { state: "hidden" });
  });

  it("chat_typed_in_one_page_appears_in_the_others", async () => {
    await viewer.fill("#chat-input", "hello from the audience");
    await viewer.click("#chat-send");
    for (const [page, who] of [[host, "host"], [guest, "co-host"], [viewer, "viewer"]]) {
      await page.waitForSelector("#chat-log li.chat:has-text('carol: hello from the audience')", { timeout: 10000 })
        .catch((e) => assert.fail(`${who} did not get the chat: ${e.message}`));
    }
    await guest.fill("#chat-input", "thanks!");
    await guest.click("#chat-send");
    await viewer.waitForSelector("#chat-log li.chat:has-text('bob: thanks!')");
    await viewer.click("#like");
    await host.waitForSelector("#chat-log li.like:has-text('carol')");
  });

  it("removed_cohost_page_falls_back_to_the_audience_and_the_flv_stream", async () => {
    await host.click('#members li[data-identity="bob"] button.remove');
    await guest.waitForSelector("#audience-panel:not([hidden])");
    await guest.waitForSelector("#flv-box:not([hidden])");
    assert.equal(await guest.locator(".tile").count(), 0, "no real-time tiles for the audience");
    assert.equal(await guest.evaluate(() => window.cohostDemo.localStream), null, "camera released");
    assert.equal(await guest.evaluate(() => window.__sameDocument), true, "no reload");
    const t0 = await waitFor("guest's FLV playing", () =>
      guest.evaluate(() => {
        const v = document.getElementById("flv");
        return v.currentTime > 0.3 ? v.currentTime : null;
      }));
    await waitFor("guest's FLV time advancing", () =>
      guest.evaluate((t0) => document.getElementById("flv").currentTime > t0 + 1, t0));
    await host.waitForSelector('#members li[data-identity="bob"] .role.audience');
    await host.waitForSelector('.tile[data-participant]:not([data-participant="local"])', { state: "detached" });
    // The summary counts the inputs of now: the co-host's two tracks are gone.
    await host.waitForSelector("#bridge-summary:has-text('2 input tracks now')");
    await guest.screenshot({ path: path.join(OUTPUT, "removed-cohost-back-to-audience-phone.png"), fullPage: true });
  });
});

describe("errors shown by the demo page", () => {
  let server, b;
  before(async () => {
    server = await startServer({ COHOST_ROOM__MAX_MEMBERS: "1" });
    b = await launchBrowser();
  });
  after(async () => {
    await b?.close();
    await server?.stop();
  });

  it("page_shows_an_error_for_an_invalid_token", async () => {
    const page = await b.browser.newPage();
    await page.goto(`http://${server.addr}/`);
    await page.click("#token-box summary");
    await page.fill("#token", "not-a-token");
    await page.click("#enter");
    const text = await waitFor("error banner", async () => {
      const t = (await page.isVisible("#error")) && (await page.textContent("#error"));
      return t && /invalid/.test(t) ? t : null;
    });
    assert.match(text, /access token is invalid/);
    assert.equal(await page.isVisible("#app"), false, "still on the entry form");
    await page.screenshot({ path: path.join(OUTPUT, "invalid-token.png") });
    await page.close();
  });

  it("page_shows_an_error_when_the_camera_is_denied_and_when_the_room_is_full", async () => {
    const host = await b.browser.newPage();
    // The browser's answer when a person blocks the camera prompt.
    await host.addInitScript(() => {
      navigator.mediaDevices.getUserMedia = () => Promise.reject(new DOMException("Permission denied", "NotAllowedError"));
    });
    await enter(host, server.addr, "tiny", "alice", "host");
    await host.click("#go-live");
    await host.waitForSelector("#error:has-text('Camera/microphone access was denied')");
    const other = await b.browser.newPage();
    await other.goto(`http://${server.addr}/`);
    await other.fill("#room", "tiny");
    await other.fill("#name", "dave");
    // As audience: a second host would be refused for another reason (one host per room).
    await other.check("#role-audience");
    await other.click("#enter");
    await other.waitForSelector("#error:has-text('The room is full')");
    await other.screenshot({ path: path.join(OUTPUT, "room-full.png") });
  });
});

describe("connection loss and PK through the demo page", () => {
  let server, b;
  before(async () => {
    server = await startServer();
    b = await launchBrowser();
  });
  after(async () => {
    await b?.close();
    await server?.stop();
  });

  it("host_page_retries_with_backoff_after_the_server_goes_away_and_goes_live_again", async () => {
    const host = await b.browser.newPage();
    await enter(host, server.addr, "flaky", "alice", "host");
    await host.click("#go-live");
    await host.waitForSelector('.tile[data-participant="local"] video');
    const addr = server.addr;
    await server.stop(); // SIGTERM: the server closes the WebSocket with 1001
    await host.waitForSelector('#state[data-state="reconnecting"]');
    await host.waitForSelector("#error:has-text('Connection lost. Retrying in')");
    await host.screenshot({ path: path.join(OUTPUT, "connection-lost-retrying.png") });
    server = await startServer({}, { listen: addr });
    await host.waitForSelector('#state[data-state="connected"]', { timeout: 20000 });
    // Back in the room on a new connection, publishing the same camera again.
    await waitFor("host's tracks published again", () =>
      host.evaluate(() => {
        const c = window.cohostDemo.client;
        return c.participants.get(c.me.id)?.tracks.size === 2;
      }));
    assert.equal(await host.evaluate(() => window.__sameDocument), true, "no reload");
    assert.equal(await host.isVisible("#error"), false, "the error is cleared");
    await host.close();
  });

  it("two_hosts_start_a_pk_from_the_page_and_see_each_other_then_end_it", async () => {
    const a = await b.browser.newPage();
    const bb = await b.browser.newPage();
    await enter(a, server.addr, "red", "ann", "host");
    await enter(bb, server.addr, "blue", "ben", "host");
    for (const p of [a, bb]) {
      await p.click("#go-live");
      await p.waitForSelector('.tile[data-participant="local"] video');
    }
    await a.fill("#pk-room", "blue");
    await a.click("#pk-invite");
    await bb.waitForSelector("#pk-invites li:has-text('ann (room red) invites you to a PK') button:text('Accept')");
    await bb.click("#pk-invites li button:text('Accept')");
    await a.waitForSelector(".tile .label:has-text('ben · PK (room blue)')");
    await bb.waitForSelector(".tile .label:has-text('ann · PK (room red)')");
    for (const [p, who] of [[a, "ann"], [bb, "ben"]]) await expectMediaFlowing(p, who);
    await waitFor("PK partner named in the stats table", () =>
      a.evaluate(() => [...document.querySelectorAll("#stats tbody tr")].some((tr) => /↓ ben video/.test(tr.cells[0]?.textContent))));
    await a.screenshot({ path: path.join(OUTPUT, "pk-host-desktop.png") });
    await bb.setViewportSize({ width: 390, height: 844 });
    await bb.screenshot({ path: path.join(OUTPUT, "pk-host-phone.png"), fullPage: true });
    await bb.click("#pk-end");
    await a.waitForSelector(".tile .label:has-text('PK')", { state: "detached" });
    await a.waitForSelector("#pk-end", { state: "hidden" });
  });
});

describe("co-host requests denied, invitations and leaving the seat in the demo page", () => {
  let server, b;
  before(async () => {
    server = await startServer();
    b = await launchBrowser();
  });
  after(async () => {
    await b?.close();
    await server?.stop();
  });

  it("denied_request_tells_the_audience_and_an_accepted_invitation_seats_them_until_they_leave", async () => {
    const host = await b.browser.newPage();
    const fan = await b.browser.newPage();
    await enter(host, server.addr, "club", "hana", "host");
    await host.click("#go-live");
    await enter(fan, server.addr, "club", "fan1", "audience");
    await fan.click("#ask-cohost");
    await fan.waitForSelector("#cancel-cohost:visible");
    await host.click("#requests li:has-text('fan1') button.deny");
    await fan.waitForSelector("#notice:has-text('The host declined your request')");
    await fan.waitForSelector("#ask-cohost:visible");
    assert.equal(await fan.isVisible("#audience-panel"), true, "still audience");
    await host.waitForSelector("#requests li.empty");

    await host.click('#members li[data-identity="fan1"] button.invite');
    await fan.waitForSelector("#invites li:has-text('hana invites you to co-host') button:text('Accept')");
    await fan.click("#invites li button:text('Accept')");
    await fan.waitForSelector("#cohost-panel:not([hidden])");
    await host.waitForSelector('.tile .label:has-text("fan1 · cohost")');
    await expectMediaFlowing(host, "host watching the invited co-host");

    await fan.click("#leave-seat");
    await fan.waitForSelector("#audience-panel:not([hidden])");
    await fan.waitForSelector("#flv-box:not([hidden])");
    await host.waitForSelector('.tile .label:has-text("fan1")', { state: "detached" });
    await host.waitForSelector('#members li[data-identity="fan1"] .role.audience');

    await host.click('#members li[data-identity="fan1"] button.kick');
    await fan.waitForSelector("#error:has-text('The host removed you from the room')");
    await fan.waitForSelector("#entry:not([hidden])");
    await host.waitForSelector('#members li[data-identity="fan1"]', { state: "detached" });
    await fan.screenshot({ path: path.join(OUTPUT, "kicked.png") });
  });
});

describe("a server without development tokens", () => {
  let server, b;
  before(async () => {
    server = await startServer({ COHOST_SERVER__DEV_TOKENS: "off" });
    b = await launchBrowser();
  });
  after(async () => {
    await b?.close();
    await server?.stop();
  });

  it("page_asks_for_a_pasted_token_and_enters_with_one", async () => {
    const page = await b.browser.newPage();
    await page.setViewportSize({ width: 390, height: 844 });
    await page.goto(`http://${server.addr}/`);
    await page.waitForSelector("#dev-hint:has-text('paste an access token')");
    assert.equal(await page.isVisible("#token"), true, "the token box is open");
    await page.click("#enter");
    await page.waitForSelector("#error:has-text('does not mint tokens for the page')");
    await page.screenshot({ path: path.join(OUTPUT, "entry-phone-no-dev-tokens.png"), fullPage: true });
    await page.fill("#token", server.token("pasted", "zoe", "audience"));
    await page.click("#enter");
    await page.waitForSelector("#app:not([hidden])");
    assert.match(await page.textContent("#who"), /zoe · audience · room pasted/);
    assert.equal(await page.isVisible("#error"), false);
  });
});

describe("the pages above", () => {
  it("threw_no_uncaught_exceptions", () => assert.deepEqual(pageErrors, []));
});
