//! Open-loop arrival schedule: when the n-th request of a run is due.
//!
//! Sans-IO: the schedule never reads a clock. It maps an arrival index to an
//! offset from the run's start, computed from the index alone (never by
//! adding up intervals), so a long run cannot drift: the millionth arrival at
//! 100/s is due at exactly 10,000 s. A driver sleeps until each offset and
//! fires the request whatever the previous responses did, which is what keeps
//! slow responses from hiding themselves (no coordinated omission).
//!
//! A schedule is a list of steps, each a rate held for a duration; a fixed
//! rate is one step. A rate of zero is a pause.

use std::time::Duration;

/// One step of a schedule: `rate_per_s` arrivals per second for `duration`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RateStep {
    /// Arrivals per second; fractional rates (0.5/s) are allowed.
    pub rate_per_s: f64,
    /// How long this rate is held.
    #[serde(with = "secs_f64")]
    pub duration: Duration,
}

mod secs_f64 {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs: f64 = serde::Deserialize::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }
}

/// Rates are kept in thousandths of an arrival per second so that all offset
/// arithmetic is exact integer arithmetic.
const MILLI: u128 = 1000;
const NANOS_PER_S: u128 = 1_000_000_000;

#[derive(Debug, Clone)]
struct Step {
    rate_milli: u128,
    start_ns: u128,
    duration_ns: u128,
    /// Number of arrivals in this step: every k with k / rate < duration.
    count: u64,
}

/// A stepped arrival schedule. Iterate it with [`Schedule::arrivals`].
#[derive(Debug, Clone)]
pub struct Schedule {
    steps: Vec<Step>,
    total_ns: u128,
}

impl Schedule {
    /// `rate_per_s` arrivals per second for `duration`.
    pub fn fixed(rate_per_s: f64, duration: Duration) -> Self {
        Self::stepped(&[RateStep {
            rate_per_s,
            duration,
        }])
    }

    /// The steps one after the other. Negative or non-finite rates count as
    /// zero (a pause).
    pub fn stepped(steps: &[RateStep]) -> Self {
        let mut start_ns = 0u128;
        let mut out = Vec::with_capacity(steps.len());
        for step in steps {
            let rate_milli = if step.rate_per_s.is_finite() && step.rate_per_s > 0.0 {
                (step.rate_per_s * MILLI as f64).round() as u128
            } else {
                0
            };
            let duration_ns = step.duration.as_nanos();
            // Arrival k of the step is at k * 1e12 / rate_milli ns; the step
            // holds those strictly before duration_ns: k < duration_ns * rate_milli / 1e12.
            let count = if rate_milli == 0 {
                0
            } else {
                let num = duration_ns * rate_milli;
                let den = NANOS_PER_S * MILLI;
                u64::try_from(num.div_ceil(den)).unwrap_or(u64::MAX)
            };
            out.push(Step {
                rate_milli,
                start_ns,
                duration_ns,
                count,
            });
            start_ns += duration_ns;
        }
        Self {
            steps: out,
            total_ns: start_ns,
        }
    }

    /// The whole schedule's length.
    pub fn duration(&self) -> Duration {
        nanos_to_duration(self.total_ns)
    }

    /// Total number of arrivals in the schedule.
    pub fn len(&self) -> u64 {
        self.steps.iter().map(|s| s.count).sum()
    }

    /// Whether the schedule has no arrivals at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Offset from the start of arrival `n` (0-based), or `None` past the end.
    pub fn arrival(&self, mut n: u64) -> Option<Duration> {
        for step in &self.steps {
            if n < step.count {
                return Some(nanos_to_duration(step.offset_ns(n)));
            }
            n -= step.count;
        }
        None
    }

    /// All arrival offsets in order.
    pub fn arrivals(&self) -> Arrivals<'_> {
        Arrivals {
            schedule: self,
            step: 0,
            k: 0,
        }
    }
}

impl Step {
    fn offset_ns(&self, k: u64) -> u128 {
        self.start_ns + u128::from(k) * NANOS_PER_S * MILLI / self.rate_milli
    }
}

fn nanos_to_duration(ns: u128) -> Duration {
    let secs = u64::try_from(ns / NANOS_PER_S).unwrap_or(u64::MAX);
    // The remainder is below 1e9 and fits in u32.
    let sub = (ns % NANOS_PER_S) as u32;
    Duration::new(secs, sub)
}

/// Iterator over a schedule's arrival offsets; constant work per arrival.
#[derive(Debug, Clone)]
pub struct Arrivals<'a> {
    schedule: &'a Schedule,
    step: usize,
    k: u64,
}

