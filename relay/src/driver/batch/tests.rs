//! Tests of the batched UDP path: real `recvmmsg`/`sendmmsg` on loopback
//! sockets, and a fake `sendmmsg` for partial sends, refused datagrams and
//! full socket buffers.
//!
//! Loopback delivery is synchronous (a datagram is in the receiver's queue
//! when `send_to` returns), so nothing here waits for packets to arrive.

use std::net::UdpSocket;
use std::rc::Rc;
use std::time::Duration;

use super::*;

fn pair() -> (UdpSocket, UdpSocket) {
    let rx = UdpSocket::bind("127.0.0.1:0").expect("bind rx");
    let tx = UdpSocket::bind("127.0.0.1:0").expect("bind tx");
    (rx, tx)
}

/// Datagram `seq`: its number, then `seq % 7` filler bytes (one is empty
/// of filler, so lengths differ from slot to slot).
fn datagram(seq: u32) -> Vec<u8> {
    let mut v = seq.to_be_bytes().to_vec();
    v.extend(std::iter::repeat_n(0xA5, (seq % 7) as usize));
    v
}

/// Receives everything queued on `rx` through `batch`, one `recv` at a time.
fn drain(batch: &mut RecvBatch, rx: &UdpSocket) -> (Vec<(SocketAddr, Vec<u8>)>, Vec<usize>) {
    let mut got = Vec::new();
    let mut sizes = Vec::new();
    loop {
        match batch.recv(rx.as_raw_fd()) {
            Ok(n) => {
                assert_eq!(n, batch.len());
                sizes.push(n);
                for i in 0..n {
                    let (from, bytes) = batch.datagram(i).expect("whole datagram from an IP sender");
                    got.push((from, bytes.to_vec()));
                }
            }
            Err(e) => {
                assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
                return (got, sizes);
            }
        }
    }
}

/// A round of passes over several sockets appends to one batch: each
/// socket's datagrams land after the last, at their own indexes, until no
/// slot is free; `clear` starts over.
#[test]
fn recv_more_appends_the_datagrams_of_several_sockets() {
    let (a, tx) = pair();
    let b = UdpSocket::bind("127.0.0.1:0").expect("bind b");
    for seq in 0..2 {
        tx.send_to(&datagram(seq), a.local_addr().expect("addr")).expect("send");
    }
    for seq in 10..14 {
        tx.send_to(&datagram(seq), b.local_addr().expect("addr")).expect("send");
    }
    let mut batch = RecvBatch::new(5);
    assert_eq!(batch.recv_more(a.as_raw_fd()).expect("two queued"), 0..2);
    assert_eq!(batch.free(), 3);
    // Only three slots are left for b's four datagrams.
    assert_eq!(batch.recv_more(b.as_raw_fd()).expect("four queued"), 2..5);
    assert_eq!(batch.free(), 0);
    assert_eq!(batch.recv_more(b.as_raw_fd()).map_err(|e| e.kind()), Err(io::ErrorKind::WouldBlock), "no free slot");
    let seqs: Vec<Vec<u8>> = (0..5).map(|i| batch.datagram(i).expect("held").1.to_vec()).collect();
    assert_eq!(seqs, [0, 1, 10, 11, 12].map(datagram));
    assert_eq!(batch.datagram(5), None);
    batch.clear();
    assert_eq!(batch.datagram(0), None, "cleared");
    assert_eq!(batch.recv_more(b.as_raw_fd()).expect("the fourth is still queued"), 0..1);
    assert_eq!(batch.datagram(0).expect("held").1, datagram(13));
}

