"""Writes what happened: every fenced write, and the commits that make outcomes stick.

The recorder is the only stage that commits an outcome. It takes an
:class:`~alchq._outcome.Outcome` from the executor and

- writes it with the claim's fence (still PROCESSING, our owner, our token),
  in the task's own transaction, so run()'s writes and PROCESSED commit together;
- keeps it when the database is away, and writes it once it is back, after
  checking whether the lost commit had landed after all (:meth:`settle_deferred`);
- then, after the commit: the task object is refreshed, the log line written,
  and ``error()`` called for a task that ended in ERROR.

It also writes the last-resort ends of a claim from the monitor thread, on
connections of their own.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from alchq import _text
from alchq._binds import Binds, Outage
from alchq._held import Held
from alchq._monitor import Monitor
from alchq._outcome import Kind, Outcome
from alchq._sessions import SessionSource
from alchq._transitions import released
from alchq._util import first_line
from alchq.config import Settings
from alchq.model import BaseQueue, Status

logger = logging.getLogger("alchq.worker")


@dataclass
class Deferred:
    """An outcome the database was away for: written when it is back."""

    held: Held
    outcome: Outcome | None  # None: put the task back to PENDING
    had_writes: bool = False


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
        self.deferred: Deferred | None = None

    def holds(self, held: Held) -> bool:
        """Is ``held``'s outcome still waiting for the database (so its claim must be kept)?"""
        return self.deferred is not None and self.deferred.held is held

    # -- outcomes ---------------------------------------------------------------------

    def record(
        self, session: Session, held: Held, outcome: Outcome, task: BaseQueue | None
    ) -> None:
        """Persist ``outcome`` of ``held``'s run (whose writes are pending in ``session``)."""
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
            self.deferred = Deferred(held, None)
        elif outcome.kind is Kind.RELEASE:
            self.release(session, held)
        else:
            self._finish(session, held, outcome, task)

    def _finish(
        self, session: Session, held: Held, outcome: Outcome, task: BaseQueue | None
    ) -> None:
        """Commit ``outcome`` (with what run() flushed) if the claim is still ours."""
        values = outcome.values(held.table)
        try:
            conn = self.binds.connection(session, held.model)
            if not _write(conn, held, values):
                session.rollback()
                logger.warning(
                    "%s: this worker no longer holds the claim; its outcome (%s) was discarded",
                    held.label,
                    outcome.status.value,
                )
                return
            session.commit()
        except DBAPIError as exc:
            with contextlib.suppress(Exception):
                session.rollback()
            if not held.dialect.is_transient(exc):
                raise
            logger.warning(
                "%s: could not record %s, the database is away (%s); will retry",
                held.label,
                outcome.status.value,
                first_line(exc),
            )
            self.deferred = Deferred(held, outcome, outcome.had_writes)
            return
        if task is not None:
            for key in ("status", "alchq_error_type", "alchq_error_message", "alchq_traceback"):
                if key in values:
                    set_committed_value(task, key, values[key])
            # Written by SQL expressions: read back on access.
            computed = ("alchq_finished_at", "time_updated", "alchq_lease_until", "alchq_worker")
            session.expire(task, [*computed, "run_at", "alchq_failures"])
        if outcome.status is Status.PENDING:
            log_again(held, outcome)
        else:
            log_end(held, outcome.status, outcome.describe())
        if outcome.kind is Kind.ERROR and task is not None and outcome.exc is not None:
            self._call_error(session, task, outcome.exc, held.label)

    def release(self, session: Session, held: Held) -> bool:
        """Put the task in hand back to PENDING (shutdown), if the claim is still ours."""
        try:
            conn = self.binds.connection(session, held.model)
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

    def _call_error(
        self, session: Session, task: BaseQueue, exc: BaseException, label: str
    ) -> None:
        try:
            task.error(exc)
            session.commit()
        except Exception as err:
            with contextlib.suppress(Exception):
                session.rollback()
            logger.error("%s: error() raised %s", label, _text.describe(err))
            logger.debug("error() traceback", exc_info=True)

    # -- the database was away: outcomes written later ---------------------------------

    def settle_deferred(self) -> None:
        """Write the outcome the database was away for, waiting for it to come back."""
        outage = Outage(self.settings.max_backoff)
        while self.deferred is not None:
            deferred = self.deferred
            try:
                self._settle(deferred)
            except DBAPIError as exc:
                if not deferred.held.dialect.is_transient(exc):
                    raise
                if self._aborted():
                    logger.warning(
                        "%s: giving up on the database; its lease will put it back",
                        deferred.held.label,
                    )
                    self.deferred = None
                    self.monitor.drop(deferred.held)
                    return
                time.sleep(outage.failed(exc))
                continue
            self.deferred = None
            self.monitor.drop(deferred.held)
            if outage.over():
                logger.info("database is back")

    def _settle(self, deferred: Deferred) -> None:
        held, outcome = deferred.held, deferred.outcome
        c = held.table.c
        pk_match = [col == v for col, v in zip(held.table.primary_key, held.claim.pk, strict=True)]
        call_error = False
        with held.engine.connect() as conn:
            row = conn.execute(
                select(c.status, c.alchq_worker, c.alchq_attempts).where(*pk_match)
            ).one_or_none()
            if row is None:
                logger.warning("%s was deleted while the database was away", held.label)
                return
            ours = row.alchq_worker == held.worker_id and row.alchq_attempts == held.claim.token
            if not ours:
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
                # Its run's writes died with the connection: run it again.
                _write(conn, held, released())
                conn.commit()
                logger.warning("%s: back to PENDING; it will run again", held.label)
                return
            else:
                _write(conn, held, outcome.values(held.table))
                conn.commit()
                call_error = outcome.kind is Kind.ERROR
        if outcome is not None:
            log_end(held, outcome.status, "recorded once the database was back")
            if call_error and outcome.exc is not None:
                self.error_in_new_session(held, outcome.exc)

    def error_in_new_session(self, held: Held, exc: BaseException) -> None:
        """Call the task's error() in a session of its own (the run's session is gone)."""
        session = self.source.open()
        try:
            task = session.get(held.model, held.key)
            if task is not None:
                self._call_error(session, task, exc, held.label)
        finally:
            with contextlib.suppress(Exception):
                self.source.release(session)

    # -- from the monitor thread, on connections of their own ----------------------------

    def finish_elsewhere(self, held: Held, outcome: Outcome, *, call_error: bool) -> None:
        """End the claim on a fresh connection, not waiting on locks (monitor thread)."""
        values = outcome.values(held.table)
        try:
            with held.engine.connect() as conn:
                # Briefly: the stuck task's own transaction may hold the row, and
                # the process must be gone within about 2 s of the last signal.
                with held.dialect.short_lock_wait(conn, 0.3):
                    ok = _write(conn, held, values)
                    conn.commit()
        except Exception as exc:
            logger.warning(
                "%s: could not end its claim (%s); its lease will", held.label, first_line(exc)
            )
            return
        if ok and outcome.kind is not Kind.RELEASE:
            log_end(held, outcome.status, outcome.describe())
            # A retried outcome (PENDING again) calls no error(): only the last failure does.
            if call_error and outcome.kind is Kind.ERROR and outcome.exc is not None:
                self.error_in_new_session(held, outcome.exc)
        elif ok:
            logger.info("%s released: back to PENDING", held.label)


