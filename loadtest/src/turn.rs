//! The `turn` scenario: TURN allocations per second and relayed packets per
//! second (with round-trip latency and loss) against any TURN server, over
//! UDP, with long-term credentials from a TURN REST shared secret or from
//! the homeserver's `/voip/turnServer`.
//!
//! Two open-loop drivers run for the load duration:
//! - allocations: each arrival opens a fresh UDP socket, allocates (the 401
//!   challenge, then the signed request), and releases it (Refresh, lifetime
//!   0). Latency: arrival to the allocation's success response.
//! - packets: `relay_allocations` allocations kept open, each with a
//!   permission and a channel to a local echo peer; each arrival sends
//!   `packet_burst` ChannelData packets (1 by default) back to back on one
//!   allocation, each carrying its intended send time, the peer echoes them
//!   back through the relay, and each round trip is recorded. Packets not
//!   back within two seconds of the end are counted lost. With
//!   `packet_gso`, a burst leaves as one UDP GSO message and the echo peer
//!   takes coalesced bursts (`UDP_GRO`) and echoes them as one too
//!   (`udp_gso.rs`).
//!
//! The server must allow loopback peers (the echo peer is on 127.0.0.1).
//!
//! The scenario runs on the first generator thread alone, after the Matrix
//! phases, whatever `threads` says (its default rates are a small part of
//! what one thread sustains).

use crate::config::{Plan, secs};
use crate::http::HttpError;
use crate::matrix::CallError;
use crate::metrics::{Op, Recorder};
use crate::rng::Rng;
use crate::schedule::Schedule;
use crate::stun::{self, Credentials, Request, kind};
use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// How long one STUN transaction may take, retransmissions included.
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(3);
/// Retransmission interval on UDP.
const RETRANSMIT: Duration = Duration::from_millis(500);
/// First channel number.
const CHANNEL: u16 = 0x4000;
/// Receive buffer asked for on the echo peer's socket, which receives every
/// relayed packet of the run: at the default ~200 KiB it overflows after a
/// few milliseconds without a turn on the CPU at peak rates, and those
/// drops would count as the server's loss. The kernel caps it at
/// `net.core.rmem_max` (and doubles it for bookkeeping), so this is at most
/// 8 MiB of kernel memory, used only while the generator falls behind.
const PEER_RECV_BUFFER_BYTES: libc::c_int = 4 << 20;

/// Shared state of the TURN drivers.
pub struct TurnCtx {
    /// The TURN server.
    pub server: SocketAddr,
    /// Username (REST scheme or from the homeserver).
    pub username: String,
    /// Password.
    pub password: String,
    /// The run's recorder.
    pub rec: Rc<RefCell<Recorder>>,
    /// Set on Ctrl-C (by whichever thread sees it).
    pub stop: Arc<AtomicBool>,
    /// Hard end of the run.
    pub deadline: Instant,
    rng: RefCell<Rng>,
    sent: Cell<u64>,
    received: Cell<u64>,
}

impl TurnCtx {
    /// Context for the scenario.
    pub fn new(
        server: SocketAddr,
        username: String,
        password: String,
        rec: Rc<RefCell<Recorder>>,
        stop: Arc<AtomicBool>,
        deadline: Instant,
        seed: u64,
    ) -> Self {
        Self {
            server,
            username,
            password,
            rec,
            stop,
            deadline,
            rng: RefCell::new(Rng::new(seed ^ 0x7475_726E)),
            sent: Cell::new(0),
            received: Cell::new(0),
        }
    }

    fn txid(&self) -> [u8; 12] {
        let mut rng = self.rng.borrow_mut();
        let (a, b) = (rng.next_u64(), rng.next_u64());
        let mut t = [0u8; 12];
        t[..8].copy_from_slice(&a.to_be_bytes());
        t[8..].copy_from_slice(&b.to_be_bytes()[..4]);
        t
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || Instant::now() >= self.deadline
    }
}

/// Asks for a `bytes` receive buffer on `sock`. The kernel silently caps
/// it at `net.core.rmem_max`, so a smaller limit is no error.
fn grow_recv_buffer(sock: &UdpSocket, bytes: libc::c_int) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    crate::udp_gso::set_int_option(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, bytes)
}

fn io_err(e: std::io::Error) -> CallError {
    CallError::Transport(HttpError::Connect(e))
}

