//! An `Idempotency-Key` layer for tower and axum services, following
//! draft-ietf-httpapi-idempotency-key-header (revision 07), on top of
//! [`Idempotent::run`](crate::Idempotent::run).
//!
//! For each request whose method it covers (POST and PATCH unless told otherwise) the layer:
//! - reads `Idempotency-Key` (a Structured Header String `"abc"`, or a bare value `abc`); a missing
//!   key is 400 when keys are required (the default; otherwise the request passes through), and
//!   an empty, over-long or unparsable key, or one sent twice, is 400;
//! - reads the body up to its limit (413 beyond it, before anything is claimed) and fingerprints
//!   the request: SHA-256 over the method, the path and query, `content-type`, the configured
//!   headers and the body;
//! - claims the key, scoped by the configured scope (a tenant, say: the stored key is the scope
//!   and the key, so one scope can never replay another's response). The first request runs the
//!   inner service with the [`Lease`] in its extensions (to fence its own writes); its response
//!   is buffered, stored (status, the configured headers, body) and returned. A retry gets the
//!   stored response with `Idempotent-Replayed: true`. A request that finds the first one still
//!   running gets 409 with `Retry-After`, or with a wait, the first one's response. Another
//!   request under the same key gets 422.
//! - stores what the inner service answered, 5xx included (it may have acted: replaying is the
//!   safe choice), except 408, 425, 429 and 503, which say nothing was done: those release the
//!   key so that a retry runs again. [`IdempotencyLayer::store_policy`] overrides this.
//! - answers 503 with `Retry-After` when the coordinator cannot be reached or is unavailable,
//!   without running the inner service (fail closed);
//! - leaves the lease to lapse when the inner service panics, or the client goes away before it
//!   answered (nothing is released: the mutation may have partly happened); the next retry after
//!   the lease takes over. Once the inner service has answered, its answer is stored even if the
//!   client has gone;
//! - answers 500 `urn:idempotency:misconfigured` when the coordinator refuses the service's own
//!   request (its credentials, namespace or lease bounds): that is no outage, and no retry fixes it.
//!
//! A response too large for the coordinator is still returned whole to its first caller (the
//! mutation ran, so it must not run again), and a 500 problem whose `type` says the response was
//! not stored is stored for replays. Every error the layer itself answers is
//! `application/problem+json` (see [`Problem`]).
//!
//! Put a layer that turns panics into 500 responses (tower-http's `CatchPanic`) outside this one,
//! not inside: inside, a panic would be stored as a 500 instead of leaving the lease to lapse.

mod body;
mod key;
mod problem;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use sha2::{Digest, Sha256};
use tower::{Layer, Service};

pub use body::ResponseBody;
pub use key::{IDEMPOTENCY_KEY, MAX_KEY_BYTES};
pub use problem::Problem;

use crate::{Client, Error, Failure, Lease, Reason, Stored};
use key::{KeyError, key_of, stored_key};

/// The request's idempotency key as the layer parsed it (without the quotes of a Structured Header
/// String), in the request's extensions beside the [`Lease`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(pub String);

/// The header a replayed response carries (as Stripe's API does; the draft has none yet).
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// What to do with a response the inner service produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorePolicy {
    /// Store it: every retry gets it.
    Store,
    /// Release the key: nothing was done, and a retry runs the request again.
    Release,
}

/// The default store policy: store everything, 5xx included, except 408, 425, 429 and 503.
pub fn default_store_policy(status: StatusCode, _headers: &HeaderMap) -> StorePolicy {
    match status.as_u16() {
        408 | 425 | 429 | 503 => StorePolicy::Release,
        _ => StorePolicy::Store,
    }
}

type ScopeFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;
type PolicyFn = dyn Fn(StatusCode, &HeaderMap) -> StorePolicy + Send + Sync;

#[derive(Clone)]
struct Settings {
    client: Client,
    namespace: String,
    methods: Vec<Method>,
    key_required: bool,
    scope: Option<Arc<ScopeFn>>,
    lease_ttl: Option<Duration>,
    retention: Option<Duration>,
    wait: Duration,
    retry_for: Duration,
    owner: Option<String>,
    body_limit: usize,
    response_limit: usize,
    fingerprint_headers: Vec<HeaderName>,
    stored_headers: Vec<HeaderName>,
    store_policy: Arc<PolicyFn>,
}

