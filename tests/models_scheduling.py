"""Task models for tests/test_scheduling.py; importable by worker subprocesses.

Seed-form models (mapped into ``alchq.metadata``) with a ``Sch`` prefix, so
their table names are unique across the test suite. What the tasks did is
recorded in three tables:

``sch_run_log``
    written by run() through the task's own session, so it is committed
    together with PROCESSED and rolled back with a failed or snoozed run.
``sch_attempt_log``
    written by run() on a connection of its own, committed at once: one row
    per run whatever its outcome, with the database's time and the run_at
    and alchq_started_at the row had when the run began.
``sch_error_log``
    written by error() through the task's session and committed by it: one
    row per error() call.

``race_enqueue()`` runs the unique-key race between processes.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any

from sqlalchemy import Column, Engine, Integer, String, Table, create_engine, insert
from sqlalchemy.orm import Mapped, Session, mapped_column, object_session

from alchq import BaseQueue, Retry, Snooze, UTCDateTime, metadata
from alchq._dialects import dialect_for, utc_now
from tests.support import worker_pid

run_log = Table(
    "sch_run_log",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("model", String(50), nullable=False),
    Column("task_id", Integer, nullable=False),
    Column("pid", Integer, nullable=False),
)

attempt_log = Table(
    "sch_attempt_log",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("model", String(50), nullable=False),
    Column("task_id", Integer, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("run_at", UTCDateTime(), nullable=False),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("at", UTCDateTime(), server_default=utc_now(), nullable=False),
)

error_log = Table(
    "sch_error_log",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("model", String(50), nullable=False),
    Column("task_id", Integer, nullable=False),
    Column("exc_type", String(50), nullable=False),
    Column("message", String(255), nullable=False),
)

EXCEPTIONS: dict[str, type[BaseException]] = {
    "ValueError": ValueError,
    "TypeError": TypeError,
    "SystemExit": SystemExit,
}


def _session(task: BaseQueue) -> Session:
    session = object_session(task)
    assert session is not None, f"{task!r} has no session"
    return session


def _id(task: BaseQueue) -> int:
    return int(task.id)  # type: ignore[attr-defined]


def record_attempt(task: BaseQueue) -> None:
    """One sch_attempt_log row, committed at once on a connection of its own."""
    bind = _session(task).get_bind()
    engine = bind if isinstance(bind, Engine) else bind.engine
    assert task.alchq_started_at is not None
    with engine.begin() as conn:
        conn.execute(
            insert(attempt_log).values(
                model=type(task).__name__,
                task_id=_id(task),
                attempt=task.alchq_attempts,
                run_at=task.run_at,
                started_at=task.alchq_started_at,
            )
        )


def record_run(task: BaseQueue) -> None:
    """One sch_run_log row, in the task's transaction (kept only if it is PROCESSED)."""
    _session(task).execute(
        insert(run_log).values(model=type(task).__name__, task_id=_id(task), pid=worker_pid())
    )


def record_error(task: BaseQueue, exc: BaseException) -> None:
    session = _session(task)
    session.execute(
        insert(error_log).values(
            model=type(task).__name__,
            task_id=_id(task),
            exc_type=type(exc).__name__,
            message=str(exc)[:255],
        )
    )
    session.commit()


class SchTask(BaseQueue):
    """Sleeps ``sleep_ms``, logs the run; raises RuntimeError(fail) if ``fail`` is set."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    label: Mapped[str | None] = mapped_column(String(50))
    sleep_ms: Mapped[int] = mapped_column(Integer, default=0)
    fail: Mapped[str | None] = mapped_column(String(50))

    def run(self) -> None:
        if self.sleep_ms:
            time.sleep(self.sleep_ms / 1000)
        record_attempt(self)
        record_run(self)
        if self.fail:
            raise RuntimeError(self.fail)

    def error(self, exc: BaseException) -> None:
        record_error(self, exc)


class SchOrdered(BaseQueue):
    """Only logs its run (in its own transaction): for order tests, with little to do."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    label: Mapped[str | None] = mapped_column(String(50))

    def run(self) -> None:
        record_run(self)


class SchRetry(BaseQueue):
    """Three runs in all, waits of about 0.3 s then 0.6 s; every Exception retried.

    The first ``fail_runs`` runs raise ``exc`` (by name, see EXCEPTIONS).
    """

    alchq_retry = Retry(attempts=3, delay=0.3, backoff=2.0, jitter=0.1)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    fail_runs: Mapped[int] = mapped_column(Integer, default=0)
    exc: Mapped[str] = mapped_column(String(20), default="ValueError")
    note: Mapped[str | None] = mapped_column(String(50))

    def run(self) -> None:
        record_attempt(self)
        record_run(self)
        self.note = f"run {self.alchq_attempts}"
        if self.alchq_attempts <= self.fail_runs:
            raise EXCEPTIONS[self.exc](f"run {self.alchq_attempts} of {self.id} fails")

    def error(self, exc: BaseException) -> None:
        record_error(self, exc)


