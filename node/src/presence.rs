//! Presence from syncing: a user whose clients sync is online (or
//! `unavailable`, with `set_presence=unavailable`), and goes offline once
//! none of their clients has started a sync for `presence.offline_after_ms`.
//!
//! Each user's syncing is tracked by one owner shard, picked by hashing the
//! user id on the ring as rooms are. The shard serving a sync tells the
//! owner at most every sixth of the offline delay (a heartbeat message over
//! the shard mesh, dropped when the owner's queue is full: the next one
//! counts). The owner writes a presence change only when the user's stored
//! presence changes state (offline to online at the first sync, back to
//! offline when the heartbeats stop), so steady syncing writes nothing.
//! A state the user set themselves (`PUT /presence`) is kept while they
//! sync; it ends, like one set by syncing, when the syncing stops.

use std::rc::Rc;
use std::time::{Duration, Instant};

use ruma::{OwnedUserId, UserId};

use crate::shard::{Shard, ShardMsg};

/// The presence a sync asks for (`set_presence`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncPresence {
    Online,
    Unavailable,
}

impl SyncPresence {
    /// From `set_presence`: `None` for `offline` (the sync leaves presence
    /// alone) and for unknown values.
    pub fn from_param(value: Option<&str>) -> Option<SyncPresence> {
        match value {
            None | Some("online") => Some(SyncPresence::Online),
            Some("unavailable") => Some(SyncPresence::Unavailable),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SyncPresence::Online => "online",
            SyncPresence::Unavailable => "unavailable",
        }
    }
}

/// Most users a shard tracks in each of its presence maps; past it the map
/// is cleared (users then count as newly syncing, which writes nothing
/// while their stored presence is already right).
const TRACKED_MAX: usize = 200_000;

/// A sync of `user` started on this shard.
pub fn syncing(shard: &Rc<Shard>, user: &UserId, state: SyncPresence) {
    if !shard.config.presence.enabled {
        return;
    }
    let now = Instant::now();
    let gap = heartbeat_gap(shard);
    {
        let mut sent = shard.presence_sent.borrow_mut();
        if let Some((at, s)) = sent.get(user)
            && *s == state
            && now.saturating_duration_since(*at) < gap
        {
            return;
        }
        if sent.len() >= TRACKED_MAX {
            sent.clear();
        }
        sent.insert(user.to_owned(), (now, state));
    }
    let owner = shard.owner_of_user(user);
    if owner == shard.id {
        heard(shard, user.to_owned(), state);
    } else if let Some(mesh) = &shard.mesh {
        // Best effort: a full queue drops it, and the next heartbeat counts.
        let _ = mesh.try_send_to(owner, ShardMsg::Presence { user: user.to_owned(), state });
    }
}

/// On the user's owner shard: a heartbeat arrived.
pub fn heard(shard: &Rc<Shard>, user: OwnedUserId, state: SyncPresence) {
    let known = {
        let mut seen = shard.presence_seen.borrow_mut();
        if seen.len() >= TRACKED_MAX && !seen.contains_key(&user) {
            seen.clear();
        }
        seen.insert(user.clone(), (Instant::now(), state)).is_some_and(|(_, s)| s == state)
    };
    if known {
        return;
    }
    let shard = shard.clone();
    glommio::spawn_local(async move {
        if let Err(e) = set_if_changed(&shard, &user, Some(state)) {
            tracing::warn!(user = %user, error = %e.message, "presence from syncing not written");
        }
    })
    .detach();
}

/// Writes the user's presence as `state` (offline for `None`) unless it is
/// already that, keeping their status message. A user who set a state of
/// their own keeps it while syncing.
fn set_if_changed(shard: &Shard, user: &UserId, state: Option<SyncPresence>) -> crate::error::ApiResult<()> {
    let record = shard.db.presence(user)?;
    let current = record.as_ref().and_then(|r| r["presence"].as_str()).unwrap_or("offline");
    let status = record.as_ref().and_then(|r| r["status_msg"].as_str()).map(str::to_owned);
    let wanted = match state {
        Some(_) if current != "offline" => return Ok(()),
        Some(s) => s.as_str(),
        None if current == "offline" => return Ok(()),
        None => "offline",
    };
    crate::api::userdata::store_presence(shard, user, wanted, status.as_deref())
}

/// Between heartbeats of one user from one shard.
fn heartbeat_gap(shard: &Shard) -> Duration {
    Duration::from_millis(shard.config.presence.offline_after_ms / 6)
}

/// On every shard: marks offline the users it owns whose heartbeats
/// stopped. Runs until the shard stops.
pub async fn sweeper(shard: Rc<Shard>) {
    if !shard.config.presence.enabled {
        return;
    }
    let after = Duration::from_millis(shard.config.presence.offline_after_ms);
    loop {
        glommio::timer::sleep(heartbeat_gap(&shard)).await;
        if shard.shutting_down.get() {
            return;
        }
        let now = Instant::now();
        let gone: Vec<OwnedUserId> = {
            let mut seen = shard.presence_seen.borrow_mut();
            let gone: Vec<OwnedUserId> = seen.iter().filter(|(_, (at, _))| now.saturating_duration_since(*at) >= after).map(|(u, _)| u.clone()).collect();
            for u in &gone {
                seen.remove(u);
            }
            gone
        };
        for user in gone {
            if let Err(e) = set_if_changed(&shard, &user, None) {
                tracing::warn!(user = %user, error = %e.message, "presence going offline not written");
            }
        }
    }
}

/// At shutdown: marks offline the users this shard tracked as syncing, so
/// that no one stays online across a restart.
pub fn all_offline(shard: &Shard) {
    let users: Vec<OwnedUserId> = shard.presence_seen.borrow_mut().drain().map(|(u, _)| u).collect();
    for user in users {
        if let Err(e) = set_if_changed(shard, &user, None) {
            tracing::warn!(user = %user, error = %e.message, "presence going offline at shutdown not written");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_presence_values() {
        assert_eq!(SyncPresence::from_param(None), Some(SyncPresence::Online));
        assert_eq!(SyncPresence::from_param(Some("online")), Some(SyncPresence::Online));
        assert_eq!(SyncPresence::from_param(Some("unavailable")), Some(SyncPresence::Unavailable));
        assert_eq!(SyncPresence::from_param(Some("offline")), None);
        assert_eq!(SyncPresence::from_param(Some("busy")), None);
    }
}
