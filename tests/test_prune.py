"""Retention: ``alchq.prune``, ``alchq prune``, ``flask alchq prune`` and the
worker's periodic pruning, on SQLite and PostgreSQL.

Rows get their ages from the database's clock (``utc_now(-seconds)``), far from
every threshold, so no result depends on how fast the test runs. "Processed
exactly once" is counted in ``run_log``, which pruning never touches.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import Engine, create_engine, func, insert, select, update
from sqlalchemy.exc import OperationalError

import alchq
from alchq import Status, metadata
from alchq._dialects import dialect_for, utc_now
from alchq._dialects.base import Dialect
from alchq.config import Settings
from alchq.exceptions import ConfigurationError
from alchq.model import FINISHED
from alchq.worker import Worker
from tests.conftest import ROOT, alchq_command
from tests.flask_app import URL_VARIABLE
from tests.support import wait_until
from tests.tasks import CountTask, run_log
from tests.test_cli import clean_error, env, flask_command, ok, unreachable_url

count_table: Any = CountTask.__table__  # type: ignore[attr-defined]

MIN, HOUR, DAY = 60.0, 3600.0, 86400.0
TIMEOUT = 90.0  # generous: only ever waited for in full when something is broken


# -- helpers -----------------------------------------------------------------------


@pytest.fixture
def eng(db_url: str) -> Iterator[Engine]:
    """The test database, with its tables; SQLite waits for workers' write locks."""
    args = {"timeout": 30} if db_url.startswith("sqlite") else {}
    engine = create_engine(db_url, connect_args=args)
    metadata.create_all(engine)
    yield engine
    engine.dispose()


def ago(seconds: float | None) -> Any:
    """A time ``seconds`` before now on the database's clock (None stays NULL)."""
    return None if seconds is None else utc_now(-seconds)


def add(
    engine: Engine,
    status: Status,
    finished: float | None,
    updated: float | None = None,
    **values: Any,
) -> int:
    """Insert one CountTask row finished ``finished`` seconds ago (None: never
    recorded) and last updated ``updated`` seconds ago (default: the same)."""
    updated = finished if updated is None else updated
    with engine.begin() as conn:
        result = conn.execute(
            insert(count_table).values(
                status=status,
                alchq_finished_at=ago(finished),
                time_updated=ago(updated or 0.0),
                **values,
            )
        )
        assert result.inserted_primary_key is not None
        key: int = result.inserted_primary_key[0]
        return key


def ids(engine: Engine, *status: Status) -> set[int]:
    query = select(count_table.c.id)
    if status:
        query = query.where(count_table.c.status.in_(status))
    with engine.connect() as conn:
        return set(conn.scalars(query))


def by_status(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(count_table.c.status, func.count()).group_by(count_table.c.status)
        )
        return {str(status): n for status, n in rows}


def runs(engine: Engine) -> tuple[int, int]:
    """(runs logged, distinct tasks run)."""
    with engine.connect() as conn:
        total = conn.scalar(select(func.count()).select_from(run_log)) or 0
        distinct = conn.scalar(select(func.count(run_log.c.task_id.distinct()))) or 0
        return total, distinct


def prune_cli(*args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        alchq_command("prune", *args),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=ROOT,
        env=env(**extra_env),
        check=False,
    )


def flask_prune(url: str, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        flask_command("tests.flask_app", "alchq", "prune", *args),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=ROOT,
        env=env(**{URL_VARIABLE: url}, **extra_env),
        check=False,
    )


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


#: Rows of every status at ages far from the thresholds used below. Finished
#: rows without alchq_finished_at are judged by time_updated; one with both
#: set is judged by alchq_finished_at alone.
AGES = [30 * MIN, 3 * HOUR, 3 * DAY, 40 * DAY]


