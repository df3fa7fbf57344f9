//! Group commit for the sled store: one flusher thread makes every write durable in batches (a
//! flush is the write-ahead log's write and fdatasync, see [`crate::wal`]).
//!
//! A writer applies its change in memory, takes a ticket with [`GroupCommit::written`], and awaits
//! [`GroupCommit::durable`]. The flusher reads the highest ticket, runs one flush that covers
//! every write applied before it, and wakes all of that batch's waiters at once. So concurrent
//! writers share flushes, and throughput grows with concurrency instead of paying one flush per
//! call. A waiter yields once before it asks for a flush, so that the calls ready to run take
//! their tickets first and share it (on a runtime with one worker, the flusher would otherwise
//! often wake for one write). A waiter never flushes on its own task: a stalled disk must not
//! hold a call past its deadline, nor a worker that health checks need (measured: flushing on
//! the caller's task when it is alone gave about 10 % more flows at 1 in flight, see
//! BENCHMARKS.md). (sled 0.34's own `flush_async` deadlocks with many waiters, upstream issue
//! #1308.)
//!
//! Invariant: a ticket is taken only after its write is applied, so a flush that starts after
//! reading ticket `t` covers every write with a ticket up to `t`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use idempotency_core::stats::{AtomicHistogram, BATCH_SIZE_BOUNDS, FLUSH_SECONDS_BOUNDS};
use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

/// How the flushes went, for dashboards: kept by the store across reopenings.
#[derive(Debug)]
pub(crate) struct FlushStats {
    /// How long each flush took, in seconds.
    pub(crate) seconds: AtomicHistogram,
    /// How many writes each flush made durable.
    pub(crate) batch_size: AtomicHistogram,
}

impl Default for FlushStats {
    fn default() -> Self {
        FlushStats {
            seconds: AtomicHistogram::new(FLUSH_SECONDS_BOUNDS),
            batch_size: AtomicHistogram::new(BATCH_SIZE_BOUNDS),
        }
    }
}

/// Makes every write applied so far durable.
pub type FlushFn = Box<dyn FnMut() -> std::io::Result<()> + Send>;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Progress {
    /// Every ticket up to this one is durable.
    durable: u64,
    /// The flush covering tickets up to this one failed (and no later one succeeded yet).
    failed: u64,
}

#[derive(Default)]
pub(crate) struct Signal {
    requested: bool,
    stopping: bool,
}

pub(crate) struct CommitState {
    written: AtomicU64,
    progress: watch::Sender<Progress>,
    healthy: watch::Sender<bool>,
    signal: Mutex<Signal>,
    wake: Condvar,
    flushes: AtomicU64,
    stats: Arc<FlushStats>,
}

/// The handle writers use; stopping it flushes once more and joins the thread.
pub(crate) struct GroupCommit {
    shared: Arc<CommitState>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// A write was not made durable.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the write could not be made durable")]
pub(crate) struct NotDurable;

impl GroupCommit {
    /// Starts the flusher thread around `flush`, counting each flush into `stats`.
    pub(crate) fn start(flush: FlushFn, stats: Arc<FlushStats>) -> std::io::Result<GroupCommit> {
        let shared = Arc::new(CommitState {
            written: AtomicU64::new(0),
            progress: watch::Sender::new(Progress::default()),
            healthy: watch::Sender::new(true),
            signal: Mutex::new(Signal::default()),
            wake: Condvar::new(),
            flushes: AtomicU64::new(0),
            stats,
        });
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("group-commit".to_owned())
            .spawn(move || run_flusher(&thread_shared, flush))?;
        Ok(GroupCommit { shared, thread: Mutex::new(Some(thread)) })
    }

