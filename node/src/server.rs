//! The node runtime: one glommio executor per shard, each accepting on the
//! same port (SO_REUSEPORT) and serving HTTP/1.1 with hyper; the channel mesh
//! between shards; signal handling and clean shutdown.
//!
//! **Invariant**: nothing here blocks a shard thread except storage calls,
//! which are short and bounded.

use std::cell::RefCell;
use std::os::fd::FromRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use futures_lite::{AsyncRead, AsyncWrite, FutureExt};
use glommio::channels::channel_mesh::MeshBuilder;
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};
use hyper::service::service_fn;
use ruma::OwnedServerName;
use tessera_shared::ring::Ring;

use crate::config::Config;
use crate::db::Db;
use crate::shard::{Notifier, Shard, ShardMetrics, ShardMsg};
use crate::storage::Store;
use crate::storage::cql::Cql;
use crate::storage::embedded::Embedded;

/// Virtual nodes per shard on the ring.
const RING_VNODES: u32 = 64;

/// Adapts a glommio TCP stream to hyper's I/O traits.
///
/// hyper hands `poll_read` uninitialised buffer space, which must be zeroed
/// before it can be read into. Only `read_cap` bytes are offered per read:
/// it starts at [`READ_CAP_MIN`] (a request line and headers), doubles
/// while reads fill it (a large body), up to [`READ_CAP_MAX`], and falls
/// back once they do not, so a keep-alive connection of small requests
/// does not zero hyper's whole buffer on every read.
struct HyperIo {
    stream: TcpStream,
    read_cap: usize,
}

const READ_CAP_MIN: usize = 2 << 10;
const READ_CAP_MAX: usize = 256 << 10;

impl HyperIo {
    fn new(stream: TcpStream) -> HyperIo {
        HyperIo { stream, read_cap: READ_CAP_MIN }
    }
}

impl hyper::rt::Read for HyperIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, mut buf: hyper::rt::ReadBufCursor<'_>) -> Poll<std::io::Result<()>> {
        let cap = self.read_cap;
        // SAFETY: the first `len` bytes of the unfilled space are zeroed
        // before they are handed out as initialised, and the cursor is
        // advanced by exactly the number of bytes the read wrote.
        let slice = unsafe {
            let uninit = buf.as_mut();
            let len = uninit.len().min(cap);
            std::ptr::write_bytes(uninit.as_mut_ptr(), 0, len);
            std::slice::from_raw_parts_mut(uninit.as_mut_ptr().cast::<u8>(), len)
        };
        let offered = slice.len();
        match Pin::new(&mut self.stream).poll_read(cx, slice) {
            Poll::Ready(Ok(n)) => {
                self.read_cap = if n == offered { (cap * 2).min(READ_CAP_MAX) } else if n < cap / 2 { (cap / 2).max(READ_CAP_MIN) } else { cap };
                // SAFETY: `n` bytes were initialised by the read above.
                unsafe { buf.advance(n) };
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl hyper::rt::Write for HyperIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_close(cx)
    }
}

/// Opens the configured storage backend; the CQL backend connects and
/// applies its schema migrations.
pub fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let store: Arc<dyn Store> = if config.storage.backend == "scylla" {
        let cql = &config.storage.scylla;
        Arc::new(Cql::connect(cql).with_context(|| format!("opening the CQL store (keyspace {} at {})", cql.keyspace, cql.contact_points.join(", ")))?)
    } else {
        let dir = config.data_dir.join("store");
        Arc::new(
            Embedded::open(&dir, config.storage.durability, config.storage.cache_mib << 20, config.storage.memtable_mib << 20)
                .with_context(|| format!("opening embedded store at {}", dir.display()))?,
        )
    };
    Db::new(store.clone()).upgrade_layout().context("upgrading the stored data layout")?;
    Ok(store)
}

/// `tessera-node migrate`: brings the configured store's schema up to date
/// (opening a store applies its migrations) and returns.
pub fn migrate(config: &Config) -> anyhow::Result<()> {
    let store = open_store(config)?;
    store.flush().context("flushing storage")?;
    Ok(())
}