def add_every_kind(engine: Engine) -> dict[int, tuple[Status, float | None, float]]:
    rows: dict[int, tuple[Status, float | None, float]] = {}
    for status in Status:
        shapes: list[tuple[float | None, float]] = [(a, a) for a in AGES]
        shapes += [(None, 3 * DAY), (None, 30 * MIN), (30 * MIN, 40 * DAY)]
        for finished, updated in shapes:
            rows[add(engine, status, finished, updated)] = (status, finished, updated)
    return rows


def oracle(
    rows: dict[int, tuple[Status, float | None, float]], ages: dict[Status, float | None]
) -> set[int]:
    """The ids prune must delete: finished, and older than their status's age."""
    return {
        key
        for key, (status, finished, updated) in rows.items()
        if ages.get(status) is not None
        and (finished if finished is not None else updated) > ages[status]  # type: ignore[operator]
    }


# -- alchq.prune ----------------------------------------------------------------------


def test_prune_deletes_exactly_the_old_finished_rows(eng: Engine) -> None:
    rows = add_every_kind(eng)

    counts = alchq.prune(
        CountTask, engine=eng, processed=HOUR, error=timedelta(days=2), cancelled=None
    )

    gone = oracle(rows, {Status.PROCESSED: HOUR, Status.ERROR: 2 * DAY})
    # PROCESSED: 3h, 3d, 40d and the 3d-old one without alchq_finished_at;
    # ERROR: 3d, 40d and that one; CANCELLED kept; PENDING/PROCESSING never.
    assert counts == {"PROCESSED": 4, "ERROR": 3, "CANCELLED": 0}
    assert len(gone) == 7
    assert ids(eng) == set(rows) - gone
    assert len(ids(eng, Status.PENDING, Status.PROCESSING)) == 2 * 7  # all, however old

    # Text ages; "never" keeps PROCESSED and ERROR however old.
    counts = alchq.prune(
        CountTask, engine=eng, processed="never", error="never", cancelled="2w", batch_size=2
    )
    assert counts == {"PROCESSED": 0, "ERROR": 0, "CANCELLED": 1}
    assert ids(eng) == set(rows) - gone - oracle(rows, {Status.CANCELLED: 14 * DAY})


def test_age_zero_prunes_every_finished_row_and_nothing_else(eng: Engine, db_url: str) -> None:
    rows = add_every_kind(eng)
    proc = ok(prune_cli("tests.tasks:CountTask", "--database-url", db_url, "--older-than", "0"))
    finished = {k for k, (status, _, _) in rows.items() if status in FINISHED}
    assert proc.stdout.startswith("pruned "), proc.stdout
    assert ids(eng) == set(rows) - finished
    assert len(ids(eng, Status.PENDING, Status.PROCESSING)) == 2 * 7


