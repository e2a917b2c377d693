//! TURN REST API credentials (the "shared secret" scheme of
//! draft-uberti-behave-turn-rest, as coturn's `use-auth-secret` implements it).
//!
//! A homeserver answering `GET /_matrix/client/v3/voip/turnServer` mints a
//! username `"<expiry_unix_secs>:<user_id>"` and the password
//! `base64(HMAC-SHA1(secret, username))`; the relay, knowing the same secret,
//! recomputes the password from the username alone. Both sides use this one
//! module so they cannot drift apart. No clock is read here: callers pass
//! the current time in.

use base64::Engine as _;
use hmac::{Hmac, KeyInit as _, Mac as _};
use sha1::Sha1;

/// Why a TURN REST username cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TurnRestError {
    /// The username has no `expiry:` prefix, or the prefix is not a decimal
    /// number of seconds.
    #[error("TURN REST username is malformed (expected \"<expiry_unix_secs>:<user>\")")]
    Malformed,
    /// The expiry time in the username is in the past.
    #[error("TURN REST username expired at {expiry_unix_secs} (now {now_unix_secs})")]
    Expired {
        /// Expiry time carried by the username.
        expiry_unix_secs: u64,
        /// The time it was checked against.
        now_unix_secs: u64,
    },
}

fn password_for(secret: &[u8], username: &str) -> String {
    // HMAC accepts keys of any length, so this constructor cannot fail.
    let mut mac = match Hmac::<Sha1>::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    };
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// TURN REST credentials: username "expiry_unix_secs:user_id", password = base64(HMAC-SHA1(secret, username)).
pub fn turn_rest_credentials(secret: &[u8], user_id: &str, expiry_unix_secs: u64) -> (String /*username*/, String /*password*/) {
    let username = format!("{expiry_unix_secs}:{user_id}");
    let password = password_for(secret, &username);
    (username, password)
}

/// Checks a username of that scheme: parses the expiry prefix, returns Err if expired relative to now_unix_secs or malformed; otherwise returns the expected password for comparison.
///
/// A username equal to its expiry alone (`"1700000000"`, no `:user` part) is
/// accepted too, as coturn does. A username expiring exactly at
/// `now_unix_secs` is already expired.
pub fn turn_rest_password(secret: &[u8], username: &str, now_unix_secs: u64) -> Result<String, TurnRestError> {
    let prefix = username.split_once(':').map_or(username, |(expiry, _)| expiry);
    if prefix.is_empty() || prefix.len() > 20 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TurnRestError::Malformed);
    }
    let expiry_unix_secs: u64 = prefix.parse().map_err(|_| TurnRestError::Malformed)?;
    if expiry_unix_secs <= now_unix_secs {
        return Err(TurnRestError::Expired { expiry_unix_secs, now_unix_secs });
    }
    Ok(password_for(secret, username))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector() {
        // Computed independently: printf '1700000000:@alice:example.org' |
        //   openssl dgst -sha1 -hmac 'north' -binary | base64
        let (user, pass) = turn_rest_credentials(b"north", "@alice:example.org", 1_700_000_000);
        assert_eq!(user, "1700000000:@alice:example.org");
        assert_eq!(pass, "b7c/MWmorxmLryRFjaJYkUW5nOo=");
    }

    #[test]
    fn round_trip_before_expiry() {
        let (user, pass) = turn_rest_credentials(b"s3cret", "@bob:hs", 1000);
        assert_eq!(turn_rest_password(b"s3cret", &user, 999), Ok(pass.clone()));
        assert_ne!(turn_rest_password(b"other", &user, 999), Ok(pass));
    }

    #[test]
    fn expired_at_and_after_expiry() {
        let (user, _) = turn_rest_credentials(b"k", "@c:hs", 1000);
        assert_eq!(
            turn_rest_password(b"k", &user, 1000),
            Err(TurnRestError::Expired { expiry_unix_secs: 1000, now_unix_secs: 1000 })
        );
        assert!(matches!(turn_rest_password(b"k", &user, 5000), Err(TurnRestError::Expired { .. })));
    }

    #[test]
    fn malformed_usernames() {
        for bad in ["", ":@u:hs", "abc:@u:hs", "-5:@u", "1.5:@u", "99999999999999999999999:@u", " 12:@u"] {
            assert_eq!(turn_rest_password(b"k", bad, 0), Err(TurnRestError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn bare_expiry_username_is_accepted() {
        let pass = turn_rest_password(b"k", "2000", 1000);
        assert_eq!(pass, Ok(password_for(b"k", "2000")));
    }
}
