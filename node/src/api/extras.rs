//! Smaller client-server endpoints:
//! `POST /user/{userId}/openid/request_token`, `GET /notifications`,
//! `POST /search` (room events).

use std::collections::HashMap;
use std::ops::Bound;

use http::StatusCode;
use ruma::RoomId;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::db::ReadPart;
use crate::error::{ApiError, ApiResult};
use crate::http::{Authed, Req};
use crate::room::now_ms;
use crate::shard::Shard;

/// Lifetime of OpenID tokens.
const OPENID_TOKEN_LIFETIME_SECS: u64 = 3600;
/// Most events scanned per room by one search.
const SEARCH_SCAN_PER_ROOM: usize = 2000;
/// Most results one search or notifications page returns.
const PAGE_MAX: usize = 100;

/// POST /_matrix/client/v3/user/{userId}/openid/request_token
pub fn openid_token(shard: &Shard, auth: &Authed, user: &str) -> ApiResult<Value> {
    if user != auth.user.as_str() {
        return Err(ApiError::forbidden("Cannot request a token for another user"));
    }
    let token = crate::api::account::random_string(32);
    shard.db.put_openid_token(&token, &auth.user, now_ms() + OPENID_TOKEN_LIFETIME_SECS * 1000)?;
    Ok(json!({ "access_token": token, "token_type": "Bearer", "matrix_server_name": shard.server_name, "expires_in": OPENID_TOKEN_LIFETIME_SECS }))
}

/// Where a `/notifications` page ends: entries run newest first, then by
/// room id, then newest position first. Written `{ts}_{pos}_{room}`; a bare
/// timestamp (the older form) continues below that millisecond's first.
type NotificationKey = (std::cmp::Reverse<u64>, String, std::cmp::Reverse<u64>);

fn notification_token(token: &str) -> ApiResult<NotificationKey> {
    let bad = || ApiError::invalid_param("Invalid `from` token");
    let mut parts = token.splitn(3, '_');
    let ts: u64 = parts.next().and_then(|t| t.parse().ok()).ok_or_else(bad)?;
    match (parts.next(), parts.next()) {
        (Some(pos), Some(room)) => Ok((std::cmp::Reverse(ts), room.to_owned(), std::cmp::Reverse(pos.parse().map_err(|_| bad())?))),
        (None, None) => Ok((std::cmp::Reverse(ts), String::new(), std::cmp::Reverse(u64::MAX))),
        _ => Err(bad()),
    }
}

