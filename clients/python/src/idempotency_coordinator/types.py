"""The values the client's calls take and return, as Python types (seconds as floats, aware UTC
datetimes, bytes bodies), converted from and to the protocol's messages here and nowhere else."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from google.protobuf import duration_pb2, timestamp_pb2

from ._generated import coordinator_pb2 as pb

#: A duration: seconds as a number, or a :class:`datetime.timedelta`.
Duration = float | timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def seconds(value: Duration) -> float:
    """A duration in seconds (a float), from seconds or a ``timedelta``."""
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value)


def to_pb_duration(value: Duration) -> duration_pb2.Duration:
    """A ``google.protobuf.Duration``; negative durations are sent as they are (the server refuses
    them with its reason)."""
    total = seconds(value)
    whole = int(total)
    nanos = round((total - whole) * 1_000_000_000)
    if nanos >= 1_000_000_000:
        whole, nanos = whole + 1, nanos - 1_000_000_000
    return duration_pb2.Duration(seconds=whole, nanos=nanos)


def from_pb_duration(value: duration_pb2.Duration) -> float:
    return value.seconds + value.nanos / 1_000_000_000


def from_pb_timestamp(value: timestamp_pb2.Timestamp) -> datetime:
    return _EPOCH + timedelta(seconds=value.seconds, microseconds=value.nanos // 1000)


@dataclass
class Stored:
    """A response as the coordinator stores and replays it: the body your API sent, and whatever
    else it needs to replay it (status code, headers) as metadata, by name."""

    body: bytes = b""
    metadata: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> str | None:
        """The metadata entry ``name``, if stored."""
        return self.metadata.get(name)

    def to_pb(self) -> pb.Response:
        return pb.Response(body=self.body, metadata=self.metadata)

    @staticmethod
    def from_pb(response: pb.Response) -> Stored:
        return Stored(body=bytes(response.body), metadata=dict(response.metadata))


@dataclass(frozen=True)
class Grant:
    """A lease granted to you (the ``acquired`` outcome of a Claim)."""

    #: The secret that proves you hold the key (for Complete, Renew, Release). Never log it.
    lease_token: str
    #: Strictly increases with every grant of the key: pass it to your own storage to fence off
    #: stale holders.
    fencing_token: int
    #: When the lease lapses unless renewed.
    lease_expires_at: datetime
    #: 1 for the first grant of the key, +1 for every later one.
    attempt: int
    #: The previous holder's lease lapsed without Complete or Release: it may have partly run the
    #: mutation.
    takeover: bool


@dataclass(frozen=True)
class InProgress:
    """Someone else holds the key (the ``in_progress`` outcome of a Claim)."""

    #: When the holder's lease lapses unless renewed.
    lease_expires_at: datetime
    #: The holder's attempt.
    attempt: int
    #: The holder's owner name.
    owner: str
    #: When it is worth asking again, in seconds (the time left on the lease, at most 1 s).
    retry_after: float


@dataclass(frozen=True)
class Replay:
    """A completed key's stored response (the ``completed`` outcome of a Claim)."""

    #: The response, byte for byte.
    response: Stored
    #: When it was stored.
    completed_at: datetime
    #: When the key is forgotten.
    expires_at: datetime
    #: The fencing token of the grant that completed it.
    fencing_token: int


#: What a Claim found.
ClaimOutcome = Grant | InProgress | Replay


@dataclass(frozen=True)
class Completion:
    """What a Complete did."""

    #: When the response was stored (the first time, for a repeated Complete).
    completed_at: datetime
    #: When the key is forgotten.
    expires_at: datetime
    #: The completing grant's fencing token.
    fencing_token: int
    #: This token had completed the key before; the first response is kept.
    already_completed: bool


@dataclass(frozen=True)
class Renewal:
    """What a Renew did."""

    #: The lease's new end.
    lease_expires_at: datetime
    #: The holder's fencing token.
    fencing_token: int


class KeyState(enum.Enum):
    """Where a key stands."""

    #: Someone holds a valid lease.
    IN_PROGRESS = "IN_PROGRESS"
    #: The lease lapsed without Complete or Release: the next Claim takes it over.
    LEASE_EXPIRED = "LEASE_EXPIRED"
    #: The holder released the key: the next Claim acquires it.
    RELEASED = "RELEASED"
    #: The response is stored.
    COMPLETED = "COMPLETED"


@dataclass(frozen=True)
class KeyView:
    """What Lookup returns."""

    state: KeyState
    #: The fingerprint the key is bound to (empty: none).
    fingerprint: bytes
    #: The latest grant's fencing token.
    fencing_token: int
    #: The latest grant's attempt.
    attempt: int
    #: The latest grant's owner.
    owner: str
    #: The lease's end, for held keys (IN_PROGRESS, LEASE_EXPIRED).
    lease_expires_at: datetime | None
    #: The stored response, for completed keys.
    response: Stored | None
    #: When the response was stored.
    completed_at: datetime | None
    #: When the key is forgotten.
    expires_at: datetime


def claim_outcome_from_pb(reply: pb.ClaimResponse) -> ClaimOutcome | None:
    outcome = reply.WhichOneof("outcome")
    if outcome == "acquired":
        grant = reply.acquired
        return Grant(
            lease_token=grant.lease_token,
            fencing_token=grant.fencing_token,
            lease_expires_at=from_pb_timestamp(grant.lease_expires_at),
            attempt=grant.attempt,
            takeover=grant.takeover,
        )
    if outcome == "in_progress":
        busy = reply.in_progress
        return InProgress(
            lease_expires_at=from_pb_timestamp(busy.lease_expires_at),
            attempt=busy.attempt,
            owner=busy.owner,
            retry_after=from_pb_duration(busy.retry_after),
        )
    if outcome == "completed":
        done = reply.completed
        return Replay(
            response=Stored.from_pb(done.response),
            completed_at=from_pb_timestamp(done.completed_at),
            expires_at=from_pb_timestamp(done.expires_at),
            fencing_token=done.fencing_token,
        )
    return None


_STATES = {
    pb.KEY_STATE_UNSPECIFIED: KeyState.IN_PROGRESS,
    pb.KEY_STATE_IN_PROGRESS: KeyState.IN_PROGRESS,
    pb.KEY_STATE_LEASE_EXPIRED: KeyState.LEASE_EXPIRED,
    pb.KEY_STATE_RELEASED: KeyState.RELEASED,
    pb.KEY_STATE_COMPLETED: KeyState.COMPLETED,
}


def key_view_from_pb(view: pb.LookupResponse) -> KeyView:
    return KeyView(
        state=_STATES.get(view.state, KeyState.IN_PROGRESS),
        fingerprint=bytes(view.fingerprint),
        fencing_token=view.fencing_token,
        attempt=view.attempt,
        owner=view.owner,
        lease_expires_at=(
            from_pb_timestamp(view.lease_expires_at) if view.HasField("lease_expires_at") else None
        ),
        response=Stored.from_pb(view.response) if view.HasField("response") else None,
        completed_at=(
            from_pb_timestamp(view.completed_at) if view.HasField("completed_at") else None
        ),
        expires_at=from_pb_timestamp(view.expires_at),
    )
