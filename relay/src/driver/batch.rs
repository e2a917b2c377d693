//! Batched UDP I/O: `recvmmsg(2)` and `sendmmsg(2)` (Linux), so a busy
//! socket costs one receive and one send syscall per batch of datagrams
//! instead of one of each per datagram.
//!
//! The driver drains a socket with non-blocking `recvmmsg` (`MSG_DONTWAIT`)
//! and waits only when its queue is empty: a listener with glommio's
//! io_uring `peek` of one byte (which leaves the datagram queued for the
//! next `recvmmsg`), the relay sockets of a shard all together through its
//! [`super::doorbell`].
//!
//! [`RecvBatch`] holds the receive side: `capacity` slots of [`SLOT_BYTES`],
//! each with [`HEADROOM`] bytes before the datagram so a ChannelData header
//! can be written in place. One `RecvBatch` serves every UDP socket of a
//! shard (listeners and relay sockets): a receive pass never awaits while it
//! holds it, so passes of different sockets never interleave.
//!
//! [`SendQueue`] collects the datagrams a pass produces. `flush` groups them
//! by socket and destination, keeping each destination's order, and hands
//! each socket's datagrams to `sendmmsg`: it resumes after a partial send,
//! skips (and counts) a datagram the kernel refuses, and when a socket's
//! buffer is full it copies the rest out as [`Blocked`] datagrams for the
//! caller to send with glommio's awaiting path once the pass has released
//! the batch. A socket with datagrams already copied out stays blocked for
//! later flushes of the same pass (a queue can fill and flush mid-pass),
//! so nothing overtakes them.
//!
//! UDP GSO: consecutive datagrams to one destination, all of one size but
//! the last (which may be shorter), leave as one message of that
//! `sendmmsg` with a `UDP_SEGMENT` control message. The kernel builds one
//! buffer for them and goes through routing and the device once; the
//! datagrams on the wire are the same. Bursts of one media stream (the
//! packets of a video frame) are such runs. If the kernel refuses a GSO
//! message, the socket's remaining datagrams go one per message, so each is
//! judged on its own. Some refusals belong to one destination (port 0, a
//! small path MTU, an IPsec route), so one refusal never turns GSO off;
//! only [`GSO_REFUSALS_MAX`] of them before any GSO message has gone
//! through (a device without checksum offload) do.
//!
//! UDP GRO: with `gro` on, the shard's UDP sockets have `UDP_GRO` set, so
//! the kernel may hand over several datagrams of one sender, all of one
//! size but the last, as one message with a `UDP_GRO` control message
//! giving that size (a network card coalesces back-to-back datagrams of one
//! flow, up to 64; on loopback a GSO sender's message arrives whole, up to
//! [`GRO_MAX_SEGMENTS`]). A slot holds a whole such message (64 KiB);
//! [`RecvBatch::segments`] splits it back into its datagrams, which the
//! driver handles one by one as if each had arrived alone. A socket with
//! `UDP_GRO` must only be read by a batch made [`RecvBatch::with_gro`]:
//! without the control buffer the kernel flags the message `MSG_CTRUNC`,
//! and it is dropped whole.
//!
//! Passes append to the batch ([`RecvBatch::recv_more`]) until it is
//! flushed and cleared: at the end of a listener's pass, at the end of a
//! round of relay sockets, or before a pass that finds no free slot.
//!
//! Invariant: payloads in the queue point into the receive slots, which
//! are not reused until the queue has been flushed. A datagram received
//! and relayed is not copied, except a ChannelData datagram to a client
//! that was not the first of a coalesced message (its headroom holds the
//! previous datagram, so it is copied with its header).

use std::io;
use std::mem::size_of;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};

