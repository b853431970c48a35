"""Helpers of the fault tests: worker processes, a queue to watch, the invariants.

Every scenario runs real ``alchq run tests.fault_tasks:FaultTask`` processes with
short timings (:data:`FAST`), drives them with real signals, and ends with
:func:`check_invariants`.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from sqlalchemy import Engine, column, create_engine, func, insert, make_url, select, text
from sqlalchemy.engine import Row
from sqlalchemy.sql.expression import ColumnClause

from alchq import Status
from tests.conftest import ROOT, alchq_command, worker_env
from tests.fault_tasks import FaultTask, fault_counter, fault_done, fault_start, fault_task
from tests.mariadbserver import MariaDBServer
from tests.pgserver import PgServer
from tests.support import wait_until

#: Worker settings of every fault test (seconds), as ``ALCHQ_*`` variables.
FAST = {
    "ALCHQ_HEARTBEAT_INTERVAL": "0.5",
    "ALCHQ_LEASE": "3",
    "ALCHQ_RESCUE_INTERVAL": "1",
    "ALCHQ_GRACE_PERIOD": "2",
    "ALCHQ_POLL_INTERVAL": "0.2",
    "ALCHQ_KILL_AFTER": "1",
}
LEASE = float(FAST["ALCHQ_LEASE"])
RESCUE_INTERVAL = float(FAST["ALCHQ_RESCUE_INTERVAL"])
GRACE_PERIOD = float(FAST["ALCHQ_GRACE_PERIOD"])
#: How long a lost claim may stay PROCESSING while a live worker is around:
#: a lease, a rescue interval, and slack for a busy 2-core CI machine.
RESCUE_WAIT = LEASE + RESCUE_INTERVAL + 8

MODEL = "tests.fault_tasks:FaultTask"
#: Actions whose runs leave no ``fault_done`` row.
UNRECORDED = frozenset({"quiet", "noop", "own_connection", "close_session"})
TABLES = [fault_task, fault_start, fault_done, fault_counter]


# -- waiting -------------------------------------------------------------------------


# -- worker processes ------------------------------------------------------------------


@dataclass
class WorkerProc:
    """One ``alchq run`` process; its stdout and stderr go to ``log_path``."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    name: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, sig: signal.Signals) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 15) -> int:
        return self.proc.wait(timeout)

    def owns(self, alchq_worker: str | None) -> bool:
        """Is ``alchq_worker`` (``host:pid:random``) an id of this process?"""
        return alchq_worker is not None and f":{self.pid}:" in alchq_worker

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.output().splitlines()[-lines:])


class Workers:
    """Starts worker processes on one database and cleans up after them.

    ``start()`` returns at once (the worker connects on its own); use
    :func:`wait_until` on the database for what you expect it to do. On
    :meth:`close` every process still running is resumed and SIGKILLed.
    """

    def __init__(self, url: str, log_dir: Path, env: Mapping[str, str] | None = None) -> None:
        self.url = url
        self.log_dir = log_dir
        self.env = {**worker_env(), **FAST, **(env or {})}
        self.procs: list[WorkerProc] = []
        self._numbers = itertools.count(1)
        log_dir.mkdir(parents=True, exist_ok=True)
        #: Where tasks of action ``quiet`` log their starts.
        self.quiet_dir = log_dir / "quiet"
        self.quiet_dir.mkdir(exist_ok=True)
        self.env["FAULT_QUIET_DIR"] = str(self.quiet_dir)

    def start(
        self,
        *args: str,
        env: Mapping[str, str] | None = None,
        log_level: str = "INFO",
        url: str | None = None,
        model: str = MODEL,
    ) -> WorkerProc:
        name = f"w{next(self._numbers)}"
        log_path = self.log_dir / f"{name}.log"
        command = alchq_command(
            "run", model, "--database-url", url or self.url, "--log-level", log_level, *args
        )
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**self.env, **(env or {})},
                start_new_session=True,  # a Ctrl-C of pytest is not for them
            )
        worker = WorkerProc(proc, log_path, name)
        self.procs.append(worker)
        return worker

    def alive(self) -> list[WorkerProc]:
        return [w for w in self.procs if w.alive()]

    def kill(self, worker: WorkerProc) -> int:
        worker.send(signal.SIGKILL)
        return worker.wait()

    def freeze(self, worker: WorkerProc) -> None:
        worker.send(signal.SIGSTOP)

    def thaw(self, worker: WorkerProc) -> None:
        worker.send(signal.SIGCONT)

    def term(self, worker: WorkerProc) -> None:
        worker.send(signal.SIGTERM)

    def stop_all(self, timeout: float = 20) -> dict[str, int]:
        """SIGTERM every live worker and wait: {name: exit code} of those.

        A worker started a moment ago is first given time to start: SIGTERM
        while Python is still importing ends it by the signal's default action
        (exit -15) before alchq can handle it, which is not what is tested.
        """
        running = self.alive()
        for w in running:
            w.send(signal.SIGCONT)
        deadline = time.monotonic() + 15
        for w in running:
            while w.alive() and not w.output().strip() and time.monotonic() < deadline:
                time.sleep(0.05)
        for w in running:
            w.send(signal.SIGTERM)
        return {w.name: w.wait(timeout) for w in running}

    def stop_all_cleanly(self, timeout: float = 20) -> None:
        """SIGTERM every live worker; each must exit 0."""
        codes = self.stop_all(timeout)
        assert codes and set(codes.values()) == {0}, f"exit codes {codes}\n{self.describe()}"

    def output(self) -> str:
        return "\n".join(f"===== {w.name} (pid {w.pid})\n{w.output()}" for w in self.procs)

    def describe(self) -> str:
        return "\n".join(
            f"----- {w.name} pid {w.pid} rc {w.proc.poll()}, last lines:\n{w.tail()}"
            for w in self.procs
        )

    def close(self) -> None:
        for w in self.procs:
            if w.alive():
                w.send(signal.SIGCONT)
                w.send(signal.SIGKILL)
            try:
                w.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover - unkillable
                pass

    def __enter__(self) -> Workers:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def logged_releases(output: str) -> Counter[int]:
    """Task ids a worker put back to PENDING itself (shutdown, or a run lost to an outage)."""
    return Counter(
        int(m.group(1))
        for m in re.finditer(r"FaultTask (\d+)(?: released:|:) back to PENDING", output)
    )


