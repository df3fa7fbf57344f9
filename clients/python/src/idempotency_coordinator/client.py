""":class:`Client`: the five calls of the contract on ``grpc.aio``, with Python types."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import grpc
import grpc.aio

from ._generated import coordinator_pb2 as pb
from ._generated import coordinator_pb2_grpc as pb_grpc
from .errors import TransportError, error_from_rpc
from .types import (
    ClaimOutcome,
    Completion,
    Duration,
    KeyView,
    Renewal,
    Stored,
    claim_outcome_from_pb,
    from_pb_timestamp,
    key_view_from_pb,
    seconds,
    to_pb_duration,
)

if TYPE_CHECKING:
    from .idempotent import Idempotent

__all__ = ["DEFAULT_CALL_TIMEOUT", "Client"]

#: How long a call may take unless told otherwise, in seconds (a waiting Claim adds its wait).
DEFAULT_CALL_TIMEOUT = 10.0

_VERSION = "0.1.0"

#: Channel options of the channels the client makes. The coordinator is on every request's path:
#: once it is back after an outage, the client must notice within a couple of seconds rather
#: than after gRPC's default reconnect backoff of up to two minutes.
DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.primary_user_agent", f"idempotency-coordinator-python/{_VERSION}"),
)

Metadata = tuple[tuple[str, str], ...]


class Client:
    """A client of the coordinator, on ``grpc.aio``.

    Build it from a target or from a channel you made::

        client = Client("http://127.0.0.1:50051")                     # plaintext
        client = Client("https://coordinator:50051", ca_file="ca.pem")   # TLS
        client = Client("https://coordinator:50051", ca_file="ca.pem",
                        cert_file="client.pem", key_file="client.key")   # mutual TLS
        client = Client(channel)                                        # your own channel

    - ``target``: ``http://host:port`` (plaintext), ``https://host:port`` (TLS, with the system's
      roots unless ``ca_file`` is given) or ``host:port`` (plaintext, or TLS when a TLS option is
      given).
    - ``ca_file``: PEM roots to verify the server with. ``cert_file`` and ``key_file``: the
      client's certificate chain and key (PEM), for mutual TLS; both or neither.
      ``tls_server_name``: the name the server's certificate must carry, when it is not the
      target's host.
    - ``token``: a bearer token, sent as ``authorization: Bearer <token>`` metadata on every call
      (a string, or a function returning the current one). It is sent on plaintext channels too:
      use TLS wherever the network is not trusted.
    - ``timeout``: the deadline of every call in seconds (10 s); a waiting Claim gets its wait on
      top. The server answers ``UNAVAILABLE`` / ``STORE_UNAVAILABLE`` a little before it when its
      store is slow.
    - ``options``: extra gRPC channel options for the channel the client makes.

    The channel is made lazily, on the first call, in the running event loop (and made again if
    the client is later used from another loop), so a client can be built at import time, before
    the ASGI server starts its loop. Calls never wait for a connection: while the coordinator
    cannot be reached they fail at once with :class:`~idempotency_coordinator.Unavailable`.
    """

    def __init__(
        self,
        target: str | grpc.aio.Channel,
        *,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        tls_server_name: str | None = None,
        token: str | Callable[[], str] | None = None,
        timeout: Duration = DEFAULT_CALL_TIMEOUT,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._timeout = seconds(timeout)
        self._token = token
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._make: Callable[[], grpc.aio.Channel] | None
        if isinstance(target, str):
            self._target = target
            if tls_server_name is not None:
                options = (*options, ("grpc.ssl_target_name_override", tls_server_name))
            self._make = _channel_maker(target, ca_file, cert_file, key_file, options)
        else:
            if ca_file or cert_file or key_file or tls_server_name or options:
                raise ValueError(
                    "TLS files and channel options apply to a channel the client makes, "
                    "not to one given to it"
                )
            self._target = "<channel>"
            self._make = None
            self._channel = target
            self._stub = pb_grpc.CoordinatorStub(target)

    @property
    def timeout(self) -> float:
        """The deadline of every call, in seconds."""
        return self._timeout

    def __repr__(self) -> str:
        return f"Client({self._target!r}, timeout={self._timeout})"

    async def close(self) -> None:
        """Closes the channel the client made (a channel given to it is the caller's to close)."""
        if self._make is not None and self._channel is not None:
            channel, self._channel, self._stub = self._channel, None, None
            await channel.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def _current_stub(self) -> Any:
        if self._make is not None:
            loop = asyncio.get_running_loop()
            if self._channel is None or self._loop is not loop:
                # A channel belongs to the loop it was made in; one left behind by a loop that
                # is gone cannot even be closed.
                self._channel = self._make()
                self._stub = pb_grpc.CoordinatorStub(self._channel)
                self._loop = loop
        return self._stub

    def _metadata(self) -> Metadata:
        token = self._token() if callable(self._token) else self._token
        if token is None:
            return ()
        return (("authorization", f"Bearer {token}"),)

    async def _call(self, method: str, request: object, extra: float = 0.0) -> Any:
        call = getattr(self._current_stub(), method)
        try:
            return await call(request, timeout=self._timeout + extra, metadata=self._metadata())
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error) from error
        except grpc.aio.UsageError as error:
            raise TransportError(f"the channel cannot be used: {error}") from error

    async def claim(
        self,
        namespace: str,
        key: str,
        *,
        fingerprint: bytes = b"",
        lease_ttl: Duration | None = None,
        retention: Duration | None = None,
        wait: Duration | None = None,
        request_id: str = "",
        owner: str = "",
    ) -> ClaimOutcome:
        """Claims ``key`` in ``namespace`` (empty: ``default``): a :class:`Grant` (you hold it), an
        :class:`InProgress` (someone else does) or a :class:`Replay` (it is completed).

        ``wait`` makes the server wait (up to its maximum, 60 s by default) for a running
        attempt; ``request_id`` makes a retried Claim get back the lease it already won (keep it
        unpredictable and secret)."""
        request = pb.ClaimRequest(
            namespace=namespace,
            key=key,
            fingerprint=fingerprint,
            request_id=request_id,
            owner=owner,
        )
        if lease_ttl is not None:
            request.lease_ttl.CopyFrom(to_pb_duration(lease_ttl))
        if retention is not None:
            request.retention.CopyFrom(to_pb_duration(retention))
        extra = 0.0
        if wait is not None:
            request.wait.CopyFrom(to_pb_duration(wait))
            extra = max(0.0, seconds(wait))
        reply = cast(pb.ClaimResponse, await self._call("Claim", request, extra))
        outcome = claim_outcome_from_pb(reply)
        if outcome is None:
            raise TransportError("a Claim reply without an outcome")
        return outcome

    async def complete(
        self,
        namespace: str,
        key: str,
        lease_token: str,
        response: Stored | None = None,
        *,
        retention: Duration | None = None,
    ) -> Completion:
        """Stores ``response`` as the key's outcome; only its current lease holder may. A repeated
        Complete with the same token returns the first result and keeps the first response."""
        request = pb.CompleteRequest(
            namespace=namespace,
            key=key,
            lease_token=lease_token,
            response=(response or Stored()).to_pb(),
        )
        if retention is not None:
            request.retention.CopyFrom(to_pb_duration(retention))
        reply = cast(pb.CompleteResponse, await self._call("Complete", request))
        return Completion(
            completed_at=from_pb_timestamp(reply.completed_at),
            expires_at=from_pb_timestamp(reply.expires_at),
            fencing_token=reply.fencing_token,
            already_completed=reply.already_completed,
        )

    async def renew(
        self,
        namespace: str,
        key: str,
        lease_token: str,
        *,
        lease_ttl: Duration | None = None,
    ) -> Renewal:
        """Sets the lease to end ``lease_ttl`` from now (unset: the server's default)."""
        request = pb.RenewRequest(namespace=namespace, key=key, lease_token=lease_token)
        if lease_ttl is not None:
            request.lease_ttl.CopyFrom(to_pb_duration(lease_ttl))
        reply = cast(pb.RenewResponse, await self._call("Renew", request))
        return Renewal(
            lease_expires_at=from_pb_timestamp(reply.lease_expires_at),
            fencing_token=reply.fencing_token,
        )

    async def release(self, namespace: str, key: str, lease_token: str) -> None:
        """Gives the key back after a mutation that failed without effect: it is claimable at
        once."""
        request = pb.ReleaseRequest(namespace=namespace, key=key, lease_token=lease_token)
        await self._call("Release", request)

    async def lookup(self, namespace: str, key: str) -> KeyView:
        """Reads a key without changing it."""
        request = pb.LookupRequest(namespace=namespace, key=key)
        reply = cast(pb.LookupResponse, await self._call("Lookup", request))
        return key_view_from_pb(reply)

    def idempotent(
        self,
        namespace: str,
        key: str,
        *,
        fingerprint: bytes = b"",
        lease_ttl: Duration | None = None,
        retention: Duration | None = None,
        wait: Duration = 0.0,
        owner: str = "",
        retry_for: Duration | None = None,
    ) -> Idempotent:
        """A mutation to run once for ``key`` in ``namespace``: see
        :class:`~idempotency_coordinator.Idempotent`."""
        from .idempotent import DEFAULT_RETRY_FOR, Idempotent

        return Idempotent(
            self,
            namespace,
            key,
            fingerprint=fingerprint,
            lease_ttl=lease_ttl,
            retention=retention,
            wait=wait,
            owner=owner,
            retry_for=DEFAULT_RETRY_FOR if retry_for is None else retry_for,
        )