/// The `Idempotency-Key` layer. Build it with [`IdempotencyLayer::new`] and its setters, then
/// apply it to a service (`axum::Router::layer`, `tower::ServiceBuilder::layer`).
///
/// ```no_run
/// # async fn example() -> Result<(), idempotency_client::Error> {
/// use std::time::Duration;
/// use idempotency_client::Client;
/// use idempotency_client::http::IdempotencyLayer;
///
/// let client = Client::connect("http://127.0.0.1:50051").await?;
/// let layer = IdempotencyLayer::new(client, "payments")
///     .scope(|request| request.headers.get("x-tenant")?.to_str().ok().map(str::to_owned))
///     .lease_ttl(Duration::from_secs(30))
///     .wait(Duration::from_secs(5));
/// // let app = axum::Router::new().route("/payments", post(create_payment)).layer(layer);
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct IdempotencyLayer {
    settings: Arc<Settings>,
}

impl IdempotencyLayer {
    /// A layer that keeps its keys in `namespace` of the coordinator `client` talks to.
    pub fn new(client: Client, namespace: impl Into<String>) -> IdempotencyLayer {
        IdempotencyLayer {
            settings: Arc::new(Settings {
                client,
                namespace: namespace.into(),
                methods: vec![Method::POST, Method::PATCH],
                key_required: true,
                scope: None,
                lease_ttl: None,
                retention: None,
                wait: Duration::ZERO,
                retry_for: Duration::from_secs(2),
                owner: None,
                body_limit: 1024 * 1024,
                response_limit: 1024 * 1024,
                fingerprint_headers: Vec::new(),
                stored_headers: [
                    header::CONTENT_TYPE,
                    header::CONTENT_ENCODING,
                    header::CONTENT_LANGUAGE,
                    header::LOCATION,
                    header::LINK,
                    header::ETAG,
                    header::CACHE_CONTROL,
                ]
                .into(),
                store_policy: Arc::new(default_store_policy),
            }),
        }
    }

    fn with(mut self, change: impl FnOnce(&mut Settings)) -> IdempotencyLayer {
        change(Arc::make_mut(&mut self.settings));
        self
    }

    /// The methods the layer covers (POST and PATCH by default); others pass through.
    #[must_use]
    pub fn methods(self, methods: impl IntoIterator<Item = Method>) -> IdempotencyLayer {
        self.with(|settings| settings.methods = methods.into_iter().collect())
    }

    /// Requests without `Idempotency-Key` pass through instead of getting 400.
    #[must_use]
    pub fn key_optional(self) -> IdempotencyLayer {
        self.with(|settings| settings.key_required = false)
    }

    /// The scope of a request's key (the authenticated tenant, say): requests of different
    /// scopes never share a key. `None`: the one shared scope.
    #[must_use]
    pub fn scope(self, scope: impl Fn(&Parts) -> Option<String> + Send + Sync + 'static) -> IdempotencyLayer {
        self.with(|settings| settings.scope = Some(Arc::new(scope)))
    }

    /// The lease of a running request (the coordinator's default, 30 s, when unset); renewed
    /// every third of it while the inner service runs.
    #[must_use]
    pub fn lease_ttl(self, ttl: Duration) -> IdempotencyLayer {
        self.with(|settings| settings.lease_ttl = Some(ttl))
    }

    /// How long keys and responses are kept (the coordinator's default, 24 h, when unset). This
    /// is the expiry policy the draft asks an API to publish: say it in your API's documentation.
    #[must_use]
    pub fn retention(self, retention: Duration) -> IdempotencyLayer {
        self.with(|settings| settings.retention = Some(retention))
    }

    /// How long a request that finds its key in progress waits for the first one's response (0,
    /// the default: answer 409 at once).
    #[must_use]
    pub fn wait(self, wait: Duration) -> IdempotencyLayer {
        self.with(|settings| settings.wait = wait)
    }

    /// How long a coordinator call whose outcome is unknown is retried before the request gets
    /// 503 (2 s by default).
    #[must_use]
    pub fn retry_for(self, total: Duration) -> IdempotencyLayer {
        self.with(|settings| settings.retry_for = total)
    }

    /// The owner name this instance claims under (shown to others in the coordinator).
    #[must_use]
    pub fn owner(self, owner: impl Into<String>) -> IdempotencyLayer {
        self.with(|settings| settings.owner = Some(owner.into()))
    }

    /// The largest request body read (1 MiB by default); larger ones get 413.
    #[must_use]
    pub fn body_limit(self, bytes: usize) -> IdempotencyLayer {
        self.with(|settings| settings.body_limit = bytes)
    }

