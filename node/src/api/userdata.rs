//! Per-user data kept outside room timelines:
//! `POST /user/{userId}/filter`, `GET /user/{userId}/filter/{filterId}`,
//! `GET|PUT /user/{userId}/account_data/{type}`,
//! `GET|PUT /user/{userId}/rooms/{roomId}/account_data/{type}`,
//! `GET /user/{userId}/rooms/{roomId}/tags`,
//! `PUT|DELETE /user/{userId}/rooms/{roomId}/tags/{tag}`,
//! `GET /pushrules/`, `GET /pushrules/global/`,
//! `GET|PUT|DELETE /pushrules/global/{kind}/{ruleId}`,
//! `GET|PUT /pushrules/global/{kind}/{ruleId}/{enabled|actions}`,
//! `GET /pushers`, `POST /pushers/set`,
//! `GET|PUT /presence/{userId}/status`, `POST /user_directory/search`.
//! (Spec: client-server API, "Filtering", "Client Config", "Room Tagging",
//! "Push Notifications", "Presence" and "User Directory".)
//!
//! Tags (`m.tag` room account data) and push rules (`m.push_rules` global
//! account data) are account data too, so they share one write path.
//!
//! **Invariant**: every account data or presence change is written together
//! with a fresh position of this shard's stream and the stream head in one
//! batch, and announced (`Shard::publish`) only after the write returned, so
//! a sync that sees the position can also read the change. The handlers are
//! synchronous, so nothing else on the shard runs between taking the next
//! position and publishing it.

use std::collections::HashSet;
use std::rc::Rc;

use http::StatusCode;
use ruma::push::{Action, AnyPushRuleRef, InsertPushRuleError, NewConditionalPushRule, NewPatternedPushRule, NewPushRule, NewSimplePushRule, PushCondition, RemovePushRuleError, RuleKind, Ruleset};
use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::db::{AccountDataEntry, Db, encode};
use crate::error::{ApiError, ApiResult};
use crate::http::{Authed, Req};
use crate::room::now_ms;
use crate::shard::Shard;
use crate::storage::{Table, Write};

/// Longest account data type, tag name or pusher app id accepted, in bytes.
/// They become storage keys, which should stay short.
const KEY_BYTES_MAX: usize = 255;
/// Most tags on one room. Every tag is sent to every device on each change.
const TAGS_PER_ROOM_MAX: usize = 100;
/// Most push rules of one user, defaults included. Every rule may be
/// evaluated for every member on every new event, so the set stays small.
const PUSH_RULES_MAX: usize = 500;
/// Most actions of one push rule.
const PUSH_ACTIONS_MAX: usize = 16;
/// Most pushers of one user.
const PUSHERS_PER_USER_MAX: usize = 32;
/// Longest pusher push key, in bytes (the spec's limit).
const PUSHKEY_BYTES_MAX: usize = 512;
/// Longest pusher app id, in bytes (the spec's limit).
const APP_ID_BYTES_MAX: usize = 64;
/// Users of the directory scanned by one search. Worst case one search reads
/// this many directory rows plus, for each match, one user-room scan.
const DIRECTORY_SCAN_MAX: usize = 10_000;
/// Default and largest number of user directory results.
const SEARCH_LIMIT_DEFAULT: u64 = 10;
const SEARCH_LIMIT_MAX: u64 = 50;
/// Up to this many joined rooms of the searcher, a shared room is found by
/// point reads per room; above it, by scanning the candidate's room list.
const SHARED_ROOM_POINT_READS_MAX: usize = 32;
/// The path every HTTP pusher must post to (Push Gateway API).
const PUSH_GATEWAY_PATH: &str = "/_matrix/push/v1/notify";

// ---- shared helpers

/// Parses the `{userId}` path segment and requires it to be the caller:
/// users only ever see and change their own data here.
fn own_user(auth: &Authed, user: &str, action: &str) -> ApiResult<OwnedUserId> {
    let parsed = UserId::parse(user).map_err(|_| ApiError::invalid_param(format!("Invalid user id: {user}")))?;
    if parsed != auth.user {
        return Err(ApiError::forbidden(format!("Cannot {action} for other users")));
    }
    Ok(parsed)
}

fn parse_room(room: &str) -> ApiResult<OwnedRoomId> {
    RoomId::parse(room).map_err(|_| ApiError::invalid_param(format!("Invalid room id: {room}")))
}

/// Checks a path segment that becomes part of a storage key.
fn check_key(what: &str, key: &str) -> ApiResult<()> {
    if key.is_empty() {
        return Err(ApiError::invalid_param(format!("{what} must not be empty")));
    }
    if key.len() > KEY_BYTES_MAX {
        return Err(ApiError::invalid_param(format!("{what} is longer than {KEY_BYTES_MAX} bytes")));
    }
    Ok(())
}

/// The request body as a JSON object: M_NOT_JSON for malformed JSON,
/// M_BAD_JSON for valid JSON that is not an object.
fn body_object(shard: &Shard, req: &Req) -> ApiResult<Map<String, Value>> {
    req.json::<Map<String, Value>>(shard)
}

