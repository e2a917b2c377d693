//! DTLS clients (RFC 7350: TURN over DTLS, usually UDP port 5349).
//!
//! Every shard binds its own SO_REUSEPORT socket on each `dtls_listen`
//! address, so a client's datagrams always reach the same shard, which keeps
//! its DTLS session (a sans-IO `dimpl` state, by 5-tuple) beside its
//! allocation. A datagram goes through the session; each record of
//! plaintext it yields runs through the core as a UDP client's datagram
//! would (one STUN message or ChannelData). Replies and peer data for the
//! client are sealed by the session and leave through the shard's send
//! queues with everything else.
//!
//! Limits: only a ClientHello opens a session; a shard holds at most
//! `dtls_max_sessions`. A session is *unverified* until the engine answers
//! a hello with a ServerHello, which it does only once the client has
//! echoed the cookie of the cookie exchange (HelloVerifyRequest, or
//! HelloRetryRequest in DTLS 1.3) and so proved its address: a hello from a
//! forged address never gets past that, and costs no signature. A full
//! table makes room by dropping its oldest unverified session; with none,
//! the hello is refused and counted. A handshake not done within
//! `dtls_handshake_secs` is dropped, and so is a session whose client sends
//! no authenticated record within that time of its start. An established
//! session is dropped when its client has sent no authenticated record for
//! `dtls_idle_secs` and has no allocation, or for `max_lifetime_secs` (no
//! allocation outlives that without a Refresh).
//!
//! Once a client's records have been authenticated, plaintext (epoch 0)
//! records on its 5-tuple are not the session's: anyone who knows the
//! address can forge them. A ClientHello among them may be the client
//! starting over from the same address: it goes to a *successor* session
//! kept beside the established one, and only when the successor is verified
//! (the client echoed its cookie, so it holds the address) does it take the
//! old session's place, and the old allocation go (RFC 6347 §4.2.8).

use std::sync::Arc;
use std::time::{Duration, Instant};

use dimpl::{Dtls, DtlsCertificate, Output};

use crate::FastMap;
use crate::metrics::Metrics;
use crate::turn::FiveTuple;

/// What every shard's DTLS sessions share.
pub struct DtlsSetup {
    /// Engine configuration (no client certificate asked for).
    pub config: Arc<dimpl::Config>,
    /// The server's certificate and key.
    pub cert: DtlsCertificate,
    /// Sessions per shard.
    pub max_sessions: usize,
    /// Longest handshake.
    pub handshake: Duration,
    /// Longest silence of an established client with an allocation.
    pub idle: Duration,
    /// Longest silence of an established client without one.
    pub idle_without_allocation: Duration,
}

impl DtlsSetup {
    /// The relay's DTLS settings around a certificate and its private key
    /// (DER; PKCS#8 or SEC1, ECDSA P-256 or P-384).
    pub fn new(certificate: Vec<u8>, private_key: Vec<u8>, max_sessions: usize, handshake: Duration, idle: Duration, idle_without_allocation: Duration) -> anyhow::Result<Self> {
        let config = dimpl::Config::builder()
            .require_client_certificate(false)
            // What marks a session verified (a ServerHello) needs it.
            .use_server_cookie(true)
            .handshake_timeout(handshake)
            .build()
            .map_err(|e| anyhow::anyhow!("DTLS configuration: {e}"))?;
        Ok(DtlsSetup {
            config: Arc::new(config),
            cert: DtlsCertificate { certificate, private_key },
            max_sessions,
            handshake,
            idle,
            idle_without_allocation,
        })
    }

    /// Runs a whole handshake between a server session and a client of
    /// this process, in memory, so that a certificate or key the engine
    /// cannot use fails at start rather than on a client's first attempt.
    pub fn self_check(&self) -> anyhow::Result<()> {
        // The engine panics on a key it cannot load: that is an answer too.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.handshake_with_itself()))
            .unwrap_or_else(|_| anyhow::bail!("DTLS self-check: the engine cannot use this certificate and key"))
    }

    fn handshake_with_itself(&self) -> anyhow::Result<()> {
        let now = Instant::now();
        let mut server = Dtls::new_auto(self.config.clone(), self.cert.clone(), now);
        let mut client = Dtls::new_auto(self.config.clone(), self.cert.clone(), now);
        client.set_active(true);
        let mut buf = vec![0u8; 2048];
        let (mut server_up, mut client_up) = (false, false);
        // Each round moves one flight; a handshake takes a handful.
        for _ in 0..16 {
            let to_server = drain(&mut client, &mut buf, &mut client_up)?;
            // The engines want their clock set before each packet.
            let now = Instant::now();
            server.handle_timeout(now).map_err(|e| anyhow::anyhow!("DTLS self-check (server): {e}"))?;
            client.handle_timeout(now).map_err(|e| anyhow::anyhow!("DTLS self-check (client): {e}"))?;
            for p in &to_server {
                server.handle_packet(p).map_err(|e| anyhow::anyhow!("DTLS self-check (server): {e}"))?;
            }
            let to_client = drain(&mut server, &mut buf, &mut server_up)?;
            for p in &to_client {
                client.handle_packet(p).map_err(|e| anyhow::anyhow!("DTLS self-check (client): {e}"))?;
            }
            if server_up && client_up {
                return Ok(());
            }
        }
        anyhow::bail!("DTLS self-check: the handshake did not complete (is the key an ECDSA key matching the certificate?)")
    }
}

