//! The server: opens the store, wires the coordinator service, health, reflection and the
//! sweeper, serves until told to stop, then drains and flushes.
//!
//! Shutdown order: health turns NOT_SERVING at once; on [`Stop::Drain`] the server keeps serving
//! every call for the drain delay, so that load balancers and health-checking clients route away
//! before anything is refused; then new calls are refused with SHUTTING_DOWN, waiting Claims
//! answer at once, connections get GOAWAY and the listener closes, in-flight calls finish
//! (bounded by the grace period), the sweeper stops, and the store flushes before `run` returns.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use idempotency_core::Coordinator;
use idempotency_core::clock::{Clock, OffsetClock};
use idempotency_core::store::Store;
use idempotency_proto::{SERVICE_NAME, pb};
use idempotency_store_postgres::{PostgresOpenError, PostgresStore};
use idempotency_store_sled::{OpenError, SledStore};

use crate::admin::AdminService;
use crate::auth::{AuthFileError, Authorizer};
use crate::config::{Config, ConfigError, StoreChoice};
use crate::listener::{self, ListenOptions};
use crate::metrics::{self, CallMetrics, Metrics};
use crate::service::{CoordinatorService, Guard};
use crate::stores::AnyStore;
use crate::sweeper::{self, SweeperStats};
use crate::tls::{Tls, TlsError, TlsFiles};

/// Room for the fields around a response in a Complete message, beyond the response limit.
const MESSAGE_OVERHEAD_BYTES: usize = 64 * 1024;
/// Admin export and import chunks: 256 KiB of snapshot plus up to one record past it.
const ADMIN_CHUNK_OVERHEAD_BYTES: usize = 512 * 1024;

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration contradicts itself.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data directory could not be opened.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// The PostgreSQL store could not start.
    #[error(transparent)]
    Postgres(#[from] PostgresOpenError),
    /// The TLS material could not be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The auth file could not be used.
    #[error(transparent)]
    Auth(#[from] AuthFileError),
    /// The metrics or health-only address could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address of `--metrics-listen` or `--health-listen`.
        address: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The transport failed.
    #[error("serving failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The final flush failed: changes since the last acknowledged one may be lost.
    #[error("closing the store failed: {0}")]
    Close(String),
}

/// How a stop signal asks the server to go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Report NOT_SERVING, serve on for the drain delay, then drain (SIGTERM: an orchestrator).
    Drain,
    /// Report NOT_SERVING and drain at once (SIGINT: someone at a terminal, and tests).
    Now,
}

/// Who may connect and call: TLS, the auth file, and whether reflection needs credentials.
#[derive(Clone, Default)]
pub struct Security {
    /// TLS (and mTLS), if on.
    pub tls: Option<Arc<Tls>>,
    /// The auth file's rules, if on; without them every caller may do anything.
    pub auth: Option<Arc<Authorizer>>,
    /// Reflection answers only callers with valid credentials.
    pub reflection_requires_auth: bool,
}

impl Security {
    /// Loads the TLS material and the auth file the configuration names.
    pub fn load(config: &Config) -> Result<Security, ServerError> {
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(Arc::new(Tls::load(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: config.tls_client_ca.clone(),
            })?)),
            _ => None,
        };
        let auth = config.auth_file.as_deref().map(Authorizer::load).transpose()?.map(Arc::new);
        Ok(Security { tls, auth, reflection_requires_auth: config.reflection_requires_auth })
    }

    /// What is on, for the start-up log.
    fn describe(&self) -> String {
        let tls = match &self.tls {
            Some(tls) if tls.requires_client_certificates() => "TLS with client certificates (mTLS)",
            Some(_) => "TLS",
            None => "plaintext",
        };
        let auth = if self.auth.is_some() { "auth file" } else { "no auth file: every caller may do anything" };
        let reflection = if self.reflection_requires_auth { "reflection needs credentials" } else { "reflection open" };
        format!("{tls}; {auth}; {reflection}")
    }
}

