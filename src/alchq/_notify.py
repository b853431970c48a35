"""Wake-ups: an idle worker hears of new tasks at once, not at its next poll.

Sending needs no call from the app. Session events note the task tables a
transaction inserted into (``after_flush``) and, only once it has committed,
pass them on:

- to the workers of this process waiting for those tables (any database);
- on PostgreSQL, to a sender thread that runs ``NOTIFY`` on a connection of
  its own. It coalesces: while one NOTIFY is in flight, the tables committed
  meanwhile wait for the next. So the lock PostgreSQL takes at the commit of a
  notifying transaction is never in the app's commit, and heavy enqueue
  traffic sends at most one NOTIFY per 50 ms per process (see _Sender).

Receiving, on PostgreSQL: a :class:`Listener` thread per worker runs
``LISTEN`` on a connection of its own and wakes the worker's waiter when a
table it serves is named; it reconnects by itself. Polling stays the
fallback for everything a notification can miss (an insert by another
program, a lost connection, PgBouncer in transaction mode).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import Connection, Engine, Table, event, inspect
from sqlalchemy.orm import Session

from alchq._dialects import Dialect, dialect_for
from alchq._util import first_line, helper_thread

logger = logging.getLogger("alchq.worker")

#: The PostgreSQL channel; the payload is the task table's name.
CHANNEL = "alchq"

_OFF = ("0", "off", "false", "no")


def enabled() -> bool:
    """``ALCHQ_NOTIFY`` (default on): off, committing processes send no NOTIFY and
    workers do not LISTEN (they poll). In-process wake-ups stay on."""
    return os.environ.get("ALCHQ_NOTIFY", "on").strip().lower() not in _OFF


def table_key(table: Table) -> str:
    """How a notification names a table: ``schema.name``, or ``name``."""
    return f"{table.schema}.{table.name}" if table.schema else table.name


# -- waiters in this process ----------------------------------------------------

_local_lock = threading.Lock()
_local: dict[str, weakref.WeakSet[Any]] = {}


def subscribe(tables: Iterable[str], waiter: Any) -> None:
    """Wake ``waiter`` (it has ``wake()``) when this process commits tasks into ``tables``."""
    with _local_lock:
        for key in tables:
            _local.setdefault(key, weakref.WeakSet()).add(waiter)


def unsubscribe(tables: Iterable[str], waiter: Any) -> None:
    with _local_lock:
        for key in tables:
            _local.get(key, weakref.WeakSet()).discard(waiter)


def _wake_local(tables: Iterable[str]) -> None:
    with _local_lock:
        waiters = {w for key in tables for w in _local.get(key, ())}
    for waiter in waiters:
        waiter.wake()


# -- sending ----------------------------------------------------------------------


#: Seconds between two NOTIFYs of one process (see _Sender).
GAP = 0.05


class _Sender:
    """The process's NOTIFY thread: one NOTIFY in flight at a time, tables merged."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: dict[int, tuple[Engine, set[str]]] = {}
        self._pid = -1
        self._thread: threading.Thread | None = None
        #: Waiting for work, not pausing between two NOTIFYs.
        self._idle = True
        #: Its own connection per engine (see _own_connection).
        self._connections: weakref.WeakKeyDictionary[Engine, Any] = weakref.WeakKeyDictionary()

    def send(self, engine: Engine, tables: set[str]) -> None:
        with self._cond:
            _, queued = self._pending.setdefault(id(engine), (engine, set()))
            queued |= tables
            if self._pid != os.getpid() or self._thread is None:
                # First use, or a forked child (threads do not survive a fork;
                # the parent's connections are not the child's to use).
                self._pid = os.getpid()
                self._idle = True
                self._connections = weakref.WeakKeyDictionary()
                self._thread = helper_thread(self._main, "alchq-notify")
            if self._idle:  # pausing, it takes what is pending when the pause ends
                self._cond.notify()

    def _main(self) -> None:
        last = -GAP
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                # At most one NOTIFY per GAP: the first of a burst goes at once
                # (an idle worker starts it within milliseconds), the rest of the
                # burst is merged into one at the end of the gap (busy workers do
                # not wait for notifications anyway).
                self._idle = False
                while (pause := last + GAP - time.monotonic()) > 0:
                    self._cond.wait(pause)
                batch, self._pending = self._pending, {}
                self._idle = True
            last = time.monotonic()
            for engine, tables in batch.values():
                try:
                    self._notify(engine, sorted(tables))
                except Exception as exc:  # a missed wake-up: the workers' poll covers it
                    logger.debug("could not notify workers of new tasks: %s", first_line(exc))

    def _notify(self, engine: Engine, tables: list[str]) -> None:
        for attempt in (1, 2):
            dbapi = self._connections.get(engine)
            if dbapi is None:
                dbapi = self._connections[engine] = _own_connection(engine)
            try:
                dialect_for(engine).notify(dbapi, CHANNEL, tables)
                return
            except Exception:
                self._connections.pop(engine, None)
                with contextlib.suppress(Exception):
                    dbapi.close()
                if attempt == 2:
                    raise


