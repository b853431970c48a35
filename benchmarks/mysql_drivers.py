"""PyMySQL against mysqlclient (MySQLdb) on MariaDB: which driver ``alchq[mysql]`` names.

Run: ``python -m benchmarks.mysql_drivers [--tasks N]`` (mysqlclient must be
installed: it compiles against ``libmariadb-dev``; ``make bench`` does not need it).

For each driver, in the same run on one throwaway MariaDB server: the bare
driver's drain ceiling (claim one task, commit, complete it, commit; and 100 at
a time), and one ``alchq run`` worker process draining the same number of
no-op tasks through that driver. A driver's worth to alchq is the second
figure; the first shows what the driver itself costs per round trip.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile

from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.mariadbserver import MariaDBServer  # noqa: E402

from benchmarks import drain  # noqa: E402


def bare(driver: str, url: str, table: str, per_trip: int) -> float:
    """The bare driver's drain of the filled table: tasks per second."""
    if driver == "pymysql":
        import pymysql as module  # type: ignore[import-untyped]
    else:
        import MySQLdb as module  # type: ignore[import-untyped,import-not-found,unused-ignore]
    done, seconds = drain.bare_mysql(url, table, per_trip, module)
    return done / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    args = parser.parse_args()
    drivers = ["pymysql"]
    if importlib.util.find_spec("MySQLdb") is not None:
        drivers.append("mysqldb")
    else:
        print("mysqlclient is not installed: PyMySQL only", file=sys.stderr)
    n = args.tasks
    table = drain.DrainTask.__table__.name  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory() as logs, MariaDBServer(durable=True) as server:
        server.createdb("drivers")
        base = server.url("drivers")
        print(
            f"{'driver':<9} {'bare, one per trip':>20} {'bare, 100 per trip':>20} {'alchq run':>12}"
        )
        for driver in drivers:
            url = make_url(base).set(drivername=f"mysql+{driver}")
            text_url = url.render_as_string(hide_password=False)
            engine = create_engine(text_url)
            rates = []
            for per_trip in (1, 100):
                drain.fill(engine, drain.DrainTask, n)
                rates.append(bare(driver, text_url, table, per_trip))
            drain.fill(engine, drain.DrainTask, n)
            engine.dispose()
            worker = drain.alchq_drain(text_url, drain.DrainTask, n, log_dir=logs)["rate"]
            print(
                f"{driver:<9} {rates[0]:>14.0f} tasks/s {rates[1]:>14.0f} tasks/s "
                f"{worker:>6.0f} tasks/s"
            )


if __name__ == "__main__":
    main()
