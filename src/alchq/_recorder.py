"""Writes what happened: every fenced write, and the commits that make outcomes stick.

The recorder is the only stage that commits an outcome. It takes the executor's
:class:`~alchq._executor.Ran` and

- writes the outcome with the claim's fence (still PROCESSING, our owner, our
  token), in the task's own transaction, so run()'s writes and PROCESSED
  commit together;
- when that write is refused, finds out why: the claim was taken over (the
  outcome is discarded), run() deleted its own row (done: committed), or run()
  changed alchq's columns (an ERROR for the task);
- when the write fails, finds out why: the database is away (the outcome is
  kept and written once it is back, after checking whether the lost commit had
  landed), the task's own transaction conflicted or was left aborted by run()
  (the task's failure), or the outcome itself could not be stored (a bare
  ERROR instead);
- after the commit: refreshes the task object, writes the log line, and for
  ERROR calls ``error()`` (below).

``error()`` runs in its own time (``alchq_error_time_limit``) after ERROR is
committed. Until it is done the ERROR row keeps a lease (``alchq_lease_until``),
cleared in error()'s own transaction: so whether error()'s writes were
committed can always be checked, an error() stopped before committing is
called again, and one whose worker died is called by a rescuer.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Connection, Table, select, tuple_, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.orm.attributes import set_committed_value

from alchq import _text, events
from alchq._binds import Binds, Outage
from alchq._dialects import FinishPlan, utc_now
from alchq._held import Held, WorkerShutdown
from alchq._monitor import Monitor
from alchq._outcome import CONFLICT_RETRY, Kind, Outcome, Ran, failed, lost_connection
from alchq._sessions import SessionSource
from alchq._transitions import released, unclaimed
from alchq._util import first_line
from alchq.config import Settings
from alchq.exceptions import TaskFailure, TaskTimeoutError
from alchq.model import BaseQueue, Status, key_text

logger = logging.getLogger("alchq.worker")

#: Most calls of one task's error() that fail to commit (stopped at its time
#: limit, or its commit refused) before alchq gives up on it.
MAX_ERROR_CALLS = 3
#: How long a model whose table no longer matches its code is left alone.
MISMATCH_PAUSE = 30.0


@dataclass
class Deferred:
    """An outcome the database was away for: written when it is back."""

    held: Held
    outcome: Outcome | None  # None: put the task back to PENDING
    had_writes: bool = False
    #: The database was up when the run's transaction was lost: if its writes
    #: are gone, that counts as a lost claim.
    lost: bool = False
    #: What the log line says when the lost commit turns out to have landed.
    landed: str | None = "recorded once the database was back"


@dataclass
class Pending:
    """A batched task's outcome: written in the batch's transaction, not yet committed."""

    held: Held
    outcome: Outcome
    task: BaseQueue | None
    #: run() deleted its own row: done, nothing else to record.
    deleted: bool = False
    #: A run that wrote nothing: its outcome is written with the batch's others, in
    #: one statement just before the commit, fenced by these values.
    fenced: dict[str, Any] | None = None


class Recorder:
    """Writes the outcomes of one worker's tasks."""

    def __init__(
        self,
        binds: Binds,
        monitor: Monitor,
        settings: Settings,
        aborted: Callable[[], bool],
    ) -> None:
        self.binds = binds
        self.source: SessionSource = binds.source
        self.monitor = monitor
        self.settings = settings
        self._aborted = aborted
        #: Outcomes waiting for the database, oldest first.
        self.deferred: list[Deferred] = []
        #: Models whose table does not match their code: not claimed until then.
        self.paused: dict[type[BaseQueue], float] = {}
        #: Models whose run() commits or rolls back itself: never batched.
        self.solo: set[type[BaseQueue]] = set()
        #: Outcomes written in the batch's transaction, committed together.
        self._batch: list[Pending] = []
        self._batch_session: Session | None = None
        self._batch_root: SessionTransaction | None = None
        #: The batched PROCESSED write of each task table, built once.
        self._processed_plans: dict[Table, FinishPlan] = {}

    def holds(self, held: Held) -> bool:
        """Is ``held``'s outcome still waiting for the database (so its claim must be kept)?"""
        return any(d.held is held for d in self.deferred)

    def claimable(self, model: type[BaseQueue]) -> bool:
        """May the worker claim tasks of ``model`` now?"""
        until = self.paused.get(model)
        return until is None or time.monotonic() >= until

    # -- outcomes ---------------------------------------------------------------------

    def record(self, ran: Ran, held: Held) -> None:
        """Persist how ``held``'s run ended (its writes are pending in ``ran.session``).

        A batched PROCESSED outcome (``ran.batched``) is written in the batch's
        transaction and committed by :meth:`commit_batch`; any other outcome
        first commits the batch, then gets a transaction of its own.
        """
        if ran.ended_transaction:
            self._go_solo(held, "run() committed or rolled back the session itself")
        if ran.batched:
            self._add_to_batch(ran, ran.savepoint, held)
            return
        self.commit_batch()
        outcome, session = ran.outcome, ran.session
        if outcome.kind is Kind.GONE:
            session.rollback()
            logger.warning("%s was deleted after it was claimed; skipped", held.label)
        elif outcome.kind is Kind.RELEASE and outcome.away:
            if outcome.exc is not None:
                logger.warning(
                    "%s: the database went away during run() (%s); it will run again",
                    held.label,
                    first_line(outcome.exc),
                )
            self.deferred.append(Deferred(held, None))
        elif outcome.kind is Kind.RELEASE:
            self.release(session, held)
        elif outcome.kind is Kind.MISMATCH:
            self._mismatch(session, held, outcome)
        elif outcome.kind is Kind.LOST:
            assert outcome.exc is not None
            if self._write_apart(session, held, outcome):
                logger.warning(
                    "%s: its database connection was lost during run() (%s) while the "
                    "database stayed up; back to PENDING (lost claims: %d of %d)",
                    held.label,
                    first_line(outcome.exc),
                    held.lost_claims + 1,
                    int(self.settings.max_lost_claims),
                )
        else:
            self._finish(session, held, outcome, ran.task)

    def _finish(
        self,
        session: Session,
        held: Held,
        outcome: Outcome,
        task: BaseQueue | None,
        *,
        last_try: bool = False,
    ) -> None:
        """Commit ``outcome`` (with what run() flushed) if the claim is still ours."""
        values = self._values(held, outcome, owes_error=task is not None)
        try:
            # run()'s transaction if it is open, else one of alchq's own.
            conn = self.binds.connection(session, held.model, bookkeeping=True)
            if not _write(conn, held, values, self._untouched(held)):
                self._refused(session, conn, held, outcome, task)
                return
            session.commit()
        except DBAPIError as exc:
            with contextlib.suppress(Exception):
                session.rollback()
            self._write_failed(session, held, outcome, task, exc, last_try=last_try)
            return
        self._committed(session, held, outcome, task, values)

    def _values(self, held: Held, outcome: Outcome, owes_error: bool = True) -> dict[str, Any]:
        values = outcome.values(held.table)
        if outcome.kind is Kind.ERROR and owes_error:
            # error() is owed until its own transaction clears this lease.
            budget = float(held.model.alchq_error_time_limit) + self.settings.kill_after
            values["alchq_lease_until"] = utc_now(budget)
        return values

    def _untouched(self, held: Held) -> ColumnElement[bool]:
        """The row's counters as the run found them: run() must not have changed them."""
        c = held.table.c
        return (c.alchq_failures == held.failures) & (c.alchq_lost_claims == held.lost_claims)

    def _committed(
        self,
        session: Session,
        held: Held,
        outcome: Outcome,
        task: BaseQueue | None,
        values: dict[str, Any],
    ) -> None:
        """After the outcome's commit: the task object, the log line, error()."""
        if task is not None and task in session:
            for key in ("status", "alchq_error_type", "alchq_error_message", "alchq_traceback"):
                if key in values:
                    set_committed_value(task, key, values[key])
            # Written by SQL expressions: read back on access.
            computed = ("alchq_finished_at", "time_updated", "alchq_lease_until", "alchq_worker")
            session.expire(task, [*computed, "run_at", "alchq_failures", "alchq_lost_claims"])
        if outcome.status is Status.PENDING:
            log_again(held, outcome)
        else:
            log_end(held, outcome.status, outcome.describe(), outcome.exc)
        if outcome.kind is Kind.ERROR and outcome.exc is not None and task is not None:
            self.call_error(held, outcome.exc, session)

    def _refused(
        self,
        session: Session,
        conn: Connection,
        held: Held,
        outcome: Outcome,
        task: BaseQueue | None,
        savepoint: SessionTransaction | None = None,
    ) -> None:
        """The fenced write matched no row: taken over, deleted by run(), or changed by run().

        ``savepoint``: a batched task's, holding run()'s writes (the batch's
        transaction holds other tasks' outcomes).
        """
        here = conn.execute(_bookkeeping(held)).one_or_none()
        with self.binds.connect(held.engine) as fresh:
            there = fresh.execute(_bookkeeping(held)).one_or_none()

        def undo() -> None:
            if savepoint is None:
                session.rollback()
            else:
                savepoint.rollback()
                self.commit_batch()

        if there is None or not _ours(there, held):
            undo()
            logger.warning(
                "%s: this worker no longer holds the claim; its outcome (%s) was discarded",
                held.label,
                outcome.status.value,
            )
            return
        if here is None:
            # run() deleted its own row in its transaction: that is its way of saying done.
            if savepoint is not None:
                savepoint.commit()
                self._batch.append(Pending(held, outcome, task, deleted=True))
                return
            session.commit()
            logger.info("%s deleted its own row in run(): done", held.label)
            return
        undo()
        changed = [
            name
            for name in ("status", "alchq_worker", "alchq_attempts", "alchq_failures")
            if getattr(here, name) != getattr(there, name)
        ] or ["alchq_lost_claims"]
        bad = TaskFailure(
            f"run() changed {', '.join(changed)}: alchq's own columns are alchq's "
            "(its other changes were rolled back)"
        )
        self._finish(session, held, Outcome(Kind.ERROR, bad, None), task, last_try=True)

    # -- batches: several tasks' outcomes, one commit ----------------------------------

    def _add_to_batch(self, ran: Ran, savepoint: SessionTransaction | None, held: Held) -> None:
        """Write a batched PROCESSED outcome in the batch's transaction.

        run()'s writes and the outcome stay inside the task's SAVEPOINT until
        the write is known to be accepted, so a refusal or a failure undoes
        this task only. A run that wrote nothing needs no SAVEPOINT: none was
        sent, and its outcome is written with the other such ones of the batch
        in one statement before the commit.
        """
        session, outcome, task = ran.session, ran.outcome, ran.task
        if self._batch and not (
            session is self._batch_session and session.get_transaction() is self._batch_root
        ):
            self.commit_batch()
        if not self._batch:
            self._batch_session, self._batch_root = session, session.get_transaction()
        # A PROCESSED outcome's values are the same for every task of a table: its
        # statement is built once.
        write = self._processed_plans.get(held.table)
        if write is None:
            values = self._values(held, outcome, owes_error=False)
            write = self._processed_plans[held.table] = held.dialect.finish_plan(
                held.table, values, _FENCE
            )
        fenced = _fenced(held)
        try:
            if not outcome.had_writes:
                if savepoint is not None:
                    savepoint.commit()  # begun, but nothing was sent in it
                self._batch.append(Pending(held, outcome, task, fenced=fenced))
                return
            # (No SAVEPOINT here would be SQL that no hook saw: it stays in the batch.)
            conn = self.binds.connection(session, held.model)
            if not write(conn, held.claim, fenced):
                self._refused(session, conn, held, outcome, task, savepoint)
                return
            if savepoint is not None:
                savepoint.commit()
        except DBAPIError as exc:
            if savepoint is not None and savepoint.is_active:
                with contextlib.suppress(Exception):
                    savepoint.rollback()
            self.commit_batch()
            with contextlib.suppress(Exception):
                session.rollback()
            self._write_failed(session, held, outcome, task, exc, last_try=False)
            return
        self._batch.append(Pending(held, outcome, task))

    def _write_unwritten(self, session: Session, pending: list[Pending]) -> list[Pending]:
        """Write the outcomes of the batch's runs that wrote nothing, in one statement
        per table; those whose fence refused them (their claim lost, or run() changed
        their row's counters)."""
        refused: list[Pending] = []
        by_table: dict[Table, list[Pending]] = {}
        for p in pending:
            if p.fenced is not None:
                by_table.setdefault(p.held.table, []).append(p)
        for table, rows in by_table.items():
            write = self._processed_plans[table]
            conn = self.binds.connection(session, rows[0].held.model)
            written = write.many(conn, [(p.held.claim, p.fenced or {}) for p in rows])
            if written == len(rows):
                continue
            # Which ones: written rows are PROCESSED, ours, with our token.
            c = table.c
            key = table.primary_key.columns
            found = conn.execute(
                select(*key, c.status, c.alchq_worker, c.alchq_attempts).where(
                    tuple_(*key).in_([p.held.claim.pk for p in rows])
                    if len(key) > 1
                    else list(key)[0].in_([p.held.claim.pk[0] for p in rows])
                )
            ).all()
            n = len(key)
            ours = {
                tuple(r[:n])
                for r in found
                if r[n] == Status.PROCESSED and r[n + 1] == rows[0].held.worker_id
            }
            tokens = {tuple(r[:n]): r[n + 2] for r in found}
            refused += [
                p
                for p in rows
                if p.held.claim.pk not in ours or tokens.get(p.held.claim.pk) != p.held.claim.token
            ]
        return refused

    def _go_solo(self, held: Held, why: str) -> None:
        if held.model not in self.solo:
            self.solo.add(held.model)
            logger.info(
                "%s: %s; %s tasks now get a transaction each",
                held.label,
                why,
                held.model.__name__,
            )

    def commit_early(self, held: Held, why: str) -> None:
        """Commit the batch while ``held`` runs (it has written nothing yet); never
        batch its model again."""
        self._go_solo(held, why)
        self.commit_batch()

    def commit_batch(self) -> None:
        """Commit the outcomes written in the batch's transaction, then log them.

        When that transaction ended first (a connection lost, a task's run()
        that rolled back or committed itself) or its commit failed, each task
        is settled from what its row says: done if the commit landed, else
        put back to PENDING with none of its writes (it runs again).
        """
        if not self._batch:
            return
        pending, session, root = self._batch, self._batch_session, self._batch_root
        self._batch, self._batch_session, self._batch_root = [], None, None
        assert session is not None and root is not None
        failure: str | None = None
        refused: list[Pending] = []
        if session.get_transaction() is not root or not root.is_active:
            failure = "its transaction ended before its commit"
        else:
            try:
                refused = self._write_unwritten(session, pending)
                session.commit()
            except DBAPIError as exc:
                with contextlib.suppress(Exception):
                    session.rollback()
                failure = f"its commit failed ({first_line(exc)})"
        if failure is None:
            for p in pending:
                if p.deleted:
                    logger.info("%s deleted its own row in run(): done", p.held.label)
                elif not any(p is r for r in refused):
                    # Only the log line: a batch's task objects are not handed to
                    # anyone (process_one is never batched), so not refreshed.
                    log_end(p.held, Status.PROCESSED, batched=True)
            for p in refused:
                # Nothing of run()'s to lose: found out the usual way, on its own.
                self._finish(session, p.held, p.outcome, p.task)
            return
        held = pending[0].held
        reachable = self.binds.reachable(held.engine)
        logger.warning(
            "a batch of %d %s tasks: %s; each is settled from its row",
            len(pending),
            held.model.__name__,
            failure,
        )
        for p in pending:
            had_writes = p.outcome.had_writes or p.deleted
            # A run whose writes are gone counts as a lost claim (bounded), even when
            # another task's run lost them: every extra start is accounted for.
            deferred = Deferred(p.held, p.outcome, had_writes, lost=reachable, landed=None)
            if reachable:
                try:
                    self._settle(deferred)
                    continue
                except DBAPIError:
                    pass
            self.deferred.append(deferred)

    def _write_failed(
        self,
        session: Session,
        held: Held,
        outcome: Outcome,
        task: BaseQueue | None,
        exc: DBAPIError,
        *,
        last_try: bool,
    ) -> None:
        """Writing the outcome failed: the database is away, or the task's transaction is
        beyond saving; each ends differently (the session was rolled back)."""
        dialect = held.dialect
        if exc.connection_invalidated or dialect.is_transient(exc):
            if self.binds.reachable(held.engine):
                # Only this transaction was lost: settle it now, counting the loss.
                deferred = Deferred(held, outcome, outcome.had_writes, lost=True)
                try:
                    self._settle(deferred)
                    return
                except DBAPIError as again:
                    exc = again
            logger.warning(
                "%s: could not record %s, the database is away (%s); will retry",
                held.label,
                outcome.status.value,
                first_line(exc),
            )
            self.deferred.append(Deferred(held, outcome, outcome.had_writes))
            return
        if outcome.kind is Kind.PROCESSED and dialect.is_conflict(exc):
            # run()'s transaction lost to a concurrent one at its very end.
            self._finish(session, held, failed(held, exc, None), task)
            return
        if outcome.kind is Kind.PROCESSED and dialect.is_aborted_transaction(exc):
            bad = TaskFailure(
                "run() returned, but left its database transaction aborted (it caught a "
                "database error and went on); nothing it wrote was saved"
            )
            self._finish(session, held, Outcome(Kind.ERROR, bad, None), task)
            return
        if outcome.kind is Kind.PROCESSED:
            # Refused at commit (a deferred constraint, a trigger): the task's failure.
            self._finish(session, held, failed(held, exc, None), task)
            return
        if last_try:
            logger.error(
                "%s: could not record any outcome (%s); it stays PROCESSING until this "
                "worker stops or is lost",
                held.label,
                first_line(exc),
            )
            return
        # The failure itself could not be stored: record a bare one instead.
        bare = TaskFailure(f"the task failed, but its error could not be stored: {first_line(exc)}")
        self._finish(session, held, Outcome(Kind.ERROR, bare, None), task, last_try=True)

    def _write_apart(self, session: Session, held: Held, outcome: Outcome) -> bool:
        """Write ``outcome`` in a transaction of alchq's own (run()'s was rolled back)."""
        try:
            conn = self.binds.connection(session, held.model, bookkeeping=True)
            ok = _write(conn, held, outcome.values(held.table))
            session.commit()
        except DBAPIError as exc:
            with contextlib.suppress(Exception):
                session.rollback()
            logger.warning(
                "%s: could not put it back (%s); its lease will", held.label, first_line(exc)
            )
            return False
        return ok

    def _mismatch(self, session: Session, held: Held, outcome: Outcome) -> None:
        """The row cannot be loaded by this worker's code: leave it, and the model, alone."""
        if self._write_apart(session, held, outcome) and held.model not in self.paused:
            assert outcome.exc is not None
            logger.error(
                "the table %s no longer matches model %s: %s; its tasks are left for a "
                "worker whose code matches (this one tries again every %gs)",
                held.table.name,
                held.model.__name__,
                first_line(outcome.exc),
                MISMATCH_PAUSE,
            )
        self.paused[held.model] = time.monotonic() + MISMATCH_PAUSE

    def release(self, session: Session, held: Held) -> bool:
        """Put the task in hand back to PENDING (shutdown), if the claim is still ours."""
        try:
            conn = self.binds.connection(session, held.model, bookkeeping=True)
            ok = _write(conn, held, released())
            session.commit()
        except DBAPIError as exc:
            with contextlib.suppress(Exception):
                session.rollback()
            logger.warning(
                "%s: could not release it (%s); its lease will", held.label, first_line(exc)
            )
            return False
        if ok:
            logger.info("%s released: back to PENDING", held.label)
        return ok

    def hand_back(self, session: Session, helds: list[Held]) -> None:
        """Put claimed tasks that never started back to PENDING, uncounted, in one commit."""
        if not helds:
            return
        try:
            conn = self.binds.connection(session, helds[0].model, bookkeeping=True)
            back = sum(_write(conn, held, unclaimed(held.table)) for held in helds)
            session.commit()
        except DBAPIError as exc:
            with contextlib.suppress(Exception):
                session.rollback()
            logger.warning(
                "could not hand back %d claimed %s tasks (%s); their leases will",
                len(helds),
                helds[0].model.__name__,
                first_line(exc),
            )
            return
        logger.debug("handed back %d claimed %s tasks, unstarted", back, helds[0].model.__name__)

    # -- error() --------------------------------------------------------------------------

    def call_error(self, held: Held, exc: BaseException, session: Session | None = None) -> None:
        """Call the task's error(exc) in its own time, until its writes are committed.

        ``session`` is the task's (the seed's error() uses ``db.session``); None
        for a session of its own.
        """
        own = session is None
        calls = 0
        outage = Outage(self.settings.max_backoff)
        held.enter_error(float(held.model.alchq_error_time_limit))
        self.monitor.hold(held)
        try:
            while calls < MAX_ERROR_CALLS:
                if session is None:
                    session = self.source.open()
                try:
                    state = self._error_once(held, exc, session)
                except DBAPIError as err:  # loading the task, or committing its writes
                    with contextlib.suppress(Exception):
                        session.rollback()
                    if self._error_done(held):
                        return  # the commit that failed to answer had landed
                    if held.dialect.is_transient(err) or err.connection_invalidated:
                        if self._aborted():
                            return  # the lease stays: a rescuer calls error() later
                        if not outage.failures:
                            logger.warning(
                                "%s: error()'s writes could not be committed, the database "
                                "connection was lost (%s); calling it again once it is back",
                                held.label,
                                first_line(err),
                            )
                        time.sleep(outage.failed(err))
                        continue
                    calls += 1
                    logger.error(
                        "%s: error()'s writes could not be committed (%s); %s",
                        held.label,
                        first_line(err),
                        "calling it again" if calls < MAX_ERROR_CALLS else "giving up",
                    )
                    continue
                finally:
                    if own and session is not None:
                        with contextlib.suppress(Exception):
                            self.source.release(session)
                        session = None
                if state != "again":
                    return
                calls += 1
            self._give_up_error(held)
        finally:
            self.monitor.drop(held)

    def _error_once(self, held: Held, exc: BaseException, session: Session) -> str:
        """One call of error(): "done", or "again" when nothing it wrote was committed."""
        try:
            task = session.get(held.model, held.key)
        except DBAPIError:
            raise
        except Exception as err:  # its columns cannot be loaded: no task to call
            logger.error(
                "%s: error() cannot be called, the task cannot be loaded: %s",
                held.label,
                _text.describe(err),
            )
            with contextlib.suppress(Exception):
                session.rollback()
            self.clear_error_lease(held)
            return "done"
        if task is None or task.status != Status.ERROR:
            return "done"
        # Cleared in error()'s own transaction: error()'s commit carries it.
        conn = self.binds.connection(session, held.model)
        conn.execute(_clear_error_lease(held))
        try:
            held.in_run = True
            try:
                task.error(exc)
            finally:
                held.in_run = False
        except (TaskTimeoutError, WorkerShutdown) as stopped:
            # Stopped at its time limit (or the worker is stopping now): keep what
            # it wrote if that can be committed, else it is called again.
            current = self._current(session)
            try:
                self.binds.connection(current, held.model).execute(_clear_error_lease(held))
                current.commit()
            except Exception as err:
                with contextlib.suppress(Exception):
                    current.rollback()
                logger.error(
                    "%s: error() was stopped after %gs and what it had written could not "
                    "be committed (%s)",
                    held.label,
                    held.time_limit,
                    first_line(err),
                )
                if isinstance(stopped, WorkerShutdown):
                    raise
                return "again"
            logger.error(
                "%s: error() was stopped after %gs; what it had written was committed",
                held.label,
                held.time_limit,
            )
            if isinstance(stopped, WorkerShutdown):
                raise
            return "done"
        except Exception as err:
            with contextlib.suppress(Exception):
                self._current(session).rollback()
            logger.error("%s: error() raised %s", held.label, _text.describe(err))
            logger.debug("error() traceback", exc_info=True)
            self.clear_error_lease(held)
            return "done"
        current = self._current(session)
        if current is not session or task not in session:
            # error() closed or removed its session: what it had not committed is gone.
            logger.warning(
                "%s: error() closed its session; what it had not committed was discarded",
                held.label,
            )
        # What error() left uncommitted, with the lease cleared (again, if error()
        # rolled back or replaced its session).
        self.binds.connection(current, held.model).execute(_clear_error_lease(held))
        current.commit()
        return "done"

    def _current(self, session: Session) -> Session:
        scoped = self.source.scoped
        return scoped() if scoped is not None else session

    def _error_done(self, held: Held) -> bool:
        """Were error()'s writes committed (its lease is cleared)? Unknown: False."""
        try:
            with self.binds.connect(held.engine) as conn:
                row = conn.execute(_bookkeeping(held)).one_or_none()
        except DBAPIError:
            return False
        return row is None or row.alchq_lease_until is None or not _ours(row, held, Status.ERROR)

    def clear_error_lease(self, held: Held) -> None:
        try:
            with self.binds.connect(held.engine) as conn:
                conn.execute(_clear_error_lease(held))
                conn.commit()
        except DBAPIError as exc:
            logger.warning(
                "%s: could not mark error() as done (%s); it may be called again",
                held.label,
                first_line(exc),
            )

    def _give_up_error(self, held: Held) -> None:
        logger.error(
            "%s: giving up on error() after %d calls that could not be committed",
            held.label,
            MAX_ERROR_CALLS,
        )
        self.clear_error_lease(held)

    # -- the database was away: outcomes written later ---------------------------------

    def settle_deferred(self) -> None:
        """Write the outcomes the database was away for, waiting for it to come back."""
        outage = Outage(self.settings.max_backoff)
        while self.deferred:
            deferred = self.deferred[0]
            try:
                self._settle(deferred)
            except DBAPIError as exc:
                if not (deferred.held.dialect.is_transient(exc) or exc.connection_invalidated):
                    raise
                if self._aborted():
                    logger.warning(
                        "%s: giving up on the database; its lease will put it back",
                        ", ".join(d.held.label for d in self.deferred),
                    )
                    for left in self.deferred:
                        self.monitor.drop(left.held)
                    self.deferred = []
                    return
                time.sleep(outage.failed(exc))
                continue
            self.deferred.pop(0)
            self.monitor.drop(deferred.held)
            if outage.over():
                logger.info("database is back")

    def _settle(self, deferred: Deferred) -> None:
        held, outcome = deferred.held, deferred.outcome
        call_error = False
        written: Outcome | None = outcome
        with self.binds.connect(held.engine) as conn:
            row = conn.execute(_bookkeeping(held)).one_or_none()
            if row is None:
                logger.warning("%s was deleted while the database was away", held.label)
                return
            if not (row.alchq_worker == held.worker_id and row.alchq_attempts == held.claim.token):
                logger.warning(
                    "%s was taken over while the database was away; this worker's outcome "
                    "was discarded",
                    held.label,
                )
                return
            if row.status != Status.PROCESSING:
                # The commit we lost sight of did land.
                call_error = row.status == Status.ERROR
            elif outcome is None or (outcome.kind is Kind.PROCESSED and deferred.had_writes):
                # Its run's writes died with the connection: run it again. Lost while
                # the database was up, that is a lost claim (bounded).
                if deferred.lost:
                    assert outcome is not None
                    lost = TaskFailure("the connection was lost before run()'s writes committed")
                    again = lost_connection(held, lost, int(self.settings.max_lost_claims))
                    if again.kind is Kind.ERROR:
                        _write(conn, held, self._values(held, again))
                        conn.commit()
                        log_end(held, Status.ERROR, again.describe(), again.exc)
                        self.call_error(held, again.exc or lost)
                        return
                    _write(conn, held, again.values(held.table))
                else:
                    _write(conn, held, released())
                conn.commit()
                logger.warning("%s: back to PENDING; it will run again", held.label)
                return
            else:
                assert written is not None
                _write(conn, held, self._values(held, written))
                conn.commit()
                call_error = written.kind is Kind.ERROR
        if outcome is not None:
            detail = None if deferred.lost else deferred.landed
            log_end(held, outcome.status, detail or outcome.describe(), outcome.exc)
            if call_error and outcome.exc is not None:
                self.call_error(held, outcome.exc)

    # -- from the monitor thread, on connections of their own ----------------------------

    def finish_elsewhere(self, held: Held, outcome: Outcome) -> bool:
        """End the claim on a fresh connection, not waiting on locks (monitor thread).

        An ERROR keeps its error() lease: the worker's replacement, or a rescuer,
        calls error(). True if the claim was ended.
        """
        values = self._values(held, outcome)
        try:
            with self.binds.connect(held.engine) as conn:
                # Briefly: the stuck task's own transaction may hold the row, and
                # the process must be gone within about 2 s of the last signal.
                with held.dialect.short_lock_wait(conn, 0.3):
                    ok = _write(conn, held, values)
                    conn.commit()
        except Exception as exc:
            logger.warning(
                "%s: could not end its claim (%s); its lease will", held.label, first_line(exc)
            )
            return False
        if ok and outcome.kind is not Kind.RELEASE:
            log_end(held, outcome.status, outcome.describe(), outcome.exc)
        elif ok:
            logger.info("%s released: back to PENDING", held.label)
        return ok


