//! The relay's TOML configuration file and its translation into the
//! protocol core's [`ServerConfig`]. Every knob has a default; each bound
//! states what it costs in memory.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::Deserialize;

use crate::auth::CredentialStore;
use crate::policy::{Cidr, PeerPolicy};
use crate::turn::ServerConfig;

/// Largest `udp_receive_buffer_kib` (1 GiB; the kernel takes an int).
pub const UDP_RECEIVE_BUFFER_MAX_KIB: usize = 1 << 20;

/// Largest `udp_batch`: the kernel's cap on datagrams per `recvmmsg` /
/// `sendmmsg` call (`UIO_MAXIOV`).
pub const UDP_BATCH_MAX: usize = 1024;

/// The configuration file (all fields optional).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Realm of the long-term credentials.
    pub realm: String,
    /// UDP and TCP listening addresses (STUN/TURN, usually port 3478).
    pub listen: Vec<SocketAddr>,
    /// TLS listening addresses (usually port 5349); need `tls_cert` and `tls_key`.
    pub tls_listen: Vec<SocketAddr>,
    /// PEM certificate chain for TLS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    pub tls_key: Option<PathBuf>,
    /// DTLS listening addresses (UDP, usually port 5349 as for TLS; RFC
    /// 7350). DTLS needs an ECDSA (P-256 or P-384) certificate: `dtls_cert`
    /// and `dtls_key`, or `tls_cert` and `tls_key` when those are ECDSA.
    pub dtls_listen: Vec<SocketAddr>,
    /// PEM certificate for DTLS (the first of the file is sent); defaults
    /// to `tls_cert`.
    pub dtls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8 or SEC1, ECDSA) for DTLS; defaults to
    /// `tls_key`.
    pub dtls_key: Option<PathBuf>,
    /// DTLS sessions per shard, in handshake or established: about 14 KiB
    /// each once established, 8.5 KiB after the cookie exchange (14 MiB
    /// per shard at 1024); a ClientHello beyond it is refused.
    pub dtls_max_sessions: usize,
    /// Seconds a DTLS handshake may take before its session is dropped.
    pub dtls_handshake_secs: u64,
    /// Seconds an established DTLS session may go without an authenticated
    /// record from its client while the client holds no allocation.
    pub dtls_idle_secs: u64,
    /// Address IPv4 relay sockets bind to (and advertise).
    pub relay_ipv4: Option<IpAddr>,
    /// Address IPv6 relay sockets bind to (RFC 6156); none disables IPv6 relays.
    pub relay_ipv6: Option<IpAddr>,
    /// Lowest relay port.
    pub min_port: u16,
    /// Highest relay port.
    pub max_port: u16,
    /// Executor threads (one per core); 0 means one per available CPU.
    pub threads: usize,
    /// glommio I/O memory per executor in KiB (locked memory).
    pub io_memory_kib: usize,
    /// Most UDP messages received with one `recvmmsg` (1..=1024; a message
    /// is one datagram, or with `udp_gro` a coalesced burst) and datagrams
    /// sent with one `sendmmsg` (at least 128). Each shard keeps one 64 KiB
    /// receive slot per message, shared by all its UDP sockets: 2 MiB per
    /// shard at 32.
    pub udp_batch: usize,
    /// Send runs of datagrams to one destination (a burst of one media
    /// stream) as one UDP GSO message (`UDP_SEGMENT`). A shard turns it
    /// off, with a warning, where the kernel keeps refusing it and it never
    /// worked.
    pub udp_gso: bool,
    /// Let the kernel hand over back-to-back datagrams of one sender as one
    /// coalesced message (`UDP_GRO`; a burst of one media stream), which a
    /// shard splits again: one receive for the burst instead of one per
    /// datagram.
    pub udp_gro: bool,
    /// Receive buffer asked for on each UDP listener socket, in KiB (the
    /// kernel caps it at `net.core.rmem_max`); 0 keeps the kernel default.
    /// Clients' datagrams wait here while a shard is busy.
    pub udp_receive_buffer_kib: usize,
    /// TURN REST shared secrets; the first is current, the others are
    /// accepted during rotation.
    pub rest_secrets: Vec<String>,
    /// Static users: name -> password. Non-ASCII names and passwords also
    /// match their SASLprep and OpaqueString forms (`auth::credential_forms`).
    pub static_users: HashMap<String, String>,
    /// Allocations per username across all cores.
    pub max_allocations_per_user: u32,
    /// Allocations in total; each costs one relay socket and ~1 KiB plus
    /// its permissions and channels.
    pub max_allocations: u32,
    /// Per-allocation bandwidth cap in bytes per second (0: none).
    pub bandwidth_bytes_per_sec: u64,
    /// Longest lifetime granted per Allocate/Refresh.
    pub max_lifetime_secs: u32,
    /// Nonce lifetime.
    pub nonce_lifetime_secs: u64,
    /// Permissions per allocation (~48 bytes each).
    pub max_permissions: usize,
    /// Channels per allocation (~64 bytes each).
    pub max_channels: usize,
    /// TCP peer connections per TCP allocation (RFC 6062), pending or
    /// relaying.
    pub max_tcp_connections: usize,
    /// Peer ranges allowed although special-purpose (e.g. "127.0.0.0/8" for
    /// tests on one host). Empty by default: never needed in production.
    pub allowed_peer_ranges: Vec<String>,
    /// Extra peer ranges to refuse.
    pub denied_peer_ranges: Vec<String>,
    /// Prometheus endpoint address (plain HTTP, `GET /metrics`).
    pub metrics_listen: Option<SocketAddr>,
    /// How long to keep relaying existing allocations after SIGTERM.
    pub drain_secs: u64,
    /// SOFTWARE attribute in responses (empty: none).
    pub software: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            realm: "tessera".to_owned(),
            listen: vec![SocketAddr::from(([0, 0, 0, 0], 3478))],
            tls_listen: Vec::new(),
            tls_cert: None,
            tls_key: None,
            dtls_listen: Vec::new(),
            dtls_cert: None,
            dtls_key: None,
            dtls_max_sessions: 1024,
            dtls_handshake_secs: 10,
            dtls_idle_secs: 60,
            relay_ipv4: None,
            relay_ipv6: None,
            min_port: 49152,
            max_port: 65535,
            threads: 0,
            io_memory_kib: 2048,
            udp_batch: 32,
            udp_gso: true,
            udp_gro: true,
            udp_receive_buffer_kib: 4096,
            rest_secrets: Vec::new(),
            static_users: HashMap::new(),
            max_allocations_per_user: 16,
            max_allocations: 10_000,
            bandwidth_bytes_per_sec: 0,
            max_lifetime_secs: 3600,
            nonce_lifetime_secs: 600,
            max_permissions: 64,
            max_channels: 64,
            max_tcp_connections: 64,
            allowed_peer_ranges: Vec::new(),
            denied_peer_ranges: Vec::new(),
            metrics_listen: None,
            drain_secs: 30,
            software: "tessera-relay".to_owned(),
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// TOML syntax or unknown key.
    #[error("config: {0}")]
    Toml(#[from] toml::de::Error),
    /// A peer range does not parse.
    #[error("config: {0}")]
    Cidr(#[from] crate::policy::CidrError),
    /// Inconsistent values.
    #[error("config: {0}")]
    Invalid(String),
}

impl Config {
    /// Parses a TOML document.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let c: Config = toml::from_str(text)?;
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.min_port > self.max_port || self.min_port == 0 {
            return Err(ConfigError::Invalid("need 0 < min_port <= max_port".into()));
        }
        if self.listen.is_empty() && self.tls_listen.is_empty() && self.dtls_listen.is_empty() {
            return Err(ConfigError::Invalid("no listen address".into()));
        }
        if !self.tls_listen.is_empty() && (self.tls_cert.is_none() || self.tls_key.is_none()) {
            return Err(ConfigError::Invalid("tls_listen needs tls_cert and tls_key".into()));
        }
        if !self.dtls_listen.is_empty() && self.dtls_cert_and_key().is_none() {
            return Err(ConfigError::Invalid("dtls_listen needs dtls_cert and dtls_key (or tls_cert and tls_key)".into()));
        }
        if !self.dtls_listen.is_empty() && (self.dtls_max_sessions == 0 || self.dtls_handshake_secs == 0 || self.dtls_idle_secs == 0) {
            return Err(ConfigError::Invalid("dtls_max_sessions, dtls_handshake_secs and dtls_idle_secs must be at least 1".into()));
        }
        // Two SO_REUSEPORT sockets on one address would split clients
        // between plain UDP and DTLS at random.
        let overlaps = |a: &SocketAddr, b: &SocketAddr| a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified());
        if let Some(a) = self.dtls_listen.iter().find(|a| self.listen.iter().any(|b| overlaps(a, b))) {
            return Err(ConfigError::Invalid(format!("{a} is in both listen and dtls_listen (DTLS needs its own port, e.g. 5349)")));
        }
        if self.rest_secrets.is_empty() && self.static_users.is_empty() {
            return Err(ConfigError::Invalid("no credentials: set rest_secrets or static_users".into()));
        }
        if self.udp_receive_buffer_kib > UDP_RECEIVE_BUFFER_MAX_KIB {
            return Err(ConfigError::Invalid(format!("udp_receive_buffer_kib must be 0..={UDP_RECEIVE_BUFFER_MAX_KIB}")));
        }
        if !(1..=UDP_BATCH_MAX).contains(&self.udp_batch) {
            return Err(ConfigError::Invalid(format!("udp_batch must be 1..={UDP_BATCH_MAX}")));
        }
        if self.relay_ipv4.is_some_and(|a| !a.is_ipv4()) || self.relay_ipv6.is_some_and(|a| !a.is_ipv6()) {
            return Err(ConfigError::Invalid("relay_ipv4/relay_ipv6 of the wrong family".into()));
        }
        Ok(())
    }

    /// The DTLS certificate and key files: `dtls_cert`/`dtls_key`, else the
    /// TLS ones.
    pub fn dtls_cert_and_key(&self) -> Option<(&PathBuf, &PathBuf)> {
        match (&self.dtls_cert, &self.dtls_key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => self.tls_cert.as_ref().zip(self.tls_key.as_ref()),
            _ => None,
        }
    }

    /// The peer policy.
    pub fn policy(&self) -> Result<PeerPolicy, ConfigError> {
        let parse = |v: &Vec<String>| v.iter().map(|s| s.parse::<Cidr>()).collect::<Result<Vec<_>, _>>();
        Ok(PeerPolicy { allow: parse(&self.allowed_peer_ranges)?, deny: parse(&self.denied_peer_ranges)? })
    }

    /// The protocol core's configuration.
    pub fn server_config(&self) -> Result<ServerConfig, ConfigError> {
        let creds = CredentialStore::new(self.rest_secrets.iter().map(|s| s.as_bytes().to_vec()).collect(), &self.static_users);
        let mut sc = ServerConfig::new(&self.realm, creds);
        sc.software = (!self.software.is_empty()).then(|| self.software.clone());
        sc.max_lifetime_secs = self.max_lifetime_secs.max(1);
        sc.default_lifetime_secs = sc.default_lifetime_secs.min(sc.max_lifetime_secs);
        sc.max_permissions = self.max_permissions;
        sc.max_channels = self.max_channels;
        sc.max_tcp_connections = self.max_tcp_connections;
        sc.bandwidth_bytes_per_sec = (self.bandwidth_bytes_per_sec > 0).then_some(self.bandwidth_bytes_per_sec);
        sc.policy = self.policy()?;
        Ok(sc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_example() {
        let c = Config::from_toml(
            r#"
            realm = "turn.example.org"
            listen = ["127.0.0.1:3478"]
            relay_ipv4 = "127.0.0.1"
            min_port = 50000
            max_port = 50100
            rest_secrets = ["s1", "s0"]
            static_users = { alice = "pw" }
            allowed_peer_ranges = ["127.0.0.0/8"]
            bandwidth_bytes_per_sec = 1000
            "#,
        )
        .expect("valid");
        let sc = c.server_config().expect("valid");
        assert_eq!(sc.realm, "turn.example.org");
        assert_eq!(sc.credentials.rest_secrets.len(), 2);
        assert!(sc.policy.check("127.0.0.1".parse().expect("literal")).is_ok());
        assert_eq!(sc.bandwidth_bytes_per_sec, Some(1000));
    }

    #[test]
    fn rejects_bad_configs() {
        assert!(Config::from_toml("realm = 1").is_err());
        assert!(Config::from_toml("nope = 1").is_err());
        assert!(Config::from_toml("static_users = { a = \"b\" }\nmin_port = 10\nmax_port = 5").is_err());
        assert!(Config::from_toml("").is_err(), "no credentials");
        let c = Config::from_toml("rest_secrets = [\"x\"]\nallowed_peer_ranges = [\"bad\"]").expect("parses");
        assert!(c.server_config().is_err());
        assert!(Config::from_toml("rest_secrets = [\"x\"]\nudp_batch = 0").is_err());
        assert!(Config::from_toml("rest_secrets = [\"x\"]\nudp_batch = 1025").is_err());
        assert_eq!(Config::from_toml("rest_secrets = [\"x\"]\nudp_batch = 1024").map(|c| c.udp_batch).ok(), Some(1024));
        assert_eq!(Config::from_toml("rest_secrets = [\"x\"]").map(|c| c.udp_batch).ok(), Some(32));
        assert_eq!(Config::from_toml("rest_secrets = [\"x\"]").map(|c| c.udp_receive_buffer_kib).ok(), Some(4096));
        assert_eq!(Config::from_toml("rest_secrets = [\"x\"]").map(|c| c.udp_gso).ok(), Some(true));
        assert_eq!(Config::from_toml("rest_secrets = [\"x\"]\nudp_gso = false").map(|c| c.udp_gso).ok(), Some(false));
        assert!(Config::from_toml("rest_secrets = [\"x\"]\nudp_gso = 1").is_err());
        assert_eq!(Config::from_toml("rest_secrets = [\"x\"]").map(|c| c.udp_gro).ok(), Some(true));
        assert_eq!(Config::from_toml("rest_secrets = [\"x\"]\nudp_gro = false").map(|c| c.udp_gro).ok(), Some(false));
        assert!(Config::from_toml("rest_secrets = [\"x\"]\nudp_receive_buffer_kib = 1048577").is_err());
        assert!(Config::from_toml("rest_secrets = [\"x\"]\ndtls_listen = [\"127.0.0.1:5349\"]").is_err(), "DTLS without a certificate");
        assert!(Config::from_toml("rest_secrets = [\"x\"]\ndtls_listen = [\"127.0.0.1:5349\"]\ndtls_cert = \"c.pem\"").is_err(), "a certificate without its key");
        let c = Config::from_toml("rest_secrets = [\"x\"]\ndtls_listen = [\"127.0.0.1:5349\"]\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"").expect("TLS files serve DTLS");
        assert_eq!(c.dtls_cert_and_key().map(|(c, _)| c.to_str()), Some(Some("c.pem")));
        assert!(Config::from_toml("rest_secrets = [\"x\"]\ndtls_listen = [\"127.0.0.1:5349\"]\ndtls_cert = \"c\"\ndtls_key = \"k\"\ndtls_max_sessions = 0").is_err());
        let overlap = Config::from_toml("rest_secrets = [\"x\"]\nlisten = [\"127.0.0.1:3478\"]\ndtls_listen = [\"127.0.0.1:3478\"]\ndtls_cert = \"c\"\ndtls_key = \"k\"");
        assert!(overlap.is_err_and(|e| e.to_string().contains("both listen and dtls_listen")));
        let wildcard = Config::from_toml("rest_secrets = [\"x\"]\nlisten = [\"0.0.0.0:3478\"]\ndtls_listen = [\"127.0.0.1:3478\"]\ndtls_cert = \"c\"\ndtls_key = \"k\"");
        assert!(wildcard.is_err(), "a wildcard listener takes the port on every address");
        let dual = Config::from_toml("rest_secrets = [\"x\"]\nlisten = [\"127.0.0.1:3478\"]\ndtls_listen = [\"[::]:3478\"]\ndtls_cert = \"c\"\ndtls_key = \"k\"");
        assert!(dual.is_err());
        let apart = Config::from_toml("rest_secrets = [\"x\"]\nlisten = [\"0.0.0.0:3478\"]\ndtls_listen = [\"0.0.0.0:5349\"]\ndtls_cert = \"c\"\ndtls_key = \"k\"");
        assert!(apart.is_ok());
        assert_eq!(Config::from_toml("rest_secrets = [\"x\"]\nudp_receive_buffer_kib = 0").map(|c| c.udp_receive_buffer_kib).ok(), Some(0));
    }
}
