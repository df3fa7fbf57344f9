"""A client of the idempotency coordinator, for services that must run each mutation once per
``Idempotency-Key`` and replay its response to every retry.

The map:

- :class:`Client`: connects (plaintext, TLS or mutual TLS, with an optional bearer token) and makes
  the contract's five calls (``claim``, ``complete``, ``renew``, ``release``, ``lookup``) with
  Python types.
- :meth:`Idempotent.run`, through :meth:`Client.idempotent`: the one call most services need. It
  claims the key, runs your work once under a renewed lease, stores its response or releases the
  key, and replays the stored response to retries.
- :class:`Error` and its subclasses: one exception hierarchy, decoded from the contract's
  statuses (:class:`Reason`).
- :mod:`idempotency_coordinator.asgi`: an ``Idempotency-Key`` middleware for ASGI applications
  (FastAPI, Starlette), following the IETF draft.

::

    client = Client("http://127.0.0.1:50051")
    outcome = await client.idempotent(
        "payments", key, fingerprint=digest, lease_ttl=30, wait=10, owner="api-1"
    ).run(create_payment)   # async def create_payment(lease: Lease) -> Stored
    outcome.response, outcome.replayed
"""

from .client import DEFAULT_CALL_TIMEOUT, Client
from .errors import (
    ERROR_DOMAIN,
    Error,
    Failed,
    InProgressError,
    Invalid,
    PermissionDenied,
    Reason,
    Rejected,
    TransportError,
    Unavailable,
)
from .idempotent import (
    DEFAULT_RETRY_FOR,
    AbandonFailure,
    FinalFailure,
    Idempotent,
    Lease,
    Outcome,
)
from .types import (
    ClaimOutcome,
    Completion,
    Duration,
    Grant,
    InProgress,
    KeyState,
    KeyView,
    Renewal,
    Replay,
    Stored,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_CALL_TIMEOUT",
    "DEFAULT_RETRY_FOR",
    "ERROR_DOMAIN",
    "AbandonFailure",
    "ClaimOutcome",
    "Client",
    "Completion",
    "Duration",
    "Error",
    "Failed",
    "FinalFailure",
    "Grant",
    "Idempotent",
    "InProgress",
    "InProgressError",
    "Invalid",
    "KeyState",
    "KeyView",
    "Lease",
    "Outcome",
    "PermissionDenied",
    "Reason",
    "Rejected",
    "Renewal",
    "Replay",
    "Stored",
    "TransportError",
    "Unavailable",
]
