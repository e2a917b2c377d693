//! Threads and bundled aggregations: the list of a room's thread roots
//! (`/threads`), and the `m.thread` summary and latest `m.replace` edit
//! bundled into an event's `unsigned.m.relations` wherever it is served
//! (sync timelines, `/messages`, `/context`, `/event`, `/relations`,
//! `/threads`).
//!
//! A root's summary (reply count, latest reply, participants) is kept in
//! the threads table by the room's owner as replies are appended
//! (`room::Batch::thread`), and read here per served event: one point read
//! of the threads table for each non-state event.

use std::ops::Bound;

use ruma::{EventId, RoomId, UserId};
use serde_json::{Value, json};

use crate::api::rooms::{parse_position, parse_room};
use crate::api::visibility::Reader;
use crate::db::RoomHead;
use crate::error::{ApiError, ApiResult};
use crate::http::{Authed, Req};
use crate::pdu::Event;
use crate::room::now_ms;
use crate::shard::Shard;

/// Thread roots per `/threads` page when the client names no limit.
const THREADS_PAGE: u64 = 5;

/// Most child rows read, newest first, to find an event's latest edit.
const EDIT_SCAN_MAX: usize = 1_000;

/// Longest annotation key accepted (as Synapse), in bytes.
const ANNOTATION_KEY_BYTES_MAX: usize = 500;
/// Most of a parent's annotation rows read to find a duplicate.
const ANNOTATION_SCAN_MAX: usize = 10_000;

/// Checks the relation a new event of `kind` by `sender` declares, before
/// it is sent: annotations need a key and may not repeat one the sender
/// already put on the same event with the same event type (400
/// `M_DUPLICATE_ANNOTATION`, until that one is redacted); a thread may not
/// start from an event that itself relates to another (400, as Synapse
/// answers it); and a parent this server holds must be in the same room.
///
/// Concurrent duplicates sent in the same instant can both pass, as they
/// can with Synapse: the check runs before the room's writer.
pub fn check_relation(shard: &Shard, room: &RoomId, sender: &UserId, kind: &str, content: &Value) -> ApiResult<()> {
    let Some(relates) = content.get("m.relates_to") else { return Ok(()) };
    let (Some(rel_type), Some(parent)) = (relates.get("rel_type").and_then(Value::as_str), relates.get("event_id").and_then(Value::as_str)) else { return Ok(()) };
    let Ok(parent_id) = ruma::OwnedEventId::try_from(parent) else { return Err(ApiError::bad_json("m.relates_to.event_id is not an event id")) };
    let parent_event = shard.db.event(&parent_id)?;
    if parent_event.as_ref().is_some_and(|p| p.pdu.room_id != room) {
        return Err(ApiError::new(http::StatusCode::BAD_REQUEST, "M_UNKNOWN", "Relations must be in the same room"));
    }
    match rel_type {
        "m.annotation" => {
            let Some(key) = relates.get("key").and_then(Value::as_str) else { return Err(ApiError::bad_json("An annotation needs a string key")) };
            if key.len() > ANNOTATION_KEY_BYTES_MAX {
                return Err(ApiError::invalid_param(format!("Annotation keys are at most {ANNOTATION_KEY_BYTES_MAX} bytes")));
            }
            let rows = shard.db.relations(room, &parent_id, Bound::Unbounded, Bound::Unbounded, false, ANNOTATION_SCAN_MAX)?;
            for (_, r) in rows.iter().filter(|(_, r)| r.rel_type == "m.annotation" && r.sender == sender.as_str() && r.kind == kind) {
                if let Some(existing) = shard.db.event(&r.event_id)?
                    && existing.pdu.content_value()["m.relates_to"]["key"].as_str() == Some(key)
                {
                    return Err(ApiError::new(http::StatusCode::BAD_REQUEST, "M_DUPLICATE_ANNOTATION", "You already annotated this event with this key"));
                }
            }
        }
        "m.thread" if parent_event.is_some_and(|p| p.pdu.content_value()["m.relates_to"]["rel_type"].is_string()) => {
            return Err(ApiError::new(http::StatusCode::BAD_REQUEST, "M_UNKNOWN", "Cannot start threads from an event with a relation"));
        }
        _ => {}
    }
    Ok(())
}

