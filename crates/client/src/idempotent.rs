//! The one-call helper: [`Idempotent::run`] claims a key, runs your mutation once, keeps its lease
//! alive, stores its response (or releases the key), and replays the stored response to every
//! retry, handling what idempotency libraries most often get wrong.

use std::fmt;
use std::future::Future;
use std::time::{Duration, SystemTime};

use idempotency_proto::Reason;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::client::Client;
use crate::error::{BoxError, Error};
use crate::types::{Claim, ClaimOutcome, Grant, Stored};

/// The longest wait one Claim asks for; a longer wait is spread over several Claims.
const LONGEST_SERVER_WAIT: Duration = Duration::from_secs(60);
/// How long indeterminate calls are retried unless told otherwise.
const DEFAULT_RETRY_FOR: Duration = Duration::from_secs(30);
/// The shortest pause between renewals.
const SHORTEST_RENEWAL_INTERVAL: Duration = Duration::from_millis(30);

/// A mutation to run once per key: build it with [`Client::idempotent`], set what you need, then
/// [`run`](Idempotent::run) it.
///
/// What `run` does:
/// - Claims the key with a fresh random request id. A Claim whose outcome is unknown (the
///   coordinator unavailable, a deadline, a broken connection) is retried with the same request
///   id, with exponential backoff and jitter, for up to [`retry_for`](Idempotent::retry_for):
///   if the first Claim won the lease and only its reply was lost, the retry gets that lease back.
/// - A completed key: returns its stored response ([`Outcome::replayed`] is true) without
///   calling your closure.
/// - A key in progress elsewhere: [`Error::InProgress`], or with [`wait`](Idempotent::wait) it
///   waits for the running attempt (re-asking until the wait is spent) and returns its response.
/// - Acquired: calls your closure with a [`Lease`], and renews the lease every third of its
///   length while the closure runs. If a renewal is refused (someone took the key over after the
///   lease lapsed), [`Lease::lost`] resolves so the closure can stop, and `run` returns
///   [`Error::Rejected`] with [`Reason::LeaseLost`] without completing.
/// - The closure's `Ok(response)` is stored with Complete (retried with the same lease token if
///   its outcome is unknown; a repeated Complete returns the first result).
/// - The closure's `Err(failure)`: a retryable failure (any error, through `?`) releases the key
///   so that a retry runs the mutation again; a final one ([`Failure::final_response`], a
///   declined card, say) stores its response, which every retry then replays. Either way `run`
///   returns [`Error::Failed`].
/// - A closure that panics, or a `run` future that is dropped (the caller's request was
///   cancelled), releases nothing: the mutation may have partly happened, so the lease is left
///   to lapse and the next holder sees [`Lease::takeover`].
#[derive(Debug, Clone)]
pub struct Idempotent {
    client: Client,
    claim: Claim,
    wait: Duration,
    retry_for: Duration,
}

impl Idempotent {
    pub(crate) fn new(client: Client, namespace: String, key: String) -> Idempotent {
        Idempotent { client, claim: Claim::new(namespace, key), wait: Duration::ZERO, retry_for: DEFAULT_RETRY_FOR }
    }

    /// A digest of the request (at most 64 bytes): the key is refused to any other request.
    #[must_use]
    pub fn fingerprint(mut self, fingerprint: impl Into<bytes::Bytes>) -> Idempotent {
        self.claim = self.claim.fingerprint(fingerprint);
        self
    }

    /// The lease's length (the server's default when unset); renewed every third of it.
    #[must_use]
    pub fn lease_ttl(mut self, ttl: Duration) -> Idempotent {
        self.claim = self.claim.lease_ttl(ttl);
        self
    }

    /// How long the key and its response are remembered.
    #[must_use]
    pub fn retention(mut self, retention: Duration) -> Idempotent {
        self.claim = self.claim.retention(retention);
        self
    }

    /// Wait up to this long for an attempt running elsewhere, instead of [`Error::InProgress`].
    #[must_use]
    pub fn wait(mut self, wait: Duration) -> Idempotent {
        self.wait = wait;
        self
    }

