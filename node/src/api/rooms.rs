//! Rooms: creation, membership, state, sending, redaction, history, aliases
//! and the public room directory.
//!
//! `POST /createRoom`, `POST /join/{roomIdOrAlias}`, `POST /rooms/{roomId}/join`,
//! `POST /rooms/{roomId}/{invite,leave,kick,ban,unban,forget}`,
//! `GET /joined_rooms`, `GET /rooms/{roomId}/{members,joined_members,state}`,
//! `GET|PUT /rooms/{roomId}/state/{eventType}/{stateKey}`,
//! `PUT /rooms/{roomId}/send/{eventType}/{txnId}`,
//! `PUT /rooms/{roomId}/redact/{eventId}/{txnId}`,
//! `GET /rooms/{roomId}/{messages,context/{eventId},event/{eventId}}`,
//! `PUT /rooms/{roomId}/typing/{userId}`, `POST /rooms/{roomId}/receipt/{type}/{eventId}`,
//! `POST /rooms/{roomId}/read_markers`, `GET /rooms/{roomId}/aliases`,
//! `GET|PUT|DELETE /directory/room/{alias}`, `GET|PUT /directory/list/room/{roomId}`,
//! `GET|POST /publicRooms`.
//!
//! Handlers validate and prepare on the shard that received the request;
//! anything that creates an event goes to the room's owner shard as a
//! [`RoomOp`].

use std::collections::HashSet;
use std::ops::{Bound, RangeBounds};
use std::rc::Rc;
use std::time::Instant;

use http::StatusCode;
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomAliasId, RoomId, UserId};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::db::{Relation, UserRoom};
use crate::error::{ApiError, ApiResult};
use crate::filter::EventFilter;
use crate::http::{Authed, Req};
use crate::pdu::Event;
use crate::ratelimit::Action;
use crate::room::{member_content, now_ms};
use crate::shard::{Draft, NewRoom, RoomOp, RoomReply, Shard};

/// Most state events returned by one state request.
const STATE_EVENTS_MAX: usize = 100_000;
/// Most members listed by one members request.
const MEMBERS_MAX: usize = 100_000;

pub fn parse_room(room: &str) -> ApiResult<OwnedRoomId> {
    RoomId::parse(room).map_err(|_| ApiError::invalid_param(format!("Invalid room id {room}")))
}

pub fn parse_user(user: &str) -> ApiResult<OwnedUserId> {
    UserId::parse(user).map_err(|_| ApiError::invalid_param(format!("Invalid user id {user}")))
}

fn event_id_of(reply: RoomReply) -> ApiResult<OwnedEventId> {
    match reply {
        RoomReply::Event(id, _) => Ok(id),
        RoomReply::Done => Err(ApiError::unknown("room operation returned no event")),
    }
}

/// Whether a viewer who ignores `ignored` is kept from `pdu`: the non-state
/// events of users they ignore are (state stays, so rooms still make sense).
pub(crate) fn hidden(ignored: &HashSet<OwnedUserId>, pdu: &crate::pdu::Pdu) -> bool {
    pdu.state_key.is_none() && ignored.contains(&pdu.sender)
}

/// The user's membership record in the room, or 403.
fn membership_record(shard: &Shard, room: &RoomId, user: &UserId) -> ApiResult<UserRoom> {
    shard.db.user_room(user, room)?.ok_or_else(|| ApiError::forbidden("You are not a member of this room"))
}

/// Requires a current join.
pub fn ensure_joined(shard: &Shard, room: &RoomId, user: &UserId) -> ApiResult<UserRoom> {
    let ur = membership_record(shard, room, user)?;
    if ur.membership != "join" {
        return Err(ApiError::forbidden("You are not joined to this room"));
    }
    Ok(ur)
}

/// The highest timeline position the user may see: all for joined members,
/// up to their leave for former members.
pub(crate) fn visible_upto(shard: &Shard, room: &RoomId, user: &UserId) -> ApiResult<u64> {
    let ur = membership_record(shard, room, user)?;
    match ur.membership.as_str() {
        "join" => Ok(u64::MAX),
        "leave" | "ban" => Ok(ur.pos),
        _ => Err(ApiError::forbidden("You are not a member of this room")),
    }
}

/// A 400 for room versions this server cannot create.
pub(crate) fn supported_version(version: &str) -> ApiResult<()> {
    match version {
        "10" | "11" | "12" => Ok(()),
        _ => Err(ApiError::new(StatusCode::BAD_REQUEST, "M_UNSUPPORTED_ROOM_VERSION", format!("Room version {version} is not supported"))),
    }
}

pub(crate) fn power_content(shard: &Shard, room: &RoomId) -> ApiResult<Value> {
    Ok(shard.db.state_event(room, "m.room.power_levels", "")?.map(|e| e.pdu.content_value()).unwrap_or(Value::Null))
}

pub(crate) fn user_power(pl: &Value, user: &UserId) -> i64 {
    pl["users"][user.as_str()].as_i64().or_else(|| pl["users_default"].as_i64()).unwrap_or(0)
}

/// The room's creators who have infinite power (room version 12 and
/// later; none before).
pub(crate) fn privileged_creators(shard: &Shard, room: &RoomId) -> ApiResult<Vec<OwnedUserId>> {
    let Some(head) = shard.db.room_head(room)? else { return Ok(Vec::new()) };
    let Some(create) = shard.db.state_event(room, "m.room.create", "")? else { return Ok(Vec::new()) };
    Ok(crate::room::creators(&create.pdu, &crate::room::rules_for(&head.version)?))
}

