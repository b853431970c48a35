"""``alchq status/workers/retry/cancel/health`` and their ``flask alchq`` twins, run as
real subprocesses against real databases (SQLite and PostgreSQL), with real workers.

What they print is read as a person would (the table) and as a script would
(``--json``); what they change is read back from the database.
"""

from __future__ import annotations

import json
import os
import pty
import select as select_fd
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, func, insert, select, update

from tests.conftest import ROOT, alchq_command
from tests.flask_app import FlaskTask
from tests.models_monitoring_cli import Base, MonTask
from tests.test_cli import alchq, clean_error, env, flask, ok, unreachable_url

MODEL = "tests.models_monitoring_cli:MonTask"
OTHER = "tests.models_monitoring_cli:OtherTask"
mon: Any = MonTask.__table__
flask_table: Any = FlaskTask.__table__
workers_table: Any = Base.metadata.tables["alchq_workers"]
#: A short lease: a killed worker shows as gone within seconds.
FAST_WORKER = {
    "ALCHQ_LEASE": "2",
    "ALCHQ_HEARTBEAT_INTERVAL": "0.5",
    "ALCHQ_POLL_INTERVAL": "0.2",
}
#: Wide enough that rich never folds a row of the tables.
WIDE = {"COLUMNS": "200"}


# -- helpers ------------------------------------------------------------------------


@pytest.fixture
def tables(engine: Engine) -> Engine:
    Base.metadata.create_all(engine)
    return engine


def add(engine: Engine, *notes: str | None, **values: Any) -> list[int]:
    with engine.begin() as conn:
        result = conn.execute(
            insert(mon).returning(mon.c.id), [{"note": n, **values} for n in notes]
        )
        return [int(r.id) for r in result]


def statuses(engine: Engine, table: Any = mon) -> Counter[str]:
    with engine.connect() as conn:
        rows = conn.execute(select(table.c.status, func.count()).group_by(table.c.status))
        return Counter({str(status): n for status, n in rows})


def status_of(engine: Engine, task_id: int) -> str:
    with engine.connect() as conn:
        return str(conn.execute(select(mon.c.status).where(mon.c.id == task_id)).scalar_one())


def burst(db_url: str) -> None:
    """Process every ready task with a real worker."""
    ok(alchq("run", MODEL, "--database-url", db_url, "--burst", "--log-level", "ERROR"))


def mon_cli(db_url: str, command: str, *args: str) -> subprocess.CompletedProcess[str]:
    return alchq(command, *args, "--database-url", db_url, COLUMNS=WIDE["COLUMNS"])


def wait_for(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def registered(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(workers_table)))


