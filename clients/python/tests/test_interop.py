"""The Python middleware and the Rust layer share a coordinator namespace: the Rust payments
example and the Python one, on one coordinator, replay each other's responses, which holds only
if both derive the same stored key (scope and key, or its SHA-256), the same fingerprint and the
same stored metadata.

Needs the Rust example (``cargo build -p idempotency-client --features http --example
payments``, or its path in ``IDEMPOTENCY_RUST_PAYMENTS_EXAMPLE``); skipped without it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests._support import REPO, CoordinatorProcess, free_port, key

EXAMPLE_ENV = "IDEMPOTENCY_RUST_PAYMENTS_EXAMPLE"


def _rust_example() -> Path | None:
    path = Path(os.environ.get(EXAMPLE_ENV) or REPO / "target" / "debug" / "examples" / "payments")
    return path if path.is_file() and os.access(path, os.X_OK) else None


class Example:
    def __init__(self, command: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [*command, "--listen", f"127.0.0.1:{self.port}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/payments", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{command[0]} did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)

    def post(self, key_header: str, body: str, tenant: str | None = None) -> httpx.Response:
        headers = {"Idempotency-Key": key_header, "content-type": "application/json"}
        if tenant is not None:
            headers["X-Tenant"] = tenant
        return httpx.post(f"{self.url}/payments", content=body, headers=headers, timeout=15)

    def payments(self, key: str) -> list[dict[str, object]]:
        listed = httpx.get(f"{self.url}/payments", timeout=5).json()["payments"]
        return [p for p in listed if p["key"] in (key, f'"{key}"')]


@pytest.fixture(scope="module")
def examples(coordinator: CoordinatorProcess) -> Iterator[tuple[Example, Example]]:
    rust = _rust_example()
    if rust is None:
        pytest.skip(
            "the Rust payments example is missing: `cargo build -p idempotency-client --features "
            f"http --example payments`, or name it in {EXAMPLE_ENV}"
        )
    coordinator_flag = ["--coordinator", coordinator.url]
    rust_example = Example([str(rust), *coordinator_flag])
    try:
        python_example = Example(
            [sys.executable, "-m", "idempotency_coordinator.examples.payments", *coordinator_flag]
        )
    except BaseException:
        rust_example.stop()
        raise
    yield rust_example, python_example
    rust_example.stop()
    python_example.stop()


def pay(amount: str = "100.00", simulate: str | None = None) -> str:
    extra = f', "simulate": "{simulate}"' if simulate else ""
    return f'{{"amount": {amount}, "currency": "USD", "destination": "merchant-id-xyz"{extra}}}'


def _same(replay: httpx.Response, first: httpx.Response) -> None:
    assert replay.status_code == first.status_code
    assert replay.content == first.content
    assert replay.headers["content-type"] == first.headers["content-type"]
    assert replay.headers.get_list("idempotent-replayed") == ["true"]


@pytest.mark.parametrize("first_is_rust", [True, False], ids=["rust-first", "python-first"])
@pytest.mark.parametrize(
    ("tenant", "key_length"),
    [(None, 40), ("acme", 40), ("tenant-with-a-long-name", 250)],
    ids=["no-tenant", "tenant", "hashed-key"],
)
def test_one_implementation_replays_the_others_response(
    examples: tuple[Example, Example], first_is_rust: bool, tenant: str | None, key_length: int
) -> None:
    rust, python = examples
    first_side, other_side = (rust, python) if first_is_rust else (python, rust)
    k = key("interop").ljust(key_length, "k")
    first = first_side.post(f'"{k}"', pay(), tenant)
    assert first.status_code == 201, first.text
    # The bare form of the key is the same key, on either side.
    replay = other_side.post(k, pay(), tenant)
    _same(replay, first)
    assert other_side.payments(k) == []
    reused = other_side.post(k, pay("250.00"), tenant)
    assert reused.status_code == 422
    assert reused.json()["type"] == "urn:idempotency:key-reused"
    # Another tenant is another key.
    other_tenant = other_side.post(k, pay(), "someone-else")
    assert other_tenant.status_code == 201


def test_a_final_failure_stored_by_python_replays_through_rust(
    examples: tuple[Example, Example],
) -> None:
    rust, python = examples
    k = key("declined")
    declined = python.post(k, pay(simulate="decline"))
    assert declined.status_code == 402
    _same(rust.post(k, pay(simulate="decline")), declined)
    k = key("declined")
    declined = rust.post(k, pay(simulate="decline"))
    _same(python.post(k, pay(simulate="decline")), declined)
