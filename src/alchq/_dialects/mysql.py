"""MySQL 8 / MariaDB 10.6: SKIP LOCKED exists, ``UPDATE ... RETURNING`` does not."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import (
    Column,
    ColumnElement,
    Connection,
    Engine,
    Index,
    Table,
    bindparam,
    delete,
    func,
    literal_column,
    select,
    text,
)
from sqlalchemy.exc import CompileError, DBAPIError, IntegrityError, InterfaceError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.schema import CreateColumn, CreateIndex, DropIndex
from sqlalchemy.sql.compiler import DDLCompiler
from sqlalchemy.sql.selectable import Select
from sqlalchemy.types import NullType

from alchq._dialects.base import Dialect, UniqueKey

#: Server error numbers of a server that is away or going away: wait for it.
_TRANSIENT_ERRORS = frozenset(
    {
        1040,  # too many connections
        1053,  # server shutdown in progress
        1205,  # lock wait timeout exceeded
        1213,  # deadlock found
        1290,  # --read-only (a failover's read-only window)
        1927,  # connection was killed
        2002,  # can't connect through the socket
        2003,  # can't connect to the server
        2006,  # server has gone away
        2013,  # lost connection during query
        2055,  # lost connection (system error)
        4031,  # disconnected by the server (idle timeout)
    }
)
#: A transaction lost to a concurrent one: running it again may succeed.
_CONFLICT_ERRORS = frozenset({1205, 1213})
#: The statement names a column or table the database lacks (code and schema disagree).
_MISMATCH_ERRORS = frozenset({1054, 1146})
#: The server answers "not now": the URL is right.
_BUSY_ERRORS = frozenset({1040, 1053})
#: InnoDB's own default lock wait (seconds), put back after a short wait.
_DEFAULT_LOCK_WAIT = 50


#: A duplicate key: the message ends with the key's name.
_DUPLICATE_KEY = 1062


def _errno(exc: BaseException | None) -> int | None:
    """The server's error number of a DB-API error (PyMySQL and mysqlclient alike)."""
    orig = getattr(exc, "orig", None) or exc
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int):
        return int(args[0])
    return None


#: alchq's unique_key column on MySQL/MariaDB (see types.key_string).
_KEY_TYPE = "VARCHAR(255) COLLATE utf8mb4_bin"


def _partial_where(index: Index) -> Any:
    """The predicate of an index declared partial for PostgreSQL or SQLite, or None."""
    kwargs = index.dialect_kwargs
    where = kwargs.get("postgresql_where")
    return kwargs.get("sqlite_where") if where is None else where


def _on_a_generated_column(index: Index) -> bool:
    return bool(index.unique) and _partial_where(index) is not None


# MySQL and MariaDB have no partial indexes. A partial *unique* index (one
# PENDING or PROCESSING task per unique_key) becomes a unique index on a
# virtual generated column that holds the key while the predicate holds and
# NULL otherwise (NULLs never collide): the database still decides, and keeps
# it current as a row's status changes. The column takes the index's name.
@compiles(CreateIndex, "mysql")
@compiles(CreateIndex, "mariadb")
def _create_index(create: CreateIndex, compiler: DDLCompiler, **kw: Any) -> str:
    index = create.element
    if not _on_a_generated_column(index):
        return str(compiler.visit_create_index(create, **kw))  # type: ignore[no-untyped-call]
    expressions = list(index.expressions)
    column = expressions[0] if len(expressions) == 1 else None
    if not isinstance(column, Column):
        raise CompileError(
            f"{index.name}: a partial unique index on MySQL/MariaDB must be on one column"
        )
    sql = compiler.sql_compiler
    where = sql.process(_partial_where(index), include_table=False, literal_binds=True)
    value = sql.process(column, include_table=False)
    # Alembic's op.create_index names the columns without their types: then the
    # column is alchq's unique_key (the one partial unique index alchq makes).
    kind = (
        _KEY_TYPE
        if isinstance(column.type, NullType)
        else compiler.dialect.type_compiler_instance.process(column.type)
    )
    name = compiler.preparer.quote(str(index.name))
    table = compiler.preparer.format_table(index.table)  # type: ignore[arg-type]
    return (
        f"ALTER TABLE {table} ADD COLUMN {name} {kind} "
        f"GENERATED ALWAYS AS (CASE WHEN {where} THEN {value} END) VIRTUAL, "
        f"ADD UNIQUE INDEX {name} ({name})"
    )


