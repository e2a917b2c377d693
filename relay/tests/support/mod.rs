//! Test support: network-namespace isolation, a relay process wrapper and a
//! minimal blocking TURN client built on the crate's own codec (UDP here,
//! TCP in `tcp.rs`).

pub mod dtls;
pub mod tcp;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tessera_relay::stun::{
    Class, Message, MessageBuilder, PasswordAlgorithm, attr, channel_data, decode_error_code, decode_xor_addr, method,
};

pub const SECRET: &str = "current-secret";
pub const OLD_SECRET: &str = "previous-secret";
pub const REALM: &str = "tessera.test";
/// Bound on every blocking receive: a lost reply fails the test instead of
/// hanging it.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);
const ENV_INSIDE: &str = "TESSERA_RELAY_TEST_NETNS";

fn only_loopback() -> bool {
    std::fs::read_dir("/sys/class/net")
        .map(|d| d.filter_map(|e| e.ok()).all(|e| e.file_name() == "lo"))
        .unwrap_or(false)
}

/// Returns true when the caller is inside an isolated namespace and should
/// run its body. Otherwise creates a namespace with only `lo` up, re-runs
/// the named test inside it, asserts it passed and returns false.
pub fn in_netns(test: &str) -> bool {
    if std::env::var_os(ENV_INSIDE).is_some() {
        assert!(only_loopback(), "test namespace has interfaces other than lo");
        return true;
    }
    // The test's name keeps namespaces of tests running side by side apart.
    let ns = format!("tessera-relay-{}-{test}", std::process::id());
    let ip = |args: &[&str]| Command::new("ip").args(args).status().map(|s| s.success()).unwrap_or(false);
    assert!(ip(&["netns", "add", &ns]), "`ip netns add` failed: these tests need root and iproute2");
    let up = ip(&["-n", &ns, "link", "set", "lo", "up"]);
    let exe = std::env::current_exe().expect("test binary path");
    let status = up.then(|| {
        Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(exe)
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(ENV_INSIDE, "1")
            .status()
    });
    let _ = ip(&["netns", "del", &ns]);
    assert!(up, "could not bring lo up in {ns}");
    let status = status.and_then(|s| s.ok()).expect("run test in namespace");
    assert!(status.success(), "{test} failed inside its network namespace");
    false
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub fn free_port() -> u16 {
    // Ask the kernel for a port free for both UDP and TCP, never handing
    // out the same one twice: tests run side by side, and the kernel may
    // offer a port again before the relay it was meant for has bound it.
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> = std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let u = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let port = u.local_addr().expect("addr").port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() && HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner()).insert(port) {
            return port;
        }
    }
}

/// A config with static users alice/wonderland and bob/builder, the REST
/// secrets, loopback listeners and relay addresses; `extra` is appended.
pub fn base_config(extra: &str) -> String {
    format!(
        "realm = \"{REALM}\"\nlisten = [\"127.0.0.1:{{UDP}}\"]\nrelay_ipv4 = \"127.0.0.1\"\nrelay_ipv6 = \"::1\"\n\
         min_port = 64000\nmax_port = 64999\nthreads = 2\nio_memory_kib = 1024\n\
         rest_secrets = [\"{SECRET}\", \"{OLD_SECRET}\"]\nstatic_users = {{ alice = \"wonderland\", bob = \"builder\" }}\n\
         metrics_listen = \"127.0.0.1:{{METRICS}}\"\ndrain_secs = 1\n{extra}"
    )
}

pub struct Relay {
    child: Child,
    pub udp: SocketAddr,
    metrics: SocketAddr,
    _dir: TempDir,
}

