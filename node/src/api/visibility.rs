//! History visibility (spec "History visibility"): which of a room's events
//! a user may read.
//!
//! Every reader first bounds what it reads by the user's membership: all of
//! the timeline for members, up to their leave for former members. Rooms
//! whose history visibility was only ever `shared` (the default) need
//! nothing more. In a room whose head says its visibility was ever set to
//! something else (`RoomHead::restricted_history`), each event is checked
//! as Synapse does: against the visibility in force when it was sent and
//! the user's membership then (just after it, for their own member events),
//! from the short histories of the room's `m.room.history_visibility` and
//! the user's `m.room.member` state, walked back through the state each
//! event replaced.
//!
//! - `world_readable`: anyone may read the event, members or not.
//! - `shared`: members may read it, even from before they joined.
//! - `invited`: only users who were invited or joined when it was sent.
//! - `joined`: only users who were joined when it was sent.

use ruma::{OwnedEventId, RoomId, UserId};

use crate::error::{ApiError, ApiResult};
use crate::pdu::{Event, Pdu};
use crate::shard::Shard;

/// Most state changes followed back for one state key.
const HISTORY_HOPS_MAX: usize = 1_000;

/// What one user may read of one room.
pub struct Reader {
    /// Nothing after this position: the user's leave, for former members.
    pub upto: u64,
    /// Present in rooms whose history was ever not `shared`.
    view: Option<View>,
    /// Present in rooms with erased senders.
    erasure: Option<Erasure>,
}

/// Erased senders of a room, and when the reader first joined it: the
/// spec serves redacted copies of an erased account's events to those
/// who join after the erasure; whoever could see them before still can.
struct Erasure {
    /// Sender -> the room's last event position when they were erased.
    senders: std::collections::HashMap<ruma::OwnedUserId, u64>,
    /// The position of the reader's first join, if any.
    first_join: Option<u64>,
}

struct View {
    user: ruma::OwnedUserId,
    /// The user's membership changes, oldest first: (position, membership).
    memberships: Vec<(u64, String)>,
    /// The room's history visibility changes, oldest first.
    visibility: Vec<(u64, String)>,
    joined_now: bool,
}

impl Reader {
    /// The reader for `user` in `room`: 403 for users who never joined,
    /// unless the room is world readable now.
    pub fn new(shard: &Shard, room: &RoomId, user: &UserId) -> ApiResult<Reader> {
        let membership = shard.db.user_room(user, room)?.map(|ur| (ur.membership, ur.pos));
        let upto = match &membership {
            Some((m, _)) if m == "join" => Some(u64::MAX),
            Some((m, pos)) if m == "leave" || m == "ban" => Some(*pos),
            _ => None,
        };
        let head = shard.db.room_head(room)?;
        let restricted = head.as_ref().is_some_and(|h| h.restricted_history);
        let erased = head.map(|h| h.erased).unwrap_or_default();
        let memberships = if restricted || !erased.is_empty() { history(shard, room, "m.room.member", user.as_str(), |p| p.membership())? } else { Vec::new() };
        let erasure = (!erased.is_empty()).then(|| Erasure { senders: erased.into_iter().collect(), first_join: memberships.iter().find(|(_, m)| m == "join").map(|(p, _)| *p) });
        if !restricted {
            return match upto {
                Some(upto) => Ok(Reader { upto, view: None, erasure }),
                None => Err(ApiError::forbidden("You are not a member of this room")),
            };
        }
        let view = View {
            user: user.to_owned(),
            memberships,
            visibility: history(shard, room, "m.room.history_visibility", "", |p| p.content_value()["history_visibility"].as_str().map(str::to_owned))?,
            joined_now: membership.as_ref().is_some_and(|(m, _)| m == "join"),
        };
        let upto = match upto {
            Some(upto) => upto,
            // Not a member: only a room that is world readable now can be
            // read (and of it, only what was sent while it was).
            None if view.visibility.last().is_some_and(|(_, v)| v == "world_readable") => u64::MAX,
            None => return Err(ApiError::forbidden("You are not a member of this room")),
        };
        Ok(Reader { upto, view: Some(view), erasure })
    }

    /// Whether readers of `head`'s room need a [`Reader`] for each event,
    /// not just its `upto`: the history was ever not `shared`, or some
    /// sender was erased.
    pub fn needed(head: &crate::db::RoomHead) -> bool {
        head.restricted_history || !head.erased.is_empty()
    }

    /// Whether the user must get `ev` redacted: its sender was erased, and
    /// the user first joined after that (or never did).
    pub fn redacts(&self, ev: &Event) -> bool {
        let Some(erasure) = &self.erasure else { return false };
        let Some(at) = erasure.senders.get(&ev.pdu.sender) else { return false };
        erasure.first_join.is_none_or(|joined| joined > *at)
    }

    /// `ev` as the user may read it (see [`Reader::redacts`]).
    pub fn shown(&self, ev: Event) -> Event {
        if self.redacts(&ev) { ev.erased_copy() } else { ev }
    }

