"""What the ``alchq`` and ``flask alchq`` commands do, shared by both front ends."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from sqlalchemy import URL, Engine, create_engine, event, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from alchq import _prune
from alchq._binds import Binds, engine_of, table_missing
from alchq._imports import import_model
from alchq._sessions import SessionSource, resolve
from alchq._util import first_line, fix_userinfo, mask_urls_in, remember_secrets, safe_url
from alchq.config import Settings, parse_age
from alchq.exceptions import ConfigurationError, DatabaseError
from alchq.model import (
    BaseQueue,
    Status,
    progress_table,
    task_table,
    ticks_table,
    workers_table,
)
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


#: What a database URL may start with, for the error that names them.
ACCEPTED_SCHEMES = (
    "sqlite, postgresql (also postgres), mysql, mariadb, "
    "or any installed SQLAlchemy dialect as dialect+driver://"
)
#: The variables the ``alchq`` command reads a database URL from, in order.
URL_VARIABLES = ("ALCHQ_DATABASE_URL", "DATABASE_URL")
#: Drivers tried, in order, for a URL that names none: (SQLAlchemy name, module).
_DRIVERS = {
    "postgresql": (("psycopg", "psycopg"), ("psycopg2", "psycopg2")),
    "mysql": (("mysqldb", "MySQLdb"), ("pymysql", "pymysql")),
    "mariadb": (("mysqldb", "MySQLdb"), ("pymysql", "pymysql")),
}
_TITLES = {"postgresql": "PostgreSQL", "mysql": "MySQL", "mariadb": "MariaDB"}
_INSTALL = {
    "postgresql": "pip install 'alchq[postgres]'",
    "mysql": "pip install pymysql (or mysqlclient)",
    "mariadb": "pip install pymysql (or mysqlclient)",
}


def make_engine(url: str | None, *, may_create: bool = False, models: Sequence[str] = ()) -> Engine:
    """The worker's engine for ``url`` (an unencoded ``@`` in the password is allowed).

    ``postgres://`` means PostgreSQL; a URL naming no driver gets an installed one.
    A SQLite file must exist unless ``may_create`` (``create-tables``); a relative
    path is made absolute, from the current directory. ``models``: the command
    line's, for the command that creates a missing database.
    """
    if not url:
        variables = " or ".join(URL_VARIABLES)
        raise ConfigurationError(f"no database URL: pass --database-url URL or set {variables}")
    try:
        parsed = fix_userinfo(make_url(url))
    except ArgumentError as exc:
        raise ConfigurationError(
            f"bad database URL {_hide(url)}: {mask_urls_in(str(exc))} "
            f"(expected SCHEME://..., SCHEME one of: {ACCEPTED_SCHEMES})"
        ) from None
    remember_secrets(parsed)
    parsed = _absolute_sqlite(_with_driver(parsed))
    engine = _create_engine(url, parsed)
    guard_sqlite_file(
        engine,
        may_create=may_create,
        command=create_tables_hint("alchq", models),
        origin=_relative_origin(url),
    )
    return engine


def _create_engine(url: str, parsed: URL) -> Engine:
    """create_engine(), its errors as one line (it does not connect)."""
    try:
        # Statement parameters are task data: never in an error message.
        return create_engine(parsed, hide_parameters=True)
    except NoSuchModuleError:
        backend, plus, driver = parsed.drivername.partition("+")
        if plus and _known_dialect(backend):
            raise ConfigurationError(
                f"unknown database driver {driver!r} for {backend} in {_hide(url)}: "
                f"name an installed one, or none ({backend}://)"
            ) from None
        raise ConfigurationError(
            f"unknown database URL scheme {parsed.drivername!r} in {_hide(url)}: "
            f"use {ACCEPTED_SCHEMES}"
        ) from None
    except ArgumentError as exc:
        raise ConfigurationError(
            f"bad database URL {_hide(url)}: {mask_urls_in(str(exc))}"
        ) from None
    except ModuleNotFoundError as exc:
        backend = parsed.get_backend_name()
        hint = f" ({_INSTALL[backend]})" if backend in _INSTALL else ""
        if exc.name == "psycopg2":  # alchq[postgres] is psycopg 3
            hint = " (pip install psycopg2-binary, or postgresql+psycopg:// and " + hint[2:]
        raise ConfigurationError(f"database driver {exc.name!r} is not installed{hint}") from None


def _with_driver(url: URL) -> URL:
    """``postgres`` read as ``postgresql``; an installed driver for a URL that names none."""
    backend, plus, driver = url.drivername.partition("+")
    if backend == "postgres":
        backend = "postgresql"
    if not plus and backend in _DRIVERS:
        for name, module in _DRIVERS[backend]:
            if _importable(module):
                driver = name
                break
        else:
            raise ConfigurationError(
                f"no {_TITLES[backend]} driver is installed for {safe_url(url)}: "
                f"{_INSTALL[backend]}"
            )
    drivername = f"{backend}+{driver}" if driver else backend
    return url if drivername == url.drivername else url.set(drivername=drivername)


def _known_dialect(backend: str) -> bool:
    try:
        URL.create(backend).get_dialect()
    except (NoSuchModuleError, ImportError):
        return False
    return True


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:  # also psycopg without its libpq ("no pq wrapper available")
        return False
    return True


def _hide(url: str) -> str:
    return safe_url(url)


# -- SQLite files --------------------------------------------------------------------


def sqlite_file(url: URL) -> str | None:
    """The file a SQLite URL opens, which connecting would create if missing.

    None for another database, an in-memory one, and a ``file:`` URI with
    ``mode=`` (SQLite does what the mode says).
    """
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database or ""
    if database in ("", ":memory:"):
        return None
    if str(url.query.get("uri", "")).lower() in ("1", "true", "yes", "on"):
        if "mode" in url.query or not database.startswith("file:"):
            return None
        parts = urlsplit(database)
        if "mode=" in parts.query:
            return None
        path = unquote(parts.path)
        return None if path in ("", ":memory:") else os.path.abspath(path)
    return os.path.abspath(database)


def _absolute_sqlite(url: URL) -> URL:
    """``url`` with its relative SQLite path made absolute (the current directory's)."""
    database = url.database
    if sqlite_file(url) is None or not database or database.startswith("file:"):
        return url
    return url.set(database=os.path.abspath(database))


def create_tables_hint(command: str, models: Sequence[str]) -> str:
    """The command line that creates the tables of ``models``."""
    return f"{command} create-tables {' '.join(models) or 'MODULE:CLASS'}"


def _relative_origin(url: str) -> str:
    """How a relative SQLite path of the command line was read, for an error."""
    try:
        database = make_url(url).database or ""
    except ArgumentError:
        return ""
    path = urlsplit(database).path if database.startswith("file:") else database
    if not path or os.path.isabs(path):
        return ""
    return f"the relative path {path!r}, from the current directory {os.getcwd()}"


def guard_sqlite_file(
    engine: Engine,
    *,
    may_create: bool,
    command: str,
    origin: str = "",
    setting: str = "the database URL",
) -> None:
    """Make ``engine``'s first connection refuse to create its SQLite file by mistake.

    Checked as it connects, not before: the command's other input (options,
    settings, models) is checked first, and gets its own error.
    See :func:`check_sqlite_file` for the arguments.
    """
    if sqlite_file(engine.url) is None:
        return
    passed = False

    def before_connect(*_args: Any) -> None:
        nonlocal passed
        if not passed:
            check_sqlite_file(
                engine.url, may_create=may_create, command=command, origin=origin, setting=setting
            )
            passed = True  # there now: later connections go as SQLite wants

    event.listen(engine, "do_connect", before_connect)


def check_sqlite_file(
    url: URL,
    *,
    may_create: bool,
    command: str,
    origin: str = "",
    setting: str = "the database URL",
) -> None:
    """Refuse to let SQLite create a database file by mistake (a mistyped path).

    ``may_create``: the file may be new (``create-tables``), its directory must
    exist. ``command`` is the command line that creates it (and the tables);
    ``origin`` says how the path was resolved (a relative path); ``setting`` is
    where the URL is set.
    """
    path = sqlite_file(url)
    if path is None:
        return
    how = f" ({origin})" if origin else ""
    if may_create:
        directory = os.path.dirname(path)
        if not os.path.isdir(directory):
            raise ConfigurationError(
                f"cannot create the SQLite database file {path}{how}: "
                f"its directory {directory} does not exist"
            )
        return
    if not os.path.exists(path):
        raise ConfigurationError(
            f"the SQLite database file {path} does not exist{how}: check {setting}, "
            f"or create the database with `{command}`"
        )


def database_urls(worker: Worker) -> str:
    """The URLs (passwords hidden) of the databases ``worker``'s models live in."""
    session = worker.source.open()
    try:
        urls = [safe_url(engine_of(session, model)) for model in worker.models]
    finally:
        worker.source.release(session)
    return ", ".join(dict.fromkeys(urls))


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
    uses it to stop the worker from another thread). The worker says it is
    serving only once its checks passed: it reached the database, registered
    and found every model's table.
    """
    worker = Worker(*models, **worker_kwargs)
    if started is not None:
        started(worker)
    names = ", ".join(m.__name__ for m in models)
    logger = logging.getLogger("alchq.worker")

    def serving(ready: Worker) -> None:
        logger.info("worker %s serving %s from %s", ready.id, names, database_urls(ready))
        logger.debug("worker %s settings: %s", ready.id, ready.settings)

    worker.on_ready = serving
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
        metadata = task_table(model).metadata
        # The worker registry, and running tasks' progress.
        extra = [workers_table(metadata), progress_table(metadata)]
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
