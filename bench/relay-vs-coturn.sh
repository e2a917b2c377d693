#!/usr/bin/env bash
# Side-by-side TURN relay benchmark: coturn and tessera-relay in turn, with
# the same number of relay threads, on loopback, driven by the same
# turnutils_uclient load (channels, 50 and 200 clients, 160- and 1200-byte
# messages). Prints a markdown table: relayed packets/s, Mbit/s, loss, RTT,
# jitter, allocations/s and server CPU microseconds per relayed packet.
#
#   bench/relay-vs-coturn.sh            # THREADS=1 N=200 Z=5 by default
#   THREADS=2 N=500 Z=1 bench/relay-vs-coturn.sh
#   RELAY_BIN=/tmp/tessera-relay-old SERVERS=tessera bench/relay-vs-coturn.sh
#                                       # a given binary, e.g. for before/after
#   MODE=tcp LOADS="50:160" bench/relay-vs-coturn.sh
#                                       # clients over TCP (uclient -t): channels
#                                       # and UDP relay addresses as in the
#                                       # default mode, client data over TCP
#   MODE=tls LOADS="50:160" bench/relay-vs-coturn.sh
#                                       # the same over TLS (uclient -t -S; a
#                                       # self-signed certificate for both)
#   MODE=dtls LOADS="50:160" bench/relay-vs-coturn.sh
#                                       # clients over DTLS (uclient -S over
#                                       # UDP; a self-signed ECDSA certificate
#                                       # for both; uclient picks DTLS 1.0 or
#                                       # 1.2 per connection: coturn takes
#                                       # both, tessera-relay 1.2 only, and
#                                       # uclient retries)
#   MODE=tcp-relay LOADS="10:160" bench/relay-vs-coturn.sh
#                                       # TCP relay allocations (RFC 6062):
#                                       # uclient -T, every client connected to
#                                       # every other client's relay address
#
# Only loopback addresses are used; loopback peers are allowed explicitly on
# both servers (uclient's peer runs on 127.0.0.1).
set -u
cd "$(dirname "$0")/.."
THREADS=${THREADS:-1}
N=${N:-200}          # messages per client
Z=${Z:-5}            # ms between messages per client
LOADS=${LOADS:-"50:160 200:160 50:1200 200:1200"}
MODE=${MODE:-channels}
case "$MODE" in
  channels) UFLAGS=() ;;
  tcp) UFLAGS=(-t) ;;
  tls) UFLAGS=(-t -S) ;;
  dtls) UFLAGS=(-S) ;;
  tcp-relay) UFLAGS=(-T) ;;
  *) echo "MODE must be channels, tcp, tls, dtls or tcp-relay" >&2; exit 2 ;;
esac
PORT=${PORT:-36478}
PEER_PORT=$((PORT + 2))
TLS_PORT=$((PORT + 4))
UPORT=$PORT
case "$MODE" in tls | dtls) UPORT=$TLS_PORT ;; esac
USER=bench
PASS=benchpass
REALM=bench.test

command -v turnutils_uclient >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq coturn >/dev/null)
if [ -n "${RELAY_BIN:-}" ]; then
  BIN=$RELAY_BIN
else
  cargo build -q -p tessera-relay --release || exit 1
  BIN=${CARGO_TARGET_DIR:-target}/release/tessera-relay
fi
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done; rm -rf "$WORK"; }
trap cleanup EXIT

if [ "$MODE" = tls ]; then
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" >/dev/null 2>&1 || { echo "openssl failed" >&2; exit 1; }
  COTURN_TLS=(--tls-listening-port "$TLS_PORT" --cert "$WORK/cert.pem" --pkey "$WORK/key.pem")
  TESSERA_TLS="tls_listen = [\"127.0.0.1:$TLS_PORT\"]
