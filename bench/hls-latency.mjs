// Latency behind live of HTTP-FLV (mpegts.js), HLS and LL-HLS (hls.js) side by side, and the
// server's CPU for HLS on top of HTTP-FLV, for one room. Run by bench/hls.sh (which builds the
// release binary and installs the players from npm); prints a table.
//
// Publisher: ffmpeg pushes a 640x360 30 fps x264 stream (1 s GOP... see GOP below) with AAC
// over RTMP with a stream key (the path of an OBS host: RTMP ingest -> room -> bridge
// passthrough -> embedded origin). Each picture carries its frame number N as 16 black/white
// blocks along its top edge. ffmpeg runs with -re, so frame N leaves it at t0 + N/30; t0 is
// taken from ffmpeg's -progress reports (the smallest wall-clock time of a report minus
// frames/30, i.e. the report that came soonest after its frame was written).
// Players: Chromium pages at once (mpegts.js as the demo page runs it; hls.js with its defaults
// for HLS and LL-HLS; hls.js LL-HLS allowed to play faster to catch up, as mpegts.js does), each reading the block code of every picture it
// presents (requestVideoFrameCallback): latency = presentation wall clock - (t0 + N/30),
// "glass to glass" minus the capture, on one machine's clock.
// CPU: the server process's utime+stime (/proc/PID/stat) over a window with the FLV player
// alone, then over a window with the FLV and both HLS players.
import { spawn, execFileSync } from "node:child_process";
import { readFileSync, mkdtempSync, rmSync } from "node:fs";
import http from "node:http";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import readline from "node:readline";
import { createRequire } from "node:module";

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), "..");
const browserDir = path.join(root, "tests", "browser");
const require = createRequire(path.join(browserDir, "package.json"));
const { chromium } = require("playwright-core");
const BIN = process.env.COHOST_BIN || path.join(root, "target", "release", "cohost");
const HLSJS = path.join(browserDir, "node_modules", "hls.js", "dist", "hls.js");
const MPEGTS = path.join(root, "web", "node_modules", "mpegts.js", "dist", "mpegts.js");
const arg = (name, def) => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : def;
};
const WINDOW_S = Number(arg("window", "20"));
const GOP = Number(arg("gop", "60")); // frames between keyframes (2 s)
const FPS = 30;
// Seconds the HLS packager runs before the HLS players join (0: the first player starts it).
const WARM_S = Number(arg("warm", "8"));
const PLAYERS = arg("players", "flv,hls,llhls,llcatch").split(",");
const ROOM = "bench";

const freePort = () =>
  new Promise((r) => {
    const s = net.createServer().listen(0, "127.0.0.1", () => {
      const p = s.address().port;
      s.close(() => r(p));
    });
  });

const clkTck = 100; // getconf CLK_TCK on Linux
const cpuSecs = (pid) => {
  const f = readFileSync(`/proc/${pid}/stat`, "utf8");
  const after = f.slice(f.lastIndexOf(")") + 2).split(" ");
  return (Number(after[11]) + Number(after[12])) / clkTck; // utime, stime
};

async function startServer() {
  const rtmpPort = await freePort();
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("COHOST_")));
  const proc = spawn(BIN, ["serve", "--listen", "127.0.0.1:0", "--rtmp-listen", `127.0.0.1:${rtmpPort}`], {
    cwd: root,
    env: { ...env, COHOST_LOG: "warn", COHOST_BRIDGE__AUTO_START: "true" },
    stdio: ["ignore", "pipe", "inherit"],
  });
  const addr = await new Promise((resolve, reject) => {
    proc.on("exit", (c) => reject(new Error(`cohost exited with ${c}`)));
    readline.createInterface({ input: proc.stdout }).on("line", (l) => {
      const m = l.match(/^cohost listening on http:\/\/(.*)$/);
      if (m) resolve(m[1]);
    });
  });
  const key = execFileSync(BIN, ["token", "--room", ROOM, "--identity", "obs", "--role", "host", "--stream-key", "--ttl", "1h"], { env })
    .toString().split("\n").find((l) => l.startsWith("stream key:")).split(":")[1].trim();
  return { proc, addr, rtmp: `rtmp://127.0.0.1:${rtmpPort}/live/${key}` };
}