    /// Who claims (an instance name), shown to others.
    #[must_use]
    pub fn owner(mut self, owner: impl Into<String>) -> Idempotent {
        self.claim = self.claim.owner(owner);
        self
    }

    /// How long a call whose outcome is unknown is retried before `run` gives up with
    /// [`Error::Unavailable`] (30 s by default); counted separately for the Claim and for the
    /// Complete or Release.
    #[must_use]
    pub fn retry_for(mut self, total: Duration) -> Idempotent {
        self.retry_for = total;
        self
    }

    /// Runs `work` once for the key, or replays what an earlier run stored (see [`Idempotent`]).
    pub async fn run<F, Fut>(self, work: F) -> Result<Outcome, Error>
    where
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = Result<Stored, Failure>>,
    {
        let grant = match self.acquire().await? {
            Acquired::Replay(outcome) => return Ok(outcome),
            Acquired::Grant(grant) => grant,
        };
        let (namespace, key) = (self.claim.namespace.as_str(), self.claim.key.as_str());
        let token = grant.lease_token.as_str();
        let (lost_sender, lost) = watch::channel(false);
        let lease =
            Lease { fencing_token: grant.fencing_token, attempt: grant.attempt, takeover: grant.takeover, lost };
        let result = {
            let work = work(lease);
            tokio::pin!(work);
            let renewals = self.renew_while_running(&grant, &lost_sender);
            tokio::pin!(renewals);
            tokio::select! {
                biased;
                result = &mut work => result,
                () = &mut renewals => unreachable!("renewals run until the work ends"),
            }
        };
        if *lost_sender.borrow() {
            return Err(Error::Rejected(Reason::LeaseLost, "the lease was lost while the work ran".to_owned()));
        }
        let retention = self.claim.retention;
        match result {
            Ok(response) => {
                let stored = response.clone();
                self.retrying(|| self.client.complete(namespace, key, token, stored.clone(), retention)).await?;
                Ok(Outcome { response, replayed: false, fencing_token: grant.fencing_token })
            }
            Err(Failure { source, store: None, abandon: true }) => Err(Error::Failed { source, stored: None }),
            Err(Failure { source, store: None, abandon: false }) => {
                // Best effort: if the Release does not get through, the lease lapses and the next
                // attempt takes over, which is safe too.
                if let Err(error) = self.retrying(|| self.client.release(namespace, key, token)).await {
                    tracing::warn!(%error, namespace, key, "releasing after a failed attempt did not succeed");
                }
                Err(Error::Failed { source, stored: None })
            }
            Err(Failure { source, store: Some(response), .. }) => {
                let stored = response.clone();
                self.retrying(|| self.client.complete(namespace, key, token, stored.clone(), retention)).await?;
                Err(Error::Failed { source, stored: Some(response) })
            }
        }
    }

    /// Claims until the key is acquired or completed, within the caller's wait.
    async fn acquire(&self) -> Result<Acquired, Error> {
        let claim = self.claim.clone().request_id(uuid::Uuid::new_v4().to_string());
        let wait_until = Instant::now() + self.wait;
        let mut longest_wait = LONGEST_SERVER_WAIT;
        loop {
            let remaining = wait_until.saturating_duration_since(Instant::now());
            let attempt =
                if remaining.is_zero() { claim.clone() } else { claim.clone().wait(remaining.min(longest_wait)) };
            let asked = Instant::now();
            let outcome = match self.retrying(|| self.client.claim(&attempt)).await {
                // A server whose longest wait is shorter says so: wait in steps of that length.
                Err(Error::Invalid { reason: Reason::InvalidWait, limit: Some(limit), .. })
                    if parse_seconds(&limit).is_some_and(|limit| limit < longest_wait) =>
                {
                    longest_wait = parse_seconds(&limit).unwrap_or(longest_wait);
                    continue;
                }
                outcome => outcome?,
            };
            match outcome {
                ClaimOutcome::Acquired(grant) => return Ok(Acquired::Grant(grant)),
                ClaimOutcome::Completed(replay) => {
                    return Ok(Acquired::Replay(Outcome {
                        response: replay.response,
                        replayed: true,
                        fencing_token: replay.fencing_token,
                    }));
                }
                ClaimOutcome::InProgress(busy) => {
                    let remaining = wait_until.saturating_duration_since(Instant::now());
                    if remaining.is_zero() {
                        return Err(Error::InProgress {
                            retry_after: busy.retry_after,
                            owner: busy.owner,
                            attempt: busy.attempt,
                        });
                    }
                    // A wait the server cut short (its own maximum, a call deadline) is asked
                    // again; one it did not honour at all is paced by its hint.
                    if asked.elapsed() < Duration::from_millis(5) {
                        tokio::time::sleep(busy.retry_after.clamp(Duration::from_millis(5), remaining)).await;
                    }
                }
            }
        }
    }

