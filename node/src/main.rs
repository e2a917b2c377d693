//! The `tessera-node` binary: parses flags, loads configuration, runs the node.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tessera_node::config::Config;

// Request handling allocates many short-lived buffers on every shard;
// mimalloc's per-thread heaps keep that off glibc's shared arenas.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tessera homeserver node.
#[derive(Parser, Debug)]
#[command(name = "tessera-node", version, about)]
struct Cli {
    /// Configuration file (TOML). Without it, built-in defaults apply.
    #[arg(short, long, env = "TESSERA_CONFIG")]
    config: Option<PathBuf>,
    /// Overrides `listen.address`.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Overrides `data_dir`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Overrides `server_name`.
    #[arg(long)]
    server_name: Option<String>,
    /// Overrides `runtime.shards` (0 = one per core).
    #[arg(long)]
    shards: Option<usize>,
    /// Opens registration (`registration.enabled = true`).
    #[arg(long)]
    enable_registration: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Applies the storage schema migrations (creating the keyspace and
    /// tables of the CQL backend) and exits; the node also applies them on start.
    Migrate,
}

/// Keeps the kernel from backing this process's memory with transparent
/// huge pages from now on (the allocator asks for them on its arenas, and a
/// 2 MiB page counts whole however little of it is used).
fn disable_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and reads or
    // writes no memory of this process.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "could not turn transparent huge pages off; resident memory may be higher");
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,ruma_state_res=warn,ruma_common::push=warn".into()))
        .init();
    let cli = Cli::parse();
    let mut config = match Config::load(cli.config.as_deref(), std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tessera-node: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(a) = cli.listen {
        config.listen.address = a;
    }
    if let Some(d) = cli.data_dir {
        config.data_dir = d;
    }
    if let Some(s) = cli.server_name {
        config.server_name = s;
    }
    if let Some(n) = cli.shards {
        config.runtime.shards = n;
    }
    if cli.enable_registration {
        config.registration.enabled = true;
    }
    if let Err(e) = config.validate() {
        eprintln!("tessera-node: {e}");
        return ExitCode::from(2);
    }
    if !config.runtime.transparent_huge_pages {
        disable_transparent_huge_pages();
    }
    let result = match cli.command {
        Some(Command::Migrate) => tessera_node::server::migrate(&config).map(|()| eprintln!("tessera-node: storage schema is up to date ({})", config.storage.backend)),
        None => tessera_node::server::run(config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tessera-node: {e:#}");
            ExitCode::FAILURE
        }
    }
}
