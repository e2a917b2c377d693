//! State machine tests: the full TURN flows driven directly, with a fake
//! relay binder and explicit time.

use super::*;
use crate::stun::decode_error_code;
use tessera_shared::turn_rest::turn_rest_credentials;

const REALM: &str = "tessera.test";
const SECRET: &[u8] = b"rest-secret";
const T0: u64 = 1_800_000_000;

#[derive(Default)]
struct FakeBinder {
    next_port: u16,
    open: Vec<SocketAddr>,
    released: Vec<SocketAddr>,
    v6: bool,
    exhausted: bool,
    /// IPv6 relay addresses run out (IPv4 still binds).
    exhausted_v6: bool,
    /// IPv4 relay addresses run out.
    exhausted_v4: bool,
    /// No IPv4 relay address is configured.
    no_v4: bool,
    /// The `even_port` of every `bind`.
    evens: Vec<bool>,
    /// Ports held open for reservations (a held port leaves when its
    /// handle is dropped).
    held: Arc<Mutex<Vec<SocketAddr>>>,
    /// TCP relay addresses open.
    tcp_open: Vec<SocketAddr>,
    /// Outgoing connections asked for: (id, relay, peer).
    connects: Vec<(u32, SocketAddr, SocketAddr)>,
    /// Connections the binder holds (connecting, parked or relaying).
    conns: Vec<u32>,
    expired: Vec<u32>,
    closed: Vec<u32>,
    next_id: u32,
}

/// A held port: dropping it closes it.
struct HeldPort {
    addr: SocketAddr,
    held: Arc<Mutex<Vec<SocketAddr>>>,
}

impl Drop for HeldPort {
    fn drop(&mut self) {
        self.held.lock().expect("lock").retain(|a| *a != self.addr);
    }
}

impl RelayBinder for FakeBinder {
    fn bind(&mut self, family: Family, even: bool) -> Result<SocketAddr, BindError> {
        self.evens.push(even);
        if self.exhausted {
            return Err(BindError::Exhausted);
        }
        self.next_port += 2;
        let a: SocketAddr = match family {
            Family::V4 if self.no_v4 => return Err(BindError::FamilyUnsupported),
            Family::V4 if self.exhausted_v4 => return Err(BindError::Exhausted),
            Family::V4 => format!("198.51.100.1:{}", 50000 + self.next_port).parse().expect("literal"),
            Family::V6 if self.v6 && self.exhausted_v6 => return Err(BindError::Exhausted),
            Family::V6 if self.v6 => format!("[2001:db8::1]:{}", 50000 + self.next_port).parse().expect("literal"),
            Family::V6 => return Err(BindError::FamilyUnsupported),
        };
        self.open.push(a);
        Ok(a)
    }
    fn hold(&mut self, addr: SocketAddr) -> Result<Held, BindError> {
        if self.open.contains(&addr) || self.held.lock().expect("lock").contains(&addr) {
            return Err(BindError::Exhausted);
        }
        self.held.lock().expect("lock").push(addr);
        Ok(Box::new(HeldPort { addr, held: self.held.clone() }))
    }
    fn bind_exact(&mut self, addr: SocketAddr, held: Held) -> Result<SocketAddr, BindError> {
        let held = held.downcast::<HeldPort>().expect("a port this binder held");
        assert_eq!(held.addr, addr);
        if self.open.contains(&addr) {
            return Err(BindError::Exhausted);
        }
        drop(held);
        self.open.push(addr);
        Ok(addr)
    }
    fn release(&mut self, relay: SocketAddr) {
        self.open.retain(|a| *a != relay);
        self.released.push(relay);
    }
    fn bind_tcp(&mut self, family: Family) -> Result<SocketAddr, BindError> {
        let a = self.bind(family, false)?;
        self.open.retain(|o| *o != a);
        self.tcp_open.push(a);
        Ok(a)
    }
    fn release_tcp(&mut self, relay: SocketAddr) {
        self.tcp_open.retain(|a| *a != relay);
        self.released.push(relay);
    }
    fn tcp_connect(&mut self, relay: SocketAddr, peer: SocketAddr) -> Option<u32> {
        self.next_id += 1;
        self.connects.push((self.next_id, relay, peer));
        self.conns.push(self.next_id);
        Some(self.next_id)
    }
    fn tcp_expire(&mut self, id: u32) {
        self.expired.push(id);
    }
    fn tcp_close(&mut self, id: u32) {
        self.conns.retain(|c| *c != id);
        self.closed.push(id);
    }
    fn tcp_open(&self, id: u32) -> bool {
        self.conns.contains(&id)
    }
}

struct Harness {
    server: Server,
    binder: FakeBinder,
    start: Instant,
    quotas: Arc<Quotas>,
}

fn cfg() -> ServerConfig {
    let mut static_users = HashMap::new();
    static_users.insert("alice".to_owned(), "wonderland".to_owned());
    static_users.insert("bob".to_owned(), "builder".to_owned());
    let mut c = ServerConfig::new(REALM, CredentialStore::new(vec![SECRET.to_vec()], &static_users));
    // The tests use documentation addresses as peers; allow that range only.
    c.policy.allow.push("203.0.113.0/24".parse().expect("literal"));
    c.policy.allow.push("2001:db8:beef::/48".parse().expect("literal"));
    c
}

impl Harness {
    fn new() -> Self {
        Self::with(cfg(), Quotas::new(4, 100))
    }

    fn with(cfg: ServerConfig, quotas: Quotas) -> Self {
        let quotas = Arc::new(quotas);
        Harness {
            server: Server::new(Arc::new(cfg), NonceKey::new([9; 32], 600), quotas.clone(), Arc::default(), 1),
            binder: FakeBinder::default(),
            start: Instant::now(),
            quotas,
        }
    }

    fn now(&self, secs: u64) -> Now {
        Now { mono: self.start + Duration::from_secs(secs), unix_secs: T0 + secs }
    }

    fn send(&mut self, at: u64, tuple: FiveTuple, bytes: &[u8]) -> Option<Vec<u8>> {
        let now = self.now(at);
        match self.server.handle_client(now, tuple, bytes, &mut self.binder) {
            ClientOutput::Reply(r) => Some(r),
            _ => None,
        }
    }
}

fn tuple(port: u16) -> FiveTuple {
    FiveTuple {
        client: format!("192.0.2.10:{port}").parse().expect("literal"),
        server: "192.0.2.1:3478".parse().expect("literal"),
        transport: Transport::Udp,
    }
}

/// A client's credentials and the state it learned from 401s.
struct Client {
    user: String,
    pass: String,
    nonce: Option<String>,
    tid: u8,
}

impl Client {
    fn new(user: &str, pass: &str) -> Self {
        Client { user: user.into(), pass: pass.into(), nonce: None, tid: 0 }
    }

    fn request(&mut self, m: u16, add: impl FnOnce(&mut MessageBuilder)) -> Vec<u8> {
        self.tid = self.tid.wrapping_add(1);
        let mut b = MessageBuilder::new(m, Class::Request, [self.tid; 12]);
        add(&mut b);
        if let Some(n) = &self.nonce {
            b.attr(attr::USERNAME, self.user.as_bytes()).attr(attr::REALM, REALM.as_bytes()).attr(attr::NONCE, n.as_bytes());
            b.integrity(&PasswordAlgorithm::Md5.key(&self.user, REALM, &self.pass));
        }
        b.fingerprint();
        b.finish()
    }

    fn learn(&mut self, resp: &[u8]) {
        let m = Message::parse(resp).expect("server response parses");
        if let Some(n) = m.get_str(attr::NONCE) {
            self.nonce = Some(n.to_owned());
        }
    }

    fn verify(&self, resp: &[u8]) -> bool {
        let m = Message::parse(resp).expect("server response parses");
        m.verify_integrity(&PasswordAlgorithm::Md5.key(&self.user, REALM, &self.pass))
    }
}

fn error_code(resp: &[u8]) -> Option<u16> {
    let m = Message::parse(resp).expect("server response parses");
    m.get(attr::ERROR_CODE).and_then(decode_error_code).map(|(c, _)| c)
}

fn allocate_req(b: &mut MessageBuilder) {
    b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
}

/// Runs the 401 round trip and an Allocate; returns the relay address.
fn allocate(h: &mut Harness, c: &mut Client, t: FiveTuple) -> SocketAddr {
    let r = h.send(0, t, &c.request(method::ALLOCATE, allocate_req)).expect("reply");
    assert_eq!(error_code(&r), Some(401));
    c.learn(&r);
    let r = h.send(0, t, &c.request(method::ALLOCATE, allocate_req)).expect("reply");
    assert_eq!(error_code(&r), None, "allocate failed");
    assert!(c.verify(&r));
    let m = Message::parse(&r).expect("parses");
    assert_eq!(m.get_u32(attr::LIFETIME), Some(600));
    assert_eq!(m.get_xor_addr(attr::XOR_MAPPED_ADDRESS), Some(Ok(t.client)));
    m.get_xor_addr(attr::XOR_RELAYED_ADDRESS).expect("relayed").expect("valid")
}

