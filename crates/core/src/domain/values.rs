//! Validated values: every newtype here can only hold what the contract allows, because its one
//! constructor checks the input. Code past the gRPC adapter never re-validates.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why an input was refused. Each variant maps to one stable `ErrorInfo` reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    /// The namespace is not 1 to 64 of `[A-Za-z0-9._-]`.
    #[error("namespace must be 1 to 64 characters of [A-Za-z0-9._-]")]
    Namespace,
    /// The key is empty, longer than 255 bytes or has control characters.
    #[error("key must be 1 to 255 bytes of UTF-8 without control characters")]
    Key,
    /// The fingerprint is longer than 64 bytes.
    #[error("fingerprint must be at most {max} bytes")]
    Fingerprint {
        /// The limit in bytes.
        max: usize,
    },
    /// The lease duration is outside the configured range.
    #[error("lease_ttl must be between {} and {}", human(*min), human(*max))]
    LeaseTtl {
        /// Shortest lease accepted.
        min: Duration,
        /// Longest lease accepted.
        max: Duration,
    },
    /// The retention is outside the configured range.
    #[error("retention must be between {} and {}", human(*min), human(*max))]
    Retention {
        /// Shortest retention accepted.
        min: Duration,
        /// Longest retention accepted.
        max: Duration,
    },
    /// The wait is negative or longer than allowed.
    #[error("wait must be between 0s and {}", human(*max))]
    Wait {
        /// Longest wait accepted.
        max: Duration,
    },
    /// The lease token is not a UUID string.
    #[error("lease_token must be the UUID string returned by Claim")]
    LeaseToken,
    /// The request id is too long or has control characters.
    #[error("request_id must be at most {max} bytes without control characters")]
    RequestId {
        /// The limit in bytes.
        max: usize,
    },
    /// The owner is too long or has control characters.
    #[error("owner must be at most {max} bytes without control characters")]
    Owner {
        /// The limit in bytes.
        max: usize,
    },
    /// The response body plus metadata exceeds the size limit.
    #[error("response body and metadata take {size} bytes, over the limit of {max}")]
    ResponseTooLarge {
        /// The size of the offered response.
        size: usize,
        /// The limit in bytes.
        max: usize,
    },
}

/// A duration as every message and `ErrorInfo` limit writes it: `100ms`, `1h`, `30days`.
pub fn human(duration: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(duration)
}

impl InvalidInput {
    /// The request field the error is about.
    pub fn field(&self) -> &'static str {
        match self {
            InvalidInput::Namespace => "namespace",
            InvalidInput::Key => "key",
            InvalidInput::Fingerprint { .. } => "fingerprint",
            InvalidInput::LeaseTtl { .. } => "lease_ttl",
            InvalidInput::Retention { .. } => "retention",
            InvalidInput::Wait { .. } => "wait",
            InvalidInput::LeaseToken => "lease_token",
            InvalidInput::RequestId { .. } => "request_id",
            InvalidInput::Owner { .. } => "owner",
            InvalidInput::ResponseTooLarge { .. } => "response",
        }
    }
}

/// A point in time: milliseconds since the Unix epoch, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The Unix epoch.
    pub const EPOCH: Timestamp = Timestamp(0);

    /// A timestamp `millis` milliseconds after the Unix epoch.
    pub const fn from_unix_millis(millis: i64) -> Self {
        Timestamp(millis)
    }

    /// Milliseconds since the Unix epoch.
    pub const fn unix_millis(self) -> i64 {
        self.0
    }

    /// This time plus `duration`, saturating at the end of time.
    pub fn plus(self, duration: Duration) -> Timestamp {
        let millis = i64::try_from(duration.as_millis()).unwrap_or(i64::MAX);
        Timestamp(self.0.saturating_add(millis))
    }

    /// How long after `earlier` this time is; zero if it is not after it.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(u64::try_from(self.0.saturating_sub(earlier.0)).unwrap_or(0))
    }
}

/// A tenant or API scope; the empty string means `default`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Namespace(String);

impl Namespace {
    /// The name used when a request leaves the namespace empty.
    pub const DEFAULT: &'static str = "default";

    /// The longest namespace accepted, in bytes.
    pub const MAX_BYTES: usize = 64;

