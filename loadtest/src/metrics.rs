//! The recorder: per-operation latency histograms, error counts by status
//! and errcode, rate-limit counts, and a once-a-second time series.
//!
//! Invariants:
//! - Latency is measured from the *intended* start of an operation (its
//!   scheduled arrival in open-loop mode), so a generator or server that
//!   falls behind shows up as latency instead of silently sending less.
//! - Operations intended before the end of the warm-up are counted apart
//!   (`warmup`) and never reach the totals (histograms, throughput); the
//!   time series shows them, so the warm-up is visible on plots.
//! - HTTP 429 responses are counted as `rate_limited`, never as latency and
//!   never as errors: rate limits are the server's policy, not a failure.
//!
//! Each generator thread has its own recorder. Once a second the thread that
//! keeps the time series takes every other thread's interval
//! ([`Recorder::take_interval`], histograms and all) and adds it to its own
//! before closing the interval; at the end it adds their totals
//! ([`Recorder::merge`]). Histograms are merged, never their percentiles, so
//! the combined numbers are those of one recorder that saw everything.

use crate::hist::{LatencyHist, LatencySummary};
use crate::matrix::CallError;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Rounds to three decimals: reports stay readable and their floats parse
/// back exactly.
pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// The operations the generator measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// Account registration (all user-interactive auth rounds).
    Register,
    /// Password login.
    Login,
    /// Room creation.
    CreateRoom,
    /// Room join.
    Join,
    /// First `/sync` of a user (no `since`).
    InitialSync,
    /// Message send, request to response.
    Send,
    /// Send to arrival in a receiver's `/sync`, per receiver.
    Delivery,
    /// Incremental `/sync` requests that returned events.
    Sync,
    /// Typing notification.
    Typing,
    /// Read receipt.
    Receipt,
    /// Profile read.
    Profile,
    /// `/messages` back-pagination.
    Messages,
    /// TURN allocation (Allocate request to success response).
    TurnAllocate,
    /// TURN relayed packet round trip (client to peer through the relay).
    TurnRelay,
}

impl Op {
    /// Every operation, in report order.
    pub const ALL: [Op; 14] = [
        Op::Register,
        Op::Login,
        Op::CreateRoom,
        Op::Join,
        Op::InitialSync,
        Op::Send,
        Op::Delivery,
        Op::Sync,
        Op::Typing,
        Op::Receipt,
        Op::Profile,
        Op::Messages,
        Op::TurnAllocate,
        Op::TurnRelay,
    ];

    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Op::Register => "register",
            Op::Login => "login",
            Op::CreateRoom => "create_room",
            Op::Join => "join",
            Op::InitialSync => "initial_sync",
            Op::Send => "send",
            Op::Delivery => "delivery",
            Op::Sync => "sync",
            Op::Typing => "typing",
            Op::Receipt => "receipt",
            Op::Profile => "profile",
            Op::Messages => "messages",
            Op::TurnAllocate => "turn_allocate",
            Op::TurnRelay => "turn_relay",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How one failure is filed in the error table.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct ErrorKey {
    /// Operation name.
    pub op: String,
    /// HTTP status, when there was a response.
    pub status: Option<u16>,
    /// Matrix errcode, or a transport label (`timeout`, `connect`...).
    pub code: String,
}

impl ErrorKey {
    /// The key for a failed call.
    pub fn of(op: Op, err: &CallError) -> Self {
        let (status, code) = match err {
            CallError::Status { status, errcode } => {
                (Some(*status), errcode.clone().unwrap_or_else(|| "-".into()))
            }
            CallError::Transport(e) => (None, e.label().into()),
            CallError::Decode(_) => (None, "bad_response".into()),
            CallError::UnsupportedAuth(_) => (None, "unsupported_auth".into()),
        };
        Self {
            op: op.name().into(),
            status,
            code,
        }
    }
}

#[derive(Debug, Default)]
struct OpStats {
    total: LatencyHist,
    interval: LatencyHist,
    ok: u64,
    errors: u64,
    rate_limited: u64,
    warmup: u64,
    interval_ok: u64,
    interval_errors: u64,
    /// Earliest intended start and latest completion of measured
    /// operations, as offsets from the run start: the throughput window.
    first_start: Option<Duration>,
    last_end: Option<Duration>,
}

/// One operation's totals, as reports carry them.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OpTotals {
    /// Successful, measured operations.
    pub ok: u64,
    /// Failed operations (not counting 429s).
    pub errors: u64,
    /// Operations the server rate-limited (HTTP 429).
    pub rate_limited: u64,
    /// Operations intended during the warm-up, not measured.
    pub warmup: u64,
    /// Successful operations per second over the measured window.
    pub throughput_per_s: f64,
    /// Length of the measured window: first intended start to last completion.
    pub window_s: f64,
    /// Latency percentiles of successful operations.
    pub latency: LatencySummary,
}

