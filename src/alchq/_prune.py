"""Retention: delete finished tasks older than an age, in short batches.

::

    alchq.prune(MyTask, engine=engine)                          # ages from the settings
    alchq.prune(MyTask, engine=engine, processed=timedelta(days=1), error=None)

Only PROCESSED, ERROR and CANCELLED rows are ever deleted, each status by its
own age, measured on the database's clock from ``alchq_finished_at`` (from
``time_updated`` for finished rows without one, e.g. written by hand). Every
batch is its own transaction and skips rows locked by others, so pruning never
holds locks for long nor waits behind a worker.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from datetime import timedelta
from types import EllipsisType
from typing import Any

from sqlalchemy import ColumnElement, Engine, Table, delete, select, tuple_
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from alchq._binds import Binds
from alchq._dialects import utc_now
from alchq._sessions import SessionSource, resolve
from alchq._util import first_line
from alchq.config import Settings, parse_age
from alchq.exceptions import ConfigurationError, TaskNotFoundError
from alchq.model import (
    FINISHED,
    BaseQueue,
    Status,
    check_task_model,
    key_values,
    progress_table,
    rows_of,
    status_is,
    task_table,
)

__all__ = ["prune"]

logger = logging.getLogger("alchq.prune")

#: An age: seconds, a timedelta, text such as "7d" or "never", or None (never).
Age = timedelta | float | str | None


def prune(
    *models: type[BaseQueue],
    session_factory: Any = None,
    engine: Engine | None = None,
    processed: Age | EllipsisType = ...,
    error: Age | EllipsisType = ...,
    cancelled: Age | EllipsisType = ...,
    batch_size: int | None = None,
) -> dict[str, int]:
    """Delete the models' finished tasks older than their status's age.

    :param models: the BaseQueue models to prune.
    :param session_factory: a ``sessionmaker``, ``scoped_session``, Flask-SQLAlchemy
        ``db`` or any callable returning a Session (or pass ``engine=``; inside a
        Flask app context neither is needed).
    :param processed: age after which PROCESSED tasks go: a ``timedelta``, seconds,
        text (``"12h"``, ``"7d"``) or None / ``"never"`` to keep them.
        Default: the ``prune_processed_after`` setting (7 days).
    :param error: the same for ERROR tasks (default ``prune_error_after``, 30 days).
    :param cancelled: the same for CANCELLED tasks (default ``prune_cancelled_after``,
        7 days).
    :param batch_size: rows per transaction (default ``prune_batch_size``, 1000).
    :returns: how many rows were deleted per status, e.g.
        ``{"PROCESSED": 120, "ERROR": 3, "CANCELLED": 0}`` (summed over the models).

    Database errors propagate as SQLAlchemy raises them; rows deleted by batches
    committed before the error stay deleted. Example::

        alchq.prune(MyTask, engine=engine, processed=timedelta(days=1), error="never")
    """
    if not models:
        raise TypeError("prune needs at least one BaseQueue model")
    checked = [check_task_model(m) for m in models]
    source = resolve(session_factory, engine)
    settings = Settings.load(app_config=source.app_config)
    ages = resolve_ages(settings, processed=processed, error=error, cancelled=cancelled)
    size = settings.prune_batch_size if batch_size is None else check_batch_size(batch_size)
    total = {s.value: 0 for s in FINISHED}
    binds = Binds(source)
    for model in checked:
        for status, n in prune_model(binds, model, ages, size).items():
            total[status] += n
    return total


def resolve_ages(
    settings: Settings,
    *,
    processed: Age | EllipsisType = ...,
    error: Age | EllipsisType = ...,
    cancelled: Age | EllipsisType = ...,
) -> dict[Status, float | None]:
    """Each finished status's age in seconds (None: keep): the argument, else the setting."""
    given = {Status.PROCESSED: processed, Status.ERROR: error, Status.CANCELLED: cancelled}
    defaults = {
        Status.PROCESSED: settings.prune_processed_after,
        Status.ERROR: settings.prune_error_after,
        Status.CANCELLED: settings.prune_cancelled_after,
    }
    return {
        status: defaults[status] if value is ... else parse_age(value, status.value.lower())
        for status, value in given.items()
    }


def check_batch_size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"batch_size must be a whole number of 1 or more, got {value!r}")
    return value


def prune_model(
    binds: Binds,
    model: type[BaseQueue],
    ages: Mapping[Status, float | None],
    batch_size: int,
    stop: Callable[[], bool] = lambda: False,
) -> dict[str, int]:
    """Prune one model's table; return how many rows went per status.

    ``stop`` is asked between batches, so a worker told to stop does not
    first work through a large backlog.
    """
    table = task_table(model)
    counts = {s.value: 0 for s in FINISHED}
    session = private_session(binds.source)
    try:
        # The first use of an engine prepares it (SQLite: wait for the workers'
        # write lock instead of failing at once).
        dialect = binds.dialect_of(session, model)
        mine = rows_of(model)  # a subclass's rows only (single-table inheritance)
        for status, where in _targets(table, ages):
            where = where & mine
            while not stop():
                try:
                    conn = binds.connection(session, model, bookkeeping=True)
                    deleted = dialect.delete_batch(conn, table, where, batch_size)
                    # Commit each batch: locks last one batch, and work done stays done.
                    session.commit()
                except BaseException:
                    with contextlib.suppress(Exception):
                        session.rollback()
                    raise
                counts[status.value] += deleted
                if deleted < batch_size:
                    break
        _prune_progress(binds, session, model, ages, batch_size, stop)
    finally:
        with contextlib.suppress(Exception):
            session.close()
    return counts


