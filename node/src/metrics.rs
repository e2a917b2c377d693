//! Prometheus metrics of the node: per-shard counters, request counts and
//! latency histograms by endpoint, storage operation latencies, and the
//! usual `process_*` metrics, rendered in the text exposition format
//! (version 0.0.4) by [`render`].
//!
//! Every label value comes from a fixed set: endpoints are the route
//! table's templates (`/rooms/{room}/send/{kind}/{txn}`), methods outside
//! the standard ones are counted as `other`, and status codes are the ones
//! the node answers with. A client cannot add series.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use http::Method;

use crate::storage::{Row, Scan, StorageResult, Store, Table, Write};

/// Upper bounds of the latency histograms' buckets, in microseconds
/// (0.5 ms to 60 s; long-polling syncs land in the top ones).
pub const BUCKETS_US: [u64; 16] = [500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000, 60_000_000];

/// The endpoint label of a request the route table did not recognise.
pub const UNRECOGNIZED: &str = "unrecognized";
/// The endpoint label of a request refused before routing (its body was
/// too large or could not be read).
pub const UNROUTED: &str = "unrouted";
/// The endpoint label of CORS preflight (`OPTIONS`) requests.
pub const PREFLIGHT: &str = "preflight";

/// A latency histogram that any thread may update. The count is the sum
/// of the buckets (the last one past every bound), so a scrape racing an
/// update still reads buckets that add up to it.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

/// The bucket of a duration: the first bound it is within, or the last
/// bucket (past every bound).
fn bucket(us: u64) -> usize {
    BUCKETS_US.iter().position(|b| us <= *b).unwrap_or(BUCKETS_US.len())
}

impl Histogram {
    pub fn observe_us(&self, us: u64) {
        self.buckets[bucket(us)].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Counts {
        Counts { buckets: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)), sum_us: self.sum_us.load(Ordering::Relaxed) }
    }
}

/// A histogram's counts per bucket (not cumulative; the last past every
/// bound) and their sum.
#[derive(Clone, Copy, Default)]
struct Counts {
    buckets: [u64; BUCKETS_US.len() + 1],
    sum_us: u64,
}

impl Counts {
    fn observe_us(&mut self, us: u64) {
        self.buckets[bucket(us)] += 1;
        self.sum_us += us;
    }

    fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    fn add(&mut self, other: &Counts) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
        self.sum_us += other.sum_us;
    }
}

/// One endpoint's requests on one shard.
#[derive(Default)]
struct EndpointStats {
    /// Responses by status code.
    codes: Vec<(u16, u64)>,
    latency: Counts,
}

/// A request series: method and endpoint.
type Series = (&'static str, &'static str);

/// Requests by method and endpoint, kept by the shard that served them.
/// Only that shard writes it; a scrape reads every shard's.
#[derive(Default)]
pub struct Requests {
    by_endpoint: Mutex<HashMap<Series, EndpointStats>>,
}

impl Requests {
    pub fn record(&self, method: &Method, endpoint: &'static str, code: u16, us: u64) {
        let mut map = self.by_endpoint.lock().unwrap_or_else(|e| e.into_inner());
        let stats = map.entry((method_label(method), endpoint)).or_default();
        match stats.codes.iter_mut().find(|(c, _)| *c == code) {
            Some((_, n)) => *n += 1,
            None => stats.codes.push((code, 1)),
        }
        stats.latency.observe_us(us);
    }
}

/// The label of a request method: the standard ones by name, any other
/// as `other`.
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::HEAD => "HEAD",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// Node-wide counters, one slot per shard to keep cores from sharing cache lines.
#[derive(Default)]
pub struct ShardMetrics {
    pub requests: Requests,
    pub in_flight: AtomicU64,
    pub events_created: AtomicU64,
    pub event_batches: AtomicU64,
    pub syncs: AtomicU64,
    pub sync_waiting: AtomicU64,
    pub connections: AtomicU64,
    pub connections_refused: AtomicU64,
}

/// Adds one to a gauge while it lives (a waiting long-poll, a request
/// being handled), also when its future is dropped.
pub struct Held<'a>(&'a AtomicU64);

