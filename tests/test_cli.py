"""The ``alchq`` and ``flask ... alchq`` commands, run as real subprocesses.

Each command runs against a real database (SQLite file and PostgreSQL, via the
``db_url``/``engine`` fixtures) and the outcome is read back from the database.
Bad input must give exit code 1 and one ``alchq: error: ...`` line, never a
traceback.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Engine,
    Integer,
    MetaData,
    Table,
    create_engine,
    func,
    insert,
    inspect,
    make_url,
    select,
)
from sqlalchemy.orm import Session

from alchq import Status, metadata
from tests.conftest import ROOT, _fresh_pg_database, alchq_command, run_alchq, worker_env
from tests.flask_app import URL_VARIABLE, FlaskPeriodic, FlaskRemover, FlaskTask
from tests.tasks import CountTask, run_log

count_table: Any = CountTask.__table__  # type: ignore[attr-defined]
flask_table: Any = FlaskTask.__table__

#: A log line as alchq's commands format them (see alchq._commands.LOG_FORMAT).
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ [\w.]+: ")

QUIET = ("--log-level", "WARNING")


# -- helpers -------------------------------------------------------------------


def env(**extra: str) -> dict[str, str]:
    """worker_env() without settings of ours that would change what is tested."""
    base = {
        k: v
        for k, v in worker_env().items()
        if not k.startswith(("ALCHQ_", "FLASK_")) and k not in (URL_VARIABLE, "DATABASE_URL")
    }
    base.update(extra)
    return base


def alchq(*args: str, timeout: float = 120, **extra_env: str) -> subprocess.CompletedProcess[str]:
    return run_alchq(*args, timeout=timeout, env=env(**extra_env))


def flask_command(app: str, *args: str) -> list[str]:
    """``flask --app APP ARGS``, with the ``flask`` script next to this interpreter."""
    exe = Path(sys.executable).with_name("flask")
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "flask"]
    return [*base, "--app", app, *args]


def flask(
    url: str,
    *args: str,
    app: str = "tests.flask_app",
    timeout: float = 120,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        flask_command(app, *args),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env(**{URL_VARIABLE: url}, **(extra_env or {})),
        check=False,
    )


def alchq_in(cwd: Path, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    """The ``alchq`` command run in ``cwd`` (relative SQLite paths are read from there)."""
    return subprocess.run(
        alchq_command(*args),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=env(**extra_env),
        check=False,
    )


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    out = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, out
    assert "Traceback" not in proc.stdout + proc.stderr, out
    return proc


def clean_error(proc: subprocess.CompletedProcess[str], *, only_line: bool = True) -> str:
    """Assert a clean failure and return its ``alchq: error:`` line.

    ``only_line``: stderr is that line and nothing else (else log lines may precede it).
    """
    out = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr, out
    assert proc.returncode == 1, out
    lines = proc.stderr.splitlines()
    errors = [line for line in lines if line.startswith("alchq: error:")]
    assert len(errors) == 1, out
    if only_line:
        assert lines == errors, out
    else:
        others = [line for line in lines if line not in errors]
        assert all(LOG_LINE.match(line) for line in others), out
    return errors[0]


def rejected(proc: subprocess.CompletedProcess[str]) -> None:
    """Bad option values: a non-zero exit and an error message, never a traceback."""
    out = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr, out
    assert proc.returncode != 0, out
    assert "error" in proc.stderr.lower(), out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def unreachable_url() -> str:
    return f"postgresql+psycopg://bob:s3cret@127.0.0.1:{free_port()}/x"


def add_count_tasks(engine: Engine, n: int, **values: Any) -> None:
    with engine.begin() as conn:
        conn.execute(insert(count_table), [dict(values) for _ in range(n)])


def statuses(engine: Engine, table: Any = count_table) -> Counter[str]:
    with engine.connect() as conn:
        rows = conn.execute(select(table.c.status, func.count()).group_by(table.c.status))
        return Counter({str(status): n for status, n in rows})


def run_log_rows(engine: Engine) -> list[tuple[int, int]]:
    with engine.connect() as conn:
        return [(r.task_id, r.pid) for r in conn.execute(select(run_log))]


def exists(engine: Engine) -> None:
    """Make sure the (empty) database exists: SQLite creates its file on connecting, and
    the commands refuse a missing file (but for create-tables)."""
    with engine.connect():
        pass


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'never-created.sqlite'}"


# -- alchq run / create-tables / demo ----------------------------------------------


def test_run_burst_processes_every_ready_task(engine: Engine, db_url: str) -> None:
    metadata.create_all(engine)
    add_count_tasks(engine, 5)
    add_count_tasks(engine, 1, fail="boom")

    proc = ok(alchq("run", "tests.tasks:CountTask", "--database-url", db_url, "--burst"))

    assert statuses(engine) == {"PROCESSED": 5, "ERROR": 1}
    assert len(run_log_rows(engine)) == 5  # the failed run's insert was rolled back
    with Session(engine) as s:
        failed = s.scalars(select(CountTask).where(CountTask.status == Status.ERROR)).one()
        assert failed.alchq_error_type == "RuntimeError"
        assert failed.alchq_error_message == "boom"
    # INFO log lines on stderr: one per end of each task, and one per start of a
    # task that ran alone (the first one; the others may run as a batch)
    assert 1 <= proc.stderr.count("started (attempt 1)") <= 6
    assert proc.stderr.count(" PROCESSED in ") == 5
    assert "RuntimeError: boom" in proc.stderr


def test_run_reads_database_url_from_environment(engine: Engine, db_url: str) -> None:
    metadata.create_all(engine)
    add_count_tasks(engine, 3)

    ok(alchq("run", "tests.tasks:CountTask", "--burst", *QUIET, ALCHQ_DATABASE_URL=db_url))

    assert statuses(engine) == {"PROCESSED": 3}


def test_run_falls_back_to_database_url_variable(engine: Engine, db_url: str) -> None:
    metadata.create_all(engine)
    add_count_tasks(engine, 2)

    ok(alchq("run", "tests.tasks:CountTask", "--burst", *QUIET, DATABASE_URL=db_url))

    assert statuses(engine) == {"PROCESSED": 2}


def test_alchq_database_url_wins_over_database_url(engine: Engine, db_url: str) -> None:
    metadata.create_all(engine)
    add_count_tasks(engine, 1)
    ok(
        alchq(
            "run",
            "tests.tasks:CountTask",
            "--burst",
            *QUIET,
            ALCHQ_DATABASE_URL=db_url,
            DATABASE_URL=unreachable_url(),
        )
    )

    assert statuses(engine) == {"PROCESSED": 1}


def test_python_dash_m_alchq_is_the_command(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "alchq", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env(),
        check=False,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("alchq ")


def test_database_url_option_wins_over_environment(engine: Engine, db_url: str) -> None:
    metadata.create_all(engine)
    add_count_tasks(engine, 2)

    ok(
        alchq(
            "run",
            "tests.tasks:CountTask",
            "--database-url",
            db_url,
            "--burst",
            *QUIET,
            ALCHQ_DATABASE_URL=unreachable_url(),
        )
    )

    assert statuses(engine) == {"PROCESSED": 2}


def test_max_tasks_processes_exactly_n(engine: Engine, db_url: str) -> None:
    metadata.create_all(engine)
    add_count_tasks(engine, 10)

    ok(alchq("run", "tests.tasks:CountTask", "--database-url", db_url, "--max-tasks", "4"))

    assert statuses(engine) == {"PROCESSED": 4, "PENDING": 6}
    assert len(run_log_rows(engine)) == 4


def test_max_tasks_with_burst_stops_when_queue_is_empty(engine: Engine, db_url: str) -> None:
    metadata.create_all(engine)
    add_count_tasks(engine, 2)

    ok(
        alchq(
            "run",
            "tests.tasks:CountTask",
            "--database-url",
            db_url,
            "--max-tasks",
            "5",
            "--burst",
            timeout=60,
        )
    )

    assert statuses(engine) == {"PROCESSED": 2}


def test_burst_on_an_empty_queue_exits_zero(engine: Engine, db_url: str) -> None:
    metadata.create_all(engine)
    proc = ok(alchq("run", "tests.tasks:CountTask", "--database-url", db_url, "--burst", *QUIET))
    assert proc.stderr == ""


def test_create_tables_then_run(engine: Engine, db_url: str) -> None:
    proc = ok(alchq("create-tables", "tests.tasks:CountTask", "--database-url", db_url))
    assert proc.stdout.strip() == "created (if missing): count_task, alchq_workers, alchq_progress"
    insp = inspect(engine)
    assert insp.has_table("count_task")
    assert "ix_count_task_alchq_ready" in {ix["name"] for ix in insp.get_indexes("count_task")}
    # again: nothing to do, still fine
    ok(alchq("create-tables", "tests.tasks:CountTask", "--database-url", db_url))

    run_log.create(engine)  # CountTask.run() writes to it; it is no task model's table
    add_count_tasks(engine, 3)
    ok(alchq("run", "tests.tasks:CountTask", "--database-url", db_url, "--burst", *QUIET))
    assert statuses(engine) == {"PROCESSED": 3}


def test_create_tables_of_several_models(engine: Engine, db_url: str) -> None:
    proc = ok(
        alchq(
            "create-tables",
            "tests.tasks:Parent",
            "tests.tasks:Child",
            "--database-url",
            db_url,
        )
    )
    assert (
        proc.stdout.strip() == "created (if missing): parent, child, alchq_workers, alchq_progress"
    )
    insp = inspect(engine)
    assert insp.has_table("parent") and insp.has_table("child")
    assert not insp.has_table("count_task")


def test_create_tables_in_dependency_order(engine: Engine, db_url: str) -> None:
    """Models named child first: the referenced table must still be created first."""
    args = ["tests.tasks:Child", "tests.tasks:Parent", "--database-url", db_url]
    ok(alchq("create-tables", *args))
    insp = inspect(engine)
    assert insp.has_table("parent") and insp.has_table("child")


def test_demo(tmp_path: Path) -> None:
    path = tmp_path / "demo.sqlite"
    proc = ok(run_alchq("demo", "--database", str(path), env=env()))
    assert path.exists()

    lines = proc.stdout.splitlines()
    header = next(
        i for i, line in enumerate(lines) if line.split()[:3] == ["operation", "retries", "status"]
    )
    rows = []
    for line in lines[header + 1 :]:
        parts = line.split(None, 3)
        if len(parts) < 3 or parts[2] not in Status.__members__:
            break
        rows.append((parts[0], parts[1], parts[2], parts[3] if len(parts) > 3 else ""))
    assert rows[:3] == [
        ("hop", "0", "PROCESSED", ""),
        ("skip", "0", "PROCESSED", ""),
        ("jump", "0", "PROCESSED", ""),
    ]
    assert len(rows) == 6
    by_op = {(op, retries): (status, err) for op, retries, status, err in rows}
    assert by_op[("fly", "0")][0] == "ERROR"
    assert by_op[("fly", "0")][1].startswith("ValueError:")
    assert by_op[("wobble", "0")][0] == "ERROR"
    assert by_op[("wobble", "1")] == ("PROCESSED", "")  # retried by error()
    assert sum(1 for r in rows if r[3].startswith("ValueError")) == 1
    assert "PROCESSED: 4, ERROR: 2" in proc.stdout
    assert "Hippity-hop!" in proc.stdout and "I found a ValueError!" in proc.stdout


# -- bad input ----------------------------------------------------------------------

IMPORT_ERRORS = [
    pytest.param("nosuch.module:X", ["module 'nosuch.module' not found"], id="no-module"),
    pytest.param("tests.tasks:Nope", ["tests.tasks", "Nope"], id="no-class"),
    pytest.param("tests.tasks:run_log", ["not a BaseQueue model"], id="a-table"),
    pytest.param("os:path", ["not a BaseQueue model"], id="a-module"),
    pytest.param("tests.models_cli:not_a_class", ["not a BaseQueue model"], id="an-int"),
    pytest.param("tests.models_cli:NoRunTask", ["NoRunTask", "run()"], id="no-run"),
    pytest.param("tests.tasks", ["package.module:ClassName"], id="malformed"),
]


@pytest.mark.parametrize("command", ["run", "create-tables"])
@pytest.mark.parametrize(("ref", "expected"), IMPORT_ERRORS)
def test_bad_model_reference(tmp_path: Path, command: str, ref: str, expected: list[str]) -> None:
    url = sqlite_url(tmp_path)
    extra = ["--burst", *QUIET] if command == "run" else []
    line = clean_error(alchq(command, ref, "--database-url", url, *extra))
    for text in expected:
        assert text in line
    assert not (tmp_path / "never-created.sqlite").exists()


@pytest.mark.parametrize("command", ["run", "create-tables", "prune"])
def test_no_database_url(command: str) -> None:
    """The message names every place the command reads a URL from."""
    line = clean_error(alchq(command, "tests.tasks:CountTask"))
    assert line.startswith("alchq: error: no database URL"), line
    assert "--database-url" in line and "ALCHQ_DATABASE_URL" in line
    assert re.search(r"(?<!ALCHQ_)\bDATABASE_URL\b", line), line


def test_empty_database_url_variables_are_no_url() -> None:
    line = clean_error(
        alchq("run", "tests.tasks:CountTask", ALCHQ_DATABASE_URL="", DATABASE_URL="")
    )
    assert "no database URL" in line and "DATABASE_URL" in line


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param("nosuchdb://x", "unknown database URL scheme", id="scheme"),
        pytest.param("not a url", "bad database URL", id="garbage"),
    ],
)
def test_bad_database_url(url: str, expected: str) -> None:
    line = clean_error(alchq("run", "tests.tasks:CountTask", "--database-url", url, "--burst"))
    assert expected in line


@pytest.mark.parametrize("command", ["run", "create-tables"])
def test_database_unreachable_hides_password(command: str) -> None:
    url = unreachable_url()
    extra = ["--burst", *QUIET] if command == "run" else []
    proc = alchq(command, "tests.tasks:CountTask", "--database-url", url, *extra, timeout=60)
    line = clean_error(proc)
    assert "127.0.0.1" in line
    assert "bob:***@" in line
    assert "s3cret" not in proc.stdout + proc.stderr


def test_database_unreachable_at_default_log_level() -> None:
    """At INFO, log lines may precede the error, but not the worker's start line:
    it never reached the database."""
    url = unreachable_url()
    proc = alchq("run", "tests.tasks:CountTask", "--database-url", url, "--burst", timeout=60)
    line = clean_error(proc, only_line=False)
    assert "cannot reach the database" in line
    assert "serving" not in proc.stderr, proc.stderr
    assert "s3cret" not in proc.stdout + proc.stderr


def test_sqlite_file_in_a_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "dir" / "q.sqlite"
    proc = alchq("run", "tests.tasks:CountTask", "--database-url", f"sqlite:///{path}", "--burst")
    line = clean_error(proc)
    assert f"the SQLite database file {path} does not exist" in line, line
    assert not (tmp_path / "no").exists()


def test_table_missing(engine: Engine, db_url: str) -> None:
    exists(engine)
    proc = alchq("run", "tests.tasks:CountTask", "--database-url", db_url, "--burst", *QUIET)
    line = clean_error(proc)
    assert "'count_task'" in line
    assert "create-tables" in line and "create_all" in line
    assert not inspect(engine).has_table("count_task")


def test_negative_max_tasks_is_rejected(tmp_path: Path) -> None:
    rejected(
        alchq(
            "run",
            "tests.tasks:CountTask",
            "--database-url",
            sqlite_url(tmp_path),
            "--max-tasks",
            "-1",
        )
    )


def test_negative_max_tasks_with_burst_is_rejected(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    engine = create_engine(url)
    try:
        metadata.create_all(engine)
        add_count_tasks(engine, 1)
    finally:
        engine.dispose()
    args = ["--database-url", url, "--max-tasks", "-1", "--burst"]
    rejected(alchq("run", "tests.tasks:CountTask", *args))


def test_unknown_log_level_is_rejected(tmp_path: Path) -> None:
    rejected(
        alchq(
            "run",
            "tests.tasks:CountTask",
            "--database-url",
            sqlite_url(tmp_path),
            "--burst",
            "--log-level",
            "BOGUS",
        )
    )


def test_bad_poll_interval(tmp_path: Path) -> None:
    args = ["--database-url", sqlite_url(tmp_path), "--burst", "--poll-interval", "0"]
    line = clean_error(alchq("run", "tests.tasks:CountTask", *args))
    assert "poll_interval" in line


# -- flask alchq ...  ------------------------------------------------------------------


def test_flask_run_burst(engine: Engine, db_url: str) -> None:
    metadata.create_all(engine)
    add_count_tasks(engine, 4)
    add_count_tasks(engine, 1, fail="flask boom")

    proc = ok(flask(db_url, "alchq", "run", "tests.tasks:CountTask", "--burst"))

    assert statuses(engine) == {"PROCESSED": 4, "ERROR": 1}
    assert len(run_log_rows(engine)) == 4
    assert proc.stderr.count(" PROCESSED in ") == 4


def test_flask_worker_runs_tasks_in_db_session(engine: Engine, db_url: str) -> None:
    metadata.create_all(engine, tables=[run_log])
    proc = ok(flask(db_url, "alchq", "create-tables", "tests.flask_app:FlaskTask"))
    assert proc.stdout.strip() == "created (if missing): flask_task, alchq_workers, alchq_progress"
    with engine.begin() as conn:
        conn.execute(insert(flask_table), [{"note": None}, {"note": None}])

    ok(flask(db_url, "alchq", "run", "tests.flask_app:FlaskTask", "--burst", *QUIET))

    # FlaskTask.run() raises unless its session is the app's db.session
    assert statuses(engine, flask_table) == {"PROCESSED": 2}
    with engine.connect() as conn:
        notes = conn.execute(select(flask_table.c.note, flask_table.c.alchq_error_message)).all()
    assert [n.alchq_error_message for n in notes] == [None, None]
    assert all(n.note.startswith("tests.flask_app pid=") for n in notes)
    assert len(run_log_rows(engine)) == 2


def test_flask_worker_creates_and_runs_periodic_tasks(engine: Engine, db_url: str) -> None:
    proc = ok(flask(db_url, "alchq", "create-tables", "tests.flask_app:FlaskPeriodic"))
    assert (
        proc.stdout.strip()
        == "created (if missing): flask_periodic, alchq_workers, alchq_progress, alchq_ticks"
    )
    worker_proc = subprocess.Popen(
        flask_command(
            "tests.flask_app",
            "alchq",
            "run",
            "tests.flask_app:FlaskPeriodic",
            "--poll-interval",
            "0.1",
        ),
        cwd=ROOT,
        env=env(**{URL_VARIABLE: db_url}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    periodic = FlaskPeriodic.__table__
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if statuses(engine, periodic).get("PROCESSED", 0) >= 3:
                break
            time.sleep(0.2)
    finally:
        worker_proc.send_signal(signal.SIGTERM)
        _out, err = worker_proc.communicate(timeout=60)
    assert worker_proc.returncode == 0, err
    found = statuses(engine, periodic)
    # One task per tick (a second apart), each run in the app's db.session.
    assert found.get("PROCESSED", 0) >= 3 and set(found) <= {"PROCESSED", "PENDING"}, (found, err)
    assert err.count("created by schedule 'every 1s'") == sum(found.values()), err
    with engine.connect() as conn:
        notes = conn.execute(select(periodic.c.note).where(periodic.c.status == "PROCESSED"))
        assert {n for (n,) in notes} == {"ran"}


def test_flask_create_tables(engine: Engine, db_url: str) -> None:
    proc = ok(flask(db_url, "alchq", "create-tables", "tests.tasks:CountTask"))
    assert proc.stdout.strip() == "created (if missing): count_task, alchq_workers, alchq_progress"
    assert inspect(engine).has_table("count_task")

    run_log.create(engine)
    add_count_tasks(engine, 2)
    ok(flask(db_url, "alchq", "run", "tests.tasks:CountTask", "--burst", *QUIET))
    assert statuses(engine) == {"PROCESSED": 2}


@pytest.mark.parametrize("command", ["run", "create-tables"])
@pytest.mark.parametrize(
    ("ref", "expected"),
    [IMPORT_ERRORS[0], IMPORT_ERRORS[2], IMPORT_ERRORS[5], IMPORT_ERRORS[6]],
)
def test_flask_bad_model_reference(
    tmp_path: Path, command: str, ref: str, expected: list[str]
) -> None:
    extra = ["--burst", *QUIET] if command == "run" else []
    line = clean_error(flask(sqlite_url(tmp_path), "alchq", command, ref, *extra))
    for text in expected:
        assert text in line


def test_flask_table_missing(engine: Engine, db_url: str) -> None:
    exists(engine)
    proc = flask(db_url, "alchq", "run", "tests.tasks:CountTask", "--burst", *QUIET)
    line = clean_error(proc)
    assert "'count_task'" in line and "create-tables" in line


def test_flask_table_missing_of_app_model(engine: Engine, db_url: str) -> None:
    exists(engine)
    proc = flask(db_url, "alchq", "run", "tests.flask_app:FlaskTask", "--burst", *QUIET)
    line = clean_error(proc)
    assert "'flask_task'" in line and "create_all" in line


def test_flask_database_unreachable_hides_password() -> None:
    proc = flask(unreachable_url(), "alchq", "run", "tests.tasks:CountTask", "--burst", *QUIET)
    line = clean_error(proc)
    assert "127.0.0.1" in line
    assert "s3cret" not in proc.stdout + proc.stderr


def test_run_and_error_that_remove_flask_sqlalchemys_session(engine: Engine, db_url: str) -> None:
    """db.session.remove() in run() or error(): each task ends in a defined state, error()
    is called when it should be, and the worker carries on."""
    table = FlaskRemover.__table__
    metadata.create_all(engine, tables=[run_log])
    FlaskRemover.metadata.create_all(engine, tables=[table])
    with engine.begin() as conn:
        ids = [
            conn.execute(insert(table).values(mode=m).returning(table.c.id)).scalar_one()
            for m in ("remove_then_write", "remove_then_raise", "error_removes")
        ]
    proc = flask(db_url, "alchq", "run", "tests.flask_app:FlaskRemover", "--burst")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    with engine.connect() as conn:
        status: dict[int, str] = dict(conn.execute(select(table.c.id, table.c.status)).all())
        logged = set(conn.execute(select(run_log.c.task_id)).scalars())
    wrote, raised, error_removes = ids
    assert status[wrote] == "PROCESSED" and wrote in logged  # its writes after remove() kept
    assert status[raised] == "ERROR" and -raised in logged  # error() called, its write kept
    assert status[error_removes] == "ERROR" and -error_removes not in logged  # discarded...
    assert "error() closed its session" in proc.stderr  # ...and said so


def test_flask_app_without_flask_sqlalchemy(tmp_path: Path) -> None:
    proc = flask(
        sqlite_url(tmp_path),
        "alchq",
        "run",
        "tests.tasks:CountTask",
        "--burst",
        app="tests.flask_app:bare_app",
    )
    assert "Flask-SQLAlchemy" in clean_error(proc)


def test_flask_negative_max_tasks_is_rejected(tmp_path: Path) -> None:
    rejected(
        flask(sqlite_url(tmp_path), "alchq", "run", "tests.tasks:CountTask", "--max-tasks", "-1")
    )


def test_flask_unknown_log_level_is_rejected(tmp_path: Path) -> None:
    rejected(
        flask(
            sqlite_url(tmp_path),
            "alchq",
            "run",
            "tests.tasks:CountTask",
            "--burst",
            "--log-level",
            "BOGUS",
        )
    )


# -- database URLs -------------------------------------------------------------------

ACCEPTED = "sqlite, postgresql (also postgres), mysql, mariadb"


@pytest.fixture
def pg_url(pg_base_url: str | None) -> str:
    """A fresh PostgreSQL database's URL (``postgresql+psycopg://``)."""
    if pg_base_url is None:
        pytest.skip("PostgreSQL is not available")
    return _fresh_pg_database(pg_base_url)


