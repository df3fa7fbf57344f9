//! What stores and the coordinator count for an operator's dashboard: plain atomics, read at each
//! scrape by whoever exports them (the server's metrics endpoint). Nothing here knows of a
//! metrics format, so the stores stay free of the exporter's crate.
//!
//! Invariant: counting never blocks and never allocates: a histogram is a fixed array of atomic
//! bucket counters, a sum and a count.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A histogram with fixed upper bounds, counted with atomics (one increment per bucket the value
/// falls in, so the counts are per bucket, not cumulative).
#[derive(Debug)]
pub struct AtomicHistogram {
    bounds: &'static [f64],
    /// One counter per bound, and one more for values above the last bound.
    buckets: Box<[AtomicU64]>,
    /// The sum of observed values, in millionths of the unit (a float sum cannot be atomic).
    sum_micros: AtomicU64,
    count: AtomicU64,
}

/// The upper bounds etcd uses for its fsync histograms: 1 ms doubling to 8.192 s, in seconds.
pub const FLUSH_SECONDS_BOUNDS: &[f64] =
    &[0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096, 8.192];

/// Upper bounds for batch sizes (changes made durable by one flush): 1 doubling to 1,024.
pub const BATCH_SIZE_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

/// Upper bounds for a database statement's latency, in seconds: 0.25 ms doubling to 4 s.
pub const STATEMENT_SECONDS_BOUNDS: &[f64] =
    &[0.000_25, 0.000_5, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096];

impl AtomicHistogram {
    /// An empty histogram with these ascending upper bounds.
    pub fn new(bounds: &'static [f64]) -> AtomicHistogram {
        AtomicHistogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Counts one value.
    pub fn observe(&self, value: f64) {
        let bucket = self.bounds.iter().position(|bound| value <= *bound).unwrap_or(self.bounds.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        // Saturating float-to-int cast: a negative value counts as zero in the sum.
        self.sum_micros.fetch_add((value * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one duration, in seconds.
    pub fn observe_duration(&self, duration: Duration) {
        self.observe(duration.as_secs_f64());
    }

    /// The counts so far.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets = self
            .bounds
            .iter()
            .copied()
            .chain([f64::MAX])
            .zip(self.buckets.iter())
            .map(|(bound, count)| (bound, count.load(Ordering::Relaxed)))
            .collect();
        HistogramSnapshot {
            buckets,
            sum: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

/// A histogram's counts at one moment, as exporters want them.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Each upper bound with the number of values above the bound before it and at or below
    /// it (per bucket, not cumulative); the last bound is `f64::MAX`, the exporters' `+Inf`.
    pub buckets: Vec<(f64, u64)>,
    /// The sum of all values.
    pub sum: f64,
    /// How many values were counted.
    pub count: u64,
}

/// What a store can tell a dashboard, read at each scrape (cheap: no scan).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoreStats {
    /// How long each group-commit flush took, in seconds (embedded store).
    pub flush_seconds: Option<HistogramSnapshot>,
    /// How many changes each flush made durable (embedded store).
    pub flush_batch_size: Option<HistogramSnapshot>,
    /// Bytes the store's files take on disk (embedded store).
    pub disk_bytes: Option<u64>,
    /// How long each database statement took, in seconds (PostgreSQL).
    pub statement_seconds: Option<HistogramSnapshot>,
    /// How many Claims or Completes each database statement carried (PostgreSQL batches).
    pub statement_batch_size: Option<HistogramSnapshot>,
    /// The connection pool (PostgreSQL).
    pub pool: Option<PoolStats>,
    /// Times the LISTEN connection was opened again after it failed (PostgreSQL).
    pub listen_reconnects: Option<u64>,
    /// The database's clock minus this process's, in seconds, as last measured (PostgreSQL).
    pub clock_offset_seconds: Option<f64>,
}

/// A connection pool's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Connections open.
    pub size: u64,
    /// Connections lent to calls right now.
    pub in_use: u64,
    /// Calls waiting for a connection.
    pub waiting: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(bounds: &'static [f64], values: &[f64], buckets: &[u64], count: u64) {
        let histogram = AtomicHistogram::new(bounds);
        for value in values {
            histogram.observe(*value);
        }
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.buckets.iter().map(|(_, count)| *count).collect::<Vec<_>>(), buckets);
        assert_eq!(snapshot.count, count);
    }

    #[test]
    fn each_value_counts_in_the_first_bucket_whose_bound_it_does_not_exceed() {
        check(&[1.0, 2.0, 4.0], &[], &[0, 0, 0, 0], 0);
        check(&[1.0, 2.0, 4.0], &[1.0], &[1, 0, 0, 0], 1);
        check(&[1.0, 2.0, 4.0], &[1.5, 2.0], &[0, 2, 0, 0], 2);
        check(&[1.0, 2.0, 4.0], &[0.5, 3.0, 100.0], &[1, 0, 1, 1], 3);
    }

    #[test]
    fn the_sum_adds_every_value() {
        let histogram = AtomicHistogram::new(FLUSH_SECONDS_BOUNDS);
        histogram.observe_duration(Duration::from_millis(3));
        histogram.observe_duration(Duration::from_micros(250));
        let sum = histogram.snapshot().sum;
        assert!((sum - 0.003_25).abs() < 1e-9, "{sum}");
    }
}
