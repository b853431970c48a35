"""What the monitoring commands do (``status``, ``workers``, ``retry``, ``cancel``,
``health``), shared by ``alchq`` (argparse) and ``flask alchq`` (Click).

The data comes from :mod:`alchq.monitoring`; this module only picks the models,
opens sessions, renders rich tables or JSON, and turns database errors into one
clear line (an :class:`~alchq.exceptions.AlchqError` the front ends print).
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text
from sqlalchemy import Engine, inspect, select, type_coerce
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from alchq import monitoring
from alchq._binds import engine_of, table_missing
from alchq._dialects import utc_now
from alchq._dialects.types import UTCDateTime
from alchq._imports import import_model
from alchq._util import first_line, safe_url
from alchq.config import parse_age
from alchq.exceptions import (
    AlchqError,
    ConfigurationError,
    DatabaseError,
    DatabaseUnreachableError,
    TableMissingError,
)
from alchq.model import (
    BaseQueue,
    Status,
    progress_table,
    task_table,
    workers_table,
)

#: Opens a session for one round of queries and closes (or removes) it afterwards.
Opener = Callable[[], contextlib.AbstractContextManager[Session]]

#: Seconds between refreshes of ``--watch`` when no number is given.
WATCH_INTERVAL = 2.0


class UnhealthyError(AlchqError):
    """``health``: no worker passes the check (the message says why)."""


@dataclass(frozen=True)
class Commands:
    """Where the commands get their sessions, and how errors name the command line."""

    open: Opener
    #: ``alchq`` or ``flask alchq``, for the hints of errors (``... create-tables``)
    command: str


# -- models -------------------------------------------------------------------------------


def mapped_models() -> list[type[BaseQueue]]:
    """Every usable task model imported so far (mapped, with run()), by name."""
    return monitoring.task_models()


def resolve_models(
    refs: Sequence[str], known: Sequence[type[BaseQueue]] | None
) -> list[type[BaseQueue]]:
    """``module:Class`` references imported; with ``known`` (a Flask app's models), a
    bare class name too."""
    models: list[type[BaseQueue]] = []
    for ref in refs:
        if ":" in ref or known is None:
            models.append(import_model(ref))
            continue
        named = [m for m in known if m.__name__ == ref]
        if not named:
            names = ", ".join(m.__name__ for m in known) or "none imported"
            raise ConfigurationError(
                f"unknown task model {ref!r}: name it as package.module:ClassName, "
                f"or one of the app's models ({names})"
            )
        if len(named) > 1:
            where = ", ".join(f"{m.__module__}:{m.__qualname__}" for m in named)
            raise ConfigurationError(f"{ref!r} names several models ({where}): name one of them")
        models.append(named[0])
    return list(dict.fromkeys(models))


def app_models(session: Session, command: str) -> list[type[BaseQueue]]:
    """The models of ``flask alchq status`` without arguments: every imported task model
    whose table exists in its database, one per table (single-table subclasses are in
    their base's counts; name them to see them apart)."""
    roots = mapped_models()  # one per table
    found: list[type[BaseQueue]] = []
    with database_errors(session, roots, command):
        for model in roots:
            table = task_table(model)
            engine = engine_of(session, model)
            if inspect(engine).has_table(table.name, schema=table.schema):
                found.append(model)
    if not found:
        raise ConfigurationError(
            "no task model's table was found in the app's database: name the models "
            f"(package.module:ClassName), or create their tables (`{command} create-tables`)"
        )
    return found


# -- errors -------------------------------------------------------------------------------


@contextlib.contextmanager
def database_errors(
    session: Session, models: Sequence[type[BaseQueue]], command: str
) -> Iterator[None]:
    """Turn a database error into one clear line: unreachable, table missing, or as said."""
    try:
        yield
    except DBAPIError as exc:
        raise explain(exc, session, models, command) from exc


def explain(
    exc: DBAPIError, session: Session, models: Sequence[type[BaseQueue]], command: str
) -> AlchqError:
    engines = list(dict.fromkeys(engine_of(session, m) for m in models))
    for engine in engines:
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except DBAPIError as again:
            return DatabaseUnreachableError(
                f"cannot reach the database {safe_url(engine)}: {first_line(again)}"
            )
    for model in models:
        engine = engine_of(session, model)
        missing = table_missing(model, engine, command)
        if missing is not None:
            return missing
        for extra in (workers_table, progress_table):
            table = extra(task_table(model).metadata)
            if not _has_table(engine, table.name, table.schema):
                return TableMissingError(
                    f"alchq's table {table.name!r} does not exist in {safe_url(engine)}: "
                    f"create it with `{command} create-tables "
                    f"{model.__module__}:{model.__qualname__}`, your metadata's "
                    "create_all() or a migration"
                )
    where = safe_url(engines[0]) if engines else "the database"
    return DatabaseError(f"the query failed in {where}: {first_line(exc)}")


def _has_table(engine: Engine, name: str, schema: str | None) -> bool:
    try:
        return inspect(engine).has_table(name, schema=schema)
    except DBAPIError:
        return True  # unreachable: the original error says what matters


def _db_now(session: Session, model: type[BaseQueue]) -> datetime:
    """The database's clock: heartbeats are written by it, ages are measured by it."""
    conn = session.connection(bind_arguments={"mapper": inspect(model)})
    now: datetime = conn.execute(select(type_coerce(utc_now(), UTCDateTime()))).scalar_one()
    return _aware(now)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


# -- text ---------------------------------------------------------------------------------


def age(seconds: float | None) -> str:
    """A duration for people: 4.2s, 35s, 3m 05s, 2h 10m, 3d 04h."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def run_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f}s"


def _since(moment: datetime | None, now: datetime) -> str:
    return "-" if moment is None else age(max(0.0, (now - _aware(moment)).total_seconds())) + " ago"


def _clock(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return _aware(moment).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _one_line(text: str | None, limit: int = 200) -> str:
    line = " ".join((text or "").split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


# -- status -------------------------------------------------------------------------------


def gather_stats(
    commands: Commands, models: Sequence[type[BaseQueue]]
) -> list[monitoring.QueueStats]:
    with commands.open() as session, database_errors(session, models, commands.command):
        return [monitoring.queue_stats(session, model) for model in models]


def stats_json(stats: Sequence[monitoring.QueueStats], *, indent: int | None = 2) -> str:
    return json.dumps({s.model: s.as_dict() for s in stats}, indent=indent)


def stats_view(stats: Sequence[monitoring.QueueStats]) -> RenderableType:
    """One block per model: counts and figures, running tasks, recent errors."""
    parts: list[RenderableType] = []
    for s in stats:
        parts.append(_summary_table(s))
        if s.running:
            parts.append(_running_table(s))
        if s.recent_errors:
            parts.append(_errors_table(s))
        parts.append(Text(""))
    return Group(*parts)


def _summary_table(s: monitoring.QueueStats) -> Table:
    table = Table(
        title=Text(f"{s.model} (table {s.table}) at {_clock(s.now)} UTC", style="bold"),
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_header=True,
    )
    table.add_column("status")
    table.add_column("tasks", justify="right")
    table.add_column("")
    for status in Status:
        note = ""
        if status is Status.PENDING:
            note = (
                f"ready {s.ready}, scheduled {s.scheduled}; "
                f"oldest ready waits {age(s.oldest_ready_age)}"
            )
        table.add_row(Text(status.value), Text(str(s.counts.get(status.value, 0))), Text(note))
    hour = (sum(m.processed for m in s.throughput), sum(m.failed for m in s.throughput))
    last = s.throughput[-1] if s.throughput else None
    minute = (last.processed, last.failed) if last is not None else (0, 0)
    table.add_section()
    table.add_row(Text("last hour"), Text(str(hour[0])), Text(f"processed, {hour[1]} failed"))
    table.add_row(Text("this minute"), Text(str(minute[0])), Text(f"processed, {minute[1]} failed"))
    table.add_row(
        Text("run time"),
        Text(run_time(s.run_time_mean)),
        Text(f"mean, p95 {run_time(s.run_time_p95)} (last hour)"),
    )
    return table


def _running_table(s: monitoring.QueueStats) -> Table:
    table = Table(
        title=Text(f"{s.model}: running", style="bold"), title_justify="left", box=box.SIMPLE_HEAD
    )
    for name in ("task", "worker", "running for", "attempt", "progress", "", "message"):
        table.add_column(name)
    for r in s.running:
        bar: RenderableType = Text("")
        percent = "-"
        if r.progress is not None:
            bar = ProgressBar(total=1.0, completed=r.progress, width=20)
            percent = f"{r.progress * 100:.0f}%"
        started = "-" if r.started_at is None else age(_seconds_between(r.started_at, s.now))
        table.add_row(
            Text(r.key),
            Text(r.worker or "-"),
            Text(started),
            Text(str(r.attempt)),
            Text(percent),
            bar,
            Text(_one_line(r.message, 80)),
        )
    return table


def _errors_table(s: monitoring.QueueStats) -> Table:
    table = Table(
        title=Text(f"{s.model}: most recent errors", style="bold"),
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("task")
    table.add_column("failed")
    table.add_column("error")
    table.add_column("message", overflow="ellipsis", no_wrap=True, ratio=1)
    for e in s.recent_errors:
        table.add_row(
            Text(e.key),
            Text(_since(e.finished_at, s.now)),
            Text(e.error_type or "-"),
            Text(_one_line(e.message)),
        )
    return table


def _seconds_between(start: datetime, end: datetime) -> float:
    return max(0.0, (_aware(end) - _aware(start)).total_seconds())


def show_status(
    commands: Commands,
    models: Sequence[type[BaseQueue]],
    *,
    as_json: bool,
    watch: float | None,
    console: Console | None = None,
) -> None:
    """``status``: print once, or with ``watch`` (seconds) refresh until Ctrl-C."""
    out = console or Console(highlight=False)
    stats = gather_stats(commands, models)  # errors before anything is shown: one line
    if watch is None:
        if as_json:
            print(stats_json(stats), flush=True)
        else:
            out.print(stats_view(stats))
        return
    interval = max(0.1, watch)
    if as_json:  # a JSON document per line, for a script that reads them as they come
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                print(stats_json(stats, indent=None), flush=True)
                time.sleep(interval)
                stats = gather_stats(commands, models)
        return
    _watch(out, stats_view(stats), lambda: stats_view(gather_stats(commands, models)), interval)


def _watch(
    console: Console, first: RenderableType, build: Callable[[], RenderableType], interval: float
) -> None:
    """Redraw ``build()`` in place every ``interval`` seconds until Ctrl-C (then return).

    A database error while watching is shown in place of the tables and retried:
    a watch outlives a short outage.
    """
    with contextlib.suppress(KeyboardInterrupt):
        with Live(first, console=console, auto_refresh=False, redirect_stdout=False) as live:
            while True:
                time.sleep(interval)
                try:
                    view = build()
                except AlchqError as exc:
                    view = Text(f"alchq: error: {exc} (retrying every {interval:g}s)", style="red")
                live.update(view, refresh=True)


# -- workers ------------------------------------------------------------------------------


def gather_workers(
    commands: Commands, models: Sequence[type[BaseQueue]], *, include_gone: bool
) -> tuple[list[monitoring.WorkerInfo], datetime]:
    with commands.open() as session, database_errors(session, models, commands.command):
        found = monitoring.workers(session, models, include_gone=include_gone)
        return found, _db_now(session, models[0])


def workers_view(workers: Sequence[monitoring.WorkerInfo], now: datetime) -> RenderableType:
    if not workers:
        return Text("no worker is registered")
    table = Table(box=box.SIMPLE_HEAD)
    for name in ("worker", "host", "pid", "models", "version", "started", "heartbeat"):
        table.add_column(name)
    table.add_column("in hand", justify="right")
    table.add_column("state")
    for w in workers:
        table.add_row(
            Text(w.id),
            Text(w.host),
            Text(str(w.pid)),
            Text(", ".join(w.models)),
            Text(w.version),
            Text(_clock(w.started_at)),
            Text(_since(w.heartbeat_at, now)),
            Text(str(w.in_hand)),
            Text("alive", style="green") if w.alive else Text("gone", style="red"),
        )
    return table


def show_workers(
    commands: Commands,
    models: Sequence[type[BaseQueue]],
    *,
    as_json: bool,
    include_gone: bool,
    console: Console | None = None,
) -> None:
    found, now = gather_workers(commands, models, include_gone=include_gone)
    if as_json:
        print(json.dumps([w.as_dict() for w in found], indent=2), flush=True)
    else:
        (console or Console(highlight=False)).print(workers_view(found, now))


# -- actions ------------------------------------------------------------------------------


def retry(
    commands: Commands,
    model: type[BaseQueue],
    key: str | None,
    *,
    all_errors: bool,
    since: str | None,
) -> str:
    """``retry``: one task by key, or, without one, every ERROR task (finished within
    ``since``). ``--all-errors`` says the latter explicitly."""
    if key is not None and all_errors:
        raise ConfigurationError("give a task ID or --all-errors, not both")
    if key is not None and since is not None:
        raise ConfigurationError("--since goes with retrying every ERROR task (no task ID)")
    back: timedelta | None = None
    if since is not None:
        seconds = parse_age(since, "--since")
        if seconds is None:
            raise ConfigurationError("--since must be an age such as 30m, 1h or 2d, not never")
        back = timedelta(seconds=seconds)
    with commands.open() as session, database_errors(session, [model], commands.command):
        if key is not None:
            monitoring.retry(session, model, key)
            session.commit()
            return f"retried {model.__name__} {key}: PENDING again"
        done = monitoring.bulk(session, model, "retry", status="ERROR", since=back)
    within = f" (finished in the last {since})" if since is not None else ""
    return f"retried {done} ERROR task{'' if done == 1 else 's'} of {model.__name__}{within}"


def cancel(commands: Commands, model: type[BaseQueue], key: str) -> str:
    with commands.open() as session, database_errors(session, [model], commands.command):
        now = monitoring.cancel(session, model, key)
        session.commit()
    if now is Status.PROCESSING:
        return f"{model.__name__} {key} is running: asked the worker to stop it"
    return f"cancelled {model.__name__} {key}"


# -- health -------------------------------------------------------------------------------


def health(
    commands: Commands,
    models: Sequence[type[BaseQueue]],
    *,
    any_host: bool,
    max_age: str | None,
) -> str:
    """``health``: the line saying which worker is fresh; :class:`UnhealthyError` if none.

    Fresh: alive in the registry (its lease not expired) and, with ``max_age``, a
    heartbeat at most that old (the database's clock). Only workers serving one of
    ``models`` count; on this host (as the registry records it) unless ``any_host``.
    """
    limit = None if max_age is None else parse_age(max_age, "--max-age")
    found, now = gather_workers(commands, models, include_gone=True)
    names = {m.__name__ for m in models}
    host = socket.gethostname()[:255]  # as the registry records it
    serving = [w for w in found if names & set(w.models)]
    here = serving if any_host else [w for w in serving if w.host == host]
    where = "on any host" if any_host else f"on this host ({host})"
    served = ", ".join(sorted(names))

    def beat(w: monitoring.WorkerInfo) -> float:
        return _seconds_between(w.heartbeat_at, now)

    fresh = [w for w in here if w.alive and (limit is None or beat(w) <= limit)]
    if fresh:
        w = min(fresh, key=beat)
        return (
            f"healthy: worker {w.id} on {w.host} (pid {w.pid}) serving {', '.join(w.models)}, "
            f"last heartbeat {age(beat(w))} ago"
        )
    if not here:
        elsewhere = sum(1 for w in serving if w.alive)
        hint = (
            f"; {elsewhere} alive on other hosts (--any-host counts them)"
            if elsewhere and not any_host
            else ""
        )
        raise UnhealthyError(f"no worker of {served} is registered {where}{hint}")
    alive = [w for w in here if w.alive]
    if alive and limit is not None:
        latest = min(beat(w) for w in alive)
        raise UnhealthyError(
            f"the last heartbeat of a worker of {served} {where} was {age(latest)} ago, "
            f"more than --max-age {age(limit)}"
        )
    latest = min(beat(w) for w in here)
    raise UnhealthyError(
        f"every worker of {served} {where} is gone (lease expired; "
        f"last heartbeat {age(latest)} ago)"
    )
