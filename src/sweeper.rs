//! The expiry sweeper: a background task that deletes records whose retention ended, in small
//! batches through the store's time-ordered index, so its cost follows what expired and other
//! calls get the store between batches. Records past their retention are already treated as
//! absent by every call; sweeping only reclaims their space.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
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
            let started = std::time::Instant::now();
            loop {
                match coordinator.sweep(batch).await {
                    Ok(report) => {
                        if std::mem::take(&mut failing) {
                            tracing::info!("sweeping works again");
                        }
                        deleted += report.deleted;
                        if !report.more || stop.is_cancelled() {
                            break;
                        }
                        tokio::task::yield_now().await;
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
                tracing::info!(deleted, records, took = ?started.elapsed(), "swept expired records");
            }
        }
    })
}
