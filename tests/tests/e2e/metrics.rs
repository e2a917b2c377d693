//! Prometheus metrics: requests by endpoint and status, their latency
//! histograms, storage and process metrics, and the metrics listener.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tessera_tests::{Client, Node, free_port};

use super::two_users;

/// Samples of a text exposition by series (`name{labels}`), checking
/// that every sample line parses and every series is declared by a TYPE.
fn samples(text: &str) -> HashMap<String, f64> {
    let mut typed: Vec<&str> = Vec::new();
    let mut out = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.push(rest.split(' ').next().expect("name"));
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value: {line}"));
        let name = series.split('{').next().expect("name");
        let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(f))).unwrap_or(name);
        assert!(typed.contains(&family), "{name} has no TYPE line");
        assert!(out.insert(series.to_owned(), value).is_none(), "{series} twice");
    }
    out
}

fn scrape(client: &Client) -> HashMap<String, f64> {
    let (status, text) = client.get_text("/metrics");
    assert_eq!(status, 200, "{text}");
    samples(&text)
}

#[test]
fn requests_are_counted_by_endpoint_and_status_with_latency_histograms() {
    let node = Node::start("metrics", "");
    let (alice, _bob) = two_users(&node);
    for _ in 0..3 {
        assert_eq!(alice.get("/_matrix/client/v3/account/whoami").0, 200);
    }
    let anonymous = node.client();
    assert_eq!(anonymous.get("/_matrix/client/v3/account/whoami").0, 401);
    assert_eq!(anonymous.get("/_matrix/client/r0/account/whoami").0, 401);
    assert_eq!(anonymous.get("/_matrix/client/v3/no/such/endpoint").0, 404);
    let room = alice.create_room(serde_json::json!({}));
    for i in 0..2 {
        alice.send_text(&room, &format!("t{i}"), "hello");
    }
    let m = scrape(&anonymous);
    let whoami = |code: &str| m.get(&format!("tessera_http_requests_total{{method=\"GET\",endpoint=\"/_matrix/client/account/whoami\",code=\"{code}\"}}")).copied();
    assert_eq!((whoami("200"), whoami("401")), (Some(3.0), Some(2.0)));
    assert_eq!(m.get("tessera_http_requests_total{method=\"GET\",endpoint=\"unrecognized\",code=\"404\"}"), Some(&1.0));
    assert_eq!(m.get("tessera_http_requests_total{method=\"PUT\",endpoint=\"/_matrix/client/rooms/{room}/send/{kind}/{txn}\",code=\"200\"}"), Some(&2.0));
    assert!(!m.keys().any(|k| k.contains(room.as_str()) || k.contains("@alice")), "ids leaked into labels");

    // The histogram of the five whoami requests: cumulative buckets that
    // end at the count, and a sum under the time the test took.
    let labels = "method=\"GET\",endpoint=\"/_matrix/client/account/whoami\"";
    let count = m[&format!("tessera_http_request_duration_seconds_count{{{labels}}}")];
    assert_eq!(count, 5.0);
    let mut buckets: Vec<(f64, f64)> = m
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(&format!("tessera_http_request_duration_seconds_bucket{{{labels},le=\"")).map(|le| (le.trim_end_matches("\"}").parse::<f64>().unwrap_or(f64::INFINITY), *v)))
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(buckets.len() > 10 && buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{buckets:?}");
    assert_eq!(buckets.last(), Some(&(f64::INFINITY, 5.0)));
    assert!(m[&format!("tessera_http_request_duration_seconds_sum{{{labels}}}")] > 0.0);

    // Storage and the process.
    assert!(m["tessera_store_operation_duration_seconds_count{op=\"write\"}"] >= 2.0);
    assert_eq!(m["tessera_store_errors_total{op=\"write\"}"], 0.0);
    assert!(m["tessera_events_created_total"] >= 2.0);
    assert!(m["process_resident_memory_bytes"] > 1e6);
    assert!(m["process_open_fds"] > 0.0);
    assert!(m["process_threads"] > m["tessera_shards"]);
}

#[test]
fn a_waiting_sync_shows_in_the_gauge() {
    let node = Node::start("metrics-sync", "");
    let (alice, _bob) = two_users(&node);
    let since = alice.get("/_matrix/client/v3/sync").1["next_batch"].as_str().expect("next_batch").to_owned();
    let waiting = std::thread::scope(|s| {
        let started = Instant::now();
        let poll = s.spawn(|| alice.get(&format!("/_matrix/client/v3/sync?since={since}&timeout=30000")));
        // Until the long-poll is counted, polling every 10 ms.
        let seen = loop {
            let m = scrape(&node.client());
            if m["tessera_sync_waiting"] >= 1.0 {
                break m;
            }
            assert!(!poll.is_finished() && started.elapsed() < Duration::from_secs(20), "the long-poll was never counted as waiting");
            std::thread::sleep(Duration::from_millis(10));
        };
        // Something new ends the wait, long before its timeout.
        alice.create_room(serde_json::json!({}));
        assert_eq!(poll.join().expect("sync").0, 200);
        assert!(started.elapsed() < Duration::from_secs(20), "the long-poll ran into its timeout");
        seen
    });
    assert_eq!(waiting["tessera_sync_waiting"], 1.0);
    assert!(waiting["tessera_http_requests_in_flight"] >= 2.0, "the sync and the scrape");
    assert_eq!(scrape(&node.client())["tessera_sync_waiting"], 0.0);
}

#[test]
fn the_metrics_listener_serves_metrics_alone() {
    let port = free_port();
    let node = Node::start("metrics-listen", &format!("[metrics]\non_client_listener = false\nlisten = \"127.0.0.1:{port}\"\n"));
    let client = node.client();
    assert_eq!(client.get("/metrics").0, 404, "not on the client listener");
    // Bound before any shard starts: serving once the client listener does.
    let metrics = Client::new(format!("http://127.0.0.1:{port}"), None);
    let versions = "tessera_http_requests_total{method=\"GET\",endpoint=\"/_matrix/client/versions\",code=\"200\"}";
    let before = scrape(&metrics)[versions];
    assert_eq!(client.get("/_matrix/client/versions").0, 200);
    let m = scrape(&metrics);
    assert_eq!(m[versions], before + 1.0);
    assert_eq!(m["tessera_http_requests_total{method=\"GET\",endpoint=\"unrecognized\",code=\"404\"}"], 1.0);
    assert_eq!(metrics.get("/_matrix/client/versions").0, 404);
    assert_eq!(metrics.request("POST", "/metrics", None).0, 405);
    // A port another process holds fails the start.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dir = node.dir.join("taken");
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("taken.toml");
    let config = format!(
        "data_dir = \"{}\"\n[listen]\naddress = \"127.0.0.1:{}\"\n[metrics]\nlisten = \"{}\"\n",
        dir.join("data").display(),
        free_port(),
        taken.local_addr().expect("address")
    );
    std::fs::write(&path, config).expect("write");
    let out = std::process::Command::new(tessera_tests::node_bin()).arg("--config").arg(&path).output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("metrics.listen") && stderr.contains("in use"), "{stderr}");
}
