//! The room writer: creates, authorises and persists room events. Runs only
//! on the room's owner shard ([`crate::shard::Shard::room_op`] routes there),
//! and every operation here is synchronous, so the events of one shard are
//! created strictly one after another.
//!
//! **Invariant**: an event is written (event, timeline entry, state entry,
//! memberships, room head, stream head, unread counts) in one batch, and the
//! in-memory cache is updated only after that batch succeeded.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue};
use ruma::events::{StateEventType, TimelineEventType};
use ruma::room_version_rules::RoomVersionRules;
use ruma::signatures::Ed25519KeyPair;
use ruma::{EventId, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, RoomVersionId, UserId};
use serde_json::{Value, json};

use crate::db::{Db, ReadPart, Relation, RoomHead, StateEntry, THREAD_PARTICIPANTS_MAX, ThreadSummary, UNREAD_RECOUNT_MAX, UNREAD_ROUND_EVENTS, UnreadRound, UserRoom, encode, state_ck};
use crate::error::{ApiError, ApiResult, Error};
use crate::pdu::{Pdu, StoredEvent, to_canonical};
use crate::shard::{Draft, NewRoom, RoomOp, RoomReply, Shard, ShardMsg, Typing, UnreadCounts};
use crate::storage::{Table, Write};

/// Most rooms whose state a shard keeps in memory; beyond it the cache is
/// cleared and rooms reload from storage on their next event.
const CACHED_ROOMS_MAX: usize = 10_000;
/// Most notification indexes loaded for one room.
const NOTIFY_INDEXES_MAX: usize = 1_000_000;
/// Most state entries loaded for one room.
const ROOM_STATE_MAX: usize = 1_000_000;

/// What the owner shard keeps in memory about a room.
pub struct CachedRoom {
    pub head: RoomHead,
    pub rules: RoomVersionRules,
    pub state: HashMap<(String, String), (Arc<Pdu>, u64)>,
    /// Unread counts of members, loaded on first use; the owner shard is
    /// their only writer (events and receipts both run here).
    pub unread: HashMap<OwnedUserId, crate::db::Unread>,
    /// Members' notification indexes, loaded on first use.
    pub notify_index: HashMap<OwnedUserId, u32>,
    /// Every member by notification index, loaded when an unread round
    /// first needs it.
    pub notify_users: Option<HashMap<u32, OwnedUserId>>,
    /// Joined members for push rule evaluation, built on first use and
    /// dropped whenever a membership event is appended.
    pub members: Option<Rc<Vec<crate::push::Member>>>,
    /// Power levels as push rules see them (who may notify the whole
    /// room), built on first use and dropped whenever the power levels
    /// change.
    pub push_power: Option<Rc<ruma::push::PushConditionPowerLevelsCtx>>,
}

impl CachedRoom {
    fn new(head: RoomHead, rules: RoomVersionRules, state: HashMap<(String, String), (Arc<Pdu>, u64)>) -> CachedRoom {
        CachedRoom { head, rules, state, unread: HashMap::new(), notify_index: HashMap::new(), notify_users: None, members: None, push_power: None }
    }
}

/// The owner shard's cache of its rooms.
#[derive(Default)]
pub struct RoomCache {
    rooms: RefCell<HashMap<OwnedRoomId, Rc<RefCell<CachedRoom>>>>,
    /// Typing users and their deadlines (ms), for rooms this shard owns.
    typing: RefCell<HashMap<OwnedRoomId, Vec<(OwnedUserId, u64)>>>,
    /// Sends waiting for their room's next group commit.
    queued: RefCell<HashMap<OwnedRoomId, Vec<QueuedSend>>>,
}

/// A send waiting for its group, with where its answer goes.
type QueuedSend = (Draft, flume::Sender<ApiResult<RoomReply>>);

/// Most events written in one batch by a group commit. Each waiting send
/// holds its draft (bounded by the request body limit) until its group is
/// written.
const SEND_GROUP_MAX: usize = 64;

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub(crate) fn rules_for(version: &str) -> ApiResult<RoomVersionRules> {
    RoomVersionId::try_from(version)
        .ok()
        .and_then(|v| v.rules())
        .ok_or_else(|| ApiError::new(http::StatusCode::BAD_REQUEST, "M_UNSUPPORTED_ROOM_VERSION", format!("unsupported room version {version}")))
}

impl RoomCache {
    fn load(&self, db: &Db, room: &RoomId) -> ApiResult<Rc<RefCell<CachedRoom>>> {
        if let Some(r) = self.rooms.borrow().get(room) {
            return Ok(r.clone());
        }
        let mut head = db.room_head(room)?.ok_or_else(|| ApiError::not_found("Unknown room"))?;
        // A room last written before unread rounds: its stored unread rows
        // are exact up to its last event, which makes that its first round
        // (stored with the next batch).
        head.unread_round.get_or_insert(UnreadRound { pos: head.last_event_pos, seq: head.timeline_len });
        let rules = rules_for(&head.version)?;
        let mut state = HashMap::new();
        for (key, entry) in db.room_state(room, ROOM_STATE_MAX)? {
            let ev = db.event(&entry.event_id)?.ok_or_else(|| Error::Corrupt(format!("state event {} missing", entry.event_id)))?;
            state.insert(key, (ev.pdu, entry.pos));
        }
        let cached = Rc::new(RefCell::new(CachedRoom::new(head, rules, state)));
        let mut rooms = self.rooms.borrow_mut();
        if rooms.len() >= CACHED_ROOMS_MAX {
            rooms.clear();
        }
        rooms.insert(room.to_owned(), cached.clone());
        Ok(cached)
    }

    fn forget(&self, room: &RoomId) {
        self.rooms.borrow_mut().remove(room);
    }
}

/// Executes a room operation on the owner shard.
pub async fn execute(shard: &Rc<Shard>, room: &RoomId, op: RoomOp) -> ApiResult<RoomReply> {
    debug_assert_eq!(shard.owner_of(room), shard.id, "room ops run on the owner shard");
    match op {
        RoomOp::Create(new) => create(shard, room, new),
        RoomOp::Send(draft) => send(shard, room, draft).await,
        RoomOp::Typing { user, typing, timeout_ms } => set_typing(shard, room, user, typing, timeout_ms),
        RoomOp::Receipt { user, kind, thread, event_id, ts } => receipt(shard, room, user, kind, thread, event_id, ts),
        RoomOp::Erase { user } => erase(shard, room, user),
    }
}

