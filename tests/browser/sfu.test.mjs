// Two Chromium participants publish their fake camera and microphone through cohost and each
// decodes the other's video and hears the other's audio. They enter the demo page with pasted
// tokens minted by `cohost token` (the production path; demo.test.mjs uses the dev endpoint).
import { test } from "node:test";
import assert from "node:assert/strict";
import { startServer, launchBrowser, waitFor } from "./harness.mjs";

async function inbound(page) {
  return page.evaluate(async () => {
    const c = window.cohostDemo && window.cohostDemo.client;
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

test("two_browsers_exchange_audio_and_video", async () => {
  const server = await startServer();
  const { browser, close } = await launchBrowser();
  try {
    const pages = [];
    for (const [id, role] of [["alice", "host"], ["bob", "cohost"]]) {
      const page = await browser.newPage();
      await page.goto(`http://${server.addr}/?token=${server.token("duo", id, role)}`);
      await page.click("#enter");
      await page.waitForSelector("#app:not([hidden])");
      // The host presses "Go live"; a cohost token goes live on entering.
      if (role === "host") await page.click("#go-live");
      pages.push(page);
    }
    for (const page of pages) {
      const s = await waitFor("decoded video and audio energy", async () => {
        const s = await inbound(page);
        return s && s.framesDecoded > 10 && s.audioEnergy > 0 ? s : null;
      });
      assert.equal(s.video, 1, "one remote video track");
      assert.equal(s.audio, 1, "one remote audio track");
    }
    // Energy keeps rising: audio is flowing, not a single burst.
    const before = (await inbound(pages[0])).audioEnergy;
    await waitFor("audio energy rising", async () => (await inbound(pages[0])).audioEnergy > before);
  } finally {
    await close();
    await server.stop();
  }
});
