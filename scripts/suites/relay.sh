#!/usr/bin/env bash
# Relay test suite: unit and netns integration tests (cargo test), then
# coturn's turnutils_uclient against tessera-relay on loopback (UDP with
# channels, Send indications, client-to-client, TURN REST secret, TCP, TLS,
# DTLS, TCP relay allocations of RFC 6062).
# Prints "N passed, M failed" last and exits non-zero on any failure.
set -u
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
PASS=0
FAIL=0
ok() { PASS=$((PASS + 1)); echo "ok   - $1"; }
bad() { FAIL=$((FAIL + 1)); echo "FAIL - $1"; }
finish() { echo "$PASS passed, $FAIL failed"; [ "$FAIL" -eq 0 ]; exit $?; }

# Dependencies (idempotent): coturn for turnutils_uclient/turnutils_peer,
# iproute2 for network namespaces, openssl for the test certificate.
need=()
command -v turnutils_uclient >/dev/null || need+=(coturn)
command -v ip >/dev/null || need+=(iproute2)
command -v openssl >/dev/null || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >/dev/null \
    || { bad "install ${need[*]}"; finish; }
fi

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
# The debug build is the one `cargo test` needs anyway; the benchmark script
# builds release.
if cargo build -q -p tessera-relay; then ok "build tessera-relay"; else bad "build tessera-relay"; finish; fi
BIN=$TARGET/debug/tessera-relay

# Unit, property and netns integration tests.
if cargo test -q -p tessera-relay 2>&1 | tee /tmp/tessera-relay-cargo-test.log | tail -n 30; [ "${PIPESTATUS[0]}" -eq 0 ]; then
  ok "cargo test -p tessera-relay"
else
  bad "cargo test -p tessera-relay"
fi

# --- uclient interop on loopback -------------------------------------------
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done; rm -rf "$WORK"; }
trap cleanup EXIT

openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" >/dev/null 2>&1 || bad "openssl self-signed cert"
# DTLS takes ECDSA certificates only; TLS keeps the RSA one.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
  -keyout "$WORK/dtls-key.pem" -out "$WORK/dtls-cert.pem" >/dev/null 2>&1 || bad "openssl self-signed ECDSA cert"

PORT=${RELAY_TEST_PORT:-34780}
TLS_PORT=$((PORT + 1))
PEER_PORT=$((PORT + 2))
METRICS_PORT=$((PORT + 3))
SECRET=interop-secret
cat > "$WORK/relay.toml" <<TOML
realm = "tessera.test"
listen = ["127.0.0.1:$PORT"]
tls_listen = ["127.0.0.1:$TLS_PORT"]
tls_cert = "$WORK/cert.pem"
tls_key = "$WORK/key.pem"
# DTLS on the TLS port number, over UDP (as 5349 serves both).
dtls_listen = ["127.0.0.1:$TLS_PORT"]
dtls_cert = "$WORK/dtls-cert.pem"
dtls_key = "$WORK/dtls-key.pem"
relay_ipv4 = "127.0.0.1"
min_port = 61000
max_port = 63999
threads = 2
io_memory_kib = 1024
rest_secrets = ["$SECRET"]
static_users = { ninefingers = "youhavetoberealistic" }
max_allocations_per_user = 2000
# uclient's peer and its client-to-client mode live on loopback: allowed
# here explicitly; the security tests run with the defaults.
allowed_peer_ranges = ["127.0.0.0/8"]
metrics_listen = "127.0.0.1:$METRICS_PORT"
drain_secs = 1
TOML

turnutils_peer -L 127.0.0.1 -p "$PEER_PORT" >"$WORK/peer.log" 2>&1 &
PIDS+=($!)
"$BIN" --config "$WORK/relay.toml" 2>"$WORK/relay.log" &
RELAY_PID=$!
PIDS+=($RELAY_PID)
# Wait for the relay's own readiness line (bounded), not a fixed sleep.
if timeout 20 tail -F -n +1 "$WORK/relay.log" 2>/dev/null | grep -q -m1 "tessera-relay ready"; then
  ok "relay started"
else
  bad "relay started"; cat "$WORK/relay.log"; finish
fi

