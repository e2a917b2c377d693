//! STUN message codec (RFC 8489), with the TURN attributes of RFC 8656,
//! RFC 6156 and RFC 6062.
//!
//! Parsing is zero-copy and allocation-free: [`Message::parse`] validates the
//! header and the attribute framing and records where each attribute sits in
//! the caller's buffer (at most [`MAX_ATTRIBUTES`]; more is a parse error, so
//! a hostile packet cannot make the parser do unbounded work). Attribute
//! values are decoded on demand. Encoding goes through [`MessageBuilder`],
//! which appends to a `Vec<u8>` and fixes the header length as it goes, so
//! MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256 and FINGERPRINT are computed
//! over exactly the bytes RFC 8489 §14.5-14.7 prescribe.
//!
//! Invariant: nothing here panics on any input; all lengths read from the
//! wire are bounds-checked against the buffer before use.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hmac::{Hmac, KeyInit as _, Mac as _};

/// The fixed magic cookie of RFC 5389/8489 messages.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Length of the STUN header.
pub const HEADER_LEN: usize = 20;
/// Most attributes a parsed message may carry.
pub const MAX_ATTRIBUTES: usize = 32;
/// XOR constant of the FINGERPRINT attribute ("STUN").
const FINGERPRINT_XOR: u32 = 0x5354_554E;

/// STUN/TURN method numbers.
pub mod method {
    /// Binding (RFC 8489).
    pub const BINDING: u16 = 0x001;
    /// Allocate (RFC 8656).
    pub const ALLOCATE: u16 = 0x003;
    /// Refresh (RFC 8656).
    pub const REFRESH: u16 = 0x004;
    /// Send indication (RFC 8656).
    pub const SEND: u16 = 0x006;
    /// Data indication (RFC 8656).
    pub const DATA: u16 = 0x007;
    /// CreatePermission (RFC 8656).
    pub const CREATE_PERMISSION: u16 = 0x008;
    /// ChannelBind (RFC 8656).
    pub const CHANNEL_BIND: u16 = 0x009;
    /// Connect (RFC 6062).
    pub const CONNECT: u16 = 0x00A;
    /// ConnectionBind (RFC 6062).
    pub const CONNECTION_BIND: u16 = 0x00B;
    /// ConnectionAttempt (RFC 6062).
    pub const CONNECTION_ATTEMPT: u16 = 0x00C;
}

/// STUN/TURN attribute types.
pub mod attr {
    /// MAPPED-ADDRESS.
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    /// USERNAME.
    pub const USERNAME: u16 = 0x0006;
    /// MESSAGE-INTEGRITY (HMAC-SHA1).
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    /// ERROR-CODE.
    pub const ERROR_CODE: u16 = 0x0009;
    /// UNKNOWN-ATTRIBUTES.
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    /// CHANNEL-NUMBER.
    pub const CHANNEL_NUMBER: u16 = 0x000C;
    /// LIFETIME.
    pub const LIFETIME: u16 = 0x000D;
    /// XOR-PEER-ADDRESS.
    pub const XOR_PEER_ADDRESS: u16 = 0x0012;
    /// DATA.
    pub const DATA: u16 = 0x0013;
    /// REALM.
    pub const REALM: u16 = 0x0014;
    /// NONCE.
    pub const NONCE: u16 = 0x0015;
    /// XOR-RELAYED-ADDRESS.
    pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
    /// REQUESTED-ADDRESS-FAMILY (RFC 6156 / 8656).
    pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
    /// EVEN-PORT.
    pub const EVEN_PORT: u16 = 0x0018;
    /// REQUESTED-TRANSPORT.
    pub const REQUESTED_TRANSPORT: u16 = 0x0019;
    /// DONT-FRAGMENT.
    pub const DONT_FRAGMENT: u16 = 0x001A;
    /// MESSAGE-INTEGRITY-SHA256.
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    /// PASSWORD-ALGORITHM.
    pub const PASSWORD_ALGORITHM: u16 = 0x001D;
    /// USERHASH.
    pub const USERHASH: u16 = 0x001E;
    /// XOR-MAPPED-ADDRESS.
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    /// RESERVATION-TOKEN.
    pub const RESERVATION_TOKEN: u16 = 0x0022;
    /// CONNECTION-ID (RFC 6062).
    pub const CONNECTION_ID: u16 = 0x002A;
    /// ADDITIONAL-ADDRESS-FAMILY.
    pub const ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8000;
    /// ADDRESS-ERROR-CODE.
    pub const ADDRESS_ERROR_CODE: u16 = 0x8001;
    /// PASSWORD-ALGORITHMS.
    pub const PASSWORD_ALGORITHMS: u16 = 0x8002;
    /// ALTERNATE-DOMAIN.
    pub const ALTERNATE_DOMAIN: u16 = 0x8003;
    /// ICMP.
    pub const ICMP: u16 = 0x8004;
    /// SOFTWARE.
    pub const SOFTWARE: u16 = 0x8022;
    /// ALTERNATE-SERVER.
    pub const ALTERNATE_SERVER: u16 = 0x8023;
    /// FINGERPRINT.
    pub const FINGERPRINT: u16 = 0x8028;
}