    /// Validates a namespace as sent by a client.
    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        if raw.is_empty() {
            return Ok(Namespace(Self::DEFAULT.to_owned()));
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if raw.len() > Self::MAX_BYTES || !raw.chars().all(allowed) {
            return Err(InvalidInput::Namespace);
        }
        Ok(Namespace(raw.to_owned()))
    }

    /// The namespace as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An idempotency key as the client sent it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(String);

impl Key {
    /// The longest key accepted, in bytes.
    pub const MAX_BYTES: usize = 255;

    /// Validates a key as sent by a client.
    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        if raw.is_empty() || raw.len() > Self::MAX_BYTES || raw.chars().any(char::is_control) {
            return Err(InvalidInput::Key);
        }
        Ok(Key(raw.to_owned()))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A digest of the request a key was first claimed with; empty means "not checked".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint(#[serde(with = "serde_bytes")] Vec<u8>);

impl Fingerprint {
    /// The longest fingerprint accepted, in bytes.
    pub const MAX_BYTES: usize = 64;

    /// Validates a fingerprint as sent by a client.
    pub fn parse(raw: &[u8]) -> Result<Self, InvalidInput> {
        if raw.len() > Self::MAX_BYTES {
            return Err(InvalidInput::Fingerprint { max: Self::MAX_BYTES });
        }
        Ok(Fingerprint(raw.to_vec()))
    }

    /// The fingerprint's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// True when no fingerprint was given.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// True when both fingerprints are given and differ.
    pub fn conflicts_with(&self, other: &Fingerprint) -> bool {
        !self.is_empty() && !other.is_empty() && self != other
    }
}

/// The secret capability that proves a caller holds a lease: a random UUID v4.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LeaseToken(Uuid);

impl LeaseToken {
    /// A fresh random token.
    pub fn generate() -> Self {
        LeaseToken(Uuid::new_v4())
    }

    /// Validates a token as sent by a client: exactly the text Claim returned (a UUID in its
    /// canonical form, lowercase with hyphens). Other spellings of the same UUID (uppercase,
    /// braces, no hyphens, `urn:uuid:`) are refused, so that a token has one spelling.
    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        let uuid = Uuid::try_parse(raw).map_err(|_| InvalidInput::LeaseToken)?;
        let mut canonical = [0u8; uuid::fmt::Hyphenated::LENGTH];
        if uuid.hyphenated().encode_lower(&mut canonical).as_bytes() != raw.as_bytes() {
            return Err(InvalidInput::LeaseToken);
        }
        Ok(LeaseToken(uuid))
    }

    /// The token as a UUID, for storage.
    pub fn as_uuid(self) -> Uuid {
        self.0
    }

    /// A token read back from storage.
    pub fn from_uuid(uuid: Uuid) -> Self {
        LeaseToken(uuid)
    }

    /// The token as the client must send it back.
    pub fn to_text(self) -> String {
        self.0.hyphenated().to_string()
    }
}

/// Tokens are secrets: their `Debug` form never shows them, so they cannot leak into logs.
impl fmt::Debug for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LeaseToken(..)")
    }
}

/// A number that strictly increases with every grant of a key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FencingToken(pub u64);

/// Free text up to 128 bytes without control characters (owner names, request ids).
fn parse_short_text(raw: &str) -> Option<String> {
    (raw.len() <= SHORT_TEXT_MAX_BYTES && !raw.chars().any(char::is_control)).then(|| raw.to_owned())
}

const SHORT_TEXT_MAX_BYTES: usize = 128;

/// Who holds or held a lease, as the claimant named itself; may be empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner(String);

impl Owner {
    /// Validates an owner name as sent by a client.
    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        parse_short_text(raw).map(Owner).ok_or(InvalidInput::Owner { max: SHORT_TEXT_MAX_BYTES })
    }

    /// The owner as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A client-chosen id that makes a retried Claim return the lease it already won.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestId(String);

impl RequestId {
    /// Validates a request id; the empty string means none was given.
    pub fn parse_optional(raw: &str) -> Result<Option<Self>, InvalidInput> {
        if raw.is_empty() {
            return Ok(None);
        }
        parse_short_text(raw)
            .map(|text| Some(RequestId(text)))
            .ok_or(InvalidInput::RequestId { max: SHORT_TEXT_MAX_BYTES })
    }