/// A user's power level in a room (the highest there is for its
/// privileged creators), with the room's power levels content.
pub(crate) fn room_power(shard: &Shard, room: &RoomId, user: &UserId) -> ApiResult<(i64, Value)> {
    let pl = power_content(shard, room)?;
    if privileged_creators(shard, room)?.iter().any(|c| c == user) {
        return Ok((i64::MAX, pl));
    }
    Ok((user_power(&pl, user), pl))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct CreateRoomBody {
    visibility: Option<String>,
    room_alias_name: Option<String>,
    name: Option<String>,
    topic: Option<String>,
    invite: Vec<String>,
    preset: Option<String>,
    initial_state: Vec<InitialState>,
    power_level_content_override: Option<Value>,
    room_version: Option<String>,
    creation_content: Option<Value>,
    is_direct: bool,
}

#[derive(Deserialize)]
struct InitialState {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    state_key: String,
    content: Value,
}

fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => merge(existing, v),
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// The `additional_creators` of a new room's create content (room version
/// 12 and later), with `also` appended, without duplicates or the creator;
/// 400 when they are not a list of user ids.
pub(crate) fn additional_creators(create_content: &Value, creator: &UserId, also: &[OwnedUserId]) -> ApiResult<Vec<String>> {
    let bad = || ApiError::bad_json("additional_creators must be a list of user ids");
    let listed = match create_content.get("additional_creators") {
        None => Vec::new(),
        Some(Value::Array(a)) => a.iter().map(|u| u.as_str().and_then(|u| UserId::parse(u).ok()).ok_or_else(bad)).collect::<ApiResult<Vec<_>>>()?,
        Some(_) => return Err(bad()),
    };
    let mut out: Vec<String> = Vec::new();
    for u in listed.iter().chain(also) {
        if u != creator && !out.iter().any(|o| o == u.as_str()) {
            out.push(u.to_string());
        }
    }
    Ok(out)
}

/// POST /_matrix/client/v3/createRoom
pub async fn create_room(shard: &Rc<Shard>, req: &Req, auth: &Authed) -> ApiResult<Value> {
    let body: CreateRoomBody = req.json(shard)?;
    let version = body.room_version.clone().unwrap_or_else(|| shard.config.rooms.default_version.clone());
    supported_version(&version)?;
    let public = body.visibility.as_deref() == Some("public");
    let preset = body.preset.clone().unwrap_or_else(|| if public { "public_chat".into() } else { "private_chat".into() });
    if !matches!(preset.as_str(), "public_chat" | "private_chat" | "trusted_private_chat") {
        return Err(ApiError::bad_json(format!("Unknown preset {preset}")));
    }
    let invites: Vec<OwnedUserId> = body.invite.iter().map(|u| parse_user(u)).collect::<ApiResult<_>>()?;
    // Room version 12 and later: creators have infinite power and are not
    // listed in the power levels.
    let privileged = crate::room::rules_for(&version)?.authorization.explicitly_privilege_room_creators;

    let alias = match &body.room_alias_name {
        Some(name) => {
            let alias = RoomAliasId::parse(format!("#{name}:{}", shard.server_name)).map_err(|_| ApiError::invalid_param("Invalid alias name"))?;
            if shard.db.alias(alias.as_str())?.is_some() {
                return Err(ApiError::new(StatusCode::BAD_REQUEST, "M_ROOM_IN_USE", "Room alias already taken"));
            }
            Some(alias)
        }
        None => None,
    };

    let mut create_content = json!({ "room_version": version });
    if version == "10" {
        create_content["creator"] = json!(auth.user);
    }
    if let Some(extra) = &body.creation_content {
        merge(&mut create_content, extra);
        create_content["room_version"] = json!(version);
    }
    let creators = if privileged {
        let extra = additional_creators(&create_content, &auth.user, if preset == "trusted_private_chat" { &invites[..] } else { &[] })?;
        match create_content.as_object_mut() {
            Some(c) if extra.is_empty() => {
                c.remove("additional_creators");
            }
            Some(c) => {
                c.insert("additional_creators".into(), json!(extra));
            }
            None => {}
        }
        std::iter::once(auth.user.to_string()).chain(extra).collect()
    } else {
        Vec::new()
    };
    let draft = |kind: &str, state_key: &str, content: Value| Draft { sender: auth.user.clone(), kind: kind.into(), state_key: Some(state_key.into()), content, txn: None, redacts: None };
    let mut events = Vec::new();
    let mut join = member_content(&shard.db, &auth.user, "join", None)?;
    if body.is_direct {
        join["is_direct"] = json!(true);
    }
    events.push(draft("m.room.member", auth.user.as_str(), join));

    let mut users = if privileged { json!({}) } else { json!({ auth.user.as_str(): 100 }) };
    if preset == "trusted_private_chat" && !privileged {
        for u in &invites {
            users[u.as_str()] = json!(100);
        }
    }
    let mut pl = json!({
        "users": users, "users_default": 0, "events_default": 0, "state_default": 50,
        "ban": 50, "kick": 50, "redact": 50, "invite": if preset == "public_chat" { 50 } else { 0 },
        "events": {
            "m.room.name": 50, "m.room.power_levels": 100, "m.room.history_visibility": 100,
            "m.room.canonical_alias": 50, "m.room.avatar": 50, "m.room.tombstone": 100,
            "m.room.server_acl": 100, "m.room.encryption": 100
        },
        "notifications": { "room": 50 }
    });
    if privileged {
        // Above `state_default`, as room version 12 requires.
        pl["events"]["m.room.tombstone"] = json!(150);
    }
    if let Some(over) = &body.power_level_content_override {
        if !over.is_object() {
            return Err(ApiError::bad_json("power_level_content_override must be an object"));
        }
        merge(&mut pl, over);
    }
    if let Some(listed) = creators.iter().find(|c| pl["users"].get(c.as_str()).is_some()) {
        return Err(ApiError::invalid_param(format!("{listed} is a creator of the room and cannot be given a power level")));
    }
    events.push(draft("m.room.power_levels", "", pl));
    if let Some(a) = &alias {
        events.push(draft("m.room.canonical_alias", "", json!({ "alias": a })));
    }
    let join_rule = if preset == "public_chat" { "public" } else { "invite" };
    events.push(draft("m.room.join_rules", "", json!({ "join_rule": join_rule })));
    events.push(draft("m.room.history_visibility", "", json!({ "history_visibility": "shared" })));
    if preset != "public_chat" {
        events.push(draft("m.room.guest_access", "", json!({ "guest_access": "can_join" })));
    }
    for s in body.initial_state {
        if !s.content.is_object() {
            return Err(ApiError::bad_json("initial_state content must be an object"));
        }
        events.push(draft(&s.kind, &s.state_key, s.content));
    }
    if let Some(name) = &body.name {
        events.push(draft("m.room.name", "", json!({ "name": name })));
    }
    if let Some(topic) = &body.topic {
        events.push(draft("m.room.topic", "", json!({ "topic": topic, "m.topic": { "m.text": [{ "mimetype": "text/plain", "body": topic }] } })));
    }
    for u in &invites {
        let mut content = member_content(&shard.db, u, "invite", None)?;
        if body.is_direct {
            content["is_direct"] = json!(true);
        }
        events.push(draft("m.room.member", u.as_str(), content));
    }
    let claim = |room: &RoomId| match &alias {
        Some(a) if !shard.db.create_alias(a.as_str(), room, &auth.user)? => Err(ApiError::new(StatusCode::BAD_REQUEST, "M_ROOM_IN_USE", "Room alias already taken")),
        _ => Ok(()),
    };
    let release = |room: &RoomId| match &alias {
        Some(a) => Ok(shard.db.delete_alias(a.as_str(), room)?),
        None => Ok(()),
    };
    let new = NewRoom { creator: auth.user.clone(), version, events, create_content, ts: crate::room::now_ms() };
    let room_id = crate::room::create_room(shard, new, &claim, &release).await?;
    if public {
        shard.db.set_published(&room_id, true)?;
    }
    Ok(json!({ "room_id": room_id }))
}

fn resolve_target(shard: &Shard, target: &str) -> ApiResult<OwnedRoomId> {
    if target.starts_with('#') {
        let alias = RoomAliasId::parse(target).map_err(|_| ApiError::invalid_param("Invalid room alias"))?;
        let room = shard.db.alias(alias.as_str())?.ok_or_else(|| ApiError::not_found("Room alias not found"))?;
        parse_room(&room)
    } else {
        parse_room(target)
    }
}

async fn send_member(shard: &Rc<Shard>, room: &RoomId, sender: &UserId, target: &UserId, content: Value) -> ApiResult<OwnedEventId> {
    let draft = Draft { sender: sender.to_owned(), kind: "m.room.member".into(), state_key: Some(target.to_string()), content, txn: None, redacts: None };
    event_id_of(shard.room_op(room, RoomOp::Send(draft)).await?)
}

/// POST /_matrix/client/v3/join/{roomIdOrAlias} and /rooms/{roomId}/join
pub async fn join(shard: &Rc<Shard>, req: &Req, auth: &Authed, target: &str) -> ApiResult<Value> {
    #[derive(Deserialize, Default)]
    struct Body {
        reason: Option<String>,
    }
    let body: Body = req.json(shard)?;
    let room = resolve_target(shard, target)?;
    if room.server_name() != Some(&*shard.server_name) && shard.db.room_head(&room)?.is_none() {
        return Err(ApiError::not_found("Joining rooms on other servers is not available"));
    }
    if shard.db.room_head(&room)?.is_none() {
        return Err(ApiError::not_found("Unknown room"));
    }
    if shard.db.membership(&room, &auth.user)?.as_deref() == Some("join") {
        return Ok(json!({ "room_id": room }));
    }
    shard.limiter.check(Action::Join, auth.user.as_str(), Instant::now())?;
    let content = member_content(&shard.db, &auth.user, "join", body.reason.as_deref())?;
    send_member(shard, &room, &auth.user, &auth.user, content).await?;
    crate::api::keys::membership_changed(shard, &room, &auth.user, true)?;
    crate::api::upgrade::joined(shard, &auth.user, &room)?;
    Ok(json!({ "room_id": room }))
}

/// POST /_matrix/client/v3/knock/{roomIdOrAlias}
///
/// Asks to join a room whose join rule allows knocking (`knock`, or
/// `knock_restricted`, in room versions that have them); the room's auth
/// rules refuse the member event otherwise. Rooms of other servers are
/// unknown until federation exists.
pub async fn knock(shard: &Rc<Shard>, req: &Req, auth: &Authed, target: &str) -> ApiResult<Value> {
    #[derive(Deserialize, Default)]
    struct Body {
        reason: Option<String>,
    }
    let body: Body = req.json(shard)?;
    let room = resolve_target(shard, target)?;
    if shard.db.room_head(&room)?.is_none() {
        return Err(ApiError::not_found("Unknown room"));
    }
    match shard.db.membership(&room, &auth.user)?.as_deref() {
        Some("knock") => return Ok(json!({ "room_id": room })),
        Some("join") => return Err(ApiError::forbidden("You are already in the room")),
        Some("invite") => return Err(ApiError::forbidden("You are already invited to the room")),
        Some("ban") => return Err(ApiError::forbidden("You are banned from the room")),
        _ => {}
    }
    shard.limiter.check(Action::Join, auth.user.as_str(), Instant::now())?;
    let content = member_content(&shard.db, &auth.user, "knock", body.reason.as_deref())?;
    send_member(shard, &room, &auth.user, &auth.user, content).await?;
    Ok(json!({ "room_id": room }))
}

/// POST /_matrix/client/v3/rooms/{roomId}/{invite,leave,kick,ban,unban}
pub async fn membership(shard: &Rc<Shard>, req: &Req, auth: &Authed, room: &str, action: &str) -> ApiResult<Value> {
    #[derive(Deserialize, Default)]
    struct Body {
        user_id: Option<String>,
        reason: Option<String>,
    }
    let body: Body = req.json(shard)?;
    let room = parse_room(room)?;
    if shard.db.room_head(&room)?.is_none() {
        return Err(if action == "leave" { ApiError::not_found("Unknown room") } else { ApiError::forbidden("Unknown room") });
    }
    let target = match action {
        "leave" => auth.user.clone(),
        _ => parse_user(body.user_id.as_deref().ok_or_else(|| ApiError::missing_param("user_id is required"))?)?,
    };
    let reason = body.reason.as_deref();
    let content = match action {
        "invite" => {
            if target.server_name() != shard.server_name || shard.db.account(&target)?.is_none() {
                return Err(ApiError::not_found("Unknown user"));
            }
            if let Some(m) = shard.db.membership(&room, &target)?
                && (m == "join" || m == "ban")
            {
                return Err(ApiError::forbidden(format!("{target} is already in the room or banned")));
            }
            let now = Instant::now();
            shard.limiter.check(Action::InviteIssuer, auth.user.as_str(), now)?;
            shard.limiter.check(Action::InviteRoom, room.as_str(), now)?;
            shard.limiter.check(Action::InviteTarget, target.as_str(), now)?;
            member_content(&shard.db, &target, "invite", reason)?
        }
        "leave" => {
            match shard.db.membership(&room, &auth.user)?.as_deref() {
                Some("join" | "invite" | "knock") => {}
                _ => return Err(ApiError::forbidden("You are not in this room")),
            }
            member_content(&shard.db, &target, "leave", reason)?
        }
        "kick" => {
            if !matches!(shard.db.membership(&room, &target)?.as_deref(), Some("join" | "invite" | "knock")) {
                return Err(ApiError::forbidden("The user is not in the room"));
            }
            member_content(&shard.db, &target, "leave", reason)?
        }
        "ban" => member_content(&shard.db, &target, "ban", reason)?,
        _ => {
            if shard.db.membership(&room, &target)?.as_deref() != Some("ban") {
                return Err(ApiError::forbidden("The user is not banned"));
            }
            member_content(&shard.db, &target, "leave", reason)?
        }
    };
    let was_joined = shard.db.membership(&room, &target)?.as_deref() == Some("join");
    send_member(shard, &room, &auth.user, &target, content).await?;
    if was_joined && matches!(action, "leave" | "kick" | "ban") {
        crate::api::keys::membership_changed(shard, &room, &target, false)?;
    }
    Ok(json!({}))
}

/// POST /_matrix/client/v3/rooms/{roomId}/forget
pub fn forget(shard: &Shard, auth: &Authed, room: &str) -> ApiResult<Value> {
    let room = parse_room(room)?;
    let Some(ur) = shard.db.user_room(&auth.user, &room)? else { return Ok(json!({})) };
    if ur.membership == "join" || ur.membership == "invite" {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "M_UNKNOWN", "You must leave the room before forgetting it"));
    }
    shard.db.forget_room(&auth.user, &room, ur)?;
    Ok(json!({}))
}

