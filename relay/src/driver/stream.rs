//! TCP and TLS client connections (RFC 8656 §3.1, §12.5 framing).
//!
//! A connection is read by one task and written by another, each on its own
//! duplicate of the socket descriptor, so peer data can be pushed to the
//! client while the reader waits. Writes go through a bounded queue
//! ([`WRITE_QUEUE`] frames, at most ~64 KiB each); a client that does not
//! drain it loses frames rather than growing memory. The writer takes every
//! frame queued when it wakes (up to [`WRITE_BATCH_BYTES`]) into one write
//! (for TLS, one run of records): a burst of peer data costs one system
//! call, not one per frame. The reader runs all complete frames of one read
//! through the core before the data they carry for peers leaves, together
//! ([`Shard::flush_stream_sends`]). For TLS both tasks share
//! the rustls connection state. Messages are framed by their own headers:
//! STUN by its length field, ChannelData by its length padded to four.
//!
//! A ConnectionBind (RFC 6062) that claims a peer connection turns the
//! connection into a data connection: from then on its bytes, unframed,
//! go to the peer and back through a [`Pipe`].

use std::cell::RefCell;
use std::io::{Read as _, Write as _};
use std::os::fd::{AsRawFd as _, FromRawFd as _};
use std::rc::Rc;
use std::sync::Arc;

use futures_lite::{AsyncReadExt as _, AsyncWriteExt as _, StreamExt as _};
use glommio::channels::local_channel::{self, LocalReceiver};
use glommio::net::{TcpListener, TcpStream};

use super::tcp_relay::Pipe;
use super::{Handled, Shard};
use crate::stun::{HEADER_LEN, channel_data, framed_len};
use crate::turn::{FiveTuple, Transport};

/// Frames queued per connection for writing.
const WRITE_QUEUE: usize = 1024;
/// Bytes of queued frames gathered into one write (one more frame may
/// take a write past it).
const WRITE_BATCH_BYTES: usize = 64 * 1024;
/// Largest frame accepted from a client (STUN header + 64 KiB).
const MAX_FRAME: usize = HEADER_LEN + 65535 + 3;

pub(super) async fn accept_loop(shard: Rc<Shard>, listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>) {
    let transport = if tls.is_some() { Transport::Tls } else { Transport::Tcp };
    let Ok(local) = listener.local_addr() else { return };
    loop {
        let stream = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors, say: do not spin on it.
                tracing::warn!(%local, error = %e, "accept failed");
                glommio::timer::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(client) = stream.peer_addr() else { continue };
        let _ = stream.set_nodelay(true);
        let tuple = FiveTuple { client, server: local, transport };
        let tls_conn = match &tls {
            Some(cfg) => match rustls::ServerConnection::new(cfg.clone()) {
                Ok(c) => Some(Rc::new(RefCell::new(c))),
                Err(_) => continue,
            },
            None => None,
        };
        glommio::spawn_local(connection(shard.clone(), stream, tuple, tls_conn)).detach();
    }
}

/// Splits the next complete frame off the front of `buf`.
fn next_frame(buf: &[u8]) -> Result<Option<usize>, ()> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = if channel_data::is_channel_data(buf) {
        channel_data::framed_len(buf).ok_or(())?
    } else if buf[0] & 0xC0 == 0 {
        framed_len(buf).ok_or(())?
    } else {
        return Err(());
    };
    if len > MAX_FRAME {
        return Err(());
    }
    Ok((buf.len() >= len).then_some(len))
}

async fn connection(shard: Rc<Shard>, stream: TcpStream, tuple: FiveTuple, tls: Option<Rc<RefCell<rustls::ServerConnection>>>) {
    // SAFETY: `dup` returns a new descriptor for the same socket that only
    // the writer owns; a failed dup (-1) is checked before use.
    let fd = unsafe { libc::dup(stream.as_raw_fd()) };
    if fd < 0 {
        return;
    }
    // SAFETY: `fd` is a freshly duplicated, open TCP socket owned by nobody else.
    let writer_stream = unsafe { TcpStream::from_raw_fd(fd) };
    let (tx, rx) = local_channel::new_bounded::<Vec<u8>>(WRITE_QUEUE);
    let tx = Rc::new(tx);
    shard.streams.borrow_mut().insert(tuple, tx.clone());
    let writer = glommio::spawn_local(write_loop(writer_stream, rx, tls.clone()));
    let mut pipe = None;
    read_loop(&shard, stream, tuple, tls, &tx, &mut pipe).await;
    if let Some(p) = pipe {
        p.close();
    }
    shard.stream_closed(tuple);
    drop(tx);
    writer.await;
}

