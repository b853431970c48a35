"""Task models with periodic schedules, for tests/test_periodic.py and its workers.

They use their own declarative base (the mixin form), so importing this module
adds nothing to ``alchq.metadata``: ``PeriodicBase.metadata.create_all()``
creates these tables and ``alchq_ticks``.

Which tick created a task: the scheduler inserts ``(schedule, tick)`` into
``alchq_ticks`` and then, on the same connection and in the same transaction,
the task. An engine event notes the tick of that INSERT on the connection and
a ``before_insert`` event writes it into the task's ``tick`` column, so each
task row says which tick it was created for (``alchq_ticks`` itself keeps only
the latest tick of a schedule). Tasks not made by the scheduler get NULL.

Every ``run()`` logs itself into ``pq_run_log`` in the transaction that records
PROCESSED, so "processed exactly once" can be counted in the database.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Column, Engine, Integer, String, Table, event, insert
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, object_session
from sqlalchemy.sql.dml import Insert

from alchq import BaseQueue, Periodic, UTCDateTime
from tests.support import worker_pid


class PeriodicBase(DeclarativeBase):
    pass


metadata = PeriodicBase.metadata

run_log = Table(
    "pq_run_log",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("model", String(50), nullable=False),
    Column("task_id", Integer, nullable=False),
    Column("pid", Integer, nullable=False),
)

_TICK_KEY = "pq_tick"


class _Logged(BaseQueue):
    """Logs each run in pq_run_log; ``tick`` is the tick that created the task."""

    __abstract__ = True

    id: Mapped[int] = mapped_column(primary_key=True)
    tick: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    def run(self) -> None:
        session = object_session(self)
        assert session is not None
        session.execute(
            insert(run_log).values(model=type(self).__name__, task_id=self.id, pid=worker_pid())
        )


class PqHeadline(_Logged, PeriodicBase):
    """The headline test's schedule: every second."""

    __tablename__ = "pq_headline"
    alchq_periodic = [Periodic("* * * * * *")]


class PqCatchUp(_Logged, PeriodicBase):
    __tablename__ = "pq_catch_up"
    alchq_periodic = [Periodic(every=1)]


class PqYearly(_Logged, PeriodicBase):
    """Due once a year (1 January, 00:00 UTC): its latest tick is always long past."""

    __tablename__ = "pq_yearly"
    alchq_periodic = [Periodic("0 0 1 1 *")]


class PqNoCatchUp(_Logged, PeriodicBase):
    """catch_up=False: the long-past yearly tick is skipped, the on-time one is not."""

    __tablename__ = "pq_no_catch_up"
    kind: Mapped[str | None] = mapped_column(String(20))
    alchq_periodic = [
        Periodic("0 0 1 1 *", values={"kind": "yearly"}, catch_up=False, late_after=1),
        Periodic(every=1, values={"kind": "secondly"}, catch_up=False, late_after=30),
    ]


class PqTwo(_Logged, PeriodicBase):
    """Two schedules on one model, told apart by ``kind``."""

    __tablename__ = "pq_two"
    kind: Mapped[str | None] = mapped_column(String(20))
    alchq_periodic = [
        Periodic(every=1, values={"kind": "every"}),
        Periodic("* * * * * *", values={"kind": "cron"}),
    ]


class PqNamed(_Logged, PeriodicBase):
    """A named schedule; tests swap ``alchq_periodic`` to change it."""

    __tablename__ = "pq_named"
    kind: Mapped[str | None] = mapped_column(String(20))
    alchq_periodic = [Periodic("0 0 1 1 *", name="yearly", values={"kind": "v1"})]


class PqSingle(_Logged, PeriodicBase):
    """``alchq_periodic`` may be one Periodic instead of a list."""

    __tablename__ = "pq_single"
    alchq_periodic = Periodic("0 0 1 1 *")  # type: ignore[assignment]


class PqLaggard(_Logged, PeriodicBase):
    __tablename__ = "pq_laggard"
    alchq_periodic = [Periodic(every=1)]


class PqNotNull(_Logged, PeriodicBase):
    """Its schedule omits a NOT NULL column: the database refuses every task it makes."""

    __tablename__ = "pq_not_null"
    label: Mapped[str] = mapped_column(String(20), nullable=False)
    alchq_periodic = [Periodic(every=1)]


class PqSteady(_Logged, PeriodicBase):
    """A healthy model served next to PqNotNull."""

    __tablename__ = "pq_steady"
    kind: Mapped[str | None] = mapped_column(String(20))
    alchq_periodic = [Periodic(every=1, values={"kind": "scheduled"})]


# -- models the worker must refuse (their tables are never created) ---------------


class PqUnknownColumn(_Logged, PeriodicBase):
    __tablename__ = "pq_unknown_column"
    alchq_periodic = [Periodic(every=60, values={"no_such_column": 1})]


class PqNotAPeriodic(_Logged, PeriodicBase):
    __tablename__ = "pq_not_a_periodic"
    alchq_periodic = ["* * * * *"]  # type: ignore[list-item]


# -- recording the tick of each task ------------------------------------------------------


@event.listens_for(Engine, "after_execute")
def _note_tick(conn: Any, clauseelement: Any, *args: Any) -> None:
    if isinstance(clauseelement, Insert) and clauseelement.table is metadata.tables.get(
        "alchq_ticks"
    ):
        params = clauseelement.compile(dialect=conn.dialect).params
        conn.info[_TICK_KEY] = (params["schedule"], params["tick"])


@event.listens_for(_Logged, "before_insert", propagate=True)
def _stamp_tick(mapper: Any, conn: Any, target: _Logged) -> None:
    noted = conn.info.pop(_TICK_KEY, None)
    if noted is not None and noted[0].startswith(f"{mapper.local_table.name}:"):
        target.tick = noted[1]
