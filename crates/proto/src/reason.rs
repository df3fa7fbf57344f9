//! The contract's error reasons: each refusal is a gRPC status whose `google.rpc.ErrorInfo`
//! (domain [`ERROR_DOMAIN`]) names one of these. The status code of each reason is fixed here, so
//! that the server's one mapping and every client agree.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `google.rpc.ErrorInfo` domain of every error the coordinator returns.
pub const ERROR_DOMAIN: &str = "idempotency.v1";

macro_rules! reasons {
    ($($(#[$doc:meta])* $variant:ident = $text:literal, $code:ident;)*) => {
        /// A stable `ErrorInfo` reason of the contract (see the proto's error table).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum Reason {
            $($(#[$doc])* $variant,)*
        }

        impl Reason {
            /// Every reason, in the order of the contract's table.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)*];

            /// The reason as `ErrorInfo.reason` spells it.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$variant => $text,)*
                }
            }

            /// The status code that always comes with this reason.
            pub const fn code(self) -> Code {
                match self {
                    $(Reason::$variant => Code::$code,)*
                }
            }
        }

        impl FromStr for Reason {
            type Err = UnknownReason;

            fn from_str(text: &str) -> Result<Self, UnknownReason> {
                match text {
                    $($text => Ok(Reason::$variant),)*
                    _ => Err(UnknownReason(text.to_owned())),
                }
            }
        }
    };
}

reasons! {
    /// The namespace is not 1 to 64 of `[A-Za-z0-9._-]`.
    InvalidNamespace = "INVALID_NAMESPACE", InvalidArgument;
    /// The key is empty, over 255 bytes, or has control characters.
    InvalidKey = "INVALID_KEY", InvalidArgument;
    /// The fingerprint is over 64 bytes.
    InvalidFingerprint = "INVALID_FINGERPRINT", InvalidArgument;
    /// `lease_ttl` is outside the server's bounds.
    InvalidLeaseTtl = "INVALID_LEASE_TTL", InvalidArgument;
    /// `retention` is outside the server's bounds.
    InvalidRetention = "INVALID_RETENTION", InvalidArgument;
    /// `wait` is negative or over the server's maximum.
    InvalidWait = "INVALID_WAIT", InvalidArgument;
    /// `lease_token` is not exactly the text Claim returned.
    InvalidLeaseToken = "INVALID_LEASE_TOKEN", InvalidArgument;
    /// `request_id` is over 128 bytes or has control characters.
    InvalidRequestId = "INVALID_REQUEST_ID", InvalidArgument;
    /// `owner` is over 128 bytes or has control characters.
    InvalidOwner = "INVALID_OWNER", InvalidArgument;
    /// The response, as encoded, is over the server's limit.
    ResponseTooLarge = "RESPONSE_TOO_LARGE", InvalidArgument;
    /// The request is not valid protobuf.
    InvalidMessage = "INVALID_MESSAGE", InvalidArgument;
    /// `Admin.List`: the page token is not one List returned for the same namespace and prefix.
    InvalidPageToken = "INVALID_PAGE_TOKEN", InvalidArgument;
    /// `Admin.Import`: the stream is not a whole snapshot; nothing was imported.
    InvalidSnapshot = "INVALID_SNAPSHOT", InvalidArgument;
    /// Lookup of a key that is absent or whose retention ended.
    KeyNotFound = "KEY_NOT_FOUND", NotFound;
    /// The key is bound to another request's fingerprint.
    FingerprintMismatch = "FINGERPRINT_MISMATCH", FailedPrecondition;
    /// Renew or Release by the holder whose Complete is stored.
    AlreadyCompleted = "ALREADY_COMPLETED", FailedPrecondition;
    /// The lease token is not (or no longer) the key's holder.
    LeaseLost = "LEASE_LOST", Aborted;
    /// A Claim of a new key while the store holds its maximum of records.
    StoreFull = "STORE_FULL", ResourceExhausted;
    /// A Claim of a new key in a namespace that holds its quota of records.
    NamespaceFull = "NAMESPACE_FULL", ResourceExhausted;
    /// The server is serving as many calls as it may (`--max-in-flight`); retry after the hint.
    Overloaded = "OVERLOADED", ResourceExhausted;
    /// No credentials, or credentials the server does not know.
    Unauthenticated = "UNAUTHENTICATED", Unauthenticated;
    /// The caller may not use this namespace.
    NamespaceNotAllowed = "NAMESPACE_NOT_ALLOWED", PermissionDenied;
    /// The caller may use the namespace, but its role does not allow this call.
    RoleNotAllowed = "ROLE_NOT_ALLOWED", PermissionDenied;
    /// The store could not make the change durable now; it may or may not have happened.
    StoreUnavailable = "STORE_UNAVAILABLE", Unavailable;
    /// The server is draining.
    ShuttingDown = "SHUTTING_DOWN", Unavailable;
    /// A fault; details are in the server's log only.
    Internal = "INTERNAL", Internal;
}

impl Reason {
    /// As [`Reason::status`], with a `google.rpc.RetryInfo` saying when to try again.
    pub fn status_with_retry(
        self,
        message: impl Into<String>,
        metadata: HashMap<String, String>,
        retry_after: std::time::Duration,
    ) -> Status {
        let mut details = ErrorDetails::with_error_info(self.as_str(), ERROR_DOMAIN, metadata);
        details.set_retry_info(Some(retry_after));
        Status::with_error_details(self.code(), message, details)
    }

    /// The status for this reason: its code, `message`, and an `ErrorInfo` with `metadata`.
    pub fn status(self, message: impl Into<String>, metadata: HashMap<String, String>) -> Status {
        Status::with_error_details(
            self.code(),
            message,
            ErrorDetails::with_error_info(self.as_str(), ERROR_DOMAIN, metadata),
        )
    }

    /// The reason a status carries, if it has an `ErrorInfo` of this contract's domain with a
    /// reason this release knows.
    pub fn of(status: &Status) -> Option<Reason> {
        let info = status.get_details_error_info()?;
        if info.domain != ERROR_DOMAIN {
            return None;
        }
        info.reason.parse().ok()
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A reason this release does not know (a newer server's, or another service's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownReason(pub String);

impl fmt::Display for UnknownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown error reason {:?}", self.0)
    }
}

impl std::error::Error for UnknownReason {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_round_trips_through_its_text_and_a_status() {
        for reason in Reason::ALL {
            assert_eq!(reason.as_str().parse::<Reason>(), Ok(*reason));
            let status = reason.status("message", HashMap::new());
            assert_eq!(status.code(), reason.code());
            assert_eq!(Reason::of(&status), Some(*reason));
        }
        assert_eq!("NOPE".parse::<Reason>(), Err(UnknownReason("NOPE".to_owned())));
        assert_eq!(Reason::of(&Status::internal("no details")), None);
    }
}
