"""Fixtures: the coordinator binary (``target/debug/idempotency-coordinator`` of this repository,
or the path in ``IDEMPOTENCY_COORDINATOR_BINARY``) started by the tests themselves. Without it the
tests that need it are skipped with the reason, unless ``CI`` is set: then they fail."""

from __future__ import annotations

import os

# gRPC's C core logs every GOAWAY of a stopped test server at its default verbosity.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc.aio
import pytest

from idempotency_coordinator import Client
from idempotency_coordinator._generated import coordinator_pb2_grpc as pb_grpc
from tests._support import (
    BINARY_ENV,
    DEFAULT_BINARY,
    CoordinatorProcess,
    LossyProxy,
    Served,
    coordinator_binary,
)


@pytest.fixture(scope="session")
def binary() -> Path:
    found = coordinator_binary()
    if found is None:
        reason = (
            f"the coordinator binary is missing ({os.environ.get(BINARY_ENV) or DEFAULT_BINARY}): "
            f"build it with `cargo build -p idempotency-coordinator --bin idempotency-coordinator` "
            f"or name it in {BINARY_ENV}"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


@pytest.fixture(scope="session")
def coordinator(binary: Path) -> Iterator[CoordinatorProcess]:
    """One coordinator for the whole session; every test uses keys of its own."""
    process = CoordinatorProcess(binary)
    yield process
    process.stop()


@pytest.fixture
def start_coordinator(binary: Path) -> Iterator[Callable[..., CoordinatorProcess]]:
    """Starts a coordinator of the test's own, with extra flags (``--max-records 1``)."""
    started: list[CoordinatorProcess] = []

    def start(*extra: str) -> CoordinatorProcess:
        process = CoordinatorProcess(binary, extra)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
async def client(coordinator: CoordinatorProcess) -> AsyncIterator[Client]:
    async with Client(coordinator.url) as made:
        yield made


@pytest.fixture
async def proxy(coordinator: CoordinatorProcess) -> AsyncIterator[tuple[LossyProxy, Client]]:
    """A :class:`LossyProxy` in front of the session's coordinator, and a client through it."""
    async with grpc.aio.insecure_channel(coordinator.address) as upstream:
        lossy = LossyProxy(pb_grpc.CoordinatorStub(upstream))
        async with Served(lossy) as served, Client(served.url) as through:
            yield lossy, through
