//! The scale-out store: PostgreSQL, shared by any number of coordinator replicas.
//!
//! Each transition is one round trip: a PL/pgSQL function (`postgres/0001_records.sql`) that
//! locks the key's row, decides by the same rules as [`crate::domain::machine`], writes, and
//! returns the outcome. Lookup reads the row and lets the domain machine decide.
//!
//! Invariants:
//! - Time is the database's clock (`clock_timestamp()`), never a replica's, so replicas with
//!   skewed clocks agree on every lease. (Tests may pass their own time: [`TimeSource::Caller`].)
//! - Fencing tokens come from one sequence, so they increase across replicas and restarts.
//! - A reply reports only committed state; durability is the database's (`synchronous_commit`).
//! - Claims waiting on one replica learn of a Complete, Release or Renew on another through
//!   LISTEN/NOTIFY on the channel `<schema>.keys`; a function notifies only for rows whose
//!   `waiters` flag a waiting Claim set, so plain traffic pays nothing for it.
//! - The schema is created and upgraded on start by the embedded, versioned migrations under a
//!   transaction-scoped advisory lock, so replicas starting together migrate once.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, NoTls, Row};
use tokio_util::sync::CancellationToken;

use super::{Store, StoreError, SweepReport, Wakeup};
use crate::clock::Clock;
use crate::domain::machine::{self, MAX_RETRY_AFTER};
use crate::domain::{
    Claim, ClaimOutcome, Complete, CompleteOutcome, FencingToken, Fingerprint, Grant, Key, KeyView, Lease, LeaseToken,
    Namespace, Owner, Record, RecordState, Rejection, Release, Renew, RenewOutcome, RequestId, Response,
    StoredResponse, Timestamp,
};

/// The embedded migrations, applied in order; a database at a later version than the last one
/// here was migrated by a newer release, and this one refuses to run against it.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "records", include_str!("postgres/0001_records.sql")),
    (2, "lapsed leases kept a retention", include_str!("postgres/0002_lapsed_leases_kept.sql")),
];

/// How often each replica checks the database (health, clock offset, record count).
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// Where the PostgreSQL store reads time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeSource {
    /// The database's clock: what every replica in production uses.
    Database,
    /// The `now` passed by the caller, for tests that drive a manual clock.
    Caller,
}

/// How to open a [`PostgresStore`].
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// `postgres://user@host:port/database` (any libpq-style URL or key=value string).
    pub url: String,
    /// The schema holding the store's tables and functions; created if missing.
    pub schema: String,
    /// Connections in the pool (plus one for LISTEN).
    pub pool_size: usize,
    /// The longest a call may take in the database (pool wait, connect, statement) before it fails
    /// with UNAVAILABLE.
    pub timeout: Duration,
    /// Claims of new keys fail past this many records.
    pub max_records: u64,
    /// Where time comes from.
    pub time: TimeSource,
}

/// Why the PostgreSQL store could not start.
#[derive(Debug, thiserror::Error)]
pub enum PostgresOpenError {
    /// The URL or schema name is malformed.
    #[error("invalid PostgreSQL configuration: {0}")]
    Config(String),
    /// The database could not be reached or refused a step.
    #[error("PostgreSQL at {target}: {source}")]
    Database {
        /// The host and database (no password).
        target: String,
        /// What failed.
        source: tokio_postgres::Error,
    },
    /// The database was migrated by a newer release.
    #[error("the schema {schema} is at version {found}, newer than this release's {supported}; run a newer release")]
    TooNew {
        /// The schema.
        schema: String,
        /// Its version.
        found: i32,
        /// The latest this release knows.
        supported: i32,
    },
}

