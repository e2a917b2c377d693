//! Peer address policy: which peers a client may relay to.
//!
//! A TURN relay that forwards to any address lets an outside client reach
//! the relay host's loopback services and the operator's private networks
//! (CVE-2020-26262, CVE-2026-27624 in coturn). By default this policy
//! refuses every IANA special-purpose range: unspecified, loopback, private
//! (RFC 1918, fc00::/7), shared CGNAT space, link-local, multicast,
//! documentation, benchmarking, reserved and all IPv6 outside 2000::/3.
//!
//! Invariant: addresses that embed an IPv4 address (IPv4-mapped, IPv4-
//! compatible, NAT64 64:ff9b::/96, 6to4 2002::/16, Teredo 2001::/32) are
//! unwrapped and the embedded address is judged too, so a refused IPv4
//! peer cannot be reached through an IPv6 spelling. Ranges in
//! `allow` (operator config) win over the defaults; ranges in `deny` are
//! refused on top of them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An IP prefix such as `10.0.0.0/8` or `fc00::/7`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// A prefix string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid CIDR {0:?} (expected e.g. 10.0.0.0/8 or fc00::/7)")]
pub struct CidrError(pub String);

impl Cidr {
    /// Builds a prefix; `prefix` is clamped to the family's width.
    pub fn new(addr: IpAddr, prefix: u8) -> Self {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        Cidr { addr, prefix: prefix.min(max) }
    }

    /// True if `ip` lies in this prefix (families must match).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(u128::from(u32::from(net)) << 96, u128::from(u32::from(ip)) << 96, self.prefix),
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix_eq(u128::from(net), u128::from(ip), self.prefix),
            _ => false,
        }
    }
}

fn prefix_eq(a: u128, b: u128, prefix: u8) -> bool {
    if prefix == 0 {
        return true;
    }
    let shift = 128 - u32::from(prefix);
    (a >> shift) == (b >> shift)
}

impl FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || CidrError(s.to_owned());
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = ip.trim().parse().map_err(|_| err())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().map_err(|_| err())?,
            None => max,
        };
        if prefix > max {
            return Err(err());
        }
        Ok(Cidr { addr, prefix })
    }
}

/// Why a peer was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// An IANA special-purpose or non-global range.
    SpecialPurpose(&'static str),
    /// A range the operator denied in config.
    Configured,
}

/// Decides whether a peer address may be relayed to.
#[derive(Debug, Clone, Default)]
pub struct PeerPolicy {
    /// Ranges allowed even though they are special-purpose.
    pub allow: Vec<Cidr>,
    /// Ranges refused in addition to the defaults.
    pub deny: Vec<Cidr>,
}

impl PeerPolicy {
    /// Checks a peer address; `Ok` means relaying is permitted.
    pub fn check(&self, ip: IpAddr) -> Result<(), Refusal> {
        let mut candidates = [Some(ip), None, None];
        match ip {
            IpAddr::V6(v6) => {
                let (a, b) = embedded_v4(v6);
                candidates[1] = a.map(IpAddr::V4);
                candidates[2] = b.map(IpAddr::V4);
            }
            IpAddr::V4(_) => {}
        }
        for c in candidates.into_iter().flatten() {
            if self.deny.iter().any(|r| r.contains(c)) {
                return Err(Refusal::Configured);
            }
            if self.allow.iter().any(|r| r.contains(c)) {
                continue;
            }
            // The outer IPv6 spelling of an embedding form is itself in a
            // special range (e.g. 64:ff9b::/96 is outside 2000::/3); it is
            // judged by its embedded address instead.
            // IPv4-compatible addresses (::a.b.c.d) are deprecated and never
            // routable, so they are refused as IPv6 as well.
            let compat = matches!(ip, IpAddr::V6(v6) if v6.segments()[..6] == [0; 6]);
            if c == ip && !compat && (candidates[1].is_some() || candidates[2].is_some()) {
                continue;
            }
            if let Some(why) = special_purpose(c) {
                return Err(Refusal::SpecialPurpose(why));
            }
        }
        Ok(())
    }
}

/// IPv4 addresses embedded in an IPv6 address by a transition mechanism.
pub fn embedded_v4(ip: Ipv6Addr) -> (Option<Ipv4Addr>, Option<Ipv4Addr>) {
    let o = ip.octets();
    let seg = ip.segments();
    let last32 = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    // ::ffff:a.b.c.d (IPv4-mapped) and ::a.b.c.d (IPv4-compatible, deprecated).
    if seg[..5] == [0; 5] && (seg[5] == 0xffff || seg[5] == 0) {
        if seg[5] == 0 && seg[6] == 0 {
            // :: and ::1 are their own special cases, not embeddings.
            return (None, None);
        }
        return (Some(last32), None);
    }
    // NAT64 well-known prefix 64:ff9b::/96 (RFC 6052).
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return (Some(last32), None);
    }
    // 6to4 2002:AABB:CCDD::/48 (RFC 3056).
    if seg[0] == 0x2002 {
        return (Some(Ipv4Addr::new(o[2], o[3], o[4], o[5])), None);
    }
    // Teredo 2001:0000:SSSS:SSSS:flags:port:~CCCC:~CCCC (RFC 4380): the
    // server address and the obfuscated client address.
    if seg[0] == 0x2001 && seg[1] == 0 {
        let server = Ipv4Addr::new(o[4], o[5], o[6], o[7]);
        let client = Ipv4Addr::new(!o[12], !o[13], !o[14], !o[15]);
        return (Some(server), Some(client));
    }
    (None, None)
}

