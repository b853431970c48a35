"""What the ``alchq`` and ``flask alchq`` commands do, shared by both front ends."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from alchq._imports import import_model
from alchq._util import first_line, safe_url
from alchq.exceptions import ConfigurationError, DatabaseError
from alchq.model import BaseQueue
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
    if not url:
        raise ConfigurationError(
            "no database URL: pass --database-url URL or set ALCHQ_DATABASE_URL"
        )
    try:
        return create_engine(url)
    except NoSuchModuleError as exc:
        raise ConfigurationError(f"unknown database URL scheme in {_hide(url)}: {exc}") from None
    except ArgumentError as exc:
        raise ConfigurationError(f"bad database URL {_hide(url)}: {exc}") from None
    except ModuleNotFoundError as exc:
        hint = " (pip install 'alchq[postgres]')" if "psycopg" in str(exc.name) else ""
        raise ConfigurationError(f"database driver {exc.name!r} is not installed{hint}") from None


def _hide(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable URL>"


def run_worker(
    models: Sequence[type[BaseQueue]],
    *,
    burst: bool,
    max_tasks: int | None,
    **worker_kwargs: Any,
) -> int:
    """Run a worker; return how many tasks it processed."""
    worker = Worker(*models, **worker_kwargs)
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
    while done < limit and worker.process_one() is not None:
        done += 1
    return done


def create_tables(models: Sequence[type[BaseQueue]], engine: Engine) -> list[str]:
    """Create the tables (and indexes) of ``models`` that do not exist yet."""
    tables = [m.__table__ for m in models]  # type: ignore[attr-defined]
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
