"""Claims ready tasks: the first stage of claim -> run -> record.

One statement per claim, committed before ``run()`` starts, so anyone looking
sees PROCESSING and no lock is held while the task runs (see the dialect seam
for how each database makes it atomic). A batch's claim also returns its
tasks' rows, from which their objects are built: no second round trip.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from sqlalchemy import Engine, inspect, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from alchq._binds import Binds
from alchq._dialects import Claim, ClaimPlan, claim_sort_key
from alchq._transitions import bump, claim_order, claim_values, ready
from alchq.config import Settings
from alchq.model import BaseQueue, rows_of, task_table

logger = logging.getLogger("alchq.worker")

#: How long a model whose claim could not load its tasks' objects (a row Python
#: cannot read, a table that lags the model) is claimed the plain way instead.
LOAD_PAUSE = 60.0


class Claimer:
    """Claims tasks for one worker."""

    def __init__(self, worker_id: str, binds: Binds, settings: Settings) -> None:
        self.worker_id = worker_id
        self.binds = binds
        self.settings = settings
        #: Claim statements, built once per (model, engine, limit).
        self._plans: dict[tuple[type[BaseQueue], int, int], ClaimPlan] = {}
        #: The same claims returning the tasks' columns, as ORM statements.
        self._loading: dict[tuple[type[BaseQueue], int, int], Any] = {}
        #: Models claimed the plain way until then (monotonic time).
        self._no_load: dict[type[BaseQueue], float] = {}

    def _plan(self, model: type[BaseQueue], engine: Engine, limit: int) -> ClaimPlan:
        plan = self._plans.get((model, id(engine), limit))
        if plan is None:
            table = task_table(model)
            plan = self._plans[(model, id(engine), limit)] = self.binds.dialect(engine).claim_plan(
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
        return plan

    def claim(self, session: Session, model: type[BaseQueue], limit: int = 1) -> list[Claim]:
        """Claim up to ``limit`` ready tasks of ``model`` (committed); their claims."""
        engine = self.binds.engine(session, model)
        try:
            plan = self._plan(model, engine, limit)
            claims = plan(self.binds.connection(session, model, bookkeeping=True))
            session.commit()
        except DBAPIError as exc:
            with contextlib.suppress(Exception):
                session.rollback()
            raise self.binds.diagnose(exc, model, engine) from exc
        self.binds.connected = True
        return claims

    def claim_loaded(
        self, session: Session, model: type[BaseQueue], limit: int
    ) -> tuple[list[Claim], dict[Any, BaseQueue]]:
        """Claim up to ``limit`` tasks as :meth:`claim` does, with their objects loaded in
        ``session`` from the claim's own rows (by key; not expired by the claim's
        commit). Where that cannot be done (no one-statement claim, a composite
        key, a row Python cannot read, a table that lags the model) the objects
        are left to the executor: ``{}``.
        """
        engine = self.binds.engine(session, model)
        table = task_table(model)
        plan = self._plan(model, engine, limit)
        pk = list(table.primary_key.columns)
        if len(pk) != 1 or time.monotonic() < self._no_load.get(model, 0.0):
            return self.claim(session, model, limit), {}
        stmt = None
        if plan.statement is not None:
            stmt = self._loading.get((model, id(engine), limit))
            if stmt is None:
                stmt = self._loading[(model, id(engine), limit)] = select(model).from_statement(
                    plan.statement.returning(*table.c)
                )
        try:
            conn = self.binds.connection(session, model, bookkeeping=True)
            try:
                fresh = {"populate_existing": True}
                if stmt is not None:
                    tasks = list(session.execute(stmt, execution_options=fresh).scalars())
                else:
                    # No one-statement claim (MySQL): claim, then read the claimed
                    # rows in one SELECT, still in the claim's transaction (they
                    # are locked: what is read is what the claim wrote).
                    keys = [claim.pk[0] for claim in plan(conn)]
                    read = select(model).where(pk[0].in_(keys))
                    tasks = (
                        list(session.execute(read, execution_options=fresh).scalars())
                        if keys
                        else []
                    )
            except DBAPIError as exc:
                if not self.binds.dialect(engine).is_schema_mismatch(exc):
                    raise
                return self._plainly(session, model, limit, exc)
            except Exception as exc:  # a value Python cannot read: each task says so alone
                return self._plainly(session, model, limit, exc)
            claims, loaded = self._claims(model, tasks)
            # Not expired by the claim's commit: they were just read, and the run
            # that follows would otherwise load each of them again.
            expire, session.expire_on_commit = session.expire_on_commit, False
            try:
                session.commit()
            finally:
                session.expire_on_commit = expire
        except DBAPIError as exc:
            with contextlib.suppress(Exception):
                session.rollback()
            raise self.binds.diagnose(exc, model, engine) from exc
        self.binds.connected = True
        return claims, loaded

    def _plainly(
        self, session: Session, model: type[BaseQueue], limit: int, exc: Exception
    ) -> tuple[list[Claim], dict[Any, BaseQueue]]:
        """The claim could not load its tasks: undo it, and claim the plain way for a while."""
        session.rollback()
        self._no_load[model] = time.monotonic() + LOAD_PAUSE
        logger.debug("%s: claiming without loading its tasks (%s)", model.__name__, exc)
        return self.claim(session, model, limit), {}

    def _claims(
        self, model: type[BaseQueue], tasks: list[BaseQueue]
    ) -> tuple[list[Claim], dict[Any, BaseQueue]]:
        """The claims of tasks loaded by the claim, in claim order; the tasks by key."""
        mapper = inspect(model)
        table = task_table(model)
        keys = [mapper.get_property_by_column(col).key for col in claim_order(table)]
        token = mapper.get_property_by_column(table.c.alchq_attempts).key

        tasks.sort(key=lambda task: claim_sort_key([getattr(task, k) for k in keys]))
        claims = []
        loaded: dict[Any, BaseQueue] = {}
        for task in tasks:
            pk = tuple(mapper.primary_key_from_instance(task))
            claims.append(Claim(pk, int(getattr(task, token))))
            loaded[pk[0]] = task
        return claims, loaded
