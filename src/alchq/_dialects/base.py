"""The dialect seam's base: the generic (ANSI) implementation every database refines.

A leaf module: it imports no other dialect. The map from a database to its
class is in :mod:`alchq._dialects`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import (
    Boolean,
    Engine,
    Float,
    FunctionElement,
    Integer,
    bindparam,
    cast,
    delete,
    event,
    extract,
    func,
    literal,
    select,
    tuple_,
    type_coerce,
    update,
)
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.types import DateTime, NullType

if TYPE_CHECKING:
    from sqlalchemy import Column, ColumnElement, Connection, Table
    from sqlalchemy.sql.dml import Insert, Update
    from sqlalchemy.sql.selectable import Select


class utc_now(FunctionElement[Any]):  # noqa: N801 - reads like the SQL function it is
    """The database server's current UTC time, optionally plus ``seconds``.

    Used for every timestamp alchq writes or compares, so that all times come
    from one clock (the database's), never from a worker's possibly skewed one.
    """

    type = DateTime(timezone=True)
    inherit_cache = True

    def __init__(self, seconds: float | None = None) -> None:
        # The offset is a bound parameter, so it is part of the cache key.
        args = () if seconds is None else (bindparam(None, float(seconds), type_=Float()),)
        super().__init__(*args)

    def offset(self, compiler: SQLCompiler, **kw: Any) -> str | None:
        clauses = list(self.clauses)
        return compiler.process(clauses[0], **kw) if clauses else None


@compiles(utc_now)
def _utc_now_default(element: utc_now, compiler: SQLCompiler, **kw: Any) -> str:
    if element.offset(compiler, **kw) is not None:
        raise NotImplementedError("utc_now(seconds) needs a supported database")
    return "CURRENT_TIMESTAMP"


@compiles(utc_now, "postgresql")
def _utc_now_postgresql(element: utc_now, compiler: SQLCompiler, **kw: Any) -> str:
    # now()/CURRENT_TIMESTAMP is the *transaction* start; statement_timestamp()
    # keeps rows inserted in one long transaction in insertion order and gives
    # real start/finish times to a task whose transaction spans its run().
    offset = element.offset(compiler, **kw)
    if offset is None:
        return "statement_timestamp()"
    return f"(statement_timestamp() + make_interval(secs => {offset}))"


@compiles(utc_now, "sqlite")
def _utc_now_sqlite(element: utc_now, compiler: SQLCompiler, **kw: Any) -> str:
    # CURRENT_TIMESTAMP has one-second resolution on SQLite. This gives
    # milliseconds, padded to the six fractional digits SQLAlchemy's SQLite
    # DateTime writes, so server-made and client-made times compare as text.
    offset = element.offset(compiler, **kw)
    if offset is None:
        return "strftime('%Y-%m-%d %H:%M:%f000', 'now')"
    return f"strftime('%Y-%m-%d %H:%M:%f000', 'now', ({offset}) || ' seconds')"


@compiles(utc_now, "mysql")
@compiles(utc_now, "mariadb")
def _utc_now_mysql(element: utc_now, compiler: SQLCompiler, **kw: Any) -> str:
    offset = element.offset(compiler, **kw)
    if offset is None:
        return "UTC_TIMESTAMP(6)"
    return f"(UTC_TIMESTAMP(6) + INTERVAL ROUND(({offset}) * 1000000) MICROSECOND)"


class exact(FunctionElement[Any]):  # noqa: N801 - reads like SQL
    """A text value compared byte for byte: MySQL's default collations take
    ``'pending'`` for ``'PENDING'`` (elsewhere the value as it is)."""

    inherit_cache = True

    def __init__(self, value: Any) -> None:
        super().__init__(value)
        self.type = value.type


@compiles(exact)
def _exact_default(element: exact, compiler: SQLCompiler, **kw: Any) -> str:
    (value,) = element.clauses
    return str(compiler.process(value, **kw))


@compiles(exact, "mysql")
@compiles(exact, "mariadb")
def _exact_mysql(element: exact, compiler: SQLCompiler, **kw: Any) -> str:
    (value,) = element.clauses
    return f"CAST({compiler.process(value, **kw)} AS BINARY)"


class reached(FunctionElement[bool]):  # noqa: N801 - reads like SQL
    """``moment <= when`` (``strict``: ``<``), compared as times, not as text.

    SQLite stores times as text and would compare them as text: a ``run_at``
    written by another tool as ``2026-01-01T10:00:00`` would sort after
    ``2026-01-01 23:00:00`` and never come due. There the comparison goes
    through ``julianday()``, and a value that is no time at all counts as
    reached, so its row is claimed and reported (it cannot be loaded) instead
    of waiting forever without a word.
    """

    type = Boolean()
    inherit_cache = True

    def __init__(self, moment: Any, when: Any, strict: bool = False) -> None:
        self.strict = strict
        super().__init__(moment, when)


@compiles(reached)
def _reached_default(element: reached, compiler: SQLCompiler, **kw: Any) -> str:
    moment, when = (compiler.process(c, **kw) for c in element.clauses)
    return f"({moment} {'<' if element.strict else '<='} {when})"


@compiles(reached, "sqlite")
def _reached_sqlite(element: reached, compiler: SQLCompiler, **kw: Any) -> str:
    moment, when = (compiler.process(c, **kw) for c in element.clauses)
    op = "<" if element.strict else "<="
    return f"(julianday({moment}) IS NULL OR julianday({moment}) {op} julianday({when}))"


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


@dataclass(frozen=True)
class UniqueKey:
    """A unique index (or primary key) an insert may collide with, as
    :meth:`Dialect.insert_unless_conflict` needs it: its name as the database
    reports it in a conflict, its columns, and its predicate if it is partial."""

    name: str
    columns: tuple[Column[Any], ...]
    where: ColumnElement[bool] | None = None


class ClaimPlan:
    """A claim built once (see :meth:`Dialect.claim_plan`): call it with a connection.

    ``statement`` is the claim as one UPDATE without RETURNING, for a caller that
    wants other columns back (the claimer loads the tasks' objects from it); None
    where the database claims in two steps. Its rows come back in no particular
    order.
    """

    def __init__(
        self, claim: Callable[[Connection], list[Claim]], statement: Update | None = None
    ) -> None:
        self._claim = claim
        self.statement = statement

    def __call__(self, conn: Connection) -> list[Claim]:
        return self._claim(conn)


class FinishPlan:
    """An outcome's write for fixed values, built once (see :meth:`Dialect.finish_plan`)."""

    def __init__(self, table: Table, values: dict[str, Any], fence: Sequence[str]) -> None:
        pk_cols = list(table.primary_key.columns)
        self._pk = len(pk_cols)
        self._fence = list(fence)
        self._stmt = (
            update(table)
            .where(*(col == bindparam(f"alchq_pk{i}") for i, col in enumerate(pk_cols)))
            .where(*(table.c[name] == bindparam(f"alchq_fence_{name}") for name in fence))
            .values(values)
        )
        self._many = self.many_statement(table, values, fence)

    def many_statement(self, table: Table, values: dict[str, Any], fence: Sequence[str]) -> Update:
        """:meth:`many`'s statement: each row's key and fence values as one tuple.

        The key's own IN comes first so that the database finds the rows by the
        primary key's index (a row-value IN alone may be a scan).
        """
        pk_cols = list(table.primary_key.columns)
        key = tuple_(*pk_cols) if len(pk_cols) > 1 else pk_cols[0]
        every = tuple_(*pk_cols, *(table.c[name] for name in fence))
        return (
            update(table)
            .where(key.in_(bindparam("alchq_keys", expanding=True)))
            .where(every.in_(bindparam("alchq_rows", expanding=True)))
            .values(values)
        )

    def row_values(self, rows: Sequence[tuple[Claim, dict[str, Any]]]) -> list[tuple[Any, ...]]:
        """Each row's key and fence values, in :meth:`many_statement`'s column order."""
        return [(*claim.pk, *(fenced[name] for name in self._fence)) for claim, fenced in rows]

    def many_params(self, rows: Sequence[tuple[Claim, dict[str, Any]]]) -> dict[str, Any]:
        keys = [claim.pk if self._pk > 1 else claim.pk[0] for claim, _ in rows]
        return {"alchq_keys": keys, "alchq_rows": self.row_values(rows)}

    def _params(self, claim: Claim, fenced: dict[str, Any]) -> dict[str, Any]:
        params = {f"alchq_pk{i}": v for i, v in enumerate(claim.pk)}
        params.update({f"alchq_fence_{name}": fenced[name] for name in self._fence})
        return params

    def __call__(self, conn: Connection, claim: Claim, fenced: dict[str, Any]) -> bool:
        """Write one claim's row if its ``fence`` columns have the ``fenced`` values."""
        return bool(conn.execute(self._stmt, self._params(claim, fenced)).rowcount == 1)

    def many(self, conn: Connection, rows: Sequence[tuple[Claim, dict[str, Any]]]) -> int:
        """Write several rows, each fenced by its own values, in one statement: how
        many were written."""
        if not rows:
            return 0
        return int(conn.execute(self._many, self.many_params(rows)).rowcount)


def claim_sort_key(values: Sequence[Any]) -> list[tuple[bool, str, Any]]:
    """Sorts claimed rows by their claim-order values: NULLs last, and values of
    different types (SQLite's dynamic typing) apart rather than compared."""
    return [(v is None, type(v).__name__, v) for v in values]


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
    #: the dialect's ``insert()`` with ``on_conflict_do_nothing`` (PostgreSQL, SQLite)
    on_conflict_insert: ClassVar[Callable[..., Any] | None] = None
    #: The isolation level of alchq's own transactions (claims, rescues, the
    #: registry, outcomes written apart from run()), whatever the database's
    #: default: None where the database has no choice to make.
    bookkeeping_isolation: ClassVar[str | None] = None

    def prepare_engine(self, engine: Engine) -> None:
        """Adjust a worker's engine once, before its first claim."""

    @contextlib.contextmanager
    def short_lock_wait(self, conn: Connection, seconds: float) -> Iterator[None]:
        """Within this block, give up on a lock after ``seconds`` instead of waiting.

        For the heartbeat and last-resort writes, which must not hang behind a
        lock held by the (stuck) task's own transaction.
        """
        yield

    def server_is_busy(self, exc: BaseException) -> bool:
        """Did the server answer "not now" (starting up, shutting down, too many clients)?

        Unlike a refused connection, that says the URL is right: worth waiting for.
        """
        return False

    def is_transient(self, exc: BaseException) -> bool:
        """Is ``exc`` the database being away (retry later), not a fault of the SQL or data?

        Lost connections, server restarts and shutdowns, failovers (including
        read-only windows), serialization failures and lock timeouts are.
        Databases refine this; the generic rule knows only what the DB-API says.
        """
        if not isinstance(exc, DBAPIError):
            return False
        if exc.connection_invalidated or isinstance(exc, InterfaceError):
            return True
        return isinstance(exc, OperationalError)

    def is_conflict(self, exc: BaseException) -> bool:
        """Did a transaction lose to a concurrent one (serialization failure, deadlock,
        a busy write lock)? Running it again may well succeed."""
        return False

    def is_aborted_transaction(self, exc: BaseException) -> bool:
        """Was the statement refused because an earlier error aborted the transaction?"""
        return False

    def is_schema_mismatch(self, exc: BaseException) -> bool:
        """Does the table lack a column or table the statement names (code and schema
        disagree, as during a deploy)?"""
        return False

    def is_read_only(self, exc: BaseException) -> bool:
        """Was a write refused because the database (or connection) is read-only?"""
        return False

    #: Can workers LISTEN for new tasks (see :meth:`notifications`)?
    listens: ClassVar[bool] = False

    def listen(self, dbapi_connection: Any, channel: str) -> Any:
        """Make a connection of alchq's own listen on ``channel``; its :meth:`backend_id`."""
        raise NotImplementedError

    def notifications(self, dbapi_connection: Any, timeout: float) -> list[str]:
        """Wait up to ``timeout`` s on a listening connection; the payloads received."""
        raise NotImplementedError

    def notify(self, dbapi_connection: Any, channel: str, payloads: Sequence[str]) -> None:
        """Send ``payloads`` on ``channel`` from a connection of alchq's own (at once)."""
        raise NotImplementedError

    def backend_id(self, dbapi_connection: Any) -> Any:
        """The database's id of a DB-API connection (to ask who blocks whom), or None."""
        return None

    def waits_for(
        self, engine: Engine, waiting: Any, holders: Sequence[Any], *, writing: bool, wrote: bool
    ) -> bool | None:
        """Is the statement in flight on connection ``waiting`` blocked by ``holders``?

        ``waiting`` and ``holders`` are :meth:`backend_id` values; ``writing``
        says whether that statement writes, ``wrote`` whether the holders'
        transaction has written. True or False when the database can tell;
        None when it cannot (then nothing is reported).
        """
        return None

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
        """Update up to ``limit`` rows matching ``ready`` (first by ``order_by``) at once.

        Used to claim ready tasks and to rescue expired claims: ``values``
        are the new column values, and ``ready`` is checked again by the
        UPDATE itself, so a row changed meanwhile is left alone. Returns each
        updated row's key and the token column's new value (the claim's
        fencing token). The caller commits.
        """
        return self.claim_plan(table, ready, order_by, values, token_column, limit)(conn)

    def claim_plan(
        self,
        table: Table,
        ready: ColumnElement[bool],
        order_by: Sequence[ColumnElement[Any]],
        values: dict[str, Any],
        token_column: str,
        limit: int = 1,
    ) -> ClaimPlan:
        """:meth:`claim`'s statements, built once: call the result with a connection.

        A worker's claim of a model is always the same statement (its times
        come from the database's clock when it runs), so the claimer keeps the
        plan instead of building the statement for every task.
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
            # Without SKIP LOCKED (SQLite: one writer) a plain subquery: a statement
            # that starts with WITH would not begin a transaction under sqlite3's
            # implicit transactions, and could not be rolled back.
            picked = (
                pick.cte("alchq_pick").prefix_with("MATERIALIZED", dialect="postgresql")
                if self.skip_locked
                else pick.subquery("alchq_pick")
            )
            # (a, b) IN (SELECT a, b ...): one column per key part, not one tuple.
            # RETURNING comes in no particular order: the sort keys come back too,
            # as the driver gives them (a value the column's type could not read,
            # which SQLite allows, must not fail the claim: its task ends in ERROR).
            n = len(pk_cols)
            raw = [type_coerce(col, NullType()) for col in order_by]
            claim = update(table).where(key.in_(select(*picked.c)))
            if self.skip_locked:
                # Checked again: a row may have changed between the pick and its
                # update. Without SKIP LOCKED (SQLite) the statement runs under the
                # single write lock, nothing changes in between, and the check
                # would steer SQLite to scan every ready row instead of the key.
                claim = claim.where(ready)
            claim = claim.values(values)
            stmt = claim.returning(*pk_cols, token, *raw)

            def returning(conn: Connection) -> list[Claim]:
                rows = list(conn.execute(stmt).all())
                if len(rows) > 1:
                    rows.sort(key=lambda row: claim_sort_key(row[n + 1 :]))
                return [Claim(tuple(row[:n]), int(row[n])) for row in rows]

            return ClaimPlan(returning, claim)

        if self.skip_locked:
            # No RETURNING (MySQL): lock the rows first, then update them by key in
            # the same transaction; SKIP LOCKED keeps two workers apart. Locked, the
            # rows cannot change in between: the pick reads each one's new token (the
            # token's new value, computed from the row) and the UPDATE needs no
            # re-check (which MySQL might evaluate by scanning, waiting on rows
            # other claims hold).
            new_token = values.get(token_column, token)
            if not isinstance(new_token, ClauseElement):
                new_token = literal(new_token)
            locked = pick.with_only_columns(*pk_cols, new_token)

            def pick_then_update(conn: Connection) -> list[Claim]:
                rows = [tuple(row) for row in conn.execute(locked).all()]
                if not rows:
                    return []
                n = len(pk_cols)
                keys = [row[0] if n == 1 else row[:n] for row in rows]
                conn.execute(update(table).where(key.in_(keys)).values(values))
                return [Claim(row[:n], int(row[n])) for row in rows]  # in the pick's order

            return ClaimPlan(pick_then_update)

        def in_two_steps(conn: Connection) -> list[Claim]:
            # Neither RETURNING nor SKIP LOCKED: the rows are not locked when picked,
            # so the UPDATE checks them again and the tokens are read back.
            pks = [tuple(row) for row in conn.execute(pick).all()]
            if not pks:
                return []
            match = key.in_([p if len(p) > 1 else p[0] for p in pks])
            conn.execute(update(table).where(match).where(ready).values(values))
            sel = table.select().with_only_columns(*pk_cols, token).where(match)
            tokens = {tuple(row[:-1]): int(row[-1]) for row in conn.execute(sel).all()}
            return [Claim(p, tokens[p]) for p in pks if p in tokens]  # in the pick's order

        return ClaimPlan(in_two_steps)

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

    def finish_plan(self, table: Table, values: dict[str, Any], fence: Sequence[str]) -> FinishPlan:
        """:meth:`finish`'s statement for fixed ``values``, built once: call the result
        with a connection, the claim, and the values the ``fence`` columns must have
        (True if the row was written), or its ``many`` with several of them."""
        return FinishPlan(table, values, fence)

    def insert_unless_conflict(
        self, conn: Connection, table: Table, rows: Sequence[dict[str, Any]], unique: UniqueKey
    ) -> int:
        """Insert each of ``rows`` (plain values, sent together) unless it would break
        the unique index ``unique``, instead of failing; return how many went in.

        Waits for a concurrent transaction inserting the same key to end, so
        exactly one of two racing inserts goes in. A conflict on any other
        constraint still fails.
        """
        # Multi-row INSERTs ("insertmanyvalues"); RETURNING counts what went in
        # (psycopg's rowcount is -1 for ON CONFLICT inserts).
        return len(conn.execute(self._on_conflict(table, unique), list(rows)).all())

    def insert_one_unless_conflict(
        self, conn: Connection, table: Table, row: dict[str, Any], unique: UniqueKey
    ) -> tuple[Any, ...] | None:
        """:meth:`insert_unless_conflict` for one row, whose values may be SQL
        expressions: its primary key, or None if it conflicted."""
        inserted = conn.execute(self._on_conflict(table, unique).values(row)).first()
        return None if inserted is None else tuple(inserted)

    def _on_conflict(self, table: Table, unique: UniqueKey) -> Insert:
        if self.on_conflict_insert is None:
            raise NotImplementedError(f"{self.name}: unique inserts are not supported yet")
        # ON CONFLICT (cols) WHERE predicate DO NOTHING: names the (partial)
        # unique index, so a conflict on any other constraint still fails.
        stmt: Insert = self.on_conflict_insert(table)
        return stmt.on_conflict_do_nothing(  # type: ignore[attr-defined,no-any-return]
            index_elements=list(unique.columns), index_where=unique.where
        ).returning(*table.primary_key.columns)

    def read_latest(self, stmt: Select[Any]) -> Select[Any]:
        """``stmt`` made to see rows committed after the transaction's snapshot was
        taken (to find the row a conflicting insert collided with)."""
        return stmt

    def epoch_minute(self, moment: ColumnElement[Any]) -> ColumnElement[int]:
        """SQL: the whole minutes from 1970 to ``moment`` (a UTCDateTime column), for
        counting finished tasks per minute in the database."""
        return cast(func.floor(extract("epoch", moment) / 60), Integer)

    def delete_batch(
        self, conn: Connection, table: Table, where: ColumnElement[bool], limit: int
    ) -> int:
        """Delete up to ``limit`` rows matching ``where``; return how many. The caller commits.

        Rows locked by someone else are skipped where the database can, so a
        batch never waits behind a worker.
        """
        pk_cols = list(table.primary_key.columns)
        pick = table.select().with_only_columns(*pk_cols).where(where).limit(limit)
        if self.skip_locked:
            pick = pick.with_for_update(skip_locked=True)
        key = tuple_(*pk_cols) if len(pk_cols) > 1 else pk_cols[0]
        if self.returning:
            if not self.skip_locked:
                # A plain subquery: sqlite3 reports no rowcount (-1) for a
                # statement that starts with WITH.
                return conn.execute(delete(table).where(key.in_(pick))).rowcount
            # A materialized CTE, as in claim(): evaluated once, so SKIP LOCKED
            # cannot lock (and delete) more than ``limit`` rows.
            picked = pick.cte("alchq_pick").prefix_with("MATERIALIZED", dialect="postgresql")
            return conn.execute(delete(table).where(key.in_(select(*picked.c)))).rowcount
        pks = [tuple(row) for row in conn.execute(pick).all()]
        if not pks:
            return 0
        match = key.in_([p if len(p) > 1 else p[0] for p in pks])
        stmt = delete(table).where(match)
        if not self.skip_locked:
            # Not locked when picked: check again. (Locked rows need no check, and
            # MySQL could scan the check's index and wait on rows it skipped.)
            stmt = stmt.where(where)
        return conn.execute(stmt).rowcount


def on_connect(engine: Engine, fn: Any) -> None:
    """Run ``fn(dbapi_connection, connection_record)`` on each new connection, once."""
    if not event.contains(engine, "connect", fn):
        event.listen(engine, "connect", fn)
