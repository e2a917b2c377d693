//! Bucketed per-room tables: a room's timeline and notification rows are
//! split into partitions of [`BUCKET_EVENTS`] events each, so no partition
//! grows without bound however long a room lives.
//!
//! Layout:
//! - the room's *n*-th event (counted from 0 by the room's single writer,
//!   `RoomHead::timeline_len`) lives in bucket `n / BUCKET_EVENTS`;
//! - bucket 0's partition key is the bare room id (the layout stores had
//!   before bucketing, so they read on unchanged); bucket *b* > 0 is the room
//!   id, a NUL and *b* as a big-endian u64;
//! - [`Table::TimelineBuckets`] (pk room id, ck first position of the bucket)
//!   holds one row per bucket after the first, written in the same batch as
//!   the bucket's first event. Bucket 0 starts at position 0 implicitly.
//!
//! Positions grow with the event count (one writer per room), so bucket *b*
//! holds exactly the positions in `[start(b), start(b + 1))`, and a position
//! range maps to a run of consecutive buckets found through the index.
//!
//! **Invariant**: a row at position `p` of a bucketed table is in the bucket
//! whose index row has the greatest start `<= p` (bucket 0 when none has).

use std::ops::Bound;

use bytes::Bytes;
use ruma::RoomId;

use super::{Db, DbResult};
use crate::error::Error;
use crate::storage::{Scan, Table, Write};

/// Events per bucket. Part of the stored layout: changing it would misplace
/// existing rows, so it is a constant, not a setting.
pub const BUCKET_EVENTS: u64 = 4096;

/// Index rows read per round while walking buckets.
const INDEX_PAGE: usize = 16;

/// The bucket of a room's `seq`-th event.
pub fn bucket_of(seq: u64) -> u64 {
    seq / BUCKET_EVENTS
}

/// Partition key of one bucket of a room's bucketed tables.
pub fn bucket_pk(room: &RoomId, bucket: u64) -> Vec<u8> {
    if bucket == 0 {
        return room.as_bytes().to_vec();
    }
    let mut pk = Vec::with_capacity(room.as_bytes().len() + 9);
    pk.extend_from_slice(room.as_bytes());
    pk.push(0);
    pk.extend_from_slice(&bucket.to_be_bytes());
    pk
}

/// The index row announcing that the room's `seq`-th event, at `pos`, opens
/// a new bucket; `None` when it does not.
pub fn bucket_index_write(room: &RoomId, seq: u64, pos: u64) -> Option<Write> {
    let bucket = bucket_of(seq);
    (bucket > 0 && seq.is_multiple_of(BUCKET_EVENTS)).then(|| Write::put(Table::TimelineBuckets, room.as_bytes(), pos.to_be_bytes().to_vec(), bucket.to_be_bytes().to_vec()))
}

fn decode_u64(what: &str, bytes: &[u8]) -> DbResult<u64> {
    Ok(u64::from_be_bytes(bytes.try_into().map_err(|_| Error::Corrupt(format!("{what}: bad u64")))?))
}

/// The lowest and highest positions a pair of bounds admits, or `None`
/// when it admits none.
fn span(from: Bound<u64>, to: Bound<u64>) -> Option<(u64, u64)> {
    let lowest = match from {
        Bound::Unbounded => 0,
        Bound::Included(p) => p,
        Bound::Excluded(p) => p.checked_add(1)?,
    };
    let highest = match to {
        Bound::Unbounded => u64::MAX,
        Bound::Included(p) => p,
        Bound::Excluded(p) => p.checked_sub(1)?,
    };
    (lowest <= highest).then_some((lowest, highest))
}

