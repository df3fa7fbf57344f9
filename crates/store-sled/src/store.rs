//! [`SledStore`]: the [`Store`] over one data directory, its options and errors, and what it
//! offers beyond the trait (export for `migrate`), and the operators' side ([`Maintenance`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use idempotency_core::admin::{AddressedRecord, Census, ImportCounts, ListQuery, Maintenance, RecordSummary};
use idempotency_core::domain::machine;
use idempotency_core::domain::{
    Claim, ClaimOutcome, Complete, CompleteOutcome, FencingToken, Key, KeyView, Namespace, Record, Release, Renew,
    RenewOutcome, Timestamp, Transition,
};
use idempotency_core::stats::StoreStats;
use idempotency_core::store::{Store, StoreError, SweepReport};
use parking_lot::{Condvar, Mutex, RwLock};
use tokio::sync::{mpsc, watch};

use crate::database::{LockWait, OpenDatabase, SweepReach, open_database};
use crate::group_commit::{FlushFn, FlushStats};
use crate::layout::{Body, RECORD_PREFIX, decode_stored, namespace_prefix, parse_record_key, record_key};
use crate::supervisor::supervise;
use crate::sweep_thread::{SweepThread, TRIM_AFTER_SWEEPING, lower_this_threads_priority, return_freed_memory};
use crate::unavailable;

/// When a reply may report a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// After the change is written and fdatasync'ed with its batch: it survives kill -9, and power
    /// loss on a disk that honours flushes.
    Strict,
    /// At once; sled writes changes out every 500 ms. A kill -9 or power loss may lose the last
    /// half second of acknowledged changes.
    Relaxed,
}

/// How to open a [`SledStore`].
#[derive(Debug, Clone)]
pub struct SledOptions {
    /// The data directory; created if missing.
    pub path: PathBuf,
    /// When replies may report a change.
    pub durability: Durability,
    /// Claims of new keys fail past this many records.
    pub max_records: u64,
    /// sled's page cache size in bytes.
    pub cache_capacity_bytes: u64,
    /// With strict durability, the size of each of the write-ahead log's two files
    /// ([`WAL_FILE_BYTES`](crate::WAL_FILE_BYTES) by default).
    pub wal_file_bytes: u64,
}

/// Why a data directory could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// sled refused to open it: locked by another process, corrupt, or unwritable.
    #[error("cannot open the data directory {path}: {source}")]
    Sled {
        /// The directory.
        path: PathBuf,
        /// sled's error.
        source: sled::Error,
    },
    /// The directory holds data that cannot be read.
    #[error("the data directory {path} holds unreadable data: {reason}")]
    Corrupt {
        /// The directory.
        path: PathBuf,
        /// What could not be read.
        reason: String,
    },
    /// The flusher thread or a file needed for fdatasync could not be set up.
    #[error("cannot set up durable writes in {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// One record read by [`SledStore::export`], with its namespace and key.
pub type ExportedRecord = Result<(Namespace, Key, Record), StoreError>;

enum Imported {
    Inserted,
    Replaced,
    Kept,
}

impl Drop for SledStore {
    fn drop(&mut self) {
        // Without this, the supervisor thread would keep the database (and its directory lock)
        // open after the last handle is gone.
        self.stop_supervisor();
    }
}

/// Wraps the durable flush of every opening of the store (a test seam for failing disks).
pub(crate) type FlushWrapper = Arc<dyn Fn(FlushFn) -> FlushFn + Send + Sync>;

/// The sled-backed [`Store`]. Cheap to share: the state lives behind one `Arc`.
///
/// With strict durability, a supervisor thread watches the group commit. After a failed flush
/// (a full or failing disk) the open database keeps serving what is durable, while every change
/// fails, and the supervisor probes the data directory every second. Once a probe write of 1 MiB
/// is made durable, it closes the database and opens it again from disk, so that nothing written
/// around the failed flush is trusted, and changes are accepted again.
pub struct SledStore {
    pub(crate) shared: Arc<StoreState>,
}

pub(crate) struct StoreState {
    pub(crate) options: SledOptions,
    pub(crate) wrap: FlushWrapper,
    /// The open database; `None` only while the supervisor reopens it.
    pub(crate) current: RwLock<Option<Arc<OpenDatabase>>>,
    pub(crate) healthy: watch::Sender<bool>,
    pub(crate) stopping: Mutex<bool>,
    pub(crate) stop_signal: Condvar,
    pub(crate) supervisor: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub(crate) sweeps: SweepThread,
    /// Records swept since freed memory was last handed back to the system.
    pub(crate) swept_since_trim: AtomicU64,
    /// The per-namespace record quotas, by namespace.
    pub(crate) quotas: Arc<RwLock<HashMap<String, u64>>>,
    /// How the group commit's flushes went, across reopenings.
    pub(crate) flush_stats: Arc<FlushStats>,
}

impl SledStore {
    /// Opens (or creates) the store in `options.path`. Never starts over on unreadable data.
    pub fn open(options: &SledOptions) -> Result<SledStore, OpenError> {
        Self::open_wrapped(options, Arc::new(|flush| flush))
    }