def test_prune_ages_default_to_the_settings(eng: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PROCESSED", "ERROR", "CANCELLED"):
        monkeypatch.delenv(f"ALCHQ_PRUNE_{name}_AFTER", raising=False)
    monkeypatch.setenv("ALCHQ_PRUNE_ERROR_AFTER", "never")
    monkeypatch.setenv("ALCHQ_PRUNE_CANCELLED_AFTER", "1d")
    old_error = add(eng, Status.ERROR, 40 * DAY)  # past the default 30d, but: never
    keep = {
        old_error,
        add(eng, Status.PROCESSED, 3 * DAY),  # default 7d
        add(eng, Status.CANCELLED, 3 * HOUR),  # 1d
    }
    add(eng, Status.PROCESSED, 8 * DAY)
    add(eng, Status.CANCELLED, 2 * DAY)

    assert alchq.prune(CountTask, engine=eng) == {"PROCESSED": 1, "ERROR": 0, "CANCELLED": 1}
    assert ids(eng) == keep

    # An argument wins over the environment.
    assert alchq.prune(CountTask, engine=eng, error="30d")["ERROR"] == 1
    assert ids(eng) == keep - {old_error}


def _dialect_class(engine: Engine) -> type[Dialect]:
    """The class of alchq's dialect for ``engine`` (whose delete_batch a test replaces)."""
    with engine.connect():  # (SQLAlchemy knows MariaDB behind mysql:// once connected)
        return type(dialect_for(engine))


def test_small_batches_each_commit(eng: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    old = {add(eng, Status.PROCESSED, 2 * DAY) for _ in range(23)}
    young = {add(eng, Status.PROCESSED, 10 * MIN) for _ in range(5)}
    batches: list[tuple[int, int, int]] = []  # (limit, old rows committed before, deleted)
    kind = _dialect_class(eng)
    real = kind.delete_batch

    def spy(self: Dialect, conn: Any, table: Any, where: Any, limit: int) -> int:
        if table.name == "alchq_progress":  # the progress of pruned tasks, pruned after
            return real(self, conn, table, where, limit)
        # Another connection sees only committed work: each batch must be.
        before = len(ids(eng) & old)
        deleted = real(self, conn, table, where, limit)
        batches.append((limit, before, deleted))
        return deleted

    monkeypatch.setattr(kind, "delete_batch", spy)
    counts = alchq.prune(
        CountTask, engine=eng, processed=DAY, error=None, cancelled=None, batch_size=5
    )

    assert counts == {"PROCESSED": 23, "ERROR": 0, "CANCELLED": 0}
    assert ids(eng) == young
    # Five batches of alchq_finished_at rows, then one (empty) of rows without it.
    assert batches == [(5, 23, 5), (5, 18, 5), (5, 13, 5), (5, 8, 5), (5, 3, 3), (5, 0, 0)]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"processed": "0x"},
        {"error": -5},
        {"cancelled": "5x"},
        {"processed": "3 days"},
        {"error": float("inf")},
        {"batch_size": 0},
    ],
    ids=repr,
)
def test_bad_arguments_delete_nothing(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'q.sqlite'}")
    metadata.create_all(engine)
    old = {add(engine, status, 400 * DAY) for status in Status}

    with pytest.raises(ConfigurationError, match=next(iter(kwargs))):
        alchq.prune(CountTask, engine=engine, **kwargs)

    assert ids(engine) == old
    engine.dispose()


def test_prune_in_a_flask_app_leaves_db_session_alone(
    eng: Engine, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without arguments it finds Flask-SQLAlchemy, but deletes through a session of
    its own: the request's pending work is neither committed nor discarded."""
    from tests.flask_app import create_app

    monkeypatch.setenv(URL_VARIABLE, db_url)
    monkeypatch.delenv("ALCHQ_PRUNE_PROCESSED_AFTER", raising=False)
    app = create_app()
    app.config["ALCHQ_PRUNE_PROCESSED_AFTER"] = timedelta(hours=1)  # app config is read
    old = add(eng, Status.PROCESSED, 2 * HOUR)
    young = add(eng, Status.PROCESSED, 30 * MIN)
    db: SQLAlchemy = app.extensions["sqlalchemy"]
    with app.app_context():
        session = db.session()
        pending = CountTask()
        session.add(pending)

        assert alchq.prune(CountTask)["PROCESSED"] == 1

        assert db.session() is session and pending in session.new
        assert ids(eng) == {young}  # the pending row was not committed
        session.commit()
        db.engine.dispose()
    assert old not in ids(eng) and len(ids(eng)) == 2


def test_settings_parse_prune_values() -> None:
    load = Settings.load
    assert load(environ={}).prune_interval is None  # off by default
    assert load(environ={}).prune_processed_after == 7 * DAY
    assert load(environ={}).prune_error_after == 30 * DAY
    assert load(environ={}).prune_cancelled_after == 7 * DAY
    assert load(environ={}).prune_batch_size == 1000
    s = load(
        environ={
            "ALCHQ_PRUNE_PROCESSED_AFTER": "12h",
            "ALCHQ_PRUNE_ERROR_AFTER": "Never",
            "ALCHQ_PRUNE_CANCELLED_AFTER": "2w",
            "ALCHQ_PRUNE_INTERVAL": "90s",
            "ALCHQ_PRUNE_BATCH_SIZE": "50",
        }
    )
    assert (s.prune_processed_after, s.prune_error_after, s.prune_cancelled_after) == (
        12 * HOUR,
        None,
        14 * DAY,
    )
    assert (s.prune_interval, s.prune_batch_size) == (90.0, 50)
    assert load(environ={"ALCHQ_PRUNE_INTERVAL": "0"}).prune_interval is None
    assert load(environ={"ALCHQ_PRUNE_INTERVAL": "off"}).prune_interval is None
    flask_config = {"ALCHQ_PRUNE_ERROR_AFTER": timedelta(days=2), "ALCHQ_PRUNE_INTERVAL": 30}
    s = load(environ={}, app_config=flask_config)
    assert (s.prune_error_after, s.prune_interval) == (2 * DAY, 30.0)
    assert Settings(prune_interval=0).prune_interval is None


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ALCHQ_PRUNE_PROCESSED_AFTER", "-1"),
        ("ALCHQ_PRUNE_ERROR_AFTER", "-1d"),
        ("ALCHQ_PRUNE_CANCELLED_AFTER", "soon"),
        ("ALCHQ_PRUNE_INTERVAL", "-5"),
        ("ALCHQ_PRUNE_INTERVAL", "never-ish"),
        ("ALCHQ_PRUNE_BATCH_SIZE", "0"),
        ("ALCHQ_PRUNE_BATCH_SIZE", "2.5"),
        ("ALCHQ_POLL_INTERVAL", "0"),  # the existing settings still must be positive
    ],
)
def test_settings_reject_bad_prune_values(key: str, value: str) -> None:
    with pytest.raises(ConfigurationError, match=key.removeprefix("ALCHQ_").lower() + "|" + key):
        Settings.load(environ={key: value})


