//! End-to-end runs of every scenario against a real homeserver started by
//! the test, asserting the report's counts (correctness of the tool, not
//! speed).
//!
//! The server under test is chosen by `HS_KIND`:
//! - `tessera` (default): `TESSERA_NODE_BIN`, default
//!   `<repo>/target/debug/tessera-node`, started with a load-test config.
//! - `synapse`: Synapse from the venv at `SYNAPSE_VENV` (default
//!   `~/.cache/tessera/synapse-venv`, see `scripts/install-synapse.sh`),
//!   SQLite, same load-test settings.
//!
//! One server is shared by all tests of this binary; it is killed when the
//! test process exits (parent-death signal), so no test can leak it.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tessera_loadtest::config::{Mode, Plan, Scenario};
use tessera_loadtest::report::Report;
use tessera_loadtest::run::{RunOptions, run_blocking};
use tessera_loadtest::schedule::RateStep;
use tessera_loadtest::server_config;

struct Server {
    url: String,
    pid: u32,
    kind: String,
}

/// An ephemeral port, never the same twice in this process: tests run side
/// by side, and two servers on one port would share each other's requests.
fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> = std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = l.local_addr().expect("local addr").port();
        if HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner()).insert(port) {
            return port;
        }
    }
}

/// Whether `GET /_matrix/client/versions` answers 200.
fn ready(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /_matrix/client/versions HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if n >= 12 && buf[..12].ends_with(b" 200"))
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("loadtest/ has a parent")
        .to_path_buf()
}

/// Spawns `cmd` so that it dies with the test process.
fn spawn_tied(mut cmd: Command) -> Child {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

fn start_server() -> (Server, Child) {
    let kind = std::env::var("HS_KIND").unwrap_or_else(|_| "tessera".into());
    let port = free_port();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("loadtest-e2e-{kind}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create server dir");
    let log = std::fs::File::create(dir.join("server.log")).expect("create server log");
    let cmd = match kind.as_str() {
        "tessera" => {
            let bin = std::env::var("TESSERA_NODE_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|_| repo_root().join("target/debug/tessera-node"));
            assert!(
                bin.exists(),
                "tessera-node not found at {} (build it, or set TESSERA_NODE_BIN)",
                bin.display()
            );
            let config = dir.join("tessera.toml");
            std::fs::write(&config, server_config::tessera_toml(&dir, port)).expect("write config");
            let mut cmd = Command::new(bin);
            cmd.arg("--config").arg(&config);
            cmd
        }
        "synapse" => {
            let venv = std::env::var("SYNAPSE_VENV")
                .map(PathBuf::from)
                .unwrap_or_else(|_| {
                    PathBuf::from(std::env::var("HOME").expect("HOME"))
                        .join(".cache/tessera/synapse-venv")
                });
            let python = venv.join("bin/python");
            assert!(
                python.exists(),
                "no Synapse venv at {} (run scripts/install-synapse.sh)",
                venv.display()
            );
            let config = dir.join("homeserver.yaml");
            let yaml =
                server_config::synapse_yaml(&dir, port, &server_config::SynapseDb::Sqlite, "e2e");
            std::fs::write(&config, yaml).expect("write config");
            std::fs::write(
                dir.join("log.config"),
                server_config::synapse_log_config(&dir),
            )
            .expect("write log config");
            let status = Command::new(&python)
                .args(["-m", "synapse.app.homeserver", "-c"])
                .arg(&config)
                .arg("--generate-keys")
                .stdout(Stdio::null())
                .status()
                .expect("run synapse --generate-keys");
            assert!(status.success(), "synapse --generate-keys failed");
            let mut cmd = Command::new(python);
            cmd.args(["-m", "synapse.app.homeserver", "-c"])
                .arg(&config);
            cmd
        }
        other => panic!("HS_KIND={other:?}: expected tessera or synapse"),
    };
    let mut cmd = cmd;
    cmd.stdout(log.try_clone().expect("clone log"))
        .stderr(log)
        .stdin(Stdio::null());
    let mut child = spawn_tied(cmd);
    let pid = child.id();
    // Readiness: poll until the API answers, the server dies, or 120 s pass.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if ready(port) {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
            panic!("{kind} exited with {status} before becoming ready:\n{log}");
        }
        assert!(
            Instant::now() < deadline,
            "{kind} not ready after 120 s; see {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (
        Server {
            url: format!("http://127.0.0.1:{port}"),
            pid,
            kind,
        },
        child,
    )
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        // The parent-death signal fires when the spawning *thread* exits, and
        // test threads are short-lived: start the server from a thread that
        // lives as long as the test process.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (server, child) = start_server();
            let _ = tx.send(server);
            let _child = child;
            loop {
                std::thread::park();
            }
        });
        rx.recv()
            .expect("the server failed to start (see the panic above)")
    })
}

