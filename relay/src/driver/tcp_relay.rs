//! TCP allocations (RFC 6062): relay listeners, outgoing peer connections,
//! and the pairing of a peer connection with the client data connection
//! that claims it.
//!
//! A peer connection belongs to the shard of its allocation, but the
//! ConnectionBind that claims it comes on a new client connection, which
//! the kernel may hand to any shard. So a peer connection waiting for its
//! ConnectionBind is parked in a table all shards share ([`Parking`]) as a
//! socket nobody reads: the kernel buffers what the peer sends, and its
//! receive window holds back the rest. The shard that gets the
//! ConnectionBind takes the socket out and relays between the two
//! connections itself ([`Pipe`]). The allocation's shard keeps a duplicate
//! of each socket, so that removing the allocation shuts its connections
//! down wherever they are relayed.
//!
//! Outgoing connections are made on a short-lived thread each (glommio
//! cannot connect from a chosen local address), at most
//! [`MAX_CONNECTING`] at once over all shards.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsRawFd as _, FromRawFd as _, IntoRawFd as _, OwnedFd, RawFd};
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt as _, AsyncWriteExt as _};
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::net::{TcpListener, TcpStream};

use super::{Shard, now};
use crate::metrics::DropReason;

/// Outgoing connections being made at once, all shards together.
pub const MAX_CONNECTING: usize = 256;
/// How long an outgoing connection may take (RFC 6062 §5.2: at least 30 s).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes read from either side of a data connection at a time.
const CHUNK: usize = 16384;

/// A peer connection waiting for its ConnectionBind. Dropped before a
/// [`Pipe`] took its socket, it counts as ended.
pub(crate) struct Parked {
    stream: Option<std::net::TcpStream>,
    username: String,
    ended: Arc<AtomicBool>,
}

impl Drop for Parked {
    fn drop(&mut self) {
        if self.stream.is_some() {
            self.ended.store(true, Ordering::Relaxed);
        }
    }
}

/// Peer connections waiting for their ConnectionBind, shared by all shards.
#[derive(Default)]
pub struct Parking {
    next_id: AtomicU32,
    connecting: AtomicUsize,
    parked: Mutex<HashMap<u32, Parked>>,
}

impl Parking {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Parked>> {
        // Every update is one insert or remove: a panicked holder leaves
        // the map consistent.
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection id no other connection of this process has.
    fn id(&self) -> u32 {
        self.next_id.fetch_add(1, Ordering::Relaxed).wrapping_add(1)
    }

    /// Takes connection `id` for a ConnectionBind by `username`.
    pub(crate) fn claim(&self, id: u32, username: &str) -> Option<Parked> {
        let mut parked = self.lock();
        if parked.get(&id)?.username != username {
            return None;
        }
        parked.remove(&id)
    }

    fn unpark(&self, id: u32) -> Option<Parked> {
        self.lock().remove(&id)
    }
}

/// What an allocation's shard keeps of one of its peer connections.
struct Owned {
    /// A duplicate of the socket, to shut it down; `None` while connecting.
    socket: Option<std::net::TcpStream>,
    /// Raised when the connection is closed, wherever it was relayed.
    ended: Arc<AtomicBool>,
}

/// A shard's TCP relay listeners and the peer connections of its
/// allocations.
pub(crate) struct TcpRelays {
    shard: Weak<Shard>,
    parking: Arc<Parking>,
    /// Bandwidth cap per data connection, both directions together.
    rate: Option<u64>,
    /// Dropping a sender ends its listener's accept task.
    listeners: HashMap<SocketAddr, LocalSender<()>>,
    conns: HashMap<u32, Owned>,
}

impl TcpRelays {
    pub(crate) fn new(parking: Arc<Parking>, rate: Option<u64>) -> Self {
        TcpRelays { shard: Weak::new(), parking, rate, listeners: HashMap::new(), conns: HashMap::new() }
    }