pub struct TempDir(pub std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Relay {
    pub fn start(config: &str) -> Relay {
        let udp_port = free_port();
        let metrics_port = free_port();
        let config = config.replace("{UDP}", &udp_port.to_string()).replace("{METRICS}", &metrics_port.to_string());
        let dir = std::env::temp_dir().join(format!("tessera-relay-it-{}-{udp_port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("relay.toml");
        std::fs::write(&path, config).expect("write config");
        let mut child = Command::new(env!("CARGO_BIN_EXE_tessera-relay"))
            .arg("--config")
            .arg(&path)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tessera-relay");
        let stderr = child.stderr.take().expect("piped stderr");
        let mut lines = BufReader::new(stderr).lines();
        let mut log = String::new();
        // Readiness is the relay's own "ready" line (printed after every
        // shard bound its sockets); EOF means it failed to start.
        loop {
            match lines.next() {
                Some(Ok(line)) => {
                    log.push_str(&line);
                    log.push('\n');
                    if line.contains("tessera-relay ready") {
                        break;
                    }
                }
                _ => panic!("relay did not start:\n{log}"),
            }
        }
        // Keep draining stderr so the relay never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Relay {
            child,
            udp: SocketAddr::from(([127, 0, 0, 1], udp_port)),
            metrics: SocketAddr::from(([127, 0, 0, 1], metrics_port)),
            _dir: TempDir(dir),
        }
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn metrics(&self) -> String {
        let mut s = std::net::TcpStream::connect(self.metrics).expect("metrics endpoint");
        s.set_read_timeout(Some(RECV_TIMEOUT)).expect("timeout");
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").expect("request");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // SIGTERM exercises the drain path; the test waits for the exit.
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

/// Reads a metric value from Prometheus text by its full series name.
pub fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("metric {series} missing in:\n{text}"))
}

#[derive(Debug, PartialEq, Eq)]
pub enum DataFrom {
    Channel(u16),
    Peer(SocketAddr),
}

impl From<u16> for DataFrom {
    fn from(c: u16) -> Self {
        DataFrom::Channel(c)
    }
}

pub struct TurnClient {
    sock: UdpSocket,
    server: SocketAddr,
    user: String,
    pass: String,
    nonce: Option<String>,
    tid: u32,
    pub last_request: Vec<u8>,
    /// The DTLS session its messages go through, for a DTLS client.
    dtls: Option<dtls::DtlsLink>,
}

/// An Allocate's relayed addresses and its ADDRESS-ERROR-CODE (family,
/// code), if any.
pub type Allocated = (Vec<SocketAddr>, Option<(u8, u16)>);

impl TurnClient {
    pub fn new(server: SocketAddr, user: &str, pass: &str) -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind client");
        sock.set_read_timeout(Some(RECV_TIMEOUT)).expect("timeout");
        TurnClient { sock, server, user: user.into(), pass: pass.into(), nonce: None, tid: 0, last_request: Vec::new(), dtls: None }
    }

    /// A client over DTLS to `server` (a `dtls_listen` address), with the
    /// handshake done. The client presents `cert`/`key` if asked.
    pub fn new_dtls(server: SocketAddr, user: &str, pass: &str, cert: &std::path::Path, key: &std::path::Path) -> Self {
        let mut c = TurnClient::new(server, user, pass);
        c.dtls = Some(dtls::DtlsLink::connect(&c.sock, server, cert, key));
        c
    }

    /// Ends the DTLS session with close_notify.
    pub fn close_dtls(&mut self) {
        self.dtls.as_mut().expect("a DTLS client").close(&self.sock, self.server);
    }

    /// A new DTLS session from the same address (5-tuple) as the last.
    pub fn reconnect_dtls(&mut self, cert: &std::path::Path, key: &std::path::Path) {
        self.nonce = None;
        self.dtls = Some(dtls::DtlsLink::connect(&self.sock, self.server, cert, key));
    }

    /// Sends one message: a datagram, or a DTLS record of it.
    fn send_bytes(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        match &mut self.dtls {
            Some(d) => d.send(&self.sock, self.server, bytes).map(|()| bytes.len()),
            None => self.sock.send_to(bytes, self.server),
        }
    }

    /// Receives one message (for DTLS, one record's plaintext).
    fn recv_bytes(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match &mut self.dtls {
            Some(d) => d.recv(&self.sock, self.server, buf),
            None => self.sock.recv_from(buf).map(|(n, _)| n),
        }
    }

    fn key(&self) -> Vec<u8> {
        PasswordAlgorithm::Md5.key(&self.user, REALM, &self.pass)
    }

    fn build(&mut self, m: u16, add: &dyn Fn(&mut MessageBuilder)) -> (Vec<u8>, [u8; 12]) {
        self.tid += 1;
        let mut tid = [0u8; 12];
        tid[8..].copy_from_slice(&self.tid.to_be_bytes());
        tid[..4].copy_from_slice(&(self.sock.local_addr().expect("addr").port() as u32).to_be_bytes());
        let mut b = MessageBuilder::new(m, Class::Request, tid);
        add(&mut b);
        if let Some(n) = &self.nonce {
            b.attr(attr::USERNAME, self.user.as_bytes()).attr(attr::REALM, REALM.as_bytes()).attr(attr::NONCE, n.as_bytes());
            let key = self.key();
            b.integrity(&key);
        }
        b.fingerprint();
        (b.finish(), tid)
    }

    /// Receives until a response with `tid` arrives (indications are skipped).
    fn recv_response(&mut self, tid: [u8; 12]) -> Vec<u8> {
        let mut buf = vec![0u8; 65536];
        loop {
            let n = self.recv_bytes(&mut buf).expect("response within timeout");
            if let Ok(m) = Message::parse(&buf[..n])
                && m.transaction_id() == tid
            {
                return buf[..n].to_vec();
            }
        }
    }

    /// Sends a request (retrying once after a 401/438 challenge); returns
    /// the response bytes.
    pub fn request(&mut self, m: u16, add: &dyn Fn(&mut MessageBuilder)) -> Vec<u8> {
        for _ in 0..2 {
            let (req, tid) = self.build(m, add);
            self.last_request = req.clone();
            self.send_bytes(&req).expect("send");
            let resp = self.recv_response(tid);
            let key = self.key();
            if !settle(&resp, &mut self.nonce, &key) {
                return resp;
            }
        }
        panic!("no final response");
    }

    fn code(resp: &[u8]) -> Option<u16> {
        Message::parse(resp).ok()?.get(attr::ERROR_CODE).and_then(decode_error_code).map(|(c, _)| c)
    }

    pub fn allocate_relay(&mut self) -> Result<SocketAddr, u16> {
        let r = self.request(method::ALLOCATE, &|b| {
            b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        });
        if let Some(c) = Self::code(&r) {
            return Err(c);
        }
        let m = Message::parse(&r).map_err(|_| 0u16)?;
        m.get_xor_addr(attr::XOR_RELAYED_ADDRESS).and_then(|a| a.ok()).ok_or(0)
    }

    /// An Allocate with extra attributes (family choices); the relayed
    /// addresses in the order given and the ADDRESS-ERROR-CODE, if any.
    pub fn allocate_with(&mut self, add: &dyn Fn(&mut MessageBuilder)) -> Result<Allocated, u16> {
        let r = self.request(method::ALLOCATE, &|b| {
            b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
            add(b);
        });
        if let Some(c) = Self::code(&r) {
            return Err(c);
        }
        let m = Message::parse(&r).map_err(|_| 0u16)?;
        let tid = m.transaction_id();
        let addrs = m.get_all(attr::XOR_RELAYED_ADDRESS).map(|v| decode_xor_addr(v, &tid).map_err(|_| 0u16)).collect::<Result<_, _>>()?;
        let missing = m.get(attr::ADDRESS_ERROR_CODE).and_then(|v| Some((*v.first()?, decode_error_code(v)?.0)));
        Ok((addrs, missing))
    }

    /// A Refresh for one family (`0x01` IPv4, `0x02` IPv6): the granted
    /// lifetime or the error code.
    pub fn refresh_family(&mut self, family: u8, lifetime: u32) -> Result<u32, u16> {
        let r = self.request(method::REFRESH, &|b| {
            b.attr_u32(attr::LIFETIME, lifetime).attr(attr::REQUESTED_ADDRESS_FAMILY, &[family, 0, 0, 0]);
        });
        match Self::code(&r) {
            Some(c) => Err(c),
            None => Message::parse(&r).ok().and_then(|m| m.get_u32(attr::LIFETIME)).ok_or(0),
        }
    }

    pub fn allocate(&mut self) -> Result<(), u16> {
        self.allocate_relay().map(|_| ())
    }

    pub fn refresh(&mut self, lifetime: u32) -> Result<u32, u16> {
        let r = self.request(method::REFRESH, &|b| {
            b.attr_u32(attr::LIFETIME, lifetime);
        });
        match Self::code(&r) {
            Some(c) => Err(c),
            None => Message::parse(&r).ok().and_then(|m| m.get_u32(attr::LIFETIME)).ok_or(0),
        }
    }

    pub fn create_permission(&mut self, peer: SocketAddr) -> Option<u16> {
        let r = self.request(method::CREATE_PERMISSION, &|b| {
            b.xor_addr(attr::XOR_PEER_ADDRESS, peer);
        });
        Self::code(&r)
    }

    pub fn channel_bind(&mut self, channel: u16, peer: SocketAddr) -> Option<u16> {
        let r = self.request(method::CHANNEL_BIND, &|b| {
            b.attr(attr::CHANNEL_NUMBER, &[(channel >> 8) as u8, channel as u8, 0, 0]).xor_addr(attr::XOR_PEER_ADDRESS, peer);
        });
        Self::code(&r)
    }

    pub fn binding(&mut self) -> Result<SocketAddr, ()> {
        self.tid += 1;
        let tid = [0xB1; 12];
        let mut b = MessageBuilder::new(method::BINDING, Class::Request, tid);
        b.fingerprint();
        self.send_bytes(&b.finish()).map_err(|_| ())?;
        let mut buf = vec![0u8; 2048];
        loop {
            let n = self.recv_bytes(&mut buf).map_err(|_| ())?;
            if let Ok(m) = Message::parse(&buf[..n])
                && m.transaction_id() == tid
            {
                return m.get_xor_addr(attr::XOR_MAPPED_ADDRESS).and_then(|a| a.ok()).ok_or(());
            }
        }
    }

    pub fn send_indication(&mut self, peer: SocketAddr, data: &[u8]) {
        let mut b = MessageBuilder::new(method::SEND, Class::Indication, [0x5E; 12]);
        b.xor_addr(attr::XOR_PEER_ADDRESS, peer).attr(attr::DATA, data);
        self.send_bytes(&b.finish()).expect("send");
    }

    pub fn send_channel_data(&mut self, channel: u16, data: &[u8]) {
        let mut f = channel_data::header(channel, data.len() as u16).to_vec();
        f.extend_from_slice(data);
        self.send_bytes(&f).expect("send");
    }

    /// Sends one ChannelData frame per payload (all of one length) as one
    /// UDP GSO message: the frames leave as separate datagrams, and a
    /// receiver with `UDP_GRO` on loopback gets them as one message.
    pub fn send_channel_data_gso(&mut self, channel: u16, payloads: &[Vec<u8>]) {
        let frames: Vec<Vec<u8>> = payloads
            .iter()
            .map(|p| {
                let mut f = channel_data::header(channel, p.len() as u16).to_vec();
                f.extend_from_slice(p);
                f
            })
            .collect();
        assert!(frames.windows(2).all(|w| w[0].len() == w[1].len()), "GSO frames of one size");
        send_gso(&self.sock, self.server, &frames.concat(), frames[0].len());
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.send_bytes(bytes);
    }

    /// Waits for relayed data (ChannelData or a Data indication).
    pub fn recv_data(&mut self) -> (DataFrom, Vec<u8>) {
        let mut buf = vec![0u8; 65536];
        loop {
            let n = self.recv_bytes(&mut buf).expect("relayed data within timeout");
            let pkt = &buf[..n];
            if let Some((ch, payload)) = channel_data::parse(pkt) {
                return (DataFrom::Channel(ch), payload.to_vec());
            }
            if let Ok(m) = Message::parse(pkt)
                && m.method() == method::DATA
                && m.class() == Class::Indication
            {
                let peer = m.get_xor_addr(attr::XOR_PEER_ADDRESS).and_then(|a| a.ok()).expect("peer address");
                return (DataFrom::Peer(peer), m.get(attr::DATA).unwrap_or_default().to_vec());
            }
        }
    }
}

/// Looks at a response to a request sent with `nonce`: true if it is a
/// 401 or 438 challenge to answer by sending the request again (the nonce
/// is learned); otherwise checks a success's integrity and returns false.
pub fn settle(resp: &[u8], nonce: &mut Option<String>, key: &[u8]) -> bool {
    let msg = Message::parse(resp).expect("response parses");
    let code = msg.get(attr::ERROR_CODE).and_then(decode_error_code).map(|(c, _)| c);
    if matches!(code, Some(401 | 438))
        && let Some(n) = msg.get_str(attr::NONCE)
    {
        let retry = nonce.is_none() || code == Some(438);
        *nonce = Some(n.to_owned());
        return retry;
    }
    if code.is_none() {
        assert!(msg.verify_integrity(key), "success response integrity");
    }
    false
}

/// Malformed and hostile packets: truncations and bit flips of a valid
/// authenticated request, lying length fields, attribute overruns, huge
/// attribute counts, bad ChannelData, and seeded pseudo-random bytes.
pub fn malformed_corpus(valid: &[u8]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    for cut in 0..valid.len() {
        out.push(valid[..cut].to_vec());
    }
    for i in 0..valid.len() {
        for bit in [0x01u8, 0x80] {
            let mut v = valid.to_vec();
            v[i] ^= bit;
            out.push(v);
        }
    }
    // Length field larger than the datagram, and not a multiple of 4.
    for len in [0xFFFFu16, 0x0004, 0x0003, 0x1000] {
        let mut v = valid.to_vec();
        v[2..4].copy_from_slice(&len.to_be_bytes());
        out.push(v);
    }
    // An attribute claiming 65535 bytes.
    let mut v = valid[..20].to_vec();
    v[2..4].copy_from_slice(&8u16.to_be_bytes());
    v.extend_from_slice(&[0x00, 0x06, 0xFF, 0xFF, 0, 0, 0, 0]);
    out.push(v);
    // Thousands of empty attributes.
    let mut v = valid[..20].to_vec();
    let n = 4000u16;
    v[2..4].copy_from_slice(&(n * 4).to_be_bytes());
    for _ in 0..n {
        v.extend_from_slice(&[0x80, 0x22, 0x00, 0x00]);
    }
    out.push(v);
    // ChannelData lying about its length, on bound and unbound channels.
    out.push(vec![0x40, 0x00, 0xFF, 0xFF, 1, 2, 3, 4]);
    out.push(vec![0x4F, 0xFF, 0x00, 0x10]);
    out.push(vec![0x7F, 0xFF, 0x00, 0x00]);
    // Send indication with a bad peer address family and no DATA.
    let mut b = MessageBuilder::new(method::SEND, Class::Indication, [1; 12]);
    b.attr(attr::XOR_PEER_ADDRESS, &[0, 9, 0, 0, 1, 2, 3, 4]);
    out.push(b.finish());
    // Seeded xorshift noise, some with a STUN header in front.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..2000 {
        let len = (i * 7) % 600;
        let mut v = Vec::with_capacity(len + 20);
        if i % 2 == 0 {
            v.extend_from_slice(&valid[..20.min(valid.len())]);
            let body = (len & !3) as u16;
            v[2..4].copy_from_slice(&body.to_be_bytes());
        }
        for _ in 0..len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.push(x as u8);
        }
        out.push(v);
    }
    out
}

