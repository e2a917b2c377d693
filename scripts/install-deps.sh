#!/usr/bin/env bash
# Installs the system packages the test suites share, idempotently:
# coturn (turnutils_uclient, and turnserver as a reference peer),
# iproute2 (network namespaces for the relay's security tests), and a Java 17
# runtime plus Maven for the Cassandra that scripts/cassandra.sh runs (its
# keytool makes the test TLS certificate), and cmake for the aws-lc C build
# under the CQL driver's TLS support.
set -euo pipefail
need=()
command -v turnutils_uclient >/dev/null 2>&1 || need+=(coturn)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v java >/dev/null 2>&1 || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || need+=(maven)
command -v keytool >/dev/null 2>&1 || need+=(openjdk-17-jre-headless)
command -v cmake >/dev/null 2>&1 || need+=(cmake)
if [ ${#need[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-deps: missing ${need[*]} and no apt-get to install them" >&2
    exit 1
  fi
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
fi
# The Debian package starts a coturn service on some systems; tests start
# their own servers on free ports, so make sure none is left running.
if command -v systemctl >/dev/null 2>&1; then
  systemctl stop coturn >/dev/null 2>&1 || true
fi
echo "install-deps: ok"
