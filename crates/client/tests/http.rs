//! The `Idempotency-Key` layer around small axum and tower services, against a real coordinator
//! (in process): what the HTTP conformance suite (crates/http-conformance) does not reach from
//! outside, such as the store policy, oversized and streamed responses, the lease in the request,
//! optional keys, methods, fingerprinted headers and failing inner services.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::Extension;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use http_body_util::BodyExt;
use idempotency_client::http::{IdempotencyKey, IdempotencyLayer, StorePolicy};
use idempotency_client::{Client, KeyState, Lease};
use idempotency_testkit::TestServer;
use tower::{Layer, Service, ServiceExt};

async fn layer_for(server: &TestServer) -> (Client, IdempotencyLayer) {
    let client = Client::new(server.channel().await);
    (client.clone(), IdempotencyLayer::new(client, "http-tests"))
}

fn post_with_key(key: &str, body: &'static str) -> Request<Body> {
    Request::post("/thing")
        .header("idempotency-key", key)
        .header("content-type", "text/plain")
        .body(Body::from(body))
        .unwrap()
}

async fn send(router: &Router, request: Request<Body>) -> (StatusCode, HeaderMap, Bytes) {
    let response = router.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    (parts.status, parts.headers, body.collect().await.unwrap().to_bytes())
}

