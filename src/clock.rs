//! Wall-clock time, injected: the server reads [`SystemClock`], tests drive a [`ManualClock`].
//!
//! Leases and retention are wall-clock UTC instants, so that they survive restarts. A clock
//! step moves every lease's remaining time with it (see the README).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
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
    async fn system_clock_sleeps_until_its_deadline() {
        let clock = SystemClock;
        let deadline = clock.now().plus(Duration::from_millis(20));
        clock.sleep_until(deadline).await;
        assert!(clock.now() >= deadline);
    }
}
