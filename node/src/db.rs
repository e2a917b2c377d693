//! Typed stores: every key layout of the node lives here (the key server's
//! in `crate::keystore`), so handlers never touch raw partition or
//! clustering keys.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ruma::{EventId, OwnedEventId, OwnedUserId, RoomId, UserId};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;

use crate::error::Error;
use crate::pdu::{Event, Pdu, StoredEvent};
use crate::storage::{Scan, Store, Table, Write};

mod buckets;
mod directory;

/// Length of an inbox clustering key: writer shard (u16), position (u64),
/// index within the request (u32).
pub const INBOX_CK_LEN: usize = 14;
pub use buckets::{BUCKET_EVENTS, bucket_index_write, bucket_of, bucket_pk};

/// Result of typed store calls.
pub type DbResult<T> = Result<T, Error>;

/// Handle over the storage backend with typed accessors.
#[derive(Clone)]
pub struct Db {
    pub store: Arc<dyn Store>,
    /// Per writer shard, the last position whose device-list change rows
    /// may be in the unbucketed layout (see `keystore`); read once.
    pub(crate) key_change_floors: Arc<std::sync::OnceLock<Vec<u64>>>,
    /// Counts writes of one-time and fallback keys (uploads, claims, device
    /// deletions), node-wide; bumped after each write and before its answer,
    /// so a cache of key counts taken at an older count is stale.
    pub(crate) key_count_changes: Arc<std::sync::atomic::AtomicU64>,
    /// Counts writes to access tokens and accounts, node-wide (see [`Watched`]).
    auth_changes: Arc<AtomicU64>,
    /// Counts forgotten rooms, node-wide; bumped after each write and
    /// before its answer. A forget is the one change of a user's room list
    /// that no stream position announces.
    forgets: Arc<AtomicU64>,
}

/// The backend, with a count of the writes that can change what an access
/// token authenticates (rows of access tokens or accounts), raised after the
/// write returned and before the caller answers. A cache of authentications
/// taken at an older count may be stale.
struct Watched {
    inner: Arc<dyn Store>,
    auth_changes: Arc<AtomicU64>,
}

impl Store for Watched {
    fn get(&self, table: Table, pk: &[u8], ck: &[u8]) -> crate::storage::StorageResult<Option<bytes::Bytes>> {
        self.inner.get(table, pk, ck)
    }

    fn scan(&self, scan: Scan<'_>) -> crate::storage::StorageResult<Vec<crate::storage::Row>> {
        self.inner.scan(scan)
    }

    fn write(&self, writes: Vec<Write>) -> crate::storage::StorageResult<()> {
        let auth = writes.iter().any(|w| matches!(w.table(), Table::AccessTokens | Table::Users));
        let result = self.inner.write(writes);
        if auth {
            // Also after a failed write: it may have been applied in part.
            self.auth_changes.fetch_add(1, Ordering::Release);
        }
        result
    }

    fn insert_if_absent(&self, table: Table, pk: &[u8], ck: &[u8], value: &[u8]) -> crate::storage::StorageResult<Option<bytes::Bytes>> {
        // Only creates rows: no authentication taken before can change.
        self.inner.insert_if_absent(table, pk, ck, value)
    }

    fn flush(&self) -> crate::storage::StorageResult<()> {
        self.inner.flush()
    }
}

fn decode<T: DeserializeOwned>(table: Table, bytes: &[u8]) -> DbResult<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::Corrupt(format!("{}: {e}", table.name())))
}

fn corrupt(table: Table, what: &str) -> Error {
    Error::Corrupt(format!("{}: bad {what}", table.name()))
}

/// Clustering-key prefix of members' notification indexes in a room's
/// partition of the rooms table (the head's key is empty).
const NOTIFY_INDEX_PREFIX: &[u8] = b"notify\0";

/// Encodes a record; our record types always serialise.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// Most erased senders recorded in one room head (see `RoomHead::erased`).
pub const ERASED_PER_ROOM_MAX: usize = 10_000;

/// A user account.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Account {
    pub password_hash: Option<String>,
    #[serde(default)]
    pub deactivated: bool,
    #[serde(default)]
    pub is_guest: bool,
    #[serde(default)]
    pub admin: bool,
    #[serde(default)]
    pub displayname: Option<String>,
    #[serde(default)]
    pub avatar_url: Option<String>,
    pub created_ms: u64,
    /// Profile fields besides `displayname` and `avatar_url` (`m.tz` and
    /// custom keys), by key.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, Value>,
}

/// An access token's record.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct TokenRecord {
    pub user_id: String,
    pub device_id: String,
    /// Expiry in ms since the epoch, for tokens issued with refresh tokens.
    #[serde(default)]
    pub expires_ms: Option<u64>,
    /// The refresh token paired with this access token, if any.
    #[serde(default)]
    pub refresh_token: Option<String>,
}

/// A device.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Device {
    pub display_name: Option<String>,
    pub last_seen_ts: Option<u64>,
    pub last_seen_ip: Option<String>,
    /// The current access token of the device.
    pub access_token: String,
    #[serde(default)]
    pub refresh_token: Option<String>,
}

/// A user's membership in a room, as the user's room list sees it.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct UserRoom {
    pub membership: String,
    pub event_id: String,
    /// Stream position (of the room owner's shard) of the membership event.
    pub pos: u64,
    pub shard: u16,
    /// Whether the user forgot the room (left rooms only).
    #[serde(default)]
    pub forgotten: bool,
}

/// Per-room head: what the owner shard needs to append the next event.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct RoomHead {
    pub version: String,
    pub creator: String,
    pub extremities: Vec<OwnedEventId>,
    pub depth: u64,
    /// Owner shard and last positions of its stream touched by this room.
    pub shard: u16,
    pub last_event_pos: u64,
    #[serde(default)]
    pub last_receipt_pos: u64,
    #[serde(default)]
    pub last_typing_pos: u64,
    /// Events appended so far: the next event's sequence number, which
    /// picks its timeline bucket (see `buckets`).
    #[serde(default)]
    pub timeline_len: u64,
    /// The last unread round (see [`UnreadRound`]). Rooms last written
    /// before rounds existed have none: their unread rows are exact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unread_round: Option<UnreadRound>,
    /// Notification indexes given so far (see [`Db::notify_index`]).
    #[serde(default)]
    pub notify_members: u32,
    /// Threads with replies in the room: readers look up thread summaries
    /// only in rooms that have some.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub threads: u64,
    /// Edits (`m.replace` relations) ever sent in the room: readers look
    /// for an event's latest edit only in rooms that have some.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub edits: u64,
    /// References (`m.reference` relations) ever sent in the room: readers
    /// bundle an event's references only in rooms that have some.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub references: u64,
    /// The room's history visibility was set to something other than
    /// `shared` at some point: readers check each event against it
    /// (`api::visibility`); other rooms' members read all history up to
    /// their leave.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restricted_history: bool,
    /// Senders whose accounts were erased (deactivated with `erase`), with
    /// the room's last event position at the time: readers who first
    /// joined after it get their events with the content redacted. At most
    /// [`ERASED_PER_ROOM_MAX`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub erased: Vec<(OwnedUserId, u64)>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A point of a room's history up to which every member's stored unread
/// row is exact.
///
/// Unread rows are not rewritten for every event that notifies a member:
/// the room's notification rows, written with the events, already say
/// whom each event notified. The owner shard writes the rows of every
/// member notified since the previous round once the room has appended
/// [`UNREAD_ROUND_EVENTS`] events past it, in the same batch that moves
/// the round. A member's counts are then their row plus the notification
/// rows after the later of the round and the row's own position, which
/// is at most one round's worth of rows to read.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct UnreadRound {
    /// Stream position of the round: rows are exact up to it.
    pub pos: u64,
    /// The room's `timeline_len` at the round.
    pub seq: u64,
}

/// Events a room appends between two unread rounds: a member's stored
/// unread row is rewritten at most once per this many events, and reading
/// their counts back from storage reads at most about as many
/// notification rows.
pub const UNREAD_ROUND_EVENTS: u64 = 32;

/// Most notification rows read to count a member's unread events from
/// storage (the counts stop growing there).
pub const UNREAD_RECOUNT_MAX: usize = 10_000;

/// A current-state entry.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct StateEntry {
    pub event_id: OwnedEventId,
    pub pos: u64,
    /// `membership` of an `m.room.member` event, so that member lists are
    /// read without loading each event. Rows written before it was kept
    /// lack it; readers then load the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub membership: Option<String>,
}

/// A receipt's (type, thread, user).
pub type ReceiptKey = (String, String, String);

/// A to-device message in an inbox: (writer shard, position, clustering
/// key, message).
pub type InboxMessage = (u16, u64, Vec<u8>, Value);

/// A child event's row under its parent (`m.relates_to` of the child):
/// what `/relations` filters on before it reads the event.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Relation {
    pub event_id: OwnedEventId,
    pub rel_type: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// The child's sender (threads count their participants from it).
    #[serde(default)]
    pub sender: String,
}