    /// The request id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A request id yields the lease token, so it is kept out of logs like the token itself.
impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RequestId(..)")
    }
}

/// What the API answered its client for a mutation: stored by Complete and replayed to every
/// retry byte for byte.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiResponse {
    /// The response body, shared rather than copied between the transport and the store.
    /// Encoded as one byte string (the same bytes postcard writes for a sequence of u8).
    pub body: Bytes,
    /// Status, headers or anything else the API replays; ordered so that encoding is stable.
    pub metadata: BTreeMap<String, String>,
}

impl ApiResponse {
    /// Bytes counted against the size limit: the response as protobuf encodes it (the message
    /// `ApiResponse` of the contract), that is the body and every metadata key and value with the
    /// few bytes of framing each carries (a field tag and a length; 2 to 4 bytes per body, key
    /// or value, and 2 to 4 more per metadata entry). Counting the framing keeps the rule true on
    /// the wire: a response within the limit always fits the transport's message limit, however
    /// many small metadata entries it has.
    pub fn size(&self) -> usize {
        // Field numbers 1 and 2 (and a map entry's 1 and 2) take one tag byte; empty fields are
        // not encoded at all, as in proto3.
        fn field(len: usize) -> usize {
            if len == 0 { 0 } else { 1 + varint_len(len) + len }
        }
        fn varint_len(value: usize) -> usize {
            let bits = usize::BITS - value.leading_zeros();
            (bits.max(1) as usize).div_ceil(7)
        }
        let metadata: usize = self
            .metadata
            .iter()
            .map(|(key, value)| {
                let entry = field(key.len()) + field(value.len());
                1 + varint_len(entry) + entry
            })
            .sum();
        field(self.body.len()) + metadata
    }
}

/// ApiResponse bodies are users' data: logs show only their size.
impl fmt::Debug for ApiResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiResponse({} bytes)", self.size())
    }
}

/// The bounds and defaults applied to requests, from the server's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Shortest lease a Claim or Renew may ask for.
    pub min_lease_ttl: Duration,
    /// Longest lease a Claim or Renew may ask for.
    pub max_lease_ttl: Duration,
    /// Lease used when a request leaves `lease_ttl` unset.
    pub default_lease_ttl: Duration,
    /// Shortest retention a request may ask for.
    pub min_retention: Duration,
    /// Longest retention a request may ask for.
    pub max_retention: Duration,
    /// Retention used when a Claim leaves `retention` unset.
    pub default_retention: Duration,
    /// Longest `wait` a Claim may ask for.
    pub max_wait: Duration,
    /// Largest response (body plus metadata) Complete accepts, in bytes.
    pub max_response_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            min_lease_ttl: Duration::from_millis(100),
            max_lease_ttl: Duration::from_secs(3600),
            default_lease_ttl: Duration::from_secs(30),
            min_retention: Duration::from_secs(1),
            max_retention: Duration::from_secs(30 * 24 * 3600),
            default_retention: Duration::from_secs(24 * 3600),
            max_wait: Duration::from_secs(60),
            max_response_bytes: 1024 * 1024,
        }
    }
}

impl Limits {
    /// The lease length to grant for a requested one (`None`: unset).
    pub fn lease_ttl(&self, requested: Option<Duration>) -> Result<Duration, InvalidInput> {
        let ttl = requested.unwrap_or(self.default_lease_ttl);
        if ttl < self.min_lease_ttl || ttl > self.max_lease_ttl {
            return Err(InvalidInput::LeaseTtl { min: self.min_lease_ttl, max: self.max_lease_ttl });
        }
        Ok(ttl)
    }

    /// The retention to apply for a requested one (`None`: unset, so `fallback` applies).
    pub fn retention(&self, requested: Option<Duration>, fallback: Duration) -> Result<Duration, InvalidInput> {
        let retention = requested.unwrap_or(fallback);
        if retention < self.min_retention || retention > self.max_retention {
            return Err(InvalidInput::Retention { min: self.min_retention, max: self.max_retention });
        }
        Ok(retention)
    }

