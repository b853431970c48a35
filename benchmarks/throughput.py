"""Throughput of one worker draining no-op tasks, against the bare driver.

Run: ``make bench`` (or ``python -m benchmarks.throughput [--tasks N]``).

For each database it measures, in the same run:

* ``bare``: the bare driver (sqlite3 / psycopg) doing what one claim-run-
  record cycle must do at least: an ``UPDATE ... RETURNING`` claim, commit,
  an ``UPDATE`` to PROCESSED, commit. No ORM, no Python task object.
* ``alchq``: ``worker.process_all`` on the same number of tasks.

and prints tasks/s for both and the ratio alchq/bare. Compare ratios, not
absolute numbers: these machines are noisy.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Column, Integer, create_engine, insert
from sqlalchemy.engine import make_url

from alchq import BaseQueue, metadata, worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


class BenchTask(BaseQueue):
    id = Column(Integer, primary_key=True)

    def run(self) -> None:
        pass


CLAIM = (
    "UPDATE bench_task SET status='PROCESSING', alchq_attempts=alchq_attempts+1 "
    "WHERE id IN (SELECT id FROM bench_task WHERE status='PENDING' "
    "ORDER BY time_created, id LIMIT 1{lock}) RETURNING id"
)
DONE = "UPDATE bench_task SET status='PROCESSED' WHERE id = {p} AND status='PROCESSING'"


def fill(url: str, n: int) -> None:
    engine = create_engine(url)
    metadata.drop_all(engine, tables=[BenchTask.__table__])  # type: ignore[attr-defined]
    metadata.create_all(engine, tables=[BenchTask.__table__])  # type: ignore[attr-defined]
    with engine.begin() as conn:
        conn.execute(insert(BenchTask.__table__), [{} for _ in range(n)])  # type: ignore[attr-defined]
    engine.dispose()


def bare_sqlite(url: str) -> int:
    conn = sqlite3.connect(make_url(url).database or "", timeout=30)
    done = 0
    while True:
        row = conn.execute(CLAIM.format(lock="")).fetchone()
        conn.commit()
        if row is None:
            break
        conn.execute(DONE.format(p="?"), (row[0],))
        conn.commit()
        done += 1
    conn.close()
    return done


def bare_psycopg(url: str) -> int:
    import psycopg

    u = make_url(url)
    conn = psycopg.connect(
        host=u.host, port=u.port, user=u.username, dbname=u.database, password=u.password
    )
    done = 0
    while True:
        row = conn.execute(CLAIM.format(lock=" FOR UPDATE SKIP LOCKED")).fetchone()
        conn.commit()
        if row is None:
            break
        conn.execute(DONE.format(p="%s"), (row[0],))
        conn.commit()
        done += 1
    conn.close()
    return done


def alchq_worker(url: str) -> int:
    engine = create_engine(url)
    try:
        return worker.process_all(BenchTask, engine=engine)
    finally:
        engine.dispose()


def timed(label: str, url: str, n: int, fn: Callable[[str], int]) -> float:
    fill(url, n)
    start = time.perf_counter()
    done = fn(url)
    elapsed = time.perf_counter() - start
    assert done == n, (label, done, n)
    return n / elapsed


def bench(name: str, url: str, n: int, bare: Callable[[str], int]) -> dict[str, Any]:
    # Interleave to spread machine noise over both sides.
    bare_rates, alchq_rates = [], []
    for _ in range(2):
        bare_rates.append(timed("bare", url, n, bare))
        alchq_rates.append(timed("alchq", url, n, alchq_worker))
    b, a = max(bare_rates), max(alchq_rates)
    print(f"{name:<11} bare {b:8.0f} tasks/s   alchq {a:8.0f} tasks/s   alchq/bare {a / b:5.2f}")
    return {"db": name, "bare": b, "alchq": a, "ratio": a / b}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    args = parser.parse_args()
    import logging

    logging.getLogger("alchq").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        bench("sqlite", f"sqlite:///{tmp}/bench.sqlite", args.tasks, bare_sqlite)
    from tests.pgserver import PgServer

    with PgServer(durable=True) as pg:  # default durability
        pg.createdb("bench")
        bench("postgresql", pg.url("bench"), args.tasks, bare_psycopg)


if __name__ == "__main__":
    main()
