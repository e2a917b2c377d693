//! The engine: runs a [`Plan`] against a homeserver and returns a [`Report`].
//!
//! Phases, in order, each only when the plan needs it: `register` (users,
//! then one login each), `rooms` (create, then join), `initial_sync`,
//! `load` (open- or closed-loop sends and chat-like actions while every
//! syncing user long-polls `/sync`), `drain` (wait for the last deliveries),
//! then `turn`.
//!
//! Threads: `plan.threads` generator threads, each a current-thread tokio
//! runtime with a `LocalSet`, so a thread's state is `Rc` + `RefCell` with
//! no locks. The first thread is the caller's; it also keeps the time
//! series and the progress line, handles Ctrl-C, runs `turn`, and merges
//! every thread's measurements into the report. With one thread nothing
//! else is started. The work is split by `split::owner`: each thread
//! registers and logs in its users, creates its rooms, does its joins, runs
//! the sync loops of its syncing users and dispatches its share of every
//! open-loop schedule; any thread may send as any user. At the end of
//! `register` and `rooms` the threads swap sessions, room ids and failed
//! joins at a rendezvous, so each holds every user and room. A message is
//! tracked by its sender's thread; a sync loop on another thread passes the
//! arrival there over a bounded channel. **Invariant:** no `RefCell`
//! borrow is held across an `.await`, and threads share nothing mutable on
//! request paths but the load-phase request budget (one atomic counter).
//!
//! Bounds: open-loop arrivals beyond `limits.max_in_flight` (divided over
//! the threads) are dropped and counted rather than queued; the load phase
//! issues at most `limits.max_requests` over all threads; every phase stops
//! at `limits.max_run_s` or on Ctrl-C, and the report is still written.

use crate::config::{Mode, Plan, Scenario, secs};
use crate::delivery::Deliveries;
use crate::hist::LatencyHist;
use crate::http::{Pool, Response};
use crate::matrix::{self, CallError, Marker, Session, SyncResponse};
use crate::metrics::{IntervalPoint, IntervalSample, Op, Recorder, round3};
use crate::report::{GeneratorStats, Report, RoomStats, ServerInfo, UserStats};
use crate::rng::Rng;
use crate::schedule::Schedule;
use crate::split::{Broken, Rendezvous, owner, share};
use crate::syncloop::{self, SyncClient, SyncRequest};
use crate::sys::{CpuTime, Machine, tree_rss_kib};
use crate::target::{Target, http_target};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{Notify, mpsc, oneshot};

/// How progress is shown while running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Nothing.
    Off,
    /// One line rewritten in place (a terminal).
    Line,
    /// A new line every few seconds (logs, CI).
    Log,
}

/// Options that are about this invocation, not the load.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Pid of the server process, to sample its memory.
    pub server_pid: Option<u32>,
    /// Progress display.
    pub progress: Progress,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            server_pid: None,
            progress: Progress::Off,
        }
    }
}

/// Arrival batches queued for one thread at most. A batch is the marked
/// events of one sync response for that thread (24 bytes each), so the
/// queue holds at most 1,024 responses' worth; a sync loop that finds it
/// full waits (the arrival instants are already taken, so waiting does not
/// change the latencies).
const ARRIVAL_BATCHES_MAX: usize = 1024;

/// A message of another thread seen by a receiver: its sequence number and
/// when it arrived.
type Arrival = (u64, Instant);

/// What a thread answers once a second to the first thread, which keeps the
/// time series and the progress line.
struct TickReply {
    sample: IntervalSample,
    in_flight: u32,
    outstanding: u64,
}

type TickRequest = oneshot::Sender<TickReply>;

/// What the generator threads share: fixed before they start, or handed
/// over at a rendezvous.
struct Shared {
    plan: Plan,
    threads: usize,
    run_id: u64,
    start: Instant,
    deadline: Instant,
    target: Target,
    /// Set on Ctrl-C.
    stop: Arc<AtomicBool>,
    /// Load-phase requests issued so far, over all threads.
    issued: AtomicU64,
    /// Each thread's queue of arrivals of its messages seen elsewhere.
    arrivals: Vec<mpsc::Sender<Vec<Arrival>>>,
    /// The start of an open-loop registration schedule.
    register_start: Rendezvous<Instant>,
    /// Sessions of each thread's users.
    sessions: Rendezvous<Vec<(u32, Session)>>,
    /// Ids of each thread's rooms (by index).
    created: Rendezvous<Vec<(usize, String)>>,
    /// Each thread's failed joins (by pair index).
    failed_joins: Rendezvous<Vec<usize>>,
    /// When each thread reached the load phase, and its sync loops.
    load_start: Rendezvous<(Instant, usize)>,
    /// Each thread has drained (or given up waiting).
    drained: Rendezvous<()>,
}

impl Shared {
    /// Releases every thread waiting at a rendezvous, for good.
    fn break_off(&self) {
        self.register_start.break_off();
        self.sessions.break_off();
        self.created.break_off();
        self.failed_joins.break_off();
        self.load_start.break_off();
        self.drained.break_off();
    }

    /// Whether the load phase's request budget is spent.
    fn budget_spent(&self) -> bool {
        self.issued.load(Ordering::Relaxed) >= self.plan.limits.max_requests
    }

    /// Takes one request from the load phase's budget
    /// (`limits.max_requests`); false when it is spent.
    fn try_issue(&self) -> bool {
        let max = self.plan.limits.max_requests;
        self.issued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }
}

/// Breaks off every rendezvous when its thread unwinds, so that a panic in
/// one thread fails the run instead of leaving the others waiting forever.
struct BreakOffOnPanic(Arc<Shared>);

impl Drop for BreakOffOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.break_off();
        }
    }
}

struct User {
    localpart: String,
    session: Option<Rc<Session>>,
}

struct Room {
    id: String,
    members: Vec<u32>,
    /// Members that run a sync loop (on any thread).
    syncing: u32,
    last_event: Option<String>,
}

/// One generator thread's state.
struct Ctx {
    shared: Arc<Shared>,
    plan: Plan,
    /// This thread's index, and the number of threads.
    thread: usize,
    threads: usize,
    pool: Pool,
    sync_pool: Pool,
    rec: Rc<RefCell<Recorder>>,
    deliveries: RefCell<Deliveries>,
    delivered: Notify,
    users: RefCell<Vec<User>>,
    rooms: RefCell<Vec<Room>>,
    syncing: RefCell<Vec<bool>>,
    rng: RefCell<Rng>,
    run_id: u64,
    /// This thread's next message number; message sequence numbers are
    /// `number * threads + thread`, unique over the run.
    seq: Cell<u64>,
    in_flight: Cell<u32>,
    /// This thread's share of `limits.max_in_flight`.
    in_flight_max: u32,
    idle: Notify,
    dropped: Cell<u64>,
    lag: RefCell<LatencyHist>,
    stop: Arc<AtomicBool>,
    deadline: Instant,
    user_stats: RefCell<UserStats>,
    room_stats: RefCell<RoomStats>,
    phase: RefCell<String>,
    /// Sync loops over all threads, known when the load phase starts.
    sync_loops: Cell<usize>,
    /// CPU use during the load phase, percent of one core: the whole
    /// process's and this thread's.
    load_cpu: Cell<Option<(f64, f64)>>,
}

