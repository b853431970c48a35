"""``make bench``: every performance figure of alchq in one table, also written as JSON.

Run: ``make bench`` (or ``python -m benchmarks [--tasks N] [--finished N] [--json PATH]``);
``make bench-large`` drains with 10,000,000 finished rows in the table.

On a throwaway PostgreSQL server at its default durability, a throwaway MariaDB
server at its own (every commit flushed), and on an SQLite file: enqueue (one
per transaction, in bulk, 8 concurrent clients with notifications on and off),
enqueue-to-start latency with an idle worker at default settings, drains by
worker processes (see :mod:`benchmarks.drain`), and a worker's memory over many
tasks. Each figure is printed beside its ratio to a ceiling measured in the
same run with the bare driver; compare ratios, not absolute numbers: these
machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.mariadbserver import MariaDBServer  # noqa: E402
from tests.pgserver import PgServer  # noqa: E402

from benchmarks import drain, enqueue, latency, monitoring  # noqa: E402


def _latency_rows(name: str, url: str, samples: int) -> list[dict[str, Any]]:
    r = latency.measure(name, url, samples)
    return [
        {"db": name, "what": "enqueue -> start, idle worker, p50", "value": r["p50_ms"],
         "unit": "ms", "ratio": None, "ceiling": ""},
        {"db": name, "what": "enqueue -> start, idle worker, p95", "value": r["p95_ms"],
         "unit": "ms", "ratio": None, "ceiling": ""},
    ]  # fmt: skip


def _drain_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        ceiling = r["what"].startswith("ceiling")
        out.append(
            {
                "db": r["db"],
                "what": r["what"],
                "value": r["rate"],
                "unit": "tasks/s",
                "ratio": None if ceiling else r["vs_100"],
                "ceiling": "" if ceiling else f"100 per trip (one per trip: x{r['vs_one']:.2f})",
                **({"peak_rss_mb": r["peak_rss_mb"]} if "peak_rss_mb" in r else {}),
            }
        )
    return out


def _stats_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        ceiling = "vs_count" not in r
        out.append(
            {"db": r["db"], "what": f"monitoring: {r['what']}"[:46], "value": r["ms"],
             "unit": "ms", "ratio": None if ceiling else r["vs_count"],
             "ceiling": "" if ceiling else "a bare count(*) of the table"}
        )  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks per drain")
    parser.add_argument("--finished", type=int, default=1_000_000)
    parser.add_argument("--memory-tasks", type=int, default=100_000)
    parser.add_argument("--enqueue-tasks", type=int, default=2_000)
    parser.add_argument("--samples", type=int, default=50, help="latency samples")
    parser.add_argument("--json", default="bench.json", help="where the table goes as JSON")
    args = parser.parse_args()
    logging.getLogger("alchq").setLevel(logging.WARNING)
    rows: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        PgServer(durable=True) as pg,
        MariaDBServer(durable=True) as mariadb,
    ):
        for db in ("enqueue", "latency", "drain", "stats"):
            pg.createdb(db)
        for db in ("enqueue", "latency", "drain"):
            mariadb.createdb(db)
        rows += enqueue.rows("sqlite", f"sqlite:///{tmp}/enqueue.sqlite", args.enqueue_tasks)
        rows += enqueue.rows("postgresql", pg.url("enqueue"), args.enqueue_tasks)
        rows += enqueue.rows("mariadb", mariadb.url("enqueue"), args.enqueue_tasks)
        rows += _latency_rows("sqlite", f"sqlite:///{tmp}/latency.sqlite", args.samples)
        rows += _latency_rows("postgresql", pg.url("latency"), args.samples)
        rows += _latency_rows("mariadb", mariadb.url("latency"), args.samples)
        rows += _drain_rows(
            drain.run_all(args.tasks, args.finished, pg.url("drain"), tmp, mariadb.url("drain"))
        )
        rows += _stats_rows(monitoring.run_all(args.finished, pg.url("stats"), tmp))
        mem = drain.memory(f"sqlite:///{tmp}/memory.sqlite", args.memory_tasks, tmp)
        early, end = mem["rss_early_mb"], mem["rss_end_mb"]
        rows.append(
            {"db": "sqlite", "what": f"worker memory after {mem['tasks']:,} tasks",
             "value": end, "unit": "MB", "ratio": end / max(early, 1e-6),
             "ceiling": f"after a tenth of them: {early:.0f} MB"}
        )  # fmt: skip
    print()
    print(f"{'database':<11} {'figure':<46} {'value':>10} {'unit':<8} {'ratio':>6}  to")
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:6.2f}"
        print(
            f"{r['db']:<11} {r['what']:<46} {r['value']:10.1f} {r['unit']:<8} {ratio:>6}  "
            f"{r['ceiling']}"
        )
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=2)
    print(f"\n(written to {args.json})")


if __name__ == "__main__":
    main()
