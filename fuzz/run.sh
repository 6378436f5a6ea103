#!/usr/bin/env bash
# Build and run the cargo-fuzz targets, then print a summary per target.
#
# Usage: fuzz/run.sh [-t SECONDS] [-j PARALLEL] [TARGET...]
#   -t SECONDS   run time per target (libFuzzer -max_total_time), default 600
#   -j PARALLEL  targets run at once, default 1 (each fuzzer uses one core)
#   TARGET...    targets to run, default: every target in fuzz/Cargo.toml
# Environment: FUZZ_RSS_MB (default 2048), FUZZ_TIMEOUT (seconds per input, default 10),
#   FUZZ_NICE (default 10), FUZZ_ARGS (extra libFuzzer flags).
#
# Needs the nightly toolchain (cargo-fuzz builds with -Zsanitizer); this script does not
# download toolchains. Installs cargo-fuzz from crates.io if it is missing.
# Seeds: fuzz/seeds/TARGET, dictionaries: fuzz/dicts/TARGET.dict (both optional, committed).
# Corpora go to fuzz/corpus/TARGET, crashes to fuzz/artifacts/TARGET, logs to fuzz/logs/.
set -euo pipefail

secs=600
par=1
while getopts "t:j:h" o; do
  case $o in
    t) secs=$OPTARG ;;
    j) par=$OPTARG ;;
    *) sed -n '2,/^set /{/^#/p}' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))

here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
rss=${FUZZ_RSS_MB:-2048}
tmo=${FUZZ_TIMEOUT:-10}
nice_n=${FUZZ_NICE:-10}

if ! command -v rustup >/dev/null || ! rustup toolchain list | grep -q '^nightly'; then
  echo "error: the nightly Rust toolchain is required (cargo-fuzz needs -Zsanitizer)." >&2
  echo "       install it with: rustup toolchain install nightly" >&2
  exit 1
fi
echo "toolchain: $(rustup run nightly rustc --version)"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz missing: installing from crates.io"
  cargo install --locked cargo-fuzz
fi
echo "cargo-fuzz: $(cargo fuzz --version)"

all=$(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^cohost-fuzz$')
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets <<<"$all"
fi
for t in "${targets[@]}"; do
  if ! grep -qx "$t" <<<"$all"; then
    echo "error: unknown target '$t' (known: $(echo $all))" >&2
    exit 2
  fi
done

# Build first (the first build compiles cohost with sanitizers: several minutes), so that runs
# in parallel do not race on cargo's lock and each run's time is fuzzing time.
for t in "${targets[@]}"; do
  echo "building $t"
  nice -n "$nice_n" cargo +nightly fuzz build "$t"
done

mkdir -p logs
run_one() {
  local t=$1
  mkdir -p "corpus/$t" "artifacts/$t"
  # Small committed seeds (fuzz/seeds/TARGET) start the corpus if present.
  local seeds=()
  [ -d "seeds/$t" ] && seeds=("seeds/$t")
  # A dictionary of the format's keywords (fuzz/dicts/TARGET.dict) if present.
  local dict=()
  [ -f "dicts/$t.dict" ] && dict=("-dict=dicts/$t.dict")
  local log="logs/$t.log"
  local start=$SECONDS
  # Crashes are counted from the artifacts written after this mark (older ones may be kept).
  touch "logs/$t.start"
  # cargo fuzz exits non-zero when a crash is found; the summary reports it.
  nice -n "$nice_n" cargo +nightly fuzz run "$t" "corpus/$t" "${seeds[@]}" -- \
    -max_total_time="$secs" -rss_limit_mb="$rss" -timeout="$tmo" -print_final_stats=1 \
    -artifact_prefix="artifacts/$t/" "${dict[@]}" ${FUZZ_ARGS:-} >"$log" 2>&1 || true
  echo "$t $((SECONDS - start))" >"logs/$t.time"
}

if [ "$par" -le 1 ]; then
  for t in "${targets[@]}"; do echo "running $t for ${secs}s"; run_one "$t"; done
else
  running=0
  for t in "${targets[@]}"; do
    echo "running $t for ${secs}s"
    run_one "$t" &
    running=$((running + 1))
    if [ "$running" -ge "$par" ]; then wait -n || true; running=$((running - 1)); fi
  done
  wait
fi

summary=logs/summary-$(date -u +%Y%m%dT%H%M%S).md
echo "| target | finished (UTC) | seconds | executions | exec/s | cov | ft | corpus | crashes |" >"$summary"
echo "|---|---|---|---|---|---|---|---|---|" >>"$summary"
printf '\n%-18s %8s %12s %8s %8s %8s %8s %s\n' target secs execs exec/s cov ft corpus crashes
for t in "${targets[@]}"; do
  log="logs/$t.log"
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  eps=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  # The last status line ("#N DONE cov: X ft: Y corp: Z/...") carries the final coverage.
  last=$(grep -E '^#[0-9]+' "$log" | grep -E 'cov: ' | tail -1 || true)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' <<<"$last")
  crashes=$(find "artifacts/$t" -type f -newer "logs/$t.start" \
    \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' -o -name 'leak-*' \) | wc -l)
  dur=$(cut -d' ' -f2 "logs/$t.time" 2>/dev/null || echo "?")
  printf '%-18s %8s %12s %8s %8s %8s %8s %s\n' "$t" "$dur" "${execs:-?}" "${eps:-?}" \
    "${cov:-?}" "${ft:-?}" "${corp:-?}" "$crashes"
  echo "| $t | $(date -u -r "$log" '+%Y-%m-%d %H:%M') | $dur | ${execs:-?} | ${eps:-?} | ${cov:-?} | ${ft:-?} | ${corp:-?} | $crashes |" >>"$summary"
  if [ -z "$execs" ]; then
    echo "    $t did not run to the end: see fuzz/$log"
  fi
  if [ "$crashes" -gt 0 ]; then
    find "artifacts/$t" -type f -newer "logs/$t.start" | sed 's/^/    /'
    grep -m3 -E '^(==[0-9]+==ERROR|thread .* panicked|SUMMARY)' "$log" | sed 's/^/    /' || true
  fi
done
echo
echo "markdown table: fuzz/$summary"
