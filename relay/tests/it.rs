//! End-to-end tests of the `tessera-relay` binary over real sockets.
//!
//! Every test that starts a relay runs it inside a network namespace the
//! test creates itself, whose only interface is loopback: the test process
//! re-executes itself under `ip netns exec`, so even a relay bug cannot send
//! a packet off the host. This needs root and iproute2 (the suite script
//! installs it); without them the tests fail rather than skip.

mod support;

use std::net::SocketAddr;

use support::*;
use tessera_relay::stun::{Message, attr, method};

/// Peers the default policy must refuse (issue #6 security list).
const REFUSED_PEERS: &[&str] = &[
    "127.0.0.1:9", "[::1]:9", "0.0.0.0:9", "[::ffff:127.0.0.1]:9", "10.0.0.1:9", "169.254.169.254:80", "[64:ff9b::7f00:1]:9",
];

#[test]
fn security_default_policy_refuses_special_peers() {
    if !in_netns("security_default_policy_refuses_special_peers") {
        return;
    }
    let relay = Relay::start(&base_config(""));
    let mut c = TurnClient::new(relay.udp, "alice", "wonderland");
    c.allocate().expect("allocate succeeds");
    for (i, p) in REFUSED_PEERS.iter().enumerate() {
        let peer: SocketAddr = p.parse().expect("literal");
        let r = c.create_permission(peer);
        assert_eq!(r, Some(403), "CreatePermission to {peer}");
        let r = c.channel_bind(0x4000 + i as u16, peer);
        assert_eq!(r, Some(403), "ChannelBind to {peer}");
        c.send_indication(peer, b"must not leave");
    }
    // A Binding round trip after the indications orders them before the
    // metrics read: the shard handles its socket's datagrams in order.
    c.binding().expect("relay still answers");
    let m = relay.metrics();
    assert_eq!(metric(&m, "tessera_relay_dropped_packets_total{reason=\"peer_denied\"}"), REFUSED_PEERS.len() as u64, "{m}");
    assert_eq!(metric(&m, "tessera_relay_peer_refusals_total"), 2 * REFUSED_PEERS.len() as u64, "{m}");
    assert_eq!(metric(&m, "tessera_relay_packets_total{direction=\"to_peer\"}"), 0, "{m}");
}

#[test]
fn security_quotas_enforced() {
    if !in_netns("security_quotas_enforced") {
        return;
    }
    let relay = Relay::start(&base_config("max_allocations_per_user = 2\nmax_allocations = 3\n"));
    let mut a1 = TurnClient::new(relay.udp, "alice", "wonderland");
    let mut a2 = TurnClient::new(relay.udp, "alice", "wonderland");
    let mut a3 = TurnClient::new(relay.udp, "alice", "wonderland");
    let mut b1 = TurnClient::new(relay.udp, "bob", "builder");
    let mut b2 = TurnClient::new(relay.udp, "bob", "builder");
    assert_eq!(a1.allocate(), Ok(()));
    assert_eq!(a2.allocate(), Ok(()));
    assert_eq!(a3.allocate(), Err(486));
    assert_eq!(b1.allocate(), Ok(()));
    assert_eq!(b2.allocate(), Err(508));
    // Freeing one slot lets the next allocation in.
    assert_eq!(a1.refresh(0), Ok(0));
    assert_eq!(b2.allocate(), Ok(()));
    let m = relay.metrics();
    assert_eq!(metric(&m, "tessera_relay_quota_rejections_total"), 2, "{m}");
}

#[test]
fn security_malformed_corpus_neither_crashes_nor_stalls() {
    if !in_netns("security_malformed_corpus_neither_crashes_nor_stalls") {
        return;
    }
    let mut relay = Relay::start(&base_config(""));
    let mut c = TurnClient::new(relay.udp, "alice", "wonderland");
    c.allocate().expect("allocate");
    let corpus = malformed_corpus(&c.last_request);
    let junk = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    for p in &corpus {
        let _ = junk.send_to(p, relay.udp);
        // The same bytes from an allocated 5-tuple exercise the data path.
        c.send_raw(p);
    }
    // Over TCP too: garbage closes the connection but nothing else.
    for p in corpus.iter().take(200) {
        if let Ok(mut s) = std::net::TcpStream::connect(relay.udp) {
            use std::io::Write as _;
            let _ = s.write_all(p);
        }
    }
    assert!(c.binding().is_ok(), "relay stalled after the corpus");
    assert!(relay.alive(), "relay exited");
    let m = relay.metrics();
    assert!(metric(&m, "tessera_relay_dropped_packets_total{reason=\"malformed\"}") > 0, "{m}");
}