/// Collects an engine's packets until it waits (self-check only).
fn drain(d: &mut Dtls, buf: &mut Vec<u8>, up: &mut bool) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    loop {
        match d.poll_output(buf) {
            Output::Packet(p) => out.push(p.to_vec()),
            Output::BufferTooSmall { needed } => buf.resize(needed, 0),
            Output::Connected => *up = true,
            Output::Timeout(_) => return Ok(out),
            Output::CloseNotify => anyhow::bail!("DTLS self-check: closed"),
            _ => {}
        }
    }
}

struct Session {
    dtls: Dtls,
    created: Instant,
    /// Last authenticated record from the client (one that carried
    /// plaintext), or the session's start.
    heard: Instant,
    /// When the engine wants `handle_timeout` (retransmission).
    wake: Option<Instant>,
    /// The engine has sent a ServerHello: the client echoed the cookie.
    verified: bool,
    /// The engine reports the handshake done on its side.
    connected: bool,
    /// A record from the client has been authenticated (it carried
    /// plaintext): from then on plaintext records are forgeries or a
    /// restart. (A DTLS 1.2 client whose last flight went unanswered
    /// sends it again in plaintext, after the server counts as connected.)
    confirmed: bool,
    /// A new handshake from the same address, not yet verified.
    successor: Option<Box<Session>>,
}

impl Session {
    fn new(setup: &DtlsSetup, now: Instant) -> Self {
        let dtls = Dtls::new_auto(setup.config.clone(), setup.cert.clone(), now);
        Session { dtls, created: now, heard: now, wake: None, verified: false, connected: false, confirmed: false, successor: None }
    }

    /// Feeds a datagram to the engine and drains it; false when the
    /// session is over. Notes authentication and verification.
    #[allow(clippy::too_many_arguments)]
    fn take(&mut self, tuple: FiveTuple, now: Instant, data: &[u8], buf: &mut Vec<u8>, metrics: &Metrics, packets: &mut Vec<Vec<u8>>, plain: &mut Vec<Vec<u8>>) -> bool {
        let (heard, sent) = (plain.len(), packets.len());
        let ok = guarded(tuple, || {
            if let Err(e) = self.dtls.handle_timeout(now).and_then(|()| self.dtls.handle_packet(data)) {
                tracing::debug!(client = %tuple.client, error = %e, "DTLS session failed");
                return false;
            }
            pump(self, buf, metrics, packets, Some(plain))
        });
        if plain.len() > heard {
            self.heard = now;
            self.confirmed = true;
        }
        if !self.verified && packets[sent..].iter().any(|p| is_server_hello(p)) {
            self.verified = true;
        }
        ok
    }
}

/// What became of peer data or a reply for a DTLS client.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Sealed {
    /// Sealed into records to send.
    Sent,
    /// Not sent: no established session, or more than a record holds.
    Dropped,
    /// The session failed while sealing: its allocation goes too.
    Ended,
}

/// What became of a datagram or a timer for one session.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Fate {
    /// The session goes on.
    Open,
    /// No session, and the datagram was not a ClientHello: dropped.
    Ignored,
    /// A ClientHello refused: the session table is full (counted).
    Refused,
    /// A ClientHello for an older protocol, answered with an alert in
    /// `packets` and no session.
    Answered,
    /// The session ended (close_notify, a fatal error, a deadline): its
    /// allocation goes with it.
    Closed,
    /// A verified successor took the session's place: the old allocation
    /// goes; the new session goes on.
    Replaced,
}

/// A shard's DTLS sessions.
pub(crate) struct Sessions {
    setup: Option<Arc<DtlsSetup>>,
    map: FastMap<FiveTuple, Session>,
    /// Output buffer for the engines (grown on demand).
    buf: Vec<u8>,
}

/// Bytes of a DTLS record header (type, version, epoch, sequence, length).
const RECORD_HEADER: usize = 13;
/// Record content type of a handshake.
const HANDSHAKE: u8 = 22;
/// Handshake message type of a ClientHello.
const CLIENT_HELLO: u8 = 1;
/// Handshake message type of a ServerHello (and of DTLS 1.3's
/// HelloRetryRequest, told apart by its random).
const SERVER_HELLO: u8 = 2;
/// The random of a HelloRetryRequest (RFC 8446 §4.1.3).
const HELLO_RETRY_RANDOM: [u8; 32] = [
    0xCF, 0x21, 0xAD, 0x74, 0xE5, 0x9A, 0x61, 0x11, 0xBE, 0x1D, 0x8C, 0x02, 0x1E, 0x65, 0xB8, 0x91, 0xC2, 0xA2, 0x11, 0x16, 0x7A, 0xBB,
    0x8C, 0x5E, 0x07, 0x9E, 0x09, 0xE2, 0xC8, 0xA8, 0x33, 0x9C,
];
/// Most plaintext one record carries (RFC 6347 §4.3.1: 2^14 bytes).
const MAX_PLAINTEXT: usize = 1 << 14;

/// Bytes of a handshake message header (type, length, message_seq,
/// fragment offset and length).
const HANDSHAKE_HEADER: usize = 12;
/// ClientHello.client_version of DTLS 1.2, also the legacy version of a
/// DTLS 1.3 ClientHello (RFC 9147 §5.3).
const DTLS_1_2: [u8; 2] = [0xfe, 0xfd];

