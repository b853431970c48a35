"""Tasks that wait on locks (tests/test_selfwait.py).

``mode`` says what run() does after writing its own row through the session:

``self``
    updates the same row through a second connection: it waits for its own
    session's lock (for ever on PostgreSQL; until the busy timeout on SQLite).
``self_engine``
    the same through an engine run() makes itself.
``other``
    updates a row of ``lock_target`` through a second connection, which the
    test holds locked for a few seconds: a wait, but not on itself.
``read``
    (PostgreSQL) a slow read on a second connection: no lock wait at all.
``clean``
    (SQLite) writes ``lock_target`` through a second connection *before* the
    session writes anything, while the test holds the database's write lock.
"""

from __future__ import annotations

import time

from sqlalchemy import Column, Engine, Integer, String, Table, create_engine, text, update
from sqlalchemy.orm import Mapped, mapped_column, object_session

from alchq import BaseQueue, metadata
from alchq.model import task_table

lock_target = Table(
    "lock_target",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("note", String(50)),
)


class LockTask(BaseQueue):
    alchq_time_limit = 60.0

    id: Mapped[int] = mapped_column(primary_key=True)
    mode: Mapped[str] = mapped_column(String(20))
    note: Mapped[str | None] = mapped_column(String(50))

    def run(self) -> None:
        run_in_mode(self, task_table(type(self)))


class QuickLockTask(BaseQueue):
    """The same, with a time limit of 3 s: how a self-wait ends."""

    alchq_time_limit = 3.0

    id: Mapped[int] = mapped_column(primary_key=True)
    mode: Mapped[str] = mapped_column(String(20))
    note: Mapped[str | None] = mapped_column(String(50))

    def run(self) -> None:
        run_in_mode(self, task_table(type(self)))


def run_in_mode(task: LockTask | QuickLockTask, table: Table) -> None:
    session = object_session(task)
    assert session is not None
    engine = session.get_bind()
    assert isinstance(engine, Engine)
    if task.mode == "clean":
        time.sleep(2)  # the test takes the write lock meanwhile
        with engine.begin() as conn:
            conn.execute(update(lock_target).where(lock_target.c.id == 1).values(note="x"))
    task.note = "started"
    session.flush()  # the task's transaction now holds its row (SQLite: the file)
    if task.mode == "self_engine":
        # The same, through an engine of run()'s own.
        own = create_engine(engine.url.render_as_string(hide_password=False))
        try:
            with own.begin() as conn:
                conn.execute(update(table).where(table.c.id == task.id).values(note="progress"))
        finally:
            own.dispose()
    with engine.begin() as conn:
        if task.mode == "self":
            conn.execute(update(table).where(table.c.id == task.id).values(note="progress"))
        elif task.mode == "other":
            conn.execute(update(lock_target).where(lock_target.c.id == 1).values(note="y"))
        elif task.mode == "read":
            mysql = conn.dialect.name in ("mysql", "mariadb")
            conn.execute(text("SELECT SLEEP(4)" if mysql else "SELECT pg_sleep(4)"))
    task.note = "done"
