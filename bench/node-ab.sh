#!/usr/bin/env bash
# Two tessera-node binaries, A and B, under the same loadtest plan in
# alternating runs (A B A B ...), so a change to the node is measured against
# its base on the same machine in the same minutes.
#
#   A=/path/to/old/tessera-node B=target/release/tessera-node bash bench/node-ab.sh
#
# Environment (defaults in brackets):
#
#   A, B        the two node binaries (required)
#   LT          tessera-loadtest [target/release/tessera-loadtest]
#   PLAN        loadtest plan [loadtest/plans/one-room.toml]
#   FLAGS       extra loadtest flags, e.g. "-s register,rooms,send" []
#   ROUNDS      A/B pairs [2]
#   NODE_TOML   extra TOML appended to each node's config []
#   OUT         outputs [/tmp/node-ab]
#
# Each run is bounded by the generator's --max-run (MAX_RUN [60] s); the
# node is stopped with SIGTERM after its run. Prints one summary line per
# run (sends/s, send p99, deliveries/s, delivery p50/p99, syncs/s, RSS).
set -u
: "${A:?A= the base tessera-node binary}" "${B:?B= the changed tessera-node binary}"
LT=${LT:-target/release/tessera-loadtest}
PLAN=${PLAN:-loadtest/plans/one-room.toml}
FLAGS=${FLAGS:-}
ROUNDS=${ROUNDS:-2}
NODE_TOML=${NODE_TOML:-}
OUT=${OUT:-/tmp/node-ab}
MAX_RUN=${MAX_RUN:-60}
mkdir -p "$OUT"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

run_one() {
  local name=$1 bin=$2 dir=$3 port pid i
  rm -rf "$dir" && mkdir -p "$dir"
  port=$(free_port)
  "$LT" server-config --kind tessera --port "$port" --data-dir "$dir" >/dev/null
  [ -n "$NODE_TOML" ] && printf '%b\n' "$NODE_TOML" >>"$dir/tessera.toml"
  "$bin" --config "$dir/tessera.toml" >"$dir/node.log" 2>&1 &
  pid=$!
  for i in $(seq 100); do
    curl -sf "http://127.0.0.1:$port/_matrix/client/versions" >/dev/null && break
    sleep 0.1
  done
  # shellcheck disable=SC2086
  "$LT" run -q -c "$PLAN" -t "http://127.0.0.1:$port" --server-pid "$pid" --max-run "$MAX_RUN" $FLAGS -o "$dir/report" >"$dir/report.txt" 2>"$dir/err.txt"
  kill "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  awk -v head="$(printf '%-2s' "$name")" -f "$(dirname "$0")/node-summary.awk" "$dir/report.txt"
}

{
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); load average $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "plan: $PLAN $FLAGS"
  echo "A: $A"
  echo "B: $B"
} | tee "$OUT/summary.txt"
for round in $(seq "$ROUNDS"); do
  run_one A "$A" "$OUT/a$round" | tee -a "$OUT/summary.txt"
  run_one B "$B" "$OUT/b$round" | tee -a "$OUT/summary.txt"
done
