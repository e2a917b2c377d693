//! The run report: a JSON document (machine-readable, the source of every
//! published number), a human summary, and the side-by-side comparison of
//! two reports that `bench/compare-synapse` prints.
//!
//! A report always carries what is needed to reproduce and judge it: the
//! full plan, the machine, the server's versions, and the generator's own
//! CPU use, so a saturated generator is visible next to the numbers.

use crate::config::Plan;
use crate::delivery::DeliveryCounts;
use crate::hist::LatencySummary;
use crate::metrics::{IntervalPoint, Op, OpTotals, PhaseMark, Recorder};
use crate::sys::Machine;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// What the server said about itself, and its memory when its pid was given.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// `versions` from `/_matrix/client/versions`.
    pub versions: Vec<String>,
    /// The HTTP `Server` header.
    pub server_header: Option<String>,
    /// Pid whose memory was sampled.
    pub pid: Option<u32>,
    /// Highest resident memory of the server's process tree, sampled once a second.
    pub peak_rss_kib: Option<u64>,
    /// Kernel-reported peak resident memory (VmHWM) of the main process.
    pub peak_rss_main_kib: Option<u64>,
}

/// The generator's own behaviour.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GeneratorStats {
    /// Threads generating load, each with its own event loop, connections
    /// and share of the users (`threads` in the plan).
    pub threads: u32,
    /// Whole run, wall clock.
    pub wall_s: f64,
    /// User CPU time of all threads.
    pub cpu_user_s: f64,
    /// System CPU time of all threads.
    pub cpu_system_s: f64,
    /// Whole-run CPU use of the whole process (all threads), percent of one
    /// core: up to `100 * threads`.
    pub cpu_percent_of_one_core: f64,
    /// CPU use during the load phase, all threads, percent of one core.
    pub load_phase_cpu_percent_of_one_core: Option<f64>,
    /// Whole-run CPU use per thread: percent of `threads` cores (100: every
    /// thread busy all the time).
    #[serde(default)]
    pub cpu_percent_per_thread: f64,
    /// Load-phase CPU use per thread, percent of `threads` cores.
    #[serde(default)]
    pub load_phase_cpu_percent_per_thread: Option<f64>,
    /// Load-phase CPU use of the busiest thread, percent of one core: one
    /// saturated thread shows here even when the mean is low.
    #[serde(default)]
    pub load_phase_busiest_thread_cpu_percent: Option<f64>,
    /// True when the threads used over 90% of their cores (on average, or
    /// the busiest one): the numbers then describe the generator, not the
    /// server.
    pub saturated: bool,
    /// How late open-loop arrivals were dispatched.
    pub dispatch_lag: LatencySummary,
    /// Open-loop arrivals dropped because `max_in_flight` was reached.
    pub dropped_arrivals: u64,
    /// Requests issued in the load phase.
    pub requests_issued: u64,
    /// TCP connections opened.
    pub connections_opened: u64,
    /// The run was cut short (Ctrl-C or `max_run_s`).
    pub stopped_early: bool,
}

/// Users of the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UserStats {
    /// Users asked for.
    pub requested: u32,
    /// Newly registered.
    pub registered: u32,
    /// Already existed and were logged in (`users.reuse`).
    pub existing: u32,
    /// Could not be registered or logged in.
    pub failed: u32,
}

impl UserStats {
    /// Adds another thread's counts (each thread handles its own users).
    pub fn merge(&mut self, other: &UserStats) {
        self.requested += other.requested;
        self.registered += other.registered;
        self.existing += other.existing;
        self.failed += other.failed;
    }
}

/// Rooms of the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoomStats {
    /// Rooms created.
    pub created: u32,
    /// Room creations that failed.
    pub failed_creates: u32,
    /// Successful joins.
    pub joins: u64,
    /// Failed joins.
    pub failed_joins: u64,
}

impl RoomStats {
    /// Adds another thread's counts (each thread creates and joins its own
    /// share).
    pub fn merge(&mut self, other: &RoomStats) {
        self.created += other.created;
        self.failed_creates += other.failed_creates;
        self.joins += other.joins;
        self.failed_joins += other.failed_joins;
    }
}

