//! Finding sockets bound to an address in the kernel's socket tables
//! (`/proc/net/tcp`, `tcp6`, `udp`, `udp6`), given their text.
//!
//! The node and the relay listen with SO_REUSEPORT, which the kernel also
//! grants to a second process of the same user: before binding they look
//! here for another process's socket on their address. A plain test bind
//! would not do: it also fails on the TIME_WAIT remains of the previous
//! run's connections, which SO_REUSEPORT lets the new listener share.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// TCP state `LISTEN` in the tables.
const TCP_LISTEN: u8 = 0x0A;

/// Which sockets count as holding an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// TCP sockets in the LISTEN state (the text of `/proc/net/tcp` or
    /// `tcp6`).
    TcpListener,
    /// Any UDP socket (the text of `/proc/net/udp` or `udp6`).
    Udp,
}

/// True if `table` lists a socket of `kind` bound to `addr`'s port on
/// `addr`'s address or on the unspecified address of its family (or on any
/// address, when `addr`'s is unspecified).
pub fn holds(table: &str, kind: Kind, addr: SocketAddr) -> bool {
    table.lines().skip(1).filter_map(parse_line).any(|(local, state)| {
        local.port() == addr.port()
            && local.is_ipv4() == addr.is_ipv4()
            && (local.ip() == addr.ip() || local.ip().is_unspecified() || addr.ip().is_unspecified())
            && match kind {
                Kind::TcpListener => state == TCP_LISTEN,
                Kind::Udp => true,
            }
    })
}

/// The local address and state of one table line.
fn parse_line(line: &str) -> Option<(SocketAddr, u8)> {
    let mut fields = line.split_whitespace();
    let _slot = fields.next()?;
    let local = fields.next()?;
    let _remote = fields.next()?;
    let state = u8::from_str_radix(fields.next()?, 16).ok()?;
    let (ip, port) = local.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    Some((SocketAddr::new(parse_ip(ip)?, port), state))
}

/// An address as the tables print it: the bytes of each 32-bit word in
/// host order (little-endian here), as hex.
fn parse_ip(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> { u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok().map(u32::to_le_bytes) };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode";

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("literal")
    }

    #[test]
    fn finds_listeners_but_not_time_wait_remains() {
        // 127.0.0.1:8008 listening; 127.0.0.1:8009 only in TIME_WAIT (06)
        // and ESTABLISHED (01).
        let table = format!(
            "{HEADER}\n   0: 0100007F:1F48 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n   1: 0100007F:1F49 0100007F:D431 06 00000000:00000000 03:00001234 00000000     0        0 0 3\n   2: 0100007F:1F49 0100007F:D432 01 00000000:00000000 00:00000000 00000000     0        0 2 1\n"
        );
        assert!(holds(&table, Kind::TcpListener, addr("127.0.0.1:8008")));
        assert!(!holds(&table, Kind::TcpListener, addr("127.0.0.1:8009")));
        assert!(!holds(&table, Kind::TcpListener, addr("127.0.0.2:8008")));
        // A wildcard listener holds every address of its family.
        let wildcard = format!("{HEADER}\n   0: 00000000:0D96 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n");
        assert!(holds(&wildcard, Kind::TcpListener, addr("10.1.2.3:3478")));
        assert!(!holds(&wildcard, Kind::TcpListener, addr("[::1]:3478")));
        assert!(holds(&table, Kind::TcpListener, addr("0.0.0.0:8008")));
    }

    #[test]
    fn reads_ipv6_and_udp_tables() {
        // ::1 port 3478, as /proc/net/udp6 prints it.
        let table = format!("{HEADER}\n  10: 00000000000000000000000001000000:0D96 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 5 2 0\n");
        assert!(holds(&table, Kind::Udp, addr("[::1]:3478")));
        assert!(!holds(&table, Kind::Udp, addr("[::2]:3478")));
        assert!(!holds(&table, Kind::Udp, addr("127.0.0.1:3478")));
        assert!(!holds(&table, Kind::TcpListener, addr("[::1]:3478")), "state 07 is no TCP listener");
        assert!(!holds("garbage\nnot a table", Kind::Udp, addr("[::1]:3478")));
    }
}
