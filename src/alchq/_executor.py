"""Runs one claimed task and says how it ended, as an :class:`~alchq._outcome.Outcome`.

The executor loads the task in its session, calls ``run()`` and flushes what
run() changed. It never commits and never records: the recorder does, with the
outcome this returns on every path. How a run that raised ends is decided from
what is known, not guessed from the exception's type:

- a database error raised on the task's *own* connection that is the database
  being away (a lost connection, a read-only window) is not the task's fault:
  the task goes back to PENDING once the database is back, counting nothing;
- but a lost connection while the database is up (a server-side timeout, a
  killed backend) counts as a lost claim, so a task that keeps losing it ends;
- anything else run() raises, from any other connection too, is the task's
  failure: counted, retried by the model's policy, or ERROR and error().
"""

from __future__ import annotations

import contextlib
import logging
import traceback
from collections.abc import Callable
from typing import Any

from sqlalchemy import inspect, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, SessionTransaction

from alchq import _progress, _text, events
from alchq._binds import Binds
from alchq._held import Held, WorkerShutdown
from alchq._outcome import PROCESSED, Kind, Outcome, Ran, failed, lost_connection
from alchq._reporter import Reporter
from alchq._tracking import RunWatch
from alchq.config import Settings
from alchq.exceptions import TaskCancelled, TaskFailure, TaskTimeoutError
from alchq.model import MAX_COUNTER, BaseQueue, key_text, task_table

logger = logging.getLogger("alchq.worker")