/// Meta key: the shard count the stream heads were last laid out for.
const SHARD_COUNT_KEY: &str = "shard_count";

/// Each shard's stream head at start.
///
/// A room's events take positions from its owner shard's stream, and a
/// room's timeline is ordered by them. When the shard count changes, rooms
/// move to other owners; every head is then raised to the highest head of
/// any earlier shard (and persisted before anything is written), so a
/// moved room's next position is above all its earlier ones.
fn stream_heads(db: &Db, count: u16) -> anyhow::Result<Vec<u64>> {
    let previous = db.meta(SHARD_COUNT_KEY)?.and_then(|v| v.as_u64()).and_then(|n| u16::try_from(n).ok()).unwrap_or(count);
    let mut heads = (0..count).map(|s| db.stream_head(s)).collect::<Result<Vec<u64>, _>>()?;
    if previous != count {
        let mut floor = heads.iter().copied().max().unwrap_or(0);
        for s in count..previous {
            floor = floor.max(db.stream_head(s)?);
        }
        tracing::info!(previous, count, floor, "shard count changed: every stream continues above the highest earlier position");
        heads = vec![floor; usize::from(count)];
        db.store.write((0..count).map(|s| Db::stream_head_write(s, floor)).collect())?;
    }
    db.store.write(vec![crate::storage::Write::put(crate::storage::Table::Meta, SHARD_COUNT_KEY.as_bytes().to_vec(), b"".to_vec(), crate::db::encode(&count))])?;
    // Device-list change rows up to these positions may predate buckets.
    let mut floors = heads.clone();
    for s in count..previous {
        floors.push(db.stream_head(s)?);
    }
    db.record_key_change_floors(&floors)?;
    Ok(heads)
}

/// How long a listener found on the address may take to go away before
/// the node gives up: a process killed with SIGKILL leaves its io_uring
/// requests holding the listening socket until the kernel tears the ring
/// down, moments after the process is gone.
const ADDRESS_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Fails when another process listens on `address` (and goes on doing so
/// for [`ADDRESS_WAIT`]).
///
/// The shards bind with SO_REUSEPORT, which the kernel grants to any process
/// of the same user: a second node started on a taken port would bind too
/// and silently receive part of the connections (requests with tokens and
/// rooms it has never heard of). The kernel's table of listening sockets
/// tells before anything starts. (A plain test bind would also fail on the
/// TIME_WAIT remains of the last run's connections.) Two nodes starting in
/// the same instant can still both pass; this guards against the usual
/// case, an old process still running.
fn ensure_unclaimed(key: &str, address: std::net::SocketAddr) -> anyhow::Result<()> {
    let table = if address.is_ipv4() { "/proc/net/tcp" } else { "/proc/net/tcp6" };
    let deadline = std::time::Instant::now() + ADDRESS_WAIT;
    loop {
        match std::fs::read_to_string(table) {
            Ok(text) if tessera_shared::listeners::holds(&text, tessera_shared::listeners::Kind::TcpListener, address) => {
                if std::time::Instant::now() >= deadline {
                    anyhow::bail!("{key} {address} is already in use by another process (is another node running?)");
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Ok(_) => return Ok(()),
            Err(e) => {
                tracing::warn!(table, error = %e, "cannot check for another process on the listen address");
                return Ok(());
            }
        }
    }
}

/// The CPUs this process may run on (its affinity mask), in order.
fn allowed_cpus() -> anyhow::Result<Vec<usize>> {
    // SAFETY: `set` is a plain bit mask the call fills in; its size is
    // passed with it.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &raw mut set) != 0 {
            return Err(std::io::Error::last_os_error()).context("reading the CPU affinity of the node");
        }
        set
    };
    // SAFETY: CPU_ISSET reads one bit of the mask, for indexes below its size.
    Ok((0..libc::CPU_SETSIZE as usize).filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) }).collect())
}

