//! The I/O driver: one glommio executor per core around the sans-IO core.
//!
//! Each shard binds its own SO_REUSEPORT UDP and TCP listeners on the
//! configured addresses, so the kernel hashes a client's 5-tuple to one
//! shard for its whole life; that shard owns the client's allocation, opens
//! its relay socket from its own slice of the port range and receives on
//! it. Invariant: the data path never crosses cores; the
//! only state shared between shards is the quota table (touched on
//! Allocate and on removal) and the config.
//!
//! A shard's relay sockets share one receive task: the [`doorbell`] lists
//! every socket with datagrams queued, after one wait for all of them.
//!
//! UDP goes through [`batch`]: each pass drains up to `udp_batch` messages
//! from one socket with one `recvmmsg` (a message is one datagram, or with
//! `udp_gro` a coalesced burst of up to 128 from one sender, split again
//! here) and runs their datagrams through the core without awaiting; what
//! they produce leaves with one `sendmmsg` per destination socket at the
//! end of a listener's pass, or at the end of a round over the ready relay
//! sockets (whose datagrams to clients all leave through the listener, so
//! one call carries the whole round), or earlier when the send queue is
//! full. The shard's one receive batch is shared by all its UDP sockets.
//! TCP and TLS clients' frames are read in batches as well: what the frames
//! of one read send to peers leaves in one `sendmmsg` per relay socket, and
//! what a client is sent leaves in one write per wake-up of its writer
//! (`stream.rs`). DTLS clients (`dtls.rs`) are datagram clients whose
//! datagrams pass through their session on the way in and out; their
//! sealed records leave through the same send queues.
//!
//! Shutdown: on SIGTERM the main thread raises `stop`; each shard stops
//! granting allocations (508), keeps relaying until its allocations are gone
//! or `drain_secs` pass, then returns, which drops its tasks and sockets.

mod batch;
mod doorbell;
pub mod dtls;
mod stream;
pub mod tcp_relay;

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd as _, FromRawFd as _, IntoRawFd as _};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use glommio::channels::local_channel::LocalSender;
use glommio::net::UdpSocket;

use self::batch::{Blocked, Payload, RecvBatch, SendQueue};
use crate::FastMap;
use crate::metrics::{DropReason, Metrics};
use crate::turn::{BindError, ClientOutput, Family, FiveTuple, Held, Now, PeerOutput, RelayBinder, Server, Transport};

/// Everything a shard needs, built on the main thread.
#[derive(Clone)]
pub struct ShardSetup {
    /// Shard index.
    pub index: usize,
    /// Number of shards (for the port range split).
    pub shards: usize,
    /// Parsed configuration.
    pub config: Arc<crate::config::Config>,
    /// Protocol configuration.
    pub server_config: Arc<crate::turn::ServerConfig>,
    /// Shared quotas.
    pub quotas: Arc<crate::turn::Quotas>,
    /// This shard's counters.
    pub metrics: Arc<Metrics>,
    /// Random key for nonces (same on all shards: a client may move).
    pub nonce_key: [u8; 32],
    /// TLS server configuration, if TLS listeners are configured.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Raised on SIGTERM.
    pub stop: Arc<AtomicBool>,
    /// DTLS settings, if DTLS listeners are configured.
    pub dtls: Option<Arc<dtls::DtlsSetup>>,
    /// Told once the shard's listeners are bound (or failed).
    pub ready: std::sync::mpsc::Sender<Result<(), String>>,
    /// TCP peer connections waiting for their ConnectionBind (shared).
    pub parking: Arc<tcp_relay::Parking>,
}

/// The current time as the core wants it.
pub fn now() -> Now {
    let unix_secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    Now { mono: Instant::now(), unix_secs }
}

/// State of one shard, shared by its tasks (all on one thread).
pub(crate) struct Shard {
    pub(crate) server: RefCell<Server>,
    pub(crate) binder: RefCell<UdpBinder>,
    udp: FastMap<SocketAddr, Rc<UdpSocket>>,
    /// DTLS listener sockets, by address.
    dtls_socks: FastMap<SocketAddr, Rc<UdpSocket>>,
    /// DTLS clients' sessions.
    dtls: RefCell<dtls::Sessions>,
    /// Writers of stream (TCP/TLS) clients, by 5-tuple.
    pub(crate) streams: RefCell<HashMap<FiveTuple, Rc<LocalSender<Vec<u8>>>>>,
    pub(crate) metrics: Arc<Metrics>,
    /// The shard's UDP batch. Borrowed only inside a synchronous pass.
    udp_io: RefCell<UdpIo>,
    /// Datagrams stream clients send to peers, queued while the frames of
    /// one read go through the core and sent together
    /// ([`Shard::flush_stream_sends`]); also a DTLS datagram's answers and
    /// the data its records carry for peers. Its payloads are owned copies;
    /// its receive batch has no slots.
    stream_io: RefCell<UdpIo>,
    /// What a full [`Shard::stream_io`] queue flushed mid-read could not
    /// send without waiting; sent by the next [`Shard::flush_stream_sends`].
    stream_blocked: RefCell<BlockedSends>,
}

