"""The worker's queries use their indexes however many finished rows the table holds.

PostgreSQL and MariaDB, 100,000 finished rows: every statement the worker sends to the task
table while it claims, rescues lost claims and prunes is EXPLAINed (with its
real parameters), and none may scan the table sequentially. A plan, not a
timing: it holds on a noisy machine.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, event, text

import alchq
from alchq import worker
from alchq._dialects import dialect_for, utc_now
from alchq._transitions import bump, claim_order, claim_values, ready
from alchq.model import task_table
from tests.tasks import CountTask

TABLE = "count_task"


#: The rows each database starts with: 100,000 finished (a third ERROR), 300 old
#: enough to prune, 5 ready, and 3 claims of a gone worker whose leases ran out.
_ROWS = {
    "postgresql": [
        f"INSERT INTO {TABLE} (status, time_created, time_updated, alchq_finished_at)"
        " SELECT CASE WHEN g % 3 = 0 THEN 'ERROR' ELSE 'PROCESSED' END,"
        " now() - make_interval(secs => g / 100.0), now(),"
        " now() - make_interval(secs => g / 100.0) FROM generate_series(1, 100000) AS g",
        f"INSERT INTO {TABLE} (status, time_created, time_updated, alchq_finished_at)"
        " SELECT 'PROCESSED', now() - interval '3 hours', now() - interval '3 hours',"
        " now() - interval '3 hours' FROM generate_series(1, 300)",
        f"INSERT INTO {TABLE} (sleep) SELECT 0 FROM generate_series(1, 5)",
        f"INSERT INTO {TABLE} (status, alchq_worker, alchq_attempts, alchq_started_at,"
        " alchq_lease_until) SELECT 'PROCESSING', 'gone:1:x', 1, now() - interval '1 hour',"
        " now() - interval '30 minutes' FROM generate_series(1, 3)",
        f"ANALYZE {TABLE}",
    ],
    # MariaDB's sequence engine stands in for generate_series.
    "mariadb": [
        f"INSERT INTO {TABLE} (status, time_created, time_updated, alchq_finished_at)"
        " SELECT CASE WHEN seq % 3 = 0 THEN 'ERROR' ELSE 'PROCESSED' END,"
        " UTC_TIMESTAMP(6) - INTERVAL (seq * 10000) MICROSECOND, UTC_TIMESTAMP(6),"
        " UTC_TIMESTAMP(6) - INTERVAL (seq * 10000) MICROSECOND FROM seq_1_to_100000",
        f"INSERT INTO {TABLE} (status, time_created, time_updated, alchq_finished_at)"
        " SELECT 'PROCESSED', UTC_TIMESTAMP(6) - INTERVAL 3 HOUR,"
        " UTC_TIMESTAMP(6) - INTERVAL 3 HOUR, UTC_TIMESTAMP(6) - INTERVAL 3 HOUR"
        " FROM seq_1_to_300",
        f"INSERT INTO {TABLE} (sleep) SELECT 0 FROM seq_1_to_5",
        f"INSERT INTO {TABLE} (status, alchq_worker, alchq_attempts, alchq_started_at,"
        " alchq_lease_until) SELECT 'PROCESSING', 'gone:1:x', 1,"
        " UTC_TIMESTAMP(6) - INTERVAL 1 HOUR, UTC_TIMESTAMP(6) - INTERVAL 30 MINUTE"
        " FROM seq_1_to_3",
        f"ANALYZE TABLE {TABLE}",
    ],
}


def _kind(engine: Engine) -> str:
    return dialect_for(engine).name


@pytest.fixture
def pg(engine: Engine) -> Engine:
    """A table of many finished rows, on the databases whose plans are read here."""
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite's plans have their own test below")
    alchq.metadata.create_all(engine)
    with engine.begin() as conn:
        for sql in _ROWS[_kind(engine)]:
            conn.execute(text(sql))
    return engine


def _statements(engine: Engine, action: Any) -> list[tuple[str, Any]]:
    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        if TABLE in statement and not statement.lstrip().upper().startswith("EXPLAIN"):
            seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        action()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    return seen


def _plans(engine: Engine, statements: list[tuple[str, Any]]) -> list[tuple[str, str]]:
    plans = []
    with engine.connect() as conn:
        for sql, params in statements:
            result = conn.exec_driver_sql(f"EXPLAIN {sql}", params)
            if _kind(engine) == "postgresql":
                plans.append((sql, "\n".join(result.scalars().all())))
            else:
                plans.append((sql, "\n".join(str(dict(row)) for row in result.mappings())))
            conn.rollback()
    return plans


def _no_seq_scan(plans: list[tuple[str, str]]) -> None:
    for sql, plan in plans:
        assert f"Seq Scan on {TABLE}" not in plan, f"{sql}\n{plan}"
        # MariaDB: a full table scan is type ALL, a full index scan type index.
        assert f"'table': '{TABLE}', 'type': 'ALL'" not in plan, f"{sql}\n{plan}"
        assert f"'table': '{TABLE}', 'type': 'index'" not in plan, f"{sql}\n{plan}"


def test_claim_and_rescue_use_indexes(pg: Engine) -> None:
    statements = _statements(pg, lambda: worker.process_one(CountTask, engine=pg))
    kinds = {sql.split()[0].upper() for sql, _ in statements}
    assert "UPDATE" in kinds, statements  # the claim and the rescue's takes
    assert any("alchq_lease_until" in sql for sql, _ in statements), "no rescue ran"
    _no_seq_scan(_plans(pg, statements))


def test_prune_uses_indexes(pg: Engine) -> None:
    statements = _statements(
        pg, lambda: alchq.prune(CountTask, engine=pg, processed="1h", error="1h", batch_size=100)
    )
    assert any("DELETE FROM" in sql.upper() for sql, _ in statements), statements
    _no_seq_scan(_plans(pg, statements))


def test_a_batch_of_outcomes_uses_indexes(pg: Engine) -> None:
    table = task_table(CountTask)
    dialect = dialect_for(pg)
    with pg.begin() as conn:
        claims = dialect.claim(
            conn,
            table,
            ready(table),
            claim_order(table),
            claim_values("me", 60, alchq_attempts=bump(table.c.alchq_attempts)),
            "alchq_attempts",
            limit=5,
        )
    assert len(claims) == 5
    write = dialect.finish_plan(
        table, {"status": "PROCESSED", "alchq_finished_at": utc_now()}, ("alchq_attempts",)
    )

    def finish() -> None:
        with pg.begin() as conn:
            assert write.many(conn, [(c, {"alchq_attempts": c.token}) for c in claims]) == 5

    statements = _statements(pg, finish)
    assert len(statements) == 1, statements
    _no_seq_scan(_plans(pg, statements))


def test_sqlite_claims_by_primary_key_however_many_are_ready(engine: Engine) -> None:
    """The claim's UPDATE finds its rows by key, not by scanning every ready row (its
    cost would grow with the backlog)."""
    if engine.dialect.name != "sqlite":
        pytest.skip("SQLite's planner")
    alchq.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(text(f"INSERT INTO {TABLE} (sleep) VALUES (0)"))
    statements = _statements(engine, lambda: worker.process_one(CountTask, engine=engine))
    claims = [(sql, p) for sql, p in statements if "SET status" in sql and "alchq_pick" in sql]
    assert claims, statements
    with engine.connect() as conn:
        for sql, params in claims:
            plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params).all()
            outer = [row[3] for row in plan if row[1] == 0]
            assert any("PRIMARY KEY" in step for step in outer), plan