# -- the commands ------------------------------------------------------------------------


def test_alchq_prune_command(eng: Engine, db_url: str) -> None:
    rows = add_every_kind(eng)

    proc = ok(
        prune_cli(
            "tests.tasks:CountTask",
            "--database-url",
            db_url,
            "--older-than",
            "1h",
            "--error",
            "never",
            "--batch-size",
            "2",
        )
    )

    assert proc.stdout == "pruned 4 PROCESSED, 4 CANCELLED from count_task (kept: ERROR)\n"
    gone = oracle(rows, {Status.PROCESSED: HOUR, Status.CANCELLED: HOUR})
    assert ids(eng) == set(rows) - gone


def test_flask_alchq_prune_command(eng: Engine, db_url: str) -> None:
    rows = add_every_kind(eng)

    # A status's own option wins over --older-than, which wins over the environment.
    proc = ok(
        flask_prune(
            db_url,
            "tests.tasks:CountTask",
            "--older-than",
            "2d",
            "--processed",
            "1h",
            ALCHQ_PRUNE_CANCELLED_AFTER="never",
        )
    )

    assert proc.stdout == "pruned 4 PROCESSED, 3 ERROR, 3 CANCELLED from count_task\n"
    gone = oracle(rows, {Status.PROCESSED: HOUR, Status.ERROR: 2 * DAY, Status.CANCELLED: 2 * DAY})
    assert ids(eng) == set(rows) - gone


@pytest.mark.parametrize(
    ("option", "value"),
    [("--older-than", "3 days"), ("--processed", "1x"), ("--cancelled", "-1h")],
)
def test_bad_age_is_one_error_line(tmp_path: Path, option: str, value: str) -> None:
    url = f"sqlite:///{tmp_path / 'never-created.sqlite'}"
    line = clean_error(
        prune_cli("tests.tasks:CountTask", "--database-url", url, f"{option}={value}")
    )
    assert option in line and repr(value) in line and "never" in line
    assert not (tmp_path / "never-created.sqlite").exists()


def test_flask_bad_age_is_one_error_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'never-created.sqlite'}"
    line = clean_error(flask_prune(url, "tests.tasks:CountTask", "--older-than", "soon"))
    assert "--older-than" in line and "'soon'" in line
    assert not (tmp_path / "never-created.sqlite").exists()


