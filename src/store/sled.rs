//! The embedded store: sled, with per-key serialisation, group commit and an expiry index.
//!
//! Layout of the one sled tree (all integers big-endian, so byte order is numeric order):
//! - `r` + namespace length (1 byte) + namespace + key → the encoded [`Record`]. A completed
//!   record is written as `B` + the record encoded with an empty response body, and the body
//!   itself goes under `b` + the same namespace length, namespace and key. sled appends each
//!   change to its log as a fragment of the leaf it touches, rewrites the whole leaf (up to 16
//!   entries) every tenth change, and moves live leaves when it cleans a segment of its log. With
//!   bodies inline, every Claim of a key copied, in time, the bodies of the completed keys beside
//!   it; record leaves now hold records of about 100 bytes, and body leaves change only when a
//!   body is written or deleted. That keeps the log, and so the disk, smaller. Records that start
//!   with the encoding version instead of `B` hold their body inline (stores written before bodies
//!   were kept apart): both are read;
//! - `b` + namespace length + namespace + key → the response body of the record under `r` + the
//!   same bytes, while that record is completed (a body may outlive its record's completion until
//!   the record is swept or completed again, but it is only read through a `B` record);
//! - `x` + expiry bucket (8 bytes: expires_at rounded up to the second) + the record's key →
//!   nothing: the expiry index, oldest first;
//! - `m:fencing-reserved` → the fencing token below which this process may hand out tokens.
//!
//! Invariants:
//! - All changes to one key happen under that key's stripe lock, so a read-decide-write is atomic
//!   against every other call (sled's directory lock keeps other processes out). Stripe locks
//!   are held only around in-memory sled calls, never across an await or a group-commit flush
//!   (the exception: a fencing reservation's flush, once per 2^20 grants).
//! - Every record has an index entry at its expiry bucket, which is never earlier than its expiry. Writes add the new entry before the
//!   record and drop the old one after, sweeps drop the record before its entry, so a crash
//!   leaves at most stale entries (which sweeping drops), never a record that is not indexed
//!   (a sweep drops the entry of a record it cannot decode, leaving the record for an operator).
//! - A `B` record's body is written before the record and deleted after it (and before the index
//!   entry), so a completed record never lacks its body. A body that no record refers to (a
//!   Complete cut short by a crash, a completed key claimed again after it expired) is
//!   overwritten by the key's next Complete or deleted when the key's record is swept; one left
//!   by a crash in the middle of a sweep is deleted when the sweeper meets the stale entry.
//! - A reply reports only state that is durable: writers wait for their group-commit ticket,
//!   readers for the ticket of the last write to their stripe.
//! - Fencing tokens come from one counter; a token is handed out only after a reservation above
//!   it was written and flushed, so after any crash the counter restarts above every token that
//!   any surviving record (or any deleted one) ever carried.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Condvar, Mutex, RwLock};
use tokio::sync::watch;

use super::group_commit::{FlushFn, GroupCommit};
use super::{Store, StoreError, SweepReport};
use crate::domain::machine;
use crate::domain::{
    Claim, ClaimOutcome, Complete, CompleteOutcome, FencingToken, Key, KeyView, Namespace, Record, RecordState,
    Release, Renew, RenewOutcome, Timestamp, Transition,
};

/// When a reply may report a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
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

const RECORD_PREFIX: u8 = b'r';
const BODY_PREFIX: u8 = b'b';
/// The first byte of a completed record whose response body is stored apart, under its body key.
/// [`Record::encode`] starts with its encoding version, now 1: versions must stay below this one.
const BODY_APART: u8 = b'B';
const INDEX_PREFIX: u8 = b'x';
const FENCING_RESERVATION: &[u8] = b"m:fencing-reserved";
/// How many fencing tokens one reservation covers. A restart skips at most this many.
const FENCING_BLOCK: u64 = 1 << 20;
/// Number of stripe locks; keys hash onto them.
const STRIPES: usize = 1024;

#[derive(Default)]
struct Stripe {
    /// The group-commit ticket of the latest write to any key of this stripe.
    last_write: u64,
}

struct FencingCounter {
    last: u64,
    reserved: u64,
}