@pytest.fixture
def start_worker(tables: Engine, db_url: str) -> Iterator[Callable[[], subprocess.Popen[str]]]:
    """Start ``alchq run`` (short lease) and wait until it is in the registry."""
    started: list[subprocess.Popen[str]] = []

    def start() -> subprocess.Popen[str]:
        before = {w.id for w in registered(tables)}
        proc = subprocess.Popen(
            alchq_command("run", MODEL, "--database-url", db_url, "--log-level", "WARNING"),
            cwd=ROOT,
            env=env(**FAST_WORKER),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        wait_for(lambda: bool({w.id for w in registered(tables)} - before), "the worker")
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        assert proc.stderr is not None
        proc.stderr.close()


# -- status -------------------------------------------------------------------------


def test_status_table_and_json(tables: Engine, db_url: str) -> None:
    add(tables, "ok", "ok", "ok", "fail", "fail")
    burst(db_url)
    add(tables, "later", run_at=datetime.now(timezone.utc) + timedelta(hours=1))
    (pending, *_) = add(tables, "a", "b")
    ok(mon_cli(db_url, "cancel", MODEL, str(pending)))

    out = ok(mon_cli(db_url, "status", MODEL, OTHER)).stdout
    assert "MonTask (table mon_task)" in out and "OtherTask (table other_task)" in out
    # The first table is MonTask's; OtherTask's (all 0) comes after it.
    assert out.index("MonTask (table") < out.index("OtherTask (table")
    mine = out[: out.index("OtherTask (table")]
    assert "ready 1, scheduled 1" in mine
    expected = {"PENDING": 2, "PROCESSING": 0, "PROCESSED": 3, "ERROR": 2, "CANCELLED": 1}
    for status, n in expected.items():
        assert any(line.split()[:2] == [status, str(n)] for line in mine.splitlines()), mine
    assert any(
        line.split()[:4] == ["last", "hour", "3", "processed,"] for line in mine.splitlines()
    )
    assert "most recent errors" in mine and "ValueError" in mine and "failed on purpose" in mine

    data = json.loads(ok(mon_cli(db_url, "status", MODEL, OTHER, "--json")).stdout)
    assert set(data) == {"MonTask", "OtherTask"}
    stats = data["MonTask"]
    assert stats["counts"] == {
        "PENDING": 2,
        "PROCESSING": 0,
        "PROCESSED": 3,
        "ERROR": 2,
        "CANCELLED": 1,
    }
    assert (stats["ready"], stats["scheduled"]) == (1, 1)
    assert sum(m["processed"] for m in stats["throughput"]) == 3
    assert sum(m["failed"] for m in stats["throughput"]) == 2
    assert [e["error_type"] for e in stats["recent_errors"]] == ["ValueError", "ValueError"]
    assert stats["run_time_mean"] is not None and stats["run_time_p95"] is not None
    assert data["OtherTask"]["counts"]["PENDING"] == 0


def test_running_task_shown_then_cancelled(
    start_worker: Callable[[], Any], tables: Engine, db_url: str
) -> None:
    """status shows the task a real worker runs; cancel asks that worker to stop it."""
    start_worker()
    (task,) = add(tables, "slow")
    wait_for(lambda: status_of(tables, task) == "PROCESSING", "the slow task to start")
    out = ok(mon_cli(db_url, "status", MODEL)).stdout
    assert "MonTask: running" in out
    assert any(line.split()[:1] == [str(task)] for line in out.splitlines()), out
    data = json.loads(ok(mon_cli(db_url, "status", MODEL, "--json")).stdout)["MonTask"]
    assert data["counts"]["PROCESSING"] == 1
    assert [r["key"] for r in data["running"]] == [str(task)]

    proc = ok(mon_cli(db_url, "cancel", MODEL, str(task)))
    assert proc.stdout.strip() == f"MonTask {task} is running: asked the worker to stop it"
    wait_for(lambda: status_of(tables, task) == "CANCELLED", "the worker to cancel it")


def _read_until(fd: int, needle: bytes, count: int, timeout: float = 20) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while seen.count(needle) < count:
        assert time.monotonic() < deadline, f"timed out; output so far: {seen!r}"
        ready, _, _ = select_fd.select([fd], [], [], 0.2)
        if ready:
            try:
                seen += os.read(fd, 65536)
            except OSError:  # the pty closed
                break
    return seen


def test_watch_refreshes_and_ends_cleanly_on_ctrl_c(tables: Engine, db_url: str) -> None:
    """On a terminal the table is redrawn in place; Ctrl-C (SIGINT) exits 0."""
    add(tables, "a")
    main, tty = pty.openpty()
    proc = subprocess.Popen(
        alchq_command("status", MODEL, "--database-url", db_url, "--watch", "0.2"),
        cwd=ROOT,
        env=env(**WIDE, TERM="xterm"),
        stdin=tty,
        stdout=tty,
        stderr=subprocess.PIPE,
    )
    os.close(tty)
    try:
        # Three drawings of the table: the first and two refreshes.
        seen = _read_until(main, b"MonTask (table mon_task)", 3)
        assert b"PENDING" in seen
        add(tables, "b")
        _read_until(main, b"PENDING           2", 1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        assert proc.stderr is not None
        assert b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main)
        if proc.stderr is not None:
            proc.stderr.close()


def test_watch_json_is_a_document_per_line(tables: Engine, db_url: str) -> None:
    add(tables, "a")
    proc = subprocess.Popen(
        alchq_command("status", MODEL, "--database-url", db_url, "--json", "--watch=0.2"),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]
        assert [json.loads(line)["MonTask"]["counts"]["PENDING"] for line in lines] == [1, 1]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=20)


# -- retry and cancel ---------------------------------------------------------------