fn to_json<T: serde::Serialize>(value: &T) -> ApiResult<Value> {
    serde_json::to_value(value).map_err(|e| ApiError::unknown(format!("Cannot serialise response: {e}")))
}

/// Writes one piece of account data under a fresh stream position and
/// announces it to the user's syncs (see the module invariant).
pub(crate) fn write_account_data(shard: &Shard, user: &UserId, room: Option<&RoomId>, kind: &str, content: Value) -> ApiResult<()> {
    let mut extra = Vec::new();
    if room.is_none() && kind == "m.ignored_user_list" {
        let new = ignored_list(&content);
        if new.len() > IGNORED_USERS_MAX {
            return Err(ApiError::invalid_param(format!("A user can ignore at most {IGNORED_USERS_MAX} users")));
        }
        let old = shard.db.account_data(user, None, kind)?.map(|e| ignored_list(&e.content)).unwrap_or_default();
        extra = Db::ignore_writes(user, &old, &new);
    }
    let pos = shard.next_pos();
    let entry = AccountDataEntry { content, shard: shard.id as u16, pos };
    extra.push(Db::stream_head_write(shard.id as u16, pos));
    shard.db.put_account_data(user, room, kind, &entry, extra)?;
    if room.is_none() && matches!(kind, "m.push_rules" | "m.ignored_user_list") {
        shard.user_settings_changed();
    }
    shard.publish(pos, vec![], vec![user.to_owned()]);
    Ok(())
}

/// Most users one user may ignore.
const IGNORED_USERS_MAX: usize = 10_000;

/// The user ids of an `m.ignored_user_list` content (keys of
/// `ignored_users` that are user ids; anything else ignores nobody).
pub(crate) fn ignored_list(content: &Value) -> std::collections::HashSet<ruma::OwnedUserId> {
    content.get("ignored_users").and_then(Value::as_object).map(|m| m.keys().filter_map(|k| UserId::parse(k.as_str()).ok()).collect()).unwrap_or_default()
}

// ---- filters

/// POST /_matrix/client/v3/user/{userId}/filter
pub fn create_filter(shard: &Shard, req: &Req, auth: &Authed, user: &str) -> ApiResult<Value> {
    let user = own_user(auth, user, "create filters")?;
    let body = Value::Object(body_object(shard, req)?);
    // Validate the shape with ruma's definition but store what the client
    // sent, so fields this server does not know survive the round trip.
    serde_json::from_value::<ruma::api::client::filter::FilterDefinition>(body.clone()).map_err(|e| ApiError::bad_json(format!("Invalid filter: {e}")))?;
    let id = shard.db.put_filter(&user, &body)?;
    Ok(json!({ "filter_id": id }))
}

/// GET /_matrix/client/v3/user/{userId}/filter/{filterId}
pub fn get_filter(shard: &Shard, auth: &Authed, user: &str, id: &str) -> ApiResult<Value> {
    let user = own_user(auth, user, "read filters")?;
    shard.db.filter(&user, id)?.ok_or_else(|| ApiError::not_found("No such filter"))
}

// ---- account data

/// Types that have their own endpoints and must not be written here.
fn check_writable_type(kind: &str) -> ApiResult<()> {
    let other_api = match kind {
        "m.fully_read" => "/rooms/{roomId}/read_markers",
        "m.push_rules" => "/pushrules",
        _ => return Ok(()),
    };
    Err(ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "M_BAD_JSON", format!("Cannot set {kind} through this API; use {other_api}")))
}

/// GET /_matrix/client/v3/user/{userId}/account_data/{type} and
/// GET /_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{type}
pub fn get_account_data(shard: &Shard, auth: &Authed, user: &str, room: Option<&str>, kind: &str) -> ApiResult<Value> {
    let user = own_user(auth, user, "read account data")?;
    let room = room.map(parse_room).transpose()?;
    check_key("Account data type", kind)?;
    // Push rules have defaults that are never stored: answer with the
    // effective rule set, as /pushrules would.
    if room.is_none() && kind == "m.push_rules" {
        let rules = crate::push::ruleset(&shard.db, &user)?;
        return Ok(json!({ "global": ruleset_json(&rules)? }));
    }
    match shard.db.account_data(&user, room.as_deref(), kind)? {
        Some(entry) => Ok(entry.content),
        None => Err(ApiError::not_found("Account data not found")),
    }
}

/// PUT /_matrix/client/v3/user/{userId}/account_data/{type} and
/// PUT /_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{type}
pub fn put_account_data(shard: &Shard, req: &Req, auth: &Authed, user: &str, room: Option<&str>, kind: &str) -> ApiResult<Value> {
    let user = own_user(auth, user, "add account data")?;
    let room = room.map(parse_room).transpose()?;
    check_key("Account data type", kind)?;
    check_writable_type(kind)?;
    let content = Value::Object(body_object(shard, req)?);
    write_account_data(shard, &user, room.as_deref(), kind, content)?;
    Ok(json!({}))
}

// ---- tags