/// How to serve an already-built coordinator.
#[derive(Clone)]
pub struct ServeOptions {
    /// How often the sweeper runs.
    pub sweep_interval: Duration,
    /// Index entries per sweep batch.
    pub sweep_batch: usize,
    /// After a [`Stop::Drain`], how long the server reports NOT_SERVING while still serving.
    pub drain_delay: Duration,
    /// How long in-flight calls may take to finish once draining starts.
    pub shutdown_grace: Duration,
    /// HTTP/2 streams (calls) one connection may have open at once.
    pub max_streams_per_connection: u32,
    /// Calls served at once (waiting Claims included); more are refused with OVERLOADED.
    pub max_in_flight: usize,
    /// Connections open at once; more are closed at once.
    pub max_connections: usize,
    /// A connection without frames but pings for this long is closed.
    pub idle_timeout: Duration,
    /// How often connections are pinged (zero: never), and how long an answer may take.
    pub keepalive: (Duration, Duration),
    /// TLS and access.
    pub security: Security,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How often the records-by-state gauge is recounted (zero: never).
    pub records_census_interval: Duration,
    /// Where to serve the health service alone in plaintext, if anywhere.
    pub health_listen: Option<std::net::SocketAddr>,
}

impl ServeOptions {
    /// The options `config` asks for, with its TLS material and auth file loaded.
    pub fn load(config: &Config) -> Result<ServeOptions, ServerError> {
        Ok(ServeOptions {
            sweep_interval: config.sweep_interval,
            sweep_batch: config.sweep_batch,
            drain_delay: config.drain_delay,
            shutdown_grace: config.shutdown_grace,
            max_streams_per_connection: config.max_streams_per_connection,
            max_in_flight: config.max_in_flight,
            max_connections: config.max_connections,
            idle_timeout: config.idle_timeout,
            keepalive: (config.keepalive_interval, config.keepalive_timeout),
            security: Security::load(config)?,
            metrics_listen: config.metrics_listen,
            records_census_interval: config.records_census_interval,
            health_listen: config.health_listen,
        })
    }
}

/// Opens the store `config` chooses, reading time from `clock`: on PostgreSQL, decisions use
/// the database's clock and `clock` only times waits, corrected by the measured offset.
pub async fn open(config: &Config, clock: Arc<dyn Clock>) -> Result<Arc<Coordinator<AnyStore>>, ServerError> {
    open_store(config, config.store_choice()?, clock).await
}

/// As [`open`], but a PostgreSQL store reads time from `clock` too instead of the database's,
/// so that tests can drive it with a manual clock (a test seam).
#[cfg(feature = "testing")]
pub async fn open_on_caller_time(
    config: &Config,
    clock: Arc<dyn Clock>,
) -> Result<Arc<Coordinator<AnyStore>>, ServerError> {
    let mut choice = config.store_choice()?;
    if let StoreChoice::Postgres(options) = &mut choice {
        options.time = idempotency_store_postgres::TimeSource::Caller;
    }
    open_store(config, choice, clock).await
}

async fn open_store(
    config: &Config,
    choice: StoreChoice,
    clock: Arc<dyn Clock>,
) -> Result<Arc<Coordinator<AnyStore>>, ServerError> {
    let limits = config.limits()?;
    let clock: Arc<dyn Clock> = if config.clock_offset_ms == 0 {
        clock
    } else {
        tracing::warn!(offset_ms = config.clock_offset_ms, "this process's clock is skewed on purpose");
        Arc::new(OffsetClock::new(clock, Arc::new(config.clock_offset_ms.into())))
    };
    match choice {
        StoreChoice::Sled(options) => {
            let store = tokio::task::block_in_place(|| SledStore::open(&options))?;
            Ok(Arc::new(Coordinator::new(AnyStore::Sled(store), clock, limits).with_max_waiting(config.max_waiting)))
        }
        StoreChoice::Postgres(options) => {
            let database_time = options.time == idempotency_store_postgres::TimeSource::Database;
            let offset = Arc::new(std::sync::atomic::AtomicI64::new(0));
            let store = PostgresStore::open(&options, Arc::clone(&clock), Arc::clone(&offset)).await?;
            let clock: Arc<dyn Clock> = if database_time { Arc::new(OffsetClock::new(clock, offset)) } else { clock };
            Ok(Arc::new(
                Coordinator::new(AnyStore::Postgres(store), clock, limits).with_max_waiting(config.max_waiting),
            ))
        }
    }
}

