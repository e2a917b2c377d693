//! End-to-end run of the `turn` scenario against a real TURN server started
//! by the test, asserting the report's counts.
//!
//! `TURN_KIND` chooses the server:
//! - `coturn` (default): `turnserver` from Debian's coturn package.
//! - `tessera`: `TESSERA_RELAY_BIN`, default `<repo>/target/debug/tessera-relay`.
//!
//! Either way the server uses a TURN REST shared secret and allows loopback
//! peers (the scenario's echo peer is on 127.0.0.1).

use std::net::{SocketAddr, UdpSocket};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tessera_loadtest::config::{Plan, Scenario};
use tessera_loadtest::run::{RunOptions, run_blocking};
use tessera_loadtest::stun;

const SECRET: &str = "loadtest-e2e-secret";

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_udp_port() -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.local_addr().expect("addr").port()
}

/// Whether the server answers a STUN Binding request.
fn answers_stun(addr: SocketAddr) -> bool {
    let Ok(s) = UdpSocket::bind("127.0.0.1:0") else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let req = stun::Request::new(0x0001, [3; 12]).finish();
    if s.send_to(&req, addr).is_err() {
        return false;
    }
    let mut buf = [0u8; 512];
    matches!(s.recv_from(&mut buf), Ok((n, _)) if stun::parse(&buf[..n]).is_ok())
}

fn start_turn(dir: &Path) -> (Killed, SocketAddr) {
    let kind = std::env::var("TURN_KIND").unwrap_or_else(|_| "coturn".into());
    let port = free_udp_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let log = std::fs::File::create(dir.join("turn.log")).expect("log");
    let mut cmd = match kind.as_str() {
        "coturn" => {
            let mut cmd = Command::new(
                std::env::var("TURNSERVER_BIN").unwrap_or_else(|_| "turnserver".into()),
            );
            cmd.args([
                "-n",
                "--no-cli",
                "--no-tls",
                "--no-dtls",
                "--no-tcp",
                "--listening-ip=127.0.0.1",
                "--relay-ip=127.0.0.1",
            ])
            .arg(format!("--listening-port={port}"))
            .args([
                "--use-auth-secret",
                &format!("--static-auth-secret={SECRET}"),
                "--realm=loadtest",
            ])
            .args([
                "--allow-loopback-peers",
                "--min-port=52000",
                "--max-port=54000",
                "--log-file=stdout",
            ]);
            cmd
        }
        "tessera" => {
            let bin = std::env::var("TESSERA_RELAY_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|_| {
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/tessera-relay")
                });
            let config = dir.join("relay.toml");
            std::fs::write(
                &config,
                format!(
                    "realm = \"loadtest\"\nlisten = [\"{addr}\"]\nrelay_ipv4 = \"127.0.0.1\"\nmin_port = 52000\n\
                     max_port = 54000\nthreads = 1\nrest_secrets = [\"{SECRET}\"]\n\
                     allowed_peer_ranges = [\"127.0.0.0/8\"]\nmax_allocations_per_user = 100000\n"
                ),
            )
            .expect("write relay config");
            let mut cmd = Command::new(bin);
            cmd.arg("--config").arg(config);
            cmd
        }
        other => panic!("TURN_KIND={other:?}: expected coturn or tessera"),
    };
    cmd.stdout(log.try_clone().expect("log"))
        .stderr(log)
        .stdin(Stdio::null());
    // SAFETY: prctl is async-signal-safe and touches no parent memory.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start the {kind} TURN server: {e}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !answers_stun(addr) {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(dir.join("turn.log")).unwrap_or_default();
            panic!("{kind} exited with {status}:\n{log}");
        }
        assert!(
            Instant::now() < deadline,
            "{kind} does not answer STUN after 30 s"
        );
    }
    (Killed(child), addr)
}

#[test]
fn turn_scenario_counts_allocations_and_relayed_packets() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("loadtest-turn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let (_server, addr) = start_turn(&dir);
    let mut p = Plan {
        scenarios: vec![Scenario::Turn],
        ..Plan::default()
    };
    p.turn.server = addr.to_string();
    p.turn.secret = Some(SECRET.into());
    p.turn.allocate_rate_per_s = 10.0;
    p.turn.relay_allocations = 3;
    p.turn.packet_rate_per_s = 200.0;
    p.load.warmup_s = 0.5;
    p.load.duration_s = 2.0;
    let r = run_blocking(&p, &RunOptions::default()).expect("turn run");
    eprintln!("{}", r.summary_text());
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    // 10/s over 2.5 s: 25 allocations, 5 in the warm-up.
    let alloc = r.op("turn_allocate");
    assert_eq!((alloc.ok, alloc.warmup), (20, 5), "{alloc:?}");
    // 200/s over 2.5 s: 500 packets, 400 measured, every one back.
    let relay = r.op("turn_relay");
    assert_eq!((relay.ok, relay.errors), (400, 0), "{relay:?}");
    assert!(relay.latency.p50_us > 0);
    assert!(
        r.users.requested == 0 && !r.ops.contains_key("register"),
        "turn alone needs no homeserver"
    );

    // Bursts of 4 back to back on one allocation (what the relay may send
    // on as one GSO message each way): the same packet count, every one
    // back, at a quarter of the arrivals.
    p.turn.allocate_rate_per_s = 0.0;
    p.turn.packet_burst = 4;
    let r = run_blocking(&p, &RunOptions::default()).expect("turn run with bursts");
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let relay = r.op("turn_relay");
    assert_eq!((relay.ok, relay.errors), (400, 0), "{relay:?}");

    // The same bursts, each sent as one GSO message and echoed coalesced by
    // the peer: every packet still comes back one by one.
    p.turn.packet_gso = true;
    let r = run_blocking(&p, &RunOptions::default()).expect("turn run with GSO bursts");
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let relay = r.op("turn_relay");
    assert_eq!((relay.ok, relay.errors), (400, 0), "{relay:?}");
}
