"""What ``alchq.monitoring`` costs on a big table: 1,000,000 finished rows by default.

Run: ``python -m benchmarks.monitoring [--finished N]`` (also part of ``make bench``).

The table holds ``--finished`` PROCESSED and ERROR rows spread over the last
two days (so the last hour has its share), 1,000 PENDING and 20 PROCESSING
ones. Timed, as a dashboard calls them every few seconds: ``queue_stats`` (the
overview), ``queue_depth`` (the metrics), the first page of ERROR tasks, and
one task. Each figure is the median of 7 calls; its ceiling, measured in the
same run, is one bare ``SELECT count(*)`` of the whole table (the least a
count by status could cost without an estimate).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Column, Engine, Integer, create_engine, text
from sqlalchemy.orm import Session

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from alchq import BaseQueue, metadata, monitoring  # noqa: E402
from alchq.model import progress_table, task_table  # noqa: E402


class StatsTask(BaseQueue):
    """A table to read."""

    id = Column(Integer, primary_key=True)

    def run(self) -> None:
        pass


def fill(engine: Engine, finished: int) -> None:
    table = task_table(StatsTask)
    tables = [table, progress_table(metadata)]
    metadata.drop_all(engine, tables=tables)
    metadata.create_all(engine, tables=tables)
    t = table.name
    if engine.dialect.name == "postgresql":
        rows = f"generate_series(1, {finished}) AS x"
        x = "x"
        ago = "now() - make_interval(secs => ({x} % 172800))"
        ran = "now() - make_interval(secs => ({x} % 172800) + 0.01 * ({x} % 7))"
    else:
        rows = (
            f"(WITH RECURSIVE s(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM s "
            f"WHERE x < {finished}) SELECT x FROM s)"
        )
        x = "x"
        ago = "strftime('%Y-%m-%d %H:%M:%f000', 'now', '-' || ({x} % 172800) || ' seconds')"
        ran = ago
    status = f"CASE WHEN {x} % 50 = 0 THEN 'ERROR' ELSE 'PROCESSED' END"
    with engine.begin() as conn:
        conn.execute(
            text(
                f"INSERT INTO {t} (status, alchq_attempts, alchq_started_at, alchq_finished_at, "
                f"alchq_error_type, alchq_error_message) SELECT {status}, 1, "
                f"{ran.format(x=x)}, {ago.format(x=x)}, "
                f"CASE WHEN {x} % 50 = 0 THEN 'ValueError' END, "
                f"CASE WHEN {x} % 50 = 0 THEN 'bad input' END FROM {rows}"
            )
        )
        conn.execute(table.insert(), [{} for _ in range(1000)])
        conn.execute(
            table.insert(),
            [{"status": "PROCESSING", "alchq_worker": "w", "alchq_attempts": 1}] * 20,
        )
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f"VACUUM ANALYZE {t}"))
    else:
        with engine.begin() as conn:
            conn.execute(text("ANALYZE"))


def timed(fn: Callable[[], Any], repeat: int = 7) -> float:
    """Median milliseconds of ``fn()``."""
    fn()  # warm: plans, caches
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def measure(name: str, url: str, finished: int) -> list[dict[str, Any]]:
    engine = create_engine(url)
    try:
        fill(engine, finished)
        table = task_table(StatsTask).name
        with Session(engine) as s:
            ceiling = timed(lambda: s.execute(text(f"SELECT count(*) FROM {table}")).scalar())
            figures = {
                "queue_stats (overview)": lambda: monitoring.queue_stats(s, StatsTask),
                "queue_depth (metrics)": lambda: monitoring.queue_depth(s, StatsTask),
                "tasks: first page of ERROR": lambda: monitoring.tasks(
                    s, StatsTask, status="ERROR", limit=50
                ),
                "task: one by key": lambda: monitoring.task(s, StatsTask, "12345"),
            }
            rows = [{"db": name, "what": f"bare count(*) of {finished:,} rows", "ms": ceiling}]
            for what, fn in figures.items():
                ms = timed(fn)
                rows.append({"db": name, "what": what, "ms": ms, "vs_count": ms / ceiling})
        return rows
    finally:
        engine.dispose()


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(f"{'database':<11} {'call':<36} {'ms':>9} {'x count(*)':>11}")
    for r in rows:
        ratio = f"{r['vs_count']:11.2f}" if "vs_count" in r else ""
        print(f"{r['db']:<11} {r['what']:<36} {r['ms']:9.1f} {ratio}")


def run_all(finished: int, pg_url: str | None, sqlite_dir: str) -> list[dict[str, Any]]:
    rows = measure("sqlite", f"sqlite:///{sqlite_dir}/stats.sqlite", finished)
    if pg_url is not None:
        rows += measure("postgresql", pg_url, finished)
    return rows


def main() -> None:
    from tests.pgserver import PgServer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finished", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, PgServer(durable=True) as pg:
        pg.createdb("stats")
        print_rows(run_all(args.finished, pg.url("stats"), tmp))


if __name__ == "__main__":
    main()