impl Iterator for Arrivals<'_> {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        loop {
            let step = self.schedule.steps.get(self.step)?;
            if self.k < step.count {
                let at = step.offset_ns(self.k);
                self.k += 1;
                debug_assert!(at < step.start_ns + step.duration_ns);
                return Some(nanos_to_duration(at));
            }
            self.step += 1;
            self.k = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_rate_has_exact_count_and_spacing() {
        let s = Schedule::fixed(1000.0, Duration::from_secs(10));
        assert_eq!(s.len(), 10_000);
        let all: Vec<Duration> = s.arrivals().collect();
        assert_eq!(all.len(), 10_000);
        assert_eq!(all[0], Duration::ZERO);
        assert_eq!(all[1], Duration::from_millis(1));
        assert_eq!(all[5000], Duration::from_secs(5));
        assert_eq!(all[9999], Duration::from_millis(9999));
        for pair in all.windows(2) {
            assert_eq!(pair[1] - pair[0], Duration::from_millis(1));
        }
    }

    #[test]
    fn no_drift_over_a_long_run() {
        // 3/s has a period (333.33.. ms) that is not a whole number of
        // nanoseconds: accumulating it would drift, computing from the index
        // does not.
        let s = Schedule::fixed(3.0, Duration::from_secs(1_000_000));
        assert_eq!(s.len(), 3_000_000);
        assert_eq!(s.arrival(2_999_997), Some(Duration::from_secs(999_999)));
        assert_eq!(s.arrival(3_000_000), None);
        let last = s.arrivals().last();
        assert_eq!(last, s.arrival(2_999_999));
        // Every arrival in each second of a long window: exactly the rate.
        let in_window = s
            .arrivals()
            .filter(|t| *t >= Duration::from_secs(500_000) && *t < Duration::from_secs(500_010))
            .count();
        assert_eq!(in_window, 30);
    }

    #[test]
    fn iterator_and_index_agree() {
        let s = Schedule::stepped(&[
            RateStep {
                rate_per_s: 7.0,
                duration: Duration::from_millis(1500),
            },
            RateStep {
                rate_per_s: 0.0,
                duration: Duration::from_secs(1),
            },
            RateStep {
                rate_per_s: 0.5,
                duration: Duration::from_secs(5),
            },
        ]);
        let all: Vec<Duration> = s.arrivals().collect();
        assert_eq!(all.len() as u64, s.len());
        for (i, t) in all.iter().enumerate() {
            assert_eq!(s.arrival(i as u64), Some(*t));
        }
    }

    #[test]
    fn steps_follow_each_other() {
        let s = Schedule::stepped(&[
            RateStep {
                rate_per_s: 10.0,
                duration: Duration::from_secs(1),
            },
            RateStep {
                rate_per_s: 0.0,
                duration: Duration::from_secs(2),
            },
            RateStep {
                rate_per_s: 100.0,
                duration: Duration::from_secs(1),
            },
        ]);
        assert_eq!(s.duration(), Duration::from_secs(4));
        assert_eq!(s.len(), 110);
        let all: Vec<Duration> = s.arrivals().collect();
        assert_eq!(all[9], Duration::from_millis(900));
        // The pause: nothing between 1 s and 3 s.
        assert_eq!(all[10], Duration::from_secs(3));
        assert_eq!(all[11], Duration::from_millis(3010));
        assert!(all.iter().all(|t| *t < Duration::from_secs(4)));
        assert!(all.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn fractional_rates_and_partial_periods() {
        // 0.5/s for 5 s: arrivals at 0, 2, 4 s.
        let s = Schedule::fixed(0.5, Duration::from_secs(5));
        let all: Vec<Duration> = s.arrivals().collect();
        assert_eq!(
            all,
            vec![
                Duration::ZERO,
                Duration::from_secs(2),
                Duration::from_secs(4)
            ]
        );
        // 2.5/s for 1 s: arrivals at 0, 0.4, 0.8 s.
        let s = Schedule::fixed(2.5, Duration::from_secs(1));
        assert_eq!(s.len(), 3);
        assert_eq!(s.arrival(2), Some(Duration::from_millis(800)));
    }

    #[test]
    fn zero_and_invalid_rates_are_pauses() {
        for rate in [0.0, -5.0, f64::NAN, f64::INFINITY] {
            let s = Schedule::fixed(rate, Duration::from_secs(3));
            assert!(s.is_empty(), "rate {rate}");
            assert_eq!(s.duration(), Duration::from_secs(3));
        }
    }

    #[test]
    fn high_rate_counts_per_second() {
        let s = Schedule::fixed(20_000.0, Duration::from_secs(3));
        let mut per_s = [0u32; 3];
        for t in s.arrivals() {
            per_s[t.as_secs() as usize] += 1;
        }
        assert_eq!(per_s, [20_000; 3]);
    }
}
