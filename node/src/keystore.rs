//! Typed storage of the key server: device keys, one-time and fallback
//! keys, cross-signing keys and signatures, device-list changes and
//! server-side key backups. Every key layout of these tables lives here.
//!
//! **Invariant**: a one-time key is handed out at most once. A claim first
//! wins a conditional insert into `ClaimedKeys` (a lightweight transaction
//! on CQL), then deletes the key; a key that was claimed is never uploaded
//! again, even when a client repeats an upload.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use ruma::UserId;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::db::{Db, DbResult, encode};
use crate::e2ee::BackupKey;
use crate::storage::{Scan, Table, Write};

/// Most devices read per user by key queries.
pub const DEVICES_PER_USER_MAX: usize = 10_000;
/// Most signature rows read per user.
const SIGNATURES_PER_USER_MAX: usize = 100_000;
/// One-time keys examined per claim before giving up on a contended device.
const CLAIM_SCAN: usize = 64;
/// Claimed-key rows read per page when an upload checks its key ids.
const CLAIMED_PAGE: usize = 1024;
/// Kinds of device-list change rows.
const CHANGED: &[u8] = b"changed";
const LEFT: &[u8] = b"left";
/// Device-list change rows are bucketed per watcher, writer shard and
/// `position >> KEY_CHANGE_BUCKET_BITS` (about a million positions).
const KEY_CHANGE_BUCKET_BITS: u32 = 20;
/// Most buckets one read walks per writer shard; a longer range (a very old
/// sync token) reports every co-member as changed instead.
const KEY_CHANGE_BUCKETS_MAX: u64 = 16;
/// Meta key of the per-shard positions up to which change rows may still be
/// in the layout before buckets (one partition per watcher).
const KEY_CHANGE_FLOORS: &str = "key_changes_bucketed_from";

/// Device-list changes for a watcher between two tokens.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct KeyChanges {
    pub changed: BTreeSet<String>,
    /// Users who stopped sharing a room (candidates: the caller checks).
    pub left: BTreeSet<String>,
    /// The range was too long to read: the caller must treat everyone who
    /// shares a room with the watcher as changed.
    pub too_old: bool,
}

fn key_change_pk(watcher: &UserId, shard: u16, bucket: u64) -> Vec<u8> {
    [watcher.as_bytes(), b"\0", &shard.to_be_bytes(), &bucket.to_be_bytes()].concat()
}

fn key_change_row(watcher: &UserId, shard: u16, pos: u64, user: &UserId, kind: &[u8]) -> Write {
    let ck = [&pos.to_be_bytes()[..], user.as_bytes()].concat();
    Write::put(Table::KeyChanges, key_change_pk(watcher, shard, pos >> KEY_CHANGE_BUCKET_BITS), ck, kind.to_vec())
}

/// A device's fallback key for one algorithm.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FallbackKey {
    pub key_id: String,
    pub key: Value,
    pub used: bool,
}

/// A server-side backup version.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackupVersion {
    pub algorithm: String,
    pub auth_data: Value,
    /// Bumped on every change of the version's keys.
    pub etag: u64,
    pub count: u64,
    pub deleted: bool,
}

/// The partition of a device's one-time, claimed and fallback keys.
pub fn device_pk(user: &UserId, device: &str) -> Vec<u8> {
    [user.as_bytes(), b"\0", device.as_bytes()].concat()
}

fn backup_pk(user: &UserId, version: u64) -> Vec<u8> {
    [user.as_bytes(), b"\0", &version.to_be_bytes()].concat()
}

fn backup_ck(room: &str, session: &str) -> Vec<u8> {
    [room.as_bytes(), b"\0", session.as_bytes()].concat()
}

/// Clustering key of a signature: target key, signer user, signer key id.
fn signature_ck(target: &str, signer: &str, signer_key: &str) -> Vec<u8> {
    [target.as_bytes(), b"\0", signer.as_bytes(), b"\0", signer_key.as_bytes()].concat()
}

