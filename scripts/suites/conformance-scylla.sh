#!/usr/bin/env bash
# The conformance suite (tests/conformance) with tessera-node on the CQL
# storage backend, against the Cassandra that scripts/test starts
# (TESSERA_TEST_CQL). Fails when no Cassandra is given.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if [ -z "${TESSERA_TEST_CQL:-}" ]; then
    echo "conformance-scylla: TESSERA_TEST_CQL is not set (scripts/test starts Cassandra; or scripts/cassandra.sh start)" >&2
    exit 1
fi
export HS_KIND=tessera TESSERA_HS_STORAGE=scylla
exec bash scripts/suites/conformance.sh
