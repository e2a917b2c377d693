//! Minimal client-side STUN/TURN codec (RFC 8489, RFC 8656): just what the
//! `turn` scenario sends and reads. Sans-IO: builds request bytes and parses
//! response bytes; never touches sockets or clocks. Kept inside the load
//! generator on purpose, so it measures any TURN server without depending on
//! the relay's own code.
//!
//! Responses are not trusted: every length is checked, and a malformed
//! message is an error, never a panic. Response integrity is not verified
//! (the generator measures a server, it does not need to trust it).

use hmac::{Hmac, KeyInit as _, Mac as _};
use md5::{Digest as _, Md5};
use sha1::Sha1;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The magic cookie of every STUN message.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;

/// Message types (method | class bits) the client sends or expects.
pub mod kind {
    /// Allocate request.
    pub const ALLOCATE: u16 = 0x0003;
    /// Refresh request.
    pub const REFRESH: u16 = 0x0004;
    /// CreatePermission request.
    pub const CREATE_PERMISSION: u16 = 0x0008;
    /// ChannelBind request.
    pub const CHANNEL_BIND: u16 = 0x0009;
    /// Success response bit pattern (class 0b10).
    pub const SUCCESS_BIT: u16 = 0x0100;
    /// Error response bit pattern (class 0b11).
    pub const ERROR_BITS: u16 = 0x0110;
}

mod attr {
    pub const USERNAME: u16 = 0x0006;
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    pub const ERROR_CODE: u16 = 0x0009;
    pub const CHANNEL_NUMBER: u16 = 0x000C;
    pub const LIFETIME: u16 = 0x000D;
    pub const XOR_PEER_ADDRESS: u16 = 0x0012;
    pub const REALM: u16 = 0x0014;
    pub const NONCE: u16 = 0x0015;
    pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
    pub const REQUESTED_TRANSPORT: u16 = 0x0019;
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
}

/// Long-term credentials: the key is MD5(username:realm:password).
#[derive(Debug, Clone)]
pub struct Credentials {
    /// Username.
    pub username: String,
    /// Realm from the server's 401.
    pub realm: String,
    /// Nonce from the server's 401.
    pub nonce: String,
    key: [u8; 16],
}

impl Credentials {
    /// Credentials for `realm`/`nonce` as the server announced them.
    pub fn new(username: &str, password: &str, realm: &str, nonce: &str) -> Self {
        let mut h = Md5::new();
        h.update(format!("{username}:{realm}:{password}").as_bytes());
        Self {
            username: username.into(),
            realm: realm.into(),
            nonce: nonce.into(),
            key: h.finalize().into(),
        }
    }
}

/// TURN REST credentials (the shared-secret scheme homeservers use for
/// `/voip/turnServer`): username `expiry:user`, password
/// base64(HMAC-SHA1(secret, username)).
pub fn rest_credentials(secret: &str, user: &str, expiry_unix_s: u64) -> (String, String) {
    use base64::Engine as _;
    let username = format!("{expiry_unix_s}:{user}");
    // HMAC accepts keys of any length.
    let mut mac = match Hmac::<Sha1>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    };
    mac.update(username.as_bytes());
    let password = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    (username, password)
}

/// A request under construction.
#[derive(Debug)]
pub struct Request {
    buf: Vec<u8>,
}