/// STUN/TURN error codes used by this relay.
pub mod code {
    /// 400 Bad Request.
    pub const BAD_REQUEST: u16 = 400;
    /// 401 Unauthenticated.
    pub const UNAUTHENTICATED: u16 = 401;
    /// 403 Forbidden.
    pub const FORBIDDEN: u16 = 403;
    /// 420 Unknown Attribute.
    pub const UNKNOWN_ATTRIBUTE: u16 = 420;
    /// 437 Allocation Mismatch.
    pub const ALLOCATION_MISMATCH: u16 = 437;
    /// 438 Stale Nonce.
    pub const STALE_NONCE: u16 = 438;
    /// 440 Address Family not Supported.
    pub const ADDRESS_FAMILY_NOT_SUPPORTED: u16 = 440;
    /// 441 Wrong Credentials.
    pub const WRONG_CREDENTIALS: u16 = 441;
    /// 442 Unsupported Transport Protocol.
    pub const UNSUPPORTED_TRANSPORT: u16 = 442;
    /// 443 Peer Address Family Mismatch.
    pub const PEER_ADDRESS_FAMILY_MISMATCH: u16 = 443;
    /// 446 Connection Already Exists (RFC 6062).
    pub const CONNECTION_ALREADY_EXISTS: u16 = 446;
    /// 447 Connection Timeout or Failure (RFC 6062).
    pub const CONNECTION_TIMEOUT_OR_FAILURE: u16 = 447;
    /// 486 Allocation Quota Reached.
    pub const ALLOCATION_QUOTA_REACHED: u16 = 486;
    /// 500 Server Error.
    pub const SERVER_ERROR: u16 = 500;
    /// 508 Insufficient Capacity.
    pub const INSUFFICIENT_CAPACITY: u16 = 508;

    /// The RFC's reason phrase for a code.
    pub fn reason(code: u16) -> &'static str {
        match code {
            BAD_REQUEST => "Bad Request",
            UNAUTHENTICATED => "Unauthenticated",
            FORBIDDEN => "Forbidden",
            UNKNOWN_ATTRIBUTE => "Unknown Attribute",
            ALLOCATION_MISMATCH => "Allocation Mismatch",
            STALE_NONCE => "Stale Nonce",
            ADDRESS_FAMILY_NOT_SUPPORTED => "Address Family not Supported",
            WRONG_CREDENTIALS => "Wrong Credentials",
            UNSUPPORTED_TRANSPORT => "Unsupported Transport Protocol",
            PEER_ADDRESS_FAMILY_MISMATCH => "Peer Address Family Mismatch",
            CONNECTION_ALREADY_EXISTS => "Connection Already Exists",
            CONNECTION_TIMEOUT_OR_FAILURE => "Connection Timeout or Failure",
            ALLOCATION_QUOTA_REACHED => "Allocation Quota Reached",
            SERVER_ERROR => "Server Error",
            INSUFFICIENT_CAPACITY => "Insufficient Capacity",
            _ => "Error",
        }
    }
}

