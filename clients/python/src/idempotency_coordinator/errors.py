"""One exception hierarchy, decoded from the coordinator's statuses.

Every error the coordinator produces is a gRPC status with a ``google.rpc.ErrorInfo`` detail
(domain ``idempotency.v1``) whose ``reason`` is stable; the status travels in the trailing
metadata ``grpc-status-details-bin``. :func:`error_from_rpc` turns it into one of:

- :class:`Invalid`: the request was malformed or out of the server's bounds (the ``INVALID_*``
  reasons, ``RESPONSE_TOO_LARGE``, ``INVALID_MESSAGE``), with ``field`` and ``limit``. Final.
- :class:`Rejected`: refused by the contract's rules (``FINGERPRINT_MISMATCH``, ``LEASE_LOST``,
  ``ALREADY_COMPLETED``, ``KEY_NOT_FOUND``, ``STORE_FULL``, ``INTERNAL``,
  ``NAMESPACE_FULL`` and ``OVERLOADED``). ``STORE_FULL``, ``NAMESPACE_FULL`` and ``OVERLOADED``
  are retryable later; the others are final.
- :class:`PermissionDenied` (a :class:`Rejected`): ``UNAUTHENTICATED`` (no bearer
  token or client certificate, or one the server does not know), ``NAMESPACE_NOT_ALLOWED`` and
  ``ROLE_NOT_ALLOWED``. Final.
- :class:`Unavailable`: the call may or may not have taken effect (``STORE_UNAVAILABLE``,
  ``SHUTTING_DOWN``, a deadline, a broken or refused connection): retry it as it was.
- :class:`TransportError`: a status that does not come from the contract (the transport's own
  size limits, a proxy).
- :class:`InProgressError` and :class:`Failed` come from :meth:`Idempotent.run
  <idempotency_coordinator.Idempotent.run>`: the key is held elsewhere, or the work failed.

A refused call changes nothing stored. When the status carries a ``google.rpc.RetryInfo``
(``OVERLOADED`` does), :attr:`Error.retry_after` gives its delay.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import ClassVar

import grpc
from google.rpc.error_details_pb2 import ErrorInfo, RetryInfo
from google.rpc.status_pb2 import Status

from .types import Stored

#: The ``ErrorInfo`` domain of every error the coordinator returns.
ERROR_DOMAIN = "idempotency.v1"

_STATUS_DETAILS = "grpc-status-details-bin"


class Reason(str, enum.Enum):
    """The contract's ``ErrorInfo`` reasons. A reason is a ``str``: ``error.reason ==
    Reason.LEASE_LOST`` and ``error.reason == "LEASE_LOST"`` both hold. Reasons this release does
    not know stay plain strings on the error."""

    INVALID_NAMESPACE = "INVALID_NAMESPACE"
    INVALID_KEY = "INVALID_KEY"
    INVALID_FINGERPRINT = "INVALID_FINGERPRINT"
    INVALID_LEASE_TTL = "INVALID_LEASE_TTL"
    INVALID_RETENTION = "INVALID_RETENTION"
    INVALID_WAIT = "INVALID_WAIT"
    INVALID_LEASE_TOKEN = "INVALID_LEASE_TOKEN"
    INVALID_REQUEST_ID = "INVALID_REQUEST_ID"
    INVALID_OWNER = "INVALID_OWNER"
    RESPONSE_TOO_LARGE = "RESPONSE_TOO_LARGE"
    INVALID_MESSAGE = "INVALID_MESSAGE"
    INVALID_PAGE_TOKEN = "INVALID_PAGE_TOKEN"
    INVALID_SNAPSHOT = "INVALID_SNAPSHOT"
    KEY_NOT_FOUND = "KEY_NOT_FOUND"
    FINGERPRINT_MISMATCH = "FINGERPRINT_MISMATCH"
    ALREADY_COMPLETED = "ALREADY_COMPLETED"
    LEASE_LOST = "LEASE_LOST"
    STORE_FULL = "STORE_FULL"
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    INTERNAL = "INTERNAL"
    # Access, quotas and overload (the server's --auth-file and --max-in-flight).
    UNAUTHENTICATED = "UNAUTHENTICATED"
    NAMESPACE_NOT_ALLOWED = "NAMESPACE_NOT_ALLOWED"
    ROLE_NOT_ALLOWED = "ROLE_NOT_ALLOWED"
    NAMESPACE_FULL = "NAMESPACE_FULL"
    OVERLOADED = "OVERLOADED"

    def __str__(self) -> str:
        return self.value


class Error(Exception):
    """Why a call, or a :meth:`run <idempotency_coordinator.Idempotent.run>`, did not succeed.

    ``reason`` is the contract's reason (a :class:`Reason`, or a plain string for a reason this
    release does not know), or ``None`` when the coordinator gave none. ``code`` is the gRPC status
    code, when the error came from a call.
    """

    #: Whether every error of this class may succeed when tried again later.
    _retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        code: grpc.StatusCode | None = None,
        metadata: dict[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason: str | None = reason
        self.code = code
        #: The ``ErrorInfo`` metadata (``field``, ``limit``), if any.
        self.metadata: dict[str, str] = dict(metadata or {})
        #: When to try again, in seconds, if the server said (``google.rpc.RetryInfo``).
        self.retry_after: float | None = retry_after

    @property
    def is_retryable(self) -> bool:
        """Whether the same call may succeed if made again later: the coordinator was
        unavailable, the key was in progress, the store (or namespace) was full or the server
        overloaded. Refusals by the contract's rules, permissions and invalid input are final."""
        return self._retryable

    @property
    def is_indeterminate(self) -> bool:
        """Whether the call may have taken effect although it failed: retry it as it was (a
        Claim with the same request id, a Complete with the same token)."""
        return False

    def __str__(self) -> str:
        if self.reason is not None:
            return f"{self.message} ({self.reason})"
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, reason={self.reason!r})"