# -- the queue as the tests see it -------------------------------------------------------


class Queue:
    """The FaultTask table and its logs, read and written from the test process."""

    def __init__(self, url: str) -> None:
        self.url = url
        sqlite = make_url(url).get_backend_name() == "sqlite"
        self.engine: Engine = create_engine(
            url,
            pool_pre_ping=True,  # survives a server restart or pg_terminate_backend
            connect_args={"timeout": 30} if sqlite else {},
        )
        if sqlite:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        with self.engine.begin() as conn:
            for table in TABLES:
                table.create(conn, checkfirst=True)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def add(self, n: int = 1, **values: Any) -> list[int]:
        """Insert ``n`` tasks with ``values``; their ids, in claim order."""
        return self.add_many([values] * n)

    def add_many(self, rows: list[dict[str, Any]]) -> list[int]:
        """Insert one task per dict, in one transaction; their ids, in claim order."""
        table = fault_task
        # One key set for all rows: an executemany takes its columns from the first.
        full = [{"action": "ok", "sleep": 0, "errors": 0, "payload": None, **r} for r in rows]
        assert len({frozenset(r) for r in full}) <= 1, "unknown columns in some rows"
        with self.engine.begin() as conn:
            result = conn.execute(
                insert(table).returning(table.c.id, sort_by_parameter_order=True), full
            )
            return [int(r[0]) for r in result]

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(FaultTask.status, func.count()).group_by(FaultTask.status))
            return {str(status): int(n) for status, n in rows}

    def settled(self) -> bool:
        """Nothing PENDING or PROCESSING."""
        counts = self.counts()
        return not counts.get("PENDING") and not counts.get("PROCESSING")

    def row(self, task_id: int) -> Row[Any]:
        return self.rows(task_id)[task_id]

    def rows(self, *ids: int) -> dict[int, Row[Any]]:
        """Tasks by id (all of them, or ``ids``), as stored: bad values must not fail here."""
        t = fault_task
        with self.engine.connect() as conn:
            untyped: list[ColumnClause[Any]] = [column(c.name) for c in t.c]  # no processing
            stmt = select(*untyped).select_from(t).order_by(t.c.id)
            if ids:
                stmt = stmt.where(t.c.id.in_(ids))
            return {int(r.id): r for r in conn.execute(stmt)}

    def held_by(self, worker: WorkerProc) -> dict[int, tuple[str, int]]:
        """The tasks PROCESSING under one of ``worker``'s ids: {id: (worker id, attempts)}."""
        t = fault_task
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(t.c.id, t.c.alchq_worker, t.c.alchq_attempts).where(
                    t.c.status == Status.PROCESSING
                )
            ).all()
        return {
            int(r.id): (r.alchq_worker, int(r.alchq_attempts))
            for r in rows
            if worker.owns(r.alchq_worker)
        }

    def starts(self, task_id: int) -> list[int]:
        """Pids that started ``task_id``, in order."""
        return self._pids(fault_start, task_id)

    def done(self, task_id: int) -> list[int]:
        """Pids whose run of ``task_id`` was committed."""
        return self._pids(fault_done, task_id)

    def _pids(self, table: Any, task_id: int) -> list[int]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(table.c.pid).where(table.c.task_id == task_id).order_by(table.c.id)
            )
            return [int(r[0]) for r in rows]

    def per_task(self, table: Any) -> Counter[int]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(table.c.task_id, func.count()).group_by(table.c.task_id))
            return Counter({int(task_id): int(n) for task_id, n in rows})

    def describe(self) -> str:
        return f"statuses: {self.counts()}"

    def dispose(self) -> None:
        self.engine.dispose()


