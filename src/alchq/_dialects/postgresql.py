"""PostgreSQL: one ``UPDATE ... WHERE pk IN (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING``."""

from __future__ import annotations

import contextlib
import logging
import select
import socket
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import Connection, Engine, Table, bindparam, event, func, text, tuple_, update
from sqlalchemy import select as select_rows
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.exc import DBAPIError, InterfaceError
from sqlalchemy.sql.dml import Update

from alchq._dialects.base import Claim, Dialect, FinishPlan, on_connect

logger = logging.getLogger("alchq.dialect")

#: TCP settings so that a dead server or a cut network is noticed in about
#: 30 s instead of hanging on the socket forever (Linux option names).
_KEEPALIVE = (
    ("SO_KEEPALIVE", socket.SOL_SOCKET, 1),
    ("TCP_KEEPIDLE", socket.IPPROTO_TCP, 10),
    ("TCP_KEEPINTVL", socket.IPPROTO_TCP, 5),
    ("TCP_KEEPCNT", socket.IPPROTO_TCP, 3),
    ("TCP_USER_TIMEOUT", socket.IPPROTO_TCP, 30_000),  # ms of unacknowledged sends
)


def _set_keepalive(dbapi_connection: Any, _record: Any) -> None:
    """Turn on TCP keepalives on a new connection's socket, whatever its URL said."""
    try:
        fd = dbapi_connection.fileno()
    except Exception:  # not a psycopg-like connection: leave it alone
        return
    sock = socket.socket(fileno=socket.dup(fd))  # a duplicate: closing it keeps the original
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return  # a Unix socket has no network to lose
        for name, level, value in _KEEPALIVE:
            option = getattr(socket, name, None)
            if option is not None:
                sock.setsockopt(level, option, value)
    except OSError as exc:
        logger.debug("could not set TCP keepalive: %s", exc)
    finally:
        sock.close()


def _connect_timeout(dialect: Any, conn_rec: Any, cargs: Any, cparams: dict[str, Any]) -> None:
    """Give up on connecting after 10 s (unless the URL says otherwise): a server that
    does not answer must not hang a worker forever."""
    cparams.setdefault("connect_timeout", 10)


def _read_only_is_a_disconnect(context: Any) -> None:
    """A read-only server (a failover turned it into a replica, or
    default_transaction_read_only) keeps its pooled connections read-only:
    drop them, so the next ones may reach a writable server."""
    if (
        _sqlstate(context.original_exception) == "25006"
        or _sqlstate(context.sqlalchemy_exception) == "25006"
    ):
        context.is_disconnect = True


_BUSY_MESSAGES = (
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "too many clients already",
)


#: SQLSTATEs that mean "the database is (briefly) unable", not "your SQL is wrong".
#: (Class 08, connection exceptions, counts too.)
_TRANSIENT_SQLSTATES = frozenset(
    {
        "25006",  # read_only_sql_transaction: a failover's read-only window
        "57P01",  # admin_shutdown (pg_terminate_backend, fast shutdown)
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now (starting up, in recovery)
        "53300",  # too_many_connections
    }
)
#: A transaction that lost to another one: worth running again.
_CONFLICT_SQLSTATES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
    }
)
#: The statement names what the table does not have.
_MISMATCH_SQLSTATES = frozenset({"42703", "42P01"})  # undefined column, undefined table
#: SQLSTATEs of a server that answers "not now": the URL is right, wait for it.
_BUSY_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300"})


def _sqlstate(exc: BaseException | None) -> str | None:
    orig = getattr(exc, "orig", None) or exc
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return code if isinstance(code, str) else None


def _autocommit(dbapi_connection: Any) -> None:
    if not dbapi_connection.autocommit:  # psycopg 3 and psycopg2 alike
        dbapi_connection.rollback()
        dbapi_connection.autocommit = True


class ArrayFinishPlan(FinishPlan):
    """Several outcomes in one statement whose text does not depend on how many: each
    column's values as one array (``= ANY`` and ``unnest``), so the statement is
    prepared once and planned without a clause per row."""

    def many_statement(self, table: Table, values: dict[str, Any], fence: Sequence[str]) -> Update:
        cols = [*table.primary_key.columns, *(table.c[name] for name in fence)]
        arrays = [bindparam(f"alchq_a{i}", type_=ARRAY(col.type)) for i, col in enumerate(cols)]
        pk = list(table.primary_key.columns)
        key = (
            pk[0] == func.any(arrays[0])
            if len(pk) == 1
            else tuple_(*pk).in_(select_rows(*(func.unnest(a) for a in arrays[: len(pk)])))
        )
        every = tuple_(*cols).in_(select_rows(*(func.unnest(a) for a in arrays)))
        return update(table).where(key).where(every).values(values)

    def many_params(self, rows: Sequence[tuple[Claim, dict[str, Any]]]) -> dict[str, Any]:
        columns = zip(*self.row_values(rows), strict=True)
        return {f"alchq_a{i}": list(column) for i, column in enumerate(columns)}


