//! The state machine against its SQL copy: random (record, command, time) cases, including
//! expired records, mismatched fingerprints, foreign and stale tokens and durations at the edges
//! of the limits, run through `domain::machine` and through the PostgreSQL functions on a scratch
//! schema. Both must give the same outcome and leave the same stored record, for every case.
//!
//! `IDEMPOTENCY_DIFFERENTIAL_CASES` sets how many cases (default 2,000) and
//! `IDEMPOTENCY_DIFFERENTIAL_SEED` the seed (default: a fresh one, printed), so that a failure
//! can be replayed.

use std::sync::atomic::AtomicI64;
use std::time::Duration;

use idempotency_core::clock::SystemClock;
use idempotency_core::domain::machine::{self, Rejection, Transition};
use idempotency_core::domain::{
    ApiResponse, Claim, Complete, FencingToken, Fingerprint, Key, Lease, LeaseToken, Namespace, Owner, Record,
    RecordState, Release, Renew, RequestId, Timestamp,
};
use idempotency_core::store::{Store, StoreError};
use idempotency_store_postgres::{PostgresOptions, PostgresStore, TimeSource};

use super::*;

/// 2026-01-01T00:00:00Z: the cases' times are around it.
const BASE: i64 = 1_767_225_600_000;
const SECOND: i64 = 1_000;

/// One command of a case.
#[derive(Debug, Clone)]
enum Command {
    Claim(Claim),
    Complete(Complete),
    Renew(Renew),
    Release(Release),
}

#[derive(Debug, Clone)]
struct Case {
    key: Key,
    record: Option<Record>,
    command: Command,
    now: Timestamp,
}

/// What either side said: the outcome, with fencing tokens drawn from the database's sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Said {
    Claim(idempotency_core::domain::ClaimOutcome),
    Complete(idempotency_core::domain::CompleteOutcome),
    Renew(idempotency_core::domain::RenewOutcome),
    Release,
    Refused(Rejection),
}

fn pick<T: Clone>(rng: &mut Rng, options: &[T]) -> T {
    options[rng.below(options.len() as u64) as usize].clone()
}

fn fingerprint(rng: &mut Rng) -> Fingerprint {
    Fingerprint::parse(pick(rng, &[&b""[..], b"A", b"B", &[7u8; 64]])).unwrap()
}

fn request_id(rng: &mut Rng) -> Option<RequestId> {
    RequestId::parse_optional(pick(rng, &["", "req-1", "req-2"])).unwrap()
}

/// Durations at and around the server's limits (lease 100 ms..1 h, retention 1 s..30 days).
fn lease_ttl(rng: &mut Rng) -> Duration {
    Duration::from_millis(pick(rng, &[100, 101, 999, 1_000, 30_000, 3_599_999, 3_600_000]))
}

fn retention(rng: &mut Rng) -> Duration {
    Duration::from_millis(pick(rng, &[1_000, 1_001, 60_000, 86_400_000, 2_592_000_000]))
}

/// A token for the command: the holder's, the one that released or completed, a stranger's.
fn token_for(rng: &mut Rng, record: &Option<Record>) -> LeaseToken {
    let own = record.as_ref().map(|record| match &record.state {
        RecordState::Held(lease) => lease.token,
        RecordState::Released { by } | RecordState::Completed { by, .. } => *by,
    });
    match (rng.below(3), own) {
        (0 | 1, Some(own)) => own,
        _ => LeaseToken::generate(),
    }
}

