//! Support for end-to-end tests: start a real `tessera-node` process on a
//! free loopback port with a fresh data directory, and talk to it over HTTP.
//!
//! Waits are bounded polls on a condition (the server answering), never
//! fixed sleeps.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The node binary: `TESSERA_NODE_BIN`, else the workspace's debug build.
pub fn node_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TESSERA_NODE_BIN") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default();
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root.join("target"));
    let target = if target.is_absolute() { target } else { root.join(target) };
    target.join("debug").join("tessera-node")
}

/// A free loopback port (bound then released), never the same twice in
/// one test process.
///
/// Between the release and the node's bind, the kernel may hand the same
/// port to a test running beside this one; two nodes on one port would each
/// get part of the other's requests. Ports already handed out are skipped.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port");
        if HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner()).insert(port) {
            return port;
        }
    }
}

/// A running node.
pub struct Node {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub port: u16,
    pub config_path: PathBuf,
}

impl Node {
    /// Starts a node with test defaults (rate limits and presence from
    /// syncing off) plus `extra` TOML.
    pub fn start(name: &str, extra: &str) -> Node {
        Node::start_with(name, extra, "[rate_limits]\nenabled = false\n")
    }

    /// Starts a node with `extra` TOML and the given `[rate_limits]` section.
    pub fn start_with(name: &str, extra: &str, rate_limits: &str) -> Node {
        let dir = std::env::temp_dir().join(format!("tessera-e2e-{name}-{}-{}", std::process::id(), free_port()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let port = free_port();
        let config_path = dir.join("config.toml");
        // `extra` may bring its own [registration] section; otherwise registration is open.
        let registration = if extra.contains("[registration]") { "" } else { "[registration]\nenabled = true\n" };
        // Presence from syncing writes moments after a user's first sync,
        // which would wake other users' long-polls in tests about something
        // else: off unless `extra` has its own [presence] section.
        let presence = if extra.contains("[presence]") { "" } else { "[presence]\nenabled = false\n" };
        let config = format!(
            "server_name = \"localhost\"\ndata_dir = \"{}\"\n{extra}\n[listen]\naddress = \"127.0.0.1:{port}\"\n{registration}{presence}[auth]\nargon2_m_cost_kib = 64\nargon2_t_cost = 1\n{rate_limits}",
            dir.join("data").display()
        );
        std::fs::write(&config_path, config).expect("config");
        let mut node = Node { child: None, dir, port, config_path };
        node.spawn();
        node
    }

    /// Starts the process again (after a stop or kill) with the same data.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("node.log")).expect("log file");
        let mut command = Command::new(node_bin());
        // TESSERA_E2E_STORAGE=scylla: the same tests on the CQL backend, one
        // keyspace per node (stable across restarts: same process, same port).
        if std::env::var("TESSERA_E2E_STORAGE").as_deref() == Ok("scylla") {
            let point = std::env::var("TESSERA_TEST_CQL").expect("TESSERA_E2E_STORAGE=scylla needs TESSERA_TEST_CQL (scripts/cassandra.sh start)");
            let keyspace = self.keyspace();
            command
                .env("TESSERA__STORAGE__BACKEND", "scylla")
                .env("TESSERA__STORAGE__SCYLLA__CONTACT_POINTS", point)
                .env("TESSERA__STORAGE__SCYLLA__KEYSPACE", keyspace);
        }
        let child = command
            .arg("--config")
            .arg(&self.config_path)
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", node_bin().display()));
        self.child = Some(child);
        self.wait_ready();
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn wait_ready(&mut self) {
        // On the CQL backend a first start creates a keyspace and its
        // tables, one schema change at a time: far slower than embedded.
        let patience = if std::env::var("TESSERA_E2E_STORAGE").as_deref() == Ok("scylla") { 150 } else { 30 };
        let deadline = Instant::now() + Duration::from_secs(patience);
        let agent = agent();
        loop {
            if let Ok(r) = agent.get(&self.url("/_matrix/client/versions")).call()
                && r.status() == 200
            {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("node exited early with {status}: {}", self.log());
            }
            assert!(Instant::now() < deadline, "node did not answer within {patience} s: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for a clean exit; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("node did not stop within 20 s after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn client(&self) -> Client {
        Client { base: self.url(""), token: None, agent: agent() }
    }
}

impl Node {
    /// The node's keyspace on the CQL backend (stable across restarts).
    fn keyspace(&self) -> String {
        format!("e2e_{}_{}", std::process::id(), self.port)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
        if std::env::var("TESSERA_E2E_STORAGE").as_deref() == Ok("scylla")
            && let Ok(point) = std::env::var("TESSERA_TEST_CQL")
        {
            // Every keyspace left behind costs the test database memory and
            // slows its later schema changes.
            if let Err(e) = drop_keyspace(&point, &self.keyspace()) {
                eprintln!("could not drop keyspace {}: {e}", self.keyspace());
            }
        }
    }
}

fn drop_keyspace(point: &str, keyspace: &str) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let session = scylla::client::session_builder::SessionBuilder::new().known_node(point).build().await?;
        let mut statement = scylla::statement::Statement::new(format!("DROP KEYSPACE IF EXISTS {keyspace}"));
        statement.set_request_timeout(Some(Duration::from_secs(60)));
        session.query_unpaged(statement, &[]).await?;
        Ok(())
    })
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(60))).build().new_agent()
}

