"""The ``alchq`` command, for apps without Flask.

::

    alchq run my_app.tasks:MyTask --database-url URL   # or ALCHQ_DATABASE_URL
    alchq run my_app.tasks:MyTask --concurrency 4      # 4 supervised worker processes
    alchq create-tables my_app.tasks:MyTask --database-url URL
    alchq prune my_app.tasks:MyTask --older-than 7d --error never
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

from alchq import __version__
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

    demo = sub.add_parser("demo", help="run the hop/skip/jump demo on a SQLite file")
    demo.add_argument("--database", default="alchq-demo.sqlite", help="SQLite file (recreated)")
    return parser


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
