//! GET /_matrix/client/v3/sync (spec "Syncing").
//!
//! A sync token is the vector of every shard's stream position,
//! `s{p0}_{p1}_…`. Each shard's positions are persisted in order and
//! announced only after their write returned, so everything at or below a
//! token's positions is readable; every read here is bounded above by the
//! response's own token (`upper`), so nothing is delivered twice and nothing
//! is skipped, whichever shard serves the next request.
//!
//! Long-polls register a waiter *before* computing the response, so a wake-up
//! that races the computation is never lost.

use std::collections::HashSet;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use std::collections::BTreeMap;

use futures_lite::FutureExt;
use ruma::RoomId;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use crate::db::{RoomHead, UserRoom};
use crate::error::{ApiError, ApiResult};
use crate::filter::SyncFilter;
use crate::http::{Authed, Req, Resp};
use crate::pdu::Rendered;
use crate::room::now_ms;
use crate::shard::Shard;

/// Events of a section, as the client receives them.
#[derive(Serialize, Default)]
struct Events<T: Serialize> {
    events: Vec<T>,
}

#[derive(Serialize)]
struct Timeline {
    events: Vec<Box<RawValue>>,
    limited: bool,
    prev_batch: String,
}

#[derive(Serialize)]
struct JoinedRoom {
    timeline: Timeline,
    /// State up to the start of the timeline; `state_after` (up to its end)
    /// replaces it when the client asks with `use_state_after`.
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<Events<Box<RawValue>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    state_after: Option<Events<Box<RawValue>>>,
    /// `state_after` under its MSC4222 name, for clients that asked with it.
    #[serde(rename = "org.matrix.msc4222.state_after", skip_serializing_if = "Option::is_none")]
    state_after_unstable: Option<Events<Box<RawValue>>>,
    ephemeral: Events<Value>,
    account_data: Events<Value>,
    unread_notifications: Value,
    /// Counts by thread root, when the timeline filter asks for them
    /// (`unread_notifications` then counts the main timeline only).
    #[serde(skip_serializing_if = "Option::is_none")]
    unread_thread_notifications: Option<Value>,
    summary: Value,
}

#[derive(Serialize)]
struct LeftRoom {
    timeline: Timeline,
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<Events<Box<RawValue>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    state_after: Option<Events<Box<RawValue>>>,
    #[serde(rename = "org.matrix.msc4222.state_after", skip_serializing_if = "Option::is_none")]
    state_after_unstable: Option<Events<Box<RawValue>>>,
    account_data: Events<Value>,
}

#[derive(Serialize, Default)]
struct Rooms {
    join: BTreeMap<String, JoinedRoom>,
    invite: BTreeMap<String, Value>,
    leave: BTreeMap<String, LeftRoom>,
    knock: BTreeMap<String, Value>,
}

/// The `/sync` response body; events are pre-rendered JSON.
#[derive(Serialize)]
pub struct SyncResponse {
    next_batch: String,
    rooms: Rooms,
    account_data: Events<Value>,
    presence: Events<Value>,
    to_device: Events<Value>,
    device_lists: Value,
    device_one_time_keys_count: Value,
    device_unused_fallback_key_types: Value,
}

/// How a sync reports state, from its query parameters.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SyncOpts {
    /// `full_state=true`: every joined room's whole state.
    pub full_state: bool,
    /// `use_state_after=true` (v1.16): state up to the end of the timeline,
    /// in `state_after`, instead of up to its start in `state`.
    pub state_after: bool,
    /// Asked with the MSC4222 name (`org.matrix.msc4222.use_state_after`):
    /// answered under the matching name.
    pub unstable_names: bool,
}

impl SyncOpts {
    /// Places the state of a room in the fields these options ask for:
    /// (`state`, `state_after`, its MSC4222 twin).
    #[allow(clippy::type_complexity)]
    fn place(self, state: Vec<Box<RawValue>>) -> (Option<Events<Box<RawValue>>>, Option<Events<Box<RawValue>>>, Option<Events<Box<RawValue>>>) {
        let events = Some(Events { events: state });
        match (self.state_after, self.unstable_names) {
            (false, _) => (events, None, None),
            (true, false) => (None, events, None),
            (true, true) => (None, None, events),
        }
    }
}

/// Default timeline events per room when the filter sets no limit.
const TIMELINE_LIMIT_DEFAULT: usize = 10;
/// Most state entries sent for one room.
const ROOM_STATE_MAX: usize = 100_000;
/// Most receipts scanned per room.
const RECEIPTS_MAX: usize = 100_000;
/// Most account data entries per user.
const ACCOUNT_DATA_MAX: usize = 10_000;

