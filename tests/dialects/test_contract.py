"""The database seam's contract: every method of a Dialect, called directly, on every database.

A new database is supported when it passes this file (and the rest of the suite
runs on it). Nothing here goes through the worker: these are the statements
the worker is built on. Capabilities are asked of the dialect, never assumed.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import (
    Engine,
    Integer,
    String,
    Uuid,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alchq import BaseQueue, Status
from alchq._dialects import Claim, Dialect, UniqueKey, dialect_for, utc_now
from alchq._transitions import bump, claim_order, claim_values, ready, released, still_ours
from alchq.model import task_table, unique_index


class Base(DeclarativeBase):
    pass


class ContractTask(BaseQueue, Base):
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str | None] = mapped_column(String(50))

    def run(self) -> None:  # pragma: no cover - never run here
        pass


class ContractPair(BaseQueue, Base):
    """A composite primary key."""

    a: Mapped[int] = mapped_column(Integer, primary_key=True)
    b: Mapped[str] = mapped_column(String(10), primary_key=True)

    def run(self) -> None:  # pragma: no cover - never run here
        pass


class ContractUuid(BaseQueue, Base):
    """A key that is no plain integer or text (a UUID)."""

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)

    def run(self) -> None:  # pragma: no cover - never run here
        pass


TABLE = task_table(ContractTask)
PAIR = task_table(ContractPair)
UUIDS = task_table(ContractUuid)


@pytest.fixture
def db(engine: Engine) -> Iterator[tuple[Engine, Dialect]]:
    Base.metadata.create_all(engine)
    dialect = dialect_for(engine)
    dialect.prepare_engine(engine)
    yield engine, dialect
    engine.dispose()


def add(engine: Engine, *rows: dict[str, Any], table: Any = TABLE) -> None:
    """Insert ``rows`` in one transaction (values may be SQL expressions)."""
    with engine.begin() as conn:
        for r in rows:
            conn.execute(insert(table).values(**r))


def statuses(engine: Engine) -> dict[int, str]:
    with engine.connect() as conn:
        return {r.id: str(r.status) for r in conn.execute(select(TABLE.c.id, TABLE.c.status))}


def claim(
    dialect: Dialect, engine: Engine, worker: str = "w1", limit: int = 1, table: Any = TABLE
) -> list[Claim]:
    with engine.begin() as conn:
        return dialect.claim(
            conn,
            table,
            ready=ready(table),
            order_by=claim_order(table),
            values=claim_values(worker, 60, alchq_attempts=bump(table.c.alchq_attempts)),
            token_column="alchq_attempts",
            limit=limit,
        )


# -- claim ------------------------------------------------------------------------------


def test_claim_takes_the_most_urgent_oldest_ready_rows_in_order(
    db: tuple[Engine, Dialect],
) -> None:
    engine, dialect = db
    add(engine, {"id": 1}, {"id": 2, "priority": -5}, {"id": 3}, {"id": 4, "priority": 5})
    add(engine, {"id": 5, "status": "PROCESSED"}, {"id": 6, "run_at": utc_now(3600)})
    order = [c.pk for _ in range(4) for c in claim(dialect, engine)]
    assert order == [(2,), (1,), (3,), (4,)]
    assert claim(dialect, engine, limit=10) == []  # finished and future rows are never claimed
    assert statuses(engine) == {
        1: "PROCESSING",
        2: "PROCESSING",
        3: "PROCESSING",
        4: "PROCESSING",
        5: "PROCESSED",
        6: "PENDING",
    }


def test_claim_returns_each_rows_key_and_new_token_and_writes_the_values(
    db: tuple[Engine, Dialect],
) -> None:
    engine, dialect = db
    add(engine, {"id": 1, "alchq_attempts": 4})
    (got,) = claim(dialect, engine, worker="me")
    assert got == Claim((1,), 5)
    with engine.connect() as conn:
        row = conn.execute(select(TABLE).where(TABLE.c.id == 1)).one()
    assert row.status == Status.PROCESSING and row.alchq_worker == "me"
    assert row.alchq_attempts == 5 and row.alchq_lease_until is not None


def test_claim_respects_the_limit(db: tuple[Engine, Dialect]) -> None:
    engine, dialect = db
    add(engine, *({"id": i} for i in range(1, 21)))
    assert len(claim(dialect, engine, limit=7)) == 7
    assert list(statuses(engine).values()).count("PROCESSING") == 7


def test_claim_of_a_composite_key(db: tuple[Engine, Dialect]) -> None:
    engine, dialect = db
    add(engine, {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, table=PAIR)
    got = claim(dialect, engine, limit=5, table=PAIR)
    assert sorted(c.pk for c in got) == [(1, "x"), (1, "y")]


def test_concurrent_claims_never_share_a_row(db: tuple[Engine, Dialect], db_url: str) -> None:
    """Eight threads with their own connections claim one at a time until nothing is left."""
    engine, dialect = db
    add(engine, *({"id": i} for i in range(1, 201)))
    claimed: list[tuple[Any, ...]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def drain(n: int) -> None:
        own = create_engine(db_url)
        dialect_for(own).prepare_engine(own)
        try:
            while True:
                got = claim(dialect, own, worker=f"w{n}")
                if not got:
                    return
                with lock:
                    claimed.extend(c.pk for c in got)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            own.dispose()

    threads = [threading.Thread(target=drain, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(claimed) == 200 and len(set(claimed)) == 200


def test_a_rescue_is_a_claim_with_another_predicate_and_token(db: tuple[Engine, Dialect]) -> None:
    engine, dialect = db
    add(engine, {"id": 1}, {"id": 2})
    claim(dialect, engine, limit=2)
    c = TABLE.c
    with engine.begin() as conn:  # one lease runs out
        conn.execute(update(TABLE).where(c.id == 1).values(alchq_lease_until=utc_now(-5)))
        back = dialect.claim(
            conn,
            TABLE,
            ready=(c.status == Status.PROCESSING) & (c.alchq_lease_until < utc_now()),
            order_by=[c.alchq_lease_until],
            values={**released(), "alchq_lost_claims": bump(c.alchq_lost_claims)},
            token_column="alchq_lost_claims",
            limit=100,
        )
    assert back == [Claim((1,), 1)]
    assert statuses(engine) == {1: "PENDING", 2: "PROCESSING"}


# -- finish -----------------------------------------------------------------------------


def test_finish_writes_only_while_the_claim_is_still_ours(db: tuple[Engine, Dialect]) -> None:
    engine, dialect = db
    add(engine, {"id": 1})
    (mine,) = claim(dialect, engine, worker="me")
    done = {"status": Status.PROCESSED, "alchq_finished_at": utc_now()}
    with engine.begin() as conn:
        assert not dialect.finish(conn, TABLE, mine, still_ours(TABLE, "other", mine.token), done)
        assert not dialect.finish(conn, TABLE, mine, still_ours(TABLE, "me", mine.token + 1), done)
    assert statuses(engine) == {1: "PROCESSING"}
    with engine.begin() as conn:
        assert dialect.finish(conn, TABLE, mine, still_ours(TABLE, "me", mine.token), done)
    assert statuses(engine) == {1: "PROCESSED"}
    with engine.begin() as conn:  # finished: no longer PROCESSING, so no longer ours
        assert not dialect.finish(conn, TABLE, mine, still_ours(TABLE, "me", mine.token), done)


def test_finish_of_a_composite_key(db: tuple[Engine, Dialect]) -> None:
    engine, dialect = db
    add(engine, {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, table=PAIR)
    first, _second = claim(dialect, engine, limit=2, table=PAIR)
    with engine.begin() as conn:
        assert dialect.finish(
            conn, PAIR, first, still_ours(PAIR, "w1", first.token), {"status": Status.ERROR}
        )
    with engine.connect() as conn:
        rows = dict(conn.execute(select(PAIR.c.b, PAIR.c.status)).all())
    assert rows[first.pk[1]] == Status.ERROR and list(rows.values()).count(Status.PROCESSING) == 1


def test_a_finish_plan_is_built_once_and_fenced_by_its_parameters(
    db: tuple[Engine, Dialect],
) -> None:
    engine, dialect = db
    add(engine, {"id": 1}, {"id": 2})
    first, second = claim(dialect, engine, limit=2, worker="me")
    done = {"status": Status.PROCESSED, "alchq_finished_at": utc_now()}
    write = dialect.finish_plan(TABLE, done, ("status", "alchq_worker", "alchq_attempts"))

    def fence(worker: str, token: int) -> dict[str, Any]:
        return {"status": Status.PROCESSING, "alchq_worker": worker, "alchq_attempts": token}

    with engine.begin() as conn:
        assert not write(conn, first, fence("other", first.token))
        assert not write(conn, first, fence("me", first.token + 1))
        assert write(conn, first, fence("me", first.token))
        assert not write(conn, first, fence("me", first.token))  # no longer PROCESSING
        assert write(conn, second, fence("me", second.token))  # the same plan, another row
    assert statuses(engine) == {1: "PROCESSED", 2: "PROCESSED"}


@pytest.mark.parametrize("table", [TABLE, PAIR, UUIDS], ids=["key", "composite key", "UUID key"])
def test_a_finish_plan_writes_many_rows_in_one_statement_each_fenced_by_its_own_values(
    db: tuple[Engine, Dialect], table: Any
) -> None:
    engine, dialect = db
    if table is PAIR:
        add(engine, *({"a": i, "b": "x"} for i in range(1, 6)), table=PAIR)
    elif table is UUIDS:
        keys = sorted(uuid.uuid4() for _ in range(5))
        add(engine, *({"id": k, "priority": i} for i, k in enumerate(keys)), table=UUIDS)
    else:
        add(engine, *({"id": i} for i in range(1, 6)))
    claims = claim(dialect, engine, limit=5, table=table)
    done = {"status": Status.PROCESSED, "alchq_finished_at": utc_now()}
    write = dialect.finish_plan(table, done, ("status", "alchq_worker", "alchq_attempts"))

    def fence(worker: str, token: int) -> dict[str, Any]:
        return {"status": Status.PROCESSING, "alchq_worker": worker, "alchq_attempts": token}

    rows = [(c, fence("w1", c.token)) for c in claims]
    rows[1] = (claims[1], fence("other", claims[1].token))  # not ours
    rows[3] = (claims[3], fence("w1", claims[3].token + 1))  # an older claim
    sent: list[str] = []

    def count(*args: Any) -> None:
        sent.append(args[2])

    event.listen(engine, "before_cursor_execute", count)
    try:
        with engine.begin() as conn:
            assert write.many(conn, rows) == 3
            assert write.many(conn, []) == 0
            assert write.many(conn, rows) == 0  # no longer PROCESSING
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert len(sent) == 2
    with engine.connect() as conn:
        # In the order the rows were made (priority holds it for UUID keys: MariaDB's
        # UUID type sorts otherwise than Python's).
        order = (table.c.priority, *table.primary_key)
        got = [r.status for r in conn.execute(select(table.c.status).order_by(*order))]
    assert got == ["PROCESSED", "PROCESSING", "PROCESSED", "PROCESSING", "PROCESSED"]


def test_a_claim_is_undone_by_its_transactions_rollback(db: tuple[Engine, Dialect]) -> None:
    """The claim belongs to the caller's transaction (sqlite3 begins none for a
    statement that starts with WITH: such a claim would commit at once)."""
    engine, dialect = db
    add(engine, {"id": 1}, {"id": 2})
    with engine.connect() as conn:
        got = dialect.claim(
            conn,
            TABLE,
            ready=ready(TABLE),
            order_by=claim_order(TABLE),
            values=claim_values("w1", 60, alchq_attempts=bump(TABLE.c.alchq_attempts)),
            token_column="alchq_attempts",
            limit=2,
        )
        assert len(got) == 2
        conn.rollback()
    assert statuses(engine) == {1: "PENDING", 2: "PENDING"}


def test_claims_come_back_in_claim_order(db: tuple[Engine, Dialect]) -> None:
    engine, dialect = db
    add(engine, *({"id": i, "priority": (i * 7) % 5} for i in range(1, 41)))
    claims = claim(dialect, engine, limit=40)
    with engine.connect() as conn:
        priority = dict(conn.execute(select(TABLE.c.id, TABLE.c.priority)).all())
    order = [(priority[c.pk[0]], c.pk[0]) for c in claims]
    assert order == sorted(order)


# -- delete in batches ----------------------------------------------------------------


def test_delete_batch_deletes_at_most_limit_matching_rows(db: tuple[Engine, Dialect]) -> None:
    engine, dialect = db
    add(engine, *({"id": i, "status": "PROCESSED"} for i in range(1, 26)))
    add(engine, {"id": 100})
    where = TABLE.c.status == Status.PROCESSED
    counts = []
    while True:
        with engine.begin() as conn:
            n = dialect.delete_batch(conn, TABLE, where, 10)
        counts.append(n)
        if n < 10:
            break
    assert counts == [10, 10, 5]
    assert statuses(engine) == {100: "PENDING"}


def test_delete_batch_skips_rows_locked_by_others(db: tuple[Engine, Dialect]) -> None:
    engine, dialect = db
    if not dialect.skip_locked:
        pytest.skip(f"{dialect.name} has no row locks to skip")
    add(engine, *({"id": i, "status": "PROCESSED"} for i in range(1, 6)))
    with engine.connect() as holder:
        holder.execute(select(TABLE.c.id).where(TABLE.c.id == 3).with_for_update())
        with engine.begin() as conn:
            assert dialect.delete_batch(conn, TABLE, TABLE.c.status == Status.PROCESSED, 10) == 4
        holder.rollback()
    assert statuses(engine) == {3: "PROCESSED"}


# -- insert unless it conflicts -----------------------------------------------------------


def _unique_insert(dialect: Dialect, conn: Any, key: str, name: str) -> Any:
    row = {"unique_key": key, "name": name, "status": Status.PENDING}
    return dialect.insert_one_unless_conflict(conn, TABLE, row, _unique())


def _unique() -> UniqueKey:
    return unique_index(TABLE)


def test_insert_unless_conflict_inserts_a_key_once_while_it_is_active(
    db: tuple[Engine, Dialect],
) -> None:
    engine, dialect = db
    with engine.begin() as conn:
        assert _unique_insert(dialect, conn, "k", "first") is not None
        assert _unique_insert(dialect, conn, "k", "second") is None
        assert _unique_insert(dialect, conn, "other", "third") is not None
    with engine.begin() as conn:  # its holder finished: the key is free again
        conn.execute(update(TABLE).where(TABLE.c.name == "first").values(status="PROCESSED"))
        assert _unique_insert(dialect, conn, "k", "fourth") is not None
    with engine.connect() as conn:
        names = conn.execute(select(TABLE.c.name).order_by(TABLE.c.id)).scalars().all()
    assert names == ["first", "third", "fourth"]


def test_insert_unless_conflict_skips_taken_keys_among_many_rows(
    db: tuple[Engine, Dialect],
) -> None:
    engine, dialect = db
    with engine.begin() as conn:
        assert _unique_insert(dialect, conn, "taken", "first") is not None
    rows = [
        {"unique_key": key, "name": name, "status": Status.PENDING}
        for key, name in [("taken", "a"), ("new", "b"), (None, "c"), ("new", "d"), (None, "e")]
    ]
    with engine.begin() as conn:
        assert dialect.insert_unless_conflict(conn, TABLE, rows, _unique()) == 3
    with engine.connect() as conn:
        names = conn.execute(select(TABLE.c.name)).scalars().all()
    assert sorted(names) == ["b", "c", "e", "first"]


def test_insert_unless_conflict_fails_on_other_constraints(db: tuple[Engine, Dialect]) -> None:
    engine, dialect = db
    add(engine, {"id": 1})
    with pytest.raises(DBAPIError):
        with engine.begin() as conn:
            dialect.insert_unless_conflict(
                conn, TABLE, [{"id": 1, "unique_key": "fresh"}], _unique()
            )


# -- the database's clock -----------------------------------------------------------------


def test_utc_now_is_the_databases_clock_with_an_offset(db: tuple[Engine, Dialect]) -> None:
    engine, dialect = db
    add(engine, {"id": 1, "run_at": utc_now(90)}, {"id": 2, "run_at": utc_now(-90)})
    with engine.connect() as conn:
        rows = dict(conn.execute(select(TABLE.c.id, TABLE.c.run_at)).all())
        now = conn.execute(select(TABLE.c.time_created).where(TABLE.c.id == 1)).scalar_one()
    assert timedelta(seconds=89) < rows[1] - now < timedelta(seconds=91)
    assert timedelta(seconds=-91) < rows[2] - now < timedelta(seconds=-89)


# -- errors, classified --------------------------------------------------------------------


def test_errors_of_the_sql_are_not_transient(db: tuple[Engine, Dialect]) -> None:
    engine, dialect = db
    for bad in (
        "SELECT * FROM no_such_table",
        "SELEC 1",
        "SELECT no_such_column FROM contract_task",
    ):
        with pytest.raises(DBAPIError) as caught:
            with engine.connect() as conn:
                conn.execute(text(bad))
        assert not dialect.is_transient(caught.value), bad


def test_a_lost_connection_is_transient(db: tuple[Engine, Dialect]) -> None:
    engine, dialect = db
    if engine.dialect.name != "postgresql":
        pytest.skip("a server connection to lose")
    with engine.connect() as victim:
        pid = victim.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with engine.connect() as killer:
            killer.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(DBAPIError) as caught:
            victim.execute(text("SELECT 1"))
    assert dialect.is_transient(caught.value)


def test_short_lock_wait_gives_up_on_a_held_lock(db: tuple[Engine, Dialect]) -> None:
    engine, dialect = db
    add(engine, {"id": 1})
    with engine.connect() as holder:
        holder.execute(update(TABLE).where(TABLE.c.id == 1).values(name="held"))
        started = time.monotonic()
        with pytest.raises(DBAPIError) as caught:
            with engine.connect() as conn:
                with dialect.short_lock_wait(conn, 0.3):
                    conn.execute(update(TABLE).where(TABLE.c.id == 1).values(name="waiter"))
        waited = time.monotonic() - started
        holder.rollback()
    assert waited < 5, f"waited {waited:.1f}s for a lock"
    assert not dialect.is_schema_mismatch(caught.value)  # a lock wait, not a fault of the SQL
    with engine.connect() as conn:  # the connection's own setting is back
        assert conn.execute(select(func.count()).select_from(TABLE)).scalar_one() == 1


# -- notifications ------------------------------------------------------------------


def test_listen_notify_and_receive(db: tuple[Engine, Dialect]) -> None:
    engine, dialect = db
    if not dialect.listens:
        with pytest.raises(NotImplementedError):
            dialect.listen(None, "alchq_contract")
        return
    listening, sending = engine.raw_connection(), engine.raw_connection()
    try:
        backend = dialect.listen(listening.dbapi_connection, "alchq_contract")
        assert backend == dialect.backend_id(listening.dbapi_connection) is not None
        assert dialect.notifications(listening.dbapi_connection, 0.2) == []
        dialect.notify(sending.dbapi_connection, "alchq_contract", ["a", "b"])
        received: list[str] = []
        deadline = time.monotonic() + 5
        while len(received) < 2 and time.monotonic() < deadline:
            received += dialect.notifications(listening.dbapi_connection, 1.0)
        assert received == ["a", "b"]
    finally:
        listening.invalidate()  # its LISTEN must not go back to the pool
        sending.invalidate()