fn plan(scenarios: &[Scenario]) -> Plan {
    let s = server();
    let mut p = Plan {
        target: s.url.clone(),
        scenarios: scenarios.to_vec(),
        ..Plan::default()
    };
    p.users.count = 6;
    p.users.concurrency = 3;
    p.rooms.count = 2;
    p.rooms.size = 3;
    p.rooms.large_room_size = 6;
    p.rooms.concurrency = 3;
    p.load.duration_s = 2.0;
    p.load.warmup_s = 0.5;
    p.load.drain_s = 30.0;
    p.sync.timeout_ms = 5_000;
    p.send.rate_per_s = 10.0;
    p.mixed.rate_per_s = 10.0;
    p.limits.max_run_s = 300.0;
    p
}

fn run(p: &Plan) -> Report {
    let opts = RunOptions {
        server_pid: Some(server().pid),
        ..RunOptions::default()
    };
    let report = run_blocking(p, &opts)
        .unwrap_or_else(|e| panic!("run against {} failed: {e:#}", server().kind));
    eprintln!("{}", report.summary_text());
    report
}

fn assert_no_errors(r: &Report) {
    assert_eq!(r.total_errors(), 0, "errors: {:?}", r.errors);
    assert!(
        r.errors.is_empty(),
        "errors (429s included): {:?}",
        r.errors
    );
    assert!(!r.generator.stopped_early);
}

/// All deliveries of measured messages arrived, none twice.
fn assert_deliveries_complete(r: &Report) {
    let d = r.delivery;
    assert!(d.expected > 0, "{d:?}");
    assert_eq!(d.received, d.expected, "{d:?}");
    assert_eq!(
        (d.missing, d.unexpected, d.limited_timelines),
        (0, 0, 0),
        "{d:?}"
    );
    assert_eq!(r.op("delivery").latency.count, d.received);
}

#[test]
fn register_scenario_registers_and_logs_in_every_user() {
    let r = run(&plan(&[Scenario::Register]));
    assert_no_errors(&r);
    assert_eq!(
        (r.users.requested, r.users.registered, r.users.failed),
        (6, 6, 0)
    );
    assert_eq!(r.op("register").ok, 6);
    assert_eq!(r.op("login").ok, 6);
    assert!(r.op("register").throughput_per_s > 0.0);
    assert!(!r.server.versions.is_empty());
    assert!(!r.ops.contains_key("send"));
}

#[test]
fn register_at_a_fixed_rate() {
    let mut p = plan(&[Scenario::Register]);
    p.users.count = 4;
    p.users.register_rate_per_s = 8.0;
    p.users.login = false;
    let r = run(&p);
    assert_no_errors(&r);
    assert_eq!(r.op("register").ok, 4);
    assert_eq!(r.op("login").ok, 0);
}

#[test]
fn rooms_scenario_creates_rooms_and_joins_members() {
    let r = run(&plan(&[Scenario::Register, Scenario::Rooms]));
    assert_no_errors(&r);
    // Two rooms of 3 and one large room of 6: 3 creations, 2 + 2 + 5 joins.
    assert_eq!(r.rooms.created, 3);
    assert_eq!(r.op("create_room").ok, 3);
    assert_eq!(r.rooms.joins, 9);
    assert_eq!(r.op("join").ok, 9);
}

