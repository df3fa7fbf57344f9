//! The expiry sweeper: a background task that deletes records whose retention ended, in small
//! batches through the store's time-ordered index, so its cost follows what expired and other
//! calls get the store between batches. Records past their retention are already treated as
//! absent by every call; sweeping only reclaims their space.
//!
//! While this process admits calls, the sweeper rests after each batch for as long as the batch
//! took ([`Pacer`]), so that it spends at most about half of its time sweeping and adds half as
//! many deletions per second to the writes that calls wait on. A pass rests at most
//! [`MAX_REST_PER_PASS`] in all, so that under sustained load a backlog is still cleared at full
//! speed after that. When no calls come, batches run back to back. Pacing is per process: replicas
//! sharing PostgreSQL each rest according to their own calls.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use idempotency_core::coordinator::{Coordinator, Error};
use idempotency_core::store::{Store, SweepReport};

/// The most a sweep pass rests in all; past it, the pass runs its batches back to back.
pub const MAX_REST_PER_PASS: Duration = Duration::from_secs(20);

/// Rests shorter than this are added up and taken together: timers round up to the millisecond,
/// so resting after every sub-millisecond batch would rest several times as long as it swept.
const MIN_REST: Duration = Duration::from_millis(5);

/// What the sweeper did, for dashboards.
#[derive(Debug, Default)]
pub struct SweeperStats {
    /// Passes that ran to their end.
    pub passes: AtomicU64,
    /// Passes a failing batch ended.
    pub failed_passes: AtomicU64,
    /// Records deleted.
    pub deleted: AtomicU64,
    /// When a pass last found nothing expired left (unix milliseconds; 0: not yet).
    caught_up_at_ms: AtomicU64,
    /// When the last pass ended (unix milliseconds; 0: not yet).
    pub last_pass_ms: AtomicU64,
}

impl SweeperStats {
    /// An upper bound of the age of the oldest expired record not swept yet: the time since a
    /// pass last found nothing expired left (a record that expired before then was swept),
    /// plus the second expiry buckets round up by. `None` before the first such pass.
    pub fn lag(&self) -> Option<Duration> {
        let caught_up = self.caught_up_at_ms.load(Ordering::Relaxed);
        (caught_up != 0).then(|| {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
            now.saturating_sub(Duration::from_millis(caught_up)) + Duration::from_secs(1)
        })
    }
}

/// Starts sweeping every `interval`, `batch` index entries at a time, until `stop` is cancelled;
/// counts what it does into `stats`.
pub fn spawn<S: Store>(
    coordinator: Arc<Coordinator<S>>,
    interval: Duration,
    batch: usize,
    stop: CancellationToken,
    stats: Arc<SweeperStats>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        // Failures are logged when they start and when they end, not on every interval.
        let mut failing = false;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            let started = Instant::now();
            let started_at = SystemTime::now();
            let pass = pass(|| coordinator.sweep(batch), || coordinator.calls_admitted(), &stop).await;
            stats.deleted.fetch_add(pass.deleted as u64, Ordering::Relaxed);
            let ended = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
            stats.last_pass_ms.store(u64::try_from(ended).unwrap_or(u64::MAX), Ordering::Relaxed);
            if pass.error.is_some() {
                stats.failed_passes.fetch_add(1, Ordering::Relaxed);
            } else {
                stats.passes.fetch_add(1, Ordering::Relaxed);
                if pass.caught_up {
                    let millis = started_at.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
                    stats.caught_up_at_ms.store(u64::try_from(millis).unwrap_or(u64::MAX), Ordering::Relaxed);
                }
            }
            let was_failing = std::mem::replace(&mut failing, pass.error.is_some());
            match (was_failing, pass.error) {
                (true, None) => tracing::info!("sweeping works again"),
                (false, Some(error)) => tracing::warn!(%error, "sweep failed; retrying every interval until it works"),
                _ => {}
            }
            if pass.deleted > 0 {
                let records = coordinator.store().record_count();
                let (deleted, rested) = (pass.deleted, pass.rested);
                tracing::info!(deleted, records, took = ?started.elapsed(), ?rested, "swept expired records");
            }
        }
    })
}