impl Db {
    /// Index rows `(start, bucket)` of a room with start in the bounds.
    fn bucket_index(&self, room: &RoomId, from: Bound<u64>, to: Bound<u64>, reverse: bool, limit: usize) -> DbResult<Vec<(u64, u64)>> {
        let enc = |b: Bound<u64>| b.map(u64::to_be_bytes);
        let (f, t) = (enc(from), enc(to));
        let rows = self.store.scan(Scan {
            table: Table::TimelineBuckets,
            pk: room.as_bytes(),
            from: f.as_ref().map(|b| &b[..]),
            to: t.as_ref().map(|b| &b[..]),
            reverse,
            limit,
        })?;
        rows.iter().map(|(ck, v)| Ok((decode_u64("bucket start", ck)?, decode_u64("bucket number", v)?))).collect()
    }

    /// Rows of a bucketed table with positions in `(from, to)` bounds, in
    /// position order (newest first when `reverse`), at most `limit`,
    /// walking as few buckets as the range and the limit need.
    ///
    /// `events` is the room's event count when the caller read the room's
    /// head after the last event it wants: a room that never filled its
    /// first bucket is then read without the index.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn bucket_scan(&self, table: Table, room: &RoomId, events: Option<u64>, from: Bound<u64>, to: Bound<u64>, reverse: bool, limit: usize) -> DbResult<Vec<(u64, Bytes)>> {
        let Some((lowest, highest)) = span(from, to) else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let (lo, hi) = (lowest.to_be_bytes(), highest.to_be_bytes());
        // Scans one bucket within the range; true when the limit is reached.
        let take = |bucket: u64, out: &mut Vec<(u64, Bytes)>| -> DbResult<bool> {
            let pk = bucket_pk(room, bucket);
            let rows = self.store.scan(Scan { table, pk: &pk, from: Bound::Included(&lo), to: Bound::Included(&hi), reverse, limit: limit - out.len() })?;
            for (ck, v) in rows {
                out.push((decode_u64(table.name(), &ck)?, v));
            }
            Ok(out.len() >= limit)
        };
        if events.is_some_and(|n| n <= BUCKET_EVENTS) {
            take(0, &mut out)?;
            return Ok(out);
        }
        if reverse {
            // Buckets whose start is <= highest, newest first, down to the
            // one holding `lowest` (bucket 0, implicit, ends the walk).
            let mut below = Bound::Included(highest);
            loop {
                let page = self.bucket_index(room, Bound::Unbounded, below, true, INDEX_PAGE)?;
                for &(start, bucket) in &page {
                    if take(bucket, &mut out)? || start <= lowest {
                        return Ok(out);
                    }
                    below = Bound::Excluded(start);
                }
                if page.len() < INDEX_PAGE {
                    take(0, &mut out)?;
                    return Ok(out);
                }
            }
        }
        // Forward: the bucket holding `lowest`, then every later one that
        // starts at or before `highest`.
        let first = self.bucket_index(room, Bound::Unbounded, Bound::Included(lowest), true, 1)?.first().map_or(0, |&(_, b)| b);
        if take(first, &mut out)? {
            return Ok(out);
        }
        let mut after = Bound::Excluded(lowest);
        loop {
            let page = self.bucket_index(room, after, Bound::Included(highest), false, INDEX_PAGE)?;
            for &(start, bucket) in &page {
                if take(bucket, &mut out)? {
                    return Ok(out);
                }
                after = Bound::Excluded(start);
            }
            if page.len() < INDEX_PAGE {
                return Ok(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, OnceLock};

    use proptest::prelude::*;

    use super::*;
    use crate::storage::Durability;
    use crate::storage::embedded::Embedded;

    /// Events in the fixture room: three full buckets and part of a fourth.
    const EVENTS: u64 = 3 * BUCKET_EVENTS + 5;

    /// A room written through the real write helpers: event `n` at position
    /// `10 + 3n + n % 2` (gaps, as other rooms share the stream), and a
    /// notification row for every seventh event. Returns the positions.
    fn fixture() -> &'static (Db, Vec<u64>) {
        static FIXTURE: OnceLock<(Db, Vec<u64>)> = OnceLock::new();
        FIXTURE.get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("tessera-buckets-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let db = Db::new(Arc::new(Embedded::open(&dir, Durability::Process, 8 << 20, 1 << 20).expect("open")));
            let room = room();
            let mut positions = Vec::new();
            let mut writes = Vec::new();
            for n in 0..EVENTS {
                let pos = 10 + 3 * n + n % 2;
                let id = ruma::OwnedEventId::try_from(format!("$e{n}")).expect("event id");
                writes.extend(Db::timeline_writes(room, n, pos, &id));
                if n % 7 == 0 {
                    writes.push(Db::notifications_write(room, n, pos, &super::super::EventNotifications { event_id: id.to_string(), ts: n, ..Default::default() }));
                }
                positions.push(pos);
            }
            db.store.write(writes).expect("write");
            (db, positions)
        })
    }

