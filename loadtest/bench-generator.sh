#!/usr/bin/env bash
# Measures the generator itself, not a server: tessera-loadtest pinned to
# one core, against the fake_homeserver example (canned answers) on other
# cores. Shows how many requests/s one generator core sustains, open loop
# (fixed rates) and closed loop, with its own CPU use from each report.
#
#   loadtest/bench-generator.sh [BIN_DIR] [OUT_DIR]
#
# BIN_DIR holds tessera-loadtest and examples/fake_homeserver (release
# build: cargo build --release -p tessera-loadtest --example fake_homeserver).
set -euo pipefail
BIN=${1:-${CARGO_TARGET_DIR:-target}/release}
OUT=${2:-${OUT:-/tmp/generator-capacity}}
DURATION=${DURATION:-10}
LT=$BIN/tessera-loadtest
FAKE=$BIN/examples/fake_homeserver
mkdir -p "$OUT"
CORES=$(nproc)
if [ "$CORES" -ge 4 ]; then GEN_CPU=0; SRV_CPUS=1-$((CORES - 1)); SRV_THREADS=$((CORES - 1)); else GEN_CPU=0; SRV_CPUS=1; SRV_THREADS=1; fi
[ "$SRV_THREADS" -gt 6 ] && SRV_THREADS=6 && SRV_CPUS=1-6
PORT=${PORT:-18100}
taskset -c "$SRV_CPUS" "$FAKE" "127.0.0.1:$PORT" "$SRV_THREADS" 2>"$OUT/fake.log" &
FAKE_PID=$!
trap 'kill $FAKE_PID 2>/dev/null || true' EXIT
for i in $(seq 1 100); do
  if (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null; then break; fi
  sleep 0.05
done
COMMON=(-q -t "http://127.0.0.1:$PORT" -s register,rooms,send --users 200 --rooms 20 --room-size 10 --duration "$DURATION" --warmup 2 --connections 1024)
{
  echo "machine: $CORES cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); generator on CPU $GEN_CPU, fake server ($SRV_THREADS threads) on CPUs $SRV_CPUS"
  for rate in ${RATES:-10000 20000 30000 40000}; do
    taskset -c "$GEN_CPU" "$LT" run "${COMMON[@]}" --rate "$rate" -o "$OUT/open-$rate" >/dev/null
    echo "open loop $rate/s:"
    grep -E '^send|^generator' "$OUT/open-$rate/summary.txt"
  done
  for c in ${CONCURRENCY:-64 256}; do
    taskset -c "$GEN_CPU" "$LT" run "${COMMON[@]}" --mode closed --concurrency "$c" -o "$OUT/closed-$c" >/dev/null
    echo "closed loop, $c workers:"
    grep -E '^send|^generator' "$OUT/closed-$c/summary.txt"
  done
} | tee "$OUT/capacity.txt"
