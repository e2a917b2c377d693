//! Configurations for servers under test, tuned for load testing: loopback
//! only, open registration without verification, rate limits out of the
//! way, cheap password hashing, quiet logs. Used by the end-to-end tests and
//! by `bench/compare-synapse`, so both load the same server the same way.

use std::fmt::Write as _;
use std::path::Path;

/// Database of a Synapse under test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SynapseDb {
    /// SQLite file in the data directory.
    Sqlite,
    /// PostgreSQL via psycopg2.
    Postgres {
        /// Host (or socket directory).
        host: String,
        /// Port.
        port: u16,
        /// Database name.
        dbname: String,
        /// User.
        user: String,
    },
}

/// A rate-limit setting nothing in a load test reaches.
const UNLIMITED: &str = "{per_second: 1000000, burst_count: 1000000}";

/// `homeserver.yaml` for Synapse listening on `127.0.0.1:port`, with its
/// files under `data_dir`. `secret` seeds the macaroon and form secrets.
pub fn synapse_yaml(data_dir: &Path, port: u16, db: &SynapseDb, secret: &str) -> String {
    let d = data_dir.display();
    let mut y = String::new();
    let _ = writeln!(y, "server_name: \"localhost\"");
    let _ = writeln!(y, "pid_file: \"{d}/homeserver.pid\"");
    let _ = writeln!(y, "public_baseurl: \"http://127.0.0.1:{port}/\"");
    let _ = writeln!(y, "listeners:");
    let _ = writeln!(y, "  - port: {port}");
    let _ = writeln!(y, "    bind_addresses: ['127.0.0.1']");
    let _ = writeln!(y, "    type: http");
    let _ = writeln!(y, "    tls: false");
    let _ = writeln!(y, "    x_forwarded: false");
    let _ = writeln!(y, "    resources:");
    let _ = writeln!(y, "      - names: [client]");
    let _ = writeln!(y, "        compress: false");
    let _ = writeln!(y, "database:");
    match db {
        SynapseDb::Sqlite => {
            let _ = writeln!(y, "  name: sqlite3");
            let _ = writeln!(y, "  args:");
            let _ = writeln!(y, "    database: \"{d}/homeserver.db\"");
        }
        SynapseDb::Postgres {
            host,
            port,
            dbname,
            user,
        } => {
            let _ = writeln!(y, "  name: psycopg2");
            let _ = writeln!(y, "  args:");
            let _ = writeln!(y, "    user: \"{user}\"");
            let _ = writeln!(y, "    database: \"{dbname}\"");
            let _ = writeln!(y, "    host: \"{host}\"");
            let _ = writeln!(y, "    port: {port}");
            let _ = writeln!(y, "    cp_min: 5");
            let _ = writeln!(y, "    cp_max: 10");
        }
    }
    let _ = writeln!(y, "log_config: \"{d}/log.config\"");
    let _ = writeln!(y, "media_store_path: \"{d}/media_store\"");
    let _ = writeln!(y, "signing_key_path: \"{d}/localhost.signing.key\"");
    let _ = writeln!(y, "report_stats: false");
    let _ = writeln!(y, "enable_metrics: false");
    let _ = writeln!(y, "enable_registration: true");
    let _ = writeln!(y, "enable_registration_without_verification: true");
    let _ = writeln!(y, "macaroon_secret_key: \"{secret}-macaroon\"");
    let _ = writeln!(y, "form_secret: \"{secret}-form\"");
    let _ = writeln!(y, "trusted_key_servers: []");
    let _ = writeln!(y, "suppress_key_server_warning: true");
    let _ = writeln!(y, "federation_domain_whitelist: []");
    let _ = writeln!(y, "url_preview_enabled: false");
    let _ = writeln!(y, "presence:");
    let _ = writeln!(y, "  enabled: false");
    // Cheap hashing, as the Tessera config under test uses, so registration
    // and login rates compare request handling rather than hash cost.
    let _ = writeln!(y, "bcrypt_rounds: 4");
    for key in [
        "rc_message",
        "rc_registration",
        "rc_registration_token_validity",
        "rc_joins_per_room",
        "rc_3pid_validation",
        "rc_admin_redaction",
        "rc_room_creation",
        "rc_reports",
        "rc_media_create",
        "rc_delayed_event_mgmt",
        "rc_presence",
    ] {
        if key == "rc_presence" {
            let _ = writeln!(y, "{key}:\n  per_user: {UNLIMITED}");
        } else {
            let _ = writeln!(y, "{key}: {UNLIMITED}");
        }
    }
    let _ = writeln!(
        y,
        "rc_login:\n  address: {UNLIMITED}\n  account: {UNLIMITED}\n  failed_attempts: {UNLIMITED}"
    );
    let _ = writeln!(y, "rc_joins:\n  local: {UNLIMITED}\n  remote: {UNLIMITED}");
    let _ = writeln!(
        y,
        "rc_invites:\n  per_room: {UNLIMITED}\n  per_user: {UNLIMITED}\n  per_issuer: {UNLIMITED}"
    );
    let _ = writeln!(
        y,
        "rc_federation:\n  window_size: 1000\n  sleep_limit: 1000000\n  reject_limit: 1000000\n  concurrent: 1000"
    );
    y
}

/// Synapse's logging config: warnings only, to a file, so logging does not
/// cost the server CPU during the run.
pub fn synapse_log_config(data_dir: &Path) -> String {
    format!(
        "version: 1\nformatters:\n  precise:\n    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(message)s'\n\
         handlers:\n  file:\n    class: logging.FileHandler\n    formatter: precise\n    filename: \"{}/homeserver.log\"\n\
         root:\n  level: WARNING\n  handlers: [file]\ndisable_existing_loggers: false\n",
        data_dir.display()
    )
}

/// `tessera-node` config for load tests on `127.0.0.1:port`.
pub fn tessera_toml(data_dir: &Path, port: u16) -> String {
    format!(
        "server_name = \"localhost\"\ndata_dir = \"{}\"\n\n[listen]\naddress = \"127.0.0.1:{port}\"\n\n\
         [registration]\nenabled = true\n\n[auth]\nargon2_m_cost_kib = 64\nargon2_t_cost = 1\n\n\
         [rate_limits]\nenabled = false\n",
        data_dir.join("data").display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synapse_config_is_loopback_open_and_unthrottled() {
        let y = synapse_yaml(Path::new("/tmp/x"), 18008, &SynapseDb::Sqlite, "s");
        assert!(y.contains("bind_addresses: ['127.0.0.1']"));
        assert!(y.contains("port: 18008"));
        assert!(y.contains("enable_registration_without_verification: true"));
        assert!(y.contains("rc_message: {per_second: 1000000"));
        assert!(y.contains("database: \"/tmp/x/homeserver.db\""));
        assert!(!y.contains('\t'), "YAML forbids tabs");
        let pg = SynapseDb::Postgres {
            host: "127.0.0.1".into(),
            port: 5432,
            dbname: "syn".into(),
            user: "u".into(),
        };
        let y = synapse_yaml(Path::new("/tmp/x"), 1, &pg, "s");
        assert!(y.contains("name: psycopg2") && y.contains("database: \"syn\""));
    }

    #[test]
    fn tessera_config_parses_as_toml() {
        let t = tessera_toml(Path::new("/tmp/t"), 9);
        let v: toml::Table = toml::from_str(&t).expect("valid TOML");
        assert_eq!(v["listen"]["address"].as_str(), Some("127.0.0.1:9"));
        assert_eq!(v["rate_limits"]["enabled"].as_bool(), Some(false));
    }
}
