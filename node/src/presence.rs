//! Presence from syncing and activity: a user whose clients sync is online
//! (or `unavailable`, with `set_presence=unavailable`), becomes
//! `unavailable` after `presence.idle_after_ms` without doing anything
//! (sending an event, a receipt or a read marker, setting themselves
//! online), is online again at their next such act, and goes offline once
//! none of their clients has started a sync, and they have done nothing,
//! for `presence.offline_after_ms`.
//!
//! Each user's syncing is tracked by one owner shard, picked by hashing the
//! user id on the ring as rooms are. The shard serving a sync tells the
//! owner at most every sixth of the offline delay (a heartbeat message over
//! the shard mesh, dropped when the owner's queue is full: the next one
//! counts); the shard serving an act tells it at most once a minute (or a
//! sixth of the idle delay, if shorter). The owner writes a presence change
//! only when the user's stored presence changes state (offline to online at
//! the first sync, online to unavailable when idle, back to online when
//! active, to offline when the heartbeats stop), so steady syncing writes
//! nothing. A state the user set themselves (`PUT /presence`) is kept while
//! they sync; it ends, like one set by syncing, when the syncing stops.
//!
//! Every user whose stored presence is not offline is also listed in
//! [`Table::PresenceLive`](crate::storage::Table::PresenceLive). A node
//! that stops cleanly marks the users it tracked offline; one that crashed
//! cannot, so at start every shard takes over the listed users it owns as
//! if it had just heard from them, and they go offline after the usual
//! delay unless a client of theirs syncs.

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

/// Longest time between two activity messages about one user from one
/// shard (the idle delay's sixth when that is shorter).
const ACTIVE_GAP_MAX: Duration = Duration::from_secs(60);

/// Users of the live list read in one page at start.
const RESTORE_PAGE: usize = 4_096;

/// What a user's owner shard knows of them.
#[derive(Clone, Copy, Debug)]
pub struct Tracked {
    /// When a sync or an act of theirs was last heard of.
    pub heard: Instant,
    /// The presence their syncs ask for.
    pub state: SyncPresence,
    /// When an act of theirs was last heard of (or they came online).
    pub active: Instant,
    /// Whether the idle timer made them unavailable since.
    pub idle: bool,
}

impl Tracked {
    fn new(now: Instant, state: SyncPresence) -> Tracked {
        Tracked { heard: now, state, active: now, idle: false }
    }
}

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
    tell_owner(shard, user, ShardMsg::Presence { user: user.to_owned(), state });
}

/// `user` did something on this shard that shows they are at a client:
/// sent an event, a receipt or a read marker. `now` skips the throttle
/// (a user setting themselves online).
pub fn active(shard: &Rc<Shard>, user: &UserId, now: bool) {
    if !shard.config.presence.enabled {
        return;
    }
    let at = Instant::now();
    {
        let mut sent = shard.presence_active_sent.borrow_mut();
        if !now
            && let Some(last) = sent.get(user)
            && at.saturating_duration_since(*last) < active_gap(shard)
        {
            return;
        }
        if sent.len() >= TRACKED_MAX {
            sent.clear();
        }
        sent.insert(user.to_owned(), at);
    }
    tell_owner(shard, user, ShardMsg::Active { user: user.to_owned() });
}

fn tell_owner(shard: &Rc<Shard>, user: &UserId, msg: ShardMsg) {
    let owner = shard.owner_of_user(user);
    if owner == shard.id {
        shard.receive(msg);
    } else if let Some(mesh) = &shard.mesh {
        // Best effort: a full queue drops it, and the next message counts.
        let _ = mesh.try_send_to(owner, msg);
    }
}

