//! `tessera-loadtest`: command-line entry point. Subcommands: `run` (load a
//! server, write the report), `compare` (ratios of two reports), `plot`
//! (SVG from a JSON report), `server-config` (configs for servers under
//! test).

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use std::io::IsTerminal as _;
use std::path::PathBuf;
use tessera_loadtest::config::{Mode, Plan, Scenario};
use tessera_loadtest::report::{Report, compare, compare_text};
use tessera_loadtest::run::{Progress, RunOptions, run_blocking};
use tessera_loadtest::schedule::RateStep;
use tessera_loadtest::server_config::{SynapseDb, synapse_log_config, synapse_yaml, tessera_toml};
use tessera_loadtest::{plot, target};

#[derive(Parser)]
#[command(
    name = "tessera-loadtest",
    version,
    about = "Open-loop load generator for Matrix homeservers and TURN relays"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run scenarios against a server and write the report.
    Run(Box<RunArgs>),
    /// Compare two JSON reports: ratios of the key metrics.
    Compare {
        /// Baseline report (e.g. Synapse).
        baseline: PathBuf,
        /// Candidate report (e.g. Tessera).
        candidate: PathBuf,
        /// Column name of the baseline.
        #[arg(long, default_value = "baseline")]
        baseline_name: String,
        /// Column name of the candidate.
        #[arg(long, default_value = "candidate")]
        candidate_name: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Render the SVG plot of a JSON report.
    Plot {
        /// The report.
        report: PathBuf,
        /// Output SVG.
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Write a load-test configuration for a server under test.
    ServerConfig {
        /// `synapse` or `tessera`.
        #[arg(long)]
        kind: String,
        /// Loopback port to listen on.
        #[arg(long)]
        port: u16,
        /// Data directory (config files are written here).
        #[arg(long)]
        data_dir: PathBuf,
        /// Synapse on PostgreSQL: `host:port/dbname?user=NAME`; SQLite if absent.
        #[arg(long)]
        postgres: Option<String>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Plan file (TOML); flags below override its values.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Homeserver base URL, http://host:port.
    #[arg(long, short, env = "LOADTEST_TARGET")]
    target: Option<String>,
    /// Allow non-loopback targets.
    #[arg(long)]
    allow_remote: bool,
    /// Comma-separated scenarios: register,rooms,send,sync,mixed,turn.
    #[arg(long, short, value_delimiter = ',')]
    scenarios: Option<Vec<Scenario>>,
    /// Number of users.
    #[arg(long)]
    users: Option<u32>,
    /// Registrations per second (0: closed loop).
    #[arg(long)]
    register_rate: Option<f64>,
    /// Registration token for servers that require one.
    #[arg(long)]
    registration_token: Option<String>,
    /// Reuse users of earlier runs (log in when taken).
    #[arg(long)]
    reuse_users: bool,
    /// Localpart prefix of the users.
    #[arg(long)]
    user_prefix: Option<String>,
    /// Number of ordinary rooms.
    #[arg(long)]
    rooms: Option<u32>,
    /// Members per ordinary room.
    #[arg(long)]
    room_size: Option<u32>,
    /// Members of one extra large room.
    #[arg(long)]
    large_room: Option<u32>,
    /// Messages per second.
    #[arg(long)]
    rate: Option<f64>,
    /// Stepped send rates, `RATE:SECONDS,...` (replaces --rate and --duration).
    #[arg(long)]
    steps: Option<String>,
    /// Measured seconds of the load phase.
    #[arg(long)]
    duration: Option<f64>,
    /// Warm-up seconds (not measured).
    #[arg(long)]
    warmup: Option<f64>,
    /// Seconds to wait for outstanding deliveries after sending stops.
    #[arg(long)]
    drain: Option<f64>,
    /// `open` (fixed arrival rate) or `closed` (fixed concurrency).
    #[arg(long)]
    mode: Option<String>,
    /// Closed-loop workers.
    #[arg(long)]
    concurrency: Option<u32>,
    /// Users running a sync loop (0: all).
    #[arg(long)]
    sync_users: Option<u32>,
    /// Long-poll timeout of /sync in ms.
    #[arg(long)]
    sync_timeout_ms: Option<u64>,
    /// Open loop: leave within microseconds of each scheduled arrival
    /// (yields through the last timer tick; busy between close arrivals).
    #[arg(long)]
    precise_arrivals: Option<bool>,
    /// Send each next /sync before decoding the previous response (true,
    /// the default) or after (false).
    #[arg(long)]
    sync_pipelined: Option<bool>,
    /// Chat-like actions per second (mixed).
    #[arg(long)]
    mixed_rate: Option<f64>,
    /// Mixed weights, e.g. `send=40,typing=20,receipt=20,profile=10,messages=10`.
    #[arg(long)]
    mix: Option<String>,
    /// TURN server host:port (UDP).
    #[arg(long)]
    turn_server: Option<String>,
    /// TURN REST shared secret.
    #[arg(long, env = "LOADTEST_TURN_SECRET")]
    turn_secret: Option<String>,
    /// Take TURN credentials from the homeserver's /voip/turnServer.
    #[arg(long)]
    turn_from_homeserver: bool,
    /// TURN allocations per second.
    #[arg(long)]
    turn_allocate_rate: Option<f64>,
    /// TURN relayed packets per second.
    #[arg(long)]
    turn_packet_rate: Option<f64>,
    /// Seed of random choices.
    #[arg(long)]
    seed: Option<u64>,
    /// Generator threads; users, connections and arrival rates are spread
    /// over them (rates and limits stay totals).
    #[arg(long)]
    threads: Option<u32>,
    /// Hard cap on the whole run, seconds.
    #[arg(long)]
    max_run: Option<f64>,
    /// Hard cap on load-phase requests.
    #[arg(long)]
    max_requests: Option<u64>,
    /// Pool connections.
    #[arg(long)]
    connections: Option<u32>,
    /// Directory for report.json, summary.txt and plot.svg.
    #[arg(long, short)]
    out_dir: Option<PathBuf>,
    /// Pid of the server, to sample its memory.
    #[arg(long)]
    server_pid: Option<u32>,
    /// No progress line.
    #[arg(long, short)]
    quiet: bool,
    /// Print the effective plan as TOML and exit.
    #[arg(long)]
    print_plan: bool,
}

fn parse_steps(text: &str) -> anyhow::Result<Vec<RateStep>> {
    text.split(',')
        .map(|step| {
            let (rate, dur) = step
                .split_once(':')
                .with_context(|| format!("step {step:?} is not RATE:SECONDS"))?;
            let rate_per_s: f64 = rate
                .trim()
                .parse()
                .with_context(|| format!("bad rate in {step:?}"))?;
            let secs: f64 = dur
                .trim()
                .parse()
                .with_context(|| format!("bad seconds in {step:?}"))?;
            let duration = std::time::Duration::try_from_secs_f64(secs)
                .with_context(|| format!("bad seconds in {step:?}"))?;
            Ok(RateStep {
                rate_per_s,
                duration,
            })
        })
        .collect()
}

fn build_plan(a: &RunArgs) -> anyhow::Result<Plan> {
    let mut p = match &a.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Plan::from_toml(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => Plan::default(),
    };
    macro_rules! set {
        ($field:expr, $value:expr) => {
            if let Some(v) = $value.clone() {
                $field = v;
            }
        };
    }
    set!(p.target, a.target);
    p.allow_remote |= a.allow_remote;
    set!(p.scenarios, a.scenarios);
    set!(p.users.count, a.users);
    set!(p.users.register_rate_per_s, a.register_rate);
    if a.registration_token.is_some() {
        p.users.registration_token = a.registration_token.clone();
    }
    p.users.reuse |= a.reuse_users;
    set!(p.users.prefix, a.user_prefix);
    set!(p.rooms.count, a.rooms);
    set!(p.rooms.size, a.room_size);
    set!(p.rooms.large_room_size, a.large_room);
    set!(p.send.rate_per_s, a.rate);
    if let Some(steps) = &a.steps {
        p.send.steps = parse_steps(steps)?;
    }
    set!(p.load.duration_s, a.duration);
    set!(p.load.warmup_s, a.warmup);
    set!(p.load.drain_s, a.drain);
    if let Some(m) = &a.mode {
        p.load.mode = match m.as_str() {
            "open" => Mode::Open,
            "closed" => Mode::Closed,
            other => anyhow::bail!("--mode {other:?}: expected open or closed"),
        };
    }
    set!(p.load.concurrency, a.concurrency);
    set!(p.load.precise_arrivals, a.precise_arrivals);
    set!(p.sync.users, a.sync_users);
    set!(p.sync.timeout_ms, a.sync_timeout_ms);
    set!(p.sync.pipelined, a.sync_pipelined);
    set!(p.mixed.rate_per_s, a.mixed_rate);
    if let Some(mix) = &a.mix {
        for part in mix.split(',') {
            let (k, v) = part
                .split_once('=')
                .with_context(|| format!("mix entry {part:?} is not NAME=WEIGHT"))?;
            let w: u32 = v
                .trim()
                .parse()
                .with_context(|| format!("bad weight in {part:?}"))?;
            match k.trim() {
                "send" => p.mixed.send = w,
                "typing" => p.mixed.typing = w,
                "receipt" => p.mixed.receipt = w,
                "profile" => p.mixed.profile = w,
                "messages" => p.mixed.messages = w,
                other => anyhow::bail!("unknown mix action {other:?}"),
            }
        }
    }
    set!(p.turn.server, a.turn_server);
    if a.turn_secret.is_some() {
        p.turn.secret = a.turn_secret.clone();
    }
    p.turn.from_homeserver |= a.turn_from_homeserver;
    set!(p.turn.allocate_rate_per_s, a.turn_allocate_rate);
    set!(p.turn.packet_rate_per_s, a.turn_packet_rate);
    set!(p.seed, a.seed);
    set!(p.threads, a.threads);
    set!(p.limits.max_run_s, a.max_run);
    set!(p.limits.max_requests, a.max_requests);
    set!(p.limits.connections, a.connections);
    p.validate().map_err(anyhow::Error::msg)?;
    Ok(p)
}

fn run_command(a: &RunArgs) -> anyhow::Result<i32> {
    let plan = build_plan(a)?;
    if a.print_plan {
        print!("{}", toml::to_string(&plan)?);
        return Ok(0);
    }
    // Refuse a bad target before anything else happens.
    target::http_target(&plan.target, plan.allow_remote)?;
    let progress = if a.quiet {
        Progress::Off
    } else if std::io::stderr().is_terminal() {
        Progress::Line
    } else {
        Progress::Log
    };
    let opts = RunOptions {
        server_pid: a.server_pid,
        progress,
    };
    let report = run_blocking(&plan, &opts)?;
    if progress == Progress::Line {
        eprintln!();
    }
    let summary = report.summary_text();
    print!("{summary}");
    if let Some(dir) = &a.out_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("report.json"), report.to_json())?;
        std::fs::write(dir.join("summary.txt"), &summary)?;
        std::fs::write(dir.join("plot.svg"), plot::svg(&report))?;
        eprintln!("wrote {}/report.json, summary.txt, plot.svg", dir.display());
    }
    Ok(0)
}

