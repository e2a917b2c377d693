//! A minimal blocking TURN client over one TCP (or TLS) connection: for TCP
//! relay allocations (RFC 6062), a control connection, or a data connection
//! that turns into a plain byte pipe after its ConnectionBind; or a client
//! of UDP allocations over a stream.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use tessera_relay::stun::{Class, HEADER_LEN, Message, MessageBuilder, PasswordAlgorithm, attr, channel_data, decode_error_code, method};

use super::{RECV_TIMEOUT, REALM};

pub struct TcpTurn<S = TcpStream> {
    pub stream: S,
    user: String,
    pass: String,
    nonce: Option<String>,
    tid: u8,
    /// Indications that arrived while a response was awaited.
    indications: VecDeque<Vec<u8>>,
}

impl TcpTurn {
    pub fn connect(server: SocketAddr, user: &str, pass: &str) -> Self {
        let stream = TcpStream::connect(server).expect("connect to the relay");
        stream.set_read_timeout(Some(RECV_TIMEOUT)).expect("timeout");
        TcpTurn::over(stream, user, pass)
    }

    /// A new connection from the same client, using `other`'s nonce (as a
    /// data connection does).
    pub fn beside(other: &TcpTurn, server: SocketAddr) -> Self {
        let mut c = TcpTurn::connect(server, &other.user, &other.pass);
        c.nonce = other.nonce.clone();
        c
    }
}

impl TcpTurn<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    /// A TLS connection to `server`, which may present any certificate
    /// (the tests' own, self-signed).
    pub fn connect_tls(server: SocketAddr, user: &str, pass: &str) -> Self {
        let stream = TcpStream::connect(server).expect("connect to the relay's TLS listener");
        stream.set_read_timeout(Some(RECV_TIMEOUT)).expect("timeout");
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("TLS client");
        TcpTurn::over(rustls::StreamOwned::new(conn, stream), user, pass)
    }
}