    /// Renews the lease every third of its length; on LEASE_LOST, says so and stops.
    async fn renew_while_running(&self, grant: &Grant, lost: &watch::Sender<bool>) {
        let ttl = self
            .claim
            .lease_ttl
            .unwrap_or_else(|| grant.lease_expires_at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO));
        let every = (ttl / 3).max(SHORTEST_RENEWAL_INTERVAL);
        let (namespace, key) = (self.claim.namespace.as_str(), self.claim.key.as_str());
        loop {
            tokio::time::sleep(every).await;
            match self.client.renew(namespace, key, &grant.lease_token, self.claim.lease_ttl).await {
                Ok(_) => {}
                Err(Error::Rejected(Reason::LeaseLost | Reason::AlreadyCompleted, _)) => {
                    lost.send_replace(true);
                    return std::future::pending().await;
                }
                // Unknown or transient: the next renewal tries again, well before the lease ends.
                Err(error) => tracing::debug!(%error, namespace, key, "a lease renewal failed; trying again"),
            }
        }
    }

    /// Calls `call` until its outcome is known or `retry_for` is spent.
    async fn retrying<T, C, Fut>(&self, mut call: C) -> Result<T, Error>
    where
        C: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let give_up_at = Instant::now() + self.retry_for;
        let mut backoff = Backoff::new();
        loop {
            match call().await {
                Err(error) if error.is_indeterminate() => {
                    let pause = backoff.next_pause();
                    if Instant::now() + pause >= give_up_at {
                        return Err(error);
                    }
                    tokio::time::sleep(pause).await;
                }
                result => return result,
            }
        }
    }
}

/// Reads a limit the server wrote as a duration (`60s`, `1m`, `1m 30s`, `500ms`).
fn parse_seconds(text: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    for part in text.split_whitespace() {
        let split = part.find(|c: char| !c.is_ascii_digit())?;
        let (number, unit) = part.split_at(split);
        let number: u64 = number.parse().ok()?;
        total += match unit {
            "ms" => Duration::from_millis(number),
            "s" => Duration::from_secs(number),
            "m" => Duration::from_secs(number * 60),
            "h" => Duration::from_secs(number * 3600),
            _ => return None,
        };
    }
    (!total.is_zero()).then_some(total)
}

enum Acquired {
    Grant(Grant),
    Replay(Outcome),
}

/// Exponential backoff from 25 ms to 1 s, each pause drawn from its upper half (jitter), so that
/// clients that failed together do not retry together.
struct Backoff {
    next: Duration,
    random: u64,
}

impl Backoff {
    fn new() -> Backoff {
        let seed = uuid::Uuid::new_v4().as_u64_pair().0 | 1;
        Backoff { next: Duration::from_millis(25), random: seed }
    }

    fn next_pause(&mut self) -> Duration {
        // xorshift64: plenty for jitter.
        self.random ^= self.random << 13;
        self.random ^= self.random >> 7;
        self.random ^= self.random << 17;
        let ceiling = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(1));
        let fraction = (self.random % 1024) as u32;
        ceiling / 2 + ceiling / 2 * fraction / 1024
    }
}

