"""Enqueue rates: one task per transaction, alone and 8 clients at once; in bulk.

Run: ``make bench`` (or ``python -m benchmarks.enqueue [--tasks N]``).

Measured in the same run, on a throwaway PostgreSQL server at default durability,
a throwaway MariaDB server (every commit flushed) and on an SQLite file (WAL, as
workers use it):

* ``bare``: psycopg (sqlite3, PyMySQL) inserting one row per transaction (the ceiling);
* ``plain ORM``: the same through a SQLAlchemy Session, into a plain table
  (what the ORM itself costs);
* ``alchq``: ``session.add(Task()); session.commit()``, one task each;
* in bulk: 10x as many in one transaction, the driver's ``executemany`` against
  ``Model.enqueue_many()``;
* one task per transaction from 8 client processes at once, with notifications on (the
  default: each commit is announced to idle workers) and off
  (``ALCHQ_NOTIFY=off``). The ratio on/off shows whether NOTIFY's commit lock
  limits enqueue traffic; it should stay near 1 (alchq sends NOTIFY from a
  background thread, coalesced, outside the app's transaction). SQLite and
  MariaDB have no notifications: there the 8 clients are measured against the
  bare driver's 8.

Every run counts the rows it inserted.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import sqlite3
import sys
import time
from typing import Any

import psycopg
from sqlalchemy import Column, Integer, create_engine, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from alchq import BaseQueue, metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CLIENTS = 8


class EnqueueTask(BaseQueue):
    id = Column(Integer, primary_key=True)

    def run(self) -> None:
        pass


class _Plain(DeclarativeBase):
    pass


class PlainRow(_Plain):
    __tablename__ = "plain_row"
    id: Mapped[int] = mapped_column(primary_key=True)


def _reset(url: str) -> None:
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    metadata.drop_all(engine, tables=[EnqueueTask.__table__])  # type: ignore[attr-defined]
    metadata.create_all(engine, tables=[EnqueueTask.__table__])  # type: ignore[attr-defined]
    _Plain.metadata.drop_all(engine)
    _Plain.metadata.create_all(engine)
    engine.dispose()


def _count(url: str) -> int:
    engine = create_engine(url)
    with engine.connect() as conn:
        n = int(conn.execute(select(func.count()).select_from(EnqueueTask.__table__)).scalar_one())  # type: ignore[attr-defined]
    engine.dispose()
    return n


def _sqlite(url: str) -> sqlite3.Connection | None:
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        return None
    return sqlite3.connect(u.database or "", timeout=30, isolation_level=None)


def _mysql(url: str, autocommit: bool) -> Any:
    """A PyMySQL connection for a MariaDB/MySQL URL, else None."""
    u = make_url(url)
    if u.get_backend_name() not in ("mysql", "mariadb"):
        return None
    import pymysql  # type: ignore[import-untyped]

    return pymysql.connect(
        host=u.host,
        port=u.port,
        user=u.username,
        password=u.password,
        database=u.database,
        autocommit=autocommit,
    )


def bare(url: str, n: int) -> None:
    lite = _sqlite(url)
    if lite is not None:
        with contextlib.closing(lite):
            for _ in range(n):
                lite.execute("INSERT INTO enqueue_task DEFAULT VALUES")  # autocommit
        return
    my = _mysql(url, autocommit=True)
    if my is not None:
        with contextlib.closing(my), my.cursor() as cursor:
            for _ in range(n):
                cursor.execute("INSERT INTO enqueue_task () VALUES ()")
        return
    raw = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(raw, autocommit=True) as conn:
        for _ in range(n):
            conn.execute("INSERT INTO enqueue_task DEFAULT VALUES")


def with_alchq(url: str, n: int) -> None:
    engine = create_engine(url)
    for _ in range(n):
        with Session(engine) as session:
            session.add(EnqueueTask())
            session.commit()
    time.sleep(0.05)  # let the last NOTIFY go out before the process ends
    engine.dispose()


def plain_orm(url: str, n: int) -> None:
    """The same through the SQLAlchemy ORM, into a table without alchq: its own cost."""
    engine = create_engine(url)
    for _ in range(n):
        with Session(engine) as session:
            session.add(PlainRow())
            session.commit()
    engine.dispose()


def bare_bulk(url: str, n: int) -> None:
    lite = _sqlite(url)
    if lite is not None:
        with contextlib.closing(lite):
            lite.execute("BEGIN")
            lite.executemany("INSERT INTO enqueue_task (priority) VALUES (?)", [(0,)] * n)
            lite.execute("COMMIT")
        return
    my = _mysql(url, autocommit=False)
    if my is not None:
        with contextlib.closing(my), my.cursor() as cursor:
            cursor.executemany("INSERT INTO enqueue_task (priority) VALUES (%s)", [(0,)] * n)
            my.commit()
        return
    raw = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(raw) as conn, conn.cursor() as cursor:
        cursor.executemany("INSERT INTO enqueue_task (priority) VALUES (%s)", [(0,)] * n)
        conn.commit()


def alchq_bulk(url: str, n: int) -> None:
    engine = create_engine(url)
    with Session(engine) as session:
        EnqueueTask.enqueue_many(session, [{"priority": 0}] * n)
        session.commit()
    time.sleep(0.05)
    engine.dispose()


KINDS = {
    "bare": bare,
    "orm": plain_orm,
    "alchq": with_alchq,
    "bare_bulk": bare_bulk,
    "alchq_bulk": alchq_bulk,
}


def _client(args: tuple[str, int, str, str]) -> tuple[float, float]:
    url, n, notify, kind = args
    os.environ["ALCHQ_NOTIFY"] = notify
    start = time.time()
    KINDS[kind](url, n)
    return start, time.time()


def rate(url: str, n: int, kind: str, clients: int = 1, notify: str = "on") -> float:
    _reset(url)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(clients) as pool:
        spans = pool.map(_client, [(url, n, notify, kind)] * clients, chunksize=1)
    if kind != "orm":
        assert _count(url) == n * clients, "rows lost"
    # From the first client's start to the last one's end (not the processes' start-up).
    return n * clients / (max(e for _, e in spans) - min(s for s, _ in spans))


def rows(name: str, url: str, n: int) -> list[dict[str, Any]]:
    """Every enqueue figure of one database (``n`` per client), as ``make bench``'s rows."""

    def best(kind: str, count: int, clients: int = 1, notify: str = "on") -> float:
        return max(rate(url, count, kind, clients, notify) for _ in range(2))

    bare1, alchq1, orm1 = best("bare", n), best("alchq", n), best("orm", n)
    bulk = n * 10
    bare_bulk, alchq_bulk = best("bare_bulk", bulk), best("alchq_bulk", bulk)
    per = max(1, n // 4)
    row = {"db": name, "unit": "tasks/s"}
    out = [
        {**row, "what": "enqueue, 1 per transaction", "value": alchq1,
         "ratio": alchq1 / bare1, "ceiling": f"bare driver {bare1:.0f}/s"},
        {**row, "what": "enqueue, 1 per transaction (plain ORM add)", "value": orm1,
         "ratio": orm1 / bare1, "ceiling": f"bare driver {bare1:.0f}/s"},
        {**row, "what": f"enqueue_many, {bulk:,} in one transaction", "value": alchq_bulk,
         "ratio": alchq_bulk / bare_bulk, "ceiling": f"bare executemany {bare_bulk:.0f}/s"},
    ]  # fmt: skip
    if name in ("sqlite", "mariadb"):  # no notifications: 8 clients against the bare driver's 8
        on, bare8 = best("alchq", per, CLIENTS), best("bare", per, CLIENTS)
        out.append(
            {**row, "what": f"enqueue, {CLIENTS} clients", "value": on,
             "ratio": on / bare8, "ceiling": f"bare driver, {CLIENTS} clients {bare8:.0f}/s"}
        )  # fmt: skip
    else:
        on, off = best("alchq", per, CLIENTS, "on"), best("alchq", per, CLIENTS, "off")
        out.append(
            {**row, "what": f"enqueue, {CLIENTS} clients, notifications on", "value": on,
             "ratio": on / off, "ceiling": f"notifications off {off:.0f}/s"}
        )  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000, help="per client")
    args = parser.parse_args()
    import tempfile

    from tests.mariadbserver import MariaDBServer
    from tests.pgserver import PgServer

    with (
        tempfile.TemporaryDirectory() as tmp,
        PgServer(durable=True) as pg,  # default durability
        MariaDBServer(durable=True) as mariadb,
    ):
        pg.createdb("enqueue")
        mariadb.createdb("enqueue")
        found = rows("sqlite", f"sqlite:///{tmp}/enqueue.sqlite", args.tasks)
        found += rows("postgresql", pg.url("enqueue"), args.tasks)
        found += rows("mariadb", mariadb.url("enqueue"), args.tasks)
    for r in found:
        figure = f"{r['db']:<11} {r['what']:<46} {r['value']:8.0f}/s"
        print(f"{figure}  {r['ratio']:5.2f} of {r['ceiling']}")


if __name__ == "__main__":
    main()
