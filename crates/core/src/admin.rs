//! What operators ask of a store through the Admin API: a census of records by namespace and
//! state, paged listing, purging, and export and import of live records.
//!
//! The rules stay where they are: a listed record's state is [`machine::key_state`], "live" is
//! [`Record::is_expired`], and an import replaces a record only with a later state of it
//! ([`Record::is_superseded_by`]). Stores only find, read and delete.

use std::collections::BTreeMap;
use std::future::Future;

use tokio::sync::mpsc;

use crate::domain::machine::{self, KeyState};
use crate::domain::{FencingToken, Key, Namespace, Owner, Record, RecordState, Timestamp};
use crate::store::{Store, StoreError};

/// A record as an operator's listing shows it: no response body, no lease token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordSummary {
    /// The key.
    pub key: Key,
    /// Where the key stands.
    pub state: KeyState,
    /// The latest grant's fencing token.
    pub fencing_token: FencingToken,
    /// The latest grant's attempt number.
    pub attempt: u32,
    /// The latest grant's owner.
    pub owner: Owner,
    /// The lease end, for held keys.
    pub lease_expires_at: Option<Timestamp>,
    /// When the response was stored, for completed keys.
    pub completed_at: Option<Timestamp>,
    /// When retention ends.
    pub expires_at: Timestamp,
    /// The last change.
    pub updated_at: Timestamp,
    /// The stored response body's length, for completed keys.
    pub response_bytes: u64,
}

impl RecordSummary {
    /// The summary of `key`'s record at `now`; `None` when its retention has ended.
    pub fn of(key: Key, record: &Record, now: Timestamp) -> Option<RecordSummary> {
        if record.is_expired(now) {
            return None;
        }
        let (lease_expires_at, completed_at, response_bytes) = match &record.state {
            RecordState::Held(lease) => (Some(lease.expires_at), None, 0),
            RecordState::Released { .. } => (None, None, 0),
            RecordState::Completed { response, completed_at, .. } => {
                (None, Some(*completed_at), response.body.len() as u64)
            }
        };
        Some(RecordSummary {
            key,
            state: machine::key_state(now, record),
            fencing_token: record.fencing_token,
            attempt: record.attempt,
            owner: record.owner.clone(),
            lease_expires_at,
            completed_at,
            expires_at: record.expires_at(),
            updated_at: record.updated_at,
            response_bytes,
        })
    }
}

/// Which records a listing returns: one namespace's live records whose key starts with `prefix`
/// (and is in `state`, if given), after the key `after`, in bytewise key order, at most `limit`.
#[derive(Debug, Clone)]
pub struct ListQuery {
    /// The namespace.
    pub namespace: Namespace,
    /// Only keys that start with this.
    pub prefix: String,
    /// Only records in this state.
    pub state: Option<KeyState>,
    /// Only keys after this one (the last key of the previous page).
    pub after: Option<Key>,
    /// At most this many records.
    pub limit: usize,
}

impl ListQuery {
    /// The summary of a record the query returns, if it does (the store has found `key` in the
    /// namespace after `after`; this checks the prefix, liveness and the state).
    pub fn admit(&self, key: Key, record: &Record, now: Timestamp) -> Option<RecordSummary> {
        if !key.as_str().starts_with(&self.prefix) {
            return None;
        }
        RecordSummary::of(key, record, now).filter(|summary| self.state.is_none_or(|state| summary.state == state))
    }
}

/// One namespace's records by state, counted at one time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NamespaceCensus {
    /// Held by a valid lease.
    pub in_progress: u64,
    /// Held by a lease that lapsed.
    pub lease_expired: u64,
    /// Released.
    pub released: u64,
    /// Completed.
    pub completed: u64,
    /// Retention ended, not swept yet (calls treat them as absent).
    pub expired: u64,
    /// The oldest live record's last change.
    pub oldest: Option<Timestamp>,
}

impl NamespaceCensus {
    /// Counts one record in.
    pub fn count(&mut self, record: &Record, now: Timestamp) {
        if record.is_expired(now) {
            self.expired += 1;
            return;
        }
        match machine::key_state(now, record) {
            KeyState::InProgress => self.in_progress += 1,
            KeyState::LeaseExpired => self.lease_expired += 1,
            KeyState::Released => self.released += 1,
            KeyState::Completed => self.completed += 1,
        }
        self.oldest = Some(self.oldest.map_or(record.updated_at, |oldest| oldest.min(record.updated_at)));
    }

    /// Live records.
    pub fn live(&self) -> u64 {
        self.in_progress + self.lease_expired + self.released + self.completed
    }
}

/// Records per namespace, by state.
pub type Census = BTreeMap<Namespace, NamespaceCensus>;

/// A record with its address, as exported and imported.
pub type AddressedRecord = (Namespace, Key, Record);

/// What an import did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportCounts {
    /// Records added.
    pub inserted: u64,
    /// Records that replaced an earlier state of the same key.
    pub replaced: u64,
    /// Records left alone: the store holds the same or a later state of the key.
    pub kept: u64,
    /// Records skipped because their retention had ended.
    pub expired: u64,
    /// Every grant from now on is above this fencing token.
    pub fencing_floor: u64,
}

