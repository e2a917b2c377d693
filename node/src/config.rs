//! Node configuration: a TOML file, `TESSERA__SECTION__KEY` environment
//! overrides, then command-line flags, in that order of precedence (later
//! wins). Every option is documented in `docs/configuration.md`; unknown keys
//! are rejected so a typo fails fast with the key's name.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::storage::Durability;

/// The whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The Matrix server name (the part after `:` in user ids).
    pub server_name: String,
    /// Where the node keeps its data (store, signing key).
    pub data_dir: PathBuf,
    /// Base URL clients should use, advertised in `/.well-known/matrix/client`.
    pub public_baseurl: Option<String>,
    pub listen: Listen,
    pub runtime: Runtime,
    pub storage: Storage,
    pub registration: Registration,
    pub auth: Auth,
    pub limits: Limits,
    pub rate_limits: RateLimits,
    pub turn: Turn,
    pub rooms: Rooms,
    pub support: Support,
    pub presence: Presence,
    pub metrics: Metrics,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// Address of the client-server API listener.
    pub address: SocketAddr,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Runtime {
    /// Number of shards (executor threads); 0 means one per available core.
    pub shards: usize,
    /// Locked memory glommio reserves per shard for io_uring buffers, in KiB.
    pub io_memory_kib: usize,
    /// Depth of each shard-to-shard channel (messages); bounds memory per pair.
    pub mesh_channel_depth: usize,
    /// Seconds a shard waits for open requests to finish on shutdown.
    pub shutdown_grace_secs: u64,
    /// Events each shard keeps rendered in the client format, in KiB (0:
    /// none). Syncs of recently active rooms read them from here.
    pub event_cache_kib: usize,
    /// Lets the kernel back the heap with transparent huge pages (fewer TLB
    /// misses, more resident memory: a 2 MiB page counts whole).
    pub transparent_huge_pages: bool,
    /// Microseconds a shard keeps polling for I/O after it runs out of
    /// work before it sleeps (0: it sleeps at once). Saves the wake-up
    /// cost of bursts that come closer together than this, at the price of
    /// a busy core while it polls.
    pub spin_before_park_us: u64,
    /// Binds shard i to the i-th CPU the process may run on (so a shard
    /// keeps its core's caches; needed for `spin_before_park_us`).
    pub pin_shards: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Storage {
    /// "embedded" (one machine, data in `data_dir`) or "scylla" (a CQL
    /// cluster: ScyllaDB or Apache Cassandra, see `[storage.scylla]`).
    pub backend: String,
    /// What an answered write survives: "process" (SIGKILL) or "power" (fsync).
    pub durability: Durability,
    /// Block cache of the embedded engine, in MiB.
    pub cache_mib: u64,
    /// In-memory write buffers (memtables) of all tables together, in MiB:
    /// past it, the table holding the most is flushed to disk.
    pub memtable_mib: u64,
    /// The CQL backend, used when `backend = "scylla"`.
    pub scylla: Scylla,
}

/// The CQL (ScyllaDB / Cassandra) backend. See `docs/storage-cql.md`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scylla {
    /// `host:port` of nodes to discover the cluster from; a list, or one
    /// comma-separated string (handy in an environment variable).
    #[serde(deserialize_with = "list_or_csv")]
    pub contact_points: Vec<String>,
    /// Keyspace holding every table; created on start when absent.
    pub keyspace: String,
    /// CQL replication map used when the keyspace is created, e.g.
    /// `{'class': 'NetworkTopologyStrategy', 'dc1': 3}`. Ignored afterwards.
    pub replication: String,
    /// Credentials for PasswordAuthenticator; both or neither.
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// TLS to the database (rustls); needs `tls_ca_file`.
    pub tls: bool,
    /// PEM file of the certificate authorities that sign the database's
    /// certificates.
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// Name the database's certificates are checked against. Unset, each
    /// node's certificate must name that node's IP address.
    pub tls_server_name: Option<String>,
    /// Client certificate chain and private key (PEM), for databases that
    /// require client certificates; both or neither.
    pub tls_client_cert_file: Option<std::path::PathBuf>,
    pub tls_client_key_file: Option<std::path::PathBuf>,
    /// Consistency of reads and writes: "local_quorum", "quorum", "one",
    /// "local_one", "two", "three", "all", "each_quorum".
    pub consistency: String,
    /// Serial consistency of conditional inserts: "local_serial" or "serial".
    pub serial_consistency: String,
    /// Client-side timeout of one request (each retry gets its own), in ms.
    pub request_timeout_ms: u64,
    /// Timeout of establishing a connection, in ms; also bounds how long an
    /// unreachable database delays start-up.
    pub connect_timeout_ms: u64,
    /// Retries of an idempotent request (reads, writes; never conditional
    /// inserts) after a timeout or an unavailable replica, with backoff.
    pub retries: u32,
    /// Worker threads of the tokio side runtime running the driver.
    pub runtime_threads: usize,
    /// Depth of the queue from shards to the driver runtime (requests);
    /// a full queue answers 503 after `request_timeout_ms`.
    pub queue_depth: usize,
    /// How long transaction ids (idempotency of sends) are kept, in seconds
    /// (the table's `default_time_to_live`); 0 keeps them for ever.
    pub transaction_ttl_secs: u32,
    /// How long a claimed one-time key id is remembered (so it is never
    /// stored again), in seconds; 0 keeps them for ever.
    pub claimed_key_ttl_secs: u32,
}

