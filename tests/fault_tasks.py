"""Task models for the fault tests; importable by worker subprocesses.

Every start is logged in ``fault_start`` on its own connection and committed at
once (so starts survive the run's rollback); every committed run is logged in
``fault_done`` inside the task's transaction (so it commits with PROCESSED).
"""

from __future__ import annotations

import os
import signal
import sys
import time

from sqlalchemy import Column, Integer, String, Table, insert
from sqlalchemy.orm import object_session

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


class FaultTask(BaseQueue):
    """``action`` picks the behaviour; ``sleep`` (ms) is spent before it."""

    alchq_time_limit = float(os.environ.get("FAULT_TIME_LIMIT", "3600"))

    id = Column(Integer, primary_key=True)
    action = Column(String(30), default="ok")
    sleep = Column(Integer, default=0)
    errors = Column(Integer, default=0)

    def run(self) -> None:
        session = object_session(self)
        assert session is not None
        bind = session.get_bind()
        with bind.connect() as conn:  # committed at once, whatever happens next
            conn.execute(insert(fault_start).values(task_id=self.id, pid=os.getpid()))
            conn.commit()
        if self.sleep:
            time.sleep(self.sleep / 1000)
        action = self.action or "ok"
        if action == "sys_exit":
            sys.exit(3)
        if action == "keyboard_interrupt":
            raise KeyboardInterrupt
        if action == "os_exit":
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
        session.execute(insert(fault_done).values(task_id=self.id, pid=os.getpid()))

    def error(self, exc: BaseException) -> None:
        self.errors = (self.errors or 0) + 1
        if self.action == "bad_error":
            raise RuntimeError("error() failed too")
