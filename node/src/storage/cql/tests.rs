//! Tests of the CQL backend. Those needing a database connect to the
//! Cassandra (or ScyllaDB) named by `TESSERA_TEST_CQL` (`host:port`), each
//! in a fresh keyspace that it drops at the end; `scripts/test` starts one
//! with `scripts/cassandra.sh start`. Without the variable they fail: a
//! backend that was not tested must not look green.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::storage::conformance;

fn contact_point() -> String {
    match std::env::var("TESSERA_TEST_CQL") {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "TESSERA_TEST_CQL is not set: the CQL backend tests need a running Cassandra or ScyllaDB. \
             Start one with `scripts/cassandra.sh start` and run with TESSERA_TEST_CQL=127.0.0.1:9042 \
             (scripts/test does both)"
        ),
    }
}

/// A keyspace name no other test (or earlier run) uses.
fn fresh_keyspace(tag: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("t_{tag}_{}_{nanos:08x}", std::process::id())
}

fn config(keyspace: &str) -> CqlConfig {
    CqlConfig { contact_points: vec![contact_point()], keyspace: keyspace.into(), ..CqlConfig::default() }
}

/// Drops the test's keyspace when the test ends, passed or not.
struct DropKeyspace(Arc<Cql>, String);

impl Drop for DropKeyspace {
    fn drop(&mut self) {
        if let Err(e) = self.0.raw(format!("DROP KEYSPACE IF EXISTS {}", self.1)) {
            eprintln!("could not drop test keyspace {}: {e}", self.1);
        }
    }
}

#[test]
fn conformance_against_cassandra() {
    let ks = fresh_keyspace("conf");
    let store = Arc::new(Cql::connect(&config(&ks)).expect("connect"));
    let _cleanup = DropKeyspace(store.clone(), ks);
    conformance::run_all(store);
}

#[test]
fn migrations_are_recorded_and_idempotent() {
    let ks = fresh_keyspace("mig");
    let store = Arc::new(Cql::connect(&config(&ks)).expect("first start"));
    let _cleanup = DropKeyspace(store.clone(), ks.clone());
    store.write(vec![Write::put(Table::Meta, b"k".to_vec(), b"".to_vec(), b"v".to_vec())]).expect("write");

    // A second start finds everything in place and keeps the data.
    let again = Cql::connect(&config(&ks)).expect("second start");
    assert_eq!(again.get(Table::Meta, b"k", b"").expect("get").as_deref(), Some(&b"v"[..]));
    let versions = again.raw_rows(format!("SELECT version FROM {ks}.schema_migrations")).expect("versions");
    assert_eq!(versions.len(), MIGRATIONS.len(), "each migration recorded once: {versions:?}");
    let tables = again.raw_rows(format!("SELECT table_name FROM system_schema.tables WHERE keyspace_name = '{ks}'")).expect("tables");
    for t in Table::ALL {
        assert!(tables.iter().any(|row| row.contains(t.name())), "table {} exists: {tables:?}", t.name());
    }

    // Row expiry follows the configuration on every start.
    let ttl_of = |store: &Cql, table: &str| -> String {
        let rows = store.raw_rows(format!("SELECT default_time_to_live FROM system_schema.tables WHERE keyspace_name = '{ks}' AND table_name = '{table}'")).expect("ttl");
        rows.join(",")
    };
    assert!(ttl_of(&again, "transactions").contains("86400"), "{}", ttl_of(&again, "transactions"));
    assert!(ttl_of(&again, "claimed_keys").contains("2592000"), "{}", ttl_of(&again, "claimed_keys"));
    assert!(ttl_of(&again, "timeline").contains("Int(0)"), "{}", ttl_of(&again, "timeline"));
    let changed = Cql::connect(&CqlConfig { transaction_ttl_secs: 3600, claimed_key_ttl_secs: 0, ..config(&ks) }).expect("start with other TTLs");
    assert!(ttl_of(&changed, "transactions").contains("3600"), "{}", ttl_of(&changed, "transactions"));
    assert!(ttl_of(&changed, "claimed_keys").contains("Int(0)"), "{}", ttl_of(&changed, "claimed_keys"));

    // A schema from a newer binary is refused rather than misread.
    again.raw(format!("INSERT INTO {ks}.schema_migrations (version, description) VALUES (9999, 'future')")).expect("insert");
    let err = Cql::connect(&config(&ks)).err().expect("newer schema must be refused").to_string();
    assert!(err.contains("9999") && err.contains("newer"), "{err}");
}

/// A port on which nothing listens.
fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn unreachable_config(point: String) -> CqlConfig {
    CqlConfig { contact_points: vec![point], connect_timeout_ms: 500, request_timeout_ms: 500, ..CqlConfig::default() }
}

#[test]
fn refused_connection_fails_fast_with_a_clear_error() {
    let point = format!("127.0.0.1:{}", closed_port());
    let start = Instant::now();
    let err = Cql::connect(&unreachable_config(point.clone())).err().expect("nothing listens there");
    assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
    assert!(matches!(err, StorageError::Unavailable(_)), "{err}");
    assert!(err.to_string().contains(&point), "names the address: {err}");
}

