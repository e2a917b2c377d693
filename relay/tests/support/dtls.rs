//! The DTLS side of the test client: a blocking session over the client's
//! UDP socket, built on the relay's own DTLS engine in the client role.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use dimpl::{Dtls, DtlsCertificate, Output};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};

pub struct DtlsLink {
    dtls: Dtls,
    buf: Vec<u8>,
    up: bool,
    /// Plaintext records received and not yet read.
    plain: VecDeque<Vec<u8>>,
}

impl DtlsLink {
    /// Runs the handshake with `server` (each receive bounded by the
    /// socket's read timeout).
    pub fn connect(sock: &UdpSocket, server: SocketAddr, cert: &Path, key: &Path) -> Self {
        let certificate = CertificateDer::from_pem_file(cert).expect("test certificate").to_vec();
        let private_key = PrivatePkcs8KeyDer::from_pem_file(key).expect("test key (PKCS#8)").secret_pkcs8_der().to_vec();
        let mut dtls = Dtls::new_auto(Arc::new(dimpl::Config::default()), DtlsCertificate { certificate, private_key }, Instant::now());
        dtls.set_active(true);
        let mut link = DtlsLink { dtls, buf: vec![0; 2048], up: false, plain: VecDeque::new() };
        link.flush(sock, server).expect("client hello");
        let mut datagram = vec![0u8; 65536];
        while !link.up {
            let (n, _) = sock.recv_from(&mut datagram).expect("the relay's handshake records within the timeout");
            link.input(sock, server, &datagram[..n]).expect("handshake");
        }
        link
    }

    fn input(&mut self, sock: &UdpSocket, server: SocketAddr, datagram: &[u8]) -> io::Result<()> {
        self.dtls.handle_timeout(Instant::now()).map_err(io::Error::other)?;
        self.dtls.handle_packet(datagram).map_err(io::Error::other)?;
        self.flush(sock, server)
    }

    /// Sends what the engine has queued; keeps what it decrypted.
    fn flush(&mut self, sock: &UdpSocket, server: SocketAddr) -> io::Result<()> {
        self.dtls.handle_timeout(Instant::now()).map_err(io::Error::other)?;
        loop {
            match self.dtls.poll_output(&mut self.buf) {
                Output::Packet(p) => {
                    sock.send_to(p, server)?;
                }
                Output::BufferTooSmall { needed } => self.buf.resize(needed, 0),
                Output::Connected => self.up = true,
                Output::ApplicationData(d) => self.plain.push_back(d.to_vec()),
                Output::Timeout(_) => return Ok(()),
                _ => {}
            }
        }
    }

    pub fn send(&mut self, sock: &UdpSocket, server: SocketAddr, data: &[u8]) -> io::Result<()> {
        self.dtls.send_application_data(data).map_err(io::Error::other)?;
        self.flush(sock, server)
    }

    /// The next record's plaintext, waiting for datagrams as needed.
    pub fn recv(&mut self, sock: &UdpSocket, server: SocketAddr, out: &mut [u8]) -> io::Result<usize> {
        let mut datagram = vec![0u8; 65536];
        loop {
            if let Some(p) = self.plain.pop_front() {
                out[..p.len()].copy_from_slice(&p);
                return Ok(p.len());
            }
            let (n, _) = sock.recv_from(&mut datagram)?;
            self.input(sock, server, &datagram[..n])?;
        }
    }

    pub fn close(&mut self, sock: &UdpSocket, server: SocketAddr) {
        self.dtls.close().expect("close_notify");
        self.flush(sock, server).expect("send close_notify");
    }
}
