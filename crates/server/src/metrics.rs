//! Prometheus metrics: what the server counts and the endpoint (`--metrics-listen`) that serves
//! them in the OpenMetrics text format, with the `prometheus-client` crate.
//!
//! Three sources:
//! - [`GrpcMetricsLayer`], a tower layer around every gRPC service, counts calls with the names
//!   of go-grpc-prometheus (`grpc_server_started_total`, `grpc_server_handled_total`,
//!   `grpc_server_handling_seconds`), so that existing gRPC dashboards work.
//! - [`CallMetrics`], counted by the coordinator service: Claims by outcome, refusals by RPC
//!   and reason (`LEASE_LOST`, …), completions, renewals, releases, and Claims per namespace for
//!   the namespaces the auth file lists in a `[[namespace]]` section.
//! - A collector that reads, at each scrape, what the coordinator, the store, the sweeper and
//!   the process counted themselves (atomics: no scan, no lock held by calls).
//!
//! Invariants: no label holds a key, a token, a caller-chosen namespace outside the auth file,
//! or a method path outside the served services, so every label's values are bounded; counting
//! on the call path is a few atomic increments and never blocks.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use idempotency_core::Coordinator;
use idempotency_core::domain::Namespace;
use idempotency_core::stats::HistogramSnapshot;
use idempotency_core::store::Store;
use idempotency_proto::Reason;

use crate::sweeper::SweeperStats;

/// The bounds of `grpc_server_handling_seconds`: 100 µs to 10 s (go-grpc-prometheus's default
/// buckets start at 5 ms, above most of this server's calls).
const HANDLING_SECONDS_BOUNDS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Every metric the server exports, in one registry.
pub struct Metrics {
    registry: Registry,
    grpc: Arc<GrpcMetrics>,
    calls: Arc<CallMetrics>,
    census: Arc<RecordsCensus>,
}

/// Records by state, as the last background count found them (see [`count_records`]).
#[derive(Debug, Default)]
pub struct RecordsCensus {
    /// In progress, lease expired, released, completed, expired (not swept); and when counted.
    last: RwLock<Option<([u64; 5], std::time::SystemTime)>>,
}

const CENSUS_STATES: [&str; 5] = ["in_progress", "lease_expired", "released", "completed", "expired"];