fn permit(h: &mut Harness, c: &mut Client, t: FiveTuple, peer: SocketAddr) -> Option<u16> {
    let r = h.send(0, t, &c.request(method::CREATE_PERMISSION, |b| {
        b.xor_addr(attr::XOR_PEER_ADDRESS, peer);
    }));
    error_code(&r.expect("reply"))
}

fn bind(h: &mut Harness, c: &mut Client, t: FiveTuple, ch: u16, peer: SocketAddr) -> Option<u16> {
    let r = h.send(0, t, &c.request(method::CHANNEL_BIND, |b| {
        b.attr(attr::CHANNEL_NUMBER, &[(ch >> 8) as u8, ch as u8, 0, 0]).xor_addr(attr::XOR_PEER_ADDRESS, peer);
    }));
    error_code(&r.expect("reply"))
}

fn send_indication(peer: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut b = MessageBuilder::new(method::SEND, Class::Indication, [0x55; 12]);
    b.xor_addr(attr::XOR_PEER_ADDRESS, peer).attr(attr::DATA, data);
    b.finish()
}

fn peer() -> SocketAddr {
    "203.0.113.5:9000".parse().expect("literal")
}

#[test]
fn binding_request_needs_no_auth() {
    let mut h = Harness::new();
    let mut b = MessageBuilder::new(method::BINDING, Class::Request, [1; 12]);
    b.fingerprint();
    let r = h.send(0, tuple(1), &b.finish()).expect("reply");
    let m = Message::parse(&r).expect("parses");
    assert_eq!(m.class(), Class::Success);
    assert_eq!(m.get_xor_addr(attr::XOR_MAPPED_ADDRESS), Some(Ok(tuple(1).client)));
}

#[test]
fn full_flow_with_send_indication_and_channel() {
    let mut h = Harness::new();
    let mut c = Client::new("alice", "wonderland");
    let t = tuple(1);
    let relay = allocate(&mut h, &mut c, t);

    // Without a permission, data to the peer is dropped.
    let ind = send_indication(peer(), b"hello");
    assert_eq!(h.send(0, t, &ind), None);
    assert_eq!(h.server.metrics().drops(DropReason::NoPermission), 1);
    // And data from the peer too.
    assert_eq!(h.server.handle_peer(h.now(0), relay, peer(), b"x"), PeerOutput::Drop);

    assert_eq!(permit(&mut h, &mut c, t, peer()), None);
    let now = h.now(1);
    match h.server.handle_client(now, t, &ind, &mut h.binder) {
        ClientOutput::ToPeer { relay: r, peer: p, payload } => {
            assert_eq!((r, p, payload), (relay, peer(), &b"hello"[..]));
        }
        other => panic!("expected ToPeer, got {other:?}"),
    }
    // Peer answers: a Data indication (no channel yet).
    match h.server.handle_peer(h.now(1), relay, peer(), b"back") {
        PeerOutput::DataIndication { to, message } => {
            assert_eq!(to, t);
            let m = Message::parse(&message).expect("parses");
            assert_eq!(m.method(), method::DATA);
            assert_eq!(m.get(attr::DATA), Some(&b"back"[..]));
            assert_eq!(m.get_xor_addr(attr::XOR_PEER_ADDRESS), Some(Ok(peer())));
        }
        other => panic!("expected DataIndication, got {other:?}"),
    }

    assert_eq!(bind(&mut h, &mut c, t, 0x4001, peer()), None);
    let mut frame = channel_data::header(0x4001, 3).to_vec();
    frame.extend_from_slice(b"abc");
    let now = h.now(2);
    assert_eq!(
        h.server.handle_client(now, t, &frame, &mut h.binder),
        ClientOutput::ToPeer { relay, peer: peer(), payload: b"abc" }
    );
    assert_eq!(
        h.server.handle_peer(h.now(2), relay, peer(), b"xyz"),
        PeerOutput::ChannelData { to: t, header: channel_data::header(0x4001, 3) }
    );
    // Unbound channel.
    let mut frame = channel_data::header(0x4002, 1).to_vec();
    frame.push(0);
    assert_eq!(h.server.handle_client(now, t, &frame, &mut h.binder), ClientOutput::Nothing);
    assert_eq!(h.server.metrics().drops(DropReason::NoChannel), 1);
}

#[test]
fn channel_bind_conflicts_and_range() {
    let mut h = Harness::new();
    let mut c = Client::new("alice", "wonderland");
    let t = tuple(1);
    allocate(&mut h, &mut c, t);
    let other: SocketAddr = "203.0.113.6:1".parse().expect("literal");
    assert_eq!(bind(&mut h, &mut c, t, 0x3FFF, peer()), Some(400));
    assert_eq!(bind(&mut h, &mut c, t, 0x8000, peer()), Some(400));
    assert_eq!(bind(&mut h, &mut c, t, 0x4000, peer()), None);
    // Refresh of the same binding is fine.
    assert_eq!(bind(&mut h, &mut c, t, 0x4000, peer()), None);
    assert_eq!(bind(&mut h, &mut c, t, 0x4000, other), Some(400));
    assert_eq!(bind(&mut h, &mut c, t, 0x4001, peer()), Some(400));
}

#[test]
fn wrong_password_unknown_user_and_stale_nonce() {
    let mut h = Harness::new();
    let t = tuple(1);
    let mut c = Client::new("alice", "wrong");
    let r = h.send(0, t, &c.request(method::ALLOCATE, allocate_req)).expect("reply");
    c.learn(&r);
    let r = h.send(0, t, &c.request(method::ALLOCATE, allocate_req)).expect("reply");
    assert_eq!(error_code(&r), Some(401));
    let mut c = Client::new("mallory", "x");
    c.nonce = Some(h.server.nonces.issue(T0, t.client));
    let r = h.send(0, t, &c.request(method::ALLOCATE, allocate_req)).expect("reply");
    assert_eq!(error_code(&r), Some(401));
    assert_eq!(h.server.metrics().auth_failures.load(std::sync::atomic::Ordering::Relaxed), 2);

    // A nonce past its lifetime is stale: 438 with a fresh nonce.
    let mut c = Client::new("alice", "wonderland");
    c.nonce = Some(h.server.nonces.issue(T0, t.client));
    let now = h.now(601);
    let req = c.request(method::ALLOCATE, allocate_req);
    let ClientOutput::Reply(r) = h.server.handle_client(now, t, &req, &mut h.binder) else { panic!("no reply") };
    assert_eq!(error_code(&r), Some(438));
    let m = Message::parse(&r).expect("parses");
    assert!(m.get_str(attr::NONCE).is_some() && m.get_str(attr::REALM) == Some(REALM));
    // A nonce issued to another client address is stale too.
    c.nonce = Some(h.server.nonces.issue(T0, "192.0.2.11:1".parse().expect("literal")));
    let r = h.send(0, t, &c.request(method::ALLOCATE, allocate_req)).expect("reply");
    assert_eq!(error_code(&r), Some(438));
}

#[test]
fn non_ascii_credentials_match_in_any_prepared_form() {
    // RFC 5769 §2.4's user and password, the password before SASLprep.
    let matrix = "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}";
    let raw = "The\u{00AD}M\u{00AA}tr\u{2168}";
    let users = HashMap::from([(matrix.to_owned(), raw.to_owned()), ("Ame\u{0301}lie".to_owned(), "pass\u{00A0}word".to_owned())]);
    let mut h = Harness::with(ServerConfig::new(REALM, CredentialStore::new(Vec::new(), &users)), Quotas::new(1, 100));
    // The password as given, and after SASLprep.
    allocate(&mut h, &mut Client::new(matrix, raw), tuple(1));
    let mut c = Client::new(matrix, "TheMatrIX");
    let r = allocate_as(&mut h, &mut c, 0, tuple(2), allocate_req);
    assert_eq!(error_code(&r), Some(486), "the same user, over its quota of one");
    let mut c = Client::new(matrix, "TheMatrix");
    assert_eq!(error_code(&allocate_as(&mut h, &mut c, 0, tuple(3), allocate_req)), Some(401));
    // A configured name in NFD matches a client's NFC one (OpaqueString),
    // and both count as one user.
    allocate(&mut h, &mut Client::new("Am\u{00E9}lie", "pass word"), tuple(4));
    for (user, pass) in [("Ame\u{0301}lie", "pass\u{00A0}word"), ("Am\u{00E9}lie", "pass\u{00A0}word")] {
        assert_eq!(error_code(&allocate_as(&mut h, &mut Client::new(user, pass), 0, tuple(5), allocate_req)), Some(486), "{user}");
    }
    assert_eq!(error_code(&allocate_as(&mut h, &mut Client::new("Amelie", "pass word"), 0, tuple(6), allocate_req)), Some(401));
    assert_eq!(h.server.metrics().auth_failures.load(std::sync::atomic::Ordering::Relaxed), 2);
}

