//! Safety under faults, checked on recorded histories (see `common/history.rs` for P1–P5):
//! the checker's own tests on known-bad histories, racing claims, kill -9 of the real server
//! binary in the middle of a randomized multi-client workload, and a paused server.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::history::{self, Call, Event, History, Outcome};
use common::*;
use idempotency_coordinator::pb;
use idempotency_coordinator::pb::coordinator_client::CoordinatorClient;
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
                    Outcome::Completed { body: c.response.unwrap_or_default().body }
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
                    Outcome::Completed { body: view.response.unwrap_or_default().body }
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

/// splitmix64, so that a failing seed can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One client of the randomized workload: claims keys from a small space with short leases,
/// then completes, releases, renews, abandons or looks up, and sometimes reuses an old token.
/// The key space moves on every 300 ms (all clients share the same `keys` keys at a time), so
/// that fresh keys keep being contended instead of everything ending up completed.
async fn workload_client(mut recorder: Recorder, seed: u64, keys: u64, start: Instant, until: Instant) {
    let mut rng = Rng(seed);
    let mut old_tokens: Vec<(String, String)> = Vec::new();
    while Instant::now() < until {
        let epoch = start.elapsed().as_millis() as u64 / 300;
        let key = format!("key-{epoch}-{}", rng.below(keys));
        if rng.below(10) == 0 {
            recorder.lookup(&key).await;
            continue;
        }
        if rng.below(10) == 0
            && let Some((key, token)) = old_tokens.get(rng.below(old_tokens.len().max(1) as u64) as usize).cloned()
        {
            recorder.complete(&key, &token, b"stale").await;
            continue;
        }
        let request_id = (rng.below(4) == 0).then(|| format!("req-{seed}-{}", rng.below(1000)));
        let lease_ms = 300 + rng.below(700) as i64;
        let Outcome::Acquired { token, .. } = recorder.claim(&key, lease_ms, request_id).await else { continue };
        old_tokens.push((key.clone(), token.clone()));
        match rng.below(20) {
            0..=12 => recorder.complete(&key, &token, format!("{key} by {token}").as_bytes()).await,
            13..=15 => recorder.release(&key, &token).await,
            16..=17 => {
                recorder.renew(&key, &token, lease_ms).await;
                recorder.complete(&key, &token, format!("{key} by {token}").as_bytes()).await;
            }
            _ => {} // abandoned: the lease lapses and someone takes over
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn lazy_client(addr: &str) -> CoordinatorClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(2))
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
        clients.push(tokio::spawn(workload_client(recorder, seed + 1, 12, start, until)));
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