    /// Whether the user may read `ev` (an event of this room).
    pub fn allows(&self, ev: &Event) -> bool {
        if ev.stored.pos > self.upto {
            return false;
        }
        match &self.view {
            None => true,
            Some(view) => view.allows(&ev.pdu, ev.stored.pos),
        }
    }
}

/// The value of the last change before `pos`.
fn before(changes: &[(u64, String)], pos: u64) -> Option<&str> {
    changes.iter().rev().find(|(p, _)| *p < pos).map(|(_, v)| v.as_str())
}

impl View {
    fn allows(&self, pdu: &Pdu, pos: u64) -> bool {
        let mut visibility = before(&self.visibility, pos).unwrap_or("shared");
        // A change of visibility is judged by the more open of the two.
        if pdu.kind.to_string() == "m.room.history_visibility"
            && let Some(new) = self.visibility.iter().find(|(p, _)| *p == pos).map(|(_, v)| v.as_str())
            && openness(new) > openness(visibility)
        {
            visibility = new;
        }
        if visibility == "world_readable" {
            return true;
        }
        let own = pdu.kind.to_string() == "m.room.member" && pdu.state_key.as_deref() == Some(self.user.as_str());
        let membership = if own { pdu.membership() } else { before(&self.memberships, pos).map(str::to_owned) };
        match (membership.as_deref(), visibility) {
            (Some("join"), _) => true,
            (Some("invite"), "invited") => true,
            (_, "shared") => self.joined_now,
            _ => false,
        }
    }
}

/// How much a visibility shows: the order used to judge its own changes.
fn openness(visibility: &str) -> u8 {
    match visibility {
        "world_readable" => 3,
        "shared" => 2,
        "invited" => 1,
        _ => 0,
    }
}

/// The values a state key of `room` took, oldest first, with the position
/// of each change: from its current event back through the state each
/// event replaced.
fn history(shard: &Shard, room: &RoomId, kind: &str, state_key: &str, value: impl Fn(&Pdu) -> Option<String>) -> ApiResult<Vec<(u64, String)>> {
    let mut out = Vec::new();
    let Some(mut ev) = shard.db.state_event(room, kind, state_key)? else { return Ok(out) };
    for _ in 0..HISTORY_HOPS_MAX {
        if let Some(v) = value(&ev.pdu) {
            out.push((ev.stored.pos, v));
        }
        let Some(previous) = ev.stored.replaces_state.as_deref().and_then(|id| OwnedEventId::try_from(id).ok()) else { break };
        match shard.db.event(&previous)? {
            Some(e) => ev = e,
            None => break,
        }
    }
    out.reverse();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(memberships: &[(u64, &str)], visibility: &[(u64, &str)], joined_now: bool) -> View {
        let own = |v: &[(u64, &str)]| v.iter().map(|(p, s)| (*p, s.to_string())).collect();
        View { user: "@u:x".try_into().expect("user"), memberships: own(memberships), visibility: own(visibility), joined_now }
    }

    fn message(pos: u64) -> (Pdu, u64) {
        let json = serde_json::json!({ "type": "m.room.message", "room_id": "!r:x", "sender": "@o:x", "content": { "body": "hi" }, "origin_server_ts": 1, "depth": 1, "prev_events": [], "auth_events": [] });
        (Pdu::parse(&json.to_string(), "$e".try_into().expect("id")).expect("pdu"), pos)
    }

    #[test]
    fn joined_visibility_hides_what_came_before_the_join() {
        let v = view(&[(10, "join")], &[(2, "joined")], true);
        let (m, _) = message(0);
        assert!(!v.allows(&m, 5));
        assert!(v.allows(&m, 11));
    }

    #[test]
    fn invited_visibility_shows_from_the_invite() {
        let v = view(&[(10, "invite"), (20, "join")], &[(2, "invited")], true);
        let (m, _) = message(0);
        assert!(!v.allows(&m, 5));
        assert!(v.allows(&m, 15));
        let v = view(&[(10, "invite"), (20, "join")], &[(2, "joined")], true);
        assert!(!v.allows(&m, 15));
    }

    #[test]
    fn shared_history_is_for_current_members() {
        let (m, _) = message(0);
        assert!(view(&[(10, "join")], &[(2, "joined"), (4, "shared")], true).allows(&m, 5));
        assert!(!view(&[(10, "join"), (30, "leave")], &[(2, "shared")], false).allows(&m, 5));
        assert!(view(&[(10, "join"), (30, "leave")], &[(2, "shared")], false).allows(&m, 15));
    }

    #[test]
    fn world_readable_history_is_for_everyone() {
        let (m, _) = message(0);
        let v = view(&[], &[(2, "world_readable"), (8, "joined")], false);
        assert!(v.allows(&m, 5));
        assert!(!v.allows(&m, 9));
    }
}
