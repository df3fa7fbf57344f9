//! Wall-clock time, injected: the server reads [`SystemClock`], tests drive a [`ManualClock`].
//!
//! Leases and retention are wall-clock UTC instants, so that they survive restarts. A clock
//! step moves every lease's remaining time with it (see the README).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::domain::Timestamp;

/// A future that completes once the clock reads at least a given instant.
pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The source of the current time.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;

    /// Completes once `now()` is at or past `deadline`.
    fn sleep_until(&self, deadline: Timestamp) -> Sleep;
}

/// The machine's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        Timestamp::from_unix_millis(i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX))
    }

    fn sleep_until(&self, deadline: Timestamp) -> Sleep {
        let clock = *self;
        Box::pin(async move {
            // Re-check after each sleep: the wall clock may have been stepped back meanwhile.
            loop {
                let remaining = deadline.since(clock.now());
                if remaining.is_zero() {
                    return;
                }
                tokio::time::sleep(remaining).await;
            }
        })
    }
}

/// A clock that moves only when told; sleepers wake as it passes their deadline.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<watch::Sender<Timestamp>>,
}

impl ManualClock {
    /// A clock reading `start`.
    pub fn new(start: Timestamp) -> Self {
        ManualClock { now: Arc::new(watch::Sender::new(start)) }
    }

    /// Moves the clock forward by `step`, waking every sleeper whose deadline is passed.
    pub fn advance(&self, step: Duration) {
        self.now.send_modify(|now| *now = now.plus(step));
    }

    /// Sets the clock to `to`, forward or back (a clock step).
    pub fn set(&self, to: Timestamp) {
        self.now.send_replace(to);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        *self.now.borrow()
    }

    fn sleep_until(&self, deadline: Timestamp) -> Sleep {
        let mut receiver = self.now.subscribe();
        Box::pin(async move {
            // The sender lives as long as the clock; if it is gone, nothing will ever wake us.
            if receiver.wait_for(|now| *now >= deadline).await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    }
}

/// Another clock plus an offset in milliseconds that may change while it runs: the database
/// clock as seen from this host (the PostgreSQL store measures the offset), or an injected skew.
#[derive(Clone)]
pub struct OffsetClock {
    base: Arc<dyn Clock>,
    offset_ms: Arc<AtomicI64>,
}

impl OffsetClock {
    /// `base` read `offset_ms` ahead (negative: behind).
    pub fn new(base: Arc<dyn Clock>, offset_ms: Arc<AtomicI64>) -> Self {
        OffsetClock { base, offset_ms }
    }
}

impl Clock for OffsetClock {
    fn now(&self) -> Timestamp {
        let offset = self.offset_ms.load(Ordering::Relaxed);
        Timestamp::from_unix_millis(self.base.now().unix_millis().saturating_add(offset))
    }

    fn sleep_until(&self, deadline: Timestamp) -> Sleep {
        let clock = self.clone();
        Box::pin(async move {
            // The offset may change while we sleep: sleep on the base clock, then look again.
            while clock.now() < deadline {
                let offset = clock.offset_ms.load(Ordering::Relaxed);
                let base_deadline = Timestamp::from_unix_millis(deadline.unix_millis().saturating_sub(offset));
                let _ = tokio::time::timeout(Duration::from_secs(1), clock.base.sleep_until(base_deadline)).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn manual_sleepers_wake_when_the_clock_passes_their_deadline() {
        let clock = ManualClock::new(Timestamp::from_unix_millis(0));
        let sleep = tokio::spawn(clock.sleep_until(Timestamp::from_unix_millis(1_000)));
        clock.advance(Duration::from_millis(999));
        tokio::task::yield_now().await;
        assert!(!sleep.is_finished());
        clock.advance(Duration::from_millis(1));
        tokio::time::timeout(Duration::from_secs(5), sleep).await.expect("woke").expect("no panic");
        assert_eq!(clock.now(), Timestamp::from_unix_millis(1_000));
    }

    #[tokio::test]
    async fn offset_clocks_follow_their_base_and_their_offset() {
        let base = ManualClock::new(Timestamp::from_unix_millis(10_000));
        let offset = Arc::new(AtomicI64::new(-4_000));
        let clock = OffsetClock::new(Arc::new(base.clone()), Arc::clone(&offset));
        assert_eq!(clock.now(), Timestamp::from_unix_millis(6_000));
        let sleep = tokio::spawn(clock.sleep_until(Timestamp::from_unix_millis(7_000)));
        base.advance(Duration::from_millis(999));
        tokio::task::yield_now().await;
        assert!(!sleep.is_finished());
        // The offset moves the clock too: 999 ms on the base plus 1 ms of offset reach the deadline.
        offset.store(-3_999, Ordering::Relaxed);
        base.advance(Duration::from_millis(1));
        tokio::time::timeout(Duration::from_secs(5), sleep).await.expect("woke").expect("no panic");
        assert!(clock.now() >= Timestamp::from_unix_millis(7_000));
    }

    #[tokio::test]
    async fn system_clock_sleeps_until_its_deadline() {
        let clock = SystemClock;
        let deadline = clock.now().plus(Duration::from_millis(20));
        clock.sleep_until(deadline).await;
        assert!(clock.now() >= deadline);
    }
}
