"""The one-call helper: :meth:`Idempotent.run` claims a key, runs your mutation once, keeps its
lease alive, stores its response (or releases the key), and replays the stored response to every
retry. The same semantics as the Rust client's ``Idempotent::run``."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, TypeVar

from .errors import Failed, InProgressError, Invalid, Reason, Rejected
from .types import Duration, Grant, InProgress, Replay, Stored, seconds

if TYPE_CHECKING:
    from .client import Client

__all__ = [
    "DEFAULT_RETRY_FOR",
    "AbandonFailure",
    "FinalFailure",
    "Idempotent",
    "Lease",
    "Outcome",
]

logger = logging.getLogger("idempotency_coordinator")

#: The longest wait one Claim asks for; a longer wait is spread over several Claims.
LONGEST_SERVER_WAIT = 60.0
#: How long indeterminate calls are retried unless told otherwise, in seconds.
DEFAULT_RETRY_FOR = 30.0
#: The shortest pause between renewals.
SHORTEST_RENEWAL_INTERVAL = 0.030
#: A Claim answered faster than this did not wait at all (the server did not honour the wait).
_UNWAITED = 0.005

T = TypeVar("T")


class FinalFailure(Exception):
    """Raise it from the work for a final failure (a declined card): ``response`` is stored, and
    every retry replays it. ``run`` then raises :class:`~idempotency_coordinator.Failed` with
    ``stored`` set."""

    def __init__(self, response: Stored, message: str = "a final failure") -> None:
        super().__init__(message)
        self.response = response


class AbandonFailure(Exception):
    """Raise it from the work for a failure whose effects are unknown (the work may have partly
    happened): neither released nor stored, the lease is left to lapse, and the next attempt
    takes the key over (:attr:`Lease.takeover` is true there), as after a crash."""


@dataclass
class Lease:
    """The lease your work runs under."""

    #: Strictly increases with every grant of the key: write it with your mutation so that your
    #: own storage can refuse a stale holder's late writes.
    fencing_token: int
    #: 1 for the key's first grant, +1 for each later one.
    attempt: int
    #: The previous holder's lease lapsed without Complete or Release: it may have partly run
    #: the mutation, so check for its effects before running it again.
    takeover: bool
    #: Set once the lease is lost (a renewal was refused: someone else holds the key now). Stop
    #: the work: whatever it would write is fenced off, and ``run`` will not complete.
    lost: asyncio.Event

    @property
    def is_lost(self) -> bool:
        """Whether the lease is lost."""
        return self.lost.is_set()


@dataclass(frozen=True)
class Outcome:
    """What ``run`` ended with."""

    #: The stored response: this run's, or an earlier run's.
    response: Stored
    #: True when the response came from an earlier run (this call ran nothing).
    replayed: bool
    #: The fencing token of the grant whose response this is.
    fencing_token: int


Work = Callable[[Lease], Awaitable[Stored]]


class Idempotent:
    """A mutation to run once per key: build it with :meth:`Client.idempotent
    <idempotency_coordinator.Client.idempotent>`, then :meth:`run` it.

    What ``run`` does:

    - Claims the key with a fresh random request id. A Claim whose outcome is unknown (the
      coordinator unavailable, a deadline, a broken connection) is retried with the same request
      id, with exponential backoff (25 ms to 1 s) and jitter, for up to ``retry_for`` (30 s): if
      the first Claim won the lease and only its reply was lost, the retry gets that lease back.
    - A completed key: returns its stored response (``replayed`` is true) without calling the
      work.
    - A key in progress elsewhere: raises :class:`~idempotency_coordinator.InProgressError`, or
      with ``wait`` waits for the running attempt (asking again while the wait is not spent, in
      steps of the server's longest wait if it refuses a longer one) and returns its response.
    - Acquired: calls ``work(lease)`` and renews the lease every third of its length while the
      work runs. If a renewal is refused (someone took the key over after the lease lapsed),
      ``lease.lost`` is set so the work can stop, and ``run`` raises
      :class:`~idempotency_coordinator.Rejected` (``LEASE_LOST``) without completing.
    - The work's return value is stored with Complete (retried with the same lease token when its
      outcome is unknown; a repeated Complete returns the first result).
    - An exception from the work releases the key, so that a retry runs it again, and ``run``
      raises :class:`~idempotency_coordinator.Failed`. A :class:`FinalFailure` stores its response
      instead (``Failed.stored``); an :class:`AbandonFailure` leaves the lease to lapse.
    - A ``run`` task that is cancelled (the caller's request went away) releases nothing: the
      mutation may have partly happened, so the lease lapses and the next holder sees
      ``lease.takeover``.
    """

    def __init__(
        self,
        client: Client,
        namespace: str,
        key: str,
        *,
        fingerprint: bytes = b"",
        lease_ttl: Duration | None = None,
        retention: Duration | None = None,
        wait: Duration = 0.0,
        owner: str = "",
        retry_for: Duration = DEFAULT_RETRY_FOR,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.key = key
        self.fingerprint = fingerprint
        self.lease_ttl = None if lease_ttl is None else seconds(lease_ttl)
        self.retention = None if retention is None else seconds(retention)
        self.wait = max(0.0, seconds(wait))
        self.owner = owner
        self.retry_for = seconds(retry_for)

    async def run(self, work: Work) -> Outcome:
        """Runs ``work`` once for the key, or replays what an earlier run stored (see
        :class:`Idempotent`)."""
        acquired = await self._acquire()
        if isinstance(acquired, Outcome):
            return acquired
        grant = acquired
        lease = Lease(
            fencing_token=grant.fencing_token,
            attempt=grant.attempt,
            takeover=grant.takeover,
            lost=asyncio.Event(),
        )
        renewals = asyncio.create_task(self._renew_while_running(grant, lease))
        response: Stored | None = None
        failure: Exception | None = None
        try:
            try:
                response = await work(lease)
                if not isinstance(response, Stored):
                    raise TypeError(
                        f"the work must return a Stored response, not {type(response).__name__}"
                    )
            except Exception as error:  # the work's failure; cancellation is not one
                failure = error
        finally:
            renewals.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewals
        if lease.is_lost:
            raise Rejected(
                "the lease was lost while the work ran", reason=Reason.LEASE_LOST
            ) from failure
        token = grant.lease_token
        if failure is None:
            assert response is not None
            stored = response
            await self._retrying(
                lambda: self.client.complete(
                    self.namespace, self.key, token, stored, retention=self.retention
                )
            )
            return Outcome(response=response, replayed=False, fencing_token=grant.fencing_token)
        if isinstance(failure, FinalFailure):
            final = failure.response
            await self._retrying(
                lambda: self.client.complete(
                    self.namespace, self.key, token, final, retention=self.retention
                )
            )
            raise Failed(failure, stored=final) from failure
        if isinstance(failure, AbandonFailure):
            raise Failed(failure) from failure
        # Best effort: if the Release does not get through, the lease lapses and the next
        # attempt takes over, which is safe too.
        try:
            await self._retrying(lambda: self.client.release(self.namespace, self.key, token))
        except Exception as error:
            logger.warning(
                "releasing %s/%s after a failed attempt did not succeed: %s",
                self.namespace,
                self.key,
                error,
            )
        raise Failed(failure) from failure

    async def _acquire(self) -> Grant | Outcome:
        """Claims until the key is acquired or completed, within the caller's wait."""
        loop = asyncio.get_running_loop()
        request_id = str(uuid.uuid4())
        wait_until = loop.time() + self.wait
        longest_wait = LONGEST_SERVER_WAIT
        while True:
            remaining = max(0.0, wait_until - loop.time())
            claim_wait = None if remaining == 0 else min(remaining, longest_wait)
            asked = loop.time()
            try:
                outcome = await self._retrying(
                    functools.partial(
                        self.client.claim,
                        self.namespace,
                        self.key,
                        fingerprint=self.fingerprint,
                        lease_ttl=self.lease_ttl,
                        retention=self.retention,
                        wait=claim_wait,
                        request_id=request_id,
                        owner=self.owner,
                    )
                )
            except Invalid as error:
                # A server whose longest wait is shorter says so: wait in steps of that length.
                limit = parse_seconds(error.limit) if error.limit is not None else None
                if (
                    error.reason == Reason.INVALID_WAIT
                    and limit is not None
                    and limit < longest_wait
                ):
                    longest_wait = limit
                    continue
                raise
            if isinstance(outcome, Grant):
                return outcome
            if isinstance(outcome, Replay):
                return Outcome(
                    response=outcome.response, replayed=True, fencing_token=outcome.fencing_token
                )
            busy: InProgress = outcome
            remaining = max(0.0, wait_until - loop.time())
            if remaining == 0:
                raise InProgressError(busy.retry_after, busy.owner, busy.attempt)
            # A wait the server cut short (its own maximum, a call deadline) is asked again; one
            # it did not honour at all is paced by its hint.
            if loop.time() - asked < _UNWAITED:
                await asyncio.sleep(min(max(busy.retry_after, _UNWAITED), remaining))

    async def _renew_while_running(self, grant: Grant, lease: Lease) -> None:
        """Renews the lease every third of its length; on LEASE_LOST, says so and stops."""
        if self.lease_ttl is not None:
            ttl = self.lease_ttl
        else:
            ttl = max(0.0, (grant.lease_expires_at - datetime.now(timezone.utc)).total_seconds())
        every = max(ttl / 3, SHORTEST_RENEWAL_INTERVAL)
        while True:
            await asyncio.sleep(every)
            try:
                await self.client.renew(
                    self.namespace, self.key, grant.lease_token, lease_ttl=self.lease_ttl
                )
            except Rejected as error:
                if error.reason in (Reason.LEASE_LOST, Reason.ALREADY_COMPLETED):
                    lease.lost.set()
                    return
                logger.debug("a lease renewal was refused; trying again: %s", error)
            except Exception as error:
                # Unknown or transient: the next renewal tries again, well before the lease ends.
                logger.debug("a lease renewal failed; trying again: %s", error)

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """Calls ``call`` until its outcome is known or ``retry_for`` is spent."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.retry_for
        backoff = Backoff()
        while True:
            try:
                return await call()
            except Exception as error:
                if not getattr(error, "is_indeterminate", False):
                    raise
                pause = backoff.next_pause()
                if loop.time() + pause >= give_up_at:
                    raise
                await asyncio.sleep(pause)


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"([0-9]+)([a-z]+)")


def parse_seconds(text: str) -> float | None:
    """Reads a limit the server wrote as a duration (``60s``, ``1m``, ``1m 30s``, ``500ms``), in
    seconds; None for anything else."""
    total = 0.0
    for part in text.split():
        match = _PART.fullmatch(part)
        if match is None or match.group(2) not in _UNITS:
            return None
        total += int(match.group(1)) * _UNITS[match.group(2)]
    return total if total > 0 else None


class Backoff:
    """Exponential backoff from 25 ms to 1 s, each pause drawn from the upper half of its
    ceiling (jitter), so that clients that failed together do not retry together."""

    def __init__(self) -> None:
        self._next = 0.025

    def next_pause(self) -> float:
        ceiling = self._next
        self._next = min(self._next * 2, 1.0)
        return random.uniform(ceiling / 2, ceiling)