#[test]
fn rest_credentials_accepted_and_expired_rejected() {
    if !in_netns("rest_credentials_accepted_and_expired_rejected") {
        return;
    }
    let relay = Relay::start(&base_config(""));
    let now = unix_now();
    let (user, pass) = tessera_shared::turn_rest::turn_rest_credentials(SECRET.as_bytes(), "@alice:example.org", now + 3600);
    let mut ok = TurnClient::new(relay.udp, &user, &pass);
    assert_eq!(ok.allocate(), Ok(()));
    // Rotation: the old secret is still accepted.
    let (user, pass) = tessera_shared::turn_rest::turn_rest_credentials(OLD_SECRET.as_bytes(), "@bob:example.org", now + 3600);
    assert_eq!(TurnClient::new(relay.udp, &user, &pass).allocate(), Ok(()));
    let (user, pass) = tessera_shared::turn_rest::turn_rest_credentials(SECRET.as_bytes(), "@carol:example.org", now - 10);
    assert_eq!(TurnClient::new(relay.udp, &user, &pass).allocate(), Err(401));
    let (user, pass) = tessera_shared::turn_rest::turn_rest_credentials(b"unknown", "@dave:example.org", now + 3600);
    assert_eq!(TurnClient::new(relay.udp, &user, &pass).allocate(), Err(401));
    let m = relay.metrics();
    assert_eq!(metric(&m, "tessera_relay_auth_failures_total"), 2, "{m}");
}

#[test]
fn relays_between_two_clients_over_channels() {
    if !in_netns("relays_between_two_clients_over_channels") {
        return;
    }
    // Loopback peers are allowed explicitly here: the peers are the test's
    // own clients inside the namespace.
    let relay = Relay::start(&base_config("allowed_peer_ranges = [\"127.0.0.0/8\"]\n"));
    let mut a = TurnClient::new(relay.udp, "alice", "wonderland");
    let mut b = TurnClient::new(relay.udp, "bob", "builder");
    let ra = a.allocate_relay().expect("a allocates");
    let rb = b.allocate_relay().expect("b allocates");
    assert_eq!(a.create_permission(rb), None);
    assert_eq!(b.channel_bind(0x4001, ra), None);
    // a -> b by Send indication; b receives ChannelData (b bound a channel to ra).
    a.send_indication(rb, b"ping");
    assert_eq!(b.recv_data(), (0x4001u16.into(), b"ping".to_vec()));
    // b -> a by ChannelData; a receives a Data indication.
    b.send_channel_data(0x4001, b"pong");
    assert_eq!(a.recv_data(), (DataFrom::Peer(rb), b"pong".to_vec()));
    let m = relay.metrics();
    assert_eq!(metric(&m, "tessera_relay_packets_total{direction=\"to_peer\"}"), 2, "{m}");
    let _ = (attr::DATA, method::SEND);
}

#[test]
fn dual_allocation_relays_ipv4_and_ipv6_peers() {
    if !in_netns("dual_allocation_relays_ipv4_and_ipv6_peers") {
        return;
    }
    // base_config relays on 127.0.0.1 and ::1; the peers are the test's
    // own allocations inside the namespace.
    let relay = Relay::start(&base_config("allowed_peer_ranges = [\"127.0.0.0/8\", \"::1/128\"]\n"));
    let mut a = TurnClient::new(relay.udp, "alice", "wonderland");
    let mut b = TurnClient::new(relay.udp, "bob", "builder");
    let mut c = TurnClient::new(relay.udp, "bob", "builder");
    let (relays, missing) = a.allocate_with(&|m| {
        m.attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    }).expect("dual allocation");
    assert_eq!(missing, None);
    let [a4, a6] = relays[..] else { panic!("two relayed addresses expected: {relays:?}") };
    assert!(a4.is_ipv4() && a6.is_ipv6(), "{relays:?}");
    let (b_relays, _) = b.allocate_with(&|m| {
        m.attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    }).expect("IPv6 allocation");
    let b6 = b_relays[0];
    let c4 = c.allocate_relay().expect("IPv4 allocation");
    assert_eq!(a.create_permission(b6), None);
    assert_eq!(a.create_permission(c4), None);
    assert_eq!(b.channel_bind(0x4001, a6), None);
    assert_eq!(c.channel_bind(0x4001, a4), None);
    // Each peer is reached from, and answers to, the relay address of its
    // own family.
    a.send_indication(b6, b"to b over IPv6");
    assert_eq!(b.recv_data(), (0x4001u16.into(), b"to b over IPv6".to_vec()));
    a.send_indication(c4, b"to c over IPv4");
    assert_eq!(c.recv_data(), (0x4001u16.into(), b"to c over IPv4".to_vec()));
    b.send_channel_data(0x4001, b"from b");
    assert_eq!(a.recv_data(), (DataFrom::Peer(b6), b"from b".to_vec()));
    c.send_channel_data(0x4001, b"from c");
    assert_eq!(a.recv_data(), (DataFrom::Peer(c4), b"from c".to_vec()));
    // Deleting the IPv6 half leaves IPv4 relaying.
    assert_eq!(a.refresh_family(2, 0), Ok(0));
    assert_eq!(a.create_permission(b6), Some(443));
    assert_eq!(a.refresh_family(2, 600), Err(443));
    c.send_channel_data(0x4001, b"still here");
    assert_eq!(a.recv_data(), (DataFrom::Peer(c4), b"still here".to_vec()));
    let m = relay.metrics();
    assert_eq!(metric(&m, "tessera_relay_allocations"), 3, "{m}");
}