/// A string kept out of `Debug` output (passwords).
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

/// Accepts `["a", "b"]` or `"a,b"`.
fn list_or_csv<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrCsv {
        List(Vec<String>),
        Csv(String),
    }
    Ok(match ListOrCsv::deserialize(d)? {
        ListOrCsv::List(v) => v,
        ListOrCsv::Csv(s) => s.split(',').map(str::trim).filter(|p| !p.is_empty()).map(str::to_owned).collect(),
    })
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Registration {
    /// Whether anyone may register an account.
    pub enabled: bool,
    /// When non-empty, registration also requires one of these tokens
    /// (`m.login.registration_token`).
    pub tokens: Vec<String>,
    /// Whether guests may register (`kind=guest`).
    pub allow_guests: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    /// argon2id memory cost in KiB (default 19456, the OWASP baseline).
    pub argon2_m_cost_kib: u32,
    /// argon2id iterations.
    pub argon2_t_cost: u32,
    /// Lifetime of access tokens issued with a refresh token, in seconds.
    pub access_token_lifetime_secs: u64,
    /// Minimum password length accepted on registration and change.
    pub password_min_len: usize,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body accepted, in bytes; larger bodies get 413 M_TOO_LARGE.
    pub request_body_bytes_max: usize,
    /// Largest JSON nesting depth accepted in a request body.
    pub json_depth_max: usize,
    /// Longest `/sync` long-poll, in milliseconds (client timeouts are capped).
    pub sync_timeout_ms_max: u64,
    /// Most events returned by one `/messages` page or sync timeline.
    pub events_per_page_max: usize,
    /// Most long-polling syncs waiting on one shard; more get 429.
    pub sync_waiters_per_shard_max: usize,
    /// Most concurrent connections per shard; more are closed at accept.
    pub connections_per_shard_max: usize,
    /// Most rooms one user may be joined to (bounds sync cost).
    pub rooms_per_user_max: usize,
    /// Most unclaimed one-time keys one device may hold.
    pub one_time_keys_per_device_max: usize,
    /// Most sessions one key backup version may hold.
    pub backup_keys_per_version_max: usize,
    /// Most rooms one space-hierarchy request walks (`/hierarchy`); its
    /// pages and depth stay within it.
    pub hierarchy_rooms_max: usize,
    /// Deepest level below the space `/hierarchy` descends to, whatever
    /// `max_depth` the client asks for.
    pub hierarchy_depth_max: usize,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimits {
    /// Master switch; load tests turn it off.
    pub enabled: bool,
    pub messages: Bucket,
    pub registration: Bucket,
    pub login: Bucket,
    pub joins: Bucket,
    /// Invites sent by one user.
    pub invites_per_issuer: Bucket,
    /// Invites sent into one room.
    pub invites_per_room: Bucket,
    /// Invites received by one user.
    pub invites_per_user: Bucket,
    /// Most distinct users/IPs tracked per shard; the oldest are evicted.
    pub tracked_keys_max: usize,
}

/// A token bucket: `per_second` refill, `burst` capacity.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bucket {
    pub per_second: f64,
    pub burst: f64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Turn {
    /// TURN URIs handed to clients by `/voip/turnServer`.
    pub uris: Vec<String>,
    /// Shared secret for TURN REST credentials; empty disables the endpoint.
    pub shared_secret: String,
    /// Lifetime of issued credentials, in seconds.
    pub ttl_secs: u64,
}

/// Where the Prometheus metrics are served.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    /// Serve `GET /metrics` on the client-server listener too.
    pub on_client_listener: bool,
    /// A listener of its own serving only `GET /metrics` (on shard 0).
    pub listen: Option<SocketAddr>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics { on_client_listener: true, listen: None }
    }
}