/// Recounts the store's records by state every `interval` (the Admin API's census: a read of
/// every record, off the scrape path), until `stop`.
pub async fn count_records<S: idempotency_core::admin::Maintenance>(
    coordinator: Arc<Coordinator<S>>,
    census: Arc<RecordsCensus>,
    interval: Duration,
    stop: CancellationToken,
) {
    loop {
        match coordinator.store().census(None, coordinator.now()).await {
            Ok(counted) => {
                let mut totals = [0u64; 5];
                for counts in counted.values() {
                    let each =
                        [counts.in_progress, counts.lease_expired, counts.released, counts.completed, counts.expired];
                    for (total, count) in totals.iter_mut().zip(each) {
                        *total += count;
                    }
                }
                *census.last.write() = Some((totals, std::time::SystemTime::now()));
            }
            Err(error) => tracing::debug!(%error, "counting records by state failed; the gauge keeps its last count"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

impl Metrics {
    /// Registers the gRPC and call metrics, and a collector reading the coordinator, its store,
    /// the sweeper and the process at each scrape.
    pub fn new<S: Store>(coordinator: Arc<Coordinator<S>>, sweeper: Arc<SweeperStats>) -> Metrics {
        let mut registry = Registry::default();
        let grpc = Arc::new(GrpcMetrics::default());
        registry.register("grpc_server_started", "RPCs started on the server", grpc.started.clone());
        registry.register(
            "grpc_server_handled",
            "RPCs completed on the server, whatever their status",
            grpc.handled.clone(),
        );
        registry.register(
            "grpc_server_handling_seconds",
            "Time from an RPC's arrival until its response headers (for unary RPCs: until it was answered)",
            grpc.handling.clone(),
        );
        let calls = Arc::new(CallMetrics::default());
        registry.register(
            "idempotency_claims",
            "Claims answered, by outcome (a Claim refused with FINGERPRINT_MISMATCH, STORE_FULL or NAMESPACE_FULL counts here too)",
            calls.claims.clone(),
        );
        registry.register(
            "idempotency_namespace_claims",
            "Claims answered, by outcome, for the namespaces the auth file lists in a [[namespace]] section",
            calls.namespace_claims.clone(),
        );
        registry.register(
            "idempotency_refusals",
            "Calls refused by the coordinator or its guard, by RPC and google.rpc.ErrorInfo reason",
            calls.refusals.clone(),
        );
        registry.register(
            "idempotency_completions",
            "Completes that stored a response (completed) or found it stored by the same lease (already_completed)",
            calls.completions.clone(),
        );
        registry.register("idempotency_renewals", "Leases renewed", calls.renewals.clone());
        registry.register("idempotency_releases", "Keys released by their holder", calls.releases.clone());
        let census = Arc::new(RecordsCensus::default());
        registry.register_collector(Box::new(StateCollector { coordinator, sweeper, census: Arc::clone(&census) }));
        Metrics { registry, grpc, calls, census }
    }

    /// Where [`count_records`] keeps its count for the gauge.
    pub fn census(&self) -> Arc<RecordsCensus> {
        Arc::clone(&self.census)
    }

    /// The layer that counts gRPC calls into these metrics.
    pub fn grpc_layer(&self) -> GrpcMetricsLayer {
        GrpcMetricsLayer { metrics: Arc::clone(&self.grpc) }
    }

    /// What the coordinator service counts into.
    pub fn calls(&self) -> Arc<CallMetrics> {
        Arc::clone(&self.calls)
    }

    /// Everything, in the OpenMetrics text format. Reads the store's statistics, which may walk
    /// its directory: call it off the async workers.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

/// Serves `GET /metrics` on `listener` until `stop` is cancelled.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, stop: CancellationToken) {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = Arc::clone(&metrics);
            async move {
                match tokio::task::spawn_blocking(move || metrics.encode()).await {
                    Ok(text) => {
                        ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
                            .into_response()
                    }
                    Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                }
            }
        }),
    );
    let address = listener.local_addr().map_or_else(|_| "?".to_owned(), |address: SocketAddr| address.to_string());
    tracing::info!(listen = %address, "serving metrics at /metrics");
    if let Err(error) = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await {
        tracing::error!(%error, "the metrics endpoint failed");
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    grpc_type: &'static str,
    grpc_service: &'static str,
    grpc_method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandledLabels {
    grpc_type: &'static str,
    grpc_service: &'static str,
    grpc_method: &'static str,
    grpc_code: &'static str,
}

type HistogramConstructor = fn() -> Histogram;

struct GrpcMetrics {
    started: Family<MethodLabels, Counter>,
    handled: Family<HandledLabels, Counter>,
    handling: Family<MethodLabels, Histogram, HistogramConstructor>,
    /// Per method (in [`METHODS`] order, then `unknown`), the series a call counts into, each
    /// taken from its family on first use and kept: a call then costs atomic increments, with
    /// no label hashing and no lock. (Taken lazily, so that methods never called show no series.)
    methods: Vec<MethodSeries>,
}

/// The series of one method.
struct MethodSeries {
    labels: MethodLabels,
    started: OnceLock<Counter>,
    handling: OnceLock<Histogram>,
    /// Indexed by status code (0 to 16).
    handled: [OnceLock<Counter>; 17],
}

impl Default for GrpcMetrics {
    fn default() -> Self {
        let unknown = MethodLabels { grpc_type: "unknown", grpc_service: "unknown", grpc_method: "unknown" };
        let methods = METHODS
            .iter()
            .map(|(grpc_service, grpc_method, grpc_type)| MethodLabels { grpc_type, grpc_service, grpc_method })
            .chain([unknown])
            .map(|labels| MethodSeries {
                labels,
                started: OnceLock::new(),
                handling: OnceLock::new(),
                handled: std::array::from_fn(|_| OnceLock::new()),
            })
            .collect();
        GrpcMetrics {
            started: Family::default(),
            handled: Family::default(),
            handling: Family::new_with_constructor(|| Histogram::new(HANDLING_SECONDS_BOUNDS)),
            methods,
        }
    }
}

impl GrpcMetrics {
    fn started(&self, method: usize) {
        let series = &self.methods[method];
        series.started.get_or_init(|| self.started.get_or_create(&series.labels).clone()).inc();
    }

    fn handled(&self, method: usize, code: tonic::Code, took: Duration) {
        let series = &self.methods[method];
        series.handling.get_or_init(|| self.handling.get_or_create(&series.labels).clone()).observe(took.as_secs_f64());
        let MethodLabels { grpc_type, grpc_service, grpc_method } = series.labels.clone();
        let index = usize::try_from(code as i32).unwrap_or(2).min(16);
        series.handled[index]
            .get_or_init(|| {
                let labels = HandledLabels { grpc_type, grpc_service, grpc_method, grpc_code: code_name(code) };
                self.handled.get_or_create(&labels).clone()
            })
            .inc();
    }
}

/// The services and methods this server serves, with their gRPC types. Any other path (a
/// client's typo, a scanner) is labelled `unknown`, so that labels stay bounded.
const METHODS: &[(&str, &str, &str)] = &[
    ("idempotency.v1.Coordinator", "Claim", "unary"),
    ("idempotency.v1.Coordinator", "Complete", "unary"),
    ("idempotency.v1.Coordinator", "Release", "unary"),
    ("idempotency.v1.Coordinator", "Renew", "unary"),
    ("idempotency.v1.Coordinator", "Lookup", "unary"),
    ("idempotency.v1.Admin", "Stats", "unary"),
    ("idempotency.v1.Admin", "List", "unary"),
    ("idempotency.v1.Admin", "Purge", "unary"),
    ("idempotency.v1.Admin", "Export", "server_stream"),
    ("idempotency.v1.Admin", "Import", "client_stream"),
    ("grpc.health.v1.Health", "Check", "unary"),
    ("grpc.health.v1.Health", "Watch", "server_stream"),
    ("grpc.reflection.v1.ServerReflection", "ServerReflectionInfo", "bidi_stream"),
    ("grpc.reflection.v1alpha.ServerReflection", "ServerReflectionInfo", "bidi_stream"),
];

/// The index in [`METHODS`] of the method `path` names, or `METHODS.len()` (unknown).
fn method_index(path: &str) -> usize {
    path.strip_prefix('/')
        .and_then(|path| path.split_once('/'))
        .and_then(|(service, method)| {
            METHODS
                .iter()
                .position(|(known_service, known_method, _)| *known_service == service && *known_method == method)
        })
        .unwrap_or(METHODS.len())
}

/// The name go-grpc-prometheus gives a status code.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// Counts every gRPC call: started when its request arrives, handled with its status code when
/// its response headers are ready. A call refused by a handler carries its status in those
/// headers (a trailers-only response); a call whose headers carry no status counts as `OK`
/// (the status of a unary call that succeeded comes in the trailers, always `OK` here).
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    metrics: Arc<GrpcMetrics>,
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService { inner, metrics: Arc::clone(&self.metrics) }
    }
}

/// The service [`GrpcMetricsLayer`] wraps around the server's routes.
#[derive(Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: Arc<GrpcMetrics>,
}