/// What one pass did.
#[derive(Debug, Default)]
struct Pass {
    deleted: usize,
    rested: Duration,
    /// The last batch found nothing more to sweep.
    caught_up: bool,
    /// The failure that ended the pass early, if one did.
    error: Option<Error>,
}

/// Runs batches with `sweep` until none is left, `stop` is cancelled or a batch fails, resting
/// between batches as the [`Pacer`] says, given the count of admitted calls that `calls` reads.
async fn pass<F, Fut>(mut sweep: F, calls: impl Fn() -> u64, stop: &CancellationToken) -> Pass
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<SweepReport, Error>>,
{
    let mut pass = Pass::default();
    let mut pacer = Pacer::new(calls());
    loop {
        let batch_started = Instant::now();
        let report = match sweep().await {
            Ok(report) => report,
            Err(error) => {
                pass.error = Some(error);
                return pass;
            }
        };
        pass.deleted += report.deleted;
        if !report.more || stop.is_cancelled() {
            pass.caught_up = !report.more;
            return pass;
        }
        let rest = pacer.rest_after(batch_started.elapsed(), calls());
        if rest.is_zero() {
            tokio::task::yield_now().await;
            continue;
        }
        pass.rested += rest;
        tokio::select! {
            () = stop.cancelled() => return pass,
            () = tokio::time::sleep(rest) => {}
        }
    }
}

/// Decides how long the sweeper rests between batches: as long as the batch took when calls were
/// admitted since the last decision, not at all otherwise; short rests are added up, and a pass
/// rests [`MAX_REST_PER_PASS`] at most.
#[derive(Debug)]
struct Pacer {
    calls_seen: u64,
    owed: Duration,
    rested: Duration,
}

impl Pacer {
    /// A pacer for a sweep pass that starts when the coordinator has admitted `calls_admitted`.
    fn new(calls_admitted: u64) -> Pacer {
        Pacer { calls_seen: calls_admitted, owed: Duration::ZERO, rested: Duration::ZERO }
    }

