//! Claims and Completes sent to the database in batches, as the sled store's group commit shares
//! one flush among the writes that are ready together.
//!
//! A call puts its item in its kind's queue. At most [`RUNNING`] batch of a kind runs at a time,
//! on a task of its own (so that a caller that goes away cancels nothing). A batch takes every
//! item queued when it starts, up to [`MAX_ITEMS`]: one item is sent as the single call's
//! statement (`claim_core`, `complete`), more as one `claim_many` or `complete_many`: one
//! statement, one transaction and one commit for all of them. So a call that finds no batch
//! running is sent at once, as before, and calls that arrive while one runs share the next one
//! instead of each paying a round trip, a transaction and a commit flush.
//!
//! A batch held up in the database (a row locked by a long transaction elsewhere) must not hold
//! up every other call of its kind: once the latest batch has run for [`STALLED`], a call that
//! arrives starts another, up to [`MAX_RUNNING`] at a time.
//!
//! The rules are those of the single call: `claim_many` and `complete_many` apply each item
//! through the same function, in (namespace, key) order, so that two batches lock the keys they
//! share in the same order. A batch the database aborts for a deadlock or a serialization failure
//! (a sweep or a purge locks in another order) is sent again one item at a time; any other
//! failure of a batch is each of its items' failure.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use idempotency_core::store::{ErrorChain, StoreError};
use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_postgres::error::SqlState;

/// Batches of one kind running at a time. One: measured against two (BENCHMARKS.md, "Scaling
/// out on PostgreSQL"), the larger batches were worth more than the parallelism.
pub(crate) const RUNNING: usize = 1;
/// The most items one batch takes.
pub(crate) const MAX_ITEMS: usize = 64;
/// How long the latest batch may run before a call that arrives starts another one (a batch
/// takes a few milliseconds; one stuck on a lock can take up to the store's timeout).
pub(crate) const STALLED: Duration = Duration::from_millis(50);
/// The most batches of one kind running at a time, stalled ones included.
pub(crate) const MAX_RUNNING: usize = 8;

/// A statement failed; `alone` when its items may succeed if sent one at a time.
pub(crate) struct Failed {
    pub(crate) error: StoreError,
    pub(crate) alone: bool,
}

impl Failed {
    pub(crate) fn from_database(error: tokio_postgres::Error) -> Failed {
        let alone = matches!(error.code(), Some(code) if *code == SqlState::T_R_DEADLOCK_DETECTED
            || *code == SqlState::T_R_SERIALIZATION_FAILURE);
        Failed { error: crate::connection::database_error(error), alone }
    }
}

impl From<StoreError> for Failed {
    fn from(error: StoreError) -> Failed {
        Failed { error, alone: false }
    }
}

/// What batches are sent to.
pub(crate) trait Database: Send + Sync + 'static {
    /// One item's outcome (a row).
    type Output: Send + 'static;
    /// Counts a batch of `items`, for the metrics.
    fn observe(&self, items: usize);
    /// The position (from 1) of the item an outcome of [`Batched::many`] belongs to.
    fn position(output: &Self::Output) -> Option<usize>;
}

type Output<I> = <<I as Batched>::State as Database>::Output;

/// A kind of call that can be batched.
pub(crate) trait Batched: Sized + Send + Sync + 'static {
    /// What the calls run against.
    type State: Database;
    /// The queue of this kind.
    fn queue(state: &Self::State) -> &Queue<Self>;
    /// Sends one item as a single call.
    fn one(state: &Self::State, item: &Self) -> impl Future<Output = Result<Output<Self>, StoreError>> + Send;
    /// Sends several items as one statement: one outcome per item, in any order.
    fn many(state: &Self::State, items: &[Self]) -> impl Future<Output = Result<Vec<Output<Self>>, Failed>> + Send;
}

type Reply<I> = oneshot::Sender<Result<Output<I>, StoreError>>;

/// The items waiting for a batch, and how many batches run.
pub(crate) struct Queue<I: Batched> {
    inner: Mutex<QueueState<I>>,
}

struct QueueState<I: Batched> {
    waiting: Vec<(I, Reply<I>)>,
    running: usize,
    /// When the latest batch was taken.
    latest: Instant,
}

impl<I: Batched> Default for Queue<I> {
    fn default() -> Self {
        Queue { inner: Mutex::new(QueueState { waiting: Vec::new(), running: 0, latest: Instant::now() }) }
    }
}