tls_cert = \"$WORK/cert.pem\"
tls_key = \"$WORK/key.pem\""
elif [ "$MODE" = dtls ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" >/dev/null 2>&1 || { echo "openssl failed" >&2; exit 1; }
  COTURN_TLS=(--tls-listening-port "$TLS_PORT" --cert "$WORK/cert.pem" --pkey "$WORK/key.pem")
  TESSERA_TLS="dtls_listen = [\"127.0.0.1:$TLS_PORT\"]
dtls_cert = \"$WORK/cert.pem\"
dtls_key = \"$WORK/key.pem\""
else
  COTURN_TLS=(--no-tls)
  TESSERA_TLS=""
fi
COTURN_DTLS=(--no-dtls)
[ "$MODE" = dtls ] && COTURN_DTLS=()

turnutils_peer -L 127.0.0.1 -p "$PEER_PORT" >/dev/null 2>&1 &
PIDS+=($!)

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
wait_udp() { timeout 20 bash -c "until ss -lun | grep -q '127.0.0.1:$PORT '; do sleep 0.05; done"; }

start_coturn() {
  turnserver -n --listening-ip 127.0.0.1 --listening-port "$PORT" --relay-ip 127.0.0.1 \
    --relay-threads "$THREADS" --lt-cred-mech --user "$USER:$PASS" --realm "$REALM" \
    --allow-loopback-peers "${COTURN_TLS[@]}" "${COTURN_DTLS[@]}" --no-cli --min-port 61000 --max-port 64999 \
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
static_users = { $USER = "$PASS" }
max_allocations_per_user = 10000
allowed_peer_ranges = ["127.0.0.0/8"]
drain_secs = 0
$TESSERA_TLS
TOML
  "$BIN" --config "$WORK/relay.toml" 2>"$WORK/relay.log" &
  SERVER=$!
}

echo "| server | clients | bytes | relayed pkt/s | Mbit/s | loss % | RTT ms | jitter ms | alloc/s | CPU us/pkt | CPU s |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for server in ${SERVERS:-coturn tessera}; do
  for load in $LOADS; do
    m=${load%%:*}; len=${load##*:}
    # A fresh server per load: uclient exits without deleting its
    # allocations, and a reused ephemeral client port would then hit the
    # previous run's allocation (437).
    "start_$server"
    PIDS+=($SERVER)
    wait_udp || { echo "$server did not start"; exit 1; }
    # Allocation rate: m clients allocate (RTP+RTCP), bind and send one message.
    t0=$(date +%s.%N)
    timeout 120 turnutils_uclient "${UFLAGS[@]}" -u "$USER" -w "$PASS" -e 127.0.0.1 -r "$PEER_PORT" -m "$m" -n 1 -l 100 -p "$UPORT" 127.0.0.1 >"$WORK/a.log" 2>&1 || { echo "$server alloc run failed:" >&2; tail -n 5 "$WORK/a.log" >&2; }
    t1=$(date +%s.%N)
    # Two allocations per client (RTP and RTCP), one with -T (it implies -c).
    per=2; [ "$MODE" = tcp-relay ] && per=1
    allocs=$(awk -v m="$m" -v per="$per" -v a="$t0" -v b="$t1" 'BEGIN{printf "%.0f", per*m/(b-a)}')
    c0=$(cpu_ticks "$SERVER"); t0=$(date +%s.%N)
    timeout 300 turnutils_uclient "${UFLAGS[@]}" -u "$USER" -w "$PASS" -e 127.0.0.1 -r "$PEER_PORT" -m "$m" -n "$N" -l "$len" -z "$Z" -p "$UPORT" 127.0.0.1 >"$WORK/u.log" 2>&1
    t1=$(date +%s.%N); c1=$(cpu_ticks "$SERVER")
    sent=$(grep -o 'start_mclient: tot_send_msgs=[0-9]*' "$WORK/u.log" | tail -1 | cut -d= -f2)
    recv=$(grep -o 'tot_send_msgs=[0-9]*, tot_recv_msgs=[0-9]*' "$WORK/u.log" | tail -1 | sed 's/.*tot_recv_msgs=//')
    loss=$(grep -o 'Total lost packets [0-9]* ([0-9.]*%' "$WORK/u.log" | tail -1 | sed 's/.*(//; s/%//')
    rtt=$(grep -o 'Average round trip delay [0-9.]*' "$WORK/u.log" | tail -1 | awk '{print $5}')
    jit=$(grep -o 'Average jitter [0-9.]*' "$WORK/u.log" | tail -1 | awk '{print $3}')
    hz=$(getconf CLK_TCK)
    awk -v s="${sent:-0}" -v r="${recv:-0}" -v a="$t0" -v b="$t1" -v c0="$c0" -v c1="$c1" -v hz="$hz" -v len="$len" \
        -v srv="$server" -v m="$m" -v loss="${loss:-?}" -v rtt="${rtt:-?}" -v jit="${jit:-?}" -v al="$allocs" 'BEGIN{
      pk = s + r; w = b - a; cpu = (c1 - c0) / hz;
      printf "| %s | %d | %d | %.0f | %.1f | %s | %s | %s | %s | %.2f | %.2f |\n", srv, m, len, pk / w, pk * len * 8 / w / 1e6, loss, rtt, jit, al, (pk > 0 ? cpu * 1e6 / pk : 0), cpu }'
    kill "$SERVER"; wait "$SERVER" 2>/dev/null
    timeout 20 bash -c "while ss -lun | grep -q '127.0.0.1:$PORT '; do sleep 0.05; done"
  done
done
echo
echo "mode=$MODE threads=$THREADS N=$N Z=$Z $(nproc) CPUs; relayed packets = client->peer + peer->client messages."