/// One record read by [`SledStore::export`], with its namespace and key.
pub type ExportedRecord = Result<(Namespace, Key, Record), StoreError>;

impl Drop for SledStore {
    fn drop(&mut self) {
        // Without this, the supervisor thread would keep the database (and its directory lock)
        // open after the last handle is gone.
        self.stop_supervisor();
    }
}

/// Wraps the durable flush of every opening of the store (a test seam for failing disks).
pub type FlushWrapper = Arc<dyn Fn(FlushFn) -> FlushFn + Send + Sync>;

/// The sled-backed [`Store`]. Cheap to share: the state lives behind one `Arc`.
///
/// With strict durability, a supervisor thread watches the group commit. After a failed flush
/// (a full or failing disk) the open database keeps serving what is durable, while every change
/// fails, and the supervisor probes the data directory every second. Once a probe write of 1 MiB
/// is made durable, it closes the database and opens it again from disk, so that nothing written
/// around the failed flush is trusted, and changes are accepted again.
pub struct SledStore {
    shared: Arc<Shared>,
}

struct Shared {
    options: SledOptions,
    wrap: FlushWrapper,
    /// The open database; `None` only while the supervisor reopens it.
    current: RwLock<Option<Arc<Inner>>>,
    healthy: watch::Sender<bool>,
    stopping: Mutex<bool>,
    stop_signal: Condvar,
    supervisor: Mutex<Option<std::thread::JoinHandle<()>>>,
    sweeps: SweepThread,
    /// Records swept since freed memory was last handed back to the system.
    swept_since_trim: AtomicU64,
}

/// After a sweep pass that deleted at least this many records, freed heap memory is handed
/// back to the system.
const TRIM_AFTER_SWEEPING: u64 = 50_000;

/// Hands free heap pages back to the system. Deleting many records frees much memory in
/// scattered chunks that glibc's allocator otherwise keeps (RSS stayed about twice the loaded
/// size after a full sweep).
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only walks and trims the allocator's own free lists.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// A sweep batch handed to the sweep thread.
type SweepJob = Box<dyn FnOnce() + Send>;

/// The thread that runs sweeps, at a lower CPU priority than serving (nice 10), so that deleting
/// a large batch of expired records takes the CPU that calls leave idle rather than competing
/// with them for it. Sweeping is only reclamation (expired records are already absent), so
/// it can wait.
struct SweepThread {
    jobs: Mutex<Option<std::sync::mpsc::Sender<SweepJob>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl SweepThread {
    fn start(path: &Path) -> Result<SweepThread, OpenError> {
        let (jobs, queue) = std::sync::mpsc::channel::<SweepJob>();
        let thread = std::thread::Builder::new()
            .name("sled-sweeper".to_owned())
            .spawn(move || {
                lower_this_threads_priority();
                for job in queue {
                    job();
                }
            })
            .map_err(|source| OpenError::Io { path: path.to_owned(), source })?;
        Ok(SweepThread { jobs: Mutex::new(Some(jobs)), thread: Mutex::new(Some(thread)) })
    }

    /// Runs `job` on the sweep thread; `None` once the store is closed.
    async fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let sent = self.jobs.lock().as_ref()?.send(Box::new(move || {
            let _ = reply.send(job());
        }));
        sent.ok()?;
        answer.await.ok()
    }

    /// Lets the thread finish its queue and end. Blocks.
    fn stop(&self) {
        self.jobs.lock().take();
        if let Some(thread) = self.thread.lock().take() {
            // A panicking sweep already reported itself; closing goes on.
            let _ = thread.join();
        }
    }
}

/// Gives the calling thread nice 10 (Linux applies `setpriority` to the calling thread only).
/// Best effort: where it fails, sweeps run at normal priority.
fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority takes plain integers and touches no memory of ours.
        let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
        if result != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "sweeps run at normal priority");
        }
    }
}

struct Inner {
    db: sled::Db,
    stripes: Box<[Mutex<Stripe>]>,
    fencing: Mutex<FencingCounter>,
    records: AtomicU64,
    max_records: u64,
    commit: Option<GroupCommit>,
}