/// Receive slots and send queue shared by all UDP sockets of a shard.
struct UdpIo {
    recv: RecvBatch,
    send: SendQueue<Rc<UdpSocket>>,
}

/// Datagrams a pass could not send without waiting.
type BlockedSends = Vec<Blocked<Rc<UdpSocket>>>;

impl Shard {
    /// Queues bytes for a stream (TCP/TLS) client, padded to four bytes
    /// (RFC 8656 §12.5).
    fn send_to_stream(&self, to: FiveTuple, bytes: &[u8]) {
        let mut v = Vec::with_capacity(bytes.len() + 3);
        v.extend_from_slice(bytes);
        v.resize((bytes.len() + 3) & !3, 0);
        // A full writer queue means the client cannot keep up: drop, as a
        // UDP path would.
        let sent = self.streams.borrow().get(&to).is_some_and(|tx| tx.try_send(v).is_ok());
        if !sent {
            self.metrics.drop_packet(DropReason::Io);
        }
    }

    /// One receive pass on a UDP listener: up to a batch of client
    /// datagrams through the core, replies and relayed data flushed at the
    /// end. Never awaits. `Err(WouldBlock)` means the socket had nothing.
    fn udp_client_pass(&self, sock: &Rc<UdpSocket>, local: SocketAddr, blocked: &mut BlockedSends) -> std::io::Result<usize> {
        let mut io = self.udp_io.borrow_mut();
        let UdpIo { recv, send } = &mut *io;
        self.make_room(recv, send, blocked);
        let received = recv.recv_more(sock.as_raw_fd())?;
        let n = received.len();
        // The batch arrived at one instant: one clock read for all of it.
        let now = now();
        for i in received {
            let Some((from, data)) = recv.datagram(i) else {
                self.metrics.drop_packet(DropReason::Malformed);
                continue;
            };
            let tuple = FiveTuple { client: from, server: local, transport: Transport::Udp };
            let segments = recv.segments(i);
            self.count_coalesced(&segments);
            for (start, len) in segments {
                let data = &data[start..start + len];
                let out = {
                    let mut server = self.server.borrow_mut();
                    let mut binder = self.binder.borrow_mut();
                    server.handle_client(now, tuple, data, &mut *binder)
                };
                let queued = match out {
                    ClientOutput::Nothing => continue,
                    ClientOutput::Reply(r) => (sock.clone(), from, Payload::Owned(r)),
                    // The core refuses ConnectionBind over UDP itself.
                    ClientOutput::ConnectionBind { reject, .. } => (sock.clone(), from, Payload::Owned(reject)),
                    ClientOutput::ToPeer { relay, peer, payload } => {
                        // The queue keeps the socket open until the flush even if
                        // a later datagram of this pass releases the allocation.
                        let Some(relay_sock) = self.binder.borrow().socket(relay) else {
                            self.metrics.drop_packet(DropReason::NoAllocation);
                            continue;
                        };
                        (relay_sock, peer, recv.locate(i, payload))
                    }
                };
                self.queue(recv, send, queued, blocked);
            }
        }
        self.send_all(recv, send, blocked);
        Ok(n)
    }

    /// One receive pass on a relay socket: up to the batch's free slots of
    /// peer datagrams through the core, ChannelData headers written in front
    /// of the payload in place. What it produces stays queued for the end
    /// of the round ([`Self::end_round`]), so the passes of one round leave
    /// through the client listener in one `sendmmsg`. Never awaits.
    fn udp_relay_pass(&self, sock: &Rc<UdpSocket>, relay: SocketAddr, blocked: &mut BlockedSends) -> std::io::Result<usize> {
        let mut io = self.udp_io.borrow_mut();
        let UdpIo { recv, send } = &mut *io;
        self.make_room(recv, send, blocked);
        let received = recv.recv_more(sock.as_raw_fd())?;
        let n = received.len();
        let now = now();
        for i in received {
            let Some((peer, _)) = recv.datagram(i) else {
                self.metrics.drop_packet(DropReason::Malformed);
                continue;
            };
            let segments = recv.segments(i);
            self.count_coalesced(&segments);
            for (start, len) in segments {
                let out = self.server.borrow_mut().handle_peer(now, relay, peer, recv.segment(i, start, len));
                let (to, payload) = match out {
                    PeerOutput::Drop => continue,
                    PeerOutput::ChannelData { to, header } => match recv.prepend_segment(i, start, len, header) {
                        Some(p) => (to, p),
                        None => continue,
                    },
                    PeerOutput::DataIndication { to, message } => (to, Payload::Owned(message)),
                };
                match to.transport {
                    Transport::Udp => {}
                    Transport::Tcp | Transport::Tls => {
                        self.send_to_stream(to, recv.bytes(&payload));
                        continue;
                    }
                    Transport::Dtls => {
                        let mut sealed = Vec::new();
                        let outcome = self.dtls.borrow_mut().seal(to, now.mono, recv.bytes(&payload), &self.metrics, &mut sealed);
                        match (outcome, self.dtls_socks.get(&to.server)) {
                            (dtls::Sealed::Sent, Some(sock)) => {
                                for p in sealed {
                                    self.queue(recv, send, (sock.clone(), to.client, Payload::Owned(p)), blocked);
                                }
                            }
                            (dtls::Sealed::Ended, _) => {
                                self.metrics.drop_packet(DropReason::Io);
                                self.client_gone(to);
                            }
                            _ => self.metrics.drop_packet(DropReason::Io),
                        }
                        continue;
                    }
                }
                let Some(client_sock) = self.udp.get(&to.server).cloned() else {
                    self.metrics.drop_packet(DropReason::Io);
                    continue;
                };
                self.queue(recv, send, (client_sock, to.client, payload), blocked);
            }
        }
        Ok(n)
    }

