//! Spaces and room previews: the space hierarchy (`/hierarchy`) and room
//! summaries (`/room_summary`), for rooms this server holds. Rooms known
//! only to other servers are left out until federation exists.

use std::collections::HashSet;

use ruma::{OwnedRoomId, RoomAliasId, RoomId, UserId};
use serde_json::{Value, json};

use crate::api::rooms::{parse_room, room_summary};
use crate::error::{ApiError, ApiResult};
use crate::http::{Authed, Req};
use crate::shard::Shard;

/// Rooms per `/hierarchy` page when the client names no limit.
const HIERARCHY_PAGE: usize = 50;
/// Most `m.space.child` entries read from one space.
const SPACE_CHILDREN_MAX: usize = 10_000;

/// The summary of a room as previews show it: the public-directory fields
/// plus the room version, the encryption algorithm and the rooms a
/// restricted join rule names.
fn preview(shard: &Shard, room: &RoomId) -> ApiResult<Value> {
    let mut s = room_summary(shard, room)?;
    let content = |kind: &str| -> ApiResult<Value> { Ok(shard.db.state_event(room, kind, "")?.map(|e| e.pdu.content_value()).unwrap_or(Value::Null)) };
    s["room_version"] = json!(content("m.room.create")?["room_version"].as_str().unwrap_or("1"));
    if let Some(alg) = content("m.room.encryption")?["algorithm"].as_str() {
        s["encryption"] = json!(alg);
    }
    let allowed = allowed_rooms(&content("m.room.join_rules")?);
    if !allowed.is_empty() {
        s["allowed_room_ids"] = json!(allowed);
    }
    Ok(s)
}

/// The rooms whose members a restricted join rule lets in.
fn allowed_rooms(join_rules: &Value) -> Vec<String> {
    let Some(allow) = join_rules["allow"].as_array() else { return Vec::new() };
    allow.iter().filter(|a| a["type"] == "m.room_membership").filter_map(|a| a["room_id"].as_str().map(str::to_owned)).collect()
}