/// How many expired records a Claim may sweep inline when the store is full.
const INLINE_SWEEP_BATCH: usize = 64;

impl SledStore {
    /// Opens (or creates) the store in `options.path`. Never starts over on unreadable data.
    pub fn open(options: &SledOptions) -> Result<SledStore, OpenError> {
        Self::open_with_flush_wrapper(options, |flush| flush)
    }

    /// Like [`SledStore::open`], with every durable flush (and the recovery probe) passed
    /// through `wrap` first: a seam to inject slow or failing disks in tests.
    pub fn open_with_flush_wrapper(
        options: &SledOptions,
        wrap: impl Fn(FlushFn) -> FlushFn + Send + Sync + 'static,
    ) -> Result<SledStore, OpenError> {
        let wrap: FlushWrapper = Arc::new(wrap);
        let inner = open_inner(options, &wrap)?;
        let shared = Arc::new(Shared {
            options: options.clone(),
            wrap,
            current: RwLock::new(Some(Arc::new(inner))),
            healthy: watch::Sender::new(true),
            stopping: Mutex::new(false),
            stop_signal: Condvar::new(),
            supervisor: Mutex::new(None),
            sweeps: SweepThread::start(&options.path)?,
            swept_since_trim: AtomicU64::new(0),
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
    fn inner(&self) -> Result<Arc<Inner>, StoreError> {
        self.shared.current.read().clone().ok_or_else(|| {
            StoreError::Unavailable("the data directory is being reopened after a disk failure".to_owned())
        })
    }

    /// Every stored record with its namespace and key (expired ones not yet swept included), and
    /// the fencing token below which this store may have handed out tokens: what `migrate`
    /// copies to PostgreSQL.
    pub fn export(&self) -> Result<(impl Iterator<Item = ExportedRecord> + 'static, u64), StoreError> {
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

    /// A digest of every stored byte (records, index and metadata), to show that a call
    /// changed nothing. Reads the whole store: for tests and diagnostics, not for the hot path.
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
    /// microseconds. Moving it to `spawn_blocking` was measured to halve throughput (thread
    /// hand-offs dominated the profile). The exception is a fencing reservation's flush, once per
    /// 2^20 grants.
    async fn update<T>(
        &self,
        namespace: &Namespace,
        key: &Key,
        now: Timestamp,
        decide: impl FnOnce(&Inner, Option<&Record>) -> Result<Transition<T>, StoreError>,
    ) -> Result<T, StoreError> {
        let record_key = record_key(namespace, key);
        let inner = self.inner()?;
        let (outcome, ticket) = inner.apply(&record_key, now, decide)?;
        inner.wait_durable(ticket).await?;
        Ok(outcome)
    }
}

impl Inner {
    fn stripe(&self, record_key: &[u8]) -> &Mutex<Stripe> {
        // FNV-1a: cheap and well spread; lock striping needs no cryptographic strength.
        let hash =
            record_key.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3));
        &self.stripes[(hash % STRIPES as u64) as usize]
    }

    /// Draws a fencing token above `floor`. If it passes the reservation, first writes and
    /// flushes a new reservation (once per [`FENCING_BLOCK`] grants), inside the lock, so no token
    /// is handed out before the reservation covering it is on disk.
    fn next_fencing_token(&self, floor: FencingToken) -> Result<FencingToken, StoreError> {
        let mut counter = self.fencing.lock();
        let token = counter.last.max(floor.0) + 1;
        if token > counter.reserved {
            let reserved = token + FENCING_BLOCK;
            self.db.insert(FENCING_RESERVATION, &reserved.to_be_bytes()).map_err(unavailable)?;
            self.db.flush().map_err(unavailable)?;
            counter.reserved = reserved;
        }
        counter.last = token;
        Ok(FencingToken(token))
    }

    fn read(&self, record_key: &[u8], body: Body) -> Result<Option<Record>, StoreError> {
        match self.db.get(record_key).map_err(unavailable)? {
            None => Ok(None),
            Some(bytes) => decode_stored(&self.db, record_key, &bytes, body).map(Some),
        }
    }

    /// The atomic read-decide-write of one key; returns the outcome and the group-commit ticket
    /// that must be durable before the outcome may be reported.
    fn apply<T>(
        &self,
        record_key: &[u8],
        now: Timestamp,
        decide: impl FnOnce(&Inner, Option<&Record>) -> Result<Transition<T>, StoreError>,
    ) -> Result<(T, u64), StoreError> {
        let mut stripe = self.stripe(record_key).lock();
        let current = self.read(record_key, Body::Load)?;
        let transition = decide(self, current.as_ref())?;
        let Some(record) = transition.write else {
            return Ok((transition.outcome, stripe.last_write));
        };
        if current.is_none() {
            self.reserve_record_slot(now).map_err(|error| self.write_failed(error))?;
        }
        if let Err(error) = self.write(record_key, current.as_ref(), record) {
            if current.is_none() {
                self.records.fetch_sub(1, Ordering::SeqCst);
            }
            return Err(self.write_failed(error));
        }
        stripe.last_write = self.commit.as_ref().map_or(0, GroupCommit::written);
        Ok((transition.outcome, stripe.last_write))
    }

    /// Counts a new record in, or fails with `Full`. Expired records count until swept, so a
    /// full store first sweeps a small batch inline (skipping keys locked by others) and retries.
    fn reserve_record_slot(&self, now: Timestamp) -> Result<(), StoreError> {
        let max_records = self.max_records;
        let reserve = || {
            self.records
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |count| (count < max_records).then_some(count + 1))
                .is_ok()
        };
        if reserve() {
            return Ok(());
        }
        self.sweep(now, INLINE_SWEEP_BATCH, LockWait::Skip, SweepReach::CurrentSecond)?;
        if reserve() { Ok(()) } else { Err(StoreError::Full { max_records }) }
    }

    /// Passes `error` on; when sled refused a write, first stops the group commit, so that the
    /// store turns unhealthy and the supervisor reopens it once the disk works again. sled refuses
    /// every write after one of its own log writes failed (a full disk, say), and a flush with no
    /// newer write pending still succeeds, so a failed write may be the only sign of it.
    fn write_failed(&self, error: StoreError) -> StoreError {
        if let (StoreError::Unavailable(_), Some(commit)) = (&error, &self.commit) {
            commit.fail();
        }
        error
    }

    /// Writes a record, its response body (when completed) and its expiry index entry. Each sled
    /// insert is atomic on its own; the order (new index entry, body, record, then removal of the
    /// old entry) means a crash in between leaves at most a stale index entry, which the sweeper
    /// recognises and drops, or a body that no record refers to yet, and never a record without
    /// an entry or a completed record without its body. (sled's `apply_batch` would make this one
    /// step, but it takes a process-wide write lock that serialises every write in the store.)
    fn write(&self, record_key: &[u8], previous: Option<&Record>, mut record: Record) -> Result<(), StoreError> {
        let expires_at = record.expires_at();
        let previous_expiry =
            previous.map(Record::expires_at).filter(|previous| expiry_bucket(*previous) != expiry_bucket(expires_at));
        if previous.is_none() || previous_expiry.is_some() {
            self.db.insert(index_key(expires_at, record_key), &[]).map_err(unavailable)?;
        }
        let value = match &mut record.state {
            RecordState::Completed { response, .. } => {
                let body = std::mem::take(&mut response.body);
                self.db.insert(body_key(record_key), body).map_err(unavailable)?;
                let mut value = record.encode();
                value.insert(0, BODY_APART);
                value
            }
            RecordState::Held(_) | RecordState::Released { .. } => record.encode(),
        };
        self.db.insert(record_key, value).map_err(unavailable)?;
        if let Some(previous_expiry) = previous_expiry {
            self.db.remove(index_key(previous_expiry, record_key)).map_err(unavailable)?;
        }
        Ok(())
    }

    async fn wait_durable(&self, ticket: u64) -> Result<(), StoreError> {
        match &self.commit {
            Some(commit) if ticket > 0 => commit
                .durable(ticket)
                .await
                .map_err(|_| StoreError::Unavailable("the change could not be made durable".to_owned())),
            _ => Ok(()),
        }
    }

    /// Deletes up to `batch` index entries that are due at `now`: expired records with their
    /// entries, and stale entries alone. Blocking; the caller keeps it off the async workers.
    ///
    /// `reach` says how far it looks. [`SweepReach::Due`] (the sweeper) stops at `now`: every
    /// bucket before it holds only expired records. [`SweepReach::CurrentSecond`] (a full store
    /// making room) also looks into the bucket of the second that `now` falls in, where records
    /// that expired a moment ago sit beside ones that have not, and leaves the latter alone.
    fn sweep(
        &self,
        now: Timestamp,
        batch: usize,
        lock_wait: LockWait,
        reach: SweepReach,
    ) -> Result<SweepReport, StoreError> {
        // The key is built directly, not through the bucket, so that `now` itself is not rounded up.
        let through = match reach {
            SweepReach::Due => now.unix_millis(),
            SweepReach::CurrentSecond => expiry_bucket(now),
        };
        let mut end = vec![INDEX_PREFIX];
        end.extend_from_slice(&((through.saturating_add(1) as u64) ^ (1 << 63)).to_be_bytes());
        let mut report = SweepReport::default();
        for entry in self.db.range([INDEX_PREFIX].as_slice()..end.as_slice()).keys() {
            if report.scanned == batch {
                report.more = true;
                break;
            }
            let entry = entry.map_err(unavailable)?;
            report.scanned += 1;
            let record_key = &entry[9..];
            let stripe = self.stripe(record_key);
            let _stripe = match lock_wait {
                LockWait::Wait => stripe.lock(),
                LockWait::Skip => match stripe.try_lock() {
                    Some(guard) => guard,
                    None => continue,
                },
            };
            match self.read(record_key, Body::Skip) {
                Ok(Some(record)) => {
                    let own_entry = index_key(record.expires_at(), record_key);
                    if own_entry != *entry {
                        // A stale entry. The record's own entry is normally there already; it is
                        // missing only for records whose expiry a later release computes
                        // differently (a held record is now kept a retention after its lease),
                        // and then it is filed where the record now expires.
                        if !self.db.contains_key(&own_entry).map_err(unavailable)? {
                            self.db.insert(own_entry, &[]).map_err(unavailable)?;
                        }
                    } else if record.is_expired(now) {
                        // The record goes first, then its body, then the entry: a crash in between
                        // leaves a stale entry (and maybe the body), which the next sweep deletes.
                        self.db.remove(record_key).map_err(unavailable)?;
                        self.db.remove(body_key(record_key)).map_err(unavailable)?;
                        self.records.fetch_sub(1, Ordering::SeqCst);
                        report.deleted += 1;
                    } else {
                        // Only in the current second's bucket: not expired yet, so it stays indexed.
                        continue;
                    }
                }
                Ok(None) => {
                    // A stale entry: the record is gone, and so must be a body that a crash in the
                    // middle of deleting it left behind.
                    self.db.remove(body_key(record_key)).map_err(unavailable)?;
                }
                Err(StoreError::Corrupt(reason)) => {
                    // Leave the record for an operator; drop its entry so sweeping goes on.
                    tracing::error!(%reason, "skipping an undecodable record while sweeping");
                }
                Err(error) => return Err(error),
            }
            self.db.remove(&*entry).map_err(unavailable)?;
        }
        Ok(report)
    }
}

/// How far into the expiry index a sweep looks (see [`Inner::sweep`]).
#[derive(Clone, Copy)]
enum SweepReach {
    Due,
    CurrentSecond,
}

/// Whether a sweep waits for a busy key's lock or passes the key by.
#[derive(Clone, Copy)]
enum LockWait {
    Wait,
    Skip,
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
            .ok_or_else(|| StoreError::Unavailable("the store is closed".to_owned()))?
    }