/// The `tags` object of a room's `m.tag` account data (empty when unset or
/// malformed).
pub(crate) fn room_tags(shard: &Shard, user: &UserId, room: &RoomId) -> ApiResult<Map<String, Value>> {
    Ok(shard
        .db
        .account_data(user, Some(room), "m.tag")?
        .and_then(|entry| match entry.content.get("tags") {
            Some(Value::Object(tags)) => Some(tags.clone()),
            _ => None,
        })
        .unwrap_or_default())
}

/// GET /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags
pub fn tags(shard: &Shard, auth: &Authed, user: &str, room: &str) -> ApiResult<Value> {
    let user = own_user(auth, user, "read tags")?;
    let room = parse_room(room)?;
    Ok(json!({ "tags": room_tags(shard, &user, &room)? }))
}

/// PUT /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags/{tag}
pub fn put_tag(shard: &Shard, req: &Req, auth: &Authed, user: &str, room: &str, tag: &str) -> ApiResult<Value> {
    let user = own_user(auth, user, "add tags")?;
    let room = parse_room(room)?;
    check_key("Tag", tag)?;
    let body = body_object(shard, req)?;
    if body.get("order").is_some_and(|o| !o.is_number()) {
        return Err(ApiError::bad_json("`order` must be a number"));
    }
    let mut tags = room_tags(shard, &user, &room)?;
    if !tags.contains_key(tag) && tags.len() >= TAGS_PER_ROOM_MAX {
        return Err(ApiError::invalid_param(format!("A room can have at most {TAGS_PER_ROOM_MAX} tags")));
    }
    tags.insert(tag.to_owned(), Value::Object(body));
    write_account_data(shard, &user, Some(&room), "m.tag", json!({ "tags": tags }))?;
    Ok(json!({}))
}

/// DELETE /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags/{tag}
pub fn delete_tag(shard: &Shard, auth: &Authed, user: &str, room: &str, tag: &str) -> ApiResult<Value> {
    let user = own_user(auth, user, "remove tags")?;
    let room = parse_room(room)?;
    let mut tags = room_tags(shard, &user, &room)?;
    // Removing an absent tag succeeds without a write, so syncs see no
    // change that did not happen.
    if tags.remove(tag).is_some() {
        write_account_data(shard, &user, Some(&room), "m.tag", json!({ "tags": tags }))?;
    }
    Ok(json!({}))
}

// ---- push rules

/// The rule kinds of the `global` rule set a client may address.
fn rule_kind(kind: &str) -> ApiResult<RuleKind> {
    match kind {
        "override" => Ok(RuleKind::Override),
        "underride" => Ok(RuleKind::Underride),
        "sender" => Ok(RuleKind::Sender),
        "room" => Ok(RuleKind::Room),
        "content" => Ok(RuleKind::Content),
        _ => Err(ApiError::invalid_param(format!("Unknown push rule kind: {kind}"))),
    }
}

/// A rule set as the API returns it. ruma leaves out empty kinds, but
/// clients expect all five arrays to be present.
fn ruleset_json(rules: &Ruleset) -> ApiResult<Value> {
    let mut value = to_json(rules)?;
    if let Value::Object(map) = &mut value {
        for kind in ["override", "content", "room", "sender", "underride"] {
            map.entry(kind).or_insert_with(|| json!([]));
        }
    }
    Ok(value)
}

fn rule_json(rule: AnyPushRuleRef<'_>) -> ApiResult<Value> {
    match rule {
        AnyPushRuleRef::Override(r) | AnyPushRuleRef::Underride(r) => to_json(r),
        AnyPushRuleRef::Content(r) => to_json(r),
        AnyPushRuleRef::Room(r) => to_json(r),
        AnyPushRuleRef::Sender(r) => to_json(r),
        // Kinds outside the spec's five are never addressed (see `rule_kind`).
        _ => Err(ApiError::not_found("The push rule was not found")),
    }
}

/// Stores the user's rule set; syncs see it as `m.push_rules` account data.
pub(crate) fn save_rules(shard: &Shard, user: &UserId, rules: &Ruleset) -> ApiResult<()> {
    write_account_data(shard, user, None, "m.push_rules", json!({ "global": ruleset_json(rules)? }))
}

/// Why an action is not one this server can store, if it is not. The
/// deprecated `dont_notify` and `coalesce` are still sent by clients and
/// mean "do nothing", so they are accepted.
fn action_error(action: &Value) -> Option<String> {
    match action {
        Value::String(s) if matches!(s.as_str(), "notify" | "dont_notify" | "coalesce") => None,
        Value::Object(o) if o.get("set_tweak").is_some_and(Value::is_string) => None,
        other => Some(format!("Unrecognised push rule action: {other}")),
    }
}

/// Parses the `actions` of a request body.
fn parse_actions(value: Option<&Value>) -> ApiResult<Vec<Action>> {
    let value = value.ok_or_else(|| ApiError::missing_param("`actions` is required"))?;
    let list = value.as_array().ok_or_else(|| ApiError::bad_json("`actions` must be an array"))?;
    if list.len() > PUSH_ACTIONS_MAX {
        return Err(ApiError::invalid_param(format!("A push rule can have at most {PUSH_ACTIONS_MAX} actions")));
    }
    if let Some(e) = list.iter().find_map(action_error) {
        return Err(ApiError::invalid_param(e));
    }
    serde_json::from_value(value.clone()).map_err(|e| ApiError::bad_json(format!("Invalid push rule actions: {e}")))
}

