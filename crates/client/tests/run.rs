//! `Idempotent::run` against a real coordinator over loopback: each behaviour the helper promises,
//! including lost replies (through a proxy that forwards a call and then drops its reply) and
//! leases lost to a takeover (by moving the server's manual clock past them).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idempotency_client::{Client, Error, Failure, KeyState, Reason, Stored};
use idempotency_proto::pb;
use idempotency_proto::pb::coordinator_client::CoordinatorClient;
use idempotency_proto::pb::coordinator_server::{Coordinator, CoordinatorServer};
use idempotency_testkit::TestServer;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

const NAMESPACE: &str = "payments";

async fn client_of(server: &TestServer) -> Client {
    Client::new(server.channel().await)
}

fn body(text: &str) -> Stored {
    Stored::new(text.to_owned()).metadata("status", "201")
}

/// Forwards every call to the coordinator; drops the reply of the next `n` Claims or Completes
/// after they were applied (answering UNAVAILABLE), as a network that loses replies would.
#[derive(Clone)]
struct LossyProxy {
    upstream: CoordinatorClient<Channel>,
    lose_claim_replies: Arc<AtomicU32>,
    lose_complete_replies: Arc<AtomicU32>,
    claims: Arc<AtomicU32>,
    completes: Arc<AtomicU32>,
}

fn lose_one(counter: &AtomicU32) -> bool {
    counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
}

#[tonic::async_trait]
impl Coordinator for LossyProxy {
    async fn claim(&self, request: Request<pb::ClaimRequest>) -> Result<Response<pb::ClaimResponse>, Status> {
        self.claims.fetch_add(1, Ordering::SeqCst);
        let reply = self.upstream.clone().claim(request.into_inner()).await?;
        if lose_one(&self.lose_claim_replies) {
            return Err(Status::unavailable("the reply was lost"));
        }
        Ok(reply)
    }

    async fn complete(&self, request: Request<pb::CompleteRequest>) -> Result<Response<pb::CompleteResponse>, Status> {
        self.completes.fetch_add(1, Ordering::SeqCst);
        let reply = self.upstream.clone().complete(request.into_inner()).await?;
        if lose_one(&self.lose_complete_replies) {
            return Err(Status::unavailable("the reply was lost"));
        }
        Ok(reply)
    }

    async fn renew(&self, request: Request<pb::RenewRequest>) -> Result<Response<pb::RenewResponse>, Status> {
        self.upstream.clone().renew(request.into_inner()).await
    }

    async fn release(&self, request: Request<pb::ReleaseRequest>) -> Result<Response<pb::ReleaseResponse>, Status> {
        self.upstream.clone().release(request.into_inner()).await
    }

    async fn lookup(&self, request: Request<pb::LookupRequest>) -> Result<Response<pb::LookupResponse>, Status> {
        self.upstream.clone().lookup(request.into_inner()).await
    }
}

