//! The stored state of one key, and its byte encoding.
//!
//! Invariant: a held record's `expires_at()` is a whole retention after the end of its lease, so
//! that retention cannot end while someone holds the key, nor soon after a lease lapsed.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::values::{ApiResponse, FencingToken, Fingerprint, LeaseToken, Owner, RequestId, Timestamp};

/// Everything remembered about one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The fingerprint the key is bound to (empty: none given yet).
    pub fingerprint: Fingerprint,
    /// The fencing token of the latest grant.
    pub fencing_token: FencingToken,
    /// How many times the key has been granted.
    pub attempt: u32,
    /// The owner named by the latest grant's Claim.
    pub owner: Owner,
    /// How long the record is kept after its last change, in milliseconds.
    pub retention_millis: u64,
    /// The time of the last change.
    pub updated_at: Timestamp,
    /// Held, released or completed.
    pub state: RecordState,
}

/// Where a key stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordState {
    /// A caller holds (or held, if the lease lapsed) the key and has not finished.
    Held(Lease),
    /// The holder gave the key back; it can be claimed at once.
    Released {
        /// The token that released it.
        by: LeaseToken,
    },
    /// The response is stored.
    Completed {
        /// The token that completed it, so a retried Complete is recognised.
        by: LeaseToken,
        /// The stored response.
        response: ApiResponse,
        /// When Complete was applied.
        completed_at: Timestamp,
    },
}

/// The latest grant of a held key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The holder's secret.
    pub token: LeaseToken,
    /// When the lease lapses unless renewed.
    pub expires_at: Timestamp,
    /// The request id of the Claim that won the lease, for retried Claims.
    pub request_id: Option<RequestId>,
    /// Whether the grant took over a lapsed lease.
    pub takeover: bool,
}

/// The first byte of every encoded record, so that the layout can change later.
const ENCODING_VERSION: u8 = 1;

/// A stored record that cannot be decoded.
#[derive(Debug, thiserror::Error)]
#[error("undecodable record: {0}")]
pub struct DecodeError(String);

impl Record {
    /// How long the record is kept after its last change.
    pub fn retention(&self) -> Duration {
        Duration::from_millis(self.retention_millis)
    }

    /// When the key is forgotten: `retention` after the last change, and for a held key
    /// `retention` after its lease ends. A lease that lapsed without Complete or Release may have
    /// left a mutation half done, so the key stays visible (as LEASE_EXPIRED, with its
    /// fingerprint binding and attempt count) for a whole retention after the lapse: the next
    /// Claim is told it takes over, never that it starts afresh.
    pub fn expires_at(&self) -> Timestamp {
        match &self.state {
            RecordState::Held(lease) => lease.expires_at.max(self.updated_at).plus(self.retention()),
            RecordState::Released { .. } | RecordState::Completed { .. } => self.updated_at.plus(self.retention()),
        }
    }

    /// Whether retention has ended at `now`: every operation then treats the key as absent.
    pub fn is_expired(&self, now: Timestamp) -> bool {
        self.expires_at() <= now
    }

    /// Whether `other`, a copy of the same key from elsewhere (a backup, another store), is a
    /// later state of it: a later grant (higher fencing token), or the same grant changed later.
    /// Imports replace a record only with a later state, so re-running one never undoes what
    /// happened since. (The PostgreSQL import's `ON CONFLICT … WHERE` restates this rule.)
    pub fn is_superseded_by(&self, other: &Record) -> bool {
        other.fencing_token > self.fencing_token
            || (other.fencing_token == self.fencing_token && other.updated_at > self.updated_at)
    }

