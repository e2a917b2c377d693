//! The target: parsing `http://host:port`, resolving it, and refusing
//! anything but loopback unless the operator explicitly allows remote
//! targets. A load generator pointed at the wrong address is an attack, so
//! the check runs on every resolved address before any packet is sent.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs as _};

/// Why a target is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    /// Not an `http://host[:port]` URL.
    #[error("target {0:?} is not http://host[:port] (https is not supported)")]
    BadUrl(String),
    /// The host did not resolve.
    #[error("target host {0:?} does not resolve")]
    Unresolved(String),
    /// A resolved address is not loopback.
    #[error(
        "target {host} resolves to {addr}, which is not loopback; pass --allow-remote to load a remote server"
    )]
    NotLoopback {
        /// Host as given.
        host: String,
        /// The offending address.
        addr: IpAddr,
    },
}

/// A resolved HTTP target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Address to connect to.
    pub addr: SocketAddr,
    /// `Host` header value.
    pub host_header: String,
}

/// Splits `http://host:port[/]` into host and port (default 80).
pub fn parse_http_url(url: &str) -> Result<(String, u16), TargetError> {
    let bad = || TargetError::BadUrl(url.to_owned());
    let rest = url.strip_prefix("http://").ok_or_else(bad)?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() || authority.contains('/') || authority.contains('@') {
        return Err(bad());
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(bad)?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad())?,
            None if after.is_empty() => 80,
            None => return Err(bad()),
        };
        (host.to_owned(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), p.parse().map_err(|_| bad())?),
            None => (authority.to_owned(), 80),
        }
    };
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host, port))
}

/// Resolves `host:port` and checks every address is loopback unless
/// `allow_remote`; returns the first address.
pub fn resolve_checked(
    host: &str,
    port: u16,
    allow_remote: bool,
) -> Result<SocketAddr, TargetError> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|_| TargetError::Unresolved(host.to_owned()))?
        .collect();
    let first = *addrs
        .first()
        .ok_or_else(|| TargetError::Unresolved(host.to_owned()))?;
    if !allow_remote {
        check_loopback(host, &addrs)?;
    }
    Ok(first)
}

fn check_loopback(host: &str, addrs: &[SocketAddr]) -> Result<(), TargetError> {
    for a in addrs {
        let ip = match a.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        if !ip.is_loopback() {
            return Err(TargetError::NotLoopback {
                host: host.to_owned(),
                addr: a.ip(),
            });
        }
    }
    Ok(())
}

/// Parses, resolves and checks an HTTP target.
pub fn http_target(url: &str, allow_remote: bool) -> Result<Target, TargetError> {
    let (host, port) = parse_http_url(url)?;
    let addr = resolve_checked(&host, port, allow_remote)?;
    let host_header = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Ok(Target { addr, host_header })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!(
            parse_http_url("http://127.0.0.1:8008"),
            Ok(("127.0.0.1".into(), 8008))
        );
        assert_eq!(
            parse_http_url("http://localhost/"),
            Ok(("localhost".into(), 80))
        );
        assert_eq!(
            parse_http_url("http://[::1]:9000"),
            Ok(("::1".into(), 9000))
        );
        for bad in [
            "https://127.0.0.1",
            "127.0.0.1:80",
            "http://",
            "http://h:x",
            "http://a/b",
            "http://u@h:1",
            "http://[::1",
        ] {
            assert!(parse_http_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn loopback_is_accepted_and_remote_refused() {
        let t = http_target("http://127.0.0.1:8008", false).expect("loopback ok");
        assert_eq!(t.addr, "127.0.0.1:8008".parse().expect("addr"));
        assert_eq!(t.host_header, "127.0.0.1:8008");
        assert!(http_target("http://127.9.9.9:1", false).is_ok());
        assert!(http_target("http://[::1]:1", false).is_ok());
        // Addresses from documentation ranges: refused without resolving DNS.
        let err = http_target("http://192.0.2.1:8008", false).expect_err("remote refused");
        assert!(matches!(err, TargetError::NotLoopback { .. }));
        assert!(matches!(
            http_target("http://[2001:db8::1]:80", false),
            Err(TargetError::NotLoopback { .. })
        ));
        assert!(matches!(
            http_target("http://10.0.0.1:80", false),
            Err(TargetError::NotLoopback { .. })
        ));
        // Explicitly allowed: resolution alone, nothing is sent.
        assert!(http_target("http://192.0.2.1:8008", true).is_ok());
    }

    #[test]
    fn mapped_v4_loopback_counts_as_loopback() {
        let addrs = ["[::ffff:127.0.0.1]:80".parse().expect("addr")];
        assert!(check_loopback("x", &addrs).is_ok());
        let addrs = ["[::ffff:192.0.2.1]:80".parse().expect("addr")];
        assert!(check_loopback("x", &addrs).is_err());
    }
}
