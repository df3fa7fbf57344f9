//! Storage: the [`Store`] trait that every backend implements, and the sled backend.
//!
//! A store applies the domain's state machine atomically per key and answers only once what it
//! reports is durable. It owns what the state machine cannot: fencing-token allocation, the
//! record count limit, the expiry index and its sweeping.

pub mod group_commit;
pub mod postgres;
pub mod sled;

use std::future::Future;

use tokio::sync::{mpsc, watch};

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

/// A change that Claims waiting on this process must look at again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wakeup {
    /// The key was completed, released or renewed.
    Key(Namespace, Key),
    /// Changes may have been missed (a reconnect): every waiter looks again.
    All,
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
    /// Fails with [`StoreError::Full`] when it would add a record past the limit. `waiting`
    /// says the caller will wait for the key if it is in progress, so a store shared by several
    /// processes arranges to report the key's next change through [`Store::wakeups`].
    fn claim(
        &self,
        namespace: &Namespace,
        key: &Key,
        now: Timestamp,
        command: &Claim,
        waiting: bool,
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

    /// Changes made by other processes sharing the store that waiting Claims must hear of; `None`
    /// for a store no other process writes. Taken once, by the coordinator's owner.
    fn wakeups(&self) -> Option<mpsc::UnboundedReceiver<Wakeup>> {
        None
    }

    /// Makes everything written so far durable and stops background work. Calls after it fail.
    fn close(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The store a server runs on, chosen by its configuration.
pub enum AnyStore {
    /// The embedded sled store.
    Sled(sled::SledStore),
    /// The PostgreSQL store shared by replicas.
    Postgres(postgres::PostgresStore),
}

impl AnyStore {
    /// The number of records, counted now (for PostgreSQL, `record_count` may lag a second).
    pub async fn counted_records(&self) -> Result<u64, StoreError> {
        match self {
            AnyStore::Sled(store) => Ok(store.record_count()),
            AnyStore::Postgres(store) => store.counted_records().await,
        }
    }

    /// A digest of every stored record, to show that a call changed nothing (tests, diagnostics).
    pub async fn contents_digest(&self) -> Result<u64, StoreError> {
        match self {
            AnyStore::Sled(store) => store.contents_digest(),
            AnyStore::Postgres(store) => store.contents_digest().await,
        }
    }
}

impl Store for AnyStore {
    async fn claim(
        &self,
        namespace: &Namespace,
        key: &Key,
        now: Timestamp,
        command: &Claim,
        waiting: bool,
    ) -> Result<ClaimOutcome, StoreError> {
        match self {
            AnyStore::Sled(store) => store.claim(namespace, key, now, command, waiting).await,
            AnyStore::Postgres(store) => store.claim(namespace, key, now, command, waiting).await,
        }
    }

    async fn complete(
        &self,
        namespace: &Namespace,
        key: &Key,
        now: Timestamp,
        command: Complete,
    ) -> Result<CompleteOutcome, StoreError> {
        match self {
            AnyStore::Sled(store) => store.complete(namespace, key, now, command).await,
            AnyStore::Postgres(store) => store.complete(namespace, key, now, command).await,
        }
    }

    async fn renew(
        &self,
        namespace: &Namespace,
        key: &Key,
        now: Timestamp,
        command: &Renew,
    ) -> Result<RenewOutcome, StoreError> {
        match self {
            AnyStore::Sled(store) => store.renew(namespace, key, now, command).await,
            AnyStore::Postgres(store) => store.renew(namespace, key, now, command).await,
        }
    }

    async fn release(
        &self,
        namespace: &Namespace,
        key: &Key,
        now: Timestamp,
        command: &Release,
    ) -> Result<(), StoreError> {
        match self {
            AnyStore::Sled(store) => store.release(namespace, key, now, command).await,
            AnyStore::Postgres(store) => store.release(namespace, key, now, command).await,
        }
    }

    async fn lookup(&self, namespace: &Namespace, key: &Key, now: Timestamp) -> Result<KeyView, StoreError> {
        match self {
            AnyStore::Sled(store) => store.lookup(namespace, key, now).await,
            AnyStore::Postgres(store) => store.lookup(namespace, key, now).await,
        }
    }

    async fn sweep(&self, now: Timestamp, batch: usize) -> Result<SweepReport, StoreError> {
        match self {
            AnyStore::Sled(store) => store.sweep(now, batch).await,
            AnyStore::Postgres(store) => store.sweep(now, batch).await,
        }
    }

    fn record_count(&self) -> u64 {
        match self {
            AnyStore::Sled(store) => store.record_count(),
            AnyStore::Postgres(store) => store.record_count(),
        }
    }

    fn health(&self) -> watch::Receiver<bool> {
        match self {
            AnyStore::Sled(store) => store.health(),
            AnyStore::Postgres(store) => store.health(),
        }
    }

    fn wakeups(&self) -> Option<mpsc::UnboundedReceiver<Wakeup>> {
        match self {
            AnyStore::Sled(store) => store.wakeups(),
            AnyStore::Postgres(store) => store.wakeups(),
        }
    }

    async fn close(&self) -> Result<(), StoreError> {
        match self {
            AnyStore::Sled(store) => store.close().await,
            AnyStore::Postgres(store) => store.close().await,
        }
    }
}
