"""The FastAPI payments example in process (the conformance suite runs it as a process): the
middleware set up with ``add_middleware``, the lease in ``request.state``, fencing, the flags."""

from __future__ import annotations

import argparse

import httpx
import pytest

from idempotency_coordinator import Client
from idempotency_coordinator.examples.payments import create_app, parse_duration, parse_listen
from tests._support import key

PAY = '{"amount": 100.00, "currency": "USD", "destination": "merchant-id-xyz"%s}'


async def post(
    http: httpx.AsyncClient, k: str, simulate: str = "", **headers: str
) -> httpx.Response:
    body = PAY % (f', "simulate": "{simulate}"' if simulate else "")
    return await http.post(
        "/payments",
        content=body,
        headers={"Idempotency-Key": f'"{k}"', "content-type": "application/json", **headers},
    )


async def test_the_example_behind_the_middleware(client: Client) -> None:
    app = create_app(client)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://example.test") as http:
        k = key("pay")
        first = await post(http, k)
        assert first.status_code == 201
        created = first.json()
        assert created["payment_id"].startswith("pay_")
        assert (created["amount"], created["status"], created["attempt"]) == (100.0, "PENDING", 1)
        replay = await post(http, k)
        assert replay.content == first.content
        assert replay.headers["idempotent-replayed"] == "true"
        tenant = await post(http, k, **{"X-Tenant": "acme"})
        assert tenant.json()["payment_id"] != created["payment_id"]

        listed = (await http.get("/payments")).json()["payments"]
        mine = [p for p in listed if p["key"] == k]
        assert [p["tenant"] for p in mine] == [None, "acme"]
        assert all(p["fencing_token"] >= 1 and p["attempt"] == 1 for p in mine)

        timeout = key("timeout")
        first = await post(http, timeout, "bank_timeout")
        assert (first.status_code, first.headers["retry-after"]) == (503, "1")
        retry = await post(http, timeout, "bank_timeout")
        assert (retry.status_code, retry.json()["attempt"]) == (201, 2)

        declined = key("declined")
        first = await post(http, declined, "decline")
        assert (first.status_code, first.json()["error"]) == (402, "card_declined")
        again = await post(http, declined, "decline")
        assert again.content == first.content and again.headers["idempotent-replayed"] == "true"

        missing = await http.post("/payments", content=PAY % "")
        assert missing.status_code == 400


async def test_the_example_without_the_middleware() -> None:
    transport = httpx.ASGITransport(app=create_app(None))
    async with httpx.AsyncClient(transport=transport, base_url="http://example.test") as http:
        response = await http.post(
            "/payments", content=PAY % "", headers={"content-type": "application/json"}
        )
        assert (response.status_code, response.json()["attempt"]) == (201, 1)


def test_flags_read_as_the_rust_example_reads_them() -> None:
    assert parse_duration("0s") == 0
    assert parse_duration("300ms") == pytest.approx(0.3)
    assert parse_duration("1m 30s") == 90
    assert parse_listen("127.0.0.1:8081") == ("127.0.0.1", 8081)
    assert parse_listen("[::1]:80") == ("::1", 80)
    for bad in ("", "1.5s", "fast"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_duration(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_listen("8081")