impl Client {
    /// A client for `base` with an optional access token.
    pub fn new(base: String, token: Option<String>) -> Client {
        Client { base, token, agent: agent() }
    }
}

/// A minimal Matrix client over ureq.
pub struct Client {
    pub base: String,
    pub token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    /// Any request; returns status and JSON body (Null when not JSON).
    pub fn request(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        self.raw(method, path, body.map(|b| b.to_string().into_bytes()))
    }

    /// A request with a raw body.
    pub fn raw(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let mut builder = http::Request::builder().method(method).uri(&url);
        if let Some(t) = &self.token {
            builder = builder.header("Authorization", format!("Bearer {t}"));
        }
        let result = match body {
            Some(b) => self.agent.run(builder.header("Content-Type", "application/json").body(b).expect("request")),
            None => self.agent.run(builder.body(()).expect("request")),
        };
        let mut resp = result.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        self.request("GET", path, None)
    }

    /// A GET whose body is returned as text.
    pub fn get_text(&self, path: &str) -> (u16, String) {
        let mut resp = self.agent.get(format!("{}{path}", self.base)).call().unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = resp.status().as_u16();
        (status, resp.body_mut().read_to_string().unwrap_or_default())
    }
    pub fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.request("POST", path, Some(&body))
    }
    pub fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.request("PUT", path, Some(&body))
    }

    /// Long-polls `/sync` from `since` until `done` holds for a response,
    /// and returns that response. A write answered by one shard reaches the
    /// other shards' sync tokens moments later, so a test that expects a
    /// change waits for it (bounded) instead of reading once.
    pub fn sync_until(&self, since: &str, done: impl Fn(&Value) -> bool) -> Value {
        self.sync_until_filtered("", since, done)
    }

    /// [`Client::sync_until`] with a filter (an id, or URL-encoded JSON);
    /// an empty one is none.
    pub fn sync_until_filtered(&self, filter: &str, since: &str, done: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        let filter = if filter.is_empty() { String::new() } else { format!("&filter={filter}") };
        for _ in 0..50 {
            let (s, v) = self.get(&format!("/_matrix/client/v3/sync?since={since}&timeout=2000{filter}"));
            assert_eq!(s, 200, "{v}");
            if done(&v) {
                return v;
            }
            last = v;
        }
        panic!("sync from {since} never satisfied the condition: {last}");
    }

    /// Registers `name` (UIA dummy) and keeps its access token.
    pub fn register(&mut self, name: &str) -> Value {
        let (status, body) = self.post("/_matrix/client/v3/register", json!({ "username": name, "password": "secret-pass", "auth": { "type": "m.login.dummy" } }));
        assert_eq!(status, 200, "register {name}: {body}");
        self.token = body["access_token"].as_str().map(str::to_owned);
        body
    }

    /// Creates a room and returns its id.
    pub fn create_room(&self, body: Value) -> String {
        let (status, resp) = self.post("/_matrix/client/v3/createRoom", body);
        assert_eq!(status, 200, "createRoom: {resp}");
        resp["room_id"].as_str().expect("room_id").to_owned()
    }

    /// Sends a text message and returns the event id.
    pub fn send_text(&self, room: &str, txn: &str, text: &str) -> String {
        let (status, resp) = self.put(&format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}"), json!({ "msgtype": "m.text", "body": text }));
        assert_eq!(status, 200, "send: {resp}");
        resp["event_id"].as_str().expect("event_id").to_owned()
    }
}
