"""An idle worker starts a new task at once, not at its next poll.

The workers here poll every 60 s: a task that starts within seconds was
announced. PostgreSQL: a real ``alchq run`` process, woken by LISTEN/NOTIFY
for tasks committed with a plain ``session.add()`` + ``commit()`` in another
process; its listener reconnects after its backend is killed. SQLite: a
worker in the same process is woken by the commit.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine, make_url, select, text
from sqlalchemy.orm import Session

from alchq import Status, metadata
from alchq.worker import Worker
from tests.conftest import ROOT, alchq_command, worker_env
from tests.support import wait_until
from tests.tasks import CountTask, run_log

POLL = "60"


@pytest.fixture
def eng(engine: Engine) -> Iterator[Engine]:
    metadata.create_all(engine)
    yield engine


def _pg(eng: Engine) -> None:
    if eng.dialect.name != "postgresql":
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's")


def _enqueue(engine: Engine) -> int:
    with Session(engine) as session:
        task = CountTask()
        session.add(task)
        session.commit()
        return int(task.id)


def _ran(engine: Engine, task: int) -> bool:
    with engine.connect() as conn:
        return (
            conn.execute(select(run_log.c.id).where(run_log.c.task_id == task)).first() is not None
        )


def _listener_pids(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT pid FROM pg_stat_activity WHERE query = 'LISTEN \"alchq\"'")
        )
        return [int(r[0]) for r in rows]


@pytest.fixture
def pg_worker(eng: Engine, db_url: str, tmp_path: Path) -> Iterator[tuple[Engine, Path]]:
    _pg(eng)
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            alchq_command(
                "run", "tests.tasks:CountTask", "--database-url", db_url, "--poll-interval", POLL
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=worker_env(),
        )
    try:
        wait_until(lambda: "serving" in log.read_text(), 30, "the worker to start", log.read_text)
        wait_until(lambda: _listener_pids(eng), 10, "the worker to listen", log.read_text)
        # Its first round was before the listener: wait for it to be idle.
        time.sleep(0.5)
        yield eng, log
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _starts_soon(engine: Engine, log: Path, within: float = 5) -> float:
    began = time.monotonic()
    task = _enqueue(engine)
    wait_until(
        lambda: _ran(engine, task), within, f"task {task} to run", log.read_text, interval=0.01
    )
    return time.monotonic() - began


def test_an_idle_postgresql_worker_starts_a_committed_task_at_once(
    pg_worker: tuple[Engine, Path],
) -> None:
    engine, log = pg_worker
    took = [_starts_soon(engine, log) for _ in range(5)]
    # Well under the 60 s poll: each was announced (the bound is loose: CI is noisy).
    assert max(took) < 5, took


def test_the_listener_reconnects_after_its_backend_is_killed(
    pg_worker: tuple[Engine, Path],
) -> None:
    engine, log = pg_worker
    (pid,) = _listener_pids(engine)
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    wait_until(
        lambda: [p for p in _listener_pids(engine) if p != pid], 15, "a new listener", log.read_text
    )
    assert _starts_soon(engine, log) < 5


def test_only_committed_tasks_are_announced(
    eng: Engine, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _pg(eng)
    url = make_url(db_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as listener:
        listener.execute('LISTEN "alchq"')
        with Session(eng) as session:
            session.add(CountTask())
            session.flush()
            session.rollback()
        assert [n.payload for n in listener.notifies(timeout=1.0)] == []
        for _ in range(3):  # three commits in a row: at least one NOTIFY, maybe merged
            _enqueue(eng)
        payloads = [n.payload for n in listener.notifies(timeout=1.0)]
        assert payloads and set(payloads) == {"count_task"}, payloads
        monkeypatch.setenv("ALCHQ_NOTIFY", "off")  # documented switch: no NOTIFY at all
        _enqueue(eng)
        assert [n.payload for n in listener.notifies(timeout=1.0)] == []


def _wait_for_run(engine: Engine, task: int) -> None:
    wait_until(lambda: _ran(engine, task), 5, "the task to run", interval=0.01)


def test_a_sqlite_worker_in_the_same_process_is_woken_by_the_commit(eng: Engine) -> None:
    if eng.dialect.name != "sqlite":
        pytest.skip("the in-process wake-up, shown on SQLite")
    worker = Worker(CountTask, engine=eng, poll_interval=60)
    thread = threading.Thread(target=worker.process_n, args=(2,), daemon=True)
    thread.start()
    try:
        time.sleep(1)  # its first look found nothing: it waits now
        for _ in range(2):
            began = time.monotonic()
            _wait_for_run(eng, _enqueue(eng))
            assert time.monotonic() - began < 5
        thread.join(timeout=10)
        assert not thread.is_alive()
    finally:
        worker.stop(now=True)
    with Session(eng) as session:
        assert {t.status for t in session.scalars(select(CountTask))} == {Status.PROCESSED}


_WOKEN_BY_SIGNALS = """
import signal, time
from alchq._wakeup import Waiter
w = Waiter()
signal.signal(signal.SIGALRM, lambda signum, frame: w.wake())
signal.setitimer(signal.ITIMER_REAL, 0.0003, 0.0003)
end = time.monotonic() + 2
while time.monotonic() < end:
    w.wait(0.001)
signal.setitimer(signal.ITIMER_REAL, 0)
print("done")
"""


def test_a_signal_handler_wakes_the_waiting_worker_without_a_deadlock() -> None:
    """Signals land between two bytecodes of the waiting main thread, maybe while it
    holds a lock of its own wait: waking it from the handler must never wait for
    that lock (a SIGTERM that an idle worker never heard)."""
    proc = subprocess.run(
        [sys.executable, "-c", _WOKEN_BY_SIGNALS],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=worker_env(),
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr[-2000:]
