//! The key state machine: given `now`, a key's current record and a command, decide the new
//! record and the outcome. Every contract rule lives here once; stores only make the result
//! atomic and durable.
//!
//! Rules enforced here:
//! - A record whose retention ended is treated as absent by every command.
//! - A non-empty fingerprint that differs from the stored non-empty one is refused in any state.
//! - Only the latest grant's token may Complete, Renew or Release, also after its lease lapsed,
//!   until someone else takes the key over.
//! - Every grant draws a fencing token greater than the key's previous one.
//! - A stored response is never replaced.

use std::time::Duration;

use super::record::{Lease, Record, RecordState};
use super::values::{ApiResponse, FencingToken, Fingerprint, LeaseToken, Owner, RequestId, Timestamp};

/// The longest `retry_after` hinted to a caller that finds a key in progress.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(1);

/// An expected refusal: the caller must act differently, nothing was changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The key is bound to another request's fingerprint.
    #[error("the key was first used with a different request fingerprint")]
    FingerprintMismatch,
    /// The lease token does not (or no longer) hold the key.
    #[error("the lease token does not hold the key")]
    LeaseLost,
    /// The key is completed by this token; there is nothing left to renew or release.
    #[error("the key is already completed")]
    AlreadyCompleted,
    /// The key is absent or its retention ended.
    #[error("the key is not known")]
    NotFound,
}

/// A decided command: the record to store (`None`: leave it as it is) and the caller's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition<T> {
    /// The new record, or `None` when nothing changes.
    pub write: Option<Record>,
    /// What the caller is told.
    pub outcome: T,
}

impl<T> Transition<T> {
    fn unchanged(outcome: T) -> Self {
        Transition { write: None, outcome }
    }
}

/// Claim a key.
#[derive(Debug, Clone)]
pub struct Claim {
    /// The request's fingerprint (may be empty).
    pub fingerprint: Fingerprint,
    /// The lease to grant.
    pub lease_ttl: Duration,
    /// How long to keep the record after its last change.
    pub retention: Duration,
    /// The caller's id for this Claim, to recognise its retries.
    pub request_id: Option<RequestId>,
    /// Who claims.
    pub owner: Owner,
    /// The token to hand out if the key is granted (drawn by the caller so this stays pure).
    pub new_lease_token: LeaseToken,
}

/// What a Claim returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The caller holds the key.
    Acquired(Grant),
    /// Someone else holds a valid lease.
    InProgress {
        /// When the holder's lease lapses unless renewed.
        lease_expires_at: Timestamp,
        /// The holder's attempt number.
        attempt: u32,
        /// The holder's name.
        owner: Owner,
        /// When it is worth asking again.
        retry_after: Duration,
    },
    /// The response is stored.
    Completed(Replay),
}

/// A lease as handed to its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The holder's secret.
    pub lease_token: LeaseToken,
    /// Greater than every earlier grant's token of the same key.
    pub fencing_token: FencingToken,
    /// When the lease lapses unless renewed.
    pub lease_expires_at: Timestamp,
    /// 1 for the first grant, +1 for each later one.
    pub attempt: u32,
    /// Whether the previous holder's lease lapsed.
    pub takeover: bool,
}

/// A completed key as replayed to callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    /// The stored response.
    pub response: ApiResponse,
    /// When Complete was applied.
    pub completed_at: Timestamp,
    /// When retention ends.
    pub expires_at: Timestamp,
    /// The fencing token of the grant that completed the key.
    pub fencing_token: FencingToken,
}

/// Store a response.
#[derive(Debug, Clone)]
pub struct Complete {
    /// The holder's token.
    pub lease_token: LeaseToken,
    /// The response to store.
    pub response: ApiResponse,
    /// Retention to apply from now; `None` keeps the Claim's.
    pub retention: Option<Duration>,
}

/// What a Complete returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompleteOutcome {
    /// When Complete was applied (the first time, for a retried one).
    pub completed_at: Timestamp,
    /// When retention ends.
    pub expires_at: Timestamp,
    /// The completing grant's fencing token.
    pub fencing_token: FencingToken,
    /// True when this token had completed the key before; the earlier response is kept.
    pub already_completed: bool,
}

/// Extend a lease.
#[derive(Debug, Clone)]
pub struct Renew {
    /// The holder's token.
    pub lease_token: LeaseToken,
    /// The new lease length from now.
    pub lease_ttl: Duration,
}