    /// Like [`SledStore::open`], with every durable flush (and the recovery probe) passed
    /// through `wrap` first: a seam to inject slow or failing disks in tests.
    #[cfg(feature = "testing")]
    pub fn open_with_flush_wrapper(
        options: &SledOptions,
        wrap: impl Fn(FlushFn) -> FlushFn + Send + Sync + 'static,
    ) -> Result<SledStore, OpenError> {
        Self::open_wrapped(options, Arc::new(wrap))
    }

    fn open_wrapped(options: &SledOptions, wrap: FlushWrapper) -> Result<SledStore, OpenError> {
        let quotas = Arc::new(RwLock::new(HashMap::new()));
        let flush_stats = Arc::new(FlushStats::default());
        let inner = open_database(options, &wrap, &quotas, &flush_stats)?;
        let shared = Arc::new(StoreState {
            options: options.clone(),
            wrap,
            current: RwLock::new(Some(Arc::new(inner))),
            healthy: watch::Sender::new(true),
            stopping: Mutex::new(false),
            stop_signal: Condvar::new(),
            supervisor: Mutex::new(None),
            sweeps: SweepThread::start(&options.path)?,
            swept_since_trim: AtomicU64::new(0),
            quotas,
            flush_stats,
        });
        if options.durability == Durability::Strict {
            let supervised = Arc::clone(&shared);
            let thread = std::thread::Builder::new()
                .name("sled-supervisor".to_owned())
                .spawn(move || supervise(&supervised))
                .map_err(|source| OpenError::Io { path: options.path.clone(), source })?;
            *shared.supervisor.lock() = Some(thread);
        }
        Ok(SledStore { shared })
    }

    /// Tells the supervisor to stop; it lets go of the database within moments.
    fn stop_supervisor(&self) {
        *self.shared.stopping.lock() = true;
        self.shared.stop_signal.notify_all();
    }

    /// The open database, or UNAVAILABLE during the moment it is being reopened.
    pub(crate) fn inner(&self) -> Result<Arc<OpenDatabase>, StoreError> {
        self.shared
            .current
            .read()
            .clone()
            .ok_or_else(|| StoreError::unavailable("the data directory is being reopened after a disk failure"))
    }

    /// Every stored record with its namespace and key (expired ones not yet swept included), and
    /// the fencing token below which this store may have handed out tokens: what `migrate`
    /// copies to PostgreSQL.
    pub fn export_all(&self) -> Result<(impl Iterator<Item = ExportedRecord> + 'static, u64), StoreError> {
        let inner = self.inner()?;
        let db = inner.db.clone();
        let records = inner.db.scan_prefix([RECORD_PREFIX]).map(move |entry| {
            let (stored_key, value) = entry.map_err(unavailable)?;
            let (namespace, key) = parse_record_key(&stored_key)
                .ok_or_else(|| StoreError::Corrupt("a record key of unknown layout".to_owned()))?;
            let record = decode_stored(&db, &stored_key, &value, Body::Load)?;
            Ok((namespace, key, record))
        });
        let reserved = inner.fencing.lock().reserved;
        Ok((records, reserved))
    }

    /// Copies `records` in (a restore or an import): each key is written unless this store
    /// holds the same or a later state of it ([`Record::is_superseded_by`]); records expired at
    /// `now` are skipped; the fencing counter is raised so that every later grant is above
    /// `fencing_floor` and every token copied. `progress` is called after each record. What it wrote is durable when
    /// it returns. It makes sled's calls on the task that polls it (no `spawn_blocking` per
    /// record): run it where blocking is allowed (a command-line tool, `block_in_place`).
    pub async fn import_records(
        &self,
        records: impl Iterator<Item = ExportedRecord>,
        fencing_floor: u64,
        now: Timestamp,
        mut progress: impl FnMut(),
    ) -> Result<ImportCounts, StoreError> {
        /// Records between waits for the group commit: the log's files are only reused once
        /// what they hold is flushed, which a wait asks for.
        const DURABLE_EVERY: u64 = 1024;
        let inner = self.inner()?;
        let mut counts = ImportCounts::default();
        let mut last_ticket = 0;
        let mut highest = fencing_floor;
        for (done, entry) in (1u64..).zip(records) {
            let (namespace, key, record) = entry?;
            progress();
            highest = highest.max(record.fencing_token.0);
            if record.is_expired(now) {
                counts.expired += 1;
                continue;
            }
            let (outcome, ticket) = inner.apply(&record_key(&namespace, &key), now, |_, current| {
                Ok(match current {
                    Some(current) if !current.is_superseded_by(&record) => {
                        Transition { write: None, outcome: Imported::Kept }
                    }
                    Some(_) => Transition { write: Some(record), outcome: Imported::Replaced },
                    None => Transition { write: Some(record), outcome: Imported::Inserted },
                })
            })?;
            match outcome {
                Imported::Inserted => counts.inserted += 1,
                Imported::Replaced => counts.replaced += 1,
                Imported::Kept => counts.kept += 1,
            }
            last_ticket = last_ticket.max(ticket);
            if done % DURABLE_EVERY == 0 {
                inner.wait_durable(last_ticket).await?;
            }
        }
        // Drawing one token above the floor writes a reservation above it (a log entry with
        // strict durability, which the last wait below covers).
        let drawn = inner.next_fencing_token(FencingToken(highest))?;
        counts.fencing_floor = drawn.0;
        if let Some(commit) = &inner.commit {
            last_ticket = last_ticket.max(commit.written());
        }
        inner.wait_durable(last_ticket).await?;
        Ok(counts)
    }

