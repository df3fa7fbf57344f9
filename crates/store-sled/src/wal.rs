//! The write-ahead log of the strict store: what makes a change durable before its reply.
//!
//! A change is applied to sled in memory, then appended to the log's pending buffer under the
//! same stripe lock (so one key's entries are in the order of its changes), and its reply waits
//! for the group commit. A group commit writes the whole pending buffer at the end of the current
//! log file and fdatasyncs that one file: one write and one sync per batch, into a file whose
//! blocks were written before (files grow by zeros ahead of their entries, as PostgreSQL's WAL
//! segments do), so the sync has only data to flush. sled's own flush, with its I/O threads and
//! its log growing on every batch, is out of the latency path: sled is made durable in the
//! background by a checkpoint (the durable flush of [`crate::durable`], then a checkpoint file
//! naming the last entry it covers) whenever a log file is full, and on close.
//!
//! Two files take turns: when the current one is full, writing moves to the other, whose entries
//! must be covered by a finished checkpoint first (the checkpoint requested when writing left it
//! normally finished long before), and a checkpoint of the full one is requested.
//!
//! On open, entries after the checkpoint are applied to sled again, in order, before anything
//! else; then a checkpoint covers them. Re-applying is safe because an entry holds the whole new
//! record: the state of a key becomes that of its last durable entry. A change that sled had
//! already written but whose entry was not durable was never acknowledged, so either state is
//! right for it. Re-applying writes the record the way a change does (index entry, body, record),
//! so what it leaves behind is what a crash between sled's own writes leaves: at most stale index
//! entries and unreferenced bodies, which sweeping removes. Sweeps delete from sled without log
//! entries: a deletion lost in a crash, or undone by re-applying an older entry, leaves an expired
//! record, which calls treat as absent and the next sweep deletes again.
//!
//! An entry: CRC-32 (of everything after it), payload length, sequence number (u32, u32, u64,
//! little-endian), then the payload: `1`, the record key's length (u16), the record key and the
//! record encoded with its body inline; `2` and a fencing reservation (u64); or `3` and a record
//! key whose record was purged (the Admin API: a deletion of a live record, which must be as
//! durable as a write, unlike a sweep's, and is re-applied the same way). A file is read
//! up to its first entry that does not check; its older entries (from earlier turns, or from
//! before a restart) are told apart by their sequence numbers, which the checkpoint covers.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use idempotency_core::domain::Record;
use parking_lot::{Condvar, Mutex};

use crate::group_commit::{FlushFn, GroupCommit};

/// The log's directory, inside the data directory.
pub(crate) const WAL_DIR: &str = "wal";
const FILE_NAMES: [&str; 2] = ["0.log", "1.log"];
const CHECKPOINT: &str = "checkpoint";
const CHECKPOINT_TMP: &str = "checkpoint.tmp";
const CHECKPOINT_MAGIC: &[u8; 8] = b"idemwal1";
/// The default size of each file: writing moves to the other file once a batch would take the
/// current one past it.
pub const FILE_BYTES: u64 = 64 << 20;
/// Files grow by this many bytes of zeros at a time, ahead of the entries written into them.
const GROWTH: u64 = 4 << 20;
const HEADER: usize = 16;
const PUT: u8 = 1;
const RESERVE: u8 = 2;
const DELETE: u8 = 3;

/// The append side of the log, shared by every writer.
pub(crate) struct Wal {
    pending: Mutex<Pending>,
    checkpoints: Checkpointer,
}

struct Pending {
    /// The sequence number of the next entry.
    next_seq: u64,
    /// Entries appended since the last group commit took them.
    buffer: Vec<u8>,
}

/// An entry's payload, as read back.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Logged<'a> {
    /// A key's new record (body inline).
    Put { record_key: &'a [u8], record: &'a [u8] },
    /// A fencing reservation.
    Reserve(u64),
    /// A key's record was deleted (purged).
    Delete { record_key: &'a [u8] },
}

impl Wal {
    /// Appends a key's new record; returns the group-commit ticket its reply waits for.
    pub(crate) fn put(&self, commit: &GroupCommit, record_key: &[u8], record: &Record) -> u64 {
        self.append(commit, |out| {
            out.push(PUT);
            // Record keys are at most 2 + 64 + 255 bytes.
            out.extend_from_slice(&(record_key.len() as u16).to_le_bytes());
            out.extend_from_slice(record_key);
            record.encode_into(out);
        })
    }

