"""Drain throughput: worker processes emptying a queue, against the bare driver.

Run: ``make bench`` (or ``python -m benchmarks.drain [--tasks N]``).

For each database, in the same run:

* two ceilings, the bare driver (psycopg 3 / sqlite3 / PyMySQL) on the same table
  with alchq's indexes: ``one``, claim one task (``UPDATE ... RETURNING``; on
  MariaDB, which has none, ``SELECT ... FOR UPDATE SKIP LOCKED`` then ``UPDATE``),
  commit, mark it PROCESSED, commit; ``100``, the same with 100 tasks per statement;
* ``alchq run`` worker processes at default settings draining the same number
  of tasks: one process, two processes, ``--concurrency 2``, tasks whose run()
  inserts one row through the task's session, and one process with
  ``--finished`` PROCESSED rows already in the table.

A drain's time is the database's own: from the first claim to the last
outcome (``alchq_started_at`` / ``alchq_finished_at``), so the workers'
start-up is not in it. Every run checks each task ran exactly once (status,
``alchq_attempts``, and for writing tasks one effect row each). Compare ratios,
not absolute numbers: these machines are noisy.
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Column, Integer, Table, create_engine, func, insert, select, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import object_session

from alchq import BaseQueue, Status, metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

drain_effect = Table(
    "drain_effect",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("task_id", Integer, nullable=False),
)


class DrainTask(BaseQueue):
    """A no-op task."""

    id = Column(Integer, primary_key=True)

    def run(self) -> None:
        pass


class DrainWriteTask(BaseQueue):
    """A task whose run() inserts one row through the task's session."""

    id = Column(Integer, primary_key=True)

    def run(self) -> None:
        session = object_session(self)
        assert session is not None
        session.execute(insert(drain_effect).values(task_id=self.id))


def _pythonpath() -> str:
    """The checkout first (for ``benchmarks.*`` models), then whatever was set."""
    return os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)


def _table(model: type[BaseQueue]) -> Table:
    return model.__table__  # type: ignore[attr-defined,no-any-return]


def fill(engine: Engine, model: type[BaseQueue], n: int, finished: int = 0) -> None:
    """A fresh table with ``finished`` PROCESSED rows, then ``n`` PENDING ones."""
    table = _table(model)
    metadata.drop_all(engine, tables=[table, drain_effect])
    metadata.create_all(engine, tables=[table, drain_effect])
    done = (
        "INSERT INTO {t} (status, alchq_attempts, alchq_started_at, alchq_finished_at) "
        "SELECT 'PROCESSED', 1, {now}, {now} FROM {rows}"
    )
    with engine.begin() as conn:
        if finished and engine.dialect.name == "postgresql":
            conn.execute(
                text(done.format(t=table.name, now="now()", rows=f"generate_series(1, {finished})"))
            )
        elif finished and engine.dialect.name in ("mysql", "mariadb"):
            # MariaDB's sequence engine stands in for generate_series.
            now, rows = "UTC_TIMESTAMP(6)", f"seq_1_to_{finished}"
            conn.execute(text(done.format(t=table.name, now=now, rows=rows)))
        elif finished:
            now = "strftime('%Y-%m-%d %H:%M:%f000', 'now')"
            rows = f"(WITH RECURSIVE s(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM s WHERE x < {finished}) SELECT x FROM s)"  # noqa: E501
            conn.execute(text(done.format(t=table.name, now=now, rows=rows)))
        for start in range(0, n, 10_000):
            conn.execute(insert(table), [{} for _ in range(min(10_000, n - start))])
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f"VACUUM ANALYZE {table.name}"))
    elif engine.dialect.name in ("mysql", "mariadb"):
        with engine.begin() as conn:
            conn.execute(text(f"ANALYZE TABLE {table.name}"))


# -- the ceilings: the bare driver -------------------------------------------------------

CLAIM = (
    "UPDATE {t} SET status='PROCESSING', alchq_attempts=alchq_attempts+1 "
    "WHERE id IN (SELECT id FROM {t} WHERE status='PENDING' "
    "ORDER BY priority, time_created, id LIMIT {limit}{lock}) RETURNING id"
)
DONE = "UPDATE {t} SET status='PROCESSED' WHERE id IN ({ids}) AND status='PROCESSING'"


#: MySQL/MariaDB: no UPDATE ... RETURNING; the claim locks its rows first.
PICK = (
    "SELECT id FROM {t} WHERE status='PENDING' ORDER BY priority, time_created, id "
    "LIMIT {limit} FOR UPDATE SKIP LOCKED"
)
TAKE = "UPDATE {t} SET status='PROCESSING', alchq_attempts=alchq_attempts+1 WHERE id IN ({ids})"