def _own_connection(engine: Engine) -> Any:
    """A DB-API connection of the sender's own (autocommit), closed with its engine.

    Not the engine's pool: an app that drops an engine leaves no open
    connection behind in a pool nobody holds.
    """
    raw = engine.raw_connection()
    raw.detach()
    dbapi = raw.dbapi_connection
    assert dbapi is not None
    weakref.finalize(engine, _close_quietly, dbapi, os.getpid())
    return dbapi


def _close_quietly(dbapi: Any, pid: int) -> None:
    # Not in a forked child: closing would end the parent's session on the server.
    if os.getpid() == pid:
        with contextlib.suppress(Exception):
            dbapi.close()


_sender = _Sender()

#: Where a session keeps the task tables its transaction inserted into.
_INFO_KEY = "alchq_new_tasks"


def note_insert(session: Session, table: Table, engine: Engine | Connection) -> None:
    """Record that ``session``'s transaction inserted tasks into ``table``."""
    real = engine.engine if isinstance(engine, Connection) else engine
    session.info.setdefault(_INFO_KEY, {})[table_key(table)] = real


def _after_flush(session: Session, _context: Any) -> None:
    for obj in session.new:
        # BaseQueue's marker (this module is below alchq.model: no import of it).
        if getattr(obj, "__alchq_base__", False):
            mapper = inspect(obj).mapper
            table = mapper.local_table
            if isinstance(table, Table):
                note_insert(session, table, session.get_bind(mapper=mapper))


def _after_commit(session: Session) -> None:
    new: dict[str, Engine] | None = session.info.pop(_INFO_KEY, None)
    if not new:
        return
    _wake_local(new)
    by_engine: dict[int, tuple[Engine, set[str]]] = {}
    for key, engine in new.items():
        if dialect_for(engine).listens:
            by_engine.setdefault(id(engine), (engine, set()))[1].add(key)
    if by_engine and enabled():
        for engine, tables in by_engine.values():
            _sender.send(engine, tables)


def _after_rollback(session: Session) -> None:
    if not session.in_transaction():
        session.info.pop(_INFO_KEY, None)


if not event.contains(Session, "after_flush", _after_flush):
    event.listen(Session, "after_flush", _after_flush)
    event.listen(Session, "after_commit", _after_commit)
    event.listen(Session, "after_rollback", _after_rollback)


# -- receiving --------------------------------------------------------------------


class Listener:
    """A worker's listening thread on one engine (PostgreSQL): ``wake()`` for its tables."""

    def __init__(
        self, engine: Engine, tables: set[str], wake: Callable[[], None], dialect: Dialect
    ) -> None:
        self.engine = engine
        self.tables = tables
        self._wake = wake
        self._dialect = dialect
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: The backend pid of the listening connection, while there is one (tests).
        self.backend_pid: int | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = helper_thread(self._main, "alchq-listen")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=3)
        self._thread = None

    def _main(self) -> None:
        backoff, failing, connected_before = 0.5, False, False
        while not self._stop.is_set():
            try:
                raw = self.engine.raw_connection()
                raw.detach()  # closed below, never handed back to the pool
                try:
                    dbapi = raw.dbapi_connection
                    assert dbapi is not None
                    self.backend_pid = self._dialect.listen(dbapi, CHANNEL)
                    if connected_before:
                        self._wake()  # tasks may have come while it was away
                    connected_before, backoff = True, 0.5
                    if failing:
                        logger.info("listening for new tasks again")
                        failing = False
                    while not self._stop.is_set():
                        received = self._dialect.notifications(dbapi, 0.5)
                        if any(p in self.tables for p in received):
                            self._wake()
                finally:
                    with contextlib.suppress(Exception):
                        raw.close()
            except Exception as exc:
                self.backend_pid = None
                if not failing:
                    logger.debug(
                        "not listening for new tasks (polling meanwhile): %s", first_line(exc)
                    )
                failing = True
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