    /// Appends the deletion of a key's record; returns the group-commit ticket its reply waits for.
    pub(crate) fn delete(&self, commit: &GroupCommit, record_key: &[u8]) -> u64 {
        self.append(commit, |out| {
            out.push(DELETE);
            out.extend_from_slice(record_key);
        })
    }

    /// Appends a fencing reservation; returns its ticket.
    pub(crate) fn reserve(&self, commit: &GroupCommit, reserved: u64) -> u64 {
        self.append(commit, |out| {
            out.push(RESERVE);
            out.extend_from_slice(&reserved.to_le_bytes());
        })
    }

    fn append(&self, commit: &GroupCommit, payload: impl FnOnce(&mut Vec<u8>)) -> u64 {
        let mut pending = self.pending.lock();
        let Pending { next_seq, buffer } = &mut *pending;
        let start = buffer.len();
        buffer.resize(start + HEADER, 0);
        payload(buffer);
        let length = (buffer.len() - start - HEADER) as u32;
        buffer[start + 4..start + 8].copy_from_slice(&length.to_le_bytes());
        buffer[start + 8..start + HEADER].copy_from_slice(&next_seq.to_le_bytes());
        let crc = crc32fast::hash(&buffer[start + 4..]);
        buffer[start..start + 4].copy_from_slice(&crc.to_le_bytes());
        *next_seq += 1;
        // Under the same lock, so that tickets and entries are in the same order: a flush that
        // takes the buffer after reading ticket t writes every entry up to t.
        commit.written()
    }

    /// Makes sled durable up to the last entry appended and records it in the checkpoint, so
    /// that the next open has nothing to re-apply. For a clean close, after the group commit
    /// has written everything.
    pub(crate) fn checkpoint_all(&self) -> std::io::Result<()> {
        let last = self.pending.lock().next_seq - 1;
        self.checkpoints.request(last);
        self.checkpoints.wait_for(last)
    }
}

/// The file side of the log: what a group commit runs.
pub(crate) struct WalWriter {
    wal: Arc<Wal>,
    files: [File; 2],
    /// Each file's length (the zeros ahead of its entries included).
    lengths: [u64; 2],
    current: usize,
    position: u64,
    /// The last entry written to each file since this opening (0: none).
    last_seq: [u64; 2],
    /// The buffer being written; swapped with the pending one, so neither is reallocated.
    outgoing: Vec<u8>,
    /// The size at which writing moves to the other file.
    file_bytes: u64,
}

impl WalWriter {
    /// The group commit's flush: writes every pending entry and fdatasyncs the file.
    pub(crate) fn into_flush(mut self) -> FlushFn {
        Box::new(move || self.flush())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let last_seq = {
            let mut pending = self.wal.pending.lock();
            if pending.buffer.is_empty() {
                return Ok(());
            }
            std::mem::swap(&mut pending.buffer, &mut self.outgoing);
            pending.next_seq - 1
        };
        let written = self.write_out(last_seq);
        self.outgoing.clear();
        written
    }

    fn write_out(&mut self, last_seq: u64) -> std::io::Result<()> {
        let length = self.outgoing.len() as u64;
        if self.position > 0 && self.position + length > self.file_bytes {
            self.switch()?;
        }
        let end = self.position + length;
        let file = &self.files[self.current];
        if end > self.lengths[self.current] {
            // Zeros ahead, so that the syncs of the next batches flush data blocks only; the size
            // change is made durable by the sync below.
            // (Not past the file's size, unless one batch is larger.)
            let grown = (end.div_ceil(GROWTH) * GROWTH).min(self.file_bytes.max(end));
            let zeros = vec![0u8; 1 << 20];
            let mut at = self.lengths[self.current];
            while at < grown {
                let chunk = (grown - at).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..chunk], at)?;
                at += chunk as u64;
            }
            self.lengths[self.current] = grown;
        }
        file.write_all_at(&self.outgoing, self.position)?;
        file.sync_data()?;
        self.position = end;
        self.last_seq[self.current] = last_seq;
        Ok(())
    }

    /// Moves writing to the other file, once a checkpoint covers the entries it holds, and asks
    /// for a checkpoint of the current one.
    fn switch(&mut self) -> std::io::Result<()> {
        let other = 1 - self.current;
        self.wal.checkpoints.wait_for(self.last_seq[other])?;
        self.wal.checkpoints.request(self.last_seq[self.current]);
        self.current = other;
        self.position = 0;
        Ok(())
    }
}