    /// A digest of every stored byte (records, index and metadata), to show that a call
    /// changed nothing. Reads the whole store: for tests, not for the hot path.
    #[cfg(any(test, feature = "testing"))]
    pub fn contents_digest(&self) -> Result<u64, StoreError> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for entry in self.inner()?.db.iter() {
            let (key, value) = entry.map_err(unavailable)?;
            key.hash(&mut hasher);
            value.hash(&mut hasher);
        }
        Ok(hasher.finish())
    }

    /// Runs `decide` on the key's record under its stripe lock, writes the new record if any, and
    /// returns the outcome once everything it reports is durable.
    ///
    /// This runs on the async worker: sled's gets and inserts work in memory (sled's own
    /// `sled-io` threads write its log, and the group-commit thread flushes), so it takes
    /// microseconds, and a hand-off to a blocking thread would cost more than the work (see
    /// BENCHMARKS.md). The exception is a fencing reservation's flush, once per 2^20 grants.
    async fn update<T>(
        &self,
        namespace: &Namespace,
        key: &Key,
        now: Timestamp,
        decide: impl FnOnce(&OpenDatabase, Option<&Record>) -> Result<Transition<T>, StoreError>,
    ) -> Result<T, StoreError> {
        let record_key = record_key(namespace, key);
        let inner = self.inner()?;
        let (outcome, ticket) = inner.apply(&record_key, now, decide)?;
        inner.wait_durable(ticket).await?;
        Ok(outcome)
    }
}

impl SledStore {
    /// Runs `work` on the open database on a thread of its own at a lower CPU priority (nice 10,
    /// as sweeps): an operator's scan (a census, an export) takes the CPU that calls leave idle
    /// rather than competing with them for it (figures in BENCHMARKS.md).
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&OpenDatabase) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner()?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("sled-admin".to_owned())
            .spawn(move || {
                lower_this_threads_priority();
                let _ = reply.send(work(&inner));
            })
            .map_err(|error| StoreError::unavailable_because("starting a thread for the scan", error))?;
        answer.await.map_err(|_| StoreError::unavailable("the store's scan failed"))?
    }

    /// Waits until every change written so far is durable: a scan may have read changes whose
    /// replies still wait for their flush, and reports only what is durable.
    async fn settle(&self) -> Result<(), StoreError> {
        let inner = self.inner()?;
        let written = inner.commit.as_ref().map_or(0, |commit| commit.written());
        inner.wait_durable(written).await
    }
}

fn unknown_layout() -> StoreError {
    StoreError::Corrupt("a record key of unknown layout".to_owned())
}

impl Maintenance for SledStore {
    fn kind(&self) -> &'static str {
        "sled"
    }

    async fn census(&self, namespace: Option<&Namespace>, now: Timestamp) -> Result<Census, StoreError> {
        let prefix = namespace.map_or_else(|| vec![RECORD_PREFIX], namespace_prefix);
        let census = self
            .blocking(move |inner| {
                let mut census = Census::new();
                for entry in inner.db.scan_prefix(prefix) {
                    let (stored_key, value) = entry.map_err(unavailable)?;
                    let (namespace, _) = parse_record_key(&stored_key).ok_or_else(unknown_layout)?;
                    let record = decode_stored(&inner.db, &stored_key, &value, Body::Skip)?;
                    census.entry(namespace).or_default().count(&record, now);
                }
                Ok(census)
            })
            .await?;
        self.settle().await?;
        Ok(census)
    }

    async fn list(&self, query: &ListQuery, now: Timestamp) -> Result<Vec<RecordSummary>, StoreError> {
        let query = query.clone();
        let page = self
            .blocking(move |inner| {
                let mut within = namespace_prefix(&query.namespace);
                within.extend_from_slice(query.prefix.as_bytes());
                let start = match &query.after {
                    // The smallest key after `after` (keys hold no control characters).
                    Some(after) => {
                        let mut start = record_key(&query.namespace, after);
                        start.push(0);
                        start.max(within.clone())
                    }
                    None => within.clone(),
                };
                let mut page = Vec::new();
                for entry in inner.db.range(start..) {
                    let (stored_key, value) = entry.map_err(unavailable)?;
                    if !stored_key.starts_with(&within) || page.len() == query.limit {
                        break;
                    }
                    let (_, key) = parse_record_key(&stored_key).ok_or_else(unknown_layout)?;
                    let record = decode_stored(&inner.db, &stored_key, &value, Body::Load)?;
                    page.extend(query.admit(key, &record, now));
                }
                Ok(page)
            })
            .await?;
        self.settle().await?;
        Ok(page)
    }

    async fn purge(&self, namespace: &Namespace, key: Option<&Key>) -> Result<u64, StoreError> {
        let (prefix, exact) = match key {
            Some(key) => (record_key(namespace, key), true),
            None => (namespace_prefix(namespace), false),
        };
        let (deleted, ticket) = self
            .blocking(move |inner| {
                let (mut deleted, mut ticket) = (0, 0);
                let mut purge = |record_key: &[u8]| -> Result<(), StoreError> {
                    let (purged, written) = inner.purge(record_key)?;
                    deleted += u64::from(purged);
                    ticket = ticket.max(written);
                    Ok(())
                };
                if exact {
                    purge(&prefix)?;
                } else {
                    for stored_key in inner.db.scan_prefix(&prefix).keys() {
                        purge(&stored_key.map_err(unavailable)?)?;
                    }
                }
                Ok((deleted, ticket))
            })
            .await?;
        self.inner()?.wait_durable(ticket).await?;
        Ok(deleted)
    }

    async fn export(
        &self,
        namespace: Option<&Namespace>,
        now: Timestamp,
        sink: mpsc::Sender<AddressedRecord>,
    ) -> Result<u64, StoreError> {
        let prefix = namespace.map_or_else(|| vec![RECORD_PREFIX], namespace_prefix);
        let floor = self
            .blocking(move |inner| {
                for entry in inner.db.scan_prefix(prefix) {
                    let (stored_key, value) = entry.map_err(unavailable)?;
                    let (namespace, key) = parse_record_key(&stored_key).ok_or_else(unknown_layout)?;
                    let record = decode_stored(&inner.db, &stored_key, &value, Body::Load)?;
                    if !record.is_expired(now) && sink.blocking_send((namespace, key, record)).is_err() {
                        break;
                    }
                }
                // Read after the scan: every token handed out so far is at most this.
                Ok(inner.fencing.lock().last)
            })
            .await?;
        self.settle().await?;
        Ok(floor)
    }

    async fn import(
        &self,
        records: Vec<AddressedRecord>,
        fencing_floor: u64,
        now: Timestamp,
    ) -> Result<ImportCounts, StoreError> {
        self.import_records(records.into_iter().map(Ok), fencing_floor, now, || {}).await
    }
}

