"""Flask integration: ``flask alchq run my_app.tasks:MyTask``.

Add the command group with one line, either::

    from alchq.flask import Alchq
    Alchq(app)                          # or Alchq().init_app(app) in a factory

or, if you only want the commands::

    from alchq.flask import cli as alchq_cli
    app.cli.add_command(alchq_cli)

The worker finds the app's Flask-SQLAlchemy ``db`` by itself and uses
``db.session``. Settings come from ``ALCHQ_*`` keys of ``app.config``
(see :mod:`alchq.config`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import click
from flask import Flask
from flask.cli import AppGroup

from alchq import _status
from alchq._binds import engine_of
from alchq._commands import (
    LOG_LEVELS,
    configure_logging,
    create_tables,
    create_tables_hint,
    guard_sqlite_file,
    load_models,
    prune_tables,
    sqlite_file,
)
from alchq._pool import CONCURRENCY_ENV, POOLS, error_status, run_pool
from alchq._sessions import flask_app, flask_db
from alchq.exceptions import AlchqError, NoDatabaseError
from alchq.model import BaseQueue

if TYPE_CHECKING:
    from alchq.dashboard import Dashboard

__all__ = ["Alchq", "cli"]

F = TypeVar("F", bound=Callable[..., Any])

cli = AppGroup("alchq", help="alchq task queue commands.")


def _fail_cleanly(fn: F) -> F:
    """Report alchq's errors as one line and exit 1, never a traceback."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AlchqError as exc:
            click.echo(f"alchq: error: {exc}", err=True)
            sys.exit(error_status())

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper  # type: ignore[return-value]


def _db() -> Any:
    db = flask_db(flask_app())
    if db is None:
        raise NoDatabaseError(
            "this Flask app has no Flask-SQLAlchemy extension (db = SQLAlchemy(app))"
        )
    return db


def _guard_sqlite_files(
    db: Any, models: Sequence[type[BaseQueue]], refs: Sequence[str], *, may_create: bool
) -> None:
    """The SQLite files of the models' engines must be there (run, prune), or be
    creatable (create-tables), when they connect: SQLite would create them empty."""
    app = flask_app()
    instance = os.path.abspath(app.instance_path)
    session = db.session()
    try:
        # db.engine too: create-tables creates the tables there.
        engines = list(dict.fromkeys([db.engine, *(engine_of(session, m) for m in models)]))
    finally:
        db.session.remove()
    for engine in engines:
        path = sqlite_file(engine.url)
        if path is None:
            continue
        origin = ""
        if path.startswith(instance + os.sep):
            origin = (
                "Flask-SQLAlchemy reads a relative SQLite path as relative to the app's "
                f"instance folder {instance}"
            )
        guard_sqlite_file(
            engine,
            may_create=may_create,
            command=create_tables_hint("flask alchq", refs),
            origin=origin,
            setting="the app's SQLALCHEMY_DATABASE_URI",
        )


@cli.command("run")
@click.argument("models", nargs=-1, required=True, metavar="MODULE:CLASS...")
@click.option("--poll-interval", type=float, default=None, help="Seconds between polls when idle.")
@click.option("--burst", is_flag=True, help="Process every ready task, then exit.")
@click.option(
    "--max-tasks", type=click.IntRange(min=0), default=None, metavar="N", help="Exit after N tasks."
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help=f"Run N workers under one supervisor (default: ${CONCURRENCY_ENV}, else 1); "
    "--max-tasks applies to each.",
)
@click.option(
    "--pool",
    type=click.Choice(POOLS),
    default="processes",
    show_default=True,
    help="With --concurrency: worker processes (one that dies is replaced), "
    "or threads for I/O-bound tasks.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    default=None,
    metavar="PORT",
    help="Serve Prometheus metrics at http://0.0.0.0:PORT/metrics (needs alchq[prometheus]).",
)
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    help="Level of alchq's log lines.",
)
@_fail_cleanly
def run_command(
    models: tuple[str, ...],
    poll_interval: float | None,
    burst: bool,
    max_tasks: int | None,
    concurrency: int | None,
    pool: str,
    metrics_port: int | None,
    log_level: str,
) -> None:
    """Run a worker for one or more task models."""
    configure_logging(log_level)
    loaded = load_models(models)
    db = _db()
    _guard_sqlite_files(db, loaded, models, may_create=False)
    status = run_pool(
        loaded,
        session_factory=db,
        poll_interval=poll_interval,
        burst=burst,
        max_tasks=max_tasks,
        concurrency=concurrency,
        pool=pool,
        metrics_port=metrics_port,
    )
    if status:
        sys.exit(status)


@cli.command("create-tables")
@click.argument("models", nargs=-1, required=True, metavar="MODULE:CLASS...")
@_fail_cleanly
def create_tables_command(models: tuple[str, ...]) -> None:
    """Create the tables of task models that do not exist yet."""
    loaded = load_models(models)
    db = _db()
    _guard_sqlite_files(db, loaded, models, may_create=True)
    names = create_tables(loaded, db.engine)
    click.echo("created (if missing): " + ", ".join(names))