#[test]
fn a_non_ascii_realm_matches_in_its_prepared_form() {
    let realm = "exa\u{0308}mple";
    let users = HashMap::from([("alice".to_owned(), "wonderland".to_owned())]);
    let mut h = Harness::with(ServerConfig::new(realm, CredentialStore::new(Vec::new(), &users)), Quotas::new(4, 100));
    let t = tuple(1);
    let nonce = h.server.nonces.issue(T0, t.client);
    let req = |tid: u8, key_realm: &str| {
        let mut b = MessageBuilder::new(method::ALLOCATE, Class::Request, [tid; 12]);
        allocate_req(&mut b);
        b.attr(attr::USERNAME, b"alice").attr(attr::REALM, realm.as_bytes()).attr(attr::NONCE, nonce.as_bytes());
        b.integrity(&PasswordAlgorithm::Md5.key("alice", key_realm, "wonderland"));
        b.fingerprint();
        b.finish()
    };
    assert_eq!(error_code(&h.send(0, t, &req(1, "example")).expect("reply")), Some(401));
    assert_eq!(error_code(&h.send(0, t, &req(2, "\u{00E4}xample")).expect("reply")), Some(401));
    assert_eq!(error_code(&h.send(0, t, &req(3, "ex\u{00E4}mple")).expect("reply")), None);
}

#[test]
fn turn_rest_credentials_accepted_and_expired_rejected() {
    let mut h = Harness::new();
    let (user, pass) = turn_rest_credentials(SECRET, "@alice:example.org", T0 + 3600);
    let mut c = Client::new(&user, &pass);
    allocate(&mut h, &mut c, tuple(1));

    let (user, pass) = turn_rest_credentials(SECRET, "@bob:example.org", T0 - 1);
    let mut c = Client::new(&user, &pass);
    let r = h.send(0, tuple(2), &c.request(method::ALLOCATE, allocate_req)).expect("reply");
    c.learn(&r);
    let r = h.send(0, tuple(2), &c.request(method::ALLOCATE, allocate_req)).expect("reply");
    assert_eq!(error_code(&r), Some(401));

    let (user, pass) = turn_rest_credentials(b"not-our-secret", "@eve:example.org", T0 + 3600);
    let mut c = Client::new(&user, &pass);
    let r = h.send(0, tuple(3), &c.request(method::ALLOCATE, allocate_req)).expect("reply");
    c.learn(&r);
    let r = h.send(0, tuple(3), &c.request(method::ALLOCATE, allocate_req)).expect("reply");
    assert_eq!(error_code(&r), Some(401));
}

#[test]
fn allocation_mismatch_wrong_credentials_and_retransmit() {
    let mut h = Harness::new();
    let t = tuple(1);
    let mut c = Client::new("alice", "wonderland");
    let relay = allocate(&mut h, &mut c, t);
    // Retransmission of the same Allocate (same transaction id) succeeds again.
    c.tid -= 1;
    let r = h.send(0, t, &c.request(method::ALLOCATE, allocate_req)).expect("reply");
    let m = Message::parse(&r).expect("parses");
    assert_eq!(m.get_xor_addr(attr::XOR_RELAYED_ADDRESS), Some(Ok(relay)));
    // A new Allocate on the same 5-tuple is a mismatch.
    let r = h.send(0, t, &c.request(method::ALLOCATE, allocate_req)).expect("reply");
    assert_eq!(error_code(&r), Some(437));
    // Refresh without allocation.
    let elsewhere = FiveTuple { client: "192.0.2.11:1".parse().expect("literal"), ..tuple(2) };
    let r = h.send(0, elsewhere, &c.request(method::REFRESH, |_| {})).expect("reply");
    assert_eq!(error_code(&r), Some(438), "nonce is bound to the first client's address");
    // The same address from another port may use it (RFC 6062 data connections do).
    let r = h.send(0, tuple(2), &c.request(method::REFRESH, |_| {})).expect("reply");
    assert_eq!(error_code(&r), Some(437));
    let mut c2 = Client::new("alice", "wonderland");
    let r = h.send(0, tuple(2), &c2.request(method::REFRESH, |_| {})).expect("reply");
    c2.learn(&r);
    let r = h.send(0, tuple(2), &c2.request(method::REFRESH, |_| {})).expect("reply");
    assert_eq!(error_code(&r), Some(437));
    // Another user on the allocation's 5-tuple.
    let mut bob = Client::new("bob", "builder");
    bob.nonce = c.nonce.clone();
    let r = h.send(0, t, &bob.request(method::REFRESH, |_| {})).expect("reply");
    assert_eq!(error_code(&r), Some(441));
}

#[test]
fn unsupported_transport_and_family() {
    let mut h = Harness::new();
    let t = tuple(1);
    let mut c = Client::new("alice", "wonderland");
    let r = h.send(0, t, &c.request(method::ALLOCATE, allocate_req)).expect("reply");
    c.learn(&r);
    let r = h.send(0, t, &c.request(method::ALLOCATE, |b| {
        b.attr(attr::REQUESTED_TRANSPORT, &[1, 0, 0, 0]);
    }));
    assert_eq!(error_code(&r.expect("reply")), Some(442));
    // TCP relaying is for stream clients only (RFC 6062 §5.1).
    let r = h.send(0, t, &c.request(method::ALLOCATE, |b| {
        b.attr(attr::REQUESTED_TRANSPORT, &[6, 0, 0, 0]);
    }));
    assert_eq!(error_code(&r.expect("reply")), Some(400));
    let r = h.send(0, t, &c.request(method::ALLOCATE, |_| {}));
    assert_eq!(error_code(&r.expect("reply")), Some(400));
    let r = h.send(0, t, &c.request(method::ALLOCATE, |b| {
        allocate_req(b);
        b.attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    }));
    assert_eq!(error_code(&r.expect("reply")), Some(440), "no IPv6 relay configured");
    let r = h.send(0, t, &c.request(method::ALLOCATE, |b| {
        allocate_req(b);
        b.attr(0x7777, &[0; 4]);
    }));
    assert_eq!(error_code(&r.expect("reply")), Some(420));
}

/// A DTLS client is a datagram client: UDP relaying only, and no
/// ConnectionBind (RFC 6062 is for TCP and TLS clients).
#[test]
fn dtls_clients_get_udp_relays_only() {
    let mut h = Harness::new();
    let t = FiveTuple { transport: Transport::Dtls, ..tuple(1) };
    let mut c = Client::new("alice", "wonderland");
    let r = h.send(0, t, &c.request(method::ALLOCATE, tcp_allocate_req)).expect("reply");
    c.learn(&r);
    let r = h.send(0, t, &c.request(method::ALLOCATE, tcp_allocate_req)).expect("reply");
    assert_eq!(error_code(&r), Some(400), "no TCP relay for a DTLS client");
    assert!(h.binder.tcp_open.is_empty());
    let bind = c.request(method::CONNECTION_BIND, |b| {
        b.attr_u32(attr::CONNECTION_ID, 1);
    });
    match h.server.handle_client(h.now(0), t, &bind, &mut h.binder) {
        ClientOutput::Reply(r) => assert_eq!(error_code(&r), Some(400)),
        other => panic!("ConnectionBind over DTLS: {other:?}"),
    }
    let relay = allocate(&mut h, &mut Client::new("alice", "wonderland"), t);
    assert!(h.binder.open.contains(&relay), "a UDP relay socket");
}

#[test]
fn ipv6_relay_and_family_mismatch() {
    let mut h = Harness::new();
    h.binder.v6 = true;
    let t = tuple(1);
    let mut c = Client::new("alice", "wonderland");
    let r = h.send(0, t, &c.request(method::ALLOCATE, allocate_req)).expect("reply");
    c.learn(&r);
    let r = h.send(0, t, &c.request(method::ALLOCATE, |b| {
        allocate_req(b);
        b.attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    }));
    let r = r.expect("reply");
    assert_eq!(error_code(&r), None);
    let relay = Message::parse(&r).expect("parses").get_xor_addr(attr::XOR_RELAYED_ADDRESS).expect("a").expect("v");
    assert!(relay.is_ipv6());
    assert_eq!(permit(&mut h, &mut c, t, peer()), Some(443));
    let p6: SocketAddr = "[2001:db8:beef::5]:7000".parse().expect("literal");
    assert_eq!(permit(&mut h, &mut c, t, p6), None);
}

