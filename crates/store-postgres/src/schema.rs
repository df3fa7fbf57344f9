//! The embedded, versioned migrations of the store's schema, applied on start under an advisory
//! lock so that replicas starting together migrate once.

/// The embedded migrations, applied in order; a database at a later version than the last one
/// here was migrated by a newer release, and this one refuses to run against it.
pub(crate) const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "records", include_str!("sql/0001_records.sql")),
    (2, "lapsed leases kept a retention", include_str!("sql/0002_lapsed_leases_kept.sql")),
    (3, "records counted per namespace", include_str!("sql/0003_namespace_quotas.sql")),
    (4, "fewer statements per Claim and Complete", include_str!("sql/0004_fewer_statements.sql")),
    (5, "Claims and Completes in batches", include_str!("sql/0005_batches.sql")),
];

/// The NOTIFY channel of a schema's key changes.
pub(crate) fn channel(schema: &str) -> String {
    format!("{schema}.keys")
}

pub(crate) enum MigrateError {
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
pub(crate) async fn migrate(client: &mut tokio_postgres::Client, schema: &str) -> Result<(), MigrateError> {
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