/// Message class (RFC 8489 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Request.
    Request,
    /// Indication.
    Indication,
    /// Success response.
    Success,
    /// Error response.
    Error,
}

impl Class {
    fn bits(self) -> u16 {
        match self {
            Class::Request => 0b00,
            Class::Indication => 0b01,
            Class::Success => 0b10,
            Class::Error => 0b11,
        }
    }
}

/// Combines a method and class into the 14-bit message type.
pub fn message_type(method: u16, class: Class) -> u16 {
    let m = method & 0x0FFF;
    let c = class.bits();
    (m & 0x000F) | ((m & 0x0070) << 1) | ((m & 0x0F80) << 2) | ((c & 1) << 4) | ((c & 2) << 7)
}

/// Splits a message type into method and class.
pub fn split_type(t: u16) -> (u16, Class) {
    let method = (t & 0x000F) | ((t >> 1) & 0x0070) | ((t >> 2) & 0x0F80);
    let class = match ((t >> 4) & 1) | ((t >> 7) & 2) {
        0 => Class::Request,
        1 => Class::Indication,
        2 => Class::Success,
        _ => Class::Error,
    };
    (method, class)
}

/// Why bytes are not a well-formed STUN message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Fewer than 20 bytes, or the header length runs past the buffer.
    #[error("truncated STUN message")]
    Truncated,
    /// The two top bits are not zero or the magic cookie is wrong.
    #[error("not a STUN message")]
    NotStun,
    /// The length field is not a multiple of four.
    #[error("STUN length not a multiple of 4")]
    BadLength,
    /// An attribute runs past the end of the message.
    #[error("attribute overruns message")]
    AttributeOverrun,
    /// More than [`MAX_ATTRIBUTES`] attributes.
    #[error("too many attributes")]
    TooManyAttributes,
    /// FINGERPRINT is present but wrong or not last.
    #[error("bad FINGERPRINT")]
    BadFingerprint,
}

/// Where one attribute sits in the message buffer.
#[derive(Debug, Clone, Copy, Default)]
struct AttrRef {
    typ: u16,
    /// Offset of the value (after the 4-byte TLV header).
    start: u16,
    len: u16,
}

/// A parsed, borrowed STUN message.
#[derive(Debug, Clone)]
pub struct Message<'a> {
    buf: &'a [u8],
    typ: u16,
    attrs: [AttrRef; MAX_ATTRIBUTES],
    n_attrs: usize,
    /// Offset of the MESSAGE-INTEGRITY attribute header, if any.
    integrity_at: Option<usize>,
    /// Offset of the MESSAGE-INTEGRITY-SHA256 attribute header, if any.
    integrity_sha256_at: Option<usize>,
}

/// Returns true if the buffer starts like a STUN message (top bits 00 and the
/// magic cookie), without checking the rest.
pub fn looks_like_stun(buf: &[u8]) -> bool {
    buf.len() >= HEADER_LEN && buf[0] & 0xC0 == 0 && buf[4..8] == MAGIC_COOKIE.to_be_bytes()
}

/// Length of the STUN message at the start of `buf` as its header declares
/// it, for framing on stream transports.
pub fn framed_len(header: &[u8]) -> Option<usize> {
    if header.len() < 4 {
        return None;
    }
    Some(HEADER_LEN + usize::from(u16::from_be_bytes([header[2], header[3]])))
}