#[test]
fn recv_drains_more_than_one_batch_in_order() {
    let (rx, tx) = pair();
    let mut batch = RecvBatch::new(4);
    assert_eq!(batch.capacity(), 4);
    // Empty queue: WouldBlock, not a zero-length batch.
    assert_eq!(batch.recv(rx.as_raw_fd()).map_err(|e| e.kind()), Err(io::ErrorKind::WouldBlock));
    let total = 3 * 4 + 3;
    for seq in 0..total {
        tx.send_to(&datagram(seq), rx.local_addr().expect("addr")).expect("send");
    }
    // A zero-length datagram is a datagram too.
    tx.send_to(&[], rx.local_addr().expect("addr")).expect("send empty");
    let (got, sizes) = drain(&mut batch, &rx);
    assert_eq!(sizes, vec![4, 4, 4, 4], "three full batches, then the rest");
    let want: Vec<Vec<u8>> = (0..total).map(datagram).chain([Vec::new()]).collect();
    assert_eq!(got.iter().map(|(_, b)| b.clone()).collect::<Vec<_>>(), want);
    let from = tx.local_addr().expect("addr");
    assert!(got.iter().all(|(f, _)| *f == from));
}

#[test]
fn capacity_is_bounded() {
    assert_eq!(RecvBatch::new(0).capacity(), 1);
    assert_eq!(RecvBatch::new(1 << 20).capacity(), BATCH_MAX);
}

#[test]
fn prepend_and_locate_point_into_the_slot() {
    let (rx, tx) = pair();
    let mut batch = RecvBatch::new(2);
    tx.send_to(b"first", rx.local_addr().expect("addr")).expect("send");
    tx.send_to(b"second!", rx.local_addr().expect("addr")).expect("send");
    assert_eq!(batch.recv(rx.as_raw_fd()).expect("two queued"), 2);
    // A sub-slice of the datagram stays a reference into its slot.
    let (_, data) = batch.datagram(1).expect("datagram");
    let part = batch.locate(1, &data[2..5]);
    assert_eq!(part, Payload::Slot { index: 1, start: HEADROOM + 2, len: 3 });
    assert_eq!(batch.bytes(&part), b"con");
    // Bytes from elsewhere, or from another slot than named, are copied.
    let foreign = b"elsewhere".to_vec();
    assert_eq!(batch.locate(1, &foreign), Payload::Owned(foreign.clone()));
    let (_, first) = batch.datagram(0).expect("datagram");
    let first = first.to_vec();
    assert!(matches!(batch.locate(1, &first), Payload::Owned(_)));
    // The header goes in front of the datagram, in place.
    let framed = batch.prepend(0, [0x40, 0x01, 0x00, 0x05]).expect("slot 0");
    assert_eq!(batch.bytes(&framed), b"\x40\x01\x00\x05first");
    assert!(batch.prepend(2, [0; 4]).is_none(), "only received slots");
    assert!(batch.datagram(2).is_none());
}

/// Sends `frames` (all of one length but the last, which may be shorter)
/// from `tx` to `to` as one GSO message.
fn send_gso(tx: &UdpSocket, to: SocketAddr, frames: &[Vec<u8>]) {
    let mut q: SendQueue<Rc<UdpSocket>> = SendQueue::new(64, true);
    let tx = Rc::new(tx.try_clone().expect("clone"));
    for f in frames {
        q.push(tx.clone(), to, Payload::Owned(f.clone())).expect("room");
    }
    let recv = RecvBatch::new(1);
    let mut blocked = Vec::new();
    // SAFETY: the queue builds its headers over its own live buffers.
    let done = q.flush(&recv, &mut blocked, |fd, hdrs| unsafe { sendmmsg_dontwait(fd, hdrs) });
    assert_eq!((done.sent, done.gso_sent, done.calls), (frames.len(), frames.len(), 1), "one GSO message");
}