#[test]
fn send_and_sync_measure_every_delivery() {
    let r = run(&plan(&[
        Scenario::Register,
        Scenario::Rooms,
        Scenario::Send,
        Scenario::Sync,
    ]));
    assert_no_errors(&r);
    // 10/s over 0.5 s warm-up + 2 s: 5 warm-up arrivals, 20 measured.
    let send = r.op("send");
    assert_eq!((send.ok, send.warmup), (20, 5), "{send:?}");
    assert_eq!(r.op("initial_sync").ok, 6);
    assert_deliveries_complete(&r);
    assert!(r.op("sync").ok > 0);
    let names: Vec<&str> = r.phases.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        ["register", "rooms", "initial_sync", "load", "drain"]
    );
    assert!(!r.series.is_empty());
    assert!(r.server.peak_rss_kib.is_some_and(|k| k > 0));
}

/// A send-and-sync run with one plan setting changed: every message is
/// sent once and delivered to every receiver.
fn sends_and_deliveries_complete_with(change: impl FnOnce(&mut Plan)) {
    let mut p = plan(&[
        Scenario::Register,
        Scenario::Rooms,
        Scenario::Send,
        Scenario::Sync,
    ]);
    change(&mut p);
    let r = run(&p);
    assert_no_errors(&r);
    assert_eq!(r.op("send").ok, 20);
    assert_deliveries_complete(&r);
    assert!(r.op("sync").ok > 0);
}

#[test]
fn unpipelined_sync_loops_measure_every_delivery_too() {
    sends_and_deliveries_complete_with(|p| p.sync.pipelined = false);
}

#[test]
fn precise_arrivals_send_every_scheduled_message() {
    sends_and_deliveries_complete_with(|p| p.load.precise_arrivals = true);
}

#[test]
fn cli_sync_pipelined_flag_sets_the_plan_key() {
    let plan_of = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tessera-loadtest"))
            .args(["run", "--print-plan"])
            .args(args)
            .output()
            .expect("run the binary");
        assert!(out.status.success(), "{out:?}");
        let printed = String::from_utf8_lossy(&out.stdout).into_owned();
        toml::from_str::<Plan>(&printed).expect("the printed plan parses")
    };
    assert!(plan_of(&[]).sync.pipelined, "on by default");
    assert!(!plan_of(&["--sync-pipelined", "false"]).sync.pipelined);
    assert!(plan_of(&["--sync-pipelined", "true"]).sync.pipelined);
    assert!(!plan_of(&[]).load.precise_arrivals, "off by default");
    assert!(plan_of(&["--precise-arrivals", "true"]).load.precise_arrivals);
}

#[test]
fn send_without_sync_expects_no_deliveries() {
    let mut p = plan(&[Scenario::Register, Scenario::Rooms, Scenario::Send]);
    p.send.steps = vec![
        RateStep {
            rate_per_s: 5.0,
            duration: Duration::from_secs(1),
        },
        RateStep {
            rate_per_s: 10.0,
            duration: Duration::from_secs(1),
        },
    ];
    let r = run(&p);
    assert_no_errors(&r);
    // Warm-up 0.5 s at 5/s (3 arrivals: 0, 0.2, 0.4 s), then 5 + 10.
    let send = r.op("send");
    assert_eq!((send.ok, send.warmup), (15, 3), "{send:?}");
    assert_eq!(r.delivery.expected, 0);
    assert!(!r.ops.contains_key("initial_sync"));
}

#[test]
fn sync_alone_long_polls_without_errors() {
    let mut p = plan(&[Scenario::Register, Scenario::Rooms, Scenario::Sync]);
    p.sync.timeout_ms = 500;
    let r = run(&p);
    assert_no_errors(&r);
    assert_eq!(r.op("initial_sync").ok, 6);
    assert_eq!(r.delivery.expected, 0);
}