/// Records that `user`'s account was erased: from now on, readers who
/// first joined after this point get that user's events redacted.
fn erase(shard: &Rc<Shard>, room: &RoomId, user: OwnedUserId) -> ApiResult<RoomReply> {
    let cached_rc = shard.rooms.load(&shard.db, room)?;
    let mut head = cached_rc.borrow().head.clone();
    if head.erased.iter().any(|(u, _)| *u == user) {
        return Ok(RoomReply::Done);
    }
    if head.erased.len() >= crate::db::ERASED_PER_ROOM_MAX {
        tracing::warn!(room = %room, user = %user, "room has too many erased senders; this one is not recorded");
        return Ok(RoomReply::Done);
    }
    head.erased.push((user, head.last_event_pos));
    shard.db.store.write(vec![Write::put(Table::Rooms, room.as_bytes(), b"".to_vec(), encode(&head))])?;
    cached_rc.borrow_mut().head = head;
    Ok(RoomReply::Done)
}

/// A batch of events being appended, committed at the end.
struct Batch {
    writes: Vec<Write>,
    pos: u64,
    users: Vec<OwnedUserId>,
    /// Events this batch redacts: their cached renderings go after the write.
    redacted: Vec<OwnedEventId>,
    /// Members' new unread counts, announced with the batch (and written
    /// only when the batch ends an unread round).
    unread: BTreeMap<OwnedUserId, crate::db::Unread>,
    /// Events staged in this batch.
    events: Vec<OwnedEventId>,
    /// Threads this batch changes: root -> (summary stored before the
    /// batch, summary after it; None when no reply is left). Written once
    /// per root when the batch is committed ([`Batch::stage_threads`]).
    threads: HashMap<OwnedEventId, (Option<ThreadSummary>, Option<ThreadSummary>)>,
}

impl Batch {
    fn new(pos: u64) -> Batch {
        Batch { writes: Vec::new(), pos, users: Vec::new(), redacted: Vec::new(), unread: BTreeMap::new(), events: Vec::new(), threads: HashMap::new() }
    }

    /// Stages the rows of every thread this batch changed.
    fn stage_threads(&mut self, room: &RoomId) {
        for (root, (stored, new)) in self.threads.drain() {
            match new {
                Some(new) => self.writes.extend(Db::thread_writes(room, &root, stored.as_ref(), &new)),
                None => self.writes.extend(Db::thread_delete(room, &root, stored.as_ref())),
            }
        }
    }

    /// The summary of the thread at `root` as of this batch: staged here,
    /// else stored. `None` when `root` is not an event of this room.
    fn thread(&mut self, shard: &Shard, room: &RoomId, root: &EventId) -> ApiResult<Option<Option<ThreadSummary>>> {
        if let Some((_, current)) = self.threads.get(root) {
            return Ok(Some(current.clone()));
        }
        let in_room = self.events.iter().any(|e| e == root) || shard.db.event(root)?.is_some_and(|ev| ev.pdu.room_id == room);
        if !in_room {
            return Ok(None);
        }
        let stored = shard.db.thread_summary(room, root)?;
        self.threads.insert(root.to_owned(), (stored.clone(), stored.clone()));
        Ok(Some(stored))
    }
}

/// Most replies read to recount a thread after one is redacted.
const THREAD_RECOUNT_MAX: usize = 100_000;

/// A thread's summary from its replies in stream order; None when there
/// are none.
fn recount_thread(replies: impl Iterator<Item = (u64, Relation)>) -> Option<ThreadSummary> {
    let mut summary: Option<ThreadSummary> = None;
    for (pos, reply) in replies {
        let s = summary.get_or_insert_with(ThreadSummary::default);
        s.count += 1;
        s.latest = reply.event_id.to_string();
        s.latest_pos = pos;
        if s.participants.len() < THREAD_PARTICIPANTS_MAX && !s.participants.contains(&reply.sender) {
            s.participants.push(reply.sender);
        }
    }
    summary
}

fn create(shard: &Rc<Shard>, room: &RoomId, new: NewRoom) -> ApiResult<RoomReply> {
    let rules = rules_for(&new.version)?;
    if shard.db.room_head(room)?.is_some() {
        return Err(ApiError::new(http::StatusCode::BAD_REQUEST, "M_ROOM_IN_USE", "Room id already exists"));
    }
    let head = RoomHead { version: new.version.clone(), creator: new.creator.to_string(), extremities: vec![], depth: 0, shard: shard.id as u16, last_event_pos: 0, last_receipt_pos: 0, last_typing_pos: 0, timeline_len: 0, unread_round: Some(UnreadRound::default()), notify_members: 0, threads: 0, edits: 0, references: 0, restricted_history: false, erased: vec![] };
    let mut cached = CachedRoom::new(head, rules, HashMap::new());
    let mut batch = Batch::new(shard.pos());
    let create = Draft { sender: new.creator.clone(), kind: "m.room.create".into(), state_key: Some(String::new()), content: new.create_content, txn: None, redacts: None };
    // The create event of a room version 12 room names it: built at the
    // time the handler derived the room id with, it hashes the same.
    let create_id = append(shard, room, &mut cached, create, &mut batch, new.ts)?;
    if cached.rules.authorization.room_create_event_id_as_room_id && crate::pdu::room_id_of_create(&create_id).as_deref() != Some(room) {
        return Err(Error::EventBuild(format!("create event {create_id} does not hash to room id {room}")).into());
    }
    for draft in new.events {
        append(shard, room, &mut cached, draft, &mut batch, now_ms())?;
    }
    commit(shard, room, cached, batch)?;
    Ok(RoomReply::Done)
}

/// Queues a send for its room's next group commit and waits for its answer.
///
/// The first send of a group schedules the commit behind every task that
/// is ready now, so sends that arrive together are written in one batch:
/// one storage write, one stream position announcement, and one unread
/// count row per notified member.
async fn send(shard: &Rc<Shard>, room: &RoomId, draft: Draft) -> ApiResult<RoomReply> {
    let (tx, rx) = flume::bounded(1);
    enqueue_send(shard, room, draft, tx);
    rx.recv_async().await.map_err(|_| ApiError::from(Error::ShardUnavailable(shard.id)))?
}

/// Queues a send for its room's next group commit; `reply` gets its answer
/// (a channel with room for it: it is sent without waiting).
pub fn enqueue_send(shard: &Rc<Shard>, room: &RoomId, draft: Draft, reply: flume::Sender<ApiResult<RoomReply>>) {
    debug_assert_eq!(shard.owner_of(room), shard.id, "sends are queued on the owner shard");
    let first = {
        let mut queued = shard.rooms.queued.borrow_mut();
        let queue = queued.entry(room.to_owned()).or_default();
        queue.push((draft, reply));
        queue.len() == 1
    };
    if first {
        let shard = shard.clone();
        let room = room.to_owned();
        glommio::spawn_local(async move {
            futures_lite::future::yield_now().await;
            flush_sends(&shard, &room);
        })
        .detach();
    }
}