impl Relation {
    /// The parent and relation of an event's content: `m.relates_to` with
    /// both `rel_type` and `event_id` (a reply's `m.in_reply_to` alone is
    /// not a relation).
    pub fn of(content: &Value) -> Option<(OwnedEventId, &str)> {
        let rel = content.get("m.relates_to")?;
        let rel_type = rel.get("rel_type")?.as_str()?;
        let parent = OwnedEventId::try_from(rel.get("event_id")?.as_str()?).ok()?;
        Some((parent, rel_type))
    }
}

/// What a thread root's `m.thread` aggregation is built from.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct ThreadSummary {
    /// Replies in the thread.
    pub count: u64,
    /// The latest reply and its position.
    pub latest: String,
    pub latest_pos: u64,
    /// Senders of replies, at most [`THREAD_PARTICIPANTS_MAX`] (later
    /// ones are not recorded).
    pub participants: Vec<String>,
}

/// Most reply senders a thread summary records.
pub const THREAD_PARTICIPANTS_MAX: usize = 1_000;

impl ThreadSummary {
    /// Whether `user` took part: wrote the root (`root_sender`) or a reply.
    pub fn participated(&self, user: &UserId, root_sender: &UserId) -> bool {
        user == root_sender || self.participants.iter().any(|p| p == user.as_str())
    }
}

/// A stored receipt.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Receipt {
    pub event_id: String,
    pub ts: u64,
    pub pos: u64,
}

/// Unread notification counts of one user in one room: the whole room's,
/// and the share of them in each thread (threaded read receipts clear one
/// thread, or the main timeline, at a time).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Unread {
    pub notifications: u64,
    pub highlights: u64,
    /// Counts of the events in threads, by thread root; threads with
    /// none are left out, and the main timeline has the rest. At most
    /// [`UNREAD_THREADS_MAX`] threads are counted apart.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub threads: BTreeMap<String, Counts>,
}

/// Notification and highlight counts of one thread or timeline.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Counts {
    #[serde(rename = "n")]
    pub notifications: u64,
    #[serde(rename = "h")]
    pub highlights: u64,
}

/// Most threads of one room whose unread counts a member keeps apart;
/// events of further threads count towards the main timeline.
pub const UNREAD_THREADS_MAX: usize = 200;

/// Which part of a room's timeline a read receipt covers: everything (an
/// unthreaded receipt), the main timeline (`thread_id: "main"`), or one
/// thread (its root's id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReadPart<'a> {
    All,
    Main,
    Thread(&'a str),
}

impl<'a> ReadPart<'a> {
    /// The part a receipt's `thread_id` names ("" when it has none).
    pub fn of(thread_id: &'a str) -> ReadPart<'a> {
        match thread_id {
            "" => ReadPart::All,
            "main" => ReadPart::Main,
            root => ReadPart::Thread(root),
        }
    }

    /// The part an event of `thread` (its root, or none for the main
    /// timeline) belongs to.
    pub fn of_event(thread: Option<&'a str>) -> ReadPart<'a> {
        thread.map_or(ReadPart::Main, ReadPart::Thread)
    }

    /// The clustering suffix of the part's read floor.
    fn key(self) -> &'a str {
        match self {
            ReadPart::All => "",
            ReadPart::Main => "main",
            ReadPart::Thread(root) => root,
        }
    }
}

impl Unread {
    /// Counts one more notification, in `thread` or the main timeline.
    pub fn add(&mut self, thread: Option<&str>, highlight: bool) {
        self.notifications += 1;
        self.highlights += u64::from(highlight);
        if let Some(root) = thread
            && (self.threads.len() < UNREAD_THREADS_MAX || self.threads.contains_key(root))
        {
            let c = self.threads.entry(root.to_owned()).or_default();
            c.notifications += 1;
            c.highlights += u64::from(highlight);
        }
    }

    /// Adds `other`'s counts to these.
    pub fn merge(&mut self, other: &Unread) {
        self.notifications += other.notifications;
        self.highlights += other.highlights;
        for (root, c) in &other.threads {
            if self.threads.len() < UNREAD_THREADS_MAX || self.threads.contains_key(root) {
                let mine = self.threads.entry(root.clone()).or_default();
                mine.notifications += c.notifications;
                mine.highlights += c.highlights;
            }
        }
    }

    /// The main timeline's counts: the room's less its threads'.
    pub fn main(&self) -> Counts {
        let (n, h) = self.threads.values().fold((0u64, 0u64), |(n, h), c| (n + c.notifications, h + c.highlights));
        Counts { notifications: self.notifications.saturating_sub(n), highlights: self.highlights.saturating_sub(h) }
    }

    /// Sets the counts of the main timeline or of one thread, keeping the
    /// others (`All` sets the whole room's and drops the threads'). A
    /// thread past [`UNREAD_THREADS_MAX`] is counted in the main timeline
    /// and cannot be set apart: its counts stay until the main timeline's
    /// are set.
    pub fn set(&mut self, part: ReadPart<'_>, counts: Counts) {
        if let ReadPart::Thread(root) = part
            && self.threads.len() >= UNREAD_THREADS_MAX
            && !self.threads.contains_key(root)
        {
            return;
        }
        let old = match part {
            ReadPart::All => {
                self.threads.clear();
                Counts { notifications: self.notifications, highlights: self.highlights }
            }
            ReadPart::Main => self.main(),
            ReadPart::Thread(root) => {
                let old = self.threads.remove(root).unwrap_or_default();
                if counts.notifications > 0 || counts.highlights > 0 {
                    self.threads.insert(root.to_owned(), counts);
                }
                old
            }
        };
        self.notifications = self.notifications.saturating_sub(old.notifications) + counts.notifications;
        self.highlights = self.highlights.saturating_sub(old.highlights) + counts.highlights;
    }
}

/// A member's stored unread row: their counts as of stream position `at`
/// (rows written before rounds existed carry none, and are exact as of
/// the round their room's owner sets when it first loads the room).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct UnreadRow {
    pub notifications: u64,
    pub highlights: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub threads: BTreeMap<String, Counts>,
}

impl UnreadRow {
    pub fn new(counts: &Unread, at: u64) -> UnreadRow {
        UnreadRow { notifications: counts.notifications, highlights: counts.highlights, at: Some(at), threads: counts.threads.clone() }
    }
}

/// The members an event notified, kept once per event for unread counts
/// and `GET /notifications` (one write per event, not one per member).
///
/// Members are named by their notification index in the room (see
/// [`Db::notify_index`]) in a bitmap: an event in a busy room notifies
/// every other member, and a list of their ids was the largest part of
/// what a message wrote.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct EventNotifications {
    pub event_id: String,
    pub ts: u64,
    /// Bitmap of the notified members' indexes (bit `i % 8` of byte
    /// `i / 8`), base64 without padding.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub bits: String,
    /// The same for the members the event highlighted.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub high: String,
    /// (user id, highlight) of every notified member, in rows written
    /// before bitmaps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<(String, bool)>,
    /// The root of the thread the event is in (none for the main timeline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread: Option<String>,
}

fn bitmap(indexes: impl Iterator<Item = u32>) -> String {
    use base64::Engine as _;
    let mut bytes: Vec<u8> = Vec::new();
    for i in indexes {
        let byte = (i / 8) as usize;
        if bytes.len() <= byte {
            bytes.resize(byte + 1, 0);
        }
        bytes[byte] |= 1 << (i % 8);
    }
    if bytes.is_empty() { String::new() } else { base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes) }
}

fn bitmap_bytes(bits: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD_NO_PAD.decode(bits).unwrap_or_default()
}

impl EventNotifications {
    /// The row of an event that notified the members of these indexes
    /// (index, highlight).
    pub fn new(event_id: String, ts: u64, notified: &[(u32, bool)], thread: Option<String>) -> EventNotifications {
        let bits = bitmap(notified.iter().map(|(i, _)| *i));
        let high = bitmap(notified.iter().filter(|(_, h)| *h).map(|(i, _)| *i));
        EventNotifications { event_id, ts, bits, high, users: Vec::new(), thread }
    }

    /// Whether the event notified `user`, whose index in the room is
    /// `index`, and if so whether it highlighted them.
    pub fn notified(&self, user: &UserId, index: Option<u32>) -> Option<bool> {
        if let Some(i) = index {
            let bit = |bits: &str| bitmap_bytes(bits).get((i / 8) as usize).is_some_and(|b| b & (1 << (i % 8)) != 0);
            if bit(&self.bits) {
                return Some(bit(&self.high));
            }
        }
        self.users.iter().find(|(u, _)| u == user.as_str()).map(|(_, h)| *h)
    }

    /// The indexes of the notified members, and the ids in older rows.
    pub fn members(&self) -> (Vec<u32>, Vec<OwnedUserId>) {
        let bytes = bitmap_bytes(&self.bits);
        let indexes = (0..bytes.len() as u32 * 8).filter(|i| bytes[(i / 8) as usize] & (1 << (i % 8)) != 0).collect();
        (indexes, self.users.iter().filter_map(|(u, _)| OwnedUserId::try_from(u.as_str()).ok()).collect())
    }
}

