"""Claims ready tasks: the first stage of claim -> run -> record.

One statement per claim, committed before ``run()`` starts, so anyone looking
sees PROCESSING and no lock is held while the task runs (see the dialect seam
for how each database makes it atomic).
"""

from __future__ import annotations

import contextlib

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from alchq._binds import Binds
from alchq._dialects import Claim, ClaimPlan
from alchq._transitions import bump, claim_order, claim_values, ready
from alchq.config import Settings
from alchq.model import BaseQueue, rows_of, task_table


class Claimer:
    """Claims tasks for one worker."""

    def __init__(self, worker_id: str, binds: Binds, settings: Settings) -> None:
        self.worker_id = worker_id
        self.binds = binds
        self.settings = settings
        #: Claim statements, built once per (model, engine, limit).
        self._plans: dict[tuple[type[BaseQueue], int, int], ClaimPlan] = {}

    def claim(self, session: Session, model: type[BaseQueue], limit: int = 1) -> list[Claim]:
        """Claim up to ``limit`` ready tasks of ``model`` (committed); their claims."""
        engine = self.binds.engine(session, model)
        table = task_table(model)
        try:
            dialect = self.binds.dialect(engine)
            plan = self._plans.get((model, id(engine), limit))
            if plan is None:
                plan = self._plans[(model, id(engine), limit)] = dialect.claim_plan(
                    table,
                    ready=ready(table) & rows_of(model),
                    order_by=claim_order(table),
                    values=claim_values(
                        self.worker_id,
                        self.settings.lease,
                        alchq_attempts=bump(table.c.alchq_attempts),
                    ),
                    token_column="alchq_attempts",  # noqa: S106 - not a password
                    limit=limit,
                )
            claims = plan(self.binds.connection(session, model, bookkeeping=True))
            session.commit()
        except DBAPIError as exc:
            with contextlib.suppress(Exception):
                session.rollback()
            raise self.binds.diagnose(exc, model, engine) from exc
        self.binds.connected = True
        return claims