class SchRetryValue(BaseQueue):
    """Like SchRetry, but only ValueError is retried."""

    alchq_retry = Retry(attempts=3, delay=0.3, backoff=2.0, jitter=0.1, on=(ValueError,))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    fail_runs: Mapped[int] = mapped_column(Integer, default=0)
    exc: Mapped[str] = mapped_column(String(20), default="ValueError")

    def run(self) -> None:
        record_attempt(self)
        if self.alchq_attempts <= self.fail_runs:
            raise EXCEPTIONS[self.exc](f"run {self.alchq_attempts} of {self.id} fails")

    def error(self, exc: BaseException) -> None:
        record_error(self, exc)


class SchSeedRetry(BaseQueue):
    """No retry policy: the seed's behaviour. Generations below ``fail`` raise ValueError;
    error() adds the next generation as a new row (the seed's retry pattern), up to 2,
    with the same unique_key."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    fail: Mapped[int] = mapped_column(Integer, default=0)
    retries: Mapped[int] = mapped_column(Integer, default=0)

    def run(self) -> None:
        record_attempt(self)
        record_run(self)
        if self.retries < self.fail:
            raise ValueError(f"generation {self.retries} fails")

    def error(self, exc: BaseException) -> None:
        if self.retries < 2:  # the retry keeps the unique key: this task no longer holds it
            retry = SchSeedRetry(
                fail=self.fail, retries=self.retries + 1, unique_key=self.unique_key
            )
            _session(self).add(retry)
        record_error(self, exc)


class SchSnooze(BaseQueue):
    """Snoozes 1 s on its first run, then succeeds.

    Its retry policy allows a single run, so a snooze counted as a failure
    would end it in ERROR.
    """

    alchq_retry = Retry(attempts=1)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    note: Mapped[str | None] = mapped_column(String(50))

    def run(self) -> None:
        record_attempt(self)
        record_run(self)
        self.note = f"run {self.alchq_attempts}"
        if self.alchq_attempts == 1:
            raise Snooze(1)

    def error(self, exc: BaseException) -> None:
        record_error(self, exc)


class SchHard(BaseQueue):
    """Overruns its 0.5 s time limit on its first run, ignoring every interruption
    (so its worker process is replaced); its second run succeeds."""

    alchq_retry = Retry(attempts=2, delay=0.2)
    alchq_time_limit = 0.5

    id: Mapped[int] = mapped_column(Integer, primary_key=True)

    def run(self) -> None:
        record_attempt(self)
        if self.alchq_attempts > 1:
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                time.sleep(0.05)
            except BaseException:  # noqa: S110 - uninterruptible on purpose
                pass

    def error(self, exc: BaseException) -> None:
        record_error(self, exc)


def race_enqueue() -> None:
    """``python -c`` body, arguments URL KEY N: N processes enqueue KEY at the same moment.

    Imports once, then forks N children (cheaper than N interpreters); each
    makes its own engine and connection, says it is ready, waits for the
    common start signal, enqueues KEY, commits and prints one JSON line
    ``{"pid", "id", "created"}``. Exits 1 if any child failed.
    """
    url, key, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    # Import the driver and alchq's dialect once, here, not in every child.
    # create_engine() does not connect: the children share no connection.
    dialect_for(create_engine(url))
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    children = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(ready_r)
                os.close(go_w)
                _race_child(url, key, ready_w, go_r)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children.append(pid)
    os.close(ready_w)
    os.close(go_r)
    readies = b""
    while len(readies) < n:
        chunk = os.read(ready_r, n)
        if not chunk:
            break  # a child died before it was ready
        readies += chunk
    os.write(go_w, b"g" * n)  # everyone goes at once
    os.close(go_w)
    failed = 0
    for pid in children:
        _, status = os.waitpid(pid, 0)
        failed += status != 0
    if failed or len(readies) < n:
        raise SystemExit(f"{failed} of {n} children failed, {len(readies)} were ready")


def _race_child(url: str, key: str, ready_w: int, go_r: int) -> None:
    args: dict[str, Any] = {"timeout": 30} if url.startswith("sqlite") else {}
    engine = create_engine(url, connect_args=args)
    with engine.connect():
        pass  # the pool keeps the connection: the race is not about connecting
    os.write(ready_w, b"r")
    if os.read(go_r, 1) != b"g":
        raise RuntimeError("never told to start")
    with Session(engine) as session:
        task, created = SchTask.enqueue(session, unique_key=key, label=f"pid {os.getpid()}")
        task_id = task.id
        session.commit()
    line = json.dumps({"pid": os.getpid(), "id": task_id, "created": created}) + "\n"
    os.write(1, line.encode())
    engine.dispose()