impl Request {
    /// A request of `kind` with transaction id `txid`.
    pub fn new(kind: u16, txid: [u8; 12]) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&kind.to_be_bytes());
        buf.extend_from_slice(&0u16.to_be_bytes());
        buf.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf.extend_from_slice(&txid);
        Self { buf }
    }

    fn txid(&self) -> [u8; 12] {
        let mut t = [0u8; 12];
        t.copy_from_slice(&self.buf[8..20]);
        t
    }

    fn set_len(&mut self, len: usize) {
        // Messages built here are far below 64 KiB.
        let len = u16::try_from(len).unwrap_or(u16::MAX);
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
    }

    /// Appends an attribute, padded to four bytes.
    pub fn attr(mut self, kind: u16, value: &[u8]) -> Self {
        self.buf.extend_from_slice(&kind.to_be_bytes());
        self.buf
            .extend_from_slice(&(value.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(value);
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
        let len = self.buf.len() - 20;
        self.set_len(len);
        self
    }

    /// REQUESTED-TRANSPORT: UDP.
    pub fn udp_transport(self) -> Self {
        self.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
    }

    /// LIFETIME in seconds.
    pub fn lifetime(self, secs: u32) -> Self {
        self.attr(attr::LIFETIME, &secs.to_be_bytes())
    }

    /// CHANNEL-NUMBER.
    pub fn channel(self, channel: u16) -> Self {
        let mut v = [0u8; 4];
        v[..2].copy_from_slice(&channel.to_be_bytes());
        self.attr(attr::CHANNEL_NUMBER, &v)
    }

    /// XOR-PEER-ADDRESS.
    pub fn peer(self, addr: SocketAddr) -> Self {
        let v = xor_address(addr, &self.txid());
        self.attr(attr::XOR_PEER_ADDRESS, &v)
    }

    /// USERNAME, REALM, NONCE and MESSAGE-INTEGRITY; must be last.
    pub fn sign(self, c: &Credentials) -> Vec<u8> {
        let mut r = self
            .attr(attr::USERNAME, c.username.as_bytes())
            .attr(attr::REALM, c.realm.as_bytes())
            .attr(attr::NONCE, c.nonce.as_bytes());
        // The length field covers the integrity attribute while it is
        // computed (RFC 8489 §14.5).
        let len = r.buf.len() - 20 + 24;
        r.set_len(len);
        let mut mac = match Hmac::<Sha1>::new_from_slice(&c.key) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC accepts keys of any length"),
        };
        mac.update(&r.buf);
        let digest = mac.finalize().into_bytes();
        r.attr(attr::MESSAGE_INTEGRITY, &digest).buf
    }

    /// The bytes, unsigned.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

fn xor_address(addr: SocketAddr, txid: &[u8; 12]) -> Vec<u8> {
    let port = addr.port() ^ (MAGIC_COOKIE >> 16) as u16;
    let mut v = vec![0u8];
    match addr.ip() {
        IpAddr::V4(ip) => {
            v.push(1);
            v.extend_from_slice(&port.to_be_bytes());
            v.extend_from_slice(&(u32::from(ip) ^ MAGIC_COOKIE).to_be_bytes());
        }
        IpAddr::V6(ip) => {
            v.push(2);
            v.extend_from_slice(&port.to_be_bytes());
            let mut mask = [0u8; 16];
            mask[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
            mask[4..].copy_from_slice(txid);
            for (o, m) in ip.octets().iter().zip(mask) {
                v.push(o ^ m);
            }
        }
    }
    v
}

fn parse_xor_address(v: &[u8], txid: &[u8; 12]) -> Option<SocketAddr> {
    let family = *v.get(1)?;
    let port = u16::from_be_bytes([*v.get(2)?, *v.get(3)?]) ^ (MAGIC_COOKIE >> 16) as u16;
    match family {
        1 if v.len() >= 8 => {
            let raw = u32::from_be_bytes([v[4], v[5], v[6], v[7]]) ^ MAGIC_COOKIE;
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(raw)), port))
        }
        2 if v.len() >= 20 => {
            let mut mask = [0u8; 16];
            mask[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
            mask[4..].copy_from_slice(txid);
            let mut o = [0u8; 16];
            for i in 0..16 {
                o[i] = v[4 + i] ^ mask[i];
            }
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), port))
        }
        _ => None,
    }
}

/// A parsed response.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Response {
    /// Message type.
    pub kind: u16,
    /// Transaction id.
    pub txid: [u8; 12],
    /// ERROR-CODE (class * 100 + number), on error responses.
    pub error_code: Option<u16>,
    /// REALM.
    pub realm: Option<String>,
    /// NONCE.
    pub nonce: Option<String>,
    /// XOR-RELAYED-ADDRESS.
    pub relayed: Option<SocketAddr>,
    /// XOR-MAPPED-ADDRESS.
    pub mapped: Option<SocketAddr>,
    /// LIFETIME.
    pub lifetime_s: Option<u32>,
}