/// Records in PostgreSQL, shared by every replica pointed at the same database and schema.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    time: TimeSource,
    max_records: u64,
    timeout: Duration,
    /// The record count as last read by the health task (all replicas' inserts included).
    records: AtomicU64,
    /// This host's clock.
    local: Arc<dyn Clock>,
    /// The database clock minus the local clock, in milliseconds, as last measured.
    clock_offset_ms: Arc<AtomicI64>,
    healthy: watch::Sender<bool>,
    wakeups: Mutex<Option<mpsc::UnboundedReceiver<Wakeup>>>,
    stop: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl PostgresStore {
    /// Connects, migrates the schema, and starts the health and LISTEN tasks. The health task
    /// keeps `clock_offset_ms` at the database clock minus `local` (see
    /// [`crate::clock::OffsetClock`]), so that waits timed on this host follow the database's leases.
    pub async fn open(
        options: &PostgresOptions,
        local: Arc<dyn Clock>,
        clock_offset_ms: Arc<AtomicI64>,
    ) -> Result<PostgresStore, PostgresOpenError> {
        let config = connection_config(options)?;
        let target = describe(&config);
        let db_error = |source| PostgresOpenError::Database { target: target.clone(), source };

        let (mut client, connection) = config.connect(NoTls).await.map_err(db_error)?;
        let connection = tokio::spawn(connection);
        migrate(&mut client, &options.schema).await.map_err(|error| match error {
            MigrateError::Database(source) => db_error(source),
            MigrateError::TooNew { found, supported } => {
                PostgresOpenError::TooNew { schema: options.schema.clone(), found, supported }
            }
        })?;
        let synchronous_commit: String =
            client.query_one("SHOW synchronous_commit", &[]).await.map_err(db_error)?.get(0);
        if synchronous_commit == "off" {
            tracing::warn!(
                "PostgreSQL has synchronous_commit=off: an acknowledged change can be lost if the database crashes"
            );
        }
        let records: i64 = client
            .query_one("SELECT coalesce(sum(n), 0)::bigint FROM record_count", &[])
            .await
            .map_err(db_error)?
            .get(0);
        drop(client);
        let _ = connection.await;

        let manager =
            Manager::from_config(config.clone(), NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(options.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.timeout))
            .create_timeout(Some(options.timeout))
            .recycle_timeout(Some(options.timeout))
            .build()
            .map_err(|error| PostgresOpenError::Config(error.to_string()))?;
        let (wake_tx, wake_rx) = mpsc::unbounded_channel();
        let store = PostgresStore {
            inner: Arc::new(Inner {
                pool,
                time: options.time,
                max_records: options.max_records,
                timeout: options.timeout,
                records: AtomicU64::new(u64::try_from(records).unwrap_or(0)),
                local,
                clock_offset_ms,
                healthy: watch::Sender::new(true),
                wakeups: Mutex::new(Some(wake_rx)),
                stop: CancellationToken::new(),
                tasks: Mutex::new(Vec::new()),
            }),
        };
        store.inner.check_health().await;
        let health = tokio::spawn(Arc::clone(&store.inner).health_task());
        let listen = tokio::spawn(listen_task(config, channel(&options.schema), wake_tx, store.inner.stop.clone()));
        store.inner.tasks.lock().extend([health, listen]);
        Ok(store)
    }

    /// The number of records, counted now (`record_count` is the last periodic reading).
    pub async fn counted_records(&self) -> Result<u64, StoreError> {
        let row = self.inner.query_one("SELECT coalesce(sum(n), 0)::bigint FROM record_count", &[]).await?;
        let count = u64::try_from(row.get::<_, i64>(0)).unwrap_or(0);
        self.inner.records.store(count, Ordering::Relaxed);
        Ok(count)
    }

    /// A digest of every stored record and the fencing sequence, to show that a call changed
    /// nothing (tests, diagnostics).
    pub async fn contents_digest(&self) -> Result<u64, StoreError> {
        let row = self
            .inner
            .query_one(
                // Every column but `waiters`, a notification hint rather than part of the record.
                "SELECT md5((SELECT last_value FROM fencing_tokens)::text || coalesce(string_agg(ROW(namespace, key, fingerprint, fencing_token, attempt, owner,
                     retention_ms, updated_at, state, token, lease_expires_at, request_id, takeover, response,
                     completed_at, expires_at)::text, '|' ORDER BY namespace, key), ''))
                 FROM records",
                &[],
            )
            .await?;
        let digest: String = row.get(0);
        Ok(u64::from_str_radix(digest.get(..16).unwrap_or("0"), 16).unwrap_or(0))
    }
}

/// What [`import`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Records added.
    pub inserted: u64,
    /// Records that replaced an older copy of the same key (a grant behind the one copied).
    pub replaced: u64,
    /// Records left alone: the database holds the same or a later grant of the key.
    pub kept: u64,
    /// The fencing-token sequence now hands out tokens above this.
    pub fencing_floor: u64,
}

