"""PostgreSQL: one ``UPDATE ... WHERE pk IN (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING``."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError, InterfaceError

from alchq._dialects.base import Dialect, on_connect

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


_BUSY_MESSAGES = (
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "too many clients already",
)


#: SQLSTATEs that mean "the database is (briefly) unable", not "your SQL is wrong".
_TRANSIENT_SQLSTATES = frozenset(
    {
        "25006",  # read_only_sql_transaction: a failover's read-only window
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "55P03",  # lock_not_available (lock_timeout)
        "57014",  # query_canceled (statement_timeout)
        "57P01",  # admin_shutdown (pg_terminate_backend, fast shutdown)
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now (starting up, in recovery)
        "53300",  # too_many_connections
    }
)
#: SQLSTATEs of a server that answers "not now": the URL is right, wait for it.
_BUSY_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300"})


def _sqlstate(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", None)
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return code if isinstance(code, str) else None


class PostgreSQLDialect(Dialect):
    name = "postgresql"
    on_conflict_insert = staticmethod(insert)
    # SKIP LOCKED lets any number of workers pick different rows without
    # waiting on each other; RETURNING makes the claim one round trip.
    skip_locked = True
    returning = True
    partial_index = True

    def prepare_engine(self, engine: Engine) -> None:
        on_connect(engine, _set_keepalive)

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

    @contextlib.contextmanager
    def short_lock_wait(self, conn: Connection, seconds: float) -> Iterator[None]:
        # SET LOCAL ends with the transaction: the pooled connection is unchanged.
        conn.exec_driver_sql(f"SET LOCAL lock_timeout = {int(seconds * 1000)}")
        yield
