//! A shard: one glommio executor thread, its owned state, and its messages
//! to the other shards.
//!
//! **Invariant**: events of a room are created only on the room's owner
//! shard (`Shard::owner_of`); other shards forward [`RoomOp`]s over the
//! channel mesh and await the reply. Each shard numbers everything it
//! writes with its own stream position, persisted in the same batch as the
//! write; it announces a position to the other shards only after the write
//! returned, so a position seen in a sync token is always readable.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use glommio::channels::channel_mesh::Senders;
use ruma::push::Ruleset;
use ruma::signatures::Ed25519KeyPair;
use ruma::{EventId, OwnedEventId, OwnedRoomId, OwnedServerName, OwnedUserId, RoomId, UserId};
use serde_json::Value;
use tessera_shared::ring::Ring;

use crate::config::Config;
use crate::db::Db;
use crate::error::{ApiError, ApiResult, Error};
use crate::pdu::Rendered;
use crate::ratelimit::RateLimiter;
use crate::room::RoomCache;

/// An event to append to a room, prepared by a handler on any shard.
#[derive(Clone, Debug)]
pub struct Draft {
    pub sender: OwnedUserId,
    pub kind: String,
    pub state_key: Option<String>,
    pub content: Value,
    /// (device id, transaction id) for idempotent sends.
    pub txn: Option<(String, String)>,
    pub redacts: Option<OwnedEventId>,
}

/// Everything a new room starts with (`createRoom`), resolved by the handler.
#[derive(Clone, Debug)]
pub struct NewRoom {
    pub creator: OwnedUserId,
    pub version: String,
    /// Events after `m.room.create`, in order: creator join, power levels,
    /// alias, presets, initial state, name, topic, invites.
    pub events: Vec<Draft>,
    pub create_content: Value,
    /// When the create event is sent (room version 12 derives the room id
    /// from it, before the owner shard builds it).
    pub ts: u64,
}

/// Work that must run on a room's owner shard.
#[derive(Debug)]
pub enum RoomOp {
    Create(NewRoom),
    Send(Draft),
    Typing { user: OwnedUserId, typing: bool, timeout_ms: u64 },
    Receipt { user: OwnedUserId, kind: String, thread: String, event_id: OwnedEventId, ts: u64 },
    /// The user's account was erased (see `RoomHead::erased`).
    Erase { user: OwnedUserId },
}

/// The owner shard's answer to a [`RoomOp`].
#[derive(Debug)]
pub enum RoomReply {
    /// The event, and a position of the owner shard's stream at or after
    /// the batch that wrote it.
    Event(OwnedEventId, u64),
    Done,
}

/// Messages between shards.
pub enum ShardMsg {
    Room { room: OwnedRoomId, op: RoomOp, reply: flume::Sender<ApiResult<RoomReply>> },
    /// A shard's stream advanced to `pos`, touching these rooms and users,
    /// with the unread counts it wrote.
    Advanced { shard: u16, pos: u64, rooms: Vec<OwnedRoomId>, users: Vec<OwnedUserId>, unread: Option<Arc<UnreadCounts>> },
    /// Typing state of a room changed (owner shard to all).
    Typing { room: OwnedRoomId, users: Vec<OwnedUserId>, pos: u64, shard: u16 },
    /// A user is syncing (to the shard that owns the user's presence).
    Presence { user: OwnedUserId, state: crate::presence::SyncPresence },
    /// A user did something (to the shard that owns the user's presence).
    Active { user: OwnedUserId },
}

/// Members' new unread counts in a room, announced with the write that
/// holds them (every write of unread counts is announced with them).
pub struct UnreadCounts {
    pub room: OwnedRoomId,
    pub counts: Vec<(OwnedUserId, crate::db::Unread)>,
}

pub use crate::metrics::ShardMetrics;

/// Per-room typing state known to a shard.
#[derive(Clone, Debug, Default)]
pub struct Typing {
    pub users: Vec<OwnedUserId>,
    pub pos: u64,
    pub shard: u16,
}

/// Wakes long-polling syncs of this shard.
#[derive(Default)]
pub struct Notifier {
    next_id: Cell<u64>,
    waiters: RefCell<HashMap<u64, flume::Sender<()>>>,
    by_room: RefCell<HashMap<OwnedRoomId, Vec<u64>>>,
    by_user: RefCell<HashMap<OwnedUserId, Vec<u64>>>,
}

/// A registered sync waiter; unregisters itself on drop.
pub struct Waiter {
    id: u64,
    pub rx: flume::Receiver<()>,
    rooms: Rc<Vec<OwnedRoomId>>,
    user: OwnedUserId,
    notifier: Rc<Notifier>,
}

impl Notifier {
    pub fn waiting(&self) -> usize {
        self.waiters.borrow().len()
    }