/// With `UDP_GRO` on the socket, a sender's GSO message arrives as one
/// message, which `segments` splits back into its datagrams (the last one
/// shorter); a datagram sent alone stays one, an empty one included.
/// `prepend_segment` writes a ChannelData header in front of each: in the
/// headroom for the first, in a copy for the others (whose headroom holds
/// the previous datagram's bytes).
#[test]
fn coalesced_messages_split_into_their_datagrams() {
    let (rx, tx) = pair();
    set_gro(rx.as_raw_fd()).expect("UDP_GRO");
    let to = rx.local_addr().expect("addr");
    let frames: Vec<Vec<u8>> = (0..5u8).map(|k| vec![k; if k == 4 { 40 } else { 100 }]).collect();
    send_gso(&tx, to, &frames);
    tx.send_to(b"alone", to).expect("send");
    tx.send_to(b"", to).expect("send");
    let mut batch = RecvBatch::new(8).with_gro(true);
    assert_eq!(batch.recv(rx.as_raw_fd()).expect("queued"), 3, "the burst coalesced");
    let (from, whole) = batch.datagram(0).expect("message");
    assert_eq!(from, tx.local_addr().expect("addr"));
    let whole = whole.to_vec();
    let parts: Vec<(usize, usize)> = batch.segments(0).collect();
    assert_eq!(parts, [(0, 100), (100, 100), (200, 100), (300, 100), (400, 40)]);
    for (k, &(start, len)) in parts.iter().enumerate() {
        assert_eq!(whole[start..start + len], frames[k]);
    }
    assert_eq!(batch.segments(1).collect::<Vec<_>>(), [(0, 5)]);
    assert_eq!(batch.segments(2).collect::<Vec<_>>(), [(0, 0)]);
    assert_eq!(batch.segments(3).count(), 0, "only received messages");
    assert_eq!((batch.segments(0).remaining(), batch.segments(2).remaining(), batch.segments(3).remaining()), (5, 1, 0));
    let header = [0x40, 0x01, 0x00, 100];
    let framed: Vec<Payload> = parts.iter().map(|&(start, len)| batch.prepend_segment(0, start, len, header).expect("segment")).collect();
    assert!(matches!(framed[0], Payload::Slot { index: 0, start: 0, len: 104 }));
    assert!(framed[1..].iter().all(|p| matches!(p, Payload::Owned(_))));
    for (k, p) in framed.iter().enumerate() {
        assert_eq!(batch.bytes(p)[..HEADROOM], header);
        assert_eq!(batch.bytes(p)[HEADROOM..], frames[k], "datagram {k}");
    }
    assert!(batch.prepend_segment(0, 400, 41, header).is_none(), "past the message");
    assert_eq!(batch.segment(0, 400, 40), &frames[4][..]);
    assert!(batch.segment(0, 400, 41).is_empty(), "past the message");
    // Without the control buffer the kernel flags a coalesced message cut
    // (MSG_CTRUNC): it is dropped, never taken for one datagram. Sockets
    // with UDP_GRO need `with_gro`.
    send_gso(&tx, to, &frames);
    let mut plain = RecvBatch::new(1);
    assert_eq!(plain.recv(rx.as_raw_fd()).expect("queued"), 1);
    assert!(plain.datagram(0).is_none());
}

#[test]
fn socket_addresses_round_trip() {
    let mut s = zeroed_storage();
    for addr in ["192.0.2.7:3478", "[2001:db8::1]:49152", "[::ffff:198.51.100.1]:1", "0.0.0.0:0"] {
        let addr: SocketAddr = addr.parse().expect("literal");
        let len = to_storage(addr, &mut s);
        assert_eq!(from_storage(&s, len as libc::socklen_t), Some(addr));
        assert_eq!(from_storage(&s, (len - 1) as libc::socklen_t), None, "short length");
    }
    assert_eq!(from_storage(&zeroed_storage(), 128), None, "AF_UNSPEC");
}