/// Builds the rule a PUT body describes for `kind`.
fn new_rule(kind: &RuleKind, rule_id: &str, body: &Map<String, Value>) -> ApiResult<NewPushRule> {
    let actions = parse_actions(body.get("actions"))?;
    let conditions = || -> ApiResult<Vec<PushCondition>> {
        let value = body.get("conditions").ok_or_else(|| ApiError::missing_param("`conditions` is required for this kind of rule"))?;
        serde_json::from_value(value.clone()).map_err(|e| ApiError::bad_json(format!("Invalid push rule conditions: {e}")))
    };
    Ok(match kind {
        RuleKind::Override => NewPushRule::Override(NewConditionalPushRule::new(rule_id.to_owned(), conditions()?, actions)),
        RuleKind::Underride => NewPushRule::Underride(NewConditionalPushRule::new(rule_id.to_owned(), conditions()?, actions)),
        RuleKind::Content => {
            let pattern = match body.get("pattern") {
                Some(Value::String(p)) => p.clone(),
                Some(_) => return Err(ApiError::bad_json("`pattern` must be a string")),
                None => return Err(ApiError::missing_param("`pattern` is required for content rules")),
            };
            NewPushRule::Content(NewPatternedPushRule::new(rule_id.to_owned(), pattern, actions))
        }
        // Room and sender rules are named by the room or user they apply to.
        RuleKind::Room => NewPushRule::Room(NewSimplePushRule::new(parse_room(rule_id)?, actions)),
        RuleKind::Sender => {
            let user = UserId::parse(rule_id).map_err(|_| ApiError::invalid_param(format!("Invalid user id: {rule_id}")))?;
            NewPushRule::Sender(NewSimplePushRule::new(user, actions))
        }
        _ => return Err(ApiError::invalid_param("Unknown push rule kind")),
    })
}

fn insert_error(e: InsertPushRuleError) -> ApiError {
    match e {
        InsertPushRuleError::ServerDefaultRuleId => ApiError::invalid_param("Rule ids starting with '.' are reserved for server-default rules"),
        InsertPushRuleError::InvalidRuleId => ApiError::invalid_param("Rule ids must not contain '/' or '\\'"),
        InsertPushRuleError::RelativeToServerDefaultRule => ApiError::invalid_param("Rules cannot be placed relative to server-default rules"),
        InsertPushRuleError::UnknownRuleId => ApiError::new(StatusCode::BAD_REQUEST, "M_UNKNOWN", "The `before` or `after` rule was not found"),
        InsertPushRuleError::BeforeHigherThanAfter => ApiError::new(StatusCode::BAD_REQUEST, "M_UNKNOWN", "The `before` rule has a higher priority than the `after` rule"),
        other => ApiError::new(StatusCode::BAD_REQUEST, "M_UNKNOWN", other.to_string()),
    }
}

/// GET /_matrix/client/v3/pushrules/
pub fn push_rules(shard: &Shard, auth: &Authed) -> ApiResult<Value> {
    let rules = crate::push::ruleset(&shard.db, &auth.user)?;
    Ok(json!({ "global": ruleset_json(&rules)? }))
}

/// GET /_matrix/client/v3/pushrules/global/
pub fn push_rules_global(shard: &Shard, auth: &Authed) -> ApiResult<Value> {
    ruleset_json(&crate::push::ruleset(&shard.db, &auth.user)?)
}

/// GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}
pub fn push_rule(shard: &Shard, auth: &Authed, kind: &str, rule_id: &str) -> ApiResult<Value> {
    let kind = rule_kind(kind)?;
    let rules = crate::push::ruleset(&shard.db, &auth.user)?;
    let rule = rules.get(kind, rule_id).ok_or_else(|| ApiError::not_found("The push rule was not found"))?;
    rule_json(rule)
}

/// PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}
pub fn put_push_rule(shard: &Shard, req: &Req, auth: &Authed, kind: &str, rule_id: &str) -> ApiResult<Value> {
    let kind = rule_kind(kind)?;
    // Checked before the body so a reserved id is refused even when the
    // room or user id check for its kind would fail first.
    if rule_id.starts_with('.') {
        return Err(insert_error(InsertPushRuleError::ServerDefaultRuleId));
    }
    let body = body_object(shard, req)?;
    let rule = new_rule(&kind, rule_id, &body)?;
    let mut rules = crate::push::ruleset(&shard.db, &auth.user)?;
    if rules.get(kind.clone(), rule_id).is_none() && rules.iter().count() >= PUSH_RULES_MAX {
        return Err(ApiError::invalid_param(format!("A user can have at most {PUSH_RULES_MAX} push rules")));
    }
    rules.insert(rule, req.query("after"), req.query("before")).map_err(insert_error)?;
    save_rules(shard, &auth.user, &rules)?;
    Ok(json!({}))
}