/// Presence from syncing.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Presence {
    /// Syncing makes users online (`set_presence`); off, only
    /// `PUT /presence` changes presence.
    pub enabled: bool,
    /// A user none of whose clients started a sync for this long goes
    /// offline, in milliseconds. Longer than the longest long-poll
    /// (`limits.sync_timeout_ms_max`) plus some slack.
    pub offline_after_ms: u64,
    /// An online user who did nothing (sent no event, receipt or read
    /// marker, did not set themselves online) for this long becomes
    /// `unavailable`, in milliseconds; 0 never.
    pub idle_after_ms: u64,
}

impl Default for Presence {
    fn default() -> Self {
        Presence { enabled: true, offline_after_ms: 90_000, idle_after_ms: 300_000 }
    }
}

/// Who runs the server, served at `/.well-known/matrix/support`; nothing
/// is served (404) while both are empty.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Support {
    /// Ways to reach the administrators.
    pub contacts: Vec<SupportContact>,
    /// A page with help specific to this server.
    pub page: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupportContact {
    /// `m.role.admin`, `m.role.security` or a namespaced role of one's own.
    pub role: String,
    pub matrix_id: Option<String>,
    pub email_address: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rooms {
    /// Room version for new rooms ("10", "11" or "12").
    pub default_version: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server_name: "localhost".into(),
            data_dir: PathBuf::from("tessera-data"),
            public_baseurl: None,
            listen: Listen::default(),
            runtime: Runtime::default(),
            storage: Storage::default(),
            registration: Registration::default(),
            auth: Auth::default(),
            limits: Limits::default(),
            rate_limits: RateLimits::default(),
            turn: Turn::default(),
            rooms: Rooms::default(),
            support: Support::default(),
            presence: Presence::default(),
            metrics: Metrics::default(),
        }
    }
}

impl Default for Listen {
    fn default() -> Self {
        Listen { address: SocketAddr::from(([127, 0, 0, 1], 8008)) }
    }
}

impl Default for Runtime {
    fn default() -> Self {
        Runtime { shards: 0, io_memory_kib: 2048, mesh_channel_depth: 1024, shutdown_grace_secs: 5, event_cache_kib: 2048, transparent_huge_pages: false, spin_before_park_us: 0, pin_shards: false }
    }
}

impl Default for Storage {
    fn default() -> Self {
        Storage { backend: "embedded".into(), durability: Durability::Process, cache_mib: 32, memtable_mib: 2, scylla: Scylla::default() }
    }
}

impl Default for Scylla {
    fn default() -> Self {
        Scylla {
            contact_points: vec!["127.0.0.1:9042".into()],
            keyspace: "tessera".into(),
            replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
            username: None,
            password: None,
            tls: false,
            tls_ca_file: None,
            tls_server_name: None,
            tls_client_cert_file: None,
            tls_client_key_file: None,
            consistency: "local_quorum".into(),
            serial_consistency: "local_serial".into(),
            request_timeout_ms: 5_000,
            connect_timeout_ms: 5_000,
            retries: 2,
            runtime_threads: 2,
            queue_depth: 1024,
            transaction_ttl_secs: 86_400,
            claimed_key_ttl_secs: 30 * 86_400,
        }
    }
}

