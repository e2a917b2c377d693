//! The spec's deprecated, pre-`/sync` endpoints, kept because older clients
//! and bots still call them (Synapse serves them too):
//! `GET /initialSync`, `GET /rooms/{roomId}/initialSync`, `GET /events`
//! and `GET /events/{eventId}`.
//!
//! They are views over the same reads as `/sync` and `/messages`: the
//! `end` token of `/initialSync` is a sync token, which `/events` takes as
//! `from` and long-polls from as `/sync` does; the `messages` tokens are
//! `/messages` tokens.

use std::ops::Bound;
use std::rc::Rc;

use ruma::{OwnedEventId, RoomId, UserId};
use serde_json::{Value, json};

use crate::api::rooms::{parse_room, visible_upto};
use crate::api::sync::{SyncToken, sync_with};
use crate::error::{ApiError, ApiResult};
use crate::filter::SyncFilter;
use crate::http::{Authed, Req};
use crate::room::now_ms;
use crate::shard::Shard;

/// Messages per room when the client names no limit (as Synapse).
const MESSAGES_DEFAULT: u64 = 10;
/// Most state events listed for one room.
const ROOM_STATE_MAX: usize = 100_000;
/// Most account data entries read for one user.
const ACCOUNT_DATA_MAX: usize = 10_000;

/// GET /_matrix/client/v3/initialSync
pub async fn initial_sync(shard: &Rc<Shard>, req: &Req, auth: &Authed) -> ApiResult<Value> {
    let limit = messages_limit(shard, req)?;
    let archived = match req.query("archived") {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(ApiError::invalid_param("archived must be true or false")),
    };
    // The token is taken first: whatever is written while the rooms are
    // read comes again from `/events`, rather than being missed.
    let end = SyncToken { heads: shard.heads.borrow().clone() };
    let now = now_ms();
    let rooms = shard.sync_rooms(&auth.user, None)?;
    let mut out = Vec::new();
    for (room_id, ur) in rooms.list.iter() {
        let Ok(room) = RoomId::parse(room_id.as_str()) else { continue };
        match ur.membership.as_str() {
            "join" => out.push(room_info(shard, &auth.user, &room, "join", u64::MAX, limit, now)?),
            "leave" | "ban" if archived && !ur.forgotten => out.push(room_info(shard, &auth.user, &room, &ur.membership, ur.pos, limit, now)?),
            "invite" => {
                let mut info = json!({ "room_id": room, "membership": "invite" });
                if let Some(invite) = shard.db.state_event(&room, "m.room.member", auth.user.as_str())? {
                    info["invite"] = invite.to_client(now, None);
                }
                out.push(info);
            }
            _ => {}
        }
    }
    let account_data: Vec<Value> = shard
        .db
        .all_account_data(&auth.user, ACCOUNT_DATA_MAX)?
        .into_iter()
        .filter(|(room, _, _)| room.is_none())
        .map(|(_, kind, entry)| json!({ "type": kind, "content": entry.content }))
        .collect();
    let presence: Vec<Value> = presence_events(shard, &auth.user)?;
    Ok(json!({ "end": end.encode(), "rooms": out, "presence": presence, "account_data": account_data }))
}

/// GET /_matrix/client/v3/rooms/{roomId}/initialSync
pub fn room_initial_sync(shard: &Shard, req: &Req, auth: &Authed, room: &str) -> ApiResult<Value> {
    let room = parse_room(room)?;
    let limit = messages_limit(shard, req)?;
    let reader = crate::api::visibility::Reader::new(shard, &room, &auth.user)?;
    let membership = shard.db.user_room(&auth.user, &room)?.map(|ur| ur.membership).unwrap_or_default();
    room_info(shard, &auth.user, &room, &membership, reader.upto, limit, now_ms())
}

/// GET /_matrix/client/v3/events/{eventId}
pub fn event(shard: &Shard, auth: &Authed, event: &str) -> ApiResult<Value> {
    let not_found = || ApiError::not_found("Event not found");
    let id = OwnedEventId::try_from(event).map_err(|_| not_found())?;
    let ev = shard.db.event(&id)?.ok_or_else(not_found)?;
    let reader = crate::api::visibility::Reader::new(shard, &ev.pdu.room_id, &auth.user).map_err(|_| not_found())?;
    if !reader.allows(&ev) {
        return Err(not_found());
    }
    Ok(reader.shown(ev).to_client(now_ms(), Some((&auth.user, &auth.device))))
}