/// DELETE /_matrix/client/v3/pushrules/global/{kind}/{ruleId}
pub fn delete_push_rule(shard: &Shard, auth: &Authed, kind: &str, rule_id: &str) -> ApiResult<Value> {
    let kind = rule_kind(kind)?;
    let mut rules = crate::push::ruleset(&shard.db, &auth.user)?;
    rules.remove(kind, rule_id).map_err(|e| match e {
        RemovePushRuleError::ServerDefault => ApiError::invalid_param("Server-default push rules cannot be deleted"),
        _ => ApiError::not_found("The push rule was not found"),
    })?;
    save_rules(shard, &auth.user, &rules)?;
    Ok(json!({}))
}

/// The attributes of a rule that have their own endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RuleAttr {
    Enabled,
    Actions,
}

fn rule_attr(attr: &str) -> ApiResult<RuleAttr> {
    match attr {
        "enabled" => Ok(RuleAttr::Enabled),
        "actions" => Ok(RuleAttr::Actions),
        _ => Err(ApiError::new(StatusCode::BAD_REQUEST, "M_UNRECOGNIZED", format!("Unknown push rule attribute: {attr}"))),
    }
}

/// GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/{enabled|actions}
pub fn push_rule_attr(shard: &Shard, auth: &Authed, kind: &str, rule_id: &str, attr: &str) -> ApiResult<Value> {
    let kind = rule_kind(kind)?;
    let attr = rule_attr(attr)?;
    let rules = crate::push::ruleset(&shard.db, &auth.user)?;
    let rule = rules.get(kind, rule_id).ok_or_else(|| ApiError::not_found("The push rule was not found"))?;
    Ok(match attr {
        RuleAttr::Enabled => json!({ "enabled": rule.enabled() }),
        RuleAttr::Actions => json!({ "actions": to_json(&rule.actions())? }),
    })
}

/// PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/{enabled|actions}
pub fn put_push_rule_attr(shard: &Shard, req: &Req, auth: &Authed, kind: &str, rule_id: &str, attr: &str) -> ApiResult<Value> {
    let kind = rule_kind(kind)?;
    let attr = rule_attr(attr)?;
    let body = body_object(shard, req)?;
    let mut rules = crate::push::ruleset(&shard.db, &auth.user)?;
    let not_found = |_| ApiError::not_found("The push rule was not found");
    match attr {
        RuleAttr::Enabled => {
            let enabled = match body.get("enabled") {
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(ApiError::bad_json("`enabled` must be a boolean")),
                None => return Err(ApiError::missing_param("`enabled` is required")),
            };
            rules.set_enabled(kind, rule_id, enabled).map_err(not_found)?;
        }
        RuleAttr::Actions => {
            let actions = parse_actions(body.get("actions"))?;
            rules.set_actions(kind, rule_id, actions).map_err(not_found)?;
        }
    }
    save_rules(shard, &auth.user, &rules)?;
    Ok(json!({}))
}

// ---- pushers

/// GET /_matrix/client/v3/pushers
pub fn pushers(shard: &Shard, auth: &Authed) -> ApiResult<Value> {
    Ok(json!({ "pushers": shard.db.pushers(&auth.user, PUSHERS_PER_USER_MAX)? }))
}

/// The path of an `http` or `https` URL, or why it has none.
fn url_path(url: &str) -> Result<&str, &'static str> {
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://")).ok_or("`data.url` must be an http or https URL")?;
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let slash = rest.find('/').ok_or("`data.url` has no path")?;
    if slash == 0 {
        return Err("`data.url` has no host");
    }
    Ok(&rest[slash..])
}

/// A required string field of the pusher body.
fn required_str<'a>(body: &'a Map<String, Value>, key: &str) -> ApiResult<&'a str> {
    match body.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(ApiError::bad_json(format!("`{key}` must be a string"))),
        None => Err(ApiError::missing_param(format!("`{key}` is required"))),
    }
}