    /// Counts the datagrams of a message the kernel coalesced (GRO).
    fn count_coalesced(&self, segments: &batch::Segments) {
        let count = segments.remaining();
        if count > 1 {
            self.metrics.udp_gro_datagrams.fetch_add(count as u64, Ordering::Relaxed);
        }
    }

    /// Sends what the passes of a round of relay sockets queued.
    fn end_round(&self, blocked: &mut BlockedSends) {
        let mut io = self.udp_io.borrow_mut();
        let UdpIo { recv, send } = &mut *io;
        self.send_all(recv, send, blocked);
    }

    /// Frees the batch for the next pass when no slot is left: what is
    /// queued refers to the slots, so it is sent first.
    fn make_room(&self, recv: &mut RecvBatch, send: &mut SendQueue<Rc<UdpSocket>>, blocked: &mut BlockedSends) {
        if recv.free() == 0 {
            self.send_all(recv, send, blocked);
        }
    }

    /// Sends everything queued, then empties the batch.
    fn send_all(&self, recv: &mut RecvBatch, send: &mut SendQueue<Rc<UdpSocket>>, blocked: &mut BlockedSends) {
        self.flush(recv, send, blocked);
        recv.clear();
    }

    fn queue(
        &self,
        recv: &RecvBatch,
        send: &mut SendQueue<Rc<UdpSocket>>,
        (sock, to, payload): (Rc<UdpSocket>, SocketAddr, Payload),
        blocked: &mut BlockedSends,
    ) {
        // Each datagram yields at most one queued one, but a coalesced
        // message holds many: a full queue is flushed mid-pass (the slots
        // stay as they are until the pass's `send_all`).
        if send.is_full() {
            self.flush(recv, send, blocked);
        }
        if send.push(sock, to, payload).is_err() {
            self.metrics.drop_packet(DropReason::Io);
        }
    }

    fn flush(&self, recv: &RecvBatch, send: &mut SendQueue<Rc<UdpSocket>>, blocked: &mut BlockedSends) {
        // SAFETY: `flush` hands the syscall only headers it built over its
        // own addresses and over bytes in `recv` or in its queue, all alive
        // for the call.
        let done = send.flush(recv, blocked, |fd, hdrs| unsafe { batch::sendmmsg_dontwait(fd, hdrs) });
        for _ in 0..done.failed {
            self.metrics.drop_packet(DropReason::Io);
        }
        self.metrics.udp_gso_datagrams.fetch_add(done.gso_sent as u64, Ordering::Relaxed);
        if done.gso_refused {
            tracing::warn!("the kernel refused a UDP GSO send: this shard now sends one datagram per message");
        }
    }

    /// Runs one stream client's message through the core. Returns the
    /// reply for the caller to send on its own transport, or the peer
    /// connection a ConnectionBind claimed; data for a peer is queued for
    /// [`Self::flush_stream_sends`].
    pub(crate) fn stream_frame(&self, tuple: FiveTuple, buf: &[u8]) -> Handled {
        let out = {
            let mut server = self.server.borrow_mut();
            let mut binder = self.binder.borrow_mut();
            server.handle_client(now(), tuple, buf, &mut *binder)
        };
        Handled::Reply(match out {
            ClientOutput::Nothing => None,
            ClientOutput::Reply(r) => Some(r),
            ClientOutput::ConnectionBind { id, username, accept, reject } => {
                let claimed = self.binder.borrow().tcp.parking().claim(id, &username);
                return match claimed {
                    Some(parked) => Handled::Relay(accept, parked),
                    None => Handled::Reply(Some(reject)),
                };
            }
            ClientOutput::ToPeer { relay, peer, payload } => {
                // The queue keeps the socket open until the flush even if a
                // later frame of the read releases the allocation.
                let sock = self.binder.borrow().socket(relay);
                match sock {
                    Some(s) => self.queue_owned(s, peer, payload.to_vec()),
                    None => self.metrics.drop_packet(DropReason::NoAllocation),
                }
                None
            }
        })
    }

