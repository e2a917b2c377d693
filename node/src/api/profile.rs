//! Profiles: `GET /profile/{userId}`, and `GET`, `PUT` and `DELETE`
//! `/profile/{userId}/{keyName}`. (Spec: client-server API, "Profiles".)
//!
//! A profile is the `displayname` and `avatar_url` of the account record,
//! plus its other fields (`m.tz` and custom keys, any JSON value), all of it
//! under [`PROFILE_BYTES_MAX`]. A display name or avatar change is copied
//! to the user directory and to a fresh `m.room.member` event in every room
//! the user is joined to, so other members see it. Each room's event is
//! created on that room's owner shard; one room failing does not undo the
//! others or the profile change itself. Other fields stay in the profile.

use std::rc::Rc;

use http::StatusCode;
use ruma::{RoomId, UserId};
use serde_json::{Map, Value, json};

use crate::db::Account;
use crate::error::{ApiError, ApiResult};
use crate::http::{Authed, Req};
use crate::shard::{Draft, RoomOp, Shard};

/// Longest display name, in characters.
const DISPLAYNAME_CHARS_MAX: usize = 256;
/// Longest avatar URL, in bytes.
const AVATAR_URL_BYTES_MAX: usize = 1000;
/// Longest profile key, in bytes (the spec's limit).
const KEY_BYTES_MAX: usize = 255;
/// Largest profile, all fields in JSON together (the spec's limit).
const PROFILE_BYTES_MAX: usize = 64 * 1024;

/// The profile fields this server stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    DisplayName,
    AvatarUrl,
}

impl Field {
    fn parse(key: &str) -> Option<Field> {
        match key {
            "displayname" => Some(Field::DisplayName),
            "avatar_url" => Some(Field::AvatarUrl),
            _ => None,
        }
    }

    fn key(self) -> &'static str {
        match self {
            Field::DisplayName => "displayname",
            Field::AvatarUrl => "avatar_url",
        }
    }

    fn value(self, account: &Account) -> Option<&str> {
        match self {
            Field::DisplayName => account.displayname.as_deref(),
            Field::AvatarUrl => account.avatar_url.as_deref(),
        }
    }
}

/// Whether `key` follows the spec's grammar for profile keys: a known key,
/// or a namespaced identifier of lower-case dot-separated words.
fn valid_key(key: &str) -> bool {
    if matches!(key, "displayname" | "avatar_url" | "m.tz") {
        return true;
    }
    let mut parts = 0;
    for part in key.split('.') {
        let mut chars = part.chars();
        if !chars.next().is_some_and(|c| c.is_ascii_lowercase()) || !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
            return false;
        }
        parts += 1;
    }
    parts >= 2
}

fn profile_json(account: &Account) -> Value {
    let mut out: Map<String, Value> = account.fields.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    for field in [Field::DisplayName, Field::AvatarUrl] {
        if let Some(v) = field.value(account) {
            out.insert(field.key().to_owned(), json!(v));
        }
    }
    Value::Object(out)
}

/// GET /_matrix/client/v3/profile/{userId} and
/// GET /_matrix/client/v3/profile/{userId}/{keyName}
pub fn get(shard: &Shard, _req: &Req, user: &str, field: Option<&str>) -> ApiResult<Value> {
    let user = UserId::parse(user).map_err(|_| ApiError::invalid_param(format!("Invalid user id: {user}")))?;
    let account = shard.db.account(&user)?.ok_or_else(|| ApiError::not_found("Profile was not found"))?;
    let Some(key) = field else { return Ok(profile_json(&account)) };
    let value = match Field::parse(key) {
        Some(f) => f.value(&account).map(|v| json!(v)),
        None => account.fields.get(key).cloned(),
    };
    let value = value.ok_or_else(|| ApiError::not_found(format!("The profile has no {key}")))?;
    Ok(json!({ key: value }))
}

/// The new value of `field` from a PUT body: `None` clears it (an empty
/// string does, as clients use it to remove a display name).
fn new_value(field: Field, body: &Map<String, Value>) -> ApiResult<Option<String>> {
    let key = field.key();
    let value = match body.get(key) {
        Some(Value::String(s)) => s,
        Some(_) => return Err(ApiError::invalid_param(format!("`{key}` must be a string"))),
        None => return Err(ApiError::missing_param(format!("`{key}` is required"))),
    };
    let too_long = match field {
        Field::DisplayName => value.chars().count() > DISPLAYNAME_CHARS_MAX,
        Field::AvatarUrl => value.len() > AVATAR_URL_BYTES_MAX,
    };
    if too_long {
        return Err(ApiError::invalid_param(format!("`{key}` is too long")));
    }
    Ok((!value.is_empty()).then(|| value.clone()))
}