/// Opens the store of `config` and serves on `listener` until `shutdown` completes.
pub async fn run(
    listener: TcpListener,
    config: Config,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = Stop> + Send + 'static,
) -> Result<(), ServerError> {
    // TLS and the auth file first: a bad certificate stops the server before the store opens.
    let options = ServeOptions::load(&config)?;
    let coordinator = open(&config, clock).await?;
    let listen = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(
        protections = %options.security.describe(),
        max_in_flight = options.max_in_flight,
        max_waiting = config.max_waiting,
        max_connections = options.max_connections,
        idle_timeout = %humantime::format_duration(options.idle_timeout),
        "protections in force"
    );
    match coordinator.store() {
        AnyStore::Sled(_) => tracing::info!(
            listen = %listen,
            data_dir = %config.data_dir.display(),
            durability = ?config.durability,
            records = coordinator.store().record_count(),
            "serving"
        ),
        AnyStore::Postgres(_) => tracing::info!(
            listen = %listen,
            store = "postgres",
            schema = %config.postgres_schema,
            records = coordinator.store().record_count(),
            "serving"
        ),
    }
    serve(listener, coordinator, options, shutdown).await
}

/// Serves `coordinator` on `listener` until `shutdown` completes, then drains and closes the store.
pub async fn serve<S: Store + idempotency_core::admin::Maintenance>(
    listener: TcpListener,
    coordinator: Arc<Coordinator<S>>,
    options: ServeOptions,
    shutdown: impl Future<Output = Stop> + Send + 'static,
) -> Result<(), ServerError> {
    // Bound first: an address in use stops the server before it reports SERVING.
    let bind = |address: Option<std::net::SocketAddr>| async move {
        match address {
            Some(address) => {
                TcpListener::bind(address).await.map(Some).map_err(|source| ServerError::Bind { address, source })
            }
            None => Ok(None),
        }
    };
    let metrics_listener = bind(options.metrics_listen).await?;
    let health_listener = bind(options.health_listen).await?;
    let (reporter, health_service) = tonic_health::server::health_reporter();
    set_health(&reporter, ServingStatus::Serving).await;
    let stop_background = CancellationToken::new();
    let health_watch =
        tokio::spawn(follow_store_health(coordinator.store().health(), reporter.clone(), stop_background.clone()));
    let sweeper_stats = Arc::new(SweeperStats::default());
    let sweeper = sweeper::spawn(
        Arc::clone(&coordinator),
        options.sweep_interval,
        options.sweep_batch,
        stop_background.clone(),
        Arc::clone(&sweeper_stats),
    );
    let metrics = Arc::new(Metrics::new(Arc::clone(&coordinator), Arc::clone(&sweeper_stats)));
    // The endpoint answers until the store is closed, so that a scrape sees the drain.
    let stop_metrics = CancellationToken::new();
    let census = (metrics_listener.is_some() && !options.records_census_interval.is_zero()).then(|| {
        tokio::spawn(metrics::count_records(
            Arc::clone(&coordinator),
            metrics.census(),
            options.records_census_interval,
            stop_background.clone(),
        ))
    });
    let metrics_endpoint = metrics_listener
        .map(|listener| tokio::spawn(metrics::serve(listener, Arc::clone(&metrics), stop_metrics.clone())));
    // Health alone, in plaintext: it tells nothing but whether this server serves, and like the
    // metrics it answers until the store is closed, so that probes see the drain.
    let health_endpoint = health_listener.map(|listener| {
        let address = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(listen = %address, "serving health alone in plaintext");
        let stop = stop_metrics.clone();
        let health_service = health_service.clone();
        // Reflection of the health service alone, so that grpcurl works here too.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection().build_v1().expect("the embedded descriptor set is valid");
        let reflection_v1alpha = reflection().build_v1alpha().expect("the embedded descriptor set is valid");
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(health_service)
                .add_service(reflection_v1)
                .add_service(reflection_v1alpha)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    stop.cancelled_owned(),
                )
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "the health-only endpoint failed");
            }
        })
    });
    let wakeups = coordinator.store().wakeups().map(|mut wakeups| {
        let coordinator = Arc::clone(&coordinator);
        let stop = stop_background.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    wakeup = wakeups.recv() => match wakeup {
                        Some(wakeup) => coordinator.wake_for(&wakeup),
                        None => return,
                    },
                }
            }
        })
    });

    // The error-details descriptors let reflection clients (grpcurl) decode ErrorInfo.
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(idempotency_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor sets are valid");
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(idempotency_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("the embedded descriptor sets are valid");
    let max_message = coordinator.limits().max_response_bytes + MESSAGE_OVERHEAD_BYTES;
    // Requests may come gzip-compressed (some clients compress by default); the message limit
    // applies to the decompressed size, so a small frame that inflates past it is refused with
    // RESOURCE_EXHAUSTED before anything is decoded. Replies go out uncompressed: compressing
    // every replay would cost more CPU than the bytes it saves on the networks this runs on.
    let guard = Guard::new(options.security.auth.clone(), options.max_in_flight);
    let coordinator_service = pb::coordinator_server::CoordinatorServer::new(CoordinatorService::new(
        Arc::clone(&coordinator),
        guard.clone(),
        metrics.calls(),
    ))
    .accept_compressed(CompressionEncoding::Gzip)
    .max_decoding_message_size(max_message)
    .max_encoding_message_size(max_message);
    let store_kind = idempotency_core::admin::Maintenance::kind(coordinator.store());
    let admin_service = pb::admin_server::AdminServer::new(AdminService::new(
        Arc::clone(&coordinator),
        guard.clone(),
        sweeper_stats,
        store_kind,
    ))
    .accept_compressed(CompressionEncoding::Gzip)
    .max_decoding_message_size(max_message + ADMIN_CHUNK_OVERHEAD_BYTES)
    .max_encoding_message_size(max_message + ADMIN_CHUNK_OVERHEAD_BYTES);
    let health_service = health_service.accept_compressed(CompressionEncoding::Gzip);
    let reflection_check = guard.reflection_check(options.security.reflection_requires_auth);
    let reflection_v1 = tonic::service::interceptor::InterceptedService::new(
        reflection_v1.accept_compressed(CompressionEncoding::Gzip),
        reflection_check.clone(),
    );
    let reflection_v1alpha = tonic::service::interceptor::InterceptedService::new(
        reflection_v1alpha.accept_compressed(CompressionEncoding::Gzip),
        reflection_check,
    );
    if let Some(auth) = &options.security.auth {
        coordinator.store().set_namespace_quotas(auth.rules().quotas().clone());
        metrics.calls().name_namespaces(auth.rules().quotas().keys());
    }
    let reloads = tokio::spawn(reload_on_change(
        options.security.clone(),
        Arc::clone(&coordinator),
        metrics.calls(),
        stop_background.clone(),
    ));
    let stop_accepting = CancellationToken::new();
    let (incoming, accepting) = listener::incoming(
        listener,
        ListenOptions {
            tls: options.security.tls.clone(),
            max_connections: options.max_connections,
            idle_timeout: options.idle_timeout,
        },
        stop_accepting.clone(),
    );

    let draining = CancellationToken::new();
    let drain_signal = {
        let draining = draining.clone();
        let stop_background = stop_background.clone();
        let coordinator = Arc::clone(&coordinator);
        let reporter = reporter.clone();
        let drain_delay = options.drain_delay;
        async move {
            let stop = shutdown.await;
            set_health(&reporter, ServingStatus::NotServing).await;
            if stop == Stop::Drain && !drain_delay.is_zero() {
                tracing::info!(
                    delay = %humantime::format_duration(drain_delay),
                    "stopping: reporting NOT_SERVING and serving on so that balancers route away first"
                );
                tokio::time::sleep(drain_delay).await;
            }
            tracing::info!("draining: refusing new calls, finishing in-flight ones");
            stop_background.cancel();
            coordinator.drain();
            draining.cancel();
        }
    };
    let (keepalive_interval, keepalive_timeout) = options.keepalive;
    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(options.max_streams_per_connection)
        .http2_keepalive_interval((!keepalive_interval.is_zero()).then_some(keepalive_interval))
        .http2_keepalive_timeout(Some(keepalive_timeout))
        .layer(metrics.grpc_layer())
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(coordinator_service)
        .add_service(admin_service)
        .serve_with_incoming_shutdown(incoming, drain_signal);
    tokio::pin!(server);
    let served = tokio::select! {
        result = &mut server => result,
        () = async { draining.cancelled().await; tokio::time::sleep(options.shutdown_grace).await } => {
            tracing::warn!(grace = ?options.shutdown_grace, "in-flight calls outlived the grace period; closing anyway");
            Ok(())
        }
    };
    // Whatever ended serving (the signal, the grace period, a transport error), the background
    // tasks stop and the store is flushed and closed.
    draining.cancel();
    stop_background.cancel();
    stop_accepting.cancel();
    coordinator.drain();
    let _ = accepting.await;
    let _ = reloads.await;
    let _ = health_watch.await;
    let _ = sweeper.await;
    if let Some(census) = census {
        let _ = census.await;
    }
    if let Some(wakeups) = wakeups {
        let _ = wakeups.await;
    }
    let closed = coordinator.store().close().await.map_err(|error| ServerError::Close(error.to_string()));
    stop_metrics.cancel();
    for endpoint in [metrics_endpoint, health_endpoint].into_iter().flatten() {
        let _ = endpoint.await;
    }
    tracing::info!("stopped");
    served?;
    closed
}

/// Reloads the TLS material and the auth file on SIGHUP and when their files change (checked
/// every second), and hands the auth file's quotas to the store. With neither, a SIGHUP (a
/// process manager's "reload") is logged and changes nothing; it never ends the server.
async fn reload_on_change<S: Store>(
    security: Security,
    coordinator: Arc<Coordinator<S>>,
    calls: Arc<CallMetrics>,
    stop: CancellationToken,
) {
    let reloadable = security.tls.is_some() || security.auth.is_some();
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    loop {
        let forced = tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick(), if reloadable => false,
            Some(()) = async { match &mut hangups { Some(hangups) => hangups.recv().await, None => std::future::pending().await } } => {
                if !reloadable {
                    tracing::info!("SIGHUP: nothing to reload (no TLS material, no auth file)");
                    continue;
                }
                tracing::info!("SIGHUP: reloading TLS material and the auth file");
                true
            }
        };
        let security = security.clone();
        // File reads and certificate parsing block: off the async workers.
        let reloaded_auth = tokio::task::spawn_blocking(move || {
            if let Some(tls) = &security.tls {
                if forced {
                    tls.reload()
                } else {
                    tls.reload_if_changed()
                };
            }
            let auth = security.auth.as_ref()?;
            let reloaded = if forced { auth.reload() } else { auth.reload_if_changed() };
            reloaded.then(|| auth.rules())
        })
        .await
        .ok()
        .flatten();
        if let Some(rules) = reloaded_auth {
            coordinator.store().set_namespace_quotas(rules.quotas().clone());
            calls.name_namespaces(rules.quotas().keys());
        }
    }
}

async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter.set_service_status(SERVICE_NAME, status).await;
}

/// Mirrors the store's ability to make changes durable into the health service.
async fn follow_store_health(
    mut healthy: tokio::sync::watch::Receiver<bool>,
    reporter: HealthReporter,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = healthy.changed() => {
                if changed.is_err() {
                    return;
                }
                let serving = *healthy.borrow_and_update();
                if serving {
                    tracing::info!("storage recovered; serving");
                    set_health(&reporter, ServingStatus::Serving).await;
                } else {
                    tracing::error!("storage failing; reporting NOT_SERVING");
                    set_health(&reporter, ServingStatus::NotServing).await;
                }
            }
        }
    }
}