/// True if a datagram starts with a plaintext record: a content type of
/// RFC 7983's DTLS range that is not a DTLS 1.3 ciphertext header (those
/// start with 0b001), in epoch 0.
fn is_plaintext(data: &[u8]) -> bool {
    data.len() >= RECORD_HEADER && (20..=26).contains(&data[0]) && data[3..5] == [0, 0]
}

/// True if a datagram starts with a plaintext handshake record carrying
/// the first fragment of a handshake message of type `kind`.
fn starts_handshake(data: &[u8], kind: u8) -> bool {
    is_plaintext(data)
        && data[0] == HANDSHAKE
        && data.len() > RECORD_HEADER + HANDSHAKE_HEADER
        && data[RECORD_HEADER] == kind
        && data[RECORD_HEADER + 6..RECORD_HEADER + 9] == [0, 0, 0]
}

/// True if a datagram starts with a ClientHello: the only thing that may
/// open a session.
fn is_client_hello(data: &[u8]) -> bool {
    starts_handshake(data, CLIENT_HELLO)
}

/// True if a datagram the engine sent starts with a ServerHello that is no
/// HelloRetryRequest: the client's hello got past the cookie exchange.
fn is_server_hello(packet: &[u8]) -> bool {
    let random = RECORD_HEADER + HANDSHAKE_HEADER + 2;
    starts_handshake(packet, SERVER_HELLO) && packet.get(random..random + 32).is_some_and(|r| r != HELLO_RETRY_RANDOM)
}

/// For a ClientHello whose best version is older than DTLS 1.2 (DTLS 1.0,
/// which RFC 8996 retired), the fatal protocol_version alert that answers
/// it, in a plaintext record echoing the hello's record version and
/// sequence number. A client that can do better then retries at once
/// instead of waiting out its retransmissions.
fn old_version_alert(hello: &[u8]) -> Option<Vec<u8>> {
    let at = RECORD_HEADER + HANDSHAKE_HEADER;
    let version = hello.get(at..at + 2)?;
    // DTLS versions count down: 0xfeff is 1.0, 0xfefd is 1.2.
    if version > &DTLS_1_2[..] && version[0] == 0xfe {
        let mut alert = Vec::with_capacity(RECORD_HEADER + 2);
        alert.push(ALERT);
        alert.extend_from_slice(&hello[1..11]);
        alert.extend_from_slice(&[0, 2, FATAL, PROTOCOL_VERSION]);
        return Some(alert);
    }
    None
}

/// Record content type of an alert.
const ALERT: u8 = 21;
/// Alert level.
const FATAL: u8 = 2;
/// Alert description (RFC 5246 §7.2).
const PROTOCOL_VERSION: u8 = 70;

impl Sessions {
    pub(crate) fn new(setup: Option<Arc<DtlsSetup>>) -> Self {
        Sessions { setup, map: FastMap::default(), buf: vec![0; 2048] }
    }

