//! UDP segmentation offload for the `turn` scenario's bursts
//! (`turn.packet_gso`): a burst leaves in one `sendmsg` with a
//! `UDP_SEGMENT` control message (the kernel still puts one datagram per
//! packet on the wire), and the echo peer receives with `UDP_GRO`, so that a
//! burst reaches it as one message with the size of its datagrams, and
//! echoes it the same way. Linux only.

use std::io;
use std::mem::size_of;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

/// Room for one control message with a `c_int` (`UDP_GRO`) or a `u16`
/// (`UDP_SEGMENT`): `CMSG_SPACE(4)` is 24 bytes on 64-bit Linux; 8-aligned.
type Control = [u64; 4];

/// Asks the kernel to hand over back-to-back datagrams of one sender as one
/// message (`UDP_GRO`).
pub fn set_gro(fd: RawFd) -> io::Result<()> {
    set_int_option(fd, libc::SOL_UDP, libc::UDP_GRO, 1)
}

/// Sets an integer socket option.
pub fn set_int_option(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value is a c_int whose size is passed with it; a
    // bad descriptor is an error, not undefined behaviour.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sends `bytes` as datagrams of `segment` bytes (the last may be shorter)
/// in one `sendmsg` without blocking; to `to`, or to the connected peer.
pub fn send_segments(
    fd: RawFd,
    to: Option<SocketAddr>,
    bytes: &[u8],
    segment: usize,
) -> io::Result<usize> {
    let segment =
        u16::try_from(segment).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: all zeroes is a valid sockaddr_storage.
    let mut name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let namelen = to.map_or(0, |to| to_storage(to, &mut name));
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    let mut control: Control = [0; 4];
    // SAFETY: the header points at live locals for the call (sendmsg only
    // reads through iov_base); the control buffer is 8-aligned and large
    // enough for one cmsghdr with a u16, which CMSG_FIRSTHDR/CMSG_DATA
    // address inside it.
    let rc = unsafe {
        let mut h: libc::msghdr = std::mem::zeroed();
        if namelen > 0 {
            h.msg_name = (&raw mut name).cast();
            h.msg_namelen = namelen;
        }
        h.msg_iov = &raw mut iov;
        h.msg_iovlen = 1;
        h.msg_control = control.as_mut_ptr().cast();
        h.msg_controllen = libc::CMSG_SPACE(size_of::<u16>() as u32) as _;
        let c = libc::CMSG_FIRSTHDR(&h);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = libc::UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), segment);
        libc::sendmsg(fd, &h, libc::MSG_DONTWAIT)
    };
    usize::try_from(rc).map_err(|_| io::Error::last_os_error())
}

/// Receives one message without blocking: its length, its sender, and the
/// size of its datagrams if the kernel coalesced several (0 otherwise). A
/// truncated message is `InvalidData`.
pub fn recv_coalesced(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, usize)> {
    // SAFETY: all zeroes is a valid sockaddr_storage.
    let mut name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control: Control = [0; 4];
    // SAFETY: the header points at live locals and `buf` for the call; the
    // kernel writes at most the lengths given. After it, CMSG_FIRSTHDR and
    // CMSG_NXTHDR stay inside the control bytes the kernel wrote, and
    // CMSG_DATA of a UDP_GRO message points at its c_int.
    unsafe {
        let mut h: libc::msghdr = std::mem::zeroed();
        h.msg_name = (&raw mut name).cast();
        h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        h.msg_iov = &raw mut iov;
        h.msg_iovlen = 1;
        h.msg_control = control.as_mut_ptr().cast();
        h.msg_controllen = size_of::<Control>() as _;
        let rc = libc::recvmsg(fd, &mut h, libc::MSG_DONTWAIT);
        let n = usize::try_from(rc).map_err(|_| io::Error::last_os_error())?;
        // A cut message, or cut control data (the datagram size), cannot be
        // echoed as it came.
        if h.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
            return Err(io::ErrorKind::InvalidData.into());
        }
        let from =
            from_storage(&name).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidData))?;
        let mut segment = 0;
        let mut c = libc::CMSG_FIRSTHDR(&h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                let size = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                segment = usize::try_from(size).unwrap_or(0);
            }
            c = libc::CMSG_NXTHDR(&h, c);
        }
        Ok((n, from, segment))
    }
}

fn to_storage(addr: SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for
            // sockaddr_in.
            unsafe { std::ptr::write((out as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((out as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

fn from_storage(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 =
                unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd as _;

    /// A GSO burst reaches a `UDP_GRO` socket as one message with its
    /// datagram size, and a socket without it as one datagram per packet;
    /// an echo of the coalesced message with that size arrives as the same
    /// datagrams, from the echoing address.
    #[test]
    fn bursts_leave_as_one_message_and_echo_back_whole() {
        let gro = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        set_gro(gro.as_raw_fd()).expect("UDP_GRO");
        let plain = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let burst: Vec<u8> = (0..4u8).flat_map(|k| [k; 50]).chain([9u8; 20]).collect();
        let sent = send_segments(
            tx.as_raw_fd(),
            Some(gro.local_addr().expect("addr")),
            &burst,
            50,
        )
        .expect("send");
        assert_eq!(sent, burst.len());
        let mut buf = vec![0u8; 65536];
        let (n, from, segment) = recv_coalesced(gro.as_raw_fd(), &mut buf).expect("one message");
        assert_eq!(
            (n, from, segment),
            (burst.len(), tx.local_addr().expect("addr"), 50)
        );
        assert_eq!(buf[..n], burst);
        // Echo it back, coalesced, to a socket without UDP_GRO.
        send_segments(
            gro.as_raw_fd(),
            Some(plain.local_addr().expect("addr")),
            &buf[..n],
            segment,
        )
        .expect("echo");
        for k in 0..5 {
            let (n, from, segment) =
                recv_coalesced(plain.as_raw_fd(), &mut buf).expect("a datagram");
            assert_eq!((from, segment), (gro.local_addr().expect("addr"), 0));
            assert_eq!(
                buf[..n],
                burst[k * 50..(k * 50 + 50).min(burst.len())],
                "datagram {k}"
            );
        }
        let empty = recv_coalesced(plain.as_raw_fd(), &mut buf).expect_err("nothing more");
        assert_eq!(empty.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn addresses_round_trip() {
        for addr in ["192.0.2.7:3478", "[2001:db8::1]:49152"] {
            let addr: SocketAddr = addr.parse().expect("literal");
            // SAFETY: all zeroes is a valid sockaddr_storage.
            let mut s: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            to_storage(addr, &mut s);
            assert_eq!(from_storage(&s), Some(addr));
        }
    }
}