    pub(crate) fn set_shard(&mut self, shard: Weak<Shard>) {
        self.shard = shard;
    }

    pub(crate) fn parking(&self) -> &Arc<Parking> {
        &self.parking
    }

    pub(crate) fn rate(&self) -> Option<u64> {
        self.rate
    }

    pub(crate) fn has_listener(&self, addr: SocketAddr) -> bool {
        self.listeners.contains_key(&addr)
    }

    /// Opens a listening relay address; fails if anyone holds the port.
    pub(crate) fn listen(&mut self, addr: SocketAddr) -> std::io::Result<()> {
        // The listener shares its address with outgoing connections
        // (SO_REUSEPORT), which would also let a stranger's socket in: a
        // plain bind first proves the port free.
        drop(std::net::TcpListener::bind(addr)?);
        let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.bind(&addr.into())?;
        s.listen(128)?;
        s.set_nonblocking(true)?;
        // SAFETY: the descriptor comes from `into_raw_fd`: an open,
        // listening TCP socket that nothing else owns.
        let listener = unsafe { TcpListener::from_raw_fd(s.into_raw_fd()) };
        let (close_tx, close_rx) = local_channel::new_bounded(1);
        glommio::spawn_local(accept_peers(self.shard.clone(), listener, addr, close_rx)).detach();
        self.listeners.insert(addr, close_tx);
        Ok(())
    }

    pub(crate) fn release(&mut self, addr: SocketAddr) {
        self.listeners.remove(&addr);
    }

