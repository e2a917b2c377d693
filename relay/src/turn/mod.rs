//! TURN server state machine (RFC 8656, RFC 6156, RFC 6062), sans-IO.
//!
//! One [`Server`] runs per shard and owns every allocation whose client
//! 5-tuple lands on that shard. Input comes in through
//! [`Server::handle_client`] (a datagram or framed message from a client),
//! [`Server::handle_peer`] (a datagram that arrived on a relay address) and
//! [`Server::handle_timeout`]; output is returned by value. The server never
//! reads a clock, a socket or the RNG: time arrives as [`Now`], randomness
//! as the nonce key, and relay sockets are opened through the
//! [`RelayBinder`] the driver passes in, so tests drive it directly.
//!
//! Invariants:
//! - A peer refused by [`PeerPolicy`] never gets a permission or channel,
//!   and every relayed packet is checked against the policy again, so a
//!   packet can only reach a peer the policy allows.
//! - Every allocation holds one quota slot from [`Quotas`] and one relay
//!   address from the binder per family it has (two for a dual
//!   allocation); each address is returned exactly once, when its family is
//!   deleted or expires, and the slot when the allocation's last family
//!   goes (refresh to 0, expiry, or connection close).
//! - Tables are bounded: allocations by [`Quotas`], permissions, channels and
//!   TCP connections per allocation by [`ServerConfig`].
//!
//! TCP allocations (RFC 6062): the relay address is a listening TCP socket.
//! Connect asks the binder for an outgoing connection and answers when
//! [`Server::tcp_connected`] reports the outcome; a peer connecting in is
//! reported by [`Server::tcp_peer_accepted`], which sends a
//! ConnectionAttempt. The ConnectionBind that claims a connection arrives on
//! a new client connection, possibly on another shard: the core only
//! authenticates it ([`ClientOutput::ConnectionBind`]) and the driver pairs
//! the two connections.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::FastMap;
use crate::auth::{CredentialStore, LookupError, NonceCheck, NonceKey, credential_forms};
use crate::metrics::{DropReason, Metrics};
use crate::policy::PeerPolicy;
use crate::stun::{
    Class, IntegrityKind, Message, MessageBuilder, PasswordAlgorithm, attr, channel_data, code, method,
};

/// The current time, as the driver read it.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Monotonic time for lifetimes.
    pub mono: Instant,
    /// Wall-clock seconds for TURN REST expiry and nonces.
    pub unix_secs: u64,
}

/// Client transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// UDP.
    Udp,
    /// TCP.
    Tcp,
    /// TLS over TCP.
    Tls,
    /// DTLS over UDP (RFC 7350).
    Dtls,
}

impl Transport {
    /// TCP or TLS: a byte stream, the only transports that may ask for
    /// TCP relaying (RFC 6062 §4.1).
    pub fn is_stream(self) -> bool {
        matches!(self, Transport::Tcp | Transport::Tls)
    }
}

/// A client's 5-tuple: its address, the server address it reached and the
/// transport. Allocations are keyed by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FiveTuple {
    /// Client transport address.
    pub client: SocketAddr,
    /// Server transport address the client sent to.
    pub server: SocketAddr,
    /// Transport protocol.
    pub transport: Transport,
}

/// Address family of a relay address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }

    /// Slot in [`Allocation::relays`].
    fn index(self) -> usize {
        match self {
            Family::V4 => 0,
            Family::V6 => 1,
        }
    }

    /// The family a REQUESTED-ADDRESS-FAMILY or ADDITIONAL-ADDRESS-FAMILY
    /// value names (`0x01` IPv4, `0x02` IPv6, three reserved bytes).
    fn decode(v: &[u8]) -> Option<Self> {
        match v {
            [0x01, _, _, _] => Some(Family::V4),
            [0x02, _, _, _] => Some(Family::V6),
            _ => None,
        }
    }

    fn code(self) -> u8 {
        match self {
            Family::V4 => 0x01,
            Family::V6 => 0x02,
        }
    }
}

/// A port held open for a reservation, as the binder made it (for the
/// I/O driver, a bound UDP socket nobody reads).
pub type Held = Box<dyn std::any::Any + Send>;

/// Why a relay address could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindError {
    /// No relay address of that family is configured (440).
    FamilyUnsupported,
    /// The port range is exhausted or the socket could not be opened (508).
    Exhausted,
}

/// Opens and closes relay transport addresses and TCP peer connections;
/// implemented by the I/O driver (one UDP socket or TCP listener per
/// allocation) and by tests.
pub trait RelayBinder {
    /// Opens a relay address of a family.
    fn bind(&mut self, family: Family, even_port: bool) -> Result<SocketAddr, BindError>;
    /// Holds `addr` (the odd port next to an EVEN-PORT allocation's) open
    /// for a later Allocate with the reservation's token, which may arrive
    /// on another shard: the handle is moved there, and dropping it
    /// closes the port.
    fn hold(&mut self, addr: SocketAddr) -> Result<Held, BindError>;
    /// Opens exactly this relay address, from the handle of its
    /// reservation.
    fn bind_exact(&mut self, addr: SocketAddr, held: Held) -> Result<SocketAddr, BindError>;
    /// Closes a relay address opened by `bind`.
    fn release(&mut self, relay: SocketAddr);
    /// Opens a listening TCP relay address of a family (RFC 6062).
    fn bind_tcp(&mut self, family: Family) -> Result<SocketAddr, BindError>;
    /// Closes a TCP relay address opened by `bind_tcp`.
    fn release_tcp(&mut self, relay: SocketAddr);
    /// Starts a TCP connection from `relay` to `peer` and names it; `None`
    /// if it cannot start. The outcome comes back through
    /// [`Server::tcp_connected`].
    fn tcp_connect(&mut self, relay: SocketAddr, peer: SocketAddr) -> Option<u32>;
    /// Drops connection `id` unless a ConnectionBind has claimed it.
    fn tcp_expire(&mut self, id: u32);
    /// Closes connection `id`, claimed or not.
    fn tcp_close(&mut self, id: u32);
    /// True while connection `id` is connecting, waiting for its
    /// ConnectionBind, or relaying.
    fn tcp_open(&self, id: u32) -> bool;
}

/// Protocol limits and policy of one relay.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Realm of the long-term credentials.
    pub realm: String,
    /// SOFTWARE attribute sent in responses, if any.
    pub software: Option<String>,
    /// Lifetime given when the client asks for none or less (seconds).
    pub default_lifetime_secs: u32,
    /// Longest allocation lifetime granted per refresh (seconds).
    pub max_lifetime_secs: u32,
    /// Permission lifetime (RFC 8656: 300 s).
    pub permission_lifetime_secs: u32,
    /// Channel binding lifetime (RFC 8656: 600 s).
    pub channel_lifetime_secs: u32,
    /// Permissions per allocation; each costs ~48 bytes.
    pub max_permissions: usize,
    /// Channels per allocation; each costs ~64 bytes.
    pub max_channels: usize,
    /// TCP peer connections per TCP allocation (RFC 6062), pending or
    /// relaying; each holds two sockets and two 16 KiB buffers.
    pub max_tcp_connections: usize,
    /// Per-allocation bandwidth cap in bytes per second, both directions
    /// together; `None` for no cap. Bursts of one second are allowed.
    pub bandwidth_bytes_per_sec: Option<u64>,
    /// Which peers may be relayed to.
    pub policy: PeerPolicy,
    /// Where passwords come from.
    pub credentials: CredentialStore,
}