    /// Queues a datagram for [`Self::flush_stream_sends`].
    fn queue_owned(&self, sock: Rc<UdpSocket>, to: SocketAddr, bytes: Vec<u8>) {
        let mut io = self.stream_io.borrow_mut();
        let UdpIo { recv, send } = &mut *io;
        if send.is_full() {
            let mut blocked = self.stream_blocked.take();
            self.flush(recv, send, &mut blocked);
            self.stream_blocked.replace(blocked);
        }
        if send.push(sock, to, Payload::Owned(bytes)).is_err() {
            self.metrics.drop_packet(DropReason::Io);
        }
    }

    /// One datagram on a DTLS listener: through the client's session, each
    /// record of plaintext through the core, replies sealed again. What it
    /// produces is queued for [`Self::flush_stream_sends`]. Never awaits.
    fn dtls_datagram(&self, sock: &Rc<UdpSocket>, tuple: FiveTuple, data: &[u8]) {
        let mut packets = Vec::new();
        let mut plain = Vec::new();
        let now = Instant::now();
        let fate = self.dtls.borrow_mut().receive(tuple, now, data, &self.metrics, &mut packets, &mut plain);
        match fate {
            dtls::Fate::Ignored => return self.metrics.drop_packet(DropReason::Malformed),
            dtls::Fate::Refused => return,
            dtls::Fate::Open | dtls::Fate::Closed | dtls::Fate::Answered | dtls::Fate::Replaced => {}
        }
        // A replaced session's allocation goes as a closed one's does.
        let mut closed = matches!(fate, dtls::Fate::Closed | dtls::Fate::Replaced);
        for record in plain {
            // A DTLS client cannot claim a TCP peer connection: the core
            // answers its ConnectionBind with 400 (`Handled::Reply`).
            let Handled::Reply(Some(reply)) = self.stream_frame(tuple, &record) else { continue };
            match self.dtls.borrow_mut().seal(tuple, now, &reply, &self.metrics, &mut packets) {
                dtls::Sealed::Sent => {}
                dtls::Sealed::Dropped => self.metrics.drop_packet(DropReason::Io),
                dtls::Sealed::Ended => {
                    closed = true;
                    break;
                }
            }
        }
        for p in packets {
            self.queue_owned(sock.clone(), tuple.client, p);
        }
        if closed {
            self.client_gone(tuple);
        }
    }

    /// DTLS retransmissions and deadlines (run from the shard's timer).
    async fn dtls_tick(&self) {
        let mut packets = Vec::new();
        let ended = {
            let server = self.server.borrow();
            self.dtls.borrow_mut().tick(Instant::now(), &self.metrics, &mut packets, |t| server.has_allocation(t))
        };
        self.send_dtls(packets).await;
        for tuple in ended {
            self.client_gone(tuple);
        }
    }

    /// Sends sealed records to DTLS clients.
    async fn send_dtls(&self, packets: Vec<(FiveTuple, Vec<u8>)>) {
        if packets.is_empty() {
            return;
        }
        for (tuple, p) in packets {
            match self.dtls_socks.get(&tuple.server) {
                Some(sock) => self.queue_owned(sock.clone(), tuple.client, p),
                None => self.metrics.drop_packet(DropReason::Io),
            }
        }
        self.flush_stream_sends().await;
    }

    /// A client's transport is gone: remove its allocation.
    fn client_gone(&self, tuple: FiveTuple) {
        let mut server = self.server.borrow_mut();
        let mut binder = self.binder.borrow_mut();
        server.client_closed(tuple, &mut *binder);
    }

    /// Sends what stream clients' frames queued for peers: one `sendmmsg`
    /// per relay socket (a run to one peer as one GSO message where that is
    /// on), then, by awaiting, whatever a full socket buffer held back.
    pub(crate) async fn flush_stream_sends(&self) {
        let mut blocked = self.stream_blocked.take();
        {
            let mut io = self.stream_io.borrow_mut();
            let UdpIo { recv, send } = &mut *io;
            self.flush(recv, send, &mut blocked);
        }
        if !blocked.is_empty() {
            send_blocked(&self.metrics, &mut blocked).await;
        }
    }

    /// A stream client went away: remove its allocation.
    pub(crate) fn stream_closed(&self, tuple: FiveTuple) {
        self.streams.borrow_mut().remove(&tuple);
        self.client_gone(tuple);
    }
}

/// What became of a stream client's message.
pub(crate) enum Handled {
    /// Send this reply, if any.
    Reply(Option<Vec<u8>>),
    /// Send this success and relay the connection's bytes to and from the
    /// claimed peer connection from now on.
    Relay(Vec<u8>, tcp_relay::Parked),
}

