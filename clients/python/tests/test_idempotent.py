"""``Idempotent.run`` against the real coordinator: each behaviour the helper promises, including
lost replies (through a proxy that forwards a call and then drops its reply) and leases lost to a
takeover (through a proxy that cuts renewals off until the lease lapsed)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from idempotency_coordinator import (
    AbandonFailure,
    Client,
    Failed,
    FinalFailure,
    Grant,
    InProgress,
    InProgressError,
    KeyState,
    Lease,
    Reason,
    Rejected,
    Stored,
    Unavailable,
)
from idempotency_coordinator.idempotent import Backoff, parse_seconds
from tests._support import CoordinatorProcess, LossyProxy, free_port, key

NS = "payments"


def body(text: str) -> Stored:
    return Stored(text.encode(), {"status": "201"})


async def must_not_run(lease: Lease) -> Stored:
    raise AssertionError("the work must not run")


async def test_a_lost_claim_reply_is_retried_with_the_same_request_id(
    proxy: tuple[LossyProxy, Client], client: Client
) -> None:
    lossy, through = proxy
    lossy.lose_claim_replies[0] = 1
    k = key()
    runs: list[Lease] = []

    async def work(lease: Lease) -> Stored:
        runs.append(lease)
        return body("paid")

    outcome = await through.idempotent(NS, k).run(work)
    assert not outcome.replayed
    assert len(runs) == 1
    assert runs[0].attempt == 1, "the retried Claim got the first grant back"
    assert len(lossy.claims) == 2
    first, retried = lossy.claims
    assert first.request_id and first.request_id == retried.request_id
    view = await client.lookup(NS, k)
    assert (view.state, view.attempt) == (KeyState.COMPLETED, 1)


async def test_each_run_claims_with_a_fresh_request_id(proxy: tuple[LossyProxy, Client]) -> None:
    lossy, through = proxy
    for _ in range(2):
        await through.idempotent(NS, key()).run(lambda lease: asyncio.sleep(0, body("x")))
    ids = {claim.request_id for claim in lossy.claims}
    assert len(ids) == 2 and all(len(request_id) == 36 for request_id in ids)


async def test_a_completed_key_is_replayed_without_running_the_work(client: Client) -> None:
    k = key()

    async def work(lease: Lease) -> Stored:
        return body("paid")

    first = await client.idempotent(NS, k).run(work)
    assert not first.replayed
    again = await client.idempotent(NS, k).run(must_not_run)
    assert again.replayed
    assert again.response == body("paid")
    assert again.fencing_token == first.fencing_token


async def test_a_key_in_progress_elsewhere_is_an_error_naming_the_holder(client: Client) -> None:
    k = key()
    assert isinstance(await client.claim(NS, k, owner="api-7"), Grant)
    with pytest.raises(InProgressError) as caught:
        await client.idempotent(NS, k).run(must_not_run)
    error = caught.value
    assert (error.owner, error.attempt) == ("api-7", 1)
    assert 0 < error.retry_after <= 1
    assert error.is_retryable and error.reason is None


async def test_with_wait_run_waits_for_the_running_attempt(client: Client) -> None:
    k = key()
    grant = await client.claim(NS, k)
    assert isinstance(grant, Grant)

    async def finish() -> None:
        await asyncio.sleep(0.5)
        await client.complete(NS, k, grant.lease_token, body("from the first"))

    finisher = asyncio.create_task(finish())
    outcome = await client.idempotent(NS, k, wait=5).run(must_not_run)
    await finisher
    assert outcome.replayed
    assert outcome.response == body("from the first")


async def test_a_wait_longer_than_the_servers_is_spread_over_several_claims(
    start_coordinator: Callable[..., CoordinatorProcess],
) -> None:
    # The server waits at most 300 ms per Claim: a 5 s wait takes several Claims, the first of
    # which learns the server's limit (INVALID_WAIT, limit 300ms).
    import grpc.aio

    from idempotency_coordinator._generated import coordinator_pb2_grpc as pb_grpc
    from tests._support import Served

    short = start_coordinator("--max-wait", "300ms")
    async with (
        grpc.aio.insecure_channel(short.address) as upstream,
        Served(LossyProxy(pb_grpc.CoordinatorStub(upstream))) as served,
        Client(served.url) as client,
    ):
        lossy: LossyProxy = served.servicer
        k = key()
        grant = await client.claim(NS, k)
        assert isinstance(grant, Grant)

        async def finish() -> None:
            await asyncio.sleep(1.2)
            await client.complete(NS, k, grant.lease_token, body("from the first"))

        finisher = asyncio.create_task(finish())
        outcome = await client.idempotent(NS, k, wait=5).run(must_not_run)
        await finisher
    assert outcome.replayed and outcome.response == body("from the first")
    waits = [claim.wait.ToMilliseconds() for claim in lossy.claims[1:]]
    assert waits[0] > 300, "the first Claim asked for the whole wait"
    assert len(waits) >= 4, waits
    assert all(wait <= 300 for wait in waits[1:]), waits


async def test_the_lease_is_renewed_while_the_work_outlives_it(
    proxy: tuple[LossyProxy, Client], client: Client
) -> None:
    lossy, through = proxy
    k = key()

    async def work(lease: Lease) -> Stored:
        # Four leases of 300 ms pass while the work runs.
        await asyncio.sleep(1.2)
        found = await client.claim(NS, k)
        assert isinstance(found, InProgress), f"the renewed lease still holds: {found}"
        assert not lease.is_lost
        return body("long work")

    outcome = await through.idempotent(NS, k, lease_ttl=0.3).run(work)
    assert not outcome.replayed
    assert lossy.renews >= 3
    view = await client.lookup(NS, k)
    assert (view.state, view.attempt) == (KeyState.COMPLETED, 1)


async def test_a_refused_renewal_sets_lost_and_run_does_not_complete(
    proxy: tuple[LossyProxy, Client], client: Client
) -> None:
    lossy, through = proxy
    lossy.fail_renewals = True
    k = key()

    async def work(lease: Lease) -> Stored:
        # The renewals do not get through; the lease lapses and someone takes the key over.
        await asyncio.sleep(0.5)
        grant = await client.claim(NS, k)
        assert isinstance(grant, Grant)
        assert grant.takeover and grant.fencing_token > lease.fencing_token
        await client.complete(NS, k, grant.lease_token, body("by the new holder"))
        lossy.fail_renewals = False
        await asyncio.wait_for(lease.lost.wait(), 5)
        assert lease.is_lost
        return body("by the stale holder")

    with pytest.raises(Rejected) as caught:
        await through.idempotent(NS, k, lease_ttl=0.3).run(work)
    assert caught.value.reason == Reason.LEASE_LOST
    assert lossy.completes == 0, "no Complete was attempted with the lost lease"
    assert lossy.releases == 0
    view = await client.lookup(NS, k)
    assert view.response == body("by the new holder")


async def test_a_lost_complete_reply_is_retried_with_the_same_token(
    proxy: tuple[LossyProxy, Client], client: Client
) -> None:
    lossy, through = proxy
    lossy.lose_complete_replies[0] = 2
    k = key()
    outcome = await through.idempotent(NS, k).run(lambda lease: asyncio.sleep(0, body("paid")))
    assert outcome.response == body("paid")
    assert lossy.completes == 3
    view = await client.lookup(NS, k)
    assert (view.state, view.response) == (KeyState.COMPLETED, body("paid"))


async def test_an_exception_releases_the_key_and_a_retry_runs_again(client: Client) -> None:
    k = key()

    async def timeout(lease: Lease) -> Stored:
        raise TimeoutError("the bank did not answer")

    with pytest.raises(Failed) as caught:
        await client.idempotent(NS, k).run(timeout)
    assert caught.value.stored is None
    assert isinstance(caught.value.__cause__, TimeoutError)
    assert caught.value.cause is caught.value.__cause__
    assert not caught.value.is_retryable
    assert (await client.lookup(NS, k)).state is KeyState.RELEASED

    leases: list[Lease] = []

    async def retry(lease: Lease) -> Stored:
        leases.append(lease)
        return body("paid on the retry")

    outcome = await client.idempotent(NS, k).run(retry)
    assert not outcome.replayed
    assert [(lease.attempt, lease.takeover) for lease in leases] == [(2, False)]


async def test_work_that_returns_no_stored_response_is_a_failure(client: Client) -> None:
    k = key()

    async def wrong(lease: Lease) -> Stored:
        return "not a Stored"  # type: ignore[return-value]

    with pytest.raises(Failed) as caught:
        await client.idempotent(NS, k).run(wrong)
    assert isinstance(caught.value.cause, TypeError)
    assert (await client.lookup(NS, k)).state is KeyState.RELEASED


async def test_a_final_failure_stores_its_response_and_retries_replay_it(client: Client) -> None:
    k = key()
    declined = Stored(b"card declined", {"status": "402"})

    async def decline(lease: Lease) -> Stored:
        raise FinalFailure(declined, "declined by the issuer")

    with pytest.raises(Failed) as caught:
        await client.idempotent(NS, k).run(decline)
    assert caught.value.stored == declined
    assert isinstance(caught.value.__cause__, FinalFailure)
    retry = await client.idempotent(NS, k).run(must_not_run)
    assert retry.replayed and retry.response == declined


async def test_an_abandoned_attempt_leaves_the_lease_to_lapse(client: Client) -> None:
    k = key()

    async def unknown(lease: Lease) -> Stored:
        raise AbandonFailure("the ledger did not say whether it wrote")

    with pytest.raises(Failed) as caught:
        await client.idempotent(NS, k, lease_ttl=0.3).run(unknown)
    assert caught.value.stored is None
    assert (await client.lookup(NS, k)).state is KeyState.IN_PROGRESS, "not released"
    await asyncio.sleep(0.4)
    leases: list[Lease] = []

    async def recover(lease: Lease) -> Stored:
        leases.append(lease)
        return body("recovered")

    await client.idempotent(NS, k).run(recover)
    assert [(lease.attempt, lease.takeover) for lease in leases] == [(2, True)]


async def test_a_cancelled_run_leaves_the_lease_to_lapse(client: Client) -> None:
    k = key()
    started = asyncio.Event()

    async def forever(lease: Lease) -> Stored:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    task = asyncio.create_task(client.idempotent(NS, k, lease_ttl=0.3).run(forever))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await client.lookup(NS, k)).state is KeyState.IN_PROGRESS, "not released"
    await asyncio.sleep(0.4)
    assert (await client.lookup(NS, k)).state is KeyState.LEASE_EXPIRED, "no renewal after cancel"
    leases: list[Lease] = []

    async def recover(lease: Lease) -> Stored:
        leases.append(lease)
        return body("recovered")

    await client.idempotent(NS, k).run(recover)
    assert [(lease.attempt, lease.takeover) for lease in leases] == [(2, True)]


async def test_thirty_two_concurrent_runs_of_one_key_run_the_work_once(client: Client) -> None:
    k = key()
    executions = 0

    async def work(lease: Lease) -> Stored:
        nonlocal executions
        executions += 1
        await asyncio.sleep(0.2)
        return body(f"paid under {lease.fencing_token}")

    outcomes = await asyncio.gather(
        *(client.idempotent(NS, k, wait=10).run(work) for _ in range(32))
    )
    assert executions == 1
    assert sum(not outcome.replayed for outcome in outcomes) == 1
    assert len({outcome.response.body for outcome in outcomes}) == 1
    assert len({outcome.fencing_token for outcome in outcomes}) == 1


async def test_an_unreachable_coordinator_is_retried_for_retry_for_then_unavailable() -> None:
    async with Client(f"http://127.0.0.1:{free_port()}") as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(Unavailable):
            await client.idempotent(NS, "k", retry_for=0.5).run(must_not_run)
        elapsed = loop.time() - started
    assert 0.2 < elapsed < 2.0, elapsed


def test_wait_limits_read_as_the_server_writes_them() -> None:
    assert parse_seconds("1m") == 60
    assert parse_seconds("1m 30s") == 90
    assert parse_seconds("500ms") == 0.5
    assert parse_seconds("300ms") == pytest.approx(0.3)
    assert parse_seconds("2h") == 7200
    assert parse_seconds("soon") is None
    assert parse_seconds("30days") is None
    assert parse_seconds("") is None


def test_backoff_grows_to_a_second_with_jitter_in_the_upper_half() -> None:
    backoff = Backoff()
    ceilings = [0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    for ceiling in ceilings:
        pause = backoff.next_pause()
        assert ceiling / 2 <= pause <= ceiling, (pause, ceiling)