/// What one thread measured, handed to the first thread at the end.
struct Part {
    rec: Recorder,
    deliveries: crate::delivery::DeliveryCounts,
    lag: LatencyHist,
    dropped: u64,
    connections_opened: u64,
    users: UserStats,
    rooms: RoomStats,
    load_thread_cpu_percent: Option<f64>,
}

impl Ctx {
    fn new(shared: &Arc<Shared>, thread: usize) -> anyhow::Result<Self> {
        let plan = &shared.plan;
        let threads = shared.threads;
        let timeout = secs(plan.limits.request_timeout_s);
        let connections = share(u64::from(plan.limits.connections), threads, thread);
        let pool = Pool::new(
            shared.target.addr,
            &shared.target.host_header,
            connections.max(1) as usize,
            timeout,
        )?;
        let sync_conns = if plan.sync.users == 0 {
            plan.users.count
        } else {
            plan.sync.users
        };
        // Room for every sync loop this thread may run: its syncing users
        // are among its own users.
        let own_users = share(u64::from(plan.users.count), threads, thread);
        let sync_pool = Pool::new(
            shared.target.addr,
            &shared.target.host_header,
            own_users.min(u64::from(sync_conns)) as usize + 1,
            timeout,
        )?;
        let in_flight_max = share(u64::from(plan.limits.max_in_flight.max(1)), threads, thread);
        // Thread 0 keeps the plan's seed, so one thread makes the choices
        // it always made.
        let seed = plan
            .seed
            .wrapping_add((thread as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        Ok(Self {
            shared: shared.clone(),
            plan: plan.clone(),
            thread,
            threads,
            pool,
            sync_pool,
            rec: Rc::new(RefCell::new(Recorder::new(shared.start))),
            deliveries: RefCell::new(Deliveries::new()),
            delivered: Notify::new(),
            users: RefCell::new(Vec::new()),
            rooms: RefCell::new(Vec::new()),
            syncing: RefCell::new(Vec::new()),
            rng: RefCell::new(Rng::new(seed)),
            run_id: shared.run_id,
            seq: Cell::new(0),
            in_flight: Cell::new(0),
            in_flight_max: u32::try_from(in_flight_max.max(1)).unwrap_or(u32::MAX),
            idle: Notify::new(),
            dropped: Cell::new(0),
            lag: RefCell::new(LatencyHist::new()),
            stop: shared.stop.clone(),
            deadline: shared.deadline,
            user_stats: RefCell::new(UserStats::default()),
            room_stats: RefCell::new(RoomStats::default()),
            phase: RefCell::new(String::new()),
            sync_loops: Cell::new(0),
            load_cpu: Cell::new(None),
        })
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || Instant::now() >= self.deadline
    }

    fn set_phase(&self, name: &str) {
        self.rec.borrow_mut().phase(name, Instant::now());
        *self.phase.borrow_mut() = name.to_owned();
    }

    fn session(&self, user: u32) -> Option<Rc<Session>> {
        self.users
            .borrow()
            .get(user as usize)
            .and_then(|u| u.session.clone())
    }

    /// Whether this thread owns `index` (a user, room, join or arrival).
    fn owns(&self, index: u64) -> bool {
        owner(index, self.threads) == self.thread
    }

    /// The `k`-th index that this thread owns.
    fn own_index(&self, k: u64) -> u64 {
        k * self.threads as u64 + self.thread as u64
    }

    /// How many of `0..n` this thread owns.
    fn own_count(&self, n: u64) -> u64 {
        share(n, self.threads, self.thread)
    }

    /// This thread's share of a concurrency limit; at least one worker, so
    /// that the thread's own work gets done.
    fn own_concurrency(&self, total: u32) -> u32 {
        let s = share(u64::from(total), self.threads, self.thread);
        u32::try_from(s.max(1)).unwrap_or(u32::MAX)
    }

    /// Hands the measurements over to the first thread.
    fn take_part(&self) -> Part {
        let rec = self.rec.replace(Recorder::new(self.shared.start));
        Part {
            rec,
            deliveries: self.deliveries.borrow().finish(),
            lag: self.lag.borrow().clone(),
            dropped: self.dropped.get(),
            connections_opened: self.pool.connections_opened()
                + self.sync_pool.connections_opened(),
            users: self.user_stats.borrow().clone(),
            rooms: self.room_stats.borrow().clone(),
            load_thread_cpu_percent: self.load_cpu.get().map(|c| c.1),
        }
    }
}

/// Runs the plan: the first generator thread on a fresh single-threaded
/// runtime here, the others (if any) on threads of their own.
pub fn run_blocking(plan: &Plan, opts: &RunOptions) -> anyhow::Result<Report> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, run(plan, opts))
}

