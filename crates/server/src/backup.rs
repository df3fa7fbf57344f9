//! `backup` and `restore` of a stopped embedded store, through a [`snapshot`](crate::snapshot)
//! file.
//!
//! A backup holds the records live when it was taken and the store's fencing reservation; a
//! restore writes them into a new data directory and raises the fencing counter above that
//! reservation, so that no grant after a restore repeats or goes below one made before the
//! backup, and every lease held at backup time still works with its token after the restore.
//! Both refuse to run on a directory a server holds (sled's lock), and a restore refuses a
//! directory that holds anything: it never merges into, or replaces, a store.

use std::path::{Path, PathBuf};

use idempotency_core::domain::Timestamp;
use idempotency_core::store::{Store, StoreError};
use idempotency_store_sled::{Durability, ImportCounts, OpenError, SledOptions, SledStore};

use crate::progress::Progress;
use crate::snapshot::{SnapshotError, SnapshotReader, SnapshotWriter};

/// Why a backup or a restore stopped.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The data directory to back up does not exist.
    #[error("{0} is not a data directory")]
    NotADirectory(PathBuf),
    /// The data directory to restore into holds something already.
    #[error("{0} is not empty: restore writes a new data directory, it never merges into or replaces one")]
    NotEmpty(PathBuf),
    /// The embedded store could not be opened (a server still running on it holds its lock).
    #[error("{0} (is a server still running on it?)")]
    Open(#[from] OpenError),
    /// The store failed while it was read or written.
    #[error("the store failed: {0}")]
    Store(#[from] StoreError),
    /// The snapshot file could not be written or read.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

/// What a backup wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupReport {
    /// Records written to the snapshot.
    pub records: u64,
    /// Records left out because their retention had ended.
    pub expired: u64,
    /// The fencing floor the snapshot carries.
    pub fencing_floor: u64,
}

fn options(data_dir: &Path) -> SledOptions {
    SledOptions {
        path: data_dir.to_owned(),
        durability: Durability::Strict,
        max_records: u64::MAX,
        cache_capacity_bytes: 64 * 1024 * 1024,
        wal_file_bytes: idempotency_store_sled::WAL_FILE_BYTES,
    }
}

/// Writes the records of the stopped embedded store in `data_dir` that are live at `now` to the
/// snapshot file `output` (created whole, or not at all).
pub async fn backup(data_dir: &Path, output: &Path, now: Timestamp) -> Result<BackupReport, BackupError> {
    if !data_dir.is_dir() {
        return Err(BackupError::NotADirectory(data_dir.to_owned()));
    }
    let store = SledStore::open(&options(data_dir))?;
    let written = write_snapshot(&store, output, now);
    store.close().await?;
    written
}

fn write_snapshot(store: &SledStore, output: &Path, now: Timestamp) -> Result<BackupReport, BackupError> {
    let (records, fencing_floor) = store.export_all()?;
    let mut progress = Progress::new("backup", Some(store.record_count()));
    let mut writer = SnapshotWriter::create(output, fencing_floor)?;
    let mut expired = 0;
    for entry in records {
        let (namespace, key, record) = entry?;
        progress.inc();
        if record.is_expired(now) {
            expired += 1;
            continue;
        }
        writer.write(&namespace, &key, &record)?;
    }
    progress.finish();
    let records = writer.finish()?;
    Ok(BackupReport { records, expired, fencing_floor })
}

/// Writes the records of the snapshot `input` that are live at `now` into a new embedded store
/// in `data_dir` (absent or empty). The snapshot is read and checked whole first, so a damaged
/// file leaves `data_dir` as it was.
pub async fn restore(data_dir: &Path, input: &Path, now: Timestamp) -> Result<ImportCounts, BackupError> {
    if std::fs::read_dir(data_dir).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(BackupError::NotEmpty(data_dir.to_owned()));
    }
    let mut reading = Progress::new("reading", None);
    let snapshot = SnapshotReader::read_all(input, |_| reading.inc())?;
    reading.finish();
    let store = SledStore::open(&options(data_dir))?;
    let mut progress = Progress::new("restore", Some(snapshot.records.len() as u64));
    let imported = store
        .import_records(snapshot.records.into_iter().map(Ok), snapshot.fencing_floor, now, || progress.inc())
        .await;
    progress.finish();
    store.close().await?;
    Ok(imported?)
}