/// Sends what a pass left because a socket buffer was full, awaiting
/// glommio's send path, in order.
async fn send_blocked(metrics: &Metrics, blocked: &mut BlockedSends) {
    for b in blocked.drain(..) {
        if b.sock.send_to(&b.bytes, b.to).await.is_err() {
            metrics.drop_packet(DropReason::Io);
        }
    }
}

/// Waits until `sock` has a datagram (or a pending error) to receive.
/// glommio offers no readiness wait for datagram sockets; a one-byte
/// `MSG_PEEK` receive (`peek_from`: glommio tries it without blocking, then
/// through io_uring) completes when a datagram is queued and leaves it there
/// for the next `recvmmsg`. (`peek` would not do: it needs a connected
/// socket.) An error here is a pending socket error (an ICMP report of an
/// earlier send), which the read consumes, so it cannot repeat forever.
async fn readable(sock: &UdpSocket) {
    let mut probe = [0u8; 1];
    let _ = sock.peek_from(&mut probe).await;
}

struct RelaySocket {
    sock: Rc<UdpSocket>,
    /// The socket's token in the shard's doorbell.
    token: u64,
}

/// Opens relay sockets from this shard's slice of the port range.
pub(crate) struct UdpBinder {
    shard: Weak<Shard>,
    ipv4: Option<IpAddr>,
    ipv6: Option<IpAddr>,
    ports: Vec<u16>,
    min_port: u16,
    max_port: u16,
    cursor: usize,
    sockets: FastMap<SocketAddr, RelaySocket>,
    /// Relay addresses by doorbell token.
    tokens: FastMap<u64, SocketAddr>,
    next_token: u64,
    /// The readiness wait of all the shard's relay sockets (set once the
    /// shard's executor runs).
    doorbell: Option<Rc<doorbell::Doorbell>>,
    /// TCP relay addresses and peer connections (RFC 6062).
    pub(crate) tcp: tcp_relay::TcpRelays,
    /// Set `UDP_GRO` on new relay sockets (`udp_gro`).
    gro: bool,
}

impl UdpBinder {
    fn new(setup: &ShardSetup) -> Self {
        let c = &setup.config;
        // Shard i owns the port pairs (2k, 2k+1) with k % shards == i, so
        // shards never race for a port; an EVEN-PORT reservation's odd port
        // is held by the same shard and may then move to the shard that
        // gets the token's Allocate (reserved ports are skipped by all).
        let ports = (c.min_port..=c.max_port).filter(|p| usize::from(p / 2) % setup.shards == setup.index).collect();
        UdpBinder {
            shard: Weak::new(),
            ipv4: c.relay_ipv4,
            ipv6: c.relay_ipv6,
            ports,
            min_port: c.min_port,
            max_port: c.max_port,
            cursor: 0,
            sockets: FastMap::default(),
            tokens: FastMap::default(),
            next_token: 0,
            doorbell: None,
            tcp: tcp_relay::TcpRelays::new(setup.parking.clone(), setup.server_config.bandwidth_bytes_per_sec),
            gro: c.udp_gro,
        }
    }

    fn open(&mut self, addr: SocketAddr) -> Result<SocketAddr, BindError> {
        if self.sockets.contains_key(&addr) || self.tcp.has_listener(addr) {
            return Err(BindError::Exhausted);
        }
        let std_sock = std::net::UdpSocket::bind(addr).map_err(|_| BindError::Exhausted)?;
        self.adopt(addr, std_sock)
    }

    /// Makes a bound UDP socket a relay socket of this shard.
    fn adopt(&mut self, addr: SocketAddr, std_sock: std::net::UdpSocket) -> Result<SocketAddr, BindError> {
        std_sock.set_nonblocking(true).map_err(|_| BindError::Exhausted)?;
        if self.gro {
            enable_gro(&std_sock, addr);
        }
        // SAFETY: the descriptor comes from `into_raw_fd`, so it is an open
        // UDP socket that nothing else owns.
        let sock = Rc::new(unsafe { UdpSocket::from_raw_fd(std_sock.into_raw_fd()) });
        let doorbell = self.doorbell.as_ref().ok_or(BindError::Exhausted)?;
        let token = self.next_token;
        self.next_token += 1;
        if let Err(e) = doorbell.add(sock.as_raw_fd(), token) {
            tracing::warn!(%addr, error = %e, "could not watch a relay socket");
            return Err(BindError::Exhausted);
        }
        self.sockets.insert(addr, RelaySocket { sock, token });
        self.tokens.insert(token, addr);
        Ok(addr)
    }

    /// True if no relay socket or listener of this shard has `addr` and the
    /// host lets a UDP socket bind it now.
    fn is_free(&self, addr: SocketAddr) -> bool {
        !self.sockets.contains_key(&addr) && !self.tcp.has_listener(addr) && std::net::UdpSocket::bind(addr).is_ok()
    }