/// POST /_matrix/client/v3/pushers/set
pub fn set_pusher(shard: &Shard, req: &Req, auth: &Authed) -> ApiResult<Value> {
    let body = body_object(shard, req)?;
    let app_id = required_str(&body, "app_id")?;
    let pushkey = required_str(&body, "pushkey")?;
    if app_id.is_empty() || app_id.len() > APP_ID_BYTES_MAX {
        return Err(ApiError::invalid_param(format!("`app_id` must be 1 to {APP_ID_BYTES_MAX} bytes")));
    }
    if pushkey.is_empty() || pushkey.len() > PUSHKEY_BYTES_MAX {
        return Err(ApiError::invalid_param(format!("`pushkey` must be 1 to {PUSHKEY_BYTES_MAX} bytes")));
    }
    // A null kind deletes the pusher; nothing else is needed for that.
    let kind = match body.get("kind") {
        Some(Value::Null) => {
            shard.db.put_pusher(&auth.user, app_id, pushkey, None)?;
            return Ok(json!({}));
        }
        Some(Value::String(k)) => k.as_str(),
        Some(_) => return Err(ApiError::bad_json("`kind` must be a string or null")),
        None => return Err(ApiError::missing_param("`kind` is required")),
    };
    // Email pushers need a mailer this server does not have.
    if kind != "http" {
        return Err(ApiError::invalid_param(format!("Unsupported pusher kind: {kind}")));
    }
    let app_display_name = required_str(&body, "app_display_name")?;
    let device_display_name = required_str(&body, "device_display_name")?;
    let lang = required_str(&body, "lang")?;
    let data = match body.get("data") {
        Some(Value::Object(d)) => d,
        Some(_) => return Err(ApiError::bad_json("`data` must be an object")),
        None => return Err(ApiError::missing_param("`data` is required")),
    };
    let url = match data.get("url") {
        Some(Value::String(u)) => u,
        Some(_) => return Err(ApiError::bad_json("`data.url` must be a string")),
        None => return Err(ApiError::missing_param("`data.url` is required for http pushers")),
    };
    match url_path(url) {
        Ok(path) if path == PUSH_GATEWAY_PATH => {}
        Ok(_) => return Err(ApiError::invalid_param(format!("`data.url` must have the path {PUSH_GATEWAY_PATH}"))),
        Err(e) => return Err(ApiError::invalid_param(e)),
    }
    let existing = shard.db.pushers(&auth.user, PUSHERS_PER_USER_MAX)?;
    let replaces = existing.iter().any(|p| p["app_id"].as_str() == Some(app_id) && p["pushkey"].as_str() == Some(pushkey));
    if !replaces && existing.len() >= PUSHERS_PER_USER_MAX {
        return Err(ApiError::invalid_param(format!("A user can have at most {PUSHERS_PER_USER_MAX} pushers")));
    }
    let mut pusher = json!({
        "app_id": app_id,
        "pushkey": pushkey,
        "kind": kind,
        "app_display_name": app_display_name,
        "device_display_name": device_display_name,
        "lang": lang,
        "data": data,
    });
    if let Some(Value::String(tag)) = body.get("profile_tag") {
        pusher["profile_tag"] = json!(tag);
    }
    shard.db.put_pusher(&auth.user, app_id, pushkey, Some(&pusher))?;
    Ok(json!({}))
}

// ---- presence

const PRESENCE_STATES: [&str; 3] = ["online", "offline", "unavailable"];

/// Whether `a` and `b` are both joined to at least one room.
fn share_room(shard: &Shard, a: &UserId, b: &UserId) -> ApiResult<bool> {
    let cap = shard.config.limits.rooms_per_user_max;
    let a_rooms: HashSet<String> = shard.db.user_rooms(a, cap)?.into_iter().filter(|(_, r)| r.membership == "join").map(|(id, _)| id).collect();
    shares_with(shard, &a_rooms, b)
}

/// Whether `user` is joined to one of `rooms` (a set of joined room ids).
fn shares_with(shard: &Shard, rooms: &HashSet<String>, user: &UserId) -> ApiResult<bool> {
    if rooms.is_empty() {
        return Ok(false);
    }
    if rooms.len() <= SHARED_ROOM_POINT_READS_MAX {
        for room in rooms {
            let Ok(room) = RoomId::parse(room.as_str()) else { continue };
            if shard.db.user_room(user, &room)?.is_some_and(|r| r.membership == "join") {
                return Ok(true);
            }
        }
        return Ok(false);
    }
    let theirs = shard.db.user_rooms(user, shard.config.limits.rooms_per_user_max)?;
    Ok(theirs.iter().any(|(id, r)| r.membership == "join" && rooms.contains(id)))
}

/// GET /_matrix/client/v3/presence/{userId}/status
pub fn get_presence(shard: &Shard, auth: &Authed, user: &str) -> ApiResult<Value> {
    let user = UserId::parse(user).map_err(|_| ApiError::invalid_param(format!("Invalid user id: {user}")))?;
    if shard.db.account(&user)?.is_none() {
        return Err(ApiError::not_found("Unknown user"));
    }
    // Presence is visible to the user and to those sharing a room with them.
    if user != auth.user && !share_room(shard, &auth.user, &user)? {
        return Err(ApiError::forbidden("You are not allowed to see their presence"));
    }
    let Some(record) = shard.db.presence(&user)? else {
        // A user who never set presence is offline.
        return Ok(json!({ "presence": "offline" }));
    };
    Ok(presence_content(&record))
}

/// The client form of a stored presence record (`m.presence` content).
pub fn presence_content(record: &Value) -> Value {
    let presence = record["presence"].as_str().unwrap_or("offline");
    let mut out = json!({ "presence": presence, "currently_active": presence == "online" });
    if let Some(ts) = record["last_active_ts"].as_u64() {
        out["last_active_ago"] = json!(now_ms().saturating_sub(ts));
    }
    if let Some(msg) = record["status_msg"].as_str() {
        out["status_msg"] = json!(msg);
    }
    out
}

