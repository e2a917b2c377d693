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
    let events = store.ks(Table::Events).expect("events");
    assert!(events.sealed_memtable_count() + events.table_count() > 0, "the busy table was rotated");
    for i in 0..100u32 {
        let table = if i % 10 == 0 { Table::Meta } else { Table::Events };
        assert_eq!(store.get(table, &i.to_be_bytes(), b"").expect("get").as_deref(), Some(&row[..]), "row {i}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