    pub fn register(self: &Rc<Self>, user: OwnedUserId, rooms: Rc<Vec<OwnedRoomId>>) -> Waiter {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let (tx, rx) = flume::bounded(1);
        self.waiters.borrow_mut().insert(id, tx);
        let mut by_room = self.by_room.borrow_mut();
        for r in rooms.iter() {
            match by_room.get_mut(r) {
                Some(ids) => ids.push(id),
                None => {
                    by_room.insert(r.clone(), vec![id]);
                }
            }
        }
        drop(by_room);
        let mut by_user = self.by_user.borrow_mut();
        match by_user.get_mut(&user) {
            Some(ids) => ids.push(id),
            None => {
                by_user.insert(user.clone(), vec![id]);
            }
        }
        drop(by_user);
        Waiter { id, rx, rooms, user, notifier: self.clone() }
    }

    pub fn notify(&self, rooms: &[OwnedRoomId], users: &[OwnedUserId]) {
        let waiters = self.waiters.borrow();
        let wake = |ids: Option<&Vec<u64>>| {
            for id in ids.into_iter().flatten() {
                if let Some(tx) = waiters.get(id) {
                    let _ = tx.try_send(());
                }
            }
        };
        let by_room = self.by_room.borrow();
        for r in rooms {
            wake(by_room.get(r));
        }
        let by_user = self.by_user.borrow();
        for u in users {
            wake(by_user.get(u));
        }
    }

