//! The storage conformance suite: every backend must pass these checks.
//! Backends call [`run_all`] from their own tests with a fresh store.

use std::ops::Bound;
use std::sync::Arc;

use super::{Scan, Store, Table, Write};

/// Runs every check against `store`, which must be empty.
pub fn run_all(store: Arc<dyn Store>) {
    get_put_delete(&*store);
    scan_order_and_bounds(&*store);
    partitions_are_isolated(&*store);
    batch_is_applied_whole(&*store);
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
    let existing = store.insert_if_absent(Table::Users, b"@user0:x", b"", b"late").expect("lwt");
    assert!(existing.is_some(), "a later insert sees the winner's value");
}
