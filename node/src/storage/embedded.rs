//! The embedded storage backend, on the fjall LSM engine.
//!
//! Each [`Table`] is one fjall keyspace. A row key is
//! `u16 BE length of pk | pk | ck`, so one partition is one contiguous key
//! range, ordered by clustering key, exactly like a CQL partition.
//!
//! Durability: every write goes through fjall's journal, which hands it to
//! the operating system before the call returns, so an answered request
//! survives SIGKILL. With [`Durability::Power`] each batch is also fsynced.
//!
//! Memory: the in-memory write buffers (memtables) of all tables share one
//! budget. Each write adds its bytes to its table's count; when the counts
//! pass the budget, the table holding the most is rotated (its memtable
//! sealed and flushed to disk in the background). Busy tables get the room,
//! idle ones cost nothing, and the total stays near the budget however many
//! tables there are. Rotating touches every table's version history and the
//! journal's files (milliseconds), so it runs on a thread of its own: the
//! writer that passes the budget only queues the request and goes on.
//!
//! Conditional inserts take one of a fixed set of striped mutexes keyed by the
//! row key's hash; they serialise only writers of the same stripe, and only on
//! the uniqueness path (registration, aliases, transaction ids).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::ops::Bound;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;

use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use super::{Durability, Row, Scan, StorageError, StorageResult, Store, Table, Write};

const LOCK_STRIPES: usize = 64;
/// Rotation requests waiting for the rotation thread; beyond them a writer
/// rotates itself (a backstop: requests take microseconds to queue and the
/// thread drains them in milliseconds).
const ROTATIONS_QUEUED_MAX: usize = 64;

/// The embedded backend; see the module docs.
pub struct Embedded {
    db: Database,
    tables: HashMap<Table, Keyspace>,
    /// Bytes written to each table since its memtable was last rotated here.
    buffered: HashMap<Table, AtomicU64>,
    /// Sum of `buffered`.
    buffered_total: AtomicU64,
    /// Budget of all memtables together, in bytes.
    memtable_budget: u64,
    durability: Durability,
    stripes: Vec<Mutex<()>>,
    hasher: RandomState,
    /// Work for the rotation thread; None once dropping.
    rotations: Option<SyncSender<Rotation>>,
    rotator: Option<JoinHandle<()>>,
}

/// A job of the rotation thread.
enum Rotation {
    /// Seal this table's active memtable.
    Seal(Keyspace),
    /// Answer once every earlier job is done (tests wait with it).
    #[cfg_attr(not(test), allow(dead_code))]
    Barrier(SyncSender<()>),
}

impl Drop for Embedded {
    /// Closes the rotation queue and waits for the thread to finish what
    /// was queued, so no table handle outlives the store.
    fn drop(&mut self) {
        self.rotations = None;
        if let Some(t) = self.rotator.take() {
            let _ = t.join();
        }
    }
}

fn engine(e: impl std::fmt::Display) -> StorageError {
    StorageError::Engine(e.to_string())
}

fn row_key(pk: &[u8], ck: &[u8]) -> StorageResult<Vec<u8>> {
    let len = u16::try_from(pk.len()).map_err(|_| StorageError::Engine("partition key longer than 65535 bytes".into()))?;
    let mut key = Vec::with_capacity(2 + pk.len() + ck.len());
    key.extend_from_slice(&len.to_be_bytes());
    key.extend_from_slice(pk);
    key.extend_from_slice(ck);
    Ok(key)
}

/// The smallest key greater than every key starting with `prefix`, or None
/// when no such key exists (prefix of all 0xff).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

