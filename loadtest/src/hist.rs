//! Latency histograms: HDR histograms of microseconds, their merging, and
//! the percentile summary that reports carry.
//!
//! Values are recorded in microseconds from 1 µs to one hour with three
//! significant digits; anything larger is clamped to the top (and still
//! counted), so recording never fails.

use hdrhistogram::Histogram;
use std::time::Duration;

/// Highest trackable latency: one hour, in microseconds.
pub const LATENCY_US_MAX: u64 = 3_600_000_000;

/// A latency histogram in microseconds.
#[derive(Clone)]
pub struct LatencyHist {
    h: Histogram<u64>,
}

impl std::fmt::Debug for LatencyHist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyHist")
            .field("count", &self.h.len())
            .finish()
    }
}

impl Default for LatencyHist {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHist {
    /// An empty histogram.
    pub fn new() -> Self {
        // Bounds are constants that hdrhistogram accepts (low >= 1,
        // high >= 2 * low, sigfig <= 5), so construction cannot fail.
        let h = match Histogram::new_with_bounds(1, LATENCY_US_MAX, 3) {
            Ok(h) => h,
            Err(e) => unreachable!("constant histogram bounds rejected: {e}"),
        };
        Self { h }
    }

    /// Records one latency.
    pub fn record(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.record_us(us);
    }

    /// Records one latency in microseconds; 0 counts as 1 µs.
    pub fn record_us(&mut self, us: u64) {
        self.h.saturating_record(us.clamp(1, LATENCY_US_MAX));
    }

    /// Adds every value of `other` to this histogram.
    pub fn merge(&mut self, other: &LatencyHist) {
        // Both histograms have the same bounds, so adding cannot go out of
        // range; a failure would only mean a counter overflow.
        if let Err(e) = self.h.add(&other.h) {
            unreachable!("histograms with equal bounds failed to merge: {e}");
        }
    }

    /// Number of recorded values.
    pub fn count(&self) -> u64 {
        self.h.len()
    }

    /// Empties the histogram, keeping its allocation.
    pub fn reset(&mut self) {
        self.h.reset();
    }

    /// Value at quantile `q` (0..=1) in microseconds; 0 when empty.
    pub fn quantile_us(&self, q: f64) -> u64 {
        if self.h.is_empty() {
            0
        } else {
            self.h.value_at_quantile(q)
        }
    }

    /// The percentile summary.
    pub fn summary(&self) -> LatencySummary {
        if self.h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: self.h.len(),
            min_us: self.h.min(),
            mean_us: self.h.mean().round() as u64,
            p50_us: self.h.value_at_quantile(0.50),
            p90_us: self.h.value_at_quantile(0.90),
            p99_us: self.h.value_at_quantile(0.99),
            p999_us: self.h.value_at_quantile(0.999),
            max_us: self.h.max(),
        }
    }
}

/// Percentiles of a latency histogram, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LatencySummary {
    /// Number of values.
    pub count: u64,
    /// Smallest value.
    pub min_us: u64,
    /// Arithmetic mean.
    pub mean_us: u64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest value.
    pub max_us: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `got` is within hdrhistogram's three-significant-digit error of `want`.
    fn close(got: u64, want: u64) -> bool {
        let tolerance = (want / 1000).max(1);
        got.abs_diff(want) <= tolerance
    }

    #[test]
    fn percentiles_of_a_uniform_range() {
        let mut h = LatencyHist::new();
        for us in 1..=10_000 {
            h.record_us(us);
        }
        let s = h.summary();
        assert_eq!(s.count, 10_000);
        assert_eq!(s.min_us, 1);
        assert!(close(s.p50_us, 5_000), "{s:?}");
        assert!(close(s.p90_us, 9_000), "{s:?}");
        assert!(close(s.p99_us, 9_900), "{s:?}");
        assert!(close(s.p999_us, 9_990), "{s:?}");
        assert!(close(s.max_us, 10_000), "{s:?}");
        assert!(close(s.mean_us, 5_000), "{s:?}");
    }

    #[test]
    fn merging_equals_recording_everything_in_one() {
        let mut a = LatencyHist::new();
        let mut b = LatencyHist::new();
        let mut all = LatencyHist::new();
        for i in 0..5_000u64 {
            // Two different distributions: a fast one and a slow tail.
            let fast = 100 + i % 900;
            let slow = 50_000 + i * 37;
            a.record_us(fast);
            b.record_us(slow);
            all.record_us(fast);
            all.record_us(slow);
        }
        let mut merged = a.clone();
        merged.merge(&b);
        assert_eq!(merged.summary(), all.summary());
        assert_eq!(merged.count(), 10_000);
        // The merge moved the median from the fast half to the boundary.
        assert!(merged.summary().p50_us > a.summary().p99_us);
        // Merging an empty histogram changes nothing.
        let before = merged.summary();
        merged.merge(&LatencyHist::new());
        assert_eq!(merged.summary(), before);
    }

    #[test]
    fn out_of_range_values_are_clamped_not_lost() {
        let mut h = LatencyHist::new();
        h.record_us(0);
        h.record(Duration::from_secs(10 * 3600));
        let s = h.summary();
        assert_eq!(s.count, 2);
        assert_eq!(s.min_us, 1);
        assert!(close(s.max_us, LATENCY_US_MAX));
    }

    #[test]
    fn empty_summary_is_zero_and_reset_empties() {
        let mut h = LatencyHist::new();
        assert_eq!(h.summary(), LatencySummary::default());
        h.record_us(42);
        h.reset();
        assert_eq!(h.count(), 0);
        assert_eq!(h.quantile_us(0.99), 0);
    }
}