/// Writes every queued send of a room, in groups of at most [`SEND_GROUP_MAX`].
fn flush_sends(shard: &Rc<Shard>, room: &RoomId) {
    let queued = shard.rooms.queued.borrow_mut().remove(room).unwrap_or_default();
    let mut queued = queued.into_iter().peekable();
    while queued.peek().is_some() {
        let group: Vec<QueuedSend> = queued.by_ref().take(SEND_GROUP_MAX).collect();
        send_group(shard, room, group);
    }
}

/// Appends a group of sends and commits them together; every send is
/// answered only after the batch holding its event was written.
fn send_group(shard: &Rc<Shard>, room: &RoomId, group: Vec<QueuedSend>) {
    let cached_rc = match shard.rooms.load(&shard.db, room) {
        Ok(c) => c,
        Err(e) => {
            for (_, tx) in group {
                let _ = tx.try_send(Err(e.clone()));
            }
            return;
        }
    };
    let mut batch = Batch::new(shard.pos());
    // Answers waiting for the batch: the event id, or an earlier send of
    // the same transaction in this batch.
    let mut waiting: Vec<(OwnedEventId, flume::Sender<ApiResult<RoomReply>>)> = Vec::new();
    let mut txns: HashMap<(OwnedUserId, String, String), OwnedEventId> = HashMap::new();
    let mut group = group.into_iter();
    while let Some((draft, tx)) = group.next() {
        if let Some((device, txn_id)) = &draft.txn {
            if let Some(id) = txns.get(&(draft.sender.clone(), device.clone(), txn_id.clone())) {
                waiting.push((id.clone(), tx));
                continue;
            }
            match shard.db.txn(&draft.sender, device, txn_id) {
                Ok(None) => {}
                Ok(Some(existing)) => {
                    let reply = OwnedEventId::try_from(existing).map(|id| RoomReply::Event(id, shard.pos())).map_err(|e| Error::Corrupt(e.to_string()).into());
                    let _ = tx.try_send(reply);
                    continue;
                }
                Err(e) => {
                    let _ = tx.try_send(Err(e.into()));
                    continue;
                }
            }
        }
        // A redaction reads its target from storage: one staged in this
        // batch is written first; so are thread replies, which a redaction
        // may recount from storage.
        if draft.redacts.as_ref().is_some_and(|target| batch.events.contains(target) || !batch.threads.is_empty()) {
            let full = std::mem::replace(&mut batch, Batch::new(0));
            if let Err(e) = commit_group(shard, room, &cached_rc, full, std::mem::take(&mut waiting)) {
                // The cache held the unwritten events: nothing more is appended to it.
                for (_, tx) in std::iter::once((draft, tx)).chain(group) {
                    let _ = tx.try_send(Err(e.clone()));
                }
                return;
            }
            batch = Batch::new(shard.pos());
            txns.clear();
        }
        let txn_key = draft.txn.as_ref().map(|(device, txn_id)| (draft.sender.clone(), device.clone(), txn_id.clone()));
        // `append` fails only before it touches the cache.
        let appended = append(shard, room, &mut cached_rc.borrow_mut(), draft, &mut batch, now_ms());
        match appended {
            Ok(id) => {
                if let Some(key) = txn_key {
                    txns.insert(key, id.clone());
                }
                waiting.push((id, tx));
            }
            Err(e) => {
                let _ = tx.try_send(Err(e));
            }
        }
    }
    let _ = commit_group(shard, room, &cached_rc, batch, waiting);
}

/// Commits a group's batch and answers its sends. A failed commit drops
/// the cached room so it reloads from storage, and is returned.
fn commit_group(shard: &Rc<Shard>, room: &RoomId, cached_rc: &Rc<RefCell<CachedRoom>>, mut batch: Batch, waiting: Vec<(OwnedEventId, flume::Sender<ApiResult<RoomReply>>)>) -> ApiResult<()> {
    if batch.events.is_empty() {
        for (id, tx) in waiting {
            let _ = tx.try_send(Ok(RoomReply::Event(id, batch.pos)));
        }
        return Ok(());
    }
    let head = {
        let mut cached = cached_rc.borrow_mut();
        cached.head.last_event_pos = batch.pos;
        batch.stage_threads(room);
        stage_unread_round(shard, room, &mut cached, &mut batch).map(|()| cached.head.clone())
    };
    // The sends are answered between the write and the announcement, so
    // their answers are queued ahead of the long-polls the announcement
    // wakes.
    let mut waiting = Some(waiting);
    let pos = batch.pos;
    let answer = || {
        for (id, tx) in waiting.take().unwrap_or_default() {
            let _ = tx.try_send(Ok(RoomReply::Event(id, pos)));
        }
    };
    match head.and_then(|head| commit_batch(shard, room, &head, batch, answer)) {
        Ok(()) => Ok(()),
        Err(e) => {
            shard.rooms.forget(room);
            for (_, tx) in waiting.take().unwrap_or_default() {
                let _ = tx.try_send(Err(e.clone()));
            }
            Err(e)
        }
    }
}

fn commit(shard: &Rc<Shard>, room: &RoomId, mut cached: CachedRoom, mut batch: Batch) -> ApiResult<()> {
    cached.head.last_event_pos = batch.pos;
    batch.stage_threads(room);
    stage_unread_round(shard, room, &mut cached, &mut batch)?;
    let head = cached.head.clone();
    commit_batch(shard, room, &head, batch, || {})?;
    shard.rooms.rooms.borrow_mut().insert(room.to_owned(), Rc::new(RefCell::new(cached)));
    Ok(())
}

/// Ends an unread round (see [`UnreadRound`]) when the room has appended
/// [`UNREAD_ROUND_EVENTS`] events past the last one: stages the unread row
/// of every member a notification row names since then, this batch's
/// included, as of the batch's last position, and moves the round there.
fn stage_unread_round(shard: &Shard, room: &RoomId, cached: &mut CachedRoom, batch: &mut Batch) -> ApiResult<()> {
    let round = cached.head.unread_round.unwrap_or_default();
    if cached.head.timeline_len < round.seq.saturating_add(UNREAD_ROUND_EVENTS) {
        return Ok(());
    }
    let (indexes, mut users) = shard.db.notified_after(room, round.pos, UNREAD_RECOUNT_MAX)?;
    if !indexes.is_empty() {
        let by_index = match &mut cached.notify_users {
            Some(m) => m,
            None => cached.notify_users.insert(shard.db.notify_indexes(room, NOTIFY_INDEXES_MAX)?.into_iter().collect()),
        };
        for i in indexes {
            users.insert(by_index.get(&i).cloned().ok_or_else(|| Error::Corrupt(format!("room {room}: no member has notification index {i}")))?);
        }
    }
    users.extend(batch.unread.keys().cloned());
    for user in users {
        // Members this batch did not notify have nothing unwritten: their
        // counts in storage are current.
        let counts = match batch.unread.get(&user).or_else(|| cached.unread.get(&user)) {
            Some(c) => c.clone(),
            None => shard.db.unread(&user, room)?,
        };
        batch.writes.push(Db::unread_write(&user, room, &counts, batch.pos));
    }
    cached.head.unread_round = Some(UnreadRound { pos: batch.pos, seq: cached.head.timeline_len });
    Ok(())
}