/// GET /_matrix/client/v3/joined_rooms
pub fn joined_rooms(shard: &Shard, auth: &Authed) -> ApiResult<Value> {
    let rooms: Vec<String> = shard.db.user_rooms(&auth.user, shard.config.limits.rooms_per_user_max)?.into_iter().filter(|(_, r)| r.membership == "join").map(|(id, _)| id).collect();
    Ok(json!({ "joined_rooms": rooms }))
}

/// GET /_matrix/client/v3/rooms/{roomId}/members
///
/// Membership as of `at` (a pagination or sync token) when given, and for a
/// user who left, as of their leaving (whichever is earlier): each member's
/// current event is walked back through the state it replaced.
pub fn members(shard: &Shard, req: &Req, auth: &Authed, room: &str) -> ApiResult<Value> {
    let room = parse_room(room)?;
    let upto = crate::api::visibility::Reader::new(shard, &room, &auth.user)?.upto;
    let at = match req.query("at") {
        Some(token) => parse_position(shard, token, shard.owner_of(&room) as u16)?,
        None => u64::MAX,
    };
    let point = upto.min(at);
    let want = req.query("membership");
    let not = req.query("not_membership");
    let now = now_ms();
    let mut chunk = Vec::new();
    for ((kind, _), entry) in shard.db.room_state(&room, STATE_EVENTS_MAX)? {
        if kind != "m.room.member" {
            continue;
        }
        let Some(ev) = state_as_of(shard, &entry.event_id, point)? else { continue };
        let m = ev.pdu.membership().unwrap_or_default();
        if want.is_some_and(|w| w != m) || not.is_some_and(|n| n == m) {
            continue;
        }
        chunk.push(ev.to_client(now, None));
        if chunk.len() >= MEMBERS_MAX {
            break;
        }
    }
    Ok(json!({ "chunk": chunk }))
}

/// Most replaced state events followed back for one state key.
const STATE_HISTORY_HOPS_MAX: usize = 1_000;

/// The state event that was current for a state key at position `point`,
/// starting from the one current now: `None` when the key had no state yet.
pub(crate) fn state_as_of(shard: &Shard, current: &ruma::EventId, point: u64) -> ApiResult<Option<crate::pdu::Event>> {
    let mut id = current.to_owned();
    for _ in 0..STATE_HISTORY_HOPS_MAX {
        let Some(ev) = shard.db.event(&id)? else { return Ok(None) };
        if ev.stored.pos <= point {
            return Ok(Some(ev));
        }
        match ev.stored.replaces_state.as_deref().map(OwnedEventId::try_from) {
            Some(Ok(previous)) => id = previous,
            _ => return Ok(None),
        }
    }
    Ok(None)
}