/// GET /_matrix/client/v3/notifications: newest first across the caller's
/// joined rooms; `from` continues after the previous page's last entry.
/// Each room contributes at most `NOTIFICATIONS_SCAN_PER_ROOM` recent rows.
pub fn notifications(shard: &Shard, req: &Req, auth: &Authed) -> ApiResult<Value> {
    const NOTIFICATIONS_SCAN_PER_ROOM: usize = 1000;
    let limit = (req.query_u64("limit")?.unwrap_or(20) as usize).clamp(1, PAGE_MAX);
    let only_highlight = req.query("only") == Some("highlight");
    let after = req.query("from").map(notification_token).transpose()?;
    let mut found = Vec::new();
    for (room, ur) in shard.db.user_rooms(&auth.user, shard.config.limits.rooms_per_user_max)? {
        if ur.membership != "join" {
            continue;
        }
        let Ok(room_id) = RoomId::parse(room.as_str()) else { continue };
        // How far the user's read receipts reached: everywhere, and in the
        // main timeline or thread of each entry.
        let read_all = shard.db.read_floor(&room_id, &auth.user, ReadPart::All)?;
        let mut floors: HashMap<ReadPart<'_>, u64> = HashMap::new();
        let index = shard.db.notify_index(&room_id, &auth.user)?;
        let rows = shard.db.room_notifications(&room_id, NOTIFICATIONS_SCAN_PER_ROOM)?;
        for (pos, row) in &rows {
            let key = (std::cmp::Reverse(row.ts), room.clone(), std::cmp::Reverse(*pos));
            if after.as_ref().is_some_and(|a| key <= *a) {
                continue;
            }
            let Some(highlight) = row.notified(&auth.user, index) else { continue };
            if only_highlight && !highlight {
                continue;
            }
            let part = ReadPart::of_event(row.thread.as_deref());
            let floor = match floors.get(&part) {
                Some(f) => *f,
                None => *floors.entry(part).or_insert(shard.db.read_floor(&room_id, &auth.user, part)?.max(read_all)),
            };
            found.push((row.ts, room.clone(), row.event_id.clone(), highlight, *pos <= floor, *pos));
        }
    }
    found.sort_by(|a, b| (std::cmp::Reverse(a.0), &a.1, std::cmp::Reverse(a.5)).cmp(&(std::cmp::Reverse(b.0), &b.1, std::cmp::Reverse(b.5))));
    let now = now_ms();
    let mut out = Vec::new();
    let ignored = shard.ignored_users(&auth.user)?;
    // The index of the last entry looked at: the next page starts after it.
    let mut last_seen = None;
    for (i, (ts, room, event_id, highlight, read, _)) in found.iter().enumerate() {
        if out.len() == limit {
            break;
        }
        last_seen = Some(i);
        let Ok(id) = ruma::OwnedEventId::try_from(event_id.as_str()) else { continue };
        let Some(ev) = shard.db.event(&id)? else { continue };
        if crate::api::rooms::hidden(&ignored, &ev.pdu) {
            continue;
        }
        let mut actions = vec![json!("notify")];
        if *highlight {
            actions.push(json!({ "set_tweak": "highlight", "value": true }));
        }
        out.push(json!({ "actions": actions, "event": ev.to_client(now, None), "read": read, "room_id": room, "ts": ts }));
    }
    let mut body = json!({ "notifications": out });
    if let Some(i) = last_seen
        && i + 1 < found.len()
    {
        let (ts, room, _, _, _, pos) = &found[i];
        body["next_token"] = json!(format!("{ts}_{pos}_{room}"));
    }
    Ok(body)
}

#[derive(Deserialize)]
struct SearchBody {
    search_categories: Categories,
}

#[derive(Deserialize)]
struct Categories {
    room_events: Option<RoomEventsCriteria>,
}

#[derive(Deserialize)]
struct RoomEventsCriteria {
    search_term: String,
    keys: Option<Vec<String>>,
    filter: Option<Value>,
}

/// POST /_matrix/client/v3/search: case-insensitive substring search over
/// the bodies, names and topics of events in the caller's joined rooms,
/// newest first. Each room is scanned up to `SEARCH_SCAN_PER_ROOM` events back.
pub fn search(shard: &Shard, req: &Req, auth: &Authed) -> ApiResult<Value> {
    let body: SearchBody = req.json(shard)?;
    let Some(criteria) = body.search_categories.room_events else {
        return Ok(json!({ "search_categories": {} }));
    };
    if criteria.search_term.trim().is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "M_BAD_JSON", "search_term must not be empty"));
    }
    let term = criteria.search_term.to_lowercase();
    let keys = criteria.keys.unwrap_or_else(|| vec!["content.body".into(), "content.name".into(), "content.topic".into()]);
    let filter = crate::filter::EventFilter::from_value(criteria.filter.as_ref().unwrap_or(&Value::Null));
    let limit = filter.limit.unwrap_or(10).clamp(1, PAGE_MAX);
    let skip: usize = match req.query("next_batch") {
        Some(n) => n.parse().map_err(|_| ApiError::invalid_param("Invalid next_batch"))?,
        None => 0,
    };
    let now = now_ms();
    let mut hits = Vec::new();
    let ignored = shard.ignored_users(&auth.user)?;
    for (room, ur) in shard.db.user_rooms(&auth.user, shard.config.limits.rooms_per_user_max)? {
        if ur.membership != "join" || !filter.allows_room(&room) {
            continue;
        }
        let Ok(room_id) = RoomId::parse(room.as_str()) else { continue };
        let reader = crate::api::visibility::Reader::new(shard, &room_id, &auth.user)?;
        for (_, id) in shard.db.timeline(&room_id, Bound::Unbounded, Bound::Unbounded, true, SEARCH_SCAN_PER_ROOM)? {
            let Some(ev) = shard.db.event(&id)? else { continue };
            // What an erased sender wrote is not searched for those who get it redacted.
            if ev.stored.redacted_by.is_some() || !filter.allows(&ev.pdu) || crate::api::rooms::hidden(&ignored, &ev.pdu) || !reader.allows(&ev) || reader.redacts(&ev) {
                continue;
            }
            let content = ev.pdu.content_value();
            let matched = keys.iter().any(|k| {
                let field = k.strip_prefix("content.").unwrap_or(k);
                content.get(field).and_then(Value::as_str).is_some_and(|v| v.to_lowercase().contains(&term))
            });
            if matched {
                hits.push(ev);
            }
        }
    }
    hits.sort_by_key(|e| std::cmp::Reverse(e.pdu.origin_server_ts));
    let count = hits.len();
    let results: Vec<Value> = hits.iter().skip(skip).take(limit).map(|e| json!({ "rank": 1.0, "result": e.to_client(now, None) })).collect();
    let mut room_events = json!({ "count": count, "highlights": [criteria.search_term], "results": results });
    if skip + limit < count {
        room_events["next_batch"] = json!((skip + limit).to_string());
    }
    Ok(json!({ "search_categories": { "room_events": room_events } }))
}

