"""What workers do, as events: one in-process hook for logs, metrics and your code.

::

    from alchq import events

    @events.subscribe
    def on_event(event: events.Event) -> None:
        if event.kind == "task_finished" and event.outcome == "ERROR":
            alert(f"{event.model} {event.task_id} failed: {event.error_type}")

Kinds: ``task_started``, ``task_finished`` (outcome PROCESSED, ERROR or
CANCELLED, with its duration), ``task_retried`` (outcome RETRY, or SNOOZED),
``task_rescued`` (a lost worker's task put back, or ended), ``worker_started``
and ``worker_stopped``. Subscribers run in the worker's own thread, right
where it happens: keep them quick (hand slow work to a queue of your own). One
that raises is logged and skipped; it never fails the task or the worker.

alchq's own task log lines are a subscriber (the first), and so are its
Prometheus metrics (:mod:`alchq.metrics`). Each task line carries the event's
fields as ``extra`` on its log record: ``alchq_model``, ``alchq_task_id``,
``alchq_attempt``, ``alchq_outcome`` and ``alchq_duration``, for structured
(JSON) log handlers. Events carry no task column values.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Event", "Kind", "emit", "subscribe", "unsubscribe"]

logger = logging.getLogger("alchq.events")

Kind = Literal[
    "task_started",
    "task_finished",
    "task_retried",
    "task_rescued",
    "worker_started",
    "worker_stopped",
]


@dataclass(frozen=True)
class Event:
    """One thing a worker did."""

    kind: Kind
    #: the worker's id (``host:pid:random``)
    worker: str
    #: the task model's class name, and the task's key as text
    model: str | None = None
    task_id: str | None = None
    #: the claim's number (the task's ``alchq_attempts``)
    attempt: int | None = None
    #: PROCESSED, ERROR, CANCELLED (finished); RETRY, SNOOZED (retried);
    #: PENDING or ERROR (rescued)
    outcome: str | None = None
    #: seconds from the start of run() to its outcome
    duration: float | None = None
    #: the exception's class name, and a one-line description, for failures
    error_type: str | None = None
    detail: str | None = None
    #: RETRY and SNOOZED: runs again in this many seconds
    again_in: float | None = None
    #: RETRY: failed runs so far, and the most the retry policy allows
    failures: int | None = None
    max_attempts: int | None = None
    #: the task ran in a batch of short tasks sharing commits
    batched: bool = False
    #: when (seconds since the epoch, this machine's clock)
    at: float = field(default_factory=time.time)


Subscriber = Callable[[Event], object]

_lock = threading.Lock()
_subscribers: tuple[Subscriber, ...] = ()
_failing: set[int] = set()


def subscribe(fn: Subscriber) -> Subscriber:
    """Call ``fn(event)`` for every event of this process; usable as a decorator."""
    global _subscribers
    with _lock:
        if fn not in _subscribers:
            _subscribers = (*_subscribers, fn)
    return fn


def unsubscribe(fn: Subscriber) -> None:
    """Stop calling ``fn`` (nothing happens if it was not subscribed)."""
    global _subscribers
    with _lock:
        _subscribers = tuple(s for s in _subscribers if s != fn)


def emit(event: Event) -> None:
    """Hand ``event`` to every subscriber, in the order they subscribed."""
    for fn in _subscribers:  # a tuple, replaced whole: safe to read without the lock
        try:
            fn(event)
        except Exception as exc:
            # Once per subscriber until it works again: a broken hook must not
            # flood the log at thousands of tasks a second.
            if id(fn) not in _failing:
                _failing.add(id(fn))
                logger.warning(
                    "event subscriber %s failed (skipped): %s: %s",
                    getattr(fn, "__qualname__", fn),
                    type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "",
                )
        else:
            if _failing:
                _failing.discard(id(fn))


_worker_log = logging.getLogger("alchq.worker")


def log_task_event(event: Event) -> None:
    """alchq's task log lines: one per start (DEBUG within a batch), one per outcome."""
    if event.kind == "task_started":
        level = logging.DEBUG if event.batched else logging.INFO
    elif event.kind == "task_finished":
        level = logging.INFO if event.detail is None else logging.WARNING
    elif event.kind == "task_retried":
        level = logging.INFO if event.outcome == "SNOOZED" else logging.WARNING
    else:
        return
    if not _worker_log.isEnabledFor(level):
        return  # thousands of tasks a second: build nothing nobody reads
    label = f"{event.model} {event.task_id}"
    extra = {
        "alchq_model": event.model,
        "alchq_task_id": event.task_id,
        "alchq_attempt": event.attempt,
        "alchq_outcome": event.outcome,
        "alchq_duration": event.duration,
    }
    if event.kind == "task_started":
        _worker_log.log(level, "%s started (attempt %d)", label, event.attempt, extra=extra)
    elif event.kind == "task_finished":
        if event.detail is None:
            _worker_log.info("%s %s in %.3fs", label, event.outcome, event.duration, extra=extra)
        else:
            # A failed task is worth a look, but it is not the worker's error.
            _worker_log.warning(
                "%s %s in %.3fs: %s",
                label,
                event.outcome,
                event.duration,
                event.detail,
                extra=extra,
            )
    elif event.kind == "task_retried" and event.outcome == "SNOOZED":
        _worker_log.info(
            "%s snoozed after %.3fs: runs again in %gs",
            label,
            event.duration,
            event.again_in,
            extra=extra,
        )
    elif event.kind == "task_retried":
        _worker_log.warning(
            "%s failed in %.3fs (attempt %d of %d), retrying in %.1fs: %s",
            label,
            event.duration,
            event.failures,
            event.max_attempts,
            event.again_in,
            event.detail,
            extra=extra,
        )


subscribe(log_task_event)