/// Why an import stopped (the batches committed before it stay; re-running it is safe).
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The database could not be reached or its schema not migrated.
    #[error(transparent)]
    Open(#[from] PostgresOpenError),
    /// A statement failed.
    #[error("PostgreSQL refused the import: {0}")]
    Database(#[from] tokio_postgres::Error),
    /// The source store could not be read.
    #[error("reading the source store: {0}")]
    Source(StoreError),
}

/// How many records one import transaction copies.
const IMPORT_BATCH: usize = 1_000;

/// Copies `records` into the store's schema (migrated first): a key the database does not hold
/// is inserted; one it holds is replaced only if the copy is a later grant or a later change of
/// the same grant, so re-running an import changes nothing and never undoes newer work. Then the
/// fencing-token sequence is moved above `fencing_floor` and every copied token.
pub async fn import(
    options: &PostgresOptions,
    records: impl Iterator<Item = Result<(Namespace, Key, Record), StoreError>>,
    fencing_floor: u64,
) -> Result<ImportReport, ImportError> {
    let config = connection_config(options)?;
    let target = describe(&config);
    let (mut client, connection) =
        config.connect(NoTls).await.map_err(|source| PostgresOpenError::Database { target: target.clone(), source })?;
    let connection = tokio::spawn(connection);
    migrate(&mut client, &options.schema).await.map_err(|error| match error {
        MigrateError::Database(source) => PostgresOpenError::Database { target, source },
        MigrateError::TooNew { found, supported } => {
            PostgresOpenError::TooNew { schema: options.schema.clone(), found, supported }
        }
    })?;
    let upsert = client
        .prepare(
            "INSERT INTO records AS t (namespace, key, fingerprint, fencing_token, attempt, owner, retention_ms,
                 updated_at, state, token, lease_expires_at, request_id, takeover, response, completed_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
             ON CONFLICT (namespace, key) DO UPDATE SET
                 fingerprint = EXCLUDED.fingerprint, fencing_token = EXCLUDED.fencing_token,
                 attempt = EXCLUDED.attempt, owner = EXCLUDED.owner, retention_ms = EXCLUDED.retention_ms,
                 updated_at = EXCLUDED.updated_at, state = EXCLUDED.state, token = EXCLUDED.token,
                 lease_expires_at = EXCLUDED.lease_expires_at, request_id = EXCLUDED.request_id,
                 takeover = EXCLUDED.takeover, response = EXCLUDED.response,
                 completed_at = EXCLUDED.completed_at, expires_at = EXCLUDED.expires_at
             WHERE t.fencing_token < EXCLUDED.fencing_token
                OR (t.fencing_token = EXCLUDED.fencing_token AND t.updated_at < EXCLUDED.updated_at)
             RETURNING (xmax = 0) AS inserted",
        )
        .await?;
    let mut report = ImportReport::default();
    let mut highest = fencing_floor;
    let mut records = records.peekable();
    while records.peek().is_some() {
        let transaction = client.transaction().await?;
        let mut inserted = 0i64;
        for entry in records.by_ref().take(IMPORT_BATCH) {
            let (namespace, key, record) = entry.map_err(ImportError::Source)?;
            highest = highest.max(record.fencing_token.0);
            let columns = RecordColumns::of(&record);
            let row = transaction
                .query_opt(
                    &upsert,
                    &[
                        &namespace.as_str(),
                        &key.as_str(),
                        &record.fingerprint.as_bytes(),
                        &columns.fencing_token,
                        &i64::from(record.attempt),
                        &record.owner.as_str(),
                        &columns.retention_ms,
                        &record.updated_at.unix_millis(),
                        &columns.state,
                        &columns.token,
                        &columns.lease_expires_at,
                        &columns.request_id,
                        &columns.takeover,
                        &columns.response,
                        &columns.completed_at,
                        &record.expires_at().unix_millis(),
                    ],
                )
                .await?;
            match row.map(|row| row.get::<_, bool>(0)) {
                Some(true) => {
                    inserted += 1;
                    report.inserted += 1;
                }
                Some(false) => report.replaced += 1,
                None => report.kept += 1,
            }
        }
        transaction.execute("UPDATE record_count SET n = n + $1 WHERE shard = 0", &[&inserted]).await?;
        transaction.commit().await?;
    }
    // Tokens are drawn from a bigint sequence, so none can be above i64::MAX.
    let floor = i64::try_from(highest).unwrap_or(i64::MAX);
    let row = client
        .query_one(
            "SELECT setval('fencing_tokens', greatest($1, (SELECT last_value FROM fencing_tokens)))",
            &[&floor.max(1)],
        )
        .await?;
    report.fencing_floor = u64::try_from(row.get::<_, i64>(0)).unwrap_or(0);
    drop(client);
    let _ = connection.await;
    Ok(report)
}

/// A record's state-dependent columns, as `records` stores them.
struct RecordColumns {
    fencing_token: i64,
    retention_ms: i64,
    state: i16,
    token: uuid::Uuid,
    lease_expires_at: Option<i64>,
    request_id: Option<String>,
    takeover: bool,
    response: Option<Vec<u8>>,
    completed_at: Option<i64>,
}

impl RecordColumns {
    fn of(record: &Record) -> Self {
        let (state, token, lease_expires_at, request_id, takeover, response, completed_at) = match &record.state {
            RecordState::Held(lease) => (
                1,
                lease.token,
                Some(lease.expires_at.unix_millis()),
                lease.request_id.as_ref().map(|id| id.as_str().to_owned()),
                lease.takeover,
                None,
                None,
            ),
            RecordState::Released { by } => (2, *by, None, None, false, None, None),
            RecordState::Completed { by, response, completed_at } => {
                (3, *by, None, None, false, Some(encode_response(response)), Some(completed_at.unix_millis()))
            }
        };
        RecordColumns {
            fencing_token: i64::try_from(record.fencing_token.0).unwrap_or(i64::MAX),
            retention_ms: i64::try_from(record.retention_millis).unwrap_or(i64::MAX),
            state,
            token: token.as_uuid(),
            lease_expires_at,
            request_id,
            takeover,
            response,
            completed_at,
        }
    }
}

/// The tokio-postgres configuration for the store's connections: its schema on the search path,
/// a statement timeout, TCP keepalives and a connect timeout.
fn connection_config(options: &PostgresOptions) -> Result<tokio_postgres::Config, PostgresOpenError> {
    if !valid_schema_name(&options.schema) {
        return Err(PostgresOpenError::Config(format!(
            "schema name {:?}: use 1 to 48 lowercase letters, digits and underscores, not starting with a digit",
            options.schema
        )));
    }
    let mut config: tokio_postgres::Config =
        options.url.parse().map_err(|error| PostgresOpenError::Config(format!("{}: {error}", redact(&options.url))))?;
    let timeout_ms = options.timeout.as_millis().max(1);
    config
        .options(format!("-c search_path={} -c statement_timeout={timeout_ms}", options.schema))
        .application_name("idempotency-coordinator")
        .connect_timeout(options.timeout)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30));
    Ok(config)
}

