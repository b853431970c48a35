"""``alchq run ... --concurrency N``: several workers under one supervising command.

Real supervisors and real children on SQLite and PostgreSQL, driven with real
signals. "Exactly once" is counted in the database as in test_concurrency:
CountTask.run() logs each run in ``run_log`` in the transaction that records
PROCESSED.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, func, insert, select

from alchq import Status, metadata
from alchq._pool import QUICK_DEATH
from alchq.worker import MAX_BATCH
from tests.conftest import ROOT, alchq_command, worker_env
from tests.fault_tasks import fault_task
from tests.flask_app import URL_VARIABLE, FlaskTask
from tests.support import wait_until
from tests.tasks import CountTask, DyingTask, run_log

count_table: Any = CountTask.__table__  # type: ignore[attr-defined]
flask_table: Any = FlaskTask.__table__

#: Short leases, so that the claim of a SIGKILLed child comes back within seconds.
FAST = {
    "ALCHQ_HEARTBEAT_INTERVAL": "0.5",
    "ALCHQ_LEASE": "3",
    "ALCHQ_RESCUE_INTERVAL": "1",
    "ALCHQ_POLL_INTERVAL": "0.2",
    "ALCHQ_GRACE_PERIOD": "5",
}
#: For counting claims too: a lease that a busy 2-core machine cannot outrun.
SAFE_LEASE = {"ALCHQ_LEASE": "8", "ALCHQ_HEARTBEAT_INTERVAL": "1"}
STARTED = re.compile(r"worker process (\d+) \(pid (\d+)\) started")


# -- helpers -------------------------------------------------------------------------


def env(**extra: str) -> dict[str, str]:
    """worker_env() without outside settings that would change what is tested."""
    base = {
        k: v
        for k, v in worker_env().items()
        if not k.startswith(("ALCHQ_", "FLASK_")) and k not in (URL_VARIABLE, "DATABASE_URL")
    }
    return {**base, **FAST, **extra}


def gone(pid: int) -> bool:
    """Has process ``pid`` ended? (A zombie has: this container's init may not reap.)"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


class Pool:
    """One supervising command; its output, and its children's, goes to ``log``."""

    def __init__(self, command: list[str], log: Path, environ: dict[str, str]) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=environ,
                start_new_session=True,  # a Ctrl-C of pytest is not for it
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def children(self) -> dict[int, list[int]]:
        """Pids of the children the supervisor started, by worker number, oldest first."""
        found: dict[int, list[int]] = {}
        for index, pid in STARTED.findall(self.output()):
            found.setdefault(int(index), []).append(int(pid))
        return found

    def child_pids(self) -> set[int]:
        return {pid for pids in self.children().values() for pid in pids}

    def describe(self) -> str:
        return f"supervisor rc {self.proc.poll()}, output:\n{self.output()[-6000:]}"

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout:g}s\n{self.describe()}") from None

    def close(self) -> None:
        for pid in [self.pid, *self.child_pids()]:
            if not gone(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.proc.poll() is None:
            self.proc.wait(10)


@pytest.fixture
def pools(tmp_path: Path) -> Iterator[Callable[..., Pool]]:
    """Starts supervising commands; kills whatever is left of them at the end."""
    started: list[Pool] = []

    def start(*command: str, **extra_env: str) -> Pool:
        pool = Pool(list(command), tmp_path / f"pool{len(started)}.log", env(**extra_env))
        started.append(pool)
        return pool

    yield start
    for pool in started:
        pool.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite queue with the tests' tables, for scenarios that don't depend on the database."""
    url = f"sqlite:///{tmp_path / 'queue.sqlite'}"
    eng = create_engine(url)
    metadata.create_all(eng)
    eng.dispose()
    return url


@pytest.fixture
def sqlite_engine(sqlite_url: str) -> Iterator[Engine]:
    eng = create_engine(sqlite_url)
    yield eng
    eng.dispose()


def run(command: list[str], **extra_env: str) -> subprocess.CompletedProcess[str]:
    """Run a command to completion (within a generous minute) and capture its output."""
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env(**extra_env),
        check=False,
    )


def flask_command(*args: str) -> list[str]:
    exe = Path(sys.executable).with_name("flask")
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "flask"]
    return [*base, "--app", "tests.flask_app", *args]


def add_tasks(engine: Engine, table: Any, n: int, **values: Any) -> list[int]:
    """Insert ``n`` tasks; their ids."""
    with engine.begin() as conn:
        result = conn.execute(
            insert(table).returning(table.c.id, sort_by_parameter_order=True),
            [dict(values) for _ in range(n)],
        )
        return [int(r[0]) for r in result]


def statuses(engine: Engine, table: Any = count_table) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(select(table.c.status, func.count()).group_by(table.c.status))
        return {str(status): int(n) for status, n in rows}


def settled(engine: Engine, table: Any = count_table) -> bool:
    counts = statuses(engine, table)
    return not counts.get(Status.PENDING) and not counts.get(Status.PROCESSING)


def runs(engine: Engine) -> dict[str, Any]:
    """What run_log says: how many runs, of how many tasks, by which worker processes."""
    process = run_log.c.process
    with engine.connect() as conn:
        per_pid: dict[Any, Any] = dict(
            conn.execute(select(process, func.count()).group_by(process)).all()
        )
        return {
            "runs": conn.scalar(select(func.count()).select_from(run_log)),
            "tasks": conn.scalar(select(func.count(run_log.c.task_id.distinct()))),
            "per_pid": {int(pid): int(n) for pid, n in per_pid.items()},
        }


def clean_error(proc: subprocess.CompletedProcess[str]) -> str:
    """Exit 1 with one ``alchq: error:`` line and no other output; return the line."""
    out = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 1, out
    assert proc.stdout == "", out
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("alchq: error: "), out
    return lines[0]


# -- processes ---------------------------------------------------------------------------


def test_pool_drains_2000_tasks_exactly_once_and_replaces_a_killed_child(
    engine: Engine, db_url: str, pools: Callable[..., Pool]
) -> None:
    """The issue's demonstration: 4 processes, 2,000 tasks, one child SIGKILLed mid-queue."""
    metadata.create_all(engine)
    tasks = 2_000
    add_tasks(engine, count_table, tasks, sleep=0)
    pool = pools(
        *alchq_command(
            "run", "tests.tasks:CountTask", "--database-url", db_url, "--concurrency", "4"
        ),
        **SAFE_LEASE,
    )

    wait_until(lambda: len(pool.children()) == 4, 60, "4 children", pool.describe)
    first = pool.children()
    # A child that is working: it has committed runs, and the queue is far from empty.
    victim = wait_until(
        lambda: min(set(runs(engine)["per_pid"]) & pool.child_pids(), default=0),
        60,
        "a child to process tasks",
        pool.describe,
    )
    assert statuses(engine).get(Status.PENDING, 0) > tasks // 4, "drained too fast to test"
    os.kill(victim, signal.SIGKILL)
    number = next(i for i, pids in first.items() if victim in pids)
    died = f"worker process {number} (pid {victim}) died (killed by SIGKILL); starting a new one"
    wait_until(lambda: died in pool.output(), 30, "the death to be reported", pool.describe)
    replacement = wait_until(
        lambda: pool.children()[number][1:], 30, "a replacement child", pool.describe
    )[0]
    assert replacement != victim and not gone(replacement)

    # Its lost claim, if any, comes back when the lease expires (meanwhile, the rest run).
    wait_until(lambda: settled(engine), 180, "an empty queue", pool.describe)
    alive = [pid for pid in pool.child_pids() if not gone(pid)]
    assert len(alive) == 4, pool.describe()
    pool.proc.send_signal(signal.SIGTERM)
    assert pool.wait(30) == 0, pool.describe()
    assert all(gone(pid) for pid in pool.child_pids()), pool.describe()

    output = pool.output()
    assert "Traceback" not in output, pool.describe()
    assert output.count(" died ") == 1, pool.describe()
    assert statuses(engine) == {Status.PROCESSED: tasks}
    counted = runs(engine)
    assert counted["runs"] == tasks and counted["tasks"] == tasks  # none twice, none lost
    assert set(counted["per_pid"]) <= pool.child_pids()
    assert len(counted["per_pid"]) > 1, counted["per_pid"]
    with engine.connect() as conn:
        reclaimed = conn.execute(
            select(func.count()).select_from(count_table).where(count_table.c.alchq_attempts > 1)
        ).scalar_one()
    # Only the claims the victim held: its task in hand, or the batch it had claimed
    # (whose effects died with it: each counted once above).
    assert reclaimed <= MAX_BATCH


def test_children_stop_when_the_supervisor_is_killed(
    sqlite_url: str, pools: Callable[..., Pool]
) -> None:
    pool = pools(
        *alchq_command(
            "run", "tests.tasks:CountTask", "--database-url", sqlite_url, "--concurrency", "2"
        )
    )
    wait_until(
        lambda: pool.output().count(" serving CountTask") == 2, 60, "2 workers", pool.describe
    )
    children = pool.child_pids()
    assert len(children) == 2 and not any(gone(pid) for pid in children), pool.describe()

    pool.proc.send_signal(signal.SIGKILL)
    assert pool.wait(10) == -signal.SIGKILL

    # They die with it, as one process would (their claims go back through their leases).
    wait_until(lambda: all(gone(pid) for pid in children), 5, "orphans to exit", pool.describe)


def test_tasks_that_kill_their_workers_end_and_the_pool_goes_on(
    sqlite_url: str, sqlite_engine: Engine, pools: Callable[..., Pool]
) -> None:
    """Every such task kills the worker that runs it: each death is replaced at once
    (its task taken over by the replacement), each task ends after max_lost_claims, and
    the pool serves the rest. The number of workers comes from ALCHQ_CONCURRENCY here."""
    killers = add_tasks(sqlite_engine, fault_task, 4, action="os_exit", sleep=0, errors=0)
    (fine,) = add_tasks(sqlite_engine, fault_task, 1, action="ok", sleep=0, errors=0)
    pool = pools(
        *alchq_command("run", "tests.fault_tasks:FaultTask", "--database-url", sqlite_url),
        ALCHQ_CONCURRENCY="3",
        ALCHQ_RESCUE_INTERVAL="1",
    )

    def by_id() -> dict[int, str]:
        with sqlite_engine.connect() as conn:
            rows = conn.execute(select(fault_task.c.id, fault_task.c.status)).all()
        return {int(i): str(st) for i, st in rows}

    wait_until(
        lambda: all(by_id()[t] == "ERROR" for t in killers) and by_id()[fine] == "PROCESSED",
        90,
        "every task to end",
        pool.describe,
    )
    assert pool.proc.poll() is None, pool.describe()
    with sqlite_engine.connect() as conn:
        lost = conn.execute(
            select(fault_task.c.alchq_lost_claims, fault_task.c.alchq_error_type).where(
                fault_task.c.id.in_(killers)
            )
        ).all()
    assert all(n == 3 and kind == "alchq.exceptions.WorkerLostError" for n, kind in lost), lost
    output = pool.output()
    assert output.count("died (exit status 9); starting a new one\n") >= 12, output
    assert "in a row ended within" not in output and "Traceback" not in output
    pool.proc.send_signal(signal.SIGTERM)
    assert pool.wait(30) == 0, pool.describe()


def test_workers_that_die_as_they_start_make_the_pool_give_up(
    sqlite_url: str, sqlite_engine: Engine, pools: Callable[..., Pool]
) -> None:
    """A crash at start in every worker process: replaced with growing delays, then one
    error and exit 1."""
    import tests.dying_tasks  # noqa: F401 - its table in alchq.metadata

    metadata.create_all(sqlite_engine)
    pool = pools(
        *alchq_command("run", "tests.dying_tasks:StartDyingTask", "--database-url", sqlite_url),
        ALCHQ_CONCURRENCY="2",
    )
    assert pool.wait(90) == 1, pool.describe()
    output = pool.output()
    errors = [line for line in output.splitlines() if line.startswith("alchq: error:")]
    assert len(errors) == 1, pool.describe()
    assert f"5 processes in a row ended within {QUICK_DEATH:g}s of starting: giving up" in errors[0]
    assert re.search(r"died \(exit status 3\); starting a new one in \d+s", output), output
    assert "Traceback" not in output
    assert all(gone(pid) for pid in pool.child_pids()), pool.describe()


# -- threads -----------------------------------------------------------------------------


def test_thread_pool_drains_tasks_exactly_once_and_stops_on_sigterm(
    engine: Engine, db_url: str, pools: Callable[..., Pool]
) -> None:
    metadata.create_all(engine)
    tasks = 300
    add_tasks(engine, count_table, tasks, sleep=0)
    pool = pools(
        *alchq_command(
            "run",
            "tests.tasks:CountTask",
            "--database-url",
            db_url,
            "--concurrency",
            "4",
            "--pool",
            "threads",
        ),
        **SAFE_LEASE,
    )

    wait_until(lambda: settled(engine), 120, "an empty queue", pool.describe)
    pool.proc.send_signal(signal.SIGTERM)
    assert pool.wait(30) == 0, pool.describe()

    output = pool.output()
    assert "Traceback" not in output and " died " not in output, pool.describe()
    assert all(f"worker thread {i} started" in output for i in range(1, 5)), output
    assert len(pool.child_pids()) == 1, "threads, in one worker process"
    assert statuses(engine) == {Status.PROCESSED: tasks}
    counted = runs(engine)
    assert counted["runs"] == tasks and counted["tasks"] == tasks
    assert set(counted["per_pid"]) == pool.child_pids()
    with engine.connect() as conn:
        workers = conn.execute(
            select(func.count(count_table.c.alchq_worker.distinct()))
        ).scalar_one()
        reclaimed = conn.execute(
            select(func.count()).select_from(count_table).where(count_table.c.alchq_attempts > 1)
        ).scalar_one()
    assert workers > 1, "one thread did all the work"
    assert reclaimed == 0


def test_a_thread_that_dies_is_replaced_until_they_keep_dying(
    sqlite_url: str, sqlite_engine: Engine, pools: Callable[..., Pool]
) -> None:
    """Each thread dies claiming a task (an unexpected error): each death is reported and
    replaced, until they keep dying."""
    dying = DyingTask.__table__  # type: ignore[attr-defined]
    metadata.create_all(sqlite_engine, tables=[dying])
    pool = pools(
        *alchq_command(
            "run",
            "tests.tasks:DyingTask",
            "--database-url",
            sqlite_url,
            "--concurrency",
            "2",
            "--pool",
            "threads",
        )
    )
    wait_until(
        lambda: pool.output().count(" serving DyingTask") == 2, 60, "2 workers", pool.describe
    )
    with sqlite_engine.begin() as conn:
        conn.execute(dying.insert().values(id=1))

    assert pool.wait(60) == 1, pool.describe()
    output = pool.output()
    assert re.search(
        r"worker thread \d died \(RuntimeError: this key cannot be read back\); "
        r"starting a new one",
        output,
    ), output
    assert "worker thread 1 started" in output and output.count(" started") >= 5, output
    errors = [line for line in output.splitlines() if line.startswith("alchq: error:")]
    assert len(errors) == 1 and "5 threads in a row" in errors[0], output
    assert "Traceback" not in output


# -- Flask ---------------------------------------------------------------------------------


def test_flask_command_runs_a_pool(engine: Engine, db_url: str) -> None:
    """Processes, then threads: each task runs once, in the app's db.session."""
    metadata.create_all(engine)
    flask_table.create(engine)
    add_tasks(engine, flask_table, 20, note=None)
    run_burst = ("alchq", "run", "tests.flask_app:FlaskTask", "--concurrency", "2", "--burst")

    processes = run(flask_command(*run_burst), **{URL_VARIABLE: db_url})
    out = f"exit {processes.returncode}\n{processes.stderr}"
    assert processes.returncode == 0 and "Traceback" not in processes.stderr, out
    children = {int(pid) for _, pid in STARTED.findall(processes.stderr)}
    assert len(children) == 2, out
    assert statuses(engine, flask_table) == {Status.PROCESSED: 20}
    assert set(runs(engine)["per_pid"]) <= children

    add_tasks(engine, flask_table, 20, note=None)
    threads = run(flask_command(*run_burst, "--pool", "threads"), **{URL_VARIABLE: db_url})
    out = f"exit {threads.returncode}\n{threads.stderr}"
    assert threads.returncode == 0 and "Traceback" not in threads.stderr, out
    assert "worker thread 2 started" in threads.stderr
    assert len(STARTED.findall(threads.stderr)) == 1  # the threads' one worker process

    assert statuses(engine, flask_table) == {Status.PROCESSED: 40}
    counted = runs(engine)
    assert counted["runs"] == 40 and counted["tasks"] == 40
    with engine.connect() as conn:
        notes = conn.execute(select(flask_table.c.note)).scalars().all()
    assert all(n.startswith("tests.flask_app pid=") for n in notes), notes


# -- misconfiguration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "url", "expected"),
    [
        ("tests.tasks:NoSuchTask", "sqlite", "has no attribute 'NoSuchTask'"),
        ("tests.tasks:CountTask", "sqlite", "table 'count_task' for CountTask does not exist"),
        ("tests.tasks:CountTask", "unreachable", "cannot reach the database"),
    ],
)
def test_misconfiguration_is_one_line_before_any_child_starts(
    tmp_path: Path, model: str, url: str, expected: str
) -> None:
    if url == "sqlite":
        (tmp_path / "empty.sqlite").touch()  # a database without the table
        url = f"sqlite:///{tmp_path / 'empty.sqlite'}"
    else:
        url = "postgresql+psycopg://bob:s3cret@127.0.0.1:1/x"  # nothing listens on port 1
    proc = run(alchq_command("run", model, "--database-url", url, "--concurrency", "4"))
    line = clean_error(proc)
    assert expected in line and "s3cret" not in line, line


def test_flask_misconfiguration_is_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.sqlite'}"
    command = flask_command("alchq", "run", "tests.tasks:Nope", "--concurrency", "2")
    line = clean_error(run(command, **{URL_VARIABLE: url}))
    assert "has no attribute 'Nope'" in line


def test_bad_concurrency_values_are_rejected(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.sqlite'}"
    base = alchq_command("run", "tests.tasks:CountTask", "--database-url", url)
    for args in (("--concurrency", "0"), ("--pool", "forks")):
        proc = run([*base, *args])
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert f"argument {args[0]}" in proc.stderr, proc.stderr
    line = clean_error(run(base, ALCHQ_CONCURRENCY="many"))
    assert "ALCHQ_CONCURRENCY must be a whole number >= 1, got 'many'" in line