    /// The largest response stored, as the coordinator counts it (its `--max-response-bytes`,
    /// 1 MiB by default); larger ones are returned to their first caller and not stored.
    #[must_use]
    pub fn response_limit(self, bytes: usize) -> IdempotencyLayer {
        self.with(|settings| settings.response_limit = bytes)
    }

    /// A request header that enters the fingerprint (besides method, path, query, content-type
    /// and body).
    #[must_use]
    pub fn fingerprint_header(self, name: HeaderName) -> IdempotencyLayer {
        self.with(|settings| settings.fingerprint_headers.push(name))
    }

    /// A response header that is stored and replayed (besides content-type, content-encoding,
    /// content-language, location, link, etag and cache-control).
    #[must_use]
    pub fn store_header(self, name: HeaderName) -> IdempotencyLayer {
        self.with(|settings| settings.stored_headers.push(name))
    }

    /// Decides per response whether it is stored or the key released (see
    /// [`default_store_policy`]).
    #[must_use]
    pub fn store_policy(
        self,
        policy: impl Fn(StatusCode, &HeaderMap) -> StorePolicy + Send + Sync + 'static,
    ) -> IdempotencyLayer {
        self.with(|settings| settings.store_policy = Arc::new(policy))
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;

    fn layer(&self, inner: S) -> Idempotency<S> {
        Idempotency { inner, settings: Arc::clone(&self.settings) }
    }
}

/// The service [`IdempotencyLayer`] wraps around an inner one.
#[derive(Clone)]
pub struct Idempotency<S> {
    inner: S,
    settings: Arc<Settings>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Idempotency<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + From<Bytes> + Send + 'static,
    ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    ResBody: Body<Data = Bytes> + Unpin + Send + 'static,
    ResBody::Error: std::fmt::Display,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The clone that was polled ready serves this request (tower's rule for cloned services).
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        Box::pin(serve(Arc::clone(&self.settings), ready, request))
    }
}

async fn serve<S, ReqBody, ResBody>(
    settings: Arc<Settings>,
    mut inner: S,
    request: Request<ReqBody>,
) -> Result<Response<ResponseBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + From<Bytes> + Send + 'static,
    ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    ResBody: Body<Data = Bytes> + Unpin + Send + 'static,
    ResBody::Error: std::fmt::Display,
{
    let pass_through = |inner: &mut S, request| {
        let call = inner.call(request);
        async move { call.await.map(|response: Response<ResBody>| response.map(ResponseBody::Inner)) }
    };
    if !settings.methods.contains(request.method()) {
        return pass_through(&mut inner, request).await;
    }
    let key = match key_of(request.headers()) {
        Ok(key) => key,
        Err(KeyError::Missing) if !settings.key_required => return pass_through(&mut inner, request).await,
        Err(KeyError::Missing) => {
            return Ok(Problem::KeyMissing.response(&format!("{} requires an Idempotency-Key", request.method()), None));
        }
        Err(KeyError::Repeated) => {
            return Ok(Problem::KeyInvalid.response("Idempotency-Key was sent more than once", None));
        }
        Err(KeyError::Invalid(why)) => return Ok(Problem::KeyInvalid.response(why, None)),
    };
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, settings.body_limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => {
            let detail = format!("the body is over the limit of {} bytes; nothing was done", settings.body_limit);
            return Ok(Problem::BodyTooLarge.response(&detail, None));
        }
        Err(error) => {
            // The client went away or sent a broken body: nothing was claimed.
            return Ok(Problem::BodyUnreadable.response(&format!("the request body could not be read: {error}"), None));
        }
    };
    let scope = settings.scope.as_ref().and_then(|scope| scope(&parts));
    let fingerprint = fingerprint(&settings, &parts, &body);
    let mut idempotent = settings
        .client
        .idempotent(settings.namespace.clone(), stored_key(scope.as_deref(), &key))
        .fingerprint(fingerprint)
        .wait(settings.wait)
        .retry_for(settings.retry_for);
    if let Some(ttl) = settings.lease_ttl {
        idempotent = idempotent.lease_ttl(ttl);
    }
    if let Some(retention) = settings.retention {
        idempotent = idempotent.retention(retention);
    }
    if let Some(owner) = &settings.owner {
        idempotent = idempotent.owner(owner.clone());
    }

