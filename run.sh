#!/usr/bin/env bash
# Run cohost on its embedded defaults, on a fresh Debian machine too: installs what the build
# needs when it is missing (Debian cmake, nasm and pkg-config; the demo page's npm packages),
# then builds and starts the server: HTTP, signaling, the demo page at http://127.0.0.1:8080/
# and the embedded origin (RTMP on 127.0.0.1:1935). Extra arguments go to `cohost serve`.
set -euo pipefail
cd "$(dirname "$0")"
missing=()
for tool in cmake nasm pkg-config; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
  echo "installing ${missing[*]} (Debian packages; needs root)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# The demo page's player (mpegts.js) comes from npm, not from the repository.
if [ -f web/package.json ] && { [ ! -d web/node_modules ] || [ web/package-lock.json -nt web/node_modules/.package-lock.json ]; }; then
  npm ci --prefix web --no-audit --no-fund
fi
exec cargo run --release --locked --bin cohost -- serve "$@"
