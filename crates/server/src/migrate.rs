//! `idempotency-coordinator migrate`: copies an embedded store's live records into PostgreSQL,
//! the step from one server to replicas on PostgreSQL.
//!
//! Safe to re-run: a key PostgreSQL already holds at the same or a later grant is left alone, so
//! a second run copies nothing new and never undoes what replicas did since. Fencing tokens keep
//! increasing: the sequence is set above every token the embedded store may have handed out.

use std::cell::Cell;
use std::path::{Path, PathBuf};

use idempotency_core::domain::Timestamp;
use idempotency_core::store::Store;
use idempotency_store_postgres::{ImportError, ImportReport, PostgresOptions};
use idempotency_store_sled::{Durability, OpenError, SledOptions, SledStore};

use crate::progress::Progress;

/// Why a migration stopped.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// `--from` is not a data directory.
    #[error("{0} is not a data directory")]
    NotADirectory(PathBuf),
    /// The embedded store could not be opened (a server still running on it holds its lock).
    #[error("{0} (is a server still running on it?)")]
    Source(#[from] OpenError),
    /// Copying into PostgreSQL failed; what was committed stays, and re-running is safe.
    #[error(transparent)]
    Import(#[from] ImportError),
}

/// What a migration did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrateReport {
    /// What the import did with the live records.
    pub import: ImportReport,
    /// Records left behind because their retention had ended.
    pub expired: u64,
}

/// Copies every record of the embedded store in `from` that is live at `now` into the
/// PostgreSQL store `to` (its schema migrated first).
pub async fn sled_to_postgres(
    from: &Path,
    to: &PostgresOptions,
    now: Timestamp,
) -> Result<MigrateReport, MigrateError> {
    if !from.is_dir() {
        return Err(MigrateError::NotADirectory(from.to_owned()));
    }
    let source = SledStore::open(&SledOptions {
        path: from.to_owned(),
        durability: Durability::Relaxed,
        max_records: u64::MAX,
        cache_capacity_bytes: 64 * 1024 * 1024,
        wal_file_bytes: idempotency_store_sled::WAL_FILE_BYTES,
    })?;
    let expired = Cell::new(0u64);
    let (records, fencing_floor) =
        source.export_all().map_err(|error| MigrateError::Import(ImportError::Source(error)))?;
    let progress = std::cell::RefCell::new(Progress::new("migrate", Some(source.record_count())));
    let live = records.inspect(|_| progress.borrow_mut().inc()).filter(|entry| match entry {
        Ok((_, _, record)) if record.is_expired(now) => {
            expired.set(expired.get() + 1);
            false
        }
        _ => true,
    });
    let import = idempotency_store_postgres::import(to, live, fencing_floor).await;
    progress.into_inner().finish();
    Ok(MigrateReport { import: import?, expired: expired.get() })
}