/// Accepts the server's certificate, whatever it is, and checks only the
/// handshake signatures made with it.
#[derive(Debug)]
struct AnyCertificate(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl<S: Read + Write> TcpTurn<S> {
    fn over(stream: S, user: &str, pass: &str) -> Self {
        TcpTurn { stream, user: user.into(), pass: pass.into(), nonce: None, tid: 0, indications: VecDeque::new() }
    }

    fn key(&self) -> Vec<u8> {
        PasswordAlgorithm::Md5.key(&self.user, REALM, &self.pass)
    }

    /// Reads one STUN message off the stream.
    fn read_message(&mut self) -> Vec<u8> {
        let mut m = vec![0u8; HEADER_LEN];
        self.stream.read_exact(&mut m).expect("a STUN message within the timeout");
        let len = usize::from(u16::from_be_bytes([m[2], m[3]]));
        m.resize(HEADER_LEN + len, 0);
        self.stream.read_exact(&mut m[HEADER_LEN..]).expect("the message body");
        m
    }

    /// Sends a request (again after a 401/438 challenge); the response.
    pub fn request(&mut self, m: u16, add: &dyn Fn(&mut MessageBuilder)) -> Vec<u8> {
        for _ in 0..2 {
            self.tid = self.tid.wrapping_add(1);
            let tid = [self.tid; 12];
            let mut b = MessageBuilder::new(m, Class::Request, tid);
            add(&mut b);
            if let Some(n) = &self.nonce {
                b.attr(attr::USERNAME, self.user.as_bytes()).attr(attr::REALM, REALM.as_bytes()).attr(attr::NONCE, n.as_bytes());
                b.integrity(&self.key());
            }
            b.fingerprint();
            self.stream.write_all(&b.finish()).expect("send");
            let resp = loop {
                let msg = self.read_message();
                let parsed = Message::parse(&msg).expect("the relay's message parses");
                if parsed.class() == Class::Indication {
                    self.indications.push_back(msg);
                } else if parsed.transaction_id() == tid {
                    break msg;
                }
            };
            let key = self.key();
            if !super::settle(&resp, &mut self.nonce, &key) {
                return resp;
            }
        }
        panic!("no final response");
    }

    /// The next indication (ConnectionAttempt) on this connection.
    pub fn indication(&mut self) -> Vec<u8> {
        match self.indications.pop_front() {
            Some(m) => m,
            None => self.read_message(),
        }
    }

    /// A TCP allocation; its relay address.
    pub fn allocate_tcp(&mut self) -> Result<SocketAddr, u16> {
        self.allocate_transport(6)
    }

    /// A UDP allocation for this TCP client; its relay address.
    pub fn allocate_udp(&mut self) -> Result<SocketAddr, u16> {
        self.allocate_transport(17)
    }

    /// An Allocate with REQUESTED-TRANSPORT `protocol`; the relay address.
    fn allocate_transport(&mut self, protocol: u8) -> Result<SocketAddr, u16> {
        let r = self.request(method::ALLOCATE, &|b| {
            b.attr(attr::REQUESTED_TRANSPORT, &[protocol, 0, 0, 0]);
        });
        match code(&r) {
            Some(c) => Err(c),
            None => Message::parse(&r).ok().and_then(|m| m.get_xor_addr(attr::XOR_RELAYED_ADDRESS)).and_then(|a| a.ok()).ok_or(0),
        }
    }

    /// A UDP allocation with channel 0x4001 bound to a new peer socket on
    /// 127.0.0.1 (which the relay must allow); (peer, relay address).
    pub fn with_peer(&mut self) -> (std::net::UdpSocket, SocketAddr) {
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").expect("peer socket");
        peer.set_read_timeout(Some(RECV_TIMEOUT)).expect("timeout");
        let relay_addr = self.allocate_udp().expect("a UDP allocation over a stream");
        assert_eq!(self.channel_bind(0x4001, peer.local_addr().expect("addr")), None);
        (peer, relay_addr)
    }

    pub fn channel_bind(&mut self, channel: u16, peer: SocketAddr) -> Option<u16> {
        let r = self.request(method::CHANNEL_BIND, &|b| {
            b.attr_u32(attr::CHANNEL_NUMBER, u32::from(channel) << 16);
            b.xor_addr(attr::XOR_PEER_ADDRESS, peer);
        });
        code(&r)
    }

    /// Reads one ChannelData frame and its padding; (channel, payload).
    pub fn read_channel_data(&mut self) -> (u16, Vec<u8>) {
        let mut h = [0u8; 4];
        self.stream.read_exact(&mut h).expect("a ChannelData frame within the timeout");
        assert!(channel_data::is_channel_data(&h), "not ChannelData: {h:?}");
        let len = usize::from(u16::from_be_bytes([h[2], h[3]]));
        let mut body = vec![0u8; (len + 3) & !3];
        self.stream.read_exact(&mut body).expect("the frame body");
        body.truncate(len);
        (u16::from_be_bytes([h[0], h[1]]), body)
    }

    /// Connect; the CONNECTION-ID or the error code.
    pub fn connect_peer(&mut self, peer: SocketAddr) -> Result<u32, u16> {
        let r = self.request(method::CONNECT, &|b| {
            b.xor_addr(attr::XOR_PEER_ADDRESS, peer);
        });
        match code(&r) {
            Some(c) => Err(c),
            None => Message::parse(&r).ok().and_then(|m| m.get_u32(attr::CONNECTION_ID)).ok_or(0),
        }
    }

    /// ConnectionBind on this connection: `None` on success, after which
    /// the stream carries the peer's bytes.
    pub fn bind_connection(&mut self, id: u32) -> Option<u16> {
        let r = self.request(method::CONNECTION_BIND, &|b| {
            b.attr_u32(attr::CONNECTION_ID, id);
        });
        code(&r)
    }

    pub fn create_permission(&mut self, peer: SocketAddr) -> Option<u16> {
        let r = self.request(method::CREATE_PERMISSION, &|b| {
            b.xor_addr(attr::XOR_PEER_ADDRESS, peer);
        });
        code(&r)
    }

    pub fn refresh(&mut self, lifetime: u32) -> Option<u16> {
        let r = self.request(method::REFRESH, &|b| {
            b.attr_u32(attr::LIFETIME, lifetime);
        });
        code(&r)
    }
}

/// One ChannelData frame, padded to four bytes as a stream carries it.
pub fn channel_data_frame(channel: u16, data: &[u8]) -> Vec<u8> {
    let mut f = channel_data::header(channel, data.len() as u16).to_vec();
    f.extend_from_slice(data);
    f.resize((f.len() + 3) & !3, 0);
    f
}

fn code(resp: &[u8]) -> Option<u16> {
    Message::parse(resp).ok()?.get(attr::ERROR_CODE).and_then(decode_error_code).map(|(c, _)| c)
}
