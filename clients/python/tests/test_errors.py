"""The exception hierarchy: every reason the real coordinator can be made to give, and through a
fake coordinator those it cannot (faults, draining, access and overload)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import pytest

from idempotency_coordinator import (
    Client,
    Error,
    Grant,
    Invalid,
    PermissionDenied,
    Reason,
    Rejected,
    Stored,
    TransportError,
    Unavailable,
)
from tests._support import CoordinatorProcess, Served, StatusServer, key

NS = "payments"


async def _refusal(call: Awaitable[Any]) -> Error:
    with pytest.raises(Error) as caught:
        await call
    return caught.value


async def _held(client: Client) -> tuple[str, Grant]:
    k = key()
    grant = await client.claim(NS, k, fingerprint=b"first")
    assert isinstance(grant, Grant)
    return k, grant


InvalidCase = tuple[str, str, str | None, Callable[[Client, str, str], Awaitable[Any]]]

INVALID: list[InvalidCase] = [
    ("INVALID_NAMESPACE", "namespace", "64", lambda c, k, t: c.claim("not a namespace", k)),
    ("INVALID_KEY", "key", "255", lambda c, k, t: c.claim(NS, "")),
    (
        "INVALID_FINGERPRINT", "fingerprint", "64",
        lambda c, k, t: c.claim(NS, k, fingerprint=bytes(65)),
    ),
    ("INVALID_LEASE_TTL", "lease_ttl", "100ms..1h", lambda c, k, t: c.claim(NS, k, lease_ttl=0.01)),
    ("INVALID_RETENTION", "retention", "1s..30days", lambda c, k, t: c.claim(NS, k, retention=0.5)),
    ("INVALID_WAIT", "wait", "1m", lambda c, k, t: c.claim(NS, k, wait=61)),
    ("INVALID_LEASE_TOKEN", "lease_token", None, lambda c, k, t: c.renew(NS, k, t.upper())),
    (
        "INVALID_REQUEST_ID", "request_id", "128",
        lambda c, k, t: c.claim(NS, k, request_id="r" * 129),
    ),
    ("INVALID_OWNER", "owner", "128", lambda c, k, t: c.claim(NS, k, owner="o" * 129)),
    (
        "RESPONSE_TOO_LARGE",
        "response",
        "1048576",
        lambda c, k, t: c.complete(NS, k, t, Stored(bytes(1024 * 1024))),
    ),
]  # fmt: skip


@pytest.mark.parametrize(("reason", "field", "limit", "call"), INVALID, ids=[c[0] for c in INVALID])
async def test_invalid_input_names_its_field_and_limit(
    client: Client, reason: str, field: str, limit: str | None, call: Any
) -> None:
    k, grant = await _held(client)
    error = await _refusal(call(client, k, grant.lease_token))
    assert type(error) is Invalid
    assert isinstance(error, Invalid)
    assert (error.reason, error.field, error.limit) == (reason, field, limit)
    assert error.reason is Reason(reason)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert not error.is_retryable and not error.is_indeterminate


async def test_a_message_that_is_not_protobuf_is_invalid(coordinator: CoordinatorProcess) -> None:
    from idempotency_coordinator.errors import error_from_rpc

    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        lookup: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/idempotency.v1.Coordinator/Lookup"
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await lookup(b"\x0a\x05ab", timeout=5)  # field 1 says 5 bytes, 2 follow
    error = error_from_rpc(caught.value)
    assert isinstance(error, Invalid) and error.reason == Reason.INVALID_MESSAGE


async def test_refusals_by_the_rules(client: Client) -> None:
    k, grant = await _held(client)

    mismatch = await _refusal(client.claim(NS, k, fingerprint=b"other"))
    assert type(mismatch) is Rejected and mismatch.reason == Reason.FINGERPRINT_MISMATCH
    assert mismatch.code == grpc.StatusCode.FAILED_PRECONDITION and not mismatch.is_retryable

    lost = await _refusal(client.complete(NS, k, str(uuid.uuid4()), Stored(b"x")))
    assert type(lost) is Rejected and lost.reason == Reason.LEASE_LOST
    assert lost.code == grpc.StatusCode.ABORTED and not lost.is_retryable

    await client.complete(NS, k, grant.lease_token, Stored(b"done"))
    completed = await _refusal(client.renew(NS, k, grant.lease_token))
    assert type(completed) is Rejected and completed.reason == Reason.ALREADY_COMPLETED
    assert not completed.is_retryable

    missing = await _refusal(client.lookup(NS, key()))
    assert type(missing) is Rejected and missing.reason == Reason.KEY_NOT_FOUND
    assert missing.code == grpc.StatusCode.NOT_FOUND and not missing.is_retryable
    assert "KEY_NOT_FOUND" in str(missing)


async def test_a_full_store_is_retryable_later(
    start_coordinator: Callable[..., CoordinatorProcess],
) -> None:
    small = start_coordinator("--max-records", "1")
    async with Client(small.url) as client:
        await client.claim(NS, key())
        full = await _refusal(client.claim(NS, key()))
    assert type(full) is Rejected and full.reason == Reason.STORE_FULL
    assert full.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert full.is_retryable and not full.is_indeterminate
    assert full.metadata.get("limit") == "1"


async def test_a_message_over_the_transport_limit_is_the_transports(client: Client) -> None:
    k, grant = await _held(client)
    error = await _refusal(
        client.complete(NS, k, grant.lease_token, Stored(bytes(2 * 1024 * 1024)))
    )
    assert type(error) is TransportError and error.reason is None
    assert error.code == grpc.StatusCode.OUT_OF_RANGE and not error.is_retryable


# reason, code, the class, retryable, indeterminate
FAKED: list[tuple[str | None, grpc.StatusCode, type[Error], bool, bool]] = [
    ("STORE_UNAVAILABLE", grpc.StatusCode.UNAVAILABLE, Unavailable, True, True),
    ("SHUTTING_DOWN", grpc.StatusCode.UNAVAILABLE, Unavailable, True, True),
    ("INTERNAL", grpc.StatusCode.INTERNAL, Rejected, False, False),
    ("LEASE_LOST", grpc.StatusCode.ABORTED, Rejected, False, False),
    ("STORE_FULL", grpc.StatusCode.RESOURCE_EXHAUSTED, Rejected, True, False),
    ("UNAUTHENTICATED", grpc.StatusCode.UNAUTHENTICATED, PermissionDenied, False, False),
    ("NAMESPACE_NOT_ALLOWED", grpc.StatusCode.PERMISSION_DENIED, PermissionDenied, False, False),
    ("ROLE_NOT_ALLOWED", grpc.StatusCode.PERMISSION_DENIED, PermissionDenied, False, False),
    ("NAMESPACE_FULL", grpc.StatusCode.RESOURCE_EXHAUSTED, Rejected, True, False),
    ("OVERLOADED", grpc.StatusCode.RESOURCE_EXHAUSTED, Rejected, True, False),
    ("INVALID_KEY", grpc.StatusCode.INVALID_ARGUMENT, Invalid, False, False),
    ("INVALID_PAGE_TOKEN", grpc.StatusCode.INVALID_ARGUMENT, Invalid, False, False),
    ("INVALID_SNAPSHOT", grpc.StatusCode.INVALID_ARGUMENT, Invalid, False, False),
    # Reasons of a release yet to come are read by their code.
    ("SOMETHING_NEW", grpc.StatusCode.INVALID_ARGUMENT, Invalid, False, False),
    ("SOMETHING_NEW", grpc.StatusCode.PERMISSION_DENIED, PermissionDenied, False, False),
    ("SOMETHING_NEW", grpc.StatusCode.UNAUTHENTICATED, PermissionDenied, False, False),
    ("SOMETHING_NEW", grpc.StatusCode.RESOURCE_EXHAUSTED, Rejected, True, False),
    ("SOMETHING_NEW", grpc.StatusCode.UNAVAILABLE, Unavailable, True, True),
    ("SOMETHING_NEW", grpc.StatusCode.FAILED_PRECONDITION, Rejected, False, False),
    # Without the contract's reason: the transport's, or indeterminate.
    (None, grpc.StatusCode.UNAVAILABLE, Unavailable, True, True),
    (None, grpc.StatusCode.UNKNOWN, Unavailable, True, True),
    (None, grpc.StatusCode.OUT_OF_RANGE, TransportError, False, False),
    (None, grpc.StatusCode.RESOURCE_EXHAUSTED, TransportError, True, False),
    (None, grpc.StatusCode.PERMISSION_DENIED, TransportError, False, False),
]


@pytest.mark.parametrize(
    ("reason", "code", "kind", "retryable", "indeterminate"),
    FAKED,
    ids=[f"{reason}-{code.name}" for reason, code, *_ in FAKED],
)
async def test_each_status_reads_as_its_class(
    reason: str | None,
    code: grpc.StatusCode,
    kind: type[Error],
    retryable: bool,
    indeterminate: bool,
) -> None:
    fake = StatusServer(code=code, reason=reason, info_metadata={"field": "f", "limit": "9"})
    async with Served(fake) as served, Client(served.url) as client:
        error = await _refusal(client.lookup(NS, "k"))
    assert type(error) is kind, repr(error)
    assert error.reason == reason
    assert error.code == code
    assert (error.is_retryable, error.is_indeterminate) == (retryable, indeterminate)
    if reason is not None and reason != "SOMETHING_NEW":
        assert isinstance(error.reason, Reason)
    if isinstance(error, Invalid):
        assert (error.field, error.limit) == ("f", "9")


async def test_a_retry_info_gives_the_delay() -> None:
    fake = StatusServer(
        code=grpc.StatusCode.RESOURCE_EXHAUSTED, reason="OVERLOADED", retry_after=0.25
    )
    async with Served(fake) as served, Client(served.url) as client:
        error = await _refusal(client.claim(NS, "k"))
    assert type(error) is Rejected and error.reason == Reason.OVERLOADED
    assert error.retry_after == pytest.approx(0.25)
    assert error.is_retryable and not error.is_indeterminate
    fake = StatusServer(code=grpc.StatusCode.NOT_FOUND, reason="KEY_NOT_FOUND")
    async with Served(fake) as served, Client(served.url) as client:
        assert (await _refusal(client.lookup(NS, "k"))).retry_after is None


async def test_an_error_info_of_another_domain_is_no_reason() -> None:
    fake = StatusServer(code=grpc.StatusCode.ABORTED, reason="LEASE_LOST", domain="other.v1")
    async with Served(fake) as served, Client(served.url) as client:
        error = await _refusal(client.lookup(NS, "k"))
    assert type(error) is TransportError and error.reason is None


async def test_a_deadline_is_indeterminate() -> None:
    fake = StatusServer(delay=2.0)
    async with Served(fake) as served, Client(served.url, timeout=0.2) as client:
        error = await _refusal(client.lookup(NS, "k"))
    assert type(error) is Unavailable and error.is_indeterminate
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
