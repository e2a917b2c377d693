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