/// An event that notified a member (see [`Db::notified_rows_after`]).
#[derive(Clone, Debug)]
pub struct Notified {
    pub pos: u64,
    pub highlight: bool,
    pub thread: Option<String>,
}

/// Clustering key of a member's read floor: `user \0 part`.
fn read_floor_ck(user: &UserId, part: ReadPart<'_>) -> Vec<u8> {
    [user.as_bytes(), b"\0", part.key().as_bytes()].concat()
}

/// A piece of account data with the stream position that last changed it.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct AccountDataEntry {
    pub content: Value,
    pub shard: u16,
    pub pos: u64,
}

/// Clustering key of a state entry: `type \0 state_key`.
pub fn state_ck(kind: &str, state_key: &str) -> Vec<u8> {
    let mut ck = Vec::with_capacity(kind.len() + 1 + state_key.len());
    ck.extend_from_slice(kind.as_bytes());
    ck.push(0);
    ck.extend_from_slice(state_key.as_bytes());
    ck
}

/// The state keys of member events: from the first (inclusive) to the
/// first key past them (exclusive; 0x01 sorts after the NUL separator).
fn member_keys() -> (Vec<u8>, Vec<u8>) {
    let first = state_ck("m.room.member", "");
    let mut past = first.clone();
    if let Some(last) = past.last_mut() {
        *last = 1;
    }
    (first, past)
}

/// Splits a state clustering key back into (type, state_key).
pub fn split_state_ck(ck: &[u8]) -> Option<(String, String)> {
    let nul = ck.iter().position(|b| *b == 0)?;
    Some((String::from_utf8(ck[..nul].to_vec()).ok()?, String::from_utf8(ck[nul + 1..].to_vec()).ok()?))
}

/// Clustering key of room account data: `room \0 type`; global data uses `\0 type`.
pub fn account_data_ck(room: Option<&RoomId>, kind: &str) -> Vec<u8> {
    let mut ck = Vec::new();
    if let Some(r) = room {
        ck.extend_from_slice(r.as_bytes());
    }
    ck.push(0);
    ck.extend_from_slice(kind.as_bytes());
    ck
}

impl Db {
    pub fn new(store: Arc<dyn Store>) -> Self {
        let auth_changes = Arc::new(AtomicU64::new(0));
        let store = Arc::new(Watched { inner: store, auth_changes: auth_changes.clone() });
        Db { store, key_change_floors: Arc::default(), key_count_changes: Arc::default(), auth_changes, forgets: Arc::default() }
    }

    /// Writes to access tokens or accounts so far, node-wide.
    pub fn auth_changes(&self) -> u64 {
        self.auth_changes.load(Ordering::Acquire)
    }

    /// Rooms forgotten so far, node-wide.
    pub fn forgets(&self) -> u64 {
        self.forgets.load(Ordering::Acquire)
    }

    /// Marks a room as forgotten by `user` (left rooms only).
    pub fn forget_room(&self, user: &UserId, room: &RoomId, mut ur: UserRoom) -> DbResult<()> {
        ur.forgotten = true;
        self.store.write(vec![Write::put(Table::UserRooms, user.as_bytes(), room.as_bytes(), encode(&ur))])?;
        self.forgets.fetch_add(1, Ordering::Release);
        Ok(())
    }

    pub(crate) fn get_json<T: DeserializeOwned>(&self, table: Table, pk: &[u8], ck: &[u8]) -> DbResult<Option<T>> {
        match self.store.get(table, pk, ck)? {
            Some(bytes) => Ok(Some(decode(table, &bytes)?)),
            None => Ok(None),
        }
    }

    pub(crate) fn scan_json<T: DeserializeOwned>(&self, scan: Scan<'_>) -> DbResult<Vec<(Vec<u8>, T)>> {
        let table = scan.table;
        self.store.scan(scan)?.into_iter().map(|(k, v)| Ok((k.to_vec(), decode(table, &v)?))).collect()
    }

    // ---- accounts, tokens, devices

    pub fn account(&self, user: &UserId) -> DbResult<Option<Account>> {
        self.get_json(Table::Users, user.as_bytes(), b"")
    }

    /// Creates an account if the id is free; false when taken.
    pub fn create_account(&self, user: &UserId, account: &Account) -> DbResult<bool> {
        Ok(self.store.insert_if_absent(Table::Users, user.as_bytes(), b"", &encode(account))?.is_none())
    }

    pub fn put_account(&self, user: &UserId, account: &Account) -> DbResult<()> {
        Ok(self.store.write(vec![Write::put(Table::Users, user.as_bytes(), b"".to_vec(), encode(account))])?)
    }

    pub fn token(&self, token: &str) -> DbResult<Option<TokenRecord>> {
        self.get_json(Table::AccessTokens, token.as_bytes(), b"")
    }

    pub fn refresh_token(&self, token: &str) -> DbResult<Option<TokenRecord>> {
        self.get_json(Table::RefreshTokens, token.as_bytes(), b"")
    }

    pub fn device(&self, user: &UserId, device: &str) -> DbResult<Option<Device>> {
        self.get_json(Table::Devices, user.as_bytes(), device.as_bytes())
    }

    pub fn devices(&self, user: &UserId, limit: usize) -> DbResult<Vec<(String, Device)>> {
        Ok(self
            .scan_json(Scan::partition(Table::Devices, user.as_bytes(), limit))?
            .into_iter()
            .map(|(k, d)| (String::from_utf8_lossy(&k).into_owned(), d))
            .collect())
    }

    /// Writes a device with its fresh tokens, revoking the ones it replaces.
    pub fn put_device_session(&self, user: &UserId, device_id: &str, device: &Device, token: &TokenRecord, old: Option<&Device>) -> DbResult<()> {
        let mut writes = vec![
            Write::put(Table::Devices, user.as_bytes(), device_id.as_bytes(), encode(device)),
            Write::put(Table::AccessTokens, device.access_token.as_bytes(), b"".to_vec(), encode(token)),
        ];
        if let Some(rt) = &device.refresh_token {
            writes.push(Write::put(Table::RefreshTokens, rt.as_bytes(), b"".to_vec(), encode(token)));
        }
        if let Some(old) = old {
            if old.access_token != device.access_token {
                writes.push(Write::delete(Table::AccessTokens, old.access_token.as_bytes(), b"".to_vec()));
            }
            if let Some(rt) = &old.refresh_token
                && Some(rt) != device.refresh_token.as_ref()
            {
                writes.push(Write::delete(Table::RefreshTokens, rt.as_bytes(), b"".to_vec()));
            }
        }
        Ok(self.store.write(writes)?)
    }

    pub fn put_device(&self, user: &UserId, device_id: &str, device: &Device) -> DbResult<()> {
        Ok(self.store.write(vec![Write::put(Table::Devices, user.as_bytes(), device_id.as_bytes(), encode(device))])?)
    }

    /// Deletes a device, its tokens and its keys in one batch.
    pub fn delete_device(&self, user: &UserId, device_id: &str) -> DbResult<bool> {
        let Some(device) = self.device(user, device_id)? else { return Ok(false) };
        let mut writes = vec![Write::delete(Table::Devices, user.as_bytes(), device_id.as_bytes())];
        // Dehydrated devices have no access token (and CQL refuses empty keys).
        if !device.access_token.is_empty() {
            writes.push(Write::delete(Table::AccessTokens, device.access_token.as_bytes(), b"".to_vec()));
        }
        if let Some(rt) = device.refresh_token {
            writes.push(Write::delete(Table::RefreshTokens, rt.as_bytes(), b"".to_vec()));
        }
        writes.extend(self.device_keys_deletes(user, device_id)?);
        self.store.write(writes)?;
        self.key_counts_changed();
        Ok(true)
    }

    // ---- events and rooms

    pub fn event(&self, id: &EventId) -> DbResult<Option<Event>> {
        let Some(stored) = self.get_json::<StoredEvent>(Table::Events, id.as_bytes(), b"")? else { return Ok(None) };
        let pdu = Pdu::parse(stored.json.get(), id.to_owned()).map_err(|e| Error::Corrupt(format!("event {id}: {e}")))?;
        Ok(Some(Event { pdu: Arc::new(pdu), stored: Arc::new(stored) }))
    }

    pub fn room_head(&self, room: &RoomId) -> DbResult<Option<RoomHead>> {
        self.get_json(Table::Rooms, room.as_bytes(), b"")
    }

    /// The current state of a room: (type, state_key) -> entry.
    pub fn room_state(&self, room: &RoomId, limit: usize) -> DbResult<Vec<((String, String), StateEntry)>> {
        let rows = self.scan_json::<StateEntry>(Scan::partition(Table::RoomState, room.as_bytes(), limit))?;
        Ok(rows.into_iter().filter_map(|(ck, e)| split_state_ck(&ck).map(|k| (k, e))).collect())
    }