#[test]
fn refresh_and_expiry_release_everything() {
    let mut h = Harness::new();
    let t = tuple(1);
    let mut c = Client::new("alice", "wonderland");
    let relay = allocate(&mut h, &mut c, t);
    assert_eq!(h.quotas.total(), 1);
    // Refresh extends past the original 600 s.
    let r = h.send(0, t, &c.request(method::REFRESH, |b| {
        b.attr_u32(attr::LIFETIME, 99_999);
    }));
    let m_bytes = r.expect("reply");
    let m = Message::parse(&m_bytes).expect("parses");
    assert_eq!(m.get_u32(attr::LIFETIME), Some(3600), "capped at max lifetime");
    let now = h.now(3599);
    h.server.handle_timeout(now, &mut h.binder);
    assert_eq!(h.server.allocation_count(), 1);
    let now = h.now(3600);
    h.server.handle_timeout(now, &mut h.binder);
    assert_eq!(h.server.allocation_count(), 0);
    assert_eq!(h.binder.released, vec![relay]);
    assert_eq!(h.quotas.total(), 0);
    assert_eq!(h.server.handle_peer(h.now(3600), relay, peer(), b"x"), PeerOutput::Drop);

    // Refresh with lifetime 0 deletes at once.
    let mut c = Client::new("alice", "wonderland");
    let relay = allocate(&mut h, &mut c, t);
    let r = h.send(0, t, &c.request(method::REFRESH, |b| {
        b.attr_u32(attr::LIFETIME, 0);
    }));
    assert_eq!(Message::parse(&r.expect("reply")).expect("parses").get_u32(attr::LIFETIME), Some(0));
    assert!(h.binder.released.contains(&relay));
    assert_eq!(h.quotas.total(), 0);
}

#[test]
fn permissions_expire() {
    let mut h = Harness::new();
    let t = tuple(1);
    let mut c = Client::new("alice", "wonderland");
    let relay = allocate(&mut h, &mut c, t);
    assert_eq!(permit(&mut h, &mut c, t, peer()), None);
    assert!(matches!(h.server.handle_peer(h.now(299), relay, peer(), b"x"), PeerOutput::DataIndication { .. }));
    assert_eq!(h.server.handle_peer(h.now(300), relay, peer(), b"x"), PeerOutput::Drop);
}

#[test]
fn quotas_per_user_and_total() {
    let mut h = Harness::with(cfg(), Quotas::new(2, 3));
    let mut a = Client::new("alice", "wonderland");
    allocate(&mut h, &mut a, tuple(1));
    let mut a2 = Client::new("alice", "wonderland");
    allocate(&mut h, &mut a2, tuple(2));
    let mut a3 = Client::new("alice", "wonderland");
    let r = h.send(0, tuple(3), &a3.request(method::ALLOCATE, allocate_req)).expect("reply");
    a3.learn(&r);
    let r = h.send(0, tuple(3), &a3.request(method::ALLOCATE, allocate_req)).expect("reply");
    assert_eq!(error_code(&r), Some(486));
    let mut b = Client::new("bob", "builder");
    allocate(&mut h, &mut b, tuple(4));
    let mut b2 = Client::new("bob", "builder");
    let r = h.send(0, tuple(5), &b2.request(method::ALLOCATE, allocate_req)).expect("reply");
    b2.learn(&r);
    let r = h.send(0, tuple(5), &b2.request(method::ALLOCATE, allocate_req)).expect("reply");
    assert_eq!(error_code(&r), Some(508));
    assert_eq!(h.binder.open.len(), 3);
}

#[test]
fn bandwidth_cap_drops_excess() {
    let mut c = cfg();
    c.bandwidth_bytes_per_sec = Some(1000);
    let mut h = Harness::with(c, Quotas::new(4, 100));
    let t = tuple(1);
    let mut cl = Client::new("alice", "wonderland");
    allocate(&mut h, &mut cl, t);
    assert_eq!(permit(&mut h, &mut cl, t, peer()), None);
    let ind = send_indication(peer(), &[0u8; 400]);
    let now = h.now(0);
    let mut sent = 0;
    for _ in 0..5 {
        if matches!(h.server.handle_client(now, t, &ind, &mut h.binder), ClientOutput::ToPeer { .. }) {
            sent += 1;
        }
    }
    assert_eq!(sent, 2);
    assert_eq!(h.server.metrics().drops(DropReason::Bandwidth), 3);
    let now = h.now(1);
    assert!(matches!(h.server.handle_client(now, t, &ind, &mut h.binder), ClientOutput::ToPeer { .. }));
}

#[test]
fn default_policy_refuses_special_peers() {
    let mut h = Harness::with(ServerConfig::new(REALM, cfg().credentials), Quotas::new(4, 100));
    let t = tuple(1);
    let mut c = Client::new("alice", "wonderland");
    allocate(&mut h, &mut c, t);
    for p in ["127.0.0.1:80", "0.0.0.0:80", "10.0.0.1:80", "169.254.169.254:80"] {
        let p: SocketAddr = p.parse().expect("literal");
        assert_eq!(permit(&mut h, &mut c, t, p), Some(403), "{p}");
        assert_eq!(bind(&mut h, &mut c, t, 0x4000, p), Some(403), "{p}");
        let now = h.now(0);
        assert_eq!(h.server.handle_client(now, t, &send_indication(p, b"x"), &mut h.binder), ClientOutput::Nothing);
    }
    assert_eq!(h.server.metrics().drops(DropReason::PeerDenied), 4);
    assert_eq!(h.server.metrics().peer_refusals.load(std::sync::atomic::Ordering::Relaxed), 8);
}

#[test]
fn draining_refuses_new_allocations() {
    let mut h = Harness::new();
    h.server.set_draining();
    let mut c = Client::new("alice", "wonderland");
    let r = h.send(0, tuple(1), &c.request(method::ALLOCATE, allocate_req)).expect("reply");
    c.learn(&r);
    let r = h.send(0, tuple(1), &c.request(method::ALLOCATE, allocate_req)).expect("reply");
    assert_eq!(error_code(&r), Some(508));
}

#[test]
fn sha256_integrity_is_answered_in_kind() {
    let mut h = Harness::new();
    let t = tuple(1);
    let mut c = Client::new("alice", "wonderland");
    let r = h.send(0, t, &c.request(method::ALLOCATE, allocate_req)).expect("reply");
    c.learn(&r);
    let key = PasswordAlgorithm::Sha256.key("alice", REALM, "wonderland");
    let mut b = MessageBuilder::new(method::ALLOCATE, Class::Request, [42; 12]);
    allocate_req(&mut b);
    b.attr(attr::USERNAME, b"alice")
        .attr(attr::REALM, REALM.as_bytes())
        .attr(attr::NONCE, c.nonce.clone().expect("nonce").as_bytes())
        .attr(attr::PASSWORD_ALGORITHM, &[0, 2, 0, 0])
        .integrity_sha256(&key);
    let r = h.send(0, t, &b.finish()).expect("reply");
    assert_eq!(error_code(&r), None);
    let m = Message::parse(&r).expect("parses");
    assert_eq!(m.integrity_kind(), Some(IntegrityKind::Sha256));
    assert!(m.verify_integrity(&key));
}

#[test]
fn relay_port_exhaustion_is_508_and_returns_quota() {
    let mut h = Harness::new();
    h.binder.exhausted = true;
    let mut c = Client::new("alice", "wonderland");
    let r = h.send(0, tuple(1), &c.request(method::ALLOCATE, allocate_req)).expect("reply");
    c.learn(&r);
    let r = h.send(0, tuple(1), &c.request(method::ALLOCATE, allocate_req)).expect("reply");
    assert_eq!(error_code(&r), Some(508));
    assert_eq!(h.quotas.total(), 0);
}

proptest::proptest! {
    #[test]
    fn arbitrary_client_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
        let mut h = Harness::new();
        let mut c = Client::new("alice", "wonderland");
        let t = tuple(1);
        allocate(&mut h, &mut c, t);
        let now = h.now(1);
        let _ = h.server.handle_client(now, t, &bytes, &mut h.binder);
        let _ = h.server.handle_client(now, tuple(2), &bytes, &mut h.binder);
    }
}