# uclient prints "Total lost packets N (P%)" and "Total send dropped"; a run
# passes when it exits 0, sent messages, and lost none.
uclient() {
  local name=$1; shift
  local log="$WORK/uclient-$name.log"
  if timeout 60 turnutils_uclient "$@" 127.0.0.1 >"$log" 2>&1; then :; else
    bad "uclient $name (exit $?)"; tail -n 15 "$log"; return; fi
  local lost sent recv
  lost=$(grep -o 'Total lost packets [0-9]*' "$log" | tail -1 | awk '{print $4}')
  sent=$(grep -o 'start_mclient: tot_send_msgs=[0-9]*' "$log" | tail -1 | cut -d= -f2)
  recv=$(grep -o 'start_mclient: tot_send_msgs=[0-9]*, tot_recv_msgs=[0-9]*' "$log" | tail -1 | sed 's/.*tot_recv_msgs=//')
  if [ "${lost:-x}" = "0" ] && [ "${sent:-0}" -gt 0 ] && [ "$sent" = "$recv" ]; then
    ok "uclient $name: $sent/$recv msgs, 0 lost, $(grep -o 'Average round trip delay [0-9.]* ms' "$log" | tail -1)"
  else
    bad "uclient $name: sent=${sent:-?} recv=${recv:-?} lost=${lost:-?}"; tail -n 15 "$log"
  fi
}

U=(-u ninefingers -w youhavetoberealistic -e 127.0.0.1 -r "$PEER_PORT")
uclient udp-channels "${U[@]}" -m 10 -n 50 -l 160 -p "$PORT"
uclient udp-send-indications "${U[@]}" -s -m 10 -n 50 -l 160 -p "$PORT"
uclient udp-client-to-client "${U[@]}" -y -m 10 -n 50 -l 160 -p "$PORT"
uclient udp-rest-secret -W "$SECRET" -u "@uclient:tessera.test" -e 127.0.0.1 -r "$PEER_PORT" -m 10 -n 50 -l 160 -p "$PORT"
uclient udp-1200-bytes "${U[@]}" -m 20 -n 100 -l 1200 -p "$PORT"
uclient tcp "${U[@]}" -t -m 10 -n 50 -l 160 -p "$PORT"
uclient tcp-client-to-client "${U[@]}" -t -y -m 10 -n 50 -l 160 -p "$PORT"
uclient tls "${U[@]}" -t -S -m 5 -n 50 -l 160 -p "$TLS_PORT"
# DTLS (-S without -t). uclient picks DTLS 1.0 or 1.2 at random per
# connection; the relay answers 1.0 with a protocol_version alert (RFC 8996)
# and uclient connects again until it gets 1.2.
uclient dtls "${U[@]}" -S -m 5 -n 50 -l 160 -p "$TLS_PORT"
uclient dtls-send-indications "${U[@]}" -S -s -m 5 -n 50 -l 160 -p "$TLS_PORT"
uclient dtls-client-to-client "${U[@]}" -S -y -m 5 -n 50 -l 160 -p "$TLS_PORT"
uclient dtls-1200-bytes "${U[@]}" -S -m 5 -n 50 -l 1200 -p "$TLS_PORT"
# TCP relay allocations (RFC 6062): -T makes every client Connect to every
# other client's TCP relay address (each pair answers a ConnectionAttempt),
# then relays over the bound data connections; over TCP, then TLS.
R=(-u ninefingers -w youhavetoberealistic)
uclient tcp-relay "${R[@]}" -T -m 10 -n 50 -l 160 -p "$PORT"
uclient tcp-relay-1200-bytes "${R[@]}" -T -m 4 -n 50 -l 1200 -p "$PORT"
uclient tls-tcp-relay "${R[@]}" -T -S -m 4 -n 50 -l 160 -p "$TLS_PORT"