impl<'a> Held<'a> {
    pub fn new(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Held(gauge)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The storage operations timed by [`Instrumented`].
const STORE_OPS: [&str; 4] = ["get", "scan", "write", "insert_if_absent"];

/// Latencies and failures of storage operations, by operation.
#[derive(Default)]
pub struct StoreStats {
    latency: [Histogram; STORE_OPS.len()],
    errors: [AtomicU64; STORE_OPS.len()],
}

/// A store that times every operation of the store it wraps.
pub struct Instrumented {
    inner: std::sync::Arc<dyn Store>,
    stats: std::sync::Arc<StoreStats>,
}

impl Instrumented {
    pub fn new(inner: std::sync::Arc<dyn Store>, stats: std::sync::Arc<StoreStats>) -> Self {
        Instrumented { inner, stats }
    }

    fn timed<T>(&self, op: usize, f: impl FnOnce() -> StorageResult<T>) -> StorageResult<T> {
        let started = std::time::Instant::now();
        let result = f();
        self.stats.latency[op].observe_us(started.elapsed().as_micros() as u64);
        if result.is_err() {
            self.stats.errors[op].fetch_add(1, Ordering::Relaxed);
        }
        result
    }
}

impl Store for Instrumented {
    fn get(&self, table: Table, pk: &[u8], ck: &[u8]) -> StorageResult<Option<bytes::Bytes>> {
        self.timed(0, || self.inner.get(table, pk, ck))
    }

    fn scan(&self, scan: Scan<'_>) -> StorageResult<Vec<Row>> {
        self.timed(1, || self.inner.scan(scan))
    }

    fn write(&self, writes: Vec<Write>) -> StorageResult<()> {
        self.timed(2, || self.inner.write(writes))
    }

    fn insert_if_absent(&self, table: Table, pk: &[u8], ck: &[u8], value: &[u8]) -> StorageResult<Option<bytes::Bytes>> {
        self.timed(3, || self.inner.insert_if_absent(table, pk, ck, value))
    }

    fn flush(&self) -> StorageResult<()> {
        self.inner.flush()
    }
}

/// What a scrape reads besides the shards' counters.
pub struct Scrape<'a> {
    pub shards: &'a [ShardMetrics],
    pub store: &'a StoreStats,
    pub shard_count: usize,
}

/// Renders every metric in the text exposition format.
pub fn render(s: &Scrape<'_>) -> String {
    let mut out = String::with_capacity(16 << 10);
    let sum = |f: fn(&ShardMetrics) -> &AtomicU64| s.shards.iter().map(|m| f(m).load(Ordering::Relaxed)).sum::<u64>();

    // Requests, merged over the shards.
    let mut merged: HashMap<Series, (HashMap<u16, u64>, Counts)> = HashMap::new();
    for m in s.shards {
        let map = m.requests.by_endpoint.lock().unwrap_or_else(|e| e.into_inner());
        for (key, stats) in map.iter() {
            let entry = merged.entry(*key).or_default();
            for (code, n) in &stats.codes {
                *entry.0.entry(*code).or_default() += n;
            }
            entry.1.add(&stats.latency);
        }
    }
    let mut keys: Vec<_> = merged.keys().copied().collect();
    keys.sort_unstable();
    header(&mut out, "tessera_http_requests_total", "HTTP requests answered, by method, endpoint and status code.", "counter");
    for key in &keys {
        let mut codes: Vec<_> = merged[key].0.iter().map(|(c, n)| (*c, *n)).collect();
        codes.sort_unstable();
        for (code, n) in codes {
            let _ = writeln!(out, "tessera_http_requests_total{{method=\"{}\",endpoint=\"{}\",code=\"{code}\"}} {n}", key.0, key.1);
        }
    }
    header(&mut out, "tessera_http_request_duration_seconds", "Time from a request's arrival to its response, by method and endpoint.", "histogram");
    for key in &keys {
        histogram(&mut out, "tessera_http_request_duration_seconds", &format!("method=\"{}\",endpoint=\"{}\"", key.0, key.1), &merged[key].1);
    }
    gauge(&mut out, "tessera_http_requests_in_flight", "Requests being handled.", sum(|m| &m.in_flight));
    gauge(&mut out, "tessera_http_connections", "Open HTTP connections.", sum(|m| &m.connections));
    counter(&mut out, "tessera_http_connections_refused_total", "Connections closed at once because their shard had limits.connections_per_shard_max open.", sum(|m| &m.connections_refused));
    counter(&mut out, "tessera_events_created_total", "Room events created by this node.", sum(|m| &m.events_created));
    counter(&mut out, "tessera_event_batches_total", "Storage writes holding room events (group commits).", sum(|m| &m.event_batches));
    counter(&mut out, "tessera_syncs_total", "Sync requests answered.", sum(|m| &m.syncs));
    gauge(&mut out, "tessera_sync_waiting", "Sync long-polls waiting for something new.", sum(|m| &m.sync_waiting));
    gauge(&mut out, "tessera_shards", "Shards (executor threads) of this node.", s.shard_count as u64);

    header(&mut out, "tessera_store_operation_duration_seconds", "Time taken by storage operations, by operation.", "histogram");
    for (i, op) in STORE_OPS.iter().enumerate() {
        histogram(&mut out, "tessera_store_operation_duration_seconds", &format!("op=\"{op}\""), &s.store.latency[i].snapshot());
    }
    header(&mut out, "tessera_store_errors_total", "Storage operations that failed, by operation.", "counter");
    for (i, op) in STORE_OPS.iter().enumerate() {
        let _ = writeln!(out, "tessera_store_errors_total{{op=\"{op}\"}} {}", s.store.errors[i].load(Ordering::Relaxed));
    }

    header(&mut out, "tessera_build_info", "The running build (always 1).", "gauge");
    let _ = writeln!(out, "tessera_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
    process(&mut out);
    out
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    header(out, name, help, "counter");
    let _ = writeln!(out, "{name} {value}");
}

fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    header(out, name, help, "gauge");
    let _ = writeln!(out, "{name} {value}");
}

fn seconds(us: u64) -> String {
    format!("{}", us as f64 / 1e6)
}

fn histogram(out: &mut String, name: &str, labels: &str, c: &Counts) {
    let mut cumulative = 0;
    for (bound, n) in BUCKETS_US.iter().zip(c.buckets) {
        cumulative += n;
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{}\"}} {cumulative}", seconds(*bound));
    }
    let count = c.count();
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", seconds(c.sum_us));
    let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
}