def serving_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if " serving " in line]


@pytest.mark.parametrize("scheme", ["postgres", "postgresql"])
def test_postgres_url_without_a_driver_uses_psycopg(pg_url: str, scheme: str) -> None:
    """What hosting platforms put in DATABASE_URL: postgres://, no driver."""
    real = make_url(pg_url)
    # The test server trusts local connections: the password is there to be hidden.
    url = real.set(drivername=scheme, password="s3cret").render_as_string(hide_password=False)
    assert url.startswith(f"{scheme}://postgres:s3cret@")
    proc = ok(alchq("create-tables", "tests.tasks:CountTask", "--database-url", url))
    assert proc.stdout.strip() == "created (if missing): count_task, alchq_workers, alchq_progress"
    engine = create_engine(pg_url)
    try:
        run_log.create(engine)
        add_count_tasks(engine, 3)

        proc = ok(alchq("run", "tests.tasks:CountTask", "--burst", DATABASE_URL=url))

        assert statuses(engine) == {"PROCESSED": 3}
        shown = real.set(password="s3cret").render_as_string(hide_password=True)
        assert shown.startswith("postgresql+psycopg://postgres:***@"), shown
        (line,) = serving_lines(proc.stderr)
        assert line.endswith(f" serving CountTask from {shown}"), line
        ok(alchq("prune", "tests.tasks:CountTask", "--older-than", "0", "--database-url", url))
        assert statuses(engine) == {}
    finally:
        engine.dispose()
    assert "s3cret" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("scheme", ["postgres", "postgresql"])
