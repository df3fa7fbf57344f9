//! The history checker fed known histories: each property's violation is found.

use super::*;

pub(crate) struct Timeline {
    base: Instant,
}

impl Timeline {
    fn new() -> Self {
        Timeline { base: Instant::now() }
    }

    /// An event that ran from `from` to `to` (client milliseconds).
    fn event(&self, key: &str, call: Call, outcome: Outcome, from: u64, to: u64) -> Event {
        Event {
            key: key.to_owned(),
            call,
            outcome,
            invoked: self.base + Duration::from_millis(from),
            returned: self.base + Duration::from_millis(to),
        }
    }
}

pub(crate) fn grant(token: &str, fencing: u64, expires: i64) -> Outcome {
    Outcome::Acquired { token: token.to_owned(), fencing, lease_expires_at: expires, lease_ttl_ms: 1000 }
}

pub(crate) fn claim() -> Call {
    Call::Claim { request_id: None }
}

pub(crate) fn complete(token: &str, body: &[u8]) -> Call {
    Call::Complete { token: token.to_owned(), body: body.to_vec() }
}

/// A history that satisfies every property: grant, lapse, takeover, complete, replay.
pub(crate) fn good_history(t: &Timeline) -> Vec<Event> {
    vec![
        t.event("k", claim(), grant("a", 1, 1_000), 0, 1),
        t.event("k", claim(), Outcome::InProgress, 2, 3),
        t.event("k", claim(), grant("b", 2, 2_500), 1_500, 1_501),
        t.event("k", complete("a", b"late"), Outcome::Refused("LEASE_LOST".into()), 1_600, 1_601),
        t.event("k", complete("b", b"ok"), Outcome::CompleteOk { completed_at: 1_700, fresh: true }, 1_700, 1_701),
        t.event("k", complete("b", b"ok"), Outcome::CompleteOk { completed_at: 1_700, fresh: false }, 1_800, 1_801),
        t.event("k", claim(), Outcome::Completed { body: b"ok".to_vec() }, 1_900, 1_901),
        t.event("k", Call::Lookup, Outcome::Completed { body: b"ok".to_vec() }, 2_000, 2_001),
        t.event("k", complete("c", b"?"), Outcome::Unknown, 2_100, 2_200),
    ]
}

pub(crate) fn violations_of(events: &[Event], property: &str) -> usize {
    let found = history::check(events);
    found.iter().filter(|v| v.starts_with(property)).count()
}

#[test]
fn the_checker_accepts_a_correct_history() {
    let t = Timeline::new();
    assert_eq!(history::check(&good_history(&t)), Vec::<String>::new());
}

#[test]
fn the_checker_finds_two_holders_at_once() {
    let t = Timeline::new();
    let events =
        vec![t.event("k", claim(), grant("a", 1, 1_000), 0, 1), t.event("k", claim(), grant("b", 2, 1_500), 400, 401)];
    assert_eq!(violations_of(&events, "P1"), 1);
    // A renewal the holder got acknowledged extends its window too.
    let events = vec![
        t.event("k", claim(), grant("a", 1, 1_000), 0, 1),
        t.event("k", Call::Renew { token: "a".into() }, Outcome::RenewOk { lease_expires_at: 3_000 }, 900, 901),
        t.event("k", claim(), grant("b", 2, 3_000), 2_000, 2_001),
    ];
    assert_eq!(violations_of(&events, "P1"), 1);
    // A later renewal that ended the lease earlier (shorter ttl, or a clock stepped back) is
    // where the window ends.
    let events = vec![
        t.event("k", claim(), grant("a", 1, 1_000), 0, 1),
        t.event("k", Call::Renew { token: "a".into() }, Outcome::RenewOk { lease_expires_at: 3_000 }, 100, 101),
        t.event("k", Call::Renew { token: "a".into() }, Outcome::RenewOk { lease_expires_at: 1_200 }, 200, 201),
        t.event("k", claim(), grant("b", 2, 3_000), 2_000, 2_001),
    ];
    assert_eq!(violations_of(&events, "P1"), 0);
    // But a Release sent before the second grant was answered may have ended it.
    let events = vec![
        t.event("k", claim(), grant("a", 1, 1_000), 0, 1),
        t.event("k", Call::Release { token: "a".into() }, Outcome::Unknown, 300, 5_000),
        t.event("k", claim(), grant("b", 2, 1_400), 350, 351),
    ];
    assert_eq!(violations_of(&events, "P1"), 0);
}

