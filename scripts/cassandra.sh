#!/usr/bin/env bash
# A throwaway single-node Apache Cassandra 5 on 127.0.0.1 for the CQL storage
# tests, from Maven Central jars (no tarball: we write our own config).
#
#   scripts/cassandra.sh start    # fetch jars once, start, wait until CQL answers
#   scripts/cassandra.sh status   # exit 0 when CQL answers
#   scripts/cassandra.sh stop     # stop it and delete its data
#   scripts/cassandra.sh ca       # path of the PEM that signs its TLS certificate
#                                 # (TLS is optional on the same port)
#
# Environment: CASSANDRA_PORT (CQL, default 9042), CASSANDRA_HEAP (1g; each
# table costs ~0.6 MiB of heap, so ~1,000 live tables need more),
# CASSANDRA_DIR (data and logs, default /tmp/tessera-cassandra-$PORT),
# CASSANDRA_START_TIMEOUT_S (180). Jars are cached in
# ~/.cache/tessera/cassandra/<version>.
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's:.*<cassandra.version>\(.*\)</cassandra.version>.*:\1:p' scripts/cassandra/pom.xml)
port=${CASSANDRA_PORT:-9042}
heap=${CASSANDRA_HEAP:-1g}
dir=${CASSANDRA_DIR:-${TMPDIR:-/tmp}/tessera-cassandra-$port}
jars=${XDG_CACHE_HOME:-$HOME/.cache}/tessera/cassandra/$version
pidfile=$dir/cassandra.pid

log() { echo "cassandra.sh: $*" >&2; }