#[test]
fn silent_server_fails_within_the_connect_timeout() {
    // Accepts connections and never answers: a hung or firewalled database.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let point = listener.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().take(64) {
            held.push(conn);
        }
    });
    let start = Instant::now();
    let err = Cql::connect(&unreachable_config(point.clone())).err().expect("no CQL answer");
    assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
    assert!(matches!(err, StorageError::Unavailable(_)), "{err}");
    assert!(err.to_string().contains(&point), "names the address: {err}");
}

/// A TCP proxy in front of the database that can be cut (every connection
/// closed, new ones refused) and restored: the database going away and
/// coming back, without stopping the shared test server.
struct Proxy {
    addr: String,
    up: Arc<std::sync::atomic::AtomicBool>,
    conns: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    fn start(upstream: String) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let conns = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (up2, conns2) = (up.clone(), conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !up2.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is closed at once
                }
                let Ok(server) = std::net::TcpStream::connect(&upstream) else { continue };
                let mut registry = conns2.lock().expect("lock");
                for (mut from, mut to) in [(client.try_clone(), server.try_clone()), (server.try_clone(), client.try_clone())]
                    .into_iter()
                    .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
                registry.push(client);
                registry.push(server);
            }
        });
        Proxy { addr, up, conns }
    }

    fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().expect("lock").drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn database_outage_gives_unavailable_then_recovers() {
    let ks = fresh_keyspace("outage");
    let proxy = Proxy::start(contact_point());
    let cfg = CqlConfig { contact_points: vec![proxy.addr.clone()], request_timeout_ms: 1000, retries: 1, ..config(&ks) };
    let store = Arc::new(Cql::connect(&cfg).expect("connect through the proxy"));
    // Dropped through the proxy too: restored by the time the test ends.
    let _cleanup = DropKeyspace(store.clone(), ks);
    store.write(vec![Write::put(Table::Meta, b"before".to_vec(), b"".to_vec(), b"1".to_vec())]).expect("write");

    proxy.cut();
    let start = Instant::now();
    let err = store.get(Table::Meta, b"before", b"").expect_err("the database is gone");
    assert!(matches!(err, StorageError::Unavailable(_)), "{err}");
    assert!(start.elapsed() < Duration::from_secs(10), "fails within the timeouts, took {:?}", start.elapsed());
    let api = crate::error::ApiError::from(err);
    assert_eq!((api.status.as_u16(), api.errcode), (503, "M_UNKNOWN"), "clients are told to retry later");
    let err = store.write(vec![Write::put(Table::Meta, b"during".to_vec(), b"".to_vec(), b"2".to_vec())]).expect_err("write while gone");
    assert!(matches!(err, StorageError::Unavailable(_)), "{err}");

    // The driver reconnects by itself; wait (bounded) for the first success.
    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(60);
    let value = loop {
        match store.get(Table::Meta, b"before", b"") {
            Ok(v) => break v,
            Err(StorageError::Unavailable(e)) if Instant::now() < deadline => {
                eprintln!("still unavailable: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("no recovery: {e}"),
        }
    };
    assert_eq!(value.as_deref(), Some(&b"1"[..]), "data written before the outage is intact");
    store.write(vec![Write::put(Table::Meta, b"after".to_vec(), b"".to_vec(), b"3".to_vec())]).expect("write after recovery");
    assert_eq!(store.get(Table::Meta, b"after", b"").expect("get").as_deref(), Some(&b"3"[..]));
}

#[test]
fn every_scan_shape_has_its_own_statement() {
    let bounds = [Bound::Unbounded, Bound::Included(()), Bound::Excluded(())];
    let mut texts = std::collections::HashSet::new();
    for from in bounds {
        for to in bounds {
            for reverse in [false, true] {
                let kind = scan_kind(from, to, reverse);
                assert!((KIND_SCAN..KINDS).contains(&kind));
                let text = statement_text("ks.t", kind);
                assert_eq!(text.contains("ORDER BY ck DESC"), reverse, "{text}");
                assert_eq!(text.matches('?').count(), 2 + usize::from(from != Bound::Unbounded) + usize::from(to != Bound::Unbounded), "{text}");
                assert!(texts.insert(text));
            }
        }
    }
    assert_eq!(texts.len(), KINDS - KIND_SCAN);
}

#[test]
fn only_the_last_write_to_a_row_is_sent() {
    let writes = vec![
        Write::put(Table::Users, b"a".to_vec(), b"".to_vec(), b"1".to_vec()),
        Write::delete(Table::Users, b"b".to_vec(), b"".to_vec()),
        Write::delete(Table::Users, b"a".to_vec(), b"".to_vec()),
        Write::put(Table::Devices, b"a".to_vec(), b"".to_vec(), b"other table".to_vec()),
        Write::put(Table::Users, b"a".to_vec(), b"x".to_vec(), b"other ck".to_vec()),
    ];
    let kept: Vec<String> = last_write_per_row(writes).iter().map(|w| format!("{w:?}")).collect();
    assert_eq!(kept.len(), 4, "{kept:?}");
    assert!(kept[0].starts_with("Delete { table: Users, pk: [98]"), "order is kept: {kept:?}");
    assert!(kept[1].starts_with("Delete { table: Users, pk: [97]"), "the later delete of row a wins: {kept:?}");
}

/// The PEM that signed the test database's TLS certificate (scripts/test
/// exports it; `scripts/cassandra.sh ca` prints it).
fn tls_ca() -> std::path::PathBuf {
    match std::env::var("TESSERA_TEST_CQL_TLS_CA") {
        Ok(v) if !v.is_empty() => v.into(),
        _ => panic!("TESSERA_TEST_CQL_TLS_CA is not set: run with the path printed by `scripts/cassandra.sh ca` (scripts/test sets it)"),
    }
}

#[test]
fn tls_connections_verify_the_database_certificate() {
    let ks = fresh_keyspace("tls");
    // The certificate names 127.0.0.1, the contact point's address.
    let tls = CqlConfig { tls: true, tls_ca_file: Some(tls_ca()), ..config(&ks) };
    let store = Arc::new(Cql::connect(&tls).expect("TLS, checked against the address"));
    let _cleanup = DropKeyspace(store.clone(), ks.clone());
    store.write(vec![Write::put(Table::Meta, b"k".to_vec(), b"".to_vec(), b"over tls".to_vec())]).expect("write");
    // Checked against a configured name the certificate holds.
    let named = Cql::connect(&CqlConfig { tls_server_name: Some("cassandra.test".into()), ..tls.clone() }).expect("TLS, checked against a name");
    assert_eq!(named.get(Table::Meta, b"k", b"").expect("get").as_deref(), Some(&b"over tls"[..]));
    // A name the certificate does not hold, or authorities that did not
    // sign it, are refused.
    let quick = CqlConfig { connect_timeout_ms: 2_000, ..tls.clone() };
    let err = Cql::connect(&CqlConfig { tls_server_name: Some("other.test".into()), ..quick.clone() }).err().expect("wrong name refused").to_string();
    assert!(err.contains("cannot connect"), "{err}");
    let foreign = std::env::temp_dir().join(format!("tessera-foreign-ca-{}.pem", std::process::id()));
    std::fs::write(&foreign, FOREIGN_CA).expect("write foreign CA");
    let err = Cql::connect(&CqlConfig { tls_ca_file: Some(foreign.clone()), ..quick }).err().expect("foreign CA refused").to_string();
    assert!(err.contains("cannot connect"), "{err}");
    let _ = std::fs::remove_file(&foreign);
    // A CA file without certificates is a configuration error, before any connection.
    let empty = std::env::temp_dir().join(format!("tessera-empty-ca-{}.pem", std::process::id()));
    std::fs::write(&empty, "").expect("write empty CA");
    let err = Cql::connect(&CqlConfig { tls_ca_file: Some(empty.clone()), ..tls }).err().expect("empty CA refused").to_string();
    assert!(err.contains("no certificate"), "{err}");
    let _ = std::fs::remove_file(&empty);
}

/// A self-signed certificate for the same names that did not sign the test
/// database's certificate (public part only).
const FOREIGN_CA: &str = "-----BEGIN CERTIFICATE-----\n\
MIIBpTCCAUygAwIBAgIUDgAYQ7MYR0JOIv1n4fBsruE+Q3YwCgYIKoZIzj0EAwIw\n\
FzEVMBMGA1UEAwwMZm9yZWlnbi50ZXN0MCAXDTI2MTEyNjE1MjQxNloYDzIxMjYx\n\
MTAyMTUyNDE2WjAXMRUwEwYDVQQDDAxmb3JlaWduLnRlc3QwWTATBgcqhkjOPQIB\n\
BggqhkjOPQMBBwNCAAQhNkt7IBeoo0/UgKmfoNzk+G//EQlsBnKlbnBclxj7Vd+C\n\
HO+m5E7laFDyNSU6MAglRiT5SPl3mWCWDL3m8MLto3QwcjAdBgNVHQ4EFgQUagry\n\
/kR9ELF9XIlpC1lxbvyYZFAwHwYDVR0jBBgwFoAUagry/kR9ELF9XIlpC1lxbvyY\n\
ZFAwDwYDVR0TAQH/BAUwAwEB/zAfBgNVHREEGDAWhwR/AAABgg5jYXNzYW5kcmEu\n\
dGVzdDAKBggqhkjOPQQDAgNHADBEAiAbgpFUDMCxlGMIPXVZQzgt5h7wHmvbUGVs\n\
W5LsntAmVQIgB0ib3FtP1vg00Z38kMYPQm+GomfBZil5jsd3AQFOPuU=\n\
-----END CERTIFICATE-----\n";
