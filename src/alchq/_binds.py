"""Where each model's rows live: its table, engine, dialect and the session's connection.

One :class:`Binds` per worker (and per scheduler, pruner or pool) caches the
:class:`~alchq._dialects.Dialect` of each engine it meets, prepares each engine
once (connect-time settings, the run watch), classifies database errors, and
turns a failed first contact into a clear one-line error.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

from sqlalchemy import Connection, Engine, inspect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from alchq import _tracking
from alchq._dialects import Dialect, dialect_for
from alchq._sessions import SessionSource
from alchq._util import first_line, remember_secrets, safe_url
from alchq.exceptions import DatabaseError, DatabaseUnreachableError, TableMissingError
from alchq.model import BaseQueue, metadata, task_table

logger = logging.getLogger("alchq.worker")


#: While the database stays unusable, the worker says so again this often (seconds).
REMIND_EVERY = 60.0


class Outage:
    """Backing off while the database is unusable: 0.5, 1, 2... s up to ``cap``.

    Logged in one line when it starts, again every :data:`REMIND_EVERY` seconds
    while it lasts (a read-only database could otherwise wait in silence
    forever), and in debug in between.
    """

    def __init__(self, cap: float, binds: Binds | None = None) -> None:
        self.cap = cap
        self.binds = binds
        self.failures = 0
        self._since = 0.0
        self._reminded = 0.0

    def failed(self, exc: BaseException) -> float:
        """Count a failed attempt and log it; the seconds to wait before the next."""
        now = time.monotonic()
        self.failures += 1
        if self.failures == 1:
            self._since = self._reminded = now
        delay: float = min(self.cap, 0.25 * 2.0**self.failures)
        dialect = (self.binds.any_dialect() if self.binds is not None else None) or Dialect()
        if dialect.is_read_only(exc):
            what = (
                "the database is read-only (a replica, or a failover in progress): "
                "nothing can be claimed"
            )
        elif isinstance(exc, DBAPIError) and not (
            exc.connection_invalidated or dialect.is_transient(exc)
        ):
            what = "the database refuses the worker's statements"
        else:
            what = "database unavailable"
        if self.failures == 1:
            logger.warning("%s, retrying in %.1fs: %s", what, delay, first_line(exc))
        elif now - self._reminded >= REMIND_EVERY:
            self._reminded = now
            logger.warning(
                "%s for %.0fs now, still retrying: %s", what, now - self._since, first_line(exc)
            )
        else:
            logger.debug("%s, retrying in %.1fs: %s", what, delay, first_line(exc))
        return delay

    def over(self) -> bool:
        """Reset after a success; True if there had been failures."""
        was, self.failures = self.failures, 0
        return was > 0


def engine_of(session: Session, model: type[BaseQueue]) -> Engine:
    """The engine ``session`` uses for ``model``'s table."""
    bind = session.get_bind(mapper=inspect(model))
    return bind if isinstance(bind, Engine) else bind.engine


def table_missing(model: type[BaseQueue], engine: Engine, command: str) -> TableMissingError | None:
    """A TableMissingError saying how to create ``model``'s table, if it does not exist.

    ``command`` is the command line that would create it (``alchq`` or ``flask alchq``).
    """
    table = task_table(model)
    try:
        exists = inspect(engine).has_table(table.name, schema=table.schema)
    except DBAPIError:
        exists = True  # unreachable: the original error says what matters
    if exists:
        return None
    if table.metadata is metadata:
        how = (
            f"`{command} create-tables {model.__module__}:{model.__qualname__}`"
            " or alchq.metadata.create_all(engine)"
        )
    else:
        how = "your app's metadata.create_all() (db.create_all()) or an Alembic migration"
    return TableMissingError(
        f"table {table.name!r} for {model.__name__} does not exist in "
        f"{safe_url(engine)}: create it with {how}"
    )