    /// Registers a write that was just applied and returns its ticket.
    pub(crate) fn written(&self) -> u64 {
        self.shared.written.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Waits until the write with `ticket` (and all before it) is durable.
    pub(crate) async fn durable(&self, ticket: u64) -> Result<(), NotDurable> {
        let mut progress = self.shared.progress.subscribe();
        if progress.borrow().durable >= ticket {
            return Ok(());
        }
        // Calls that are ready to run take their tickets first, so that the flush asked for here
        // covers them too (on a runtime with one worker, the flusher would otherwise often wake
        // for this write alone).
        tokio::task::yield_now().await;
        if progress.borrow().durable >= ticket {
            return Ok(());
        }
        self.request_flush();
        let reached = progress.wait_for(|p| p.durable >= ticket || p.failed >= ticket).await.map_err(|_| NotDurable)?;
        if reached.durable >= ticket { Ok(()) } else { Err(NotDurable) }
    }

    /// `true` until a flush fails; after that this group commit acknowledges nothing again.
    pub(crate) fn health(&self) -> watch::Receiver<bool> {
        self.shared.healthy.subscribe()
    }

    /// How many flushes ran so far.
    #[cfg(test)]
    pub(crate) fn flush_count(&self) -> u64 {
        self.shared.flushes.load(Ordering::Relaxed)
    }

    /// Stops acknowledging for good, as after a failed flush: for a write that failed before it
    /// could take a ticket. Writes not yet durable are refused; health turns false.
    pub(crate) fn fail(&self) {
        poison(&self.shared);
        self.request_flush();
    }

    pub(crate) fn request_flush(&self) {
        let mut signal = self.shared.signal.lock();
        if !signal.requested {
            signal.requested = true;
            self.shared.wake.notify_one();
        }
    }

    /// Flushes whatever is pending, stops the thread and waits for it. Blocks: call it off the
    /// async workers.
    pub(crate) fn stop(&self) {
        {
            let mut signal = self.shared.signal.lock();
            signal.stopping = true;
            self.shared.wake.notify_one();
        }
        if let Some(thread) = self.thread.lock().take() {
            // A panicking flusher already reported itself; there is nothing more to do here.
            let _ = thread.join();
        }
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(crate) fn run_flusher(shared: &CommitState, mut flush: FlushFn) {
    loop {
        let stopping = {
            let mut signal = shared.signal.lock();
            while !signal.requested && !signal.stopping {
                shared.wake.wait(&mut signal);
            }
            signal.requested = false;
            signal.stopping
        };
        if !*shared.healthy.borrow() {
            // Failed from outside (`fail`): no flush may acknowledge anything any more.
            poison(shared);
            return;
        }
        // Every write with a ticket up to `target` was applied before this load.
        let target = shared.written.load(Ordering::SeqCst);
        let already = shared.progress.borrow().durable;
        if target > already || stopping {
            shared.flushes.fetch_add(1, Ordering::Relaxed);
            let started = std::time::Instant::now();
            if let Err(error) = flush() {
                // After a failed fsync the kernel may have dropped the dirty pages, so a later
                // "successful" flush would prove nothing: the store stops acknowledging for good.
                tracing::error!(%error, "flush failed; no further change is acknowledged until the store is reopened");
                poison(shared);
                return;
            }
            shared.stats.seconds.observe_duration(started.elapsed());
            if target > already {
                shared.stats.batch_size.observe((target - already) as f64);
            }
            shared.progress.send_modify(|p| p.durable = p.durable.max(target));
        }
        if stopping {
            // Calls that arrive after the store closed can never become durable.
            shared.progress.send_modify(|p| p.failed = u64::MAX);
            return;
        }
    }
}

pub(crate) fn poison(shared: &CommitState) {
    shared.progress.send_modify(|p| p.failed = u64::MAX);
    shared.healthy.send_replace(false);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_writers_share_flushes_and_each_flush_is_counted_with_its_batch() {
        let stats = Arc::new(FlushStats::default());
        let commit = Arc::new(
            GroupCommit::start(
                Box::new(|| {
                    std::thread::sleep(Duration::from_millis(5));
                    Ok(())
                }),
                Arc::clone(&stats),
            )
            .unwrap(),
        );
        let writers: Vec<_> = (0..64)
            .map(|_| {
                let commit = Arc::clone(&commit);
                tokio::spawn(async move {
                    for _ in 0..10 {
                        let ticket = commit.written();
                        commit.durable(ticket).await.unwrap();
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
        // 640 writes; with one flush per write there would be 640 flushes.
        assert!(commit.flush_count() < 320, "flushes: {}", commit.flush_count());
        assert_eq!(commit.shared.progress.borrow().durable, 640);
        // Every flush took at least 5 ms and made at least one write durable; together, all 640.
        let (seconds, batches) = (stats.seconds.snapshot(), stats.batch_size.snapshot());
        assert_eq!(seconds.count, commit.flush_count());
        assert_eq!(seconds.buckets[..3].iter().map(|(_, count)| count).sum::<u64>(), 0, "{seconds:?}");
        assert_eq!(batches.count, commit.flush_count());
        assert_eq!(batches.sum, 640.0);
    }

    #[tokio::test]
    async fn a_failed_flush_fails_its_waiters_and_every_later_one() {
        let failing = Arc::new(AtomicBool::new(true));
        let flag = Arc::clone(&failing);
        let commit = GroupCommit::start(
            Box::new(
                move || {
                    if flag.load(Ordering::SeqCst) { Err(std::io::Error::other("disk full")) } else { Ok(()) }
                },
            ),
            Arc::default(),
        )
        .unwrap();
        let mut health = commit.health();
        let ticket = commit.written();
        assert!(commit.durable(ticket).await.is_err());
        health.wait_for(|healthy| !healthy).await.unwrap();
        // Even once flushing would work again, nothing written after the failure is acknowledged.
        failing.store(false, Ordering::SeqCst);
        let ticket = commit.written();
        assert!(commit.durable(ticket).await.is_err());
        assert!(!*commit.health().borrow());
    }

    #[tokio::test]
    async fn failing_from_outside_turns_health_off_and_acknowledges_nothing_more() {
        let commit = GroupCommit::start(Box::new(|| Ok(())), Arc::default()).unwrap();
        let before = commit.written();
        commit.durable(before).await.expect("flushing works");
        assert!(*commit.health().borrow());
        let flushes = commit.flush_count();
        commit.fail();
        assert!(!*commit.health().borrow());
        // The flush function still works, but nothing written after the failure is acknowledged.
        let after = commit.written();
        assert!(commit.durable(after).await.is_err());
        commit.durable(before).await.expect("what was durable stays durable");
        // Not even the final flush of stopping runs: the flusher ended at the failure.
        commit.stop();
        assert_eq!(commit.flush_count(), flushes, "no flush runs after the failure");
    }

    #[tokio::test]
    async fn waits_after_stop_fail_instead_of_hanging() {
        let commit = GroupCommit::start(Box::new(|| Ok(())), Arc::default()).unwrap();
        let before = commit.written();
        commit.stop();
        commit.durable(before).await.expect("what was written before stop is flushed by it");
        let after = commit.written();
        assert!(commit.durable(after).await.is_err());
    }

    #[tokio::test]
    async fn nothing_waits_for_a_ticket_already_durable() {
        let commit = GroupCommit::start(Box::new(|| Ok(())), Arc::default()).unwrap();
        commit.durable(0).await.unwrap();
        let ticket = commit.written();
        commit.durable(ticket).await.unwrap();
        let flushes = commit.flush_count();
        commit.durable(ticket).await.unwrap();
        assert_eq!(commit.flush_count(), flushes);
    }
}