#[test]
fn even_port_reservation_holds_the_odd_port_until_its_token_is_used() {
    if !in_netns("even_port_reservation_holds_the_odd_port_until_its_token_is_used") {
        return;
    }
    let relay = Relay::start(&base_config("allowed_peer_ranges = [\"127.0.0.0/8\"]\n"));
    let mut a = TurnClient::new(relay.udp, "alice", "wonderland");
    let r = a.request(method::ALLOCATE, &|b| {
        b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]).attr(attr::EVEN_PORT, &[0x80, 0, 0, 0]);
    });
    let m = Message::parse(&r).expect("parses");
    let even = m.get_xor_addr(attr::XOR_RELAYED_ADDRESS).expect("relayed").expect("valid");
    let token = m.get(attr::RESERVATION_TOKEN).expect("a RESERVATION-TOKEN").to_vec();
    assert_eq!(even.port() % 2, 0);
    let odd = SocketAddr::new(even.ip(), even.port() + 1);
    // Held: nothing else on the host can take the odd port meanwhile.
    assert!(std::net::UdpSocket::bind(odd).is_err(), "{odd} is not held");
    // The token's Allocate (from any shard) gets it and relays on it.
    let mut b = TurnClient::new(relay.udp, "bob", "builder");
    let (relays, _) = b.allocate_with(&|m| {
        m.attr(attr::RESERVATION_TOKEN, &token);
    }).expect("the reserved port");
    assert_eq!(relays, vec![odd]);
    assert_eq!(b.create_permission(even), None);
    assert_eq!(a.create_permission(odd), None);
    a.send_indication(odd, b"to the odd port");
    assert_eq!(b.recv_data(), (DataFrom::Peer(even), b"to the odd port".to_vec()));
    b.send_indication(even, b"back");
    assert_eq!(a.recv_data(), (DataFrom::Peer(odd), b"back".to_vec()));
}

/// Two clients of `relay` with allocations and channels to each other's
/// relay address: a sends on 0x4001, b on 0x4002.
fn channel_pair(relay: &Relay) -> (TurnClient, TurnClient) {
    let mut a = TurnClient::new(relay.udp, "alice", "wonderland");
    let mut b = TurnClient::new(relay.udp, "bob", "builder");
    let ra = a.allocate_relay().expect("a allocates");
    let rb = b.allocate_relay().expect("b allocates");
    assert_eq!(a.channel_bind(0x4001, rb), None);
    assert_eq!(b.channel_bind(0x4002, ra), None);
    (a, b)
}

/// Sends `n` datagrams `payload(b'a', seq)` from a to b back to back, checks
/// that b receives each whole and in order, then the same from b to a.
fn burst_both_ways(a: &mut TurnClient, b: &mut TurnClient, n: u32, payload: impl Fn(u8, u32) -> Vec<u8>) {
    for seq in 0..n {
        a.send_channel_data(0x4001, &payload(b'a', seq));
    }
    for seq in 0..n {
        assert_eq!(b.recv_data(), (DataFrom::Channel(0x4002), payload(b'a', seq)), "a -> b datagram {seq}");
    }
    for seq in 0..n {
        b.send_channel_data(0x4002, &payload(b'b', seq));
    }
    for seq in 0..n {
        assert_eq!(a.recv_data(), (DataFrom::Channel(0x4001), payload(b'b', seq)), "b -> a datagram {seq}");
    }
}

