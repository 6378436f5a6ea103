#!/usr/bin/env bash
# Latency behind live of HTTP-FLV, HLS and LL-HLS side by side, and the server's CPU for HLS on
# top of HTTP-FLV, for one room fed by an RTMP (ffmpeg) host passed through by the bridge.
# Installs what it needs on a fresh Debian machine, builds the release binary, and passes its
# arguments to bench/hls-latency.mjs, e.g.
#   bash bench/hls.sh --window 20 --gop 60
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v ffmpeg >/dev/null || need+=(ffmpeg)
command -v chromium >/dev/null || need+=(chromium)
command -v cmake >/dev/null || need+=(cmake)
command -v nasm >/dev/null || need+=(nasm)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
fi
[ -d tests/browser/node_modules/hls.js ] || (cd tests/browser && npm ci --no-audit --no-fund)
[ -d web/node_modules/mpegts.js ] || npm ci --prefix web --no-audit --no-fund

cargo build --release --bin cohost
node bench/hls-latency.mjs "$@"