impl ServerConfig {
    /// RFC defaults with a realm and credentials.
    pub fn new(realm: &str, credentials: CredentialStore) -> Self {
        ServerConfig {
            realm: realm.to_owned(),
            software: Some("tessera-relay".to_owned()),
            default_lifetime_secs: 600,
            max_lifetime_secs: 3600,
            permission_lifetime_secs: 300,
            channel_lifetime_secs: 600,
            max_permissions: 64,
            max_channels: 64,
            max_tcp_connections: 64,
            bandwidth_bytes_per_sec: None,
            policy: PeerPolicy::default(),
            credentials,
        }
    }
}

/// Allocation quotas shared by all shards (taken only when an allocation is
/// created or removed, never on the data path).
#[derive(Debug)]
pub struct Quotas {
    per_user: u32,
    total: u32,
    state: Mutex<QuotaState>,
}

#[derive(Debug, Default)]
struct QuotaState {
    users: HashMap<String, u32>,
    total: u32,
    /// RESERVATION-TOKEN -> reserved relay address, its expiry and the
    /// port held open for it.
    reservations: HashMap<[u8; 8], Reservation>,
}

struct Reservation {
    /// Who made it (reservations count against the per-user quota).
    user: String,
    addr: SocketAddr,
    expires: Instant,
    held: Held,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation").field("addr", &self.addr).field("expires", &self.expires).finish_non_exhaustive()
    }
}

/// Which quota refused an allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaError {
    /// The user has `per_user` allocations (486).
    User,
    /// The relay has `total` allocations (508).
    Total,
}

impl Quotas {
    /// Quotas of `per_user` allocations per username and `total` overall.
    pub fn new(per_user: u32, total: u32) -> Self {
        Quotas { per_user, total, state: Mutex::new(QuotaState::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QuotaState> {
        // The state stays consistent even if a holder panicked: every
        // update is a single counter change.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a slot for `user`.
    pub fn acquire(&self, user: &str) -> Result<(), QuotaError> {
        let mut s = self.lock();
        if s.total >= self.total {
            return Err(QuotaError::Total);
        }
        let n = s.users.get(user).copied().unwrap_or(0);
        if n >= self.per_user {
            return Err(QuotaError::User);
        }
        s.users.insert(user.to_owned(), n + 1);
        s.total += 1;
        Ok(())
    }

    /// Returns a slot taken by `acquire`.
    pub fn release(&self, user: &str) {
        let mut s = self.lock();
        s.total = s.total.saturating_sub(1);
        if let Some(n) = s.users.get_mut(user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.users.remove(user);
            }
        }
    }

    /// Whether `user` may make a reservation: `Err` with the answer's
    /// code if the table is full (508) or the user holds `per_user`
    /// reservations already (486).
    fn can_reserve(&self, user: &str) -> Result<(), u16> {
        let s = self.lock();
        if s.reservations.len() >= MAX_RESERVATIONS {
            return Err(crate::stun::code::INSUFFICIENT_CAPACITY);
        }
        if s.reservations.values().filter(|r| r.user == user).count() >= self.per_user as usize {
            return Err(crate::stun::code::ALLOCATION_QUOTA_REACHED);
        }
        Ok(())
    }

    /// Records a reservation and the port held for it; gives the port back
    /// if the table filled meanwhile.
    fn reserve(&self, token: [u8; 8], user: &str, addr: SocketAddr, expires: Instant, held: Held) -> Result<(), Held> {
        let mut s = self.lock();
        if s.reservations.len() >= MAX_RESERVATIONS {
            return Err(held);
        }
        s.reservations.insert(token, Reservation { user: user.to_owned(), addr, expires, held });
        Ok(())
    }

    /// Takes a live reservation by token (single use): its address and
    /// held port.
    fn take_reservation(&self, token: &[u8; 8], now: Instant) -> Option<(SocketAddr, Held)> {
        let r = self.lock().reservations.remove(token)?;
        // An expired one's port closes here, outside the lock.
        (r.expires > now).then_some((r.addr, r.held))
    }

    /// True if a reservation holds this address.
    pub fn is_reserved(&self, addr: SocketAddr) -> bool {
        self.lock().reservations.values().any(|r| r.addr == addr)
    }

    /// Drops expired reservations, closing their ports.
    pub fn expire_reservations(&self, now: Instant) {
        let mut expired = Vec::new();
        {
            let mut s = self.lock();
            let keys: Vec<[u8; 8]> = s.reservations.iter().filter(|(_, r)| r.expires <= now).map(|(k, _)| *k).collect();
            for k in keys {
                expired.extend(s.reservations.remove(&k));
            }
        }
        drop(expired);
    }

    /// Reservations currently held.
    pub fn reservations(&self) -> usize {
        self.lock().reservations.len()
    }

    /// Allocations currently counted.
    pub fn total(&self) -> u32 {
        self.lock().total
    }
}

/// What to do with a packet from a client.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientOutput<'a> {
    /// Nothing to send (dropped, an indication that needs no answer, or a
    /// Connect whose answer waits for the connection).
    Nothing,
    /// An authenticated ConnectionBind (RFC 6062 §5.4) on a stream client
    /// without an allocation. If TCP connection `id` is waiting for a
    /// ConnectionBind by `username`, send `accept` and from then on relay
    /// the stream's bytes as they are; otherwise send `reject` (400).
    ConnectionBind {
        /// The CONNECTION-ID asked for.
        id: u32,
        /// The authenticated username.
        username: String,
        /// Success response.
        accept: Vec<u8>,
        /// 400 response.
        reject: Vec<u8>,
    },
    /// A STUN response to send back on the same 5-tuple.
    Reply(Vec<u8>),
    /// Payload to send from relay address `relay` to `peer`.
    ToPeer {
        /// Relay address to send from.
        relay: SocketAddr,
        /// Peer to send to.
        peer: SocketAddr,
        /// The application data.
        payload: &'a [u8],
    },
}

/// What to do with a packet from a peer.
#[derive(Debug, PartialEq, Eq)]
pub enum PeerOutput {
    /// Dropped (counted in metrics).
    Drop,
    /// Send `header` followed by the payload to the client as ChannelData.
    ChannelData {
        /// Client 5-tuple.
        to: FiveTuple,
        /// ChannelData header for the payload.
        header: [u8; 4],
    },
    /// Send this Data indication to the client.
    DataIndication {
        /// Client 5-tuple.
        to: FiveTuple,
        /// Encoded indication.
        message: Vec<u8>,
    },
}

#[derive(Debug)]
struct Channel {
    peer: SocketAddr,
    expires: Instant,
}

#[derive(Debug)]
struct TokenBucket {
    rate: u64,
    tokens: u64,
    last: Instant,
}

impl TokenBucket {
    fn take(&mut self, now: Instant, bytes: usize) -> bool {
        let elapsed_us = now.saturating_duration_since(self.last).as_micros();
        if elapsed_us > 0 {
            let add = (u128::from(self.rate) * elapsed_us / 1_000_000).min(u128::from(self.rate));
            self.tokens = (self.tokens + add as u64).min(self.rate);
            self.last = now;
        }
        let bytes = bytes as u64;
        if self.tokens >= bytes {
            self.tokens -= bytes;
            true
        } else {
            false
        }
    }
}

/// A Connect waiting for its outgoing connection, with what its answer
/// needs.
#[derive(Debug)]
struct PendingConnect {
    tid: [u8; 12],
    key: Vec<u8>,
    kind: IntegrityKind,
    fingerprint: bool,
}

/// A TCP peer connection of a TCP allocation (RFC 6062).
#[derive(Debug)]
struct TcpConn {
    peer: SocketAddr,
    /// Set while an outgoing connection is being made.
    connecting: Option<PendingConnect>,
    /// When an unclaimed connection is dropped; `None` once that check ran.
    bind_by: Option<Instant>,
}

/// How long a peer connection waits for its ConnectionBind (RFC 6062 §5.3:
/// 30 seconds).
const CONNECTION_BIND_SECS: u64 = 30;

/// The variable part of an Allocate's success answer.
#[derive(Debug, Clone, Copy)]
struct AllocateAnswer {
    /// Relay addresses by [`Family::index`].
    addrs: [Option<SocketAddr>; 2],
    /// The family a dual Allocate could not get and why (its
    /// ADDRESS-ERROR-CODE).
    missing: Option<(Family, u16)>,
    /// The RESERVATION-TOKEN of an EVEN-PORT reservation.
    token: Option<[u8; 8]>,
}

/// One relay address of an allocation, with its own lifetime.
#[derive(Debug)]
struct Relayed {
    addr: SocketAddr,
    expires: Instant,
}

#[derive(Debug)]
struct Allocation {
    username: String,
    /// Relay addresses by [`Family::index`]: one, or one of each family for
    /// a dual allocation (RFC 8656 ADDITIONAL-ADDRESS-FAMILY). Each family
    /// is refreshed, expires and can be deleted on its own; the allocation
    /// ends with its last.
    relays: [Option<Relayed>; 2],
    /// Peer connections by id; `Some` for TCP allocations (RFC 6062).
    tcp: Option<HashMap<u32, TcpConn>>,
    allocate_tid: [u8; 12],
    allocate_lifetime: u32,
    /// What the Allocate's answer gave, for answering a retransmission
    /// alike even after a family is gone.
    allocate_answer: AllocateAnswer,
    permissions: FastMap<IpAddr, Instant>,
    channels: FastMap<u16, Channel>,
    peer_channels: FastMap<SocketAddr, u16>,
    bucket: Option<TokenBucket>,
}

impl Allocation {
    fn permitted(&self, ip: IpAddr, now: Instant) -> bool {
        self.permissions.get(&ip).is_some_and(|e| *e > now)
    }

    /// The relay address of a family, if the allocation has one.
    fn relay(&self, family: Family) -> Option<SocketAddr> {
        self.relays[family.index()].as_ref().map(|r| r.addr)
    }

    /// The relay addresses, IPv4 first.
    fn relay_addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.relays.iter().flatten().map(|r| r.addr)
    }

    /// Forgets the permissions and channels of peers of a family (its
    /// relay address is gone).
    fn forget_peers_of(&mut self, family: Family) {
        self.permissions.retain(|ip, _| Family::of(*ip) != family);
        self.channels.retain(|_, c| Family::of(c.peer.ip()) != family);
        self.peer_channels.retain(|p, _| Family::of(p.ip()) != family);
    }
}

/// Authenticated request context.
struct Authed {
    username: String,
    key: Vec<u8>,
    kind: IntegrityKind,
}

/// Comprehension-required attributes this server understands.
const KNOWN_ATTRS: &[u16] = &[
    attr::USERNAME,
    attr::MESSAGE_INTEGRITY,
    attr::MESSAGE_INTEGRITY_SHA256,
    attr::ERROR_CODE,
    attr::CHANNEL_NUMBER,
    attr::LIFETIME,
    attr::XOR_PEER_ADDRESS,
    attr::DATA,
    attr::REALM,
    attr::NONCE,
    attr::REQUESTED_ADDRESS_FAMILY,
    attr::EVEN_PORT,
    attr::REQUESTED_TRANSPORT,
    attr::DONT_FRAGMENT,
    attr::PASSWORD_ALGORITHM,
    attr::RESERVATION_TOKEN,
    attr::XOR_MAPPED_ADDRESS,
    attr::MAPPED_ADDRESS,
    attr::CONNECTION_ID,
    // ICE attributes clients put in Binding requests (RFC 8445).
    0x0024,
    0x0025,
];

/// The TURN server of one shard.
#[derive(Debug)]
pub struct Server {
    cfg: Arc<ServerConfig>,
    nonces: NonceKey,
    quotas: Arc<Quotas>,
    metrics: Arc<Metrics>,
    allocations: FastMap<FiveTuple, Allocation>,
    by_relay: FastMap<SocketAddr, FiveTuple>,
    /// TCP peer connections (RFC 6062) by id, with their allocation.
    tcp_conns: HashMap<u32, FiveTuple>,
    draining: bool,
    tid_counter: u64,
    tid_salt: u32,
}

/// Reservations (EVEN-PORT with R) held at once, all shards together.
const MAX_RESERVATIONS: usize = 4096;
/// How long a reserved port is held (RFC 8656 §7.2: about 30 seconds).
const RESERVATION_SECS: u64 = 30;

impl Server {
    /// A server with shared config, nonce key, quotas and this shard's metrics.
    /// `tid_salt` distinguishes transaction ids of Data indications between
    /// shards.
    pub fn new(cfg: Arc<ServerConfig>, nonces: NonceKey, quotas: Arc<Quotas>, metrics: Arc<Metrics>, tid_salt: u32) -> Self {
        Server {
            cfg,
            nonces,
            quotas,
            metrics,
            allocations: FastMap::default(),
            by_relay: FastMap::default(),
            tcp_conns: HashMap::new(),
            draining: false,
            tid_counter: 0,
            tid_salt,
        }
    }

