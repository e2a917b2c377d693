//! The engine: runs a [`Plan`] against a homeserver and returns a [`Report`].
//!
//! Phases, in order, each only when the plan needs it: `register` (users,
//! then one login each), `rooms` (create, then join), `initial_sync`,
//! `load` (open- or closed-loop sends and chat-like actions while every
//! syncing user long-polls `/sync`), `drain` (wait for the last deliveries),
//! then `turn`.
//!
//! Everything runs on one thread: a current-thread tokio runtime with a
//! `LocalSet`, so shared state is `Rc` + `RefCell` with no locks, and the
//! generator's CPU use is one core's. **Invariant:** no `RefCell` borrow is
//! held across an `.await`.
//!
//! Bounds: open-loop arrivals beyond `limits.max_in_flight` are dropped and
//! counted rather than queued; the load phase issues at most
//! `limits.max_requests`; every phase stops at `limits.max_run_s` or on
//! Ctrl-C, and the report is still written.

use crate::config::{Mode, Plan, Scenario, secs};
use crate::delivery::Deliveries;
use crate::hist::LatencyHist;
use crate::http::Pool;
use crate::matrix::{self, CallError, Marker, Session};
use crate::metrics::{IntervalPoint, Op, Recorder, round3};
use crate::report::{GeneratorStats, Report, RoomStats, ServerInfo, UserStats};
use crate::rng::Rng;
use crate::schedule::Schedule;
use crate::sys::{CpuTime, Machine, tree_rss_kib};
use crate::target::http_target;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

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

struct User {
    localpart: String,
    session: Option<Rc<Session>>,
}

struct Room {
    id: String,
    members: Vec<u32>,
    /// Members that run a sync loop.
    syncing: u32,
    last_event: Option<String>,
}

struct Ctx {
    plan: Plan,
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
    seq: Cell<u64>,
    in_flight: Cell<u32>,
    idle: Notify,
    issued: Cell<u64>,
    dropped: Cell<u64>,
    lag: RefCell<LatencyHist>,
    stop: Rc<Cell<bool>>,
    deadline: Instant,
    user_stats: RefCell<UserStats>,
    room_stats: RefCell<RoomStats>,
    phase: RefCell<String>,
}

impl Ctx {
    fn stopped(&self) -> bool {
        self.stop.get() || Instant::now() >= self.deadline
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
}

/// Runs the plan on a fresh single-threaded runtime.
pub fn run_blocking(plan: &Plan, opts: &RunOptions) -> anyhow::Result<Report> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, run(plan, opts))
}

/// Runs the plan; must be called inside a `LocalSet`.
pub async fn run(plan: &Plan, opts: &RunOptions) -> anyhow::Result<Report> {
    plan.validate().map_err(anyhow::Error::msg)?;
    crate::sys::raise_fd_limit();
    let start = Instant::now();
    let started_unix_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let cpu_start = CpuTime::now();
    let target = http_target(&plan.target, plan.allow_remote)?;
    let timeout = secs(plan.limits.request_timeout_s);
    let pool = Pool::new(
        target.addr,
        &target.host_header,
        plan.limits.connections as usize,
        timeout,
    )?;
    let sync_conns = if plan.sync.users == 0 {
        plan.users.count
    } else {
        plan.sync.users
    };
    let sync_pool = Pool::new(
        target.addr,
        &target.host_header,
        sync_conns as usize + 1,
        timeout,
    )?;
    let mut server = ServerInfo {
        pid: opts.server_pid,
        ..ServerInfo::default()
    };
    if plan.needs_users() {
        let (versions, header) = matrix::versions(&pool).await.map_err(|e| {
            anyhow::anyhow!(
                "{} does not answer /_matrix/client/versions: {e}",
                plan.target
            )
        })?;
        server.versions = versions;
        server.server_header = header;
    }
    let run_id = run_id();
    let ctx = Rc::new(Ctx {
        plan: plan.clone(),
        pool,
        sync_pool,
        rec: Rc::new(RefCell::new(Recorder::new(start))),
        deliveries: RefCell::new(Deliveries::new()),
        delivered: Notify::new(),
        users: RefCell::new(Vec::new()),
        rooms: RefCell::new(Vec::new()),
        syncing: RefCell::new(Vec::new()),
        rng: RefCell::new(Rng::new(plan.seed)),
        run_id,
        seq: Cell::new(0),
        in_flight: Cell::new(0),
        idle: Notify::new(),
        issued: Cell::new(0),
        dropped: Cell::new(0),
        lag: RefCell::new(LatencyHist::new()),
        stop: Rc::new(Cell::new(false)),
        deadline: start + secs(plan.limits.max_run_s),
        user_stats: RefCell::new(UserStats::default()),
        room_stats: RefCell::new(RoomStats::default()),
        phase: RefCell::new(String::new()),
    });

    let ctrl_c = {
        let ctx = ctx.clone();
        tokio::task::spawn_local(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                // First Ctrl-C: stop and still write the report.
                ctx.stop.set(true);
                eprintln!("\nstopping (Ctrl-C again to abort without a report)");
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        })
    };
    let ticker = tokio::task::spawn_local(ticker(ctx.clone(), opts.clone(), cpu_start, start));

    let mut load_cpu = None;
    if plan.needs_users() {
        register_phase(&ctx).await;
    }
    if plan.needs_users() && (plan.has(Scenario::Rooms) || plan.has_load()) {
        rooms_phase(&ctx).await;
    }
    if plan.runs_sync() || plan.has(Scenario::Sync) {
        pick_sync_users(&ctx);
    }
    let mut since = Vec::new();
    if plan.runs_sync() {
        since = initial_sync_phase(&ctx).await;
    }
    if plan.has_load() {
        let cpu0 = CpuTime::now();
        let t0 = Instant::now();
        load_phase(&ctx, since).await;
        load_cpu = Some(CpuTime::now().percent_since(&cpu0, t0.elapsed()));
    }
    if plan.has(Scenario::Turn) {
        ctx.set_phase("turn");
        turn_phase(&ctx).await?;
    }
    ctx.rec.borrow_mut().end_phase(Instant::now());
    ctrl_c.abort();
    ticker.abort();

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
    let deliveries = ctx.deliveries.borrow().finish();
    ctx.rec
        .borrow_mut()
        .err_other(Op::Delivery, "missing", deliveries.missing);

    let cpu_percent = cpu_end.percent_since(&cpu_start, wall);
    let generator = GeneratorStats {
        threads: 1,
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
        saturated: load_cpu.unwrap_or(cpu_percent) > 90.0,
        dispatch_lag: ctx.lag.borrow().summary(),
        dropped_arrivals: ctx.dropped.get(),
        requests_issued: ctx.issued.get(),
        connections_opened: ctx.pool.connections_opened() + ctx.sync_pool.connections_opened(),
        stopped_early: ctx.stop.get() || Instant::now() >= ctx.deadline,
    };
    let rec = ctx.rec.borrow();
    let user_stats = ctx.user_stats.borrow().clone();
    let room_stats = ctx.room_stats.borrow().clone();
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

