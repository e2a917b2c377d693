//! Measures what the tokio side-runtime bridge adds to a storage call made
//! from a glommio shard thread (`docs/benchmarks.md`, "CQL bridge").
//!
//! ```text
//! cargo run -p tessera-node --example bridge_latency                   # bridge only
//! cargo run -p tessera-node --example bridge_latency -- 127.0.0.1:9042 # + real CQL reads
//! ```
//!
//! 1. An empty future round trip (shard thread -> tokio -> shard thread),
//!    blocking like `Store` calls do, and awaited with one and 64 in flight.
//! 2. With a CQL contact point: the same single-row read through the
//!    `Cql` store from a shard thread, and directly on a tokio runtime with
//!    the scylla driver (no bridge); the difference is the bridge's cost
//!    under a real request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};
use tessera_node::config::Scylla;
use tessera_node::side::SideRuntime;
use tessera_node::storage::cql::Cql;
use tessera_node::storage::{Store, Table, Write};

const ROUND_TRIPS: usize = 20_000;
const READS: usize = 3_000;

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let pct = |p: f64| samples[((samples.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
    let mean = samples.iter().sum::<Duration>().as_secs_f64() * 1e6 / samples.len() as f64;
    println!("{name:<44} n={:<6} p50={:>7.1}us p90={:>7.1}us p99={:>7.1}us mean={:>7.1}us", samples.len(), pct(0.5), pct(0.9), pct(0.99), mean);
}

/// Runs the future `f` makes on a glommio executor thread, as a shard would.
fn on_shard<T, F, Fut>(f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + 'static,
{
    LocalExecutorBuilder::new(Placement::Unbound)
        .name("bench-shard")
        .io_memory(2 << 20)
        .spawn(f)
        .expect("glommio executor (needs locked memory: run as root or raise RLIMIT_MEMLOCK)")
        .join()
        .expect("shard thread")
}

fn bridge_only() {
    let side = Arc::new(SideRuntime::start("bench-side", 2, 1024, Duration::from_secs(5)).expect("side runtime"));
    let s = side.clone();
    let blocking = on_shard(move || async move {
        (0..ROUND_TRIPS)
            .map(|_| {
                let t = Instant::now();
                s.call(async {}).expect("call");
                t.elapsed()
            })
            .collect::<Vec<_>>()
    });
    report("bridge, blocking call (as Store)", blocking);

    let s = side.clone();
    let (one, many, rate) = on_shard(move || async move {
        {
            let mut one = Vec::with_capacity(ROUND_TRIPS);
            for _ in 0..ROUND_TRIPS {
                let t = Instant::now();
                s.call_async(async {}).await.expect("call");
                one.push(t.elapsed());
            }
            // 64 tasks on the shard, each with one call in flight.
            let start = Instant::now();
            let tasks: Vec<_> = (0..64)
                .map(|_| {
                    let s = s.clone();
                    glommio::spawn_local(async move {
                        let mut lat = Vec::with_capacity(ROUND_TRIPS / 64);
                        for _ in 0..ROUND_TRIPS / 64 * 4 {
                            let t = Instant::now();
                            s.call_async(async {}).await.expect("call");
                            lat.push(t.elapsed());
                        }
                        lat
                    })
                })
                .collect();
            let mut many = Vec::new();
            for t in tasks {
                many.extend(t.await);
            }
            let rate = many.len() as f64 / start.elapsed().as_secs_f64();
            (one, many, rate)
        }
    });
    report("bridge, awaited, 1 in flight", one);
    report("bridge, awaited, 64 in flight", many);
    println!("{:<44} {:.0} round trips/s", "bridge, awaited, 64 in flight", rate);
}

fn with_cql(point: String) {
    let keyspace = format!("bench_bridge_{}", std::process::id());
    let cfg = Scylla { contact_points: vec![point.clone()], keyspace: keyspace.clone(), ..Scylla::default() };
    let store = Arc::new(Cql::connect(&cfg).expect("connect"));
    store.write(vec![Write::put(Table::Meta, b"bench".to_vec(), b"".to_vec(), vec![7u8; 200])]).expect("write");

    let bridged_reads = |n: usize| {
        let s = store.clone();
        on_shard(move || async move {
            (0..n)
                .map(|_| {
                    let t = Instant::now();
                    s.get(Table::Meta, b"bench", b"").expect("get").expect("row");
                    t.elapsed()
                })
                .collect::<Vec<_>>()
        })
    };
    bridged_reads(READS); // warm-up: JIT, prepared statements, connections
    let bridged = bridged_reads(READS);

    // The same prepared read, straight on a tokio runtime: no bridge.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let direct = rt.block_on(async {
        use scylla::client::session_builder::SessionBuilder;
        use scylla::statement::Consistency;
        let session = SessionBuilder::new().known_node(&point).build().await.expect("session");
        let mut p = session.prepare(format!("SELECT v FROM {keyspace}.meta WHERE pk = ? AND ck = ?")).await.expect("prepare");
        p.set_consistency(Consistency::LocalQuorum);
        let key: (&[u8], &[u8]) = (b"bench", b"");
        let mut lat = Vec::with_capacity(READS);
        for _ in 0..READS {
            let t = Instant::now();
            let r = session.execute_unpaged(&p, key).await.expect("read").into_rows_result().expect("rows");
            assert_eq!(r.rows_num(), 1);
            lat.push(t.elapsed());
        }
        lat
    });
    // Once more, so neither side alone benefits from a warmer server.
    let bridged_again = bridged_reads(READS);
    report("CQL get through Cql (shard -> tokio -> shard)", bridged);
    report("CQL get, driver directly on tokio", direct);
    report("CQL get through Cql, again", bridged_again);
    rt.block_on(async {
        let session = scylla::client::session_builder::SessionBuilder::new().known_node(&point).build().await.expect("session");
        session.query_unpaged(format!("DROP KEYSPACE {keyspace}"), &[]).await.expect("drop keyspace");
    });
}

fn main() {
    bridge_only();
    if let Some(point) = std::env::args().nth(1) {
        with_cql(point);
    }
}