/// Writes a staged batch with the room head and stream head, calls
/// `written` (once the write returned and redacted events' renderings are
/// dropped), then announces the batch. Nothing awaits in between.
fn commit_batch(shard: &Rc<Shard>, room: &RoomId, head: &RoomHead, mut batch: Batch, written: impl FnOnce()) -> ApiResult<()> {
    batch.writes.push(Write::put(Table::Rooms, room.as_bytes(), b"".to_vec(), encode(head)));
    batch.writes.push(Db::stream_head_write(shard.id as u16, batch.pos));
    shard.db.store.write(batch.writes)?;
    shard.metrics().event_batches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    for id in &batch.redacted {
        shard.invalidate_rendered(id);
    }
    written();
    let unread = (!batch.unread.is_empty()).then(|| Arc::new(UnreadCounts { room: room.to_owned(), counts: batch.unread.into_iter().collect() }));
    shard.publish_with(batch.pos, vec![room.to_owned()], batch.users, unread);
    Ok(())
}

fn power_level(state: &HashMap<(String, String), (Arc<Pdu>, u64)>, rules: &RoomVersionRules, user: &UserId, creator: &str) -> (i64, Value) {
    if let Some((create, _)) = state.get(&("m.room.create".to_owned(), String::new()))
        && creators(create, rules).iter().any(|c| c == user)
    {
        return (i64::MAX, Value::Null);
    }
    match state.get(&("m.room.power_levels".to_owned(), String::new())) {
        Some((pl, _)) => {
            let content = pl.content_value();
            let level = content["users"][user.as_str()].as_i64().or_else(|| content["users_default"].as_i64()).unwrap_or(0);
            (level, content)
        }
        None => (if user.as_str() == creator { 100 } else { 0 }, Value::Null),
    }
}

/// The fields of a new PDU, before hashing and signing.
pub struct PduFields<'a> {
    pub room: &'a RoomId,
    pub sender: &'a UserId,
    pub kind: &'a str,
    pub state_key: Option<&'a str>,
    pub content: CanonicalJsonObject,
    pub prev_events: &'a [OwnedEventId],
    pub auth_events: &'a [OwnedEventId],
    pub depth: u64,
    pub ts: u64,
    pub redacts: Option<&'a EventId>,
}

/// Builds a signed PDU: canonical JSON, content hash, the server's ed25519
/// signature, and the reference-hash event id of room versions 4 and later.
/// Pure: no clock, no I/O; returns the event id and the canonical JSON.
pub fn build_pdu(f: &PduFields<'_>, server_name: &str, key: &Ed25519KeyPair, rules: &RoomVersionRules) -> ApiResult<(OwnedEventId, String)> {
    let mut obj = CanonicalJsonObject::new();
    let ids = |v: &[OwnedEventId]| CanonicalJsonValue::Array(v.iter().map(|e| CanonicalJsonValue::String(e.to_string())).collect());
    obj.insert("auth_events".into(), ids(f.auth_events));
    obj.insert("content".into(), CanonicalJsonValue::Object(f.content.clone()));
    obj.insert("depth".into(), CanonicalJsonValue::Integer(f.depth.try_into().map_err(|_| Error::EventBuild("depth overflow".into()))?));
    obj.insert("origin_server_ts".into(), CanonicalJsonValue::Integer(f.ts.try_into().map_err(|_| Error::EventBuild("clock overflow".into()))?));
    obj.insert("prev_events".into(), ids(f.prev_events));
    // A room version 12 create event has no room id: it is the room id.
    if !(f.kind == "m.room.create" && rules.authorization.room_create_event_id_as_room_id) {
        obj.insert("room_id".into(), CanonicalJsonValue::String(f.room.to_string()));
    }
    obj.insert("sender".into(), CanonicalJsonValue::String(f.sender.to_string()));
    obj.insert("type".into(), CanonicalJsonValue::String(f.kind.to_owned()));
    if let Some(sk) = f.state_key {
        obj.insert("state_key".into(), CanonicalJsonValue::String(sk.to_owned()));
    }
    if let Some(r) = f.redacts {
        obj.insert("redacts".into(), CanonicalJsonValue::String(r.to_string()));
    }
    let sign_error = |e: ruma::signatures::JsonError| match e {
        ruma::signatures::JsonError::PduTooLarge => ApiError::too_large("Event is larger than 65536 bytes"),
        other => ApiError::from(Error::EventBuild(other.to_string())),
    };
    ruma::signatures::hash_and_sign_event(server_name, key, &mut obj, &rules.redaction).map_err(sign_error)?;
    let hash = ruma::signatures::reference_hash(&obj, rules).map_err(sign_error)?;
    let event_id = OwnedEventId::try_from(format!("${hash}")).map_err(|e| Error::EventBuild(e.to_string()))?;
    Ok((event_id, CanonicalJsonValue::Object(obj).to_string()))
}

/// The id of a new room: random with the server name, or in room version
/// 12 and later the reference hash of its create event, built here as the
/// owner shard will build it (same sender, content and time; no previous
/// or auth events).
pub fn new_room_id(shard: &Shard, creator: &UserId, version: &str, create_content: &Value, ts: u64) -> ApiResult<OwnedRoomId> {
    let rules = rules_for(version)?;
    let random = || OwnedRoomId::try_from(format!("!{}:{}", crate::api::account::random_string(18), shard.server_name)).map_err(|e| ApiError::from(Error::EventBuild(e.to_string())));
    if !rules.authorization.room_create_event_id_as_room_id {
        return random();
    }
    let placeholder = random()?;
    let content = to_canonical(create_content.clone()).map_err(ApiError::bad_json)?;
    let fields = PduFields { room: &placeholder, sender: creator, kind: "m.room.create", state_key: Some(""), content, prev_events: &[], auth_events: &[], depth: 1, ts, redacts: None };
    let (event_id, _) = build_pdu(&fields, shard.server_name.as_str(), &shard.key, &rules)?;
    crate::pdu::room_id_of_create(&event_id).ok_or_else(|| Error::EventBuild(format!("no room id from {event_id}")).into())
}