/// A handler that counts its runs and answers `status` with `body`.
fn counting(runs: &Arc<AtomicU32>, status: StatusCode, body: &'static str) -> Router {
    let runs = Arc::clone(runs);
    Router::new().route(
        "/thing",
        post(move || {
            let runs = Arc::clone(&runs);
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                (status, body)
            }
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_too_large_to_store_reaches_its_caller_whole_and_replays_as_a_problem() {
    let server = TestServer::start().await;
    let (_, layer) = layer_for(&server).await;
    // Streamed in 100 chunks of 1 KiB, past a 4 KiB limit.
    let router = Router::new()
        .route(
            "/thing",
            post(|| async {
                let chunks = (0..100u8).map(|i| Ok::<_, Infallible>(Bytes::from(vec![i; 1024])));
                Body::from_stream(tokio_stream::iter(chunks)).into_response()
            }),
        )
        .layer(layer.response_limit(4 * 1024));
    let (status, _, body) = send(&router, post_with_key("big", "x")).await;
    assert_eq!((status, body.len()), (StatusCode::OK, 100 * 1024), "the first caller gets all of it");
    assert!(body.chunks(1024).enumerate().all(|(i, chunk)| chunk.iter().all(|b| usize::from(*b) == i)));
    let (status, headers, body) = send(&router, post_with_key("big", "x")).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(headers["idempotent-replayed"], "true");
    let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem["type"], "urn:idempotency:response-not-stored");
}

/// A body within the limit whose stored form (body, status, headers and their framing) is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_whose_stored_form_is_over_the_limit_is_not_stored_either() {
    let server = TestServer::start().await;
    let (_, layer) = layer_for(&server).await;
    let router = Router::new().route("/thing", post(|| async { vec![7u8; 4096] })).layer(layer.response_limit(4096));
    let (status, _, body) = send(&router, post_with_key("edge", "x")).await;
    assert_eq!((status, body.len()), (StatusCode::OK, 4096));
    let (status, _, body) = send(&router, post_with_key("edge", "x")).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem["type"], "urn:idempotency:response-not-stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_policy_stores_a_500_and_releases_a_429() {
    let server = TestServer::start().await;
    let (_, layer) = layer_for(&server).await;
    let failing = Arc::new(AtomicU32::new(0));
    let router = counting(&failing, StatusCode::INTERNAL_SERVER_ERROR, "boom").layer(layer.clone());
    for _ in 0..2 {
        assert_eq!(send(&router, post_with_key("five-hundred", "x")).await.0, StatusCode::INTERNAL_SERVER_ERROR);
    }
    assert_eq!(failing.load(Ordering::SeqCst), 1, "a 500 is stored: it may have acted");
    let limited = Arc::new(AtomicU32::new(0));
    let router = counting(&limited, StatusCode::TOO_MANY_REQUESTS, "slow down").layer(layer);
    for _ in 0..2 {
        assert_eq!(send(&router, post_with_key("four-two-nine", "x")).await.0, StatusCode::TOO_MANY_REQUESTS);
    }
    assert_eq!(limited.load(Ordering::SeqCst), 2, "a 429 says nothing was done: released, run again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_policy_decides_per_response() {
    let server = TestServer::start().await;
    let (_, layer) = layer_for(&server).await;
    let runs = Arc::new(AtomicU32::new(0));
    let layer = layer
        .store_policy(|status, _| if status.is_server_error() { StorePolicy::Release } else { StorePolicy::Store });
    let router = counting(&runs, StatusCode::BAD_GATEWAY, "upstream failed").layer(layer);
    for _ in 0..3 {
        assert_eq!(send(&router, post_with_key("policy", "x")).await.0, StatusCode::BAD_GATEWAY);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handler_finds_the_lease_in_the_request_and_the_stored_headers_replay() {
    let server = TestServer::start().await;
    let (client, layer) = layer_for(&server).await;
    let router = Router::new()
        .route(
            "/thing",
            post(|Extension(lease): Extension<Lease>, Extension(IdempotencyKey(key)): Extension<IdempotencyKey>| async move {
                let mut response =
                    (StatusCode::CREATED, format!("token {} for {key}", lease.fencing_token())).into_response();
                response.headers_mut().insert("location", "/thing/1".parse().unwrap());
                response.headers_mut().insert("x-not-stored", "no".parse().unwrap());
                response
            }),
        )
        .layer(layer);
    // A Structured Header String: the handler gets the key without its quotes.
    let (status, first_headers, body) = send(&router, post_with_key("\"lease\"", "x")).await;
    assert_eq!(status, StatusCode::CREATED);
    let view = client.lookup("http-tests", "0:lease").await.unwrap();
    assert_eq!(view.state, KeyState::Completed);
    assert_eq!(body, format!("token {} for lease", view.fencing_token));
    assert_eq!(first_headers["x-not-stored"], "no");
    let (status, headers, replayed) = send(&router, post_with_key("lease", "x")).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, body));
    assert_eq!(headers["location"], "/thing/1");
    assert!(headers.get("x-not-stored").is_none(), "only the configured headers are stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_keys_methods_and_fingerprinted_headers() {
    let server = TestServer::start().await;
    let (_, layer) = layer_for(&server).await;
    let runs = Arc::new(AtomicU32::new(0));
    let optional = counting(&runs, StatusCode::OK, "ran").layer(layer.clone().key_optional());
    let no_key = || Request::post("/thing").body(Body::from("x")).unwrap();
    assert_eq!(send(&optional, no_key()).await.0, StatusCode::OK);
    assert_eq!(send(&optional, no_key()).await.0, StatusCode::OK);
    assert_eq!(runs.load(Ordering::SeqCst), 2, "without a key the request passes through");

    let required = counting(&runs, StatusCode::OK, "ran").layer(layer.clone());
    let (status, headers, _) = send(&required, no_key()).await;
    assert_eq!(
        (status, &headers["content-type"]),
        (StatusCode::BAD_REQUEST, &"application/problem+json".parse().unwrap())
    );

    // Only POST is covered here: a PUT with a key passes through every time.
    let puts = Arc::new(AtomicU32::new(0));
    let puts_counter = Arc::clone(&puts);
    let router = Router::new()
        .route(
            "/thing",
            axum::routing::put(move || {
                let puts = Arc::clone(&puts_counter);
                async move {
                    puts.fetch_add(1, Ordering::SeqCst);
                    "put"
                }
            }),
        )
        .layer(layer.clone().methods([axum::http::Method::POST]));
    for _ in 0..2 {
        let put = Request::put("/thing").header("idempotency-key", "put-key").body(Body::empty()).unwrap();
        assert_eq!(send(&router, put).await.0, StatusCode::OK);
    }
    assert_eq!(puts.load(Ordering::SeqCst), 2);

    // A configured header enters the fingerprint: the same body with another value is refused.
    let router = counting(&runs, StatusCode::OK, "ran").layer(layer.fingerprint_header("x-currency".parse().unwrap()));
    let with_currency = |currency: &str| {
        Request::post("/thing")
            .header("idempotency-key", "currency")
            .header("x-currency", currency)
            .body(Body::from("100"))
            .unwrap()
    };
    assert_eq!(send(&router, with_currency("USD")).await.0, StatusCode::OK);
    assert_eq!(send(&router, with_currency("EUR")).await.0, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inner_service_that_fails_without_a_response_leaves_the_lease_to_lapse() {
    let server = TestServer::start().await;
    let (client, layer) = layer_for(&server).await;
    let mut service = layer.lease_ttl(std::time::Duration::from_secs(1)).layer(tower::service_fn(
        |_: Request<http_body_util::Full<Bytes>>| async {
            Err::<Response<http_body_util::Full<Bytes>>, _>(std::io::Error::other(
                "the connection to the database broke",
            ))
        },
    ));
    let request = Request::post("/thing")
        .header("idempotency-key", "broken")
        .body(http_body_util::Full::new(Bytes::from("x")))
        .unwrap();
    let result = service.ready().await.unwrap().call(request).await;
    assert!(result.is_err(), "the inner error is passed on");
    assert_eq!(client.lookup("http-tests", "0:broken").await.unwrap().state, KeyState::InProgress, "not released");
    server.advance(std::time::Duration::from_secs(1));
    assert_eq!(client.lookup("http-tests", "0:broken").await.unwrap().state, KeyState::LeaseExpired);
}

/// Sets its flag when dropped: tells whether a handler's future was cancelled.
struct DropFlag(Arc<std::sync::atomic::AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

async fn state_settles(client: &Client, key: &str, want: KeyState) -> KeyState {
    let mut state = client.lookup("http-tests", key).await.unwrap().state;
    for _ in 0..100 {
        if state == want {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        state = client.lookup("http-tests", key).await.unwrap().state;
    }
    state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_after_the_answer_still_gets_it_stored() {
    let server = TestServer::start().await;
    let (client, layer) = layer_for(&server).await;
    // The handler answers with a body that is still streaming when the client leaves; the layer
    // reads it to its end and stores it, so that the retry replays it instead of running again.
    let (rest_tx, mut rest_rx) = tokio::sync::mpsc::channel::<tokio::sync::mpsc::Sender<Result<Bytes, Infallible>>>(1);
    let router = Router::new()
        .route(
            "/thing",
            post(move || {
                let rest_tx = rest_tx.clone();
                async move {
                    let (chunks, body) = tokio::sync::mpsc::channel(4);
                    chunks.send(Ok(Bytes::from_static(b"the start"))).await.unwrap();
                    rest_tx.send(chunks).await.unwrap();
                    Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(body))
                }
            }),
        )
        .layer(layer);
    let caller = tokio::spawn({
        let router = router.clone();
        async move { send(&router, post_with_key("gone-after", "x")).await }
    });
    let chunks = rest_rx.recv().await.unwrap();
    caller.abort();
    assert!(caller.await.unwrap_err().is_cancelled());
    chunks.send(Ok(Bytes::from_static(b" and the rest"))).await.unwrap();
    drop(chunks);
    assert_eq!(state_settles(&client, "0:gone-after", KeyState::Completed).await, KeyState::Completed);
    let (status, headers, body) = send(&router, post_with_key("gone-after", "x")).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"the start and the rest"[..]));
    assert_eq!(headers["idempotent-replayed"], "true");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_before_the_answer_cancels_the_handler_and_leaves_the_lease() {
    let server = TestServer::start().await;
    let (client, layer) = layer_for(&server).await;
    let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (started_tx, mut started_rx) = tokio::sync::mpsc::channel::<()>(1);
    let flag = Arc::clone(&dropped);
    let router = Router::new()
        .route(
            "/thing",
            post(move || {
                let (flag, started_tx) = (DropFlag(Arc::clone(&flag)), started_tx.clone());
                async move {
                    let _flag = flag;
                    started_tx.send(()).await.unwrap();
                    std::future::pending::<()>().await;
                    "never"
                }
            }),
        )
        .layer(layer.lease_ttl(std::time::Duration::from_secs(1)));
    let caller = tokio::spawn({
        let router = router.clone();
        async move { send(&router, post_with_key("gone-before", "x")).await }
    });
    started_rx.recv().await.unwrap();
    caller.abort();
    assert!(caller.await.unwrap_err().is_cancelled());
    for _ in 0..100 {
        if dropped.load(Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(dropped.load(Ordering::SeqCst), "the handler is cancelled with its client");
    let view = client.lookup("http-tests", "0:gone-before").await.unwrap();
    assert_eq!(view.state, KeyState::InProgress, "not released: the mutation may have partly happened");
    server.advance(std::time::Duration::from_secs(1));
    assert_eq!(client.lookup("http-tests", "0:gone-before").await.unwrap().state, KeyState::LeaseExpired);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_of_the_services_own_request_is_a_500_and_an_outage_a_503() {
    let server = TestServer::start().await;
    let (_, layer) = layer_for(&server).await;
    let runs = Arc::new(AtomicU32::new(0));
    // A lease longer than the server allows: this API's configuration, which no retry fixes.
    let router =
        counting(&runs, StatusCode::OK, "ran").layer(layer.lease_ttl(std::time::Duration::from_secs(100 * 3600)));
    let (status, headers, body) = send(&router, post_with_key("misconfigured", "x")).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(headers.get("retry-after").is_none());
    let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem["type"], "urn:idempotency:misconfigured");

    // Nothing listens on the port: an outage, worth a retry.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect_lazy();
    let router =
        counting(&runs, StatusCode::OK, "ran").layer(IdempotencyLayer::new(Client::new(channel), "http-tests"));
    let (status, headers, body) = send(&router, post_with_key("outage", "x")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["retry-after"], "1");
    let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem["type"], "urn:idempotency:unavailable");
    assert_eq!(runs.load(Ordering::SeqCst), 0, "neither ran the handler");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_policy_releases_only_the_statuses_that_say_nothing_was_done() {
    let server = TestServer::start().await;
    let (_, layer) = layer_for(&server).await;
    let released = [
        StatusCode::REQUEST_TIMEOUT,
        StatusCode::TOO_EARLY,
        StatusCode::TOO_MANY_REQUESTS,
        StatusCode::SERVICE_UNAVAILABLE,
    ];
    let stored = [
        StatusCode::CREATED,
        StatusCode::PAYMENT_REQUIRED,
        StatusCode::INTERNAL_SERVER_ERROR,
        StatusCode::BAD_GATEWAY,
        StatusCode::GATEWAY_TIMEOUT,
    ];
    for (status, runs_expected) in released.iter().map(|s| (*s, 2)).chain(stored.iter().map(|s| (*s, 1))) {
        let runs = Arc::new(AtomicU32::new(0));
        let router = counting(&runs, status, "answer").layer(layer.clone());
        let key = format!("status-{}", status.as_u16());
        for _ in 0..2 {
            assert_eq!(send(&router, post_with_key(&key, "x")).await.0, status);
        }
        assert_eq!(runs.load(Ordering::SeqCst), runs_expected, "{status}: runs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_path_query_and_content_type_are_part_of_the_fingerprint() {
    let server = TestServer::start().await;
    let (_, layer) = layer_for(&server).await;
    let runs = Arc::new(AtomicU32::new(0));
    let handler = {
        let runs = Arc::clone(&runs);
        move || {
            let runs = Arc::clone(&runs);
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                (StatusCode::CREATED, "made")
            }
        }
    };
    let router = Router::new().fallback(handler).layer(layer);
    let request = |method: &str, uri: &str, content_type: &str| {
        Request::builder()
            .method(method)
            .uri(uri)
            .header("idempotency-key", "fingerprint")
            .header("content-type", content_type)
            .body(Body::from("same body"))
            .unwrap()
    };
    let first = |uri: &str| {
        Request::post(uri)
            .header("idempotency-key", "fingerprint")
            .header("content-type", "text/plain")
            .body(Body::from("same body"))
            .unwrap()
    };
    assert_eq!(send(&router, first("/thing?a=1")).await.0, StatusCode::CREATED);
    // The same request again: a replay.
    let (status, headers, _) = send(&router, first("/thing?a=1")).await;
    assert_eq!(
        (status, &headers["idempotent-replayed"]),
        (StatusCode::CREATED, &"true".parse::<axum::http::HeaderValue>().unwrap())
    );
    // Each difference alone makes it another request: 422.
    for (method, uri, content_type) in [
        ("PATCH", "/thing?a=1", "text/plain"),
        ("POST", "/other?a=1", "text/plain"),
        ("POST", "/thing?a=2", "text/plain"),
        ("POST", "/thing?a=1", "application/json"),
    ] {
        let (status, _, _) = send(&router, request(method, uri, content_type)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{method} {uri} {content_type}");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_panics_leaves_the_lease_to_lapse_and_a_retry_takes_over() {
    let server = TestServer::start().await;
    let (client, layer) = layer_for(&server).await;
    let calls = Arc::new(AtomicU32::new(0));
    let router = {
        let calls = Arc::clone(&calls);
        Router::new()
            .route(
                "/thing",
                post(move |Extension(lease): Extension<Lease>| {
                    let calls = Arc::clone(&calls);
                    async move {
                        if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                            panic!("the handler panics mid-mutation");
                        }
                        (StatusCode::CREATED, format!("attempt {} takeover {}", lease.attempt(), lease.takeover()))
                    }
                }),
            )
            .layer(layer.lease_ttl(std::time::Duration::from_secs(1)))
    };
    let first = tokio::spawn({
        let router = router.clone();
        async move { send(&router, post_with_key("panics", "x")).await }
    });
    assert!(first.await.unwrap_err().is_panic(), "the panic reaches the caller's task");
    // Not released (it may have acted) and not completed: the lease lapses.
    assert_eq!(client.lookup("http-tests", "0:panics").await.unwrap().state, KeyState::InProgress);
    server.advance(std::time::Duration::from_secs(1));
    let (status, _, body) = send(&router, post_with_key("panics", "x")).await;
    assert_eq!((status, body.as_ref()), (StatusCode::CREATED, b"attempt 2 takeover true".as_slice()));
}

/// A coordinator that is up and answers every call UNAVAILABLE STORE_UNAVAILABLE (a failing disk).
struct Unavailable;

fn store_unavailable() -> tonic::Status {
    idempotency_proto::Reason::StoreUnavailable.status("storage unavailable", std::collections::HashMap::new())
}

#[tonic::async_trait]
impl idempotency_proto::pb::coordinator_server::Coordinator for Unavailable {
    async fn claim(
        &self,
        _: tonic::Request<idempotency_proto::pb::ClaimRequest>,
    ) -> Result<tonic::Response<idempotency_proto::pb::ClaimResponse>, tonic::Status> {
        Err(store_unavailable())
    }
    async fn complete(
        &self,
        _: tonic::Request<idempotency_proto::pb::CompleteRequest>,
    ) -> Result<tonic::Response<idempotency_proto::pb::CompleteResponse>, tonic::Status> {
        Err(store_unavailable())
    }
    async fn renew(
        &self,
        _: tonic::Request<idempotency_proto::pb::RenewRequest>,
    ) -> Result<tonic::Response<idempotency_proto::pb::RenewResponse>, tonic::Status> {
        Err(store_unavailable())
    }
    async fn release(
        &self,
        _: tonic::Request<idempotency_proto::pb::ReleaseRequest>,
    ) -> Result<tonic::Response<idempotency_proto::pb::ReleaseResponse>, tonic::Status> {
        Err(store_unavailable())
    }
    async fn lookup(
        &self,
        _: tonic::Request<idempotency_proto::pb::LookupRequest>,
    ) -> Result<tonic::Response<idempotency_proto::pb::LookupResponse>, tonic::Status> {
        Err(store_unavailable())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_that_answers_unavailable_gets_a_503_and_the_handler_never_runs() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(idempotency_proto::pb::coordinator_server::CoordinatorServer::new(Unavailable))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let client = Client::connect(format!("http://{addr}")).await.unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let layer = IdempotencyLayer::new(client, "http-tests").retry_for(std::time::Duration::from_millis(300));
    let router = counting(&runs, StatusCode::OK, "ran").layer(layer);
    let (status, headers, body) = send(&router, post_with_key("disk-failing", "x")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.contains_key("retry-after"));
    assert_eq!(headers["content-type"], "application/problem+json");
    let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem["type"], "urn:idempotency:unavailable");
    assert_eq!(runs.load(Ordering::SeqCst), 0, "no lease, no handler");
}