    /// The open relay socket of a doorbell token.
    fn by_token(&self, token: u64) -> Option<(Rc<UdpSocket>, SocketAddr)> {
        let addr = *self.tokens.get(&token)?;
        self.sockets.get(&addr).map(|s| (s.sock.clone(), addr))
    }

    fn ip_of(&self, addr: SocketAddr) -> Option<IpAddr> {
        if addr.is_ipv4() { self.ipv4 } else { self.ipv6 }
    }

    fn socket(&self, relay: SocketAddr) -> Option<Rc<UdpSocket>> {
        self.sockets.get(&relay).map(|s| s.sock.clone())
    }
}

impl RelayBinder for UdpBinder {
    fn bind(&mut self, family: Family, even_port: bool) -> Result<SocketAddr, BindError> {
        let ip = match family {
            Family::V4 => self.ipv4,
            Family::V6 => self.ipv6,
        }
        .ok_or(BindError::FamilyUnsupported)?;
        for _ in 0..self.ports.len() {
            let port = self.ports[self.cursor % self.ports.len()];
            self.cursor = self.cursor.wrapping_add(1);
            if even_port && port % 2 == 1 {
                continue;
            }
            // An EVEN-PORT request may reserve the odd port next to it for a
            // later Allocate: only hand out even ports whose partner is free
            // now, so the reservation can be honoured.
            if even_port && (port >= self.max_port || !self.is_free(SocketAddr::new(ip, port + 1))) {
                continue;
            }
            if let Ok(addr) = self.open(SocketAddr::new(ip, port)) {
                return Ok(addr);
            }
        }
        Err(BindError::Exhausted)
    }

    fn hold(&mut self, addr: SocketAddr) -> Result<Held, BindError> {
        // One relay address per port, whichever the protocol.
        if addr.port() < self.min_port
            || addr.port() > self.max_port
            || Some(addr.ip()) != self.ip_of(addr)
            || self.sockets.contains_key(&addr)
            || self.tcp.has_listener(addr)
        {
            return Err(BindError::Exhausted);
        }
        let sock = std::net::UdpSocket::bind(addr).map_err(|_| BindError::Exhausted)?;
        Ok(Box::new(sock))
    }

    fn bind_exact(&mut self, addr: SocketAddr, held: Held) -> Result<SocketAddr, BindError> {
        // A reserved port may come from another shard's slice: the reserving
        // shard holds it open until the token's Allocate takes it over, on
        // whichever shard that lands, and every shard skips reserved ports.
        let sock = held.downcast::<std::net::UdpSocket>().map_err(|_| BindError::Exhausted)?;
        if sock.local_addr().ok() != Some(addr) || self.sockets.contains_key(&addr) {
            return Err(BindError::Exhausted);
        }
        self.adopt(addr, *sock)
    }

    fn release(&mut self, relay: SocketAddr) {
        if let Some(s) = self.sockets.remove(&relay) {
            self.tokens.remove(&s.token);
            if let Some(d) = &self.doorbell {
                d.remove(s.sock.as_raw_fd());
            }
        }
    }

    fn bind_tcp(&mut self, family: Family) -> Result<SocketAddr, BindError> {
        let ip = match family {
            Family::V4 => self.ipv4,
            Family::V6 => self.ipv6,
        }
        .ok_or(BindError::FamilyUnsupported)?;
        for _ in 0..self.ports.len() {
            let addr = SocketAddr::new(ip, self.ports[self.cursor % self.ports.len()]);
            self.cursor = self.cursor.wrapping_add(1);
            // One relay address per port, whichever the protocol: the core
            // finds allocations by address.
            if self.sockets.contains_key(&addr) || self.tcp.has_listener(addr) {
                continue;
            }
            if self.tcp.listen(addr).is_ok() {
                return Ok(addr);
            }
        }
        Err(BindError::Exhausted)
    }

    fn release_tcp(&mut self, relay: SocketAddr) {
        self.tcp.release(relay);
    }

    fn tcp_connect(&mut self, relay: SocketAddr, peer: SocketAddr) -> Option<u32> {
        self.tcp.connect(relay, peer)
    }

    fn tcp_expire(&mut self, id: u32) {
        self.tcp.expire(id);
    }

    fn tcp_close(&mut self, id: u32) {
        self.tcp.close(id);
    }

    fn tcp_open(&self, id: u32) -> bool {
        self.tcp.is_open(id)
    }
}