#[test]
fn relays_bursts_of_many_batches_complete_and_in_order() {
    if !in_netns("relays_bursts_of_many_batches_complete_and_in_order") {
        return;
    }
    // A batch of 4 makes each burst span many recvmmsg/sendmmsg calls on the
    // listener and on both relay sockets.
    let relay = Relay::start(&base_config("allowed_peer_ranges = [\"127.0.0.0/8\"]\nudp_batch = 4\n"));
    let (mut a, mut b) = channel_pair(&relay);
    const BURST: u32 = 64;
    burst_both_ways(&mut a, &mut b, BURST, |dir, seq| {
        let mut v = vec![dir];
        v.extend_from_slice(&seq.to_be_bytes());
        // Lengths differ, so a payload taken from the wrong slot or with the
        // wrong length shows.
        v.extend(std::iter::repeat_n(dir, (seq % 13) as usize));
        v
    });
    let m = relay.metrics();
    assert_eq!(metric(&m, "tessera_relay_packets_total{direction=\"to_peer\"}"), u64::from(2 * BURST), "{m}");
    assert_eq!(metric(&m, "tessera_relay_dropped_packets_total{reason=\"io\"}"), 0, "{m}");
}

/// 200 bytes of `dir` with `seq` in bytes 1..5: datagram `seq` of a burst.
fn burst_payload(dir: u8, seq: u32) -> Vec<u8> {
    let mut v = vec![dir; 200];
    v[1..5].copy_from_slice(&seq.to_be_bytes());
    v
}

/// Bursts of equal datagrams to one destination (the packets of a video
/// frame) leave the relay as UDP GSO messages, both ways, and still arrive
/// one by one, whole and in order; with `udp_gso = false` none does.
#[test]
fn bursts_to_one_destination_leave_as_gso_messages_and_arrive_whole() {
    if !in_netns("bursts_to_one_destination_leave_as_gso_messages_and_arrive_whole") {
        return;
    }
    const BURST: u32 = 32;
    for gso in [true, false] {
        let relay = Relay::start(&base_config(&format!("allowed_peer_ranges = [\"127.0.0.0/8\"]\nudp_gso = {gso}\n")));
        let (mut a, mut b) = channel_pair(&relay);
        // Whether a burst forms runs depends on how many datagrams the
        // relay finds queued when it wakes; with GSO on, send bursts until
        // some did (each burst is checked whole), at most 20.
        let mut bursts = 0;
        loop {
            bursts += 1;
            burst_both_ways(&mut a, &mut b, BURST, burst_payload);
            let m = relay.metrics();
            let segments = metric(&m, "tessera_relay_udp_gso_datagrams_total");
            assert_eq!(metric(&m, "tessera_relay_packets_total{direction=\"to_peer\"}"), u64::from(2 * BURST * bursts), "{m}");
            assert_eq!(metric(&m, "tessera_relay_dropped_packets_total{reason=\"io\"}"), 0, "{m}");
            if !gso {
                assert_eq!(segments, 0, "GSO off: {m}");
                break;
            }
            if segments > 0 {
                break;
            }
            assert!(bursts < 20, "no GSO message in {bursts} bursts: {m}");
        }
    }
}

/// The frames a TCP client sends in one write leave for the peer together
/// (a run to one peer as one GSO message), each datagram whole and in
/// order; a burst from the peer reaches the client as whole frames in
/// order.
#[test]
fn a_tcp_clients_burst_leaves_in_one_batch_and_arrives_whole() {
    use std::io::Write as _;
    if !in_netns("a_tcp_clients_burst_leaves_in_one_batch_and_arrives_whole") {
        return;
    }
    const BURST: u32 = 32;
    let relay = Relay::start(&base_config("allowed_peer_ranges = [\"127.0.0.0/8\"]\nudp_gso = true\n"));
    let mut client = support::tcp::TcpTurn::connect(relay.udp, "alice", "wonderland");
    let (peer, relay_addr) = client.with_peer();
    // Whether one read takes the whole burst is up to the kernel; send
    // bursts until one left as a GSO message (each is checked whole), at
    // most 20.
    let mut buf = [0u8; 2048];
    let mut bursts = 0;
    loop {
        bursts += 1;
        let frames: Vec<u8> = (0..BURST).flat_map(|seq| support::tcp::channel_data_frame(0x4001, &burst_payload(b'c', seq))).collect();
        client.stream.write_all(&frames).expect("write the burst");
        for seq in 0..BURST {
            let (n, from) = peer.recv_from(&mut buf).expect("relayed datagram within the timeout");
            assert_eq!(from, relay_addr);
            assert_eq!(&buf[..n], burst_payload(b'c', seq), "datagram {seq} of burst {bursts}");
        }
        let m = relay.metrics();
        assert_eq!(metric(&m, "tessera_relay_packets_total{direction=\"to_peer\"}"), u64::from(BURST * bursts), "{m}");
        if metric(&m, "tessera_relay_udp_gso_datagrams_total") > 0 {
            break;
        }
        assert!(bursts < 20, "no GSO message in {bursts} bursts: {m}");
    }
    for seq in 0..BURST {
        peer.send_to(&burst_payload(b'p', seq), relay_addr).expect("peer sends");
    }
    for seq in 0..BURST {
        assert_eq!(client.read_channel_data(), (0x4001, burst_payload(b'p', seq)), "frame {seq} to the client");
    }
    let m = relay.metrics();
    assert_eq!(metric(&m, "tessera_relay_dropped_packets_total{reason=\"io\"}"), 0, "{m}");
}

