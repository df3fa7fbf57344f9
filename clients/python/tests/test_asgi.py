"""The ASGI middleware on a small Starlette application, through httpx's ASGI transport, against
the real coordinator: what is stored and replayed, the store policy, responses too large to
store, optional keys, methods, the lease in the request, failures and disconnects."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from idempotency_coordinator import Client, KeyState, Lease
from idempotency_coordinator.asgi import (
    IdempotencyMiddleware,
    Problem,
    StorePolicy,
    encoded_size,
    fingerprint,
    header_scope,
    key_of,
    stored_key,
)
from idempotency_coordinator.types import Stored
from tests._support import free_port, key

NS = "asgi-tests"


class Handlers:
    """A Starlette application that counts what it ran and shows the lease it ran under."""

    def __init__(self) -> None:
        self.runs = 0
        self.leases: list[Lease | None] = []
        self.keys: list[str | None] = []
        self.release_gate = asyncio.Event()
        self.release_gate.set()
        self.cancelled = 0
        self.fail_next = False
        self.started = asyncio.Event()

    async def pay(self, request: Request) -> Response:
        self.runs += 1
        self.started.set()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the handler failed halfway")
        lease: Lease | None = getattr(request.state, "idempotency_lease", None)
        self.leases.append(lease)
        self.keys.append(getattr(request.state, "idempotency_key", None))
        payload = await request.body()
        try:
            await self.release_gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return JSONResponse(
            {
                "run": self.runs,
                "got": payload.decode(),
                "fencing_token": lease.fencing_token if lease else None,
                "attempt": lease.attempt if lease else None,
                "takeover": lease.takeover if lease else None,
            },
            status_code=201,
            headers={"x-trace": f"run-{self.runs}", "etag": f'"{self.runs}"'},
        )

    async def status(self, request: Request) -> Response:
        self.runs += 1
        code = int(request.path_params["code"])
        return Response(f"status {code} run {self.runs}", status_code=code)

    async def big(self, request: Request) -> Response:
        self.runs += 1
        size = int(request.query_params["size"])
        return Response(b"x" * size, media_type="application/octet-stream")

    async def stream(self, request: Request) -> Response:
        self.runs += 1
        size = int(request.query_params["size"])

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(size // 65536):
                yield b"y" * 65536

        return StreamingResponse(chunks(), media_type="application/octet-stream")

    async def boom(self, request: Request) -> Response:
        self.runs += 1
        raise RuntimeError("the handler failed halfway")

    async def with_background_failure(self, request: Request) -> Response:
        self.runs += 1

        async def fail() -> None:
            raise RuntimeError("the background task failed")

        return JSONResponse({"run": self.runs}, status_code=201, background=BackgroundTask(fail))

    async def links(self, request: Request) -> Response:
        self.runs += 1
        response = Response(b"linked", status_code=202, media_type="text/plain")
        response.raw_headers += [(b"link", b"</a>; rel=a"), (b"link", b"</b>; rel=b")]
        return response

    def app(self, middleware: Sequence[Middleware] = ()) -> Starlette:
        return Starlette(
            middleware=list(middleware),
            routes=[
                Route("/pay", self.pay, methods=["POST", "PUT", "PATCH", "GET"]),
                Route("/status/{code}", self.status, methods=["POST"]),
                Route("/big", self.big, methods=["POST"]),
                Route("/stream", self.stream, methods=["POST"]),
                Route("/boom", self.boom, methods=["POST"]),
                Route("/background", self.with_background_failure, methods=["POST"]),
                Route("/links", self.links, methods=["POST"]),
            ],
        )


Build = Callable[..., tuple[Handlers, httpx.AsyncClient]]


@pytest.fixture
async def build(client: Client) -> AsyncIterator[Build]:
    """Builds the application behind the middleware (options as keyword arguments) and an httpx
    client that talks to it in process."""
    made: list[httpx.AsyncClient] = []

    def make(
        raise_app_exceptions: bool = True, **options: Any
    ) -> tuple[Handlers, httpx.AsyncClient]:
        handlers = Handlers()
        options.setdefault("client", client)
        options.setdefault("namespace", NS)
        # As Starlette (and FastAPI's add_middleware) installs it: inside ServerErrorMiddleware.
        app = handlers.app([Middleware(IdempotencyMiddleware, **options)])
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
        http = httpx.AsyncClient(transport=transport, base_url="http://api.test")
        made.append(http)
        return handlers, http

    yield make
    for http in made:
        await http.aclose()


def problem_of(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"] == "application/problem+json"
    document: dict[str, Any] = response.json()
    assert document["status"] == response.status_code
    assert isinstance(document["title"], str) and isinstance(document["detail"], str)
    return document


async def test_a_first_request_is_stored_and_retries_replay_it(
    build: Build, client: Client
) -> None:
    handlers, http = build()
    k = key()
    # A Structured Header String: the handler gets the key without its quotes.
    first = await http.post("/pay", content=b'{"amount": 1}', headers={"Idempotency-Key": f'"{k}"'})
    assert first.status_code == 201
    assert "idempotent-replayed" not in first.headers
    assert handlers.keys == [k]
    for header in (f'"{k}"', k, f' "{k}"\t'):
        retry = await http.post(
            "/pay", content=b'{"amount": 1}', headers={"Idempotency-Key": header}
        )
        assert retry.status_code == 201
        assert retry.content == first.content
        assert retry.headers["content-type"] == first.headers["content-type"]
        assert retry.headers["etag"] == first.headers["etag"]
        assert "x-trace" not in retry.headers, "only the stored headers replay"
        assert retry.headers.get_list("idempotent-replayed") == ["true"]
    assert handlers.runs == 1
    # The lease the handler ran under, in request.state.
    lease = handlers.leases[0]
    assert isinstance(lease, Lease)
    shown = first.json()
    assert (shown["attempt"], shown["takeover"]) == (1, False)
    assert shown["fencing_token"] == lease.fencing_token >= 1
    # Stored under the scope and the key, in the Rust layer's format.
    view = await client.lookup(NS, f"0:{k}")
    assert view.state is KeyState.COMPLETED
    assert view.response is not None
    assert view.response.metadata == {
        "status": "201",
        "header:content-type": "application/json",
        "header:etag": '"1"',
    }


async def test_a_header_with_several_values_is_stored_and_replayed_whole(
    build: Build, client: Client
) -> None:
    handlers, http = build()
    k = key()
    first = await http.post("/links", headers={"Idempotency-Key": k})
    retry = await http.post("/links", headers={"Idempotency-Key": k})
    assert retry.status_code == 202
    assert retry.headers.get_list("link") == ["</a>; rel=a", "</b>; rel=b"]
    assert retry.headers.get_list("link") == first.headers.get_list("link")
    view = await client.lookup(NS, f"0:{k}")
    assert view.response is not None
    assert view.response.metadata["header:link"] == "</a>; rel=a\n</b>; rel=b"
    assert handlers.runs == 1


async def test_the_same_key_with_another_request_is_422(build: Build) -> None:
    handlers, http = build()
    k = key()
    assert (
        await http.post("/pay", content=b"a", headers={"Idempotency-Key": k})
    ).status_code == 201
    others: list[tuple[bytes, dict[str, str], dict[str, str]]] = [
        (b"b", {}, {}),
        (b"a", {"q": "1"}, {}),
        (b"a", {}, {"content-type": "text/plain"}),
    ]
    for content, params, extra in others:
        headers = {"Idempotency-Key": k, **extra}
        reused = await http.post("/pay", content=content, params=params, headers=headers)
        assert reused.status_code == 422
        assert problem_of(reused)["type"] == "urn:idempotency:key-reused"
    assert handlers.runs == 1


async def test_missing_and_invalid_keys_are_400_and_run_nothing(build: Build) -> None:
    handlers, http = build()
    missing = await http.post("/pay", content=b"a")
    assert missing.status_code == 400
    assert problem_of(missing)["type"] == "urn:idempotency:key-missing"
    assert problem_of(missing)["detail"] == "POST requires an Idempotency-Key"
    for value in ['""', "", '"abc', '"a"b"', "a b", '"a\\x"', "k" * 256, '"' + "k" * 256 + '"']:
        invalid = await http.post("/pay", content=b"a", headers={"Idempotency-Key": value})
        assert invalid.status_code == 400, value
        assert problem_of(invalid)["type"] == "urn:idempotency:key-invalid"
    twice = await http.post(
        "/pay", content=b"a", headers=[("Idempotency-Key", "a"), ("Idempotency-Key", "a")]
    )
    assert twice.status_code == 400
    assert problem_of(twice)["detail"] == "Idempotency-Key was sent more than once"
    assert handlers.runs == 0


async def test_a_body_over_the_limit_is_413_before_anything_is_claimed(
    build: Build, client: Client
) -> None:
    handlers, http = build(body_limit=1000)
    k = key()
    large = await http.post("/pay", content=b"x" * 1001, headers={"Idempotency-Key": k})
    assert large.status_code == 413
    assert problem_of(large)["type"] == "urn:idempotency:body-too-large"

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"x" * 400

    streamed = await http.post("/pay", content=chunked(), headers={"Idempotency-Key": k})
    assert streamed.status_code == 413
    with pytest.raises(Exception, match="KEY_NOT_FOUND"):
        await client.lookup(NS, f"0:{k}")
    exact = await http.post("/pay", content=b"x" * 1000, headers={"Idempotency-Key": k})
    assert exact.status_code == 201
    assert handlers.runs == 1


@pytest.mark.parametrize(
    ("status", "stored"),
    [(200, True), (201, True), (400, True), (402, True), (500, True), (502, True),
     (408, False), (425, False), (429, False), (503, False)],
)  # fmt: skip
async def test_the_default_store_policy(build: Build, status: int, stored: bool) -> None:
    handlers, http = build()
    k = key()
    first = await http.post(f"/status/{status}", headers={"Idempotency-Key": k})
    assert first.status_code == status
    assert "idempotent-replayed" not in first.headers
    retry = await http.post(f"/status/{status}", headers={"Idempotency-Key": k})
    assert retry.status_code == status
    if stored:
        assert retry.content == first.content
        assert retry.headers["idempotent-replayed"] == "true"
        assert handlers.runs == 1
    else:
        assert retry.content == f"status {status} run 2".encode()
        assert "idempotent-replayed" not in retry.headers
        assert handlers.runs == 2


async def test_a_store_policy_decides_per_response(build: Build) -> None:
    seen: list[tuple[int, list[tuple[str, str]]]] = []

    def policy(status: int, headers: Any) -> StorePolicy:
        seen.append((status, list(headers)))
        return StorePolicy.STORE if status == 503 else StorePolicy.RELEASE

    handlers, http = build(store_policy=policy)
    for status, replayed in ((503, True), (201, False)):
        k = key()
        await http.post(f"/status/{status}", headers={"Idempotency-Key": k})
        retry = await http.post(f"/status/{status}", headers={"Idempotency-Key": k})
        assert ("idempotent-replayed" in retry.headers) is replayed
    assert handlers.runs == 3
    assert seen[0][0] == 503 and ("content-length", "16") in seen[0][1]


@pytest.mark.parametrize("path", ["/big", "/stream"])
async def test_a_response_too_large_to_store_reaches_its_caller_whole(
    build: Build, path: str
) -> None:
    handlers, http = build()
    k = key()
    size = 2 * 1024 * 1024
    first = await http.post(f"{path}?size={size}", headers={"Idempotency-Key": k})
    assert first.status_code == 200
    assert len(first.content) == size
    assert "idempotent-replayed" not in first.headers
    retry = await http.post(f"{path}?size={size}", headers={"Idempotency-Key": k})
    assert retry.status_code == 500
    assert retry.headers["idempotent-replayed"] == "true"
    problem = problem_of(retry)
    assert problem["type"] == "urn:idempotency:response-not-stored"
    assert problem["title"] == "The response could not be stored"
    assert handlers.runs == 1


async def test_a_response_over_the_limit_streams_through_while_the_application_runs(
    client: Client,
) -> None:
    # Past the limit the response is not held back: its start reaches the client while the
    # application still produces the rest (memory stays bounded by the limit).
    more = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"z" * 2000, "more_body": True})
        await more.wait()
        await send({"type": "http.response.body", "body": b"end", "more_body": False})

    sent: list[dict[str, Any]] = []
    middleware = IdempotencyMiddleware(app, client=client, namespace=NS, response_limit=1000)
    messages = [{"type": "http.request", "body": b"", "more_body": False}]
    done = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "raw_path": b"/", "query_string": b""}
    scope["headers"] = [(b"idempotency-key", key().encode())]
    served = asyncio.create_task(middleware(scope, receive, send))
    for _ in range(200):
        if sent:
            break
        await asyncio.sleep(0.01)
    assert [message["type"] for message in sent] == ["http.response.start", "http.response.body"]
    assert sent[1]["body"] == b"z" * 2000 and sent[1]["more_body"]
    more.set()
    await asyncio.wait_for(served, 5)
    done.set()
    assert sent[-1] == {"type": "http.response.body", "body": b"end", "more_body": False}


async def test_a_response_whose_stored_form_is_over_the_limit_is_not_stored_either(
    build: Build,
) -> None:
    # The body fits the limit, its metadata does not: the stored form is what counts.
    handlers, http = build(response_limit=1000)
    k = key()
    first = await http.post("/big?size=990", headers={"Idempotency-Key": k})
    assert (first.status_code, len(first.content)) == (200, 990)
    retry = await http.post("/big?size=990", headers={"Idempotency-Key": k})
    assert retry.status_code == 500
    assert problem_of(retry)["type"] == "urn:idempotency:response-not-stored"
    fits = key()
    await http.post("/big?size=900", headers={"Idempotency-Key": fits})
    again = await http.post("/big?size=900", headers={"Idempotency-Key": fits})
    assert (again.status_code, len(again.content)) == (200, 900)
    assert again.headers["idempotent-replayed"] == "true"
    assert handlers.runs == 2


def test_encoded_size_counts_as_protobuf_does() -> None:
    from idempotency_coordinator._generated import coordinator_pb2 as pb

    for stored in (
        Stored(),
        Stored(b"x" * 300, {"status": "201"}),
        Stored(b"", {"header:content-type": "application/json", "status": "500"}),
        Stored(b"y" * 70000, {"k" * 200: "v" * 20000}),
    ):
        assert (
            encoded_size(stored)
            == pb.Response(body=stored.body, metadata=stored.metadata).ByteSize()
        )


async def test_optional_keys_pass_through(build: Build) -> None:
    handlers, http = build(key_required=False)
    for _ in range(2):
        response = await http.post("/pay", content=b"a")
        assert response.status_code == 201
        assert response.json()["fencing_token"] is None, "no lease without a key"
    k = key()
    await http.post("/pay", content=b"a", headers={"Idempotency-Key": k})
    retry = await http.post("/pay", content=b"a", headers={"Idempotency-Key": k})
    assert retry.headers["idempotent-replayed"] == "true"
    assert handlers.runs == 3


async def test_only_the_configured_methods_are_covered(build: Build) -> None:
    handlers, http = build()
    assert (await http.put("/pay", content=b"a")).status_code == 201
    assert (await http.get("/pay")).status_code == 201
    assert (await http.patch("/pay", content=b"a")).status_code == 400
    handlers, http = build(methods=["PUT"])
    assert (await http.post("/pay", content=b"a")).status_code == 201
    assert (await http.patch("/pay", content=b"a")).status_code == 201
    assert (await http.put("/pay", content=b"a")).status_code == 400
    k = key()
    await http.put("/pay", content=b"a", headers={"Idempotency-Key": k})
    again = await http.put("/pay", content=b"a", headers={"Idempotency-Key": k})
    assert again.headers["idempotent-replayed"] == "true"
    assert handlers.runs == 3


async def test_scopes_keep_tenants_apart_and_fingerprinted_headers_count(build: Build) -> None:
    handlers, http = build(
        scope=header_scope("x-tenant"),
        fingerprint_headers=["x-currency"],
        store_headers=["x-trace"],
    )
    k = key()
    a = await http.post("/pay", content=b"a", headers={"Idempotency-Key": k, "X-Tenant": "acme"})
    b = await http.post(
        "/pay", content=b"a", headers={"Idempotency-Key": k, "X-Tenant": "umbrella"}
    )
    assert a.json()["run"] != b.json()["run"]
    again = await http.post(
        "/pay", content=b"a", headers={"Idempotency-Key": k, "X-Tenant": "acme"}
    )
    assert again.content == a.content
    assert again.headers["x-trace"] == a.headers["x-trace"], "an added stored header replays"
    other = await http.post(
        "/pay",
        content=b"a",
        headers={"Idempotency-Key": k, "X-Tenant": "acme", "X-Currency": "EUR"},
    )
    assert other.status_code == 422
    assert handlers.runs == 2


async def test_a_key_in_progress_is_409_with_retry_after_or_waited_for(build: Build) -> None:
    handlers, http = build()
    handlers.release_gate.clear()
    k = key()
    first = asyncio.create_task(http.post("/pay", content=b"a", headers={"Idempotency-Key": k}))
    await asyncio.wait_for(handlers.started.wait(), 5)
    busy = await http.post("/pay", content=b"a", headers={"Idempotency-Key": k})
    assert busy.status_code == 409
    assert problem_of(busy)["type"] == "urn:idempotency:in-progress"
    assert int(busy.headers["retry-after"]) >= 1
    handlers.release_gate.set()
    assert (await first).status_code == 201

    handlers, http = build(wait=5)
    handlers.release_gate.clear()
    k = key()
    first = asyncio.create_task(http.post("/pay", content=b"a", headers={"Idempotency-Key": k}))
    await asyncio.wait_for(handlers.started.wait(), 5)
    waiting = asyncio.create_task(http.post("/pay", content=b"a", headers={"Idempotency-Key": k}))
    await asyncio.sleep(0.3)
    handlers.release_gate.set()
    done, waited = await first, await waiting
    assert waited.content == done.content and waited.headers["idempotent-replayed"] == "true"
    assert handlers.runs == 1


async def test_a_handler_exception_leaves_the_lease_to_lapse(build: Build, client: Client) -> None:
    handlers, http = build(lease_ttl=0.3)
    handlers.fail_next = True
    k = key()
    with pytest.raises(RuntimeError, match="halfway"):
        await http.post("/pay", content=b"a", headers={"Idempotency-Key": k})
    assert (await client.lookup(NS, f"0:{k}")).state is KeyState.IN_PROGRESS, "not released"
    busy = await http.post("/pay", content=b"a", headers={"Idempotency-Key": k})
    assert busy.status_code == 409
    await asyncio.sleep(0.4)
    retry = await http.post("/pay", content=b"a", headers={"Idempotency-Key": k})
    assert retry.status_code == 201
    shown = retry.json()
    assert (shown["attempt"], shown["takeover"]) == (2, True)
    assert handlers.runs == 2

    # Behind a server that turns exceptions into 500s, the 500 is not stored either.
    handlers, http = build(raise_app_exceptions=False)
    k = key()
    response = await http.post("/boom", headers={"Idempotency-Key": k})
    assert response.status_code == 500
    assert (await client.lookup(NS, f"0:{k}")).state is KeyState.IN_PROGRESS


async def test_an_exception_after_the_whole_response_keeps_the_response(build: Build) -> None:
    handlers, http = build()
    k = key()
    with pytest.raises(RuntimeError, match="background"):
        await http.post("/background", headers={"Idempotency-Key": k})
    handlers, http = build(raise_app_exceptions=False)
    retry = await http.post("/background", headers={"Idempotency-Key": k})
    assert (retry.status_code, retry.json()) == (201, {"run": 1})
    assert retry.headers["idempotent-replayed"] == "true"
    assert handlers.runs == 0


async def test_a_takeover_after_a_lapsed_lease_shows_in_the_lease(
    build: Build, client: Client
) -> None:
    handlers, http = build()
    k = key()
    await client.claim(NS, f"0:{k}", lease_ttl=0.1)
    await asyncio.sleep(0.2)
    response = await http.post("/pay", content=b"a", headers={"Idempotency-Key": k})
    assert response.status_code == 201
    shown = response.json()
    assert (shown["attempt"], shown["takeover"]) == (2, True)
    assert handlers.leases[0] is not None and handlers.leases[0].takeover


async def test_the_coordinator_unreachable_is_503_and_nothing_runs(build: Build) -> None:
    unreachable = Client(f"http://127.0.0.1:{free_port()}")
    handlers, http = build(client=unreachable, retry_for=0.3)
    response = await http.post("/pay", content=b"a", headers={"Idempotency-Key": key()})
    assert response.status_code == 503
    assert problem_of(response)["type"] == "urn:idempotency:unavailable"
    assert response.headers["retry-after"] == "1"
    assert handlers.runs == 0
    await unreachable.close()


async def test_a_refusal_of_the_services_own_request_is_a_500_not_a_503(build: Build) -> None:
    # A lease longer than the server allows: this API's configuration, which no retry fixes.
    handlers, http = build(lease_ttl=100 * 3600)
    response = await http.post("/pay", content=b"a", headers={"Idempotency-Key": key()})
    assert response.status_code == 500
    assert problem_of(response)["type"] == "urn:idempotency:misconfigured"
    assert "retry-after" not in response.headers
    assert handlers.runs == 0


async def test_a_client_that_goes_away_leaves_the_lease_to_lapse(client: Client) -> None:
    handlers = Handlers()
    handlers.release_gate.clear()
    app = IdempotencyMiddleware(handlers.app(), client=client, namespace=NS, lease_ttl=0.3)
    k = key()
    gone = asyncio.Event()
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": b"a", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/pay",
        "raw_path": b"/pay",
        "query_string": b"",
        "headers": [(b"idempotency-key", k.encode())],
    }
    served = asyncio.create_task(app(scope, receive, send))
    await asyncio.wait_for(handlers.started.wait(), 5)
    gone.set()
    await asyncio.wait_for(served, 5)
    assert sent == [], "nobody to answer"
    assert handlers.cancelled == 1, "the handler was stopped"
    assert (await client.lookup(NS, f"0:{k}")).state is KeyState.IN_PROGRESS, "not released"
    await asyncio.sleep(0.4)
    assert (await client.lookup(NS, f"0:{k}")).state is KeyState.LEASE_EXPIRED


# -------------------------------------------------------------------------------------------------
# The bytes shared with the Rust layer
# -------------------------------------------------------------------------------------------------


def test_keys_parse_as_structured_strings_or_bare_values() -> None:
    def parse(*values: str) -> str:
        return key_of([(b"idempotency-key", value.encode()) for value in values])

    assert parse('"abc"') == "abc"
    assert parse("8e03978e-40d5-43e8-bc93-6894a57f9324") == "8e03978e-40d5-43e8-bc93-6894a57f9324"
    assert parse('"a \\"quoted\\" key"') == 'a "quoted" key'
    assert parse('"with\\\\backslash"') == "with\\backslash"
    assert parse(' "padded" ') == "padded"
    assert parse("k" * 255) == "k" * 255
    for bad in ('""', "", '"abc', '"a"b"', "a b", '"a\\x"', 'a"b', "k" * 256, "caf\xe9"):
        with pytest.raises(Exception):  # noqa: B017, PT011
            parse(bad)
    with pytest.raises(Exception):  # noqa: B017, PT011
        parse("a", "b")
    with pytest.raises(Exception):  # noqa: B017, PT011
        key_of([])


def test_stored_keys_keep_scopes_apart_and_stay_within_the_limit() -> None:
    assert stored_key(None, "k") == "0:k"
    assert stored_key("", "k") == "0:k"
    assert stored_key("acme", "k") == "4:acmek"
    assert stored_key("é", "k") == "2:ék", "the length is in bytes"
    assert stored_key("ab", "c") != stored_key("a", "bc")
    long = stored_key("tenant", "k" * 255)
    plain = "6:tenant" + "k" * 255
    assert long == "sha256:" + hashlib.sha256(plain.encode()).hexdigest()
    assert len(long) == 71
    assert stored_key("a\nb", "k").startswith("sha256:")
    assert stored_key("a\x85b", "k").startswith("sha256:"), "C1 controls too, as Rust's is_control"
    assert stored_key(None, "k" * 253) == "0:" + "k" * 253
    assert stored_key(None, "k" * 254).startswith("sha256:")


def test_the_fingerprint_is_length_prefixed_fields() -> None:
    def field(data: bytes) -> bytes:
        return len(data).to_bytes(8, "big") + data

    headers = [
        (b"content-type", b"application/json"),
        (b"x-a", b"1"),
        (b"X-A", b"2"),
        (b"x-b", b"3"),
    ]
    expected = hashlib.sha256(
        field(b"POST")
        + field(b"/payments?x=1")
        + field(b"content-type")
        + field(b"application/json")
        + field(b"x-a")
        + field(b"1")
        + field(b"2")
        + field(b"x-missing")
        + field(b'{"a":1}')
    ).digest()
    got = fingerprint("POST", b"/payments?x=1", headers, b'{"a":1}', ["X-A", "x-missing"])
    assert got == expected
    # A known vector: POST /payments, application/json, {} (no other headers).
    assert (
        fingerprint("POST", b"/payments", [(b"content-type", b"application/json")], b"{}").hex()
        == hashlib.sha256(
            b"\0\0\0\0\0\0\0\x04POST\0\0\0\0\0\0\0\x09/payments\0\0\0\0\0\0\0\x0ccontent-type"
            b"\0\0\0\0\0\0\0\x10application/json\0\0\0\0\0\0\0\x02{}"
        ).hexdigest()
    )


def test_problems_are_the_rust_layers() -> None:
    assert {problem.type_uri: (problem.status, problem.title) for problem in Problem} == {
        "urn:idempotency:key-missing": (400, "Idempotency-Key is missing"),
        "urn:idempotency:key-invalid": (400, "Idempotency-Key is invalid"),
        "urn:idempotency:body-too-large": (413, "The request body is too large"),
        "urn:idempotency:key-reused": (422, "Idempotency-Key reused with another request"),
        "urn:idempotency:in-progress": (409, "A request with this Idempotency-Key is in progress"),
        "urn:idempotency:lease-lost": (409, "Another attempt took this request over"),
        "urn:idempotency:unavailable": (503, "Idempotency service unavailable"),
        "urn:idempotency:misconfigured": (500, "Idempotency service misconfigured"),
        "urn:idempotency:body-unreadable": (400, "The request body could not be read"),
        "urn:idempotency:response-not-stored": (500, "The response could not be stored"),
    }
    # serde_json's document: compact, members sorted.
    assert Problem.KEY_MISSING.body("d\n") == (
        b'{"detail":"d\\n","status":400,"title":"Idempotency-Key is missing",'
        b'"type":"urn:idempotency:key-missing"}'
    )
    assert json.loads(Problem.UNAVAILABLE.body("x"))["status"] == 503
