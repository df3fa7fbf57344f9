"""What the tests share: the coordinator binary as a child process, a proxy in front of it that
loses replies on demand, and a fake coordinator that answers every call with a chosen status."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import grpc.aio
from google.protobuf import any_pb2
from google.rpc.error_details_pb2 import ErrorInfo, RetryInfo
from google.rpc.status_pb2 import Status

from idempotency_coordinator._generated import coordinator_pb2 as pb
from idempotency_coordinator._generated import coordinator_pb2_grpc as pb_grpc

#: clients/python/tests -> the repository's root.
REPO = Path(__file__).resolve().parents[3]
BINARY_ENV = "IDEMPOTENCY_COORDINATOR_BINARY"
DEFAULT_BINARY = REPO / "target" / "debug" / "idempotency-coordinator"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LISTEN = re.compile(r"listen=(\S+)")


def key(prefix: str = "k") -> str:
    """A key no earlier test used."""
    return f"{prefix}-{uuid.uuid4().hex}"


def coordinator_binary() -> Path | None:
    path = Path(os.environ.get(BINARY_ENV) or DEFAULT_BINARY)
    return path if path.is_file() and os.access(path, os.X_OK) else None


class CoordinatorProcess:
    """The real coordinator: ``<binary> --listen 127.0.0.1:0 --data-dir <tmp> --drain-delay 0s``,
    ready once it logs ``serving listen=…`` on stderr (which gives its address)."""

    def __init__(self, binary: Path, extra: Sequence[str] = ()) -> None:
        self.data_dir = Path(tempfile.mkdtemp(prefix="idempotency-python-tests-"))
        self.log: list[str] = []
        self._ready = threading.Event()
        self.address = ""
        env = dict(os.environ, NO_COLOR="1", RUST_LOG="info")
        self.process = subprocess.Popen(
            [
                str(binary),
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                str(self.data_dir / "data"),
                "--drain-delay",
                "0s",
                *extra,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + 30
        while not self._ready.wait(0.05):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the coordinator did not start:\n" + "\n".join(self.log[-20:]))

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            line = _ANSI.sub("", raw.decode(errors="replace")).rstrip()
            self.log.append(line)
            if "serving" in line and (found := _LISTEN.search(line)):
                self.address = found.group(1)
                self._ready.set()

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        shutil.rmtree(self.data_dir, ignore_errors=True)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _lose(counter: list[int]) -> bool:
    if counter[0] > 0:
        counter[0] -= 1
        return True
    return False


@dataclass
class LossyProxy(pb_grpc.CoordinatorServicer):  # type: ignore[misc]
    """Forwards every call to the coordinator; drops the reply of the next ``lose_claim_replies``
    Claims or ``lose_complete_replies`` Completes after they were applied (answering
    UNAVAILABLE), as a network that loses replies would; refuses Renews (UNAVAILABLE, without
    forwarding) while ``fail_renewals`` is set. Counts calls and keeps what they carried."""

    upstream: Any
    lose_claim_replies: list[int] = field(default_factory=lambda: [0])
    lose_complete_replies: list[int] = field(default_factory=lambda: [0])
    fail_renewals: bool = False
    claims: list[pb.ClaimRequest] = field(default_factory=list)
    completes: int = 0
    renews: int = 0
    releases: int = 0
    metadata: list[dict[str, str]] = field(default_factory=list)

    def _seen(self, context: Any) -> None:
        self.metadata.append(dict(context.invocation_metadata() or ()))

    async def Claim(self, request: pb.ClaimRequest, context: Any) -> pb.ClaimResponse:  # noqa: N802
        self._seen(context)
        self.claims.append(request)
        reply = cast(pb.ClaimResponse, await self._forward(self.upstream.Claim, request, context))
        if _lose(self.lose_claim_replies):
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the reply was lost")
        return reply

    async def Complete(self, request: pb.CompleteRequest, context: Any) -> pb.CompleteResponse:  # noqa: N802
        self._seen(context)
        self.completes += 1
        reply = cast(
            pb.CompleteResponse, await self._forward(self.upstream.Complete, request, context)
        )
        if _lose(self.lose_complete_replies):
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the reply was lost")
        return reply

    async def Renew(self, request: pb.RenewRequest, context: Any) -> pb.RenewResponse:  # noqa: N802
        self._seen(context)
        self.renews += 1
        if self.fail_renewals:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "renewals are cut off")
        return cast(pb.RenewResponse, await self._forward(self.upstream.Renew, request, context))

    async def Release(self, request: pb.ReleaseRequest, context: Any) -> pb.ReleaseResponse:  # noqa: N802
        self._seen(context)
        self.releases += 1
        return cast(
            pb.ReleaseResponse, await self._forward(self.upstream.Release, request, context)
        )

    async def Lookup(self, request: pb.LookupRequest, context: Any) -> pb.LookupResponse:  # noqa: N802
        self._seen(context)
        return cast(pb.LookupResponse, await self._forward(self.upstream.Lookup, request, context))

    @staticmethod
    async def _forward(method: Any, request: Any, context: Any) -> Any:
        timeout = context.time_remaining()
        try:
            return await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            # Pass the upstream status on as it was, details included.
            await context.abort(
                error.code(),
                error.details() or "",
                trailing_metadata=tuple(error.trailing_metadata() or ()),
            )
            raise  # unreachable: abort raises


class Served:
    """A grpc.aio server on a free local port, serving ``servicer``."""

    def __init__(self, servicer: Any, credentials: grpc.ServerCredentials | None = None) -> None:
        self.servicer = servicer
        self.server = grpc.aio.server()
        pb_grpc.add_CoordinatorServicer_to_server(servicer, self.server)
        if credentials is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self.server.add_secure_port("127.0.0.1:0", credentials)

    async def __aenter__(self) -> Served:
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop(grace=None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def status_details(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    metadata: dict[str, str],
    domain: str,
    retry_after: float | None = None,
) -> bytes:
    details = [any_pb2.Any()]
    details[0].Pack(ErrorInfo(reason=reason, domain=domain, metadata=metadata))
    if retry_after is not None:
        retry = RetryInfo()
        retry.retry_delay.FromNanoseconds(int(retry_after * 1e9))
        details.append(any_pb2.Any())
        details[1].Pack(retry)
    return Status(code=code.value[0], message=message, details=details).SerializeToString()


@dataclass
class StatusServer(pb_grpc.CoordinatorServicer):  # type: ignore[misc]
    """A fake coordinator: every call fails with ``code`` and, when ``reason`` is set, an
    ``ErrorInfo`` of ``domain``; or sleeps ``delay`` first. Keeps the metadata calls carried."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str | None = None
    info_metadata: dict[str, str] = field(default_factory=dict)
    domain: str = "idempotency.v1"
    retry_after: float | None = None
    delay: float = 0.0
    metadata: list[dict[str, str]] = field(default_factory=list)

    async def _fail(self, context: Any) -> Any:
        self.metadata.append(dict(context.invocation_metadata() or ()))
        if self.delay:
            await asyncio.sleep(self.delay)
        trailing: tuple[tuple[str, bytes], ...] = ()
        if self.reason is not None:
            details = status_details(
                self.code,
                "refused",
                self.reason,
                self.info_metadata,
                self.domain,
                self.retry_after,
            )
            trailing = (("grpc-status-details-bin", details),)
        await context.abort(self.code, "refused", trailing_metadata=trailing)

    async def Claim(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._fail(context)

    async def Complete(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._fail(context)

    async def Renew(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._fail(context)

    async def Release(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._fail(context)

    async def Lookup(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._fail(context)
