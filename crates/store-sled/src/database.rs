//! One opening of the sled database: the stripe locks that make each key's read-decide-write
//! atomic, the record limit, the writes in crash-safe order, and sweeping.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use idempotency_core::domain::{Record, RecordState, Timestamp, Transition};
use idempotency_core::store::{StoreError, SweepReport};
use parking_lot::{Mutex, RwLock};

use crate::durable::durable_flush;
use crate::fencing::FENCING_RESERVATION;
use crate::fencing::FencingCounter;
use crate::group_commit::{FlushStats, GroupCommit};
use crate::layout::{
    BODY_APART, Body, INDEX_PREFIX, RECORD_PREFIX, body_key, decode_stored, expiry_bucket, filed_at, index_key,
    namespace_of,
};
use crate::store::{Durability, FlushWrapper, OpenError, SledOptions};
use crate::unavailable;
use crate::wal::{self, Logged, Wal};

/// Number of stripe locks; keys hash onto them.
pub(crate) const STRIPES: usize = 1024;

#[derive(Default)]
pub(crate) struct Stripe {
    /// The group-commit ticket of the latest write to any key of this stripe.
    pub(crate) last_write: u64,
}

pub(crate) struct OpenDatabase {
    pub(crate) db: sled::Db,
    pub(crate) stripes: Box<[Mutex<Stripe>]>,
    pub(crate) fencing: Mutex<FencingCounter>,
    pub(crate) records: AtomicU64,
    pub(crate) max_records: u64,
    /// Records per namespace (by its bytes), kept for quotas, which may be set at any time.
    pub(crate) namespace_records: Mutex<HashMap<Box<[u8]>, u64>>,
    /// The per-namespace quotas, shared with the store (they outlive a reopening).
    pub(crate) quotas: Arc<RwLock<HashMap<String, u64>>>,
    pub(crate) commit: Option<GroupCommit>,
    /// The write-ahead log (strict durability only), which the group commit writes out.
    pub(crate) wal: Option<Arc<Wal>>,
}

/// How many expired records a Claim may sweep inline when the store is full.
pub(crate) const INLINE_SWEEP_BATCH: usize = 64;

