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

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;

use hmac::{Hmac, KeyInit as _, Mac as _};
use tessera_shared::turn_rest::{TurnRestError, turn_rest_password};

/// Where a username's password may come from.
#[derive(Debug, Clone, Default)]
pub struct CredentialStore {
    /// TURN REST shared secrets, newest first.
    pub rest_secrets: Vec<Vec<u8>>,
    /// Static users from config, by every form of their name
    /// ([`credential_forms`]); a configured name itself wins over another
    /// user's form of it.
    static_users: HashMap<String, StaticUser>,
}

#[derive(Debug, Clone)]
struct StaticUser {
    /// The name as configured: what the user is counted under.
    name: String,
    /// Every form of the configured password.
    passwords: Vec<String>,
}

/// Why no password could be found for a username.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupError {
    /// Not a static user and not a TURN REST username (or no secret set).
    UnknownUser,
    /// A TURN REST username whose expiry is in the past.
    Expired,
}

/// What a username may authenticate with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The name quotas count the user under: a static user's configured
    /// name, or the TURN REST username as given.
    pub user: String,
    /// Candidate passwords, each to be tried.
    pub passwords: Vec<String>,
}

impl CredentialStore {
    /// A store with `static_users` (name -> password) from config.
    pub fn new(rest_secrets: Vec<Vec<u8>>, static_users: &HashMap<String, String>) -> Self {
        let mut by_form: HashMap<String, StaticUser> = HashMap::new();
        let entry = |name: &str, password: &str| StaticUser { name: name.to_owned(), passwords: credential_forms(password).into_iter().map(|p| p.into_owned()).collect() };
        for (name, password) in static_users {
            by_form.insert(name.clone(), entry(name, password));
        }
        for (name, password) in static_users {
            for form in credential_forms(name) {
                by_form.entry(form.into_owned()).or_insert_with(|| entry(name, password));
            }
        }
        CredentialStore { rest_secrets, static_users: by_form }
    }

    /// Candidate passwords for a username at `now_unix_secs`.
    pub fn lookup(&self, username: &str, now_unix_secs: u64) -> Result<Found, LookupError> {
        let mut user = username.to_owned();
        let mut passwords = Vec::new();
        if let Some(found) = credential_forms(username).iter().find_map(|form| self.static_users.get(form.as_ref())) {
            user.clone_from(&found.name);
            passwords.extend(found.passwords.iter().cloned());
        }
        let mut expired = false;
        for secret in &self.rest_secrets {
            match turn_rest_password(secret, username, now_unix_secs) {
                Ok(p) => passwords.push(p),
                Err(TurnRestError::Expired { .. }) => expired = true,
                Err(_) => {}
            }
        }
        if passwords.is_empty() {
            return Err(if expired { LookupError::Expired } else { LookupError::UnknownUser });
        }
        Ok(Found { user, passwords })
    }
}

/// The forms a credential string (username, realm or password) may take in
/// a client's key derivation (RFC 8489 §9.2.2), without repeats, the string
/// as given first:
///
/// - as given, for clients that prepare nothing (browsers' WebRTC stacks);
/// - SASLprep (RFC 4013), which RFC 5389 named and the RFC 5769 test
///   vectors use, when the string is valid under it;
/// - the OpaqueString mapping of RFC 8265, which RFC 8489 names: non-ASCII
///   spaces become U+0020, then NFC. Its validity rules, which refuse some
///   strings outright, are not applied: a client that refuses a string
///   never sends a key made from it.
///
/// Printable ASCII is the same in all three, as is every TURN REST
/// credential, so those cost one key derivation as before.
pub fn credential_forms(s: &str) -> Vec<Cow<'_, str>> {
    let mut forms = vec![Cow::Borrowed(s)];
    if s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return forms;
    }
    if let Ok(prepped) = stringprep::saslprep(s) {
        forms.push(Cow::Owned(prepped.into_owned()));
    }
    let spaced: String = s.chars().map(|c| if is_non_ascii_space(c) { ' ' } else { c }).collect();
    forms.push(Cow::Owned(unicode_normalization::UnicodeNormalization::nfc(spaced.as_str()).collect()));
    let mut unique: Vec<Cow<'_, str>> = Vec::with_capacity(forms.len());
    for form in forms {
        if !unique.contains(&form) {
            unique.push(form);
        }
    }
    unique
}

