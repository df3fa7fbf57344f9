//! A history of client calls and a checker for the coordinator's safety properties:
//!
//! - P1 one holder: per key, no grant starts before the previous grant's lease window ended
//!   (its lease expiry as set by its last renewal, or its acknowledged Complete or Release).
//! - P2 fencing tokens strictly increase per key in real time (a grant answered before another
//!   was asked for has the smaller token), and are never reused.
//! - P3 a Complete/Renew/Release whose token was superseded (another grant of the key was
//!   acknowledged before the call was sent) never succeeds.
//! - P4 every acknowledged Complete is returned byte-identical by every later Claim or Lookup.
//! - P5 a Claim retried with the request id of a live grant returns that grant; a repeated
//!   Complete returns the original completion time.
//!
//! Times: `invoked` and `returned` are the client's monotonic clock (to order calls); server
//! times (lease expiry, completion) are the server's wall clock in milliseconds, which the server
//! returns. A call with no answer (timeout, broken connection) is indeterminate: it may or may
//! not have taken effect, and the checker allows both.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

/// What a call returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Claim: acquired.
    Acquired { token: String, fencing: u64, lease_expires_at: i64, lease_ttl_ms: i64 },
    /// Claim: someone else holds the key.
    InProgress,
    /// Claim or Lookup: the stored response.
    Completed { body: Vec<u8> },
    /// Lookup: held, lapsed or released (not completed).
    NotCompleted,
    /// Complete succeeded; `fresh` is false when the key was already completed by this token
    /// (a retried Complete: the stored body is the earlier call's, which may have been
    /// indeterminate).
    CompleteOk { completed_at: i64, fresh: bool },
    /// Renew succeeded.
    RenewOk { lease_expires_at: i64 },
    /// Release succeeded.
    ReleaseOk,
    /// A definite refusal (LEASE_LOST, NOT_FOUND, …): nothing changed.
    Refused(String),
    /// No answer: it may or may not have happened.
    Unknown,
}

/// Which call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Claim { request_id: Option<String> },
    Complete { token: String, body: Vec<u8> },
    Renew { token: String },
    Release { token: String },
    Lookup,
}

#[derive(Debug, Clone)]
pub struct Event {
    pub key: String,
    pub call: Call,
    pub outcome: Outcome,
    pub invoked: Instant,
    pub returned: Instant,
}

/// A thread-safe recorder shared by all clients of a run.
#[derive(Default)]
pub struct History {
    events: Mutex<Vec<Event>>,
}

impl History {
    pub fn record(&self, key: &str, call: Call, invoked: Instant, outcome: Outcome) {
        let event = Event { key: key.to_owned(), call, outcome, invoked, returned: Instant::now() };
        self.events.lock().unwrap().push(event);
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }
}

/// Checks P1–P5 and returns every violation found (empty: the history is fine).
pub fn check(events: &[Event]) -> Vec<String> {
    let mut by_key: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for event in events {
        by_key.entry(&event.key).or_default().push(event);
    }
    let mut violations = Vec::new();
    for (key, events) in by_key {
        check_key(key, &events, &mut violations);
    }
    violations
}

struct Grant<'a> {
    event: &'a Event,
    token: &'a str,
    fencing: u64,
    start: i64,
    expires: i64,
}