impl<'a> Message<'a> {
    /// Parses a complete STUN message. Trailing bytes after the declared
    /// length are an error (datagram transports carry one message each;
    /// stream transports frame with [`framed_len`] first).
    pub fn parse(buf: &'a [u8]) -> Result<Self, ParseError> {
        if buf.len() < HEADER_LEN {
            return Err(ParseError::Truncated);
        }
        if buf[0] & 0xC0 != 0 || buf[4..8] != MAGIC_COOKIE.to_be_bytes() {
            return Err(ParseError::NotStun);
        }
        let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
        if len % 4 != 0 {
            return Err(ParseError::BadLength);
        }
        if HEADER_LEN + len != buf.len() {
            return Err(ParseError::Truncated);
        }
        let typ = u16::from_be_bytes([buf[0], buf[1]]) & 0x3FFF;
        let mut msg = Message {
            buf,
            typ,
            attrs: [AttrRef::default(); MAX_ATTRIBUTES],
            n_attrs: 0,
            integrity_at: None,
            integrity_sha256_at: None,
        };
        let mut pos = HEADER_LEN;
        let mut after_integrity = false;
        while pos < buf.len() {
            if pos + 4 > buf.len() {
                return Err(ParseError::AttributeOverrun);
            }
            let typ = u16::from_be_bytes([buf[pos], buf[pos + 1]]);
            let alen = usize::from(u16::from_be_bytes([buf[pos + 2], buf[pos + 3]]));
            let start = pos + 4;
            let padded = (alen + 3) & !3;
            if start + padded > buf.len() {
                return Err(ParseError::AttributeOverrun);
            }
            if typ == attr::FINGERPRINT {
                if alen != 4 || start + 4 != buf.len() {
                    return Err(ParseError::BadFingerprint);
                }
                let want = u32::from_be_bytes([buf[start], buf[start + 1], buf[start + 2], buf[start + 3]]);
                if fingerprint_over(buf, pos) != want {
                    return Err(ParseError::BadFingerprint);
                }
                break;
            }
            // RFC 8489 §14.5: attributes after MESSAGE-INTEGRITY other than
            // MESSAGE-INTEGRITY-SHA256 and FINGERPRINT are ignored.
            let keep = !after_integrity || (typ == attr::MESSAGE_INTEGRITY_SHA256 && msg.integrity_sha256_at.is_none());
            if keep {
                if msg.n_attrs == MAX_ATTRIBUTES {
                    return Err(ParseError::TooManyAttributes);
                }
                // Offsets fit in u16: the whole message is at most 20 + 65535 bytes
                // and `start + alen <= buf.len()`, checked above.
                msg.attrs[msg.n_attrs] = AttrRef { typ, start: start as u16, len: alen as u16 };
                msg.n_attrs += 1;
                if typ == attr::MESSAGE_INTEGRITY && msg.integrity_at.is_none() {
                    msg.integrity_at = Some(pos);
                    after_integrity = true;
                } else if typ == attr::MESSAGE_INTEGRITY_SHA256 && msg.integrity_sha256_at.is_none() {
                    msg.integrity_sha256_at = Some(pos);
                    after_integrity = true;
                }
            }
            pos = start + padded;
        }
        Ok(msg)
    }

