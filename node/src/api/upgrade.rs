//! Room upgrades: `POST /rooms/{roomId}/upgrade`, and what follows a
//! member into the replacement room when they join it.
//!
//! An upgrade creates a replacement room of the requested version whose
//! create event names its predecessor, copies the old room's
//! transferable state into it (as Synapse does: name, topic, avatar, join
//! rules, history visibility, guest access, encryption, server ACLs, the
//! canonical alias, space children, bans, and the power levels last), tombstones the old room, lowers what ordinary members may
//! do there, and moves the old room's local aliases and directory listing
//! to the new room. Members are not moved: clients follow the tombstone.
//!
//! When a local member of the old room joins the replacement (the upgrader
//! does at creation), their tags of the old room and their push rules that
//! name it are copied to the new room.

use std::rc::Rc;

use ruma::push::{NewConditionalPushRule, NewPushRule, NewSimplePushRule, PushCondition, RuleKind, Ruleset};
use ruma::{OwnedRoomId, RoomId, UserId};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::rooms::{additional_creators, ensure_joined, parse_room, room_power, supported_version};
use crate::api::userdata::{room_tags, save_rules, write_account_data};
use crate::error::{ApiError, ApiResult};
use crate::http::{Authed, Req};
use crate::room::member_content;
use crate::shard::{Draft, NewRoom, RoomOp, Shard};

/// State carried into the replacement room, under the empty state key.
const TRANSFERRED: [&str; 9] = [
    "m.room.server_acl",
    "m.room.encryption",
    "m.room.name",
    "m.room.avatar",
    "m.room.topic",
    "m.room.guest_access",
    "m.room.history_visibility",
    "m.room.join_rules",
    "m.room.canonical_alias",
];

/// Most space children and most bans carried into the replacement room.
const CARRIED_PER_KIND_MAX: usize = 10_000;

/// The old room's events and invites need at least this power level once
/// it is replaced (or one more than `users_default`, if that is higher).
const REPLACED_ROOM_LEVEL: i64 = 50;