def test_bad_batch_size_is_rejected(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'never-created.sqlite'}"
    line = clean_error(
        prune_cli("tests.tasks:CountTask", "--database-url", url, "--batch-size", "0")
    )
    assert "batch_size" in line and "got 0" in line
    assert not (tmp_path / "never-created.sqlite").exists()


def test_prune_table_missing(tmp_path: Path) -> None:
    (tmp_path / "empty.sqlite").touch()  # a database without the table
    url = f"sqlite:///{tmp_path / 'empty.sqlite'}"
    line = clean_error(prune_cli("tests.tasks:CountTask", "--database-url", url))
    assert "'count_task'" in line and "does not exist" in line


def test_prune_database_unreachable() -> None:
    url = unreachable_url()
    proc = prune_cli("tests.tasks:CountTask", "--database-url", url)
    line = clean_error(proc)
    assert "127.0.0.1" in line and "bob:***@" in line
    assert "s3cret" not in proc.stdout + proc.stderr


# -- with workers running ---------------------------------------------------------------

TASKS = 300


def test_prune_while_workers_process(eng: Engine, db_url: str, tmp_path: Path) -> None:
    """Batches of old finished rows appear and are pruned, round after round,
    while two worker processes work through the queue."""
    with eng.begin() as conn:
        conn.execute(insert(count_table), [{"sleep": 5}] * TASKS)
        # Half of them look old (hand-made, or re-queued long ago): still not prunable.
        conn.execute(
            update(count_table)
            .where(count_table.c.id % 2 == 1)
            .values(time_updated=ago(40 * DAY), alchq_finished_at=ago(40 * DAY))
        )
    tasks = ids(eng)
    command = alchq_command(
        "run",
        "tests.tasks:CountTask",
        "--database-url",
        db_url,
        "--burst",
        "--log-level",
        "WARNING",
    )
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    procs: list[subprocess.Popen[bytes]] = []
    old_rows = pruned = rounds = 0
    try:
        for log in logs:
            with log.open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env()
                    )
                )
        deadline = time.monotonic() + TIMEOUT
        while rounds == 0 or any(p.poll() is None for p in procs):
            assert time.monotonic() < deadline, "workers did not finish"
            batch = {add(eng, s, 2 * DAY) for s in (Status.PROCESSED, Status.ERROR) * 5}
            batch.add(add(eng, Status.CANCELLED, 2 * DAY))
            counts = alchq.prune(
                CountTask, engine=eng, processed=HOUR, error=HOUR, cancelled=HOUR, batch_size=3
            )
            rounds += 1
            old_rows += len(batch)
            pruned += sum(counts.values())
            assert not ids(eng) & batch, f"round {rounds}: old finished rows left"
        codes = [p.wait(timeout=TIMEOUT) for p in procs]
    finally:
        stop(procs)
    output = "\n".join(log.read_text() for log in logs)

    assert codes == [0, 0] and "Traceback" not in output, output
    assert pruned == old_rows
    assert by_status(eng) == {"PROCESSED": TASKS}  # none lost, no old row left
    assert ids(eng) == tasks
    assert runs(eng) == (TASKS, TASKS)  # each task ran exactly once
    print(f"\n{eng.dialect.name}: {rounds} prune rounds while the workers ran")