def bare_mysql(url: str, table: str, per_trip: int, driver: Any = None) -> tuple[int, float]:
    """:func:`bare` with PyMySQL (or ``driver``, a DB-API module with PyMySQL's
    ``connect()`` keywords): pick and lock, take, commit; complete, commit."""
    if driver is None:
        import pymysql  # type: ignore[import-untyped]

        driver = pymysql
    u = make_url(url)
    conn = driver.connect(
        host=u.host, port=u.port, user=u.username, password=u.password, database=u.database
    )
    cur = conn.cursor()
    cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
    pick = PICK.format(t=table, limit=per_trip)
    done = 0
    start = time.perf_counter()
    while True:
        cur.execute(pick)
        ids = [row[0] for row in cur.fetchall()]
        if not ids:
            conn.commit()
            break
        marks = ", ".join(["%s"] * len(ids))
        cur.execute(TAKE.format(t=table, ids=marks), ids)
        conn.commit()
        cur.execute(DONE.format(t=table, ids=marks), ids)
        conn.commit()
        done += len(ids)
    elapsed = time.perf_counter() - start
    conn.close()
    return done, elapsed


def bare(url: str, table: str, per_trip: int) -> tuple[int, float]:
    """Claim and complete ``per_trip`` tasks at a time until none is left: (done, seconds)."""
    u = make_url(url)
    if u.get_backend_name() in ("mysql", "mariadb"):
        return bare_mysql(url, table, per_trip)
    if u.get_backend_name() == "sqlite":
        conn: Any = sqlite3.connect(u.database or "", timeout=30)
        mark, lock = "?", ""
    else:
        import psycopg

        conn = psycopg.connect(
            host=u.host, port=u.port, user=u.username, dbname=u.database, password=u.password
        )
        mark, lock = "%s", " FOR UPDATE SKIP LOCKED"
    claim = CLAIM.format(t=table, limit=per_trip, lock=lock)
    done = 0
    start = time.perf_counter()
    while True:
        ids = [row[0] for row in conn.execute(claim).fetchall()]
        conn.commit()
        if not ids:
            break
        conn.execute(DONE.format(t=table, ids=", ".join([mark] * len(ids))), ids)
        conn.commit()
        done += len(ids)
    elapsed = time.perf_counter() - start
    conn.close()
    return done, elapsed


# -- alchq: worker processes -------------------------------------------------------------


