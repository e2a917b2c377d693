//! Reporting content to the server's moderators: events, rooms and users.
//! Reports are stored by kind and day (`Db::put_report`) with the reporter,
//! the target and the reason; every report counts against the reporter's
//! message rate limit.

use std::time::Instant;

use ruma::UserId;
use serde_json::{Value, json};

use crate::api::rooms::{parse_room, parse_user};
use crate::error::{ApiError, ApiResult};
use crate::http::{Authed, Req};
use crate::ratelimit::Action;
use crate::room::now_ms;
use crate::shard::Shard;

/// The `reason` of a report body: a string, required or not.
fn reason(body: &Value, required: bool) -> ApiResult<Option<String>> {
    match body.get("reason") {
        None | Some(Value::Null) if !required => Ok(None),
        None | Some(Value::Null) => Err(ApiError::bad_json("reason is required")),
        Some(Value::String(r)) => Ok(Some(r.clone())),
        Some(_) => Err(ApiError::bad_json("reason must be a string")),
    }
}

/// POST /_matrix/client/v3/rooms/{roomId}/report/{eventId}
///
/// The reporter must be joined to the room and the event must be one of
/// the room's, not redacted; anything else is 404, whichever it was.
pub fn event(shard: &Shard, req: &Req, auth: &Authed, room: &str, event: &str) -> ApiResult<Value> {
    let body: Value = req.json(shard)?;
    let reason = reason(&body, false)?;
    let room = parse_room(room)?;
    shard.limiter.check(Action::Message, auth.user.as_str(), Instant::now())?;
    let not_found = || ApiError::not_found("The event was not found or you are not joined to the room.");
    if shard.db.user_room(&auth.user, &room)?.is_none_or(|ur| ur.membership != "join") {
        return Err(not_found());
    }
    let id = ruma::OwnedEventId::try_from(event).map_err(|_| not_found())?;
    let ev = shard.db.event(&id)?.filter(|e| e.pdu.room_id == room && e.stored.redacted_by.is_none()).ok_or_else(not_found)?;
    let now = now_ms();
    let report = json!({ "room_id": room, "event_id": id, "sender": ev.pdu.sender, "reporter": auth.user, "reason": reason, "received_ts": now });
    shard.db.put_report("event", now, &auth.user, id.as_str(), &report)?;
    tracing::info!(reporter = %auth.user, room = %room, event = %id, "event reported");
    Ok(json!({}))
}

/// POST /_matrix/client/v3/rooms/{roomId}/report
///
/// Any user may report a room this server holds; the reporter need not be
/// in it.
pub fn room(shard: &Shard, req: &Req, auth: &Authed, room: &str) -> ApiResult<Value> {
    let body: Value = req.json(shard)?;
    let reason = reason(&body, true)?;
    let room = parse_room(room)?;
    shard.limiter.check(Action::Message, auth.user.as_str(), Instant::now())?;
    if shard.db.room_head(&room)?.is_none() {
        return Err(ApiError::not_found("The room was not found on the homeserver."));
    }
    let now = now_ms();
    let report = json!({ "room_id": room, "reporter": auth.user, "reason": reason, "received_ts": now });
    shard.db.put_report("room", now, &auth.user, room.as_str(), &report)?;
    tracing::info!(reporter = %auth.user, room = %room, "room reported");
    Ok(json!({}))
}

/// POST /_matrix/client/v3/users/{userId}/report
///
/// Only users of this server can be reported here.
pub fn user(shard: &Shard, req: &Req, auth: &Authed, user: &str) -> ApiResult<Value> {
    let body: Value = req.json(shard)?;
    let reason = reason(&body, true)?;
    let target = parse_user(user)?;
    shard.limiter.check(Action::Message, auth.user.as_str(), Instant::now())?;
    if !is_local_user(shard, &target)? {
        return Err(ApiError::not_found("The user was not found."));
    }
    let now = now_ms();
    let report = json!({ "user_id": target, "reporter": auth.user, "reason": reason, "received_ts": now });
    shard.db.put_report("user", now, &auth.user, target.as_str(), &report)?;
    tracing::info!(reporter = %auth.user, user = %target, "user reported");
    Ok(json!({}))
}

fn is_local_user(shard: &Shard, user: &UserId) -> ApiResult<bool> {
    Ok(user.server_name() == shard.server_name && shard.db.account(user)?.is_some())
}