/// What a Renew returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenewOutcome {
    /// The new lease end.
    pub lease_expires_at: Timestamp,
    /// The holder's fencing token.
    pub fencing_token: FencingToken,
}

/// Give a key back.
#[derive(Debug, Clone)]
pub struct Release {
    /// The holder's token.
    pub lease_token: LeaseToken,
}

/// The state of a key as Lookup reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// A caller holds a valid lease.
    InProgress,
    /// The lease lapsed without Complete or Release.
    LeaseExpired,
    /// The holder released the key.
    Released,
    /// The response is stored.
    Completed,
}

/// What Lookup returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyView {
    /// Where the key stands.
    pub state: KeyState,
    /// The fingerprint the key is bound to.
    pub fingerprint: Fingerprint,
    /// The latest grant's fencing token.
    pub fencing_token: FencingToken,
    /// The latest grant's attempt number.
    pub attempt: u32,
    /// The latest grant's owner.
    pub owner: Owner,
    /// The lease end, for held keys.
    pub lease_expires_at: Option<Timestamp>,
    /// The stored response and when it was stored, for completed keys.
    pub completed: Option<(ApiResponse, Timestamp)>,
    /// When retention ends.
    pub expires_at: Timestamp,
}

/// Where a live record stands at `now` (what Lookup and the Admin API's listing report).
pub fn key_state(now: Timestamp, record: &Record) -> KeyState {
    match &record.state {
        RecordState::Held(lease) if lease.expires_at > now => KeyState::InProgress,
        RecordState::Held(_) => KeyState::LeaseExpired,
        RecordState::Released { .. } => KeyState::Released,
        RecordState::Completed { .. } => KeyState::Completed,
    }
}

/// Drops a record whose retention ended: from then on it is as if the key never existed.
fn live(now: Timestamp, current: Option<&Record>) -> Option<&Record> {
    current.filter(|record| !record.is_expired(now))
}

/// Decides a Claim. `next_fencing_token(floor)` must return a token greater than `floor` and than
/// every token it returned before; it is called only when the key is granted.
pub fn claim(
    now: Timestamp,
    current: Option<&Record>,
    command: &Claim,
    next_fencing_token: impl FnOnce(FencingToken) -> FencingToken,
) -> Result<Transition<ClaimOutcome>, Rejection> {
    let Some(record) = live(now, current) else {
        return Ok(grant(now, None, command, next_fencing_token(FencingToken(0)), false));
    };
    if command.fingerprint.conflicts_with(&record.fingerprint) {
        return Err(Rejection::FingerprintMismatch);
    }
    match &record.state {
        RecordState::Completed { response, completed_at, .. } => {
            Ok(Transition::unchanged(ClaimOutcome::Completed(Replay {
                response: response.clone(),
                completed_at: *completed_at,
                expires_at: record.expires_at(),
                fencing_token: record.fencing_token,
            })))
        }
        RecordState::Held(lease) if lease.expires_at > now => {
            let same_request = command.request_id.is_some() && command.request_id == lease.request_id;
            let outcome = if same_request {
                ClaimOutcome::Acquired(Grant {
                    lease_token: lease.token,
                    fencing_token: record.fencing_token,
                    lease_expires_at: lease.expires_at,
                    attempt: record.attempt,
                    takeover: lease.takeover,
                })
            } else {
                let remaining = lease.expires_at.since(now);
                ClaimOutcome::InProgress {
                    lease_expires_at: lease.expires_at,
                    attempt: record.attempt,
                    owner: record.owner.clone(),
                    retry_after: remaining.min(MAX_RETRY_AFTER),
                }
            };
            Ok(Transition::unchanged(outcome))
        }
        RecordState::Held(_) => {
            let token = next_fencing_token(record.fencing_token);
            Ok(grant(now, Some(record), command, token, true))
        }
        RecordState::Released { .. } => {
            let token = next_fencing_token(record.fencing_token);
            Ok(grant(now, Some(record), command, token, false))
        }
    }
}