impl<S, B, ResponseBody> tower::Service<http::Request<B>> for GrpcMetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResponseBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = method_index(request.uri().path());
        self.metrics.started(method);
        let started = Instant::now();
        let metrics = Arc::clone(&self.metrics);
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            let code = match &response {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|value| value.to_str().ok())
                    .and_then(|value| value.parse::<i32>().ok())
                    .map_or(tonic::Code::Ok, tonic::Code::from_i32),
                Err(_) => tonic::Code::Unknown,
            };
            metrics.handled(method, code, started.elapsed());
            response
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NamespaceOutcomeLabels {
    namespace: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    method: &'static str,
    reason: &'static str,
}

/// How a Claim was answered, as the metrics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimMetric {
    /// Granted a free key.
    Acquired,
    /// Granted a key whose holder's lease had lapsed.
    Takeover,
    /// Told the key is held.
    InProgress,
    /// Given the stored response.
    Replayed,
    /// Refused: the key was used with another payload.
    FingerprintMismatch,
    /// Refused: the store holds as many records as it may.
    StoreFull,
    /// Refused: the namespace holds its quota.
    NamespaceFull,
}

impl ClaimMetric {
    /// The `outcome` label.
    pub fn label(self) -> &'static str {
        match self {
            ClaimMetric::Acquired => "acquired",
            ClaimMetric::Takeover => "takeover",
            ClaimMetric::InProgress => "in_progress",
            ClaimMetric::Replayed => "replayed",
            ClaimMetric::FingerprintMismatch => "fingerprint_mismatch",
            ClaimMetric::StoreFull => "store_full",
            ClaimMetric::NamespaceFull => "namespace_full",
        }
    }

    /// The outcome a refusal stands for, if it is one the Claim metrics name.
    pub fn of_refusal(reason: Reason) -> Option<ClaimMetric> {
        match reason {
            Reason::FingerprintMismatch => Some(ClaimMetric::FingerprintMismatch),
            Reason::StoreFull => Some(ClaimMetric::StoreFull),
            Reason::NamespaceFull => Some(ClaimMetric::NamespaceFull),
            _ => None,
        }
    }
}