class Executor:
    """Runs tasks in the sessions it is given."""

    def __init__(
        self,
        binds: Binds,
        settings: Settings,
        commit_early: Callable[[Held, str], None],
        reporter: Reporter | None = None,
    ) -> None:
        self.binds = binds
        self.settings = settings
        #: Where run()'s alchq_progress() goes; it also looks for cancel requests.
        self.reporter = reporter
        #: The recorder's: commit the batch now; the model's tasks no longer share
        #: transactions (held, why).
        self.commit_early = commit_early

    def preload(
        self, session: Session, model: type[BaseQueue], helds: list[Held]
    ) -> dict[Any, BaseQueue]:
        """Load a batch's tasks in one SELECT, by key; {} if any of them cannot be
        loaded (each is then loaded, and fails, on its own)."""
        table = task_table(model)
        pk_cols = list(table.primary_key.columns)
        if len(pk_cols) != 1 or len(helds) < 2:
            return {}
        try:
            stmt = select(model).where(pk_cols[0].in_([h.claim.pk[0] for h in helds]))
            tasks = session.scalars(stmt, execution_options={"populate_existing": True}).all()
        except Exception:
            with contextlib.suppress(Exception):
                session.rollback()
            return {}
        mapper = inspect(model)
        return {mapper.primary_key_from_instance(t)[0]: t for t in tasks}

    def run(
        self,
        session: Session,
        held: Held,
        *,
        batched: bool = False,
        loaded: BaseQueue | None = None,
    ) -> Ran:
        """Load and run ``held``'s task; say how it ended.

        ``batched``: other tasks' outcomes are pending in ``session``'s transaction.
        run() then runs inside a SAVEPOINT of its own (sent only if it issues SQL),
        and only that is rolled back when the task fails. ``loaded``: the task,
        loaded with its batch in this transaction (see :meth:`preload`).
        """
        model, claim = held.model, held.claim
        # A batched task is short (it ends within the batch's span): its end line
        # says all, and a second INFO line per task would cost more than the task.
        events.emit(
            events.Event(
                "task_started",
                held.worker_id,
                model.__name__,
                key_text(claim.pk),
                claim.token,
                batched=batched,
            )
        )
        try:
            if loaded is not None and loaded in session and not inspect(loaded).expired:
                task: BaseQueue | None = loaded
            else:
                task = session.get(model, held.key, populate_existing=True)
        except Exception as exc:  # a row whose columns cannot be loaded
            if not batched or isinstance(exc, DBAPIError):
                # (In a batch, a value Python could not convert leaves the
                # transaction as it was; an error from the database does not.)
                with contextlib.suppress(Exception):
                    session.rollback()
            return Ran(self._unloadable(held, exc), None, session)
        if task is None:
            return Ran(Outcome(Kind.GONE), None, session)
        held.failures = int(task.alchq_failures or 0)
        held.lost_claims = int(task.alchq_lost_claims or 0)
        if claim.token >= MAX_COUNTER:
            # Only a hand-edited row gets here; its token no longer fences anything.
            bad = TaskFailure(f"alchq_attempts reached its maximum ({MAX_COUNTER}); not run")
            return Ran(Outcome(Kind.ERROR, bad, None), task, session)
        dbapi = self.binds.connection(session, model).connection.dbapi_connection
        raised: BaseException | None = None
        tb: str | None = None
        changed: list[str] = []
        root = session.get_transaction()
        ended = dropped = False
        with RunWatch(session, held.engine, dbapi, held.dialect.backend_id) as watch:
            if batched:
                # Its own SAVEPOINT, begun only when run() is about to send SQL.
                watch.before_first_statement = session.begin_nested
                watch.before_write_elsewhere = lambda: self._before_write_elsewhere(
                    session, held, watch
                )
            try:
                try:
                    held.watch, held.in_run = watch, True
                    if self.reporter is None:
                        task.run()
                    else:
                        self.reporter.begin(held)
                        with _progress.reporting_to(self.reporter):
                            task.run()
                finally:
                    held.in_run, held.watch = False, None
                    ended = batched and not _same_transaction(self._current(session), session, root)
                session = self._current(session)
                changed = owned_changes(task, session)
                if not changed:
                    session.flush()
            except BaseException as exc:
                # Everything run() raises ends the task, Ctrl-C and sys.exit()
                # included: real signals reach the worker through its handlers.
                raised, tb = exc, traceback.format_exc()
                session = self._current(session)
                if held.interrupt is not None:
                    # The worker's own interrupt, even when run()'s clean-up then
                    # failed on the connection it interrupted (PostgreSQL: "another
                    # command is already in progress"): that is the outcome.
                    raised = interruption(exc) or exc
                if isinstance(raised, (TaskTimeoutError, WorkerShutdown, TaskCancelled)):
                    # Interrupted, maybe inside a query: the connection's state is
                    # unknown. Dropped, not reset (its reset would fail, noisily).
                    with contextlib.suppress(Exception):
                        self.binds.connection(session, model).invalidate()
                    dropped = True  # and with it any batch's transaction
        savepoint, watch.before_first_statement = watch.savepoint, None
        if self.reporter is not None:
            # Its last progress; in run()'s transaction if the side connection
            # cannot write (SQLite, after run() wrote) and run()'s work stands.
            keeps = raised is None and not changed and not dropped
            self.reporter.end(
                held, (lambda: self.binds.connection(session, model)) if keeps else None
            )
        if raised is not None or changed:
            if ended or dropped or not batched:
                with contextlib.suppress(Exception):
                    session.rollback()
            else:
                _undo(session, savepoint)
        if raised is not None:
            outcome = self._after_raise(held, raised, tb, watch)
            return Ran(outcome, task, session, ended_transaction=ended)
        if changed:
            bad = TaskFailure(
                f"run() changed {', '.join(changed)}: alchq's own columns are alchq's "
                "(its other changes were rolled back)"
            )
            return Ran(Outcome(Kind.ERROR, bad, None), task, session, ended_transaction=ended)
        if batched and not ended:
            if savepoint is not None and not savepoint.is_active:
                # A failed flush rolled back to the SAVEPOINT and run() went on.
                bad = TaskFailure(
                    "run() returned, but a database error had rolled back its writes "
                    "(it caught the error and went on); nothing it wrote was saved"
                )
                return Ran(Outcome(Kind.ERROR, bad, None), task, session)
            had_writes = bool(watch.statements)
            return Ran(
                Outcome(Kind.PROCESSED, had_writes=had_writes),
                task,
                session,
                savepoint,
                batched=True,
            )
        if task not in session:
            logger.warning(
                "%s: run() closed its session or removed the task from it%s",
                held.label,
                f"; {watch.discarded} uncommitted statement(s) were discarded"
                if watch.discarded
                else "",
            )
        if watch.statements:
            return Ran(
                Outcome(Kind.PROCESSED, had_writes=True), task, session, ended_transaction=ended
            )
        return Ran(PROCESSED, task, session, ended_transaction=ended)

    def _before_write_elsewhere(self, session: Session, held: Held, watch: RunWatch) -> None:
        """run() is about to write through a connection of its own, which may wait for
        the batch's uncommitted outcomes (on SQLite always: one writer; elsewhere
        when it writes a row an earlier task of the batch wrote). If run() has not
        written through its session yet, they are committed now (its SAVEPOINT was
        never sent), and the model's tasks get a transaction each from now on."""
        if watch.writes:
            return  # it waits for its own writes: the self-wait check says so
        self.commit_early(held, "run() writes through a connection of its own")

    def _current(self, session: Session) -> Session:
        """The task's session now: run() may have removed Flask-SQLAlchemy's and used a new one."""
        scoped = self.binds.source.scoped
        return scoped() if scoped is not None else session

    def _unloadable(self, held: Held, exc: Exception) -> Outcome:
        if held.dialect.is_transient(exc):
            return Outcome(Kind.RELEASE, away=True)
        if isinstance(exc, DBAPIError) and held.dialect.is_schema_mismatch(exc):
            return Outcome(Kind.MISMATCH, exc)
        tb = traceback.format_exc()
        detail = f"row could not be loaded: {_text.one_line(_text.message(exc))}"
        return Outcome(Kind.ERROR, exc, tb, detail=detail)

    def _after_raise(
        self, held: Held, exc: BaseException, tb: str | None, watch: RunWatch
    ) -> Outcome:
        if isinstance(exc, WorkerShutdown):
            return Outcome(Kind.RELEASE, exc)
        if isinstance(exc, TaskCancelled):
            return Outcome(Kind.CANCELLED, exc, detail="cancelled while running")
        timeout = interruption(exc)
        if isinstance(timeout, TaskTimeoutError):
            # Its time limit, even if the interrupt broke a connection: it can land
            # inside a pure-Python driver's read (PyMySQL), which cannot use that
            # connection again. Not a lost claim.
            return failed(held, timeout, tb)
        if any(not held.dialect.is_read_only(e) for e in watch.disconnects):
            # A connection to the task's database was lost. The database down:
            # wait for it and run the task again. Up: a lost claim, counted.
            if not self.binds.reachable(held.engine):
                return Outcome(Kind.RELEASE, exc, away=True)
            return lost_connection(held, exc, int(self.settings.max_lost_claims))
        if held.dialect.is_conflict(exc):
            # A lock or serialization wait that run() lost: the task's failure,
            # retried (bounded), never the database being away.
            if watch.reported:
                # It waited on the task's own lock: it would again, every time.
                detail = (
                    f"{_text.describe(exc)} (run() waited for a lock its own session "
                    "held; not retried)"
                )
                return Outcome(Kind.ERROR, exc, tb, detail=detail)
            return failed(held, exc, tb)
        if watch.owns(exc) and held.dialect.is_transient(exc):
            return Outcome(Kind.RELEASE, exc, away=True)  # e.g. a read-only window
        return failed(held, exc, tb)


