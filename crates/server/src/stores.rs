//! [`AnyStore`]: the store a server runs on, as its configuration chose.

use idempotency_core::admin::{AddressedRecord, Census, ImportCounts, ListQuery, Maintenance, RecordSummary};
use idempotency_core::domain::{
    Claim, ClaimOutcome, Complete, CompleteOutcome, Key, KeyView, Namespace, Release, Renew, RenewOutcome, Timestamp,
};
use idempotency_core::stats::StoreStats;
use idempotency_core::store::{Store, StoreError, SweepReport, Wakeup};
use idempotency_store_postgres::PostgresStore;
use idempotency_store_sled::SledStore;
use tokio::sync::{mpsc, watch};

/// The store a server runs on, chosen by its configuration.
pub enum AnyStore {
    /// The embedded sled store.
    Sled(SledStore),
    /// The PostgreSQL store shared by replicas.
    Postgres(PostgresStore),
}

impl AnyStore {
    /// The number of records, counted now (for PostgreSQL, `record_count` may lag a second).
    pub async fn counted_records(&self) -> Result<u64, StoreError> {
        match self {
            AnyStore::Sled(store) => Ok(store.record_count()),
            AnyStore::Postgres(store) => store.counted_records().await,
        }
    }

    /// A digest of every stored record, to show that a call changed nothing (tests).
    #[cfg(feature = "testing")]
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

    fn set_namespace_quotas(&self, quotas: std::collections::HashMap<Namespace, u64>) {
        match self {
            AnyStore::Sled(store) => store.set_namespace_quotas(quotas),
            AnyStore::Postgres(store) => store.set_namespace_quotas(quotas),
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

    fn stats(&self) -> StoreStats {
        match self {
            AnyStore::Sled(store) => store.stats(),
            AnyStore::Postgres(store) => store.stats(),
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

impl Maintenance for AnyStore {
    fn kind(&self) -> &'static str {
        match self {
            AnyStore::Sled(store) => store.kind(),
            AnyStore::Postgres(store) => store.kind(),
        }
    }

    async fn census(&self, namespace: Option<&Namespace>, now: Timestamp) -> Result<Census, StoreError> {
        match self {
            AnyStore::Sled(store) => store.census(namespace, now).await,
            AnyStore::Postgres(store) => store.census(namespace, now).await,
        }
    }

    async fn list(&self, query: &ListQuery, now: Timestamp) -> Result<Vec<RecordSummary>, StoreError> {
        match self {
            AnyStore::Sled(store) => store.list(query, now).await,
            AnyStore::Postgres(store) => store.list(query, now).await,
        }
    }

    async fn purge(&self, namespace: &Namespace, key: Option<&Key>) -> Result<u64, StoreError> {
        match self {
            AnyStore::Sled(store) => store.purge(namespace, key).await,
            AnyStore::Postgres(store) => store.purge(namespace, key).await,
        }
    }

    async fn export(
        &self,
        namespace: Option<&Namespace>,
        now: Timestamp,
        sink: mpsc::Sender<AddressedRecord>,
    ) -> Result<u64, StoreError> {
        match self {
            AnyStore::Sled(store) => store.export(namespace, now, sink).await,
            AnyStore::Postgres(store) => store.export(namespace, now, sink).await,
        }
    }

    async fn import(
        &self,
        records: Vec<AddressedRecord>,
        fencing_floor: u64,
        now: Timestamp,
    ) -> Result<ImportCounts, StoreError> {
        match self {
            AnyStore::Sled(store) => store.import(records, fencing_floor, now).await,
            AnyStore::Postgres(store) => store.import(records, fencing_floor, now).await,
        }
    }
}
