//! The coordinator's contract, through real gRPC channels with a manual clock: claims,
//! completion and replay, leases and takeover, waiting, retries, expiry, limits and input
//! validation. This is the conformance suite: every test runs once per store (`sled::…` and
//! `postgres::…`), so the embedded store and the SQL reimplementation of the state machine
//! cannot drift apart. The PostgreSQL half needs IDEMPOTENCY_TEST_POSTGRES (CI sets it). The
//! Admin service's calls are in `contract/admin.rs`.

use std::time::Duration;

use idempotency_core::clock::Clock;
use idempotency_core::domain::LeaseToken;
use idempotency_core::store::Store;
use idempotency_proto::pb;
use idempotency_proto::pb::claim_response::Outcome;
use idempotency_testkit::*;
use tonic::Code;

#[path = "contract/admin.rs"]
mod admin;
use admin::*;

async fn concurrent_claims_of_one_key_yield_exactly_one_acquired(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let mut channels = Vec::new();
    for _ in 0..8 {
        channels.push(server.channel().await);
    }
    let claims: Vec<_> = (0..64)
        .map(|i| {
            let mut client = pb::coordinator_client::CoordinatorClient::new(channels[i % 8].clone());
            tokio::spawn(
                async move { outcome(client.claim(claim_request("order-1", b"fp")).await.unwrap().into_inner()) },
            )
        })
        .collect();
    let mut acquired = 0;
    let mut in_progress = 0;
    for claim in claims {
        match claim.await.unwrap() {
            Outcome::Acquired(_) => acquired += 1,
            Outcome::InProgress(_) => in_progress += 1,
            Outcome::Completed(_) => panic!("nobody completed"),
        }
    }
    assert_eq!((acquired, in_progress), (1, 63));
}

async fn a_completed_key_replays_the_stored_response_byte_for_byte(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let mut client = server.client().await;
    let grant = claim_acquired(&mut client, "pay-1").await;
    assert_eq!((grant.attempt, grant.takeover), (1, false));
    LeaseToken::parse(&grant.lease_token).expect("the lease token is a UUID");
    let body: Vec<u8> = (0..=255u8).chain(b"{\"payment_id\":\"pay_abc123\"}".iter().copied()).collect();
    let mut stored = response(&body);
    stored.metadata.insert("content-type".into(), "application/json".into());
    let mut request = complete_request("pay-1", &grant.lease_token, &body);
    request.response = Some(stored.clone());
    let done = client.complete(request).await.unwrap().into_inner();
    assert_eq!(done.fencing_token, grant.fencing_token);
    assert!(!done.already_completed);
    for _ in 0..3 {
        let replay = completed(client.claim(claim_request("pay-1", b"fp")).await.unwrap().into_inner());
        assert_eq!(replay.response.as_ref(), Some(&stored));
        assert_eq!(replay.fencing_token, grant.fencing_token);
        assert_eq!(replay.completed_at, done.completed_at);
        assert_eq!(replay.expires_at, done.expires_at);
    }
    // A retry without fingerprint replays too.
    let replay = completed(client.claim(claim_request("pay-1", b"")).await.unwrap().into_inner());
    assert_eq!(replay.response, Some(stored));
}

async fn a_lapsed_lease_is_taken_over_and_the_stale_holder_is_fenced_off(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let mut client = server.client().await;
    let first = claim_acquired(&mut client, "pay-2").await;
    server.advance(Duration::from_millis(9_999));
    in_progress(client.claim(claim_request("pay-2", b"fp")).await.unwrap().into_inner());
    server.advance(Duration::from_millis(1));
    let second = claim_acquired(&mut client, "pay-2").await;
    assert!(second.takeover);
    assert_eq!(second.attempt, 2);
    assert!(second.fencing_token > first.fencing_token);
    assert_ne!(second.lease_token, first.lease_token);

    let before = server.digest().await;
    let status = client.complete(complete_request("pay-2", &first.lease_token, b"late")).await.unwrap_err();
    assert_status(&status, Code::Aborted, "LEASE_LOST");
    let status = client.renew(renew_request("pay-2", &first.lease_token, secs(10))).await.unwrap_err();
    assert_status(&status, Code::Aborted, "LEASE_LOST");
    let status = client.release(release_request("pay-2", &first.lease_token)).await.unwrap_err();
    assert_status(&status, Code::Aborted, "LEASE_LOST");
    assert_eq!(server.digest().await, before, "stale calls changed the store");

    client.complete(complete_request("pay-2", &second.lease_token, b"ok")).await.unwrap();
    let status = client.complete(complete_request("pay-2", &first.lease_token, b"late")).await.unwrap_err();
    assert_status(&status, Code::Aborted, "LEASE_LOST");
    let replay = completed(client.claim(claim_request("pay-2", b"fp")).await.unwrap().into_inner());
    assert_eq!(replay.response.unwrap().body, b"ok".as_slice());
    assert_eq!(replay.fencing_token, second.fencing_token);
}

