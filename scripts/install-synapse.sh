#!/usr/bin/env bash
# Installs Synapse from PyPI into a virtual environment outside the repository,
# so the test suites can run against it (HS_KIND=synapse) and benchmarks can
# compare against it. Idempotent: a second run only checks the install.
#
#   SYNAPSE_VENV      where the venv lives (default ~/.cache/tessera/synapse-venv)
#   SYNAPSE_VERSION   optional pip version pin, e.g. "==1.140.0"
set -euo pipefail

SYNAPSE_VENV="${SYNAPSE_VENV:-$HOME/.cache/tessera/synapse-venv}"
SYNAPSE_VERSION="${SYNAPSE_VERSION:-}"

find_python() {
    for candidate in python3.12 python3.11 python3.10 python3; do
        if command -v "$candidate" >/dev/null 2>&1; then
            if "$candidate" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
                command -v "$candidate"
                return 0
            fi
        fi
    done
    return 1
}

if ! PY="$(find_python)"; then
    if command -v apt-get >/dev/null 2>&1; then
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3 python3-venv python3-dev
        PY="$(find_python)"
    else
        echo "install-synapse: no Python >= 3.10 found" >&2
        exit 1
    fi
fi

if [ -x "$SYNAPSE_VENV/bin/python" ] && "$SYNAPSE_VENV/bin/python" -c 'import synapse' 2>/dev/null \
    && [ -z "$SYNAPSE_VERSION" ]; then
    echo "install-synapse: already installed in $SYNAPSE_VENV ($("$SYNAPSE_VENV/bin/python" -c 'import synapse; print(synapse.__version__)'))"
    exit 0
fi

if [ ! -x "$SYNAPSE_VENV/bin/python" ]; then
    mkdir -p "$(dirname "$SYNAPSE_VENV")"
    if ! "$PY" -m venv "$SYNAPSE_VENV"; then
        # Debian's python3 needs python3-venv for ensurepip.
        if command -v apt-get >/dev/null 2>&1; then
            apt-get update -q
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
            rm -rf "$SYNAPSE_VENV"
            "$PY" -m venv "$SYNAPSE_VENV"
        else
            exit 1
        fi
    fi
fi

"$SYNAPSE_VENV/bin/python" -m pip install -q "matrix-synapse${SYNAPSE_VERSION}"
echo "install-synapse: installed $("$SYNAPSE_VENV/bin/python" -c 'import synapse; print(synapse.__version__)') in $SYNAPSE_VENV"
