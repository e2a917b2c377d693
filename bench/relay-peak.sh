#!/usr/bin/env bash
# Peak TURN relaying: coturn and tessera-relay, one after the other, with the
# same number of relay threads, on loopback, each driven past saturation by
# the open-loop `tessera-loadtest run -s turn` at stepped packet rates. For
# the relay issue's target: at least 1.5x coturn's peak relayed packets/s at
# equal loss, and <= 5 us of relay CPU per relayed packet.
# (bench/relay-vs-coturn.sh uses turnutils_uclient, which paces itself and
# never saturates either server.)
#
#   bench/relay-peak.sh                          # THREADS=1 ROUNDS=2, default RATES
#   DURATION=3 ROUNDS=1 RATES="40000 120000" bench/relay-peak.sh   # quick check
#   THREADS=4 GENS=8 RATES="200000 400000 600000 800000" bench/relay-peak.sh
#   BIN=/tmp/tessera-relay-old SERVERS=tessera bench/relay-peak.sh
#
# What is counted: each generator keeps its share of ALLOCS allocations,
# each with a channel to the generator's echo peer on 127.0.0.1, and sends
# ChannelData packets round-robin over them; the peer echoes each one back
# through the relay. One round trip is 2 relayed packets (client->peer and
# peer->client). RATES are offered relayed packets/s (the generators send
# RATE/2 packets/s in all); "relayed pkt/s" is 2 x round trips back, over
# DURATION; loss % counts packets not back within 2 s of the end, plus send
# errors; "rcvbuf drops" are the host's UDP receive-buffer overflows during
# the run (the generator's echo peer asks for a 4 MiB buffer, so these are
# almost always the server's sockets). RTT runs from each packet's
# scheduled send time (open loop), so it includes the generator's own lag
# (its timer ticks each millisecond).
# Server CPU is utime+stime of the whole server process (all threads) from
# /proc/PID/stat over the generators' run: the load, the setup of the
# ALLOCS allocations (a few hundred STUN transactions) and at most 2 s
# idle. On loopback the kernel charges each datagram's delivery (the
# receiver's network stack included) to the sender, so a server's CPU per
# packet includes that cost, equally for both servers.
#
# The generator: the turn scenario runs on one thread of one
# tessera-loadtest, and on loopback it pays the same kernel cost per
# packet as the server (it sends and receives as many datagrams), so one
# generator core cannot saturate an efficient one-thread server. GENS runs
# that many generators side by side (rates and allocations split evenly)
# to use more cores. "gen-bound" marks runs where a generator used >= 90%
# of one core (or all of them >= 90% of their cores): the row then
# describes the generator, and a peak reached there is only a lower bound.
#
# Environment (defaults in brackets):
#   THREADS     relay threads of both servers [1]
#   GENS        tessera-loadtest processes driving the load [1]
#   ROUNDS      rounds; each round runs every rate against each server [2]
#   RATES       offered relayed packets/s [20000 40000 60000 80000 100000 140000]
#   DURATION    measured seconds per run [10]
#   ALLOCS      kept allocations carrying the packets, in all [50]
#   BYTES       payload bytes per packet [160]
#   BURST       packets sent back to back on one allocation per arrival (the
#               packets of a video frame) [1]; the relay may send such runs
#               to one destination as one UDP GSO message
#   GSO         1: each burst leaves the generator as one UDP GSO message and
#               the echo peer takes bursts coalesced (UDP_GRO) and echoes
#               them the same way [0]. On loopback this stands in for a
#               network card's GRO: a server socket with UDP_GRO gets each
#               burst as one message; one without it (coturn) gets the
#               datagrams one by one, split by the kernel
#   RELAY_TOML  extra lines for tessera-relay's config, e.g. "udp_gro = false" []
#   LOSS_MAX    loss % a run may have to count for the peak [1]
#   SERVERS     which servers, in order [coturn tessera]
#   SERVER_CPUS, GEN_CPUS   taskset CPU lists of the server and the
#               generators [0..THREADS-1 and the rest, when the machine has
#               more cores than THREADS; otherwise no pinning]; PIN=0: none
#   BIN, LT     tessera-relay and tessera-loadtest binaries [built with cargo
#               --release into ${CARGO_TARGET_DIR:-target}]
#   PORT        server port on 127.0.0.1 [36578]   OUT  keep reports here [temp]
#
# Pinning gives both servers the same THREADS cores: coturn runs a
# listener thread besides its --relay-threads (two busy threads at
# THREADS=1), and unpinned it would also use a second core.
#
# Runs alternate between the servers at each rate, so slow drifts of a
# shared machine hit both alike; each run gets a fresh server. coturn comes
# from Debian's package (installed with apt when missing), jq likewise.
# Both servers allow loopback peers explicitly and use the same TURN REST
# shared secret.
set -u
cd "$(dirname "$0")/.." || exit 1
THREADS=${THREADS:-1}
ROUNDS=${ROUNDS:-2}
RATES=${RATES:-"20000 40000 60000 80000 100000 140000"}
DURATION=${DURATION:-10}
ALLOCS=${ALLOCS:-50}
BYTES=${BYTES:-160}
BURST=${BURST:-1}
GSO=${GSO:-0}
RELAY_TOML=${RELAY_TOML:-}
LOSS_MAX=${LOSS_MAX:-1}
SERVERS=${SERVERS:-"coturn tessera"}
GENS=${GENS:-1}
PORT=${PORT:-36578}
SECRET=relay-peak-secret
REALM=bench.test
CORES=$(nproc)

