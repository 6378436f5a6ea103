#!/usr/bin/env bash
# Side-by-side SFU benchmark: cohost and Janus (VideoRoom) driven by cohost-load with the same
# scenarios in one run. Prints the table and ratios; pass extra cohost-load flags through,
# e.g. `bash bench/sfu-vs-janus.sh --scenario fanout --subs 50`.
#
# Janus (libnice) cannot do ICE on loopback, and load traffic must stay on this machine, so the
# whole benchmark runs in a private network namespace created here, with a veth pair whose
# both ends stay inside it (10.213.0.1/24, no route out). Needs root, iproute2 and janus.
set -euo pipefail
cd "$(dirname "$0")/.."

NS="cohostbench$$"
IP=10.213.0.1
cargo build --release --bin cohost --bin cohost-load

cleanup() { ip netns del "$NS" 2>/dev/null || true; }
trap cleanup EXIT
ip netns add "$NS"
ip -n "$NS" link set lo up
# (A dummy interface would do, but this kernel has no dummy driver; veth is always there.)
ip -n "$NS" link add bench0 type veth peer name bench1
ip -n "$NS" addr add "$IP/24" dev bench0
ip -n "$NS" link set bench0 up
ip -n "$NS" link set bench1 up

ip netns exec "$NS" ./target/release/cohost-load --media-ip "$IP" "$@"
