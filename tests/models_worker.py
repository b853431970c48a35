"""Task models for tests/test_worker.py; importable by worker subprocesses.

All are seed-form models (mapped into ``alchq.metadata``) with a ``Wk``
prefix so that their table names are unique across the test suite. Module
state (events, lists) is how a task tells the test what it saw while running
in a worker thread; the ``reset()`` function clears it between tests.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from sqlalchemy import Integer, String, inspect, select
from sqlalchemy.orm import Mapped, Session, mapped_column, object_session

from alchq import BaseQueue, Status

#: Set by WkGate.run() once it is running; WkGate.run() then waits for GATE_RELEASE.
GATE_ENTERED = threading.Event()
GATE_RELEASE = threading.Event()
#: (task id, exception raised by run()) for every WkFail run.
RAISED: list[tuple[int, BaseException]] = []
#: One dict per WkFail.error() call: what error() saw.
ERROR_CALLS: list[dict[str, Any]] = []
#: task id -> whether object_session(self) is db.session() inside WkFlask.run().
FLASK_SEEN: dict[int, bool] = {}


def reset() -> None:
    GATE_ENTERED.clear()
    GATE_RELEASE.clear()
    RAISED.clear()
    ERROR_CALLS.clear()
    FLASK_SEEN.clear()


def _session(task: BaseQueue) -> Session:
    session = object_session(task)
    assert session is not None, f"{task!r} has no session inside run()"
    return session


class WkSide(BaseQueue):
    """Rows that other tasks' run()/error() add, to see what was committed."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(Integer)
    note: Mapped[str | None] = mapped_column(String(50))

    def run(self) -> None:
        pass


class WkPlain(BaseQueue):
    """Marks itself as run."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    note: Mapped[str | None] = mapped_column(String(50))

    def run(self) -> None:
        self.note = "ran"


class WkComposite(BaseQueue):
    """A task whose primary key has two columns."""

    tenant: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(20), primary_key=True)
    note: Mapped[str | None] = mapped_column(String(50))

    def run(self) -> None:
        self.note = "ran"


class WkSpawn(BaseQueue):
    """Creates ``children`` more generations of itself; ``fail`` makes it raise.

    error() creates one retry (the seed's pattern) while ``retries`` < 1.
    """

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    children: Mapped[int] = mapped_column(Integer, default=0)
    fail: Mapped[int] = mapped_column(Integer, default=0)
    retries: Mapped[int] = mapped_column(Integer, default=0)

    def run(self) -> None:
        if self.children:
            _session(self).add(WkSpawn(children=self.children - 1))
        if self.fail:
            raise ValueError(f"spawn {self.id} fails")

    def error(self, exc: BaseException) -> None:
        if self.retries < 1:
            session = _session(self)
            session.add(WkSpawn(fail=self.fail, retries=self.retries + 1))
            session.commit()


class WkGate(BaseQueue):
    """Changes itself and adds a WkSide row, then waits for GATE_RELEASE."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    note: Mapped[str | None] = mapped_column(String(50))

    def run(self) -> None:
        self.note = "ran"
        _session(self).add(WkSide(task_id=self.id, note="gate"))
        GATE_ENTERED.set()
        if not GATE_RELEASE.wait(20):
            raise RuntimeError("the test never released the gate")


def explode_in_wkfail(task_id: int) -> None:
    """A uniquely named function, to find in the stored traceback."""
    exc = ValueError(f"boom {task_id}")
    RAISED.append((task_id, exc))
    raise exc


class WkFail(BaseQueue):
    """Changes itself, adds (and flushes) a WkSide row, then raises ValueError.

    ``mode`` says what error() does besides recording what it saw:
    ``retry`` adds a WkFail retry and commits it, ``retry-nocommit`` adds one
    and leaves the commit to the worker, ``raise`` raises TypeError.
    """

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    note: Mapped[str | None] = mapped_column(String(50))
    mode: Mapped[str | None] = mapped_column(String(20))
    retries: Mapped[int] = mapped_column(Integer, default=0)

    def run(self) -> None:
        self.note = "changed by run"
        session = _session(self)
        session.add(WkSide(task_id=self.id, note="from run"))
        session.flush()
        explode_in_wkfail(self.id)

    def error(self, exc: BaseException) -> None:
        session = _session(self)
        bind = session.get_bind(mapper=inspect(type(self)))
        with Session(bind) as other:
            seen = other.scalar(select(WkFail.status).where(WkFail.id == self.id))
        ERROR_CALLS.append(
            {
                "id": self.id,
                "exc": exc,
                "status_seen_elsewhere": seen,
                "status": self.status,
                "error_type": self.alchq_error_type,
                "thread": threading.get_ident(),
            }
        )
        if self.mode in ("retry", "retry-nocommit") and self.retries < 1:
            session.add(WkFail(mode=self.mode, retries=self.retries + 1))
            if self.mode == "retry":
                session.commit()
        elif self.mode == "raise":
            raise TypeError(f"error handler of {self.id} broke")


class WkSelfStatus(BaseQueue):
    """Sets its own status to ``set_to`` in run(); raises afterwards if ``fail``."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    set_to: Mapped[str] = mapped_column(String(16))
    fail: Mapped[int] = mapped_column(Integer, default=0)
    note: Mapped[str | None] = mapped_column(String(50))

    def run(self) -> None:
        self.status = Status(self.set_to)
        self.note = "ran"
        if self.fail:
            raise ValueError("failed after setting status")


class WkFlask(BaseQueue):
    """Uses Flask-SQLAlchemy's db.session inside run() and adds a row without committing."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True)

    def run(self) -> None:
        from flask import current_app

        db = current_app.extensions["sqlalchemy"]
        FLASK_SEEN[self.id] = object_session(self) is db.session()
        db.session.add(WkSide(task_id=self.id, note="flask"))


class WkStopper(BaseQueue):
    """Raises SystemExit (a BaseException): ends the task in ERROR; the worker goes on."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True)

    def run(self) -> None:
        raise SystemExit(f"stopper {self.id}")


class WkSignalSelf(BaseQueue):
    """Sends SIGINT to its own process while running (for the in-process signal test)."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    note: Mapped[str | None] = mapped_column(String(50))

    def run(self) -> None:
        import signal

        os.kill(os.getpid(), signal.SIGINT)
        self.note = "finished after SIGINT"


class WkFlaskRetry(BaseQueue):
    """The seed's example under Flask: run() raises, error() retries through db.session."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    retries: Mapped[int] = mapped_column(Integer, default=0)

    def run(self) -> None:
        raise RuntimeError(f"flask retry {self.id} fails")

    def error(self, exc: BaseException) -> None:
        from flask import current_app

        db = current_app.extensions["sqlalchemy"]
        if self.retries < 2:
            db.session.add(WkFlaskRetry(retries=self.retries + 1))
            db.session.commit()


#: Primary key of the WkSide row that WkDuplicate.run() adds a second time.
DUPLICATE_SIDE_ID = 424242


class WkDuplicate(BaseQueue):
    """run() returns normally, but what it added cannot be flushed (duplicate key)."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    note: Mapped[str | None] = mapped_column(String(50))

    def run(self) -> None:
        self.note = "ran"
        _session(self).add(WkSide(id=DUPLICATE_SIDE_ID, task_id=self.id, note="duplicate"))
