//! Push rules: each user's rule set (the spec's defaults plus their own
//! rules, stored as `m.push_rules` account data), evaluated on every new
//! event to maintain unread notification and highlight counts.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use ruma::power_levels::NotificationPowerLevels;
use ruma::push::{Action, FlattenedJson, PushConditionPowerLevelsCtx, PushConditionRoomCtx, Ruleset};
use ruma::room_version_rules::RoomPowerLevelsRules;
use ruma::serde::Raw;
use ruma::{Int, OwnedUserId, RoomId, UInt, UserId};
use serde_json::{Value, json};

use crate::db::{Db, Unread};
use crate::error::ApiResult;
use crate::pdu::{Event, Pdu, StoredEvent};
use crate::room::CachedRoom;
use crate::shard::Shard;

/// The user's rule set: their stored one, or the server defaults.
pub fn ruleset(db: &Db, user: &UserId) -> ApiResult<Ruleset> {
    if let Some(entry) = db.account_data(user, None, "m.push_rules")?
        && let Some(rules) = stored_ruleset(&entry.content)
    {
        return Ok(rules);
    }
    Ok(Ruleset::server_default(user))
}

/// The `m.push_rules` account data content for a rule set.
pub fn ruleset_content(rules: &Ruleset) -> Value {
    json!({ "global": rules })
}

/// Evaluates the push rules of every joined local member (except the
/// sender) for `pdu` and returns the members whose unread counts change,
/// with their new counts, and the thread the event counts in (from
/// `thread_of`, asked only when the event notifies someone).
///
/// Members without rules of their own share one evaluation of the default
/// rules: those rules depend on the member only through their user id,
/// localpart and display name, so for every member none of which appears
/// in the event, the outcome is the same as for a neutral identity. Members
/// named in the event, and members with their own rules, are evaluated one
/// by one.
pub fn evaluate(shard: &Shard, room: &RoomId, cached: &mut CachedRoom, pdu: &Arc<Pdu>, thread_of: &mut dyn FnMut() -> ApiResult<Option<String>>) -> ApiResult<(Vec<Notified>, Option<String>)> {
    let members = match &cached.members {
        Some(m) => m.clone(),
        None => {
            let m = Rc::new(joined_members(cached));
            cached.members = Some(m.clone());
            m
        }
    };
    if members.len() < 2 {
        return Ok((Vec::new(), None));
    }
    let member_count = UInt::try_from(members.len()).unwrap_or(UInt::MAX);
    let event = Event { pdu: pdu.clone(), stored: Arc::new(StoredEvent { json: Box::default(), pos: 0, txn: None, redacted_by: None, redacted_because: None, prev_content: None, prev_sender: None, replaces_state: None }) };
    // The client format, written straight from the fields.
    let raw = crate::pdu::Rendered::new(event).render(0, None);
    let haystack = raw.get().to_lowercase();
    let raw: Raw<Value> = Raw::from_json(raw);
    // Flattened once for every evaluation of this event.
    let flat = FlattenedJson::from_raw(&raw);
    let power = match &cached.push_power {
        Some(p) => p.clone(),
        None => cached.push_power.insert(Rc::new(power_levels(cached))).clone(),
    };
    let outcome = |rules: &Ruleset, user: &UserId, name: &str| -> (bool, bool) {
        let ctx = PushConditionRoomCtx::new(room.to_owned(), member_count, user.to_owned(), name.to_owned()).with_power_levels((*power).clone());
        // The first rule that applies decides (as `Ruleset::get_actions`).
        let actions = futures_lite::future::block_on(async {
            for rule in rules {
                if rule.applies(&flat, &ctx).await {
                    return rule.actions();
                }
            }
            &[]
        });
        (actions.iter().any(Action::should_notify), actions.iter().any(Action::is_highlight))
    };
    // Members who ignore the sender are not notified of their events.
    let ignorers = shard.ignorers_of(&pdu.sender)?;
    let neutral = shard.neutral_rules.get_or_init(|| ruma::OwnedUserId::try_from(format!("@{NEUTRAL}:{}", shard.server_name)).ok().map(|n| {
        let rules = Rc::new(Ruleset::server_default(&n));
        (n, rules)
    }));
    let neutral_usable = neutral.is_some() && !haystack.contains(NEUTRAL);
    let mut shared: Option<(bool, bool)> = None;
    let mut out = Vec::new();
    let mut thread: Option<Option<String>> = None;
    for member in members.iter() {
        let user = &member.user;
        // Members of other servers are counted by their own server.
        if *user == pdu.sender || user.server_name() != shard.server_name || ignorers.contains(user) {
            continue;
        }
        let named = member.needles.iter().any(|n| haystack.contains(n.as_str()));
        let (notify, highlight) = match shard.custom_ruleset(user)? {
            Some(rules) => outcome(&rules, user, &member.name),
            None if named || !neutral_usable => outcome(&Ruleset::server_default(user), user, &member.name),
            None => *shared.get_or_insert_with(|| match neutral {
                Some((n, rules)) => outcome(rules, n, NEUTRAL),
                None => (false, false),
            }),
        };
        if !notify && !highlight {
            continue;
        }
        let mut counts = match cached.unread.get(user) {
            Some(c) => c.clone(),
            None => shard.db.unread(user, room)?,
        };
        let thread = match &thread {
            Some(t) => t,
            None => thread.insert(thread_of()?),
        };
        counts.add(thread.as_deref(), highlight);
        out.push((user.clone(), counts, highlight));
    }
    Ok((out, thread.flatten()))
}