async fn read_loop(
    shard: &Rc<Shard>,
    mut stream: TcpStream,
    tuple: FiveTuple,
    tls: Option<Rc<RefCell<rustls::ServerConnection>>>,
    tx: &Rc<glommio::channels::local_channel::LocalSender<Vec<u8>>>,
    pipe: &mut Option<Pipe>,
) {
    let mut raw = vec![0u8; 16384];
    let mut plain = if tls.is_some() { vec![0u8; 16384] } else { Vec::new() };
    let mut buf: Vec<u8> = Vec::with_capacity(16384);
    loop {
        let n = match stream.read(&mut raw).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        match &tls {
            None => buf.extend_from_slice(&raw[..n]),
            Some(conn) => {
                let mut c = conn.borrow_mut();
                let mut input = &raw[..n];
                while !input.is_empty() {
                    if c.read_tls(&mut input).is_err() {
                        return;
                    }
                    if c.process_new_packets().is_err() {
                        drop(c);
                        let _ = tx.try_send(Vec::new());
                        return;
                    }
                }
                loop {
                    match c.reader().read(&mut plain) {
                        Ok(0) => break,
                        Ok(k) => buf.extend_from_slice(&plain[..k]),
                        Err(_) => break,
                    }
                    if buf.len() > 4 * MAX_FRAME {
                        return;
                    }
                }
                // Handshake records or alerts may be waiting.
                if c.wants_write() {
                    let _ = tx.try_send(Vec::new());
                }
            }
        }
        if let Some(p) = pipe.as_mut() {
            if p.send_to_peer(&buf).await.is_err() {
                return;
            }
            buf.clear();
            continue;
        }
        let mut start = 0;
        let mut done = false;
        loop {
            match next_frame(&buf[start..]) {
                Err(()) => {
                    shard.metrics.drop_packet(crate::metrics::DropReason::Malformed);
                    done = true;
                    break;
                }
                Ok(None) => break,
                Ok(Some(len)) => {
                    let frame = &buf[start..start + len];
                    // ChannelData frames carry padding the core must not see
                    // as payload; STUN frames are exact.
                    let reply = match shard.stream_frame(tuple, frame) {
                        Handled::Reply(reply) => reply,
                        Handled::Relay(accept, parked) => {
                            shard.flush_stream_sends().await;
                            if tx.try_send(accept).is_err() {
                                return;
                            }
                            let Some(p) = Pipe::start(shard, parked, stream.as_raw_fd(), tx.clone()) else { return };
                            // Bytes after the ConnectionBind are already data.
                            let p = pipe.insert(p);
                            if p.send_to_peer(&buf[start + len..]).await.is_err() {
                                return;
                            }
                            start = buf.len();
                            break;
                        }
                    };
                    if let Some(reply) = reply
                        && tx.try_send(reply).is_err()
                    {
                        shard.metrics.drop_packet(crate::metrics::DropReason::Io);
                    }
                    start += len;
                }
            }
        }
        // The frames before a malformed one still count.
        shard.flush_stream_sends().await;
        if done {
            return;
        }
        buf.drain(..start);
    }
}

async fn write_loop(mut stream: TcpStream, rx: LocalReceiver<Vec<u8>>, tls: Option<Rc<RefCell<rustls::ServerConnection>>>) {
    let mut queued = rx.stream();
    let mut out: Vec<u8> = Vec::with_capacity(16384);
    let mut batch: Vec<Vec<u8>> = Vec::new();
    let mut open = true;
    while open {
        let Some(first) = queued.next().await else { return };
        // What else is queued already leaves in the same write.
        let mut bytes = first.len();
        batch.push(first);
        while bytes < WRITE_BATCH_BYTES {
            match futures_lite::future::poll_once(queued.next()).await {
                Some(Some(more)) => {
                    bytes += more.len();
                    batch.push(more);
                }
                Some(None) => {
                    open = false;
                    break;
                }
                None => break,
            }
        }
        out.clear();
        match &tls {
            None => {
                for b in batch.drain(..) {
                    out.extend_from_slice(&b);
                }
            }
            Some(conn) => {
                let mut c = conn.borrow_mut();
                for b in batch.drain(..) {
                    // rustls takes no more plaintext once its own buffer of
                    // records is full: records move to `out` as they are
                    // made (an empty message only moves what is waiting).
                    let mut rest: &[u8] = &b;
                    loop {
                        while c.wants_write() {
                            if c.write_tls(&mut out).is_err() {
                                return;
                            }
                        }
                        if rest.is_empty() {
                            break;
                        }
                        match c.writer().write(rest) {
                            Ok(n) if n > 0 => rest = &rest[n..],
                            _ => return,
                        }
                    }
                }
            }
        }
        if !out.is_empty() && stream.write_all(&out).await.is_err() {
            return;
        }
        if out.capacity() > 4 * WRITE_BATCH_BYTES {
            out = Vec::with_capacity(16384);
        }
    }
}
