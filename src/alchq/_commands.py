"""What the ``alchq`` and ``flask alchq`` commands do, shared by both front ends."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from sqlalchemy import Engine, create_engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from alchq import _prune
from alchq._binds import Binds, engine_of, table_missing
from alchq._imports import import_model
from alchq._sessions import SessionSource, resolve
from alchq._util import first_line, fix_userinfo, mask_urls_in, remember_secrets, safe_url
from alchq.config import Settings, parse_age
from alchq.exceptions import ConfigurationError, DatabaseError
from alchq.model import BaseQueue, Status, task_table, ticks_table, workers_table
from alchq.worker import Worker

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def configure_logging(level: str = "INFO") -> None:
    """Send alchq's log lines to stderr unless the app already set up logging."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("alchq").setLevel(level.upper())


def load_models(refs: Sequence[str]) -> list[type[BaseQueue]]:
    if not refs:
        raise ConfigurationError("name at least one task model, as package.module:ClassName")
    return [import_model(ref) for ref in refs]


def make_engine(url: str | None) -> Engine:
    """The worker's engine for ``url`` (an unencoded ``@`` in the password is allowed)."""
    if not url:
        raise ConfigurationError(
            "no database URL: pass --database-url URL or set ALCHQ_DATABASE_URL"
        )
    try:
        parsed = fix_userinfo(make_url(url))
        remember_secrets(parsed)
        # Statement parameters are task data: never in an error message.
        return create_engine(parsed, hide_parameters=True)
    except NoSuchModuleError as exc:
        raise ConfigurationError(
            f"unknown database URL scheme in {_hide(url)}: {mask_urls_in(str(exc))}"
        ) from None
    except ArgumentError as exc:
        raise ConfigurationError(
            f"bad database URL {_hide(url)}: {mask_urls_in(str(exc))}"
        ) from None
    except ModuleNotFoundError as exc:
        hint = " (pip install 'alchq[postgres]')" if "psycopg" in str(exc.name) else ""
        raise ConfigurationError(f"database driver {exc.name!r} is not installed{hint}") from None


def _hide(url: str) -> str:
    return safe_url(url)


def run_worker(
    models: Sequence[type[BaseQueue]],
    *,
    burst: bool,
    max_tasks: int | None,
    started: Callable[[Worker], object] | None = None,
    **worker_kwargs: Any,
) -> int:
    """Run a worker; return how many tasks it processed.

    ``started`` is called with the worker before it claims anything (a pool
    uses it to stop the worker from another thread).
    """
    worker = Worker(*models, **worker_kwargs)
    if started is not None:
        started(worker)
    names = ", ".join(m.__name__ for m in models)
    logger = logging.getLogger("alchq.worker")
    logger.info("worker %s serving %s", worker.id, names)
    if max_tasks is not None:
        done = worker.process_n(max_tasks) if not burst else _burst_limit(worker, max_tasks)
    elif burst:
        done = worker.process_all()
    else:
        worker.run()
        done = -1
    logger.info("worker %s stopped", worker.id)
    return done


def _burst_limit(worker: Worker, limit: int) -> int:
    done = 0
    # process_one() does not look at stop(): a SIGTERM must end the loop here.
    while done < limit and not worker.stopping and worker.process_one() is not None:
        done += 1
    return done


def create_tables(models: Sequence[type[BaseQueue]], engine: Engine) -> list[str]:
    """Create the tables (and indexes) of ``models`` that do not exist yet."""
    tables = [task_table(m) for m in models]
    for model in models:
        extra = [workers_table(task_table(model).metadata)]  # the worker registry
        if model.alchq_periodic:  # the scheduler's table comes with the model
            extra.append(ticks_table(task_table(model).metadata))
        tables.extend(t for t in extra if t not in tables)
    by_metadata: dict[int, list[Any]] = {}
    for table in tables:
        by_metadata.setdefault(id(table.metadata), []).append(table)
    try:
        # One create_all per metadata, so foreign keys decide the order.
        for group in by_metadata.values():
            group[0].metadata.create_all(engine, tables=group)
    except DBAPIError as exc:
        raise DatabaseError(
            f"cannot create tables in {safe_url(engine)}: {first_line(exc)}"
        ) from exc
    return [t.name for t in tables]


def prune_tables(
    models: Sequence[type[BaseQueue]],
    *,
    older_than: str | None = None,
    processed: str | None = None,
    error: str | None = None,
    cancelled: str | None = None,
    batch_size: int | None = None,
    session_factory: Any = None,
    engine: Engine | None = None,
) -> Iterator[str]:
    """``prune``: one line of counts per model, as each is done. Ages are the command
    line's text; --older-than sets all three, a status's own option wins, None means
    the setting. Checks all its input before deleting anything."""
    # Parsed before anything touches the database: a typo deletes nothing.
    base = ... if older_than is None else parse_age(older_than, "--older-than")
    given = {
        option: base if value is None else parse_age(value, f"--{option}")
        for option, value in (("processed", processed), ("error", error), ("cancelled", cancelled))
    }
    size = None if batch_size is None else _prune.check_batch_size(batch_size)
    source = resolve(session_factory, engine)
    settings = Settings.load(app_config=source.app_config)
    ages = _prune.resolve_ages(settings, **given)
    return _prune_each(models, source, ages, size or settings.prune_batch_size)


def _prune_each(
    models: Sequence[type[BaseQueue]],
    source: SessionSource,
    ages: dict[Status, float | None],
    batch_size: int,
) -> Iterator[str]:
    binds = Binds(source)
    for model in models:
        table = task_table(model)
        try:
            counts = _prune.prune_model(binds, model, ages, batch_size)
        except DBAPIError as exc:
            raise _prune_failed(source, model, exc) from exc
        yield _prune.describe(table.name, counts, ages)


def _prune_failed(source: SessionSource, model: type[BaseQueue], exc: DBAPIError) -> DatabaseError:
    """A one-line error for a failed prune: the table is missing, or the database said why."""
    with _prune.private_session(source) as session:
        engine = engine_of(session, model)
    command = "flask alchq" if source.scoped is not None else "alchq"
    missing = table_missing(model, engine, command)
    if missing is not None:
        return missing
    table = task_table(model)
    return DatabaseError(f"cannot prune {table.name} in {safe_url(engine)}: {first_line(exc)}")