/// Runs the plan; must be called inside a `LocalSet`, which becomes the
/// first generator thread.
pub async fn run(plan: &Plan, opts: &RunOptions) -> anyhow::Result<Report> {
    plan.validate().map_err(anyhow::Error::msg)?;
    crate::sys::raise_fd_limit();
    let start = Instant::now();
    let started_unix_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let cpu_start = CpuTime::now();
    let target = http_target(&plan.target, plan.allow_remote)?;
    let threads = plan.threads.max(1) as usize;
    let (own_arrival_tx, own_arrivals) = mpsc::channel::<Vec<Arrival>>(ARRIVAL_BATCHES_MAX);
    let (other_arrival_tx, other_arrivals): (Vec<_>, Vec<_>) = (1..threads)
        .map(|_| mpsc::channel::<Vec<Arrival>>(ARRIVAL_BATCHES_MAX))
        .unzip();
    let shared = Arc::new(Shared {
        plan: plan.clone(),
        threads,
        run_id: run_id(),
        start,
        deadline: start + secs(plan.limits.max_run_s),
        target,
        stop: Arc::new(AtomicBool::new(false)),
        issued: AtomicU64::new(0),
        arrivals: std::iter::once(own_arrival_tx)
            .chain(other_arrival_tx)
            .collect(),
        register_start: Rendezvous::new(threads),
        sessions: Rendezvous::new(threads),
        created: Rendezvous::new(threads),
        failed_joins: Rendezvous::new(threads),
        load_start: Rendezvous::new(threads),
        drained: Rendezvous::new(threads),
    });
    let _break_off = BreakOffOnPanic(shared.clone());
    let ctx = Rc::new(Ctx::new(&shared, 0)?);
    let mut server = ServerInfo {
        pid: opts.server_pid,
        ..ServerInfo::default()
    };
    if plan.needs_users() {
        let (versions, header) = matrix::versions(&ctx.pool).await.map_err(|e| {
            anyhow::anyhow!(
                "{} does not answer /_matrix/client/versions: {e}",
                plan.target
            )
        })?;
        server.versions = versions;
        server.server_header = header;
    }

    // The other threads, started only once the server answered.
    let mut others = Vec::with_capacity(threads - 1);
    let mut tick_requests = Vec::with_capacity(threads - 1);
    for (t, arrivals) in (1..threads).zip(other_arrivals) {
        let (tick_tx, tick_rx) = mpsc::channel::<TickRequest>(1);
        let (done_tx, done_rx) = oneshot::channel();
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("loadtest-{t}"))
            .spawn(move || {
                let _break_off = BreakOffOnPanic(s.clone());
                let result = generator_thread(&s, t, arrivals, tick_rx);
                if result.is_err() {
                    s.break_off();
                }
                let _ = done_tx.send(result);
            });
        match spawned {
            Ok(handle) => others.push((handle, done_rx)),
            Err(e) => {
                shared.break_off();
                anyhow::bail!("cannot start generator thread {t}: {e}");
            }
        }
        tick_requests.push(tick_tx);
    }

    let ctrl_c = {
        let stop = shared.stop.clone();
        tokio::task::spawn_local(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                // First Ctrl-C: stop and still write the report.
                stop.store(true, Ordering::Relaxed);
                eprintln!("\nstopping (Ctrl-C again to abort without a report)");
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        })
    };
    let ticker = tokio::task::spawn_local(ticker(
        ctx.clone(),
        opts.clone(),
        cpu_start,
        start,
        tick_requests,
    ));

    let mut outcome = generate(&ctx, own_arrivals)
        .await
        .map_err(anyhow::Error::from);
    if outcome.is_ok() && plan.has(Scenario::Turn) {
        ctx.set_phase("turn");
        outcome = turn_phase(&ctx).await;
    }
    if outcome.is_err() {
        shared.break_off();
    }
    ctx.rec.borrow_mut().end_phase(Instant::now());

    // The other threads' parts; a thread's panic is re-raised here, and its
    // error wins over the `Broken` that it caused in the others.
    let mut parts = Vec::with_capacity(others.len());
    let mut failure: Option<anyhow::Error> = None;
    for (handle, done) in others {
        match done.await {
            Ok(Ok(part)) => parts.push(part),
            Ok(Err(e)) => {
                if failure.as_ref().is_none_or(|f| f.is::<Broken>()) {
                    failure = Some(e);
                }
            }
            Err(_) => {
                // The thread ended without an answer: it panicked.
                if let Err(panic) = handle.join() {
                    std::panic::resume_unwind(panic);
                }
            }
        }
    }
    ctrl_c.abort();
    ticker.abort();
    match (outcome, failure) {
        (Err(e), Some(f)) if e.is::<Broken>() => return Err(f),
        (Err(e), _) => return Err(e),
        (Ok(()), Some(f)) => return Err(f),
        (Ok(()), None) => {}
    }

    // The other threads' last interval and totals join this thread's.
    let mut deliveries = ctx.deliveries.borrow().finish();
    let mut lag = ctx.lag.borrow().clone();
    let mut user_stats = ctx.user_stats.borrow().clone();
    let mut room_stats = ctx.room_stats.borrow().clone();
    let mut dropped = ctx.dropped.get();
    let mut connections_opened = ctx.pool.connections_opened() + ctx.sync_pool.connections_opened();
    let mut busiest = ctx.load_cpu.get().map(|c| c.1);
    for mut part in parts {
        let sample = part.rec.take_interval();
        let mut rec = ctx.rec.borrow_mut();
        rec.absorb_interval(&sample);
        rec.merge(&part.rec);
        deliveries.merge(&part.deliveries);
        lag.merge(&part.lag);
        user_stats.merge(&part.users);
        room_stats.merge(&part.rooms);
        dropped += part.dropped;
        connections_opened += part.connections_opened;
        busiest = match (busiest, part.load_thread_cpu_percent) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }

    // A last point so the series covers the end of the run.
    let wall = start.elapsed();
    let cpu_end = CpuTime::now();
    let rss = opts.server_pid.and_then(tree_rss_kib);
    ctx.rec
        .borrow_mut()
        .tick(Instant::now(), cpu_end.percent_since(&cpu_start, wall), rss);
    if let Some(pid) = opts.server_pid {
        server.peak_rss_kib = ctx
            .rec
            .borrow()
            .series()
            .iter()
            .filter_map(|p| p.server_rss_kib)
            .max();
        server.peak_rss_main_kib = crate::sys::rss_kib(pid).map(|r| r.1);
    }
    ctx.rec
        .borrow_mut()
        .err_other(Op::Delivery, "missing", deliveries.missing);

    let cpu_percent = cpu_end.percent_since(&cpu_start, wall);
    let load_cpu = ctx.load_cpu.get().map(|c| c.0);
    let per_thread = |c: f64| c / threads as f64;
    let generator = GeneratorStats {
        threads: plan.threads,
        wall_s: round3(wall.as_secs_f64()),
        cpu_user_s: round3(cpu_end.user.saturating_sub(cpu_start.user).as_secs_f64()),
        cpu_system_s: round3(
            cpu_end
                .system
                .saturating_sub(cpu_start.system)
                .as_secs_f64(),
        ),
        cpu_percent_of_one_core: round3(cpu_percent),
        load_phase_cpu_percent_of_one_core: load_cpu.map(round3),
        cpu_percent_per_thread: round3(per_thread(cpu_percent)),
        load_phase_cpu_percent_per_thread: load_cpu.map(|c| round3(per_thread(c))),
        load_phase_busiest_thread_cpu_percent: busiest.map(round3),
        saturated: per_thread(load_cpu.unwrap_or(cpu_percent)) > 90.0
            || busiest.is_some_and(|b| b > 90.0),
        dispatch_lag: lag.summary(),
        dropped_arrivals: dropped,
        requests_issued: shared.issued.load(Ordering::Relaxed),
        connections_opened,
        stopped_early: ctx.stopped(),
    };
    let rec = ctx.rec.borrow();
    Ok(Report::build(
        plan,
        started_unix_s,
        server,
        Machine::detect(),
        generator,
        user_stats,
        room_stats,
        deliveries,
        &rec,
    ))
}

/// Body of generator threads 1.., on a runtime of their own.
fn generator_thread(
    shared: &Arc<Shared>,
    t: usize,
    arrivals: mpsc::Receiver<Vec<Arrival>>,
    ticks: mpsc::Receiver<TickRequest>,
) -> anyhow::Result<Part> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let ctx = Rc::new(Ctx::new(shared, t)?);
        let answers = tokio::task::spawn_local(answer_ticks(ctx.clone(), ticks));
        let outcome = generate(&ctx, arrivals).await;
        answers.abort();
        outcome?;
        Ok(ctx.take_part())
    })
}

/// The Matrix phases, as every thread runs them.
async fn generate(ctx: &Rc<Ctx>, arrivals: mpsc::Receiver<Vec<Arrival>>) -> Result<(), Broken> {
    let plan = &ctx.plan;
    if plan.needs_users() {
        register_phase(ctx).await?;
    }
    if plan.needs_users() && (plan.has(Scenario::Rooms) || plan.has_load()) {
        rooms_phase(ctx).await?;
    }
    if plan.runs_sync() || plan.has(Scenario::Sync) {
        pick_sync_users(ctx);
    }
    let mut since = Vec::new();
    if plan.runs_sync() {
        since = initial_sync_phase(ctx).await;
    }
    if plan.has_load() {
        let (cpu0, thread0) = (CpuTime::now(), CpuTime::thread_now());
        let t0 = Instant::now();
        load_phase(ctx, since, arrivals).await?;
        let wall = t0.elapsed();
        ctx.load_cpu.set(Some((
            CpuTime::now().percent_since(&cpu0, wall),
            CpuTime::thread_now().percent_since(&thread0, wall),
        )));
    }
    Ok(())
}

