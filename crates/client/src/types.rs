//! The values the client's calls take and return: Rust types (durations, system times, `Bytes`
//! bodies), converted from and to the protocol's messages here and nowhere else.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use idempotency_proto::pb;

/// A response as the coordinator stores and replays it: the body your API sent and whatever else
/// it needs to replay it (status code, headers) as metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    /// The response body, byte for byte.
    pub body: Bytes,
    /// Status, headers or anything else to replay, by name.
    pub metadata: BTreeMap<String, String>,
}

impl Stored {
    /// A response with this body and no metadata yet.
    pub fn new(body: impl Into<Bytes>) -> Stored {
        Stored { body: body.into(), metadata: BTreeMap::new() }
    }

    /// Adds one metadata entry (`"status"`, `"201"`, say).
    #[must_use]
    pub fn metadata(mut self, name: impl Into<String>, value: impl Into<String>) -> Stored {
        self.metadata.insert(name.into(), value.into());
        self
    }

    /// The metadata entry `name`, if stored.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.metadata.get(name).map(String::as_str)
    }

    pub(crate) fn into_pb(self) -> pb::Response {
        pb::Response { body: self.body, metadata: self.metadata.into_iter().collect() }
    }

    pub(crate) fn from_pb(response: pb::Response) -> Stored {
        Stored { body: response.body, metadata: response.metadata.into_iter().collect() }
    }
}

/// A Claim: the key, and how to claim it. Built with [`Claim::new`] and its setters.
#[derive(Debug, Clone, Default)]
pub struct Claim {
    pub(crate) namespace: String,
    pub(crate) key: String,
    pub(crate) fingerprint: Bytes,
    pub(crate) lease_ttl: Option<Duration>,
    pub(crate) retention: Option<Duration>,
    pub(crate) wait: Option<Duration>,
    pub(crate) request_id: String,
    pub(crate) owner: String,
}

impl Claim {
    /// A Claim of `key` in `namespace` (empty: `default`), with the server's defaults.
    pub fn new(namespace: impl Into<String>, key: impl Into<String>) -> Claim {
        Claim { namespace: namespace.into(), key: key.into(), ..Claim::default() }
    }

    /// A digest of the request (at most 64 bytes): a reused key with another one is refused.
    #[must_use]
    pub fn fingerprint(mut self, fingerprint: impl Into<Bytes>) -> Claim {
        self.fingerprint = fingerprint.into();
        self
    }

    /// How long the lease lasts unless renewed.
    #[must_use]
    pub fn lease_ttl(mut self, ttl: Duration) -> Claim {
        self.lease_ttl = Some(ttl);
        self
    }

    /// How long the key is remembered after its last change.
    #[must_use]
    pub fn retention(mut self, retention: Duration) -> Claim {
        self.retention = Some(retention);
        self
    }

    /// Wait up to this long (at most the server's maximum, 60 s by default) for a running attempt.
    #[must_use]
    pub fn wait(mut self, wait: Duration) -> Claim {
        self.wait = Some(wait);
        self
    }

    /// The id that makes a retried Claim return the lease it already won (keep it secret).
    #[must_use]
    pub fn request_id(mut self, request_id: impl Into<String>) -> Claim {
        self.request_id = request_id.into();
        self
    }

    /// Who claims, shown to others.
    #[must_use]
    pub fn owner(mut self, owner: impl Into<String>) -> Claim {
        self.owner = owner.into();
        self
    }

    pub(crate) fn to_pb(&self) -> pb::ClaimRequest {
        pb::ClaimRequest {
            namespace: self.namespace.clone(),
            key: self.key.clone(),
            fingerprint: self.fingerprint.to_vec(),
            lease_ttl: self.lease_ttl.map(duration),
            retention: self.retention.map(duration),
            wait: self.wait.map(duration),
            request_id: self.request_id.clone(),
            owner: self.owner.clone(),
        }
    }
}

/// What a Claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// You hold the key: run the mutation, then Complete or Release.
    Acquired(Grant),
    /// Another caller holds a valid lease.
    InProgress(InProgress),
    /// The mutation already ran: replay this.
    Completed(Replay),
}

/// A lease granted to you.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The secret that proves you hold the key (for Complete, Renew, Release).
    pub lease_token: String,
    /// Strictly increases with every grant of the key: pass it to your own storage to fence off
    /// stale holders.
    pub fencing_token: u64,
    /// When the lease lapses unless renewed.
    pub lease_expires_at: SystemTime,
    /// 1 for the first grant of the key, +1 for every later one.
    pub attempt: u32,
    /// The previous holder's lease lapsed without Complete or Release: it may have partly run
    /// the mutation.
    pub takeover: bool,
}