class Invalid(Error):
    """The request was malformed or out of the server's bounds; nothing changed."""

    @property
    def field(self) -> str:
        """The request field (empty when the whole message was refused)."""
        return self.metadata.get("field", "")

    @property
    def limit(self) -> str | None:
        """The bound it broke, as the server wrote it (``100ms..1h``, ``64``, ``1m``), if any."""
        return self.metadata.get("limit")


_RETRYABLE_REJECTIONS = frozenset({Reason.STORE_FULL, Reason.NAMESPACE_FULL, Reason.OVERLOADED})


class Rejected(Error):
    """The coordinator refused the call by the contract's rules: the key is bound to another
    fingerprint, the lease was lost, the key is already completed or unknown, the store (or
    namespace) is full, the server is overloaded, or an internal fault. Nothing changed."""

    @property
    def is_retryable(self) -> bool:
        return self.reason in _RETRYABLE_REJECTIONS or (
            self.reason not in _KNOWN and self.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        )


class PermissionDenied(Rejected):
    """The credentials are missing or unknown (``UNAUTHENTICATED``), or do not allow this
    namespace or this call (``NAMESPACE_NOT_ALLOWED``, ``ROLE_NOT_ALLOWED``). Final."""


class Unavailable(Error):
    """The call may or may not have taken effect (the store was unavailable, the server was
    draining, the deadline passed, the connection broke or was refused): retry it as it was."""

    _retryable = True

    @property
    def is_indeterminate(self) -> bool:
        return True


class TransportError(Error):
    """A status that does not come from this contract (an older or newer server, a proxy, the
    transport's own limits: OUT_OF_RANGE for an oversized message)."""

    @property
    def is_retryable(self) -> bool:
        return self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


class InProgressError(Error):
    """Another caller holds the key (and the ``wait``, if any, is spent)."""

    _retryable = True
    #: When it is worth asking again, in seconds.
    retry_after: float

    def __init__(self, retry_after: float, owner: str, attempt: int) -> None:
        super().__init__(
            f"the key is in progress elsewhere (owner {owner!r}, attempt {attempt}); "
            f"retry after {retry_after:.3f}s",
            retry_after=retry_after,
        )
        #: The holder's owner name.
        self.owner = owner
        #: The holder's attempt.
        self.attempt = attempt


class Failed(Error):
    """The work given to ``run`` failed. With ``stored`` None the key was released (or, for an
    :class:`~idempotency_coordinator.AbandonFailure`, left to lapse), so a retry runs the work
    again; with ``stored`` set the failure was final and that response was stored: every retry
    replays it. The work's exception is ``__cause__`` (and ``cause``)."""

    def __init__(self, cause: BaseException, stored: Stored | None = None) -> None:
        super().__init__(f"the work failed: {cause}")
        #: What the work raised.
        self.cause = cause
        #: The response stored for a final failure.
        self.stored = stored