impl Default for Auth {
    fn default() -> Self {
        Auth { argon2_m_cost_kib: 19_456, argon2_t_cost: 2, access_token_lifetime_secs: 3600, password_min_len: 1 }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_body_bytes_max: 1 << 20,
            json_depth_max: 64,
            sync_timeout_ms_max: 60_000,
            events_per_page_max: 1000,
            sync_waiters_per_shard_max: 100_000,
            connections_per_shard_max: 100_000,
            rooms_per_user_max: 10_000,
            one_time_keys_per_device_max: 1_000,
            backup_keys_per_version_max: 1_000_000,
            hierarchy_rooms_max: 1_000,
            hierarchy_depth_max: 10,
        }
    }
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            enabled: true,
            messages: Bucket { per_second: 10.0, burst: 50.0 },
            registration: Bucket { per_second: 0.17, burst: 3.0 },
            login: Bucket { per_second: 0.17, burst: 3.0 },
            joins: Bucket { per_second: 0.1, burst: 10.0 },
            invites_per_issuer: Bucket { per_second: 0.3, burst: 10.0 },
            invites_per_room: Bucket { per_second: 0.3, burst: 10.0 },
            invites_per_user: Bucket { per_second: 0.003, burst: 5.0 },
            tracked_keys_max: 100_000,
        }
    }
}

impl Default for Turn {
    fn default() -> Self {
        Turn { uris: Vec::new(), shared_secret: String::new(), ttl_secs: 86_400 }
    }
}

impl Default for Rooms {
    fn default() -> Self {
        Rooms { default_version: "11".into() }
    }
}

/// A configuration problem, naming the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid environment override {var}: {message}")]
    Env { var: String, message: String },
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

/// Prefix of environment overrides: `TESSERA__LISTEN__ADDRESS=0.0.0.0:8008`.
pub const ENV_PREFIX: &str = "TESSERA__";
/// Upper bound of `runtime.spin_before_park_us`.
pub const SPIN_BEFORE_PARK_US_MAX: u64 = 1_000_000;

impl Config {
    /// Loads the file (if any), applies environment overrides and validates.
    pub fn load(path: Option<&Path>, env: impl Iterator<Item = (String, String)>) -> Result<Config, ConfigError> {
        let mut table = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
                text.parse::<toml::Table>().map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })?
            }
            None => toml::Table::new(),
        };
        for (var, value) in env {
            let Some(rest) = var.strip_prefix(ENV_PREFIX) else { continue };
            let keys: Vec<String> = rest.split("__").map(|k| k.to_ascii_lowercase()).collect();
            set_path(&mut table, &keys, &value).map_err(|message| ConfigError::Env { var: var.clone(), message })?;
        }
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse { path: path.map(Into::into).unwrap_or_else(|| "<environment>".into()), message: e.to_string() })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values the types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| Err(ConfigError::Invalid { key, message: message.into() });
        if ruma::ServerName::parse(&self.server_name).is_err() {
            return invalid("server_name", "not a valid Matrix server name");
        }
        if self.presence.offline_after_ms < 1_000 {
            return invalid("presence.offline_after_ms", "must be at least 1000");
        }
        if self.presence.idle_after_ms != 0 && self.presence.idle_after_ms < 1_000 {
            return invalid("presence.idle_after_ms", "must be 0 (never) or at least 1000");
        }
        for c in &self.support.contacts {
            if c.role.is_empty() {
                return invalid("support.contacts", "every contact needs a role (e.g. \"m.role.admin\")");
            }
            if c.matrix_id.is_none() && c.email_address.is_none() {
                return invalid("support.contacts", "every contact needs a matrix_id or an email_address");
            }
            if c.matrix_id.as_deref().is_some_and(|id| ruma::UserId::parse(id).is_err()) {
                return invalid("support.contacts", "matrix_id is not a valid Matrix user id");
            }
        }
        if let Some(m) = self.metrics.listen
            && m.port() == self.listen.address.port()
            && (m.ip() == self.listen.address.ip() || m.ip().is_unspecified() || self.listen.address.ip().is_unspecified())
        {
            return invalid("metrics.listen", "must not take the port of listen.address");
        }
        if !matches!(self.rooms.default_version.as_str(), "10" | "11" | "12") {
            return invalid("rooms.default_version", "supported room versions are \"10\", \"11\" and \"12\"");
        }
        match self.storage.backend.as_str() {
            "embedded" => {}
            "scylla" => self.storage.scylla.validate()?,
            _ => return invalid("storage.backend", "supported backends: \"embedded\", \"scylla\""),
        }
        if self.storage.backend == "scylla" && self.storage.durability == Durability::Power {
            return invalid("storage.durability", "\"power\" applies to the embedded backend; with \"scylla\" use the database's `commitlog_sync: batch`");
        }
        if self.storage.memtable_mib == 0 {
            return invalid("storage.memtable_mib", "must be at least 1");
        }
        if self.limits.request_body_bytes_max < 1024 {
            return invalid("limits.request_body_bytes_max", "must be at least 1024");
        }
        if self.limits.events_per_page_max == 0 {
            return invalid("limits.events_per_page_max", "must be at least 1");
        }
        if self.limits.hierarchy_rooms_max == 0 {
            return invalid("limits.hierarchy_rooms_max", "must be at least 1");
        }
        if self.runtime.mesh_channel_depth == 0 {
            return invalid("runtime.mesh_channel_depth", "must be at least 1");
        }
        if self.runtime.io_memory_kib < 512 {
            return invalid("runtime.io_memory_kib", "glommio needs at least 512 KiB");
        }
        if self.runtime.spin_before_park_us > SPIN_BEFORE_PARK_US_MAX {
            return invalid("runtime.spin_before_park_us", &format!("at most {SPIN_BEFORE_PARK_US_MAX} (a second)"));
        }
        if self.runtime.spin_before_park_us > 0 && !self.runtime.pin_shards {
            return invalid("runtime.spin_before_park_us", "needs runtime.pin_shards = true (an unpinned shard never polls)");
        }
        if self.auth.argon2_m_cost_kib < 8 || self.auth.argon2_t_cost == 0 {
            return invalid("auth.argon2_m_cost_kib", "argon2 needs m_cost >= 8 KiB and t_cost >= 1");
        }
        for (key, b) in [
            ("rate_limits.messages", self.rate_limits.messages),
            ("rate_limits.registration", self.rate_limits.registration),
            ("rate_limits.login", self.rate_limits.login),
            ("rate_limits.joins", self.rate_limits.joins),
        ] {
            if !(b.per_second > 0.0 && b.burst >= 1.0) {
                return Err(ConfigError::Invalid { key, message: "per_second must be > 0 and burst >= 1".into() });
            }
        }
        Ok(())
    }

    /// The number of shards to run, resolving 0 to the core count.
    pub fn shard_count(&self) -> usize {
        if self.runtime.shards > 0 {
            return self.runtime.shards;
        }
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    }

    /// The base URL clients should use.
    pub fn base_url(&self) -> String {
        match &self.public_baseurl {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => format!("http://{}", self.listen.address),
        }
    }
}

