//! The body of the `stun_parse` fuzz target, shared by the cargo-fuzz crate
//! in `relay/fuzz` and by the stable test `tests/fuzz_corpus.rs`, which runs
//! it over the committed seed corpus so the body is exercised without a
//! nightly toolchain.
//!
//! For arbitrary bytes it checks that nothing panics and that:
//! - ChannelData framing re-encodes to the header it parsed;
//! - a message that parses re-encodes (attributes copied in wire order, with
//!   and without FINGERPRINT) to one that parses to the same method, class,
//!   transaction id and attributes, and is no longer than the original;
//! - every XOR address that decodes re-encodes to the same address;
//! - the TURN state machine, fed the bytes from a stranger, from a client
//!   with an allocation (raw, and re-signed with that client's credentials
//!   so authenticated requests reach their handlers), and from a peer,
//!   answers only with well-formed STUN, relays no more than it was given,
//!   and gives every allocation and quota slot back at shutdown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::{CredentialStore, NonceKey};
use crate::stun::{Class, Message, MessageBuilder, PasswordAlgorithm, attr, channel_data, decode_error_code, framed_len, method};
use crate::turn::{BindError, ClientOutput, Family, FiveTuple, Held, Now, PeerOutput, Quotas, RelayBinder, Server, ServerConfig, Transport};

const REALM: &str = "fuzz.test";
const USER: &str = "fuzzer";
const PASS: &str = "fuzz-password";
/// Largest input re-signed as a request: the added credentials must still
/// fit the 16-bit STUN length.
const RESIGN_MAX_BYTES: usize = 60_000;

/// Runs every check above on `data`; panics on a violation.
#[doc(hidden)]
pub fn fuzz_stun_parse(data: &[u8]) {
    framing(data);
    if let Ok(m) = Message::parse(data) {
        decoders(&m);
        round_trip(&m);
    }
    state_machine(data);
}

fn framing(data: &[u8]) {
    let _ = framed_len(data);
    let _ = channel_data::framed_len(data);
    if let Some((channel, payload)) = channel_data::parse(data) {
        assert!(payload.len() <= data.len().saturating_sub(4));
        let len = u16::try_from(payload.len()).unwrap_or(u16::MAX);
        assert_eq!(channel_data::header(channel, len)[..], data[..4], "ChannelData header does not re-encode");
    }
}

fn decoders(m: &Message<'_>) {
    let tid = m.transaction_id();
    for t in m.attribute_types() {
        let _ = m.get_u32(t);
        let _ = m.get_str(t);
        let _ = m.get(t).map(decode_error_code);
        let _ = m.get(t).map(PasswordAlgorithm::decode);
        if let Some(Ok(addr)) = m.get_xor_addr(t) {
            let mut b = MessageBuilder::new(method::BINDING, Class::Success, tid);
            b.xor_addr(attr::XOR_MAPPED_ADDRESS, addr);
            let bytes = b.finish();
            let again = Message::parse(&bytes).map(|r| r.get_xor_addr(attr::XOR_MAPPED_ADDRESS));
            assert_eq!(again, Ok(Some(Ok(addr))), "XOR address does not round-trip");
        }
    }
    let _ = m.unknown_required(&[]);
    let _ = m.integrity_kind();
    let _ = m.verify_integrity(b"fuzz");
}

/// The attributes the parser kept, in wire order.
fn attributes<'a>(m: &Message<'a>) -> Vec<(u16, &'a [u8])> {
    let mut seen: HashMap<u16, usize> = HashMap::new();
    let mut out = Vec::new();
    for t in m.attribute_types() {
        let k = seen.entry(t).or_default();
        if let Some(v) = m.get_all(t).nth(*k) {
            out.push((t, v));
        }
        *k += 1;
    }
    out
}

fn round_trip(m: &Message<'_>) {
    let attrs = attributes(m);
    assert_eq!(attrs.len(), m.attribute_types().count(), "get_all disagrees with attribute_types");
    for with_fingerprint in [false, true] {
        let mut b = MessageBuilder::new(m.method(), m.class(), m.transaction_id());
        for (t, v) in &attrs {
            b.attr(*t, v);
        }
        if with_fingerprint {
            b.fingerprint();
        }
        let bytes = b.finish();
        if !with_fingerprint {
            assert!(bytes.len() <= m.bytes().len(), "re-encoding grew the message");
        } else if bytes.len() > crate::stun::HEADER_LEN + usize::from(u16::MAX) {
            continue;
        }
        let again = match Message::parse(&bytes) {
            Ok(again) => again,
            Err(e) => panic!("re-encoded message does not parse ({e}), fingerprint: {with_fingerprint}"),
        };
        assert_eq!((again.method(), again.class(), again.transaction_id()), (m.method(), m.class(), m.transaction_id()));
        assert_eq!(attributes(&again), attrs, "attributes changed in the round trip");
    }
}