/// The lease your closure runs under.
#[derive(Debug, Clone)]
pub struct Lease {
    fencing_token: u64,
    attempt: u32,
    takeover: bool,
    lost: watch::Receiver<bool>,
}

impl Lease {
    /// Strictly increases with every grant of the key: write it with your mutation so that your
    /// own storage can refuse a stale holder's late writes.
    pub fn fencing_token(&self) -> u64 {
        self.fencing_token
    }

    /// 1 for the key's first grant, +1 for each later one.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The previous holder's lease lapsed without Complete or Release: it may have partly run
    /// the mutation, so check for its effects before running it again.
    pub fn takeover(&self) -> bool {
        self.takeover
    }

    /// Whether the lease is lost (a renewal was refused: someone else holds the key now).
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Resolves once the lease is lost: stop the work, whatever it would write is fenced off.
    pub async fn lost(&self) {
        let mut lost = self.lost.clone();
        // An error means `run` is over: nobody looks after the lease any more either.
        let _ = lost.wait_for(|lost| *lost).await;
    }
}

/// What `run` ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    response: Stored,
    replayed: bool,
    fencing_token: u64,
}

impl Outcome {
    /// The stored response: this run's, or an earlier run's.
    pub fn response(&self) -> &Stored {
        &self.response
    }

    /// The stored response, owned.
    pub fn into_response(self) -> Stored {
        self.response
    }

    /// True when the response came from an earlier run (this call ran nothing).
    pub fn replayed(&self) -> bool {
        self.replayed
    }

    /// The fencing token of the grant whose response this is.
    pub fn fencing_token(&self) -> u64 {
        self.fencing_token
    }
}

/// How the work failed: retryable (the key is released, a retry runs it again) or final (its
/// response is stored and replayed). Any error converts into a retryable failure, so `?` works in
/// the closure.
pub struct Failure {
    source: BoxError,
    store: Option<Stored>,
    abandon: bool,
}

impl Failure {
    /// A failure that changed nothing: the key is released and a retry runs the work again.
    pub fn retry(error: impl Into<BoxError>) -> Failure {
        Failure { source: error.into(), store: None, abandon: false }
    }

    /// A failure whose effects are unknown (the work may have partly happened): neither
    /// released nor stored, the lease is left to lapse, and the next attempt takes the key over
    /// ([`Lease::takeover`] is true there), as after a crash.
    pub fn abandon(error: impl Into<BoxError>) -> Failure {
        Failure { source: error.into(), store: None, abandon: true }
    }

    /// A final failure (a declined card): `response` is stored, and every retry replays it.
    pub fn final_response(response: Stored, error: impl Into<BoxError>) -> Failure {
        Failure { source: error.into(), store: Some(response), abandon: false }
    }

    /// Whether the failure is final (its response is stored).
    pub fn is_final(&self) -> bool {
        self.store.is_some()
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for Failure {
    fn from(error: E) -> Failure {
        Failure::retry(error)
    }
}

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Failure").field("source", &self.source).field("final", &self.is_final()).finish()
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_limits_read_as_the_server_writes_them() {
        assert_eq!(parse_seconds("1m"), Some(Duration::from_secs(60)));
        assert_eq!(parse_seconds("1m 30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_seconds("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_seconds("soon"), None);
        assert_eq!(parse_seconds(""), None);
    }

    #[test]
    fn backoff_grows_to_a_second_with_jitter_in_the_upper_half() {
        let mut backoff = Backoff::new();
        let pauses: Vec<Duration> = (0..10).map(|_| backoff.next_pause()).collect();
        let ceilings = [25, 50, 100, 200, 400, 800, 1000, 1000, 1000, 1000].map(Duration::from_millis);
        for (pause, ceiling) in pauses.iter().zip(ceilings) {
            assert!(*pause >= ceiling / 2 && *pause <= ceiling, "{pause:?} within {ceiling:?}");
        }
    }
}
