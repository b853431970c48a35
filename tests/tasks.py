"""Task models shared by the tests; importable by worker subprocesses.

``CountTask`` logs every committed run into ``run_log`` in the same
transaction as PROCESSED, so "processed exactly once" can be counted in the
database.
"""

from __future__ import annotations

import os
import time
from typing import Any

from sqlalchemy import Column, Dialect, ForeignKey, Integer, String, Table, insert
from sqlalchemy.orm import object_session
from sqlalchemy.sql.dml import Insert
from sqlalchemy.types import TypeDecorator

from alchq import BaseQueue, metadata
from tests.support import worker_pid

run_log = Table(
    "run_log",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("task_id", Integer, nullable=False),
    # The ``alchq run`` command's pid, and the worker process's that ran it.
    Column("pid", Integer, nullable=False),
    Column("process", Integer, nullable=False),
)


def ran(task_id: Any) -> Insert:
    """The run_log row of a run of ``task_id`` in this process."""
    return insert(run_log).values(task_id=task_id, pid=worker_pid(), process=os.getpid())


class CountTask(BaseQueue):
    """Records each run in run_log; ``sleep`` makes it slow, ``fail`` makes it raise."""

    id = Column(Integer, primary_key=True)
    sleep = Column(Integer, default=0)  # milliseconds
    fail = Column(String(50), nullable=True)

    def run(self) -> None:
        if self.sleep:
            time.sleep(self.sleep / 1000)
        session = object_session(self)
        assert session is not None
        session.execute(ran(self.id))
        if self.fail:
            raise RuntimeError(self.fail)


class Parent(BaseQueue):
    """A task with a foreign key target, for relationship tests."""

    id = Column(Integer, primary_key=True)
    note = Column(String(50))

    def run(self) -> None:
        self.note = "ran"  # type: ignore[assignment]


class Child(BaseQueue):
    id = Column(Integer, primary_key=True)
    parent_id = Column(Integer, ForeignKey("parent.id"))

    def run(self) -> None:
        pass


class BrokenKey(TypeDecorator[int]):
    """An integer key that cannot be read back from the database."""

    impl = Integer
    cache_ok = True

    def process_result_value(self, value: Any, dialect: Dialect) -> int:
        raise RuntimeError("this key cannot be read back")


class DyingTask(BaseQueue):
    """Claiming one kills the worker that tries (an unexpected error inside alchq)."""

    id = Column(BrokenKey, primary_key=True)

    def run(self) -> None:  # pragma: no cover - never gets this far
        pass
