"""Rescue: claims whose worker was lost go back to PENDING, or end after too many losses.

Every worker runs it between tasks, every ``rescue_interval``. A claim is lost
when its lease (set when it was claimed) has run out *and* its worker is gone:
no fresh row in the worker registry, and, for a worker on this machine, no
such process alive and running. One conditional statement then puts those
rows back to PENDING with ``alchq_lost_claims + 1``; a row lost
``max_lost_claims`` times is claimed by the rescuer instead, which ends it in
ERROR with :class:`alchq.WorkerLostError` and calls its error() once.

The same goes for an ERROR row whose error() was never finished (its lease is
still set) because its worker was lost: the rescuer calls error() itself.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, Engine, Table, delete, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from alchq import events
from alchq._binds import Binds
from alchq._dialects import Claim, Dialect, reached, utc_now
from alchq._held import Held, label
from alchq._monitor import Monitor
from alchq._outcome import Kind, Outcome, Ran
from alchq._recorder import Recorder
from alchq._registry import alive_here, forget_gone, lost_owners, owner_alive
from alchq._transitions import bump, claim_values, expired, released
from alchq.config import Settings
from alchq.exceptions import WorkerLostError
from alchq.model import BaseQueue, Status, key_text, rows_of, task_table, workers_table

logger = logging.getLogger("alchq.worker")


def owed_error(table: Table) -> ColumnElement[bool]:
    """ERROR rows whose error() is not done and whose lease for it ran out."""
    c = table.c
    return (
        (c.status == Status.ERROR)
        & c.alchq_lease_until.is_not(None)
        & reached(c.alchq_lease_until, utc_now(), strict=True)
    )


class Rescuer:
    """Rescues the lost claims of the models one worker serves."""

    def __init__(
        self,
        worker_id: str,
        binds: Binds,
        monitor: Monitor,
        recorder: Recorder,
        settings: Settings,
        adopt: Sequence[str] = (),
    ) -> None:
        self.worker_id = worker_id
        self.binds = binds
        self.source = binds.source
        self.monitor = monitor
        self.recorder = recorder
        self.settings = settings
        #: Workers this one replaced (its process's former self, or a dead process's):
        #: their claims are lost now, whatever their rows say.
        self._adopt = list(adopt)
        self._next = 0.0

    def maybe_rescue(self, models: list[type[BaseQueue]]) -> None:
        """Rescue, if a rescue interval has passed since the last time."""
        if time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.settings.rescue_interval
        for model in models:
            self.rescue(model)
        self._adopt = []

    def rescue(self, model: type[BaseQueue]) -> None:
        """Put tasks of lost workers back, end them once lost too often, finish their error()."""
        session = self.source.open()
        try:
            engine = self.binds.engine(session, model)
            try:
                back, lost, owed = self._take(session, model, engine)
            except DBAPIError as exc:
                with contextlib.suppress(Exception):
                    session.rollback()
                raise self.binds.diagnose(exc, model, engine) from exc
            max_lost = int(self.settings.max_lost_claims)
            for claim in back:
                logger.warning(
                    "%s: its worker was lost (lease expired); back to PENDING "
                    "(lost claims: %d of %d)",
                    label(model, claim),
                    claim.token,
                    max_lost,
                )
                rescued(self.worker_id, model, claim, "PENDING")
            dialect = self.binds.dialect(engine)
            for claim in lost:
                self._end_lost(session, model, engine, dialect, claim)
            for claim, row in owed:
                self._finish_error(model, engine, dialect, claim, row)
        finally:
            with contextlib.suppress(Exception):
                self.source.release(session)

    def _take(
        self, session: Session, model: type[BaseQueue], engine: Engine
    ) -> tuple[list[Claim], list[Claim], list[tuple[Claim, Any]]]:
        """Claim what is lost (committed): (back to PENDING, to end, error() owed)."""
        table = task_table(model)
        c = table.c
        dialect = self.binds.dialect(engine)
        workers = workers_table(table.metadata)
        conn = self.binds.connection(session, model, bookkeeping=True)
        if self._adopt:
            # This worker replaced those: they are gone, whatever their rows say.
            conn.execute(delete(workers).where(workers.c.id.in_(self._adopt)))
            conn.execute(
                update(table)
                .where(c.alchq_worker.in_(self._adopt), c.alchq_lease_until.is_not(None))
                .values(alchq_lease_until=utc_now(-1))
            )
        # A subclass's worker (single-table inheritance) recovers its own rows only.
        mine = rows_of(model)
        owners = lost_owners(conn, table, (expired(table) | owed_error(table)) & mine)
        forget_gone(conn, table, dialect)
        session.commit()
        if not owners:
            return [], [], []
        # Alive on this machine, whatever its heartbeat says: not lost.
        gone = ~owner_alive(table, workers)
        alive = alive_here(owners)
        if alive:
            gone &= c.alchq_worker.is_(None) | c.alchq_worker.not_in(alive)
        max_lost = int(self.settings.max_lost_claims)
        lease_out = expired(table) & gone & mine

        def take(ready: ColumnElement[bool], values: dict[str, Any], token: str) -> list[Claim]:
            claims = dialect.claim(
                self.binds.connection(session, model, bookkeeping=True),
                table,
                ready=ready,
                order_by=[c.alchq_lease_until],
                values=values,
                token_column=token,
                limit=100,
            )
            session.commit()
            return claims

        back = take(
            lease_out & (c.alchq_lost_claims + 1 < max_lost),
            {**released(), "alchq_lost_claims": bump(c.alchq_lost_claims)},
            "alchq_lost_claims",
        )
        lost = take(
            lease_out & (c.alchq_lost_claims + 1 >= max_lost),
            claim_values(
                self.worker_id,
                self.settings.lease,
                alchq_attempts=bump(c.alchq_attempts),
                alchq_lost_claims=bump(c.alchq_lost_claims),
            ),
            "alchq_attempts",
        )
        budget = float(model.alchq_error_time_limit) + self.settings.kill_after
        owed_claims = take(
            owed_error(table) & gone & mine,
            {
                "alchq_worker": self.worker_id,
                "alchq_lease_until": utc_now(budget),
                "alchq_lost_claims": bump(c.alchq_lost_claims),
                "time_updated": utc_now(),
            },
            "alchq_attempts",
        )
        owed: list[tuple[Claim, Any]] = []
        for claim in owed_claims:
            pk = [col == v for col, v in zip(table.primary_key, claim.pk, strict=True)]
            row = session.execute(
                select(c.alchq_error_type, c.alchq_error_message, c.alchq_lost_claims).where(*pk)
            ).one()
            owed.append((claim, row))
        session.rollback()
        return back, lost, owed

    def _held(self, model: type[BaseQueue], engine: Engine, dialect: Dialect, claim: Claim) -> Held:
        return Held(
            model=model,
            claim=claim,
            worker_id=self.worker_id,
            table=task_table(model),
            engine=engine,
            dialect=dialect,
            time_limit=float(model.alchq_time_limit),
        )

    def _end_lost(
        self,
        session: Session,
        model: type[BaseQueue],
        engine: Engine,
        dialect: Dialect,
        claim: Claim,
    ) -> None:
        held = self._held(model, engine, dialect, claim)
        max_lost = int(self.settings.max_lost_claims)
        self.monitor.hold(held)
        try:
            task = session.get(model, held.key, populate_existing=True)
            gone = WorkerLostError(
                f"{held.label} lost its worker {max_lost} times (killed, frozen or "
                "cut off mid-run); giving up"
            )
            if task is not None:
                held.failures = task.alchq_failures
                held.lost_claims = task.alchq_lost_claims
            outcome = Outcome(Kind.ERROR, gone, None)
            rescued(self.worker_id, model, claim, "ERROR")
            self.recorder.record(Ran(outcome, task, session), held)
        finally:
            if not self.recorder.holds(held):
                self.monitor.drop(held)

    def _finish_error(
        self, model: type[BaseQueue], engine: Engine, dialect: Dialect, claim: Claim, row: Any
    ) -> None:
        """Call the error() a lost worker did not finish (bounded by max_lost_claims)."""
        held = self._held(model, engine, dialect, claim)
        if row.alchq_lost_claims >= int(self.settings.max_lost_claims):
            logger.error(
                "%s: its error() was interrupted with its worker %d times; giving up on it",
                held.label,
                row.alchq_lost_claims,
            )
            self.recorder.clear_error_lease(held)
            return
        exc = WorkerLostError(
            f"{held.label}: its error() was interrupted when its worker was lost; the task "
            f"had failed with {row.alchq_error_type}: {row.alchq_error_message}"
        )
        logger.warning("%s: its worker was lost during error(); calling it again", held.label)
        self.recorder.call_error(held, exc)


def rescued(worker_id: str, model: type[BaseQueue], claim: Claim, outcome: str) -> None:
    """A lost worker's task was put back (PENDING) or ended (ERROR) by this worker."""
    events.emit(
        events.Event(
            "task_rescued", worker_id, model.__name__, key_text(claim.pk), claim.token, outcome
        )
    )