def check_invariants(
    queue: Queue,
    *,
    releases: int | Mapping[int, int] = 0,
    timeout: float = RESCUE_WAIT,
    describe: Callable[[], str] | None = None,
    quiet_dir: Path | None = None,
) -> dict[str, int]:
    """The guarantees, checked on the final state of a scenario; returns the status counts.

    - no task stays PROCESSING (waited for up to ``timeout``: a live worker must
      be around to rescue lost claims);
    - every PROCESSED task's run was committed exactly once (one ``fault_done``);
    - no ERROR or PENDING task has a committed run;
    - every extra start is explained: starts <= 1 + alchq_lost_claims + releases,
      where ``releases`` (a number for every task, or per task id) counts the
      times the scenario allows a worker to put the task back itself.

    Tasks of action ``quiet`` write nothing to the database: their starts are
    read from ``quiet_dir``, and their outcome is their status alone; those of
    action ``filed`` log their starts there too, and write their effect. Those of
    action ``noop`` leave no trace but their row; ``own_connection`` ones only
    their starts.
    """
    wait_until(
        lambda: not queue.counts().get("PROCESSING"),
        timeout,
        interval=0.2,
        what="no task PROCESSING",
        describe=describe,
    )
    rows = queue.rows()
    starts = queue.per_task(fault_start)
    done = queue.per_task(fault_done)
    problems: list[str] = []
    for task_id, row in rows.items():
        if row.action in ("quiet", "filed"):
            assert quiet_dir is not None, "quiet tasks: pass quiet_dir"
            path = quiet_dir / f"{task_id}.starts"
            starts[task_id] = len(path.read_text().split()) if path.exists() else 0
        status = str(row.status)
        allowed = releases if isinstance(releases, int) else releases.get(task_id, 0)
        if status == "PROCESSED" and done[task_id] != 1 and row.action not in UNRECORDED:
            problems.append(f"task {task_id} PROCESSED with {done[task_id]} committed runs")
        if status in ("ERROR", "PENDING") and done[task_id] != 0:
            problems.append(f"task {task_id} {status} with {done[task_id]} committed runs")
        if starts[task_id] > 1 + row.alchq_lost_claims + allowed:
            problems.append(
                f"task {task_id} {status} started {starts[task_id]} times with "
                f"{row.alchq_lost_claims} lost claims and {allowed} releases allowed"
            )
    orphans = set(done) - set(rows)
    if orphans:
        problems.append(f"committed runs of unknown tasks {sorted(orphans)}")
    if problems:
        detail = "\n".join(problems[:30])
        if describe is not None:
            detail += "\n" + describe()
        raise AssertionError(f"{len(problems)} invariant violations:\n{detail}")
    return queue.counts()


def random_sigkills(
    queue: Queue,
    workers: Workers,
    *,
    tasks: int,
    n_workers: int,
    max_kills: int,
    timeout: float,
    poll: float = 0.1,
) -> set[int]:
    """Run ``tasks`` no-op tasks over ``n_workers``, SIGKILLing one at random every 1-2 s.

    Each killed worker is replaced at once; after ``max_kills`` kills the rest
    run in peace. Checks the invariants, that every claim lost with a killed
    worker was rescued and processed, and that the survivors stop cleanly.
    Returns the ids of the lost claims. ``FAULT_SEED`` replays a run.
    """
    seed = int(os.environ.get("FAULT_SEED", time.time_ns() % 1_000_000))
    print(f"FAULT_SEED={seed}")
    rng = random.Random(seed)
    queue.add(tasks, action="ok", sleep=0)
    for _ in range(n_workers):
        workers.start()
    kills = 0
    lost: dict[int, tuple[str, int]] = {}
    next_kill = time.monotonic() + rng.uniform(1, 2)
    deadline = time.monotonic() + timeout
    while not queue.settled():
        assert time.monotonic() < deadline, f"not done in time\n{queue.describe()}"
        assert len(workers.alive()) == n_workers, f"a worker died\n{workers.describe()}"
        if kills < max_kills and time.monotonic() >= next_kill:
            victim = rng.choice(workers.alive())
            rc = workers.kill(victim)
            assert rc == -signal.SIGKILL, f"{victim.name} exited {rc}\n{victim.tail()}"
            lost.update(queue.held_by(victim))
            workers.start()
            kills += 1
            next_kill = time.monotonic() + rng.uniform(1, 2)
        time.sleep(poll)
    counts = check_invariants(queue, describe=workers.describe)
    assert counts == {"PROCESSED": tasks}, counts
    assert kills > 0
    rows = queue.rows(*lost)
    for task_id, (owner, token) in lost.items():
        row = rows[task_id]
        rescued = row.alchq_lost_claims >= 1 and row.alchq_attempts > token
        # On PostgreSQL a COMMIT the victim had sent may still land after its death.
        landed = row.alchq_worker == owner and row.alchq_attempts == token
        assert row.status == Status.PROCESSED and (rescued or landed), (task_id, owner, token, row)
    workers.stop_all_cleanly()
    print(f"{kills} workers killed, {len(lost)} claims lost with them: {sorted(lost)}")
    return set(lost)


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def queue(db_url: str) -> Iterator[Queue]:
    q = Queue(db_url)
    yield q
    q.dispose()