    pub fn wake_all(&self) {
        for tx in self.waiters.borrow().values() {
            let _ = tx.try_send(());
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let n = &self.notifier;
        n.waiters.borrow_mut().remove(&self.id);
        let mut by_room = n.by_room.borrow_mut();
        for r in self.rooms.iter() {
            if let Some(ids) = by_room.get_mut(r) {
                ids.retain(|i| *i != self.id);
                if ids.is_empty() {
                    by_room.remove(r);
                }
            }
        }
        let mut by_user = n.by_user.borrow_mut();
        if let Some(ids) = by_user.get_mut(&self.user) {
            ids.retain(|i| *i != self.id);
            if ids.is_empty() {
                by_user.remove(&self.user);
            }
        }
    }
}

/// One shard's context, shared by its tasks (never across threads).
pub struct Shard {
    pub id: usize,
    pub count: usize,
    pub config: Arc<Config>,
    pub db: Db,
    pub key: Arc<Ed25519KeyPair>,
    pub server_name: OwnedServerName,
    pub ring: Ring,
    pub metrics: Arc<Vec<ShardMetrics>>,
    /// Latencies of the storage operations (all shards).
    pub store_stats: Arc<crate::metrics::StoreStats>,
    pub mesh: Option<Rc<Senders<ShardMsg>>>,
    /// Highest announced stream position of every shard.
    pub heads: RefCell<Vec<u64>>,
    pub notifier: Rc<Notifier>,
    pub rooms: RoomCache,
    pub typing: RefCell<HashMap<OwnedRoomId, Typing>>,
    pub limiter: RateLimiter,
    pub shutting_down: Cell<bool>,
    /// Events rendered for clients, shared by every sync this shard serves.
    pub rendered: RefCell<crate::pdu::RenderCache>,
    /// Redactions written on any shard of the node, counted; a shard that
    /// sees the count move drops its whole rendering cache.
    pub redactions: Arc<AtomicU64>,
    /// The count of `redactions` this shard's cache reflects.
    pub redactions_seen: Cell<u64>,
    /// Changes of users' push rules or ignored-user lists written on any
    /// shard of the node, counted; a shard that sees the count move drops
    /// its caches of both.
    pub push_rule_changes: Arc<AtomicU64>,
    pub push_rule_changes_seen: Cell<u64>,
    /// Users' own push rule sets (`None`: the user has none), for the
    /// evaluation of every new event in the rooms this shard owns.
    pub push_rules: RefCell<HashMap<OwnedUserId, Option<Rc<Ruleset>>>>,
    /// The default push rules of a neutral local user, which members
    /// without rules of their own share (see `push::evaluate`); built at
    /// the first use.
    pub neutral_rules: std::cell::OnceCell<Option<(OwnedUserId, Rc<Ruleset>)>>,
    /// The count of `push_rule_changes` the `ignored` and `ignorers`
    /// caches reflect.
    pub ignored_seen: Cell<u64>,
    /// For senders of events in rooms this shard owns: who ignores them.
    pub ignorers: RefCell<HashMap<OwnedUserId, Rc<HashSet<OwnedUserId>>>>,
    /// Users syncing here: when this shard last told their presence owner
    /// (see `presence`).
    pub presence_sent: RefCell<HashMap<OwnedUserId, (std::time::Instant, crate::presence::SyncPresence)>>,
    /// The time of the last room create event built here (room version 12
    /// ids hash it: each new one gets a later millisecond).
    pub last_create_ts: Cell<u64>,
    /// Users acting here: when this shard last told their presence owner.
    pub presence_active_sent: RefCell<HashMap<OwnedUserId, std::time::Instant>>,
    /// Users whose presence this shard owns: when a sync or an act of
    /// theirs was last heard of, anywhere on the node.
    pub presence_seen: RefCell<HashMap<OwnedUserId, crate::presence::Tracked>>,
    /// Users' ignored-user lists (`m.ignored_user_list`), read for every
    /// sync, page of history and search of theirs.
    pub ignored: RefCell<HashMap<OwnedUserId, Rc<HashSet<OwnedUserId>>>>,
    /// Per shard of the node, the highest position it announced with users
    /// attached (account data, to-device messages, device-list changes,
    /// receipts, memberships); starts at the stream heads of the node's
    /// start. Raised after the write and before the position is announced,
    /// so a token covering a position also covers its hint: a sync whose
    /// `since` is at or above every hint has no user-scoped rows to read.
    pub user_writes: Arc<Vec<AtomicU64>>,
    /// Per shard of the node, the highest position of a presence change it
    /// wrote (from the stream heads of the node's start), raised like
    /// `user_writes`: a sync whose `since` is at or above every entry has no
    /// presence to read.
    pub presence_writes: Arc<Vec<AtomicU64>>,
    /// Parsed filters by user and filter id or inline filter text (stored
    /// filters never change).
    pub filters: RefCell<HashMap<(OwnedUserId, String), Rc<crate::filter::SyncFilter>>>,
    /// Requests waiting until this shard has heard another shard's stream
    /// reach a position: (shard, position, wake-up).
    pub head_waiters: RefCell<Vec<(usize, u64, flume::Sender<()>)>>,
    /// Each shard's stream position as of its last announcement (shared
    /// memory, raised just before the announcement leaves).
    pub announced: Arc<Vec<AtomicU64>>,
    /// Devices whose to-device inbox this shard found empty, with the
    /// sync's upper token then; while no user-scoped write went past that
    /// token, the inbox is still empty.
    pub empty_inboxes: RefCell<HashMap<(OwnedUserId, String), Vec<u64>>>,
    /// Devices' one-time key counts and unused fallback key types for
    /// `/sync`, with the node's key-count change count they were read at
    /// (`Db::key_count_changes`).
    pub key_counts: RefCell<HashMap<(OwnedUserId, String), KeyCounts>>,
    /// For rooms this shard has heard of, the highest position announced
    /// for them (events, receipts, typing; all written by the room's
    /// owner). Raised before the position's head is, so a room whose entry
    /// is at or below a sync's `since` has nothing new up to its token.
    pub room_activity: RefCell<HashMap<OwnedRoomId, u64>>,
    /// Member lists (user, membership) of rooms, each with the room's
    /// `room_activity` entry it was read at: anything announced for the
    /// room since (member events included) moves that entry, and the list
    /// is read again. Bounded by `MEMBER_LISTS_MAX` members in all.
    pub member_lists: RefCell<MemberLists>,
    /// Per peer shard, announcements waiting for room in its full queue.
    pub overflow: Vec<Rc<Overflow>>,
    /// Access tokens this shard authenticated, while no token or account
    /// was written anywhere on the node (`Db::auth_changes`).
    pub auth_cache: RefCell<AuthCache>,
    /// Users' room lists for `/sync` (see [`Shard::sync_rooms`]).
    pub user_rooms: RefCell<UserRoomsCache>,
    /// Members' unread counts by room, as announced or read (see
    /// [`Shard::unread`]).
    pub unread: RefCell<UnreadCache>,
    /// Room heads and the last timeline page read for syncs, shared by the
    /// long-polls that one new event wakes (see [`Shard::sync_room_head`]
    /// and [`Shard::sync_timeline_page`]).
    pub room_reads: RefCell<RoomReads>,
}

/// See `Shard::unread`.
#[derive(Default)]
pub struct UnreadCache {
    rooms: HashMap<OwnedRoomId, HashMap<OwnedUserId, crate::db::Unread>>,
    /// Counts held, all rooms together.
    len: usize,
}

/// Most unread counts a shard keeps (under 100 bytes each); cleared when full.
const UNREAD_CACHE_MAX: usize = 50_000;

impl UnreadCache {
    fn put(&mut self, room: &RoomId, user: &UserId, counts: crate::db::Unread) {
        if self.len >= UNREAD_CACHE_MAX {
            *self = UnreadCache::default();
        }
        let users = match self.rooms.get_mut(room) {
            Some(users) => users,
            None => self.rooms.entry(room.to_owned()).or_default(),
        };
        match users.get_mut(user) {
            Some(c) => *c = counts,
            None => {
                users.insert(user.to_owned(), counts);
                self.len += 1;
            }
        }
    }
}

/// See `Shard::room_reads`.
#[derive(Default)]
pub struct RoomReads {
    /// Per room, its `room_activity` entry when the head was read, and the head.
    heads: HashMap<OwnedRoomId, (u64, Rc<Option<crate::db::RoomHead>>)>,
    /// Per room, the last page read and what was asked for.
    pages: HashMap<OwnedRoomId, (PageKey, TimelinePage)>,
}

/// A timeline read: (after, up to and including, newest first, limit).
type PageKey = (Option<u64>, u64, bool, usize);

/// Positions and event ids of a timeline page.
pub type TimelinePage = Rc<Vec<(u64, OwnedEventId)>>;

/// Most rooms whose head and last page a shard keeps for syncs (a few
/// hundred bytes each); cleared when full.
const ROOM_READS_MAX: usize = 10_000;

/// What an access token authenticated, with the token's expiry.
#[derive(Clone)]
pub struct CachedToken {
    pub user: OwnedUserId,
    pub device: String,
    pub is_guest: bool,
    pub expires_ms: Option<u64>,
}

/// See `Shard::auth_cache`.
#[derive(Default)]
pub struct AuthCache {
    /// The node's `auth_changes` count the entries were read at or after.
    seen: u64,
    tokens: HashMap<String, CachedToken>,
}

/// Most access tokens a shard caches (about 200 bytes each); cleared when full.
const AUTH_CACHE_MAX: usize = 20_000;

/// A user's rooms with their membership, and the joined ones parsed.
pub struct UserRooms {
    pub list: Vec<(String, crate::db::UserRoom)>,
    pub joined: Rc<Vec<OwnedRoomId>>,
}

/// See `Shard::user_rooms`.
#[derive(Default)]
pub struct UserRoomsCache {
    /// The node's `forgets` count the lists were read at or after.
    forgets_seen: u64,
    lists: HashMap<OwnedUserId, Rc<UserRooms>>,
    /// Rooms in all lists together.
    rooms: usize,
}

/// Most rooms the cached room lists of a shard hold together (about 150
/// bytes each); cleared when a new list would pass it.
const USER_ROOMS_MAX: usize = 20_000;

/// A device's cached one-time key counts and fallback key types, with the
/// key-count change count they were read at.
pub type KeyCounts = (u64, Value, Value);

/// A room's members with their membership: (user id, membership).
pub type MemberList = Rc<Vec<(String, String)>>;

/// See `Shard::member_lists`.
#[derive(Default)]
pub struct MemberLists {
    lists: HashMap<OwnedRoomId, (u64, MemberList)>,
    members: usize,
}

/// Most members all cached member lists of a shard hold together (a few
/// MiB); the cache is cleared when a new list would pass it.
const MEMBER_LISTS_MAX: usize = 50_000;

/// Announcements to one peer that wait for its queue, in order.
#[derive(Default)]
pub struct Overflow {
    queue: RefCell<std::collections::VecDeque<ShardMsg>>,
    /// A task is delivering `queue`; new announcements go behind it.
    draining: Cell<bool>,
}

/// Most parsed filters a shard caches (a few KiB each at most); cleared when full.
pub const FILTER_CACHE_MAX: usize = 10_000;

/// Most empty to-device inboxes a shard remembers (about 100 bytes each);
/// cleared when full.
pub const EMPTY_INBOXES_MAX: usize = 100_000;

/// Most devices whose key counts a shard caches (about 200 bytes each);
/// cleared when full.
pub const KEY_COUNTS_CACHE_MAX: usize = 100_000;

/// Most rooms whose last announced position a shard remembers (about 100
/// bytes each); cleared when full.
const ROOM_ACTIVITY_MAX: usize = 100_000;

/// Longest a forwarded room operation's answer waits for the owner's
/// announcement to be heard (it comes right behind or ahead of the answer;
/// this bounds a lost one).
const HEARD_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Most users whose own push rule sets a shard caches (a few KiB each when
/// set, a few bytes when not); the cache is cleared when full.
const PUSH_RULES_CACHE_MAX: usize = 100_000;
/// Most ignorers of one user read when counting their events.
const IGNORERS_MAX: usize = 100_000;

/// Whether any shard's hint is above that shard's position in `token`.
fn hint_after(hints: &[AtomicU64], token: &[u64]) -> bool {
    hints.iter().zip(token.iter().chain(std::iter::repeat(&0))).any(|(hint, t)| hint.load(Ordering::Acquire) > *t)
}

impl Shard {
    /// This shard's own stream head.
    pub fn pos(&self) -> u64 {
        self.heads.borrow()[self.id]
    }

    /// The next position of this shard's stream. The caller must persist it
    /// (with `Db::stream_head_write`) in the same batch as its write.
    pub fn next_pos(&self) -> u64 {
        self.pos() + 1
    }

    /// The owner shard of a room.
    pub fn owner_of(&self, room: &RoomId) -> usize {
        usize::from(self.ring.owner(room.as_bytes()).core)
    }

    /// The shard that tracks `user`'s presence from syncing.
    pub fn owner_of_user(&self, user: &UserId) -> usize {
        usize::from(self.ring.owner(user.as_bytes()).core)
    }

    pub fn metrics(&self) -> &ShardMetrics {
        &self.metrics[self.id]
    }

    /// Raises the known head of `shard`'s stream to `pos` (never lowers it).
    pub fn note_head(&self, shard: usize, pos: u64) {
        if let Some(h) = self.heads.borrow_mut().get_mut(shard)
            && *h < pos
        {
            *h = pos;
        }
        let mut waiters = self.head_waiters.borrow_mut();
        if !waiters.is_empty() {
            // Also drops the waiters whose request is gone.
            waiters.retain(|(s, p, tx)| {
                let heard = *s == shard && *p <= pos;
                if heard {
                    let _ = tx.try_send(());
                }
                !heard && !tx.is_disconnected()
            });
        }
    }

    /// Waits until this shard has heard `shard`'s stream reach `pos` (its
    /// announcement applied here), at most [`HEARD_WAIT`].
    pub async fn wait_heard(&self, shard: usize, pos: u64) {
        if self.heads.borrow().get(shard).is_none_or(|h| *h >= pos) {
            return;
        }
        let (tx, rx) = flume::bounded(1);
        self.head_waiters.borrow_mut().push((shard, pos, tx));
        let heard = futures_lite::FutureExt::or(
            async {
                let _ = rx.recv_async().await;
                true
            },
            async {
                glommio::timer::sleep(HEARD_WAIT).await;
                false
            },
        )
        .await;
        if !heard {
            tracing::warn!(shard = self.id, owner = shard, pos, "an announcement was not heard in time; answering without it");
        }
    }

    /// Records that this shard's stream reached `pos` (after the write
    /// returned) and tells every shard, waking affected syncs.
    pub fn publish(&self, pos: u64, rooms: Vec<OwnedRoomId>, users: Vec<OwnedUserId>) {
        self.publish_with(pos, rooms, users, None);
    }

    /// [`Shard::publish`] for a write that also set members' unread counts.
    pub fn publish_with(&self, pos: u64, rooms: Vec<OwnedRoomId>, users: Vec<OwnedUserId>, unread: Option<Arc<UnreadCounts>>) {
        self.announced[self.id].fetch_max(pos, Ordering::Release);
        if !users.is_empty() {
            self.user_writes[self.id].fetch_max(pos, Ordering::Release);
        }
        self.drop_user_rooms(&users);
        if let Some(u) = &unread {
            self.note_unread(u);
        }
        for room in &rooms {
            self.note_room_activity(room, pos);
        }
        self.note_head(self.id, pos);
        self.notifier.notify(&rooms, &users);
        self.broadcast(|| ShardMsg::Advanced { shard: self.id as u16, pos, rooms: rooms.clone(), users: users.clone(), unread: unread.clone() });
    }

    /// Takes announced unread counts into the cache.
    fn note_unread(&self, u: &UnreadCounts) {
        let mut cache = self.unread.borrow_mut();
        for (user, counts) in &u.counts {
            cache.put(&u.room, user, counts.clone());
        }
    }

    /// A member's unread counts in a room for a sync reading up to `upto`
    /// of the owner's stream: from the cache, which every announced write of
    /// them updates before the head it carries moves, so up to this shard's
    /// heads it is as current as storage; past them, or when not cached,
    /// from storage (and then cached).
    pub fn unread(&self, user: &UserId, room: &RoomId, owner: usize, upto: u64) -> ApiResult<crate::db::Unread> {
        let heard = self.heads.borrow().get(owner).is_some_and(|h| upto <= *h);
        if heard && let Some(c) = self.unread.borrow().rooms.get(room).and_then(|users| users.get(user)) {
            return Ok(c.clone());
        }
        let counts = self.db.unread(user, room)?;
        self.unread.borrow_mut().put(room, user, counts.clone());
        Ok(counts)
    }

    /// Sends a message to every other shard without blocking the caller.
    ///
    /// Announcements reach each peer in the order they were made: when a
    /// peer's queue is full, this and every later announcement to it wait in
    /// `overflow` and one task delivers them in order (a room's activity
    /// must never be heard after a later position's head).
    pub fn broadcast(&self, msg: impl Fn() -> ShardMsg) {
        let Some(mesh) = &self.mesh else { return };
        for peer in 0..self.count {
            if peer == self.id {
                continue;
            }
            let Some(lane) = self.overflow.get(peer) else { continue };
            if lane.draining.get() {
                lane.queue.borrow_mut().push_back(msg());
                continue;
            }
            let m = match mesh.try_send_to(peer, msg()) {
                Ok(()) => continue,
                Err(glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(m))) => m,
                Err(_) => continue,
            };
            lane.queue.borrow_mut().push_back(m);
            lane.draining.set(true);
            let (mesh, lane) = (mesh.clone(), lane.clone());
            glommio::spawn_local(async move {
                loop {
                    let next = lane.queue.borrow_mut().pop_front();
                    let Some(m) = next else { break };
                    let _ = mesh.send_to(peer, m).await;
                }
                lane.draining.set(false);
            })
            .detach();
        }
    }

    /// The client rendering of an event, from the cache or storage.
    ///
    /// Loading and inserting happen without an await in between, and
    /// redactions are announced after their write, so a cached rendering is
    /// never older than the latest redaction this shard has been told of.
    pub fn rendered(&self, id: &EventId) -> ApiResult<Option<Rc<Rendered>>> {
        let redactions = self.redactions.load(Ordering::Acquire);
        if redactions != self.redactions_seen.get() {
            self.rendered.borrow_mut().clear();
            self.redactions_seen.set(redactions);
        }
        if let Some(r) = self.rendered.borrow_mut().get(id) {
            return Ok(Some(r));
        }
        let Some(event) = self.db.event(id)? else { return Ok(None) };
        let r = Rc::new(Rendered::new(event));
        self.rendered.borrow_mut().insert(id.to_owned(), r.clone());
        Ok(Some(r))
    }

    /// The user's own push rule set, if they stored one.
    ///
    /// A rule change bumps `push_rule_changes` after its write and before
    /// its answer, so an event created after that answer is evaluated with
    /// the new rules.
    pub fn custom_ruleset(&self, user: &UserId) -> ApiResult<Option<Rc<Ruleset>>> {
        let changes = self.push_rule_changes.load(Ordering::Acquire);
        if changes != self.push_rule_changes_seen.get() {
            self.push_rules.borrow_mut().clear();
            self.push_rule_changes_seen.set(changes);
        }
        if let Some(r) = self.push_rules.borrow().get(user) {
            return Ok(r.clone());
        }
        let rules = self.db.account_data(user, None, "m.push_rules")?.and_then(|e| crate::push::stored_ruleset(&e.content)).map(Rc::new);
        let mut cache = self.push_rules.borrow_mut();
        if cache.len() >= PUSH_RULES_CACHE_MAX {
            cache.clear();
        }
        cache.insert(user.to_owned(), rules.clone());
        Ok(rules)
    }

    /// The users `user` ignores: their non-state events and their invites
    /// are not shown to `user`. Cached per shard like push rules.
    pub fn ignored_users(&self, user: &UserId) -> ApiResult<Rc<HashSet<OwnedUserId>>> {
        self.ignore_cache(&self.ignored, user, || Ok(self.db.account_data(user, None, "m.ignored_user_list")?.map(|e| crate::api::userdata::ignored_list(&e.content)).unwrap_or_default()))
    }

    /// The users who ignore `user`: events of `user` do not count towards
    /// their unread notifications. Cached per shard like push rules.
    pub fn ignorers_of(&self, user: &UserId) -> ApiResult<Rc<HashSet<OwnedUserId>>> {
        self.ignore_cache(&self.ignorers, user, || Ok(self.db.ignored_by(user, IGNORERS_MAX)?.into_iter().collect()))
    }

    /// One of the two ignore caches: both are dropped when the node-wide
    /// settings counter moves.
    fn ignore_cache(&self, cache: &RefCell<HashMap<OwnedUserId, Rc<HashSet<OwnedUserId>>>>, user: &UserId, load: impl FnOnce() -> ApiResult<HashSet<OwnedUserId>>) -> ApiResult<Rc<HashSet<OwnedUserId>>> {
        let changes = self.push_rule_changes.load(Ordering::Acquire);
        if changes != self.ignored_seen.get() {
            self.ignored.borrow_mut().clear();
            self.ignorers.borrow_mut().clear();
            self.ignored_seen.set(changes);
        }
        if let Some(set) = cache.borrow().get(user) {
            return Ok(set.clone());
        }
        let set = Rc::new(load()?);
        let mut cache = cache.borrow_mut();
        if cache.len() >= PUSH_RULES_CACHE_MAX {
            cache.clear();
        }
        cache.insert(user.to_owned(), set.clone());
        Ok(set)
    }

    /// Whether some shard announced a user-scoped write above `token`
    /// (see `user_writes`).
    pub fn user_writes_after(&self, token: &[u64]) -> bool {
        hint_after(&self.user_writes, token)
    }

    /// Whether some shard wrote a presence change above `token`.
    pub fn presence_writes_after(&self, token: &[u64]) -> bool {
        hint_after(&self.presence_writes, token)
    }

    /// Raises the last announced position of `room` to `pos`.
    pub fn note_room_activity(&self, room: &RoomId, pos: u64) {
        let mut activity = self.room_activity.borrow_mut();
        if let Some(p) = activity.get_mut(room) {
            *p = (*p).max(pos);
            return;
        }
        if activity.len() >= ROOM_ACTIVITY_MAX {
            activity.clear();
        }
        activity.insert(room.to_owned(), pos);
    }

    /// Whether nothing was announced for `room` past `since` (its owner's
    /// component of a sync token); `false` for a room this shard does not
    /// know.
    pub fn room_quiet_since(&self, room: &RoomId, since: u64) -> bool {
        self.room_activity.borrow().get(room).is_some_and(|p| *p <= since)
    }

    /// Every user with a member event in `room` and their membership (at
    /// most `limit`), from the cache while nothing was announced for the
    /// room since it was read. An announcement reaches this shard moments
    /// after the write it follows, so a list may trail a change made on
    /// another shard by that long.
    pub fn room_members(&self, room: &RoomId, limit: usize) -> ApiResult<MemberList> {
        // Read before storage: a later announcement moves it past the entry.
        let activity = self.room_activity.borrow().get(room).copied();
        if let Some(at) = activity
            && let Some((cached_at, list)) = self.member_lists.borrow().lists.get(room)
            && *cached_at == at
        {
            return Ok(list.clone());
        }
        let list = Rc::new(self.db.memberships(room, limit)?);
        if let Some(at) = activity {
            let mut cache = self.member_lists.borrow_mut();
            if let Some((_, old)) = cache.lists.remove(room) {
                cache.members -= old.len();
            }
            if cache.members + list.len() > MEMBER_LISTS_MAX {
                cache.lists.clear();
                cache.members = 0;
            }
            if list.len() <= MEMBER_LISTS_MAX {
                cache.members += list.len();
                cache.lists.insert(room.to_owned(), (at, list.clone()));
            }
        }
        Ok(list)
    }

    /// What an access token authenticates, from the cache while no token or
    /// account was written on the node since it was read.
    pub fn token(&self, token: &str) -> ApiResult<Option<CachedToken>> {
        // Read before storage: a later write moves it past the entry.
        let changes = self.db.auth_changes();
        {
            let mut cache = self.auth_cache.borrow_mut();
            if cache.seen != changes {
                cache.tokens.clear();
                cache.seen = changes;
            }
            if let Some(t) = cache.tokens.get(token) {
                return Ok(Some(t.clone()));
            }
        }
        let Some(record) = self.db.token(token)? else { return Ok(None) };
        let user = OwnedUserId::try_from(record.user_id).map_err(|e| crate::error::Error::Corrupt(e.to_string()))?;
        let Some(account) = self.db.account(&user)? else { return Ok(None) };
        if account.deactivated {
            return Ok(None);
        }
        let cached = CachedToken { user, device: record.device_id, is_guest: account.is_guest, expires_ms: record.expires_ms };
        let mut cache = self.auth_cache.borrow_mut();
        if cache.seen == changes {
            if cache.tokens.len() >= AUTH_CACHE_MAX {
                cache.tokens.clear();
            }
            cache.tokens.insert(token.to_owned(), cached.clone());
        }
        Ok(Some(cached))
    }

    /// The user's rooms for a sync with token `since`, from the cache when
    /// this shard has heard of every position the token covers.
    ///
    /// Every membership change is announced with its user, and a list is
    /// dropped when that announcement arrives, before the head it carries
    /// moves: up to this shard's heads, a cached list is as current as
    /// storage. A token past those heads reads storage.
    pub fn sync_rooms(&self, user: &UserId, since: Option<&[u64]>) -> ApiResult<Rc<UserRooms>> {
        let covered = since.is_none_or(|s| s.iter().zip(self.heads.borrow().iter()).all(|(t, h)| t <= h));
        let forgets = self.db.forgets();
        {
            let mut cache = self.user_rooms.borrow_mut();
            if cache.forgets_seen != forgets {
                cache.lists.clear();
                cache.rooms = 0;
                cache.forgets_seen = forgets;
            }
            if covered && let Some(list) = cache.lists.get(user) {
                return Ok(list.clone());
            }
        }
        let list = self.db.user_rooms(user, self.config.limits.rooms_per_user_max)?;
        let joined = list.iter().filter(|(_, r)| r.membership == "join").filter_map(|(id, _)| RoomId::parse(id.as_str()).ok()).collect();
        let rooms = Rc::new(UserRooms { list, joined: Rc::new(joined) });
        let mut cache = self.user_rooms.borrow_mut();
        if cache.forgets_seen == forgets && rooms.list.len() <= USER_ROOMS_MAX {
            if let Some(old) = cache.lists.remove(user) {
                cache.rooms -= old.list.len();
            }
            if cache.rooms + rooms.list.len() > USER_ROOMS_MAX {
                cache.lists.clear();
                cache.rooms = 0;
            }
            cache.rooms += rooms.list.len();
            cache.lists.insert(user.to_owned(), rooms.clone());
        }
        Ok(rooms)
    }

    /// The room's head for a sync reading its timeline up to `upto` (a
    /// position of the owner's stream), from the cache while nothing was
    /// announced for the room since it was read.
    ///
    /// A head read after an announcement covers everything announced up
    /// to it; a `upto` past what this shard has heard of reads storage.
    pub fn sync_room_head(&self, room: &RoomId, owner: usize, upto: u64) -> ApiResult<Rc<Option<crate::db::RoomHead>>> {
        let heard = self.heads.borrow().get(owner).is_some_and(|h| upto <= *h);
        // Read before storage: a later announcement moves it past the entry.
        let activity = self.room_activity.borrow().get(room).copied();
        if heard
            && let Some(at) = activity
            && let Some((cached_at, head)) = self.room_reads.borrow().heads.get(room)
            && *cached_at == at
        {
            return Ok(head.clone());
        }
        let head = Rc::new(self.db.room_head(room)?);
        if heard && let Some(at) = activity {
            let mut reads = self.room_reads.borrow_mut();
            if reads.heads.len() >= ROOM_READS_MAX {
                reads.heads.clear();
            }
            reads.heads.insert(room.to_owned(), (at, head.clone()));
        }
        Ok(head)
    }

    /// Timeline rows of a room in `(after, upto]` (newest first when
    /// `reverse`), at most `limit`; `events` is the room's `timeline_len`
    /// from a head read after `upto` was announced.
    ///
    /// Every position up to a sync token's was written before the token was
    /// made, so such a page never changes: the last one per room is kept
    /// for the next long-poll that asks the same.
    pub fn sync_timeline_page(&self, room: &RoomId, events: Option<u64>, after: Option<u64>, upto: u64, reverse: bool, limit: usize) -> ApiResult<TimelinePage> {
        let key = (after, upto, reverse, limit);
        if let Some((k, page)) = self.room_reads.borrow().pages.get(room)
            && *k == key
        {
            return Ok(page.clone());
        }
        let lo = after.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
        let page = Rc::new(self.db.timeline_of(room, events, lo, std::ops::Bound::Included(upto), reverse, limit)?);
        let mut reads = self.room_reads.borrow_mut();
        if reads.pages.len() >= ROOM_READS_MAX {
            reads.pages.clear();
        }
        reads.pages.insert(room.to_owned(), (key, page.clone()));
        Ok(page)
    }

    /// Drops the cached room lists of `users` (their memberships may have changed).
    fn drop_user_rooms(&self, users: &[OwnedUserId]) {
        let mut cache = self.user_rooms.borrow_mut();
        for u in users {
            if let Some(old) = cache.lists.remove(u) {
                cache.rooms -= old.list.len();
            }
        }
    }

    /// Announces a change of a user's push rules or ignored users to every
    /// shard's caches. Called after the write and before its answer.
    pub fn user_settings_changed(&self) {
        self.push_rule_changes.fetch_add(1, Ordering::Release);
    }

    /// Drops an event's rendering here and on every other shard. Called
    /// after the redaction's write and before its answer: the counter is
    /// shared memory, so every shard sees it before it serves the next
    /// request that could follow that answer.
    pub fn invalidate_rendered(&self, id: &EventId) {
        self.rendered.borrow_mut().remove(id);
        self.redactions.fetch_add(1, Ordering::Release);
    }

    /// Handles a message from another shard.
    pub fn receive(self: &Rc<Self>, msg: ShardMsg) {
        match msg {
            // A forwarded send is queued with the sender's reply channel, so
            // its answer leaves when its batch is written, ahead of the
            // announcement (and of the long-polls it wakes here).
            ShardMsg::Room { room, op: RoomOp::Send(draft), reply } => crate::room::enqueue_send(self, &room, draft, reply),
            ShardMsg::Room { room, op, reply } => {
                let shard = self.clone();
                glommio::spawn_local(async move {
                    let result = crate::room::execute(&shard, &room, op).await;
                    let _ = reply.send_async(result).await;
                })
                .detach();
            }
            ShardMsg::Advanced { shard, pos, rooms, users, unread } => {
                for room in &rooms {
                    self.note_room_activity(room, pos);
                }
                // Before the head moves: a token covering `pos` never meets
                // a room list or unread count read before its write.
                self.drop_user_rooms(&users);
                if let Some(u) = &unread {
                    self.note_unread(u);
                }
                self.note_head(usize::from(shard), pos);
                self.notifier.notify(&rooms, &users);
            }
            ShardMsg::Typing { room, users, pos, shard } => {
                self.note_room_activity(&room, pos);
                self.note_head(usize::from(shard), pos);
                self.typing.borrow_mut().insert(room.clone(), Typing { users, pos, shard });
                self.notifier.notify(&[room], &[]);
            }
            ShardMsg::Presence { user, state } => crate::presence::heard(self, user, state),
            ShardMsg::Active { user } => crate::presence::heard_active(self, user),
        }
    }

    /// Runs `op` on the room's owner shard and returns its answer.
    pub async fn room_op(self: &Rc<Self>, room: &RoomId, op: RoomOp) -> ApiResult<RoomReply> {
        let owner = self.owner_of(room);
        if owner == self.id {
            return crate::room::execute(self, room, op).await;
        }
        let mesh = self.mesh.as_ref().ok_or(Error::ShardUnavailable(owner))?;
        let (tx, rx) = flume::bounded(1);
        mesh.send_to(owner, ShardMsg::Room { room: room.to_owned(), op, reply: tx }).await.map_err(|_| ApiError::from(Error::ShardUnavailable(owner)))?;
        let reply = rx.recv_async().await.map_err(|_| ApiError::from(Error::ShardUnavailable(owner)))?;
        // The caller learns of what it did only once this shard has heard
        // of it, so whatever the caller asks next here sees it: a send's
        // batch (answered just before its announcement leaves), and
        // whatever else the owner announced before answering.
        let carried = match &reply {
            Ok(RoomReply::Event(_, pos)) => *pos,
            _ => 0,
        };
        self.wait_heard(owner, carried.max(self.announced[owner].load(Ordering::Acquire))).await;
        reply
    }
}
