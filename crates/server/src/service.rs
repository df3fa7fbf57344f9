//! The gRPC adapter: protobuf in, validated domain values to the coordinator, protobuf out, and
//! the one mapping from errors to statuses with `google.rpc.ErrorInfo`. Only this module and
//! `pb` see generated types.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use idempotency_core::coordinator::{Coordinator, Error};
use idempotency_core::domain::{
    ApiResponse, Claim, ClaimOutcome, Complete, Fingerprint, InvalidInput, Key, KeyState, LeaseToken, Limits,
    Namespace, Owner, Rejection, Release, Renew, RequestId, Timestamp,
};
use idempotency_core::store::{ErrorChain, Store, StoreError};
use idempotency_proto::{Reason, pb};

use crate::auth::{Authorizer, Credentials, Denial, Role};
use crate::listener::ConnectionInfo;
use crate::metrics::{CallMetrics, ClaimMetric};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Request, Status};
use tracing::Instrument;

/// The `idempotency.v1.Coordinator` service over a [`Coordinator`].
pub struct CoordinatorService<S> {
    coordinator: Arc<Coordinator<S>>,
    guard: Guard,
    metrics: Arc<CallMetrics>,
}

impl<S> CoordinatorService<S> {
    /// Serves `coordinator`, admitting calls through `guard` and counting them into `metrics`.
    pub fn new(coordinator: Arc<Coordinator<S>>, guard: Guard, metrics: Arc<CallMetrics>) -> Self {
        CoordinatorService { coordinator, guard, metrics }
    }

    /// The status of a refused call of `method`, counted by its reason (and, for a Claim, by
    /// its outcome in `namespace`).
    fn refused(&self, method: &'static str, namespace: &str, error: CallError) -> Status {
        let (reason, status) = reasoned_status(error);
        self.metrics.refusal(method, reason);
        if let Some(outcome) = ClaimMetric::of_refusal(reason).filter(|_| method == "Claim") {
            self.metrics.claim(namespace, outcome);
        }
        status
    }
}

/// How long a caller refused as OVERLOADED is told to wait before trying again.
const OVERLOADED_RETRY_AFTER: Duration = Duration::from_millis(100);

/// What every call passes before it reaches the coordinator: admission (`--max-in-flight`) and
/// the auth file's rules (none: every caller may do anything).
#[derive(Clone)]
pub struct Guard {
    auth: Option<Arc<Authorizer>>,
    in_flight: Arc<Semaphore>,
}

/// The credentials a call came with, taken off the request before its message is consumed.
pub(crate) struct CallCredentials {
    authorization: Option<Vec<u8>>,
    certificate: Option<Vec<u8>>,
}

impl CallCredentials {
    pub(crate) fn of<T>(request: &Request<T>) -> CallCredentials {
        CallCredentials {
            authorization: request.metadata().get("authorization").map(|value| value.as_bytes().to_vec()),
            certificate: request
                .extensions()
                .get::<ConnectionInfo>()
                .and_then(|info| info.peer_certificates.as_ref())
                .and_then(|chain| chain.first())
                .map(|leaf| leaf.as_ref().to_vec()),
        }
    }

    fn as_credentials(&self) -> Credentials<'_> {
        Credentials { authorization: self.authorization.as_deref(), certificate: self.certificate.as_deref() }
    }
}

impl Guard {
    /// A guard with the auth file's rules (if any) and room for `max_in_flight` calls.
    pub fn new(auth: Option<Arc<Authorizer>>, max_in_flight: usize) -> Guard {
        Guard { auth, in_flight: Arc::new(Semaphore::new(max_in_flight)) }
    }

    /// A place among the calls in flight, or OVERLOADED at once.
    pub(crate) fn admit(&self) -> Result<OwnedSemaphorePermit, CallError> {
        Arc::clone(&self.in_flight).try_acquire_owned().map_err(|_| CallError::Overloaded)
    }

    /// Whether the credentials may make a call needing `role` in the raw `namespace`: unknown
    /// credentials are refused before the request is looked at, then the namespace is validated
    /// and judged. The caller's name, when there are rules.
    pub(crate) fn authorize(
        &self,
        credentials: &CallCredentials,
        namespace: &str,
        role: Role,
    ) -> Result<Option<String>, CallError> {
        let Some(auth) = &self.auth else { return Ok(None) };
        let rules = auth.rules();
        let credentials = credentials.as_credentials();
        rules.authenticate(&credentials).map_err(CallError::Denied)?;
        let namespace = Namespace::parse(namespace)?;
        rules.authorize(&credentials, &namespace, role).map(Some).map_err(CallError::Denied)
    }