/// The `m.relations` bundle of `event` for `viewer`, as object members:
/// its thread summary when it is a thread root, its latest edit
/// (`m.replace` by the original sender, of the same type) and the events
/// that reference it (`m.reference`). State events get none. `head`, when
/// the caller has it, skips the lookups its counts rule out
/// (`RoomHead::threads`, `RoomHead::edits`, `RoomHead::references`).
///
/// `reader` (where erased senders need one): the latest thread reply is
/// shown as the reader may read it, and an edit the reader must get
/// redacted is not bundled.
pub fn bundle(shard: &Shard, room: &RoomId, head: Option<&RoomHead>, event: &Event, viewer: Option<(&UserId, &str)>, now: u64, reader: Option<&Reader>) -> ApiResult<Option<String>> {
    if event.pdu.state_key.is_some() {
        return Ok(None);
    }
    let mut members = Vec::new();
    if head.is_none_or(|h| h.threads > 0)
        && let Some(summary) = shard.db.thread_summary(room, event.pdu.id())?
        && let Ok(latest) = EventId::parse(summary.latest.as_str())
        && let Some(mut latest) = shard.rendered(&latest)?
    {
        if reader.is_some_and(|r| r.redacts(&latest.event)) {
            latest = std::rc::Rc::new(crate::pdu::Rendered::new(latest.event.erased_copy()));
        }
        let participated = viewer.is_some_and(|(user, _)| summary.participated(user, &event.pdu.sender));
        members.push(format!("\"m.thread\":{{\"latest_event\":{},\"count\":{},\"current_user_participated\":{participated}}}", latest.render(now, viewer).get(), summary.count));
    }
    let (edits, references) = (head.is_none_or(|h| h.edits > 0), head.is_none_or(|h| h.references > 0));
    if edits || references {
        // One newest-first read of the children serves both.
        let children = shard.db.relations(room, event.pdu.id(), Bound::Unbounded, Bound::Unbounded, true, EDIT_SCAN_MAX)?;
        let kind = event.pdu.kind.to_string();
        let latest = children.iter().find(|(_, r)| edits && r.rel_type == "m.replace" && r.sender == event.pdu.sender.as_str() && r.kind == kind);
        if let Some((_, edit)) = latest
            && let Some(edit) = shard.rendered(&edit.event_id)?
            && !reader.is_some_and(|r| r.redacts(&edit.event))
        {
            members.push(format!("\"m.replace\":{}", edit.render(now, viewer).get()));
        }
        // Every reference, oldest first (as far as the read went).
        let refs: Vec<String> = children.iter().rev().filter(|(_, r)| references && r.rel_type == "m.reference").map(|(_, r)| json!({ "event_id": r.event_id }).to_string()).collect();
        if !refs.is_empty() {
            members.push(format!("\"m.reference\":{{\"chunk\":[{}]}}", refs.join(",")));
        }
    }
    if members.is_empty() {
        return Ok(None);
    }
    Ok(Some(format!("\"m.relations\":{{{}}}", members.join(","))))
}

/// GET /_matrix/client/v1/rooms/{roomId}/threads
///
/// Roots by the position of their latest reply, most recent first; the
/// token is that position. Roots the user cannot see (after they left)
/// are left out.
pub fn threads(shard: &Shard, req: &Req, auth: &Authed, room: &str) -> ApiResult<Value> {
    let room = parse_room(room)?;
    let reader = crate::api::visibility::Reader::new(shard, &room, &auth.user).map_err(|_| ApiError::forbidden("You are not allowed to view this room."))?;
    let upto = reader.upto;
    let participated_only = match req.query("include") {
        None | Some("all") => false,
        Some("participated") => true,
        Some(_) => return Err(ApiError::invalid_param("include must be all or participated")),
    };
    let limit = match req.query_u64("limit")? {
        Some(0) => return Err(ApiError::invalid_param("limit must be greater than zero")),
        l => (l.unwrap_or(THREADS_PAGE) as usize).min(shard.config.limits.events_per_page_max.max(1)),
    };
    let head = shard.db.room_head(&room)?.ok_or_else(|| ApiError::forbidden("You are not allowed to view this room."))?;
    let mut hi = match req.query("from") {
        Some(t) => Bound::Excluded(parse_position(shard, t, head.shard)?),
        None => Bound::Unbounded,
    };
    let viewer = Some((&*auth.user, auth.device.as_str()));
    let now = now_ms();
    let ignored = shard.ignored_users(&auth.user)?;
    let mut chunk = Vec::new();
    let mut last = None;
    let mut more = false;
    let page = (limit + 1) * 2;
    'scan: loop {
        let rows = shard.db.threads(&room, Bound::Unbounded, hi, true, page)?;
        let n = rows.len();
        for (latest_pos, root) in rows {
            hi = Bound::Excluded(latest_pos);
            if chunk.len() == limit {
                more = true;
                break 'scan;
            }
            let Some(mut rendered) = shard.rendered(&root)? else { continue };
            if rendered.event.stored.pos > upto || crate::api::rooms::hidden(&ignored, &rendered.event.pdu) || !reader.allows(&rendered.event) {
                continue;
            }
            if reader.redacts(&rendered.event) {
                rendered = std::rc::Rc::new(crate::pdu::Rendered::new(rendered.event.erased_copy()));
            }
            let ev = &rendered.event;
            if participated_only {
                let summary = shard.db.thread_summary(&room, &root)?;
                if !summary.is_some_and(|s| s.participated(&auth.user, &ev.pdu.sender)) {
                    continue;
                }
            }
            let fragment = bundle(shard, &room, Some(&head), ev, viewer, now, Some(&reader))?;
            chunk.push(rendered.render_with(now, viewer, fragment.as_deref()));
            last = Some(latest_pos);
        }
        if n < page {
            break;
        }
    }
    let mut body = json!({ "chunk": chunk });
    if more && let Some(pos) = last {
        body["next_batch"] = json!(format!("t{pos}"));
    }
    Ok(body)
}