    // What the inner service answered (or the error it failed with): the first caller gets it,
    // whatever becomes of storing it.
    let first: FirstAnswer<ResBody, S::Error> = Arc::default();
    let answered = Arc::clone(&first);
    let work_settings = Arc::clone(&settings);
    // The run goes on in a task of its own, so that once the inner service has answered, the
    // answer is stored even if the client goes away meanwhile (a retry then gets the replay
    // instead of running the mutation again). Until then, the client going away (this future
    // dropped, and with it `_client_waits`) abandons the attempt: the lease lapses.
    let (_client_waits, client_gone) = tokio::sync::oneshot::channel::<()>();
    let parsed_key = IdempotencyKey(key.clone());
    let run = tokio::spawn(idempotent.run(move |lease: Lease| async move {
        let mut request = Request::from_parts(parts, ReqBody::from(body));
        request.extensions_mut().insert(lease);
        request.extensions_mut().insert(parsed_key);
        let called = inner.call(request);
        let response = tokio::select! {
            biased;
            response = called => response,
            _ = client_gone => return Err(Failure::abandon(Released("the client went away"))),
        };
        let response = match response {
            Ok(response) => response,
            Err(error) => {
                // No response, and no telling what the service did: the lease lapses.
                keep(&answered, Err(error));
                return Err(Failure::abandon(Released("the inner service failed")));
            }
        };
        let (head, body) = response.into_parts();
        match buffer(body, work_settings.response_limit).await {
            Buffered::Whole(bytes) => {
                let stored = stored_response(&work_settings, &head, &bytes);
                let policy = (work_settings.store_policy)(head.status, &head.headers);
                keep(&answered, Ok(Response::from_parts(head, ResponseBody::buffered(bytes))));
                match policy {
                    StorePolicy::Release => Err(Failure::retry(Released("released by the store policy"))),
                    StorePolicy::Store if encoded_size(&stored) <= work_settings.response_limit => Ok(stored),
                    StorePolicy::Store => Err(not_stored("the response is over the coordinator's limit")),
                }
            }
            Buffered::TooLarge { prefix, rest } => {
                keep(&answered, Ok(Response::from_parts(head, ResponseBody::Prefixed { prefix: Some(prefix), rest })));
                Err(not_stored("the response is over the coordinator's limit"))
            }
            Buffered::Broken(error) => {
                // The inner service acted, but its response broke off: what to replay is
                // unknown, so a problem is stored and returned.
                let problem = Problem::ResponseNotStored;
                let detail = format!("the response body failed: {error}");
                keep(&answered, Ok(problem.response(&detail, None)));
                Err(not_stored("the response body failed"))
            }
        }
    }));
    let result = match run.await {
        Ok(result) => result,
        // The inner service panicked: the panic goes on (the connection ends without an
        // answer), and nothing was released, so the lease lapses.
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(error) => {
            tracing::warn!(%error, key, "the idempotent run was cancelled");
            return Ok(Problem::Unavailable.response("the request was cancelled", Some(1)));
        }
    };

    if let Some(first) = first.lock().expect("no panic while the slot is held").take() {
        if let Err(error) = &result
            && !matches!(error, Error::Failed { .. })
        {
            tracing::warn!(%error, key, "the response was sent but its key could not be completed");
        }
        return first;
    }
    Ok(match result {
        Ok(outcome) => replay(outcome.response()),
        Err(Error::InProgress { retry_after, .. }) => {
            let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            Problem::InProgress.response("a request with this key is still being processed", Some(seconds))
        }
        Err(Error::Rejected(Reason::FingerprintMismatch, _)) => Problem::KeyReused.response(
            "this Idempotency-Key was first used with a different request; use a new key for a new request",
            None,
        ),
        Err(Error::Rejected(Reason::LeaseLost, _)) => {
            Problem::LeaseLost.response("another attempt took this request over; retry for its result", Some(1))
        }
        // The coordinator cannot take the call now (or failed inside): a retry may well work.
        Err(
            error @ (Error::Unavailable { .. }
            | Error::Connect(_)
            | Error::Transport(_)
            | Error::Rejected(
                Reason::StoreFull | Reason::NamespaceFull | Reason::Overloaded | Reason::Internal,
                _,
            )),
        ) => {
            tracing::warn!(%error, key, "the idempotency coordinator is unavailable; the request was not run");
            Problem::Unavailable
                .response("the idempotency service cannot take the request now; nothing was done", Some(1))
        }
        // Anything else is this service's own configuration (its credentials, its namespace, its
        // lease bounds): no retry will fix it, so it is not dressed up as an outage.
        Err(error) => {
            tracing::error!(%error, key, "the idempotency coordinator refused this service's request; check its configuration");
            Problem::Misconfigured
                .response("the idempotency service refused this API's request; nothing was done", None)
        }
    })
}

