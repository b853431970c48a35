"""The worker registry: each live worker's row in ``alchq_workers``, and who is alive.

A worker registers before it claims anything, its heartbeat renews its row
every ``heartbeat_interval`` (``expires_at`` = now + ``lease``, on the
database's clock), and a worker that stops cleanly removes its row. A claim
stays alive while its worker's row is fresh: rescuers put back only claims
whose lease (set at claim) has run out *and* whose worker is gone.

Renewing a row of its own instead of the task's row keeps the heartbeat out of
the task's way: run()'s transaction may hold the task row's lock, and under
REPEATABLE READ or SERIALIZABLE an outside change to that row would make the
task's own outcome write fail.

The table lives in the task model's metadata, so ``create_all``, ``alchq
create-tables`` and Alembic create it; a worker that finds it missing creates
it itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Table,
    delete,
    exists,
    inspect,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError

from alchq import events
from alchq._binds import Binds, refusal, table_missing
from alchq._dialects import Dialect, utc_now
from alchq._link import link
from alchq._liveness import process_start, running_here, this_node
from alchq._util import first_line, safe_url
from alchq._version import __version__
from alchq.config import Settings
from alchq.exceptions import DatabaseError
from alchq.model import BaseQueue, progress_table, task_table, workers_table

logger = logging.getLogger("alchq.worker")

#: Rows of workers gone for longer than this are deleted by rescuers.
FORGET_AFTER = 3_600.0
#: Set by a supervising process for its children: its ``host:pid``.
SUPERVISOR_ENV = "ALCHQ_SUPERVISOR"


def owner_alive(table: Table, workers: Table) -> ColumnElement[bool]:
    """SQL: the owner of ``table``'s row has a fresh row in the registry."""
    w = workers.c
    return exists(
        select(w.id).where(w.id == table.c.alchq_worker, w.expires_at >= utc_now())
    ).correlate(table)


@dataclass(frozen=True)
class Place:
    """One registry table a worker registers in: an engine and its table."""

    engine: Engine
    table: Table
    #: the worker's models whose tasks live there
    models: tuple[type[BaseQueue], ...]


