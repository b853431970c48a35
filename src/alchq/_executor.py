"""Runs one claimed task and says how it ended, as an :class:`~alchq._outcome.Outcome`.

The executor loads the task in its session, calls ``run()`` and flushes what
run() changed. It never commits and never records: the recorder does, with the
outcome this returns on every path (processed, failed, retried, snoozed,
released, or the database away).
"""

from __future__ import annotations

import contextlib
import logging
import traceback

from sqlalchemy import inspect
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from alchq import _text
from alchq._binds import Binds
from alchq._held import Held
from alchq._outcome import PROCESSED, Kind, Outcome, failed
from alchq._stopping import WorkerShutdown
from alchq._tracking import RunWatch
from alchq.exceptions import TaskFailure
from alchq.model import MAX_COUNTER, BaseQueue, Status

logger = logging.getLogger("alchq.worker")


class Executor:
    """Runs tasks in the sessions it is given."""

    def __init__(self, binds: Binds) -> None:
        self.binds = binds

    def run(self, session: Session, held: Held) -> tuple[Outcome, BaseQueue | None]:
        """Load and run ``held``'s task; return its outcome and the task (if it loaded)."""
        model, claim = held.model, held.claim
        logger.info(
            "%s started (attempt %d)",
            held.label,
            claim.token,
            extra={
                "alchq_model": model.__name__,
                "alchq_task_id": claim.pk,
                "alchq_attempt": claim.token,
            },
        )
        try:
            task = session.get(model, held.key, populate_existing=True)
        except Exception as exc:  # a row whose columns cannot be loaded
            with contextlib.suppress(Exception):
                session.rollback()
            if held.dialect.is_transient(exc):
                return Outcome(Kind.RELEASE, away=True), None
            tb = traceback.format_exc()
            detail = f"row could not be loaded: {_text.one_line(_text.message(exc))}"
            return Outcome(Kind.ERROR, exc, tb, detail=detail), None
        if task is None:
            return Outcome(Kind.GONE), None
        held.failures = int(task.alchq_failures or 0)
        if claim.token >= MAX_COUNTER:
            # Only a hand-edited row gets here; its token no longer fences anything.
            bad = TaskFailure(f"alchq_attempts reached its maximum ({MAX_COUNTER}); not run")
            return Outcome(Kind.ERROR, bad, None), task
        dbapi = self.binds.connection(session, model).connection.dbapi_connection
        with RunWatch(dbapi) as watch:
            try:
                try:
                    held.in_run = True
                    task.run()
                finally:
                    held.in_run = False
                keep_status(task)
                session.flush()
            except WorkerShutdown as exc:
                with contextlib.suppress(Exception):
                    session.rollback()
                return Outcome(Kind.RELEASE, exc), task
            except BaseException as exc:
                # Everything run() raises ends the task, Ctrl-C and sys.exit()
                # included: real signals reach the worker through its handlers.
                tb = traceback.format_exc()
                with contextlib.suppress(Exception):
                    session.rollback()
                if held.dialect.is_transient(exc):
                    return Outcome(Kind.RELEASE, exc, away=True), task
                return failed(held, exc, tb), task
        if watch.writes:
            return Outcome(Kind.PROCESSED, had_writes=True), task
        return PROCESSED, task


def keep_status(task: BaseQueue) -> None:
    """The worker owns ``status``: drop a change run() made to it."""
    history = inspect(task).attrs.status.history
    if history.has_changes():
        set_committed_value(task, "status", Status.PROCESSING)