async fn a_reused_key_with_another_fingerprint_is_refused_in_every_state(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let mut client = server.client().await;
    let checker = client.clone();
    let check_mismatch = |state: &'static str| {
        let server = &server;
        let mut client = checker.clone();
        async move {
            let before = server.digest().await;
            let status = client.claim(claim_request("pay-3", b"other")).await.unwrap_err();
            assert_status(&status, Code::FailedPrecondition, "FINGERPRINT_MISMATCH");
            assert_eq!(server.digest().await, before, "a mismatch changed the store while {state}");
        }
    };
    let grant = claim_acquired(&mut client, "pay-3").await;
    check_mismatch("held").await;
    server.advance(Duration::from_secs(11));
    check_mismatch("lapsed").await;
    client.release(release_request("pay-3", &grant.lease_token)).await.unwrap();
    check_mismatch("released").await;
    let grant = claim_acquired(&mut client, "pay-3").await;
    client.complete(complete_request("pay-3", &grant.lease_token, b"done")).await.unwrap();
    check_mismatch("completed").await;
}

/// Polls until `count` Claims wait on keys: the waiter registered before we act.
async fn until_waiting(server: &TestServer, count: usize) {
    for _ in 0..10_000 {
        if server.coordinator().waiting_keys() >= count {
            return;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("no claim started waiting");
}

/// Awaits a spawned call, failing the test instead of hanging if a wake-up is lost.
async fn bounded<T>(task: tokio::task::JoinHandle<T>) -> Result<T, tokio::task::JoinError> {
    tokio::time::timeout(Duration::from_secs(30), task).await.expect("the waiting claim was never woken")
}

fn waiting_claim(key: &str, wait: prost_types::Duration) -> pb::ClaimRequest {
    pb::ClaimRequest { wait: Some(wait), ..claim_request(key, b"fp") }
}

async fn a_waiting_claim_is_woken_by_complete(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let mut client = server.client().await;
    let grant = claim_acquired(&mut client, "pay-4").await;
    let mut waiter_client = client.clone();
    let waiter = tokio::spawn(async move { waiter_client.claim(waiting_claim("pay-4", secs(30))).await });
    until_waiting(&server, 1).await;
    client.complete(complete_request("pay-4", &grant.lease_token, b"result")).await.unwrap();
    let replay = completed(bounded(waiter).await.unwrap().unwrap().into_inner());
    assert_eq!(replay.response.unwrap().body, b"result".as_slice());
    assert_eq!(server.coordinator().waiting_keys(), 0);
}

async fn a_retried_complete_wakes_waiters_the_first_one_missed(backend: Backend) {
    use idempotency_core::domain::{ApiResponse, Complete, Key, LeaseToken, Namespace};
    let server = TestServer::start_on(backend).await;
    let mut client = server.client().await;
    let grant = claim_acquired(&mut client, "pay-4b").await;
    let mut waiter_client = client.clone();
    let waiter = tokio::spawn(async move { waiter_client.claim(waiting_claim("pay-4b", secs(30))).await });
    until_waiting(&server, 1).await;
    // The first Complete lands in the store, but its caller is gone before anyone is woken.
    let command = Complete {
        lease_token: LeaseToken::parse(&grant.lease_token).unwrap(),
        response: ApiResponse { body: b"stored".to_vec().into(), metadata: Default::default() },
        retention: None,
    };
    let (namespace, key) = (Namespace::parse("payments").unwrap(), Key::parse("pay-4b").unwrap());
    server.coordinator().store().complete(&namespace, &key, server.clock.now(), command).await.unwrap();
    let retried = client.complete(complete_request("pay-4b", &grant.lease_token, b"stored")).await.unwrap();
    assert!(retried.into_inner().already_completed);
    let replay = completed(bounded(waiter).await.unwrap().unwrap().into_inner());
    assert_eq!(replay.response.unwrap().body, b"stored".as_slice());
}

async fn a_waiting_claim_is_woken_by_release_and_acquires(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let mut client = server.client().await;
    let grant = claim_acquired(&mut client, "pay-5").await;
    let mut waiter_client = client.clone();
    let waiter = tokio::spawn(async move { waiter_client.claim(waiting_claim("pay-5", secs(30))).await });
    until_waiting(&server, 1).await;
    client.release(release_request("pay-5", &grant.lease_token)).await.unwrap();
    let next = acquired(bounded(waiter).await.unwrap().unwrap().into_inner());
    assert_eq!((next.attempt, next.takeover), (2, false));
    assert!(next.fencing_token > grant.fencing_token);
}

async fn a_waiting_claim_takes_over_when_the_lease_lapses(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let mut client = server.client().await;
    let grant = claim_acquired(&mut client, "pay-6").await;
    let mut waiter_client = client.clone();
    let waiter = tokio::spawn(async move { waiter_client.claim(waiting_claim("pay-6", secs(60))).await });
    until_waiting(&server, 1).await;
    server.advance(Duration::from_secs(10));
    let next = acquired(bounded(waiter).await.unwrap().unwrap().into_inner());
    assert!(next.takeover);
    assert!(next.fencing_token > grant.fencing_token);
}

async fn a_waiting_claim_answers_in_progress_when_its_wait_ends(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let mut client = server.client().await;
    claim_acquired(&mut client, "pay-7").await;
    let mut waiter_client = client.clone();
    let waiter = tokio::spawn(async move { waiter_client.claim(waiting_claim("pay-7", secs(5))).await });
    until_waiting(&server, 1).await;
    server.advance(Duration::from_secs(5));
    let busy = in_progress(bounded(waiter).await.unwrap().unwrap().into_inner());
    assert_eq!(busy.attempt, 1);
}

async fn a_wait_ends_within_the_call_deadline(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let mut client = server.client().await;
    claim_acquired(&mut client, "pay-8").await;
    // The manual clock never moves here: only the call's own deadline can end the wait.
    let mut request = tonic::Request::new(waiting_claim("pay-8", secs(60)));
    request.set_timeout(Duration::from_millis(300));
    let busy = client.claim(request).await.expect("answered before the deadline");
    in_progress(busy.into_inner());
    assert_eq!(server.coordinator().waiting_keys(), 0);
}

async fn a_cancelled_wait_leaves_nothing_behind(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let mut client = server.client().await;
    claim_acquired(&mut client, "pay-9").await;
    let before = server.digest().await;
    let mut waiter_client = client.clone();
    let waiter = tokio::spawn(async move { waiter_client.claim(waiting_claim("pay-9", secs(60))).await });
    until_waiting(&server, 1).await;
    waiter.abort();
    for _ in 0..10_000 {
        if server.coordinator().waiting_keys() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(server.coordinator().waiting_keys(), 0);
    assert_eq!(server.digest().await, before);
}

async fn a_claim_retried_with_its_request_id_gets_the_same_lease(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let mut client = server.client().await;
    let request =
        pb::ClaimRequest { request_id: "req-77".into(), owner: "pod-a".into(), ..claim_request("pay-10", b"fp") };
    let first = acquired(client.claim(request.clone()).await.unwrap().into_inner());
    server.advance(Duration::from_secs(3));
    let retried = acquired(client.claim(request.clone()).await.unwrap().into_inner());
    assert_eq!(retried, first);
    let other =
        pb::ClaimRequest { request_id: "req-78".into(), owner: "pod-b".into(), ..claim_request("pay-10", b"fp") };
    let busy = in_progress(client.claim(other).await.unwrap().into_inner());
    assert_eq!(busy.owner, "pod-a");
    let no_id = claim_request("pay-10", b"fp");
    in_progress(client.claim(no_id).await.unwrap().into_inner());
    client.complete(complete_request("pay-10", &first.lease_token, b"r")).await.unwrap();
    completed(client.claim(request).await.unwrap().into_inner());
}

async fn a_retried_complete_returns_the_original_result_and_keeps_the_response(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let mut client = server.client().await;
    let grant = claim_acquired(&mut client, "pay-11").await;
    let first =
        client.complete(complete_request("pay-11", &grant.lease_token, b"original")).await.unwrap().into_inner();
    server.advance(Duration::from_secs(2));
    let before = server.digest().await;
    let again = client.complete(complete_request("pay-11", &grant.lease_token, b"changed")).await.unwrap().into_inner();
    assert!(again.already_completed);
    assert_eq!(
        (again.completed_at, again.expires_at, again.fencing_token),
        (first.completed_at, first.expires_at, first.fencing_token)
    );
    assert_eq!(server.digest().await, before);
    let view = client.lookup(lookup_request("pay-11")).await.unwrap().into_inner();
    assert_eq!(view.response.unwrap().body, b"original".as_slice());
}

async fn complete_and_renew_work_after_the_lease_lapsed_until_a_takeover(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let mut client = server.client().await;
    let grant = claim_acquired(&mut client, "pay-12").await;
    server.advance(Duration::from_secs(20));
    let renewed = client.renew(renew_request("pay-12", &grant.lease_token, secs(5))).await.unwrap().into_inner();
    assert_eq!(renewed.fencing_token, grant.fencing_token);
    server.advance(Duration::from_secs(20));
    client.complete(complete_request("pay-12", &grant.lease_token, b"late")).await.unwrap();
    assert_eq!(
        completed(client.claim(claim_request("pay-12", b"fp")).await.unwrap().into_inner()).response.unwrap().body,
        b"late".as_slice()
    );
}

async fn renew_extends_the_lease(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let mut client = server.client().await;
    let grant = claim_acquired(&mut client, "pay-13").await;
    server.advance(Duration::from_secs(8));
    let renewed = client.renew(renew_request("pay-13", &grant.lease_token, secs(30))).await.unwrap().into_inner();
    let expected_end = START.unix_millis() / 1000 + 8 + 30;
    assert_eq!(renewed.lease_expires_at.unwrap().seconds, expected_end);
    server.advance(Duration::from_secs(25));
    let busy = in_progress(client.claim(claim_request("pay-13", b"fp")).await.unwrap().into_inner());
    assert_eq!(busy.lease_expires_at.unwrap().seconds, expected_end);
    // Unset lease_ttl renews by the server default (30 s).
    let default = pb::RenewRequest { lease_ttl: None, ..renew_request("pay-13", &grant.lease_token, secs(1)) };
    let renewed = client.renew(default).await.unwrap().into_inner();
    assert_eq!(renewed.lease_expires_at.unwrap().seconds, START.unix_millis() / 1000 + 33 + 30);
    client.complete(complete_request("pay-13", &grant.lease_token, b"x")).await.unwrap();
    let status = client.renew(renew_request("pay-13", &grant.lease_token, secs(30))).await.unwrap_err();
    assert_status(&status, Code::FailedPrecondition, "ALREADY_COMPLETED");
    let status = client.renew(renew_request("pay-13", &LeaseToken::generate().to_text(), secs(30))).await.unwrap_err();
    assert_status(&status, Code::Aborted, "LEASE_LOST");
}

async fn release_makes_the_key_claimable_at_once(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let mut client = server.client().await;
    let grant = claim_acquired(&mut client, "pay-14").await;
    let status = client.release(release_request("pay-14", &LeaseToken::generate().to_text())).await.unwrap_err();
    assert_status(&status, Code::Aborted, "LEASE_LOST");
    client.release(release_request("pay-14", &grant.lease_token)).await.unwrap();
    client.release(release_request("pay-14", &grant.lease_token)).await.expect("releasing twice is fine");
    let view = client.lookup(lookup_request("pay-14")).await.unwrap().into_inner();
    assert_eq!(view.state(), pb::KeyState::Released);
    let status = client.complete(complete_request("pay-14", &grant.lease_token, b"x")).await.unwrap_err();
    assert_status(&status, Code::Aborted, "LEASE_LOST");
    let next = claim_acquired(&mut client, "pay-14").await;
    assert_eq!((next.attempt, next.takeover), (2, false));
    assert!(next.fencing_token > grant.fencing_token);
    client.complete(complete_request("pay-14", &next.lease_token, b"x")).await.unwrap();
    let status = client.release(release_request("pay-14", &next.lease_token)).await.unwrap_err();
    assert_status(&status, Code::FailedPrecondition, "ALREADY_COMPLETED");
    client.release(release_request("never-claimed", &next.lease_token)).await.expect("releasing an absent key is fine");
}

async fn lookup_reports_every_state(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let mut client = server.client().await;
    let status = client.lookup(lookup_request("pay-15")).await.unwrap_err();
    assert_status(&status, Code::NotFound, "KEY_NOT_FOUND");
    let request = pb::ClaimRequest { owner: "pod-a".into(), ..claim_request("pay-15", b"fp") };
    let grant = acquired(client.claim(request).await.unwrap().into_inner());
    let view = client.lookup(lookup_request("pay-15")).await.unwrap().into_inner();
    assert_eq!(view.state(), pb::KeyState::InProgress);
    assert_eq!((view.fingerprint.as_slice(), view.fencing_token, view.attempt), (&b"fp"[..], grant.fencing_token, 1));
    assert_eq!(view.owner, "pod-a");
    assert_eq!(view.lease_expires_at, grant.lease_expires_at);
    assert_eq!(view.response, None);
    server.advance(Duration::from_secs(10));
    let view = client.lookup(lookup_request("pay-15")).await.unwrap().into_inner();
    assert_eq!(view.state(), pb::KeyState::LeaseExpired);
    client.complete(complete_request("pay-15", &grant.lease_token, b"body")).await.unwrap();
    let view = client.lookup(lookup_request("pay-15")).await.unwrap().into_inner();
    assert_eq!(view.state(), pb::KeyState::Completed);
    assert_eq!(view.response, Some(response(b"body")));
    assert_eq!(view.completed_at.unwrap().seconds, START.unix_millis() / 1000 + 10);
    assert_eq!(view.expires_at.unwrap().seconds, START.unix_millis() / 1000 + 10 + 3600);
}

async fn expired_records_are_absent_at_once_and_swept_later(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let mut client = server.client().await;
    let grant = claim_acquired(&mut client, "pay-16").await;
    let mut request = complete_request("pay-16", &grant.lease_token, b"short-lived");
    request.retention = Some(secs(5));
    let done = client.complete(request).await.unwrap().into_inner();
    assert_eq!(done.expires_at.unwrap().seconds, START.unix_millis() / 1000 + 5);
    server.advance(Duration::from_millis(4_999));
    completed(client.claim(claim_request("pay-16", b"fp")).await.unwrap().into_inner());
    server.advance(Duration::from_millis(1));
    let status = client.lookup(lookup_request("pay-16")).await.unwrap_err();
    assert_status(&status, Code::NotFound, "KEY_NOT_FOUND");
    assert_eq!(server.record_count().await, 1, "not swept yet");
    let report = server.sweep().await;
    assert_eq!(report.deleted, 1);
    assert_eq!(server.record_count().await, 0);
    assert_eq!(server.sweep().await.scanned, 0, "nothing is left to scan");
    // The key is new again, bound to nothing, and its fencing token still goes up.
    let again = acquired(client.claim(claim_request("pay-16", b"another request")).await.unwrap().into_inner());
    assert_eq!((again.attempt, again.takeover), (1, false));
    assert!(again.fencing_token > grant.fencing_token);
}

async fn a_record_never_expires_while_its_lease_is_valid(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let mut client = server.client().await;
    let request =
        pb::ClaimRequest { lease_ttl: Some(secs(60)), retention: Some(secs(1)), ..claim_request("pay-17", b"fp") };
    let grant = acquired(client.claim(request).await.unwrap().into_inner());
    server.advance(Duration::from_secs(59));
    assert_eq!(server.sweep().await.deleted, 0);
    in_progress(client.claim(claim_request("pay-17", b"fp")).await.unwrap().into_inner());
    client.complete(complete_request("pay-17", &grant.lease_token, b"x")).await.unwrap();
    // Completed at t=59 with the Claim's retention of 1 s.
    server.advance(Duration::from_secs(1));
    assert_eq!(server.sweep().await.deleted, 1);
}

async fn sweeping_deletes_only_what_expired_in_batches(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let mut client = server.client().await;
    for i in 0..250 {
        let retention = if i % 2 == 0 { secs(10) } else { secs(1000) };
        let request = pb::ClaimRequest { retention: Some(retention), ..claim_request(&format!("batch-{i}"), b"") };
        let grant = acquired(client.claim(request).await.unwrap().into_inner());
        client.complete(complete_request(&format!("batch-{i}"), &grant.lease_token, b"x")).await.unwrap();
    }
    server.advance(Duration::from_secs(10));
    let report = server.coordinator().sweep(100).await.unwrap();
    assert_eq!((report.deleted, report.more), (100, true));
    let rest = server.sweep().await;
    assert_eq!(rest.deleted, 25);
    assert_eq!(server.record_count().await, 125);
    completed(client.claim(claim_request("batch-1", b"")).await.unwrap().into_inner());
}

async fn a_full_store_refuses_new_keys_and_serves_existing_ones(backend: Backend) {
    let server = TestServer::start_on_with(backend, |config| config.max_records = 2).await;
    let mut client = server.client().await;
    let a = claim_acquired(&mut client, "a").await;
    let b = claim_acquired(&mut client, "b").await;
    let before = server.digest().await;
    let status = client.claim(claim_request("c", b"fp")).await.unwrap_err();
    assert_status(&status, Code::ResourceExhausted, "STORE_FULL");
    assert_eq!(server.digest().await, before);
    let mut request = complete_request("a", &a.lease_token, b"x");
    request.retention = Some(secs(1));
    client.complete(request).await.unwrap();
    completed(client.claim(claim_request("a", b"fp")).await.unwrap().into_inner());
    client.release(release_request("b", &b.lease_token)).await.unwrap();
    claim_acquired(&mut client, "b").await;
    server.advance(Duration::from_secs(1));
    server.sweep().await;
    claim_acquired(&mut client, "c").await;
}

async fn a_full_store_makes_room_from_expired_records_without_waiting_for_the_sweeper(backend: Backend) {
    let server = TestServer::start_on_with(backend, |config| config.max_records = 1).await;
    let mut client = server.client().await;
    // Expires 1.3 s from now: a retention after its lease ends, within a second, not on one.
    let request =
        pb::ClaimRequest { lease_ttl: Some(millis(300)), retention: Some(secs(1)), ..claim_request("old", b"") };
    acquired(client.claim(request).await.unwrap().into_inner());
    let status = client.claim(claim_request("new", b"")).await.unwrap_err();
    assert_status(&status, Code::ResourceExhausted, "STORE_FULL");
    server.advance(Duration::from_millis(1_299));
    let status = client.claim(claim_request("new", b"")).await.unwrap_err();
    assert_status(&status, Code::ResourceExhausted, "STORE_FULL");
    // The moment it expired, it makes room: no waiting for the sweeper, nor for the second to end.
    server.advance(Duration::from_millis(1));
    claim_acquired(&mut client, "new").await;
    assert_eq!(server.record_count().await, 1);
}

async fn a_lapsed_lease_stays_visible_for_a_retention_after_it_ends(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let mut client = server.client().await;
    // Retention no longer than the lease: the lapse must still be reported, not forgotten.
    let claim = |fingerprint: &[u8]| pb::ClaimRequest {
        lease_ttl: Some(secs(1)),
        retention: Some(secs(1)),
        ..claim_request("lapsed", fingerprint)
    };
    let first = acquired(client.claim(claim(b"A")).await.unwrap().into_inner());
    server.advance(Duration::from_millis(1_200));
    assert_eq!(server.sweep().await.deleted, 0, "not expired: kept a retention after the lapse");
    let view = client.lookup(lookup_request("lapsed")).await.unwrap().into_inner();
    assert_eq!((view.state(), view.attempt), (pb::KeyState::LeaseExpired, 1));
    assert_eq!(view.expires_at.unwrap().seconds, START.unix_millis() / 1000 + 2);
    let status = client.claim(claim(b"B")).await.unwrap_err();
    assert_status(&status, Code::FailedPrecondition, "FINGERPRINT_MISMATCH");
    let waiting = pb::ClaimRequest { wait: Some(secs(5)), ..claim(b"A") };
    let second = acquired(client.claim(waiting).await.unwrap().into_inner());
    assert_eq!((second.attempt, second.takeover), (2, true));
    assert!(second.fencing_token > first.fencing_token);
    // The new holder's lapse is kept a retention too; after that the key is forgotten.
    server.advance(Duration::from_millis(1_999));
    let view = client.lookup(lookup_request("lapsed")).await.unwrap().into_inner();
    assert_eq!((view.state(), view.attempt), (pb::KeyState::LeaseExpired, 2));
    server.advance(Duration::from_millis(1));
    let status = client.lookup(lookup_request("lapsed")).await.unwrap_err();
    assert_status(&status, Code::NotFound, "KEY_NOT_FOUND");
    // The sweeper reclaims it within a second (the embedded store files records by the second).
    server.advance(Duration::from_secs(1));
    assert_eq!(server.sweep().await.deleted, 1);
}

async fn namespaces_keep_keys_apart_and_empty_means_default(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let mut client = server.client().await;
    let in_payments = claim_acquired(&mut client, "shared").await;
    let users = pb::ClaimRequest { namespace: "users".into(), ..claim_request("shared", b"other") };
    let in_users = acquired(client.claim(users).await.unwrap().into_inner());
    assert_ne!(in_payments.lease_token, in_users.lease_token);
    let empty = pb::ClaimRequest { namespace: String::new(), ..claim_request("k", b"") };
    acquired(client.claim(empty.clone()).await.unwrap().into_inner());
    let default = pb::ClaimRequest { namespace: "default".into(), ..empty };
    in_progress(client.claim(default).await.unwrap().into_inner());
}

async fn fencing_tokens_strictly_increase_across_takeovers_releases_and_sweeps(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let mut client = server.client().await;
    let mut last = 0;
    for round in 0..30 {
        let request =
            pb::ClaimRequest { lease_ttl: Some(secs(1)), retention: Some(secs(1)), ..claim_request("fenced", b"") };
        let grant = acquired(client.claim(request).await.unwrap().into_inner());
        assert!(grant.fencing_token > last, "round {round}: {} after {last}", grant.fencing_token);
        last = grant.fencing_token;
        match round % 3 {
            0 => server.advance(Duration::from_secs(1)),
            1 => {
                client.release(release_request("fenced", &grant.lease_token)).await.unwrap();
            }
            _ => {
                client.complete(complete_request("fenced", &grant.lease_token, b"x")).await.unwrap();
                server.advance(Duration::from_secs(1));
                assert_eq!(server.sweep().await.deleted, 1);
            }
        }
    }
}

/// Every invalid input, per RPC: its status and reason, and the store untouched.
async fn invalid_input_is_refused_with_its_reason_and_changes_nothing(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let mut client = server.client().await;
    let grant = claim_acquired(&mut client, "valid").await;
    let token = grant.lease_token.clone();
    let before = server.digest().await;
    let good = claim_request("fresh", b"fp");
    let claims: Vec<(pb::ClaimRequest, &str)> = vec![
        (pb::ClaimRequest { key: String::new(), ..good.clone() }, "INVALID_KEY"),
        (pb::ClaimRequest { key: "k".repeat(256), ..good.clone() }, "INVALID_KEY"),
        (pb::ClaimRequest { key: "line\nbreak".into(), ..good.clone() }, "INVALID_KEY"),
        (pb::ClaimRequest { namespace: "n".repeat(65), ..good.clone() }, "INVALID_NAMESPACE"),
        (pb::ClaimRequest { namespace: "a/b".into(), ..good.clone() }, "INVALID_NAMESPACE"),
        (pb::ClaimRequest { fingerprint: vec![1; 65], ..good.clone() }, "INVALID_FINGERPRINT"),
        (pb::ClaimRequest { lease_ttl: Some(millis(99)), ..good.clone() }, "INVALID_LEASE_TTL"),
        (pb::ClaimRequest { lease_ttl: Some(secs(3601)), ..good.clone() }, "INVALID_LEASE_TTL"),
        (pb::ClaimRequest { lease_ttl: Some(secs(-5)), ..good.clone() }, "INVALID_LEASE_TTL"),
        (pb::ClaimRequest { retention: Some(millis(999)), ..good.clone() }, "INVALID_RETENTION"),
        (pb::ClaimRequest { retention: Some(secs(30 * 86400 + 1)), ..good.clone() }, "INVALID_RETENTION"),
        (pb::ClaimRequest { wait: Some(millis(60_001)), ..good.clone() }, "INVALID_WAIT"),
        (pb::ClaimRequest { wait: Some(secs(-1)), ..good.clone() }, "INVALID_WAIT"),
        (pb::ClaimRequest { request_id: "r".repeat(129), ..good.clone() }, "INVALID_REQUEST_ID"),
        (pb::ClaimRequest { owner: "o\u{7}".into(), ..good.clone() }, "INVALID_OWNER"),
    ];
    for (request, reason) in claims {
        let status = client.claim(request).await.unwrap_err();
        assert_status(&status, Code::InvalidArgument, reason);
    }
    let completes: Vec<(pb::CompleteRequest, &str)> = vec![
        (complete_request("valid", "not-a-uuid", b"x"), "INVALID_LEASE_TOKEN"),
        (complete_request("", &token, b"x"), "INVALID_KEY"),
        (
            pb::CompleteRequest { retention: Some(secs(0)), ..complete_request("valid", &token, b"x") },
            "INVALID_RETENTION",
        ),
        (complete_request("valid", &token, &vec![0; 1024 * 1024]), "RESPONSE_TOO_LARGE"),
    ];
    for (request, reason) in completes {
        let status = client.complete(request).await.unwrap_err();
        assert_status(&status, Code::InvalidArgument, reason);
    }
    let status = client.renew(renew_request("valid", &token, millis(50))).await.unwrap_err();
    assert_status(&status, Code::InvalidArgument, "INVALID_LEASE_TTL");
    let status = client.renew(renew_request("valid", "", secs(5))).await.unwrap_err();
    assert_status(&status, Code::InvalidArgument, "INVALID_LEASE_TOKEN");
    let status = client.release(release_request("valid", "123")).await.unwrap_err();
    assert_status(&status, Code::InvalidArgument, "INVALID_LEASE_TOKEN");
    let status = client.release(release_request("k\u{0}", &token)).await.unwrap_err();
    assert_status(&status, Code::InvalidArgument, "INVALID_KEY");
    let status =
        client.lookup(pb::LookupRequest { namespace: "bad ns".into(), key: "valid".into() }).await.unwrap_err();
    assert_status(&status, Code::InvalidArgument, "INVALID_NAMESPACE");
    assert_eq!(server.digest().await, before, "an invalid call changed the store");

    // ErrorInfo names the field and the limit.
    let status = client.claim(pb::ClaimRequest { fingerprint: vec![1; 65], ..good }).await.unwrap_err();
    let info = tonic_types::StatusExt::get_details_error_info(&status).unwrap();
    assert_eq!(info.metadata.get("field").map(String::as_str), Some("fingerprint"));
    assert_eq!(info.metadata.get("limit").map(String::as_str), Some("64"));
    // A response exactly at the limit is accepted: a body of 1 MiB - 4 bytes encodes to 1 MiB.
    let mut at_limit = complete_request("valid", &token, &[]);
    at_limit.response = Some(pb::Response { body: vec![7; 1024 * 1024 - 4].into(), metadata: Default::default() });
    client.complete(at_limit).await.expect("a response at the limit is stored");
}

async fn a_message_beyond_the_transport_limit_is_refused_and_changes_nothing(backend: Backend) {
    let server = TestServer::start_on_with(backend, |config| config.max_response_bytes = 1024).await;
    let mut client = server.client().await;
    let grant = claim_acquired(&mut client, "big").await;
    let before = server.digest().await;
    let status = client.complete(complete_request("big", &grant.lease_token, &vec![0; 200 * 1024])).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert_eq!(server.digest().await, before);
    let status = client.complete(complete_request("big", &grant.lease_token, &[0; 1025])).await.unwrap_err();
    assert_status(&status, Code::InvalidArgument, "RESPONSE_TOO_LARGE");
    client.complete(complete_request("big", &grant.lease_token, &[0; 100])).await.expect("still serving");
}

/// The size limit counts a response as protobuf encodes it, so that a response within the limit
/// always fits the transport's message limit, however it is made up (here: tens of thousands of
/// tiny metadata entries, whose framing outweighs their text).
async fn a_response_of_many_small_metadata_entries_is_judged_by_its_encoded_size(backend: Backend) {
    use prost::Message;
    let server = TestServer::start_on(backend).await;
    let mut client = server.client().await;
    let grant = claim_acquired(&mut client, "entries").await;
    let before = server.digest().await;
    // Each entry (6 + 1 bytes of text) encodes to 13 bytes.
    let entries = |n: usize| pb::Response {
        body: Default::default(),
        metadata: (0..n).map(|i| (format!("m{i:05}"), "v".to_owned())).collect(),
    };
    let mut request = complete_request("entries", &grant.lease_token, b"");
    // 80,660 entries: 1,048,580 bytes, over the limit by 4.
    request.response = Some(entries(80_660));
    let status = client.complete(request.clone()).await.unwrap_err();
    assert_status(&status, Code::InvalidArgument, "RESPONSE_TOO_LARGE");
    // 100,000 entries (700 kB of text) encode to 1.3 MB: beyond the transport's limit (the
    // response limit + 64 KiB), refused before it is decoded.
    request.response = Some(entries(100_000));
    let status = client.complete(request.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert_eq!(server.digest().await, before);
    // 80,659 entries: 1,048,567 bytes, within the limit.
    let at_limit = entries(80_659);
    assert_eq!(at_limit.encoded_len(), 1_048_567);
    request.response = Some(at_limit.clone());
    client.complete(request).await.expect("a response within the limit is stored");
    let replay = completed(client.claim(claim_request("entries", b"fp")).await.unwrap().into_inner());
    assert_eq!(replay.response, Some(at_limit));
}

/// Runs every listed contract test against each store.
macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod sled {
            use idempotency_testkit::Backend;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(Backend::Sled).await;
                }
            )*
        }
        mod postgres {
            use idempotency_testkit::Backend;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    if let Some(backend) = Backend::postgres() {
                        super::$test(backend).await;
                    }
                }
            )*
        }
    };
}