#[derive(Deserialize)]
struct PresenceBody {
    presence: String,
    #[serde(default)]
    status_msg: Option<String>,
}

/// PUT /_matrix/client/v3/presence/{userId}/status
///
/// Setting oneself online counts as activity (the idle timer restarts);
/// the other states keep the time of the last activity.
pub fn put_presence(shard: &Rc<Shard>, req: &Req, auth: &Authed, user: &str) -> ApiResult<Value> {
    let user = own_user(auth, user, "set presence")?;
    let body: PresenceBody = req.json(shard)?;
    if !PRESENCE_STATES.contains(&body.presence.as_str()) {
        return Err(ApiError::invalid_param(format!("Unknown presence state: {}", body.presence)));
    }
    let last_active = if body.presence == "online" {
        now_ms()
    } else {
        shard.db.presence(&user)?.and_then(|r| r["last_active_ts"].as_u64()).unwrap_or_else(now_ms)
    };
    store_presence(shard, &user, &body.presence, body.status_msg.as_deref(), last_active, false)?;
    if body.presence == "online" {
        crate::presence::active(shard, &user, true);
    }
    Ok(json!({}))
}

/// Writes a user's presence and announces it to everyone sharing a room
/// with them (they see it in `/sync`). `idle`: set by the idle timer (the
/// user's next act makes them online again).
pub(crate) fn store_presence(shard: &Shard, user: &UserId, presence: &str, status_msg: Option<&str>, last_active_ts: u64, idle: bool) -> ApiResult<()> {
    let pos = shard.next_pos();
    let record = json!({
        "presence": presence,
        "status_msg": status_msg,
        "last_active_ts": last_active_ts,
        "idle": idle,
        "pos": pos,
        "shard": shard.id,
    });
    let watchers = crate::api::keys::presence_watchers(shard, user)?;
    shard.db.store.write(vec![
        Write::put(Table::Presence, user.as_bytes(), b"".to_vec(), encode(&record)),
        Db::presence_live_write(user, presence != "offline"),
        Db::stream_head_write(shard.id as u16, pos),
    ])?;
    shard.presence_writes[shard.id].fetch_max(pos, std::sync::atomic::Ordering::Release);
    shard.publish(pos, vec![], watchers);
    Ok(())
}

// ---- user directory

#[derive(Deserialize)]
struct SearchBody {
    search_term: String,
    #[serde(default)]
    limit: Option<u64>,
}

/// Whether a directory entry matches the lower-cased search term.
fn directory_match(user_id: &str, profile: &Value, term: &str) -> bool {
    user_id.to_lowercase().contains(term) || profile["displayname"].as_str().is_some_and(|d| d.to_lowercase().contains(term))
}

