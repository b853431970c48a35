"""What happened to one run, as plain data, before anyone persists it.

The executor returns an :class:`Outcome` on every path; the recorder turns it
into column values (:meth:`Outcome.values`) and writes it. The retry policy
and snoozes are decided here (:func:`failed`), not where the outcome is written.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table
from sqlalchemy.orm import Session, SessionTransaction

from alchq import _text
from alchq._dialects import utc_now
from alchq._held import Held
from alchq._transitions import bump, released
from alchq.exceptions import WorkerLostError
from alchq.model import BaseQueue, Status
from alchq.scheduling import Retry, Snooze


class Kind(enum.Enum):
    """How a run ended."""

    PROCESSED = "PROCESSED"
    #: failed for good: ERROR, then error()
    ERROR = "ERROR"
    #: failed, with attempts left in the retry policy: PENDING again later
    RETRY = "RETRY"
    #: ``raise Snooze(...)``: PENDING again later, not a failure
    SNOOZE = "SNOOZE"
    #: back to PENDING unchanged (the worker is stopping, or the database lost the run)
    RELEASE = "RELEASE"
    #: the row was deleted after it was claimed: nothing to record
    GONE = "GONE"
    #: the database lost the run (its connection, while the database was up):
    #: PENDING again, one more lost claim
    LOST = "LOST"
    #: cancelled while it ran (its writes rolled back): CANCELLED
    CANCELLED = "CANCELLED"
    #: the row cannot be loaded because the model and the table disagree (a
    #: deploy in progress): PENDING again, left for a worker whose code matches
    MISMATCH = "MISMATCH"


@dataclass(frozen=True)
class Outcome:
    """The end of one run, before it is persisted."""

    kind: Kind
    exc: BaseException | None = None
    traceback: str | None = None
    #: RETRY and SNOOZE: run again in this many seconds.
    again_in: float | None = None
    #: what the log line says instead of the exception, if set
    detail: str | None = None
    #: PROCESSED: did run() write through the task's session (writes a lost
    #: connection takes with it)?
    had_writes: bool = False
    #: RELEASE: the database went away during the run; record once it is back.
    away: bool = False
    #: ERROR: also counts a lost claim (the last of a task's lost connections).
    lost: bool = False

    @property
    def status(self) -> Status:
        """The status the row gets."""
        if self.kind in (Kind.PROCESSED, Kind.ERROR, Kind.CANCELLED):
            return Status(self.kind.value)
        return Status.PENDING

    def describe(self) -> str | None:
        """What the log line says of this outcome: the detail, or the exception in one line."""
        if self.detail is not None:
            return self.detail
        return None if self.exc is None else _text.describe(self.exc)

    @property
    def failed(self) -> bool:
        """Does this run count as a failure (``alchq_failures``)? A snooze does not."""
        return self.kind in (Kind.ERROR, Kind.RETRY)

    def values(self, table: Table) -> dict[str, Any]:
        """The row's new column values."""
        if self.kind in (Kind.RELEASE, Kind.MISMATCH):
            return released()
        if self.kind is Kind.LOST:
            return {**released(), "alchq_lost_claims": bump(table.c.alchq_lost_claims)}
        values: dict[str, Any] = {"status": self.status, "time_updated": utc_now()}
        if self.status is Status.PENDING:
            values.update(released())
            values["run_at"] = utc_now(self.again_in or 0.0)
        else:
            values["alchq_finished_at"] = utc_now()
            # No lease left. (The recorder gives an ERROR one for its error() call.)
            values["alchq_lease_until"] = None
        if self.lost:
            values["alchq_lost_claims"] = bump(table.c.alchq_lost_claims)
        if self.failed:
            assert self.exc is not None
            # Whatever the exception carries, cleaned: it must not break this write.
            values["alchq_failures"] = bump(table.c.alchq_failures)
            values["alchq_error_type"] = _text.type_name(self.exc)
            values["alchq_error_message"] = _text.message(self.exc)
            values["alchq_traceback"] = _text.traceback_text(self.traceback)
        elif self.status is Status.PROCESSED:
            values.update(alchq_error_type=None, alchq_error_message=None, alchq_traceback=None)
        return values


@dataclass
class Ran:
    """A run's outcome, its task object (if it loaded) and the session to record it in."""

    outcome: Outcome
    task: BaseQueue | None
    session: Session
    #: In a batch: the task's SAVEPOINT, still open on a PROCESSED outcome (its
    #: outcome is written inside it, the batch commits them together); None if
    #: run() sent no SQL.
    savepoint: SessionTransaction | None = None
    #: A PROCESSED outcome of a batched run: recorded with the batch's.
    batched: bool = False
    #: In a batch: run() itself committed, rolled back or closed the session.
    ended_transaction: bool = False


PROCESSED = Outcome(Kind.PROCESSED)
RELEASE = Outcome(Kind.RELEASE)


#: How a run that lost to a concurrent transaction (a serialization failure, a
#: deadlock, a busy SQLite file) is retried when its model has no retry policy.
#: Concurrent transactions under SERIALIZABLE conflict often, and PostgreSQL asks
#: for the losers to be run again: ten runs, with waits spread wide.
CONFLICT_RETRY = Retry(attempts=10, delay=0.2, backoff=2.0, max_delay=5.0, jitter=0.5)


def failed(held: Held, exc: BaseException, tb: str | None) -> Outcome:
    """The outcome of a run that raised: a snooze, a retry (the model's policy), or ERROR."""
    if isinstance(exc, Snooze):
        return Outcome(Kind.SNOOZE, exc, None, again_in=exc.seconds)
    policy = held.model.alchq_retry
    if policy is None and held.dialect.is_conflict(exc):
        policy = CONFLICT_RETRY
    failures = held.failures + 1
    if policy is not None and policy.retries(exc, failures):
        return Outcome(Kind.RETRY, exc, tb, again_in=policy.wait(failures))
    return Outcome(Kind.ERROR, exc, tb)


def lost_connection(held: Held, exc: BaseException, max_lost: int) -> Outcome:
    """A run whose connection the database dropped while it stayed up: a lost claim,
    and ERROR once that happened ``max_lost`` times (it would happen forever)."""
    if held.lost_claims + 1 < max_lost:
        return Outcome(Kind.LOST, exc)
    gone = WorkerLostError(
        f"{held.label} lost its database connection during its run {max_lost} times while "
        "the database stayed up (a server-side timeout such as "
        f"idle_in_transaction_session_timeout, or a killed connection); giving up: "
        f"{_text.describe(exc)}"
    )
    return Outcome(Kind.ERROR, gone, None, lost=True)