/// Hands out relay addresses in 198.51.100.0/24 and 2001:db8::/32; never
/// fails.
struct FuzzBinder {
    next_port: u16,
}

impl RelayBinder for FuzzBinder {
    fn bind(&mut self, family: Family, _even_port: bool) -> Result<SocketAddr, BindError> {
        self.next_port = self.next_port.wrapping_add(2);
        match family {
            Family::V4 => Ok(SocketAddr::from(([198, 51, 100, 1], 50000u16.wrapping_add(self.next_port)))),
            Family::V6 => Ok(SocketAddr::new(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).into(), 50000u16.wrapping_add(self.next_port))),
        }
    }

    fn hold(&mut self, addr: SocketAddr) -> Result<Held, BindError> {
        Ok(Box::new(addr))
    }

    fn bind_exact(&mut self, addr: SocketAddr, _held: Held) -> Result<SocketAddr, BindError> {
        Ok(addr)
    }

    fn release(&mut self, _relay: SocketAddr) {}

    fn bind_tcp(&mut self, family: Family) -> Result<SocketAddr, BindError> {
        self.bind(family, false)
    }

    fn release_tcp(&mut self, _relay: SocketAddr) {}

    fn tcp_connect(&mut self, _relay: SocketAddr, _peer: SocketAddr) -> Option<u32> {
        self.next_port = self.next_port.wrapping_add(1);
        Some(u32::from(self.next_port))
    }

    fn tcp_expire(&mut self, _id: u32) {}

    fn tcp_close(&mut self, _id: u32) {}

    fn tcp_open(&self, _id: u32) -> bool {
        true
    }
}

fn tuple(port: u16) -> FiveTuple {
    FiveTuple {
        client: SocketAddr::from(([192, 0, 2, 10], port)),
        server: SocketAddr::from(([192, 0, 2, 1], 3478)),
        transport: Transport::Udp,
    }
}

/// The permitted peer (documentation range, allowed by the fuzz policy).
fn peer() -> SocketAddr {
    SocketAddr::from(([203, 0, 113, 5], 9000))
}

/// A client's long-term credentials and the nonce it learned.
struct Session {
    nonce: Vec<u8>,
    tid: u8,
}

impl Session {
    fn sign(&mut self, method: u16, tid: Option<[u8; 12]>, add: &dyn Fn(&mut MessageBuilder)) -> Vec<u8> {
        self.tid = self.tid.wrapping_add(1);
        let mut b = MessageBuilder::new(method, Class::Request, tid.unwrap_or([self.tid; 12]));
        add(&mut b);
        b.attr(attr::USERNAME, USER.as_bytes()).attr(attr::REALM, REALM.as_bytes()).attr(attr::NONCE, &self.nonce);
        b.integrity(&PasswordAlgorithm::Md5.key(USER, REALM, PASS));
        b.fingerprint();
        b.finish()
    }
}

fn reply(out: ClientOutput<'_>) -> Option<Vec<u8>> {
    match out {
        ClientOutput::Reply(r) => Some(r),
        _ => None,
    }
}

/// Checks one client output: replies parse; relayed payloads are no longer
/// than the input.
fn check_client(out: &ClientOutput<'_>, input: &[u8]) {
    match out {
        ClientOutput::Nothing => {}
        ClientOutput::Reply(r) => {
            if let Err(e) = Message::parse(r) {
                panic!("the server built a malformed reply: {e}");
            }
        }
        ClientOutput::ToPeer { payload, .. } => assert!(payload.len() <= input.len()),
        ClientOutput::ConnectionBind { accept, reject, .. } => {
            for r in [accept, reject] {
                if let Err(e) = Message::parse(r) {
                    panic!("the server built a malformed ConnectionBind answer: {e}");
                }
            }
        }
    }
}

fn check_peer(out: &PeerOutput, input: &[u8]) {
    match out {
        PeerOutput::Drop => {}
        PeerOutput::ChannelData { header, .. } => {
            assert_eq!(usize::from(u16::from_be_bytes([header[2], header[3]])), input.len());
        }
        PeerOutput::DataIndication { message, .. } => {
            if let Err(e) = Message::parse(message) {
                panic!("the server built a malformed Data indication: {e}");
            }
        }
    }
}