/// A position vector, one entry per shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncToken {
    pub heads: Vec<u64>,
}

impl SyncToken {
    /// Parses `s{p0}_{p1}…`; a token from a node with fewer shards is padded.
    pub fn parse(s: &str, shards: usize) -> Option<SyncToken> {
        let body = s.strip_prefix('s')?;
        let mut heads: Vec<u64> = body.split('_').map(|p| p.parse().ok()).collect::<Option<_>>()?;
        if heads.len() > shards {
            return None;
        }
        heads.resize(shards, 0);
        Some(SyncToken { heads })
    }

    pub fn encode(&self) -> String {
        let parts: Vec<String> = self.heads.iter().map(u64::to_string).collect();
        format!("s{}", parts.join("_"))
    }
}

fn load_filter(shard: &Shard, req: &Req, auth: &Authed) -> ApiResult<Rc<SyncFilter>> {
    let Some(f) = req.query("filter") else { return Ok(Rc::new(SyncFilter::default())) };
    // Stored filters never change and inline ones are their own key: both
    // are parsed once per shard (inline ones up to a size).
    let inline = f.trim_start().starts_with('{');
    let cacheable = !inline || f.len() <= INLINE_FILTER_CACHED_MAX;
    let key = (auth.user.clone(), f.to_owned());
    if cacheable && let Some(cached) = shard.filters.borrow().get(&key) {
        return Ok(cached.clone());
    }
    let value: Value = if inline {
        serde_json::from_str(f).map_err(|_| ApiError::bad_json("filter is not valid JSON"))?
    } else {
        shard.db.filter(&auth.user, f)?.ok_or_else(|| ApiError::not_found("Unknown filter"))?
    };
    let filter = Rc::new(SyncFilter::from_value(&value));
    if cacheable {
        let mut cache = shard.filters.borrow_mut();
        if cache.len() >= crate::shard::FILTER_CACHE_MAX {
            cache.clear();
        }
        cache.insert(key, filter.clone());
    }
    Ok(filter)
}

/// Longest inline filter kept in the shard's filter cache, in bytes.
const INLINE_FILTER_CACHED_MAX: usize = 2_048;

/// GET /_matrix/client/v3/sync
pub async fn sync(shard: &Rc<Shard>, req: &Req, auth: &Authed) -> ApiResult<Resp> {
    let body = sync_body(shard, req, auth).await?;
    let bytes = serde_json::to_vec(&body).map_err(|e| ApiError::unknown(e.to_string()))?;
    let mut resp = http::Response::new(http_body_util::Full::new(bytes::Bytes::from(bytes)));
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    Ok(resp)
}

async fn sync_body(shard: &Rc<Shard>, req: &Req, auth: &Authed) -> ApiResult<SyncResponse> {
    shard.metrics().syncs.fetch_add(1, Ordering::Relaxed);
    let since = match req.query("since") {
        Some(s) => Some(SyncToken::parse(s, shard.count).ok_or_else(|| ApiError::invalid_param("Invalid since token"))?),
        None => None,
    };
    let timeout_ms = req.query_u64("timeout")?.unwrap_or(0);
    if let Some(presence) = crate::presence::SyncPresence::from_param(req.query("set_presence")) {
        crate::presence::syncing(shard, &auth.user, presence);
    }
    let flag = |name: &str| req.query(name) == Some("true");
    let stable = flag("use_state_after");
    let unstable = !stable && flag("org.matrix.msc4222.use_state_after");
    let opts = SyncOpts { full_state: flag("full_state"), state_after: stable || unstable, unstable_names: unstable };
    let filter = load_filter(shard, req, auth)?;
    sync_with(shard, auth, since, timeout_ms, opts, &filter).await
}