/// The thread that runs checkpoints: sled's durable flush, then the checkpoint file.
struct Checkpointer {
    shared: Arc<CheckpointState>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

struct CheckpointState {
    progress: Mutex<CheckpointProgress>,
    changed: Condvar,
}

#[derive(Default)]
struct CheckpointProgress {
    requested: u64,
    done: u64,
    failed: bool,
    stopping: bool,
}

impl Checkpointer {
    fn start(dir: PathBuf, done: u64, mut flush: FlushFn) -> std::io::Result<Checkpointer> {
        let shared = Arc::new(CheckpointState {
            progress: Mutex::new(CheckpointProgress { requested: done, done, ..CheckpointProgress::default() }),
            changed: Condvar::new(),
        });
        let state = Arc::clone(&shared);
        let thread = std::thread::Builder::new().name("wal-checkpoint".to_owned()).spawn(move || {
            loop {
                let target = {
                    let mut progress = state.progress.lock();
                    while progress.requested <= progress.done && !progress.stopping {
                        state.changed.wait(&mut progress);
                    }
                    if progress.stopping {
                        return;
                    }
                    progress.requested
                };
                // Every entry up to `target` was applied to sled before it was appended, so the
                // flush, which starts now, covers them all.
                let result = flush().and_then(|()| write_checkpoint(&dir, target));
                let mut progress = state.progress.lock();
                match result {
                    Ok(()) => progress.done = progress.done.max(target),
                    Err(error) => {
                        tracing::error!(%error, "a checkpoint of the write-ahead log failed; no further change is acknowledged until the store is reopened");
                        progress.failed = true;
                    }
                }
                state.changed.notify_all();
                if progress.failed {
                    return;
                }
            }
        })?;
        Ok(Checkpointer { shared, thread: Mutex::new(Some(thread)) })
    }

    fn request(&self, seq: u64) {
        let mut progress = self.shared.progress.lock();
        if seq > progress.requested {
            progress.requested = seq;
            self.shared.changed.notify_all();
        }
    }

    /// Waits until a checkpoint covers `seq` (which must have been requested).
    fn wait_for(&self, seq: u64) -> std::io::Result<()> {
        let mut progress = self.shared.progress.lock();
        while progress.done < seq && !progress.failed && !progress.stopping {
            self.shared.changed.wait(&mut progress);
        }
        if progress.done >= seq { Ok(()) } else { Err(std::io::Error::other("a checkpoint failed")) }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        {
            let mut progress = self.shared.progress.lock();
            progress.stopping = true;
            self.shared.changed.notify_all();
        }
        if let Some(thread) = self.thread.lock().take() {
            // A panicking checkpointer already reported itself.
            let _ = thread.join();
        }
    }
}

/// What reopening the log found.
pub(crate) struct Recovery {
    /// Entries after the checkpoint, in order, to apply to sled again.
    pub(crate) entries: Vec<(u64, Vec<u8>)>,
    /// The sequence number the checkpoint covers.
    pub(crate) checkpoint: u64,
    /// Whether the checkpoint file exists.
    checkpointed: bool,
}

/// Why the log cannot be reopened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecoveryError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Corrupt(String),
}

/// Reads the log in `data_dir`: the checkpoint and the entries after it, in order. Creates the
/// log's directory the first time.
pub(crate) fn read(data_dir: &Path) -> Result<Recovery, RecoveryError> {
    let dir = data_dir.join(WAL_DIR);
    if !dir.exists() {
        std::fs::create_dir(&dir)?;
        File::open(data_dir)?.sync_all()?;
    }
    let checkpoint = read_checkpoint(&dir)?;
    let mut entries: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut any = false;
    for name in FILE_NAMES {
        let mut bytes = Vec::new();
        match File::open(dir.join(name)) {
            Ok(mut file) => file.read_to_end(&mut bytes)?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error.into()),
        };
        for (seq, payload) in parse_entries(&bytes) {
            any = true;
            if checkpoint.is_some_and(|checkpoint| seq > checkpoint) {
                entries.push((seq, payload.to_vec()));
            }
        }
    }
    if checkpoint.is_none() && any {
        return Err(RecoveryError::Corrupt("the write-ahead log has entries but no checkpoint".to_owned()));
    }
    let checkpoint_seq = checkpoint.unwrap_or(0);
    entries.sort_unstable_by_key(|(seq, _)| *seq);
    if let Some((first, _)) = entries.first()
        && *first != checkpoint_seq + 1
    {
        return Err(RecoveryError::Corrupt(format!(
            "the write-ahead log's entries after the checkpoint ({checkpoint_seq}) start at {first}"
        )));
    }
    // The entries of the last batch written before a crash may be torn: the first gap ends it.
    let contiguous = entries.iter().zip(checkpoint_seq + 1..).take_while(|((seq, _), want)| seq == want).count();
    entries.truncate(contiguous);
    Ok(Recovery { entries, checkpoint: checkpoint_seq, checkpointed: checkpoint.is_some() })
}