    /// The bytes stored for this record.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        self.encode_into(&mut bytes);
        bytes
    }

    /// Appends the encoding of [`Record::encode`] to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(ENCODING_VERSION);
        // Encoding into a Vec only fails for types serde cannot express; Record has none.
        postcard::to_io(self, out).expect("a record always encodes");
    }

    /// Reads bytes written by [`Record::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
        match bytes.split_first() {
            Some((&ENCODING_VERSION, rest)) => postcard::from_bytes(rest).map_err(|e| DecodeError(e.to_string())),
            Some((version, _)) => Err(DecodeError(format!("unknown encoding version {version}"))),
            None => Err(DecodeError("empty".to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(expires_at: i64) -> Record {
        Record {
            fingerprint: Fingerprint::parse(b"fp").unwrap(),
            fencing_token: FencingToken(7),
            attempt: 2,
            owner: Owner::parse("pod-1").unwrap(),
            retention_millis: 1_000,
            updated_at: Timestamp::from_unix_millis(10_000),
            state: RecordState::Held(Lease {
                token: LeaseToken::generate(),
                expires_at: Timestamp::from_unix_millis(expires_at),
                request_id: RequestId::parse_optional("r").unwrap(),
                takeover: true,
            }),
        }
    }

    #[test]
    fn a_held_record_is_kept_a_retention_after_its_lease_ends() {
        // Retention 1 s, last change at 10 s.
        assert_eq!(held(10_500).expires_at(), Timestamp::from_unix_millis(11_500));
        assert_eq!(held(50_000).expires_at(), Timestamp::from_unix_millis(51_000));
        assert!(!held(50_000).is_expired(Timestamp::from_unix_millis(50_999)));
        assert!(held(50_000).is_expired(Timestamp::from_unix_millis(51_000)));
        // A lease that ended before the last change (never written so, but decodable) counts
        // from the change.
        assert_eq!(held(5_000).expires_at(), Timestamp::from_unix_millis(11_000));
    }

    #[test]
    fn encoding_round_trips() {
        let record = held(20_000);
        assert_eq!(Record::decode(&record.encode()).unwrap(), record);
        let mut completed = record.clone();
        completed.state = RecordState::Completed {
            by: LeaseToken::generate(),
            response: ApiResponse {
                body: bytes::Bytes::from_static(b"{\"id\":1}"),
                metadata: [("status".into(), "201".into())].into(),
            },
            completed_at: Timestamp::from_unix_millis(12_000),
        };
        assert_eq!(Record::decode(&completed.encode()).unwrap(), completed);
    }

    /// Stores written by earlier releases must stay readable: these bytes were written by the
    /// release that encoded bodies and fingerprints element by element.
    #[test]
    fn encoding_is_the_stored_format() {
        let record = Record {
            fingerprint: Fingerprint::parse(&[0xab; 3]).unwrap(),
            fencing_token: FencingToken(300),
            attempt: 2,
            owner: Owner::parse("pod").unwrap(),
            retention_millis: 86_400_000,
            updated_at: Timestamp::from_unix_millis(1_700_000_000_000),
            state: RecordState::Completed {
                by: LeaseToken::parse("00112233-4455-6677-8899-aabbccddeeff").unwrap(),
                response: ApiResponse { body: vec![0, 1, 0xff].into(), metadata: [("s".into(), "201".into())].into() },
                completed_at: Timestamp::from_unix_millis(1_700_000_000_001),
            },
        };
        let stored: &[u8] = &[
            1, 3, 171, 171, 171, 172, 2, 2, 3, 112, 111, 100, 128, 184, 153, 41, 128, 160, 171, 254, 249, 98, 2, 16, 0,
            17, 34, 51, 68, 85, 102, 119, 136, 153, 170, 187, 204, 221, 238, 255, 3, 0, 1, 255, 1, 1, 115, 3, 50, 48,
            49, 130, 160, 171, 254, 249, 98,
        ];
        assert_eq!(record.encode(), stored);
        assert_eq!(Record::decode(stored).unwrap(), record);
    }

    #[test]
    fn undecodable_bytes_are_reported() {
        assert!(Record::decode(&[]).is_err());
        assert!(Record::decode(&[9, 1, 2]).is_err());
        assert!(Record::decode(&[ENCODING_VERSION, 0xff]).is_err());
    }
}
