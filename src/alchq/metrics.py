"""Prometheus metrics (``pip install alchq[prometheus]``: the official client library).

Two places serve them:

- **The worker**: ``alchq run ... --metrics-port 9100`` (and ``flask alchq run``)
  serves ``http://host:9100/metrics`` from the supervising process: the
  counters and the run-time histogram of all its worker processes (fed by
  :mod:`alchq.events`, through the client's multiprocess mode), and the
  queue's gauges read from the database at each scrape.
- **The app**: its own ``/metrics``, with the queue's gauges (any process can
  read the database)::

      from alchq.metrics import flask_metrics_view
      app.add_url_rule("/metrics", view_func=flask_metrics_view([Report, Email]))

  or in any framework, ``generate_latest(registry)`` of a registry that
  :func:`register_queue_collector` filled.

Metrics (``model`` is the task model's class name):

=================================  =========  ====================================
``alchq_tasks``                    gauge      tasks by ``model`` and ``status``
``alchq_tasks_ready``              gauge      PENDING tasks due now
``alchq_tasks_scheduled``          gauge      PENDING tasks due later
``alchq_oldest_ready_age_seconds`` gauge      how long the oldest ready task waits
``alchq_workers_alive``            gauge      workers with a fresh heartbeat
``alchq_tasks_processed_total``    counter    PROCESSED outcomes, by ``model``
``alchq_tasks_failed_total``       counter    ERROR outcomes (failed for good)
``alchq_tasks_retried_total``      counter    failed runs retried later
``alchq_tasks_cancelled_total``    counter    running tasks cancelled
``alchq_task_run_seconds``         histogram  run time, by ``model`` and ``outcome``
=================================  =========  ====================================

Counters and the histogram exist where tasks run (the worker); the gauges
wherever a collector reads the database.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from alchq import events, monitoring
from alchq.exceptions import ConfigurationError
from alchq.model import BaseQueue

__all__ = [
    "QueueCollector",
    "flask_metrics_view",
    "register_queue_collector",
    "serve_worker_metrics",
    "track_events",
]

logger = logging.getLogger("alchq.metrics")

#: Set in worker processes whose supervisor serves their metrics.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Run-time histogram buckets (seconds): from a no-op task to a long export.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


def _client() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise ConfigurationError(
            "Prometheus metrics need the official client: pip install 'alchq[prometheus]'"
        ) from None
    return prometheus_client


class QueueCollector:
    """Reads the models' queues from the database at each scrape (a custom collector).

    ``session_factory``: a callable returning a Session (a sessionmaker, Flask-SQLAlchemy's
    ``db.session``); the session is closed (or removed) after each scrape.
    """

    def __init__(
        self,
        models: Sequence[type[BaseQueue]],
        session_factory: Callable[[], Any],
        context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> None:
        self.models = list(models)
        self.session_factory = session_factory
        #: Entered around each scrape (a Flask app context, for Flask-SQLAlchemy).
        self.context = context or contextlib.nullcontext

    def describe(self) -> list[Any]:
        return []  # computed at scrape time: nothing to check at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        tasks = GaugeMetricFamily("alchq_tasks", "Tasks by status", labels=["model", "status"])
        ready = GaugeMetricFamily("alchq_tasks_ready", "PENDING tasks due now", labels=["model"])
        later = GaugeMetricFamily(
            "alchq_tasks_scheduled", "PENDING tasks due later", labels=["model"]
        )
        oldest = GaugeMetricFamily(
            "alchq_oldest_ready_age_seconds",
            "How long the oldest ready task has been waiting",
            labels=["model"],
        )
        alive = GaugeMetricFamily("alchq_workers_alive", "Workers with a fresh heartbeat")
        with self.context():
            yield from self._collect(tasks, ready, later, oldest, alive)

    def _collect(self, *families: Any) -> Iterator[Any]:
        tasks, ready, later, oldest, alive = families
        session = self.session_factory()
        try:
            for model in self.models:
                depth = monitoring.queue_depth(session, model)
                name = model.__name__
                for status, n in depth.counts.items():
                    tasks.add_metric([name, status], n)
                ready.add_metric([name], depth.ready)
                later.add_metric([name], depth.scheduled)
                oldest.add_metric([name], depth.oldest_ready_age or 0.0)
            alive.add_metric(
                [], sum(1 for w in monitoring.workers(session, self.models) if w.alive)
            )
        except Exception as exc:  # a scrape must answer: say it, show what we have
            logger.warning("alchq metrics: could not read the queues: %s", exc)
        finally:
            with contextlib.suppress(Exception):
                session.rollback()
            remove = getattr(self.session_factory, "remove", None)
            with contextlib.suppress(Exception):
                remove() if callable(remove) else session.close()
        yield from (tasks, ready, later, oldest, alive)


def register_queue_collector(
    models: Sequence[type[BaseQueue]], session_factory: Callable[[], Any], registry: Any = None
) -> QueueCollector:
    """Add the queue gauges of ``models`` to ``registry`` (default: the client's global one)."""
    client = _client()
    collector = QueueCollector(models, session_factory)
    (registry if registry is not None else client.REGISTRY).register(collector)
    return collector


_tracked: Callable[[events.Event], None] | None = None


def track_events(registry: Any = None) -> None:
    """Count this process's task outcomes and time its runs (once per process)."""
    global _tracked
    if _tracked is not None:
        return
    client = _client()
    kw: dict[str, Any] = {} if registry is None else {"registry": registry}
    processed = client.Counter(
        "alchq_tasks_processed", "Tasks that ended PROCESSED", ["model"], **kw
    )
    failed = client.Counter("alchq_tasks_failed", "Tasks that ended in ERROR", ["model"], **kw)
    retried = client.Counter(
        "alchq_tasks_retried", "Failed runs to be retried later", ["model"], **kw
    )
    cancelled = client.Counter(
        "alchq_tasks_cancelled", "Tasks cancelled while running", ["model"], **kw
    )
    run_time = client.Histogram(
        "alchq_task_run_seconds", "Run time per task", ["model", "outcome"], buckets=BUCKETS, **kw
    )
    by_outcome = {"PROCESSED": processed, "ERROR": failed, "CANCELLED": cancelled}

    def on_event(event: events.Event) -> None:
        if event.kind == "task_finished" and event.outcome in by_outcome:
            by_outcome[event.outcome].labels(event.model).inc()
        elif event.kind == "task_retried" and event.outcome == "RETRY":
            retried.labels(event.model).inc()
        else:
            return
        if event.duration is not None:
            run_time.labels(event.model, event.outcome).observe(event.duration)

    _tracked = on_event
    events.subscribe(on_event)


def prepare_worker_metrics() -> str:
    """Supervisor, before starting worker processes: a folder for their metrics files.

    The client's multiprocess mode: each worker process writes its counters
    there, and the supervisor adds them up at each scrape.
    """
    _client()
    folder = os.environ.get(MULTIPROC_ENV)
    if not folder:
        folder = tempfile.mkdtemp(prefix="alchq-metrics-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ[MULTIPROC_ENV] = folder
    return folder


def serve_worker_metrics(
    port: int,
    models: Sequence[type[BaseQueue]],
    session_factory: Callable[[], Any],
    context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    address: str = "0.0.0.0",  # noqa: S104 - a metrics port is for a scraper on the network
) -> Any:
    """Serve ``/metrics`` on ``port`` from this (supervising) process; returns the server."""
    client = _client()
    from prometheus_client import multiprocess

    registry = client.CollectorRegistry()
    folder = os.environ.get(MULTIPROC_ENV)
    if folder:
        multiprocess.MultiProcessCollector(registry, path=folder)  # type: ignore[no-untyped-call]
    else:  # threads in this process: its own counters
        track_events(registry)
    registry.register(QueueCollector(models, session_factory, context))
    try:
        server, _thread = client.start_http_server(port, addr=address, registry=registry)
    except OSError as exc:
        raise ConfigurationError(f"cannot serve metrics on port {port}: {exc}") from None
    logger.info("serving Prometheus metrics on port %d at /metrics", port)
    return server


def flask_metrics_view(
    models: Sequence[type[BaseQueue]] | None = None,
    session_factory: Callable[[], Any] | None = None,
) -> Callable[[], Any]:
    """A Flask view serving the queue gauges read from the database, for
    ``app.add_url_rule("/metrics", view_func=...)`` (the counters live where tasks
    run: serve them with ``alchq run --metrics-port``).

    ``models``: default every mapped task model; ``session_factory``: default
    the app's Flask-SQLAlchemy ``db.session``.
    """
    client = _client()
    registry = client.CollectorRegistry()
    state: dict[str, Any] = {}

    def view() -> Any:
        from flask import Response

        if "collector" not in state:
            from alchq._sessions import flask_app, flask_db

            factory = session_factory
            if factory is None:
                db = flask_db(flask_app())
                if db is None:
                    raise ConfigurationError(
                        "flask_metrics_view() needs Flask-SQLAlchemy or a session_factory"
                    )
                factory = db.session
            chosen = list(models) if models is not None else monitoring.task_models()
            state["collector"] = QueueCollector(chosen, factory)
            registry.register(state["collector"])
        return Response(client.generate_latest(registry), mimetype=client.CONTENT_TYPE_LATEST)

    view.__name__ = "alchq_metrics"
    return view
