// Simulcast through the demo page in Debian's Chromium, against the real server: the host goes
// live at 960x540 (the smallest size Chromium sends three simulcast layers at) and the server
// receives all three layers; a co-host's tile of the host, made small and then large, asks
// for the layer that fits it (the demo's ResizeObserver -> set_track_quality) and decodes the
// smaller, then the larger picture, frames still coming after each switch. At the demo's
// default 640x480 Chromium sends only two layers, and the client offers the top two.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { startServer, launchBrowser, waitFor } from "./harness.mjs";

/** Uncaught exceptions in any page: the last test checks there were none. */
const pageErrors = [];

/** The co-host's camera: small and solid blue, so its own sending costs little. */
function blueCamera(dir) {
  const file = path.join(dir, "blue.y4m");
  execFileSync("ffmpeg", ["-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", "color=c=0x2848f0:s=320x240:r=30",
    "-t", "1", "-pix_fmt", "yuv420p", "-y", file]);
  return file;
}

/** The demo page entered with a token minted by `cohost token`. */
async function enter(page, addr, token, name, query = "") {
  await page.setViewportSize({ width: 1280, height: 800 });
  page.on("pageerror", (e) => pageErrors.push(`[${name}] ${e.stack}`));
  await page.goto(`http://${addr}/?token=${token}${query}`);
  await page.click("#enter");
  await page.waitForSelector("#app:not([hidden])", { timeout: 15000 });
}

/** The host's video layers as its own Chromium sends them: {rid: {ssrc, width, height, packets}}. */
async function sentLayers(page) {
  return page.evaluate(async () => {
    const pc = window.cohostDemo.client?.pub;
    if (!pc) return null;
    const out = {};
    (await pc.getStats()).forEach((r) => {
      if (r.type === "outbound-rtp" && r.kind === "video" && r.rid) {
        out[r.rid] = { ssrc: r.ssrc, width: r.frameWidth, height: r.frameHeight, packets: r.packetsSent };
      }
    });
    return out;
  });
}

/** The host's tile on the co-host's page: what its <video> shows and the decoder's counters. */
async function hostTile(page, hostId) {
  return page.evaluate(async (hostId) => {
    const t = document.querySelector(`.tile[data-participant="${hostId}"]`);
    const v = t?.querySelector("video");
    const pc = window.cohostDemo.client?.sub;
    if (!v || !pc) return null;
    let framesDecoded = 0;
    let frameWidth = 0;
    (await pc.getStats()).forEach((r) => {
      if (r.type === "inbound-rtp" && r.kind === "video" && v.srcObject?.getVideoTracks().some((x) => x.id === r.trackIdentifier)) {
        framesDecoded = r.framesDecoded || 0;
        frameWidth = r.frameWidth || 0;
      }
    });
    const box = t.getBoundingClientRect();
    return { videoWidth: v.videoWidth, videoHeight: v.videoHeight, frameWidth, framesDecoded, layer: t.dataset.layer || null, tile: [box.width, box.height] };
  }, hostId);
}

/** Size the host's tile (CSS pixels; the page's devicePixelRatio is 1). */
async function resizeHostTile(page, hostId, width, height) {
  await page.evaluate(({ hostId, width, height }) => {
    const t = document.querySelector(`.tile[data-participant="${hostId}"]`);
    t.style.width = `${width}px`;
    t.style.height = `${height}px`;
  }, { hostId, width, height });
}

/** Wait until the tile decodes pictures `width` wide, then for frames to keep coming. */
async function expectDecodedWidth(page, hostId, width, what) {
  const at = await waitFor(`${what}: decoded ${width} wide`, async () => {
    const s = await hostTile(page, hostId);
    return s && s.videoWidth === width && s.frameWidth === width ? s : null;
  });
  const later = await waitFor(`${what}: frames still decoding`, async () => {
    const s = await hostTile(page, hostId);
    return s && s.framesDecoded >= at.framesDecoded + 15 && s.videoWidth === width ? s : null;
  });
  return { at, later };
}

