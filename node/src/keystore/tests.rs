//! Key storage rules on the embedded backend: exactly-once one-time key
//! claims under concurrency, fallback keys, claimed keys never coming back,
//! and device-list change ranges.

use std::collections::BTreeSet;
use std::sync::Arc;

use proptest::prelude::*;
use ruma::{OwnedUserId, UserId};
use serde_json::json;

use super::*;
use crate::storage::Durability;
use crate::storage::embedded::Embedded;

fn db(name: &str) -> (Db, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("tessera-keystore-{name}-{}-{}", std::process::id(), rand::random::<u32>()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Embedded::open(&dir, Durability::Process, 8 << 20, 1 << 20).expect("open");
    (Db::new(Arc::new(store)), dir)
}

fn alice() -> OwnedUserId {
    UserId::parse("@alice:x").expect("user")
}

fn upload(db: &Db, user: &UserId, n: usize) {
    let writes = (0..n).map(|i| Db::one_time_key_write(user, "DEV", &format!("signed_curve25519:K{i:03}"), &json!({ "key": i }))).collect();
    db.store.write(writes).expect("upload");
}

#[test]
fn concurrent_claims_hand_out_each_key_once() {
    let (db, dir) = db("claims");
    let user = alice();
    upload(&db, &user, 100);
    let claimed: Vec<Option<String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let (db, user) = (db.clone(), user.clone());
                scope.spawn(move || (0..20).map(|_| db.claim_one_time_key(&user, "DEV", "signed_curve25519", &format!("t{t}")).expect("claim").map(|(id, _)| id)).collect::<Vec<_>>())
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("thread")).collect()
    });
    let got: Vec<String> = claimed.iter().flatten().cloned().collect();
    let distinct: BTreeSet<&String> = got.iter().collect();
    assert_eq!(got.len(), 100, "every key is handed out");
    assert_eq!(distinct.len(), 100, "no key twice");
    assert_eq!(claimed.iter().filter(|c| c.is_none()).count(), 60, "then nothing");
    assert_eq!(db.one_time_key_counts(&user, "DEV", 1000).expect("count")["signed_curve25519"], 0);
    // Checked in pages: every one of 100 claimed ids, and none outside them.
    let ids: Vec<String> = (0..101).map(|i| format!("signed_curve25519:K{i:03}")).collect();
    let asked: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
    let found = db.claimed_among_paged(&user, "DEV", &asked, 7).expect("claimed");
    assert_eq!(found.len(), 100);
    assert!(found.contains("signed_curve25519:K000") && found.contains("signed_curve25519:K099") && !found.contains("signed_curve25519:K100"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn claims_take_only_the_asked_algorithm_and_fallback_stays() {
    let (db, dir) = db("fallback");
    let user = alice();
    db.store
        .write(vec![
            Db::one_time_key_write(&user, "DEV", "curve25519:A", &json!("a")),
            Db::fallback_key_write(&user, "DEV", "signed_curve25519", &FallbackKey { key_id: "signed_curve25519:F".into(), key: json!({ "key": "f" }), used: false }),
        ])
        .expect("write");
    assert_eq!(db.claim_one_time_key(&user, "DEV", "signed_curve25519", "c").expect("claim"), None);
    for _ in 0..2 {
        let (id, _) = db.claim_fallback_key(&user, "DEV", "signed_curve25519").expect("fallback").expect("a fallback key");
        assert_eq!(id, "signed_curve25519:F");
    }
    assert!(db.fallback_keys(&user, "DEV").expect("read")[0].1.used, "marked used, not deleted");
    assert_eq!(db.claim_one_time_key(&user, "DEV", "curve25519", "c").expect("claim").map(|(id, _)| id).as_deref(), Some("curve25519:A"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn deleting_a_device_removes_all_its_keys() {
    let (db, dir) = db("delete");
    let user = alice();
    upload(&db, &user, 3);
    db.store
        .write(vec![
            Db::device_keys_write(&user, "DEV", &json!({ "device_id": "DEV" })),
            Db::signature_write(&user, "DEV", "@alice:x", "ed25519:SSK", "sig"),
            Db::signature_write(&user, "DEV2", "@alice:x", "ed25519:SSK", "other device"),
        ])
        .expect("write");
    db.claim_one_time_key(&user, "DEV", "signed_curve25519", "c").expect("claim");
    db.store.write(db.device_keys_deletes(&user, "DEV").expect("deletes")).expect("delete");
    assert_eq!(db.device_keys(&user, "DEV").expect("read"), None);
    assert!(db.one_time_keys(&user, "DEV", 10).expect("read").is_empty());
    assert!(db.claimed_among(&user, "DEV", &BTreeSet::from(["signed_curve25519:K000"])).expect("read").is_empty());
    let sigs = db.key_signatures(&user).expect("read");
    assert_eq!(sigs.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(), ["DEV2"], "only the deleted device's signatures go");
    let _ = std::fs::remove_dir_all(&dir);
}

/// One store for every property case (opening a store per case is slow);
/// each case watches with its own user.
/// Positions up to which each writer shard's rows are in the layout from
/// before buckets, in the shared store.
const FLOORS: [u64; 3] = [(3 << 20) - 5, 0, (1 << 20) + 7];

fn shared_db() -> &'static Db {
    static DB: std::sync::OnceLock<Db> = std::sync::OnceLock::new();
    DB.get_or_init(|| {
        let db = db("changes").0;
        db.record_key_change_floors(&FLOORS).expect("floors");
        db
    })
}

/// A change row as stores wrote it before buckets existed.
fn legacy_change_write(watcher: &UserId, shard: u16, pos: u64, user: &UserId) -> Write {
    let ck = [&shard.to_be_bytes()[..], &pos.to_be_bytes(), user.as_bytes()].concat();
    Write::put(Table::KeyChanges, watcher.as_bytes(), ck, CHANGED.to_vec())
}

proptest! {
    /// Changes are reported exactly in the token range (since, upper],
    /// shard by shard, across buckets and from rows written before buckets.
    #[test]
    fn key_changes_are_read_between_tokens(changes in proptest::collection::vec((0u16..3, 1u64..(5 << 20), 0usize..4), 0..30), since in proptest::collection::vec(0u64..(5 << 20), 3), span in proptest::collection::vec(0u64..(3 << 20), 3)) {
        let db = shared_db();
        let watcher = UserId::parse(format!("@w{}:x", rand::random::<u64>())).expect("user");
        let users: Vec<OwnedUserId> = (0..4).map(|i| UserId::parse(format!("@u{i}:x")).expect("user")).collect();
        let writes = changes
            .iter()
            .map(|&(s, p, u)| if p <= FLOORS[usize::from(s)] { legacy_change_write(&watcher, s, p, &users[u]) } else { Db::key_change_write(&watcher, s, p, &users[u]) })
            .collect();
        db.store.write(writes).expect("write");
        let upper: Vec<u64> = since.iter().zip(&span).map(|(s, d)| s + d).collect();
        let got = db.key_changes(&watcher, &since, &upper, 1000).expect("read").expect("a short range is read");
        let want: BTreeSet<String> = changes
            .iter()
            .filter(|(s, p, _)| *p > since[usize::from(*s)] && *p <= upper[usize::from(*s)])
            .map(|(_, _, u)| users[*u].to_string())
            .collect();
        prop_assert_eq!(got, want);
    }
}

#[test]
fn a_very_old_token_is_reported_as_too_old() {
    let db = shared_db();
    let watcher = UserId::parse("@old:x").expect("user");
    db.store.write(vec![Db::key_change_write(&watcher, 1, 5, &alice())]).expect("write");
    let long = KEY_CHANGE_BUCKETS_MAX << KEY_CHANGE_BUCKET_BITS;
    let changes = db.key_changes_and_left(&watcher, &[0, 0], &[0, long], 10).expect("read");
    assert!(changes.too_old);
    // One bucket shorter is still read.
    let changes = db.key_changes_and_left(&watcher, &[0, 0], &[0, long - (1 << KEY_CHANGE_BUCKET_BITS)], 10).expect("read");
    assert!(!changes.too_old);
    assert_eq!(changes.changed, BTreeSet::from(["@alice:x".to_owned()]));
}
