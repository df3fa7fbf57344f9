//! The coordinator: applies commands through the store at the clock's time, and owns the rules
//! that span calls: waiting for a held key, waking waiters, and draining.
//!
//! Invariant: a waiter registers for wake-ups before it looks at the key, so a Complete or
//! Release that lands between its look and its wait still wakes it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::domain::{
    Claim, ClaimOutcome, Complete, CompleteOutcome, InvalidInput, Key, KeyView, Limits, Namespace, Rejection, Release,
    Renew, RenewOutcome,
};
use crate::store::{Store, StoreError, SweepReport, Wakeup};

/// Why a coordinator call did not succeed: the input, the store, or the coordinator itself.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or out of bounds; nothing changed.
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    /// The store refused the command, was full, failed, or did not answer in time.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The server is draining.
    #[error("the server is shutting down")]
    ShuttingDown,
}

impl From<Rejection> for Error {
    fn from(rejection: Rejection) -> Self {
        Error::Store(StoreError::Rejected(rejection))
    }
}

type WaitKey = (Namespace, Key);

/// Applies commands through a [`Store`]; shared by the gRPC service and the sweeper.
pub struct Coordinator<S> {
    store: S,
    clock: Arc<dyn Clock>,
    limits: Limits,
    waiters: Mutex<HashMap<WaitKey, Arc<Notify>>>,
    draining: CancellationToken,
    /// Calls admitted so far; the sweeper reads it to tell whether calls are being served.
    admitted: AtomicU64,
    /// Claims parked in a wait now, and how many may be.
    waiting: std::sync::atomic::AtomicUsize,
    max_waiting: usize,
    /// How the Claims that waited ended.
    waits: WaitCounts,
}

/// How many Claims that waited for a held key ended each way (a Claim that found the key free
/// or completed at once did not wait and is not counted).
#[derive(Debug, Default)]
pub struct WaitCounts {
    /// The holder completed: the waiter got the stored response.
    pub completed: AtomicU64,
    /// The holder released or its lease lapsed: the waiter was granted the key.
    pub acquired: AtomicU64,
    /// The wait (or the call's deadline) ran out with the key still held.
    pub timed_out: AtomicU64,
    /// The server began draining, which ends every wait.
    pub drained: AtomicU64,
}

impl<S: Store> Coordinator<S> {
    /// A coordinator over `store`, reading time from `clock`.
    pub fn new(store: S, clock: Arc<dyn Clock>, limits: Limits) -> Self {
        Coordinator {
            store,
            clock,
            limits,
            waiters: Mutex::new(HashMap::new()),
            draining: CancellationToken::new(),
            admitted: AtomicU64::new(0),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            max_waiting: usize::MAX,
            waits: WaitCounts::default(),
        }
    }

    /// How the Claims that waited ended, so far.
    pub fn wait_counts(&self) -> &WaitCounts {
        &self.waits
    }

    /// Lets at most `max_waiting` Claims wait at once; beyond it a Claim that would wait answers
    /// `in_progress` at once (a waiting Claim holds a task and its request until it ends).
    #[must_use]
    pub fn with_max_waiting(mut self, max_waiting: usize) -> Self {
        self.max_waiting = max_waiting;
        self
    }

