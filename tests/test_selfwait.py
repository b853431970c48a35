"""A run() waiting for a lock its own task holds is reported within seconds.

Real ``alchq run`` processes (tests/lock_tasks.py) on SQLite and PostgreSQL;
the warning must come long before the task's time limit, and only for a wait
on the task's own lock.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select, text

from alchq import metadata
from alchq.model import task_table
from tests.conftest import ROOT, alchq_command, worker_env
from tests.lock_tasks import LockTask, QuickLockTask, lock_target
from tests.support import wait_until

TABLE = task_table(LockTask)
QUICK = task_table(QuickLockTask)
SELF_WAIT = "run() is waiting for a lock its own session holds"


@pytest.fixture
def eng(engine: Engine) -> Iterator[Engine]:
    metadata.create_all(engine, tables=[TABLE, QUICK, lock_target])
    with engine.begin() as conn:
        conn.execute(insert(lock_target).values(id=1, note=""))
    yield engine


class Worker:
    def __init__(self, db_url: str, log: Path, model: str = "LockTask") -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                alchq_command(
                    "run",
                    f"tests.lock_tasks:{model}",
                    "--database-url",
                    db_url,
                    "--poll-interval",
                    "0.2",
                ),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=worker_env(),
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


def _add(engine: Engine, mode: str) -> int:
    with engine.begin() as conn:
        key = conn.execute(insert(TABLE).values(mode=mode)).inserted_primary_key
        assert key is not None
        return int(key[0])


def _status(engine: Engine, task: int) -> str:
    with engine.connect() as conn:
        return str(conn.execute(select(TABLE.c.status).where(TABLE.c.id == task)).scalar_one())


@pytest.mark.parametrize("mode", ["self", "self_engine"])
def test_a_run_waiting_on_its_own_lock_is_reported_within_seconds(
    eng: Engine, db_url: str, tmp_path: Path, mode: str
) -> None:
    task = _add(eng, mode)
    worker = Worker(db_url, tmp_path / "worker.log")
    try:
        started = time.monotonic()
        wait_until(lambda: SELF_WAIT in worker.output(), 20, "the self-wait warning", worker.output)
        waited = time.monotonic() - started
        line = next(x for x in worker.output().splitlines() if SELF_WAIT in x)
        assert f"LockTask {task}: " in line and "WARNING" in line, line
        assert "time limit (60s)" in line, line
        # Seconds, not the time limit: the worker started, claimed and noticed.
        assert waited < LockTask.alchq_time_limit / 3, waited
        assert worker.output().count(SELF_WAIT) == 1
    finally:
        worker.kill()


def test_a_wait_on_someone_elses_lock_is_not_reported(
    eng: Engine, db_url: str, tmp_path: Path
) -> None:
    """The task's second connection waits on a lock the test holds, then goes on."""
    sqlite = eng.dialect.name == "sqlite"
    task = _add(eng, "clean" if sqlite else "other")
    worker = Worker(db_url, tmp_path / "worker.log")
    try:
        with eng.connect() as holder:
            if sqlite:
                # The claim needs the write lock: taken once the task is claimed.
                wait_until(
                    lambda: _status(eng, task) == "PROCESSING",
                    20,
                    "the claim",
                    worker.output,
                    interval=0.05,
                )
            holder.begin()
            # PostgreSQL: a row lock on lock_target 1; SQLite: the file's write lock.
            holder.execute(text("UPDATE lock_target SET note = 'held' WHERE id = 1"))
            wait_until(lambda: _status(eng, task) == "PROCESSING", 20, "the claim", worker.output)
            time.sleep(5)  # the task's statement waits on the test's lock meanwhile
            holder.rollback()
        wait_until(lambda: _status(eng, task) == "PROCESSED", 40, "the task to end", worker.output)
    finally:
        worker.kill()
    assert SELF_WAIT not in worker.output()


def test_a_slow_statement_that_waits_for_no_lock_is_not_reported(
    eng: Engine, db_url: str, tmp_path: Path
) -> None:
    if eng.dialect.name == "sqlite":
        pytest.skip("pg_sleep is PostgreSQL's")
    task = _add(eng, "read")
    worker = Worker(db_url, tmp_path / "worker.log")
    try:
        wait_until(lambda: _status(eng, task) == "PROCESSED", 30, "the task to end", worker.output)
    finally:
        worker.kill()
    assert SELF_WAIT not in worker.output()


def test_a_self_wait_ends_at_the_time_limit_once(eng: Engine, db_url: str, tmp_path: Path) -> None:
    """Interrupted at its time limit, the task ends in ERROR, not re-run as an outage.

    On PostgreSQL, run()'s second connection is left mid-statement by the
    interrupt and its clean-up fails ("another command is already in progress");
    the outcome is still the time-out.
    """
    with eng.begin() as conn:
        conn.execute(insert(QUICK).values(id=1, mode="self"))
    worker = Worker(db_url, tmp_path / "worker.log", model="QuickLockTask")
    try:

        def ended() -> Any:
            with eng.connect() as conn:
                return conn.execute(
                    select(QUICK.c.status, QUICK.c.alchq_attempts, QUICK.c.alchq_error_type).where(
                        QUICK.c.status == "ERROR"
                    )
                ).first()

        row = wait_until(ended, 40, "the task to end in ERROR", worker.output)
        assert tuple(row) == ("ERROR", 1, "alchq.exceptions.TaskTimeoutError"), worker.output()
        out = worker.output()
        assert out.index(SELF_WAIT) < out.index("time limit of 3s"), out
    finally:
        worker.kill()


def test_on_sqlite_a_self_wait_ends_at_the_busy_timeout_without_retries(
    eng: Engine, db_url: str, tmp_path: Path
) -> None:
    """SQLite gives up on the lock after its busy timeout (30 s), long before the time
    limit: "database is locked" is then the task's failure, not an outage (it was
    taken for one and re-run for ever), and not retried (it would wait again)."""
    if eng.dialect.name != "sqlite":
        pytest.skip("PostgreSQL waits until the time limit (the test above)")
    task = _add(eng, "self")
    worker = Worker(db_url, tmp_path / "worker.log")
    try:

        def ended() -> Any:
            with eng.connect() as conn:
                return conn.execute(
                    select(TABLE.c.status, TABLE.c.alchq_attempts, TABLE.c.alchq_error_message)
                    .where(TABLE.c.id == task, TABLE.c.status != "PROCESSING")
                    .where(TABLE.c.status != "PENDING")
                ).first()

        row = wait_until(ended, 50, "the task to end", worker.output)
        assert (row[0], row[1]) == ("ERROR", 1), worker.output()
        assert "database is locked" in row[2], row
        assert "not retried" in worker.output()
    finally:
        worker.kill()