/// What the coordinator service counts on each call.
#[derive(Default)]
pub struct CallMetrics {
    claims: Family<OutcomeLabels, Counter>,
    namespace_claims: Family<NamespaceOutcomeLabels, Counter>,
    /// The namespaces that get series of their own (the auth file's `[[namespace]]` sections).
    named_namespaces: RwLock<Vec<String>>,
    refusals: Family<RefusalLabels, Counter>,
    completions: Family<OutcomeLabels, Counter>,
    renewals: Counter,
    releases: Counter,
    /// The series of `claims` (by [`ClaimMetric`]) and `completions` (completed, already), kept
    /// once taken, so that counting a call needs no label hashing and no lock.
    claim_series: [OnceLock<Counter>; 7],
    completion_series: [OnceLock<Counter>; 2],
}

impl CallMetrics {
    /// Counts a Claim's outcome, in `namespace` too if that one has series of its own.
    pub fn claim(&self, namespace: &str, outcome: ClaimMetric) {
        let (index, outcome) = (outcome as usize, outcome.label());
        self.claim_series[index].get_or_init(|| self.claims.get_or_create(&OutcomeLabels { outcome }).clone()).inc();
        if self.named_namespaces.read().iter().any(|named| named == namespace) {
            self.namespace_claims
                .get_or_create(&NamespaceOutcomeLabels { namespace: namespace.to_owned(), outcome })
                .inc();
        }
    }

    /// Counts a refused call of `method` (`Claim`, `Complete`, …).
    pub fn refusal(&self, method: &'static str, reason: Reason) {
        self.refusals.get_or_create(&RefusalLabels { method, reason: reason.as_str() }).inc();
    }

    /// Counts a Complete that succeeded.
    pub fn completion(&self, already_completed: bool) {
        let outcome = if already_completed { "already_completed" } else { "completed" };
        self.completion_series[usize::from(already_completed)]
            .get_or_init(|| self.completions.get_or_create(&OutcomeLabels { outcome }).clone())
            .inc();
    }

    /// Counts a renewal.
    pub fn renewal(&self) {
        self.renewals.inc();
    }

    /// Counts a release.
    pub fn release(&self) {
        self.releases.inc();
    }

    /// Gives these namespaces series of their own (the auth file's `[[namespace]]` sections).
    pub fn name_namespaces<'a>(&self, namespaces: impl IntoIterator<Item = &'a Namespace>) {
        let mut names: Vec<String> = namespaces.into_iter().map(|namespace| namespace.as_str().to_owned()).collect();
        names.sort();
        *self.named_namespaces.write() = names;
    }
}

/// Reads, at each scrape, what the coordinator, the store, the sweeper and the process counted.
struct StateCollector<S> {
    coordinator: Arc<Coordinator<S>>,
    sweeper: Arc<SweeperStats>,
    census: Arc<RecordsCensus>,
}

impl<S> fmt::Debug for StateCollector<S> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.debug_struct("StateCollector").finish_non_exhaustive()
    }
}