/// One operation during one interval of the time series.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IntervalOp {
    /// Successes completed in the interval.
    pub ok: u64,
    /// Failures (including 429s) in the interval.
    pub errors: u64,
    /// Median latency in the interval.
    pub p50_us: u64,
    /// 99th percentile in the interval.
    pub p99_us: u64,
    /// Largest latency in the interval.
    pub max_us: u64,
}

/// One point of the time series.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IntervalPoint {
    /// End of the interval, seconds after the run started.
    pub t_s: f64,
    /// Length of the interval in seconds.
    pub dt_s: f64,
    /// Generator CPU use during the interval, percent of one core.
    pub generator_cpu_percent: f64,
    /// Resident memory of the server process, when its pid was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_rss_kib: Option<u64>,
    /// Operations active in the interval.
    pub ops: BTreeMap<String, IntervalOp>,
}

/// A phase of the run, for reports and plots.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PhaseMark {
    /// Phase name (`register`, `rooms`, `initial_sync`, `load`, `drain`).
    pub name: String,
    /// Start, seconds after the run started.
    pub start_s: f64,
    /// End, seconds after the run started.
    pub end_s: f64,
}

/// One operation's part of an interval, as a thread hands it over.
#[derive(Debug, Clone)]
struct IntervalPart {
    op: Op,
    ok: u64,
    errors: u64,
    hist: LatencyHist,
}

/// A thread's measurements of one interval of the time series, taken out of
/// its recorder to be added to another's ([`Recorder::absorb_interval`]).
#[derive(Debug, Clone, Default)]
pub struct IntervalSample {
    ops: Vec<IntervalPart>,
}

/// Collects every measurement of one generator thread.
#[derive(Debug)]
pub struct Recorder {
    start: Instant,
    measure_from: Instant,
    ops: Vec<OpStats>,
    errors: BTreeMap<ErrorKey, u64>,
    series: Vec<IntervalPoint>,
    last_tick: Instant,
    phases: Vec<PhaseMark>,
}