fn random_record(rng: &mut Rng, now: i64) -> Option<Record> {
    if rng.below(6) == 0 {
        return None;
    }
    // Changed up to 40 days ago or a little in the future (a clock behind the database's).
    let updated =
        now - rng.below(40 * 86_400) as i64 * SECOND / pick(rng, &[1, 1_000, 86_400]) + pick(rng, &[0, 0, 500]);
    let retention_millis = retention(rng).as_millis() as u64;
    let state = match rng.below(3) {
        0 => RecordState::Held(Lease {
            token: LeaseToken::generate(),
            // Lapsed long ago, just now, or still running.
            expires_at: Timestamp::from_unix_millis(updated + lease_ttl(rng).as_millis() as i64),
            request_id: request_id(rng),
            takeover: rng.below(2) == 0,
        }),
        1 => RecordState::Released { by: LeaseToken::generate() },
        _ => RecordState::Completed {
            by: LeaseToken::generate(),
            response: ApiResponse {
                body: vec![rng.below(256) as u8; rng.below(40) as usize].into(),
                metadata: [("status".to_owned(), "201".to_owned())].into(),
            },
            completed_at: Timestamp::from_unix_millis(updated),
        },
    };
    Some(Record {
        fingerprint: fingerprint(rng),
        fencing_token: FencingToken(1 + rng.below(1_000)),
        attempt: pick(rng, &[1, 2, 7, u32::MAX]),
        owner: Owner::parse(pick(rng, &["", "api-1"])).unwrap(),
        retention_millis,
        updated_at: Timestamp::from_unix_millis(updated),
        state,
    })
}

fn random_case(rng: &mut Rng, index: usize) -> Case {
    let now = BASE + rng.below(10 * 86_400) as i64 * SECOND + rng.below(1_000) as i64;
    let record = random_record(rng, now);
    // Times at the edges of the record's own: its lease's end and its expiry, to the millisecond.
    let now = match (&record, rng.below(4)) {
        (Some(record), 0) => record.expires_at().unix_millis() + pick(rng, &[-1, 0, 1]),
        (Some(Record { state: RecordState::Held(lease), .. }), 1) => {
            lease.expires_at.unix_millis() + pick(rng, &[-1, 0, 1])
        }
        _ => now,
    };
    let command = match rng.below(8) {
        0..=3 => Command::Claim(Claim {
            fingerprint: fingerprint(rng),
            lease_ttl: lease_ttl(rng),
            retention: retention(rng),
            request_id: request_id(rng),
            owner: Owner::parse(pick(rng, &["", "api-2"])).unwrap(),
            new_lease_token: LeaseToken::generate(),
        }),
        4 | 5 => Command::Complete(Complete {
            lease_token: token_for(rng, &record),
            response: ApiResponse { body: vec![9; rng.below(20) as usize].into(), metadata: Default::default() },
            retention: if rng.below(2) == 0 { None } else { Some(retention(rng)) },
        }),
        6 => Command::Renew(Renew { lease_token: token_for(rng, &record), lease_ttl: lease_ttl(rng) }),
        _ => Command::Release(Release { lease_token: token_for(rng, &record) }),
    };
    Case { key: Key::parse(&format!("case-{index}")).unwrap(), record, command, now: Timestamp::from_unix_millis(now) }
}

fn said<T>(result: Result<T, StoreError>, into: impl FnOnce(T) -> Said) -> Said {
    match result {
        Ok(outcome) => into(outcome),
        Err(StoreError::Rejected(rejection)) => Said::Refused(rejection),
        Err(other) => panic!("the store failed: {other}"),
    }
}

/// Applies the case through the SQL function; returns what it said.
async fn through_sql(store: &PostgresStore, namespace: &Namespace, case: &Case) -> Said {
    let (key, now) = (&case.key, case.now);
    match &case.command {
        Command::Claim(claim) => said(store.claim(namespace, key, now, claim, false).await, Said::Claim),
        Command::Complete(complete) => {
            said(store.complete(namespace, key, now, complete.clone()).await, Said::Complete)
        }
        Command::Renew(renew) => said(store.renew(namespace, key, now, renew).await, Said::Renew),
        Command::Release(release) => said(store.release(namespace, key, now, release).await, |()| Said::Release),
    }
}