#[test]
fn flush_sends_each_socket_in_order_with_one_call_each() {
    let (rx_a, tx_a) = pair();
    let (rx_b, tx_b) = pair();
    let (tx_a, tx_b) = (Rc::new(tx_a), Rc::new(tx_b));
    // Slot payloads from a real receive, owned ones from the "core".
    let (src_rx, src_tx) = pair();
    let mut recv = RecvBatch::new(8);
    for seq in 100..108 {
        src_tx.send_to(&datagram(seq), src_rx.local_addr().expect("addr")).expect("send");
    }
    assert_eq!(recv.recv(src_rx.as_raw_fd()).expect("queued"), 8);
    let mut q: SendQueue<Rc<UdpSocket>> = SendQueue::new(16, false);
    let to_a = rx_a.local_addr().expect("addr");
    let to_b = rx_b.local_addr().expect("addr");
    let mut want_a = Vec::new();
    let mut want_b = Vec::new();
    for i in 0..8 {
        let (_, d) = recv.datagram(i).expect("datagram");
        let slot = recv.locate(i, d);
        let owned = Payload::Owned(datagram(200 + i as u32));
        // Interleave the two sockets.
        let (sock, to, want) = if i % 2 == 0 { (&tx_a, to_a, &mut want_a) } else { (&tx_b, to_b, &mut want_b) };
        want.push(d.to_vec());
        want.push(datagram(200 + i as u32));
        q.push(sock.clone(), to, slot).expect("room");
        q.push(sock.clone(), to, owned).expect("room");
    }
    assert!(q.is_full());
    assert!(q.push(tx_a.clone(), to_a, Payload::Owned(Vec::new())).is_err(), "a full queue refuses");
    let mut blocked = Vec::new();
    // SAFETY: `flush` passes only the headers it built over live buffers.
    let done = q.flush(&recv, &mut blocked, |fd, h| unsafe { sendmmsg_dontwait(fd, h) });
    assert_eq!(done, Flushed { sent: 16, failed: 0, blocked: 0, calls: 2, gso_sent: 0, gso_refused: false });
    assert!(blocked.is_empty());
    assert!(!q.is_full(), "flush empties the queue");
    for (rx, want, from) in [(&rx_a, want_a, &tx_a), (&rx_b, want_b, &tx_b)] {
        rx.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut buf = [0u8; 64];
        for w in want {
            let (n, f) = rx.recv_from(&mut buf).expect("datagram arrives");
            assert_eq!(&buf[..n], &w[..]);
            assert_eq!(f, from.local_addr().expect("addr"));
        }
    }
}

#[derive(Clone, Debug)]
struct FakeSock(RawFd);

impl AsRawFd for FakeSock {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Reads back what a header describes.
fn described(h: &libc::mmsghdr) -> (SocketAddr, Vec<u8>) {
    // SAFETY: `flush` built the header over a live sockaddr_storage and
    // one iovec over live bytes, valid for the duration of the call that
    // hands it to us.
    unsafe {
        let name = &*(h.msg_hdr.msg_name as *const libc::sockaddr_storage);
        let iov = &*h.msg_hdr.msg_iov;
        let bytes = std::slice::from_raw_parts(iov.iov_base as *const u8, iov.iov_len).to_vec();
        (from_storage(name, h.msg_hdr.msg_namelen).expect("address"), bytes)
    }
}

fn dest(port: u16) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 1], port))
}

#[test]
fn flush_resumes_after_partial_sends_and_skips_refused_datagrams() {
    let recv = RecvBatch::new(1);
    let mut q = SendQueue::new(32, false);
    for seq in 0..10u8 {
        // Datagram 4 is one the kernel refuses (say, EMSGSIZE).
        let bytes = if seq == 4 { vec![0xEE] } else { vec![seq] };
        q.push(FakeSock(7), dest(1000 + u16::from(seq)), Payload::Owned(bytes)).expect("room");
    }
    let mut wire = Vec::new();
    let mut interrupted = false;
    let mut calls = 0;
    let mut blocked = Vec::new();
    let done = q.flush(&recv, &mut blocked, |fd, hdrs| {
        calls += 1;
        assert_eq!(fd, 7);
        if !interrupted {
            interrupted = true;
            return Err(io::Error::from_raw_os_error(libc::EINTR));
        }
        // At most three per call, like a kernel that stops early.
        let mut sent = 0;
        for h in hdrs.iter().take(3) {
            let (to, bytes) = described(h);
            if bytes == [0xEE] {
                if sent == 0 {
                    return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
                }
                break;
            }
            wire.push((to, bytes));
            sent += 1;
        }
        Ok(sent)
    });
    let want: Vec<(SocketAddr, Vec<u8>)> =
        (0..10u8).filter(|s| *s != 4).map(|s| (dest(1000 + u16::from(s)), vec![s])).collect();
    assert_eq!(wire, want, "all but the refused one, in order, each once");
    assert_eq!(done, Flushed { sent: 9, failed: 1, blocked: 0, calls, gso_sent: 0, gso_refused: false });
    // EINTR, [0 1 2], [3], EMSGSIZE, [5 6 7], [8 9].
    assert_eq!(calls, 6);
    assert!(blocked.is_empty());
}

