//! The embedded backend against the shared conformance suite, plus its own
//! durability check.

use std::sync::Arc;

use super::Embedded;
use crate::storage::{Durability, Store, Table, Write, conformance};

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tessera-embedded-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn passes_conformance_suite() {
    let dir = temp_dir("conformance");
    let store = Embedded::open(&dir, Durability::Process, 8 << 20, 1 << 20).expect("open");
    conformance::run_all(Arc::new(store));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn data_survives_reopen() {
    let dir = temp_dir("reopen");
    {
        let store = Embedded::open(&dir, Durability::Power, 8 << 20, 1 << 20).expect("open");
        store.write(vec![Write::put(Table::Meta, b"k".to_vec(), b"".to_vec(), b"v".to_vec())]).expect("write");
    }
    let store = Embedded::open(&dir, Durability::Process, 8 << 20, 1 << 20).expect("reopen");
    assert_eq!(store.get(Table::Meta, b"k", b"").expect("get").as_deref(), Some(&b"v"[..]));
    let _ = std::fs::remove_dir_all(&dir);
}

/// All tables' memtables share one budget: writes past it rotate the
/// fullest table (sealed for flushing), and what is counted stays within
/// the budget plus one write; rotated data still reads back.
#[test]
fn memtables_share_one_budget() {
    let dir = temp_dir("budget");
    let budget = 256 << 10;
    let store = Embedded::open(&dir, Durability::Process, 8 << 20, budget).expect("open");
    let row = vec![7u8; 10 << 10];
    for i in 0..100u32 {
        let table = if i % 10 == 0 { Table::Meta } else { Table::Events };
        store.write(vec![Write::put(table, i.to_be_bytes().to_vec(), b"".to_vec(), row.clone())]).expect("write");
        let counted = store.buffered_total.load(std::sync::atomic::Ordering::Relaxed);
        assert!(counted <= budget + row.len() as u64 + 64, "{counted} bytes buffered after write {i}");
    }
    store.rotations_done();
    let events = store.ks(Table::Events).expect("events");
    assert!(events.sealed_memtable_count() + events.table_count() > 0, "the busy table was rotated");
    for i in 0..100u32 {
        let table = if i % 10 == 0 { Table::Meta } else { Table::Events };
        assert_eq!(store.get(table, &i.to_be_bytes(), b"").expect("get").as_deref(), Some(&row[..]), "row {i}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Rows replayed from the journal at open were never counted against the
/// budget: opening seals them for flushing, so the budget counts from empty
/// memtables.
#[test]
fn opening_seals_what_the_journal_replayed() {
    let dir = temp_dir("replayed");
    let row = vec![3u8; 1 << 10];
    {
        let store = Embedded::open(&dir, Durability::Process, 8 << 20, 8 << 20).expect("open");
        for i in 0..64u32 {
            store.write(vec![Write::put(Table::Events, i.to_be_bytes().to_vec(), b"".to_vec(), row.clone())]).expect("write");
        }
        let events = store.ks(Table::Events).expect("events");
        assert_eq!(events.sealed_memtable_count() + events.table_count(), 0, "below the budget nothing was rotated");
    }
    let store = Embedded::open(&dir, Durability::Process, 8 << 20, 8 << 20).expect("reopen");
    let events = store.ks(Table::Events).expect("events");
    assert!(events.sealed_memtable_count() + events.table_count() > 0, "the replayed memtable was sealed at open");
    assert_eq!(store.buffered_total.load(std::sync::atomic::Ordering::Relaxed), 0);
    for i in 0..64u32 {
        assert_eq!(store.get(Table::Events, &i.to_be_bytes(), b"").expect("get").as_deref(), Some(&row[..]), "row {i}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
