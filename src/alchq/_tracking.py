"""What a run does with its task's own session and database connection.

The worker must know, without guessing from exception types:

- whether run() sent statements through the task's session since its last
  commit: a lost connection takes those uncommitted writes with it, so the
  task must run again rather than be recorded PROCESSED;
- whether a database error came from the task's own database (the engine the
  worker serves the task from: its session, or a connection run() took from
  that engine), and whether a connection to it was lost: only that can be the
  database being away; an error from any other database is the task's failure;
- whether run() committed, or threw away uncommitted changes (a rollback, a
  closed session);
- which statements run() sent through *other* connections to the same database
  are still waiting, and since when: one waiting on a lock the task's own
  session holds waits for ever (see alchq._selfwait);
- in a batch, the moment run() is about to send its first statement through its
  session (a flush, a query, a statement on the session's connection): its
  SAVEPOINT begins then, so a run that sends nothing costs no SAVEPOINT, not
  even SQLAlchemy's bookkeeping of an unsent one.

Engine and session listeners, installed once, feed the :class:`RunWatch` of
the run in progress in this context (a ContextVar); outside a run they do
nothing.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction

_current: ContextVar[RunWatch | None] = ContextVar("alchq_run_watch", default=None)


#: The first words of statements that do not write.
_READS = ("SELECT", "SHOW", "EXPLAIN", "PRAGMA", "VALUES")


def writes(statement: str) -> bool:
    """Whether a statement may write (anything but a plain read)."""
    return not statement.lstrip(" \t\n(")[:8].upper().startswith(_READS)


@dataclass
class Waiting:
    """A statement in flight on a connection other than the task's session's."""

    since: float
    engine: Engine
    #: The database's id of its connection (PostgreSQL: the backend pid), or None.
    backend: Any
    writing: bool
    #: The self-wait check looked at it already.
    checked: bool = False


class RunWatch:
    """Watches one run of one task in ``session`` (a context manager)."""

    def __init__(
        self,
        session: Session,
        engine: Engine,
        dbapi_connection: Any,
        backend_id: Callable[[Any], Any] = lambda dbapi: None,
    ) -> None:
        self.session = session
        self.engine = engine
        self.backend_id = backend_id
        #: DB-API connections the session used during the run.
        self.connections: list[Any] = [dbapi_connection]
        #: Their ids on the database (see ``backend_id``).
        self.backends: list[Any] = [backend_id(dbapi_connection)]
        #: Statements sent through them since the session's last commit.
        self.statements = 0
        #: Of those, statements that may have written (and so hold locks).
        self.writes = 0
        #: Statements in flight on other connections to the task's database.
        self.waiting: dict[int, Waiting] = {}
        #: A self-wait was reported for this run (once is enough).
        self.reported = False
        #: run() committed the session itself.
        self.committed = False
        #: Uncommitted statements were thrown away by a rollback or close.
        self.discarded = 0
        #: Called once, before run()'s first write through another connection to
        #: the task's database (a batch commits its outcomes then).
        self.before_write_elsewhere: Callable[[], None] | None = None
        #: Called once, just before run()'s first statement through its session
        #: (a batch begins the task's SAVEPOINT then); what it returns is kept in
        #: :attr:`savepoint`.
        self.before_first_statement: Callable[[], SessionTransaction] | None = None
        self.savepoint: SessionTransaction | None = None
        #: Errors that lost a connection to the task's database.
        self.disconnects: list[BaseException] = []
        #: Database errors raised on connections to the task's database, newest last.
        self.errors: list[BaseException] = []
        self._token: Any = None

    def owns(self, exc: BaseException) -> bool:
        """Was ``exc`` (or an error it was raised from) raised on the task's own database?"""
        seen: set[int] = set()
        node: BaseException | None = exc
        while node is not None and id(node) not in seen:
            if any(node is e for e in self.errors):
                return True
            seen.add(id(node))
            node = node.__cause__ or node.__context__
        return False

    def __enter__(self) -> RunWatch:
        self._token = _current.set(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _current.reset(self._token)


def _dbapi(connection: Any) -> Any:
    try:
        return connection.connection.dbapi_connection
    except Exception:  # already invalidated or closed
        return None


def _same_database(engine: Engine, watch: RunWatch) -> bool:
    """The task's database, maybe through an engine of run()'s own (another driver)."""
    if engine is watch.engine:
        return True
    mine, theirs = engine.url, watch.engine.url
    return (mine.get_backend_name(), mine.host, mine.port, mine.database) == (
        theirs.get_backend_name(),
        theirs.host,
        theirs.port,
        theirs.database,
    )


def _on_statement(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
    """Every engine's statements (one listener, a ContextVar lookup outside a run):
    those of the task's session are counted; one of run()'s on another connection to
    the task's database is noted as in flight until it is done."""
    watch = _current.get()
    if watch is None:
        return
    dbapi = _dbapi(conn)
    if dbapi is None:
        return
    if dbapi in watch.connections:
        if conn.engine not in _installed:
            return
        watch.statements += 1
        if writes(statement):
            watch.writes += 1
    elif _same_database(conn.engine, watch):
        writing = writes(statement)
        if writing and watch.before_write_elsewhere is not None:
            hook, watch.before_write_elsewhere = watch.before_write_elsewhere, None
            hook()
        watch.waiting[id(cursor)] = Waiting(
            time.monotonic(), conn.engine, watch.backend_id(dbapi), writing
        )


def _first_statement(watch: RunWatch) -> None:
    hook, watch.before_first_statement = watch.before_first_statement, None
    if hook is not None:
        watch.savepoint = hook()


def _first_statement_flushed(watch: RunWatch) -> None:
    """:func:`_first_statement`, outside a flush: begin_nested() would flush what the
    session holds unflushed (run() in ``no_autoflush``) *before* its SAVEPOINT; a
    flush first begins it (see :func:`_on_flush`) and puts those writes inside."""
    session = watch.session
    if session.new or session.dirty or session.deleted:
        session.flush()
    if watch.before_first_statement is not None:
        _first_statement(watch)


def _on_flush(session: Session, *args: Any) -> None:
    """Before a flush of the run's session writes anything (and before the flush's own
    transaction begins, so that it begins inside the SAVEPOINT)."""
    watch = _current.get()
    if watch is not None and watch.before_first_statement is not None and session is watch.session:
        _first_statement(watch)


def _on_orm_execute(state: ORMExecuteState) -> None:
    """Before a statement of the run's session picks its connection (after its autoflush)."""
    watch = _current.get()
    if (
        watch is not None
        and watch.before_first_statement is not None
        and state.session is watch.session
    ):
        _first_statement_flushed(watch)


def _on_execute(conn: Any, *args: Any) -> None:
    """Before any statement on the session's connection that neither of the above saw
    (run() used ``session.connection()`` directly): the SAVEPOINT goes first."""
    watch = _current.get()
    if watch is None or watch.before_first_statement is None:
        return
    dbapi = _dbapi(conn)
    if dbapi is not None and dbapi in watch.connections and conn.engine in _installed:
        _first_statement_flushed(watch)
        if watch.savepoint is not None:
            # run() holds the connection already: the session would not ask for
            # it again, so the SAVEPOINT is sent now, before the statement.
            watch.session.connection(bind_arguments={"bind": watch.engine})


def _on_any_statement_done(conn: Any, cursor: Any, *args: Any) -> None:
    watch = _current.get()
    if watch is not None and watch.waiting:
        watch.waiting.pop(id(cursor), None)


def _on_any_error(context: ExceptionContext) -> None:
    watch = _current.get()
    # ``cursor`` is a slot SQLAlchemy leaves unset when there was no cursor yet.
    cursor = getattr(context, "cursor", None)
    if watch is not None and watch.waiting and cursor is not None:
        watch.waiting.pop(id(cursor), None)


def _on_error(context: ExceptionContext) -> None:
    watch = _current.get()
    if watch is None or context.engine is not watch.engine:
        return
    if context.sqlalchemy_exception is not None:
        watch.errors.append(context.sqlalchemy_exception)
    watch.errors.append(context.original_exception)
    if context.is_disconnect:
        watch.disconnects.append(context.original_exception)


def _on_begin(session: Session, transaction: Any, connection: Any) -> None:
    watch = _current.get()
    if watch is not None and session is watch.session:
        dbapi = _dbapi(connection)
        if dbapi is not None and dbapi not in watch.connections:
            watch.connections.append(dbapi)
            watch.backends.append(watch.backend_id(dbapi))


def _on_commit(session: Session) -> None:
    watch = _current.get()
    if watch is not None and session is watch.session:
        watch.committed = True
        watch.statements = 0
        watch.writes = 0


def _on_rollback(session: Session) -> None:
    watch = _current.get()
    if watch is not None and session is watch.session and watch.statements:
        watch.discarded += watch.statements
        watch.statements = 0
        watch.writes = 0


#: The engines the worker serves tasks from (their session statements are counted).
_installed: weakref.WeakSet[Engine] = weakref.WeakSet()


def install(engine: Engine) -> None:
    """Watch ``engine``'s statements and errors (once per engine)."""
    _installed.add(engine)
    if not event.contains(engine, "handle_error", _on_error):
        event.listen(engine, "handle_error", _on_error)


# Every engine's statements (see _on_statement).
if not event.contains(Engine, "before_cursor_execute", _on_statement):
    event.listen(Engine, "before_execute", _on_execute)
    event.listen(Engine, "before_cursor_execute", _on_statement)
    event.listen(Engine, "after_cursor_execute", _on_any_statement_done)
    event.listen(Engine, "handle_error", _on_any_error)

# Session events are class-wide: they cost a ContextVar lookup per event and
# act only for the session of the run in progress.
if not event.contains(Session, "after_begin", _on_begin):
    event.listen(Session, "after_begin", _on_begin)
    event.listen(Session, "after_commit", _on_commit)
    event.listen(Session, "after_rollback", _on_rollback)
    event.listen(Session, "before_flush", _on_flush)
    event.listen(Session, "do_orm_execute", _on_orm_execute)
