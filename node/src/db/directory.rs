//! The room directory (published rooms) and the user directory, spread over
//! [`DIRECTORY_PARTITIONS`] partitions each by a stable hash of the id, so
//! neither is one hot, unbounded partition. Listing merges the partitions'
//! ordered scans, so callers still see one list in id order.
//!
//! Older stores kept each directory in one partition (`rooms`, `users`);
//! [`Db::upgrade_layout`] moves those rows on start.

use std::ops::Bound;

use ruma::{RoomId, UserId};
use serde_json::Value;

use super::{Db, DbResult, decode, encode};
use crate::storage::{Scan, Table, Write};

/// Partitions per directory. Part of the stored layout (ids are placed by
/// hash modulo this), so a constant.
pub const DIRECTORY_PARTITIONS: u8 = 16;

/// The single partitions of the layout before hashing.
const LEGACY_ROOMS: &[u8] = b"rooms";
const LEGACY_USERS: &[u8] = b"users";

/// Meta key recording the data layout version of the store.
const LAYOUT_KEY: &str = "layout_version";
/// Layout 1: hashed directory partitions.
const LAYOUT_VERSION: u64 = 1;
/// Rows moved per batch by the upgrade.
const UPGRADE_BATCH: usize = 500;

/// 64-bit FNV-1a: stable across versions and platforms (the layout depends
/// on it), cheap for short ids.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// The partition key of directory `kind` (`rooms`/`users`) holding `id`.
fn partition(kind: &[u8], id: &[u8]) -> Vec<u8> {
    let slot = (fnv1a(id) % u64::from(DIRECTORY_PARTITIONS)) as u8;
    partition_at(kind, slot)
}

fn partition_at(kind: &[u8], slot: u8) -> Vec<u8> {
    [kind, b"\0", &[slot]].concat()
}

impl Db {
    /// Brings the store's data layout up to date; idempotent, resumable
    /// after a crash (each batch moves rows atomically, and a moved row is
    /// gone from the old partition).
    pub fn upgrade_layout(&self) -> DbResult<()> {
        let version = self.meta(LAYOUT_KEY)?.and_then(|v| v.as_u64()).unwrap_or(0);
        if version >= LAYOUT_VERSION {
            return Ok(());
        }
        for legacy in [LEGACY_ROOMS, LEGACY_USERS] {
            loop {
                let rows = self.store.scan(Scan::partition(Table::Directory, legacy, UPGRADE_BATCH))?;
                if rows.is_empty() {
                    break;
                }
                let mut writes = Vec::with_capacity(rows.len() * 2);
                for (id, value) in rows {
                    writes.push(Write::put(Table::Directory, partition(legacy, &id), id.to_vec(), value.to_vec()));
                    writes.push(Write::delete(Table::Directory, legacy.to_vec(), id.to_vec()));
                }
                self.store.write(writes)?;
            }
        }
        self.store.write(vec![Write::put(Table::Meta, LAYOUT_KEY.as_bytes().to_vec(), b"".to_vec(), encode(&LAYOUT_VERSION))])?;
        Ok(())
    }

    /// Up to `limit` rows of a hashed directory with ids after `after`, in
    /// id order: each partition's ordered scan, merged.
    fn directory_scan(&self, kind: &[u8], after: Option<&[u8]>, limit: usize) -> DbResult<Vec<(Vec<u8>, bytes::Bytes)>> {
        let mut all = Vec::new();
        for slot in 0..DIRECTORY_PARTITIONS {
            let pk = partition_at(kind, slot);
            let from = after.map_or(Bound::Unbounded, Bound::Excluded);
            all.extend(self.store.scan(Scan { table: Table::Directory, pk: &pk, from, to: Bound::Unbounded, reverse: false, limit })?.into_iter().map(|(k, v)| (k.to_vec(), v)));
        }
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        all.truncate(limit);
        Ok(all)
    }

    pub fn set_published(&self, room: &RoomId, public: bool) -> DbResult<()> {
        let pk = partition(LEGACY_ROOMS, room.as_bytes());
        let w = if public { Write::put(Table::Directory, pk, room.as_bytes(), b"".to_vec()) } else { Write::delete(Table::Directory, pk, room.as_bytes()) };
        Ok(self.store.write(vec![w])?)
    }