#[test]
fn even_port_reservation_is_honoured_once_and_expires() {
    let mut h = Harness::new();
    let mut c = Client::new("alice", "wonderland");
    let t = tuple(1);
    let r = h.send(0, t, &c.request(method::ALLOCATE, allocate_req)).expect("reply");
    c.learn(&r);
    let r = h.send(0, t, &c.request(method::ALLOCATE, |b| {
        allocate_req(b);
        b.attr(attr::EVEN_PORT, &[0x80, 0, 0, 0]);
    }));
    let r = r.expect("reply");
    assert_eq!(error_code(&r), None);
    let m = Message::parse(&r).expect("parses");
    let relay = m.get_xor_addr(attr::XOR_RELAYED_ADDRESS).expect("a").expect("v");
    assert_eq!(relay.port() % 2, 0);
    let token = m.get(attr::RESERVATION_TOKEN).expect("token").to_vec();
    // The odd port is held open until the token is used.
    let odd = SocketAddr::new(relay.ip(), relay.port() + 1);
    assert_eq!(*h.binder.held.lock().expect("lock"), vec![odd]);
    // A retransmission gets the token again.
    c.tid -= 1;
    let again = h.send(0, t, &c.request(method::ALLOCATE, |b| {
        allocate_req(b);
        b.attr(attr::EVEN_PORT, &[0x80, 0, 0, 0]);
    }));
    assert_eq!(Message::parse(&again.expect("reply")).expect("parses").get(attr::RESERVATION_TOKEN), Some(&token[..]));
    assert_eq!(h.quotas.reservations(), 1);
    // A second client uses the token and gets the odd port.
    let t2 = tuple(2);
    let mut c2 = Client::new("alice", "wonderland");
    let r = h.send(0, t2, &c2.request(method::ALLOCATE, allocate_req)).expect("reply");
    c2.learn(&r);
    let tok = token.clone();
    let r = h.send(0, t2, &c2.request(method::ALLOCATE, move |b| {
        allocate_req(b);
        b.attr(attr::RESERVATION_TOKEN, &tok);
    }));
    let r = r.expect("reply");
    let relay2 = Message::parse(&r).expect("parses").get_xor_addr(attr::XOR_RELAYED_ADDRESS).expect("a").expect("v");
    assert_eq!(relay2, odd);
    assert!(h.binder.held.lock().expect("lock").is_empty(), "the held port became the relay socket");
    assert!(h.binder.open.contains(&odd));
    // The token is single-use.
    let t3 = tuple(3);
    let mut c3 = Client::new("alice", "wonderland");
    let r = h.send(0, t3, &c3.request(method::ALLOCATE, allocate_req)).expect("reply");
    c3.learn(&r);
    let r = h.send(0, t3, &c3.request(method::ALLOCATE, move |b| {
        allocate_req(b);
        b.attr(attr::RESERVATION_TOKEN, &token);
    }));
    assert_eq!(error_code(&r.expect("reply")), Some(508));
    assert_eq!(h.quotas.total(), 2);
}

fn reserve_req(b: &mut MessageBuilder) {
    allocate_req(b);
    b.attr(attr::EVEN_PORT, &[0x80, 0, 0, 0]);
}

fn token_req(token: &[u8]) -> impl FnOnce(&mut MessageBuilder) + '_ {
    move |b| {
        allocate_req(b);
        b.attr(attr::RESERVATION_TOKEN, token);
    }
}

/// A client's first Allocate, `add` (after the 401 round trip at the same
/// time); the answer.
fn allocate_as(h: &mut Harness, c: &mut Client, at: u64, t: FiveTuple, add: impl FnOnce(&mut MessageBuilder)) -> Vec<u8> {
    let r = h.send(at, t, &c.request(method::ALLOCATE, allocate_req)).expect("reply");
    c.learn(&r);
    h.send(at, t, &c.request(method::ALLOCATE, add)).expect("reply")
}

fn token_of(resp: &[u8]) -> Vec<u8> {
    Message::parse(resp).expect("parses").get(attr::RESERVATION_TOKEN).expect("a RESERVATION-TOKEN").to_vec()
}

#[test]
fn unused_reservation_is_released_after_30_seconds() {
    let mut h = Harness::new();
    let mut c = Client::new("alice", "wonderland");
    let t = tuple(1);
    assert_eq!(error_code(&allocate_as(&mut h, &mut c, 0, t, reserve_req)), None);
    assert_eq!(h.quotas.reservations(), 1);
    let now = h.now(29);
    h.server.handle_timeout(now, &mut h.binder);
    assert_eq!(h.quotas.reservations(), 1);
    assert_eq!(h.binder.held.lock().expect("lock").len(), 1);
    let now = h.now(30);
    h.server.handle_timeout(now, &mut h.binder);
    assert_eq!(h.quotas.reservations(), 0);
    assert!(h.binder.held.lock().expect("lock").is_empty(), "an expired reservation's port is closed");

    // A token past its 30 seconds is refused even before the sweep.
    let mut h = Harness::new();
    let mut c = Client::new("alice", "wonderland");
    let token = token_of(&allocate_as(&mut h, &mut c, 0, t, reserve_req));
    let mut c2 = Client::new("bob", "builder");
    assert_eq!(error_code(&allocate_as(&mut h, &mut c2, 31, tuple(2), token_req(&token))), Some(508));
    assert_eq!(h.quotas.total(), 1);
}

#[test]
fn reservations_count_against_the_user_and_never_take_a_used_port() {
    let mut h = Harness::new();
    let mut c = Client::new("alice", "wonderland");
    let t = tuple(1);
    // Allocate with a reservation and delete the allocation, four times:
    // the four reservations stay, and the fifth is over alice's quota.
    assert_eq!(error_code(&allocate_as(&mut h, &mut c, 0, t, reserve_req)), None);
    assert_eq!(refresh_family(&mut h, &mut c, 0, t, None, 0), Ok(0));
    for _ in 0..3 {
        assert_eq!(error_code(&h.send(0, t, &c.request(method::ALLOCATE, reserve_req)).expect("reply")), None);
        assert_eq!(refresh_family(&mut h, &mut c, 0, t, None, 0), Ok(0));
    }
    assert_eq!(h.quotas.reservations(), 4);
    assert_eq!(error_code(&h.send(0, t, &c.request(method::ALLOCATE, reserve_req)).expect("reply")), Some(486));
    assert_eq!((h.quotas.total(), h.quotas.reservations()), (0, 4));
    assert!(h.binder.open.is_empty());
    // Another user may still reserve.
    let mut c2 = Client::new("bob", "builder");
    assert_eq!(error_code(&allocate_as(&mut h, &mut c2, 0, tuple(2), reserve_req)), None);

    // A TCP allocation's relay port is never reserved for UDP.
    let mut h = Harness::new();
    h.binder.next_port = 1;
    let mut c = Client::new("alice", "wonderland");
    let tcp_relay = tcp_allocate(&mut h, &mut c, tcp_tuple(1));
    h.binder.next_port = 0;
    let mut c = Client::new("alice", "wonderland");
    let r = allocate_as(&mut h, &mut c, 0, tuple(3), reserve_req);
    assert_eq!(error_code(&r), Some(508), "the odd port {tcp_relay} is a TCP relay address");
    assert_eq!(h.binder.tcp_open, vec![tcp_relay]);
    assert!(h.binder.held.lock().expect("lock").is_empty() && h.binder.open.is_empty());
}

#[test]
fn even_port_pair_that_cannot_be_held_is_508() {
    let mut h = Harness::new();
    // The odd port after the next even one is taken.
    let odd: SocketAddr = format!("198.51.100.1:{}", 50000 + h.binder.next_port + 3).parse().expect("literal");
    h.binder.open.push(odd);
    let mut c = Client::new("alice", "wonderland");
    let t = tuple(1);
    let r = h.send(0, t, &c.request(method::ALLOCATE, allocate_req)).expect("reply");
    c.learn(&r);
    let r = h.send(0, t, &c.request(method::ALLOCATE, |b| {
        allocate_req(b);
        b.attr(attr::EVEN_PORT, &[0x80, 0, 0, 0]);
    }));
    assert_eq!(error_code(&r.expect("reply")), Some(508));
    assert_eq!(h.binder.open, vec![odd], "the even port went back");
    assert_eq!((h.quotas.total(), h.quotas.reservations(), h.server.allocation_count()), (0, 0, 0));
}

fn tcp_tuple(port: u16) -> FiveTuple {
    FiveTuple { transport: Transport::Tcp, ..tuple(port) }
}

fn tcp_allocate_req(b: &mut MessageBuilder) {
    b.attr(attr::REQUESTED_TRANSPORT, &[6, 0, 0, 0]);
}

/// A TCP allocation (RFC 6062) on control connection `t`.
fn tcp_allocate(h: &mut Harness, c: &mut Client, t: FiveTuple) -> SocketAddr {
    let r = h.send(0, t, &c.request(method::ALLOCATE, tcp_allocate_req)).expect("reply");
    c.learn(&r);
    let r = h.send(0, t, &c.request(method::ALLOCATE, tcp_allocate_req)).expect("reply");
    assert_eq!(error_code(&r), None, "TCP allocate failed");
    let relay = Message::parse(&r).expect("parses").get_xor_addr(attr::XOR_RELAYED_ADDRESS).expect("relayed").expect("valid");
    assert!(h.binder.tcp_open.contains(&relay), "the relay address is a TCP listener");
    relay
}

fn connect_req(peer: SocketAddr) -> impl FnOnce(&mut MessageBuilder) {
    move |b: &mut MessageBuilder| {
        b.xor_addr(attr::XOR_PEER_ADDRESS, peer);
    }
}

