//! How one run is split over generator threads (`threads` in the plan), and
//! where the threads meet.
//!
//! Ownership is decided by one function, [`owner`]: user `u`, room `r`,
//! join pair `i`, arrival `i` of a schedule and message `seq` belong to
//! thread `index % threads`. Taking every `threads`-th arrival of the one
//! schedule keeps the overall arrival times exactly those of a single
//! thread, so an open-loop rate is split without rounding and without any
//! thread waiting on another (no coordinated omission). Limits that bound
//! the whole run (connections, requests in flight, concurrency) are divided
//! with [`share`], so the threads together stay within them.
//!
//! **Invariant:** threads share nothing on request paths. They meet only at
//! phase boundaries, at a [`Rendezvous`]: each hands in what it learnt
//! (sessions, room ids, failed joins) and gets every thread's part back, so
//! afterwards all threads hold the same users and rooms. A rendezvous is
//! used once; a thread that fails or panics breaks it (see
//! [`Rendezvous::break_off`]) so that no other thread waits forever.

use std::sync::{Mutex, PoisonError};
use tokio::sync::Notify;

/// Most generator threads a plan may ask for. Each has its own runtime,
/// connection pools and histograms (a few MiB), so this also bounds the
/// generator's own memory.
pub const THREADS_MAX: u32 = 256;

/// The thread that owns `index` (a user, room, join, arrival or message).
pub fn owner(index: u64, threads: usize) -> usize {
    // The remainder is below `threads`, which is a usize.
    (index % threads.max(1) as u64) as usize
}

/// Thread `t`'s part of `total` when it is divided over `threads`: the
/// parts differ by at most one and add up to `total`.
pub fn share(total: u64, threads: usize, t: usize) -> u64 {
    let n = threads.max(1) as u64;
    total / n + u64::from((t as u64) < total % n)
}

/// Another generator thread failed or panicked before reaching a rendezvous.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("another generator thread failed")]
pub struct Broken;

#[derive(Debug)]
struct Parts<T> {
    parts: Vec<Option<T>>,
    missing: usize,
    broken: bool,
}

/// A one-time meeting point of all generator threads, where each hands in a
/// part and receives all of them.
#[derive(Debug)]
pub struct Rendezvous<T> {
    parts: Mutex<Parts<T>>,
    all_in: Notify,
}

impl<T: Clone> Rendezvous<T> {
    /// A rendezvous of `threads` threads.
    pub fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        Self {
            parts: Mutex::new(Parts {
                parts: (0..threads).map(|_| None).collect(),
                missing: threads,
                broken: false,
            }),
            all_in: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Parts<T>> {
        // The lock is held only to move parts in and out, which cannot
        // panic halfway; a poisoned lock still holds consistent parts.
        self.parts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands in thread `t`'s part and waits (asynchronously: the thread's
    /// other tasks keep running) until every thread has; returns all parts
    /// in thread order. Fails once the rendezvous is broken off, and for a
    /// `t` that is not one of its threads.
    pub async fn meet(&self, t: usize, part: T) -> Result<Vec<T>, Broken> {
        {
            let mut p = self.lock();
            let slot = p.parts.get_mut(t).ok_or(Broken)?;
            if slot.replace(part).is_none() {
                p.missing -= 1;
            }
            if p.missing == 0 {
                self.all_in.notify_waiters();
            }
        }
        loop {
            // Registered before the check, so a notification between the
            // check and the wait is not lost.
            let notified = self.all_in.notified();
            {
                let p = self.lock();
                if p.broken {
                    return Err(Broken);
                }
                if p.missing == 0 {
                    return Ok(p.parts.iter().flatten().cloned().collect());
                }
            }
            notified.await;
        }
    }

    /// Wakes every waiting thread with [`Broken`]; later meetings fail too.
    pub fn break_off(&self) {
        self.lock().broken = true;
        self.all_in.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn owners_and_shares_cover_everything_once() {
        for threads in 1..=9 {
            for total in [0u64, 1, 5, 8, 100, 513] {
                let parts: Vec<u64> = (0..threads).map(|t| share(total, threads, t)).collect();
                assert_eq!(parts.iter().sum::<u64>(), total, "{threads} {total}");
                let (lo, hi) = (parts.iter().min(), parts.iter().max());
                assert!(hi.zip(lo).is_some_and(|(h, l)| h - l <= 1), "{parts:?}");
                // The owner function hands out the same parts.
                let mut owned = vec![0u64; threads];
                for i in 0..total {
                    owned[owner(i, threads)] += 1;
                }
                assert_eq!(owned, parts, "{threads} {total}");
            }
        }
        assert_eq!(owner(7, 0), 0, "zero threads count as one");
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn every_thread_gets_every_part_in_order() {
        let r = Arc::new(Rendezvous::<Vec<u32>>::new(3));
        let handles: Vec<_> = (0..3)
            .map(|t| {
                let r = r.clone();
                std::thread::spawn(move || block_on(r.meet(t, vec![t as u32; t + 1])))
            })
            .collect();
        for h in handles {
            let parts = h.join().expect("no panic").expect("not broken");
            assert_eq!(parts, vec![vec![0], vec![1, 1], vec![2, 2, 2]]);
        }
        // One thread alone meets itself at once.
        assert_eq!(block_on(Rendezvous::new(1).meet(0, 'x')), Ok(vec!['x']));
    }

    #[test]
    fn breaking_off_releases_the_waiters() {
        let r = Arc::new(Rendezvous::<u8>::new(2));
        let waiter = {
            let r = r.clone();
            std::thread::spawn(move || block_on(r.meet(0, 1)))
        };
        // The second thread never arrives; it failed instead.
        r.break_off();
        assert_eq!(waiter.join().expect("no panic"), Err(Broken));
        assert_eq!(block_on(r.meet(1, 2)), Err(Broken));
        assert_eq!(block_on(r.meet(5, 2)), Err(Broken), "no such thread");
    }
}