/// Runs the node until SIGTERM or SIGINT.
pub fn run(config: Config) -> anyhow::Result<()> {
    ensure_unclaimed("listen.address", config.listen.address)?;
    // The metrics listener is bound here, once and exclusively (no
    // SO_REUSEPORT), so a port another process holds fails the start.
    let mut metrics_listener = match config.metrics.listen {
        Some(address) => {
            ensure_unclaimed("metrics.listen", address)?;
            Some(std::net::TcpListener::bind(address).with_context(|| format!("binding metrics.listen {address}"))?)
        }
        None => None,
    };
    let config = Arc::new(config);
    let store_stats = Arc::new(crate::metrics::StoreStats::default());
    let store: Arc<dyn Store> = Arc::new(crate::metrics::Instrumented::new(open_store(&config)?, store_stats.clone()));
    let key = Arc::new(crate::keys::load_or_create(&config.data_dir)?);
    let server_name: OwnedServerName = config.server_name.as_str().try_into().context("server_name")?;
    let count = config.shard_count();
    let count_u16 = u16::try_from(count).context("too many shards")?;
    let ring = Ring::single_node(count_u16, RING_VNODES)?;
    let db = Db::new(store.clone());
    let heads = stream_heads(&db, count_u16)?;
    let metrics: Arc<Vec<ShardMetrics>> = Arc::new((0..count).map(|_| ShardMetrics::default()).collect());
    let redactions = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let push_rule_changes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let hints = || -> Arc<Vec<std::sync::atomic::AtomicU64>> { Arc::new(heads.iter().map(|h| std::sync::atomic::AtomicU64::new(*h)).collect()) };
    let (user_writes, presence_writes, announced) = (hints(), hints(), hints());
    let mesh = MeshBuilder::<ShardMsg, _>::full(count, config.runtime.mesh_channel_depth);
    let cpus = if config.runtime.pin_shards {
        let cpus = allowed_cpus()?;
        anyhow::ensure!(count <= cpus.len(), "runtime.pin_shards: {count} shards, but the node may run on {} CPUs only", cpus.len());
        Some(cpus)
    } else {
        None
    };

    let mut shutdown_txs = Vec::new();
    let mut handles = Vec::new();
    for id in 0..count {
        let (tx, rx) = flume::bounded::<()>(1);
        shutdown_txs.push(tx);
        let (config, db, key, server_name, ring, metrics, mesh, heads, redactions, push_rule_changes, user_writes, presence_writes) = (
            config.clone(),
            db.clone(),
            key.clone(),
            server_name.clone(),
            ring.clone(),
            metrics.clone(),
            mesh.clone(),
            heads.clone(),
            redactions.clone(),
            push_rule_changes.clone(),
            user_writes.clone(),
            presence_writes.clone(),
        );
        let store_stats = store_stats.clone();
        let announced = announced.clone();
        let metrics_listener = if id == 0 { metrics_listener.take() } else { None };
        let placement = match cpus.as_deref() {
            Some(cpus) => Placement::Fixed(cpus[id]),
            None => Placement::Unbound,
        };
        let handle = LocalExecutorBuilder::new(placement)
            .name(&format!("shard-{id}"))
            .io_memory(config.runtime.io_memory_kib << 10)
            .spin_before_park(std::time::Duration::from_micros(config.runtime.spin_before_park_us))
            .spawn(move || async move {
                let senders_receivers = if count > 1 { Some(mesh.join().await) } else { None };
                let (mesh_senders, receivers) = match senders_receivers {
                    Some(Ok((s, r))) => (Some(Rc::new(s)), Some(r)),
                    Some(Err(e)) => return Err(anyhow::anyhow!("shard {id}: joining the channel mesh failed: {e}")),
                    None => (None, None),
                };
                let rendered = RefCell::new(crate::pdu::RenderCache::new(config.runtime.event_cache_kib << 10));
                let shard = Rc::new(Shard {
                    id,
                    count,
                    limiter: crate::ratelimit::RateLimiter::new(config.rate_limits.clone()),
                    config,
                    db,
                    key,
                    server_name,
                    ring,
                    metrics,
                    store_stats,
                    mesh: mesh_senders,
                    heads: RefCell::new(heads),
                    notifier: Rc::new(Notifier::default()),
                    rooms: Default::default(),
                    typing: Default::default(),
                    shutting_down: Default::default(),
                    rendered,
                    redactions,
                    redactions_seen: Default::default(),
                    push_rule_changes,
                    push_rule_changes_seen: Default::default(),
                    push_rules: Default::default(),
                    neutral_rules: Default::default(),
                    ignored_seen: Default::default(),
                    ignored: Default::default(),
                    ignorers: Default::default(),
                    presence_sent: Default::default(),
                    presence_active_sent: Default::default(),
                    last_create_ts: Default::default(),
                    presence_seen: Default::default(),
                    user_writes,
                    presence_writes,
                    filters: Default::default(),
                    head_waiters: Default::default(),
                    announced,
                    empty_inboxes: Default::default(),
                    key_counts: Default::default(),
                    room_activity: Default::default(),
                    member_lists: Default::default(),
                    overflow: (0..count).map(|_| Rc::default()).collect(),
                    auth_cache: Default::default(),
                    user_rooms: Default::default(),
                    room_reads: Default::default(),
                    unread: Default::default(),
                });
                shard_main(shard, receivers, rx, metrics_listener).await
            })
            .map_err(|e| anyhow::anyhow!("starting shard {id}: {e} (glommio needs locked memory: run as root, raise LimitMEMLOCK or lower runtime.io_memory_kib)"))?;
        handles.push(handle);
    }

    // Signals arrive on a plain thread and are forwarded to every shard.
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT])?;
    let signal_handle = signals.handle();
    let signal_thread = std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            tracing::info!("shutdown requested");
            for tx in &shutdown_txs {
                let _ = tx.try_send(());
            }
        }
    });

    let mut result = Ok(());
    for (id, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(e) => result = Err(anyhow::anyhow!("shard {id} failed: {e}")),
        }
    }
    signal_handle.close();
    let _ = signal_thread.join();
    store.flush().context("flushing storage")?;
    tracing::info!("stopped");
    result
}