def _write(conn: Connection, held: Held, values: dict[str, Any]) -> bool:
    """Write ``values`` to the held task's row if the claim is still ours; False if not."""
    return held.dialect.finish(conn, held.table, held.claim, held.still_ours(), values)


def log_again(held: Held, outcome: Outcome) -> None:
    """A run that ended with the task PENDING again: snoozed, or failed and retried."""
    duration = time.monotonic() - held.started
    extra: dict[str, Any] = {"alchq_outcome": "RETRY", "alchq_duration": duration}
    if not outcome.failed:
        extra["alchq_outcome"] = "SNOOZED"
        logger.info(
            "%s snoozed after %.3fs: runs again in %gs",
            held.label,
            duration,
            outcome.again_in,
            extra=extra,
        )
        return
    policy = held.model.alchq_retry
    logger.warning(
        "%s failed in %.3fs (attempt %d of %d), retrying in %.1fs: %s",
        held.label,
        duration,
        held.failures + 1,
        policy.attempts if policy is not None else 1,
        outcome.again_in,
        outcome.describe(),
        extra=extra,
    )


def log_end(held: Held, status: Status, detail: str | None = None) -> None:
    duration = time.monotonic() - held.started
    extra = {"alchq_outcome": status.value, "alchq_duration": duration}
    if detail is None:
        logger.info("%s %s in %.3fs", held.label, status.value, duration, extra=extra)
    else:
        # A failed task is worth a look, but it is not the worker's error.
        logger.warning(
            "%s %s in %.3fs: %s", held.label, status.value, duration, detail, extra=extra
        )