for v in THREADS ROUNDS DURATION ALLOCS BYTES BURST GENS PORT; do
  if ! [ "${!v}" -ge 1 ] 2>/dev/null; then echo "$v=${!v}: expected a positive integer" >&2; exit 2; fi
done
if [ "${PIN:-1}" != 0 ] && [ "$CORES" -gt "$THREADS" ]; then
  SERVER_CPUS=${SERVER_CPUS-0-$((THREADS - 1))}
  GEN_CPUS=${GEN_CPUS-$THREADS-$((CORES - 1))}
else
  SERVER_CPUS=${SERVER_CPUS-}
  GEN_CPUS=${GEN_CPUS-}
fi
# Command prefixes, empty without pinning. The server must be started
# directly (not through a shell function) so that $! is its own pid.
SRV_PIN=(); GEN_PIN=()
if [ -n "$SERVER_CPUS" ]; then SRV_PIN=(taskset -c "$SERVER_CPUS"); fi
if [ -n "$GEN_CPUS" ]; then GEN_PIN=(taskset -c "$GEN_CPUS"); fi

missing=
command -v turnserver >/dev/null || missing="$missing coturn"
command -v jq >/dev/null || missing="$missing jq"
if [ -n "$missing" ]; then
  # shellcheck disable=SC2086 # a list of package names
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null) ||
    { echo "cannot install$missing" >&2; exit 1; }
fi
if [ -z "${BIN:-}" ] || [ -z "${LT:-}" ]; then
  cargo build -q --release -p tessera-relay -p tessera-loadtest || exit 1
fi
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/tessera-relay}
LT=${LT:-${CARGO_TARGET_DIR:-target}/release/tessera-loadtest}