    /// The raw bytes of the whole message.
    pub fn bytes(&self) -> &'a [u8] {
        self.buf
    }

    /// Method number.
    pub fn method(&self) -> u16 {
        split_type(self.typ).0
    }

    /// Message class.
    pub fn class(&self) -> Class {
        split_type(self.typ).1
    }

    /// The 96-bit transaction id.
    pub fn transaction_id(&self) -> [u8; 12] {
        let mut t = [0u8; 12];
        t.copy_from_slice(&self.buf[8..20]);
        t
    }

    /// Attribute types in wire order (those after MESSAGE-INTEGRITY excluded).
    pub fn attribute_types(&self) -> impl Iterator<Item = u16> + '_ {
        self.attrs[..self.n_attrs].iter().map(|a| a.typ)
    }

    /// Value of the first attribute of a type.
    pub fn get(&self, typ: u16) -> Option<&'a [u8]> {
        let buf = self.buf;
        self.attrs[..self.n_attrs]
            .iter()
            .find(|a| a.typ == typ)
            .map(|a| &buf[usize::from(a.start)..usize::from(a.start) + usize::from(a.len)])
    }

    /// True if the message carries an attribute of this type.
    pub fn has(&self, typ: u16) -> bool {
        self.attrs[..self.n_attrs].iter().any(|a| a.typ == typ)
    }

    /// The first comprehension-required attribute (type < 0x8000) outside
    /// `known`, for a 420 answer.
    pub fn unknown_required(&self, known: &[u16]) -> Vec<u16> {
        self.attribute_types().filter(|t| *t < 0x8000 && !known.contains(t)).collect()
    }

    /// A UTF-8 attribute (USERNAME, REALM, NONCE, SOFTWARE).
    pub fn get_str(&self, typ: u16) -> Option<&'a str> {
        self.get(typ).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// A 32-bit attribute (LIFETIME).
    pub fn get_u32(&self, typ: u16) -> Option<u32> {
        let v = self.get(typ)?;
        if v.len() != 4 {
            return None;
        }
        Some(u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
    }

    /// An XOR-encoded address attribute (XOR-PEER-ADDRESS, XOR-MAPPED-ADDRESS,
    /// XOR-RELAYED-ADDRESS).
    pub fn get_xor_addr(&self, typ: u16) -> Option<Result<SocketAddr, AddrError>> {
        self.get(typ).map(|v| decode_xor_addr(v, &self.transaction_id()))
    }

    /// All values of an attribute type (e.g. several XOR-PEER-ADDRESS in one
    /// CreatePermission).
    pub fn get_all(&self, typ: u16) -> impl Iterator<Item = &'a [u8]> + '_ {
        let buf = self.buf;
        self.attrs[..self.n_attrs]
            .iter()
            .filter(move |a| a.typ == typ)
            .map(move |a| &buf[usize::from(a.start)..usize::from(a.start) + usize::from(a.len)])
    }

    /// Which integrity attribute the message carries, preferring SHA-256.
    pub fn integrity_kind(&self) -> Option<IntegrityKind> {
        if self.integrity_sha256_at.is_some() {
            Some(IntegrityKind::Sha256)
        } else if self.integrity_at.is_some() {
            Some(IntegrityKind::Sha1)
        } else {
            None
        }
    }

    /// Checks MESSAGE-INTEGRITY-SHA256 if present, else MESSAGE-INTEGRITY,
    /// with `key` (RFC 8489 §9.2.2 key derivation is the caller's). Returns
    /// false when the message carries neither.
    pub fn verify_integrity(&self, key: &[u8]) -> bool {
        if let Some(at) = self.integrity_sha256_at {
            let Some(v) = self.value_at(at) else { return false };
            // §14.6: the value may be truncated to no less than 16 bytes, in
            // multiples of 4.
            if v.len() < 16 || v.len() > 32 || v.len() % 4 != 0 {
                return false;
            }
            let mac = hmac_sha256_over(key, self.buf, at, v.len());
            return constant_time_eq(&mac[..v.len()], v);
        }
        if let Some(at) = self.integrity_at {
            let Some(v) = self.value_at(at) else { return false };
            if v.len() != 20 {
                return false;
            }
            let mac = hmac_sha1_over(key, self.buf, at, 20);
            return constant_time_eq(&mac, v);
        }
        false
    }

    fn value_at(&self, hdr: usize) -> Option<&'a [u8]> {
        let len = usize::from(u16::from_be_bytes([*self.buf.get(hdr + 2)?, *self.buf.get(hdr + 3)?]));
        self.buf.get(hdr + 4..hdr + 4 + len)
    }
}

/// Which integrity attribute protects a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntegrityKind {
    /// MESSAGE-INTEGRITY (HMAC-SHA1).
    Sha1,
    /// MESSAGE-INTEGRITY-SHA256.
    Sha256,
}

/// Why an address attribute could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    /// The family byte is neither 0x01 nor 0x02.
    #[error("unknown address family")]
    UnknownFamily,
    /// The attribute length does not match the family.
    #[error("bad address length")]
    BadLength,
}