/// A burst from a peer that reaches the relay as one coalesced message
/// (UDP GRO) of 60 datagrams is queued for a TLS client in one pass, so the
/// client's writer gathers more than rustls's own 64 KiB of records into
/// one write, which it must hand over as it goes: the client still gets
/// every frame whole and in order.
#[test]
fn a_tls_client_gets_a_burst_larger_than_the_record_buffer_whole() {
    if !in_netns("a_tls_client_gets_a_burst_larger_than_the_record_buffer_whole") {
        return;
    }
    const COUNT: u32 = 60;
    const SIZE: usize = 1090;
    let dir = support::TempDir(std::env::temp_dir().join(format!("tessera-relay-it-tls-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    let (cert, key) = self_signed(&dir.0, &["-newkey", "rsa:2048"]);
    let tls_port = support::free_port();
    let relay = Relay::start(&base_config(&format!(
        "allowed_peer_ranges = [\"127.0.0.0/8\"]\nudp_gro = true\ntls_listen = [\"127.0.0.1:{tls_port}\"]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        cert.display(),
        key.display()
    )));
    let mut client = support::tcp::TcpTurn::connect_tls(SocketAddr::from(([127, 0, 0, 1], tls_port)), "alice", "wonderland");
    let (peer, relay_addr) = client.with_peer();
    let payload = |seq: u32| {
        let mut v = vec![b'p'; SIZE];
        v[1..5].copy_from_slice(&seq.to_be_bytes());
        v
    };
    // 65,400 bytes of datagrams, 65,640 of frames, more with the records'
    // own overhead.
    let burst: Vec<u8> = (0..COUNT).flat_map(payload).collect();
    send_gso(&peer, relay_addr, &burst, SIZE);
    for seq in 0..COUNT {
        assert_eq!(client.read_channel_data(), (0x4001, payload(seq)), "frame {seq} to the client");
    }
    let m = relay.metrics();
    assert_eq!(metric(&m, "tessera_relay_udp_gro_datagrams_total"), u64::from(COUNT), "the burst arrived as one message: {m}");
    assert_eq!(metric(&m, "tessera_relay_packets_total{direction=\"to_client\"}"), u64::from(COUNT), "{m}");
    assert_eq!(metric(&m, "tessera_relay_dropped_packets_total{reason=\"io\"}"), 0, "{m}");
}

/// A self-signed certificate and its key (PKCS#8) in `dir`, of the key
/// type `newkey` asks openssl for.
fn self_signed(dir: &std::path::Path, newkey: &[&str]) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args(["req", "-x509"])
        .args(newkey)
        .args(["-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (the relay suite installs it)");
    assert!(made.status.success(), "openssl: {}", String::from_utf8_lossy(&made.stderr));
    (cert, key)
}

/// A DTLS client (RFC 7350) allocates and relays both ways through its
/// session, by ChannelData and by Send and Data indications. Its
/// close_notify ends the allocation: a new session from the same address
/// allocates again where the old allocation would answer 437. A datagram
/// that is no ClientHello opens nothing and gets no answer; a DTLS 1.0
/// ClientHello gets a protocol_version alert.
#[test]
fn a_dtls_client_relays_both_ways_and_its_allocation_ends_with_its_session() {
    if !in_netns("a_dtls_client_relays_both_ways_and_its_allocation_ends_with_its_session") {
        return;
    }
    let dir = support::TempDir(std::env::temp_dir().join(format!("tessera-relay-it-dtls-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    // DTLS takes ECDSA certificates only.
    let (cert, key) = self_signed(&dir.0, &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]);
    let dtls_port = support::free_port();
    let relay = Relay::start(&base_config(&format!(
        "allowed_peer_ranges = [\"127.0.0.0/8\"]\ndtls_listen = [\"127.0.0.1:{dtls_port}\"]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        cert.display(),
        key.display()
    )));
    let server = SocketAddr::from(([127, 0, 0, 1], dtls_port));
    let mut client = TurnClient::new_dtls(server, "alice", "wonderland", &cert, &key);
    let relay_addr = client.allocate_relay().expect("allocate over DTLS");
    let peer = |_: ()| {
        let p = std::net::UdpSocket::bind("127.0.0.1:0").expect("peer");
        p.set_read_timeout(Some(RECV_TIMEOUT)).expect("timeout");
        p
    };
    let (bound, unbound) = (peer(()), peer(()));
    let (bound_addr, unbound_addr) = (bound.local_addr().expect("addr"), unbound.local_addr().expect("addr"));
    let mut buf = [0u8; 2048];
    assert_eq!(client.channel_bind(0x4001, bound_addr), None);
    client.send_channel_data(0x4001, b"over a channel");
    let (n, from) = bound.recv_from(&mut buf).expect("the peer gets the channel's data");
    assert_eq!((&buf[..n], from), (&b"over a channel"[..], relay_addr));
    bound.send_to(b"back over the channel", relay_addr).expect("send");
    assert_eq!(client.recv_data(), (DataFrom::Channel(0x4001), b"back over the channel".to_vec()));
    assert_eq!(client.create_permission(unbound_addr), None);
    client.send_indication(unbound_addr, b"by indication");
    let (n, from) = unbound.recv_from(&mut buf).expect("the peer gets the indication's data");
    assert_eq!((&buf[..n], from), (&b"by indication"[..], relay_addr));
    unbound.send_to(b"back by indication", relay_addr).expect("send");
    assert_eq!(client.recv_data(), (DataFrom::Peer(unbound_addr), b"back by indication".to_vec()));
    let m = relay.metrics();
    assert_eq!(metric(&m, "tessera_relay_dtls_handshakes_total"), 1, "{m}");
    assert_eq!(metric(&m, "tessera_relay_dtls_sessions"), 1, "{m}");
    assert_eq!(metric(&m, "tessera_relay_packets_total{direction=\"to_client\"}"), 2, "{m}");

    client.close_dtls();
    client.reconnect_dtls(&cert, &key);
    assert!(client.allocate_relay().is_ok(), "the closed session's allocation went with it (else 437)");
    let m = relay.metrics();
    assert_eq!(metric(&m, "tessera_relay_dtls_handshakes_total"), 2, "{m}");
    assert_eq!(metric(&m, "tessera_relay_dtls_sessions"), 1, "{m}");
    assert_eq!(metric(&m, "tessera_relay_allocations"), 1, "{m}");

    let raw = peer(());
    raw.send_to(b"\x00\x01\x00\x00 not a ClientHello", server).expect("send");
    // A DTLS 1.0 ClientHello: record (version 1.0, epoch 0, sequence 5),
    // handshake header, client_version 1.0, then zeros.
    let mut hello = vec![22, 0xfe, 0xff, 0, 0, 0, 0, 0, 0, 0, 5, 0, 60];
    hello.extend_from_slice(&[1, 0, 0, 48, 0, 0, 0, 0, 0, 0, 0, 48, 0xfe, 0xff]);
    hello.resize(13 + 60, 0);
    raw.send_to(&hello, server).expect("send");
    let (n, _) = raw.recv_from(&mut buf).expect("an alert");
    assert_eq!(&buf[..n], &[21, 0xfe, 0xff, 0, 0, 0, 0, 0, 0, 0, 5, 0, 2, 2, 70], "fatal protocol_version, and nothing for the junk before it");
    let m = relay.metrics();
    assert_eq!(metric(&m, "tessera_relay_dtls_sessions"), 1, "neither opened a session: {m}");
    assert_eq!(metric(&m, "tessera_relay_dropped_packets_total{reason=\"malformed\"}"), 1, "{m}");
}

/// A burst a client sends as one GSO message reaches a listener with
/// `UDP_GRO` as one coalesced message, and the relay socket on the far
/// side gets the relay's own GSO message coalesced too: both are split back
/// into datagrams, each relayed whole and in order (the far side's
/// ChannelData headers are written in front of each). With `udp_gro =
/// false` the kernel splits the bursts itself and nothing counts as
/// coalesced.
#[test]
fn coalesced_bursts_are_split_back_into_their_datagrams() {
    if !in_netns("coalesced_bursts_are_split_back_into_their_datagrams") {
        return;
    }
    const BURST: u32 = 24;
    let payload = |dir: u8, seq: u32| {
        let mut v = vec![dir; 300];
        v[1..5].copy_from_slice(&seq.to_be_bytes());
        v[299] = seq as u8;
        v
    };
    for gro in [true, false] {
        let relay = Relay::start(&base_config(&format!("allowed_peer_ranges = [\"127.0.0.0/8\"]\nudp_gro = {gro}\n")));
        let (mut a, mut b) = channel_pair(&relay);
        let rounds = 3;
        for _ in 0..rounds {
            a.send_channel_data_gso(0x4001, &(0..BURST).map(|seq| payload(b'a', seq)).collect::<Vec<_>>());
            for seq in 0..BURST {
                assert_eq!(b.recv_data(), (DataFrom::Channel(0x4002), payload(b'a', seq)), "a -> b datagram {seq}, gro {gro}");
            }
            b.send_channel_data_gso(0x4002, &(0..BURST).map(|seq| payload(b'b', seq)).collect::<Vec<_>>());
            for seq in 0..BURST {
                assert_eq!(a.recv_data(), (DataFrom::Channel(0x4001), payload(b'b', seq)), "b -> a datagram {seq}, gro {gro}");
            }
        }
        let m = relay.metrics();
        assert_eq!(metric(&m, "tessera_relay_packets_total{direction=\"to_peer\"}"), u64::from(2 * BURST * rounds), "{m}");
        assert_eq!(metric(&m, "tessera_relay_dropped_packets_total{reason=\"malformed\"}"), 0, "{m}");
        let coalesced = metric(&m, "tessera_relay_udp_gro_datagrams_total");
        if gro {
            // Each client burst reaches the listener as one message, and
            // the relay's GSO message for it reaches the far relay socket
            // as one: every datagram counts twice.
            assert_eq!(coalesced, u64::from(4 * BURST * rounds), "{m}");
        } else {
            assert_eq!(coalesced, 0, "GRO off: {m}");
        }
    }
}

#[test]
fn a_second_relay_on_a_taken_port_refuses_to_start() {
    if !in_netns("a_second_relay_on_a_taken_port_refuses_to_start") {
        return;
    }
    let relay = Relay::start(&base_config(""));
    let dir = TempDir(std::env::temp_dir().join(format!("tessera-relay-taken-{}-{}", std::process::id(), relay.udp.port())));
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    let path = dir.0.join("second.toml");
    let config = base_config("").replace("{UDP}", &relay.udp.port().to_string()).replace("{METRICS}", &free_port().to_string());
    std::fs::write(&path, config).expect("write config");
    let log = dir.0.join("second.log");
    let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_tessera-relay"))
        .arg("--config")
        .arg(&path)
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start tessera-relay");
    // Bounded: a relay that wrongly starts is killed and the test fails.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = second.try_wait().expect("wait") {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.is_some_and(|s| !s.success()), "{stderr}");
    assert!(stderr.contains("already in use"), "{stderr}");
    // The first relay still serves.
    let mut c = TurnClient::new(relay.udp, "alice", "wonderland");
    assert_eq!(c.allocate(), Ok(()));
}

/// Reads until `want` bytes arrived (or the stream ends or times out).
fn read_n(s: &mut std::net::TcpStream, want: usize) -> Vec<u8> {
    use std::io::Read as _;
    let mut got = vec![0u8; want];
    s.read_exact(&mut got).expect("relayed bytes within the timeout");
    got
}

/// True once the other side closed `s` (a read returns end of stream or a
/// reset) within the read timeout.
fn closed(s: &mut std::net::TcpStream) -> bool {
    use std::io::Read as _;
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return false,
            Err(_) => return true,
        }
    }
}

#[test]
fn tcp_relay_connects_accepts_relays_and_closes_with_the_allocation() {
    use std::io::Write as _;
    if !in_netns("tcp_relay_connects_accepts_relays_and_closes_with_the_allocation") {
        return;
    }
    // Peers on loopback, allowed explicitly (as uclient's runs do).
    let relay = Relay::start(&base_config("allowed_peer_ranges = [\"127.0.0.0/8\"]\n"));
    let peer_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("peer listener");
    let peer_addr = peer_listener.local_addr().expect("addr");
    let mut control = support::tcp::TcpTurn::connect(relay.udp, "alice", "wonderland");
    let relay_addr = control.allocate_tcp().expect("TCP allocation");

    // Outgoing: Connect, the peer sees the relay address, ConnectionBind on
    // a new connection, bytes both ways.
    let id = control.connect_peer(peer_addr).expect("connected");
    let (mut peer, from) = peer_listener.accept().expect("the relay connects");
    assert_eq!(from, relay_addr, "the connection comes from the relay address");
    peer.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
    assert_eq!(control.connect_peer(peer_addr), Err(446), "one connection per peer");
    let mut data = support::tcp::TcpTurn::beside(&control, relay.udp);
    assert_eq!(data.bind_connection(id), None);
    data.stream.write_all(b"ping").expect("write");
    assert_eq!(read_n(&mut peer, 4), b"ping");
    peer.write_all(b"pong!").expect("write");
    assert_eq!(read_n(&mut data.stream, 5), b"pong!");
    // The id is used up.
    assert_eq!(support::tcp::TcpTurn::beside(&control, relay.udp).bind_connection(id), Some(400));

    // Incoming: refused without a permission, announced with one.
    let mut stranger = std::net::TcpStream::connect(relay_addr).expect("connect to the relay address");
    stranger.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
    assert!(closed(&mut stranger), "no permission: the relay closes the connection");
    assert_eq!(control.create_permission(peer_addr), None);
    let mut incoming = std::net::TcpStream::connect(relay_addr).expect("connect to the relay address");
    incoming.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
    let attempt = control.indication();
    let m = tessera_relay::stun::Message::parse(&attempt).expect("parses");
    assert_eq!(m.method(), method::CONNECTION_ATTEMPT);
    assert_eq!(m.get_xor_addr(attr::XOR_PEER_ADDRESS), Some(Ok(incoming.local_addr().expect("addr"))));
    let second = m.get_u32(attr::CONNECTION_ID).expect("CONNECTION-ID");
    let mut data2 = support::tcp::TcpTurn::beside(&control, relay.udp);
    assert_eq!(data2.bind_connection(second), None);
    incoming.write_all(b"hello").expect("write");
    assert_eq!(read_n(&mut data2.stream, 5), b"hello");
    data2.stream.write_all(b"there").expect("write");
    assert_eq!(read_n(&mut incoming, 5), b"there");

    // The peer hanging up ends its data connection.
    drop(incoming);
    assert!(closed(&mut data2.stream), "peer gone: the data connection closes");
    // Removing the allocation closes the rest, both sides.
    assert_eq!(control.refresh(0), None);
    assert!(closed(&mut data.stream), "allocation gone: the client's data connection closes");
    assert!(closed(&mut peer), "allocation gone: the peer's connection closes");
    let m = relay.metrics();
    assert_eq!(metric(&m, "tessera_relay_tcp_connections_total"), 2, "{m}");
    assert_eq!(metric(&m, "tessera_relay_bytes_total{direction=\"to_peer\"}"), 9, "{m}");
    assert_eq!(metric(&m, "tessera_relay_bytes_total{direction=\"to_client\"}"), 10, "{m}");
}

#[test]
fn security_tcp_relay_refuses_special_peers() {
    if !in_netns("security_tcp_relay_refuses_special_peers") {
        return;
    }
    let relay = Relay::start(&base_config(""));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let mut control = support::tcp::TcpTurn::connect(relay.udp, "alice", "wonderland");
    control.allocate_tcp().expect("TCP allocation");
    for p in REFUSED_PEERS {
        let mut peer: SocketAddr = p.parse().expect("literal");
        if peer.ip().is_loopback() {
            peer.set_port(port);
        }
        assert_eq!(control.connect_peer(peer), Err(403), "Connect to {peer}");
    }
    // Nothing reached the loopback listener.
    assert!(matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock));
    // Over UDP a TCP allocation is refused outright.
    let mut udp = TurnClient::new(relay.udp, "bob", "builder");
    let r = udp.request(method::ALLOCATE, &|b| {
        b.attr(attr::REQUESTED_TRANSPORT, &[6, 0, 0, 0]);
    });
    let code = tessera_relay::stun::Message::parse(&r).ok().and_then(|m| m.get(attr::ERROR_CODE).and_then(tessera_relay::stun::decode_error_code).map(|(c, _)| c));
    assert_eq!(code, Some(400));
}