def test_retry_one_task_and_every_error(tables: Engine, db_url: str) -> None:
    first, second, old = add(tables, "fail", "fail", "fail")
    add(tables, "ok")
    burst(db_url)
    with tables.begin() as conn:  # one failed two days ago
        long_ago = datetime.now(timezone.utc) - timedelta(days=2)
        conn.execute(update(mon).where(mon.c.id == old).values(alchq_finished_at=long_ago))

    proc = ok(mon_cli(db_url, "retry", MODEL, str(first)))
    assert proc.stdout.strip() == f"retried MonTask {first}: PENDING again"
    assert status_of(tables, first) == "PENDING"
    assert status_of(tables, second) == "ERROR"

    proc = ok(mon_cli(db_url, "retry", MODEL, "--since", "1h"))  # no ID: every ERROR task
    assert proc.stdout.strip() == "retried 1 ERROR task of MonTask (finished in the last 1h)"
    assert (status_of(tables, second), status_of(tables, old)) == ("PENDING", "ERROR")

    proc = ok(mon_cli(db_url, "retry", MODEL, "--all-errors"))
    assert proc.stdout.strip() == "retried 1 ERROR task of MonTask"
    assert statuses(tables) == {"PENDING": 3, "PROCESSED": 1}

    line = clean_error(mon_cli(db_url, "retry", MODEL, "12345"))
    assert line == "alchq: error: MonTask 12345 does not exist"
    # Retrying a task that is not in ERROR: one line, nothing changed.
    line = clean_error(mon_cli(db_url, "retry", MODEL, str(first)))
    assert line.endswith(
        f"MonTask {first} is PENDING: only an ERROR or CANCELLED task can be retried"
    )


def test_cancel_pending_task(tables: Engine, db_url: str) -> None:
    task, other = add(tables, "a", "b")
    proc = ok(mon_cli(db_url, "cancel", MODEL, str(task)))
    assert proc.stdout.strip() == f"cancelled MonTask {task}"
    assert (status_of(tables, task), status_of(tables, other)) == ("CANCELLED", "PENDING")
    # A finished task cannot be cancelled.
    burst(db_url)
    line = clean_error(mon_cli(db_url, "cancel", MODEL, str(other)))
    assert "is PROCESSED: only a PENDING or PROCESSING task can be cancelled" in line
    line = clean_error(mon_cli(db_url, "cancel", MODEL, "12345"))
    assert line == "alchq: error: MonTask 12345 does not exist"


# -- workers and health -------------------------------------------------------------


def test_health_and_workers_follow_a_real_worker(
    start_worker: Callable[[], subprocess.Popen[str]], tables: Engine, db_url: str
) -> None:
    line = clean_error(mon_cli(db_url, "health", MODEL))
    assert line.startswith("alchq: error: no worker of MonTask is registered on this host")

    worker = start_worker()
    proc = ok(mon_cli(db_url, "health", MODEL))
    assert proc.stdout.startswith("healthy: worker ") and " serving MonTask" in proc.stdout
    ok(mon_cli(db_url, "health", MODEL, "--max-age", "30"))
    # Only workers of the models named count.
    clean_error(mon_cli(db_url, "health", OTHER))

    (info,) = json.loads(ok(mon_cli(db_url, "workers", MODEL, "--json")).stdout)
    assert (info["supervisor"], info["models"], info["alive"]) == (
        f"{socket.gethostname()}:{worker.pid}",
        ["MonTask"],
        True,
    )
    table = ok(mon_cli(db_url, "workers", MODEL)).stdout
    assert info["id"] in table and "alive" in table and "MonTask" in table

    # A worker registered from another host: not this host's health, unless --any-host.
    with tables.begin() as conn:
        conn.execute(update(workers_table).values(host="elsewhere"))
    line = clean_error(mon_cli(db_url, "health", MODEL))
    assert "1 alive on other hosts" in line and "--any-host" in line
    ok(mon_cli(db_url, "health", MODEL, "--any-host"))

    worker.send_signal(signal.SIGTERM)  # stops cleanly: leaves the registry
    assert worker.wait(timeout=30) == 0
    assert registered(tables) == []
    clean_error(mon_cli(db_url, "health", MODEL, "--any-host"))


def test_killed_worker_is_shown_gone(
    start_worker: Callable[[], subprocess.Popen[str]], tables: Engine, db_url: str
) -> None:
    worker = start_worker()
    worker.kill()
    worker.wait(timeout=30)
    # Its row stays until its lease (2 s) runs out; then it is gone.
    wait_for(
        lambda: not json.loads(ok(mon_cli(db_url, "workers", MODEL, "--json")).stdout),
        "the killed worker to expire",
    )
    (info,) = json.loads(ok(mon_cli(db_url, "workers", MODEL, "--all", "--json")).stdout)
    assert (info["supervisor"], info["alive"]) == (f"{socket.gethostname()}:{worker.pid}", False)
    assert "gone" in ok(mon_cli(db_url, "workers", MODEL, "--all")).stdout
    line = clean_error(mon_cli(db_url, "health", MODEL))
    assert "is gone (lease expired" in line, line