    fn record_count(&self) -> u64 {
        self.shared.current.read().as_ref().map_or(0, |inner| inner.records.load(Ordering::SeqCst))
    }

    fn health(&self) -> watch::Receiver<bool> {
        self.shared.healthy.subscribe()
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
                return Err(StoreError::Unavailable("closed while reopening after a disk failure".to_owned()));
            };
            if let Some(commit) = &inner.commit {
                commit.stop();
            }
            if !*shared.healthy.borrow() {
                return Err(StoreError::Unavailable("the last writes could not be made durable".to_owned()));
            }
            inner.db.flush().map(drop).map_err(unavailable)
        })
        .await
        .map_err(|error| StoreError::Unavailable(format!("the close task failed: {error}")))?
    }
}

fn unavailable(error: sled::Error) -> StoreError {
    StoreError::Unavailable(error.to_string())
}

fn read_u64(bytes: &[u8]) -> Option<u64> {
    bytes.try_into().ok().map(u64::from_be_bytes)
}

fn record_key(namespace: &Namespace, key: &Key) -> Vec<u8> {
    let namespace = namespace.as_str().as_bytes();
    let mut bytes = Vec::with_capacity(2 + namespace.len() + key.as_str().len());
    bytes.push(RECORD_PREFIX);
    // Namespaces are at most 64 bytes, so their length fits one byte.
    bytes.push(namespace.len() as u8);
    bytes.extend_from_slice(namespace);
    bytes.extend_from_slice(key.as_str().as_bytes());
    bytes
}