#[test]
fn tcp_allocation_connect_then_connection_bind() {
    let mut h = Harness::new();
    let mut c = Client::new("alice", "wonderland");
    let t = tcp_tuple(1);
    let relay = tcp_allocate(&mut h, &mut c, t);

    // UDP-only options are refused for TCP allocations.
    let mut other = Client::new("bob", "builder");
    let r = h.send(0, tcp_tuple(2), &other.request(method::ALLOCATE, tcp_allocate_req)).expect("reply");
    other.learn(&r);
    for extra in [attr::EVEN_PORT, attr::DONT_FRAGMENT, attr::RESERVATION_TOKEN] {
        let r = h.send(0, tcp_tuple(2), &other.request(method::ALLOCATE, |b| {
            tcp_allocate_req(b);
            let value: &[u8] = match extra {
                attr::EVEN_PORT => &[0],
                attr::RESERVATION_TOKEN => &[0; 8],
                _ => &[],
            };
            b.attr(extra, value);
        }));
        assert_eq!(error_code(&r.expect("reply")), Some(400), "attribute {extra:#x}");
    }
    // No channels, no Send indications.
    assert_eq!(bind(&mut h, &mut c, t, 0x4000, peer()), Some(400));
    assert_eq!(permit(&mut h, &mut c, t, peer()), None);
    assert_eq!(h.send(0, t, &send_indication(peer(), b"x")), None);
    assert_eq!(h.server.metrics().drops(DropReason::NoPermission), 1);

    // Connect: bad requests, refused peers, then a good one.
    let r = h.send(0, t, &c.request(method::CONNECT, |_| {})).expect("reply");
    assert_eq!(error_code(&r), Some(400));
    let loopback: SocketAddr = "127.0.0.1:80".parse().expect("literal");
    let r = h.send(0, t, &c.request(method::CONNECT, connect_req(loopback))).expect("reply");
    assert_eq!(error_code(&r), Some(403));
    assert_eq!(h.send(0, t, &c.request(method::CONNECT, connect_req(peer()))), None, "answered once connected");
    let (id, from, to) = *h.binder.connects.last().expect("a connection started");
    assert_eq!((from, to), (relay, peer()));
    // A second Connect to the same peer while the first is pending.
    let r = h.send(0, t, &c.request(method::CONNECT, connect_req(peer()))).expect("reply");
    assert_eq!(error_code(&r), Some(446));

    let (to, user, r) = h.server.tcp_connected(h.now(1), id, true).expect("answer");
    assert_eq!((to, user.as_str()), (t, "alice"));
    assert_eq!(error_code(&r), None);
    assert!(c.verify(&r));
    let m = Message::parse(&r).expect("parses");
    assert_eq!((m.method(), m.class()), (method::CONNECT, Class::Success));
    assert_eq!(m.get_u32(attr::CONNECTION_ID), Some(id));
    // Still one connection to that peer while it is open.
    let r = h.send(1, t, &c.request(method::CONNECT, connect_req(peer()))).expect("reply");
    assert_eq!(error_code(&r), Some(446));

    // ConnectionBind on a new connection: authenticated, then paired by
    // the driver.
    // The control connection's nonce is good there (same address).
    let data = tcp_tuple(7);
    let bind_req = |d: &mut Client| {
        d.request(method::CONNECTION_BIND, |b| {
            b.attr_u32(attr::CONNECTION_ID, id);
        })
    };
    let r = h.send(1, data, &bind_req(&mut Client::new("alice", "wonderland"))).expect("a 401 without credentials");
    assert_eq!(error_code(&r), Some(401));
    let mut d = Client { nonce: c.nonce.clone(), ..Client::new("alice", "wonderland") };
    let now = h.now(1);
    match h.server.handle_client(now, data, &bind_req(&mut d), &mut h.binder) {
        ClientOutput::ConnectionBind { id: got, username, accept, reject } => {
            assert_eq!((got, username.as_str()), (id, "alice"));
            assert!(d.verify(&accept) && error_code(&accept).is_none());
            assert_eq!(error_code(&reject), Some(400));
        }
        other => panic!("expected ConnectionBind, got {other:?}"),
    }
    // Not on the control connection, not without an id, not over UDP.
    assert_eq!(h.send(1, t, &bind_req(&mut c)).as_deref().and_then(error_code), Some(400));
    let r = h.send(1, data, &d.request(method::CONNECTION_BIND, |_| {})).expect("reply");
    assert_eq!(error_code(&r), Some(400));
    let r = h.send(1, tuple(9), &bind_req(&mut d)).expect("reply");
    assert_eq!(error_code(&r), Some(400));

    // Unclaimed after 30 s: the binder is told to drop it if still parked;
    // once it is gone the core forgets it and the peer may be reached again.
    h.server.handle_timeout(h.now(40), &mut h.binder);
    assert_eq!(h.binder.expired, vec![id]);
    h.binder.conns.clear();
    h.server.handle_timeout(h.now(41), &mut h.binder);
    assert_eq!(h.send(41, t, &c.request(method::CONNECT, connect_req(peer()))), None);
    let (second, _, _) = *h.binder.connects.last().expect("a second connection");
    assert_ne!(second, id);

    // A failed connection answers 447.
    let (_, _, r) = h.server.tcp_connected(h.now(42), second, false).expect("answer");
    assert_eq!(error_code(&r), Some(447));
    assert!(c.verify(&r));

    // Removing the allocation closes its connections and the listener.
    assert_eq!(h.send(42, t, &c.request(method::CONNECT, connect_req(peer()))), None);
    let (third, _, _) = *h.binder.connects.last().expect("a third connection");
    h.server.client_closed(t, &mut h.binder);
    assert!(h.binder.closed.contains(&third), "{:?}", h.binder.closed);
    assert!(!h.binder.tcp_open.contains(&relay));
    assert_eq!(h.server.tcp_connected(h.now(43), third, true), None, "no allocation: the driver closes it");
    assert_eq!(h.quotas.total(), 0);
}

#[test]
fn tcp_peer_connections_need_a_permission() {
    let mut h = Harness::new();
    let mut c = Client::new("alice", "wonderland");
    let t = tcp_tuple(1);
    let relay = tcp_allocate(&mut h, &mut c, t);
    // No permission yet: refused (the driver closes the connection).
    assert_eq!(h.server.tcp_peer_accepted(h.now(0), relay, peer(), 77), None);
    assert_eq!(permit(&mut h, &mut c, t, peer()), None);
    let (to, user, ind) = h.server.tcp_peer_accepted(h.now(0), relay, peer(), 77).expect("accepted");
    assert_eq!((to, user.as_str()), (t, "alice"));
    let m = Message::parse(&ind).expect("parses");
    assert_eq!((m.method(), m.class()), (method::CONNECTION_ATTEMPT, Class::Indication));
    assert_eq!(m.get_u32(attr::CONNECTION_ID), Some(77));
    assert_eq!(m.get_xor_addr(attr::XOR_PEER_ADDRESS), Some(Ok(peer())));
    // A peer the policy refuses never gets in, permission or not.
    let loopback: SocketAddr = "127.0.0.1:5000".parse().expect("literal");
    assert_eq!(h.server.tcp_peer_accepted(h.now(0), relay, loopback, 78), None);
    assert_eq!(h.server.metrics().drops(DropReason::PeerDenied), 1);
    // Unknown relay address.
    assert_eq!(h.server.tcp_peer_accepted(h.now(0), "198.51.100.9:1".parse().expect("literal"), peer(), 79), None);
    // The per-allocation cap.
    let mut cfg = cfg();
    cfg.max_tcp_connections = 1;
    let mut h = Harness::with(cfg, Quotas::new(4, 100));
    let mut c = Client::new("alice", "wonderland");
    let relay = tcp_allocate(&mut h, &mut c, t);
    assert_eq!(permit(&mut h, &mut c, t, peer()), None);
    assert_eq!(h.send(0, t, &c.request(method::CONNECT, connect_req(peer()))), None);
    let other: SocketAddr = "203.0.113.6:9000".parse().expect("literal");
    let r = h.send(0, t, &c.request(method::CONNECT, connect_req(other))).expect("reply");
    assert_eq!(error_code(&r), Some(508));
    assert!(h.server.tcp_peer_accepted(h.now(0), relay, peer(), 90).is_none());
}

#[test]
fn tcp_allocations_skip_reserved_ports() {
    let mut h = Harness::new();
    // The port the binder hands out next is held by an EVEN-PORT reservation.
    let next: SocketAddr = format!("198.51.100.1:{}", 50000 + h.binder.next_port + 2).parse().expect("literal");
    let held = h.binder.hold(next).expect("free");
    assert!(h.quotas.reserve([7; 8], "carol", next, h.start + Duration::from_secs(30), held).is_ok());
    let mut c = Client::new("alice", "wonderland");
    let relay = tcp_allocate(&mut h, &mut c, tcp_tuple(1));
    assert_ne!(relay, next);
    assert!(h.binder.released.contains(&next) && !h.binder.tcp_open.contains(&next));
}

