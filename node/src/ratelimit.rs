//! Per-shard token buckets for messages, registration, login, joins and
//! invites.
//!
//! Buckets live on the shard that handles the request (no cross-core
//! traffic); a client spread over several connections may get up to one
//! bucket per shard, which is the documented slack of this design. The
//! number of tracked keys is bounded by `rate_limits.tracked_keys_max`: when
//! full, the table is cleared, which errs on the side of letting requests in.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Instant;

use crate::config::{Bucket, RateLimits};
use crate::error::{ApiError, ApiResult};

/// What is being limited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Message,
    Registration,
    Login,
    Join,
    /// Keyed by the inviting user.
    InviteIssuer,
    /// Keyed by the room.
    InviteRoom,
    /// Keyed by the invited user.
    InviteTarget,
}

/// The limiter of one shard.
pub struct RateLimiter {
    config: RateLimits,
    buckets: RefCell<HashMap<(Action, String), (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(config: RateLimits) -> Self {
        RateLimiter { config, buckets: RefCell::new(HashMap::new()) }
    }

    fn bucket(&self, action: Action) -> Bucket {
        match action {
            Action::Message => self.config.messages,
            Action::Registration => self.config.registration,
            Action::Login => self.config.login,
            Action::Join => self.config.joins,
            Action::InviteIssuer => self.config.invites_per_issuer,
            Action::InviteRoom => self.config.invites_per_room,
            Action::InviteTarget => self.config.invites_per_user,
        }
    }

    /// Takes one token for `key` (a user id or an IP), or answers 429 with
    /// the time until a token is available.
    pub fn check(&self, action: Action, key: &str, now: Instant) -> ApiResult<()> {
        if !self.config.enabled {
            return Ok(());
        }
        let bucket = self.bucket(action);
        let mut buckets = self.buckets.borrow_mut();
        if buckets.len() >= self.config.tracked_keys_max && !buckets.contains_key(&(action, key.to_owned())) {
            buckets.clear();
        }
        let entry = buckets.entry((action, key.to_owned())).or_insert((bucket.burst, now));
        let elapsed = now.saturating_duration_since(entry.1).as_secs_f64();
        let tokens = (entry.0 + elapsed * bucket.per_second).min(bucket.burst);
        if tokens >= 1.0 {
            *entry = (tokens - 1.0, now);
            Ok(())
        } else {
            *entry = (tokens, now);
            let wait_ms = ((1.0 - tokens) / bucket.per_second * 1000.0).ceil() as u64;
            Err(ApiError::limit_exceeded(wait_ms.max(1)))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limits(enabled: bool) -> RateLimits {
        RateLimits { enabled, messages: Bucket { per_second: 1.0, burst: 2.0 }, ..RateLimits::default() }
    }

    #[test]
    fn burst_then_refill() {
        let l = RateLimiter::new(limits(true));
        let t0 = Instant::now();
        l.check(Action::Message, "@a:x", t0).expect("1st");
        l.check(Action::Message, "@a:x", t0).expect("2nd");
        let err = l.check(Action::Message, "@a:x", t0).expect_err("3rd is limited");
        assert_eq!(err.errcode, "M_LIMIT_EXCEEDED");
        assert!(err.body()["retry_after_ms"].as_u64().unwrap_or(0) > 0);
        // Other keys have their own bucket.
        l.check(Action::Message, "@b:x", t0).expect("other user");
        l.check(Action::Message, "@a:x", t0 + Duration::from_millis(1100)).expect("refilled");
    }

    #[test]
    fn off_switch() {
        let l = RateLimiter::new(limits(false));
        let t0 = Instant::now();
        for _ in 0..100 {
            l.check(Action::Message, "@a:x", t0).expect("unlimited");
        }
    }
}