/// The member event content after a profile change: the current content
/// with the new profile, without what only belonged to the original
/// membership change (its reason and restricted-join authoriser).
fn updated_member_content(mut content: Value, account: &Account) -> Value {
    if let Value::Object(map) = &mut content {
        map.remove("reason");
        map.remove("join_authorised_via_users_server");
        map.insert("membership".to_owned(), json!("join"));
        for field in [Field::DisplayName, Field::AvatarUrl] {
            match field.value(account) {
                Some(v) => map.insert(field.key().to_owned(), json!(v)),
                None => map.remove(field.key()),
            };
        }
    }
    content
}

/// The caller's own user id from the path, and a valid key; the errors
/// both `PUT` and `DELETE` give.
fn own_key(auth: &Authed, user: &str, key: &str) -> ApiResult<ruma::OwnedUserId> {
    let user = UserId::parse(user).map_err(|_| ApiError::invalid_param(format!("Invalid user id: {user}")))?;
    if user != auth.user {
        return Err(ApiError::forbidden("Cannot change another user's profile"));
    }
    if key.len() > KEY_BYTES_MAX {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "M_KEY_TOO_LARGE", format!("Profile keys are at most {KEY_BYTES_MAX} bytes")));
    }
    if !valid_key(key) {
        return Err(ApiError::invalid_param(format!("Invalid profile key: {key}")));
    }
    Ok(user)
}

/// The value of another field (`m.tz` or a custom key) from a PUT body.
fn other_value(key: &str, body: &Map<String, Value>) -> ApiResult<Value> {
    let value = body.get(key).ok_or_else(|| ApiError::missing_param(format!("`{key}` is required")))?;
    if key == "m.tz" && !value.is_string() {
        return Err(ApiError::invalid_param("`m.tz` must be a string"));
    }
    Ok(value.clone())
}

/// Stores the account after a profile change, refused when the profile
/// would pass [`PROFILE_BYTES_MAX`].
fn store_profile(shard: &Shard, user: &UserId, account: &Account) -> ApiResult<()> {
    if serde_json::to_vec(&profile_json(account)).map_or(usize::MAX, |v| v.len()) > PROFILE_BYTES_MAX {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "M_PROFILE_TOO_LARGE", format!("A profile holds at most {PROFILE_BYTES_MAX} bytes")));
    }
    shard.db.put_account(user, account)?;
    Ok(())
}

/// PUT /_matrix/client/v3/profile/{userId}/{keyName}
pub async fn set(shard: &Rc<Shard>, req: &Req, auth: &Authed, user: &str, key: &str) -> ApiResult<Value> {
    let user = own_key(auth, user, key)?;
    let body: Map<String, Value> = req.json(shard)?;
    let mut account = shard.db.account(&user)?.ok_or_else(|| ApiError::not_found("Profile was not found"))?;
    let Some(field) = Field::parse(key) else {
        account.fields.insert(key.to_owned(), other_value(key, &body)?);
        store_profile(shard, &user, &account)?;
        return Ok(json!({}));
    };
    let value = new_value(field, &body)?;
    match field {
        Field::DisplayName => account.displayname = value,
        Field::AvatarUrl => account.avatar_url = value,
    }
    store_profile(shard, &user, &account)?;
    shard.db.put_directory_user(&user, &json!({ "displayname": account.displayname, "avatar_url": account.avatar_url }))?;
    propagate(shard, &user, &account).await?;
    Ok(json!({}))
}

/// DELETE /_matrix/client/v3/profile/{userId}/{keyName}
///
/// Removing a field that is not set is not an error.
pub async fn delete(shard: &Rc<Shard>, auth: &Authed, user: &str, key: &str) -> ApiResult<Value> {
    let user = own_key(auth, user, key)?;
    let mut account = shard.db.account(&user)?.ok_or_else(|| ApiError::not_found("Profile was not found"))?;
    let Some(field) = Field::parse(key) else {
        if account.fields.remove(key).is_some() {
            shard.db.put_account(&user, &account)?;
        }
        return Ok(json!({}));
    };
    if field.value(&account).is_none() {
        return Ok(json!({}));
    }
    match field {
        Field::DisplayName => account.displayname = None,
        Field::AvatarUrl => account.avatar_url = None,
    }
    shard.db.put_account(&user, &account)?;
    shard.db.put_directory_user(&user, &json!({ "displayname": account.displayname, "avatar_url": account.avatar_url }))?;
    propagate(shard, &user, &account).await?;
    Ok(json!({}))
}

