//! Send→delivery tracking: which sent messages each receiver still has to
//! see in its `/sync`, and how long each arrival took.
//!
//! Sans-IO: callers pass the instants in. A message is registered *before*
//! its send request goes out (a receiver's sync may return the event before
//! the sender's response arrives), with the number of syncing receivers that
//! should see it. Each arrival is measured from the message's intended send
//! time. The pending map is bounded by the messages in flight: an entry
//! leaves it when its last receiver has seen it or when its send failed.
//!
//! With several generator threads, the thread that sends a message tracks
//! it (`split::owner` of its sequence number); a receiver's sync loop on
//! another thread passes the arrival to that thread, instant and all. The
//! threads' final counts add up ([`DeliveryCounts::merge`]).

use crate::metrics::{Op, Recorder};
use std::collections::HashMap;
use std::time::Instant;

#[derive(Debug)]
struct Pending {
    intended: Instant,
    remaining: u32,
    measured: bool,
}

/// Counts of a run's deliveries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeliveryCounts {
    /// Deliveries expected for measured, successfully sent messages.
    pub expected: u64,
    /// Deliveries of measured messages that arrived.
    pub received: u64,
    /// Expected deliveries that never arrived before the run ended.
    pub missing: u64,
    /// Arrivals of our run's messages that were not expected (a receiver
    /// saw the same event twice, or an event of a failed send).
    pub unexpected: u64,
    /// Deliveries of warm-up messages (not measured).
    pub warmup: u64,
    /// Sync responses whose timeline for a room was `limited` (the server
    /// skipped events): a cause of missing deliveries that is the server's
    /// choice, not a loss.
    #[serde(default)]
    pub limited_timelines: u64,
}

impl DeliveryCounts {
    /// Adds another thread's counts.
    pub fn merge(&mut self, other: &DeliveryCounts) {
        self.expected += other.expected;
        self.received += other.received;
        self.missing += other.missing;
        self.unexpected += other.unexpected;
        self.warmup += other.warmup;
        self.limited_timelines += other.limited_timelines;
    }
}

/// The tracker.
#[derive(Debug, Default)]
pub struct Deliveries {
    pending: HashMap<u64, Pending>,
    counts: DeliveryCounts,
    /// Deliveries still outstanding for measured messages.
    outstanding: u64,
}

impl Deliveries {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Message `seq`, intended at `intended`, is about to be sent and should
    /// reach `receivers` syncing users.
    pub fn expect(&mut self, seq: u64, intended: Instant, receivers: u32, measured: bool) {
        if receivers == 0 {
            return;
        }
        if measured {
            self.counts.expected += u64::from(receivers);
            self.outstanding += u64::from(receivers);
        }
        self.pending.insert(
            seq,
            Pending {
                intended,
                remaining: receivers,
                measured,
            },
        );
    }

    /// The send of `seq` failed: its remaining deliveries are no longer
    /// expected.
    pub fn cancel(&mut self, seq: u64) {
        if let Some(p) = self.pending.remove(&seq)
            && p.measured
        {
            self.counts.expected -= u64::from(p.remaining);
            self.outstanding -= u64::from(p.remaining);
        }
    }

    /// A receiver saw message `seq` at `now`; records the latency.
    pub fn arrived(&mut self, seq: u64, now: Instant, recorder: &mut Recorder) {
        let Some(p) = self.pending.get_mut(&seq) else {
            self.counts.unexpected += 1;
            return;
        };
        p.remaining -= 1;
        let (intended, measured, done) = (p.intended, p.measured, p.remaining == 0);
        if done {
            self.pending.remove(&seq);
        }
        if measured {
            self.counts.received += 1;
            self.outstanding -= 1;
            recorder.ok(Op::Delivery, intended, now);
        } else {
            self.counts.warmup += 1;
        }
    }

    /// A sync returned a `limited` timeline.
    pub fn limited(&mut self, rooms: u64) {
        self.counts.limited_timelines += rooms;
    }

    /// Deliveries of measured messages still awaited.
    pub fn outstanding(&self) -> u64 {
        self.outstanding
    }

    /// Final counts: whatever is still outstanding is missing.
    pub fn finish(&self) -> DeliveryCounts {
        DeliveryCounts {
            missing: self.outstanding,
            ..self.counts
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn counts_latency_per_receiver_and_missing() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut rec = Recorder::new(t0);
        let mut d = Deliveries::new();
        d.expect(1, ms(0), 3, true);
        d.expect(2, ms(10), 2, true);
        d.expect(3, ms(20), 5, false); // warm-up
        d.expect(4, ms(30), 4, true);
        d.expect(5, ms(40), 0, true); // no receivers: nothing expected
        assert_eq!(d.outstanding(), 9);
        d.arrived(1, ms(5), &mut rec);
        d.arrived(1, ms(7), &mut rec);
        d.arrived(2, ms(50), &mut rec);
        d.arrived(3, ms(60), &mut rec);
        d.cancel(4); // send failed
        d.arrived(4, ms(70), &mut rec); // ...yet an event came: unexpected
        d.arrived(99, ms(70), &mut rec); // unknown
        let c = d.finish();
        assert_eq!(
            c,
            DeliveryCounts {
                expected: 5,
                received: 3,
                missing: 2,
                unexpected: 2,
                warmup: 1,
                limited_timelines: 0
            }
        );
        let h = rec.totals(Op::Delivery).latency;
        assert_eq!(h.count, 3);
        assert!(h.min_us >= 4_990 && h.max_us <= 40_100, "{h:?}");
        // Message 1 still has one receiver to go, message 2 one.
        d.arrived(1, ms(80), &mut rec);
        d.arrived(2, ms(80), &mut rec);
        assert_eq!(d.outstanding(), 0);
        assert_eq!(d.finish().missing, 0);
        // A third arrival of message 1 is a duplicate.
        d.arrived(1, ms(90), &mut rec);
        assert_eq!(d.finish().unexpected, 3);
    }

    #[test]
    fn two_trackers_merge_to_the_counts_of_one() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut rec = Recorder::new(t0);
        let mut one = Deliveries::new();
        let mut parts = [Deliveries::new(), Deliveries::new()];
        // Message `seq` is tracked by thread `seq % 2`, as its sender's.
        for seq in 0..40u64 {
            let measured = seq >= 4;
            one.expect(seq, ms(seq), 3, measured);
            parts[(seq % 2) as usize].expect(seq, ms(seq), 3, measured);
        }
        for seq in 0..40u64 {
            let arrivals = match seq % 5 {
                0 => 1, // two receivers never see it
                4 => 4, // one duplicate
                _ => 3,
            };
            for k in 0..arrivals {
                one.arrived(seq, ms(100 + k), &mut rec);
                parts[(seq % 2) as usize].arrived(seq, ms(100 + k), &mut rec);
            }
        }
        one.limited(2);
        parts[1].limited(2);
        let mut merged = parts[0].finish();
        merged.merge(&parts[1].finish());
        assert_eq!(merged, one.finish());
        assert_eq!((merged.missing, merged.unexpected), (14, 8), "{merged:?}");
    }
}
