//! The client's one error type, decoded from the coordinator's statuses.

use std::time::Duration;

use idempotency_proto::Reason;
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::types::Stored;

/// A cause kept with [`Error::Failed`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a call, or a [`run`](crate::Idempotent::run), did not succeed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The coordinator refused the call by the contract's rules: the key is bound to another
    /// fingerprint, the lease was lost, the key is already completed, the key is unknown, the
    /// store or the namespace is full, the server is overloaded, the credentials are missing or
    /// do not allow the call, or an internal fault. Nothing changed.
    #[error("{1} ({0})")]
    Rejected(Reason, String),
    /// The request was malformed or out of the server's bounds; nothing changed.
    #[error("invalid {field}: {message} ({reason})")]
    Invalid {
        /// Which rule it broke.
        reason: Reason,
        /// The request field (empty when the whole message was refused).
        field: String,
        /// The bound it broke, as the server wrote it (`100ms..1h`, `64`), if any.
        limit: Option<String>,
        /// The server's explanation.
        message: String,
    },
    /// Another caller holds the key (and [`wait`](crate::Idempotent::wait), if set, is spent).
    #[error("the key is in progress elsewhere (owner {owner:?}, attempt {attempt}); retry after {retry_after:?}")]
    InProgress {
        /// When it is worth asking again.
        retry_after: Duration,
        /// The holder's owner name.
        owner: String,
        /// The holder's attempt.
        attempt: u32,
    },
    /// The call may or may not have taken effect (the store was unavailable, the server was
    /// draining, the deadline passed, the connection broke): retry it as it was.
    #[error("the coordinator is unavailable: {message}")]
    Unavailable {
        /// The contract's reason (STORE_UNAVAILABLE, SHUTTING_DOWN), if the server gave one.
        reason: Option<Reason>,
        /// What happened.
        message: String,
    },
    /// A status that does not come from this contract (an older or newer server, a proxy, the
    /// transport's own limits).
    #[error("unexpected status: {0}")]
    Transport(Status),
    /// The client could not connect.
    #[error("cannot connect to the coordinator: {0}")]
    Connect(#[source] tonic::transport::Error),
    /// The work given to `run` failed. With `stored: None` the key was released (a retry runs
    /// the work again); with `stored: Some(response)` the failure was final and that response
    /// was stored: every retry replays it.
    #[error("the work failed: {source}")]
    Failed {
        /// What the work returned.
        source: BoxError,
        /// The response stored for a final failure.
        stored: Option<Stored>,
    },
}

impl Error {
    /// Whether the same call may succeed if made again later: the coordinator was unavailable,
    /// the key was in progress, the store was full, or the transport failed. Refusals by the
    /// contract's rules and invalid input are final.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Unavailable { .. } | Error::InProgress { .. } | Error::Connect(_) => true,
            Error::Rejected(reason, _) => {
                matches!(reason, Reason::StoreFull | Reason::NamespaceFull | Reason::Overloaded)
            }
            Error::Transport(status) => matches!(status.code(), Code::Unavailable | Code::ResourceExhausted),
            Error::Invalid { .. } | Error::Failed { .. } => false,
        }
    }

    /// The contract's reason, if the coordinator gave one.
    pub fn reason(&self) -> Option<Reason> {
        match self {
            Error::Rejected(reason, _) | Error::Invalid { reason, .. } => Some(*reason),
            Error::Unavailable { reason, .. } => *reason,
            Error::InProgress { .. } | Error::Transport(_) | Error::Connect(_) | Error::Failed { .. } => None,
        }
    }

    /// Whether the call may have taken effect even though it failed: retry it with the same
    /// request id or lease token.
    pub fn is_indeterminate(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }
}

impl From<Status> for Error {
    fn from(status: Status) -> Self {
        let message = status.message().to_owned();
        match Reason::of(&status) {
            Some(reason @ (Reason::StoreUnavailable | Reason::ShuttingDown)) => {
                Error::Unavailable { reason: Some(reason), message }
            }
            Some(reason) if reason.code() == Code::InvalidArgument => {
                let info = status.get_details_error_info();
                let metadata = |name: &str| info.as_ref().and_then(|info| info.metadata.get(name).cloned());
                Error::Invalid {
                    reason,
                    field: metadata("field").unwrap_or_default(),
                    limit: metadata("limit"),
                    message,
                }
            }
            Some(reason) => Error::Rejected(reason, message),
            // Without the contract's reason: these say nothing about whether the call happened.
            None if matches!(
                status.code(),
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
            ) =>
            {
                Error::Unavailable { reason: None, message: format!("{:?}: {message}", status.code()) }
            }
            None => Error::Transport(status),
        }
    }
}

impl From<tonic::transport::Error> for Error {
    fn from(error: tonic::transport::Error) -> Self {
        Error::Connect(error)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn statuses_decode_into_the_variant_their_reason_says() {
        let check = |status: Status, retryable: bool| {
            let error = Error::from(status);
            assert_eq!(error.is_retryable(), retryable, "{error:?}");
            error
        };
        let lost = check(Reason::LeaseLost.status("gone", HashMap::new()), false);
        assert!(matches!(lost, Error::Rejected(Reason::LeaseLost, _)));
        let field = HashMap::from([("field".to_owned(), "key".to_owned())]);
        let invalid = check(Reason::InvalidKey.status("bad", field), false);
        assert!(matches!(&invalid, Error::Invalid { reason: Reason::InvalidKey, field, .. } if field == "key"));
        let down = check(Reason::StoreUnavailable.status("down", HashMap::new()), true);
        assert!(down.is_indeterminate());
        assert_eq!(down.reason(), Some(Reason::StoreUnavailable));
        assert!(check(Reason::StoreFull.status("full", HashMap::new()), true).reason() == Some(Reason::StoreFull));
        assert!(check(Status::deadline_exceeded("late"), true).is_indeterminate());
        assert!(matches!(check(Status::out_of_range("big"), false), Error::Transport(_)));
    }
}