def test_postgres_url_without_an_installed_driver(tmp_path: Path, scheme: str) -> None:
    """Neither psycopg nor psycopg2 importable: one line saying what to install."""
    for module in ("psycopg", "psycopg2"):
        (tmp_path / module).mkdir()
        (tmp_path / module / "__init__.py").write_text(f"raise ImportError('no {module} here')\n")
    path = os.pathsep.join([str(tmp_path), worker_env()["PYTHONPATH"]])
    url = f"{scheme}://bob:s3cret@127.0.0.1:{free_port()}/x"
    proc = alchq("run", "tests.tasks:CountTask", "--database-url", url, "--burst", PYTHONPATH=path)
    line = clean_error(proc)
    assert "no PostgreSQL driver is installed" in line, line
    assert "pip install 'alchq[postgres]'" in line, line
    assert "bob:***@" in line and "s3cret" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("command", ["run", "create-tables", "prune"])
@pytest.mark.parametrize(
    ("url", "scheme"),
    [
        pytest.param("postgress://bob:s3cret@127.0.0.1/db", "postgress", id="typo"),
        pytest.param("foo://", "foo", id="foo"),
    ],
)
def test_unknown_scheme_names_the_accepted_ones(command: str, url: str, scheme: str) -> None:
    proc = alchq(command, "tests.tasks:CountTask", "--database-url", url)
    line = clean_error(proc)
    assert f"unknown database URL scheme {scheme!r}" in line, line
    assert ACCEPTED in line and "any installed SQLAlchemy dialect as dialect+driver://" in line
    assert "s3cret" not in proc.stdout + proc.stderr