_INVALID = frozenset(
    {
        Reason.INVALID_NAMESPACE,
        Reason.INVALID_KEY,
        Reason.INVALID_FINGERPRINT,
        Reason.INVALID_LEASE_TTL,
        Reason.INVALID_RETENTION,
        Reason.INVALID_WAIT,
        Reason.INVALID_LEASE_TOKEN,
        Reason.INVALID_REQUEST_ID,
        Reason.INVALID_OWNER,
        Reason.RESPONSE_TOO_LARGE,
        Reason.INVALID_MESSAGE,
        Reason.INVALID_PAGE_TOKEN,
        Reason.INVALID_SNAPSHOT,
    }
)
_UNAVAILABLE = frozenset({Reason.STORE_UNAVAILABLE, Reason.SHUTTING_DOWN})
_PERMISSION = frozenset(
    {Reason.UNAUTHENTICATED, Reason.NAMESPACE_NOT_ALLOWED, Reason.ROLE_NOT_ALLOWED}
)
_KNOWN = frozenset(Reason)

#: Status codes that, without the contract's reason, say nothing about whether the call happened.
_INDETERMINATE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
    }
)


def status_details(
    trailing_metadata: Iterable[tuple[str, str | bytes]] | None,
) -> tuple[ErrorInfo | None, float | None]:
    """The ``ErrorInfo`` of the contract's domain and the ``RetryInfo`` delay (seconds) in a
    status's trailing metadata (``grpc-status-details-bin``, an encoded ``google.rpc.Status``),
    each if any."""
    raw = next(
        (
            value
            for name, value in trailing_metadata or ()
            if name == _STATUS_DETAILS and isinstance(value, bytes)
        ),
        None,
    )
    if raw is None:
        return None, None
    try:
        status = Status.FromString(raw)
    except Exception:  # an undecodable detail is no detail
        return None, None
    found: ErrorInfo | None = None
    retry_after: float | None = None
    for detail in status.details:
        kind = detail.type_url.rsplit("/", 1)[-1]
        if kind == "google.rpc.ErrorInfo" and found is None:
            info = ErrorInfo()
            if detail.Unpack(info) and info.domain == ERROR_DOMAIN:
                found = info
        elif kind == "google.rpc.RetryInfo":
            retry = RetryInfo()
            if detail.Unpack(retry):
                retry_after = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    return found, retry_after


def error_info(trailing_metadata: Iterable[tuple[str, str | bytes]] | None) -> ErrorInfo | None:
    """The ``ErrorInfo`` of the contract's domain in a status's trailing metadata, if any."""
    return status_details(trailing_metadata)[0]


def _reason_of(text: str) -> str:
    try:
        return Reason(text)
    except ValueError:
        return text


def error_from_status(
    code: grpc.StatusCode,
    message: str,
    info: ErrorInfo | None,
    retry_after: float | None = None,
) -> Error:
    """The error a status stands for (see the module's documentation)."""
    if info is None:
        if code in _INDETERMINATE_CODES:
            return Unavailable(f"{code.name}: {message}", code=code, retry_after=retry_after)
        return TransportError(f"{code.name}: {message}", code=code, retry_after=retry_after)
    reason = _reason_of(info.reason)
    kind: type[Error]
    if reason in _UNAVAILABLE:
        kind = Unavailable
    elif reason in _INVALID:
        kind = Invalid
    elif reason in _PERMISSION:
        kind = PermissionDenied
    elif reason in _KNOWN:
        kind = Rejected
    # A reason this release does not know: read it by its status code.
    elif code == grpc.StatusCode.INVALID_ARGUMENT:
        kind = Invalid
    elif code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        kind = PermissionDenied
    elif code in _INDETERMINATE_CODES:
        kind = Unavailable
    else:
        kind = Rejected
    return kind(
        message, reason=reason, code=code, metadata=dict(info.metadata), retry_after=retry_after
    )


def error_from_rpc(error: grpc.RpcError) -> Error:
    """The error a failed call stands for."""
    code_of = getattr(error, "code", None)
    details_of = getattr(error, "details", None)
    trailers_of = getattr(error, "trailing_metadata", None)
    code = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
    message = (details_of() if callable(details_of) else None) or ""
    trailers = trailers_of() if callable(trailers_of) else None
    info, retry_after = status_details(trailers)
    return error_from_status(code or grpc.StatusCode.UNKNOWN, message, info, retry_after)
