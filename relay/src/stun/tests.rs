//! Codec tests: the RFC 5769 vectors, encode/decode round trips and
//! property tests that the parser neither panics nor accepts garbage.

use super::*;
use proptest::prelude::*;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap_or(0)).collect()
}

// RFC 5769 §2.1: request, short-term password "VOkJxbRl1RmTxUk/WvJxBt".
const RFC5769_REQUEST: &str = "
    000100582112a442b7e7a701bc34d686fa87dfae
    802200105354554e20746573742063 6c69656e74
    002400046e0001ff 80290008932ff9b151263b36
    00060009657674 6a3a68367659202020
    000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2
    80280004e57a3bcf";
// RFC 5769 §2.2: IPv4 response, mapped address 192.0.2.1:32853.
const RFC5769_V4_RESPONSE: &str = "
    0101003c2112a442b7e7a701bc34d686fa87dfae
    8022000b7465737420766563746f7220
    002000080001a147e112a643
    000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7
    80280004c07d4c96";
// RFC 5769 §2.3: IPv6 response, 2001:db8:1234:5678:11:2233:4455:6677 port 32853.
const RFC5769_V6_RESPONSE: &str = "
    010100482112a442b7e7a701bc34d686fa87dfae
    8022000b7465737420766563746f7220
    002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d9
    00080014a382954e4be67bf11784c97c8292c275bfe3ed41
    80280004c8fb0b4c";
// RFC 5769 §2.4: long-term credentials, username U+30DE U+30C8 U+30EA
// U+30C3 U+30AF U+30B9, password "TheMatrIX" after SASLprep, realm
// "example.org", nonce "f//499k954d6OL34oL9FSTvy64sA".
const RFC5769_LONG_TERM: &str = "
    000100602112a44278ad3433c6ad72c029da412e
    00060012e3839ee38388e383aae38383e382afe382b90000
    0015001c662f2f3439396b393534643 64f4c33346f4c394653547679363473 41
    0014000b6578616d706c652e6f726700
    00080014f67024656dd64a3e02b8e0712e85c9a28ca89666";

const SHORT_TERM_PASSWORD: &[u8] = b"VOkJxbRl1RmTxUk/WvJxBt";

#[test]
fn rfc5769_sample_request() {
    let bytes = hex(RFC5769_REQUEST);
    assert_eq!(bytes.len(), 108);
    let m = Message::parse(&bytes).expect("vector parses");
    assert_eq!(m.method(), method::BINDING);
    assert_eq!(m.class(), Class::Request);
    assert_eq!(m.get_str(attr::SOFTWARE), Some("STUN test client"));
    assert_eq!(m.get_str(attr::USERNAME), Some("evtj:h6vY"));
    assert!(m.verify_integrity(SHORT_TERM_PASSWORD));
    assert!(!m.verify_integrity(b"wrong"));
}

#[test]
fn rfc5769_ipv4_response() {
    let bytes = hex(RFC5769_V4_RESPONSE);
    let m = Message::parse(&bytes).expect("vector parses");
    assert_eq!(m.class(), Class::Success);
    let addr = m.get_xor_addr(attr::XOR_MAPPED_ADDRESS).expect("present").expect("valid");
    assert_eq!(addr, "192.0.2.1:32853".parse().expect("literal"));
    assert!(m.verify_integrity(SHORT_TERM_PASSWORD));
}

#[test]
fn rfc5769_ipv6_response() {
    let bytes = hex(RFC5769_V6_RESPONSE);
    let m = Message::parse(&bytes).expect("vector parses");
    let addr = m.get_xor_addr(attr::XOR_MAPPED_ADDRESS).expect("present").expect("valid");
    assert_eq!(addr, "[2001:db8:1234:5678:11:2233:4455:6677]:32853".parse().expect("literal"));
    assert!(m.verify_integrity(SHORT_TERM_PASSWORD));
}

#[test]
fn rfc5769_long_term_request() {
    let bytes = hex(RFC5769_LONG_TERM);
    assert_eq!(bytes.len(), 116);
    let m = Message::parse(&bytes).expect("vector parses");
    let user = m.get_str(attr::USERNAME).expect("username");
    assert_eq!(user, "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}");
    assert_eq!(m.get_str(attr::NONCE), Some("f//499k954d6OL34oL9FSTvy64sA"));
    let realm = m.get_str(attr::REALM).expect("realm");
    assert_eq!(realm, "example.org");
    let key = PasswordAlgorithm::Md5.key(user, realm, "TheMatrIX");
    assert!(m.verify_integrity(&key));
    // The vector's password before SASLprep: one of its forms is the one.
    let raw = "The\u{00AD}M\u{00AA}tr\u{2168}";
    assert!(!m.verify_integrity(&PasswordAlgorithm::Md5.key(user, realm, raw)));
    let forms = crate::auth::credential_forms(raw);
    assert!(forms.iter().any(|p| m.verify_integrity(&PasswordAlgorithm::Md5.key(user, realm, p))));
    let wrong = PasswordAlgorithm::Md5.key(user, realm, "TheMatrix");
    assert!(!m.verify_integrity(&wrong));
}