/// Whether `user` may see the summary of `room` (`summary` from
/// [`preview`]): a member or invitee, or a room anyone may join, knock on
/// or read, or a restricted room the user could join; never a room that
/// banned the user.
fn accessible(shard: &Shard, room: &RoomId, user: &UserId, summary: &Value) -> ApiResult<bool> {
    let membership = shard.db.user_room(user, room)?.map(|ur| ur.membership);
    match membership.as_deref() {
        Some("ban") => return Ok(false),
        Some("join" | "invite") => return Ok(true),
        _ => {}
    }
    if matches!(summary["join_rule"].as_str(), Some("public" | "knock" | "knock_restricted")) || summary["world_readable"] == true {
        return Ok(true);
    }
    if summary["join_rule"] == "restricted" {
        for allowed in summary["allowed_room_ids"].as_array().into_iter().flatten() {
            let Some(Ok(other)) = allowed.as_str().map(RoomId::parse) else { continue };
            if shard.db.user_room(user, &other)?.is_some_and(|ur| ur.membership == "join") {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// A space's valid children (an `m.space.child` whose content has a
/// non-empty `via`), in the spec's order: children with a valid `order`
/// first, by `order`, then by the child event's timestamp, then by room id.
/// Each is (stripped state event, child room, suggested).
fn children(shard: &Shard, space: &RoomId) -> ApiResult<Vec<(Value, String, bool)>> {
    let mut out = Vec::new();
    for (state_key, entry) in shard.db.state_of_type(space, "m.space.child", SPACE_CHILDREN_MAX)? {
        let Some(ev) = shard.db.event(&entry.event_id)? else { continue };
        let content = ev.pdu.content_value();
        if content["via"].as_array().is_none_or(|v| v.is_empty()) {
            continue;
        }
        let order = content["order"].as_str().filter(|o| o.len() <= 50 && o.bytes().all(|b| (0x20..=0x7e).contains(&b))).map(str::to_owned);
        let ts: u64 = ev.pdu.origin_server_ts.get().into();
        let suggested = content["suggested"] == true;
        let stripped = json!({ "type": "m.space.child", "state_key": state_key, "content": content, "sender": ev.pdu.sender, "origin_server_ts": ts });
        out.push(((order.is_none(), order, ts, state_key.clone()), (stripped, state_key, suggested)));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out.into_iter().map(|(_, c)| c).collect())
}

/// GET /_matrix/client/v1/rooms/{roomId}/hierarchy
///
/// Walks the tree depth first from the space, every room at most once,
/// within `limits.hierarchy_rooms_max` rooms. A room the user may not see
/// is left out and not descended into. The token is the count of rooms
/// already returned plus the walk's settings: the next page walks again and
/// skips them.
pub fn hierarchy(shard: &Shard, req: &Req, auth: &Authed, room: &str) -> ApiResult<Value> {
    let root = parse_room(room)?;
    let limits = &shard.config.limits;
    let suggested_only = match req.query("suggested_only") {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(ApiError::invalid_param("suggested_only must be true or false")),
    };
    let max_depth = (req.query_u64("max_depth")?.map_or(limits.hierarchy_depth_max, |d| d as usize)).min(limits.hierarchy_depth_max);
    let limit = req.query_u64("limit")?.map_or(HIERARCHY_PAGE, |l| l as usize);
    if limit == 0 {
        return Err(ApiError::invalid_param("limit must be greater than zero"));
    }
    let limit = limit.min(limits.hierarchy_rooms_max);
    let skip = match req.query("from") {
        None => 0,
        Some(token) => {
            let parsed = token.strip_prefix('h').and_then(|t| {
                let mut parts = t.split('_').map(str::parse::<usize>);
                match (parts.next(), parts.next(), parts.next(), parts.next()) {
                    (Some(Ok(skip)), Some(Ok(depth)), Some(Ok(suggested)), None) => Some((skip, depth, suggested)),
                    _ => None,
                }
            });
            let (skip, depth, suggested) = parsed.ok_or_else(|| ApiError::invalid_param("Unknown pagination token"))?;
            if depth != max_depth || suggested != usize::from(suggested_only) {
                return Err(ApiError::invalid_param("suggested_only and max_depth cannot change on paginated requests"));
            }
            skip
        }
    };
    let forbidden = || ApiError::forbidden("You are not allowed to view this room.");
    if shard.db.room_head(&root)?.is_none() {
        return Err(forbidden());
    }
    let summary = preview(shard, &root)?;
    if !accessible(shard, &root, &auth.user, &summary)? {
        return Err(forbidden());
    }

    let mut stack: Vec<(OwnedRoomId, usize, Option<Value>)> = vec![(root.clone(), 0, Some(summary))];
    let mut seen = HashSet::new();
    let (mut listed, mut walked) = (0, 0);
    let mut page = Vec::new();
    while let Some((room, depth, summary)) = stack.pop() {
        if page.len() == limit || walked == limits.hierarchy_rooms_max {
            // Pushed back: whether anything is left decides the token.
            stack.push((room, depth, summary));
            break;
        }
        if !seen.insert(room.clone()) {
            continue;
        }
        walked += 1;
        let summary = match summary {
            Some(s) => s,
            None => {
                if shard.db.room_head(&room)?.is_none() {
                    continue;
                }
                let s = preview(shard, &room)?;
                if !accessible(shard, &room, &auth.user, &s)? {
                    continue;
                }
                s
            }
        };
        let space = summary["room_type"] == "m.space";
        let kids = if space { children(shard, &room)? } else { Vec::new() };
        if listed >= skip {
            let mut entry = summary;
            entry["children_state"] = Value::Array(kids.iter().map(|(stripped, _, _)| stripped.clone()).collect());
            page.push(entry);
        }
        listed += 1;
        if depth < max_depth {
            for (_, child, suggested) in kids.into_iter().rev() {
                let Ok(child) = RoomId::parse(child.as_str()) else { continue };
                if (!suggested_only || suggested) && !seen.contains(&child) {
                    stack.push((child, depth + 1, None));
                }
            }
        }
    }
    let mut body = json!({ "rooms": page });
    if stack.iter().any(|(r, _, _)| !seen.contains(r)) && walked < limits.hierarchy_rooms_max {
        body["next_batch"] = json!(format!("h{listed}_{max_depth}_{}", u8::from(suggested_only)));
    }
    Ok(body)
}

/// GET /_matrix/client/v1/room_summary/{roomIdOrAlias}
///
/// A room the user may not see is answered as unknown (404), so that the
/// answer tells nothing about it.
pub fn summary(shard: &Shard, auth: &Authed, room: &str) -> ApiResult<Value> {
    let not_found = || ApiError::not_found("Room not found.");
    let room = if room.starts_with('#') {
        let alias = RoomAliasId::parse(room).map_err(|_| ApiError::invalid_param("Invalid room alias"))?;
        let id = shard.db.alias(alias.as_str())?.ok_or_else(not_found)?;
        RoomId::parse(id.as_str()).map_err(|_| not_found())?
    } else {
        parse_room(room)?
    };
    if shard.db.room_head(&room)?.is_none() {
        return Err(not_found());
    }
    let mut summary = preview(shard, &room)?;
    if !accessible(shard, &room, &auth.user, &summary)? {
        return Err(not_found());
    }
    if let Some(ur) = shard.db.user_room(&auth.user, &room)? {
        summary["membership"] = json!(ur.membership);
    }
    Ok(summary)
}