impl<S: Store> prometheus_client::collector::Collector for StateCollector<S> {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        use std::sync::atomic::Ordering::Relaxed;
        let coordinator = &self.coordinator;
        let store = coordinator.store();
        gauge(
            &mut encoder,
            "idempotency_records",
            "Records stored, expired ones not yet swept included",
            store.record_count(),
        )?;
        if let Some((counts, at)) = *self.census.last.read() {
            let states: Vec<(&str, u64)> = CENSUS_STATES.into_iter().zip(counts).collect();
            labelled_gauges(
                &mut encoder,
                "idempotency_records_by_state",
                "Records by state, as last counted in the background (--records-census-interval); expired: awaiting the sweeper",
                "state",
                &states,
            )?;
            let counted = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
            gauge(
                &mut encoder,
                "idempotency_records_by_state_counted_at_seconds",
                "When the records by state were last counted (Unix time)",
                counted,
            )?;
        }
        let healthy = u64::from(*store.health().borrow());
        gauge(
            &mut encoder,
            "idempotency_store_healthy",
            "1 while the store can make changes durable, 0 while it fails to",
            healthy,
        )?;
        gauge(
            &mut encoder,
            "idempotency_claims_waiting",
            "Claims waiting for a held key now",
            coordinator.waiting_claims() as u64,
        )?;
        let waits = coordinator.wait_counts();
        labelled_counters(
            &mut encoder,
            "idempotency_claim_waits",
            "Claims that waited for a held key, by how the wait ended",
            "ended",
            &[
                ("completed", waits.completed.load(Relaxed)),
                ("acquired", waits.acquired.load(Relaxed)),
                ("timed_out", waits.timed_out.load(Relaxed)),
                ("drained", waits.drained.load(Relaxed)),
            ],
        )?;

        let stats = store.stats();
        if let Some(flushes) = &stats.flush_seconds {
            histogram(
                &mut encoder,
                "idempotency_store_flush_duration_seconds",
                "Time of each group-commit flush (write-ahead log write and fdatasync)",
                flushes,
            )?;
        }
        if let Some(batches) = &stats.flush_batch_size {
            histogram(
                &mut encoder,
                "idempotency_store_flush_batch_size",
                "Changes made durable by each group-commit flush",
                batches,
            )?;
        }
        if let Some(bytes) = stats.disk_bytes {
            gauge(&mut encoder, "idempotency_store_disk_bytes", "Bytes the data directory's files take", bytes)?;
        }
        if let Some(statements) = &stats.statement_seconds {
            histogram(
                &mut encoder,
                "idempotency_postgres_statement_duration_seconds",
                "Time of each database statement once it had a connection",
                statements,
            )?;
        }
        if let Some(batches) = &stats.statement_batch_size {
            histogram(
                &mut encoder,
                "idempotency_postgres_batch_size",
                "Claims or Completes sent in each database statement (one transaction, one commit)",
                batches,
            )?;
        }
        if let Some(pool) = stats.pool {
            labelled_gauges(
                &mut encoder,
                "idempotency_postgres_pool_connections",
                "Connections in the pool, lent to calls (in_use) or not (idle)",
                "state",
                &[("in_use", pool.in_use), ("idle", pool.size.saturating_sub(pool.in_use))],
            )?;
            gauge(
                &mut encoder,
                "idempotency_postgres_pool_waiting",
                "Calls waiting for a database connection",
                pool.waiting,
            )?;
        }
        if let Some(reconnects) = stats.listen_reconnects {
            counter(
                &mut encoder,
                "idempotency_postgres_listen_reconnects",
                "Times the LISTEN connection was opened again after it failed",
                reconnects,
            )?;
        }
        if let Some(offset) = stats.clock_offset_seconds {
            let value = ConstGauge::new(offset);
            value.encode(encoder.encode_descriptor(
                "idempotency_postgres_clock_offset_seconds",
                "The database's clock minus this host's, as last measured",
                None,
                value.metric_type(),
            )?)?;
        }

        let sweeper = &self.sweeper;
        labelled_counters(
            &mut encoder,
            "idempotency_sweeper_passes",
            "Sweep passes, by whether they ran to their end",
            "result",
            &[("ok", sweeper.passes.load(Relaxed)), ("failed", sweeper.failed_passes.load(Relaxed))],
        )?;
        counter(
            &mut encoder,
            "idempotency_sweeper_deleted",
            "Expired records the sweeper deleted",
            sweeper.deleted.load(Relaxed),
        )?;
        if let Some(lag) = sweeper.lag() {
            let value = ConstGauge::new(lag.as_secs_f64());
            value.encode(encoder.encode_descriptor(
                "idempotency_sweeper_lag_seconds",
                "At most this old is the oldest expired record not yet swept (time since a pass last found nothing expired left)",
                None,
                value.metric_type(),
            )?)?;
        }
        process(&mut encoder)
    }
}

fn counter(encoder: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: u64) -> fmt::Result {
    let value = ConstCounter::new(value);
    value.encode(encoder.encode_descriptor(name, help, None, value.metric_type())?)
}