async fn shard_main(shard: Rc<Shard>, receivers: Option<glommio::channels::channel_mesh::Receivers<ShardMsg>>, shutdown: flume::Receiver<()>, metrics_listener: Option<std::net::TcpListener>) -> anyhow::Result<()> {
    if let Some(mut receivers) = receivers {
        for (_, rx) in receivers.streams() {
            let shard = shard.clone();
            glommio::spawn_local(async move {
                while let Some(msg) = rx.recv().await {
                    shard.receive(msg);
                }
            })
            .detach();
        }
    }
    match crate::presence::restore(&shard) {
        Ok(0) => {}
        Ok(n) => tracing::info!(shard = shard.id, users = n, "presence: tracking users left online by the last run"),
        Err(e) => tracing::warn!(shard = shard.id, error = %e.message, "presence: users left online by the last run not read"),
    }
    let sweeper = glommio::spawn_local(crate::presence::sweeper(shard.clone()));
    let metrics_listener = metrics_listener.map(|listener| {
        tracing::info!(address = ?listener.local_addr().ok(), "serving metrics");
        // SAFETY: the descriptor is a bound, listening TCP socket whose
        // ownership moves to the glommio listener.
        let listener = unsafe { TcpListener::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(listener)) };
        glommio::spawn_local(serve_metrics(shard.clone(), listener))
    });
    if shard.id == 0 && shard.config.metrics.on_client_listener && !shard.config.listen.address.ip().is_loopback() {
        tracing::warn!(address = %shard.config.listen.address, "metrics are served on a listener that is not loopback-only; set metrics.on_client_listener = false (and metrics.listen) unless a proxy in front keeps /metrics private");
    }
    let listener = TcpListener::bind(shard.config.listen.address).map_err(|e| anyhow::anyhow!("binding {}: {e}", shard.config.listen.address))?;
    if shard.id == 0 {
        tracing::info!(address = %shard.config.listen.address, shards = shard.count, server_name = %shard.server_name, "listening");
    }
    let open = Rc::new(std::cell::Cell::new(0usize));
    let (stop_tx, stop_rx) = flume::bounded::<()>(1);
    let accept = async {
        loop {
            let stream = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            if open.get() >= shard.config.limits.connections_per_shard_max {
                shard.metrics().connections_refused.fetch_add(1, Ordering::Relaxed);
                drop(stream);
                continue;
            }
            let _ = stream.set_nodelay(true);
            let peer = stream.peer_addr().ok();
            let shard = shard.clone();
            let open = open.clone();
            let stop = stop_rx.clone();
            open.set(open.get() + 1);
            shard.metrics().connections.fetch_add(1, Ordering::Relaxed);
            glommio::spawn_local(async move {
                let svc_shard = shard.clone();
                let service = service_fn(move |req| {
                    let shard = svc_shard.clone();
                    async move { Ok::<_, std::convert::Infallible>(crate::http::handle(shard, req, peer).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new().keep_alive(true).serve_connection(HyperIo::new(stream), service);
                let mut conn = std::pin::pin!(conn);
                let first = async { Some(conn.as_mut().await) }.or(async {
                    let _ = stop.recv_async().await;
                    None
                });
                if first.await.is_none() {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.as_mut().or(async {
                        glommio::timer::sleep(Duration::from_secs(shard.config.runtime.shutdown_grace_secs)).await;
                        Ok(())
                    })
                    .await;
                }
                open.set(open.get() - 1);
                shard.metrics().connections.fetch_sub(1, Ordering::Relaxed);
            })
            .detach();
        }
    };
    let stopped = async {
        let _ = shutdown.recv_async().await;
    };
    accept.or(stopped).await;
    // Stop accepting; wake long-polls so they answer now; let open requests finish.
    drop(listener);
    shard.shutting_down.set(true);
    shard.notifier.wake_all();
    drop(stop_tx);
    let deadline = std::time::Instant::now() + Duration::from_secs(shard.config.runtime.shutdown_grace_secs);
    while open.get() > 0 && std::time::Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    drop(sweeper);
    drop(metrics_listener);
    crate::presence::all_offline(&shard);
    Ok(())
}

/// Most connections the metrics listener keeps open at once; more are
/// closed at once.
const METRICS_CONNECTIONS_MAX: usize = 16;
/// How long a metrics connection may stay open.
const METRICS_CONNECTION_SECS: u64 = 30;

/// Serves `metrics.listen`: `GET /metrics` and nothing else, one request
/// per connection, at most [`METRICS_CONNECTIONS_MAX`] connections each
/// open at most [`METRICS_CONNECTION_SECS`].
async fn serve_metrics(shard: Rc<Shard>, listener: TcpListener) {
    let open = Rc::new(std::cell::Cell::new(0usize));
    loop {
        let stream = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if open.get() >= METRICS_CONNECTIONS_MAX {
            continue;
        }
        open.set(open.get() + 1);
        let (shard, open) = (shard.clone(), open.clone());
        glommio::spawn_local(async move {
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let shard = shard.clone();
                async move {
                    let resp = match (req.method(), req.uri().path()) {
                        (&http::Method::GET, "/metrics") => crate::api::info::metrics(&shard),
                        (_, "/metrics") => crate::http::error_response(&crate::error::ApiError::method_not_allowed()),
                        _ => crate::http::error_response(&crate::error::ApiError::unrecognized()),
                    };
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new().keep_alive(false).serve_connection(HyperIo::new(stream), service);
            let _ = async {
                let _ = conn.await;
            }
            .or(glommio::timer::sleep(Duration::from_secs(METRICS_CONNECTION_SECS)))
            .await;
            open.set(open.get() - 1);
        })
        .detach();
    }
}