impl Scylla {
    /// Checks the `[storage.scylla]` values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| Err(ConfigError::Invalid { key, message: message.into() });
        if self.contact_points.is_empty() {
            return invalid("storage.scylla.contact_points", "needs at least one host:port");
        }
        let ks = self.keyspace.as_bytes();
        if ks.is_empty() || ks.len() > 48 || !ks[0].is_ascii_alphabetic() || !ks.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'_') {
            return invalid("storage.scylla.keyspace", "1 to 48 letters, digits or '_', starting with a letter");
        }
        let r = self.replication.trim();
        if !(r.starts_with('{') && r.ends_with('}')) || r.contains(';') {
            return invalid("storage.scylla.replication", "a CQL map such as {'class': 'SimpleStrategy', 'replication_factor': 1}");
        }
        if self.username.is_some() != self.password.is_some() {
            return invalid("storage.scylla.username", "set both username and password, or neither");
        }
        if self.tls && self.tls_ca_file.is_none() {
            return invalid("storage.scylla.tls_ca_file", "TLS needs the PEM file of the database's certificate authority");
        }
        if self.tls_client_cert_file.is_some() != self.tls_client_key_file.is_some() {
            return invalid("storage.scylla.tls_client_cert_file", "set both tls_client_cert_file and tls_client_key_file, or neither");
        }
        if let Some(name) = &self.tls_server_name
            && rustls::pki_types::ServerName::try_from(name.as_str()).is_err()
        {
            return invalid("storage.scylla.tls_server_name", "a DNS name or an IP address");
        }
        if crate::storage::cql::parse_consistency(&self.consistency).is_none() {
            return invalid("storage.scylla.consistency", "one of local_quorum, quorum, one, local_one, two, three, all, each_quorum");
        }
        if crate::storage::cql::parse_serial_consistency(&self.serial_consistency).is_none() {
            return invalid("storage.scylla.serial_consistency", "\"local_serial\" or \"serial\"");
        }
        if self.request_timeout_ms == 0 || self.connect_timeout_ms == 0 {
            return invalid("storage.scylla.request_timeout_ms", "timeouts must be at least 1 ms");
        }
        if self.runtime_threads == 0 || self.queue_depth == 0 {
            return invalid("storage.scylla.runtime_threads", "runtime_threads and queue_depth must be at least 1");
        }
        // CQL refuses TTLs above 20 years.
        const TTL_MAX: u32 = 20 * 365 * 86_400;
        if self.transaction_ttl_secs > TTL_MAX {
            return invalid("storage.scylla.transaction_ttl_secs", "at most 630720000 (20 years)");
        }
        if self.claimed_key_ttl_secs > TTL_MAX {
            return invalid("storage.scylla.claimed_key_ttl_secs", "at most 630720000 (20 years)");
        }
        Ok(())
    }
}

