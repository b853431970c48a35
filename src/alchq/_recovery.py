"""Rescue: claims whose worker was lost go back to PENDING, or end after too many losses.

Every worker runs it between tasks, every ``rescue_interval``. A claim is lost
when its lease (set when it was claimed) has run out *and* its worker is gone:
no fresh row in the worker registry, and, for a worker on this machine, no
such process alive and running. One conditional statement then puts those
rows back to PENDING with ``alchq_lost_claims + 1``; a row lost
``max_lost_claims`` times is claimed by the rescuer instead, which ends it in
ERROR with :class:`alchq.WorkerLostError` and calls its error() once.
"""

from __future__ import annotations

import contextlib
import logging
import time

from sqlalchemy.exc import DBAPIError

from alchq._binds import Binds
from alchq._held import Held, label
from alchq._monitor import Monitor
from alchq._outcome import Kind, Outcome
from alchq._recorder import Recorder
from alchq._registry import alive_here, forget_gone, lost_owners, owner_alive
from alchq._transitions import bump, claim_values, expired, released
from alchq.config import Settings
from alchq.exceptions import WorkerLostError
from alchq.model import BaseQueue, task_table, workers_table

logger = logging.getLogger("alchq.worker")


class Rescuer:
    """Rescues the lost claims of the models one worker serves."""

    def __init__(
        self,
        worker_id: str,
        binds: Binds,
        monitor: Monitor,
        recorder: Recorder,
        settings: Settings,
    ) -> None:
        self.worker_id = worker_id
        self.binds = binds
        self.source = binds.source
        self.monitor = monitor
        self.recorder = recorder
        self.settings = settings
        self._next = 0.0

    def maybe_rescue(self, models: list[type[BaseQueue]]) -> None:
        """Rescue, if a rescue interval has passed since the last time."""
        if time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.settings.rescue_interval
        for model in models:
            self.rescue(model)

    def rescue(self, model: type[BaseQueue]) -> None:
        """Put tasks of lost workers back, or end them once they were lost too often."""
        session = self.source.open()
        try:
            table = task_table(model)
            c = table.c
            engine = self.binds.engine(session, model)
            dialect = self.binds.dialect(engine)
            workers = workers_table(table.metadata)
            max_lost = int(self.settings.max_lost_claims)
            try:
                conn = self.binds.connection(session, model)
                owners = lost_owners(conn, table, expired(table))
                forget_gone(conn, table)
                session.commit()
                if not owners:
                    self.binds.connected = True
                    return
                # Alive on this machine, whatever its heartbeat says: not lost.
                alive = alive_here(owners)
                lease_out = expired(table) & ~owner_alive(table, workers)
                if alive:
                    lease_out &= c.alchq_worker.is_(None) | c.alchq_worker.not_in(alive)
                back = dialect.claim(
                    self.binds.connection(session, model),
                    table,
                    ready=lease_out & (c.alchq_lost_claims + 1 < max_lost),
                    order_by=[c.alchq_lease_until],
                    values={**released(), "alchq_lost_claims": bump(c.alchq_lost_claims)},
                    token_column="alchq_lost_claims",  # noqa: S106 - not a password
                    limit=100,
                )
                session.commit()
                lost = dialect.claim(
                    self.binds.connection(session, model),
                    table,
                    ready=lease_out & (c.alchq_lost_claims + 1 >= max_lost),
                    order_by=[c.alchq_lease_until],
                    values=claim_values(
                        self.worker_id,
                        self.settings.lease,
                        alchq_attempts=bump(c.alchq_attempts),
                        alchq_lost_claims=bump(c.alchq_lost_claims),
                    ),
                    token_column="alchq_attempts",  # noqa: S106 - not a password
                    limit=10,
                )
                session.commit()
            except DBAPIError as exc:
                with contextlib.suppress(Exception):
                    session.rollback()
                raise self.binds.diagnose(exc, model, engine) from exc
            self.binds.connected = True
            for claim in back:
                logger.warning(
                    "%s: its worker was lost (lease expired); back to PENDING "
                    "(lost claims: %d of %d)",
                    label(model, claim),
                    claim.token,
                    max_lost,
                )
            for claim in lost:
                held = Held(
                    model=model,
                    claim=claim,
                    worker_id=self.worker_id,
                    table=table,
                    engine=engine,
                    dialect=dialect,
                    time_limit=float(model.alchq_time_limit),
                )
                self.monitor.hold(held)
                try:
                    task = session.get(model, held.key, populate_existing=True)
                    gone = WorkerLostError(
                        f"{held.label} lost its worker {max_lost} times (killed, frozen or "
                        "cut off mid-run); giving up"
                    )
                    self.recorder.record(session, held, Outcome(Kind.ERROR, gone, None), task)
                finally:
                    if not self.recorder.holds(held):
                        self.monitor.drop(held)
        finally:
            with contextlib.suppress(Exception):
                self.source.release(session)
