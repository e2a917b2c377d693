//! The storage interface: a wide-column shape every backend implements.
//!
//! Data lives in [`Table`]s. A row is addressed by a *partition key* and a
//! *clustering key*; rows of one partition are ordered by clustering key and
//! can be range-scanned. This is exactly what a CQL table with
//! `PRIMARY KEY ((pk), ck)` offers, so the ScyllaDB backend maps each table
//! one-to-one, and the embedded backend emulates it with ordered keys.
//!
//! **Invariant**: callers never assume atomicity across partitions except
//! through [`Store::write`], which the embedded backend applies atomically
//! and the CQL backend sends as a logged batch (eventually all-or-nothing).
//! Uniqueness (user ids, aliases, transaction ids) goes through
//! [`Store::insert_if_absent`], a lightweight transaction on CQL.
//!
//! **API boundary**: request handlers never use this module directly; they go
//! through the typed stores in `crate::db`, which own every key layout.

pub mod cql;
pub mod embedded;
#[cfg(test)]
pub mod conformance;

use std::ops::Bound;

use bytes::Bytes;

/// Every table the node stores. The discriminant names the embedded
/// keyspace and the CQL table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Table {
    /// Node-wide metadata (schema version, signing key). pk = name.
    Meta,
    /// pk = user id (localpart-qualified); ck = "" -> account record.
    Users,
    /// pk = access token -> (user, device, expiry).
    AccessTokens,
    /// pk = refresh token -> (user, device).
    RefreshTokens,
    /// pk = user id; ck = device id -> device record.
    Devices,
    /// pk = user id; ck = "" / room id + type -> account data content.
    AccountData,
    /// pk = user id; ck = filter id -> filter JSON.
    Filters,
    /// pk = user id; ck = (sender device, txn id) -> event id. Idempotency.
    Transactions,
    /// pk = event id -> stored event (PDU + metadata).
    Events,
    /// pk = room id (+ bucket, see `db::buckets`); ck = stream position -> event id.
    Timeline,
    /// pk = room id; ck = (type, state key) -> current state entry.
    RoomState,
    /// pk = room id; ck = "" -> room head (version, extremities, depth, positions).
    Rooms,
    /// pk = user id; ck = room id -> the user's membership in that room.
    UserRooms,
    /// pk = room id; ck = (receipt type, thread, user) -> receipt.
    Receipts,
    /// pk = alias -> room id.
    Aliases,
    /// pk = room id; ck = alias -> "" (aliases of a room).
    RoomAliases,
    /// pk = "rooms" / "users"; ck = room id / user id (published rooms, user directory).
    Directory,
    /// pk = user id; ck = room id -> unread notification counts.
    Unread,
    /// pk = user id; ck = "" -> presence record.
    Presence,
    /// pk = user id; ck = (kind, id) -> pusher JSON.
    Pushers,
    /// pk = shard index; ck = "" -> last written stream position.
    StreamHeads,
    /// pk = room id; ck = first stream position of a timeline bucket -> bucket number.
    TimelineBuckets,
    /// pk = token -> registration token record.
    RegistrationTokens,
    /// pk = room id (+ bucket, as the timeline); ck = stream position -> members the event notified.
    Notifications,
    /// pk = OpenID token -> (user, expiry).
    OpenIdTokens,
    /// pk = user id \0 device id; ck = (shard, stream position, index) -> to-device message.
    ToDevice,
    /// pk = user id; ck = device id -> signed device keys.
    DeviceKeys,
    /// pk = user id \0 device id; ck = algorithm:key id -> one-time key.
    OneTimeKeys,
    /// pk = user id \0 device id; ck = algorithm:key id -> claimer (exactly-once claims).
    ClaimedKeys,
    /// pk = user id \0 device id; ck = algorithm -> fallback key and its used flag.
    FallbackKeys,
    /// pk = user id; ck = usage (master, self_signing, user_signing) -> cross-signing key.
    CrossSigningKeys,
    /// pk = target user; ck = target key \0 signer user \0 signer key -> signature.
    KeySignatures,
    /// pk = watching user; ck = (shard, stream position, user) -> change kind.
    KeyChanges,
    /// pk = user id; ck = version (u64) -> backup version record.
    BackupVersions,
    /// pk = user id \0 version; ck = room id \0 session id -> backed-up session key.
    BackupKeys,
    /// pk = user id; ck = "" -> the user's dehydrated device.
    DehydratedDevices,
    /// pk = room id \0 parent event id; ck = stream position of the child
    /// -> the child's id, relation type and event type (`m.relates_to`).
    Relations,
    /// pk = kind (`event`, `room`, `user`) \0 day (u32 BE, days since the
    /// epoch); ck = received ms (u64 BE) \0 reporter \0 reported id -> the
    /// report.
    Reports,
    /// pk = room id -> ck = thread root event id -> the thread's summary;
    /// pk = room id \0 `latest` -> ck = position of the thread's latest
    /// reply (u64 BE) -> the root's id (threads by latest activity).
    Threads,
    /// pk = ignored user id; ck = id of a user who ignores them -> `{}`
    /// (`m.ignored_user_list`, read backwards when an event is counted).
    IgnoredBy,
    /// pk = room id; ck = user id \0 part -> the highest event position the
    /// user's read receipts for that part of the room reached (u64 BE); the
    /// part is empty for unthreaded receipts, `main`, or a thread root id.
    ReadFloors,
    /// pk = "users"; ck = user id -> "" (users whose stored presence is not
    /// offline; read at start to take over those a crash left online).
    /// One partition: it changes only when a user's presence does.
    PresenceLive,
}