class Registry:
    """One worker's rows in the registry (one per database its models live in)."""

    def __init__(
        self,
        worker_id: str,
        binds: Binds,
        settings: Settings,
        models: Sequence[type[BaseQueue]],
    ) -> None:
        self.worker_id = worker_id
        self.binds = binds
        self.settings = settings
        self.models = list(models)
        self._places: list[Place] | None = None
        self._registered = False
        #: Tasks in hand, shown in the registry.
        self.in_hand = 0

    # -- this worker ----------------------------------------------------------------

    def places(self) -> list[Place]:
        """The registry tables of the worker's models, each once."""
        if self._places is None:
            found: dict[tuple[Engine, str], list[type[BaseQueue]]] = {}
            tables: dict[tuple[Engine, str], Table] = {}
            session = self.binds.source.open()
            try:
                for model in self.models:
                    engine = self.binds.engine(session, model)
                    table = workers_table(task_table(model).metadata)
                    found.setdefault((engine, table.fullname), []).append(model)
                    tables[engine, table.fullname] = table
            finally:
                with contextlib.suppress(Exception):
                    self.binds.source.release(session)
            self._places = [
                Place(where[0], tables[where], tuple(models)) for where, models in found.items()
            ]
        return self._places

    def register(self) -> None:
        """Insert this worker's rows (creating the table if missing).

        A failure is raised as the claim would raise it: a clear error for a
        wrong URL or a missing task table, the database's error otherwise.
        """
        if self._registered:
            return
        for place in self.places():
            self.binds.dialect(place.engine)
            try:
                self._upsert(place)
            except DBAPIError as exc:
                if not self._ensure_table(place):
                    raise self.binds.diagnose(exc, place.models[0], place.engine) from exc
                try:
                    self._upsert(place)
                except DBAPIError as again:
                    raise self.binds.diagnose(again, place.models[0], place.engine) from again
        self._registered = True
        for place in self.places():
            self._ensure_progress_table(place)
        events.emit(events.Event("worker_started", self.worker_id))

    def _ensure_progress_table(self, place: Place) -> None:
        """Create ``alchq_progress`` beside the registry if it is missing (a database
        made before it existed); without it, progress and cancelling running tasks
        are off (the reporter says so)."""
        table = progress_table(place.table.metadata)
        try:
            if not inspect(place.engine).has_table(table.name, schema=table.schema):
                table.create(place.engine, checkfirst=True)
                logger.info("created the table %s in %s", table.name, safe_url(place.engine))
        except DBAPIError as exc:
            logger.warning("could not create the table %s: %s", table.name, first_line(exc))

    def heartbeat(self) -> None:
        """Renew this worker's rows (monitor thread). Raises what the database raises."""
        if not self._registered:
            return
        for place in self.places():
            with self.binds.connect(place.engine) as conn:
                with self.binds.dialect(place.engine).short_lock_wait(conn, 1.0):
                    renewed = conn.execute(
                        update(place.table)
                        .where(place.table.c.id == self.worker_id)
                        .values(self._renewal())
                    ).rowcount
                    conn.commit()
            if renewed == 0:  # removed by someone (an operator, a rescuer): again
                self._upsert(place)

    def deregister(self) -> None:
        """Remove this worker's rows: it stopped cleanly (best effort)."""
        if not self._registered:
            return
        self._registered = False
        events.emit(events.Event("worker_stopped", self.worker_id))
        link.send("bye", id=self.worker_id)
        for place in self.places():
            try:
                with self.binds.connect(place.engine) as conn:
                    with self.binds.dialect(place.engine).short_lock_wait(conn, 1.0):
                        conn.execute(delete(place.table).where(place.table.c.id == self.worker_id))
                        conn.commit()
            except Exception as exc:
                logger.debug("could not remove worker %s: %s", self.worker_id, first_line(exc))

    def _renewal(self) -> dict[str, Any]:
        return {
            "heartbeat_at": utc_now(),
            "expires_at": utc_now(self.settings.lease),
            "in_hand": self.in_hand,
        }

    def _upsert(self, place: Place) -> None:
        row = {
            "id": self.worker_id,
            "host": socket.gethostname()[:255],
            "pid": os.getpid(),
            "node": this_node(),
            "process_start": process_start(os.getpid()),
            "supervisor": os.environ.get(SUPERVISOR_ENV) or None,
            "models": ", ".join(m.__name__ for m in self.models),
            "version": __version__,
            "started_at": utc_now(),
            **self._renewal(),
        }
        with self.binds.connect(place.engine) as conn:
            conn.execute(delete(place.table).where(place.table.c.id == self.worker_id))
            conn.execute(place.table.insert().values(row))
            conn.commit()

    def _ensure_table(self, place: Place) -> bool:
        """Create the registry table if it is missing; True if it exists now.

        It may exist although the first insert failed: another worker starting
        at the same moment created it in between (then the insert is worth
        another try). Not created in a database without the task tables: that
        is the wrong database.
        """
        table = place.table
        try:
            if inspect(place.engine).has_table(table.name, schema=table.schema):
                return True
        except DBAPIError:
            return False
        command = "flask alchq" if self.binds.source.scoped is not None else "alchq"
        for model in place.models:
            missing = table_missing(model, place.engine, command)
            if missing is not None:
                raise missing
        try:
            table.create(place.engine, checkfirst=True)
        except DBAPIError as err:
            with contextlib.suppress(DBAPIError):
                if inspect(place.engine).has_table(table.name, schema=table.schema):
                    return True  # another worker, starting at the same moment, made it
            dialect = self.binds.dialect(place.engine)
            if dialect.is_transient(err):
                raise  # e.g. a read-only window: waited out like any outage
            raise DatabaseError(
                f"{refusal(dialect, err)} in {safe_url(place.engine)}: {first_line(err)} "
                f"(the worker registry table {table.name!r} is missing and could not be "
                "created: create it with `alchq create-tables`, db.create_all() or a migration)"
            ) from err
        logger.info(
            "created the worker registry table %s in %s", table.name, safe_url(place.engine)
        )
        return True


def renew(binds: Binds, places: Sequence[Place], ids: Sequence[str], lease: float) -> None:
    """Renew the registry rows of workers ``ids`` (their supervisor's heartbeat)."""
    if not ids:
        return
    for place in places:
        with binds.connect(place.engine) as conn:
            with binds.dialect(place.engine).short_lock_wait(conn, 1.0):
                conn.execute(
                    update(place.table)
                    .where(place.table.c.id.in_(list(ids)))
                    .values(heartbeat_at=utc_now(), expires_at=utc_now(lease))
                )
                conn.commit()


def lost_owners(conn: Connection, table: Table, expired: ColumnElement[bool]) -> list[Any]:
    """Owners of ``table``'s expired claims that the registry does not know alive.

    The cheap first step of a rescue: usually there are none.
    """
    workers = workers_table(table.metadata)
    w = workers.c
    stmt = (
        select(table.c.alchq_worker, w.node, w.pid, w.process_start)
        .select_from(table.outerjoin(workers, w.id == table.c.alchq_worker))
        .where(expired, w.id.is_(None) | (w.expires_at < utc_now()))
        .distinct()
    )
    return list(conn.execute(stmt).all())


def alive_here(owners: Iterable[Any]) -> list[str]:
    """The owners whose process runs on this machine and is not stopped: alive,
    whatever their heartbeat says."""
    return [
        row.alchq_worker
        for row in owners
        if row.alchq_worker is not None and running_here(row.node, row.pid, row.process_start)
    ]


def forget_gone(conn: Connection, table: Table, dialect: Dialect) -> int:
    """Delete registry rows of workers gone for over :data:`FORGET_AFTER` seconds
    (up to a thousand a time).

    Rows locked by others are skipped: a frozen worker's heartbeat may hold its
    own row, and on MySQL a DELETE waits even for rows its WHERE leaves out.
    """
    workers = workers_table(table.metadata)
    stale = workers.c.expires_at < utc_now(-FORGET_AFTER)
    return dialect.delete_batch(conn, workers, stale, 1000)
