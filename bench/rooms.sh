#!/usr/bin/env bash
# What a live room costs: N rooms at once in one cohost process (cohost-load --scenario rooms),
# side by side with an ffmpeg -c copy relay into nginx-rtmp for the solo cases. Installs what it
# needs on a fresh Debian machine, builds release binaries and passes its arguments through, e.g.
#   bash bench/rooms.sh --rooms-case solo720 --rooms 20 --duration 20s --warmup 5s
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v ffmpeg >/dev/null || need+=(ffmpeg)
command -v nginx >/dev/null || need+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_rtmp_module.so ] || need+=(libnginx-mod-rtmp)
command -v cmake >/dev/null || need+=(cmake)
command -v nasm >/dev/null || need+=(nasm)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
fi

cargo build --release --bin cohost --bin cohost-load
./target/release/cohost-load --scenario rooms "$@"