impl Store for SledStore {
    async fn claim(
        &self,
        namespace: &Namespace,
        key: &Key,
        now: Timestamp,
        command: &Claim,
        _waiting: bool,
    ) -> Result<ClaimOutcome, StoreError> {
        self.update(namespace, key, now, |inner, current| {
            let mut drawn = Ok(FencingToken(0));
            let transition = machine::claim(now, current, command, |floor| {
                drawn = inner.next_fencing_token(floor);
                // On failure the transition is discarded below; any token above the floor will do.
                *drawn.as_ref().unwrap_or(&FencingToken(u64::MAX))
            });
            drawn?;
            Ok(transition?)
        })
        .await
    }

    async fn complete(
        &self,
        namespace: &Namespace,
        key: &Key,
        now: Timestamp,
        command: Complete,
    ) -> Result<CompleteOutcome, StoreError> {
        self.update(namespace, key, now, move |_, current| Ok(machine::complete(now, current, command)?)).await
    }

    async fn renew(
        &self,
        namespace: &Namespace,
        key: &Key,
        now: Timestamp,
        command: &Renew,
    ) -> Result<RenewOutcome, StoreError> {
        self.update(namespace, key, now, |_, current| Ok(machine::renew(now, current, command)?)).await
    }

    async fn release(
        &self,
        namespace: &Namespace,
        key: &Key,
        now: Timestamp,
        command: &Release,
    ) -> Result<(), StoreError> {
        self.update(namespace, key, now, |_, current| Ok(machine::release(now, current, command)?)).await
    }

    async fn lookup(&self, namespace: &Namespace, key: &Key, now: Timestamp) -> Result<KeyView, StoreError> {
        self.update(namespace, key, now, move |_, current| {
            Ok(Transition { write: None, outcome: machine::lookup(now, current)? })
        })
        .await
    }

    async fn sweep(&self, now: Timestamp, batch: usize) -> Result<SweepReport, StoreError> {
        let inner = self.inner()?;
        let shared = Arc::clone(&self.shared);
        self.shared
            .sweeps
            .run(move || {
                let report = inner.sweep(now, batch, LockWait::Wait, SweepReach::Due)?;
                let deleted = shared.swept_since_trim.fetch_add(report.deleted as u64, Ordering::Relaxed);
                if !report.more && deleted + report.deleted as u64 >= TRIM_AFTER_SWEEPING {
                    shared.swept_since_trim.store(0, Ordering::Relaxed);
                    return_freed_memory();
                }
                Ok(report)
            })
            .await
            .ok_or_else(|| StoreError::unavailable("the store is closed"))?
    }

    fn set_namespace_quotas(&self, quotas: HashMap<Namespace, u64>) {
        *self.shared.quotas.write() =
            quotas.into_iter().map(|(namespace, max)| (namespace.as_str().to_owned(), max)).collect();
    }

    fn record_count(&self) -> u64 {
        self.shared.current.read().as_ref().map_or(0, |inner| inner.records.load(Ordering::SeqCst))
    }

