//! One readiness wait per shard for all of its relay sockets.
//!
//! glommio 0.9 can only wait for one datagram socket at a time (a receive
//! with `MSG_PEEK` through its io_uring), so a shard with many allocations
//! paid one wait, and its system calls, per socket per wake-up. Instead,
//! every relay socket of a shard is in one level-triggered epoll set, and
//! the shard waits for the set as a whole:
//!
//! - a small io_uring of the doorbell's own holds one `POLL_ADD` on the
//!   epoll descriptor, armed only while the shard waits;
//! - that ring signals an eventfd when it posts a completion
//!   (`IORING_REGISTER_EVENTFD`);
//! - glommio reads the eventfd like a file, so the shard's task sleeps in
//!   glommio's own reactor until some relay socket has a datagram.
//!
//! After a wake-up, `epoll_wait` with no timeout lists every ready socket
//! at once. Level-triggered: a socket left with datagrams after a pass is
//! listed again by the next call.
//!
//! Invariant: at most one `POLL_ADD` is in flight (`armed`), and its
//! completion is taken off the ring before the next one is armed, so the
//! eventfd is signalled at most once per wait.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};

use io_uring::{IoUring, opcode, types};

/// Entries of the doorbell's ring (it never holds more than one).
const RING_ENTRIES: u32 = 4;
/// `user_data` of the poll on the epoll set.
const POLL_TOKEN: u64 = u64::MAX;
/// Ready sockets taken per `epoll_wait`.
pub(crate) const READY_MAX: usize = 256;

pub(crate) struct Doorbell {
    epoll: OwnedFd,
    ring: RefCell<IoUring>,
    /// The eventfd the ring signals (registered with it).
    _eventfd: OwnedFd,
    /// A duplicate of the eventfd that glommio reads.
    bell: glommio::io::BufferedFile,
    armed: Cell<bool>,
    events: RefCell<Vec<libc::epoll_event>>,
}

impl Doorbell {
    /// Builds the epoll set, the ring and the eventfd. Must run on the
    /// shard's executor (glommio owns the reading side).
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: plain descriptor-creating calls; each result is checked
        // before it is owned.
        let epoll = unsafe { owned(libc::epoll_create1(libc::EPOLL_CLOEXEC))? };
        let eventfd = unsafe { owned(libc::eventfd(0, libc::EFD_CLOEXEC))? };
        let reader = unsafe { owned(libc::fcntl(eventfd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0))? };
        let ring = IoUring::new(RING_ENTRIES)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        // SAFETY: `reader` is an open descriptor that nothing else owns.
        let bell = unsafe { glommio::io::BufferedFile::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(reader)) };
        Ok(Doorbell {
            epoll,
            ring: RefCell::new(ring),
            _eventfd: eventfd,
            bell,
            armed: Cell::new(false),
            events: RefCell::new(vec![libc::epoll_event { events: 0, u64: 0 }; READY_MAX]),
        })
    }

    /// Adds a socket to the set under `token`.
    pub(crate) fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: token };
        // SAFETY: both descriptors are open; `ev` lives for the call.
        cvt(unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &raw mut ev) })
    }

    /// Takes a socket out of the set (before it is closed, since a clone of
    /// it may keep the descriptor open a while longer).
    pub(crate) fn remove(&self, fd: RawFd) {
        // SAFETY: as in `add`; the event argument may be null for a delete.
        let _ = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
    }

    /// The tokens of the sockets that have something to receive now, into
    /// `out` (cleared first); never waits.
    pub(crate) fn ready(&self, out: &mut Vec<u64>) -> io::Result<()> {
        out.clear();
        let mut events = self.events.borrow_mut();
        let max = libc::c_int::try_from(events.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: the buffer holds `max` events and outlives the call.
        let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), max, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(()) } else { Err(e) };
        }
        out.extend(events.iter().take(n as usize).map(|ev| ev.u64));
        Ok(())
    }

    /// Waits until some socket of the set may have something to receive.
    pub(crate) async fn wait(&self) -> io::Result<()> {
        if !self.armed.get() {
            let sqe = opcode::PollAdd::new(types::Fd(self.epoll.as_raw_fd()), libc::POLLIN as u32).build().user_data(POLL_TOKEN);
            let mut ring = self.ring.borrow_mut();
            // SAFETY: the entry refers to the epoll descriptor only, which
            // lives as long as the ring (both are fields of `self`).
            unsafe { ring.submission().push(&sqe) }.map_err(|_| io::Error::other("doorbell ring full"))?;
            ring.submit()?;
            self.armed.set(true);
        }
        loop {
            self.bell.read_at(0, 8).await.map_err(|e| io::Error::other(e.to_string()))?;
            let mut ring = self.ring.borrow_mut();
            for cqe in ring.completion() {
                if cqe.user_data() == POLL_TOKEN {
                    self.armed.set(false);
                }
            }
            if !self.armed.get() {
                return Ok(());
            }
        }
    }
}

fn cvt(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Owns a descriptor a call returned, or reports its error.
///
/// # Safety
///
/// `fd`, when not negative, must be a fresh descriptor that nothing else owns.
unsafe fn owned(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the caller hands over a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd as _;

    use super::*;

    /// Loopback delivery is synchronous: a datagram is queued when
    /// `send_to` returns, so nothing here waits for the network.
    #[test]
    fn lists_the_sockets_with_datagrams_and_wakes_a_waiter() {
        let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound).make().expect("executor");
        ex.run(async {
            let bell = Doorbell::new().expect("doorbell");
            let socks: Vec<UdpSocket> = (0..3).map(|_| UdpSocket::bind("127.0.0.1:0").expect("bind")).collect();
            for (token, s) in socks.iter().enumerate() {
                s.set_nonblocking(true).expect("nonblocking");
                bell.add(s.as_raw_fd(), token as u64).expect("add");
            }
            let tx = UdpSocket::bind("127.0.0.1:0").expect("bind tx");
            let mut ready = Vec::new();
            bell.ready(&mut ready).expect("epoll_wait");
            assert!(ready.is_empty());

            // A datagram, sent from another thread: the wait returns.
            let to = socks[2].local_addr().expect("addr");
            let tx = std::thread::spawn(move || {
                tx.send_to(b"one", to).expect("send");
                tx
            })
            .join()
            .expect("sender");
            bell.wait().await.expect("wait");
            bell.ready(&mut ready).expect("epoll_wait");
            assert_eq!(ready, [2]);

            // Level-triggered: still listed until read; then gone.
            tx.send_to(b"two", socks[0].local_addr().expect("addr")).expect("send");
            bell.ready(&mut ready).expect("epoll_wait");
            ready.sort_unstable();
            assert_eq!(ready, [0, 2]);
            let mut buf = [0u8; 16];
            socks[2].recv_from(&mut buf).expect("read");
            bell.ready(&mut ready).expect("epoll_wait");
            assert_eq!(ready, [0]);

            // A removed socket is never listed, datagrams or not; a wait
            // with something ready returns at once.
            bell.remove(socks[0].as_raw_fd());
            bell.ready(&mut ready).expect("epoll_wait");
            assert!(ready.is_empty());
            tx.send_to(b"three", socks[1].local_addr().expect("addr")).expect("send");
            bell.wait().await.expect("wait");
            bell.ready(&mut ready).expect("epoll_wait");
            assert_eq!(ready, [1]);
        });
    }
}