    /// Whether the credentials may make a call needing `role` over every namespace (see
    /// [`Rules::authorize_all`](crate::auth::Rules::authorize_all)).
    pub(crate) fn authorize_all(&self, credentials: &CallCredentials, role: Role) -> Result<Option<String>, CallError> {
        let Some(auth) = &self.auth else { return Ok(None) };
        auth.rules().authorize_all(&credentials.as_credentials(), role).map(Some).map_err(CallError::Denied)
    }

    /// Whether the credentials belong to anyone the auth file knows (any, without one).
    pub(crate) fn authenticate(&self, credentials: &CallCredentials) -> Result<(), CallError> {
        let Some(auth) = &self.auth else { return Ok(()) };
        auth.rules().authenticate(&credentials.as_credentials()).map(drop).map_err(CallError::Denied)
    }

    /// The check reflection calls pass: any known credentials when `required`, none otherwise.
    pub fn reflection_check(&self, required: bool) -> impl tonic::service::Interceptor + Clone + use<> {
        let auth = self.auth.clone().filter(|_| required);
        move |request: Request<()>| {
            if let Some(auth) = &auth {
                let credentials = CallCredentials::of(&request);
                auth.rules()
                    .authenticate(&credentials.as_credentials())
                    .map_err(|denial| status_of(CallError::Denied(denial)))?;
            }
            Ok(request)
        }
    }
}

/// Why a call did not succeed: refused before the coordinator, or by it.
#[derive(Debug)]
pub enum CallError {
    /// The coordinator's answer.
    Coordinator(Error),
    /// The auth file's rules refused the call.
    Denied(Denial),
    /// `--max-in-flight` calls are being served.
    Overloaded,
    /// `Admin.List`: a page token that List did not return for this listing.
    InvalidPageToken,
    /// `Admin.List`: a state that is not one of the contract's.
    InvalidState,
    /// `Admin.Import`: the stream is not a whole snapshot.
    InvalidSnapshot(String),
}

impl From<Error> for CallError {
    fn from(error: Error) -> Self {
        CallError::Coordinator(error)
    }
}

impl From<InvalidInput> for CallError {
    fn from(error: InvalidInput) -> Self {
        CallError::Coordinator(Error::Invalid(error))
    }
}