    fn health(&self) -> watch::Receiver<bool> {
        self.shared.healthy.subscribe()
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            flush_seconds: Some(self.shared.flush_stats.seconds.snapshot()),
            flush_batch_size: Some(self.shared.flush_stats.batch_size.snapshot()),
            disk_bytes: Some(bytes_under(&self.shared.options.path)),
            ..StoreStats::default()
        }
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.stop_supervisor();
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || {
            if let Some(supervisor) = shared.supervisor.lock().take() {
                // A panicking supervisor already reported itself; closing goes on.
                let _ = supervisor.join();
            }
            shared.sweeps.stop();
            let Some(inner) = shared.current.read().clone() else {
                return Err(StoreError::unavailable("closed while reopening after a disk failure"));
            };
            if let Some(commit) = &inner.commit {
                commit.stop();
            }
            if !*shared.healthy.borrow() {
                return Err(StoreError::unavailable("the last writes could not be made durable"));
            }
            match &inner.wal {
                // Everything in the log goes into sled's own files, so the next open has nothing
                // to re-apply.
                Some(wal) => wal
                    .checkpoint_all()
                    .map_err(|error| StoreError::unavailable_because("the final checkpoint failed", error)),
                None => inner.db.flush().map(drop).map_err(unavailable),
            }
        })
        .await
        .map_err(|error| StoreError::unavailable_because("the close task failed", error))?
    }
}