fn valid_schema_name(schema: &str) -> bool {
    let mut chars = schema.chars();
    matches!(chars.next(), Some('a'..='z' | '_'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
        && schema.len() <= 48
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}@{}", &url[..scheme + 3], user, &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

fn describe(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", config.get_dbname().unwrap_or(""))
}

/// The NOTIFY channel of a schema's key changes.
fn channel(schema: &str) -> String {
    format!("{schema}.keys")
}

enum MigrateError {
    Database(tokio_postgres::Error),
    TooNew { found: i32, supported: i32 },
}

impl From<tokio_postgres::Error> for MigrateError {
    fn from(error: tokio_postgres::Error) -> Self {
        MigrateError::Database(error)
    }
}

/// Applies the migrations the schema lacks, in one transaction under an advisory lock, so that
/// replicas starting at once apply each exactly once.
async fn migrate(client: &mut tokio_postgres::Client, schema: &str) -> Result<(), MigrateError> {
    let transaction = client.transaction().await?;
    transaction
        .execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&format!("idempotency-coordinator:{schema}")])
        .await?;
    transaction
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             SET LOCAL search_path TO {schema};
             SET LOCAL client_min_messages TO warning;
             CREATE TABLE IF NOT EXISTS schema_migrations (
                 version integer PRIMARY KEY,
                 description text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );"
        ))
        .await?;
    let current: i32 =
        transaction.query_one("SELECT coalesce(max(version), 0) FROM schema_migrations", &[]).await?.get(0);
    let supported = MIGRATIONS.last().map_or(0, |(version, _, _)| *version);
    if current > supported {
        return Err(MigrateError::TooNew { found: current, supported });
    }
    for (version, description, sql) in MIGRATIONS.iter().filter(|(version, _, _)| *version > current) {
        tracing::info!(schema, version, description, "applying migration");
        transaction.batch_execute(sql).await?;
        transaction
            .execute("INSERT INTO schema_migrations (version, description) VALUES ($1, $2)", &[version, description])
            .await?;
    }
    transaction.commit().await?;
    Ok(())
}

