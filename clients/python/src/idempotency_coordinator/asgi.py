"""An ``Idempotency-Key`` middleware for ASGI applications (FastAPI, Starlette, any other),
following draft-ietf-httpapi-idempotency-key-header (revision 07), on top of
:meth:`Idempotent.run <idempotency_coordinator.Idempotent.run>`.

It behaves as the Rust client's tower layer (``idempotency_client::http``) does, and stores keys,
fingerprints and responses the same way, so that Python and Rust instances of one API can share
a coordinator namespace. For each request whose method it covers (POST and PATCH unless told
otherwise) the middleware:

- reads ``Idempotency-Key`` (a Structured Header String ``"abc"``, or a bare value ``abc``); a
  missing key is 400 when keys are required (the default; otherwise the request passes through),
  and an empty, over-long or unparsable key, or one sent twice, is 400;
- reads the body up to its limit (413 beyond it, before anything is claimed) and fingerprints the
  request: SHA-256 over the method, the path and query, ``content-type``, the configured headers
  and the body, each field prefixed by its length;
- claims the key, scoped by the configured scope (a tenant, say: the stored key is the scope and
  the key, so one scope can never replay another's response). The first request runs the
  application with the :class:`~idempotency_coordinator.Lease` in ``scope["state"]
  ["idempotency_lease"]`` (``request.state.idempotency_lease`` in Starlette and FastAPI), to fence
  its own writes; its response is buffered, stored (status, the stored headers, body) and
  returned. A retry gets the stored response with ``Idempotent-Replayed: true``. A request that
  finds the first one still running gets 409 with ``Retry-After``, or with a wait, the first
  one's response. Another request under the same key gets 422;
- stores what the application answered, 5xx included (it may have acted: replaying is the safe
  choice), except 408, 425, 429 and 503, which say nothing was done: those release the key so
  that a retry runs again. ``store_policy`` overrides this;
- answers 503 with ``Retry-After`` when the coordinator cannot be reached or is unavailable,
  full or overloaded, without running the application (fail closed);
- answers 500 ``urn:idempotency:misconfigured`` when the coordinator refuses the service's own
  request (its credentials, namespace or lease bounds): that is no outage, and no retry fixes it;
- leaves the lease to lapse when the application raises or the client goes away before the
  application answered (nothing is released: the mutation may have partly happened); the next
  retry after the lease takes over.

A response too large for the coordinator is still returned whole to its first caller (the
mutation ran, so it must not run again: the body is buffered up to the limit, then streamed
through), and a 500 problem of type ``urn:idempotency:response-not-stored`` is stored for
replays. Every error the middleware itself answers is ``application/problem+json`` (see
:class:`Problem`).

Put middleware that turns exceptions into 500 responses outside this one, not inside: inside, an
exception would be stored as a 500 instead of leaving the lease to lapse. (Starlette's and
FastAPI's own ``ServerErrorMiddleware`` is outside every ``add_middleware`` middleware.)
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import logging
import math
import re
import unicodedata
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .client import Client
from .errors import Error, Failed, InProgressError, Reason, Rejected, TransportError, Unavailable
from .idempotent import AbandonFailure, FinalFailure, Lease, Outcome
from .types import Duration, Stored, seconds

__all__ = [
    "DEFAULT_STORED_HEADERS",
    "IDEMPOTENCY_KEY",
    "IDEMPOTENT_REPLAYED",
    "KEY_STATE_KEY",
    "LEASE_STATE_KEY",
    "MAX_KEY_BYTES",
    "IdempotencyMiddleware",
    "Problem",
    "StorePolicy",
    "default_store_policy",
    "fingerprint",
    "header_scope",
    "stored_key",
]

logger = logging.getLogger("idempotency_coordinator.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The request header that carries the key.
IDEMPOTENCY_KEY = "idempotency-key"
#: The longest key accepted, in bytes.
MAX_KEY_BYTES = 255
#: The header a replayed response carries (as Stripe's API does; the draft has none yet).
IDEMPOTENT_REPLAYED = "idempotent-replayed"
#: Where the handler finds its lease: ``scope["state"][LEASE_STATE_KEY]``, which Starlette and
#: FastAPI show as ``request.state.idempotency_lease``.
LEASE_STATE_KEY = "idempotency_lease"
#: Where the handler finds the key as the middleware parsed it (without the quotes of a Structured
#: Header String): ``scope["state"][KEY_STATE_KEY]``, ``request.state.idempotency_key``.
KEY_STATE_KEY = "idempotency_key"
#: Response headers stored and replayed unless told otherwise (besides the status).
DEFAULT_STORED_HEADERS = (
    "content-type",
    "content-encoding",
    "content-language",
    "location",
    "link",
    "etag",
    "cache-control",
)

#: Metadata names: the status, and ``header:<name>`` for each stored header (several values of
#: one header joined by a newline, which no header value can hold). As the Rust layer writes them.
_STATUS = "status"
_HEADER_PREFIX = "header:"
_PROBLEM_JSON = "application/problem+json"


class StorePolicy(enum.Enum):
    """What to do with a response the application produced."""

    #: Store it: every retry gets it.
    STORE = "store"
    #: Release the key: nothing was done, and a retry runs the request again.
    RELEASE = "release"


def default_store_policy(status: int, headers: Sequence[tuple[str, str]]) -> StorePolicy:
    """Store everything, 5xx included, except 408, 425, 429 and 503, which release the key."""
    del headers
    return StorePolicy.RELEASE if status in (408, 425, 429, 503) else StorePolicy.STORE


class Problem(enum.Enum):
    """A problem the middleware answers with (RFC 9457): its ``type`` URI, status and title, the
    same as the Rust layer's ``Problem``."""

    #: 400: a POST (or PATCH) without ``Idempotency-Key``, when the key is required.
    KEY_MISSING = ("urn:idempotency:key-missing", 400, "Idempotency-Key is missing")
    #: 400: the key is empty, over 255 bytes, unparsable, or sent twice.
    KEY_INVALID = ("urn:idempotency:key-invalid", 400, "Idempotency-Key is invalid")
    #: 413: the request body is over the limit; nothing was claimed.
    BODY_TOO_LARGE = ("urn:idempotency:body-too-large", 413, "The request body is too large")
    #: 422: the key was first used with another request.
    KEY_REUSED = ("urn:idempotency:key-reused", 422, "Idempotency-Key reused with another request")
    #: 409: the first request with this key is still running.
    IN_PROGRESS = (
        "urn:idempotency:in-progress",
        409,
        "A request with this Idempotency-Key is in progress",
    )
    #: 409: this attempt lost its lease to another one while it ran; retry for the result.
    LEASE_LOST = ("urn:idempotency:lease-lost", 409, "Another attempt took this request over")
    #: 503: the coordinator cannot be reached, is unavailable, full, overloaded or failed inside;
    #: nothing was run.
    UNAVAILABLE = ("urn:idempotency:unavailable", 503, "Idempotency service unavailable")
    #: 500: the coordinator refused this service's own request (its credentials, namespace or
    #: lease bounds are wrong); nothing was run.
    MISCONFIGURED = ("urn:idempotency:misconfigured", 500, "Idempotency service misconfigured")
    #: 400: the request body could not be read (the client went away or sent a broken body).
    BODY_UNREADABLE = ("urn:idempotency:body-unreadable", 400, "The request body could not be read")
    #: 500 (stored for replays): the response was too large for the coordinator.
    RESPONSE_NOT_STORED = (
        "urn:idempotency:response-not-stored",
        500,
        "The response could not be stored",
    )

    @property
    def type_uri(self) -> str:
        """The problem's ``type`` URI."""
        return str(self.value[0])

    @property
    def status(self) -> int:
        """The HTTP status it comes with."""
        return int(self.value[1])

    @property
    def title(self) -> str:
        """A short, fixed summary."""
        return str(self.value[2])

    def body(self, detail: str) -> bytes:
        """The document, as the Rust layer writes it (compact JSON, members sorted)."""
        document = {
            "type": self.type_uri,
            "title": self.title,
            "status": self.status,
            "detail": detail,
        }
        return json.dumps(
            document, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()

    def response(self, detail: str, retry_after: int | None = None) -> _Answer:
        headers = [(b"content-type", _PROBLEM_JSON.encode())]
        if retry_after is not None:
            headers.append((b"retry-after", str(max(1, retry_after)).encode()))
        return _Answer(self.status, headers, self.body(detail))


# ------------------------------------------------------------------------------------------------
# The key, the stored key and the fingerprint: the same bytes as the Rust layer's.
# ------------------------------------------------------------------------------------------------


class _KeyMissing(Exception):
    pass


class _KeyRepeated(Exception):
    pass


class _KeyInvalid(Exception):
    pass


def _visible(value: bytes) -> bool:
    """What ``http::HeaderValue::to_str`` accepts: visible ASCII, space and tab."""
    return all(byte == 0x09 or 0x20 <= byte < 0x7F for byte in value)


def key_of(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The request's idempotency key, if it sent exactly one valid field; raises otherwise."""
    values = [value for name, value in headers if name.lower() == IDEMPOTENCY_KEY.encode()]
    if not values:
        raise _KeyMissing
    if len(values) > 1:
        raise _KeyRepeated
    if not _visible(values[0]):
        raise _KeyInvalid("the key must be printable ASCII")
    key = _parse_key(values[0].decode("ascii").strip(" \t"))
    if not key:
        raise _KeyInvalid("the key is empty")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise _KeyInvalid("the key is longer than 255 bytes")
    return key


def _parse_key(text: str) -> str:
    """An sf-string (``"`` … ``"``, with ``\\"`` and ``\\\\`` escapes, printable ASCII), or a bare
    value of visible characters without quotes or spaces."""
    if not text.startswith('"'):
        if all("!" <= c <= "~" and c not in '"\\' for c in text):
            return text
        raise _KeyInvalid("a bare key may hold only visible characters, no quotes or spaces")
    key: list[str] = []
    index, end = 1, len(text)
    while index < end:
        c = text[index]
        if c == '"':
            if index == end - 1:
                return "".join(key)
            raise _KeyInvalid("nothing may follow the closing quote")
        if c == "\\":
            if index + 1 < end and text[index + 1] in '"\\':
                key.append(text[index + 1])
                index += 2
                continue
            raise _KeyInvalid('only \\" and \\\\ may be escaped')
        if not " " <= c <= "~":
            raise _KeyInvalid("a string may hold only printable ASCII")
        key.append(c)
        index += 1
    raise _KeyInvalid("the string has no closing quote")


def stored_key(scope: str | None, key: str) -> str:
    """The key the coordinator stores a request under: its scope and its key, so that one scope
    (a tenant) can never replay another's response. ``<scope length>:<scope><key>`` (the length
    in bytes), or, when that is over the coordinator's 255 bytes or holds control characters,
    ``sha256:`` and the hex digest of it. The same as the Rust layer's."""
    scope = scope or ""
    plain = f"{len(scope.encode())}:{scope}{key}"
    encoded = plain.encode()
    if len(encoded) <= MAX_KEY_BYTES and not any(unicodedata.category(c) == "Cc" for c in plain):
        return plain
    return "sha256:" + hashlib.sha256(encoded).hexdigest()


def _path_and_query(scope: Scope) -> bytes:
    raw = scope.get("raw_path")
    path = raw if isinstance(raw, bytes) and raw else str(scope.get("path") or "/").encode()
    path = path.split(b"?", 1)[0] or b"/"
    query = scope.get("query_string") or b""
    return path + b"?" + query if query else path


def fingerprint(
    method: str,
    path_and_query: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    body: bytes,
    fingerprint_headers: Sequence[str] = (),
) -> bytes:
    """SHA-256 over the method, the path and query, ``content-type`` and the named headers (each
    name, then each of its values), and the body, each field prefixed by its length as a
    big-endian u64, so that no two requests share their input. The Rust layer's
    ``fingerprint()``, byte for byte."""
    digest = hashlib.sha256()

    def add(data: bytes) -> None:
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)

    add(method.encode())
    add(path_and_query)
    for name in ("content-type", *fingerprint_headers):
        wanted = name.lower().encode()
        add(wanted)
        for header, value in headers:
            if header.lower() == wanted:
                add(value)
    add(body)
    return digest.digest()


def _varint_size(value: int) -> int:
    size = 1
    while value >= 0x80:
        value >>= 7
        size += 1
    return size


def encoded_size(stored: Stored) -> int:
    """The size of the ``Response`` message as protobuf (prost, as the coordinator) encodes it:
    what the coordinator's response limit counts."""

    def length_delimited(data: bytes) -> int:
        return 1 + _varint_size(len(data)) + len(data) if data else 0

    size = length_delimited(stored.body)
    for name, value in stored.metadata.items():
        entry = length_delimited(name.encode()) + length_delimited(value.encode())
        size += 1 + _varint_size(entry) + entry
    return size


def header_scope(name: str) -> Callable[[Scope], str | None]:
    """A scope function: the first value of the request header ``name`` (``X-Tenant``, say), or
    None without one (or with one that is not visible ASCII), as the Rust example's
    ``request.headers.get("x-tenant")?.to_str().ok()``."""
    wanted = name.lower().encode()

    def scope_of(scope: Scope) -> str | None:
        for header, value in scope.get("headers") or ():
            if header.lower() == wanted:
                return value.decode("ascii") if _visible(value) else None
        return None

    return scope_of


# ------------------------------------------------------------------------------------------------
# Responses
# ------------------------------------------------------------------------------------------------


@dataclass
class _Answer:
    """A whole response, ready to send."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    async def send(self, send: Send) -> None:
        headers = [
            (name, value)
            for name, value in self.headers
            if name.lower() not in (b"content-length", b"transfer-encoding")
        ]
        headers.append((b"content-length", str(len(self.body)).encode()))
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": False})


_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-zA-Z]+")


def _replay(stored: Stored) -> _Answer:
    """The stored response, rebuilt, with ``Idempotent-Replayed: true``."""
    status_text = stored.get(_STATUS) or ""
    status = int(status_text) if re.fullmatch(r"[1-9][0-9]{2}", status_text) else 500
    headers: list[tuple[bytes, bytes]] = []
    for name in sorted(stored.metadata):
        if not name.startswith(_HEADER_PREFIX):
            continue
        header = name[len(_HEADER_PREFIX) :]
        if not _HEADER_NAME.fullmatch(header) or header.lower() == IDEMPOTENT_REPLAYED:
            continue
        for value in stored.metadata[name].split("\n"):
            encoded = value.encode("latin-1", errors="replace")
            if _visible(encoded):
                headers.append((header.lower().encode(), encoded))
    headers.append((IDEMPOTENT_REPLAYED.encode(), b"true"))
    return _Answer(status, headers, stored.body)


def _not_stored(why: str) -> FinalFailure:
    """A final failure that stores the "response not stored" problem for replays."""
    problem = Problem.RESPONSE_NOT_STORED
    detail = (
        "the request was processed, but its response was too large to store and cannot be replayed"
    )
    stored = Stored(
        problem.body(detail),
        {_STATUS: str(problem.status), _HEADER_PREFIX + "content-type": _PROBLEM_JSON},
    )
    return FinalFailure(stored, why)


class _Released(Exception):
    """The reason a run released its key."""


@dataclass
class _First:
    """What the application answered the first request with (or the exception it raised), shared
    with the work given to ``run``: the first caller gets it, whatever becomes of storing it."""

    answer: _Answer | None = None
    error: BaseException | None = None
    #: The response went to the client as it came (too large to buffer).
    streamed: bool = False
    #: The application has sent its whole response, or started streaming one too large to buffer.
    responded: bool = False
    #: An exception the application raised after its whole response (a background task's).
    after: BaseException | None = None

    @property
    def answered(self) -> bool:
        return self.answer is not None or self.error is not None or self.streamed


@dataclass
class _Capture:
    """The ``send`` the application gets: buffers the response up to the limit, then streams the
    rest of it through to the client."""

    send_through: Send
    limit: int
    first: _First
    start: Message | None = None
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    streaming: bool = False
    complete: bool = False

    async def send(self, message: Message) -> None:
        kind = message.get("type")
        if kind == "http.response.start":
            self.start = message
        elif kind == "http.response.body" and self.start is not None and not self.complete:
            more = bool(message.get("more_body", False))
            if self.streaming:
                await self.send_through(message)
            else:
                chunk = bytes(message.get("body", b""))
                self.chunks.append(chunk)
                self.size += len(chunk)
                if self.size > self.limit:
                    self.streaming = self.first.responded = True
                    await self.send_through(self.start)
                    prefix, self.chunks = b"".join(self.chunks), []
                    await self.send_through(
                        {"type": "http.response.body", "body": prefix, "more_body": more}
                    )
            if not more:
                self.complete = self.first.responded = True

    @property
    def status(self) -> int:
        assert self.start is not None
        return int(self.start["status"])

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        assert self.start is not None
        return [(bytes(name), bytes(value)) for name, value in self.start.get("headers", ())]

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


#: Server extensions the application must not use under the middleware: the response has to come
#: through ``http.response.body`` to be stored.
#: The contract's refusals that are the coordinator's state, not this service's configuration.
_OUTAGES = (Reason.STORE_FULL, Reason.NAMESPACE_FULL, Reason.OVERLOADED, Reason.INTERNAL)

_HIDDEN_EXTENSIONS = ("http.response.pathsend", "http.response.zerocopy", "http.response.trailers")


class IdempotencyMiddleware:
    """The ``Idempotency-Key`` middleware (see the module's documentation), a pure ASGI
    middleware::

        from fastapi import FastAPI
        from idempotency_coordinator import Client
        from idempotency_coordinator.asgi import IdempotencyMiddleware, header_scope

        app = FastAPI()
        app.add_middleware(
            IdempotencyMiddleware,
            client=Client("http://127.0.0.1:50051"),
            namespace="payments",
            scope=header_scope("x-tenant"),
            lease_ttl=30,
        )
        # In a handler: request.state.idempotency_lease (fencing_token, attempt, takeover).

    Options (durations in seconds or ``timedelta``), with the Rust layer's defaults:

    - ``client``, ``namespace``: where keys are kept.
    - ``methods``: the methods covered (POST and PATCH); others pass through.
    - ``key_required``: False lets requests without ``Idempotency-Key`` pass through instead of
      getting 400.
    - ``scope``: a function of the ASGI scope giving the scope of a request's key (the tenant);
      None: one shared scope. :func:`header_scope` makes one from a header.
    - ``lease_ttl``: the lease of a running request (the coordinator's default, 30 s), renewed
      every third of it while the application runs. ``retention``: how long keys and responses
      are kept (the coordinator's default, 24 h): the expiry policy to publish.
    - ``wait``: how long a request that finds its key in progress waits for the first one's
      response (0: 409 at once). ``retry_for``: how long a coordinator call whose outcome is
      unknown is retried before the request gets 503 (2 s). ``owner``: the name this instance
      claims under.
    - ``body_limit``: the largest request body read (1 MiB; larger ones get 413).
      ``response_limit``: the largest response stored, as the coordinator counts it (its
      ``--max-response-bytes``, 1 MiB).
    - ``fingerprint_headers``: request headers that enter the fingerprint besides method, path,
      query, content-type and body. ``store_headers``: response headers stored and replayed
      besides :data:`DEFAULT_STORED_HEADERS`.
    - ``store_policy``: ``(status, headers) -> StorePolicy`` per response (see
      :func:`default_store_policy`); ``headers`` are ``(name, value)`` strings, names lowercase.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        client: Client,
        namespace: str,
        methods: Iterable[str] = ("POST", "PATCH"),
        key_required: bool = True,
        scope: Callable[[Scope], str | None] | None = None,
        lease_ttl: Duration | None = None,
        retention: Duration | None = None,
        wait: Duration = 0.0,
        retry_for: Duration = 2.0,
        owner: str = "",
        body_limit: int = 1024 * 1024,
        response_limit: int = 1024 * 1024,
        fingerprint_headers: Iterable[str] = (),
        store_headers: Iterable[str] = (),
        store_policy: Callable[
            [int, Sequence[tuple[str, str]]], StorePolicy
        ] = default_store_policy,
    ) -> None:
        self.app = app
        self.client = client
        self.namespace = namespace
        self.methods = frozenset(method.upper() for method in methods)
        self.key_required = key_required
        self.scope = scope
        self.lease_ttl = None if lease_ttl is None else seconds(lease_ttl)
        self.retention = None if retention is None else seconds(retention)
        self.wait = seconds(wait)
        self.retry_for = seconds(retry_for)
        self.owner = owner
        self.body_limit = body_limit
        self.response_limit = response_limit
        self.fingerprint_headers = tuple(name.lower() for name in fingerprint_headers)
        self.stored_headers = tuple(
            dict.fromkeys((*DEFAULT_STORED_HEADERS, *(name.lower() for name in store_headers)))
        )
        self.store_policy = store_policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or str(scope.get("method", "")).upper() not in self.methods:
            await self.app(scope, receive, send)
            return
        method = str(scope["method"])
        headers: list[tuple[bytes, bytes]] = [
            (bytes(name), bytes(value)) for name, value in scope.get("headers") or ()
        ]
        try:
            key = key_of(headers)
        except _KeyMissing:
            if not self.key_required:
                await self.app(scope, receive, send)
                return
            await Problem.KEY_MISSING.response(f"{method} requires an Idempotency-Key").send(send)
            return
        except _KeyRepeated:
            detail = "Idempotency-Key was sent more than once"
            await Problem.KEY_INVALID.response(detail).send(send)
            return
        except _KeyInvalid as why:
            await Problem.KEY_INVALID.response(str(why)).send(send)
            return

        body = await self._read_body(headers, receive, send)
        if body is None:
            return
        fingerprint_ = fingerprint(
            method, _path_and_query(scope), headers, body, self.fingerprint_headers
        )
        idempotent = self.client.idempotent(
            self.namespace,
            stored_key(self.scope(scope) if self.scope else None, key),
            fingerprint=fingerprint_,
            lease_ttl=self.lease_ttl,
            retention=self.retention,
            wait=self.wait,
            owner=self.owner,
            retry_for=self.retry_for,
        )

        first = _First()
        disconnected = asyncio.Event()
        delivered = False

        async def app_receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def work(lease: Lease) -> Stored:
            return await self._work(scope, key, lease, app_receive, send, first)

        run = asyncio.ensure_future(idempotent.run(work))

        async def watch() -> None:
            # The client going away before the application answered is the Rust layer's dropped
            # request future: everything stops, nothing is released, the lease lapses. Once the
            # application answered, its response is still stored.
            while True:
                try:
                    message = await receive()
                except Exception:  # the server's receive failed: nothing more to learn from it
                    return
                if message.get("type") == "http.disconnect":
                    disconnected.set()
                    if not (first.answered or first.responded):
                        run.cancel()
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({run})
        except asyncio.CancelledError:
            run.cancel()
            raise
        finally:
            watcher.cancel()
        if run.cancelled():
            return  # the client went away: nobody to answer
        error = run.exception()
        if first.answered:
            if error is not None and not isinstance(error, Failed):
                logger.warning(
                    "the response was sent but its key %r could not be completed: %s", key, error
                )
            if first.error is not None:
                raise first.error
            if first.answer is not None:
                await first.answer.send(send)
            if first.after is not None:
                raise first.after
            return
        if error is None:
            outcome: Outcome = run.result()
            await _replay(outcome.response).send(send)
            return
        await self._refusal(error, key).send(send)

    async def _read_body(
        self, headers: Sequence[tuple[bytes, bytes]], receive: Receive, send: Send
    ) -> bytes | None:
        """The whole body, or None once the request was answered (413, or a broken body)."""
        too_large = Problem.BODY_TOO_LARGE.response(
            f"the body is over the limit of {self.body_limit} bytes; nothing was done"
        )
        # A declared length over the limit is refused before reading anything.
        for name, value in headers:
            declared = value.strip()
            if (
                name.lower() == b"content-length"
                and declared.isdigit()
                and int(declared) > self.body_limit
            ):
                await too_large.send(send)
                return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message.get("type") == "http.disconnect":
                # The client went away or sent a broken body: nothing was claimed.
                detail = "the request body could not be read: the client went away"
                await Problem.BODY_UNREADABLE.response(detail).send(send)
                return None
            if message.get("type") != "http.request":
                continue
            chunk = bytes(message.get("body", b""))
            size += len(chunk)
            if size > self.body_limit:
                await too_large.send(send)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _work(
        self, scope: Scope, key: str, lease: Lease, receive: Receive, send: Send, first: _First
    ) -> Stored:
        """Runs the application once under ``lease``; returns what to store, or raises what
        ``run`` should do instead (release, store a problem, leave the lease to lapse)."""
        child: Scope = dict(scope)
        state = dict(scope.get("state") or {})
        state[LEASE_STATE_KEY] = lease
        state[KEY_STATE_KEY] = key
        child["state"] = state
        extensions = scope.get("extensions")
        if isinstance(extensions, Mapping):
            child["extensions"] = {
                name: value for name, value in extensions.items() if name not in _HIDDEN_EXTENSIONS
            }
        capture = _Capture(send, self.response_limit, first)
        try:
            await self.app(child, receive, capture.send)
        except Exception as error:
            if capture.streaming:
                # The first caller has the start of the response; the server ends it as broken.
                first.streamed, first.error = True, error
                raise _not_stored("the response is over the coordinator's limit") from error
            if capture.start is None:
                # No response, and no telling what the application did: the lease lapses.
                first.error = error
                raise AbandonFailure("the application failed") from error
            if not capture.complete:
                # The application acted, but its response broke off: what to replay is unknown,
                # so a problem is stored and returned.
                first.answer = Problem.RESPONSE_NOT_STORED.response(
                    f"the response body failed: {error}"
                )
                raise _not_stored("the response body failed") from error
            # The whole response was sent before the exception (a failing background task): the
            # response stands, and the exception goes on to the server once it is answered.
            first.after = error
        if capture.streaming:
            first.streamed = True
            raise _not_stored("the response is over the coordinator's limit")
        if capture.start is None:
            first.error = RuntimeError("the application returned without a response")
            raise AbandonFailure("the application returned without a response")
        if not capture.complete:
            first.answer = Problem.RESPONSE_NOT_STORED.response(
                "the response body failed: the application returned before its end"
            )
            raise _not_stored("the response body failed")
        status, headers, body = capture.status, capture.headers, capture.body
        stored = self._stored_response(status, headers, body)
        text_headers = [
            (name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in headers
        ]
        policy = self.store_policy(status, text_headers)
        first.answer = _Answer(status, headers, body)
        if policy is StorePolicy.RELEASE:
            raise _Released("released by the store policy")
        if encoded_size(stored) <= self.response_limit:
            return stored
        raise _not_stored("the response is over the coordinator's limit")

    def _stored_response(
        self, status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes
    ) -> Stored:
        stored = Stored(body, {_STATUS: str(status)})
        for name in self.stored_headers:
            wanted = name.encode()
            values = [
                value.decode("ascii")
                for header, value in headers
                if header.lower() == wanted and _visible(value)
            ]
            if values:
                stored.metadata[_HEADER_PREFIX + name] = "\n".join(values)
        return stored

    def _refusal(self, error: BaseException, key: str) -> _Answer:
        """The answer to a request whose run ended without a response of the application."""
        if isinstance(error, InProgressError):
            return Problem.IN_PROGRESS.response(
                "a request with this key is still being processed",
                max(1, math.ceil(error.retry_after)),
            )
        if isinstance(error, Rejected) and error.reason == Reason.FINGERPRINT_MISMATCH:
            return Problem.KEY_REUSED.response(
                "this Idempotency-Key was first used with a different request; use a new key for "
                "a new request"
            )
        if isinstance(error, Rejected) and error.reason == Reason.LEASE_LOST:
            return Problem.LEASE_LOST.response(
                "another attempt took this request over; retry for its result", 1
            )
        if not isinstance(error, Error):
            raise error
        # The coordinator cannot take the call now (or failed inside): a retry may well work.
        if isinstance(error, (Unavailable, TransportError)) or (
            isinstance(error, Rejected) and error.reason in _OUTAGES
        ):
            logger.warning(
                "the idempotency coordinator is unavailable; the request was not run (key %r): %s",
                key,
                error,
            )
            return Problem.UNAVAILABLE.response(
                "the idempotency service cannot take the request now; nothing was done", 1
            )
        # Anything else is this service's own configuration (its credentials, its namespace, its
        # lease bounds): no retry will fix it, so it is not dressed up as an outage.
        logger.error(
            "the idempotency coordinator refused this service's request; check its configuration "
            "(key %r): %s",
            key,
            error,
        )
        return Problem.MISCONFIGURED.response(
            "the idempotency service refused this API's request; nothing was done"
        )