/// GET /_matrix/client/v3/rooms/{roomId}/joined_members
pub fn joined_members(shard: &Shard, auth: &Authed, room: &str) -> ApiResult<Value> {
    let room = parse_room(room)?;
    // Members, and anyone in a world-readable room; not former members.
    if crate::api::visibility::Reader::new(shard, &room, &auth.user)?.upto != u64::MAX {
        return Err(ApiError::forbidden("You are not joined to this room"));
    }
    let mut joined = serde_json::Map::new();
    for ((kind, key), entry) in shard.db.room_state(&room, STATE_EVENTS_MAX)? {
        if kind != "m.room.member" {
            continue;
        }
        let Some(ev) = shard.db.event(&entry.event_id)? else { continue };
        if ev.pdu.membership().as_deref() != Some("join") {
            continue;
        }
        let c = ev.pdu.content_value();
        let mut member = serde_json::Map::new();
        for (from, to) in [("displayname", "display_name"), ("avatar_url", "avatar_url")] {
            if let Some(v) = c.get(from).filter(|v| v.is_string()) {
                member.insert(to.into(), v.clone());
            }
        }
        joined.insert(key, Value::Object(member));
    }
    Ok(json!({ "joined": joined }))
}

/// The state event current for `entry` as the reader may see it: now for
/// members and readers of world-readable rooms, as of their leave for
/// former members.
fn readable_state(shard: &Shard, reader: &crate::api::visibility::Reader, event_id: &ruma::EventId) -> ApiResult<Option<Event>> {
    if reader.upto == u64::MAX {
        return Ok(shard.db.event(event_id)?);
    }
    state_as_of(shard, event_id, reader.upto)
}

/// GET /_matrix/client/v3/rooms/{roomId}/state
///
/// Current state for members (and anyone, in a world-readable room), the
/// state as of their leave for former members (as Synapse).
pub fn state(shard: &Shard, auth: &Authed, room: &str) -> ApiResult<Value> {
    let room = parse_room(room)?;
    let reader = crate::api::visibility::Reader::new(shard, &room, &auth.user)?;
    let now = now_ms();
    let mut out = Vec::new();
    for (_, entry) in shard.db.room_state(&room, STATE_EVENTS_MAX)? {
        if let Some(ev) = readable_state(shard, &reader, &entry.event_id)? {
            out.push(ev.to_client(now, None));
        }
    }
    Ok(Value::Array(out))
}

/// GET /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}
pub fn state_event(shard: &Shard, req: &Req, auth: &Authed, room: &str, kind: &str, state_key: &str) -> ApiResult<Value> {
    let room = parse_room(room)?;
    let reader = crate::api::visibility::Reader::new(shard, &room, &auth.user)?;
    let not_found = || ApiError::not_found("Event not found");
    let entry = shard.db.state_entry(&room, kind, state_key)?.ok_or_else(not_found)?;
    let ev = readable_state(shard, &reader, &entry.event_id)?.ok_or_else(not_found)?;
    if req.query("format") == Some("event") {
        return Ok(ev.to_client(now_ms(), None));
    }
    if ev.stored.redacted_by.is_some() {
        return Ok(crate::pdu::redacted_content(kind, ev.pdu.content_value()));
    }
    Ok(ev.pdu.content_value())
}

/// PUT /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}
pub async fn put_state(shard: &Rc<Shard>, req: &Req, auth: &Authed, room: &str, kind: &str, state_key: &str) -> ApiResult<Value> {
    let room = parse_room(room)?;
    let content = req.json_object_fast(shard)?;
    if kind != "m.room.member" {
        ensure_joined(shard, &room, &auth.user)?;
    }
    let draft = Draft { sender: auth.user.clone(), kind: kind.into(), state_key: Some(state_key.into()), content, txn: None, redacts: None };
    let id = event_id_of(shard.room_op(&room, RoomOp::Send(draft)).await?)?;
    if kind != "m.room.member" {
        crate::presence::active(shard, &auth.user, false);
    }
    Ok(json!({ "event_id": id }))
}

/// The answer to a send whose transaction id was seen before: the earlier
/// event, once this shard has heard of it (a retry may come here before
/// the first attempt's announcement did).
async fn earlier_send(shard: &Rc<Shard>, existing: String) -> ApiResult<Value> {
    if let Ok(id) = OwnedEventId::try_from(existing.as_str())
        && let Some(ev) = shard.db.event(&id)?
    {
        shard.wait_heard(shard.owner_of(&ev.pdu.room_id), ev.stored.pos).await;
    }
    Ok(json!({ "event_id": existing }))
}

/// PUT /_matrix/client/v3/rooms/{roomId}/send/{eventType}/{txnId}
pub async fn send(shard: &Rc<Shard>, req: &Req, auth: &Authed, room: &str, kind: &str, txn: Option<&str>) -> ApiResult<Value> {
    let room = parse_room(room)?;
    let content = req.json_object_fast(shard)?;
    if let Some(t) = txn
        && let Some(existing) = shard.db.txn(&auth.user, &auth.device, t)?
    {
        return earlier_send(shard, existing).await;
    }
    ensure_joined(shard, &room, &auth.user)?;
    shard.limiter.check(Action::Message, auth.user.as_str(), Instant::now())?;
    crate::api::threads::check_relation(shard, &room, &auth.user, kind, &content)?;
    let draft = Draft { sender: auth.user.clone(), kind: kind.into(), state_key: None, content, txn: txn.map(|t| (auth.device.clone(), t.to_owned())), redacts: None };
    let id = event_id_of(shard.room_op(&room, RoomOp::Send(draft)).await?)?;
    crate::presence::active(shard, &auth.user, false);
    Ok(json!({ "event_id": id }))
}

/// PUT /_matrix/client/v3/rooms/{roomId}/redact/{eventId}/{txnId}
pub async fn redact(shard: &Rc<Shard>, req: &Req, auth: &Authed, room: &str, event: &str, txn: &str) -> ApiResult<Value> {
    #[derive(Deserialize, Default)]
    struct Body {
        reason: Option<String>,
    }
    let room = parse_room(room)?;
    let target = OwnedEventId::try_from(event).map_err(|_| ApiError::invalid_param("Invalid event id"))?;
    let body: Body = req.json(shard)?;
    if let Some(existing) = shard.db.txn(&auth.user, &auth.device, txn)? {
        return earlier_send(shard, existing).await;
    }
    ensure_joined(shard, &room, &auth.user)?;
    let mut content = json!({ "redacts": target });
    if let Some(r) = body.reason {
        content["reason"] = json!(r);
    }
    let draft = Draft { sender: auth.user.clone(), kind: "m.room.redaction".into(), state_key: None, content, txn: Some((auth.device.clone(), txn.to_owned())), redacts: Some(target) };
    let id = event_id_of(shard.room_op(&room, RoomOp::Send(draft)).await?)?;
    crate::presence::active(shard, &auth.user, false);
    Ok(json!({ "event_id": id }))
}

/// Parses a pagination token: `t{pos}` (room position) or a sync token, whose
/// component for the room's owner shard applies.
pub fn parse_position(shard: &Shard, token: &str, room_shard: u16) -> ApiResult<u64> {
    if let Some(p) = token.strip_prefix('t') {
        return p.parse().map_err(|_| ApiError::invalid_param("Invalid pagination token"));
    }
    let sync = crate::api::sync::SyncToken::parse(token, shard.count).ok_or_else(|| ApiError::invalid_param("Invalid pagination token"))?;
    Ok(sync.heads.get(usize::from(room_shard)).copied().unwrap_or(0))
}

