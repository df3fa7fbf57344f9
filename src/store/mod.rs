//! Storage: the [`Store`] trait that every backend implements, and the sled backend.
//!
//! A store applies the domain's state machine atomically per key and answers only once what it
//! reports is durable. It owns what the state machine cannot: fencing-token allocation, the
//! record count limit, the expiry index and its sweeping.

pub mod group_commit;
pub mod sled;

use std::future::Future;

use tokio::sync::watch;

use crate::domain::{
    Claim, ClaimOutcome, Complete, CompleteOutcome, Key, KeyView, Namespace, Rejection, Release, Renew, RenewOutcome,
    Timestamp,
};

/// Why a store operation did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The state machine refused the command; nothing changed.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// The command would add a record to a store that holds its maximum.
    #[error("the store holds its maximum of {max_records} records")]
    Full {
        /// The configured maximum.
        max_records: u64,
    },
    /// The change could not be made durable (or the store is failing); it may or may not persist.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// A stored record could not be read back.
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

/// What one sweep pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Expired records deleted.
    pub deleted: usize,
    /// Index entries looked at (deleted records plus stale entries).
    pub scanned: usize,
    /// True when the pass stopped at its batch size and more expired entries may remain.
    pub more: bool,
}

/// A key-value store of records that applies the state machine atomically per key.
///
/// Every mutating method is atomic for its key (no other method observes or interleaves with a
/// half-applied change) and returns only after its change is durable under the store's
/// durability mode. Reads return only state that is durable. `now` is read once per call by the
/// caller and passed in.
pub trait Store: Send + Sync + 'static {
    /// Applies [`crate::domain::machine::claim`], drawing a fresh fencing token for a grant.
    /// Fails with [`StoreError::Full`] when it would add a record past the limit.
    fn claim(
        &self,
        namespace: &Namespace,
        key: &Key,
        now: Timestamp,
        command: &Claim,
    ) -> impl Future<Output = Result<ClaimOutcome, StoreError>> + Send;

    /// Applies [`crate::domain::machine::complete`].
    fn complete(
        &self,
        namespace: &Namespace,
        key: &Key,
        now: Timestamp,
        command: Complete,
    ) -> impl Future<Output = Result<CompleteOutcome, StoreError>> + Send;

    /// Applies [`crate::domain::machine::renew`].
    fn renew(
        &self,
        namespace: &Namespace,
        key: &Key,
        now: Timestamp,
        command: &Renew,
    ) -> impl Future<Output = Result<RenewOutcome, StoreError>> + Send;

    /// Applies [`crate::domain::machine::release`].
    fn release(
        &self,
        namespace: &Namespace,
        key: &Key,
        now: Timestamp,
        command: &Release,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Applies [`crate::domain::machine::lookup`].
    fn lookup(
        &self,
        namespace: &Namespace,
        key: &Key,
        now: Timestamp,
    ) -> impl Future<Output = Result<KeyView, StoreError>> + Send;

    /// Deletes up to `batch` records whose retention ended at `now`, oldest first, at a cost
    /// proportional to what it deletes. Deletions need not be durable before it returns.
    fn sweep(&self, now: Timestamp, batch: usize) -> impl Future<Output = Result<SweepReport, StoreError>> + Send;

    /// How many records are stored, expired ones not yet swept included.
    fn record_count(&self) -> u64;

    /// `true` while the store can make changes durable; `false` while it fails to.
    fn health(&self) -> watch::Receiver<bool>;

    /// Makes everything written so far durable and stops background work. Calls after it fail.
    fn close(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}