/// The bytes the files under `path` take, counted as they are found: a file that disappears
/// while it is counted (sled deletes blob files at any moment) counts as nothing.
fn bytes_under(path: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => bytes_under(&entry.path()),
            Ok(_) => entry.metadata().map_or(0, |metadata| metadata.len()),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use idempotency_core::domain::{ApiResponse, KeyState, RecordState};

    use super::*;
    use crate::fencing::FENCING_RESERVATION;
    use crate::layout::{BODY_APART, body_key, expiry_bucket, index_key};

    /// The nice value of this process's thread named `name`, read from /proc.
    #[cfg(target_os = "linux")]
    fn nice_of_thread(name: &str) -> Option<i64> {
        // Other tests' threads come and go while this reads: a task that vanished is passed by.
        for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
            let task = task.path();
            if std::fs::read_to_string(task.join("comm")).is_ok_and(|comm| comm.trim() == name) {
                let stat = std::fs::read_to_string(task.join("stat")).ok()?;
                // Fields after the parenthesised command name; nice is field 19 of the line.
                let after_name = stat.rsplit_once(')')?.1;
                return after_name.split_whitespace().nth(16)?.parse().ok();
            }
        }
        None
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn sweeps_run_on_a_thread_of_lower_priority() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&SledOptions {
            path: dir.path().join("data"),
            durability: Durability::Strict,
            max_records: 10,
            cache_capacity_bytes: 1 << 20,
            wal_file_bytes: crate::wal::FILE_BYTES,
        })
        .unwrap();
        let report = store.sweep(Timestamp::from_unix_millis(0), 10).await.unwrap();
        assert_eq!(report.deleted, 0);
        assert_eq!(nice_of_thread("sled-sweeper"), Some(10));
        store.close().await.unwrap();
    }

    fn open_at(dir: &Path) -> SledStore {
        SledStore::open(&SledOptions {
            path: dir.join("data"),
            durability: Durability::Strict,
            max_records: 100,
            cache_capacity_bytes: 1 << 20,
            wal_file_bytes: crate::wal::FILE_BYTES,
        })
        .unwrap()
    }

    fn claim_command(retention: Duration) -> Claim {
        Claim {
            fingerprint: idempotency_core::domain::Fingerprint::parse(b"fp").unwrap(),
            lease_ttl: Duration::from_secs(30),
            retention,
            request_id: None,
            owner: idempotency_core::domain::Owner::parse("test").unwrap(),
            new_lease_token: idempotency_core::domain::LeaseToken::generate(),
        }
    }

    fn response(body: &[u8]) -> ApiResponse {
        ApiResponse { body: body.to_vec().into(), metadata: [("status".to_owned(), "201".to_owned())].into() }
    }

    /// Claims and completes `key` at `now` with `body`.
    async fn complete_key(store: &SledStore, key: &Key, now: Timestamp, body: &[u8]) {
        let namespace = Namespace::parse("ns").unwrap();
        let claim = claim_command(Duration::from_secs(60));
        store.claim(&namespace, key, now, &claim, false).await.unwrap();
        let complete = Complete { lease_token: claim.new_lease_token, response: response(body), retention: None };
        store.complete(&namespace, key, now, complete).await.unwrap();
    }

    async fn replayed_body(store: &SledStore, key: &Key, now: Timestamp) -> Vec<u8> {
        let namespace = Namespace::parse("ns").unwrap();
        match store.claim(&namespace, key, now, &claim_command(Duration::from_secs(60)), false).await.unwrap() {
            ClaimOutcome::Completed(stored) => stored.response.body.to_vec(),
            other => panic!("expected a replay, got {other:?}"),
        }
    }

    const NOW: Timestamp = Timestamp::from_unix_millis(1_000_000);

    /// A store in a fresh directory where `key` (namespace `ns`) was completed with `body` at
    /// [`NOW`], and that key's record key.
    async fn store_with_completed(key: &str, body: &[u8]) -> (tempfile::TempDir, SledStore, Key, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let store = open_at(dir.path());
        let key = Key::parse(key).unwrap();
        complete_key(&store, &key, NOW, body).await;
        let record_key = record_key(&Namespace::parse("ns").unwrap(), &key);
        (dir, store, key, record_key)
    }

    /// Sweeps two days after [`NOW`], when every test record has expired; returns how many
    /// records were deleted.
    async fn sweep_all(store: &SledStore) -> usize {
        let later = Timestamp::from_unix_millis(NOW.unix_millis() + 2 * 86_400_000);
        store.sweep(later, 100).await.unwrap().deleted
    }

    /// Every key in the store but the fencing reservation.
    fn stored_keys(store: &SledStore) -> Vec<Vec<u8>> {
        let inner = store.inner().unwrap();
        let keys = inner.db.iter().keys().map(|key| key.unwrap().to_vec());
        keys.filter(|key| key.as_slice() != FENCING_RESERVATION).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_sled_refused_turns_the_store_unhealthy_until_it_is_reopened() {
        let (_dir, store, key, _) = store_with_completed("kept", b"kept body").await;
        let mut health = store.health();
        assert!(*health.borrow());
        // What `apply` does when sled refuses an insert (as it does after one of its own log
        // writes failed): the group commit stops and the store turns unhealthy.
        let inner = store.inner().unwrap();
        let refused = inner.write_failed(StoreError::unavailable("refused"));
        assert!(matches!(refused, StoreError::Unavailable { .. }), "{refused:?}");
        // The group commit stopped at once (the store's own health follows within 100 ms, and
        // turns back once the supervisor has reopened the directory, a second or more later).
        assert!(!*inner.commit.as_ref().expect("strict durability").health().borrow());
        drop(inner);
        let waited = tokio::time::timeout(Duration::from_secs(30), health.wait_for(|healthy| !healthy)).await;
        waited.expect("the store turned unhealthy").unwrap();
        // The disk works, so the supervisor reopens the directory and changes are accepted again,
        // with what was acknowledged before still there.
        let waited = tokio::time::timeout(Duration::from_secs(30), health.wait_for(|healthy| *healthy)).await;
        waited.expect("the store was reopened").unwrap();
        assert_eq!(replayed_body(&store, &key, NOW).await, b"kept body");
        complete_key(&store, &Key::parse("after").unwrap(), NOW, b"after").await;
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn completed_records_keep_their_body_apart_and_sweeping_deletes_both() {
        let body: Vec<u8> = (0..=255u8).cycle().take(700).collect();
        let (dir, store, key, record_key) = store_with_completed("k", &body).await;
        let (namespace, now) = (Namespace::parse("ns").unwrap(), NOW);
        let db = store.inner().unwrap().db.clone();
        let value = db.get(&record_key).unwrap().unwrap();
        assert_eq!(value[0], BODY_APART);
        assert!(value.len() < 200, "the record holds no body: {} bytes", value.len());
        assert_eq!(db.get(body_key(&record_key)).unwrap().unwrap().as_ref(), body.as_slice());
        assert_eq!(replayed_body(&store, &key, now).await, body);
        let view = store.lookup(&namespace, &key, now).await.unwrap();
        assert_eq!(view.completed.unwrap().0.body, body);
        let (mut exported, _) = store.export_all().unwrap();
        match exported.next().unwrap().unwrap().2.state {
            RecordState::Completed { response, .. } => assert_eq!(response.body, body),
            other => panic!("exported {other:?}"),
        }
        drop(exported);

        // Survives a restart.
        drop(db);
        store.close().await.unwrap();
        drop(store);
        let store = open_at(dir.path());
        assert_eq!(replayed_body(&store, &key, now).await, body);

        assert_eq!(sweep_all(&store).await, 1);
        assert_eq!(stored_keys(&store), Vec::<Vec<u8>>::new());
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn records_written_with_their_body_inline_are_still_read() {
        let (_dir, store, key, record_key) = store_with_completed("old", b"{\"id\":1}").await;
        // Rewrite it the way stores written before bodies were kept apart hold it.
        let db = store.inner().unwrap().db.clone();
        let mut record = decode_stored(&db, &record_key, &db.get(&record_key).unwrap().unwrap(), Body::Load).unwrap();
        if let RecordState::Completed { response, .. } = &mut record.state {
            response.body = bytes::Bytes::from_static(b"inline body");
        }
        db.insert(&record_key, record.encode()).unwrap();
        db.remove(body_key(&record_key)).unwrap();

        assert_eq!(replayed_body(&store, &key, NOW).await, b"inline body");
        let (mut exported, _) = store.export_all().unwrap();
        assert_eq!(exported.next().unwrap().unwrap().2, record);
        assert_eq!(sweep_all(&store).await, 1);
        assert_eq!(stored_keys(&store), Vec::<Vec<u8>>::new());
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_body_left_by_a_crash_in_the_middle_of_a_sweep_is_deleted_by_the_next() {
        let (_dir, store, _key, record_key) = store_with_completed("k", b"body").await;
        // What a crash right after the sweeper deleted the record leaves: its body and its entry.
        store.inner().unwrap().db.remove(&record_key).unwrap();
        assert_eq!(stored_keys(&store).len(), 2);

        assert_eq!(sweep_all(&store).await, 0);
        assert_eq!(stored_keys(&store), Vec::<Vec<u8>>::new());
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_completed_record_whose_body_is_missing_is_reported_corrupt() {
        let (_dir, store, key, record_key) = store_with_completed("k", b"body").await;
        store.inner().unwrap().db.remove(body_key(&record_key)).unwrap();
        let namespace = Namespace::parse("ns").unwrap();
        let refused = store.claim(&namespace, &key, NOW, &claim_command(Duration::from_secs(60)), false).await;
        assert!(matches!(refused, Err(StoreError::Corrupt(_))), "{refused:?}");
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_full_store_makes_room_from_records_that_expired_within_the_current_second() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&SledOptions {
            path: dir.path().join("data"),
            durability: Durability::Strict,
            max_records: 2,
            cache_capacity_bytes: 1 << 20,
            wal_file_bytes: crate::wal::FILE_BYTES,
        })
        .unwrap();
        let namespace = Namespace::parse("ns").unwrap();
        let short = || Claim {
            lease_ttl: Duration::from_millis(100),
            retention: Duration::from_secs(1),
            ..claim_command(Duration::from_secs(1))
        };
        for key in ["a", "b"] {
            store.claim(&namespace, &Key::parse(key).unwrap(), NOW, &short(), false).await.unwrap();
        }
        // Both expire at NOW + 1.1 s, filed in the bucket of NOW + 2 s.
        let new_key = Key::parse("c").unwrap();
        let before = Timestamp::from_unix_millis(NOW.unix_millis() + 1_050);
        let refused = store.claim(&namespace, &new_key, before, &short(), false).await;
        assert!(matches!(refused, Err(StoreError::Full { .. })), "{refused:?}");
        let after = Timestamp::from_unix_millis(NOW.unix_millis() + 1_150);
        let outcome = store.claim(&namespace, &new_key, after, &short(), false).await.unwrap();
        assert!(matches!(outcome, ClaimOutcome::Acquired(_)), "{outcome:?}");
        // Both expired records made room; the new one stays indexed and is swept once it expires.
        assert_eq!(store.record_count(), 1);
        let much_later = Timestamp::from_unix_millis(NOW.unix_millis() + 10_000);
        assert_eq!(store.sweep(much_later, 100).await.unwrap().deleted, 1);
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_record_indexed_under_an_older_expiry_rule_is_filed_again_not_lost() {
        let (_dir, store, namespace, key, record_key) = fresh_store_for("held");
        let claim = claim_command(Duration::from_secs(1));
        store.claim(&namespace, &key, NOW, &claim, false).await.unwrap();
        // What a store written by a release that kept held records only until their lease ended
        // holds: the record's entry at the lease's end (NOW + 30 s) instead of a retention later.
        let inner = store.inner().unwrap();
        let record = inner.read(&record_key, Body::Load).unwrap().unwrap();
        inner.db.remove(index_key(crate::layout::filed_at(&record), &record_key)).unwrap();
        inner.db.insert(index_key(Timestamp::from_unix_millis(NOW.unix_millis() + 30_000), &record_key), &[]).unwrap();
        drop(inner);
        // Sweeping past the old entry keeps the record (it expires at NOW + 31 s) and files it again.
        let between = Timestamp::from_unix_millis(NOW.unix_millis() + 30_500);
        assert_eq!(store.sweep(between, 100).await.unwrap().deleted, 0);
        assert_eq!(store.lookup(&namespace, &key, between).await.unwrap().attempt, 1);
        let later = Timestamp::from_unix_millis(NOW.unix_millis() + 31_000);
        assert_eq!(store.sweep(later, 100).await.unwrap().deleted, 1);
        assert_eq!(stored_keys(&store), Vec::<Vec<u8>>::new());
        store.close().await.unwrap();
    }

    /// A store in a fresh directory, and `key` in namespace `ns` with its record key.
    fn fresh_store_for(key: &str) -> (tempfile::TempDir, SledStore, Namespace, Key, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let store = open_at(dir.path());
        let namespace = Namespace::parse("ns").unwrap();
        let key = Key::parse(key).unwrap();
        let record_key = record_key(&namespace, &key);
        (dir, store, namespace, key, record_key)
    }

    /// The expiry index's entries, in order.
    fn index_entries(store: &SledStore) -> Vec<Vec<u8>> {
        stored_keys(store).into_iter().filter(|key| key[0] == crate::layout::INDEX_PREFIX).collect()
    }

    #[tokio::test]
    async fn a_complete_in_the_claims_second_leaves_the_index_entry_where_it_is() {
        let (_dir, store, namespace, key, record_key) = fresh_store_for("flow");
        let at = |millis: i64| Timestamp::from_unix_millis(NOW.unix_millis() + millis);
        let claim = claim_command(Duration::from_secs(60));
        store.claim(&namespace, &key, at(100), &claim, false).await.unwrap();
        let after_claim = index_entries(&store);
        // Filed a retention after the Claim (in the bucket of second 61), not a retention after
        // its 30 s lease ends.
        assert_eq!(after_claim, vec![index_key(at(60_100), &record_key)]);
        let complete = Complete { lease_token: claim.new_lease_token, response: response(b"body"), retention: None };
        store.complete(&namespace, &key, at(400), complete).await.unwrap();
        assert_eq!(index_entries(&store), after_claim, "the Complete moved the entry");
        // And the record is swept once it expires, not before.
        assert_eq!(store.sweep(at(60_399), 100).await.unwrap().deleted, 0);
        assert_eq!(store.sweep(at(61_000), 100).await.unwrap().deleted, 1);
        assert_eq!(stored_keys(&store), Vec::<Vec<u8>>::new());
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_held_key_whose_lease_outlives_its_filing_is_filed_again_once_and_kept_until_it_expires() {
        let (_dir, store, namespace, key, record_key) = fresh_store_for("long-lease");
        // Retention 10 s, lease 30 s: filed at NOW + 10 s, expires at NOW + 40 s.
        let claim = claim_command(Duration::from_secs(10));
        store.claim(&namespace, &key, NOW, &claim, false).await.unwrap();
        let at = |millis: i64| Timestamp::from_unix_millis(NOW.unix_millis() + millis);
        let report = store.sweep(at(20_000), 100).await.unwrap();
        assert_eq!((report.scanned, report.deleted), (1, 0));
        assert_eq!(index_entries(&store), vec![index_key(at(40_000), &record_key)]);
        // Filed under its expiry: the next sweeps do not meet it again before then.
        assert_eq!(store.sweep(at(25_000), 100).await.unwrap().scanned, 0);
        assert_eq!(store.lookup(&namespace, &key, at(25_000)).await.unwrap().attempt, 1);
        // A Complete within the lease moves the entry from where the sweep put it.
        let complete = Complete { lease_token: claim.new_lease_token, response: response(b"late"), retention: None };
        store.complete(&namespace, &key, at(26_000), complete).await.unwrap();
        assert_eq!(index_entries(&store), vec![index_key(at(36_000), &record_key)]);
        assert_eq!(store.sweep(at(35_000), 100).await.unwrap().deleted, 0);
        assert_eq!(store.sweep(at(36_000), 100).await.unwrap().deleted, 1);
        assert_eq!(stored_keys(&store), Vec::<Vec<u8>>::new());
        store.close().await.unwrap();
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &to.join(entry.file_name()));
            } else {
                std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
            }
        }
    }

    /// The worst a power loss leaves: sled's files as of the last checkpoint (here, a clean
    /// close), and the write-ahead log as its syncs left it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acknowledged_changes_survive_when_sled_lost_everything_since_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let namespace = Namespace::parse("ns").unwrap();
        let before = Key::parse("before").unwrap();
        let store = open_at(dir.path());
        complete_key(&store, &before, NOW, b"before").await;
        store.close().await.unwrap();
        drop(store);
        let snapshot = dir.path().join("snapshot");
        copy_dir(&dir.path().join("data"), &snapshot.join("data"));

        let store = open_at(dir.path());
        let after = Key::parse("after").unwrap();
        complete_key(&store, &after, NOW, b"after, with a body").await;
        let held = Key::parse("held").unwrap();
        let granted =
            store.claim(&namespace, &held, NOW, &claim_command(Duration::from_secs(60)), false).await.unwrap();
        let ClaimOutcome::Acquired(grant) = granted else { panic!("{granted:?}") };
        // Every acknowledged change is in the log's files now.
        copy_dir(&dir.path().join("data").join(crate::wal::WAL_DIR), &snapshot.join("data").join(crate::wal::WAL_DIR));
        store.close().await.unwrap();

        let recovered = open_at(&snapshot);
        assert_eq!(replayed_body(&recovered, &before, NOW).await, b"before");
        assert_eq!(replayed_body(&recovered, &after, NOW).await, b"after, with a body");
        let view = recovered.lookup(&namespace, &held, NOW).await.unwrap();
        assert_eq!((view.state, view.fencing_token), (KeyState::InProgress, grant.fencing_token));
        assert_eq!(recovered.record_count(), 3);
        // Fencing tokens go on above every one handed out before.
        let next = recovered
            .claim(&namespace, &Key::parse("next").unwrap(), NOW, &claim_command(Duration::from_secs(60)), false)
            .await
            .unwrap();
        let ClaimOutcome::Acquired(next) = next else { panic!("{next:?}") };
        assert!(next.fencing_token > grant.fencing_token);
        recovered.close().await.unwrap();
        // Closing made sled durable up to the end of the log: nothing is left to re-apply.
        assert!(crate::wal::read(&snapshot.join("data")).unwrap().entries.is_empty());
    }

    #[test]
    fn expiry_buckets_round_up_to_the_second_and_keep_order() {
        let bucket = |millis| expiry_bucket(Timestamp::from_unix_millis(millis));
        assert_eq!(bucket(1_000), 1_000);
        assert_eq!(bucket(1_001), 2_000);
        assert_eq!(bucket(1_999), 2_000);
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(-1), 0);
        assert_eq!(bucket(-1_001), -1_000);
        let key = b"r\x01nk";
        assert!(index_key(Timestamp::from_unix_millis(-5), key) < index_key(Timestamp::from_unix_millis(5), key));
        assert!(
            index_key(Timestamp::from_unix_millis(1_500), key) < index_key(Timestamp::from_unix_millis(2_001), key)
        );
    }
}