    /// Sessions held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Feeds one datagram from `tuple`'s client. Packets for the client go
    /// to `packets`, each record of plaintext to `plain`.
    pub(crate) fn receive(&mut self, tuple: FiveTuple, now: Instant, data: &[u8], metrics: &Metrics, packets: &mut Vec<Vec<u8>>, plain: &mut Vec<Vec<u8>>) -> Fate {
        let Some(setup) = self.setup.clone() else { return Fate::Ignored };
        if let Some(s) = self.map.get_mut(&tuple)
            && s.confirmed
            && is_plaintext(data)
        {
            return Self::to_successor(s, &setup, tuple, now, data, &mut self.buf, metrics, packets);
        }
        if !self.map.contains_key(&tuple) {
            if !is_client_hello(data) {
                return Fate::Ignored;
            }
            if let Some(alert) = old_version_alert(data) {
                metrics.dtls_failures_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                packets.push(alert);
                return Fate::Answered;
            }
            if self.map.len() >= setup.max_sessions {
                let oldest = self.map.iter().filter(|(_, s)| !s.verified && !s.connected).min_by_key(|(_, s)| s.created).map(|(t, _)| *t);
                match oldest {
                    Some(t) => {
                        self.end(t, metrics);
                    }
                    None => {
                        metrics.dtls_refused_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        return Fate::Refused;
                    }
                }
            }
            self.map.insert(tuple, Session::new(&setup, now));
            metrics.dtls_sessions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let Some(s) = self.map.get_mut(&tuple) else { return Fate::Ignored };
        if s.take(tuple, now, data, &mut self.buf, metrics, packets, plain) { Fate::Open } else { self.end(tuple, metrics) }
    }

    /// A plaintext datagram on an established session's address: a
    /// ClientHello starts (or goes to) its successor; the rest goes to the
    /// successor if there is one, else nowhere.
    #[allow(clippy::too_many_arguments)]
    fn to_successor(
        s: &mut Session,
        setup: &DtlsSetup,
        tuple: FiveTuple,
        now: Instant,
        data: &[u8],
        buf: &mut Vec<u8>,
        metrics: &Metrics,
        packets: &mut Vec<Vec<u8>>,
    ) -> Fate {
        // A client's first hello (message_seq 0) starts a fresh successor:
        // one that answered another hello (a forged one, say) expects the
        // next message of that exchange. Its answer to the cookie exchange
        // is message_seq 1, for the successor that sent the cookie.
        if is_client_hello(data) && data[RECORD_HEADER + 4..RECORD_HEADER + 6] == [0, 0] {
            if old_version_alert(data).is_some() {
                return Fate::Ignored;
            }
            s.successor = Some(Box::new(Session::new(setup, now)));
        }
        let Some(next) = s.successor.as_mut() else { return Fate::Ignored };
        // Before its handshake a session yields no plaintext.
        let mut none = Vec::new();
        if !next.take(tuple, now, data, buf, metrics, packets, &mut none) {
            s.successor = None;
            metrics.dtls_failures_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Fate::Ignored;
        }
        if !next.verified {
            return Fate::Open;
        }
        // The client holds the address: the new session takes over.
        if let Some(next) = s.successor.take() {
            *s = *next;
        }
        Fate::Replaced
    }

    /// Seals `plaintext` for `tuple`'s client into `packets`.
    pub(crate) fn seal(&mut self, tuple: FiveTuple, now: Instant, plaintext: &[u8], metrics: &Metrics, packets: &mut Vec<Vec<u8>>) -> Sealed {
        let Some(s) = self.map.get_mut(&tuple) else { return Sealed::Dropped };
        if !s.connected || plaintext.len() > MAX_PLAINTEXT {
            return Sealed::Dropped;
        }
        let buf = &mut self.buf;
        let step = || s.dtls.handle_timeout(now).is_ok() && s.dtls.send_application_data(plaintext).is_ok() && pump(s, buf, metrics, packets, None);
        if guarded(tuple, step) {
            return Sealed::Sent;
        }
        self.end(tuple, metrics);
        Sealed::Ended
    }

    /// Runs due retransmission timers and drops sessions past their
    /// deadlines (`has_allocation` tells which clients hold one). Packets
    /// go to `packets` with their 5-tuple; the sessions that ended are
    /// returned for their allocations to go.
    pub(crate) fn tick(
        &mut self,
        now: Instant,
        metrics: &Metrics,
        packets: &mut Vec<(FiveTuple, Vec<u8>)>,
        has_allocation: impl Fn(FiveTuple) -> bool,
    ) -> Vec<FiveTuple> {
        let Some(setup) = self.setup.clone() else { return Vec::new() };
        let mut ended = Vec::new();
        let mut out = Vec::new();
        for (tuple, s) in &mut self.map {
            let late = if s.confirmed {
                let silent = now.duration_since(s.heard);
                silent >= setup.idle || (silent >= setup.idle_without_allocation && !has_allocation(*tuple))
            } else {
                // No allocation without an authenticated record.
                now.duration_since(s.created) >= setup.handshake
            };
            if s.successor.as_ref().is_some_and(|n| now.duration_since(n.created) >= setup.handshake) {
                s.successor = None;
                metrics.dtls_failures_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            if late {
                ended.push(*tuple);
                continue;
            }
            if s.wake.is_some_and(|w| w <= now) {
                let buf = &mut self.buf;
                let ok = guarded(*tuple, || s.dtls.handle_timeout(now).is_ok() && pump(s, buf, metrics, &mut out, None));
                packets.extend(out.drain(..).map(|p| (*tuple, p)));
                if !ok {
                    ended.push(*tuple);
                }
            }
        }
        for t in &ended {
            self.end(*t, metrics);
        }
        ended
    }

    /// Sends close_notify to every established client (shutdown).
    pub(crate) fn close_all(&mut self, now: Instant, metrics: &Metrics, packets: &mut Vec<(FiveTuple, Vec<u8>)>) {
        let mut out = Vec::new();
        for (tuple, mut s) in self.map.drain() {
            metrics.dtls_sessions.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            if !s.connected {
                continue;
            }
            let buf = &mut self.buf;
            if guarded(tuple, || s.dtls.handle_timeout(now).is_ok() && s.dtls.close().is_ok() && pump(&mut s, buf, metrics, &mut out, None)) {
                packets.extend(out.drain(..).map(|p| (tuple, p)));
            }
        }
    }

    fn end(&mut self, tuple: FiveTuple, metrics: &Metrics) -> Fate {
        if let Some(s) = self.map.remove(&tuple) {
            metrics.dtls_sessions.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            if !s.connected {
                metrics.dtls_failures_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Fate::Closed
    }
}

/// Runs a step of a session's engine, turning a panic (a bug the engine
/// would hit on some input) into the end of that session rather than of
/// the shard. The engine is not used again after one.
fn guarded(tuple: FiveTuple, step: impl FnOnce() -> bool) -> bool {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(step)).unwrap_or_else(|panic| {
        // Tests want to see the engine's panics, not survive them.
        if cfg!(test) {
            std::panic::resume_unwind(panic);
        }
        tracing::error!(client = %tuple.client, "the DTLS engine panicked; the session is dropped");
        false
    })
}

/// Drains a session's engine until it waits: packets out, plaintext
/// records to `plain` (dropped where there is none, as in a timer). False
/// when the session is over (close_notify).
fn pump(s: &mut Session, buf: &mut Vec<u8>, metrics: &Metrics, packets: &mut Vec<Vec<u8>>, mut plain: Option<&mut Vec<Vec<u8>>>) -> bool {
    loop {
        match s.dtls.poll_output(buf) {
            Output::Packet(p) => packets.push(p.to_vec()),
            Output::BufferTooSmall { needed } => buf.resize(needed, 0),
            Output::Timeout(t) => {
                s.wake = Some(t);
                return true;
            }
            Output::Connected => {
                s.connected = true;
                metrics.dtls_handshakes_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Output::ApplicationData(d) => {
                if let Some(p) = plain.as_deref_mut() {
                    p.push(d.to_vec());
                }
            }
            Output::CloseNotify => return false,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::SocketAddr;

    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};

    use crate::turn::Transport;

    /// A self-signed P-256 certificate and its key, made for these tests
    /// only (valid until 2126).
    const TEST_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg7mDV7hKq9Jm7Oir3
4Or8zIOB47jSqu4qq7yt4TLfJjOhRANCAAS1QI4nh65iCTmg7+KieBX7/md7bzUa
eT/PN4KCH6uWJJfpjDbKHbc47EJUN7EZghhyRLdY+ru1geL/QMbmeBla
-----END PRIVATE KEY-----
";
    const TEST_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBkDCCATegAwIBAgIUMwY2ikmzifg9J4UzjTAAvjkG5DQwCgYIKoZIzj0EAwIw
HTEbMBkGA1UEAwwSdGVzc2VyYS1yZWxheS10ZXN0MCAXDTI2MTEyODEyMTczNFoY
DzIxMjYxMTA0MTIxNzM0WjAdMRswGQYDVQQDDBJ0ZXNzZXJhLXJlbGF5LXRlc3Qw
WTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAS1QI4nh65iCTmg7+KieBX7/md7bzUa
eT/PN4KCH6uWJJfpjDbKHbc47EJUN7EZghhyRLdY+ru1geL/QMbmeBlao1MwUTAd
BgNVHQ4EFgQUi1+6QaOjIWIbbrFtH74BMp5cvIAwHwYDVR0jBBgwFoAUi1+6QaOj
IWIbbrFtH74BMp5cvIAwDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNHADBE
AiAemX+dF902X5CO1neHV2RJlf78R0sautiRZTs5wHdAcgIgfJHBHe4WY/C/bbfU
/y4gYOJiRBWJzda2r6DtpD/spH0=
-----END CERTIFICATE-----
";
    const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);
    const IDLE_LIMIT: Duration = Duration::from_secs(600);
    const IDLE_WITHOUT_ALLOCATION: Duration = Duration::from_secs(60);

    fn setup(max_sessions: usize) -> Arc<DtlsSetup> {
        let cert = CertificateDer::from_pem_slice(TEST_CERT.as_bytes()).expect("certificate");
        let key = PrivatePkcs8KeyDer::from_pem_slice(TEST_KEY.as_bytes()).expect("key");
        Arc::new(DtlsSetup::new(cert.to_vec(), key.secret_pkcs8_der().to_vec(), max_sessions, HANDSHAKE_LIMIT, IDLE_LIMIT, IDLE_WITHOUT_ALLOCATION).expect("setup"))
    }

    /// Counters, settings and a session table of `max_sessions`, at a start
    /// instant.
    fn table(max_sessions: usize) -> (Metrics, Arc<DtlsSetup>, Sessions, Instant) {
        let s = setup(max_sessions);
        (Metrics::default(), s.clone(), Sessions::new(Some(s)), Instant::now())
    }

    fn tuple(port: u16) -> FiveTuple {
        FiveTuple { client: SocketAddr::from(([192, 0, 2, 10], port)), server: SocketAddr::from(([192, 0, 2, 1], 5349)), transport: Transport::Dtls }
    }

    /// A DTLS client of the tests, driven in memory.
    struct Client {
        dtls: Dtls,
        buf: Vec<u8>,
        up: bool,
        plain: Vec<Vec<u8>>,
    }

    impl Client {
        fn new(setup: &DtlsSetup, now: Instant) -> Self {
            Client::with(Dtls::new_auto(setup.config.clone(), setup.cert.clone(), now))
        }

        /// A client that speaks DTLS 1.2 only, as OpenSSL's do.
        fn dtls_1_2(setup: &DtlsSetup, now: Instant) -> Self {
            Client::with(Dtls::new_12(setup.config.clone(), setup.cert.clone(), now))
        }

        fn with(mut dtls: Dtls) -> Self {
            dtls.set_active(true);
            Client { dtls, buf: vec![0; 2048], up: false, plain: Vec::new() }
        }

        /// What the client sends now.
        fn output(&mut self, now: Instant) -> Vec<Vec<u8>> {
            self.dtls.handle_timeout(now).expect("client clock");
            let mut out = Vec::new();
            loop {
                match self.dtls.poll_output(&mut self.buf) {
                    Output::Packet(p) => out.push(p.to_vec()),
                    Output::BufferTooSmall { needed } => self.buf.resize(needed, 0),
                    Output::Connected => self.up = true,
                    Output::ApplicationData(d) => self.plain.push(d.to_vec()),
                    Output::Timeout(_) => return out,
                    _ => {}
                }
            }
        }

        fn input(&mut self, now: Instant, packets: &[Vec<u8>]) {
            self.dtls.handle_timeout(now).expect("client clock");
            for p in packets {
                self.dtls.handle_packet(p).expect("client takes the server's records");
            }
        }
    }

    /// Runs a handshake through `sessions`; true when both sides are up.
    fn handshake(sessions: &mut Sessions, client: &mut Client, t: FiveTuple, now: Instant, metrics: &Metrics) -> bool {
        let mut flight = client.output(now);
        for _ in 0..16 {
            let mut packets = Vec::new();
            let mut plain = Vec::new();
            for p in &flight {
                if sessions.receive(t, now, p, metrics, &mut packets, &mut plain) != Fate::Open {
                    return false;
                }
            }
            client.input(now, &packets);
            flight = client.output(now);
            if client.up && sessions.map.get(&t).is_some_and(|s| s.connected) {
                return true;
            }
        }
        false
    }

    #[test]
    fn the_test_certificate_passes_the_self_check() {
        setup(1).self_check().expect("a handshake with itself");
        let bad = DtlsSetup::new(b"not a certificate".to_vec(), b"not a key".to_vec(), 1, HANDSHAKE_LIMIT, IDLE_LIMIT, IDLE_WITHOUT_ALLOCATION).expect("setup");
        assert!(bad.self_check().is_err(), "garbage fails at start");
    }

    #[test]
    fn records_carry_the_cores_messages_both_ways() {
        let metrics = Metrics::default();
        let mut sessions = Sessions::new(Some(setup(4)));
        let now = Instant::now();
        let t = tuple(1);
        let mut client = Client::new(&setup(4), now);
        assert!(handshake(&mut sessions, &mut client, t, now, &metrics), "handshake");
        assert_eq!(metrics.dtls_handshakes_total.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(metrics.dtls_sessions.load(std::sync::atomic::Ordering::Relaxed), 1);
        client.dtls.send_application_data(b"to the core").expect("send");
        let (mut packets, mut plain) = (Vec::new(), Vec::new());
        for p in client.output(now) {
            assert_eq!(sessions.receive(t, now, &p, &metrics, &mut packets, &mut plain), Fate::Open);
        }
        assert_eq!(plain, vec![b"to the core".to_vec()]);
        let mut sealed = Vec::new();
        assert_eq!(sessions.seal(t, now, b"to the client", &metrics, &mut sealed), Sealed::Sent);
        assert!(sealed.iter().all(|p| !p.windows(6).any(|w| w == b"to the")), "sealed, not in the clear");
        client.input(now, &sealed);
        client.output(now);
        assert_eq!(client.plain, vec![b"to the client".to_vec()]);
        assert_eq!(sessions.seal(tuple(2), now, b"nobody", &metrics, &mut sealed), Sealed::Dropped, "no session, nothing sealed");
        let record_max = vec![0u8; MAX_PLAINTEXT];
        assert_eq!(sessions.seal(t, now, &record_max, &metrics, &mut sealed), Sealed::Sent);
        assert_eq!(sessions.seal(t, now, &[0u8; MAX_PLAINTEXT + 1], &metrics, &mut sealed), Sealed::Dropped, "more than a record holds");
    }

    #[test]
    fn a_full_table_makes_room_from_unverified_sessions_only() {
        let (metrics, s, mut sessions, now) = table(3);
        let mut first = Client::new(&s, now);
        assert!(handshake(&mut sessions, &mut first, tuple(1), now, &metrics));
        let (mut packets, mut plain) = (Vec::new(), Vec::new());
        // Hellos that get no further than the cookie exchange (as forged
        // ones never do): the newest takes the oldest one's place.
        let hello = |at| Client::new(&s, at).output(at).remove(0);
        let at = |ms| now + Duration::from_millis(ms);
        assert_eq!(sessions.receive(tuple(2), at(1), &hello(at(1)), &metrics, &mut packets, &mut plain), Fate::Open);
        assert!(!packets.is_empty() && !packets.iter().any(|p| is_server_hello(p)), "a cookie exchange, not a ServerHello");
        assert_eq!(sessions.receive(tuple(3), at(2), &hello(at(2)), &metrics, &mut packets, &mut plain), Fate::Open);
        assert_eq!(sessions.receive(tuple(4), at(3), &hello(at(3)), &metrics, &mut packets, &mut plain), Fate::Open);
        assert_eq!(sessions.len(), 3);
        let held: Vec<bool> = (1..=4).map(|p| sessions.map.contains_key(&tuple(p))).collect();
        assert_eq!(held, vec![true, false, true, true], "the oldest unverified one went");
        assert_eq!(metrics.dtls_failures_total.load(std::sync::atomic::Ordering::Relaxed), 1);
        // With every session verified, a hello is refused.
        sessions.end(tuple(3), &metrics);
        sessions.end(tuple(4), &metrics);
        let (mut second, mut third) = (Client::new(&s, now), Client::new(&s, now));
        assert!(handshake(&mut sessions, &mut second, tuple(5), now, &metrics));
        assert!(handshake(&mut sessions, &mut third, tuple(6), now, &metrics));
        packets.clear();
        assert_eq!(sessions.receive(tuple(7), now, &hello(now), &metrics, &mut packets, &mut plain), Fate::Refused);
        assert!(packets.is_empty());
        assert_eq!(metrics.dtls_refused_total.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[test]
    fn deadlines_end_handshakes_and_silent_sessions() {
        let (metrics, s, mut sessions, now) = table(8);
        let (mut with, mut without, mut mute) = (Client::new(&s, now), Client::new(&s, now), Client::new(&s, now));
        for (c, t) in [(&mut with, tuple(1)), (&mut without, tuple(2)), (&mut mute, tuple(4))] {
            assert!(handshake(&mut sessions, c, t, now, &metrics));
        }
        assert!(still_works(&mut sessions, &mut with, tuple(1), now, &metrics));
        assert!(still_works(&mut sessions, &mut without, tuple(2), now, &metrics));
        let hello = Client::new(&s, now).output(now).remove(0);
        let (mut packets, mut plain) = (Vec::new(), Vec::new());
        assert_eq!(sessions.receive(tuple(3), now, &hello, &metrics, &mut packets, &mut plain), Fate::Open);
        let mut out = Vec::new();
        let holds = |t: FiveTuple| t == tuple(1);
        assert!(sessions.tick(now + HANDSHAKE_LIMIT / 2, &metrics, &mut out, holds).is_empty());
        let mut ended = sessions.tick(now + HANDSHAKE_LIMIT, &metrics, &mut out, holds);
        ended.sort_by_key(|t| t.client.port());
        assert_eq!(ended, vec![tuple(3), tuple(4)], "the stalled handshake, and the session that never spoke");
        assert_eq!(metrics.dtls_failures_total.load(std::sync::atomic::Ordering::Relaxed), 1, "a handshake that completed is no failure");
        assert_eq!(sessions.tick(now + IDLE_WITHOUT_ALLOCATION, &metrics, &mut out, holds), vec![tuple(2)], "silent, no allocation");
        assert!(sessions.tick(now + IDLE_LIMIT / 2, &metrics, &mut out, holds).is_empty(), "an allocation keeps it");
        assert_eq!(sessions.tick(now + IDLE_LIMIT, &metrics, &mut out, holds), vec![tuple(1)], "silent for the longest lifetime");
        assert_eq!(sessions.len(), 0);
        assert_eq!(metrics.dtls_sessions.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    #[test]
    fn a_session_that_fails_while_sealing_ends() {
        let (metrics, s, mut sessions, now) = table(4);
        let mut client = Client::new(&s, now);
        assert!(handshake(&mut sessions, &mut client, tuple(1), now, &metrics));
        sessions.map.get_mut(&tuple(1)).expect("session").dtls.close().expect("close");
        let mut sealed = Vec::new();
        assert_eq!(sessions.seal(tuple(1), now, b"late", &metrics, &mut sealed), Sealed::Ended);
        assert_eq!(sessions.len(), 0);
    }

    /// A DTLS 1.2 server counts as connected once it has sent its last
    /// flight; if that flight is lost, the client sends its own again, in
    /// plaintext records, which must still reach the engine.
    #[test]
    fn a_dtls_1_2_handshake_survives_a_lost_last_flight() {
        let (metrics, s, mut sessions, now) = table(4);
        let t = tuple(1);
        let mut client = Client::dtls_1_2(&s, now);
        let mut flight = client.output(now);
        let mut lost = false;
        for _ in 0..8 {
            let (mut packets, mut plain) = (Vec::new(), Vec::new());
            for p in &flight {
                assert_eq!(sessions.receive(t, now, p, &metrics, &mut packets, &mut plain), Fate::Open);
            }
            if !lost && sessions.map.get(&t).is_some_and(|s| s.connected) {
                // The server's ChangeCipherSpec and Finished never arrive.
                lost = true;
                packets.clear();
            }
            client.input(now, &packets);
            flight = client.output(now);
            if client.up {
                break;
            }
            if flight.is_empty() {
                // The client's retransmission timer.
                flight = client.output(now + Duration::from_secs(3));
            }
        }
        assert!(lost, "the server reached its last flight");
        assert!(client.up, "the client's retransmitted flight got the server's again");
        assert!(still_works(&mut sessions, &mut client, t, now, &metrics));
    }

    #[test]
    fn only_a_dtls_1_2_or_later_hello_opens_a_session() {
        let metrics = Metrics::default();
        let mut sessions = Sessions::new(Some(setup(4)));
        let now = Instant::now();
        let (mut packets, mut plain) = (Vec::new(), Vec::new());
        // A STUN Binding request, sent to the DTLS port by mistake.
        let stun = [0u8, 1, 0, 0, 0x21, 0x12, 0xA4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
        assert_eq!(sessions.receive(tuple(1), now, &stun, &metrics, &mut packets, &mut plain), Fate::Ignored);
        // A DTLS 1.0 ClientHello: record (version 1.0, epoch 0, sequence 7),
        // handshake header, client_version 1.0, then the rest.
        let mut hello = vec![HANDSHAKE, 0xfe, 0xff, 0, 0, 0, 0, 0, 0, 0, 7, 0, 60];
        hello.extend_from_slice(&[CLIENT_HELLO, 0, 0, 48, 0, 0, 0, 0, 0, 0, 0, 48, 0xfe, 0xff]);
        hello.resize(RECORD_HEADER + HANDSHAKE_HEADER + 48, 0);
        assert_eq!(sessions.receive(tuple(1), now, &hello, &metrics, &mut packets, &mut plain), Fate::Answered);
        assert_eq!(packets, vec![vec![ALERT, 0xfe, 0xff, 0, 0, 0, 0, 0, 0, 0, 7, 0, 2, FATAL, PROTOCOL_VERSION]]);
        assert_eq!(sessions.len(), 0);
        // The same hello at DTLS 1.2 opens one (and gets the cookie exchange).
        hello[RECORD_HEADER + HANDSHAKE_HEADER + 1] = 0xfd;
        assert_eq!(old_version_alert(&hello), None);
        assert!(is_client_hello(&hello));
        hello[RECORD_HEADER + 8] = 1;
        assert!(!is_client_hello(&hello), "a later fragment of a hello opens nothing");
        hello[RECORD_HEADER + 8] = 0;
        hello[3] = 1;
        assert!(!is_client_hello(&hello), "a ClientHello comes in epoch 0");
    }

    /// Sends `data` through an established session and back; true if the
    /// session still carries records both ways.
    fn still_works(sessions: &mut Sessions, client: &mut Client, t: FiveTuple, now: Instant, metrics: &Metrics) -> bool {
        client.dtls.send_application_data(b"ping").expect("send");
        let (mut packets, mut plain) = (Vec::new(), Vec::new());
        for p in client.output(now) {
            if sessions.receive(t, now, &p, metrics, &mut packets, &mut plain) != Fate::Open {
                return false;
            }
        }
        client.plain.clear();
        let mut sealed = Vec::new();
        if plain != vec![b"ping".to_vec()] || sessions.seal(t, now, b"pong", metrics, &mut sealed) != Sealed::Sent {
            return false;
        }
        client.input(now, &sealed);
        client.output(now);
        client.plain == vec![b"pong".to_vec()]
    }

    /// Anyone who knows a client's address can send plaintext records as
    /// that client. Once its records are authenticated, a plaintext record
    /// other than a ClientHello goes nowhere; a ClientHello starts a
    /// successor session, which takes the old one's place only when the
    /// client echoes its cookie: a forged hello gets a cookie exchange sent
    /// to the real client and changes nothing, a restarted client gets a
    /// new session.
    #[test]
    fn a_hello_replaces_an_established_session_only_from_the_address_holder() {
        let (metrics, s, mut sessions, now) = table(4);
        let t = tuple(1);
        let mut client = Client::dtls_1_2(&s, now);
        assert!(handshake(&mut sessions, &mut client, t, now, &metrics));
        assert!(still_works(&mut sessions, &mut client, t, now, &metrics), "authenticated records");
        let (mut packets, mut plain) = (Vec::new(), Vec::new());
        let alert = [21u8, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 9, 0, 2, 2, 40];
        assert_eq!(sessions.receive(t, now, &alert, &metrics, &mut packets, &mut plain), Fate::Ignored, "a forged alert");
        let forged = Client::dtls_1_2(&s, now).output(now).remove(0);
        assert_eq!(sessions.receive(t, now, &forged, &metrics, &mut packets, &mut plain), Fate::Open);
        assert!(!packets.is_empty() && !packets.iter().any(|p| is_server_hello(p)), "only a cookie exchange");
        assert!(still_works(&mut sessions, &mut client, t, now, &metrics), "the session survived the forged hello");
        // The client starts over from the same address.
        let mut again = Client::dtls_1_2(&s, now);
        let mut flight = again.output(now);
        let mut replaced = false;
        for _ in 0..8 {
            packets.clear();
            for p in &flight {
                let fate = sessions.receive(t, now, p, &metrics, &mut packets, &mut plain);
                assert!(matches!(fate, Fate::Open | Fate::Replaced), "{fate:?}");
                replaced |= fate == Fate::Replaced;
            }
            again.input(now, &packets);
            flight = again.output(now);
            if again.up {
                break;
            }
        }
        assert!(replaced && again.up, "the restarted client got a new session");
        assert!(still_works(&mut sessions, &mut again, t, now, &metrics));
        assert_eq!(sessions.len(), 1);
        assert_eq!(metrics.dtls_sessions.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Datagrams shaped like DTLS records, with any content, neither
        /// panic the engine nor end an established session; a new one
        /// opens only for what looks like a ClientHello.
        #[test]
        fn forged_records_never_panic_nor_end_a_session(
            records in proptest::collection::vec(
                (proptest::sample::select(vec![20u8, 21, 22, 23, 25]), proptest::sample::select(vec![[0xfeu8, 0xfd], [0xfe, 0xff], [3, 3]]),
                 0u16..3, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)),
                1..8),
        ) {
            let (metrics, s, mut sessions, now) = table(4);
            let t = tuple(1);
            let mut client = Client::new(&s, now);
            proptest::prop_assert!(handshake(&mut sessions, &mut client, t, now, &metrics));
            proptest::prop_assert!(still_works(&mut sessions, &mut client, t, now, &metrics));
            let (mut packets, mut plain) = (Vec::new(), Vec::new());
            for (kind, version, epoch, body) in &records {
                let mut d = vec![*kind, version[0], version[1]];
                d.extend_from_slice(&epoch.to_be_bytes());
                d.extend_from_slice(&[0, 0, 0, 0, 0, 1]);
                d.extend_from_slice(&(body.len() as u16).to_be_bytes());
                d.extend_from_slice(body);
                let fate = sessions.receive(t, now, &d, &metrics, &mut packets, &mut plain);
                proptest::prop_assert!(fate == Fate::Ignored || fate == Fate::Open, "{fate:?}");
                let fresh = sessions.receive(tuple(2), now, &d, &metrics, &mut packets, &mut plain);
                proptest::prop_assert!(fresh != Fate::Open || is_client_hello(&d), "{fresh:?}");
            }
            proptest::prop_assert!(plain.is_empty(), "forged records carried no plaintext");
            proptest::prop_assert!(still_works(&mut sessions, &mut client, t, now, &metrics));
        }
    }

    #[test]
    fn without_dtls_configured_nothing_opens() {
        let metrics = Metrics::default();
        let mut sessions = Sessions::new(None);
        let now = Instant::now();
        let mut client = Client::new(&setup(1), now);
        let hello = client.output(now);
        let (mut packets, mut plain) = (Vec::new(), Vec::new());
        assert_eq!(sessions.receive(tuple(1), now, &hello[0], &metrics, &mut packets, &mut plain), Fate::Ignored);
        assert!(packets.is_empty());
    }
}