# Metrics endpoint answers and counted relayed packets.
if curl -sf "http://127.0.0.1:$METRICS_PORT/metrics" -o "$WORK/metrics.txt" 2>/dev/null \
   || (exec 3<>/dev/tcp/127.0.0.1/$METRICS_PORT && printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3 && cat <&3 >"$WORK/metrics.txt"); then
  if grep -q 'tessera_relay_packets_total{direction="to_peer"} [1-9]' "$WORK/metrics.txt"; then
    ok "metrics count relayed packets"
  else bad "metrics count relayed packets"; fi
  if grep -q '^tessera_relay_dtls_handshakes_total [1-9]' "$WORK/metrics.txt"; then
    ok "metrics count DTLS handshakes"
  else bad "metrics count DTLS handshakes: $(grep '^tessera_relay_dtls' "$WORK/metrics.txt")"; fi
  # 10 * 9 + 4 * 3 + 4 * 3 data connections from the -T runs above.
  if grep -q '^tessera_relay_tcp_connections_total 114$' "$WORK/metrics.txt"; then
    ok "metrics count TCP relay connections"
  else bad "metrics count TCP relay connections: $(grep '^tessera_relay_tcp_connections_total' "$WORK/metrics.txt")"; fi
else bad "metrics endpoint"; fi

# --- credentials minted by a running tessera-node ---------------------------
# The node's /voip/turnServer hands out TURN REST credentials for the same
# shared secret; the relay must accept them, and refuse expired ones.
NODE_BIN=${TESSERA_NODE_BIN:-$TARGET/debug/tessera-node}
if [ ! -x "$NODE_BIN" ]; then
  if cargo build -q -p tessera-node; then NODE_BIN=$TARGET/debug/tessera-node; else bad "build tessera-node"; fi
fi
NODE_PORT=$((PORT + 4))
cat > "$WORK/node.toml" <<TOML
server_name = "localhost"
data_dir = "$WORK/node-data"
[listen]
address = "127.0.0.1:$NODE_PORT"
[registration]
enabled = true
[auth]
argon2_m_cost_kib = 64
argon2_t_cost = 1
[turn]
uris = ["turn:127.0.0.1:$PORT?transport=udp"]
shared_secret = "$SECRET"
ttl_secs = 600
TOML
"$NODE_BIN" --config "$WORK/node.toml" >"$WORK/node.log" 2>&1 &
PIDS+=($!)
node_up=0
for _ in $(seq 1 300); do
  if curl -sf "http://127.0.0.1:$NODE_PORT/_matrix/client/versions" >/dev/null; then node_up=1; break; fi
  sleep 0.1
done
if [ "$node_up" = 1 ]; then
  token=$(curl -sf -XPOST "http://127.0.0.1:$NODE_PORT/_matrix/client/v3/register" \
    -d '{"username":"caller","password":"pw","auth":{"type":"m.login.dummy"}}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  creds=$(curl -sf -H "Authorization: Bearer $token" "http://127.0.0.1:$NODE_PORT/_matrix/client/v3/voip/turnServer")
  tu=$(printf '%s' "$creds" | python3 -c 'import json,sys; print(json.load(sys.stdin)["username"])')
  tp=$(printf '%s' "$creds" | python3 -c 'import json,sys; print(json.load(sys.stdin)["password"])')
  uclient node-minted-credentials -u "$tu" -w "$tp" -e 127.0.0.1 -r "$PEER_PORT" -m 5 -n 20 -l 160 -p "$PORT"
  # The same scheme with an expiry in the past must be refused.
  old_user="$(( $(date +%s) - 60 )):@caller:localhost"
  old_pass=$(printf '%s' "$old_user" | openssl dgst -sha1 -hmac "$SECRET" -binary | base64)
  if timeout 30 turnutils_uclient -u "$old_user" -w "$old_pass" -e 127.0.0.1 -r "$PEER_PORT" -m 1 -n 5 -l 160 -p "$PORT" 127.0.0.1 >"$WORK/uclient-expired.log" 2>&1 \
     && grep -q 'Total lost packets 0' "$WORK/uclient-expired.log"; then
    bad "expired credentials were accepted"
  else
    ok "expired credentials refused"
  fi
else
  bad "tessera-node for credential tests did not start"; tail -n 20 "$WORK/node.log"
fi

# Graceful drain: SIGTERM makes the relay exit 0 by itself.
kill -TERM "$RELAY_PID"
if timeout 15 tail --pid="$RELAY_PID" -f /dev/null && wait "$RELAY_PID"; then ok "SIGTERM drains and exits 0"; else bad "SIGTERM drain"; fi

finish