class PostgreSQLDialect(Dialect):
    name = "postgresql"
    on_conflict_insert = staticmethod(insert)
    # SKIP LOCKED lets any number of workers pick different rows without
    # waiting on each other; RETURNING makes the claim one round trip.
    skip_locked = True
    returning = True
    partial_index = True
    # Under a default of REPEATABLE READ or SERIALIZABLE, concurrent claims (and
    # any write to a row another transaction changed) fail with a serialization
    # error; alchq's own short transactions need none of that.
    bookkeeping_isolation = "READ COMMITTED"

    def prepare_engine(self, engine: Engine) -> None:
        on_connect(engine, _set_keepalive)
        if not event.contains(engine, "handle_error", _read_only_is_a_disconnect):
            event.listen(engine, "handle_error", _read_only_is_a_disconnect)
        if not event.contains(engine, "do_connect", _connect_timeout):
            event.listen(engine, "do_connect", _connect_timeout)

    def finish_plan(self, table: Table, values: dict[str, Any], fence: Sequence[str]) -> FinishPlan:
        return ArrayFinishPlan(table, values, fence)

    def server_is_busy(self, exc: BaseException) -> bool:
        # Errors while connecting carry no SQLSTATE in psycopg: read the message.
        text = str(getattr(exc, "orig", exc)).lower()
        return _sqlstate(exc) in _BUSY_SQLSTATES or any(m in text for m in _BUSY_MESSAGES)

    def is_transient(self, exc: BaseException) -> bool:
        if not isinstance(exc, DBAPIError):
            return False
        if exc.connection_invalidated or isinstance(exc, InterfaceError):
            return True
        code = _sqlstate(exc)
        if code is not None:
            return code.startswith("08") or code in _TRANSIENT_SQLSTATES
        return super().is_transient(exc)

    def is_conflict(self, exc: BaseException) -> bool:
        return _sqlstate(exc) in _CONFLICT_SQLSTATES

    def is_aborted_transaction(self, exc: BaseException) -> bool:
        return _sqlstate(exc) == "25P02"  # in_failed_sql_transaction

    def is_schema_mismatch(self, exc: BaseException) -> bool:
        return _sqlstate(exc) in _MISMATCH_SQLSTATES

    listens = True

    def listen(self, dbapi_connection: Any, channel: str) -> Any:
        _autocommit(dbapi_connection)  # notifications arrive only outside a transaction
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f'LISTEN "{channel}"')
        finally:
            cursor.close()
        return self.backend_id(dbapi_connection)

    def notify(self, dbapi_connection: Any, channel: str, payloads: Sequence[str]) -> None:
        _autocommit(dbapi_connection)  # each NOTIFY is sent at once
        cursor = dbapi_connection.cursor()
        try:
            for payload in payloads:
                cursor.execute("SELECT pg_notify(%s, %s)", (channel, payload))
        finally:
            cursor.close()

    def notifications(self, dbapi_connection: Any, timeout: float) -> list[str]:
        notifies = getattr(dbapi_connection, "notifies", None)
        if callable(notifies):  # psycopg 3: a generator, here ending at the first one
            return [n.payload for n in notifies(timeout=timeout, stop_after=1)]
        # psycopg2: wait for the socket, then read what arrived.
        if select.select([dbapi_connection], [], [], timeout)[0]:
            dbapi_connection.poll()
        received = [n.payload for n in dbapi_connection.notifies]
        dbapi_connection.notifies.clear()
        return received

    def backend_id(self, dbapi_connection: Any) -> Any:
        info = getattr(dbapi_connection, "info", None)  # psycopg 3
        if info is not None and hasattr(info, "backend_pid"):
            return info.backend_pid
        get = getattr(dbapi_connection, "get_backend_pid", None)  # psycopg2
        return get() if callable(get) else None

    def waits_for(
        self, engine: Engine, waiting: Any, holders: Sequence[Any], *, writing: bool, wrote: bool
    ) -> bool | None:
        if waiting is None or not any(h is not None for h in holders):
            return None
        # Asked on a connection of its own: the waiting one is busy waiting.
        with engine.connect() as conn:
            blockers = conn.execute(
                text("SELECT pg_blocking_pids(:pid)"), {"pid": int(waiting)}
            ).scalar_one()
        return bool(set(blockers or ()) & {h for h in holders if h is not None})

    def is_read_only(self, exc: BaseException) -> bool:
        return _sqlstate(exc) == "25006"

    @contextlib.contextmanager
    def short_lock_wait(self, conn: Connection, seconds: float) -> Iterator[None]:
        # SET LOCAL ends with the transaction: the pooled connection is unchanged.
        conn.exec_driver_sql(f"SET LOCAL lock_timeout = {int(seconds * 1000)}")
        yield
