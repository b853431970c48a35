"""Helpers shared by the test modules."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    what: str | None = None,
    describe: Callable[[], str] | None = None,
    *,
    interval: float = 0.05,
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Fails the test after ``timeout`` seconds, saying ``what`` was awaited and,
    if given, what ``describe()`` says about the state of things. Tests
    synchronise with this, never with fixed sleeps.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            message = f"timed out after {timeout:g}s waiting for {what or predicate}"
            if describe is not None:
                message += "\n" + describe()
            raise AssertionError(message)
        time.sleep(interval)


def worker_pid() -> int:
    """The pid of the ``alchq run`` command a task runs under (its supervisor's, as
    every worker process of the command has one), so tests can tell workers apart."""
    return int(os.environ.get("ALCHQ_SUPERVISOR_PID") or os.getpid())


def check_refused(database: Any) -> Any:
    """The error a failed CHECK constraint raises on ``database`` (an engine or a URL):
    PyMySQL reports MariaDB's failed CHECK (4025) as an OperationalError."""
    from sqlalchemy import make_url
    from sqlalchemy.exc import IntegrityError, OperationalError

    url = getattr(database, "url", database)
    if make_url(url).get_backend_name() in ("mysql", "mariadb"):
        return (IntegrityError, OperationalError)
    return IntegrityError
