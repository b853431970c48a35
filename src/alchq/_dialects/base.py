"""Dialect protocol, the generic (ANSI) implementation and the registry of dialects."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import Engine, FunctionElement, event, select, tuple_, update
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.types import DateTime

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement, Connection, Table


class utc_now(FunctionElement[Any]):  # noqa: N801 - reads like the SQL function it is
    """The database server's current UTC time.

    Used for every timestamp alchq writes so that all times come from one
    clock (the database's), never from a worker's possibly skewed clock.
    """

    type = DateTime(timezone=True)
    inherit_cache = True


@compiles(utc_now)
def _utc_now_default(element: utc_now, compiler: SQLCompiler, **kw: Any) -> str:
    return "CURRENT_TIMESTAMP"


@compiles(utc_now, "postgresql")
def _utc_now_postgresql(element: utc_now, compiler: SQLCompiler, **kw: Any) -> str:
    # now()/CURRENT_TIMESTAMP is the *transaction* start; statement_timestamp()
    # keeps rows inserted in one long transaction in insertion order and gives
    # real start/finish times to a task whose transaction spans its run().
    return "statement_timestamp()"


@compiles(utc_now, "sqlite")
def _utc_now_sqlite(element: utc_now, compiler: SQLCompiler, **kw: Any) -> str:
    # CURRENT_TIMESTAMP has one-second resolution on SQLite. This gives
    # milliseconds, padded to the six fractional digits SQLAlchemy's SQLite
    # DateTime writes, so server-made and client-made times compare as text.
    return "strftime('%Y-%m-%d %H:%M:%f000', 'now')"


@compiles(utc_now, "mysql")
@compiles(utc_now, "mariadb")
def _utc_now_mysql(element: utc_now, compiler: SQLCompiler, **kw: Any) -> str:
    return "UTC_TIMESTAMP(6)"


ReadyIndexKwargs = dict[str, Any]


def ready_index_kwargs(ready: ColumnElement[bool]) -> ReadyIndexKwargs:
    """Keyword arguments that make an Index partial where the database allows it.

    PostgreSQL and SQLite index only the ready rows, so the index stays small
    however many finished rows the table holds. MySQL/MariaDB have no partial
    indexes; there the index leads with ``status`` instead (see model.py).
    """
    return {"postgresql_where": ready, "sqlite_where": ready}


@dataclass(frozen=True)
class Claim:
    """One claimed task: its primary key and the claim's fencing token."""

    pk: tuple[Any, ...]
    token: int


class Dialect:
    """Generic implementation; subclasses say what their database can do.

    Claiming and recording outcomes are separate methods taking a limit/list so
    that a worker can later claim several tasks in one statement.
    """

    name: ClassVar[str] = "default"
    #: ``SELECT ... FOR UPDATE SKIP LOCKED``
    skip_locked: ClassVar[bool] = False
    #: ``UPDATE ... RETURNING``
    returning: ClassVar[bool] = False
    #: partial (filtered) indexes
    partial_index: ClassVar[bool] = False

    def prepare_engine(self, engine: Engine) -> None:
        """Adjust a worker's engine once, before its first claim."""

    def claim(
        self,
        conn: Connection,
        table: Table,
        ready: ColumnElement[bool],
        order_by: Sequence[ColumnElement[Any]],
        values: dict[str, Any],
        token_column: str,
        limit: int = 1,
    ) -> list[Claim]:
        """Mark up to ``limit`` ready rows as claimed and return them.

        ``values`` are the column values that make a row claimed; the token
        column's new value is returned as the claim's fencing token. The
        caller commits; until then the claim is invisible to others.
        """
        pk_cols = list(table.primary_key.columns)
        pick = table.select().with_only_columns(*pk_cols).where(ready).order_by(*order_by)
        pick = pick.limit(limit)
        if self.skip_locked:
            pick = pick.with_for_update(skip_locked=True)
        key = tuple_(*pk_cols) if len(pk_cols) > 1 else pk_cols[0]
        token = table.c[token_column]
        if self.returning:
            # The pick is a CTE, computed once. As a plain ``IN (subquery)``
            # PostgreSQL may re-run it for every outer row (a nested-loop
            # semi-join), and with SKIP LOCKED each re-run locks a *new* row:
            # one claim would then take several tasks. MATERIALIZED forbids
            # inlining it back (the prefix renders only on PostgreSQL).
            picked = pick.cte("alchq_pick").prefix_with("MATERIALIZED", dialect="postgresql")
            picked_key = tuple_(*picked.c) if len(pk_cols) > 1 else next(iter(picked.c))
            stmt = (
                update(table)
                .where(key.in_(select(picked_key)))
                .where(ready)
                .values(values)
                .returning(*pk_cols, token)
            )
            rows = conn.execute(stmt).all()
            return [Claim(tuple(row[:-1]), int(row[-1])) for row in rows]
        # No RETURNING (MySQL): lock the rows first, then update them by key in
        # the same transaction; SKIP LOCKED keeps two workers apart.
        pks = [tuple(row) for row in conn.execute(pick).all()]
        if not pks:
            return []
        match = key.in_([p if len(p) > 1 else p[0] for p in pks])
        conn.execute(update(table).where(match).where(ready).values(values))
        sel = table.select().with_only_columns(*pk_cols, token).where(match)
        return [Claim(tuple(row[:-1]), int(row[-1])) for row in conn.execute(sel).all()]

    def finish(
        self,
        conn: Connection,
        table: Table,
        claim: Claim,
        still_ours: ColumnElement[bool],
        values: dict[str, Any],
    ) -> bool:
        """Write a claim's outcome if the claim is still ours; False if it was lost.

        ``still_ours`` matches the claim's owner and token, so a worker whose
        claim was taken away cannot overwrite the new owner's row.
        """
        pk_cols = list(table.primary_key.columns)
        stmt = (
            update(table)
            .where(*(col == value for col, value in zip(pk_cols, claim.pk, strict=True)))
            .where(still_ours)
            .values(values)
        )
        return conn.execute(stmt).rowcount == 1


_DIALECTS: dict[str, type[Dialect]] = {}


def register(cls: type[Dialect]) -> type[Dialect]:
    _DIALECTS[cls.name] = cls
    return cls


def dialect_for(engine: Engine) -> Dialect:
    """The :class:`Dialect` for an engine, chosen from its dialect name."""
    # Imported here so that the subclasses can import this module.
    from alchq._dialects import mysql, postgresql, sqlite  # noqa: F401

    cls = _DIALECTS.get(engine.dialect.name, Dialect)
    return cls()


def on_connect(engine: Engine, fn: Any) -> None:
    """Run ``fn(dbapi_connection, connection_record)`` on each new connection, once."""
    if not event.contains(engine, "connect", fn):
        event.listen(engine, "connect", fn)