/// GET /_matrix/client/v3/events
///
/// A `/sync` from `from` (now, without it) whose timeline and ephemeral
/// events are listed together, each carrying its room id;
/// `room_id` narrows it to one room the user is or was in. To-device
/// messages are left for `/sync`.
pub async fn events(shard: &Rc<Shard>, req: &Req, auth: &Authed) -> ApiResult<Value> {
    let since = match req.query("from") {
        Some(t) => SyncToken::parse(t, shard.count).ok_or_else(|| ApiError::invalid_param("Invalid from token"))?,
        None => SyncToken { heads: shard.heads.borrow().clone() },
    };
    let timeout_ms = req.query_u64("timeout")?.unwrap_or(0);
    let mut filter = SyncFilter::default();
    if let Some(room) = req.query("room_id") {
        let room = parse_room(room)?;
        visible_upto(shard, &room, &auth.user)?;
        filter = SyncFilter::from_value(&json!({ "room": { "rooms": [room] } }));
    }
    filter.without_to_device = true;
    // A page of `/events` is everything since `from`, up to the page limit
    // (a room with more new events than that shows its latest ones, as a
    // limited `/sync` timeline does).
    filter.timeline.limit = Some(shard.config.limits.events_per_page_max);
    let start = since.encode();
    let body = sync_with(shard, auth, Some(since), timeout_ms, crate::api::sync::SyncOpts::default(), &filter).await?;
    let body = serde_json::to_value(&body).map_err(|e| ApiError::unknown(e.to_string()))?;
    let mut chunk = Vec::new();
    if let Some(joined) = body["rooms"]["join"].as_object() {
        for (room_id, room) in joined {
            for section in ["timeline", "ephemeral"] {
                for mut e in room[section]["events"].as_array().cloned().unwrap_or_default() {
                    e["room_id"] = json!(room_id);
                    chunk.push(e);
                }
            }
        }
    }
    // Presence is left out: the spec's `chunk` holds room events (each
    // with an event id, a room id and a timestamp), and presence events
    // have none of them.
    Ok(json!({ "start": start, "end": body["next_batch"], "chunk": chunk }))
}

fn messages_limit(shard: &Shard, req: &Req) -> ApiResult<usize> {
    Ok((req.query_u64("limit")?.unwrap_or(MESSAGES_DEFAULT) as usize).min(shard.config.limits.events_per_page_max))
}

/// A room as the legacy endpoints describe it, as `user` sees it at
/// timeline position `upto` (everything, for members; up to their leave
/// for former members): its latest `limit` events, its state then, its
/// directory visibility and the user's account data for it.
fn room_info(shard: &Shard, user: &UserId, room: &RoomId, membership: &str, upto: u64, limit: usize, now: u64) -> ApiResult<Value> {
    let ids = shard.db.timeline(room, Bound::Unbounded, Bound::Included(upto), true, limit)?;
    let mut chunk = Vec::new();
    let ignored = shard.ignored_users(user)?;
    let reader = crate::api::visibility::Reader::new(shard, room, user)?;
    for (_, id) in ids.iter().rev() {
        if let Some(ev) = shard.db.event(id)?
            && !crate::api::rooms::hidden(&ignored, &ev.pdu)
            && reader.allows(&ev)
        {
            chunk.push(reader.shown(ev).to_client(now, None));
        }
    }
    let end = match ids.first() {
        Some((pos, _)) => *pos,
        None => shard.db.room_head(room)?.map_or(0, |h| h.last_event_pos.min(upto)),
    };
    let mut messages = json!({ "chunk": chunk, "end": format!("t{end}") });
    if let Some((first, _)) = ids.last() {
        messages["start"] = json!(format!("t{}", first.saturating_sub(1)));
    }
    let mut state = Vec::new();
    for (_, entry) in shard.db.room_state(room, ROOM_STATE_MAX)? {
        let ev = if upto == u64::MAX { shard.db.event(&entry.event_id)? } else { crate::api::rooms::state_as_of(shard, &entry.event_id, upto)? };
        if let Some(ev) = ev {
            state.push(ev.to_client(now, None));
        }
    }
    let account_data: Vec<Value> = shard
        .db
        .all_account_data(user, ACCOUNT_DATA_MAX)?
        .into_iter()
        .filter(|(r, _, _)| r.as_deref() == Some(room.as_str()))
        .map(|(_, kind, entry)| json!({ "type": kind, "content": entry.content }))
        .collect();
    let mut info = json!({
        "room_id": room,
        "messages": messages,
        "state": state,
        "visibility": if shard.db.is_published(room)? { "public" } else { "private" },
        "account_data": account_data,
    });
    // Readers of a world-readable room they are not in have no membership.
    if !membership.is_empty() {
        info["membership"] = json!(membership);
    }
    Ok(info)
}

/// Presence events of the users who share a room with `user` (and their
/// own).
fn presence_events(shard: &Shard, user: &UserId) -> ApiResult<Vec<Value>> {
    let mut out = Vec::new();
    for other in crate::api::keys::presence_watchers(shard, user)? {
        if let Some(record) = shard.db.presence(&other)? {
            out.push(json!({ "type": "m.presence", "sender": other, "content": crate::api::userdata::presence_content(&record) }));
        }
    }
    Ok(out)
}
