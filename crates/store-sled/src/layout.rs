//! Layout of the one sled tree (all integers big-endian, so byte order is numeric order):
//! - `r` + namespace length (1 byte) + namespace + key → the encoded [`Record`]. A completed
//!   record is written as `B` + the record encoded with an empty response body, and the body
//!   itself goes under `b` + the same namespace length, namespace and key. sled appends each
//!   change to its log as a fragment of the leaf it touches, rewrites the whole leaf (up to 16
//!   entries) every tenth change, and moves live leaves when it cleans a segment of its log. With
//!   bodies inline, every Claim of a key copied, in time, the bodies of the completed keys beside
//!   it; record leaves now hold records of about 100 bytes, and body leaves change only when a
//!   body is written or deleted. That keeps the log, and so the disk, smaller. Records that start
//!   with the encoding version instead of `B` hold their body inline (stores written before bodies
//!   were kept apart): both are read;
//! - `b` + namespace length + namespace + key → the response body of the record under `r` + the
//!   same bytes, while that record is completed (a body may outlive its record's completion until
//!   the record is swept or completed again, but it is only read through a `B` record);
//! - `x` + bucket (8 bytes: a time rounded up to the second) + the record's key → nothing: the
//!   expiry index, oldest first. A record is filed under [`filed_at`], a retention after its last
//!   change, or, once a sweep has met a held record there before it expired, under its expiry;
//! - `m:fencing-reserved` → the fencing token below which this process may hand out tokens.
//!
//! Why bodies are kept apart from their records: sled appends each change to its log as a
//! fragment of the leaf it touches, rewrites the whole leaf (up to 16 entries) every tenth change,
//! and moves live leaves when it cleans a segment of its log. With bodies inline, every Claim of a
//! key copied, in time, the bodies of the completed keys beside it; record leaves now hold records
//! of about 100 bytes, and body leaves change only when a body is written or deleted.

use idempotency_core::domain::{Key, Namespace, Record, RecordState, Timestamp};
use idempotency_core::store::StoreError;

use crate::unavailable;

pub(crate) const RECORD_PREFIX: u8 = b'r';
pub(crate) const BODY_PREFIX: u8 = b'b';
/// The first byte of a completed record whose response body is stored apart, under its body key.
/// [`Record::encode`] starts with its encoding version, now 1: versions must stay below this one.
pub(crate) const BODY_APART: u8 = b'B';
pub(crate) const INDEX_PREFIX: u8 = b'x';

pub(crate) fn record_key(namespace: &Namespace, key: &Key) -> Vec<u8> {
    let mut bytes = namespace_prefix(namespace);
    bytes.extend_from_slice(key.as_str().as_bytes());
    bytes
}

/// What every record key of `namespace` starts with (and no other namespace's).
pub(crate) fn namespace_prefix(namespace: &Namespace) -> Vec<u8> {
    let namespace = namespace.as_str().as_bytes();
    let mut bytes = Vec::with_capacity(2 + namespace.len() + 64);
    bytes.push(RECORD_PREFIX);
    // Namespaces are at most 64 bytes, so their length fits one byte.
    bytes.push(namespace.len() as u8);
    bytes.extend_from_slice(namespace);
    bytes
}

/// The namespace bytes of a record key (empty for a key of another layout).
pub(crate) fn namespace_of(record_key: &[u8]) -> &[u8] {
    match record_key {
        [_, length, rest @ ..] => rest.get(..usize::from(*length)).unwrap_or(&[]),
        _ => &[],
    }
}

/// Where the response body of the record under `record_key` is stored apart.
pub(crate) fn body_key(record_key: &[u8]) -> Vec<u8> {
    let mut bytes = record_key.to_vec();
    bytes[0] = BODY_PREFIX;
    bytes
}

/// Whether reading a record fetches a response body stored apart (the sweeper needs only the
/// record's times).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Body {
    Load,
    Skip,
}

/// Decodes the value stored under `record_key`, in either layout (see the module's comment).
pub(crate) fn decode_stored(db: &sled::Db, record_key: &[u8], bytes: &[u8], body: Body) -> Result<Record, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt(reason);
    let Some((&BODY_APART, encoded)) = bytes.split_first() else {
        return Record::decode(bytes).map_err(|e| corrupt(e.to_string()));
    };
    let mut record = Record::decode(encoded).map_err(|e| corrupt(e.to_string()))?;
    match &mut record.state {
        RecordState::Completed { response, .. } if body == Body::Load => {
            let stored = db
                .get(body_key(record_key))
                .map_err(unavailable)?
                .ok_or_else(|| corrupt("a completed record's response body is missing".to_owned()))?;
            // Shared with sled's buffer, not copied.
            response.body = bytes::Bytes::from_owner(stored);
        }
        RecordState::Completed { .. } => {}
        RecordState::Held(_) | RecordState::Released { .. } => {
            return Err(corrupt("a record marked as completed is not completed".to_owned()));
        }
    }
    Ok(record)
}

/// Reads a key written by [`record_key`].
pub(crate) fn parse_record_key(bytes: &[u8]) -> Option<(Namespace, Key)> {
    let (&prefix, rest) = bytes.split_first()?;
    let (&length, rest) = rest.split_first()?;
    if prefix != RECORD_PREFIX || rest.len() < usize::from(length) {
        return None;
    }
    let (namespace, key) = rest.split_at(usize::from(length));
    let namespace = Namespace::parse(std::str::from_utf8(namespace).ok()?).ok()?;
    let key = Key::parse(std::str::from_utf8(key).ok()?).ok()?;
    Some((namespace, key))
}

/// The index files a record under [`filed_at`] rounded up to the whole second: a bucket. A Claim
/// and its Complete usually fall in the same second, so the Complete need not move the entry (two
/// sled writes fewer per flow). A record is then swept up to a second after it expired; calls
/// treat it as absent from its exact expiry on, as always.
pub(crate) fn expiry_bucket(expires_at: Timestamp) -> i64 {
    let millis = expires_at.unix_millis();
    millis.saturating_add(999).div_euclid(1000).saturating_mul(1000)
}

/// When the index files a record: a retention after its last change. That is its expiry, but for
/// a held key, which expires a retention after its lease ends: filing it by its expiry would move
/// its entry on every Complete, by the lease's length. A sweep that meets a held record's entry
/// before the record expires files it again under its expiry, so a record's entry is at one of
/// [`filed_at`]'s and [`Record::expires_at`]'s buckets, never earlier than `filed_at`'s.
pub(crate) fn filed_at(record: &Record) -> Timestamp {
    record.updated_at.plus(record.retention())
}

pub(crate) fn index_key(expires_at: Timestamp, record_key: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(9 + record_key.len());
    bytes.push(INDEX_PREFIX);
    // Flip the sign bit so that negative instants sort before positive ones.
    bytes.extend_from_slice(&((expiry_bucket(expires_at) as u64) ^ (1 << 63)).to_be_bytes());
    bytes.extend_from_slice(record_key);
    bytes
}