#[test]
fn the_checker_finds_fencing_tokens_that_do_not_increase() {
    let t = Timeline::new();
    let events = vec![
        t.event("k", claim(), grant("a", 5, 1_000), 0, 1),
        t.event("k", claim(), grant("b", 5, 2_500), 1_500, 1_501),
    ];
    assert_eq!(violations_of(&events, "P2"), 1);
    let events = vec![
        t.event("k", claim(), grant("a", 5, 1_000), 0, 1),
        t.event("k", claim(), grant("b", 3, 2_500), 1_500, 1_501),
    ];
    assert_eq!(violations_of(&events, "P2"), 1);
}

#[test]
fn the_checker_finds_a_superseded_token_that_succeeded() {
    let t = Timeline::new();
    for (call, outcome) in [
        (complete("a", b"x"), Outcome::CompleteOk { completed_at: 1_700, fresh: true }),
        (Call::Renew { token: "a".into() }, Outcome::RenewOk { lease_expires_at: 3_000 }),
        (Call::Release { token: "a".into() }, Outcome::ReleaseOk),
    ] {
        let events = vec![
            t.event("k", claim(), grant("a", 1, 1_000), 0, 1),
            t.event("k", claim(), grant("b", 2, 2_500), 1_500, 1_501),
            t.event("k", call, outcome, 1_600, 1_601),
        ];
        assert_eq!(violations_of(&events, "P3"), 1, "{events:?}");
    }
}

#[test]
fn the_checker_finds_a_lost_or_changed_response() {
    let t = Timeline::new();
    let done = |later: Outcome, call: Call| {
        vec![
            t.event("k", claim(), grant("a", 1, 1_000), 0, 1),
            t.event("k", complete("a", b"paid"), Outcome::CompleteOk { completed_at: 10, fresh: true }, 10, 11),
            t.event("k", call, later, 20, 21),
        ]
    };
    assert_eq!(violations_of(&done(Outcome::Completed { body: b"other".to_vec() }, claim()), "P4"), 1);
    assert_eq!(violations_of(&done(grant("b", 2, 2_000), claim()), "P4"), 1);
    assert_eq!(violations_of(&done(Outcome::Refused("KEY_NOT_FOUND".into()), Call::Lookup), "P4"), 1);
    assert_eq!(violations_of(&done(Outcome::Unknown, Call::Lookup), "P4"), 0);
    // A retried Complete was the only one acknowledged: the body stored is the indeterminate
    // first call's, and the retry's own body is not what replays must return.
    let events = vec![
        t.event("k", claim(), grant("a", 1, 1_000), 0, 1),
        t.event("k", complete("a", b"first"), Outcome::Unknown, 10, 11),
        t.event("k", complete("a", b"retry"), Outcome::CompleteOk { completed_at: 10, fresh: false }, 20, 21),
        t.event("k", claim(), Outcome::Completed { body: b"first".to_vec() }, 30, 31),
    ];
    assert_eq!(violations_of(&events, "P4"), 0);
    let mut changed = events.clone();
    changed.push(t.event("k", Call::Lookup, Outcome::Completed { body: b"other".to_vec() }, 40, 41));
    assert_eq!(violations_of(&changed, "P4"), 1);
}

#[test]
fn the_checker_finds_retries_that_did_not_return_the_original() {
    let t = Timeline::new();
    let with_id = || Call::Claim { request_id: Some("r1".into()) };
    let events = vec![
        t.event("k", with_id(), grant("a", 1, 1_000), 0, 1),
        t.event("k", with_id(), grant("b", 2, 1_500), 500, 501),
    ];
    assert!(violations_of(&events, "P5") >= 1);
    let events = vec![
        t.event("k", claim(), grant("a", 1, 1_000), 0, 1),
        t.event("k", complete("a", b"x"), Outcome::CompleteOk { completed_at: 10, fresh: true }, 10, 11),
        t.event("k", complete("a", b"x"), Outcome::CompleteOk { completed_at: 12, fresh: false }, 12, 13),
    ];
    assert_eq!(violations_of(&events, "P5"), 1);
}
