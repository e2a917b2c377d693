#!/usr/bin/env bash
# Measures the generator itself, not a server: tessera-loadtest pinned to
# THREADS cores (one generator thread each), against the fake_homeserver
# example (canned answers) on other cores. Shows how many requests/s the
# generator sustains per core, open loop (fixed rates) and closed loop, with
# its own CPU use from each report.
#
#   [THREADS=1] [DURATION=10] [RATES="..."] [CONCURRENCY="..."] \
#     loadtest/bench-generator.sh [BIN_DIR] [OUT_DIR]
#
# BIN_DIR holds tessera-loadtest and examples/fake_homeserver (release
# build: cargo build --release -p tessera-loadtest --bins --example fake_homeserver).
# THREADS (default 1) generator threads run on CPUs 0..THREADS-1
# (`--threads`); the fake server gets SRV_THREADS threads (default: the
# other cores, at most 6 per generator thread) on the CPUs after them.
# RATES and CONCURRENCY are totals over all generator threads.
set -euo pipefail
BIN=${1:-${CARGO_TARGET_DIR:-target}/release}
OUT=${2:-${OUT:-/tmp/generator-capacity}}
DURATION=${DURATION:-10}
THREADS=${THREADS:-1}
LT=$BIN/tessera-loadtest
FAKE=$BIN/examples/fake_homeserver
mkdir -p "$OUT"
CORES=$(nproc)
if ! [ "$THREADS" -ge 1 ] 2>/dev/null; then
  echo "THREADS=$THREADS: expected a positive integer" >&2; exit 2
fi
if [ "$CORES" -le "$THREADS" ]; then
  echo "THREADS=$THREADS needs at least $((THREADS + 1)) cores (one left for the fake server); this machine has $CORES" >&2
  exit 2
fi
GEN_CPUS=0-$((THREADS - 1))
FREE=$((CORES - THREADS))
SRV_THREADS=${SRV_THREADS:-$(( FREE < 6 * THREADS ? FREE : 6 * THREADS ))}
[ "$SRV_THREADS" -gt "$FREE" ] && SRV_THREADS=$FREE
if ! [ "$SRV_THREADS" -ge 1 ] 2>/dev/null; then echo "SRV_THREADS=$SRV_THREADS: expected a positive integer" >&2; exit 2; fi
SRV_CPUS=$THREADS-$((THREADS + SRV_THREADS - 1))
PORT=${PORT:-18100}
taskset -c "$SRV_CPUS" "$FAKE" "127.0.0.1:$PORT" "$SRV_THREADS" 2>"$OUT/fake.log" &
FAKE_PID=$!
trap 'kill $FAKE_PID 2>/dev/null || true' EXIT
for i in $(seq 1 100); do
  if (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null; then break; fi
  sleep 0.05
done
COMMON=(-q -t "http://127.0.0.1:$PORT" -s register,rooms,send --users 200 --rooms 20 --room-size 10 --duration "$DURATION" --warmup 2 --connections 1024 --threads "$THREADS")
{
  echo "machine: $CORES cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); generator ($THREADS threads) on CPUs $GEN_CPUS, fake server ($SRV_THREADS threads) on CPUs $SRV_CPUS"
  for rate in ${RATES:-10000 20000 30000 40000}; do
    taskset -c "$GEN_CPUS" "$LT" run "${COMMON[@]}" --rate "$rate" -o "$OUT/open-$rate" >/dev/null
    echo "open loop $rate/s:"
    grep -E '^send|^generator' "$OUT/open-$rate/summary.txt"
  done
  for c in ${CONCURRENCY:-64 256}; do
    taskset -c "$GEN_CPUS" "$LT" run "${COMMON[@]}" --mode closed --concurrency "$c" -o "$OUT/closed-$c" >/dev/null
    echo "closed loop, $c workers:"
    grep -E '^send|^generator' "$OUT/closed-$c/summary.txt"
  done
} | tee "$OUT/capacity.txt"