/// Sends `bytes` to `to` as one UDP GSO message of `segment`-byte datagrams
/// (`sendmsg` with a `UDP_SEGMENT` control message).
pub fn send_gso(sock: &UdpSocket, to: SocketAddr, bytes: &[u8], segment: usize) {
    use std::os::fd::AsRawFd as _;
    let SocketAddr::V4(v4) = to else { panic!("send_gso: IPv4 destinations only") };
    let mut name = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(v4.ip().octets()) },
        sin_zero: [0; 8],
    };
    let mut iov = libc::iovec { iov_base: bytes.as_ptr().cast_mut().cast(), iov_len: bytes.len() };
    let mut control = [0u64; 4];
    // SAFETY: the header points at live locals for the call; the control
    // buffer (32 bytes, 8-aligned) holds one cmsghdr with a u16, which
    // CMSG_FIRSTHDR/CMSG_DATA address inside it.
    let rc = unsafe {
        let mut h: libc::msghdr = std::mem::zeroed();
        h.msg_name = (&raw mut name).cast();
        h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        h.msg_iov = &raw mut iov;
        h.msg_iovlen = 1;
        h.msg_control = control.as_mut_ptr().cast();
        h.msg_controllen = libc::CMSG_SPACE(2) as _;
        let c = libc::CMSG_FIRSTHDR(&h);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = libc::UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(2) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), u16::try_from(segment).expect("segment size"));
        libc::sendmsg(sock.as_raw_fd(), &h, 0)
    };
    assert_eq!(usize::try_from(rc).ok(), Some(bytes.len()), "GSO send: {}", std::io::Error::last_os_error());
}