fn check_key(key: &str, events: &[&Event], violations: &mut Vec<String>) {
    // Distinct grants (a request-id retry returns the same token again).
    let mut grants: Vec<Grant<'_>> = Vec::new();
    for event in events {
        if let Outcome::Acquired { token, fencing, lease_expires_at, lease_ttl_ms } = &event.outcome {
            if let Some(existing) = grants.iter().find(|g| g.token == token) {
                if existing.fencing != *fencing {
                    violations
                        .push(format!("{key}: token {token} returned with fencing {} and {fencing}", existing.fencing));
                }
                continue;
            }
            grants.push(Grant {
                event,
                token,
                fencing: *fencing,
                start: lease_expires_at - lease_ttl_ms,
                expires: *lease_expires_at,
            });
        }
    }
    // P2: never reused, and increasing in real time: a grant answered before another was asked
    // for has the smaller token. (Server times cannot order grants: the clock may step back.)
    for (i, a) in grants.iter().enumerate() {
        for b in &grants[i + 1..] {
            let ordered = if a.event.returned <= b.event.invoked {
                Some((a, b))
            } else if b.event.returned <= a.event.invoked {
                Some((b, a))
            } else {
                None
            };
            if a.fencing == b.fencing {
                violations.push(format!("P2 {key}: fencing {} granted twice ({} and {})", a.fencing, a.token, b.token));
            } else if let Some((first, second)) = ordered
                && second.fencing < first.fencing
            {
                violations.push(format!(
                    "P2 {key}: grant {} got fencing {} after grant {} with {}",
                    second.token, second.fencing, first.token, first.fencing
                ));
            }
        }
    }
    // The grants in the order the server made them: by fencing token (P2 checks that order).
    grants.sort_by_key(|g| g.fencing);

    // P1: each grant's window ends (at the latest acknowledged renewal's expiry, or earlier at
    // its acknowledged Complete, or at its acknowledged Release) before the next grant starts,
    // both in the server's time (the only time in which a lease is defined).
    // Indeterminate renewals are assumed not to have happened, the lenient reading.
    for pair in grants.windows(2) {
        let (earlier, later) = (&pair[0], &pair[1]);
        // A Renew sets the lease to end `lease_ttl` after the server's now, which may be earlier
        // than before (a shorter ttl, or a clock stepped back): the window ends where the last
        // applied renewal put it. With a renewal of unknown outcome that end is unknown, so the
        // pair is not judged.
        let renewals: Vec<&&Event> =
            events.iter().filter(|e| matches!(&e.call, Call::Renew { token } if token == earlier.token)).collect();
        if renewals.iter().any(|e| e.outcome == Outcome::Unknown) {
            continue;
        }
        let end = renewals
            .iter()
            .filter_map(|e| match e.outcome {
                Outcome::RenewOk { lease_expires_at } => Some((e.returned, lease_expires_at)),
                _ => None,
            })
            .max_by_key(|(returned, _)| *returned)
            .map_or(earlier.expires, |(_, expires)| expires);
        // A Release takes effect somewhere between its call and its reply: it may have ended the
        // window before the later grant unless that grant was answered before the Release was sent.
        let finished_early = events.iter().any(|event| match (&event.call, &event.outcome) {
            (Call::Complete { token, .. }, Outcome::CompleteOk { completed_at, .. }) if token == earlier.token => {
                *completed_at <= later.start
            }
            (Call::Release { token }, Outcome::ReleaseOk | Outcome::Unknown) if token == earlier.token => {
                event.invoked < later.event.returned
            }
            _ => false,
        });
        if !finished_early && later.start < end {
            violations.push(format!(
                "P1 {key}: grant {} (fencing {}) started at {} while grant {} (fencing {}) held it until {end}",
                later.token, later.fencing, later.start, earlier.token, earlier.fencing
            ));
        }
    }

    // P3: a call with a token superseded before it was sent never succeeds.
    for event in events {
        let token = match &event.call {
            Call::Complete { token, .. } | Call::Renew { token } | Call::Release { token } => token,
            _ => continue,
        };
        let succeeded =
            matches!(event.outcome, Outcome::CompleteOk { .. } | Outcome::RenewOk { .. } | Outcome::ReleaseOk);
        let Some(own) = grants.iter().find(|g| g.token == token) else { continue };
        let superseded = grants.iter().any(|g| g.fencing > own.fencing && g.event.returned <= event.invoked);
        if succeeded && superseded {
            violations.push(format!("P3 {key}: {:?} with superseded token {token} succeeded", event.call));
        }
    }

    // P4: after an acknowledged Complete, every later Claim/Lookup returns the stored body, the
    // same one every time. The stored body is the fresh acknowledged Complete's, or, when only
    // retries were acknowledged, one of the bodies sent by that token's Completes.
    let acknowledged: Vec<&Event> =
        events.iter().copied().filter(|e| matches!(e.outcome, Outcome::CompleteOk { .. })).collect();
    if let Some(first_ack) = acknowledged.iter().min_by_key(|e| e.returned) {
        let fresh = acknowledged.iter().find_map(|e| match (&e.call, &e.outcome) {
            (Call::Complete { body, .. }, Outcome::CompleteOk { fresh: true, .. }) => Some(body),
            _ => None,
        });
        let admissible: Vec<&Vec<u8>> = match fresh {
            Some(body) => vec![body],
            None => events
                .iter()
                .filter_map(|e| match (&e.call, &e.outcome) {
                    (Call::Complete { token, body }, Outcome::CompleteOk { .. } | Outcome::Unknown)
                        if acknowledged
                            .iter()
                            .any(|a| matches!(&a.call, Call::Complete { token: t, .. } if t == token)) =>
                    {
                        Some(body)
                    }
                    _ => None,
                })
                .collect(),
        };
        let mut seen: Option<&Vec<u8>> = None;
        for later in events.iter().filter(|e| e.invoked >= first_ack.returned) {
            let wrong = match (&later.call, &later.outcome) {
                (Call::Claim { .. } | Call::Lookup, Outcome::Completed { body: got }) => {
                    let inconsistent = seen.is_some_and(|s| s != got);
                    seen.get_or_insert(got);
                    inconsistent || !admissible.contains(&got)
                }
                (Call::Claim { .. }, Outcome::Acquired { .. } | Outcome::InProgress) => true,
                (Call::Lookup, Outcome::NotCompleted) => true,
                (Call::Lookup, Outcome::Refused(reason)) => reason == "KEY_NOT_FOUND",
                _ => false,
            };
            if wrong {
                violations.push(format!(
                    "P4 {key}: after an acknowledged Complete, {:?} returned {:?}",
                    later.call, later.outcome
                ));
            }
        }
    }

    // P5: request-id retries of a live grant return it; repeated Completes return the original.
    let mut by_request: BTreeMap<&str, Vec<&Grant<'_>>> = BTreeMap::new();
    for event in events {
        if let (Call::Claim { request_id: Some(id) }, Outcome::Acquired { token, .. }) = (&event.call, &event.outcome)
            && let Some(grant) = grants.iter().find(|g| g.token == token)
        {
            by_request.entry(id).or_default().push(grant);
        }
    }
    for (id, grants) in by_request {
        for pair in grants.windows(2) {
            if pair[0].token != pair[1].token && pair[1].start < pair[0].expires {
                violations.push(format!("P5 {key}: request id {id} got a second grant while its first was live"));
            }
        }
    }
    let mut completed_at: BTreeMap<&str, i64> = BTreeMap::new();
    for event in events {
        if let (Call::Complete { token, .. }, Outcome::CompleteOk { completed_at: at, .. }) =
            (&event.call, &event.outcome)
            && let Some(first) = completed_at.insert(token, *at)
            && first != *at
        {
            violations.push(format!("P5 {key}: a repeated Complete returned {at}, the first {first}"));
        }
    }
}