    /// The current state of a room without its member events, and the
    /// member entries of `members` only (what lazy-loading needs): two range
    /// scans around the member keys and a point read per member.
    pub fn room_state_of_members<'a>(&self, room: &RoomId, members: impl IntoIterator<Item = &'a str>, limit: usize) -> DbResult<Vec<((String, String), StateEntry)>> {
        let (first_member, past_members) = member_keys();
        let mut rows = Vec::new();
        for (from, to) in [(Bound::Unbounded, Bound::Excluded(&first_member[..])), (Bound::Included(&past_members[..]), Bound::Unbounded)] {
            let left = limit.saturating_sub(rows.len());
            if left == 0 {
                break;
            }
            rows.extend(self.scan_json::<StateEntry>(Scan { table: Table::RoomState, pk: room.as_bytes(), from, to, reverse: false, limit: left })?);
        }
        let mut out: Vec<((String, String), StateEntry)> = rows.into_iter().filter_map(|(ck, e)| split_state_ck(&ck).map(|k| (k, e))).collect();
        for member in members {
            if out.len() >= limit {
                break;
            }
            if let Some(entry) = self.state_entry(room, "m.room.member", member)? {
                out.push((("m.room.member".to_owned(), member.to_owned()), entry));
            }
        }
        Ok(out)
    }

    pub fn state_entry(&self, room: &RoomId, kind: &str, state_key: &str) -> DbResult<Option<StateEntry>> {
        self.get_json(Table::RoomState, room.as_bytes(), &state_ck(kind, state_key))
    }

    /// The current state event of (type, state_key).
    /// The current state entries of one event type, by state key: one range
    /// scan over `kind \0 ..`.
    pub fn state_of_type(&self, room: &RoomId, kind: &str, limit: usize) -> DbResult<Vec<(String, StateEntry)>> {
        let from = state_ck(kind, "");
        let mut to = from.clone();
        if let Some(last) = to.last_mut() {
            *last = 1;
        }
        let rows = self.scan_json::<StateEntry>(Scan { table: Table::RoomState, pk: room.as_bytes(), from: Bound::Included(&from), to: Bound::Excluded(&to), reverse: false, limit })?;
        Ok(rows.into_iter().filter_map(|(ck, e)| split_state_ck(&ck).map(|(_, key)| (key, e))).collect())
    }

    pub fn state_event(&self, room: &RoomId, kind: &str, state_key: &str) -> DbResult<Option<Event>> {
        match self.state_entry(room, kind, state_key)? {
            Some(entry) => self.event(&entry.event_id),
            None => Ok(None),
        }
    }

    /// Timeline event ids of a room with positions within the bounds,
    /// newest first when `reverse` (walks the room's buckets).
    pub fn timeline(&self, room: &RoomId, from: Bound<u64>, to: Bound<u64>, reverse: bool, limit: usize) -> DbResult<Vec<(u64, OwnedEventId)>> {
        self.timeline_of(room, None, from, to, reverse, limit)
    }

    /// [`Db::timeline`] for a caller that read the room's head (`events`:
    /// its `timeline_len`) after the newest event it asks for.
    pub fn timeline_of(&self, room: &RoomId, events: Option<u64>, from: Bound<u64>, to: Bound<u64>, reverse: bool, limit: usize) -> DbResult<Vec<(u64, OwnedEventId)>> {
        self.bucket_scan(Table::Timeline, room, events, from, to, reverse, limit)?
            .into_iter()
            .map(|(pos, v)| {
                let id = OwnedEventId::try_from(String::from_utf8_lossy(&v).into_owned()).map_err(|e| Error::Corrupt(e.to_string()))?;
                Ok((pos, id))
            })
            .collect()
    }

    /// Stages the timeline row of the room's `seq`-th event (counted from 0)
    /// at `pos`, and the bucket index row when it opens a bucket.
    pub fn timeline_writes(room: &RoomId, seq: u64, pos: u64, event_id: &EventId) -> Vec<Write> {
        let mut writes = vec![Write::put(Table::Timeline, bucket_pk(room, bucket_of(seq)), pos.to_be_bytes().to_vec(), event_id.as_bytes())];
        writes.extend(bucket_index_write(room, seq, pos));
        writes
    }

    /// The partition of a parent event's children: `room \0 parent`.
    fn relations_pk(room: &RoomId, parent: &EventId) -> Vec<u8> {
        [room.as_bytes(), b"\0", parent.as_bytes()].concat()
    }

    /// Stages the row that names `child` (at `pos`) as a child of `parent`.
    pub fn relation_write(room: &RoomId, parent: &EventId, pos: u64, child: &Relation) -> Write {
        Write::put(Table::Relations, Db::relations_pk(room, parent), pos.to_be_bytes().to_vec(), encode(child))
    }

    /// Stages the removal of the child row at `pos` (its event was redacted).
    pub fn relation_delete(room: &RoomId, parent: &EventId, pos: u64) -> Write {
        Write::delete(Table::Relations, Db::relations_pk(room, parent), pos.to_be_bytes().to_vec())
    }

    /// The children of `parent` in `room` with positions within the bounds,
    /// newest first when `reverse`.
    pub fn relations(&self, room: &RoomId, parent: &EventId, from: Bound<u64>, to: Bound<u64>, reverse: bool, limit: usize) -> DbResult<Vec<(u64, Relation)>> {
        let pk = Db::relations_pk(room, parent);
        let key = |b: Bound<u64>| b.map(u64::to_be_bytes);
        let (from, to) = (key(from), key(to));
        let rows = self.scan_json::<Relation>(Scan {
            table: Table::Relations,
            pk: &pk,
            from: from.as_ref().map(|k| &k[..]),
            to: to.as_ref().map(|k| &k[..]),
            reverse,
            limit,
        })?;
        rows.into_iter()
            .map(|(ck, r)| {
                let pos = <[u8; 8]>::try_from(ck.as_slice()).map(u64::from_be_bytes).map_err(|_| corrupt(Table::Relations, "position"))?;
                Ok((pos, r))
            })
            .collect()
    }

    /// The summary of the thread rooted at `root`, if it has replies.
    pub fn thread_summary(&self, room: &RoomId, root: &EventId) -> DbResult<Option<ThreadSummary>> {
        self.get_json(Table::Threads, room.as_bytes(), root.as_bytes())
    }

    fn threads_latest_pk(room: &RoomId) -> Vec<u8> {
        [room.as_bytes(), b"\0latest"].concat()
    }

    /// Stages a thread's new summary and moves its row in the by-activity
    /// order from `old` (its previous summary, if any).
    pub fn thread_writes(room: &RoomId, root: &EventId, old: Option<&ThreadSummary>, new: &ThreadSummary) -> Vec<Write> {
        let latest = Db::threads_latest_pk(room);
        let mut writes = vec![Write::put(Table::Threads, room.as_bytes(), root.as_bytes(), encode(new))];
        if let Some(old) = old
            && old.latest_pos != new.latest_pos
        {
            writes.push(Write::delete(Table::Threads, latest.clone(), old.latest_pos.to_be_bytes().to_vec()));
        }
        writes.push(Write::put(Table::Threads, latest, new.latest_pos.to_be_bytes().to_vec(), root.as_bytes()));
        writes
    }

    /// Stages the removal of a thread that has no reply left.
    pub fn thread_delete(room: &RoomId, root: &EventId, old: Option<&ThreadSummary>) -> Vec<Write> {
        let mut writes = vec![Write::delete(Table::Threads, room.as_bytes(), root.as_bytes())];
        if let Some(old) = old {
            writes.push(Write::delete(Table::Threads, Db::threads_latest_pk(room), old.latest_pos.to_be_bytes().to_vec()));
        }
        writes
    }

    /// Thread roots of a room by the position of their latest reply, within
    /// the bounds, most recent first when `reverse`.
    pub fn threads(&self, room: &RoomId, from: Bound<u64>, to: Bound<u64>, reverse: bool, limit: usize) -> DbResult<Vec<(u64, OwnedEventId)>> {
        let pk = Db::threads_latest_pk(room);
        let key = |b: Bound<u64>| b.map(u64::to_be_bytes);
        let (from, to) = (key(from), key(to));
        let rows = self.store.scan(Scan { table: Table::Threads, pk: &pk, from: from.as_ref().map(|k| &k[..]), to: to.as_ref().map(|k| &k[..]), reverse, limit })?;
        rows.into_iter()
            .map(|(ck, v)| {
                let pos = <[u8; 8]>::try_from(ck.as_ref()).map(u64::from_be_bytes).map_err(|_| corrupt(Table::Threads, "position"))?;
                let id = OwnedEventId::try_from(String::from_utf8_lossy(&v).into_owned()).map_err(|_| corrupt(Table::Threads, "root id"))?;
                Ok((pos, id))
            })
            .collect()
    }

    pub fn user_rooms(&self, user: &UserId, limit: usize) -> DbResult<Vec<(String, UserRoom)>> {
        Ok(self
            .scan_json::<UserRoom>(Scan::partition(Table::UserRooms, user.as_bytes(), limit))?
            .into_iter()
            .map(|(k, r)| (String::from_utf8_lossy(&k).into_owned(), r))
            .collect())
    }

    pub fn user_room(&self, user: &UserId, room: &RoomId) -> DbResult<Option<UserRoom>> {
        self.get_json(Table::UserRooms, user.as_bytes(), room.as_bytes())
    }

    pub fn membership(&self, room: &RoomId, user: &UserId) -> DbResult<Option<String>> {
        Ok(self.state_event(room, "m.room.member", user.as_str())?.and_then(|e| e.pdu.membership()))
    }

    /// Users whose current membership in the room is `membership`.
    pub fn members(&self, room: &RoomId, membership: &str, limit: usize) -> DbResult<Vec<String>> {
        Ok(self.memberships(room, limit)?.into_iter().filter(|(_, m)| m == membership).map(|(u, _)| u).collect())
    }

    /// Every user with a member event in the room, with their current
    /// membership, in one scan of the room's member state.
    pub fn memberships(&self, room: &RoomId, limit: usize) -> DbResult<Vec<(String, String)>> {
        let (prefix, end) = member_keys();
        let rows = self.scan_json::<StateEntry>(Scan {
            table: Table::RoomState,
            pk: room.as_bytes(),
            from: Bound::Included(&prefix),
            to: Bound::Excluded(&end),
            reverse: false,
            limit,
        })?;
        let mut out = Vec::with_capacity(rows.len());
        for (ck, entry) in rows {
            let Some((_, user)) = split_state_ck(&ck) else { continue };
            let membership = match entry.membership {
                Some(m) => Some(m),
                None => self.event(&entry.event_id)?.and_then(|ev| ev.pdu.membership()),
            };
            if let Some(m) = membership {
                out.push((user, m));
            }
        }
        Ok(out)
    }

    pub fn txn(&self, user: &UserId, device: &str, txn_id: &str) -> DbResult<Option<String>> {
        let ck = [device.as_bytes(), b"\0", txn_id.as_bytes()].concat();
        Ok(self.store.get(Table::Transactions, user.as_bytes(), &ck)?.map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    pub fn txn_write(user: &UserId, device: &str, txn_id: &str, event_id: &EventId) -> Write {
        let ck = [device.as_bytes(), b"\0", txn_id.as_bytes()].concat();
        Write::put(Table::Transactions, user.as_bytes(), ck, event_id.as_bytes())
    }

    pub fn receipts(&self, room: &RoomId, limit: usize) -> DbResult<Vec<(ReceiptKey, Receipt)>> {
        let rows = self.scan_json::<Receipt>(Scan::partition(Table::Receipts, room.as_bytes(), limit))?;
        Ok(rows
            .into_iter()
            .filter_map(|(ck, r)| {
                let parts: Vec<_> = ck.split(|b| *b == 0).map(|p| String::from_utf8_lossy(p).into_owned()).collect();
                match parts.as_slice() {
                    [t, thread, u] => Some(((t.clone(), thread.clone(), u.clone()), r)),
                    _ => None,
                }
            })
            .collect())
    }

    pub fn receipt_ck(kind: &str, thread: &str, user: &UserId) -> Vec<u8> {
        [kind.as_bytes(), b"\0", thread.as_bytes(), b"\0", user.as_bytes()].concat()
    }

    /// A member's unread counts in a room: their stored row plus what the
    /// notification rows after it (and after the room's last unread round)
    /// name them in. The head is read before the row: a round committed in
    /// between then only makes the row newer than the round read.
    pub fn unread(&self, user: &UserId, room: &RoomId) -> DbResult<Unread> {
        let round = self.room_head(room)?.and_then(|h| h.unread_round);
        let row: UnreadRow = self.get_json(Table::Unread, user.as_bytes(), room.as_bytes())?.unwrap_or_default();
        let mut counts = Unread { notifications: row.notifications, highlights: row.highlights, threads: row.threads };
        let Some(round) = round else { return Ok(counts) };
        let after = row.at.unwrap_or(0).max(round.pos);
        let mut since = Unread::default();
        for n in self.notified_rows_after(room, user, after, UNREAD_RECOUNT_MAX)? {
            since.add(n.thread.as_deref(), n.highlight);
        }
        counts.merge(&since);
        Ok(counts)
    }

    /// Stages a member's unread row: `counts` as of stream position `at`.
    pub fn unread_write(user: &UserId, room: &RoomId, counts: &Unread, at: u64) -> Write {
        Write::put(Table::Unread, user.as_bytes(), room.as_bytes(), encode(&UnreadRow::new(counts, at)))
    }

    /// The notification indexes and (in older rows) ids of the members the
    /// notification rows of a room after position `after` name (at most
    /// `limit` rows are read).
    pub fn notified_after(&self, room: &RoomId, after: u64, limit: usize) -> DbResult<(BTreeSet<u32>, BTreeSet<OwnedUserId>)> {
        let (mut indexes, mut users) = (BTreeSet::new(), BTreeSet::new());
        for (_, v) in self.bucket_scan(Table::Notifications, room, None, Bound::Excluded(after), Bound::Unbounded, false, limit)? {
            let (i, u) = decode::<EventNotifications>(Table::Notifications, &v)?.members();
            indexes.extend(i);
            users.extend(u);
        }
        Ok((indexes, users))
    }

    /// A member's notification index in a room: the bit that names them in
    /// the room's notification rows. Given on first notification and kept
    /// for good (the room head counts them), in the room's partition of
    /// the rooms table.
    pub fn notify_index(&self, room: &RoomId, user: &UserId) -> DbResult<Option<u32>> {
        let row = self.store.get(Table::Rooms, room.as_bytes(), &Db::notify_index_ck(user))?;
        row.map(|b| <[u8; 4]>::try_from(b.as_ref()).map(u32::from_be_bytes).map_err(|_| corrupt(Table::Rooms, "notification index"))).transpose()
    }

    fn notify_index_ck(user: &UserId) -> Vec<u8> {
        [NOTIFY_INDEX_PREFIX, user.as_bytes()].concat()
    }

    pub fn notify_index_write(room: &RoomId, user: &UserId, index: u32) -> Write {
        Write::put(Table::Rooms, room.as_bytes(), Db::notify_index_ck(user), index.to_be_bytes().to_vec())
    }

    /// Every notification index of a room and its member (at most `limit`).
    pub fn notify_indexes(&self, room: &RoomId, limit: usize) -> DbResult<Vec<(u32, OwnedUserId)>> {
        let to = [&NOTIFY_INDEX_PREFIX[..NOTIFY_INDEX_PREFIX.len() - 1], &[NOTIFY_INDEX_PREFIX[NOTIFY_INDEX_PREFIX.len() - 1] + 1]].concat();
        let rows = self.store.scan(Scan { table: Table::Rooms, pk: room.as_bytes(), from: Bound::Included(NOTIFY_INDEX_PREFIX), to: Bound::Excluded(&to), reverse: false, limit })?;
        rows.into_iter()
            .map(|(ck, v)| {
                let user = std::str::from_utf8(&ck[NOTIFY_INDEX_PREFIX.len()..]).ok().and_then(|u| OwnedUserId::try_from(u).ok());
                let index = <[u8; 4]>::try_from(v.as_ref()).ok().map(u32::from_be_bytes);
                user.zip(index).map(|(u, i)| (i, u)).ok_or_else(|| corrupt(Table::Rooms, "notification index"))
            })
            .collect()
    }

    // ---- account data, filters, aliases, directory, presence, pushers

    pub fn account_data(&self, user: &UserId, room: Option<&RoomId>, kind: &str) -> DbResult<Option<AccountDataEntry>> {
        self.get_json(Table::AccountData, user.as_bytes(), &account_data_ck(room, kind))
    }

    /// All account data of a user: (room or None, type, entry).
    pub fn all_account_data(&self, user: &UserId, limit: usize) -> DbResult<Vec<(Option<String>, String, AccountDataEntry)>> {
        let rows = self.scan_json::<AccountDataEntry>(Scan::partition(Table::AccountData, user.as_bytes(), limit))?;
        Ok(rows
            .into_iter()
            .filter_map(|(ck, e)| {
                let nul = ck.iter().position(|b| *b == 0)?;
                let room = if nul == 0 { None } else { Some(String::from_utf8_lossy(&ck[..nul]).into_owned()) };
                Some((room, String::from_utf8_lossy(&ck[nul + 1..]).into_owned(), e))
            })
            .collect())
    }

    /// The write that deletes all of a user's account data, global and per
    /// room (every clustering key is a room id or empty, then NUL, then
    /// the type: all below 0xff).
    pub fn all_account_data_delete(user: &UserId) -> Write {
        Write::DeleteRange { table: Table::AccountData, pk: user.as_bytes().to_vec(), from: Vec::new(), to: vec![0xff; 4] }
    }

    pub fn put_account_data(&self, user: &UserId, room: Option<&RoomId>, kind: &str, entry: &AccountDataEntry, extra: Vec<Write>) -> DbResult<()> {
        let mut writes = vec![Write::put(Table::AccountData, user.as_bytes(), account_data_ck(room, kind), encode(entry))];
        writes.extend(extra);
        Ok(self.store.write(writes)?)
    }

    pub fn filter(&self, user: &UserId, id: &str) -> DbResult<Option<Value>> {
        self.get_json(Table::Filters, user.as_bytes(), id.as_bytes())
    }

    /// Stores a filter under a content-derived id, so equal filters share one.
    pub fn put_filter(&self, user: &UserId, filter: &Value) -> DbResult<String> {
        let bytes = encode(filter);
        let id = format!("{:x}", tessera_shared::ring::stable_hash(&bytes));
        self.store.write(vec![Write::put(Table::Filters, user.as_bytes(), id.as_bytes(), bytes)])?;
        Ok(id)
    }

    pub fn alias(&self, alias: &str) -> DbResult<Option<String>> {
        Ok(self.store.get(Table::Aliases, alias.as_bytes(), b"")?.map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// Creates an alias if free; false when taken.
    pub fn create_alias(&self, alias: &str, room: &RoomId, creator: &UserId) -> DbResult<bool> {
        let record = serde_json::json!({ "room_id": room, "creator": creator });
        if self.store.insert_if_absent(Table::Aliases, alias.as_bytes(), b"", room.as_bytes())?.is_some() {
            return Ok(false);
        }
        self.store.write(vec![Write::put(Table::RoomAliases, room.as_bytes(), alias.as_bytes(), encode(&record))])?;
        Ok(true)
    }

    pub fn alias_creator(&self, room: &RoomId, alias: &str) -> DbResult<Option<String>> {
        let rec: Option<Value> = self.get_json(Table::RoomAliases, room.as_bytes(), alias.as_bytes())?;
        Ok(rec.and_then(|r| r.get("creator").and_then(Value::as_str).map(str::to_owned)))
    }

    pub fn delete_alias(&self, alias: &str, room: &RoomId) -> DbResult<()> {
        Ok(self.store.write(vec![Write::delete(Table::Aliases, alias.as_bytes(), b"".to_vec()), Write::delete(Table::RoomAliases, room.as_bytes(), alias.as_bytes())])?)
    }

    pub fn room_aliases(&self, room: &RoomId, limit: usize) -> DbResult<Vec<String>> {
        Ok(self.store.scan(Scan::partition(Table::RoomAliases, room.as_bytes(), limit))?.into_iter().map(|(k, _)| String::from_utf8_lossy(&k).into_owned()).collect())
    }

    pub fn presence(&self, user: &UserId) -> DbResult<Option<Value>> {
        self.get_json(Table::Presence, user.as_bytes(), b"")
    }

    /// The one partition of [`Table::PresenceLive`] (CQL refuses empty
    /// partition keys).
    const PRESENCE_LIVE_PK: &[u8] = b"users";

    /// Users whose stored presence is not offline, in user id order after
    /// `after`, at most `limit`.
    pub fn presence_live(&self, after: Option<&UserId>, limit: usize) -> DbResult<Vec<OwnedUserId>> {
        let from = match after {
            Some(u) => Bound::Excluded(u.as_bytes()),
            None => Bound::Unbounded,
        };
        let rows = self.store.scan(Scan { table: Table::PresenceLive, pk: Self::PRESENCE_LIVE_PK, from, to: Bound::Unbounded, reverse: false, limit })?;
        Ok(rows.into_iter().filter_map(|(ck, _)| std::str::from_utf8(&ck).ok().and_then(|u| UserId::parse(u).ok())).collect())
    }

    /// The write that lists (or unlists) `user` as not offline.
    pub fn presence_live_write(user: &UserId, live: bool) -> Write {
        if live { Write::put(Table::PresenceLive, Self::PRESENCE_LIVE_PK.to_vec(), user.as_bytes(), b"".to_vec()) } else { Write::delete(Table::PresenceLive, Self::PRESENCE_LIVE_PK.to_vec(), user.as_bytes()) }
    }

    pub fn put_presence(&self, user: &UserId, value: &Value) -> DbResult<()> {
        Ok(self.store.write(vec![Write::put(Table::Presence, user.as_bytes(), b"".to_vec(), encode(value))])?)
    }

    pub fn pushers(&self, user: &UserId, limit: usize) -> DbResult<Vec<Value>> {
        Ok(self.scan_json::<Value>(Scan::partition(Table::Pushers, user.as_bytes(), limit))?.into_iter().map(|(_, v)| v).collect())
    }

    pub fn put_pusher(&self, user: &UserId, app_id: &str, pushkey: &str, pusher: Option<&Value>) -> DbResult<()> {
        let ck = [app_id.as_bytes(), b"\0", pushkey.as_bytes()].concat();
        let w = match pusher {
            Some(p) => Write::put(Table::Pushers, user.as_bytes(), ck, encode(p)),
            None => Write::delete(Table::Pushers, user.as_bytes(), ck),
        };
        Ok(self.store.write(vec![w])?)
    }

    pub fn stream_head(&self, shard: u16) -> DbResult<u64> {
        Ok(self
            .store
            .get(Table::StreamHeads, &shard.to_be_bytes(), b"")?
            .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0))
    }

    pub fn stream_head_write(shard: u16, pos: u64) -> Write {
        Write::put(Table::StreamHeads, shard.to_be_bytes().to_vec(), b"".to_vec(), pos.to_be_bytes().to_vec())
    }

    /// Stages the notifications of the room's `seq`-th event; rows share
    /// the timeline's buckets and are keyed by position, in timeline order.
    pub fn notifications_write(room: &RoomId, seq: u64, pos: u64, notes: &EventNotifications) -> Write {
        Write::put(Table::Notifications, bucket_pk(room, bucket_of(seq)), pos.to_be_bytes().to_vec(), encode(notes))
    }

    /// A room's notification rows, newest first: (position, row).
    pub fn room_notifications(&self, room: &RoomId, limit: usize) -> DbResult<Vec<(u64, EventNotifications)>> {
        self.bucket_scan(Table::Notifications, room, None, Bound::Unbounded, Bound::Unbounded, true, limit)?
            .into_iter()
            .map(|(pos, v)| Ok((pos, decode(Table::Notifications, &v)?)))
            .collect()
    }

    /// The events after position `after` that notified `user` in a room,
    /// in timeline order, from their notification rows. At most `limit`
    /// rows are read.
    pub fn notified_rows_after(&self, room: &RoomId, user: &UserId, after: u64, limit: usize) -> DbResult<Vec<Notified>> {
        let index = self.notify_index(room, user)?;
        let mut out = Vec::new();
        for (pos, v) in self.bucket_scan(Table::Notifications, room, None, Bound::Excluded(after), Bound::Unbounded, false, limit)? {
            let notes: EventNotifications = decode(Table::Notifications, &v)?;
            if let Some(highlight) = notes.notified(user, index) {
                out.push(Notified { pos, highlight, thread: notes.thread });
            }
        }
        Ok(out)
    }

    /// The highest event position the user's read receipts for one part
    /// of a room reached (0 when none). A part is read up to the higher of
    /// its own floor and the unthreaded one.
    pub fn read_floor(&self, room: &RoomId, user: &UserId, part: ReadPart<'_>) -> DbResult<u64> {
        let row = self.store.get(Table::ReadFloors, room.as_bytes(), &read_floor_ck(user, part))?;
        Ok(row.and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok()).map(u64::from_be_bytes).unwrap_or(0))
    }

    pub fn read_floor_write(room: &RoomId, user: &UserId, part: ReadPart<'_>, pos: u64) -> Write {
        Write::put(Table::ReadFloors, room.as_bytes(), read_floor_ck(user, part), pos.to_be_bytes().to_vec())
    }

    pub fn receipt(&self, room: &RoomId, kind: &str, thread: &str, user: &UserId) -> DbResult<Option<Receipt>> {
        self.get_json(Table::Receipts, room.as_bytes(), &Db::receipt_ck(kind, thread, user))
    }

    /// The inbox partition of one device.
    pub fn inbox_key(user: &UserId, device: &str) -> Vec<u8> {
        [user.as_bytes(), b"\0", device.as_bytes()].concat()
    }

    /// Stages the deletion of every message of a device's inbox written by
    /// `shard` at positions up to `upto`: one range, so a busy inbox leaves
    /// one range tombstone per acknowledgement, not one per message.
    pub fn inbox_ack_write(user: &UserId, device: &str, shard: u16, upto: u64) -> Write {
        let from = [&shard.to_be_bytes()[..], &0u64.to_be_bytes(), &0u32.to_be_bytes()].concat();
        let to = [&shard.to_be_bytes()[..], &upto.to_be_bytes(), &u32::MAX.to_be_bytes()].concat();
        Write::delete_range(Table::ToDevice, Db::inbox_key(user, device), from, to)
    }

    /// Stages a to-device message for a device's inbox.
    pub fn to_device_write(user: &UserId, device: &str, shard: u16, pos: u64, index: u32, message: &Value) -> Write {
        let mut ck = Vec::with_capacity(INBOX_CK_LEN);
        ck.extend_from_slice(&shard.to_be_bytes());
        ck.extend_from_slice(&pos.to_be_bytes());
        ck.extend_from_slice(&index.to_be_bytes());
        Write::put(Table::ToDevice, Db::inbox_key(user, device), ck, encode(message))
    }

    /// Messages in a device's inbox: (shard, position, clustering key, message).
    pub fn inbox(&self, user: &UserId, device: &str, limit: usize) -> DbResult<Vec<InboxMessage>> {
        let rows = self.scan_json::<Value>(Scan::partition(Table::ToDevice, &Db::inbox_key(user, device), limit))?;
        Ok(rows
            .into_iter()
            .filter_map(|(ck, v)| {
                let shard = u16::from_be_bytes(ck.get(0..2)?.try_into().ok()?);
                let pos = u64::from_be_bytes(ck.get(2..10)?.try_into().ok()?);
                Some((shard, pos, ck, v))
            })
            .collect())
    }

    /// The users who ignore `user` (at most `limit`).
    pub fn ignored_by(&self, user: &UserId, limit: usize) -> DbResult<Vec<OwnedUserId>> {
        let rows = self.scan_json::<Value>(Scan::partition(Table::IgnoredBy, user.as_bytes(), limit))?;
        Ok(rows.into_iter().filter_map(|(ck, _)| String::from_utf8(ck).ok().and_then(|u| OwnedUserId::try_from(u).ok())).collect())
    }

    /// Stages the rows that move `ignorer`'s ignored users from `old` to
    /// `new`.
    pub fn ignore_writes(ignorer: &UserId, old: &HashSet<OwnedUserId>, new: &HashSet<OwnedUserId>) -> Vec<Write> {
        let added = new.difference(old).map(|u| Write::put(Table::IgnoredBy, u.as_bytes(), ignorer.as_bytes(), b"{}".to_vec()));
        let removed = old.difference(new).map(|u| Write::delete(Table::IgnoredBy, u.as_bytes(), ignorer.as_bytes()));
        added.chain(removed).collect()
    }

    /// Stores a content report (`kind`: event, room or user) under the day
    /// it arrived, for moderators.
    pub fn put_report(&self, kind: &str, received_ms: u64, reporter: &UserId, target: &str, report: &Value) -> DbResult<()> {
        let day = u32::try_from(received_ms / 86_400_000).unwrap_or(u32::MAX);
        let pk = [kind.as_bytes(), b"\0", &day.to_be_bytes()].concat();
        let ck = [&received_ms.to_be_bytes()[..], b"\0", reporter.as_bytes(), b"\0", target.as_bytes()].concat();
        Ok(self.store.write(vec![Write::put(Table::Reports, pk, ck, encode(report))])?)
    }

    /// The reports of one kind that arrived on one day (days since the
    /// epoch), oldest first.
    pub fn reports(&self, kind: &str, day: u32, limit: usize) -> DbResult<Vec<Value>> {
        let pk = [kind.as_bytes(), b"\0", &day.to_be_bytes()].concat();
        Ok(self.scan_json::<Value>(Scan::partition(Table::Reports, &pk, limit))?.into_iter().map(|(_, v)| v).collect())
    }

    pub fn put_openid_token(&self, token: &str, user: &UserId, expires_ms: u64) -> DbResult<()> {
        let record = serde_json::json!({ "user_id": user, "expires_ms": expires_ms });
        Ok(self.store.write(vec![Write::put(Table::OpenIdTokens, token.as_bytes(), b"".to_vec(), encode(&record))])?)
    }

    pub fn meta(&self, key: &str) -> DbResult<Option<Value>> {
        self.get_json(Table::Meta, key.as_bytes(), b"")
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::storage::Durability;
    use crate::storage::embedded::Embedded;

    fn db(name: &str) -> (Db, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("tessera-db-{name}-{}-{}", std::process::id(), rand::random::<u32>()));
        let _ = std::fs::remove_dir_all(&dir);
        (Db::new(Arc::new(Embedded::open(&dir, Durability::Process, 8 << 20, 1 << 20).expect("open"))), dir)
    }

    /// A state row; member rows written the old way (`legacy`) carry no
    /// membership and are answered from their event.
    fn state(room: &RoomId, kind: &str, key: &str, membership: Option<&str>, legacy: bool, pos: u64) -> Vec<Write> {
        let id = OwnedEventId::try_from(format!("$e{pos}:x")).expect("id");
        let content = membership.map_or(json!({ "v": pos }), |m| json!({ "membership": m }));
        let pdu = json!({ "room_id": room, "sender": "@a:x", "origin_server_ts": 1, "type": kind, "state_key": key, "content": content, "prev_events": [], "auth_events": [], "depth": pos });
        let stored = StoredEvent { json: serde_json::value::to_raw_value(&pdu).expect("raw"), pos, txn: None, redacted_by: None, redacted_because: None, prev_content: None, prev_sender: None, replaces_state: None };
        let entry = StateEntry { event_id: id.clone(), pos, membership: if legacy { None } else { membership.map(str::to_owned) } };
        vec![Write::put(Table::Events, id.as_bytes(), b"".to_vec(), encode(&stored)), Write::put(Table::RoomState, room.as_bytes(), state_ck(kind, key), encode(&entry))]
    }

    #[test]
    fn member_lists_and_lazy_state_agree_with_the_full_state() {
        let (db, dir) = db("state");
        let room = RoomId::parse("!r:x").expect("room");
        let mut writes = Vec::new();
        let mut pos = 0;
        let mut next = || {
            pos += 1;
            pos
        };
        for (kind, key) in [("m.room.create", ""), ("m.room.name", ""), ("m.room.memberz", "x"), ("m.room.membe", "y"), ("a.first", "k"), ("z.last", "")] {
            writes.extend(state(&room, kind, key, None, false, next()));
        }
        let people = [("@j1:x", "join", false), ("@j2:x", "join", true), ("@i1:x", "invite", false), ("@l1:x", "leave", true), ("@b1:x", "ban", false)];
        for (user, m, legacy) in people {
            writes.extend(state(&room, "m.room.member", user, Some(m), legacy, next()));
        }
        db.store.write(writes).expect("write");

        let mut all = db.memberships(&room, 100).expect("memberships");
        all.sort();
        let mut expected: Vec<(String, String)> = people.iter().map(|(u, m, _)| (u.to_string(), m.to_string())).collect();
        expected.sort();
        assert_eq!(all, expected);
        assert_eq!(db.members(&room, "join", 100).expect("members"), vec!["@j1:x".to_string(), "@j2:x".to_string()]);

        let full = db.room_state(&room, 100).expect("state");
        let wanted = ["@j2:x", "@i1:x", "@nobody:x"];
        let mut lazy: Vec<(String, String)> = db.room_state_of_members(&room, wanted, 100).expect("lazy").into_iter().map(|(k, _)| k).collect();
        lazy.sort();
        let mut from_full: Vec<(String, String)> = full.into_iter().map(|(k, _)| k).filter(|(kind, key)| kind != "m.room.member" || wanted.contains(&key.as_str())).collect();
        from_full.sort();
        assert_eq!(lazy, from_full);
        assert_eq!(lazy.len(), 8);
        assert_eq!(db.room_state_of_members(&room, wanted, 3).expect("bounded").len(), 3, "the limit holds");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Stored unread counts: rows and heads written before unread rounds
    /// read as they were; with a round, the notification rows after the
    /// round (or after the row's own position, when later) are added.
    #[test]
    fn unread_counts_add_the_notifications_after_the_round() {
        let (db, dir) = db("unread");
        let room = RoomId::parse("!r:x").expect("room");
        let (bob, carol) = (UserId::parse("@bob:x").expect("bob"), UserId::parse("@carol:x").expect("carol"));
        let note = |pos: u64, users: &[(&UserId, bool)]| {
            let by_index: Vec<(u32, bool)> = users.iter().map(|(u, h)| (u32::from(*u == carol), *h)).collect();
            Db::notifications_write(&room, pos, pos, &EventNotifications::new(format!("$n{pos}:x"), 1, &by_index, None))
        };
        let head = |round: Option<UnreadRound>| {
            let head = RoomHead { version: "11".into(), creator: "@a:x".into(), extremities: vec![], depth: 1, shard: 0, last_event_pos: 6, last_receipt_pos: 0, last_typing_pos: 0, timeline_len: 7, unread_round: round, notify_members: 0, threads: 0, edits: 0, references: 0, restricted_history: false, erased: vec![] };
            Write::put(Table::Rooms, room.as_bytes(), b"".to_vec(), encode(&head))
        };
        let get = |user: &UserId| db.unread(user, &room).map(|c| (c.notifications, c.highlights)).expect("unread");
        // Before rounds: a row of bare counts, exact, whatever rows follow.
        let legacy = Write::put(Table::Unread, bob.as_bytes(), room.as_bytes(), br#"{"notifications":3,"highlights":1}"#.to_vec());
        let mut writes = vec![legacy, head(None), Db::notify_index_write(&room, &bob, 0), Db::notify_index_write(&room, &carol, 1), note(4, &[(&bob, false)]), note(5, &[(&bob, true), (&carol, false)]), note(6, &[(&carol, false)])];
        db.store.write(std::mem::take(&mut writes)).expect("write");
        assert_eq!(get(&bob), (3, 1));
        assert_eq!(get(&carol), (0, 0));
        // A round at 4: the legacy row is exact there, rows 5 and 6 add.
        db.store.write(vec![head(Some(UnreadRound { pos: 4, seq: 5 }))]).expect("write");
        assert_eq!(get(&bob), (4, 2));
        assert_eq!(get(&carol), (2, 0));
        // A row of its own position (a receipt at 5) counts from there.
        db.store.write(vec![Db::unread_write(&bob, &room, &Unread::default(), 5)]).expect("write");
        assert_eq!(get(&bob), (0, 0));
        db.store.write(vec![note(7, &[(&bob, true)])]).expect("write");
        assert_eq!(get(&bob), (1, 1));
        // A later round makes older rows exact only at it: nothing counted twice.
        db.store.write(vec![Db::unread_write(&carol, &room, &Unread { notifications: 2, ..Unread::default() }, 7), head(Some(UnreadRound { pos: 7, seq: 8 }))]).expect("write");
        assert_eq!(get(&carol), (2, 0));
        let indexes = db.notify_indexes(&room, 10).expect("indexes");
        assert_eq!(indexes, vec![(0, bob.to_owned()), (1, carol.to_owned())]);
        assert_eq!(db.room_head(&room).expect("head").map(|h| h.timeline_len), Some(7), "the head row is apart from the indexes");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Unread counts keep each thread's share apart: the main timeline has
    /// the rest, and one part is set without touching the others.
    #[test]
    fn unread_counts_keep_threads_apart() {
        let mut u = Unread::default();
        u.add(None, false);
        u.add(Some("$t1"), true);
        u.add(Some("$t1"), false);
        u.add(Some("$t2"), false);
        assert_eq!((u.notifications, u.highlights), (4, 1));
        assert_eq!(u.main(), Counts { notifications: 1, highlights: 0 });
        assert_eq!(u.threads["$t1"], Counts { notifications: 2, highlights: 1 });
        let mut v = u.clone();
        v.merge(&u);
        assert_eq!((v.notifications, v.main().notifications, v.threads["$t2"].notifications), (8, 2, 2));
        // Reading thread 1 leaves the main timeline and thread 2.
        u.set(ReadPart::Thread("$t1"), Counts::default());
        assert_eq!((u.notifications, u.highlights, u.threads.len()), (2, 0, 1));
        assert_eq!(u.main().notifications, 1);
        // Reading the main timeline leaves thread 2.
        u.set(ReadPart::Main, Counts { notifications: 0, highlights: 0 });
        assert_eq!((u.notifications, u.threads["$t2"].notifications), (1, 1));
        u.set(ReadPart::All, Counts::default());
        assert_eq!(u, Unread::default());
        // Threads past the cap count towards the main timeline.
        let mut many = Unread::default();
        for i in 0..UNREAD_THREADS_MAX + 5 {
            many.add(Some(&format!("$t{i}")), false);
        }
        assert_eq!((many.threads.len(), many.main().notifications), (UNREAD_THREADS_MAX, 5));
        // Reading one of those leaves the counts: they are the main timeline's.
        let before = many.clone();
        many.set(ReadPart::Thread(&format!("$t{}", UNREAD_THREADS_MAX + 1)), Counts { notifications: 1, highlights: 0 });
        assert_eq!(many, before);
        many.set(ReadPart::Thread("$t0"), Counts::default());
        assert_eq!((many.notifications, many.threads.len()), (UNREAD_THREADS_MAX as u64 + 4, UNREAD_THREADS_MAX - 1));
        // A stored row keeps the threads; rows without them still read.
        let row: UnreadRow = serde_json::from_slice(&encode(&UnreadRow::new(&v, 3))).expect("row");
        assert_eq!((row.threads, row.at), (v.threads.clone(), Some(3)));
        let old: UnreadRow = serde_json::from_str(r#"{"notifications":3,"highlights":1}"#).expect("old row");
        assert!(old.threads.is_empty());
        assert_eq!([ReadPart::of(""), ReadPart::of("main"), ReadPart::of("$r")], [ReadPart::All, ReadPart::Main, ReadPart::Thread("$r")]);
    }

    /// Notification rows name members by index in a bitmap; rows written
    /// with user ids still read.
    #[test]
    fn notification_rows_name_members_by_index() {
        let ids = ["@bob:x", "@carol:y", "@dave:x"].map(|u| UserId::parse(u).expect("user"));
        let row = EventNotifications::new("$e:x".into(), 5, &[(0, false), (9, true), (17, false)], None);
        let row: EventNotifications = serde_json::from_slice(&encode(&row)).expect("round trip");
        assert_eq!(row.members(), (vec![0, 9, 17], vec![]));
        assert_eq!([0, 9, 17, 1, 8, 10, 16, 18, 400].map(|i| row.notified(&ids[0], Some(i))), [Some(false), Some(true), Some(false), None, None, None, None, None, None]);
        assert_eq!(row.notified(&ids[0], None), None);
        assert_eq!(EventNotifications::new("$e:x".into(), 5, &[], None).members(), (vec![], vec![]));
        let old: EventNotifications = serde_json::from_str(r#"{"event_id":"$e:x","ts":5,"users":[["@dave:x",true]]}"#).expect("old row");
        assert_eq!(ids.iter().map(|u| old.notified(u, Some(0))).collect::<Vec<_>>(), vec![None, None, Some(true)]);
        assert_eq!(old.members(), (vec![], vec![ids[2].clone()]));
    }

    /// Reports are kept by kind and day, oldest first; two reports by one
    /// user in the same millisecond are both kept when their targets differ.
    #[test]
    fn reports_are_kept_by_kind_and_day() {
        let (db, dir) = db("reports");
        let (bob, carol) = (UserId::parse("@bob:x").expect("bob"), UserId::parse("@carol:x").expect("carol"));
        let day_ms = 86_400_000u64;
        let at = 20_000 * day_ms + 5;
        db.put_report("event", at, &bob, "$b:x", &serde_json::json!({ "n": 2 })).expect("put");
        db.put_report("event", at, &bob, "$a:x", &serde_json::json!({ "n": 1 })).expect("put");
        db.put_report("event", at - 1, &carol, "$a:x", &serde_json::json!({ "n": 0 })).expect("put");
        db.put_report("event", at + day_ms, &bob, "$c:x", &serde_json::json!({ "n": 3 })).expect("put");
        db.put_report("user", at, &bob, "@carol:x", &serde_json::json!({ "n": 4 })).expect("put");
        let n = |v: Vec<Value>| v.iter().map(|r| r["n"].as_u64().expect("n")).collect::<Vec<_>>();
        assert_eq!(n(db.reports("event", 20_000, 10).expect("reports")), [0, 1, 2]);
        assert_eq!(n(db.reports("event", 20_001, 10).expect("reports")), [3]);
        assert_eq!(n(db.reports("user", 20_000, 10).expect("reports")), [4]);
        assert!(db.reports("room", 20_000, 10).expect("reports").is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn deleting_all_account_data_spares_other_users() {
        let (db, dir) = db("account-data");
        let (a, b) = (UserId::parse("@a:x").expect("user"), UserId::parse("@b:x").expect("user"));
        let room = RoomId::parse("!r:x").expect("room");
        let entry = AccountDataEntry { content: json!({ "k": 1 }), shard: 0, pos: 1 };
        for user in [&a, &b] {
            db.put_account_data(user, None, "m.push_rules", &entry, vec![]).expect("put");
            db.put_account_data(user, None, "\u{10ffff}odd.type", &entry, vec![]).expect("put");
            db.put_account_data(user, Some(&room), "m.tag", &entry, vec![]).expect("put");
        }
        db.store.write(vec![Db::all_account_data_delete(&a)]).expect("delete");
        assert!(db.all_account_data(&a, 100).expect("read").is_empty());
        assert_eq!(db.all_account_data(&b, 100).expect("read").len(), 3);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_live_presence_list_pages_in_user_order() {
        let (db, dir) = db("presence-live");
        let users: Vec<OwnedUserId> = (0..7).map(|i| OwnedUserId::try_from(format!("@u{i}:x")).expect("user")).collect();
        db.store.write(users.iter().map(|u| Db::presence_live_write(u, true)).collect()).expect("list");
        db.store.write(vec![Db::presence_live_write(&users[3], false)]).expect("unlist");
        let mut seen = Vec::new();
        let mut after: Option<OwnedUserId> = None;
        loop {
            let page = db.presence_live(after.as_deref(), 2).expect("page");
            seen.extend(page.iter().cloned());
            match page.last() {
                Some(last) if page.len() == 2 => after = Some(last.clone()),
                _ => break,
            }
        }
        let expected: Vec<OwnedUserId> = users.iter().filter(|u| *u != &users[3]).cloned().collect();
        assert_eq!(seen, expected);
        let _ = std::fs::remove_dir_all(dir);
    }
}