/// Where the response body of the record under `record_key` is stored apart.
fn body_key(record_key: &[u8]) -> Vec<u8> {
    let mut bytes = record_key.to_vec();
    bytes[0] = BODY_PREFIX;
    bytes
}

/// Whether reading a record fetches a response body stored apart (the sweeper needs only the
/// record's times).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Body {
    Load,
    Skip,
}

/// Decodes the value stored under `record_key`, in either layout (see the module's comment).
fn decode_stored(db: &sled::Db, record_key: &[u8], bytes: &[u8], body: Body) -> Result<Record, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt(reason);
    let Some((&BODY_APART, encoded)) = bytes.split_first() else {
        return Record::decode(bytes).map_err(|e| corrupt(e.to_string()));
    };
    let mut record = Record::decode(encoded).map_err(|e| corrupt(e.to_string()))?;
    match &mut record.state {
        RecordState::Completed { response, .. } if body == Body::Load => {
            let stored = db
                .get(body_key(record_key))
                .map_err(unavailable)?
                .ok_or_else(|| corrupt("a completed record's response body is missing".to_owned()))?;
            response.body = stored.to_vec();
        }
        RecordState::Completed { .. } => {}
        RecordState::Held(_) | RecordState::Released { .. } => {
            return Err(corrupt("a record marked as completed is not completed".to_owned()));
        }
    }
    Ok(record)
}