/// Someone else holds the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InProgress {
    /// When the holder's lease lapses unless renewed.
    pub lease_expires_at: SystemTime,
    /// The holder's attempt.
    pub attempt: u32,
    /// The holder's owner name.
    pub owner: String,
    /// When it is worth asking again.
    pub retry_after: Duration,
}

/// A completed key's stored response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    /// The response, byte for byte.
    pub response: Stored,
    /// When it was stored.
    pub completed_at: SystemTime,
    /// When the key is forgotten.
    pub expires_at: SystemTime,
    /// The fencing token of the grant that completed it.
    pub fencing_token: u64,
}

/// What a Complete did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// When the response was stored (the first time, for a repeated Complete).
    pub completed_at: SystemTime,
    /// When the key is forgotten.
    pub expires_at: SystemTime,
    /// The completing grant's fencing token.
    pub fencing_token: u64,
    /// This token had completed the key before; the first response is kept.
    pub already_completed: bool,
}

/// What a Renew did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewal {
    /// The lease's new end.
    pub lease_expires_at: SystemTime,
    /// The holder's fencing token.
    pub fencing_token: u64,
}

/// Where a key stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// Someone holds a valid lease.
    InProgress,
    /// The lease lapsed without Complete or Release.
    LeaseExpired,
    /// The holder released the key.
    Released,
    /// The response is stored.
    Completed,
}

/// What Lookup returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyView {
    /// Where the key stands.
    pub state: KeyState,
    /// The fingerprint the key is bound to (empty: none).
    pub fingerprint: Bytes,
    /// The latest grant's fencing token.
    pub fencing_token: u64,
    /// The latest grant's attempt.
    pub attempt: u32,
    /// The latest grant's owner.
    pub owner: String,
    /// The lease's end, for held keys.
    pub lease_expires_at: Option<SystemTime>,
    /// The stored response, for completed keys.
    pub response: Option<Stored>,
    /// When the response was stored.
    pub completed_at: Option<SystemTime>,
    /// When the key is forgotten.
    pub expires_at: SystemTime,
}

pub(crate) fn duration(value: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(value.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(value.subsec_nanos()).unwrap_or(0),
    }
}

pub(crate) fn std_duration(value: Option<prost_types::Duration>) -> Duration {
    value.map_or(Duration::ZERO, |value| {
        Duration::new(u64::try_from(value.seconds).unwrap_or(0), u32::try_from(value.nanos).unwrap_or(0))
    })
}

pub(crate) fn system_time(value: Option<prost_types::Timestamp>) -> SystemTime {
    value.map_or(UNIX_EPOCH, |value| {
        let since = Duration::new(u64::try_from(value.seconds).unwrap_or(0), u32::try_from(value.nanos).unwrap_or(0));
        UNIX_EPOCH + since
    })
}

impl ClaimOutcome {
    pub(crate) fn from_pb(response: pb::ClaimResponse) -> Option<ClaimOutcome> {
        Some(match response.outcome? {
            pb::claim_response::Outcome::Acquired(grant) => ClaimOutcome::Acquired(Grant {
                lease_token: grant.lease_token,
                fencing_token: grant.fencing_token,
                lease_expires_at: system_time(grant.lease_expires_at),
                attempt: grant.attempt,
                takeover: grant.takeover,
            }),
            pb::claim_response::Outcome::InProgress(busy) => ClaimOutcome::InProgress(InProgress {
                lease_expires_at: system_time(busy.lease_expires_at),
                attempt: busy.attempt,
                owner: busy.owner,
                retry_after: std_duration(busy.retry_after),
            }),
            pb::claim_response::Outcome::Completed(done) => ClaimOutcome::Completed(Replay {
                response: Stored::from_pb(done.response.unwrap_or_default()),
                completed_at: system_time(done.completed_at),
                expires_at: system_time(done.expires_at),
                fencing_token: done.fencing_token,
            }),
        })
    }
}

impl KeyView {
    pub(crate) fn from_pb(view: pb::LookupResponse) -> KeyView {
        let state = match view.state() {
            pb::KeyState::InProgress | pb::KeyState::Unspecified => KeyState::InProgress,
            pb::KeyState::LeaseExpired => KeyState::LeaseExpired,
            pb::KeyState::Released => KeyState::Released,
            pb::KeyState::Completed => KeyState::Completed,
        };
        KeyView {
            state,
            fingerprint: view.fingerprint.into(),
            fencing_token: view.fencing_token,
            attempt: view.attempt,
            owner: view.owner,
            lease_expires_at: view.lease_expires_at.map(|at| system_time(Some(at))),
            response: view.response.map(Stored::from_pb),
            completed_at: view.completed_at.map(|at| system_time(Some(at))),
            expires_at: system_time(view.expires_at),
        }
    }
}