@pytest.fixture
def workers(db_url: str, tmp_path: Path) -> Iterator[Workers]:
    with Workers(db_url, tmp_path / "workers") as ws:
        yield ws


class DurablePgServer(PgServer):
    """A test server whose commits survive ``pg_ctl restart -m immediate``.

    The suite's usual server runs with ``synchronous_commit=off``: a crash (an
    immediate restart is one) then loses the last commits, which would be the
    server's fault, not the worker's. The OS keeps running, so ``fsync=off``
    stays harmless.
    """

    def _server_options(self) -> str:
        options = super()._server_options()
        assert "synchronous_commit=off" in options
        return options.replace("synchronous_commit=off", "synchronous_commit=on")

    def down(self) -> None:
        """Stop the server as a crash would (``pg_ctl stop -m immediate``)."""
        self.pg_ctl("stop", "-m", "immediate", "-w")

    def up(self) -> None:
        """Start the server stopped by :meth:`down`, on the same port."""
        self.pg_ctl("-w", "-t", "60", "-l", self.logfile, "start", "-o", self._server_options())


@pytest.fixture(scope="session")
def pg_server() -> Iterator[DurablePgServer]:
    """A PostgreSQL server of the fault tests' own, which they may restart.

    Skips when PostgreSQL cannot be started, unless the ``CI`` variable is set.
    """
    try:
        server = DurablePgServer()
        server.start()
    except Exception as exc:
        if os.environ.get("CI"):
            raise
        print(f"PostgreSQL unavailable, its fault tests skip: {exc}", file=sys.stderr)
        pytest.skip(f"PostgreSQL is not available: {exc}")
    try:
        yield server
    finally:
        server.stop()


_pg_numbers = itertools.count()


@dataclass
class PgDatabase:
    server: DurablePgServer
    name: str
    url: str

    def terminate_backends(self) -> int:
        """``pg_terminate_backend`` every other connection to this database; how many."""
        out = self.server.psql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            f"WHERE datname = '{self.name}' AND pid <> pg_backend_pid()"
        ).stdout
        return int(out.strip() or 0)


@pytest.fixture
def pg_db(pg_server: DurablePgServer) -> PgDatabase:
    """A fresh database on :func:`pg_server`."""
    name = f"f{os.getpid()}_{next(_pg_numbers)}"
    pg_server.createdb(name)
    return PgDatabase(pg_server, name, pg_server.url(name))


@dataclass
class MariaDBDatabase:
    server: MariaDBServer
    url: str


@pytest.fixture
def mariadb_db() -> Iterator[MariaDBDatabase]:
    """A database on a MariaDB server of the test's own, which it may restart.

    Skips when MariaDB cannot be started, unless the ``CI`` variable is set.
    """
    try:
        server = MariaDBServer().start()
    except Exception as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"MariaDB is not available: {exc}")
    try:
        server.createdb("faults")
        yield MariaDBDatabase(server, server.url("faults"))
    finally:
        server.stop()


def sqlite_write_lock_free(engine: Engine) -> bool:
    """Can a writer get the SQLite file's write lock within a short wait?"""
    conn = sqlite3.connect(str(engine.url.database), timeout=0.3, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


def pg_row_lock_free(engine: Engine, task_id: int) -> bool:
    """Can the task's row be locked at once (no frozen transaction holds it)?"""
    with engine.connect() as conn:
        try:
            conn.execute(
                text("SELECT id FROM fault_task WHERE id = :id FOR UPDATE NOWAIT"), {"id": task_id}
            )
        except Exception:
            conn.rollback()
            return False
        conn.rollback()
        return True