/// Decodes an XOR-*-ADDRESS value.
pub fn decode_xor_addr(v: &[u8], tid: &[u8; 12]) -> Result<SocketAddr, AddrError> {
    if v.len() < 4 {
        return Err(AddrError::BadLength);
    }
    let port = u16::from_be_bytes([v[2], v[3]]) ^ (MAGIC_COOKIE >> 16) as u16;
    match v[1] {
        0x01 => {
            if v.len() != 8 {
                return Err(AddrError::BadLength);
            }
            let x = u32::from_be_bytes([v[4], v[5], v[6], v[7]]) ^ MAGIC_COOKIE;
            Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(x)), port))
        }
        0x02 => {
            if v.len() != 20 {
                return Err(AddrError::BadLength);
            }
            let mut a = [0u8; 16];
            a.copy_from_slice(&v[4..20]);
            let mask = xor_mask(tid);
            for (b, m) in a.iter_mut().zip(mask) {
                *b ^= m;
            }
            Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), port))
        }
        _ => Err(AddrError::UnknownFamily),
    }
}

fn xor_mask(tid: &[u8; 12]) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    m[4..].copy_from_slice(tid);
    m
}

fn encode_xor_addr(out: &mut Vec<u8>, addr: SocketAddr, tid: &[u8; 12]) {
    let port = addr.port() ^ (MAGIC_COOKIE >> 16) as u16;
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.extend_from_slice(&[0, 0x01]);
            out.extend_from_slice(&port.to_be_bytes());
            out.extend_from_slice(&(u32::from(ip) ^ MAGIC_COOKIE).to_be_bytes());
        }
        IpAddr::V6(ip) => {
            out.extend_from_slice(&[0, 0x02]);
            out.extend_from_slice(&port.to_be_bytes());
            let mask = xor_mask(tid);
            for (b, m) in ip.octets().iter().zip(mask) {
                out.push(b ^ m);
            }
        }
    }
}

/// Decodes ERROR-CODE into (code, reason).
pub fn decode_error_code(v: &[u8]) -> Option<(u16, &str)> {
    if v.len() < 4 {
        return None;
    }
    let class = u16::from(v[2] & 0x07);
    let number = u16::from(v[3]);
    if !(3..=6).contains(&class) || number > 99 {
        return None;
    }
    Some((class * 100 + number, std::str::from_utf8(&v[4..]).unwrap_or("")))
}

/// Builds a STUN message into a byte vector.
#[derive(Debug)]
pub struct MessageBuilder {
    buf: Vec<u8>,
    tid: [u8; 12],
}