fn run_id() -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // Mix in the pid so two generators started in the same nanosecond differ.
    let mut r = Rng::new(t ^ (u64::from(std::process::id()) << 32));
    r.next_u64() & 0xFFFF_FFFF
}

async fn turn_phase(ctx: &Rc<Ctx>) -> anyhow::Result<()> {
    let plan = &ctx.plan;
    let (host, port) =
        plan.turn.server.rsplit_once(':').ok_or_else(|| {
            anyhow::anyhow!("turn.server {:?} is not host:port", plan.turn.server)
        })?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port
        .parse()
        .map_err(|_| anyhow::anyhow!("turn.server {:?}: bad port", plan.turn.server))?;
    let server = crate::target::resolve_checked(host, port, plan.allow_remote)?;
    let (username, password) = if plan.turn.from_homeserver {
        let session = first_session(ctx)
            .ok_or_else(|| anyhow::anyhow!("turn: no user to ask /voip/turnServer with"))?;
        let ts = matrix::turn_server(&ctx.pool, &session)
            .await
            .map_err(|e| anyhow::anyhow!("turn: /voip/turnServer failed: {e}"))?;
        (ts.username, ts.password)
    } else {
        let secret = plan.turn.secret.as_deref().unwrap_or_default();
        let expiry = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + 3600;
        crate::stun::rest_credentials(secret, &format!("loadtest{:08x}", ctx.run_id), expiry)
    };
    let t = Rc::new(crate::turn::TurnCtx::new(
        server,
        username,
        password,
        ctx.rec.clone(),
        ctx.stop.clone(),
        ctx.deadline,
        plan.seed,
    ));
    crate::turn::run(plan, t).await
}

fn first_session(ctx: &Ctx) -> Option<Rc<Session>> {
    ctx.users.borrow().iter().find_map(|u| u.session.clone())
}

async fn ticker(
    ctx: Rc<Ctx>,
    opts: RunOptions,
    cpu_start: CpuTime,
    start: Instant,
    others: Vec<mpsc::Sender<TickRequest>>,
) {
    let mut interval = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let mut last_cpu = cpu_start;
    let mut last = start;
    let mut n = 0u64;
    loop {
        interval.tick().await;
        // The other threads' intervals first (all asked at once), so that
        // every thread's interval ends at about the same instant. A thread
        // that has not answered the last request yet, or has ended, is
        // skipped: its measurements go into a later interval.
        let asked: Vec<_> = others
            .iter()
            .filter_map(|t| {
                let (tx, rx) = oneshot::channel();
                t.try_send(tx).is_ok().then_some(rx)
            })
            .collect();
        let (mut in_flight, mut outstanding) = (0u64, 0u64);
        for answer in asked {
            if let Ok(a) = answer.await {
                ctx.rec.borrow_mut().absorb_interval(&a.sample);
                in_flight += u64::from(a.in_flight);
                outstanding += a.outstanding;
            }
        }
        in_flight += u64::from(ctx.in_flight.get());
        outstanding += ctx.deliveries.borrow().outstanding();
        let now = Instant::now();
        let cpu = CpuTime::now();
        let cpu_percent = cpu.percent_since(&last_cpu, now.duration_since(last));
        (last_cpu, last) = (cpu, now);
        let rss = opts.server_pid.and_then(tree_rss_kib);
        let point = ctx.rec.borrow_mut().tick(now, cpu_percent, rss).clone();
        n += 1;
        let line = progress_line(&ctx, &point, in_flight, outstanding);
        match opts.progress {
            Progress::Off => {}
            Progress::Line => {
                // One terminal row: a wrapped line could not be rewritten in place.
                let width = crate::sys::terminal_width()
                    .unwrap_or(120)
                    .saturating_sub(1);
                let line: String = line.chars().take(width).collect();
                eprint!("\r\x1b[2K{line}")
            }
            Progress::Log if n.is_multiple_of(5) => eprintln!("{line}"),
            Progress::Log => {}
        }
    }
}

/// Answers the first thread's once-a-second requests for this thread's
/// interval (threads 1.. only).
async fn answer_ticks(ctx: Rc<Ctx>, mut requests: mpsc::Receiver<TickRequest>) {
    while let Some(reply) = requests.recv().await {
        let sample = ctx.rec.borrow_mut().take_interval();
        let outstanding = ctx.deliveries.borrow().outstanding();
        let _ = reply.send(TickReply {
            sample,
            in_flight: ctx.in_flight.get(),
            outstanding,
        });
    }
}

/// The progress line: every thread's operations, requests in flight and
/// awaited deliveries together.
fn progress_line(ctx: &Ctx, p: &IntervalPoint, in_flight: u64, outstanding: u64) -> String {
    let mut s = format!("[{:>6.1}s {:<12}]", p.t_s, ctx.phase.borrow());
    for (name, o) in &p.ops {
        let rate = if p.dt_s > 0.0 {
            o.ok as f64 / p.dt_s
        } else {
            0.0
        };
        s.push_str(&format!(
            " {name} {rate:.0}/s p99 {}",
            crate::report::fmt_us(o.p99_us)
        ));
        if o.errors > 0 {
            s.push_str(&format!(" err {}", o.errors));
        }
        s.push(';');
    }
    s.push_str(&format!(
        " in-flight {in_flight} awaiting {outstanding} cpu {:.0}%",
        p.generator_cpu_percent
    ));
    if ctx.threads > 1 {
        // The process's CPU over all threads: also as percent of their cores.
        s.push_str(&format!(
            " ({:.0}% of {} cores)",
            p.generator_cpu_percent / ctx.threads as f64,
            ctx.threads
        ));
    }
    s
}

/// Runs `make(i, intended)` for this thread's arrivals of `schedule`
/// (offsets from `start`; every `threads`-th one, see `split.rs`), without
/// waiting for earlier ones: open loop.
async fn open_loop<F, Fut>(
    ctx: &Rc<Ctx>,
    schedule: &Schedule,
    start: Instant,
    count_issued: bool,
    mut make: F,
) where
    F: FnMut(u64, Instant) -> Fut,
    Fut: Future<Output = ()> + 'static,
{
    let mut since_yield = 0u32;
    let own = schedule
        .arrivals()
        .enumerate()
        .skip(ctx.thread)
        .step_by(ctx.threads);
    for (i, offset) in own {
        if ctx.stopped() || (count_issued && ctx.shared.budget_spent()) {
            break;
        }
        let intended = start + offset;
        if intended > Instant::now() {
            if ctx.plan.load.precise_arrivals {
                // The timer fires up to a tick late: sleep to a tick before
                // the arrival, then yield (letting other tasks and the
                // I/O driver run) until it is due.
                if let Some(early) = intended.checked_sub(TIMER_TICK)
                    && early > Instant::now()
                {
                    tokio::time::sleep_until(early.into()).await;
                }
                while Instant::now() < intended {
                    tokio::task::yield_now().await;
                }
            } else {
                tokio::time::sleep_until(intended.into()).await;
            }
            since_yield = 0;
        } else {
            // Behind schedule: dispatch without sleeping, but let the
            // spawned requests run now and then.
            since_yield += 1;
            if since_yield >= 64 {
                tokio::task::yield_now().await;
                since_yield = 0;
            }
        }
        ctx.lag
            .borrow_mut()
            .record(Instant::now().saturating_duration_since(intended));
        if ctx.in_flight.get() >= ctx.in_flight_max {
            ctx.dropped.set(ctx.dropped.get() + 1);
            continue;
        }
        // Taken only now: another driver or thread may have spent the
        // budget while this one slept.
        if count_issued && !ctx.shared.try_issue() {
            break;
        }
        spawn_counted(ctx, make(i as u64, intended));
    }
}