async fn ticker(ctx: Rc<Ctx>, opts: RunOptions, cpu_start: CpuTime, start: Instant) {
    let mut interval = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let mut last_cpu = cpu_start;
    let mut last = start;
    let mut n = 0u64;
    loop {
        interval.tick().await;
        let now = Instant::now();
        let cpu = CpuTime::now();
        let cpu_percent = cpu.percent_since(&last_cpu, now.duration_since(last));
        (last_cpu, last) = (cpu, now);
        let rss = opts.server_pid.and_then(tree_rss_kib);
        let point = ctx.rec.borrow_mut().tick(now, cpu_percent, rss).clone();
        n += 1;
        let line = progress_line(&ctx, &point);
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

fn progress_line(ctx: &Ctx, p: &IntervalPoint) -> String {
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
    let outstanding = ctx.deliveries.borrow().outstanding();
    s.push_str(&format!(
        " in-flight {} awaiting {} cpu {:.0}%",
        ctx.in_flight.get(),
        outstanding,
        p.generator_cpu_percent
    ));
    s
}

/// Runs `make(i, intended)` for each arrival of `schedule` (offsets from
/// `start`), without waiting for earlier ones: open loop.
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
    let max_in_flight = ctx.plan.limits.max_in_flight.max(1);
    let mut since_yield = 0u32;
    for (i, offset) in schedule.arrivals().enumerate() {
        if ctx.stopped() || (count_issued && ctx.issued.get() >= ctx.plan.limits.max_requests) {
            break;
        }
        let intended = start + offset;
        if intended > Instant::now() {
            tokio::time::sleep_until(intended.into()).await;
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
        if ctx.in_flight.get() >= max_in_flight {
            ctx.dropped.set(ctx.dropped.get() + 1);
            continue;
        }
        spawn_counted(ctx, count_issued, make(i as u64, intended));
    }
}

fn spawn_counted(ctx: &Rc<Ctx>, count_issued: bool, fut: impl Future<Output = ()> + 'static) {
    ctx.in_flight.set(ctx.in_flight.get() + 1);
    if count_issued {
        ctx.issued.set(ctx.issued.get() + 1);
    }
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

async fn register_phase(ctx: &Rc<Ctx>) {
    ctx.set_phase("register");
    let plan = &ctx.plan;
    let n = plan.users.count;
    {
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
        ctx.user_stats.borrow_mut().requested = n;
    }
    let rate = plan.users.register_rate_per_s;
    if rate > 0.0 {
        let schedule = Schedule::fixed(rate, Duration::from_secs_f64(f64::from(n) / rate));
        let start = Instant::now();
        open_loop(ctx, &schedule, start, false, |i, intended| {
            register_one(ctx.clone(), i as u32, intended)
        })
        .await;
        wait_idle(ctx).await;
    } else {
        let c = ctx.clone();
        for_each_concurrent(ctx, u64::from(n), plan.users.concurrency, move |i| {
            register_one(c.clone(), i as u32, Instant::now())
        })
        .await;
    }
    if plan.users.login {
        let c = ctx.clone();
        for_each_concurrent(ctx, u64::from(n), plan.users.concurrency, move |i| {
            login_one(c.clone(), i as u32)
        })
        .await;
    }
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

async fn rooms_phase(ctx: &Rc<Ctx>) {
    ctx.set_phase("rooms");
    let plan = &ctx.plan.rooms;
    let n = ctx.plan.users.count;
    let mut specs: Vec<Vec<u32>> = (0..plan.count)
        .map(|r| room_members(r, plan.size, n))
        .collect();
    if plan.large_room_size > 0 {
        specs.push((0..plan.large_room_size.min(n)).collect());
    }
    // Only users that have a session can take part.
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

    let c = ctx.clone();
    for_each_concurrent(ctx, count, plan.concurrency, move |r| {
        create_one(c.clone(), r as usize)
    })
    .await;
    ctx.rooms.borrow_mut().retain(|r| !r.id.is_empty());

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
    for_each_concurrent(ctx, pairs.len() as u64, plan.concurrency, move |i| {
        join_one(c.clone(), p[i as usize], j.clone(), i as usize)
    })
    .await;
    // Members whose join failed do not receive anything: drop them so the
    // expected delivery counts stay exact.
    let joined = joined.borrow();
    let mut rooms = ctx.rooms.borrow_mut();
    for (i, (r, u)) in pairs.iter().enumerate() {
        if !joined[i] {
            rooms[*r].members.retain(|m| m != u);
        }
    }
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
async fn initial_sync_phase(ctx: &Rc<Ctx>) -> Vec<(u32, String)> {
    ctx.set_phase("initial_sync");
    let ids: Rc<Vec<u32>> = Rc::new(
        ctx.syncing
            .borrow()
            .iter()
            .enumerate()
            .filter(|(_, s)| **s)
            .map(|(i, _)| i as u32)
            .collect(),
    );
    let tokens = Rc::new(RefCell::new(Vec::new()));
    let (c, ids2, tok) = (ctx.clone(), ids.clone(), tokens.clone());
    for_each_concurrent(
        ctx,
        ids.len() as u64,
        ctx.plan.sync.initial_concurrency,
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

async fn sync_loop(ctx: Rc<Ctx>, user: u32, mut since: String) {
    let Some(session) = ctx.session(user) else {
        return;
    };
    let timeout_ms = ctx.plan.sync.timeout_ms;
    let request_timeout =
        Duration::from_millis(timeout_ms) + secs(ctx.plan.limits.request_timeout_s);
    let mut backoff = Duration::from_millis(50);
    loop {
        let t = Instant::now();
        match matrix::sync(
            &ctx.sync_pool,
            &session,
            Some(&since),
            timeout_ms,
            request_timeout,
        )
        .await
        {
            Ok(resp) => {
                let now = Instant::now();
                backoff = Duration::from_millis(50);
                let mut ours = 0u32;
                {
                    let mut deliveries = ctx.deliveries.borrow_mut();
                    let mut rec = ctx.rec.borrow_mut();
                    for (_room, sender, marker) in resp.markers() {
                        // A sender's own sync also returns its message; only
                        // other members are receivers.
                        if marker.run == ctx.run_id && sender != session.user_id {
                            deliveries.arrived(marker.seq, now, &mut rec);
                            ours += 1;
                        }
                    }
                    if resp.event_count() > 0 {
                        rec.ok(Op::Sync, t, now);
                    }
                    deliveries.limited(resp.limited_timelines());
                    if ours > 0 && deliveries.outstanding() == 0 {
                        ctx.delivered.notify_waiters();
                    }
                }
                since = resp.next_batch;
            }
            Err(e) => {
                ctx.rec.borrow_mut().err(Op::Sync, t, &e);
                // Back off so a failing server is not hammered in a tight loop.
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

// -------------------------------------------------------------------- load

async fn load_phase(ctx: &Rc<Ctx>, since: Vec<(u32, String)>) {
    ctx.set_phase("load");
    let plan = &ctx.plan;
    let start = Instant::now();
    let warmup = plan.warmup();
    ctx.rec.borrow_mut().measure_from(start + warmup);
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
            let workers: Vec<_> = (0..plan.load.concurrency.max(1))
                .map(|_| {
                    let c = ctx.clone();
                    tokio::task::spawn_local(async move {
                        while Instant::now() < load_end
                            && !c.stopped()
                            && c.issued.get() < c.plan.limits.max_requests
                        {
                            c.issued.set(c.issued.get() + 1);
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
        if ctx.deliveries.borrow().outstanding() == 0 || syncs.is_empty() || ctx.stopped() {
            break;
        }
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep_until(drain_end.into()) => break,
        }
    }
    for s in syncs {
        s.abort();
    }
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
    let seq = ctx.seq.get();
    ctx.seq.set(seq + 1);
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