impl Table {
    /// All tables, for backends that create them up front.
    pub const ALL: [Table; 42] = [
        Table::Meta,
        Table::Users,
        Table::AccessTokens,
        Table::RefreshTokens,
        Table::Devices,
        Table::AccountData,
        Table::Filters,
        Table::Transactions,
        Table::Events,
        Table::Timeline,
        Table::RoomState,
        Table::Rooms,
        Table::UserRooms,
        Table::Receipts,
        Table::Aliases,
        Table::RoomAliases,
        Table::Directory,
        Table::Unread,
        Table::Presence,
        Table::Pushers,
        Table::StreamHeads,
        Table::TimelineBuckets,
        Table::RegistrationTokens,
        Table::Notifications,
        Table::OpenIdTokens,
        Table::ToDevice,
        Table::DeviceKeys,
        Table::OneTimeKeys,
        Table::ClaimedKeys,
        Table::FallbackKeys,
        Table::CrossSigningKeys,
        Table::KeySignatures,
        Table::KeyChanges,
        Table::BackupVersions,
        Table::BackupKeys,
        Table::DehydratedDevices,
        Table::Relations,
        Table::Reports,
        Table::Threads,
        Table::IgnoredBy,
        Table::ReadFloors,
        Table::PresenceLive,
    ];

    /// The table's name in every backend.
    pub fn name(self) -> &'static str {
        match self {
            Table::Meta => "meta",
            Table::Users => "users",
            Table::AccessTokens => "access_tokens",
            Table::RefreshTokens => "refresh_tokens",
            Table::Devices => "devices",
            Table::AccountData => "account_data",
            Table::Filters => "filters",
            Table::Transactions => "transactions",
            Table::Events => "events",
            Table::Timeline => "timeline",
            Table::RoomState => "room_state",
            Table::Rooms => "rooms",
            Table::UserRooms => "user_rooms",
            Table::Receipts => "receipts",
            Table::Aliases => "aliases",
            Table::RoomAliases => "room_aliases",
            Table::Directory => "directory",
            Table::Unread => "unread",
            Table::Presence => "presence",
            Table::Pushers => "pushers",
            Table::StreamHeads => "stream_heads",
            Table::TimelineBuckets => "timeline_buckets",
            Table::RegistrationTokens => "registration_tokens",
            Table::Notifications => "notifications",
            Table::OpenIdTokens => "openid_tokens",
            Table::ToDevice => "to_device",
            Table::DeviceKeys => "device_keys",
            Table::OneTimeKeys => "one_time_keys",
            Table::ClaimedKeys => "claimed_keys",
            Table::FallbackKeys => "fallback_keys",
            Table::CrossSigningKeys => "cross_signing_keys",
            Table::KeySignatures => "key_signatures",
            Table::KeyChanges => "key_changes",
            Table::BackupVersions => "backup_versions",
            Table::BackupKeys => "backup_keys",
            Table::DehydratedDevices => "dehydrated_devices",
            Table::Relations => "relations",
            Table::Reports => "reports",
            Table::Threads => "threads",
            Table::IgnoredBy => "ignored_by",
            Table::ReadFloors => "read_floors",
            Table::PresenceLive => "presence_live",
        }
    }
}

/// One write of a [`Store::write`] batch.
#[derive(Clone, Debug)]
pub enum Write {
    /// Insert or overwrite a row.
    Put { table: Table, pk: Vec<u8>, ck: Vec<u8>, value: Vec<u8> },
    /// Delete a row (absent rows are fine).
    Delete { table: Table, pk: Vec<u8>, ck: Vec<u8> },
    /// Delete every row of one partition with `from <= ck <= to`: one range
    /// tombstone on CQL, where deleting row by row would leave a tombstone
    /// per row for later scans to wade through. A batch must not also write
    /// a row inside a range it deletes (refused, see [`check_batch`]).
    DeleteRange { table: Table, pk: Vec<u8>, from: Vec<u8>, to: Vec<u8> },
}