fn filter_param(shard: &Shard, req: &Req, auth: &Authed) -> ApiResult<EventFilter> {
    match req.query("filter") {
        None => Ok(EventFilter::default()),
        Some(f) if f.starts_with('{') => {
            let v: Value = serde_json::from_str(f).map_err(|_| ApiError::bad_json("filter is not valid JSON"))?;
            Ok(EventFilter::from_value(&v))
        }
        Some(id) => {
            let v = shard.db.filter(&auth.user, id)?.ok_or_else(|| ApiError::not_found("Unknown filter"))?;
            Ok(EventFilter::from_value(&v))
        }
    }
}

/// Member events of the senders of `events`, for lazy-loading clients.
fn lazy_members(shard: &Shard, room: &RoomId, events: &[Event], now: u64) -> ApiResult<Vec<Value>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for e in events {
        if seen.insert(e.pdu.sender.clone())
            && let Some(m) = shard.db.state_event(room, "m.room.member", e.pdu.sender.as_str())?
        {
            out.push(m.to_client(now, None));
        }
    }
    Ok(out)
}

/// GET /_matrix/client/v3/rooms/{roomId}/messages
pub fn messages(shard: &Shard, req: &Req, auth: &Authed, room: &str) -> ApiResult<Value> {
    let room = parse_room(room)?;
    let reader = crate::api::visibility::Reader::new(shard, &room, &auth.user)?;
    let upto = reader.upto;
    let head = shard.db.room_head(&room)?.ok_or_else(|| ApiError::not_found("Unknown room"))?;
    let backwards = match req.query("dir") {
        Some("b") => true,
        Some("f") => false,
        Some(_) => return Err(ApiError::invalid_param("dir must be b or f")),
        None => return Err(ApiError::missing_param("dir is required")),
    };
    let limit = (req.query_u64("limit")?.unwrap_or(10) as usize).min(shard.config.limits.events_per_page_max);
    let from = match req.query("from") {
        Some(t) => parse_position(shard, t, head.shard)?,
        None if backwards => head.last_event_pos,
        None => 0,
    };
    let to = req.query("to").map(|t| parse_position(shard, t, head.shard)).transpose()?;
    let filter = filter_param(shard, req, auth)?;
    let limit = filter.limit.map_or(limit, |l| l.min(limit));
    let ignored = shard.ignored_users(&auth.user)?;
    let now = now_ms();
    let (lo, hi) = if backwards {
        (to.map_or(Bound::Unbounded, Bound::Excluded), Bound::Included(from.min(upto)))
    } else {
        (Bound::Excluded(from), to.map_or(Bound::Included(upto), |t| Bound::Included(t.min(upto))))
    };
    // Scan in pages so that filtered-out events don't end pagination early.
    let mut chunk: Vec<Event> = Vec::new();
    let mut last_pos = None;
    let (mut lo, mut hi) = (lo, hi);
    'scan: loop {
        let page = shard.db.timeline(&room, lo, hi, backwards, limit.max(1) * 2)?;
        if page.is_empty() {
            break;
        }
        for (pos, id) in &page {
            last_pos = Some(*pos);
            if let Some(ev) = shard.db.event(id)?
                && filter.allows(&ev.pdu)
                && !hidden(&ignored, &ev.pdu)
                && reader.allows(&ev)
            {
                chunk.push(reader.shown(ev));
                if chunk.len() >= limit {
                    break 'scan;
                }
            }
        }
        let Some(p) = last_pos else { break };
        if backwards {
            hi = Bound::Excluded(p);
        } else {
            lo = Bound::Excluded(p);
        }
        if page.len() < limit.max(1) * 2 {
            break;
        }
    }
    let start = format!("t{from}");
    let viewer = Some((&*auth.user, auth.device.as_str()));
    let rendered = chunk.iter().map(|e| client_event(shard, &room, Some(&head), e, now, viewer, &reader)).collect::<ApiResult<Vec<_>>>()?;
    let mut body = json!({ "start": start, "chunk": rendered });
    if let Some(p) = last_pos
        && (chunk.len() >= limit)
    {
        body["end"] = json!(format!("t{}", if backwards { p.saturating_sub(1) } else { p }));
    }
    if filter.lazy_load_members {
        body["state"] = json!(lazy_members(shard, &room, &chunk, now)?);
    }
    Ok(body)
}

/// An event's client JSON for `viewer`, with its bundled aggregations.
///
/// `head`, read once per request, lets rooms without threads, edits or
/// references skip the lookups.
fn client_event(shard: &Shard, room: &RoomId, head: Option<&crate::db::RoomHead>, ev: &Event, now: u64, viewer: Option<(&UserId, &str)>, reader: &crate::api::visibility::Reader) -> ApiResult<Value> {
    let mut value = ev.to_client(now, viewer);
    if let Some(fragment) = crate::api::threads::bundle(shard, room, head, ev, viewer, now, Some(reader))? {
        let parsed: Value = serde_json::from_str(&format!("{{{fragment}}}")).map_err(|e| ApiError::unknown(e.to_string()))?;
        if let (Some(unsigned), Some(relations)) = (value.get_mut("unsigned").and_then(Value::as_object_mut), parsed.get("m.relations")) {
            unsigned.insert("m.relations".into(), relations.clone());
        }
    }
    Ok(value)
}

/// GET /_matrix/client/v3/rooms/{roomId}/context/{eventId}
pub fn context(shard: &Shard, req: &Req, auth: &Authed, room: &str, event: &str) -> ApiResult<Value> {
    let room = parse_room(room)?;
    let reader = crate::api::visibility::Reader::new(shard, &room, &auth.user)?;
    let upto = reader.upto;
    let id = OwnedEventId::try_from(event).map_err(|_| ApiError::invalid_param("Invalid event id"))?;
    let ev = reader.shown(shard.db.event(&id)?.filter(|e| e.pdu.room_id == room && reader.allows(e)).ok_or_else(|| ApiError::not_found("Event not found"))?);
    let head = shard.db.room_head(&room)?;
    let limit = (req.query_u64("limit")?.unwrap_or(10) as usize).min(shard.config.limits.events_per_page_max);
    let filter = filter_param(shard, req, auth)?;
    let before_n = limit / 2;
    let after_n = limit - before_n;
    let now = now_ms();
    let viewer = Some((&*auth.user, auth.device.as_str()));
    let ignored = shard.ignored_users(&auth.user)?;
    let load = |ids: Vec<(u64, OwnedEventId)>| -> ApiResult<Vec<Event>> {
        let mut v = Vec::new();
        for (_, id) in ids {
            if let Some(e) = shard.db.event(&id)?
                && filter.allows(&e.pdu)
                && !hidden(&ignored, &e.pdu)
                && reader.allows(&e)
            {
                v.push(reader.shown(e));
            }
        }
        Ok(v)
    };
    let before = load(shard.db.timeline(&room, Bound::Unbounded, Bound::Excluded(ev.stored.pos), true, before_n)?)?;
    let after = load(shard.db.timeline(&room, Bound::Excluded(ev.stored.pos), Bound::Included(upto), false, after_n)?)?;
    let start = before.last().map_or(ev.stored.pos, |e| e.stored.pos).saturating_sub(1);
    let end = after.last().map_or(ev.stored.pos, |e| e.stored.pos);
    let mut state = Vec::new();
    for (_, entry) in shard.db.room_state(&room, STATE_EVENTS_MAX)? {
        if let Some(s) = shard.db.event(&entry.event_id)? {
            if filter.lazy_load_members && s.pdu.kind.to_string() == "m.room.member" {
                continue;
            }
            state.push(s.to_client(now, None));
        }
    }
    if filter.lazy_load_members {
        let all: Vec<Event> = before.iter().chain(after.iter()).chain(std::iter::once(&ev)).cloned().collect();
        state.extend(lazy_members(shard, &room, &all, now)?);
    }
    Ok(json!({
        "event": client_event(shard, &room, head.as_ref(), &ev, now, viewer, &reader)?,
        "events_before": before.iter().map(|e| client_event(shard, &room, head.as_ref(), e, now, viewer, &reader)).collect::<ApiResult<Vec<_>>>()?,
        "events_after": after.iter().map(|e| client_event(shard, &room, head.as_ref(), e, now, viewer, &reader)).collect::<ApiResult<Vec<_>>>()?,
        "start": format!("t{start}"),
        "end": format!("t{end}"),
        "state": state,
    }))
}

