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
use tessera_relay::stun::{attr, method};

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
fn relays_bursts_of_many_batches_complete_and_in_order() {
    if !in_netns("relays_bursts_of_many_batches_complete_and_in_order") {
        return;
    }
    // A batch of 4 makes each burst span many recvmmsg/sendmmsg calls on the
    // listener and on both relay sockets.
    let relay = Relay::start(&base_config("allowed_peer_ranges = [\"127.0.0.0/8\"]\nudp_batch = 4\n"));
    let mut a = TurnClient::new(relay.udp, "alice", "wonderland");
    let mut b = TurnClient::new(relay.udp, "bob", "builder");
    let ra = a.allocate_relay().expect("a allocates");
    let rb = b.allocate_relay().expect("b allocates");
    assert_eq!(a.channel_bind(0x4001, rb), None);
    assert_eq!(b.channel_bind(0x4002, ra), None);
    const BURST: u32 = 64;
    let payload = |dir: u8, seq: u32| {
        let mut v = vec![dir];
        v.extend_from_slice(&seq.to_be_bytes());
        // Lengths differ, so a payload taken from the wrong slot or with the
        // wrong length shows.
        v.extend(std::iter::repeat_n(dir, (seq % 13) as usize));
        v
    };
    for seq in 0..BURST {
        a.send_channel_data(0x4001, &payload(b'a', seq));
    }
    for seq in 0..BURST {
        assert_eq!(b.recv_data(), (DataFrom::Channel(0x4002), payload(b'a', seq)), "a -> b datagram {seq}");
    }
    for seq in 0..BURST {
        b.send_channel_data(0x4002, &payload(b'b', seq));
    }
    for seq in 0..BURST {
        assert_eq!(a.recv_data(), (DataFrom::Channel(0x4001), payload(b'b', seq)), "b -> a datagram {seq}");
    }
    let m = relay.metrics();
    assert_eq!(metric(&m, "tessera_relay_packets_total{direction=\"to_peer\"}"), u64::from(2 * BURST), "{m}");
    assert_eq!(metric(&m, "tessera_relay_dropped_packets_total{reason=\"io\"}"), 0, "{m}");
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