/// Sends `item` in the next batch of its kind; its outcome.
pub(crate) async fn submit<I: Batched>(state: &Arc<I::State>, item: I) -> Result<Output<I>, StoreError> {
    let (reply, answer) = oneshot::channel();
    let start = {
        let mut queue = I::queue(state).inner.lock();
        queue.waiting.push((item, reply));
        let start = queue.running < RUNNING || (queue.running < MAX_RUNNING && queue.latest.elapsed() >= STALLED);
        if start {
            // The calls after this one wait for the batch it starts, unless that stalls too.
            queue.running += 1;
            queue.latest = Instant::now();
        }
        start
    };
    if start {
        tokio::spawn(run_batches::<I>(Arc::clone(state)));
    }
    answer.await.unwrap_or_else(|_| Err(StoreError::unavailable("the database call was dropped")))
}

/// Runs batches of the waiting items until none is left.
async fn run_batches<I: Batched>(state: Arc<I::State>) {
    loop {
        // Calls that are ready to run put their items in first, so that they share this batch
        // (as the sled store's group commit yields before it asks for a flush).
        tokio::task::yield_now().await;
        let taken: Vec<(I, Reply<I>)> = {
            let mut queue = I::queue(&state).inner.lock();
            if queue.waiting.is_empty() {
                queue.running -= 1;
                return;
            }
            let count = queue.waiting.len().min(MAX_ITEMS);
            queue.latest = Instant::now();
            queue.waiting.drain(..count).collect()
        };
        let (items, replies): (Vec<I>, Vec<Reply<I>>) = taken.into_iter().unzip();
        state.observe(items.len());
        for (reply, result) in replies.into_iter().zip(run::<I>(&state, &items).await) {
            // The caller may have gone away; its outcome stands regardless.
            let _ = reply.send(result);
        }
    }
}

/// Sends `items`; one result per item, in their order.
async fn run<I: Batched>(state: &I::State, items: &[I]) -> Vec<Result<Output<I>, StoreError>> {
    if let [item] = items {
        return vec![I::one(state, item).await];
    }
    match I::many(state, items).await {
        Ok(outputs) => {
            let mut results: Vec<Option<Output<I>>> = items.iter().map(|_| None).collect();
            for output in outputs {
                if let Some(slot) = I::State::position(&output).and_then(|at| results.get_mut(at.wrapping_sub(1))) {
                    *slot = Some(output);
                }
            }
            results
                .into_iter()
                .map(|output| {
                    output.ok_or_else(|| StoreError::Corrupt("a batch returned no outcome for an item".to_owned()))
                })
                .collect()
        }
        Err(Failed { alone: true, .. }) => {
            let mut results = Vec::with_capacity(items.len());
            for item in items {
                results.push(I::one(state, item).await);
            }
            results
        }
        Err(Failed { error, alone: false }) => items.iter().map(|_| Err(shared(&error))).collect(),
    }
}

