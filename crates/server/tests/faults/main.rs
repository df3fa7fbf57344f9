//! Safety under faults, checked on recorded histories (see `common/history.rs` for P1–P5):
//! the checker's own tests on known-bad histories, racing claims, kill -9 of the real server
//! binary in the middle of a randomized multi-client workload, and a paused server.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use idempotency_proto::pb;
use idempotency_proto::pb::coordinator_client::CoordinatorClient;
use idempotency_testkit::Rng;
use idempotency_testkit::history::{self, Call, Event, History, Outcome};
use idempotency_testkit::*;
use tonic::transport::Channel;
use tonic_types::StatusExt;

// ---------------------------------------------------------------------------------------------
// The checker, fed known histories.

struct Timeline {
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

fn grant(token: &str, fencing: u64, expires: i64) -> Outcome {
    Outcome::Acquired { token: token.to_owned(), fencing, lease_expires_at: expires, lease_ttl_ms: 1000 }
}

fn claim() -> Call {
    Call::Claim { request_id: None }
}

fn complete(token: &str, body: &[u8]) -> Call {
    Call::Complete { token: token.to_owned(), body: body.to_vec() }
}

/// A history that satisfies every property: grant, lapse, takeover, complete, replay.
fn good_history(t: &Timeline) -> Vec<Event> {
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

fn violations_of(events: &[Event], property: &str) -> usize {
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

// ---------------------------------------------------------------------------------------------
// Recording real calls.

fn refusal(status: &tonic::Status) -> Outcome {
    match status.get_details_error_info() {
        // The store could not say whether the change took effect (a lost database connection).
        Some(info) if info.reason == "STORE_UNAVAILABLE" || info.reason == "INTERNAL" => Outcome::Unknown,
        Some(info) => Outcome::Refused(info.reason),
        // No ErrorInfo: the transport failed; the call may or may not have happened.
        None => Outcome::Unknown,
    }
}

/// A client that records every call it makes into a shared history.
struct Recorder {
    client: CoordinatorClient<Channel>,
    history: Arc<History>,
}

impl Recorder {
    async fn claim(&mut self, key: &str, lease_ms: i64, request_id: Option<String>) -> Outcome {
        let invoked = Instant::now();
        let request = pb::ClaimRequest {
            lease_ttl: Some(millis(lease_ms)),
            retention: Some(secs(3600)),
            request_id: request_id.clone().unwrap_or_default(),
            ..claim_request(key, b"fp")
        };
        let outcome = match self.client.claim(request).await {
            Ok(reply) => match outcome(reply.into_inner()) {
                pb::claim_response::Outcome::Acquired(a) => Outcome::Acquired {
                    token: a.lease_token,
                    fencing: a.fencing_token,
                    lease_expires_at: millis_of(a.lease_expires_at),
                    lease_ttl_ms: lease_ms,
                },
                pb::claim_response::Outcome::InProgress(_) => Outcome::InProgress,
                pb::claim_response::Outcome::Completed(c) => {
                    Outcome::Completed { body: c.response.unwrap_or_default().body.to_vec() }
                }
            },
            Err(status) => refusal(&status),
        };
        self.history.record(key, Call::Claim { request_id }, invoked, outcome.clone());
        outcome
    }

    async fn complete(&mut self, key: &str, token: &str, body: &[u8]) {
        let invoked = Instant::now();
        let outcome = match self.client.complete(complete_request(key, token, body)).await {
            Ok(reply) => {
                let reply = reply.into_inner();
                Outcome::CompleteOk { completed_at: millis_of(reply.completed_at), fresh: !reply.already_completed }
            }
            Err(status) => refusal(&status),
        };
        self.history.record(key, Call::Complete { token: token.to_owned(), body: body.to_vec() }, invoked, outcome);
    }

    async fn renew(&mut self, key: &str, token: &str, lease_ms: i64) {
        let invoked = Instant::now();
        let outcome = match self.client.renew(renew_request(key, token, millis(lease_ms))).await {
            Ok(reply) => Outcome::RenewOk { lease_expires_at: millis_of(reply.into_inner().lease_expires_at) },
            Err(status) => refusal(&status),
        };
        self.history.record(key, Call::Renew { token: token.to_owned() }, invoked, outcome);
    }

    async fn release(&mut self, key: &str, token: &str) {
        let invoked = Instant::now();
        let outcome = match self.client.release(release_request(key, token)).await {
            Ok(_) => Outcome::ReleaseOk,
            Err(status) => refusal(&status),
        };
        self.history.record(key, Call::Release { token: token.to_owned() }, invoked, outcome);
    }

    async fn lookup(&mut self, key: &str) {
        let invoked = Instant::now();
        let outcome = match self.client.lookup(lookup_request(key)).await {
            Ok(reply) => {
                let view = reply.into_inner();
                if view.state() == pb::KeyState::Completed {
                    Outcome::Completed { body: view.response.unwrap_or_default().body.to_vec() }
                } else {
                    Outcome::NotCompleted
                }
            }
            Err(status) => refusal(&status),
        };
        self.history.record(key, Call::Lookup, invoked, outcome);
    }
}

fn millis_of(timestamp: Option<prost_types::Timestamp>) -> i64 {
    let t = timestamp.unwrap_or_default();
    t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
}

/// One client of the randomized workload: claims keys from a small space with short leases,
/// then completes, releases, renews, abandons or looks up, and sometimes reuses an old token.
/// The key space moves on every 300 ms (all clients share the same `keys` keys at a time), so
/// that fresh keys keep being contended instead of everything ending up completed. Each call
/// goes to one of `recorders` at random (several replicas behind a load balancer).
async fn workload_client(mut recorders: Vec<Recorder>, seed: u64, keys: u64, start: Instant, until: Instant) {
    let mut rng = Rng(seed);
    let mut old_tokens: Vec<(String, String)> = Vec::new();
    let replicas = recorders.len() as u64;
    while Instant::now() < until {
        let epoch = start.elapsed().as_millis() as u64 / 300;
        let key = format!("key-{epoch}-{}", rng.below(keys));
        let mut pick = || rng.below(replicas) as usize;
        let (first, second) = (pick(), pick());
        if rng.below(10) == 0 {
            recorders[first].lookup(&key).await;
            continue;
        }
        if rng.below(10) == 0
            && let Some((key, token)) = old_tokens.get(rng.below(old_tokens.len().max(1) as u64) as usize).cloned()
        {
            recorders[first].complete(&key, &token, b"stale").await;
            continue;
        }
        let request_id = (rng.below(4) == 0).then(|| format!("req-{seed}-{}", rng.below(1000)));
        let lease_ms = 300 + rng.below(700) as i64;
        let Outcome::Acquired { token, .. } = recorders[first].claim(&key, lease_ms, request_id).await else {
            continue;
        };
        old_tokens.push((key.clone(), token.clone()));
        let recorder = &mut recorders[second];
        // Bodies of mixed sizes, across the size at which sled writes pages to blob files.
        let mut body = format!("{key} by {token}").into_bytes();
        body.resize(idempotency_testkit::body_size(&mut rng, body.len(), Some(200_000)), b'.');
        match rng.below(20) {
            0..=12 => recorder.complete(&key, &token, &body).await,
            13..=15 => recorder.release(&key, &token).await,
            16..=17 => {
                recorder.renew(&key, &token, lease_ms).await;
                recorder.complete(&key, &token, &body).await;
            }
            _ => {} // abandoned: the lease lapses and someone takes over
        }
    }
}

/// Opens a store that was just closed in this process. sled's I/O threads may hold the
/// directory's lock for a moment after the last handle is dropped, so a locked directory is
/// retried for a few seconds (a different process holding it would fail every retry).
pub fn reopen<T, E: std::fmt::Debug>(mut open: impl FnMut() -> Result<T, E>) -> T {
    let give_up = Instant::now() + Duration::from_secs(5);
    loop {
        match open() {
            Ok(opened) => return opened,
            Err(error) if Instant::now() < give_up && format!("{error:?}").contains("could not acquire lock") => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(error) => panic!("the store reopens: {error:?}"),
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn lazy_client(addr: &str) -> CoordinatorClient<Channel> {
    lazy_client_with_deadline(addr, Duration::from_secs(2)).await
}

async fn lazy_client_with_deadline(addr: &str, deadline: Duration) -> CoordinatorClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(deadline)
        .connect_timeout(Duration::from_millis(500))
        .connect_lazy();
    CoordinatorClient::new(channel)
}

/// How many kill -9 a crash run does: about 10 in CI, under a 64-client workload; `IDEMPOTENCY_CRASH_KILLS` for longer runs.
fn crash_kills() -> usize {
    std::env::var("IDEMPOTENCY_CRASH_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_randomized_workload_violates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let addr = format!("127.0.0.1:{}", free_port());
    let flags = ["--listen", addr.as_str()];
    let mut server = ChildServer::start_with(&data, &flags);
    let history = Arc::new(History::default());
    let kills = crash_kills();
    let run_for = Duration::from_millis(600 * kills as u64 + 1_000);
    let start = Instant::now();
    let until = start + run_for;
    let mut clients = Vec::new();
    for seed in 0..64u64 {
        let recorder = Recorder { client: lazy_client(&addr).await, history: Arc::clone(&history) };
        clients.push(tokio::spawn(workload_client(vec![recorder], seed + 1, 12, start, until)));
    }
    let mut rng = Rng(42);
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(200 + rng.below(400))).await;
        server.signal("-KILL");
        let _ = server.child.wait();
        server = ChildServer::start_with(&data, &flags);
    }
    for client in clients {
        client.await.unwrap();
    }
    let events = history.events();
    let acknowledged = events.iter().filter(|e| matches!(e.outcome, Outcome::CompleteOk { .. })).count();
    let grants = events.iter().filter(|e| matches!(e.outcome, Outcome::Acquired { .. })).count();
    let unknown = events.iter().filter(|e| matches!(e.outcome, Outcome::Unknown)).count();
    eprintln!(
        "crash run: {kills} kills, {} calls, {grants} grants, {acknowledged} completes, {unknown} indeterminate",
        events.len()
    );
    assert!(acknowledged > 50 && grants > 50, "the workload did too little to prove anything");

    // After the last restart every acknowledged completion is still there, byte for byte.
    let mut recorder = Recorder { client: server.client().await, history: Arc::clone(&history) };
    let mut keys: Vec<String> = events.iter().map(|e| e.key.clone()).collect();
    keys.sort();
    keys.dedup();
    for key in &keys {
        recorder.lookup(key).await;
    }
    let events = history.events();
    let violations = history::check(&events);
    if !violations.is_empty() {
        for violation in &violations {
            let key = violation.split_whitespace().nth(1).unwrap_or_default().trim_end_matches(':');
            eprintln!("{violation}");
            for event in events.iter().filter(|e| e.key == key) {
                eprintln!(
                    "  {:?} -> {:?} at {:?}..{:?}",
                    event.call,
                    event.outcome,
                    event.invoked - start,
                    event.returned - start
                );
            }
        }
    }
    assert!(violations.is_empty(), "{} violations:\n{}", violations.len(), violations.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_claims_over_many_keys_grant_each_exactly_once() {
    let server = TestServer::start().await;
    let history = Arc::new(History::default());
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(server.channel().await);
    }
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let mut recorder =
                Recorder { client: CoordinatorClient::new(channels[i % 4].clone()), history: Arc::clone(&history) };
            tokio::spawn(async move {
                for key in 0..1000 {
                    recorder.claim(&format!("race-{key}"), 10_000, None).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let events = history.events();
    let grants = events.iter().filter(|e| matches!(e.outcome, Outcome::Acquired { .. })).count();
    assert_eq!(grants, 1000);
    assert_eq!(events.len(), 64_000);
    assert_eq!(history::check(&events), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_server_lets_leases_lapse_and_fences_the_old_holder() {
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start(&dir.path().join("data"));
    let history = Arc::new(History::default());
    let mut first = Recorder { client: server.client().await, history: Arc::clone(&history) };
    let Outcome::Acquired { token, .. } = first.claim("paused", 500, None).await else { panic!("first claim") };
    server.signal("-STOP");
    tokio::time::sleep(Duration::from_millis(800)).await;
    server.signal("-CONT");
    let mut second = Recorder { client: server.client().await, history: Arc::clone(&history) };
    let Outcome::Acquired { token: newer, .. } = second.claim("paused", 5_000, None).await else { panic!("takeover") };
    first.complete("paused", &token, b"late").await;
    second.complete("paused", &newer, b"fresh").await;
    second.lookup("paused").await;
    let events = history.events();
    let late =
        events.iter().find(|e| e.call == Call::Complete { token: token.clone(), body: b"late".to_vec() }).unwrap();
    assert_eq!(late.outcome, Outcome::Refused("LEASE_LOST".into()));
    assert_eq!(history::check(&events), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------------
// The sled store against a small reference model, on random command sequences with clock moves,
// sweeps and restarts.

mod model {
    use std::collections::HashMap;
    use std::time::Duration;

    use idempotency_coordinator::stores::AnyStore;
    use idempotency_core::clock::{Clock, SystemClock};
    use idempotency_core::domain::{
        ApiResponse, Claim, ClaimOutcome, Complete, Fingerprint, Key, KeyState, LeaseToken, Namespace, Owner, Release,
        Renew, RequestId, Timestamp,
    };
    use idempotency_core::store::{Store, StoreError};
    use idempotency_store_postgres::{PostgresOptions, PostgresStore, TimeSource};
    use idempotency_store_sled::{Durability, SledOptions, SledStore};
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    pub enum Op {
        Claim { key: u8, fingerprint: u8, ttl_s: u8, retention_s: u8, request: Option<u8> },
        Complete { key: u8, token: u8, body: u8, retention_s: Option<u8> },
        Renew { key: u8, token: u8, ttl_s: u8 },
        Release { key: u8, token: u8 },
        Lookup { key: u8 },
        Advance { seconds: u8 },
        Sweep,
        Restart,
    }

    pub fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..3u8, 0..3u8, 1..5u8, 1..8u8, proptest::option::of(0..2u8))
                .prop_map(|(key, fingerprint, ttl_s, retention_s, request)| Op::Claim { key, fingerprint, ttl_s, retention_s, request }),
            3 => (0..3u8, 0..6u8, 0..3u8, proptest::option::of(1..8u8))
                .prop_map(|(key, token, body, retention_s)| Op::Complete { key, token, body, retention_s }),
            1 => (0..3u8, 0..6u8, 1..5u8).prop_map(|(key, token, ttl_s)| Op::Renew { key, token, ttl_s }),
            1 => (0..3u8, 0..6u8).prop_map(|(key, token)| Op::Release { key, token }),
            2 => (0..3u8).prop_map(|key| Op::Lookup { key }),
            2 => (1..6u8).prop_map(|seconds| Op::Advance { seconds }),
            1 => Just(Op::Sweep),
            1 => Just(Op::Restart),
        ]
    }

    /// What a call returned, with the random parts (tokens, fencing values) left out.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Seen {
        Acquired { attempt: u32, takeover: bool, expires: i64, same_as: Option<usize> },
        InProgress { expires: i64, attempt: u32 },
        Completed { body: Vec<u8>, completed_at: i64, expires: i64 },
        CompleteOk { completed_at: i64, expires: i64, already: bool },
        RenewOk { expires: i64 },
        ReleaseOk,
        Lookup { state: &'static str, attempt: u32, lease: Option<i64>, body: Option<Vec<u8>>, expires: i64 },
        Refused(&'static str),
        Nothing,
    }

    #[derive(Clone)]
    enum State {
        Held { token: usize, expires: i64, request: Option<u8>, takeover: bool },
        Released { token: usize },
        Completed { token: usize, body: Vec<u8>, at: i64 },
    }

    #[derive(Clone)]
    struct Entry {
        fingerprint: u8,
        attempt: u32,
        updated: i64,
        retention: i64,
        state: State,
    }

    impl Entry {
        /// Retention after the last change; for a held key, retention after its lease ends.
        fn expires(&self) -> i64 {
            match self.state {
                State::Held { expires, .. } => expires.max(self.updated) + self.retention,
                _ => self.updated + self.retention,
            }
        }
    }

    /// The reference: a map from key to entry, with the contract's rules written out plainly.
    /// Tokens are indices into the list of tokens the store handed out (index 0 is never granted).
    #[derive(Default)]
    pub struct Model {
        entries: HashMap<u8, Entry>,
        granted: usize,
    }

    const S: i64 = 1000;

    impl Model {
        fn live(&self, key: u8, now: i64) -> Option<&Entry> {
            self.entries.get(&key).filter(|e| e.expires() > now)
        }

        pub fn apply(&mut self, op: &Op, now: i64) -> Seen {
            match *op {
                Op::Claim { key, fingerprint, ttl_s, retention_s, request } => {
                    let (ttl, retention) = (i64::from(ttl_s) * S, i64::from(retention_s) * S);
                    let live = self.live(key, now).cloned();
                    let grant = |model: &mut Model, attempt: u32, takeover: bool, bound: u8| {
                        model.granted += 1;
                        let state = State::Held { token: model.granted, expires: now + ttl, request, takeover };
                        model
                            .entries
                            .insert(key, Entry { fingerprint: bound, attempt, updated: now, retention, state });
                        Seen::Acquired { attempt, takeover, expires: now + ttl, same_as: None }
                    };
                    let Some(entry) = live else { return grant(self, 1, false, fingerprint) };
                    if fingerprint != 0 && entry.fingerprint != 0 && fingerprint != entry.fingerprint {
                        return Seen::Refused("FINGERPRINT_MISMATCH");
                    }
                    let bound = if entry.fingerprint != 0 { entry.fingerprint } else { fingerprint };
                    let entry_expires = entry.expires();
                    match entry.state {
                        State::Completed { body, at, .. } => {
                            Seen::Completed { body, completed_at: at, expires: entry_expires }
                        }
                        State::Held { token, expires, request: held_request, takeover } if expires > now => {
                            if request.is_some() && request == held_request {
                                Seen::Acquired { attempt: entry.attempt, takeover, expires, same_as: Some(token) }
                            } else {
                                Seen::InProgress { expires, attempt: entry.attempt }
                            }
                        }
                        State::Held { .. } => grant(self, entry.attempt + 1, true, bound),
                        State::Released { .. } => grant(self, entry.attempt + 1, false, bound),
                    }
                }
                Op::Complete { key, token, body, retention_s } => {
                    let Some(entry) = self.live(key, now).cloned() else { return Seen::Refused("LEASE_LOST") };
                    match entry.state {
                        State::Held { token: holder, .. } if holder == usize::from(token) => {
                            let retention = retention_s.map_or(entry.retention, |r| i64::from(r) * S);
                            let completed = Entry {
                                updated: now,
                                retention,
                                state: State::Completed { token: holder, body: vec![body], at: now },
                                ..entry
                            };
                            let expires = completed.expires();
                            self.entries.insert(key, completed);
                            Seen::CompleteOk { completed_at: now, expires, already: false }
                        }
                        State::Completed { token: by, at, .. } if by == usize::from(token) => {
                            Seen::CompleteOk { completed_at: at, expires: entry.expires(), already: true }
                        }
                        _ => Seen::Refused("LEASE_LOST"),
                    }
                }
                Op::Renew { key, token, ttl_s } => {
                    let Some(entry) = self.live(key, now).cloned() else { return Seen::Refused("LEASE_LOST") };
                    match entry.state {
                        State::Held { token: holder, request, takeover, .. } if holder == usize::from(token) => {
                            let expires = now + i64::from(ttl_s) * S;
                            let state = State::Held { token: holder, expires, request, takeover };
                            self.entries.insert(key, Entry { updated: now, state, ..entry });
                            Seen::RenewOk { expires }
                        }
                        State::Completed { token: by, .. } if by == usize::from(token) => {
                            Seen::Refused("ALREADY_COMPLETED")
                        }
                        _ => Seen::Refused("LEASE_LOST"),
                    }
                }
                Op::Release { key, token } => {
                    let Some(entry) = self.live(key, now).cloned() else { return Seen::ReleaseOk };
                    match entry.state {
                        State::Held { token: holder, .. } if holder == usize::from(token) => {
                            self.entries
                                .insert(key, Entry { updated: now, state: State::Released { token: holder }, ..entry });
                            Seen::ReleaseOk
                        }
                        State::Released { token: by } if by == usize::from(token) => Seen::ReleaseOk,
                        State::Completed { token: by, .. } if by == usize::from(token) => {
                            Seen::Refused("ALREADY_COMPLETED")
                        }
                        _ => Seen::Refused("LEASE_LOST"),
                    }
                }
                Op::Lookup { key } => {
                    let Some(entry) = self.live(key, now) else { return Seen::Refused("KEY_NOT_FOUND") };
                    let (state, lease, body) = match &entry.state {
                        State::Held { expires, .. } if *expires > now => ("in_progress", Some(*expires), None),
                        State::Held { expires, .. } => ("lease_expired", Some(*expires), None),
                        State::Released { .. } => ("released", None, None),
                        State::Completed { body, .. } => ("completed", None, Some(body.clone())),
                    };
                    Seen::Lookup { state, attempt: entry.attempt, lease, body, expires: entry.expires() }
                }
                Op::Advance { .. } | Op::Sweep | Op::Restart => Seen::Nothing,
            }
        }
    }

    /// The store under test, with the tokens it handed out (index 0: one it never did).
    pub struct Subject {
        pub dir: tempfile::TempDir,
        /// `None`: sled in `dir`; `Some((url, schema))`: PostgreSQL.
        pub postgres: Option<(String, String)>,
        pub store: Option<AnyStore>,
        pub tokens: Vec<LeaseToken>,
        pub fencing: HashMap<u8, u64>,
    }

    fn reason(error: StoreError) -> &'static str {
        use idempotency_core::domain::Rejection;
        match error {
            StoreError::Rejected(Rejection::FingerprintMismatch) => "FINGERPRINT_MISMATCH",
            StoreError::Rejected(Rejection::LeaseLost) => "LEASE_LOST",
            StoreError::Rejected(Rejection::AlreadyCompleted) => "ALREADY_COMPLETED",
            StoreError::Rejected(Rejection::NotFound) => "KEY_NOT_FOUND",
            other => panic!("unexpected store error {other}"),
        }
    }

    pub async fn open(dir: &std::path::Path, postgres: &Option<(String, String)>) -> AnyStore {
        match postgres {
            None => {
                let options = SledOptions {
                    path: dir.join("data"),
                    durability: Durability::Strict,
                    max_records: 1000,
                    cache_capacity_bytes: 1 << 22,
                };
                AnyStore::Sled(super::reopen(|| SledStore::open(&options)))
            }
            Some((url, schema)) => {
                let options = PostgresOptions {
                    url: url.clone(),
                    schema: schema.clone(),
                    pool_size: 2,
                    timeout: Duration::from_secs(10),
                    max_records: 1000,
                    time: TimeSource::Caller,
                };
                let local: std::sync::Arc<dyn Clock> = std::sync::Arc::new(SystemClock);
                let store = PostgresStore::open(&options, local, Default::default()).await.expect("PostgreSQL opens");
                AnyStore::Postgres(store)
            }
        }
    }

    impl Subject {
        fn token(&self, index: u8) -> LeaseToken {
            self.tokens.get(usize::from(index)).copied().unwrap_or(self.tokens[0])
        }

        pub async fn apply(&mut self, op: &Op, now: i64) -> Seen {
            let namespace = Namespace::parse("model").unwrap();
            let at = Timestamp::from_unix_millis(now);
            let key_of = |key: u8| Key::parse(&format!("k{key}")).unwrap();
            let ms = |t: Timestamp| t.unix_millis();
            if let Op::Restart = op {
                let store = self.store.take().unwrap();
                store.close().await.unwrap();
                drop(store);
                self.store = Some(open(self.dir.path(), &self.postgres).await);
                return Seen::Nothing;
            }
            let store = self.store.as_ref().unwrap();
            match *op {
                Op::Claim { key, fingerprint, ttl_s, retention_s, request } => {
                    let fingerprint = if fingerprint == 0 { vec![] } else { vec![fingerprint] };
                    let command = Claim {
                        fingerprint: Fingerprint::parse(&fingerprint).unwrap(),
                        lease_ttl: Duration::from_secs(u64::from(ttl_s)),
                        retention: Duration::from_secs(u64::from(retention_s)),
                        request_id: request.map(|r| RequestId::parse_optional(&format!("r{r}")).unwrap().unwrap()),
                        owner: Owner::parse("").unwrap(),
                        new_lease_token: LeaseToken::generate(),
                    };
                    match store.claim(&namespace, &key_of(key), at, &command, false).await {
                        Ok(ClaimOutcome::Acquired(grant)) => {
                            let previous = self.fencing.insert(key, grant.fencing_token.0).unwrap_or(0);
                            let same_as = self.tokens.iter().position(|t| *t == grant.lease_token);
                            if same_as.is_none() {
                                assert!(
                                    grant.fencing_token.0 > previous,
                                    "fencing went from {previous} to {}",
                                    grant.fencing_token.0
                                );
                                self.tokens.push(grant.lease_token);
                            }
                            Seen::Acquired {
                                attempt: grant.attempt,
                                takeover: grant.takeover,
                                expires: ms(grant.lease_expires_at),
                                same_as,
                            }
                        }
                        Ok(ClaimOutcome::InProgress { lease_expires_at, attempt, .. }) => {
                            Seen::InProgress { expires: ms(lease_expires_at), attempt }
                        }
                        Ok(ClaimOutcome::Completed(stored)) => Seen::Completed {
                            body: stored.response.body.to_vec(),
                            completed_at: ms(stored.completed_at),
                            expires: ms(stored.expires_at),
                        },
                        Err(error) => Seen::Refused(reason(error)),
                    }
                }
                Op::Complete { key, token, body, retention_s } => {
                    let command = Complete {
                        lease_token: self.token(token),
                        response: ApiResponse { body: vec![body].into(), metadata: Default::default() },
                        retention: retention_s.map(|r| Duration::from_secs(u64::from(r))),
                    };
                    match store.complete(&namespace, &key_of(key), at, command).await {
                        Ok(done) => Seen::CompleteOk {
                            completed_at: ms(done.completed_at),
                            expires: ms(done.expires_at),
                            already: done.already_completed,
                        },
                        Err(error) => Seen::Refused(reason(error)),
                    }
                }
                Op::Renew { key, token, ttl_s } => {
                    let command =
                        Renew { lease_token: self.token(token), lease_ttl: Duration::from_secs(u64::from(ttl_s)) };
                    match store.renew(&namespace, &key_of(key), at, &command).await {
                        Ok(renewed) => Seen::RenewOk { expires: ms(renewed.lease_expires_at) },
                        Err(error) => Seen::Refused(reason(error)),
                    }
                }
                Op::Release { key, token } => {
                    match store.release(&namespace, &key_of(key), at, &Release { lease_token: self.token(token) }).await
                    {
                        Ok(()) => Seen::ReleaseOk,
                        Err(error) => Seen::Refused(reason(error)),
                    }
                }
                Op::Lookup { key } => match store.lookup(&namespace, &key_of(key), at).await {
                    Ok(view) => Seen::Lookup {
                        state: match view.state {
                            KeyState::InProgress => "in_progress",
                            KeyState::LeaseExpired => "lease_expired",
                            KeyState::Released => "released",
                            KeyState::Completed => "completed",
                        },
                        attempt: view.attempt,
                        lease: view.lease_expires_at.map(ms),
                        body: view.completed.map(|(response, _)| response.body.to_vec()),
                        expires: ms(view.expires_at),
                    },
                    Err(error) => Seen::Refused(reason(error)),
                },
                Op::Sweep => {
                    store.sweep(at, 100).await.unwrap();
                    Seen::Nothing
                }
                Op::Advance { .. } | Op::Restart => Seen::Nothing,
            }
        }
    }
}

/// Runs `ops` against the reference model and a store (sled, or PostgreSQL in `postgres`), and
/// asserts that every step is seen the same way by both.
fn run_model(ops: &[model::Op], postgres: Option<(String, String)>) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = model::open(dir.path(), &postgres).await;
        let mut subject = model::Subject {
            dir,
            postgres,
            store: Some(store),
            tokens: vec![idempotency_core::domain::LeaseToken::generate()],
            fencing: Default::default(),
        };
        let mut reference = model::Model::default();
        let mut now = START.unix_millis();
        for (step, op) in ops.iter().enumerate() {
            if let model::Op::Advance { seconds } = op {
                now += i64::from(*seconds) * 1000;
            }
            let expected = reference.apply(op, now);
            let actual = subject.apply(op, now).await;
            // Both number tokens by grant order (1, 2, …), so a request-id retry names the
            // same earlier grant on both sides.
            assert_eq!(actual, expected, "step {step}: {op:?} at {now}\nops: {ops:?}");
        }
        idempotency_core::store::Store::close(&subject.store.take().unwrap()).await.unwrap();
    });
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config { cases: 128, ..Default::default() })]

    #[test]
    fn the_sled_store_behaves_like_the_reference_model(ops in proptest::collection::vec(model::op(), 1..40)) {
        run_model(&ops, None);
    }
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config { cases: 96, ..Default::default() })]

    /// The same model against the SQL reimplementation of the state machine, a schema per case.
    #[test]
    fn the_postgres_store_behaves_like_the_reference_model(ops in proptest::collection::vec(model::op(), 1..40)) {
        if let Some(Backend::Postgres(url)) = Backend::postgres() {
            let _serial = POSTGRES.blocking_lock();
            run_model(&ops, Some((url, test_schema())));
        }
    }
}

/// The clock jumps forward and back while 16 clients work. A forward step lapses leases early (a
/// takeover may come while the old holder still works) and a backward step lengthens them; in
/// the server's time no two grants overlap, fencing still increases and stale tokens still fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_steps_during_traffic_keep_p1_to_p3() {
    let server = TestServer::start().await;
    let history = Arc::new(History::default());
    let start = Instant::now();
    let until = start + Duration::from_secs(3);
    let channel = server.channel().await;
    let clients: Vec<_> = (0..16u64)
        .map(|seed| {
            let recorder = Recorder { client: CoordinatorClient::new(channel.clone()), history: Arc::clone(&history) };
            tokio::spawn(workload_client(vec![recorder], seed + 100, 6, start, until))
        })
        .collect();
    let mut rng = Rng(7);
    let mut steps = 0;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = idempotency_core::clock::Clock::now(&server.clock);
        let step = rng.below(1500) as i64;
        let to = if rng.below(3) == 0 { now.unix_millis() - step } else { now.unix_millis() + step };
        server.clock.set(idempotency_core::domain::Timestamp::from_unix_millis(to));
        steps += 1;
    }
    for client in clients {
        client.await.unwrap();
    }
    let events = history.events();
    let grants = events.iter().filter(|e| matches!(e.outcome, Outcome::Acquired { .. })).count();
    assert!(grants > 20, "too few grants ({grants}) to prove anything");
    // With the clock moving back, retention is no longer monotonic in real time, so P4 (which
    // reads "later" in real time) is not expected here; P1–P3 and P5 are.
    let violations: Vec<_> = history::check(&events).into_iter().filter(|v| !v.starts_with("P4")).collect();
    eprintln!("clock steps: {steps} steps, {} calls, {grants} grants", events.len());
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Hostile input through a real HTTP/2 connection: bytes no generated client would send.

/// Sends one gRPC call with a hand-made frame and extra headers; returns its status (code,
/// message and details, `Code::Ok` for success).
async fn raw_call(addr: std::net::SocketAddr, path: &str, frame: Vec<u8>, headers: &[(&str, &str)]) -> tonic::Status {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let (response, mut body) = client.send_request(request.body(()).unwrap(), false).unwrap();
    // The server may answer (an unknown method, say) and close the stream before the frame goes
    // out; sending then fails, and the answer below is what counts.
    let _ = body.send_data(bytes::Bytes::from(frame), true);
    let response = response.await.unwrap();
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        return status;
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        body.flow_control().release_capacity(chunk.len()).unwrap();
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    tonic::Status::from_header_map(&trailers).expect("a grpc-status")
}

/// A gRPC length-prefixed frame.
fn frame(compressed: bool, declared_len: u32, payload: &[u8]) -> Vec<u8> {
    let mut bytes = vec![u8::from(compressed)];
    bytes.extend_from_slice(&declared_len.to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// The status code and the ErrorInfo reason ("" without one).
fn code_and_reason(status: &tonic::Status) -> (tonic::Code, String) {
    (status.code(), status.get_details_error_info().map(|info| info.reason).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_get_a_status_and_change_nothing() {
    use prost::Message;
    use tonic::Code;
    let server = TestServer::start().await;
    let mut client = server.client().await;
    claim_acquired(&mut client, "existing").await;
    let before = server.digest().await;
    let claim = "/idempotency.v1.Coordinator/Claim";
    let gzip_header = [("grpc-encoding", "gzip")];
    // 16 MiB of zeros: a few KiB compressed, far past the 1 MiB + 64 KiB message limit inflated.
    let bomb = gzip(&vec![0u8; 16 << 20]);
    let mut invalid_utf8 = claim_request("k", b"fp").encode_to_vec();
    let at = invalid_utf8.iter().position(|b| *b == b'k').unwrap();
    invalid_utf8[at] = 0xff;
    type Case<'a> = (&'a str, Vec<u8>, &'a [(&'a str, &'a str)], Code, &'a str);
    let cases: Vec<Case> = vec![
        // Not protobuf at all: bad input, with the reason for it.
        ("garbage bytes", frame(false, 7, &[0xff; 7]), &[], Code::InvalidArgument, "INVALID_MESSAGE"),
        // Field 2 (key, a string) sent as a varint.
        ("wrong wire type", frame(false, 2, &[0x10, 0x05]), &[], Code::InvalidArgument, "INVALID_MESSAGE"),
        (
            "invalid UTF-8 in a string",
            frame(false, invalid_utf8.len() as u32, &invalid_utf8),
            &[],
            Code::InvalidArgument,
            "INVALID_MESSAGE",
        ),
        // A frame that claims 100 MB: refused from its length alone.
        ("declared length beyond the limit", frame(false, 100 << 20, &[0; 16]), &[], Code::OutOfRange, ""),
        // A compression bomb: refused once the inflated size passes the limit.
        ("gzip bomb", frame(true, bomb.len() as u32, &bomb), &gzip_header, Code::ResourceExhausted, ""),
        // Compressed, but not gzip: the transport's error.
        ("broken gzip", frame(true, 4, &[1, 2, 3, 4]), &gzip_header, Code::Internal, ""),
        // An encoding the server does not accept.
        ("zstd", frame(true, 4, &[1, 2, 3, 4]), &[("grpc-encoding", "zstd")], Code::Unimplemented, ""),
        // An empty message: every field at its default, so an empty key.
        ("empty message", frame(false, 0, &[]), &[], Code::InvalidArgument, "INVALID_KEY"),
    ];
    for (name, bytes, headers, code, reason) in cases {
        let status = raw_call(server.addr, claim, bytes, headers).await;
        assert_eq!(code_and_reason(&status), (code, reason.to_owned()), "{name}: {status:?}");
    }
    assert_eq!(server.digest().await, before, "hostile frames changed the store");

    // Unknown fields are skipped, as protobuf requires: the call works.
    let mut payload = lookup_request("existing").encode_to_vec();
    payload.extend_from_slice(&[0xf8, 0x06, 0x01]); // field 111, varint 1
    let lookup = "/idempotency.v1.Coordinator/Lookup";
    let status = raw_call(server.addr, lookup, frame(false, payload.len() as u32, &payload), &[]).await;
    assert_eq!(status.code(), Code::Ok);
    // A gzip-compressed request is served as any other.
    let compressed = gzip(&lookup_request("existing").encode_to_vec());
    let status = raw_call(server.addr, lookup, frame(true, compressed.len() as u32, &compressed), &gzip_header).await;
    assert_eq!(status.code(), Code::Ok, "{status:?}");
    // An unknown method.
    let status = raw_call(server.addr, "/idempotency.v1.Coordinator/Drop", frame(false, 0, &[]), &[]).await;
    assert_eq!(status.code(), Code::Unimplemented);
    // And the server still serves everyone else.
    in_progress(client.claim(claim_request("existing", b"fp")).await.unwrap().into_inner());
}

/// `grpc-timeout` values the spec does not allow (more than eight digits) or that would
/// overflow a clock if added to it: answered like calls without a deadline, never a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_or_malformed_grpc_timeouts_are_answered_without_a_panic() {
    use prost::Message;
    // The binary, on the system clock, so that waits end.
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start(&dir.path().join("data"));
    let mut client = server.client().await;
    let addr: std::net::SocketAddr = server.addr.parse().unwrap();
    claim_acquired(&mut client, "held").await;
    let claim = "/idempotency.v1.Coordinator/Claim";
    for timeout in ["9223372036854775807S", "18446744073709551615S", "99999999H", "99999999S", "1x", "S", ""] {
        // A fresh key (acquired), and the held key with a wait (answers at once: the wait is 1 ms).
        let key = format!("fresh-{timeout}");
        let payload = claim_request(&key, b"fp").encode_to_vec();
        let status =
            raw_call(addr, claim, frame(false, payload.len() as u32, &payload), &[("grpc-timeout", timeout)]).await;
        assert_eq!(status.code(), tonic::Code::Ok, "grpc-timeout {timeout:?}: {status:?}");
        let waiting = pb::ClaimRequest { wait: Some(millis(1)), ..claim_request("held", b"fp") }.encode_to_vec();
        let status =
            raw_call(addr, claim, frame(false, waiting.len() as u32, &waiting), &[("grpc-timeout", timeout)]).await;
        assert_eq!(status.code(), tonic::Code::Ok, "grpc-timeout {timeout:?} on a wait: {status:?}");
    }
    // The server still serves.
    in_progress(client.claim(claim_request("held", b"fp")).await.unwrap().into_inner());
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// How many idle connections to open: 10,000 (the machine allows 20,000 descriptors per process).
fn idle_connections() -> usize {
    std::env::var("IDEMPOTENCY_IDLE_CONNECTIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_do_not_stop_the_service() {
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start(&dir.path().join("data"));
    let pid = server.child.id();
    let mut client = server.client().await;
    claim_acquired(&mut client, "before").await;
    let rss_before = rss_kib(pid);
    let mut idle = Vec::new();
    for _ in 0..idle_connections() {
        idle.push(tokio::net::TcpStream::connect(&server.addr).await.expect("the server accepts"));
    }
    // Every one of them is open; a real client still gets served, quickly enough to finish.
    let mut other = server.client().await;
    let grant = claim_acquired(&mut other, "during").await;
    other.complete(complete_request("during", &grant.lease_token, b"ok")).await.unwrap();
    let rss_during = rss_kib(pid);
    eprintln!("idle connections: {}, server RSS {rss_before} KiB before, {rss_during} KiB with them open", idle.len());
    assert!(rss_during < rss_before + 512 * 1024, "memory grew by {} KiB", rss_during - rss_before);
    drop(idle);
    completed(client.claim(claim_request("during", b"fp")).await.unwrap().into_inner());
}

// ---------------------------------------------------------------------------------------------
// Soak: a steady load with short retention, so that sweeping runs all the time.

fn dir_bytes(path: &std::path::Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// `IDEMPOTENCY_SOAK_SECONDS` (default 15) of steady flows at 400/s against the server binary,
/// with 20 s retention and sweeping every second. Always: zero errors and zero double grants.
/// For runs of 5 minutes or more, over the last two thirds (after warm-up), sampled every 10 s:
/// RSS stays within ±10 % of its mean; disk does not grow (the mean of the later half within
/// 10 % of the earlier half's; single samples within 25 %, as sled works in 512 KiB segments). The figures of the last long run are in
/// RELIABILITY.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_load_with_sweeping_keeps_memory_and_disk_flat() {
    use idempotency_bench::{Options, Scenario};
    let seconds: u64 = std::env::var("IDEMPOTENCY_SOAK_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(15);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = ChildServer::start_with(&data, &["--default-retention", "20s", "--sweep-interval", "1s"]);
    let pid = server.child.id();
    let options = Options {
        target: format!("http://{}", server.addr),
        scenario: Scenario::Flow,
        concurrency: 16,
        connections: 2,
        duration: Duration::from_secs(seconds),
        count: None,
        warmup: Duration::ZERO,
        // Mixed sizes, across the size at which sled keeps a page in a blob file of its own.
        response_bytes: 10,
        response_bytes_max: Some(200_000),
        key_space: 100,
        seed: 3,
        mix: "20,70,10".to_owned(),
        synchronous_commit: true,
        rate: 400,
        json: false,
    };
    let load = tokio::spawn(idempotency_bench::run(options));
    let mut samples = Vec::new();
    let every = if seconds >= 300 { Duration::from_secs(10) } else { Duration::from_secs(3) };
    while !load.is_finished() {
        tokio::time::sleep(every).await;
        samples.push((rss_kib(pid), dir_bytes(&data)));
    }
    let report = load.await.unwrap().unwrap();
    eprintln!(
        "soak: {seconds} s, {:.0} flows/s, errors {}, samples (RSS KiB, disk bytes): {samples:?}",
        report.rate(),
        report.error_count()
    );
    assert_eq!(report.error_count(), 0, "{}", report.to_table());
    assert_eq!(report.double_grants, 0);
    assert!(report.units > seconds * 300, "the load fell far below its rate: {}", report.units);
    if seconds >= 300 {
        let steady = &samples[samples.len() / 3..];
        let mean = |values: &[u64]| values.iter().sum::<u64>() as f64 / values.len() as f64;
        let rss: Vec<u64> = steady.iter().map(|s| s.0).collect();
        let rss_mean = mean(&rss);
        for value in &rss {
            assert!(
                (*value as f64 - rss_mean).abs() <= rss_mean * 0.10,
                "RSS is not flat: {value} against {rss_mean:.0}: {rss:?}"
            );
        }
        // sled fills and reclaims its files a 512 KiB segment at a time, so single disk samples
        // swing by a few segments around a level; what must not happen is growth. The level of
        // the second half stays within 10 % of the first, and no sample strays beyond 25 %.
        let disk: Vec<u64> = steady.iter().map(|s| s.1).collect();
        let (first, second) = disk.split_at(disk.len() / 2);
        let (first, second, all) = (mean(first), mean(second), mean(&disk));
        assert!((second - first).abs() <= first * 0.10, "disk grew from {first:.0} to {second:.0}: {disk:?}");
        for value in &disk {
            assert!((*value as f64 - all).abs() <= all * 0.25, "disk swung to {value} around {all:.0}: {disk:?}");
        }
    }
}

/// Bodies from 10 B to 300 KB, the size of a response varying with every call, written by 16
/// clients at once while the sweeper deletes what expired: sled writes pages larger than 128 KiB
/// to blob files of their own, and creates and deletes them all the time under such a load.
/// Every call succeeds and health stays SERVING throughout (a blob that sled deleted while a
/// flush was syncing used to fail the flush, and with it the store, for a second at a time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_body_sizes_across_the_blob_threshold_cause_no_outage() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = ChildServer::start_with(&data, &["--default-retention", "1s", "--sweep-interval", "200ms"]);
    let channel = Channel::from_shared(format!("http://{}", server.addr)).unwrap().connect().await.unwrap();
    let mut watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let watcher = {
        let seen = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok(Some(message)) = watch.message().await {
                seen.lock().unwrap().push(message.status());
            }
        })
    };
    let until = Instant::now() + Duration::from_secs(6);
    let writers: Vec<_> = (0..16u64)
        .map(|writer| {
            let mut client = CoordinatorClient::new(channel.clone());
            tokio::spawn(async move {
                let mut rng = Rng(writer);
                let (mut flows, mut failures, mut blob_sized) = (0u64, Vec::new(), 0u64);
                for attempt in 0.. {
                    if Instant::now() >= until {
                        break;
                    }
                    let key = format!("w{writer}-{attempt}");
                    let request = pb::ClaimRequest { retention: Some(secs(1)), ..claim_request(&key, b"fp") };
                    let grant = match client.claim(request).await.map(|reply| outcome(reply.into_inner())) {
                        Ok(pb::claim_response::Outcome::Acquired(grant)) => grant,
                        Ok(other) => {
                            failures.push(format!("claim of a fresh key: {other:?}"));
                            continue;
                        }
                        Err(status) => {
                            failures.push(format!("claim: {:?} {:?}", status.code(), status.message()));
                            continue;
                        }
                    };
                    let size = idempotency_testkit::body_size(&mut rng, 10, Some(300_000));
                    blob_sized += u64::from(size > 128 * 1024);
                    let body = vec![(flows % 251) as u8; size];
                    if let Err(status) = client.complete(complete_request(&key, &grant.lease_token, &body)).await {
                        failures.push(format!("complete: {:?} {:?}", status.code(), status.message()));
                    }
                    flows += 1;
                }
                (flows, failures, blob_sized)
            })
        })
        .collect();
    let (mut flows, mut failures, mut blob_sized) = (0, Vec::new(), 0);
    for writer in writers {
        let (done, failed, large) = writer.await.unwrap();
        flows += done;
        blob_sized += large;
        failures.extend(failed);
    }
    // What health reported while the load ran, before stopping turns it NOT_SERVING.
    let health = seen.lock().unwrap().clone();
    watcher.abort();
    eprintln!("{flows} flows, {blob_sized} bodies over 128 KiB, {} failures, health {health:?}", failures.len());
    assert!(flows > 100 && blob_sized > 0, "the load ran: {flows} flows, {blob_sized} large bodies");
    assert!(
        failures.is_empty(),
        "{} calls failed, the first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(health, vec![ServingStatus::Serving], "health left SERVING under load");
}

/// A client that asks for large responses and never reads them: HTTP/2 flow control stops the
/// server from sending, each stuck call holds one encoded response, the per-connection stream
/// limit caps how many such calls one connection can have, and everyone else is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_does_not_stop_the_service() {
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start_with(&dir.path().join("data"), &["--max-streams-per-connection", "64"]);
    let pid = server.child.id();
    let mut client = server.client().await;
    let grant = claim_acquired(&mut client, "large").await;
    let body = vec![7u8; 256 * 1024];
    client.complete(complete_request("large", &grant.lease_token, &body)).await.unwrap();
    let rss_before = rss_kib(pid);

    // A connection whose receive window is zero: the server may send headers but no data.
    let tcp = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let (h2_client, connection) = h2::client::Builder::new().initial_window_size(0).handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let payload = lookup_request("large").encode_to_vec();
    let lookup = || {
        http::Request::builder()
            .method("POST")
            .uri(format!("http://{}/idempotency.v1.Coordinator/Lookup", server.addr))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap()
    };
    let mut stuck = Vec::new();
    for _ in 0..65 {
        let mut h2_client = h2_client.clone().ready().await.unwrap();
        let (response, mut send) = h2_client.send_request(lookup(), false).unwrap();
        send.send_data(bytes::Bytes::from(frame(false, payload.len() as u32, &payload)), true).unwrap();
        stuck.push((response, send));
    }
    // The first 64 are answered (headers need no window); the 65th waits for a free stream.
    let (last, _) = stuck.pop().unwrap();
    let mut answered = Vec::new();
    for (response, send) in stuck {
        answered
            .push((tokio::time::timeout(Duration::from_secs(30), response).await.expect("answered").unwrap(), send));
    }
    // It either waits, or, if the client sent it before it had the server's SETTINGS, the server
    // refuses it (REFUSED_STREAM). Either way no 65th call runs.
    match tokio::time::timeout(Duration::from_millis(500), last).await {
        Err(_) => {}
        Ok(Err(error)) if error.reason() == Some(h2::Reason::REFUSED_STREAM) => {}
        Ok(answer) => panic!("the server let a connection run more calls than its stream limit: {answer:?}"),
    }
    // Meanwhile a normal client is served, including the same large response.
    let mut other = server.client().await;
    for _ in 0..20 {
        let view = other.lookup(lookup_request("large")).await.unwrap().into_inner();
        assert_eq!(view.response.unwrap().body.len(), body.len());
    }
    let rss_stuck = rss_kib(pid);
    eprintln!(
        "stuck reader: 64 calls of 256 KiB never read; server RSS {rss_before} KiB before, {rss_stuck} KiB with them stuck"
    );
    // 64 encoded responses of 256 KiB are 16 MiB; allow generous room for buffers.
    assert!(rss_stuck < rss_before + 128 * 1024, "memory grew by {} KiB", rss_stuck - rss_before);
    drop(answered);
    drop(h2_client);
    let view = other.lookup(lookup_request("large")).await.unwrap().into_inner();
    assert_eq!(view.state(), pb::KeyState::Completed);
}

// ---------------------------------------------------------------------------------------------
// Replicas on PostgreSQL: several coordinator processes on one database behave as one.
// These tests share the database server (one of them restarts it), so they run one at a time.

static POSTGRES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The test database's URL, and a fresh schema in it, or `None` (skipped, said why).
async fn postgres_schema() -> Option<(String, String)> {
    let Backend::Postgres(url) = Backend::postgres()? else { unreachable!() };
    drop_stale_schemas(&url).await;
    Some((url, test_schema()))
}

/// A call whose deadline passes while its row is locked in PostgreSQL (a slow transaction
/// elsewhere) answers UNAVAILABLE STORE_UNAVAILABLE before the deadline, even though the store's
/// own timeout (3 s) is longer; once the lock is gone the retry is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_deadline_passes_on_a_locked_row_answers_unavailable() {
    let Some(backend) = Backend::postgres() else { return };
    let _one_at_a_time = POSTGRES.lock().await;
    let server = TestServer::start_on_with(backend, |config| config.postgres_timeout = Duration::from_secs(3)).await;
    let mut client = server.client().await;
    let grant = claim_acquired(&mut client, "locked").await;
    let (url, schema) = (server.config.store.clone().unwrap(), server.config.postgres_schema.clone());
    let (mut locker, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let transaction = locker.transaction().await.unwrap();
    transaction.execute(&format!("SELECT 1 FROM {schema}.records WHERE key = 'locked' FOR UPDATE"), &[]).await.unwrap();
    let mut request = tonic::Request::new(complete_request("locked", &grant.lease_token, b"done"));
    request.set_timeout(Duration::from_secs(1));
    let status = client.complete(request).await.unwrap_err();
    assert_eq!(
        (status.code(), status.get_details_error_info().map(|info| info.reason)),
        (tonic::Code::Unavailable, Some("STORE_UNAVAILABLE".to_owned())),
        "{status:?}"
    );
    transaction.rollback().await.unwrap();
    client.complete(complete_request("locked", &grant.lease_token, b"done")).await.expect("the retry is applied");
}

/// Starts `count` replicas on one schema at once (they race to migrate it), each with its own
/// extra flags.
fn start_replicas(url: &str, schema: &str, flags: &[&[&str]]) -> (Vec<ChildServer>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let starts: Vec<_> = flags
        .iter()
        .enumerate()
        .map(|(i, extra)| {
            let data = dir.path().join(format!("unused-{i}"));
            let mut args: Vec<String> = ["--store", url, "--postgres-schema", schema, "--postgres-timeout", "1s"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            args.extend(extra.iter().map(|s| s.to_string()));
            std::thread::spawn(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                ChildServer::start_with(&data, &args)
            })
        })
        .collect();
    (starts.into_iter().map(|start| start.join().expect("a replica starts")).collect(), dir)
}

/// One recorder per replica, with a 10 s deadline: far beyond the replicas' 1 s database
/// timeout, so a call that reaches it shows a replica that hung instead of failing fast.
async fn recorders(replicas: &[ChildServer], history: &Arc<History>) -> Vec<Recorder> {
    let mut recorders = Vec::new();
    for replica in replicas {
        let client = lazy_client_with_deadline(&replica.addr, Duration::from_secs(10)).await;
        recorders.push(Recorder { client, history: Arc::clone(history) });
    }
    recorders
}

fn assert_clean(events: &[Event]) {
    let violations = history::check(events);
    assert!(violations.is_empty(), "{} violations:\n{}", violations.len(), violations.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_racing_for_a_thousand_keys_grant_each_exactly_once() {
    let Some((url, schema)) = postgres_schema().await else { return };
    let _serial = POSTGRES.lock().await;
    let (replicas, _dir) = start_replicas(&url, &schema, &[&[], &[], &[]]);
    let history = Arc::new(History::default());
    let mut channels = Vec::new();
    for replica in &replicas {
        channels.push(replica.client().await);
    }
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let mut recorder = Recorder { client: channels[i % 3].clone(), history: Arc::clone(&history) };
            tokio::spawn(async move {
                for key in 0..1000 {
                    recorder.claim(&format!("race-{key}"), 60_000, None).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let events = history.events();
    let grants = events.iter().filter(|e| matches!(e.outcome, Outcome::Acquired { .. })).count();
    let failed = events.iter().filter(|e| matches!(e.outcome, Outcome::Unknown | Outcome::Refused(_))).count();
    assert_eq!((grants, failed, events.len()), (1000, 0, 64_000));
    assert_clean(&events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_loses_nothing_and_its_keys_are_taken_over_through_the_others() {
    let Some((url, schema)) = postgres_schema().await else { return };
    let _serial = POSTGRES.lock().await;
    let (mut replicas, _dir) = start_replicas(&url, &schema, &[&[], &[], &[]]);
    let history = Arc::new(History::default());

    // A key held through the replica about to die.
    let mut doomed = Recorder { client: replicas[0].client().await, history: Arc::clone(&history) };
    let Outcome::Acquired { fencing: orphan_fencing, .. } = doomed.claim("orphan", 1_500, None).await else {
        panic!("the orphan is claimed")
    };

    let start = Instant::now();
    let until = start + Duration::from_secs(5);
    let mut clients = Vec::new();
    for seed in 0..64u64 {
        let recorders = recorders(&replicas, &history).await;
        clients.push(tokio::spawn(workload_client(recorders, seed + 1_000, 12, start, until)));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    replicas[0].signal("-KILL");
    let _ = replicas[0].child.wait();
    for client in clients {
        client.await.unwrap();
    }

    // The dead replica's key: refused while its lease runs, taken over through another after.
    let mut survivor = Recorder { client: replicas[1].client().await, history: Arc::clone(&history) };
    let takeover = loop {
        match survivor.claim("orphan", 5_000, None).await {
            Outcome::InProgress => tokio::time::sleep(Duration::from_millis(100)).await,
            outcome => break outcome,
        }
    };
    let Outcome::Acquired { fencing, .. } = takeover else { panic!("taken over: {takeover:?}") };
    assert!(fencing > orphan_fencing);

    let events = history.events();
    let acknowledged = events.iter().filter(|e| matches!(e.outcome, Outcome::CompleteOk { .. })).count();
    assert!(acknowledged > 50, "the workload did too little to prove anything ({acknowledged} completes)");
    let mut keys: Vec<String> = events.iter().map(|e| e.key.clone()).collect();
    keys.sort();
    keys.dedup();
    let mut checker = Recorder { client: replicas[2].client().await, history: Arc::clone(&history) };
    for key in &keys {
        checker.lookup(key).await;
    }
    assert_clean(&history.events());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_clocks_skewed_by_minutes_agree_on_every_lease() {
    let Some((url, schema)) = postgres_schema().await else { return };
    let _serial = POSTGRES.lock().await;
    let ahead = ["--clock-offset-ms", "300000"];
    let behind = ["--clock-offset-ms", "-300000"];
    let (replicas, _dir) = start_replicas(&url, &schema, &[&[], &ahead, &behind]);
    let mut exact = replicas[0].client().await;
    let mut fast = replicas[1].client().await;
    let mut slow = replicas[2].client().await;

    // A lease granted through one replica is the same lease through the others: the replica five
    // minutes ahead does not see it lapsed, the one behind reports the same end.
    let grant = acquired(exact.claim(claim_request("skew", b"fp")).await.unwrap().into_inner());
    in_progress(fast.claim(claim_request("skew", b"fp")).await.unwrap().into_inner());
    let view = slow.lookup(lookup_request("skew")).await.unwrap().into_inner();
    assert_eq!(view.lease_expires_at, grant.lease_expires_at);
    assert_eq!(view.state(), pb::KeyState::InProgress);

    // A Claim waiting on the replica behind is woken by a Complete through the one ahead (the
    // lease is 10 s and the wait 8 s, so only a notification can answer it with the response).
    let waiting = tokio::spawn(async move {
        let request = pb::ClaimRequest { wait: Some(secs(8)), ..claim_request("skew", b"fp") };
        slow.claim(request).await.map(|reply| reply.into_inner())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    fast.complete(complete_request("skew", &grant.lease_token, b"done")).await.unwrap();
    let woken = completed(waiting.await.unwrap().unwrap());
    assert_eq!(woken.response.unwrap().body, b"done".as_slice());

    // A short lease lapses for every replica at the same moment: the one behind takes it over
    // once the database's clock passes its end, not five minutes later.
    let short = pb::ClaimRequest { lease_ttl: Some(millis(500)), ..claim_request("short", b"fp") };
    let first = acquired(fast.claim(short).await.unwrap().into_inner());
    let mut slow = replicas[2].client().await;
    let taken = loop {
        match outcome(slow.claim(claim_request("short", b"fp")).await.unwrap().into_inner()) {
            pb::claim_response::Outcome::InProgress(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            pb::claim_response::Outcome::Acquired(taken) => break taken,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(taken.takeover && taken.fencing_token > first.fencing_token);
    let lapsed_at = millis_of(first.lease_expires_at);
    let granted_until = millis_of(taken.lease_expires_at);
    // The takeover's lease (10 s) was granted after the first lease ended, on the database clock.
    assert!(granted_until - 10_000 >= lapsed_at, "taken over before the lease ended");
    assert!(granted_until - 10_000 < lapsed_at + 60_000, "taken over by a clock minutes off");
}

/// Restarts the local PostgreSQL cluster (root, local database only).
fn restart_postgres() -> Result<(), String> {
    let version = std::fs::read_dir("/etc/postgresql")
        .map_err(|e| format!("no /etc/postgresql: {e}"))?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .next()
        .ok_or("no cluster in /etc/postgresql")?;
    let status = std::process::Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", "restart", "-m", "fast"])
        .status()
        .map_err(|e| format!("pg_ctlcluster: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("pg_ctlcluster exited with {status}")) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_under_load_loses_nothing_and_service_resumes() {
    let Some((url, schema)) = postgres_schema().await else { return };
    if !(url.contains("@127.0.0.1") || url.contains("@localhost")) || !Path::new("/etc/postgresql").exists() {
        assert!(std::env::var_os("CI").is_none(), "CI runs PostgreSQL locally so that this test can restart it");
        eprintln!("skipped: restarting the database needs a local cluster managed by pg_ctlcluster");
        return;
    }
    let _serial = POSTGRES.lock().await;
    let (replicas, _dir) = start_replicas(&url, &schema, &[&[], &[]]);
    let history = Arc::new(History::default());
    let start = Instant::now();
    let until = start + Duration::from_secs(8);
    let mut clients = Vec::new();
    for seed in 0..32u64 {
        let recorders = recorders(&replicas, &history).await;
        clients.push(tokio::spawn(workload_client(recorders, seed + 2_000, 12, start, until)));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    restart_postgres().expect("the database restarts");
    for client in clients {
        client.await.unwrap();
    }
    let events = history.events();
    // Every call was answered well before its 10 s deadline: none hung on the restart (the
    // replicas give up on the database after 1 s).
    let slowest = events.iter().map(|e| e.returned - e.invoked).max().unwrap();
    assert!(slowest < Duration::from_secs(5), "a call took {slowest:?}");
    let after_restart = events.iter().filter(|e| e.invoked > start + Duration::from_secs(6)).collect::<Vec<_>>();
    assert!(
        after_restart.iter().any(|e| matches!(e.outcome, Outcome::CompleteOk { .. })),
        "service did not resume after the restart"
    );
    let mut keys: Vec<String> = events.iter().map(|e| e.key.clone()).collect();
    keys.sort();
    keys.dedup();
    let mut checker = Recorder { client: replicas[1].client().await, history: Arc::clone(&history) };
    for key in &keys {
        checker.lookup(key).await;
    }
    let events = history.events();
    let unknown = events.iter().filter(|e| e.outcome == Outcome::Unknown).count();
    eprintln!("database restart: {} calls, {unknown} indeterminate, slowest {slowest:?}", events.len());
    assert_clean(&events);
}

/// A TCP proxy in front of PostgreSQL that can stop forwarding (a network partition: packets
/// vanish, connections stay open) and resume (the stalled connections are then dropped).
struct Partition {
    port: u16,
    cut: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Partition {
    async fn start(upstream: String) -> Partition {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(tokio::sync::watch::Sender::new(false));
        let state = Arc::clone(&cut);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut watch = state.subscribe();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let partitioned = *watch.borrow();
                    if partitioned {
                        // Partitioned: accept and say nothing until it heals, then hang up.
                        let _ = watch.wait_for(|cut| !*cut).await;
                        return;
                    }
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else { return };
                    let partitioned = tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
                        cut = watch.wait_for(|cut| *cut) => cut.is_ok(),
                    };
                    if partitioned {
                        // Stalled: nothing passes until the partition heals, then hang up.
                        let _ = watch.wait_for(|cut| !*cut).await;
                    }
                });
            }
        });
        Partition { port, cut }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

async fn health_of(channel: Channel) -> i32 {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let mut health = HealthClient::new(channel);
    let request = HealthCheckRequest { service: "idempotency.v1.Coordinator".into() };
    health.check(request).await.map(|reply| reply.into_inner().status).unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_fails_calls_fast_turns_health_off_and_recovers_by_itself() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let Some((url, _)) = postgres_schema().await else { return };
    let _serial = POSTGRES.lock().await;
    let upstream = {
        let config: tokio_postgres::Config = url.parse().unwrap();
        let host = match &config.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(host) => host.clone(),
            other => panic!("a TCP database is needed, not {other:?}"),
        };
        format!("{host}:{}", config.get_ports().first().copied().unwrap_or(5432))
    };
    let partition = Partition::start(upstream.clone()).await;
    let proxied = url.replacen(&upstream, &format!("127.0.0.1:{}", partition.port), 1);
    assert_ne!(proxied, url, "the URL names its host and port");
    let server = TestServer::start_on_with(Backend::Postgres(proxied), |config| {
        config.postgres_timeout = Duration::from_secs(1);
    })
    .await;
    let mut client = server.client().await;
    claim_acquired(&mut client, "before").await;
    assert_eq!(health_of(server.channel().await).await, ServingStatus::Serving as i32);

    partition.set_cut(true);
    let mut request = tonic::Request::new(claim_request("during", b"fp"));
    request.set_timeout(Duration::from_secs(10));
    let status = client.claim(request).await.expect_err("no database, no claim");
    // Refused by the store's own timeout (1 s), well within the caller's 10 s deadline.
    assert_status(&status, tonic::Code::Unavailable, "STORE_UNAVAILABLE");
    let deadline = Instant::now() + Duration::from_secs(15);
    while health_of(server.channel().await).await != ServingStatus::NotServing as i32 {
        assert!(Instant::now() < deadline, "health never turned NOT_SERVING");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    partition.set_cut(false);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client.claim(claim_request("after", b"fp")).await {
            Ok(reply) => {
                acquired(reply.into_inner());
                break;
            }
            Err(status) => {
                assert_status(&status, tonic::Code::Unavailable, "STORE_UNAVAILABLE");
                assert!(Instant::now() < deadline, "service did not resume");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while health_of(server.channel().await).await != ServingStatus::Serving as i32 {
        assert!(Instant::now() < deadline, "health never turned SERVING again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A tmpfs mounted for one test, unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// Mounts a tmpfs of `megabytes`, or says why it cannot (not root, no permission).
    fn mount(megabytes: u32) -> Result<SmallDisk, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let output = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).trim().to_owned());
        }
        Ok(SmallDisk { dir })
    }

    fn resize(&self, megabytes: u32) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={megabytes}m")])
            .arg(self.dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "remounting the tmpfs");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.dir.path()).status();
    }
}

async fn wait_for_health(addr: &str, wanted: tonic_health::pb::health_check_response::ServingStatus) {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
    let deadline = Instant::now() + Duration::from_secs(30);
    while health_of(channel.clone()).await != wanted as i32 {
        assert!(Instant::now() < deadline, "health never turned {wanted:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_changes_keeps_what_was_acknowledged_and_recovers_when_space_returns() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let disk = match SmallDisk::mount(16) {
        Ok(disk) => disk,
        Err(why) => {
            assert!(std::env::var_os("CI").is_none(), "CI runs as root and can mount a tmpfs: {why}");
            eprintln!("skipped: a full disk is simulated with a small tmpfs, which needs root ({why})");
            return;
        }
    };
    let server = ChildServer::start(&disk.dir.path().join("data"));
    let mut client = server.client().await;

    // Fill the disk with 8 KiB responses until changes are refused.
    let body = |key: &str| format!("{key}:").into_bytes().into_iter().cycle().take(8 * 1024).collect::<Vec<u8>>();
    let mut acknowledged = Vec::new();
    let refused = loop {
        let key = format!("fill-{}", acknowledged.len());
        let grant = match client.claim(claim_request(&key, b"fp")).await {
            Ok(reply) => acquired(reply.into_inner()),
            Err(status) => break status,
        };
        match client.complete(complete_request(&key, &grant.lease_token, &body(&key))).await {
            Ok(_) => acknowledged.push(key),
            Err(status) => break status,
        }
        assert!(acknowledged.len() < 100_000, "a 16 MiB disk never filled up");
    };
    assert_status(&refused, tonic::Code::Unavailable, "STORE_UNAVAILABLE");
    wait_for_health(&server.addr, ServingStatus::NotServing).await;
    assert!(acknowledged.len() > 100, "only {} flows fit", acknowledged.len());
    // While full: acknowledged responses are still served, changes are refused.
    let replay = completed(client.claim(claim_request(&acknowledged[0], b"fp")).await.unwrap().into_inner());
    assert_eq!(replay.response.unwrap().body, body(&acknowledged[0]));
    let status = client.claim(claim_request("while-full", b"fp")).await.unwrap_err();
    assert_status(&status, tonic::Code::Unavailable, "STORE_UNAVAILABLE");

    // Space returns: the server resumes by itself and has lost nothing it acknowledged.
    disk.resize(64);
    wait_for_health(&server.addr, ServingStatus::Serving).await;
    for key in &acknowledged {
        let replay = completed(client.claim(claim_request(key, b"fp")).await.unwrap().into_inner());
        assert_eq!(replay.response.unwrap().body, body(key), "{key}");
    }
    let fresh = claim_acquired(&mut client, "after-space-returned").await;
    client.complete(complete_request("after-space-returned", &fresh.lease_token, b"ok")).await.unwrap();
    eprintln!("full disk: {} flows acknowledged before it filled, all replayed after", acknowledged.len());
    drop(server);
}

/// Builds (if needed) and locates an example program of this crate.
fn example_program(name: &str) -> std::path::PathBuf {
    let test_binary = std::env::current_exe().unwrap();
    let profile_dir = test_binary.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let mut build = std::process::Command::new(env!("CARGO"));
    build
        .args(["build", "--quiet", "-p", "idempotency-client", "--example", name])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir.ends_with("release") {
        build.arg("--release");
    }
    assert!(build.status().unwrap().success(), "building the {name} example");
    profile_dir.join("examples").join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_client_process_is_fenced_off_when_it_resumes_after_a_takeover() {
    use std::io::BufRead;
    let worker_program = example_program("worker");
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start(&dir.path().join("data"));
    let mut worker = std::process::Command::new(worker_program)
        .args(["--target", &format!("http://{}", server.addr), "--key", "paused-client", "--namespace", "payments"])
        .args(["--body", "fp", "--lease", "1s", "--work", "2s"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // If an assertion fails, the frozen worker must not outlive the test.
    struct Reaper(u32);
    impl Drop for Reaper {
        fn drop(&mut self) {
            let _ = std::process::Command::new("kill").args(["-KILL", &self.0.to_string()]).status();
        }
    }
    let _reaper = Reaper(worker.id());
    let mut lines = std::io::BufReader::new(worker.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let stale_fencing: u64 = first.strip_prefix("acquired fencing_token=").expect(&first).parse().unwrap();
    // The worker is in the middle of its mutation: freeze it past its lease.
    let signal = |name: &str| {
        let status = std::process::Command::new("kill").args([name, &worker.id().to_string()]).status().unwrap();
        assert!(status.success());
    };
    signal("-STOP");
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let mut client = server.client().await;
    let takeover = acquired(client.claim(claim_request("paused-client", b"fp")).await.unwrap().into_inner());
    assert!(takeover.takeover && takeover.fencing_token > stale_fencing);
    client.complete(complete_request("paused-client", &takeover.lease_token, b"by the new holder")).await.unwrap();

    signal("-CONT");
    let last = lines.next().unwrap().unwrap();
    assert_eq!(last, "refused LEASE_LOST");
    assert_eq!(worker.wait().unwrap().code(), Some(3));
    let replay = completed(client.claim(claim_request("paused-client", b"fp")).await.unwrap().into_inner());
    assert_eq!(replay.response.unwrap().body, b"by the new holder".as_slice());
    assert_eq!(replay.fencing_token, takeover.fencing_token);
}
