//! Connection settings, schema names, and what the database's errors mean for a call.

use std::time::Duration;

use idempotency_core::store::StoreError;

use crate::store::PostgresOptions;

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

/// The tokio-postgres configuration for the store's connections: its schema on the search path,
/// a statement timeout, TCP keepalives and a connect timeout.
pub(crate) fn connection_config(options: &PostgresOptions) -> Result<tokio_postgres::Config, PostgresOpenError> {
    if !valid_schema_name(&options.schema) {
        return Err(PostgresOpenError::Config(format!(
            "schema name {:?}: use 1 to 48 lowercase letters, digits and underscores, not starting with a digit",
            options.schema
        )));
    }
    let mut config: tokio_postgres::Config =
        options.url.parse().map_err(|error| PostgresOpenError::Config(format!("{}: {error}", redact(&options.url))))?;
    if let Some(password) = &options.password {
        config.password(password.0.as_bytes());
    }
    let timeout_ms = options.timeout.as_millis().max(1);
    config
        .options(format!("-c search_path={} -c statement_timeout={timeout_ms}", options.schema))
        .application_name("idempotency-coordinator")
        .connect_timeout(options.timeout)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30));
    Ok(config)
}

pub(crate) fn valid_schema_name(schema: &str) -> bool {
    let mut chars = schema.chars();
    matches!(chars.next(), Some('a'..='z' | '_'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
        && schema.len() <= 48
}

/// The URL without its password, for messages.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}@{}", &url[..scheme + 3], user, &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

pub(crate) fn describe(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", config.get_dbname().unwrap_or(""))
}

/// Connection trouble, timeouts and a database that is shutting down or overloaded are
/// UNAVAILABLE (the call may or may not have taken effect); anything else is a fault.
pub(crate) fn database_error(error: tokio_postgres::Error) -> StoreError {
    match error.code() {
        None => StoreError::unavailable_because("the database connection failed", error),
        Some(code) => {
            let class = code.code().get(..2).unwrap_or("");
            if matches!(class, "08" | "40" | "53" | "57" | "58") {
                StoreError::unavailable_because("the database cannot serve the call now", error)
            } else {
                StoreError::Corrupt(format!("PostgreSQL refused a statement: {error}"))
            }
        }
    }
}