/// Bytes in front of each received datagram, for a ChannelData header.
pub(crate) const HEADROOM: usize = 4;
/// Largest datagram received whole (the largest UDP payload IPv4 or IPv6
/// without jumbograms can carry is smaller); longer ones arrive truncated
/// and are dropped.
pub(crate) const DATAGRAM_MAX_BYTES: usize = 65535;
/// One receive slot.
pub(crate) const SLOT_BYTES: usize = HEADROOM + DATAGRAM_MAX_BYTES;
/// Most datagrams per syscall: the kernel's `UIO_MAXIOV` cap on `vlen`.
pub(crate) const BATCH_MAX: usize = crate::config::UDP_BATCH_MAX;
/// Most datagrams in one GSO message (the kernel's `UDP_MAX_SEGMENTS` is 64
/// on the oldest kernels that have GSO, 128 on newer ones).
pub(crate) const GSO_MAX_SEGMENTS: usize = 64;
/// Most datagrams in one received message: a network card's GRO coalesces
/// at most 64, a local GSO sender's message (loopback) up to the kernel's
/// `UDP_MAX_SEGMENTS`, 128 on newer kernels.
pub(crate) const GRO_MAX_SEGMENTS: usize = 128;
/// Largest datagram sent as a GSO segment: with IPv6 and UDP headers it
/// fits the IPv6 minimum MTU of 1280 bytes. The kernel refuses segments
/// that would need IP fragmentation; larger datagrams go one at a time.
pub(crate) const GSO_SEGMENT_MAX_BYTES: usize = 1232;
/// Most payload bytes in one GSO message (an IP packet holds under 64 KiB).
pub(crate) const GSO_MAX_BYTES: usize = 60_000;
/// GSO refusals (of the kinds [`gso_refusal`] lists) after which a queue
/// that has never had a GSO message go through stops trying.
pub(crate) const GSO_REFUSALS_MAX: u32 = 8;
/// Room for one control message carrying a `u16` (`CMSG_SPACE(2)` is 24
/// bytes on 64-bit Linux, 16 on 32-bit), 8-aligned as `cmsghdr` needs.
type SegmentCmsg = [u64; 4];
/// Room for the one control message a receive asks for: `UDP_GRO` with a
/// `c_int` (`CMSG_SPACE(4)` is 24 bytes on 64-bit Linux), 8-aligned. A
/// socket option that adds control messages (`IP_PKTINFO`, timestamps)
/// needs more room, or every coalesced message arrives cut (`MSG_CTRUNC`).
type GroCmsg = [u64; 4];

/// Receive slots and the `recvmmsg` headers that point into them.
pub(crate) struct RecvBatch {
    /// `capacity` slots of [`SLOT_BYTES`].
    buf: Vec<u8>,
    names: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    /// Per received message: length, `msg_flags`, sender address length,
    /// and the size of its datagrams when the kernel coalesced several (0
    /// when it holds one).
    meta: Vec<(usize, libc::c_int, libc::socklen_t, usize)>,
    len: usize,
    /// Per slot, room for the `UDP_GRO` control message (with `gro` only).
    cmsgs: Vec<GroCmsg>,
    /// Whether receives ask for the `UDP_GRO` control message: the sockets
    /// read through this batch have `UDP_GRO` set.
    gro: bool,
}