class Binds:
    """Tables, engines and dialects of the models one worker serves."""

    def __init__(self, source: SessionSource) -> None:
        self.source = source
        self._dialects: dict[Engine, Dialect] = {}
        #: Has any statement of ours reached the database yet? Before that, an
        #: unreachable server is most likely a wrong URL rather than an outage.
        self.connected = False

    def engine(self, session: Session, model: type[BaseQueue]) -> Engine:
        return engine_of(session, model)

    def connection(
        self, session: Session, model: type[BaseQueue], *, bookkeeping: bool = False
    ) -> Connection:
        """The session's connection for ``model`` (begins its transaction if none).

        ``bookkeeping``: a transaction of alchq's own (a claim, a rescue, an
        outcome written apart from run()): it gets the dialect's isolation level
        when it begins here.
        """
        mapper = inspect(model)
        if bookkeeping and not session.in_transaction():
            engine = self.engine(session, model)
            level = self.dialect(engine).bookkeeping_isolation
            if level is not None:
                with _driver_errors(engine):
                    return session.connection(
                        bind_arguments={"mapper": mapper},
                        execution_options={"isolation_level": level},
                    )
        return session.connection(bind_arguments={"mapper": mapper})

    def connect(self, engine: Engine) -> Connection:
        """A connection of alchq's own on ``engine``, at the bookkeeping isolation level."""
        conn = engine.connect()
        level = self.dialect(engine).bookkeeping_isolation
        if level is not None:
            with _driver_errors(engine):
                conn.execution_options(isolation_level=level)
        return conn

    def dialect(self, engine: Engine) -> Dialect:
        """The engine's dialect; the first call prepares the engine."""
        dialect = self._dialects.get(engine)
        if dialect is None:
            dialect = self._dialects[engine] = dialect_for(engine)
            dialect.prepare_engine(engine)
            _tracking.install(engine)
            remember_secrets(engine.url)
        return dialect

    def dialect_of(self, session: Session, model: type[BaseQueue]) -> Dialect:
        return self.dialect(self.engine(session, model))

    def any_dialect(self) -> Dialect | None:
        """The dialect of the (first) engine in use, once one is."""
        return next(iter(self._dialects.values()), None)

    def reachable(self, engine: Engine) -> bool:
        """Does the database answer a fresh connection right now?"""
        try:
            with self.connect(engine) as conn:
                conn.exec_driver_sql("SELECT 1")
        except DBAPIError:
            return False
        return True

    def is_transient(self, exc: BaseException) -> bool:
        """Is ``exc`` the database being away, by the rules of any engine in use?"""
        if isinstance(exc, DatabaseUnreachableError):
            return True
        dialects = list(self._dialects.values()) or [Dialect()]
        return any(d.is_transient(exc) for d in dialects)

    def diagnose(self, exc: DBAPIError, model: type[BaseQueue], engine: Engine) -> Exception:
        """Turn a failed claim into a clear error: unreachable, table missing, or as is."""
        dialect = self.dialect(engine)
        if dialect.is_transient(exc):
            try:
                with engine.connect() as conn:
                    conn.exec_driver_sql("SELECT 1")
            except DBAPIError as again:
                if self.connected or dialect.server_is_busy(again):
                    return again
                return DatabaseUnreachableError(
                    f"cannot reach the database {safe_url(engine)}: {first_line(again)}"
                )
            return exc
        command = "flask alchq" if self.source.scoped is not None else "alchq"
        missing = table_missing(model, engine, command)
        if missing is not None:
            return missing
        if self.connected:
            return exc
        # At the first contact: one clear line instead of a traceback.
        return DatabaseError(f"{refusal(dialect, exc)} in {safe_url(engine)}: {first_line(exc)}")


@contextlib.contextmanager
def _driver_errors(engine: Engine) -> Iterator[None]:
    """Driver errors as SQLAlchemy's DBAPIError, as every statement's are.

    Setting a connection's isolation level is a statement on MySQL, sent by
    SQLAlchemy outside its error handling: a server going away there raised the
    driver's own error, which nothing expected, and the worker died.
    """
    dbapi = engine.dialect.loaded_dbapi
    try:
        yield
    except dbapi.Error as exc:
        wrapped = DBAPIError.instance(
            None, None, exc, dbapi.Error, dialect=engine.dialect, connection_invalidated=True
        )
        raise wrapped from exc


def refusal(dialect: Dialect, exc: BaseException) -> str:
    """Why the database refuses the worker's statements, in a few words."""
    text = str(getattr(exc, "orig", exc)).lower()
    if dialect.is_read_only(exc):
        return "the database is read-only (a read-only URL or file, or a replica)"
    if "not a database" in text:
        return "the file is not a database"
    if "permission denied" in text or "insufficient privilege" in text:
        return "the database user may not change the task table"
    if dialect.is_schema_mismatch(exc):
        return "the table does not match the model (a migration missing?)"
    return "the database refused the worker's statements"