/// POST /_matrix/client/v3/user_directory/search
///
/// Finds users whose id or display name contains the term and who share a
/// joined room with the searcher (or are the searcher).
pub fn search_users(shard: &Shard, req: &Req, auth: &Authed) -> ApiResult<Value> {
    let body: SearchBody = req.json(shard)?;
    let limit = body.limit.unwrap_or(SEARCH_LIMIT_DEFAULT).min(SEARCH_LIMIT_MAX) as usize;
    let term = body.search_term.trim().to_lowercase();
    if term.is_empty() || limit == 0 {
        return Ok(json!({ "results": [], "limited": false }));
    }
    let cap = shard.config.limits.rooms_per_user_max;
    let my_rooms: HashSet<String> = shard.db.user_rooms(&auth.user, cap)?.into_iter().filter(|(_, r)| r.membership == "join").map(|(id, _)| id).collect();
    let mut results = Vec::new();
    let mut limited = false;
    for (id, profile) in shard.db.directory_users(DIRECTORY_SCAN_MAX)? {
        if !directory_match(&id, &profile, &term) {
            continue;
        }
        let Ok(user) = UserId::parse(id.as_str()) else { continue };
        if user != auth.user && !shares_with(shard, &my_rooms, &user)? {
            continue;
        }
        if results.len() == limit {
            limited = true;
            break;
        }
        let mut entry = json!({ "user_id": user });
        if let Some(name) = profile["displayname"].as_str() {
            entry["display_name"] = json!(name);
        }
        if let Some(url) = profile["avatar_url"].as_str() {
            entry["avatar_url"] = json!(url);
        }
        results.push(entry);
    }
    Ok(json!({ "results": results, "limited": limited }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_kinds_are_the_spec_five() {
        for kind in ["override", "underride", "sender", "room", "content"] {
            assert_eq!(rule_kind(kind).map(|k| k.to_string()).ok().as_deref(), Some(kind));
        }
        for bad in ["", "postcontent", "Override", "global"] {
            assert_eq!(rule_kind(bad).map_err(|e| e.errcode).err(), Some("M_INVALID_PARAM"));
        }
    }

    #[test]
    fn rule_attrs() {
        assert_eq!(rule_attr("enabled").ok(), Some(RuleAttr::Enabled));
        assert_eq!(rule_attr("actions").ok(), Some(RuleAttr::Actions));
        assert_eq!(rule_attr("conditions").map_err(|e| (e.status, e.errcode)).err(), Some((StatusCode::BAD_REQUEST, "M_UNRECOGNIZED")));
    }

    #[test]
    fn actions_accept_spec_and_legacy_forms_only() {
        assert!(action_error(&json!("notify")).is_none());
        assert!(action_error(&json!("dont_notify")).is_none());
        assert!(action_error(&json!("coalesce")).is_none());
        assert!(action_error(&json!({ "set_tweak": "sound", "value": "default" })).is_none());
        assert!(action_error(&json!({ "set_tweak": "highlight" })).is_none());
        assert!(action_error(&json!("wibble")).is_some());
        assert!(action_error(&json!({ "value": true })).is_some());
        assert!(action_error(&json!(3)).is_some());
        let parsed = parse_actions(Some(&json!(["notify", { "set_tweak": "highlight", "value": false }]))).map(|a| a.len());
        assert_eq!(parsed.ok(), Some(2));
        assert_eq!(parse_actions(None).map_err(|e| e.errcode).err(), Some("M_MISSING_PARAM"));
        assert_eq!(parse_actions(Some(&json!("notify"))).map_err(|e| e.errcode).err(), Some("M_BAD_JSON"));
    }

    #[test]
    fn new_rules_need_their_kind_specific_fields() {
        let body = |v: Value| v.as_object().cloned().unwrap_or_default();
        let err = |r: ApiResult<NewPushRule>| r.map_err(|e| e.errcode).err();
        assert_eq!(err(new_rule(&RuleKind::Override, "x", &body(json!({ "actions": ["notify"] })))), Some("M_MISSING_PARAM"));
        assert_eq!(err(new_rule(&RuleKind::Content, "x", &body(json!({ "actions": ["notify"] })))), Some("M_MISSING_PARAM"));
        assert_eq!(err(new_rule(&RuleKind::Room, "not-a-room", &body(json!({ "actions": [] })))), Some("M_INVALID_PARAM"));
        assert_eq!(err(new_rule(&RuleKind::Override, "x", &body(json!({ "actions": [], "conditions": [{ "pattern": "x" }] })))), Some("M_BAD_JSON"));
        let ok = new_rule(&RuleKind::Underride, "x", &body(json!({ "actions": ["notify"], "conditions": [{ "kind": "event_match", "key": "type", "pattern": "m.room.message" }] })));
        assert_eq!(ok.map(|r| r.rule_id().to_owned()).ok().as_deref(), Some("x"));
        let ok = new_rule(&RuleKind::Sender, "@a:x", &body(json!({ "actions": [] })));
        assert!(matches!(ok, Ok(NewPushRule::Sender(_))));
    }

    #[test]
    fn inserted_rules_round_trip_with_all_kinds_listed() {
        let user: OwnedUserId = "@bob:x".try_into().expect("valid user id");
        let mut rules = Ruleset::server_default(&user);
        let rule = NewPushRule::Room(NewSimplePushRule::new("!r:x".try_into().expect("valid room id"), vec![]));
        rules.insert(rule, None, None).expect("insert");
        let json = ruleset_json(&rules).expect("serialise");
        for kind in ["override", "content", "room", "sender", "underride"] {
            assert!(json[kind].is_array(), "{kind} missing");
        }
        assert_eq!(json["room"][0]["rule_id"], "!r:x");
        let back: Ruleset = serde_json::from_value(json).expect("parse");
        assert!(back.get(RuleKind::Room, "!r:x").is_some());
        assert!(matches!(rules.remove(RuleKind::Override, ".m.rule.master"), Err(RemovePushRuleError::ServerDefault)));
    }

    #[test]
    fn pusher_url_paths() {
        assert_eq!(url_path("https://push.example.org/_matrix/push/v1/notify"), Ok(PUSH_GATEWAY_PATH));
        assert_eq!(url_path("http://127.0.0.1:5000/_matrix/push/v1/notify?x=1"), Ok(PUSH_GATEWAY_PATH));
        assert_eq!(url_path("https://push.example.org/other"), Ok("/other"));
        assert!(url_path("https://push.example.org").is_err());
        assert!(url_path("https:///_matrix/push/v1/notify").is_err());
        assert!(url_path("ftp://x/_matrix/push/v1/notify").is_err());
    }

    #[test]
    fn directory_matching_is_case_insensitive_on_id_and_name() {
        let profile = json!({ "displayname": "Alice Liddell" });
        assert!(directory_match("@alice:x", &json!({}), "alice"));
        assert!(directory_match("@u1:x", &profile, "liddell"));
        assert!(directory_match("@U1:x", &json!({}), "u1"));
        assert!(!directory_match("@bob:x", &json!({ "displayname": null }), "alice"));
    }

    #[test]
    fn reserved_account_data_types() {
        assert!(check_writable_type("m.tag").is_ok());
        let e = check_writable_type("m.fully_read").err().map(|e| (e.status, e.errcode));
        assert_eq!(e, Some((StatusCode::METHOD_NOT_ALLOWED, "M_BAD_JSON")));
        assert!(check_writable_type("m.push_rules").is_err());
    }
}
