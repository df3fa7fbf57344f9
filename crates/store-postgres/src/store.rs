//! [`PostgresStore`]: the [`Store`] on PostgreSQL, its options, and its health task.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use idempotency_core::clock::Clock;
use idempotency_core::domain::machine::{self, MAX_RETRY_AFTER};
use idempotency_core::domain::{
    Claim, ClaimOutcome, Complete, CompleteOutcome, Grant, Key, KeyView, Namespace, Release, Renew, RenewOutcome,
    Replay, Timestamp,
};
use idempotency_core::stats::{AtomicHistogram, BATCH_SIZE_BOUNDS, PoolStats, STATEMENT_SECONDS_BOUNDS, StoreStats};
use idempotency_core::store::{Store, StoreError, SweepReport, Wakeup};
use parking_lot::{Mutex, RwLock};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};
use tokio_util::sync::CancellationToken;

use crate::batch::{self, Batched, Database, Failed, Queue};
use crate::codes::OutcomeCode;
use crate::connection::{PostgresOpenError, connection_config, describe};
use crate::listen::listen_task;
use crate::rows::{Outcome, corrupt, encode_response, millis, record_from_row};
use crate::schema::{MigrateError, channel, migrate};

/// How often each replica checks the database (health, clock offset, record count).
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// Where the PostgreSQL store reads time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeSource {
    /// The database's clock: what every replica in production uses.
    Database,
    /// The `now` passed by the caller, for tests that drive a manual clock (a test seam).
    #[cfg(any(test, feature = "testing"))]
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
    /// The password, when it is not in `url` (read from a file by the caller, so that it appears
    /// neither on a command line nor in an environment).
    pub password: Option<Password>,
}