/// Sends an updated `m.room.member` event to every room the user is joined
/// to whose member event does not already carry the new profile.
async fn propagate(shard: &Rc<Shard>, user: &UserId, account: &Account) -> ApiResult<()> {
    let rooms = shard.db.user_rooms(user, shard.config.limits.rooms_per_user_max)?;
    for (room_id, membership) in rooms {
        if membership.membership != "join" {
            continue;
        }
        let Ok(room) = RoomId::parse(room_id.as_str()) else {
            tracing::warn!(room = %room_id, user = %user, "skipping profile update for a malformed room id");
            continue;
        };
        let current = match shard.db.state_event(&room, "m.room.member", user.as_str()) {
            Ok(Some(ev)) if ev.pdu.membership().as_deref() == Some("join") => ev.pdu.content_value(),
            // The room list can run ahead of the room's state; only joined
            // members get a profile update.
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(room = %room, user = %user, error = %e, "cannot read member event for profile update");
                continue;
            }
        };
        let content = updated_member_content(current.clone(), account);
        if content == current {
            continue;
        }
        let draft = Draft { sender: user.to_owned(), kind: "m.room.member".into(), state_key: Some(user.to_string()), content, txn: None, redacts: None };
        if let Err(e) = shard.room_op(&room, RoomOp::Send(draft)).await {
            tracing::warn!(room = %room, user = %user, errcode = e.errcode, error = %e.message, "profile update not sent to room");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(displayname: Option<&str>, avatar_url: Option<&str>) -> Account {
        Account { password_hash: None, deactivated: false, is_guest: false, admin: false, displayname: displayname.map(str::to_owned), avatar_url: avatar_url.map(str::to_owned), created_ms: 0, fields: Default::default() }
    }

    #[test]
    fn profile_keys_follow_the_spec_grammar() {
        for ok in ["displayname", "avatar_url", "m.tz", "org.example.field", "a.b_2.c"] {
            assert!(valid_key(ok), "{ok}");
        }
        for bad in ["", "nodots", "Org.example", "org..x", "org.1x", ".org.x", "org.x.", "org.ex-ample"] {
            assert!(!valid_key(bad), "{bad}");
        }
    }

    #[test]
    fn put_values() {
        let body = |v: Value| v.as_object().cloned().unwrap_or_default();
        assert_eq!(new_value(Field::DisplayName, &body(json!({ "displayname": "Alice" }))).ok(), Some(Some("Alice".to_owned())));
        assert_eq!(new_value(Field::DisplayName, &body(json!({ "displayname": "" }))).ok(), Some(None));
        assert_eq!(new_value(Field::AvatarUrl, &body(json!({ "displayname": "x" }))).map_err(|e| e.errcode).err(), Some("M_MISSING_PARAM"));
        assert_eq!(new_value(Field::AvatarUrl, &body(json!({ "avatar_url": 3 }))).map_err(|e| e.errcode).err(), Some("M_INVALID_PARAM"));
        let long = "é".repeat(DISPLAYNAME_CHARS_MAX + 1);
        assert!(new_value(Field::DisplayName, &body(json!({ "displayname": long }))).is_err());
        assert!(new_value(Field::DisplayName, &body(json!({ "displayname": "é".repeat(DISPLAYNAME_CHARS_MAX) }))).is_ok());
    }

    #[test]
    fn member_content_keeps_extras_and_replaces_profile() {
        let current = json!({ "membership": "join", "displayname": "Old", "avatar_url": "mxc://x/old", "reason": "hi", "join_authorised_via_users_server": "@a:x", "is_direct": true });
        let updated = updated_member_content(current, &account(Some("New"), None));
        assert_eq!(updated, json!({ "membership": "join", "displayname": "New", "is_direct": true }));
    }

    #[test]
    fn profile_lists_only_set_fields() {
        assert_eq!(profile_json(&account(None, None)), json!({}));
        assert_eq!(profile_json(&account(Some("A"), Some("mxc://x/y"))), json!({ "displayname": "A", "avatar_url": "mxc://x/y" }));
    }
}