/// On the user's owner shard: a sync heartbeat arrived.
pub fn heard(shard: &Rc<Shard>, user: OwnedUserId, state: SyncPresence) {
    let now = Instant::now();
    let known = {
        let mut seen = shard.presence_seen.borrow_mut();
        if seen.len() >= TRACKED_MAX && !seen.contains_key(&user) {
            seen.clear();
        }
        match seen.get_mut(&user) {
            Some(t) => {
                t.heard = now;
                let same = t.state == state;
                if !same && state == SyncPresence::Online {
                    // Back in the foreground.
                    t.active = now;
                }
                t.state = state;
                same
            }
            None => {
                seen.insert(user.clone(), Tracked::new(now, state));
                false
            }
        }
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

/// On the user's owner shard: an act of theirs was heard of. An offline
/// user, or one the idle timer made unavailable, is online again.
pub fn heard_active(shard: &Rc<Shard>, user: OwnedUserId) {
    let now = Instant::now();
    {
        let mut seen = shard.presence_seen.borrow_mut();
        if seen.len() >= TRACKED_MAX && !seen.contains_key(&user) {
            seen.clear();
        }
        let t = seen.entry(user.clone()).or_insert_with(|| Tracked::new(now, SyncPresence::Online));
        t.heard = now;
        t.active = now;
        t.idle = false;
    }
    let shard = shard.clone();
    glommio::spawn_local(async move {
        if let Err(e) = wake(&shard, &user) {
            tracing::warn!(user = %user, error = %e.message, "presence from activity not written");
        }
    })
    .detach();
}

/// The stored presence record's state, status message, last activity
/// and idle flag.
fn current(shard: &Shard, user: &UserId) -> crate::error::ApiResult<(String, Option<String>, Option<u64>, bool)> {
    let record = shard.db.presence(user)?;
    let field = |k: &str| record.as_ref().map(|r| r[k].clone()).unwrap_or(serde_json::Value::Null);
    Ok((
        field("presence").as_str().unwrap_or("offline").to_owned(),
        field("status_msg").as_str().map(str::to_owned),
        field("last_active_ts").as_u64(),
        field("idle").as_bool().unwrap_or(false),
    ))
}

/// Writes the user's presence as `state` (offline for `None`) unless it is
/// already that, keeping their status message. A user who set a state of
/// their own keeps it while syncing.
fn set_if_changed(shard: &Shard, user: &UserId, state: Option<SyncPresence>) -> crate::error::ApiResult<()> {
    let (current, status, last_active, _) = current(shard, user)?;
    match state {
        Some(_) if current != "offline" => Ok(()),
        Some(s) => store_presence(shard, user, s.as_str(), status.as_deref(), crate::room::now_ms(), false),
        None if current == "offline" => Ok(()),
        None => store_presence(shard, user, "offline", status.as_deref(), last_active.unwrap_or_else(crate::room::now_ms), false),
    }
}

/// Activity: online again unless the user chose a state of their own.
fn wake(shard: &Shard, user: &UserId) -> crate::error::ApiResult<()> {
    let (current, status, _, idle) = current(shard, user)?;
    if current == "offline" || (current == "unavailable" && idle) {
        store_presence(shard, user, "online", status.as_deref(), crate::room::now_ms(), false)?;
    }
    Ok(())
}

/// The idle timer ran out: an online user becomes unavailable.
fn set_idle(shard: &Shard, user: &UserId) -> crate::error::ApiResult<()> {
    let (current, status, last_active, _) = current(shard, user)?;
    if current == "online" {
        store_presence(shard, user, "unavailable", status.as_deref(), last_active.unwrap_or_else(crate::room::now_ms), true)?;
    }
    Ok(())
}

fn store_presence(shard: &Shard, user: &UserId, presence: &str, status: Option<&str>, last_active_ts: u64, idle: bool) -> crate::error::ApiResult<()> {
    crate::api::userdata::store_presence(shard, user, presence, status, last_active_ts, idle)
}

/// Between heartbeats of one user from one shard.
fn heartbeat_gap(shard: &Shard) -> Duration {
    Duration::from_millis(shard.config.presence.offline_after_ms / 6)
}

/// Between activity messages about one user from one shard.
fn active_gap(shard: &Shard) -> Duration {
    match shard.config.presence.idle_after_ms {
        0 => ACTIVE_GAP_MAX,
        idle => Duration::from_millis(idle / 6).min(ACTIVE_GAP_MAX),
    }
}

/// Between two sweeps for idle and gone users.
fn sweep_gap(shard: &Shard) -> Duration {
    match shard.config.presence.idle_after_ms {
        0 => heartbeat_gap(shard),
        idle => heartbeat_gap(shard).min(Duration::from_millis(idle / 6)),
    }
}

/// On every shard: marks unavailable the users it owns who stopped
/// acting, and offline those whose heartbeats stopped. Runs until the
/// shard stops.
pub async fn sweeper(shard: Rc<Shard>) {
    if !shard.config.presence.enabled {
        return;
    }
    let after = Duration::from_millis(shard.config.presence.offline_after_ms);
    let idle_after = match shard.config.presence.idle_after_ms {
        0 => None,
        ms => Some(Duration::from_millis(ms)),
    };
    loop {
        glommio::timer::sleep(sweep_gap(&shard)).await;
        if shard.shutting_down.get() {
            return;
        }
        let now = Instant::now();
        let (gone, idle) = {
            let mut seen = shard.presence_seen.borrow_mut();
            let mut gone = Vec::new();
            let mut idle = Vec::new();
            for (user, t) in seen.iter_mut() {
                if now.saturating_duration_since(t.heard) >= after {
                    gone.push(user.clone());
                } else if let Some(idle_after) = idle_after
                    && t.state == SyncPresence::Online
                    && !t.idle
                    && now.saturating_duration_since(t.active) >= idle_after
                {
                    t.idle = true;
                    idle.push(user.clone());
                }
            }
            for u in &gone {
                seen.remove(u);
            }
            (gone, idle)
        };
        for user in idle {
            if let Err(e) = set_idle(&shard, &user) {
                tracing::warn!(user = %user, error = %e.message, "presence going idle not written");
            }
        }
        for user in gone {
            if let Err(e) = set_if_changed(&shard, &user, None) {
                tracing::warn!(user = %user, error = %e.message, "presence going offline not written");
            }
        }
    }
}

/// At start: tracks the users this shard owns whose stored presence is not
/// offline (a crash left them so), as if a sync of theirs had just been
/// heard of. Returns how many.
pub fn restore(shard: &Shard) -> crate::error::ApiResult<usize> {
    if !shard.config.presence.enabled {
        return Ok(0);
    }
    let now = Instant::now();
    let mut after: Option<OwnedUserId> = None;
    let mut count = 0;
    loop {
        let page = shard.db.presence_live(after.as_deref(), RESTORE_PAGE)?;
        let full = page.len() == RESTORE_PAGE;
        let mut seen = shard.presence_seen.borrow_mut();
        for user in &page {
            if shard.owner_of_user(user) == shard.id && seen.len() < TRACKED_MAX {
                seen.entry(user.clone()).or_insert_with(|| Tracked::new(now, SyncPresence::Online));
                count += 1;
            }
        }
        after = page.last().cloned();
        if !full {
            return Ok(count);
        }
    }
}

/// A deactivated account: offline now, whatever its clients do.
pub fn gone(shard: &Shard, user: &UserId) -> crate::error::ApiResult<()> {
    set_if_changed(shard, user, None)
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
