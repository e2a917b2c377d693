#!/usr/bin/env bash
# The measurements that need a quiet machine with many cores, in one bounded
# run (about six minutes on 16 cores), so that the load generators never
# share cores with the server under test:
#
#   1. Relay peak (bench/relay-peak.sh): coturn and tessera-relay in turn at
#      1 and at 4 relay threads, driven past saturation by generators on the
#      other cores.
#   2. Node delivery latency: the one-room plan (50 members, all syncing) in
#      open loop at 20 and at 1,000 sends/s, the node on 2 cores (2 shards,
#      like the 2-core development machine) and on 8 cores (8 shards), the
#      generator on cores of its own.
#
#   BIN=dir-with-release-binaries OUT=/tmp/many-core bash bench/many-core.sh
#
# BIN holds tessera-node, tessera-relay and tessera-loadtest (release
# builds); coturn's turnserver, jq, ss, curl and taskset must be on PATH.
# Environment (defaults in brackets):
#   PARTS        which parts, in order [relay node]
#   RELAY_SETS   relay runs as THREADS:GENS:RATES[:BURST[:GSO]] (rates
#                comma-separated; BURST and GSO as in bench/relay-peak.sh,
#                1 and 0 when left out), e.g. 4:12:400000,800000:8:1 for
#                bursts of 8 sent as GSO messages and received coalesced
#                [1:4:40000,80000,120000,160000 4:12:150000,300000,450000,600000
#                4:12:400000,800000,1200000:8:1]
#   RELAY_DURATION  measured seconds per relay run [5]
#   NODE_SETS    node runs as CPUS:SHARDS:RATE[:MEMTABLE_MIB]
#                [0-1:2:20 0-1:2:1000 0-7:8:20 0-7:8:1000]; MEMTABLE_MIB sets
#                storage.memtable_mib (the default when left out)
#   NODE_BIN     the node binary [$BIN/tessera-node]
#   NODE_TOML    extra lines for the node's [runtime] table (printf %b),
#                e.g. "event_cache_kib = 0" []
#   ALLOCS       relay allocations carrying the packets [50]
#   NODE_GEN_CPUS   the generator's cores in the node runs [8-15]
#   NODE_DURATION   measured seconds per node run [15]
# Each part writes its outputs under OUT and prints a summary as it goes.
set -u
cd "$(dirname "$0")/.." || exit 1
BIN=${BIN:?BIN= a folder with release builds of tessera-node, tessera-relay and tessera-loadtest}
BIN=$(cd "$BIN" && pwd)
OUT=${OUT:-/tmp/many-core}
PARTS=${PARTS:-relay node}
RELAY_SETS=${RELAY_SETS:-"1:4:40000,80000,120000,160000 4:12:150000,300000,450000,600000 4:12:400000,800000,1200000:8:1"}
RELAY_DURATION=${RELAY_DURATION:-5}
NODE_SETS=${NODE_SETS:-"0-1:2:20 0-1:2:1000 0-7:8:20 0-7:8:1000"}
NODE_GEN_CPUS=${NODE_GEN_CPUS:-8-15}
NODE_BIN=${NODE_BIN:-$BIN/tessera-node}
NODE_TOML=${NODE_TOML:-}
NODE_DURATION=${NODE_DURATION:-15}
mkdir -p "$OUT"

{
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(free -g | awk '/^Mem:/ {print $2}') GiB; kernel $(uname -r)"
  echo "coturn: $(turnserver --version 2>/dev/null | head -n 1)"
} | tee "$OUT/machine.txt"

relay_part() {
  local set threads gens rates burst gso name
  for set in $RELAY_SETS; do
    IFS=: read -r threads gens rates burst gso <<<"$set"
    burst=${burst:-1} gso=${gso:-0}
    name=relay-$threads$([ "$burst" = 1 ] || echo "-burst$burst")$([ "$gso" = 1 ] && echo -gso)
    echo "== relay: $threads thread(s), $gens generator(s), rates ${rates//,/ }, bursts of $burst, gso $gso"
    THREADS=$threads GENS=$gens RATES=${rates//,/ } BURST=$burst GSO=$gso ROUNDS=1 DURATION=$RELAY_DURATION \
      LT="$BIN/tessera-loadtest" BIN="$BIN/tessera-relay" OUT="$OUT/$name" \
      bash bench/relay-peak.sh 2>&1 | tee "$OUT/$name.txt"
  done
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

node_pid=
stop_node() {
  [ -n "$node_pid" ] || return 0
  kill "$node_pid" 2>/dev/null
  for _ in $(seq 100); do kill -0 "$node_pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$node_pid" 2>/dev/null
  wait "$node_pid" 2>/dev/null
  node_pid=
}
trap stop_node EXIT

node_part() {
  local set cpus shards rate memtable dir port gen_threads
  gen_threads=$(taskset -c "$NODE_GEN_CPUS" nproc)
  [ "$gen_threads" -gt 4 ] && gen_threads=4
  echo "== node: one-room plan, open loop, generator on CPUs $NODE_GEN_CPUS with --threads $gen_threads" | tee "$OUT/node.txt"
  for set in $NODE_SETS; do
    IFS=: read -r cpus shards rate memtable <<<"$set"
    dir=$OUT/node-$shards-$rate${memtable:+-m$memtable}
    rm -rf "$dir" && mkdir -p "$dir"
    port=$(free_port)
    "$BIN/tessera-loadtest" server-config --kind tessera --port "$port" --data-dir "$dir" >/dev/null
    printf '\n[runtime]\nshards = %s\n%b\n' "$shards" "$NODE_TOML" >>"$dir/tessera.toml"
    [ -n "$memtable" ] && printf '\n[storage]\nmemtable_mib = %s\n' "$memtable" >>"$dir/tessera.toml"
    taskset -c "$cpus" "$NODE_BIN" --config "$dir/tessera.toml" >"$dir/node.log" 2>&1 &
    node_pid=$!
    for _ in $(seq 100); do
      curl -sf "http://127.0.0.1:$port/_matrix/client/versions" >/dev/null && break
      sleep 0.1
    done
    timeout $((NODE_DURATION + 70)) taskset -c "$NODE_GEN_CPUS" "$BIN/tessera-loadtest" run -q \
      -c loadtest/plans/one-room.toml -t "http://127.0.0.1:$port" --server-pid "$node_pid" \
      --mode open --rate "$rate" --duration "$NODE_DURATION" --precise-arrivals true \
      --threads "$gen_threads" --max-run $((NODE_DURATION + 60)) \
      -o "$dir/report" >"$dir/report.txt" 2>"$dir/err.txt"
    stop_node
    awk -v head="node CPUs $cpus, $shards shards, $rate sends/s${memtable:+, memtable_mib $memtable}:" \
      -f bench/node-summary.awk "$dir/report.txt" | tee -a "$OUT/node.txt"
  done
  rm -rf "$OUT"/node-*/data
}

for part in $PARTS; do
  "${part}_part"
done