def _bookkeeping(held: Held) -> Any:
    """SELECT the held task's bookkeeping columns, by key."""
    c = held.table.c
    pk = [col == v for col, v in zip(held.table.primary_key, held.claim.pk, strict=True)]
    return select(
        c.status,
        c.alchq_worker,
        c.alchq_attempts,
        c.alchq_failures,
        c.alchq_lost_claims,
        c.alchq_lease_until,
    ).where(*pk)


def _ours(row: Any, held: Held, status: Status = Status.PROCESSING) -> bool:
    return bool(
        row.status == status
        and row.alchq_worker == held.worker_id
        and row.alchq_attempts == held.claim.token
    )


def _clear_error_lease(held: Held) -> Any:
    """UPDATE: error() of the held task is done (its ERROR row's lease cleared)."""
    c = held.table.c
    pk = [col == v for col, v in zip(held.table.primary_key, held.claim.pk, strict=True)]
    return (
        update(held.table)
        .where(
            *pk,
            c.status == Status.ERROR,
            c.alchq_worker == held.worker_id,
            c.alchq_attempts == held.claim.token,
        )
        .values(alchq_lease_until=None)
    )


#: The columns a batched PROCESSED write is fenced by: the claim's (see
#: ``still_ours``) and the counters run() must have left alone (``_untouched``).
_FENCE = ("status", "alchq_worker", "alchq_attempts", "alchq_failures", "alchq_lost_claims")


