//! The fencing-token counter: one for the whole store, its reservation persisted ahead of the
//! tokens it hands out, so that no token repeats or goes back across crashes.

use idempotency_core::domain::FencingToken;
use idempotency_core::store::StoreError;

use crate::database::OpenDatabase;
use crate::unavailable;

pub(crate) const FENCING_RESERVATION: &[u8] = b"m:fencing-reserved";
/// How many fencing tokens one reservation covers. A restart skips at most this many.
pub(crate) const FENCING_BLOCK: u64 = 1 << 20;

pub(crate) struct FencingCounter {
    pub(crate) last: u64,
    pub(crate) reserved: u64,
}

impl OpenDatabase {
    /// Draws a fencing token above `floor`. If it passes the reservation, first writes a new
    /// reservation (once per [`FENCING_BLOCK`] grants), inside the lock. With the write-ahead log
    /// the reservation is an entry of it, ahead of the entry of the record that carries the
    /// token, so no reply shows a token before the reservation covering it is durable; without
    /// (relaxed durability) sled flushes it at once.
    pub(crate) fn next_fencing_token(&self, floor: FencingToken) -> Result<FencingToken, StoreError> {
        let mut counter = self.fencing.lock();
        let token = counter.last.max(floor.0) + 1;
        if token > counter.reserved {
            let reserved = token + FENCING_BLOCK;
            self.db.insert(FENCING_RESERVATION, &reserved.to_be_bytes()).map_err(unavailable)?;
            match (&self.wal, &self.commit) {
                (Some(wal), Some(commit)) => {
                    wal.reserve(commit, reserved);
                }
                _ => {
                    self.db.flush().map_err(unavailable)?;
                }
            }
            counter.reserved = reserved;
        }
        counter.last = token;
        Ok(FencingToken(token))
    }
}