@cli.command("prune")
@click.argument("models", nargs=-1, required=True, metavar="MODULE:CLASS...")
@click.option("--older-than", metavar="AGE", help="Age for all three statuses.")
@click.option("--processed", metavar="AGE", help="Age for PROCESSED tasks, over --older-than.")
@click.option("--error", metavar="AGE", help="Age for ERROR tasks, over --older-than.")
@click.option("--cancelled", metavar="AGE", help="Age for CANCELLED tasks, over --older-than.")
@click.option(
    "--batch-size", type=click.IntRange(min=1), metavar="N", help="Rows deleted per transaction."
)
@_fail_cleanly
def prune_command(
    models: tuple[str, ...],
    older_than: str | None,
    processed: str | None,
    error: str | None,
    cancelled: str | None,
    batch_size: int | None,
) -> None:
    """Delete finished tasks older than an age, in batches.

    AGE: 90s, 15m, 12h, 7d, 2w, a number of seconds, 0 (all), or never (keep them).
    Omitted ages come from the ALCHQ_PRUNE_*_AFTER settings (7d; 30d for ERROR).
    """
    loaded = load_models(models)
    db = _db()
    _guard_sqlite_files(db, loaded, models, may_create=False)
    for line in prune_tables(
        loaded,
        session_factory=db,
        older_than=older_than,
        processed=processed,
        error=error,
        cancelled=cancelled,
        batch_size=batch_size,
    ):
        click.echo(line)


# -- monitoring: status, workers, retry, cancel, health (alchq._status) ----------------


def _monitoring(refs: Sequence[str]) -> tuple[_status.Commands, list[type[BaseQueue]]]:
    """The app's sessions, and the models named (``module:Class`` or a bare class name of
    the app's), or with none named every imported task model whose table exists."""
    db = _db()

    @contextlib.contextmanager
    def open_session() -> Iterator[Any]:
        try:
            yield db.session()
        finally:
            db.session.remove()

    commands = _status.Commands(open=open_session, command="flask alchq")
    if refs:
        models = _status.resolve_models(refs, _status.mapped_models())
    else:
        _guard_sqlite_files(db, [], refs, may_create=False)
        with commands.open() as session:
            models = _status.app_models(session, commands.command)
    _guard_sqlite_files(db, models, refs, may_create=False)
    return commands, models


@cli.command("status")
@click.argument("models", nargs=-1, metavar="[MODEL...]")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a dict keyed by model name).")
@click.option(
    "--watch",
    type=click.FloatRange(min=0, min_open=True),
    is_flag=False,
    flag_value=_status.WATCH_INTERVAL,
    default=None,
    metavar="[SECONDS]",
    help=f"Refresh in place every SECONDS (default {_status.WATCH_INTERVAL:g}) until Ctrl-C; "
    "with --json, a JSON document per line.",
)
@_fail_cleanly
def status_command(models: tuple[str, ...], as_json: bool, watch: float | None) -> None:
    """The state of task models' queues (default: every model of the app).

    MODEL: package.module:ClassName, or the class name of a model the app imports.
    """
    commands, loaded = _monitoring(models)
    _status.show_status(commands, loaded, as_json=as_json, watch=watch)


@cli.command("workers")
@click.argument("models", nargs=-1, metavar="[MODEL...]")
@click.option("--all", "include_gone", is_flag=True, help="Also the gone ones.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a list).")
@_fail_cleanly
def workers_command(models: tuple[str, ...], include_gone: bool, as_json: bool) -> None:
    """The workers registered where the models live (default: every model of the app)."""
    commands, loaded = _monitoring(models)
    _status.show_workers(commands, loaded, as_json=as_json, include_gone=include_gone)


@cli.command("retry")
@click.argument("model")
@click.argument("task_id", required=False, metavar="[ID]")
@click.option(
    "--all-errors", is_flag=True, help="Every ERROR task of the model (what no ID means too)."
)
@click.option(
    "--since", metavar="AGE", help="Without an ID: the ERROR tasks that failed within AGE (1h)."
)
@_fail_cleanly
def retry_command(model: str, task_id: str | None, all_errors: bool, since: str | None) -> None:
    """Make an ERROR (or CANCELLED) task PENDING again, or every ERROR task."""
    commands, (loaded,) = _monitoring([model])
    click.echo(_status.retry(commands, loaded, task_id, all_errors=all_errors, since=since))


@cli.command("cancel")
@click.argument("model")
@click.argument("task_id", metavar="ID")
@_fail_cleanly
def cancel_command(model: str, task_id: str) -> None:
    """Cancel a PENDING task, or ask the worker of a running one to stop it."""
    commands, (loaded,) = _monitoring([model])
    click.echo(_status.cancel(commands, loaded, task_id))


@cli.command("health")
@click.argument("models", nargs=-1, metavar="[MODEL...]")
@click.option("--any-host", is_flag=True, help="A worker on any host will do.")
@click.option(
    "--max-age", metavar="SECONDS", help="The heartbeat must also be at most this old (30, 2m)."
)
@_fail_cleanly
def health_command(models: tuple[str, ...], any_host: bool, max_age: str | None) -> None:
    """Exit 0 if a worker of the models on this host has a fresh heartbeat (for probes)."""
    commands, loaded = _monitoring(models)
    click.echo(_status.health(commands, loaded, any_host=any_host, max_age=max_age))


class Alchq:
    """Flask extension: registers the ``flask alchq`` commands, and mounts a dashboard.

    :param app: the Flask app, or None to call :meth:`init_app` later.
    :param dashboard: an :class:`alchq.dashboard.Dashboard` to mount on the app
        (its blueprint is registered by :meth:`init_app`).

    Example::

        db = SQLAlchemy(app)
        Alchq(app)
        # with the dashboard at /alchq:
        Alchq(app, dashboard=Dashboard(can_read=is_staff, can_act=is_admin))
    """

    def __init__(self, app: Flask | None = None, *, dashboard: Dashboard | None = None) -> None:
        self.dashboard = dashboard
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        app.extensions["alchq"] = self
        if "alchq" not in app.cli.commands:
            app.cli.add_command(cli)
        if self.dashboard is not None:
            self.dashboard.init_app(app)
