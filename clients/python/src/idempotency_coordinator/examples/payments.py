"""The payments API of the idempotency-keys article, on FastAPI with the ``Idempotency-Key``
middleware: ``POST /payments`` runs once per key (and tenant), every retry gets the stored
response. The same HTTP interface and flags as the Rust example
(``crates/client/examples/payments.rs``), checked by the same conformance suite::

    pip install "./clients/python[examples]"
    python -m idempotency_coordinator.examples.payments \\
        --listen 127.0.0.1:8081 --coordinator http://127.0.0.1:50051 \\
        [--work 200ms] [--wait 0s] [--lease-ttl 30s]

- ``POST /payments`` with ``Idempotency-Key`` and JSON ``{"amount": 100.00, "currency": "USD",
  "destination": "merchant-id-xyz"}`` → 201 with the payment after ``--work``. The tenant is the
  ``X-Tenant`` header (absent: one shared tenant): two tenants using one key get two payments.
  ``"simulate"`` drives the failure cases: ``"decline"`` → 402 (a final failure, stored);
  ``"bank_timeout"`` → 503 with ``Retry-After`` on the key's first attempt (released: the retry
  runs again as attempt 2); ``"crash"`` → on the key's first attempt the process aborts in the
  middle of the handler (the retry after the lease takes over as attempt 2).
- ``GET /payments`` → every payment this process created, with the fencing token and attempt it
  was created under, so that anyone can count executions.

Payments are kept in memory, and every write is fenced: a write carrying a fencing token lower
than the highest one seen for its key is refused, as a database shared by several API instances
would refuse a stale holder's late write.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from idempotency_coordinator import Client, Lease
from idempotency_coordinator.asgi import IdempotencyMiddleware, header_scope

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "sec": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
}


def parse_duration(text: str) -> float:
    """A duration as the Rust example reads it (humantime): ``300ms``, ``1s``, ``1m 30s``; in
    seconds."""
    parts = text.split()
    if not parts:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r}")
    total = 0.0
    for part in parts:
        match = re.fullmatch(r"([0-9]+)([a-zµ]+)", part)
        if match is None or match.group(2) not in _UNITS:
            raise argparse.ArgumentTypeError(f"not a duration (like 300ms, 1s, 5s): {text!r}")
        total += int(match.group(1)) * _UNITS[match.group(2)]
    return total


def parse_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r}")
    return host.strip("[]"), int(port)


class NewPayment(BaseModel):
    amount: float
    currency: str
    destination: str
    simulate: str | None = None


@dataclass
class Payment:
    payment_id: str
    key: str
    tenant: str | None
    amount: float
    currency: str
    destination: str
    fencing_token: int
    attempt: int


@dataclass
class Ledger:
    payments: list[Payment] = field(default_factory=list)
    #: The highest fencing token seen per tenant and key.
    fences: dict[tuple[str | None, str], int] = field(default_factory=dict)


def _header(request: Request, name: str) -> str | None:
    for header, value in request.scope.get("headers") or ():
        if header == name.encode():
            try:
                return bytes(value).decode("ascii")
            except UnicodeDecodeError:
                return None
    return None


def create_app(
    client: Client | None,
    *,
    work: float = 0.0,
    wait: float = 0.0,
    lease_ttl: float = 30.0,
) -> FastAPI:
    """The payments API; behind the middleware unless ``client`` is None (to measure what the
    middleware costs)."""
    app = FastAPI(title="payments example")
    ledger = Ledger()

    @app.post("/payments")
    async def create_payment(new: NewPayment, request: Request) -> JSONResponse:
        # Without the middleware (a measurement run) there is no lease: one attempt, no fencing.
        lease: Lease | None = getattr(request.state, "idempotency_lease", None)
        fencing_token, attempt = (0, 1) if lease is None else (lease.fencing_token, lease.attempt)
        first_attempt = attempt == 1
        if new.simulate == "decline":
            return JSONResponse(
                {"error": "card_declined", "message": "the card was declined"}, status_code=402
            )
        if new.simulate == "bank_timeout" and first_attempt:
            return JSONResponse(
                {"error": "bank_timeout", "message": "the bank did not answer; retry"},
                status_code=503,
                headers={"retry-after": "1"},
            )
        if new.simulate == "crash" and first_attempt:
            await asyncio.sleep(work / 2)
            print("crashing in the middle of the payment, as asked", file=sys.stderr, flush=True)
            os.abort()
        if work > 0:
            await asyncio.sleep(work)
        # The key as the middleware parsed it (a Structured Header String loses its quotes).
        key: str = getattr(request.state, "idempotency_key", "")
        tenant = _header(request, "x-tenant")
        # The fence: a holder whose lease was taken over must not write after the new holder.
        fence = ledger.fences.get((tenant, key), 0)
        if fencing_token < fence:
            return JSONResponse(
                {"error": "stale_attempt", "message": "a later attempt owns this payment"},
                status_code=409,
            )
        ledger.fences[(tenant, key)] = fencing_token
        payment = Payment(
            payment_id=f"pay_{uuid.uuid4().hex}",
            key=key,
            tenant=tenant,
            amount=new.amount,
            currency=new.currency,
            destination=new.destination,
            fencing_token=fencing_token,
            attempt=attempt,
        )
        ledger.payments.append(payment)
        return JSONResponse(
            {
                "payment_id": payment.payment_id,
                "amount": payment.amount,
                "currency": payment.currency,
                "destination": payment.destination,
                "status": "PENDING",
                "attempt": payment.attempt,
            },
            status_code=201,
        )

    @app.get("/payments")
    async def list_payments() -> dict[str, Any]:
        return {"payments": [asdict(payment) for payment in ledger.payments]}

    if client is not None:
        app.add_middleware(
            IdempotencyMiddleware,
            client=client,
            namespace="payments",
            scope=header_scope("x-tenant"),
            lease_ttl=lease_ttl,
            wait=wait,
            owner=f"payments-example-{os.getpid()}",
        )
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m idempotency_coordinator.examples.payments",
        description="The payments example API behind the Idempotency-Key middleware",
    )
    parser.add_argument(
        "--listen", type=parse_listen, default="127.0.0.1:8080", help="where to serve HTTP"
    )
    parser.add_argument(
        "--coordinator", default="http://127.0.0.1:50051", help="the idempotency coordinator"
    )
    parser.add_argument(
        "--work", type=parse_duration, default="0s", help="how long creating a payment takes"
    )
    parser.add_argument(
        "--wait",
        type=parse_duration,
        default="0s",
        help="how long a request that finds its key in progress waits for the first one "
        "(0: 409 at once)",
    )
    parser.add_argument(
        "--lease-ttl",
        type=parse_duration,
        default="30s",
        help="the lease of a running request (renewed while it runs)",
    )
    parser.add_argument("--without-layer", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    host, port = args.listen
    # The channel is made lazily on the first request, so that this API starts (and answers 503)
    # while the coordinator is down, and reconnects by itself when it is back.
    client = None if args.without_layer else Client(args.coordinator, timeout=5.0)
    app = create_app(client, work=args.work, wait=args.wait, lease_ttl=args.lease_ttl)
    print(
        f"payments example listening on http://{host}:{port} (coordinator {args.coordinator})",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