    fn room() -> &'static RoomId {
        <&RoomId>::try_from("!bucketed:x").expect("room id")
    }

    fn bound(kind: u8, p: u64) -> Bound<u64> {
        match kind {
            0 => Bound::Unbounded,
            1 => Bound::Included(p),
            _ => Bound::Excluded(p),
        }
    }

    #[test]
    fn every_bucket_after_the_first_is_indexed() {
        let (db, positions) = fixture();
        let index = db.bucket_index(room(), Bound::Unbounded, Bound::Unbounded, false, 100).expect("index");
        let expected: Vec<(u64, u64)> = (1..=3).map(|b| (positions[(b * BUCKET_EVENTS) as usize], b)).collect();
        assert_eq!(index, expected);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// Scans across buckets return exactly what one ordered partition
        /// would: same rows, same order, same limit.
        #[test]
        fn scans_match_one_ordered_partition(fk in 0u8..3, tk in 0u8..3, a in 0u64..(20 + 4 * EVENTS), b in 0u64..(20 + 4 * EVENTS), reverse: bool, limit in 0usize..9000, notes: bool) {
            let (db, positions) = fixture();
            let (from, to) = (bound(fk, a.min(b)), bound(tk, a.max(b)));
            let table = if notes { Table::Notifications } else { Table::Timeline };
            let mut model: Vec<u64> = positions
                .iter()
                .enumerate()
                .filter(|(n, _)| !notes || n % 7 == 0)
                .map(|(_, &p)| p)
                .filter(|p| std::ops::RangeBounds::contains(&(from, to), p))
                .collect();
            if reverse {
                model.reverse();
            }
            model.truncate(limit);
            let got: Vec<u64> = db.bucket_scan(table, room(), None, from, to, reverse, limit).expect("scan").into_iter().map(|(p, _)| p).collect();
            prop_assert_eq!(got, model);
        }
    }

    #[test]
    fn span_handles_every_bound() {
        assert_eq!(span(Bound::Unbounded, Bound::Unbounded), Some((0, u64::MAX)));
        assert_eq!(span(Bound::Excluded(4), Bound::Included(9)), Some((5, 9)));
        assert_eq!(span(Bound::Included(4), Bound::Excluded(5)), Some((4, 4)));
        assert_eq!(span(Bound::Excluded(4), Bound::Excluded(5)), None);
        assert_eq!(span(Bound::Excluded(u64::MAX), Bound::Unbounded), None);
        assert_eq!(span(Bound::Unbounded, Bound::Excluded(0)), None);
    }

    #[test]
    fn bucket_zero_keeps_the_bare_room_id() {
        let room = <&RoomId>::try_from("!r:x").expect("room id");
        assert_eq!(bucket_pk(room, 0), b"!r:x".to_vec());
        assert_eq!(bucket_pk(room, 1), [&b"!r:x"[..], &[0], &1u64.to_be_bytes()].concat());
        assert!(bucket_index_write(room, 0, 7).is_none());
        assert!(bucket_index_write(room, BUCKET_EVENTS - 1, 7).is_none());
        assert!(bucket_index_write(room, BUCKET_EVENTS, 7).is_some());
        assert!(bucket_index_write(room, BUCKET_EVENTS + 1, 7).is_none());
    }
}
