#!/usr/bin/env bash
# An audience at platform scale: one room with 10,000 signaling-only audience members (WebSocket
# only, the way viewers of a live room chat and like while watching the CDN stream), 20 chat
# lines per second from different members and a like storm, plus a host publishing and a
# co-host receiving it in real time (cohost-load --scenario audience). Reports server memory
# per idle member, CPU, chat fan-out latency (sent -> last member) and the co-host pair's media
# latency before and during the storm. Builds release binaries and passes its arguments
# through, e.g.
#   bash bench/audience.sh --members 10000 --duration 20s
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cmake >/dev/null && command -v nasm >/dev/null || {
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q cmake nasm
}
# Every member is a socket in this process and one in the server: 2 x 10,000 file descriptors.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
cargo build --release --bin cohost --bin cohost-load
./target/release/cohost-load --scenario audience "$@"