/// Sets `keys` in `table` to `raw`, parsed as a TOML value when it parses
/// (numbers, booleans, arrays), else as a string.
fn set_path(table: &mut toml::Table, keys: &[String], raw: &str) -> Result<(), String> {
    let (last, parents) = keys.split_last().ok_or("empty key")?;
    let mut cur = table;
    for k in parents {
        let entry = cur.entry(k.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry.as_table_mut().ok_or_else(|| format!("`{k}` is not a section"))?;
    }
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()));
    cur.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Iterator<Item = (String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>().into_iter()
    }

    #[test]
    fn defaults_serve_localhost_8008() {
        let c = Config::load(None, env(&[])).expect("defaults");
        assert_eq!(c.server_name, "localhost");
        assert_eq!(c.listen.address.to_string(), "127.0.0.1:8008");
        assert!(!c.registration.enabled);
    }

    #[test]
    fn the_metrics_listener_may_not_take_the_client_port() {
        for clash in ["127.0.0.1:8008", "0.0.0.0:8008"] {
            let err = Config::load(None, env(&[("TESSERA__METRICS__LISTEN", clash)])).expect_err(clash).to_string();
            assert!(err.contains("metrics.listen"), "{err}");
        }
        let c = Config::load(None, env(&[("TESSERA__METRICS__LISTEN", "127.0.0.1:9008"), ("TESSERA__METRICS__ON_CLIENT_LISTENER", "false")])).expect("own port");
        assert_eq!((c.metrics.listen, c.metrics.on_client_listener), (Some(SocketAddr::from(([127, 0, 0, 1], 9008))), false));
        assert!(Config::load(None, env(&[])).expect("defaults").metrics.on_client_listener);
    }

    #[test]
    fn env_overrides_file_values() {
        let c = Config::load(None, env(&[("TESSERA__LISTEN__ADDRESS", "127.0.0.1:9000"), ("TESSERA__REGISTRATION__ENABLED", "true"), ("TESSERA__SERVER_NAME", "example.org")]))
            .expect("config");
        assert_eq!(c.listen.address.port(), 9000);
        assert!(c.registration.enabled);
        assert_eq!(c.server_name, "example.org");
    }

    #[test]
    fn unknown_key_is_named() {
        let dir = std::env::temp_dir().join(format!("tessera-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("bad.toml");
        std::fs::write(&path, "[listen]\nadress = \"127.0.0.1:1\"\n").expect("write");
        let err = Config::load(Some(&path), env(&[])).expect_err("must fail").to_string();
        assert!(err.contains("adress"), "{err}");
    }

    #[test]
    fn scylla_backend_from_environment() {
        let c = Config::load(
            None,
            env(&[
                ("TESSERA__STORAGE__BACKEND", "scylla"),
                ("TESSERA__STORAGE__SCYLLA__CONTACT_POINTS", "10.0.0.1:9042, 10.0.0.2:9042"),
                ("TESSERA__STORAGE__SCYLLA__KEYSPACE", "prod"),
                ("TESSERA__STORAGE__SCYLLA__REQUEST_TIMEOUT_MS", "750"),
            ]),
        )
        .expect("config");
        assert_eq!(c.storage.backend, "scylla");
        assert_eq!(c.storage.scylla.contact_points, ["10.0.0.1:9042", "10.0.0.2:9042"]);
        assert_eq!(c.storage.scylla.keyspace, "prod");
        assert_eq!(c.storage.scylla.request_timeout_ms, 750);
        let c = Config::load(None, env(&[("TESSERA__STORAGE__SCYLLA__CONTACT_POINTS", "[\"a:1\", \"b:2\"]")])).expect("list form");
        assert_eq!(c.storage.scylla.contact_points, ["a:1", "b:2"]);
    }

    #[test]
    fn spinning_needs_pinned_shards_and_a_bound() {
        let spin = ("TESSERA__RUNTIME__SPIN_BEFORE_PARK_US", "200");
        let err = Config::load(None, env(&[spin])).expect_err("unpinned").to_string();
        assert!(err.contains("runtime.spin_before_park_us") && err.contains("pin_shards"), "{err}");
        let c = Config::load(None, env(&[spin, ("TESSERA__RUNTIME__PIN_SHARDS", "true")])).expect("pinned");
        assert_eq!((c.runtime.spin_before_park_us, c.runtime.pin_shards), (200, true));
        let err = Config::load(None, env(&[("TESSERA__RUNTIME__SPIN_BEFORE_PARK_US", "1000001"), ("TESSERA__RUNTIME__PIN_SHARDS", "true")])).expect_err("too long").to_string();
        assert!(err.contains("runtime.spin_before_park_us"), "{err}");
    }

    #[test]
    fn scylla_bad_values_are_named() {
        for (var, value, key) in [
            ("TESSERA__STORAGE__SCYLLA__TLS", "true", "storage.scylla.tls_ca_file"),
            ("TESSERA__STORAGE__SCYLLA__TLS_SERVER_NAME", "not a name!", "storage.scylla.tls_server_name"),
            ("TESSERA__STORAGE__SCYLLA__TLS_CLIENT_KEY_FILE", "/k.pem", "storage.scylla.tls_client_cert_file"),
            ("TESSERA__STORAGE__SCYLLA__TRANSACTION_TTL_SECS", "700000000", "storage.scylla.transaction_ttl_secs"),
            ("TESSERA__STORAGE__SCYLLA__CONSISTENCY", "most", "storage.scylla.consistency"),
            ("TESSERA__STORAGE__SCYLLA__KEYSPACE", "bad-name", "storage.scylla.keyspace"),
            ("TESSERA__STORAGE__SCYLLA__USERNAME", "cassandra", "storage.scylla.username"),
            ("TESSERA__STORAGE__DURABILITY", "power", "storage.durability"),
        ] {
            let err = Config::load(None, env(&[("TESSERA__STORAGE__BACKEND", "scylla"), (var, value)])).expect_err(var).to_string();
            assert!(err.contains(key), "{var}: {err}");
        }
        let c = Config::load(None, env(&[("TESSERA__STORAGE__SCYLLA__PASSWORD", "hunter2"), ("TESSERA__STORAGE__SCYLLA__USERNAME", "u")])).expect("config");
        assert!(!format!("{c:?}").contains("hunter2"), "passwords stay out of Debug output");
    }

    #[test]
    fn support_contacts_need_a_role_and_a_way_to_reach_them() {
        let contact = |role: &str, id: Option<&str>, email: Option<&str>| SupportContact { role: role.into(), matrix_id: id.map(Into::into), email_address: email.map(Into::into) };
        let check = |c: SupportContact| {
            let mut config = Config::default();
            config.support.contacts = vec![c];
            config.validate().map_err(|e| e.to_string())
        };
        assert!(check(contact("m.role.admin", Some("@a:example.org"), None)).is_ok());
        assert!(check(contact("m.role.admin", None, Some("a@example.org"))).is_ok());
        assert!(check(contact("", Some("@a:example.org"), None)).is_err_and(|e| e.contains("support.contacts")));
        assert!(check(contact("m.role.admin", None, None)).is_err_and(|e| e.contains("support.contacts")));
        assert!(check(contact("m.role.admin", Some("not-a-user"), None)).is_err_and(|e| e.contains("support.contacts")));
    }

    #[test]
    fn bad_value_is_named() {
        let err = Config::load(None, env(&[("TESSERA__ROOMS__DEFAULT_VERSION", "\"3\"")])).expect_err("must fail").to_string();
        assert!(err.contains("rooms.default_version"), "{err}");
    }
}