conformance!(
    concurrent_claims_of_one_key_yield_exactly_one_acquired,
    a_completed_key_replays_the_stored_response_byte_for_byte,
    a_lapsed_lease_is_taken_over_and_the_stale_holder_is_fenced_off,
    a_reused_key_with_another_fingerprint_is_refused_in_every_state,
    a_waiting_claim_is_woken_by_complete,
    a_retried_complete_wakes_waiters_the_first_one_missed,
    a_waiting_claim_is_woken_by_release_and_acquires,
    a_waiting_claim_takes_over_when_the_lease_lapses,
    a_waiting_claim_answers_in_progress_when_its_wait_ends,
    a_wait_ends_within_the_call_deadline,
    a_cancelled_wait_leaves_nothing_behind,
    a_claim_retried_with_its_request_id_gets_the_same_lease,
    a_retried_complete_returns_the_original_result_and_keeps_the_response,
    complete_and_renew_work_after_the_lease_lapsed_until_a_takeover,
    renew_extends_the_lease,
    release_makes_the_key_claimable_at_once,
    lookup_reports_every_state,
    expired_records_are_absent_at_once_and_swept_later,
    a_record_never_expires_while_its_lease_is_valid,
    sweeping_deletes_only_what_expired_in_batches,
    a_full_store_refuses_new_keys_and_serves_existing_ones,
    a_full_store_makes_room_from_expired_records_without_waiting_for_the_sweeper,
    a_lapsed_lease_stays_visible_for_a_retention_after_it_ends,
    a_response_of_many_small_metadata_entries_is_judged_by_its_encoded_size,
    namespaces_keep_keys_apart_and_empty_means_default,
    fencing_tokens_strictly_increase_across_takeovers_releases_and_sweeps,
    invalid_input_is_refused_with_its_reason_and_changes_nothing,
    a_message_beyond_the_transport_limit_is_refused_and_changes_nothing,
    admin_stats_count_records_by_namespace_and_state,
    admin_list_pages_through_live_records_in_key_order,
    admin_purge_deletes_durably_and_fencing_tokens_never_go_back,
    admin_export_and_import_into_the_other_store_reproduce_every_live_record,
    admin_import_refuses_a_damaged_snapshot_and_changes_nothing,
);
