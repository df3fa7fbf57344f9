//! The expiry sweeper: a background task that deletes records whose retention ended, in small
//! batches through the store's time-ordered index, so its cost follows what expired and other
//! calls get the store between batches. Records past their retention are already treated as
//! absent by every call; sweeping only reclaims their space.
//!
//! While calls are being served, the sweeper rests after each batch for as long as the batch
//! took ([`Pacer`]): a large sweep then holds the store at most half of the time, and the
//! writes it adds to each group commit are halved. When no calls come, batches run back to back.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::coordinator::Coordinator;
use crate::store::Store;

/// Starts sweeping every `interval`, `batch` index entries at a time, until `stop` is cancelled.
pub fn spawn<S: Store>(
    coordinator: Arc<Coordinator<S>>,
    interval: Duration,
    batch: usize,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        // Failures are logged when they start and when they end, not on every interval.
        let mut failing = false;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            let mut deleted = 0;
            let mut rested = Duration::ZERO;
            let started = Instant::now();
            let mut pacer = Pacer::new(coordinator.calls_admitted());
            loop {
                let batch_started = Instant::now();
                match coordinator.sweep(batch).await {
                    Ok(report) => {
                        if std::mem::take(&mut failing) {
                            tracing::info!("sweeping works again");
                        }
                        deleted += report.deleted;
                        if !report.more || stop.is_cancelled() {
                            break;
                        }
                        let rest = pacer.rest_after(batch_started.elapsed(), coordinator.calls_admitted());
                        if rest.is_zero() {
                            tokio::task::yield_now().await;
                        } else {
                            rested += rest;
                            tokio::select! {
                                () = stop.cancelled() => break,
                                () = tokio::time::sleep(rest) => {}
                            }
                        }
                    }
                    Err(error) => {
                        if !std::mem::replace(&mut failing, true) {
                            tracing::warn!(%error, "sweep failed; retrying every interval until it works");
                        }
                        break;
                    }
                }
            }
            if deleted > 0 {
                let records = coordinator.store().record_count();
                tracing::info!(deleted, records, took = ?started.elapsed(), ?rested, "swept expired records");
            }
        }
    })
}

/// Decides how long the sweeper rests between batches: as long as the batch took when calls were
/// admitted since the last decision, not at all otherwise.
#[derive(Debug)]
struct Pacer {
    calls_seen: u64,
}

impl Pacer {
    /// A pacer for a sweep pass that starts when the coordinator has admitted `calls_admitted`.
    fn new(calls_admitted: u64) -> Pacer {
        Pacer { calls_seen: calls_admitted }
    }

    /// The rest after a batch that took `took`, now that the coordinator has admitted
    /// `calls_admitted` calls in all.
    fn rest_after(&mut self, took: Duration, calls_admitted: u64) -> Duration {
        let busy = calls_admitted != std::mem::replace(&mut self.calls_seen, calls_admitted);
        if busy { took } else { Duration::ZERO }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweeper_rests_as_long_as_a_batch_took_only_while_calls_come_in() {
        let batch = Duration::from_millis(30);
        let mut pacer = Pacer::new(100);
        // No call since the pass began: the next batch follows at once.
        assert_eq!(pacer.rest_after(batch, 100), Duration::ZERO);
        // Calls came in during the batch: rest as long as it took.
        assert_eq!(pacer.rest_after(batch, 105), batch);
        // Calls still coming (during the rest or the batch): rest again, for this batch's time.
        assert_eq!(pacer.rest_after(Duration::from_millis(7), 106), Duration::from_millis(7));
        // The load stopped: back to back again.
        assert_eq!(pacer.rest_after(batch, 106), Duration::ZERO);
    }

    #[test]
    fn calls_before_the_pass_began_do_not_slow_it() {
        let mut pacer = Pacer::new(5_000);
        assert_eq!(pacer.rest_after(Duration::from_millis(30), 5_000), Duration::ZERO);
    }
}