def _same_transaction(now: Session, session: Session, root: SessionTransaction | None) -> bool:
    """Is ``session``'s transaction still the one the run began in (run() did not end it)?"""
    return now is session and root is not None and session.get_transaction() is root


def _undo(session: Session, savepoint: SessionTransaction | None) -> None:
    """Roll back a batched task's writes: its SAVEPOINT, if a failed flush has not
    already; without one (run() sent no SQL), what it changed in memory only."""
    try:
        if savepoint is None:
            # Nothing was sent: forget what it added, deleted or changed.
            for obj in [*session.new, *session.deleted]:
                session.expunge(obj)
            for obj in list(session.dirty):
                session.expire(obj)
        elif savepoint.is_active:
            savepoint.rollback()
    except Exception:  # the connection is gone, and the batch's transaction with it
        with contextlib.suppress(Exception):
            session.rollback()


def interruption(exc: BaseException) -> BaseException | None:
    """The worker's own interrupt (time limit, shutdown, cancel) ``exc`` was raised from."""
    seen: set[int] = set()
    node: BaseException | None = exc
    while node is not None and id(node) not in seen:
        if isinstance(node, (TaskTimeoutError, WorkerShutdown, TaskCancelled)):
            return node
        seen.add(id(node))
        node = node.__cause__ or node.__context__
    return None


def owned_changes(task: BaseQueue, session: Session) -> list[str]:
    """alchq's own columns that run() changed on the task (``status``, ``alchq_*``)."""
    if task not in session:
        return []
    state = inspect(task)
    if not state.modified:
        return []  # nothing changed at all (the common case): no per-column look
    return [
        attr.key
        for attr in state.attrs
        if (attr.key == "status" or attr.key.startswith("alchq_")) and attr.history.has_changes()
    ]