impl RecvBatch {
    /// Slots for `capacity` datagrams (clamped to 1..=[`BATCH_MAX`]); costs
    /// `capacity` × [`SLOT_BYTES`] plus ~200 bytes of headers per slot.
    pub(crate) fn new(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, BATCH_MAX);
        RecvBatch {
            buf: vec![0; capacity * SLOT_BYTES],
            names: vec![zeroed_storage(); capacity],
            iovs: Vec::with_capacity(capacity),
            hdrs: Vec::with_capacity(capacity),
            meta: vec![(0, 0, 0, 0); capacity],
            len: 0,
            cmsgs: vec![[0; 4]; capacity],
            gro: false,
        }
    }

    /// A batch without slots, for a send queue that holds only owned
    /// payloads (`Payload::Owned`); never received into.
    pub(crate) fn without_slots() -> Self {
        RecvBatch { buf: Vec::new(), names: Vec::new(), iovs: Vec::new(), hdrs: Vec::new(), meta: Vec::new(), len: 0, cmsgs: Vec::new(), gro: false }
    }

    /// Reads coalesced messages (`UDP_GRO`) correctly: every socket read
    /// through a batch must have `UDP_GRO` set only if the batch has this
    /// on, or a coalesced message would be taken for one datagram.
    pub(crate) fn with_gro(mut self, gro: bool) -> Self {
        self.gro = gro;
        self
    }

    /// Datagrams one `recv` can return.
    pub(crate) fn capacity(&self) -> usize {
        self.meta.len()
    }

    /// Datagrams held from the last `recv`.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Receives up to `capacity` datagrams from `fd` without blocking, into
    /// an emptied batch (tests; the driver appends with `recv_more`). An empty queue is `Err` of kind `WouldBlock`; on
    /// `Ok(n)`, `n >= 1` and the datagrams are `0..n`.
    #[cfg(test)]
    pub(crate) fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.clear();
        self.recv_more(fd).map(|r| r.len())
    }

    /// Slots not holding a datagram since the last [`Self::clear`].
    pub(crate) fn free(&self) -> usize {
        self.capacity() - self.len
    }

    /// Forgets every datagram held: call it only once nothing queued refers
    /// to the slots (after a flush).
    pub(crate) fn clear(&mut self) {
        self.len = 0;
    }

    /// Receives up to [`Self::free`] datagrams from `fd` without blocking,
    /// after those already held, and returns their indexes. An empty queue,
    /// or no free slot, is `Err` of kind `WouldBlock`.
    pub(crate) fn recv_more(&mut self, fd: RawFd) -> io::Result<std::ops::Range<usize>> {
        let first = self.len;
        let free = self.free();
        if free == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.iovs.clear();
        for slot in self.buf.chunks_exact_mut(SLOT_BYTES).skip(first) {
            let data = &mut slot[HEADROOM..];
            self.iovs.push(libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: data.len() });
        }
        self.hdrs.clear();
        for ((iov, name), cmsg) in self.iovs.iter_mut().zip(self.names.iter_mut().skip(first)).zip(self.cmsgs.iter_mut().skip(first)) {
            let mut h = mmsghdr_for(name, size_of::<libc::sockaddr_storage>(), iov);
            if self.gro {
                h.msg_hdr.msg_control = cmsg.as_mut_ptr().cast();
                h.msg_hdr.msg_controllen = size_of::<GroCmsg>() as _;
            }
            self.hdrs.push(h);
        }
        // At most BATCH_MAX, so it fits.
        let vlen = free as libc::c_uint;
        // SAFETY: every header points at its own `sockaddr_storage`, at one
        // iovec over a distinct, live, free slot of `buf` and (with `gro`)
        // at its slot's own 8-aligned control buffer, whose length was set
        // afresh above; none of them moves or is touched during the call.
        let rc = unsafe { libc::recvmmsg(fd, self.hdrs.as_mut_ptr(), vlen, libc::MSG_DONTWAIT, std::ptr::null_mut()) };
        let n = usize::try_from(rc).map_err(|_| io::Error::last_os_error())?;
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = n.min(free);
        for (meta, hdr) in self.meta.iter_mut().skip(first).zip(&self.hdrs).take(n) {
            let segment = if self.gro { gro_segment(&hdr.msg_hdr) } else { 0 };
            *meta = (hdr.msg_len as usize, hdr.msg_hdr.msg_flags, hdr.msg_hdr.msg_namelen, segment);
        }
        self.len = first + n;
        Ok(first..first + n)
    }

    /// The `i`-th received datagram and its sender; `None` if it was
    /// truncated or its sender is not an IP address.
    pub(crate) fn datagram(&self, i: usize) -> Option<(SocketAddr, &[u8])> {
        if i >= self.len {
            return None;
        }
        let (n, flags, namelen, _) = self.meta[i];
        // A cut control message may have lost a coalesced message's
        // datagram size.
        if flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 || n > DATAGRAM_MAX_BYTES {
            return None;
        }
        let from = from_storage(&self.names[i], namelen)?;
        let start = i * SLOT_BYTES + HEADROOM;
        Some((from, &self.buf[start..start + n]))
    }

    /// `len` bytes at `start` of message `i` (a datagram of
    /// [`Self::segments`]); empty if out of range.
    pub(crate) fn segment(&self, i: usize, start: usize, len: usize) -> &[u8] {
        if i >= self.len || start + len > self.meta[i].0 {
            return &[];
        }
        let at = i * SLOT_BYTES + HEADROOM + start;
        &self.buf[at..at + len]
    }

    /// The datagrams of message `i`, as (offset, length) in the bytes
    /// [`Self::datagram`] returns: one for a message the kernel did not
    /// coalesce (an empty one included), several for one it did.
    pub(crate) fn segments(&self, i: usize) -> Segments {
        let (len, _, _, size) = self.meta.get(i).copied().unwrap_or_default();
        Segments { at: 0, len, size: if size == 0 || size >= len { len.max(1) } else { size }, done: i >= self.len }
    }

    /// Writes `header` in the headroom of datagram `i` and returns the
    /// header and datagram as one queued payload (ChannelData to a client).
    #[cfg(test)]
    pub(crate) fn prepend(&mut self, i: usize, header: [u8; HEADROOM]) -> Option<Payload> {
        let len = self.meta.get(i)?.0;
        self.prepend_segment(i, 0, len, header)
    }

    /// `header` followed by the `len` bytes at `start` of message `i` (a
    /// datagram of [`Self::segments`]), as one queued payload (ChannelData
    /// to a client). The first datagram of a slot gets the header written
    /// in its headroom; a later one of a coalesced message has its previous
    /// datagram's bytes there, so it is copied.
    pub(crate) fn prepend_segment(&mut self, i: usize, start: usize, len: usize, header: [u8; HEADROOM]) -> Option<Payload> {
        if i >= self.len || start + len > self.meta[i].0 {
            return None;
        }
        let slot = i * SLOT_BYTES;
        if start == 0 {
            self.buf[slot..slot + HEADROOM].copy_from_slice(&header);
            return Some(Payload::Slot { index: i, start: 0, len: HEADROOM + len });
        }
        let at = slot + HEADROOM + start;
        let mut v = Vec::with_capacity(HEADROOM + len);
        v.extend_from_slice(&header);
        v.extend_from_slice(&self.buf[at..at + len]);
        Some(Payload::Owned(v))
    }

    /// `part`, a sub-slice of datagram `i`, as a queued payload: a reference
    /// into the slot, or a copy if `part` lies elsewhere.
    pub(crate) fn locate(&self, i: usize, part: &[u8]) -> Payload {
        let slot_start = self.buf.as_ptr() as usize + i * SLOT_BYTES;
        let offset = (part.as_ptr() as usize).checked_sub(slot_start);
        match offset {
            Some(start) if i < self.len && start >= HEADROOM && start + part.len() <= HEADROOM + self.meta[i].0 => {
                Payload::Slot { index: i, start, len: part.len() }
            }
            _ => Payload::Owned(part.to_vec()),
        }
    }

    /// The bytes of a queued payload.
    pub(crate) fn bytes<'a>(&'a self, payload: &'a Payload) -> &'a [u8] {
        match payload {
            Payload::Slot { index, start, len } => {
                let at = index * SLOT_BYTES + start;
                self.buf.get(at..at + len).unwrap_or(&[])
            }
            Payload::Owned(v) => v,
        }
    }
}