# -- bad input ----------------------------------------------------------------------


def test_missing_tables(engine: Engine, db_url: str) -> None:
    with engine.connect():  # the database exists (SQLite's file), its tables do not
        pass
    for args in (("status", MODEL), ("retry", MODEL, "1")):
        line = clean_error(mon_cli(db_url, *args))
        assert "table 'mon_task' for MonTask does not exist" in line, line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(("status", "nosuch.module:X"), "module 'nosuch.module' not found", id="model"),
        pytest.param(("status", "MonTask"), "package.module:ClassName", id="bare-name"),
        pytest.param(("retry", MODEL, "1", "--since", "1h"), "no task ID", id="retry-since"),
        pytest.param(("retry", MODEL, "1", "--all-errors"), "not both", id="retry-both"),
        pytest.param(("retry", MODEL, "--all-errors", "--since", "soon"), "--since", id="since"),
        pytest.param(("health", MODEL, "--max-age", "x"), "--max-age", id="max-age"),
        pytest.param(
            ("cancel", MODEL, "not-a-number"), "'not-a-number' is not a valid id", id="id"
        ),
    ],
)
def test_bad_input_is_one_line(tmp_path: Any, args: tuple[str, ...], expected: str) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'q.sqlite'}")
    Base.metadata.create_all(engine)
    engine.dispose()
    line = clean_error(alchq(*args, "--database-url", str(engine.url)))
    assert expected in line, line


def test_no_database() -> None:
    line = clean_error(alchq("status", MODEL))
    assert line.startswith("alchq: error: no database URL")
    line = clean_error(alchq("workers", MODEL, "--database-url", "nosuchdb://x"))
    assert "unknown database URL scheme" in line


def test_unreachable_database_hides_password() -> None:
    proc = alchq("status", MODEL, "--database-url", unreachable_url(), timeout=60)
    line = clean_error(proc)
    assert "cannot reach the database" in line and "bob:***@" in line
    assert "s3cret" not in proc.stdout + proc.stderr


# -- flask alchq --------------------------------------------------------------------


def test_flask_commands(engine: Engine, db_url: str) -> None:
    """With no model named, every model of the app whose table exists; a bare class name
    names one."""
    flask_table.create(engine)
    Base.metadata.tables["alchq_workers"].create(engine)
    Base.metadata.tables["alchq_progress"].create(engine)
    with engine.begin() as conn:
        conn.execute(insert(flask_table), [{"note": "a"}, {"note": "b"}])

    out = ok(flask(db_url, "alchq", "status", extra_env=WIDE)).stdout
    assert "FlaskTask (table flask_task)" in out
    assert any(line.split()[:2] == ["PENDING", "2"] for line in out.splitlines()), out
    assert "FlaskPeriodic" not in out  # its table does not exist

    data = json.loads(ok(flask(db_url, "alchq", "status", "FlaskTask", "--json")).stdout)
    assert list(data) == ["FlaskTask"] and data["FlaskTask"]["counts"]["PENDING"] == 2

    proc = ok(flask(db_url, "alchq", "cancel", "tests.flask_app:FlaskTask", "1"))
    assert proc.stdout.strip() == "cancelled FlaskTask 1"
    assert statuses(engine, flask_table) == {"CANCELLED": 1, "PENDING": 1}
    ok(flask(db_url, "alchq", "retry", "FlaskTask", "1"))
    assert statuses(engine, flask_table) == {"PENDING": 2}


def test_flask_workers_health_and_bad_input(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    engine = create_engine(url)
    try:
        flask_table.metadata.create_all(engine, tables=[flask_table])
        Base.metadata.tables["alchq_workers"].create(engine)
    finally:
        engine.dispose()
    assert json.loads(ok(flask(url, "alchq", "workers", "--json")).stdout) == []
    line = clean_error(flask(url, "alchq", "health"))
    assert "no worker of FlaskTask is registered on this host" in line
    line = clean_error(flask(url, "alchq", "retry", "FlaskTask", "99"))
    assert line == "alchq: error: FlaskTask 99 does not exist"
    line = clean_error(flask(url, "alchq", "status", "NoSuchModel"))
    assert "unknown task model 'NoSuchModel'" in line
