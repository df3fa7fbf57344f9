//! Copying records into the store: what `migrate` and backups use.

use idempotency_core::domain::{Key, Namespace, Record};
use idempotency_core::store::StoreError;
use tokio_postgres::NoTls;

use crate::connection::{PostgresOpenError, connection_config, describe};
use crate::rows::RecordColumns;
use crate::schema::{MigrateError, migrate};
use crate::store::PostgresOptions;

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
    let report = copy_records(&mut client, records, fencing_floor).await;
    drop(client);
    let _ = connection.await;
    report
}

/// Copies `records` over `client` by the rules of [`import`] (the schema is migrated already),
/// in transactions of [`IMPORT_BATCH`] records, then raises the fencing-token sequence.
pub(crate) async fn copy_records(
    client: &mut tokio_postgres::Client,
    records: impl Iterator<Item = Result<(Namespace, Key, Record), StoreError>>,
    fencing_floor: u64,
) -> Result<ImportReport, ImportError> {
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
        let mut inserted_by_namespace: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
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
                    *inserted_by_namespace.entry(namespace.as_str().to_owned()).or_default() += 1;
                    report.inserted += 1;
                }
                Some(false) => report.replaced += 1,
                None => report.kept += 1,
            }
        }
        transaction.execute("UPDATE record_count SET n = n + $1 WHERE shard = 0", &[&inserted]).await?;
        for (namespace, added) in &inserted_by_namespace {
            transaction
                .execute(
                    "INSERT INTO namespace_records (namespace, shard, n) VALUES ($1, 0, $2)
                     ON CONFLICT (namespace, shard) DO UPDATE SET n = namespace_records.n + EXCLUDED.n",
                    &[namespace, added],
                )
                .await?;
        }
        transaction.commit().await?;
    }
    // Tokens are drawn from a bigint sequence, so none can be above i64::MAX.
    let floor = i64::try_from(highest).unwrap_or(i64::MAX);
    // Replicas may be drawing tokens meanwhile (an Admin import into a live store): ALTER SEQUENCE
    // blocks nextval until the transaction ends, so that reading the sequence and raising it are
    // one step and never move it back below a token just drawn.
    let transaction = client.transaction().await?;
    transaction.batch_execute("ALTER SEQUENCE fencing_tokens INCREMENT BY 1").await?;
    let row = transaction
        .query_one(
            "SELECT setval('fencing_tokens', greatest($1, (SELECT last_value FROM fencing_tokens)))",
            &[&floor.max(1)],
        )
        .await?;
    transaction.commit().await?;
    report.fencing_floor = u64::try_from(row.get::<_, i64>(0)).unwrap_or(0);
    Ok(report)
}