/// The exclusive upper bound of every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    end.push(0xff);
    end
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl Db {
    // ---- device keys

    pub fn device_keys(&self, user: &UserId, device: &str) -> DbResult<Option<Value>> {
        self.get_json(Table::DeviceKeys, user.as_bytes(), device.as_bytes())
    }

    /// Every device's keys of a user: (device id, keys).
    pub fn all_device_keys(&self, user: &UserId) -> DbResult<Vec<(String, Value)>> {
        Ok(self.scan_json::<Value>(Scan::partition(Table::DeviceKeys, user.as_bytes(), DEVICES_PER_USER_MAX))?.into_iter().map(|(k, v)| (text(&k), v)).collect())
    }

    pub fn device_keys_write(user: &UserId, device: &str, keys: &Value) -> Write {
        Write::put(Table::DeviceKeys, user.as_bytes(), device.as_bytes(), encode(keys))
    }

    /// Everything stored for a device's keys, to delete with the device.
    pub fn device_keys_deletes(&self, user: &UserId, device: &str) -> DbResult<Vec<Write>> {
        let pk = device_pk(user, device);
        let mut writes = vec![Write::delete(Table::DeviceKeys, user.as_bytes(), device.as_bytes())];
        for table in [Table::OneTimeKeys, Table::ClaimedKeys, Table::FallbackKeys] {
            for (ck, _) in self.store.scan(Scan::partition(table, &pk, usize::MAX))? {
                writes.push(Write::delete(table, pk.clone(), ck.to_vec()));
            }
        }
        let prefix = [device.as_bytes(), b"\0"].concat();
        let end = prefix_end(&prefix);
        let scan = Scan { table: Table::KeySignatures, pk: user.as_bytes(), from: Bound::Included(&prefix), to: Bound::Excluded(&end), reverse: false, limit: SIGNATURES_PER_USER_MAX };
        for (ck, _) in self.store.scan(scan)? {
            writes.push(Write::delete(Table::KeySignatures, user.as_bytes(), ck.to_vec()));
        }
        Ok(writes)
    }

    // ---- one-time keys

    /// Unclaimed one-time keys of a device: (`algorithm:key id`, key).
    pub fn one_time_keys(&self, user: &UserId, device: &str, limit: usize) -> DbResult<Vec<(String, Value)>> {
        Ok(self.scan_json::<Value>(Scan::partition(Table::OneTimeKeys, &device_pk(user, device), limit))?.into_iter().map(|(k, v)| (text(&k), v)).collect())
    }

    /// Counts of unclaimed one-time keys by algorithm (always naming
    /// `signed_curve25519`, which clients watch).
    pub fn one_time_key_counts(&self, user: &UserId, device: &str, limit: usize) -> DbResult<BTreeMap<String, u64>> {
        let mut counts = BTreeMap::from([("signed_curve25519".to_owned(), 0)]);
        for (ck, _) in self.store.scan(Scan::partition(Table::OneTimeKeys, &device_pk(user, device), limit))? {
            let id = text(&ck);
            let algorithm = id.split_once(':').map_or(id.as_str(), |(a, _)| a).to_owned();
            *counts.entry(algorithm).or_default() += 1;
        }
        Ok(counts)
    }

    /// Which of `ids` were claimed (within the claimed-key expiry): one
    /// range scan from the first id to the last, in pages, instead of one
    /// read per key.
    pub fn claimed_among(&self, user: &UserId, device: &str, ids: &BTreeSet<&str>) -> DbResult<BTreeSet<String>> {
        self.claimed_among_paged(user, device, ids, CLAIMED_PAGE)
    }

    pub(crate) fn claimed_among_paged(&self, user: &UserId, device: &str, ids: &BTreeSet<&str>, page: usize) -> DbResult<BTreeSet<String>> {
        let (Some(first), Some(last)) = (ids.first(), ids.last()) else { return Ok(BTreeSet::new()) };
        let pk = device_pk(user, device);
        let mut claimed = BTreeSet::new();
        let mut from = first.as_bytes().to_vec();
        loop {
            let scan = Scan { table: Table::ClaimedKeys, pk: &pk, from: Bound::Included(&from), to: Bound::Included(last.as_bytes()), reverse: false, limit: page };
            let rows = self.store.scan(scan)?;
            claimed.extend(rows.iter().map(|(ck, _)| text(ck)).filter(|id| ids.contains(id.as_str())));
            match rows.last() {
                Some((ck, _)) if rows.len() == page => from = [ck.as_ref(), b"\0"].concat(),
                _ => return Ok(claimed),
            }
        }
    }

    /// Tells every shard's cache of key counts that some count changed.
    /// Called after the write and before its answer.
    pub fn key_counts_changed(&self) {
        self.key_count_changes.fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// The current count of key-count changes (see `key_counts_changed`).
    pub fn key_count_changes(&self) -> u64 {
        self.key_count_changes.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn one_time_key_write(user: &UserId, device: &str, id: &str, key: &Value) -> Write {
        Write::put(Table::OneTimeKeys, device_pk(user, device), id.as_bytes(), encode(key))
    }

    /// Claims one one-time key of `algorithm`; each key is returned to
    /// exactly one claimer, whatever the concurrency.
    pub fn claim_one_time_key(&self, user: &UserId, device: &str, algorithm: &str, claimer: &str) -> DbResult<Option<(String, Value)>> {
        let pk = device_pk(user, device);
        let prefix = format!("{algorithm}:").into_bytes();
        let end = prefix_end(&prefix);
        let mut from = prefix.clone();
        loop {
            let scan = Scan { table: Table::OneTimeKeys, pk: &pk, from: Bound::Included(&from), to: Bound::Excluded(&end), reverse: false, limit: CLAIM_SCAN };
            let rows = self.store.scan(scan)?;
            for (ck, value) in &rows {
                if self.store.insert_if_absent(Table::ClaimedKeys, &pk, ck, claimer.as_bytes())?.is_some() {
                    // Another claim won this key; it deletes it.
                    continue;
                }
                self.store.write(vec![Write::delete(Table::OneTimeKeys, pk.clone(), ck.to_vec())])?;
                self.key_counts_changed();
                let Ok(key) = serde_json::from_slice(value) else { continue };
                return Ok(Some((text(ck), key)));
            }
            if rows.len() < CLAIM_SCAN {
                return Ok(None);
            }
            let Some((last, _)) = rows.last() else { return Ok(None) };
            from = [last.as_ref(), b"\0"].concat();
        }
    }

    // ---- fallback keys

    pub fn fallback_keys(&self, user: &UserId, device: &str) -> DbResult<Vec<(String, FallbackKey)>> {
        Ok(self.scan_json(Scan::partition(Table::FallbackKeys, &device_pk(user, device), 64))?.into_iter().map(|(k, f)| (text(&k), f)).collect())
    }

    pub fn fallback_key_write(user: &UserId, device: &str, algorithm: &str, key: &FallbackKey) -> Write {
        Write::put(Table::FallbackKeys, device_pk(user, device), algorithm.as_bytes(), encode(key))
    }

    /// Returns the fallback key of `algorithm` and marks it used (it stays
    /// until the device replaces it).
    pub fn claim_fallback_key(&self, user: &UserId, device: &str, algorithm: &str) -> DbResult<Option<(String, Value)>> {
        let pk = device_pk(user, device);
        let Some(bytes) = self.store.get(Table::FallbackKeys, &pk, algorithm.as_bytes())? else { return Ok(None) };
        let Ok(mut key) = serde_json::from_slice::<FallbackKey>(&bytes) else { return Ok(None) };
        if !key.used {
            key.used = true;
            self.store.write(vec![Db::fallback_key_write(user, device, algorithm, &key)])?;
            self.key_counts_changed();
        }
        Ok(Some((key.key_id, key.key)))
    }

    // ---- cross-signing keys and signatures

    /// The user's cross-signing keys by usage name.
    pub fn cross_signing_keys(&self, user: &UserId) -> DbResult<BTreeMap<String, Value>> {
        Ok(self.scan_json::<Value>(Scan::partition(Table::CrossSigningKeys, user.as_bytes(), 8))?.into_iter().map(|(k, v)| (text(&k), v)).collect())
    }

    pub fn cross_signing_write(user: &UserId, usage: &str, key: &Value) -> Write {
        Write::put(Table::CrossSigningKeys, user.as_bytes(), usage.as_bytes(), encode(key))
    }

    /// Signatures others (or the user's other keys) made over a user's keys:
    /// (target key or device id, signer user, signer key id, signature).
    pub fn key_signatures(&self, user: &UserId) -> DbResult<Vec<(String, String, String, String)>> {
        let rows = self.store.scan(Scan::partition(Table::KeySignatures, user.as_bytes(), SIGNATURES_PER_USER_MAX))?;
        Ok(rows
            .into_iter()
            .filter_map(|(ck, v)| {
                let mut parts = ck.splitn(3, |b| *b == 0);
                let (target, signer, key) = (parts.next()?, parts.next()?, parts.next()?);
                Some((text(target), text(signer), text(key), text(&v)))
            })
            .collect())
    }

    pub fn signature_write(user: &UserId, target: &str, signer: &str, signer_key: &str, signature: &str) -> Write {
        Write::put(Table::KeySignatures, user.as_bytes(), signature_ck(target, signer, signer_key), signature.as_bytes().to_vec())
    }

    // ---- device-list changes

    /// Records, for `watcher`, that `user`'s keys changed at `shard`'s position `pos`.
    pub fn key_change_write(watcher: &UserId, shard: u16, pos: u64, user: &UserId) -> Write {
        key_change_row(watcher, shard, pos, user, CHANGED)
    }

    /// Records, for `watcher`, that `user` no longer shares a room with them.
    pub fn key_left_write(watcher: &UserId, shard: u16, pos: u64, user: &UserId) -> Write {
        key_change_row(watcher, shard, pos, user, LEFT)
    }

    /// Records, once, the stream heads at the first start with bucketed
    /// change rows: older rows are in the watcher's single partition.
    pub fn record_key_change_floors(&self, heads: &[u64]) -> DbResult<()> {
        if self.meta(KEY_CHANGE_FLOORS)?.is_none() {
            self.store.write(vec![Write::put(Table::Meta, KEY_CHANGE_FLOORS.as_bytes().to_vec(), b"".to_vec(), encode(&heads))])?;
        }
        Ok(())
    }

    fn key_change_floor(&self, shard: usize) -> DbResult<u64> {
        if let Some(floors) = self.key_change_floors.get() {
            return Ok(floors.get(shard).copied().unwrap_or(0));
        }
        let floors: Vec<u64> = self.get_json(Table::Meta, KEY_CHANGE_FLOORS.as_bytes(), b"")?.unwrap_or_default();
        let floor = floors.get(shard).copied().unwrap_or(0);
        let _ = self.key_change_floors.set(floors);
        Ok(floor)
    }

    /// Device-list changes for `watcher` between two position vectors
    /// (`since` exclusive, `upper` inclusive), read shard by shard and
    /// bucket by bucket.
    pub fn key_changes_and_left(&self, watcher: &UserId, since: &[u64], upper: &[u64], limit: usize) -> DbResult<KeyChanges> {
        let mut out = KeyChanges::default();
        let mut record = |user: &[u8], kind: &[u8]| {
            let user = text(user);
            if kind == LEFT { out.left.insert(user) } else { out.changed.insert(user) };
        };
        for (shard, &hi) in upper.iter().enumerate() {
            let lo = since.get(shard).copied().unwrap_or(0);
            if hi <= lo {
                continue;
            }
            let Ok(s) = u16::try_from(shard) else { continue };
            let (first, last) = ((lo + 1) >> KEY_CHANGE_BUCKET_BITS, hi >> KEY_CHANGE_BUCKET_BITS);
            if last - first >= KEY_CHANGE_BUCKETS_MAX {
                return Ok(KeyChanges { too_old: true, ..KeyChanges::default() });
            }
            // The clustering key is the position, then the user id: rows at
            // `hi` sort after `hi` alone, so the range ends before `hi + 1`.
            let from = (lo + 1).to_be_bytes();
            let end = hi.checked_add(1).map(u64::to_be_bytes);
            for bucket in first..=last {
                let pk = key_change_pk(watcher, s, bucket);
                let to = end.as_ref().map_or(Bound::Unbounded, |e| Bound::Excluded(&e[..]));
                for (ck, kind) in self.store.scan(Scan { table: Table::KeyChanges, pk: &pk, from: Bound::Included(&from), to, reverse: false, limit })? {
                    if let Some(user) = ck.get(8..) {
                        record(user, &kind);
                    }
                }
            }
            // Rows written before buckets existed: the watcher's one partition.
            let floor = self.key_change_floor(shard)?;
            if lo < floor {
                let legacy_from = [&s.to_be_bytes()[..], &(lo + 1).to_be_bytes()].concat();
                let legacy_to = [&s.to_be_bytes()[..], &(hi.min(floor).saturating_add(1)).to_be_bytes()].concat();
                let scan = Scan { table: Table::KeyChanges, pk: watcher.as_bytes(), from: Bound::Included(&legacy_from), to: Bound::Excluded(&legacy_to), reverse: false, limit };
                for (ck, kind) in self.store.scan(scan)? {
                    if let Some(user) = ck.get(10..) {
                        record(user, &kind);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Users whose keys changed for `watcher` between two position vectors
    /// (`None`: the range is too long to read).
    pub fn key_changes(&self, watcher: &UserId, since: &[u64], upper: &[u64], limit: usize) -> DbResult<Option<BTreeSet<String>>> {
        let changes = self.key_changes_and_left(watcher, since, upper, limit)?;
        Ok((!changes.too_old).then_some(changes.changed))
    }

    // ---- server-side key backup

    /// Every backup version of a user, newest first (deleted ones included).
    pub fn backup_versions(&self, user: &UserId, limit: usize) -> DbResult<Vec<(u64, BackupVersion)>> {
        let scan = Scan { table: Table::BackupVersions, pk: user.as_bytes(), from: Bound::Unbounded, to: Bound::Unbounded, reverse: true, limit };
        let rows = self.store.scan(scan)?;
        Ok(rows
            .into_iter()
            .filter_map(|(ck, v)| {
                let version = u64::from_be_bytes(ck.as_ref().try_into().ok()?);
                Some((version, serde_json::from_slice(&v).ok()?))
            })
            .collect())
    }

    pub fn backup_version(&self, user: &UserId, version: u64) -> DbResult<Option<BackupVersion>> {
        self.get_json(Table::BackupVersions, user.as_bytes(), &version.to_be_bytes())
    }

    /// Creates a version if that number is still free.
    pub fn create_backup_version(&self, user: &UserId, version: u64, record: &BackupVersion) -> DbResult<bool> {
        Ok(self.store.insert_if_absent(Table::BackupVersions, user.as_bytes(), &version.to_be_bytes(), &encode(record))?.is_none())
    }

    pub fn backup_version_write(user: &UserId, version: u64, record: &BackupVersion) -> Write {
        Write::put(Table::BackupVersions, user.as_bytes(), version.to_be_bytes().to_vec(), encode(record))
    }

    pub fn backup_key(&self, user: &UserId, version: u64, room: &str, session: &str) -> DbResult<Option<BackupKey>> {
        self.get_json(Table::BackupKeys, &backup_pk(user, version), &backup_ck(room, session))
    }

    pub fn backup_key_write(user: &UserId, version: u64, room: &str, session: &str, key: &BackupKey) -> Write {
        Write::put(Table::BackupKeys, backup_pk(user, version), backup_ck(room, session), encode(key))
    }

    pub fn backup_key_delete(user: &UserId, version: u64, room: &str, session: &str) -> Write {
        Write::delete(Table::BackupKeys, backup_pk(user, version), backup_ck(room, session))
    }

    /// Backed-up keys of a version, optionally of one room:
    /// (room id, session id, key).
    pub fn backup_keys(&self, user: &UserId, version: u64, room: Option<&str>, limit: usize) -> DbResult<Vec<(String, String, BackupKey)>> {
        let pk = backup_pk(user, version);
        let prefix = room.map(|r| [r.as_bytes(), b"\0"].concat());
        let end = prefix.as_deref().map(prefix_end);
        let scan = Scan {
            table: Table::BackupKeys,
            pk: &pk,
            from: prefix.as_deref().map_or(Bound::Unbounded, Bound::Included),
            to: end.as_deref().map_or(Bound::Unbounded, Bound::Excluded),
            reverse: false,
            limit,
        };
        Ok(self
            .store
            .scan(scan)?
            .into_iter()
            .filter_map(|(ck, v)| {
                let split = ck.iter().position(|b| *b == 0)?;
                let key = serde_json::from_slice(&v).ok()?;
                Some((text(&ck[..split]), text(&ck[split + 1..]), key))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests;