/// Most tries at creating a room whose id turns out to be taken. In room
/// version 12 the id is the hash of the create event, so two identical
/// requests of one user within a millisecond would name the same room.
/// Each shard gives its create events distinct times, so only requests on
/// different shards can collide; each retry moves the create event on by
/// a few milliseconds.
const CREATE_TRIES: u64 = 8;

/// Creates a room on its owner shard and returns its id. `claim` runs
/// before each try with the id it will have (an alias to reserve) and
/// `release` after a failed one.
pub async fn create_room(shard: &Rc<Shard>, mut new: NewRoom, claim: &dyn Fn(&RoomId) -> ApiResult<()>, release: &dyn Fn(&RoomId) -> ApiResult<()>) -> ApiResult<OwnedRoomId> {
    let mut tries = 1;
    loop {
        new.ts = new.ts.max(shard.last_create_ts.get() + 1);
        shard.last_create_ts.set(new.ts);
        let room = new_room_id(shard, &new.creator, &new.version, &new.create_content, new.ts)?;
        claim(&room)?;
        match shard.room_op(&room, RoomOp::Create(new.clone())).await {
            Ok(_) => return Ok(room),
            Err(e) => {
                release(&room)?;
                if e.errcode != "M_ROOM_IN_USE" || tries >= CREATE_TRIES {
                    return Err(e);
                }
                tries += 1;
                new.ts += 1 + rand::random_range(0..shard.count as u64);
            }
        }
    }
}

/// The room creators whom a room version with privileged creators (12 and
/// later) gives infinite power: the create event's sender and its
/// `additional_creators`. Empty in earlier versions.
pub fn creators(create: &Pdu, rules: &RoomVersionRules) -> Vec<OwnedUserId> {
    if !rules.authorization.explicitly_privilege_room_creators {
        return Vec::new();
    }
    let mut out = vec![create.sender.clone()];
    if let Some(extra) = create.content_value()["additional_creators"].as_array() {
        out.extend(extra.iter().filter_map(|u| u.as_str().and_then(|u| OwnedUserId::try_from(u).ok())));
    }
    out
}

