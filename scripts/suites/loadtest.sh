#!/usr/bin/env bash
# Load generator test suite: unit tests and end-to-end runs of every
# tessera-loadtest scenario against a real homeserver that the tests start.
#
#   HS_KIND=tessera (default)  tessera-node, built here (TESSERA_NODE_BIN
#                              overrides the binary)
#   HS_KIND=synapse            Synapse from scripts/install-synapse.sh
#   TURN_KIND=coturn (default) coturn's turnserver from Debian, for the turn
#                              scenario test (TURN_KIND=tessera: tessera-relay)
#
# Prints "N passed, M failed" last and exits non-zero on any failure.
set -u
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
PASS=0
FAIL=0
ok() { PASS=$((PASS + 1)); echo "ok   - $1"; }
bad() { FAIL=$((FAIL + 1)); echo "FAIL - $1"; }
finish() { echo "$PASS passed, $FAIL failed"; [ "$FAIL" -eq 0 ]; exit $?; }

export HS_KIND=${HS_KIND:-tessera}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}

case "$HS_KIND" in
  tessera)
    if [ -z "${TESSERA_NODE_BIN:-}" ]; then
      if cargo build -q -p tessera-node; then ok "build tessera-node"; else bad "build tessera-node"; finish; fi
      export TESSERA_NODE_BIN=$TARGET/debug/tessera-node
    fi
    ;;
  synapse)
    if bash scripts/install-synapse.sh; then ok "install Synapse"; else bad "install Synapse"; finish; fi
    ;;
  *) bad "HS_KIND=$HS_KIND (expected tessera or synapse)"; finish ;;
esac

export TURN_KIND=${TURN_KIND:-coturn}
if [ "$TURN_KIND" = coturn ] && ! command -v turnserver >/dev/null; then
  if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq coturn) >/dev/null; then
    ok "install coturn"
  else
    bad "install coturn"; finish
  fi
fi
if [ "$TURN_KIND" = tessera ] && [ -z "${TESSERA_RELAY_BIN:-}" ]; then
  if cargo build -q -p tessera-relay; then ok "build tessera-relay"; else bad "build tessera-relay"; finish; fi
  export TESSERA_RELAY_BIN=$TARGET/debug/tessera-relay
fi

LOG=${TMPDIR:-/tmp}/tessera-loadtest-cargo-test.log
if cargo test -p tessera-loadtest 2>&1 | tee "$LOG" | grep -E '^(test |test result|running|error|failures:|---- )'; [ "${PIPESTATUS[0]}" -eq 0 ]; then
  ok "cargo test -p tessera-loadtest (HS_KIND=$HS_KIND)"
else
  bad "cargo test -p tessera-loadtest (HS_KIND=$HS_KIND); full log: $LOG"
  grep -A 30 -- '^---- ' "$LOG" | head -n 120
fi

finish