/// POST /_matrix/client/v3/rooms/{roomId}/upgrade
pub async fn upgrade(shard: &Rc<Shard>, req: &Req, auth: &Authed, room: &str) -> ApiResult<Value> {
    #[derive(Deserialize)]
    struct Body {
        new_version: String,
        #[serde(default)]
        additional_creators: Vec<String>,
    }
    let body: Body = req.json(shard)?;
    let old = parse_room(room)?;
    supported_version(&body.new_version)?;
    // Room version 12 and later: creators have infinite power and are not
    // listed in the power levels. Earlier versions ignore
    // `additional_creators`.
    let privileged = crate::room::rules_for(&body.new_version)?.authorization.explicitly_privilege_room_creators;
    let creators = if privileged {
        let listed = body.additional_creators.iter().map(|u| crate::api::rooms::parse_user(u)).collect::<ApiResult<Vec<_>>>()?;
        additional_creators(&json!({}), &auth.user, &listed)?
    } else {
        Vec::new()
    };
    let Some(head) = shard.db.room_head(&old)? else { return Err(ApiError::not_found("Unknown room")) };
    ensure_joined(shard, &old, &auth.user)?;
    let (level, pl) = room_power(shard, &old, &auth.user)?;
    if !may_tombstone(&pl, level, &head.creator, &auth.user) {
        return Err(ApiError::forbidden("You may not upgrade this room"));
    }
    let content = |kind: &str, state_key: &str| -> ApiResult<Option<Value>> { Ok(shard.db.state_event(&old, kind, state_key)?.map(|e| e.pdu.content_value())) };
    let old_create = content("m.room.create", "")?.unwrap_or_default();

    let mut create_content = json!({ "room_version": body.new_version, "predecessor": { "room_id": old } });
    if let Some(last) = head.extremities.first() {
        create_content["predecessor"]["event_id"] = json!(last);
    }
    if body.new_version == "10" {
        create_content["creator"] = json!(auth.user);
    }
    if !creators.is_empty() {
        create_content["additional_creators"] = json!(creators);
    }
    for key in ["type", "m.federate"] {
        if let Some(v) = old_create.get(key) {
            create_content[key] = v.clone();
        }
    }

    let draft = |kind: &str, state_key: &str, content: Value| Draft { sender: auth.user.clone(), kind: kind.into(), state_key: Some(state_key.into()), content, txn: None, redacts: None };
    // Until the power levels are copied (last), the creator may send any
    // state, so everything before them passes the auth rules.
    let mut events = vec![draft("m.room.member", auth.user.as_str(), member_content(&shard.db, &auth.user, "join", None)?)];
    for kind in TRANSFERRED {
        if let Some(c) = content(kind, "")?
            && c.as_object().is_some_and(|o| !o.is_empty())
        {
            events.push(draft(kind, "", c));
        }
    }
    for (state_key, entry) in shard.db.state_of_type(&old, "m.space.child", CARRIED_PER_KIND_MAX)? {
        if let Some(e) = shard.db.event(&entry.event_id)? {
            events.push(draft("m.space.child", &state_key, e.pdu.content_value()));
        }
    }
    for banned in shard.db.members(&old, "ban", CARRIED_PER_KIND_MAX)? {
        if banned != auth.user.as_str() {
            let mut ban = json!({ "membership": "ban" });
            if let Some(reason) = content("m.room.member", &banned)?.and_then(|c| c.get("reason").cloned()) {
                ban["reason"] = reason;
            }
            events.push(draft("m.room.member", &banned, ban));
        }
    }
    if pl.is_object() {
        let mut new_pl = pl.clone();
        if privileged {
            // The creators hold infinite power, and may not be listed.
            if let Some(users) = new_pl["users"].as_object_mut() {
                users.retain(|u, _| u != auth.user.as_str() && !creators.iter().any(|c| c == u));
            }
            let state_default = new_pl["state_default"].as_i64().unwrap_or(50);
            if new_pl["events"]["m.room.tombstone"].as_i64().unwrap_or(state_default) <= state_default {
                new_pl["events"]["m.room.tombstone"] = json!(state_default.saturating_add(1).max(150));
            }
        }
        events.push(draft("m.room.power_levels", "", new_pl));
    }

    let version = body.new_version.clone();
    let ok = |_: &RoomId| Ok(());
    let new = crate::room::create_room(shard, NewRoom { creator: auth.user.clone(), version, events, create_content, ts: crate::room::now_ms() }, &ok, &ok).await?;

    // From here the replacement exists; the old room is pointed at it.
    let tombstone = json!({ "body": "This room has been replaced", "replacement_room": new });
    shard.room_op(&old, RoomOp::Send(draft("m.room.tombstone", "", tombstone))).await?;
    if let Some(restricted) = restricted_levels(&pl)
        && let Err(e) = shard.room_op(&old, RoomOp::Send(draft("m.room.power_levels", "", restricted))).await
    {
        tracing::info!(room = %old, error = %e.message, "replaced room's power levels left as they were");
    }
    move_aliases(shard, &old, &new)?;
    if content("m.room.canonical_alias", "")?.is_some_and(|c| c.as_object().is_some_and(|o| !o.is_empty()))
        && let Err(e) = shard.room_op(&old, RoomOp::Send(draft("m.room.canonical_alias", "", json!({})))).await
    {
        tracing::info!(room = %old, error = %e.message, "replaced room's canonical alias left as it was");
    }
    if shard.db.is_published(&old)? {
        shard.db.set_published(&new, true)?;
        shard.db.set_published(&old, false)?;
    }
    carry_member_state(shard, &auth.user, &old, &new)?;
    tracing::info!(old = %old, new = %new, by = %auth.user, "room upgraded");
    Ok(json!({ "replacement_room": new }))
}

/// Whether `user`, of power `level`, may send `m.room.tombstone` under
/// these power levels.
fn may_tombstone(pl: &Value, level: i64, creator: &str, user: &UserId) -> bool {
    if !pl.is_object() {
        // Without power levels only the creator has any power.
        return creator == user.as_str() || level == i64::MAX;
    }
    let needed = pl["events"]["m.room.tombstone"].as_i64().or_else(|| pl["state_default"].as_i64()).unwrap_or(50);
    level >= needed
}