# -- SQLite files: only create-tables creates one ---------------------------------------


@pytest.mark.parametrize("command", ["run", "prune"])
@pytest.mark.parametrize("where", ["missing.sqlite", "no/such/file.sqlite"])
def test_missing_sqlite_file_is_an_error_and_not_created(
    tmp_path: Path, command: str, where: str
) -> None:
    path = tmp_path / where
    proc = alchq(command, "tests.tasks:CountTask", "--database-url", f"sqlite:///{path}")
    line = clean_error(proc)
    assert f"the SQLite database file {path} does not exist" in line, line
    assert "alchq create-tables" in line
    assert not path.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["run", "prune"])
def test_relative_sqlite_path_is_read_from_the_current_directory(
    tmp_path: Path, command: str
) -> None:
    proc = alchq_in(
        tmp_path, command, "tests.tasks:CountTask", "--database-url", "sqlite:///q.sqlite"
    )
    line = clean_error(proc)
    assert f"the SQLite database file {tmp_path / 'q.sqlite'} does not exist" in line, line
    assert f"from the current directory {tmp_path}" in line, line
    assert list(tmp_path.iterdir()) == []


def test_create_tables_creates_the_sqlite_file_then_run_uses_it(tmp_path: Path) -> None:
    url = "sqlite:///new.sqlite"  # relative: in the current directory
    proc = ok(alchq_in(tmp_path, "create-tables", "tests.tasks:CountTask", "--database-url", url))
    assert proc.stdout.strip() == "created (if missing): count_task, alchq_workers, alchq_progress"
    assert (tmp_path / "new.sqlite").is_file()

    proc = ok(alchq_in(tmp_path, "run", "tests.tasks:CountTask", "--database-url", url, "--burst"))
    (line,) = serving_lines(proc.stderr)
    assert line.endswith(f" serving CountTask from sqlite:///{tmp_path / 'new.sqlite'}"), line
    ok(alchq_in(tmp_path, "prune", "tests.tasks:CountTask", "--database-url", url))