#[test]
fn flush_copies_out_the_rest_of_a_full_socket_and_carries_on() {
    let (rx, tx) = pair();
    let mut recv = RecvBatch::new(4);
    for seq in 0..4 {
        tx.send_to(&datagram(seq), rx.local_addr().expect("addr")).expect("send");
    }
    assert_eq!(recv.recv(rx.as_raw_fd()).expect("queued"), 4);
    let mut q = SendQueue::new(8, false);
    for i in 0..4 {
        let (_, d) = recv.datagram(i).expect("datagram");
        // Socket 9 fills up after one datagram; socket 8 has room.
        q.push(FakeSock(9), dest(9), recv.locate(i, d)).expect("room");
        q.push(FakeSock(8), dest(8), Payload::Owned(vec![i as u8])).expect("room");
    }
    let mut to_9 = 0;
    let mut sent_8 = Vec::new();
    let mut blocked = Vec::new();
    let done = q.flush(&recv, &mut blocked, |fd, hdrs| match fd {
        9 if to_9 == 0 => {
            to_9 += 1;
            Ok(1)
        }
        9 => Err(io::ErrorKind::WouldBlock.into()),
        _ => {
            sent_8.extend(hdrs.iter().map(|h| described(h).1));
            Ok(hdrs.len())
        }
    });
    assert_eq!(sent_8, vec![vec![0], vec![1], vec![2], vec![3]]);
    assert_eq!(done.sent, 5);
    assert_eq!(done.blocked, 3);
    assert_eq!(done.failed, 0);
    let rest: Vec<(RawFd, SocketAddr, Vec<u8>)> = blocked.iter().map(|b| (b.sock.0, b.to, b.bytes.clone())).collect();
    assert_eq!(rest, (1..4).map(|s| (9, dest(9), datagram(s))).collect::<Vec<_>>(), "copies, in order");
}

/// A queue that fills mid-pass is flushed more than once before the pass
/// ends: a socket whose buffer was full at the first flush keeps its
/// order, its later datagrams are copied out after the waiting ones even
/// if the socket has room again, and other sockets still send.
#[test]
fn a_socket_blocked_earlier_in_the_pass_stays_blocked() {
    let recv = RecvBatch::new(1);
    let mut q = SendQueue::new(8, false);
    let mut blocked = Vec::new();
    q.push(FakeSock(9), dest(9), Payload::Owned(vec![1])).expect("room");
    q.push(FakeSock(9), dest(9), Payload::Owned(vec![2])).expect("room");
    let done = q.flush(&recv, &mut blocked, |_, _| Err(io::ErrorKind::WouldBlock.into()));
    assert_eq!((done.sent, done.blocked), (0, 2));
    q.push(FakeSock(9), dest(9), Payload::Owned(vec![3])).expect("room");
    q.push(FakeSock(8), dest(8), Payload::Owned(vec![4])).expect("room");
    let mut sent = Vec::new();
    let done = q.flush(&recv, &mut blocked, |fd, hdrs| {
        sent.extend(hdrs.iter().map(|h| (fd, described(h).1)));
        Ok(hdrs.len())
    });
    assert_eq!(sent, vec![(8, vec![4])], "socket 9 has room now, but its datagrams wait");
    assert_eq!((done.sent, done.blocked), (1, 1));
    let rest: Vec<(RawFd, Vec<u8>)> = blocked.iter().map(|b| (b.sock.0, b.bytes.clone())).collect();
    assert_eq!(rest, vec![(9, vec![1]), (9, vec![2]), (9, vec![3])], "in order");
}