/// The replaced room's power levels with sending and inviting raised out
/// of ordinary members' reach, or None when they already are.
fn restricted_levels(pl: &Value) -> Option<Value> {
    if !pl.is_object() {
        return None;
    }
    let level = REPLACED_ROOM_LEVEL.max(pl["users_default"].as_i64().unwrap_or(0) + 1);
    let mut restricted = pl.clone();
    let mut changed = false;
    for key in ["events_default", "invite"] {
        if pl[key].as_i64().unwrap_or(0) < level {
            restricted[key] = json!(level);
            changed = true;
        }
    }
    changed.then_some(restricted)
}

/// Points the old room's local aliases at the new room, keeping who made
/// each.
fn move_aliases(shard: &Shard, old: &RoomId, new: &RoomId) -> ApiResult<()> {
    for alias in shard.db.room_aliases(old, CARRIED_PER_KIND_MAX)? {
        let creator = shard.db.alias_creator(old, &alias)?;
        shard.db.delete_alias(&alias, old)?;
        let creator = creator.and_then(|c| UserId::parse(c).ok());
        if let Some(creator) = creator
            && !shard.db.create_alias(&alias, new, &creator)?
        {
            tracing::warn!(alias, "alias taken while moving it to an upgraded room");
        }
    }
    Ok(())
}

/// The room a room replaced, from its create event.
fn predecessor(shard: &Shard, room: &RoomId) -> ApiResult<Option<OwnedRoomId>> {
    let Some(create) = shard.db.state_event(room, "m.room.create", "")? else { return Ok(None) };
    Ok(create.pdu.content_value()["predecessor"]["room_id"].as_str().and_then(|r| RoomId::parse(r).ok()))
}

/// After `user` joined `room`: if it replaced a room they were joined to,
/// copies their tags and room push rules over.
pub fn joined(shard: &Shard, user: &UserId, room: &RoomId) -> ApiResult<()> {
    if let Some(old) = predecessor(shard, room)?
        && shard.db.membership(&old, user)?.as_deref() == Some("join")
    {
        carry_member_state(shard, user, &old, room)?;
    }
    Ok(())
}

/// Copies a member's tags of `old` and their push rules that name it to
/// `new`, leaving what they already set on `new` alone.
fn carry_member_state(shard: &Shard, user: &UserId, old: &RoomId, new: &RoomId) -> ApiResult<()> {
    let tags = room_tags(shard, user, old)?;
    if !tags.is_empty() && room_tags(shard, user, new)?.is_empty() {
        write_account_data(shard, user, Some(new), "m.tag", json!({ "tags": tags }))?;
    }
    let mut rules = crate::push::ruleset(&shard.db, user)?;
    if copy_room_rules(&mut rules, old, new) {
        save_rules(shard, user, &rules)?;
    }
    Ok(())
}

