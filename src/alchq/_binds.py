"""Where each model's rows live: its table, engine, dialect and the session's connection.

One :class:`Binds` per worker (and per scheduler, pruner or pool) caches the
:class:`~alchq._dialects.Dialect` of each engine it meets, prepares each engine
once (connect-time settings, the run watch), classifies database errors, and
turns a failed first contact into a clear one-line error.
"""

from __future__ import annotations

import logging

from sqlalchemy import Connection, Engine, inspect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from alchq import _tracking
from alchq._dialects import Dialect, dialect_for
from alchq._sessions import SessionSource
from alchq._util import first_line, remember_secrets, safe_url
from alchq.exceptions import DatabaseUnreachableError, TableMissingError
from alchq.model import BaseQueue, metadata, task_table

logger = logging.getLogger("alchq.worker")


class Outage:
    """Backing off while the database is away: 0.5, 1, 2... s up to ``cap``, logged once."""

    def __init__(self, cap: float) -> None:
        self.cap = cap
        self.failures = 0

    def failed(self, exc: BaseException) -> float:
        """Count a failed attempt and log it; the seconds to wait before the next."""
        self.failures += 1
        delay: float = min(self.cap, 0.25 * 2.0**self.failures)
        log = logger.warning if self.failures == 1 else logger.debug
        log("database unavailable, retrying in %.1fs: %s", delay, first_line(exc))
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
            level = self.dialect(self.engine(session, model)).bookkeeping_isolation
            if level is not None:
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
        return missing if missing is not None else exc
