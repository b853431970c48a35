"""Enqueue-to-start latency with an idle worker at default settings.

Run: ``make bench`` (or ``python -m benchmarks.latency [--samples N]``).

One ``alchq run`` process (default settings: a 1 s poll) serves an empty
queue. The benchmark then enqueues one task at a time with a plain
``session.add()`` + ``commit()`` from this process, waits for it to finish,
and pauses a little, so the worker is idle each time. The latency of a task is
``alchq_started_at - time_created``: both are the database's clock, so no
client-side polling is in the figure. On PostgreSQL the worker is woken by
LISTEN/NOTIFY; across processes on SQLite it polls, so its latency is about
half the poll interval (the figure printed beside it for comparison).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from sqlalchemy import Column, Engine, Integer, create_engine, select
from sqlalchemy.orm import Session

from alchq import BaseQueue, Status, metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


class LatencyTask(BaseQueue):
    id = Column(Integer, primary_key=True)

    def run(self) -> None:
        pass


def _worker(url: str) -> subprocess.Popen[bytes]:
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path)
    return subprocess.Popen(
        [sys.executable, "-m", "alchq.cli", "run", "benchmarks.latency:LatencyTask"],
        env={**env, "ALCHQ_DATABASE_URL": url},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )


def _one(engine: Engine) -> float:
    with Session(engine) as session:
        task = LatencyTask()
        session.add(task)
        session.commit()
        key = task.id
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with Session(engine) as session:
            row = session.execute(
                select(
                    LatencyTask.status, LatencyTask.time_created, LatencyTask.alchq_started_at
                ).where(LatencyTask.id == key)
            ).one()
        if row.status == Status.PROCESSED:
            return float((row.alchq_started_at - row.time_created).total_seconds())
        time.sleep(0.002)
    raise RuntimeError(f"task {key} did not run within 30 s")


def measure(name: str, url: str, samples: int) -> dict[str, Any]:
    engine = create_engine(url)
    metadata.drop_all(engine, tables=[LatencyTask.__table__])  # type: ignore[attr-defined]
    metadata.create_all(engine)
    proc = _worker(url)
    try:
        _one(engine)  # the worker is up and has claimed once
        latencies = []
        for _ in range(samples):
            time.sleep(random.uniform(0.05, 0.15))  # idle again  # noqa: S311
            latencies.append(_one(engine))
        with Session(engine) as session:
            done = session.scalars(select(LatencyTask.alchq_attempts)).all()
        assert done and all(a == 1 for a in done), "a task ran more than once"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        engine.dispose()
    ms = sorted(x * 1000 for x in latencies)
    p50 = statistics.median(ms)
    p95 = ms[max(0, int(len(ms) * 0.95) - 1)]
    print(f"{name:<11} enqueue->start p50 {p50:7.1f} ms   p95 {p95:7.1f} ms   ({len(ms)} tasks)")
    return {"db": name, "p50_ms": p50, "p95_ms": p95, "samples": len(ms)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        measure("sqlite", f"sqlite:///{tmp}/latency.sqlite", args.samples)
    from tests.pgserver import PgServer

    with PgServer(durable=True) as pg:  # default durability
        pg.createdb("latency")
        measure("postgresql", pg.url("latency"), args.samples)


if __name__ == "__main__":
    main()