@compiles(DropIndex, "mysql")
@compiles(DropIndex, "mariadb")
def _drop_index(drop: DropIndex, compiler: DDLCompiler, **kw: Any) -> str:
    index = drop.element
    if not _on_a_generated_column(index):
        return str(compiler.visit_drop_index(drop, **kw))  # type: ignore[no-untyped-call]
    name = compiler.preparer.quote(str(index.name))
    table = compiler.preparer.format_table(index.table)  # type: ignore[arg-type]
    return f"ALTER TABLE {table} DROP INDEX {name}, DROP COLUMN {name}"


#: PostgreSQL's random UUID as a column default (the seed's example model), and
#: the same on MariaDB (a native UUID column) and MySQL (SQLAlchemy's CHAR(32) of hex).
_PG_UUID_DEFAULT = "DEFAULT (gen_random_uuid())"
_UUID_DEFAULTS = {"mariadb": "DEFAULT (uuid())", "mysql": "DEFAULT (replace(uuid(), '-', ''))"}


@compiles(CreateColumn, "mysql")
@compiles(CreateColumn, "mariadb")
def _create_column(create: CreateColumn, compiler: DDLCompiler, **kw: Any) -> str:
    sql = str(compiler.visit_create_column(create, **kw))  # type: ignore[no-untyped-call]
    if _PG_UUID_DEFAULT in sql:
        kind = "mariadb" if is_mariadb(compiler.dialect) else "mysql"
        sql = sql.replace(_PG_UUID_DEFAULT, _UUID_DEFAULTS[kind])
    return sql


def is_mariadb(dialect: Any) -> bool:
    """Is this SQLAlchemy dialect MariaDB's (also behind a mysql:// URL, which
    SQLAlchemy keeps naming mysql once it has found MariaDB)?"""
    return dialect.name == "mariadb" or bool(getattr(dialect, "is_mariadb", False))


def _names_key(exc: IntegrityError, key: str) -> bool:
    """Is ``exc`` a duplicate of the key ``key`` (MySQL 8 writes ``table.key``)?"""
    if _errno(exc) != _DUPLICATE_KEY:
        return False
    message = str(getattr(exc.orig, "args", ("", ""))[-1])
    return message.endswith(f"'{key}'") or message.endswith(f".{key}'")