impl Recorder {
    /// A recorder for a run starting at `start`; everything is measured until
    /// [`Recorder::measure_from`] says otherwise.
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            measure_from: start,
            ops: Op::ALL.iter().map(|_| OpStats::default()).collect(),
            errors: BTreeMap::new(),
            series: Vec::new(),
            last_tick: start,
            phases: Vec::new(),
        }
    }

    /// The run's start.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// Operations intended before `t` are warm-up from now on.
    pub fn measure_from(&mut self, t: Instant) {
        self.measure_from = t;
    }

    /// Whether an operation intended at `intended` is measured.
    pub fn is_measured(&self, intended: Instant) -> bool {
        intended >= self.measure_from
    }

    /// Starts a phase (ending the previous one).
    pub fn phase(&mut self, name: &str, now: Instant) {
        let t = round3(self.offset(now).as_secs_f64());
        if let Some(last) = self.phases.last_mut() {
            last.end_s = t;
        }
        self.phases.push(PhaseMark {
            name: name.into(),
            start_s: t,
            end_s: t,
        });
    }

    /// Ends the current phase.
    pub fn end_phase(&mut self, now: Instant) {
        let t = round3(self.offset(now).as_secs_f64());
        if let Some(last) = self.phases.last_mut() {
            last.end_s = t;
        }
    }

    fn offset(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.start)
    }

    /// A success of `op` intended at `intended` and complete at `done`.
    pub fn ok(&mut self, op: Op, intended: Instant, done: Instant) {
        let measured = self.is_measured(intended);
        let (start_off, end_off) = (self.offset(intended), self.offset(done));
        let s = &mut self.ops[op.index()];
        let latency = done.saturating_duration_since(intended);
        // The time series shows the warm-up too; only the totals leave it out.
        s.interval_ok += 1;
        s.interval.record(latency);
        if !measured {
            s.warmup += 1;
            return;
        }
        s.ok += 1;
        s.total.record(latency);
        s.first_start = Some(s.first_start.map_or(start_off, |f| f.min(start_off)));
        s.last_end = Some(s.last_end.map_or(end_off, |l| l.max(end_off)));
    }

    /// A failure of `op` intended at `intended`.
    pub fn err(&mut self, op: Op, intended: Instant, err: &CallError) {
        let measured = self.is_measured(intended);
        let s = &mut self.ops[op.index()];
        s.interval_errors += 1;
        if !measured {
            s.warmup += 1;
            return;
        }
        if err.is_rate_limited() {
            s.rate_limited += 1;
        } else {
            s.errors += 1;
        }
        *self.errors.entry(ErrorKey::of(op, err)).or_insert(0) += 1;
    }

    /// A failure that is not a server call (e.g. a delivery that never came).
    pub fn err_other(&mut self, op: Op, code: &str, count: u64) {
        if count == 0 {
            return;
        }
        self.ops[op.index()].errors += count;
        let key = ErrorKey {
            op: op.name().into(),
            status: None,
            code: code.into(),
        };
        *self.errors.entry(key).or_insert(0) += count;
    }

    /// Closes the current interval of the time series at `now`.
    pub fn tick(
        &mut self,
        now: Instant,
        generator_cpu_percent: f64,
        server_rss_kib: Option<u64>,
    ) -> &IntervalPoint {
        let dt = now.saturating_duration_since(self.last_tick);
        self.last_tick = now;
        let mut ops = BTreeMap::new();
        for (op, s) in Op::ALL.iter().zip(self.ops.iter_mut()) {
            if s.interval_ok == 0 && s.interval_errors == 0 {
                continue;
            }
            ops.insert(
                op.name().to_owned(),
                IntervalOp {
                    ok: s.interval_ok,
                    errors: s.interval_errors,
                    p50_us: s.interval.quantile_us(0.5),
                    p99_us: s.interval.quantile_us(0.99),
                    max_us: s.interval.quantile_us(1.0),
                },
            );
            s.interval_ok = 0;
            s.interval_errors = 0;
            s.interval.reset();
        }
        self.series.push(IntervalPoint {
            t_s: round3(self.offset(now).as_secs_f64()),
            dt_s: round3(dt.as_secs_f64()),
            generator_cpu_percent: round3(generator_cpu_percent),
            server_rss_kib,
            ops,
        });
        // The series was just pushed to, so it is not empty.
        match self.series.last() {
            Some(p) => p,
            None => unreachable!("series is empty right after a push"),
        }
    }

    /// Takes the current interval's counts and histograms out of this
    /// recorder (its interval starts afresh); the totals stay.
    pub fn take_interval(&mut self) -> IntervalSample {
        let mut sample = IntervalSample::default();
        for (op, s) in Op::ALL.iter().zip(self.ops.iter_mut()) {
            if s.interval_ok == 0 && s.interval_errors == 0 {
                continue;
            }
            sample.ops.push(IntervalPart {
                op: *op,
                ok: std::mem::take(&mut s.interval_ok),
                errors: std::mem::take(&mut s.interval_errors),
                hist: std::mem::take(&mut s.interval),
            });
        }
        sample
    }

    /// Adds another thread's interval to the current one, as if this
    /// recorder had seen those operations itself.
    pub fn absorb_interval(&mut self, sample: &IntervalSample) {
        for part in &sample.ops {
            let s = &mut self.ops[part.op.index()];
            s.interval_ok += part.ok;
            s.interval_errors += part.errors;
            s.interval.merge(&part.hist);
        }
    }

    /// Adds another thread's totals (histograms, counts, throughput windows
    /// and error table) to this recorder's. The time series, the phases and
    /// the current interval stay this recorder's: the thread that keeps the
    /// series absorbs the others' intervals as they close.
    pub fn merge(&mut self, other: &Recorder) {
        // Offsets of the throughput window are from each recorder's start;
        // threads of one run share it, but convert in case they do not.
        let shift = |d: Duration| (other.start + d).saturating_duration_since(self.start);
        for (s, o) in self.ops.iter_mut().zip(other.ops.iter()) {
            s.total.merge(&o.total);
            s.ok += o.ok;
            s.errors += o.errors;
            s.rate_limited += o.rate_limited;
            s.warmup += o.warmup;
            if let Some(f) = o.first_start.map(shift) {
                s.first_start = Some(s.first_start.map_or(f, |m| m.min(f)));
            }
            if let Some(l) = o.last_end.map(shift) {
                s.last_end = Some(s.last_end.map_or(l, |m| m.max(l)));
            }
        }
        for (k, n) in &other.errors {
            *self.errors.entry(k.clone()).or_insert(0) += n;
        }
    }

    /// Totals of one operation.
    pub fn totals(&self, op: Op) -> OpTotals {
        let s = &self.ops[op.index()];
        let window = match (s.first_start, s.last_end) {
            (Some(a), Some(b)) => b.saturating_sub(a).as_secs_f64(),
            _ => 0.0,
        };
        OpTotals {
            ok: s.ok,
            errors: s.errors,
            rate_limited: s.rate_limited,
            warmup: s.warmup,
            throughput_per_s: round3(if window > 0.0 {
                s.ok as f64 / window
            } else {
                0.0
            }),
            window_s: round3(window),
            latency: s.total.summary(),
        }
    }

    /// The whole-run histogram of one operation.
    pub fn histogram(&self, op: Op) -> &LatencyHist {
        &self.ops[op.index()].total
    }

    /// The error table.
    pub fn errors(&self) -> &BTreeMap<ErrorKey, u64> {
        &self.errors
    }

    /// The time series so far.
    pub fn series(&self) -> &[IntervalPoint] {
        &self.series
    }

    /// The phases so far.
    pub fn phases(&self) -> &[PhaseMark] {
        &self.phases
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::HttpError;

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn warmup_is_excluded_and_429s_are_not_latency() {
        let t0 = Instant::now();
        let mut r = Recorder::new(t0);
        r.measure_from(at(t0, 1000));
        // Warm-up: intended before 1 s, even if it completes later.
        r.ok(Op::Send, at(t0, 900), at(t0, 1500));
        r.err(
            Op::Send,
            at(t0, 10),
            &CallError::Status {
                status: 500,
                errcode: None,
            },
        );
        // Measured.
        r.ok(Op::Send, at(t0, 1000), at(t0, 1010));
        r.ok(Op::Send, at(t0, 2000), at(t0, 2030));
        r.err(
            Op::Send,
            at(t0, 2100),
            &CallError::Status {
                status: 429,
                errcode: Some("M_LIMIT_EXCEEDED".into()),
            },
        );
        r.err(
            Op::Send,
            at(t0, 2200),
            &CallError::Status {
                status: 403,
                errcode: Some("M_FORBIDDEN".into()),
            },
        );
        r.err(
            Op::Send,
            at(t0, 2300),
            &CallError::Transport(HttpError::Timeout),
        );
        let t = r.totals(Op::Send);
        assert_eq!((t.ok, t.errors, t.rate_limited, t.warmup), (2, 2, 1, 2));
        assert_eq!(t.latency.count, 2);
        assert!(
            t.latency.max_us >= 29_900 && t.latency.max_us <= 30_100,
            "{t:?}"
        );
        // Window: 1.000 s to 2.030 s.
        assert!((t.window_s - 1.03).abs() < 1e-9, "{t:?}");
        let keys: Vec<(Option<u16>, &str, u64)> = r
            .errors()
            .iter()
            .map(|(k, n)| (k.status, k.code.as_str(), *n))
            .collect();
        assert_eq!(
            keys,
            vec![
                (None, "timeout", 1),
                (Some(403), "M_FORBIDDEN", 1),
                (Some(429), "M_LIMIT_EXCEEDED", 1)
            ]
        );
    }

    #[test]
    fn ticks_split_the_series_into_intervals() {
        let t0 = Instant::now();
        let mut r = Recorder::new(t0);
        r.ok(Op::Send, at(t0, 100), at(t0, 110));
        r.ok(Op::Send, at(t0, 200), at(t0, 220));
        r.ok(Op::Delivery, at(t0, 200), at(t0, 260));
        let p = r.tick(at(t0, 1000), 12.5, Some(1024)).clone();
        assert_eq!(p.ops["send"].ok, 2);
        assert!(p.ops["send"].p99_us >= 19_900);
        assert_eq!(p.ops["delivery"].ok, 1);
        assert_eq!(p.server_rss_kib, Some(1024));
        // Second interval: only one op active, the others are left out.
        r.err(
            Op::Typing,
            at(t0, 1100),
            &CallError::Status {
                status: 500,
                errcode: None,
            },
        );
        let p = r.tick(at(t0, 2000), 1.0, None).clone();
        assert_eq!(p.ops.len(), 1);
        assert_eq!(p.ops["typing"].errors, 1);
        assert!((p.dt_s - 1.0).abs() < 1e-9);
        assert_eq!(r.series().len(), 2);
        // Totals are not reset by ticks.
        assert_eq!(r.totals(Op::Send).ok, 2);
    }

    /// A mixed stream of operations (successes, warm-up, 429s, errors),
    /// operation `i` recorded by `recs[i % recs.len()]`, the way
    /// `split::owner` hands arrivals to threads.
    fn record_stream(t0: Instant, recs: &mut [&mut Recorder]) {
        let n = recs.len() as u64;
        for i in 0..3_000u64 {
            let r = &mut *recs[(i % n) as usize];
            let intended = at(t0, 200 + i);
            // Latencies from 1 ms to several seconds, different per op.
            r.ok(
                Op::Send,
                intended,
                intended + Duration::from_micros(900 + i * i % 5_000_000),
            );
            r.ok(
                Op::Delivery,
                intended,
                intended + Duration::from_micros(3_000 + i * 17),
            );
            if i % 7 == 0 {
                let status = if i % 2 == 0 { 429 } else { 500 };
                let err = CallError::Status {
                    status,
                    errcode: Some(format!("M_{status}")),
                };
                r.err(Op::Typing, intended, &err);
            }
        }
        recs[0].err_other(Op::Delivery, "missing", 3);
    }

    #[test]
    fn two_threads_merge_to_the_same_totals_as_one() {
        let t0 = Instant::now();
        let mut all = Recorder::new(t0);
        let (mut a, mut b) = (Recorder::new(t0), Recorder::new(t0));
        for r in [&mut all, &mut a, &mut b] {
            r.measure_from(at(t0, 1000));
        }
        record_stream(t0, &mut [&mut all]);
        record_stream(t0, &mut [&mut a, &mut b]);
        assert!(a.totals(Op::Send).ok > 0 && b.totals(Op::Send).ok > 0);
        assert_ne!(a.totals(Op::Send), all.totals(Op::Send));
        a.merge(&b);
        for op in Op::ALL {
            assert_eq!(a.totals(op), all.totals(op), "{op:?}");
        }
        let send = a.totals(Op::Send);
        assert_eq!((send.ok, send.warmup), (2_200, 800));
        assert!(send.latency.max_us > 4_000_000, "{send:?}");
        let typing = a.totals(Op::Typing);
        assert!(typing.rate_limited > 0 && typing.errors > 0, "{typing:?}");
        assert_eq!(a.errors(), all.errors());
        // Merging an empty recorder changes nothing.
        a.merge(&Recorder::new(t0));
        assert_eq!(a.totals(Op::Send), all.totals(Op::Send));
    }

    #[test]
    fn absorbed_intervals_give_the_same_series_point_as_one() {
        let t0 = Instant::now();
        let mut all = Recorder::new(t0);
        let (mut a, mut b) = (Recorder::new(t0), Recorder::new(t0));
        record_stream(t0, &mut [&mut all]);
        record_stream(t0, &mut [&mut a, &mut b]);
        let sample = b.take_interval();
        a.absorb_interval(&sample);
        let one = all.tick(at(t0, 4000), 50.0, None).clone();
        let merged = a.tick(at(t0, 4000), 50.0, None).clone();
        assert_eq!(merged, one);
        assert_eq!(merged.ops["send"].ok, 3_000);
        // The interval was taken out of `b`: its next one starts empty,
        // while its totals are untouched.
        assert!(b.take_interval().ops.is_empty());
        assert!(b.tick(at(t0, 4000), 0.0, None).ops.is_empty());
        assert_eq!(b.totals(Op::Send).ok, 1_500);
    }

    #[test]
    fn phases_chain() {
        let t0 = Instant::now();
        let mut r = Recorder::new(t0);
        r.phase("register", t0);
        r.phase("load", at(t0, 2000));
        r.end_phase(at(t0, 5000));
        let p = r.phases();
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].start_s, p[0].end_s), (0.0, 2.0));
        assert_eq!((p[1].start_s, p[1].end_s), (2.0, 5.0));
    }
}