/// A sync from `since` (initial without it), long-polling up to
/// `timeout_ms` (capped by `limits.sync_timeout_ms_max`) for something new.
pub(crate) async fn sync_with(shard: &Rc<Shard>, auth: &Authed, since: Option<SyncToken>, timeout_ms: u64, opts: SyncOpts, filter: &SyncFilter) -> ApiResult<SyncResponse> {
    let full_state = opts.full_state;
    let timeout_ms = timeout_ms.min(shard.config.limits.sync_timeout_ms_max);
    let deadline = std::time::Instant::now() + Duration::from_millis(timeout_ms);
    // Set once the wait ran out: the last pass answers without waiting.
    let mut timed_out = false;
    loop {
        let rooms = shard.sync_rooms(&auth.user, since.as_ref().map(|s| s.heads.as_slice()))?;
        let wait = since.is_some() && timeout_ms > 0 && !timed_out && !shard.shutting_down.get();
        let waiter = if wait {
            if shard.notifier.waiting() >= shard.config.limits.sync_waiters_per_shard_max {
                return Err(ApiError::limit_exceeded(1000));
            }
            Some(shard.notifier.register(auth.user.clone(), rooms.joined.clone()))
        } else {
            None
        };
        let upper = {
            let heads = shard.heads.borrow();
            let mut u = heads.clone();
            if let Some(s) = &since {
                for (a, b) in u.iter_mut().zip(&s.heads) {
                    *a = (*a).max(*b);
                }
            }
            SyncToken { heads: u }
        };
        // A long-poll whose token covers every position this shard has
        // heard of has nothing in (since, upper] to read: it waits (and
        // computes when woken or when the wait runs out).
        let Some(waiter) = waiter else { return Ok(compute(shard, auth, since.as_ref(), &upper, filter, opts, &rooms.list)?.0) };
        let nothing_new = !full_state && since.as_ref().is_some_and(|s| s.heads == upper.heads);
        if !nothing_new {
            let (body, changed) = compute(shard, auth, since.as_ref(), &upper, filter, opts, &rooms.list)?;
            if changed || shard.shutting_down.get() {
                return Ok(body);
            }
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let _waiting = crate::metrics::Held::new(&shard.metrics().sync_waiting);
        let woken = !left.is_zero()
            && async {
                let _ = waiter.rx.recv_async().await;
                true
            }
            .or(async {
                glommio::timer::sleep(left).await;
                false
            })
            .await;
        timed_out = !woken;
    }
}

/// Whether the user's invite to `room` came from a user they ignore (such
/// invites are not shown).
fn invited_by_ignored(shard: &Shard, auth: &Authed, room: &RoomId) -> ApiResult<bool> {
    let ignored = shard.ignored_users(&auth.user)?;
    if ignored.is_empty() {
        return Ok(false);
    }
    Ok(shard.db.state_event(room, "m.room.member", auth.user.as_str())?.is_some_and(|e| ignored.contains(&e.pdu.sender)))
}

fn in_range(pos: u64, since: Option<&SyncToken>, upper: &SyncToken, shard: u16) -> bool {
    let s = since.and_then(|t| t.heads.get(usize::from(shard)).copied()).unwrap_or(0);
    let u = upper.heads.get(usize::from(shard)).copied().unwrap_or(0);
    pos > s && pos <= u
}

fn compute(shard: &Shard, auth: &Authed, since: Option<&SyncToken>, upper: &SyncToken, filter: &SyncFilter, opts: SyncOpts, rooms: &[(String, UserRoom)]) -> ApiResult<(SyncResponse, bool)> {
    let full_state = opts.full_state;
    let now = now_ms();
    // No user-scoped write anywhere since `since`: no account data,
    // to-device or device-list rows can be new, and no membership changed.
    let quiet = since.is_some_and(|s| !shard.user_writes_after(&s.heads));
    let all_data = if quiet { Vec::new() } else { shard.db.all_account_data(&auth.user, ACCOUNT_DATA_MAX)? };
    let mut room_data: std::collections::HashMap<String, Vec<Value>> = std::collections::HashMap::new();
    for (room, kind, entry) in &all_data {
        let Some(room) = room else { continue };
        if !filter.room_account_data.allows_type(kind) {
            continue;
        }
        // Room account data may be written by any shard: compare with that shard's component.
        let fresh = since.is_none() || in_range(entry.pos, since, upper, entry.shard);
        let newly_joined = rooms.iter().any(|(r, ur)| r == room && since.is_some_and(|t| ur.pos > t.heads.get(usize::from(ur.shard)).copied().unwrap_or(0)));
        if fresh || newly_joined {
            room_data.entry(room.clone()).or_default().push(json!({ "type": kind, "content": entry.content }));
        }
    }
    let mut out = Rooms::default();
    let mut changed = false;
    for (room_id, ur) in rooms {
        if !filter.allows_room(room_id) {
            continue;
        }
        let Ok(room) = RoomId::parse(room_id.as_str()) else { continue };
        let owner = usize::from(ur.shard);
        let s = since.map(|t| t.heads.get(owner).copied().unwrap_or(0));
        let u = upper.heads.get(owner).copied().unwrap_or(0);
        if ur.pos > u {
            // The membership change is not yet covered by this token; the
            // next sync reports it.
            continue;
        }
        let membership_changed = s.is_none_or(|s| ur.pos > s);
        match ur.membership.as_str() {
            "join" => {
                let initial = s.is_none() || membership_changed;
                let data = room_data.remove(room_id.as_str()).unwrap_or_default();
                // Nothing announced for the room past the token: nothing to read.
                if !initial && !full_state && data.is_empty() && s.is_some_and(|s| shard.room_quiet_since(&room, s)) {
                    continue;
                }
                if let Some(v) = joined_room(shard, auth, &room, if initial { None } else { s }, u, filter, full_state || initial, opts, data, now)? {
                    out.join.insert(room_id.clone(), v);
                    changed = true;
                }
            }
            "invite" if membership_changed && !invited_by_ignored(shard, auth, &room)? => {
                out.invite.insert(room_id.clone(), json!({ "invite_state": { "events": invite_state(shard, &room, ur)? } }));
                changed = true;
            }
            "knock" if membership_changed => {
                out.knock.insert(room_id.clone(), json!({ "knock_state": { "events": invite_state(shard, &room, ur)? } }));
                changed = true;
            }
            "leave" | "ban" if !ur.forgotten && ((since.is_some() && membership_changed) || (since.is_none() && filter.include_leave)) => {
                let from = s.unwrap_or(0);
                let (timeline, loaded) = timeline(shard, auth, &room, None, Some(from), ur.pos, filter, now)?;
                let state = if opts.state_after {
                    state_after_events(shard, &auth.user, &room, since.map(|_| from), ur.pos, &loaded, timeline.limited, &[], filter, now)?
                } else if since.is_none() {
                    state_events(shard, &auth.user, &room, None, &loaded, &[], filter, now)?
                } else {
                    vec![]
                };
                let (state, state_after, state_after_unstable) = opts.place(state);
                out.leave.insert(room_id.clone(), LeftRoom { timeline, state, state_after, state_after_unstable, account_data: Events::default() });
                changed = true;
            }
            _ => {}
        }
    }
    let mut account_data = Vec::new();
    for (room, kind, entry) in all_data {
        if room.is_some() || !filter.account_data.allows_type(&kind) {
            continue;
        }
        if since.is_none() || in_range(entry.pos, since, upper, entry.shard) {
            account_data.push(json!({ "type": kind, "content": entry.content }));
        }
    }
    if since.is_none() && !account_data.iter().any(|e| e["type"] == "m.push_rules") && filter.account_data.allows_type("m.push_rules") {
        let rules = crate::push::ruleset(&shard.db, &auth.user)?;
        account_data.push(json!({ "type": "m.push_rules", "content": crate::push::ruleset_content(&rules) }));
    }
    changed |= !account_data.is_empty();
    let to_device = if filter.without_to_device { Vec::new() } else { to_device(shard, auth, since, upper)? };
    changed |= !to_device.is_empty();
    let presence = if filter.presence.allows_type("m.presence") && since.is_none_or(|s| shard.presence_writes_after(&s.heads)) { presence(shard, auth, since, upper, filter)? } else { Vec::new() };
    changed |= !presence.is_empty();
    let (device_lists, otk_counts, fallback_types, keys_changed) = crate::api::keys::sync_fields(shard, auth, since.filter(|_| !quiet), upper)?;
    changed |= keys_changed;
    let body = SyncResponse {
        next_batch: upper.encode(),
        rooms: out,
        account_data: Events { events: account_data },
        presence: Events { events: presence },
        to_device: Events { events: to_device },
        device_lists,
        device_one_time_keys_count: otk_counts,
        device_unused_fallback_key_types: fallback_types,
    };
    Ok((body, changed))
}

/// Presence of the users sharing a room with the syncing user (and their
/// own) that changed in `(since, upper]`; every known presence on an
/// initial sync.
fn presence(shard: &Shard, auth: &Authed, since: Option<&SyncToken>, upper: &SyncToken, filter: &SyncFilter) -> ApiResult<Vec<Value>> {
    let limit = filter.presence.limit.unwrap_or(usize::MAX);
    let mut out = Vec::new();
    for user in crate::api::keys::presence_watchers(shard, &auth.user)? {
        if out.len() >= limit {
            break;
        }
        if !filter.presence.allows_sender(user.as_str()) {
            continue;
        }
        let Some(record) = shard.db.presence(&user)? else { continue };
        let (Some(pos), Some(writer)) = (record["pos"].as_u64(), record["shard"].as_u64().and_then(|s| u16::try_from(s).ok())) else { continue };
        if in_range(pos, since, upper, writer) {
            out.push(json!({ "type": "m.presence", "sender": user, "content": crate::api::userdata::presence_content(&record) }));
        }
    }
    Ok(out)
}

/// To-device messages for the syncing device.
///
/// Messages up to `since` were delivered and are acknowledged by this
/// request, so they are deleted; every pending message up to `upper` is
/// sent (holding some back would let the next token acknowledge them
/// unseen; inboxes are bounded). An inbox found empty is remembered until a
/// user-scoped write goes past the token it was found empty at.
fn to_device(shard: &Shard, auth: &Authed, since: Option<&SyncToken>, upper: &SyncToken) -> ApiResult<Vec<Value>> {
    let key = (auth.user.clone(), auth.device.clone());
    if let Some(empty_at) = shard.empty_inboxes.borrow().get(&key)
        && !shard.user_writes_after(empty_at)
    {
        return Ok(Vec::new());
    }
    let mut to_device = Vec::new();
    let mut acked: BTreeMap<u16, u64> = BTreeMap::new();
    let pending = shard.db.inbox(&auth.user, &auth.device, 2 * crate::api::extras::INBOX_MAX)?;
    if pending.is_empty() {
        let mut empty = shard.empty_inboxes.borrow_mut();
        if empty.len() >= crate::shard::EMPTY_INBOXES_MAX {
            empty.clear();
        }
        empty.insert(key, upper.heads.clone());
        return Ok(Vec::new());
    }
    shard.empty_inboxes.borrow_mut().remove(&key);
    for (writer, pos, _, message) in pending {
        let s = since.and_then(|t| t.heads.get(usize::from(writer)).copied()).unwrap_or(0);
        let u = upper.heads.get(usize::from(writer)).copied().unwrap_or(0);
        if since.is_some() && pos <= s {
            acked.insert(writer, s);
        } else if pos <= u {
            to_device.push(message);
        }
    }
    if !acked.is_empty() {
        // Everything of a writer up to `since` was delivered: one range each.
        shard.db.store.write(acked.into_iter().map(|(writer, upto)| crate::db::Db::inbox_ack_write(&auth.user, &auth.device, writer, upto)).collect())?;
    }
    Ok(to_device)
}

/// Timeline events of a room in `(from, upto]`, the newest `limit`, and
/// the loaded events (for state and lazy-loading decisions).
///
/// `room_events`: the room's event count from a head read after `upto` was fixed.
#[allow(clippy::too_many_arguments)]
fn timeline(shard: &Shard, auth: &Authed, room: &RoomId, head: Option<&RoomHead>, from: Option<u64>, upto: u64, filter: &SyncFilter, now: u64) -> ApiResult<(Timeline, Vec<Rc<Rendered>>)> {
    let room_events = head.map(|h| h.timeline_len);

    let limit = filter.timeline.limit.unwrap_or(TIMELINE_LIMIT_DEFAULT).min(shard.config.limits.events_per_page_max);
    // Newest first, in pages, until `limit` events pass the filter; the
    // filter applies before the limit. Scanning is bounded by SCAN_PAGES.
    const SCAN_PAGES: usize = 8;
    let ignored = shard.ignored_users(&auth.user)?;
    // Rooms whose history was ever not `shared`, or with erased senders,
    // check every event.
    let needed = match head {
        Some(h) => crate::api::visibility::Reader::needed(h),
        None => shard.db.room_head(room)?.is_some_and(|h| crate::api::visibility::Reader::needed(&h)),
    };
    let reader = if needed { Some(crate::api::visibility::Reader::new(shard, room, &auth.user)?) } else { None };
    let mut events = Vec::new();
    let mut hi = upto;
    let mut first = upto + 1;
    // Stays true unless the scan reaches the start of the range.
    let mut limited = true;
    'pages: for _ in 0..SCAN_PAGES {
        let page = shard.sync_timeline_page(room, room_events, from, hi, true, limit + 1)?;
        for (pos, id) in page.iter() {
            if events.len() == limit {
                break 'pages;
            }
            first = *pos;
            if let Some(ev) = shard.rendered(id)?
                && filter.timeline.allows(&ev.event.pdu)
                && !crate::api::rooms::hidden(&ignored, &ev.event.pdu)
                && reader.as_ref().is_none_or(|r| r.allows(&ev.event))
            {
                match &reader {
                    Some(r) if r.redacts(&ev.event) => events.push(Rc::new(Rendered::new(ev.event.erased_copy()))),
                    _ => events.push(ev),
                }
            }
        }
        if page.len() <= limit || first == 0 {
            limited = false;
            break;
        }
        hi = first - 1;
    }
    events.reverse();
    let prev_batch = format!("t{}", first.saturating_sub(1));
    let viewer = Some((&*auth.user, auth.device.as_str()));
    let rendered = events
        .iter()
        .map(|e| {
            let bundle = crate::api::threads::bundle(shard, room, head, &e.event, viewer, now, reader.as_ref())?;
            Ok(e.render_with(now, viewer, bundle.as_deref()))
        })
        .collect::<ApiResult<Vec<_>>>()?;
    Ok((Timeline { events: rendered, limited, prev_batch }, events))
}