/// Most messages waiting in one device's inbox; a send that would exceed
/// it for any target device is refused whole with 429 `M_LIMIT_EXCEEDED`.
pub const INBOX_MAX: usize = 10_000;
/// Most target devices one send may address.
const TO_DEVICE_TARGETS_MAX: usize = 10_000;

/// PUT /_matrix/client/v3/sendToDevice/{eventType}/{txnId}
///
/// Every message of one request shares this shard's next stream position
/// and is numbered within it; the request is idempotent per sending device
/// and transaction id.
pub fn send_to_device(shard: &Shard, req: &Req, auth: &Authed, kind: &str, txn: &str) -> ApiResult<Value> {
    #[derive(Deserialize)]
    struct Body {
        messages: std::collections::BTreeMap<String, std::collections::BTreeMap<String, Value>>,
    }
    let body: Body = req.json(shard)?;
    let txn_key = format!("sendToDevice\u{1}{txn}");
    if shard.db.txn(&auth.user, &auth.device, &txn_key)?.is_some() {
        return Ok(json!({}));
    }
    let pos = shard.next_pos();
    let mut writes = Vec::new();
    let mut users = Vec::new();
    let mut index: u32 = 0;
    for (user, devices) in &body.messages {
        let user = crate::api::rooms::parse_user(user)?;
        if user.server_name() != shard.server_name {
            // Federation is not available yet; remote targets are dropped.
            continue;
        }
        let targets: Vec<(String, &Value)> = match devices.get("*") {
            Some(content) => shard.db.devices(&user, TO_DEVICE_TARGETS_MAX)?.into_iter().map(|(d, _)| (d, content)).collect(),
            None => devices.iter().map(|(d, c)| (d.clone(), c)).collect(),
        };
        for (device, content) in targets {
            if !content.is_object() {
                return Err(ApiError::bad_json("to-device content must be an object"));
            }
            if shard.db.inbox(&user, &device, INBOX_MAX + 1)?.len() >= INBOX_MAX {
                let mut e = ApiError::limit_exceeded(1000);
                e.message = format!("The to-device inbox of {user} {device} is full");
                return Err(e);
            }
            let message = json!({ "sender": auth.user, "type": kind, "content": content });
            writes.push(crate::db::Db::to_device_write(&user, &device, shard.id as u16, pos, index, &message));
            index = index.checked_add(1).ok_or_else(|| ApiError::too_large("too many to-device messages"))?;
            if writes.len() > TO_DEVICE_TARGETS_MAX {
                return Err(ApiError::too_large("too many target devices"));
            }
        }
        users.push(user);
    }
    writes.push(crate::db::Db::txn_write(&auth.user, &auth.device, &txn_key, <&ruma::EventId>::try_from("$to-device").map_err(|e| ApiError::unknown(e.to_string()))?));
    writes.push(crate::db::Db::stream_head_write(shard.id as u16, pos));
    shard.db.store.write(writes)?;
    shard.publish(pos, vec![], users);
    Ok(json!({}))
}