/// Sends `msg` and waits for the response with the same transaction id,
/// retransmitting on UDP.
async fn transact(sock: &UdpSocket, msg: &[u8]) -> Result<stun::Response, CallError> {
    let mut txid = [0u8; 12];
    txid.copy_from_slice(&msg[8..20]);
    let deadline = tokio::time::Instant::now() + TRANSACTION_TIMEOUT;
    let mut buf = vec![0u8; 2048];
    loop {
        sock.send(msg).await.map_err(io_err)?;
        let resend_at = (tokio::time::Instant::now() + RETRANSMIT).min(deadline);
        loop {
            match tokio::time::timeout_at(resend_at, sock.recv(&mut buf)).await {
                Ok(Ok(n)) => {
                    if let Ok(r) = stun::parse(&buf[..n])
                        && r.txid == txid
                    {
                        return Ok(r);
                    }
                    // Anything else (stray data, old transactions): ignore.
                }
                Ok(Err(e)) => return Err(io_err(e)),
                Err(_) => break,
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(CallError::Transport(HttpError::Timeout));
        }
    }
}

fn stun_error(r: &stun::Response) -> CallError {
    CallError::Status {
        status: r.error_code.unwrap_or(0),
        errcode: Some("TURN".into()),
    }
}

/// An open allocation.
struct Allocation {
    sock: UdpSocket,
    creds: Credentials,
}

impl Allocation {
    async fn open(t: &TurnCtx) -> Result<Self, CallError> {
        let sock = UdpSocket::bind(if t.server.is_ipv4() {
            "127.0.0.1:0"
        } else {
            "[::1]:0"
        })
        .await
        .map_err(io_err)?;
        sock.connect(t.server).await.map_err(io_err)?;
        let first = transact(
            &sock,
            &Request::new(kind::ALLOCATE, t.txid())
                .udp_transport()
                .finish(),
        )
        .await?;
        if first.is_success() {
            return Err(CallError::Decode(
                "allocation granted without authentication".into(),
            ));
        }
        let (Some(realm), Some(nonce)) = (first.realm.as_deref(), first.nonce.as_deref()) else {
            return Err(stun_error(&first));
        };
        let mut creds = Credentials::new(&t.username, &t.password, realm, nonce);
        // One retry on 438 (stale nonce) with the fresh nonce.
        for _ in 0..2 {
            let req = Request::new(kind::ALLOCATE, t.txid())
                .udp_transport()
                .sign(&creds);
            let r = transact(&sock, &req).await?;
            if r.is_success() {
                return Ok(Self { sock, creds });
            }
            match (r.error_code, r.nonce.as_deref()) {
                (Some(438), Some(nonce)) => {
                    creds = Credentials::new(&t.username, &t.password, realm, nonce)
                }
                _ => return Err(stun_error(&r)),
            }
        }
        Err(CallError::Decode("stale nonce twice".into()))
    }

    async fn request(
        &self,
        t: &TurnCtx,
        build: impl Fn(Request) -> Request,
        kind: u16,
    ) -> Result<(), CallError> {
        let r = transact(
            &self.sock,
            &build(Request::new(kind, t.txid())).sign(&self.creds),
        )
        .await?;
        if r.is_success() {
            Ok(())
        } else {
            Err(stun_error(&r))
        }
    }

    async fn bind_channel(
        &self,
        t: &TurnCtx,
        channel: u16,
        peer: SocketAddr,
    ) -> Result<(), CallError> {
        self.request(t, |r| r.peer(peer), kind::CREATE_PERMISSION)
            .await?;
        self.request(t, |r| r.channel(channel).peer(peer), kind::CHANNEL_BIND)
            .await
    }

    async fn release(&self, t: &TurnCtx) -> Result<(), CallError> {
        self.request(t, |r| r.lifetime(0), kind::REFRESH).await
    }
}

async fn allocate_one(t: Rc<TurnCtx>, intended: Instant) {
    match Allocation::open(&t).await {
        Ok(a) => {
            t.rec
                .borrow_mut()
                .ok(Op::TurnAllocate, intended, Instant::now());
            // Releasing is housekeeping, not measured; a failure only means
            // the allocation expires by itself.
            let _ = a.release(&t).await;
        }
        Err(e) => t.rec.borrow_mut().err(Op::TurnAllocate, intended, &e),
    }
}

/// Payload of a relayed packet: intended send time (µs after the run
/// start), whether it is measured (decided by the sender: the microsecond
/// time alone could round a packet at the warm-up boundary the other way),
/// then padding.
fn packet(t_us: u64, measured: bool, bytes: usize) -> Vec<u8> {
    let mut p = t_us.to_be_bytes().to_vec();
    p.push(u8::from(measured));
    p.resize(bytes.max(9), 0x5A);
    p
}

/// Reads a packet's send time and measured flag.
fn unpacket(p: &[u8]) -> Option<(u64, bool)> {
    let head: [u8; 8] = p.get(..8)?.try_into().ok()?;
    Some((u64::from_be_bytes(head), *p.get(8)? == 1))
}

/// Runs the TURN drivers for the plan's load duration.
pub async fn run(plan: &Plan, t: Rc<TurnCtx>) -> anyhow::Result<()> {
    let start = Instant::now();
    let run_start = t.rec.borrow().start();
    t.rec.borrow_mut().measure_from(start + plan.warmup());
    let duration = plan.load_duration();

    // The echo peer: sends every datagram back where it came from (the
    // relayed address), so it returns to the client through the relay.
    let peer = Rc::new(
        UdpSocket::bind(if t.server.is_ipv4() {
            "127.0.0.1:0"
        } else {
            "[::1]:0"
        })
        .await?,
    );
    grow_recv_buffer(&peer, PEER_RECV_BUFFER_BYTES)?;
    let peer_addr = peer.local_addr()?;
    let gso = plan.turn.packet_gso;
    if gso {
        crate::udp_gso::set_gro(peer.as_raw_fd())?;
    }
    let echo = tokio::task::spawn_local({
        let peer = peer.clone();
        async move {
            let mut buf = vec![0u8; 65536];
            if !gso {
                while let Ok((n, from)) = peer.recv_from(&mut buf).await {
                    let _ = peer.send_to(&buf[..n], from).await;
                }
                return;
            }
            // A coalesced burst goes back as one GSO message of the same
            // datagrams.
            let fd = peer.as_raw_fd();
            loop {
                let received = peer
                    .async_io(Interest::READABLE, || {
                        crate::udp_gso::recv_coalesced(fd, &mut buf)
                    })
                    .await;
                let (n, from, segment) = match received {
                    Ok(r) => r,
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidData => continue,
                    Err(_) => break,
                };
                let bytes = &buf[..n];
                if segment == 0 || segment >= n {
                    let _ = peer.send_to(bytes, from).await;
                    continue;
                }
                let sent = peer
                    .async_io(Interest::WRITABLE, || {
                        crate::udp_gso::send_segments(fd, Some(from), bytes, segment)
                    })
                    .await;
                // Refused as one message (a path that cannot take GSO):
                // one datagram at a time.
                if sent.is_err() {
                    for datagram in bytes.chunks(segment) {
                        let _ = peer.send_to(datagram, from).await;
                    }
                }
            }
        }
    });

    // Setup of the kept allocations is not measured (it is neither the
    // allocation rate nor the relaying), but its failures are reported.
    let mut kept = Vec::new();
    for _ in 0..plan.turn.relay_allocations {
        let setup = async {
            let a = Allocation::open(&t)
                .await
                .map_err(|e| (Op::TurnAllocate, e))?;
            a.bind_channel(&t, CHANNEL, peer_addr)
                .await
                .map_err(|e| (Op::TurnRelay, e))?;
            Ok::<_, (Op, CallError)>(a)
        };
        match setup.await {
            Ok(a) => kept.push(Rc::new(a)),
            Err((op, e)) => {
                let code = crate::metrics::ErrorKey::of(op, &e).code;
                t.rec
                    .borrow_mut()
                    .err_other(op, &format!("setup {code} {e}"), 1);
            }
        }
    }
    if plan.turn.relay_allocations > 0 && kept.is_empty() {
        echo.abort();
        anyhow::bail!(
            "turn: no allocation with a channel to the echo peer could be set up (does the server allow loopback peers?)"
        );
    }

    // Readers: each kept allocation's socket receives the echoed packets.
    let readers: Vec<_> = kept
        .iter()
        .map(|a| {
            let (a, t) = (a.clone(), t.clone());
            tokio::task::spawn_local(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = a.sock.recv(&mut buf).await {
                    let Some((_, payload)) = stun::parse_channel_data(&buf[..n]) else {
                        continue;
                    };
                    let Some((t_us, measured)) = unpacket(payload) else {
                        continue;
                    };
                    let intended = run_start + Duration::from_micros(t_us);
                    if measured {
                        t.received.set(t.received.get() + 1);
                        t.rec
                            .borrow_mut()
                            .ok(Op::TurnRelay, intended, Instant::now());
                    }
                }
            })
        })
        .collect();

    let mut drivers = Vec::new();
    if plan.turn.allocate_rate_per_s > 0.0 {
        let (t, schedule) = (
            t.clone(),
            Schedule::fixed(plan.turn.allocate_rate_per_s, duration),
        );
        drivers.push(tokio::task::spawn_local(async move {
            for offset in schedule.arrivals() {
                if t.stopped() {
                    break;
                }
                let intended = start + offset;
                tokio::time::sleep_until(intended.into()).await;
                tokio::task::spawn_local(allocate_one(t.clone(), intended));
            }
        }));
    }
    if !kept.is_empty() && plan.turn.packet_rate_per_s > 0.0 {
        let burst = plan.turn.packet_burst;
        let (t, schedule, kept) = (
            t.clone(),
            Schedule::fixed(plan.turn.packet_rate_per_s / f64::from(burst), duration),
            kept.clone(),
        );
        let bytes = plan.turn.packet_bytes as usize;
        drivers.push(tokio::task::spawn_local(async move {
            for (i, offset) in schedule.arrivals().enumerate() {
                if t.stopped() {
                    break;
                }
                let intended = start + offset;
                if intended > Instant::now() {
                    tokio::time::sleep_until(intended.into()).await;
                }
                let a = &kept[i % kept.len()];
                // Rounded up, so the time read back is never before the
                // intended one (and never on the warm-up side of it).
                let t_us = intended
                    .saturating_duration_since(run_start)
                    .as_nanos()
                    .div_ceil(1000) as u64;
                let measured = t.rec.borrow().is_measured(intended);
                let datagram = stun::channel_data(CHANNEL, &packet(t_us, measured, bytes));
                if gso {
                    let frames = datagram.repeat(burst as usize);
                    let fd = a.sock.as_raw_fd();
                    match a
                        .sock
                        .async_io(Interest::WRITABLE, || {
                            crate::udp_gso::send_segments(fd, None, &frames, datagram.len())
                        })
                        .await
                    {
                        Ok(_) if measured => t.sent.set(t.sent.get() + u64::from(burst)),
                        Ok(_) => {}
                        // Every packet of the burst failed.
                        Err(e) => {
                            for _ in 0..burst {
                                let e = e.raw_os_error().map_or_else(
                                    || std::io::Error::from(e.kind()),
                                    std::io::Error::from_raw_os_error,
                                );
                                t.rec.borrow_mut().err(Op::TurnRelay, intended, &io_err(e));
                            }
                        }
                    }
                    continue;
                }
                for _ in 0..burst {
                    match a.sock.send(&datagram).await {
                        Ok(_) if measured => t.sent.set(t.sent.get() + 1),
                        Ok(_) => {}
                        Err(e) => t.rec.borrow_mut().err(Op::TurnRelay, intended, &io_err(e)),
                    }
                }
            }
        }));
    }
    for d in drivers {
        let _ = d.await;
    }
    // Late packets: what is not back within two seconds is lost.
    let grace_end = Instant::now() + secs(2.0);
    while t.received.get() < t.sent.get() && Instant::now() < grace_end && !t.stopped() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lost = t.sent.get().saturating_sub(t.received.get());
    t.rec.borrow_mut().err_other(Op::TurnRelay, "lost", lost);
    for r in readers {
        r.abort();
    }
    for a in &kept {
        let _ = a.release(&t).await;
    }
    echo.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_carry_their_send_time() {
        let p = packet(123_456, true, 160);
        assert_eq!(p.len(), 160);
        assert_eq!(unpacket(&p), Some((123_456, true)));
        assert_eq!(unpacket(&packet(1, false, 0)), Some((1, false)));
        assert_eq!(packet(1, false, 0).len(), 9);
        assert_eq!(unpacket(&p[..8]), None);
    }
}