const V4_SPECIAL: &[(&str, &str)] = &[
    ("0.0.0.0/8", "this-network"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "shared-cgnat"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "ietf-protocol"),
    ("192.0.2.0/24", "documentation"),
    ("192.31.196.0/24", "as112"),
    ("192.52.193.0/24", "amt"),
    ("192.88.99.0/24", "6to4-relay"),
    ("192.168.0.0/16", "private"),
    ("192.175.48.0/24", "as112"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
];

const V6_SPECIAL: &[(&str, &str)] = &[
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("64:ff9b:1::/48", "nat64-local"),
    ("100::/64", "discard"),
    ("2001::/23", "ietf-protocol"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "srv6"),
    ("fc00::/7", "unique-local"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
];

/// The special-purpose category of an address, if any.
pub fn special_purpose(ip: IpAddr) -> Option<&'static str> {
    let table = if ip.is_ipv4() { V4_SPECIAL } else { V6_SPECIAL };
    for (cidr, why) in table {
        // The tables are literals checked by a unit test, so they parse.
        if let Ok(c) = cidr.parse::<Cidr>()
            && c.contains(ip)
        {
            return Some(why);
        }
    }
    if let IpAddr::V6(v6) = ip {
        // Only 2000::/3 is allocated as global unicast.
        if v6.segments()[0] & 0xE000 != 0x2000 {
            return Some("non-global-ipv6");
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(p: &PeerPolicy, s: &str) -> bool {
        p.check(s.parse().expect("test literal")).is_err()
    }

    #[test]
    fn tables_parse() {
        for (c, _) in V4_SPECIAL.iter().chain(V6_SPECIAL) {
            assert!(c.parse::<Cidr>().is_ok(), "{c}");
        }
    }

    #[test]
    fn default_refuses_special_ranges() {
        let p = PeerPolicy::default();
        for a in [
            "127.0.0.1", "::1", "0.0.0.0", "::", "::ffff:127.0.0.1", "10.0.0.1", "169.254.169.254",
            "64:ff9b::7f00:1", "172.16.5.4", "192.168.1.1", "100.64.0.1", "224.0.0.1", "255.255.255.255",
            "192.0.2.1", "198.18.0.1", "198.51.100.7", "203.0.113.9", "fc00::1", "fd12::1", "fe80::1",
            "ff02::1", "2001:db8::1", "::ffff:10.1.2.3", "::127.0.0.1", "2002:7f00:1::1",
            "2002:a00:1::1", "64:ff9b::a00:1", "64:ff9b:1::1", "::ffff:169.254.169.254",
            // Teredo with server 127.0.0.1.
            "2001:0:7f00:1::1",
            // Teredo with obfuscated client 10.0.0.1 (0xf5ff:fffe).
            "2001:0:5db8:1::f5ff:fffe",
            "100::1", "3fff::1", "5f00::1", "4000::1", "::8.8.8.8",
        ] {
            assert!(refused(&p, a), "{a} must be refused");
        }
    }

    #[test]
    fn default_accepts_public_addresses() {
        let p = PeerPolicy::default();
        for a in [
            "8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808",
            "2002:808:808::1", "93.184.216.34",
            // Teredo: server 8.8.8.8, client 1.1.1.1 obfuscated.
            "2001:0:808:808::fefe:fefe",
        ] {
            assert!(!refused(&p, a), "{a} must be accepted");
        }
    }

    #[test]
    fn allow_and_deny_lists() {
        let p = PeerPolicy {
            allow: vec!["127.0.0.0/8".parse().expect("literal")],
            deny: vec!["8.8.8.0/24".parse().expect("literal")],
        };
        assert!(!refused(&p, "127.0.0.1"));
        assert!(!refused(&p, "::ffff:127.0.0.1"));
        assert!(refused(&p, "::1"));
        assert!(refused(&p, "8.8.8.8"));
        assert!(refused(&p, "::ffff:8.8.8.8"));
        assert!(!refused(&p, "1.1.1.1"));
    }

    #[test]
    fn cidr_parse_and_contains() {
        let c: Cidr = "10.0.0.0/8".parse().expect("literal");
        assert!(c.contains("10.255.0.1".parse().expect("literal")));
        assert!(!c.contains("11.0.0.1".parse().expect("literal")));
        assert!(!c.contains("::a00:1".parse().expect("literal")));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope".parse::<Cidr>().is_err());
        let all: Cidr = "::/0".parse().expect("literal");
        assert!(all.contains("2001::1".parse().expect("literal")));
        let host: Cidr = "::1".parse().expect("literal");
        assert!(host.contains("::1".parse().expect("literal")));
    }
}