impl Embedded {
    /// Opens (or creates) the store under `dir`.
    /// `memtable_bytes` is the budget of all tables' memtables together.
    pub fn open(dir: &Path, durability: Durability, cache_bytes: u64, memtable_bytes: u64) -> StorageResult<Self> {
        std::fs::create_dir_all(dir).map_err(engine)?;
        let db = Database::builder(dir).cache_size(cache_bytes).open().map_err(engine)?;
        let mut tables = HashMap::new();
        let mut buffered = HashMap::new();
        for table in Table::ALL {
            // The engine's own per-table limit is a backstop above the
            // shared budget, which normally rotates first.
            let ks = db.keyspace(table.name(), || KeyspaceCreateOptions::default().max_memtable_size(memtable_bytes.saturating_mul(2))).map_err(engine)?;
            // What the journal replayed into the memtable was never counted
            // against the budget: seal it for flushing, so the count starts
            // from empty memtables.
            ks.rotate_memtable().map_err(engine)?;
            tables.insert(table, ks);
            buffered.insert(table, AtomicU64::new(0));
        }
        let stripes = (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect();
        let (rotations, queue) = sync_channel::<Rotation>(ROTATIONS_QUEUED_MAX);
        let rotator = std::thread::Builder::new()
            .name("store-rotate".into())
            .spawn(move || {
                for job in queue {
                    match job {
                        Rotation::Seal(ks) => {
                            if let Err(e) = ks.rotate_memtable() {
                                tracing::warn!(table = %ks.name(), error = %e, "sealing a memtable failed");
                            }
                        }
                        Rotation::Barrier(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })
            .map_err(engine)?;
        Ok(Embedded {
            db,
            tables,
            buffered,
            buffered_total: AtomicU64::new(0),
            memtable_budget: memtable_bytes.max(1),
            durability,
            stripes,
            hasher: RandomState::new(),
            rotations: Some(rotations),
            rotator: Some(rotator),
        })
    }

    /// Counts `bytes` written to `table` and, when all memtables together
    /// pass the budget, rotates the table holding the most.
    fn buffered(&self, table: Table, bytes: u64) -> StorageResult<()> {
        if let Some(count) = self.buffered.get(&table) {
            count.fetch_add(bytes, Ordering::Relaxed);
        }
        if self.buffered_total.fetch_add(bytes, Ordering::Relaxed) + bytes <= self.memtable_budget {
            return Ok(());
        }
        let Some((largest, _)) = self.buffered.iter().max_by_key(|(_, c)| c.load(Ordering::Relaxed)) else { return Ok(()) };
        let taken = self.buffered[largest].swap(0, Ordering::Relaxed);
        let _ = self.buffered_total.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| Some(t.saturating_sub(taken)));
        if taken > 0 {
            // Sealing the active memtable queues its flush; it is a no-op
            // when another rotation got there first.
            let ks = self.ks(*largest)?.clone();
            // A full queue (or a gone thread): seal here instead.
            if let Some(Err(TrySendError::Full(Rotation::Seal(ks)) | TrySendError::Disconnected(Rotation::Seal(ks)))) =
                self.rotations.as_ref().map(|q| q.try_send(Rotation::Seal(ks)))
            {
                ks.rotate_memtable().map_err(engine)?;
            }
        }
        Ok(())
    }

    /// Waits until the rotation thread has done every rotation queued so far.
    #[cfg(test)]
    fn rotations_done(&self) {
        let (tx, rx) = sync_channel(1);
        if let Some(q) = &self.rotations
            && q.send(Rotation::Barrier(tx)).is_ok()
        {
            let _ = rx.recv();
        }
    }

    fn ks(&self, table: Table) -> StorageResult<&Keyspace> {
        self.tables.get(&table).ok_or_else(|| StorageError::Engine(format!("table {} not open", table.name())))
    }

    fn sync_if_needed(&self) -> StorageResult<()> {
        if self.durability == Durability::Power {
            self.db.persist(PersistMode::SyncData).map_err(engine)?;
        }
        Ok(())
    }
}

impl Store for Embedded {
    fn get(&self, table: Table, pk: &[u8], ck: &[u8]) -> StorageResult<Option<Bytes>> {
        super::check_pk(pk)?;
        let key = row_key(pk, ck)?;
        let value = self.ks(table)?.get(&key).map_err(engine)?;
        Ok(value.map(|v| Bytes::copy_from_slice(&v)))
    }

    fn scan(&self, scan: Scan<'_>) -> StorageResult<Vec<Row>> {
        super::check_pk(scan.pk)?;
        let prefix = row_key(scan.pk, &[])?;
        let plen = prefix.len();
        let with_prefix = |ck: &[u8]| {
            let mut k = prefix.clone();
            k.extend_from_slice(ck);
            k
        };
        let lower: Bound<Vec<u8>> = match scan.from {
            Bound::Included(ck) => Bound::Included(with_prefix(ck)),
            Bound::Excluded(ck) => Bound::Excluded(with_prefix(ck)),
            Bound::Unbounded => Bound::Included(prefix.clone()),
        };
        let upper: Bound<Vec<u8>> = match scan.to {
            Bound::Included(ck) => Bound::Included(with_prefix(ck)),
            Bound::Excluded(ck) => Bound::Excluded(with_prefix(ck)),
            Bound::Unbounded => match prefix_end(&prefix) {
                Some(end) => Bound::Excluded(end),
                None => Bound::Unbounded,
            },
        };
        let ks = self.ks(scan.table)?;
        let iter = ks.range::<Vec<u8>, _>((lower, upper));
        let mut rows = Vec::new();
        let mut push = |guard: fjall::Guard| -> StorageResult<bool> {
            let (k, v) = guard.into_inner().map_err(engine)?;
            if k.len() < plen || k[..plen] != prefix[..] {
                return Ok(true);
            }
            rows.push((Bytes::copy_from_slice(&k[plen..]), Bytes::copy_from_slice(&v)));
            Ok(rows.len() < scan.limit)
        };
        if scan.limit == 0 {
            return Ok(rows);
        }
        if scan.reverse {
            for guard in iter.rev() {
                if !push(guard)? {
                    break;
                }
            }
        } else {
            for guard in iter {
                if !push(guard)? {
                    break;
                }
            }
        }
        Ok(rows)
    }

    fn write(&self, writes: Vec<Write>) -> StorageResult<()> {
        super::check_batch(&writes)?;
        let mut batch = self.db.batch();
        let mut sizes: Vec<(Table, u64)> = Vec::with_capacity(4);
        let mut count = |table: Table, bytes: usize| match sizes.iter_mut().find(|(t, _)| *t == table) {
            Some((_, n)) => *n += bytes as u64,
            None => sizes.push((table, bytes as u64)),
        };
        for w in writes {
            match w {
                Write::Put { table, pk, ck, value } => {
                    let key = row_key(&pk, &ck)?;
                    count(table, key.len() + value.len());
                    batch.insert(self.ks(table)?, key, value)
                }
                Write::Delete { table, pk, ck } => {
                    let key = row_key(&pk, &ck)?;
                    count(table, key.len());
                    batch.remove(self.ks(table)?, key)
                }
                Write::DeleteRange { table, pk, from, to } => {
                    // The engine has no atomic range delete: the range's
                    // keys are removed one by one in the same batch.
                    let ks = self.ks(table)?;
                    for guard in ks.range::<Vec<u8>, _>(row_key(&pk, &from)?..=row_key(&pk, &to)?) {
                        let key = guard.key().map_err(engine)?;
                        count(table, key.len());
                        batch.remove(ks, key);
                    }
                }
            }
        }
        batch.commit().map_err(engine)?;
        self.sync_if_needed()?;
        for (table, bytes) in sizes {
            self.buffered(table, bytes)?;
        }
        Ok(())
    }

    fn insert_if_absent(&self, table: Table, pk: &[u8], ck: &[u8], value: &[u8]) -> StorageResult<Option<Bytes>> {
        super::check_pk(pk)?;
        let key = row_key(pk, ck)?;
        let stripe = (self.hasher.hash_one(&key) as usize) % LOCK_STRIPES;
        // A poisoned stripe only means another thread panicked while holding
        // it; the data itself is in fjall and stays consistent.
        let _guard = self.stripes[stripe].lock().unwrap_or_else(|p| p.into_inner());
        let ks = self.ks(table)?;
        if let Some(existing) = ks.get(&key).map_err(engine)? {
            return Ok(Some(Bytes::copy_from_slice(&existing)));
        }
        let bytes = (key.len() + value.len()) as u64;
        ks.insert(key, value).map_err(engine)?;
        self.sync_if_needed()?;
        self.buffered(table, bytes)?;
        Ok(None)
    }

    fn flush(&self) -> StorageResult<()> {
        self.db.persist(PersistMode::SyncAll).map_err(engine)
    }
}

#[cfg(test)]
mod tests;