    /// How many Claims are waiting now.
    pub fn waiting_claims(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// The request bounds and defaults in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The store underneath.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The time by the coordinator's clock.
    pub fn now(&self) -> crate::domain::Timestamp {
        self.clock.now()
    }

    /// Claims a key; if it is held and `wait` is non-zero, waits up to `wait` (by the clock) for
    /// the holder to complete, release or lapse, but answers by `answer_by` (real time, from the
    /// call's deadline) in any case. Cancel-safe: dropping the future while it waits changes nothing.
    pub async fn claim(
        &self,
        namespace: &Namespace,
        key: &Key,
        claim: &Claim,
        wait: Duration,
        answer_by: Option<Instant>,
    ) -> Result<ClaimOutcome, Error> {
        self.admit()?;
        let mut now = self.clock.now();
        let give_up_at = now.plus(wait);
        let waiter = (!wait.is_zero()).then(|| self.waiter(namespace, key)).flatten();
        let mut waited = false;
        loop {
            let notified = waiter.as_ref().map(|waiter| waiter.notify.notified());
            tokio::pin!(notified);
            if let Some(notified) = notified.as_mut().as_pin_mut() {
                notified.enable();
            }
            let outcome = within(answer_by, self.store.claim(namespace, key, now, claim, waiter.is_some())).await?;
            let ClaimOutcome::InProgress { lease_expires_at, .. } = &outcome else {
                if waited {
                    let counter = match outcome {
                        ClaimOutcome::Completed(_) => &self.waits.completed,
                        _ => &self.waits.acquired,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                return Ok(outcome);
            };
            let out_of_time = answer_by.is_some_and(|answer_by| Instant::now() >= answer_by);
            if waiter.is_none() || now >= give_up_at || out_of_time || self.draining.is_cancelled() {
                if waited {
                    self.count_wait_given_up();
                }
                return Ok(outcome);
            }
            let wake_at = (*lease_expires_at).min(give_up_at);
            waited = true;
            tokio::select! {
                _ = async { if let Some(n) = notified.as_mut().as_pin_mut() { n.await } } => {}
                () = self.clock.sleep_until(wake_at) => {}
                () = self.draining.cancelled() => {}
                () = async {
                    match answer_by {
                        Some(answer_by) => tokio::time::sleep_until(answer_by).await,
                        None => std::future::pending().await,
                    }
                } => {
                    // The call's deadline is near: answer with what was seen, rather than ask
                    // the store again with no time left to wait for it.
                    self.count_wait_given_up();
                    return Ok(outcome);
                }
            }
            now = self.clock.now();
        }
    }

    /// Counts a wait that ended with the key still held: drained, or out of time.
    fn count_wait_given_up(&self) {
        let counter = if self.draining.is_cancelled() { &self.waits.drained } else { &self.waits.timed_out };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Stores the response; wakes Claims waiting for the key. Like every call here, it answers
    /// [`StoreError::Unavailable`] at `answer_by` if the store has not answered by then.
    pub async fn complete(
        &self,
        namespace: &Namespace,
        key: &Key,
        complete: Complete,
        answer_by: Option<Instant>,
    ) -> Result<CompleteOutcome, Error> {
        self.admit()?;
        let outcome = within(answer_by, self.store.complete(namespace, key, self.clock.now(), complete)).await?;
        // Also on a retried Complete: the first one may have stored the response and then lost
        // its call before waking anyone.
        self.wake(namespace, key);
        Ok(outcome)
    }

    /// Extends (or shortens) the holder's lease; waiters re-arm their timers on the new end.
    pub async fn renew(
        &self,
        namespace: &Namespace,
        key: &Key,
        renew: &Renew,
        answer_by: Option<Instant>,
    ) -> Result<RenewOutcome, Error> {
        self.admit()?;
        let outcome = within(answer_by, self.store.renew(namespace, key, self.clock.now(), renew)).await?;
        self.wake(namespace, key);
        Ok(outcome)
    }

    /// Gives the key back; wakes Claims waiting for it.
    pub async fn release(
        &self,
        namespace: &Namespace,
        key: &Key,
        release: &Release,
        answer_by: Option<Instant>,
    ) -> Result<(), Error> {
        self.admit()?;
        within(answer_by, self.store.release(namespace, key, self.clock.now(), release)).await?;
        self.wake(namespace, key);
        Ok(())
    }

    /// Reads a key.
    pub async fn lookup(&self, namespace: &Namespace, key: &Key, answer_by: Option<Instant>) -> Result<KeyView, Error> {
        self.admit()?;
        within(answer_by, self.store.lookup(namespace, key, self.clock.now())).await
    }

    /// Deletes up to `batch` expired records.
    pub async fn sweep(&self, batch: usize) -> Result<SweepReport, Error> {
        Ok(self.store.sweep(self.clock.now(), batch).await?)
    }

    /// Starts draining: new calls fail with [`Error::ShuttingDown`], waiting Claims answer now.
    pub fn drain(&self) {
        self.draining.cancel();
    }

    /// How many calls have been admitted since the coordinator started.
    pub fn calls_admitted(&self) -> u64 {
        self.admitted.load(Ordering::Relaxed)
    }

    /// Counts a call in, or refuses it while draining.
    fn admit(&self) -> Result<(), Error> {
        if self.draining.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        self.admitted.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// A waiting Claim's registration, or `None` when `max_waiting` Claims already wait.
    fn waiter(&self, namespace: &Namespace, key: &Key) -> Option<Waiter<'_, S>> {
        let parked = self.waiting.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |waiting| {
            (waiting < self.max_waiting).then_some(waiting + 1)
        });
        if parked.is_err() {
            return None;
        }
        let wait_key = (namespace.clone(), key.clone());
        let notify = Arc::clone(self.waiters.lock().entry(wait_key.clone()).or_default());
        Some(Waiter { coordinator: self, wait_key, notify })
    }

    /// Wakes the Claims waiting here for a key that changed elsewhere (another replica), or all
    /// of them after changes may have been missed.
    pub fn wake_for(&self, wakeup: &Wakeup) {
        match wakeup {
            Wakeup::Key(namespace, key) => self.wake(namespace, key),
            Wakeup::All => {
                for notify in self.waiters.lock().values() {
                    notify.notify_waiters();
                }
            }
        }
    }

    fn wake(&self, namespace: &Namespace, key: &Key) {
        let waiters = self.waiters.lock();
        if waiters.is_empty() {
            return;
        }
        if let Some(notify) = waiters.get(&(namespace.clone(), key.clone())) {
            notify.notify_waiters();
        }
    }

    /// How many keys have Claims waiting on them (for tests and metrics).
    pub fn waiting_keys(&self) -> usize {
        self.waiters.lock().len()
    }
}

/// Awaits a store call, or fails with [`StoreError::Unavailable`] at `answer_by`: a caller whose
/// deadline is near gets the contract's answer for an indeterminate call (retry it) instead of
/// the transport's CANCELLED or DEADLINE_EXCEEDED. The store call is dropped there; whatever it
/// had done stays done, as for any call that fails with UNAVAILABLE.
async fn within<T>(
    answer_by: Option<Instant>,
    call: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, Error> {
    match answer_by {
        None => Ok(call.await?),
        Some(answer_by) => match tokio::time::timeout_at(answer_by, call).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(StoreError::unavailable("the store did not answer within the call's deadline").into()),
        },
    }
}

/// One waiting Claim's registration; the last one to leave removes the key's entry.
struct Waiter<'a, S> {
    coordinator: &'a Coordinator<S>,
    wait_key: WaitKey,
    notify: Arc<Notify>,
}

impl<S> Drop for Waiter<'_, S> {
    fn drop(&mut self) {
        self.coordinator.waiting.fetch_sub(1, Ordering::SeqCst);
        let mut waiters = self.coordinator.waiters.lock();
        // The map holds one reference and this waiter another: if that is all, nobody else waits.
        if Arc::strong_count(&self.notify) == 2 {
            waiters.remove(&self.wait_key);
        }
    }
}