    pub fn is_published(&self, room: &RoomId) -> DbResult<bool> {
        Ok(self.store.get(Table::Directory, &partition(LEGACY_ROOMS, room.as_bytes()), room.as_bytes())?.is_some())
    }

    /// Published rooms after `after` (a room id), in id order.
    pub fn published_rooms(&self, after: Option<&str>, limit: usize) -> DbResult<Vec<String>> {
        Ok(self.directory_scan(LEGACY_ROOMS, after.map(str::as_bytes), limit)?.into_iter().map(|(k, _)| String::from_utf8_lossy(&k).into_owned()).collect())
    }

    /// Adds or updates a user in the user directory.
    pub fn put_directory_user(&self, user: &UserId, profile: &Value) -> DbResult<()> {
        Ok(self.store.write(vec![Write::put(Table::Directory, partition(LEGACY_USERS, user.as_bytes()), user.as_bytes(), encode(profile))])?)
    }

    /// Users of the directory in id order (bounded): (user id, profile).
    pub fn directory_users(&self, limit: usize) -> DbResult<Vec<(String, Value)>> {
        self.directory_scan(LEGACY_USERS, None, limit)?
            .into_iter()
            .map(|(k, v)| Ok((String::from_utf8_lossy(&k).into_owned(), decode(Table::Directory, &v)?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::storage::Durability;
    use crate::storage::embedded::Embedded;

    fn db(name: &str) -> (Db, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("tessera-directory-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        (Db::new(Arc::new(Embedded::open(&dir, Durability::Process, 8 << 20, 1 << 20).expect("open"))), dir)
    }

    #[test]
    fn hash_is_stable() {
        // The layout depends on these exact values.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn listing_merges_partitions_in_id_order_and_pages() {
        let (db, dir) = db("merge");
        let rooms: Vec<ruma::OwnedRoomId> = (0..100).map(|i| ruma::OwnedRoomId::try_from(format!("!r{i:03}:x")).expect("room")).collect();
        for r in &rooms {
            db.set_published(r, true).expect("publish");
        }
        db.set_published(&rooms[7], false).expect("unpublish");
        let slots: std::collections::BTreeSet<Vec<u8>> = rooms.iter().map(|r| partition(LEGACY_ROOMS, r.as_bytes())).collect();
        assert!(slots.len() > 8, "ids spread over the partitions");
        let mut expected: Vec<String> = rooms.iter().map(ToString::to_string).collect();
        expected.remove(7);
        let mut listed = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = db.published_rooms(after.as_deref(), 30).expect("page");
            if page.is_empty() {
                break;
            }
            after = page.last().cloned();
            listed.extend(page);
        }
        assert_eq!(listed, expected);
        assert!(!db.is_published(&rooms[7]).expect("get"));
        assert!(db.is_published(&rooms[8]).expect("get"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn upgrade_moves_the_single_partitions_once() {
        let (db, dir) = db("upgrade");
        let mut writes = Vec::new();
        for i in 0..1200 {
            writes.push(Write::put(Table::Directory, LEGACY_USERS.to_vec(), format!("@u{i:04}:x").into_bytes(), encode(&serde_json::json!({ "displayname": format!("U{i}") }))));
        }
        writes.push(Write::put(Table::Directory, LEGACY_ROOMS.to_vec(), b"!pub:x".to_vec(), b"".to_vec()));
        db.store.write(writes).expect("legacy rows");
        db.upgrade_layout().expect("upgrade");
        db.upgrade_layout().expect("second upgrade is a no-op");
        let users = db.directory_users(5000).expect("users");
        assert_eq!(users.len(), 1200);
        assert_eq!(users[0].0, "@u0000:x");
        assert_eq!(users[1199].1["displayname"], "U1199");
        assert!(db.is_published(<&RoomId>::try_from("!pub:x").expect("room")).expect("get"));
        assert!(db.store.scan(Scan::partition(Table::Directory, LEGACY_USERS, 10)).expect("scan").is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
