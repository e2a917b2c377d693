//! `tessera-relay`: starts one relay shard per core from a TOML config,
//! serves Prometheus metrics, and drains on SIGTERM.
//!
//! Prints `tessera-relay ready` on stderr once every shard has bound its
//! listeners, so scripts can wait for readiness without sleeping.

use std::io::{BufRead as _, Write as _};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use glommio::{LocalExecutorBuilder, Placement};
use tessera_relay::config::Config;
use tessera_relay::driver::dtls::DtlsSetup;
use tessera_relay::driver::{ShardSetup, run_shard};
use tessera_relay::metrics::{Metrics, render};

#[derive(Parser)]
#[command(name = "tessera-relay", about = "Thread-per-core STUN/TURN relay")]
struct Cli {
    /// Path of the TOML configuration file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Prints TURN REST credentials (username and password lines) as a
    /// homeserver would mint them.
    MintCredentials {
        /// Shared secret.
        #[arg(long)]
        secret: String,
        /// Matrix user id.
        #[arg(long)]
        user: String,
        /// Seconds from now until expiry (negative: already expired).
        #[arg(long, default_value_t = 86400, allow_hyphen_values = true)]
        ttl_secs: i64,
    },
}

fn load_tls(cfg: &Config) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    if cfg.tls_listen.is_empty() {
        return Ok(None);
    }
    let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) else {
        anyhow::bail!("tls_listen needs tls_cert and tls_key");
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let sc = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Some(Arc::new(sc)))
}

/// The DTLS settings, when DTLS listeners are configured: the certificate
/// (the first of the PEM file) and key, checked by a handshake in memory.
fn load_dtls(cfg: &Config) -> anyhow::Result<Option<Arc<DtlsSetup>>> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    if cfg.dtls_listen.is_empty() {
        return Ok(None);
    }
    let Some((cert, key)) = cfg.dtls_cert_and_key() else {
        anyhow::bail!("dtls_listen needs dtls_cert and dtls_key (or tls_cert and tls_key)");
    };
    let leaf = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .next()
        .with_context(|| format!("no certificate in {}", cert.display()))?
        .with_context(|| format!("parsing {}", cert.display()))?;
    let key_der = match PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))? {
        PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        PrivateKeyDer::Sec1(k) => k.secret_sec1_der().to_vec(),
        _ => anyhow::bail!("{}: DTLS needs an ECDSA key (PKCS#8 or SEC1), not RSA", key.display()),
    };
    let setup = DtlsSetup::new(
        leaf.to_vec(),
        key_der,
        cfg.dtls_max_sessions,
        std::time::Duration::from_secs(cfg.dtls_handshake_secs),
        std::time::Duration::from_secs(u64::from(cfg.max_lifetime_secs.max(1))),
        std::time::Duration::from_secs(cfg.dtls_idle_secs),
    )?;
    setup.self_check().with_context(|| format!("DTLS certificate {} with key {}", cert.display(), key.display()))?;
    Ok(Some(Arc::new(setup)))
}

fn serve_metrics(addr: std::net::SocketAddr, shards: Vec<Arc<Metrics>>) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("bind metrics {addr}"))?;
    std::thread::Builder::new().name("relay-metrics".into()).spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(5)));
            // Read the request line and headers (bounded), ignore them: the
            // only resource is /metrics.
            let mut reader = std::io::BufReader::new(&conn).take(8192);
            let mut line = String::new();
            while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                line.clear();
            }
            let refs: Vec<&Metrics> = shards.iter().map(|m| m.as_ref()).collect();
            let body = render(&refs);
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
                body.len(),
                body
            );
        }
    })?;
    Ok(())
}

use std::io::Read as _;