/// Builds, authorises and stages one event sent at `ts`; returns its id.
fn append(shard: &Shard, room: &RoomId, cached: &mut CachedRoom, draft: Draft, batch: &mut Batch, ts: u64) -> ApiResult<OwnedEventId> {
    let kind = TimelineEventType::from(draft.kind.as_str());
    let content_raw = serde_json::value::to_raw_value(&draft.content).map_err(|e| ApiError::bad_json(e.to_string()))?;
    let auth_types = ruma::state_res::auth_types_for_event(&kind, &draft.sender, draft.state_key.as_deref(), &content_raw, &cached.rules.authorization)
        .map_err(ApiError::bad_json)?;
    let mut auth_events: Vec<OwnedEventId> = Vec::new();
    let mut auth_map: BTreeMap<OwnedEventId, Arc<Pdu>> = BTreeMap::new();
    for (ty, sk) in auth_types {
        if let Some((pdu, _)) = cached.state.get(&(ty.to_string(), sk)) {
            let id = pdu.id().to_owned();
            if auth_map.insert(id.clone(), pdu.clone()).is_none() {
                auth_events.push(id);
            }
        }
    }
    // Room versions up to 11 take the create event from auth_events too;
    // later ones find it by the room id, so the checks look it up apart.
    if kind != TimelineEventType::RoomCreate
        && let Some((create, _)) = cached.state.get(&("m.room.create".to_owned(), String::new()))
    {
        let id = create.id().to_owned();
        if auth_map.insert(id.clone(), create.clone()).is_none() && !cached.rules.authorization.room_create_event_id_as_room_id {
            auth_events.push(id);
        }
    }

    // Redactions: v11 auth rules leave the check to us (sender may redact
    // their own events, others need the `redact` power level).
    if kind == TimelineEventType::RoomRedaction {
        let target = draft.redacts.as_ref().ok_or_else(|| ApiError::bad_json("redaction without target"))?;
        if let Some(ev) = shard.db.event(target)?
            && ev.pdu.room_id == room
            && ev.pdu.sender != draft.sender
        {
            let (level, pl) = power_level(&cached.state, &cached.rules, &draft.sender, &cached.head.creator);
            let needed = pl["redact"].as_i64().unwrap_or(50);
            if level < needed {
                return Err(ApiError::forbidden("You don't have permission to redact this event"));
            }
        }
    }

    let depth = cached.head.depth + 1;
    let content = to_canonical(draft.content.clone()).map_err(ApiError::bad_json)?;
    let (event_id, json) = build_pdu(
        &PduFields {
            room,
            sender: &draft.sender,
            kind: &draft.kind,
            state_key: draft.state_key.as_deref(),
            content,
            prev_events: &cached.head.extremities,
            auth_events: &auth_events,
            depth,
            ts,
            redacts: draft.redacts.as_deref(),
        },
        shard.server_name.as_str(),
        &shard.key,
        &cached.rules,
    )?;
    let pdu = Arc::new(Pdu::parse(&json, event_id.clone()).map_err(|e| Error::EventBuild(e.to_string()))?);

    let fetch_event = |id: &EventId| auth_map.get(id).cloned();
    ruma::state_res::check_state_independent_auth_rules(&cached.rules.authorization, &*pdu, fetch_event).map_err(Error::AuthRules)?;
    let fetch_state = |ty: &StateEventType, sk: &str| cached.state.get(&(ty.to_string(), sk.to_owned())).map(|(p, _)| p.clone());
    ruma::state_res::check_state_dependent_auth_rules(&cached.rules.authorization, &*pdu, fetch_state).map_err(Error::AuthRules)?;

    // Everything fallible happens before the cache is touched.
    let relation = Relation::of(&draft.content);
    // The thread the event is in, for the unread counts of the members it
    // notifies: a reply's root, or the thread of the event an edit or
    // reaction relates to.
    let mut thread_of = || -> ApiResult<Option<String>> {
        Ok(match &relation {
            Some((root, "m.thread")) => Some(root.to_string()),
            Some((parent, _)) => shard.db.event(parent)?.and_then(|p| match Relation::of(&p.pdu.content_value()) {
                Some((root, "m.thread")) => Some(root.to_string()),
                _ => None,
            }),
            None => None,
        })
    };
    let (unread, event_thread) = crate::push::evaluate(shard, room, cached, &pdu, &mut thread_of)?;
    for (user, _, _) in &unread {
        if !cached.notify_index.contains_key(user)
            && let Some(index) = shard.db.notify_index(room, user)?
        {
            cached.notify_index.insert(user.clone(), index);
        }
    }
    let redacted_target = match &draft.redacts {
        Some(target) => shard.db.event(target)?.filter(|ev| ev.pdu.room_id == room),
        None => None,
    };
    // A reply in a thread: the root's summary as of this batch.
    let thread = match &relation {
        Some((root, "m.thread")) => batch.thread(shard, room, root)?.map(|summary| (root.clone(), summary)),
        _ => None,
    };
    // A redacted reply leaves its thread: the summary recounted from the
    // thread's other replies.
    let unthread = match &redacted_target {
        Some(target) => match Relation::of(&target.pdu.content_value()) {
            Some((root, "m.thread")) if batch.thread(shard, room, &root)?.is_some() => {
                let replies = shard.db.relations(room, &root, Bound::Unbounded, Bound::Unbounded, false, THREAD_RECOUNT_MAX)?;
                Some((root, recount_thread(replies.into_iter().filter(|(pos, r)| *pos != target.stored.pos && r.rel_type == "m.thread"))))
            }
            _ => None,
        },
        None => None,
    };

    // Staged: allocate the position and write everything.
    batch.pos += 1;
    let pos = batch.pos;
    let json = serde_json::value::RawValue::from_string(json).map_err(|e| Error::EventBuild(e.to_string()))?;
    let mut stored = StoredEvent { json, pos, txn: draft.txn.clone(), redacted_by: None, redacted_because: None, prev_content: None, prev_sender: None, replaces_state: None };
    if let Some(sk) = &draft.state_key
        && let Some((prev, _)) = cached.state.get(&(draft.kind.clone(), sk.clone()))
    {
        stored.prev_content = Some(prev.content.clone());
        stored.prev_sender = Some(prev.sender.to_string());
        stored.replaces_state = Some(prev.id().to_string());
    }
    batch.writes.push(Write::put(Table::Events, event_id.as_bytes(), b"".to_vec(), encode(&stored)));
    if draft.kind == "m.room.history_visibility" && draft.content["history_visibility"].as_str() != Some("shared") {
        cached.head.restricted_history = true;
    }
    if let Some((parent, rel_type)) = relation {
        if rel_type == "m.replace" {
            cached.head.edits += 1;
        }
        if rel_type == "m.reference" {
            cached.head.references += 1;
        }
        let child = Relation { event_id: event_id.clone(), rel_type: rel_type.to_owned(), kind: draft.kind.clone(), sender: draft.sender.to_string() };
        batch.writes.push(Db::relation_write(room, &parent, pos, &child));
    }
    if let Some((root, current)) = thread {
        if current.is_none() {
            cached.head.threads += 1;
        }
        let mut new = current.unwrap_or_default();
        new.count += 1;
        new.latest = event_id.to_string();
        new.latest_pos = pos;
        if new.participants.len() < THREAD_PARTICIPANTS_MAX && !new.participants.iter().any(|p| p == draft.sender.as_str()) {
            new.participants.push(draft.sender.to_string());
        }
        if let Some(entry) = batch.threads.get_mut(&root) {
            entry.1 = Some(new);
        }
    }
    if let Some((root, recounted)) = unthread
        && let Some(entry) = batch.threads.get_mut(&root)
    {
        if entry.1.is_some() && recounted.is_none() {
            cached.head.threads = cached.head.threads.saturating_sub(1);
        }
        entry.1 = recounted;
    }
    let seq = cached.head.timeline_len;
    batch.writes.extend(Db::timeline_writes(room, seq, pos, &event_id));
    if let Some((device, txn_id)) = &draft.txn {
        batch.writes.push(Db::txn_write(&draft.sender, device, txn_id, &event_id));
    }
    if let Some(ev) = redacted_target {
        let mut redacted = (*ev.stored).clone();
        redacted.redacted_by = Some(event_id.to_string());
        redacted.redacted_because = crate::pdu::redaction_summary(&pdu);
        batch.writes.push(Write::put(Table::Events, ev.pdu.id().as_bytes(), b"".to_vec(), encode(&redacted)));
        // Redaction strips `m.relates_to`: the event is no longer a child.
        if let Some((parent, _)) = Relation::of(&ev.pdu.content_value()) {
            batch.writes.push(Db::relation_delete(room, &parent, ev.stored.pos));
        }
        batch.redacted.push(ev.pdu.id().to_owned());
    }
    if let Some(sk) = &draft.state_key {
        let membership = pdu.membership();
        let entry = StateEntry { event_id: event_id.clone(), pos, membership: membership.clone() };
        batch.writes.push(Write::put(Table::RoomState, room.as_bytes(), state_ck(&draft.kind, sk), encode(&entry)));
        if let Some(membership) = membership
            && let Ok(target) = UserId::parse(sk.as_str())
        {
            let ur = UserRoom { membership, event_id: event_id.to_string(), pos, shard: shard.id as u16, forgotten: false };
            batch.writes.push(Write::put(Table::UserRooms, target.as_bytes(), room.as_bytes(), encode(&ur)));
            batch.users.push(target);
        }
        if draft.kind == "m.room.member" {
            cached.members = None;
        }
        if draft.kind == "m.room.power_levels" {
            cached.push_power = None;
        }
        cached.state.insert((draft.kind.clone(), sk.clone()), (pdu.clone(), pos));
    }
    if !unread.is_empty() {
        let mut notified = Vec::with_capacity(unread.len());
        for (user, _, highlight) in &unread {
            let index = match cached.notify_index.get(user) {
                Some(i) => *i,
                None => {
                    let i = cached.head.notify_members;
                    cached.head.notify_members = i.saturating_add(1);
                    batch.writes.push(Db::notify_index_write(room, user, i));
                    cached.notify_index.insert(user.clone(), i);
                    if let Some(users) = &mut cached.notify_users {
                        users.insert(i, user.clone());
                    }
                    i
                }
            };
            notified.push((index, *highlight));
        }
        let notes = crate::db::EventNotifications::new(event_id.to_string(), ts, &notified, event_thread);
        batch.writes.push(Db::notifications_write(room, seq, pos, &notes));
    }
    for (user, counts, _) in unread {
        batch.unread.insert(user.clone(), counts.clone());
        cached.unread.insert(user, counts);
    }
    cached.head.extremities = vec![event_id.clone()];
    cached.head.depth = depth;
    cached.head.timeline_len = seq + 1;
    batch.events.push(event_id.clone());
    shard.metrics().events_created.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(event_id)
}

