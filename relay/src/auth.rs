//! Long-term credentials (RFC 8489 §9.2) and stateless nonces.
//!
//! Passwords come from two sources: static users from config, and the TURN
//! REST shared-secret scheme (`tessera_shared::turn_rest`) that homeservers
//! use for `/voip/turnServer`. Several secrets may be configured at once so
//! an operator can rotate them: a username is accepted if its password
//! matches under any of them.
//!
//! Nonces carry their own expiry and an HMAC over it and the client's IP
//! address, keyed by a per-process random key handed in by the
//! caller, so the relay keeps no nonce table and a nonce issued to one
//! client is useless to another.

use std::collections::HashMap;
use std::net::SocketAddr;

use hmac::{Hmac, KeyInit as _, Mac as _};
use tessera_shared::turn_rest::{TurnRestError, turn_rest_password};

/// Where a username's password may come from.
#[derive(Debug, Clone, Default)]
pub struct CredentialStore {
    /// TURN REST shared secrets, newest first.
    pub rest_secrets: Vec<Vec<u8>>,
    /// Static `username -> password` pairs.
    pub static_users: HashMap<String, String>,
}

/// Why no password could be found for a username.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupError {
    /// Not a static user and not a TURN REST username (or no secret set).
    UnknownUser,
    /// A TURN REST username whose expiry is in the past.
    Expired,
}

impl CredentialStore {
    /// Candidate passwords for a username at `now_unix_secs`.
    pub fn passwords(&self, username: &str, now_unix_secs: u64) -> Result<Vec<String>, LookupError> {
        let mut out = Vec::new();
        if let Some(p) = self.static_users.get(username) {
            out.push(p.clone());
        }
        let mut expired = false;
        for secret in &self.rest_secrets {
            match turn_rest_password(secret, username, now_unix_secs) {
                Ok(p) => out.push(p),
                Err(TurnRestError::Expired { .. }) => expired = true,
                Err(_) => {}
            }
        }
        if out.is_empty() {
            return Err(if expired { LookupError::Expired } else { LookupError::UnknownUser });
        }
        Ok(out)
    }
}

/// Issues and checks stateless nonces.
#[derive(Clone)]
pub struct NonceKey {
    key: [u8; 32],
    lifetime_secs: u64,
}

impl std::fmt::Debug for NonceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NonceKey").field("lifetime_secs", &self.lifetime_secs).finish_non_exhaustive()
    }
}

/// Outcome of a nonce check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceCheck {
    /// Issued by us to this client and not expired.
    Valid,
    /// Issued by us but expired, or forged/foreign: answer 438 with a new one.
    Stale,
}

const NONCE_MAC_HEX: usize = 16;

impl NonceKey {
    /// A nonce key from caller-provided random bytes.
    pub fn new(key: [u8; 32], lifetime_secs: u64) -> Self {
        NonceKey { key, lifetime_secs }
    }

    fn mac(&self, expiry: u64, client: SocketAddr) -> String {
        let mut m = match Hmac::<sha2::Sha256>::new_from_slice(&self.key) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC accepts keys of any length"),
        };
        m.update(&expiry.to_be_bytes());
        // The address only, not the port: a ConnectionBind (RFC 6062) comes
        // on a new connection, with the nonce of the control connection.
        m.update(client.ip().to_string().as_bytes());
        let tag = m.finalize().into_bytes();
        tag[..NONCE_MAC_HEX / 2].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A fresh nonce for a client.
    pub fn issue(&self, now_unix_secs: u64, client: SocketAddr) -> String {
        let expiry = now_unix_secs.saturating_add(self.lifetime_secs);
        format!("{expiry:016x}{}", self.mac(expiry, client))
    }

    /// Checks a nonce the client echoed.
    pub fn check(&self, nonce: &str, now_unix_secs: u64, client: SocketAddr) -> NonceCheck {
        if nonce.len() != 16 + NONCE_MAC_HEX || !nonce.is_ascii() {
            return NonceCheck::Stale;
        }
        let Ok(expiry) = u64::from_str_radix(&nonce[..16], 16) else { return NonceCheck::Stale };
        let want = self.mac(expiry, client);
        let ok = want.as_bytes().iter().zip(&nonce.as_bytes()[16..]).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0;
        if ok && expiry > now_unix_secs { NonceCheck::Valid } else { NonceCheck::Stale }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_shared::turn_rest::turn_rest_credentials;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test literal")
    }

    #[test]
    fn nonce_valid_then_stale() {
        let k = NonceKey::new([3; 32], 60);
        let c = addr("192.0.2.1:5000");
        let n = k.issue(1000, c);
        assert_eq!(k.check(&n, 1000, c), NonceCheck::Valid);
        assert_eq!(k.check(&n, 1059, c), NonceCheck::Valid);
        assert_eq!(k.check(&n, 1060, c), NonceCheck::Stale);
        // Bound to the address, not the port.
        assert_eq!(k.check(&n, 1000, addr("192.0.2.1:5001")), NonceCheck::Valid);
        assert_eq!(k.check(&n, 1000, addr("192.0.2.2:5000")), NonceCheck::Stale);
        assert_eq!(NonceKey::new([4; 32], 60).check(&n, 1000, c), NonceCheck::Stale);
        assert_eq!(k.check("garbage", 1000, c), NonceCheck::Stale);
        let mut forged = n.clone();
        forged.replace_range(0..16, &format!("{:016x}", u64::MAX));
        assert_eq!(k.check(&forged, 1000, c), NonceCheck::Stale);
    }

    #[test]
    fn rest_secrets_rotate() {
        let store = CredentialStore { rest_secrets: vec![b"new".to_vec(), b"old".to_vec()], ..Default::default() };
        let (user, pass) = turn_rest_credentials(b"old", "@a:hs", 2000);
        let got = store.passwords(&user, 1000).expect("known");
        assert!(got.contains(&pass));
        assert_eq!(store.passwords(&user, 3000), Err(LookupError::Expired));
        assert_eq!(store.passwords("nobody", 1000), Err(LookupError::UnknownUser));
    }

    #[test]
    fn static_users() {
        let mut store = CredentialStore::default();
        store.static_users.insert("alice".into(), "pw".into());
        assert_eq!(store.passwords("alice", 0), Ok(vec!["pw".to_string()]));
        assert_eq!(store.passwords("bob", 0), Err(LookupError::UnknownUser));
    }
}
