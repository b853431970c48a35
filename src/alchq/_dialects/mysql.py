"""MySQL 8 / MariaDB 10.6: SKIP LOCKED exists, ``UPDATE ... RETURNING`` does not."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

from sqlalchemy import ColumnElement, Connection, Table, bindparam, delete, select
from sqlalchemy.exc import DBAPIError, InterfaceError

from alchq._dialects.base import Dialect

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


def _errno(exc: BaseException | None) -> int | None:
    """The server's error number of a DB-API error (PyMySQL and mysqlclient alike)."""
    orig = getattr(exc, "orig", None) or exc
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int):
        return int(args[0])
    return None


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