/// The fencing floor an import raises the store's counter above: the snapshot's own floor and
/// every token in it.
pub fn import_floor<'a>(fencing_floor: u64, records: impl IntoIterator<Item = &'a AddressedRecord>) -> u64 {
    records.into_iter().map(|(_, _, record)| record.fencing_token.0).fold(fencing_floor, u64::max)
}

/// The operators' side of a store (the Admin API). Reads see only durable state; writes are
/// durable when they return, as with [`Store`].
pub trait Maintenance: Store {
    /// The store's kind, as the Admin API's Stats names it (`sled`, `postgres`).
    fn kind(&self) -> &'static str;

    /// Records by namespace (only `namespace`, if given) and state, counted by reading them all.
    fn census(
        &self,
        namespace: Option<&Namespace>,
        now: Timestamp,
    ) -> impl Future<Output = Result<Census, StoreError>> + Send;

    /// The records `query` selects at `now`.
    fn list(
        &self,
        query: &ListQuery,
        now: Timestamp,
    ) -> impl Future<Output = Result<Vec<RecordSummary>, StoreError>> + Send;

    /// Deletes `key` of `namespace`, or every record of the namespace; returns how many it
    /// deleted. Each deletion is atomic for its key and durable when this returns. The fencing
    /// counter is untouched, so a purged key's next grant is above every earlier one.
    fn purge(&self, namespace: &Namespace, key: Option<&Key>) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Sends every record (of `namespace`, if given) that is live at `now` to `sink`, each as it
    /// was at one moment during the call, then returns a fencing floor read after the last one:
    /// above every token granted before it returns. What it sent is durable when it returns.
    /// Stops early, without error, when `sink` is closed.
    fn export(
        &self,
        namespace: Option<&Namespace>,
        now: Timestamp,
        sink: mpsc::Sender<AddressedRecord>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Copies `records` in: a key is written unless the store holds the same or a later state
    /// of it; records expired at `now` are skipped; every later grant is above
    /// [`import_floor`]`(fencing_floor, records)`. Durable when it returns.
    fn import(
        &self,
        records: Vec<AddressedRecord>,
        fencing_floor: u64,
        now: Timestamp,
    ) -> impl Future<Output = Result<ImportCounts, StoreError>> + Send;
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::domain::{ApiResponse, Fingerprint, Lease, LeaseToken};

    fn record(state: RecordState) -> Record {
        Record {
            fingerprint: Fingerprint::parse(b"").unwrap(),
            fencing_token: FencingToken(7),
            attempt: 1,
            owner: Owner::parse("pod-1").unwrap(),
            retention_millis: 10_000,
            updated_at: Timestamp::from_unix_millis(1_000),
            state,
        }
    }

    fn held(until: i64) -> Record {
        record(RecordState::Held(Lease {
            token: LeaseToken::generate(),
            expires_at: Timestamp::from_unix_millis(until),
            request_id: None,
            takeover: false,
        }))
    }

    #[test]
    fn a_census_counts_each_state_and_the_expired_apart() {
        let completed = record(RecordState::Completed {
            by: LeaseToken::generate(),
            response: ApiResponse { body: vec![1, 2, 3].into(), metadata: Default::default() },
            completed_at: Timestamp::from_unix_millis(1_000),
        });
        let now = Timestamp::from_unix_millis(5_000);
        let mut census = NamespaceCensus::default();
        for record in
            [held(9_000), held(2_000), completed.clone(), record(RecordState::Released { by: LeaseToken::generate() })]
        {
            census.count(&record, now);
        }
        census.count(&completed, now.plus(Duration::from_secs(60)));
        assert_eq!((census.in_progress, census.lease_expired, census.released, census.completed), (1, 1, 1, 1));
        assert_eq!((census.expired, census.live()), (1, 4));
        assert_eq!(census.oldest, Some(Timestamp::from_unix_millis(1_000)));
        let summary = RecordSummary::of(Key::parse("k").unwrap(), &completed, now).unwrap();
        assert_eq!((summary.state, summary.response_bytes), (KeyState::Completed, 3));
    }

    #[test]
    fn a_listing_admits_live_records_with_the_prefix_in_the_state() {
        let now = Timestamp::from_unix_millis(5_000);
        let query = |prefix: &str, state| ListQuery {
            namespace: Namespace::parse("n").unwrap(),
            prefix: prefix.to_owned(),
            state,
            after: None,
            limit: 10,
        };
        let key = || Key::parse("order-1").unwrap();
        assert!(query("order-", None).admit(key(), &held(9_000), now).is_some());
        assert!(query("refund-", None).admit(key(), &held(9_000), now).is_none());
        assert!(query("", Some(KeyState::InProgress)).admit(key(), &held(9_000), now).is_some());
        assert!(query("", Some(KeyState::InProgress)).admit(key(), &held(2_000), now).is_none());
        assert!(query("", None).admit(key(), &held(2_000), Timestamp::from_unix_millis(60_000)).is_none());
        assert_eq!(import_floor(3, &[(Namespace::parse("n").unwrap(), key(), held(1))]), 7);
    }
}
