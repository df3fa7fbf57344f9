"""The five calls against the real coordinator, and how the client connects (TLS, mutual TLS, the
bearer token)."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import subprocess
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest

from idempotency_coordinator import (
    Client,
    Completion,
    Grant,
    InProgress,
    KeyState,
    PermissionDenied,
    Reason,
    Rejected,
    Renewal,
    Replay,
    Stored,
    Unavailable,
)
from idempotency_coordinator._generated import coordinator_pb2 as pb
from tests._support import CoordinatorProcess, Served, StatusServer, free_port, key

NS = "payments"


def body(text: str) -> Stored:
    return Stored(text.encode(), {"status": "201", "header:content-type": "application/json"})


async def test_claim_complete_and_replay(client: Client) -> None:
    k = key()
    before = datetime.now(timezone.utc)
    grant = await client.claim(NS, k, fingerprint=b"fp", lease_ttl=30, owner="api-1")
    assert isinstance(grant, Grant)
    assert (grant.attempt, grant.takeover) == (1, False)
    assert grant.fencing_token >= 1
    assert len(grant.lease_token) == 36
    assert grant.lease_expires_at.tzinfo is not None
    assert before + timedelta(seconds=25) < grant.lease_expires_at < before + timedelta(seconds=35)

    done = await client.complete(NS, k, grant.lease_token, body("paid"))
    assert isinstance(done, Completion)
    assert (done.fencing_token, done.already_completed) == (grant.fencing_token, False)
    assert done.expires_at > done.completed_at

    again = await client.complete(NS, k, grant.lease_token, body("ignored"))
    assert again.already_completed
    assert again.completed_at == done.completed_at

    replay = await client.claim(NS, k, fingerprint=b"fp")
    assert isinstance(replay, Replay)
    assert replay.response == body("paid")
    assert replay.fencing_token == grant.fencing_token
    assert replay.completed_at == done.completed_at

    view = await client.lookup(NS, k)
    assert view.state is KeyState.COMPLETED
    assert (view.fingerprint, view.attempt, view.owner) == (b"fp", 1, "api-1")
    assert view.response == body("paid")
    assert view.completed_at == done.completed_at
    assert view.lease_expires_at is None


async def test_a_held_key_is_in_progress_with_its_holder(client: Client) -> None:
    k = key()
    grant = await client.claim(NS, k, owner="api-7", lease_ttl=timedelta(seconds=10))
    assert isinstance(grant, Grant)
    busy = await client.claim(NS, k, owner="api-8")
    assert isinstance(busy, InProgress)
    assert (busy.owner, busy.attempt) == ("api-7", 1)
    assert 0 < busy.retry_after <= 1
    assert busy.lease_expires_at == grant.lease_expires_at
    view = await client.lookup(NS, k)
    assert view.state is KeyState.IN_PROGRESS
    assert view.lease_expires_at == grant.lease_expires_at
    assert view.response is None


async def test_renew_moves_the_lease_and_release_hands_the_key_on(client: Client) -> None:
    k = key()
    grant = await client.claim(NS, k, lease_ttl=1)
    assert isinstance(grant, Grant)
    renewal = await client.renew(NS, k, grant.lease_token, lease_ttl=20)
    assert isinstance(renewal, Renewal)
    assert renewal.fencing_token == grant.fencing_token
    assert renewal.lease_expires_at > grant.lease_expires_at + timedelta(seconds=15)

    await client.release(NS, k, grant.lease_token)
    await client.release(NS, k, grant.lease_token)  # a repeat is fine
    assert (await client.lookup(NS, k)).state is KeyState.RELEASED
    second = await client.claim(NS, k)
    assert isinstance(second, Grant)
    assert (second.attempt, second.takeover) == (2, False)
    assert second.fencing_token > grant.fencing_token


async def test_a_lapsed_lease_is_taken_over(client: Client) -> None:
    k = key()
    first = await client.claim(NS, k, lease_ttl=0.1)
    assert isinstance(first, Grant)
    await asyncio.sleep(0.2)
    assert (await client.lookup(NS, k)).state is KeyState.LEASE_EXPIRED
    second = await client.claim(NS, k)
    assert isinstance(second, Grant)
    assert (second.attempt, second.takeover) == (2, True)


async def test_a_waiting_claim_gets_the_holders_response(client: Client) -> None:
    k = key()
    grant = await client.claim(NS, k)
    assert isinstance(grant, Grant)

    async def finish() -> None:
        await asyncio.sleep(0.3)
        await client.complete(NS, k, grant.lease_token, body("from the holder"))

    finisher = asyncio.create_task(finish())
    waited = await client.claim(NS, k, wait=5)
    await finisher
    assert isinstance(waited, Replay)
    assert waited.response == body("from the holder")


async def test_a_retried_claim_with_the_same_request_id_gets_the_same_lease(client: Client) -> None:
    k = key()
    first = await client.claim(NS, k, request_id="req-1")
    again = await client.claim(NS, k, request_id="req-1")
    assert isinstance(first, Grant)
    assert again == first


async def test_a_client_on_a_channel_it_was_given(coordinator: CoordinatorProcess) -> None:
    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        client = Client(channel, timeout=2)
        view_error = None
        try:
            await client.lookup(NS, key())
        except Exception as error:
            view_error = error
        assert view_error is not None and getattr(view_error, "reason", None) == "KEY_NOT_FOUND"
        await client.close()  # leaves the caller's channel open
        grant = await client.claim(NS, key())
        assert isinstance(grant, Grant)


def test_a_client_built_outside_any_loop_works_in_each_loop_it_is_used_in(
    coordinator: CoordinatorProcess,
) -> None:
    # As a FastAPI application builds it at import time, before the server starts its loop.
    client = Client(coordinator.url)
    for _ in range(2):
        grant = asyncio.run(client.claim(NS, key()))
        assert isinstance(grant, Grant)
    asyncio.run(client.close())


async def test_nothing_listening_is_unavailable_at_once() -> None:
    async with Client(f"http://127.0.0.1:{free_port()}", timeout=5) as client:
        started = asyncio.get_running_loop().time()
        with pytest.raises(Unavailable) as caught:
            await client.lookup(NS, "k")
        assert caught.value.is_indeterminate and caught.value.is_retryable
        assert caught.value.reason is None
        assert asyncio.get_running_loop().time() - started < 3


def test_targets_are_checked() -> None:
    with pytest.raises(ValueError, match="http"):
        Client("ftp://host:1")
    with pytest.raises(ValueError, match="both"):
        Client("https://host:1", cert_file="c.pem")
    with pytest.raises(ValueError, match="https"):
        Client("http://host:1", ca_file=Path(__file__))


async def test_the_bearer_token_goes_with_every_call() -> None:
    fake = StatusServer(code=grpc.StatusCode.NOT_FOUND, reason="KEY_NOT_FOUND")
    tokens = iter(["first", "second"])
    async with Served(fake) as served:
        async with Client(served.url, token="s3cret") as client:
            for call in (client.lookup(NS, "k"), client.release(NS, "k", "t")):
                with pytest.raises(Exception, match="refused"):
                    await call
        async with Client(served.url, token=lambda: next(tokens)) as client:
            for _ in range(2):
                with pytest.raises(Exception, match="refused"):
                    await client.renew(NS, "k", "t")
        async with Client(served.url) as client:
            with pytest.raises(Exception, match="refused"):
                await client.lookup(NS, "k")
    seen = [metadata.get("authorization") for metadata in fake.metadata]
    assert seen == ["Bearer s3cret", "Bearer s3cret", "Bearer first", "Bearer second", None]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    where = tmp_path_factory.mktemp("tls")
    (where / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (where / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.pem", cwd=where,
    )  # fmt: skip
    for name in ("server", "client"):
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=where,
        )  # fmt: skip
        # Version 3 certificates: rustls (the coordinator's TLS) refuses version 1.
        extra = ["-extfile", "server.ext" if name == "server" else "client.ext"]
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", *extra, cwd=where,
        )  # fmt: skip
    return where


class _Answering(StatusServer):
    async def Lookup(self, request: pb.LookupRequest, context: object) -> pb.LookupResponse:  # noqa: N802
        self.metadata.append(dict(context.invocation_metadata() or ()))  # type: ignore[attr-defined]
        return pb.LookupResponse(state=pb.KEY_STATE_RELEASED, attempt=3)


async def test_tls_and_mutual_tls(certificates: Path) -> None:
    def read(name: str) -> bytes:
        return (certificates / name).read_bytes()

    server_tls = grpc.ssl_server_credentials(
        [(read("server.key"), read("server.pem"))],
        root_certificates=read("ca.pem"),
        require_client_auth=True,
    )
    fake = _Answering()
    async with Served(fake, server_tls) as served:
        target = f"https://127.0.0.1:{served.port}"
        async with Client(
            target,
            ca_file=certificates / "ca.pem",
            cert_file=certificates / "client.pem",
            key_file=certificates / "client.key",
            token="over-tls",
        ) as client:
            view = await client.lookup(NS, "k")
            assert (view.state, view.attempt) == (KeyState.RELEASED, 3)
        # The certificate names localhost too: asked for by that name, it still verifies; asked
        # for by another, it does not.
        async with Client(
            target,
            ca_file=certificates / "ca.pem",
            cert_file=certificates / "client.pem",
            key_file=certificates / "client.key",
            tls_server_name="localhost",
        ) as client:
            assert (await client.lookup(NS, "k")).attempt == 3
        async with Client(
            target,
            ca_file=certificates / "ca.pem",
            cert_file=certificates / "client.pem",
            key_file=certificates / "client.key",
            tls_server_name="coordinator.example",
            timeout=3,
        ) as client:
            with pytest.raises(Unavailable):
                await client.lookup(NS, "k")
        # Without a client certificate the server refuses the handshake: unavailable.
        async with Client(target, ca_file=certificates / "ca.pem", timeout=3) as client:
            with pytest.raises(Unavailable):
                await client.lookup(NS, "k")
        # Plaintext to a TLS server does not get through either.
        async with Client(f"http://127.0.0.1:{served.port}", timeout=3) as client:
            with pytest.raises(Unavailable):
                await client.lookup(NS, "k")
    assert [metadata.get("authorization") for metadata in fake.metadata] == [
        "Bearer over-tls",
        None,
    ]


async def test_the_real_coordinator_over_mutual_tls_with_an_auth_file(
    certificates: Path, start_coordinator: Callable[..., CoordinatorProcess], tmp_path: Path
) -> None:
    """The coordinator with --tls-cert, --tls-client-ca and --auth-file: the token names the caller
    (and its namespaces); without one, the verified client certificate does."""
    auth = tmp_path / "auth.toml"
    digest = hashlib.sha256(b"python-token").hexdigest()
    auth.write_text(
        f'[[token]]\nname = "python"\nsha256 = "{digest}"\n'
        'namespaces = ["python-*"]\nrole = "write"\n'
        '[[certificate]]\nsubject = "CN=client"\nnamespaces = ["certified"]\nrole = "read"\n'
    )
    coordinator = start_coordinator(
        "--tls-cert", str(certificates / "server.pem"),
        "--tls-key", str(certificates / "server.key"),
        "--tls-client-ca", str(certificates / "ca.pem"),
        "--auth-file", str(auth),
    )  # fmt: skip
    target = f"https://{coordinator.address}"
    tls = {
        "ca_file": certificates / "ca.pem",
        "cert_file": certificates / "client.pem",
        "key_file": certificates / "client.key",
    }
    k = key()
    async with Client(target, token="python-token", **tls) as client:  # type: ignore[arg-type]
        grant = await client.claim("python-tests", k, fingerprint=b"fp")
        assert isinstance(grant, Grant)
        await client.complete("python-tests", k, grant.lease_token, body("over mTLS"))
        replay = await client.claim("python-tests", k, fingerprint=b"fp")
        assert isinstance(replay, Replay) and replay.response == body("over mTLS")
        with pytest.raises(PermissionDenied) as refused:
            await client.claim("payments", k)
        assert refused.value.reason is Reason.NAMESPACE_NOT_ALLOWED
    async with Client(target, token="not-the-token", **tls) as client:  # type: ignore[arg-type]
        with pytest.raises(PermissionDenied) as refused:
            await client.lookup("python-tests", k)
        assert refused.value.reason is Reason.UNAUTHENTICATED
    # No token: the certificate (CN=client) is the caller, reading its one namespace.
    async with Client(target, **tls) as client:  # type: ignore[arg-type]
        with pytest.raises(Rejected) as absent:
            await client.lookup("certified", k)
        assert absent.value.reason is Reason.KEY_NOT_FOUND
        with pytest.raises(PermissionDenied) as refused:
            await client.claim("certified", k)
        assert refused.value.reason is Reason.ROLE_NOT_ALLOWED
        with pytest.raises(PermissionDenied) as refused:
            await client.lookup("python-tests", k)
        assert refused.value.reason is Reason.NAMESPACE_NOT_ALLOWED
    # Without a client certificate the handshake is refused.
    async with Client(
        target, ca_file=certificates / "ca.pem", token="python-token", timeout=3
    ) as client:
        with pytest.raises(Unavailable):
            await client.lookup("python-tests", k)
