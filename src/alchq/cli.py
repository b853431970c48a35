"""The ``alchq`` command, for apps without Flask.

::

    alchq run my_app.tasks:MyTask --database-url URL   # or ALCHQ_DATABASE_URL
    alchq run my_app.tasks:MyTask --concurrency 4      # 4 supervised worker processes
    alchq create-tables my_app.tasks:MyTask --database-url URL
    alchq prune my_app.tasks:MyTask --older-than 7d --error never
    alchq status my_app.tasks:MyTask [--json] [--watch [SECONDS]]
    alchq workers my_app.tasks:MyTask [--all] [--json]
    alchq retry my_app.tasks:MyTask 42            # or no ID: every ERROR task [--since 1h]
    alchq cancel my_app.tasks:MyTask 42
    alchq health my_app.tasks:MyTask [--any-host] [--max-age 30]   # for probes
    alchq demo

The Flask commands (``flask alchq ...``) are in :mod:`alchq.flask` and use
Click, as Flask does; this one uses argparse so that a plain
``pip install alchq`` needs nothing but SQLAlchemy and croniter.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from alchq import __version__, _status
from alchq._commands import (
    LOG_LEVELS,
    URL_VARIABLES,
    configure_logging,
    create_tables,
    load_models,
    make_engine,
    prune_tables,
)
from alchq._pool import CONCURRENCY_ENV, POOLS, error_status, run_pool
from alchq._status import WATCH_INTERVAL, Commands
from alchq.exceptions import AlchqError
from alchq.model import BaseQueue


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive(text: str) -> int:
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _port(text: str) -> int:
    value = _count(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535, got {value}")
    return value


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"invalid level {text!r}: use one of {', '.join(LOG_LEVELS)} (in any case)"
        )
    return level


def _url_option(parser: argparse.ArgumentParser) -> None:
    first, second = URL_VARIABLES
    parser.add_argument(
        "--database-url",
        default=os.environ.get(first) or os.environ.get(second),
        help=f"SQLAlchemy database URL (default: ${first}, else ${second}); "
        "postgres:// means PostgreSQL",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alchq", description="SQLAlchemy task queue worker.")
    parser.add_argument("--version", action="version", version=f"alchq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a worker for one or more task models")
    run.add_argument("models", nargs="+", metavar="MODULE:CLASS", help="task model(s) to serve")
    _url_option(run)
    run.add_argument(
        "--poll-interval",
        type=float,
        default=None,
        help="seconds between polls when idle (default 1)",
    )
    run.add_argument("--burst", action="store_true", help="process every ready task, then exit")
    run.add_argument(
        "--max-tasks", type=_count, default=None, metavar="N", help="exit after N tasks"
    )
    run.add_argument(
        "--concurrency",
        type=_positive,
        default=None,
        metavar="N",
        help=f"run N workers under one supervisor (default ${CONCURRENCY_ENV}, else 1); "
        "--max-tasks applies to each",
    )
    run.add_argument(
        "--pool",
        choices=POOLS,
        default="processes",
        help="with --concurrency: worker processes (default; one that dies is replaced) "
        "or threads (for I/O-bound tasks)",
    )
    run.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics at http://0.0.0.0:PORT/metrics (needs alchq[prometheus])",
    )
    run.add_argument(
        "--log-level",
        default="INFO",
        type=_log_level,
        choices=LOG_LEVELS,
        help="level of alchq's log lines, in any case (default INFO)",
    )

    tables = sub.add_parser("create-tables", help="create the tables of task models")
    tables.add_argument("models", nargs="+", metavar="MODULE:CLASS")
    _url_option(tables)

    prune = sub.add_parser(
        "prune",
        help="delete finished tasks older than an age",
        description="Delete PROCESSED, ERROR and CANCELLED tasks older than an age, in "
        "batches. AGE: 90s, 15m, 12h, 7d, 2w, a number of seconds, 0 (all), or never (keep them). "
        "Omitted ages come from the settings: ALCHQ_PRUNE_PROCESSED_AFTER (default 7d), "
        "ALCHQ_PRUNE_ERROR_AFTER (30d), ALCHQ_PRUNE_CANCELLED_AFTER (7d).",
    )
    prune.add_argument("models", nargs="+", metavar="MODULE:CLASS")
    _url_option(prune)
    prune.add_argument("--older-than", metavar="AGE", help="age for all three statuses")
    for status in ("processed", "error", "cancelled"):
        prune.add_argument(
            f"--{status}", metavar="AGE", help=f"age for {status.upper()} tasks, over --older-than"
        )
    prune.add_argument(
        "--batch-size", type=int, metavar="N", help="rows deleted per transaction (default 1000)"
    )

    _monitoring_commands(sub)

    demo = sub.add_parser("demo", help="run the hop/skip/jump demo on a SQLite file")
    demo.add_argument("--database", default="alchq-demo.sqlite", help="SQLite file (recreated)")
    return parser


def _watch_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _monitoring_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """status, workers, retry, cancel, health: the operator's commands (alchq._status)."""
    models = {"nargs": "+", "metavar": "MODULE:CLASS"}
    status = sub.add_parser(
        "status",
        help="the state of task models' queues",
        description="Counts by status, ready and scheduled tasks, the oldest ready task's "
        "wait, the last hour's throughput, run times, running tasks with their progress "
        "and the most recent errors, a table per model.",
    )
    status.add_argument("models", **models)  # type: ignore[arg-type]
    _url_option(status)
    status.add_argument(
        "--json", action="store_true", help="print JSON (a dict keyed by model name)"
    )
    status.add_argument(
        "--watch",
        nargs="?",
        const=WATCH_INTERVAL,
        type=_watch_seconds,
        metavar="SECONDS",
        help=f"refresh in place every SECONDS (default {WATCH_INTERVAL:g}) until Ctrl-C; "
        "with --json, a JSON document per line",
    )

    workers = sub.add_parser("workers", help="the workers registered where the models live")
    workers.add_argument("models", **models)  # type: ignore[arg-type]
    _url_option(workers)
    workers.add_argument("--all", action="store_true", help="also the gone ones")
    workers.add_argument("--json", action="store_true", help="print JSON (a list)")

    retry = sub.add_parser(
        "retry",
        help="make an ERROR (or CANCELLED) task PENDING again, or every ERROR task",
    )
    retry.add_argument("model", metavar="MODULE:CLASS")
    retry.add_argument(
        "id", nargs="?", metavar="ID", help="the task's key (composite: '[1, \"a\"]')"
    )
    _url_option(retry)
    retry.add_argument(
        "--all-errors",
        action="store_true",
        help="every ERROR task of the model (what no ID means too)",
    )
    retry.add_argument(
        "--since", metavar="AGE", help="without an ID: the ERROR tasks that failed within AGE (1h)"
    )

    cancel = sub.add_parser(
        "cancel", help="cancel a PENDING task, or ask the worker of a running one to stop it"
    )
    cancel.add_argument("model", metavar="MODULE:CLASS")
    cancel.add_argument("id", metavar="ID")
    _url_option(cancel)

    health = sub.add_parser(
        "health",
        help="exit 0 if a worker on this host has a fresh heartbeat (for probes)",
        description="Exit 0 when a worker of the models on this host (or any host, with "
        "--any-host) is alive in the worker registry, 1 with the reason otherwise.",
    )
    health.add_argument("models", **models)  # type: ignore[arg-type]
    _url_option(health)
    health.add_argument("--any-host", action="store_true", help="a worker on any host will do")
    health.add_argument(
        "--max-age",
        metavar="SECONDS",
        help="the heartbeat must also be at most this old (30, 30s, 2m)",
    )