def test_worker_prunes_periodically(eng: Engine, db_url: str, tmp_path: Path) -> None:
    old_processed = {add(eng, Status.PROCESSED, 40 * DAY) for _ in range(10)}
    old_errors = {add(eng, Status.ERROR, 40 * DAY) for _ in range(3)}
    old_cancelled = {add(eng, Status.CANCELLED, 10 * DAY) for _ in range(2)}  # default 7d
    young_cancelled = {add(eng, Status.CANCELLED, HOUR) for _ in range(2)}
    with eng.begin() as conn:
        conn.execute(insert(count_table), [{"fail": None}] * 20 + [{"fail": "boom"}] * 2)
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            alchq_command("run", "tests.tasks:CountTask", "--database-url", db_url),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env(
                ALCHQ_POLL_INTERVAL="0.2",
                ALCHQ_PRUNE_INTERVAL="0.5",
                ALCHQ_PRUNE_PROCESSED_AFTER="2s",
                ALCHQ_PRUNE_ERROR_AFTER="never",
            ),
        )
    try:
        # The tasks it processes itself go too, once 2 s old: pruned on a later round.
        wait_until(
            lambda: runs(eng)[0] == 20 and by_status(eng) == {"ERROR": 5, "CANCELLED": 2},
            TIMEOUT,
            "the worker to run the tasks and prune them",
        )
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=TIMEOUT)
    finally:
        stop([proc])
    output = log.read_text()

    assert code == 0 and "Traceback" not in output, output
    assert runs(eng) == (20, 20)
    assert ids(eng, Status.PENDING, Status.PROCESSING, Status.PROCESSED) == set()
    errors = ids(eng, Status.ERROR)
    assert len(errors) == 5 and old_errors < errors  # ERROR: never
    assert ids(eng, Status.CANCELLED) == young_cancelled
    assert not ids(eng) & (old_processed | old_cancelled)
    # Its first round, before any task: one line with the counts.
    assert "INFO alchq.prune: pruned 10 PROCESSED, 2 CANCELLED from count_task (kept: ERROR)" in (
        output
    ), output


class _Locked(Exception):
    """A driver's "busy" error as each database says it: SQLite's words, MySQL's
    number (1205, a lock wait timeout)."""

    def __init__(self) -> None:
        super().__init__(1205, "database is locked")

    def __str__(self) -> str:
        return "database is locked"


@pytest.mark.parametrize(
    ("failure", "level", "text"),
    [
        (
            OperationalError("DELETE", {}, _Locked()),
            logging.WARNING,
            "pruning skipped, database unavailable: database is locked",
        ),
        (RuntimeError("a bug"), logging.ERROR, "pruning CountTask failed: RuntimeError: a bug"),
    ],
    ids=["transient", "other"],
)
def test_failed_pruning_logs_once_and_the_worker_carries_on(
    eng: Engine,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    failure: Exception,
    level: int,
    text: str,
) -> None:
    old = add(eng, Status.PROCESSED, 40 * DAY)
    with eng.begin() as conn:
        conn.execute(insert(count_table), [{"sleep": 0}] * 3)

    kind = _dialect_class(eng)
    real = kind.delete_batch

    def broken(self: Dialect, conn: Any, table: Any, *args: Any) -> int:
        if table.name == "alchq_workers":  # the rescue's clean-up of the registry
            return real(self, conn, table, *args)
        raise failure

    monkeypatch.setattr(kind, "delete_batch", broken)
    caplog.set_level(logging.INFO, logger="alchq")
    worker = Worker(CountTask, engine=eng, settings=Settings(prune_interval=3600))

    assert worker.process_all() == 3

    prune_lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "alchq.prune"]
    assert prune_lines == [(level, text)]
    assert old in ids(eng)
    assert by_status(eng) == {"PROCESSED": 4}


def test_time_columns_are_what_the_helpers_write(eng: Engine) -> None:
    """The helpers' ages land where prune looks (guards the test's own setup)."""
    key = add(eng, Status.PROCESSED, 3 * DAY, updated=HOUR)
    with eng.connect() as conn:
        now = conn.scalar(select(utc_now()))
        row = conn.execute(select(count_table).where(count_table.c.id == key)).one()
    assert isinstance(now, datetime)
    now = now if now.tzinfo else now.replace(tzinfo=timezone.utc)  # SQLite: naive UTC
    assert timedelta(days=2.9) < now - row.alchq_finished_at < timedelta(days=3.1)
    assert timedelta(minutes=59) < now - row.time_updated < timedelta(minutes=61)