/// GET /_matrix/client/v3/rooms/{roomId}/event/{eventId}
pub fn event(shard: &Shard, auth: &Authed, room: &str, event: &str) -> ApiResult<Value> {
    let room = parse_room(room)?;
    let reader = crate::api::visibility::Reader::new(shard, &room, &auth.user).map_err(|_| ApiError::not_found("Event not found"))?;
    let id = OwnedEventId::try_from(event).map_err(|_| ApiError::not_found("Event not found"))?;
    let ev = reader.shown(shard.db.event(&id)?.filter(|e| e.pdu.room_id == room && reader.allows(e)).ok_or_else(|| ApiError::not_found("Event not found"))?);
    let head = shard.db.room_head(&room)?;
    client_event(shard, &room, head.as_ref(), &ev, now_ms(), Some((&auth.user, &auth.device)), &reader)
}

/// Children per `/relations` page when the client names no limit.
const RELATIONS_PAGE: u64 = 5;
/// Levels of relations `/relations?recurse=true` follows below the parent
/// (the spec asks for at least 3).
const RELATIONS_DEPTH: usize = 3;
/// Most child rows one recursive `/relations` request reads.
const RELATIONS_SCAN_MAX: usize = 10_000;

/// GET /_matrix/client/v1/rooms/{roomId}/relations/{eventId}[/{relType}[/{eventType}]]
///
/// Children come from the parent's partition of the relations table, in
/// stream order, filtered on the row before any event is read. Tokens are
/// positions, as for `/messages`, so `/messages` and `/sync` tokens work too.
pub fn relations(shard: &Shard, req: &Req, auth: &Authed, room: &str, event: &str, rel_type: Option<&str>, event_type: Option<&str>) -> ApiResult<Value> {
    let room = parse_room(room)?;
    let not_found = || ApiError::not_found("Event not found");
    let reader = crate::api::visibility::Reader::new(shard, &room, &auth.user).map_err(|_| not_found())?;
    let upto = reader.upto;
    let parent = OwnedEventId::try_from(event).map_err(|_| not_found())?;
    shard.db.event(&parent)?.filter(|e| e.pdu.room_id == room && reader.allows(e)).ok_or_else(not_found)?;
    let head = shard.db.room_head(&room)?.ok_or_else(not_found)?;
    let backwards = match req.query("dir") {
        None | Some("b") => true,
        Some("f") => false,
        Some(_) => return Err(ApiError::invalid_param("dir must be b or f")),
    };
    let recurse = match req.query("recurse") {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(_) => return Err(ApiError::invalid_param("recurse must be true or false")),
    };
    let limit = (req.query_u64("limit")?.unwrap_or(RELATIONS_PAGE) as usize).clamp(1, shard.config.limits.events_per_page_max.max(1));
    let from = req.query("from").map(|t| parse_position(shard, t, head.shard)).transpose()?;
    let to = req.query("to").map(|t| parse_position(shard, t, head.shard)).transpose()?;
    let (lo, hi) = if backwards {
        (to.map_or(Bound::Unbounded, Bound::Excluded), Bound::Included(from.map_or(upto, |f| f.min(upto))))
    } else {
        (from.map_or(Bound::Unbounded, Bound::Excluded), Bound::Included(to.map_or(upto, |t| t.min(upto))))
    };
    let wanted = |r: &Relation| rel_type.is_none_or(|t| r.rel_type == t) && event_type.is_none_or(|t| r.kind == t);
    let depth = if recurse == Some(true) { RELATIONS_DEPTH } else { 1 };
    // One more than a page, to know whether another follows.
    let mut found: Vec<(u64, OwnedEventId)> = Vec::new();
    if depth == 1 {
        let (mut lo, mut hi) = (lo, hi);
        let page = (limit + 1) * 2;
        loop {
            let rows = shard.db.relations(&room, &parent, lo, hi, backwards, page)?;
            let n = rows.len();
            for (pos, r) in rows {
                if backwards {
                    hi = Bound::Excluded(pos);
                } else {
                    lo = Bound::Excluded(pos);
                }
                if wanted(&r) {
                    found.push((pos, r.event_id));
                    if found.len() > limit {
                        break;
                    }
                }
            }
            if found.len() > limit || n < page {
                break;
            }
        }
    } else {
        // Every descendant down to `depth` levels, then put in order.
        let mut parents = vec![parent.clone()];
        let mut scanned = 0;
        'levels: for _ in 0..depth {
            let mut next = Vec::new();
            for p in &parents {
                let left = RELATIONS_SCAN_MAX - scanned;
                if left == 0 {
                    break 'levels;
                }
                let rows = shard.db.relations(&room, p, Bound::Unbounded, Bound::Unbounded, false, left)?;
                scanned += rows.len();
                for (pos, r) in rows {
                    next.push(r.event_id.clone());
                    if (lo, hi).contains(&pos) && wanted(&r) {
                        found.push((pos, r.event_id));
                    }
                }
            }
            parents = next;
        }
        found.sort_unstable_by_key(|(pos, _)| *pos);
        if backwards {
            found.reverse();
        }
    }
    let more = found.len() > limit;
    found.truncate(limit);
    let now = now_ms();
    let mut chunk = Vec::with_capacity(found.len());
    let ignored = shard.ignored_users(&auth.user)?;
    for (_, child) in &found {
        if let Some(ev) = shard.db.event(child)?
            && !hidden(&ignored, &ev.pdu)
            && reader.allows(&ev)
        {
            chunk.push(client_event(shard, &room, Some(&head), &reader.shown(ev), now, Some((&auth.user, &auth.device)), &reader)?);
        }
    }
    let mut body = json!({ "chunk": chunk });
    if more && let Some((pos, _)) = found.last() {
        body["next_batch"] = json!(format!("t{}", if backwards { pos.saturating_sub(1) } else { *pos }));
    }
    if let Some(f) = req.query("from") {
        body["prev_batch"] = json!(f);
    }
    if recurse.is_some() {
        body["recursion_depth"] = json!(depth);
    }
    Ok(body)
}