fn dual_req(b: &mut MessageBuilder) {
    allocate_req(b);
    b.attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]);
}

/// The relayed addresses and ADDRESS-ERROR-CODE (family, code) of an
/// Allocate success.
fn relayed(resp: &[u8]) -> (Vec<SocketAddr>, Option<(u8, u16)>) {
    let m = Message::parse(resp).expect("parses");
    assert_eq!(m.class(), Class::Success, "error {:?}", error_code(resp));
    let tid = m.transaction_id();
    let addrs = m.get_all(attr::XOR_RELAYED_ADDRESS).map(|v| crate::stun::decode_xor_addr(v, &tid).expect("valid")).collect();
    let missing = m.get(attr::ADDRESS_ERROR_CODE).map(|v| (v[0], decode_error_code(v).expect("code").0));
    (addrs, missing)
}

/// A dual Allocate after the 401 round trip: the success response.
fn dual_allocate(h: &mut Harness, c: &mut Client, t: FiveTuple) -> Vec<u8> {
    let r = h.send(0, t, &c.request(method::ALLOCATE, dual_req)).expect("reply");
    c.learn(&r);
    h.send(0, t, &c.request(method::ALLOCATE, dual_req)).expect("reply")
}

fn peer6() -> SocketAddr {
    "[2001:db8:beef::5]:7000".parse().expect("literal")
}

fn to_peer(h: &mut Harness, at: u64, t: FiveTuple, to: SocketAddr) -> Option<SocketAddr> {
    let now = h.now(at);
    match h.server.handle_client(now, t, &send_indication(to, b"d"), &mut h.binder) {
        ClientOutput::ToPeer { relay, peer, .. } => {
            assert_eq!(peer, to);
            Some(relay)
        }
        _ => None,
    }
}

/// A Refresh (after a new nonce if the old one went stale); the granted
/// lifetime or the error code.
fn refresh_family(h: &mut Harness, c: &mut Client, at: u64, t: FiveTuple, family: Option<u8>, lifetime: u32) -> Result<u32, u16> {
    let req = |c: &mut Client| {
        c.request(method::REFRESH, |b| {
            b.attr_u32(attr::LIFETIME, lifetime);
            if let Some(f) = family {
                b.attr(attr::REQUESTED_ADDRESS_FAMILY, &[f, 0, 0, 0]);
            }
        })
    };
    let mut r = h.send(at, t, &req(c)).expect("reply");
    if error_code(&r) == Some(438) {
        c.learn(&r);
        r = h.send(at, t, &req(c)).expect("reply");
    }
    match error_code(&r) {
        Some(e) => Err(e),
        None => Ok(Message::parse(&r).expect("parses").get_u32(attr::LIFETIME).expect("lifetime")),
    }
}

#[test]
fn dual_allocation_relays_each_peer_through_its_own_family() {
    let mut h = Harness::new();
    h.binder.v6 = true;
    let t = tuple(1);
    let mut c = Client::new("alice", "wonderland");
    let r = dual_allocate(&mut h, &mut c, t);
    assert!(c.verify(&r));
    let (addrs, missing) = relayed(&r);
    assert_eq!(missing, None);
    assert_eq!(addrs.len(), 2, "{addrs:?}");
    let (v4, v6) = (addrs[0], addrs[1]);
    assert!(v4.is_ipv4() && v6.is_ipv6(), "{addrs:?}");
    assert_eq!(h.binder.open, vec![v4, v6]);
    // One allocation, one quota slot.
    assert_eq!(h.quotas.total(), 1);
    assert_eq!(h.server.allocation_count(), 1);
    // A retransmission gets the same two addresses.
    c.tid -= 1;
    let again = h.send(0, t, &c.request(method::ALLOCATE, dual_req)).expect("reply");
    assert_eq!(relayed(&again), (vec![v4, v6], None));
    // Peers of both families in one CreatePermission.
    let r = h.send(0, t, &c.request(method::CREATE_PERMISSION, |b| {
        b.xor_addr(attr::XOR_PEER_ADDRESS, peer()).xor_addr(attr::XOR_PEER_ADDRESS, peer6());
    }));
    assert_eq!(error_code(&r.expect("reply")), None);
    assert_eq!(to_peer(&mut h, 1, t, peer()), Some(v4));
    assert_eq!(to_peer(&mut h, 1, t, peer6()), Some(v6));
    assert_eq!(bind(&mut h, &mut c, t, 0x4000, peer6()), None);
    assert_eq!(h.server.handle_peer(h.now(1), v6, peer6(), b"x"), PeerOutput::ChannelData { to: t, header: channel_data::header(0x4000, 1) });
    assert!(matches!(h.server.handle_peer(h.now(1), v4, peer(), b"x"), PeerOutput::DataIndication { to, .. } if to == t));
    // Deleting the allocation releases both addresses and the slot.
    assert_eq!(refresh_family(&mut h, &mut c, 2, t, None, 0), Ok(0));
    assert!(h.binder.open.is_empty());
    assert_eq!(h.binder.released, vec![v4, v6]);
    assert!(h.server.by_relay.is_empty());
    assert_eq!(h.quotas.total(), 0);
    assert_eq!(h.server.handle_peer(h.now(2), v6, peer6(), b"x"), PeerOutput::Drop);
}

#[test]
fn dual_allocation_without_ipv6_succeeds_with_an_address_error_code() {
    let mut h = Harness::new();
    let t = tuple(1);
    let mut c = Client::new("alice", "wonderland");
    let (addrs, missing) = relayed(&dual_allocate(&mut h, &mut c, t));
    assert_eq!(missing, Some((2, 440)), "no IPv6 relay address configured");
    assert_eq!(addrs.len(), 1);
    assert!(addrs[0].is_ipv4());
    // A retransmission repeats the ADDRESS-ERROR-CODE.
    c.tid -= 1;
    let again = h.send(0, t, &c.request(method::ALLOCATE, dual_req)).expect("reply");
    assert_eq!(relayed(&again), (addrs.clone(), Some((2, 440))));
    assert_eq!(permit(&mut h, &mut c, t, peer6()), Some(443));
    assert_eq!(permit(&mut h, &mut c, t, peer()), None);
    assert_eq!(refresh_family(&mut h, &mut c, 1, t, Some(2), 600), Err(443));

    // IPv6 configured but out of ports: 508 for that family.
    let mut h = Harness::new();
    h.binder.v6 = true;
    h.binder.exhausted_v6 = true;
    let mut c = Client::new("alice", "wonderland");
    let (addrs, missing) = relayed(&dual_allocate(&mut h, &mut c, t));
    assert_eq!(missing, Some((2, 508)));
    assert_eq!(addrs.len(), 1);

    // IPv4 out of ports: IPv6 alone, and 508 for IPv4.
    let mut h = Harness::new();
    h.binder.v6 = true;
    h.binder.exhausted_v4 = true;
    let mut c = Client::new("alice", "wonderland");
    let (addrs, missing) = relayed(&dual_allocate(&mut h, &mut c, t));
    assert_eq!(missing, Some((1, 508)));
    assert_eq!(addrs.len(), 1);
    assert!(addrs[0].is_ipv6());
    assert_eq!(to_peer(&mut h, 0, t, peer()), None);

    // Neither family: the request fails and the quota slot comes back.
    let mut h = Harness::new();
    h.binder.exhausted = true;
    let mut c = Client::new("alice", "wonderland");
    assert_eq!(error_code(&dual_allocate(&mut h, &mut c, t)), Some(508));
    assert_eq!(h.quotas.total(), 0);
    assert_eq!(h.server.allocation_count(), 0);

    // No IPv4 at all: 440 as for a plain Allocate (IPv4 is the default
    // family), and IPv6 is not even tried.
    let mut h = Harness::new();
    h.binder.v6 = true;
    h.binder.no_v4 = true;
    let mut c = Client::new("alice", "wonderland");
    assert_eq!(error_code(&dual_allocate(&mut h, &mut c, t)), Some(440));
    assert!(h.binder.open.is_empty());
    assert_eq!(h.quotas.total(), 0);
}