#[test]
fn flush_of_an_empty_queue_makes_no_call() {
    let recv = RecvBatch::new(1);
    let mut q: SendQueue<FakeSock> = SendQueue::new(4, false);
    let done = q.flush(&recv, &mut Vec::new(), |_, _| panic!("no datagrams, no syscall"));
    assert_eq!(done, Flushed::default());
}

/// What a message carries: destination, one byte string per iovec, and the
/// `UDP_SEGMENT` size if it has one.
fn message(h: &libc::mmsghdr) -> (SocketAddr, Vec<Vec<u8>>, Option<u16>) {
    // SAFETY: `flush` built the header over a live sockaddr_storage,
    // `msg_iovlen` live iovecs and (GSO) a live control buffer, valid for
    // the duration of the call that hands it to us.
    unsafe {
        let name = &*(h.msg_hdr.msg_name as *const libc::sockaddr_storage);
        let iovs = std::slice::from_raw_parts(h.msg_hdr.msg_iov, h.msg_hdr.msg_iovlen);
        let parts = iovs.iter().map(|v| std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len).to_vec()).collect();
        let c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
        let segment = (!c.is_null()).then(|| {
            assert_eq!(((*c).cmsg_level, (*c).cmsg_type), (libc::SOL_UDP, libc::UDP_SEGMENT));
            std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<u16>())
        });
        (from_storage(name, h.msg_hdr.msg_namelen).expect("address"), parts, segment)
    }
}

/// `len` bytes that start with `seq`.
fn sized(seq: u8, len: usize) -> Vec<u8> {
    let mut v = vec![seq; len];
    if let Some(b) = v.first_mut() {
        *b = seq;
    }
    v
}

/// Runs to one destination leave as one GSO message each, with the kernel
/// here: the receivers still get one datagram per queued one, in order.
#[test]
fn runs_to_one_destination_leave_as_one_gso_message_each() {
    let (rx_a, tx) = pair();
    let rx_b = UdpSocket::bind("127.0.0.1:0").expect("bind b");
    let tx = Rc::new(tx);
    let (to_a, to_b) = (rx_a.local_addr().expect("addr"), rx_b.local_addr().expect("addr"));
    let recv = RecvBatch::new(1);
    let mut q: SendQueue<Rc<UdpSocket>> = SendQueue::new(16, true);
    // a: 8 8 8 5 | 8 8 (a shorter one ends a run), b in between: 8.
    let queued = [(to_a, sized(1, 8)), (to_a, sized(2, 8)), (to_b, sized(3, 8)), (to_a, sized(4, 8)), (to_a, sized(5, 5)), (to_a, sized(6, 8)), (to_a, sized(7, 8))];
    for (to, bytes) in &queued {
        q.push(tx.clone(), *to, Payload::Owned(bytes.clone())).expect("room");
    }
    let mut shapes = Vec::new();
    let mut blocked = Vec::new();
    let done = q.flush(&recv, &mut blocked, |fd, hdrs| {
        shapes.extend(hdrs.iter().map(|h| {
            let (to, parts, segment) = message(h);
            (to, parts.len(), segment)
        }));
        // SAFETY: `flush` passes only the headers it built over live buffers.
        unsafe { sendmmsg_dontwait(fd, hdrs) }
    });
    assert_eq!(done, Flushed { sent: 7, failed: 0, blocked: 0, calls: 1, gso_sent: 6, gso_refused: false });
    let mut want_shapes = vec![(to_a, 4, Some(8)), (to_a, 2, Some(8)), (to_b, 1, None)];
    if to_b < to_a {
        want_shapes.rotate_right(1);
    }
    assert_eq!(shapes, want_shapes);
    assert!(q.gso());
    for (rx, to) in [(&rx_a, to_a), (&rx_b, to_b)] {
        rx.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut buf = [0u8; 64];
        for (_, want) in queued.iter().filter(|(t, _)| *t == to) {
            let (n, from) = rx.recv_from(&mut buf).expect("datagram arrives");
            assert_eq!(&buf[..n], &want[..], "one datagram per queued one, in order");
            assert_eq!(from, tx.local_addr().expect("addr"));
        }
        rx.set_nonblocking(true).expect("nonblocking");
        assert!(rx.recv_from(&mut buf).is_err(), "nothing more");
    }
}