/// One row of the error table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorRow {
    /// Operation.
    pub op: String,
    /// HTTP status, when there was a response.
    pub status: Option<u16>,
    /// Matrix errcode or transport label.
    pub code: String,
    /// Occurrences.
    pub count: u64,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// `tessera-loadtest`.
    pub tool: String,
    /// Version of the tool.
    pub tool_version: String,
    /// Start of the run, Unix seconds.
    pub started_unix_s: u64,
    /// Target URL.
    pub target: String,
    /// The server.
    pub server: ServerInfo,
    /// The machine the generator ran on.
    pub machine: Machine,
    /// The plan, as run.
    pub plan: Plan,
    /// The generator's own behaviour.
    pub generator: GeneratorStats,
    /// Users.
    pub users: UserStats,
    /// Rooms.
    pub rooms: RoomStats,
    /// Phases with their times.
    pub phases: Vec<PhaseMark>,
    /// Per-operation totals (operations that happened).
    pub ops: BTreeMap<String, OpTotals>,
    /// Send→delivery counts.
    pub delivery: DeliveryCounts,
    /// Errors by operation, status and errcode (429s included).
    pub errors: Vec<ErrorRow>,
    /// Once-a-second time series.
    pub series: Vec<IntervalPoint>,
}

impl Report {
    /// Assembles the report of a finished run.
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        plan: &Plan,
        started_unix_s: u64,
        server: ServerInfo,
        machine: Machine,
        generator: GeneratorStats,
        users: UserStats,
        rooms: RoomStats,
        delivery: DeliveryCounts,
        rec: &Recorder,
    ) -> Self {
        let mut ops = BTreeMap::new();
        for op in Op::ALL {
            let t = rec.totals(op);
            if t.ok + t.errors + t.rate_limited + t.warmup > 0 {
                ops.insert(op.name().to_owned(), t);
            }
        }
        let errors = rec
            .errors()
            .iter()
            .map(|(k, n)| ErrorRow {
                op: k.op.clone(),
                status: k.status,
                code: k.code.clone(),
                count: *n,
            })
            .collect();
        Self {
            tool: "tessera-loadtest".into(),
            tool_version: env!("CARGO_PKG_VERSION").into(),
            started_unix_s,
            target: plan.target.clone(),
            server,
            machine,
            plan: plan.clone(),
            generator,
            users,
            rooms,
            phases: rec.phases().to_vec(),
            ops,
            delivery,
            errors,
            series: rec.series().to_vec(),
        }
    }

    /// Totals of an operation, zero when it did not run.
    pub fn op(&self, name: &str) -> OpTotals {
        self.ops.get(name).cloned().unwrap_or_default()
    }

    /// Errors of every kind, 429s excluded.
    pub fn total_errors(&self) -> u64 {
        self.ops.values().map(|o| o.errors).sum()
    }

    /// Pretty JSON.
    pub fn to_json(&self) -> String {
        // A report holds only strings, numbers and maps with string keys,
        // which always serialise.
        match serde_json::to_string_pretty(self) {
            Ok(s) => s,
            Err(e) => unreachable!("report failed to serialise: {e}"),
        }
    }

    /// Reads a JSON report.
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The human summary.
    pub fn summary_text(&self) -> String {
        let mut s = String::new();
        let server = self
            .server
            .server_header
            .as_deref()
            .unwrap_or("unknown server");
        let _ = writeln!(
            s,
            "tessera-loadtest {} against {} ({server})",
            self.tool_version, self.target
        );
        let _ = writeln!(
            s,
            "machine: {} cores, {:.1} GiB RAM, {}; kernel {}",
            self.machine.cores,
            self.machine.mem_total_kib as f64 / 1048576.0,
            self.machine.cpu_model,
            self.machine.kernel
        );
        let names: Vec<String> = self
            .plan
            .scenarios
            .iter()
            .map(|s| format!("{s:?}").to_lowercase())
            .collect();
        let _ = writeln!(
            s,
            "scenarios: {}; users {} (registered {}, existing {}, failed {}); rooms created {}, joins {}",
            names.join(","),
            self.users.requested,
            self.users.registered,
            self.users.existing,
            self.users.failed,
            self.rooms.created,
            self.rooms.joins
        );
        let phases: Vec<String> = self
            .phases
            .iter()
            .map(|p| format!("{} {:.1}s", p.name, p.end_s - p.start_s))
            .collect();
        let _ = writeln!(s, "phases: {}", phases.join(", "));
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:<13} {:>8} {:>9} {:>6} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "operation",
            "ok",
            "ok/s",
            "errors",
            "429",
            "p50",
            "p90",
            "p99",
            "p99.9",
            "max",
            "warmup"
        );
        for op in Op::ALL {
            let Some(t) = self.ops.get(op.name()) else {
                continue;
            };
            let l = &t.latency;
            let _ = writeln!(
                s,
                "{:<13} {:>8} {:>9.1} {:>6} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
                op.name(),
                t.ok,
                t.throughput_per_s,
                t.errors,
                t.rate_limited,
                fmt_us(l.p50_us),
                fmt_us(l.p90_us),
                fmt_us(l.p99_us),
                fmt_us(l.p999_us),
                fmt_us(l.max_us),
                t.warmup
            );
        }
        let d = &self.delivery;
        if d.expected + d.received + d.unexpected > 0 {
            let _ = writeln!(s);
            let _ = writeln!(
                s,
                "delivery: expected {} received {} missing {} unexpected {} (warm-up {})",
                d.expected, d.received, d.missing, d.unexpected, d.warmup
            );
            if d.limited_timelines > 0 {
                let _ = writeln!(
                    s,
                    "  sync timelines limited by the server (events skipped): {}",
                    d.limited_timelines
                );
            }
        }
        if !self.errors.is_empty() {
            let _ = writeln!(s);
            let _ = writeln!(s, "errors:");
            for e in &self.errors {
                let status = e.status.map_or("-".to_owned(), |c| c.to_string());
                let _ = writeln!(s, "  {:<13} {:>4} {:<24} {}", e.op, status, e.code, e.count);
            }
        }
        let g = &self.generator;
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "generator: {}; dispatch lag p99 {} max {}; dropped {}; connections {}",
            g.cpu_text(),
            fmt_us(g.dispatch_lag.p99_us),
            fmt_us(g.dispatch_lag.max_us),
            g.dropped_arrivals,
            g.connections_opened
        );
        if g.saturated && g.threads > 1 {
            let _ = writeln!(
                s,
                "WARNING: the generator saturated its cores (over 90% per thread, or in its busiest thread); these numbers understate the server."
            );
        } else if g.saturated {
            let _ = writeln!(
                s,
                "WARNING: the generator saturated its core; these numbers understate the server."
            );
        }
        if g.threads as usize > self.machine.cores && self.machine.cores > 0 {
            let _ = writeln!(
                s,
                "WARNING: {} generator threads on {} core{}: threads compete for cores.",
                g.threads,
                self.machine.cores,
                if self.machine.cores == 1 { "" } else { "s" }
            );
        }
        if g.stopped_early {
            let _ = writeln!(
                s,
                "WARNING: the run was stopped early (Ctrl-C or limits.max_run_s)."
            );
        }
        if let Some(rss) = self.server.peak_rss_kib {
            let _ = writeln!(
                s,
                "server peak RSS: {:.1} MiB (process tree, sampled 1/s)",
                rss as f64 / 1024.0
            );
        }
        s
    }
}