/// State to send with a timeline: the current state entries not in the
/// timeline, optionally only those that changed after `changed_after`;
/// lazy-loading keeps only the members who sent timeline events (and the viewer).
#[allow(clippy::too_many_arguments)]
fn state_events(shard: &Shard, viewer: &ruma::UserId, room: &RoomId, changed_after: Option<u64>, timeline: &[Rc<Rendered>], heroes: &[String], filter: &SyncFilter, now: u64) -> ApiResult<Vec<Box<RawValue>>> {
    let in_timeline: HashSet<String> = timeline.iter().map(|e| e.event.pdu.id().to_string()).collect();
    // Lazy loading keeps the members who sent timeline events, the viewer
    // and the room summary's heroes.
    let mut senders: HashSet<String> = timeline.iter().map(|e| e.event.pdu.sender.to_string()).collect();
    if changed_after.is_none() {
        senders.insert(viewer.to_string());
        senders.extend(heroes.iter().cloned());
    }
    let first_pos = timeline.first().map(|e| e.event.stored.pos);
    let mut out = Vec::new();
    let entries = if filter.state.lazy_load_members {
        shard.db.room_state_of_members(room, senders.iter().map(String::as_str), ROOM_STATE_MAX)?
    } else {
        shard.db.room_state(room, ROOM_STATE_MAX)?
    };
    for ((kind, key), entry) in entries {
        if in_timeline.contains(entry.event_id.as_str()) || changed_after.is_some_and(|c| entry.pos <= c) || first_pos.is_some_and(|f| entry.pos >= f) {
            continue;
        }
        if !filter.state.allows_type(&kind) {
            continue;
        }
        if filter.state.lazy_load_members && kind == "m.room.member" && !senders.contains(&key) {
            continue;
        }
        if let Some(ev) = shard.rendered(&entry.event_id)? {
            out.push(ev.render(now, None));
        }
    }
    Ok(out)
}