impl OpenDatabase {
    pub(crate) fn stripe(&self, record_key: &[u8]) -> &Mutex<Stripe> {
        // FNV-1a: cheap and well spread; lock striping needs no cryptographic strength.
        let hash =
            record_key.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3));
        &self.stripes[(hash % STRIPES as u64) as usize]
    }

    pub(crate) fn read(&self, record_key: &[u8], body: Body) -> Result<Option<Record>, StoreError> {
        match self.db.get(record_key).map_err(unavailable)? {
            None => Ok(None),
            Some(bytes) => decode_stored(&self.db, record_key, &bytes, body).map(Some),
        }
    }

    /// The atomic read-decide-write of one key; returns the outcome and the group-commit ticket
    /// that must be durable before the outcome may be reported.
    pub(crate) fn apply<T>(
        &self,
        record_key: &[u8],
        now: Timestamp,
        decide: impl FnOnce(&OpenDatabase, Option<&Record>) -> Result<Transition<T>, StoreError>,
    ) -> Result<(T, u64), StoreError> {
        let mut stripe = self.stripe(record_key).lock();
        let current = self.read(record_key, Body::Load)?;
        let transition = decide(self, current.as_ref())?;
        let Some(record) = transition.write else {
            return Ok((transition.outcome, stripe.last_write));
        };
        if current.is_none() {
            self.reserve_record_slot(record_key, now).map_err(|error| self.write_failed(error))?;
        }
        // The log gets the record as written (a clone shares the body's bytes).
        let logged = self.wal.is_some().then(|| record.clone());
        if let Err(error) = self.write(record_key, current.as_ref(), record) {
            if current.is_none() {
                self.records.fetch_sub(1, Ordering::SeqCst);
                self.count_namespace(record_key, -1);
            }
            return Err(self.write_failed(error));
        }
        // Appended after sled has the change: a checkpoint that starts after this entry's
        // ticket was taken covers the change.
        stripe.last_write = match (&self.wal, &self.commit, logged) {
            (Some(wal), Some(commit), Some(logged)) => wal.put(commit, record_key, &logged),
            _ => 0,
        };
        Ok((transition.outcome, stripe.last_write))
    }

    /// Counts a new record in, or fails with `NamespaceFull` (its namespace holds its quota) or
    /// `Full` (the store holds its maximum). Expired records count until swept, so a full store
    /// or namespace first sweeps a small batch inline (skipping keys locked by others) and retries.
    pub(crate) fn reserve_record_slot(&self, record_key: &[u8], now: Timestamp) -> Result<(), StoreError> {
        let namespace = namespace_of(record_key);
        let quota = std::str::from_utf8(namespace).ok().and_then(|name| self.quotas.read().get(name).copied());
        // The namespace's count is checked and raised under one lock, so that concurrent Claims
        // of new keys cannot pass its quota together.
        let reserve_in_namespace = || {
            let mut counts = self.namespace_records.lock();
            let count = counts.entry(namespace.into()).or_insert(0);
            if quota.is_some_and(|max| *count >= max) {
                return false;
            }
            *count += 1;
            true
        };
        if !reserve_in_namespace() {
            self.sweep(now, INLINE_SWEEP_BATCH, LockWait::Skip, SweepReach::CurrentSecond)?;
            if !reserve_in_namespace() {
                return Err(StoreError::NamespaceFull { max_records: quota.unwrap_or(0) });
            }
        }
        let max_records = self.max_records;
        let reserve = || {
            self.records
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |count| (count < max_records).then_some(count + 1))
                .is_ok()
        };
        if reserve() {
            return Ok(());
        }
        let swept = self.sweep(now, INLINE_SWEEP_BATCH, LockWait::Skip, SweepReach::CurrentSecond);
        if swept.is_ok() && reserve() {
            return Ok(());
        }
        self.count_namespace(record_key, -1);
        swept?;
        Err(StoreError::Full { max_records })
    }

    /// Adds `change` to the record count of `record_key`'s namespace.
    pub(crate) fn count_namespace(&self, record_key: &[u8], change: i64) {
        let mut counts = self.namespace_records.lock();
        let count = counts.entry(namespace_of(record_key).into()).or_insert(0);
        *count = count.saturating_add_signed(change);
    }

    /// Passes `error` on; when sled refused a write, first stops the group commit, so that the
    /// store turns unhealthy and the supervisor reopens it once the disk works again. sled refuses
    /// every write after one of its own log writes failed (a full disk, say), and a flush with no
    /// newer write pending still succeeds, so a failed write may be the only sign of it.
    pub(crate) fn write_failed(&self, error: StoreError) -> StoreError {
        if let (StoreError::Unavailable { .. }, Some(commit)) = (&error, &self.commit) {
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
    pub(crate) fn write(
        &self,
        record_key: &[u8],
        previous: Option<&Record>,
        mut record: Record,
    ) -> Result<(), StoreError> {
        let entry = index_key(filed_at(&record), record_key);
        let previous_entry = previous.map(|previous| self.entry_of(record_key, previous)).transpose()?;
        if previous_entry.as_ref() != Some(&entry) {
            self.db.insert(entry.as_slice(), &[]).map_err(unavailable)?;
        }
        let value = match &mut record.state {
            RecordState::Completed { response, .. } => {
                let body = std::mem::take(&mut response.body);
                self.db.insert(body_key(record_key), body.as_ref()).map_err(unavailable)?;
                let mut value = record.encode();
                value.insert(0, BODY_APART);
                value
            }
            RecordState::Held(_) | RecordState::Released { .. } => record.encode(),
        };
        self.db.insert(record_key, value).map_err(unavailable)?;
        if let Some(previous_entry) = previous_entry.filter(|previous_entry| *previous_entry != entry) {
            self.db.remove(previous_entry).map_err(unavailable)?;
        }
        Ok(())
    }

    /// Where `record`'s index entry is: under its filing time, unless a sweep filed it again
    /// under its expiry (or a release that filed records by their expiry wrote it).
    fn entry_of(&self, record_key: &[u8], record: &Record) -> Result<Vec<u8>, StoreError> {
        let filed = index_key(filed_at(record), record_key);
        let at_expiry = index_key(record.expires_at(), record_key);
        if filed == at_expiry || self.db.contains_key(&filed).map_err(unavailable)? { Ok(filed) } else { Ok(at_expiry) }
    }

    /// Applies one entry of the write-ahead log to sled again (see [`crate::wal`]).
    fn reapply(&self, payload: &[u8]) -> Result<(), String> {
        match wal::decode(payload)? {
            Logged::Put { record_key, record } => {
                let record = Record::decode(record).map_err(|error| error.to_string())?;
                // Only the previous record's expiry matters here (to move its index entry); one
                // that cannot be read is replaced.
                let previous = self.read(record_key, Body::Skip).ok().flatten();
                self.write(record_key, previous.as_ref(), record).map_err(|error| error.to_string())
            }
            Logged::Delete { record_key } => self.delete(record_key).map(|_| ()).map_err(|error| error.to_string()),
            Logged::Reserve(reserved) => {
                let current = self.db.get(FENCING_RESERVATION).map_err(|error| error.to_string())?;
                if current.as_deref().and_then(read_u64).is_none_or(|current| current < reserved) {
                    self.db.insert(FENCING_RESERVATION, &reserved.to_be_bytes()).map_err(|error| error.to_string())?;
                }
                Ok(())
            }
        }
    }

    /// Deletes a key's record, its body and its index entry, in the order a sweep does (a crash
    /// in between leaves a stale entry, which sweeping removes); whether there was a record.
    /// The caller holds the key's stripe lock, or has the store to itself (re-applying the log).
    fn delete(&self, record_key: &[u8]) -> Result<bool, StoreError> {
        // An undecodable record is deleted too (its index entry, if any, is then stale).
        let record = match self.read(record_key, Body::Skip) {
            Ok(None) => return Ok(false),
            Ok(Some(record)) => Some(record),
            Err(StoreError::Corrupt(_)) => None,
            Err(error) => return Err(error),
        };
        self.db.remove(record_key).map_err(unavailable)?;
        self.db.remove(body_key(record_key)).map_err(unavailable)?;
        if let Some(record) = record {
            // Both places its entry may be (see `entry_of`).
            let filed = index_key(filed_at(&record), record_key);
            let at_expiry = index_key(record.expires_at(), record_key);
            self.db.remove(&filed).map_err(unavailable)?;
            if at_expiry != filed {
                self.db.remove(at_expiry).map_err(unavailable)?;
            }
        }
        self.records.fetch_sub(1, Ordering::SeqCst);
        self.count_namespace(record_key, -1);
        Ok(true)
    }

    /// Purges a key's record under its stripe lock, logging the deletion; whether there was one,
    /// and the group-commit ticket that must be durable before that may be reported.
    pub(crate) fn purge(&self, record_key: &[u8]) -> Result<(bool, u64), StoreError> {
        let mut stripe = self.stripe(record_key).lock();
        let deleted = self.delete(record_key).map_err(|error| self.write_failed(error))?;
        if deleted && let (Some(wal), Some(commit)) = (&self.wal, &self.commit) {
            stripe.last_write = wal.delete(commit, record_key);
        }
        Ok((deleted, stripe.last_write))
    }

    pub(crate) async fn wait_durable(&self, ticket: u64) -> Result<(), StoreError> {
        match &self.commit {
            Some(commit) if ticket > 0 => commit
                .durable(ticket)
                .await
                .map_err(|_| StoreError::unavailable("the change could not be made durable")),
            _ => Ok(()),
        }
    }

    /// Deletes up to `batch` index entries that are due at `now`: expired records with their
    /// entries, and stale entries alone; the entry of a held record whose lease outlived its
    /// filing time moves to the record's expiry. Blocking; the caller keeps it off the async
    /// workers.
    ///
    /// `reach` says how far it looks. [`SweepReach::Due`] (the sweeper) stops at `now`: every
    /// bucket before it holds only expired records and held ones it files again, so no entry is
    /// met twice. [`SweepReach::CurrentSecond`] (a full store making room) also looks into the
    /// bucket of the second that `now` falls in, where records that expired a moment ago sit
    /// beside ones that have not, and leaves the latter alone.
    pub(crate) fn sweep(
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
                    let filed = index_key(filed_at(&record), record_key);
                    let at_expiry = index_key(record.expires_at(), record_key);
                    if *entry != filed && *entry != at_expiry {
                        // A stale entry. The record's own entry is normally there already; it is
                        // missing only for records whose filing a later release computes
                        // differently, and then it is filed where the record now expires.
                        if !self.db.contains_key(&filed).map_err(unavailable)?
                            && !self.db.contains_key(&at_expiry).map_err(unavailable)?
                        {
                            self.db.insert(at_expiry, &[]).map_err(unavailable)?;
                        }
                    } else if record.is_expired(now) {
                        // The record goes first, then its body, then the entry: a crash in between
                        // leaves a stale entry (and maybe the body), which the next sweep deletes.
                        self.db.remove(record_key).map_err(unavailable)?;
                        self.db.remove(body_key(record_key)).map_err(unavailable)?;
                        self.records.fetch_sub(1, Ordering::SeqCst);
                        self.count_namespace(record_key, -1);
                        report.deleted += 1;
                    } else if *entry != at_expiry && at_expiry.as_slice() > end.as_slice() {
                        // A held key whose lease outlived its filing time: filed again under its
                        // expiry, so that sweeps do not meet it again before then.
                        self.db.insert(at_expiry, &[]).map_err(unavailable)?;
                    } else {
                        // Not expired yet, in the current second's bucket: it stays indexed.
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

/// How far into the expiry index a sweep looks (see [`OpenDatabase::sweep`]).
#[derive(Clone, Copy)]
pub(crate) enum SweepReach {
    Due,
    CurrentSecond,
}

/// Whether a sweep waits for a busy key's lock or passes the key by.
#[derive(Clone, Copy)]
pub(crate) enum LockWait {
    Wait,
    Skip,
}

pub(crate) fn open_database(
    options: &SledOptions,
    wrap: &FlushWrapper,
    quotas: &Arc<RwLock<HashMap<String, u64>>>,
    flush_stats: &Arc<FlushStats>,
) -> Result<OpenDatabase, OpenError> {
    let path = options.path.clone();
    let sled_error = |source| OpenError::Sled { path: path.clone(), source };
    let io_error = |source| OpenError::Io { path: path.clone(), source };
    let corrupt = |reason: String| OpenError::Corrupt { path: path.clone(), reason };
    // Strict: sled is made durable by the write-ahead log's checkpoints only.
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
    let mut inner = OpenDatabase {
        db,
        stripes: (0..STRIPES).map(|_| Mutex::new(Stripe::default())).collect(),
        fencing: Mutex::new(FencingCounter { last: 0, reserved: 0 }),
        records: AtomicU64::new(0),
        max_records: options.max_records,
        namespace_records: Mutex::new(HashMap::new()),
        quotas: Arc::clone(quotas),
        commit: None,
        wal: None,
    };
    if options.durability == Durability::Strict {
        let recovery = wal::read(&path).map_err(|error| match error {
            wal::RecoveryError::Io(source) => io_error(source),
            wal::RecoveryError::Corrupt(reason) => corrupt(reason),
        })?;
        for (seq, payload) in &recovery.entries {
            inner.reapply(payload).map_err(|reason| corrupt(format!("write-ahead log entry {seq}: {reason}")))?;
        }
        let mut checkpoint_flush = wrap(durable_flush(inner.db.clone(), &path).map_err(io_error)?);
        if recovery.needs_checkpoint() {
            checkpoint_flush().map_err(io_error)?;
            wal::write_checkpoint(&path.join(wal::WAL_DIR), recovery.last_seq()).map_err(io_error)?;
        }
        if !recovery.entries.is_empty() {
            tracing::info!(
                entries = recovery.entries.len(),
                "re-applied the write-ahead log after its last checkpoint"
            );
        }
        let (wal, writer) =
            wal::open(&path, options.wal_file_bytes, recovery.last_seq(), checkpoint_flush).map_err(io_error)?;
        inner.commit = Some(GroupCommit::start(wrap(writer.into_flush()), Arc::clone(flush_stats)).map_err(io_error)?);
        inner.wal = Some(wal);
    }
    let reserved = match inner.db.get(FENCING_RESERVATION).map_err(sled_error)? {
        None => 0,
        Some(bytes) => {
            read_u64(&bytes).ok_or_else(|| corrupt("the fencing token reservation is malformed".to_owned()))?
        }
    };
    // Start exactly at the reservation, so the first grant writes a new one above it.
    inner.fencing = Mutex::new(FencingCounter { last: reserved, reserved });
    let mut records = 0u64;
    let mut namespace_records: HashMap<Box<[u8]>, u64> = HashMap::new();
    for entry in inner.db.scan_prefix([RECORD_PREFIX]).keys() {
        let key = entry.map_err(sled_error)?;
        records += 1;
        *namespace_records.entry(namespace_of(&key).into()).or_insert(0) += 1;
    }
    inner.records = AtomicU64::new(records);
    inner.namespace_records = Mutex::new(namespace_records);
    Ok(inner)
}

pub(crate) fn read_u64(bytes: &[u8]) -> Option<u64> {
    bytes.try_into().ok().map(u64::from_be_bytes)
}