def _memory_kb(pid: int, field: str = "VmHWM") -> int:
    """A line of the process's /proc status (Linux), in kB: its peak resident memory by
    default, ``VmRSS`` for now. 0 if it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def alchq_drain(
    url: str,
    model: type[BaseQueue],
    n: int,
    *,
    processes: int = 1,
    args: tuple[str, ...] = (),
    log_dir: str,
) -> dict[str, Any]:
    """Start worker processes on a filled queue, wait until it is empty; the figures."""
    engine = create_engine(url)
    table = _table(model)
    env = dict(os.environ, PYTHONPATH=_pythonpath(), ALCHQ_DATABASE_URL=url)
    procs = []
    for i in range(processes):
        log = open(os.path.join(log_dir, f"{table.name}-{i}.log"), "wb")  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "alchq.cli", "run", f"benchmarks.drain:{model.__name__}"]
                + list(args),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        )
    c = table.c
    peak = 0
    try:
        deadline = time.monotonic() + max(120, n / 50)
        while True:
            # Counted through the partial indexes of PENDING and PROCESSING rows: a
            # scan of the finished rows would load the database the drain is timed on.
            with engine.connect() as conn:
                left = sum(
                    conn.scalar(select(func.count()).select_from(table).where(c.status == s)) or 0
                    for s in (Status.PENDING, Status.PROCESSING)
                )
            pids = [p.pid for p in procs] + [k for p in procs for k in _children(p.pid)]
            peak = max([peak] + [_memory_kb(pid) for pid in pids])
            if not left:
                break
            dead = [p.returncode for p in procs if p.poll() is not None]
            assert not dead, f"a worker exited: {dead} (logs in {log_dir})"
            assert time.monotonic() < deadline, f"{left} tasks left (logs in {log_dir})"
            time.sleep(0.25)  # the time is the database's: this only sees the end
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(60)
    with engine.connect() as conn:
        first, last, attempts, total = conn.execute(
            select(
                func.min(c.alchq_started_at),
                func.max(c.alchq_finished_at),
                func.max(c.alchq_attempts),
                func.count(),
            ).where(c.status == Status.PROCESSED, c.alchq_worker.is_not(None))
        ).one()
        effects = conn.scalar(select(func.count()).select_from(drain_effect))
    engine.dispose()
    assert total == n and attempts == 1, f"ran {total} of {n}, most attempts {attempts}"
    if model is DrainWriteTask:
        assert effects == n, f"{effects} effects for {n} tasks"
    if isinstance(first, str):  # SQLite without the model's type (text)
        from datetime import datetime

        first, last = datetime.fromisoformat(first), datetime.fromisoformat(last)
    seconds = max((last - first).total_seconds(), 1e-6)
    return {"rate": n / seconds, "peak_rss_mb": peak / 1024}


def memory(url: str, n: int, log_dir: str) -> dict[str, Any]:
    """One worker process over ``n`` no-op tasks: its resident memory after a tenth of
    them and at the end (flat means no growth per task)."""
    engine = create_engine(url)
    fill(engine, DrainTask, n)
    table = _table(DrainTask)
    env = dict(os.environ, PYTHONPATH=_pythonpath(), ALCHQ_DATABASE_URL=url)
    with open(os.path.join(log_dir, "memory.log"), "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "alchq.cli", "run", "benchmarks.drain:DrainTask", "--burst"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    early = late = 0
    try:
        while proc.poll() is None:
            with engine.connect() as conn:
                done = conn.scalar(
                    select(func.count())
                    .select_from(table)
                    .where(table.c.status == Status.PROCESSED)
                )
            rss = _memory_kb(proc.pid, "VmRSS")
            if rss and done and done >= n // 10 and not early:
                early = rss
            if rss:
                late = rss
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    engine.dispose()
    assert proc.returncode == 0, f"the worker exited {proc.returncode} (log in {log_dir})"
    return {"rss_early_mb": early / 1024, "rss_end_mb": late / 1024, "tasks": n}


def measure(name: str, url: str, n: int, finished: int) -> list[dict[str, Any]]:
    """Every drain figure of one database, with its ratios to the two ceilings."""
    engine = create_engine(url)
    rows: list[dict[str, Any]] = []
    ceilings: dict[str, float] = {}
    for per_trip, label in ((1, "one"), (100, "100")):
        best = 0.0
        for _ in range(2):
            fill(engine, DrainTask, n)
            done, seconds = bare(url, _table(DrainTask).name, per_trip)
            assert done == n, (label, done, n)
            best = max(best, n / seconds)
        ceilings[label] = best
        rows.append({"db": name, "what": f"ceiling: bare driver, {label} per trip", "rate": best})
    cases: list[tuple[str, type[BaseQueue], int, tuple[str, ...], int]] = [
        ("drain, 1 worker process", DrainTask, 1, (), 0),
        ("drain, 2 worker processes", DrainTask, 2, (), 0),
        ("drain, --concurrency 2", DrainTask, 1, ("--concurrency", "2"), 0),
        ("drain, run() inserts a row", DrainWriteTask, 1, (), 0),
        (f"drain, 1 process, {finished:,} finished rows", DrainTask, 1, (), finished),
    ]
    with tempfile.TemporaryDirectory() as logs:
        for what, model, processes, args, old in cases:
            fill(engine, model, n, finished=old)
            figures = alchq_drain(url, model, n, processes=processes, args=args, log_dir=logs)
            rows.append({"db": name, "what": what, **figures})
    engine.dispose()
    for row in rows:
        row["vs_one"] = row["rate"] / ceilings["one"]
        row["vs_100"] = row["rate"] / ceilings["100"]
    return rows


def run_all(
    n: int, finished: int, pg_url: str | None, sqlite_dir: str, mariadb_url: str | None = None
) -> list[dict[str, Any]]:
    rows = measure("sqlite", f"sqlite:///{sqlite_dir}/drain.sqlite", n, finished)
    if pg_url is not None:
        rows += measure("postgresql", pg_url, n, finished)
    if mariadb_url is not None:
        rows += measure("mariadb", mariadb_url, n, finished)
    return rows


def print_rows(rows: list[dict[str, Any]], out: Callable[[str], None] = print) -> None:
    for r in rows:
        extra = f"   peak RSS {r['peak_rss_mb']:5.0f} MB" if "peak_rss_mb" in r else ""
        out(
            f"{r['db']:<11} {r['what']:<42} {r['rate']:8.0f} tasks/s"
            f"   /one {r['vs_one']:5.2f}   /100 {r['vs_100']:5.2f}{extra}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--finished", type=int, default=1_000_000)
    args = parser.parse_args()
    from tests.mariadbserver import MariaDBServer
    from tests.pgserver import PgServer

    with (
        tempfile.TemporaryDirectory() as tmp,
        PgServer(durable=True) as pg,
        MariaDBServer(durable=True) as mariadb,
    ):
        pg.createdb("drain")
        mariadb.createdb("drain")
        rows = run_all(args.tasks, args.finished, pg.url("drain"), tmp, mariadb.url("drain"))
        print_rows(rows)


if __name__ == "__main__":
    main()