impl Recovery {
    /// The sequence number of the last entry, re-applied or checkpointed.
    pub(crate) fn last_seq(&self) -> u64 {
        self.entries.last().map_or(self.checkpoint, |(seq, _)| *seq)
    }

    /// Whether a checkpoint must be written before the log is written to (entries were
    /// re-applied, or the log is new).
    pub(crate) fn needs_checkpoint(&self) -> bool {
        !self.entries.is_empty() || !self.checkpointed
    }
}

/// Decodes an entry's payload.
pub(crate) fn decode(payload: &[u8]) -> Result<Logged<'_>, String> {
    match payload.split_first() {
        Some((&PUT, rest)) if rest.len() >= 2 => {
            let length = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
            let rest = &rest[2..];
            if rest.len() < length {
                return Err("a write-ahead log entry with a short key".to_owned());
            }
            let (record_key, record) = rest.split_at(length);
            Ok(Logged::Put { record_key, record })
        }
        Some((&RESERVE, rest)) => {
            let bytes: [u8; 8] = rest.try_into().map_err(|_| "a malformed fencing reservation entry".to_owned())?;
            Ok(Logged::Reserve(u64::from_le_bytes(bytes)))
        }
        Some((&DELETE, record_key)) if !record_key.is_empty() => Ok(Logged::Delete { record_key }),
        _ => Err("a write-ahead log entry of unknown kind".to_owned()),
    }
}

/// The entries of one file, up to the first that does not check.
fn parse_entries(bytes: &[u8]) -> Vec<(u64, &[u8])> {
    let mut entries = Vec::new();
    let mut at = 0;
    while at + HEADER <= bytes.len() {
        let word = |from: usize| u32::from_le_bytes(bytes[from..from + 4].try_into().expect("four bytes"));
        let (crc, length) = (word(at), word(at + 4) as usize);
        let end = at + HEADER + length;
        if length == 0 || end > bytes.len() || crc32fast::hash(&bytes[at + 4..end]) != crc {
            break;
        }
        let seq = u64::from_le_bytes(bytes[at + 8..at + HEADER].try_into().expect("eight bytes"));
        entries.push((seq, &bytes[at + HEADER..end]));
        at = end;
    }
    entries
}

fn read_checkpoint(dir: &Path) -> Result<Option<u64>, RecoveryError> {
    let bytes = match std::fs::read(dir.join(CHECKPOINT)) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    let malformed = || RecoveryError::Corrupt("the write-ahead log's checkpoint file is malformed".to_owned());
    if bytes.len() != 20 || &bytes[..8] != CHECKPOINT_MAGIC {
        return Err(malformed());
    }
    let crc = u32::from_le_bytes(bytes[16..20].try_into().expect("four bytes"));
    if crc32fast::hash(&bytes[..16]) != crc {
        return Err(malformed());
    }
    Ok(Some(u64::from_le_bytes(bytes[8..16].try_into().expect("eight bytes"))))
}

/// Replaces the checkpoint file, atomically: a new file, synced, renamed over the old one, and
/// the directory synced.
pub(crate) fn write_checkpoint(dir: &Path, seq: u64) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(20);
    bytes.extend_from_slice(CHECKPOINT_MAGIC);
    bytes.extend_from_slice(&seq.to_le_bytes());
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    let tmp = dir.join(CHECKPOINT_TMP);
    let file = File::create(&tmp)?;
    file.write_all_at(&bytes, 0)?;
    file.sync_data()?;
    std::fs::rename(&tmp, dir.join(CHECKPOINT))?;
    File::open(dir)?.sync_all()
}