impl GeneratorStats {
    /// The CPU part of the summary: all threads together as percent of one
    /// core and, with several threads, per thread (percent of `threads`
    /// cores) and the busiest thread, so a saturated generator is visible
    /// whatever its thread count.
    pub fn cpu_text(&self) -> String {
        let mut s = format!(
            "{} thread{}, CPU {:.1}s user + {:.1}s sys over {:.1}s = {:.0}% of one core",
            self.threads,
            if self.threads == 1 { "" } else { "s" },
            self.cpu_user_s,
            self.cpu_system_s,
            self.wall_s,
            self.cpu_percent_of_one_core
        );
        let many = self.threads > 1;
        if many {
            let _ = write!(
                s,
                " ({:.0}% of {} cores)",
                self.cpu_percent_per_thread, self.threads
            );
        }
        if let Some(c) = self.load_phase_cpu_percent_of_one_core {
            let _ = write!(s, ", load phase {c:.0}%");
            if let (true, Some(per), Some(max)) = (
                many,
                self.load_phase_cpu_percent_per_thread,
                self.load_phase_busiest_thread_cpu_percent,
            ) {
                let _ = write!(
                    s,
                    " ({per:.0}% of {} cores, busiest thread {max:.0}%)",
                    self.threads
                );
            }
        }
        s
    }
}

/// Microseconds for humans: `850us`, `12.3ms`, `4.20s`.
pub fn fmt_us(us: u64) -> String {
    if us < 1_000 {
        format!("{us}us")
    } else if us < 1_000_000 {
        format!("{:.1}ms", us as f64 / 1_000.0)
    } else {
        format!("{:.2}s", us as f64 / 1_000_000.0)
    }
}