/// Which datagrams share a GSO message: not empty ones, not ones above the
/// segment cap, at most GSO_MAX_SEGMENTS and GSO_MAX_BYTES; a shorter one
/// is a message's last, a longer one starts a new message; with GSO off,
/// one message per datagram.
#[test]
fn gso_messages_keep_to_the_kernel_limits() {
    type Shapes = Vec<(Vec<usize>, Option<u16>)>;
    fn record(hdrs: &mut [libc::mmsghdr], shapes: &mut Shapes) -> io::Result<usize> {
        shapes.extend(hdrs.iter().map(|h| {
            let (_, parts, segment) = message(h);
            (parts.iter().map(Vec::len).collect::<Vec<_>>(), segment)
        }));
        Ok(hdrs.len())
    }
    let recv = RecvBatch::new(1);
    let mut shapes = Shapes::new();
    let mut q = SendQueue::new(1024, true);
    let mut sizes: Vec<usize> = vec![0, 0, GSO_SEGMENT_MAX_BYTES + 1, GSO_SEGMENT_MAX_BYTES + 1];
    sizes.extend(std::iter::repeat_n(100, GSO_MAX_SEGMENTS + 6));
    sizes.extend(std::iter::repeat_n(GSO_SEGMENT_MAX_BYTES, 60));
    sizes.extend([10, 20, 20]);
    for (k, len) in sizes.iter().enumerate() {
        q.push(FakeSock(5), dest(1), Payload::Owned(sized(k as u8, *len))).expect("room");
    }
    let done = q.flush(&recv, &mut Vec::new(), |_, h| record(h, &mut shapes));
    assert_eq!(done.sent, sizes.len());
    assert_eq!(done.gso_sent, sizes.len() - 4, "all but the empty and the oversized ones");
    let fit = GSO_MAX_BYTES / GSO_SEGMENT_MAX_BYTES;
    let mut want = vec![(vec![0], None), (vec![0], None)];
    want.extend([(vec![GSO_SEGMENT_MAX_BYTES + 1], None), (vec![GSO_SEGMENT_MAX_BYTES + 1], None)]);
    want.push((vec![100; GSO_MAX_SEGMENTS], Some(100)));
    want.push((vec![100; 6], Some(100)));
    want.push((vec![GSO_SEGMENT_MAX_BYTES; fit], Some(GSO_SEGMENT_MAX_BYTES as u16)));
    // A shorter datagram ends a message as its last segment.
    let mut last = vec![GSO_SEGMENT_MAX_BYTES; 60 - fit];
    last.push(10);
    want.push((last, Some(GSO_SEGMENT_MAX_BYTES as u16)));
    want.push((vec![20, 20], Some(20)));
    assert_eq!(shapes, want);

    shapes.clear();
    let mut q = SendQueue::new(8, false);
    for k in 0..3 {
        q.push(FakeSock(5), dest(1), Payload::Owned(sized(k, 50))).expect("room");
    }
    q.flush(&recv, &mut Vec::new(), |_, h| record(h, &mut shapes));
    assert_eq!(shapes, vec![(vec![50], None); 3], "GSO off");
}