/// How long a socket found on a listening address may take to go away
/// before the relay gives up: a process killed with SIGKILL leaves its
/// io_uring requests holding its sockets until the kernel tears the ring
/// down, moments after the process is gone.
const ADDRESS_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Fails when another process holds one of the listening addresses (and
/// goes on doing so for [`ADDRESS_WAIT`]).
///
/// Every thread binds its listeners with SO_REUSEPORT, which the kernel
/// grants to any process of the same user: a second relay started on a
/// taken port would bind too and get a share of the clients, whose
/// allocations live in the other process. The kernel's socket tables tell
/// before anything starts. (A plain test bind would also fail on the
/// TIME_WAIT remains of the last run's TCP connections.)
fn ensure_unclaimed(config: &Config) -> anyhow::Result<()> {
    use tessera_shared::listeners::{Kind, holds};
    let check = |what: &str, addr: &std::net::SocketAddr, kind: Kind| -> anyhow::Result<()> {
        let table = match (kind, addr.is_ipv4()) {
            (Kind::TcpListener, true) => "/proc/net/tcp",
            (Kind::TcpListener, false) => "/proc/net/tcp6",
            (Kind::Udp, true) => "/proc/net/udp",
            (Kind::Udp, false) => "/proc/net/udp6",
        };
        let deadline = std::time::Instant::now() + ADDRESS_WAIT;
        loop {
            match std::fs::read_to_string(table) {
                Ok(text) if holds(&text, kind, *addr) => {
                    if std::time::Instant::now() >= deadline {
                        anyhow::bail!("{what} {addr} is already in use by another process (is another relay running?)");
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Ok(_) => return Ok(()),
                Err(e) => {
                    tracing::warn!(table, error = %e, "cannot check for another process on a listening address");
                    return Ok(());
                }
            }
        }
    };
    for addr in &config.listen {
        check("listen (UDP)", addr, Kind::Udp)?;
        check("listen (TCP)", addr, Kind::TcpListener)?;
    }
    for addr in &config.tls_listen {
        check("tls_listen", addr, Kind::TcpListener)?;
    }
    for addr in &config.dtls_listen {
        check("dtls_listen", addr, Kind::Udp)?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_writer(std::io::stderr).init();
    if let Some(Command::MintCredentials { secret, user, ttl_secs }) = cli.command {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
        let expiry = now.saturating_add_signed(ttl_secs);
        let (u, p) = tessera_shared::turn_rest::turn_rest_credentials(secret.as_bytes(), &user, expiry);
        println!("{u}\n{p}");
        return Ok(());
    }
    let config = match &cli.config {
        Some(p) => Config::from_toml(&std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)?,
        None => anyhow::bail!("--config is required"),
    };
    ensure_unclaimed(&config)?;
    let server_config = Arc::new(config.server_config()?);
    let tls = load_tls(&config)?;
    let dtls = load_dtls(&config)?;
    let threads = if config.threads == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) } else { config.threads };
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let quotas = Arc::new(tessera_relay::turn::Quotas::new(config.max_allocations_per_user, config.max_allocations));
    let metrics: Vec<Arc<Metrics>> = (0..threads).map(|_| Arc::default()).collect();
    let nonce_key: [u8; 32] = rand::random();
    let stop = Arc::new(AtomicBool::new(false));
    let config = Arc::new(config);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let parking = Arc::new(tessera_relay::driver::tcp_relay::Parking::default());

    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT])?;
    {
        let stop = stop.clone();
        std::thread::Builder::new().name("relay-signals".into()).spawn(move || {
            if signals.forever().next().is_some() {
                stop.store(true, Ordering::Relaxed);
            }
        })?;
    }

    let mut handles = Vec::new();
    for (index, shard_metrics) in metrics.iter().enumerate() {
        let setup = ShardSetup {
            index,
            shards: threads,
            config: config.clone(),
            server_config: server_config.clone(),
            quotas: quotas.clone(),
            metrics: shard_metrics.clone(),
            nonce_key,
            tls: tls.clone(),
            dtls: dtls.clone(),
            stop: stop.clone(),
            ready: ready_tx.clone(),
            parking: parking.clone(),
        };
        let h = LocalExecutorBuilder::new(Placement::Fixed(index % cpus))
            .name(&format!("relay-{index}"))
            .io_memory(config.io_memory_kib * 1024)
            .spawn(move || run_shard(setup))
            .map_err(|e| anyhow::anyhow!("starting executor {index}: {e}"))?;
        handles.push(h);
    }
    drop(ready_tx);
    for _ in 0..threads {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => anyhow::bail!("shard failed to start: {e}"),
            Err(_) => anyhow::bail!("a shard exited before binding its listeners (executor error?)"),
        }
    }
    if let Some(addr) = config.metrics_listen {
        serve_metrics(addr, metrics.clone())?;
    }
    eprintln!("tessera-relay ready: {threads} shards, listening on {:?} tls {:?} dtls {:?}", config.listen, config.tls_listen, config.dtls_listen);
    let _ = std::io::stderr().flush();
    let mut failed = false;
    for (i, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                eprintln!("shard {i}: {e:#}");
                failed = true;
            }
            Err(e) => {
                eprintln!("shard {i}: executor error: {e}");
                failed = true;
            }
        }
    }
    eprintln!("tessera-relay stopped");
    if failed {
        anyhow::bail!("a shard failed");
    }
    Ok(())
}