/** ffmpeg pushing the frame-numbered picture; resolves t0 estimates as reports come. */
function publish(url) {
  // 16 blocks of 40 px: bit b of N is block b (white = 1) in the top 40 rows.
  const lum = "if(lt(Y,40),255*mod(floor(N/pow(2,floor(X/40))),2),96+32*sin(X/40+N/10))";
  const ff = spawn("ffmpeg", ["-hide_banner", "-loglevel", "error", "-re",
    "-f", "lavfi", "-i", `color=c=gray:s=640x360:r=${FPS},format=yuv420p,geq=lum='${lum}':cb=128:cr=128`,
    "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000",
    "-c:v", "libx264", "-profile:v", "baseline", "-bf", "0", "-g", String(GOP), "-b:v", "1500k",
    "-preset", "ultrafast", "-tune", "zerolatency", "-pix_fmt", "yuv420p",
    "-c:a", "aac", "-b:a", "96k", "-progress", "pipe:1", "-f", "flv", url], { stdio: ["ignore", "pipe", "inherit"] });
  const st = { t0: Infinity, proc: ff };
  let frame = null;
  readline.createInterface({ input: ff.stdout }).on("line", (l) => {
    const now = Date.now();
    if (l.startsWith("frame=")) frame = Number(l.slice(6));
    if (l.startsWith("progress=") && frame > 0) st.t0 = Math.min(st.t0, now - (frame * 1000) / FPS);
  });
  return st;
}

const PAGE = (kind, src) => `<!doctype html><html><body style="margin:0;background:#000">
<video id="v" muted autoplay playsinline width="640" height="360"></video>
<script src="/${kind === "flv" ? "mpegts" : "hls"}.js"></script>
<script>
window.samples = []; window.errors = [];
const v = document.getElementById("v");
const kind = ${JSON.stringify(kind)};
if (kind === "flv") {
  // The demo page's settings (web/demo.js): what the room's viewers run.
  const p = mpegts.createPlayer({ type: "flv", isLive: true, url: ${JSON.stringify(src)} },
    { enableWorker: false, liveBufferLatencyChasing: true, liveBufferLatencyMaxLatency: 3, liveBufferLatencyMinRemain: 0.5 });
  p.on(mpegts.Events.ERROR, (t, d) => window.errors.push(t + " " + d));
  p.attachMediaElement(v); p.load();
} else {
  // "llcatch": hls.js may play up to 1.5x to get back to its target latency, as mpegts.js
  // chases latency above; the others run hls.js's defaults.
  const h = new Hls({ lowLatencyMode: kind !== "hls", ...(kind === "llcatch" ? { maxLiveSyncPlaybackRate: 1.5 } : {}) });
  window.hls = h;
  h.on(Hls.Events.ERROR, (_, d) => { if (d.fatal) window.errors.push(d.details); });
  h.loadSource(${JSON.stringify(src)}); h.attachMedia(v);
}
v.play().catch(() => {});
const c = document.createElement("canvas"); c.width = 640; c.height = 360;
const g = c.getContext("2d", { willReadFrequently: true });
const onFrame = (now, meta) => {
  g.drawImage(v, 0, 0, 640, 360);
  const row = g.getImageData(0, 20, 640, 1).data;
  let n = 0;
  for (let b = 0; b < 16; b++) if (row[(b * 40 + 20) * 4] > 128) n += 2 ** b;
  const b = v.buffered.length ? v.buffered.end(v.buffered.length - 1) - v.currentTime : 0;
  window.samples.push({ t: performance.timeOrigin + now, n, buf: b, est: window.hls?.latency, target: window.hls?.targetLatency });
  v.requestVideoFrameCallback(onFrame);
};
v.requestVideoFrameCallback(onFrame);
</script></body></html>`;

async function servePages(addr) {
  const files = { "/hls.js": readFileSync(HLSJS), "/mpegts.js": readFileSync(MPEGTS) };
  const srcs = {
    flv: `http://${addr}/live/${ROOM}.flv`,
    hls: `http://${addr}/live/${ROOM}/index.m3u8`,
    llhls: `http://${addr}/live/${ROOM}/index.m3u8`,
    llcatch: `http://${addr}/live/${ROOM}/index.m3u8`,
  };
  const srv = http.createServer((req, res) => {
    if (files[req.url]) {
      res.writeHead(200, { "content-type": "text/javascript" });
      return res.end(files[req.url]);
    }
    const kind = req.url.slice(1);
    if (srcs[kind]) {
      res.writeHead(200, { "content-type": "text/html" });
      return res.end(PAGE(kind, srcs[kind]));
    }
    res.writeHead(404).end();
  });
  await new Promise((r) => srv.listen(0, "127.0.0.1", r));
  return { base: `http://127.0.0.1:${srv.address().port}/`, close: () => { srv.closeAllConnections(); srv.close(); } };
}