/// `state_after`: the room's state at `upto` (the end of the timeline), or
/// with `since`, the state that changed in `(since, upto]`. When the
/// timeline holds everything after `since` (not `limited`), those changes
/// are its own state events and nothing is read; otherwise the current
/// state rows are read, each taken back to `upto` when it changed later.
/// Lazy loading keeps the members the timeline needs (its senders and the
/// members it changes), the viewer and the heroes.
#[allow(clippy::too_many_arguments)]
fn state_after_events(shard: &Shard, viewer: &ruma::UserId, room: &RoomId, since: Option<u64>, upto: u64, timeline: &[Rc<Rendered>], limited: bool, heroes: &[String], filter: &SyncFilter, now: u64) -> ApiResult<Vec<Box<RawValue>>> {
    let timeline_state = timeline.iter().filter(|e| e.event.pdu.state_key.is_some());
    if since.is_some() && !limited {
        // The last event of each state key wins, in timeline order.
        let mut last: std::collections::HashMap<(String, &str), usize> = std::collections::HashMap::new();
        let events: Vec<&Rc<Rendered>> = timeline_state.filter(|e| filter.state.allows_type(&e.event.pdu.kind.to_string())).collect();
        for (i, e) in events.iter().enumerate() {
            last.insert((e.event.pdu.kind.to_string(), e.event.pdu.state_key.as_deref().unwrap_or_default()), i);
        }
        let mut keep: Vec<usize> = last.into_values().collect();
        keep.sort_unstable();
        return Ok(keep.into_iter().map(|i| events[i].render(now, None)).collect());
    }
    let mut members: HashSet<String> = timeline.iter().map(|e| e.event.pdu.sender.to_string()).collect();
    members.extend(timeline_state.filter(|e| e.event.pdu.kind == ruma::events::TimelineEventType::RoomMember).filter_map(|e| e.event.pdu.state_key.clone()));
    if since.is_none() {
        members.insert(viewer.to_string());
        members.extend(heroes.iter().cloned());
    }
    let entries = if filter.state.lazy_load_members {
        shard.db.room_state_of_members(room, members.iter().map(String::as_str), ROOM_STATE_MAX)?
    } else {
        shard.db.room_state(room, ROOM_STATE_MAX)?
    };
    let mut out = Vec::new();
    for ((kind, key), entry) in entries {
        if !filter.state.allows_type(&kind) || (filter.state.lazy_load_members && kind == "m.room.member" && !members.contains(&key)) {
            continue;
        }
        let id = if entry.pos <= upto {
            entry.event_id
        } else {
            // Changed after the end of this timeline: the event of then.
            match crate::api::rooms::state_as_of(shard, &entry.event_id, upto)? {
                Some(ev) => ev.pdu.id().to_owned(),
                None => continue,
            }
        };
        let Some(ev) = shard.rendered(&id)? else { continue };
        if since.is_some_and(|s| ev.event.stored.pos <= s) {
            continue;
        }
        out.push(ev.render(now, None));
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn joined_room(shard: &Shard, auth: &Authed, room: &RoomId, since: Option<u64>, upto: u64, filter: &SyncFilter, with_state: bool, opts: SyncOpts, room_data: Vec<Value>, now: u64) -> ApiResult<Option<JoinedRoom>> {
    let use_state_after = opts.state_after;
    let owner = shard.owner_of(room);
    let read = shard.sync_room_head(room, owner, upto)?;
    let head = read.as_ref().as_ref();
    if let Some(h) = head {
        let typing = shard.typing.borrow().get(room).map_or(0, |t| t.pos);
        shard.note_room_activity(room, h.last_event_pos.max(h.last_receipt_pos).max(typing));
    }
    let (timeline, loaded) = if since.is_none_or(|s| head.as_ref().is_some_and(|h| h.last_event_pos > s)) {
        timeline(shard, auth, room, head, since, upto, filter, now)?
    } else {
        (Timeline { events: Vec::new(), limited: false, prev_batch: format!("t{}", since.unwrap_or(0)) }, Vec::new())
    };
    let limited = timeline.limited;
    // The summary comes with the room's first sync and whenever its
    // membership may have changed since the last one.
    let summary_due = with_state || since.is_none() || limited || loaded.iter().any(|e| e.event.pdu.kind == ruma::events::TimelineEventType::RoomMember);
    let (summary, heroes) = if summary_due { room_summary(shard, &auth.user, room)? } else { (json!({}), Vec::new()) };
    let initial = with_state || since.is_none();
    let state = if use_state_after {
        Vec::new()
    } else if initial {
        state_events(shard, &auth.user, room, None, &loaded, &heroes, filter, now)?
    } else if limited {
        state_events(shard, &auth.user, room, since, &loaded, &heroes, filter, now)?
    } else {
        Vec::new()
    };
    let state_after = if use_state_after { state_after_events(shard, &auth.user, room, if initial { None } else { since }, upto, &loaded, limited, &heroes, filter, now)? } else { Vec::new() };

    let mut ephemeral = Vec::new();
    if filter.ephemeral.allows_type("m.typing")
        && let Some(t) = shard.typing.borrow().get(room)
        && (since.is_none_or(|s| t.pos > s) && (since.is_some() || !t.users.is_empty()))
    {
        ephemeral.push(json!({ "type": "m.typing", "content": { "user_ids": t.users } }));
    }
    if filter.ephemeral.allows_type("m.receipt") && since.is_none_or(|s| head.as_ref().is_some_and(|h| h.last_receipt_pos > s)) {
        let mut content: Map<String, Value> = Map::new();
        for ((kind, thread, user), r) in shard.db.receipts(room, RECEIPTS_MAX)? {
            if since.is_some_and(|s| r.pos <= s) || r.pos > upto {
                continue;
            }
            if kind == "m.read.private" && user != auth.user.as_str() {
                continue;
            }
            let mut receipt = json!({ "ts": r.ts });
            if !thread.is_empty() {
                receipt["thread_id"] = json!(thread);
            }
            let by_event = content.entry(r.event_id.clone()).or_insert_with(|| json!({}));
            by_event[kind.as_str()][user.as_str()] = receipt;
        }
        if !content.is_empty() {
            ephemeral.push(json!({ "type": "m.receipt", "content": content }));
        }
    }

    if since.is_some() && timeline.events.is_empty() && state.is_empty() && state_after.is_empty() && ephemeral.is_empty() && room_data.is_empty() {
        return Ok(None);
    }
    let unread = shard.unread(&auth.user, room, owner, upto)?;
    let counts = |c: crate::db::Counts| json!({ "notification_count": c.notifications, "highlight_count": c.highlights });
    let (unread_notifications, unread_thread_notifications) = if filter.timeline.unread_thread_notifications {
        let threads: Map<String, Value> = unread.threads.iter().map(|(root, c)| (root.clone(), counts(*c))).collect();
        (counts(unread.main()), (!threads.is_empty()).then_some(Value::Object(threads)))
    } else {
        (counts(crate::db::Counts { notifications: unread.notifications, highlights: unread.highlights }), None)
    };
    let (state, state_after, state_after_unstable) = opts.place(if use_state_after { state_after } else { state });
    Ok(Some(JoinedRoom {
        timeline,
        state,
        state_after,
        state_after_unstable,
        ephemeral: Events { events: ephemeral },
        account_data: Events { events: room_data },
        unread_notifications,
        unread_thread_notifications,
        summary,
    }))
}

/// Heroes named in a room summary.
const HEROES: usize = 5;

/// A room's sync summary for `viewer` (joined and invited member counts,
/// and for a room without a name or canonical alias, `m.heroes`: up to five
/// other joined members, then invited ones, or when there are none, members
/// who left or were banned), with the heroes' ids for lazy-loaded state.
/// Heroes are taken in user id order, so the same members name the room
/// from one sync to the next.
fn room_summary(shard: &Shard, viewer: &ruma::UserId, room: &RoomId) -> ApiResult<(Value, Vec<String>)> {
    let members = shard.room_members(room, ROOM_STATE_MAX)?;
    let counts = |m: &str| members.iter().filter(|(_, ms)| ms == m).count();
    let mut summary = json!({ "m.joined_member_count": counts("join"), "m.invited_member_count": counts("invite") });
    let named = |kind: &str, key: &str| -> ApiResult<bool> { Ok(shard.db.state_event(room, kind, "")?.is_some_and(|e| e.stored.redacted_by.is_none() && e.pdu.content_value()[key].as_str().is_some_and(|v| !v.is_empty()))) };
    if named("m.room.name", "name")? || named("m.room.canonical_alias", "alias")? {
        return Ok((summary, Vec::new()));
    }
    let others = |kinds: &[&str]| -> Vec<String> {
        let mut out = Vec::new();
        for kind in kinds {
            out.extend(members.iter().filter(|(u, m)| m == kind && u != viewer.as_str()).map(|(u, _)| u.clone()).take(HEROES - out.len()));
        }
        out
    };
    let mut heroes = others(&["join", "invite"]);
    if heroes.is_empty() {
        heroes = others(&["leave", "ban"]);
    }
    summary["m.heroes"] = json!(heroes);
    Ok((summary, heroes))
}

/// Stripped state for an invite: the room's key state plus the invite itself.
fn invite_state(shard: &Shard, room: &RoomId, ur: &UserRoom) -> ApiResult<Vec<Value>> {
    let mut out = Vec::new();
    for kind in ["m.room.create", "m.room.join_rules", "m.room.name", "m.room.avatar", "m.room.canonical_alias", "m.room.encryption", "m.room.topic"] {
        if let Some(ev) = shard.db.state_event(room, kind, "")? {
            out.push(ev.to_stripped());
        }
    }
    if let Ok(id) = ruma::OwnedEventId::try_from(ur.event_id.as_str())
        && let Some(ev) = shard.db.event(&id)?
    {
        if let Some(sender) = shard.db.state_event(room, "m.room.member", ev.pdu.sender.as_str())? {
            out.push(sender.to_stripped());
        }
        let mut invite = ev.to_stripped();
        invite["event_id"] = json!(ev.pdu.id());
        invite["origin_server_ts"] = json!(ev.pdu.origin_server_ts);
        out.push(invite);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trip_and_padding() {
        let t = SyncToken { heads: vec![3, 0, 17] };
        assert_eq!(SyncToken::parse(&t.encode(), 3), Some(t.clone()));
        assert_eq!(SyncToken::parse("s5", 3), Some(SyncToken { heads: vec![5, 0, 0] }));
        assert_eq!(SyncToken::parse("s1_2_3_4", 3), None, "more shards than we have");
        assert_eq!(SyncToken::parse("x1", 3), None);
        assert_eq!(SyncToken::parse("s1_a", 3), None);
    }
}