    /// Starts an outgoing connection from `relay` to `peer`.
    pub(crate) fn connect(&mut self, relay: SocketAddr, peer: SocketAddr) -> Option<u32> {
        let parking = self.parking.clone();
        if parking.connecting.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTING {
            parking.connecting.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        let id = parking.id();
        let (tx, rx) = flume::bounded(1);
        let spawned = std::thread::Builder::new().name("relay-connect".into()).spawn(move || {
            let _ = tx.send(connect_from(relay, peer));
        });
        if spawned.is_err() {
            parking.connecting.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        self.conns.insert(id, Owned { socket: None, ended: Arc::new(AtomicBool::new(false)) });
        glommio::spawn_local(connected(self.shard.clone(), id, rx, parking)).detach();
        Some(id)
    }

    /// Parks peer connection `id`, waiting for a ConnectionBind by `username`.
    fn adopt(&mut self, id: u32, stream: std::net::TcpStream, username: String) {
        let Some(owned) = self.conns.get_mut(&id) else { return };
        owned.socket = stream.try_clone().ok();
        self.parking.lock().insert(id, Parked { stream: Some(stream), username, ended: owned.ended.clone() });
    }

    /// Drops connection `id` if it is still parked.
    pub(crate) fn expire(&mut self, id: u32) {
        if self.parking.unpark(id).is_some() {
            self.close(id);
        }
    }

    /// Closes connection `id` wherever it is.
    pub(crate) fn close(&mut self, id: u32) {
        self.parking.unpark(id);
        if let Some(owned) = self.conns.remove(&id) {
            owned.ended.store(true, Ordering::Relaxed);
            if let Some(s) = owned.socket {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    pub(crate) fn is_open(&self, id: u32) -> bool {
        self.conns.get(&id).is_some_and(|o| !o.ended.load(Ordering::Relaxed))
    }
}

/// Connects from `relay` (shared with its listener) to `peer`; blocking.
fn connect_from(relay: SocketAddr, peer: SocketAddr) -> std::io::Result<std::net::TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::for_address(peer), socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&relay.into())?;
    s.connect_timeout(&peer.into(), CONNECT_TIMEOUT)?;
    s.set_tcp_nodelay(true)?;
    Ok(s.into())
}

/// Reports an outgoing connection's outcome to the core, parks the
/// connection and answers the Connect.
async fn connected(shard: Weak<Shard>, id: u32, rx: flume::Receiver<std::io::Result<std::net::TcpStream>>, parking: Arc<Parking>) {
    // Spawned from inside the binder while the core is borrowed (and the
    // connection may already be made): let the caller finish first.
    futures_lite::future::yield_now().await;
    let made = rx.recv_async().await.ok().and_then(|r| r.map_err(|e| tracing::debug!(error = %e, "TCP relay connect failed")).ok());
    parking.connecting.fetch_sub(1, Ordering::Relaxed);
    let Some(s) = shard.upgrade() else { return };
    let out = s.server.borrow_mut().tcp_connected(now(), id, made.is_some());
    match (out, made) {
        (Some((tuple, username, reply)), Some(stream)) => {
            // Parked before the answer goes out: the client's ConnectionBind
            // may follow at once, on any shard.
            s.binder.borrow_mut().tcp.adopt(id, stream, username);
            s.send_to_stream(tuple, &reply);
        }
        (Some((tuple, _, reply)), None) => {
            s.binder.borrow_mut().tcp.close(id);
            s.send_to_stream(tuple, &reply);
        }
        (None, _) => s.binder.borrow_mut().tcp.close(id),
    }
}

/// Accepts peer connections on one TCP relay address until it is released.
async fn accept_peers(shard: Weak<Shard>, listener: TcpListener, relay: SocketAddr, close: LocalReceiver<()>) {
    // Spawned from inside the binder while the core is borrowed: let the
    // caller finish first.
    futures_lite::future::yield_now().await;
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            close.recv().await;
            None
        })
        .await;
        let stream = match accepted {
            None => return,
            Some(Ok(stream)) => stream,
            Some(Err(e)) => {
                // Out of descriptors, say: do not spin on it.
                tracing::debug!(%relay, error = %e, "accepting a peer connection failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Some(s) = shard.upgrade() else { return };
        let Ok(peer) = stream.peer_addr() else { continue };
        let id = s.binder.borrow().tcp.parking.id();
        let out = s.server.borrow_mut().tcp_peer_accepted(now(), relay, peer, id);
        // Refused: dropping the stream closes it.
        let Some((tuple, username, indication)) = out else { continue };
        let Some(std_stream) = to_std(&stream) else { continue };
        drop(stream);
        {
            let mut b = s.binder.borrow_mut();
            b.tcp.conns.insert(id, Owned { socket: None, ended: Arc::new(AtomicBool::new(false)) });
            b.tcp.adopt(id, std_stream, username);
        }
        s.send_to_stream(tuple, &indication);
    }
}

/// A std socket on a duplicate of a glommio stream's descriptor.
fn to_std(stream: &TcpStream) -> Option<std::net::TcpStream> {
    // SAFETY: `dup` returns a new descriptor (checked) for the same socket,
    // owned only by the std stream made from it.
    let fd = unsafe { libc::dup(stream.as_raw_fd()) };
    (fd >= 0).then(|| unsafe { std::net::TcpStream::from_raw_fd(fd) })
}

/// A duplicate of a descriptor, owned.
fn dup_owned(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: as in `to_std`.
    let d = unsafe { libc::dup(fd) };
    (d >= 0).then(|| unsafe { OwnedFd::from_raw_fd(d) })
}

/// The bandwidth cap of one data connection: a token bucket that may go
/// into debt, paid back by waiting.
struct Pacer {
    rate: u64,
    tokens: f64,
    last: Instant,
}

async fn pace(pacer: &Option<Rc<RefCell<Pacer>>>, bytes: usize) {
    let Some(p) = pacer else { return };
    let wait = {
        let mut p = p.borrow_mut();
        let now = Instant::now();
        let rate = p.rate as f64;
        p.tokens = (p.tokens + now.saturating_duration_since(p.last).as_secs_f64() * rate).min(rate);
        p.last = now;
        p.tokens -= bytes as f64;
        if p.tokens < 0.0 { Duration::from_secs_f64(-p.tokens / rate) } else { Duration::ZERO }
    };
    if !wait.is_zero() {
        glommio::timer::sleep(wait).await;
    }
}

/// Relaying between a client data connection and its peer connection.
///
/// The client side stays with the caller: it feeds [`Pipe::send_to_peer`] what
/// it reads (after TLS, if any), and peer bytes go out through the client
/// connection's writer queue. When the peer side ends, the client socket is
/// shut down for reading, which ends the caller's loop; the caller then
/// calls [`Pipe::close`].
pub(crate) struct Pipe {
    shard: Rc<Shard>,
    peer: TcpStream,
    ended: Arc<AtomicBool>,
    pacer: Option<Rc<RefCell<Pacer>>>,
}

impl Pipe {
    pub(crate) fn start(shard: &Rc<Shard>, mut parked: Parked, client_fd: RawFd, to_client: Rc<LocalSender<Vec<u8>>>) -> Option<Pipe> {
        let stream = parked.stream.as_ref()?;
        stream.set_nonblocking(true).ok()?;
        let _ = stream.set_nodelay(true);
        let client = dup_owned(client_fd)?;
        let peer_write_fd = dup_owned(stream.as_raw_fd())?;
        // Nothing fails past this point: the pipe owns the socket now.
        let stream = parked.stream.take()?;
        // SAFETY: `into_raw_fd` hands over an open TCP socket owned by
        // nothing else.
        let peer_read = unsafe { TcpStream::from_raw_fd(stream.into_raw_fd()) };
        // SAFETY: a fresh duplicate, owned by this stream only.
        let peer = unsafe { TcpStream::from_raw_fd(peer_write_fd.into_raw_fd()) };
        let pacer = shard.binder.borrow().tcp.rate().map(|rate| Rc::new(RefCell::new(Pacer { rate, tokens: rate as f64, last: Instant::now() })));
        shard.metrics.tcp_connections_total.fetch_add(1, Ordering::Relaxed);
        glommio::spawn_local(peer_to_client(shard.clone(), peer_read, client, to_client, pacer.clone())).detach();
        Some(Pipe { shard: shard.clone(), peer, ended: parked.ended.clone(), pacer })
    }

    /// Writes client bytes to the peer (waiting for the bandwidth cap).
    pub(crate) async fn send_to_peer(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        pace(&self.pacer, bytes.len()).await;
        self.peer.write_all(bytes).await?;
        let m = &self.shard.metrics;
        m.packets_to_peer.fetch_add(1, Ordering::Relaxed);
        m.bytes_to_peer.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Ends the relaying: the peer connection is shut down (which also
    /// stops the peer-to-client task) and its allocation's shard learns it.
    pub(crate) fn close(self) {
        // SAFETY: plain shutdown(2) on a descriptor this pipe owns.
        unsafe { libc::shutdown(self.peer.as_raw_fd(), libc::SHUT_RDWR) };
        self.ended.store(true, Ordering::Relaxed);
    }
}

async fn peer_to_client(shard: Rc<Shard>, mut peer: TcpStream, client: OwnedFd, to_client: Rc<LocalSender<Vec<u8>>>, pacer: Option<Rc<RefCell<Pacer>>>) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match peer.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pace(&pacer, n).await;
        if to_client.send(buf[..n].to_vec()).await.is_err() {
            shard.metrics.drop_packet(DropReason::Io);
            break;
        }
        shard.metrics.packets_to_client.fetch_add(1, Ordering::Relaxed);
        shard.metrics.bytes_to_client.fetch_add(n as u64, Ordering::Relaxed);
    }
    // The peer is gone: end the client side's reading, which ends the pipe;
    // what is queued for the client is still written.
    // SAFETY: plain shutdown(2) on a descriptor this task owns.
    unsafe { libc::shutdown(client.as_raw_fd(), libc::SHUT_RD) };
}