/// The datagrams of one received message, as (offset, length).
#[derive(Debug, Clone)]
pub(crate) struct Segments {
    at: usize,
    len: usize,
    /// Datagram size (at least 1).
    size: usize,
    done: bool,
}

impl Segments {
    /// How many datagrams are left.
    pub(crate) fn remaining(&self) -> usize {
        if self.done { 0 } else { (self.len - self.at).div_ceil(self.size).max(1) }
    }
}

impl Iterator for Segments {
    type Item = (usize, usize);

    fn next(&mut self) -> Option<(usize, usize)> {
        if self.done {
            return None;
        }
        let start = self.at;
        let n = self.size.min(self.len - start);
        self.at += n;
        self.done = self.at >= self.len;
        Some((start, n))
    }
}

/// Bytes of an outgoing datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Payload {
    /// `len` bytes at `start` of receive slot `index` (offset 0 is the
    /// headroom).
    Slot {
        /// Slot.
        index: usize,
        /// Offset in the slot.
        start: usize,
        /// Length.
        len: usize,
    },
    /// Bytes made by the core (a STUN response, a Data indication).
    Owned(Vec<u8>),
}

/// A datagram whose socket buffer was full: sent later by awaiting.
#[derive(Debug)]
pub(crate) struct Blocked<S> {
    /// Socket to send on.
    pub(crate) sock: S,
    /// Destination.
    pub(crate) to: SocketAddr,
    /// The datagram.
    pub(crate) bytes: Vec<u8>,
}