fn state_machine(data: &[u8]) {
    let mut static_users = HashMap::new();
    static_users.insert(USER.to_owned(), PASS.to_owned());
    let mut cfg = ServerConfig::new(REALM, CredentialStore::new(vec![b"fuzz-secret".to_vec()], &static_users));
    if let Ok(range) = "203.0.113.0/24".parse() {
        cfg.policy.allow.push(range);
    }
    cfg.bandwidth_bytes_per_sec = Some(1 << 20);
    let quotas = Arc::new(Quotas::new(4, 16));
    let mut server = Server::new(Arc::new(cfg), NonceKey::new([7; 32], 600), quotas.clone(), Arc::default(), 1);
    let mut binder = FuzzBinder { next_port: 0 };
    let start = Instant::now();
    let now = Now { mono: start, unix_secs: 1_800_000_000 };

    // A stranger: no allocation, no credentials.
    let out = server.handle_client(now, tuple(1), data, &mut binder);
    check_client(&out, data);

    // A client with a dual allocation (IPv4 and IPv6), a permission and
    // channel 0x4000 for the peer.
    let t = tuple(2);
    let mut s = Session { nonce: Vec::new(), tid: 0 };
    let allocate = |b: &mut MessageBuilder| {
        b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]).attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    };
    let mut first = MessageBuilder::new(method::ALLOCATE, Class::Request, [0xA0; 12]);
    allocate(&mut first);
    let challenge = reply(server.handle_client(now, t, &first.finish(), &mut binder));
    let nonce = challenge.as_deref().and_then(|r| Message::parse(r).ok()).and_then(|m| m.get(attr::NONCE).map(<[u8]>::to_vec));
    let Some(nonce) = nonce else { panic!("no 401 with a nonce for an unauthenticated Allocate") };
    s.nonce = nonce;
    let ok = |r: Option<Vec<u8>>| r.as_deref().and_then(|r| Message::parse(r).ok()).is_some_and(|m| m.class() == Class::Success);
    let r = reply(server.handle_client(now, t, &s.sign(method::ALLOCATE, None, &allocate), &mut binder));
    let relay = r.as_deref().and_then(|r| Message::parse(r).ok()).and_then(|m| m.get_xor_addr(attr::XOR_RELAYED_ADDRESS));
    let Some(Ok(relay)) = relay else { panic!("the fuzz session's Allocate failed") };
    let bind = |b: &mut MessageBuilder| {
        b.attr(attr::CHANNEL_NUMBER, &[0x40, 0x00, 0, 0]).xor_addr(attr::XOR_PEER_ADDRESS, peer());
    };
    assert!(ok(reply(server.handle_client(now, t, &s.sign(method::CHANNEL_BIND, None, &bind), &mut binder))));

    // The bytes as they are, from the allocated 5-tuple (ChannelData and
    // Send indications take the data path).
    let out = server.handle_client(now, t, data, &mut binder);
    check_client(&out, data);

    // The bytes as this client's request, correctly signed, so the
    // authenticated handlers see the fuzzed attributes.
    if data.len() <= RESIGN_MAX_BYTES
        && let Ok(m) = Message::parse(data)
        && m.class() == Class::Request
    {
        let credentials = [
            attr::USERNAME,
            attr::REALM,
            attr::NONCE,
            attr::USERHASH,
            attr::PASSWORD_ALGORITHM,
            attr::MESSAGE_INTEGRITY,
            attr::MESSAGE_INTEGRITY_SHA256,
        ];
        let kept: Vec<(u16, &[u8])> = attributes(&m).into_iter().filter(|(t, _)| !credentials.contains(t)).collect();
        let copy = |b: &mut MessageBuilder| {
            for (t, v) in &kept {
                b.attr(*t, v);
            }
        };
        let signed = s.sign(m.method(), Some(m.transaction_id()), &copy);
        let out = server.handle_client(now, t, &signed, &mut binder);
        check_client(&out, &signed);
        // And from a client without an allocation, so that an Allocate
        // sees its attributes.
        let out = server.handle_client(now, tuple(3), &signed, &mut binder);
        check_client(&out, &signed);
    }

    // The bytes from the peer (ChannelData to the client) and from a peer
    // the policy refuses, which can never hold a permission (dropped).
    let out = server.handle_peer(now, relay, peer(), data);
    check_peer(&out, data);
    let out = server.handle_peer(now, relay, SocketAddr::from(([10, 1, 2, 3], 1)), data);
    assert_eq!(out, PeerOutput::Drop, "a peer without a permission was relayed");

    // Everything expires; whatever is left goes at shutdown.
    let later = Now { mono: start + Duration::from_secs(4 * 3600), unix_secs: now.unix_secs + 4 * 3600 };
    server.handle_timeout(later, &mut binder);
    server.remove_all(&mut binder);
    assert_eq!(server.allocation_count(), 0);
    assert_eq!(quotas.total(), 0, "a quota slot leaked");
}