fn set_typing(shard: &Rc<Shard>, room: &RoomId, user: OwnedUserId, typing: bool, timeout_ms: u64) -> ApiResult<RoomReply> {
    // Typing expiry: the owner shard keeps deadlines; a timer task clears them.
    let deadline = now_ms().saturating_add(timeout_ms);
    let users = {
        let mut all = shard.rooms.typing.borrow_mut();
        let map = all.entry(room.to_owned()).or_default();
        let now = now_ms();
        map.retain(|(u, d)| *u != user && *d > now);
        if typing {
            map.push((user.clone(), deadline));
        }
        map.iter().map(|(u, _)| u.clone()).collect::<Vec<_>>()
    };
    publish_typing(shard, room, users)?;
    if typing {
        let shard = shard.clone();
        let room = room.to_owned();
        glommio::spawn_local(async move {
            glommio::timer::sleep(std::time::Duration::from_millis(timeout_ms.saturating_add(10))).await;
            let now = now_ms();
            let remaining = {
                let mut all = shard.rooms.typing.borrow_mut();
                let map = all.entry(room.clone()).or_default();
                let before = map.len();
                map.retain(|(_, d)| *d > now);
                (before != map.len()).then(|| map.iter().map(|(u, _)| u.clone()).collect::<Vec<_>>())
            };
            if let Some(users) = remaining {
                let _ = publish_typing(&shard, &room, users);
            }
        })
        .detach();
    }
    Ok(RoomReply::Done)
}

