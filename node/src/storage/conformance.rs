//! The storage conformance suite: every backend must pass these checks.
//! Backends call [`run_all`] from their own tests with a fresh store.

use std::ops::Bound;
use std::sync::Arc;

use super::{Scan, StorageResult, Store, Table, Write};

/// Runs every check against `store`, which must be empty.
pub fn run_all(store: Arc<dyn Store>) {
    get_put_delete(&*store);
    scan_order_and_bounds(&*store);
    scan_bounds_match_a_model(&*store);
    clustering_order_is_unsigned_bytewise(&*store);
    long_scans_are_complete_and_ordered(&*store);
    partitions_are_isolated(&*store);
    batch_is_applied_whole(&*store);
    range_deletes(&*store);
    empty_partition_keys_are_refused(&*store);
    large_batches_and_values(&*store);
    conditional_insert_is_unique_under_concurrency(store.clone());
}

fn get_put_delete(store: &dyn Store) {
    assert_eq!(store.get(Table::Users, b"@a:x", b"").expect("get"), None);
    store.write(vec![Write::put(Table::Users, b"@a:x".to_vec(), b"".to_vec(), b"v1".to_vec())]).expect("put");
    assert_eq!(store.get(Table::Users, b"@a:x", b"").expect("get").as_deref(), Some(&b"v1"[..]));
    store.write(vec![Write::put(Table::Users, b"@a:x".to_vec(), b"".to_vec(), b"v2".to_vec())]).expect("overwrite");
    assert_eq!(store.get(Table::Users, b"@a:x", b"").expect("get").as_deref(), Some(&b"v2"[..]));
    store.write(vec![Write::delete(Table::Users, b"@a:x".to_vec(), b"".to_vec())]).expect("delete");
    assert_eq!(store.get(Table::Users, b"@a:x", b"").expect("get"), None);
    // Deleting an absent row is not an error.
    store.write(vec![Write::delete(Table::Users, b"@absent:x".to_vec(), b"".to_vec())]).expect("delete absent");
}

fn scan_order_and_bounds(store: &dyn Store) {
    let pk = b"!room:x";
    let writes = (0u64..10)
        .rev()
        .map(|i| Write::put(Table::Timeline, pk.to_vec(), i.to_be_bytes().to_vec(), format!("e{i}").into_bytes()))
        .collect();
    store.write(writes).expect("write");
    let all = store.scan(Scan::partition(Table::Timeline, pk, 100)).expect("scan");
    let values: Vec<_> = all.iter().map(|(_, v)| String::from_utf8_lossy(v).into_owned()).collect();
    assert_eq!(values, (0..10).map(|i| format!("e{i}")).collect::<Vec<_>>());

    let three = 3u64.to_be_bytes();
    let seven = 7u64.to_be_bytes();
    let mid = store
        .scan(Scan { table: Table::Timeline, pk, from: Bound::Excluded(&three), to: Bound::Included(&seven), reverse: false, limit: 100 })
        .expect("scan");
    assert_eq!(mid.len(), 4, "(3, 7] holds 4, 5, 6, 7");
    assert_eq!(&mid[0].0[..], &4u64.to_be_bytes());

    let back = store
        .scan(Scan { table: Table::Timeline, pk, from: Bound::Unbounded, to: Bound::Excluded(&seven), reverse: true, limit: 2 })
        .expect("scan");
    assert_eq!(back.len(), 2, "limit applies");
    assert_eq!(&back[0].0[..], &6u64.to_be_bytes(), "reverse starts below the bound");
    assert_eq!(&back[1].0[..], &5u64.to_be_bytes());

    assert!(store.scan(Scan::partition(Table::Timeline, pk, 0)).expect("scan").is_empty());
}