/// Unicode's space separators (general category Zs) other than U+0020.
fn is_non_ascii_space(c: char) -> bool {
    matches!(c, '\u{00A0}' | '\u{1680}' | '\u{2000}'..='\u{200A}' | '\u{202F}' | '\u{205F}' | '\u{3000}')
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
        let got = store.lookup(&user, 1000).expect("known");
        assert!(got.passwords.contains(&pass));
        assert_eq!(got.user, user);
        assert_eq!(store.lookup(&user, 3000), Err(LookupError::Expired));
        assert_eq!(store.lookup("nobody", 1000), Err(LookupError::UnknownUser));
    }

    #[test]
    fn credential_forms_prepare_non_ascii_only() {
        assert_eq!(credential_forms("alice:pw 1~"), vec!["alice:pw 1~"]);
        // RFC 5769's password: SASLprep drops the soft hyphen and applies
        // NFKC; OpaqueString keeps both (NFC changes nothing).
        assert_eq!(credential_forms("The\u{00AD}M\u{00AA}tr\u{2168}"), vec!["The\u{00AD}M\u{00AA}tr\u{2168}", "TheMatrIX"]);
        // Non-ASCII spaces: SASLprep and OpaqueString both make them U+0020.
        assert_eq!(credential_forms("a\u{3000}b\u{00A0}c"), vec!["a\u{3000}b\u{00A0}c", "a b c"]);
        // NFD to NFC (SASLprep's NFKC gives the same here).
        assert_eq!(credential_forms("e\u{0301}"), vec!["e\u{0301}", "\u{00E9}"]);
        // Full-width letters: NFKC folds them, NFC does not.
        assert_eq!(credential_forms("\u{FF41}b"), vec!["\u{FF41}b", "ab"]);
        // A control character is prohibited in SASLprep; OpaqueString's
        // mapping leaves it.
        assert_eq!(credential_forms("a\u{0007}\u{00E9}"), vec!["a\u{0007}\u{00E9}"]);
        assert_eq!(credential_forms("a\u{0007}e\u{0301}"), vec!["a\u{0007}e\u{0301}", "a\u{0007}\u{00E9}"]);
    }

    #[test]
    fn a_configured_name_wins_over_another_users_form_of_it() {
        let users = HashMap::from([("e\u{0301}".to_owned(), "nfd".to_owned()), ("\u{00E9}".to_owned(), "nfc".to_owned()), ("\u{FF41}".to_owned(), "wide".to_owned())]);
        let store = CredentialStore::new(Vec::new(), &users);
        assert_eq!(store.lookup("\u{00E9}", 0).map(|f| f.user), Ok("\u{00E9}".to_owned()));
        assert_eq!(store.lookup("e\u{0301}", 0).map(|f| f.user), Ok("e\u{0301}".to_owned()));
        assert_eq!(store.lookup("a", 0), Ok(Found { user: "\u{FF41}".into(), passwords: vec!["wide".into()] }));
        assert_eq!(store.lookup("b", 0), Err(LookupError::UnknownUser));
    }

    #[test]
    fn static_users() {
        let store = CredentialStore::new(Vec::new(), &HashMap::from([("alice".to_owned(), "pw".to_owned())]));
        assert_eq!(store.lookup("alice", 0), Ok(Found { user: "alice".into(), passwords: vec!["pw".into()] }));
        assert_eq!(store.lookup("bob", 0), Err(LookupError::UnknownUser));
    }
}