fn grant(
    now: Timestamp,
    previous: Option<&Record>,
    command: &Claim,
    fencing_token: FencingToken,
    takeover: bool,
) -> Transition<ClaimOutcome> {
    if let Some(previous) = previous {
        assert!(fencing_token > previous.fencing_token, "the fencing token source went backwards");
    }
    let attempt = previous.map_or(1, |record| record.attempt.saturating_add(1));
    let fingerprint = match previous {
        Some(record) if !record.fingerprint.is_empty() => record.fingerprint.clone(),
        _ => command.fingerprint.clone(),
    };
    let lease = Lease {
        token: command.new_lease_token,
        expires_at: now.plus(command.lease_ttl),
        request_id: command.request_id.clone(),
        takeover,
    };
    let outcome = ClaimOutcome::Acquired(Grant {
        lease_token: lease.token,
        fencing_token,
        lease_expires_at: lease.expires_at,
        attempt,
        takeover,
    });
    let record = Record {
        fingerprint,
        fencing_token,
        attempt,
        owner: command.owner.clone(),
        retention_millis: millis(command.retention),
        updated_at: now,
        state: RecordState::Held(lease),
    };
    Transition { write: Some(record), outcome }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Decides a Complete.
pub fn complete(
    now: Timestamp,
    current: Option<&Record>,
    command: Complete,
) -> Result<Transition<CompleteOutcome>, Rejection> {
    let record = live(now, current).ok_or(Rejection::LeaseLost)?;
    match &record.state {
        RecordState::Held(lease) if lease.token == command.lease_token => {
            let retention = command.retention.unwrap_or(record.retention());
            let completed = Record {
                retention_millis: millis(retention),
                updated_at: now,
                state: RecordState::Completed {
                    by: command.lease_token,
                    response: command.response,
                    completed_at: now,
                },
                ..record.clone()
            };
            let outcome = CompleteOutcome {
                completed_at: now,
                expires_at: completed.expires_at(),
                fencing_token: record.fencing_token,
                already_completed: false,
            };
            Ok(Transition { write: Some(completed), outcome })
        }
        RecordState::Completed { by, completed_at, .. } if *by == command.lease_token => {
            Ok(Transition::unchanged(CompleteOutcome {
                completed_at: *completed_at,
                expires_at: record.expires_at(),
                fencing_token: record.fencing_token,
                already_completed: true,
            }))
        }
        RecordState::Held(_) | RecordState::Completed { .. } | RecordState::Released { .. } => {
            Err(Rejection::LeaseLost)
        }
    }
}

/// Decides a Renew.
pub fn renew(now: Timestamp, current: Option<&Record>, command: &Renew) -> Result<Transition<RenewOutcome>, Rejection> {
    let record = live(now, current).ok_or(Rejection::LeaseLost)?;
    match &record.state {
        RecordState::Held(lease) if lease.token == command.lease_token => {
            let lease_expires_at = now.plus(command.lease_ttl);
            let renewed = Record {
                updated_at: now,
                state: RecordState::Held(Lease { expires_at: lease_expires_at, ..lease.clone() }),
                ..record.clone()
            };
            let outcome = RenewOutcome { lease_expires_at, fencing_token: record.fencing_token };
            Ok(Transition { write: Some(renewed), outcome })
        }
        RecordState::Completed { by, .. } if *by == command.lease_token => Err(Rejection::AlreadyCompleted),
        RecordState::Held(_) | RecordState::Completed { .. } | RecordState::Released { .. } => {
            Err(Rejection::LeaseLost)
        }
    }
}

/// Decides a Release. Releasing an absent key, or releasing again with the token that released
/// it, succeeds and changes nothing; any other token that does not hold the key is refused.
pub fn release(now: Timestamp, current: Option<&Record>, command: &Release) -> Result<Transition<()>, Rejection> {
    let Some(record) = live(now, current) else {
        return Ok(Transition::unchanged(()));
    };
    match &record.state {
        RecordState::Held(lease) if lease.token == command.lease_token => {
            let released =
                Record { updated_at: now, state: RecordState::Released { by: command.lease_token }, ..record.clone() };
            Ok(Transition { write: Some(released), outcome: () })
        }
        RecordState::Released { by } if *by == command.lease_token => Ok(Transition::unchanged(())),
        RecordState::Completed { by, .. } if *by == command.lease_token => Err(Rejection::AlreadyCompleted),
        RecordState::Held(_) | RecordState::Completed { .. } | RecordState::Released { .. } => {
            Err(Rejection::LeaseLost)
        }
    }
}

/// Reads a key.
pub fn lookup(now: Timestamp, current: Option<&Record>) -> Result<KeyView, Rejection> {
    let record = live(now, current).ok_or(Rejection::NotFound)?;
    let state = key_state(now, record);
    let (lease_expires_at, completed) = match &record.state {
        RecordState::Held(lease) => (Some(lease.expires_at), None),
        RecordState::Released { .. } => (None, None),
        RecordState::Completed { response, completed_at, .. } => (None, Some((response.clone(), *completed_at))),
    };
    Ok(KeyView {
        state,
        fingerprint: record.fingerprint.clone(),
        fencing_token: record.fencing_token,
        attempt: record.attempt,
        owner: record.owner.clone(),
        lease_expires_at,
        completed,
        expires_at: record.expires_at(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_unix_millis(seconds * 1_000)
    }

    fn claim_command(fingerprint: &[u8], request_id: &str) -> Claim {
        Claim {
            fingerprint: Fingerprint::parse(fingerprint).unwrap(),
            lease_ttl: 10 * SECOND,
            retention: 100 * SECOND,
            request_id: RequestId::parse_optional(request_id).unwrap(),
            owner: Owner::parse("pod-a").unwrap(),
            new_lease_token: LeaseToken::generate(),
        }
    }

    /// A fencing source like a store's: a counter that never goes back.
    struct Counter(u64);

    impl Counter {
        fn next(&mut self, floor: FencingToken) -> FencingToken {
            self.0 = self.0.max(floor.0) + 1;
            FencingToken(self.0)
        }
    }

    /// Applies a claim and returns the new record (or the old one) with the outcome.
    fn apply_claim(
        now: Timestamp,
        record: Option<Record>,
        command: &Claim,
        counter: &mut Counter,
    ) -> (Option<Record>, ClaimOutcome) {
        let transition = claim(now, record.as_ref(), command, |floor| counter.next(floor)).expect("claim accepted");
        (transition.write.or(record), transition.outcome)
    }

    fn acquired(outcome: &ClaimOutcome) -> &Grant {
        match outcome {
            ClaimOutcome::Acquired(grant) => grant,
            other => panic!("expected acquired, got {other:?}"),
        }
    }

    /// A key claimed at t=0 by a first caller: (record, grant).
    fn held_key(counter: &mut Counter) -> (Record, Grant) {
        let (record, outcome) = apply_claim(at(0), None, &claim_command(b"fp", "req-1"), counter);
        (record.unwrap(), acquired(&outcome).clone())
    }

    fn response(body: &str) -> ApiResponse {
        ApiResponse { body: body.as_bytes().to_vec().into(), metadata: [("status".into(), "201".into())].into() }
    }

    fn completed_key(counter: &mut Counter) -> (Record, Grant) {
        let (record, grant) = held_key(counter);
        let command = Complete { lease_token: grant.lease_token, response: response("paid"), retention: None };
        let record = complete(at(1), Some(&record), command).unwrap().write.unwrap();
        (record, grant)
    }

    #[test]
    fn first_claim_acquires() {
        let mut counter = Counter(0);
        let command = claim_command(b"fp", "");
        let (record, outcome) = apply_claim(at(0), None, &command, &mut counter);
        let grant = acquired(&outcome);
        assert_eq!(grant.lease_token, command.new_lease_token);
        assert_eq!((grant.fencing_token, grant.attempt, grant.takeover), (FencingToken(1), 1, false));
        assert_eq!(grant.lease_expires_at, at(10));
        let record = record.unwrap();
        assert_eq!(record.fingerprint.as_bytes(), b"fp");
        assert_eq!(record.expires_at(), at(110), "a retention after the lease ends");
    }

    #[test]
    fn second_claim_sees_in_progress_with_owner_and_hint() {
        let mut counter = Counter(0);
        let (record, _) = held_key(&mut counter);
        let (after, outcome) = apply_claim(at(3), Some(record.clone()), &claim_command(b"fp", ""), &mut counter);
        assert_eq!(after, Some(record));
        assert_eq!(
            outcome,
            ClaimOutcome::InProgress {
                lease_expires_at: at(10),
                attempt: 1,
                owner: Owner::parse("pod-a").unwrap(),
                retry_after: SECOND
            }
        );
        let (_, near_end) =
            apply_claim(Timestamp::from_unix_millis(9_700), after, &claim_command(b"", ""), &mut counter);
        assert!(
            matches!(near_end, ClaimOutcome::InProgress { retry_after, .. } if retry_after == Duration::from_millis(300))
        );
    }

    #[test]
    fn same_request_id_gets_the_same_grant_back() {
        let mut counter = Counter(0);
        let (record, grant) = held_key(&mut counter);
        let retry = claim(at(5), Some(&record), &claim_command(b"fp", "req-1"), |_| panic!("no new token")).unwrap();
        assert_eq!(retry.write, None);
        assert_eq!(acquired(&retry.outcome), &grant);
        let other = claim(at(5), Some(&record), &claim_command(b"fp", "req-2"), |_| panic!("no new token")).unwrap();
        assert!(matches!(other.outcome, ClaimOutcome::InProgress { .. }));
    }

    #[test]
    fn lapsed_lease_is_taken_over_with_a_higher_fencing_token() {
        let mut counter = Counter(0);
        let (record, first) = held_key(&mut counter);
        let (record, outcome) = apply_claim(at(10), Some(record), &claim_command(b"fp", "req-1"), &mut counter);
        let second = acquired(&outcome);
        assert!(second.fencing_token > first.fencing_token);
        assert_ne!(second.lease_token, first.lease_token);
        assert_eq!((second.attempt, second.takeover), (2, true));
        let record = record.unwrap();
        let stale = Complete { lease_token: first.lease_token, response: response("late"), retention: None };
        assert_eq!(complete(at(11), Some(&record), stale), Err(Rejection::LeaseLost));
        let renew_stale = Renew { lease_token: first.lease_token, lease_ttl: SECOND };
        assert_eq!(renew(at(11), Some(&record), &renew_stale), Err(Rejection::LeaseLost));
        assert_eq!(
            release(at(11), Some(&record), &Release { lease_token: first.lease_token }),
            Err(Rejection::LeaseLost)
        );
    }

    #[test]
    fn a_lapsed_lease_stays_visible_for_a_retention_even_when_retention_is_shorter_than_the_lease() {
        let mut counter = Counter(0);
        let command = Claim { lease_ttl: SECOND, retention: SECOND, ..claim_command(b"A", "") };
        let (record, _) = apply_claim(at(0), None, &command, &mut counter);
        let record = record.unwrap();
        let later = Timestamp::from_unix_millis(1_200);
        let view = lookup(later, Some(&record)).unwrap();
        assert_eq!((view.state, view.attempt), (KeyState::LeaseExpired, 1));
        let other = Claim { lease_ttl: SECOND, retention: SECOND, ..claim_command(b"B", "") };
        assert_eq!(claim(later, Some(&record), &other, |_| panic!("no grant")), Err(Rejection::FingerprintMismatch));
        let (_, outcome) = apply_claim(later, Some(record.clone()), &command, &mut counter);
        assert_eq!((acquired(&outcome).attempt, acquired(&outcome).takeover), (2, true));
        // A retention after the lapse, the key is forgotten.
        assert_eq!(lookup(at(2), Some(&record)), Err(Rejection::NotFound));
    }

    #[test]
    fn fingerprint_mismatch_is_refused_in_every_state() {
        let mut counter = Counter(0);
        let (held, grant) = held_key(&mut counter);
        let (completed, _) = completed_key(&mut counter);
        let released = release(at(1), Some(&held), &Release { lease_token: grant.lease_token }).unwrap().write.unwrap();
        for (now, record) in [(at(1), &held), (at(20), &held), (at(2), &completed), (at(2), &released)] {
            let result = claim(now, Some(record), &claim_command(b"other", ""), |_| panic!("no grant"));
            assert_eq!(result, Err(Rejection::FingerprintMismatch), "at {now:?} for {:?}", record.state);
        }
        // An empty fingerprint skips the check, and an expired record is forgotten with its binding.
        assert!(claim(at(1), Some(&held), &claim_command(b"", ""), |_| panic!("no grant")).is_ok());
        assert!(claim(at(200), Some(&held), &claim_command(b"other", ""), |floor| counter.next(floor)).is_ok());
    }

    #[test]
    fn a_key_claimed_without_fingerprint_binds_to_the_first_one_given() {
        let mut counter = Counter(0);
        let (record, outcome) = apply_claim(at(0), None, &claim_command(b"", ""), &mut counter);
        let token = acquired(&outcome).lease_token;
        let released = release(at(1), record.as_ref(), &Release { lease_token: token }).unwrap().write;
        let (record, _) = apply_claim(at(2), released, &claim_command(b"fp", ""), &mut counter);
        assert_eq!(record.unwrap().fingerprint.as_bytes(), b"fp");
    }

    /// The binding happens when a Claim is granted the key, never on a read: a Claim that is
    /// answered `completed` or `in_progress` changes nothing. So a key granted and completed
    /// without a fingerprint replays to Claims with any fingerprint.
    #[test]
    fn a_key_granted_without_fingerprint_is_not_bound_by_claims_that_only_read_it() {
        let mut counter = Counter(0);
        let (held, outcome) = apply_claim(at(0), None, &claim_command(b"", ""), &mut counter);
        let held = held.unwrap();
        for fingerprint in [&b"A"[..], b"B"] {
            let read = claim(at(1), Some(&held), &claim_command(fingerprint, ""), |_| panic!("no grant")).unwrap();
            assert!(matches!(read.outcome, ClaimOutcome::InProgress { .. }));
            assert_eq!(read.write, None);
        }
        let token = acquired(&outcome).lease_token;
        let command = Complete { lease_token: token, response: response("paid"), retention: None };
        let completed = complete(at(2), Some(&held), command).unwrap().write.unwrap();
        assert!(completed.fingerprint.is_empty());
        for fingerprint in [&b"A"[..], b"B"] {
            let read = claim(at(3), Some(&completed), &claim_command(fingerprint, ""), |_| panic!("no grant")).unwrap();
            assert!(matches!(read.outcome, ClaimOutcome::Completed(_)));
            assert_eq!(read.write, None);
        }
    }

    #[test]
    fn complete_stores_once_and_replays() {
        let mut counter = Counter(0);
        let (record, grant) = held_key(&mut counter);
        let command =
            Complete { lease_token: grant.lease_token, response: response("paid"), retention: Some(50 * SECOND) };
        let transition = complete(at(4), Some(&record), command).unwrap();
        assert_eq!(
            transition.outcome,
            CompleteOutcome {
                completed_at: at(4),
                expires_at: at(54),
                fencing_token: grant.fencing_token,
                already_completed: false
            }
        );
        let record = transition.write.unwrap();
        let retry = Complete { lease_token: grant.lease_token, response: response("different"), retention: None };
        let retried = complete(at(6), Some(&record), retry).unwrap();
        assert_eq!(retried.write, None);
        assert_eq!(retried.outcome.completed_at, at(4));
        assert!(retried.outcome.already_completed);
        let replay = claim(at(7), Some(&record), &claim_command(b"fp", ""), |_| panic!("no grant")).unwrap();
        assert_eq!(
            replay.outcome,
            ClaimOutcome::Completed(Replay {
                response: response("paid"),
                completed_at: at(4),
                expires_at: at(54),
                fencing_token: grant.fencing_token
            })
        );
        let foreign = Complete { lease_token: LeaseToken::generate(), response: response("x"), retention: None };
        assert_eq!(complete(at(6), Some(&record), foreign), Err(Rejection::LeaseLost));
    }

    #[test]
    fn complete_after_lapse_works_until_someone_takes_over() {
        let mut counter = Counter(0);
        let (record, grant) = held_key(&mut counter);
        let command = Complete { lease_token: grant.lease_token, response: response("late but fine"), retention: None };
        let transition = complete(at(30), Some(&record), command).unwrap();
        assert_eq!(transition.write.unwrap().expires_at(), at(130));
    }

    #[test]
    fn complete_or_renew_of_an_absent_key_is_lease_lost() {
        let token = LeaseToken::generate();
        let command = Complete { lease_token: token, response: response("x"), retention: None };
        assert_eq!(complete(at(0), None, command), Err(Rejection::LeaseLost));
        assert_eq!(renew(at(0), None, &Renew { lease_token: token, lease_ttl: SECOND }), Err(Rejection::LeaseLost));
    }

    #[test]
    fn renew_extends_the_lease_and_the_retention() {
        let mut counter = Counter(0);
        let (record, grant) = held_key(&mut counter);
        let command = Renew { lease_token: grant.lease_token, lease_ttl: 20 * SECOND };
        let transition = renew(at(15), Some(&record), &command).unwrap();
        assert_eq!(transition.outcome, RenewOutcome { lease_expires_at: at(35), fencing_token: grant.fencing_token });
        let renewed = transition.write.unwrap();
        assert_eq!(renewed.expires_at(), at(135));
        let view = lookup(at(16), Some(&renewed)).unwrap();
        assert_eq!(view.state, KeyState::InProgress);
    }

    #[test]
    fn renew_or_release_of_a_completed_key() {
        let mut counter = Counter(0);
        let (record, grant) = completed_key(&mut counter);
        let own = Renew { lease_token: grant.lease_token, lease_ttl: SECOND };
        assert_eq!(renew(at(2), Some(&record), &own), Err(Rejection::AlreadyCompleted));
        assert_eq!(
            release(at(2), Some(&record), &Release { lease_token: grant.lease_token }),
            Err(Rejection::AlreadyCompleted)
        );
        let foreign = LeaseToken::generate();
        assert_eq!(
            renew(at(2), Some(&record), &Renew { lease_token: foreign, lease_ttl: SECOND }),
            Err(Rejection::LeaseLost)
        );
        assert_eq!(release(at(2), Some(&record), &Release { lease_token: foreign }), Err(Rejection::LeaseLost));
    }

    #[test]
    fn release_makes_the_key_claimable_with_a_new_token() {
        let mut counter = Counter(0);
        let (record, grant) = held_key(&mut counter);
        let foreign = Release { lease_token: LeaseToken::generate() };
        assert_eq!(release(at(1), Some(&record), &foreign), Err(Rejection::LeaseLost));
        let released =
            release(at(1), Some(&record), &Release { lease_token: grant.lease_token }).unwrap().write.unwrap();
        assert_eq!(lookup(at(1), Some(&released)).unwrap().state, KeyState::Released);
        let again = release(at(2), Some(&released), &Release { lease_token: grant.lease_token }).unwrap();
        assert_eq!(again.write, None);
        let stranger = Release { lease_token: LeaseToken::generate() };
        assert_eq!(release(at(2), Some(&released), &stranger), Err(Rejection::LeaseLost));
        let stale = Complete { lease_token: grant.lease_token, response: response("x"), retention: None };
        assert_eq!(complete(at(2), Some(&released), stale), Err(Rejection::LeaseLost));
        let (_, outcome) = apply_claim(at(2), Some(released), &claim_command(b"fp", ""), &mut counter);
        let next = acquired(&outcome);
        assert!(next.fencing_token > grant.fencing_token);
        assert_eq!((next.attempt, next.takeover), (2, false));
        assert_eq!(release(at(0), None, &Release { lease_token: grant.lease_token }).unwrap().write, None);
    }

    #[test]
    fn expired_records_are_absent_to_every_command() {
        let mut counter = Counter(0);
        let (record, grant) = completed_key(&mut counter);
        let end = record.expires_at();
        assert_eq!(end, at(101));
        assert!(lookup(Timestamp::from_unix_millis(end.unix_millis() - 1), Some(&record)).is_ok());
        assert_eq!(lookup(end, Some(&record)), Err(Rejection::NotFound));
        assert_eq!(
            renew(end, Some(&record), &Renew { lease_token: grant.lease_token, lease_ttl: SECOND }),
            Err(Rejection::LeaseLost)
        );
        assert_eq!(release(end, Some(&record), &Release { lease_token: grant.lease_token }).unwrap().write, None);
        let (fresh, outcome) = apply_claim(end, Some(record), &claim_command(b"new", ""), &mut counter);
        let grant_after = acquired(&outcome);
        assert_eq!((grant_after.attempt, grant_after.takeover), (1, false));
        assert!(grant_after.fencing_token > grant.fencing_token);
        assert_eq!(fresh.unwrap().fingerprint.as_bytes(), b"new");
    }

    #[test]
    fn lookup_reports_each_state() {
        let mut counter = Counter(0);
        let (held, grant) = held_key(&mut counter);
        let view = lookup(at(1), Some(&held)).unwrap();
        assert_eq!(
            (view.state, view.lease_expires_at, view.fencing_token),
            (KeyState::InProgress, Some(at(10)), grant.fencing_token)
        );
        assert_eq!(view.owner.as_str(), "pod-a");
        assert_eq!(lookup(at(10), Some(&held)).unwrap().state, KeyState::LeaseExpired);
        let (completed, _) = completed_key(&mut counter);
        let view = lookup(at(2), Some(&completed)).unwrap();
        assert_eq!(view.state, KeyState::Completed);
        assert_eq!(view.completed, Some((response("paid"), at(1))));
        assert_eq!(view.expires_at, at(101));
        assert_eq!(lookup(at(0), None), Err(Rejection::NotFound));
    }
}