#[test]
fn builder_reproduces_rfc5769_ipv4_response() {
    let want = hex(RFC5769_V4_RESPONSE);
    let mut tid = [0u8; 12];
    tid.copy_from_slice(&want[8..20]);
    let mut b = MessageBuilder::new(method::BINDING, Class::Success, tid);
    // The vector pads SOFTWARE with a space rather than a zero byte.
    b.attr(attr::SOFTWARE, b"test vector");
    let mut got = b.finish();
    got[HEADER_LEN + 4 + 11] = b' ';
    let mut b = MessageBuilder { buf: got, tid };
    b.xor_addr(attr::XOR_MAPPED_ADDRESS, "192.0.2.1:32853".parse().expect("literal"));
    b.integrity(SHORT_TERM_PASSWORD).fingerprint();
    assert_eq!(b.finish(), want);
}

#[test]
fn fingerprint_mismatch_is_rejected() {
    let mut bytes = hex(RFC5769_REQUEST);
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    assert_eq!(Message::parse(&bytes).err(), Some(ParseError::BadFingerprint));
}

#[test]
fn message_type_round_trip_for_all_methods_and_classes() {
    for m in 0..0x1000u16 {
        for c in [Class::Request, Class::Indication, Class::Success, Class::Error] {
            assert_eq!(split_type(message_type(m, c)), (m, c));
        }
    }
    assert_eq!(message_type(method::BINDING, Class::Success), 0x0101);
    assert_eq!(message_type(method::ALLOCATE, Class::Error), 0x0113);
    assert_eq!(message_type(method::SEND, Class::Indication), 0x0016);
}

#[test]
fn sha256_integrity_round_trip() {
    let mut b = MessageBuilder::new(method::ALLOCATE, Class::Request, [7; 12]);
    b.attr(attr::USERNAME, b"u").integrity_sha256(b"k").fingerprint();
    let bytes = b.finish();
    let m = Message::parse(&bytes).expect("parses");
    assert_eq!(m.integrity_kind(), Some(IntegrityKind::Sha256));
    assert!(m.verify_integrity(b"k"));
    assert!(!m.verify_integrity(b"j"));
}

#[test]
fn attributes_after_integrity_are_ignored() {
    let mut b = MessageBuilder::new(method::BINDING, Class::Request, [1; 12]);
    b.integrity(b"k").attr(attr::USERNAME, b"late");
    let bytes = b.finish();
    let m = Message::parse(&bytes).expect("parses");
    assert!(!m.has(attr::USERNAME));
}

#[test]
fn too_many_attributes_is_an_error() {
    let mut b = MessageBuilder::new(method::BINDING, Class::Request, [1; 12]);
    for _ in 0..=MAX_ATTRIBUTES {
        b.attr(attr::SOFTWARE, b"x");
    }
    assert_eq!(Message::parse(&b.finish()).err(), Some(ParseError::TooManyAttributes));
}

#[test]
fn channel_data_framing() {
    let mut frame = channel_data::header(0x4001, 3).to_vec();
    frame.extend_from_slice(b"abc\0");
    assert_eq!(channel_data::parse(&frame), Some((0x4001, &b"abc"[..])));
    assert_eq!(channel_data::framed_len(&frame), Some(8));
    assert_eq!(channel_data::parse(&frame[..5]), None);
}

fn arb_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<u32>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), p)),
        (any::<u128>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), p)),
    ]
}

proptest! {
    #[test]
    fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = Message::parse(&bytes);
        let _ = channel_data::parse(&bytes);
    }

    #[test]
    fn parse_never_panics_on_stun_shaped_input(
        body in proptest::collection::vec(any::<u8>(), 0..200),
        typ in 0u16..0x3FFF,
    ) {
        let mut bytes = typ.to_be_bytes().to_vec();
        bytes.extend_from_slice(&(body.len() as u16).to_be_bytes());
        bytes.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        bytes.extend_from_slice(&[9; 12]);
        bytes.extend_from_slice(&body);
        if let Ok(m) = Message::parse(&bytes) {
            for t in m.attribute_types().collect::<Vec<_>>() {
                let _ = m.get_xor_addr(t);
                let _ = m.get_u32(t);
                let _ = m.get(t).map(decode_error_code);
            }
            let _ = m.verify_integrity(b"k");
        }
    }

    #[test]
    fn round_trip(
        method in 0u16..0x1000,
        tid in any::<[u8; 12]>(),
        username in "[a-z0-9:@.]{0,40}",
        lifetime in any::<u32>(),
        peer in arb_addr(),
        data in proptest::collection::vec(any::<u8>(), 0..100),
        key in proptest::collection::vec(any::<u8>(), 1..40),
        sha256 in any::<bool>(),
    ) {
        let mut b = MessageBuilder::new(method, Class::Indication, tid);
        b.attr(attr::USERNAME, username.as_bytes())
            .attr_u32(attr::LIFETIME, lifetime)
            .xor_addr(attr::XOR_PEER_ADDRESS, peer)
            .attr(attr::DATA, &data);
        if sha256 { b.integrity_sha256(&key); } else { b.integrity(&key); }
        b.fingerprint();
        let bytes = b.finish();
        let m = Message::parse(&bytes).expect("own encoding parses");
        prop_assert_eq!(m.method(), method);
        prop_assert_eq!(m.class(), Class::Indication);
        prop_assert_eq!(m.transaction_id(), tid);
        prop_assert_eq!(m.get_str(attr::USERNAME), Some(username.as_str()));
        prop_assert_eq!(m.get_u32(attr::LIFETIME), Some(lifetime));
        prop_assert_eq!(m.get_xor_addr(attr::XOR_PEER_ADDRESS), Some(Ok(peer)));
        prop_assert_eq!(m.get(attr::DATA), Some(&data[..]));
        prop_assert!(m.verify_integrity(&key));
    }
}