    /// This shard's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// True if the client on `tuple` holds an allocation.
    pub fn has_allocation(&self, tuple: FiveTuple) -> bool {
        self.allocations.contains_key(&tuple)
    }

    /// Number of live allocations on this shard.
    pub fn allocation_count(&self) -> usize {
        self.allocations.len()
    }

    /// Stops granting new allocations (answering 508); existing ones keep
    /// working until they expire or are refreshed to zero.
    pub fn set_draining(&mut self) {
        self.draining = true;
    }

    /// Handles one message from a client.
    pub fn handle_client<'a>(
        &mut self,
        now: Now,
        tuple: FiveTuple,
        buf: &'a [u8],
        binder: &mut dyn RelayBinder,
    ) -> ClientOutput<'a> {
        if channel_data::is_channel_data(buf) {
            return self.client_channel_data(now, tuple, buf);
        }
        let Ok(msg) = Message::parse(buf) else {
            self.metrics.drop_packet(DropReason::Malformed);
            return ClientOutput::Nothing;
        };
        match msg.class() {
            Class::Request => {
                self.metrics.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if msg.method() == method::CONNECTION_BIND {
                    return self.connection_bind(now, tuple, &msg);
                }
                match self.request(now, tuple, &msg, binder) {
                    Some(reply) => ClientOutput::Reply(reply),
                    None => ClientOutput::Nothing,
                }
            }
            Class::Indication if msg.method() == method::SEND => self.send_indication(now, tuple, &msg),
            _ => ClientOutput::Nothing,
        }
    }

    /// Handles a datagram from `peer` that arrived on relay address `relay`.
    pub fn handle_peer(&mut self, now: Now, relay: SocketAddr, peer: SocketAddr, payload: &[u8]) -> PeerOutput {
        let Some(tuple) = self.by_relay.get(&relay).copied() else {
            self.metrics.drop_packet(DropReason::NoAllocation);
            return PeerOutput::Drop;
        };
        let Some(alloc) = self.allocations.get_mut(&tuple) else {
            self.metrics.drop_packet(DropReason::NoAllocation);
            return PeerOutput::Drop;
        };
        if !alloc.permitted(peer.ip(), now.mono) {
            self.metrics.drop_packet(DropReason::NoPermission);
            return PeerOutput::Drop;
        }
        let Ok(len) = u16::try_from(payload.len()) else {
            self.metrics.drop_packet(DropReason::Malformed);
            return PeerOutput::Drop;
        };
        if let Some(b) = alloc.bucket.as_mut()
            && !b.take(now.mono, payload.len())
        {
            self.metrics.drop_packet(DropReason::Bandwidth);
            return PeerOutput::Drop;
        }
        use std::sync::atomic::Ordering::Relaxed;
        self.metrics.packets_to_client.fetch_add(1, Relaxed);
        self.metrics.bytes_to_client.fetch_add(payload.len() as u64, Relaxed);
        if let Some(ch) = alloc.peer_channels.get(&peer)
            && alloc.channels.get(ch).is_some_and(|c| c.expires > now.mono)
        {
            return PeerOutput::ChannelData { to: tuple, header: channel_data::header(*ch, len) };
        }
        let mut b = MessageBuilder::new(method::DATA, Class::Indication, self.indication_tid());
        b.xor_addr(attr::XOR_PEER_ADDRESS, peer).attr(attr::DATA, payload);
        PeerOutput::DataIndication { to: tuple, message: b.finish() }
    }

    /// A transaction id for an indication the server sends: this shard's
    /// salt and a counter.
    fn indication_tid(&mut self) -> [u8; 12] {
        self.tid_counter = self.tid_counter.wrapping_add(1);
        let mut tid = [0u8; 12];
        tid[..4].copy_from_slice(&self.tid_salt.to_be_bytes());
        tid[4..].copy_from_slice(&self.tid_counter.to_be_bytes());
        tid
    }

    /// Removes expired allocations, permissions and channels.
    pub fn handle_timeout(&mut self, now: Now, binder: &mut dyn RelayBinder) {
        let expired: Vec<(FiveTuple, Family)> = self
            .allocations
            .iter()
            .flat_map(|(t, a)| a.relays.iter().flatten().filter(|r| r.expires <= now.mono).map(|r| (*t, Family::of(r.addr.ip()))))
            .collect();
        for (t, family) in expired {
            self.remove_family(t, family, binder);
        }
        self.quotas.expire_reservations(now.mono);
        for a in self.allocations.values_mut() {
            if let Some(conns) = a.tcp.as_mut() {
                for (id, c) in conns.iter_mut() {
                    if c.bind_by.is_some_and(|t| t <= now.mono) {
                        binder.tcp_expire(*id);
                        c.bind_by = None;
                    }
                }
                // Connections that ended (either side closed) are forgotten,
                // and the binder lets go of them.
                let tcp_conns = &mut self.tcp_conns;
                conns.retain(|id, c| {
                    let keep = c.connecting.is_some() || binder.tcp_open(*id);
                    if !keep {
                        tcp_conns.remove(id);
                        binder.tcp_close(*id);
                    }
                    keep
                });
            }
            a.permissions.retain(|_, e| *e > now.mono);
            let gone: Vec<u16> = a.channels.iter().filter(|(_, c)| c.expires <= now.mono).map(|(n, _)| *n).collect();
            for n in gone {
                if let Some(c) = a.channels.remove(&n) {
                    a.peer_channels.remove(&c.peer);
                }
            }
        }
    }

    /// The client's stream connection closed: its allocation goes with it
    /// (RFC 8656 §7).
    pub fn client_closed(&mut self, tuple: FiveTuple, binder: &mut dyn RelayBinder) {
        self.remove(tuple, binder);
    }

    /// Removes every allocation (shutdown).
    pub fn remove_all(&mut self, binder: &mut dyn RelayBinder) {
        let all: Vec<FiveTuple> = self.allocations.keys().copied().collect();
        for t in all {
            self.remove(t, binder);
        }
    }

    fn remove(&mut self, tuple: FiveTuple, binder: &mut dyn RelayBinder) {
        if let Some(a) = self.allocations.remove(&tuple) {
            if let Some(conns) = &a.tcp {
                for id in conns.keys() {
                    binder.tcp_close(*id);
                    self.tcp_conns.remove(id);
                }
            }
            for relay in a.relay_addrs() {
                self.by_relay.remove(&relay);
                if a.tcp.is_some() {
                    binder.release_tcp(relay);
                } else {
                    binder.release(relay);
                }
            }
            self.quotas.release(&a.username);
            self.metrics.allocations.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Deletes the relay address of one family, with the permissions,
    /// channels and TCP connections of that family's peers (RFC 8656 §8:
    /// the other family of a dual allocation is not touched). Deleting the
    /// last one removes the allocation.
    fn remove_family(&mut self, tuple: FiveTuple, family: Family, binder: &mut dyn RelayBinder) {
        let Some(a) = self.allocations.get_mut(&tuple) else { return };
        if a.relay(family).is_none() {
            return;
        }
        if a.relays.iter().flatten().count() == 1 {
            self.remove(tuple, binder);
            return;
        }
        let Some(r) = a.relays[family.index()].take() else { return };
        self.by_relay.remove(&r.addr);
        a.forget_peers_of(family);
        match a.tcp.as_mut() {
            None => binder.release(r.addr),
            Some(conns) => {
                let tcp_conns = &mut self.tcp_conns;
                conns.retain(|id, c| {
                    let keep = Family::of(c.peer.ip()) != family;
                    if !keep {
                        binder.tcp_close(*id);
                        tcp_conns.remove(id);
                    }
                    keep
                });
                binder.release_tcp(r.addr);
            }
        }
    }

    fn relay_payload<'a>(&mut self, now: Now, tuple: FiveTuple, peer: SocketAddr, payload: &'a [u8]) -> ClientOutput<'a> {
        if self.cfg.policy.check(peer.ip()).is_err() {
            self.metrics.drop_packet(DropReason::PeerDenied);
            return ClientOutput::Nothing;
        }
        let Some(alloc) = self.allocations.get_mut(&tuple) else {
            self.metrics.drop_packet(DropReason::NoAllocation);
            return ClientOutput::Nothing;
        };
        // A TCP allocation relays only over its data connections; a peer
        // goes out through the relay address of its own family.
        let relay = match alloc.relay(Family::of(peer.ip())) {
            Some(r) if alloc.tcp.is_none() && alloc.permitted(peer.ip(), now.mono) => r,
            _ => {
                self.metrics.drop_packet(DropReason::NoPermission);
                return ClientOutput::Nothing;
            }
        };
        if let Some(b) = alloc.bucket.as_mut()
            && !b.take(now.mono, payload.len())
        {
            self.metrics.drop_packet(DropReason::Bandwidth);
            return ClientOutput::Nothing;
        }
        use std::sync::atomic::Ordering::Relaxed;
        self.metrics.packets_to_peer.fetch_add(1, Relaxed);
        self.metrics.bytes_to_peer.fetch_add(payload.len() as u64, Relaxed);
        ClientOutput::ToPeer { relay, peer, payload }
    }

    fn client_channel_data<'a>(&mut self, now: Now, tuple: FiveTuple, buf: &'a [u8]) -> ClientOutput<'a> {
        let Some((ch, payload)) = channel_data::parse(buf) else {
            self.metrics.drop_packet(DropReason::Malformed);
            return ClientOutput::Nothing;
        };
        let Some(alloc) = self.allocations.get(&tuple) else {
            self.metrics.drop_packet(DropReason::NoAllocation);
            return ClientOutput::Nothing;
        };
        let Some(peer) = alloc.channels.get(&ch).filter(|c| c.expires > now.mono).map(|c| c.peer) else {
            self.metrics.drop_packet(DropReason::NoChannel);
            return ClientOutput::Nothing;
        };
        self.relay_payload(now, tuple, peer, payload)
    }

    fn send_indication<'a>(&mut self, now: Now, tuple: FiveTuple, msg: &Message<'a>) -> ClientOutput<'a> {
        if !self.allocations.contains_key(&tuple) {
            self.metrics.drop_packet(DropReason::NoAllocation);
            return ClientOutput::Nothing;
        }
        let (Some(Ok(peer)), Some(data)) = (msg.get_xor_addr(attr::XOR_PEER_ADDRESS), msg.get(attr::DATA)) else {
            self.metrics.drop_packet(DropReason::Malformed);
            return ClientOutput::Nothing;
        };
        self.relay_payload(now, tuple, peer, data)
    }

    fn response(&self, req: &Message<'_>, class: Class) -> MessageBuilder {
        MessageBuilder::new(req.method(), class, req.transaction_id())
    }

    fn finish(&self, req: &Message<'_>, mut b: MessageBuilder, auth: Option<&Authed>) -> Vec<u8> {
        if let Some(s) = &self.cfg.software {
            b.attr(attr::SOFTWARE, s.as_bytes());
        }
        if let Some(a) = auth {
            b.integrity_of(a.kind, &a.key);
        }
        if fingerprint_present(req.bytes()) {
            b.fingerprint();
        }
        b.finish()
    }

    fn error(&self, req: &Message<'_>, err: u16, auth: Option<&Authed>) -> Vec<u8> {
        tracing::debug!(method = req.method(), err, attrs = ?req.attribute_types().collect::<Vec<_>>(), "error response");
        let mut b = self.response(req, Class::Error);
        b.error_code(err);
        self.finish(req, b, auth)
    }

    fn challenge(&self, now: Now, tuple: FiveTuple, req: &Message<'_>, err: u16) -> Vec<u8> {
        let mut b = self.response(req, Class::Error);
        b.error_code(err)
            .attr(attr::REALM, self.cfg.realm.as_bytes())
            .attr(attr::NONCE, self.nonces.issue(now.unix_secs, tuple.client).as_bytes());
        self.finish(req, b, None)
    }

    fn auth_failure(&self, now: Now, tuple: FiveTuple, req: &Message<'_>) -> Vec<u8> {
        self.metrics.auth_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.challenge(now, tuple, req, code::UNAUTHENTICATED)
    }

    fn authenticate(&self, now: Now, tuple: FiveTuple, req: &Message<'_>) -> Result<Authed, Vec<u8>> {
        let Some(kind) = req.integrity_kind() else {
            return Err(self.challenge(now, tuple, req, code::UNAUTHENTICATED));
        };
        let (Some(username), Some(realm), Some(nonce)) =
            (req.get_str(attr::USERNAME), req.get_str(attr::REALM), req.get_str(attr::NONCE))
        else {
            self.metrics.auth_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(self.error(req, code::BAD_REQUEST, None));
        };
        if self.nonces.check(nonce, now.unix_secs, tuple.client) != NonceCheck::Valid {
            return Err(self.challenge(now, tuple, req, code::STALE_NONCE));
        }
        if realm != self.cfg.realm {
            return Err(self.auth_failure(now, tuple, req));
        }
        let alg = match req.get(attr::PASSWORD_ALGORITHM) {
            None => PasswordAlgorithm::Md5,
            Some(v) => match PasswordAlgorithm::decode(v) {
                Some(a) => a,
                None => return Err(self.error(req, code::BAD_REQUEST, None)),
            },
        };
        let found = match self.cfg.credentials.lookup(username, now.unix_secs) {
            Ok(f) => f,
            Err(LookupError::UnknownUser | LookupError::Expired) => return Err(self.auth_failure(now, tuple, req)),
        };
        let realms = credential_forms(realm);
        for p in &found.passwords {
            for r in &realms {
                let key = alg.key(username, r, p);
                if req.verify_integrity(&key) {
                    return Ok(Authed { username: found.user, key, kind });
                }
            }
        }
        Err(self.auth_failure(now, tuple, req))
    }

    /// A 420 answer naming the comprehension-required attributes this
    /// server does not know, if there are any.
    fn unknown_attributes(&self, req: &Message<'_>) -> Option<Vec<u8>> {
        let unknown = req.unknown_required(KNOWN_ATTRS);
        if unknown.is_empty() {
            return None;
        }
        let mut b = self.response(req, Class::Error);
        b.error_code(code::UNKNOWN_ATTRIBUTE);
        let v: Vec<u8> = unknown.iter().take(16).flat_map(|t| t.to_be_bytes()).collect();
        b.attr(attr::UNKNOWN_ATTRIBUTES, &v);
        Some(self.finish(req, b, None))
    }

    /// Answers a request; `None` when the answer comes later (Connect).
    fn request(&mut self, now: Now, tuple: FiveTuple, req: &Message<'_>, binder: &mut dyn RelayBinder) -> Option<Vec<u8>> {
        let m = req.method();
        if m == method::BINDING {
            let mut b = self.response(req, Class::Success);
            b.xor_addr(attr::XOR_MAPPED_ADDRESS, tuple.client);
            return Some(self.finish(req, b, None));
        }
        if !matches!(m, method::ALLOCATE | method::REFRESH | method::CREATE_PERMISSION | method::CHANNEL_BIND | method::CONNECT) {
            return Some(self.error(req, code::BAD_REQUEST, None));
        }
        if let Some(reply) = self.unknown_attributes(req) {
            return Some(reply);
        }
        let auth = match self.authenticate(now, tuple, req) {
            Ok(a) => a,
            Err(resp) => return Some(resp),
        };
        if m != method::ALLOCATE {
            match self.allocations.get(&tuple) {
                None => return Some(self.error(req, code::ALLOCATION_MISMATCH, Some(&auth))),
                Some(a) if a.username != auth.username => {
                    return Some(self.error(req, code::WRONG_CREDENTIALS, Some(&auth)));
                }
                Some(_) => {}
            }
        }
        Some(match m {
            method::ALLOCATE => self.allocate(now, tuple, req, &auth, binder),
            method::REFRESH => self.refresh(now, tuple, req, &auth, binder),
            method::CREATE_PERMISSION => self.create_permission(now, tuple, req, &auth),
            method::CONNECT => return self.connect(tuple, req, &auth, binder),
            _ => self.channel_bind(now, tuple, req, &auth),
        })
    }

    /// Connect (RFC 6062 §5.2): checks the request and starts the outgoing
    /// connection; the answer goes out from [`Server::tcp_connected`].
    fn connect(&mut self, tuple: FiveTuple, req: &Message<'_>, auth: &Authed, binder: &mut dyn RelayBinder) -> Option<Vec<u8>> {
        let Some(a) = self.allocations.get(&tuple) else {
            return Some(self.error(req, code::ALLOCATION_MISMATCH, Some(auth)));
        };
        let Some(conns) = a.tcp.as_ref() else {
            return Some(self.error(req, code::BAD_REQUEST, Some(auth)));
        };
        let peer = match req.get_xor_addr(attr::XOR_PEER_ADDRESS) {
            Some(Ok(p)) => p,
            _ => return Some(self.error(req, code::BAD_REQUEST, Some(auth))),
        };
        // Pending or relaying connections to the same peer (ended ones are
        // forgotten on the next timeout tick; check them now).
        if conns.iter().any(|(id, c)| c.peer == peer && (c.connecting.is_some() || binder.tcp_open(*id))) {
            return Some(self.error(req, code::CONNECTION_ALREADY_EXISTS, Some(auth)));
        }
        if let Err(c) = self.check_peer(tuple, peer) {
            return Some(self.error(req, c, Some(auth)));
        }
        let Some(relay) = a.relay(Family::of(peer.ip())) else {
            return Some(self.error(req, code::PEER_ADDRESS_FAMILY_MISMATCH, Some(auth)));
        };
        let live = conns.iter().filter(|(id, c)| c.connecting.is_some() || binder.tcp_open(**id)).count();
        if live >= self.cfg.max_tcp_connections {
            return Some(self.error(req, code::INSUFFICIENT_CAPACITY, Some(auth)));
        }
        let Some(id) = binder.tcp_connect(relay, peer) else {
            return Some(self.error(req, code::CONNECTION_TIMEOUT_OR_FAILURE, Some(auth)));
        };
        let pending = PendingConnect { tid: req.transaction_id(), key: auth.key.clone(), kind: auth.kind, fingerprint: fingerprint_present(req.bytes()) };
        if let Some(conns) = self.allocations.get_mut(&tuple).and_then(|a| a.tcp.as_mut()) {
            conns.insert(id, TcpConn { peer, connecting: Some(pending), bind_by: None });
            self.tcp_conns.insert(id, tuple);
        }
        None
    }

    /// The outgoing connection `id` asked for by a Connect was made (`ok`)
    /// or failed. Returns the control connection and the Connect's answer
    /// (success with CONNECTION-ID, or 447) and the allocation's username;
    /// `None` if the allocation is gone (the driver closes the connection).
    pub fn tcp_connected(&mut self, now: Now, id: u32, ok: bool) -> Option<(FiveTuple, String, Vec<u8>)> {
        let tuple = *self.tcp_conns.get(&id)?;
        let software = self.cfg.software.clone();
        let a = self.allocations.get_mut(&tuple)?;
        let conns = a.tcp.as_mut()?;
        let conn = conns.get_mut(&id)?;
        let p = conn.connecting.take()?;
        let mut b = MessageBuilder::new(method::CONNECT, if ok { Class::Success } else { Class::Error }, p.tid);
        if ok {
            b.attr_u32(attr::CONNECTION_ID, id);
            conn.bind_by = Some(now.mono + Duration::from_secs(CONNECTION_BIND_SECS));
        } else {
            b.error_code(code::CONNECTION_TIMEOUT_OR_FAILURE);
            conns.remove(&id);
            self.tcp_conns.remove(&id);
        }
        if let Some(s) = software {
            b.attr(attr::SOFTWARE, s.as_bytes());
        }
        b.integrity_of(p.kind, &p.key);
        if p.fingerprint {
            b.fingerprint();
        }
        Some((tuple, a.username.clone(), b.finish()))
    }

    /// A peer connected to TCP relay address `relay` (RFC 6062 §5.3); the
    /// driver named the connection `id`. If the allocation permits the
    /// peer, returns the control connection, the allocation's username and
    /// the ConnectionAttempt indication to send on it; `None` means close
    /// the connection.
    pub fn tcp_peer_accepted(&mut self, now: Now, relay: SocketAddr, peer: SocketAddr, id: u32) -> Option<(FiveTuple, String, Vec<u8>)> {
        let Some(tuple) = self.by_relay.get(&relay).copied() else {
            self.metrics.drop_packet(DropReason::NoAllocation);
            return None;
        };
        if self.cfg.policy.check(peer.ip()).is_err() {
            self.metrics.drop_packet(DropReason::PeerDenied);
            return None;
        }
        let max = self.cfg.max_tcp_connections;
        let a = self.allocations.get_mut(&tuple)?;
        if !a.permitted(peer.ip(), now.mono) {
            self.metrics.drop_packet(DropReason::NoPermission);
            return None;
        }
        let conns = a.tcp.as_mut()?;
        if conns.len() >= max {
            self.metrics.drop_packet(DropReason::Io);
            return None;
        }
        conns.insert(id, TcpConn { peer, connecting: None, bind_by: Some(now.mono + Duration::from_secs(CONNECTION_BIND_SECS)) });
        let username = a.username.clone();
        self.tcp_conns.insert(id, tuple);
        let mut b = MessageBuilder::new(method::CONNECTION_ATTEMPT, Class::Indication, self.indication_tid());
        b.xor_addr(attr::XOR_PEER_ADDRESS, peer).attr_u32(attr::CONNECTION_ID, id);
        Some((tuple, username, b.finish()))
    }

    /// ConnectionBind (RFC 6062 §5.4): authenticated here, paired with its
    /// peer connection by the driver.
    fn connection_bind<'a>(&mut self, now: Now, tuple: FiveTuple, req: &Message<'_>) -> ClientOutput<'a> {
        if !tuple.transport.is_stream() {
            return ClientOutput::Reply(self.error(req, code::BAD_REQUEST, None));
        }
        if let Some(reply) = self.unknown_attributes(req) {
            return ClientOutput::Reply(reply);
        }
        let auth = match self.authenticate(now, tuple, req) {
            Ok(a) => a,
            Err(resp) => return ClientOutput::Reply(resp),
        };
        // A control connection cannot become a data connection.
        let Some(id) = req.get_u32(attr::CONNECTION_ID).filter(|_| !self.allocations.contains_key(&tuple)) else {
            return ClientOutput::Reply(self.error(req, code::BAD_REQUEST, Some(&auth)));
        };
        let accept = self.finish(req, self.response(req, Class::Success), Some(&auth));
        // Built here, used only if the driver finds no such connection
        // (so not through `error`, which logs every error it answers).
        let mut b = self.response(req, Class::Error);
        b.error_code(code::BAD_REQUEST);
        let reject = self.finish(req, b, Some(&auth));
        ClientOutput::ConnectionBind { id, username: auth.username, accept, reject }
    }

    #[allow(clippy::too_many_arguments)]
    fn allocate_success(
        &self,
        req: &Message<'_>,
        tuple: FiveTuple,
        relays: impl Iterator<Item = SocketAddr>,
        lifetime: u32,
        token: Option<[u8; 8]>,
        missing: Option<(Family, u16)>,
        auth: &Authed,
    ) -> Vec<u8> {
        let mut b = self.response(req, Class::Success);
        for relay in relays {
            b.xor_addr(attr::XOR_RELAYED_ADDRESS, relay);
        }
        b.attr_u32(attr::LIFETIME, lifetime).xor_addr(attr::XOR_MAPPED_ADDRESS, tuple.client);
        if let Some(t) = token {
            b.attr(attr::RESERVATION_TOKEN, &t);
        }
        if let Some((family, c)) = missing {
            b.address_error_code(family.code(), c);
        }
        self.finish(req, b, Some(auth))
    }

    fn lifetime(&self, req: &Message<'_>) -> u32 {
        let asked = req.get_u32(attr::LIFETIME).unwrap_or(self.cfg.default_lifetime_secs);
        asked.clamp(self.cfg.default_lifetime_secs.min(self.cfg.max_lifetime_secs), self.cfg.max_lifetime_secs)
    }

    /// Allocate (RFC 8656 §7.2, RFC 6156, RFC 6062 §5.1), with the checks in
    /// the RFC's order.
    fn allocate(&mut self, now: Now, tuple: FiveTuple, req: &Message<'_>, auth: &Authed, binder: &mut dyn RelayBinder) -> Vec<u8> {
        if let Some(a) = self.allocations.get(&tuple) {
            // A retransmitted Allocate gets the original success again.
            if a.allocate_tid == req.transaction_id() && a.username == auth.username {
                let answer = a.allocate_answer;
                return self.allocate_success(req, tuple, answer.addrs.into_iter().flatten(), a.allocate_lifetime, answer.token, answer.missing, auth);
            }
            return self.error(req, code::ALLOCATION_MISMATCH, Some(auth));
        }
        let tcp = match req.get(attr::REQUESTED_TRANSPORT) {
            None => return self.error(req, code::BAD_REQUEST, Some(auth)),
            Some(v) if v.len() != 4 => return self.error(req, code::BAD_REQUEST, Some(auth)),
            Some([17, ..]) => false,
            Some([6, ..]) => true,
            Some(_) => return self.error(req, code::UNSUPPORTED_TRANSPORT, Some(auth)),
        };
        // RFC 6062 §5.1: TCP relaying for stream clients only, and none of
        // the UDP-only options.
        if tcp
            && (!tuple.transport.is_stream()
                || req.has(attr::DONT_FRAGMENT)
                || req.has(attr::EVEN_PORT)
                || req.has(attr::RESERVATION_TOKEN))
        {
            return self.error(req, code::BAD_REQUEST, Some(auth));
        }
        let family_attr = req.get(attr::REQUESTED_ADDRESS_FAMILY);
        let additional_attr = req.get(attr::ADDITIONAL_ADDRESS_FAMILY);
        if req.has(attr::RESERVATION_TOKEN) && (req.has(attr::EVEN_PORT) || family_attr.is_some() || additional_attr.is_some()) {
            return self.error(req, code::BAD_REQUEST, Some(auth));
        }
        if family_attr.is_some() && additional_attr.is_some() {
            return self.error(req, code::BAD_REQUEST, Some(auth));
        }
        let family = match family_attr {
            None => Family::V4,
            Some(v) if v.len() != 4 => return self.error(req, code::BAD_REQUEST, Some(auth)),
            Some(v) => match Family::decode(v) {
                Some(f) => f,
                None => return self.error(req, code::ADDRESS_FAMILY_NOT_SUPPORTED, Some(auth)),
            },
        };
        let even = req.get(attr::EVEN_PORT).is_some();
        let reserve = req.get(attr::EVEN_PORT).is_some_and(|v| v.first().is_some_and(|b| b & 0x80 != 0));
        // A dual allocation asks for IPv6 besides the default IPv4; it
        // cannot reserve a port pair.
        let dual = match additional_attr {
            None => false,
            Some(_) if reserve => return self.error(req, code::BAD_REQUEST, Some(auth)),
            Some(v) if Family::decode(v) == Some(Family::V6) => true,
            Some(_) => return self.error(req, code::BAD_REQUEST, Some(auth)),
        };
        if self.draining {
            return self.error(req, code::INSUFFICIENT_CAPACITY, Some(auth));
        }
        match self.quotas.acquire(&auth.username) {
            Ok(()) => {}
            Err(q) => {
                self.metrics.quota_rejections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let c = if q == QuotaError::User { code::ALLOCATION_QUOTA_REACHED } else { code::INSUFFICIENT_CAPACITY };
                return self.error(req, c, Some(auth));
            }
        }
        let reserved = match req.get(attr::RESERVATION_TOKEN) {
            None => None,
            Some(t) => match <[u8; 8]>::try_from(t).ok().and_then(|t| self.quotas.take_reservation(&t, now.mono)) {
                Some((addr, held)) => match binder.bind_exact(addr, held) {
                    Ok(a) => Some(a),
                    Err(e) => {
                        tracing::debug!(%addr, ?e, "reserved relay address could not be opened");
                        self.quotas.release(&auth.username);
                        return self.error(req, code::INSUFFICIENT_CAPACITY, Some(auth));
                    }
                },
                None => {
                    tracing::debug!(token = ?t, "unknown or expired RESERVATION-TOKEN");
                    self.quotas.release(&auth.username);
                    return self.error(req, code::INSUFFICIENT_CAPACITY, Some(auth));
                }
            },
        };
        let bind_code = |e: BindError| match e {
            BindError::FamilyUnsupported => code::ADDRESS_FAMILY_NOT_SUPPORTED,
            BindError::Exhausted => code::INSUFFICIENT_CAPACITY,
        };
        // A port an EVEN-PORT reservation holds stays free for it, whichever
        // the protocol: relay addresses are looked up by address alone.
        let mut addrs: [Option<SocketAddr>; 2] = [None, None];
        let mut missing = None;
        if let Some(r) = reserved {
            addrs[Family::of(r.ip()).index()] = Some(r);
        } else if dual {
            // IPv4 is the default family: a relay without it answers 440 as
            // for a plain Allocate (RFC 8656 §7.2 step 7). Otherwise either
            // family may run out alone: the answer then carries the other
            // and an ADDRESS-ERROR-CODE; with neither, 508.
            let v4 = match self.bind_unreserved(binder, Family::V4, even, tcp) {
                Err(BindError::FamilyUnsupported) => {
                    self.quotas.release(&auth.username);
                    return self.error(req, code::ADDRESS_FAMILY_NOT_SUPPORTED, Some(auth));
                }
                r => r,
            };
            let v6 = self.bind_unreserved(binder, Family::V6, even, tcp);
            match (v4, v6) {
                (Ok(a), Ok(b)) => addrs = [Some(a), Some(b)],
                (Ok(a), Err(e)) => (addrs[0], missing) = (Some(a), Some((Family::V6, bind_code(e)))),
                (Err(e), Ok(b)) => (addrs[1], missing) = (Some(b), Some((Family::V4, bind_code(e)))),
                (Err(_), Err(_)) => {
                    self.quotas.release(&auth.username);
                    return self.error(req, code::INSUFFICIENT_CAPACITY, Some(auth));
                }
            }
        } else {
            match self.bind_unreserved(binder, family, even, tcp) {
                Ok(r) => addrs[family.index()] = Some(r),
                Err(e) => {
                    self.quotas.release(&auth.username);
                    return self.error(req, bind_code(e), Some(auth));
                }
            }
        }
        // EVEN-PORT with R: the next port is held open for 30 seconds for
        // the Allocate that brings the token; if it cannot be, 508 (RFC
        // 8656 §7.2). A user's reservations count against the per-user
        // quota (486).
        let mut token = None;
        if let Some(relay) = addrs.iter().flatten().next().copied().filter(|_| reserve) {
            match self.reserve_next(now, &auth.username, relay, binder) {
                Ok(t) => token = Some(t),
                Err(c) => {
                    for r in addrs.iter().flatten() {
                        binder.release(*r);
                    }
                    self.quotas.release(&auth.username);
                    return self.error(req, c, Some(auth));
                }
            }
        }
        let lifetime = self.lifetime(req);
        let expires = now.mono + Duration::from_secs(u64::from(lifetime));
        let bucket = self.cfg.bandwidth_bytes_per_sec.map(|rate| TokenBucket { rate, tokens: rate, last: now.mono });
        let alloc = Allocation {
            username: auth.username.clone(),
            relays: addrs.map(|a| a.map(|addr| Relayed { addr, expires })),
            tcp: tcp.then(HashMap::new),
            allocate_tid: req.transaction_id(),
            allocate_lifetime: lifetime,
            allocate_answer: AllocateAnswer { addrs, missing, token },
            permissions: FastMap::default(),
            channels: FastMap::default(),
            peer_channels: FastMap::default(),
            bucket,
        };
        for relay in alloc.relay_addrs() {
            self.by_relay.insert(relay, tuple);
        }
        let reply = self.allocate_success(req, tuple, alloc.relay_addrs(), lifetime, token, missing, auth);
        self.allocations.insert(tuple, alloc);
        use std::sync::atomic::Ordering::Relaxed;
        self.metrics.allocations.fetch_add(1, Relaxed);
        self.metrics.allocations_total.fetch_add(1, Relaxed);
        reply
    }

    /// Holds the port after `relay` open and records the reservation for
    /// `user`; its token, or the error code to answer (508 if the port
    /// cannot be held or the table is full, 486 past the user's quota).
    fn reserve_next(&mut self, now: Now, user: &str, relay: SocketAddr, binder: &mut dyn RelayBinder) -> Result<[u8; 8], u16> {
        let full = code::INSUFFICIENT_CAPACITY;
        let port = relay.port().checked_add(1).filter(|_| relay.port().is_multiple_of(2)).ok_or(full)?;
        let next = SocketAddr::new(relay.ip(), port);
        // One relay address per port, whichever the protocol.
        if self.by_relay.contains_key(&next) {
            return Err(full);
        }
        self.quotas.can_reserve(user)?;
        let held = binder.hold(next).map_err(|_| full)?;
        self.tid_counter = self.tid_counter.wrapping_add(1);
        let mut t = [0u8; 8];
        t[..4].copy_from_slice(&self.tid_salt.to_be_bytes());
        t[4..].copy_from_slice(&(self.tid_counter as u32).to_be_bytes());
        tracing::debug!(token = ?t, %next, "reserving");
        self.quotas.reserve(t, user, next, now.mono + Duration::from_secs(RESERVATION_SECS), held).map_err(|_| full)?;
        Ok(t)
    }

    /// Binds a relay address that no reservation holds.
    fn bind_unreserved(&self, binder: &mut dyn RelayBinder, family: Family, even: bool, tcp: bool) -> Result<SocketAddr, BindError> {
        for _ in 0..8 {
            let addr = if tcp { binder.bind_tcp(family)? } else { binder.bind(family, even)? };
            if !self.quotas.is_reserved(addr) {
                return Ok(addr);
            }
            if tcp {
                binder.release_tcp(addr);
            } else {
                binder.release(addr);
            }
        }
        Err(BindError::Exhausted)
    }

    /// Refresh (RFC 8656 §8.2). REQUESTED-ADDRESS-FAMILY picks one family
    /// of the allocation (443 if it has none of that family); without it,
    /// every family is refreshed, or deleted with LIFETIME 0.
    fn refresh(&mut self, now: Now, tuple: FiveTuple, req: &Message<'_>, auth: &Authed, binder: &mut dyn RelayBinder) -> Vec<u8> {
        let Some(a) = self.allocations.get(&tuple) else {
            return self.error(req, code::ALLOCATION_MISMATCH, Some(auth));
        };
        let only = match req.get(attr::REQUESTED_ADDRESS_FAMILY) {
            None => None,
            Some(v) if v.len() != 4 => return self.error(req, code::BAD_REQUEST, Some(auth)),
            Some(v) => match Family::decode(v).filter(|f| a.relay(*f).is_some()) {
                Some(f) => Some(f),
                None => return self.error(req, code::PEER_ADDRESS_FAMILY_MISMATCH, Some(auth)),
            },
        };
        let granted = if req.get_u32(attr::LIFETIME) == Some(0) {
            match only {
                Some(f) => self.remove_family(tuple, f, binder),
                None => self.remove(tuple, binder),
            }
            0
        } else {
            let lifetime = self.lifetime(req);
            let expires = now.mono + Duration::from_secs(u64::from(lifetime));
            if let Some(a) = self.allocations.get_mut(&tuple) {
                for r in a.relays.iter_mut().flatten().filter(|r| only.is_none_or(|f| Family::of(r.addr.ip()) == f)) {
                    r.expires = expires;
                }
            }
            lifetime
        };
        let mut b = self.response(req, Class::Success);
        b.attr_u32(attr::LIFETIME, granted);
        self.finish(req, b, Some(auth))
    }

    /// Checks a peer for CreatePermission/ChannelBind; `Err` is the error code.
    fn check_peer(&self, tuple: FiveTuple, peer: SocketAddr) -> Result<(), u16> {
        let Some(a) = self.allocations.get(&tuple) else { return Err(code::ALLOCATION_MISMATCH) };
        // Policy first: a refused peer is always 403, whatever its family.
        if self.cfg.policy.check(peer.ip()).is_err() {
            self.metrics.peer_refusals.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(code::FORBIDDEN);
        }
        if a.relay(Family::of(peer.ip())).is_none() {
            return Err(code::PEER_ADDRESS_FAMILY_MISMATCH);
        }
        Ok(())
    }

    fn create_permission(&mut self, now: Now, tuple: FiveTuple, req: &Message<'_>, auth: &Authed) -> Vec<u8> {
        let mut peers = Vec::new();
        for v in req.get_all(attr::XOR_PEER_ADDRESS) {
            match crate::stun::decode_xor_addr(v, &req.transaction_id()) {
                Ok(p) => peers.push(p),
                Err(_) => return self.error(req, code::BAD_REQUEST, Some(auth)),
            }
        }
        if peers.is_empty() {
            return self.error(req, code::BAD_REQUEST, Some(auth));
        }
        for p in &peers {
            if let Err(c) = self.check_peer(tuple, *p) {
                return self.error(req, c, Some(auth));
            }
        }
        let max = self.cfg.max_permissions;
        let expires = now.mono + Duration::from_secs(u64::from(self.cfg.permission_lifetime_secs));
        let Some(a) = self.allocations.get_mut(&tuple) else {
            return self.error(req, code::ALLOCATION_MISMATCH, Some(auth));
        };
        a.permissions.retain(|_, e| *e > now.mono);
        let new = peers.iter().filter(|p| !a.permissions.contains_key(&p.ip())).count();
        if a.permissions.len() + new > max {
            return self.error(req, code::INSUFFICIENT_CAPACITY, Some(auth));
        }
        for p in peers {
            a.permissions.insert(p.ip(), expires);
        }
        let b = self.response(req, Class::Success);
        self.finish(req, b, Some(auth))
    }

    fn channel_bind(&mut self, now: Now, tuple: FiveTuple, req: &Message<'_>, auth: &Authed) -> Vec<u8> {
        let number = match req.get(attr::CHANNEL_NUMBER) {
            Some(v) if v.len() == 4 => u16::from_be_bytes([v[0], v[1]]),
            _ => return self.error(req, code::BAD_REQUEST, Some(auth)),
        };
        if !(channel_data::MIN_CHANNEL..=channel_data::MAX_CHANNEL).contains(&number) {
            tracing::debug!(number, "channel number out of range");
            return self.error(req, code::BAD_REQUEST, Some(auth));
        }
        let peer = match req.get_xor_addr(attr::XOR_PEER_ADDRESS) {
            Some(Ok(p)) => p,
            other => {
                tracing::debug!(?other, "bad XOR-PEER-ADDRESS");
                return self.error(req, code::BAD_REQUEST, Some(auth));
            }
        };
        if let Err(c) = self.check_peer(tuple, peer) {
            return self.error(req, c, Some(auth));
        }
        let max = self.cfg.max_channels;
        let max_perms = self.cfg.max_permissions;
        let ch_exp = now.mono + Duration::from_secs(u64::from(self.cfg.channel_lifetime_secs));
        let perm_exp = now.mono + Duration::from_secs(u64::from(self.cfg.permission_lifetime_secs));
        let Some(a) = self.allocations.get_mut(&tuple) else {
            return self.error(req, code::ALLOCATION_MISMATCH, Some(auth));
        };
        // TCP allocations have no channels (RFC 6062 §5.1).
        if a.tcp.is_some() {
            return self.error(req, code::BAD_REQUEST, Some(auth));
        }
        if a.channels.get(&number).is_some_and(|c| c.peer != peer) {
            return self.error(req, code::BAD_REQUEST, Some(auth));
        }
        if a.peer_channels.get(&peer).is_some_and(|n| *n != number) {
            return self.error(req, code::BAD_REQUEST, Some(auth));
        }
        if !a.channels.contains_key(&number) && a.channels.len() >= max {
            return self.error(req, code::INSUFFICIENT_CAPACITY, Some(auth));
        }
        if !a.permissions.contains_key(&peer.ip()) && a.permissions.len() >= max_perms {
            return self.error(req, code::INSUFFICIENT_CAPACITY, Some(auth));
        }
        a.channels.insert(number, Channel { peer, expires: ch_exp });
        a.peer_channels.insert(peer, number);
        a.permissions.insert(peer.ip(), perm_exp);
        let b = self.response(req, Class::Success);
        self.finish(req, b, Some(auth))
    }
}

/// True if the message's last attribute is a FINGERPRINT (the parser
/// validates it but does not list it among the attributes).
fn fingerprint_present(buf: &[u8]) -> bool {
    let n = buf.len();
    n >= crate::stun::HEADER_LEN + 8 && u16::from_be_bytes([buf[n - 8], buf[n - 7]]) == attr::FINGERPRINT && buf[n - 6..n - 4] == [0, 4]
}

#[cfg(test)]
mod tests;
