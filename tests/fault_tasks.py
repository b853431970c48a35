"""Task models for the fault tests; importable by worker subprocesses.

Every start is logged in ``fault_start`` on its own connection and committed at
once (so starts survive the run's rollback); every committed run is logged in
``fault_done`` inside the task's transaction (so it commits with PROCESSED).

Actions (``FaultTask.action``), after ``sleep`` milliseconds:

``ok``                  log the run in ``fault_done`` and return
``sys_exit``            ``sys.exit(3)``
``keyboard_interrupt``  ``raise KeyboardInterrupt``
``raise``               ``raise ValueError("task failed")``
``bad_error``           ``raise ValueError`` in run(), then error() raises too
``os_exit``             ``os._exit(9)``: the worker process dies mid-run
``os_exit_once``        ``os._exit(9)`` on the first attempt only, ``ok`` afterwards
``kill_self``           SIGKILL to its own process
``hang``                sleep forever (interruptible)
``hang_hard``           sleep forever, swallowing every exception thrown at it
``spin``                spend ``sleep`` ms busy in Python (never sleeping), then ``ok``
``noop``                nothing at all (not even a ``fault_start`` row)
``own_connection``      log the start (as all do, on a connection of its own), then
                        return without writing through the task's session
``quiet``               no database writes at all: the start is logged in a file,
                        ``$FAULT_QUIET_DIR/<id>.starts``, and nothing is done

Actions of the hardening issue (see tests/faults/test_hardening.py):

``other_db``            connect to a second database that is down (``$FAULT_DEAD_URL``)
``sqlite_unopenable``   open an SQLite file that cannot be opened
``statement_timeout``   a statement of its own session cancelled by statement_timeout
``lock_timeout``        wait for its own row, locked by another connection, until lock_timeout
``idle_timeout``        write, then idle in its transaction past idle_in_transaction_session_timeout
``serialize_once``      a serialization failure of its own writes, on its first run only
``serialize_always``    a serialization failure of its own writes, every run
``swallow``             catch a database error and return normally
``nul`` ``surrogate`` ``bad_str`` ``huge``   raise ValueError with an unstorable message
``close_session``       write, close its session, return
``close_raise``         close its session, then raise
``expunge``             expunge itself from its session, then write through it
``error_closes``        raise; its error() changes the task, then closes the session
``set_status``          write, set ``self.status``
``core_status``         write, set its status with an UPDATE through its session
``set_attempts``        write, set ``self.alchq_attempts``
``delete_self``         write, delete its own row
``slow_error``          raise; error() counts, flushes, then sleeps 5 s (interruptible)
``hard_error_once``     raise; the first error() counts, flushes, then cannot be interrupted
``error_blip``          raise; the first error() counts, flushes, says so in a file, waits 2 s
``cte_write``           write in a ``WITH ... INSERT`` (PostgreSQL)
``function_write``      write through a SQL function, ``SELECT fault_write(...)``
``pg_sleep``            a 10 s ``SELECT pg_sleep(10)`` through its session
``flush_fails``         add a row that breaks a NOT NULL constraint at flush
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, cast

from sqlalchemy import (
    Column,
    Dialect,
    Engine,
    Integer,
    String,
    Table,
    create_engine,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Mapped, Session, mapped_column, object_session
from sqlalchemy.types import TypeDecorator

from alchq import BaseQueue, Retry, Status, metadata
from tests.support import worker_pid

fault_start = Table(
    "fault_start",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("task_id", Integer, nullable=False),
    Column("pid", Integer, nullable=False),
)
fault_done = Table(
    "fault_done",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("task_id", Integer, nullable=False),
    Column("pid", Integer, nullable=False),
)
#: One row (id 1) that the serialize_* actions fight over.
fault_counter = Table(
    "fault_counter",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("n", Integer, nullable=False),
)


class BadMessage(Exception):
    """Its ``__str__`` itself fails."""

    def __str__(self) -> str:
        raise RuntimeError("no message for you")


def _hold_the_gil(seconds: float) -> None:
    """Sleep in C without releasing the interpreter (a long C call, a catastrophic regex)."""
    ctypes.PyDLL(None).sleep(int(seconds))


def _marker(name: str) -> Path:
    return Path(os.environ.get("FAULT_MARKERS", "/tmp")) / name


#: Actions that spend ``sleep`` themselves, after writing.
SLEEPS_ITSELF = frozenset({"idle_timeout", "cte_write", "function_write", "gil", "gil_hard"})


def _retry() -> Retry | None:
    attempts = os.environ.get("FAULT_RETRY")
    return Retry(attempts=int(attempts), delay=0.2, backoff=1, jitter=0) if attempts else None


#: A ``payload`` holding this value cannot be loaded (see :class:`Fragile`).
UNLOADABLE = "unloadable"


class Fragile(TypeDecorator[str]):
    """A string column whose value :data:`UNLOADABLE` fails to load, on any database."""

    impl = String(100)
    cache_ok = True

    def process_result_value(self, value: Any, dialect: Dialect) -> str | None:
        if value == UNLOADABLE:
            raise ValueError(f"payload {value!r} cannot be loaded")
        return value  # type: ignore[no-any-return]


class FaultTask(BaseQueue):
    """``action`` picks the behaviour; ``sleep`` (ms) is spent before it."""

    alchq_time_limit = float(os.environ.get("FAULT_TIME_LIMIT", "3600"))
    alchq_error_time_limit = float(os.environ.get("FAULT_ERROR_TIME_LIMIT", "60"))
    alchq_retry = _retry()

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    action: Mapped[str | None] = mapped_column(String(30), default="ok")
    sleep: Mapped[int | None] = mapped_column(Integer, default=0)
    errors: Mapped[int | None] = mapped_column(Integer, default=0)
    payload: Mapped[str | None] = mapped_column(Fragile(), nullable=True)

    def run(self) -> None:
        if self.action == "noop":
            return
        if self.action in ("quiet", "filed"):
            with open(os.path.join(os.environ["FAULT_QUIET_DIR"], f"{self.id}.starts"), "a") as f:
                f.write(f"{worker_pid()}\n")
            time.sleep((self.sleep or 0) / 1000)
            if self.action == "filed":
                # Its effect in its own transaction, and no other connection (which
                # on SQLite would keep its tasks out of batches).
                session = object_session(self)
                assert session is not None
                session.execute(insert(fault_done).values(task_id=self.id, pid=worker_pid()))
            return
        session = object_session(self)
        assert session is not None
        bind = session.get_bind()
        engine = bind if isinstance(bind, Engine) else bind.engine
        with engine.connect() as conn:  # committed at once, whatever happens next
            conn.execute(insert(fault_start).values(task_id=self.id, pid=worker_pid()))
            conn.commit()
        action = self.action or "ok"
        if action == "spin":
            deadline = time.monotonic() + (self.sleep or 0) / 1000
            n = 0
            while time.monotonic() < deadline:
                n += 1
        elif self.sleep and action not in SLEEPS_ITSELF:
            time.sleep(self.sleep / 1000)
        if action == "own_connection":
            return
        if self._hardening(action, session, engine):
            return
        if action == "sys_exit":
            sys.exit(3)
        if action == "keyboard_interrupt":
            raise KeyboardInterrupt
        if action == "os_exit" or (action == "os_exit_once" and self.alchq_attempts <= 1):
            os._exit(9)
        if action == "hang":
            while True:
                time.sleep(0.05)
        if action == "hang_hard":
            # Uninterruptible: ignore every exception thrown at us.
            deadline = time.monotonic() + 3600
            while time.monotonic() < deadline:
                try:
                    time.sleep(0.05)
                except BaseException:  # noqa: S110
                    pass
        if action == "kill_self":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "raise":
            raise ValueError("task failed")
        if action == "bad_error":
            raise ValueError("task failed, and its error() will fail too")
        session.execute(insert(fault_done).values(task_id=self.id, pid=worker_pid()))

    def _hardening(self, action: str, session: Session, engine: Engine) -> bool:
        """The hardening issue's actions; True if ``action`` was one that returns."""
        write = insert(fault_done).values(task_id=self.id, pid=worker_pid())
        if action == "other_db":
            create_engine(os.environ["FAULT_DEAD_URL"]).connect()
        elif action == "sqlite_unopenable":
            create_engine("sqlite:////nonexistent/directory/x.sqlite").connect()
        elif action == "statement_timeout":
            session.execute(text("SET LOCAL statement_timeout = 100"))
            session.execute(text("SELECT pg_sleep(2)"))
        elif action == "lock_timeout":
            with engine.connect() as other:
                other.execute(
                    select(fault_task.c.id).where(fault_task.c.id == self.id).with_for_update()
                )
                session.execute(text("SET LOCAL lock_timeout = 100"))
                try:
                    session.execute(
                        select(fault_task.c.id).where(fault_task.c.id == self.id).with_for_update()
                    )
                finally:
                    other.rollback()
        elif action == "idle_timeout":
            session.execute(text("SET LOCAL idle_in_transaction_session_timeout = 300"))
            session.execute(write)
            time.sleep((self.sleep or 800) / 1000)
            return True
        elif action in ("serialize_once", "serialize_always"):
            counter = fault_counter.c
            session.execute(select(counter.n).where(counter.id == 1)).scalar_one()  # snapshot
            if action == "serialize_always" or self.alchq_attempts <= 1:
                with engine.begin() as other:  # a concurrent transaction wins
                    other.execute(update(fault_counter).values(n=counter.n + 1))
            session.execute(update(fault_counter).values(n=counter.n + 1))
        elif action == "swallow":
            try:
                session.execute(text("SELECT 1/0"))
            except DBAPIError:
                pass  # and carry on, as if nothing happened
            return True
        elif action == "nul":
            raise ValueError("a NUL \x00 in the middle")
        elif action == "surrogate":
            raise ValueError("a lone surrogate: \udc80 here")
        elif action == "bad_str":
            raise ValueError(BadMessage())
        elif action == "huge":
            raise ValueError("x" * 10_000_000)
        elif action == "close_session":
            session.execute(write)
            session.close()
            return True
        elif action == "close_raise":
            session.close()
            raise ValueError("closed, then failed")
        elif action == "expunge":
            session.expunge(self)
        elif action == "error_closes":
            raise ValueError("fails; its error() closes the session")
        elif action == "set_status":
            session.execute(write)
            self.status = Status.PROCESSED
            return True
        elif action == "core_status":
            session.execute(write)
            session.execute(
                update(fault_task).where(fault_task.c.id == self.id).values(status="PROCESSED")
            )
            return True
        elif action == "set_attempts":
            session.execute(write)
            self.alchq_attempts = 99
            return True
        elif action == "delete_self":
            session.execute(write)
            session.delete(self)
            return True
        elif action in ("slow_error", "hard_error_once", "error_blip"):
            raise ValueError(f"{action}: fails, then error() misbehaves")
        elif action == "cte_write":
            session.execute(
                text(
                    "WITH d AS (INSERT INTO fault_done (task_id, pid) VALUES (:t, :p) "
                    "RETURNING id) SELECT id FROM d"
                ),
                {"t": self.id, "p": worker_pid()},
            )
            time.sleep((self.sleep or 0) / 1000)
            return True
        elif action == "function_write":
            session.execute(text("SELECT fault_write(:t, :p)"), {"t": self.id, "p": worker_pid()})
            time.sleep((self.sleep or 0) / 1000)
            return True
        elif action == "pg_sleep":
            session.execute(text("SELECT pg_sleep(10)"))
        elif action == "flush_fails":
            # NOT NULL refuses it; the statement's parameters carry a task value (a token).
            session.execute(insert(fault_task).values(action=self.payload, status=None))
        elif action == "gil":
            _hold_the_gil((self.sleep or 0) / 1000)
        elif action == "gil_hard":
            while True:
                try:
                    _hold_the_gil(3600)
                except BaseException:  # noqa: S110 - ignores every interrupt
                    pass
        else:
            return False
        session.execute(write)
        return True

    def error(self, exc: BaseException) -> None:
        self.errors = (self.errors or 0) + 1
        if self.action == "bad_error":
            raise RuntimeError("error() failed too")
        session = object_session(self)
        assert session is not None
        if self.action == "error_closes":
            session.close()
        elif self.action == "slow_error":
            session.flush()
            time.sleep(5)
        elif self.action == "hard_error_once":
            session.flush()
            marker = _marker(f"{self.id}.hard_error")
            if not marker.exists():
                marker.touch()
                deadline = time.monotonic() + 3600
                while time.monotonic() < deadline:
                    try:
                        time.sleep(0.05)
                    except BaseException:  # noqa: S110 - uninterruptible
                        pass
        elif self.action == "error_blip":
            session.flush()
            marker = _marker(f"{self.id}.in_error")
            if not marker.exists():
                marker.touch()
                time.sleep(2)


#: FaultTask's table, typed.
fault_task = cast(Table, inspect(FaultTask).local_table)
