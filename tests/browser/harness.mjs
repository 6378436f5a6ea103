// Shared helpers for the browser tests: start the real cohost binary on an ephemeral loopback
// port, mint tokens with it, and launch Debian's Chromium with fake camera and microphone.
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import readline from "node:readline";
import { chromium } from "playwright-core";

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), "..", "..");
const targetDir = process.env.CARGO_TARGET_DIR ? path.resolve(root, process.env.CARGO_TARGET_DIR) : path.join(root, "target");
export const BIN = process.env.COHOST_BIN || path.join(targetDir, "debug", "cohost");
/** Screenshots and other files for a reviewer (gitignored). */
export const OUTPUT = path.join(root, "tests", "browser", "output");

/** Start the server. `env`: extra COHOST_* settings; `listen`: a fixed HTTP address (e.g. the
 * address of a server stopped before, to test reconnecting). */
export async function startServer(env = {}, { listen = "127.0.0.1:0" } = {}) {
  const clean = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("COHOST_") || k === "COHOST_LOG"));
  const proc = spawn(BIN, ["serve", "--listen", listen, "--rtmp-listen", "127.0.0.1:0"], {
    cwd: root,
    env: { ...clean, COHOST_LOG: process.env.COHOST_LOG || "warn", ...env },
    stdio: ["ignore", "pipe", "inherit"],
  });
  const addr = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("cohost did not start")), 20000);
    proc.on("exit", (c) => reject(new Error(`cohost exited with ${c}`)));
    proc.on("error", (e) => reject(new Error(`cannot start ${BIN}: ${e.message}`)));
    readline.createInterface({ input: proc.stdout }).on("line", (l) => {
      const m = l.match(/^cohost listening on http:\/\/(.*)$/);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
  });
  return {
    addr,
    token: (room, identity, role) =>
      execFileSync(BIN, ["token", "--room", room, "--identity", identity, "--role", role], { env: { ...clean, ...env } })
        .toString()
        .trim(),
    /** SIGTERM, then SIGKILL if it has not exited within 10 s; resolves when it has exited. */
    stop: () =>
      new Promise((resolve) => {
        if (proc.exitCode !== null || proc.signalCode !== null) return resolve();
        const kill = setTimeout(() => proc.kill("SIGKILL"), 10000);
        proc.once("exit", () => {
          clearTimeout(kill);
          resolve();
        });
        proc.kill("SIGTERM");
      }),
  };
}

/**
 * Launch Chromium with a fake camera and microphone. `video`: a .y4m file the fake camera
 * plays instead of Chromium's built-in test pattern; `args`: more command-line switches.
 */
export async function launchBrowser({ video, args = [] } = {}) {
  const dir = mkdtempSync(path.join(tmpdir(), "cohost-chromium-"));
  const browser = await chromium.launchPersistentContext(dir, {
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: [
      "--no-sandbox", "--disable-gpu", "--use-fake-device-for-media-stream",
      "--use-fake-ui-for-media-stream", "--disable-background-networking",
      "--disable-component-update", "--disable-sync", "--no-first-run",
      "--autoplay-policy=no-user-gesture-required",
      ...(video ? [`--use-file-for-fake-video-capture=${video}`] : []),
      ...args,
    ],
  });
  return {
    browser,
    close: async () => {
      await browser.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Poll `fn` until it returns a truthy value or the timeout expires. */
export async function waitFor(what, fn, timeoutMs = 20000) {
  const deadline = Date.now() + timeoutMs;
  let last;
  while (Date.now() < deadline) {
    last = await fn();
    if (last) return last;
    await new Promise((r) => setTimeout(r, 250));
  }
  throw new Error(`timed out waiting for ${what}; last: ${JSON.stringify(last)}`);
}
