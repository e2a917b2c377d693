#!/usr/bin/env bash
# Runs the matrix-nio client suite (tests/nio): a Python client library,
# with its Olm/Megolm encryption, against a homeserver.
#
#   HS_KIND=tessera (default)  runs $TESSERA_NODE_BIN (default target/debug/tessera-node)
#   HS_KIND=synapse            runs Synapse (installs it with scripts/install-synapse.sh)
#   NIO_VENV                   venv for the suite (default: .venv-nio in the repo, git-ignored)
#
# Idempotent. Exits non-zero when any test fails, and ends with pytest's summary.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
export HS_KIND="${HS_KIND:-tessera}"
export TESSERA_NODE_BIN="${TESSERA_NODE_BIN:-target/debug/tessera-node}"
VENV="${NIO_VENV:-$REPO_ROOT/.venv-nio}"

SUITE=nio
# shellcheck source=../lib/suite.sh
. "$REPO_ROOT/scripts/lib/suite.sh"

command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv

prepare_server_under_test

if [ ! -x "$VENV/bin/python" ]; then
    if ! python3 -m venv "$VENV"; then
        apt_install python3-venv
        rm -rf "$VENV"
        python3 -m venv "$VENV"
    fi
fi
# python-olm ships wheels for common Pythons; elsewhere it builds from
# source against libolm.
if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r tests/nio/requirements.txt; then
    apt_install libolm-dev cmake build-essential python3-dev
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r tests/nio/requirements.txt
fi

log="$(mktemp -t nio-XXXXXX.log)"
set +e
"$VENV/bin/python" -m pytest tests/nio -p no:cacheprovider -q -rfE 2>&1 | tee "$log"
status="${PIPESTATUS[0]}"
set -e

echo
echo "== nio against $HS_KIND: summary =="
summary="$(grep -E '^(=+ )?[0-9]+ (passed|failed)|^(=+ )?no tests ran' "$log" | tail -1 || true)"
echo "${summary:-(no summary from pytest)}"
rm -f "$log"
exit "$status"