def _read(path: str | Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def _channel_maker(
    target: str,
    ca_file: str | Path | None,
    cert_file: str | Path | None,
    key_file: str | Path | None,
    options: Sequence[tuple[str, Any]],
) -> Callable[[], grpc.aio.Channel]:
    if (cert_file is None) != (key_file is None):
        raise ValueError("mutual TLS needs both cert_file and key_file")
    tls_files = ca_file is not None or cert_file is not None
    if "://" in target:
        parts = urlsplit(target)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"the target must be http://host:port or https://host:port: {target!r}"
            )
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"the target must have no path or query: {target!r}")
        if parts.scheme == "http" and tls_files:
            raise ValueError("TLS files were given for an http:// (plaintext) target: use https://")
        address, tls = parts.netloc, parts.scheme == "https"
    else:
        address, tls = target, tls_files
    merged = dict(DEFAULT_CHANNEL_OPTIONS)
    merged.update(dict(options))
    channel_options = list(merged.items())
    if not tls:
        return lambda: grpc.aio.insecure_channel(address, options=channel_options)
    # Read the files now: a missing file is an error at construction, not at the first call.
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file),
        private_key=_read(key_file),
        certificate_chain=_read(cert_file),
    )
    return lambda: grpc.aio.secure_channel(address, credentials, options=channel_options)
