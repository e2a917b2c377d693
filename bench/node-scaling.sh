#!/usr/bin/env bash
# Node scaling with shards on a many-core machine: the same load, 1..8 shards.
set -u
# Expects tessera-node and tessera-loadtest (release builds) in the current
# directory; run it on a machine with 16 cores.
nproc; free -g | head -2
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
for shards in 1 2 4 8; do
  rm -rf /tmp/scale-data
  cat > /tmp/scale.toml <<CFG
server_name = "localhost"
data_dir = "/tmp/scale-data"
[listen]
address = "127.0.0.1:28008"
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
  # Node on cores 0..7, generator on cores 8..15.
  taskset -c 0-7 ./tessera-node --config /tmp/scale.toml > "$OUT/node-$shards.log" 2>&1 &
  pid=$!
  for i in $(seq 1 100); do curl -sf http://127.0.0.1:28008/_matrix/client/versions >/dev/null && break; sleep 0.1; done
  taskset -c 8-15 ./tessera-loadtest run -q -t http://127.0.0.1:28008 -s register,rooms,send,sync \
    --users 400 --rooms 40 --room-size 10 --mode closed --concurrency 64 --duration 12 --warmup 3 --drain 5 \
    --server-pid $pid -o "$OUT/shards-$shards" > "$OUT/summary-$shards.txt" 2>&1
  echo "== shards $shards"; grep -E "^(send |delivery |sync |server|generator)" "$OUT/summary-$shards.txt"
  kill $pid; wait $pid 2>/dev/null
done