/// Keeps one connection LISTENing for key changes made through any replica, and forwards them as
/// wake-ups; after each (re)connect it wakes every waiter, since changes may have been missed.
async fn listen_task(
    config: tokio_postgres::Config,
    channel: String,
    wakeups: mpsc::UnboundedSender<Wakeup>,
    stop: CancellationToken,
) {
    let mut connected_before = false;
    loop {
        let session = async {
            let (client, mut connection) = config.connect(NoTls).await?;
            let (messages_tx, mut messages) = mpsc::unbounded_channel();
            let pump = tokio::spawn(async move {
                while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    match message {
                        Ok(AsyncMessage::Notification(notification)) => {
                            let _ = messages_tx.send(notification.payload().to_owned());
                        }
                        Ok(_) => {}
                        Err(error) => {
                            tracing::warn!(%error, "the LISTEN connection failed");
                            break;
                        }
                    }
                }
            });
            client.batch_execute(&format!("LISTEN \"{channel}\"")).await?;
            if connected_before {
                tracing::info!("LISTEN connection re-established");
            }
            let _ = wakeups.send(Wakeup::All);
            connected_before = true;
            while let Some(payload) = messages.recv().await {
                if let Some(wakeup) = parse_payload(&payload) {
                    let _ = wakeups.send(wakeup);
                }
            }
            pump.abort();
            drop(client);
            Ok::<(), tokio_postgres::Error>(())
        };
        tokio::select! {
            () = stop.cancelled() => return,
            result = session => {
                if let Err(error) = result {
                    tracing::debug!(%error, "cannot LISTEN; retrying");
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// Reads `<namespace length>:<namespace><key>`, as `notify_waiters` writes it.
fn parse_payload(payload: &str) -> Option<Wakeup> {
    let (length, rest) = payload.split_once(':')?;
    let length: usize = length.parse().ok()?;
    let namespace = Namespace::parse(rest.get(..length)?).ok()?;
    let key = Key::parse(rest.get(length..)?).ok()?;
    Some(Wakeup::Key(namespace, key))
}

impl Inner {
    fn now_param(&self, now: Timestamp) -> Option<i64> {
        match self.time {
            TimeSource::Database => None,
            TimeSource::Caller => Some(now.unix_millis()),
        }
    }

    async fn query_one(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row, StoreError> {
        let call = async {
            let client = self.pool.get().await.map_err(|error| StoreError::Unavailable(with_causes(&error)))?;
            let statement = client.prepare_cached(sql).await.map_err(database_error)?;
            client.query_one(&statement, params).await.map_err(database_error)
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(format!(
                "the database did not answer within {}",
                humantime::format_duration(self.timeout)
            ))),
        }
    }

    /// The `p_max_records` argument: the limit while the store may be near it, `None` (skip the
    /// count) while the last count is more than a tenth of the limit below it.
    fn max_records_param(&self) -> Option<i64> {
        let margin = (self.max_records / 10).max(1_000);
        let near = self.records.load(Ordering::Relaxed).saturating_add(margin) >= self.max_records;
        near.then(|| i64::try_from(self.max_records).unwrap_or(i64::MAX))
    }

    async fn check_health(&self) {
        let before = self.local.now().unix_millis();
        let result = self.query_one("SELECT now_ms(NULL), coalesce(sum(n), 0)::bigint FROM record_count", &[]).await;
        let after = self.local.now().unix_millis();
        match result {
            Ok(row) => {
                let database_now: i64 = row.get(0);
                let records: i64 = row.get(1);
                let local_mid = before / 2 + after / 2;
                self.clock_offset_ms.store(database_now - local_mid, Ordering::Relaxed);
                self.records.store(u64::try_from(records).unwrap_or(0), Ordering::Relaxed);
                self.healthy.send_if_modified(|healthy| !std::mem::replace(healthy, true));
            }
            Err(error) => {
                if self.healthy.send_if_modified(|healthy| std::mem::replace(healthy, false)) {
                    tracing::error!(%error, "PostgreSQL unreachable");
                }
            }
        }
    }

    async fn health_task(self: Arc<Self>) {
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(HEALTH_INTERVAL) => self.check_health().await,
            }
        }
    }
}

/// Connection trouble, timeouts and a database that is shutting down or overloaded are
/// UNAVAILABLE (the call may or may not have taken effect); anything else is a fault.
fn database_error(error: tokio_postgres::Error) -> StoreError {
    match error.code() {
        None => StoreError::Unavailable(with_causes(&error)),
        Some(code) => {
            let class = code.code().get(..2).unwrap_or("");
            if matches!(class, "08" | "40" | "53" | "57" | "58") {
                StoreError::Unavailable(error.to_string())
            } else {
                StoreError::Corrupt(format!("PostgreSQL refused a statement: {error}"))
            }
        }
    }
}

/// An error and its sources on one line ("error connecting to server: Connection refused …").
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("PostgreSQL returned {what}"))
}