/// A database password: shown as `<redacted>` by `Debug`.
#[derive(Clone)]
pub struct Password(pub String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Records in PostgreSQL, shared by every replica pointed at the same database and schema.
#[derive(Clone)]
pub struct PostgresStore {
    pub(crate) inner: Arc<PoolState>,
}

pub(crate) struct PoolState {
    pub(crate) pool: Pool,
    time: TimeSource,
    max_records: u64,
    pub(crate) timeout: Duration,
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
    /// The per-namespace record quotas, by namespace.
    quotas: RwLock<HashMap<String, u64>>,
    /// How long each statement took once it had a connection.
    statements: AtomicHistogram,
    /// Times the LISTEN connection was opened again.
    listen_reconnects: Arc<AtomicU64>,
    /// Claims and Completes waiting for a batch (see [`crate::batch`]).
    claims: Queue<ClaimItem>,
    completes: Queue<CompleteItem>,
    /// How many items each Claim or Complete statement carried.
    batch_sizes: AtomicHistogram,
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
            inner: Arc::new(PoolState {
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
                quotas: RwLock::new(HashMap::new()),
                statements: AtomicHistogram::new(STATEMENT_SECONDS_BOUNDS),
                listen_reconnects: Arc::new(AtomicU64::new(0)),
                claims: Queue::default(),
                completes: Queue::default(),
                batch_sizes: AtomicHistogram::new(BATCH_SIZE_BOUNDS),
            }),
        };
        store.inner.check_health().await;
        let health = tokio::spawn(Arc::clone(&store.inner).health_task());
        let listen = tokio::spawn(listen_task(
            config,
            channel(&options.schema),
            wake_tx,
            store.inner.stop.clone(),
            Arc::clone(&store.inner.listen_reconnects),
        ));
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

    /// The record stored for a key, expired or not, as its row reads, with the row's own
    /// `expires_at` column (what SQL decides expiry and sweeping by). A test seam: the
    /// differential test compares both with what the state machine would store.
    #[cfg(any(test, feature = "testing"))]
    pub async fn stored_record(
        &self,
        namespace: &Namespace,
        key: &Key,
    ) -> Result<Option<(idempotency_core::domain::Record, Timestamp)>, StoreError> {
        let row = self.inner.query_one(LOOKUP, &[&namespace.as_str(), &key.as_str(), &None::<i64>]).await?;
        match row.get::<_, Option<i16>>("state") {
            None => Ok(None),
            Some(_) => {
                let expires_at = Timestamp::from_unix_millis(row.get("expires_at"));
                record_from_row(&row).map(|record| Some((record, expires_at)))
            }
        }
    }

    /// A digest of every stored record and the fencing sequence, to show that a call changed
    /// nothing (tests).
    #[cfg(any(test, feature = "testing"))]
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

impl PoolState {
    fn now_param(&self, now: Timestamp) -> Option<i64> {
        match self.time {
            TimeSource::Database => {
                let _ = now;
                None
            }
            #[cfg(any(test, feature = "testing"))]
            TimeSource::Caller => Some(now.unix_millis()),
        }
    }

    async fn query_one(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row, StoreError> {
        let rows = self.query(sql, params).await.map_err(|failed| failed.error)?;
        let count = rows.len();
        let mut rows = rows.into_iter();
        match (rows.next(), rows.next()) {
            (Some(row), None) => Ok(row),
            _ => Err(StoreError::Corrupt(format!("a statement returned {count} rows where one was expected"))),
        }
    }

    /// Runs one statement on a pooled connection, within the store's timeout.
    pub(crate) async fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, Failed> {
        let call = async {
            let client = self
                .pool
                .get()
                .await
                .map_err(|error| StoreError::unavailable_because("no database connection", error))?;
            let started = std::time::Instant::now();
            let statement = client.prepare_cached(sql).await.map_err(Failed::from_database)?;
            let rows = client.query(&statement, params).await.map_err(Failed::from_database);
            self.statements.observe_duration(started.elapsed());
            rows
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(Failed::from(StoreError::unavailable(format!(
                "the database did not answer within {}",
                humantime::format_duration(self.timeout)
            )))),
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

const CLAIM: &str = "SELECT * FROM claim_core($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, NULL)";
const CLAIM_MANY: &str = "SELECT * FROM claim_many($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)";
const COMPLETE: &str = "SELECT * FROM complete($1, $2, $3, $4, $5, $6)";
const COMPLETE_MANY: &str = "SELECT * FROM complete_many($1, $2, $3, $4, $5, $6)";
const RENEW: &str = "SELECT * FROM renew($1, $2, $3, $4, $5)";
const RELEASE: &str = "SELECT * FROM release($1, $2, $3, $4)";
const LOOKUP: &str = "SELECT now_ms($3) AS now_ms, r.* FROM (SELECT 1) AS one
    LEFT JOIN records r ON r.namespace = $1 AND r.key = $2";
const SWEEP: &str = "SELECT sweep($1, $2)";

impl Database for PoolState {
    type Output = Row;

    fn observe(&self, items: usize) {
        self.batch_sizes.observe(items as f64);
    }

    fn position(row: &Row) -> Option<usize> {
        row.try_get::<_, i32>("item").ok().and_then(|item| usize::try_from(item).ok())
    }
}

/// A Claim waiting for its batch: the arguments of `claim_core`, but the store's limit, which is
/// the batch's.
pub(crate) struct ClaimItem {
    namespace: String,
    key: String,
    now: Option<i64>,
    fingerprint: Vec<u8>,
    lease_ms: i64,
    retention_ms: i64,
    request_id: Option<String>,
    owner: String,
    token: uuid::Uuid,
    namespace_max: Option<i64>,
    wait: bool,
}

impl Batched for ClaimItem {
    type State = PoolState;

    fn queue(state: &PoolState) -> &Queue<Self> {
        &state.claims
    }

    async fn one(state: &PoolState, item: &Self) -> Result<Row, StoreError> {
        state
            .query_one(
                CLAIM,
                &[
                    &item.namespace,
                    &item.key,
                    &item.now,
                    &item.fingerprint,
                    &item.lease_ms,
                    &item.retention_ms,
                    &item.request_id,
                    &item.owner,
                    &item.token,
                    &state.max_records_param(),
                    &item.namespace_max,
                    &item.wait,
                ],
            )
            .await
    }

    async fn many(state: &PoolState, items: &[Self]) -> Result<Vec<Row>, Failed> {
        let namespaces: Vec<&str> = items.iter().map(|item| item.namespace.as_str()).collect();
        let keys: Vec<&str> = items.iter().map(|item| item.key.as_str()).collect();
        let nows: Vec<Option<i64>> = items.iter().map(|item| item.now).collect();
        let fingerprints: Vec<&[u8]> = items.iter().map(|item| item.fingerprint.as_slice()).collect();
        let leases: Vec<i64> = items.iter().map(|item| item.lease_ms).collect();
        let retentions: Vec<i64> = items.iter().map(|item| item.retention_ms).collect();
        let request_ids: Vec<Option<&str>> = items.iter().map(|item| item.request_id.as_deref()).collect();
        let owners: Vec<&str> = items.iter().map(|item| item.owner.as_str()).collect();
        let tokens: Vec<uuid::Uuid> = items.iter().map(|item| item.token).collect();
        let namespace_maxes: Vec<Option<i64>> = items.iter().map(|item| item.namespace_max).collect();
        let waits: Vec<bool> = items.iter().map(|item| item.wait).collect();
        state
            .query(
                CLAIM_MANY,
                &[
                    &namespaces,
                    &keys,
                    &nows,
                    &fingerprints,
                    &leases,
                    &retentions,
                    &request_ids,
                    &owners,
                    &tokens,
                    &state.max_records_param(),
                    &namespace_maxes,
                    &waits,
                ],
            )
            .await
    }
}

/// A Complete waiting for its batch: the arguments of `complete`.
pub(crate) struct CompleteItem {
    namespace: String,
    key: String,
    now: Option<i64>,
    token: uuid::Uuid,
    response: Vec<u8>,
    retention_ms: Option<i64>,
}

impl Batched for CompleteItem {
    type State = PoolState;

    fn queue(state: &PoolState) -> &Queue<Self> {
        &state.completes
    }

    async fn one(state: &PoolState, item: &Self) -> Result<Row, StoreError> {
        state
            .query_one(
                COMPLETE,
                &[&item.namespace, &item.key, &item.now, &item.token, &item.response, &item.retention_ms],
            )
            .await
    }

    async fn many(state: &PoolState, items: &[Self]) -> Result<Vec<Row>, Failed> {
        let namespaces: Vec<&str> = items.iter().map(|item| item.namespace.as_str()).collect();
        let keys: Vec<&str> = items.iter().map(|item| item.key.as_str()).collect();
        let nows: Vec<Option<i64>> = items.iter().map(|item| item.now).collect();
        let tokens: Vec<uuid::Uuid> = items.iter().map(|item| item.token).collect();
        let responses: Vec<&[u8]> = items.iter().map(|item| item.response.as_slice()).collect();
        let retentions: Vec<Option<i64>> = items.iter().map(|item| item.retention_ms).collect();
        state.query(COMPLETE_MANY, &[&namespaces, &keys, &nows, &tokens, &responses, &retentions]).await
    }
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
        let namespace_max =
            inner.quotas.read().get(namespace.as_str()).map(|max| i64::try_from(*max).unwrap_or(i64::MAX));
        let item = ClaimItem {
            namespace: namespace.as_str().to_owned(),
            key: key.as_str().to_owned(),
            now: inner.now_param(now),
            fingerprint: command.fingerprint.as_bytes().to_vec(),
            lease_ms: millis(command.lease_ttl),
            retention_ms: millis(command.retention),
            request_id: command.request_id.as_ref().map(|id| id.as_str().to_owned()),
            owner: command.owner.as_str().to_owned(),
            token: command.new_lease_token.as_uuid(),
            namespace_max,
            wait: waiting,
        };
        let row = batch::submit(inner, item).await?;
        let outcome = Outcome(&row);
        if let Some(rejection) = outcome.rejection() {
            return Err(rejection);
        }
        match outcome.code()? {
            OutcomeCode::Done => Ok(ClaimOutcome::Acquired(Grant {
                lease_token: outcome.token()?,
                fencing_token: outcome.fencing_token()?,
                lease_expires_at: outcome.time("lease_expires_at")?,
                attempt: outcome.attempt()?,
                takeover: row.get::<_, Option<bool>>("takeover").unwrap_or(false),
            })),
            OutcomeCode::InProgress => {
                let lease_expires_at = outcome.time("lease_expires_at")?;
                Ok(ClaimOutcome::InProgress {
                    lease_expires_at,
                    attempt: outcome.attempt()?,
                    owner: outcome.owner()?,
                    retry_after: lease_expires_at.since(outcome.now()).min(MAX_RETRY_AFTER),
                })
            }
            OutcomeCode::Completed => Ok(ClaimOutcome::Completed(Replay {
                response: outcome.response()?,
                completed_at: outcome.time("completed_at")?,
                expires_at: outcome.time("expires_at")?,
                fencing_token: outcome.fencing_token()?,
            })),
            OutcomeCode::StoreFull => Err(StoreError::Full { max_records: inner.max_records }),
            OutcomeCode::NamespaceFull => Err(StoreError::NamespaceFull {
                max_records: inner.quotas.read().get(namespace.as_str()).copied().unwrap_or(0),
            }),
            code => Err(corrupt(&format!("the outcome {code:?} from claim"))),
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
        let item = CompleteItem {
            namespace: namespace.as_str().to_owned(),
            key: key.as_str().to_owned(),
            now: inner.now_param(now),
            token: command.lease_token.as_uuid(),
            response: encode_response(&command.response),
            retention_ms: command.retention.map(millis),
        };
        let row = batch::submit(inner, item).await?;
        let outcome = Outcome(&row);
        if let Some(rejection) = outcome.rejection() {
            return Err(rejection);
        }
        Ok(CompleteOutcome {
            completed_at: outcome.time("completed_at")?,
            expires_at: outcome.time("expires_at")?,
            fencing_token: outcome.fencing_token()?,
            already_completed: outcome.code()? == OutcomeCode::AlreadyCompletedByThisToken,
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

    fn set_namespace_quotas(&self, quotas: HashMap<Namespace, u64>) {
        *self.inner.quotas.write() =
            quotas.into_iter().map(|(namespace, max)| (namespace.as_str().to_owned(), max)).collect();
    }

    fn record_count(&self) -> u64 {
        self.inner.records.load(Ordering::Relaxed)
    }

    fn health(&self) -> watch::Receiver<bool> {
        self.inner.healthy.subscribe()
    }

    fn stats(&self) -> StoreStats {
        let pool = self.inner.pool.status();
        StoreStats {
            statement_seconds: Some(self.inner.statements.snapshot()),
            statement_batch_size: Some(self.inner.batch_sizes.snapshot()),
            pool: Some(PoolStats {
                size: pool.size as u64,
                in_use: pool.size.saturating_sub(pool.available) as u64,
                waiting: pool.waiting as u64,
            }),
            listen_reconnects: Some(self.inner.listen_reconnects.load(Ordering::Relaxed)),
            clock_offset_seconds: Some(self.inner.clock_offset_ms.load(Ordering::Relaxed) as f64 / 1_000.0),
            ..StoreStats::default()
        }
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
    use idempotency_core::domain::ApiResponse;

    use super::*;
    use crate::connection::{redact, valid_schema_name};
    use crate::listen::parse_payload;
    use crate::rows::decode_response;

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
    fn a_password_given_apart_is_used_and_never_shown() {
        let options = PostgresOptions {
            url: "postgres://app@db:5432/x".to_owned(),
            schema: "idempotency".to_owned(),
            pool_size: 1,
            timeout: Duration::from_secs(1),
            max_records: 10,
            time: TimeSource::Database,
            password: Some(Password("s3cret".to_owned())),
        };
        let config = crate::connection::connection_config(&options).unwrap();
        assert_eq!(config.get_password(), Some(&b"s3cret"[..]));
        assert!(!format!("{options:?}").contains("s3cret"));
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
        let response = ApiResponse { body: vec![0, 1, 255].into(), metadata: [("status".into(), "201".into())].into() };
        assert_eq!(decode_response(&encode_response(&response)).unwrap(), response);
        assert!(decode_response(&[]).is_err());
        assert!(decode_response(&[9, 0]).is_err());
    }
}