describe("simulcast through the demo page", () => {
  const room = "layers";
  let server, hostBrowser, guestBrowser, tmp, host, guest, hostId, layers;

  before(async () => {
    tmp = mkdtempSync(path.join(tmpdir(), "cohost-simulcast-"));
    server = await startServer();
    hostBrowser = await launchBrowser(); // Chromium's fake camera, any size asked for
    guestBrowser = await launchBrowser({ video: blueCamera(tmp) });
  });

  after(async () => {
    await hostBrowser?.close();
    await guestBrowser?.close();
    await server?.stop();
    rmSync(tmp, { recursive: true, force: true });
  });

  it("demo_host_sends_three_layers_and_all_reach_the_server", async () => {
    host = await hostBrowser.browser.newPage();
    const hostToken = server.token(room, "alice", "host");
    await enter(host, server.addr, hostToken, "alice");
    await host.selectOption("#resolution", "960x540");
    await host.click("#go-live");
    hostId = await host.evaluate(() => window.cohostDemo.client.me.id);

    // Chromium sends the three sizes (it may start with fewer while its bandwidth estimate grows).
    layers = await waitFor("the host's Chromium sending q, h and f", async () => {
      const l = await sentLayers(host);
      return l && ["q", "h", "f"].every((r) => l[r]?.packets > 0 && l[r].width > 0) ? l : null;
    });
    assert.deepEqual(["q", "h", "f"].map((r) => [layers[r].width, layers[r].height]), [[240, 135], [480, 270], [960, 540]]);

    // The server announces the layers and receives packets on each layer's SSRC, rising.
    const room_ = async () => {
      const r = await fetch(`http://${server.addr}/v1/rooms/${room}`, { headers: { Authorization: `Bearer ${hostToken}` } });
      assert.equal(r.status, 200);
      return r.json();
    };
    const received = async () => {
      const j = await room_();
      const inbound = j.participants.find((p) => p.id === hostId)?.media?.publisher?.inbound || [];
      return Object.fromEntries(["q", "h", "f"].map((r) => [r, inbound.find((i) => i.ssrc === layers[r].ssrc)?.packets_received || 0]));
    };
    const first = await waitFor("the server receiving every layer", async () => {
      const got = await received();
      return Object.values(got).every((n) => n > 0) ? got : null;
    });
    await waitFor("packets still arriving on every layer", async () => {
      const got = await received();
      return ["q", "h", "f"].every((r) => got[r] > first[r]) ? got : null;
    });
    const video = (await room_()).participants.find((p) => p.id === hostId).tracks.find((t) => t.kind === "video");
    assert.deepEqual(video.layers, ["q", "h", "f"]);
  });

  it("demo_host_publishes_simulcast_and_a_subscriber_switches_layers", async () => {
    // A co-host (its token publishes on entering; simulcast off: one small stream of its own).
    guest = await guestBrowser.browser.newPage();
    await enter(guest, server.addr, server.token(room, "bob", "cohost"), "bob", "&simulcast=0");
    const start = await waitFor("the host's tile decoding on the co-host's page", async () => {
      const s = await hostTile(guest, hostId);
      return s && s.videoWidth > 0 && s.framesDecoded > 10 ? s : null;
    });
    console.log(`host's tile at first: ${JSON.stringify(start)}`);
    assert.ok(start.videoWidth > layers.q.width, "a tile of the page's own size gets more than the smallest layer");

    // A small tile (120x90): the smallest layer covers it.
    await resizeHostTile(guest, hostId, 120, 90);
    await expectDecodedWidth(guest, hostId, layers.q.width, "small tile");
    assert.equal((await hostTile(guest, hostId)).layer, "q", "the layer the server chose for 120x90");

    // A large tile (1000x750): no layer covers it, so the top one.
    await resizeHostTile(guest, hostId, 1000, 750);
    await expectDecodedWidth(guest, hostId, layers.f.width, "large tile");
    assert.equal((await hostTile(guest, hostId)).layer, "f", "the layer the server chose for 1000x750");

    // By rid, through the client: the middle layer.
    const trackId = await guest.evaluate((hostId) => {
      const c = window.cohostDemo.client;
      return [...c.participants.get(hostId).tracks.values()].find((t) => t.kind === "video").id;
    }, hostId);
    assert.equal(await guest.evaluate((id) => window.cohostDemo.client.setTrackQuality(id, { layer: "h" }), trackId), "h");
    await expectDecodedWidth(guest, hostId, layers.h.width, "layer h by rid");

    // The host's own page is unaffected: it still sends all three layers.
    const before = await sentLayers(host);
    await waitFor("the host still sending every layer", async () => {
      const l = await sentLayers(host);
      return ["q", "h", "f"].every((r) => l[r].packets > before[r].packets) ? l : null;
    });
  });

  it("demo_host_at_640x480_sends_two_layers_the_top_one_full_size", async () => {
    // Chromium sends only 2 simulcast layers below 960x540 and would leave out the top one of
    // three: the client offers h and f, so the bridge and subscribers still get 640x480.
    const page = await hostBrowser.browser.newPage();
    await enter(page, server.addr, server.token("small", "carol", "host"), "carol");
    await page.click("#go-live");
    const sent = await waitFor("the host's Chromium sending h and f", async () => {
      const l = await sentLayers(page);
      return l && ["h", "f"].every((r) => l[r]?.packets > 0 && l[r].width > 0) ? l : null;
    });
    assert.deepEqual(Object.keys(sent).sort(), ["f", "h"]);
    assert.deepEqual([[sent.h.width, sent.h.height], [sent.f.width, sent.f.height]], [[320, 240], [640, 480]]);
    // track_published (to the publisher too) names the layers the server took from the offer.
    const announced = await waitFor("the video track announced", () =>
      page.evaluate(() => {
        const c = window.cohostDemo.client;
        return [...c.participants.get(c.me.id).tracks.values()].find((t) => t.kind === "video")?.layers;
      }));
    assert.deepEqual(announced, ["h", "f"]);
    await page.close();
  });

  it("no_uncaught_page_errors", () => {
    assert.deepEqual(pageErrors, []);
  });
});