/// Reads a key written by [`record_key`].
fn parse_record_key(bytes: &[u8]) -> Option<(Namespace, Key)> {
    let (&prefix, rest) = bytes.split_first()?;
    let (&length, rest) = rest.split_first()?;
    if prefix != RECORD_PREFIX || rest.len() < usize::from(length) {
        return None;
    }
    let (namespace, key) = rest.split_at(usize::from(length));
    let namespace = Namespace::parse(std::str::from_utf8(namespace).ok()?).ok()?;
    let key = Key::parse(std::str::from_utf8(key).ok()?).ok()?;
    Some((namespace, key))
}

/// The index files a record under its expiry rounded up to the whole second. A Claim and its
/// Complete usually fall in the same second, so the Complete need not move the entry (two sled
/// writes fewer per flow). A record is then swept up to a second after it expired; calls treat it
/// as absent from its exact expiry on, as always.
fn expiry_bucket(expires_at: Timestamp) -> i64 {
    let millis = expires_at.unix_millis();
    millis.saturating_add(999).div_euclid(1000).saturating_mul(1000)
}

fn index_key(expires_at: Timestamp, record_key: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(9 + record_key.len());
    bytes.push(INDEX_PREFIX);
    // Flip the sign bit so that negative instants sort before positive ones.
    bytes.extend_from_slice(&((expiry_bucket(expires_at) as u64) ^ (1 << 63)).to_be_bytes());
    bytes.extend_from_slice(record_key);
    bytes
}

