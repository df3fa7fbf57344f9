//! The operators' side of the PostgreSQL store ([`Maintenance`]): census, listing, purging,
//! export and import. Rows are read into the domain's records and judged by the domain's rules
//! (what state a record is in, whether it is live), never by SQL of their own.

use std::pin::pin;

use deadpool_postgres::Object;
use futures::TryStreamExt;
use idempotency_core::admin::{AddressedRecord, Census, ImportCounts, ListQuery, Maintenance, RecordSummary};
use idempotency_core::domain::{ApiResponse, Key, Namespace, Record, Timestamp};
use idempotency_core::store::StoreError;
use tokio::sync::mpsc;
use tokio_postgres::IsolationLevel;
use tokio_postgres::types::ToSql;

use crate::codes::StateCode;
use crate::connection::database_error;
use crate::import::{ImportError, copy_records};
use crate::rows::{corrupt, encode_response, record_from_row};
use crate::store::PostgresStore;

/// How many rows a listing reads at a time while it fills a page.
const LIST_BATCH: i64 = 256;

impl PostgresStore {
    /// A connection of the pool (waiting at most the store's timeout for one). Admin calls run
    /// their statements without the per-statement timeout of the hot path: a scan takes as long
    /// as the table needs.
    async fn connection(&self) -> Result<Object, StoreError> {
        self.inner.pool.get().await.map_err(|error| StoreError::unavailable_because("no database connection", error))
    }
}

/// A row's namespace and key, checked.
fn address(row: &tokio_postgres::Row) -> Result<(Namespace, Key), StoreError> {
    let namespace = Namespace::parse(row.get("namespace")).map_err(|_| corrupt("an invalid namespace"))?;
    let key = Key::parse(row.get("key")).map_err(|_| corrupt("an invalid key"))?;
    Ok((namespace, key))
}

fn import_error(error: ImportError) -> StoreError {
    match error {
        ImportError::Database(error) => database_error(error),
        ImportError::Source(error) => error,
        ImportError::Open(error) => StoreError::unavailable_because("no database connection", error),
    }
}