#[tonic::async_trait]
impl<S: Store> pb::coordinator_server::Coordinator for CoordinatorService<S> {
    async fn claim(&self, request: Request<pb::ClaimRequest>) -> Result<tonic::Response<pb::ClaimResponse>, Status> {
        // Read first: the deadline counts from the call's arrival.
        let deadline = grpc_timeout(&request);
        let _in_flight = self.guard.admit().map_err(|error| self.refused("Claim", "", error))?;
        let credentials = CallCredentials::of(&request);
        let request = request.into_inner();
        // Kept for counting a refused Claim in its namespace after the request is consumed.
        let namespace = request.namespace.clone();
        let span = tracing::debug_span!("claim", namespace = %request.namespace, key = %request.key, outcome = tracing::field::Empty, caller = tracing::field::Empty);
        async move {
            let caller = self.guard.authorize(&credentials, &request.namespace, Role::Write)?;
            if let Some(caller) = &caller {
                tracing::Span::current().record("caller", caller.as_str());
            }
            let (namespace, key) = address(&request.namespace, &request.key)?;
            let limits = self.coordinator.limits();
            let lease_ttl = limits.lease_ttl(duration(request.lease_ttl, lease_ttl_error(limits))?)?;
            let retention =
                limits.retention(duration(request.retention, retention_error(limits))?, limits.default_retention)?;
            let wait = limits.wait(duration(request.wait, InvalidInput::Wait { max: limits.max_wait })?)?;
            let claim = Claim {
                fingerprint: Fingerprint::parse(&request.fingerprint)?,
                lease_ttl,
                retention,
                request_id: RequestId::parse_optional(&request.request_id)?,
                owner: Owner::parse(&request.owner)?,
                new_lease_token: LeaseToken::generate(),
            };
            let outcome = self.coordinator.claim(&namespace, &key, &claim, wait, answer_by(deadline)).await?;
            let (name, outcome) = match outcome {
                ClaimOutcome::Acquired(grant) => (
                    if grant.takeover { ClaimMetric::Takeover } else { ClaimMetric::Acquired },
                    pb::claim_response::Outcome::Acquired(pb::Acquired {
                        lease_token: grant.lease_token.to_text(),
                        fencing_token: grant.fencing_token.0,
                        lease_expires_at: Some(timestamp(grant.lease_expires_at)),
                        attempt: grant.attempt,
                        takeover: grant.takeover,
                    }),
                ),
                ClaimOutcome::InProgress { lease_expires_at, attempt, owner, retry_after } => (
                    ClaimMetric::InProgress,
                    pb::claim_response::Outcome::InProgress(pb::InProgress {
                        lease_expires_at: Some(timestamp(lease_expires_at)),
                        attempt,
                        owner: owner.as_str().to_owned(),
                        retry_after: Some(pb_duration(retry_after)),
                    }),
                ),
                ClaimOutcome::Completed(stored) => (
                    ClaimMetric::Replayed,
                    pb::claim_response::Outcome::Completed(pb::Completed {
                        response: Some(pb_response(stored.response)),
                        completed_at: Some(timestamp(stored.completed_at)),
                        expires_at: Some(timestamp(stored.expires_at)),
                        fencing_token: stored.fencing_token.0,
                    }),
                ),
            };
            tracing::Span::current().record("outcome", name.label());
            self.metrics.claim(&request.namespace, name);
            tracing::debug!("answered");
            Ok::<_, CallError>(tonic::Response::new(pb::ClaimResponse { outcome: Some(outcome) }))
        }
        .instrument(span)
        .await
        .map_err(|error| self.refused("Claim", &namespace, error))
        .inspect_err(log_status)
    }

    async fn complete(
        &self,
        request: Request<pb::CompleteRequest>,
    ) -> Result<tonic::Response<pb::CompleteResponse>, Status> {
        let deadline = grpc_timeout(&request);
        let _in_flight = self.guard.admit().map_err(|error| self.refused("Complete", "", error))?;
        let credentials = CallCredentials::of(&request);
        let request = request.into_inner();
        let span = tracing::debug_span!("complete", namespace = %request.namespace, key = %request.key, outcome = tracing::field::Empty, caller = tracing::field::Empty);
        async move {
            let caller = self.guard.authorize(&credentials, &request.namespace, Role::Write)?;
            if let Some(caller) = &caller {
                tracing::Span::current().record("caller", caller.as_str());
            }
            let (namespace, key) = address(&request.namespace, &request.key)?;
            let limits = self.coordinator.limits();
            let lease_token = LeaseToken::parse(&request.lease_token)?;
            let retention = duration(request.retention, retention_error(limits))?
                .map(|retention| limits.retention(Some(retention), retention))
                .transpose()?;
            let response = limits.response(domain_response(request.response.unwrap_or_default()))?;
            let outcome = self
                .coordinator
                .complete(&namespace, &key, Complete { lease_token, response, retention }, answer_by(deadline))
                .await?;
            tracing::Span::current()
                .record("outcome", if outcome.already_completed { "already_completed" } else { "completed" });
            self.metrics.completion(outcome.already_completed);
            tracing::debug!("answered");
            Ok::<_, CallError>(tonic::Response::new(pb::CompleteResponse {
                completed_at: Some(timestamp(outcome.completed_at)),
                expires_at: Some(timestamp(outcome.expires_at)),
                fencing_token: outcome.fencing_token.0,
                already_completed: outcome.already_completed,
            }))
        }
        .instrument(span)
        .await
        .map_err(|error| self.refused("Complete", "", error))
        .inspect_err(log_status)
    }