def _fenced(held: Held) -> dict[str, Any]:
    """The values :data:`_FENCE`'s columns have while the claim is ``held``'s."""
    values = (Status.PROCESSING, held.worker_id, held.claim.token, held.failures, held.lost_claims)
    return dict(zip(_FENCE, values, strict=True))


def _write(
    conn: Connection,
    held: Held,
    values: dict[str, Any],
    extra: ColumnElement[bool] | None = None,
) -> bool:
    """Write ``values`` to the held task's row if the claim is still ours; False if not."""
    fence = held.still_ours() if extra is None else held.still_ours() & extra
    return held.dialect.finish(conn, held.table, held.claim, fence, values)


def log_again(held: Held, outcome: Outcome) -> None:
    """A run that ended with the task PENDING again: snoozed, or failed and retried."""
    policy = held.model.alchq_retry
    events.emit(
        events.Event(
            "task_retried",
            held.worker_id,
            held.model.__name__,
            key_text(held.claim.pk),
            held.claim.token,
            "RETRY" if outcome.failed else "SNOOZED",
            time.monotonic() - held.started,
            error_type=None if outcome.exc is None else type(outcome.exc).__name__,
            detail=outcome.describe() if outcome.failed else None,
            again_in=outcome.again_in,
            failures=held.failures + 1 if outcome.failed else None,
            max_attempts=(policy or CONFLICT_RETRY).attempts if outcome.failed else None,
        )
    )


def log_end(
    held: Held,
    status: Status,
    detail: str | None = None,
    exc: BaseException | None = None,
    *,
    batched: bool = False,
) -> None:
    """A run's outcome is written: PROCESSED, ERROR or CANCELLED (``detail``: why not PROCESSED)."""
    events.emit(
        events.Event(
            "task_finished",
            held.worker_id,
            held.model.__name__,
            key_text(held.claim.pk),
            held.claim.token,
            status.value,
            time.monotonic() - held.started,
            error_type=None if exc is None else type(exc).__name__,
            detail=detail,
            batched=batched,
        )
    )