/// What a flush did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Flushed {
    /// Datagrams the kernel took.
    pub(crate) sent: usize,
    /// Datagrams the kernel refused (dropped; count them).
    pub(crate) failed: usize,
    /// Datagrams copied out as [`Blocked`].
    pub(crate) blocked: usize,
    /// `sendmmsg` calls made.
    pub(crate) calls: usize,
    /// Of `sent`, datagrams that left as segments of GSO messages.
    pub(crate) gso_sent: usize,
    /// This flush made the queue give GSO up: it sends one datagram per
    /// message from now on.
    pub(crate) gso_refused: bool,
}

/// Outgoing datagrams of one pass, flushed with `sendmmsg`.
pub(crate) struct SendQueue<S> {
    /// (socket, destination, payload), in the order the core produced them.
    entries: Vec<(S, SocketAddr, Payload)>,
    capacity: usize,
    names: Vec<libc::sockaddr_storage>,
    namelens: Vec<usize>,
    /// One per entry, in entry order (a GSO message takes a run of them).
    iovs: Vec<libc::iovec>,
    /// The messages of one socket's call: each covers `groups[k]`.
    hdrs: Vec<libc::mmsghdr>,
    /// Per message: its first entry and how many entries it carries.
    groups: Vec<(usize, usize)>,
    /// Per message: its `UDP_SEGMENT` control message (GSO messages only).
    cmsgs: Vec<SegmentCmsg>,
    /// Whether runs to one destination leave as GSO messages.
    gso: bool,
    /// Whether a GSO message has ever gone through.
    gso_worked: bool,
    /// GSO refusals so far, while none has gone through.
    gso_refusals: u32,
}

impl<S: AsRawFd + Clone> SendQueue<S> {
    /// Room for `capacity` datagrams (clamped to 1..=[`BATCH_MAX`]); `gso`
    /// lets runs of datagrams to one destination leave as one GSO message.
    pub(crate) fn new(capacity: usize, gso: bool) -> Self {
        let capacity = capacity.clamp(1, BATCH_MAX);
        SendQueue {
            entries: Vec::with_capacity(capacity),
            capacity,
            names: vec![zeroed_storage(); capacity],
            namelens: vec![0; capacity],
            iovs: Vec::with_capacity(capacity),
            hdrs: Vec::with_capacity(capacity),
            groups: Vec::with_capacity(capacity),
            cmsgs: vec![[0; 4]; capacity],
            gso,
            gso_worked: false,
            gso_refusals: 0,
        }
    }

    /// Whether runs to one destination still leave as GSO messages.
    #[cfg(test)]
    pub(crate) fn gso(&self) -> bool {
        self.gso
    }

    /// True when the next `push` needs a `flush` first.
    pub(crate) fn is_full(&self) -> bool {
        self.entries.len() >= self.capacity
    }