#[test]
fn mixed_scenario_issues_every_action() {
    let mut p = plan(&[Scenario::Register, Scenario::Rooms, Scenario::Mixed]);
    p.mixed.rate_per_s = 40.0;
    let r = run(&p);
    assert_no_errors(&r);
    // 40/s over 2.5 s: 100 actions, 20 of them warm-up.
    let actions = ["send", "typing", "receipt", "profile", "messages"];
    let measured: u64 = actions.iter().map(|a| r.op(a).ok).sum();
    let warmup: u64 = actions.iter().map(|a| r.op(a).warmup).sum();
    assert_eq!((measured, warmup), (80, 20), "{:?}", r.ops);
    for a in actions {
        assert!(
            r.op(a).ok + r.op(a).warmup > 0,
            "{a} never ran: {:?}",
            r.ops
        );
    }
    assert_deliveries_complete(&r);
}

#[test]
fn closed_loop_send_keeps_concurrency_busy() {
    let mut p = plan(&[
        Scenario::Register,
        Scenario::Rooms,
        Scenario::Send,
        Scenario::Sync,
    ]);
    p.load.mode = Mode::Closed;
    p.load.concurrency = 2;
    p.load.duration_s = 1.5;
    let r = run(&p);
    assert_no_errors(&r);
    assert!(r.op("send").ok > 0);
    assert_eq!(
        r.generator.requests_issued,
        r.op("send").ok + r.op("send").warmup
    );
    assert_deliveries_complete(&r);
}

#[test]
fn max_requests_bounds_the_load_phase() {
    let mut p = plan(&[Scenario::Register, Scenario::Rooms, Scenario::Send]);
    p.send.rate_per_s = 20.0;
    p.limits.max_requests = 7;
    let r = run(&p);
    assert_no_errors(&r);
    let send = r.op("send");
    assert_eq!(send.ok + send.warmup, 7, "{send:?}");
    assert_eq!(r.generator.requests_issued, 7);
}

#[test]
fn two_threads_split_the_run_and_count_like_one() {
    let mut p = plan(&[
        Scenario::Register,
        Scenario::Rooms,
        Scenario::Send,
        Scenario::Sync,
    ]);
    p.threads = 2;
    // Open-loop registration too: each thread takes its users' arrivals.
    p.users.register_rate_per_s = 20.0;
    let r = run(&p);
    assert_no_errors(&r);
    assert_eq!(r.generator.threads, 2);
    assert_eq!(
        (r.users.requested, r.users.registered, r.users.failed),
        (6, 6, 0)
    );
    assert_eq!((r.op("register").ok, r.op("login").ok), (6, 6));
    // Both threads' rooms and joins: the same as one thread's.
    assert_eq!((r.rooms.created, r.rooms.joins), (3, 9));
    assert_eq!((r.op("create_room").ok, r.op("join").ok), (3, 9));
    // Each thread sends every other arrival of one 10/s schedule: together
    // 5 warm-up and 20 measured sends, as one thread would.
    let send = r.op("send");
    assert_eq!((send.ok, send.warmup), (20, 5), "{send:?}");
    assert_eq!(r.generator.requests_issued, 25);
    assert_eq!(r.generator.dropped_arrivals, 0);
    assert_eq!(r.op("initial_sync").ok, 6);
    // Every user's sync loop runs on one thread and every message is
    // tracked by its sender's: deliveries cross threads and all arrive.
    assert_deliveries_complete(&r);
    // Every message reaches the other syncing members of its room.
    assert!(r.delivery.expected >= 20, "{:?}", r.delivery);
    let g = &r.generator;
    assert!(
        g.load_phase_busiest_thread_cpu_percent.is_some()
            && g.load_phase_cpu_percent_per_thread.is_some(),
        "{g:?}"
    );
    assert!(r.summary_text().contains("2 threads"));
    assert!(!r.series.is_empty());
}

