//! Storage: the [`Store`] trait that every backend implements (the embedded sled store and the
//! PostgreSQL store live in crates of their own).
//!
//! A store applies the domain's state machine atomically per key and answers only once what it
//! reports is durable. It owns what the state machine cannot: fencing-token allocation, the
//! record count limit, the expiry index and its sweeping.

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;

use tokio::sync::{mpsc, watch};

use crate::domain::{
    Claim, ClaimOutcome, Complete, CompleteOutcome, Key, KeyView, Namespace, Rejection, Release, Renew, RenewOutcome,
    Timestamp,
};
use crate::stats::StoreStats;

/// A cause kept with an error, for logs.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

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
    /// The command would add a record to a namespace that holds its quota.
    #[error("the namespace holds its quota of {max_records} records")]
    NamespaceFull {
        /// The namespace's quota.
        max_records: u64,
    },
    /// The change could not be made durable (or the store is failing, or did not answer in
    /// time); it may or may not persist.
    #[error("storage unavailable: {context}")]
    Unavailable {
        /// What could not be done.
        context: Cow<'static, str>,
        /// The underlying failure, if any.
        #[source]
        cause: Option<Cause>,
    },
    /// A stored record could not be read back.
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// The store cannot do what `context` says, for no further reason than that.
    pub fn unavailable(context: impl Into<Cow<'static, str>>) -> Self {
        StoreError::Unavailable { context: context.into(), cause: None }
    }

    /// The store cannot do what `context` says, because of `cause`.
    pub fn unavailable_because(context: impl Into<Cow<'static, str>>, cause: impl Into<Cause>) -> Self {
        StoreError::Unavailable { context: context.into(), cause: Some(cause.into()) }
    }
}

/// An error with its chain of causes on one line ("a: b: c"), for logs.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut text = self.0.to_string();
        let mut source = self.0.source();
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            // Some errors repeat their cause in their own message.
            if !text.contains(&cause_text) {
                text.push_str(": ");
                text.push_str(&cause_text);
            }
            source = cause.source();
        }
        f.write_str(&text)
    }
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

    /// Sets the per-namespace record quotas (replacing earlier ones): a Claim that would add a
    /// record to a namespace holding its quota fails with [`StoreError::NamespaceFull`], as with
    /// the store's own limit (expired records count until swept, and a full namespace first
    /// makes room from its expired records).
    fn set_namespace_quotas(&self, quotas: HashMap<Namespace, u64>);

    /// `true` while the store can make changes durable; `false` while it fails to.
    fn health(&self) -> watch::Receiver<bool>;

    /// What the store counted for dashboards (flush latency, disk, pool, …). May block for a
    /// moment (a directory walk): call it off the async workers.
    fn stats(&self) -> StoreStats {
        StoreStats::default()
    }

    /// Changes made by other processes sharing the store that waiting Claims must hear of; `None`
    /// for a store no other process writes. Taken once, by the coordinator's owner.
    fn wakeups(&self) -> Option<mpsc::UnboundedReceiver<Wakeup>> {
        None
    }

    /// Makes everything written so far durable and stops background work. Calls after it fail.
    fn close(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_chain_names_every_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("error connecting to server: {0}")]
        struct Repeats(#[source] std::io::Error);
        let refused = || std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        let error = StoreError::unavailable_because("no database connection", Repeats(refused()));
        assert_eq!(
            ErrorChain(&error).to_string(),
            "storage unavailable: no database connection: error connecting to server: Connection refused"
        );
        assert_eq!(ErrorChain(&StoreError::unavailable("closed")).to_string(), "storage unavailable: closed");
    }
}
