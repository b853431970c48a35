"""Enqueue rates on PostgreSQL: one task per transaction, alone and 8 clients at once.

Run: ``make bench`` (or ``python -m benchmarks.enqueue [--tasks N]``).

Measured in the same run, on a throwaway server at default durability:

* ``bare``: psycopg inserting one row per transaction (the ceiling);
* ``plain ORM``: the same through a SQLAlchemy Session, into a plain table
  (what the ORM itself costs);
* ``alchq``: ``session.add(Task()); session.commit()``, one task each;
* in bulk: 10x as many in one transaction, psycopg's ``executemany`` against
  ``Model.enqueue_many()``;
* one task per transaction from 8 client processes at once, with notifications on (the
  default: each commit is announced to idle workers) and off
  (``ALCHQ_NOTIFY=off``). The ratio on/off shows whether NOTIFY's commit lock
  limits enqueue traffic; it should stay near 1 (alchq sends NOTIFY from a
  background thread, coalesced, outside the app's transaction).

Every run counts the rows it inserted.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
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


def bare(url: str, n: int) -> None:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000, help="per client")
    args = parser.parse_args()
    from tests.pgserver import PgServer

    results: dict[str, Any] = {}
    with PgServer(durable=True) as pg:  # default durability
        pg.createdb("enqueue")
        url = pg.url("enqueue")
        n = args.tasks
        results["bare_1"] = max(rate(url, n, "bare") for _ in range(2))
        results["orm_1"] = max(rate(url, n, "orm") for _ in range(2))
        results["alchq_1"] = max(rate(url, n, "alchq") for _ in range(2))
        bulk = n * 10
        results["bare_bulk"] = max(rate(url, bulk, "bare_bulk") for _ in range(2))
        results["alchq_bulk"] = max(rate(url, bulk, "alchq_bulk") for _ in range(2))
        per = max(1, n // 4)
        results["bare_8"] = max(rate(url, per, "bare", CLIENTS) for _ in range(2))
        results["alchq_8_on"] = max(rate(url, per, "alchq", CLIENTS, "on") for _ in range(2))
        results["alchq_8_off"] = max(rate(url, per, "alchq", CLIENTS, "off") for _ in range(2))
    r = results
    print(
        f"postgresql  enqueue 1 client:  bare {r['bare_1']:7.0f}/s  plain ORM {r['orm_1']:7.0f}/s"
        f"  alchq {r['alchq_1']:7.0f}/s  alchq/bare {r['alchq_1'] / r['bare_1']:5.2f}"
        f"  alchq/ORM {r['alchq_1'] / r['orm_1']:5.2f}"
    )
    print(
        f"postgresql  enqueue {n * 10} in one transaction: bare executemany"
        f" {r['bare_bulk']:7.0f}/s  alchq enqueue_many {r['alchq_bulk']:7.0f}/s"
        f"  alchq/bare {r['alchq_bulk'] / r['bare_bulk']:5.2f}"
    )
    print(
        f"postgresql  enqueue {CLIENTS} clients: bare {r['bare_8']:7.0f}/s"
        f"  alchq notify on {r['alchq_8_on']:7.0f}/s  off {r['alchq_8_off']:7.0f}/s"
        f"  on/off {r['alchq_8_on'] / r['alchq_8_off']:5.2f}"
    )


if __name__ == "__main__":
    main()