    /// Queues a datagram. The caller flushes when [`Self::is_full`]; a push
    /// onto a full queue returns the entry back.
    pub(crate) fn push(&mut self, sock: S, to: SocketAddr, payload: Payload) -> Result<(), (S, SocketAddr, Payload)> {
        if self.is_full() {
            return Err((sock, to, payload));
        }
        self.entries.push((sock, to, payload));
        Ok(())
    }

    /// Sends every queued datagram with `sendmmsg`, one call per run of
    /// datagrams on the same socket (more after a partial send), and empties
    /// the queue. Datagrams to one destination leave in the order they were
    /// queued; with GSO on, runs of them share a message. Where the socket
    /// buffer is full (`WouldBlock`), that socket's remaining datagrams are
    /// copied into `blocked`; so are all of a socket that already has
    /// datagrams there (copied out by an earlier flush of the same pass).
    ///
    /// `sendmmsg` is the syscall (see [`sendmmsg_dontwait`]); tests pass a
    /// fake to exercise partial sends and errors.
    pub(crate) fn flush(
        &mut self,
        recv: &RecvBatch,
        blocked: &mut Vec<Blocked<S>>,
        mut sendmmsg: impl FnMut(RawFd, &mut [libc::mmsghdr]) -> io::Result<usize>,
    ) -> Flushed {
        let mut done = Flushed::default();
        if self.entries.is_empty() {
            return done;
        }
        // Stable: each destination's datagrams keep their order (UDP keeps
        // none between destinations), and runs to one destination are
        // adjacent for GSO.
        self.entries.sort_by_key(|(sock, to, _)| (sock.as_raw_fd(), *to));
        self.iovs.clear();
        for (k, (_, to, payload)) in self.entries.iter().enumerate() {
            self.namelens[k] = to_storage(*to, &mut self.names[k]);
            let bytes = recv.bytes(payload);
            // sendmmsg only reads through iov_base; the pointer is mutable
            // because struct iovec is shared with the receive side.
            self.iovs.push(libc::iovec { iov_base: bytes.as_ptr().cast_mut().cast(), iov_len: bytes.len() });
        }
        let n = self.entries.len();
        let mut run = 0;
        while run < n {
            let fd = self.entries[run].0.as_raw_fd();
            let end = self.entries[run..].iter().position(|(s, _, _)| s.as_raw_fd() != fd).map_or(n, |k| run + k);
            // Datagrams of this socket copied out by an earlier flush of the
            // pass are still waiting: these go after them.
            if blocked.iter().any(|b| b.sock.as_raw_fd() == fd) {
                for (sock, to, payload) in &self.entries[run..end] {
                    blocked.push(Blocked { sock: sock.clone(), to: *to, bytes: recv.bytes(payload).to_vec() });
                }
                done.blocked += end - run;
                run = end;
                continue;
            }
            let mut pos = run;
            let mut gso = self.gso;
            'messages: while pos < end {
                let built = self.build_messages(pos, end, gso);
                let mut m = 0;
                while m < built {
                    done.calls += 1;
                    match sendmmsg(fd, &mut self.hdrs[m..built]) {
                        Ok(k) if k > 0 => {
                            let k = k.min(built - m);
                            for &(_, count) in &self.groups[m..m + k] {
                                done.sent += count;
                                if count > 1 {
                                    done.gso_sent += count;
                                    self.gso_worked = true;
                                }
                            }
                            m += k;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            let first = self.groups[m].0;
                            for (sock, to, payload) in &self.entries[first..end] {
                                blocked.push(Blocked { sock: sock.clone(), to: *to, bytes: recv.bytes(payload).to_vec() });
                            }
                            done.blocked += end - first;
                            break 'messages;
                        }
                        // The kernel refused the first message of the call
                        // (sendmmsg reports an error only when nothing was
                        // sent; a call that makes no progress would loop).
                        refused => {
                            let (first, count) = self.groups[m];
                            if count > 1 {
                                // Send the rest of this socket's datagrams
                                // one at a time, so that each is judged on
                                // its own; give GSO up for good only when
                                // it has never worked and keeps being
                                // refused.
                                if !self.gso_worked && refused.is_err_and(|e| gso_refusal(&e)) {
                                    self.gso_refusals += 1;
                                    if self.gso && self.gso_refusals >= GSO_REFUSALS_MAX {
                                        self.gso = false;
                                        done.gso_refused = true;
                                    }
                                }
                                gso = false;
                                pos = first;
                                continue 'messages;
                            }
                            done.failed += 1;
                            m += 1;
                        }
                    }
                }
                break;
            }
            run = end;
        }
        self.hdrs.clear();
        self.iovs.clear();
        self.entries.clear();
        done
    }

    /// Builds the messages for entries `from..to` (one socket's): one per
    /// datagram, or with `gso` one per run to a destination. Returns how
    /// many.
    fn build_messages(&mut self, from: usize, to: usize, gso: bool) -> usize {
        self.groups.clear();
        let mut i = from;
        while i < to {
            let count = if gso { self.gso_run(i, to) } else { 1 };
            self.groups.push((i, count));
            i += count;
        }
        self.hdrs.clear();
        // Raw pointers taken once: the headers keep pointers to several
        // elements of each of these, which must all stay valid together.
        let names = self.names.as_mut_ptr();
        let iovs = self.iovs.as_mut_ptr();
        let cmsgs = self.cmsgs.as_mut_ptr();
        for (k, &(first, count)) in self.groups.iter().enumerate() {
            // SAFETY: mmsghdr is plain old data; null pointers and zero
            // lengths are valid, and the fields that matter are set below.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            // SAFETY: `first + count <= entries.len()`, and `names`, `iovs`
            // hold an element per entry; `k < groups.len() <= capacity`,
            // the length of `cmsgs`. None of the three is resized until the
            // headers are dropped.
            unsafe {
                h.msg_hdr.msg_name = names.add(first).cast();
                h.msg_hdr.msg_iov = iovs.add(first);
            }
            // At most size_of::<sockaddr_storage>() (128).
            h.msg_hdr.msg_namelen = self.namelens[first] as libc::socklen_t;
            // The run's iovecs are adjacent, in entry order.
            h.msg_hdr.msg_iovlen = count as _;
            if count > 1 {
                // SAFETY: as above. The segment size is at most
                // GSO_SEGMENT_MAX_BYTES, so it fits a u16. CMSG_SPACE only
                // computes a size; the buffer is large enough for one
                // control message with a u16, and 8-aligned. CMSG_FIRSTHDR
                // of a header whose control buffer is that large is its
                // start; CMSG_DATA points inside it.
                unsafe {
                    let segment = (*iovs.add(first)).iov_len as u16;
                    h.msg_hdr.msg_control = cmsgs.add(k).cast();
                    h.msg_hdr.msg_controllen = libc::CMSG_SPACE(size_of::<u16>() as u32) as _;
                    let c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = libc::UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), segment);
                }
            }
            self.hdrs.push(h);
        }
        self.groups.len()
    }

    /// How many datagrams from entry `i` (before `to`) one GSO message can
    /// carry: they go to one destination, none is empty or larger than
    /// [`GSO_SEGMENT_MAX_BYTES`], all have the first one's size except the
    /// last, which may be shorter; at most [`GSO_MAX_SEGMENTS`] and
    /// [`GSO_MAX_BYTES`].
    fn gso_run(&self, i: usize, to: usize) -> usize {
        let size = self.iovs[i].iov_len;
        if size == 0 || size > GSO_SEGMENT_MAX_BYTES {
            return 1;
        }
        let dest = self.entries[i].1;
        let (mut count, mut total) = (1, size);
        for j in i + 1..to {
            let len = self.iovs[j].iov_len;
            if count == GSO_MAX_SEGMENTS || self.entries[j].1 != dest || len == 0 || len > size || total + len > GSO_MAX_BYTES {
                break;
            }
            count += 1;
            total += len;
            if len < size {
                break;
            }
        }
        count
    }
}