/// One row of a comparison.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompareRow {
    /// What is compared.
    pub metric: String,
    /// Baseline value.
    pub baseline: Option<f64>,
    /// Candidate value.
    pub candidate: Option<f64>,
    /// How many times better the candidate is (>1: better), when both exist.
    pub advantage: Option<f64>,
    /// Unit of the values.
    pub unit: &'static str,
}

/// Compares the key metrics of two reports. For throughputs the advantage
/// is candidate/baseline; for latencies, times and memory it is
/// baseline/candidate, so above 1 always means the candidate is better.
pub fn compare(baseline: &Report, candidate: &Report) -> Vec<CompareRow> {
    type Metric = (&'static str, &'static str, bool, fn(&Report) -> Option<f64>);
    fn pos(v: f64) -> Option<f64> {
        (v > 0.0).then_some(v)
    }
    let metrics: [Metric; 8] = [
        ("send throughput", "msg/s", true, |r| {
            pos(r.op("send").throughput_per_s)
        }),
        ("send p99", "ms", false, |r| {
            pos(r.op("send").latency.p99_us as f64 / 1000.0)
        }),
        ("send→delivery p50", "ms", false, |r| {
            pos(r.op("delivery").latency.p50_us as f64 / 1000.0)
        }),
        ("send→delivery p99", "ms", false, |r| {
            pos(r.op("delivery").latency.p99_us as f64 / 1000.0)
        }),
        ("initial sync p50", "ms", false, |r| {
            pos(r.op("initial_sync").latency.p50_us as f64 / 1000.0)
        }),
        ("registration rate", "users/s", true, |r| {
            pos(r.op("register").throughput_per_s)
        }),
        ("login rate", "logins/s", true, |r| {
            pos(r.op("login").throughput_per_s)
        }),
        ("peak RSS", "MiB", false, |r| {
            r.server.peak_rss_kib.map(|k| k as f64 / 1024.0)
        }),
    ];
    metrics
        .iter()
        .map(|(name, unit, higher_is_better, get)| {
            let (b, c) = (get(baseline), get(candidate));
            let advantage = match (b, c) {
                (Some(b), Some(c)) if *higher_is_better => Some(c / b),
                (Some(b), Some(c)) => Some(b / c),
                _ => None,
            };
            CompareRow {
                metric: (*name).into(),
                baseline: b,
                candidate: c,
                advantage,
                unit,
            }
        })
        .collect()
}