/// A refused GSO message is sent again one datagram at a time. Refusals
/// that may be GSO's own (EIO: no checksum offload) turn GSO off only after
/// GSO_REFUSALS_MAX of them with no GSO message through, never after one
/// has gone through (they may be one destination's: EINVAL for port 0);
/// one refused for its destination (ENETUNREACH) never counts. A full
/// socket buffer in the middle of a GSO message copies out the whole
/// message and what follows.
#[test]
fn refused_gso_messages_are_sent_again_one_datagram_at_a_time() {
    let recv = RecvBatch::new(1);
    let fill = |q: &mut SendQueue<FakeSock>| {
        for k in 0..3 {
            q.push(FakeSock(5), dest(1), Payload::Owned(sized(k, 40))).expect("room");
        }
        q.push(FakeSock(5), dest(2), Payload::Owned(sized(9, 40))).expect("room");
    };
    // A kernel that refuses every GSO message with `errno`.
    let refusing = |errno: i32, wire: &mut Vec<(SocketAddr, Vec<Vec<u8>>)>, hdrs: &mut [libc::mmsghdr]| {
        let (to, parts, segment) = message(&hdrs[0]);
        if segment.is_some() {
            return Err(io::Error::from_raw_os_error(errno));
        }
        wire.push((to, parts));
        Ok(1)
    };
    let want: Vec<(SocketAddr, Vec<Vec<u8>>)> =
        vec![(dest(1), vec![sized(0, 40)]), (dest(1), vec![sized(1, 40)]), (dest(1), vec![sized(2, 40)]), (dest(2), vec![sized(9, 40)])];
    let mut q = SendQueue::new(8, true);
    for round in 1..=GSO_REFUSALS_MAX {
        let mut wire = Vec::new();
        fill(&mut q);
        let done = q.flush(&recv, &mut Vec::new(), |_, h| refusing(libc::EIO, &mut wire, h));
        let last = round == GSO_REFUSALS_MAX;
        assert_eq!(done, Flushed { sent: 4, failed: 0, blocked: 0, calls: 5, gso_sent: 0, gso_refused: last }, "round {round}");
        assert_eq!(wire, want, "all sent again one at a time, in order");
        assert_eq!(q.gso(), !last, "round {round}");
    }
    fill(&mut q);
    let mut segments = 0;
    q.flush(&recv, &mut Vec::new(), |_, hdrs| {
        segments += hdrs.iter().filter(|h| message(h).2.is_some()).count();
        Ok(hdrs.len())
    });
    assert_eq!(segments, 0, "off for good");

    // Once a GSO message has gone through, refusals never turn GSO off.
    let mut q = SendQueue::new(8, true);
    fill(&mut q);
    assert_eq!(q.flush(&recv, &mut Vec::new(), |_, h| Ok(h.len())).gso_sent, 3);
    for _ in 0..2 * GSO_REFUSALS_MAX {
        let mut wire = Vec::new();
        fill(&mut q);
        let done = q.flush(&recv, &mut Vec::new(), |_, h| refusing(libc::EINVAL, &mut wire, h));
        assert!(!done.gso_refused);
        assert_eq!(wire, want);
    }
    assert!(q.gso(), "GSO worked: the refusals were the destination's");

    let mut q = SendQueue::new(8, true);
    for _ in 0..2 * GSO_REFUSALS_MAX {
        fill(&mut q);
        let done = q.flush(&recv, &mut Vec::new(), |_, hdrs| match message(&hdrs[0]) {
            (to, _, _) if to == dest(1) => Err(io::Error::from_raw_os_error(libc::ENETUNREACH)),
            _ => Ok(1),
        });
        assert_eq!(done, Flushed { sent: 1, failed: 3, blocked: 0, calls: 5, gso_sent: 0, gso_refused: false });
    }
    assert!(q.gso(), "the destination's fault, not GSO's");

    let mut q = SendQueue::new(8, true);
    q.push(FakeSock(5), dest(0), Payload::Owned(sized(7, 40))).expect("room");
    fill(&mut q);
    let mut blocked = Vec::new();
    let mut calls = 0;
    let done = q.flush(&recv, &mut blocked, |_, _| {
        calls += 1;
        if calls == 1 { Ok(1) } else { Err(io::ErrorKind::WouldBlock.into()) }
    });
    assert_eq!(done, Flushed { sent: 1, failed: 0, blocked: 4, calls: 2, gso_sent: 0, gso_refused: false });
    let rest: Vec<(SocketAddr, Vec<u8>)> = blocked.iter().map(|b| (b.to, b.bytes.clone())).collect();
    assert_eq!(rest, vec![(dest(1), sized(0, 40)), (dest(1), sized(1, 40)), (dest(1), sized(2, 40)), (dest(2), sized(9, 40))]);
}
