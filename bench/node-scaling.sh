#!/usr/bin/env bash
# Node scaling with shards on a many-core machine: the same load against
# tessera-node with 1, 2, 4, 8 and 16 shards, from a multi-threaded
# tessera-loadtest, so the generator is not what saturates first.
#
#   bash bench/node-scaling.sh
#
# Expects release builds of tessera-node and tessera-loadtest in BIN
# (default: the current directory). Made for a 16-core machine: the node
# runs on cores 0-7 and the generator on cores 8-15 (taskset); on a machine
# with fewer cores the two halves of its cores are used instead. Every
# output goes under OUT. Environment (defaults in brackets):
#
#   SHARDS       shard counts to run [1 2 4 8 16]
#   THREADS      generator threads [8, at most the generator's cores]
#   NODE_CPUS    cores of the node [0-7]       GEN_CPUS  generator's [8-15]
#   CONCURRENCY  closed-loop senders over all threads [64]
#   DURATION, WARMUP, DRAIN   seconds of the load phase [12, 3, 5]
#   PORT         loopback port of the node [28008]
#   BIN, OUT     binaries [.], outputs [/tmp/out]
#
# Bounded: each shard count takes at most MAX_RUN + 30 seconds (node start
# 10 s, the generator's own limit MAX_RUN [60] plus 10 s before it is
# killed, node stop 10 s), so the default five counts finish within 7.5
# minutes even when something hangs; a normal run takes about 25 seconds per
# count.
set -u
BIN=${BIN:-.}
OUT=${OUT:-/tmp/out}
SHARDS=${SHARDS:-1 2 4 8 16}
CONCURRENCY=${CONCURRENCY:-64}
DURATION=${DURATION:-12}
WARMUP=${WARMUP:-3}
DRAIN=${DRAIN:-5}
MAX_RUN=${MAX_RUN:-60}
PORT=${PORT:-28008}
CORES=$(nproc)
if [ "$CORES" -ge 16 ]; then
  NODE_CPUS=${NODE_CPUS:-0-7}
  GEN_CPUS=${GEN_CPUS:-8-15}
else
  # A smaller machine (a smoke run): each side gets half the cores.
  half=$(( CORES / 2 > 0 ? CORES / 2 : 1 ))
  NODE_CPUS=${NODE_CPUS:-0-$(( half - 1 ))}
  GEN_CPUS=${GEN_CPUS:-$(( CORES > 1 ? half : 0 ))-$(( CORES - 1 ))}
fi
# Generator threads: one per generator core at most, by default 8.
gen_cores=$(taskset -c "$GEN_CPUS" nproc)
THREADS=${THREADS:-$(( gen_cores < 8 ? gen_cores : 8 ))}
mkdir -p "$OUT"
DATA=$OUT/scale-data
CONFIG=$OUT/scale.toml
{
  echo "machine: $CORES cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(free -g | awk '/^Mem:/ {print $2}') GiB; kernel $(uname -r)"
  echo "node on CPUs $NODE_CPUS, generator on CPUs $GEN_CPUS with --threads $THREADS; shards: $SHARDS"
  echo "load: 400 users in 40 rooms of 10, all syncing, $CONCURRENCY closed-loop senders, warm-up ${WARMUP}s + ${DURATION}s"
} | tee "$OUT/scaling.txt"

node_pid=
stop_node() {
  [ -n "$node_pid" ] || return 0
  kill "$node_pid" 2>/dev/null
  # SIGTERM drains within the node's grace period; then it is killed.
  for _ in $(seq 1 100); do kill -0 "$node_pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$node_pid" 2>/dev/null
  wait "$node_pid" 2>/dev/null
  node_pid=
}
trap stop_node EXIT

for shards in $SHARDS; do
  rm -rf "$DATA"
  cat > "$CONFIG" <<CFG
server_name = "localhost"
data_dir = "$DATA"
[listen]
address = "127.0.0.1:$PORT"
[registration]
enabled = true
[auth]
argon2_m_cost_kib = 64
argon2_t_cost = 1
[rate_limits]
enabled = false
[runtime]
shards = $shards
CFG
  taskset -c "$NODE_CPUS" "$BIN/tessera-node" --config "$CONFIG" > "$OUT/node-$shards.log" 2>&1 &
  node_pid=$!
  ready=no
  deadline=$(( SECONDS + 10 ))
  while [ "$SECONDS" -lt "$deadline" ]; do
    if curl -sf --max-time 1 "http://127.0.0.1:$PORT/_matrix/client/versions" >/dev/null; then ready=yes; break; fi
    sleep 0.1
  done
  if [ "$ready" != yes ]; then
    echo "== shards $shards: the node did not answer within 10 s; see $OUT/node-$shards.log" | tee -a "$OUT/scaling.txt"
    stop_node
    continue
  fi
  # --max-run bounds the run (requests in flight at its end may still take
  # their timeout): timeout is the backstop, and then there is no report.
  timeout $(( MAX_RUN + 10 )) taskset -c "$GEN_CPUS" "$BIN/tessera-loadtest" run -q \
    -t "http://127.0.0.1:$PORT" -s register,rooms,send,sync --threads "$THREADS" \
    --users 400 --rooms 40 --room-size 10 --mode closed --concurrency "$CONCURRENCY" \
    --duration "$DURATION" --warmup "$WARMUP" --drain "$DRAIN" --max-run "$MAX_RUN" \
    --server-pid "$node_pid" -o "$OUT/shards-$shards" > "$OUT/summary-$shards.txt" 2>&1
  status=$?
  {
    echo "== shards $shards$( [ "$status" -eq 0 ] || echo " (tessera-loadtest exited $status)")"
    grep -E "^(send |delivery |sync |server|generator|WARNING)" "$OUT/summary-$shards.txt"
  } | tee -a "$OUT/scaling.txt"
  stop_node
done
rm -rf "$DATA"