/// Twice the resolution of tokio's timer (it rounds deadlines up to the
/// next millisecond and fires on the tick after).
const TIMER_TICK: Duration = Duration::from_millis(2);

fn spawn_counted(ctx: &Rc<Ctx>, fut: impl Future<Output = ()> + 'static) {
    ctx.in_flight.set(ctx.in_flight.get() + 1);
    let ctx = ctx.clone();
    tokio::task::spawn_local(async move {
        fut.await;
        ctx.in_flight.set(ctx.in_flight.get() - 1);
        if ctx.in_flight.get() == 0 {
            ctx.idle.notify_waiters();
        }
    });
}

/// Waits until no spawned operation is in flight.
async fn wait_idle(ctx: &Ctx) {
    loop {
        let notified = ctx.idle.notified();
        if ctx.in_flight.get() == 0 {
            return;
        }
        notified.await;
    }
}

/// Runs `make(i)` for i in 0..n with at most `concurrency` at once: closed
/// loop over a fixed amount of work.
async fn for_each_concurrent<F, Fut>(ctx: &Rc<Ctx>, n: u64, concurrency: u32, make: F)
where
    F: Fn(u64) -> Fut + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let next = Rc::new(Cell::new(0u64));
    let make = Rc::new(make);
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1).min(n.try_into().unwrap_or(u32::MAX)) {
        let (next, make, ctx) = (next.clone(), make.clone(), ctx.clone());
        workers.push(tokio::task::spawn_local(async move {
            loop {
                let i = next.get();
                if i >= n || ctx.stopped() {
                    break;
                }
                next.set(i + 1);
                make(i).await;
            }
        }));
    }
    for w in workers {
        // A worker only ends by returning; a panic in it is a bug worth
        // surfacing, not hiding.
        if let Err(e) = w.await
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

// ---------------------------------------------------------------- register

async fn register_phase(ctx: &Rc<Ctx>) -> Result<(), Broken> {
    ctx.set_phase("register");
    let plan = &ctx.plan;
    let n = plan.users.count;
    {
        // Every thread knows every user; it registers its own.
        let mut users = ctx.users.borrow_mut();
        for i in 0..n {
            let localpart = if plan.users.reuse {
                format!("{}{i}", plan.users.prefix)
            } else {
                format!("{}{:08x}_{i}", plan.users.prefix, ctx.run_id)
            };
            users.push(User {
                localpart,
                session: None,
            });
        }
        ctx.user_stats.borrow_mut().requested = ctx.own_count(u64::from(n)) as u32;
    }
    let own = ctx.own_count(u64::from(n));
    let rate = plan.users.register_rate_per_s;
    if rate > 0.0 {
        // Arrival i registers user i: each thread takes the arrivals of its
        // users, from a start common to all threads.
        let schedule = Schedule::fixed(rate, Duration::from_secs_f64(f64::from(n) / rate));
        let starts = ctx
            .shared
            .register_start
            .meet(ctx.thread, Instant::now())
            .await?;
        let start = starts.into_iter().max().unwrap_or_else(Instant::now);
        open_loop(ctx, &schedule, start, false, |i, intended| {
            register_one(ctx.clone(), i as u32, intended)
        })
        .await;
        wait_idle(ctx).await;
    } else {
        let c = ctx.clone();
        let concurrency = ctx.own_concurrency(plan.users.concurrency);
        for_each_concurrent(ctx, own, concurrency, move |k| {
            register_one(c.clone(), c.own_index(k) as u32, Instant::now())
        })
        .await;
    }
    if plan.users.login {
        let c = ctx.clone();
        let concurrency = ctx.own_concurrency(plan.users.concurrency);
        for_each_concurrent(ctx, own, concurrency, move |k| {
            login_one(c.clone(), c.own_index(k) as u32)
        })
        .await;
    }
    // Hand in this thread's sessions; take everyone else's.
    let mine: Vec<(u32, Session)> = ctx
        .users
        .borrow()
        .iter()
        .enumerate()
        .filter(|(i, _)| ctx.owns(*i as u64))
        .filter_map(|(i, u)| Some((i as u32, Session::clone(u.session.as_deref()?))))
        .collect();
    let all = ctx.shared.sessions.meet(ctx.thread, mine).await?;
    let mut users = ctx.users.borrow_mut();
    for (i, session) in all.into_iter().flatten() {
        if !ctx.owns(u64::from(i))
            && let Some(u) = users.get_mut(i as usize)
        {
            u.session = Some(Rc::new(session));
        }
    }
    Ok(())
}
async fn register_one(ctx: Rc<Ctx>, i: u32, intended: Instant) {
    let localpart = ctx.users.borrow()[i as usize].localpart.clone();
    let plan = &ctx.plan;
    let result = matrix::register(
        &ctx.pool,
        &localpart,
        &plan.users.password,
        plan.users.registration_token.as_deref(),
    )
    .await;
    let session = match result {
        Ok(s) => {
            ctx.rec
                .borrow_mut()
                .ok(Op::Register, intended, Instant::now());
            ctx.user_stats.borrow_mut().registered += 1;
            Some(s)
        }
        Err(CallError::Status {
            errcode: Some(code),
            ..
        }) if code == "M_USER_IN_USE" && plan.users.reuse => {
            let t = Instant::now();
            match matrix::login(&ctx.pool, &localpart, &plan.users.password).await {
                Ok(s) => {
                    ctx.rec.borrow_mut().ok(Op::Login, t, Instant::now());
                    ctx.user_stats.borrow_mut().existing += 1;
                    Some(s)
                }
                Err(e) => {
                    ctx.rec.borrow_mut().err(Op::Login, t, &e);
                    None
                }
            }
        }
        Err(e) => {
            ctx.rec.borrow_mut().err(Op::Register, intended, &e);
            None
        }
    };
    if session.is_none() {
        ctx.user_stats.borrow_mut().failed += 1;
    }
    ctx.users.borrow_mut()[i as usize].session = session.map(Rc::new);
}

async fn login_one(ctx: Rc<Ctx>, i: u32) {
    let (localpart, has_session) = {
        let users = ctx.users.borrow();
        (
            users[i as usize].localpart.clone(),
            users[i as usize].session.is_some(),
        )
    };
    if !has_session {
        return;
    }
    let t = Instant::now();
    match matrix::login(&ctx.pool, &localpart, &ctx.plan.users.password).await {
        Ok(s) => {
            ctx.rec.borrow_mut().ok(Op::Login, t, Instant::now());
            ctx.users.borrow_mut()[i as usize].session = Some(Rc::new(s));
        }
        Err(e) => ctx.rec.borrow_mut().err(Op::Login, t, &e),
    }
}

// ------------------------------------------------------------------- rooms

/// Members of ordinary room `r`: `size` consecutive users starting at
/// `r * size`, wrapping around the user list.
pub fn room_members(r: u32, size: u32, users: u32) -> Vec<u32> {
    let size = size.min(users);
    (0..size)
        .map(|k| ((u64::from(r) * u64::from(size) + u64::from(k)) % u64::from(users)) as u32)
        .collect()
}

async fn rooms_phase(ctx: &Rc<Ctx>) -> Result<(), Broken> {
    ctx.set_phase("rooms");
    let plan = &ctx.plan.rooms;
    let n = ctx.plan.users.count;
    let mut specs: Vec<Vec<u32>> = (0..plan.count)
        .map(|r| room_members(r, plan.size, n))
        .collect();
    if plan.large_room_size > 0 {
        specs.push((0..plan.large_room_size.min(n)).collect());
    }
    // Only users that have a session can take part. Every thread holds the
    // same sessions, so every thread computes the same rooms and pairs.
    for members in &mut specs {
        members.retain(|u| ctx.session(*u).is_some());
    }
    specs.retain(|m| !m.is_empty());
    *ctx.rooms.borrow_mut() = specs
        .into_iter()
        .map(|members| Room {
            id: String::new(),
            members,
            syncing: 0,
            last_event: None,
        })
        .collect();
    let count = ctx.rooms.borrow().len() as u64;
    let concurrency = ctx.own_concurrency(plan.concurrency);

    let c = ctx.clone();
    for_each_concurrent(ctx, ctx.own_count(count), concurrency, move |k| {
        create_one(c.clone(), c.own_index(k) as usize)
    })
    .await;
    let mine: Vec<(usize, String)> = ctx
        .rooms
        .borrow()
        .iter()
        .enumerate()
        .filter(|(r, room)| ctx.owns(*r as u64) && !room.id.is_empty())
        .map(|(r, room)| (r, room.id.clone()))
        .collect();
    let created = ctx.shared.created.meet(ctx.thread, mine).await?;
    {
        let mut rooms = ctx.rooms.borrow_mut();
        for (r, id) in created.into_iter().flatten() {
            if let Some(room) = rooms.get_mut(r) {
                room.id = id;
            }
        }
        rooms.retain(|r| !r.id.is_empty());
    }

    // Every (room, member) pair except the creator joins.
    let pairs: Rc<Vec<(usize, u32)>> = Rc::new(
        ctx.rooms
            .borrow()
            .iter()
            .enumerate()
            .flat_map(|(r, room)| room.members.iter().skip(1).map(move |u| (r, *u)))
            .collect(),
    );
    let joined = Rc::new(RefCell::new(vec![true; pairs.len()]));
    let (c, p, j) = (ctx.clone(), pairs.clone(), joined.clone());
    let own_pairs = ctx.own_count(pairs.len() as u64);
    for_each_concurrent(ctx, own_pairs, concurrency, move |k| {
        let i = c.own_index(k) as usize;
        join_one(c.clone(), p[i], j.clone(), i)
    })
    .await;
    let mine: Vec<usize> = joined
        .borrow()
        .iter()
        .enumerate()
        .filter(|(i, ok)| ctx.owns(*i as u64) && !**ok)
        .map(|(i, _)| i)
        .collect();
    let failed = ctx.shared.failed_joins.meet(ctx.thread, mine).await?;
    // Members whose join failed do not receive anything: drop them so the
    // expected delivery counts stay exact.
    let mut rooms = ctx.rooms.borrow_mut();
    for i in failed.into_iter().flatten() {
        if let Some((r, u)) = pairs.get(i) {
            rooms[*r].members.retain(|m| m != u);
        }
    }
    Ok(())
}

async fn create_one(ctx: Rc<Ctx>, r: usize) {
    let creator = ctx.rooms.borrow()[r].members[0];
    let Some(session) = ctx.session(creator) else {
        return;
    };
    let t = Instant::now();
    let name = format!("loadtest {:08x} room {r}", ctx.run_id);
    match matrix::create_room(&ctx.pool, &session, &name).await {
        Ok(id) => {
            ctx.rec.borrow_mut().ok(Op::CreateRoom, t, Instant::now());
            ctx.rooms.borrow_mut()[r].id = id;
            ctx.room_stats.borrow_mut().created += 1;
        }
        Err(e) => {
            ctx.rec.borrow_mut().err(Op::CreateRoom, t, &e);
            ctx.room_stats.borrow_mut().failed_creates += 1;
        }
    }
}

async fn join_one(ctx: Rc<Ctx>, (r, u): (usize, u32), joined: Rc<RefCell<Vec<bool>>>, i: usize) {
    let room_id = ctx.rooms.borrow()[r].id.clone();
    let Some(session) = ctx.session(u) else {
        return;
    };
    let t = Instant::now();
    match matrix::join(&ctx.pool, &session, &room_id).await {
        Ok(()) => {
            ctx.rec.borrow_mut().ok(Op::Join, t, Instant::now());
            ctx.room_stats.borrow_mut().joins += 1;
        }
        Err(e) => {
            ctx.rec.borrow_mut().err(Op::Join, t, &e);
            ctx.room_stats.borrow_mut().failed_joins += 1;
            joined.borrow_mut()[i] = false;
        }
    }
}

// -------------------------------------------------------------------- sync

fn pick_sync_users(ctx: &Ctx) {
    let limit = match ctx.plan.sync.users {
        0 => u32::MAX,
        n => n,
    };
    let users = ctx.users.borrow();
    let mut syncing = vec![false; users.len()];
    let mut picked = 0;
    for (i, u) in users.iter().enumerate() {
        if picked >= limit {
            break;
        }
        if u.session.is_some() {
            syncing[i] = true;
            picked += 1;
        }
    }
    let mut rooms = ctx.rooms.borrow_mut();
    for room in rooms.iter_mut() {
        room.syncing = room
            .members
            .iter()
            .filter(|m| syncing[**m as usize])
            .count() as u32;
    }
    *ctx.syncing.borrow_mut() = syncing;
}

/// Initial syncs of all syncing users; their `next_batch` tokens.
/// Initial syncs of this thread's syncing users; their `next_batch` tokens.
async fn initial_sync_phase(ctx: &Rc<Ctx>) -> Vec<(u32, String)> {
    ctx.set_phase("initial_sync");
    let ids: Rc<Vec<u32>> = Rc::new(
        ctx.syncing
            .borrow()
            .iter()
            .enumerate()
            .filter(|(i, s)| **s && ctx.owns(*i as u64))
            .map(|(i, _)| i as u32)
            .collect(),
    );
    let tokens = Rc::new(RefCell::new(Vec::new()));
    let (c, ids2, tok) = (ctx.clone(), ids.clone(), tokens.clone());
    for_each_concurrent(
        ctx,
        ids.len() as u64,
        ctx.own_concurrency(ctx.plan.sync.initial_concurrency),
        move |i| {
            let (c, tok, u) = (c.clone(), tok.clone(), ids2[i as usize]);
            async move {
                let Some(session) = c.session(u) else { return };
                let t = Instant::now();
                let request_timeout = secs(c.plan.limits.request_timeout_s);
                match matrix::sync(&c.sync_pool, &session, None, 0, request_timeout).await {
                    Ok(r) => {
                        c.rec.borrow_mut().ok(Op::InitialSync, t, Instant::now());
                        tok.borrow_mut().push((u, r.next_batch));
                    }
                    Err(e) => c.rec.borrow_mut().err(Op::InitialSync, t, &e),
                }
            }
        },
    )
    .await;
    tokens.take()
}

/// One syncing user's loop (see `syncloop.rs` for the pipelining).
async fn sync_loop(ctx: Rc<Ctx>, user: u32, since: String) {
    let Some(session) = ctx.session(user) else {
        return;
    };
    let timeout_ms = ctx.plan.sync.timeout_ms;
    let pipelined = ctx.plan.sync.pipelined;
    let client = LoopClient {
        request_timeout: Duration::from_millis(timeout_ms)
            + secs(ctx.plan.limits.request_timeout_s),
        timeout_ms,
        elsewhere: vec![Vec::new(); ctx.threads],
        ctx,
        session,
    };
    syncloop::drive(client, since, pipelined).await;
}

/// A sync loop's requests and its accounting of deliveries.
struct LoopClient {
    ctx: Rc<Ctx>,
    session: Rc<Session>,
    timeout_ms: u64,
    request_timeout: Duration,
    /// Arrivals of other threads' messages, per thread, handed over after
    /// each response.
    elsewhere: Vec<Vec<Arrival>>,
}

impl SyncClient for LoopClient {
    fn request(&mut self, since: &str) -> SyncRequest {
        let (ctx, session, since) = (self.ctx.clone(), self.session.clone(), since.to_owned());
        let (timeout_ms, request_timeout) = (self.timeout_ms, self.request_timeout);
        Box::pin(async move {
            matrix::sync_raw(
                &ctx.sync_pool,
                &session,
                Some(&since),
                timeout_ms,
                request_timeout,
            )
            .await
        })
    }

    async fn received(&mut self, sent: Instant, resp: Response) {
        let ctx = &self.ctx;
        // Arrivals count from when the bytes came in, not from now.
        let now = resp.received_at;
        let resp = match SyncResponse::decode(&resp) {
            Ok(parsed) => parsed,
            Err(e) => {
                self.failed(sent, e);
                return;
            }
        };
        let mut ours = 0u32;
        {
            let mut deliveries = ctx.deliveries.borrow_mut();
            let mut rec = ctx.rec.borrow_mut();
            for (_room, sender, marker) in resp.markers() {
                // A sender's own sync also returns its message; only
                // other members are receivers.
                if marker.run != ctx.run_id || sender == self.session.user_id {
                    continue;
                }
                // The message's sender's thread tracks it.
                let tracker = owner(marker.seq, ctx.threads);
                if tracker == ctx.thread {
                    deliveries.arrived(marker.seq, now, &mut rec);
                    ours += 1;
                } else if let Some(batch) = self.elsewhere.get_mut(tracker) {
                    batch.push((marker.seq, now));
                }
            }
            if resp.event_count() > 0 {
                rec.ok(Op::Sync, sent, now);
            }
            deliveries.limited(resp.limited_timelines());
            if ours > 0 && deliveries.outstanding() == 0 {
                ctx.delivered.notify_waiters();
            }
        }
        for (tracker, batch) in self.elsewhere.iter_mut().enumerate() {
            if !batch.is_empty() {
                // Waits while that thread's queue is full. An error means
                // it has finished: the run is over for it.
                let _ = ctx.shared.arrivals[tracker]
                    .send(std::mem::take(batch))
                    .await;
            }
        }
    }

    fn failed(&mut self, sent: Instant, error: CallError) {
        self.ctx.rec.borrow_mut().err(Op::Sync, sent, &error);
    }
}

/// Records the arrivals of this thread's messages that sync loops of other
/// threads saw (threads > 1 only).
async fn receive_arrivals(ctx: Rc<Ctx>, mut queue: mpsc::Receiver<Vec<Arrival>>) {
    while let Some(batch) = queue.recv().await {
        let mut deliveries = ctx.deliveries.borrow_mut();
        let mut rec = ctx.rec.borrow_mut();
        for (seq, at) in batch {
            deliveries.arrived(seq, at, &mut rec);
        }
        if deliveries.outstanding() == 0 {
            ctx.delivered.notify_waiters();
        }
    }
}

// -------------------------------------------------------------------- load

async fn load_phase(
    ctx: &Rc<Ctx>,
    since: Vec<(u32, String)>,
    arrivals: mpsc::Receiver<Vec<Arrival>>,
) -> Result<(), Broken> {
    ctx.set_phase("load");
    let plan = &ctx.plan;
    // One start for all threads, so that together they follow each
    // schedule exactly; and the number of sync loops over all threads.
    let met = ctx
        .shared
        .load_start
        .meet(ctx.thread, (Instant::now(), since.len()))
        .await?;
    let start = met
        .iter()
        .map(|(t, _)| *t)
        .max()
        .unwrap_or_else(Instant::now);
    ctx.sync_loops.set(met.iter().map(|(_, n)| n).sum());
    let warmup = plan.warmup();
    ctx.rec.borrow_mut().measure_from(start + warmup);
    let receiver = (ctx.threads > 1)
        .then(|| tokio::task::spawn_local(receive_arrivals(ctx.clone(), arrivals)));
    let syncs: Vec<_> = since
        .into_iter()
        .map(|(u, token)| tokio::task::spawn_local(sync_loop(ctx.clone(), u, token)))
        .collect();

    let load_end = start + plan.load_duration();
    match plan.load.mode {
        Mode::Open => {
            let mut drivers = Vec::new();
            if plan.has(Scenario::Send) {
                let (c, schedule) = (ctx.clone(), plan.send_schedule());
                drivers.push(tokio::task::spawn_local(async move {
                    let c2 = c.clone();
                    open_loop(&c, &schedule, start, true, move |_, t| {
                        send_one(c2.clone(), t)
                    })
                    .await;
                }));
            }
            if plan.has(Scenario::Mixed) {
                let c = ctx.clone();
                let schedule = Schedule::fixed(plan.mixed.rate_per_s, plan.load_duration());
                drivers.push(tokio::task::spawn_local(async move {
                    let c2 = c.clone();
                    open_loop(&c, &schedule, start, true, move |_, t| {
                        mixed_one(c2.clone(), t)
                    })
                    .await;
                }));
            }
            for d in drivers {
                let _ = d.await;
            }
        }
        Mode::Closed => {
            // The workers are divided over the threads; a thread may have
            // none (then it only syncs).
            let own = share(
                u64::from(plan.load.concurrency.max(1)),
                ctx.threads,
                ctx.thread,
            );
            let workers: Vec<_> = (0..own)
                .map(|_| {
                    let c = ctx.clone();
                    tokio::task::spawn_local(async move {
                        while Instant::now() < load_end && !c.stopped() && c.shared.try_issue() {
                            let t = Instant::now();
                            if c.plan.has(Scenario::Mixed) {
                                mixed_one(c.clone(), t).await;
                            } else if c.plan.has(Scenario::Send) {
                                send_one(c.clone(), t).await;
                            } else {
                                // Sync alone has nothing to drive.
                                tokio::time::sleep_until(load_end.into()).await;
                            }
                        }
                    })
                })
                .collect();
            for w in workers {
                let _ = w.await;
            }
        }
    }
    // With nothing to send, `sync` alone still runs for the load duration.
    if !ctx.stopped() && Instant::now() < load_end {
        tokio::select! {
            _ = tokio::time::sleep_until(load_end.into()) => {}
            _ = wait_stop(ctx) => {}
        }
    }
    // Let in-flight requests finish (each is bounded by the request timeout).
    wait_idle(ctx).await;

    ctx.set_phase("drain");
    let drain_end = Instant::now() + secs(plan.load.drain_s);
    loop {
        let notified = ctx.delivered.notified();
        if ctx.deliveries.borrow().outstanding() == 0 || ctx.sync_loops.get() == 0 || ctx.stopped()
        {
            break;
        }
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep_until(drain_end.into()) => break,
        }
    }
    // This thread's sync loops receive other threads' messages, and its
    // messages reach sync loops elsewhere: everything keeps running until
    // every thread has drained.
    let drained = ctx.shared.drained.meet(ctx.thread, ()).await;
    for s in syncs {
        s.abort();
    }
    if let Some(r) = receiver {
        r.abort();
    }
    drained.map(|_| ())
}