/// Every combination of lower and upper bound, both orders and several
/// limits, against a plain filter over the same keys.
fn scan_bounds_match_a_model(store: &dyn Store) {
    let pk = b"!model:x";
    let keys: Vec<u64> = (0..12).collect();
    store
        .write(keys.iter().map(|i| Write::put(Table::Timeline, pk.to_vec(), i.to_be_bytes().to_vec(), i.to_string().into_bytes())).collect())
        .expect("write");
    let (lo, hi) = (3u64.to_be_bytes(), 8u64.to_be_bytes());
    fn bounds(v: &[u8]) -> [(&'static str, Bound<&[u8]>); 3] {
        [("unbounded", Bound::Unbounded), ("included", Bound::Included(v)), ("excluded", Bound::Excluded(v))]
    }
    for (from_name, from) in bounds(&lo) {
        for (to_name, to) in bounds(&hi) {
            for reverse in [false, true] {
                for limit in [1, 2, 5, 100] {
                    let in_range = |i: u64| {
                        let above = match from {
                            Bound::Unbounded => true,
                            Bound::Included(_) => i >= 3,
                            Bound::Excluded(_) => i > 3,
                        };
                        let below = match to {
                            Bound::Unbounded => true,
                            Bound::Included(_) => i <= 8,
                            Bound::Excluded(_) => i < 8,
                        };
                        above && below
                    };
                    let mut expected: Vec<u64> = keys.iter().copied().filter(|&i| in_range(i)).collect();
                    if reverse {
                        expected.reverse();
                    }
                    expected.truncate(limit);
                    let rows = store.scan(Scan { table: Table::Timeline, pk, from, to, reverse, limit }).expect("scan");
                    let got: Vec<u64> = rows
                        .iter()
                        .map(|(ck, v)| {
                            let ck = u64::from_be_bytes(ck[..].try_into().expect("8-byte key"));
                            assert_eq!(&v[..], ck.to_string().as_bytes(), "value belongs to its key");
                            ck
                        })
                        .collect();
                    assert_eq!(got, expected, "from {from_name} 3, to {to_name} 8, reverse {reverse}, limit {limit}");
                }
            }
        }
    }
}

/// Clustering keys compare as unsigned bytes, shorter prefix first, the
/// empty key before all others; partition keys of 0xff bytes work too.
fn clustering_order_is_unsigned_bytewise(store: &dyn Store) {
    let pk = [0xffu8, 0xff];
    let cks: [&[u8]; 8] = [b"", &[0x00], &[0x00, 0x00], &[0x01], &[0x7f], &[0x80], &[0xff], &[0xff, 0x00]];
    store.write(cks.iter().rev().map(|ck| Write::put(Table::RoomState, pk.to_vec(), ck.to_vec(), ck.to_vec())).collect()).expect("write");
    let rows = store.scan(Scan::partition(Table::RoomState, &pk, 100)).expect("scan");
    let got: Vec<&[u8]> = rows.iter().map(|(ck, _)| &ck[..]).collect();
    assert_eq!(got, cks.to_vec());
    assert_eq!(store.get(Table::RoomState, &pk, b"").expect("get").as_deref(), Some(&b""[..]), "an empty value is stored, not absent");
    let below_ff = store
        .scan(Scan { table: Table::RoomState, pk: &pk, from: Bound::Excluded(&[0x7f]), to: Bound::Excluded(&[0xff]), reverse: false, limit: 10 })
        .expect("scan");
    assert_eq!(below_ff.len(), 1, "only 0x80 lies strictly between 0x7f and 0xff");
}

/// Scans longer than a backend's page (CQL: 1,000 rows) come back whole.
fn long_scans_are_complete_and_ordered(store: &dyn Store) {
    let pk = b"!long:x";
    for chunk in (0u32..2500).collect::<Vec<_>>().chunks(500) {
        store.write(chunk.iter().map(|i| Write::put(Table::Notifications, pk.to_vec(), i.to_be_bytes().to_vec(), b"n".to_vec())).collect()).expect("write");
    }
    let key = |ck: &[u8]| u32::from_be_bytes(ck.try_into().expect("4-byte key"));
    // Compared as (length, first mismatch) to keep a failure readable.
    let check = |rows: Vec<super::Row>, expected: Vec<u32>| {
        let got: Vec<u32> = rows.iter().map(|(ck, _)| key(ck)).collect();
        let mismatch = got.iter().zip(&expected).position(|(g, e)| g != e);
        assert_eq!((got.len(), mismatch), (expected.len(), None), "long scan");
    };
    check(store.scan(Scan::partition(Table::Notifications, pk, 10_000)).expect("scan"), (0..2500).collect());
    let newest = Scan { table: Table::Notifications, pk, from: Bound::Unbounded, to: Bound::Unbounded, reverse: true, limit: 1500 };
    check(store.scan(newest).expect("scan"), (1000..2500).rev().collect());
}

fn large_batches_and_values(store: &dyn Store) {
    // A room creation writes dozens of rows over several tables at once.
    let big = vec![0xabu8; 64 << 10];
    let mut writes: Vec<Write> =
        (0..60u32).map(|i| Write::put(Table::Events, format!("$e{i}").into_bytes(), b"".to_vec(), format!("event {i}").into_bytes())).collect();
    writes.push(Write::put(Table::Events, b"$big".to_vec(), b"".to_vec(), big.clone()));
    writes.push(Write::delete(Table::Events, b"$e0".to_vec(), b"".to_vec()));
    store.write(writes).expect("batch");
    assert_eq!(store.get(Table::Events, b"$big", b"").expect("get").as_deref(), Some(&big[..]));
    assert_eq!(store.get(Table::Events, b"$e59", b"").expect("get").as_deref(), Some(&b"event 59"[..]));
    assert_eq!(store.get(Table::Events, b"$e0", b"").expect("get"), None, "a later delete in a batch wins over an earlier put");
    // The other order, and two puts: the batch's last write to a row wins
    // (CQL alone would let the tombstone win a timestamp tie).
    store
        .write(vec![
            Write::delete(Table::Events, b"$e1".to_vec(), b"".to_vec()),
            Write::put(Table::Events, b"$e1".to_vec(), b"".to_vec(), b"again".to_vec()),
            Write::put(Table::Events, b"$e2".to_vec(), b"".to_vec(), b"first".to_vec()),
            Write::put(Table::Events, b"$e2".to_vec(), b"".to_vec(), b"second".to_vec()),
        ])
        .expect("batch");
    assert_eq!(store.get(Table::Events, b"$e1", b"").expect("get").as_deref(), Some(&b"again"[..]), "a later put wins over an earlier delete");
    assert_eq!(store.get(Table::Events, b"$e2", b"").expect("get").as_deref(), Some(&b"second"[..]), "the later of two puts wins");
    store.write(Vec::new()).expect("an empty batch is fine");
}

fn partitions_are_isolated(store: &dyn Store) {
    // "ab" + ck must never be seen as partition "a" + ck "b...".
    store.write(vec![Write::put(Table::RoomState, b"ab".to_vec(), b"x".to_vec(), b"1".to_vec())]).expect("write");
    store.write(vec![Write::put(Table::RoomState, b"a".to_vec(), b"bx".to_vec(), b"2".to_vec())]).expect("write");
    let a = store.scan(Scan::partition(Table::RoomState, b"a", 10)).expect("scan");
    assert_eq!(a.len(), 1);
    assert_eq!(&a[0].1[..], b"2");
    // Other tables never see the rows.
    assert!(store.scan(Scan::partition(Table::Receipts, b"a", 10)).expect("scan").is_empty());
}

fn batch_is_applied_whole(store: &dyn Store) {
    store
        .write(vec![
            Write::put(Table::Aliases, b"#x:y".to_vec(), b"".to_vec(), b"!r:y".to_vec()),
            Write::put(Table::RoomAliases, b"!r:y".to_vec(), b"#x:y".to_vec(), b"".to_vec()),
        ])
        .expect("batch");
    assert!(store.get(Table::Aliases, b"#x:y", b"").expect("get").is_some());
    assert!(store.get(Table::RoomAliases, b"!r:y", b"#x:y").expect("get").is_some());
}

fn conditional_insert_is_unique_under_concurrency(store: Arc<dyn Store>) {
    let threads: Vec<_> = (0..8u8)
        .map(|i| {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut won = 0;
                for k in 0..50u32 {
                    let key = format!("@user{k}:x");
                    if store.insert_if_absent(Table::Users, key.as_bytes(), b"", &[i]).expect("lwt").is_none() {
                        won += 1;
                    }
                }
                won
            })
        })
        .collect();
    let total: u32 = threads.into_iter().map(|t| t.join().expect("thread")).sum();
    assert_eq!(total, 50, "each key is won by exactly one writer");
    for k in 0..50u32 {
        let key = format!("@user{k}:x");
        let stored = store.get(Table::Users, key.as_bytes(), b"").expect("get").expect("every key was inserted");
        let existing = store.insert_if_absent(Table::Users, key.as_bytes(), b"", b"late").expect("lwt");
        assert_eq!(existing, Some(stored), "a later insert sees the winner's value, unchanged");
    }
}

