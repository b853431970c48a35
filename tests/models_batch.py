"""Task models of the batch tests: each run's effect is a ``batch_done`` row.

``batch_done`` is written in run()'s own transaction, so "its effect exists
exactly when it is PROCESSED, once" can be counted in the database.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Session, object_session

from alchq import BaseQueue
from tests.fault_tasks import Fragile

batch_metadata = MetaData()

batch_done = Table(
    "batch_done",
    batch_metadata,
    Column("id", Integer, primary_key=True),
    Column("task_id", Integer, nullable=False),
)
batch_error = Table(
    "batch_error",
    batch_metadata,
    Column("id", Integer, primary_key=True),
    Column("task_id", Integer, nullable=False),
)


class BatchBase(DeclarativeBase):
    metadata = batch_metadata


def _session(task: Any) -> Session:
    session = object_session(task)
    assert session is not None
    return session


#: Ids of the runs started in this process, in order (the tests run workers in-process).
STARTS: list[int] = []
#: Called by run() of action ``stolen`` with the task's id (set by a test).
STEAL: list[Any] = []


class _Actions:
    """``action``: what run() does after writing its effect."""

    id: Any
    action: Any
    sleep: Any

    def run(self) -> None:
        STARTS.append(self.id)
        session = _session(self)
        if self.action == "noop":
            return
        if self.action == "stolen":
            STEAL[0](self.id)  # someone else takes the row over meanwhile
            return
        if self.action == "stolen_write":
            STEAL[0](self.id)
        table = type(self).__table__  # type: ignore[attr-defined]
        if self.action == "delete_self":
            session.execute(insert(batch_done).values(task_id=self.id))
            session.execute(delete(table).where(table.c.id == self.id))
            return
        if self.action == "tamper":  # changes alchq's own counter by SQL
            session.execute(insert(batch_done).values(task_id=self.id))
            session.execute(
                update(table)
                .where(table.c.id == self.id)
                .values(alchq_failures=table.c.alchq_failures + 1)
            )
            return
        if self.action == "sleep":
            time.sleep(float(self.sleep or 0))
        if self.action in ("dirty_raise", "dirty_core_raise"):
            self.sleep = "9"  # changed in memory, never saved
        if self.action == "dirty_raise":
            raise ValueError("this task fails before sending anything")
        if self.action == "dirty_query_raise":
            with session.no_autoflush:  # its query does not flush the change first
                self.sleep = "9"
                session.execute(select(batch_done.c.id).limit(1))
            raise ValueError("this task fails after a query")
        if self.action in ("core", "core_raise", "dirty_core_raise"):
            # Not through the session's execute(): straight on its connection.
            session.connection().execute(insert(batch_done).values(task_id=self.id))
            if self.action != "core":
                raise ValueError("this task fails")
            return
        session.execute(insert(batch_done).values(task_id=self.id))
        if self.action == "raise":
            raise ValueError("this task fails")
        if self.action == "commit":
            session.commit()
        elif self.action == "rollback":
            # Rolls back its own write, then writes its effect again.
            session.rollback()
            session.execute(insert(batch_done).values(task_id=self.id))

    def error(self, exc: BaseException) -> None:
        session = _session(self)
        session.execute(insert(batch_error).values(task_id=self.id))
        session.commit()


class BatchTask(_Actions, BaseQueue, BatchBase):
    id = Column(Integer, primary_key=True)
    action = Column(String(20), nullable=False, default="ok")
    sleep = Column(String(10), nullable=True)
    payload = Column(Fragile, nullable=True)
    alchq_time_limit = 2.0


class SoloTask(_Actions, BaseQueue, BatchBase):
    """Opted out of sharing commits."""

    id = Column(Integer, primary_key=True)
    action = Column(String(20), nullable=False, default="ok")
    sleep = Column(String(10), nullable=True)
    alchq_batch = 1
