#!/usr/bin/env bash
# Runs the conformance suite (tests/conformance): responses validated against
# the Matrix spec's OpenAPI schemas, plus bad-input checks, against a homeserver.
#
#   HS_KIND=tessera (default)  runs $TESSERA_NODE_BIN (default target/debug/tessera-node)
#   HS_KIND=synapse            runs Synapse (installs it with scripts/install-synapse.sh)
#   MATRIX_SPEC_DIR            matrix-spec checkout (default: ../shared/matrix-spec beside the repo)
#   CONFORMANCE_VENV           venv for the suite (default: .venv-conformance in the repo, git-ignored)
#
# Idempotent. Writes docs/conformance-results.md (this kind's section). Exits
# non-zero when any test fails, and ends with pytest's summary.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
export HS_KIND="${HS_KIND:-tessera}"
export TESSERA_NODE_BIN="${TESSERA_NODE_BIN:-target/debug/tessera-node}"
VENV="${CONFORMANCE_VENV:-$REPO_ROOT/.venv-conformance}"

SUITE=conformance
# shellcheck source=../lib/suite.sh
. "$REPO_ROOT/scripts/lib/suite.sh"

command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv

spec_dir="${MATRIX_SPEC_DIR:-$REPO_ROOT/../shared/matrix-spec}"
if [ ! -d "$spec_dir/data/api/client-server" ]; then
    echo "conformance: Matrix spec not found at $spec_dir (set MATRIX_SPEC_DIR)" >&2
    exit 1
fi

prepare_server_under_test

if [ ! -x "$VENV/bin/python" ]; then
    if ! python3 -m venv "$VENV"; then
        apt_install python3-venv
        rm -rf "$VENV"
        python3 -m venv "$VENV"
    fi
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r tests/conformance/requirements.txt

log="$(mktemp -t conformance-XXXXXX.log)"
set +e
"$VENV/bin/python" -m pytest tests/conformance -p no:cacheprovider -q -rfE 2>&1 | tee "$log"
status="${PIPESTATUS[0]}"
set -e

echo
echo "== conformance against $HS_KIND: summary (details: docs/conformance-results.md) =="
summary="$(grep -E '^(=+ )?[0-9]+ (passed|failed)|^(=+ )?no tests ran' "$log" | tail -1 || true)"
echo "${summary:-(no summary from pytest)}"
count() { echo "$summary" | grep -oE "[0-9]+ $1" | grep -oE '[0-9]+' | head -1 || true; }
passed="$(count passed)"
failed="$(count failed)"
errors="$(count error)"
echo "${passed:-0} passed, $(( ${failed:-0} + ${errors:-0} )) failed"
rm -f "$log"
exit "$status"