    /// The wait to apply for a requested one (`None`: unset, meaning no wait).
    pub fn wait(&self, requested: Option<Duration>) -> Result<Duration, InvalidInput> {
        let wait = requested.unwrap_or(Duration::ZERO);
        if wait > self.max_wait {
            return Err(InvalidInput::Wait { max: self.max_wait });
        }
        Ok(wait)
    }

    /// Checks a response against the size limit.
    pub fn response(&self, response: ApiResponse) -> Result<ApiResponse, InvalidInput> {
        let size = response.size();
        if size > self.max_response_bytes {
            return Err(InvalidInput::ResponseTooLarge { size, max: self.max_response_bytes });
        }
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<T: fmt::Debug>(result: Result<T, InvalidInput>, expected: Option<InvalidInput>) {
        match (result, expected) {
            (Ok(_), None) => {}
            (Err(actual), Some(expected)) => assert_eq!(actual, expected),
            (result, expected) => panic!("got {result:?}, expected error {expected:?}"),
        }
    }

    #[test]
    fn namespaces() {
        check(Namespace::parse(""), None);
        assert_eq!(Namespace::parse("").unwrap().as_str(), "default");
        check(Namespace::parse("payments-v1.eu_west"), None);
        check(Namespace::parse(&"n".repeat(64)), None);
        check(Namespace::parse(&"n".repeat(65)), Some(InvalidInput::Namespace));
        check(Namespace::parse("a/b"), Some(InvalidInput::Namespace));
        check(Namespace::parse("a b"), Some(InvalidInput::Namespace));
        check(Namespace::parse("é"), Some(InvalidInput::Namespace));
    }

    #[test]
    fn keys() {
        check(Key::parse("123e4567-e89b-12d3-a456-426614174000"), None);
        check(Key::parse("ключ/with spaces and ünïcode"), None);
        check(Key::parse(&"k".repeat(255)), None);
        check(Key::parse(&"k".repeat(256)), Some(InvalidInput::Key));
        check(Key::parse(""), Some(InvalidInput::Key));
        check(Key::parse("a\nb"), Some(InvalidInput::Key));
        check(Key::parse("a\u{0}b"), Some(InvalidInput::Key));
        check(Key::parse("a\u{7f}b"), Some(InvalidInput::Key));
    }

    #[test]
    fn fingerprints() {
        check(Fingerprint::parse(&[]), None);
        check(Fingerprint::parse(&[7; 64]), None);
        check(Fingerprint::parse(&[7; 65]), Some(InvalidInput::Fingerprint { max: 64 }));
        let a = Fingerprint::parse(b"a").unwrap();
        let b = Fingerprint::parse(b"b").unwrap();
        let none = Fingerprint::default();
        assert!(a.conflicts_with(&b));
        assert!(!a.conflicts_with(&a));
        assert!(!a.conflicts_with(&none));
        assert!(!none.conflicts_with(&b));
    }

    #[test]
    fn lease_tokens() {
        let token = LeaseToken::generate();
        assert_eq!(LeaseToken::parse(&token.to_text()), Ok(token));
        assert_ne!(LeaseToken::generate(), token);
        check(LeaseToken::parse("not-a-token"), Some(InvalidInput::LeaseToken));
        check(LeaseToken::parse(""), Some(InvalidInput::LeaseToken));
        assert_eq!(format!("{token:?}"), "LeaseToken(..)");
        // Only the canonical spelling Claim returns; other spellings of the same UUID are refused.
        let text = "0c534701-0b44-40e8-9410-9df129f42390";
        check(LeaseToken::parse(text), None);
        for other in [
            "0C534701-0B44-40E8-9410-9DF129F42390",
            "{0c534701-0b44-40e8-9410-9df129f42390}",
            "0c5347010b4440e894109df129f42390",
            "urn:uuid:0c534701-0b44-40e8-9410-9df129f42390",
            " 0c534701-0b44-40e8-9410-9df129f42390",
        ] {
            check(LeaseToken::parse(other), Some(InvalidInput::LeaseToken));
        }
    }

    #[test]
    fn short_texts() {
        check(Owner::parse(""), None);
        check(Owner::parse("pod-7"), None);
        check(Owner::parse(&"o".repeat(129)), Some(InvalidInput::Owner { max: 128 }));
        check(Owner::parse("a\tb"), Some(InvalidInput::Owner { max: 128 }));
        assert_eq!(RequestId::parse_optional("").unwrap(), None);
        check(RequestId::parse_optional("r-1"), None);
        check(RequestId::parse_optional(&"r".repeat(129)), Some(InvalidInput::RequestId { max: 128 }));
    }

    #[test]
    fn durations_and_sizes() {
        let limits = Limits::default();
        assert_eq!(limits.lease_ttl(None), Ok(Duration::from_secs(30)));
        check(limits.lease_ttl(Some(Duration::from_millis(100))), None);
        check(limits.lease_ttl(Some(Duration::from_secs(3600))), None);
        let lease_error = InvalidInput::LeaseTtl { min: limits.min_lease_ttl, max: limits.max_lease_ttl };
        check(limits.lease_ttl(Some(Duration::from_millis(99))), Some(lease_error.clone()));
        check(limits.lease_ttl(Some(Duration::from_millis(3_600_001))), Some(lease_error));
        let retention_error = InvalidInput::Retention { min: limits.min_retention, max: limits.max_retention };
        assert_eq!(limits.retention(None, Duration::from_secs(5)), Ok(Duration::from_secs(5)));
        check(limits.retention(Some(Duration::from_millis(999)), Duration::ZERO), Some(retention_error.clone()));
        check(limits.retention(Some(Duration::from_secs(31 * 24 * 3600)), Duration::ZERO), Some(retention_error));
        assert_eq!(limits.wait(None), Ok(Duration::ZERO));
        check(limits.wait(Some(Duration::from_secs(60))), None);
        check(limits.wait(Some(Duration::from_millis(60_001))), Some(InvalidInput::Wait { max: limits.max_wait }));
        // Sizes are protobuf's encoded sizes: a tag and a length before each field and entry.
        assert_eq!(ApiResponse::default().size(), 0);
        assert_eq!(ApiResponse { body: Bytes::from_static(b"abc"), metadata: BTreeMap::new() }.size(), 5);
        assert_eq!(ApiResponse { body: vec![0; 200].into(), metadata: BTreeMap::new() }.size(), 203);
        let mut metadata = BTreeMap::new();
        metadata.insert("status".to_owned(), "201".to_owned());
        assert_eq!(ApiResponse { body: Bytes::new(), metadata: metadata.clone() }.size(), 2 + 8 + 5);
        metadata.insert(String::new(), String::new());
        assert_eq!(ApiResponse { body: Bytes::new(), metadata: metadata.clone() }.size(), 15 + 2, "an empty entry");
        let response = ApiResponse { body: vec![0; 1024 * 1024 - 4].into(), metadata: BTreeMap::new() };
        assert_eq!(response.size(), 1024 * 1024);
        check(limits.response(response.clone()), None);
        let mut too_large = response;
        too_large.body = vec![0; 1024 * 1024 - 3].into();
        check(
            limits.response(too_large),
            Some(InvalidInput::ResponseTooLarge { size: 1024 * 1024 + 1, max: 1024 * 1024 }),
        );
    }

    /// Messages write durations the way the ErrorInfo limit and the configuration do.
    #[test]
    fn messages_write_durations_in_one_human_format() {
        let limits = Limits::default();
        let lease = InvalidInput::LeaseTtl { min: limits.min_lease_ttl, max: limits.max_lease_ttl };
        assert_eq!(lease.to_string(), "lease_ttl must be between 100ms and 1h");
        let retention = InvalidInput::Retention { min: limits.min_retention, max: limits.max_retention };
        assert_eq!(retention.to_string(), "retention must be between 1s and 30days");
        assert_eq!(InvalidInput::Wait { max: limits.max_wait }.to_string(), "wait must be between 0s and 1m");
    }

    #[test]
    fn timestamps() {
        let t = Timestamp::from_unix_millis(1_000);
        assert_eq!(t.plus(Duration::from_millis(500)).unix_millis(), 1_500);
        assert_eq!(t.plus(Duration::from_millis(500)).since(t), Duration::from_millis(500));
        assert_eq!(t.since(t.plus(Duration::from_secs(1))), Duration::ZERO);
        assert_eq!(Timestamp::from_unix_millis(i64::MAX - 1).plus(Duration::from_secs(9)).unix_millis(), i64::MAX);
    }
}