fn publish_typing(shard: &Rc<Shard>, room: &RoomId, users: Vec<OwnedUserId>) -> ApiResult<()> {
    let pos = shard.next_pos();
    shard.db.store.write(vec![Db::stream_head_write(shard.id as u16, pos)])?;
    shard.typing.borrow_mut().insert(room.to_owned(), Typing { users: users.clone(), pos, shard: shard.id as u16 });
    shard.note_room_activity(room, pos);
    shard.note_head(shard.id, pos);
    shard.notifier.notify(&[room.to_owned()], &[]);
    shard.announced[shard.id].fetch_max(pos, std::sync::atomic::Ordering::Release);
    shard.broadcast(|| ShardMsg::Typing { room: room.to_owned(), users: users.clone(), pos, shard: shard.id as u16 });
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn receipt(shard: &Rc<Shard>, room: &RoomId, user: OwnedUserId, kind: String, thread: String, event_id: OwnedEventId, ts: u64) -> ApiResult<RoomReply> {
    let ev = shard.db.event(&event_id)?.ok_or_else(|| ApiError::not_found("Unknown event"))?;
    if ev.pdu.room_id != room {
        return Err(ApiError::not_found("Event is not in this room"));
    }
    // A receipt never moves back: one for an earlier event than the
    // user's current receipt of this kind and thread is ignored.
    if let Some(current) = shard.db.receipt(room, &kind, &thread, &user)?
        && let Ok(current_id) = OwnedEventId::try_from(current.event_id)
        && let Some(current_ev) = shard.db.event(&current_id)?
        && current_ev.stored.pos >= ev.stored.pos
    {
        return Ok(RoomReply::Done);
    }
    let read = kind == "m.read" || kind == "m.read.private";
    let cached_rc = shard.rooms.load(&shard.db, room)?;
    let (unread, floor) = if read { read_receipt_counts(shard, room, &cached_rc.borrow(), &user, ReadPart::of(&thread), ev.stored.pos)? } else { (None, None) };
    let cached_rc = shard.rooms.load(&shard.db, room)?;
    let pos = shard.next_pos();
    let receipt = crate::db::Receipt { event_id: event_id.to_string(), ts, pos };
    let mut head = cached_rc.borrow().head.clone();
    head.last_receipt_pos = pos;
    let mut writes = vec![
        Write::put(Table::Receipts, room.as_bytes(), Db::receipt_ck(&kind, &thread, &user), encode(&receipt)),
        Write::put(Table::Rooms, room.as_bytes(), b"".to_vec(), encode(&head)),
        Db::stream_head_write(shard.id as u16, pos),
    ];
    if let Some(counts) = &unread {
        writes.push(Db::unread_write(&user, room, counts, pos));
    }
    if let Some(floor) = floor {
        writes.push(Db::read_floor_write(room, &user, ReadPart::of(&thread), floor));
    }
    shard.db.store.write(writes)?;
    let mut cached = cached_rc.borrow_mut();
    cached.head = head;
    if let Some(counts) = &unread {
        cached.unread.insert(user.clone(), counts.clone());
    }
    drop(cached);
    let unread = unread.map(|counts| Arc::new(UnreadCounts { room: room.to_owned(), counts: vec![(user.clone(), counts)] }));
    shard.publish_with(pos, vec![room.to_owned()], vec![user], unread);
    Ok(RoomReply::Done)
}

/// A member's unread counts after their read receipt for `part` of the
/// room at event position `at`, and the part's new read floor when it
/// moves.
///
/// An unthreaded receipt reads everything up to `at`: what stays unread is
/// each later notification not covered by its own part's floor. A receipt
/// for the main timeline or one thread recounts only that part, from its
/// floor on (the higher of its own and the unthreaded one): the others'
/// counts stay as they were. Receipts of one part never move its floor
/// back, so counts never rise on reading.
fn read_receipt_counts(shard: &Shard, room: &RoomId, cached: &CachedRoom, user: &UserId, part: ReadPart<'_>, at: u64) -> ApiResult<(Option<crate::db::Unread>, Option<u64>)> {
    let own = shard.db.read_floor(room, user, part)?;
    let moved = (at > own).then_some(at);
    let all = match part {
        ReadPart::All => own.max(at),
        _ => shard.db.read_floor(room, user, ReadPart::All)?,
    };
    let floor = all.max(own).max(at);
    let rows = shard.db.notified_rows_after(room, user, floor, UNREAD_RECOUNT_MAX)?;
    if part == ReadPart::All {
        // Later events of parts read further on by their own receipts.
        let mut floors: HashMap<ReadPart<'_>, u64> = HashMap::new();
        let mut counts = crate::db::Unread::default();
        for n in &rows {
            let of = ReadPart::of_event(n.thread.as_deref());
            let part_floor = match floors.get(&of) {
                Some(f) => *f,
                None => *floors.entry(of).or_insert(shard.db.read_floor(room, user, of)?),
            };
            if n.pos > part_floor {
                counts.add(n.thread.as_deref(), n.highlight);
            }
        }
        return Ok((Some(counts), moved));
    }
    let mut counts = match cached.unread.get(user) {
        Some(c) => c.clone(),
        None => shard.db.unread(user, room)?,
    };
    let mut recount = crate::db::Counts::default();
    for n in rows.iter().filter(|n| ReadPart::of_event(n.thread.as_deref()) == part) {
        recount.notifications += 1;
        recount.highlights += u64::from(n.highlight);
    }
    counts.set(part, recount);
    Ok((Some(counts), moved))
}

/// Content of the first `m.room.member` join for a user, from their profile.
pub fn member_content(db: &Db, user: &UserId, membership: &str, reason: Option<&str>) -> ApiResult<Value> {
    let mut content = json!({ "membership": membership });
    if matches!(membership, "join" | "invite" | "knock")
        && let Some(account) = db.account(user)?
    {
        if let Some(d) = account.displayname {
            content["displayname"] = json!(d);
        }
        if let Some(a) = account.avatar_url {
            content["avatar_url"] = json!(a);
        }
    }
    if let Some(r) = reason {
        content["reason"] = json!(r);
    }
    Ok(content)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn fields<'a>(room: &'a RoomId, sender: &'a UserId, prev: &'a [OwnedEventId], content: &str) -> PduFields<'a> {
        let content = to_canonical(serde_json::json!({ "msgtype": "m.text", "body": content })).expect("canonical");
        PduFields { room, sender, kind: "m.room.message", state_key: None, content, prev_events: prev, auth_events: prev, depth: 7, ts: 1_700_000_000_000, redacts: None }
    }

    #[test]
    fn built_events_verify_and_ids_are_reference_hashes() {
        let key = Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), "a_test".into()).expect("key");
        let room = RoomId::parse("!r:example.org").expect("room");
        let sender = UserId::parse("@alice:example.org").expect("user");
        let prev = vec![OwnedEventId::try_from("$abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQ").expect("id")];
        for version in [RoomVersionId::V10, RoomVersionId::V11] {
            let rules = version.rules().expect("rules");
            let (id, json) = build_pdu(&fields(&room, &sender, &prev, "hello"), "example.org", &key, &rules).expect("build");
            let obj: CanonicalJsonObject = serde_json::from_str(&json).expect("json");
            // Canonical form: re-serialising gives the same bytes.
            assert_eq!(CanonicalJsonValue::Object(obj.clone()).to_string(), json);
            let mut keys = BTreeMap::new();
            let mut server = BTreeMap::new();
            server.insert("ed25519:a_test".to_owned(), ruma::serde::Base64::new(key.public_key().to_vec()));
            keys.insert("example.org".to_owned(), server);
            let verified = ruma::signatures::verify_event(&keys, &obj, &rules).expect("verifies");
            assert_eq!(verified, ruma::signatures::Verified::All, "content hash matches");
            assert_eq!(id.as_str(), format!("${}", ruma::signatures::reference_hash(&obj, &rules).expect("hash")));
            // Changing the content changes the id; the same input gives the same id.
            let (same, _) = build_pdu(&fields(&room, &sender, &prev, "hello"), "example.org", &key, &rules).expect("build");
            let (other, _) = build_pdu(&fields(&room, &sender, &prev, "hello!"), "example.org", &key, &rules).expect("build");
            assert_eq!(id, same);
            assert_ne!(id, other);
        }
    }

    /// A room version 12 create event has no room id: it names the room,
    /// and reads back with the room id derived from its event id.
    #[test]
    fn version_12_create_events_name_their_room() {
        use ruma::state_res::Event as _;
        let key = Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), "a_test".into()).expect("key");
        let placeholder = RoomId::parse("!unused:example.org").expect("room");
        let sender = UserId::parse("@alice:example.org").expect("user");
        let content = to_canonical(serde_json::json!({ "room_version": "12" })).expect("canonical");
        let fields = PduFields { room: &placeholder, sender: &sender, kind: "m.room.create", state_key: Some(""), content, prev_events: &[], auth_events: &[], depth: 1, ts: 1, redacts: None };
        let (id, json) = build_pdu(&fields, "example.org", &key, &RoomVersionId::V12.rules().expect("rules")).expect("build");
        assert!(!json.contains("room_id"), "{json}");
        let pdu = Pdu::parse(&json, id.clone()).expect("parse");
        assert_eq!(pdu.room_id.as_str(), format!("!{}", &id.as_str()[1..]));
        assert_eq!(ruma::state_res::Event::room_id(&pdu), None, "the auth rules see no room_id field");
        // Earlier versions keep the room id in the event.
        let content = to_canonical(serde_json::json!({ "room_version": "11" })).expect("canonical");
        let fields = PduFields { content, ..fields };
        let (id, json) = build_pdu(&fields, "example.org", &key, &RoomVersionId::V11.rules().expect("rules")).expect("build");
        let pdu = Pdu::parse(&json, id).expect("parse");
        assert_eq!(pdu.room_id(), Some(&*placeholder));
        // Only a create event may lack its room id.
        let bad = json.replace("m.room.create", "m.room.message").replace(&format!("\"room_id\":\"{placeholder}\","), "");
        assert!(Pdu::parse(&bad, OwnedEventId::try_from("$x").expect("id")).is_err(), "{bad}");
    }

    #[test]
    fn tampered_events_fail_verification() {
        let key = Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), "a_test".into()).expect("key");
        let room = RoomId::parse("!r:example.org").expect("room");
        let sender = UserId::parse("@alice:example.org").expect("user");
        let rules = RoomVersionId::V11.rules().expect("rules");
        let (_, json) = build_pdu(&fields(&room, &sender, &[], "hello"), "example.org", &key, &rules).expect("build");
        let mut obj: CanonicalJsonObject = serde_json::from_str(&json).expect("json");
        obj.insert("depth".into(), CanonicalJsonValue::Integer(8u32.into()));
        let mut keys = BTreeMap::new();
        let mut server = BTreeMap::new();
        server.insert("ed25519:a_test".to_owned(), ruma::serde::Base64::new(key.public_key().to_vec()));
        keys.insert("example.org".to_owned(), server);
        assert!(ruma::signatures::verify_event(&keys, &obj, &rules).is_err(), "a changed signed field breaks the signature");
    }

    #[test]
    fn oversized_events_are_refused() {
        let key = Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), "a_test".into()).expect("key");
        let room = RoomId::parse("!r:example.org").expect("room");
        let sender = UserId::parse("@alice:example.org").expect("user");
        let rules = RoomVersionId::V11.rules().expect("rules");
        let big = "x".repeat(70_000);
        let err = build_pdu(&fields(&room, &sender, &[], &big), "example.org", &key, &rules).expect_err("too large");
        assert_eq!(err.errcode, "M_TOO_LARGE");
    }
}