/// The outcome row of a transition function.
struct Outcome<'a>(&'a Row);

impl Outcome<'_> {
    fn code(&self) -> i16 {
        self.0.get("code")
    }
    fn now(&self) -> Timestamp {
        Timestamp::from_unix_millis(self.0.get("now_ms"))
    }
    fn time(&self, column: &str) -> Result<Timestamp, StoreError> {
        self.0.get::<_, Option<i64>>(column).map(Timestamp::from_unix_millis).ok_or_else(|| corrupt(column))
    }
    fn fencing_token(&self) -> Result<FencingToken, StoreError> {
        let token: Option<i64> = self.0.get("fencing_token");
        token.and_then(|token| u64::try_from(token).ok()).map(FencingToken).ok_or_else(|| corrupt("no fencing token"))
    }
    fn attempt(&self) -> Result<u32, StoreError> {
        let attempt: Option<i64> = self.0.get("attempt");
        attempt.and_then(|attempt| u32::try_from(attempt).ok()).ok_or_else(|| corrupt("no attempt"))
    }
    fn owner(&self) -> Result<Owner, StoreError> {
        let owner: Option<&str> = self.0.get("owner");
        owner.and_then(|owner| Owner::parse(owner).ok()).ok_or_else(|| corrupt("no owner"))
    }
    fn token(&self) -> Result<LeaseToken, StoreError> {
        let token: Option<uuid::Uuid> = self.0.get("token");
        token.map(LeaseToken::from_uuid).ok_or_else(|| corrupt("no lease token"))
    }
    fn response(&self) -> Result<Response, StoreError> {
        let bytes: Option<&[u8]> = self.0.get("response");
        decode_response(bytes.ok_or_else(|| corrupt("no response"))?)
    }
    fn rejection(&self) -> Option<StoreError> {
        match self.code() {
            10 => Some(Rejection::FingerprintMismatch.into()),
            12 => Some(Rejection::LeaseLost.into()),
            13 => Some(Rejection::AlreadyCompleted.into()),
            14 => Some(Rejection::NotFound.into()),
            _ => None,
        }
    }
}

/// The first byte of a stored response, so that its layout can change later.
const RESPONSE_ENCODING_VERSION: u8 = 1;

/// A response as stored in the `response` column (opaque to SQL).
pub fn encode_response(response: &Response) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(response.size() + 16);
    bytes.push(RESPONSE_ENCODING_VERSION);
    postcard::to_io(response, &mut bytes).expect("a response always encodes");
    bytes
}

fn decode_response(bytes: &[u8]) -> Result<Response, StoreError> {
    match bytes.split_first() {
        Some((&RESPONSE_ENCODING_VERSION, rest)) => {
            postcard::from_bytes(rest).map_err(|error| StoreError::Corrupt(format!("undecodable response: {error}")))
        }
        _ => Err(StoreError::Corrupt("a response of unknown encoding".to_owned())),
    }
}

const CLAIM: &str = "SELECT * FROM claim($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";
const COMPLETE: &str = "SELECT * FROM complete($1, $2, $3, $4, $5, $6)";
const RENEW: &str = "SELECT * FROM renew($1, $2, $3, $4, $5)";
const RELEASE: &str = "SELECT * FROM release($1, $2, $3, $4)";
const LOOKUP: &str = "SELECT now_ms($3) AS now_ms, r.* FROM (SELECT 1) AS one
    LEFT JOIN records r ON r.namespace = $1 AND r.key = $2";