/// Whether a refusal of a GSO message may be GSO's own: `EIO` (a device
/// that computes no checksums, which GSO needs; also an IPsec route),
/// `EINVAL` (a segment over the path MTU; also destination port 0),
/// `ENOPROTOOPT`, `EOPNOTSUPP`. Other errors (an unreachable destination)
/// belong to the datagrams.
fn gso_refusal(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT | libc::EOPNOTSUPP))
}

/// `sendmmsg(fd, hdrs, MSG_DONTWAIT)`: the number of datagrams sent.
///
/// # Safety
///
/// Every header must point at a live address and live iovecs over live
/// buffers for the duration of the call (as [`SendQueue::flush`] builds
/// them).
pub(crate) unsafe fn sendmmsg_dontwait(fd: RawFd, hdrs: &mut [libc::mmsghdr]) -> io::Result<usize> {
    let vlen = libc::c_uint::try_from(hdrs.len().min(BATCH_MAX)).unwrap_or(1);
    // SAFETY: the caller guarantees the headers are valid; `vlen` does not
    // exceed the slice.
    let rc = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), vlen, libc::MSG_DONTWAIT) };
    usize::try_from(rc).map_err(|_| io::Error::last_os_error())
}

/// The datagram size a received message's `UDP_GRO` control message gives
/// (0 without one: the message is one datagram).
fn gro_segment(hdr: &libc::msghdr) -> usize {
    if hdr.msg_control.is_null() {
        return 0;
    }
    // SAFETY: the kernel filled `msg_control` up to `msg_controllen` with
    // whole control messages; CMSG_FIRSTHDR/NXTHDR stay inside that and
    // return null at its end, and CMSG_DATA of a `UDP_GRO` message points
    // at its c_int (read unaligned).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(hdr);
        while !c.is_null() {
            let whole = (*c).cmsg_len as usize >= libc::CMSG_LEN(size_of::<libc::c_int>() as u32) as usize;
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO && whole {
                let size = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return usize::try_from(size).unwrap_or(0);
            }
            c = libc::CMSG_NXTHDR(hdr, c);
        }
    }
    0
}