async fn wait_stop(ctx: &Ctx) {
    // Polled: only used to cut a sync-only load phase short on Ctrl-C.
    while !ctx.stopped() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
/// Chooses a room with members and a sender in it.
fn pick_room_and_member(ctx: &Ctx) -> Option<(usize, u32)> {
    let rooms = ctx.rooms.borrow();
    if rooms.is_empty() {
        return None;
    }
    let mut rng = ctx.rng.borrow_mut();
    let r = rng.below(rooms.len() as u64) as usize;
    let members = &rooms[r].members;
    let u = members[rng.below(members.len() as u64) as usize];
    Some((r, u))
}

async fn send_one(ctx: Rc<Ctx>, intended: Instant) {
    let Some((r, sender)) = pick_room_and_member(&ctx) else {
        return;
    };
    let Some(session) = ctx.session(sender) else {
        return;
    };
    // Unique over all threads, and tracked by this one (`split::owner`).
    let number = ctx.seq.get();
    ctx.seq.set(number + 1);
    let seq = ctx.own_index(number);
    let (room_id, receivers) = {
        let rooms = ctx.rooms.borrow();
        let sender_syncs = ctx
            .syncing
            .borrow()
            .get(sender as usize)
            .copied()
            .unwrap_or(false);
        (
            rooms[r].id.clone(),
            rooms[r].syncing - u32::from(sender_syncs),
        )
    };
    let t_us = intended
        .saturating_duration_since(ctx.rec.borrow().start())
        .as_micros() as u64;
    let marker = Marker {
        run: ctx.run_id,
        seq,
        t_us,
    };
    let mut content = matrix::marked_message(marker);
    if ctx.plan.send.body_bytes > 0 {
        content["padding"] =
            serde_json::Value::String("x".repeat(ctx.plan.send.body_bytes as usize));
    }
    let measured = ctx.rec.borrow().is_measured(intended);
    // Registered before sending: the event may reach a sync before the
    // send response reaches us.
    ctx.deliveries
        .borrow_mut()
        .expect(seq, intended, receivers, measured);
    let txn = format!("lt{:08x}-{seq}", ctx.run_id);
    match matrix::send_message(&ctx.pool, &session, &room_id, &txn, &content).await {
        Ok(event_id) => {
            ctx.rec.borrow_mut().ok(Op::Send, intended, Instant::now());
            ctx.rooms.borrow_mut()[r].last_event = Some(event_id);
        }
        Err(e) => {
            ctx.rec.borrow_mut().err(Op::Send, intended, &e);
            ctx.deliveries.borrow_mut().cancel(seq);
            if ctx.deliveries.borrow().outstanding() == 0 {
                ctx.delivered.notify_waiters();
            }
        }
    }
}

async fn mixed_one(ctx: Rc<Ctx>, intended: Instant) {
    let m = &ctx.plan.mixed;
    let weights = [m.send, m.typing, m.receipt, m.profile, m.messages];
    let action = ctx.rng.borrow_mut().weighted(&weights);
    let Some((r, user)) = pick_room_and_member(&ctx) else {
        return;
    };
    let Some(session) = ctx.session(user) else {
        return;
    };
    let (room_id, last_event) = {
        let rooms = ctx.rooms.borrow();
        (rooms[r].id.clone(), rooms[r].last_event.clone())
    };
    let (op, result) = match action {
        Some(0) => return send_one(ctx, intended).await,
        Some(1) => (
            Op::Typing,
            matrix::typing(&ctx.pool, &session, &room_id).await,
        ),
        Some(2) => match last_event {
            Some(ev) => (
                Op::Receipt,
                matrix::receipt(&ctx.pool, &session, &room_id, &ev).await,
            ),
            // Nothing to acknowledge yet: read the room's history instead.
            None => (
                Op::Messages,
                matrix::messages(&ctx.pool, &session, &room_id, 20)
                    .await
                    .map(|_| ()),
            ),
        },
        Some(3) => {
            let other = {
                let rooms = ctx.rooms.borrow();
                let members = &rooms[r].members;
                members[ctx.rng.borrow_mut().below(members.len() as u64) as usize]
            };
            let user_id = ctx
                .session(other)
                .map_or_else(|| session.user_id.clone(), |s| s.user_id.clone());
            (
                Op::Profile,
                matrix::profile(&ctx.pool, &session, &user_id).await,
            )
        }
        _ => (
            Op::Messages,
            matrix::messages(&ctx.pool, &session, &room_id, 20)
                .await
                .map(|_| ()),
        ),
    };
    match result {
        Ok(()) => ctx.rec.borrow_mut().ok(op, intended, Instant::now()),
        Err(e) => ctx.rec.borrow_mut().err(op, intended, &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_members_spread_evenly() {
        // 10 users, 5 rooms of 4: every user is in exactly 2 rooms.
        let mut per_user = [0u32; 10];
        for r in 0..5 {
            let m = room_members(r, 4, 10);
            assert_eq!(m.len(), 4);
            let mut sorted = m.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), 4, "no duplicate members in room {r}");
            for u in m {
                per_user[u as usize] += 1;
            }
        }
        assert_eq!(per_user, [2; 10]);
        // A room larger than the user list holds everyone once.
        assert_eq!(room_members(3, 50, 4).len(), 4);
    }
}