/// The room's power levels as push conditions read them: each user's
/// level, the default, the level that may notify the whole room, and the
/// creators who outrank everyone (room version 12 and later). Without a
/// power levels event, the creator alone has 100 (earlier versions).
fn power_levels(cached: &CachedRoom) -> PushConditionPowerLevelsCtx {
    let create = cached.state.get(&("m.room.create".to_owned(), String::new())).map(|(p, _)| p.clone());
    let creators = create.as_deref().map(|c| crate::room::creators(c, &cached.rules)).unwrap_or_default();
    let rules = RoomPowerLevelsRules::new(&cached.rules.authorization, creators);
    let mut notifications = NotificationPowerLevels::new();
    let int = |v: &Value| v.as_i64().or_else(|| v.as_str().and_then(|s| s.parse().ok())).and_then(|n| Int::try_from(n).ok());
    let Some((pl, _)) = cached.state.get(&("m.room.power_levels".to_owned(), String::new())) else {
        let mut users = BTreeMap::new();
        if let Some(c) = &create
            && rules.privileged_creators.is_none()
        {
            users.insert(c.sender.clone(), Int::from(100u8));
        }
        return PushConditionPowerLevelsCtx::new(users, Int::default(), notifications, rules);
    };
    let content = pl.content_value();
    let users = content["users"].as_object().map(|m| m.iter().filter_map(|(u, l)| Some((OwnedUserId::try_from(u.as_str()).ok()?, int(l)?))).collect()).unwrap_or_default();
    if let Some(room) = int(&content["notifications"]["room"]) {
        notifications.room = room;
    }
    PushConditionPowerLevelsCtx::new(users, int(&content["users_default"]).unwrap_or_default(), notifications, rules)
}

/// A member an event notified: their new unread counts, and whether it
/// highlighted them.
pub type Notified = (OwnedUserId, Unread, bool);

/// A joined member as push rules see them.
pub struct Member {
    pub user: OwnedUserId,
    /// Display name, or the localpart when none is set.
    pub name: String,
    /// Lowercased user id, localpart and display name: an event containing
    /// none of them cannot match a rule that depends on the member.
    needles: [String; 3],
}

/// The room's joined members, from its cached current state.
fn joined_members(cached: &CachedRoom) -> Vec<Member> {
    cached
        .state
        .iter()
        .filter(|((ty, _), (p, _))| ty == "m.room.member" && p.membership().as_deref() == Some("join"))
        .filter_map(|((_, sk), (p, _))| {
            let user = UserId::parse(sk.as_str()).ok()?;
            let name = p.content_value()["displayname"].as_str().unwrap_or(user.localpart()).to_owned();
            let needles = [user.as_str().to_lowercase(), user.localpart().to_lowercase(), name.to_lowercase()];
            Some(Member { user, name, needles })
        })
        .collect()
}

/// Parses a stored `m.push_rules` account data entry.
pub fn stored_ruleset(content: &Value) -> Option<Ruleset> {
    content.get("global").and_then(|g| serde_json::from_value::<Ruleset>(g.clone()).ok())
}

/// Localpart and display name of the neutral identity used for the shared
/// evaluation of the default rules.
const NEUTRAL: &str = "tessera.push.neutral.identity";

#[cfg(test)]
mod tests {
    use super::*;

    fn actions(rules: &Ruleset, event: Value, user: &str, name: &str, members: u32) -> Vec<Action> {
        let raw: Raw<Value> = Raw::from_json(serde_json::value::to_raw_value(&event).expect("raw"));
        let ctx = PushConditionRoomCtx::new("!r:x".try_into().expect("room"), members.into(), user.try_into().expect("user"), name.into());
        futures_lite::future::block_on(rules.get_actions(&raw, &ctx)).to_vec()
    }

    #[test]
    fn default_rules_notify_in_one_to_one_and_highlight_mentions() {
        let bob: OwnedUserId = "@bob:x".try_into().expect("user");
        let rules = Ruleset::server_default(&bob);
        let msg = json!({ "type": "m.room.message", "sender": "@alice:x", "content": { "msgtype": "m.text", "body": "hello" }, "room_id": "!r:x", "event_id": "$e" });
        let a = actions(&rules, msg.clone(), "@bob:x", "Bob", 2);
        assert!(a.iter().any(Action::should_notify));
        assert!(!a.iter().any(Action::is_highlight));
        let mention = json!({ "type": "m.room.message", "sender": "@alice:x", "content": { "msgtype": "m.text", "body": "hi Bob", "m.mentions": { "user_ids": ["@bob:x"] } }, "room_id": "!r:x", "event_id": "$e" });
        let a = actions(&rules, mention, "@bob:x", "Bob", 50);
        assert!(a.iter().any(Action::is_highlight));
        // The sender's own events never notify.
        let own = json!({ "type": "m.room.message", "sender": "@bob:x", "content": { "msgtype": "m.text", "body": "me" }, "room_id": "!r:x", "event_id": "$e" });
        assert!(actions(&rules, own, "@bob:x", "Bob", 2).is_empty());
    }

    #[test]
    fn stored_content_round_trips() {
        let bob: OwnedUserId = "@bob:x".try_into().expect("user");
        let rules = Ruleset::server_default(&bob);
        let content = ruleset_content(&rules);
        let back: Ruleset = serde_json::from_value(content["global"].clone()).expect("parse");
        assert_eq!(serde_json::to_value(&back).expect("ser"), content["global"]);
    }
}
