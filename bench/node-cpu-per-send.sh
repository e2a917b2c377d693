#!/usr/bin/env bash
# Node CPU per accepted send under a fixed open-loop load: the one-room plan
# (50 members), sends only, RATE sends/s for 15 s after 3 s of warm-up. CPU
# time (user + system, from /proc) is a steadier A/B measure on a noisy
# machine than throughput. It includes the set-up (registration, joins).
#
#   bash bench/node-cpu-per-send.sh BIN NAME [RATE]     # RATE [1500]
#
# Environment: LT, the tessera-loadtest binary [target/release/tessera-loadtest].
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$1; name=$2; rate=${3:-1500}
LT=${LT:-$PWD/target/release/tessera-loadtest}
dir=/tmp/cpu-$name; rm -rf $dir; mkdir -p $dir
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
$LT server-config --kind tessera --port $port --data-dir $dir >/dev/null
$bin --config $dir/tessera.toml > $dir/node.log 2>&1 &
pid=$!
for i in $(seq 100); do curl -sf http://127.0.0.1:$port/_matrix/client/versions >/dev/null && break; sleep 0.1; done
$LT run -q -c "$root/loadtest/plans/one-room.toml" -t http://127.0.0.1:$port --server-pid $pid --max-run 60 -s register,rooms,send --mode open --rate $rate --duration 15 --precise-arrivals true -o $dir/report > $dir/report.txt 2>&1
cpu=$(awk '{print ($14+$15)/100}' /proc/$pid/stat)
kill $pid; wait $pid 2>/dev/null
sends=$(awk '$1=="send"{print $2+$11}' $dir/report.txt)
p99=$(awk '$1=="send"{print $8}' $dir/report.txt)
echo "$name rate $rate: node CPU ${cpu}s, sends $sends, send p99 $p99, CPU per send $(python3 -c "print(round($cpu*1e6/$sends,1))") us"