impl Write {
    /// The table the write goes to.
    pub fn table(&self) -> Table {
        match self {
            Write::Put { table, .. } | Write::Delete { table, .. } | Write::DeleteRange { table, .. } => *table,
        }
    }

    /// Shorthand for [`Write::Put`].
    pub fn put(table: Table, pk: impl Into<Vec<u8>>, ck: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Write::Put { table, pk: pk.into(), ck: ck.into(), value: value.into() }
    }

    /// Shorthand for [`Write::Delete`].
    pub fn delete(table: Table, pk: impl Into<Vec<u8>>, ck: impl Into<Vec<u8>>) -> Self {
        Write::Delete { table, pk: pk.into(), ck: ck.into() }
    }

    /// Shorthand for [`Write::DeleteRange`] (both ends included).
    pub fn delete_range(table: Table, pk: impl Into<Vec<u8>>, from: impl Into<Vec<u8>>, to: impl Into<Vec<u8>>) -> Self {
        Write::DeleteRange { table, pk: pk.into(), from: from.into(), to: to.into() }
    }
}

/// Refuses an empty partition key (CQL cannot store one); every backend
/// checks, so both behave the same.
pub fn check_pk(pk: &[u8]) -> StorageResult<()> {
    if pk.is_empty() {
        return Err(StorageError::Engine("empty partition key".into()));
    }
    Ok(())
}

/// Refuses a batch that writes a row inside a range the same batch deletes:
/// backends order such writes differently (CQL gives every write of a batch
/// one timestamp, and a tombstone wins a tie), so no order is promised.
/// Also refuses empty partition keys, as CQL does, in every backend.
pub fn check_batch(writes: &[Write]) -> StorageResult<()> {
    for w in writes {
        let (Write::Put { pk, .. } | Write::Delete { pk, .. } | Write::DeleteRange { pk, .. }) = w;
        check_pk(pk)?;
    }
    for w in writes {
        let Write::DeleteRange { table, pk, from, to } = w else { continue };
        let clash = writes.iter().any(|o| match o {
            Write::Put { table: t, pk: p, ck, .. } | Write::Delete { table: t, pk: p, ck } => t == table && p == pk && from <= ck && ck <= to,
            Write::DeleteRange { .. } => false,
        });
        if clash {
            return Err(StorageError::Engine(format!("a batch writes inside a range it deletes ({})", table.name())));
        }
    }
    Ok(())
}

/// A clustering-key range scan of one partition.
#[derive(Clone, Debug)]
pub struct Scan<'a> {
    pub table: Table,
    pub pk: &'a [u8],
    pub from: Bound<&'a [u8]>,
    pub to: Bound<&'a [u8]>,
    /// Descending clustering order when true.
    pub reverse: bool,
    /// The most rows returned; every scan is bounded.
    pub limit: usize,
}

impl<'a> Scan<'a> {
    /// A scan of a whole partition in ascending order.
    pub fn partition(table: Table, pk: &'a [u8], limit: usize) -> Self {
        Scan { table, pk, from: Bound::Unbounded, to: Bound::Unbounded, reverse: false, limit }
    }
}

/// A row returned by a scan: clustering key and value.
pub type Row = (Bytes, Bytes);

/// Errors every backend reports.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage engine error: {0}")]
    Engine(String),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    #[error("storage is unavailable: {0}")]
    Unavailable(String),
}

/// Result of a storage call.
pub type StorageResult<T> = Result<T, StorageError>;

/// How far a write has travelled before the call returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Handed to the operating system: survives the process being killed
    /// (SIGKILL), not a power loss.
    #[default]
    Process,
    /// Flushed to the disk (fsync): survives a power loss; each commit waits
    /// for the disk.
    Power,
}

/// The storage interface. Implementations are shared by every shard of a
/// node, so they are `Send + Sync`; each call is short and bounded.
pub trait Store: Send + Sync + 'static {
    /// Reads one row.
    fn get(&self, table: Table, pk: &[u8], ck: &[u8]) -> StorageResult<Option<Bytes>>;
    /// Scans part of one partition in clustering order.
    fn scan(&self, scan: Scan<'_>) -> StorageResult<Vec<Row>>;
    /// Applies writes; atomic on the embedded backend, a logged batch on CQL.
    fn write(&self, writes: Vec<Write>) -> StorageResult<()>;
    /// Inserts a row only if absent; returns the existing value otherwise.
    /// This is the only primitive that decides uniqueness.
    fn insert_if_absent(&self, table: Table, pk: &[u8], ck: &[u8], value: &[u8]) -> StorageResult<Option<Bytes>>;
    /// Flushes everything to disk (used at shutdown).
    fn flush(&self) -> StorageResult<()>;
}