/// What the inner service answered the first request with, shared with the work given to `run`.
type FirstAnswer<B, E> = Arc<Mutex<Option<Result<Response<ResponseBody<B>>, E>>>>;

fn keep<T>(slot: &Mutex<Option<T>>, value: T) {
    *slot.lock().expect("no panic while the slot is held") = Some(value);
}

/// The reason a run released its key, for [`Failure`].
#[derive(Debug)]
struct Released(&'static str);

impl std::fmt::Display for Released {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Released {}

/// A final failure that stores the "response not stored" problem for replays.
fn not_stored(why: &'static str) -> Failure {
    let problem = Problem::ResponseNotStored;
    let detail = "the request was processed, but its response was too large to store and cannot be replayed";
    let stored = Stored::new(problem.body(detail))
        .metadata(STATUS, problem.status().as_u16().to_string())
        .metadata(header_entry(&header::CONTENT_TYPE), "application/problem+json");
    Failure::final_response(stored, Released(why))
}

/// Metadata names: the status, and `header:<name>` for each stored header (several values of one
/// header joined by a newline, which no header value can hold).
const STATUS: &str = "status";
const HEADER_PREFIX: &str = "header:";

fn header_entry(name: &HeaderName) -> String {
    format!("{HEADER_PREFIX}{name}")
}

fn stored_response(settings: &Settings, head: &http::response::Parts, body: &Bytes) -> Stored {
    let mut stored = Stored::new(body.clone()).metadata(STATUS, head.status.as_u16().to_string());
    for name in &settings.stored_headers {
        let values: Vec<&str> = head.headers.get_all(name).iter().filter_map(|value| value.to_str().ok()).collect();
        if !values.is_empty() {
            stored = stored.metadata(header_entry(name), values.join("\n"));
        }
    }
    stored
}

fn encoded_size(stored: &Stored) -> usize {
    prost::Message::encoded_len(&stored.clone().into_pb())
}

/// The stored response, rebuilt, with `Idempotent-Replayed: true`.
fn replay<B>(stored: &Stored) -> Response<ResponseBody<B>> {
    let mut response = Response::new(ResponseBody::buffered(stored.body.clone()));
    *response.status_mut() =
        stored.get(STATUS).and_then(|status| status.parse().ok()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (name, values) in &stored.metadata {
        let Some(name) = name.strip_prefix(HEADER_PREFIX).and_then(|name| HeaderName::try_from(name).ok()) else {
            continue;
        };
        for value in values.split('\n').filter_map(|value| HeaderValue::from_str(value).ok()) {
            response.headers_mut().append(name.clone(), value);
        }
    }
    response.headers_mut().insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    response
}

enum Buffered<B, E> {
    Whole(Bytes),
    TooLarge { prefix: Bytes, rest: B },
    Broken(E),
}

/// Reads `body` into memory up to `limit` bytes; past it, hands back what was read and the rest.
async fn buffer<B: Body<Data = Bytes> + Unpin>(mut body: B, limit: usize) -> Buffered<B, B::Error> {
    let mut read = BytesMut::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    read.extend_from_slice(&data);
                    if read.len() > limit {
                        return Buffered::TooLarge { prefix: read.freeze(), rest: body };
                    }
                }
            }
            Err(error) => return Buffered::Broken(error),
        }
    }
    Buffered::Whole(read.freeze())
}

/// SHA-256 over the method, the path and query, `content-type`, the configured headers and the
/// body, each length-prefixed so that no two requests share their input.
fn fingerprint(settings: &Settings, parts: &Parts, body: &Bytes) -> Vec<u8> {
    let mut digest = Sha256::new();
    let mut field = |bytes: &[u8]| {
        digest.update((bytes.len() as u64).to_be_bytes());
        digest.update(bytes);
    };
    field(parts.method.as_str().as_bytes());
    field(parts.uri.path_and_query().map_or("/", |pq| pq.as_str()).as_bytes());
    for name in std::iter::once(&header::CONTENT_TYPE).chain(&settings.fingerprint_headers) {
        field(name.as_str().as_bytes());
        for value in parts.headers.get_all(name) {
            field(value.as_bytes());
        }
    }
    field(body);
    digest.finalize().to_vec()
}