impl Response {
    /// Whether this is a success response.
    pub fn is_success(&self) -> bool {
        self.kind & 0x0110 == kind::SUCCESS_BIT
    }
}

/// Why bytes are not a STUN response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Shorter than its header or its declared length.
    #[error("truncated STUN message")]
    Truncated,
    /// Not a STUN message (first bits or magic cookie).
    #[error("not a STUN message")]
    NotStun,
}

/// Parses a STUN message.
pub fn parse(b: &[u8]) -> Result<Response, ParseError> {
    if b.len() < 20 {
        return Err(ParseError::Truncated);
    }
    if b[0] & 0xC0 != 0 || u32::from_be_bytes([b[4], b[5], b[6], b[7]]) != MAGIC_COOKIE {
        return Err(ParseError::NotStun);
    }
    let len = usize::from(u16::from_be_bytes([b[2], b[3]]));
    if b.len() < 20 + len {
        return Err(ParseError::Truncated);
    }
    let mut r = Response {
        kind: u16::from_be_bytes([b[0], b[1]]),
        ..Response::default()
    };
    r.txid.copy_from_slice(&b[8..20]);
    let mut rest = &b[20..20 + len];
    while rest.len() >= 4 {
        let kind = u16::from_be_bytes([rest[0], rest[1]]);
        let alen = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        let padded = alen.div_ceil(4) * 4;
        let v = rest.get(4..4 + alen).ok_or(ParseError::Truncated)?;
        let text = || String::from_utf8_lossy(v).into_owned();
        match kind {
            attr::ERROR_CODE if v.len() >= 4 => {
                r.error_code = Some(u16::from(v[2] & 7) * 100 + u16::from(v[3]));
            }
            attr::REALM => r.realm = Some(text()),
            attr::NONCE => r.nonce = Some(text()),
            attr::XOR_RELAYED_ADDRESS => r.relayed = parse_xor_address(v, &r.txid),
            attr::XOR_MAPPED_ADDRESS => r.mapped = parse_xor_address(v, &r.txid),
            attr::LIFETIME if v.len() == 4 => {
                r.lifetime_s = Some(u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
            }
            _ => {}
        }
        rest = rest.get(4 + padded..).unwrap_or(&[]);
    }
    Ok(r)
}

/// A ChannelData message: 4-byte header then the payload.
pub fn channel_data(channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + payload.len());
    v.extend_from_slice(&channel.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// Splits ChannelData into channel and payload; `None` if it is not one.
pub fn parse_channel_data(b: &[u8]) -> Option<(u16, &[u8])> {
    if b.len() < 4 || !(0x40..0x50).contains(&b[0]) {
        return None;
    }
    let channel = u16::from_be_bytes([b[0], b[1]]);
    let len = usize::from(u16::from_be_bytes([b[2], b[3]]));
    b.get(4..4 + len).map(|p| (channel, p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_term_key_and_integrity() {
        // The key is MD5(user:realm:pass) (no SASLprep: ASCII credentials
        // only), and the HMAC covers the header with the length adjusted to
        // include the integrity attribute.
        let c = Credentials::new("user", "pass", "realm", "nonce");
        let mut h = Md5::new();
        h.update(b"user:realm:pass");
        let want: [u8; 16] = h.finalize().into();
        assert_eq!(c.key, want);
        let msg = Request::new(kind::ALLOCATE, [7; 12])
            .udp_transport()
            .sign(&c);
        assert_eq!(msg.len() % 4, 0);
        let declared = usize::from(u16::from_be_bytes([msg[2], msg[3]]));
        assert_eq!(declared, msg.len() - 20);
        // Recompute the HMAC over everything before the integrity attribute.
        let mi_at = msg.len() - 24;
        assert_eq!(&msg[mi_at..mi_at + 4], &[0x00, 0x08, 0x00, 0x14]);
        let mut mac = Hmac::<Sha1>::new_from_slice(&c.key).expect("hmac");
        mac.update(&msg[..mi_at]);
        assert_eq!(&msg[mi_at + 4..], mac.finalize().into_bytes().as_slice());
    }

    #[test]
    fn rest_credentials_match_the_scheme() {
        let (user, pass) = rest_credentials("secret", "@a:x", 1_700_000_000);
        assert_eq!(user, "1700000000:@a:x");
        use base64::Engine as _;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(pass)
            .expect("base64");
        assert_eq!(raw.len(), 20);
    }

    #[test]
    fn xor_addresses_round_trip() {
        let txid = [9u8; 12];
        for a in ["127.0.0.1:3478", "[::1]:49152", "[2001:db8::7]:1"] {
            let addr: SocketAddr = a.parse().expect("addr");
            let v = xor_address(addr, &txid);
            assert_eq!(parse_xor_address(&v, &txid), Some(addr));
        }
    }

    #[test]
    fn parses_error_and_success_responses() {
        // A 401 with realm and nonce, built with the request encoder.
        let mut resp = Request::new(kind::ALLOCATE | kind::ERROR_BITS, [1; 12])
            .attr(attr::ERROR_CODE, &[0, 0, 4, 1, b'U', b'n'])
            .attr(attr::REALM, b"example.org")
            .attr(attr::NONCE, b"abc")
            .finish();
        let r = parse(&resp).expect("parses");
        assert!(!r.is_success());
        assert_eq!(r.error_code, Some(401));
        assert_eq!(r.realm.as_deref(), Some("example.org"));
        assert_eq!(r.nonce.as_deref(), Some("abc"));
        // Truncations are errors, not panics.
        for cut in [0, 19, 20, resp.len() - 1] {
            assert!(parse(&resp[..cut]).is_err(), "cut {cut}");
        }
        resp[4] ^= 0xFF;
        assert_eq!(parse(&resp), Err(ParseError::NotStun));

        let relayed: SocketAddr = "127.0.0.1:50000".parse().expect("addr");
        let txid = [2; 12];
        let ok = Request::new(kind::ALLOCATE | kind::SUCCESS_BIT, txid)
            .attr(attr::XOR_RELAYED_ADDRESS, &xor_address(relayed, &txid))
            .lifetime(600)
            .finish();
        let r = parse(&ok).expect("parses");
        assert!(r.is_success());
        assert_eq!(r.relayed, Some(relayed));
        assert_eq!(r.lifetime_s, Some(600));
    }

    #[test]
    fn random_and_mutated_input_never_panics() {
        // A deterministic fuzz pass: random bytes, and valid messages with
        // random bytes flipped, truncated or extended.
        let mut rng = crate::rng::Rng::new(42);
        let txid = [5u8; 12];
        let valid = Request::new(kind::ALLOCATE | kind::SUCCESS_BIT, txid)
            .attr(
                attr::XOR_RELAYED_ADDRESS,
                &xor_address("[::1]:9".parse().expect("addr"), &txid),
            )
            .attr(attr::ERROR_CODE, &[0, 0, 4, 38])
            .attr(attr::NONCE, b"n")
            .lifetime(1)
            .finish();
        for _ in 0..20_000 {
            let mut m = if rng.below(2) == 0 {
                (0..rng.below(80))
                    .map(|_| rng.next_u64() as u8)
                    .collect::<Vec<u8>>()
            } else {
                valid.clone()
            };
            for _ in 0..rng.below(4) {
                if !m.is_empty() {
                    let i = rng.below(m.len() as u64) as usize;
                    m[i] = rng.next_u64() as u8;
                }
            }
            m.truncate(rng.below(m.len() as u64 + 8) as usize);
            let _ = parse(&m);
            let _ = parse_channel_data(&m);
        }
    }

    #[test]
    fn channel_data_round_trips() {
        let m = channel_data(0x4001, b"hello");
        assert_eq!(parse_channel_data(&m), Some((0x4001, &b"hello"[..])));
        assert_eq!(parse_channel_data(&m[..6]), None);
        assert_eq!(parse_channel_data(&[0x00, 0x01, 0, 0]), None);
    }
}