    /// The rest after a batch that took `took`, now that the coordinator has admitted
    /// `calls_admitted` calls in all.
    fn rest_after(&mut self, took: Duration, calls_admitted: u64) -> Duration {
        let busy = calls_admitted != std::mem::replace(&mut self.calls_seen, calls_admitted);
        if !busy {
            self.owed = Duration::ZERO;
            return Duration::ZERO;
        }
        self.owed += took;
        if self.owed < MIN_REST {
            return Duration::ZERO;
        }
        let rest = std::mem::take(&mut self.owed).min(MAX_REST_PER_PASS.saturating_sub(self.rested));
        self.rested += rest;
        rest
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    const BATCH: Duration = Duration::from_millis(30);

    #[test]
    fn the_sweeper_rests_as_long_as_a_batch_took_only_while_calls_come_in() {
        let mut pacer = Pacer::new(100);
        // No call since the pass began: the next batch follows at once.
        assert_eq!(pacer.rest_after(BATCH, 100), Duration::ZERO);
        // Calls came in during the batch: rest as long as it took.
        assert_eq!(pacer.rest_after(BATCH, 105), BATCH);
        // Calls still coming (during the rest or the batch): rest again, for this batch's time.
        assert_eq!(pacer.rest_after(Duration::from_millis(7), 106), Duration::from_millis(7));
        // The load stopped: back to back again.
        assert_eq!(pacer.rest_after(BATCH, 106), Duration::ZERO);
    }

    #[test]
    fn calls_before_the_pass_began_do_not_slow_it() {
        let mut pacer = Pacer::new(5_000);
        assert_eq!(pacer.rest_after(BATCH, 5_000), Duration::ZERO);
    }

    #[test]
    fn short_batches_rest_together_once_their_time_adds_up() {
        let mut pacer = Pacer::new(0);
        let short = Duration::from_micros(400);
        let rests: Vec<Duration> = (1..=13).map(|calls| pacer.rest_after(short, calls)).collect();
        // 12 batches of 0.4 ms owe 4.8 ms, still under the shortest rest; the 13th makes 5.2 ms.
        assert!(rests[..12].iter().all(Duration::is_zero), "{rests:?}");
        assert_eq!(rests[12], short * 13);
        // Time owed is forgotten once the load stops.
        assert_eq!(pacer.rest_after(Duration::from_millis(4), 14), Duration::ZERO);
        assert_eq!(pacer.rest_after(Duration::from_millis(4), 14), Duration::ZERO);
        assert_eq!(pacer.rest_after(Duration::from_millis(4), 15), Duration::ZERO, "4 ms owed, not 8");
    }

    #[test]
    fn a_pass_rests_no_longer_than_its_cap_in_all() {
        let mut pacer = Pacer::new(0);
        let long = Duration::from_secs(15);
        assert_eq!(pacer.rest_after(long, 1), long);
        assert_eq!(pacer.rest_after(long, 2), MAX_REST_PER_PASS - long);
        assert_eq!(pacer.rest_after(long, 3), Duration::ZERO);
    }

    /// A sweep of `batches` batches that each take `took` (in paused time), counting the batches
    /// run, and a call count that rises at every read when `busy`.
    struct Stub {
        batches: usize,
        took: Duration,
        run: Cell<usize>,
        calls: Cell<u64>,
        busy: bool,
    }

    impl Stub {
        fn new(batches: usize, took: Duration, busy: bool) -> Stub {
            Stub { batches, took, run: Cell::new(0), calls: Cell::new(0), busy }
        }

        async fn pass(&self, stop: &CancellationToken) -> Pass {
            let sweep = || async {
                tokio::time::sleep(self.took).await;
                self.run.set(self.run.get() + 1);
                Ok(SweepReport { deleted: 10, scanned: 10, more: self.run.get() < self.batches })
            };
            let calls = || {
                if self.busy {
                    self.calls.set(self.calls.get() + 1);
                }
                self.calls.get()
            };
            pass(sweep, calls, stop).await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_pass_rests_between_batches_under_load_and_not_without() {
        let busy = Stub::new(4, BATCH, true);
        let started = Instant::now();
        let report = busy.pass(&CancellationToken::new()).await;
        assert_eq!((report.deleted, report.rested), (40, BATCH * 3), "no rest after the last batch");
        assert_eq!(started.elapsed(), BATCH * 7);
        assert!(report.error.is_none());

        let idle = Stub::new(4, BATCH, false);
        let started = Instant::now();
        let report = idle.pass(&CancellationToken::new()).await;
        assert_eq!((report.deleted, report.rested), (40, Duration::ZERO));
        assert_eq!(started.elapsed(), BATCH * 4);
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_cuts_a_rest_short() {
        let stub = Stub::new(3, Duration::from_secs(10), true);
        let stop = CancellationToken::new();
        let canceller = {
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(12)).await;
                stop.cancel();
            })
        };
        let started = Instant::now();
        let report = stub.pass(&stop).await;
        canceller.await.unwrap();
        // The first batch ends at 10 s and its rest would last until 20 s; the stop comes at 12 s.
        assert_eq!(started.elapsed(), Duration::from_secs(12));
        assert_eq!(stub.run.get(), 1, "no batch after the stop");
        assert_eq!(report.deleted, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_batch_ends_the_pass_with_its_error() {
        let runs = Cell::new(0);
        let sweep = || async {
            runs.set(runs.get() + 1);
            if runs.get() == 1 {
                Ok(SweepReport { deleted: 5, scanned: 5, more: true })
            } else {
                Err(Error::ShuttingDown)
            }
        };
        let report = pass(sweep, || 0, &CancellationToken::new()).await;
        assert_eq!((report.deleted, runs.get()), (5, 2));
        assert!(matches!(report.error, Some(Error::ShuttingDown)), "{:?}", report.error);
    }
}