/// sled's own flush writes its log with `sync_file_range`, which survives a process crash but not
/// a power loss (it does not flush the disk's cache or file metadata), and it writes large values
/// ("blobs") to separate files without syncing them. So after each flush this also fdatasyncs the
/// log file, fsyncs blob files created since the last flush, and the directories that list them.
/// Opens the sled database in `options.path` with its group commit. Never starts over on
/// unreadable data.
fn open_inner(options: &SledOptions, wrap: &FlushWrapper) -> Result<Inner, OpenError> {
    let path = options.path.clone();
    let sled_error = |source| OpenError::Sled { path: path.clone(), source };
    let flush_every_ms = match options.durability {
        Durability::Strict => None,
        Durability::Relaxed => Some(500),
    };
    let db = sled::Config::new()
        .path(&path)
        .cache_capacity(options.cache_capacity_bytes)
        .flush_every_ms(flush_every_ms)
        .open()
        .map_err(sled_error)?;
    let reserved = match db.get(FENCING_RESERVATION).map_err(sled_error)? {
        None => 0,
        Some(bytes) => read_u64(&bytes).ok_or_else(|| OpenError::Corrupt {
            path: path.clone(),
            reason: "the fencing token reservation is malformed".to_owned(),
        })?,
    };
    let mut records = 0u64;
    for entry in db.scan_prefix([RECORD_PREFIX]).keys() {
        entry.map_err(sled_error)?;
        records += 1;
    }
    let io_error = |source| OpenError::Io { path: path.clone(), source };
    let commit = match options.durability {
        Durability::Strict => {
            Some(GroupCommit::start(wrap(durable_flush(db.clone(), &path).map_err(io_error)?)).map_err(io_error)?)
        }
        Durability::Relaxed => None,
    };
    Ok(Inner {
        db,
        stripes: (0..STRIPES).map(|_| Mutex::new(Stripe::default())).collect(),
        // Start exactly at the reservation, so the first grant writes a new one above it.
        fencing: Mutex::new(FencingCounter { last: reserved, reserved }),
        records: AtomicU64::new(records),
        max_records: options.max_records,
        commit,
    })
}

/// How often a failed store checks whether the disk works again.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// The probe: 1 MiB written to a scratch file in the data directory and synced, so that a disk
/// with a few free pages does not pass for a working one.
fn space_probe(path: &Path) -> FlushFn {
    let scratch = path.join("space-probe");
    Box::new(move || {
        let result = (|| {
            let mut file = File::create(&scratch)?;
            std::io::Write::write_all(&mut file, &vec![0u8; 1 << 20])?;
            file.sync_all()
        })();
        let _ = std::fs::remove_file(&scratch);
        result
    })
}

/// The supervisor thread: after a failed flush, waits until the disk works again, then reopens
/// the database from disk and accepts changes again. Returns when the store closes.
fn supervise(shared: &Shared) {
    // Sleeps for `timeout` unless the store is closing; true when it is.
    let stopped = |timeout: Duration| {
        let mut stopping = shared.stopping.lock();
        if !*stopping {
            shared.stop_signal.wait_for(&mut stopping, timeout);
        }
        *stopping
    };
    loop {
        let commit_health = match shared.current.read().as_ref().and_then(|inner| inner.commit.as_ref()) {
            Some(commit) => commit.health(),
            None => return,
        };
        while *commit_health.borrow() {
            if stopped(Duration::from_millis(100)) {
                return;
            }
        }
        shared.healthy.send_replace(false);
        tracing::error!(
            "a write could not be made durable (disk full or failing): refusing changes, serving what is on disk, \
             and checking the disk every second"
        );
        let mut probe = (shared.wrap)(space_probe(&shared.options.path));
        loop {
            if stopped(PROBE_INTERVAL) {
                return;
            }
            if probe().is_ok() {
                break;
            }
        }
        tracing::info!("the disk accepts writes again; reopening the data directory");
        let Some(old) = shared.current.write().take() else { return };
        // Calls in flight on the old database fail at once (its group commit is poisoned); wait
        // until they let go, so that sled releases the directory.
        while Arc::strong_count(&old) > 1 {
            if stopped(Duration::from_millis(10)) {
                *shared.current.write() = Some(old);
                return;
            }
        }
        if let Some(commit) = &old.commit {
            commit.stop();
        }
        drop(old);
        let reopened = loop {
            match open_inner(&shared.options, &shared.wrap) {
                Ok(inner) => break inner,
                Err(error) => {
                    // sled's own threads may hold the directory lock a moment after the last handle.
                    tracing::warn!(%error, "reopening the data directory failed; retrying");
                    if stopped(Duration::from_millis(100)) {
                        return;
                    }
                }
            }
        };
        *shared.current.write() = Some(Arc::new(reopened));
        shared.healthy.send_replace(true);
        tracing::info!("the data directory was reopened; accepting changes again");
    }
}