const SWEEP: &str = "SELECT sweep($1, $2)";

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Reads a row of `records` (the columns of the table) into the domain's record.
pub(crate) fn record_from_row(row: &Row) -> Result<Record, StoreError> {
    let token = LeaseToken::from_uuid(row.try_get("token").map_err(|_| corrupt("a record without token"))?);
    let time = |column: &str| -> Result<Timestamp, StoreError> {
        let value: Option<i64> = row.get(column);
        value.map(Timestamp::from_unix_millis).ok_or_else(|| corrupt(column))
    };
    let state: i16 = row.get("state");
    let state = match state {
        1 => {
            let request_id: Option<&str> = row.get("request_id");
            RecordState::Held(Lease {
                token,
                expires_at: time("lease_expires_at")?,
                request_id: RequestId::parse_optional(request_id.unwrap_or(""))
                    .map_err(|_| corrupt("an invalid request id"))?,
                takeover: row.get("takeover"),
            })
        }
        2 => RecordState::Released { by: token },
        3 => {
            let response: Option<&[u8]> = row.get("response");
            RecordState::Completed {
                by: token,
                response: decode_response(response.ok_or_else(|| corrupt("a completed record without response"))?)?,
                completed_at: time("completed_at")?,
            }
        }
        _ => return Err(corrupt("an unknown record state")),
    };
    let fingerprint: &[u8] = row.get("fingerprint");
    let owner: &str = row.get("owner");
    let fencing_token: i64 = row.get("fencing_token");
    let attempt: i64 = row.get("attempt");
    let retention_ms: i64 = row.get("retention_ms");
    Ok(Record {
        fingerprint: Fingerprint::parse(fingerprint).map_err(|_| corrupt("an invalid fingerprint"))?,
        fencing_token: FencingToken(u64::try_from(fencing_token).map_err(|_| corrupt("a negative fencing token"))?),
        attempt: u32::try_from(attempt).map_err(|_| corrupt("an attempt out of range"))?,
        owner: Owner::parse(owner).map_err(|_| corrupt("an invalid owner"))?,
        retention_millis: u64::try_from(retention_ms).map_err(|_| corrupt("a negative retention"))?,
        updated_at: time("updated_at")?,
        state,
    })
}

impl Store for PostgresStore {
    async fn claim(
        &self,
        namespace: &Namespace,
        key: &Key,
        now: Timestamp,
        command: &Claim,
        waiting: bool,
    ) -> Result<ClaimOutcome, StoreError> {
        let inner = &self.inner;
        let row = inner
            .query_one(
                CLAIM,
                &[
                    &namespace.as_str(),
                    &key.as_str(),
                    &inner.now_param(now),
                    &command.fingerprint.as_bytes(),
                    &millis(command.lease_ttl),
                    &millis(command.retention),
                    &command.request_id.as_ref().map(RequestId::as_str),
                    &command.owner.as_str(),
                    &command.new_lease_token.as_uuid(),
                    &inner.max_records_param(),
                    &waiting,
                ],
            )
            .await?;
        let outcome = Outcome(&row);
        if let Some(rejection) = outcome.rejection() {
            return Err(rejection);
        }
        match outcome.code() {
            1 => Ok(ClaimOutcome::Acquired(Grant {
                lease_token: outcome.token()?,
                fencing_token: outcome.fencing_token()?,
                lease_expires_at: outcome.time("lease_expires_at")?,
                attempt: outcome.attempt()?,
                takeover: row.get::<_, Option<bool>>("takeover").unwrap_or(false),
            })),
            2 => {
                let lease_expires_at = outcome.time("lease_expires_at")?;
                Ok(ClaimOutcome::InProgress {
                    lease_expires_at,
                    attempt: outcome.attempt()?,
                    owner: outcome.owner()?,
                    retry_after: lease_expires_at.since(outcome.now()).min(MAX_RETRY_AFTER),
                })
            }
            3 => Ok(ClaimOutcome::Completed(StoredResponse {
                response: outcome.response()?,
                completed_at: outcome.time("completed_at")?,
                expires_at: outcome.time("expires_at")?,
                fencing_token: outcome.fencing_token()?,
            })),
            11 => Err(StoreError::Full { max_records: inner.max_records }),
            code => Err(corrupt(&format!("the unknown claim outcome {code}"))),
        }
    }

    async fn complete(
        &self,
        namespace: &Namespace,
        key: &Key,
        now: Timestamp,
        command: Complete,
    ) -> Result<CompleteOutcome, StoreError> {
        let inner = &self.inner;
        let response = encode_response(&command.response);
        let row = inner
            .query_one(
                COMPLETE,
                &[
                    &namespace.as_str(),
                    &key.as_str(),
                    &inner.now_param(now),
                    &command.lease_token.as_uuid(),
                    &response,
                    &command.retention.map(millis),
                ],
            )
            .await?;
        let outcome = Outcome(&row);
        if let Some(rejection) = outcome.rejection() {
            return Err(rejection);
        }
        Ok(CompleteOutcome {
            completed_at: outcome.time("completed_at")?,
            expires_at: outcome.time("expires_at")?,
            fencing_token: outcome.fencing_token()?,
            already_completed: outcome.code() == 4,
        })
    }

