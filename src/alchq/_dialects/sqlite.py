"""SQLite: one atomic ``UPDATE ... RETURNING``, WAL and a busy timeout."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Integer,
    String,
    Table,
    bindparam,
    cast,
    extract,
    func,
    select,
    tuple_,
    type_coerce,
    update,
)
from sqlalchemy.dialects.sqlite import insert
from sqlalchemy.exc import OperationalError

from alchq._dialects.base import Claim, Dialect, FinishPlan, on_connect
from alchq._util import first_line

logger = logging.getLogger("alchq.dialect")

#: How long a connection waits for another process's write lock, in ms.
BUSY_TIMEOUT_MS = 30_000


def _set_busy_timeout(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    finally:
        cursor.close()


def _says(exc: BaseException, messages: tuple[str, ...]) -> bool:
    text = str(getattr(exc, "orig", exc)).lower()
    return any(m in text for m in messages)


_BUSY_MESSAGES = ("database is locked", "database is busy", "database table is locked")

_TRANSIENT_MESSAGES = (
    "database is locked",
    "database is busy",
    "database table is locked",
    "unable to open database file",
    "disk i/o error",
)


def _json_plain(value: Any) -> bool:
    """Does ``value`` go through JSON as SQLite compares it (an integer or text)?"""
    return isinstance(value, (int, str)) and not isinstance(value, bool)


class JsonFinishPlan(FinishPlan):
    """Several outcomes in one statement whose text does not depend on how many: the
    rows' keys and fence values as one JSON array (``json_each``), so the statement
    is compiled once instead of rendering a placeholder per value. Values JSON
    cannot carry as they are compared (a UUID key, bytes) take the generic form."""

    def __init__(self, table: Table, values: dict[str, Any], fence: Sequence[str]) -> None:
        super().__init__(table, values, fence)
        pk = list(table.primary_key.columns)
        cols = [*pk, *(table.c[name] for name in fence)]
        rows = func.json_each(bindparam("alchq_rows", type_=String())).table_valued("value")
        picked = [func.json_extract(rows.c.value, f"$[{i}]") for i in range(len(cols))]
        key = (
            pk[0].in_(select(picked[0]).select_from(rows))
            if len(pk) == 1
            else tuple_(*pk).in_(select(*picked[: len(pk)]).select_from(rows))
        )
        every = tuple_(*cols).in_(select(*picked).select_from(rows))
        self._json = update(table).where(key).where(every).values(values)

    def many(self, conn: Connection, rows: Sequence[tuple[Claim, dict[str, Any]]]) -> int:
        values = self.row_values(rows)
        if not rows or not all(_json_plain(v) for row in values for v in row):
            return super().many(conn, rows)
        return int(conn.execute(self._json, {"alchq_rows": json.dumps(values)}).rowcount)


class SQLiteDialect(Dialect):
    name = "sqlite"
    on_conflict_insert = staticmethod(insert)
    # SQLite has one writer at a time and no row locks: an UPDATE takes the
    # database's write lock before it reads, so a single-statement claim is
    # atomic across processes without SKIP LOCKED.
    skip_locked = False
    returning = True  # SQLite >= 3.35
    partial_index = True

    def finish_plan(self, table: Table, values: dict[str, Any], fence: Sequence[str]) -> FinishPlan:
        return JsonFinishPlan(table, values, fence)

    def is_transient(self, exc: BaseException) -> bool:
        # sqlite3 raises OperationalError for a missing table as for a locked
        # file; only the latter kind is worth waiting for.
        if not super().is_transient(exc):
            return False
        message = str(getattr(exc, "orig", exc)).lower()
        return any(m in message for m in _TRANSIENT_MESSAGES) or getattr(
            exc, "connection_invalidated", False
        )

    def is_conflict(self, exc: BaseException) -> bool:
        # The write lock stayed busy past the busy timeout.
        return isinstance(exc, OperationalError) and _says(exc, _BUSY_MESSAGES)

    def is_schema_mismatch(self, exc: BaseException) -> bool:
        return isinstance(exc, OperationalError) and _says(exc, ("no such column", "no such table"))

    def waits_for(
        self, engine: Engine, waiting: Any, holders: Sequence[Any], *, writing: bool, wrote: bool
    ) -> bool | None:
        # One write lock per database file: while the task's transaction has
        # written it holds it, so any other writer to the file waits for it.
        return writing and wrote

    def is_read_only(self, exc: BaseException) -> bool:
        return _says(exc, ("readonly database", "read-only"))

    @contextlib.contextmanager
    def short_lock_wait(self, conn: Connection, seconds: float) -> Iterator[None]:
        # busy_timeout belongs to the connection: put it back before the pool
        # hands the connection to someone else.
        conn.exec_driver_sql(f"PRAGMA busy_timeout = {int(seconds * 1000)}")
        try:
            yield
        finally:
            conn.exec_driver_sql(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")

    def epoch_minute(self, moment: ColumnElement[Any]) -> ColumnElement[int]:
        # Whole seconds from strftime('%s'), then SQLite's integer division (its
        # floor() exists only in builds with the math functions).
        return type_coerce(cast(extract("epoch", moment), Integer) / 60, Integer)

    def prepare_engine(self, engine: Engine) -> None:
        on_connect(engine, _set_busy_timeout)
        if engine.url.database in (None, "", ":memory:") or "mode=memory" in str(engine.url):
            return
        # WAL lets readers and the writer proceed together, so several worker
        # processes can share one file. The mode is stored in the file itself.
        try:
            with engine.connect() as conn:
                _set_busy_timeout(conn.connection.dbapi_connection, None)
                mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
                if str(mode).lower() != "wal":
                    conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        except Exception as exc:
            # A locked or unopenable file: the claim will report what matters.
            logger.debug("could not switch SQLite database to WAL mode: %s", first_line(exc))