class MySQLDialect(Dialect):
    name = "mysql"
    skip_locked = True
    returning = False
    partial_index = False
    # REPEATABLE READ (the default) takes gap and next-key locks on the ranges
    # a statement scans: alchq's claims and batches would block each other.
    bookkeeping_isolation = "READ COMMITTED"
    #: The fewest whole seconds innodb_lock_wait_timeout takes (MariaDB: 0, no wait).
    min_lock_wait = 1

    def is_transient(self, exc: BaseException) -> bool:
        if not isinstance(exc, DBAPIError):
            return False
        if exc.connection_invalidated or isinstance(exc, InterfaceError):
            return True
        # Only what the server says is an outage or a lost race: every other
        # OperationalError (an unknown column, access denied) is a fault to report.
        return _errno(exc) in _TRANSIENT_ERRORS

    def is_conflict(self, exc: BaseException) -> bool:
        return _errno(exc) in _CONFLICT_ERRORS

    def is_schema_mismatch(self, exc: BaseException) -> bool:
        return _errno(exc) in _MISMATCH_ERRORS

    def is_read_only(self, exc: BaseException) -> bool:
        return _errno(exc) == 1290

    def server_is_busy(self, exc: BaseException) -> bool:
        return _errno(exc) in _BUSY_ERRORS

    @contextlib.contextmanager
    def short_lock_wait(self, conn: Connection, seconds: float) -> Iterator[None]:
        # Whole seconds only; the session's setting is put back for the pool.
        wait = max(self.min_lock_wait, math.ceil(seconds) if seconds >= 1 else 0)
        conn.exec_driver_sql(f"SET SESSION innodb_lock_wait_timeout = {int(wait)}")
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                conn.exec_driver_sql(f"SET SESSION innodb_lock_wait_timeout = {_DEFAULT_LOCK_WAIT}")

    # No ON CONFLICT for one index (INSERT IGNORE would hide every error, ON
    # DUPLICATE KEY any key's duplicate): a row that may conflict goes in alone,
    # and a duplicate of this key skips it. InnoDB undoes the failed statement
    # only, and waits for a concurrent insert of the same key to commit or roll
    # back. No INSERT ... RETURNING on MySQL: the key comes from the statement.

    def insert_unless_conflict(
        self, conn: Connection, table: Table, rows: Sequence[dict[str, Any]], unique: UniqueKey
    ) -> int:
        free: list[dict[str, Any]] = []
        keyed: list[dict[str, Any]] = []
        for row in rows:
            (keyed if all(row.get(c.key) is not None for c in unique.columns) else free).append(row)
        if free:  # a NULL in the key collides with nothing: together
            conn.execute(table.insert(), free)
        inserted = sum(
            self.insert_one_unless_conflict(conn, table, r, unique) is not None for r in keyed
        )
        return len(free) + inserted

    def insert_one_unless_conflict(
        self, conn: Connection, table: Table, row: dict[str, Any], unique: UniqueKey
    ) -> tuple[Any, ...] | None:
        primary = list(table.primary_key.columns)
        key = "PRIMARY" if list(unique.columns) == primary else unique.name
        try:
            result = conn.execute(table.insert().values(row))
        except IntegrityError as exc:
            if _names_key(exc, key):
                return None
            raise
        return tuple(result.inserted_primary_key or ())

    def backend_id(self, dbapi_connection: Any) -> Any:
        thread_id = getattr(dbapi_connection, "thread_id", None)  # PyMySQL, mysqlclient
        return thread_id() if callable(thread_id) else None

    def waits_for(
        self, engine: Engine, waiting: Any, holders: Sequence[Any], *, writing: bool, wrote: bool
    ) -> bool | None:
        held = [int(h) for h in holders if h is not None]
        if waiting is None or not held:
            return None
        # Asked on a connection of its own: the waiting one is busy waiting. The sys
        # schema's view (MySQL 8, MariaDB 10.6+) needs the PROCESS privilege: without
        # it nothing can be told.
        try:
            with engine.connect() as conn:
                found = conn.execute(
                    text(
                        "SELECT COUNT(*) FROM sys.innodb_lock_waits "
                        "WHERE waiting_pid = :waiting AND blocking_pid IN :held"
                    ).bindparams(bindparam("held", expanding=True)),
                    {"waiting": int(waiting), "held": held},
                ).scalar_one()
        except DBAPIError:
            return None
        return bool(found)

    def epoch_minute(self, moment: ColumnElement[Any]) -> ColumnElement[int]:
        # TIMESTAMPDIFF on the naive UTC DATETIME: UNIX_TIMESTAMP() would read it in
        # the session's time zone.
        return func.timestampdiff(text("MINUTE"), literal_column("'1970-01-01'"), moment)

    def read_latest(self, stmt: Select[Any]) -> Select[Any]:
        # REPEATABLE READ (MySQL's default) reads the transaction's snapshot; a
        # locking read sees the latest committed rows.
        return stmt.with_for_update(read=True)

    def delete_batch(
        self, conn: Connection, table: Table, where: ColumnElement[bool], limit: int
    ) -> int:
        pk_cols = list(table.primary_key.columns)
        pick = select(*pk_cols).where(where).limit(limit).with_for_update(skip_locked=True)
        pks = [tuple(row) for row in conn.execute(pick)]
        if not pks:
            return 0
        # One key per statement: InnoDB scans a small table for an IN list and
        # waits on every row another transaction holds, the skipped ones too.
        # The picked rows are locked by this transaction: all of them go.
        names = [f"alchq_key_{i}" for i in range(len(pk_cols))]
        stmt = delete(table).where(
            *[c == bindparam(n) for c, n in zip(pk_cols, names, strict=True)]
        )
        conn.execute(stmt, [dict(zip(names, pk, strict=True)) for pk in pks])
        return len(pks)


class MariaDBDialect(MySQLDialect):
    name = "mariadb"
    min_lock_wait = 0