/// Asks the kernel to hand over coalesced datagrams (`UDP_GRO`).
pub(crate) fn set_gro(fd: RawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: the option value is a c_int whose size is passed with it; a
    // bad descriptor is an error, not undefined behaviour.
    let rc = unsafe { libc::setsockopt(fd, libc::SOL_UDP, libc::UDP_GRO, (&raw const on).cast(), size_of::<libc::c_int>() as libc::socklen_t) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

fn zeroed_storage() -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid
    // (AF_UNSPEC) value.
    unsafe { std::mem::zeroed() }
}

fn mmsghdr_for(name: &mut libc::sockaddr_storage, namelen: usize, iov: &mut libc::iovec) -> libc::mmsghdr {
    // SAFETY: mmsghdr is plain old data; null pointers and zero lengths are
    // valid, and the fields that matter are set below.
    let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
    h.msg_hdr.msg_name = (name as *mut libc::sockaddr_storage).cast();
    // At most size_of::<sockaddr_storage>() (128).
    h.msg_hdr.msg_namelen = namelen as libc::socklen_t;
    h.msg_hdr.msg_iov = iov;
    h.msg_hdr.msg_iovlen = 1;
    h
}

/// Writes `addr` as a `sockaddr_in`/`sockaddr_in6`; returns its length.
fn to_storage(addr: SocketAddr, out: &mut libc::sockaddr_storage) -> usize {
    *out = zeroed_storage();
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and
            // aligned for every socket address type.
            unsafe { std::ptr::write((out as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((out as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    }
}

/// Reads a sender address the kernel wrote; `None` for other families.
fn from_storage(s: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match libc::c_int::from(s.ss_family) {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family and length say the storage holds a
            // sockaddr_in; sockaddr_storage is aligned for it.
            let sin = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(sin6.sin6_port), sin6.sin6_flowinfo, sin6.sin6_scope_id)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests;