fn read_report(path: &PathBuf) -> anyhow::Result<Report> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Report::from_json(&text).with_context(|| format!("parsing {}", path.display()))
}

fn parse_postgres(spec: &str) -> anyhow::Result<SynapseDb> {
    // host:port/dbname?user=NAME
    let (hostport, rest) = spec
        .split_once('/')
        .context("--postgres: expected host:port/dbname?user=NAME")?;
    let (host, port) = hostport
        .rsplit_once(':')
        .context("--postgres: missing :port")?;
    let (dbname, user) = match rest.split_once("?user=") {
        Some((d, u)) => (d, u),
        None => (rest, "postgres"),
    };
    Ok(SynapseDb::Postgres {
        host: host.into(),
        port: port.parse()?,
        dbname: dbname.into(),
        user: user.into(),
    })
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run_command(&args),
        Command::Compare {
            baseline,
            candidate,
            baseline_name,
            candidate_name,
            json,
        } => (|| {
            let rows = compare(&read_report(&baseline)?, &read_report(&candidate)?);
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", compare_text(&baseline_name, &candidate_name, &rows));
            }
            Ok(0)
        })(),
        Command::Plot { report, out } => (|| {
            std::fs::write(&out, plot::svg(&read_report(&report)?))?;
            Ok(0)
        })(),
        Command::ServerConfig {
            kind,
            port,
            data_dir,
            postgres,
        } => (|| {
            std::fs::create_dir_all(&data_dir)?;
            let data_dir = std::fs::canonicalize(&data_dir)?;
            match kind.as_str() {
                "synapse" => {
                    let db = match &postgres {
                        Some(spec) => parse_postgres(spec)?,
                        None => SynapseDb::Sqlite,
                    };
                    let mut raw = [0u8; 16];
                    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut raw)?;
                    let secret: String = raw.iter().map(|b| format!("{b:02x}")).collect();
                    std::fs::write(
                        data_dir.join("homeserver.yaml"),
                        synapse_yaml(&data_dir, port, &db, &secret),
                    )?;
                    std::fs::write(data_dir.join("log.config"), synapse_log_config(&data_dir))?;
                    println!("{}", data_dir.join("homeserver.yaml").display());
                }
                "tessera" => {
                    std::fs::write(data_dir.join("tessera.toml"), tessera_toml(&data_dir, port))?;
                    println!("{}", data_dir.join("tessera.toml").display());
                }
                other => anyhow::bail!("--kind {other:?}: expected synapse or tessera"),
            }
            Ok(0)
        })(),
    };
    match result {
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tessera-loadtest: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