/// Opens the log for writing after [`read`] (and the re-applying and checkpoint it called for):
/// new entries start at the first file's beginning, since every entry in either file is now
/// covered by the checkpoint. `checkpoint_flush` is sled's durable flush, for the checkpoints.
pub(crate) fn open(
    data_dir: &Path,
    file_bytes: u64,
    last_seq: u64,
    checkpoint_flush: FlushFn,
) -> std::io::Result<(Arc<Wal>, WalWriter)> {
    let dir = data_dir.join(WAL_DIR);
    let mut created = false;
    let mut open_file = |name: &str| -> std::io::Result<(File, u64)> {
        let path = dir.join(name);
        created |= !path.exists();
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let length = file.metadata()?.len();
        Ok((file, length))
    };
    let (first, first_length) = open_file(FILE_NAMES[0])?;
    let (second, second_length) = open_file(FILE_NAMES[1])?;
    if created {
        File::open(&dir)?.sync_all()?;
    }
    let wal = Arc::new(Wal {
        pending: Mutex::new(Pending { next_seq: last_seq + 1, buffer: Vec::with_capacity(64 << 10) }),
        checkpoints: Checkpointer::start(dir, last_seq, checkpoint_flush)?,
    });
    let writer = WalWriter {
        wal: Arc::clone(&wal),
        files: [first, second],
        lengths: [first_length, second_length],
        current: 0,
        position: 0,
        last_seq: [0, 0],
        outgoing: Vec::with_capacity(64 << 10),
        file_bytes,
    };
    Ok((wal, writer))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0u8; HEADER];
        bytes[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes[8..16].copy_from_slice(&seq.to_le_bytes());
        bytes.extend_from_slice(payload);
        let crc = crc32fast::hash(&bytes[4..]);
        bytes[..4].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    #[test]
    fn a_file_is_read_up_to_its_first_entry_that_does_not_check() {
        let mut bytes = [entry(1, b"\x02aaaaaaaa"), entry(2, b"\x02bbbbbbbb")].concat();
        let torn = entry(3, b"\x02cccccccc");
        bytes.extend_from_slice(&torn[..torn.len() - 1]);
        bytes.push(b'x');
        bytes.extend_from_slice(&entry(4, b"\x02dddddddd"));
        let seqs: Vec<u64> = parse_entries(&bytes).iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, [1, 2]);
        // Zeros (a file grown ahead of its entries) end it too.
        let mut zeros = entry(1, b"\x02aaaaaaaa");
        zeros.extend_from_slice(&[0u8; 64]);
        assert_eq!(parse_entries(&zeros).len(), 1);
    }

    #[test]
    fn payloads_decode_and_refuse_what_they_should() {
        assert_eq!(decode(&[2, 1, 0, 0, 0, 0, 0, 0, 0]), Ok(Logged::Reserve(1)));
        assert_eq!(decode(&[1, 2, 0, b'r', b'k', 9, 9]), Ok(Logged::Put { record_key: b"rk", record: &[9, 9] }));
        assert!(decode(&[1, 5, 0, b'r']).is_err());
        assert!(decode(&[2, 1]).is_err());
        assert!(decode(&[7]).is_err());
        assert!(decode(&[]).is_err());
    }

    #[test]
    fn recovery_takes_the_entries_after_the_checkpoint_up_to_the_first_gap() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join(WAL_DIR);
        std::fs::create_dir(&dir).unwrap();
        write_checkpoint(&dir, 10).unwrap();
        // The second file holds an older turn (8 to 10) and the start of this one (11, 12); the
        // first, written after, holds 13 and 15 (14 torn away), then older entries.
        let second = [entry(11, b"\x02k"), entry(12, b"\x02l"), entry(9, b"\x02i"), entry(10, b"\x02j")].concat();
        let first = [entry(13, b"\x02m"), entry(15, b"\x02o"), entry(7, b"\x02g")].concat();
        std::fs::write(dir.join(FILE_NAMES[1]), second).unwrap();
        std::fs::write(dir.join(FILE_NAMES[0]), first).unwrap();
        let recovery = read(data.path()).unwrap();
        let seqs: Vec<u64> = recovery.entries.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, [11, 12, 13]);
        assert_eq!(recovery.last_seq(), 13);
        assert!(recovery.needs_checkpoint());

        // Entries after the checkpoint that do not start right after it: a part of the log is
        // missing, and opening refuses rather than guess.
        write_checkpoint(&dir, 5).unwrap();
        assert!(matches!(read(data.path()), Err(RecoveryError::Corrupt(_))));
        // Entries without any checkpoint: the same.
        std::fs::remove_file(dir.join(CHECKPOINT)).unwrap();
        assert!(matches!(read(data.path()), Err(RecoveryError::Corrupt(_))));
        // A checkpoint that does not check.
        std::fs::write(dir.join(CHECKPOINT), b"idemwal1\x01\0\0\0\0\0\0\0\0\0\0\0").unwrap();
        assert!(matches!(read(data.path()), Err(RecoveryError::Corrupt(_))));
    }

    /// A log in a fresh directory, with files of `file_bytes`, whose checkpoints run `flush`;
    /// its group commit, and the directory.
    fn log_with(file_bytes: u64, flush: FlushFn) -> (tempfile::TempDir, Arc<Wal>, Arc<GroupCommit>) {
        let data = tempfile::tempdir().unwrap();
        let recovery = read(data.path()).unwrap();
        write_checkpoint(&data.path().join(WAL_DIR), recovery.last_seq()).unwrap();
        let (wal, writer) = open(data.path(), file_bytes, recovery.last_seq(), flush).unwrap();
        let commit = Arc::new(GroupCommit::start(writer.into_flush(), Arc::default()).unwrap());
        (data, wal, commit)
    }

    /// Appends a reservation entry (a small entry of known content) and waits until it is durable.
    async fn append_durably(wal: &Wal, commit: &GroupCommit, value: u64) {
        let ticket = wal.reserve(commit, value);
        commit.durable(ticket).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn files_take_turns_with_a_checkpoint_each_time_and_every_entry_after_it_is_read_back() {
        let checkpoints = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = Arc::clone(&checkpoints);
        let (data, wal, commit) = log_with(
            1024,
            Box::new(move || {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            }),
        );
        // Entries of 25 bytes in files of 1 KiB: the files take turns every 40 entries or so.
        for value in 1..=500 {
            append_durably(&wal, &commit, value).await;
        }
        let turns = checkpoints.load(std::sync::atomic::Ordering::SeqCst);
        assert!(turns >= 10, "checkpoints: {turns}");
        // What a crash now leaves: the entries after the last checkpoint, ending with the last.
        let recovery = read(data.path()).unwrap();
        assert!(recovery.checkpoint > 0 && recovery.checkpoint < 500, "{}", recovery.checkpoint);
        assert_eq!(recovery.last_seq(), 500);
        for (seq, payload) in &recovery.entries {
            assert_eq!(decode(payload), Ok(Logged::Reserve(*seq)));
        }
        commit.stop();
        wal.checkpoint_all().unwrap();
        assert!(read(data.path()).unwrap().entries.is_empty(), "a final checkpoint covers everything");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_is_not_written_over_before_a_checkpoint_covers_its_entries() {
        // Checkpoints that wait for the test's say-so.
        let (allow, allowed) = std::sync::mpsc::channel::<()>();
        let (data, wal, commit) =
            log_with(1024, Box::new(move || allowed.recv().map_err(|_| std::io::Error::other("the test ended"))));
        // Entries of 25 bytes, one per batch: a file of 1 KiB holds 40. The 41st moves writing
        // to the second file and asks for a checkpoint of the first, which does not finish.
        for value in 1..=80 {
            append_durably(&wal, &commit, value).await;
        }
        // The 81st must go into the first file again, whose entries no checkpoint covers yet.
        let writer = tokio::spawn({
            let (wal, commit) = (Arc::clone(&wal), Arc::clone(&commit));
            async move {
                for value in 81..=140 {
                    append_durably(&wal, &commit, value).await;
                }
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!writer.is_finished(), "the writer waits for the checkpoint");
        // Nothing was written over: a crash now re-applies every entry.
        let recovery = read(data.path()).unwrap();
        let seqs: Vec<u64> = recovery.entries.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, (1..=80).collect::<Vec<u64>>());
        // The checkpoint of the first file, then (on the next turn) of the second.
        allow.send(()).unwrap();
        allow.send(()).unwrap();
        writer.await.unwrap();
        let recovery = read(data.path()).unwrap();
        assert_eq!((recovery.checkpoint, recovery.last_seq()), (80, 140));
        drop(allow);
        commit.stop();
    }

    #[test]
    fn a_new_log_needs_its_first_checkpoint() {
        let data = tempfile::tempdir().unwrap();
        let recovery = read(data.path()).unwrap();
        assert!(recovery.entries.is_empty());
        assert_eq!(recovery.last_seq(), 0);
        assert!(recovery.needs_checkpoint());
        write_checkpoint(&data.path().join(WAL_DIR), 0).unwrap();
        assert!(!read(data.path()).unwrap().needs_checkpoint());
    }
}