def test_create_tables_needs_the_directory_of_a_new_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "no" / "dir" / "q.sqlite"
    line = clean_error(
        alchq("create-tables", "tests.tasks:CountTask", "--database-url", f"sqlite:///{path}")
    )
    assert f"cannot create the SQLite database file {path}" in line, line
    assert f"its directory {path.parent} does not exist" in line, line
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_sqlite_is_no_file(tmp_path: Path, url: str) -> None:
    proc = alchq_in(
        tmp_path, "run", "tests.tasks:CountTask", "--database-url", url, "--burst", *QUIET
    )
    line = clean_error(proc)  # an empty database: the table is missing, as before
    assert "table 'count_task' for CountTask does not exist" in line, line
    ok(alchq_in(tmp_path, "create-tables", "tests.tasks:CountTask", "--database-url", url))
    assert list(tmp_path.iterdir()) == []


def test_sqlite_uri_modes_are_sqlites(tmp_path: Path) -> None:
    """file: URIs with mode= do as SQLite says: ro never creates the file, rwc does."""
    path = tmp_path / "q.sqlite"
    ro = f"sqlite:///file:{path}?mode=ro&uri=true"
    line = clean_error(
        alchq("run", "tests.tasks:CountTask", "--database-url", ro, "--burst", *QUIET)
    )
    assert "unable to open database file" in line, line
    assert not path.exists()

    rwc = f"sqlite:///file:{path}?mode=rwc&uri=true"
    ok(alchq("create-tables", "tests.tasks:CountTask", "--database-url", rwc))
    assert path.is_file()
    ok(alchq("run", "tests.tasks:CountTask", "--database-url", rwc, "--burst", *QUIET))