/// Applies the case through the state machine, drawing the fencing token the database drew (if
/// it granted), and returns what it said and the record it would store.
fn through_machine(case: &Case, sql_said: &Said) -> (Said, Option<Record>) {
    fn decided<T>(
        current: &Option<Record>,
        result: Result<Transition<T>, Rejection>,
        into: impl FnOnce(T) -> Said,
    ) -> (Said, Option<Record>) {
        match result {
            Ok(transition) => (into(transition.outcome), transition.write.or_else(|| current.clone())),
            Err(rejection) => (Said::Refused(rejection), current.clone()),
        }
    }
    let current = &case.record;
    let now = case.now;
    match &case.command {
        Command::Claim(claim) => {
            let drawn = match sql_said {
                Said::Claim(idempotency_core::domain::ClaimOutcome::Acquired(grant)) => grant.fencing_token,
                _ => FencingToken(u64::MAX),
            };
            let result = machine::claim(now, current.as_ref(), claim, |floor| {
                assert!(drawn > floor, "the database drew {drawn:?}, not above {floor:?}");
                drawn
            });
            decided(current, result, Said::Claim)
        }
        Command::Complete(complete) => {
            decided(current, machine::complete(now, current.as_ref(), complete.clone()), Said::Complete)
        }
        Command::Renew(renew) => decided(current, machine::renew(now, current.as_ref(), renew), Said::Renew),
        Command::Release(release) => {
            decided(current, machine::release(now, current.as_ref(), release), |()| Said::Release)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sql_functions_decide_and_store_exactly_as_the_state_machine() {
    let Some((url, schema)) = postgres_schema().await else { return };
    let cases: usize =
        std::env::var("IDEMPOTENCY_DIFFERENTIAL_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000);
    let seed: u64 =
        std::env::var("IDEMPOTENCY_DIFFERENTIAL_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
        });
    eprintln!("differential: {cases} cases, IDEMPOTENCY_DIFFERENTIAL_SEED={seed}");
    let options = PostgresOptions {
        url,
        schema,
        pool_size: 4,
        timeout: Duration::from_secs(30),
        max_records: u64::MAX,
        time: TimeSource::Caller,
        password: None,
    };
    let store = PostgresStore::open(&options, Arc::new(SystemClock), Arc::new(AtomicI64::new(0))).await.unwrap();
    let namespace = Namespace::parse("differential").unwrap();
    let mut rng = Rng(seed);
    let mut checked = 0;
    let mut by_outcome = std::collections::BTreeMap::<String, usize>::new();
    for batch_start in (0..cases).step_by(500) {
        let batch: Vec<Case> =
            (batch_start..(batch_start + 500).min(cases)).map(|i| random_case(&mut rng, i)).collect();
        let records = batch
            .iter()
            .filter_map(|case| case.record.clone().map(|record| Ok((namespace.clone(), case.key.clone(), record))));
        idempotency_store_postgres::import(&options, records, 0).await.unwrap();
        // All at once (each case has a key of its own): the Claims and Completes that arrive
        // while one statement runs go in batches (`claim_many`, `complete_many`).
        let all_said = futures::future::join_all(batch.iter().map(|case| through_sql(&store, &namespace, case))).await;
        for (case, sql_said) in batch.iter().zip(all_said) {
            let (machine_said, machine_record) = through_machine(case, &sql_said);
            let sql_stored = store.stored_record(&namespace, &case.key).await.unwrap();
            assert_eq!(sql_said, machine_said, "outcome of {case:#?} (seed {seed})");
            let sql_expiry = sql_stored.as_ref().map(|(_, expires_at)| *expires_at);
            let sql_record = sql_stored.map(|(record, _)| record);
            assert_eq!(sql_record, machine_record, "stored record after {case:#?} (seed {seed})");
            assert_eq!(
                sql_expiry,
                machine_record.as_ref().map(Record::expires_at),
                "the row's expiry after {case:#?} (seed {seed})"
            );
            let name = format!("{:?}", sql_said).split(['(', ' ', '{']).next().unwrap_or("").to_owned();
            let detail = match &sql_said {
                Said::Claim(outcome) => {
                    format!("{name}:{}", format!("{outcome:?}").split(['(', ' ', '{']).next().unwrap_or(""))
                }
                Said::Refused(rejection) => format!("{name}:{rejection:?}"),
                _ => name,
            };
            *by_outcome.entry(detail).or_default() += 1;
            checked += 1;
        }
    }
    eprintln!("differential: {checked} cases agreed: {by_outcome:?}");
    assert_eq!(checked, cases);
    let batches = store.stats().statement_batch_size.expect("the PostgreSQL store counts its batches");
    eprintln!("differential: {} Claim and Complete statements carried {} calls", batches.count, batches.sum);
    assert!(batches.sum as u64 > batches.count, "no statement carried more than one call: batches went untested");
    store.close().await.unwrap();
}

/// During a rolling upgrade, replicas of the previous release call `claim` (since migration 5 a
/// wrapper of `claim_core`, which this release calls) on the migrated schema: for random Claim
/// cases, each with its record stored under two keys, the old statement and the store decide
/// alike and store the same record (but for the fencing token each drew).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_previous_releases_claim_decides_as_the_store_does() {
    let Some((url, schema)) = postgres_schema().await else { return };
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let options = PostgresOptions {
        url: url.clone(),
        schema: schema.clone(),
        pool_size: 2,
        timeout: Duration::from_secs(30),
        max_records: u64::MAX,
        time: TimeSource::Caller,
        password: None,
    };
    let store = PostgresStore::open(&options, Arc::new(SystemClock), Arc::new(AtomicI64::new(0))).await.unwrap();
    let (old_release, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    old_release.batch_execute(&format!("SET search_path TO {schema}")).await.unwrap();
    let namespace = Namespace::parse("previous").unwrap();
    let mut rng = Rng(seed);
    let mut cases = Vec::new();
    while cases.len() < 300 {
        let case = random_case(&mut rng, cases.len());
        if matches!(case.command, Command::Claim(_)) {
            cases.push(case);
        }
    }
    let twin = |case: &Case| Key::parse(&format!("{}-old", case.key.as_str())).unwrap();
    let records = cases.iter().flat_map(|case| {
        case.record.clone().into_iter().flat_map(|record| {
            [(namespace.clone(), case.key.clone(), record.clone()), (namespace.clone(), twin(case), record)].map(Ok)
        })
    });
    idempotency_store_postgres::import(&options, records, 0).await.unwrap();
    let without_fencing = |stored: Option<(Record, Timestamp)>| {
        stored.map(|(record, expires_at)| (Record { fencing_token: FencingToken(0), ..record }, expires_at))
    };
    for case in &cases {
        let Command::Claim(claim) = &case.command else { unreachable!() };
        let code: i16 = match store.claim(&namespace, &case.key, case.now, claim, false).await {
            Ok(idempotency_core::domain::ClaimOutcome::Acquired(_)) => 1,
            Ok(idempotency_core::domain::ClaimOutcome::InProgress { .. }) => 2,
            Ok(idempotency_core::domain::ClaimOutcome::Completed(_)) => 3,
            Err(StoreError::Rejected(Rejection::FingerprintMismatch)) => 10,
            Err(other) => panic!("the store failed: {other}"),
        };
        let old = old_release
            .query_one(
                "SELECT code FROM claim($1, $2, $3, $4, $5, $6, $7, $8, $9, NULL, NULL, false)",
                &[
                    &namespace.as_str(),
                    &twin(case).as_str(),
                    &case.now.unix_millis(),
                    &claim.fingerprint.as_bytes(),
                    &(claim.lease_ttl.as_millis() as i64),
                    &(claim.retention.as_millis() as i64),
                    &claim.request_id.as_ref().map(RequestId::as_str),
                    &claim.owner.as_str(),
                    &claim.new_lease_token.as_uuid(),
                ],
            )
            .await
            .unwrap();
        assert_eq!(old.get::<_, i16>("code"), code, "outcome of {case:#?} (seed {seed})");
        assert_eq!(
            without_fencing(store.stored_record(&namespace, &twin(case)).await.unwrap()),
            without_fencing(store.stored_record(&namespace, &case.key).await.unwrap()),
            "stored record after {case:#?} (seed {seed})"
        );
    }
    store.close().await.unwrap();
}