impl MessageBuilder {
    /// Starts a message of a method and class.
    pub fn new(method: u16, class: Class, tid: [u8; 12]) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&message_type(method, class).to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf.extend_from_slice(&tid);
        MessageBuilder { buf, tid }
    }

    fn set_len(&mut self, body_len: usize) {
        // Messages we build are far below 64 KiB: attributes come from
        // bounded inputs (a parsed request or our own config).
        let l = (body_len as u16).to_be_bytes();
        self.buf[2] = l[0];
        self.buf[3] = l[1];
    }

    /// Appends a raw attribute (padded to four bytes).
    pub fn attr(&mut self, typ: u16, value: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(&typ.to_be_bytes());
        self.buf.extend_from_slice(&(value.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(value);
        let pad = (4 - value.len() % 4) % 4;
        self.buf.extend_from_slice(&[0u8; 3][..pad]);
        let body = self.buf.len() - HEADER_LEN;
        self.set_len(body);
        self
    }

    /// Appends a 32-bit attribute.
    pub fn attr_u32(&mut self, typ: u16, v: u32) -> &mut Self {
        self.attr(typ, &v.to_be_bytes())
    }

    /// Appends an XOR-encoded address attribute.
    pub fn xor_addr(&mut self, typ: u16, addr: SocketAddr) -> &mut Self {
        let mut v = Vec::with_capacity(20);
        encode_xor_addr(&mut v, addr, &self.tid);
        self.attr(typ, &v)
    }

    /// Appends ERROR-CODE with the standard reason phrase.
    pub fn error_code(&mut self, code: u16) -> &mut Self {
        let mut v = vec![0, 0, (code / 100) as u8, (code % 100) as u8];
        v.extend_from_slice(code::reason(code).as_bytes());
        self.attr(attr::ERROR_CODE, &v)
    }

    /// Appends ADDRESS-ERROR-CODE (RFC 8656 §18.12): the family (`0x01`
    /// IPv4, `0x02` IPv6) a dual Allocate could not get, and why, with the
    /// standard reason phrase.
    pub fn address_error_code(&mut self, family: u8, code: u16) -> &mut Self {
        let mut v = vec![family, 0, (code / 100) as u8, (code % 100) as u8];
        v.extend_from_slice(code::reason(code).as_bytes());
        self.attr(attr::ADDRESS_ERROR_CODE, &v)
    }

    /// Appends MESSAGE-INTEGRITY computed with `key`.
    pub fn integrity(&mut self, key: &[u8]) -> &mut Self {
        let at = self.buf.len();
        self.set_len(at + 24 - HEADER_LEN);
        let mac = hmac_sha1_over(key, &self.buf, at, 20);
        self.attr(attr::MESSAGE_INTEGRITY, &mac)
    }

    /// Appends MESSAGE-INTEGRITY-SHA256 (full 32 bytes) computed with `key`.
    pub fn integrity_sha256(&mut self, key: &[u8]) -> &mut Self {
        let at = self.buf.len();
        self.set_len(at + 36 - HEADER_LEN);
        let mac = hmac_sha256_over(key, &self.buf, at, 32);
        self.attr(attr::MESSAGE_INTEGRITY_SHA256, &mac)
    }

    /// Appends the integrity attribute of a kind.
    pub fn integrity_of(&mut self, kind: IntegrityKind, key: &[u8]) -> &mut Self {
        match kind {
            IntegrityKind::Sha1 => self.integrity(key),
            IntegrityKind::Sha256 => self.integrity_sha256(key),
        }
    }

    /// Appends FINGERPRINT.
    pub fn fingerprint(&mut self) -> &mut Self {
        let at = self.buf.len();
        self.set_len(at + 8 - HEADER_LEN);
        let crc = fingerprint_over(&self.buf, at);
        self.attr_u32(attr::FINGERPRINT, crc)
    }

    /// The encoded message.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// The header with its length field rewritten to end `extra` bytes after
/// `attr_at`, as the integrity and fingerprint computations require.
fn header_with_len(buf: &[u8], attr_at: usize, attr_total: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(&buf[..HEADER_LEN]);
    let len = (attr_at + attr_total - HEADER_LEN) as u16;
    h[2..4].copy_from_slice(&len.to_be_bytes());
    h
}

fn hmac_sha1_over(key: &[u8], buf: &[u8], at: usize, value_len: usize) -> [u8; 20] {
    let h = header_with_len(buf, at, 4 + value_len);
    let mut mac = match Hmac::<sha1::Sha1>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    };
    mac.update(&h);
    mac.update(&buf[HEADER_LEN..at]);
    mac.finalize().into_bytes().into()
}

fn hmac_sha256_over(key: &[u8], buf: &[u8], at: usize, value_len: usize) -> [u8; 32] {
    let h = header_with_len(buf, at, 4 + value_len);
    let mut mac = match Hmac::<sha2::Sha256>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    };
    mac.update(&h);
    mac.update(&buf[HEADER_LEN..at]);
    mac.finalize().into_bytes().into()
}