/// The process metrics every Prometheus client library exports, read from
/// `/proc/self`. A value that cannot be read is left out.
fn process(out: &mut String) {
    // SAFETY: sysconf and getrlimit only read process-wide settings.
    let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
        && let Some(fields) = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect::<Vec<_>>())
        && fields.len() > 22
        && ticks > 0
    {
        // Fields after the command name, numbered from state (field 3 of proc(5)).
        let field = |n: usize| fields[n - 3].parse::<u64>().unwrap_or(0);
        let cpu = (field(14) + field(15)) as f64 / ticks as f64;
        header(out, "process_cpu_seconds_total", "User and system CPU time spent, in seconds.", "counter");
        let _ = writeln!(out, "process_cpu_seconds_total {cpu}");
        gauge(out, "process_threads", "Threads of the process.", field(20));
        gauge(out, "process_virtual_memory_bytes", "Virtual memory size in bytes.", field(23));
        gauge(out, "process_resident_memory_bytes", "Resident memory size in bytes.", field(24) * page.max(0) as u64);
        if let Some(boot) = boot_time() {
            let started = boot as f64 + field(22) as f64 / ticks as f64;
            header(out, "process_start_time_seconds", "Start time of the process since the Unix epoch, in seconds.", "gauge");
            let _ = writeln!(out, "process_start_time_seconds {started}");
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        gauge(out, "process_open_fds", "Open file descriptors.", dir.count() as u64);
    }
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes only the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        gauge(out, "process_max_fds", "Most open file descriptors allowed.", limit.rlim_cur);
    }
}