#[test]
fn closed_loop_mixed_on_three_threads_keeps_the_request_budget() {
    let mut p = plan(&[Scenario::Register, Scenario::Rooms, Scenario::Mixed]);
    p.threads = 3;
    p.load.mode = Mode::Closed;
    // Fewer workers than threads: one thread only syncs.
    p.load.concurrency = 2;
    p.limits.max_requests = 30;
    p.load.warmup_s = 0.0;
    let r = run(&p);
    assert_no_errors(&r);
    let actions = ["send", "typing", "receipt", "profile", "messages"];
    let done: u64 = actions.iter().map(|a| r.op(a).ok + r.op(a).warmup).sum();
    assert_eq!(done, 30, "{:?}", r.ops);
    assert_eq!(r.generator.requests_issued, 30);
    assert_eq!(r.op("initial_sync").ok, 6);
    assert!(r.op("send").ok > 0, "{:?}", r.ops);
    assert_deliveries_complete(&r);
}

#[test]
fn cli_writes_report_summary_and_plot() {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("loadtest-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let output = Command::new(env!("CARGO_BIN_EXE_tessera-loadtest"))
        .args([
            "run",
            "--quiet",
            "-t",
            &server().url,
            "-s",
            "register,rooms,send,sync",
        ])
        .args([
            "--users",
            "4",
            "--rooms",
            "2",
            "--room-size",
            "2",
            "--rate",
            "5",
            "--duration",
            "1",
            "--warmup",
            "0",
        ])
        .args(["--drain", "30", "--sync-timeout-ms", "5000", "-o"])
        .arg(&out)
        .output()
        .expect("run the binary");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("operation") && stdout.contains("delivery: expected"),
        "{stdout}"
    );
    let report =
        Report::from_json(&std::fs::read_to_string(out.join("report.json")).expect("report.json"))
            .expect("report parses");
    assert_eq!(report.op("send").ok, 5);
    assert_deliveries_complete(&report);
    let svg = std::fs::read_to_string(out.join("plot.svg")).expect("plot.svg");
    assert!(svg.contains("<polyline"));
    assert!(out.join("summary.txt").exists());
}

#[test]
fn cli_threads_flag_and_plan_key_set_the_threads() {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("loadtest-cli-threads-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).expect("create out dir");
    // The plan file asks for 4 threads; the flag overrides it.
    let plan_file = out.join("plan.toml");
    std::fs::write(&plan_file, "threads = 4\n").expect("write plan");
    let printed = Command::new(env!("CARGO_BIN_EXE_tessera-loadtest"))
        .args(["run", "--print-plan", "-c"])
        .arg(&plan_file)
        .output()
        .expect("run the binary");
    assert!(
        String::from_utf8_lossy(&printed.stdout).contains("threads = 4"),
        "{printed:?}"
    );
    let output = Command::new(env!("CARGO_BIN_EXE_tessera-loadtest"))
        .args(["run", "--quiet", "-c"])
        .arg(&plan_file)
        .args(["-t", &server().url, "-s", "register,rooms,send,sync"])
        .args(["--threads", "2", "--users", "4", "--rooms", "2"])
        .args(["--room-size", "2", "--rate", "6", "--duration", "1"])
        .args([
            "--warmup",
            "0",
            "--drain",
            "30",
            "--sync-timeout-ms",
            "5000",
        ])
        .arg("-o")
        .arg(&out)
        .output()
        .expect("run the binary");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("generator: 2 threads"), "{stdout}");
    let report =
        Report::from_json(&std::fs::read_to_string(out.join("report.json")).expect("report.json"))
            .expect("report parses");
    assert_eq!((report.plan.threads, report.generator.threads), (2, 2));
    assert_eq!(report.op("send").ok, 6);
    assert_no_errors(&report);
    assert_deliveries_complete(&report);
}

#[test]
fn cli_refuses_a_remote_target_without_sending() {
    // A documentation address: refused before any connection is tried.
    let output = Command::new(env!("CARGO_BIN_EXE_tessera-loadtest"))
        .args([
            "run",
            "--quiet",
            "-t",
            "http://192.0.2.10:8008",
            "--users",
            "1",
        ])
        .output()
        .expect("run the binary");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("not loopback") && stderr.contains("--allow-remote"),
        "{stderr}"
    );
}
