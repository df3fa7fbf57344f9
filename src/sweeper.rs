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
                        deleted += report.deleted;
                        if !report.more || stop.is_cancelled() {
                            break;
                        }
                        tokio::task::yield_now().await;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "sweep failed; retrying at the next interval");
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