#[test]
fn dual_allocation_request_errors() {
    let mut h = Harness::new();
    h.binder.v6 = true;
    let t = tuple(1);
    let mut c = Client::new("alice", "wonderland");
    let r = h.send(0, t, &c.request(method::ALLOCATE, dual_req)).expect("reply");
    c.learn(&r);
    let mut attempt = |h: &mut Harness, extra: &dyn Fn(&mut MessageBuilder)| {
        let r = h.send(0, t, &c.request(method::ALLOCATE, |b| {
            allocate_req(b);
            extra(b);
        }));
        error_code(&r.expect("reply"))
    };
    // Only IPv6 can be the additional family.
    assert_eq!(attempt(&mut h, &|b| { b.attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[1, 0, 0, 0]); }), Some(400));
    assert_eq!(attempt(&mut h, &|b| { b.attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[3, 0, 0, 0]); }), Some(400));
    assert_eq!(attempt(&mut h, &|b| { b.attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2]); }), Some(400));
    // Not with REQUESTED-ADDRESS-FAMILY, RESERVATION-TOKEN or a port pair.
    assert_eq!(attempt(&mut h, &|b| { b.attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]).attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]); }), Some(400));
    assert_eq!(attempt(&mut h, &|b| { b.attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]).attr(attr::RESERVATION_TOKEN, &[1; 8]); }), Some(400));
    assert_eq!(attempt(&mut h, &|b| { b.attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]).attr(attr::EVEN_PORT, &[0x80]); }), Some(400));
    assert_eq!(h.quotas.total(), 0);
    assert!(h.binder.open.is_empty());
    // A malformed REQUESTED-ADDRESS-FAMILY is 400, an unknown one 440.
    assert_eq!(attempt(&mut h, &|b| { b.attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0]); }), Some(400));
    assert_eq!(attempt(&mut h, &|b| { b.attr(attr::REQUESTED_ADDRESS_FAMILY, &[3, 0, 0, 0]); }), Some(440));
    assert_eq!(h.quotas.total(), 0);
    // An even port without a reservation is fine, for both families.
    assert_eq!(attempt(&mut h, &|b| { b.attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]).attr(attr::EVEN_PORT, &[0]); }), None);
    assert_eq!(h.binder.open.len(), 2);
    assert_eq!(h.binder.evens, vec![true, true]);
}

#[test]
fn dual_allocation_families_are_refreshed_and_deleted_apart() {
    let mut h = Harness::new();
    h.binder.v6 = true;
    let t = tuple(1);
    let mut c = Client::new("alice", "wonderland");
    let (addrs, _) = relayed(&dual_allocate(&mut h, &mut c, t));
    let (v4, v6) = (addrs[0], addrs[1]);
    assert_eq!(permit(&mut h, &mut c, t, peer()), None);
    assert_eq!(bind(&mut h, &mut c, t, 0x4000, peer6()), None);
    // Deleting IPv6 alone takes its address, permission and channel.
    assert_eq!(refresh_family(&mut h, &mut c, 1, t, Some(2), 0), Ok(0));
    assert_eq!(h.binder.released, vec![v6]);
    assert_eq!(h.binder.open, vec![v4]);
    assert_eq!(h.server.handle_peer(h.now(1), v6, peer6(), b"x"), PeerOutput::Drop);
    assert_eq!(to_peer(&mut h, 1, t, peer6()), None);
    let a = &h.server.allocations[&t];
    assert_eq!((a.permissions.len(), a.channels.len(), a.peer_channels.len()), (1, 0, 0), "IPv6 peers forgotten, not holding slots");
    assert_eq!(h.server.by_relay.keys().copied().collect::<Vec<_>>(), vec![v4]);
    // A late retransmission of the Allocate still gets the original answer.
    c.tid = 1;
    let again = h.send(1, t, &c.request(method::ALLOCATE, dual_req)).expect("reply");
    assert_eq!(relayed(&again), (vec![v4, v6], None));
    c.tid = 50;
    assert_eq!(bind(&mut h, &mut c, t, 0x4001, peer6()), Some(443));
    assert_eq!(refresh_family(&mut h, &mut c, 1, t, Some(2), 600), Err(443));
    // IPv4 keeps working and keeps the quota slot.
    assert_eq!(to_peer(&mut h, 1, t, peer()), Some(v4));
    assert_eq!(h.quotas.total(), 1);
    // Deleting the last family deletes the allocation.
    assert_eq!(refresh_family(&mut h, &mut c, 2, t, Some(1), 0), Ok(0));
    assert_eq!(h.server.allocation_count(), 0);
    assert_eq!(h.quotas.total(), 0);
    assert!(h.binder.open.is_empty());

    // Each family expires on its own: refresh IPv4 only, and IPv6 lapses
    // at the allocation's first lifetime.
    let mut h = Harness::new();
    h.binder.v6 = true;
    let mut c = Client::new("alice", "wonderland");
    let (addrs, _) = relayed(&dual_allocate(&mut h, &mut c, t));
    let (v4, v6) = (addrs[0], addrs[1]);
    assert_eq!(refresh_family(&mut h, &mut c, 300, t, Some(1), 600), Ok(600));
    let now = h.now(599);
    h.server.handle_timeout(now, &mut h.binder);
    assert_eq!(h.binder.open, vec![v4, v6]);
    let now = h.now(600);
    h.server.handle_timeout(now, &mut h.binder);
    assert_eq!(h.binder.open, vec![v4]);
    assert_eq!(h.server.allocation_count(), 1);
    assert_eq!(refresh_family(&mut h, &mut c, 601, t, Some(2), 600), Err(443));
    let now = h.now(900);
    h.server.handle_timeout(now, &mut h.binder);
    assert_eq!(h.server.allocation_count(), 0);
    assert_eq!(h.binder.released, vec![v6, v4]);
    assert_eq!(h.quotas.total(), 0);

    // A Refresh without REQUESTED-ADDRESS-FAMILY refreshes both, and both
    // then expire in the same tick.
    let mut h = Harness::new();
    h.binder.v6 = true;
    let mut c = Client::new("alice", "wonderland");
    let (addrs, _) = relayed(&dual_allocate(&mut h, &mut c, t));
    assert_eq!(refresh_family(&mut h, &mut c, 300, t, None, 600), Ok(600));
    let now = h.now(899);
    h.server.handle_timeout(now, &mut h.binder);
    assert_eq!(h.binder.open, addrs);
    let now = h.now(900);
    h.server.handle_timeout(now, &mut h.binder);
    assert_eq!(h.server.allocation_count(), 0);
    assert_eq!(h.binder.released, addrs);
    assert!(h.server.by_relay.is_empty());
    assert_eq!(h.quotas.total(), 0);
    assert_eq!(h.server.metrics().allocations.load(std::sync::atomic::Ordering::Relaxed), 0);

    // A REQUESTED-ADDRESS-FAMILY that is not four bytes is malformed.
    let mut h = Harness::new();
    let mut c = Client::new("alice", "wonderland");
    allocate(&mut h, &mut c, t);
    let r = h.send(1, t, &c.request(method::REFRESH, |b| {
        b.attr(attr::REQUESTED_ADDRESS_FAMILY, &[1]);
    }));
    assert_eq!(error_code(&r.expect("reply")), Some(400));
}

#[test]
fn dual_tcp_allocation_connects_each_peer_from_its_family() {
    let mut h = Harness::new();
    h.binder.v6 = true;
    let t = tcp_tuple(1);
    let mut c = Client::new("alice", "wonderland");
    let dual_tcp = |b: &mut MessageBuilder| {
        tcp_allocate_req(b);
        b.attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    };
    let r = h.send(0, t, &c.request(method::ALLOCATE, dual_tcp)).expect("reply");
    c.learn(&r);
    let (addrs, missing) = relayed(&h.send(0, t, &c.request(method::ALLOCATE, dual_tcp)).expect("reply"));
    assert_eq!(missing, None);
    assert_eq!(h.binder.tcp_open, addrs);
    assert_eq!(h.send(0, t, &c.request(method::CONNECT, connect_req(peer6()))), None, "answered once connected");
    assert_eq!(h.send(0, t, &c.request(method::CONNECT, connect_req(peer()))), None);
    assert_eq!(h.binder.connects.iter().map(|(_, relay, p)| (*relay, *p)).collect::<Vec<_>>(), vec![(addrs[1], peer6()), (addrs[0], peer())]);
    assert_eq!(h.server.tcp_conns.len(), 2);
    // Deleting IPv6 closes the IPv6 peer's connection only.
    assert_eq!(refresh_family(&mut h, &mut c, 1, t, Some(2), 0), Ok(0));
    let (c6, c4) = (h.binder.connects[0].0, h.binder.connects[1].0);
    assert_eq!(h.binder.closed, vec![c6]);
    assert_eq!(h.binder.tcp_open, vec![addrs[0]]);
    assert_eq!(h.server.tcp_conns.keys().copied().collect::<Vec<_>>(), vec![c4]);
    // And the allocation's end closes the rest.
    assert_eq!(refresh_family(&mut h, &mut c, 1, t, None, 0), Ok(0));
    assert_eq!(h.binder.closed, vec![c6, c4]);
    assert!(h.server.tcp_conns.is_empty() && h.binder.tcp_open.is_empty() && h.server.by_relay.is_empty());
}