# Sends a CQL OPTIONS frame (protocol v4) and expects SUPPORTED (opcode 6):
# native transport opens only once the node has fully started.
cql_answers() {
  local reply
  reply=$(timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port
    printf '\x04\x00\x00\x01\x05\x00\x00\x00\x00' >&3
    head -c 5 <&3 | od -An -tx1" 2>/dev/null) || return 1
  [ "$(echo "$reply" | awk '{print $5}')" = 06 ]
}

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

fetch_jars() {
  [ -f "$jars/.complete" ] && return 0
  if ! command -v java >/dev/null || ! command -v mvn >/dev/null; then
    bash scripts/install-deps.sh >&2
  fi
  log "fetching cassandra-all $version and its dependencies with Maven"
  mkdir -p "$jars"
  mvn -q -B -Dstyle.color=never -f scripts/cassandra/pom.xml dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$jars" >&2
  touch "$jars/.complete"
}

# A self-signed server certificate for 127.0.0.1 and cassandra.test; its
# PEM ($dir/tls/ca.pem, see `ca`) is the authority clients trust.
write_tls() {
  mkdir -p "$dir/tls"
  keytool -genkeypair -alias node -keyalg EC -groupname secp256r1 -sigalg SHA256withECDSA \
    -dname "CN=cassandra.test" -ext "SAN=dns:cassandra.test,ip:127.0.0.1" -ext "EKU=serverAuth" \
    -validity 30 -storetype PKCS12 -keystore "$dir/tls/keystore.p12" \
    -storepass tessera-test -keypass tessera-test >/dev/null 2>&1
  keytool -exportcert -rfc -alias node -keystore "$dir/tls/keystore.p12" -storepass tessera-test \
    -file "$dir/tls/ca.pem" >/dev/null 2>&1
}

write_config() {
  mkdir -p "$dir"/{data,commitlog,saved_caches,hints,cdc_raw,logs}
  write_tls
  cat >"$dir/cassandra.yaml" <<EOF
cluster_name: tessera-test
num_tokens: 1
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters: [{seeds: "127.0.0.1:$((port + 1))"}]
listen_address: 127.0.0.1
rpc_address: 127.0.0.1
storage_port: $((port + 1))
native_transport_port: $port
start_native_transport: true
auto_bootstrap: false
data_file_directories: [$dir/data]
commitlog_directory: $dir/commitlog
saved_caches_directory: $dir/saved_caches
hints_directory: $dir/hints
cdc_raw_directory: $dir/cdc_raw
commitlog_sync: periodic
commitlog_sync_period: 10000ms
# Event writes are logged batches; ScyllaDB's default limit is 1 MiB too.
batch_size_warn_threshold: 256KiB
batch_size_fail_threshold: 1024KiB
# Two shared cores: be patient rather than fail a test on a GC pause.
read_request_timeout: 10000ms
range_request_timeout: 10000ms
write_request_timeout: 10000ms
cas_contention_timeout: 10000ms
request_timeout: 10000ms
concurrent_reads: 8
concurrent_writes: 8
concurrent_counter_writes: 4
concurrent_compactors: 1
# Tests create and drop a keyspace each: no snapshots of dropped data.
auto_snapshot: false
# TLS on the same port, optional: plain and TLS clients both connect.
client_encryption_options:
  enabled: true
  optional: true
  keystore: $dir/tls/keystore.p12
  keystore_password: tessera-test
  store_type: PKCS12
  require_client_auth: false
EOF
  cat >"$dir/logback.xml" <<EOF
<configuration>
  <appender name="FILE" class="ch.qos.logback.core.FileAppender">
    <file>$dir/logs/system.log</file>
    <encoder><pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <root level="INFO"><appender-ref ref="FILE"/></root>
</configuration>
EOF
}

start() {
  if cql_answers; then log "already answering on 127.0.0.1:$port"; return 0; fi
  fetch_jars
  if ! running; then
    rm -rf "$dir"
    write_config
    # JVM options: the Java 17 module flags from Cassandra's own
    # jvm17-server.options, a small heap, C1 only and serial GC (startup
    # and CPU matter more than peak throughput on a 2-core test machine).
    local opens=(java.lang.module jdk.internal.loader jdk.internal.ref jdk.internal.reflect
      jdk.internal.math jdk.internal.module jdk.internal.util.jar sun.nio.ch java.io
      java.lang.reflect java.lang java.util)
    local args=(-Xms"$heap" -Xmx"$heap" -Xss256k -XX:+UseSerialGC -XX:TieredStopAtLevel=1
      -XX:+HeapDumpOnOutOfMemoryError -XX:HeapDumpPath="$dir/logs" -XX:+PerfDisableSharedMem
      -ea -da:net.openhft... -Djava.net.preferIPv4Stack=true -Djdk.attach.allowAttachSelf=true
      -Dio.netty.tryReflectionSetAccessible=true
      --add-exports java.base/jdk.internal.misc=ALL-UNNAMED
      --add-exports java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED
      --add-exports java.rmi/sun.rmi.registry=ALL-UNNAMED
      --add-exports java.rmi/sun.rmi.server=ALL-UNNAMED
      --add-exports java.sql/java.sql=ALL-UNNAMED
      --add-exports java.base/java.lang.ref=ALL-UNNAMED
      --add-exports jdk.unsupported/sun.misc=ALL-UNNAMED
      --add-exports jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED
      --add-exports jdk.attach/sun.tools.attach=ALL-UNNAMED
      --add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED
      --add-opens jdk.compiler/com.sun.tools.javac=ALL-UNNAMED
      -javaagent:"$(ls "$jars"/jamm-*.jar)"
      -Dcassandra-foreground=yes -Dcassandra.config="file://$dir/cassandra.yaml"
      -Dcassandra.storagedir="$dir" -Dcassandra.logdir="$dir/logs"
      -Dlogback.configurationFile="$dir/logback.xml"
      -Dcassandra.skip_wait_for_gossip_to_settle=0 -Dcassandra.ring_delay_ms=0
      -Dcassandra.superuser_setup_delay_ms=0 -Dcassandra.load_ring_state=false
      -Dcassandra.unsafesystem=true) # no flush of system tables per schema change: test data only
    local m; for m in "${opens[@]}"; do args+=(--add-opens "java.base/$m=ALL-UNNAMED"); done
    log "starting Cassandra $version on 127.0.0.1:$port (data and logs in $dir)"
    nohup java "${args[@]}" -cp "$jars/*" org.apache.cassandra.service.CassandraDaemon \
      >"$dir/logs/stdout.log" 2>&1 </dev/null &
    echo $! >"$pidfile"
  fi
  local deadline=$((SECONDS + ${CASSANDRA_START_TIMEOUT_S:-180}))
  until cql_answers; do
    if ! running; then
      log "Cassandra exited during startup; last lines of $dir/logs:"
      tail -n 30 "$dir/logs/stdout.log" "$dir/logs/system.log" >&2 2>/dev/null || true
      return 1
    fi
    if [ $SECONDS -ge $deadline ]; then log "CQL did not answer within the timeout"; return 1; fi
    sleep 0.5
  done
  log "CQL answers on 127.0.0.1:$port"
}

stop() {
  if running; then
    local pid; pid=$(cat "$pidfile")
    kill "$pid"
    # Cassandra's shutdown hook drains and exits; give it 30 s, then force.
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
    log "stopped"
  fi
  rm -rf "$dir"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) cql_answers ;;
  ca) echo "$dir/tls/ca.pem" ;;
  *) echo "usage: $0 start|stop|status|ca" >&2; exit 2 ;;
esac