/// Receives peer datagrams on all of the shard's relay sockets: one pass
/// per ready socket, then the next round; the shard sleeps in the doorbell
/// when none has anything.
async fn relay_loop(shard: Rc<Shard>, doorbell: Rc<doorbell::Doorbell>) {
    let mut blocked = Vec::new();
    let mut ready = Vec::with_capacity(doorbell::READY_MAX);
    loop {
        if let Err(e) = doorbell.ready(&mut ready) {
            tracing::warn!(error = %e, "epoll_wait on the relay sockets failed");
        }
        if ready.is_empty() {
            if let Err(e) = doorbell.wait().await {
                // Not expected; back off rather than spin.
                tracing::warn!(error = %e, "waiting for relay sockets failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
            continue;
        }
        for token in ready.drain(..) {
            // Released since the list was taken: skip it.
            let Some((sock, relay)) = shard.binder.borrow().by_token(token) else { continue };
            // An error is a pending ICMP report of an earlier send (read and
            // so cleared) or an empty queue: the next round tells.
            let _ = shard.udp_relay_pass(&sock, relay, &mut blocked);
            send_blocked(&shard.metrics, &mut blocked).await;
        }
        shard.end_round(&mut blocked);
        send_blocked(&shard.metrics, &mut blocked).await;
        glommio::yield_if_needed().await;
    }
}

/// Receives client datagrams on one UDP listener.
async fn udp_client_loop(shard: Rc<Shard>, sock: Rc<UdpSocket>, local: SocketAddr) {
    let mut blocked = Vec::new();
    let batch = shard.udp_io.borrow().recv.capacity();
    loop {
        let pass = shard.udp_client_pass(&sock, local, &mut blocked);
        send_blocked(&shard.metrics, &mut blocked).await;
        match pass {
            Ok(n) if n == batch => glommio::yield_if_needed().await,
            _ => readable(&sock).await,
        }
    }
}

/// Receives datagrams on one DTLS listener. DTLS is for the few clients
/// that ask for it: one datagram per receive.
async fn dtls_loop(shard: Rc<Shard>, sock: Rc<UdpSocket>, local: SocketAddr) {
    // The largest UDP payload.
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            // A pending ICMP report of an earlier send: read and so
            // cleared. Pause all the same, should an error repeat.
            Err(_) => {
                glommio::timer::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        let tuple = FiveTuple { client: from, server: local, transport: Transport::Dtls };
        shard.dtls_datagram(&sock, tuple, &buf[..n]);
        shard.flush_stream_sends().await;
    }
}

/// A shard's bound UDP sockets (by address), TCP listeners, TLS listeners
/// and DTLS sockets (by address).
type Listeners = (
    FastMap<SocketAddr, Rc<UdpSocket>>,
    Vec<glommio::net::TcpListener>,
    Vec<glommio::net::TcpListener>,
    FastMap<SocketAddr, Rc<UdpSocket>>,
);

/// Runs one shard until shutdown.
pub async fn run_shard(setup: ShardSetup) -> anyhow::Result<()> {
    let mut tid_salt = [0u8; 4];
    tid_salt.copy_from_slice(&setup.nonce_key[..4]);
    let server = Server::new(
        setup.server_config.clone(),
        crate::auth::NonceKey::new(setup.nonce_key, setup.config.nonce_lifetime_secs),
        setup.quotas.clone(),
        setup.metrics.clone(),
        u32::from_be_bytes(tid_salt) ^ setup.index as u32,
    );
    let bound = (|| -> anyhow::Result<Listeners> {
        let mut udp = FastMap::default();
        let mut tcp = Vec::new();
        let mut tls = Vec::new();
        for addr in &setup.config.listen {
            let s = UdpSocket::bind(*addr).map_err(|e| anyhow::anyhow!("bind UDP {addr}: {e}"))?;
            if setup.config.udp_receive_buffer_kib > 0 {
                let bytes = setup.config.udp_receive_buffer_kib << 10;
                if let Err(e) = set_receive_buffer(&s, bytes) {
                    tracing::warn!(%addr, error = %e, "could not set the UDP receive buffer; the kernel default applies");
                }
            }
            if setup.config.udp_gro {
                enable_gro(&s, *addr);
            }
            udp.insert(*addr, Rc::new(s));
            tcp.push(glommio::net::TcpListener::bind(*addr).map_err(|e| anyhow::anyhow!("bind TCP {addr}: {e}"))?);
        }
        for addr in &setup.config.tls_listen {
            tls.push(glommio::net::TcpListener::bind(*addr).map_err(|e| anyhow::anyhow!("bind TLS {addr}: {e}"))?);
        }
        let mut dtls = FastMap::default();
        for addr in &setup.config.dtls_listen {
            let s = UdpSocket::bind(*addr).map_err(|e| anyhow::anyhow!("bind DTLS {addr}: {e}"))?;
            dtls.insert(*addr, Rc::new(s));
        }
        Ok((udp, tcp, tls, dtls))
    })();
    let (udp, tcp, tls, dtls_socks) = match bound {
        Ok(b) => {
            let _ = setup.ready.send(Ok(()));
            b
        }
        Err(e) => {
            let _ = setup.ready.send(Err(e.to_string()));
            return Err(e);
        }
    };
    let shard = Rc::new(Shard {
        server: RefCell::new(server),
        binder: RefCell::new(UdpBinder::new(&setup)),
        udp: udp.clone(),
        dtls_socks: dtls_socks.clone(),
        dtls: RefCell::new(dtls::Sessions::new(setup.dtls.clone())),
        streams: RefCell::new(HashMap::new()),
        metrics: setup.metrics.clone(),
        udp_io: RefCell::new(UdpIo {
            recv: RecvBatch::new(setup.config.udp_batch).with_gro(setup.config.udp_gro),
            // Room for the datagrams of one whole coalesced message.
            send: SendQueue::new(setup.config.udp_batch.max(batch::GRO_MAX_SEGMENTS), setup.config.udp_gso),
        }),
        stream_io: RefCell::new(UdpIo { recv: RecvBatch::without_slots(), send: SendQueue::new(setup.config.udp_batch, setup.config.udp_gso) }),
        stream_blocked: RefCell::new(Vec::new()),
    });
    shard.binder.borrow_mut().shard = Rc::downgrade(&shard);
    let doorbell = Rc::new(doorbell::Doorbell::new().map_err(|e| anyhow::anyhow!("relay socket doorbell: {e}"))?);
    shard.binder.borrow_mut().doorbell = Some(doorbell.clone());
    glommio::spawn_local(relay_loop(shard.clone(), doorbell)).detach();
    shard.binder.borrow_mut().tcp.set_shard(Rc::downgrade(&shard));
    for (addr, sock) in udp {
        glommio::spawn_local(udp_client_loop(shard.clone(), sock, addr)).detach();
    }
    for l in tcp {
        glommio::spawn_local(stream::accept_loop(shard.clone(), l, None)).detach();
    }
    for l in tls {
        glommio::spawn_local(stream::accept_loop(shard.clone(), l, setup.tls.clone())).detach();
    }
    for (addr, sock) in dtls_socks {
        glommio::spawn_local(dtls_loop(shard.clone(), sock, addr)).detach();
    }
    let mut drain_deadline: Option<Instant> = None;
    loop {
        glommio::timer::sleep(Duration::from_millis(250)).await;
        {
            let mut server = shard.server.borrow_mut();
            let mut binder = shard.binder.borrow_mut();
            server.handle_timeout(now(), &mut *binder);
        }
        shard.dtls_tick().await;
        if setup.stop.load(Ordering::Relaxed) {
            let deadline = *drain_deadline.get_or_insert_with(|| {
                shard.server.borrow_mut().set_draining();
                Instant::now() + Duration::from_secs(setup.config.drain_secs)
            });
            if shard.server.borrow().allocation_count() == 0 || Instant::now() >= deadline {
                break;
            }
        }
    }
    let mut closing = Vec::new();
    shard.dtls.borrow_mut().close_all(Instant::now(), &shard.metrics, &mut closing);
    shard.send_dtls(closing).await;
    let mut server = shard.server.borrow_mut();
    let mut binder = shard.binder.borrow_mut();
    server.remove_all(&mut *binder);
    Ok(())
}

/// Sets `UDP_GRO` on a UDP socket of the shard. Where the kernel refuses
/// it, the socket receives one datagram per message, which the shard's
/// batch reads correctly too.
fn enable_gro(sock: &impl std::os::fd::AsRawFd, addr: SocketAddr) {
    if let Err(e) = batch::set_gro(sock.as_raw_fd()) {
        tracing::debug!(%addr, error = %e, "UDP GRO not available on this socket");
    }
}

/// Asks for a receive buffer of `bytes` on a UDP socket (`SO_RCVBUF`; the
/// kernel caps it at `net.core.rmem_max`).
fn set_receive_buffer(sock: &impl std::os::fd::AsRawFd, bytes: usize) -> std::io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: the descriptor is open for the call (`sock` is borrowed), and
    // the option value is a c_int whose size is passed with it.
    let rc = unsafe { libc::setsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, (&raw const value).cast(), size_of::<libc::c_int>() as libc::socklen_t) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

#[cfg(test)]
mod receive_buffer_tests {
    use std::os::fd::AsRawFd as _;

    /// The buffer asked for is granted, up to the kernel's cap (the kernel
    /// reports twice the granted size, its bookkeeping included).
    #[test]
    fn the_receive_buffer_grows_up_to_the_kernel_cap() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let cap: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max").expect("rmem_max").trim().parse().expect("number");
        let asked = 1 << 20;
        super::set_receive_buffer(&sock, asked).expect("setsockopt");
        let mut got: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: the descriptor is open, and `got`/`len` describe a c_int.
        let rc = unsafe { libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, (&raw mut got).cast(), &raw mut len) };
        assert_eq!(rc, 0);
        assert_eq!(usize::try_from(got).expect("size"), 2 * asked.min(cap));
    }
}