    async fn renew(&self, request: Request<pb::RenewRequest>) -> Result<tonic::Response<pb::RenewResponse>, Status> {
        let deadline = grpc_timeout(&request);
        let _in_flight = self.guard.admit().map_err(|error| self.refused("Renew", "", error))?;
        let credentials = CallCredentials::of(&request);
        let request = request.into_inner();
        let span = tracing::debug_span!("renew", namespace = %request.namespace, key = %request.key, outcome = tracing::field::Empty, caller = tracing::field::Empty);
        async move {
            let caller = self.guard.authorize(&credentials, &request.namespace, Role::Write)?;
            if let Some(caller) = &caller {
                tracing::Span::current().record("caller", caller.as_str());
            }
            let (namespace, key) = address(&request.namespace, &request.key)?;
            let limits = self.coordinator.limits();
            let lease_token = LeaseToken::parse(&request.lease_token)?;
            let lease_ttl = limits.lease_ttl(duration(request.lease_ttl, lease_ttl_error(limits))?)?;
            let outcome = self
                .coordinator
                .renew(&namespace, &key, &Renew { lease_token, lease_ttl }, answer_by(deadline))
                .await?;
            tracing::Span::current().record("outcome", "renewed");
            self.metrics.renewal();
            tracing::debug!("answered");
            Ok::<_, CallError>(tonic::Response::new(pb::RenewResponse {
                lease_expires_at: Some(timestamp(outcome.lease_expires_at)),
                fencing_token: outcome.fencing_token.0,
            }))
        }
        .instrument(span)
        .await
        .map_err(|error| self.refused("Renew", "", error))
        .inspect_err(log_status)
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<tonic::Response<pb::ReleaseResponse>, Status> {
        let deadline = grpc_timeout(&request);
        let _in_flight = self.guard.admit().map_err(|error| self.refused("Release", "", error))?;
        let credentials = CallCredentials::of(&request);
        let request = request.into_inner();
        let span = tracing::debug_span!("release", namespace = %request.namespace, key = %request.key, outcome = tracing::field::Empty, caller = tracing::field::Empty);
        async move {
            let caller = self.guard.authorize(&credentials, &request.namespace, Role::Write)?;
            if let Some(caller) = &caller {
                tracing::Span::current().record("caller", caller.as_str());
            }
            let (namespace, key) = address(&request.namespace, &request.key)?;
            let lease_token = LeaseToken::parse(&request.lease_token)?;
            self.coordinator.release(&namespace, &key, &Release { lease_token }, answer_by(deadline)).await?;
            tracing::Span::current().record("outcome", "released");
            self.metrics.release();
            tracing::debug!("answered");
            Ok::<_, CallError>(tonic::Response::new(pb::ReleaseResponse {}))
        }
        .instrument(span)
        .await
        .map_err(|error| self.refused("Release", "", error))
        .inspect_err(log_status)
    }

    async fn lookup(&self, request: Request<pb::LookupRequest>) -> Result<tonic::Response<pb::LookupResponse>, Status> {
        let deadline = grpc_timeout(&request);
        let _in_flight = self.guard.admit().map_err(|error| self.refused("Lookup", "", error))?;
        let credentials = CallCredentials::of(&request);
        let request = request.into_inner();
        let span = tracing::debug_span!("lookup", namespace = %request.namespace, key = %request.key, outcome = tracing::field::Empty, caller = tracing::field::Empty);
        async move {
            let caller = self.guard.authorize(&credentials, &request.namespace, Role::Read)?;
            if let Some(caller) = &caller {
                tracing::Span::current().record("caller", caller.as_str());
            }
            let (namespace, key) = address(&request.namespace, &request.key)?;
            let view = self.coordinator.lookup(&namespace, &key, answer_by(deadline)).await?;
            let state = key_state(view.state);
            tracing::Span::current().record("outcome", state.as_str_name());
            tracing::debug!("answered");
            let (response, completed_at) = match view.completed {
                Some((response, at)) => (Some(pb_response(response)), Some(timestamp(at))),
                None => (None, None),
            };
            Ok::<_, CallError>(tonic::Response::new(pb::LookupResponse {
                state: state.into(),
                fingerprint: view.fingerprint.as_bytes().to_vec(),
                fencing_token: view.fencing_token.0,
                attempt: view.attempt,
                owner: view.owner.as_str().to_owned(),
                lease_expires_at: view.lease_expires_at.map(timestamp),
                response,
                completed_at,
                expires_at: Some(timestamp(view.expires_at)),
            }))
        }
        .instrument(span)
        .await
        .map_err(|error| self.refused("Lookup", "", error))
        .inspect_err(log_status)
    }
}

fn log_status(status: &Status) {
    tracing::debug!(code = ?status.code(), "call refused");
}

fn address(namespace: &str, key: &str) -> Result<(Namespace, Key), InvalidInput> {
    Ok((Namespace::parse(namespace)?, Key::parse(key)?))
}

fn lease_ttl_error(limits: &Limits) -> InvalidInput {
    InvalidInput::LeaseTtl { min: limits.min_lease_ttl, max: limits.max_lease_ttl }
}

fn retention_error(limits: &Limits) -> InvalidInput {
    InvalidInput::Retention { min: limits.min_retention, max: limits.max_retention }
}

/// An optional protobuf duration: `None` when unset, `invalid` when negative or malformed.
fn duration(value: Option<prost_types::Duration>, invalid: InvalidInput) -> Result<Option<Duration>, InvalidInput> {
    let Some(value) = value else { return Ok(None) };
    let seconds = u64::try_from(value.seconds).map_err(|_| invalid.clone())?;
    let nanos = u32::try_from(value.nanos).ok().filter(|n| *n < 1_000_000_000).ok_or(invalid)?;
    Ok(Some(Duration::new(seconds, nanos)))
}

fn pb_duration(value: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(value.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(value.subsec_nanos()).unwrap_or(0),
    }
}

/// A key's state as the protocol names it.
pub(crate) fn key_state(state: KeyState) -> pb::KeyState {
    match state {
        KeyState::InProgress => pb::KeyState::InProgress,
        KeyState::LeaseExpired => pb::KeyState::LeaseExpired,
        KeyState::Released => pb::KeyState::Released,
        KeyState::Completed => pb::KeyState::Completed,
    }
}

pub(crate) fn timestamp(value: Timestamp) -> prost_types::Timestamp {
    let millis = value.unix_millis();
    prost_types::Timestamp {
        seconds: millis.div_euclid(1000),
        nanos: i32::try_from(millis.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

fn domain_response(response: pb::Response) -> ApiResponse {
    ApiResponse { body: response.body, metadata: response.metadata.into_iter().collect() }
}

fn pb_response(response: ApiResponse) -> pb::Response {
    pb::Response { body: response.body, metadata: response.metadata.into_iter().collect() }
}

/// The call's deadline from its `grpc-timeout` header, if any. The gRPC spec allows at most
/// eight digits and one of the units `H M S m u n`; any other value is treated as no deadline
/// (the client's own timer still ends the call on its side).
fn grpc_timeout<T>(request: &Request<T>) -> Option<Duration> {
    parse_grpc_timeout(request.metadata().get("grpc-timeout")?.to_str().ok()?)
}

fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// When a call that arrived now with `deadline` must be answered: a little before the deadline,
/// so that a waiting Claim answers `in_progress` and a call held up by a slow store answers
/// UNAVAILABLE, instead of the call failing with DEADLINE_EXCEEDED or CANCELLED.
fn answer_by(deadline: Option<Duration>) -> Option<tokio::time::Instant> {
    deadline.and_then(|deadline| tokio::time::Instant::now().checked_add(answer_within(deadline)))
}

/// How long a call may take within its `deadline`, leaving time for the answer to travel.
fn answer_within(deadline: Duration) -> Duration {
    let margin = (deadline / 10).clamp(Duration::from_millis(20), Duration::from_millis(500));
    deadline.saturating_sub(margin)
}

/// Admits one log line per second and counts the ones it held back in between.
struct LogRate {
    last_second: AtomicU64,
    suppressed: AtomicU64,
}

impl LogRate {
    const fn new() -> Self {
        LogRate { last_second: AtomicU64::new(0), suppressed: AtomicU64::new(0) }
    }

    /// `Some(held back since the last admitted line)` if a line may be logged in `second`.
    fn admit(&self, second: u64) -> Option<u64> {
        let last = self.last_second.load(Ordering::Relaxed);
        if second > last
            && self.last_second.compare_exchange(last, second, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

static UNAVAILABLE_LOG: LogRate = LogRate::new();

fn unix_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |since| since.as_secs())
}

/// The one mapping from errors to statuses: every error has its reason, and every reason its code
/// ([`Reason::code`]).
pub fn status_of(error: CallError) -> Status {
    reasoned_status(error).1
}

/// [`status_of`], with the reason the status carries (for the metrics).
fn reasoned_status(error: CallError) -> (Reason, Status) {
    let error = match error {
        CallError::Coordinator(error) => error,
        CallError::Overloaded => {
            let status = Reason::Overloaded.status_with_retry(
                "the server is serving as many calls as it may; retry shortly",
                HashMap::new(),
                OVERLOADED_RETRY_AFTER,
            );
            return (Reason::Overloaded, status);
        }
        CallError::InvalidPageToken => {
            let reason = Reason::InvalidPageToken;
            let metadata = HashMap::from([("field".to_owned(), "page_token".to_owned())]);
            return (reason, reason.status("the page token is not one List returned for this listing", metadata));
        }
        CallError::InvalidState => {
            let reason = Reason::InvalidMessage;
            let metadata = HashMap::from([("field".to_owned(), "state".to_owned())]);
            return (reason, reason.status("state is not a KeyState of the contract", metadata));
        }
        CallError::InvalidSnapshot(why) => {
            let reason = Reason::InvalidSnapshot;
            return (reason, reason.status(format!("nothing was imported: {why}"), HashMap::new()));
        }
        CallError::Denied(denial) => {
            let (reason, message) = match denial {
                Denial::Unauthenticated => {
                    (Reason::Unauthenticated, "send a bearer token or a client certificate the server knows")
                }
                Denial::NamespaceNotAllowed => {
                    (Reason::NamespaceNotAllowed, "the credentials do not allow this namespace")
                }
                Denial::RoleNotAllowed => (Reason::RoleNotAllowed, "the credentials' role does not allow this call"),
            };
            return (reason, reason.status(message, HashMap::new()));
        }
    };
    let reason = match &error {
        Error::Invalid(invalid) => invalid_reason(invalid),
        Error::Store(StoreError::Rejected(Rejection::FingerprintMismatch)) => Reason::FingerprintMismatch,
        Error::Store(StoreError::Rejected(Rejection::AlreadyCompleted)) => Reason::AlreadyCompleted,
        Error::Store(StoreError::Rejected(Rejection::LeaseLost)) => Reason::LeaseLost,
        Error::Store(StoreError::Rejected(Rejection::NotFound)) => Reason::KeyNotFound,
        Error::Store(StoreError::Full { .. }) => Reason::StoreFull,
        Error::Store(StoreError::NamespaceFull { .. }) => Reason::NamespaceFull,
        Error::Store(StoreError::Unavailable { .. }) => {
            // During an outage every call fails; the store logs the outage itself, so calls
            // log one line per second, with how many similar failures it stands for.
            match UNAVAILABLE_LOG.admit(unix_seconds()) {
                Some(suppressed) => tracing::warn!(error = %ErrorChain(&error), suppressed, "storage unavailable"),
                None => tracing::debug!(error = %ErrorChain(&error), "storage unavailable"),
            }
            Reason::StoreUnavailable
        }
        Error::Store(StoreError::Corrupt(_)) => {
            tracing::error!(error = %ErrorChain(&error), "internal error");
            Reason::Internal
        }
        Error::ShuttingDown => Reason::ShuttingDown,
    };
    let mut metadata = HashMap::new();
    if let Error::Invalid(invalid) = &error {
        metadata.insert("field".to_owned(), invalid.field().to_owned());
        if let Some(limit) = invalid_limit(invalid) {
            metadata.insert("limit".to_owned(), limit);
        }
    }
    if let Error::Store(StoreError::Full { max_records } | StoreError::NamespaceFull { max_records }) = &error {
        metadata.insert("limit".to_owned(), max_records.to_string());
    }
    // Details of faults stay in the log; causes of an outage too.
    let message = match &error {
        Error::Store(StoreError::Corrupt(_)) => "internal error".to_owned(),
        Error::Store(StoreError::Unavailable { .. }) => "storage unavailable".to_owned(),
        _ => error.to_string(),
    };
    (reason, reason.status(message, metadata))
}

fn invalid_reason(invalid: &InvalidInput) -> Reason {
    match invalid {
        InvalidInput::Namespace => Reason::InvalidNamespace,
        InvalidInput::Key => Reason::InvalidKey,
        InvalidInput::Fingerprint { .. } => Reason::InvalidFingerprint,
        InvalidInput::LeaseTtl { .. } => Reason::InvalidLeaseTtl,
        InvalidInput::Retention { .. } => Reason::InvalidRetention,
        InvalidInput::Wait { .. } => Reason::InvalidWait,
        InvalidInput::LeaseToken => Reason::InvalidLeaseToken,
        InvalidInput::RequestId { .. } => Reason::InvalidRequestId,
        InvalidInput::Owner { .. } => Reason::InvalidOwner,
        InvalidInput::ResponseTooLarge { .. } => Reason::ResponseTooLarge,
    }
}

fn invalid_limit(invalid: &InvalidInput) -> Option<String> {
    match invalid {
        InvalidInput::Namespace => Some(Namespace::MAX_BYTES.to_string()),
        InvalidInput::Key => Some(Key::MAX_BYTES.to_string()),
        InvalidInput::Fingerprint { max } | InvalidInput::RequestId { max } | InvalidInput::Owner { max } => {
            Some(max.to_string())
        }
        InvalidInput::LeaseTtl { min, max } | InvalidInput::Retention { min, max } => {
            Some(format!("{}..{}", humantime::format_duration(*min), humantime::format_duration(*max)))
        }
        InvalidInput::Wait { max } => Some(humantime::format_duration(*max).to_string()),
        InvalidInput::ResponseTooLarge { max, .. } => Some(max.to_string()),
        InvalidInput::LeaseToken => None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn unavailable_calls_log_once_a_second_with_a_count_of_the_rest() {
        let rate = super::LogRate::new();
        assert_eq!(rate.admit(100), Some(0));
        assert_eq!(rate.admit(100), None);
        assert_eq!(rate.admit(100), None);
        assert_eq!(rate.admit(101), Some(2));
        assert_eq!(rate.admit(99), None, "a clock stepped back logs nothing new");
        assert_eq!(rate.admit(102), Some(1));
    }

    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        let with = |value: &str| {
            let mut request = Request::new(());
            request.metadata_mut().insert("grpc-timeout", value.parse().unwrap());
            grpc_timeout(&request)
        };
        assert_eq!(with("5S"), Some(Duration::from_secs(5)));
        assert_eq!(with("250m"), Some(Duration::from_millis(250)));
        assert_eq!(with("2M"), Some(Duration::from_secs(120)));
        assert_eq!(with("x"), None);
        assert_eq!(with("99999999H"), Some(Duration::from_secs(99_999_999 * 3600)));
        // The spec allows eight digits at most; longer values are no deadline, never a panic.
        assert_eq!(with("9223372036854775807S"), None);
        assert_eq!(with("18446744073709551615S"), None);
        assert_eq!(with("123456789m"), None);
        assert_eq!(with("+5S"), None);
        assert_eq!(with("S"), None);
        assert_eq!(with("5s"), None);
        assert_eq!(grpc_timeout(&Request::new(())), None);
    }

    #[test]
    fn waits_end_before_the_deadline() {
        let second = Duration::from_secs(1);
        assert_eq!(answer_within(2 * second), Duration::from_millis(1800));
        assert_eq!(answer_within(60 * second), Duration::from_millis(59_500));
        assert_eq!(answer_within(Duration::from_millis(100)), Duration::from_millis(80));
        assert_eq!(answer_within(Duration::from_millis(10)), Duration::ZERO);
    }

    #[test]
    fn durations_and_timestamps_convert() {
        let invalid = InvalidInput::Wait { max: Duration::from_secs(60) };
        assert_eq!(duration(None, invalid.clone()), Ok(None));
        let half = prost_types::Duration { seconds: 0, nanos: 500_000_000 };
        assert_eq!(duration(Some(half), invalid.clone()), Ok(Some(Duration::from_millis(500))));
        let negative = prost_types::Duration { seconds: -1, nanos: 0 };
        assert_eq!(duration(Some(negative), invalid.clone()), Err(invalid.clone()));
        let bad_nanos = prost_types::Duration { seconds: 1, nanos: -5 };
        assert_eq!(duration(Some(bad_nanos), invalid.clone()), Err(invalid));
        let t = timestamp(Timestamp::from_unix_millis(1_700_000_000_123));
        assert_eq!((t.seconds, t.nanos), (1_700_000_000, 123_000_000));
    }
}