fn gauge(encoder: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: u64) -> fmt::Result {
    let value = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
    value.encode(encoder.encode_descriptor(name, help, None, value.metric_type())?)
}

fn labelled_counters(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value_label, value) in values {
        ConstCounter::new(*value).encode(family.encode_family(&[(label, *value_label)])?)?;
    }
    Ok(())
}

fn labelled_gauges(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (value_label, value) in values {
        ConstGauge::new(i64::try_from(*value).unwrap_or(i64::MAX))
            .encode(family.encode_family(&[(label, *value_label)])?)?;
    }
    Ok(())
}

fn histogram(encoder: &mut DescriptorEncoder<'_>, name: &str, help: &str, snapshot: &HistogramSnapshot) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    metric.encode_histogram::<NoLabelSet>(snapshot.sum, snapshot.count, &snapshot.buckets, None)
}

/// The process's CPU time, memory and file descriptors, with the names of Prometheus's own
/// process collectors, read from `/proc` (absent elsewhere).
fn process(encoder: &mut DescriptorEncoder<'_>) -> fmt::Result {
    let Some(process) = ProcessStats::read() else { return Ok(()) };
    let cpu = ConstCounter::new(process.cpu_seconds);
    cpu.encode(encoder.encode_descriptor(
        "process_cpu_seconds",
        "User and system CPU time spent, in seconds",
        None,
        cpu.metric_type(),
    )?)?;
    gauge(encoder, "process_resident_memory_bytes", "Resident memory size in bytes", process.resident_bytes)?;
    gauge(encoder, "process_virtual_memory_bytes", "Virtual memory size in bytes", process.virtual_bytes)?;
    gauge(encoder, "process_open_fds", "Open file descriptors", process.open_fds)?;
    if let Some(max_fds) = process.max_fds {
        gauge(encoder, "process_max_fds", "The most file descriptors the process may open", max_fds)?;
    }
    Ok(())
}

struct ProcessStats {
    cpu_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    open_fds: u64,
    max_fds: Option<u64>,
}

impl ProcessStats {
    fn read() -> Option<ProcessStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name may hold spaces and parentheses: fields are counted after its last ')'.
        let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split_whitespace().collect();
        // SAFETY: sysconf only reads a configuration value.
        let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
        let (ticks, page) = (u64::try_from(ticks).ok().filter(|t| *t > 0)?, u64::try_from(page).ok()?);
        // Fields 14 and 15 of stat (utime, stime), 23 (vsize) and 24 (rss), counted from 3 here.
        let field = |number: usize| fields.get(number - 3).and_then(|value| value.parse::<u64>().ok());
        let cpu_ticks = field(14)? + field(15)?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        let max_fds = std::fs::read_to_string("/proc/self/limits").ok().and_then(|limits| {
            let line = limits.lines().find(|line| line.starts_with("Max open files"))?;
            line.split_whitespace().nth(3)?.parse().ok()
        });
        Some(ProcessStats {
            cpu_seconds: cpu_ticks as f64 / ticks as f64,
            resident_bytes: field(24)? * page,
            virtual_bytes: field(23)?,
            open_fds,
            max_fds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_served_methods_get_labels_of_their_own() {
        let metrics = GrpcMetrics::default();
        let check = |path: &str, expected: (&str, &str, &str)| {
            let labels = &metrics.methods[method_index(path)].labels;
            assert_eq!((labels.grpc_service, labels.grpc_method, labels.grpc_type), expected, "{path}");
        };
        check("/idempotency.v1.Coordinator/Claim", ("idempotency.v1.Coordinator", "Claim", "unary"));
        check("/grpc.health.v1.Health/Watch", ("grpc.health.v1.Health", "Watch", "server_stream"));
        check("/idempotency.v1.Coordinator/Nope", ("unknown", "unknown", "unknown"));
        check("/../../etc/passwd", ("unknown", "unknown", "unknown"));
        check("", ("unknown", "unknown", "unknown"));
    }

    #[test]
    fn the_process_is_read_from_proc() {
        let process = ProcessStats::read().expect("/proc is there on Linux");
        assert!(process.resident_bytes > 0 && process.virtual_bytes >= process.resident_bytes);
        assert!(process.open_fds >= 3, "{}", process.open_fds);
        assert!(process.cpu_seconds >= 0.0);
    }
}