fn range_deletes(store: &dyn Store) {
    let pk = b"@r:x\0DEV";
    let other = b"@r:x\0OTHER";
    let key = |shard: u16, pos: u64| [&shard.to_be_bytes()[..], &pos.to_be_bytes()[..]].concat();
    let mut writes = Vec::new();
    for shard in 0..3u16 {
        for pos in 1..=5u64 {
            writes.push(Write::put(Table::ToDevice, pk.to_vec(), key(shard, pos), b"m".to_vec()));
        }
    }
    writes.push(Write::put(Table::ToDevice, other.to_vec(), key(1, 2), b"kept".to_vec()));
    store.write(writes).expect("write");
    // Shard 1, positions 2..=4 (both ends included).
    store.write(vec![Write::delete_range(Table::ToDevice, pk.to_vec(), key(1, 2), key(1, 4))]).expect("range delete");
    let left: Vec<Vec<u8>> = store.scan(Scan::partition(Table::ToDevice, pk, 100)).expect("scan").into_iter().map(|(ck, _)| ck.to_vec()).collect();
    let mut expected: Vec<Vec<u8>> = (0..3u16).flat_map(|s| (1..=5u64).map(move |p| key(s, p))).collect();
    expected.retain(|ck| !(key(1, 2)..=key(1, 4)).contains(ck));
    assert_eq!(left, expected);
    assert_eq!(store.get(Table::ToDevice, other, &key(1, 2)).expect("get").as_deref(), Some(&b"kept"[..]), "other partitions untouched");
    // An empty range and a range with no rows are fine.
    store.write(vec![Write::delete_range(Table::ToDevice, pk.to_vec(), key(9, 0), key(9, 9))]).expect("no rows");
    // A batch writing inside a range it deletes is refused whole.
    let err = store.write(vec![Write::put(Table::Users, b"@clash:x".to_vec(), b"".to_vec(), b"v".to_vec()), Write::delete_range(Table::ToDevice, pk.to_vec(), key(0, 0), key(0, 9)), Write::put(Table::ToDevice, pk.to_vec(), key(0, 3), b"new".to_vec())]);
    assert!(err.is_err(), "a clashing batch must be refused");
    assert_eq!(store.get(Table::Users, b"@clash:x", b"").expect("get"), None, "nothing of a refused batch is applied");
    assert_eq!(store.scan(Scan::partition(Table::ToDevice, pk, 100)).expect("scan").len(), expected.len());
}

/// CQL cannot store an empty partition key; every backend refuses one the
/// same way (an engine error, nothing of the batch applied).
fn empty_partition_keys_are_refused(store: &dyn Store) {
    let engine = |r: StorageResult<()>| matches!(r, Err(crate::storage::StorageError::Engine(_)));
    assert!(engine(store.write(vec![Write::put(Table::Users, b"@kept:x".to_vec(), b"".to_vec(), b"v".to_vec()), Write::put(Table::Meta, Vec::new(), b"".to_vec(), b"v".to_vec())])));
    assert_eq!(store.get(Table::Users, b"@kept:x", b"").expect("get"), None, "nothing of the batch is applied");
    assert!(engine(store.write(vec![Write::delete(Table::Meta, Vec::new(), b"".to_vec())])));
    assert!(engine(store.get(Table::Meta, b"", b"").map(drop)));
    assert!(engine(store.scan(Scan::partition(Table::Meta, b"", 10)).map(drop)));
    assert!(engine(store.insert_if_absent(Table::Meta, b"", b"", b"v").map(drop)));
}