impl Maintenance for PostgresStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn census(&self, namespace: Option<&Namespace>, now: Timestamp) -> Result<Census, StoreError> {
        let client = self.connection().await?;
        // Every column but the response, which a census does not need: a completed row gets an
        // empty one, so that it reads as a record.
        let statement = "SELECT namespace, key, fingerprint, fencing_token, attempt, owner, retention_ms, updated_at,
                state, token, lease_expires_at, request_id, takeover,
                CASE WHEN state = $1 THEN $2::bytea END AS response, completed_at, expires_at
             FROM records WHERE $3::text IS NULL OR namespace = $3";
        let empty = encode_response(&ApiResponse::default());
        let completed = StateCode::Completed as i16;
        let namespace = namespace.map(Namespace::as_str);
        let params: [&(dyn ToSql + Sync); 3] = [&completed, &empty, &namespace];
        let rows = client.query_raw(statement, params).await.map_err(database_error)?;
        let mut rows = pin!(rows);
        let mut census = Census::new();
        while let Some(row) = rows.try_next().await.map_err(database_error)? {
            let (namespace, _) = address(&row)?;
            census.entry(namespace).or_default().count(&record_from_row(&row)?, now);
        }
        Ok(census)
    }

    async fn list(&self, query: &ListQuery, now: Timestamp) -> Result<Vec<RecordSummary>, StoreError> {
        let client = self.connection().await?;
        // Bytewise key order, whatever the database's collation.
        let statement = client
            .prepare(
                "SELECT * FROM records
                 WHERE namespace = $1 AND key COLLATE \"C\" > $2 AND starts_with(key, $3)
                 ORDER BY key COLLATE \"C\" LIMIT $4",
            )
            .await
            .map_err(database_error)?;
        let mut after = query.after.as_ref().map_or(String::new(), |key| key.as_str().to_owned());
        let mut page = Vec::new();
        while page.len() < query.limit {
            let rows = client
                .query(&statement, &[&query.namespace.as_str(), &after, &query.prefix, &LIST_BATCH])
                .await
                .map_err(database_error)?;
            for row in &rows {
                let (_, key) = address(row)?;
                after = key.as_str().to_owned();
                if let Some(summary) = query.admit(key, &record_from_row(row)?, now) {
                    page.push(summary);
                    if page.len() == query.limit {
                        break;
                    }
                }
            }
            if rows.len() < LIST_BATCH as usize {
                break;
            }
        }
        Ok(page)
    }

    async fn purge(&self, namespace: &Namespace, key: Option<&Key>) -> Result<u64, StoreError> {
        let mut client = self.connection().await?;
        let transaction = client.transaction().await.map_err(database_error)?;
        let key = key.map(Key::as_str);
        let row = transaction
            .query_one(
                "WITH gone AS (DELETE FROM records WHERE namespace = $1 AND ($2::text IS NULL OR key = $2) RETURNING 1)
                 SELECT count(*) FROM gone",
                &[&namespace.as_str(), &key],
            )
            .await
            .map_err(database_error)?;
        let deleted: i64 = row.get(0);
        if deleted > 0 {
            transaction
                .execute("UPDATE record_count SET n = n - $1 WHERE shard = 0", &[&deleted])
                .await
                .map_err(database_error)?;
            transaction
                .execute(
                    "INSERT INTO namespace_records (namespace, shard, n) VALUES ($1, 0, -$2::bigint)
                     ON CONFLICT (namespace, shard) DO UPDATE SET n = namespace_records.n + EXCLUDED.n",
                    &[&namespace.as_str(), &deleted],
                )
                .await
                .map_err(database_error)?;
        }
        transaction.commit().await.map_err(database_error)?;
        Ok(u64::try_from(deleted).unwrap_or(0))
    }

    async fn export(
        &self,
        namespace: Option<&Namespace>,
        now: Timestamp,
        sink: mpsc::Sender<AddressedRecord>,
    ) -> Result<u64, StoreError> {
        let mut client = self.connection().await?;
        // One snapshot of the whole table: every record as of the same moment.
        let transaction = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(database_error)?;
        let namespace = namespace.map(Namespace::as_str);
        let params: [&(dyn ToSql + Sync); 1] = [&namespace];
        {
            let rows = transaction
                .query_raw("SELECT * FROM records WHERE $1::text IS NULL OR namespace = $1", params)
                .await
                .map_err(database_error)?;
            // Dropped at the end of this block, before the transaction ends, read whole or not.
            let mut rows = pin!(rows);
            while let Some(row) = rows.try_next().await.map_err(database_error)? {
                let (namespace, key) = address(&row)?;
                let record: Record = record_from_row(&row)?;
                if !record.is_expired(now) && sink.send((namespace, key, record)).await.is_err() {
                    break;
                }
            }
        }
        transaction.commit().await.map_err(database_error)?;
        // Read after the scan (sequences are outside transactions): every token drawn so far.
        let row = client.query_one("SELECT last_value FROM fencing_tokens", &[]).await.map_err(database_error)?;
        Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
    }

    async fn import(
        &self,
        records: Vec<AddressedRecord>,
        fencing_floor: u64,
        now: Timestamp,
    ) -> Result<ImportCounts, StoreError> {
        let mut client = self.connection().await?;
        let total = records.len() as u64;
        // The floor counts expired records' tokens too: they were granted.
        let floor = idempotency_core::admin::import_floor(fencing_floor, &records);
        let live: Vec<_> = records.into_iter().filter(|(_, _, record)| !record.is_expired(now)).collect();
        let expired = total - live.len() as u64;
        let report = copy_records(&mut client, live.into_iter().map(Ok), floor).await.map_err(import_error)?;
        Ok(ImportCounts {
            inserted: report.inserted,
            replaced: report.replaced,
            kept: report.kept,
            expired,
            fencing_floor: report.fencing_floor,
        })
    }
}