/// GET /_matrix/client/v1/rooms/{roomId}/timestamp_to_event
///
/// The event closest to `ts` in direction `dir`: with `f`, the first event
/// sent at or after it; with `b`, the last sent at or before it. A binary
/// search over the room's timeline positions, which follow the events'
/// timestamps on one server; each step reads one timeline row and its event.
pub fn timestamp_to_event(shard: &Shard, req: &Req, auth: &Authed, room: &str) -> ApiResult<Value> {
    let room = parse_room(room)?;
    let ts = req.query_u64("ts")?.ok_or_else(|| ApiError::missing_param("ts is required"))?;
    let forward = match req.query("dir") {
        Some("f") => true,
        Some("b") => false,
        Some(_) => return Err(ApiError::invalid_param("dir must be b or f")),
        None => return Err(ApiError::missing_param("dir is required")),
    };
    let upto = crate::api::visibility::Reader::new(shard, &room, &auth.user)?.upto;
    let head = shard.db.room_head(&room)?.ok_or_else(|| ApiError::not_found("Unknown room"))?;
    let end = head.last_event_pos.min(upto);
    // One timeline row within [lo, hi]: the first (forward) or last.
    let row = |lo: u64, hi: u64, first: bool| -> ApiResult<Option<(u64, u64, OwnedEventId)>> {
        let Some((pos, id)) = shard.db.timeline(&room, Bound::Included(lo), Bound::Included(hi), !first, 1)?.into_iter().next() else { return Ok(None) };
        let sent = shard.rendered(&id)?.map_or(0, |r| u64::from(r.event.pdu.origin_server_ts.get()));
        Ok(Some((pos, sent, id)))
    };
    let (mut lo, mut hi) = (0u64, end);
    let mut found = None;
    while lo <= hi {
        let mid = lo + (hi - lo) / 2;
        if forward {
            match row(mid, hi, true)? {
                None if mid == 0 => break,
                None => hi = mid - 1,
                Some((_, sent, id)) if sent >= ts => {
                    found = Some((id, sent));
                    if mid == 0 {
                        break;
                    }
                    hi = mid - 1;
                }
                Some((pos, _, _)) => lo = pos + 1,
            }
        } else {
            match row(lo, mid, false)? {
                None => lo = mid + 1,
                Some((_, sent, id)) if sent <= ts => {
                    found = Some((id, sent));
                    lo = mid + 1;
                }
                Some((0, _, _)) => break,
                Some((pos, _, _)) => hi = pos - 1,
            }
        }
        if lo > end {
            break;
        }
    }
    let (id, sent) = found.ok_or_else(|| ApiError::not_found("No event found"))?;
    Ok(json!({ "event_id": id, "origin_server_ts": sent }))
}

/// Rooms per `/mutual_rooms` page.
const MUTUAL_ROOMS_PAGE: usize = 100;

/// GET /_matrix/client/v1/mutual_rooms
///
/// Rooms both the caller and `user_id` are joined to, by room id; `count`
/// is the total. The token is the last room id of the page.
pub fn mutual_rooms(shard: &Shard, req: &Req, auth: &Authed) -> ApiResult<Value> {
    let other = req.query("user_id").ok_or_else(|| ApiError::missing_param("user_id is required"))?;
    let other = parse_user(other)?;
    if other == auth.user {
        return Err(ApiError::invalid_param("user_id is your own user id"));
    }
    let max = shard.config.limits.rooms_per_user_max;
    let joined = |user: &UserId| -> ApiResult<HashSet<String>> { Ok(shard.db.user_rooms(user, max)?.into_iter().filter(|(_, ur)| ur.membership == "join").map(|(room, _)| room).collect()) };
    let theirs = joined(&other)?;
    let mut both: Vec<String> = joined(&auth.user)?.into_iter().filter(|r| theirs.contains(r)).collect();
    both.sort_unstable();
    let count = both.len();
    let after = match req.query("from") {
        Some(t) => Some(t.strip_prefix('r').ok_or_else(|| ApiError::invalid_param("Invalid pagination token"))?),
        None => None,
    };
    let page: Vec<&String> = both.iter().filter(|r| after.is_none_or(|a| r.as_str() > a)).take(MUTUAL_ROOMS_PAGE + 1).collect();
    let more = page.len() > MUTUAL_ROOMS_PAGE;
    let page = &page[..page.len().min(MUTUAL_ROOMS_PAGE)];
    let mut body = json!({ "joined": page, "count": count });
    if more && let Some(last) = page.last() {
        body["next_batch"] = json!(format!("r{last}"));
    }
    Ok(body)
}

/// PUT /_matrix/client/v3/rooms/{roomId}/typing/{userId}
pub async fn typing(shard: &Rc<Shard>, req: &Req, auth: &Authed, room: &str, user: &str) -> ApiResult<Value> {
    #[derive(Deserialize)]
    struct Body {
        typing: bool,
        timeout: Option<u64>,
    }
    let room = parse_room(room)?;
    let user = parse_user(user)?;
    let body: Body = req.json(shard)?;
    if user != auth.user {
        return Err(ApiError::forbidden("Cannot set typing for another user"));
    }
    ensure_joined(shard, &room, &auth.user)?;
    let timeout_ms = body.timeout.unwrap_or(30_000).min(120_000);
    shard.room_op(&room, RoomOp::Typing { user, typing: body.typing, timeout_ms }).await?;
    Ok(json!({}))
}

/// POST /_matrix/client/v3/rooms/{roomId}/receipt/{receiptType}/{eventId}
pub async fn receipt(shard: &Rc<Shard>, req: &Req, auth: &Authed, room: &str, kind: &str, event: &str) -> ApiResult<Value> {
    #[derive(Deserialize, Default)]
    struct Body {
        thread_id: Option<String>,
    }
    let room = parse_room(room)?;
    let event_id = OwnedEventId::try_from(event).map_err(|_| ApiError::invalid_param("Invalid event id"))?;
    let body: Body = req.json(shard)?;
    ensure_joined(shard, &room, &auth.user)?;
    match kind {
        "m.read" | "m.read.private" => {
            let thread = body.thread_id.unwrap_or_default();
            shard.room_op(&room, RoomOp::Receipt { user: auth.user.clone(), kind: kind.into(), thread, event_id, ts: now_ms() }).await?;
        }
        "m.fully_read" => set_fully_read(shard, &auth.user, &room, &event_id)?,
        _ => return Err(ApiError::invalid_param("Unknown receipt type")),
    }
    crate::presence::active(shard, &auth.user, false);
    Ok(json!({}))
}

fn set_fully_read(shard: &Rc<Shard>, user: &UserId, room: &RoomId, event_id: &OwnedEventId) -> ApiResult<()> {
    let pos = shard.next_pos();
    let entry = crate::db::AccountDataEntry { content: json!({ "event_id": event_id }), shard: shard.id as u16, pos };
    shard.db.put_account_data(user, Some(room), "m.fully_read", &entry, vec![crate::db::Db::stream_head_write(shard.id as u16, pos)])?;
    shard.publish(pos, vec![], vec![user.to_owned()]);
    Ok(())
}

/// POST /_matrix/client/v3/rooms/{roomId}/read_markers
pub async fn read_markers(shard: &Rc<Shard>, req: &Req, auth: &Authed, room: &str) -> ApiResult<Value> {
    let room = parse_room(room)?;
    let body: Value = req.json(shard)?;
    ensure_joined(shard, &room, &auth.user)?;
    let id = |k: &str| -> ApiResult<Option<OwnedEventId>> {
        body.get(k).and_then(Value::as_str).map(|s| OwnedEventId::try_from(s).map_err(|_| ApiError::invalid_param("Invalid event id"))).transpose()
    };
    if let Some(e) = id("m.fully_read")? {
        set_fully_read(shard, &auth.user, &room, &e)?;
    }
    for kind in ["m.read", "m.read.private"] {
        if let Some(e) = id(kind)? {
            shard.room_op(&room, RoomOp::Receipt { user: auth.user.clone(), kind: kind.into(), thread: String::new(), event_id: e, ts: now_ms() }).await?;
        }
    }
    crate::presence::active(shard, &auth.user, false);
    Ok(json!({}))
}

