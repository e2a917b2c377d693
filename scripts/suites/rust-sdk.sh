#!/usr/bin/env bash
# Runs the matrix-rust-sdk client suite (tests/rust-sdk): the SDK under
# Element X, with its crypto machine, against a homeserver.
#
#   HS_KIND=tessera (default)  runs $TESSERA_NODE_BIN (default target/debug/tessera-node)
#   HS_KIND=synapse            runs Synapse (installs it with scripts/install-synapse.sh)
#
# The suite is a cargo workspace of its own (its dependency tree is large);
# it builds into target/rust-sdk. Exits non-zero when any test fails.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
export HS_KIND="${HS_KIND:-tessera}"
export TESSERA_NODE_BIN="${TESSERA_NODE_BIN:-target/debug/tessera-node}"
case "$TESSERA_NODE_BIN" in /*) ;; *) TESSERA_NODE_BIN="$REPO_ROOT/$TESSERA_NODE_BIN" ;; esac

SUITE=rust-sdk
# shellcheck source=../lib/suite.sh
. "$REPO_ROOT/scripts/lib/suite.sh"

command -v python3 >/dev/null 2>&1 || apt_install python3
prepare_server_under_test

CARGO_TARGET_DIR="$REPO_ROOT/target/rust-sdk" cargo test --locked --manifest-path tests/rust-sdk/Cargo.toml