/// Serves a [`LossyProxy`] in front of `server`; returns the proxy and a client through it.
async fn lossy_proxy(server: &TestServer) -> (LossyProxy, Client) {
    let proxy = LossyProxy {
        upstream: CoordinatorClient::new(server.channel().await),
        lose_claim_replies: Arc::default(),
        lose_complete_replies: Arc::default(),
        claims: Arc::default(),
        completes: Arc::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = CoordinatorServer::new(proxy.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let client = Client::connect(format!("http://{addr}")).await.unwrap();
    (proxy, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_claim_reply_is_retried_with_the_same_request_id_and_gets_the_same_lease() {
    let server = TestServer::start().await;
    let (proxy, client) = lossy_proxy(&server).await;
    proxy.lose_claim_replies.store(1, Ordering::SeqCst);
    let runs = AtomicU32::new(0);
    let outcome = client
        .idempotent(NAMESPACE, "lost-claim-reply")
        .run(|lease| {
            runs.fetch_add(1, Ordering::SeqCst);
            async move {
                assert_eq!(lease.attempt(), 1, "the retried Claim got the first grant back");
                Ok::<_, Failure>(body("paid"))
            }
        })
        .await
        .expect("the retry recovers the lease the lost reply carried");
    assert!(!outcome.replayed());
    assert_eq!((runs.load(Ordering::SeqCst), proxy.claims.load(Ordering::SeqCst)), (1, 2));
    let view = client_of(&server).await.lookup(NAMESPACE, "lost-claim-reply").await.unwrap();
    assert_eq!((view.state, view.attempt), (KeyState::Completed, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_key_is_replayed_without_running_the_work() {
    let server = TestServer::start().await;
    let client = client_of(&server).await;
    let first = client.idempotent(NAMESPACE, "done").run(|_| async { Ok::<_, Failure>(body("paid")) }).await.unwrap();
    assert!(!first.replayed());
    let again = client
        .idempotent(NAMESPACE, "done")
        .run(|_| async { panic!("the work must not run again") as Result<Stored, Failure> })
        .await
        .unwrap();
    assert!(again.replayed());
    assert_eq!(again.response(), &body("paid"));
    assert_eq!(again.fencing_token(), first.fencing_token());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_in_progress_elsewhere_is_an_error_naming_the_holder_without_wait() {
    let server = TestServer::start().await;
    let client = client_of(&server).await;
    let claim = idempotency_client::Claim::new(NAMESPACE, "busy").owner("api-7");
    assert!(matches!(client.claim(&claim).await.unwrap(), idempotency_client::ClaimOutcome::Acquired(_)));
    let result = client.idempotent(NAMESPACE, "busy").run(|_| async { Ok::<_, Failure>(body("x")) }).await;
    match result {
        Err(Error::InProgress { owner, attempt, retry_after }) => {
            assert_eq!((owner.as_str(), attempt), ("api-7", 1));
            assert!(retry_after > Duration::ZERO);
        }
        other => panic!("expected InProgress, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wait_run_waits_for_the_running_attempt_across_several_claims_and_replays_it() {
    // The server waits at most 300 ms per Claim, and its clock runs 2x: a 5 s wait takes several
    // Claims, each a wait the server ends with in_progress.
    let server = Arc::new(TestServer::start_with(|config| config.max_wait = Duration::from_millis(300)).await);
    let clock = Arc::clone(&server);
    let ticking = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            clock.advance(Duration::from_millis(100));
        }
    });
    let (proxy, client) = lossy_proxy(&server).await;
    let claim = idempotency_client::Claim::new(NAMESPACE, "slow");
    let idempotency_client::ClaimOutcome::Acquired(grant) = client.claim(&claim).await.unwrap() else { panic!() };
    let holder = client.clone();
    let finisher = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        holder.complete(NAMESPACE, "slow", &grant.lease_token, body("from the first"), None).await.unwrap();
    });
    let outcome = client
        .idempotent(NAMESPACE, "slow")
        .wait(Duration::from_secs(5))
        .run(|_| async { panic!("the running attempt finishes") as Result<Stored, Failure> })
        .await
        .expect("the wait ends with the first attempt's response");
    assert!(outcome.replayed());
    assert_eq!(outcome.response(), &body("from the first"));
    // The first Claim (acquired above) and the run's: one that learned the server's longest wait,
    // then at least two waits the server ended (300 ms of its time each in about 1 s).
    assert!(proxy.claims.load(Ordering::SeqCst) >= 4, "claims: {}", proxy.claims.load(Ordering::SeqCst));
    finisher.await.unwrap();
    ticking.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_is_renewed_while_the_work_runs() {
    let server = Arc::new(TestServer::start().await);
    let client = client_of(&server).await;
    let clock_mover = Arc::clone(&server);
    let outcome = client
        .idempotent(NAMESPACE, "long")
        .lease_ttl(Duration::from_millis(300))
        .run(|_| async move {
            // 1.5 s of server time passes (five leases) while the work runs in real time.
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                clock_mover.advance(Duration::from_millis(150));
            }
            let other = client_of(&clock_mover).await;
            let found = other.claim(&idempotency_client::Claim::new(NAMESPACE, "long")).await.unwrap();
            assert!(
                matches!(found, idempotency_client::ClaimOutcome::InProgress(_)),
                "the renewed lease still holds: {found:?}"
            );
            Ok::<_, Failure>(body("long work"))
        })
        .await
        .unwrap();
    assert!(!outcome.replayed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_renewal_resolves_lost_and_run_does_not_complete() {
    let server = Arc::new(TestServer::start().await);
    let (proxy, client) = lossy_proxy(&server).await;
    let taker = Arc::clone(&server);
    let result = client
        .idempotent(NAMESPACE, "taken")
        .lease_ttl(Duration::from_millis(300))
        .run(|lease| async move {
            // The lease lapses on the server's clock, and someone takes the key over and finishes.
            taker.advance(Duration::from_secs(1));
            let other = client_of(&taker).await;
            let idempotency_client::ClaimOutcome::Acquired(grant) =
                other.claim(&idempotency_client::Claim::new(NAMESPACE, "taken")).await.unwrap()
            else {
                panic!("the lapsed lease is taken over")
            };
            assert!(grant.takeover && grant.fencing_token > lease.fencing_token());
            other.complete(NAMESPACE, "taken", &grant.lease_token, body("by the new holder"), None).await.unwrap();
            tokio::time::timeout(Duration::from_secs(10), lease.lost()).await.expect("the next renewal is refused");
            assert!(lease.is_lost());
            Ok::<_, Failure>(body("by the stale holder"))
        })
        .await;
    assert!(matches!(result, Err(Error::Rejected(Reason::LeaseLost, _))), "{result:?}");
    assert_eq!(proxy.completes.load(Ordering::SeqCst), 0, "no Complete was attempted with the lost lease");
    let view = client.lookup(NAMESPACE, "taken").await.unwrap();
    assert_eq!(view.response, Some(body("by the new holder")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_complete_reply_is_retried_with_the_same_token() {
    let server = TestServer::start().await;
    let (proxy, client) = lossy_proxy(&server).await;
    proxy.lose_complete_replies.store(2, Ordering::SeqCst);
    let outcome =
        client.idempotent(NAMESPACE, "lost-complete").run(|_| async { Ok::<_, Failure>(body("paid")) }).await.unwrap();
    assert_eq!(outcome.response(), &body("paid"));
    let view = client.lookup(NAMESPACE, "lost-complete").await.unwrap();
    assert_eq!((view.state, view.response), (KeyState::Completed, Some(body("paid"))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retryable_failure_releases_the_key_and_a_retry_runs_again() {
    let server = TestServer::start().await;
    let client = client_of(&server).await;
    let result = client
        .idempotent(NAMESPACE, "bank-timeout")
        .run(|_| async {
            Err::<Stored, _>(std::io::Error::new(std::io::ErrorKind::TimedOut, "the bank did not answer"))?;
            unreachable!()
        })
        .await;
    assert!(matches!(&result, Err(Error::Failed { stored: None, .. })), "{result:?}");
    assert_eq!(client.lookup(NAMESPACE, "bank-timeout").await.unwrap().state, KeyState::Released);
    let retry = client
        .idempotent(NAMESPACE, "bank-timeout")
        .run(|lease| async move {
            assert_eq!((lease.attempt(), lease.takeover()), (2, false));
            Ok::<_, Failure>(body("paid on the retry"))
        })
        .await
        .unwrap();
    assert!(!retry.replayed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_failure_stores_its_response_and_retries_replay_it() {
    let server = TestServer::start().await;
    let client = client_of(&server).await;
    let declined = Stored::new("card declined").metadata("status", "402");
    let response = declined.clone();
    let result = client
        .idempotent(NAMESPACE, "declined")
        .run(|_| async move { Err::<Stored, _>(Failure::final_response(response, "declined by the issuer")) })
        .await;
    match result {
        Err(Error::Failed { stored: Some(stored), .. }) => assert_eq!(stored, declined),
        other => panic!("expected a final failure, got {other:?}"),
    }
    let retry = client
        .idempotent(NAMESPACE, "declined")
        .run(|_| async { panic!("a final failure is not retried") as Result<Stored, Failure> })
        .await
        .unwrap();
    assert!(retry.replayed());
    assert_eq!(retry.response(), &declined);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_work_leaves_the_lease_to_lapse_and_the_next_run_takes_over() {
    let server = TestServer::start().await;
    let client = client_of(&server).await;
    let panicking = client.clone();
    let crashed = tokio::spawn(async move {
        panicking
            .idempotent(NAMESPACE, "crash")
            .lease_ttl(Duration::from_secs(1))
            .run(|_| async { panic!("the process crashed halfway") as Result<Stored, Failure> })
            .await
    })
    .await;
    assert!(crashed.unwrap_err().is_panic());
    assert_eq!(client.lookup(NAMESPACE, "crash").await.unwrap().state, KeyState::InProgress, "not released");
    server.advance(Duration::from_secs(1));
    let retry = client
        .idempotent(NAMESPACE, "crash")
        .run(|lease| async move {
            assert_eq!((lease.attempt(), lease.takeover()), (2, true));
            Ok::<_, Failure>(body("recovered"))
        })
        .await
        .unwrap();
    assert!(!retry.replayed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_run_leaves_the_lease_to_lapse() {
    let server = TestServer::start().await;
    let client = client_of(&server).await;
    let (started, running) = tokio::sync::oneshot::channel();
    let cancelled = client.clone();
    let task = tokio::spawn(async move {
        cancelled
            .idempotent(NAMESPACE, "cancelled")
            .lease_ttl(Duration::from_secs(1))
            .run(|_| async move {
                let _ = started.send(());
                std::future::pending::<()>().await;
                Ok::<_, Failure>(body("never"))
            })
            .await
    });
    running.await.unwrap();
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert_eq!(client.lookup(NAMESPACE, "cancelled").await.unwrap().state, KeyState::InProgress, "not released");
    server.advance(Duration::from_secs(1));
    assert_eq!(client.lookup(NAMESPACE, "cancelled").await.unwrap().state, KeyState::LeaseExpired);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_runs_of_one_key_run_the_work_once_and_agree() {
    let server = TestServer::start().await;
    let client = client_of(&server).await;
    let executions = Arc::new(AtomicU32::new(0));
    let runs: Vec<_> = (0..32)
        .map(|_| {
            let client = client.clone();
            let executions = Arc::clone(&executions);
            tokio::spawn(async move {
                client
                    .idempotent(NAMESPACE, "contended")
                    .wait(Duration::from_secs(10))
                    .run(|lease| async move {
                        executions.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Ok::<_, Failure>(body(&format!("paid under {}", lease.fencing_token())))
                    })
                    .await
                    .expect("every run ends with the one response")
            })
        })
        .collect();
    let mut responses = Vec::new();
    for run in runs {
        responses.push(run.await.unwrap());
    }
    assert_eq!(executions.load(Ordering::SeqCst), 1);
    assert_eq!(responses.iter().filter(|outcome| !outcome.replayed()).count(), 1);
    assert!(responses.iter().all(|outcome| outcome.response() == responses[0].response()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indeterminate_claims_are_retried_only_within_retry_for_and_the_work_never_runs() {
    let server = TestServer::start().await;
    let (proxy, client) = lossy_proxy(&server).await;
    // Every Claim's reply is lost: each may have taken effect, none says so.
    proxy.lose_claim_replies.store(u32::MAX, Ordering::SeqCst);
    let runs = AtomicU32::new(0);
    let run = client.idempotent(NAMESPACE, "never-answered").retry_for(Duration::from_millis(500)).run(|_| {
        runs.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Failure>(body("never")) }
    });
    // Bounded only to turn a run that never gives up into a failure instead of a hang.
    let result = tokio::time::timeout(Duration::from_secs(30), run).await.expect("run gives up within retry_for");
    let error = result.expect_err("no Claim was ever answered");
    assert!(error.is_indeterminate(), "{error:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    let claims = proxy.claims.load(Ordering::SeqCst);
    assert!(claims >= 2, "the Claim was retried ({claims} sent)");
    // What the lost replies carried: the key is held by the first grant, and a later run with
    // its replies delivered takes it over once the lease lapses (not tested here: 30 s).
    let view = client_of(&server).await.lookup(NAMESPACE, "never-answered").await.unwrap();
    assert_eq!((view.state, view.attempt), (KeyState::InProgress, 1), "every retry got the same grant");
}