/// GET /_matrix/client/v3/rooms/{roomId}/aliases
pub fn room_aliases(shard: &Shard, auth: &Authed, room: &str) -> ApiResult<Value> {
    let room = parse_room(room)?;
    ensure_joined(shard, &room, &auth.user)?;
    Ok(json!({ "aliases": shard.db.room_aliases(&room, 1000)? }))
}

/// GET /_matrix/client/v3/directory/room/{roomAlias}
pub fn resolve_alias(shard: &Shard, alias: &str) -> ApiResult<Value> {
    let alias = RoomAliasId::parse(alias).map_err(|_| ApiError::invalid_param("Invalid room alias"))?;
    let room = shard.db.alias(alias.as_str())?.ok_or_else(|| ApiError::not_found("Room alias not found"))?;
    Ok(json!({ "room_id": room, "servers": [shard.server_name] }))
}

/// PUT /_matrix/client/v3/directory/room/{roomAlias}
pub fn create_alias(shard: &Shard, req: &Req, auth: &Authed, alias: &str) -> ApiResult<Value> {
    #[derive(Deserialize)]
    struct Body {
        room_id: String,
    }
    let body: Body = req.json(shard)?;
    let alias = RoomAliasId::parse(alias).map_err(|_| ApiError::invalid_param("Invalid room alias"))?;
    if alias.server_name() != shard.server_name {
        return Err(ApiError::invalid_param("Alias must be on this server"));
    }
    let room = parse_room(&body.room_id)?;
    if shard.db.room_head(&room)?.is_none() {
        return Err(ApiError::not_found("Unknown room"));
    }
    ensure_joined(shard, &room, &auth.user)?;
    if !shard.db.create_alias(alias.as_str(), &room, &auth.user)? {
        return Err(ApiError::new(StatusCode::CONFLICT, "M_UNKNOWN", "Room alias already exists"));
    }
    Ok(json!({}))
}

/// DELETE /_matrix/client/v3/directory/room/{roomAlias}
pub fn delete_alias(shard: &Shard, auth: &Authed, alias: &str) -> ApiResult<Value> {
    let alias = RoomAliasId::parse(alias).map_err(|_| ApiError::invalid_param("Invalid room alias"))?;
    let room = shard.db.alias(alias.as_str())?.ok_or_else(|| ApiError::not_found("Room alias not found"))?;
    let room = parse_room(&room)?;
    let creator = shard.db.alias_creator(&room, alias.as_str())?;
    let (level, pl) = room_power(shard, &room, &auth.user)?;
    if creator.as_deref() != Some(auth.user.as_str()) && level < pl["state_default"].as_i64().unwrap_or(50) {
        return Err(ApiError::forbidden("You may not delete this alias"));
    }
    shard.db.delete_alias(alias.as_str(), &room)?;
    Ok(json!({}))
}

/// GET /_matrix/client/v3/directory/list/room/{roomId}
pub fn visibility(shard: &Shard, room: &str) -> ApiResult<Value> {
    let room = parse_room(room)?;
    if shard.db.room_head(&room)?.is_none() {
        return Err(ApiError::not_found("Unknown room"));
    }
    Ok(json!({ "visibility": if shard.db.is_published(&room)? { "public" } else { "private" } }))
}

/// PUT /_matrix/client/v3/directory/list/room/{roomId}
pub fn set_visibility(shard: &Shard, req: &Req, auth: &Authed, room: &str) -> ApiResult<Value> {
    #[derive(Deserialize)]
    struct Body {
        visibility: String,
    }
    let room = parse_room(room)?;
    let body: Body = req.json(shard)?;
    let public = match body.visibility.as_str() {
        "public" => true,
        "private" => false,
        _ => return Err(ApiError::invalid_param("visibility must be public or private")),
    };
    if shard.db.room_head(&room)?.is_none() {
        return Err(ApiError::not_found("Unknown room"));
    }
    ensure_joined(shard, &room, &auth.user)?;
    let (level, pl) = room_power(shard, &room, &auth.user)?;
    if level < pl["state_default"].as_i64().unwrap_or(50) {
        return Err(ApiError::forbidden("You may not change the room's visibility"));
    }
    shard.db.set_published(&room, public)?;
    Ok(json!({}))
}

pub(crate) fn room_summary(shard: &Shard, room: &RoomId) -> ApiResult<Value> {
    let content = |kind: &str| -> ApiResult<Value> { Ok(shard.db.state_event(room, kind, "")?.map(|e| e.pdu.content_value()).unwrap_or(Value::Null)) };
    let joined = shard.db.members(room, "join", MEMBERS_MAX)?.len();
    let mut s = json!({
        "room_id": room,
        "num_joined_members": joined,
        "world_readable": content("m.room.history_visibility")?["history_visibility"] == "world_readable",
        "guest_can_join": content("m.room.guest_access")?["guest_access"] == "can_join",
        "join_rule": content("m.room.join_rules")?["join_rule"].as_str().unwrap_or("invite"),
    });
    for (field, kind, key) in [("name", "m.room.name", "name"), ("topic", "m.room.topic", "topic"), ("canonical_alias", "m.room.canonical_alias", "alias"), ("avatar_url", "m.room.avatar", "url")] {
        if let Some(v) = content(kind)?.get(key).and_then(Value::as_str) {
            s[field] = json!(v);
        }
    }
    if let Some(t) = content("m.room.create")?.get("type").and_then(Value::as_str) {
        s["room_type"] = json!(t);
    }
    Ok(s)
}

/// GET and POST /_matrix/client/v3/publicRooms
pub fn public_rooms(shard: &Shard, req: &Req, _auth: Option<&Authed>) -> ApiResult<Value> {
    let (limit, since, term) = if req.method == http::Method::POST {
        let body: Value = req.json(shard)?;
        (
            body.get("limit").and_then(Value::as_u64),
            body.get("since").and_then(Value::as_str).map(str::to_owned),
            body.get("filter").and_then(|f| f.get("generic_search_term")).and_then(Value::as_str).map(str::to_lowercase),
        )
    } else {
        (req.query_u64("limit")?, req.query("since").map(str::to_owned), None)
    };
    let limit = (limit.unwrap_or(100) as usize).clamp(1, 500);
    let after = since.as_deref().map(|s| s.strip_prefix('n').ok_or_else(|| ApiError::invalid_param("Invalid since token"))).transpose()?;
    // The directory partition is small (published rooms only); the scan is bounded.
    let all = shard.db.published_rooms(None, 100_000)?;
    let mut chunk = Vec::new();
    let mut next = None;
    for room in all.iter().filter(|r| after.is_none_or(|a| r.as_str() > a)) {
        let Ok(id) = RoomId::parse(room.as_str()) else { continue };
        let summary = room_summary(shard, &id)?;
        if let Some(t) = &term {
            let hay = format!("{} {} {}", summary["name"].as_str().unwrap_or(""), summary["topic"].as_str().unwrap_or(""), summary["canonical_alias"].as_str().unwrap_or("")).to_lowercase();
            if !hay.contains(t.as_str()) {
                continue;
            }
        }
        if chunk.len() == limit {
            next = Some(format!("n{}", chunk.last().and_then(|c: &Value| c["room_id"].as_str()).unwrap_or_default()));
            break;
        }
        chunk.push(summary);
    }
    let mut body = json!({ "chunk": chunk, "total_room_count_estimate": all.len() });
    if let Some(n) = next {
        body["next_batch"] = json!(n);
    }
    if since.is_some() {
        body["prev_batch"] = json!("n");
    }
    Ok(body)
}