fn fingerprint_over(buf: &[u8], at: usize) -> u32 {
    let h = header_with_len(buf, at, 8);
    let crc = crc32_update(0xFFFF_FFFF, &h);
    let crc = crc32_update(crc, &buf[HEADER_LEN..at]);
    !crc ^ FINGERPRINT_XOR
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

fn crc32_update(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc = CRC_TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    crc
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Long-term credential key derivation (RFC 8489 §9.2.2), from the strings
/// as given: which prepared forms of them to try is the caller's choice
/// (`auth::credential_forms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordAlgorithm {
    /// MD5(username ":" realm ":" password), the RFC 5389 default.
    Md5,
    /// SHA-256(username ":" realm ":" password).
    Sha256,
}

impl PasswordAlgorithm {
    /// Wire number of the algorithm (PASSWORD-ALGORITHM attribute).
    pub fn number(self) -> u16 {
        match self {
            PasswordAlgorithm::Md5 => 0x0001,
            PasswordAlgorithm::Sha256 => 0x0002,
        }
    }

    /// Decodes a PASSWORD-ALGORITHM value (algorithm, parameter length,
    /// parameters).
    pub fn decode(v: &[u8]) -> Option<Self> {
        if v.len() < 4 {
            return None;
        }
        match u16::from_be_bytes([v[0], v[1]]) {
            0x0001 => Some(PasswordAlgorithm::Md5),
            0x0002 => Some(PasswordAlgorithm::Sha256),
            _ => None,
        }
    }

    /// The long-term key.
    pub fn key(self, username: &str, realm: &str, password: &str) -> Vec<u8> {
        use md5::Digest as _;
        let input = [username.as_bytes(), b":", realm.as_bytes(), b":", password.as_bytes()];
        match self {
            PasswordAlgorithm::Md5 => {
                let mut h = md5::Md5::new();
                for part in input {
                    h.update(part);
                }
                h.finalize().to_vec()
            }
            PasswordAlgorithm::Sha256 => {
                let mut h = sha2::Sha256::new();
                for part in input {
                    h.update(part);
                }
                h.finalize().to_vec()
            }
        }
    }
}

/// Encodes a PASSWORD-ALGORITHMS value listing MD5 and SHA-256.
pub fn password_algorithms_value() -> Vec<u8> {
    let mut v = Vec::with_capacity(8);
    for alg in [PasswordAlgorithm::Md5, PasswordAlgorithm::Sha256] {
        v.extend_from_slice(&alg.number().to_be_bytes());
        v.extend_from_slice(&[0, 0]);
    }
    v
}

/// TURN ChannelData framing (RFC 8656 §12.4).
pub mod channel_data {
    /// Lowest valid channel number.
    pub const MIN_CHANNEL: u16 = 0x4000;
    /// Highest valid channel number. RFC 8656 narrowed the range to
    /// 0x4FFF, but RFC 5766 clients (coturn's uclient among them) still use
    /// up to 0x7FFF, which ChannelData framing can carry, so it is accepted.
    pub const MAX_CHANNEL: u16 = 0x7FFF;

    /// True if the first byte marks ChannelData (first two bits 01).
    pub fn is_channel_data(buf: &[u8]) -> bool {
        buf.first().is_some_and(|b| b & 0xC0 == 0x40)
    }

    /// Splits a ChannelData message into channel number and payload. On
    /// datagram transports the buffer may hold padding after the payload.
    pub fn parse(buf: &[u8]) -> Option<(u16, &[u8])> {
        if buf.len() < 4 || !is_channel_data(buf) {
            return None;
        }
        let channel = u16::from_be_bytes([buf[0], buf[1]]);
        let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
        let payload = buf.get(4..4 + len)?;
        Some((channel, payload))
    }

    /// Writes the 4-byte header for `len` payload bytes on `channel`.
    pub fn header(channel: u16, len: u16) -> [u8; 4] {
        let c = channel.to_be_bytes();
        let l = len.to_be_bytes();
        [c[0], c[1], l[0], l[1]]
    }

    /// Bytes a ChannelData frame occupies on a stream transport (padded to 4).
    pub fn framed_len(header: &[u8]) -> Option<usize> {
        if header.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
        Some((4 + len + 3) & !3)
    }
}

#[cfg(test)]
mod tests;
