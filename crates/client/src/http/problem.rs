//! The errors the layer itself answers with, as `application/problem+json` (RFC 9457) documents.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

/// A problem the layer answers with: its `type` URI, status and title, and a detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// 400: a POST (or PATCH) without `Idempotency-Key`, when the key is required.
    KeyMissing,
    /// 400: the key is empty, over 255 bytes, unparsable, or sent twice.
    KeyInvalid,
    /// 413: the request body is over the layer's limit; nothing was claimed.
    BodyTooLarge,
    /// 422: the key was first used with another request.
    KeyReused,
    /// 409: the first request with this key is still running.
    InProgress,
    /// 409: this attempt lost its lease to another one while it ran; retry for the result.
    LeaseLost,
    /// 503: the coordinator cannot be reached, is unavailable, full, overloaded or failed inside;
    /// nothing was run.
    Unavailable,
    /// 500: the coordinator refused this service's own request (its credentials, namespace or
    /// lease bounds are wrong); nothing was run.
    Misconfigured,
    /// 400: the request body could not be read (the client went away or sent a broken body).
    BodyUnreadable,
    /// 500 (stored for replays): the response was too large for the coordinator.
    ResponseNotStored,
}

impl Problem {
    /// The problem's `type` URI.
    pub const fn type_uri(self) -> &'static str {
        match self {
            Problem::KeyMissing => "urn:idempotency:key-missing",
            Problem::KeyInvalid => "urn:idempotency:key-invalid",
            Problem::BodyTooLarge => "urn:idempotency:body-too-large",
            Problem::KeyReused => "urn:idempotency:key-reused",
            Problem::InProgress => "urn:idempotency:in-progress",
            Problem::LeaseLost => "urn:idempotency:lease-lost",
            Problem::Unavailable => "urn:idempotency:unavailable",
            Problem::Misconfigured => "urn:idempotency:misconfigured",
            Problem::BodyUnreadable => "urn:idempotency:body-unreadable",
            Problem::ResponseNotStored => "urn:idempotency:response-not-stored",
        }
    }

    /// The HTTP status it comes with.
    pub const fn status(self) -> StatusCode {
        match self {
            Problem::KeyMissing | Problem::KeyInvalid | Problem::BodyUnreadable => StatusCode::BAD_REQUEST,
            Problem::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Problem::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Problem::InProgress | Problem::LeaseLost => StatusCode::CONFLICT,
            Problem::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Problem::ResponseNotStored | Problem::Misconfigured => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A short, fixed summary.
    pub const fn title(self) -> &'static str {
        match self {
            Problem::KeyMissing => "Idempotency-Key is missing",
            Problem::KeyInvalid => "Idempotency-Key is invalid",
            Problem::BodyTooLarge => "The request body is too large",
            Problem::KeyReused => "Idempotency-Key reused with another request",
            Problem::InProgress => "A request with this Idempotency-Key is in progress",
            Problem::LeaseLost => "Another attempt took this request over",
            Problem::Unavailable => "Idempotency service unavailable",
            Problem::Misconfigured => "Idempotency service misconfigured",
            Problem::BodyUnreadable => "The request body could not be read",
            Problem::ResponseNotStored => "The response could not be stored",
        }
    }

    /// The document, as bytes.
    pub(crate) fn body(self, detail: &str) -> Bytes {
        let document = serde_json::json!({
            "type": self.type_uri(),
            "title": self.title(),
            "status": self.status().as_u16(),
            "detail": detail,
        });
        Bytes::from(document.to_string())
    }

    /// The response: status, `content-type: application/problem+json`, the document, and
    /// `Retry-After` when given.
    pub(crate) fn response<B: From<Bytes>>(self, detail: &str, retry_after_seconds: Option<u64>) -> Response<B> {
        let mut response = Response::new(B::from(self.body(detail)));
        *response.status_mut() = self.status();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if let Some(seconds) = retry_after_seconds {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        response
    }
}