/// The failure of a whole batch, for each of its items.
fn shared(error: &StoreError) -> StoreError {
    match error {
        StoreError::Rejected(rejection) => StoreError::Rejected(*rejection),
        StoreError::Full { max_records } => StoreError::Full { max_records: *max_records },
        StoreError::NamespaceFull { max_records } => StoreError::NamespaceFull { max_records: *max_records },
        StoreError::Unavailable { context, cause: None } => StoreError::unavailable(context.clone()),
        StoreError::Unavailable { context, cause: Some(cause) } => {
            StoreError::unavailable_because(context.clone(), ErrorChain(cause.as_ref()).to_string())
        }
        StoreError::Corrupt(message) => StoreError::Corrupt(message.clone()),
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::Semaphore;

    use super::*;

    /// What a fake database saw and how it answers.
    #[derive(Default)]
    struct Fake {
        queue: Queue<Item>,
        /// Every statement sent: the items it carried.
        sent: Mutex<Vec<Vec<u32>>>,
        /// Holds the statements until released (closed: they run at once).
        gate: Option<Semaphore>,
        /// How a batch of several fails, if it does.
        fail_many: Option<bool>,
    }

    struct Item(u32);

    impl Database for Fake {
        type Output = (usize, u32);

        fn observe(&self, _: usize) {}

        fn position(output: &(usize, u32)) -> Option<usize> {
            Some(output.0)
        }
    }

    impl Batched for Item {
        type State = Fake;

        fn queue(state: &Fake) -> &Queue<Item> {
            &state.queue
        }

        async fn one(state: &Fake, item: &Item) -> Result<(usize, u32), StoreError> {
            state.sent.lock().push(vec![item.0]);
            if let Some(gate) = &state.gate {
                gate.acquire().await.unwrap().forget();
            }
            Ok((1, item.0 * 10))
        }

        async fn many(state: &Fake, items: &[Item]) -> Result<Vec<(usize, u32)>, Failed> {
            state.sent.lock().push(items.iter().map(|item| item.0).collect());
            if let Some(alone) = state.fail_many {
                return Err(Failed { error: StoreError::unavailable("the batch failed"), alone });
            }
            // In another order than sent, as `claim_many` returns them (by key).
            Ok(items.iter().enumerate().rev().map(|(at, item)| (at + 1, item.0 * 10)).collect())
        }
    }

    /// Submits `Item(n)` on a task of its own.
    fn spawn_submit(fake: &Arc<Fake>, n: u32) -> tokio::task::JoinHandle<Result<(usize, u32), StoreError>> {
        let fake = Arc::clone(fake);
        tokio::spawn(async move { submit(&fake, Item(n)).await })
    }

    /// Submits items 1..=count at once while the first statement is held, then lets it go.
    async fn submit_while_held(fake: Fake, count: u32) -> (Arc<Fake>, Vec<Result<(usize, u32), StoreError>>) {
        let fake = Arc::new(Fake { gate: Some(Semaphore::new(0)), ..fake });
        let first = spawn_submit(&fake, 1);
        while fake.sent.lock().is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let rest: Vec<_> = (2..=count).map(|n| spawn_submit(&fake, n)).collect();
        while fake.queue.inner.lock().waiting.len() < (count - 1) as usize {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        fake.gate.as_ref().unwrap().add_permits(1_000);
        let mut results = vec![first.await.unwrap()];
        for task in rest {
            results.push(task.await.unwrap());
        }
        (fake, results)
    }

    #[tokio::test]
    async fn calls_that_arrive_while_a_batch_runs_share_the_next_and_each_gets_its_own_outcome() {
        let (fake, results) = submit_while_held(Fake::default(), 9).await;
        assert_eq!(*fake.sent.lock(), vec![vec![1], (2..=9).collect::<Vec<_>>()]);
        let values: Vec<u32> = results.into_iter().map(|result| result.unwrap().1).collect();
        assert_eq!(values, (1..=9).map(|n| n * 10).collect::<Vec<_>>());
        // With nothing left to send, the batch task ends.
        for _ in 0..1_000 {
            if fake.queue.inner.lock().running == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("the batch task did not end");
    }

    #[tokio::test]
    async fn a_batch_that_may_succeed_alone_is_sent_again_one_item_at_a_time() {
        let (fake, results) = submit_while_held(Fake { fail_many: Some(true), ..Fake::default() }, 4).await;
        assert_eq!(*fake.sent.lock(), vec![vec![1], vec![2, 3, 4], vec![2], vec![3], vec![4]]);
        let values: Vec<u32> = results.into_iter().map(|result| result.unwrap().1).collect();
        assert_eq!(values, vec![10, 20, 30, 40]);
    }

    #[tokio::test]
    async fn any_other_failure_of_a_batch_is_each_of_its_items_failure() {
        let (fake, results) = submit_while_held(Fake { fail_many: Some(false), ..Fake::default() }, 4).await;
        assert_eq!(fake.sent.lock().len(), 2, "not sent again");
        assert!(results[0].is_ok());
        for result in &results[1..] {
            assert!(
                matches!(result, Err(StoreError::Unavailable { context, .. }) if context == "the batch failed"),
                "{result:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_caller_that_goes_away_cancels_nothing() {
        let fake = Arc::new(Fake { gate: Some(Semaphore::new(0)), ..Fake::default() });
        let caller = spawn_submit(&fake, 7);
        while fake.sent.lock().is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        caller.abort();
        let _ = caller.await;
        fake.gate.as_ref().unwrap().add_permits(2);
        // The statement finishes and its task ends; the next call is sent at once.
        let later = submit(&fake, Item(8)).await.unwrap();
        assert_eq!(later.1, 80);
        assert_eq!(*fake.sent.lock(), vec![vec![7], vec![8]]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_stuck_in_the_database_does_not_hold_up_the_calls_after_it() {
        let fake = Arc::new(Fake { gate: Some(Semaphore::new(0)), ..Fake::default() });
        let stuck = spawn_submit(&fake, 1);
        while fake.sent.lock().is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Within STALLED, a call waits for the running batch.
        let early = spawn_submit(&fake, 2);
        tokio::time::sleep(STALLED + Duration::from_millis(20)).await;
        assert_eq!(fake.sent.lock().len(), 1, "sent while the first batch ran: {:?}", fake.sent.lock());
        // Past it, the next call starts a batch of its own (taking the one waiting with it).
        let late = spawn_submit(&fake, 3);
        for _ in 0..1_000 {
            if fake.sent.lock().len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(*fake.sent.lock(), vec![vec![1], vec![2, 3]]);
        fake.gate.as_ref().unwrap().add_permits(2);
        assert_eq!(stuck.await.unwrap().unwrap().1, 10);
        assert_eq!(early.await.unwrap().unwrap().1, 20);
        assert_eq!(late.await.unwrap().unwrap().1, 30);
    }
}
