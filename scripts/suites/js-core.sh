#!/usr/bin/env bash
# Runs the matrix-js-sdk client suite (tests/js) against a homeserver.
#
#   HS_KIND=tessera (default)  runs $TESSERA_NODE_BIN (default target/debug/tessera-node)
#   HS_KIND=synapse            runs Synapse (installs it with scripts/install-synapse.sh)
#
# Idempotent; installs Node.js/npm and Python from Debian if missing. Exits
# non-zero when any test fails, and ends with the test runner's summary.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
export HS_KIND="${HS_KIND:-tessera}"
export TESSERA_NODE_BIN="${TESSERA_NODE_BIN:-target/debug/tessera-node}"

SUITE=js-core
# shellcheck source=../lib/suite.sh
. "$REPO_ROOT/scripts/lib/suite.sh"

command -v node >/dev/null 2>&1 || apt_install nodejs npm
command -v npm >/dev/null 2>&1 || apt_install npm
command -v python3 >/dev/null 2>&1 || apt_install python3

node_major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$node_major" -lt 20 ]; then
    echo "js-core: Node.js >= 20 is required, found $(node --version)" >&2
    exit 1
fi

prepare_server_under_test

cd "$REPO_ROOT/tests/js"
# npm ci is fast when node_modules already matches the lockfile.
npm ci --no-audit --no-fund --loglevel=error

log="$(mktemp -t js-core-XXXXXX.tap)"
set +e
# --test-force-exit: matrix-js-sdk leaves timers behind after stopClient()
# (its capability poller and per-request timeouts), which would keep the
# test process alive after the last test.
node --import ./support/node20.js --test --test-force-exit --test-concurrency=1 --test-reporter=tap ./*.test.js 2>&1 | tee "$log"
status="${PIPESTATUS[0]}"
set -e

echo
echo "== js-core against $HS_KIND: summary =="
grep -E '^# (tests|suites|pass|fail|cancelled|skipped|todo|duration_ms) ' "$log" || echo "(no summary from the test runner)"
passed="$(sed -n 's/^# pass \([0-9]*\)$/\1/p' "$log" | tail -1)"
failed="$(sed -n 's/^# fail \([0-9]*\)$/\1/p' "$log" | tail -1)"
echo "${passed:-0} passed, ${failed:-0} failed"
rm -f "$log"
if [ "$status" -eq 0 ] && { [ -z "$failed" ] || [ "$failed" -ne 0 ] || [ "${passed:-0}" -eq 0 ]; }; then
    # A zero exit with no passing tests, or with failures, is still a failure.
    status=1
fi
exit "$status"