const pct = (xs, p) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.min(s.length - 1, Math.floor((s.length * p) / 100))] : NaN;
};
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const server = await startServer();
const pub = publish(server.rtmp);
const pages = await servePages(server.addr);
const dir = mkdtempSync(path.join(os.tmpdir(), "cohost-bench-chromium-"));
const browser = await chromium.launchPersistentContext(dir, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--autoplay-policy=no-user-gesture-required",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"],
});
try {
  // The room goes live through the bridge.
  for (let i = 0; ; i++) {
    const r = await fetch(`http://${server.addr}/live/${ROOM}.flv`).catch(() => null);
    if (r?.ok) { r.body.cancel(); break; }
    if (i > 100) throw new Error("the stream never went live");
    await sleep(200);
  }
  const open = async (kind) => {
    const p = await browser.newPage();
    await p.goto(pages.base + kind);
    return p;
  };
  const names = {
    flv: "HTTP-FLV (mpegts.js)",
    hls: "HLS (hls.js)",
    llhls: "LL-HLS (hls.js lowLatencyMode)",
    llcatch: "LL-HLS (lowLatencyMode, maxLiveSyncPlaybackRate 1.5)",
  };
  const opened = [];
  if (PLAYERS.includes("flv")) opened.push(["flv", await open("flv")]);
  await sleep(5000);
  const c0 = cpuSecs(server.proc.pid);
  await sleep(WINDOW_S * 1000);
  const flvOnly = (cpuSecs(server.proc.pid) - c0) / WINDOW_S;
  if (WARM_S > 0) {
    // A viewer before these: the packager is running when they join, as for most viewers.
    const r = await fetch(`http://${server.addr}/live/${ROOM}/index.m3u8`);
    if (!r.ok) throw new Error(`playlist: ${r.status}`);
    await sleep(WARM_S * 1000);
  }
  for (const k of PLAYERS.filter((k) => k !== "flv")) opened.push([k, await open(k)]);
  await sleep(12000); // plain HLS starts ~3 segments behind: let every player settle
  const from = Date.now();
  const c1 = cpuSecs(server.proc.pid);
  await sleep(WINDOW_S * 1000);
  const withHls = (cpuSecs(server.proc.pid) - c1) / WINDOW_S;
  const metrics = await (await fetch(`http://${server.addr}/metrics`)).text();
  const rows = [];
  for (const [kind, page] of opened) {
    const name = names[kind];
    const { samples, errors } = await page.evaluate(() => ({ samples: window.samples, errors: window.errors }));
    const lat = samples.filter((s) => s.t >= from && s.n > 0).map((s) => s.t - (pub.t0 + (s.n * 1000) / FPS));
    const win = samples.filter((s) => s.t >= from);
    rows.push({ name, frames: lat.length, p50: pct(lat, 50), p90: pct(lat, 90), min: pct(lat, 0), errors: errors.length,
      buffer: pct(win.map((s) => s.buf), 50), est: pct(win.map((s) => s.est ?? NaN), 50), target: win.at(-1)?.target });
  }
  console.log(`binary ${BIN}; ${os.cpus().length} cores (${os.cpus()[0].model}); window ${WINDOW_S} s; GOP ${GOP} frames at ${FPS} fps; ` +
    `HLS players joined ${WARM_S} s after the packager started`);
  console.log("| player | frames presented | latency p50 | p90 | min | buffered ahead p50 | hls.js latency estimate / target | fatal errors |");
  console.log("|---|---|---|---|---|---|---|---|");
  const f2 = (x) => (typeof x === "number" && Number.isFinite(x) ? x.toFixed(2) : "-");
  for (const r of rows) {
    console.log(`| ${r.name} | ${r.frames} | ${f2(r.p50 / 1000)} s | ${f2(r.p90 / 1000)} s | ${f2(r.min / 1000)} s | ${f2(r.buffer)} s | ${f2(r.est)} / ${f2(r.target)} s | ${r.errors} |`);
  }
  console.log(`server CPU: FLV player alone ${(flvOnly * 100).toFixed(1)} % of a core; FLV + ${opened.length - 1} HLS players ${(withHls * 100).toFixed(1)} %; ` +
    `HLS packaging and serving on top: ${((withHls - flvOnly) * 100).toFixed(1)} % of a core`);
  console.log(metrics.split("\n").filter((l) => l.startsWith("cohost_hls_")).join("\n"));
} finally {
  await browser.close();
  rmSync(dir, { recursive: true, force: true });
  pages.close();
  pub.proc.kill("SIGTERM");
  server.proc.kill("SIGTERM");
}