WORK=$(mktemp -d)
KEEP=${OUT:+; reports in $OUT}
OUT=${OUT:-$WORK/out}
mkdir -p "$OUT"
SERVER=
cleanup() {
  if [ -n "$SERVER" ]; then kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
listening() { ss -lun | grep -q "127.0.0.1:$PORT "; }
wait_udp() { local _; for _ in $(seq 400); do listening && return 0; sleep 0.05; done; return 1; }
# Host-wide UDP receive-buffer overflows (any socket).
rcvbuf_errors() { awk '/^Udp:/ { if (!n++) for (i = 1; i <= NF; i++) col[$i] = i; else print $col["RcvbufErrors"] }' /proc/net/snmp; }
wait_closed() { local _; for _ in $(seq 400); do listening || return 0; sleep 0.05; done; return 1; }

if listening; then echo "127.0.0.1:$PORT is taken (set PORT)" >&2; exit 1; fi

start_coturn() {
  ${SRV_PIN[@]+"${SRV_PIN[@]}"} turnserver -n --listening-ip 127.0.0.1 --listening-port "$PORT" \
    --relay-ip 127.0.0.1 --relay-threads "$THREADS" --use-auth-secret \
    --static-auth-secret="$SECRET" --realm "$REALM" --allow-loopback-peers \
    --no-tls --no-dtls --no-tcp --no-cli --min-port 61000 --max-port 64999 \
    --total-quota 0 --user-quota 0 --log-file /dev/null --no-stdout-log >/dev/null 2>&1 &
  SERVER=$!
}

start_tessera() {
  cat > "$WORK/relay.toml" <<TOML
realm = "$REALM"
listen = ["127.0.0.1:$PORT"]
relay_ipv4 = "127.0.0.1"
min_port = 61000
max_port = 64999
threads = $THREADS
rest_secrets = ["$SECRET"]
max_allocations_per_user = 100000
allowed_peer_ranges = ["127.0.0.0/8"]
drain_secs = 0
$(printf '%b' "$RELAY_TOML")
TOML
  ${SRV_PIN[@]+"${SRV_PIN[@]}"} "$BIN" --config "$WORK/relay.toml" 2>"$WORK/relay.log" &
  SERVER=$!
}

# One run: prints "server rate round" and the numbers, space-separated.
run_one() {
  local server=$1 rate=$2 round=$3 dir g
  dir=$OUT/$server-$rate-$round
  mkdir -p "$dir"
  for g in $(seq "$GENS"); do
    cat > "$dir/plan-$g.toml" <<TOML
scenarios = ["turn"]
seed = $g
[load]
warmup_s = 0.0
duration_s = $DURATION
[turn]
server = "127.0.0.1:$PORT"
secret = "$SECRET"
allocate_rate_per_s = 0.0
relay_allocations = $(( (ALLOCS + GENS - 1) / GENS ))
packet_rate_per_s = $(awk -v r="$rate" -v n="$GENS" 'BEGIN{print r / 2 / n}')
packet_bytes = $BYTES
packet_burst = $BURST
packet_gso = $([ "$GSO" = 1 ] && echo true || echo false)
[limits]
max_run_s = $((DURATION + 60))
TOML
  done
  "start_$server"
  if ! wait_udp; then echo "$server did not start" >&2; return 1; fi
  local c0 c1 d0 d1 hz pids=()
  hz=$(getconf CLK_TCK)
  c0=$(cpu_ticks "$SERVER"); d0=$(rcvbuf_errors)
  for g in $(seq "$GENS"); do
    ${GEN_PIN[@]+"${GEN_PIN[@]}"} timeout $((DURATION + 90)) "$LT" run -q -c "$dir/plan-$g.toml" \
      -o "$dir/gen-$g" >"$dir/gen-$g.log" 2>&1 &
    pids+=($!)
  done
  for g in $(seq "$GENS"); do
    wait "${pids[$((g - 1))]}" ||
      { echo "$server $rate: generator $g failed:" >&2; tail -n 5 "$dir/gen-$g.log" >&2; }
  done
  if ! kill -0 "$SERVER" 2>/dev/null; then
    echo "$server exited during the run" >&2; wait "$SERVER" 2>/dev/null; SERVER=; return 1
  fi
  c1=$(cpu_ticks "$SERVER"); d1=$(rcvbuf_errors)
  kill "$SERVER"; wait "$SERVER" 2>/dev/null; SERVER=
  wait_closed || { echo "$server did not stop" >&2; return 1; }
  # Sums over the generators; latency percentiles cannot be merged, so with
  # GENS > 1 they are the worst generator's.
  local sums
  sums=$(for g in $(seq "$GENS"); do
      jq -r '[.ops.turn_relay.ok // 0, .ops.turn_relay.errors // 0,
        .ops.turn_relay.latency.p50_us // 0, .ops.turn_relay.latency.p99_us // 0,
        (.generator.cpu_user_s + .generator.cpu_system_s)] | map(tostring) | join(" ")' \
        "$dir/gen-$g/report.json" 2>/dev/null || echo "0 0 0 0 0"
    done | awk '{ ok += $1; err += $2; if ($3 > p50) p50 = $3; if ($4 > p99) p99 = $4; cpu += $5; if ($5 > top) top = $5 }
      END { print ok + 0, err + 0, p50 + 0, p99 + 0, cpu + 0, top + 0 }')
  # server rate round ok errors p50_us p99_us gen_cpu_s gen_top_cpu_s server_cpu_s rcvbuf_drops
  echo "$server $rate $round $sums $(awk -v a="$c0" -v b="$c1" -v hz="$hz" 'BEGIN{print (b - a) / hz}') $((d1 - d0))"
}

RESULTS=$OUT/results.txt
: > "$RESULTS"
for round in $(seq "$ROUNDS"); do
  for rate in $RATES; do
    for server in $SERVERS; do
      run_one "$server" "$rate" "$round" >> "$RESULTS" || echo "$server $rate round $round: no result" >&2
    done
  done
done

GEN_CORES=$CORES
if [ -n "$GEN_CPUS" ]; then GEN_CORES=$(taskset -c "$GEN_CPUS" nproc); fi
[ "$GEN_CORES" -gt "$GENS" ] && GEN_CORES=$GENS
echo "relayed packets = client->peer + peer->client (one round trip through the relay = 2); offered and"
echo "relayed in packets/s; CPU in % of one core over the ${DURATION} s load; RTT from scheduled send;"
echo "rcvbuf drops: host-wide UDP receive-buffer overflows during the run (see the header of $0)."
echo
echo "| server | round | offered pkt/s | relayed pkt/s | loss % | rcvbuf drops | RTT p50 ms | RTT p99 ms | server CPU s | server CPU % | CPU us/pkt | generator CPU % | note |"
echo "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"
# Each generator runs the turn scenario on one thread, so it is saturated
# ("gen-bound") from 90% of one core, or when all of them together use 90%
# of the cores they share.
awk -v d="$DURATION" -v lmax="$LOSS_MAX" -v order="$SERVERS" -v gc="$GEN_CORES" '
  {
    srv = $1; rate = $2; round = $3; ok = $4; err = $5; p50 = $6; p99 = $7
    gen = $8; gtop = $9; cpu = $10; drops = $11
    pk = 2 * ok / d; loss = (ok + err > 0) ? 100 * err / (ok + err) : 100
    us_pk = (ok > 0) ? cpu * 1e6 / (2 * ok) : 0
    genp = 100 * gen / d; gb = (100 * gtop / d >= 90 || genp >= 90 * gc)
    printf "| %s | %d | %d | %.0f | %.2f | %d | %.2f | %.2f | %.2f | %.0f | %.2f | %.0f | %s |\n",
      srv, round, rate, pk, loss, drops, p50 / 1000, p99 / 1000, cpu, 100 * cpu / d, us_pk, genp,
      (gb ? "gen-bound" : "")
    if (loss <= lmax && pk > peak[srv]) {
      peak[srv] = pk; at[srv] = rate; us[srv] = us_pk; pgen[srv] = genp; pgb[srv] = gb
    }
    if (gb) genbound[srv] = 1
  }
  END {
    print ""
    n = split(order, s, " ")
    for (i = 1; i <= n; i++) {
      if (!(s[i] in peak)) { printf "peak %s: no run with loss <= %s%%\n", s[i], lmax; continue }
      why = ""
      if (pgb[s[i]]) why = "; GENERATOR-BOUND: a lower bound on the server"
      else if (genbound[s[i]]) why = "; some runs were generator-bound"
      printf "peak %s: %.0f relayed pkt/s at loss <= %s%% (offered %d, %.2f us server CPU/pkt, generator %.0f%%)%s\n",
        s[i], peak[s[i]], lmax, at[s[i]], us[s[i]], pgen[s[i]], why
    }
    if (("coturn" in peak) && ("tessera" in peak) && peak["coturn"] > 0)
      printf "tessera / coturn peak: %.2fx (target >= 1.5x)\n", peak["tessera"] / peak["coturn"]
  }' "$RESULTS"
echo
echo "threads=$THREADS allocations=$ALLOCS bytes=$BYTES burst=$BURST gso=$GSO${RELAY_TOML:+ relay config: $RELAY_TOML} duration=${DURATION}s rounds=$ROUNDS generators=$GENS; $CORES CPUs" \
  "(server on ${SERVER_CPUS:-any}, generator on ${GEN_CPUS:-any})$KEEP"