def _monitoring(args: argparse.Namespace) -> None:
    """Run status, workers, retry, cancel or health; print what they say."""
    refs = args.models if hasattr(args, "models") else [args.model]
    with _models_and_engine(argparse.Namespace(**{**vars(args), "models": refs})) as (
        models,
        engine,
    ):
        # A session per round of queries, closed at once: an open SQLite read holds a lock.
        commands = Commands(open=lambda: Session(engine), command="alchq")
        if args.command == "status":
            _status.show_status(commands, models, as_json=args.json, watch=args.watch)
        elif args.command == "workers":
            _status.show_workers(commands, models, as_json=args.json, include_gone=args.all)
        elif args.command == "retry":
            print(
                _status.retry(
                    commands, models[0], args.id, all_errors=args.all_errors, since=args.since
                )
            )
        elif args.command == "cancel":
            print(_status.cancel(commands, models[0], args.id))
        else:
            print(_status.health(commands, models, any_host=args.any_host, max_age=args.max_age))


@contextlib.contextmanager
def _models_and_engine(
    args: argparse.Namespace,
) -> Iterator[tuple[list[type[BaseQueue]], Engine]]:
    """The models named on the command line and an engine, disposed of afterwards.

    Only ``create-tables`` may create a SQLite database file.
    """
    models = load_models(args.models)
    engine = make_engine(
        args.database_url, may_create=args.command == "create-tables", models=args.models
    )
    try:
        yield models, engine
    finally:
        engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            configure_logging(args.log_level)
            with _models_and_engine(args) as (models, engine):
                return run_pool(
                    models,
                    engine=engine,
                    poll_interval=args.poll_interval,
                    burst=args.burst,
                    max_tasks=args.max_tasks,
                    concurrency=args.concurrency,
                    pool=args.pool,
                    metrics_port=args.metrics_port,
                )
        elif args.command == "create-tables":
            with _models_and_engine(args) as (models, engine):
                names = create_tables(models, engine)
            print("created (if missing): " + ", ".join(names))
        elif args.command == "prune":
            with _models_and_engine(args) as (models, engine):
                for line in prune_tables(
                    models,
                    engine=engine,
                    older_than=args.older_than,
                    processed=args.processed,
                    error=args.error,
                    cancelled=args.cancelled,
                    batch_size=args.batch_size,
                ):
                    print(line, flush=True)
        elif args.command in ("status", "workers", "retry", "cancel", "health"):
            _monitoring(args)
        elif args.command == "demo":
            from alchq._demo import main as demo_main

            demo_main(args.database)
    except AlchqError as exc:
        logging.getLogger("alchq").debug("details", exc_info=True)
        print(f"alchq: error: {exc}", file=sys.stderr)
        return error_status()
    except KeyboardInterrupt:
        print("alchq: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