/// The system's boot time (seconds since the Unix epoch), from `/proc/stat`.
fn boot_time() -> Option<u64> {
    std::fs::read_to_string("/proc/stat").ok()?.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(shards: &[ShardMetrics]) -> String {
        render(&Scrape { shards, store: &StoreStats::default(), shard_count: shards.len() })
    }

    #[test]
    fn histograms_are_cumulative_and_merge_over_shards() {
        let shards = [ShardMetrics::default(), ShardMetrics::default()];
        shards[0].requests.record(&Method::GET, "/sync", 200, 300);
        shards[0].requests.record(&Method::GET, "/sync", 200, 30_000_000);
        shards[1].requests.record(&Method::GET, "/sync", 401, 2_000);
        shards[1].requests.record(&Method::from_bytes(b"BREW").expect("method"), UNRECOGNIZED, 404, 10);
        let out = scrape(&shards);
        for line in [
            "tessera_http_requests_total{method=\"GET\",endpoint=\"/sync\",code=\"200\"} 2",
            "tessera_http_requests_total{method=\"GET\",endpoint=\"/sync\",code=\"401\"} 1",
            "tessera_http_requests_total{method=\"other\",endpoint=\"unrecognized\",code=\"404\"} 1",
            "tessera_http_request_duration_seconds_bucket{method=\"GET\",endpoint=\"/sync\",le=\"0.0005\"} 1",
            "tessera_http_request_duration_seconds_bucket{method=\"GET\",endpoint=\"/sync\",le=\"0.0025\"} 2",
            "tessera_http_request_duration_seconds_bucket{method=\"GET\",endpoint=\"/sync\",le=\"10\"} 2",
            "tessera_http_request_duration_seconds_bucket{method=\"GET\",endpoint=\"/sync\",le=\"30\"} 3",
            "tessera_http_request_duration_seconds_bucket{method=\"GET\",endpoint=\"/sync\",le=\"+Inf\"} 3",
            "tessera_http_request_duration_seconds_sum{method=\"GET\",endpoint=\"/sync\"} 30.0023",
            "tessera_http_request_duration_seconds_count{method=\"GET\",endpoint=\"/sync\"} 3",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
        }
    }

    #[test]
    fn a_duration_past_the_last_bound_counts_only_in_inf() {
        let mut c = Counts::default();
        c.observe_us(BUCKETS_US[BUCKETS_US.len() - 1] + 1);
        assert_eq!((c.buckets[..BUCKETS_US.len()].iter().sum::<u64>(), c.count()), (0, 1));
        let mut out = String::new();
        histogram(&mut out, "h", "a=\"b\"", &c);
        assert!(out.contains("h_bucket{a=\"b\",le=\"60\"} 0\nh_bucket{a=\"b\",le=\"+Inf\"} 1\n"), "{out}");
        let h = Histogram::default();
        h.observe_us(BUCKETS_US[0]);
        assert_eq!(h.snapshot().buckets[0], 1);
    }

    #[test]
    fn held_counts_while_alive() {
        let gauge = AtomicU64::new(0);
        let a = Held::new(&gauge);
        let b = Held::new(&gauge);
        drop(a);
        assert_eq!(gauge.load(Ordering::Relaxed), 1);
        drop(b);
        assert_eq!(gauge.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn process_metrics_are_read() {
        let out = scrape(&[ShardMetrics::default()]);
        let value = |name: &str| -> f64 {
            let line = out.lines().find(|l| l.starts_with(name) && l.as_bytes().get(name.len()) == Some(&b' ')).unwrap_or_else(|| panic!("no {name} in\n{out}"));
            line[name.len() + 1..].parse().expect("a number")
        };
        // Present and a number (a young process may not have spent a clock tick yet).
        value("process_cpu_seconds_total");
        for name in ["process_resident_memory_bytes", "process_virtual_memory_bytes", "process_threads", "process_open_fds", "process_max_fds"] {
            assert!(value(name) >= 1.0, "{name}");
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
        let started = value("process_start_time_seconds");
        assert!(started > now - 86_400.0 && started <= now + 1.0, "started {started}, now {now}");
    }
}