def _prune_progress(
    binds: Binds,
    session: Session,
    model: type[BaseQueue],
    ages: Mapping[Status, float | None],
    batch_size: int,
    stop: Callable[[], bool],
) -> None:
    """Delete the progress rows (``alchq_progress``) of tasks that are gone, once as old
    as the shortest age: what a task reported is kept while the task is.

    A batch of old progress rows at a time; their tasks are looked up by primary
    key (the keys read back from their text), never by a scan of the task table.
    """
    kept = [age for age in ages.values() if age is not None]
    if not kept:
        return
    table = task_table(model)
    notes = progress_table(table.metadata)
    n = notes.c
    old = (n.task_table == table.fullname) & (n.updated_at < utc_now(-min(kept)))
    pk = list(table.primary_key)
    key = tuple_(*pk) if len(pk) > 1 else pk[0]
    after: str | None = None
    while not stop():
        try:
            conn = binds.connection(session, model, bookkeeping=True)
            page = select(n.task_key).where(old).order_by(n.task_key).limit(batch_size)
            if after is not None:
                page = page.where(n.task_key > after)
            texts = list(conn.execute(page).scalars())
            if not texts:
                session.commit()
                return
            after = texts[-1]
            keys: dict[tuple[Any, ...], str] = {}
            for text in texts:
                with contextlib.suppress(TaskNotFoundError):  # unreadable: its task is gone
                    keys[key_values(model, text)] = text
            found = (
                conn.execute(
                    select(*pk).where(key.in_([k if len(k) > 1 else k[0] for k in keys]))
                ).all()
                if keys
                else []
            )
            alive = {keys[tuple(row)] for row in found if tuple(row) in keys}
            gone = [t for t in texts if t not in alive]
            if gone:
                conn.execute(
                    delete(notes).where(n.task_table == table.fullname, n.task_key.in_(gone))
                )
            session.commit()
        except DBAPIError as exc:
            # A database made before the table existed: nothing to prune there.
            with contextlib.suppress(Exception):
                session.rollback()
            logger.debug("progress rows of %s not pruned: %s", table.name, first_line(exc))
            return
        if len(texts) < batch_size:
            return


def private_session(source: SessionSource) -> Session:
    """A session of prune's own, also under Flask-SQLAlchemy: committing batches
    must not commit, nor closing remove, the caller's ``db.session``."""
    if source.scoped is not None:
        session: Session = source.scoped.session_factory()
        return session
    return source.open()


def _targets(
    table: Table, ages: Mapping[Status, float | None]
) -> list[tuple[Status, ColumnElement[bool]]]:
    """The WHERE clauses of the rows to delete, per status with an age."""
    c = table.c
    targets: list[tuple[Status, ColumnElement[bool]]] = []
    for status in FINISHED:
        age = ages.get(status)
        if age is None:
            continue
        cutoff = utc_now(-age)  # the database's clock, like every time alchq compares
        finished = status_is(c.status, status)
        # Two statements rather than one OR: each is a range on the
        # (status, alchq_finished_at) index (NULLs are indexed too).
        targets.append((status, finished & (c.alchq_finished_at < cutoff)))
        targets.append(
            (status, finished & c.alchq_finished_at.is_(None) & (c.time_updated < cutoff))
        )
    return targets


def describe(
    table_name: str, counts: Mapping[str, int], ages: Mapping[Status, float | None]
) -> str:
    """One line: ``pruned 120 PROCESSED, 3 ERROR, 0 CANCELLED from my_task``.

    Statuses kept forever are named at the end instead of counted.
    """
    pruned = [f"{counts.get(s.value, 0)} {s.value}" for s in FINISHED if ages.get(s) is not None]
    kept = [s.value for s in FINISHED if ages.get(s) is None]
    line = f"pruned {', '.join(pruned) or 'nothing'} from {table_name}"
    return line + (f" (kept: {', '.join(kept)})" if kept else "")


def prune_periodically(
    binds: Binds,
    models: list[type[BaseQueue]],
    settings: Settings,
    stop: Callable[[], bool],
) -> None:
    """A worker's periodic pruning: log what went, never raise.

    Pruning is housekeeping: a database that is away, or a row that cannot be
    deleted, must not keep the worker from its tasks. On the first failure it
    logs one line and gives up until the next interval.
    """
    ages = resolve_ages(settings)
    for model in models:
        try:
            counts = prune_model(binds, model, ages, settings.prune_batch_size, stop)
        except Exception as exc:
            if isinstance(exc, DBAPIError) and binds.is_transient(exc):
                logger.warning("pruning skipped, database unavailable: %s", first_line(exc))
            else:
                logger.error(
                    "pruning %s failed: %s: %s", model.__name__, type(exc).__name__, first_line(exc)
                )
                logger.debug("pruning traceback", exc_info=True)
            return
        if any(counts.values()):
            logger.info("%s", describe(task_table(model).name, counts, ages))