/// The comparison as a text table.
pub fn compare_text(baseline_name: &str, candidate_name: &str, rows: &[CompareRow]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<20} {:>14} {:>14} {:>10}  unit",
        "metric", baseline_name, candidate_name, "advantage"
    );
    let fmt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    for r in rows {
        let adv = r.advantage.map_or("-".to_owned(), |a| format!("{a:.2}x"));
        let _ = writeln!(
            s,
            "{:<20} {:>14} {:>14} {:>10}  {}",
            r.metric,
            fmt(r.baseline),
            fmt(r.candidate),
            adv,
            r.unit
        );
    }
    let _ = writeln!(
        s,
        "(advantage > 1: {candidate_name} is better; latencies, times and memory compare inversely)"
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::CallError;
    use std::time::{Duration, Instant};

    fn sample_report() -> Report {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut rec = Recorder::new(t0);
        rec.phase("load", t0);
        for i in 0..100 {
            rec.ok(Op::Send, ms(i * 10), ms(i * 10 + 5));
            rec.ok(Op::Delivery, ms(i * 10), ms(i * 10 + 20));
        }
        rec.err(
            Op::Send,
            ms(5),
            &CallError::Status {
                status: 429,
                errcode: Some("M_LIMIT_EXCEEDED".into()),
            },
        );
        rec.err(
            Op::Send,
            ms(6),
            &CallError::Status {
                status: 500,
                errcode: Some("M_UNKNOWN".into()),
            },
        );
        rec.tick(ms(1000), 5.0, Some(2048));
        rec.end_phase(ms(1000));
        let delivery = DeliveryCounts {
            expected: 100,
            received: 100,
            ..Default::default()
        };
        let server = ServerInfo {
            peak_rss_kib: Some(2048),
            ..Default::default()
        };
        Report::build(
            &Plan::default(),
            1,
            server,
            Machine::default(),
            GeneratorStats::default(),
            UserStats::default(),
            RoomStats::default(),
            delivery,
            &rec,
        )
    }

    #[test]
    fn report_holds_counts_and_round_trips_as_json() {
        let r = sample_report();
        let send = r.op("send");
        assert_eq!((send.ok, send.errors, send.rate_limited), (100, 1, 1));
        assert_eq!(send.throughput_per_s, 100.503, "{send:?}");
        assert_eq!(r.op("delivery").latency.count, 100);
        assert!(
            !r.ops.contains_key("register"),
            "ops that did not run are left out"
        );
        assert_eq!(r.total_errors(), 1);
        assert_eq!(r.errors.len(), 2);
        let back = Report::from_json(&r.to_json()).expect("report parses back");
        assert_eq!(back, r);
        let text = r.summary_text();
        assert!(text.contains("send"), "{text}");
        assert!(text.contains("M_LIMIT_EXCEEDED"), "{text}");
        assert!(
            text.contains("delivery: expected 100 received 100 missing 0"),
            "{text}"
        );
    }

    #[test]
    fn comparison_ratios_point_the_right_way() {
        let base = sample_report();
        let mut cand = sample_report();
        // Candidate: twice the throughput, half the delivery latency, same memory.
        cand.ops.get_mut("send").expect("send").throughput_per_s *= 2.0;
        let d = cand.ops.get_mut("delivery").expect("delivery");
        d.latency.p50_us /= 2;
        d.latency.p99_us /= 2;
        let rows = compare(&base, &cand);
        let get = |name: &str| rows.iter().find(|r| r.metric == name).expect("row").clone();
        assert!((get("send throughput").advantage.expect("both") - 2.0).abs() < 1e-9);
        assert!((get("send→delivery p50").advantage.expect("both") - 2.0).abs() < 0.01);
        assert!((get("peak RSS").advantage.expect("both") - 1.0).abs() < 1e-9);
        assert_eq!(
            get("registration rate").advantage,
            None,
            "missing on both sides"
        );
        let text = compare_text("synapse", "tessera", &rows);
        assert!(text.contains("2.00x"), "{text}");
    }

    #[test]
    fn generator_cpu_is_shown_per_thread_when_there_are_several() {
        let mut g = GeneratorStats {
            threads: 1,
            wall_s: 10.0,
            cpu_user_s: 5.0,
            cpu_system_s: 1.0,
            cpu_percent_of_one_core: 60.0,
            load_phase_cpu_percent_of_one_core: Some(95.0),
            cpu_percent_per_thread: 60.0,
            load_phase_cpu_percent_per_thread: Some(95.0),
            load_phase_busiest_thread_cpu_percent: Some(95.0),
            saturated: true,
            ..GeneratorStats::default()
        };
        // One thread: the summary line of single-threaded runs.
        assert_eq!(
            g.cpu_text(),
            "1 thread, CPU 5.0s user + 1.0s sys over 10.0s = 60% of one core, load phase 95%"
        );
        let mut r = sample_report();
        r.generator = g.clone();
        r.machine.cores = 2;
        assert!(r.summary_text().contains("saturated its core;"));
        g.threads = 8;
        g.cpu_percent_of_one_core = 480.0;
        g.cpu_percent_per_thread = 60.0;
        g.load_phase_cpu_percent_of_one_core = Some(640.0);
        g.load_phase_cpu_percent_per_thread = Some(80.0);
        assert_eq!(
            g.cpu_text(),
            "8 threads, CPU 5.0s user + 1.0s sys over 10.0s = 480% of one core (60% of 8 cores), load phase 640% (80% of 8 cores, busiest thread 95%)"
        );
        r.generator = g;
        let text = r.summary_text();
        assert!(text.contains("saturated its cores"), "{text}");
        assert!(text.contains("8 generator threads on 2 cores"), "{text}");
        // Reports written before these fields existed still parse.
        let mut json: serde_json::Value = serde_json::from_str(&r.to_json()).expect("json");
        let gen_obj = json["generator"].as_object_mut().expect("object");
        gen_obj.remove("cpu_percent_per_thread");
        gen_obj.remove("load_phase_cpu_percent_per_thread");
        gen_obj.remove("load_phase_busiest_thread_cpu_percent");
        let old = Report::from_json(&json.to_string()).expect("old report parses");
        assert_eq!(old.generator.cpu_percent_per_thread, 0.0);
    }

    #[test]
    fn durations_format_for_humans() {
        assert_eq!(fmt_us(850), "850us");
        assert_eq!(fmt_us(12_345), "12.3ms");
        assert_eq!(fmt_us(4_200_000), "4.20s");
    }
}
