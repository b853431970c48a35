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
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any, cast

from sqlalchemy import Column, Dialect, Engine, Integer, String, Table, insert, inspect
from sqlalchemy.orm import Mapped, mapped_column, object_session
from sqlalchemy.types import TypeDecorator

from alchq import BaseQueue, metadata

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

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    action: Mapped[str | None] = mapped_column(String(30), default="ok")
    sleep: Mapped[int | None] = mapped_column(Integer, default=0)
    errors: Mapped[int | None] = mapped_column(Integer, default=0)
    payload: Mapped[str | None] = mapped_column(Fragile(), nullable=True)

    def run(self) -> None:
        if self.action == "noop":
            return
        if self.action == "quiet":
            with open(os.path.join(os.environ["FAULT_QUIET_DIR"], f"{self.id}.starts"), "a") as f:
                f.write(f"{os.getpid()}\n")
            time.sleep((self.sleep or 0) / 1000)
            return
        session = object_session(self)
        assert session is not None
        bind = session.get_bind()
        engine = bind if isinstance(bind, Engine) else bind.engine
        with engine.connect() as conn:  # committed at once, whatever happens next
            conn.execute(insert(fault_start).values(task_id=self.id, pid=os.getpid()))
            conn.commit()
        action = self.action or "ok"
        if action == "spin":
            deadline = time.monotonic() + (self.sleep or 0) / 1000
            n = 0
            while time.monotonic() < deadline:
                n += 1
        elif self.sleep:
            time.sleep(self.sleep / 1000)
        if action == "own_connection":
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
        session.execute(insert(fault_done).values(task_id=self.id, pid=os.getpid()))

    def error(self, exc: BaseException) -> None:
        self.errors = (self.errors or 0) + 1
        if self.action == "bad_error":
            raise RuntimeError("error() failed too")


#: FaultTask's table, typed.
fault_task = cast(Table, inspect(FaultTask).local_table)