fn durable_flush(db: sled::Db, path: &Path) -> std::io::Result<FlushFn> {
    let log = File::open(path.join("db"))?;
    File::open(path)?.sync_all()?;
    let blobs_dir = path.join("blobs");
    let mut synced_blobs: HashSet<OsString> = HashSet::new();
    Ok(Box::new(move || {
        db.flush().map_err(std::io::Error::other)?;
        log.sync_data()?;
        // Blob files are rare (values over a quarter of a segment) and their directory small, so
        // it is listed on every flush; a modification time would be too coarse to rely on.
        let mut present = HashSet::with_capacity(synced_blobs.len());
        let mut created = false;
        let entries = match std::fs::read_dir(&blobs_dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(error) => return Err(error),
        };
        for entry in entries {
            let name = entry?.file_name();
            if !synced_blobs.contains(&name) {
                // sled deletes a blob as soon as no page refers to it any more, which can happen
                // between the listing and this open (pages of large values are rewritten often
                // under load). A blob that is gone holds nothing that any acknowledged state
                // needs, so there is nothing to sync; it is not an I/O failure.
                match File::open(blobs_dir.join(&name)) {
                    Ok(file) => match file.sync_all() {
                        Ok(()) => {}
                        Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(error) => return Err(error),
                    },
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(error) => return Err(error),
                }
                created = true;
            }
            present.insert(name);
        }
        if created {
            File::open(&blobs_dir)?.sync_all()?;
        }
        synced_blobs = present;
        Ok(())
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        })
        .unwrap()
    }

    fn claim_command(retention: Duration) -> Claim {
        Claim {
            fingerprint: crate::domain::Fingerprint::parse(b"fp").unwrap(),
            lease_ttl: Duration::from_secs(30),
            retention,
            request_id: None,
            owner: crate::domain::Owner::parse("test").unwrap(),
            new_lease_token: crate::domain::LeaseToken::generate(),
        }
    }

    fn response(body: &[u8]) -> crate::domain::Response {
        crate::domain::Response { body: body.to_vec(), metadata: [("status".to_owned(), "201".to_owned())].into() }
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
            ClaimOutcome::Completed(stored) => stored.response.body,
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
        let refused = inner.write_failed(StoreError::Unavailable("refused".to_owned()));
        assert!(matches!(refused, StoreError::Unavailable(_)), "{refused:?}");
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
        let (mut exported, _) = store.export().unwrap();
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
            response.body = b"inline body".to_vec();
        }
        db.insert(&record_key, record.encode()).unwrap();
        db.remove(body_key(&record_key)).unwrap();

        assert_eq!(replayed_body(&store, &key, NOW).await, b"inline body");
        let (mut exported, _) = store.export().unwrap();
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
        let dir = tempfile::tempdir().unwrap();
        let store = open_at(dir.path());
        let namespace = Namespace::parse("ns").unwrap();
        let key = Key::parse("held").unwrap();
        let claim = claim_command(Duration::from_secs(1));
        store.claim(&namespace, &key, NOW, &claim, false).await.unwrap();
        // What a store written by a release that kept held records only until their lease ended
        // holds: the record's entry at the lease's end (NOW + 30 s) instead of a retention later.
        let record_key = record_key(&namespace, &key);
        let inner = store.inner().unwrap();
        let record = inner.read(&record_key, Body::Load).unwrap().unwrap();
        inner.db.remove(index_key(record.expires_at(), &record_key)).unwrap();
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