@pytest.mark.parametrize("command", ["run", "prune"])
def test_flask_missing_sqlite_file_is_an_error_and_not_created(
    tmp_path: Path, command: str
) -> None:
    path = tmp_path / "missing.sqlite"
    line = clean_error(flask(f"sqlite:///{path}", "alchq", command, "tests.tasks:CountTask"))
    assert f"the SQLite database file {path} does not exist" in line, line
    assert "flask alchq create-tables" in line and "SQLALCHEMY_DATABASE_URI" in line
    assert list(tmp_path.iterdir()) == []


#: A Flask app like tests.flask_app's, with its instance folder where the test says.
INSTANCE_APP = """
import os

from flask import Flask

from alchq.flask import Alchq
from tests.flask_app import URL_VARIABLE, db


def create_app():
    app = Flask("instance_app", instance_path=os.environ["TEST_INSTANCE_PATH"])
    app.config["SQLALCHEMY_DATABASE_URI"] = os.environ[URL_VARIABLE]
    db.init_app(app)
    Alchq(app)
    return app
"""


@pytest.fixture
def instance_flask(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``flask --app instance_app alchq ARGS`` on a URL; the instance folder is tmp/instance."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "instance_app.py").write_text(INSTANCE_APP)
    extra = {
        "PYTHONPATH": os.pathsep.join([str(code), worker_env()["PYTHONPATH"]]),
        "TEST_INSTANCE_PATH": str(tmp_path / "instance"),
    }

    def run(url: str, *args: str) -> subprocess.CompletedProcess[str]:
        return flask(url, "alchq", *args, app="instance_app", extra_env=extra)

    return run


def test_flask_relative_sqlite_path_is_in_the_instance_folder(
    tmp_path: Path, instance_flask: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    """Flask-SQLAlchemy reads it from the app's instance folder (alchq from the current
    directory): the message says where it looked."""
    instance = tmp_path / "instance"
    url = "sqlite:///q.sqlite"
    for command in ("run", "prune"):
        line = clean_error(instance_flask(url, command, "tests.tasks:CountTask"))
        assert f"the SQLite database file {instance / 'q.sqlite'} does not exist" in line, line
        assert f"instance folder {instance}" in line, line
        assert not (instance / "q.sqlite").exists()

    ok(instance_flask(url, "create-tables", "tests.tasks:CountTask"))
    assert (instance / "q.sqlite").is_file()
    proc = ok(instance_flask(url, "run", "tests.tasks:CountTask", "--burst"))
    (line,) = serving_lines(proc.stderr)
    assert line.endswith(f" serving CountTask from sqlite:///{instance / 'q.sqlite'}"), line


def test_flask_create_tables_needs_the_directory(tmp_path: Path) -> None:
    path = tmp_path / "no" / "q.sqlite"
    line = clean_error(
        flask(f"sqlite:///{path}", "alchq", "create-tables", "tests.tasks:CountTask")
    )
    assert f"its directory {path.parent} does not exist" in line, line
    assert not path.parent.exists()


# -- the worker's start line: only once its checks passed ------------------------------


def run_front(front: str, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``alchq run ARGS`` or ``flask alchq run ARGS`` on ``url``."""
    if front == "alchq":
        return alchq("run", *args, "--database-url", url)
    return flask(url, "alchq", "run", *args)


@pytest.mark.parametrize("front", ["alchq", "flask"])
def test_start_line_names_the_database_before_the_first_task(
    engine: Engine, db_url: str, front: str
) -> None:
    metadata.create_all(engine)
    add_count_tasks(engine, 2)

    proc = ok(run_front(front, db_url, "tests.tasks:CountTask", "--burst"))

    assert statuses(engine) == {"PROCESSED": 2}
    lines = proc.stderr.splitlines()
    (line,) = serving_lines(proc.stderr)
    # (Flask-SQLAlchemy adds ?charset=utf8mb4 to a MySQL URL: the line shows the engine's.)
    shown = f" serving CountTask from {make_url(db_url).render_as_string()}"
    assert line.endswith(shown) or line.endswith(f"{shown}?charset=utf8mb4"), line
    first_task = next(i for i, text in enumerate(lines) if "started (attempt 1)" in text)
    assert lines.index(line) < first_task, proc.stderr


def _table_of_the_wrong_shape(engine: Engine) -> None:
    """count_task with only its id: the supervisor's look finds it, a claim would fail."""
    Table("count_task", MetaData(), Column("id", Integer, primary_key=True)).create(engine)


@pytest.mark.parametrize(
    ("front", "extra"),
    [("alchq", ()), ("alchq", ("--concurrency", "2")), ("flask", ())],
    ids=["alchq", "alchq-concurrency", "flask"],
)
def test_no_start_line_when_the_checks_fail(
    engine: Engine, db_url: str, front: str, extra: tuple[str, ...]
) -> None:
    _table_of_the_wrong_shape(engine)

    proc = run_front(front, db_url, "tests.tasks:CountTask", "--burst", *extra)

    out = f"exit {proc.returncode}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, out
    errors = [line for line in proc.stderr.splitlines() if line.startswith("alchq: error:")]
    assert errors and all("the table does not match the model" in e for e in errors), out
    assert "serving" not in proc.stderr, out


# -- --log-level -----------------------------------------------------------------------

LEVELS = ["debug", "DEBUG", "Info", "warning", "error", "critical"]


@pytest.fixture
def queue_file(tmp_path: Path) -> str:
    """A SQLite queue with its tables and nothing to do."""
    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    eng = create_engine(url)
    try:
        metadata.create_all(eng)
    finally:
        eng.dispose()
    return url


@pytest.mark.parametrize("front", ["alchq", "flask"])
@pytest.mark.parametrize("level", LEVELS)
def test_log_level_in_any_case(queue_file: str, front: str, level: str) -> None:
    proc = ok(
        run_front(front, queue_file, "tests.tasks:CountTask", "--burst", "--log-level", level)
    )
    logged = {m.group(1) for m in re.finditer(r"^\S+ \S+ ([A-Z]+) alchq\.", proc.stderr, re.M)}
    if level.upper() == "DEBUG":
        assert "DEBUG" in logged and serving_lines(proc.stderr), proc.stderr
        assert " settings: Settings(poll_interval=" in proc.stderr, proc.stderr
    elif level.upper() == "INFO":
        assert logged == {"INFO"} and serving_lines(proc.stderr), proc.stderr
    else:
        assert proc.stderr == "", proc.stderr


@pytest.mark.parametrize("front", ["alchq", "flask"])
@pytest.mark.parametrize("value", ["bogus", "WARN"])
def test_bad_log_level_lists_the_accepted_ones(tmp_path: Path, front: str, value: str) -> None:
    proc = run_front(front, sqlite_url(tmp_path), "tests.tasks:CountTask", "--log-level", value)
    out = f"exit {proc.returncode}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, out
    errors = [line for line in proc.stderr.splitlines() if re.search("error:", line, re.I)]
    assert len(errors) == 1, out
    assert "--log-level" in errors[0] and value in errors[0], out
    for level in ("debug", "info", "warning", "error", "critical"):
        assert re.search(rf"\b{level}\b", errors[0], re.I), out
    assert not (tmp_path / "never-created.sqlite").exists()


# -- the seed's hand-written command group ------------------------------------------------


def test_seed_group_process_n(engine: Engine, db_url: str) -> None:
    metadata.create_all(engine)
    add_count_tasks(engine, 5)

    ok(flask(db_url, "queue", "run", "-n", "3", app="tests.flask_app:seed_app"))

    assert statuses(engine) == {"PROCESSED": 3, "PENDING": 2}


def test_seed_group_process_forever_stops_on_sigterm(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    metadata.create_all(engine)
    add_count_tasks(engine, 3)
    stderr_path = tmp_path / "worker.stderr"

    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(
            flask_command("tests.flask_app:seed_app", "queue", "run"),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            cwd=ROOT,
            env=env(**{URL_VARIABLE: db_url, "ALCHQ_POLL_INTERVAL": "0.1"}),
        )
        try:
            deadline = time.monotonic() + 90
            while statuses(engine) != {"PROCESSED": 3}:
                assert proc.poll() is None, stderr_path.read_text()
                assert time.monotonic() < deadline, statuses(engine)
                time.sleep(0.1)
            add_count_tasks(engine, 1)  # a task arriving later is picked up too
            while statuses(engine) != {"PROCESSED": 4}:
                assert proc.poll() is None, stderr_path.read_text()
                assert time.monotonic() < deadline, statuses(engine)
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            returncode = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    err = stderr_path.read_text()
    assert returncode == 0, err
    assert "Traceback" not in err
    assert len(run_log_rows(engine)) == 4


def test_seed_app_has_no_alchq_group_but_the_queue_group(tmp_path: Path) -> None:
    proc = ok(flask(sqlite_url(tmp_path), "--help", app="tests.flask_app:seed_app"))
    commands = proc.stdout.split("Commands:")[1].split()
    assert "queue" in commands and "alchq" not in commands
    proc = ok(flask(sqlite_url(tmp_path), "--help"))
    assert "alchq" in proc.stdout.split("Commands:")[1].split()