    async fn renew(
        &self,
        namespace: &Namespace,
        key: &Key,
        now: Timestamp,
        command: &Renew,
    ) -> Result<RenewOutcome, StoreError> {
        let inner = &self.inner;
        let row = inner
            .query_one(
                RENEW,
                &[
                    &namespace.as_str(),
                    &key.as_str(),
                    &inner.now_param(now),
                    &command.lease_token.as_uuid(),
                    &millis(command.lease_ttl),
                ],
            )
            .await?;
        let outcome = Outcome(&row);
        if let Some(rejection) = outcome.rejection() {
            return Err(rejection);
        }
        Ok(RenewOutcome {
            lease_expires_at: outcome.time("lease_expires_at")?,
            fencing_token: outcome.fencing_token()?,
        })
    }

    async fn release(
        &self,
        namespace: &Namespace,
        key: &Key,
        now: Timestamp,
        command: &Release,
    ) -> Result<(), StoreError> {
        let inner = &self.inner;
        let row = inner
            .query_one(
                RELEASE,
                &[&namespace.as_str(), &key.as_str(), &inner.now_param(now), &command.lease_token.as_uuid()],
            )
            .await?;
        match Outcome(&row).rejection() {
            Some(rejection) => Err(rejection),
            None => Ok(()),
        }
    }

    async fn lookup(&self, namespace: &Namespace, key: &Key, now: Timestamp) -> Result<KeyView, StoreError> {
        let inner = &self.inner;
        let row = inner.query_one(LOOKUP, &[&namespace.as_str(), &key.as_str(), &inner.now_param(now)]).await?;
        let now = Timestamp::from_unix_millis(row.get("now_ms"));
        let state: Option<i16> = row.get("state");
        let record = match state {
            None => None,
            Some(_) => Some(record_from_row(&row)?),
        };
        Ok(machine::lookup(now, record.as_ref())?)
    }

    async fn sweep(&self, now: Timestamp, batch: usize) -> Result<SweepReport, StoreError> {
        let inner = &self.inner;
        let batch_param = i32::try_from(batch).unwrap_or(i32::MAX);
        let row = inner.query_one(SWEEP, &[&inner.now_param(now), &batch_param]).await?;
        let deleted: i32 = row.get(0);
        let deleted = usize::try_from(deleted).unwrap_or(0);
        Ok(SweepReport { deleted, scanned: deleted, more: deleted >= batch })
    }

    fn record_count(&self) -> u64 {
        self.inner.records.load(Ordering::Relaxed)
    }

    fn health(&self) -> watch::Receiver<bool> {
        self.inner.healthy.subscribe()
    }

    fn wakeups(&self) -> Option<mpsc::UnboundedReceiver<Wakeup>> {
        self.inner.wakeups.lock().take()
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.inner.stop.cancel();
        let tasks: Vec<_> = self.inner.tasks.lock().drain(..).collect();
        for task in tasks {
            let _ = task.await;
        }
        self.inner.pool.close();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_plain_identifiers() {
        for good in ["idempotency", "_x", "tenant_2"] {
            assert!(valid_schema_name(good), "{good}");
        }
        for bad in ["", "2x", "Upper", "a-b", "a.b", "x\"; DROP TABLE y", &"a".repeat(49)] {
            assert!(!valid_schema_name(bad), "{bad}");
        }
    }

    #[test]
    fn unavailable_errors_name_their_cause() {
        #[derive(Debug, thiserror::Error)]
        #[error("error connecting to server")]
        struct Outer(#[source] std::io::Error);
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        assert_eq!(with_causes(&Outer(refused)), "error connecting to server: Connection refused");
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(redact("postgres://app:secret@db:5432/x"), "postgres://app@db:5432/x");
        assert_eq!(redact("postgres://db/x"), "postgres://db/x");
    }

    #[test]
    fn notification_payloads_round_trip_and_garbage_is_ignored() {
        let Some(Wakeup::Key(namespace, key)) = parse_payload("8:paymentsorder:1:2") else { panic!("parses") };
        assert_eq!((namespace.as_str(), key.as_str()), ("payments", "order:1:2"));
        for bad in ["", "x", "99:short", "3:abc", "-1:abc"] {
            assert!(parse_payload(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn responses_round_trip_and_unknown_encodings_are_refused() {
        let response = Response { body: vec![0, 1, 255], metadata: [("status".into(), "201".into())].into() };
        assert_eq!(decode_response(&encode_response(&response)).unwrap(), response);
        assert!(decode_response(&[]).is_err());
        assert!(decode_response(&[9, 0]).is_err());
    }
}
