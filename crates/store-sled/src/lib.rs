//! The embedded store of the idempotency coordinator: sled, with per-key serialisation, a
//! write-ahead log of our own in front of it (one write and one fdatasync per batch of concurrent
//! changes, sled made durable in the background by checkpoints), an expiry index swept in
//! batches, and a supervisor that reopens the database from disk after a disk failure.
//!
//! The map, in reading order:
//! - [`layout`](crate::layout): how records, bodies, the expiry index and the fencing reservation
//!   are keyed in sled's one tree.
//! - `group_commit`: makes batches of changes durable (a lone waiter flushes itself; otherwise
//!   the flusher thread does).
//! - `wal`: the write-ahead log: entries, its two files, checkpoints, re-applying after a crash.
//! - `durable`: sled's durable flush (sled's flush, then fdatasync of its log and blob files), run
//!   by checkpoints.
//! - `fencing`: the fencing-token counter and its persisted reservation.
//! - `database`: one opening of the database: stripe locks, the atomic read-decide-write of a key,
//!   the record limit, sweeping.
//! - `sweep_thread`: the low-priority thread sweeps run on.
//! - `supervisor`: after a failed flush, waits for the disk to work and reopens the database.
//! - [`SledStore`]: the [`Store`](idempotency_core::store::Store) over all of the above.
//!
//! Invariants:
//! - All changes to one key happen under that key's stripe lock, so a read-decide-write is atomic
//!   against every other call (sled's directory lock keeps other processes out). Stripe locks
//!   are held only around in-memory sled calls, never across an await or a group-commit flush
//!   (the exception: a fencing reservation's flush, once per 2^20 grants).
//! - Every record has an index entry, under its filing time (a retention after its last change,
//!   so that a Complete in the Claim's second leaves the entry where it is) or, for a held record
//!   a sweep met before its lease ended, under its expiry; never in a bucket after its expiry's.
//!   Writes add the new entry before the record and drop the old one after, sweeps drop the
//!   record before its entry, so a crash leaves at most stale entries (which sweeping drops),
//!   never a record that is not indexed (a sweep drops the entry of a record it cannot decode,
//!   leaving the record for an operator).
//! - A `B` record's body is written before the record and deleted after it (and before the index
//!   entry), so a completed record never lacks its body. A body that no record refers to (a
//!   Complete cut short by a crash, a completed key claimed again after it expired) is
//!   overwritten by the key's next Complete or deleted when the key's record is swept; one left
//!   by a crash in the middle of a sweep is deleted when the sweeper meets the stale entry.
//! - A reply reports only state that is durable: writers wait for their group-commit ticket,
//!   readers for the ticket of the last write to their stripe. With strict durability a change is
//!   durable once its write-ahead log entry is (the log holds the whole new record); sled's own
//!   files catch up at checkpoints, and an open re-applies the entries after the last one.
//! - Fencing tokens come from one counter; a token is handed out only after a reservation above
//!   it was written (as a log entry ahead of the record that carries the token, or flushed at once
//!   without the log), so after any crash the counter restarts above every token that any
//!   surviving record (or any deleted one) ever carried.

#![warn(missing_docs, unreachable_pub)]

mod database;
mod durable;
mod fencing;
mod group_commit;
pub mod layout;
mod store;
mod supervisor;
mod sweep_thread;
mod wal;

pub use group_commit::FlushFn;
pub use idempotency_core::admin::ImportCounts;
pub use store::{Durability, ExportedRecord, OpenError, SledOptions, SledStore};
pub use wal::FILE_BYTES as WAL_FILE_BYTES;

use idempotency_core::store::StoreError;

/// A sled error as the store reports it: the change may or may not have happened.
fn unavailable(error: sled::Error) -> StoreError {
    StoreError::unavailable_because("sled refused the operation", error)
}