/// Adds to `rules` a copy, for `new`, of the room rule of `old` and of each
/// override and underride rule that matches `old` by room id and names it
/// in its id (as clients name per-room rules). Returns whether any rule
/// was added.
fn copy_room_rules(rules: &mut Ruleset, old: &RoomId, new: &RoomId) -> bool {
    let mut added = Vec::new();
    if let Some(r) = rules.room.iter().find(|r| r.rule_id == old) {
        added.push((RuleKind::Room, new.to_string(), r.enabled, NewPushRule::Room(NewSimplePushRule::new(new.to_owned(), r.actions.clone()))));
    }
    for (kind, set) in [(RuleKind::Override, &rules.override_), (RuleKind::Underride, &rules.underride)] {
        for r in set.iter().filter(|r| !r.default && r.rule_id.contains(old.as_str())) {
            let names_old = |c: &PushCondition| matches!(c, PushCondition::EventMatch(m) if m.key == "room_id" && m.pattern == old.as_str());
            if !r.conditions.iter().any(names_old) {
                continue;
            }
            let conditions = r
                .conditions
                .iter()
                .map(|c| match c {
                    PushCondition::EventMatch(m) if names_old(c) => {
                        let mut m = m.clone();
                        m.pattern = new.to_string();
                        PushCondition::EventMatch(m)
                    }
                    other => other.clone(),
                })
                .collect();
            let id = r.rule_id.replace(old.as_str(), new.as_str());
            let rule = NewConditionalPushRule::new(id.clone(), conditions, r.actions.clone());
            added.push((kind.clone(), id, r.enabled, if kind == RuleKind::Override { NewPushRule::Override(rule) } else { NewPushRule::Underride(rule) }));
        }
    }
    let mut changed = false;
    for (kind, id, enabled, rule) in added {
        if rules.get(kind.clone(), &id).is_some() {
            continue;
        }
        if rules.insert(rule, None, None).is_ok() {
            let _ = rules.set_enabled(kind, &id, enabled);
            changed = true;
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(id: &str) -> OwnedRoomId {
        RoomId::parse(id).expect("room id")
    }

    #[test]
    fn tombstone_needs_its_level_or_state_default() {
        let user: &UserId = "@u:x".try_into().expect("user");
        let check = |pl: Value, creator: &str| may_tombstone(&pl, crate::api::rooms::user_power(&pl, user), creator, user);
        assert!(check(json!({ "users": { "@u:x": 100 } }), "@c:x"));
        assert!(!check(json!({ "users": { "@u:x": 50 }, "events": { "m.room.tombstone": 100 } }), "@c:x"));
        assert!(check(json!({ "users": { "@u:x": 50 }, "state_default": 50 }), "@c:x"));
        assert!(!check(json!({ "users_default": 10, "state_default": 50 }), "@c:x"));
        assert!(check(Value::Null, "@u:x"));
        assert!(!check(Value::Null, "@c:x"));
        // A privileged creator (room version 12) outranks any level.
        assert!(may_tombstone(&json!({ "events": { "m.room.tombstone": 150 } }), i64::MAX, "@c:x", user));
    }

    #[test]
    fn replaced_rooms_keep_ordinary_members_quiet() {
        let r = restricted_levels(&json!({ "events_default": 0, "invite": 0, "users_default": 0 })).expect("changed");
        assert_eq!((r["events_default"].as_i64(), r["invite"].as_i64()), (Some(50), Some(50)));
        let r = restricted_levels(&json!({ "events_default": 0, "invite": 100, "users_default": 60 })).expect("changed");
        assert_eq!((r["events_default"].as_i64(), r["invite"].as_i64()), (Some(61), Some(100)));
        assert_eq!(restricted_levels(&json!({ "events_default": 50, "invite": 50 })), None);
        assert_eq!(restricted_levels(&Value::Null), None);
    }

    #[test]
    fn room_rules_are_copied_to_the_new_room() {
        let user: &UserId = "@u:x".try_into().expect("user");
        let (old, new, other) = (room("!old:x"), room("!new:x"), room("!other:x"));
        let mut rules = Ruleset::server_default(user);
        rules.insert(NewPushRule::Room(NewSimplePushRule::new(old.clone(), vec![])), None, None).expect("room rule");
        let cond = |r: &RoomId| serde_json::from_value::<PushCondition>(json!({ "kind": "event_match", "key": "room_id", "pattern": r })).expect("condition");
        rules.insert(NewPushRule::Override(NewConditionalPushRule::new(old.to_string(), vec![cond(&old)], vec![])), None, None).expect("override");
        rules.set_enabled(RuleKind::Override, old.as_str(), false).expect("disable");
        rules.insert(NewPushRule::Override(NewConditionalPushRule::new(other.to_string(), vec![cond(&other)], vec![])), None, None).expect("other");
        assert!(copy_room_rules(&mut rules, &old, &new));
        assert!(rules.get(RuleKind::Room, new.as_str()).is_some());
        let copied = rules.get(RuleKind::Override, new.as_str()).expect("override copied");
        assert!(!copied.enabled());
        let json = serde_json::to_value(&rules).expect("json");
        let copied = json["override"].as_array().expect("overrides").iter().find(|r| r["rule_id"] == new.as_str()).expect("copied rule").clone();
        assert_eq!(copied["conditions"][0]["pattern"], new.as_str());
        // Only rules naming the old room are copied, and only once.
        assert_eq!(json["override"].as_array().map(|a| a.iter().filter(|r| r["rule_id"].as_str().is_some_and(|id| id.contains("other"))).count()), Some(1));
        assert!(!copy_room_rules(&mut rules, &old, &new));
    }
}
