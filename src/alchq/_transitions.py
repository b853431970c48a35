"""The SQL of each state change of a task row, as expressions: no I/O here.

::

    ready        PENDING and due                    -> claimed (claim_values)
    claimed      PROCESSING, ours (still_ours)      -> an outcome, or released()
    expired      PROCESSING, lease run out          -> released() + lost claim, by a rescuer

docs/state_machine.md draws them all.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Table, case

from alchq._dialects import reached, utc_now
from alchq.model import MAX_COUNTER, Status


def bump(counter: Any) -> Any:
    """``counter + 1``, but never past the CHECK constraint's bound (a hand-edited row)."""
    return case((counter < MAX_COUNTER, counter + 1), else_=MAX_COUNTER)


def ready(table: Table) -> ColumnElement[bool]:
    """Due tasks only, on the database's clock."""
    c = table.c
    return (c.status == Status.PENDING) & reached(c.run_at, utc_now())


def claim_order(table: Table) -> list[Any]:
    """Most urgent (lowest priority number) first, then oldest first, then by key."""
    c = table.c
    return [c.priority, c.time_created, *table.primary_key.columns]


def claim_values(worker_id: str, lease: float, **extra: Any) -> dict[str, Any]:
    """A claim: PROCESSING, owned by ``worker_id``, leased for ``lease`` seconds."""
    return {
        "status": Status.PROCESSING,
        "alchq_worker": worker_id,
        "alchq_started_at": utc_now(),
        "alchq_finished_at": None,
        "alchq_lease_until": utc_now(lease),
        "time_updated": utc_now(),
        **extra,
    }


def released() -> dict[str, Any]:
    """Column values that put a claimed task back to PENDING, unowned."""
    return {
        "status": Status.PENDING,
        "alchq_worker": None,
        "alchq_lease_until": None,
        "time_updated": utc_now(),
    }


def unclaimed(table: Table) -> dict[str, Any]:
    """Column values that hand back a claim whose task never started: PENDING, and the
    claim is not counted in ``alchq_attempts`` (the fence still saw the bumped value)."""
    attempts = table.c.alchq_attempts
    return {**released(), "alchq_attempts": case((attempts > 0, attempts - 1), else_=0)}


def still_ours(table: Table, worker_id: str, token: int) -> ColumnElement[bool]:
    """The fence of every write that ends or renews a claim: PROCESSING, our owner, our token."""
    c = table.c
    return (
        (c.status == Status.PROCESSING)
        & (c.alchq_worker == worker_id)
        & (c.alchq_attempts == token)
    )


def expired(table: Table) -> ColumnElement[bool]:
    """PROCESSING rows whose lease ran out (or that never had one: written by hand)."""
    c = table.c
    return (c.status == Status.PROCESSING) & (
        c.alchq_lease_until.is_(None) | reached(c.alchq_lease_until, utc_now(), strict=True)
    )
